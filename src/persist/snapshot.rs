//! The Linux dm-snapshot persistent exception store: the format of a Fedora LiveOS
//! overlay file (`LiveOS/overlay-<LABEL>-<UUID>`).
//!
//! Everything here works on `Read + Write + Seek` and never needs root, a loop device or
//! device-mapper. The rules follow `reference/dm-snapshot-format.md` and were checked
//! against the kernel-made vectors in `fixtures/dm-snapshot/`:
//!
//! * chunk 0 is the header (`SnAp`, valid, version 1, chunk size in sectors);
//! * metadata area `k` is chunk `1 + k·(EPA+1)`, holding EPA = chunk_bytes/16 entries of
//!   little-endian `(old_chunk, new_chunk)`, each area followed by its EPA data chunks;
//! * the list ends at the first entry whose `new_chunk` is 0; a full area means the next
//!   area must be read, and must lie inside the file or the kernel refuses the store.
//!
//! Parsing is lenient where the kernel is lenient (a `new_chunk` beyond the file loads and
//! shows `allocated > total`), so [`Store::dm_status`] reproduces `dmsetup status` even
//! for damaged stores; [`Store::validate`] is the strict check every writer runs first.

use crate::bytes::{put_u32, put_u64, u32_at, u64_at};
use crate::io::{SyncData, read_full};
use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Seek, SeekFrom, Write};

use serde::Serialize;
use thiserror::Error;

/// `SnAp`, little-endian.
pub const SNAP_MAGIC: u32 = 0x7041_6e53;
/// The only on-disk version that has ever existed.
pub const DISK_VERSION: u32 = 1;
pub const SECTOR_BYTES: u64 = 512;
/// Chunk size Fedora's dracut and livecd-tools use (`PO 8`): 4 KiB.
pub const LIVEOS_CHUNK_SECTORS: u32 = 8;
/// dracut's `rd.live.overlay.reset`, livecd-iso-to-disk `--reset-overlay` and editliveos
/// all zero this much; we do the same so every tool agrees the store is new.
pub const RESET_BYTES: u64 = 64 * 1024;
/// The largest file FAT can hold; the overlay lives on FAT.
pub const FAT_MAX_FILE_BYTES: u64 = 0xFFFF_FFFF;
/// The kernel keeps a run length in the top 8 bits of an in-memory `new_chunk`.
const NEW_CHUNK_LIMIT: u64 = 1 << 56;
/// The kernel accepts chunk sizes up to `INT_MAX >> 9` sectors.
const MAX_CHUNK_SECTORS: u32 = (i32::MAX as u32) >> 9;
/// Buffer for streaming copies: large enough to be fast, small enough for any chunk size.
const COPY_BLOCK: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("I/O error on the overlay or origin: {0}")]
    Io(#[from] io::Error),
    #[error("the overlay is {len} bytes, too short to hold a dm-snapshot header (16 bytes)")]
    TooShort { len: u64 },
    #[error(
        "not a dm-snapshot overlay: magic is {found:#010x}, expected 0x70416e53 (\"SnAp\") or 0 for a new store"
    )]
    BadMagic { found: u32 },
    #[error("overlay header has chunk size {chunk_sectors} sectors: {reason}")]
    BadChunkSize {
        chunk_sectors: u32,
        reason: &'static str,
    },
    #[error("overlay header has version {version}; only version 1 exists, the kernel refuses it")]
    UnsupportedVersion { version: u32 },
    #[error(
        "metadata area {prev_area} is full, so area {area} (chunk {chunk}) must be read, but it lies beyond the end of the {cow_sectors}-sector overlay; the kernel refuses to load this store"
    )]
    AreaBeyondEnd {
        prev_area: u64,
        area: u64,
        chunk: u64,
        cow_sectors: u64,
    },
    #[error(
        "metadata area {area} is truncated: the overlay ends at byte {end} inside it (expected {expected} bytes)"
    )]
    TruncatedArea { area: u64, end: u64, expected: u64 },
    #[error(
        "metadata area {area} entry {index}: new_chunk {new_chunk} (for origin chunk {old_chunk}) lies beyond the end of the overlay ({chunks} chunks)"
    )]
    NewChunkBeyondEnd {
        area: u64,
        index: u64,
        old_chunk: u64,
        new_chunk: u64,
        chunks: u64,
    },
    #[error(
        "metadata area {area} entry {index}: new_chunk {new_chunk} (for origin chunk {old_chunk}) is a metadata chunk"
    )]
    NewChunkIsMetadata {
        area: u64,
        index: u64,
        old_chunk: u64,
        new_chunk: u64,
    },
    #[error(
        "metadata area {area} entry {index}: origin chunk {old_chunk} lies beyond the origin ({origin_chunks} chunks)"
    )]
    OldChunkBeyondOrigin {
        area: u64,
        index: u64,
        old_chunk: u64,
        origin_chunks: u64,
    },
    #[error(
        "metadata area {area} entry {index}: origin chunk {old_chunk} is already remapped by area {first_area} entry {first_index}; the kernel's view and merge disagree on duplicates"
    )]
    DuplicateOldChunk {
        old_chunk: u64,
        first_area: u64,
        first_index: u64,
        area: u64,
        index: u64,
    },
    #[error(
        "metadata area {area} entry {index}: overlay chunk {new_chunk} is already used by area {first_area} entry {first_index}"
    )]
    DuplicateNewChunk {
        new_chunk: u64,
        first_area: u64,
        first_index: u64,
        area: u64,
        index: u64,
    },
    #[error(
        "metadata area {area} entry {index}: the store lists more exceptions than the overlay has chunks ({chunks}); its metadata is damaged"
    )]
    MoreExceptionsThanChunks { area: u64, index: u64, chunks: u64 },
    #[error(
        "the overlay is marked Invalid (the kernel invalidated it, usually because it ran full); recover it first"
    )]
    Invalid,
    #[error("the overlay is full: no free chunk is left for origin chunk {old_chunk}")]
    StoreFull { old_chunk: u64 },
    #[error(
        "the overlay cannot take origin chunk {old_chunk}: it would fill metadata area {area}, and the next area would lie beyond the end of the overlay (the kernel would invalidate the store here)"
    )]
    AreaTrap { old_chunk: u64, area: u64 },
    #[error(
        "an overlay of {size} bytes is too small: it needs at least {min} bytes (header, one metadata area, one data chunk)"
    )]
    OverlayTooSmall { size: u64, min: u64 },
    #[error(
        "the write of {len} bytes at offset {offset} runs past the end of the origin ({origin_bytes} bytes)"
    )]
    WriteBeyondOrigin {
        offset: u64,
        len: u64,
        origin_bytes: u64,
    },
    #[error("the overlay cannot grow from {current} to {requested} bytes: {reason}")]
    CannotGrow {
        current: u64,
        requested: u64,
        reason: String,
    },
}

impl crate::error::Classify for SnapshotError {
    fn kind(&self) -> crate::error::ErrorKind {
        match self {
            // A failing read or write; everything else is what the store (or the
            // request) is: the user's input.
            SnapshotError::Io(_) => crate::error::ErrorKind::Io,
            _ => crate::error::ErrorKind::BadInput,
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            SnapshotError::CannotGrow { .. } => {
                "nothing was changed; ask for a size larger than the overlay (--add-mb N, or a larger --size-mb)"
            }
            SnapshotError::Invalid => {
                "nothing was changed; `livestick overlay recover` makes an Invalid overlay usable again (see its --help)"
            }
            SnapshotError::Io(_) => crate::error::ErrorKind::Io.hint(),
            _ => {
                "nothing was changed; `livestick overlay status` shows what the overlay holds, `livestick overlay recover` repairs a damaged one, `livestick overlay reset` starts it afresh (its changes are lost)"
            }
        }
    }
}

/// The 16 meaningful bytes of chunk 0, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Header {
    pub magic: u32,
    /// Any non-zero value is valid; the kernel writes 0 when it invalidates the store.
    pub valid: u32,
    pub version: u32,
    pub chunk_sectors: u32,
}

impl Header {
    /// The header the kernel writes when it initialises a new store.
    pub fn fresh(chunk_sectors: u32) -> Header {
        Header {
            magic: SNAP_MAGIC,
            valid: 1,
            version: DISK_VERSION,
            chunk_sectors,
        }
    }

    pub fn from_bytes(b: &[u8; 16]) -> Header {
        Header {
            magic: u32_at(b, 0),
            valid: u32_at(b, 4),
            version: u32_at(b, 8),
            chunk_sectors: u32_at(b, 12),
        }
    }

    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        put_u32(&mut b, 0, self.magic);
        put_u32(&mut b, 4, self.valid);
        put_u32(&mut b, 8, self.version);
        put_u32(&mut b, 12, self.chunk_sectors);
        b
    }

    pub fn is_valid(&self) -> bool {
        self.valid != 0
    }
}

