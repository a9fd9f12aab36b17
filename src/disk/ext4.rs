//! ext4 images through e2fsprogs, the reference implementation.
//!
//! No Rust crate formats ext4, so this is the one module that runs
//! `mke2fs`, `e2fsck`, `resize2fs` and `dumpe2fs`, always on regular files
//! (no root, no loop device). It also parses the ext4 superblock itself, so
//! `home info` can describe a filesystem seen only through a decrypting
//! reader, where no file exists for `dumpe2fs` to open.

use crate::io::io_at;
use std::fs::OpenOptions;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::tools::{DUMPE2FS, E2FSCK, MKE2FS, RESIZE2FS, Tool, ToolMissing, find_program};

/// Errors from creating, checking, resizing or inspecting an ext4 image.
#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    #[error(transparent)]
    NotInstalled(#[from] ToolMissing),
    #[error("`{tool}` failed on {path} ({status}): {stderr}")]
    Failed {
        tool: &'static str,
        path: PathBuf,
        status: String,
        stderr: String,
    },
    #[error(
        "ext4 image size {size} bytes is invalid: it must be a whole number of KiB and at least {min} bytes"
    )]
    BadSize { size: u64, min: u64 },
    #[error(
        "cannot shrink the ext4 filesystem from {current} to {requested} bytes: only growing is supported"
    )]
    Shrink { current: u64, requested: u64 },
    #[error(
        "ext4 feature edit {0:?} is refused: images are copied as sparse files and need a checksummed journal"
    )]
    RequiredFeature(String),
    #[error("journal of {path}: {detail}")]
    Journal { path: PathBuf, detail: String },
    #[error("ext4 label {0:?} is longer than 16 bytes")]
    BadLabel(String),
    #[error("not an ext2/3/4 filesystem: {0}")]
    NotExt4(String),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl crate::error::Classify for Ext4Error {
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::Io
    }
}

/// The smallest image we ask mke2fs for: below this ext4 has no room for a journal.
pub const MIN_EXT4_SIZE: u64 = 4 * 1024 * 1024;

/// Options for [`make_ext4_image`] beyond size and label.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ext4Options {
    /// Fill the new filesystem from this directory (`mke2fs -d`, no root needed).
    pub root_dir: Option<PathBuf>,
    /// Filesystem UUID; random when `None`.
    pub uuid: Option<uuid::Uuid>,
    /// Percentage of blocks reserved for root (`-m`); mke2fs's 5 % when `None`.
    pub reserved_percent: Option<u8>,
    /// Block size in bytes (`-b`); mke2fs picks by size when `None` (1 KiB
    /// for small images). Inside LUKS with 4096-byte sectors it must be 4096.
    pub block_size: Option<u32>,
    /// Extra feature edits for `-O`, e.g. `^64bit` when extlinux must read it.
    pub features: Vec<String>,
}

/// `tool` run with `args` to its end, whatever its exit status.
fn output(tool: Tool, args: &[&std::ffi::OsStr]) -> Result<std::process::Output, Ext4Error> {
    let exe = find_program(&tool)?;
    Command::new(&exe)
        .args(args)
        // Stable, parseable output whatever the user's locale.
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| Ext4Error::Io { path: exe, source })
}

