//! Where the files of a merge are: a [`Located`] file (a plain file, or extents on a
//! stick read in place) and the free-space helpers every step checks before it writes.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::error::{MergeError, io_at};
use crate::disk::extent_file::ExtentFile;
use crate::disk::stick::Stick;
use crate::persist::workdir;

/// Where on a stick the files of a merge are.
#[derive(Debug, Clone, Serialize)]
pub struct StickPlace {
    /// The merge document names the stick once, as its top-level `target`.
    #[serde(skip_serializing)]
    pub stick: PathBuf,
    #[serde(rename = "partition_start_bytes")]
    pub partition_start: u64,
    /// `/LiveOS/squashfs.img`
    pub squashfs: String,
    /// `/LiveOS/overlay-LABEL-UUID`
    pub overlay: String,
    pub cluster_bytes: u64,
}

/// Where on a stick's ext4 live partition the files of a merge are (the layout for
/// persistence over 4 GiB): read and written in place through their ext4 extents.
#[derive(Debug, Clone)]
pub struct Ext4Place {
    pub device: PathBuf,
    pub partition: crate::disk::ext4_fs::LivePartition,
    pub live_dir: String,
    /// `/LiveOS/squashfs.img`
    pub squashfs: String,
    /// `/LiveOS/overlay-LABEL-UUID`
    pub overlay: String,
    /// Holds the work copy of the overlay the merge reads (`overlay_at`): its
    /// unwritten extents read as zeros there, as ext4 reads them, where the raw
    /// blocks on the stick hold whatever they held. Removed with the last plan.
    pub scratch: std::sync::Arc<tempfile::TempDir>,
}

/// Bytes of a file reached through a device (or a plain file) and extents in it.
#[derive(Debug, Clone, Serialize)]
pub struct Located {
    pub device: PathBuf,
    pub extents: Vec<(u64, u64)>,
}

impl Located {
    pub(crate) fn plain(path: &Path) -> Result<Located, MergeError> {
        let len = fs::metadata(path).map_err(io_at(path))?.len();
        Ok(Located {
            device: path.to_path_buf(),
            extents: vec![(0, len)],
        })
    }

    /// Opens it for reading (and writing).
    pub fn open(&self, write: bool) -> Result<ExtentFile<File>, MergeError> {
        // A stick through the command's handle of it, never by its path again.
        let f = crate::disk::target::open_path(&self.device, write)
            .map_err(crate::disk::stick::StickError::from)?;
        Ok(ExtentFile::new(f, &self.extents))
    }

    pub fn len(&self) -> u64 {
        self.extents.iter().map(|e| e.1).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The offset at which an external tool can read it, when it is one run of bytes.
    pub fn contiguous_at(&self) -> Option<u64> {
        match self.extents.as_slice() {
            [(o, _)] => Some(*o),
            _ => None,
        }
    }

    /// A path to it as a file of its own, for tools that take no offset (sqfs2tar,
    /// fsck.erofs): the file itself when it is one, else a copy named `name` in `dir`.
    /// `true` with the path: it is that copy, the caller's to remove.
    pub(crate) fn whole_file_or_copy(
        &self,
        dir: &Path,
        name: &str,
    ) -> Result<(PathBuf, bool), MergeError> {
        let whole_file = self.contiguous_at() == Some(0)
            && fs::metadata(&self.device).is_ok_and(|m| m.is_file() && m.len() == self.len());
        if whole_file {
            return Ok((self.device.clone(), false));
        }
        let copy = dir.join(name);
        let mut src = self.open(false)?;
        let mut dst = File::create(&copy).map_err(io_at(&copy))?;
        io::copy(&mut src, &mut dst).map_err(io_at(&copy))?;
        Ok((copy, true))
    }
}

/// Free bytes for an unprivileged user on the file system holding `path`.
pub fn free_bytes(path: &Path) -> Result<u64, MergeError> {
    Ok(workdir::free_bytes(path).map_err(io_at(path))?)
}

/// Refuses with [`MergeError::NoSpace`] when `needed` bytes do not fit in `free`.
pub(crate) fn check_space(
    what: &'static str,
    path: &Path,
    needed: u64,
    free: u64,
) -> Result<(), MergeError> {
    if needed > free {
        return Err(MergeError::NoSpace {
            what,
            path: path.to_path_buf(),
            needed,
            needed_mib: needed.div_ceil(1 << 20),
            free,
            free_mib: free / (1 << 20),
        });
    }
    Ok(())
}

/// Runs `f` on a path + offset where unsquashfs can read the image: in place when it is
/// contiguous, else on a temporary copy in `workdir` (a fragmented squashfs.img on a
/// stick that has seen many edits).
pub(crate) fn with_readable_squashfs<T>(
    at: &Located,
    workdir: &Path,
    f: impl FnOnce(&Path, u64) -> Result<T, MergeError>,
) -> Result<T, MergeError> {
    if let Some(off) = at.contiguous_at() {
        return f(&at.device, off);
    }
    check_space(
        "a copy of the fragmented squashfs.img",
        workdir,
        at.len(),
        free_bytes(workdir)?,
    )?;
    let copy = workdir.join(format!("livestick-squashfs-{}.img", std::process::id()));
    let result = (|| {
        let mut src = at.open(false)?;
        let mut dst = File::create(&copy).map_err(io_at(&copy))?;
        io::copy(&mut src, &mut dst).map_err(io_at(&copy))?;
        f(&copy, 0)
    })();
    let _ = fs::remove_file(&copy);
    result
}

/// The extents of a file on a stick, in device offsets: FAT32 and FAT16 alike
/// (`Stick::file_extents` reads FAT32 only; it stays the fallback).
pub fn stick_extents(stick: &mut Stick, path: &str) -> Result<Vec<(u64, u64)>, MergeError> {
    Ok(stick.file_extents(path)?)
}

impl Located {
    /// A file on a stick, by its FAT extents.
    pub fn on_stick(stick: &mut Stick, path: &str) -> Result<Located, MergeError> {
        Ok(Located {
            device: stick.path.clone(),
            extents: stick_extents(stick, path)?,
        })
    }

    /// A plain file.
    pub fn file(path: &Path) -> Result<Located, MergeError> {
        Located::plain(path)
    }
}

/// `squashfs.img` → `squashfs.img.new`, in the same directory (so the rename is atomic).
pub fn staged_path(squashfs: &Path) -> PathBuf {
    let mut name = squashfs
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".new");
    squashfs.with_file_name(name)
}

/// The new root image a merge is about to swap in, as a file that must change with
/// it sees it.
pub struct NewRoot<'a> {
    /// `/LiveOS/squashfs.img`
    pub path: &'a str,
    pub size: u64,
    pub sha256: &'a str,
}

/// A file whose new copy is staged beside it (`staged`) and must be swapped in
/// together with the root image: the stick's manifest, which names the image's
/// sha256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Companion {
    pub target: String,
    pub staged: String,
}

/// Stages the companion of a new root image on the open stick, synced (`Ok(None)`
/// when the stick has none, e.g. no manifest). A function the command passes down
/// in the plan: the manifest is a module above this layer.
pub type StageCompanion = fn(&mut Stick, &NewRoot<'_>) -> Result<Option<Companion>, String>;
