//! A small read-only ISO 9660 reader with Rock Ridge and Joliet names.
//!
//! livestick never mounts the ISO: it needs the *byte extents* of each file so
//! that `LiveOS/squashfs.img` can be streamed straight from the ISO into the
//! target. The reader therefore exposes every file as a list of [`Extent`]s
//! (several for multi-extent files, ISO level 3) and only reads directories
//! itself.
//!
//! Names come from, in order of preference:
//! 1. Rock Ridge `NM` entries (SUSP, with `CE` continuation areas and the
//!    `SP` skip count) in the primary tree; deep directories relocated with
//!    `CL`/`RE` are followed back to where they belong;
//! 2. the Joliet supplementary tree (UCS-2/UTF-16 big-endian) when there is no
//!    Rock Ridge;
//! 3. plain ISO 9660 identifiers with the `;1` version and a trailing `.`
//!    removed.
//!
//! Every input is untrusted: each malformed structure becomes a typed
//! [`IsoError`] that says what is wrong and what to do about it, recursion and
//! allocations are bounded, and nothing panics.

use std::collections::HashSet;
use std::io::{self, Read, Seek, SeekFrom};

use thiserror::Error;

use crate::bytes::{u16_at, u32_at};

/// Volume descriptors start at sector 16 whatever the logical block size.
const DESCRIPTOR_START: u64 = 16 * 2048;
const DESCRIPTOR_SIZE: usize = 2048;
/// How many volume descriptors are scanned before giving up on a terminator.
/// Real images have 2–4; the bound keeps garbage from being scanned forever.
const MAX_DESCRIPTORS: u64 = 64;
/// The application-use field of the PVD (where isomd5sum implants its MD5).
pub const APPLICATION_DATA_OFFSET: usize = 883;
pub const APPLICATION_DATA_LEN: usize = 512;

/// Largest directory read into memory. A directory of 100 000 entries with
/// long Rock Ridge names is about 20 MiB; anything larger is corrupt or hostile.
const MAX_DIR_BYTES: u64 = 64 << 20;
/// Deepest path followed. Rock Ridge allows paths deeper than ISO 9660's 8
/// levels; 256 is far beyond any real image and keeps recursion bounded.
const MAX_DEPTH: usize = 256;
/// Most entries `walk` returns, so a hostile image cannot exhaust memory.
const MAX_WALK_ENTRIES: usize = 2_000_000;
/// Most SUSP continuation areas followed for one directory record.
const MAX_CE_HOPS: usize = 32;
/// Largest single continuation area (the format allows at most one block).
const MAX_CE_LEN: u64 = 64 << 10;
/// Longest name accepted after joining Rock Ridge `NM` pieces.
const MAX_NAME_BYTES: usize = 4096;

const FLAG_DIRECTORY: u8 = 0x02;
const FLAG_MULTI_EXTENT: u8 = 0x80;
/// Size of a directory record without its identifier.
const RECORD_FIXED_LEN: usize = 33;

/// Everything that can go wrong reading an ISO image.
#[derive(Debug, Error)]
pub enum IsoError {
    #[error("reading the ISO image at byte {offset} failed: {source}")]
    Io {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "no ISO9660 primary volume descriptor at byte 32768 ({detail}) — is this an ISO image?"
    )]
    NotIso { detail: String },
    #[error(
        "the ISO image is truncated: its primary volume descriptor declares {declared} bytes \
         but the file has only {actual} bytes ({} missing) — the download is probably \
         incomplete; download the ISO again",
        declared.saturating_sub(*actual)
    )]
    Truncated { declared: u64, actual: u64 },
    #[error(
        "unsupported logical block size {0} in the primary volume descriptor (ISO 9660 allows \
         512, 1024 or 2048) — the ISO is corrupt; download it again"
    )]
    BadBlockSize(u64),
    #[error("malformed {what} at byte {offset}: {detail} — the ISO is corrupt; download it again")]
    Malformed {
        what: &'static str,
        offset: u64,
        detail: String,
    },
    #[error(
        "{path}: extent at byte {offset} of {len} bytes reaches past the end of the image \
         ({image_len} bytes) — the ISO is truncated or corrupt; download it again"
    )]
    ExtentOutOfBounds {
        path: String,
        offset: u64,
        len: u64,
        image_len: u64,
    },
    #[error(
        "{path}: directory loop (the directory at byte {offset} is already reached by another \
         path) — the ISO is corrupt; download it again"
    )]
    DirectoryLoop { path: String, offset: u64 },
    #[error(
        "{path}: directories nested deeper than {max} levels — the ISO is corrupt or not a \
         live image"
    )]
    TooDeep { path: String, max: usize },
    #[error(
        "{path}: directory of {size} bytes is larger than the {max} bytes livestick reads — \
         the ISO is corrupt or not a live image"
    )]
    DirectoryTooLarge { path: String, size: u64, max: u64 },
    #[error(
        "{path}: more than {max} files and directories — the ISO is corrupt or not a live image"
    )]
    TooManyEntries { path: String, max: usize },
    #[error("{path}: broken multi-extent file ({detail}) — the ISO is corrupt; download it again")]
    BrokenMultiExtent { path: String, detail: String },
    #[error(
        "{path}: interleaved file (file unit size {unit}, gap {gap}) — livestick does not \
         support interleaved ISO 9660 files; rebuild the ISO with xorriso or mkisofs"
    )]
    Interleaved { path: String, unit: u8, gap: u8 },
    #[error("{dir}: entry name {name:?} is not a valid file name — the ISO is corrupt")]
    BadName { dir: String, name: String },
    #[error("{path} is not in the ISO image")]
    NotFound { path: String },
    #[error("{path} in the ISO image is a file, not a directory")]
    NotADirectory { path: String },
    #[error("{path} in the ISO image is a directory, not a file")]
    IsADirectory { path: String },
    #[error(
        "{path} in the ISO image is {size} bytes, more than the {limit} bytes livestick reads \
         into memory for such a file — the ISO is probably not the kind of live image expected"
    )]
    FileTooLarge { path: String, size: u64, limit: u64 },
    #[error("{path:?} is not a valid path inside an ISO image ({detail})")]
    InvalidPath { path: String, detail: &'static str },
}

impl crate::error::Classify for IsoError {
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::Io
    }
}

/// A contiguous run of bytes of one file, as a byte offset into the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