fn run(tool: Tool, args: &[&std::ffi::OsStr], path: &Path) -> Result<String, Ext4Error> {
    let out = output(tool, args)?;
    // e2fsck -p exits 1 when it fixed something, which is a success here.
    let ok = out.status.success() || (tool == E2FSCK && out.status.code() == Some(1));
    if !ok {
        return Err(Ext4Error::Failed {
            tool: tool.name,
            path: path.to_path_buf(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl From<crate::io::IoAt> for Ext4Error {
    fn from(crate::io::IoAt { path, source }: crate::io::IoAt) -> Self {
        Ext4Error::Io { path, source }
    }
}

/// Create (or overwrite) the regular file `path` as an ext4 image of exactly
/// `size` bytes labelled `label`. The root directory belongs to root whoever
/// runs us.
///
/// The file is sparse, and the image is made so that copying only its data
/// regions ([`crate::disk::sparse::data_regions`]) over *arbitrary* stale
/// bytes (random data, an old filesystem, an old journal) gives a correct
/// filesystem. mke2fs "zeroes" ranges of a regular file by punching holes, so
/// anything ext4 would trust to be zero must not be claimed:
///
/// - Inode tables: `lazy_itable_init=1`. The group descriptors then say "not
///   zeroed" and carry `bg_itable_unused`, so e2fsck and the kernel never look
///   at the stale inodes past it; the kernel's lazyinit thread zeroes the
///   tables in the background after the first mount. That is the trade-off:
///   the live system writes those zeros (about 16 MiB per GiB of filesystem,
///   rate-limited) instead of us writing them over USB at copy time. (With
///   `lazy_itable_init=0` the descriptors would promise zeroed tables that
///   are stale bytes on the stick.) Without a group-descriptor checksum
///   mke2fs ignores the option, hence `metadata_csum` below.
/// - Journal: `lazy_journal_init=1`; its blocks past the journal superblock
///   are whatever the stick held, possibly an old ext4 journal whose
///   committed transactions recovery would replay after a crash if they
///   looked like the next ones of the new journal. Two things stop that:
///   - Checksums. `metadata_csum` gives the journal checksum v3, seeded with
///     the filesystem UUID: a stale descriptor or commit block of another
///     filesystem fails its checksum, and recovery (the kernel's and
///     e2fsck's alike) takes a stale commit older than the last good one as
///     the end of the log. mke2fs 1.47 leaves the journal superblock without
///     the checksum flag (the kernel adds it at mount), so it is set here, as
///     debugfs's `journal_open -c` sets it (`checksum_v3`): checksummed from
///     the first transaction.
///   - A random first sequence number (mke2fs starts every journal at 1, so
///     an old journal's transaction IDs line up with the new one's). This
///     covers what the checksums cannot: a caller-chosen `opts.uuid` equal to
///     that of the filesystem underneath (an overlay reset keeping its UUID)
///     gives the same checksum seed, and a stale commit whose time is not
///     older (same second, or a clock set ahead) makes recovery stop with a
///     checksum error (the mount fails, e2fsck discards the journal). With a
///     random start a stale transaction lines up only by chance (about one in
///     2^31 for each old transaction ID), and a block out of sequence simply
///     ends the log.
///
///   `tests/ext4_sparse.rs` replays a stale transaction without either
///   defence and shows that each alone keeps it out.
///
/// `has_journal` and `metadata_csum` are asked for explicitly rather than
/// trusted to the local mke2fs.conf, and a caller's feature edit that turns
/// either off is refused. `nodiscard` keeps mke2fs from punching the whole
/// file first (it is new and sparse anyway).
pub fn make_ext4_image(
    path: &Path,
    size: u64,
    label: &str,
    opts: &Ext4Options,
) -> Result<(), Ext4Error> {
    if !size.is_multiple_of(1024) || size < MIN_EXT4_SIZE {
        return Err(Ext4Error::BadSize {
            size,
            min: MIN_EXT4_SIZE,
        });
    }
    if label.len() > 16 {
        return Err(Ext4Error::BadLabel(label.to_string()));
    }
    if let Some(f) = opts.features.iter().find(|f| {
        REQUIRED_FEATURES
            .iter()
            .any(|r| f.trim() == format!("^{r}"))
    }) {
        return Err(Ext4Error::RequiredFeature(f.clone()));
    }
    find_program(&MKE2FS)?;
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(io_at(path))?;
    // A sparse file of the final size: mke2fs writes only metadata.
    f.set_len(size).map_err(io_at(path))?;
    drop(f);

    let mut args: Vec<std::ffi::OsString> = vec![
        "-q".into(),
        "-F".into(),
        "-t".into(),
        "ext4".into(),
        "-L".into(),
        label.into(),
        "-E".into(),
        "lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0".into(),
        // One -O list: ours, then the caller's edits (checked above).
        "-O".into(),
        REQUIRED_FEATURES
            .iter()
            .map(|f| f.to_string())
            .chain(opts.features.iter().cloned())
            .collect::<Vec<_>>()
            .join(",")
            .into(),
    ];
    if let Some(u) = opts.uuid {
        args.extend(["-U".into(), u.hyphenated().to_string().into()]);
    }
    if let Some(b) = opts.block_size {
        args.extend(["-b".into(), b.to_string().into()]);
    }
    if let Some(m) = opts.reserved_percent {
        args.extend(["-m".into(), m.to_string().into()]);
    }
    if let Some(d) = &opts.root_dir {
        args.extend(["-d".into(), d.as_os_str().to_owned()]);
    }
    args.push(path.as_os_str().to_owned());
    args.push(format!("{}k", size / 1024).into());
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    run(MKE2FS, &refs, path)?;
    // Never 0, and below 2^31 so that no comparison of transaction IDs, in
    // any implementation, sits near a wrap.
    let sequence = rand::random::<u32>() % 0x7FFF_FFFE + 1;
    edit_journal_superblock(path, |sb, is64| {
        checksum_v3(sb, is64);
        set_sequence(sb, sequence);
    })
}

/// Features [`make_ext4_image`] cannot do without: see its documentation.
const REQUIRED_FEATURES: [&str; 2] = ["has_journal", "metadata_csum"];

/// The value of `name:` in dumpe2fs output.
fn dumpe2fs_field<'a>(out: &'a str, name: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// The jbd2 journal superblock's magic number (big-endian, like all its fields).
const JBD2_MAGIC: u32 = 0xC03B_3998;
/// Incompatible journal features that put a checksum in the superblock (v2, v3).
const JBD2_CSUM_V2_V3: u32 = JBD2_CSUM_V2 | JBD2_CSUM_V3;
/// `s_checksum_type` for crc32c, the only one v2/v3 use.
const JBD2_CRC32C: u8 = 4;

/// crc32c (Castagnoli, reflected), without the final inversion, as jbd2
/// chains it: the journal superblock's checksum is this over its 1024 bytes
/// with the checksum field zeroed, starting from !0.
pub(crate) fn crc32c(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    crc
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Set the sequence number the empty journal of the ext4 image at `path`
/// starts from (the transaction ID that recovery expects first), keeping the
/// journal superblock's checksum valid. Refused unless the journal is empty
/// (`s_start` 0) and its checksum, when it has one, verifies as it was.
///
/// [`make_ext4_image`] uses it to make stale transactions of an older journal
/// out of sequence; it is public so tests can stage old journals.
pub fn set_journal_sequence(path: &Path, sequence: u32) -> Result<(), Ext4Error> {
    edit_journal_superblock(path, |sb, _| set_sequence(sb, sequence))
}

/// Journal compatible feature: the v1 commit-block checksum.
const JBD2_COMPAT_CHECKSUM: u32 = 0x01;
/// Journal incompatible features: 64-bit block numbers, checksum v2 and v3.
const JBD2_64BIT: u32 = 0x02;
const JBD2_CSUM_V2: u32 = 0x08;
const JBD2_CSUM_V3: u32 = 0x10;

/// Checksum v3 from the first transaction, as debugfs's `journal_open -c` turns it on
/// over a `metadata_csum` file system (mke2fs 1.47 leaves the journal superblock
/// without it, and the kernel adds it only at the first mount): v3 replaces the older
/// checksums, crc32c, and 64-bit tags on a 64-bit file system.
/// `tests/ext4_sparse.rs` compares the result with debugfs's, byte for byte.
fn checksum_v3(sb: &mut [u8; 1024], is64: bool) {
    let compat = be32(sb, 0x24) & !JBD2_COMPAT_CHECKSUM;
    let incompat =
        (be32(sb, 0x28) & !JBD2_CSUM_V2) | JBD2_CSUM_V3 | if is64 { JBD2_64BIT } else { 0 };
    sb[0x24..0x28].copy_from_slice(&compat.to_be_bytes());
    sb[0x28..0x2C].copy_from_slice(&incompat.to_be_bytes());
    sb[0x50] = JBD2_CRC32C;
}

fn set_sequence(sb: &mut [u8; 1024], sequence: u32) {
    sb[0x18..0x1C].copy_from_slice(&sequence.to_be_bytes());
}

/// The journal superblock's checksum: crc32c over its 1024 bytes with the checksum
/// field zeroed, starting from !0.
fn journal_checksum(sb: &[u8; 1024]) -> u32 {
    let mut copy = *sb;
    copy[0xFC..0x100].fill(0);
    crc32c(!0, &copy)
}

fn journal_is_checksummed(sb: &[u8; 1024]) -> bool {
    be32(sb, 4) == 4 && be32(sb, 0x28) & JBD2_CSUM_V2_V3 != 0
}

/// An extent tree node's magic number (its header's first field).
pub(crate) const EXTENT_MAGIC: u16 = 0xF30A;
/// A leaf entry longer than this is unwritten, its length `ee_len - 32768`.
pub(crate) const UNINIT_LEN: u16 = 32768;

/// One run of a file's blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// First file block.
    pub logical: u64,
    /// First file-system block.
    pub physical: u64,
    pub len: u64,
    /// Allocated but unwritten: reads as zeros whatever the blocks hold.
    pub unwritten: bool,
}

/// What one node of an extent tree holds: the runs of blocks it maps (a leaf),
/// or the blocks of the nodes below it, in logical order (an index).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ExtentNode {
    Leaves(Vec<Extent>),
    Index(Vec<u64>),
}

/// Parses one extent tree node: the 60 bytes of an inode's `i_block` (or the
/// superblock's copy of the journal's), or a tree block. The one reader of the
/// format, for the journal lookup here and for `disk::ext4_fs`'s walks.
pub(crate) fn parse_extent_node(node: &[u8]) -> Result<ExtentNode, &'static str> {
    use crate::bytes::{u16_at, u32_at};
    if node.len() < 12 || u16_at(node, 0) != EXTENT_MAGIC {
        return Err("bad extent tree header");
    }
    let entries = usize::from(u16_at(node, 2));
    if 12 + 12 * entries > node.len() {
        return Err("extent node overflows its block");
    }
    let entry = |i: usize| &node[12 + 12 * i..24 + 12 * i];
    let wide = |lo: u32, hi: u16| u64::from(lo) | u64::from(hi) << 32;
    Ok(if u16_at(node, 6) == 0 {
        // (first logical block, length, physical start high and low)
        ExtentNode::Leaves(
            (0..entries)
                .map(entry)
                .map(|e| {
                    let raw_len = u16_at(e, 4);
                    let unwritten = raw_len > UNINIT_LEN;
                    Extent {
                        logical: u64::from(u32_at(e, 0)),
                        physical: wide(u32_at(e, 8), u16_at(e, 6)),
                        len: u64::from(if unwritten {
                            raw_len - UNINIT_LEN
                        } else {
                            raw_len
                        }),
                        unwritten,
                    }
                })
                .collect(),
        )
    } else {
        // (first logical block, child block low and high)
        ExtentNode::Index(
            (0..entries)
                .map(entry)
                .map(|e| wide(u32_at(e, 4), u16_at(e, 8)))
                .collect(),
        )
    })
}

/// Where block 0 of the journal lies: from the copy of the journal inode's extent
/// tree that mke2fs keeps in the superblock (`s_jnl_blocks`), following index
/// blocks down to the leaf that maps it.
fn journal_block_zero(f: &std::fs::File, sb: &[u8], block_size: u64) -> Result<u64, String> {
    /// `s_jnl_backup_type`: the backup holds the inode's `i_block`.
    const JNL_BACKUP_BLOCKS: u8 = 1;
    if sb[0xFD] != JNL_BACKUP_BLOCKS {
        return Err("the superblock keeps no copy of the journal inode's blocks".into());
    }
    let mut node = sb[0x10C..0x10C + 60].to_vec();
    // A tree deeper than a few levels is damage, not a journal.
    for _ in 0..5 {
        let damaged = |why: &str| format!("the journal inode's extent tree is damaged: {why}");
        let leaf = match parse_extent_node(&node).map_err(damaged)? {
            ExtentNode::Leaves(extents) => {
                return extents
                    .iter()
                    .find(|e| e.logical == 0 && e.len > 0)
                    .map(|e| e.physical)
                    .ok_or_else(|| "the journal inode maps no block 0".to_string());
            }
            // In logical order: the first covers block 0.
            ExtentNode::Index(children) => *children
                .first()
                .ok_or_else(|| damaged("an index node with no entries"))?,
        };
        let mut next = vec![0u8; block_size as usize];
        f.read_exact_at(&mut next, leaf * block_size)
            .map_err(|e| format!("reading the journal's extent block {leaf}: {e}"))?;
        node = next;
    }
    Err("the journal inode's extent tree is too deep".into())
}

/// Reads the journal superblock of the ext4 image at `path` (block 0 of the
/// journal inode, found through its extents), lets `edit` change it, checksums it
/// and writes it back. Refused unless it is a journal superblock of an empty
/// journal (`s_start` 0) whose checksum, when it has one, verifies as it was.
/// `edit` also learns whether the file system is 64-bit.
fn edit_journal_superblock(
    path: &Path,
    edit: impl FnOnce(&mut [u8; 1024], bool),
) -> Result<(), Ext4Error> {
    let bad = |detail: String| Ext4Error::Journal {
        path: path.to_path_buf(),
        detail,
    };
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_at(path))?;
    let mut raw = vec![0u8; SUPERBLOCK_BYTES];
    f.read_exact_at(&mut raw, SUPERBLOCK_OFFSET)
        .map_err(io_at(path))?;
    let parsed = Superblock::parse(&raw)?;
    let is64 = parsed.feature_incompat & INCOMPAT_64BIT != 0;
    let block = journal_block_zero(&f, &raw, parsed.block_size).map_err(&bad)?;
    let at = block
        .checked_mul(parsed.block_size)
        .ok_or_else(|| bad(format!("journal block {block} is out of range")))?;
    let mut sb = [0u8; 1024];
    f.read_exact_at(&mut sb, at).map_err(io_at(path))?;
    // Header: magic, block type (3, 4: superblock v1, v2); then s_sequence at
    // 0x18, s_start at 0x1C, s_feature_compat at 0x24, s_feature_incompat at 0x28,
    // s_checksum_type at 0x50, s_checksum at 0xFC.
    if be32(&sb, 0) != JBD2_MAGIC || !matches!(be32(&sb, 4), 3 | 4) {
        return Err(bad(format!("no journal superblock at block {block}")));
    }
    if be32(&sb, 0x1C) != 0 {
        return Err(bad("the journal is not empty".into()));
    }
    if journal_is_checksummed(&sb) {
        if sb[0x50] != JBD2_CRC32C {
            return Err(bad(format!("journal checksum type {}", sb[0x50])));
        }
        if journal_checksum(&sb) != be32(&sb, 0xFC) {
            return Err(bad(
                "the journal superblock's checksum does not verify".into()
            ));
        }
    }
    edit(&mut sb, is64);
    if journal_is_checksummed(&sb) {
        let c = journal_checksum(&sb);
        sb[0xFC..0x100].copy_from_slice(&c.to_be_bytes());
    }
    f.write_all_at(&sb, at).map_err(io_at(path))?;
    f.sync_all().map_err(io_at(path))?;
    Ok(())
}

/// The byte ranges of the ext4 file system at `offset` in `image` that its block
/// bitmaps mark in use (metadata, journal, inode tables and file data), from `dumpe2fs`:
/// a copy of only these blocks is the same file system. `len` is the file system's
/// size in bytes; ranges are relative to `offset`.
pub fn used_regions(
    image: &Path,
    offset: u64,
    len: u64,
) -> Result<Vec<std::ops::Range<u64>>, Ext4Error> {
    let spec = format!("{}?offset={offset}", image.display());
    let text = run(DUMPE2FS, &[std::ffi::OsStr::new(&spec)], image)?;
    if !bitmaps_are_whole(&text) {
        return Ok(vec![0..len]);
    }
    parse_used_regions(&text, len).ok_or_else(|| Ext4Error::Failed {
        tool: DUMPE2FS.name,
        path: image.to_path_buf(),
        status: "unexpected output".into(),
        stderr: "no block size, block count or free block list".into(),
    })
}

/// Whether the block bitmaps dumpe2fs listed (`text`) name every block in use. Not
/// when the journal still holds updates to replay (a stick pulled while mounted:
/// a file's data is written, its blocks marked used only in the journal) or the
/// file system was left with errors: a copy of the used blocks alone would lose
/// that file, so it copies the whole file system.
fn bitmaps_are_whole(text: &str) -> bool {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let recovering = field("Filesystem features:")
        .is_some_and(|f| f.split_whitespace().any(|f| f == "needs_recovery"));
    let clean = field("Filesystem state:") == Some("clean");
    !recovering && clean
}

/// Used ranges from dumpe2fs's per-group "Free blocks: a-b, c" lists.
pub fn parse_used_regions(text: &str, len: u64) -> Option<Vec<std::ops::Range<u64>>> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let block = field("Block size:")?;
    let blocks = field("Block count:")?;
    let mut free: Vec<(u64, u64)> = Vec::new();
    for line in text.lines() {
        let Some(list) = line.trim_start().strip_prefix("Free blocks: ") else {
            continue;
        };
        for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (a, b) = match item.split_once('-') {
                Some((a, b)) => (a.parse::<u64>().ok()?, b.parse::<u64>().ok()?),
                None => {
                    let a = item.parse::<u64>().ok()?;
                    (a, a)
                }
            };
            free.push((a, b + 1));
        }
    }
    free.sort_unstable();
    let mut used = Vec::new();
    let mut at = 0u64;
    for (a, b) in free {
        if a > at {
            used.push(at * block..(a * block).min(len));
        }
        at = at.max(b);
    }
    if at < blocks {
        used.push(at * block..(blocks * block).min(len));
    }
    used.retain(|r| r.start < r.end);
    Some(used)
}

