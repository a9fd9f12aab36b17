//! The thing being written: an image file or a block device.
//!
//! Probing never changes anything, so every bad-input check runs before the
//! first byte is written and a refused target is left exactly as it was.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;
use thiserror::Error;

use crate::disk::devices::{DevNum, Host, Transport};
use crate::disk::opened;
use crate::disk::partition;
use crate::io::{IoAt, io_at};
use crate::size::human;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    ImageFile,
    BlockDevice,
}

impl std::fmt::Display for TargetKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TargetKind::ImageFile => "image file",
            TargetKind::BlockDevice => "block device",
        })
    }
}

/// What we know about a target before touching it.
#[derive(Debug, Clone, Serialize)]
pub struct TargetProbe {
    pub path: PathBuf,
    pub kind: TargetKind,
    /// Current size in bytes; 0 for an image file that does not exist yet.
    pub size: u64,
    pub exists: bool,
    pub removable: Option<bool>,
    pub model: Option<String>,
    pub serial: Option<String>,
    /// Mounts, swap and holders found on the device or its partitions.
    pub busy: Vec<String>,
    pub vendor: Option<String>,
    /// How a block device is attached; `None` for image files.
    pub transport: Option<Transport>,
    /// On an unpluggable bus (USB, SD slot) even if the removable flag is 0.
    pub hotplug: Option<bool>,
    /// The kernel marks the device read-only (write-protect switch, `losetup -r`).
    pub read_only: bool,
    /// 512 for image files.
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    /// Why the device is part of the running system (`/ is on /dev/vda`):
    /// refused even with `--force`.
    pub system: Vec<String>,
    /// Set when the path names a partition: the whole disk it belongs to.
    pub partition_of: Option<PathBuf>,
    /// What the path named when it was probed; whatever is opened later by
    /// the same path must still be it (see [`Node::check`]).
    #[serde(skip)]
    pub node: Option<Node>,
}

/// A file by its inode, a block device by its device number: what a path
/// named when it was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    File { dev: u64, ino: u64 },
    Device { rdev: u64 },
}

impl Node {
    fn of(meta: &fs::Metadata) -> Node {
        if meta.file_type().is_block_device() {
            Node::Device { rdev: meta.rdev() }
        } else {
            Node::File {
                dev: meta.dev(),
                ino: meta.ino(),
            }
        }
    }

    /// Refuses `file`, opened by `path` after probing, unless it is still
    /// what was probed: a path swapped in between (a symlink redirected, a
    /// file renamed over it, another device at that node) is never written.
    pub fn check(self, file: &File, path: &Path) -> Result<(), TargetError> {
        let now = file.metadata().map_err(io_at(path))?;
        if Node::of(&now) == self {
            Ok(())
        } else {
            Err(TargetError::Replaced(path.to_path_buf()))
        }
    }
}

impl TargetProbe {
    pub(crate) fn image(path: &Path, size: u64, exists: bool) -> TargetProbe {
        TargetProbe {
            path: path.to_path_buf(),
            kind: TargetKind::ImageFile,
            size,
            exists,
            removable: None,
            model: None,
            serial: None,
            busy: Vec::new(),
            vendor: None,
            transport: None,
            hotplug: None,
            read_only: false,
            logical_sector_size: 512,
            physical_sector_size: 512,
            system: Vec::new(),
            partition_of: None,
            node: None,
        }
    }

    /// Removable in the sense a stick writer cares about: the removable flag,
    /// hotplug, or a USB/MMC transport (USB SSDs report removable = 0).
    pub fn removable_class(&self) -> bool {
        self.removable == Some(true)
            || self.hotplug == Some(true)
            || matches!(self.transport, Some(Transport::Usb | Transport::Mmc))
    }
}

