//! `LiveOS/home.img`: a persistent /home for the live system, plain ext4 or
//! ext4 inside LUKS2, built entirely in user space.
//!
//! The live system's `livesys` script loop-mounts the file at boot, asking
//! for the passphrase when blkid calls it `crypto_LUKS`, and mounts the ext4
//! inside on /home (reference/livecd-iso-to-disk.md §4.6). Its label is
//! `HOME`, as livecd-iso-to-disk makes it.
//!
//! [`build_home_image`] returns the finished image as a `Read + Seek` of
//! exactly the requested size for the write command to stream into FAT. For
//! LUKS the ciphertext is produced on the fly from a sparse plaintext ext4
//! image, so no second full-size temporary file is written.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::disk::ext4::{self, Ext4Error, Ext4Info, Ext4Options};
use crate::io::{IoAt, io_at};
use crate::persist::luks::{self, LuksEncryptingReader, LuksError, LuksInfo, LuksParams};

const MIB: u64 = 1024 * 1024;
/// The largest file FAT32 holds is 4 GiB − 1 byte; whole MiB below that.
pub const FAT_MAX_FILE_MIB: u64 = 4095;
/// The smallest plain home: room for ext4 with a journal and some files.
pub const MIN_PLAIN_HOME_MIB: u64 = 16;
/// The smallest encrypted home: 16 MiB of LUKS2 metadata plus 16 MiB of ext4.
pub const MIN_LUKS_HOME_MIB: u64 = 32;
/// The filesystem label livesys and livecd-iso-to-disk use.
pub const HOME_LABEL: &str = "HOME";

/// Errors from building, inspecting or resizing home.img.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error(
        "home size {size} bytes is not a whole number of MiB; give the size in MiB (e.g. --home-size-mb 1024)"
    )]
    NotWholeMib { size: u64 },
    #[error("home size {mib} MiB is too small: an {kind} home needs at least {min} MiB")]
    TooSmall {
        mib: u64,
        min: u64,
        kind: &'static str,
    },
    #[error(
        "home size {mib} MiB is too large: a file on FAT holds at most {max} MiB (4 GiB − 1 byte); choose {max} or less",
        max = FAT_MAX_FILE_MIB
    )]
    TooLarge { mib: u64 },
    #[error(
        "home.img can only grow: it is {current_mib} MiB and {requested_mib} MiB was asked for"
    )]
    Shrink {
        current_mib: u64,
        requested_mib: u64,
    },
    #[error("cannot read the passphrase file {path}: {source}; check the path and its permissions")]
    PassphraseFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the passphrase is empty: an encrypted home needs a non-empty passphrase (when writing a stick, --unencrypted-home makes a plain home instead)"
    )]
    EmptyPassphrase,
    #[error("the two passphrases differ; run again and type the same passphrase twice")]
    PassphraseMismatch,
    #[error(
        "cannot ask for a passphrase: {0}; without a terminal use --passphrase-file FILE or --passphrase-stdin"
    )]
    NoTerminal(io::Error),
    #[error("home.img is encrypted: a passphrase is needed to {0}")]
    PassphraseNeeded(&'static str),
    #[error("{path} is neither ext4 nor LUKS2: {detail}")]
    UnknownFormat { path: PathBuf, detail: String },
    #[error(
        "growing the encrypted home needs about {need_mib} MiB of memory: livestick decrypts it only into memory, never onto a disk, and takes at most {percent} % of the memory available now ({available_mib} MiB available{source_note}, so {limit_mib} MiB); close programs to free memory and run again, or grow it on a machine with at least {want_mib} MiB available (see \"Encrypted home\" in README.md)"
    )]
    NotEnoughMemory {
        need_mib: u64,
        available_mib: u64,
        limit_mib: u64,
        want_mib: u64,
        percent: u64,
        source_note: &'static str,
    },
    #[error(
        "cannot tell how much memory is available ({detail}): growing the encrypted home decrypts it into memory only and needs about {need_mib} MiB, so livestick does not start without knowing it fits; check that /proc is mounted"
    )]
    MemoryUnknown { need_mib: u64, detail: String },
    #[error(
        "cannot create the in-memory copy of the encrypted home (memfd_create): {0}; livestick never decrypts a home onto a disk, so it needs a Linux kernel with memfd (3.17 or later) and /proc mounted"
    )]
    Memfd(io::Error),
    #[error(
        "{path} is shorter than the file system in it ({room} of {fs_size} bytes): it was cut short, and what lay past its end is gone; nothing was changed. Growing it would hide the loss from e2fsck: copy it off and run `e2fsck -f` on the copy to see what is left"
    )]
    CutShort {
        path: PathBuf,
        room: u64,
        fs_size: u64,
    },
    #[error(
        "{path}'s LUKS2 data segment has a fixed size (not `dynamic`), so it cannot grow with the file; nothing was changed. Open it with cryptsetup and grow it with `cryptsetup resize` and `resize2fs` instead"
    )]
    FixedSegment { path: PathBuf },
    #[error(
        "{path} holds a damaged file system that `e2fsck -p` does not repair on its own ({detail}); nothing was changed. Copy it off, run `e2fsck -f` on the copy and put the repaired copy back, then resize it"
    )]
    Damaged { path: PathBuf, detail: String },
    #[error(transparent)]
    Luks(#[from] LuksError),
    #[error(transparent)]
    Ext4(#[from] Ext4Error),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl crate::error::Classify for HomeError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            // What the user asked for or gave: sizes, passphrases, the file itself.
            HomeError::NotWholeMib { .. }
            | HomeError::TooSmall { .. }
            | HomeError::TooLarge { .. }
            | HomeError::Shrink { .. }
            | HomeError::EmptyPassphrase
            | HomeError::PassphraseMismatch
            | HomeError::NoTerminal(_)
            | HomeError::PassphraseNeeded(_)
            | HomeError::UnknownFormat { .. }
            | HomeError::CutShort { .. }
            | HomeError::FixedSegment { .. }
            | HomeError::Damaged { .. } => ErrorKind::BadInput,
            HomeError::PassphraseFile { source, .. } | HomeError::Io { source, .. } => {
                crate::error::open_failure_kind(source)
            }
            // `transparent`: the wrapped error decides.
            HomeError::Luks(e) => e.kind(),
            HomeError::Ext4(e) => e.kind(),
            _ => ErrorKind::Io,
        }
    }

    fn hint(&self) -> &'static str {
        use crate::error::ErrorKind;
        match (self, self.kind()) {
            // Sizes and passphrases, given to `write` and to `home resize` alike.
            (
                HomeError::NotWholeMib { .. }
                | HomeError::TooSmall { .. }
                | HomeError::TooLarge { .. }
                | HomeError::EmptyPassphrase
                | HomeError::PassphraseMismatch
                | HomeError::NoTerminal(_)
                | HomeError::PassphraseFile { .. },
                ErrorKind::BadInput,
            ) => "nothing was changed; fix the option or file named above and run again",
            (_, ErrorKind::BadInput) => BAD_HOME_HINT,
            (HomeError::Luks(e), _) => crate::error::Classify::hint(e),
            (_, kind) => kind.hint(),
        }
    }
}