/// Check the filesystem in `path` (`e2fsck -f -p`), as resize2fs requires.
pub fn check_ext4_image(path: &Path) -> Result<(), Ext4Error> {
    run(
        E2FSCK,
        &["-f".as_ref(), "-p".as_ref(), path.as_os_str()],
        path,
    )?;
    Ok(())
}

/// Check the file system in `path` without changing a byte (`e2fsck -f -n`). A
/// refusal is [`Ext4Error::Failed`] with what e2fsck found (it reports on stdout
/// with `-n`), last lines first kept.
pub fn check_ext4_image_read_only(path: &Path) -> Result<(), Ext4Error> {
    let out = output(E2FSCK, &["-f".as_ref(), "-n".as_ref(), path.as_os_str()])?;
    if out.status.success() {
        return Ok(());
    }
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Err(Ext4Error::Failed {
        tool: E2FSCK.name,
        path: path.to_path_buf(),
        status: out.status.to_string(),
        stderr: said.trim().to_string(),
    })
}

/// Grow the ext4 filesystem in the regular file `path` to `new_size` bytes,
/// extending the file first. Shrinking is refused.
pub fn grow_ext4_image(path: &Path, new_size: u64) -> Result<(), Ext4Error> {
    if !new_size.is_multiple_of(1024) {
        return Err(Ext4Error::BadSize {
            size: new_size,
            min: MIN_EXT4_SIZE,
        });
    }
    let info = ext4_info(path)?;
    if new_size < info.size_bytes {
        return Err(Ext4Error::Shrink {
            current: info.size_bytes,
            requested: new_size,
        });
    }
    find_program(&RESIZE2FS)?;
    // Checked before the file grows: a file system e2fsck refuses leaves the
    // file as it was.
    check_ext4_image(path)?;
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_at(path))?;
    let len = f.metadata().map_err(io_at(path))?.len();
    if len < new_size {
        f.set_len(new_size).map_err(io_at(path))?;
    }
    drop(f);
    let size_arg = format!("{}K", new_size / 1024);
    run(RESIZE2FS, &[path.as_os_str(), size_arg.as_ref()], path)?;
    Ok(())
}