/// One file or directory of the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsoEntry {
    /// Absolute path with `/` separators, e.g. `/LiveOS/squashfs.img`; `/` for
    /// the root.
    pub path: String,
    /// Last path component; empty for the root.
    pub name: String,
    pub is_dir: bool,
    /// File size in bytes (for directories, the size of the directory data).
    pub size: u64,
    /// Where the bytes are, in file order. Empty for empty files.
    pub extents: Vec<Extent>,
}

/// Which set of names the reader presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameScheme {
    RockRidge,
    Joliet,
    Iso9660,
}

/// An opened ISO image.
pub struct IsoImage<R> {
    reader: R,
    image_len: u64,
    block_size: u64,
    volume_id: String,
    volume_size: u64,
    pvd_offset: u64,
    app_data: Vec<u8>,
    scheme: NameScheme,
    /// Extent of the root directory of the tree whose names are presented.
    root: Extent,
    /// Rock Ridge: bytes to skip at the start of each system use area (`SP`).
    susp_skip: usize,
}

/// What one directory record says, before names are decided.
struct RawRecord {
    /// Offset of the record in the image, for error messages.
    at: u64,
    flags: u8,
    extent: Extent,
    /// The ISO 9660 / Joliet identifier bytes.
    ident: Vec<u8>,
    unit_size: u8,
    gap: u8,
    /// Byte range of the system use area inside the record.
    system_use: Vec<u8>,
}

/// What the Rock Ridge entries of one record say.
#[derive(Default)]
struct RockRidge {
    name: Option<Vec<u8>>,
    /// `CL`: this record stands for a directory relocated to this block.
    child_link: Option<u64>,
    /// `RE`: this record is a relocated directory; hide it where it sits.
    relocated: bool,
    /// Saw any Rock Ridge entry at all (to detect RR on the root).
    any_rr: bool,
    /// `SP` found with this skip count (only meaningful on the root `.`).
    sp_skip: Option<u8>,
}

impl<R: Read + Seek> IsoImage<R> {
    /// Reads the volume descriptors and checks the image is complete.
    pub fn open(mut reader: R) -> Result<Self, IsoError> {
        let image_len = reader
            .seek(SeekFrom::End(0))
            .map_err(|source| IsoError::Io { offset: 0, source })?;
        if image_len < DESCRIPTOR_START + DESCRIPTOR_SIZE as u64 {
            return Err(IsoError::NotIso {
                detail: format!(
                    "the file has only {image_len} bytes, too small to hold one volume descriptor"
                ),
            });
        }

        let mut pvd: Option<(u64, Vec<u8>)> = None;
        let mut joliet: Option<(u64, Vec<u8>)> = None;
        for index in 0..MAX_DESCRIPTORS {
            let at = DESCRIPTOR_START + index * DESCRIPTOR_SIZE as u64;
            if at + DESCRIPTOR_SIZE as u64 > image_len {
                break;
            }
            let mut desc = vec![0u8; DESCRIPTOR_SIZE];
            read_exact_at(&mut reader, at, &mut desc)?;
            if &desc[1..6] != b"CD001" {
                if index == 0 {
                    return Err(IsoError::NotIso {
                        detail: "no CD001 signature there".into(),
                    });
                }
                // Descriptors of other standards (UDF's BEA01/NSR02) may
                // follow; ours end here.
                break;
            }
            match desc[0] {
                1 if pvd.is_none() => pvd = Some((at, desc)),
                // A supplementary descriptor with a UCS-2 escape sequence is
                // Joliet (levels 1–3: %/@, %/C, %/E); version 1 only, since
                // version 2 is ISO 9660:1999.
                2 if joliet.is_none() && desc[6] == 1 && is_joliet_escape(&desc[88..120]) => {
                    joliet = Some((at, desc))
                }
                255 => break,
                _ => {}
            }
        }
        let Some((pvd_offset, pvd)) = pvd else {
            return Err(IsoError::NotIso {
                detail: "the volume descriptors contain no primary volume descriptor".into(),
            });
        };

        let block_size = u64::from(u16_at(&pvd, 128));
        if !matches!(block_size, 512 | 1024 | 2048) {
            return Err(IsoError::BadBlockSize(block_size));
        }
        let volume_size = u64::from(u32_at(&pvd, 80)) * block_size;
        if volume_size > image_len {
            return Err(IsoError::Truncated {
                declared: volume_size,
                actual: image_len,
            });
        }
        let volume_id = String::from_utf8_lossy(&pvd[40..72])
            .trim_end_matches([' ', '\0'])
            .to_string();
        let app_data =
            pvd[APPLICATION_DATA_OFFSET..APPLICATION_DATA_OFFSET + APPLICATION_DATA_LEN].to_vec();

        let mut image = IsoImage {
            reader,
            image_len,
            block_size,
            volume_id,
            volume_size,
            pvd_offset,
            app_data,
            scheme: NameScheme::Iso9660,
            root: Extent { offset: 0, len: 0 },
            susp_skip: 0,
        };
        let primary_root = image.root_extent(&pvd, pvd_offset)?;
        image.root = primary_root;

        // Rock Ridge lives in the primary tree and is announced by an `SP`
        // entry at the start of the root's "." record.
        if let Some(skip) = image.detect_rock_ridge(primary_root)? {
            image.scheme = NameScheme::RockRidge;
            image.susp_skip = usize::from(skip);
        } else if let Some(svd) = joliet {
            image.root = image.root_extent(&svd.1, svd.0)?;
            image.scheme = NameScheme::Joliet;
        }
        Ok(image)
    }

    /// The volume label, e.g. `Fedora-WS-Live-40-1-14` (what `CDLABEL=` means).
    pub fn volume_id(&self) -> &str {
        &self.volume_id
    }

    /// Bytes the primary volume descriptor says the volume occupies.
    pub fn volume_size(&self) -> u64 {
        self.volume_size
    }

    /// Bytes in the underlying reader (may exceed `volume_size` for hybrid
    /// images with appended partitions or padding).
    pub fn image_len(&self) -> u64 {
        self.image_len
    }

    /// Logical block size from the PVD (2048 on every real image).
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Byte offset of the primary volume descriptor (32768 on real images).
    pub fn pvd_offset(&self) -> u64 {
        self.pvd_offset
    }

    /// The 512-byte application-use field of the PVD (offset 883), where
    /// isomd5sum implants its checksum.
    pub fn application_data(&self) -> &[u8] {
        &self.app_data
    }

    /// Which names `lookup`, `read_dir` and `walk` present.
    pub fn name_scheme(&self) -> NameScheme {
        self.scheme
    }

    /// The root directory as an entry.
    pub fn root(&self) -> IsoEntry {
        IsoEntry {
            path: "/".into(),
            name: String::new(),
            is_dir: true,
            size: self.root.len,
            extents: vec![self.root],
        }
    }