/// What to do about a home.img refused as it is.
pub const BAD_HOME_HINT: &str =
    "nothing was changed; `livestick home info TARGET` shows what livestick sees in the home";

impl From<IoAt> for HomeError {
    fn from(IoAt { path, source }: IoAt) -> Self {
        HomeError::Io { path, source }
    }
}

/// How home.img is protected.
pub enum HomeEncryption {
    /// Plain ext4 (`--unencrypted-home`).
    None,
    /// ext4 inside LUKS2 (the default, as in livecd-iso-to-disk).
    Luks {
        passphrase: Zeroizing<Vec<u8>>,
        params: LuksParams,
    },
}

/// Check a home size given in MiB and return it in bytes.
pub fn home_size_from_mib(mib: u64, encrypted: bool) -> Result<u64, HomeError> {
    let (min, kind) = if encrypted {
        (MIN_LUKS_HOME_MIB, "encrypted")
    } else {
        (MIN_PLAIN_HOME_MIB, "unencrypted")
    };
    if mib < min {
        return Err(HomeError::TooSmall { mib, min, kind });
    }
    if mib > FAT_MAX_FILE_MIB {
        return Err(HomeError::TooLarge { mib });
    }
    Ok(mib * MIB)
}

/// `--home-size-mb` in bytes for `write`: checked as [`home_size_from_mib`],
/// except that a home over FAT's file limit is not refused here, since the plan
/// then puts the live system on ext4, where a file may be larger.
pub fn home_size_for_write(mib: u64, encrypted: bool) -> Result<u64, HomeError> {
    match home_size_from_mib(mib, encrypted) {
        Err(HomeError::TooLarge { mib }) => mib.checked_mul(MIB).ok_or(HomeError::TooLarge { mib }),
        other => other,
    }
}

fn check_size_bytes(size: u64, encrypted: bool) -> Result<u64, HomeError> {
    if !size.is_multiple_of(MIB) {
        return Err(HomeError::NotWholeMib { size });
    }
    home_size_from_mib(size / MIB, encrypted)
}