/// Where the primary superblock starts in an ext2/3/4 image, and its length.
pub const SUPERBLOCK_OFFSET: u64 = 1024;
pub const SUPERBLOCK_BYTES: usize = 1024;
/// `s_magic`, and where it sits in the image (offset 0x38 of the superblock).
pub const MAGIC: u16 = 0xEF53;
pub const MAGIC_OFFSET: u64 = SUPERBLOCK_OFFSET + 0x38;

const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_64BIT: u32 = 0x80;
const STATE_ERROR_FS: u16 = 0x2;

/// Whether `magic`, the two bytes at [`MAGIC_OFFSET`], mark an ext2/3/4 file system.
pub fn is_magic(magic: &[u8]) -> bool {
    magic.get(..2) == Some(&MAGIC.to_le_bytes()[..])
}

/// Whether `head`, the first bytes of an image, holds the ext2/3/4 magic (false when
/// it is too short to tell).
pub fn image_has_magic(head: &[u8]) -> bool {
    let at = MAGIC_OFFSET as usize;
    head.get(at..at + 2).is_some_and(is_magic)
}

/// Whether the image behind `r` holds the ext2/3/4 magic; a read that fails or
/// comes up short means no.
pub fn has_magic<R: Read + Seek>(r: &mut R) -> bool {
    let mut m = [0u8; 2];
    r.seek(SeekFrom::Start(MAGIC_OFFSET)).is_ok() && r.read_exact(&mut m).is_ok() && is_magic(&m)
}

