//! Compressed source images (`.iso.xz`, `.iso.zst`, `.iso.gz`, `.iso.bz2`),
//! recognised by their magic bytes, never by their names.
//!
//! Planning needs random access to the ISO (the squashfs is listed in place by
//! `unsquashfs -l`, the initrd is read, the implanted MD5 is checked), which a
//! compressed stream cannot give. So the stream is unpacked once, before any
//! target is touched, into an unnamed temporary file (`O_TMPFILE`, or created
//! and unlinked at once): no name is ever left behind, not even when livestick
//! is interrupted or killed, because the kernel frees the file with its last
//! descriptor. The rest of livestick reads it as `/proc/self/fd/N`, a path that
//! children such as `unsquashfs` open too, since the descriptor is inherited
//! (as `persist::home` does for its memfd). Runs of zeros become holes.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::error::{Classify, ErrorKind, open_failure_hint, open_failure_kind};
use crate::progress::{Progress, ProgressMode};
use crate::size::human;

/// A compression format livestick unpacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Xz,
    Zstd,
    Gzip,
    Bzip2,
}

impl Format {
    /// The format whose magic `head` starts with. An ISO starts with its
    /// system area (zeros, or an isohybrid MBR's boot code), which none of
    /// these magics can be mistaken for.
    pub fn detect(head: &[u8]) -> Option<Format> {
        if head.starts_with(&[0xFD, b'7', b'z', b'X', b'Z', 0x00]) {
            Some(Format::Xz)
        } else if head.starts_with(&[0x28, 0xB5, 0x2F, 0xFD]) {
            Some(Format::Zstd)
        } else if head.starts_with(&[0x1F, 0x8B]) {
            Some(Format::Gzip)
        } else if head.len() >= 4 && head.starts_with(b"BZh") && (b'1'..=b'9').contains(&head[3]) {
            Some(Format::Bzip2)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Xz => "xz",
            Format::Zstd => "zstd",
            Format::Gzip => "gzip",
            Format::Bzip2 => "bzip2",
        }
    }
}

/// What a compressed file says about its decompressed size, read from its
/// metadata without decompressing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatedSize {
    /// The xz index or every zstd frame header gives the size exactly.
    Exact(u64),
    /// gzip keeps only the size modulo 4 GiB (ISIZE), of the last member only:
    /// the real size is at least this, and larger by an unknown multiple of
    /// 4 GiB for an ISO of 4 GiB or more.
    AtLeast(u64),
    /// bzip2 does not record it; neither does a zstd frame made from a pipe.
    Unknown,
}

impl StatedSize {
    fn minimum(self) -> u64 {
        match self {
            StatedSize::Exact(n) | StatedSize::AtLeast(n) => n,
            StatedSize::Unknown => 0,
        }
    }
}

/// The decompressed size a `format` stream in `file` states; `Unknown` also
/// when its metadata does not parse (the decompressor then says why).
pub fn stated_size(format: Format, file: &mut File) -> StatedSize {
    let size = match format {
        Format::Xz => xz_size(file).map(StatedSize::Exact),
        Format::Zstd => zstd_size(file).map(StatedSize::Exact),
        Format::Gzip => gzip_isize(file).map(StatedSize::AtLeast),
        Format::Bzip2 => None,
    };
    size.unwrap_or(StatedSize::Unknown)
}