/// ext4 as home.img wants it: 4 KiB blocks (required under a 4096-byte LUKS
/// sector, and right for the sizes involved), no blocks reserved for root,
/// which on a /home only waste 5 % of a small stick, and no resize inode. That
/// inode keeps group-descriptor blocks in reserve for growing a mounted file
/// system up to 1024 times its size: 2 MiB of metadata in a 4 GiB home that
/// every write would carry to the stick. home.img is grown only unmounted, by
/// resize2fs (`home resize`), which makes room for more descriptors itself; and
/// one 4 KiB descriptor block already covers 8 GiB, more than FAT's largest file.
fn home_ext4_options() -> Ext4Options {
    Ext4Options {
        block_size: Some(4096),
        reserved_percent: Some(0),
        features: vec!["^resize_inode".into()],
        ..Ext4Options::default()
    }
}

enum Content {
    Plain(File),
    Luks(Box<LuksEncryptingReader<File>>),
}

/// A finished home.img, readable and seekable, exactly [`HomeImage::len`] bytes.
/// Its temporary files are already unlinked and vanish when it is dropped.
pub struct HomeImage {
    content: Content,
    size: u64,
    /// Where the container carries data (see [`HomeImage::data_regions`]).
    regions: Vec<std::ops::Range<u64>>,
}

impl HomeImage {
    pub fn len(&self) -> u64 {
        self.size
    }

    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    pub fn is_encrypted(&self) -> bool {
        matches!(self.content, Content::Luks(_))
    }

    /// The byte ranges of the image that carry data: what mke2fs wrote (and, for LUKS,
    /// the header area and those blocks encrypted). The rest need not be written: the
    /// file system never reads it before writing it.
    pub fn data_regions(&self) -> Vec<std::ops::Range<u64>> {
        self.regions.clone()
    }

    /// The LUKS container UUID, for an encrypted home.
    pub fn luks_uuid(&self) -> Option<uuid::Uuid> {
        match &self.content {
            Content::Luks(r) => Some(r.uuid()),
            Content::Plain(_) => None,
        }
    }
}

impl Read for HomeImage {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.content {
            Content::Plain(f) => f.read(buf),
            Content::Luks(r) => r.read(buf),
        }
    }
}

impl Seek for HomeImage {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        match &mut self.content {
            Content::Plain(f) => f.seek(pos),
            Content::Luks(r) => r.seek(pos),
        }
    }
}

/// What [`build_home_image`] refuses as bad input (the size, an empty passphrase),
/// checked on its own: a write asks this before it touches the stick and builds the
/// image while it writes.
pub fn check_build_input(size: u64, encryption: &HomeEncryption) -> Result<(), HomeError> {
    let encrypted = matches!(encryption, HomeEncryption::Luks { .. });
    match check_size_bytes(size, encrypted) {
        // FAT's file limit is the write plan's to apply: on the ext4 live layout
        // home.img may be larger.
        Ok(_) | Err(HomeError::TooLarge { .. }) => {}
        Err(e) => return Err(e),
    }
    if let HomeEncryption::Luks { passphrase, .. } = encryption
        && passphrase.is_empty()
    {
        return Err(HomeError::EmptyPassphrase);
    }
    Ok(())
}

/// Build home.img of exactly `size` bytes (whole MiB, at most 4095 MiB):
/// ext4 labelled `HOME`, inside LUKS2 when asked. Temporary files go to
/// `workdir`; the plaintext one is sparse (only ext4 metadata is written).
pub fn build_home_image(
    workdir: &Path,
    size: u64,
    encryption: HomeEncryption,
) -> Result<HomeImage, HomeError> {
    check_build_input(size, &encryption)?;
    let encrypted = matches!(encryption, HomeEncryption::Luks { .. });
    let fs_size = if encrypted {
        size - luks::DATA_OFFSET
    } else {
        size
    };
    let tmp = tempfile::NamedTempFile::new_in(workdir).map_err(io_at(workdir))?;
    ext4::make_ext4_image(tmp.path(), fs_size, HOME_LABEL, &home_ext4_options())?;
    // Unlink the name now; the open handle keeps the data until we drop it.
    let mut file = tmp.into_file();
    let plain_regions = crate::disk::sparse::data_regions(&file).map_err(io_at(workdir))?;
    file.seek(SeekFrom::Start(0)).map_err(io_at(workdir))?;
    let content = match encryption {
        HomeEncryption::None => Content::Plain(file),
        HomeEncryption::Luks { passphrase, params } => Content::Luks(Box::new(
            LuksEncryptingReader::new(file, fs_size, &passphrase, &params)?,
        )),
    };
    let regions = match &content {
        Content::Plain(_) => plain_regions,
        // The headers and the key material, then the ext4 metadata encrypted in whole
        // sectors (4 KiB covers both sector sizes LUKS2 allows). Everything else of
        // the data area keeps stale bytes, as after `cryptsetup luksFormat` and
        // `mkfs.ext4` on the opened device.
        Content::Luks(reader) => {
            let mut r = reader.metadata_regions();
            r.extend(plain_regions.iter().map(|p| {
                luks::DATA_OFFSET + p.start / 4096 * 4096
                    ..luks::DATA_OFFSET + p.end.div_ceil(4096) * 4096
            }));
            r
        }
    };
    Ok(HomeImage {
        content,
        size,
        regions,
    })
}

