//! Partition tables: the single-FAT-partition layout livestick creates, and
//! finding the FAT partition on a stick that already exists.
//!
//! MBR is written with `mbrman`, GPT with `gpt`; both through any
//! `Read + Write + Seek`, so tests run on plain files.

use std::io::{Read, Seek, SeekFrom, Write};

use serde::Serialize;
use thiserror::Error;

pub const SECTOR: u64 = 512;
/// Partitions start at 1 MiB: aligned for every flash erase block in practice,
/// and leaves the post-MBR gap that boot loaders expect.
pub const ALIGN: u64 = 1 << 20;
/// Room GPT needs at the end of the disk for the backup entries and header.
const GPT_TAIL: u64 = 33 * SECTOR;

/// MBR type for FAT32 with LBA addressing.
pub const MBR_FAT32_LBA: u8 = 0x0c;
const MBR_FAT_TYPES: [u8; 6] = [0x01, 0x04, 0x06, 0x0b, 0x0c, 0x0e];
const MBR_EFI_SYSTEM: u8 = 0xef;
const MBR_PROTECTIVE: u8 = 0xee;
/// GPT attribute bit 2, "legacy BIOS bootable": gptmbr.bin boots the partition that has it.
const GPT_LEGACY_BIOS_BOOTABLE: u64 = 1 << 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    Mbr,
    Gpt,
}

impl std::fmt::Display for TableKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TableKind::Mbr => "MBR",
            TableKind::Gpt => "GPT",
        })
    }
}

/// Where the one FAT partition goes, in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionLayout {
    pub table: TableKind,
    pub disk_size: u64,
    pub start: u64,
    pub len: u64,
}

/// A FAT partition found on an existing stick.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExistingPartition {
    pub table: TableKind,
    /// 1-based, as `sfdisk` and the kernel number them.
    pub number: u32,
    pub start: u64,
    pub len: u64,
}

#[derive(Debug, Error)]
pub enum PartitionError {
    #[error(
        "the target holds {size} bytes, too small for a partition table and a FAT32 partition \
         (at least {min} bytes are needed)"
    )]
    DiskTooSmall { size: u64, min: u64 },
    #[error("the target has no partition table; write it with --format to create one")]
    NoTable,
    #[error(
        "the target's partition table has no FAT partition; write it with --format \
         (this erases the stick) or pick another target"
    )]
    NoFatPartition,
    #[error(
        "partition {number} lies outside the target ({end} > {size} bytes); the table is damaged — use --format"
    )]
    OutsideDisk { number: u32, end: u64, size: u64 },
    #[error("MBR: {0}")]
    Mbr(#[from] mbrman::Error),
    #[error("GPT: {0}")]
    Gpt(String),
    #[error("I/O error on the partition table: {0}")]
    Io(#[from] std::io::Error),
}

impl crate::error::Classify for PartitionError {
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::Io
    }
}

/// The smallest disk a single FAT32 partition can live on (FAT32 needs 65525 clusters).
pub const MIN_DISK: u64 = ALIGN + 65_536 * 512 + ALIGN;

/// Lays out one partition from 1 MiB to the end of the disk (less the GPT tail),
/// its length rounded down to whole MiB so the filesystem ends aligned too.
pub fn layout_single(disk_size: u64, table: TableKind) -> Result<PartitionLayout, PartitionError> {
    let tail = match table {
        TableKind::Mbr => 0,
        TableKind::Gpt => GPT_TAIL,
    };
    if disk_size < MIN_DISK {
        return Err(PartitionError::DiskTooSmall {
            size: disk_size,
            min: MIN_DISK,
        });
    }
    let usable_end = (disk_size - tail) / ALIGN * ALIGN;
    // MBR holds 32-bit sector counts: partitions end at 2 TiB there.
    let usable_end = match table {
        TableKind::Mbr => usable_end.min(u32::MAX as u64 * SECTOR / ALIGN * ALIGN),
        TableKind::Gpt => usable_end,
    };
    Ok(PartitionLayout {
        table,
        disk_size,
        start: ALIGN,
        len: usable_end - ALIGN,
    })
}