    /// Finds `path` (absolute or relative to the root). Rock Ridge names
    /// match case-sensitively; plain ISO 9660 and Joliet names fall back to a
    /// case-insensitive match, since their case is often not the original's.
    pub fn lookup(&mut self, path: &str) -> Result<Option<IsoEntry>, IsoError> {
        let components = split_path(path)?;
        let mut current = self.root();
        for component in components {
            if !current.is_dir {
                return Ok(None);
            }
            let mut entries = self.list(&current)?;
            let exact = entries.iter().position(|e| e.name == component);
            let found = match exact {
                Some(i) => Some(i),
                None if self.scheme != NameScheme::RockRidge => {
                    let wanted = component.to_lowercase();
                    entries.iter().position(|e| e.name.to_lowercase() == wanted)
                }
                None => None,
            };
            match found {
                Some(i) => current = entries.swap_remove(i),
                None => return Ok(None),
            }
        }
        Ok(Some(current))
    }

    /// Lists the directory at `path` (without `.` and `..`).
    pub fn read_dir(&mut self, path: &str) -> Result<Vec<IsoEntry>, IsoError> {
        let dir = self.lookup(path)?.ok_or_else(|| IsoError::NotFound {
            path: display_path(path),
        })?;
        if !dir.is_dir {
            return Err(IsoError::NotADirectory { path: dir.path });
        }
        self.list(&dir)
    }

    /// Every file and directory below `path`, parents before their children.
    pub fn walk(&mut self, path: &str) -> Result<Vec<IsoEntry>, IsoError> {
        let dir = self.lookup(path)?.ok_or_else(|| IsoError::NotFound {
            path: display_path(path),
        })?;
        if !dir.is_dir {
            return Err(IsoError::NotADirectory { path: dir.path });
        }
        let mut out = Vec::new();
        // Pre-order, depth-first, with an explicit stack of directory
        // iterators (no recursion). Every directory extent may be read only
        // once: a second visit is a loop (or a shared subtree, which real
        // images never have and which could blow up the walk exponentially).
        let mut seen: HashSet<u64> = HashSet::new();
        let root_offset = dir.extents.first().map_or(0, |e| e.offset);
        seen.insert(root_offset);
        let first = self.list(&dir)?;
        let mut stack: Vec<std::vec::IntoIter<IsoEntry>> = vec![first.into_iter()];
        while let Some(iter) = stack.last_mut() {
            let Some(entry) = iter.next() else {
                stack.pop();
                continue;
            };
            if out.len() >= MAX_WALK_ENTRIES {
                return Err(IsoError::TooManyEntries {
                    path: dir.path,
                    max: MAX_WALK_ENTRIES,
                });
            }
            if entry.is_dir {
                let offset = entry.extents.first().map_or(0, |e| e.offset);
                if !seen.insert(offset) {
                    return Err(IsoError::DirectoryLoop {
                        path: entry.path,
                        offset,
                    });
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(IsoError::TooDeep {
                        path: entry.path,
                        max: MAX_DEPTH,
                    });
                }
                let children = self.list(&entry)?;
                out.push(entry);
                stack.push(children.into_iter());
            } else {
                out.push(entry);
            }
        }
        Ok(out)
    }

    /// Reads a whole file into memory, refusing files larger than `limit`
    /// (config files are small; a huge one means a wrong or hostile image).
    pub fn read_to_vec(&mut self, entry: &IsoEntry, limit: u64) -> Result<Vec<u8>, IsoError> {
        if entry.is_dir {
            return Err(IsoError::IsADirectory {
                path: entry.path.clone(),
            });
        }
        if entry.size > limit {
            return Err(IsoError::FileTooLarge {
                path: entry.path.clone(),
                size: entry.size,
                limit,
            });
        }
        let mut out = Vec::with_capacity(usize::try_from(entry.size).unwrap_or(0));
        for extent in &entry.extents {
            self.check_extent(&entry.path, *extent)?;
            let start = out.len();
            let len = usize::try_from(extent.len).map_err(|_| IsoError::FileTooLarge {
                path: entry.path.clone(),
                size: entry.size,
                limit,
            })?;
            out.resize(start + len, 0);
            read_exact_at(&mut self.reader, extent.offset, &mut out[start..])?;
        }
        Ok(out)
    }

    /// The reader the image is read through.
    pub fn get_ref(&self) -> &R {
        &self.reader
    }