// ---------------------------------------------------------------------------
// Passphrases
// ---------------------------------------------------------------------------

/// Where the passphrase of an encrypted home comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PassphraseSource {
    /// `--passphrase-file FILE`: its bytes exactly, minus one final newline.
    File(PathBuf),
    /// `--passphrase-stdin`: all of standard input, minus one final newline.
    Stdin,
    /// Ask on the terminal without echo, twice (for a new container).
    Terminal,
    /// Ask on the terminal once (to unlock an existing container).
    TerminalOnce,
}

/// Read a passphrase; an empty one is refused.
pub fn read_passphrase(source: PassphraseSource) -> Result<Zeroizing<Vec<u8>>, HomeError> {
    let pass = match source {
        PassphraseSource::File(path) => {
            let bytes = Zeroizing::new(std::fs::read(&path).map_err(|source| {
                HomeError::PassphraseFile {
                    path: path.clone(),
                    source,
                }
            })?);
            strip_one_newline(bytes)
        }
        PassphraseSource::Stdin => read_passphrase_from(&mut io::stdin().lock())?,
        PassphraseSource::Terminal => {
            let first = ask("Passphrase for the encrypted home: ")?;
            let second = ask("Type it again: ")?;
            if first != second {
                return Err(HomeError::PassphraseMismatch);
            }
            first
        }
        PassphraseSource::TerminalOnce => ask("Passphrase for the encrypted home: ")?,
    };
    if pass.is_empty() {
        return Err(HomeError::EmptyPassphrase);
    }
    Ok(pass)
}

/// Read a whole passphrase from `r` (standard input in the CLI), dropping one
/// final newline so `echo secret |` and a file ending in a newline both work.
pub fn read_passphrase_from<R: Read>(r: &mut R) -> Result<Zeroizing<Vec<u8>>, HomeError> {
    let mut bytes = Zeroizing::new(Vec::new());
    r.read_to_end(&mut bytes)
        .map_err(io_at(Path::new("<stdin>")))?;
    let pass = strip_one_newline(bytes);
    if pass.is_empty() {
        return Err(HomeError::EmptyPassphrase);
    }
    Ok(pass)
}

fn strip_one_newline(mut bytes: Zeroizing<Vec<u8>>) -> Zeroizing<Vec<u8>> {
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
    }
    bytes
}

/// One prompt on the controlling terminal with echo off.
fn ask(prompt: &str) -> Result<Zeroizing<Vec<u8>>, HomeError> {
    let answer = Zeroizing::new(rpassword::prompt_password(prompt).map_err(HomeError::NoTerminal)?);
    Ok(Zeroizing::new(answer.as_bytes().to_vec()))
}

// ---------------------------------------------------------------------------
// Inspecting and resizing an existing home.img
// ---------------------------------------------------------------------------

/// What a home.img holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HomeKind {
    Plain,
    Luks2,
}

/// What `livestick home info` reports.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HomeInfo {
    /// Size of the home.img file.
    pub file_size: u64,
    pub encrypted: bool,
    /// LUKS2 details, when encrypted and unlocked.
    pub luks: Option<LuksInfo>,
    /// The filesystem inside; `None` for a locked LUKS home (no passphrase given).
    pub fs: Option<Ext4Info>,
}

/// Tell plain ext4 from LUKS by their signatures.
pub fn detect_home_kind<R: Read + Seek>(r: &mut R) -> io::Result<Option<HomeKind>> {
    let mut head = [0u8; 6];
    r.seek(SeekFrom::Start(0))?;
    if read_exact_or_eof(r, &mut head)? && &head == b"LUKS\xba\xbe" {
        return Ok(Some(HomeKind::Luks2));
    }
    let mut magic = [0u8; 2];
    r.seek(SeekFrom::Start(ext4::MAGIC_OFFSET))?;
    if read_exact_or_eof(r, &mut magic)? && ext4::is_magic(&magic) {
        return Ok(Some(HomeKind::Plain));
    }
    // A damaged primary LUKS2 header: the container opens from its secondary.
    if luks::luks2_header_offset(r)?.is_some() {
        return Ok(Some(HomeKind::Luks2));
    }
    Ok(None)
}