#[derive(Debug, Error)]
pub enum DecompressError {
    #[error("decompressing {}: reading it failed", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "decompressing {}: the {format} stream ends early, after {} of output: the file is incomplete — download it again",
        .path.display(), human(*.written)
    )]
    Truncated {
        path: PathBuf,
        format: &'static str,
        written: u64,
    },
    #[error(
        "decompressing {}: the {format} data is corrupt after {} of output — download it again",
        .path.display(), human(*.written)
    )]
    Corrupt {
        path: PathBuf,
        format: &'static str,
        written: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "decompressing {}: the {format} stream does not hold an ISO 9660 image (no CD001 signature at byte 32769 of its content); livestick writes live ISOs",
        .path.display()
    )]
    NotIso { path: PathBuf, format: &'static str },
    #[error(
        "decompressing {}: it unpacks to {}{} but {} has only {} free; free space there or set TMPDIR to a directory with more",
        .path.display(),
        if *.exact { "" } else { "at least " },
        human(*.needed),
        .dir.display(),
        human(*.available)
    )]
    NoSpace {
        path: PathBuf,
        dir: PathBuf,
        needed: u64,
        exact: bool,
        available: u64,
    },
    #[error(
        "decompressing {}: writing the temporary copy in {} failed{}",
        .path.display(),
        .dir.display(),
        if .source.kind() == io::ErrorKind::StorageFull {
            "; free space there or set TMPDIR to a directory with more"
        } else {
            ""
        }
    )]
    Temporary {
        path: PathBuf,
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl Classify for DecompressError {
    fn kind(&self) -> ErrorKind {
        match self {
            DecompressError::Read { source, .. } => open_failure_kind(source),
            DecompressError::Truncated { .. }
            | DecompressError::Corrupt { .. }
            | DecompressError::NotIso { .. }
            | DecompressError::NoSpace { .. } => ErrorKind::BadInput,
            // A full temporary directory is the user's to fix, like a too-small stick.
            DecompressError::Temporary { source, .. }
                if source.kind() == io::ErrorKind::StorageFull =>
            {
                ErrorKind::BadInput
            }
            DecompressError::Temporary { .. } => ErrorKind::Io,
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            DecompressError::Read { source, .. } => open_failure_hint(source),
            _ => self.kind().hint(),
        }
    }
}

/// The source a command reads: the path it was given, or the unpacked copy of
/// a compressed image, which lives as long as this value.
pub struct Source {
    path: PathBuf,
    unpacked: Option<Unpacked>,
}

struct Unpacked {
    /// Keeps the unnamed file alive; `path` is `/proc/self/fd/N` of it.
    _file: File,
    original: PathBuf,
    format: Format,
    dir: PathBuf,
    size: u64,
    stated: StatedSize,
    /// The sha256 of the compressed file, taken from the bytes the decompressor
    /// read when the caller asked for it (a published CHECKSUM describes the
    /// compressed file, and reading it a second time would double the cost).
    sha256: Option<[u8; 32]>,
}

impl Source {
    /// Where the (plain) ISO is read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The sha256 of the compressed file as it was read while unpacking, when
    /// [`open_hashing`] asked for it; `None` for a plain source.
    pub fn compressed_sha256(&self) -> Option<[u8; 32]> {
        self.unpacked.as_ref()?.sha256
    }

    /// What the plan should say about the unpacking, for a compressed source.
    pub fn note(&self) -> Option<String> {
        let u = self.unpacked.as_ref()?;
        let checked = match u.stated {
            StatedSize::Exact(_) => "space checked first against the size the format states".into(),
            StatedSize::AtLeast(n) => format!(
                "space checked first against at least {}: gzip records the size only modulo 4 GiB, so the rest was checked while writing",
                human(n)
            ),
            StatedSize::Unknown => format!(
                "{} does not state the unpacked size here, so space was checked while writing",
                u.format.name()
            ),
        };
        Some(format!(
            "source {} is {}-compressed: unpacked to {} in an unnamed temporary file in {} (read as {}; {checked}), freed when livestick exits",
            u.original.display(),
            u.format.name(),
            human(u.size),
            u.dir.display(),
            self.path.display()
        ))
    }
}

/// Opens `path` as a source: a plain file (or device) as it is, a compressed
/// one unpacked into the temporary directory (`$TMPDIR`, else /tmp), with a
/// progress bar or events in `mode` (none at all for a plain source).
///
/// A path that cannot be read here is handed on untouched, so that what
/// reads it next reports it exactly as it does for an uncompressed source.
pub fn open(path: &Path, mode: ProgressMode) -> Result<Source, DecompressError> {
    open_in(path, &std::env::temp_dir(), mode)
}

/// [`open`] with the temporary directory given.
pub fn open_in(path: &Path, dir: &Path, mode: ProgressMode) -> Result<Source, DecompressError> {
    open_in_hashing(path, dir, mode, false)
}

/// [`open`], and with `sha256` the compressed file's sha256 taken from the same
/// read that unpacks it ([`Source::compressed_sha256`]): every byte the
/// decompressor takes is hashed on its way in, and what it leaves unread at the
/// end of the stream is read and hashed too, so the digest covers the whole file.
pub fn open_hashing(
    path: &Path,
    mode: ProgressMode,
    sha256: bool,
) -> Result<Source, DecompressError> {
    open_in_hashing(path, &std::env::temp_dir(), mode, sha256)
}

/// [`open_hashing`] with the temporary directory given.
pub fn open_in_hashing(
    path: &Path,
    dir: &Path,
    mode: ProgressMode,
    sha256: bool,
) -> Result<Source, DecompressError> {
    let plain = || Source {
        path: path.to_path_buf(),
        unpacked: None,
    };
    let Ok(mut file) = File::open(path) else {
        return Ok(plain());
    };
    let mut head = [0u8; 6];
    let Ok(got) = read_up_to(&mut file, &mut head) else {
        return Ok(plain());
    };
    let Some(format) = Format::detect(&head[..got]) else {
        return Ok(plain());
    };
    let read_err = |source| DecompressError::Read {
        path: path.to_path_buf(),
        source,
    };
    let stated = stated_size(format, &mut file);
    let available = available_bytes(dir).map_err(|source| DecompressError::Temporary {
        path: path.to_path_buf(),
        dir: dir.to_path_buf(),
        source,
    })?;
    if stated.minimum() > available {
        return Err(DecompressError::NoSpace {
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
            needed: stated.minimum(),
            exact: matches!(stated, StatedSize::Exact(_)),
            available,
        });
    }
    let compressed_len = file.metadata().map_err(read_err)?.len();
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let temp_err = |source| DecompressError::Temporary {
        path: path.to_path_buf(),
        dir: dir.to_path_buf(),
        source,
    };
    let out = tempfile::tempfile_in(dir).map_err(temp_err)?;
    let progress = Progress::for_source(mode, "iso");
    progress.phase("unpack", compressed_len);
    let unpacked = unpack(path, dir, format, file, &out, &progress, sha256);
    // Cleared on failure too, so the error is not printed under a stale bar.
    progress.finish();
    let (size, digest) = unpacked?;
    let (reopened, proc_path) = inheritable_reader(&out).map_err(temp_err)?;
    Ok(Source {
        path: proc_path,
        unpacked: Some(Unpacked {
            _file: reopened,
            original: path.to_path_buf(),
            format,
            dir: dir.to_path_buf(),
            size,
            stated,
            sha256: digest,
        }),
    })
}

/// A read-only descriptor of `file` that children inherit, and its path.
fn inheritable_reader(file: &File) -> io::Result<(File, PathBuf)> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    let reopened = File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    fcntl(reopened.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty())).map_err(io::Error::from)?;
    let path = PathBuf::from(format!("/proc/self/fd/{}", reopened.as_raw_fd()));
    Ok((reopened, path))
}