/// What chunk 0 says, after the kernel's load checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum HeaderState {
    /// Magic is 0: the kernel will initialise a new, empty store on first activation.
    Uninitialised,
    /// `SnAp`, version 1, a usable chunk size. `valid` may still be 0 (Invalid).
    Initialised(Header),
}

/// Layout arithmetic for one chunk size and one overlay size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Geometry {
    pub chunk_sectors: u32,
    pub cow_bytes: u64,
}

impl Geometry {
    pub fn new(chunk_sectors: u32, cow_bytes: u64) -> Result<Geometry, SnapshotError> {
        check_chunk_sectors(chunk_sectors)?;
        Ok(Geometry {
            chunk_sectors,
            cow_bytes,
        })
    }

    pub fn chunk_bytes(&self) -> u64 {
        u64::from(self.chunk_sectors) * SECTOR_BYTES
    }

    /// Exceptions per metadata area (256 for 4 KiB chunks).
    pub fn exceptions_per_area(&self) -> u64 {
        self.chunk_bytes() / 16
    }

    /// One metadata chunk plus the data chunks it describes.
    pub fn stride(&self) -> u64 {
        self.exceptions_per_area() + 1
    }

    /// `total` of `dmsetup status`: the device length, a loop device rounds down to 512.
    pub fn total_sectors(&self) -> u64 {
        self.cow_bytes / SECTOR_BYTES
    }

    /// Whole chunks in the overlay; a trailing partial chunk is never used.
    pub fn chunks(&self) -> u64 {
        self.total_sectors() / u64::from(self.chunk_sectors)
    }

    pub fn area_chunk(&self, area: u64) -> u64 {
        area.saturating_mul(self.stride()).saturating_add(1)
    }

    pub fn area_offset(&self, area: u64) -> u64 {
        self.area_chunk(area).saturating_mul(self.chunk_bytes())
    }

    pub fn is_metadata_chunk(&self, chunk: u64) -> bool {
        chunk % self.stride() == 1
    }

    /// True when the last chunk of the file is the last data chunk of an area: filling that
    /// area makes the kernel zero an area past the end and invalidate the store (§3.5).
    pub fn is_trap(&self) -> bool {
        let n = self.chunks();
        n > self.stride() && n % self.stride() == 1
    }

    /// Data chunks a store of this size can ever hand out (§8.4).
    pub fn usable_data_chunks(&self) -> u64 {
        let n = self.chunks();
        if n < 2 {
            return 0;
        }
        let g = (n - 1) / self.stride();
        let r = (n - 1) % self.stride();
        let mut data = g * self.exceptions_per_area() + r.saturating_sub(1);
        if r == 0 && g >= 1 {
            data -= 1;
        }
        data
    }

    /// Data chunks below `next_free` (those already handed out, or skipped as gaps).
    fn data_chunks_below(&self, next_free: u64) -> u64 {
        if next_free < 2 {
            return 0;
        }
        let below = next_free - 1;
        below - below.div_ceil(self.stride())
    }

    /// The smallest overlay that holds a header, area 0 and one data chunk.
    pub fn min_bytes(chunk_sectors: u32) -> u64 {
        3 * u64::from(chunk_sectors) * SECTOR_BYTES
    }
}

fn check_chunk_sectors(chunk_sectors: u32) -> Result<(), SnapshotError> {
    let reason = if chunk_sectors == 0 || !chunk_sectors.is_power_of_two() {
        "not a power of two; the kernel refuses it"
    } else if chunk_sectors > MAX_CHUNK_SECTORS {
        "larger than the kernel's limit"
    } else {
        return Ok(());
    };
    Err(SnapshotError::BadChunkSize {
        chunk_sectors,
        reason,
    })
}

/// One entry of a metadata area.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Exception {
    /// Chunk index in the origin (the root image).
    pub old_chunk: u64,
    /// Chunk index in the overlay where that chunk's current data lives.
    pub new_chunk: u64,
}

/// A store as the kernel sees it right after loading the file.
#[derive(Debug, Clone, Serialize)]
pub struct Store {
    pub header: Header,
    pub geometry: Geometry,
    /// Every committed exception in on-disk order. All areas before `current_area` are
    /// full, so entry `i` sits in area `i / EPA` at index `i % EPA`.
    pub exceptions: Vec<Exception>,
    /// The first area that is not full (the kernel's current area).
    pub current_area: u64,
    /// Entries used in the current area.
    pub current_committed: u64,
}

/// `dmsetup status` payload for a snapshot target, as the kernel prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum DmStatus {
    Active {
        allocated_sectors: u64,
        total_sectors: u64,
        metadata_sectors: u64,
    },
    Invalid,
    /// Only a live `PO` table shows this (it is not stored on disk); a file-based tool
    /// sees the figures a reload would print and reports `full` instead.
    Overflow,
}

impl fmt::Display for DmStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DmStatus::Active {
                allocated_sectors,
                total_sectors,
                metadata_sectors,
            } => write!(f, "{allocated_sectors}/{total_sectors} {metadata_sectors}"),
            DmStatus::Invalid => f.write_str("Invalid"),
            DmStatus::Overflow => f.write_str("Overflow"),
        }
    }
}

/// Length of a stream, leaving the position at the start.
pub fn stream_len<S: Seek>(s: &mut S) -> io::Result<u64> {
    let len = s.seek(SeekFrom::End(0))?;
    s.seek(SeekFrom::Start(0))?;
    Ok(len)
}

/// Reads chunk 0 and applies the kernel's load checks in the kernel's order: magic
/// (0 means new), chunk size, version. `valid` is reported, not judged.
pub fn read_header<R: Read + Seek>(r: &mut R) -> Result<HeaderState, SnapshotError> {
    let mut b = [0u8; 16];
    r.seek(SeekFrom::Start(0))?;
    let got = read_full(r, &mut b)?;
    if got < b.len() {
        return Err(SnapshotError::TooShort { len: got as u64 });
    }
    let header = Header::from_bytes(&b);
    if header.magic == 0 {
        return Ok(HeaderState::Uninitialised);
    }
    if header.magic != SNAP_MAGIC {
        return Err(SnapshotError::BadMagic {
            found: header.magic,
        });
    }
    check_chunk_sectors(header.chunk_sectors)?;
    if header.version != DISK_VERSION {
        return Err(SnapshotError::UnsupportedVersion {
            version: header.version,
        });
    }
    Ok(HeaderState::Initialised(header))
}

/// Walks the metadata areas exactly as the kernel does on load: scan each area up to the
/// first `new_chunk == 0`; a full area sends it to the next one, which must lie inside
/// the device. Entries after the end marker and later areas are ignored.
pub fn read_store<R: Read + Seek>(
    r: &mut R,
    header: Header,
    cow_bytes: u64,
) -> Result<Store, SnapshotError> {
    let geometry = Geometry::new(header.chunk_sectors, cow_bytes)?;
    let epa = geometry.exceptions_per_area();
    let chunk_bytes = geometry.chunk_bytes();
    let mut exceptions = Vec::new();
    // Stream each area in blocks so a huge chunk size never means a huge allocation.
    let block_len = chunk_bytes.min(64 * 1024) as usize;
    let mut block = vec![0u8; block_len];
    let mut area = 0u64;
    loop {
        let chunk = geometry.area_chunk(area);
        // The kernel reads a whole chunk through the device; it must fit in T sectors.
        if chunk.saturating_add(1) > geometry.chunks() {
            if area == 0 {
                return Err(SnapshotError::TruncatedArea {
                    area,
                    end: cow_bytes,
                    expected: chunk_bytes,
                });
            }
            return Err(SnapshotError::AreaBeyondEnd {
                prev_area: area - 1,
                area,
                chunk,
                cow_sectors: geometry.total_sectors(),
            });
        }
        let offset = geometry.area_offset(area);
        r.seek(SeekFrom::Start(offset))?;
        let mut index = 0u64;
        let mut end_found = false;
        let mut read_in_area = 0u64;
        while read_in_area < chunk_bytes && !end_found {
            let want = (chunk_bytes - read_in_area).min(block_len as u64) as usize;
            let got = read_full(r, &mut block[..want])?;
            if got < want {
                return Err(SnapshotError::TruncatedArea {
                    area,
                    end: offset + read_in_area + got as u64,
                    expected: chunk_bytes,
                });
            }
            for entry in block[..want].chunks_exact(16) {
                let new_chunk = u64_at(entry, 8);
                if new_chunk == 0 {
                    end_found = true;
                    break;
                }
                // Each exception has a chunk of its own: more of them than chunks is
                // damage, refused before a crafted area of millions of entries is
                // gathered in memory.
                if exceptions.len() as u64 >= geometry.chunks() {
                    return Err(SnapshotError::MoreExceptionsThanChunks {
                        area,
                        index,
                        chunks: geometry.chunks(),
                    });
                }
                exceptions.push(Exception {
                    old_chunk: u64_at(entry, 0),
                    new_chunk,
                });
                index += 1;
            }
            read_in_area += want as u64;
        }
        if end_found || index < epa {
            return Ok(Store {
                header,
                geometry,
                exceptions,
                current_area: area,
                current_committed: index,
            });
        }
        area += 1;
    }
}