#[derive(Debug, Error)]
pub enum TargetError {
    #[error("target {0} is a directory; give an image file path or a block device")]
    IsDirectory(PathBuf),
    #[error(
        "target {0} does not exist; livestick never creates files under /dev — check the device name with `livestick devices`"
    )]
    MissingDevice(PathBuf),
    #[error("target {0} is neither a regular file nor a block device")]
    NotFileOrDevice(PathBuf),
    #[error("image file {0} does not exist; give --size (e.g. --size 4G) to create it")]
    NeedSize(PathBuf),
    #[error(
        "--size {requested} bytes is smaller than the existing image file {path} ({current} bytes); livestick does not shrink images"
    )]
    WouldShrink {
        path: PathBuf,
        requested: u64,
        current: u64,
    },
    #[error("--size applies to image files only; {0} is a block device")]
    SizeOnDevice(PathBuf),
    #[error("{path} is in use, refusing to write to it:\n{}", .findings.join("\n"))]
    Busy {
        path: PathBuf,
        findings: Vec<String>,
    },
    #[error(
        "{0} is not a removable device; if you are sure it is the stick you want to erase, add --force"
    )]
    NotRemovable(PathBuf),
    #[error(
        "{path} holds the running system, refusing to write to it even with --force:\n{}\npick the stick by its model, size and serial in `livestick devices`",
        .findings.join("\n")
    )]
    SystemDisk {
        path: PathBuf,
        findings: Vec<String>,
    },
    #[error(
        "{path} is a partition of {}; livestick writes a whole stick (partition table included) — give {} instead",
        .disk.display(), .disk.display()
    )]
    IsPartition { path: PathBuf, disk: PathBuf },
    #[error(
        "{0} is read-only (a write-protect switch on the stick or SD card, or a read-only loop device); unlock it and plug it in again"
    )]
    ReadOnly(PathBuf),
    #[error("{0} has no medium (an empty card reader?); insert the card and try again")]
    NoMedium(PathBuf),
    #[error(
        "{path} uses {logical}-byte logical sectors (a 4Kn device); livestick supports 512-byte logical sectors only — use another stick, or write an image file and copy it with a tool that handles 4Kn"
    )]
    SectorSize { path: PathBuf, logical: u32 },
    #[error(
        "{path} holds {} ({size} bytes), too small for a live stick (at least {} are needed); use a larger stick",
        human(*.size), human(*.min)
    )]
    TooSmall { path: PathBuf, size: u64, min: u64 },
    #[error(
        "{0} changed after it was checked (replaced, renamed over or relinked); nothing was written — check what the path names and run the command again"
    )]
    Replaced(PathBuf),
    #[error(
        "{0} could not be opened for writing when this command opened it (write-protected, in use, or not yours to write), so it is only read; run the command as a user who may write it (root, or the disk group), with the stick unmounted"
    )]
    OpenedReadOnly(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl crate::error::Classify for TargetError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            TargetError::Busy { .. }
            | TargetError::NotRemovable(_)
            | TargetError::SystemDisk { .. }
            | TargetError::Replaced(_) => ErrorKind::Refused,
            TargetError::Io { source, .. } => crate::error::open_failure_kind(source),
            _ => ErrorKind::BadInput,
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            TargetError::Io { source, .. } => crate::error::open_failure_hint(source),
            TargetError::Busy { .. } => {
                "nothing was written; no option overrides this: unmount it (umount), stop swapping on it (swapoff) or stop what holds it, and detach a loop device over it (losetup -d), then run the command again"
            }
            _ => self.kind().hint(),
        }
    }
}

impl From<IoAt> for TargetError {
    fn from(IoAt { path, source }: IoAt) -> Self {
        TargetError::Io { path, source }
    }
}

/// Looks at a target without changing it.
///
/// Links (`/dev/disk/by-id/…`, `/dev/disk/by-uuid/…`, or any symlink) are
/// resolved, and a block device is reported under its canonical name. A path
/// that does not exist is an image file to create — unless it is, or a link
/// leads, under `/dev`: nothing is ever created there.
///
/// A path [`pin`]ned earlier in this process must still name what it named then.
pub fn probe(path: &Path) -> Result<TargetProbe, TargetError> {
    if let Some(probe) = opened_probe(path) {
        return Ok(probe);
    }
    let probe = probe_unpinned(path)?;
    check_pinned(path, probe.node)?;
    Ok(probe)
}

/// What each pinned path named when it was pinned. A command looks at its target
/// (what it is, the safety checks) before its one open ([`open_target`]), and a
/// command that opens nothing (a new image, created with `O_EXCL`; a directory
/// overlay) looks at it by path more than once: pinning the first look's identity
/// makes a path swapped in between (renamed over, relinked) refused, by the open or by
/// the next look. After the open, the path is never looked at again (see
/// [`opened`]).
static PINNED: std::sync::Mutex<Vec<(PathBuf, Node)>> = std::sync::Mutex::new(Vec::new());

/// Pins what `path` names now (nothing, for a path that does not exist yet: the
/// image a write creates is created with `O_EXCL`): every later [`probe`] of the
/// same path in this process refuses anything else with [`TargetError::Replaced`].
/// Called at a command's first look at its target.
pub fn pin(path: &Path) -> Result<(), TargetError> {
    if opened::id_of(path).is_some() {
        return Ok(());
    }
    let node = match fs::metadata(path) {
        Ok(meta) => Node::of(&meta),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_at(path)(e).into()),
    };
    if let Ok(mut pinned) = PINNED.lock()
        && !pinned.iter().any(|(p, _)| p == path)
    {
        pinned.push((path.to_path_buf(), node));
    }
    after_probe_failpoint(path);
    Ok(())
}

/// `LIVESTICK_FAILPOINT=after-probe`: renames the file `LIVESTICK_FAILPOINT_SWAP`
/// names over the target right after its first look, as another process could, so
/// that the tests can prove the swapped-in file is never written.
fn after_probe_failpoint(path: &Path) {
    if std::env::var("LIVESTICK_FAILPOINT").as_deref() != Ok("after-probe") {
        return;
    }
    if let Some(other) = std::env::var_os("LIVESTICK_FAILPOINT_SWAP")
        && let Err(e) = fs::rename(&other, path)
    {
        eprintln!(
            "livestick: failpoint after-probe: renaming over {}: {e}",
            path.display()
        );
    }
}