/// The facts of the primary superblock livestick reads: sizes, counts, features and
/// the flags that say whether the file system was left clean. Every reader of an
/// ext2/3/4 superblock goes through here.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Superblock {
    pub block_size: u64,
    pub block_count: u64,
    pub reserved_blocks: u64,
    pub free_blocks: u64,
    pub label: String,
    /// Hyphenated, empty when the bytes are not a UUID.
    pub uuid: String,
    pub feature_compat: u32,
    pub feature_incompat: u32,
    pub feature_ro_compat: u32,
    /// `s_state`.
    pub state: u16,
    /// `s_error_count`: errors the kernel counted since the last check.
    pub error_count: u32,
    /// `s_last_orphan`: the head of the orphan list, 0 when it is empty.
    pub last_orphan: u32,
}

impl Superblock {
    /// Parses the primary superblock: `sb` is the 1024 bytes at [`SUPERBLOCK_OFFSET`].
    pub fn parse(sb: &[u8]) -> Result<Superblock, Ext4Error> {
        if sb.len() < SUPERBLOCK_BYTES {
            return Err(Ext4Error::NotExt4("superblock is cut short".into()));
        }
        let u16_at = |o: usize| crate::bytes::u16_at(sb, o);
        let u32_at = |o: usize| crate::bytes::u32_at(sb, o);
        let magic = u16_at(0x38);
        if magic != MAGIC {
            return Err(Ext4Error::NotExt4(format!(
                "superblock magic is {magic:#06x}, not 0xef53"
            )));
        }
        let log = u32_at(0x18);
        if log > 6 {
            return Err(Ext4Error::NotExt4(format!("block size 2^{} KiB", log)));
        }
        let feature_incompat = u32_at(0x60);
        // The high halves of the counters only mean something with the 64bit feature.
        let is64 = feature_incompat & INCOMPAT_64BIT != 0;
        let wide = |lo: usize, hi: usize| {
            u64::from(u32_at(lo)) | if is64 { u64::from(u32_at(hi)) << 32 } else { 0 }
        };
        let label_raw = &sb[0x78..0x88];
        let end = label_raw.iter().position(|&b| b == 0).unwrap_or(16);
        let uuid = uuid::Uuid::from_slice(&sb[0x68..0x78])
            .map(|u| u.hyphenated().to_string())
            .unwrap_or_default();
        Ok(Superblock {
            block_size: 1024 << log,
            block_count: wide(0x04, 0x150),
            reserved_blocks: wide(0x08, 0x154),
            free_blocks: wide(0x0C, 0x158),
            label: String::from_utf8_lossy(&label_raw[..end]).into_owned(),
            uuid,
            feature_compat: u32_at(0x5C),
            feature_incompat,
            feature_ro_compat: u32_at(0x64),
            state: u16_at(0x3A),
            error_count: u32_at(0x194),
            last_orphan: u32_at(0xE8),
        })
    }

