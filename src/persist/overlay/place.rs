//! Where an overlay file lives: a bare file (with its squashfs.img or root image
//! beside it), a file on a stick's FAT, or a file on the ext4 live partition of a
//! stick written with the layout for persistence over 4 GiB; the last two read and
//! written in place through their extents. The stick itself is reached through
//! `disk::stick` and `disk::ext4_fs`; this module only chooses the overlay on it and
//! says what room it has.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::disk::extent_file::ExtentFile;
use crate::disk::fat_alloc;
use crate::disk::stick::{Stick, StickError, StickInfo};
use crate::disk::target::TargetError;
use crate::io::SyncData;
use crate::layout::ROOT_IMAGES;
use crate::persist::merge::located::Located;
use crate::persist::snapshot;
use crate::size::human;

use super::{Explain, Kind, OverlayError, StickRoom, store};

/// What an overlay file is read and written through, whatever its place.
pub trait OverlayIo: Read + Write + Seek + SyncData {}
impl<T: Read + Write + Seek + SyncData> OverlayIo for T {}

/// Where the user pointed: decided before anything is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Stick,
    /// An OverlayFS directory overlay (`overlayfs/` + `ovlwork/`).
    Dir,
    /// A bare overlay file.
    File,
}

/// Also the command's first look at its target: what the path names now is pinned
/// (`target::pin`), so that every later open of it refuses a file swapped in since.
/// A path swapped already is refused here as replaced (a safety refusal), not
/// misread as whatever was swapped in.
pub fn target_of(path: &Path) -> Result<Target, OverlayError> {
    // A path that cannot be looked at is not pinned; the open that follows says why.
    let _ = crate::disk::target::pin(path);
    crate::disk::target::check_unchanged(path).map_err(StickError::from)?;
    Ok(if crate::disk::stick::looks_like_stick(path) {
        Target::Stick
    } else if path.is_dir() {
        Target::Dir
    } else {
        Target::File
    })
}

/// Refuses a whole disk (partition table or block device) that is not a live stick,
/// instead of misreading it as an overlay.
pub fn refuse_disk(path: &Path) -> Result<(), OverlayError> {
    use std::os::unix::fs::FileTypeExt;
    // A stick swapped for another disk since the first look is refused as replaced.
    crate::disk::target::check_unchanged(path).map_err(StickError::from)?;
    let mut f = open_path(path, false)?;
    let meta = f.metadata().map_err(cannot_open(path))?;
    let mut looks_like_disk = meta.file_type().is_block_device();
    if meta.is_file() && meta.len() >= 512 {
        let mut sector = [0u8; 512];
        f.read_exact(&mut sector)?;
        // An overlay's chunk 0 is a 16-byte header and zeros; a disk has an MBR signature.
        looks_like_disk |= crate::disk::partition::has_boot_signature(&sector);
    }
    if looks_like_disk {
        return Err(OverlayError::Refused(format!(
            "{} has a partition table (or is a block device) but no FAT partition with a live system: it is neither a live stick nor an overlay file",
            path.display()
        )));
    }
    Ok(())
}

/// `path` opened through the command's handle of its target (`target::open_path`);
/// a path the user named that cannot be opened is [`cannot_open`]'s error.
fn open_path(path: &Path, writable: bool) -> Result<File, OverlayError> {
    crate::disk::target::open_path(path, writable).map_err(|e| match e {
        TargetError::Io { path, source } => cannot_open(&path)(source),
        e => StickError::from(e).into(),
    })
}

/// The error for a path the user named that cannot be opened: missing or
/// forbidden is theirs to fix (exit 2), anything else is I/O.
fn cannot_open(path: &Path) -> impl FnOnce(std::io::Error) -> OverlayError + '_ {
    move |source| {
        crate::error::CannotOpen {
            path: path.to_path_buf(),
            source,
        }
        .into()
    }
}

/// A bare overlay file, opened.
pub struct Bare {
    pub path: PathBuf,
    pub file: File,
    pub len: u64,
}

impl Bare {
    pub fn open(path: &Path, writable: bool) -> Result<Bare, OverlayError> {
        let mut file = open_path(path, writable)?;
        // What was pinned at the first look, whatever the path names by now.
        crate::disk::target::check_opened(path, &file).map_err(StickError::from)?;
        let len = snapshot::stream_len(&mut file)?;
        Ok(Bare {
            path: path.to_path_buf(),
            file,
            len,
        })
    }

    pub fn show(&self) -> String {
        self.path.display().to_string()
    }

    /// A 0-byte file holds no overlay: resetting or reading it would only report
    /// an empty store, which hides that the wrong file was named.
    pub fn refuse_empty(&self) -> Result<(), OverlayError> {
        if self.len == 0 {
            return Err(OverlayError::BadInput(format!(
                "{} is empty (0 bytes): it is not an overlay; name the overlay file (LiveOS/overlay-LABEL-UUID) or the stick",
                self.show()
            )));
        }
        Ok(())
    }