/// Refuses `path` when it was [`pin`]ned and now names something else, or nothing:
/// for a look by path that is not a [`probe`] (what a command decides its target
/// is must be decided on what was pinned, or a stick swapped for a file would be
/// refused as "not an overlay" rather than as replaced).
pub fn check_unchanged(path: &Path) -> Result<(), TargetError> {
    if opened::id_of(path).is_some() {
        return Ok(());
    }
    let node = match fs::metadata(path) {
        Ok(meta) => Some(Node::of(&meta)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_at(path)(e).into()),
    };
    check_pinned(path, node)
}

/// Refuses `file`, opened by `path` without a probe, when `path` was [`pin`]ned
/// to something else: the handle is what the work goes through, so it is the
/// handle that must be the pinned file, whatever the path names by now.
pub fn check_opened(path: &Path, file: &File) -> Result<(), TargetError> {
    if opened::id_of(path).is_some() {
        return Ok(());
    }
    let meta = file.metadata().map_err(io_at(path))?;
    check_pinned(path, Some(Node::of(&meta)))
}

/// `LIVESTICK_FAILPOINT=after-check`: renames the file `LIVESTICK_FAILPOINT_SWAP`
/// names over the target right after the last identity check, on a handle opened for
/// writing, so that the tests can prove the work goes through that handle alone (a
/// later open by path would reach the file swapped in).
fn after_check_failpoint(path: &Path) {
    if std::env::var("LIVESTICK_FAILPOINT").as_deref() != Ok("after-check") {
        return;
    }
    if let Some(other) = std::env::var_os("LIVESTICK_FAILPOINT_SWAP")
        && let Err(e) = fs::rename(&other, path)
    {
        eprintln!(
            "livestick: failpoint after-check: renaming over {}: {e}",
            path.display()
        );
    }
}

/// `LIVESTICK_FAILPOINT=after-create`: renames the file `LIVESTICK_FAILPOINT_SWAP`
/// names over a new image file right after it was created, before the write opens
/// it, so that the tests can prove the file renamed over it is never written.
fn after_create_failpoint(path: &Path) {
    if std::env::var("LIVESTICK_FAILPOINT").as_deref() != Ok("after-create") {
        return;
    }
    if let Some(other) = std::env::var_os("LIVESTICK_FAILPOINT_SWAP")
        && let Err(e) = fs::rename(&other, path)
    {
        eprintln!(
            "livestick: failpoint after-create: renaming over {}: {e}",
            path.display()
        );
    }
}

/// How a command uses its target, decided before its one open ([`open_target`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// A dry run of a change: refused by the safety checks of a change, as the real
    /// run would be (a plan is never shown for a refused device), then opened
    /// read-only.
    DryRun,
    /// Changes it: the safety checks of maintenance ([`check_maintenance`]), then
    /// read-write, with `O_EXCL` for a block device.
    Change,
    /// Reads, and repairs the leftovers of a stopped replacement when it may
    /// (`overlay status`, `home info`): opened as for [`Use::Change`] when the safety
    /// checks pass and the open succeeds, read-only otherwise (a mounted or
    /// write-protected stick is looked at, never repaired).
    Look,
}

/// The probe of each target open in [`opened`], by its id there: what every later
/// look at the target's path is answered with.
static PROBES: std::sync::Mutex<Vec<(u64, TargetProbe)>> = std::sync::Mutex::new(Vec::new());

fn probes() -> std::sync::MutexGuard<'static, Vec<(u64, TargetProbe)>> {
    PROBES.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps a command's target open (see [`open_target`] and [`opened`]) until dropped,
/// which closes it and forgets its pin: every use of its path until then goes
/// through its handle, and the command is done after.
#[must_use = "the target is closed when this is dropped"]
#[derive(Debug)]
pub struct Opened(Option<(u64, Vec<PathBuf>)>);

impl Drop for Opened {
    fn drop(&mut self) {
        if let Some((id, names)) = &self.0 {
            probes().retain(|(i, _)| i != id);
            opened::close(*id);
            if let Ok(mut pinned) = PINNED.lock() {
                pinned.retain(|(p, _)| !names.contains(p));
            }
        }
    }
}

/// Opens the target at `path` once for the whole command, as `usage` says, right
/// after the safety checks. A path that is missing, names a directory (an OverlayFS
/// directory overlay) or anything else that is neither a file nor a block device is
/// left alone: nothing is opened, and the command's own look explains. Opening a
/// path opened already changes nothing.
///
/// `LIVESTICK_FAILPOINT=after-probe` fires at the first look (`pin`), before the
/// open, which then refuses the file swapped in; `after-check` fires right after the
/// open, and the command works on the file it opened.
pub fn open_target(path: &Path, usage: Use) -> Result<Opened, TargetError> {
    if opened::id_of(path).is_some() {
        return Ok(Opened(None));
    }
    // A path that cannot be looked at is not pinned; the command's own look says why.
    let _ = pin(path);
    let probe = match probe(path) {
        Ok(p) if p.exists => p,
        Err(e @ TargetError::Replaced(_)) => return Err(e),
        // Missing, a directory, neither a file nor a device: nothing to open, and
        // the command's own look explains it in its terms.
        _ => return Ok(Opened(None)),
    };
    let checked = check_maintenance(&probe);
    let (file, writable) = match (usage, checked) {
        (Use::Look, Err(_)) => (checked_open(&probe, false)?, false),
        (Use::Change | Use::DryRun, Err(e)) => return Err(e),
        (Use::DryRun, Ok(())) => (checked_open(&probe, false)?, false),
        (Use::Change, Ok(())) => (checked_open(&probe, true)?, true),
        (Use::Look, Ok(())) => match checked_open(&probe, true) {
            Ok(file) => (file, true),
            Err(TargetError::Replaced(p)) => return Err(TargetError::Replaced(p)),
            Err(_) => (checked_open(&probe, false)?, false),
        },
    };
    let opened = register(path, probe, file, writable);
    if writable {
        after_check_failpoint(path);
    }
    Ok(opened)
}