    /// A reader over the file's bytes, following its extents.
    pub fn open_file(&mut self, entry: &IsoEntry) -> IsoFileReader<'_, R> {
        let extents = if entry.is_dir {
            Vec::new()
        } else {
            entry.extents.clone()
        };
        let size = extents
            .iter()
            .map(|e| e.len)
            .fold(0u64, u64::saturating_add);
        IsoFileReader {
            reader: &mut self.reader,
            extents,
            size,
            pos: 0,
            physical: None,
        }
    }

    /// Gives the underlying reader back.
    pub fn into_inner(self) -> R {
        self.reader
    }

    /// The root directory extent from a volume descriptor's root record.
    fn root_extent(&mut self, desc: &[u8], desc_offset: u64) -> Result<Extent, IsoError> {
        let rec = &desc[156..190];
        let at = desc_offset + 156;
        if rec[0] < 34 {
            return Err(IsoError::Malformed {
                what: "root directory record",
                offset: at,
                detail: format!("record length {} (must be 34)", rec[0]),
            });
        }
        if rec[25] & FLAG_DIRECTORY == 0 {
            return Err(IsoError::Malformed {
                what: "root directory record",
                offset: at,
                detail: "the root is not flagged as a directory".into(),
            });
        }
        let extent = self.record_extent(rec)?;
        self.check_dir_extent("/", extent)?;
        Ok(extent)
    }

    /// Byte extent of a record: its block, past any extended attribute
    /// record, for its data length.
    fn record_extent(&self, rec: &[u8]) -> Result<Extent, IsoError> {
        let block = u64::from(u32_at(rec, 2)) + u64::from(rec[1]);
        Ok(Extent {
            offset: block * self.block_size,
            len: u64::from(u32_at(rec, 10)),
        })
    }

    fn check_extent(&self, path: &str, extent: Extent) -> Result<(), IsoError> {
        if extent.len == 0 {
            return Ok(());
        }
        match extent.offset.checked_add(extent.len) {
            Some(end) if end <= self.image_len => Ok(()),
            _ => Err(IsoError::ExtentOutOfBounds {
                path: path.to_string(),
                offset: extent.offset,
                len: extent.len,
                image_len: self.image_len,
            }),
        }
    }

    fn check_dir_extent(&self, path: &str, extent: Extent) -> Result<(), IsoError> {
        if extent.len > MAX_DIR_BYTES {
            return Err(IsoError::DirectoryTooLarge {
                path: path.to_string(),
                size: extent.len,
                max: MAX_DIR_BYTES,
            });
        }
        self.check_extent(path, extent)
    }

    /// Looks at the root's "." record for the SUSP `SP` entry and any Rock
    /// Ridge entry; returns the SUSP skip count when Rock Ridge is in use.
    fn detect_rock_ridge(&mut self, root: Extent) -> Result<Option<u8>, IsoError> {
        let data = self.read_dir_data("/", root)?;
        let records = self.parse_records("/", root, &data)?;
        let Some(dot) = records.first() else {
            return Ok(None);
        };
        if dot.ident != [0] {
            return Ok(None);
        }
        // SP sits at offset 0 of the root "." system use area, never skipped.
        let rr = self.parse_susp(dot, 0)?;
        Ok(match rr.sp_skip {
            Some(skip) if rr.any_rr => Some(skip),
            _ => None,
        })
    }

    fn read_dir_data(&mut self, path: &str, extent: Extent) -> Result<Vec<u8>, IsoError> {
        self.check_dir_extent(path, extent)?;
        // Bounded by MAX_DIR_BYTES above, so the cast cannot truncate.
        let mut data = vec![0u8; extent.len as usize];
        read_exact_at(&mut self.reader, extent.offset, &mut data)?;
        Ok(data)
    }

    /// Splits directory data into records. A zero length byte means the rest
    /// of the sector is padding (records never straddle sectors).
    fn parse_records(
        &self,
        path: &str,
        extent: Extent,
        data: &[u8],
    ) -> Result<Vec<RawRecord>, IsoError> {
        let block = self.block_size as usize;
        let mut out = Vec::new();
        let mut pos = 0usize;
        while pos < data.len() {
            let len = usize::from(data[pos]);
            let at = extent.offset + pos as u64;
            if len == 0 {
                pos = (pos / block + 1) * block;
                continue;
            }
            let malformed = |detail: String| IsoError::Malformed {
                what: "directory record",
                offset: at,
                detail: format!("{detail} in directory {path}"),
            };
            if len < RECORD_FIXED_LEN + 1 {
                return Err(malformed(format!(
                    "record length {len} is shorter than the minimum 34"
                )));
            }
            let sector_end = (pos / block + 1) * block;
            if pos + len > data.len() || pos + len > sector_end {
                return Err(malformed(format!(
                    "record of {len} bytes runs past the end of its sector"
                )));
            }
            let rec = &data[pos..pos + len];
            let name_len = usize::from(rec[32]);
            if RECORD_FIXED_LEN + name_len > len || name_len == 0 {
                return Err(malformed(format!(
                    "identifier length {name_len} does not fit a record of {len} bytes"
                )));
            }
            let ident = rec[RECORD_FIXED_LEN..RECORD_FIXED_LEN + name_len].to_vec();
            // A padding byte follows even-length identifiers so the system
            // use area starts on an even offset.
            let su_start =
                (RECORD_FIXED_LEN + name_len + usize::from(name_len.is_multiple_of(2))).min(len);
            out.push(RawRecord {
                at,
                flags: rec[25],
                extent: self.record_extent(rec)?,
                ident,
                unit_size: rec[26],
                gap: rec[27],
                system_use: rec[su_start..].to_vec(),
            });
            pos += len;
        }
        Ok(out)
    }

    /// Reads the SUSP entries of a record (following `CE` continuation
    /// areas), starting `skip` bytes into its system use area.
    fn parse_susp(&mut self, rec: &RawRecord, skip: usize) -> Result<RockRidge, IsoError> {
        let mut rr = RockRidge::default();
        let mut name: Vec<u8> = Vec::new();
        let mut name_open = false;
        let mut saw_nm = false;
        let mut area = rec.system_use.get(skip..).unwrap_or(&[]).to_vec();
        let mut area_at = rec.at;
        let mut hops = 0usize;
        loop {
            let mut next: Option<Extent> = None;
            let mut pos = 0usize;
            while pos + 4 <= area.len() {
                let sig = [area[pos], area[pos + 1]];
                let len = usize::from(area[pos + 2]);
                if len < 4 || pos + len > area.len() {
                    // Zero padding or a damaged entry: the names fall back
                    // to ISO 9660, so stop rather than fail.
                    break;
                }
                let body = &area[pos + 4..pos + len];
                match &sig {
                    b"SP" if body.len() >= 3 && body[0] == 0xBE && body[1] == 0xEF => {
                        rr.sp_skip = Some(body[2]);
                    }
                    b"CE" if body.len() >= 24 => {
                        let block = u64::from(u32_at(body, 0));
                        let offset = u64::from(u32_at(body, 8));
                        let len = u64::from(u32_at(body, 16));
                        next = Some(Extent {
                            offset: block * self.block_size + offset,
                            len,
                        });
                    }
                    b"ST" => break,
                    b"NM" if !body.is_empty() => {
                        rr.any_rr = true;
                        let flags = body[0];
                        // CURRENT/PARENT only belong on "." and "..".
                        if flags & 0x06 == 0 && (!saw_nm || name_open) {
                            saw_nm = true;
                            name.extend_from_slice(&body[1..]);
                            name_open = flags & 0x01 != 0;
                            if name.len() > MAX_NAME_BYTES {
                                return Err(IsoError::Malformed {
                                    what: "Rock Ridge NM entry",
                                    offset: area_at + pos as u64,
                                    detail: format!("name longer than {MAX_NAME_BYTES} bytes"),
                                });
                            }
                        }
                    }
                    b"CL" if body.len() >= 4 => {
                        rr.any_rr = true;
                        rr.child_link = Some(u64::from(u32_at(body, 0)));
                    }
                    b"RE" => {
                        rr.any_rr = true;
                        rr.relocated = true;
                    }
                    b"RR" | b"PX" | b"PN" | b"SL" | b"TF" | b"SF" | b"ER" => rr.any_rr = true,
                    _ => {}
                }
                pos += len;
            }
            let Some(ce) = next else { break };
            hops += 1;
            if hops > MAX_CE_HOPS || ce.len > MAX_CE_LEN {
                return Err(IsoError::Malformed {
                    what: "SUSP continuation area",
                    offset: ce.offset,
                    detail: format!(
                        "{} bytes after {hops} continuation hops (a loop or a damaged CE entry)",
                        ce.len
                    ),
                });
            }
            self.check_extent("(SUSP continuation area)", ce)?;
            area = vec![0u8; ce.len as usize];
            read_exact_at(&mut self.reader, ce.offset, &mut area)?;
            area_at = ce.offset;
        }
        if saw_nm {
            rr.name = Some(name);
        }
        Ok(rr)
    }

    /// Lists a directory entry's children, joining multi-extent files and
    /// resolving Rock Ridge relocations.
    fn list(&mut self, dir: &IsoEntry) -> Result<Vec<IsoEntry>, IsoError> {
        let extent = dir
            .extents
            .first()
            .copied()
            .unwrap_or(Extent { offset: 0, len: 0 });
        let data = self.read_dir_data(&dir.path, extent)?;
        let records = self.parse_records(&dir.path, extent, &data)?;
        drop(data);

        let mut out: Vec<IsoEntry> = Vec::new();
        // The multi-extent file being assembled: its identifier and entry.
        let mut pending: Option<(Vec<u8>, IsoEntry)> = None;
        for rec in records {
            if rec.ident == [0] || rec.ident == [1] {
                if pending.is_some() {
                    return Err(IsoError::BrokenMultiExtent {
                        path: dir.path.clone(),
                        detail: "a \".\" or \"..\" record interrupts the extents of a file".into(),
                    });
                }
                continue;
            }
            if let Some((ident, mut entry)) = pending.take() {
                // Continuation records repeat the identifier; their own
                // names are ignored.
                if rec.ident != ident || rec.flags & FLAG_DIRECTORY != 0 {
                    return Err(IsoError::BrokenMultiExtent {
                        path: entry.path,
                        detail: format!(
                            "the record at byte {} does not continue it (different name or a \
                             directory)",
                            rec.at
                        ),
                    });
                }
                self.check_extent(&entry.path, rec.extent)?;
                entry.size = entry.size.saturating_add(rec.extent.len);
                if rec.extent.len > 0 {
                    entry.extents.push(rec.extent);
                }
                if rec.flags & FLAG_MULTI_EXTENT != 0 {
                    pending = Some((ident, entry));
                } else {
                    out.push(entry);
                }
                continue;
            }

            let rr = if self.scheme == NameScheme::RockRidge {
                Some(self.parse_susp(&rec, self.susp_skip)?)
            } else {
                None
            };
            if rr.as_ref().is_some_and(|rr| rr.relocated) {
                // The directory is shown where its CL record sits.
                continue;
            }
            let name = self.decode_name(&dir.path, &rec.ident, rr.as_ref())?;
            let path = if dir.path == "/" {
                format!("/{name}")
            } else {
                format!("{}/{name}", dir.path)
            };

            if let Some(block) = rr.as_ref().and_then(|rr| rr.child_link) {
                let extent = self.relocated_dir_extent(&path, block)?;
                out.push(IsoEntry {
                    path,
                    name,
                    is_dir: true,
                    size: extent.len,
                    extents: vec![extent],
                });
                continue;
            }

            let is_dir = rec.flags & FLAG_DIRECTORY != 0;
            if rec.unit_size != 0 || rec.gap != 0 {
                return Err(IsoError::Interleaved {
                    path,
                    unit: rec.unit_size,
                    gap: rec.gap,
                });
            }
            if is_dir {
                self.check_dir_extent(&path, rec.extent)?;
            } else {
                self.check_extent(&path, rec.extent)?;
            }
            if is_dir && (rec.extent == extent || rec.extent.offset == self.root.offset) {
                return Err(IsoError::DirectoryLoop {
                    path,
                    offset: rec.extent.offset,
                });
            }
            let entry = IsoEntry {
                path,
                name,
                is_dir,
                size: rec.extent.len,
                extents: if rec.extent.len > 0 || is_dir {
                    vec![rec.extent]
                } else {
                    Vec::new()
                },
            };
            if rec.flags & FLAG_MULTI_EXTENT != 0 {
                if is_dir {
                    return Err(IsoError::BrokenMultiExtent {
                        path: entry.path,
                        detail: "a directory is flagged as multi-extent".into(),
                    });
                }
                pending = Some((rec.ident, entry));
            } else {
                out.push(entry);
            }
        }
        if let Some((_, entry)) = pending {
            return Err(IsoError::BrokenMultiExtent {
                path: entry.path,
                detail: "the directory ends before the file's final extent".into(),
            });
        }
        Ok(out)
    }

    /// The extent of a directory relocated by Rock Ridge (`CL`): its own "."
    /// record at the start of `block` gives the data length.
    fn relocated_dir_extent(&mut self, path: &str, block: u64) -> Result<Extent, IsoError> {
        let offset = block.saturating_mul(self.block_size);
        let mut head = [0u8; 34];
        self.check_extent(path, Extent { offset, len: 34 })?;
        read_exact_at(&mut self.reader, offset, &mut head)?;
        if head[0] < 34 || head[32] != 1 || head[33] != 0 || head[25] & FLAG_DIRECTORY == 0 {
            return Err(IsoError::Malformed {
                what: "Rock Ridge relocated directory (CL)",
                offset,
                detail: format!("no \".\" directory record at the block {path} points to"),
            });
        }
        let extent = self.record_extent(&head)?;
        if extent.offset != offset {
            return Err(IsoError::Malformed {
                what: "Rock Ridge relocated directory (CL)",
                offset,
                detail: format!("the \".\" record there does not describe itself ({path})"),
            });
        }
        self.check_dir_extent(path, extent)?;
        Ok(extent)
    }

    fn decode_name(
        &self,
        dir: &str,
        ident: &[u8],
        rr: Option<&RockRidge>,
    ) -> Result<String, IsoError> {
        let name = match (rr.and_then(|rr| rr.name.as_ref()), self.scheme) {
            (Some(nm), _) => String::from_utf8_lossy(nm).into_owned(),
            (None, NameScheme::Joliet) => {
                let units = ident
                    .chunks_exact(2)
                    .map(|pair| u16::from_be_bytes([pair[0], pair[1]]));
                let decoded: String = char::decode_utf16(units)
                    .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
                    .collect();
                strip_version(&decoded).to_string()
            }
            (None, _) => strip_version(&String::from_utf8_lossy(ident)).to_string(),
        };
        // Names end up as paths on the stick: anything that could climb out
        // of a directory or is not a name at all is refused.
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
            return Err(IsoError::BadName {
                dir: dir.to_string(),
                name,
            });
        }
        Ok(name)
    }
}

