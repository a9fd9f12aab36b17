//! The overlays livestick maintains, behind one shape.
//!
//! Three kinds ([`Kind`]): a dm-snapshot store file ([`dm`]), an OverlayFS ext4 file
//! ([`ovlfs`]) and an OverlayFS directory ([`dir`]). The two file kinds live in one
//! of three places ([`place::Place`]): a bare file, or a file on a stick's FAT or on
//! its ext4 live partition, reached through its extents. [`any::Overlay`] is a kind in its place.
//!
//! Every verb goes inspect → plan → apply: `inspect_*` reads the facts (sizes,
//! header, superblock, the stick's free space), `plan_*` decides from those facts
//! alone (pure, unit-tested in each module) and `apply_*` does what the plan says.
//! Each kind module answers the same verbs under the same names; a verb whose plan
//! has one shape for every kind (reset) is also a method of [`any::Overlay`]. A new kind
//! is one more module and variant; a new place (an overlay on an ext4 live
//! partition) one more variant of `Place` and of its `PlaceIo`.
//!
//! Format facts stay in the format modules (`snapshot`, `ovl_maint`, `disk::ext4`);
//! the stick is reached through `disk::stick`; merging is `persist::merge`'s.

pub mod any;
pub mod dir;
pub mod dm;
pub mod ovlfs;
pub mod place;
pub mod report;
pub mod store;

use std::io;
use std::path::PathBuf;

use serde::Serialize;
use thiserror::Error;

use crate::disk::fat;
use crate::disk::fat_alloc::AllocError;
use crate::disk::stick::StickError;
use crate::persist::merge::MergeError;
use crate::persist::ovl_maint::OvlMaintError;
use crate::persist::snapshot::SnapshotError;
use crate::size::{MIB, human};
use store::StoreError;

/// What an overlay holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// dm-snapshot exception store (or a zeroed, new one).
    DmSnapshot,
    /// An ext4 file system with `overlayfs/` and `ovlwork/` (rd.live.overlay.overlayfs).
    Overlayfs,
    /// `overlayfs/` and `ovlwork/` on the stick's own file system (an ext4 stick).
    OverlayfsDir,
}

/// Progress of a long step: `(phase, done, total)`.
pub type Progress<'a> = &'a mut dyn FnMut(&str, u64, u64);