fn available_bytes(dir: &Path) -> io::Result<u64> {
    let stat = nix::sys::statvfs::statvfs(dir).map_err(io::Error::from)?;
    #[allow(clippy::useless_conversion)] // the field types differ between targets
    Ok(u64::from(stat.blocks_available()).saturating_mul(u64::from(stat.fragment_size())))
}

/// A reader that counts what the decompressor took from the file and remembers
/// whether the file itself failed, so a read error is not called corruption.
pub struct Counting<R> {
    inner: R,
    taken: Arc<AtomicU64>,
    failed: Arc<AtomicBool>,
}

impl<R> Counting<R> {
    /// The reader, the count of bytes taken and the "the file failed" flag.
    pub fn new(inner: R) -> (Self, Arc<AtomicU64>, Arc<AtomicBool>) {
        let taken = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicBool::new(false));
        let counting = Counting {
            inner,
            taken: Arc::clone(&taken),
            failed: Arc::clone(&failed),
        };
        (counting, taken, failed)
    }
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.taken.fetch_add(n as u64, Ordering::Relaxed);
                Ok(n)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.failed.store(true, Ordering::Relaxed);
                }
                Err(e)
            }
        }
    }
}

/// Where the ISO 9660 primary volume descriptor's "CD001" sits.
const CD001_AT: usize = 16 * 2048 + 1;
/// Zero blocks this large (and aligned) become holes.
const HOLE_BLOCK: usize = 4096;

