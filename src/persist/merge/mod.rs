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
//!
//! The parts, each importing only those below it:
//! - [`inspect`] reads everything a plan needs into [`facts::MergeFacts`] (the stick's
//!   FAT, the image's superblock and listing, the overlay, erofs-utils' abilities, tool
//!   probes, free space); [`plan::plan`] turns those facts into a [`MergePlan`] or a
//!   refusal without any I/O;
//! - [`dm`]: the dm-snapshot steps (exceptions applied to the extracted root image);
//!   [`fold`]: chunks e2fsck changed, written into the overlay;
//! - [`overlayfs`]: the OverlayFS steps (debugfs reader, upper tree, apply targets,
//!   the flat tar stream, fakeroot);
//! - [`replace`]: stage, verify, fold, swap and reset, shared by both;
//! - [`located`] and [`error`]: where the files are, free space, the error type.

use std::fs;
use std::path::PathBuf;

pub mod dm;
pub mod error;
pub mod ext4_replace;
pub mod facts;
pub mod fold;
pub mod inspect;
pub mod located;
pub mod overlayfs;
pub mod plan;
pub mod replace;

// The API of a merge is this module's requests and functions; these are the types
// their signatures name (and the steps a failpoint can name), so that a caller
// needs no child module. Everything else is reached at its home (`merge::dm`, …).
pub use error::MergeError;
pub use plan::{MergePlan, STEPS};
pub use replace::MergeReport;

use crate::squash::Compressor;
use plan::MergeOptions;

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

/// A merge on a stick whose live directory is on its ext4 partition (the layout
/// for persistence over 4 GiB).
#[derive(Debug, Clone)]
pub struct Ext4MergeRequest {
    pub stick: PathBuf,
    pub live_dir: String,
    /// Path of the overlay inside the ext4 file system (`/LiveOS/overlay-LABEL-UUID`).
    pub overlay: String,
    pub workdir: PathBuf,
    pub fsck: bool,
    pub compress: Option<Compressor>,
}

/// Plans a merge on the ext4 live layout: squashfs.img and the overlay are read in
/// place through their ext4 extents (the overlay's written ones copied to the work
/// dir); nothing on the stick is changed.
pub fn plan_ext4_merge(req: &Ext4MergeRequest) -> Result<MergePlan, MergeError> {
    let facts = inspect::inspect_ext4(&inspect::Ext4ToInspect {
        stick: &req.stick,
        live_dir: &req.live_dir,
        overlay: &req.overlay,
        workdir: &req.workdir,
        fsck: req.fsck,
    })?;
    plan::plan(
        &facts,
        &MergeOptions {
            fsck: req.fsck,
            compress: req.compress,
        },
    )
}

impl MergeRequest {
    fn options(&self) -> MergeOptions {
        MergeOptions {
            fsck: self.fsck,
            compress: self.compress,
        }
    }
}

impl StickMergeRequest {
    fn options(&self) -> MergeOptions {
        MergeOptions {
            fsck: self.fsck,
            compress: self.compress,
        }
    }
}

/// Plans a merge of `overlay` into `squashfs` (a bare pair of files, or the files on a
/// mounted or extracted stick). Checks the overlay, the image kind, the tools and the
/// free space; changes nothing.
pub fn plan_merge(req: &MergeRequest) -> Result<MergePlan, MergeError> {
    let facts = inspect::inspect_files(&inspect::FilesToInspect {
        squashfs: &req.squashfs,
        overlay: &req.overlay,
        workdir: &req.workdir,
        fsck: req.fsck,
    })?;
    plan::plan(&facts, &req.options())
}

/// Plans a merge on a stick. The squashfs image and the overlay are read in place
/// through their FAT extents; nothing is changed.
pub fn plan_stick_merge(req: &StickMergeRequest) -> Result<MergePlan, MergeError> {
    let facts = inspect::inspect_stick(&inspect::StickToInspect {
        stick: &req.stick,
        live_dir: &req.live_dir,
        overlay: &req.overlay,
        workdir: &req.workdir,
        fsck: req.fsck,
    })?;
    plan::plan(&facts, &req.options())
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
        Some(ovl) => overlayfs::steps::run_steps(plan, ovl, &work, progress),
        None => dm::run_steps(plan, &work, progress),
    };
    // The work directory holds only copies; it goes whatever happened.
    let _ = fs::remove_dir_all(&work);
    result
}
