//! Partition tables: the single-FAT-partition layout livestick creates, and
//! finding the FAT partition on a stick that already exists.
//!
//! MBR is written with `mbrman`, GPT with `gpt`; both through any
//! `Read + Write + Seek`, so tests run on plain files.

use std::io::{self, Read, Seek, SeekFrom, Write};

use serde::Serialize;
use thiserror::Error;

use crate::bytes::{u16_at, u32_at, u64_at};
use crate::io::read_at;

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
        match self {
            // What the target holds, not a failing device: the user picked a disk
            // that is no stick (yet).
            PartitionError::DiskTooSmall { .. }
            | PartitionError::NoTable
            | PartitionError::NoFatPartition
            | PartitionError::OutsideDisk { .. } => crate::error::ErrorKind::BadInput,
            _ => crate::error::ErrorKind::Io,
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            PartitionError::NoTable
            | PartitionError::NoFatPartition
            | PartitionError::OutsideDisk { .. } => {
                "nothing was written; --format makes a new partition table and FAT32 file system (it erases the whole target), or pick the stick you meant"
            }
            PartitionError::DiskTooSmall { .. } => {
                "nothing was written; use a bigger stick or image (--size for an image file)"
            }
            _ => self.kind().hint(),
        }
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

/// Sets "legacy BIOS bootable" (attribute bit 2, which `gptmbr.bin` boots by) on the
/// GPT entry of the partition starting at byte `start`, in the primary table and in
/// the backup, with their CRCs. Every other entry, and the order of all of them,
/// stays as it is (a table rewritten whole would renumber a foreign table's
/// partitions). `Ok(false)` when every readable table already had it: nothing is
/// written then.
pub fn set_gpt_legacy_bios_bootable<D: Read + Write + Seek>(
    disk: &mut D,
    start: u64,
) -> Result<bool, PartitionError> {
    let primary = read_at(disk, SECTOR, SECTOR as usize)?;
    if primary.len() < GPT_HEADER_LEN || &primary[0..8] != GPT_SIGNATURE {
        return Err(PartitionError::Gpt(
            "the primary GPT header is missing: the table cannot be mended in place".into(),
        ));
    }
    let backup_lba = u64_at(&primary, 32);
    let mut changed = false;
    for lba in [1, backup_lba] {
        let mut header = read_at(disk, lba.saturating_mul(SECTOR), SECTOR as usize)?;
        if header.len() < GPT_HEADER_LEN || &header[0..8] != GPT_SIGNATURE {
            // A missing backup is left missing: firmware reads the primary.
            continue;
        }
        let Some(layout) = GptHeader::parse(&header).filter(GptHeader::entry_size_is_valid) else {
            continue;
        };
        let header_len = (u32_at(&header, 12) as usize).clamp(GPT_HEADER_LEN, header.len());
        let array_at = layout.entries_lba.saturating_mul(SECTOR);
        let array_len = layout.count as usize * layout.entry_size as usize;
        let mut entries = read_at(disk, array_at, array_len)?;
        if entries.len() != array_len {
            continue;
        }
        let Some(entry) = entries
            .chunks_exact_mut(layout.entry_size as usize)
            .find(|e| {
                e[0..16].iter().any(|&b| b != 0) && u64_at(e, 32).saturating_mul(SECTOR) == start
            })
        else {
            return Err(PartitionError::Gpt(format!(
                "no GPT entry starts at byte {start}: the table does not hold the stick's partition"
            )));
        };
        let flags = u64_at(entry, 48);
        if flags & GPT_LEGACY_BIOS_BOOTABLE != 0 {
            continue;
        }
        entry[48..56].copy_from_slice(&(flags | GPT_LEGACY_BIOS_BOOTABLE).to_le_bytes());
        header[88..92].copy_from_slice(&crc32_ieee(&entries).to_le_bytes());
        header[16..20].fill(0);
        let sum = crc32_ieee(&header[..header_len]);
        header[16..20].copy_from_slice(&sum.to_le_bytes());
        disk.seek(SeekFrom::Start(array_at))?;
        disk.write_all(&entries)?;
        disk.seek(SeekFrom::Start(lba * SECTOR))?;
        disk.write_all(&header)?;
        changed = true;
    }
    disk.flush()?;
    Ok(changed)
}

