//! The OverlayFS directory overlay: `overlay-LABEL-UUID/` with `overlayfs/` and
//! `ovlwork/` on the stick's own file system, as dracut keeps it on an ext4 stick.
//! It has no size or file system of its own: status, reset and merge only.

use std::path::Path;

use crate::persist::merge;
use crate::size::human;

use super::{Explain, Kind, OverlayError, ResetPlan, store};

/// What the upper dir holds, and the room left on its file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub upper_entries: u64,
    pub used_bytes: u64,
    pub bytes_free: u64,
}

pub fn status(dir: &Path) -> Result<Status, OverlayError> {
    let (used, entries) = store::upper_dir_usage(dir)?;
    let free = merge::located::free_bytes(dir)?;
    Ok(Status {
        upper_entries: entries,
        used_bytes: used,
        bytes_free: free,
    })
}

/// What a reset loses: `(bytes, entries)` of the upper dir.
pub fn inspect_reset(dir: &Path) -> Result<(u64, u64), OverlayError> {
    Ok(store::upper_dir_usage(dir)?)
}

pub fn plan_reset(dir: &Path, used: u64, entries: u64) -> ResetPlan {
    let path = dir.display().to_string();
    ResetPlan {
        discards: format!(
            "{entries} entries ({}) in its OverlayFS upper dir",
            human(used)
        ),
        would: format!("would empty {path}/overlayfs and {path}/ovlwork"),
        overlay: path,
        kind: Some(Kind::OverlayfsDir),
        zeroed_bytes: None,
    }
}

pub fn apply_reset(dir: &Path) -> Result<(), OverlayError> {
    store::empty_overlay_dir(dir).explain(|| format!("emptying {}", dir.display()))
}

/// grow and recover have nothing to do on a directory overlay: it has no size or
/// file system of its own. `what` is the verb refused.
pub fn refuse(dir: &Path, what: &str) -> OverlayError {
    OverlayError::Refused(format!(
        "{} is a directory overlay (overlayfs/ + ovlwork/ on the stick's own file system): it has no size or file system of its own to {what}; {what} the stick's file system instead (resize2fs / e2fsck on its partition)",
        dir.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_empties_both_directories() {
        let plan = plan_reset(Path::new("/m/overlay-L-U"), 8192, 3);
        assert_eq!(
            plan.discards,
            "3 entries (8 KiB) in its OverlayFS upper dir"
        );
        assert_eq!(
            plan.would,
            "would empty /m/overlay-L-U/overlayfs and /m/overlay-L-U/ovlwork"
        );
        assert_eq!(plan.kind, Some(Kind::OverlayfsDir));
    }

    #[test]
    fn grow_and_recover_are_refused() {
        for what in ["grow", "check"] {
            match refuse(Path::new("/m/o"), what) {
                OverlayError::Refused(m) => {
                    assert!(m.starts_with("/m/o is a directory overlay"), "{m}");
                    assert!(m.contains(&format!("of its own to {what}; {what} the stick")));
                }
                e => panic!("{e:?}"),
            }
        }
    }
}
