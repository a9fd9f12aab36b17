//! Executes a [`Plan`] on the target, then reads everything back.
//!
//! Write order keeps the stick either bootable-old or clearly incomplete:
//! a new table is wiped first and written last, so a run that stops midway
//! leaves a stick that boots nothing rather than half a live system.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use serde::Serialize;
use thiserror::Error;

use crate::boot::syslinux::{self, SyslinuxFiles};
use crate::disk::fat::{self, FatError};
use crate::disk::partition::{self, PartitionError, TableKind};
use crate::disk::stick::{Stick, StickError};
use crate::disk::target::{self, TargetError, TargetKind, TargetProbe};
use crate::io::{BoundedDirty, PartitionWindow};

/// Dirty data allowed in the page cache for a block device before we wait for
/// it to reach the stick (see [`BoundedDirty`]).
const DIRTY_LIMIT: u64 = 64 << 20;
use crate::plan::{CopySource, Plan};
use crate::progress::Progress;
use crate::source::checksum::hex;
use crate::source::live;

#[derive(Debug, Error)]
pub enum ApplyError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Stick(#[from] StickError),
    #[error("{step}: {source}")]
    Fat { step: String, source: FatError },
    #[error("{step}: {source}")]
    Partition {
        step: String,
        source: PartitionError,
    },
    #[error("installing SYSLINUX: {0}")]
    Syslinux(#[from] syslinux::SyslinuxError),
    #[error("reading {path} from the ISO: {reason}")]
    Source { path: String, reason: String },
    #[error("{step}: {source}")]
    Io { step: String, source: io::Error },
    #[error(
        "read-back verification failed for {path}: wrote sha256 {expected}, read back {actual}; the stick (or its USB connection) is corrupting data — try another stick or port"
    )]
    VerifyMismatch {
        path: String,
        expected: String,
        actual: String,
    },
}

impl ApplyError {
    fn io(step: impl Into<String>) -> impl FnOnce(io::Error) -> ApplyError {
        let step = step.into();
        move |source| ApplyError::Io { step, source }
    }
    fn fat(step: impl Into<String>) -> impl FnOnce(FatError) -> ApplyError {
        let step = step.into();
        move |source| ApplyError::Fat { step, source }
    }
}

