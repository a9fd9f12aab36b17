//! An existing live stick (block device or image file): its FAT partition and
//! the live files on it, for maintenance commands and re-provisioning.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use thiserror::Error;

use crate::disk::fat::{self, FatError, FatFs};
use crate::disk::partition::{self, ExistingPartition, PartitionError};
use crate::disk::target::{self, TargetError, TargetKind, TargetProbe};
use crate::io::{IoAt, PartitionWindow, io_at};
use crate::layout;

#[derive(Debug, Error)]
pub enum StickError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("{path}: {source}")]
    Partition {
        path: PathBuf,
        source: PartitionError,
    },
    #[error("{path}: {source}")]
    Fat { path: PathBuf, source: FatError },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} has no {live_dir}/squashfs.img: it is not a live stick (write one with `livestick write`)"
    )]
    NotLive { path: PathBuf, live_dir: String },
    #[error("{path}: {message}")]
    Layout { path: PathBuf, message: String },
}

impl crate::error::Classify for StickError {
    fn kind(&self) -> crate::error::ErrorKind {
        match self {
            StickError::Io { source, .. } => crate::error::open_failure_kind(source),
            StickError::Target(e) => crate::error::Classify::kind(e),
            StickError::Partition { source, .. } => crate::error::Classify::kind(source),
            _ => crate::error::ErrorKind::Io,
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            StickError::Io { source, .. } => crate::error::open_failure_hint(source),
            StickError::Target(e) => crate::error::Classify::hint(e),
            StickError::Partition { source, .. } => crate::error::Classify::hint(source),
            _ => self.kind().hint(),
        }
    }
}

impl From<IoAt> for StickError {
    fn from(IoAt { path, source }: IoAt) -> Self {
        StickError::Io { path, source }
    }
}

/// The live files found on a stick.
#[derive(Debug, Clone, Serialize)]
pub struct StickInfo {
    pub path: PathBuf,
    pub label: String,
    pub fs_uuid: String,
    pub live_dir: String,
    pub partition: ExistingPartition,
    pub squashfs: Option<u64>,
    /// `overlay-<LABEL>-<UUID>` as dracut will look for it.
    pub expected_overlay: String,
    /// Overlay files present (path, size); normally just the expected one.
    pub overlays: Vec<(String, u64)>,
    pub home: Option<u64>,
    pub swap: Option<u64>,
    pub free_bytes: u64,
}

impl StickInfo {
    /// The overlay dracut will use, if present.
    pub fn overlay(&self) -> Option<&(String, u64)> {
        self.overlays
            .iter()
            .find(|(p, _)| p == &self.expected_overlay)
    }

    /// Overlays whose name no longer matches the label/UUID: dracut ignores
    /// them, so their changes are orphaned.
    pub fn orphaned_overlays(&self) -> Vec<&(String, u64)> {
        self.overlays
            .iter()
            .filter(|(p, _)| p != &self.expected_overlay)
            .collect()
    }
}

/// An opened stick.
pub struct Stick {
    pub path: PathBuf,
    pub probe: TargetProbe,
    pub partition: ExistingPartition,
    file: File,
    writable: bool,
}

/// Whether `path` looks like a stick (a block device, or an image file with a
/// partition table holding a FAT partition) rather than a bare overlay file.
pub fn looks_like_stick(path: &Path) -> bool {
    let Ok(probe) = target::probe(path) else {
        return false;
    };
    if probe.kind == TargetKind::BlockDevice {
        return true;
    }
    let Ok(mut file) = target::open_path(path, false) else {
        return false;
    };
    partition::find_fat_partition(&mut file, probe.size).is_ok()
}

impl Stick {
    pub fn open(path: &Path, writable: bool) -> Result<Stick, StickError> {
        let probe = target::probe(path)?;
        if !probe.exists {
            let missing = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
            return Err(io_at(path)(missing).into());
        }
        // Changed through the same safety checks and O_EXCL as `write`.
        let mut file = target::open_existing(&probe, writable)?;
        let partition = partition::find_fat_partition(&mut file, probe.size).map_err(|source| {
            StickError::Partition {
                path: path.to_path_buf(),
                source,
            }
        })?;
        let mut stick = Stick {
            path: path.to_path_buf(),
            probe,
            partition,
            file,
            writable,
        };
        if writable {
            stick.refuse_a_volume_past_its_partition()?;
        }
        Ok(stick)
    }