    /// Reads and parses the primary superblock of the image behind `r`.
    pub fn read_from<R: Read + Seek>(r: &mut R) -> Result<Superblock, Ext4Error> {
        let mut sb = vec![0u8; SUPERBLOCK_BYTES];
        let path = PathBuf::from("<image>");
        r.seek(SeekFrom::Start(SUPERBLOCK_OFFSET))
            .map_err(io_at(&path))?;
        r.read_exact(&mut sb).map_err(io_at(&path))?;
        Superblock::parse(&sb)
    }

    /// `block_count × block_size`: the file system's size.
    pub fn size_bytes(&self) -> u64 {
        self.block_count * self.block_size
    }

    pub fn free_bytes(&self) -> u64 {
        self.free_blocks * self.block_size
    }

    /// Blocks in use (including metadata) × block size.
    pub fn used_bytes(&self) -> u64 {
        self.block_count.saturating_sub(self.free_blocks) * self.block_size
    }

    /// `needs_recovery`: the journal holds transactions not yet written home.
    pub fn needs_recovery(&self) -> bool {
        self.feature_incompat & INCOMPAT_RECOVER != 0
    }

    /// The kernel recorded an error (`s_state` has EXT2_ERROR_FS).
    pub fn errors_recorded(&self) -> bool {
        self.state & STATE_ERROR_FS != 0
    }

    pub fn has_orphans(&self) -> bool {
        self.last_orphan != 0
    }
}

/// What `home info` reports about an ext4 filesystem.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Ext4Info {
    pub label: String,
    pub uuid: String,
    #[serde(rename = "block_bytes")]
    pub block_size: u64,
    pub block_count: u64,
    pub free_blocks: u64,
    pub reserved_blocks: u64,
    /// `block_count × block_size`.
    pub size_bytes: u64,
    /// Blocks in use (including metadata) × block size.
    pub used_bytes: u64,
}