/// The state of an overlay file, as far as a fresh kernel load would get.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Opened {
    Uninitialised {
        cow_bytes: u64,
    },
    /// valid == 0: the kernel does not read the areas; they are read here only for
    /// reporting and recovery, so a damaged area is reported, not fatal.
    Invalid {
        header: Header,
        store: Option<Box<Store>>,
        area_error: Option<String>,
    },
    Valid(Box<Store>),
}

/// Opens an overlay the way the kernel loads it.
pub fn open_store<R: Read + Seek>(r: &mut R, cow_bytes: u64) -> Result<Opened, SnapshotError> {
    match read_header(r)? {
        HeaderState::Uninitialised => Ok(Opened::Uninitialised { cow_bytes }),
        HeaderState::Initialised(header) if !header.is_valid() => {
            match read_store(r, header, cow_bytes) {
                Ok(store) => Ok(Opened::Invalid {
                    header,
                    store: Some(Box::new(store)),
                    area_error: None,
                }),
                Err(e) => Ok(Opened::Invalid {
                    header,
                    store: None,
                    area_error: Some(e.to_string()),
                }),
            }
        }
        HeaderState::Initialised(header) => {
            Ok(Opened::Valid(Box::new(read_store(r, header, cow_bytes)?)))
        }
    }
}

impl Store {
    /// Where entry `i` (in on-disk order) lives: (area, index in area).
    pub fn position(&self, i: usize) -> (u64, u64) {
        let epa = self.geometry.exceptions_per_area();
        (i as u64 / epa, i as u64 % epa)
    }

    /// The kernel's allocation pointer after a load (§3.4).
    pub fn next_free(&self) -> u64 {
        let max = self
            .exceptions
            .iter()
            .map(|e| e.new_chunk)
            .max()
            .unwrap_or(0);
        let mut next = max.saturating_add(1).max(2);
        if self.geometry.is_metadata_chunk(next) {
            next = next.saturating_add(1);
        }
        next
    }

    /// What `dmsetup status` prints right after loading this file.
    pub fn dm_status(&self) -> DmStatus {
        if !self.header.is_valid() {
            return DmStatus::Invalid;
        }
        let c = u64::from(self.geometry.chunk_sectors);
        DmStatus::Active {
            allocated_sectors: self.next_free().saturating_mul(c),
            total_sectors: self.geometry.total_sectors(),
            metadata_sectors: self.current_area.saturating_add(2).saturating_mul(c),
        }
    }

    /// Data chunks that can still be allocated (0 means the next new chunk overflows).
    pub fn free_data_chunks(&self) -> u64 {
        let g = &self.geometry;
        g.usable_data_chunks()
            .saturating_sub(g.data_chunks_below(self.next_free()))
    }

    /// Strict checks a tool runs before trusting the store for a merge, a view or a
    /// write: every entry inside the file, on a data chunk, below 2^56, within the origin
    /// (when its size is known) and no chunk used twice. The first problem is returned,
    /// naming its area and entry.
    pub fn validate(&self, origin_sectors: Option<u64>) -> Result<(), SnapshotError> {
        let g = &self.geometry;
        let chunks = g.chunks();
        let origin_chunks = origin_sectors.map(|s| s.div_ceil(u64::from(g.chunk_sectors)));
        let mut by_old: HashMap<u64, usize> = HashMap::with_capacity(self.exceptions.len());
        let mut by_new: HashMap<u64, usize> = HashMap::with_capacity(self.exceptions.len());
        for (i, e) in self.exceptions.iter().enumerate() {
            let (area, index) = self.position(i);
            if e.new_chunk >= chunks || e.new_chunk >= NEW_CHUNK_LIMIT {
                return Err(SnapshotError::NewChunkBeyondEnd {
                    area,
                    index,
                    old_chunk: e.old_chunk,
                    new_chunk: e.new_chunk,
                    chunks,
                });
            }
            if g.is_metadata_chunk(e.new_chunk) {
                return Err(SnapshotError::NewChunkIsMetadata {
                    area,
                    index,
                    old_chunk: e.old_chunk,
                    new_chunk: e.new_chunk,
                });
            }
            if let Some(limit) = origin_chunks
                && e.old_chunk >= limit
            {
                return Err(SnapshotError::OldChunkBeyondOrigin {
                    area,
                    index,
                    old_chunk: e.old_chunk,
                    origin_chunks: limit,
                });
            }
            if let Some(&first) = by_old.get(&e.old_chunk) {
                let (first_area, first_index) = self.position(first);
                return Err(SnapshotError::DuplicateOldChunk {
                    old_chunk: e.old_chunk,
                    first_area,
                    first_index,
                    area,
                    index,
                });
            }
            if let Some(&first) = by_new.get(&e.new_chunk) {
                let (first_area, first_index) = self.position(first);
                return Err(SnapshotError::DuplicateNewChunk {
                    new_chunk: e.new_chunk,
                    first_area,
                    first_index,
                    area,
                    index,
                });
            }
            by_old.insert(e.old_chunk, i);
            by_new.insert(e.new_chunk, i);
        }
        Ok(())
    }

    /// The byte ranges of the store the kernel reads: the header chunk, every metadata
    /// area up to the one after the current (read when the current is full), and every
    /// data chunk an exception points at. A copy of only these is the same store.
    pub fn used_regions(&self) -> Vec<std::ops::Range<u64>> {
        let g = &self.geometry;
        let chunk = g.chunk_bytes();
        let end = g.chunks().saturating_mul(chunk);
        let mut chunks: Vec<u64> = vec![0];
        chunks.extend((0..=self.current_area.saturating_add(1)).map(|a| g.area_chunk(a)));
        chunks.extend(self.exceptions.iter().map(|e| e.new_chunk));
        chunks.sort_unstable();
        chunks.dedup();
        let mut out: Vec<std::ops::Range<u64>> = Vec::new();
        for c in chunks {
            let at = c.saturating_mul(chunk);
            if at >= end {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.end == at => last.end = at + chunk,
                _ => out.push(at..at + chunk),
            }
        }
        out
    }

    /// origin chunk → overlay chunk, sorted by origin chunk. On duplicates the earliest
    /// entry on disk wins, which is what the kernel's merge leaves behind (§6.2).
    pub fn chunk_map(&self) -> Vec<(u64, u64)> {
        let mut seen = HashMap::with_capacity(self.exceptions.len());
        for e in &self.exceptions {
            seen.entry(e.old_chunk).or_insert(e.new_chunk);
        }
        let mut map: Vec<(u64, u64)> = seen.into_iter().collect();
        map.sort_unstable();
        map
    }
}

/// Everything `livestick overlay status` reports about one overlay file.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// `uninitialised`, `valid` or `invalid`.
    pub state: &'static str,
    /// Exactly what `dmsetup status` would print after activation (payload only).
    pub dm_status: String,
    pub chunk_sectors: u32,
    #[serde(rename = "size_bytes")]
    pub cow_bytes: u64,
    pub total_sectors: u64,
    pub allocated_sectors: Option<u64>,
    pub metadata_sectors: Option<u64>,
    pub exceptions: u64,
    pub metadata_areas: u64,
    /// allocated / total, in percent, as the figures mean it.
    pub percent_used: f64,
    pub free_data_chunks: u64,
    #[serde(rename = "free_bytes")]
    pub bytes_free: u64,
    /// The next write to an unmodified chunk fails: `Overflow` under `PO`, `Invalid` under `P`.
    pub full: bool,
    /// The size puts the last data chunk at an area end (§3.5); growing fixes it.
    pub trap_size: bool,
    /// Strict-validation findings (the kernel may still load such a store).
    pub problems: Vec<String>,
}

/// Computes the status of an overlay file. `default_chunk_sectors` is the chunk size the
/// kernel table would use for a new store (8 for LiveOS).
pub fn status<R: Read + Seek>(
    r: &mut R,
    cow_bytes: u64,
    default_chunk_sectors: u32,
    origin_sectors: Option<u64>,
) -> Result<StatusReport, SnapshotError> {
    let opened = open_store(r, cow_bytes)?;
    Ok(status_of(
        &opened,
        cow_bytes,
        default_chunk_sectors,
        origin_sectors,
    ))
}