/// `Read + Seek` over one file's extents.
pub struct IsoFileReader<'a, R> {
    reader: &'a mut R,
    extents: Vec<Extent>,
    size: u64,
    pos: u64,
    /// Where the underlying reader is, to skip needless seeks (which would
    /// throw away a `BufReader`'s buffer).
    physical: Option<u64>,
}

impl<R> IsoFileReader<'_, R> {
    /// File size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The extent holding logical position `pos`, and how far into it.
    fn locate(&self, pos: u64) -> Option<(Extent, u64)> {
        let mut start = 0u64;
        for extent in &self.extents {
            let end = start.saturating_add(extent.len);
            if pos < end {
                return Some((*extent, pos - start));
            }
            start = end;
        }
        None
    }
}

impl<R: Read + Seek> Read for IsoFileReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let Some((extent, within)) = self.locate(self.pos) else {
            return Ok(0);
        };
        let want = (extent.len - within).min(buf.len() as u64) as usize;
        let at = extent.offset + within;
        if self.physical != Some(at) {
            self.reader.seek(SeekFrom::Start(at))?;
        }
        self.physical = None;
        let n = self.reader.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the ISO image ends at byte {at}, inside a file's extent"),
            ));
        }
        self.pos += n as u64;
        self.physical = Some(at + n as u64);
        Ok(n)
    }
}

