//! Files inside an ext4 file system, found and mapped without mounting it.
//!
//! A stick with an ext4 live partition keeps `LiveOS/squashfs.img`, the overlay,
//! home.img and swap.img as ordinary ext4 files. Maintenance reads and writes them
//! in place, by their extents, the way the FAT layout reaches its files through
//! their cluster chains: this module is the map. It reads the superblock, group
//! descriptors, inodes, extent trees and directories, as pure functions over
//! `Read + Seek` (a partition window or an image file).
//!
//! One write exists: [`mark_initialised`], which turns a file's unwritten
//! (fallocated) extents into written ones. debugfs's `fallocate` leaves every
//! extent unwritten, which the kernel reads as zeros; a file whose bytes
//! livestick then writes into those blocks directly (the root image, a home's
//! ext4 metadata) must say its blocks hold data. The extent entries and the
//! `metadata_csum` checksums over them (inode, extent blocks) are rewritten;
//! nothing else changes, so the bitmaps and group checksums stay valid.

use std::io::{self, Read, Seek, SeekFrom, Write};

use thiserror::Error;

use crate::bytes::{u16_at, u32_at};
pub use crate::disk::ext4::Extent;
use crate::disk::ext4::{
    self, EXTENT_MAGIC, ExtentNode, SUPERBLOCK_BYTES, SUPERBLOCK_OFFSET, UNINIT_LEN,
};

#[derive(Debug, Error)]
pub enum Ext4FsError {
    #[error("reading the ext4 file system: {0}")]
    Io(#[from] io::Error),
    #[error("not an ext4 file system: {0}")]
    NotExt4(String),
    #[error("the ext4 file system is damaged: {0}; check it with `e2fsck -fn`")]
    Damaged(String),
    #[error("{0} uses block maps, not extents; livestick only reads ext4 files with extents")]
    NoExtents(String),
    #[error(
        "{path} has a hole at byte {at}; livestick writes only into files that are fully allocated"
    )]
    Hole { path: String, at: u64 },
    #[error(
        "{dir}/{a} and {dir}/{b} are not in one block of their directory, so they cannot be exchanged in one write; nothing was changed"
    )]
    NotInOneBlock { dir: String, a: String, b: String },
}

impl crate::error::Classify for Ext4FsError {
    fn kind(&self) -> crate::error::ErrorKind {
        match self {
            Ext4FsError::Io(_) => crate::error::ErrorKind::Io,
            _ => crate::error::ErrorKind::BadInput,
        }
    }
}

const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
const INODE_FLAG_EXTENTS: u32 = 0x0008_0000;
const ROOT_INODE: u32 = 2;
const DIR_MODE: u16 = 0x4000;
const TYPE_MASK: u16 = 0xF000;

/// The geometry of an ext4 file system: what it takes to find any inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ext4Fs {
    pub block_size: u64,
    pub uuid: String,
    pub label: String,
    pub block_count: u64,
    /// Free blocks as the superblock counts them (the kernel updates it lazily:
    /// an estimate, which the allocator checks).
    pub free_blocks: u64,
    /// The journal holds changes not yet written home (not cleanly unmounted):
    /// replaying it could undo a change made beside it.
    pub needs_recovery: bool,
    inodes_per_group: u32,
    inode_size: u64,
    desc_size: u64,
    first_data_block: u64,
    is64: bool,
    /// `metadata_csum`: the seed every checksum starts from.
    csum_seed: Option<u32>,
}

/// An inode's facts livestick uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    pub number: u32,
    pub mode: u16,
    pub size: u64,
    pub flags: u32,
    pub generation: u32,
    /// The 60 bytes of `i_block`: the root of the extent tree.
    pub i_block: [u8; 60],
}

impl Inode {
    pub fn is_dir(&self) -> bool {
        self.mode & TYPE_MASK == DIR_MODE
    }
}

/// A file found by path, with where its bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileMap {
    pub inode: u32,
    pub size: u64,
    pub extents: Vec<Extent>,
}

impl FileMap {
    /// The file's bytes as `(byte offset in the file system, length)` runs in file
    /// order, covering exactly `size` bytes (what `ExtentFile` takes). A hole
    /// anywhere is refused: a write there would land in blocks the file does not own.
    pub fn byte_runs(&self, block_size: u64, path: &str) -> Result<Vec<(u64, u64)>, Ext4FsError> {
        let mut runs = Vec::new();
        let mut at = 0u64;
        let mut extents = self.extents.clone();
        extents.sort_by_key(|e| e.logical);
        for e in &extents {
            if at >= self.size {
                break;
            }
            if e.logical * block_size != at {
                return Err(Ext4FsError::Hole {
                    path: path.to_string(),
                    at,
                });
            }
            let len = (e.len * block_size).min(self.size - at);
            runs.push((e.physical * block_size, len));
            at += len;
        }
        if at < self.size {
            return Err(Ext4FsError::Hole {
                path: path.to_string(),
                at,
            });
        }
        Ok(runs)
    }

    /// Whether any byte of the file lies in an unwritten extent.
    pub fn has_unwritten(&self) -> bool {
        self.extents.iter().any(|e| e.unwritten)
    }
}

fn read_exact_at<R: Read + Seek + ?Sized>(r: &mut R, at: u64, buf: &mut [u8]) -> io::Result<()> {
    r.seek(SeekFrom::Start(at))?;
    r.read_exact(buf)
}

fn u64_of(lo: u32, hi: u32) -> u64 {
    u64::from(lo) | u64::from(hi) << 32
}

impl Ext4Fs {
    /// Reads the superblock and checks that this is an ext4 livestick can walk.
    pub fn open<R: Read + Seek + ?Sized>(r: &mut R) -> Result<Ext4Fs, Ext4FsError> {
        let mut sb = vec![0u8; SUPERBLOCK_BYTES];
        read_exact_at(r, SUPERBLOCK_OFFSET, &mut sb)?;
        let parsed =
            ext4::Superblock::parse(&sb).map_err(|e| Ext4FsError::NotExt4(e.to_string()))?;
        let incompat = parsed.feature_incompat;
        if incompat & INCOMPAT_EXTENTS == 0 {
            return Err(Ext4FsError::NotExt4(
                "no extents feature (ext2 or ext3)".into(),
            ));
        }
        let is64 = incompat & INCOMPAT_64BIT != 0;
        let desc_size = if is64 {
            u64::from(u16_at(&sb, 0xFE)).max(32)
        } else {
            32
        };
        let inode_size = u64::from(u16_at(&sb, 0x58));
        let inodes_per_group = u32_at(&sb, 0x28);
        if inode_size < 128 || inodes_per_group == 0 {
            return Err(Ext4FsError::Damaged(format!(
                "inode size {inode_size}, {inodes_per_group} inodes per group"
            )));
        }
        let csum_seed = (parsed.feature_ro_compat & RO_COMPAT_METADATA_CSUM != 0).then(|| {
            if incompat & INCOMPAT_CSUM_SEED != 0 {
                u32_at(&sb, 0x270)
            } else {
                ext4::crc32c(!0, &sb[0x68..0x78])
            }
        });
        Ok(Ext4Fs {
            block_size: parsed.block_size,
            uuid: parsed.uuid,
            label: parsed.label,
            block_count: parsed.block_count,
            free_blocks: parsed.free_blocks,
            needs_recovery: incompat & INCOMPAT_RECOVER != 0,
            inodes_per_group,
            inode_size,
            desc_size,
            first_data_block: u64::from(u32_at(&sb, 0x14)),
            is64,
            csum_seed,
        })
    }

    /// Byte offset of inode `number`'s on-disk record.
    fn inode_offset<R: Read + Seek + ?Sized>(
        &self,
        r: &mut R,
        number: u32,
    ) -> Result<u64, Ext4FsError> {
        if number == 0 {
            return Err(Ext4FsError::Damaged("inode number 0".into()));
        }
        let group = u64::from((number - 1) / self.inodes_per_group);
        let index = u64::from((number - 1) % self.inodes_per_group);
        let table_at = (self.first_data_block + 1) * self.block_size + group * self.desc_size;
        let mut desc = vec![0u8; self.desc_size as usize];
        read_exact_at(r, table_at, &mut desc)?;
        let lo = u32_at(&desc, 0x08);
        let hi = if self.is64 && self.desc_size >= 64 {
            u32_at(&desc, 0x28)
        } else {
            0
        };
        let table = u64_of(lo, hi);
        if table == 0 || table >= self.block_count {
            return Err(Ext4FsError::Damaged(format!(
                "group {group}'s inode table is at block {table}"
            )));
        }
        Ok(table * self.block_size + index * self.inode_size)
    }