/// Opens an existing target for `write` (after `check_safe` and the identity
/// checks): read-write, `O_EXCL` for a block device, or read-only for a dry run. A
/// new image file is not opened here: [`CreatedImage`] creates it.
pub fn open_write_target(
    given: &Path,
    probe: &TargetProbe,
    dry_run: bool,
) -> Result<Opened, TargetError> {
    if !probe.exists || opened::id_of(given).is_some() {
        return Ok(Opened(None));
    }
    let file = checked_open(probe, !dry_run)?;
    let opened = register(given, probe.clone(), file, !dry_run);
    if !dry_run {
        after_check_failpoint(given);
    }
    Ok(opened)
}

/// Opens `probe`'s target by its path, checked to be what was probed.
fn checked_open(probe: &TargetProbe, writable: bool) -> Result<File, TargetError> {
    let path = &probe.path;
    let file = match (writable, probe.kind) {
        (false, _) => File::open(path).map_err(io_at(path))?,
        (true, TargetKind::BlockDevice) => open_exclusive(path)?,
        (true, TargetKind::ImageFile) => OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_at(path))?,
    };
    checked(probe, file)
}

fn register(given: &Path, probe: TargetProbe, file: File, writable: bool) -> Opened {
    let mut names = vec![given.to_path_buf()];
    if probe.path != given {
        names.push(probe.path.clone());
    }
    let id = opened::register(names.clone(), file, writable);
    probes().push((id, probe));
    Opened(Some((id, names)))
}

/// The probe of the open target `path` names.
fn opened_probe(path: &Path) -> Option<TargetProbe> {
    let opened_id = opened::id_of(path)?;
    probes()
        .iter()
        .find(|(id, _)| *id == opened_id)
        .map(|(_, p)| p.clone())
}

/// The open target's handle, reopened, refused for writing when it was opened
/// read-only.
fn opened_handle(path: &Path, writable: bool) -> Option<Result<File, TargetError>> {
    let found = opened::find(path, writable)?;
    Some(match found.file {
        Err(e) => Err(io_at(path)(e).into()),
        Ok(_) if writable && !found.writable => {
            Err(TargetError::OpenedReadOnly(path.to_path_buf()))
        }
        Ok(file) => Ok(file),
    })
}

/// `path` opened for reading (and writing): a clone of the command's handle when
/// `path` names its open target, else the path opened now (a source, a work file, a
/// target of a command that reads it only by path).
pub fn open_path(path: &Path, writable: bool) -> Result<File, TargetError> {
    if let Some(handle) = opened_handle(path, writable) {
        return handle;
    }
    OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(|e| io_at(path)(e).into())
}

pub use crate::disk::opened::{inheritable_path, tool_path};

/// Records that the open target at `path` was grown to `size` bytes (an image file a
/// write makes larger), so that later looks see its size.
fn note_grown(path: &Path, size: u64) {
    let Some(opened_id) = opened::id_of(path) else {
        return;
    };
    if let Some((_, probe)) = probes().iter_mut().find(|(id, _)| *id == opened_id) {
        probe.size = probe.size.max(size);
    }
}

fn check_pinned(path: &Path, node: Option<Node>) -> Result<(), TargetError> {
    let Ok(pinned) = PINNED.lock() else {
        return Ok(());
    };
    match pinned.iter().find(|(p, _)| p == path) {
        Some((_, first)) if node != Some(*first) => Err(TargetError::Replaced(path.to_path_buf())),
        _ => Ok(()),
    }
}

