//! Merging a LiveOS overlay into a new `squashfs.img` ("image recompression and overlay
//! refreshment"), in user space and crash-safe, on a pair of plain files or on a stick
//! (block device or image file) whose FAT filesystem is never mounted.
//!
//! The plan is pure data ([`MergePlan`]); [`execute_merge`] runs it in steps:
//! `extract → apply → fsck → build → stage → verify → fold → swap → reset`. The old
//! `squashfs.img` is replaced only after the new one is written, synced and read back;
//! the overlay is reset only after that. So at every instant the stick holds the old
//! image with the old overlay, or the new image with the old overlay (whose chunks equal
//! the merged data: see `fold`), or the new image with an empty overlay.
//!
//! `fold`: e2fsck changes blocks of the merged image (at least the superblock's check
//! time). Where such a block is also in the overlay, "new image + old overlay" would show
//! the pre-fsck block on top of the post-fsck file system. So before the swap, every
//! chunk e2fsck changed is written into the overlay through the copy-on-write writer:
//! the old image + overlay then shows exactly the new image, as does the new image +
//! overlay. `recover --repair` uses the same mechanism to fold `e2fsck -y`'s repairs in.
//!
//! `LIVESTICK_FAILPOINT=<step>` stops a run right after that step, for the crash tests.

use crate::io::read_full;
use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::hash::Hasher;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::disk::extent_file::ExtentFile;
use crate::disk::fat;
use crate::disk::fat_raw::{self, SwapError, SwapReport};
use crate::disk::stick::{Stick, StickError};
use crate::persist::ovl_merge::{self, ApplyReport, OvlError, OvlPlan};
use crate::persist::snapshot::{
    self, CowWriter, LIVEOS_CHUNK_SECTORS, Opened, SnapshotError, StatusReport,
};
use crate::source::checksum::{HashingReader, hex};
use crate::squash::{self, Compressor, ImageKind, SquashError, SquashInfo};
use crate::tools::{self, find_program};

/// Root images a dm-snapshot overlay can sit on, in the order dracut looks for them.
pub use crate::layout::ROOT_IMAGES;
/// The steps of a merge, in order; also the names `LIVESTICK_FAILPOINT` accepts.
pub const STEPS: [&str; 9] = [
    "extract", "apply", "fsck", "build", "stage", "verify", "fold", "swap", "reset",
];