    pub fn inode<R: Read + Seek + ?Sized>(
        &self,
        r: &mut R,
        number: u32,
    ) -> Result<Inode, Ext4FsError> {
        let at = self.inode_offset(r, number)?;
        let mut raw = vec![0u8; 160.min(self.inode_size as usize)];
        read_exact_at(r, at, &mut raw)?;
        let size_hi = if raw.len() >= 0x70 {
            u32_at(&raw, 0x6C)
        } else {
            0
        };
        let mut i_block = [0u8; 60];
        i_block.copy_from_slice(&raw[0x28..0x28 + 60]);
        Ok(Inode {
            number,
            mode: u16_at(&raw, 0),
            size: u64_of(u32_at(&raw, 4), size_hi),
            flags: u32_at(&raw, 0x20),
            generation: u32_at(&raw, 0x64),
            i_block,
        })
    }

    /// Every leaf extent of `inode`, in tree order.
    pub fn extents<R: Read + Seek + ?Sized>(
        &self,
        r: &mut R,
        inode: &Inode,
    ) -> Result<Vec<Extent>, Ext4FsError> {
        if inode.flags & INODE_FLAG_EXTENTS == 0 {
            return Err(Ext4FsError::NoExtents(format!("inode {}", inode.number)));
        }
        let mut out = Vec::new();
        self.walk(r, &inode.i_block, 0, &mut out, &mut Vec::new())?;
        Ok(out)
    }

    /// Walks an extent node (`node` holds the header and entries), collecting
    /// leaves and, in `tree_blocks`, each tree block read (its number, bytes).
    fn walk<R: Read + Seek + ?Sized>(
        &self,
        r: &mut R,
        node: &[u8],
        level: u32,
        out: &mut Vec<Extent>,
        tree_blocks: &mut Vec<(u64, Vec<u8>)>,
    ) -> Result<(), Ext4FsError> {
        if level > 5 {
            return Err(Ext4FsError::Damaged("extent tree too deep".into()));
        }
        match ext4::parse_extent_node(node).map_err(|why| Ext4FsError::Damaged(why.into()))? {
            ExtentNode::Leaves(leaves) => out.extend(leaves),
            ExtentNode::Index(children) => {
                for child in children {
                    if child == 0 || child >= self.block_count {
                        return Err(Ext4FsError::Damaged(format!(
                            "extent index points at block {child}"
                        )));
                    }
                    let mut block = vec![0u8; self.block_size as usize];
                    read_exact_at(r, child * self.block_size, &mut block)?;
                    self.walk(r, &block, level + 1, out, tree_blocks)?;
                    tree_blocks.push((child, block));
                }
            }
        }
        Ok(())
    }

    /// The whole content of a small file or directory (for directories and records).
    fn read_all<R: Read + Seek + ?Sized>(
        &self,
        r: &mut R,
        inode: &Inode,
        limit: u64,
    ) -> Result<Vec<u8>, Ext4FsError> {
        if inode.size > limit {
            return Err(Ext4FsError::Damaged(format!(
                "inode {} is {} bytes, more than expected",
                inode.number, inode.size
            )));
        }
        let mut data = vec![0u8; inode.size as usize];
        for e in self.extents(r, inode)? {
            let start = e.logical * self.block_size;
            if start >= inode.size || e.unwritten {
                continue;
            }
            let end = (start + e.len * self.block_size).min(inode.size);
            read_exact_at(
                r,
                e.physical * self.block_size,
                &mut data[start as usize..end as usize],
            )?;
        }
        Ok(data)
    }

    /// The entries of directory `dir`: (name, inode number), without `.` and `..`.
    pub fn read_dir<R: Read + Seek + ?Sized>(
        &self,
        r: &mut R,
        dir: &Inode,
    ) -> Result<Vec<(String, u32)>, Ext4FsError> {
        if !dir.is_dir() {
            return Err(Ext4FsError::Damaged(format!(
                "inode {} is not a directory",
                dir.number
            )));
        }
        let data = self.read_all(r, dir, 64 << 20)?;
        let mut out = Vec::new();
        // Linear walk of every block: an htree's index blocks look like one empty
        // entry spanning the block (or `.`/`..` in the first), so they are skipped.
        let bs = self.block_size as usize;
        for block in data.chunks(bs) {
            out.extend(
                entries_of_block(block)
                    .into_iter()
                    .filter(|(name, _)| name != "." && name != "..")
                    .map(|(name, entry)| (name, entry.inode)),
            );
        }
        Ok(out)
    }

    /// The inode at `path` ("/LiveOS/squashfs.img"), `None` when a part is missing.
    /// Names compare exactly, as ext4 does.
    pub fn lookup<R: Read + Seek + ?Sized>(
        &self,
        r: &mut R,
        path: &str,
    ) -> Result<Option<Inode>, Ext4FsError> {
        let mut current = self.inode(r, ROOT_INODE)?;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !current.is_dir() {
                return Ok(None);
            }
            let Some((_, ino)) = self
                .read_dir(r, &current)?
                .into_iter()
                .find(|(name, _)| name == part)
            else {
                return Ok(None);
            };
            current = self.inode(r, ino)?;
        }
        Ok(Some(current))
    }

    /// The file at `path` with its extents, `None` when it is not there.
    pub fn file<R: Read + Seek + ?Sized>(
        &self,
        r: &mut R,
        path: &str,
    ) -> Result<Option<FileMap>, Ext4FsError> {
        let Some(inode) = self.lookup(r, path)? else {
            return Ok(None);
        };
        let extents = self.extents(r, &inode)?;
        Ok(Some(FileMap {
            inode: inode.number,
            size: inode.size,
            extents,
        }))
    }

    /// The content of a small file at `path` (a record), `None` when absent.
    pub fn read_small<R: Read + Seek + ?Sized>(
        &self,
        r: &mut R,
        path: &str,
    ) -> Result<Option<Vec<u8>>, Ext4FsError> {
        match self.lookup(r, path)? {
            Some(inode) if !inode.is_dir() => Ok(Some(self.read_all(r, &inode, 1 << 20)?)),
            _ => Ok(None),
        }
    }

    /// The seed of one inode's checksums: the file system's, then its number and
    /// generation.
    fn inode_seed(&self, seed: u32, inode: &Inode) -> u32 {
        let s = ext4::crc32c(seed, &inode.number.to_le_bytes());
        ext4::crc32c(s, &inode.generation.to_le_bytes())
    }
}

/// The 12-byte entry that ends a directory block under `metadata_csum`: inode 0,
/// `rec_len` 12, name length 0, file type 0xDE, then the block's crc32c.
const DIR_TAIL_BYTES: usize = 12;
const DIR_TAIL_FILE_TYPE: u8 = 0xDE;

/// Where one directory entry is inside its block.
struct EntryAt {
    offset: usize,
    inode: u32,
    file_type: u8,
}

/// The entries of one directory block by name.
fn entries_of_block(block: &[u8]) -> Vec<(String, EntryAt)> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at + 8 <= block.len() {
        let ino = u32_at(block, at);
        let rec_len = usize::from(u16_at(block, at + 4));
        let name_len = usize::from(block[at + 6]);
        if rec_len < 8 || at + rec_len > block.len() {
            break;
        }
        if ino != 0 && at + 8 + name_len <= block.len() {
            let name = String::from_utf8_lossy(&block[at + 8..at + 8 + name_len]).into_owned();
            out.push((
                name,
                EntryAt {
                    offset: at,
                    inode: ino,
                    file_type: block[at + 7],
                },
            ));
        }
        at += rec_len;
    }
    out
}

