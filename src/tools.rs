//! Finding the external programs livestick runs (the reference tools for
//! formats it does not own: syslinux, e2fsprogs, squashfs-tools, …).

use std::path::{Path, PathBuf};

/// Looks on PATH and in the sbin directories, which an ordinary user's PATH
/// often lacks on Debian although the tools run fine from there.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
