//! Checksums of the source ISO: the implanted MD5 of isomd5sum, and a SHA-256
//! reader adapter used while copying.
//!
//! The implanted MD5 is what `checkisomd5` (and the boot menu's media check)
//! verifies. `implantisomd5` writes, into the 512-byte application-use field
//! of the primary volume descriptor, text like
//!
//! ```text
//! ISO MD5SUM = 0123…;SKIPSECTORS = 15;RHLISOSTATUS=1;FRAGMENT SUMS = 3a9f…;FRAGMENT COUNT = 20;
//! ```
//!
//! The MD5 covers the volume minus its last `SKIPSECTORS` sectors, with the
//! application-use field itself read as spaces. The "fragment sums" are the
//! first hex digit of the first few bytes of the running MD5 at fragment
//! boundaries, so a damaged image fails long before the end. Their values
//! depend on exactly where the running hash is sampled, so the data is fed in
//! the same 32 KiB steps `checkisomd5` uses.

use std::io::{self, Read, Seek, SeekFrom};

use md5::{Digest, Md5};
use sha2::Sha256;
use thiserror::Error;

use super::iso::{
    APPLICATION_DATA_LEN, APPLICATION_DATA_OFFSET, IsoError, find_primary_descriptor,
};

/// isomd5sum counts in 2048-byte sectors whatever the block size.
const SECTOR: u64 = 2048;
/// The step in which `checkisomd5` feeds the hash (16 sectors). Fragment
/// sums are sampled after such a step, so this must not change.
const STEP: u64 = 16 * SECTOR;
/// Reads are larger than a step so that I/O is efficient; a multiple of STEP.
const READ_SIZE: usize = 32 * STEP as usize;
/// Length of the FRAGMENT SUMS field.
const FRAGMENT_SUMS_LEN: u64 = 60;

/// The checksum implanted by `implantisomd5`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImplantedMd5 {
    pub md5: [u8; 16],
    /// Sectors at the end of the volume left out of the sum.
    pub skip_sectors: u64,
    /// ASCII hex digits, `FRAGMENT SUMS`; empty when absent.
    pub fragment_sums: Vec<u8>,
    /// `FRAGMENT COUNT`; 0 when absent.
    pub fragment_count: u64,
}

impl ImplantedMd5 {
    /// The expected MD5 as lowercase hex.
    pub fn md5_hex(&self) -> String {
        hex(&self.md5)
    }
}

/// Result of a completed check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Md5Outcome {
    Passed,
    /// The whole-image MD5 differs (hex strings).
    Failed {
        expected: String,
        actual: String,
    },
    /// The running MD5 did not match at the end of this (1-based) fragment;
    /// the check stopped there.
    FragmentFailed {
        fragment: u64,
    },
}

/// How messages name the outcome.
impl std::fmt::Display for Md5Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Md5Outcome::Passed => f.write_str("passed"),
            Md5Outcome::Failed { expected, actual } => {
                write!(f, "MD5 {actual}, the ISO claims {expected}")
            }
            Md5Outcome::FragmentFailed { fragment } => {
                write!(f, "fragment {fragment} does not match its checksum")
            }
        }
    }
}

impl Md5Outcome {
    pub fn passed(&self) -> bool {
        matches!(self, Md5Outcome::Passed)
    }
}

#[derive(Debug, Error)]
pub enum ChecksumError {
    #[error("reading the ISO image at byte {offset} failed: {source}")]
    Io {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "the ISO image is truncated: its checksum covers {needed} bytes but the image has only \
         {actual} — the download is probably incomplete; download the ISO again"
    )]
    Truncated { needed: u64, actual: u64 },
    #[error(
        "the implanted MD5 skips {skip_sectors} sectors, more than the volume's {volume_size} \
         bytes — the implanted checksum is corrupt; verify the ISO against its published \
         SHA-256 instead, or pass --noverify"
    )]
    SkipTooLarge { skip_sectors: u64, volume_size: u64 },
    #[error(transparent)]
    Iso(#[from] IsoError),
}

impl crate::error::Classify for ChecksumError {
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::Io
    }
}

