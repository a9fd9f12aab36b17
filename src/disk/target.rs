//! The thing being written: an image file or a block device.
//!
//! Probing never changes anything, so every bad-input check runs before the
//! first byte is written and a refused target is left exactly as it was.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;
use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    ImageFile,
    BlockDevice,
}

/// What we know about a target before touching it.
#[derive(Debug, Clone, Serialize)]
pub struct TargetProbe {
    pub path: PathBuf,
    pub kind: TargetKind,
    /// Current size in bytes; 0 for an image file that does not exist yet.
    pub size: u64,
    pub exists: bool,
    pub removable: Option<bool>,
    pub model: Option<String>,
    pub serial: Option<String>,
    /// Mounts, swap and holders found on the device or its partitions.
    pub busy: Vec<String>,
}

#[derive(Debug, Error)]
pub enum TargetError {
    #[error("target {0} is a directory; give an image file path or a block device")]
    IsDirectory(PathBuf),
    #[error(
        "target {0} does not exist; livestick never creates files under /dev — check the device name with `livestick devices`"
    )]
    MissingDevice(PathBuf),
    #[error("target {0} is neither a regular file nor a block device")]
    NotFileOrDevice(PathBuf),
    #[error("image file {0} does not exist; give --size (e.g. --size 4G) to create it")]
    NeedSize(PathBuf),
    #[error(
        "--size {requested} bytes is smaller than the existing image file {path} ({current} bytes); livestick does not shrink images"
    )]
    WouldShrink {
        path: PathBuf,
        requested: u64,
        current: u64,
    },
    #[error("--size applies to image files only; {0} is a block device")]
    SizeOnDevice(PathBuf),
    #[error("{path} is in use, refusing to write to it:\n{}", .findings.join("\n"))]
    Busy {
        path: PathBuf,
        findings: Vec<String>,
    },
    #[error(
        "{0} is not a removable device; if you are sure it is the stick you want to erase, add --force"
    )]
    NotRemovable(PathBuf),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TargetError + '_ {
    move |source| TargetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Looks at a target without changing it.
pub fn probe(path: &Path) -> Result<TargetProbe, TargetError> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if path.starts_with("/dev") {
                return Err(TargetError::MissingDevice(path.to_path_buf()));
            }
            return Ok(TargetProbe {
                path: path.to_path_buf(),
                kind: TargetKind::ImageFile,
                size: 0,
                exists: false,
                removable: None,
                model: None,
                serial: None,
                busy: Vec::new(),
            });
        }
        Err(e) => return Err(io_err(path)(e)),
    };
    if meta.is_dir() {
        return Err(TargetError::IsDirectory(path.to_path_buf()));
    }
    if meta.is_file() {
        return Ok(TargetProbe {
            path: path.to_path_buf(),
            kind: TargetKind::ImageFile,
            size: meta.len(),
            exists: true,
            removable: None,
            model: None,
            serial: None,
            busy: Vec::new(),
        });
    }
    if !meta.file_type().is_block_device() {
        return Err(TargetError::NotFileOrDevice(path.to_path_buf()));
    }
    let canonical = fs::canonicalize(path).map_err(io_err(path))?;
    let mut file = File::open(&canonical).map_err(io_err(path))?;
    let size = file.seek(SeekFrom::End(0)).map_err(io_err(path))?;
    let rdev = meta.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let read_attr = |rel: &str| {
        fs::read_to_string(sys.join(rel))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let removable = read_attr("removable").map(|v| v == "1");
    Ok(TargetProbe {
        path: canonical,
        kind: TargetKind::BlockDevice,
        size,
        exists: true,
        removable,
        model: read_attr("device/model"),
        serial: read_attr("device/serial"),
        busy: busy_findings(&sys, major, minor),
    })
}

/// Mounts, swap areas and holders of the device and each of its partitions,
/// matched by major:minor (never by name prefix), one finding per line.
fn busy_findings(sys: &Path, major: u32, minor: u32) -> Vec<String> {
    let mut devs = vec![(format!("{major}:{minor}"), sys.to_path_buf())];
    if let Ok(entries) = fs::read_dir(sys) {
        for entry in entries.flatten() {
            let p = entry.path();
            if p.join("partition").exists()
                && let Ok(dev) = fs::read_to_string(p.join("dev"))
            {
                devs.push((dev.trim().to_string(), p));
            }
        }
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let swaps = fs::read_to_string("/proc/swaps").unwrap_or_default();
    let mut findings = Vec::new();
    for (dev, dir) in &devs {
        let name = fs::canonicalize(dir)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| dev.clone());
        for line in mountinfo.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            if fields.len() > 4 && fields[2] == dev {
                findings.push(format!("/dev/{name} is mounted on {}", fields[4]));
            }
        }
        for line in swaps.lines().skip(1) {
            if let Some(swap) = line.split_whitespace().next()
                && let Ok(meta) = fs::metadata(swap)
                && meta.file_type().is_block_device()
                && format!("{}:{}", libc::major(meta.rdev()), libc::minor(meta.rdev())) == *dev
            {
                findings.push(format!("/dev/{name} is used as swap"));
            }
        }
        if let Ok(holders) = fs::read_dir(dir.join("holders")) {
            for holder in holders.flatten() {
                findings.push(format!(
                    "/dev/{name} is in use by /dev/{}",
                    holder.file_name().to_string_lossy()
                ));
            }
        }
    }
    findings
}

