//! A raw disk image as a source (`.raw`, `.img`, a hybrid ISO given with
//! `--dd`), plain or compressed (`.raw.xz`, `.zst`, `.gz`, `.bz2`: detected by
//! magic, as `source::compressed` does for ISOs).
//!
//! Unlike a compressed ISO, a raw image is never unpacked to a temporary
//! file: nothing inside it is planned, so it is streamed once from start to
//! end, decompressed on the way. Errors found mid-stream travel through
//! `Read` as an `io::Error` carrying a [`RawError`] ([`RawError::from_io`]
//! gets it back), so that they keep their kind and name the source.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use thiserror::Error;

use crate::error::{Classify, ErrorKind, open_failure_hint, open_failure_kind};
use crate::size::human;
use crate::source::compressed::{self, Counting, Format, StatedSize};

#[derive(Debug, Error)]
pub enum RawError {
    #[error("cannot open the image {}: {source}", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading the image {} failed at byte {at}: {source}", .path.display())]
    Read {
        path: PathBuf,
        at: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "decompressing the image {}: the {format} stream ends early, after {} of output: the file is incomplete — download it again",
        .path.display(), human(*.at)
    )]
    Truncated {
        path: PathBuf,
        format: &'static str,
        at: u64,
    },
    #[error(
        "decompressing the image {}: the {format} data is corrupt after {} of output ({source}) — download it again",
        .path.display(), human(*.at)
    )]
    Corrupt {
        path: PathBuf,
        format: &'static str,
        at: u64,
        #[source]
        source: io::Error,
    },
    #[error("the image {} is empty", .0.display())]
    Empty(PathBuf),
}

impl Classify for RawError {
    fn kind(&self) -> ErrorKind {
        match self {
            RawError::Open { source, .. } => open_failure_kind(source),
            RawError::Read { .. } => ErrorKind::Io,
            RawError::Truncated { .. } | RawError::Corrupt { .. } | RawError::Empty(_) => {
                ErrorKind::BadInput
            }
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            RawError::Open { source, .. } => open_failure_hint(source),
            _ => self.kind().hint(),
        }
    }
}

impl RawError {
    /// The [`RawError`] an `io::Error` from a [`RawImage::stream`] carries, if any.
    pub fn from_io(error: io::Error) -> Result<RawError, io::Error> {
        if error.get_ref().is_some_and(|e| e.is::<RawError>()) {
            match error.into_inner().map(|e| e.downcast::<RawError>()) {
                Some(Ok(raw)) => Ok(*raw),
                Some(Err(other)) => Err(io::Error::other(other)),
                None => Err(io::Error::other("unreadable error")),
            }
        } else {
            Err(error)
        }
    }
}

/// What the image file is and what its size is known to be before streaming.
#[derive(Debug, Clone)]
pub struct RawImage {
    pub path: PathBuf,
    pub compression: Option<Format>,
    /// The size of the image itself (after decompression).
    pub size: StatedSize,
    /// The size of the file as stored.
    pub file_len: u64,
}

impl RawImage {
    /// Opens `path` far enough to know its compression and size.
    pub fn open(path: &Path) -> Result<RawImage, RawError> {
        let open_err = |source| RawError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(open_err)?;
        // A block device's metadata says 0 bytes; seeking to its end does not.
        let file_len = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        if file_len == 0 {
            return Err(RawError::Empty(path.to_path_buf()));
        }
        file.seek(SeekFrom::Start(0)).map_err(open_err)?;
        let mut magic = [0u8; 6];
        let got = crate::io::read_full(&mut file, &mut magic).map_err(open_err)?;
        let compression = Format::detect(&magic[..got]);
        let size = match compression {
            Some(format) => compressed::stated_size(format, &mut file),
            None => StatedSize::Exact(file_len),
        };
        Ok(RawImage {
            path: path.to_path_buf(),
            compression,
            size,
            file_len,
        })
    }

    /// The exact size when it is known before streaming.
    pub fn exact_size(&self) -> Option<u64> {
        match self.size {
            StatedSize::Exact(n) => Some(n),
            _ => None,
        }
    }

    /// The first `len` bytes of the image (fewer if it is shorter), decompressed.
    pub fn head(&self, len: usize) -> Result<Vec<u8>, RawError> {
        let mut stream = self.stream()?;
        let mut buf = vec![0u8; len];
        let got = crate::io::read_full(&mut stream, &mut buf).map_err(|e| {
            RawError::from_io(e).unwrap_or_else(|source| RawError::Read {
                path: self.path.clone(),
                at: 0,
                source,
            })
        })?;
        buf.truncate(got);
        Ok(buf)
    }