/// A reader that feeds every byte it passes on to a sha256 shared with its owner,
/// who still holds the hash after the decoder (which owns this reader) is done.
struct Sha256Tee<R> {
    inner: R,
    hasher: Arc<Mutex<Sha256>>,
}

impl<R: Read> Read for Sha256Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .update(&buf[..n]);
        Ok(n)
    }
}

/// Decompresses `file` (read from its start) into `out`, checking on the way
/// that it is an ISO; returns the unpacked size and, with `sha256`, the
/// compressed file's sha256 from the same read.
fn unpack(
    path: &Path,
    dir: &Path,
    format: Format,
    file: File,
    out: &File,
    progress: &Progress,
    sha256: bool,
) -> Result<(u64, Option<[u8; 32]>), DecompressError> {
    let read_err = |source| DecompressError::Read {
        path: path.to_path_buf(),
        source,
    };
    // A duplicate descriptor shares the file offset: after the decoder stops, it
    // goes on reading exactly where the decoder's reads ended.
    let rest = if sha256 {
        Some(file.try_clone().map_err(read_err)?)
    } else {
        None
    };
    let hasher = Arc::new(Mutex::new(Sha256::new()));
    let tee = Sha256Tee {
        inner: file,
        hasher: Arc::clone(&hasher),
    };
    let (counting, taken, failed) = Counting::new(tee);
    let reader = BufReader::with_capacity(1 << 20, counting);
    let mut decoder = decoder(format, reader).map_err(|source| DecompressError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut buf = vec![0u8; 4 << 20];
    let mut written = 0u64;
    let mut reported = 0u64;
    let mut signature_checked = false;
    loop {
        let n = match decoder.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) if failed.load(Ordering::Relaxed) => {
                return Err(DecompressError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
            Err(source) if source.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(DecompressError::Truncated {
                    path: path.to_path_buf(),
                    format: format.name(),
                    written,
                });
            }
            Err(source) => {
                return Err(DecompressError::Corrupt {
                    path: path.to_path_buf(),
                    format: format.name(),
                    written,
                    source,
                });
            }
        };
        write_sparse(out, &buf[..n], written).map_err(|source| DecompressError::Temporary {
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
            source,
        })?;
        written += n as u64;
        if !signature_checked && written >= (CD001_AT + 5) as u64 {
            // Checked as soon as the bytes are there, so that a compressed file
            // that is no ISO is refused before all of it is unpacked.
            let mut signature = [0u8; 5];
            out.read_exact_at(&mut signature, CD001_AT as u64)
                .map_err(|source| DecompressError::Temporary {
                    path: path.to_path_buf(),
                    dir: dir.to_path_buf(),
                    source,
                })?;
            if &signature != b"CD001" {
                return Err(DecompressError::NotIso {
                    path: path.to_path_buf(),
                    format: format.name(),
                });
            }
            signature_checked = true;
        }
        let now = taken.load(Ordering::Relaxed);
        progress.inc(now - reported);
        reported = now;
    }
    if !signature_checked {
        return Err(DecompressError::NotIso {
            path: path.to_path_buf(),
            format: format.name(),
        });
    }
    // Trailing zeros were skipped as holes: the length makes them count.
    out.set_len(written)
        .map_err(|source| DecompressError::Temporary {
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
            source,
        })?;
    drop(decoder);
    let Some(mut rest) = rest else {
        return Ok((written, None));
    };
    let mut tee = Sha256Tee {
        inner: &mut rest,
        hasher: Arc::clone(&hasher),
    };
    io::copy(&mut tee, &mut io::sink()).map_err(read_err)?;
    drop(tee);
    let digest = hasher
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone()
        .finalize();
    Ok((written, Some(digest.into())))
}

