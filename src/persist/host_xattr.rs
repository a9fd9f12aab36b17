//! Extended attributes of paths on the host, through the `xattr` crate, whose path
//! functions never follow a final symlink (the l*xattr calls): the link's own labels
//! are what a root image carries. A leaf, so the EROFS and merge modules that set
//! labels need not import each other; keeps the project free of `unsafe` outside
//! ioctls.

use std::io;
use std::path::Path;

/// Sets an xattr on a path without following a symlink.
pub fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    xattr::set(path, name, value)
}

/// An xattr's value, `None` when it is absent or unreadable.
pub fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    xattr::get(path, name).ok().flatten()
}

/// The names of a path's xattrs.
pub fn list_xattrs(path: &Path) -> io::Result<Vec<String>> {
    Ok(xattr::list(path)?
        .map(|n| n.to_string_lossy().into_owned())
        .collect())
}

/// Removes an xattr from a path without following a symlink.
pub fn remove_xattr(path: &Path, name: &str) -> io::Result<()> {
    xattr::remove(path, name)
}