/// Refuses a block device that is busy, or not removable without `force`.
pub fn check_safe(probe: &TargetProbe, force: bool) -> Result<(), TargetError> {
    if probe.kind != TargetKind::BlockDevice {
        return Ok(());
    }
    if !probe.busy.is_empty() {
        return Err(TargetError::Busy {
            path: probe.path.clone(),
            findings: probe.busy.clone(),
        });
    }
    if probe.removable != Some(true) && !force {
        return Err(TargetError::NotRemovable(probe.path.clone()));
    }
    Ok(())
}

/// The size the target will have once opened with `requested` (`--size`).
pub fn planned_size(probe: &TargetProbe, requested: Option<u64>) -> Result<u64, TargetError> {
    match (probe.kind, requested) {
        (TargetKind::BlockDevice, Some(_)) => Err(TargetError::SizeOnDevice(probe.path.clone())),
        (TargetKind::BlockDevice, None) => Ok(probe.size),
        (TargetKind::ImageFile, None) if !probe.exists => {
            Err(TargetError::NeedSize(probe.path.clone()))
        }
        (TargetKind::ImageFile, None) => Ok(probe.size),
        (TargetKind::ImageFile, Some(size)) if probe.exists && size < probe.size => {
            Err(TargetError::WouldShrink {
                path: probe.path.clone(),
                requested: size,
                current: probe.size,
            })
        }
        (TargetKind::ImageFile, Some(size)) => Ok(size),
    }
}

/// Opens the target for writing: creates or grows an image file to `size`, or
/// opens a block device exclusively (a guard against automounters).
pub fn open_for_write(probe: &TargetProbe, size: u64) -> Result<File, TargetError> {
    let path = &probe.path;
    match probe.kind {
        TargetKind::ImageFile => {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(io_err(path))?;
            if file.metadata().map_err(io_err(path))?.len() < size {
                file.set_len(size).map_err(io_err(path))?;
            }
            Ok(file)
        }
        TargetKind::BlockDevice => OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_EXCL)
            .open(path)
            .map_err(io_err(path)),
    }
}

/// Opens an existing target for maintenance (read-write, nothing created).
pub fn open_existing(path: &Path, writable: bool) -> Result<(File, TargetProbe), TargetError> {
    let probe = probe(path)?;
    if !probe.exists {
        return Err(TargetError::Io {
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::NotFound, "no such file"),
        });
    }
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .open(&probe.path)
        .map_err(io_err(path))?;
    Ok((file, probe))
}

/// Pushes written data to the medium and drops it from the page cache, so the
/// read-back that follows reads the stick rather than memory.
pub fn sync_and_drop_cache(file: &File, kind: TargetKind) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    file.sync_all()?;
    if kind == TargetKind::BlockDevice {
        nix::ioctl_none!(blkflsbuf, 0x12, 97);
        use std::os::fd::AsRawFd;
        // SAFETY: BLKFLSBUF takes no argument; the fd is a valid open block device.
        let _ = unsafe { blkflsbuf(file.as_raw_fd()) };
    }
    let _ = nix::fcntl::posix_fadvise(
        file.as_raw_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
    Ok(())
}

/// Asks the kernel to re-read the partition table; only a warning when it can't
/// (this machine's kernel parses no tables, and the stick is written by offset).
pub fn reread_partitions(file: &File) -> Result<(), String> {
    nix::ioctl_none!(blkrrpart, 0x12, 95);
    use std::os::fd::AsRawFd;
    // SAFETY: BLKRRPART takes no argument; the fd is a valid open block device.
    unsafe { blkrrpart(file.as_raw_fd()) }
        .map(|_| ())
        .map_err(|e| format!("the kernel could not re-read the partition table ({e}); replug the stick before using it"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_files_are_sized_as_asked() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("new.img");
        let p = probe(&new).unwrap();
        assert!(!p.exists);
        assert!(matches!(
            planned_size(&p, None),
            Err(TargetError::NeedSize(_))
        ));
        assert_eq!(planned_size(&p, Some(1 << 30)).unwrap(), 1 << 30);
        fs::write(&new, vec![0u8; 4096]).unwrap();
        let p = probe(&new).unwrap();
        assert!(matches!(
            planned_size(&p, Some(1024)),
            Err(TargetError::WouldShrink { .. })
        ));
        assert!(matches!(
            probe(dir.path()),
            Err(TargetError::IsDirectory(_))
        ));
        assert!(matches!(
            probe(Path::new("/dev/livestick-no-such-device")),
            Err(TargetError::MissingDevice(_))
        ));
    }
}