impl Ext4Info {
    fn finish(mut self) -> Self {
        self.size_bytes = self.block_count * self.block_size;
        self.used_bytes = self.block_count.saturating_sub(self.free_blocks) * self.block_size;
        self
    }

    /// Parse the primary superblock: `sb` is the 1024 bytes at offset 1024.
    pub fn from_superblock(sb: &[u8]) -> Result<Ext4Info, Ext4Error> {
        Ok(Ext4Info::from(Superblock::parse(sb)?))
    }

    /// Read the superblock from any reader positioned over an ext4 image.
    pub fn read_from<R: Read + Seek>(r: &mut R) -> Result<Ext4Info, Ext4Error> {
        Ok(Ext4Info::from(Superblock::read_from(r)?))
    }
}

impl From<Superblock> for Ext4Info {
    fn from(sb: Superblock) -> Ext4Info {
        Ext4Info {
            label: sb.label,
            uuid: sb.uuid,
            block_size: sb.block_size,
            block_count: sb.block_count,
            free_blocks: sb.free_blocks,
            reserved_blocks: sb.reserved_blocks,
            size_bytes: 0,
            used_bytes: 0,
        }
        .finish()
    }
}

/// Describe the ext4 filesystem in the regular file `path` with `dumpe2fs -h`.
pub fn ext4_info(path: &Path) -> Result<Ext4Info, Ext4Error> {
    let out = run(DUMPE2FS, &["-h".as_ref(), path.as_os_str()], path)?;
    parse_dumpe2fs(&out)
}

