//! The overlays livestick maintains, behind one shape.
pub mod store;

use crate::persist::merge::MergeError;
use crate::persist::ovl_merge::OvlError;
use store::StoreError;

/// The merge code reports a store failure as its own; the messages are the store's.
impl From<StoreError> for OvlError {
    fn from(e: StoreError) -> OvlError {
        match e {
            StoreError::Io { path, source } => OvlError::Io { path, source },
            StoreError::Ext4(e) => OvlError::Ext4(e),
            StoreError::NoUpper(what) => OvlError::NoUpper(what),
            StoreError::Host { path, what } => OvlError::Host { path, what },
        }
    }
}

impl From<StoreError> for MergeError {
    fn from(e: StoreError) -> MergeError {
        MergeError::Ovl(e.into())
    }
}