fn probe_unpinned(path: &Path) -> Result<TargetProbe, TargetError> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if would_land_in_dev(path) {
                return Err(TargetError::MissingDevice(path.to_path_buf()));
            }
            return Ok(TargetProbe::image(path, 0, false));
        }
        Err(e) => return Err(io_at(path)(e).into()),
    };
    if meta.is_dir() {
        return Err(TargetError::IsDirectory(path.to_path_buf()));
    }
    if meta.is_file() {
        return Ok(TargetProbe {
            node: Some(Node::of(&meta)),
            // An image file is in use through a loop device mounted or swapped on.
            busy: Host::live().busy_loops_of_file((meta.dev(), meta.ino())),
            ..TargetProbe::image(path, meta.len(), true)
        });
    }
    if !meta.file_type().is_block_device() {
        return Err(TargetError::NotFileOrDevice(path.to_path_buf()));
    }
    let canonical = fs::canonicalize(path).map_err(io_at(path))?;
    let dev = DevNum::from_rdev(meta.rdev());
    let host = Host::live();
    let facts = host.facts(dev);
    let system = system_findings(&host, dev, &canonical);
    // Geometry from sysfs, which knows every device the kernel does: the probe is the
    // look before the safety checks, and a command opens its target once, after them
    // (`open_target`). An empty card reader has size 0 there, which check_safe
    // explains; a device closed to us (an ordinary user, a sandbox, an LSM) is judged
    // from there too, so a refusal names the real reason rather than "permission
    // denied" (which the open reports, if it comes to that).
    let (size, logical, physical) = match &facts {
        Some(f) => (f.size, f.logical_sector_size, f.physical_sector_size),
        None => match File::open(&canonical) {
            Ok(file) => device_geometry(&file, &canonical)?,
            Err(e) if e.raw_os_error() == Some(libc::ENOMEDIUM) => (0, 512, 512),
            Err(e) => return Err(io_at(path)(e).into()),
        },
    };
    let whole = facts
        .as_ref()
        .and_then(|f| f.partition_of.clone())
        .unwrap_or_else(|| canonical.clone());
    Ok(TargetProbe {
        kind: TargetKind::BlockDevice,
        size,
        exists: true,
        removable: facts.as_ref().map(|f| f.removable),
        model: facts.as_ref().and_then(|f| f.model.clone()),
        serial: facts.as_ref().and_then(|f| f.serial.clone()),
        busy: host.busy_findings(dev),
        vendor: facts.as_ref().and_then(|f| f.vendor.clone()),
        transport: facts.as_ref().map(|f| f.transport),
        hotplug: facts.as_ref().map(|f| f.hotplug),
        read_only: facts.as_ref().is_some_and(|f| f.read_only),
        logical_sector_size: logical,
        physical_sector_size: physical,
        system,
        partition_of: (whole != canonical).then_some(whole),
        path: canonical,
        node: Some(Node::of(&meta)),
    })
}

/// Whether creating `path` would create something under `/dev`: the path
/// itself, the directory it would be created in, or where a dangling symlink
/// points. (`open(O_CREAT)` follows a dangling link and creates its target.)
fn would_land_in_dev(path: &Path) -> bool {
    let dev = Path::new("/dev");
    // /dev/shm is a tmpfs for ordinary files (a fast place for test images),
    // not a device directory.
    let shm = Path::new("/dev/shm");
    let in_dev = |p: &Path| p.starts_with(dev) && !p.starts_with(shm);
    let absolute = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir()
                .map(|d| d.join(p))
                .unwrap_or_else(|_| p.to_path_buf())
        }
    };
    let mut current = absolute(path);
    // 40 links, as the kernel allows, before giving up on a loop.
    for _ in 0..40 {
        if in_dev(&current) {
            return true;
        }
        if let Some(parent) = current.parent()
            && let Ok(real) = fs::canonicalize(parent)
            && in_dev(&real)
        {
            return true;
        }
        match fs::read_link(&current) {
            Ok(target) => {
                let base = current.parent().map(Path::to_path_buf).unwrap_or_default();
                current = absolute(&base.join(target));
            }
            Err(_) => return false,
        }
    }
    true
}

/// Size in bytes and logical/physical sector sizes, asked of the device itself.
fn device_geometry(file: &File, path: &Path) -> Result<(u64, u32, u32), TargetError> {
    use std::os::fd::AsRawFd;
    nix::ioctl_read_bad!(blksszget, nix::request_code_none!(0x12, 104), libc::c_int);
    nix::ioctl_read_bad!(blkpbszget, nix::request_code_none!(0x12, 123), libc::c_uint);
    let size = {
        let mut f = file;
        f.seek(SeekFrom::End(0)).map_err(io_at(path))?
    };
    let mut logical: libc::c_int = 0;
    let mut physical: libc::c_uint = 0;
    // SAFETY: both ioctls write one int through the pointer, which points at a
    // live local of that type; the fd is an open block device.
    let logical = match unsafe { blksszget(file.as_raw_fd(), &mut logical) } {
        Ok(_) if logical > 0 => logical as u32,
        _ => 512,
    };
    // SAFETY: as above.
    let physical = match unsafe { blkpbszget(file.as_raw_fd(), &mut physical) } {
        Ok(_) if physical > 0 => physical,
        _ => logical,
    };
    Ok((size, logical, physical))
}

/// "/ is on /dev/vda" lines when the device, its disk, or anything it is part
/// of carries a system mount point.
fn system_findings(host: &Host, dev: DevNum, path: &Path) -> Vec<String> {
    let disk = host
        .facts(dev)
        .and_then(|f| f.partition_of)
        .and_then(|p| fs::metadata(p).ok())
        .map(|m| DevNum::from_rdev(m.rdev()))
        .unwrap_or(dev);
    let mut out: Vec<String> = host
        .system_disks()
        .into_iter()
        .filter(|u| u.dev == dev || u.dev == disk)
        .map(|u| format!("{} is on {}", u.mount_point, path.display()))
        .collect();
    out.dedup();
    out
}