/// Exchanges what the names `a` and `b` of directory `dir` ("/LiveOS") point at,
/// in one write of the one directory block that holds both, its checksum tail
/// recomputed: afterwards `a` names `b`'s inode and `b` names `a`'s. A device takes
/// a block write whole or not at all as far as any later reader sees a directory
/// block (the checksum refuses a torn one), so at every moment each name is one
/// whole file. Refused, with nothing written, when the two entries are in
/// different blocks (a directory of hundreds of entries).
pub fn exchange_entries<F: Read + Write + Seek + ?Sized>(
    fs: &Ext4Fs,
    f: &mut F,
    dir: &str,
    a: &str,
    b: &str,
) -> Result<(), Ext4FsError> {
    let inode = fs
        .lookup(f, dir)?
        .filter(Inode::is_dir)
        .ok_or_else(|| Ext4FsError::Damaged(format!("{dir} is not a directory")))?;
    let bs = fs.block_size as usize;
    let (mut seen_a, mut seen_b) = (false, false);
    for e in fs.extents(f, &inode)? {
        if e.unwritten {
            continue;
        }
        for n in e.physical..e.physical + e.len {
            let mut block = vec![0u8; bs];
            read_exact_at(f, n * fs.block_size, &mut block)?;
            let entries = entries_of_block(&block);
            let find = |name: &str| entries.iter().find(|(n, _)| n == name).map(|(_, e)| e);
            match (find(a), find(b)) {
                (Some(x), Some(y)) => {
                    let (xo, yo) = (x.offset, y.offset);
                    let (xi, yi, xt, yt) = (x.inode, y.inode, x.file_type, y.file_type);
                    block[xo..xo + 4].copy_from_slice(&yi.to_le_bytes());
                    block[yo..yo + 4].copy_from_slice(&xi.to_le_bytes());
                    // The file type is the inode's: it travels with the number.
                    block[xo + 7] = yt;
                    block[yo + 7] = xt;
                    if let Some(seed) = fs.csum_seed {
                        let tail = bs - DIR_TAIL_BYTES;
                        if u32_at(&block, tail) != 0
                            || usize::from(u16_at(&block, tail + 4)) != DIR_TAIL_BYTES
                            || block[tail + 7] != DIR_TAIL_FILE_TYPE
                        {
                            return Err(Ext4FsError::Damaged(format!(
                                "block {n} of {dir} has no checksum tail"
                            )));
                        }
                        let sum = ext4::crc32c(fs.inode_seed(seed, &inode), &block[..tail]);
                        block[bs - 4..].copy_from_slice(&sum.to_le_bytes());
                    }
                    f.seek(SeekFrom::Start(n * fs.block_size))?;
                    f.write_all(&block)?;
                    f.flush()?;
                    return Ok(());
                }
                (x, y) => {
                    seen_a |= x.is_some();
                    seen_b |= y.is_some();
                }
            }
        }
    }
    if seen_a && seen_b {
        return Err(Ext4FsError::NotInOneBlock {
            dir: dir.to_string(),
            a: a.to_string(),
            b: b.to_string(),
        });
    }
    Err(Ext4FsError::Damaged(format!(
        "{dir} has no entry {}",
        if seen_a { b } else { a }
    )))
}

// ---------------------------------------------------------------------------------
// The journal (jbd2): replayed in place, as the kernel does at mount and e2fsck -p
// does on a device, because e2fsprogs cannot replay at an offset of an image file.

const JBD2_MAGIC: u32 = 0xC03B_3998;
const JBD2_DESCRIPTOR: u32 = 1;
const JBD2_COMMIT: u32 = 2;
const JBD2_SUPERBLOCK_V1: u32 = 3;
const JBD2_SUPERBLOCK_V2: u32 = 4;
const JBD2_REVOKE: u32 = 5;
const JBD2_INCOMPAT_REVOKE: u32 = 0x1;
const JBD2_INCOMPAT_64BIT: u32 = 0x2;
const JBD2_INCOMPAT_ASYNC_COMMIT: u32 = 0x4;
const JBD2_INCOMPAT_CSUM_V2: u32 = 0x8;
const JBD2_INCOMPAT_CSUM_V3: u32 = 0x10;
const JBD2_FLAG_ESCAPE: u32 = 0x1;
const JBD2_FLAG_SAME_UUID: u32 = 0x2;
const JBD2_FLAG_LAST_TAG: u32 = 0x8;
/// `s_journal_inum` in the ext4 superblock.
const SB_JOURNAL_INUM: usize = 0xE0;
const SB_FEATURE_INCOMPAT: usize = 0x60;
const SB_CHECKSUM: usize = 0x3FC;

fn be32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

fn be16(buf: &[u8], at: usize) -> u32 {
    u32::from(u16::from_be_bytes([buf[at], buf[at + 1]]))
}

/// What a journal replay did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Committed transactions found in the log.
    pub transactions: u64,
    /// File-system blocks written from the log.
    pub blocks: u64,
    /// Logged blocks left out because a later transaction revoked them.
    pub revoked: u64,
}

/// One committed transaction: its sequence, its logged blocks as (journal block
/// of the copy, file-system block, escaped) and the blocks it revokes.
struct Transaction {
    sequence: u32,
    blocks: Vec<(u64, u64, bool)>,
    revokes: Vec<u64>,
}

/// The journal superblock's facts the replay needs.
struct JournalSb {
    raw: Vec<u8>,
    block_size: u64,
    maxlen: u64,
    first: u64,
    sequence: u32,
    start: u64,
    incompat: u32,
    csum_seed: Option<u32>,
}

impl JournalSb {
    fn csum_v3(&self) -> bool {
        self.incompat & JBD2_INCOMPAT_CSUM_V3 != 0
    }

    fn has_csum(&self) -> bool {
        self.incompat & (JBD2_INCOMPAT_CSUM_V2 | JBD2_INCOMPAT_CSUM_V3) != 0
    }

    fn tag_bytes(&self) -> usize {
        if self.csum_v3() {
            return 16;
        }
        let mut sz = 12;
        if self.incompat & JBD2_INCOMPAT_CSUM_V2 != 0 {
            sz += 2;
        }
        if self.incompat & JBD2_INCOMPAT_64BIT != 0 {
            sz
        } else {
            sz - 4
        }
    }

    /// The log's next block after `b`, wrapping past the end to `first`.
    fn next(&self, b: u64) -> u64 {
        if b + 1 >= self.maxlen {
            self.first
        } else {
            b + 1
        }
    }

    /// A descriptor or revoke block's tail checksum holds (or there is none).
    fn tail_ok(&self, block: &[u8]) -> bool {
        let Some(seed) = self.csum_seed else {
            return true;
        };
        let n = block.len();
        let mut copy = block.to_vec();
        copy[n - 4..].fill(0);
        ext4::crc32c(seed, &copy) == be32(block, n - 4)
    }

    fn commit_ok(&self, block: &[u8]) -> bool {
        let Some(seed) = self.csum_seed else {
            return true;
        };
        let mut copy = block.to_vec();
        copy[16..20].fill(0);
        ext4::crc32c(seed, &copy) == be32(block, 16)
    }

    /// A logged data block's checksum (from its tag) holds, or there is none.
    fn data_ok(&self, sequence: u32, data: &[u8], tag_sum: u32) -> bool {
        let Some(seed) = self.csum_seed else {
            return true;
        };
        let s = ext4::crc32c(seed, &sequence.to_be_bytes());
        let s = ext4::crc32c(s, data);
        if self.csum_v3() {
            s == tag_sum
        } else {
            s & 0xFFFF == tag_sum
        }
    }
}

