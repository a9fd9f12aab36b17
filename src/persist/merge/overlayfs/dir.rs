//! A directory overlay (`overlay-LABEL-UUID/` with overlayfs/ and ovlwork/, as
//! dracut keeps it on an ext4 stick) made readable by the merge: copied into an
//! ext4 image, so everything downstream reads one format.

use std::path::Path;

use crate::disk::ext4::{self, Ext4Options};
use crate::persist::merge::overlayfs::error::OvlError;
use crate::persist::overlay::store;

/// Copies a directory overlay into an ext4 image with `mke2fs -d`, which keeps
/// owners, modes, times, device nodes, hard links and xattrs. Needs root to see
/// the trusted.overlay.* attributes that mark whiteouts and opaque directories.
pub fn image_from_dir(dir: &Path, out: &Path) -> Result<(), OvlError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(OvlError::DirNeedsRoot(dir.to_path_buf()));
    }
    let (bytes, entries) = store::tally(dir)?;
    // A sparse file: room for every block and an inode per 16 KiB for every entry.
    let size = (bytes + entries * 16384 + (16 << 20)).next_multiple_of(1 << 20);
    let opts = Ext4Options {
        root_dir: Some(dir.to_path_buf()),
        ..Ext4Options::default()
    };
    ext4::make_ext4_image(out, size, "overlay", &opts)?;
    Ok(())
}
