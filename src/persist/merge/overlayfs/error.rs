//! The error of the OverlayFS merge and the names dracut gives the overlay's
//! directories: a leaf every OverlayFS module (and the overlay store in
//! `persist::ovl_merge`) imports.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

use crate::disk::ext4;
use crate::persist::erofs::ErofsError;
use crate::persist::tar_stream::TarError;
use crate::squash::SquashError;
use crate::tools::ToolMissing;

#[derive(Debug, Error)]
pub enum OvlError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    ToolMissing(#[from] ToolMissing),
    #[error(transparent)]
    Tool(#[from] SquashError),
    #[error(transparent)]
    Erofs(#[from] ErofsError),
    #[error(transparent)]
    Tar(#[from] TarError),
    #[error(transparent)]
    Ext4(#[from] ext4::Ext4Error),
    #[error("unexpected output from debugfs on {image} ({what}): {line:?}")]
    Parse {
        image: String,
        what: &'static str,
        line: String,
    },
    #[error(
        "{0}: the overlay file system has no /overlayfs directory, so it is not an OverlayFS overlay made by livestick or dracut"
    )]
    NoUpper(String),
    #[error(
        "{path:?}: a name that is not UTF-8 or contains a double quote or a newline cannot be passed to debugfs; rename or remove it in the live system, then merge again. Nothing was changed"
    )]
    BadName { path: String },
    #[error(
        "/{path} carries {xattr}: the live system's OverlayFS used {feature}, whose files only make sense together with the old lower layer; a file-by-file merge would be wrong. Nothing was changed"
    )]
    Unsupported {
        path: String,
        xattr: String,
        feature: &'static str,
    },
    #[error(
        "the fakeroot step of the merge (extract, apply, mkfs.erofs) failed ({status}):\n{stderr}"
    )]
    Fakeroot { status: String, stderr: String },
    #[error(
        "{0}: a directory overlay marks opaque directories and whiteouts with trusted.overlay.* attributes, which only root can read; without them the merge would be wrong. Run it as root (the directory sits on a mounted file system, which took root anyway)"
    )]
    DirNeedsRoot(PathBuf),
    #[error("debugfs reported errors while applying the overlay to {image}:\n{errors}")]
    ApplyFailed { image: PathBuf, errors: String },
    #[error("{path}: {what}")]
    Host { path: PathBuf, what: String },
}

/// The OverlayFS merge names I/O errors through the crate's one helper.
pub(crate) use crate::io::io_at;

impl crate::error::Classify for OvlError {
    fn kind(&self) -> crate::error::ErrorKind {
        match self {
            OvlError::NoUpper(_)
            | OvlError::BadName { .. }
            | OvlError::Unsupported { .. }
            | OvlError::DirNeedsRoot(_) => crate::error::ErrorKind::BadInput,
            OvlError::Io { source, .. } => crate::error::open_failure_kind(source),
            _ => crate::error::ErrorKind::Io,
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            OvlError::Io { source, .. } => crate::error::open_failure_hint(source),
            OvlError::NoUpper(_) | OvlError::BadName { .. } | OvlError::Unsupported { .. } => {
                "nothing was changed; the message says what the overlay holds that a merge cannot take"
            }
            _ => self.kind().hint(),
        }
    }
}

impl From<crate::io::IoAt> for OvlError {
    fn from(crate::io::IoAt { path, source }: crate::io::IoAt) -> Self {
        OvlError::Io { path, source }
    }
}

/// The merge reports a failure of the overlay store as its own; the messages
/// are the store's.
impl From<crate::persist::overlay::store::StoreError> for OvlError {
    fn from(e: crate::persist::overlay::store::StoreError) -> OvlError {
        use crate::persist::overlay::store::StoreError;
        match e {
            StoreError::Io { path, source } => OvlError::Io { path, source },
            StoreError::Ext4(e) => OvlError::Ext4(e),
            StoreError::NoUpper(what) => OvlError::NoUpper(what),
            StoreError::Host { path, what } => OvlError::Host { path, what },
        }
    }
}