/// `read_exact`, but a file too short for the signature is `false`, not an error.
fn read_exact_or_eof<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    match r.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// Describe a home.img seen through any reader (e.g. a file inside the
/// stick's FAT). The filesystem figures come from the ext4 superblock.
pub fn home_info_from<R: Read + Seek>(
    mut r: R,
    passphrase: Option<&[u8]>,
) -> Result<HomeInfo, HomeError> {
    let path = Path::new("home.img");
    let file_size = r.seek(SeekFrom::End(0)).map_err(io_at(path))?;
    match detect_home_kind(&mut r).map_err(io_at(path))? {
        Some(HomeKind::Plain) => Ok(HomeInfo {
            file_size,
            encrypted: false,
            luks: None,
            fs: Some(Ext4Info::read_from(&mut r)?),
        }),
        Some(HomeKind::Luks2) => {
            let Some(pass) = passphrase else {
                return Ok(HomeInfo {
                    file_size,
                    encrypted: true,
                    luks: None,
                    fs: None,
                });
            };
            let mut vol = luks::open_luks2(r, pass)?;
            let fs = Ext4Info::read_from(&mut vol)?;
            Ok(HomeInfo {
                file_size,
                encrypted: true,
                luks: Some(vol.info().clone()),
                fs: Some(fs),
            })
        }
        None => Err(HomeError::UnknownFormat {
            path: path.to_path_buf(),
            detail: "no LUKS header and no ext4 superblock".into(),
        }),
    }
}

/// Describe the home.img file at `path`; plain ext4 is read with `dumpe2fs`.
pub fn home_info(path: &Path, passphrase: Option<&[u8]>) -> Result<HomeInfo, HomeError> {
    let mut f = File::open(path).map_err(io_at(path))?;
    match detect_home_kind(&mut f).map_err(io_at(path))? {
        Some(HomeKind::Plain) => Ok(HomeInfo {
            file_size: f.metadata().map_err(io_at(path))?.len(),
            encrypted: false,
            luks: None,
            fs: Some(ext4::ext4_info(path)?),
        }),
        Some(HomeKind::Luks2) => home_info_from(f, passphrase),
        None => Err(HomeError::UnknownFormat {
            path: path.to_path_buf(),
            detail: "no LUKS header and no ext4 superblock".into(),
        }),
    }
}

/// The largest share of MemAvailable the decrypted copy of an encrypted home may
/// take during a resize, in percent. The rest is left to the system and to
/// e2fsck/resize2fs, whose own memory grows with the file system.
pub const STAGING_MEM_PERCENT: u64 = 50;

/// For tests only: a figure in MiB that replaces MemAvailable (from /proc/meminfo)
/// in the memory check of an encrypted resize, so a test can show the refusal with
/// a small home. Not meant for users: a wrong figure lets the page cache and swap
/// take what the check is there to protect.
pub const TEST_MEM_AVAILABLE_ENV: &str = "LIVESTICK_TEST_MEM_AVAILABLE_MIB";

/// Memory the decrypted copy takes while an encrypted home grows from `old_plain`
/// to `new_plain` bytes of file system. All of the old file system: its free blocks
/// decrypt to noise (the stick's stale bytes were never written through the
/// cipher), so they are not zeros the in-memory file could keep as holes. Plus
/// what resize2fs writes into the new space (bitmaps and inode tables of the new
/// groups, at most 1/64 of it with 4 KiB blocks; 1/32 leaves a margin). The rest of
/// the new space stays a hole in memory.
pub fn luks_staging_bytes(old_plain: u64, new_plain: u64) -> u64 {
    old_plain + new_plain.saturating_sub(old_plain) / 32
}

/// MemAvailable in bytes and where the figure came from (for the message).
fn mem_available() -> Result<(u64, &'static str), String> {
    if let Some(v) = std::env::var_os(TEST_MEM_AVAILABLE_ENV) {
        let mib = v
            .to_str()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                format!("{TEST_MEM_AVAILABLE_ENV}={v:?} is not a whole number of MiB")
            })?;
        return Ok((mib * MIB, " as set by LIVESTICK_TEST_MEM_AVAILABLE_MIB"));
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| format!("cannot read /proc/meminfo: {e}"))?;
    let kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .ok_or_else(|| "/proc/meminfo has no MemAvailable line".to_string())?;
    Ok((kib * 1024, " per MemAvailable in /proc/meminfo"))
}

/// Refuses, with the figures, when `need` bytes of decrypted copy would take more
/// than [`STAGING_MEM_PERCENT`] % of the memory available now.
pub fn check_staging_memory(need: u64) -> Result<(), HomeError> {
    let need_mib = need.div_ceil(MIB);
    let (available, source_note) =
        mem_available().map_err(|detail| HomeError::MemoryUnknown { need_mib, detail })?;
    staging_fits(need, available, source_note)
}