/// Refuses a block device that must not be written, each rule with its
/// reason and what to do. Only the removable rule yields to `force`: the
/// running system, a busy device, a partition, a read-only or empty device,
/// 4Kn sectors and a too-small capacity are refused whatever the flags.
pub fn check_safe(probe: &TargetProbe, force: bool) -> Result<(), TargetError> {
    if probe.kind != TargetKind::BlockDevice {
        return refuse_busy_image(probe);
    }
    let path = || probe.path.clone();
    if !probe.system.is_empty() {
        return Err(TargetError::SystemDisk {
            path: path(),
            findings: probe.system.clone(),
        });
    }
    if let Some(disk) = &probe.partition_of {
        return Err(TargetError::IsPartition {
            path: path(),
            disk: disk.clone(),
        });
    }
    if !probe.busy.is_empty() {
        return Err(TargetError::Busy {
            path: path(),
            findings: probe.busy.clone(),
        });
    }
    if probe.size == 0 {
        return Err(TargetError::NoMedium(path()));
    }
    if probe.read_only {
        return Err(TargetError::ReadOnly(path()));
    }
    if probe.logical_sector_size != 512 {
        return Err(TargetError::SectorSize {
            path: path(),
            logical: probe.logical_sector_size,
        });
    }
    if !probe.removable_class() && !force {
        return Err(TargetError::NotRemovable(path()));
    }
    if probe.size < partition::MIN_DISK {
        return Err(TargetError::TooSmall {
            path: path(),
            size: probe.size,
            min: partition::MIN_DISK,
        });
    }
    Ok(())
}

/// An image file behind a loop device that is mounted, swapped on or held is in
/// use as that device is: refused the same way (no `--force` overrides it).
fn refuse_busy_image(probe: &TargetProbe) -> Result<(), TargetError> {
    if probe.busy.is_empty() {
        return Ok(());
    }
    Err(TargetError::Busy {
        path: probe.path.clone(),
        findings: probe.busy.clone(),
    })
}

/// The confirmation question for erasing a target: names the model, size and
/// serial, so the user can tell two sticks apart.
pub fn confirm_text(probe: &TargetProbe) -> String {
    if probe.kind == TargetKind::ImageFile {
        return if probe.exists {
            format!(
                "Overwrite image file {} ({})?",
                probe.path.display(),
                human(probe.size)
            )
        } else {
            format!("Create image file {}?", probe.path.display())
        };
    }
    let name = match (&probe.vendor, &probe.model) {
        (Some(v), Some(m)) if !m.starts_with(v.as_str()) => format!("{v} {m}"),
        (_, Some(m)) => m.clone(),
        (Some(v), None) => v.clone(),
        (None, None) => "unknown model".to_string(),
    };
    let transport = probe
        .transport
        .map(|t| format!(", {t}"))
        .unwrap_or_default();
    let removable = if probe.removable_class() {
        ""
    } else {
        ", NOT removable"
    };
    format!(
        "Erase everything on {}: {name}, {} ({} bytes), serial {}{transport}{removable}?",
        probe.path.display(),
        human(probe.size),
        probe.size,
        probe.serial.as_deref().unwrap_or("unknown"),
    )
}

/// The size the target will have once opened with `requested` (`--size`).
pub fn planned_size(probe: &TargetProbe, requested: Option<u64>) -> Result<u64, TargetError> {
    match (probe.kind, requested) {
        (TargetKind::BlockDevice, Some(_)) => Err(TargetError::SizeOnDevice(probe.path.clone())),
        (TargetKind::BlockDevice, None) => Ok(probe.size),
        (TargetKind::ImageFile, None) if !probe.exists => {
            Err(TargetError::NeedSize(probe.path.clone()))
        }
        (TargetKind::ImageFile, None) => Ok(probe.size),
        (TargetKind::ImageFile, Some(size)) if probe.exists && size < probe.size => {
            Err(TargetError::WouldShrink {
                path: probe.path.clone(),
                requested: size,
                current: probe.size,
            })
        }
        (TargetKind::ImageFile, Some(size)) => Ok(size),
    }
}

