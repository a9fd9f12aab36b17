//! Whether two paths name the same medium: the source and a target, or two
//! targets of one batch.
//!
//! Names lie (`a.img` and `./a.img`, `/dev/sdb` and `/dev/disk/by-id/usb-…`,
//! `/dev/loop0` and the file behind it), so paths are compared by what they
//! are: the inode a file or device node is, the block devices a device is
//! made of, and the block device a file lives on. Everything here only looks
//! (stat and sysfs); it runs before any target is opened for writing.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::disk::devices::{DevNum, Host};
use crate::io::{IoAt, io_at};

/// Layers of block devices followed at most (dm on md on loop …): the bound
/// only guards a damaged sysfs tree.
const MAX_DEPTH: usize = 16;

#[derive(Debug, Error)]
pub enum IdentityError {
    #[error(
        "the target {target} is the source {source_path} ({why}); writing it would destroy the source — give another stick or image file as the target, or copy the source somewhere else first"
    )]
    SourceIsTarget {
        source_path: PathBuf,
        target: PathBuf,
        why: String,
    },
    #[error(
        "the targets {first} and {second} are the same ({why}); each stick or image file may be named once in a batch — drop one of them"
    )]
    DuplicateTarget {
        first: PathBuf,
        second: PathBuf,
        why: String,
    },
    #[error("{path}: {source}; check the path")]
    Io { path: PathBuf, source: io::Error },
}

impl crate::error::Classify for IdentityError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            // The path named could not be looked at: the user's to fix.
            IdentityError::Io { .. } => ErrorKind::BadInput,
            IdentityError::SourceIsTarget { .. } | IdentityError::DuplicateTarget { .. } => {
                ErrorKind::Refused
            }
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            IdentityError::Io { source, .. } => crate::error::open_failure_hint(source),
            _ => self.kind().hint(),
        }
    }
}

impl From<IoAt> for IdentityError {
    fn from(IoAt { path, source }: IoAt) -> Self {
        IdentityError::Io { path, source }
    }
}

/// What one path is, for comparing with another.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    path: PathBuf,
    /// The path with its directories resolved: equal for two spellings of
    /// one file, even one that does not exist yet.
    key: Option<PathBuf>,
    /// `(st_dev, st_ino)` of the file or device node itself.
    inodes: BTreeSet<(u64, u64)>,
    /// `(st_dev, st_ino)` of the files behind loop devices the path is
    /// stored on or lives on.
    backing: BTreeSet<(u64, u64)>,
    /// For a block device: the devices its bytes are stored on (itself, its
    /// dm/md slaves, a block device behind a loop device). Writing it writes these.
    stored_on: BTreeSet<DevNum>,
    /// `stored_on` with the whole disk of every partition added, and for a
    /// file the device its file system lives on: overwriting any of these
    /// can destroy what the path holds.
    reaches: BTreeSet<DevNum>,
}