fn staging_fits(need: u64, available: u64, source_note: &'static str) -> Result<(), HomeError> {
    let need_mib = need.div_ceil(MIB);
    let limit = available.saturating_mul(STAGING_MEM_PERCENT) / 100;
    if need > limit {
        return Err(HomeError::NotEnoughMemory {
            need_mib,
            available_mib: available / MIB,
            limit_mib: limit / MIB,
            want_mib: need
                .saturating_mul(100)
                .div_ceil(STAGING_MEM_PERCENT)
                .div_ceil(MIB),
            percent: STAGING_MEM_PERCENT,
            source_note,
        });
    }
    Ok(())
}

/// Grow the home.img file at `path` (a regular file, not inside FAT) to
/// `new_size` bytes, in place, and the ext4 filesystem with it.
///
/// Plain: `e2fsck -f -p` (repairing what it safely can: `home resize` of the
/// user's own file checks read-only first, see [`OnDamage`]) then `resize2fs` on
/// the file. LUKS: the plaintext is
/// decrypted into memory only, an anonymous memfd that no file system names and
/// that vanishes with the process however it ends (a SIGKILL included), after a
/// check that it fits ([`check_staging_memory`]). e2fsck and resize2fs work on it
/// through `/proc/self/fd/N`. Then the container is extended and only the blocks
/// that changed, plus the new space, are encrypted back. The first MiB (superblock,
/// group descriptors, bitmaps) goes last, after a sync, and the block holding the
/// primary superblock after a sync of the rest of it, so an interruption leaves the
/// old superblock describing the old size. The memfd is not locked in memory
/// (`mlock` of GiBs exceeds the usual `RLIMIT_MEMLOCK`), so under memory pressure
/// its pages can reach swap; README.md says so.
pub fn home_resize(
    path: &Path,
    new_size: u64,
    passphrase: Option<&[u8]>,
) -> Result<HomeInfo, HomeError> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_at(path))?;
    drop(home_resize_opened(
        f,
        path,
        new_size,
        passphrase,
        OnDamage::Repair,
    )?);
    home_info(path, passphrase)
}

/// [`home_resize`] of the home in `f`, opened read-write (`path` names it in
/// messages): every step goes through this handle, e2fsck and resize2fs through
/// `/proc/self/fd/N`, never through the path again, so a file renamed over the path
/// meanwhile is never touched. Gives the handle back for the report.
pub fn home_resize_opened(
    mut f: File,
    path: &Path,
    new_size: u64,
    passphrase: Option<&[u8]>,
    damage: OnDamage,
) -> Result<File, HomeError> {
    let current = f.metadata().map_err(io_at(path))?.len();
    let kind = detect_home_kind(&mut f).map_err(io_at(path))?;
    let encrypted = kind == Some(HomeKind::Luks2);
    match check_size_bytes(new_size, encrypted) {
        // FAT's file limit is the caller's to apply (`home_stick::check_new_size`):
        // home.img on the ext4 live partition may be larger.
        Ok(_) | Err(HomeError::TooLarge { .. }) => {}
        Err(e) => return Err(e),
    }
    if new_size < current {
        return Err(HomeError::Shrink {
            current_mib: current / MIB,
            requested_mib: new_size / MIB,
        });
    }
    match kind {
        Some(HomeKind::Plain) => {
            let fs = Ext4Info::read_from(&mut f)?;
            refuse_cut_short(path, current, fs.size_bytes)?;
            let by_fd = crate::disk::target::inheritable_path(&f).map_err(io_at(path))?;
            if damage == OnDamage::LeaveUnchanged {
                ext4::check_ext4_image_read_only(&by_fd).map_err(|e| damaged(e, path))?;
            }
            ext4::grow_ext4_image(&by_fd, new_size).map_err(|e| damaged(e, path))?;
            Ok(f)
        }
        Some(HomeKind::Luks2) => {
            let pass = passphrase.ok_or(HomeError::PassphraseNeeded("resize it"))?;
            grow_luks_home(f, path, new_size, pass)
        }
        None => Err(HomeError::UnknownFormat {
            path: path.to_path_buf(),
            detail: "no LUKS header and no ext4 superblock".into(),
        }),
    }
}

/// What a resize may do to a plain home's file system before it grows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnDamage {
    /// The user's own file: checked read-only first, so that a file system e2fsck
    /// would have to repair is refused with not a byte changed.
    LeaveUnchanged,
    /// A working copy: `e2fsck -p` repairs what it safely can (a journal to replay
    /// after a stick was pulled) before the grow.
    Repair,
}

/// A home whose file system reaches past the room it has (`room` bytes: the file,
/// or a LUKS container's data area) lost its end; growing it would make the lost
/// part look like new, empty space.
fn refuse_cut_short(path: &Path, room: u64, fs_size: u64) -> Result<(), HomeError> {
    if fs_size > room {
        return Err(HomeError::CutShort {
            path: path.to_path_buf(),
            room,
            fs_size,
        });
    }
    Ok(())
}