/// Replays the journal of the ext4 file system in `f` (a partition window) in
/// place: every block of every committed transaction in the log is written home
/// unless a later transaction revoked it, then the log is marked empty and the
/// file system's `needs_recovery` flag cleared, with their checksums. Everything
/// is read and checked (the log's checksums, which is what keeps a stale
/// transaction of an earlier file system out) before the first block is written;
/// a log livestick cannot read whole is refused with nothing written.
pub fn replay_journal<F: Read + Write + Seek + ?Sized>(
    fs: &Ext4Fs,
    f: &mut F,
) -> Result<Replayed, Ext4FsError> {
    let mut sb = vec![0u8; SUPERBLOCK_BYTES];
    read_exact_at(f, SUPERBLOCK_OFFSET, &mut sb)?;
    let journal_inode = u32_at(&sb, SB_JOURNAL_INUM);
    if journal_inode == 0 {
        return Err(Ext4FsError::Damaged(
            "needs_recovery is set but the file system has no internal journal".into(),
        ));
    }
    let inode = fs.inode(f, journal_inode)?;
    let mut extents = fs.extents(f, &inode)?;
    extents.sort_by_key(|e| e.logical);
    let bs = fs.block_size;
    // Journal block → file-system block.
    let home = |j: u64| -> Result<u64, Ext4FsError> {
        extents
            .iter()
            .find(|e| j >= e.logical && j < e.logical + e.len && !e.unwritten)
            .map(|e| e.physical + (j - e.logical))
            .ok_or_else(|| Ext4FsError::Damaged(format!("journal block {j} is not mapped")))
    };
    let read_j = |f: &mut F, j: u64| -> Result<Vec<u8>, Ext4FsError> {
        let mut block = vec![0u8; bs as usize];
        read_exact_at(f, home(j)? * bs, &mut block)?;
        Ok(block)
    };
    let raw = read_j(f, 0)?;
    let kind = be32(&raw, 4);
    if be32(&raw, 0) != JBD2_MAGIC || !(kind == JBD2_SUPERBLOCK_V1 || kind == JBD2_SUPERBLOCK_V2) {
        return Err(Ext4FsError::Damaged("the journal has no superblock".into()));
    }
    let incompat = if kind == JBD2_SUPERBLOCK_V2 {
        be32(&raw, 0x28)
    } else {
        0
    };
    let known = JBD2_INCOMPAT_REVOKE
        | JBD2_INCOMPAT_64BIT
        | JBD2_INCOMPAT_ASYNC_COMMIT
        | JBD2_INCOMPAT_CSUM_V2
        | JBD2_INCOMPAT_CSUM_V3;
    if incompat & !known != 0 {
        return Err(Ext4FsError::Damaged(format!(
            "the journal uses features livestick does not replay (incompat {:#x}, e.g. fast commits)",
            incompat & !known
        )));
    }
    let jsb = JournalSb {
        block_size: u64::from(be32(&raw, 0xC)),
        maxlen: u64::from(be32(&raw, 0x10)),
        first: u64::from(be32(&raw, 0x14)),
        sequence: be32(&raw, 0x18),
        start: u64::from(be32(&raw, 0x1C)),
        incompat,
        csum_seed: (incompat & (JBD2_INCOMPAT_CSUM_V2 | JBD2_INCOMPAT_CSUM_V3) != 0)
            .then(|| ext4::crc32c(!0, &raw[0x30..0x40])),
        raw,
    };
    if jsb.block_size != bs || jsb.first == 0 || jsb.first >= jsb.maxlen {
        return Err(Ext4FsError::Damaged(format!(
            "the journal superblock says {} byte blocks, log from {} to {}",
            jsb.block_size, jsb.first, jsb.maxlen
        )));
    }
    let mut committed: Vec<Transaction> = Vec::new();
    if jsb.start != 0 {
        let tag_bytes = jsb.tag_bytes();
        let tail = if jsb.has_csum() { 4 } else { 0 };
        let mut at = jsb.start;
        let mut sequence = jsb.sequence;
        let mut open = Transaction {
            sequence,
            blocks: Vec::new(),
            revokes: Vec::new(),
        };
        // A log longer than the journal has looped: stop as the end.
        for _ in 0..jsb.maxlen {
            let block = read_j(f, at)?;
            if be32(&block, 0) != JBD2_MAGIC || be32(&block, 8) != sequence {
                break;
            }
            match be32(&block, 4) {
                JBD2_DESCRIPTOR => {
                    if !jsb.tail_ok(&block) {
                        break;
                    }
                    let mut off = 12usize;
                    let mut data_at = jsb.next(at);
                    while off + tag_bytes <= block.len() - tail {
                        let tag = &block[off..off + tag_bytes];
                        let (flags, low, high, sum) = if jsb.csum_v3() {
                            (be32(tag, 4), be32(tag, 0), be32(tag, 8), be32(tag, 12))
                        } else {
                            let high = if jsb.incompat & JBD2_INCOMPAT_64BIT != 0 {
                                be32(tag, 8)
                            } else {
                                0
                            };
                            (be16(tag, 6), be32(tag, 0), high, be16(tag, 4))
                        };
                        let target = u64::from(low) | u64::from(high) << 32;
                        // The checksum covers the copy as logged (escaped).
                        let data = read_j(f, data_at)?;
                        if !jsb.data_ok(sequence, &data, sum) {
                            return Err(Ext4FsError::Damaged(format!(
                                "journal transaction {sequence}: the copy of block {target} fails its checksum"
                            )));
                        }
                        if target >= fs.block_count {
                            return Err(Ext4FsError::Damaged(format!(
                                "journal transaction {sequence} logs block {target}, past the file system's end"
                            )));
                        }
                        open.blocks
                            .push((data_at, target, flags & JBD2_FLAG_ESCAPE != 0));
                        data_at = jsb.next(data_at);
                        off += tag_bytes;
                        if flags & JBD2_FLAG_SAME_UUID == 0 {
                            off += 16;
                        }
                        if flags & JBD2_FLAG_LAST_TAG != 0 {
                            break;
                        }
                    }
                    // The next header follows the data blocks.
                    at = data_at;
                    continue;
                }
                JBD2_REVOKE => {
                    if !jsb.tail_ok(&block) {
                        break;
                    }
                    let used = (be32(&block, 12) as usize).min(block.len() - tail);
                    let wide = jsb.incompat & JBD2_INCOMPAT_64BIT != 0;
                    let step = if wide { 8 } else { 4 };
                    let mut off = 16usize;
                    while off + step <= used {
                        open.revokes.push(if wide {
                            u64::from(be32(&block, off)) << 32 | u64::from(be32(&block, off + 4))
                        } else {
                            u64::from(be32(&block, off))
                        });
                        off += step;
                    }
                }
                JBD2_COMMIT => {
                    if !jsb.commit_ok(&block) {
                        break;
                    }
                    sequence = sequence.wrapping_add(1);
                    committed.push(std::mem::replace(
                        &mut open,
                        Transaction {
                            sequence,
                            blocks: Vec::new(),
                            revokes: Vec::new(),
                        },
                    ));
                }
                _ => break,
            }
            at = jsb.next(at);
        }
    }
    // A block is left out when a transaction as late as its own or later revoked it.
    let mut revoked_at: std::collections::HashMap<u64, u32> = Default::default();
    for t in &committed {
        for &b in &t.revokes {
            let e = revoked_at.entry(b).or_insert(t.sequence);
            if t.sequence.wrapping_sub(*e) as i32 > 0 {
                *e = t.sequence;
            }
        }
    }
    let mut done = Replayed {
        transactions: committed.len() as u64,
        ..Replayed::default()
    };
    for t in &committed {
        for &(copy_at, target, escaped) in &t.blocks {
            if revoked_at
                .get(&target)
                .is_some_and(|&r| r.wrapping_sub(t.sequence) as i32 >= 0)
            {
                done.revoked += 1;
                continue;
            }
            let mut data = read_j(f, copy_at)?;
            if escaped {
                data[..4].copy_from_slice(&JBD2_MAGIC.to_be_bytes());
            }
            f.seek(SeekFrom::Start(target * bs))?;
            f.write_all(&data)?;
            done.blocks += 1;
        }
    }
    f.flush()?;
    // The log is empty from here on: the next transaction is the one after it.
    let mut raw = jsb.raw.clone();
    let next = committed
        .last()
        .map_or(jsb.sequence, |t| t.sequence.wrapping_add(1));
    raw[0x18..0x1C].copy_from_slice(&next.to_be_bytes());
    raw[0x1C..0x20].fill(0);
    if jsb.has_csum() {
        raw[0xFC..0x100].fill(0);
        let sum = ext4::crc32c(!0, &raw[..1024]);
        raw[0xFC..0x100].copy_from_slice(&sum.to_be_bytes());
    }
    f.seek(SeekFrom::Start(home(0)? * bs))?;
    f.write_all(&raw)?;
    f.flush()?;
    // The superblock may itself have been replayed: its flag is cleared on what
    // is there now.
    let mut sb = vec![0u8; SUPERBLOCK_BYTES];
    read_exact_at(f, SUPERBLOCK_OFFSET, &mut sb)?;
    let incompat = u32_at(&sb, SB_FEATURE_INCOMPAT) & !INCOMPAT_RECOVER;
    sb[SB_FEATURE_INCOMPAT..SB_FEATURE_INCOMPAT + 4].copy_from_slice(&incompat.to_le_bytes());
    if fs.csum_seed.is_some() {
        let sum = ext4::crc32c(!0, &sb[..SB_CHECKSUM]);
        sb[SB_CHECKSUM..SB_CHECKSUM + 4].copy_from_slice(&sum.to_le_bytes());
    }
    f.seek(SeekFrom::Start(SUPERBLOCK_OFFSET))?;
    f.write_all(&sb)?;
    f.flush()?;
    Ok(done)
}

/// Replays the journal of the ext4 live `partition` on the whole device `dev`
/// ([`replay_journal`]), syncs, and reads the partition again. Returns it with the
/// line that says what was done (for stderr and JSON `repaired`).
pub fn replay_partition<F: Read + Write + Seek + crate::io::SyncData>(
    dev: &mut F,
    partition: &LivePartition,
) -> Result<(LivePartition, String), Ext4FsError> {
    let mut window = crate::io::PartitionWindow::new(&mut *dev, partition.start, partition.len);
    let done = replay_journal(&partition.fs, &mut window)?;
    window.flush()?;
    drop(window);
    dev.sync_data()?;
    let mut window = crate::io::PartitionWindow::new(&mut *dev, partition.start, partition.len);
    let fs = Ext4Fs::open(&mut window)?;
    let mut fresh = partition.clone();
    fresh.fs = fs;
    Ok((
        fresh,
        format!(
            "ext4 partition {} was not cleanly unmounted: its journal was replayed ({} blocks of {} committed transactions written home, {} revoked ones left out), as mounting it would",
            partition.number, done.blocks, done.transactions, done.revoked
        ),
    ))
}

/// A file inside ext4, read in place by its extents: what a mounted ext4 would
/// return, holes and unwritten extents as zeros, whatever the blocks hold.
/// `base` is where the file system starts in `inner` (a partition's offset on
/// the whole device).
pub struct Ext4File<F> {
    inner: F,
    base: u64,
    block_size: u64,
    extents: Vec<Extent>,
    size: u64,
    pos: u64,
}