    /// Refuses a file that is no overlay, before a verb reads it as one (and a reset
    /// destroys it). A bare file is taken for an overlay when its name says so
    /// (`overlay-…`, as dracut names them; a damaged one is still reset or recovered
    /// by that name) or its content does: a dm-snapshot header (`SnAp`), the zeroed
    /// header of a new store that no other format claims, or an ext4 with
    /// `/overlayfs`. A home.img, a root image, an ISO or a text file is refused.
    pub fn refuse_not_an_overlay(&mut self) -> Result<(), OverlayError> {
        let named = self
            .path
            .file_name()
            .is_some_and(|n| crate::layout::is_overlay_name(&n.to_string_lossy()));
        if named {
            return Ok(());
        }
        let Some(found) = not_an_overlay(&mut self.file)? else {
            return Ok(());
        };
        Err(OverlayError::BadInput(format!(
            "{} is not an overlay: {found}; name the overlay file (LiveOS/overlay-LABEL-UUID) or the stick (a copy of an overlay keeps working under a name that starts with overlay-)",
            self.show()
        )))
    }

    /// What the file holds, by its first bytes.
    pub fn kind(&mut self) -> Kind {
        if store::is_ext4(&mut self.file) {
            Kind::Overlayfs
        } else {
            Kind::DmSnapshot
        }
    }

    /// Makes the file `new_bytes` long; the zeros appended are sparse where the file
    /// system can, and zero is what both kinds expect past their old end.
    pub fn extend(&mut self, new_bytes: u64) -> Result<(), OverlayError> {
        self.file.set_len(new_bytes)?;
        self.file.sync_all()?;
        self.len = new_bytes;
        Ok(())
    }
}

/// What `file` holds instead of an overlay, or `None` when its content is one
/// (see [`Bare::refuse_not_an_overlay`]).
fn not_an_overlay<R: Read + Seek>(file: &mut R) -> Result<Option<String>, OverlayError> {
    if store::is_ext4(file) {
        let has_upper = crate::disk::ext4_fs::Ext4Fs::open(file)
            .and_then(|fs| fs.lookup(file, &format!("/{}", store::UPPER_DIR)))
            .is_ok_and(|upper| upper.is_some_and(|i| i.is_dir()));
        return Ok((!has_upper).then(|| {
            format!(
                "it holds an ext4 file system without /{} (a home.img?)",
                store::UPPER_DIR
            )
        }));
    }
    let head = crate::io::read_at(file, 0, 16)?;
    if head.len() < 16 {
        // Too short for any header: the verbs' own checks say so.
        return Ok(None);
    }
    match u32::from_le_bytes([head[0], head[1], head[2], head[3]]) {
        snapshot::SNAP_MAGIC => return Ok(None),
        0 => {}
        _ => {
            return Ok(Some(
                "it starts with neither a dm-snapshot header nor the zeros of a new one".into(),
            ));
        }
    }
    // Zeros where a store's header goes, yet another format's signature further in.
    let iso = crate::io::read_at(file, 0x8001, 5)?;
    if iso == b"CD001" {
        return Ok(Some("it is an ISO 9660 image".into()));
    }
    let swap = crate::io::read_at(file, 4086, 10)?;
    if swap == b"SWAPSPACE2" || swap == b"SWAP-SPACE" {
        return Ok(Some("it is a swap area".into()));
    }
    Ok(None)
}

/// The kind of a bare overlay file, read without opening it for writing.
pub fn bare_kind(path: &Path) -> Result<Kind, OverlayError> {
    Ok(Bare::open(path, false)?.kind())
}

/// Which overlay on a stick.
#[derive(Debug, Clone)]
pub struct Selection {
    pub live_dir: String,
    /// An overlay file of the live dir other than overlay-LABEL-UUID.
    pub overlay_file: Option<String>,
}

/// Whether the stick's menus boot `live_dir` with an OverlayFS overlay. That is the
/// overlay's kind even when its own ext4 superblock is too damaged to say so: read
/// as a new dm-snapshot store instead, a reset would make it one and the stick
/// would boot without its overlay.
fn menus_boot_overlayfs(stick: &mut Stick, live_dir: &str) -> bool {
    use crate::boot::cmdline::{KernelArgs, boots_overlayfs, live_dir_booted};
    let menus = stick
        .with_fs(|fs| {
            Ok(crate::boot::menu::STICK_MENUS
                .iter()
                .filter(|(path, _)| crate::disk::fat::exists(fs, path))
                .filter_map(|(path, _)| crate::disk::fat::read_file(fs, path).ok())
                .collect::<Vec<_>>())
        })
        .unwrap_or_default();
    let live_dir = live_dir.trim_matches('/');
    menus.iter().any(|menu| {
        String::from_utf8_lossy(menu).lines().any(|line| {
            let args = KernelArgs::parse(line);
            live_dir_booted(&args).is_some_and(|d| d.eq_ignore_ascii_case(live_dir))
                && boots_overlayfs(&args)
        })
    })
}