    /// The image from its first byte, decompressed; errors carry a [`RawError`].
    pub fn stream(&self) -> Result<RawStream, RawError> {
        let file = File::open(&self.path).map_err(|source| RawError::Open {
            path: self.path.clone(),
            source,
        })?;
        let (counting, _taken, failed) = Counting::new(file);
        let reader = BufReader::with_capacity(1 << 20, counting);
        let inner: Box<dyn Read + Send> = match self.compression {
            Some(format) => {
                compressed::decoder(format, reader).map_err(|source| RawError::Read {
                    path: self.path.clone(),
                    at: 0,
                    source,
                })?
            }
            None => Box::new(reader),
        };
        Ok(RawStream {
            inner,
            path: self.path.clone(),
            format: self.compression,
            failed,
            at: 0,
        })
    }

    /// "xz-compressed" and the like, for the plan.
    pub fn describe_compression(&self) -> Option<String> {
        self.compression
            .map(|f| format!("{}-compressed, {} stored", f.name(), human(self.file_len)))
    }
}

/// The decompressed image, read once; see [`RawImage::stream`].
pub struct RawStream {
    inner: Box<dyn Read + Send>,
    path: PathBuf,
    format: Option<Format>,
    failed: Arc<AtomicBool>,
    at: u64,
}

impl RawStream {
    fn typed(&self, source: io::Error) -> RawError {
        let path = self.path.clone();
        let at = self.at;
        match self.format {
            _ if self.failed.load(Ordering::Relaxed) => RawError::Read { path, at, source },
            None => RawError::Read { path, at, source },
            Some(format) if source.kind() == io::ErrorKind::UnexpectedEof => RawError::Truncated {
                path,
                format: format.name(),
                at,
            },
            Some(format) => RawError::Corrupt {
                path,
                format: format.name(),
                at,
                source,
            },
        }
    }
}

impl Read for RawStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.inner.read(buf) {
                Ok(n) => {
                    self.at += n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let typed = self.typed(e);
                    return Err(io::Error::other(typed));
                }
            }
        }
    }
}

/// Where the ISO 9660 primary volume descriptor's "CD001" sits.
pub const CD001_AT: usize = 16 * 2048 + 1;

/// What the first bytes of a source say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// An ISO 9660 volume; `hybrid` when it also carries an MBR or GPT, as
    /// every ISO meant to boot from a USB stick does.
    Iso {
        hybrid: bool,
    },
    /// A partitioned disk image: an MBR boot signature or a GPT header.
    Disk {
        gpt: bool,
    },
    Unknown,
}

/// Classifies `head` (at least the first 34 KiB for an ISO to be seen).
pub fn content_of(head: &[u8]) -> Content {
    let gpt = head.len() >= 520 && &head[512..520] == b"EFI PART";
    let mbr = head.len() >= 512 && head[510] == 0x55 && head[511] == 0xAA;
    if head.len() >= CD001_AT + 5 && &head[CD001_AT..CD001_AT + 5] == b"CD001" {
        return Content::Iso { hybrid: gpt || mbr };
    }
    if gpt || mbr {
        Content::Disk { gpt }
    } else {
        Content::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn content_is_told_by_its_bytes() {
        let mut head = vec![0u8; 40 * 1024];
        assert_eq!(content_of(&head), Content::Unknown);
        head[510] = 0x55;
        head[511] = 0xAA;
        assert_eq!(content_of(&head), Content::Disk { gpt: false });
        head[512..520].copy_from_slice(b"EFI PART");
        assert_eq!(content_of(&head), Content::Disk { gpt: true });
        head[CD001_AT..CD001_AT + 5].copy_from_slice(b"CD001");
        assert_eq!(content_of(&head), Content::Iso { hybrid: true });
        head[..1024].fill(0);
        assert_eq!(content_of(&head), Content::Iso { hybrid: false });
    }

    #[test]
    fn a_truncated_stream_says_where_it_ended() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&data).unwrap();
        let gz = enc.finish().unwrap();
        let path = dir.path().join("disk.raw.gz");
        std::fs::write(&path, &gz[..gz.len() / 2]).unwrap();
        let image = RawImage::open(&path).unwrap();
        assert_eq!(image.compression, Some(Format::Gzip));
        let mut sink = Vec::new();
        let err = image.stream().unwrap().read_to_end(&mut sink).unwrap_err();
        let raw = RawError::from_io(err).unwrap();
        assert!(matches!(raw, RawError::Truncated { .. }), "{raw}");
        assert_eq!(raw.kind(), ErrorKind::BadInput);
        assert!(raw.to_string().contains("disk.raw.gz"), "{raw}");

        std::fs::write(&path, &gz).unwrap();
        let mut all = Vec::new();
        RawImage::open(&path)
            .unwrap()
            .stream()
            .unwrap()
            .read_to_end(&mut all)
            .unwrap();
        assert_eq!(all, data);
    }
}