impl<F: Read + Seek> Ext4File<F> {
    pub fn new(inner: F, base: u64, block_size: u64, map: &FileMap) -> Ext4File<F> {
        let mut extents = map.extents.clone();
        extents.sort_by_key(|e| e.logical);
        Ext4File {
            inner,
            base,
            block_size,
            extents,
            size: map.size,
            pos: 0,
        }
    }

    pub fn len(&self) -> u64 {
        self.size
    }

    pub fn is_empty(&self) -> bool {
        self.size == 0
    }
}

impl<F: Read + Seek> Read for Ext4File<F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(self.size - self.pos);
        let block = self.pos / self.block_size;
        let found = self
            .extents
            .iter()
            .find(|e| block >= e.logical && block < e.logical + e.len);
        let n = match found {
            Some(e) => {
                let in_extent = self.pos - e.logical * self.block_size;
                let n = want.min(e.len * self.block_size - in_extent) as usize;
                if e.unwritten {
                    buf[..n].fill(0);
                } else {
                    self.inner.seek(SeekFrom::Start(
                        self.base + e.physical * self.block_size + in_extent,
                    ))?;
                    self.inner.read_exact(&mut buf[..n])?;
                }
                n
            }
            None => {
                // A hole, up to the next extent.
                let next = self
                    .extents
                    .iter()
                    .map(|e| e.logical * self.block_size)
                    .filter(|&at| at > self.pos)
                    .min()
                    .unwrap_or(self.size);
                let n = want.min(next - self.pos) as usize;
                buf[..n].fill(0);
                n
            }
        };
        self.pos += n as u64;
        Ok(n)
    }
}

impl<F: Read + Seek> Seek for Ext4File<F> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = crate::io::seek_position(self.pos, self.size, to)?;
        Ok(self.pos)
    }
}

/// A file inside ext4 read and written in place by its extents (an overlay on the
/// ext4 live partition). Written extents take bytes directly. A block of an
/// unwritten extent reads as zeros whatever it holds, so zeros written there are
/// already in place and are skipped (a reset's zeroed dm-snapshot header stays
/// unwritten, no bytes on the bus); other bytes go in as whole blocks, zeros around
/// them, and the block is read from the stick from then on and marked written in
/// the extent tree at `sync_data`, once its bytes are on the stick.
pub struct Ext4FileRw<F: Read + Write + Seek + crate::io::SyncData> {
    inner: F,
    partition: LivePartition,
    inode: u32,
    extents: Vec<Extent>,
    size: u64,
    pos: u64,
    /// Logical blocks of unwritten extents that hold bytes not yet marked written.
    pending: std::collections::BTreeSet<u64>,
}

impl<F: Read + Write + Seek + crate::io::SyncData> Ext4FileRw<F> {
    pub fn new(inner: F, partition: &LivePartition, map: &FileMap) -> Ext4FileRw<F> {
        let mut extents = map.extents.clone();
        extents.sort_by_key(|e| e.logical);
        Ext4FileRw {
            inner,
            partition: partition.clone(),
            inode: map.inode,
            extents,
            size: map.size,
            pos: 0,
            pending: Default::default(),
        }
    }

    pub fn len(&self) -> u64 {
        self.size
    }

    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    fn block_size(&self) -> u64 {
        self.partition.fs.block_size
    }

    /// Where the whole file lies on the device, when it is one written run (so a
    /// tool can read it there: `device?offset=N`).
    pub fn contiguous_offset(&self) -> Option<u64> {
        let bs = self.block_size();
        let first = self.extents.first()?;
        let mut next = (0u64, first.physical);
        for e in &self.extents {
            if e.unwritten || e.logical != next.0 || e.physical != next.1 {
                return None;
            }
            next = (e.logical + e.len, e.physical + e.len);
        }
        (next.0 * bs >= self.size).then(|| self.partition.start + first.physical * bs)
    }

    fn extent_at(&self, block: u64) -> Option<Extent> {
        self.extents
            .iter()
            .find(|e| block >= e.logical && block < e.logical + e.len)
            .copied()
    }

    fn device_offset(&self, e: &Extent, pos: u64) -> u64 {
        self.partition.start
            + e.physical * self.block_size()
            + (pos - e.logical * self.block_size())
    }

    /// Marks the blocks written into unwritten extents written (their bytes synced
    /// first), and maps the file again.
    fn mark_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.inner.flush()?;
        self.inner.sync_data()?;
        let mut ranges = crate::io::RangeSet::new();
        for &b in &self.pending {
            ranges.insert(b..b + 1);
        }
        let fs = self.partition.fs.clone();
        let (start, len) = (self.partition.start, self.partition.len);
        let mut window = crate::io::PartitionWindow::new(&mut self.inner, start, len);
        mark_written(&fs, &mut window, self.inode, &ranges).map_err(io::Error::other)?;
        let inode = fs
            .inode(&mut window, self.inode)
            .map_err(io::Error::other)?;
        let extents = fs.extents(&mut window, &inode).map_err(io::Error::other)?;
        window.flush()?;
        drop(window);
        self.inner.sync_data()?;
        self.extents = extents;
        self.extents.sort_by_key(|e| e.logical);
        self.pending.clear();
        Ok(())
    }
}

impl<F: Read + Write + Seek + crate::io::SyncData> Read for Ext4FileRw<F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let bs = self.block_size();
        let want = (buf.len() as u64).min(self.size - self.pos);
        let block = self.pos / bs;
        let n = match self.extent_at(block) {
            Some(e) if !e.unwritten => {
                let n = want.min((e.logical + e.len) * bs - self.pos) as usize;
                let at = self.device_offset(&e, self.pos);
                self.inner.seek(SeekFrom::Start(at))?;
                self.inner.read_exact(&mut buf[..n])?;
                n
            }
            Some(e) => {
                // Block by block: a pending block holds bytes, the others read as zeros.
                let n = want.min((block + 1) * bs - self.pos) as usize;
                if self.pending.contains(&block) {
                    let at = self.device_offset(&e, self.pos);
                    self.inner.seek(SeekFrom::Start(at))?;
                    self.inner.read_exact(&mut buf[..n])?;
                } else {
                    buf[..n].fill(0);
                }
                n
            }
            None => {
                let next = self
                    .extents
                    .iter()
                    .map(|e| e.logical * bs)
                    .filter(|&at| at > self.pos)
                    .min()
                    .unwrap_or(self.size);
                let n = want.min(next - self.pos) as usize;
                buf[..n].fill(0);
                n
            }
        };
        self.pos += n as u64;
        Ok(n)
    }
}

impl<F: Read + Write + Seek + crate::io::SyncData> Write for Ext4FileRw<F> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.pos >= self.size {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "a write past the end of a file on the ext4 live partition",
            ));
        }
        let bs = self.block_size();
        let want = (buf.len() as u64).min(self.size - self.pos);
        let block = self.pos / bs;
        let Some(e) = self.extent_at(block) else {
            return Err(io::Error::other(format!(
                "a write into a hole at byte {} of a file on the ext4 live partition",
                self.pos
            )));
        };
        let n = if !e.unwritten || self.pending.contains(&block) {
            let end = if e.unwritten {
                (block + 1) * bs
            } else {
                (e.logical + e.len) * bs
            };
            let n = want.min(end - self.pos) as usize;
            let at = self.device_offset(&e, self.pos);
            self.inner.seek(SeekFrom::Start(at))?;
            self.inner.write_all(&buf[..n])?;
            n
        } else {
            let n = want.min((block + 1) * bs - self.pos) as usize;
            if buf[..n].iter().any(|&b| b != 0) {
                let mut whole = vec![0u8; bs as usize];
                let within = (self.pos - block * bs) as usize;
                whole[within..within + n].copy_from_slice(&buf[..n]);
                let at = self.device_offset(&e, block * bs);
                self.inner.seek(SeekFrom::Start(at))?;
                self.inner.write_all(&whole)?;
                self.pending.insert(block);
            }
            n
        };
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<F: Read + Write + Seek + crate::io::SyncData> Seek for Ext4FileRw<F> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = crate::io::seek_position(self.pos, self.size, to)?;
        Ok(self.pos)
    }
}

impl<F: Read + Write + Seek + crate::io::SyncData> crate::io::SyncData for Ext4FileRw<F> {
    fn sync_data(&mut self) -> io::Result<()> {
        self.inner.flush()?;
        self.inner.sync_data()?;
        self.mark_pending()
    }
}

impl<F: Read + Write + Seek + crate::io::SyncData> Drop for Ext4FileRw<F> {
    fn drop(&mut self) {
        // Every caller syncs; this only keeps bytes written without a sync from
        // being hidden behind an unwritten extent.
        let _ = self.mark_pending();
    }
}