/// Whether the overlay starts with a dm-snapshot header the kernel would load: then
/// it is one, whatever the menus say.
fn is_dm_store<R: Read + Seek>(r: &mut R) -> bool {
    matches!(
        snapshot::read_header(r),
        Ok(snapshot::HeaderState::Initialised(_))
    )
}

/// A stick opened for overlay maintenance, with the overlay chosen.
pub struct StickOverlay {
    pub stick: Stick,
    pub info: StickInfo,
    /// Path of the overlay on the FAT filesystem.
    pub overlay: String,
    pub overlay_bytes: u64,
    /// The overlay's name does not match the label/UUID: dracut will not use it.
    pub orphaned: bool,
    pub kind: Kind,
}

impl StickOverlay {
    /// Opens `path` as a stick and picks its overlay: `--overlay-file`, else the one
    /// dracut will use. `allow_orphan` lets `status` fall back to a single orphaned
    /// overlay.
    pub fn open(
        path: &Path,
        sel: &Selection,
        writable: bool,
        allow_orphan: bool,
    ) -> Result<StickOverlay, OverlayError> {
        let mut stick = Stick::open(path, writable).map_err(|e| match e {
            // Kept typed, so that the refusal decides the exit code (3).
            e @ StickError::Target(TargetError::Busy { .. }) => OverlayError::from(e).context(
                "unmount it (and detach loop devices) first: changing the overlay or squashfs.img under a running or mounted system corrupts them",
            ),
            e @ StickError::Target(TargetError::SystemDisk { .. } | TargetError::ReadOnly(_)) => {
                OverlayError::from(e)
            }
            e => OverlayError::from(e).context(format!(
                "{} is not a live stick this command can work on",
                path.display()
            )),
        })?;
        let info = stick.info(&sel.live_dir)?;
        if info.squashfs.is_none() {
            refuse_ext4_live(path, &sel.live_dir)?;
            return Err(StickError::NotLive {
                path: path.to_path_buf(),
                live_dir: sel.live_dir.clone(),
            }
            .into());
        }
        let (overlay, overlay_bytes) = choose_overlay(path, &info, sel, allow_orphan)?;
        let orphaned = overlay != info.expected_overlay;
        let mut t = StickOverlay {
            stick,
            overlay,
            overlay_bytes,
            orphaned,
            kind: Kind::DmSnapshot,
            info,
        };
        // Its own content first; the menus only for one that says neither.
        t.kind = if store::is_ext4(&mut t.io()?) {
            Kind::Overlayfs
        } else if is_dm_store(&mut t.io()?) {
            Kind::DmSnapshot
        } else if menus_boot_overlayfs(&mut t.stick, &sel.live_dir) {
            Kind::Overlayfs
        } else {
            Kind::DmSnapshot
        };
        Ok(t)
    }

    pub fn show(&self) -> String {
        format!("{}:{}", self.stick.path.display(), self.overlay)
    }

    /// The overlay, read and written in place on the stick.
    pub fn io(&mut self) -> Result<ExtentFile<&mut File>, OverlayError> {
        let show = self.show();
        let extents = self
            .stick
            .file_extents(&self.overlay)
            .explain(|| format!("locating {show}"))?;
        Ok(ExtentFile::new(self.stick.file_mut(), &extents))
    }

    /// What a grow may use: the FAT file limit and the stick's free space.
    pub fn room(&self) -> StickRoom {
        StickRoom {
            stick: self.stick.path.clone(),
            overlay: self.overlay.clone(),
            free_bytes: self.info.free_bytes,
            on_fat: true,
        }
    }