/// CRC-32 (IEEE 802.3, reflected), as GPT checksums its headers and entry arrays.
fn crc32_ieee(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Erases the partition tables at both ends of the disk, so that a stick whose
/// write is interrupted has no table at all rather than a stale one.
pub fn wipe_tables<D: Write + Seek>(disk: &mut D, disk_size: u64) -> Result<(), PartitionError> {
    let zeros = vec![0u8; (ALIGN as usize).min(disk_size as usize)];
    for range in table_ranges(disk_size) {
        disk.seek(SeekFrom::Start(range.start))?;
        disk.write_all(&zeros[..(range.end - range.start) as usize])?;
    }
    disk.flush()?;
    Ok(())
}

/// Where [`wipe_tables`] zeroes: the first MiB (the MBR, a GPT's header and
/// entries, and whatever sits before the first partition) and, on a disk large
/// enough, a GPT backup's place at the end. A caller zeroing more (stale
/// signatures) leaves these out instead of writing them twice.
pub fn table_ranges(disk_size: u64) -> Vec<std::ops::Range<u64>> {
    let mut ranges = vec![0..ALIGN.min(disk_size)];
    if disk_size > ALIGN + GPT_TAIL {
        ranges.push(disk_size - GPT_TAIL..disk_size);
    }
    ranges
}

// ---------------------------------------------------------------------------
// Reading tables.
//
// One hand-written reader serves both the stick writer (`find_fat_partition`)
// and `livestick devices` (`read_table`); mbrman and gpt only write. Reading
// must describe whatever a stick holds without failing: a GPT whose CRCs no
// longer match, a loop in an EBR chain, a table from another tool. gpt 4.1
// rejects a header or entry array whose CRC does not match (and then silently
// takes the backup at the other end of the disk) and needs `Write` even to
// read; mbrman 0.6 unwraps while walking logical partitions and assumes a
// well-formed chain. Neither keeps the listing's promise that one odd device
// never fails it, so the few fields needed are read here, bounds-checked.

/// One entry of an MBR or GPT partition table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableEntry {
    /// 1-based, as the kernel numbers them (MBR logical partitions from 5).
    pub number: u32,
    /// Bytes from the start of the disk.
    #[serde(rename = "start_bytes")]
    pub start: u64,
    #[serde(rename = "size_bytes")]
    pub len: u64,
    /// `0x0c` for MBR, the type GUID for GPT.
    pub type_id: String,
    pub type_name: Option<&'static str>,
    /// GPT partition name.
    pub name: Option<String>,
    /// GPT unique partition GUID (PARTUUID).
    pub part_uuid: Option<String>,
    pub bootable: bool,
}

impl TableEntry {
    /// An MBR extended partition: a container of logical partitions, with no
    /// filesystem of its own.
    pub fn is_extended(&self) -> bool {
        MBR_EXTENDED.iter().any(|t| self.type_id == mbr_type_id(*t))
    }

    /// A partition livestick can install into: FAT or EFI system.
    fn is_fat(&self) -> bool {
        [GPT_BASIC_DATA, GPT_EFI_SYSTEM].contains(&self.type_id.as_str())
            || MBR_FAT_TYPES
                .iter()
                .chain([&MBR_EFI_SYSTEM])
                .any(|t| self.type_id == mbr_type_id(*t))
    }
}

const MBR_EXTENDED: [u8; 3] = [0x05, 0x0f, 0x85];
const MBR_SIGNATURE: [u8; 2] = [0x55, 0xaa];
/// The four primary entries, 16 bytes each, from this offset of sector 0.
const MBR_ENTRIES_AT: usize = 446;
const GPT_SIGNATURE: &[u8; 8] = b"EFI PART";
const GPT_HEADER_LEN: usize = 92;
const GPT_EFI_SYSTEM: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
const GPT_BASIC_DATA: &str = "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7";
/// More entries than any real table has; a damaged count is capped here.
const GPT_MAX_ENTRIES: u32 = 1024;
/// Links followed in an EBR chain: far beyond any real one, and a loop stops.
const EBR_MAX_LINKS: usize = 128;