/// The ext4 file system that holds a live directory: where it starts on the device.
#[derive(Clone, Debug)]
pub struct LivePartition {
    /// 1-based partition number.
    pub number: u32,
    pub start: u64,
    pub len: u64,
    pub fs: Ext4Fs,
}

/// Finds, on a whole device, the ext4 partition with `/<live_dir>/squashfs.img`
/// (the ext4 live layout); `None` when there is none.
pub fn find_live_partition<R: Read + Seek>(
    dev: &mut R,
    live_dir: &str,
) -> Result<Option<LivePartition>, Ext4FsError> {
    let path = format!("/{live_dir}/squashfs.img");
    first_ext4_partition(dev, |fs, window| Ok(fs.lookup(window, &path)?.is_some()))
}

/// Finds, on a whole device, the first ext4 partition with live directories (one
/// below the root holding a root image: squashfs.img, rootfs.img, ext3fs.img), and
/// their names; `None` when there is none. For a stick whose live directory is not
/// known (`restore`).
pub fn find_any_live_partition<R: Read + Seek>(
    dev: &mut R,
) -> Result<Option<(LivePartition, Vec<String>)>, Ext4FsError> {
    let mut dirs = Vec::new();
    Ok(first_ext4_partition(dev, |fs, window| {
        dirs.clear();
        let root = fs.inode(window, ROOT_INODE)?;
        for (name, number) in fs.read_dir(window, &root)? {
            let inode = fs.inode(window, number)?;
            if !inode.is_dir() || name == "lost+found" {
                continue;
            }
            let holds_root = fs
                .read_dir(window, &inode)?
                .iter()
                .any(|(file, _)| crate::layout::is_root_image_name(file));
            if holds_root {
                dirs.push(name);
            }
        }
        dirs.sort();
        Ok(!dirs.is_empty())
    })?
    .map(|p| (p, std::mem::take(&mut dirs))))
}

/// The first ext4 partition of a whole device that `holds` accepts.
fn first_ext4_partition<R: Read + Seek>(
    dev: &mut R,
    mut holds: impl FnMut(
        &Ext4Fs,
        &mut crate::io::PartitionWindow<ReadOnly<&mut R>>,
    ) -> Result<bool, Ext4FsError>,
) -> Result<Option<LivePartition>, Ext4FsError> {
    let disk_size = dev.seek(SeekFrom::End(0))?;
    let Ok(Some((_, entries))) =
        crate::disk::partition::read_table(dev, disk_size, crate::disk::partition::SECTOR)
    else {
        return Ok(None);
    };
    for e in entries.iter().filter(|e| !e.is_extended()) {
        let mut window = crate::io::PartitionWindow::new(ReadOnly(&mut *dev), e.start, e.len);
        let Ok(fs) = Ext4Fs::open(&mut window) else {
            continue;
        };
        if holds(&fs, &mut window)? {
            return Ok(Some(LivePartition {
                number: e.number,
                start: e.start,
                len: e.len,
                fs,
            }));
        }
    }
    Ok(None)
}

/// A reader that refuses writes, for [`crate::io::PartitionWindow`], which wants
/// `Read + Write + Seek`.
struct ReadOnly<R>(R);

impl<R: Read> Read for ReadOnly<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<R> Write for ReadOnly<R> {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::other("read-only"))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<R: Seek> Seek for ReadOnly<R> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.0.seek(to)
    }
}

/// Marks every unwritten extent of `inode` written, rewriting the extent entries
/// and the checksums that cover them (the inode's and each extent block's tail),
/// so that the kernel reads what livestick puts in those blocks instead of zeros.
/// Returns how many extents changed.
pub fn mark_initialised<F: Read + Write + Seek + ?Sized>(
    fs: &Ext4Fs,
    f: &mut F,
    number: u32,
) -> Result<usize, Ext4FsError> {
    edit_leaves(fs, f, number, &mut |_, node| Ok(clear_uninit(node)))
}

/// Marks written the file blocks `written` (logical block ranges) holds where they
/// lie in unwritten extents, splitting those extents so that the rest of each stays
/// unwritten (reading as zeros). A node without room for the pieces has an extent
/// marked written whole instead, after its other blocks are zeroed through `f`: what
/// the file reads is the same either way. Returns how many extents changed.
pub fn mark_written<F: Read + Write + Seek + ?Sized>(
    fs: &Ext4Fs,
    f: &mut F,
    number: u32,
    written: &crate::io::RangeSet,
) -> Result<usize, Ext4FsError> {
    let ranges: Vec<std::ops::Range<u64>> = written.iter().collect();
    let block_size = fs.block_size;
    edit_leaves(fs, f, number, &mut |f, node| {
        split_written(f, block_size, node, &ranges)
    })
}

/// A change to one extent node's bytes (with the file system to write through),
/// returning how many entries it changed.
type LeafEdit<'a, F> = dyn FnMut(&mut F, &mut [u8]) -> Result<usize, Ext4FsError> + 'a;

/// Runs `edit` on every leaf node of `number`'s extent tree (the root in the inode
/// included) and rewrites each node it changed with the checksum over it.
fn edit_leaves<F: Read + Write + Seek + ?Sized>(
    fs: &Ext4Fs,
    f: &mut F,
    number: u32,
    edit: &mut LeafEdit<'_, F>,
) -> Result<usize, Ext4FsError> {
    let inode = fs.inode(f, number)?;
    if inode.flags & INODE_FLAG_EXTENTS == 0 {
        return Err(Ext4FsError::NoExtents(format!("inode {number}")));
    }
    let mut changed = 0usize;
    // Tree blocks first (each with its own tail checksum), then the root in the inode.
    let mut blocks: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut leaves = Vec::new();
    fs.walk(f, &inode.i_block, 0, &mut leaves, &mut blocks)?;
    let seed = fs.csum_seed.map(|s| fs.inode_seed(s, &inode));
    for (n, mut block) in blocks {
        let here = edit(f, &mut block)?;
        if here == 0 {
            continue;
        }
        changed += here;
        if let Some(seed) = seed {
            let max = usize::from(u16_at(&block, 4));
            let tail = 12 + 12 * max;
            if tail + 4 > block.len() {
                return Err(Ext4FsError::Damaged(format!(
                    "extent block {n} has no room for its checksum"
                )));
            }
            let sum = ext4::crc32c(seed, &block[..tail]);
            block[tail..tail + 4].copy_from_slice(&sum.to_le_bytes());
        }
        f.seek(SeekFrom::Start(n * fs.block_size))?;
        f.write_all(&block)?;
    }
    let mut root = inode.i_block;
    let here = edit(f, &mut root)?;
    if here > 0 {
        changed += here;
        let at = fs.inode_offset(f, number)?;
        let mut raw = vec![0u8; fs.inode_size as usize];
        read_exact_at(f, at, &mut raw)?;
        raw[0x28..0x28 + 60].copy_from_slice(&root);
        if let Some(seed) = seed {
            set_inode_checksum(&mut raw, seed);
        }
        f.seek(SeekFrom::Start(at))?;
        f.write_all(&raw)?;
    }
    f.flush()?;
    Ok(changed)
}

/// The leaf entries of an extent node, `None` for an index node or no node.
fn leaf_entries(node: &[u8]) -> Result<Option<Vec<Extent>>, Ext4FsError> {
    // Anything with another magic, or an index node however damaged, is no leaf.
    if node.len() < 12 || u16_at(node, 0) != EXTENT_MAGIC || u16_at(node, 6) != 0 {
        return Ok(None);
    }
    match ext4::parse_extent_node(node).map_err(|why| Ext4FsError::Damaged(why.into()))? {
        ExtentNode::Leaves(leaves) => Ok(Some(leaves)),
        ExtentNode::Index(_) => Ok(None),
    }
}

/// `e` cut at the edges of `written`: the parts inside written, the rest unwritten.
fn pieces(e: &Extent, written: &[std::ops::Range<u64>]) -> Vec<Extent> {
    if !e.unwritten {
        return vec![*e];
    }
    let piece = |from: u64, to: u64, unwritten: bool| Extent {
        logical: from,
        physical: e.physical + (from - e.logical),
        len: to - from,
        unwritten,
    };
    let end = e.logical + e.len;
    let mut at = e.logical;
    let mut out = Vec::new();
    for r in written {
        if r.end <= at || r.start >= end {
            continue;
        }
        let (from, to) = (r.start.max(at), r.end.min(end));
        if from > at {
            out.push(piece(at, from, true));
        }
        out.push(piece(from, to, false));
        at = to;
    }
    if at < end {
        out.push(piece(at, end, true));
    }
    out
}