    /// Orphaned overlays other than the chosen one, by path.
    pub fn orphans(&self) -> Vec<String> {
        self.info
            .orphaned_overlays()
            .iter()
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// What `status` says about the overlay's name.
    pub fn name_notes(&self) -> Vec<String> {
        let orphans = self.orphans();
        if self.orphaned {
            vec![format!(
                "{} does not match the stick's label/UUID: the live system looks for {} and ignores this one (its changes are orphaned); rename it to use it again",
                self.overlay, self.info.expected_overlay
            )]
        } else if !orphans.is_empty() {
            vec![format!(
                "orphaned overlay(s) the live system ignores: {}",
                orphans.join(", ")
            )]
        } else {
            Vec::new()
        }
    }

    pub fn squashfs_path(&self) -> String {
        format!("/{}/squashfs.img", self.info.live_dir)
    }

    /// Size of the root image inside squashfs.img (for range checks), when unsquashfs
    /// is installed and the image can be read in place.
    pub fn root_image_bytes(&mut self) -> Option<u64> {
        let sq = self.squashfs_path();
        let at = Located::on_stick(&mut self.stick, &sq).ok()?;
        let off = at.contiguous_at()?;
        let listing = crate::squash::list_at(&at.device, off).ok()?;
        ROOT_IMAGES
            .iter()
            .find_map(|n| listing.iter().find(|e| e.is_file && e.path == *n))
            .map(|e| e.size)
    }

    /// Gives the overlay `new_bytes` by appending clusters to its chain (not written);
    /// `zero` (ranges of the grown file) is zeroed through the new extents before the
    /// directory entry's size makes them part of the file, so a stop half way leaves
    /// the old, intact overlay (and some lost clusters fsck.fat frees).
    pub fn allocate(
        &mut self,
        new_bytes: u64,
        zero: &[std::ops::Range<u64>],
    ) -> Result<(), OverlayError> {
        let start = self.stick.partition.start;
        let path = self.overlay.clone();
        let show = self.show();
        fat_alloc::extend_with(
            self.stick.file_mut(),
            start,
            &path,
            new_bytes,
            |dev, extents| {
                let mut file = ExtentFile::new(dev, extents);
                crate::io::zero_ranges(&mut file, zero.iter().cloned())?;
                file.into_inner().sync_data()
            },
        )
        .explain(|| format!("growing {show}"))?;
        let stick = self.stick.path.clone();
        self.stick
            .file_mut()
            .sync_all()
            .explain(|| format!("syncing {}", stick.display()))?;
        self.overlay_bytes = new_bytes;
        Ok(())
    }
}

fn choose_overlay(
    path: &Path,
    info: &StickInfo,
    sel: &Selection,
    allow_orphan: bool,
) -> Result<(String, u64), OverlayError> {
    let names = || {
        info.overlays
            .iter()
            .map(|(p, s)| format!("{p} ({})", human(*s)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(name) = &sel.overlay_file {
        let want = format!("/{}/{}", sel.live_dir, name.trim_start_matches('/'));
        return info
            .overlays
            .iter()
            .find(|(p, _)| p.eq_ignore_ascii_case(&want) || p.eq_ignore_ascii_case(name))
            .cloned()
            .ok_or_else(|| {
                OverlayError::Refused(format!(
                    "{} has no overlay {want}; overlays present: {}",
                    path.display(),
                    if info.overlays.is_empty() {
                        "none".to_string()
                    } else {
                        names()
                    }
                ))
            });
    }
    if let Some(o) = info.overlay() {
        return Ok(o.clone());
    }
    match info.orphaned_overlays().as_slice() {
        [] => Err(OverlayError::Refused(format!(
            "{} has no persistent overlay (expected {}); it was written without --overlay-size-mb",
            path.display(),
            info.expected_overlay
        ))),
        [one] if allow_orphan => Ok((*one).clone()),
        _ => Err(OverlayError::Refused(format!(
            "{} has no overlay named {}, but has {}: its name no longer matches the stick's label/UUID, so the live system ignores it (its changes are orphaned). Rename it to {} to use it again, or pass --overlay-file NAME to work on it",
            path.display(),
            info.expected_overlay,
            names(),
            info.expected_overlay
        ))),
    }
}

/// An overlay file in its place.
pub enum Place {
    Bare(Bare),
    Stick(Box<StickOverlay>),
    /// On the ext4 live partition of a stick (the layout for persistence over 4 GiB).
    Ext4(Box<Ext4LiveOverlay>),
}

impl Place {
    pub fn show(&self) -> String {
        match self {
            Place::Bare(b) => b.show(),
            Place::Stick(t) => t.show(),
            Place::Ext4(o) => o.show(),
        }
    }

    /// The overlay file's size.
    pub fn bytes(&self) -> u64 {
        match self {
            Place::Bare(b) => b.len,
            Place::Stick(t) => t.overlay_bytes,
            Place::Ext4(o) => o.len(),
        }
    }

    /// The overlay's bytes, through its extents on a stick.
    pub fn io(&mut self) -> Result<PlaceIo<'_>, OverlayError> {
        Ok(match self {
            Place::Bare(b) => PlaceIo::Bare(&mut b.file),
            Place::Stick(t) => PlaceIo::Stick(t.io()?),
            Place::Ext4(o) => PlaceIo::Ext4(o.io()),
        })
    }

    /// What the overlay file holds.
    pub fn kind(&mut self) -> Kind {
        match self {
            Place::Bare(b) => b.kind(),
            Place::Stick(t) => t.kind,
            Place::Ext4(o) => o.kind(),
        }
    }

    /// The file or device progress reports name.
    pub fn device(&self) -> &Path {
        match self {
            Place::Bare(b) => &b.path,
            Place::Stick(t) => &t.stick.path,
            Place::Ext4(o) => &o.device,
        }
    }

    /// A stick's limits on a grow; a bare file has none of its own.
    pub fn room(&self) -> Option<StickRoom> {
        match self {
            Place::Bare(_) => None,
            Place::Stick(t) => Some(t.room()),
            Place::Ext4(o) => Some(o.room()),
        }
    }

    /// Where the overlay lies on its device when it is one written run (a tool can
    /// then read it there); a bare file is its own device.
    pub fn contiguous_offset(&mut self) -> Result<Option<u64>, OverlayError> {
        Ok(match self {
            Place::Bare(_) => Some(0),
            Place::Stick(t) => t.io()?.contiguous_offset(),
            Place::Ext4(o) => o.io().contiguous_offset(),
        })
    }

    /// Gives an overlay on a stick `added` more bytes that read as zeros: appended
    /// zeros through the FAT, or unwritten blocks on the ext4 live partition.
    pub fn extend_on_stick(
        &mut self,
        added: u64,
        new_bytes: u64,
        progress: super::Progress<'_>,
    ) -> Result<(), OverlayError> {
        match self {
            Place::Bare(b) => b.extend(new_bytes),
            Place::Stick(t) => {
                // The added clusters keep what the stick held: the file system
                // inside trusts none of it (see ovl_maint's settle_fresh_area).
                progress("grow", 0, added);
                t.allocate(new_bytes, &[])?;
                progress("grow", added, added);
                Ok(())
            }
            Place::Ext4(o) => {
                progress("grow", 0, added);
                o.allocate(new_bytes)?;
                progress("grow", added, added);
                Ok(())
            }
        }
    }

    /// Whether a change may be made through it (a stick opened only to look is not).
    pub fn is_writable(&self) -> bool {
        match self {
            Place::Bare(_) => true,
            Place::Stick(t) => t.stick.is_writable(),
            Place::Ext4(o) => o.writable,
        }
    }
}

/// An overlay file's bytes, wherever it lives.
pub enum PlaceIo<'a> {
    Bare(&'a mut File),
    Stick(ExtentFile<&'a mut File>),
    Ext4(crate::disk::ext4_fs::Ext4FileRw<&'a mut File>),
}

impl Read for PlaceIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            PlaceIo::Bare(f) => f.read(buf),
            PlaceIo::Stick(f) => f.read(buf),
            PlaceIo::Ext4(f) => f.read(buf),
        }
    }
}

impl Write for PlaceIo<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            PlaceIo::Bare(f) => f.write(buf),
            PlaceIo::Stick(f) => f.write(buf),
            PlaceIo::Ext4(f) => f.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            PlaceIo::Bare(f) => f.flush(),
            PlaceIo::Stick(f) => f.flush(),
            PlaceIo::Ext4(f) => f.flush(),
        }
    }
}