/// [`status`] for an already opened store.
pub fn status_of(
    opened: &Opened,
    cow_bytes: u64,
    default_chunk_sectors: u32,
    origin_sectors: Option<u64>,
) -> StatusReport {
    match opened {
        Opened::Uninitialised { .. } => {
            let g = Geometry {
                chunk_sectors: default_chunk_sectors,
                cow_bytes,
            };
            let c = u64::from(default_chunk_sectors);
            let dm = DmStatus::Active {
                allocated_sectors: 2 * c,
                total_sectors: g.total_sectors(),
                metadata_sectors: 2 * c,
            };
            let free = g.usable_data_chunks();
            StatusReport {
                state: "uninitialised",
                dm_status: dm.to_string(),
                chunk_sectors: default_chunk_sectors,
                cow_bytes,
                total_sectors: g.total_sectors(),
                allocated_sectors: Some(2 * c),
                metadata_sectors: Some(2 * c),
                exceptions: 0,
                metadata_areas: 1,
                percent_used: percent(2 * c, g.total_sectors()),
                free_data_chunks: free,
                bytes_free: free * g.chunk_bytes(),
                full: free == 0,
                trap_size: g.is_trap(),
                problems: Vec::new(),
            }
        }
        Opened::Invalid {
            header,
            store,
            area_error,
        } => {
            let mut report = match store {
                Some(s) => report_for_store(s, origin_sectors),
                None => {
                    let g = Geometry {
                        chunk_sectors: header.chunk_sectors,
                        cow_bytes,
                    };
                    StatusReport {
                        state: "invalid",
                        dm_status: String::new(),
                        chunk_sectors: header.chunk_sectors,
                        cow_bytes,
                        total_sectors: g.total_sectors(),
                        allocated_sectors: None,
                        metadata_sectors: None,
                        exceptions: 0,
                        metadata_areas: 0,
                        percent_used: 0.0,
                        free_data_chunks: 0,
                        bytes_free: 0,
                        full: false,
                        trap_size: g.is_trap(),
                        problems: Vec::new(),
                    }
                }
            };
            report.state = "invalid";
            report.dm_status = DmStatus::Invalid.to_string();
            if let Some(e) = area_error {
                report.problems.push(e.clone());
            }
            report
        }
        Opened::Valid(store) => report_for_store(store, origin_sectors),
    }
}

fn report_for_store(store: &Store, origin_sectors: Option<u64>) -> StatusReport {
    let g = &store.geometry;
    let c = u64::from(g.chunk_sectors);
    let allocated = store.next_free().saturating_mul(c);
    let metadata = store.current_area.saturating_add(2).saturating_mul(c);
    let free = store.free_data_chunks();
    let mut problems = Vec::new();
    if let Err(e) = store.validate(origin_sectors) {
        problems.push(e.to_string());
    }
    if allocated > g.total_sectors() {
        problems.push(format!(
            "allocated ({allocated} sectors) exceeds the overlay size ({} sectors): the metadata is corrupt",
            g.total_sectors()
        ));
    }
    StatusReport {
        state: if store.header.is_valid() {
            "valid"
        } else {
            "invalid"
        },
        dm_status: store.dm_status().to_string(),
        chunk_sectors: g.chunk_sectors,
        cow_bytes: g.cow_bytes,
        total_sectors: g.total_sectors(),
        allocated_sectors: Some(allocated),
        metadata_sectors: Some(metadata),
        exceptions: store.exceptions.len() as u64,
        metadata_areas: store.current_area + 1,
        percent_used: percent(allocated, g.total_sectors()),
        free_data_chunks: free,
        bytes_free: free.saturating_mul(g.chunk_bytes()),
        full: free == 0,
        trap_size: g.is_trap(),
        problems,
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        (part as f64 * 10000.0 / whole as f64).round() / 100.0
    }
}

/// The bytes that make a store of `size` bytes new when zeroed: its first
/// [`RESET_BYTES`] (header and area 0 for every chunk size up to 32 KiB), or all of it.
pub fn new_store_range(size: u64) -> std::ops::Range<u64> {
    0..size.min(RESET_BYTES)
}

/// Writes what a brand-new overlay needs so that the kernel (and dracut) treat it as a new
/// store: zeros over the first [`RESET_BYTES`] (64 KiB) or the whole file if smaller,
/// which clears the magic and area 0 for every chunk size up to 32 KiB. Nothing past that
/// is written, and the file is not extended: the caller allocates and zero-fills the rest
/// (as livecd-iso-to-disk does). `size` is the overlay's final length; it must hold at
/// least a header, area 0 and one data chunk of 4 KiB.
pub fn format_new_overlay<W: Write + Seek>(w: &mut W, size: u64) -> Result<(), SnapshotError> {
    let min = Geometry::min_bytes(LIVEOS_CHUNK_SECTORS);
    if size < min {
        return Err(SnapshotError::OverlayTooSmall { size, min });
    }
    write_zeros(w, 0, new_store_range(size).end)?;
    w.flush()?;
    Ok(())
}

/// Empties a store the way dracut's `rd.live.overlay.reset` does: zero the first 64 KiB.
/// The kernel re-initialises chunks 0 and 1 on the next activation. The header's sector
/// goes first, on its own and synced: a stick may commit one request's sectors in any
/// order, and a valid header over a half-zeroed exception area would give the live
/// system its root with only some of the old changes. With the magic gone, the kernel
/// starts a new store whatever the rest holds.
pub fn reset_store<W: Write + Seek + SyncData>(
    w: &mut W,
    cow_bytes: u64,
) -> Result<(), SnapshotError> {
    let end = new_store_range(cow_bytes).end;
    let header = end.min(SECTOR_BYTES);
    write_zeros(w, 0, header)?;
    w.flush()?;
    w.sync_data()?;
    write_zeros(w, header, end - header)?;
    w.flush()?;
    w.sync_data()?;
    Ok(())
}

/// Creates an initialised, empty store exactly as the kernel does on first activation:
/// chunk 0 = fresh header + zeros, chunk 1 (area 0) = zeros. Nothing else is touched.
pub fn create_new_store<W: Write + Seek>(
    w: &mut W,
    cow_bytes: u64,
    chunk_sectors: u32,
) -> Result<Header, SnapshotError> {
    let g = Geometry::new(chunk_sectors, cow_bytes)?;
    let min = Geometry::min_bytes(chunk_sectors);
    if g.chunks() < 3 {
        return Err(SnapshotError::OverlayTooSmall {
            size: cow_bytes,
            min,
        });
    }
    let header = Header::fresh(chunk_sectors);
    write_zeros(w, 16, 2 * g.chunk_bytes() - 16)?;
    w.seek(SeekFrom::Start(0))?;
    w.write_all(&header.to_bytes())?;
    w.flush()?;
    Ok(header)
}

/// True when `len` bytes at `offset` are all zero (a short file counts as zero: a
/// sparse tail reads as zeros too). Read in blocks, whatever the chunk size.
fn range_is_zero<R: Read + Seek>(r: &mut R, offset: u64, len: u64) -> io::Result<bool> {
    let mut buf = vec![0u8; len.min(64 * 1024) as usize];
    r.seek(SeekFrom::Start(offset))?;
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        let got = read_full(r, &mut buf[..n])?;
        if buf[..got].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        if got < n {
            break;
        }
        left -= n as u64;
    }
    Ok(true)
}

