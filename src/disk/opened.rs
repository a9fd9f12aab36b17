//! The targets a command opened, each once (issue 13): the registry behind
//! `disk::target::open_target`, kept apart from `target` so that the formats that
//! reach a target by path (`ext4_live`, `squash`) can find its handle without
//! importing what `target` imports.
//!
//! A command opens its target once, right after its safety checks, in the mode the
//! whole command needs; every later use of the target's path — a probe,
//! `Stick::open`, the leftover repair, fatfs, the overlay's extents, e2fsprogs,
//! debugfs, unsquashfs and SYSLINUX — goes through that handle, never through the
//! path again: the programs reach it as `/proc/self/fd/N`, and a use in this process
//! that needs a `File` of its own gets the handle reopened the same way. That is the
//! same file (or device) whatever the path names by then, with a file offset of its
//! own: a `try_clone` would share the offset, and a reader that expects a fresh file
//! to start at byte 0 would read wherever another user left it. So whatever is
//! renamed over the path after that open is never read or written, and a read-only
//! handle never has to become a writable `O_EXCL` one halfway. The layers below
//! reach the target by path (a stick is a path in every request), which is why the
//! handle is found here by name rather than passed down. The guard a command holds
//! (`target::Opened`) closes the target when the command is done: a test runs many
//! commands in one process.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// One target, opened once.
struct Entry {
    id: u64,
    /// The names it was opened by: what the user gave and, for a block device, its
    /// canonical name.
    names: Vec<PathBuf>,
    file: File,
    writable: bool,
}

impl Entry {
    fn is_named(&self, path: &Path) -> bool {
        self.names.iter().any(|n| n == path)
            || fs::canonicalize(path).is_ok_and(|c| self.names.contains(&c))
    }
}

/// Every target this process holds open (a batch `write` has several).
static OPENED: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// The registry; a panic elsewhere while it was held leaves it as it was, so it
/// stays usable.
fn entries() -> MutexGuard<'static, Vec<Entry>> {
    OPENED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Holds `file`, opened by `names`, until [`close`]; its id.
pub(crate) fn register(names: Vec<PathBuf>, file: File, writable: bool) -> u64 {
    static NEXT_ID: AtomicU64 = AtomicU64::new(0);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    entries().push(Entry {
        id,
        names,
        file,
        writable,
    });
    id
}

/// Closes the target registered as `id`.
pub(crate) fn close(id: u64) {
    entries().retain(|e| e.id != id);
}

/// The open target `path` names.
pub(crate) struct Found {
    /// Its handle reopened (see [`reopen`]); read-only unless asked to write and
    /// opened for writing.
    pub file: io::Result<File>,
    pub writable: bool,
}

/// The id of the open target `path` names.
pub(crate) fn id_of(path: &Path) -> Option<u64> {
    entries().iter().find(|e| e.is_named(path)).map(|e| e.id)
}

/// The open target `path` names, its handle reopened for reading and, when
/// `writable` and the target was opened for writing, for writing.
pub(crate) fn find(path: &Path, writable: bool) -> Option<Found> {
    let entries = entries();
    let entry = entries.iter().find(|e| e.is_named(path))?;
    Some(Found {
        file: reopen(&entry.file, writable && entry.writable),
        writable: entry.writable,
    })
}

/// `file` opened again through `/proc/self/fd/N`: the same file (or device) it is,
/// never a path lookup of its name, with a file offset of its own. A block device
/// held with `O_EXCL` stays claimed by `file`; this open does not ask again.
fn reopen(file: &File, writable: bool) -> io::Result<File> {
    use std::os::fd::AsRawFd;
    OpenOptions::new()
        .read(true)
        .write(writable)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// The error for a write through a target opened read-only.
pub(crate) fn read_only_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        "opened read-only by this command",
    )
}

/// `path` opened for reading (and writing): a clone of the command's handle when
/// `path` names its open target, else `path` opened now (a source, a work file, the
/// target of a command that reads it only by path).
pub fn open_path(path: &Path, writable: bool) -> io::Result<File> {
    match find(path, writable) {
        Some(found) if writable && !found.writable => Err(read_only_error()),
        Some(found) => found.file,
        None => OpenOptions::new().read(true).write(writable).open(path),
    }
}

/// The name a program livestick runs (e2fsprogs, debugfs, unsquashfs) reaches `path`
/// by: `/proc/self/fd/N` of the command's handle when `path` names its open target,
/// so the program works on the file the command opened; else `path` itself.
pub fn tool_path(path: &Path) -> PathBuf {
    match entries().iter().find(|e| e.is_named(path)) {
        Some(entry) => inheritable_path(&entry.file).unwrap_or_else(|_| path.to_path_buf()),
        None => path.to_path_buf(),
    }
}

/// `/proc/self/fd/N` of `file`: the path by which a program livestick runs (the
/// `syslinux` installer, e2fsprogs) reaches exactly this open target, whatever the
/// target's own path names by now. The descriptor is made inheritable for that; in
/// the child, `/proc/self/fd/N` names the descriptor it inherited.
pub fn inheritable_path(file: &File) -> io::Result<PathBuf> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    use std::os::fd::AsRawFd;
    fcntl(file.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty())).map_err(io::Error::from)?;
    Ok(PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd())))
}