impl Seek for PlaceIo<'_> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        match self {
            PlaceIo::Bare(f) => f.seek(pos),
            PlaceIo::Stick(f) => f.seek(pos),
            PlaceIo::Ext4(f) => f.seek(pos),
        }
    }
}

impl SyncData for PlaceIo<'_> {
    fn sync_data(&mut self) -> std::io::Result<()> {
        match self {
            PlaceIo::Bare(f) => f.sync_data(),
            PlaceIo::Stick(f) => f.sync_data(),
            PlaceIo::Ext4(f) => f.sync_data(),
        }
    }
}

// ---------------------------------------------------------------------------------
// The ext4 live layout: the live directory on an ext4 partition 2.

/// An overlay on a stick's ext4 live partition, read and written in place by its
/// extents (unwritten extents read as zeros, as the kernel reads them; a write into
/// one marks what it wrote written: `ext4_fs::Ext4FileRw`).
pub struct Ext4LiveOverlay {
    pub device: PathBuf,
    pub partition: crate::disk::ext4_fs::LivePartition,
    /// Path inside the ext4 file system, "/LiveOS/overlay-LABEL-UUID".
    pub overlay: String,
    /// The name the live system looks for; `overlay` differs when it is orphaned.
    pub expected: String,
    pub map: crate::disk::ext4_fs::FileMap,
    pub live_dir: String,
    /// What opening it repaired (a journal replayed), for stderr and JSON.
    pub repaired: Vec<String>,
    /// The menus on the boot partition mount this live directory's overlay as
    /// OverlayFS ([`menus_boot_overlayfs`]).
    menus_boot_overlayfs: bool,
    file: File,
    writable: bool,
}