/// A decoder of `format` over `reader`: every stream (member, frame) of a
/// concatenated file, as the command-line tools unpack it. It is `Send` when
/// the reader is, so a raw image can be streamed from another thread.
pub fn decoder<'r, R: io::BufRead + Send + 'r>(
    format: Format,
    reader: R,
) -> io::Result<Box<dyn Read + Send + 'r>> {
    Ok(match format {
        Format::Xz => Box::new(liblzma::bufread::XzDecoder::new_multi_decoder(reader)),
        Format::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(reader)?),
        Format::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(reader)),
        Format::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(reader)),
    })
}

/// Writes `data` at `offset`, leaving aligned all-zero blocks as holes (the
/// file is new, so a hole reads as zeros).
fn write_sparse(out: &File, data: &[u8], offset: u64) -> io::Result<()> {
    let mut pending: Option<usize> = None;
    let mut at = 0usize;
    while at < data.len() {
        let absolute = offset + at as u64;
        let to_boundary = HOLE_BLOCK - (absolute % HOLE_BLOCK as u64) as usize;
        let end = (at + to_boundary).min(data.len());
        let whole_block = end - at == HOLE_BLOCK;
        let is_hole = whole_block && data[at..end].iter().all(|&b| b == 0);
        match (is_hole, pending) {
            (true, Some(start)) => {
                out.write_all_at(&data[start..at], offset + start as u64)?;
                pending = None;
            }
            (false, None) => pending = Some(at),
            _ => {}
        }
        at = end;
    }
    if let Some(start) = pending {
        out.write_all_at(&data[start..], offset + start as u64)?;
    }
    Ok(())
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn read_at(file: &mut File, offset: u64, len: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset).ok()?;
    Some(buf)
}

/// A little-endian u32 at the start of `bytes`, if they hold four.
fn le_u32(bytes: &[u8]) -> Option<u32> {
    (bytes.len() >= 4).then(|| crate::bytes::u32_at(bytes, 0))
}

/// The sum of the uncompressed sizes in the index of every stream of an xz
/// file, walked from the end (stream footer → index → stream header, over
/// stream padding).
fn xz_size(file: &mut File) -> Option<u64> {
    const HEADER_MAGIC: &[u8] = &[0xFD, b'7', b'z', b'X', b'Z', 0x00];
    let mut end = file.metadata().ok()?.len();
    let mut total = 0u64;
    while end > 0 {
        // Stream padding: groups of four zero bytes between or after streams.
        if end >= 4 && read_at(file, end - 4, 4)? == [0, 0, 0, 0] {
            end -= 4;
            continue;
        }
        let footer = read_at(file, end.checked_sub(12)?, 12)?;
        if &footer[10..12] != b"YZ" {
            return None;
        }
        let index_len = (u64::from(le_u32(&footer[4..8])?) + 1) * 4;
        if index_len > 1 << 30 {
            return None;
        }
        let index_start = end.checked_sub(12 + index_len)?;
        let index = read_at(file, index_start, usize::try_from(index_len).ok()?)?;
        if index.first() != Some(&0) {
            return None;
        }
        let mut at = 1;
        let records = varint(&index, &mut at)?;
        let mut blocks_len = 0u64;
        for _ in 0..records {
            let unpadded = varint(&index, &mut at)?;
            let uncompressed = varint(&index, &mut at)?;
            blocks_len = blocks_len.checked_add(unpadded.checked_add(3)? & !3)?;
            total = total.checked_add(uncompressed)?;
        }
        let start = index_start.checked_sub(blocks_len)?.checked_sub(12)?;
        if read_at(file, start, 6)? != HEADER_MAGIC {
            return None;
        }
        end = start;
    }
    Some(total)
}