fn mbr_type_id(t: u8) -> String {
    format!("{t:#04x}")
}

fn mbr_type_name(t: u8) -> Option<&'static str> {
    Some(match t {
        0x01 | 0x04 | 0x06 | 0x0e => "FAT16",
        0x0b | 0x0c => "FAT32",
        0x07 => "NTFS/exFAT",
        0x05 | 0x0f | 0x85 => "extended",
        0x17 | 0x00 => return None,
        0x82 => "Linux swap",
        0x83 => "Linux",
        0x8e => "Linux LVM",
        0xfd => "Linux RAID",
        0xee => "GPT protective",
        0xef => "EFI system",
        _ => return None,
    })
}

fn gpt_type_name(guid: &str) -> Option<&'static str> {
    Some(match guid {
        GPT_EFI_SYSTEM => "EFI system",
        GPT_BASIC_DATA => "Microsoft basic data",
        "0fc63daf-8483-4772-8e79-3d69d8477de4" => "Linux filesystem",
        "21686148-6449-6e6f-744e-656564454649" => "BIOS boot",
        "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f" => "Linux swap",
        "e6d6d379-f507-44c2-a23c-238f2a3df928" => "Linux LVM",
        "a19d880f-05fc-4d3b-a006-743f0f84911e" => "Linux RAID",
        "4f68bce3-e8cd-4db1-96e7-fbcaf984b709" => "Linux root (x86-64)",
        "bc13c2ff-59e6-4262-a352-b275fd6f7172" => "Linux extended boot",
        _ => return None,
    })
}

/// One 16-byte MBR (or EBR) entry as stored.
#[derive(Debug, Clone, Copy)]
struct MbrSlot {
    status: u8,
    kind: u8,
    first_lba: u32,
    sectors: u32,
}

impl MbrSlot {
    fn parse(e: &[u8]) -> MbrSlot {
        MbrSlot {
            status: e.first().copied().unwrap_or(0),
            kind: e.get(4).copied().unwrap_or(0),
            first_lba: u32_at(e, 8),
            sectors: u32_at(e, 12),
        }
    }

    fn is_empty(&self) -> bool {
        self.kind == 0 || self.sectors == 0
    }

    fn entry(&self, number: u32, base: u64, sector: u64) -> TableEntry {
        TableEntry {
            number,
            start: base + u64::from(self.first_lba) * sector,
            len: u64::from(self.sectors) * sector,
            type_id: mbr_type_id(self.kind),
            type_name: mbr_type_name(self.kind),
            name: None,
            part_uuid: None,
            bootable: self.status == 0x80,
        }
    }
}

/// Whether a sector ends in 55 AA, as an MBR, an EBR and a FAT or NTFS boot
/// sector all do.
pub fn has_boot_signature(sector: &[u8]) -> bool {
    sector.get(510..512) == Some(&MBR_SIGNATURE[..])
}

/// The four primary entries of an MBR (or EBR); `None` without the 55 AA signature.
fn mbr_slots(sector0: &[u8]) -> Option<[MbrSlot; 4]> {
    if !has_boot_signature(sector0) {
        return None;
    }
    let slot = |i: usize| MbrSlot::parse(&sector0[MBR_ENTRIES_AT + 16 * i..][..16]);
    Some([slot(0), slot(1), slot(2), slot(3)])
}

/// Whether sector 0 is a filesystem boot sector (a "superfloppy" FAT or NTFS
/// volume without a table) rather than an MBR: both end in 55 AA.
pub fn is_boot_sector(s: &[u8]) -> bool {
    let jump = matches!(s.first(), Some(0xeb) | Some(0xe9));
    let bps = u16_at(s, 11);
    jump && matches!(bps, 512 | 1024 | 2048 | 4096)
        && (s.get(54..57) == Some(b"FAT")
            || s.get(82..85) == Some(b"FAT")
            || s.get(3..7) == Some(b"NTFS"))
}