/// Blocks kept free when a grow takes the ext4 partition's free space: the extent
/// tree's new blocks and what the live system writes next to its overlay.
const EXT4_GROW_MARGIN: u64 = 16 << 20;

impl Ext4LiveOverlay {
    pub fn show(&self) -> String {
        format!(
            "{} (ext4 partition {}):{}",
            self.device.display(),
            self.partition.number,
            self.overlay
        )
    }

    pub fn len(&self) -> u64 {
        self.map.size
    }

    pub fn is_empty(&self) -> bool {
        self.map.size == 0
    }

    /// The overlay's bytes, read and written in place.
    pub fn io(&mut self) -> crate::disk::ext4_fs::Ext4FileRw<&mut File> {
        crate::disk::ext4_fs::Ext4FileRw::new(&mut self.file, &self.partition, &self.map)
    }

    pub fn kind(&mut self) -> Kind {
        if store::is_ext4(&mut self.io())
            || (self.menus_boot_overlayfs && !is_dm_store(&mut self.io()))
        {
            Kind::Overlayfs
        } else {
            Kind::DmSnapshot
        }
    }

    /// What a grow may use: the partition's free blocks, less a margin; no FAT limit.
    pub fn room(&self) -> StickRoom {
        let fs = &self.partition.fs;
        StickRoom {
            stick: self.device.clone(),
            overlay: format!(
                "{} on ext4 partition {}",
                self.overlay, self.partition.number
            ),
            free_bytes: (fs.free_blocks * fs.block_size).saturating_sub(EXT4_GROW_MARGIN),
            on_fat: false,
        }
    }

    /// Gives the overlay `new_bytes`: new blocks in unwritten extents (they read as
    /// zeros, nothing is written to them), then the new size.
    pub fn allocate(&mut self, new_bytes: u64) -> Result<(), OverlayError> {
        self.file.sync_all()?;
        crate::disk::ext4_live::grow_file(
            &self.device,
            &self.partition,
            &self.overlay,
            self.map.size,
            new_bytes,
        )
        .map_err(|e| match e {
            e @ crate::disk::ext4_live::Ext4LiveError::Allocate { .. } => {
                OverlayError::Refused(e.to_string())
            }
            e => OverlayError::Io(std::io::Error::other(e.to_string())),
        })?;
        self.reload()
    }

    /// Reads the partition's superblock and the overlay's map again (after debugfs
    /// changed them).
    fn reload(&mut self) -> Result<(), OverlayError> {
        use crate::disk::ext4_fs::Ext4Fs;
        let device = self.device.clone();
        let live = |e: crate::disk::ext4_fs::Ext4FsError| {
            OverlayError::BadInput(format!("{}: {e}", device.display()))
        };
        let (start, len) = (self.partition.start, self.partition.len);
        let mut window = crate::io::PartitionWindow::new(&mut self.file, start, len);
        let fs = Ext4Fs::open(&mut window).map_err(live)?;
        let map = fs
            .file(&mut window, &self.overlay)
            .map_err(live)?
            .ok_or_else(|| {
                OverlayError::BadInput(format!("{}: {} is gone", device.display(), self.overlay))
            })?;
        drop(window);
        self.partition.fs = fs;
        self.map = map;
        Ok(())
    }

    /// The map of a file of the partition by its path ("/LiveOS/squashfs.img").
    pub fn file_map(&mut self, path: &str) -> Result<crate::disk::ext4_fs::FileMap, OverlayError> {
        let device = self.device.clone();
        let (start, len) = (self.partition.start, self.partition.len);
        let mut window = crate::io::PartitionWindow::new(&mut self.file, start, len);
        self.partition
            .fs
            .file(&mut window, path)
            .map_err(|e| OverlayError::BadInput(format!("{}: {e}", device.display())))?
            .ok_or_else(|| {
                OverlayError::BadInput(format!(
                    "{} has no {path} on its ext4 live partition {}",
                    device.display(),
                    self.partition.number
                ))
            })
    }

    pub fn squashfs_path(&self) -> String {
        format!("/{}/squashfs.img", self.live_dir)
    }

    /// squashfs.img where its bytes lie on the device, for the tools that read it
    /// there (unsquashfs at an offset). livestick marks every extent of a root image
    /// it writes written; one still unwritten reads as zeros through ext4 but as
    /// stale bytes here, so it is refused rather than misread.
    pub fn squashfs_located(&mut self) -> Result<Located, OverlayError> {
        let path = self.squashfs_path();
        let map = self.file_map(&path)?;
        if map.has_unwritten() {
            return Err(OverlayError::Refused(format!(
                "{}:{path} has unwritten (allocated, never written) blocks, so it cannot be read in place; write the ISO onto the stick again",
                self.device.display()
            )));
        }
        let runs = map
            .byte_runs(self.partition.fs.block_size, &path)
            .map_err(|e| OverlayError::BadInput(format!("{}: {e}", self.device.display())))?;
        Ok(Located {
            device: self.device.clone(),
            extents: runs
                .into_iter()
                .map(|(at, len)| (self.partition.start + at, len))
                .collect(),
        })
    }