fn parse_dumpe2fs(out: &str) -> Result<Ext4Info, Ext4Error> {
    let field = |name: &str| dumpe2fs_field(out, name);
    let num = |name: &str| -> Result<u64, Ext4Error> {
        field(name)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Ext4Error::NotExt4(format!("dumpe2fs printed no {name:?}")))
    };
    let label = match field("Filesystem volume name") {
        Some("<none>") | None => String::new(),
        Some(l) => l.to_string(),
    };
    Ok(Ext4Info {
        label,
        uuid: field("Filesystem UUID").unwrap_or_default().to_string(),
        block_size: num("Block size")?,
        block_count: num("Block count")?,
        free_blocks: num("Free blocks")?,
        reserved_blocks: num("Reserved block count")?,
        size_bytes: 0,
        used_bytes: 0,
    }
    .finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node of `depth` with 12-byte `entries`, in `room` bytes.
    fn node(depth: u16, entries: &[[u8; 12]], room: usize) -> Vec<u8> {
        let mut n = vec![0u8; room];
        n[0..2].copy_from_slice(&EXTENT_MAGIC.to_le_bytes());
        n[2..4].copy_from_slice(&(entries.len() as u16).to_le_bytes());
        n[6..8].copy_from_slice(&depth.to_le_bytes());
        for (i, e) in entries.iter().enumerate() {
            n[12 + 12 * i..24 + 12 * i].copy_from_slice(e);
        }
        n
    }

    fn leaf(logical: u32, len: u16, physical: u64) -> [u8; 12] {
        let mut e = [0u8; 12];
        e[0..4].copy_from_slice(&logical.to_le_bytes());
        e[4..6].copy_from_slice(&len.to_le_bytes());
        e[6..8].copy_from_slice(&((physical >> 32) as u16).to_le_bytes());
        e[8..12].copy_from_slice(&(physical as u32).to_le_bytes());
        e
    }

    #[test]
    fn extent_nodes_give_their_runs_or_children() {
        let leaves = node(
            0,
            &[leaf(0, 8, 0x1_0000_0010), leaf(8, UNINIT_LEN + 3, 99)],
            60,
        );
        assert_eq!(
            parse_extent_node(&leaves).unwrap(),
            ExtentNode::Leaves(vec![
                Extent {
                    logical: 0,
                    physical: 0x1_0000_0010,
                    len: 8,
                    unwritten: false
                },
                Extent {
                    logical: 8,
                    physical: 99,
                    len: 3,
                    unwritten: true
                },
            ])
        );
        // Index entries: first logical block, child low 32 bits, child high 16.
        let mut index = [0u8; 12];
        index[4..8].copy_from_slice(&7u32.to_le_bytes());
        index[8..10].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(
            parse_extent_node(&node(1, &[index], 60)).unwrap(),
            ExtentNode::Index(vec![(2 << 32) | 7])
        );
        let mut stale = leaves.clone();
        stale[0] ^= 1;
        assert_eq!(parse_extent_node(&stale), Err("bad extent tree header"));
        // Five entries do not fit the 60 bytes of an inode's i_block.
        assert_eq!(
            parse_extent_node(&node(0, &[leaf(0, 1, 1); 5], 72)[..60]),
            Err("extent node overflows its block")
        );
        assert!(parse_extent_node(&leaves[..8]).is_err());
    }

    #[test]
    fn bitmaps_are_trusted_only_on_a_clean_file_system_with_nothing_to_replay() {
        let header = |features: &str, state: &str| {
            format!(
                "Filesystem volume name:   HOME\nFilesystem features:      has_journal {features} extent\nFilesystem state:         {state}\nBlock size:               4096\n"
            )
        };
        assert!(bitmaps_are_whole(&header("ext_attr", "clean")));
        assert!(!bitmaps_are_whole(&header("needs_recovery", "clean")));
        assert!(!bitmaps_are_whole(&header("ext_attr", "not clean")));
        assert!(!bitmaps_are_whole(&header("ext_attr", "clean with errors")));
        assert!(!bitmaps_are_whole("garbage"));
    }

    #[test]
    fn used_regions_are_the_complement_of_the_free_lists() {
        let text = "Block count:              100\nBlock size:               1024\nFirst block:              1\n  Free blocks: 10-19, 30\n  Free blocks: 50-99\n";
        assert_eq!(
            parse_used_regions(text, 100 * 1024).unwrap(),
            vec![0..10 * 1024, 20 * 1024..30 * 1024, 31 * 1024..50 * 1024]
        );
        assert!(parse_used_regions("garbage", 1).is_none());
    }

    #[test]
    fn parses_dumpe2fs_header() {
        let out = "dumpe2fs 1.47.0 (5-Feb-2023)\nFilesystem volume name:   HOME\n\
                   Filesystem UUID:          0b1c7a5e-1111-2222-3333-444455556666\n\
                   Block count:              2048\nReserved block count:     0\n\
                   Free blocks:              1000\nBlock size:               4096\n";
        let i = parse_dumpe2fs(out).unwrap();
        assert_eq!(i.label, "HOME");
        assert_eq!(i.size_bytes, 2048 * 4096);
        assert_eq!(i.used_bytes, 1048 * 4096);
        let none = out.replace("HOME", "<none>");
        assert_eq!(parse_dumpe2fs(&none).unwrap().label, "");
    }

    #[test]
    fn rejects_bad_sizes_and_labels() {
        let p = Path::new("/nonexistent/x.img");
        assert!(matches!(
            make_ext4_image(p, 1024, "HOME", &Ext4Options::default()),
            Err(Ext4Error::BadSize { .. })
        ));
        assert!(matches!(
            make_ext4_image(p, MIN_EXT4_SIZE + 1, "HOME", &Ext4Options::default()),
            Err(Ext4Error::BadSize { .. })
        ));
        assert!(matches!(
            make_ext4_image(
                p,
                MIN_EXT4_SIZE,
                "A_LABEL_TOO_LONG_",
                &Ext4Options::default()
            ),
            Err(Ext4Error::BadLabel(_))
        ));
    }

    #[test]
    fn refuses_to_drop_the_checksummed_journal() {
        let p = Path::new("/nonexistent/x.img");
        for f in ["^metadata_csum", "^has_journal"] {
            let opts = Ext4Options {
                features: vec!["^64bit".into(), f.into()],
                ..Ext4Options::default()
            };
            assert!(matches!(
                make_ext4_image(p, MIN_EXT4_SIZE, "HOME", &opts),
                Err(Ext4Error::RequiredFeature(_))
            ));
        }
    }

    #[test]
    fn crc32c_check_value() {
        // The standard check value of CRC-32C over "123456789" (with the
        // final inversion that jbd2 leaves out).
        assert_eq!(!crc32c(!0, b"123456789"), 0xE306_9283);
    }

    #[test]
    fn superblock_magic_checked() {
        assert!(matches!(
            Ext4Info::from_superblock(&[0u8; 1024]),
            Err(Ext4Error::NotExt4(_))
        ));
    }

    #[test]
    fn superblock_of_a_real_mke2fs_image() {
        if crate::tools::find_program(&crate::tools::MKE2FS).is_err()
            || crate::tools::find_program(&crate::tools::DUMPE2FS).is_err()
        {
            eprintln!("skipped: e2fsprogs not installed");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("sb.img");
        make_ext4_image(&img, 16 << 20, "SBTEST", &Ext4Options::default()).unwrap();
        let mut f = std::fs::File::open(&img).unwrap();
        assert!(has_magic(&mut f));
        let sb = Superblock::read_from(&mut f).unwrap();
        let dumped = ext4_info(&img).unwrap();
        assert_eq!(sb.label, "SBTEST");
        assert_eq!(sb.uuid, dumped.uuid);
        assert_eq!(sb.block_size, dumped.block_size);
        assert_eq!(sb.block_count, dumped.block_count);
        assert_eq!(sb.free_blocks, dumped.free_blocks);
        assert_eq!(sb.reserved_blocks, dumped.reserved_blocks);
        assert_eq!(sb.size_bytes(), 16 << 20);
        assert_eq!(Ext4Info::from(sb.clone()), dumped);
        assert!(!sb.needs_recovery() && !sb.errors_recorded() && !sb.has_orphans());
        let mut head = vec![0u8; 2048];
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_exact(&mut head).unwrap();
        assert!(image_has_magic(&head));
        assert!(!image_has_magic(&head[..1081]));
        assert!(!has_magic(&mut std::io::Cursor::new(vec![0u8; 4096])));
    }
}