/// The fields of a GPT header that locate its entries.
#[derive(Debug, Clone, Copy)]
struct GptHeader {
    entries_lba: u64,
    count: u32,
    entry_size: u32,
}

impl GptHeader {
    /// `None` unless the bytes start with the GPT signature.
    fn parse(h: &[u8]) -> Option<GptHeader> {
        if h.len() < GPT_HEADER_LEN || &h[0..8] != GPT_SIGNATURE {
            return None;
        }
        Some(GptHeader {
            entries_lba: u64_at(h, 72),
            count: u32_at(h, 80).min(GPT_MAX_ENTRIES),
            entry_size: u32_at(h, 84),
        })
    }

    fn entry_size_is_valid(&self) -> bool {
        (128..=4096).contains(&self.entry_size)
    }

    /// The used entries (type GUID not zero), and whether the whole array
    /// could be read (a table cut off by the end of the disk cannot).
    fn read_entries<R: Read + Seek + ?Sized>(
        &self,
        r: &mut R,
        sector: u64,
    ) -> io::Result<(Vec<TableEntry>, bool)> {
        let size = self.entry_size as usize;
        let wanted = self.count as usize * size;
        let raw = read_at(r, self.entries_lba.saturating_mul(sector), wanted)?;
        let mut out = Vec::new();
        for (i, e) in raw.chunks_exact(size).enumerate() {
            if e[0..16].iter().all(|&b| b == 0) {
                continue;
            }
            let type_guid = guid_le(&e[0..16]);
            let (first, last) = (u64_at(e, 32), u64_at(e, 40));
            let name_units: Vec<u16> = e[56..128]
                .chunks_exact(2)
                .map(|c| u16_at(c, 0))
                .take_while(|&u| u != 0)
                .collect();
            let name = String::from_utf16_lossy(&name_units);
            out.push(TableEntry {
                number: i as u32 + 1,
                start: first.saturating_mul(sector),
                len: last
                    .checked_sub(first)
                    .map_or(0, |n| n.saturating_add(1).saturating_mul(sector)),
                type_name: gpt_type_name(&type_guid),
                type_id: type_guid,
                name: (!name.is_empty()).then_some(name),
                part_uuid: Some(guid_le(&e[16..32])),
                bootable: u64_at(e, 48) & GPT_LEGACY_BIOS_BOOTABLE != 0,
            });
        }
        Ok((out, raw.len() == wanted))
    }
}

/// A GPT GUID: the first three fields are little-endian on disk.
fn guid_le(b: &[u8]) -> String {
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&b[..16]);
    uuid::Uuid::from_bytes_le(bytes).hyphenated().to_string()
}

/// Reads the MBR (with logical partitions) or GPT of a whole disk, as
/// `livestick devices` shows it: `Ok(None)` when there is no table, and a GPT
/// that cannot be read falls back to the MBR that protects it. `sector` is the
/// logical sector size, which places the GPT header (LBA 1) and scales every LBA.
pub fn read_table<R: Read + Seek + ?Sized>(
    r: &mut R,
    disk_size: u64,
    sector: u64,
) -> io::Result<Option<(TableKind, Vec<TableEntry>)>> {
    let s0 = read_at(r, 0, 512)?;
    let Some(primaries) = mbr_slots(&s0) else {
        return Ok(None);
    };
    // A real MBR's status bytes are 0x00 or 0x80; anything else is not a table.
    if is_boot_sector(&s0) || primaries.iter().any(|e| e.status & 0x7f != 0) {
        return Ok(None);
    }
    if primaries.iter().any(|e| e.kind == MBR_PROTECTIVE)
        && let Some(header) = GptHeader::parse(&read_at(r, sector, GPT_HEADER_LEN)?)
        && header.entry_size_is_valid()
        && header.entries_lba.saturating_mul(sector) < disk_size
    {
        let (entries, _) = header.read_entries(r, sector)?;
        return Ok(Some((TableKind::Gpt, entries)));
    }
    let mut out = Vec::new();
    for (i, e) in primaries.iter().enumerate() {
        if e.is_empty() {
            continue;
        }
        let entry = e.entry(i as u32 + 1, 0, sector);
        let start = entry.start;
        out.push(entry);
        if MBR_EXTENDED.contains(&e.kind) {
            read_logical(r, start, sector, &mut out)?;
        }
    }
    if out.is_empty() {
        return Ok(None);
    }
    Ok(Some((TableKind::Mbr, out)))
}