impl Identity {
    /// Looks at `path` without opening it. A path that does not exist is an
    /// image file to be created and is known by its name only.
    pub fn of(path: &Path, host: &Host) -> Result<Identity, IdentityError> {
        let mut id = Identity {
            path: path.to_path_buf(),
            key: resolved_name(path),
            ..Identity::default()
        };
        let meta = match fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(id),
            Err(source) => {
                return Err(io_at(path)(source).into());
            }
        };
        id.inodes.insert((meta.dev(), meta.ino()));
        if meta.file_type().is_block_device() {
            id.add_device(DevNum::from_rdev(meta.rdev()), host, 0);
        } else if let Some(dev) = host.fs_device(DevNum::from_rdev(meta.dev())) {
            id.add_reach(dev, host, 0);
        }
        Ok(id)
    }

    fn add_device(&mut self, dev: DevNum, host: &Host, depth: usize) {
        if depth > MAX_DEPTH || !self.stored_on.insert(dev) {
            return;
        }
        self.add_reach(dev, host, depth);
        for slave in host.slaves_of(dev) {
            self.add_device(slave, host, depth + 1);
        }
        if let Some(backing) = host.loop_backing_file(dev)
            && let Ok(meta) = fs::metadata(&backing)
        {
            if meta.file_type().is_block_device() {
                self.add_device(DevNum::from_rdev(meta.rdev()), host, depth + 1);
            } else {
                // Only the backing file is the loop device's medium, not the
                // file system around it: a source next to it is safe.
                self.backing.insert((meta.dev(), meta.ino()));
            }
        }
    }

    fn add_reach(&mut self, dev: DevNum, host: &Host, depth: usize) {
        if depth > MAX_DEPTH || !self.reaches.insert(dev) {
            return;
        }
        self.reaches.insert(host.whole_disk_of(dev));
        for slave in host.slaves_of(dev) {
            self.add_reach(slave, host, depth + 1);
        }
        // A file system on a loop device lives in the loop's backing file, and
        // on whatever device holds that.
        if let Some(backing) = host.loop_backing_file(dev)
            && let Ok(meta) = fs::metadata(&backing)
        {
            if meta.file_type().is_block_device() {
                self.add_reach(DevNum::from_rdev(meta.rdev()), host, depth + 1);
            } else {
                self.backing.insert((meta.dev(), meta.ino()));
            }
        }
    }

    /// Why `self` and `other` are the same medium, or `None` when they are not.
    pub fn same_as(&self, other: &Identity) -> Option<String> {
        if self.key.is_some() && self.key == other.key {
            return Some("the same file".into());
        }
        if !self.inodes.is_disjoint(&other.inodes) {
            return Some("the same file or device, by device and inode number".into());
        }
        let overlap =
            |a: &Identity, b: &Identity| a.stored_on.intersection(&b.reaches).next().copied();
        if let Some(dev) = overlap(self, other).or_else(|| overlap(other, self)) {
            let describe = |id: &Identity| {
                if id.stored_on.is_empty() {
                    format!("{} lives on block device {dev}", id.path.display())
                } else {
                    format!("{} covers block device {dev}", id.path.display())
                }
            };
            return Some(format!("{} and {}", describe(self), describe(other)));
        }
        let behind = |a: &Identity, b: &Identity| !a.backing.is_disjoint(&b.inodes);
        if behind(self, other) || behind(other, self) {
            return Some("a loop device and the file behind it".into());
        }
        if !self.backing.is_disjoint(&other.backing) {
            return Some("both are kept in the same file behind a loop device".into());
        }
        None
    }
}

/// The path with its parent directory resolved and the last name kept, so a
/// file that does not exist yet still has one spelling.
fn resolved_name(path: &Path) -> Option<PathBuf> {
    if let Ok(real) = fs::canonicalize(path) {
        return Some(real);
    }
    let name = path.file_name()?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::canonicalize(parent).ok().map(|p| p.join(name))
}

/// Refuses a target that is the source, and a target named twice. Runs on
/// names and metadata only, before any target is opened.
pub fn check_distinct(source: &Path, targets: &[PathBuf]) -> Result<(), IdentityError> {
    let host = Host::live();
    check_distinct_on(&host, source, targets)
}

/// [`check_distinct`] against a given host (tests use a captured one).
pub fn check_distinct_on(
    host: &Host,
    source: &Path,
    targets: &[PathBuf],
) -> Result<(), IdentityError> {
    let source_id = Identity::of(source, host)?;
    let mut seen: Vec<Identity> = Vec::new();
    for target in targets {
        let id = Identity::of(target, host)?;
        if let Some(why) = source_id.same_as(&id) {
            return Err(IdentityError::SourceIsTarget {
                source_path: source.to_path_buf(),
                target: target.clone(),
                why,
            });
        }
        if let Some((earlier, why)) = seen.iter().find_map(|s| s.same_as(&id).map(|w| (s, w))) {
            return Err(IdentityError::DuplicateTarget {
                first: earlier.path.clone(),
                second: target.clone(),
                why,
            });
        }
        seen.push(id);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_spellings_of_one_file_are_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let host = Host::live();
        let iso = dir.path().join("x.iso");
        fs::write(&iso, b"iso").unwrap();
        let hard = dir.path().join("hard.iso");
        fs::hard_link(&iso, &hard).unwrap();
        let err = check_distinct_on(&host, &iso, std::slice::from_ref(&hard)).unwrap_err();
        assert!(matches!(err, IdentityError::SourceIsTarget { .. }), "{err}");

        let new = dir.path().join("new.img");
        let dotted = dir.path().join(".").join("new.img");
        let err = check_distinct_on(&host, &iso, &[new.clone(), dotted]).unwrap_err();
        assert!(
            matches!(err, IdentityError::DuplicateTarget { .. }),
            "{err}"
        );

        let other = dir.path().join("other.img");
        check_distinct_on(&host, &iso, &[new, other]).unwrap();
    }
}