/// Parses the application-use field of the PVD. `None` when no MD5 is
/// implanted (or the text is damaged: without both the MD5 and SKIPSECTORS
/// there is nothing that could be checked).
pub fn implanted_md5(app_data: &[u8]) -> Option<ImplantedMd5> {
    let end = app_data
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(app_data.len());
    let text = std::str::from_utf8(&app_data[..end]).ok()?;

    let mut md5 = None;
    let mut skip_sectors = None;
    let mut fragment_sums = Vec::new();
    let mut fragment_count = 0u64;
    for field in text.split(';') {
        let Some((key, value)) = field.split_once('=') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "ISO MD5SUM" => md5 = parse_md5(value),
            "SKIPSECTORS" => skip_sectors = value.parse::<u64>().ok(),
            "FRAGMENT SUMS" => fragment_sums = value.as_bytes().to_vec(),
            "FRAGMENT COUNT" => fragment_count = value.parse::<u64>().unwrap_or(0),
            _ => {}
        }
    }
    let (md5, skip_sectors) = (md5?, skip_sectors?);
    // Fragment sums that cannot be right are dropped rather than trusted:
    // the whole-image MD5 still decides.
    let usable = fragment_count > 0
        && fragment_count <= FRAGMENT_SUMS_LEN
        && fragment_sums.iter().all(u8::is_ascii_hexdigit)
        && fragment_sums.len() as u64 >= (FRAGMENT_SUMS_LEN / fragment_count) * fragment_count;
    if !usable {
        fragment_sums.clear();
        fragment_count = 0;
    }
    Some(ImplantedMd5 {
        md5,
        skip_sectors,
        fragment_sums,
        fragment_count,
    })
}

/// Verifies the implanted MD5 the way `checkisomd5` does. `volume_size` is
/// the PVD's declared size in bytes ([`super::iso::IsoImage::volume_size`]).
/// `progress(done, total)` is called as bytes are hashed.
pub fn verify_implanted_md5<R: Read + Seek>(
    reader: &mut R,
    md5: &ImplantedMd5,
    volume_size: u64,
    mut progress: impl FnMut(u64, u64),
) -> Result<Md5Outcome, ChecksumError> {
    let skip_bytes = md5.skip_sectors.checked_mul(SECTOR);
    let total =
        skip_bytes
            .and_then(|s| volume_size.checked_sub(s))
            .ok_or(ChecksumError::SkipTooLarge {
                skip_sectors: md5.skip_sectors,
                volume_size,
            })?;
    // The application data is blanked wherever checkisomd5 finds the PVD.
    let appdata_start = find_primary_descriptor(reader)? + APPLICATION_DATA_OFFSET as u64;
    let appdata_end = appdata_start + APPLICATION_DATA_LEN as u64;

    let image_len = reader
        .seek(SeekFrom::End(0))
        .map_err(|source| ChecksumError::Io { offset: 0, source })?;
    if image_len < total {
        return Err(ChecksumError::Truncated {
            needed: total,
            actual: image_len,
        });
    }
    reader
        .seek(SeekFrom::Start(0))
        .map_err(|source| ChecksumError::Io { offset: 0, source })?;

    let count = md5.fragment_count;
    let fragment_size = if count > 0 {
        total / count.saturating_add(1)
    } else {
        0
    };
    let digits_per_fragment = FRAGMENT_SUMS_LEN.checked_div(count).unwrap_or(0);
    let mut previous_fragment = 0u64;

    let mut hasher = Md5::new();
    let mut buf = vec![0u8; READ_SIZE];
    let mut offset = 0u64;
    progress(0, total);
    while offset < total {
        let want = (total - offset).min(READ_SIZE as u64) as usize;
        let chunk = &mut buf[..want];
        reader
            .read_exact(chunk)
            .map_err(|source| ChecksumError::Io { offset, source })?;
        blank_overlap(chunk, offset, appdata_start, appdata_end);

        for (i, step) in chunk.chunks(STEP as usize).enumerate() {
            let step_offset = offset + (i as u64) * STEP;
            hasher.update(step);
            if fragment_size == 0 {
                continue;
            }
            // Sampled after the step is hashed, indexed by where the step
            // *started*: that is checkisomd5's definition.
            let fragment = step_offset / fragment_size;
            if fragment != previous_fragment {
                // Rounding can put the last step past the final fragment;
                // there is no sum for it, and the full MD5 covers it.
                if fragment <= count
                    && !fragment_matches(&hasher, fragment, digits_per_fragment, &md5.fragment_sums)
                {
                    return Ok(Md5Outcome::FragmentFailed { fragment });
                }
                previous_fragment = fragment;
            }
        }
        offset += want as u64;
        progress(offset, total);
    }

    let actual: [u8; 16] = hasher.finalize().into();
    if actual == md5.md5 {
        Ok(Md5Outcome::Passed)
    } else {
        Ok(Md5Outcome::Failed {
            expected: hex(&md5.md5),
            actual: hex(&actual),
        })
    }
}