    /// Size of the root image inside squashfs.img (for range checks), when unsquashfs
    /// is installed and the image is one run on the partition.
    pub fn root_image_bytes(&mut self) -> Option<u64> {
        let at = self.squashfs_located().ok()?;
        let off = at.contiguous_at()?;
        let listing = crate::squash::list_at(&at.device, off).ok()?;
        ROOT_IMAGES
            .iter()
            .find_map(|n| listing.iter().find(|e| e.is_file && e.path == *n))
            .map(|e| e.size)
    }

    /// What `status` says about the overlay's name and the partition's journal.
    pub fn name_notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if self.overlay != self.expected {
            notes.push(format!(
                "{} is not {}, the overlay the live system looks for: its changes are orphaned",
                self.overlay, self.expected
            ));
        }
        if self.partition.fs.needs_recovery {
            notes.push(format!(
                "ext4 partition {} was not cleanly unmounted: what its journal still holds is not read here, so this may be out of date; the next change (reset, grow, recover, merge, home resize) replays it first",
                self.partition.number
            ));
        }
        notes
    }
}

/// The overlay of a stick written with the ext4 live layout, `None` when the
/// stick has no ext4 partition holding `/<live dir>/squashfs.img`. Opened through
/// the same safety checks as a FAT stick (and `O_EXCL` when `writable`); a change
/// is refused while the partition's journal holds changes not written home.
pub fn ext4_live_overlay(
    path: &Path,
    sel: &Selection,
    writable: bool,
) -> Result<Option<Ext4LiveOverlay>, OverlayError> {
    use crate::disk::ext4_fs;
    let live = |e: ext4_fs::Ext4FsError| OverlayError::BadInput(format!("{}: {e}", path.display()));
    {
        let mut look = open_path(path, false)?;
        if ext4_fs::find_live_partition(&mut look, &sel.live_dir)
            .map_err(live)?
            .is_none()
        {
            return Ok(None);
        }
    }
    let menus_overlayfs = Stick::open(path, false)
        .is_ok_and(|mut boot| menus_boot_overlayfs(&mut boot, &sel.live_dir));
    let probe = crate::disk::target::probe(path).map_err(StickError::from)?;
    let mut file =
        crate::disk::target::open_existing(&probe, writable).map_err(StickError::from)?;
    let Some(mut partition) =
        ext4_fs::find_live_partition(&mut file, &sel.live_dir).map_err(live)?
    else {
        return Ok(None);
    };
    let mut repaired = Vec::new();
    if writable && partition.fs.needs_recovery {
        // What the kernel would do on mounting it, before any change beside it.
        let (replayed, line) = ext4_fs::replay_partition(&mut file, &partition).map_err(|e| {
            OverlayError::Refused(format!(
                "the ext4 live partition {} of {} was not cleanly unmounted and livestick cannot replay its journal ({e}); to replay it, {} (or boot the stick and shut the live system down cleanly), then try again",
                partition.number,
                path.display(),
                crate::disk::ext4_live::replay_hint(path, partition.number)
            ))
        })?;
        partition = replayed;
        repaired.push(line);
    }
    let fs = partition.fs.clone();
    let mut window = crate::io::PartitionWindow::new(&mut file, partition.start, partition.len);
    let expected = crate::layout::overlay_path(&sel.live_dir, &fs.label, &fs.uuid);
    let dir = fs
        .lookup(&mut window, &format!("/{}", sel.live_dir))
        .map_err(live)?
        .ok_or_else(|| {
            OverlayError::BadInput(format!("{}: no /{}", path.display(), sel.live_dir))
        })?;
    let overlays: Vec<String> = fs
        .read_dir(&mut window, &dir)
        .map_err(live)?
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| crate::layout::is_overlay_name(name))
        .map(|name| format!("/{}/{name}", sel.live_dir))
        .collect();
    let overlay = match &sel.overlay_file {
        // Only an overlay by name, as on the FAT: never home.img or the root image.
        Some(name) => {
            let want = format!("/{}/{}", sel.live_dir, name.trim_start_matches('/'));
            overlays
                .iter()
                .find(|o| o.eq_ignore_ascii_case(&want) || o.eq_ignore_ascii_case(name))
                .cloned()
                .ok_or_else(|| {
                    OverlayError::Refused(format!(
                        "{} has no overlay {want} on its ext4 live partition; overlays present: {}",
                        path.display(),
                        if overlays.is_empty() {
                            "none".to_string()
                        } else {
                            overlays.join(", ")
                        }
                    ))
                })?
        }
        None if overlays.contains(&expected) => expected.clone(),
        None if overlays.len() == 1 => overlays[0].clone(),
        None => {
            return Err(OverlayError::Refused(format!(
                "{} has no overlay {expected} on its ext4 live partition{}",
                path.display(),
                if overlays.is_empty() {
                    "; it was written without --overlay-size-mb".to_string()
                } else {
                    format!(
                        " (it has {}: name one with --overlay-file)",
                        overlays.join(", ")
                    )
                }
            )));
        }
    };
    let map = fs
        .file(&mut window, &overlay)
        .map_err(live)?
        .ok_or_else(|| {
            OverlayError::Refused(format!(
                "{} has no {overlay} on its ext4 live partition",
                path.display()
            ))
        })?;
    drop(window);
    Ok(Some(Ext4LiveOverlay {
        device: path.to_path_buf(),
        partition,
        overlay,
        expected,
        map,
        live_dir: sel.live_dir.clone(),
        repaired,
        menus_boot_overlayfs: menus_overlayfs,
        file,
        writable,
    }))
}