/// A file as written and read back.
#[derive(Debug, Clone, Serialize)]
pub struct WrittenFile {
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub verified: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApplyReport {
    pub target: String,
    pub label: String,
    pub fs_uuid: String,
    pub table: TableKind,
    pub formatted: bool,
    pub files: Vec<WrittenFile>,
    pub overlay: Option<String>,
    pub home: Option<String>,
    pub bios: bool,
    pub uefi: bool,
    pub verified: bool,
    pub warnings: Vec<String>,
}

/// Where the bytes of the ISO's files come from: the ISO itself, or (in a
/// batch) a broadcast of one read of it to every target.
pub trait IsoSource {
    /// A reader of the ISO file at `path`, `size` bytes long.
    fn open(&mut self, path: &str, size: u64) -> Result<Box<dyn Read + '_>, ApplyError>;
}

/// Reads the ISO directly.
pub struct DirectIsoSource {
    iso: crate::source::iso::IsoImage<std::io::BufReader<File>>,
}

impl DirectIsoSource {
    pub fn open(path: &Path) -> Result<Self, ApplyError> {
        let iso = live::open_iso(path).map_err(|e| ApplyError::Source {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(DirectIsoSource { iso })
    }
}

impl IsoSource for DirectIsoSource {
    fn open(&mut self, path: &str, _size: u64) -> Result<Box<dyn Read + '_>, ApplyError> {
        let entry = self
            .iso
            .lookup(path)
            .map_err(|e| ApplyError::Source {
                path: path.to_string(),
                reason: e.to_string(),
            })?
            .ok_or_else(|| ApplyError::Source {
                path: path.to_string(),
                reason: "no longer on the ISO (did the file change?)".into(),
            })?;
        Ok(Box::new(self.iso.open_file(&entry)))
    }
}

impl IsoSource for crate::source::stick_source::StickSource {
    fn open(&mut self, path: &str, _size: u64) -> Result<Box<dyn Read + '_>, ApplyError> {
        let reader = self.reader(path).map_err(|e| ApplyError::Source {
            path: path.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Box::new(reader))
    }
}

/// The right reader for the write's source: the ISO, or another stick.
pub fn open_source(live: &live::LiveImage) -> Result<Box<dyn IsoSource + Send>, ApplyError> {
    match live.source_kind {
        live::SourceKind::Iso => Ok(Box::new(DirectIsoSource::open(&live.path)?)),
        live::SourceKind::Stick => Ok(Box::new(
            crate::source::stick_source::StickSource::open(&live.path).map_err(|e| {
                ApplyError::Source {
                    path: live.path.display().to_string(),
                    reason: e.to_string(),
                }
            })?,
        )),
    }
}

/// Inputs prepared before the target is touched (they can fail on their own).
pub struct Prepared {
    /// The home image, exactly `plan.home.size` bytes (plain ext4 or LUKS).
    pub home: Option<Box<dyn Read + Send>>,
    /// The swap image, exactly `plan.swap.size` bytes.
    pub swap: Option<Box<dyn Read + Send>>,
    /// The overlay's content when it is not a fresh dm-snapshot store
    /// (an OverlayFS ext4 image), exactly `plan.overlay.size` bytes.
    pub overlay_image: Option<File>,
    pub syslinux: Option<SyslinuxFiles>,
}

pub struct ApplyOptions {
    pub verify_write: bool,
}

/// Writes the plan to the target.
pub fn apply(
    plan: &Plan,
    probe: &TargetProbe,
    source: &mut dyn IsoSource,
    mut prepared: Prepared,
    options: &ApplyOptions,
    progress: &Progress,
) -> Result<ApplyReport, ApplyError> {
    let mut warnings = Vec::new();
    let mut file = target::open_for_write(probe, plan.target.size)?;
    let start = plan.partition_start;
    let len = plan.partition_len;

    if plan.format.is_some() {
        partition::wipe_tables(&mut file, plan.target.size).map_err(|source| {
            ApplyError::Partition {
                step: "clearing the old partition table".into(),
                source,
            }
        })?;
    }

    let mut written: Vec<(String, u64, [u8; 32])> = Vec::new();
    {
        let dirty_limit = match probe.kind {
            TargetKind::BlockDevice => DIRTY_LIMIT,
            TargetKind::ImageFile => 0,
        };
        let mut bounded = BoundedDirty::new(&mut file, dirty_limit);
        let mut window = PartitionWindow::new(&mut bounded, start, len);
        if plan.format.is_some() {
            let hidden = u32::try_from(start / partition::SECTOR).unwrap_or(u32::MAX);
            fat::format(&mut window, &plan.label, plan.volume_id, hidden)
                .map_err(ApplyError::fat("formatting the FAT32 filesystem"))?;
        }
        if let Some(label) = &plan.relabel {
            fat::set_label(&mut window, label).map_err(ApplyError::fat(format!(
                "relabelling the filesystem to {label}"
            )))?;
        }
        let fs = fat::open(&mut window).map_err(ApplyError::fat("opening the FAT filesystem"))?;
        for path in &plan.deletes {
            fat::remove_all(&fs, path).map_err(ApplyError::fat(format!("deleting {path}")))?;
        }
        if let Some(kept) = &plan.kept_overlay {
            if !kept.from.eq_ignore_ascii_case(&kept.to) {
                fat::rename(&fs, &kept.from, &kept.to).map_err(ApplyError::fat(format!(
                    "renaming the overlay {} to {}",
                    kept.from, kept.to
                )))?;
            }
            if kept.reset {
                fat::reset_overlay_header(&fs, &kept.to)
                    .map_err(ApplyError::fat(format!("emptying the overlay {}", kept.to)))?;
            }
        }

        let total = plan.bytes_to_write;
        progress.phase("write", total);
        for copy in &plan.copies {
            let step = format!("writing {}", copy.dest);
            let sum = match &copy.source {
                CopySource::Iso { path } => {
                    let mut reader = source.open(path, copy.size)?;
                    fat::write_file(&fs, &copy.dest, &mut reader, copy.size, |n| progress.inc(n))
                        .map_err(ApplyError::fat(step))?
                }
                CopySource::Host { path } => {
                    let mut host = File::open(path)
                        .map_err(ApplyError::io(format!("reading {}", path.display())))?;
                    fat::write_file(&fs, &copy.dest, &mut host, copy.size, |n| progress.inc(n))
                        .map_err(ApplyError::fat(step))?
                }
            };
            written.push((copy.dest.clone(), copy.size, sum));
        }
        if let Some(overlay) = &plan.overlay {
            let step = format!("allocating the overlay {}", overlay.path);
            let sum = match prepared.overlay_image.as_mut() {
                Some(image) => {
                    image
                        .seek(SeekFrom::Start(0))
                        .map_err(ApplyError::io(step.clone()))?;
                    fat::write_file(&fs, &overlay.path, image, overlay.size, |n| progress.inc(n))
                        .map_err(ApplyError::fat(step))?
                }
                // All zeros: chunk 0 zeroed is what the kernel reads as a new store.
                None => fat::write_zeros(&fs, &overlay.path, overlay.size, |n| progress.inc(n))
                    .map_err(ApplyError::fat(step))?,
            };
            written.push((overlay.path.clone(), overlay.size, sum));
        }
        for (step_name, target_path, size, image) in [
            (
                "home image",
                plan.home.as_ref().map(|h| h.path.clone()),
                plan.home.as_ref().map_or(0, |h| h.size),
                prepared.home.as_mut(),
            ),
            (
                "swap image",
                plan.swap.as_ref().map(|s| s.path.clone()),
                plan.swap.as_ref().map_or(0, |s| s.size),
                prepared.swap.as_mut(),
            ),
        ] {
            let (Some(path), Some(image)) = (target_path, image) else {
                continue;
            };
            let step = format!("writing the {step_name} {path}");
            let mut limited = image.take(size);
            let sum = fat::write_file(&fs, &path, &mut limited, size, |n| progress.inc(n))
                .map_err(ApplyError::fat(step))?;
            written.push((path, size, sum));
        }
        for config in &plan.configs {
            let step = format!("writing {}", config.dest);
            let bytes = config.content.as_bytes();
            let sum = fat::write_file(
                &fs,
                &config.dest,
                &mut &bytes[..],
                bytes.len() as u64,
                |_| {},
            )
            .map_err(ApplyError::fat(step))?;
            written.push((config.dest.clone(), bytes.len() as u64, sum));
        }
        fs.unmount()
            .map_err(ApplyError::io("closing the FAT filesystem"))?;
        window
            .flush()
            .map_err(ApplyError::io("flushing the FAT filesystem"))?;
        fat::repair_fatfs_quirks(&mut window)
            .map_err(ApplyError::fat("finishing the FAT filesystem"))?;
    }
    file.sync_all()
        .map_err(ApplyError::io("syncing the target"))?;

    if plan.bios
        && let Some(files) = &prepared.syslinux
    {
        progress.note("installing SYSLINUX");
        syslinux::install(files, &probe.path, start, "/syslinux")?;
        let mut window = PartitionWindow::new(&mut file, start, len);
        fat::sync_backup_boot_sector(&mut window)
            .map_err(ApplyError::fat("updating the backup boot sector"))?;
    }

    let mut verified = false;
    if options.verify_write {
        target::sync_and_drop_cache(&file, probe.kind)
            .map_err(ApplyError::io("syncing before verification"))?;
        let total: u64 = written.iter().map(|w| w.1).sum();
        progress.phase("verify", total);
        let mut window = PartitionWindow::new(&mut file, start, len);
        let fs = fat::open(&mut window)
            .map_err(ApplyError::fat("reopening the FAT filesystem to verify"))?;
        for (path, _, expected) in &written {
            let (actual, _) = fat::hash_file(&fs, path, |n| progress.inc(n))
                .map_err(ApplyError::fat(format!("reading back {path}")))?;
            if &actual != expected {
                return Err(ApplyError::VerifyMismatch {
                    path: path.clone(),
                    expected: hex(expected),
                    actual: hex(&actual),
                });
            }
        }
        drop(fs);
        verified = true;
    }

    // Boot-critical bytes last.
    let boot_code = prepared.syslinux.as_ref().map(|s| match plan.table {
        TableKind::Mbr => s.mbr,
        TableKind::Gpt => s.gptmbr,
    });
    let boot_code = if plan.bios { boot_code } else { None };
    match &plan.format {
        Some(layout) => {
            partition::write_table(&mut file, layout, boot_code.as_ref(), plan.volume_id).map_err(
                |source| ApplyError::Partition {
                    step: "writing the partition table".into(),
                    source,
                },
            )?
        }
        None => {
            if let Some(code) = boot_code {
                write_boot_code(&mut file, &code, plan)
                    .map_err(ApplyError::io("writing the MBR boot code"))?;
            }
        }
    }
    file.sync_all()
        .map_err(ApplyError::io("syncing the target"))?;
    if probe.kind == TargetKind::BlockDevice
        && let Err(warning) = target::reread_partitions(&file)
    {
        warnings.push(warning);
    }
    progress.finish();

    Ok(ApplyReport {
        target: probe.path.display().to_string(),
        label: plan.label.clone(),
        fs_uuid: plan.fs_uuid.clone(),
        table: plan.table,
        formatted: plan.format.is_some(),
        files: written
            .iter()
            .map(|(path, size, sum)| WrittenFile {
                path: path.clone(),
                size: *size,
                sha256: hex(sum),
                verified,
            })
            .collect(),
        overlay: plan.overlay.as_ref().map(|o| o.path.clone()),
        home: plan.home.as_ref().map(|h| h.path.clone()),
        bios: plan.bios,
        uefi: plan.uefi,
        verified,
        warnings,
    })
}

/// On an existing stick: MBR boot code into the first 440 bytes, keeping the
/// table, and (MBR) the boot flag on our partition.
fn write_boot_code(file: &mut File, code: &[u8; 440], plan: &Plan) -> io::Result<()> {
    file.seek(SeekFrom::Start(0))?;
    file.write_all(code)?;
    if plan.table == TableKind::Mbr {
        let mut table = [0u8; 64];
        file.seek(SeekFrom::Start(446))?;
        file.read_exact(&mut table)?;
        for i in 0..4 {
            let e = &mut table[i * 16..(i + 1) * 16];
            let lba = u32::from_le_bytes([e[8], e[9], e[10], e[11]]) as u64;
            e[0] = if lba * partition::SECTOR == plan.partition_start {
                0x80
            } else {
                0
            };
        }
        file.seek(SeekFrom::Start(446))?;
        file.write_all(&table)?;
    }
    file.flush()
}

/// Reads what an existing stick's FAT partition holds, for planning without `--format`.
pub fn read_existing(path: &Path) -> Result<Option<crate::plan::ExistingFs>, ApplyError> {
    let mut stick = match Stick::open(path, false) {
        Ok(stick) => stick,
        Err(StickError::Partition {
            source: PartitionError::NoTable,
            ..
        }) => return Ok(None),
        Err(source) => return Err(ApplyError::Stick(source)),
    };
    let part = stick.partition.clone();
    let existing = stick.with_fs(|fs| {
        let read_text = |path: &str| {
            fat::exists(fs, path)
                .then(|| fat::read_file(fs, path).ok())
                .flatten()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
        };
        Ok(crate::plan::ExistingFs {
            syslinux_cfg: read_text("/syslinux/syslinux.cfg"),
            grub_cfg: read_text("/EFI/BOOT/grub.cfg"),
            table: part.table,
            partition_start: part.start,
            partition_len: part.len,
            label: fs.volume_label().trim_end().to_string(),
            volume_id: fs.volume_id(),
            cluster_size: fs.cluster_size() as u64,
            free_bytes: fat::free_bytes(fs).map_err(|source| StickError::Fat {
                path: path.to_path_buf(),
                source,
            })?,
            files: fat::walk_files(fs, "")
                .into_iter()
                .map(|e| (e.path, e.size))
                .collect(),
        })
    })?;
    Ok(Some(existing))
}