/// Compares the running MD5 with the sum digits stored for `fragment`.
fn fragment_matches(hasher: &Md5, fragment: u64, digits: u64, sums: &[u8]) -> bool {
    let digest = hasher.clone().finalize();
    let first = (fragment - 1) * digits;
    (0..digits).all(|i| {
        let stored = usize::try_from(first + i).ok().and_then(|j| sums.get(j));
        let byte = usize::try_from(i).ok().and_then(|j| digest.get(j));
        match (stored, byte) {
            (Some(&stored), Some(&byte)) => stored.eq_ignore_ascii_case(&first_hex_digit(byte)),
            // Fewer digits than promised (checked when parsing) or more than
            // 16 digest bytes per fragment: nothing to compare.
            _ => true,
        }
    })
}

/// The first character of the byte printed with `%x` (no zero padding):
/// the high nibble for 0x10..=0xff, the value itself below 0x10. That is how
/// implantisomd5 records fragment sums.
fn first_hex_digit(byte: u8) -> u8 {
    let nibble = if byte >= 0x10 { byte >> 4 } else { byte };
    b"0123456789abcdef"[usize::from(nibble)]
}

/// Overwrites with spaces the part of `chunk` (at image offset `offset`)
/// that lies inside `[start, end)`.
fn blank_overlap(chunk: &mut [u8], offset: u64, start: u64, end: u64) {
    let chunk_end = offset + chunk.len() as u64;
    let from = start.max(offset);
    let to = end.min(chunk_end);
    if from < to {
        let a = (from - offset) as usize;
        let b = (to - offset) as usize;
        chunk[a..b].fill(b' ');
    }
}