/// Opens the target for writing: creates or grows an image file to `size`, or
/// opens a block device with `O_EXCL`. The exclusive open is a guard that
/// keeps automounters off the device during the write; it is not the busy
/// check (the kernel lets it succeed while a partition is mounted on some
/// versions), which [`check_safe`] does by major:minor first.
pub fn open_for_write(probe: &TargetProbe, size: u64) -> Result<File, TargetError> {
    let path = &probe.path;
    if let Some(handle) = opened_handle(path, true) {
        let file = handle?;
        if probe.kind == TargetKind::ImageFile && file.metadata().map_err(io_at(path))?.len() < size
        {
            file.set_len(size).map_err(io_at(path))?;
            note_grown(path, size);
        }
        return Ok(file);
    }
    match probe.kind {
        TargetKind::ImageFile => {
            // A new image is created with O_EXCL, which never follows a
            // symlink: whatever appeared at the path since probing, nothing
            // is created through it (under /dev or anywhere else).
            let file = if probe.exists {
                OpenOptions::new().read(true).write(true).open(path)
            } else {
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(path)
            }
            .map_err(io_at(path))?;
            if let (true, Some(node)) = (probe.exists, probe.node) {
                node.check(&file, path)?;
            }
            if file.metadata().map_err(io_at(path))?.len() < size {
                file.set_len(size).map_err(io_at(path))?;
            }
            after_check_failpoint(path);
            Ok(file)
        }
        TargetKind::BlockDevice => {
            let file = checked(probe, open_exclusive(path)?)?;
            after_check_failpoint(path);
            Ok(file)
        }
    }
}

/// `file`, if it is still what `probe` saw (see [`Node::check`]).
fn checked(probe: &TargetProbe, file: File) -> Result<File, TargetError> {
    if let Some(node) = probe.node {
        node.check(&file, &probe.path)?;
    }
    Ok(file)
}

/// A block device opened for writing with `O_EXCL`. The kernel refuses that
/// with `EBUSY` while anything else holds the device (a mounted file system, a
/// device-mapper or md holder, another exclusive opener): a refusal, not an
/// I/O failure.
fn open_exclusive(path: &Path) -> Result<File, TargetError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_EXCL)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => TargetError::Busy {
                path: path.to_path_buf(),
                findings: vec![format!(
                    "the kernel refuses an exclusive open of {}: a file system, a device mapper or another program holds it",
                    path.display()
                )],
            },
            _ => io_at(path)(e).into(),
        })
}

/// Refuses a stick that maintenance (`overlay merge|reset|grow|recover`,
/// `home resize`) must not change, by the rules of [`check_safe`] that apply to
/// a stick already written: never the running system, never a device in use,
/// never a read-only one. Removability is not asked again (the stick was
/// chosen when it was written, and these commands have no `--force`). Dry
/// runs call it too, so that a plan is never shown for a refused device.
pub fn check_maintenance(probe: &TargetProbe) -> Result<(), TargetError> {
    if probe.kind != TargetKind::BlockDevice {
        return refuse_busy_image(probe);
    }
    if !probe.system.is_empty() {
        return Err(TargetError::SystemDisk {
            path: probe.path.clone(),
            findings: probe.system.clone(),
        });
    }
    if !probe.busy.is_empty() {
        return Err(TargetError::Busy {
            path: probe.path.clone(),
            findings: probe.busy.clone(),
        });
    }
    if probe.read_only {
        return Err(TargetError::ReadOnly(probe.path.clone()));
    }
    Ok(())
}

/// Opens an existing stick or image file for maintenance. To change it, the
/// probe first passes [`check_maintenance`] and a block device is opened with
/// `O_EXCL`, as `write` opens it; to read it, nothing is refused (looking at a
/// mounted stick changes nothing).
pub fn open_existing(probe: &TargetProbe, writable: bool) -> Result<File, TargetError> {
    let path = &probe.path;
    if let Some(handle) = opened_handle(path, writable) {
        return handle;
    }
    if !writable {
        return checked(probe, File::open(path).map_err(io_at(path))?);
    }
    check_maintenance(probe)?;
    let file = match probe.kind {
        TargetKind::BlockDevice => open_exclusive(path)?,
        TargetKind::ImageFile => OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_at(path))?,
    };
    let file = checked(probe, file)?;
    after_check_failpoint(path);
    Ok(file)
}

/// An image file created for a write that has not completed. Only the file
/// created here is ever removed: an image that existed before never is.
#[derive(Debug)]
pub struct CreatedImage {
    path: PathBuf,
    /// Device and inode at creation, so that a file that replaced it at the
    /// same path is left alone.
    id: (u64, u64),
}

impl CreatedImage {
    /// Creates the image a probe found missing (`None` for anything else).
    /// `O_EXCL`: never through a symlink, never over a file that appeared
    /// since probing.
    pub fn create(probe: &TargetProbe) -> Result<Option<CreatedImage>, TargetError> {
        if probe.kind != TargetKind::ImageFile || probe.exists {
            return Ok(None);
        }
        let path = &probe.path;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io_at(path))?;
        let meta = file.metadata().map_err(io_at(path))?;
        let created = CreatedImage {
            path: path.clone(),
            id: (meta.dev(), meta.ino()),
        };
        after_create_failpoint(path);
        Ok(Some(created))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the write opens next: the probe of the file created here, identity
    /// included, so that the open for writing refuses anything renamed over it
    /// since (the handle of the creation is not kept: it is opened again).
    pub fn probe(&self, probe: &TargetProbe) -> TargetProbe {
        TargetProbe {
            exists: true,
            node: Some(Node::File {
                dev: self.id.0,
                ino: self.id.1,
            }),
            ..probe.clone()
        }
    }