/// An xz multibyte integer: seven bits a byte, least significant first.
fn varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in 0..9 {
        let byte = *bytes.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7F) << (7 * shift);
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// The sum of the content sizes of every zstd frame (skippable frames count
/// nothing), walking block headers to find where each frame ends. `None` if
/// any frame does not state its size.
fn zstd_size(file: &mut File) -> Option<u64> {
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(0)).ok()?;
    let mut reader = BufReader::with_capacity(64 << 10, &mut *file);
    let mut at = 0u64;
    let mut total = 0u64;
    let take = |reader: &mut BufReader<&mut File>, at: &mut u64, n: usize| {
        let mut buf = [0u8; 8];
        reader.read_exact(&mut buf[..n]).ok()?;
        *at += n as u64;
        let mut value = 0u64;
        for (i, b) in buf[..n].iter().enumerate() {
            value |= u64::from(*b) << (8 * i);
        }
        Some(value)
    };
    let skip = |reader: &mut BufReader<&mut File>, at: &mut u64, n: u64| {
        reader.seek_relative(i64::try_from(n).ok()?).ok()?;
        *at += n;
        Some(())
    };
    while at < len {
        let magic = take(&mut reader, &mut at, 4)? as u32;
        if magic & 0xFFFF_FFF0 == 0x184D_2A50 {
            let skippable = take(&mut reader, &mut at, 4)?;
            skip(&mut reader, &mut at, skippable)?;
            continue;
        }
        if magic != 0xFD2F_B528 {
            return None;
        }
        let descriptor = take(&mut reader, &mut at, 1)? as u8;
        let single_segment = descriptor & 0x20 != 0;
        let has_checksum = descriptor & 0x04 != 0;
        if !single_segment {
            skip(&mut reader, &mut at, 1)?;
        }
        skip(
            &mut reader,
            &mut at,
            [0, 1, 2, 4][usize::from(descriptor & 3)],
        )?;
        let content = match (descriptor >> 6, single_segment) {
            (0, false) => return None,
            (0, true) => take(&mut reader, &mut at, 1)?,
            (1, _) => take(&mut reader, &mut at, 2)? + 256,
            (2, _) => take(&mut reader, &mut at, 4)?,
            _ => take(&mut reader, &mut at, 8)?,
        };
        total = total.checked_add(content)?;
        loop {
            let header = take(&mut reader, &mut at, 3)?;
            let last = header & 1 != 0;
            let size = header >> 3;
            match (header >> 1) & 3 {
                0 | 2 => skip(&mut reader, &mut at, size)?,
                1 => skip(&mut reader, &mut at, 1)?,
                _ => return None,
            }
            if last {
                break;
            }
        }
        if has_checksum {
            skip(&mut reader, &mut at, 4)?;
        }
    }
    (at == len).then_some(total)
}