    /// The maintenance commands and a write without `--format` change clusters by
    /// their place on the device, which the boot sector gives; a volume that claims
    /// more than its partition (a partition shrunk under it, a damaged boot sector)
    /// would have them write into whatever follows. Refused before anything is
    /// written. A layout livestick does not read is left to its other checks.
    pub fn refuse_a_volume_past_its_partition(&mut self) -> Result<(), StickError> {
        let partition = &self.partition;
        let partition_end = partition.start + partition.len;
        let refusal = match crate::disk::fat_raw::volume_end(&mut self.file, partition.start) {
            Ok(end) if end > partition_end => FatError::Damaged(format!(
                "it reaches {} bytes past the end of partition {} ({} bytes): \
                 the partition was made smaller than its filesystem",
                end - partition_end,
                partition.number,
                partition.len
            )),
            Err(crate::disk::fat_raw::SwapError::Io(e)) => FatError::Io(e),
            _ => return Ok(()),
        };
        Err(StickError::Fat {
            path: self.path.clone(),
            source: refusal,
        })
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Runs `f` on the stick's FAT filesystem, then closes it cleanly (flushes,
    /// fixes fatfs's quirks, syncs) when the stick is writable.
    pub fn with_fs<T>(
        &mut self,
        f: impl FnOnce(&FatFs<'_, &mut File>) -> Result<T, StickError>,
    ) -> Result<T, StickError> {
        let path = self.path.clone();
        let fat_err = |source| StickError::Fat {
            path: path.clone(),
            source,
        };
        let (start, len) = (self.partition.start, self.partition.len);
        let mut window = PartitionWindow::new(&mut self.file, start, len);
        let result = {
            // Read-only, a recounted FSInfo stays in memory: the window is not flushed.
            let fs = fat::open_in_use(&mut window).map_err(fat_err)?;
            let result = f(&fs);
            if self.writable {
                fs.unmount().map_err(io_at(&path))?;
            }
            result
        };
        if self.writable {
            window.flush().map_err(io_at(&path))?;
            fat::repair_fatfs_quirks(&mut window).map_err(fat_err)?;
            self.file.sync_all().map_err(io_at(&path))?;
        }
        result
    }

    /// What live files the stick holds.
    pub fn info(&mut self, live_dir: &str) -> Result<StickInfo, StickError> {
        let path = self.path.clone();
        let partition = self.partition.clone();
        let dir = format!("/{live_dir}");
        let writable = self.writable;
        self.writable = false;
        let result = self.with_fs(|fs| {
            let label = fs.volume_label().trim_end().to_string();
            let fs_uuid = fat::format_volume_id(fs.volume_id());
            let entries = fat::list_dir(fs, &dir);
            let size_of = |name: &str| {
                entries
                    .iter()
                    .find(|e| !e.is_dir && e.path.eq_ignore_ascii_case(&format!("{dir}/{name}")))
                    .map(|e| e.size)
            };
            let overlays = entries
                .iter()
                .filter(|e| {
                    !e.is_dir
                        && e.path
                            .rsplit('/')
                            .next()
                            .is_some_and(layout::is_overlay_name)
                })
                .map(|e| (e.path.clone(), e.size))
                .collect();
            Ok(StickInfo {
                path: path.clone(),
                expected_overlay: format!("{dir}/{}", layout::overlay_name(&label, &fs_uuid)),
                label,
                fs_uuid,
                live_dir: live_dir.to_string(),
                partition: partition.clone(),
                squashfs: size_of(layout::SQUASHFS),
                overlays,
                home: size_of(layout::HOME),
                swap: size_of(layout::SWAP),
                free_bytes: fat::free_bytes(fs).map_err(|source| StickError::Fat {
                    path: path.clone(),
                    source,
                })?,
            })
        });
        self.writable = writable;
        result
    }

    /// The byte extents of a file on the stick, in stick (device) offsets: lets
    /// external tools read a file in place (`unsquashfs -o`) and lets
    /// maintenance code patch a contiguous file directly.
    pub fn file_extents(&mut self, path: &str) -> Result<Vec<(u64, u64)>, StickError> {
        crate::disk::fat_raw::file_extents(&mut self.file, self.partition.start, path).map_err(
            |e| StickError::Layout {
                path: self.path.clone(),
                message: e.to_string(),
            },
        )
    }

    /// Direct access to the device/image (for reading file extents).
    pub fn file_mut(&mut self) -> &mut File {
        &mut self.file
    }

    /// Reads `len` bytes at absolute `offset` of the stick.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.seek(SeekFrom::Start(offset))?;
        self.file.read_exact(buf)
    }

    /// Writes at absolute `offset` of the stick (writable sticks only).
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        self.file.seek(SeekFrom::Start(offset))?;
        self.file.write_all(buf)
    }
}