impl<R> Seek for IsoFileReader<'_, R> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let target = target.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the file",
            )
        })?;
        self.pos = target;
        Ok(target)
    }
}

/// Finds the primary volume descriptor the way `checkisomd5` does (first
/// type-1 descriptor from sector 16) and returns its byte offset.
pub fn find_primary_descriptor<R: Read + Seek>(reader: &mut R) -> Result<u64, IsoError> {
    let mut desc = [0u8; 8];
    for index in 0..MAX_DESCRIPTORS {
        let at = DESCRIPTOR_START + index * DESCRIPTOR_SIZE as u64;
        match read_exact_at(reader, at, &mut desc) {
            Ok(()) => {}
            Err(IsoError::Io { source, .. }) if source.kind() == io::ErrorKind::UnexpectedEof => {
                break;
            }
            Err(e) => return Err(e),
        }
        if &desc[1..6] != b"CD001" || desc[0] == 255 {
            break;
        }
        if desc[0] == 1 {
            return Ok(at);
        }
    }
    Err(IsoError::NotIso {
        detail: "no type 1 volume descriptor found".into(),
    })
}

fn read_exact_at<R: Read + Seek>(
    reader: &mut R,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), IsoError> {
    reader
        .seek(SeekFrom::Start(offset))
        .and_then(|_| reader.read_exact(buf))
        .map_err(|source| IsoError::Io { offset, source })
}

fn is_joliet_escape(field: &[u8]) -> bool {
    field
        .windows(3)
        .any(|w| w[0] == b'%' && w[1] == b'/' && matches!(w[2], b'@' | b'C' | b'E'))
}

/// `NAME.EXT;1` → `NAME.EXT`, `NAME.;1` → `NAME` (xorriso and mkisofs add the
/// dot and version to every file name).
fn strip_version(name: &str) -> &str {
    let base = match name.rfind(';') {
        Some(i) if name[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &name[..i],
        _ => name,
    };
    match base.strip_suffix('.') {
        Some(stripped) if !stripped.is_empty() => stripped,
        _ => base,
    }
}

/// Splits `path` into components, resolving `.` and `..` lexically.
fn split_path(path: &str) -> Result<Vec<&str>, IsoError> {
    let mut out: Vec<&str> = Vec::new();
    for component in path.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            c if c.contains('\0') => {
                return Err(IsoError::InvalidPath {
                    path: path.to_string(),
                    detail: "contains a NUL byte",
                });
            }
            c => out.push(c),
        }
        if out.len() > MAX_DEPTH {
            return Err(IsoError::InvalidPath {
                path: path.chars().take(200).collect(),
                detail: "too many components",
            });
        }
    }
    Ok(out)
}

fn display_path(path: &str) -> String {
    match split_path(path) {
        Ok(parts) => format!("/{}", parts.join("/")),
        Err(_) => path.to_string(),
    }
}

#[cfg(test)]
mod tests {
    //! Hand-made images for the cases real tools never produce: broken
    //! multi-extent chains, loops, damaged records, hostile SUSP areas.
    use super::*;
    use std::io::Cursor;

    const B: usize = 2048;
    const ROOT: u32 = 18;

    fn record(ident: &[u8], lba: u32, size: u32, flags: u8, su: &[u8]) -> Vec<u8> {
        let pad = usize::from(ident.len().is_multiple_of(2));
        let len = 33 + ident.len() + pad + su.len();
        let mut r = vec![0u8; len];
        r[0] = len as u8;
        r[2..6].copy_from_slice(&lba.to_le_bytes());
        r[6..10].copy_from_slice(&lba.to_be_bytes());
        r[10..14].copy_from_slice(&size.to_le_bytes());
        r[14..18].copy_from_slice(&size.to_be_bytes());
        r[25] = flags;
        r[32] = ident.len() as u8;
        r[33..33 + ident.len()].copy_from_slice(ident);
        r[33 + ident.len() + pad..].copy_from_slice(su);
        r
    }

    fn dir_records(lba: u32, size: u32, parent: u32, su: &[u8]) -> Vec<u8> {
        let mut d = record(&[0], lba, size, FLAG_DIRECTORY, su);
        d.extend(record(&[1], parent, 2048, FLAG_DIRECTORY, &[]));
        d
    }

    /// SUSP entry.
    fn susp(sig: &[u8; 2], body: &[u8]) -> Vec<u8> {
        let mut e = vec![sig[0], sig[1], (4 + body.len()) as u8, 1];
        e.extend_from_slice(body);
        e
    }

    fn rr_root_su() -> Vec<u8> {
        let mut su = susp(b"SP", &[0xBE, 0xEF, 0]);
        su.extend(susp(b"RR", &[0x89]));
        su
    }

