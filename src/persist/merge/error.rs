//! The error of a merge: a leaf the merge modules import.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

use crate::disk::fat_raw::SwapError;
use crate::disk::stick::StickError;
use crate::persist::merge::overlayfs::error::OvlError;
use crate::persist::snapshot::SnapshotError;
use crate::squash::SquashError;
use crate::tools;

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
    #[error(
        "planning the merge needs {0}, which was not inspected (facts not made by merge::inspect)"
    )]
    Unread(&'static str),
    /// On the ext4 live partition: what went wrong there (a map that cannot be
    /// read, debugfs failing, a refusal), with the device.
    #[error("{device}: {what}")]
    Ext4 { device: PathBuf, what: String },
    #[error("stopped at failpoint after step `{0}` (LIVESTICK_FAILPOINT)")]
    Failpoint(&'static str),
    /// A failed write of the staged image surfaces at a sync, as an error of the
    /// whole device: this names the step, so the user knows the old image stands.
    #[error(
        "stage: writing the new squashfs.img as {staged} failed; the old image is still in place: {source}"
    )]
    Stage {
        staged: String,
        #[source]
        source: StickError,
    },
}

impl crate::error::Classify for MergeError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            MergeError::Stick(e) => e.kind(),
            MergeError::Swap(e) => e.kind(),
            MergeError::Snapshot(e) => e.kind(),
            MergeError::Ovl(e) => e.kind(),
            // A --workdir that is not there, or that the user may not write.
            MergeError::Io { source, .. } => crate::error::open_failure_kind(source),
            MergeError::NoSpace { .. }
            | MergeError::NoRootImage { .. }
            | MergeError::Erofs(_)
            | MergeError::OverlayInvalid
            | MergeError::OverlayCorrupt(_)
            | MergeError::FoldNoRoom { .. } => ErrorKind::BadInput,
            _ => ErrorKind::Io,
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            MergeError::Stick(e) => e.hint(),
            MergeError::Swap(e) => e.hint(),
            MergeError::Snapshot(e) => e.hint(),
            MergeError::Ovl(e) => e.hint(),
            MergeError::Io { source, .. } => crate::error::open_failure_hint(source),
            MergeError::NoSpace { .. } => {
                "nothing was changed; free space where it is short (delete files from the stick, or from the work dir), or pass --workdir DIR on a file system with room"
            }
            MergeError::OverlayInvalid => {
                "nothing was changed; `livestick overlay recover` makes the overlay usable again, then merge"
            }
            MergeError::FoldNoRoom { .. } => {
                "nothing was changed; `livestick overlay grow --add-mb N` gives the overlay room, then merge again"
            }
            MergeError::NoRootImage { .. }
            | MergeError::Erofs(_)
            | MergeError::OverlayCorrupt(_) => {
                "nothing was changed; `livestick overlay status` shows what the overlay and root image are"
            }
            _ => self.kind().hint(),
        }
    }
}

/// Merge code names I/O errors through the crate's one helper.
pub(crate) use crate::io::io_at;

impl From<crate::io::IoAt> for MergeError {
    fn from(crate::io::IoAt { path, source }: crate::io::IoAt) -> Self {
        MergeError::Io { path, source }
    }
}

impl From<crate::persist::overlay::store::StoreError> for MergeError {
    fn from(e: crate::persist::overlay::store::StoreError) -> MergeError {
        MergeError::Ovl(e.into())
    }
}