/// [`mark_written`]'s edit of one node.
fn split_written<F: Write + Seek + ?Sized>(
    f: &mut F,
    block_size: u64,
    node: &mut [u8],
    written: &[std::ops::Range<u64>],
) -> Result<usize, Ext4FsError> {
    let Some(old) = leaf_entries(node)? else {
        return Ok(0);
    };
    let max = usize::from(u16_at(node, 4));
    if 12 + max * 12 > node.len() || old.len() > max {
        return Err(Ext4FsError::Damaged(
            "extent node overflows its block".into(),
        ));
    }
    let mut plans: Vec<Vec<Extent>> = old.iter().map(|e| pieces(e, written)).collect();
    let mut total: usize = plans.iter().map(Vec::len).sum();
    // No room to split: the extent becomes written whole, its unwritten parts zeroed
    // first so they read as zeros as before.
    for (plan, e) in plans.iter_mut().zip(&old) {
        if total <= max {
            break;
        }
        if plan.len() > 1 {
            let zeros = vec![0u8; block_size as usize];
            for p in plan.iter().filter(|p| p.unwritten) {
                f.seek(SeekFrom::Start(p.physical * block_size))?;
                for _ in 0..p.len {
                    f.write_all(&zeros)?;
                }
            }
            f.flush()?;
            total -= plan.len() - 1;
            *plan = vec![Extent {
                unwritten: false,
                ..*e
            }];
        }
    }
    let changed = plans
        .iter()
        .zip(&old)
        .filter(|(plan, e)| plan.as_slice() != [**e])
        .count();
    if changed == 0 {
        return Ok(0);
    }
    let all: Vec<&Extent> = plans.iter().flatten().collect();
    for (k, e) in all.iter().enumerate() {
        let at = 12 + k * 12;
        let raw_len = e.len as u16 + if e.unwritten { UNINIT_LEN } else { 0 };
        node[at..at + 4].copy_from_slice(&(e.logical as u32).to_le_bytes());
        node[at + 4..at + 6].copy_from_slice(&raw_len.to_le_bytes());
        node[at + 6..at + 8].copy_from_slice(&((e.physical >> 32) as u16).to_le_bytes());
        node[at + 8..at + 12].copy_from_slice(&(e.physical as u32).to_le_bytes());
    }
    node[12 + all.len() * 12..12 + max * 12].fill(0);
    node[2..4].copy_from_slice(&(all.len() as u16).to_le_bytes());
    Ok(changed)
}

/// Clears the unwritten mark of the leaf entries of one node; how many it cleared.
fn clear_uninit(node: &mut [u8]) -> usize {
    if node.len() < 12 || u16_at(node, 0) != EXTENT_MAGIC || u16_at(node, 6) != 0 {
        return 0;
    }
    let entries = usize::from(u16_at(node, 2));
    let mut n = 0;
    for i in 0..entries {
        let at = 12 + i * 12 + 4;
        if at + 2 > node.len() {
            break;
        }
        let len = u16_at(node, at);
        if len > UNINIT_LEN {
            node[at..at + 2].copy_from_slice(&(len - UNINIT_LEN).to_le_bytes());
            n += 1;
        }
    }
    n
}