fn parse_md5(value: &str) -> Option<[u8; 16]> {
    let bytes = value.as_bytes();
    if bytes.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Lowercase hex of `bytes`.
/// Bytes at each end of a root image that [`ends_sha256`] covers.
const ENDS_BYTES: u64 = 64 * 1024;

/// sha256 of the first and last 64 KiB of a `len`-byte image: a squashfs
/// superblock (build time, sizes, table offsets) and its tables at the end, or an
/// EROFS superblock. Any rebuilt image differs there.
pub fn ends_sha256<R: Read + Seek>(r: &mut R, len: u64) -> io::Result<String> {
    use sha2::Digest as _;
    let mut hasher = Sha256::new();
    let head = len.min(ENDS_BYTES);
    let tail_start = len.saturating_sub(ENDS_BYTES).max(head);
    for (start, end) in [(0, head), (tail_start, len)] {
        r.seek(SeekFrom::Start(start))?;
        let mut buf = vec![0u8; (end - start) as usize];
        r.read_exact(&mut buf)?;
        hasher.update(&buf);
    }
    Ok(hex(&hasher.finalize()))
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// A `Read` adapter that SHA-256-hashes every byte read through it, so that
/// a copy produces the source hash without a second read.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            bytes: 0,
        }
    }

    /// Bytes hashed so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The SHA-256 of everything read.
    pub fn finish(self) -> [u8; 32] {
        self.hasher.finalize().into()
    }

    /// The SHA-256 of everything read, and the inner reader.
    pub fn finish_into_inner(self) -> ([u8; 32], R) {
        (self.hasher.finalize().into(), self.inner)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        // `n` comes from the inner reader; never trust it beyond the buffer.
        let n = n.min(buf.len());
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// SHA-256 of everything `reader` yields.
pub fn sha256_reader<R: Read>(reader: R) -> io::Result<[u8; 32]> {
    let mut hashing = HashingReader::new(reader);
    io::copy(&mut hashing, &mut io::sink())?;
    Ok(hashing.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_hash_covers_both_ends_only() {
        let mut image = vec![0u8; 256 * 1024];
        let base = ends_sha256(&mut io::Cursor::new(&image), image.len() as u64).unwrap();
        image[128 * 1024] = 1;
        let middle = ends_sha256(&mut io::Cursor::new(&image), image.len() as u64).unwrap();
        assert_eq!(base, middle, "the middle is not read");
        let last = image.len() - 1;
        image[last] = 1;
        let tail = ends_sha256(&mut io::Cursor::new(&image), image.len() as u64).unwrap();
        assert_ne!(base, tail);
        // Shorter than both ends together: each byte once.
        let small = [7u8; 1000];
        let sum = ends_sha256(&mut io::Cursor::new(&small), 1000).unwrap();
        assert_eq!(sum, hex(&sha2::Sha256::digest(small)));
    }
    use std::io::Cursor;

    const SAMPLE: &str = "ISO MD5SUM = 2958866ec24f63bb12a1e12b14e74614;SKIPSECTORS = 15;\
        RHLISOSTATUS=0;FRAGMENT SUMS = 927e2deb27b9c2a6379dc342de8916f48fff5788354a5114debffaa15cfc;\
        FRAGMENT COUNT = 20;THIS IS NOT THE SAME AS RUNNING MD5SUM ON THIS ISO!!";

    fn app_data(text: &str) -> Vec<u8> {
        let mut a = vec![b' '; 512];
        a[..text.len()].copy_from_slice(text.as_bytes());
        a
    }

    #[test]
    fn parses_implantisomd5_text() {
        let md5 = implanted_md5(&app_data(SAMPLE)).unwrap();
        assert_eq!(md5.md5_hex(), "2958866ec24f63bb12a1e12b14e74614");
        assert_eq!(md5.skip_sectors, 15);
        assert_eq!(md5.fragment_count, 20);
        assert_eq!(md5.fragment_sums.len(), 60);
    }

    #[test]
    fn missing_or_damaged_fields_mean_no_checksum() {
        assert!(implanted_md5(&[b' '; 512]).is_none());
        assert!(implanted_md5(&[0; 512]).is_none());
        assert!(implanted_md5(&[0xff; 512]).is_none());
        assert!(implanted_md5(&app_data("ISO MD5SUM = 12345;SKIPSECTORS = 15;")).is_none());
        assert!(
            implanted_md5(&app_data("ISO MD5SUM = 2958866ec24f63bb12a1e12b14e74614;")).is_none()
        );
        // Bad fragment data is dropped, the MD5 is kept.
        let md5 = implanted_md5(&app_data(
            "ISO MD5SUM = 2958866ec24f63bb12a1e12b14e74614;SKIPSECTORS = 0;\
             FRAGMENT SUMS = zz;FRAGMENT COUNT = 20;",
        ))
        .unwrap();
        assert_eq!((md5.fragment_count, md5.fragment_sums.len()), (0, 0));
    }

    #[test]
    fn fragment_digit_is_the_first_character_of_percent_x() {
        assert_eq!(first_hex_digit(0x00), b'0');
        assert_eq!(first_hex_digit(0x0a), b'a');
        assert_eq!(first_hex_digit(0x10), b'1');
        assert_eq!(first_hex_digit(0xf3), b'f');
    }

    #[test]
    fn blanking_covers_only_the_overlap() {
        let mut chunk = [b'x'; 10];
        blank_overlap(&mut chunk, 100, 105, 200);
        assert_eq!(&chunk, b"xxxxx     ");
        let mut chunk = [b'x'; 10];
        blank_overlap(&mut chunk, 100, 0, 102);
        assert_eq!(&chunk, b"  xxxxxxxx");
        let mut chunk = [b'x'; 10];
        blank_overlap(&mut chunk, 100, 110, 200);
        assert_eq!(&chunk, b"xxxxxxxxxx");
    }

    /// A synthetic image whose checksum is computed here the simple way
    /// (the whole range at once, application data as spaces): the chunked
    /// verifier must agree, and progress must be monotonic.
    #[test]
    fn verifier_matches_a_plain_md5() {
        let mut img: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        img[32768..32768 + 8].copy_from_slice(b"\x01CD001\x01\x00");
        let mut expected = img[..300_000 - 2048].to_vec();
        expected[32768 + 883..32768 + 883 + 512].fill(b' ');
        let sum: [u8; 16] = Md5::digest(&expected).into();
        let md5 = ImplantedMd5 {
            md5: sum,
            skip_sectors: 1,
            fragment_sums: Vec::new(),
            fragment_count: 0,
        };
        let mut seen = Vec::new();
        let outcome = verify_implanted_md5(&mut Cursor::new(&img), &md5, 300_000, |d, t| {
            seen.push((d, t))
        })
        .unwrap();
        assert_eq!(outcome, Md5Outcome::Passed);
        assert_eq!(seen.last(), Some(&(297_952, 297_952)));
        assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0));

        img[1000] ^= 1;
        let outcome =
            verify_implanted_md5(&mut Cursor::new(&img), &md5, 300_000, |_, _| {}).unwrap();
        assert!(matches!(outcome, Md5Outcome::Failed { .. }));

        let err = verify_implanted_md5(&mut Cursor::new(&img[..200_000]), &md5, 300_000, |_, _| {})
            .unwrap_err();
        assert!(matches!(err, ChecksumError::Truncated { .. }), "{err}");
        let huge_skip = ImplantedMd5 {
            skip_sectors: u64::MAX,
            ..md5
        };
        let err = verify_implanted_md5(&mut Cursor::new(&img), &huge_skip, 300_000, |_, _| {})
            .unwrap_err();
        assert!(matches!(err, ChecksumError::SkipTooLarge { .. }), "{err}");
    }

    #[test]
    fn hashing_reader_hashes_what_passes() {
        let mut r = HashingReader::new(&b"abc"[..]);
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"abc");
        assert_eq!(r.bytes_read(), 3);
        assert_eq!(
            hex(&r.finish()),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