/// Writes the partition table for `layout` with `boot_code` (the 440 bytes of
/// `mbr.bin` or `gptmbr.bin`) in the MBR. This is the last write of a stick, so
/// a run that fails earlier leaves no table that points at half a filesystem.
pub fn write_table<D: Read + Write + Seek + std::fmt::Debug>(
    disk: &mut D,
    layout: &PartitionLayout,
    boot_code: Option<&[u8; 440]>,
    disk_id: u32,
) -> Result<(), PartitionError> {
    let first_lba = layout.start / SECTOR;
    let sectors = layout.len / SECTOR;
    match layout.table {
        TableKind::Mbr => {
            let mut mbr = mbrman::MBR::new_from(disk, SECTOR as u32, disk_id.to_le_bytes())?;
            if let Some(code) = boot_code {
                mbr.header.bootstrap_code = *code;
            }
            mbr[1] = mbrman::MBRPartitionEntry {
                boot: mbrman::BOOT_ACTIVE,
                first_chs: mbrman::CHS::empty(),
                sys: MBR_FAT32_LBA,
                last_chs: mbrman::CHS::empty(),
                starting_lba: first_lba as u32,
                sectors: sectors as u32,
            };
            mbr.write_into(disk)?;
        }
        TableKind::Gpt => {
            let guid = uuid::Uuid::from_u128(u128::from(disk_id) << 96 | 0x4c53_5449_434b);
            let mut gpt = gpt::GptConfig::new()
                .writable(true)
                .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
                .create_from_device(&mut *disk, Some(guid))
                .map_err(|e| PartitionError::Gpt(e.to_string()))?;
            gpt.add_partition_at(
                "LIVE",
                1,
                first_lba,
                sectors,
                gpt::partition_types::EFI,
                GPT_LEGACY_BIOS_BOOTABLE,
            )
            .map_err(|e| PartitionError::Gpt(e.to_string()))?;
            gpt.write()
                .map_err(|e| PartitionError::Gpt(e.to_string()))?;
            let mut pmbr = gpt::mbr::ProtectiveMBR::with_lb_size(
                u32::try_from(layout.disk_size / SECTOR - 1).unwrap_or(u32::MAX),
            );
            if let Some(code) = boot_code {
                pmbr.set_bootcode(*code);
            }
            pmbr.set_disk_signature(disk_id.to_le_bytes());
            pmbr.overwrite_lba0(disk)
                .map_err(|e| PartitionError::Gpt(e.to_string()))?;
        }
    }
    disk.flush()?;
    Ok(())
}

/// Erases the partition tables at both ends of the disk, so that a stick whose
/// write is interrupted has no table at all rather than a stale one.
pub fn wipe_tables<D: Write + Seek>(disk: &mut D, disk_size: u64) -> Result<(), PartitionError> {
    let zeros = vec![0u8; (ALIGN as usize).min(disk_size as usize)];
    disk.seek(SeekFrom::Start(0))?;
    disk.write_all(&zeros)?;
    if disk_size > ALIGN + GPT_TAIL {
        disk.seek(SeekFrom::Start(disk_size - GPT_TAIL))?;
        disk.write_all(&zeros[..GPT_TAIL as usize])?;
    }
    disk.flush()?;
    Ok(())
}

/// Finds the FAT partition livestick installs into: the first FAT (or EFI
/// system) partition of an MBR or GPT disk.
pub fn find_fat_partition<D: Read + Seek>(
    disk: &mut D,
    disk_size: u64,
) -> Result<ExistingPartition, PartitionError> {
    let mut sector0 = [0u8; 512];
    disk.seek(SeekFrom::Start(0))?;
    disk.read_exact(&mut sector0)?;
    if sector0[510..512] != [0x55, 0xaa] {
        return Err(PartitionError::NoTable);
    }
    let entries: Vec<(u8, u64, u64)> = (0..4)
        .map(|i| {
            let e = &sector0[446 + 16 * i..446 + 16 * (i + 1)];
            let start = u32::from_le_bytes([e[8], e[9], e[10], e[11]]) as u64;
            let len = u32::from_le_bytes([e[12], e[13], e[14], e[15]]) as u64;
            (e[4], start * SECTOR, len * SECTOR)
        })
        .collect();
    if entries.iter().any(|(t, _, _)| *t == MBR_PROTECTIVE) {
        return find_gpt_fat(disk, disk_size);
    }
    if entries.iter().all(|(t, _, l)| *t == 0 || *l == 0) {
        return Err(PartitionError::NoTable);
    }
    for (i, (sys, start, len)) in entries.iter().enumerate() {
        if MBR_FAT_TYPES.contains(sys) || *sys == MBR_EFI_SYSTEM {
            let number = i as u32 + 1;
            check_inside(number, *start, *len, disk_size)?;
            return Ok(ExistingPartition {
                table: TableKind::Mbr,
                number,
                start: *start,
                len: *len,
            });
        }
    }
    Err(PartitionError::NoFatPartition)
}

