//! The checks run on one input, shared by the cargo-fuzz target
//! (`fuzz/fuzz_targets/stick_image.rs`, nightly) and by `tests/fuzz_corpus.rs`
//! (stable, so CI replays the committed corpus without cargo-fuzz).
//!
//! The input is a sparse stick image: a sequence of records, each a sector
//! number (u32 little-endian) and that sector's 512 bytes, over a 64 MiB disk
//! that is zero everywhere else (a trailing partial record is ignored). A
//! freshly written stick is a few dozen non-zero sectors, so the seeds stay
//! small while the FAT32 volume inside is real size, and the fuzzer mutates
//! table, boot-sector, FAT and directory bytes rather than zeros.
//!
//! What one input goes through, as `livestick devices`, `write` onto an
//! existing stick and a stick used as a source read it: `partition::read_table`
//! (512- and 4096-byte sectors), `find_fat_partition`, `devices::peek_filesystem`
//! and `live_info` on each FAT partition (or the whole disk), and through
//! `fat::open` a listing of the tree, every file read whole (up to 1 MiB) and
//! `fat_raw::file_extents`. Any panic is a bug, and so is a hang (a chain
//! followed forever): `fat::open` must refuse a volume whose chains loop. A
//! volume it accepts must give every file it reads exactly its size.

use std::collections::BTreeMap;
use std::io::{self, Read, Seek, SeekFrom, Write};

use livestick::disk::devices::{self, NoOverlayProbe};
use livestick::disk::{fat, fat_raw, partition};
use livestick::io::PartitionWindow;

const SECTOR: u64 = 512;
/// The disk the records are written onto.
pub const DISK_BYTES: u64 = 64 << 20;
/// Files larger than this are listed but not read (a run stays fast).
const READ_CAP: u64 = 1 << 20;
/// Files read per input.
const FILES_CAP: usize = 64;
/// Directories walked per input, entries listed per directory, and depth.
const DIRS_CAP: usize = 64;
const ENTRIES_CAP: usize = 4096;
const DEPTH_CAP: usize = 32;

/// A disk of [`DISK_BYTES`] holding the input's sectors and zeros elsewhere.
/// Writes are refused, as when livestick looks at a stick without changing it.
pub struct SparseDisk {
    sectors: BTreeMap<u64, [u8; 512]>,
    pos: u64,
}

impl SparseDisk {
    pub fn from_records(data: &[u8]) -> SparseDisk {
        let mut sectors = BTreeMap::new();
        for record in data.chunks_exact(4 + 512) {
            let n = u64::from(u32::from_le_bytes([
                record[0], record[1], record[2], record[3],
            ]));
            if n < DISK_BYTES / SECTOR {
                let mut s = [0u8; 512];
                s.copy_from_slice(&record[4..]);
                sectors.insert(n, s);
            }
        }
        SparseDisk { sectors, pos: 0 }
    }
}

impl Read for SparseDisk {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = DISK_BYTES.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        let buf = &mut buf[..n];
        buf.fill(0);
        let (first, end) = (self.pos / SECTOR, (self.pos + n as u64).div_ceil(SECTOR));
        for (&s, bytes) in self.sectors.range(first..end) {
            let at = s * SECTOR;
            let from = at.max(self.pos);
            let to = (at + SECTOR).min(self.pos + n as u64);
            buf[(from - self.pos) as usize..(to - self.pos) as usize]
                .copy_from_slice(&bytes[(from - at) as usize..(to - at) as usize]);
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for SparseDisk {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => DISK_BYTES.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = pos.ok_or_else(|| io::Error::other("seek before the start"))?;
        Ok(self.pos)
    }
}

impl Write for SparseDisk {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the fuzzed stick is read-only",
        ))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Runs every check on one input. Panics only on a bug.