#[derive(Debug, Error)]
pub enum MergeError {
    #[error(transparent)]
    ToolMissing(#[from] tools::ToolMissing),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Squash(#[from] SquashError),
    #[error(transparent)]
    Stick(#[from] StickError),
    #[error(transparent)]
    Ovl(#[from] OvlError),
    #[error("replacing squashfs.img on the stick: {0}")]
    Swap(#[from] SwapError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "not enough space for {what} in {path}: {needed} bytes needed ({needed_mib} MiB), {free} bytes free ({free_mib} MiB)"
    )]
    NoSpace {
        what: &'static str,
        path: PathBuf,
        needed: u64,
        needed_mib: u64,
        free: u64,
        free_mib: u64,
    },
    #[error(
        "{squashfs} holds no LiveOS/rootfs.img or LiveOS/ext3fs.img: a dm-snapshot overlay needs a nested root image (this image looks like {what})"
    )]
    NoRootImage { squashfs: PathBuf, what: String },
    #[error(
        "{0} is an EROFS image (Fedora 42+ kiwi spins): its root is flat, so it takes OverlayFS persistence (`livestick write --overlayfs`), not a dm-snapshot overlay like this one"
    )]
    Erofs(PathBuf),
    #[error(
        "the overlay is marked Invalid; run `livestick overlay recover` first (the kernel refuses to merge it too)"
    )]
    OverlayInvalid,
    #[error("the overlay does not fit the root image: {0}")]
    OverlayCorrupt(SnapshotError),
    #[error(
        "e2fsck found errors it could not fix in the merged image (exit code {code}); the stick was not changed. Output:\n{output}"
    )]
    FsckFailed { code: i32, output: String },
    #[error(
        "read-back of {path} does not match what was written (sha256 {got}, expected {want}); the old image is still in place"
    )]
    VerifyMismatch {
        path: PathBuf,
        got: String,
        want: String,
    },
    #[error(
        "e2fsck changed {changed} chunks, {new_chunks} of them not yet in the overlay, which has room for {free} more; grow it (`livestick overlay grow --add-mb N`) and run again. Nothing was replaced"
    )]
    FoldNoRoom {
        changed: u64,
        new_chunks: u64,
        free: u64,
    },
    #[error("stopped at failpoint after step `{0}` (LIVESTICK_FAILPOINT)")]
    Failpoint(&'static str),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> MergeError + '_ {
    move |source| MergeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A merge of a bare pair of files: `squashfs.img` and its overlay.
#[derive(Debug, Clone)]
pub struct MergeRequest {
    pub squashfs: PathBuf,
    pub overlay: PathBuf,
    pub workdir: PathBuf,
    pub fsck: bool,
    pub compress: Option<Compressor>,
}

/// A merge on a stick: its `squashfs.img` and `overlay-LABEL-UUID`, found by the caller.
#[derive(Debug, Clone)]
pub struct StickMergeRequest {
    pub stick: PathBuf,
    pub live_dir: String,
    /// Path of the overlay on the FAT filesystem (`/LiveOS/overlay-LABEL-UUID`).
    pub overlay: String,
    pub workdir: PathBuf,
    pub fsck: bool,
    pub compress: Option<Compressor>,
}

/// Where on a stick the files of a merge are.
#[derive(Debug, Clone, Serialize)]
pub struct StickPlace {
    pub stick: PathBuf,
    pub partition_start: u64,
    /// `/LiveOS/squashfs.img`
    pub squashfs: String,
    /// `/LiveOS/overlay-LABEL-UUID`
    pub overlay: String,
    pub cluster_bytes: u64,
}

/// Bytes of a file reached through a device (or a plain file) and extents in it.
#[derive(Debug, Clone, Serialize)]
pub struct Located {
    pub device: PathBuf,
    pub extents: Vec<(u64, u64)>,
}

impl Located {
    pub(crate) fn plain(path: &Path) -> Result<Located, MergeError> {
        let len = fs::metadata(path).map_err(io_at(path))?.len();
        Ok(Located {
            device: path.to_path_buf(),
            extents: vec![(0, len)],
        })
    }

    /// Opens it for reading (and writing).
    pub fn open(&self, write: bool) -> Result<ExtentFile<File>, MergeError> {
        let f = OpenOptions::new()
            .read(true)
            .write(write)
            .open(&self.device)
            .map_err(io_at(&self.device))?;
        Ok(ExtentFile::new(f, &self.extents))
    }

    pub fn len(&self) -> u64 {
        self.extents.iter().map(|e| e.1).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The offset at which an external tool can read it, when it is one run of bytes.
    pub fn contiguous_at(&self) -> Option<u64> {
        match self.extents.as_slice() {
            [(o, _)] => Some(*o),
            _ => None,
        }
    }

    /// A path to it as a file of its own, for tools that take no offset (sqfs2tar,
    /// fsck.erofs): the file itself when it is one, else a copy named `name` in `dir`.
    /// `true` with the path: it is that copy, the caller's to remove.
    pub(crate) fn whole_file_or_copy(
        &self,
        dir: &Path,
        name: &str,
    ) -> Result<(PathBuf, bool), MergeError> {
        let whole_file = self.contiguous_at() == Some(0)
            && fs::metadata(&self.device).is_ok_and(|m| m.is_file() && m.len() == self.len());
        if whole_file {
            return Ok((self.device.clone(), false));
        }
        let copy = dir.join(name);
        let mut src = self.open(false)?;
        let mut dst = File::create(&copy).map_err(io_at(&copy))?;
        io::copy(&mut src, &mut dst).map_err(io_at(&copy))?;
        Ok((copy, true))
    }
}

/// Everything a merge will do, computed without changing anything.
#[derive(Debug, Clone, Serialize)]
pub struct MergePlan {
    /// What to call the image in messages (a path, or `STICK:/LiveOS/squashfs.img`).
    pub squashfs: PathBuf,
    pub squashfs_at: Located,
    pub squashfs_bytes: u64,
    /// The squashfs superblock (`None` for an EROFS image).
    pub squash: Option<SquashInfo>,
    /// `LiveOS/rootfs.img`, or `/` when the image is the root tree itself.
    pub root_image: String,
    pub root_image_bytes: u64,
    pub overlay: PathBuf,
    pub overlay_at: Located,
    pub overlay_status: StatusReport,
    pub exceptions: u64,
    /// Set for a merge on a stick; `None` for a pair of plain files.
    pub stick: Option<StickPlace>,
    pub workdir: PathBuf,
    pub workdir_needed_bytes: u64,
    pub workdir_free_bytes: u64,
    pub target_dir: PathBuf,
    pub target_needed_bytes: u64,
    pub target_free_bytes: u64,
    pub mksquashfs_args: Vec<String>,
    pub fsck: bool,
    pub nothing_to_merge: bool,
    pub notes: Vec<String>,
    pub steps: Vec<String>,
    /// Stop with an error right after this step (crash tests); from `LIVESTICK_FAILPOINT`.
    #[serde(skip)]
    pub failpoint: Option<String>,
    /// Set when the overlay is an OverlayFS one (ext4 with overlayfs/ + ovlwork/).
    pub ovl: Option<OvlPlan>,
    /// EROFS: go on even though fsck.erofs cannot extract xattrs (`--allow-xattr-loss`).
    pub allow_xattr_loss: bool,
}

/// Free bytes for an unprivileged user on the file system holding `path`.
pub fn free_bytes(path: &Path) -> Result<u64, MergeError> {
    let st = nix::sys::statvfs::statvfs(path).map_err(|e| MergeError::Io {
        path: path.to_path_buf(),
        source: io::Error::from(e),
    })?;
    Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

fn same_fs(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    matches!((fs::metadata(a), fs::metadata(b)), (Ok(x), Ok(y)) if x.dev() == y.dev())
}

/// Room for a merge: `workdir_needed` in the work dir and `target_needed` beside the
/// old image. When both are one file system (a pair of plain files, not a stick), the
/// sum must fit there.
pub(crate) fn check_merge_space(
    inp: &Inputs,
    [what, what_with_staged]: [&'static str; 2],
    workdir: &Path,
    workdir_needed: u64,
    workdir_free: u64,
    target_needed: u64,
) -> Result<(), MergeError> {
    if inp.stick.is_none() && same_fs(workdir, &inp.target_dir) {
        return check_space(
            what_with_staged,
            workdir,
            workdir_needed.saturating_add(target_needed),
            workdir_free,
        );
    }
    check_space(what, workdir, workdir_needed, workdir_free)?;
    check_space(
        "the new image next to the old one",
        &inp.target_dir,
        target_needed,
        inp.target_free,
    )
}

pub(crate) fn check_space(
    what: &'static str,
    path: &Path,
    needed: u64,
    free: u64,
) -> Result<(), MergeError> {
    if needed > free {
        return Err(MergeError::NoSpace {
            what,
            path: path.to_path_buf(),
            needed,
            needed_mib: needed.div_ceil(1 << 20),
            free,
            free_mib: free / (1 << 20),
        });
    }
    Ok(())
}

/// Runs `f` on a path + offset where unsquashfs can read the image: in place when it is
/// contiguous, else on a temporary copy in `workdir` (a fragmented squashfs.img on a
/// stick that has seen many edits).
pub(crate) fn with_readable_squashfs<T>(
    at: &Located,
    workdir: &Path,
    f: impl FnOnce(&Path, u64) -> Result<T, MergeError>,
) -> Result<T, MergeError> {
    if let Some(off) = at.contiguous_at() {
        return f(&at.device, off);
    }
    check_space(
        "a copy of the fragmented squashfs.img",
        workdir,
        at.len(),
        free_bytes(workdir)?,
    )?;
    let copy = workdir.join(format!("livestick-squashfs-{}.img", std::process::id()));
    let result = (|| {
        let mut src = at.open(false)?;
        let mut dst = File::create(&copy).map_err(io_at(&copy))?;
        io::copy(&mut src, &mut dst).map_err(io_at(&copy))?;
        f(&copy, 0)
    })();
    let _ = fs::remove_file(&copy);
    result
}

/// What planning needs to know about where the files are.
pub(crate) struct Inputs {
    pub(crate) squashfs: PathBuf,
    pub(crate) squashfs_at: Located,
    pub(crate) overlay: PathBuf,
    pub(crate) overlay_at: Located,
    pub(crate) stick: Option<StickPlace>,
    pub(crate) target_dir: PathBuf,
    pub(crate) target_free: u64,
}

/// Plans a merge of `overlay` into `squashfs` (a bare pair of files, or the files on a
/// mounted or extracted stick). Checks the overlay, the image kind, the tools and the
/// free space; changes nothing.
pub fn plan_merge(req: &MergeRequest) -> Result<MergePlan, MergeError> {
    let target_dir = req
        .squashfs
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    if req.overlay.is_dir() {
        // A directory overlay (ext4 stick): planned on an ext4 copy of it.
        let scratch = tempfile::Builder::new()
            .prefix("livestick-ovldir-")
            .tempdir_in(&req.workdir)
            .map_err(io_at(&req.workdir))?;
        let img = scratch.path().join("overlay.img");
        ovl_merge::image_from_dir(&req.overlay, &img)?;
        let inputs = Inputs {
            squashfs: req.squashfs.clone(),
            squashfs_at: Located::plain(&req.squashfs)?,
            overlay: req.overlay.clone(),
            overlay_at: Located::plain(&img)?,
            stick: None,
            target_free: free_bytes(&target_dir)?,
            target_dir,
        };
        let mut plan = plan_common(inputs, &req.workdir, req.fsck, req.compress)?;
        ovl_merge::for_dir_overlay(&mut plan, &req.overlay);
        return Ok(plan);
    }
    let inputs = Inputs {
        squashfs: req.squashfs.clone(),
        squashfs_at: Located::plain(&req.squashfs)?,
        overlay: req.overlay.clone(),
        overlay_at: Located::plain(&req.overlay)?,
        stick: None,
        target_free: free_bytes(&target_dir)?,
        target_dir,
    };
    plan_common(inputs, &req.workdir, req.fsck, req.compress)
}

/// Plans a merge on a stick. The squashfs image and the overlay are read in place
/// through their FAT extents; nothing is changed.
pub fn plan_stick_merge(req: &StickMergeRequest) -> Result<MergePlan, MergeError> {
    let mut stick = Stick::open(&req.stick, false)?;
    let info = stick.info(&req.live_dir)?;
    let squashfs = format!("/{}/squashfs.img", req.live_dir);
    if info.squashfs.is_none() {
        return Err(StickError::NotLive {
            path: req.stick.clone(),
            live_dir: req.live_dir.clone(),
        }
        .into());
    }
    let sq_extents = stick_extents(&mut stick, &squashfs)?;
    let ov_extents = stick_extents(&mut stick, &req.overlay)?;
    let cluster_bytes = stick.with_fs(|fs| Ok(u64::from(fs.cluster_size())))?;
    let show = |p: &str| PathBuf::from(format!("{}:{p}", req.stick.display()));
    let inputs = Inputs {
        squashfs: show(&squashfs),
        squashfs_at: Located {
            device: req.stick.clone(),
            extents: sq_extents,
        },
        overlay: show(&req.overlay),
        overlay_at: Located {
            device: req.stick.clone(),
            extents: ov_extents,
        },
        stick: Some(StickPlace {
            stick: req.stick.clone(),
            partition_start: stick.partition.start,
            squashfs,
            overlay: req.overlay.clone(),
            cluster_bytes,
        }),
        target_dir: show(&format!("/{}", req.live_dir)),
        target_free: info.free_bytes,
    };
    plan_common(inputs, &req.workdir, req.fsck, req.compress)
}

fn plan_common(
    inp: Inputs,
    workdir: &Path,
    fsck: bool,
    compress: Option<Compressor>,
) -> Result<MergePlan, MergeError> {
    // An OverlayFS overlay is an ext4 file system: merged file by file, not by chunks.
    if crate::persist::overlay::store::is_ext4(&mut inp.overlay_at.open(false)?) {
        return ovl_merge::plan(inp, workdir, fsck, compress);
    }
    let squashfs_bytes = inp.squashfs_at.len();
    let what = inp.squashfs.display().to_string();
    let info = match squash::detect_image_kind(&mut inp.squashfs_at.open(false)?, &what)? {
        ImageKind::Squashfs(info) => info,
        ImageKind::Erofs => return Err(MergeError::Erofs(inp.squashfs.clone())),
        other => {
            return Err(MergeError::NoRootImage {
                squashfs: inp.squashfs.clone(),
                what: format!("{other:?}"),
            });
        }
    };
    find_program(&tools::UNSQUASHFS)?;
    find_program(&tools::MKSQUASHFS)?;
    if fsck {
        find_program(&tools::E2FSCK)?;
    }
    let listing = with_readable_squashfs(&inp.squashfs_at, workdir, |p, off| {
        Ok(squash::list_at(p, off)?)
    })?;
    let root = ROOT_IMAGES
        .iter()
        .find_map(|name| listing.iter().find(|e| e.is_file && e.path == *name))
        .ok_or_else(|| MergeError::NoRootImage {
            squashfs: inp.squashfs.clone(),
            what: if listing
                .iter()
                .any(|e| e.path == "usr" || e.path.starts_with("usr/"))
            {
                "a flat root file system (OverlayFS persistence)".to_string()
            } else {
                format!("{} entries, none of them a root image", listing.len())
            },
        })?;
    let extracted_bytes: u64 = listing.iter().filter(|e| e.is_file).map(|e| e.size).sum();

    let mut ov = inp.overlay_at.open(false)?;
    let ov_len = ov.len();
    let opened = snapshot::open_store(&mut ov, ov_len)?;
    let origin_sectors = root.size / snapshot::SECTOR_BYTES;
    let overlay_status =
        snapshot::status_of(&opened, ov_len, LIVEOS_CHUNK_SECTORS, Some(origin_sectors));
    let (exceptions, used_bytes) = match &opened {
        Opened::Uninitialised { .. } => (0, 0),
        Opened::Invalid { .. } => return Err(MergeError::OverlayInvalid),
        Opened::Valid(store) => {
            store
                .validate(Some(origin_sectors))
                .map_err(MergeError::OverlayCorrupt)?;
            let n = store.exceptions.len() as u64;
            (n, n * store.geometry.chunk_bytes())
        }
    };

    let mut args = info.mksquashfs_args();
    let mut notes = Vec::new();
    if let Some(c) = compress
        && c != info.compressor
    {
        // Options stored for the old compressor do not apply to another one.
        args = vec![
            "-comp".into(),
            c.name().into(),
            "-b".into(),
            info.block_size.to_string(),
        ];
        notes.push(format!(
            "recompressing with {} instead of {}",
            c.name(),
            info.compressor.name()
        ));
    }
    if info.has_xattrs && !nix::unistd::geteuid().is_root() {
        notes.push(
            "the squashfs carries xattrs at its top level; without root, unsquashfs cannot restore security.* ones (the root image's own SELinux labels are kept: they live inside it)"
                .to_string(),
        );
    }
    if inp.squashfs_at.contiguous_at().is_none() {
        notes.push(
            "squashfs.img is fragmented on the stick: it is copied to the work dir to be read"
                .to_string(),
        );
    }
    // The new image is at most the old one plus the changed data, uncompressed.
    let new_image_estimate = squashfs_bytes.saturating_add(used_bytes);
    let fragmented_copy = if inp.squashfs_at.contiguous_at().is_none() {
        squashfs_bytes
    } else {
        0
    };
    let workdir_needed = extracted_bytes
        .saturating_add(new_image_estimate)
        .saturating_add(fragmented_copy);
    let workdir_free = free_bytes(workdir)?;
    let nothing_to_merge = exceptions == 0;
    let on_stick = inp.stick.is_some();
    // On a stick the staged image sits next to the old one until the swap. Its exact
    // size is checked again before it is written; here the old size is the estimate
    // (recompressed images rarely grow by much).
    let target_needed = if on_stick {
        squashfs_bytes
    } else {
        new_image_estimate
    };
    if !nothing_to_merge {
        check_merge_space(
            &inp,
            [
                "the extracted image and the new squashfs",
                "the extracted image, the new squashfs and its staged copy",
            ],
            workdir,
            workdir_needed,
            workdir_free,
            target_needed,
        )?;
    }
    let staged = match &inp.stick {
        Some(s) => format!("{}.new", s.squashfs),
        None => staged_path(&inp.squashfs).display().to_string(),
    };
    let steps = vec![
        format!(
            "extract {} ({} bytes) from {} into {}",
            root.path,
            root.size,
            inp.squashfs.display(),
            workdir.display()
        ),
        format!("apply {exceptions} overlay chunks to it"),
        if fsck {
            "e2fsck -f -p the merged image".to_string()
        } else {
            "skip e2fsck (--no-fsck)".to_string()
        },
        format!("mksquashfs {}", args.join(" ")),
        format!("write {staged}, sync"),
        "read it back and compare sha256".to_string(),
        "write the chunks e2fsck changed into the overlay too (old image + overlay = new image)"
            .to_string(),
        if on_stick {
            format!(
                "swap the directory entries of {staged} and squashfs.img (one sector write), remove the old image"
            )
        } else {
            format!("rename it over {}", inp.squashfs.display())
        },
        format!("reset the overlay {}", inp.overlay.display()),
    ];
    Ok(MergePlan {
        squashfs: inp.squashfs,
        squashfs_at: inp.squashfs_at,
        squashfs_bytes,
        squash: Some(info),
        root_image: root.path.clone(),
        root_image_bytes: root.size,
        overlay: inp.overlay,
        overlay_at: inp.overlay_at,
        overlay_status,
        exceptions,
        stick: inp.stick,
        workdir: workdir.to_path_buf(),
        workdir_needed_bytes: workdir_needed,
        workdir_free_bytes: workdir_free,
        target_dir: inp.target_dir,
        target_needed_bytes: target_needed,
        target_free_bytes: inp.target_free,
        mksquashfs_args: args,
        fsck,
        nothing_to_merge,
        notes,
        steps,
        failpoint: std::env::var("LIVESTICK_FAILPOINT").ok(),
        ovl: None,
        allow_xattr_loss: false,
    })
}

/// What a finished merge did.
#[derive(Debug, Clone, Serialize)]
pub struct MergeReport {
    pub exceptions_applied: u64,
    pub fsck_exit_code: Option<i32>,
    /// Chunks e2fsck changed, written into the overlay before the swap.
    pub fsck_chunks_folded: u64,
    pub old_squashfs_bytes: u64,
    pub new_squashfs_bytes: u64,
    pub new_squashfs_sha256: String,
    /// On a stick: whether the directory entries were swapped in one sector write.
    pub swap: Option<SwapReport>,
    pub overlay_reset: bool,
    /// For an OverlayFS overlay: what applying the upper dir did.
    pub overlayfs: Option<ApplyReport>,
}

pub(crate) fn failpoint(plan: &MergePlan, step: &'static str) -> Result<(), MergeError> {
    if plan.failpoint.as_deref() == Some(step) {
        return Err(MergeError::Failpoint(step));
    }
    Ok(())
}

/// Copies `src` to a new file `dst`, hashing on the way, and syncs it.
fn copy_hashed(
    src: &Path,
    dst: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<String, MergeError> {
    let mut input = File::open(src).map_err(io_at(src))?;
    let total = input.metadata().map_err(io_at(src))?.len();
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dst)
        .map_err(io_at(dst))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut done = 0u64;
    loop {
        let n = input.read(&mut buf).map_err(io_at(src))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io_at(dst))?;
        done += n as u64;
        progress("stage", done, total);
    }
    out.sync_all().map_err(io_at(dst))?;
    Ok(hex(&hasher.finalize()))
}

/// sha256 of everything `r` yields.
fn sha256_reader(
    r: &mut dyn Read,
    what: &Path,
    total: u64,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<String, MergeError> {
    let mut hashing = HashingReader::new(r);
    crate::io::copy_with_progress(&mut hashing, &mut std::io::sink(), |done| {
        progress("verify", done, total)
    })
    .map_err(io_at(what))?;
    Ok(hex(&hashing.finish()))
}

pub fn sha256_file(
    path: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<String, MergeError> {
    let mut f = File::open(path).map_err(io_at(path))?;
    let total = f.metadata().map_err(io_at(path))?.len();
    sha256_reader(&mut f, path, total, progress)
}

/// A cheap fingerprint of every `chunk_bytes` chunk of an image: enough to tell which
/// chunks a tool (e2fsck) changed, without keeping a copy of the image.
pub fn chunk_fingerprints(path: &Path, chunk_bytes: u64) -> Result<Vec<u64>, MergeError> {
    let mut f = File::open(path).map_err(io_at(path))?;
    let chunk = chunk_bytes as usize;
    let mut buf = vec![0u8; (4 << 20) / chunk * chunk];
    let mut out = Vec::new();
    loop {
        let got = read_full(&mut f, &mut buf).map_err(io_at(path))?;
        if got == 0 {
            break;
        }
        for c in buf[..got].chunks(chunk) {
            let mut h = std::hash::DefaultHasher::new();
            h.write(c);
            out.push(h.finish());
        }
        if got < buf.len() {
            break;
        }
    }
    Ok(out)
}

/// The chunks whose fingerprint differs between `before` and the image now.
pub fn changed_chunks(
    path: &Path,
    chunk_bytes: u64,
    before: &[u64],
) -> Result<Vec<u64>, MergeError> {
    let after = chunk_fingerprints(path, chunk_bytes)?;
    Ok(after
        .iter()
        .enumerate()
        .filter(|(i, h)| before.get(*i) != Some(h))
        .map(|(i, _)| i as u64)
        .collect())
}

/// Writes chunks `changed` of `image` into the overlay as the live system would have:
/// existing exceptions are overwritten in place, others become new exceptions. Checks
/// first that there is room for all of them, so nothing is half done for lack of space.
/// Returns the number of chunks written.
pub fn fold_chunks<C>(
    cow: &mut C,
    cow_bytes: u64,
    image: &Path,
    changed: &[u64],
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64, MergeError>
where
    C: Read + Write + Seek + snapshot::SyncData,
{
    if changed.is_empty() {
        return Ok(0);
    }
    let store = match snapshot::open_store(cow, cow_bytes)? {
        Opened::Valid(s) => *s,
        Opened::Invalid { .. } => return Err(MergeError::OverlayInvalid),
        Opened::Uninitialised { .. } => {
            // A new store: initialise it as the kernel would, then add the chunks.
            snapshot::create_new_store(cow, cow_bytes, LIVEOS_CHUNK_SECTORS)?;
            match snapshot::open_store(cow, cow_bytes)? {
                Opened::Valid(s) => *s,
                _ => return Err(MergeError::OverlayInvalid),
            }
        }
    };
    let chunk_bytes = store.geometry.chunk_bytes();
    let have: HashSet<u64> = store.exceptions.iter().map(|e| e.old_chunk).collect();
    let new_chunks = changed.iter().filter(|c| !have.contains(c)).count() as u64;
    let free = store.free_data_chunks();
    if new_chunks > free {
        return Err(MergeError::FoldNoRoom {
            changed: changed.len() as u64,
            new_chunks,
            free,
        });
    }
    let mut img = File::open(image).map_err(io_at(image))?;
    let image_bytes = img.metadata().map_err(io_at(image))?.len();
    let mut writer = CowWriter::new(store, image_bytes)?;
    let view_bytes = image_bytes / snapshot::SECTOR_BYTES * snapshot::SECTOR_BYTES;
    let mut buf = vec![0u8; chunk_bytes as usize];
    for (i, &c) in changed.iter().enumerate() {
        let at = c * chunk_bytes;
        let n = chunk_bytes.min(view_bytes.saturating_sub(at)) as usize;
        if n == 0 {
            continue;
        }
        img.seek(SeekFrom::Start(at)).map_err(io_at(image))?;
        img.read_exact(&mut buf[..n]).map_err(io_at(image))?;
        writer.write_at(&mut img, cow, at, &buf[..n])?;
        progress(i as u64 + 1, changed.len() as u64);
    }
    Ok(changed.len() as u64)
}

/// Runs a plan. `progress(step, done, total)` reports each step's progress.
pub fn execute_merge(
    plan: &MergePlan,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<MergeReport, MergeError> {
    let work = plan
        .workdir
        .join(format!("livestick-merge-{}", std::process::id()));
    let result = match &plan.ovl {
        Some(ovl) => ovl_merge::run_steps(plan, ovl, &work, progress),
        None => run_steps(plan, &work, progress),
    };
    // The work directory holds only copies; it goes whatever happened.
    let _ = fs::remove_dir_all(&work);
    result
}

/// Runs `e2fsck -f <mode>` on an image: Ok(exit code) when it is clean or was fixed.
pub fn run_e2fsck(image: &Path, mode: &str) -> Result<i32, MergeError> {
    // 1 = errors corrected, 2 = corrected and "reboot" (meaningless for an image).
    match squash::run_tool(
        tools::E2FSCK,
        &["-f".as_ref(), mode.as_ref(), image.as_os_str()],
        &[1, 2],
    ) {
        Ok((code, _)) => Ok(code),
        Err(SquashError::ToolFailed { status, stderr, .. }) => {
            let code = status
                .rsplit(' ')
                .next()
                .and_then(|c| c.parse().ok())
                .unwrap_or(-1);
            Err(MergeError::FsckFailed {
                code,
                output: stderr,
            })
        }
        Err(e) => Err(e.into()),
    }
}

fn run_steps(
    plan: &MergePlan,
    work: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<MergeReport, MergeError> {
    fs::create_dir_all(work).map_err(io_at(work))?;
    let tree = work.join("tree");
    progress("extract", 0, plan.root_image_bytes);
    with_readable_squashfs(&plan.squashfs_at, work, |p, off| {
        Ok(squash::extract_at(p, off, &tree, &[])?)
    })?;
    progress("extract", plan.root_image_bytes, plan.root_image_bytes);
    failpoint(plan, "extract")?;

    let root = tree.join(&plan.root_image);
    let mut origin = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&root)
        .map_err(io_at(&root))?;
    let origin_bytes = origin.metadata().map_err(io_at(&root))?.len();
    let mut ov = plan.overlay_at.open(false)?;
    let ov_len = ov.len();
    let (applied, chunk_bytes) = match snapshot::open_store(&mut ov, ov_len)? {
        Opened::Valid(store) => (
            snapshot::apply_exceptions(&mut ov, &store, &mut origin, origin_bytes, &mut |d, t| {
                progress("apply", d, t)
            })?,
            store.geometry.chunk_bytes(),
        ),
        Opened::Uninitialised { .. } => (0, u64::from(LIVEOS_CHUNK_SECTORS) * 512),
        Opened::Invalid { .. } => return Err(MergeError::OverlayInvalid),
    };
    drop(origin);
    drop(ov);
    failpoint(plan, "apply")?;

    let mut fsck_code = None;
    let mut fsck_changed = Vec::new();
    if plan.fsck {
        let kind = squash::detect_image_kind(
            &mut File::open(&root).map_err(io_at(&root))?,
            &plan.root_image,
        )?;
        if kind == ImageKind::Ext {
            progress("fsck", 0, 1);
            let before = chunk_fingerprints(&root, chunk_bytes)?;
            fsck_code = Some(run_e2fsck(&root, "-p")?);
            fsck_changed = changed_chunks(&root, chunk_bytes, &before)?;
            progress("fsck", 1, 1);
        }
    }
    failpoint(plan, "fsck")?;

    let built = work.join("squashfs.img");
    progress("build", 0, 1);
    squash::build(&tree, &built, &plan.mksquashfs_args)?;
    progress("build", 1, 1);
    failpoint(plan, "build")?;

    let new_len = fs::metadata(&built).map_err(io_at(&built))?.len();
    let mut report = MergeReport {
        exceptions_applied: applied,
        fsck_exit_code: fsck_code,
        fsck_chunks_folded: 0,
        old_squashfs_bytes: plan.squashfs_bytes,
        new_squashfs_bytes: new_len,
        new_squashfs_sha256: String::new(),
        swap: None,
        overlay_reset: false,
        overlayfs: None,
    };
    replace(
        plan,
        &built,
        &root,
        &fsck_changed,
        None,
        &mut report,
        progress,
    )?;
    Ok(report)
}

/// Stage, verify, fold, swap and reset, on a pair of plain files or on a stick.
/// `fresh_overlay`: an OverlayFS overlay is reset by writing this empty file system
/// over it; a dm-snapshot one by a new store header.
pub(crate) fn replace(
    plan: &MergePlan,
    built: &Path,
    root: &Path,
    fsck_changed: &[u64],
    fresh_overlay: Option<&Path>,
    report: &mut MergeReport,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<(), MergeError> {
    match &plan.stick {
        Some(place) => stick_replace(
            plan,
            place,
            built,
            root,
            fsck_changed,
            fresh_overlay,
            report,
            progress,
        ),
        None => dir_replace(
            plan,
            built,
            root,
            fsck_changed,
            fresh_overlay,
            report,
            progress,
        ),
    }
}

/// Empties the overlay after the swap.
fn reset_after_swap<F>(ov: &mut F, len: u64, fresh_overlay: Option<&Path>) -> Result<(), MergeError>
where
    F: Read + Write + Seek + snapshot::SyncData,
{
    match fresh_overlay {
        Some(t) => Ok(crate::persist::overlay::store::write_fresh_overlay(
            ov, len, t,
        )?),
        None => Ok(snapshot::reset_store(ov, len)?),
    }
}

/// Stage, verify, fold, swap and reset for a pair of plain files.
fn dir_replace(
    plan: &MergePlan,
    built: &Path,
    root: &Path,
    fsck_changed: &[u64],
    fresh_overlay: Option<&Path>,
    report: &mut MergeReport,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<(), MergeError> {
    let staged = staged_path(&plan.squashfs);
    let want = copy_hashed(built, &staged, progress)?;
    failpoint(plan, "stage")?;

    let got = sha256_file(&staged, progress)?;
    if got != want {
        let _ = fs::remove_file(&staged);
        return Err(MergeError::VerifyMismatch {
            path: staged,
            got,
            want,
        });
    }
    failpoint(plan, "verify")?;

    let mut ov = plan.overlay_at.open(true)?;
    let ov_len = ov.len();
    report.fsck_chunks_folded = fold_chunks(&mut ov, ov_len, root, fsck_changed, &mut |d, t| {
        progress("fold", d, t)
    })?;
    failpoint(plan, "fold")?;

    fs::rename(&staged, &plan.squashfs).map_err(io_at(&plan.squashfs))?;
    File::open(&plan.target_dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(&plan.target_dir))?;
    failpoint(plan, "swap")?;

    reset_after_swap(&mut ov, ov_len, fresh_overlay)?;
    report.overlay_reset = true;
    report.new_squashfs_sha256 = want;
    failpoint(plan, "reset")?;
    Ok(())
}

/// Drops the page cache of the stick so a read-back comes from the medium, not from
/// the memory the write went through.
fn drop_cache(f: &File) {
    use std::os::fd::AsRawFd;
    let _ = nix::fcntl::posix_fadvise(
        f.as_raw_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
}

/// Stage, verify, fold, swap and reset on a stick's FAT filesystem.
#[allow(clippy::too_many_arguments)]
fn stick_replace(
    plan: &MergePlan,
    place: &StickPlace,
    built: &Path,
    root: &Path,
    fsck_changed: &[u64],
    fresh_overlay: Option<&Path>,
    report: &mut MergeReport,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<(), MergeError> {
    let staged = format!("{}.new", place.squashfs);
    let new_len = report.new_squashfs_bytes;
    if new_len > fat::FAT_MAX_FILE {
        return Err(MergeError::NoSpace {
            what: "the new squashfs.img (FAT32 files must stay below 4 GiB)",
            path: plan.squashfs.clone(),
            needed: new_len,
            needed_mib: new_len.div_ceil(1 << 20),
            free: fat::FAT_MAX_FILE,
            free_mib: fat::FAT_MAX_FILE >> 20,
        });
    }
    let mut stick = Stick::open(&place.stick, true)?;
    let mut input = File::open(built).map_err(io_at(built))?;
    let target_dir = plan.target_dir.clone();
    let mut done = 0u64;
    let staged_sum = stick.with_fs(|fs| {
        Ok((|| {
            // A stale staged image from a stopped run: it was never swapped in.
            fat::remove_all(fs, &staged).map_err(|e| StickError::Fat {
                path: place.stick.clone(),
                source: e,
            })?;
            let free = fat::free_bytes(fs).map_err(|e| StickError::Fat {
                path: place.stick.clone(),
                source: e,
            })?;
            let needed = new_len.div_ceil(place.cluster_bytes) * place.cluster_bytes;
            check_space(
                "the new squashfs.img next to the old one",
                &target_dir,
                needed,
                free,
            )?;
            let sum = fat::write_file(fs, &staged, &mut input, new_len, |n| {
                done += n;
                progress("stage", done, new_len);
            })
            .map_err(|e| StickError::Fat {
                path: place.stick.clone(),
                source: e,
            })?;
            Ok::<_, MergeError>(sum)
        })())
    })??;
    let want = hex(&staged_sum);
    failpoint(plan, "stage")?;

    drop_cache(stick.file_mut());
    let extents = stick_extents(&mut stick, &staged)?;
    let got = {
        let mut f = ExtentFile::new(&mut *stick.file_mut(), &extents);
        let len = f.len();
        sha256_reader(&mut f, &place.stick, len, progress)?
    };
    if got != want {
        let _ = stick.with_fs(|fs| {
            let _ = fat::remove_all(fs, &staged);
            Ok(())
        });
        return Err(MergeError::VerifyMismatch {
            path: PathBuf::from(format!("{}:{staged}", place.stick.display())),
            got,
            want,
        });
    }
    failpoint(plan, "verify")?;

    {
        let mut ov = ExtentFile::new(&mut *stick.file_mut(), &plan.overlay_at.extents);
        let ov_len = ov.len();
        report.fsck_chunks_folded =
            fold_chunks(&mut ov, ov_len, root, fsck_changed, &mut |d, t| {
                progress("fold", d, t)
            })?;
    }
    failpoint(plan, "fold")?;

    let part = place.partition_start;
    report.swap = Some(fat_raw::swap_contents(
        stick.file_mut(),
        part,
        &place.squashfs,
        &staged,
    )?);
    // The staged name now holds the old image; free its clusters.
    stick.with_fs(|fs| {
        fat::remove_all(fs, &staged).map_err(|e| StickError::Fat {
            path: place.stick.clone(),
            source: e,
        })
    })?;
    failpoint(plan, "swap")?;

    let mut ov = ExtentFile::new(&mut *stick.file_mut(), &plan.overlay_at.extents);
    let ov_len = ov.len();
    reset_after_swap(&mut ov, ov_len, fresh_overlay)?;
    report.overlay_reset = true;
    report.new_squashfs_sha256 = want;
    failpoint(plan, "reset")?;
    Ok(())
}

/// `squashfs.img` → `squashfs.img.new`, in the same directory (so the rename is atomic).
pub fn staged_path(squashfs: &Path) -> PathBuf {
    let mut name = squashfs
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".new");
    squashfs.with_file_name(name)
}

/// What [`repair_view`] did.
#[derive(Debug, Clone, Serialize)]
pub struct RepairReport {
    pub fsck_exit_code: i32,
    pub chunks_changed: u64,
    pub chunks_folded: u64,
    pub fsck_output: String,
}

/// `e2fsck -f -y` on the snapshot view (origin + overlay, built in `workdir`), then the
/// chunks it changed are written into the overlay as new or updated exceptions, so the
/// live system sees the repaired file system on its next boot. The origin is not changed.
pub fn repair_view<C>(
    origin: &Path,
    cow: &mut C,
    cow_bytes: u64,
    workdir: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<RepairReport, MergeError>
where
    C: Read + Write + Seek + snapshot::SyncData,
{
    find_program(&tools::E2FSCK)?;
    let origin_bytes = fs::metadata(origin).map_err(io_at(origin))?.len();
    check_space(
        "the file system seen through the overlay",
        workdir,
        origin_bytes,
        free_bytes(workdir)?,
    )?;
    let store = match snapshot::open_store(cow, cow_bytes)? {
        Opened::Valid(s) => s,
        Opened::Invalid { .. } => return Err(MergeError::OverlayInvalid),
        Opened::Uninitialised { .. } => {
            return Ok(RepairReport {
                fsck_exit_code: 0,
                chunks_changed: 0,
                chunks_folded: 0,
                fsck_output: "the overlay is empty: nothing to repair in it".into(),
            });
        }
    };
    let view = workdir.join(format!("livestick-view-{}.img", std::process::id()));
    let result = (|| {
        {
            let mut o = File::open(origin).map_err(io_at(origin))?;
            let mut w =
                io::BufWriter::with_capacity(4 << 20, File::create(&view).map_err(io_at(&view))?);
            snapshot::write_view(&mut o, origin_bytes, cow, &store, &mut w, &mut |d, t| {
                progress("view", d, t)
            })?;
            w.flush().map_err(io_at(&view))?;
        }
        let chunk_bytes = store.geometry.chunk_bytes();
        let before = chunk_fingerprints(&view, chunk_bytes)?;
        progress("fsck", 0, 1);
        // -y fixes everything it can; exit 4 (errors left) is reported, not fatal:
        // what it did fix is still worth keeping.
        let (code, output) = match squash::run_tool(
            tools::E2FSCK,
            &["-f".as_ref(), "-y".as_ref(), view.as_os_str()],
            &[1, 2, 4],
        ) {
            Ok(r) => r,
            Err(SquashError::ToolFailed { status, stderr, .. }) => {
                return Err(MergeError::FsckFailed {
                    code: status
                        .rsplit(' ')
                        .next()
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(-1),
                    output: stderr,
                });
            }
            Err(e) => return Err(e.into()),
        };
        progress("fsck", 1, 1);
        let changed = changed_chunks(&view, chunk_bytes, &before)?;
        let folded = fold_chunks(cow, cow_bytes, &view, &changed, &mut |d, t| {
            progress("fold", d, t)
        })?;
        Ok(RepairReport {
            fsck_exit_code: code,
            chunks_changed: changed.len() as u64,
            chunks_folded: folded,
            fsck_output: output,
        })
    })();
    let _ = fs::remove_file(&view);
    result
}

/// Extracts the root image (`LiveOS/rootfs.img` or `ext3fs.img`) out of a squashfs image
/// read in place, into `dest_dir`; returns its path.
pub fn extract_root_image(
    squashfs_at: &Located,
    what: &Path,
    dest_dir: &Path,
) -> Result<PathBuf, MergeError> {
    let tree = dest_dir.join("root");
    with_readable_squashfs(squashfs_at, dest_dir, |p, off| {
        let listing = squash::list_at(p, off)?;
        let root = ROOT_IMAGES
            .iter()
            .find(|name| listing.iter().any(|e| e.is_file && e.path == **name))
            .ok_or_else(|| MergeError::NoRootImage {
                squashfs: what.to_path_buf(),
                what: format!("{} entries, none of them a root image", listing.len()),
            })?;
        let size = listing
            .iter()
            .find(|e| e.path == *root)
            .map_or(0, |e| e.size);
        check_space("the root image", dest_dir, size, free_bytes(dest_dir)?)?;
        squash::extract_at(p, off, &tree, &[root])?;
        Ok(tree.join(root))
    })
}

/// The extents of a file on a stick, in device offsets: FAT32 and FAT16 alike
/// (`Stick::file_extents` reads FAT32 only; it stays the fallback).
pub fn stick_extents(stick: &mut Stick, path: &str) -> Result<Vec<(u64, u64)>, MergeError> {
    Ok(stick.file_extents(path)?)
}

impl Located {
    /// A file on a stick, by its FAT extents.
    pub fn on_stick(stick: &mut Stick, path: &str) -> Result<Located, MergeError> {
        Ok(Located {
            device: stick.path.clone(),
            extents: stick_extents(stick, path)?,
        })
    }

    /// A plain file.
    pub fn file(path: &Path) -> Result<Located, MergeError> {
        Located::plain(path)
    }
}
