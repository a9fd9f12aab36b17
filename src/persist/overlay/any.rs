//! [`Overlay`]: an overlay of any kind in its place, for the verbs every kind
//! answers the same way. Apart from the parent module, whose types the kind modules
//! share, so that the parent imports none of its kinds.

use std::path::PathBuf;

use super::{Kind, OverlayError, ResetPlan, dir, dm, ovlfs, place, store};

/// An overlay livestick maintains: its kind, in its place. The verbs every kind
/// answers the same way go through here; the others (grow, recover, whose plans and
/// reports differ by kind) are the kind modules' functions of the same names.
pub enum Overlay {
    /// A dm-snapshot store file.
    Dm(place::Place),
    /// An OverlayFS ext4 file.
    Ovlfs(place::Place),
    /// An OverlayFS directory.
    Dir(PathBuf),
}

impl Overlay {
    /// The overlay file in `place`, by what it holds.
    pub fn in_file(mut place: place::Place) -> Overlay {
        match place.kind() {
            Kind::Overlayfs => Overlay::Ovlfs(place),
            _ => Overlay::Dm(place),
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Overlay::Dm(_) => Kind::DmSnapshot,
            Overlay::Ovlfs(_) => Kind::Overlayfs,
            Overlay::Dir(_) => Kind::OverlayfsDir,
        }
    }

    /// Reads what a reset loses and decides it.
    pub fn plan_reset(&mut self) -> Result<ResetPlan, OverlayError> {
        Ok(match self {
            Overlay::Dm(place) => {
                let (show, len) = (place.show(), place.bytes());
                dm::plan_reset(&show, len, &dm::inspect_reset(&mut place.io()?, len))
            }
            Overlay::Ovlfs(place) => {
                let show = place.show();
                let info = store::overlay_info(&mut place.io()?);
                let upper = store::upper_contents(&mut place.io()?);
                ovlfs::plan_reset(&show, info.as_ref(), upper)
            }
            Overlay::Dir(path) => {
                let (used, entries) = dir::inspect_reset(path)?;
                dir::plan_reset(path, used, entries)
            }
        })
    }

    pub fn apply_reset(&mut self, plan: &ResetPlan) -> Result<(), OverlayError> {
        match self {
            Overlay::Dm(place) => {
                let len = place.bytes();
                dm::apply_reset(&mut place.io()?, len)
            }
            Overlay::Ovlfs(place) => {
                let len = place.bytes();
                ovlfs::apply_reset(&mut place.io()?, len, &plan.overlay)
            }
            Overlay::Dir(path) => dir::apply_reset(path),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zeroed_file_is_a_new_dm_store_whose_reset_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("overlay-L-U");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let bare = place::Bare::open(&path, true).unwrap();
        let mut overlay = Overlay::in_file(place::Place::Bare(bare));
        assert_eq!(overlay.kind(), Kind::DmSnapshot);
        let plan = overlay.plan_reset().unwrap();
        assert_eq!(plan.discards, "nothing (it is already empty)");
        assert_eq!(plan.zeroed_bytes, Some(64 * 1024));
        overlay.apply_reset(&plan).unwrap();
    }
}