    /// An image of `sectors` sectors whose root directory (one sector at 18,
    /// unless `root_size` says more) holds `root` after "." and "..".
    /// `put` places raw bytes at byte offsets.
    fn image(
        sectors: u32,
        root_size: u32,
        root_su: &[u8],
        root: &[u8],
        put: &[(usize, &[u8])],
    ) -> Vec<u8> {
        let mut img = vec![0u8; sectors as usize * B];
        let pvd = &mut img[16 * B..17 * B];
        pvd[0] = 1;
        pvd[1..6].copy_from_slice(b"CD001");
        pvd[6] = 1;
        pvd[40..72].fill(b' ');
        pvd[40..44].copy_from_slice(b"TEST");
        pvd[80..84].copy_from_slice(&sectors.to_le_bytes());
        pvd[84..88].copy_from_slice(&sectors.to_be_bytes());
        pvd[128..130].copy_from_slice(&2048u16.to_le_bytes());
        pvd[130..132].copy_from_slice(&2048u16.to_be_bytes());
        let root_rec = record(&[0], ROOT, root_size, FLAG_DIRECTORY, &[]);
        pvd[156..156 + 34].copy_from_slice(&root_rec[..34]);
        pvd[883..883 + 11].copy_from_slice(b"APPLICATION");
        let term = &mut img[17 * B..18 * B];
        term[0] = 255;
        term[1..6].copy_from_slice(b"CD001");
        let mut dir = dir_records(ROOT, root_size, ROOT, root_su);
        dir.extend_from_slice(root);
        img[ROOT as usize * B..ROOT as usize * B + dir.len()].copy_from_slice(&dir);
        for (at, bytes) in put {
            img[*at..*at + bytes.len()].copy_from_slice(bytes);
        }
        img
    }

    fn open(img: Vec<u8>) -> IsoImage<Cursor<Vec<u8>>> {
        IsoImage::open(Cursor::new(img)).expect("open")
    }