/// Walks the chain of extended boot records; logical partitions are numbered from 5.
fn read_logical<R: Read + Seek + ?Sized>(
    r: &mut R,
    ext_start: u64,
    sector: u64,
    out: &mut Vec<TableEntry>,
) -> io::Result<()> {
    let mut ebr = ext_start;
    let mut number = 5;
    for _ in 0..EBR_MAX_LINKS {
        let Some([this, next, ..]) = mbr_slots(&read_at(r, ebr, 512)?) else {
            break;
        };
        if this.kind != 0 && this.sectors != 0 {
            out.push(this.entry(number, ebr, sector));
            number += 1;
        }
        if next.kind == 0 || next.first_lba == 0 {
            break;
        }
        ebr = ext_start + u64::from(next.first_lba) * sector;
    }
    Ok(())
}

/// Finds the FAT partition livestick installs into: the first FAT (or EFI
/// system) partition of an MBR or GPT disk with 512-byte sectors.
pub fn find_fat_partition<D: Read + Seek>(
    disk: &mut D,
    disk_size: u64,
) -> Result<ExistingPartition, PartitionError> {
    let mut sector0 = [0u8; 512];
    disk.seek(SeekFrom::Start(0))?;
    disk.read_exact(&mut sector0)?;
    let Some(primaries) = mbr_slots(&sector0) else {
        return Err(PartitionError::NoTable);
    };
    if primaries.iter().any(|e| e.kind == MBR_PROTECTIVE) {
        return find_gpt_fat(disk, disk_size);
    }
    if primaries.iter().all(MbrSlot::is_empty) {
        return Err(PartitionError::NoTable);
    }
    let fat = primaries
        .iter()
        .enumerate()
        .map(|(i, e)| e.entry(i as u32 + 1, 0, SECTOR))
        .find(TableEntry::is_fat)
        .ok_or(PartitionError::NoFatPartition)?;
    existing(TableKind::Mbr, fat, disk_size)
}

fn existing(
    table: TableKind,
    entry: TableEntry,
    size: u64,
) -> Result<ExistingPartition, PartitionError> {
    let (number, start, len) = (entry.number, entry.start, entry.len);
    let end = start.saturating_add(len);
    if end > size || len == 0 {
        return Err(PartitionError::OutsideDisk { number, end, size });
    }
    Ok(ExistingPartition {
        table,
        number,
        start,
        len,
    })
}