pub fn fuzz_one(data: &[u8]) {
    let mut disk = SparseDisk::from_records(data);
    let mut fat_partitions = Vec::new();
    for sector in [512, 4096] {
        if let Ok(Some((_, entries))) = partition::read_table(&mut disk, DISK_BYTES, sector) {
            for e in entries {
                assert!(e.number >= 1, "partition number 0: {e:?}");
                if sector == 512 && e.start < DISK_BYTES && !e.is_extended() {
                    let len = e.len.min(DISK_BYTES - e.start);
                    fat_partitions.push((e.number, e.start, len));
                }
            }
        }
    }
    if let Ok(p) = partition::find_fat_partition(&mut disk, DISK_BYTES) {
        assert!(p.len > 0 && p.start + p.len <= DISK_BYTES, "{p:?}");
        fat_partitions.push((p.number, p.start, p.len));
    }
    if fat_partitions.is_empty() {
        fat_partitions.push((0, 0, DISK_BYTES));
    }
    fat_partitions.sort();
    fat_partitions.dedup();
    for (number, start, len) in fat_partitions.into_iter().take(4) {
        let _ = devices::peek_filesystem(&mut disk, start, len);
        let _ = devices::live_info(&mut disk, number, start, len, &NoOverlayProbe);
        check_fat(&mut disk, start, len);
    }
}

/// The bytes the volume's boot sector claims, when it reads as FAT at all.
fn volume_bytes(disk: &mut SparseDisk, start: u64) -> Option<u64> {
    let mut bpb = [0u8; 512];
    disk.seek(SeekFrom::Start(start)).ok()?;
    disk.read_exact(&mut bpb).ok()?;
    let bps = u64::from(u16::from_le_bytes([bpb[11], bpb[12]]));
    let total = match u16::from_le_bytes([bpb[19], bpb[20]]) {
        0 => u64::from(u32::from_le_bytes([bpb[32], bpb[33], bpb[34], bpb[35]])),
        t => u64::from(t),
    };
    Some(bps * total)
}

fn check_fat(disk: &mut SparseDisk, start: u64, len: u64) {
    // Every cluster a checked chain reaches lies inside the volume; only when
    // the volume lies inside the partition is every one of them readable.
    let fits = volume_bytes(disk, start).is_some_and(|v| v <= len);
    read_tree(disk, start, len, fits);
    for f in fat_raw_files(disk, start, len) {
        if let Ok(extents) = fat_raw::file_extents(&mut *disk, start, &f) {
            assert!(extents.iter().all(|&(at, l)| at >= start && l > 0), "{f}");
        }
    }
}

/// Lists and reads the tree through `fat::open`, as livestick does.
fn read_tree(disk: &mut SparseDisk, start: u64, len: u64, fits: bool) {
    let mut window = PartitionWindow::new(&mut *disk, start, len);
    let Ok(fs) = fat::open(&mut window) else {
        return;
    };
    let _ = fat::list_dir(&fs, "/");
    let _ = fat::exists(&fs, "/LiveOS/squashfs.img");
    let _ = fat::walk_files(&fs, "");
    // fatfs's own walk, entry by entry (a path could name two entries).
    let mut pending = vec![(fs.root_dir(), 0usize)];
    let (mut dirs, mut files) = (0usize, 0usize);
    while let Some((dir, depth)) = pending.pop() {
        dirs += 1;
        if dirs > DIRS_CAP {
            break;
        }
        for e in dir.iter().take(ENTRIES_CAP).filter_map(Result::ok) {
            let name = e.file_name();
            if e.is_dir() {
                if name != "." && name != ".." && depth < DEPTH_CAP {
                    pending.push((e.to_dir(), depth + 1));
                }
                continue;
            }
            files += 1;
            if files > FILES_CAP || e.len() > READ_CAP {
                continue;
            }
            let mut bytes = Vec::new();
            if e.to_file().read_to_end(&mut bytes).is_ok() {
                if fits {
                    assert_eq!(
                        bytes.len() as u64,
                        e.len(),
                        "{name}: a checked chain read short"
                    );
                } else {
                    assert!(bytes.len() as u64 <= e.len(), "{name}: read past its size");
                }
            }
        }
    }
}

/// A few paths for `fat_raw`, which finds entries by name on its own.
fn fat_raw_files(disk: &mut SparseDisk, start: u64, len: u64) -> Vec<String> {
    let mut window = PartitionWindow::new(&mut *disk, start, len);
    let Ok(fs) = fat::open(&mut window) else {
        return Vec::new();
    };
    let mut out: Vec<String> = fat::list_dir(&fs, "/LiveOS")
        .into_iter()
        .chain(fat::list_dir(&fs, "/"))
        .filter(|e| !e.is_dir)
        .map(|e| e.path)
        .collect();
    out.truncate(FILES_CAP);
    out
}