/// gzip's ISIZE: the last member's size modulo 2^32, in its last four bytes.
fn gzip_isize(file: &mut File) -> Option<u64> {
    let len = file.metadata().ok()?.len();
    let tail = read_at(file, len.checked_sub(4)?, 4)?;
    le_u32(&tail).map(u64::from)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// Bytes that look like an ISO: a system area of zeros, "CD001" where the
    /// primary volume descriptor goes, and some text with zero runs between.
    fn fake_iso() -> Vec<u8> {
        let mut iso = vec![0u8; 64 << 10];
        iso[CD001_AT..CD001_AT + 5].copy_from_slice(b"CD001");
        for (i, chunk) in iso.chunks_mut(8192).enumerate().skip(5) {
            chunk[..11].copy_from_slice(format!("block {i:05}").as_bytes());
        }
        iso.extend(vec![0u8; 3 << 20]);
        iso
    }

    fn compressed(format: Format, data: &[u8]) -> Vec<u8> {
        match format {
            Format::Xz => {
                let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            // As the zstd CLI does for a file: the frame states its content size.
            Format::Zstd => zstd::bulk::compress(data, 1).unwrap(),
            Format::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), Default::default());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Format::Bzip2 => {
                let mut e = bzip2::write::BzEncoder::new(Vec::new(), Default::default());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
        }
    }

    const ALL: [Format; 4] = [Format::Xz, Format::Zstd, Format::Gzip, Format::Bzip2];

    fn file_with(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn each_format_is_told_by_its_magic_and_unpacks_to_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let iso = fake_iso();
        for format in ALL {
            // A misleading name: detection goes by content.
            let path = file_with(dir.path(), "image.iso", &compressed(format, &iso));
            let source = open_in(&path, dir.path(), ProgressMode::Quiet).unwrap();
            assert!(source.path().starts_with("/proc/self/fd/"), "{format:?}");
            assert_eq!(std::fs::read(source.path()).unwrap(), iso, "{format:?}");
            let note = source.note().unwrap();
            assert!(note.contains(format.name()), "{note}");
            // Nothing named is left in the temporary directory.
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        }
        let plain = file_with(dir.path(), "plain.iso", &iso);
        let source = open_in(&plain, dir.path(), ProgressMode::Quiet).unwrap();
        assert_eq!(source.path(), plain);
        assert!(source.note().is_none());
    }

    #[test]
    fn the_compressed_files_sha256_comes_from_the_read_that_unpacks_it() {
        let dir = tempfile::tempdir().unwrap();
        let iso = fake_iso();
        for format in ALL {
            let bytes = compressed(format, &iso);
            let path = file_with(dir.path(), "image.iso.x", &bytes);
            let source = open_in_hashing(&path, dir.path(), ProgressMode::Quiet, true).unwrap();
            let expected: [u8; 32] = Sha256::digest(&bytes).into();
            assert_eq!(source.compressed_sha256(), Some(expected), "{format:?}");
            assert_eq!(std::fs::read(source.path()).unwrap(), iso, "{format:?}");
            let unhashed = open_in(&path, dir.path(), ProgressMode::Quiet).unwrap();
            assert_eq!(unhashed.compressed_sha256(), None, "{format:?}");
        }
        let plain = file_with(dir.path(), "plain.iso", &iso);
        let source = open_in_hashing(&plain, dir.path(), ProgressMode::Quiet, true).unwrap();
        assert_eq!(source.compressed_sha256(), None);
    }

    #[test]
    fn formats_that_state_the_size_are_read_without_unpacking() {
        let dir = tempfile::tempdir().unwrap();
        let iso = fake_iso();
        let len = iso.len() as u64;
        for (format, expected) in [
            (Format::Xz, StatedSize::Exact(len)),
            (Format::Zstd, StatedSize::Exact(len)),
            (Format::Gzip, StatedSize::AtLeast(len)),
            (Format::Bzip2, StatedSize::Unknown),
        ] {
            let path = file_with(dir.path(), "x", &compressed(format, &iso));
            let mut file = File::open(&path).unwrap();
            assert_eq!(stated_size(format, &mut file), expected, "{format:?}");
        }
        // A frame made from a stream of unknown length (a pipe) does not state it.
        let path = file_with(dir.path(), "x", &zstd::encode_all(&iso[..], 1).unwrap());
        let mut file = File::open(&path).unwrap();
        assert_eq!(stated_size(Format::Zstd, &mut file), StatedSize::Unknown);
        // Two concatenated streams (or frames) add up.
        for format in [Format::Xz, Format::Zstd] {
            let mut twice = compressed(format, &iso);
            twice.extend(compressed(format, &iso[..5000]));
            let path = file_with(dir.path(), "x", &twice);
            let mut file = File::open(&path).unwrap();
            assert_eq!(
                stated_size(format, &mut file),
                StatedSize::Exact(len + 5000),
                "{format:?}"
            );
        }
    }

    #[test]
    fn zero_blocks_become_holes() {
        let dir = tempfile::tempdir().unwrap();
        let iso = fake_iso();
        let path = file_with(dir.path(), "x.zst", &compressed(Format::Zstd, &iso));
        let source = open_in(&path, dir.path(), ProgressMode::Quiet).unwrap();
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(source.path()).unwrap();
        assert_eq!(meta.len(), iso.len() as u64);
        assert!(
            meta.blocks() * 512 < 1 << 20,
            "{} bytes allocated",
            meta.blocks() * 512
        );
    }

    #[test]
    fn bad_streams_are_bad_input_naming_the_file_and_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let iso = fake_iso();
        for format in ALL {
            let whole = compressed(format, &iso);
            let cut = file_with(dir.path(), "cut.iso.x", &whole[..whole.len() / 2]);
            let err = open_in(&cut, dir.path(), ProgressMode::Quiet)
                .err()
                .unwrap_or_else(|| panic!("{format:?}: a truncated stream unpacked"));
            assert_eq!(err.kind(), ErrorKind::BadInput, "{format:?}: {err}");
            assert!(
                err.to_string().starts_with("decompressing ")
                    && err.to_string().contains("cut.iso.x"),
                "{err}"
            );

            let not_iso = file_with(dir.path(), "n", &compressed(format, &vec![7u8; 70000]));
            let err = open_in(&not_iso, dir.path(), ProgressMode::Quiet)
                .err()
                .unwrap();
            assert!(matches!(err, DecompressError::NotIso { .. }), "{err}");
        }
    }

    #[test]
    fn a_stated_size_larger_than_the_free_space_is_refused_before_unpacking() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_with(
            dir.path(),
            "big.zst",
            &compressed(Format::Zstd, &fake_iso()),
        );
        // Patch the frame's stated content size to something no disk has.
        let mut bytes = std::fs::read(&path).unwrap();
        let descriptor = bytes[4];
        assert_eq!(descriptor >> 6, 2, "4-byte content size expected");
        let at = 5 + usize::from(descriptor & 0x20 == 0);
        bytes[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let mut file = File::open(&path).unwrap();
        assert_eq!(
            stated_size(Format::Zstd, &mut file),
            StatedSize::Exact(u64::from(u32::MAX))
        );
        let available = available_bytes(dir.path()).unwrap();
        if available < u64::from(u32::MAX) {
            let err = open_in(&path, dir.path(), ProgressMode::Quiet)
                .err()
                .unwrap();
            assert!(matches!(err, DecompressError::NoSpace { .. }), "{err}");
            assert_eq!(err.kind(), ErrorKind::BadInput);
        }
    }

    #[test]
    fn sparse_writes_match_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let out = tempfile::tempfile_in(dir.path()).unwrap();
        let mut data = vec![0u8; 20000];
        data[100] = 1;
        data[9000] = 2;
        data[19999] = 3;
        // Unaligned offsets: the holes follow the file's blocks, not the buffer's.
        write_sparse(&out, &data[..7000], 5).unwrap();
        write_sparse(&out, &data[7000..], 7005).unwrap();
        out.set_len(20005).unwrap();
        let mut back = vec![0u8; 20005];
        out.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back[5..], &data[..]);
    }
}