/// ext4's inode checksum: crc32c from the inode's seed over the whole record
/// with both checksum fields zeroed; low half at 0x7C, high half at 0x82 when
/// the extra fields reach it.
fn set_inode_checksum(raw: &mut [u8], seed: u32) {
    let has_hi = raw.len() > 128 && {
        let extra = usize::from(u16_at(raw, 0x80));
        128 + extra >= 0x84
    };
    raw[0x7C..0x7E].fill(0);
    if has_hi {
        raw[0x82..0x84].fill(0);
    }
    let sum = ext4::crc32c(seed, raw);
    raw[0x7C..0x7E].copy_from_slice(&(sum as u16).to_le_bytes());
    if has_hi {
        raw[0x82..0x84].copy_from_slice(&((sum >> 16) as u16).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn have(tool: &str) -> bool {
        crate::tools::find_program(&match tool {
            "debugfs" => crate::tools::DEBUGFS,
            _ => crate::tools::MKE2FS,
        })
        .is_ok()
    }

    /// An ext4 image made by mke2fs with `script` run by `debugfs -w`.
    fn image(size_mib: u64, script: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fs.img");
        ext4::make_ext4_image(
            &path,
            size_mib << 20,
            "LIVE",
            &ext4::Ext4Options {
                block_size: Some(4096),
                ..Default::default()
            },
        )
        .expect("mke2fs");
        let out = Command::new("debugfs")
            .args(["-w", "-f", "-"])
            .arg(&path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write as _;
                c.stdin
                    .take()
                    .expect("stdin")
                    .write_all(script.as_bytes())?;
                c.wait_with_output()
            })
            .expect("debugfs");
        assert!(out.status.success(), "debugfs: {out:?}");
        (dir, path)
    }

    fn debugfs_out(path: &std::path::Path, cmd: &str) -> String {
        let out = Command::new("debugfs")
            .args(["-R", cmd])
            .arg(path)
            .output()
            .expect("debugfs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn finds_files_and_extents_as_debugfs_shows_them() {
        if !have("debugfs") || !have("mke2fs") {
            return;
        }
        let host = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(host.path(), b"hello from the record\n").expect("write");
        let script = format!(
            "mkdir LiveOS\nwrite {} LiveOS/.livestick\nwrite /dev/null LiveOS/big\n\
             fallocate LiveOS/big 0 49999\nsif LiveOS/big size 204800000\n",
            host.path().display()
        );
        let (_d, path) = image(400, &script);
        let mut f = std::fs::File::open(&path).expect("open");
        let fs = Ext4Fs::open(&mut f).expect("ext4");
        assert_eq!(fs.block_size, 4096);
        assert_eq!(fs.label, "LIVE");
        let live = fs.lookup(&mut f, "/LiveOS").unwrap().unwrap();
        let names: Vec<String> = fs
            .read_dir(&mut f, &live)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, [".livestick", "big"]);
        assert_eq!(
            fs.read_small(&mut f, "/LiveOS/.livestick")
                .unwrap()
                .unwrap(),
            b"hello from the record\n"
        );
        assert!(fs.lookup(&mut f, "/LiveOS/nothing").unwrap().is_none());
        let big = fs.file(&mut f, "/LiveOS/big").unwrap().unwrap();
        assert_eq!(big.size, 204_800_000);
        assert!(big.has_unwritten());
        // Each extent as debugfs's `ex` lists it: "logical - end  physical - end  len".
        let shown = debugfs_out(&path, "ex LiveOS/big");
        let leaves: Vec<(u64, u64, u64)> = shown
            .lines()
            .filter(|l| l.contains("Uninit"))
            .map(|l| {
                let nums: Vec<u64> = l
                    .split(|c: char| !c.is_ascii_digit())
                    .filter(|s| !s.is_empty())
                    .filter_map(|s| s.parse().ok())
                    .collect();
                // level, max, entry, entries, lstart, lend, pstart, pend, len
                (nums[4], nums[6], nums[8])
            })
            .collect();
        let ours: Vec<(u64, u64, u64)> = big
            .extents
            .iter()
            .map(|e| (e.logical, e.physical, e.len))
            .collect();
        assert_eq!(ours, leaves, "debugfs ex:\n{shown}");
        let runs = big.byte_runs(4096, "/LiveOS/big").unwrap();
        assert_eq!(runs.iter().map(|r| r.1).sum::<u64>(), 204_800_000);
    }

    #[test]
    fn marking_extents_written_keeps_e2fsck_clean() {
        if !have("debugfs") || !have("mke2fs") {
            return;
        }
        // Big enough for a tree with an extent block (more than 4 extents).
        let script = "mkdir LiveOS\nwrite /dev/null LiveOS/big\nfallocate LiveOS/big 0 199999\n\
                      sif LiveOS/big size 819200000\n";
        let (_d, path) = image(1024, script);
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open");
        let fs = Ext4Fs::open(&mut f).expect("ext4");
        let before = fs.file(&mut f, "/LiveOS/big").unwrap().unwrap();
        assert!(before.extents.len() > 4, "{:?}", before.extents);
        let n = mark_initialised(&fs, &mut f, before.inode).unwrap();
        assert_eq!(n, before.extents.len());
        let after = fs.file(&mut f, "/LiveOS/big").unwrap().unwrap();
        assert!(!after.has_unwritten());
        assert_eq!(
            after.byte_runs(4096, "big").unwrap(),
            before.byte_runs(4096, "big").unwrap()
        );
        drop(f);
        let out = Command::new("e2fsck")
            .args(["-fn"])
            .arg(&path)
            .output()
            .expect("e2fsck");
        assert!(
            out.status.success(),
            "e2fsck: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let shown = debugfs_out(&path, "ex LiveOS/big");
        assert!(!shown.contains("Uninit"), "{shown}");
    }

    #[test]
    fn writes_into_unwritten_extents_split_them_and_read_back_through_debugfs() {
        if !have("debugfs") || !have("mke2fs") {
            return;
        }
        // One 8 MiB file: a single unwritten extent in the inode, which has room
        // for 4 entries.
        let script = "write /dev/null big\nfallocate big 0 2047\nsif big size 8388608\n";
        let (dir, path) = image(64, script);
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open");
        let fs = Ext4Fs::open(&mut f).expect("ext4");
        let map = fs.file(&mut f, "/big").unwrap().unwrap();
        assert_eq!(map.extents.len(), 1, "{:?}", map.extents);
        // Stale bytes in the file's blocks: they must keep reading as zeros.
        for (at, n) in map.byte_runs(4096, "big").unwrap() {
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(&vec![0xA5; n as usize]).unwrap();
        }
        let part = LivePartition {
            number: 1,
            start: 0,
            len: 64 << 20,
            fs: fs.clone(),
        };
        let mut expected = vec![0u8; 8 << 20];
        {
            let mut rw = Ext4FileRw::new(&mut f, &part, &map);
            rw.seek(SeekFrom::Start(4096 * 10 + 100)).unwrap();
            rw.write_all(b"hello").unwrap();
            // Zeros into an unwritten block: already there, skipped.
            rw.seek(SeekFrom::Start(4096 * 20)).unwrap();
            rw.write_all(&[0u8; 4096]).unwrap();
            crate::io::SyncData::sync_data(&mut rw).unwrap();
        }
        expected[4096 * 10 + 100..4096 * 10 + 105].copy_from_slice(b"hello");
        let split = fs.file(&mut f, "/big").unwrap().unwrap();
        let shape: Vec<(u64, u64, bool)> = split
            .extents
            .iter()
            .map(|e| (e.logical, e.len, e.unwritten))
            .collect();
        assert_eq!(shape, [(0, 10, true), (10, 1, false), (11, 2037, true)]);
        // A write that needs two more entries than the inode holds: that extent is
        // zeroed and marked written whole.
        {
            let map = split.clone();
            let mut rw = Ext4FileRw::new(&mut f, &part, &map);
            rw.seek(SeekFrom::Start(4096 * 100)).unwrap();
            rw.write_all(&[7u8; 4096]).unwrap();
            crate::io::SyncData::sync_data(&mut rw).unwrap();
        }
        expected[4096 * 100..4096 * 101].fill(7);
        let whole = fs.file(&mut f, "/big").unwrap().unwrap();
        let shape: Vec<(u64, u64, bool)> = whole
            .extents
            .iter()
            .map(|e| (e.logical, e.len, e.unwritten))
            .collect();
        assert_eq!(shape, [(0, 10, true), (10, 1, false), (11, 2037, false)]);
        drop(f);
        let out = Command::new("e2fsck")
            .args(["-fn"])
            .arg(&path)
            .output()
            .expect("e2fsck");
        assert!(
            out.status.success(),
            "e2fsck: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let dump = dir.path().join("big.dump");
        debugfs_out(&path, &format!("dump big {}", dump.display()));
        assert!(std::fs::read(&dump).expect("dumped") == expected);
    }

    #[test]
    fn exchanging_two_entries_keeps_e2fsck_clean_and_swaps_the_files() {
        if !have("debugfs") || !have("mke2fs") {
            return;
        }
        let old = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(old.path(), b"the old image\n").expect("write");
        let new = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(new.path(), b"the new image, longer\n").expect("write");
        let script = format!(
            "mkdir LiveOS\nwrite {} LiveOS/squashfs.img\nwrite /dev/null LiveOS/overlay\nwrite {} LiveOS/squashfs.img.new\n",
            old.path().display(),
            new.path().display()
        );
        let (_d, path) = image(64, &script);
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open");
        let fs = Ext4Fs::open(&mut f).expect("ext4");
        exchange_entries(&fs, &mut f, "/LiveOS", "squashfs.img", "squashfs.img.new")
            .expect("exchange");
        drop(f);
        let fsck = Command::new("e2fsck")
            .arg("-fn")
            .arg(&path)
            .output()
            .expect("e2fsck");
        assert!(fsck.status.success(), "{fsck:?}");
        assert_eq!(
            debugfs_out(&path, "cat LiveOS/squashfs.img"),
            "the new image, longer\n"
        );
        assert_eq!(
            debugfs_out(&path, "cat LiveOS/squashfs.img.new"),
            "the old image\n"
        );
        let mut f = std::fs::File::open(&path).expect("open");
        let e = exchange_entries(
            &fs,
            &mut ReadOnly(&mut f),
            "/LiveOS",
            "squashfs.img",
            "nothing",
        )
        .unwrap_err();
        assert!(e.to_string().contains("no entry nothing"), "{e}");
    }

    /// Block `n` (4 KiB) of an image file.
    fn block_of(path: &std::path::Path, n: u64) -> Vec<u8> {
        let mut f = std::fs::File::open(path).expect("open");
        let mut b = vec![0u8; 4096];
        read_exact_at(&mut f, n * 4096, &mut b).expect("read");
        b
    }

    #[test]
    fn journal_replay_matches_e2fsck_and_honours_revokes() {
        if !have("debugfs") || !have("mke2fs") {
            return;
        }
        // Three transactions, written by debugfs's journal commands: blocks 300 and
        // 303; blocks 301 and 302; a revoke of 300. A block whose first word is
        // the journal's magic is logged escaped.
        let d1 = tempfile::NamedTempFile::new().expect("tmp");
        let mut first: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
        first[4096..4100].copy_from_slice(&JBD2_MAGIC.to_be_bytes());
        std::fs::write(d1.path(), &first).expect("write");
        let d2 = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(
            d2.path(),
            (0..8192u32)
                .map(|i| (i * 13 + 1) as u8)
                .collect::<Vec<u8>>(),
        )
        .expect("write");
        let script = format!(
            "jo -c\njw -b 300,303 {}\njc\njo -c\njw -b 301,302 {}\njw -r 300\njc\n",
            d1.path().display(),
            d2.path().display()
        );
        let (dir, path) = image(64, &script);
        let dumped = debugfs_out(&path, "logdump");
        assert!(dumped.contains("revoke"), "{dumped}");
        let theirs = dir.path().join("e2fsck.img");
        std::fs::copy(&path, &theirs).expect("copy");
        let fsck = Command::new("e2fsck")
            .arg("-fy")
            .arg(&theirs)
            .output()
            .expect("e2fsck");
        assert!(matches!(fsck.status.code(), Some(0 | 1)), "{fsck:?}");

        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open");
        let fs = Ext4Fs::open(&mut f).expect("ext4");
        assert!(fs.needs_recovery);
        let done = replay_journal(&fs, &mut f).expect("replay");
        drop(f);
        assert_eq!(
            done,
            Replayed {
                transactions: 3,
                blocks: 3,
                revoked: 1
            }
        );
        for n in 300..=303 {
            assert_eq!(block_of(&path, n), block_of(&theirs, n), "block {n}");
        }
        assert_eq!(block_of(&path, 303)[..4], JBD2_MAGIC.to_be_bytes());
        let mut f = std::fs::File::open(&path).expect("open");
        assert!(!Ext4Fs::open(&mut f).expect("ext4").needs_recovery);
        let check = Command::new("e2fsck")
            .arg("-fn")
            .arg(&path)
            .output()
            .expect("e2fsck");
        assert!(check.status.success(), "{check:?}");
        // Nothing left to replay: a second run writes nothing.
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open");
        let fs = Ext4Fs::open(&mut f).expect("ext4");
        assert_eq!(replay_journal(&fs, &mut f).expect("replay").blocks, 0);
    }

    #[test]
    fn garbage_is_refused_not_followed() {
        let mut zeros = std::io::Cursor::new(vec![0u8; 8192]);
        assert!(matches!(
            Ext4Fs::open(&mut zeros),
            Err(Ext4FsError::NotExt4(_))
        ));
        let mut node = [0u8; 60];
        node[0..2].copy_from_slice(&EXTENT_MAGIC.to_le_bytes());
        node[2..4].copy_from_slice(&200u16.to_le_bytes());
        let fs = Ext4Fs {
            block_size: 4096,
            uuid: String::new(),
            label: String::new(),
            block_count: 10,
            free_blocks: 0,
            needs_recovery: false,
            inodes_per_group: 8,
            inode_size: 256,
            desc_size: 32,
            first_data_block: 0,
            is64: false,
            csum_seed: None,
        };
        let mut out = Vec::new();
        assert!(
            fs.walk(&mut zeros, &node, 0, &mut out, &mut Vec::new())
                .is_err()
        );
    }
}