    #[test]
    fn multi_extent_records_become_one_file() {
        let mut root = record(b"BIG.;1", 19, 2048, FLAG_MULTI_EXTENT, &[]);
        root.extend(record(b"BIG.;1", 21, 2048, FLAG_MULTI_EXTENT, &[]));
        root.extend(record(b"BIG.;1", 20, 100, 0, &[]));
        let (a, b, c) = ([b'a'; B], [b'b'; 100], [b'c'; B]);
        let img = image(
            22,
            2048,
            &[],
            &root,
            &[(19 * B, &a), (20 * B, &b), (21 * B, &c)],
        );
        let mut iso = open(img);
        assert_eq!(iso.volume_id(), "TEST");
        assert_eq!(iso.volume_size(), 22 * 2048);
        assert_eq!(&iso.application_data()[..11], b"APPLICATION");
        assert_eq!(iso.name_scheme(), NameScheme::Iso9660);
        let e = iso.lookup("/big").unwrap().unwrap();
        assert_eq!(e.name, "BIG");
        assert_eq!(e.size, 4196);
        assert_eq!(
            e.extents,
            vec![
                Extent {
                    offset: 19 * 2048,
                    len: 2048
                },
                Extent {
                    offset: 21 * 2048,
                    len: 2048
                },
                Extent {
                    offset: 20 * 2048,
                    len: 100
                },
            ]
        );
        let data = iso.read_to_vec(&e, 1 << 20).unwrap();
        let mut want = a.to_vec();
        want.extend_from_slice(&c);
        want.extend_from_slice(&b);
        assert_eq!(data, want);

        // Seeking across extent boundaries.
        let mut r = iso.open_file(&e);
        r.seek(SeekFrom::Start(2046)).unwrap();
        let mut four = [0u8; 4];
        r.read_exact(&mut four).unwrap();
        assert_eq!(&four, b"aacc");
        r.seek(SeekFrom::End(-1)).unwrap();
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"b");
        assert!(r.seek(SeekFrom::Current(-10_000)).is_err());
    }

    #[test]
    fn broken_multi_extent_chains_are_errors() {
        // The chain never ends.
        let root = record(b"BIG.;1", 19, 2048, FLAG_MULTI_EXTENT, &[]);
        let mut iso = open(image(20, 2048, &[], &root, &[]));
        assert!(matches!(
            iso.read_dir("/"),
            Err(IsoError::BrokenMultiExtent { .. })
        ));
        // The next record has another name.
        let mut root = record(b"BIG.;1", 19, 2048, FLAG_MULTI_EXTENT, &[]);
        root.extend(record(b"OTHER.;1", 19, 10, 0, &[]));
        let mut iso = open(image(20, 2048, &[], &root, &[]));
        let err = iso.read_dir("/").unwrap_err();
        assert!(matches!(err, IsoError::BrokenMultiExtent { .. }), "{err}");
    }

    #[test]
    fn zero_length_byte_skips_to_the_next_sector() {
        let first = record(b"ONE.;1", 20, 3, 0, &[]);
        let second = record(b"TWO.;1", 20, 3, 0, &[]);
        let img = image(
            21,
            4096,
            &[],
            &first,
            &[(19 * B, &second), (20 * B, b"xyz")],
        );
        let mut iso = open(img);
        let names: Vec<String> = iso
            .read_dir("/")
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["ONE", "TWO"]);
    }

    #[test]
    fn record_running_past_its_sector_is_malformed() {
        // A record whose length byte claims more than the sector holds
        // (zero bytes before it would mean "skip to the next sector").
        let mut rec = record(b"X.;1", 19, 0, 0, &[]);
        rec[0] = 250;
        let img = image(20, 100, &[], &rec, &[]);
        // The root is parsed when opening (to look for Rock Ridge).
        let err = IsoImage::open(Cursor::new(img)).err().unwrap();
        assert!(matches!(err, IsoError::Malformed { .. }), "{err}");
        assert!(
            err.to_string().contains("past the end of its sector"),
            "{err}"
        );
        // A record too short to hold an identifier, in a subdirectory.
        let root = record(b"D", 19, 2048, FLAG_DIRECTORY, &[]);
        let mut sub = dir_records(19, 2048, ROOT, &[]);
        sub.push(20);
        let img = image(20, 2048, &[], &root, &[(19 * B, &sub)]);
        let err = open(img).read_dir("/D").unwrap_err();
        assert!(
            err.to_string().contains("shorter than the minimum"),
            "{err}"
        );
    }

    #[test]
    fn directory_loops_are_detected() {
        // A subdirectory pointing at its own directory.
        let root = record(b"SELF", ROOT, 2048, FLAG_DIRECTORY, &[]);
        let err = open(image(20, 2048, &[], &root, &[]))
            .read_dir("/")
            .unwrap_err();
        assert!(matches!(err, IsoError::DirectoryLoop { .. }), "{err}");
        // A → B → A (A's extent reached a second time during walk).
        let root = record(b"A", 19, 2048, FLAG_DIRECTORY, &[]);
        let mut a = dir_records(19, 2048, ROOT, &[]);
        a.extend(record(b"B", 20, 2048, FLAG_DIRECTORY, &[]));
        let mut b = dir_records(20, 2048, 19, &[]);
        b.extend(record(b"A", 19, 2048, FLAG_DIRECTORY, &[]));
        let img = image(21, 2048, &[], &root, &[(19 * B, &a), (20 * B, &b)]);
        let mut iso = open(img);
        let err = iso.walk("/").unwrap_err();
        assert!(matches!(err, IsoError::DirectoryLoop { .. }), "{err}");
        // Going around by path is bounded by the path itself.
        assert!(iso.lookup("/A/B/A/B/A/B").unwrap().is_some());
    }

    #[test]
    fn extents_past_the_end_are_reported() {
        let root = record(b"F.;1", 19, 10_000, 0, &[]);
        let err = open(image(20, 2048, &[], &root, &[]))
            .read_dir("/")
            .unwrap_err();
        assert!(matches!(err, IsoError::ExtentOutOfBounds { .. }), "{err}");
        assert!(err.to_string().contains("past the end"), "{err}");
        // A directory larger than the image.
        let root = record(b"D", 19, 1 << 30, FLAG_DIRECTORY, &[]);
        let err = open(image(20, 2048, &[], &root, &[]))
            .read_dir("/")
            .unwrap_err();
        assert!(matches!(err, IsoError::DirectoryTooLarge { .. }), "{err}");
    }

    #[test]
    fn truncated_and_odd_headers() {
        let mut img = image(20, 2048, &[], &[], &[]);
        img.truncate(19 * B);
        let err = IsoImage::open(Cursor::new(img)).err().unwrap();
        assert!(
            matches!(err, IsoError::Truncated { declared, actual } if declared == 20 * 2048 && actual == 19 * 2048)
        );

        let mut img = image(20, 2048, &[], &[], &[]);
        img[16 * B + 128..16 * B + 130].copy_from_slice(&100u16.to_le_bytes());
        let err = IsoImage::open(Cursor::new(img)).err().unwrap();
        assert!(matches!(err, IsoError::BadBlockSize(100)), "{err}");

        // Only a supplementary descriptor: no PVD.
        let mut img = image(20, 2048, &[], &[], &[]);
        img[16 * B] = 2;
        let err = IsoImage::open(Cursor::new(img)).err().unwrap();
        assert!(matches!(err, IsoError::NotIso { .. }), "{err}");
    }

    #[test]
    fn interleaved_files_are_refused() {
        let mut rec = record(b"F.;1", 19, 10, 0, &[]);
        rec[26] = 1;
        rec[27] = 1;
        let err = open(image(20, 2048, &[], &rec, &[]))
            .read_dir("/")
            .unwrap_err();
        assert!(matches!(err, IsoError::Interleaved { .. }), "{err}");
    }

    #[test]
    fn rock_ridge_names_with_continue_and_ce() {
        // NM split in two pieces inside the record…
        let mut su = susp(b"NM", b"\x01Mixed-");
        su.extend(susp(b"NM", b"\x00Case.txt"));
        let mut root = record(b"MIXED_CA.TXT;1", 19, 5, 0, &su);
        // …and a name that lives in a continuation area at 20*B + 100.
        let mut ce_body = Vec::new();
        for v in [20u32, 100, 40] {
            ce_body.extend(v.to_le_bytes());
            ce_body.extend(v.to_be_bytes());
        }
        root.extend(record(b"OTHER.;1", 19, 5, 0, &susp(b"CE", &ce_body)));
        let continuation = susp(b"NM", b"\x00from-continuation");
        let img = image(
            21,
            2048,
            &rr_root_su(),
            &root,
            &[(19 * B, b"hello"), (20 * B + 100, &continuation)],
        );
        let mut iso = open(img);
        assert_eq!(iso.name_scheme(), NameScheme::RockRidge);
        let names: Vec<String> = iso
            .read_dir("/")
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(names, ["Mixed-Case.txt", "from-continuation"]);
        // Rock Ridge names match case-sensitively only.
        assert!(iso.lookup("/mixed-case.txt").unwrap().is_none());
        assert!(iso.lookup("/Mixed-Case.txt").unwrap().is_some());
    }

    #[test]
    fn hostile_rock_ridge_is_refused() {
        // A CE pointing at itself loops until the hop limit.
        let mut ce_body = Vec::new();
        for v in [20u32, 0, 28] {
            ce_body.extend(v.to_le_bytes());
            ce_body.extend(v.to_be_bytes());
        }
        let ce = susp(b"CE", &ce_body);
        let root = record(b"F.;1", 19, 0, 0, &ce);
        let img = image(21, 2048, &rr_root_su(), &root, &[(20 * B, &ce)]);
        let err = open(img).read_dir("/").unwrap_err();
        assert!(matches!(err, IsoError::Malformed { .. }), "{err}");

        // Names that would climb out of a directory on the stick.
        for bad in [&b"\x00.."[..], b"\x00a/b", b"\x00."] {
            let root = record(b"F.;1", 19, 0, 0, &susp(b"NM", bad));
            let err = open(image(20, 2048, &rr_root_su(), &root, &[]))
                .read_dir("/")
                .unwrap_err();
            assert!(matches!(err, IsoError::BadName { .. }), "{err}");
        }
    }

    #[test]
    fn names_and_paths() {
        assert_eq!(strip_version("FILE.TXT;1"), "FILE.TXT");
        assert_eq!(strip_version("README.;1"), "README");
        assert_eq!(strip_version("DIR"), "DIR");
        assert_eq!(strip_version("A;B"), "A;B");
        assert_eq!(strip_version("."), ".");
        assert_eq!(split_path("/a//b/./c/../d/").unwrap(), ["a", "b", "d"]);
        assert_eq!(split_path("../..").unwrap(), Vec::<&str>::new());
        assert!(split_path("a\0b").is_err());
        assert!(split_path(&"a/".repeat(MAX_DEPTH + 1)).is_err());
        assert!(is_joliet_escape(b"%/E\0\0"));
        assert!(!is_joliet_escape(b"\0\0\0"));
    }

    #[test]
    fn primary_descriptor_is_found_like_checkisomd5() {
        let mut img = image(20, 2048, &[], &[], &[]);
        assert_eq!(
            find_primary_descriptor(&mut Cursor::new(&img)).unwrap(),
            32768
        );
        img[16 * B] = 2;
        assert!(find_primary_descriptor(&mut Cursor::new(&img)).is_err());
        assert!(find_primary_descriptor(&mut Cursor::new(Vec::new())).is_err());
    }
}