fn check_inside(number: u32, start: u64, len: u64, size: u64) -> Result<(), PartitionError> {
    let end = start.saturating_add(len);
    if end > size || len == 0 {
        return Err(PartitionError::OutsideDisk { number, end, size });
    }
    Ok(())
}

fn find_gpt_fat<D: Read + Seek>(
    disk: &mut D,
    disk_size: u64,
) -> Result<ExistingPartition, PartitionError> {
    // Read the primary header and entries directly: a stick only needs the
    // partition's extent, and this stays a pure function over Read + Seek.
    let mut header = [0u8; 92];
    disk.seek(SeekFrom::Start(SECTOR))?;
    disk.read_exact(&mut header)?;
    if &header[0..8] != b"EFI PART" {
        return Err(PartitionError::Gpt(
            "protective MBR but no GPT header at LBA 1; the table is damaged — use --format".into(),
        ));
    }
    let entries_lba = u64::from_le_bytes(header[72..80].try_into().unwrap_or([0; 8]));
    let count = u32::from_le_bytes(header[80..84].try_into().unwrap_or([0; 4])).min(1024);
    let entry_size = u32::from_le_bytes(header[84..88].try_into().unwrap_or([0; 4])) as u64;
    if !(128..=4096).contains(&entry_size) {
        return Err(PartitionError::Gpt(format!(
            "partition entry size {entry_size} is invalid; the table is damaged — use --format"
        )));
    }
    let basic = uuid_bytes_le("EBD0A0A2-B9E5-4433-87C0-68B6B72699C7");
    let esp = uuid_bytes_le("C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
    let mut entry = vec![0u8; entry_size as usize];
    for i in 0..count as u64 {
        disk.seek(SeekFrom::Start(entries_lba * SECTOR + i * entry_size))?;
        disk.read_exact(&mut entry)?;
        let type_guid = &entry[0..16];
        if type_guid == basic || type_guid == esp {
            let first = u64::from_le_bytes(entry[32..40].try_into().unwrap_or([0; 8]));
            let last = u64::from_le_bytes(entry[40..48].try_into().unwrap_or([0; 8]));
            let number = i as u32 + 1;
            let start = first * SECTOR;
            let len = (last + 1).saturating_sub(first) * SECTOR;
            check_inside(number, start, len, disk_size)?;
            return Ok(ExistingPartition {
                table: TableKind::Gpt,
                number,
                start,
                len,
            });
        }
    }
    Err(PartitionError::NoFatPartition)
}

/// A GUID as stored on disk (mixed endian), from its text form.
fn uuid_bytes_le(text: &str) -> [u8; 16] {
    uuid::Uuid::parse_str(text)
        .map(|u| u.to_bytes_le())
        .unwrap_or([0; 16])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(size: u64) -> std::fs::File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(size).unwrap();
        f
    }

    #[test]
    fn layout_is_aligned_and_leaves_gpt_tail() {
        let l = layout_single(100 << 20, TableKind::Gpt).unwrap();
        assert_eq!(l.start, ALIGN);
        assert_eq!(l.len, 98 << 20);
        let l = layout_single(100 << 20, TableKind::Mbr).unwrap();
        assert_eq!(l.len, 99 << 20);
        assert!(matches!(
            layout_single(1 << 20, TableKind::Mbr),
            Err(PartitionError::DiskTooSmall { .. })
        ));
    }

    #[test]
    fn written_tables_are_found_again() {
        for table in [TableKind::Mbr, TableKind::Gpt] {
            let size = 64 << 20;
            let mut d = disk(size);
            let layout = layout_single(size, table).unwrap();
            write_table(&mut d, &layout, Some(&[0x90; 440]), 0x1234_5678).unwrap();
            let found = find_fat_partition(&mut d, size).unwrap();
            assert_eq!(found.table, table);
            assert_eq!(found.number, 1);
            assert_eq!((found.start, found.len), (layout.start, layout.len));
            let mut code = [0u8; 440];
            d.seek(SeekFrom::Start(0)).unwrap();
            d.read_exact(&mut code).unwrap();
            assert_eq!(code, [0x90; 440]);
            wipe_tables(&mut d, size).unwrap();
            assert!(matches!(
                find_fat_partition(&mut d, size),
                Err(PartitionError::NoTable)
            ));
        }
    }
}