    /// Removes the image if the path still names it; `Ok(false)` when
    /// something else is there now.
    pub fn remove(self) -> io::Result<bool> {
        let ours = fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.is_file() && (m.dev(), m.ino()) == self.id);
        if !ours {
            return Ok(false);
        }
        fs::remove_file(&self.path).map(|()| true)
    }
}

/// Pushes written data to the medium and drops it from the page cache, so the
/// read-back that follows reads the stick rather than memory.
pub fn sync_and_drop_cache(file: &File, kind: TargetKind) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    file.sync_all()?;
    if kind == TargetKind::BlockDevice {
        nix::ioctl_none!(blkflsbuf, 0x12, 97);
        use std::os::fd::AsRawFd;
        // SAFETY: BLKFLSBUF takes no argument; the fd is a valid open block device.
        let _ = unsafe { blkflsbuf(file.as_raw_fd()) };
    }
    let _ = nix::fcntl::posix_fadvise(
        file.as_raw_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
    Ok(())
}

/// Asks the kernel to re-read the partition table; only a warning when it can't
/// (this machine's kernel parses no tables, and the stick is written by offset).
pub fn reread_partitions(file: &File) -> Result<(), String> {
    nix::ioctl_none!(blkrrpart, 0x12, 95);
    use std::os::fd::AsRawFd;
    // SAFETY: BLKRRPART takes no argument; the fd is a valid open block device.
    unsafe { blkrrpart(file.as_raw_fd()) }
        .map(|_| ())
        .map_err(|e| format!("the kernel could not re-read the partition table ({e}); replug the stick before using it"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_files_are_sized_as_asked() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("new.img");
        let p = probe(&new).unwrap();
        assert!(!p.exists);
        assert!(matches!(
            planned_size(&p, None),
            Err(TargetError::NeedSize(_))
        ));
        assert_eq!(planned_size(&p, Some(1 << 30)).unwrap(), 1 << 30);
        fs::write(&new, vec![0u8; 4096]).unwrap();
        let p = probe(&new).unwrap();
        assert!(matches!(
            planned_size(&p, Some(1024)),
            Err(TargetError::WouldShrink { .. })
        ));
        assert!(matches!(
            probe(dir.path()),
            Err(TargetError::IsDirectory(_))
        ));
        assert!(matches!(
            probe(Path::new("/dev/livestick-no-such-device")),
            Err(TargetError::MissingDevice(_))
        ));
    }

    /// After its one open, a command's target is reached through that handle:
    /// another file renamed over the path is neither read, written nor probed, every
    /// use starts at byte 0 of its own (no shared offset), a dry run's handle refuses
    /// writing, and once the guard is dropped the path is the path again.
    #[test]
    fn an_opened_target_is_reached_through_its_handle_until_closed() {
        use std::io::{Read, Write};
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("stick.img");
        fs::write(&image, vec![1u8; 4096]).unwrap();
        let guard = open_target(&image, Use::Change).unwrap();
        let other = dir.path().join("other.img");
        fs::write(&other, vec![7u8; 8192]).unwrap();
        fs::rename(&other, &image).unwrap();

        let mut first = open_path(&image, true).unwrap();
        let mut head = [0u8; 16];
        first.read_exact(&mut head).unwrap();
        assert_eq!(head, [1u8; 16]);
        first.write_all(&[2u8; 16]).unwrap();
        // A second use reads from byte 0, whatever the first did to its offset.
        let mut second = open_path(&image, false).unwrap();
        let mut got = vec![0u8; 32];
        second.read_exact(&mut got).unwrap();
        assert_eq!(&got[..16], &[1u8; 16]);
        assert_eq!(&got[16..], &[2u8; 16]);
        assert_eq!(probe(&image).unwrap().size, 4096);
        check_unchanged(&image).unwrap();
        assert!(tool_path(&image).starts_with("/proc/self/fd/"));
        drop((first, second, guard));

        assert_eq!(fs::read(&image).unwrap(), vec![7u8; 8192]);
        assert_eq!(tool_path(&image), image);
        let dry = open_target(&image, Use::DryRun).unwrap();
        assert!(matches!(
            open_path(&image, true),
            Err(TargetError::OpenedReadOnly(_))
        ));
        assert_eq!(
            open_path(&image, false).unwrap().metadata().unwrap().len(),
            8192
        );
        drop(dry);
    }

    #[test]
    fn a_target_replaced_after_probing_is_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("stick.img");
        fs::write(&image, vec![0u8; 4096]).unwrap();
        let probed = probe(&image).unwrap();
        // Another file renamed over the path after the checks.
        let other = dir.path().join("other.img");
        fs::write(&other, vec![7u8; 4096]).unwrap();
        fs::rename(&other, &image).unwrap();
        for result in [
            open_for_write(&probed, 4096).map(drop),
            open_existing(&probed, true).map(drop),
            open_existing(&probed, false).map(drop),
        ] {
            assert!(
                matches!(result, Err(TargetError::Replaced(_))),
                "{result:?}"
            );
        }
        assert_eq!(fs::read(&image).unwrap(), vec![7u8; 4096]);
        // Probed again, it is what the path names now.
        let again = probe(&image).unwrap();
        open_existing(&again, true).unwrap();
    }
}