/// e2fsck's refusal before a resize, as what it is: a damaged home, named by the
/// user's path (e2fsck saw `/proc/self/fd/N` or the in-memory copy).
fn damaged(e: Ext4Error, path: &Path) -> HomeError {
    match e {
        // e2fsck's 4: errors left uncorrected. Any other failure is the program's
        // (8 operational, 16 usage, 128 a missing library) and stays I/O.
        Ext4Error::Failed {
            tool,
            stderr,
            status,
            ..
        } if tool == crate::tools::E2FSCK.name && status == "exit status: 4" => {
            let lines: Vec<&str> = stderr
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            HomeError::Damaged {
                path: path.to_path_buf(),
                detail: lines[lines.len().saturating_sub(3)..].join(" / "),
            }
        }
        e => HomeError::Ext4(e),
    }
}

/// An anonymous in-memory file for the decrypted file system, and the path by which
/// this process and its children (e2fsck, resize2fs) open it.
pub fn memory_stage() -> Result<(File, PathBuf), HomeError> {
    use nix::sys::memfd::{MemFdCreateFlag, memfd_create};
    use std::os::fd::AsRawFd;
    // Without MFD_CLOEXEC on purpose: e2fsprogs run as children and open
    // `/proc/self/fd/N`, which in the child names the descriptor it inherited.
    let fd = memfd_create(c"livestick-home", MemFdCreateFlag::empty())
        .map_err(|e| HomeError::Memfd(io::Error::from(e)))?;
    let path = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    Ok((File::from(fd), path))
}

/// The ext4 block that holds the primary superblock (home.img's ext4 has 4 KiB blocks).
const SUPERBLOCK_BLOCK: usize = 4096;