/// A maintenance verb other than `status` on a stick with the ext4 live layout:
/// refused by name rather than "not a live stick".
fn refuse_ext4_live(path: &Path, live_dir: &str) -> Result<(), OverlayError> {
    let Ok(mut file) = crate::disk::target::open_path(path, false) else {
        return Ok(());
    };
    if let Ok(Some(p)) = crate::disk::ext4_fs::find_live_partition(&mut file, live_dir) {
        return Err(OverlayError::Refused(format!(
            "{} keeps its live system on ext4 partition {} (the layout for persistence over 4 GiB), not on its FAT: name the stick itself to `livestick overlay` (status, merge, reset, grow, recover), which finds the overlay there",
            path.display(),
            p.number
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bare_of(dir: &Path, name: &str, bytes: &[u8]) -> Bare {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        Bare::open(&path, false).unwrap()
    }

    fn refusal(bare: &mut Bare) -> String {
        match bare.refuse_not_an_overlay() {
            Ok(()) => panic!("{} was taken for an overlay", bare.show()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn only_an_overlay_by_content_or_by_name_is_taken_for_one() {
        let dir = tempfile::tempdir().unwrap();
        // A new store (zeros) and an initialised one, under any name.
        let mut zeros = bare_of(dir.path(), "copy.img", &vec![0u8; 1 << 20]);
        zeros.refuse_not_an_overlay().unwrap();
        let mut header = vec![0u8; 1 << 20];
        header[..4].copy_from_slice(&snapshot::SNAP_MAGIC.to_le_bytes());
        bare_of(dir.path(), "snap.img", &header)
            .refuse_not_an_overlay()
            .unwrap();
        // Zeros at the start but another format further in.
        let mut iso = vec![0u8; 1 << 20];
        iso[0x8001..0x8006].copy_from_slice(b"CD001");
        assert!(refusal(&mut bare_of(dir.path(), "t.iso", &iso)).contains("ISO 9660"));
        let mut swap = vec![0u8; 1 << 20];
        swap[4086..4096].copy_from_slice(b"SWAPSPACE2");
        assert!(refusal(&mut bare_of(dir.path(), "swap.img", &swap)).contains("swap"));
        let text = b"hello, these are notes, not an overlay\n".repeat(8);
        assert!(refusal(&mut bare_of(dir.path(), "notes.txt", &text)).contains("neither"));
        // A damaged overlay is still one by its name, so that it can be reset.
        bare_of(dir.path(), "overlay-LIVE-1234-5678", &text)
            .refuse_not_an_overlay()
            .unwrap();
    }

    #[test]
    fn an_ext4_is_an_overlay_only_with_its_upper_dir() {
        if crate::tools::find_program(&crate::tools::MKE2FS).is_err() {
            assert!(std::env::var_os("CI").is_none(), "CI has e2fsprogs");
            eprintln!("SKIPPED: no mke2fs");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home.img");
        crate::disk::ext4::make_ext4_image(
            &home,
            8 << 20,
            "home",
            &crate::disk::ext4::Ext4Options::default(),
        )
        .unwrap();
        let mut bare = Bare::open(&home, false).unwrap();
        assert!(refusal(&mut bare).contains("without /overlayfs"));
        let fresh = store::build_fresh_overlay(dir.path(), 8 << 20, None).unwrap();
        Bare::open(&fresh, false)
            .unwrap()
            .refuse_not_an_overlay()
            .unwrap();
    }
}
