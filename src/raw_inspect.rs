//! `livestick inspect` of a raw disk image (issue 15): what `write` would put on a
//! stick as it is. Compression and sizes, the partition table (MBR or GPT), each
//! partition's type, name and file system (type, label and UUID as libblkid names
//! them), and the `.bmap` beside it. Nothing inside the image is planned or changed.
//!
//! A plain image is read where the table and each partition's superblock are; a
//! compressed one is unpacked once, in memory and only as far as the last
//! partition's superblock, keeping just the bytes that are looked at.

use std::fmt;
use std::fs::File;
use std::io::{self, Cursor, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use thiserror::Error;

use crate::disk::devices::{self, FsInfo};
use crate::disk::partition::{self, TableKind};
use crate::error::{Classify, ErrorKind};
use crate::raw_write;
use crate::size::human;
use crate::source::bmap::{self, Bmap, BmapError};
use crate::source::compressed::StatedSize;
use crate::source::raw::{RawError, RawImage};

/// The version of the raw image's `inspect --json` document
/// (schemas/inspect-raw.schema.json).
pub const INSPECT_RAW_SCHEMA: u32 = 1;

/// The start of the image that holds any partition table: the MBR, the GPT header
/// and its 128 entries, with room to spare.
const TABLE_BYTES: u64 = 1 << 20;
/// What is read at each partition's start: past a btrfs superblock (at 64 KiB),
/// the furthest of the signatures recognised.
const SUPERBLOCK_BYTES: u64 = 68 * 1024;
/// The logical sector size of the images livestick writes.
const SECTOR: u64 = 512;

#[derive(Debug, Error)]
pub enum RawInspectError {
    #[error(transparent)]
    Raw(#[from] RawError),
    #[error("reading the block map {}: {source}; fix or remove it", path.display())]
    BmapRead {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the block map {} cannot be used: {source}; fix or remove it", path.display())]
    BmapMalformed {
        path: PathBuf,
        #[source]
        source: BmapError,
    },
}

impl Classify for RawInspectError {
    fn kind(&self) -> ErrorKind {
        match self {
            RawInspectError::Raw(e) => e.kind(),
            RawInspectError::BmapRead { .. } | RawInspectError::BmapMalformed { .. } => {
                ErrorKind::BadInput
            }
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            RawInspectError::Raw(e) => e.hint(),
            _ => self.kind().hint(),
        }
    }
}

/// A raw disk image as `inspect` describes it.
#[derive(Debug, Clone, Serialize)]
pub struct RawDescription {
    pub schema: u32,
    /// The path as given.
    pub source: PathBuf,
    /// `raw-image`: which document this is (a live source's says `iso` or `stick`).
    pub source_kind: &'static str,
    /// Why `write` takes it as a raw image.
    pub why: String,
    /// `xz`, `zstd`, `gzip`, `bzip2`, or `null` for a plain image.
    pub compression: Option<&'static str>,
    /// The file as stored.
    pub file_bytes: u64,
    /// The image once unpacked, when the file states it exactly (`null`: found
    /// only by unpacking it all, which `write` does while streaming).
    pub image_bytes: Option<u64>,
    /// `mbr` or `gpt`; `null` when the image has neither.
    pub table: Option<&'static str>,
    pub partitions: Vec<RawPartition>,
    pub bmap: Option<BmapSummary>,
    pub notes: Vec<String>,
}

/// One partition of the image's table.
#[derive(Debug, Clone, Serialize)]
pub struct RawPartition {
    pub number: u32,
    pub start_bytes: u64,
    pub size_bytes: u64,
    /// `0x83` for MBR, the type GUID for GPT.
    pub type_id: String,
    /// The type in words, when livestick knows it (`EFI system`, `Linux filesystem`).
    pub type_name: Option<&'static str>,
    /// The GPT partition name (`null` for MBR).
    pub name: Option<String>,
    /// The GPT unique partition GUID (PARTUUID; `null` for MBR).
    pub part_uuid: Option<String>,
    pub bootable: bool,
    /// The file system at its start (`null`: none recognised, or an extended
    /// partition).
    pub filesystem: Option<FsInfo>,
}

/// The `.bmap` beside the image (bmaptool's block map), which `write` follows.
#[derive(Debug, Clone, Serialize)]
pub struct BmapSummary {
    pub path: PathBuf,
    pub version: String,
    pub image_bytes: u64,
    pub block_bytes: u64,
    pub mapped_bytes: u64,
}

/// Describes the raw image at `path`; `why` is `raw_write::detect`'s reason.
pub fn describe(path: &Path, why: String) -> Result<RawDescription, RawInspectError> {
    let image = RawImage::open(path)?;
    let image_bytes = match image.size {
        StatedSize::Exact(n) => Some(n),
        StatedSize::AtLeast(_) | StatedSize::Unknown => None,
    };
    let mut notes = Vec::new();
    let mut reader = ImageBytes::new(&image)?;
    let head = reader.head(TABLE_BYTES)?;
    let disk_size = image_bytes.unwrap_or(u64::MAX);
    let table = match partition::read_table(&mut Cursor::new(&head), disk_size, SECTOR) {
        Ok(found) => found,
        Err(e) => {
            notes.push(format!(
                "the partition table could not be read whole from the image's first {} ({e})",
                human(TABLE_BYTES)
            ));
            None
        }
    };
    let (kind, entries) = match table {
        Some((kind, entries)) => (Some(kind), entries),
        None => (None, Vec::new()),
    };
    let wanted: Vec<u64> = entries
        .iter()
        .filter(|e| !e.is_extended())
        .map(|e| e.start)
        .collect();
    if image.compression.is_some() && !wanted.is_empty() {
        notes.push(
            "the partitions' file systems were read by unpacking the image as far as the last one's superblock".into(),
        );
    }
    let superblocks = reader.ranges(&wanted, SUPERBLOCK_BYTES)?;
    let partitions = entries
        .into_iter()
        .map(|e| {
            let filesystem = superblocks
                .iter()
                .find(|(start, _)| *start == e.start && !e.is_extended())
                .and_then(|(_, bytes)| filesystem_of(bytes, e.len));
            RawPartition {
                number: e.number,
                start_bytes: e.start,
                size_bytes: e.len,
                type_id: e.type_id,
                type_name: e.type_name,
                name: e.name,
                part_uuid: e.part_uuid,
                bootable: e.bootable,
                filesystem,
            }
        })
        .collect();
    if image_bytes.is_none() {
        notes.push(format!(
            "{} does not state the unpacked size here: `write` learns it while streaming",
            image.compression.map(|f| f.name()).unwrap_or("the file")
        ));
    }
    let bmap = match raw_write::bmap_beside(path) {
        None => None,
        Some(p) => {
            let text = std::fs::read_to_string(&p).map_err(|source| RawInspectError::BmapRead {
                path: p.clone(),
                source,
            })?;
            let map: Bmap =
                bmap::parse(&text).map_err(|source| RawInspectError::BmapMalformed {
                    path: p.clone(),
                    source,
                })?;
            Some(BmapSummary {
                path: p,
                version: map.version,
                image_bytes: map.image_size,
                block_bytes: map.block_size,
                // The last block may run past the image's end.
                mapped_bytes: map
                    .ranges
                    .iter()
                    .map(|r| {
                        let start = r.first * map.block_size;
                        ((r.last + 1) * map.block_size)
                            .min(map.image_size)
                            .saturating_sub(start)
                    })
                    .sum(),
            })
        }
    };
    Ok(RawDescription {
        schema: INSPECT_RAW_SCHEMA,
        source: path.to_path_buf(),
        source_kind: "raw-image",
        why,
        compression: image.compression.map(|f| f.name()),
        file_bytes: image.file_len,
        image_bytes,
        table: kind.map(|k| match k {
            TableKind::Mbr => "mbr",
            TableKind::Gpt => "gpt",
        }),
        partitions,
        bmap,
        notes,
    })
}

/// The file system whose superblock starts `bytes` (a partition of `len` bytes):
/// what `disk::devices` recognises, and XFS and btrfs, which raw images of Fedora's
/// server and IoT editions carry and a live stick never does.
fn filesystem_of(bytes: &[u8], len: u64) -> Option<FsInfo> {
    let known = devices::peek_filesystem(&mut Cursor::new(bytes), 0, len.min(bytes.len() as u64));
    known.or_else(|| xfs_or_btrfs(bytes))
}

fn xfs_or_btrfs(b: &[u8]) -> Option<FsInfo> {
    let text = |field: &[u8]| {
        let end = field.iter().position(|&c| c == 0).unwrap_or(field.len());
        let s = String::from_utf8_lossy(&field[..end]).trim().to_string();
        (!s.is_empty()).then_some(s)
    };
    let uuid = |field: &[u8]| {
        uuid::Uuid::from_slice(field)
            .ok()
            .map(|u| u.hyphenated().to_string())
    };
    // XFS: "XFSB", the UUID at 32, the 12-byte label at 108 (big-endian superblock).
    if b.get(0..4) == Some(b"XFSB") && b.len() >= 120 {
        return Some(FsInfo {
            fs_type: "xfs".into(),
            label: text(&b[108..120]),
            uuid: uuid(&b[32..48]),
        });
    }
    // btrfs: the superblock at 64 KiB, its magic at 64, fsid at 32, label at 299.
    const BTRFS: usize = 64 * 1024;
    if b.get(BTRFS + 64..BTRFS + 72) == Some(b"_BHRfS_M") && b.len() >= BTRFS + 299 + 256 {
        return Some(FsInfo {
            fs_type: "btrfs".into(),
            label: text(&b[BTRFS + 299..BTRFS + 299 + 256]),
            uuid: uuid(&b[BTRFS + 32..BTRFS + 48]),
        });
    }
    None
}

/// The image's bytes at given offsets: read in place from a plain file, or kept
/// from one forward pass of the decompressor.
struct ImageBytes {
    path: PathBuf,
    /// The compression's name, for the error of a stream that ends early.
    format: &'static str,
    source: Source,
}

enum Source {
    Plain(File),
    Stream {
        stream: crate::source::raw::RawStream,
        at: u64,
    },
}

impl ImageBytes {
    fn new(image: &RawImage) -> Result<ImageBytes, RawInspectError> {
        let source = match image.compression {
            None => Source::Plain(File::open(&image.path).map_err(|source| RawError::Open {
                path: image.path.clone(),
                source,
            })?),
            Some(_) => Source::Stream {
                stream: image.stream()?,
                at: 0,
            },
        };
        Ok(ImageBytes {
            path: image.path.clone(),
            format: image.compression.map(|f| f.name()).unwrap_or("plain"),
            source,
        })
    }

    /// The first `len` bytes (fewer when the image is shorter).
    fn head(&mut self, len: u64) -> Result<Vec<u8>, RawInspectError> {
        Ok(self
            .ranges(&[0], len)?
            .pop()
            .map(|(_, b)| b)
            .unwrap_or_default())
    }

    /// `len` bytes (fewer at the image's end) at each of `starts`, with its start.
    /// A stream only goes forward: the starts are visited in order, and each must
    /// lie at or past what was read before.
    fn ranges(&mut self, starts: &[u64], len: u64) -> Result<Vec<(u64, Vec<u8>)>, RawInspectError> {
        let mut sorted = starts.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut out = Vec::new();
        let path = self.path.clone();
        let read_error = |at: u64| {
            let path = path.clone();
            move |e: io::Error| {
                RawError::from_io(e).unwrap_or_else(|source| RawError::Read { path, at, source })
            }
        };
        for start in sorted {
            let bytes = match &mut self.source {
                Source::Plain(file) => read_at_most(file, start, len).map_err(read_error(start))?,
                Source::Stream { stream, at } => {
                    if start < *at {
                        // Overlaps what was just read (partitions closer than
                        // a superblock's reach): not recognised, as a damaged
                        // table deserves.
                        continue;
                    }
                    let wanted = start - *at;
                    let skipped = io::copy(&mut (&mut *stream).take(wanted), &mut io::sink())
                        .map_err(read_error(*at))?;
                    *at += skipped;
                    if skipped < wanted {
                        // The table names a partition the stream never reaches.
                        return Err(RawError::Truncated {
                            path: self.path.clone(),
                            format: self.format,
                            at: *at,
                        }
                        .into());
                    }
                    let mut bytes = Vec::new();
                    let got = (&mut *stream)
                        .take(len)
                        .read_to_end(&mut bytes)
                        .map_err(read_error(start))?;
                    *at += got as u64;
                    bytes
                }
            };
            out.push((start, bytes));
        }
        Ok(out)
    }
}

fn read_at_most(file: &File, start: u64, len: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    let mut got = 0usize;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], start + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

impl fmt::Display for RawDescription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "source: {}", self.source.display())?;
        writeln!(f, "kind: raw disk image ({})", self.why)?;
        match self.compression {
            Some(c) => writeln!(f, "compression: {c}, {} stored", human(self.file_bytes))?,
            None => writeln!(f, "compression: none")?,
        }
        match self.image_bytes {
            Some(n) => writeln!(f, "image size: {}", human(n))?,
            None => writeln!(f, "image size: not stated by the file")?,
        }
        match self.table {
            Some(t) => writeln!(f, "partition table: {}", t.to_ascii_uppercase())?,
            None => writeln!(f, "partition table: none")?,
        }
        for p in &self.partitions {
            let mut line = format!(
                "partition {}: {} at {}, {}",
                p.number,
                human(p.size_bytes),
                human(p.start_bytes),
                p.type_name.unwrap_or(&p.type_id)
            );
            if let Some(name) = &p.name {
                line.push_str(&format!(", named {name:?}"));
            }
            if p.bootable {
                line.push_str(", bootable");
            }
            match &p.filesystem {
                Some(fs) => {
                    line.push_str(&format!(", {}", fs.fs_type));
                    if let Some(label) = &fs.label {
                        line.push_str(&format!(" labelled {label:?}"));
                    }
                    if let Some(uuid) = &fs.uuid {
                        line.push_str(&format!(" (UUID {uuid})"));
                    }
                }
                None => line.push_str(", no file system recognised"),
            }
            writeln!(f, "{line}")?;
        }
        match &self.bmap {
            Some(b) => writeln!(
                f,
                "block map: {} (bmap {}): {} of {} mapped, in {} blocks; `write` writes and checks only those",
                b.path.display(),
                b.version,
                human(b.mapped_bytes),
                human(b.image_bytes),
                human(b.block_bytes)
            )?,
            None => writeln!(
                f,
                "block map: none beside the image; `write` writes every byte"
            )?,
        }
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        writeln!(
            f,
            "write: `livestick write` puts it on a stick as it is, with no persistence"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xfs_and_btrfs_are_told_by_their_superblocks() {
        let mut xfs = vec![0u8; 4096];
        xfs[..4].copy_from_slice(b"XFSB");
        xfs[32..48].copy_from_slice(&[0x11; 16]);
        xfs[108..112].copy_from_slice(b"root");
        let fs = xfs_or_btrfs(&xfs).expect("xfs");
        assert_eq!(fs.fs_type, "xfs");
        assert_eq!(fs.label.as_deref(), Some("root"));
        assert_eq!(
            fs.uuid.as_deref(),
            Some("11111111-1111-1111-1111-111111111111")
        );

        let mut btrfs = vec![0u8; SUPERBLOCK_BYTES as usize];
        btrfs[65536 + 64..65536 + 72].copy_from_slice(b"_BHRfS_M");
        btrfs[65536 + 299..65536 + 305].copy_from_slice(b"fedora");
        let fs = xfs_or_btrfs(&btrfs).expect("btrfs");
        assert_eq!(fs.fs_type, "btrfs");
        assert_eq!(fs.label.as_deref(), Some("fedora"));
        assert!(xfs_or_btrfs(&vec![0u8; SUPERBLOCK_BYTES as usize]).is_none());
    }
}