fn grow_luks_home(f: File, path: &Path, new_size: u64, pass: &[u8]) -> Result<File, HomeError> {
    const CHUNK: usize = 1024 * 1024;
    // Unlock first: a wrong passphrase must fail before anything changes.
    let mut vol = luks::open_luks2(f, pass)?;
    let data_offset = vol.info().data_offset;
    let old_plain = vol.len();
    let new_plain = new_size - data_offset;
    refuse_cut_short(path, old_plain, Ext4Info::read_from(&mut vol)?.size_bytes)?;
    if !vol.grows_with_the_file() {
        return Err(HomeError::FixedSegment {
            path: path.to_path_buf(),
        });
    }
    // Then the memory check, also before anything changes or is decrypted.
    check_staging_memory(luks_staging_bytes(old_plain, new_plain))?;

    let (mut t, tpath) = memory_stage()?;
    {
        let mut buf = Zeroizing::new(vec![0u8; CHUNK]);
        vol.seek(SeekFrom::Start(0)).map_err(io_at(path))?;
        let mut off = 0u64;
        while off < old_plain {
            let n = (old_plain - off).min(CHUNK as u64) as usize;
            vol.read_exact(&mut buf[..n]).map_err(io_at(path))?;
            // Zeros stay holes: they cost no memory.
            if buf[..n].iter().any(|&b| b != 0) {
                t.seek(SeekFrom::Start(off)).map_err(io_at(&tpath))?;
                t.write_all(&buf[..n]).map_err(io_at(&tpath))?;
            }
            off += n as u64;
        }
        t.set_len(old_plain).map_err(io_at(&tpath))?;
    }
    ext4::grow_ext4_image(&tpath, new_plain).map_err(|e| damaged(e, path))?;

    // Extend the container, then write back what differs (the key stays: no
    // second unlock and its KDF).
    vol.get_ref().set_len(new_size).map_err(io_at(path))?;
    vol.refresh_len().map_err(io_at(path))?;
    t.seek(SeekFrom::Start(0)).map_err(io_at(&tpath))?;
    let mut new = Zeroizing::new(vec![0u8; CHUNK]);
    let mut old = Zeroizing::new(vec![0u8; CHUNK]);
    let mut first: Option<usize> = None;
    let mut off = 0u64;
    while off < new_plain {
        let n = (new_plain - off).min(CHUNK as u64) as usize;
        t.read_exact(&mut new[..n]).map_err(io_at(&tpath))?;
        let changed = if off < old_plain {
            vol.seek(SeekFrom::Start(off)).map_err(io_at(path))?;
            vol.read_exact(&mut old[..n]).map_err(io_at(path))?;
            old[..n] != new[..n]
        } else {
            true
        };
        if off == 0 {
            first = changed.then_some(n);
        } else if changed {
            vol.seek(SeekFrom::Start(off)).map_err(io_at(path))?;
            vol.write_all(&new[..n]).map_err(io_at(path))?;
        }
        off += n as u64;
    }
    vol.flush().map_err(io_at(path))?;
    vol.get_ref().sync_all().map_err(io_at(path))?;
    if let Some(n) = first {
        t.seek(SeekFrom::Start(0)).map_err(io_at(&tpath))?;
        t.read_exact(&mut new[..n]).map_err(io_at(&tpath))?;
        // The group descriptors and bitmaps of the first MiB, synced, then the
        // block with the superblock alone: until it lands the file system is the
        // old one, whichever of the rest has landed.
        let superblock_block = SUPERBLOCK_BLOCK.min(n);
        for part in [superblock_block..n, 0..superblock_block] {
            if part.is_empty() {
                continue;
            }
            vol.seek(SeekFrom::Start(part.start as u64))
                .map_err(io_at(path))?;
            vol.write_all(&new[part]).map_err(io_at(path))?;
            vol.flush().map_err(io_at(path))?;
            vol.get_ref().sync_all().map_err(io_at(path))?;
        }
    }
    let file = vol.into_inner();
    file.sync_all().map_err(io_at(path))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_home_too_large_for_fat_is_left_to_the_plan() {
        assert_eq!(home_size_for_write(64, true).unwrap(), 64 * MIB);
        assert_eq!(home_size_for_write(8192, false).unwrap(), 8192 * MIB);
        assert!(matches!(
            home_size_for_write(8, true),
            Err(HomeError::TooSmall { .. })
        ));
        // Past what a byte count can hold: still refused, never wrapped.
        assert!(matches!(
            home_size_for_write(u64::MAX / 2, false),
            Err(HomeError::TooLarge { .. })
        ));
    }

    #[test]
    fn sizes_in_mib_with_limits() {
        assert_eq!(home_size_from_mib(64, true).unwrap(), 64 * MIB);
        assert_eq!(home_size_from_mib(4095, false).unwrap(), 4095 * MIB);
        let e = home_size_from_mib(4096, true).unwrap_err();
        assert!(e.to_string().contains("4096 MiB"), "{e}");
        assert!(e.to_string().contains("4095"), "{e}");
        let e = home_size_from_mib(20, true).unwrap_err();
        assert!(e.to_string().contains("at least 32 MiB"), "{e}");
        assert!(home_size_from_mib(20, false).is_ok());
        assert!(matches!(
            check_size_bytes(64 * MIB + 1, false),
            Err(HomeError::NotWholeMib { .. })
        ));
    }

    #[test]
    fn staging_memory_limit_with_figures() {
        // 16 MiB of file system grown to 1 GiB: 16 MiB + 1008/32 MiB.
        assert_eq!(
            luks_staging_bytes(16 * MIB, 1024 * MIB),
            16 * MIB + 1008 * MIB / 32
        );
        assert!(staging_fits(100 * MIB, 200 * MIB, "").is_ok());
        let e = staging_fits(100 * MIB + 1, 200 * MIB, " per MemAvailable").unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, HomeError::NotEnoughMemory { .. }), "{m}");
        assert!(
            m.contains("101 MiB") && m.contains("200 MiB available"),
            "{m}"
        );
        assert!(
            m.contains("so 100 MiB") && m.contains("at least 201 MiB"),
            "{m}"
        );
        assert!(m.contains("never onto a disk"), "{m}");
    }

    #[test]
    fn passphrase_one_final_newline_stripped() {
        let p = read_passphrase_from(&mut &b"secret\n"[..]).unwrap();
        assert_eq!(&p[..], b"secret");
        let p = read_passphrase_from(&mut &b"secret\n\n"[..]).unwrap();
        assert_eq!(&p[..], b"secret\n");
        let p = read_passphrase_from(&mut &b" sp ace\r\n"[..]).unwrap();
        assert_eq!(&p[..], b" sp ace\r");
        assert!(matches!(
            read_passphrase_from(&mut &b"\n"[..]),
            Err(HomeError::EmptyPassphrase)
        ));
        assert!(matches!(
            read_passphrase_from(&mut &b""[..]),
            Err(HomeError::EmptyPassphrase)
        ));
    }

    #[test]
    fn passphrase_file_missing_or_empty() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let e = read_passphrase(PassphraseSource::File(missing.clone())).unwrap_err();
        assert!(matches!(e, HomeError::PassphraseFile { .. }));
        assert!(e.to_string().contains(missing.to_str().unwrap()));
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"\n").unwrap();
        assert!(matches!(
            read_passphrase(PassphraseSource::File(empty)),
            Err(HomeError::EmptyPassphrase)
        ));
        let good = dir.path().join("good");
        std::fs::write(&good, b"pass word\n").unwrap();
        assert_eq!(
            &read_passphrase(PassphraseSource::File(good)).unwrap()[..],
            b"pass word"
        );
    }
}