fn write_zeros<W: Write + Seek>(w: &mut W, offset: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; (len.min(COPY_BLOCK as u64)) as usize];
    w.seek(SeekFrom::Start(offset))?;
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        w.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Copies `len` bytes from `src` at `from` to `dst` at `to`.
fn copy_range<R: Read + Seek, W: Write + Seek>(
    src: &mut R,
    from: u64,
    dst: &mut W,
    to: u64,
    len: u64,
    buf: &mut [u8],
) -> Result<(), SnapshotError> {
    src.seek(SeekFrom::Start(from))?;
    dst.seek(SeekFrom::Start(to))?;
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        src.read_exact(&mut buf[..n])?;
        dst.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Runs of consecutive exceptions (old and new both +1), sorted by origin chunk, so big
/// sequential copies replace per-chunk seeks.
fn runs(map: &[(u64, u64)]) -> Vec<(u64, u64, u64)> {
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    for &(old, new) in map {
        if let Some(last) = out.last_mut()
            && last.0 + last.2 == old
            && last.1 + last.2 == new
        {
            last.2 += 1;
            continue;
        }
        out.push((old, new, 1));
    }
    out
}

fn require_valid(store: &Store, origin_sectors: u64) -> Result<(), SnapshotError> {
    if !store.header.is_valid() {
        return Err(SnapshotError::Invalid);
    }
    store.validate(Some(origin_sectors))
}

/// Streams the snapshot view (origin with every exception applied, `origin_bytes` long,
/// rounded down to whole sectors like a loop device) into `out`. This is also an
/// out-of-place merge: neither the origin nor the overlay is changed.
/// `progress(done, total)` is called with bytes.
pub fn write_view<O, C, W>(
    origin: &mut O,
    origin_bytes: u64,
    cow: &mut C,
    store: &Store,
    out: &mut W,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), SnapshotError>
where
    O: Read + Seek,
    C: Read + Seek,
    W: Write,
{
    let view_len = origin_bytes / SECTOR_BYTES * SECTOR_BYTES;
    require_valid(store, view_len / SECTOR_BYTES)?;
    let chunk_bytes = store.geometry.chunk_bytes();
    // The origin is read front to back in whole blocks and the exceptions are laid
    // over each block in memory: one read and one write per MiB however scattered
    // the exceptions are (seeking around each one costs three times the time).
    let runs = runs(&store.chunk_map());
    let mut next_run = 0;
    let mut buf = vec![0u8; COPY_BLOCK];
    let mut pos = 0u64;
    origin.seek(SeekFrom::Start(0))?;
    while pos < view_len {
        let n = (view_len - pos).min(COPY_BLOCK as u64);
        let block = &mut buf[..n as usize];
        origin.read_exact(block)?;
        let end = pos + n;
        // Runs are sorted by origin chunk and do not overlap.
        while next_run < runs.len() && (runs[next_run].0 + runs[next_run].2) * chunk_bytes <= pos {
            next_run += 1;
        }
        let mut r = next_run;
        while r < runs.len() && runs[r].0 * chunk_bytes < end {
            let (old, new, count) = runs[r];
            let from = (old * chunk_bytes).max(pos);
            let to = ((old + count) * chunk_bytes).min(end);
            cow.seek(SeekFrom::Start(
                new * chunk_bytes + (from - old * chunk_bytes),
            ))?;
            cow.read_exact(&mut block[(from - pos) as usize..(to - pos) as usize])?;
            r += 1;
        }
        out.write_all(block)?;
        pos = end;
        progress(pos, view_len);
    }
    progress(view_len, view_len);
    Ok(())
}

/// Copies every exception's data onto the origin in place (clipped at the origin's end)
/// without touching the overlay: the origin becomes the snapshot view. Used by the
/// LiveOS merge, where the overlay must stay intact until the new image is in place.
pub fn apply_exceptions<C, O>(
    cow: &mut C,
    store: &Store,
    origin: &mut O,
    origin_bytes: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64, SnapshotError>
where
    C: Read + Seek,
    O: Write + Seek + SyncData,
{
    let view_len = origin_bytes / SECTOR_BYTES * SECTOR_BYTES;
    require_valid(store, view_len / SECTOR_BYTES)?;
    let chunk_bytes = store.geometry.chunk_bytes();
    let mut buf = vec![0u8; COPY_BLOCK];
    let map = store.chunk_map();
    let total = map.len() as u64;
    let mut done = 0u64;
    for (old, new, n) in runs(&map) {
        let start = old * chunk_bytes;
        let len = (n * chunk_bytes).min(view_len - start);
        copy_range(cow, new * chunk_bytes, origin, start, len, &mut buf)?;
        done += n;
        progress(done, total);
    }
    origin.flush()?;
    origin.sync_data()?;
    Ok(total)
}

/// Merges the overlay into the origin in place the way the kernel's `snapshot-merge`
/// does, with the same end state: the origin equals the snapshot view, every loaded
/// entry in every used area is zeroed, the header and the data chunks are untouched.
/// Areas are processed from the last one backwards and each area's data reaches the
/// origin (synced) before its entries are cleared (synced), so an interrupted merge can
/// simply be run again, by this tool or by the kernel.
pub fn merge_in_place<C, O>(
    cow: &mut C,
    store: &Store,
    origin: &mut O,
    origin_bytes: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64, SnapshotError>
where
    C: Read + Write + Seek + SyncData,
    O: Write + Seek + SyncData,
{
    let view_len = origin_bytes / SECTOR_BYTES * SECTOR_BYTES;
    require_valid(store, view_len / SECTOR_BYTES)?;
    let g = store.geometry;
    let chunk_bytes = g.chunk_bytes();
    let epa = g.exceptions_per_area() as usize;
    let mut buf = vec![0u8; COPY_BLOCK];
    let total = store.exceptions.len() as u64;
    let mut done = 0u64;
    let areas: Vec<&[Exception]> = store.exceptions.chunks(epa).collect();
    for (area, entries) in areas.iter().enumerate().rev() {
        let mut map: Vec<(u64, u64)> = entries.iter().map(|e| (e.old_chunk, e.new_chunk)).collect();
        map.sort_unstable();
        for (old, new, n) in runs(&map) {
            let start = old * chunk_bytes;
            let len = (n * chunk_bytes).min(view_len - start);
            copy_range(cow, new * chunk_bytes, origin, start, len, &mut buf)?;
        }
        origin.flush()?;
        origin.sync_data()?;
        write_zeros(cow, g.area_offset(area as u64), entries.len() as u64 * 16)?;
        cow.flush()?;
        cow.sync_data()?;
        done += entries.len() as u64;
        progress(done, total);
    }
    Ok(total)
}

/// What [`recover_invalid`] found and did.
#[derive(Debug, Clone, Serialize)]
pub struct RecoverReport {
    pub was_invalid: bool,
    pub changed: bool,
    pub exceptions: u64,
    pub metadata_areas: u64,
    /// Status after recovery, as the kernel would print it on the next load.
    pub dm_status_after: String,
    pub free_data_chunks: u64,
    /// Still full: the first new chunk would invalidate it again; grow it.
    pub full: bool,
    pub trap_size: bool,
}

/// Recovers a store the kernel marked Invalid (§7): the metadata is read and validated
/// first (nothing is written if any area or entry is bad: the error names it), then
/// `valid` is set back to 1 (bytes 4..8) and nothing else changes. A store that is
/// already valid is left alone. With `dry_run` nothing is written.
pub fn recover_invalid<F: Read + Write + Seek + SyncData>(
    f: &mut F,
    cow_bytes: u64,
    origin_sectors: Option<u64>,
    dry_run: bool,
) -> Result<RecoverReport, SnapshotError> {
    let header = match read_header(f)? {
        HeaderState::Uninitialised => {
            let g = Geometry::new(LIVEOS_CHUNK_SECTORS, cow_bytes)?;
            return Ok(RecoverReport {
                was_invalid: false,
                changed: false,
                exceptions: 0,
                metadata_areas: 1,
                dm_status_after: format!("16/{} 16", g.total_sectors()),
                free_data_chunks: g.usable_data_chunks(),
                full: g.usable_data_chunks() == 0,
                trap_size: g.is_trap(),
            });
        }
        HeaderState::Initialised(h) => h,
    };
    let mut store = read_store(f, header, cow_bytes)?;
    store.validate(origin_sectors)?;
    let was_invalid = !header.is_valid();
    if was_invalid && !dry_run {
        f.seek(SeekFrom::Start(4))?;
        f.write_all(&1u32.to_le_bytes())?;
        f.flush()?;
        f.sync_data()?;
    }
    store.header.valid = if was_invalid { 1 } else { header.valid };
    let free = store.free_data_chunks();
    Ok(RecoverReport {
        was_invalid,
        changed: was_invalid && !dry_run,
        exceptions: store.exceptions.len() as u64,
        metadata_areas: store.current_area + 1,
        dm_status_after: store.dm_status().to_string(),
        free_data_chunks: free,
        full: free == 0,
        trap_size: store.geometry.is_trap(),
    })
}

/// The size an overlay grows to, and why it differs from the request.
#[derive(Debug, Clone, Serialize)]
pub struct GrowPlan {
    pub chunk_sectors: u32,
    pub current_bytes: u64,
    pub requested_bytes: u64,
    pub new_bytes: u64,
    pub added_bytes: u64,
    pub chunks_before: u64,
    pub chunks_after: u64,
    pub usable_data_chunks_after: u64,
    pub notes: Vec<String>,
}

/// Plans a grow (§8.1): the layout does not depend on the size, so growing is appending
/// zeros. The result is a whole number of chunks, at most `max_bytes` (the FAT limit on a
/// stick) and never a trap size (where filling the last area invalidates the store).
pub fn plan_grow(
    current_bytes: u64,
    requested_bytes: u64,
    chunk_sectors: u32,
    max_bytes: u64,
) -> Result<GrowPlan, SnapshotError> {
    let chunk_bytes = u64::from(chunk_sectors) * SECTOR_BYTES;
    check_chunk_sectors(chunk_sectors)?;
    let mut notes = Vec::new();
    let cannot = |reason: String| SnapshotError::CannotGrow {
        current: current_bytes,
        requested: requested_bytes,
        reason,
    };
    let mut target = requested_bytes;
    if target > max_bytes {
        notes.push(format!(
            "capped at {max_bytes} bytes, the largest file the stick's filesystem can hold"
        ));
        target = max_bytes;
    }
    target = target / chunk_bytes * chunk_bytes;
    let g = Geometry {
        chunk_sectors,
        cow_bytes: target,
    };
    if g.is_trap() {
        notes.push(
            "one chunk less than asked: the requested size would let filling the last metadata area invalidate the overlay"
                .to_string(),
        );
        target -= chunk_bytes;
    }
    if target <= current_bytes {
        return Err(cannot(format!(
            "the result ({target} bytes, whole chunks, limit {max_bytes}) is not larger than the overlay; shrinking is not supported"
        )));
    }
    let before = Geometry {
        chunk_sectors,
        cow_bytes: current_bytes,
    };
    let after = Geometry {
        chunk_sectors,
        cow_bytes: target,
    };
    Ok(GrowPlan {
        chunk_sectors,
        current_bytes,
        requested_bytes,
        new_bytes: target,
        added_bytes: target - current_bytes,
        chunks_before: before.chunks(),
        chunks_after: after.chunks(),
        usable_data_chunks_after: after.usable_data_chunks(),
        notes,
    })
}

/// What a grow must zero so that the new space, which keeps whatever the stick held,
/// can never be read as exceptions: the first metadata area that did not lie whole in
/// the old store. The kernel reads areas in order while they are full; if the last old
/// area was full, the next one it reads is in the new space. Every later area is zeroed
/// by the kernel itself before it is used (`zero_disk_area`), and data chunks are read
/// only through exceptions that point at them.
pub fn grow_zero_ranges(
    chunk_sectors: u32,
    old_bytes: u64,
    new_bytes: u64,
) -> Vec<std::ops::Range<u64>> {
    let g = Geometry {
        chunk_sectors,
        cow_bytes: new_bytes,
    };
    let chunk = g.chunk_bytes();
    if chunk == 0 {
        return Vec::new();
    }
    // The first area whose metadata chunk does not end inside the old store.
    let mut area = (old_bytes / chunk).saturating_sub(1) / g.stride();
    while g.area_offset(area) + chunk <= old_bytes {
        area += 1;
    }
    let at = g.area_offset(area);
    if at + chunk <= new_bytes {
        vec![at..at + chunk]
    } else {
        Vec::new()
    }
}

/// Extends an overlay from `from` to `to` bytes by writing zeros (for media without
/// sparse files, such as a FAT file system reached through `fatfs`).
pub fn extend_with_zeros<W: Write + Seek + SyncData>(
    w: &mut W,
    from: u64,
    to: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), SnapshotError> {
    let zeros = vec![0u8; COPY_BLOCK];
    w.seek(SeekFrom::Start(from))?;
    let mut pos = from;
    while pos < to {
        let n = (to - pos).min(COPY_BLOCK as u64) as usize;
        w.write_all(&zeros[..n])?;
        pos += n as u64;
        progress(pos - from, to.saturating_sub(from));
    }
    w.flush()?;
    w.sync_data()?;
    Ok(())
}

/// A user-space copy-on-write writer: writes to the snapshot view land in the overlay
/// exactly as the kernel would put them (§9), so the kernel can load and continue the
/// store. Data always reaches the medium before the entry that points at it.
#[derive(Debug, Clone)]
pub struct CowWriter {
    store: Store,
    map: HashMap<u64, u64>,
    next_free: u64,
    origin_bytes: u64,
    /// The entries after the end marker of the current area are known to be zero.
    tail_clean: bool,
}

impl CowWriter {
    /// Starts from a loaded store (valid, and passing [`Store::validate`]).
    pub fn new(store: Store, origin_bytes: u64) -> Result<CowWriter, SnapshotError> {
        let origin_bytes = origin_bytes / SECTOR_BYTES * SECTOR_BYTES;
        require_valid(&store, origin_bytes / SECTOR_BYTES)?;
        let map = store
            .exceptions
            .iter()
            .map(|e| (e.old_chunk, e.new_chunk))
            .collect();
        let next_free = store.next_free();
        Ok(CowWriter {
            store,
            map,
            next_free,
            origin_bytes,
            tail_clean: false,
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Writes `data` at `offset` of the snapshot view.
    pub fn write_at<O, C>(
        &mut self,
        origin: &mut O,
        cow: &mut C,
        offset: u64,
        data: &[u8],
    ) -> Result<(), SnapshotError>
    where
        O: Read + Seek,
        C: Read + Write + Seek + SyncData,
    {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= self.origin_bytes)
            .ok_or(SnapshotError::WriteBeyondOrigin {
                offset,
                len: data.len() as u64,
                origin_bytes: self.origin_bytes,
            })?;
        let chunk_bytes = self.store.geometry.chunk_bytes();
        let mut pos = offset;
        while pos < end {
            let old = pos / chunk_bytes;
            let chunk_start = old * chunk_bytes;
            let in_chunk = pos - chunk_start;
            let n = (end - pos).min(chunk_bytes - in_chunk);
            let piece = &data[(pos - offset) as usize..(pos - offset + n) as usize];
            match self.map.get(&old) {
                Some(&new) => {
                    cow.seek(SeekFrom::Start(new * chunk_bytes + in_chunk))?;
                    cow.write_all(piece)?;
                    cow.flush()?;
                }
                None => self.new_exception(origin, cow, old, in_chunk, piece)?,
            }
            pos += n;
        }
        cow.sync_data()?;
        Ok(())
    }

    fn new_exception<O, C>(
        &mut self,
        origin: &mut O,
        cow: &mut C,
        old: u64,
        in_chunk: u64,
        piece: &[u8],
    ) -> Result<(), SnapshotError>
    where
        O: Read + Seek,
        C: Read + Write + Seek + SyncData,
    {
        let g = self.store.geometry;
        let chunk_bytes = g.chunk_bytes();
        let epa = g.exceptions_per_area();
        let f = self.next_free;
        if (f + 1) * u64::from(g.chunk_sectors) > g.total_sectors() {
            return Err(SnapshotError::StoreFull { old_chunk: old });
        }
        let area = self.store.current_area;
        let index = self.store.current_committed;
        let fills_area = index == epa - 1;
        if fills_area && g.area_chunk(area + 1) >= g.chunks() {
            return Err(SnapshotError::AreaTrap {
                old_chunk: old,
                area,
            });
        }
        // Build the chunk: origin data first unless the write covers it all; the part
        // of the chunk past the origin's end keeps whatever the overlay held, as in the kernel.
        let mut chunk = vec![0u8; chunk_bytes as usize];
        let covers_all = in_chunk == 0 && piece.len() as u64 == chunk_bytes;
        if !covers_all {
            let origin_part = chunk_bytes.min(self.origin_bytes - old * chunk_bytes) as usize;
            if origin_part < chunk.len() {
                cow.seek(SeekFrom::Start(f * chunk_bytes))?;
                let got = read_full(cow, &mut chunk)?;
                chunk[got..].fill(0);
            }
            origin.seek(SeekFrom::Start(old * chunk_bytes))?;
            origin.read_exact(&mut chunk[..origin_part])?;
        }
        chunk[in_chunk as usize..in_chunk as usize + piece.len()].copy_from_slice(piece);
        cow.seek(SeekFrom::Start(f * chunk_bytes))?;
        cow.write_all(&chunk)?;
        cow.flush()?;
        cow.sync_data()?;
        if fills_area {
            write_zeros(cow, g.area_offset(area + 1), chunk_bytes)?;
            cow.flush()?;
            cow.sync_data()?;
        }
        if !fills_area && !self.tail_clean {
            // Loading stops at the end marker, so bytes after it may be anything (an old
            // list, garbage). Overwriting the marker would bring them back to life on the
            // next load: phantom remaps, or a "full" area whose successor lies past the
            // end (the kernel refuses the store). The kernel has this flaw; we clear the
            // rest of the area first, synced, so the list stays terminated.
            let tail = g.area_offset(area) + (index + 1) * 16;
            if !range_is_zero(cow, tail, chunk_bytes - (index + 1) * 16)? {
                write_zeros(cow, tail, chunk_bytes - (index + 1) * 16)?;
                cow.flush()?;
                cow.sync_data()?;
            }
            self.tail_clean = true;
        }
        let mut entry = [0u8; 16];
        put_u64(&mut entry, 0, old);
        put_u64(&mut entry, 8, f);
        cow.seek(SeekFrom::Start(g.area_offset(area) + index * 16))?;
        cow.write_all(&entry)?;
        cow.flush()?;
        cow.sync_data()?;

        self.store.exceptions.push(Exception {
            old_chunk: old,
            new_chunk: f,
        });
        self.map.insert(old, f);
        if fills_area {
            self.store.current_area += 1;
            self.store.current_committed = 0;
            // The new area was zeroed whole before the entry that filled the old one.
            self.tail_clean = true;
        } else {
            self.store.current_committed += 1;
        }
        self.next_free = f + 1;
        if g.is_metadata_chunk(self.next_free) {
            self.next_free += 1;
        }
        Ok(())
    }
}

/// How `livestick devices` describes an overlay file that is not an ext4
/// image: read as a dm-snapshot store, which `disk::devices` may not import.
pub struct DevicesProbe;

impl crate::disk::devices::OverlayProbe for DevicesProbe {
    fn describe(
        &self,
        mut file: &mut dyn crate::io::ReadSeek,
        size: u64,
        info: &mut crate::disk::devices::OverlayInfo,
    ) {
        match status(&mut file, size, 8, None) {
            Ok(report) => {
                info.kind = Some("dm-snapshot");
                info.state = Some(report.state.to_string());
                info.percent_used = Some(report.percent_used);
                info.dm_status = Some(report.dm_status);
            }
            Err(e) => info.problem = Some(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {

    /// A reset zeroes the header's sector and syncs it before the exception area:
    /// a stop between them leaves a store the kernel starts anew, never a valid
    /// header over a half-emptied area.
    #[test]
    fn a_reset_kills_the_header_first_and_on_its_own() {
        let len = 8u64 << 20;
        let mut w = crate::io::SyncRecorder::new(vec![0xa5u8; len as usize]);
        reset_store(&mut w, len).unwrap();
        let first_sync = w.syncs[0];
        assert!(first_sync > 0);
        assert!(
            w.writes[..first_sync]
                .iter()
                .all(|&(at, n)| at + n as u64 <= SECTOR_BYTES),
            "{:?}",
            &w.writes[..first_sync]
        );
        assert_eq!(w.syncs.last(), Some(&w.writes.len()), "the rest synced too");
        let end = new_store_range(len).end as usize;
        let bytes = w.inner.into_inner();
        assert!(bytes[..end].iter().all(|&b| b == 0));
        assert!(bytes[end..].iter().all(|&b| b == 0xa5));
    }
    #[test]
    fn a_grow_zeroes_the_first_area_beyond_the_old_store() {
        // 4 KiB chunks: 256 exceptions per area, areas at chunks 1, 258, 515, …
        let chunk = 4096u64;
        let area = |k: u64| (1 + k * 257) * chunk;
        // Old store ends exactly after area 0's data: area 1 is in the new space.
        let old = 258 * chunk;
        assert_eq!(
            grow_zero_ranges(8, old, old + 10 * chunk),
            vec![area(1)..area(1) + chunk]
        );
        // Old store ends in the middle of area 1's data: area 1 was the kernel's
        // already, area 2 is the first one that may be stale.
        let old = area(1) + 100 * chunk;
        assert_eq!(
            grow_zero_ranges(8, old, area(3)),
            vec![area(2)..area(2) + chunk]
        );
        // A partial chunk at the old end counts as new space.
        let old = area(2) + 10;
        assert_eq!(
            grow_zero_ranges(8, old, area(3)),
            vec![area(2)..area(2) + chunk]
        );
        // The next area does not fit in the grown store: nothing to zero.
        assert!(grow_zero_ranges(8, 258 * chunk, 258 * chunk + 100).is_empty());
    }

    use super::*;
    use std::io::Cursor;

    fn cow_with(header: Header, entries: &[(u64, u64)], len: usize) -> Cursor<Vec<u8>> {
        let mut v = vec![0u8; len];
        v[..16].copy_from_slice(&header.to_bytes());
        let b = header.chunk_sectors as usize * 512;
        for (i, (o, n)) in entries.iter().enumerate() {
            v[b + 16 * i..b + 16 * i + 8].copy_from_slice(&o.to_le_bytes());
            v[b + 16 * i + 8..b + 16 * i + 16].copy_from_slice(&n.to_le_bytes());
        }
        Cursor::new(v)
    }

    #[test]
    fn capacity_matches_the_spec_table() {
        let g = |n: u64| Geometry {
            chunk_sectors: 8,
            cow_bytes: n * 4096,
        };
        assert_eq!(g(16).usable_data_chunks(), 14);
        assert_eq!(g(258).usable_data_chunks(), 255);
        assert_eq!(g(259).usable_data_chunks(), 256);
        assert!(g(258).is_trap());
        assert!(!g(259).is_trap());
        assert_eq!(g(262_144).usable_data_chunks(), 261_122);
    }

    #[test]
    fn status_figures_follow_the_kernel() {
        // T2 in the spec: 7 exceptions in a 2 MiB overlay.
        let entries: Vec<(u64, u64)> = [5, 6, 7, 100, 3, 1024, 200]
            .iter()
            .enumerate()
            .map(|(i, &o)| (o, i as u64 + 2))
            .collect();
        let mut cow = cow_with(Header::fresh(8), &entries, 2 << 20);
        let r = status(&mut cow, 2 << 20, 8, None).unwrap();
        assert_eq!(r.dm_status, "72/4096 16");
        // A corrupted new_chunk loads and shows allocated > total.
        let mut cow = cow_with(Header::fresh(8), &[(3, 10000)], 1 << 20);
        let r = status(&mut cow, 1 << 20, 8, None).unwrap();
        assert_eq!(r.dm_status, "80008/2048 16");
        assert!(!r.problems.is_empty());
    }

    /// A metadata area listing more exceptions than the overlay has chunks is refused
    /// as it is read, before they are gathered (a crafted area with a huge chunk size
    /// could list tens of millions).
    #[test]
    fn more_exceptions_than_chunks_are_refused_while_reading() {
        let len = 32usize << 10;
        let entries: Vec<(u64, u64)> = (0..10).map(|i| (i, 2)).collect();
        let mut cow = cow_with(Header::fresh(8), &entries, len);
        let refused = read_store(&mut cow, Header::fresh(8), len as u64).unwrap_err();
        assert!(
            matches!(
                refused,
                SnapshotError::MoreExceptionsThanChunks {
                    area: 0,
                    index: 8,
                    chunks: 8
                }
            ),
            "{refused}"
        );
        // As many as fit are read (and judged by validate, as before).
        let mut cow = cow_with(Header::fresh(8), &entries[..5], len);
        assert_eq!(
            read_store(&mut cow, Header::fresh(8), len as u64)
                .unwrap()
                .exceptions
                .len(),
            5
        );
    }

    #[test]
    fn the_devices_listing_reads_a_store_or_says_why_not() {
        use crate::disk::devices::{OverlayInfo, OverlayProbe};
        let blank = || OverlayInfo {
            file: "/LiveOS/overlay-L-U".into(),
            size: 1 << 20,
            kind: None,
            state: None,
            percent_used: None,
            dm_status: None,
            problem: None,
        };
        let mut info = blank();
        let mut cow = cow_with(Header::fresh(8), &[(3, 2)], 1 << 20);
        DevicesProbe.describe(&mut cow, 1 << 20, &mut info);
        let mut expected = cow_with(Header::fresh(8), &[(3, 2)], 1 << 20);
        let report = status(&mut expected, 1 << 20, 8, None).unwrap();
        assert_eq!(info.kind, Some("dm-snapshot"));
        assert_eq!(info.state, Some(report.state.to_string()));
        assert_eq!(info.percent_used, Some(report.percent_used));
        assert_eq!(info.dm_status, Some(report.dm_status));
        assert_eq!(info.problem, None);

        let mut h = Header::fresh(8);
        h.magic = 0x1234;
        let mut info = blank();
        DevicesProbe.describe(&mut cow_with(h, &[], 8192), 8192, &mut info);
        assert_eq!(info.kind, None);
        assert!(info.problem.is_some(), "{info:?}");
    }

    #[test]
    fn malformed_headers_are_typed_errors() {
        let mut h = Header::fresh(8);
        h.magic = 0x1234;
        assert!(matches!(
            read_header(&mut cow_with(h, &[], 8192)),
            Err(SnapshotError::BadMagic { .. })
        ));
        for c in [0, 12, 1 << 31] {
            let mut h = Header::fresh(8);
            h.chunk_sectors = c;
            assert!(matches!(
                read_header(&mut cow_with(h, &[], 8192)),
                Err(SnapshotError::BadChunkSize { .. })
            ));
        }
        let mut h = Header::fresh(8);
        h.version = 2;
        assert!(matches!(
            read_header(&mut cow_with(h, &[], 8192)),
            Err(SnapshotError::UnsupportedVersion { version: 2 })
        ));
        assert!(matches!(
            read_header(&mut Cursor::new(vec![0u8; 5])),
            Err(SnapshotError::TooShort { len: 5 })
        ));
    }

    #[test]
    fn full_area_without_room_for_the_next_is_refused() {
        // 256 entries fill area 0 of a 258-chunk file; area 1 would be chunk 258.
        let entries: Vec<(u64, u64)> = (0..256).map(|i| (i, i + 2)).collect();
        let mut cow = cow_with(Header::fresh(8), &entries, 258 * 4096);
        assert!(matches!(
            open_store(&mut cow, 258 * 4096),
            Err(SnapshotError::AreaBeyondEnd { area: 1, .. })
        ));
    }

    #[test]
    fn truncated_area_is_a_typed_error() {
        // The caller claims a longer file than the stream holds.
        let mut cow = cow_with(Header::fresh(8), &[(1, 2)], 6000);
        assert!(matches!(
            open_store(&mut cow, 3 * 4096),
            Err(SnapshotError::TruncatedArea { area: 0, .. })
        ));
    }

    #[test]
    fn validation_names_area_and_entry() {
        let mut cow = cow_with(Header::fresh(8), &[(1, 2), (1, 3)], 1 << 20);
        let Opened::Valid(s) = open_store(&mut cow, 1 << 20).unwrap() else {
            panic!("expected a valid store")
        };
        assert!(matches!(
            s.validate(None),
            Err(SnapshotError::DuplicateOldChunk {
                area: 0,
                index: 1,
                ..
            })
        ));
        let mut cow = cow_with(Header::fresh(8), &[(1, 258)], 2 << 20);
        let Opened::Valid(s) = open_store(&mut cow, 2 << 20).unwrap() else {
            panic!("expected a valid store")
        };
        assert!(matches!(
            s.validate(None),
            Err(SnapshotError::NewChunkIsMetadata { .. })
        ));
        let mut cow = cow_with(Header::fresh(8), &[(99, 2)], 1 << 20);
        let Opened::Valid(s) = open_store(&mut cow, 1 << 20).unwrap() else {
            panic!("expected a valid store")
        };
        assert!(matches!(
            s.validate(Some(80)),
            Err(SnapshotError::OldChunkBeyondOrigin { old_chunk: 99, .. })
        ));
    }

    /// Fuzzer find (`fuzz/artifacts/snapshot_store/regression-cowwriter-junk-tail`): a
    /// store whose current area holds non-zero entries after the end marker. Writing the
    /// next entry over the marker revived them: here area 1 then looked full, and area 2
    /// lies past the end, so the written store no longer loaded (`AreaBeyondEnd`).
    /// write_view lays exceptions over whole origin blocks: runs that straddle the
    /// 1 MiB block boundaries, chunks bigger than a block, and a view that ends inside
    /// a chunk must all come out as the plain copy with the same writes.
    #[test]
    fn write_view_over_block_boundaries_equals_a_plain_copy() {
        for chunk_sectors in [8u32, 4096] {
            let origin_bytes = (3 << 20) + (512 * 7);
            let base: Vec<u8> = (0..origin_bytes).map(|i| (i * 7 % 251) as u8).collect();
            let mut plain = base.clone();
            let mut origin = Cursor::new(base);
            let cow_len = 16 << 20;
            let mut cow = Cursor::new(vec![0u8; cow_len]);
            create_new_store(&mut cow, cow_len as u64, chunk_sectors).unwrap();
            let Opened::Valid(store) = open_store(&mut cow, cow_len as u64).unwrap() else {
                panic!("new store")
            };
            let mut w = CowWriter::new(*store, origin_bytes as u64).unwrap();
            let writes: [(usize, usize); 5] = [
                ((1 << 20) - 4096, 8192),     // across the first block boundary
                ((2 << 20) - 100, 300),       // across the second, unaligned
                (10, 5),                      // the very start
                (origin_bytes - 600, 600),    // the last sectors (view ends in a chunk)
                ((1 << 20) + 50_000, 70_000), // inside a block, several chunks
            ];
            for (k, (at, len)) in writes.into_iter().enumerate() {
                let data = vec![0xA0 + k as u8; len];
                w.write_at(&mut origin, &mut cow, at as u64, &data).unwrap();
                plain[at..at + len].copy_from_slice(&data);
            }
            let store = w.store().clone();
            let mut out = Vec::new();
            write_view(
                &mut origin,
                origin_bytes as u64,
                &mut cow,
                &store,
                &mut out,
                &mut |_, _| {},
            )
            .unwrap();
            assert_eq!(out.len(), origin_bytes, "chunk {chunk_sectors}");
            assert!(
                out == plain,
                "chunk {chunk_sectors}: view differs from the plain copy"
            );
        }
    }

    #[test]
    fn cow_writer_keeps_the_list_terminated_over_junk() {
        // Chunk size 1 sector: 32 entries per area; 40 chunks hold areas 0 and 1 only.
        let mut entries: Vec<(u64, u64)> = (0..32).map(|i| (i, i + 2)).collect();
        entries.push((32, 35));
        entries.push((7, 0)); // the end marker (old_chunk is ignored)
        entries.extend((0..30).map(|i| (100 + i, 36 + i))); // junk up to the area's end
        let len = 40 * 512;
        let mut cow = cow_with(Header::fresh(1), &[], len);
        for (i, (o, n)) in entries.iter().enumerate() {
            let at = if i < 32 {
                512 + 16 * i
            } else {
                34 * 512 + 16 * (i - 32)
            };
            cow.get_mut()[at..at + 8].copy_from_slice(&o.to_le_bytes());
            cow.get_mut()[at + 8..at + 16].copy_from_slice(&n.to_le_bytes());
        }
        let Opened::Valid(store) = open_store(&mut cow, len as u64).unwrap() else {
            panic!("expected a valid store")
        };
        assert_eq!(store.exceptions.len(), 33);
        let origin_bytes = 64 * 512;
        let mut origin = Cursor::new(vec![0x11u8; origin_bytes]);
        let mut w = CowWriter::new(*store, origin_bytes as u64).unwrap();
        w.write_at(&mut origin, &mut cow, 40 * 512 + 3, b"new data")
            .unwrap();
        let Opened::Valid(reread) = open_store(&mut cow, len as u64).unwrap() else {
            panic!("the written store must still load")
        };
        assert_eq!(reread.exceptions, w.store().exceptions);
        assert_eq!(reread.exceptions.len(), 34);

        // The same on a phantom remap: (50, 3) after the marker would have come back.
        let mut cow = cow_with(Header::fresh(8), &[(1, 2), (7, 0), (50, 3)], 16 * 4096);
        let Opened::Valid(store) = open_store(&mut cow, 16 * 4096).unwrap() else {
            panic!("expected a valid store")
        };
        let mut origin = Cursor::new(vec![0x22u8; 64 * 4096]);
        let mut w = CowWriter::new(*store, 64 * 4096).unwrap();
        w.write_at(&mut origin, &mut cow, 5 * 4096, b"x").unwrap();
        let Opened::Valid(reread) = open_store(&mut cow, 16 * 4096).unwrap() else {
            panic!("the written store must still load")
        };
        assert_eq!(reread.exceptions, w.store().exceptions);
        assert!(reread.validate(Some(64 * 8)).is_ok());
    }

    #[test]
    fn grow_avoids_trap_sizes_and_the_fat_limit() {
        let p = plan_grow(1 << 20, 256 << 20, 8, FAT_MAX_FILE_BYTES).unwrap();
        assert_eq!(p.new_bytes, (256 << 20) - 4096);
        let p = plan_grow(1 << 20, 8 << 30, 8, FAT_MAX_FILE_BYTES).unwrap();
        assert_eq!(p.new_bytes, (4 << 30) - 4096);
        assert!(plan_grow(1 << 20, 1 << 19, 8, FAT_MAX_FILE_BYTES).is_err());
    }

    #[test]
    fn format_new_overlay_zeroes_the_start_only() {
        let mut c = Cursor::new(vec![0xAAu8; 256 * 1024]);
        format_new_overlay(&mut c, 256 * 1024).unwrap();
        let v = c.into_inner();
        assert!(v[..65536].iter().all(|&b| b == 0));
        assert!(v[65536..].iter().all(|&b| b == 0xAA));
        assert!(format_new_overlay(&mut Cursor::new(vec![]), 4096).is_err());
    }
}