#[derive(Debug, Error)]
pub enum OverlayError {
    /// The user named something that is not a usable overlay, or asked a kind for
    /// what it cannot do; the front reports it as bad input.
    #[error("{0}")]
    BadInput(String),
    /// A store the strict checks cannot read; reported as bad input, with the cause.
    #[error("{overlay} is not a usable overlay")]
    NotUsable {
        overlay: String,
        #[source]
        source: SnapshotError,
    },
    /// A request this overlay cannot serve (wrong thing named, too large, no
    /// room): bad input, nothing was changed.
    #[error("{0}")]
    Refused(String),
    /// What was being done when `source` failed, and what that left.
    #[error("{context}")]
    Context {
        context: String,
        #[source]
        source: Box<OverlayError>,
    },
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Maint(#[from] OvlMaintError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Stick(#[from] StickError),
    #[error(transparent)]
    Alloc(#[from] AllocError),
    #[error(transparent)]
    Merge(#[from] MergeError),
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The overlay file named could not be opened or looked at.
    #[error(transparent)]
    CannotOpen(#[from] crate::error::CannotOpen),
}

impl OverlayError {
    pub fn context(self, context: impl Into<String>) -> OverlayError {
        OverlayError::Context {
            context: context.into(),
            source: Box::new(self),
        }
    }
}

/// Says what was being done when an error happened, like anyhow's `with_context`,
/// keeping the typed cause.
pub trait Explain<T> {
    fn explain(self, context: impl FnOnce() -> String) -> Result<T, OverlayError>;
}

impl<T, E: Into<OverlayError>> Explain<T> for Result<T, E> {
    fn explain(self, context: impl FnOnce() -> String) -> Result<T, OverlayError> {
        self.map_err(|e| e.into().context(context()))
    }
}

/// What a grow on a stick may use. A bare file has no such limits beyond the FAT
/// cap every plan applies (the file is meant to go on a stick).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StickRoom {
    pub stick: PathBuf,
    /// The overlay's path on the stick's FAT.
    pub overlay: String,
    pub free_bytes: u64,
    /// The overlay is a file on the stick's FAT32 (under 4 GiB); false on the
    /// ext4 live partition.
    pub on_fat: bool,
}

impl StickRoom {
    /// The largest overlay file its file system allows.
    pub fn max_file_bytes(&self) -> u64 {
        if self.on_fat {
            crate::persist::snapshot::FAT_MAX_FILE_BYTES
        } else {
            // ext4 with 4 KiB blocks: 16 TiB less a block.
            (16u64 << 40) - 4096
        }
    }

    /// On a stick the FAT file limit is a hard error with the figures, not a silent
    /// cap: the user asked for a size the stick cannot give.
    pub fn check_fat_limit(&self, show: &str, requested: u64) -> Result<(), OverlayError> {
        if self.on_fat && requested > fat::FAT_MAX_FILE {
            return Err(OverlayError::Refused(format!(
                "{show} cannot grow to {} ({requested} bytes): a file on FAT32 must stay below 4 GiB, at most {} MiB ({} bytes)",
                human(requested),
                fat::FAT_MAX_FILE / MIB,
                fat::FAT_MAX_FILE
            )));
        }
        Ok(())
    }

    pub fn check_free(&self, added: u64) -> Result<(), OverlayError> {
        if added > self.free_bytes {
            return Err(OverlayError::Refused(format!(
                "not enough free space on {} to grow {} by {} ({added} bytes): {} ({} bytes) free",
                self.stick.display(),
                self.overlay,
                human(added),
                human(self.free_bytes),
                self.free_bytes
            )));
        }
        Ok(())
    }
}

/// How big the user asked the overlay to become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrowRequest {
    /// `--size-mb N`: the new total.
    SizeMb(u64),
    /// `--add-mb N`: on top of the current size.
    AddMb(u64),
}

impl GrowRequest {
    /// From the two options, `--size-mb` winning (clap requires one of them).
    pub fn from_options(
        size_mb: Option<u64>,
        add_mb: Option<u64>,
    ) -> Result<GrowRequest, OverlayError> {
        match (size_mb, add_mb) {
            (Some(s), _) => Ok(GrowRequest::SizeMb(s)),
            (None, Some(add)) => Ok(GrowRequest::AddMb(add)),
            (None, None) => Err(OverlayError::Refused(
                "give --size-mb N or --add-mb N".to_string(),
            )),
        }
    }

    pub fn bytes(self, current: u64) -> u64 {
        match self {
            GrowRequest::SizeMb(s) => s.saturating_mul(MIB),
            GrowRequest::AddMb(add) => current.saturating_add(add.saturating_mul(MIB)),
        }
    }
}

/// A reset, decided: what is lost, and what a dry run says it would do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResetPlan {
    pub overlay: String,
    /// What the reset discards, in words.
    pub discards: String,
    /// The dry run's sentence.
    pub would: String,
    /// Named in the JSON report (a dm-snapshot reset names none).
    pub kind: Option<Kind>,
    /// Bytes a dm-snapshot reset zeroes, for the dry run's JSON.
    pub zeroed_bytes: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grow_requests() {
        assert_eq!(GrowRequest::SizeMb(10).bytes(5 * MIB), 10 * MIB);
        assert_eq!(GrowRequest::AddMb(10).bytes(5 * MIB), 15 * MIB);
        assert_eq!(GrowRequest::AddMb(u64::MAX).bytes(1), u64::MAX);
        assert_eq!(
            GrowRequest::from_options(Some(1), Some(2)).unwrap(),
            GrowRequest::SizeMb(1)
        );
        assert!(GrowRequest::from_options(None, None).is_err());
    }
}