fn find_gpt_fat<D: Read + Seek>(
    disk: &mut D,
    disk_size: u64,
) -> Result<ExistingPartition, PartitionError> {
    let mut header = [0u8; GPT_HEADER_LEN];
    disk.seek(SeekFrom::Start(SECTOR))?;
    disk.read_exact(&mut header)?;
    let Some(header) = GptHeader::parse(&header) else {
        return Err(PartitionError::Gpt(
            "protective MBR but no GPT header at LBA 1; the table is damaged — use --format".into(),
        ));
    };
    if !header.entry_size_is_valid() {
        return Err(PartitionError::Gpt(format!(
            "partition entry size {} is invalid; the table is damaged — use --format",
            header.entry_size
        )));
    }
    let (entries, complete) = header.read_entries(disk, SECTOR)?;
    match entries.into_iter().find(TableEntry::is_fat) {
        Some(fat) => existing(TableKind::Gpt, fat, disk_size),
        // What reading the missing entries with `read_exact` has always said.
        None if !complete => Err(PartitionError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "failed to fill whole buffer",
        ))),
        None => Err(PartitionError::NoFatPartition),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn crc32_ieee_check_value() {
        assert_eq!(crc32_ieee(b"123456789"), 0xcbf4_3926);
    }

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

    /// A 64 MiB image partitioned by util-linux's `sfdisk` from `script`
    /// (`{disk}` stands for its path), and what `sfdisk --json` reads back;
    /// `None` when sfdisk is not installed.
    fn sfdisk_disk(script: &str) -> Option<(tempfile::NamedTempFile, serde_json::Value)> {
        use std::process::{Command, Stdio};
        // A name ending in a digit would make sfdisk read `{disk}1` as partition 71.
        let disk = tempfile::Builder::new().suffix(".img").tempfile().unwrap();
        disk.as_file().set_len(64 << 20).unwrap();
        let path = disk.path().to_str().unwrap().to_string();
        let mut child = match Command::new("sfdisk")
            .args(["-q", "--no-reread", "--no-tell-kernel", &path])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                eprintln!("skipping: sfdisk not runnable: {e}");
                return None;
            }
        };
        let stdin = child.stdin.as_mut().unwrap();
        stdin
            .write_all(script.replace("{disk}", &path).as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "sfdisk refused {script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = Command::new("sfdisk").args(["-J", &path]).output().unwrap();
        assert!(out.status.success());
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        Some((disk, json["partitiontable"].clone()))
    }

    /// Every partition sfdisk lists is read with the same number, extent,
    /// type, name, PARTUUID and boot flag.
    fn assert_reads_like_sfdisk(entries: &[TableEntry], table: &serde_json::Value, path: &str) {
        let listed = table["partitions"].as_array().unwrap();
        assert_eq!(entries.len(), listed.len(), "{entries:#?}");
        for p in listed {
            let number: u32 = p["node"].as_str().unwrap()[path.len()..].parse().unwrap();
            let e = entries.iter().find(|e| e.number == number).unwrap();
            assert_eq!(e.start, p["start"].as_u64().unwrap() * SECTOR, "{e:?}");
            assert_eq!(e.len, p["size"].as_u64().unwrap() * SECTOR, "{e:?}");
            let kind = p["type"].as_str().unwrap().to_ascii_lowercase();
            match table["label"].as_str().unwrap() {
                "dos" => {
                    let byte = u8::from_str_radix(&kind, 16).unwrap();
                    assert_eq!(e.type_id, format!("{byte:#04x}"));
                    assert_eq!(e.bootable, p["bootable"].as_bool().unwrap_or(false));
                }
                _ => {
                    assert_eq!(e.type_id, kind);
                    assert_eq!(
                        e.part_uuid.as_deref(),
                        p["uuid"].as_str().map(str::to_ascii_lowercase).as_deref()
                    );
                    assert_eq!(e.name.as_deref(), p["name"].as_str());
                    let legacy = p["attrs"]
                        .as_str()
                        .unwrap_or("")
                        .contains("LegacyBIOSBootable");
                    assert_eq!(e.bootable, legacy);
                }
            }
        }
    }

    #[test]
    fn an_mbr_with_logical_partitions_from_sfdisk() {
        let Some((disk, table)) = sfdisk_disk(
            "label: dos\n\
             {disk}1 : start=2048, size=4096, type=83, bootable\n\
             {disk}2 : start=8192, size=40960, type=5\n\
             {disk}3 : start=57344, size=8192, type=ef\n\
             {disk}5 : size=8192, type=c\n\
             {disk}6 : size=8192, type=82\n",
        ) else {
            return;
        };
        let path = disk.path().to_str().unwrap();
        let mut f = disk.reopen().unwrap();
        let (kind, entries) = read_table(&mut f, 64 << 20, SECTOR).unwrap().unwrap();
        assert_eq!(kind, TableKind::Mbr);
        assert_reads_like_sfdisk(&entries, &table, path);
        assert!(
            entries
                .iter()
                .find(|e| e.number == 2)
                .unwrap()
                .is_extended()
        );
        assert_eq!(
            entries.iter().find(|e| e.number == 5).unwrap().type_name,
            Some("FAT32")
        );
        // The writer installs into a primary partition only: the logical FAT
        // partition 5 is passed over for the EFI system partition 3.
        let found = find_fat_partition(&mut f, 64 << 20).unwrap();
        assert_eq!((found.table, found.number), (TableKind::Mbr, 3));
        assert_eq!((found.start, found.len), (57344 * SECTOR, 8192 * SECTOR));
    }

    #[test]
    fn a_gpt_from_sfdisk() {
        let Some((disk, table)) = sfdisk_disk(
            "label: gpt\n\
             start=2048, size=2048, type=21686148-6449-6E6F-744E-656564454649, name=\"bios\"\n\
             start=4096, size=65536, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=\"LIVE\", attrs=\"LegacyBIOSBootable\"\n\
             start=69632, size=8192, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
        ) else {
            return;
        };
        let path = disk.path().to_str().unwrap();
        let mut f = disk.reopen().unwrap();
        let (kind, entries) = read_table(&mut f, 64 << 20, SECTOR).unwrap().unwrap();
        assert_eq!(kind, TableKind::Gpt);
        assert_reads_like_sfdisk(&entries, &table, path);
        assert_eq!(entries[1].type_name, Some("EFI system"));
        let found = find_fat_partition(&mut f, 64 << 20).unwrap();
        assert_eq!((found.table, found.number), (TableKind::Gpt, 2));
        assert_eq!((found.start, found.len), (4096 * SECTOR, 65536 * SECTOR));
    }

    #[test]
    fn a_gpt_with_no_header_is_read_as_its_protective_mbr_but_refused_for_writing() {
        let Some((disk, _)) = sfdisk_disk("label: gpt\nstart=2048, size=8192, type=L\n") else {
            return;
        };
        let mut f = disk.reopen().unwrap();
        f.seek(SeekFrom::Start(SECTOR)).unwrap();
        f.write_all(&[0; 8]).unwrap();
        let (kind, entries) = read_table(&mut f, 64 << 20, SECTOR).unwrap().unwrap();
        assert_eq!(kind, TableKind::Mbr);
        assert_eq!(entries[0].type_name, Some("GPT protective"));
        assert!(matches!(
            find_fat_partition(&mut f, 64 << 20),
            Err(PartitionError::Gpt(_))
        ));
    }

    #[test]
    fn a_looping_ebr_chain_ends() {
        let mut d = std::io::Cursor::new(vec![0u8; 1 << 20]);
        let disk = d.get_mut();
        // Primary 1: extended at LBA 8. Its EBR links to the one 8 sectors on,
        // and that one links to itself.
        disk[446 + 4] = 0x05;
        disk[446 + 8] = 8;
        disk[446 + 12] = 64;
        disk[510..512].copy_from_slice(&MBR_SIGNATURE);
        for lba in [8, 16] {
            let ebr = lba * 512;
            disk[ebr + 446 + 4] = 0x83;
            disk[ebr + 446 + 8] = 1;
            disk[ebr + 446 + 12] = 2;
            disk[ebr + 462 + 4] = 0x05;
            disk[ebr + 462 + 8] = 8;
            disk[ebr + 510..ebr + 512].copy_from_slice(&MBR_SIGNATURE);
        }
        let (_, entries) = read_table(&mut d, 1 << 20, SECTOR).unwrap().unwrap();
        assert_eq!(entries.len(), 1 + EBR_MAX_LINKS);
    }

    #[test]
    fn a_superfloppy_has_no_table() {
        let mut d = std::io::Cursor::new(vec![0u8; 64 << 20]);
        let mut whole = crate::io::PartitionWindow::new(&mut d, 0, 64 << 20);
        crate::disk::fat::format(&mut whole, "FLOPPY", 1, 0).unwrap();
        whole.flush().unwrap();
        drop(whole);
        assert!(read_table(&mut d, 64 << 20, SECTOR).unwrap().is_none());
    }
}
