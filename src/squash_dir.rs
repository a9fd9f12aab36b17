//! Looking up a path in a squashfs 4.0 image's directory tree, in Rust.
//!
//! `write` asks one question of a live ISO's `LiveOS/squashfs.img`: does it hold a
//! nested root image (`LiveOS/rootfs.img`)? `unsquashfs -l` answers it by listing
//! every file of the image: a process to start (a noticeable part of a write on a
//! slow CPU) and, for a flat root of a few hundred thousand files, seconds of
//! listing. The tree has the answer two directories down: the root directory's
//! `LiveOS` entry, then that directory's entries.
//!
//! The format (squashfs-tools' `squashfs_fs.h`): metadata (inodes, directories)
//! lives in blocks of at most 8 KiB, each behind a 16-bit header (its stored length,
//! bit 15 set when stored uncompressed), compressed with the image's compressor. An
//! inode reference is the block's offset in the inode table shifted left 16 bits
//! plus the offset inside the uncompressed block. A directory is a run of headers
//! (entry count − 1, inode block, inode number) each followed by its entries (offset
//! in that inode block, inode number delta, type, name length − 1, name).
//!
//! Compressors without a decoder here (LZO) give [`DirError::Compressor`]: the
//! caller asks `unsquashfs` instead.

use std::io::{self, Read};

use thiserror::Error;

use crate::bytes::{u16_at, u32_at, u64_at};
use crate::squash::{Compressor, SQUASHFS_MAGIC};

/// Largest uncompressed metadata block.
const METADATA_BLOCK: usize = 8192;
/// Basic and extended directory inode types.
const DIR_TYPES: [u16; 2] = [1, 8];
/// Basic and extended regular file inode types.
const FILE_TYPES: [u16; 2] = [2, 9];
/// Most entries one directory header may carry (squashfs-tools writes up to 256).
const MAX_HEADER_ENTRIES: u32 = 256;

#[derive(Debug, Error)]
pub enum DirError {
    #[error("reading the squashfs image: {0}")]
    Io(#[from] io::Error),
    #[error("not a squashfs 4.0 image")]
    NotSquashfs,
    #[error("no decoder here for squashfs compressor {0}")]
    Compressor(String),
    #[error("the squashfs image is damaged: {0}")]
    Damaged(String),
}

/// A squashfs image read through `read_at(offset, buf)` (offsets relative to the
/// image's start), which fills `buf` whole or fails.
pub struct SquashDirs<R> {
    read_at: R,
    compressor: Compressor,
    inode_table: u64,
    directory_table: u64,
    root_inode: u64,
    image_len: u64,
}

/// What a directory lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    Directory,
    File,
    /// Something else of that name (a link, a device, ...).
    Other,
}

impl<R: FnMut(u64, &mut [u8]) -> io::Result<()>> SquashDirs<R> {
    /// Reads the superblock.
    pub fn open(mut read_at: R) -> Result<Self, DirError> {
        let mut sb = [0u8; 96];
        read_at(0, &mut sb)?;
        if u32_at(&sb, 0) != SQUASHFS_MAGIC || u16_at(&sb, 28) != 4 {
            return Err(DirError::NotSquashfs);
        }
        let id = u16_at(&sb, 20);
        let compressor =
            Compressor::from_id(id).ok_or_else(|| DirError::Compressor(format!("with id {id}")))?;
        if compressor == Compressor::Lzo {
            return Err(DirError::Compressor(compressor.name().into()));
        }
        Ok(SquashDirs {
            read_at,
            compressor,
            root_inode: u64_at(&sb, 32),
            image_len: u64_at(&sb, 40),
            inode_table: u64_at(&sb, 64),
            directory_table: u64_at(&sb, 72),
        })
    }

    /// What `path` ("LiveOS/rootfs.img") is in the image; `None` when it is not there.
    pub fn lookup(&mut self, path: &str) -> Result<Option<Found>, DirError> {
        let mut inode = self.root_inode;
        let mut found = Found::Directory;
        for name in path.split('/').filter(|n| !n.is_empty()) {
            if found != Found::Directory {
                return Ok(None);
            }
            match self.find_entry(inode, name)? {
                Some((reference, kind)) => {
                    inode = reference;
                    found = kind;
                }
                None => return Ok(None),
            }
        }
        Ok(Some(found))
    }

    /// The inode reference and kind of `name` in the directory whose inode is `dir`.
    fn find_entry(&mut self, dir: u64, name: &str) -> Result<Option<(u64, Found)>, DirError> {
        let mut inode = self.meta_reader(self.inode_table, dir);
        let mut head = [0u8; 16];
        inode.read_exact(self, &mut head)?;
        let kind = u16_at(&head, 0);
        let (start_block, offset, size) = match kind {
            1 => {
                let mut b = [0u8; 16];
                inode.read_exact(self, &mut b)?;
                (u32_at(&b, 0), u16_at(&b, 10), u64::from(u16_at(&b, 8)))
            }
            8 => {
                let mut b = [0u8; 24];
                inode.read_exact(self, &mut b)?;
                (u32_at(&b, 8), u16_at(&b, 18), u64::from(u32_at(&b, 4)))
            }
            other => {
                return Err(DirError::Damaged(format!(
                    "a directory entry names inode type {other} as a directory"
                )));
            }
        };
        // The stored size counts 3 bytes for "." and "..", which are not stored.
        let mut left = size.saturating_sub(3);
        let reference = (u64::from(start_block) << 16) | u64::from(offset);
        let mut listing = self.meta_reader(self.directory_table, reference);
        while left >= 12 {
            let mut header = [0u8; 12];
            listing.read_exact(self, &mut header)?;
            left -= 12;
            let count = u32_at(&header, 0);
            if count >= MAX_HEADER_ENTRIES {
                return Err(DirError::Damaged(format!(
                    "a directory header claims {} entries",
                    u64::from(count) + 1
                )));
            }
            let block = u64::from(u32_at(&header, 4));
            for _ in 0..=count {
                let mut entry = [0u8; 8];
                listing.read_exact(self, &mut entry)?;
                let len = usize::from(u16_at(&entry, 6)) + 1;
                let mut entry_name = vec![0u8; len];
                listing.read_exact(self, &mut entry_name)?;
                left = left.checked_sub(8 + len as u64).ok_or_else(|| {
                    DirError::Damaged("a directory's entries run past its size".into())
                })?;
                if entry_name == name.as_bytes() {
                    let kind = u16_at(&entry, 4);
                    let found = if DIR_TYPES.contains(&kind) {
                        Found::Directory
                    } else if FILE_TYPES.contains(&kind) {
                        Found::File
                    } else {
                        Found::Other
                    };
                    return Ok(Some(((block << 16) | u64::from(u16_at(&entry, 0)), found)));
                }
            }
        }
        Ok(None)
    }

    fn meta_reader(&self, table: u64, reference: u64) -> MetaReader {
        MetaReader {
            next_block: table + (reference >> 16),
            skip: (reference & 0xffff) as usize,
            block: Vec::new(),
            at: 0,
        }
    }

    /// The uncompressed metadata block at `pos`, and where the next one starts.
    fn metadata_block(&mut self, pos: u64) -> Result<(Vec<u8>, u64), DirError> {
        if pos.saturating_add(2) > self.image_len {
            return Err(DirError::Damaged(format!(
                "metadata at byte {pos} lies past the image's end"
            )));
        }
        let mut header = [0u8; 2];
        (self.read_at)(pos, &mut header)?;
        let header = u16::from_le_bytes(header);
        let stored = usize::from(header & 0x7fff);
        if stored == 0 || stored > METADATA_BLOCK || pos + 2 + stored as u64 > self.image_len {
            return Err(DirError::Damaged(format!(
                "a metadata block at byte {pos} claims {stored} bytes"
            )));
        }
        let mut raw = vec![0u8; stored];
        (self.read_at)(pos + 2, &mut raw)?;
        let block = if header & 0x8000 != 0 {
            raw
        } else {
            decompress(self.compressor, &raw).map_err(|e| {
                DirError::Damaged(format!(
                    "a metadata block at byte {pos} does not unpack: {e}"
                ))
            })?
        };
        Ok((block, pos + 2 + stored as u64))
    }
}

/// Reads on through consecutive metadata blocks from a reference.
struct MetaReader {
    next_block: u64,
    skip: usize,
    block: Vec<u8>,
    at: usize,
}

impl MetaReader {
    fn read_exact<R: FnMut(u64, &mut [u8]) -> io::Result<()>>(
        &mut self,
        image: &mut SquashDirs<R>,
        out: &mut [u8],
    ) -> Result<(), DirError> {
        let mut done = 0;
        while done < out.len() {
            if self.at >= self.block.len() {
                let (block, next) = image.metadata_block(self.next_block)?;
                self.block = block;
                self.next_block = next;
                self.at = std::mem::take(&mut self.skip);
                if self.at > self.block.len() {
                    return Err(DirError::Damaged(
                        "an inode or directory reference points past its block".into(),
                    ));
                }
                continue;
            }
            let n = (out.len() - done).min(self.block.len() - self.at);
            out[done..done + n].copy_from_slice(&self.block[self.at..self.at + n]);
            self.at += n;
            done += n;
        }
        Ok(())
    }
}

fn decompress(compressor: Compressor, raw: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(METADATA_BLOCK);
    let limit = METADATA_BLOCK as u64 + 1;
    match compressor {
        Compressor::Gzip => {
            flate2::read::ZlibDecoder::new(raw)
                .take(limit)
                .read_to_end(&mut out)?;
        }
        Compressor::Xz => {
            liblzma::read::XzDecoder::new(raw)
                .take(limit)
                .read_to_end(&mut out)?;
        }
        Compressor::Lzma => {
            let stream =
                liblzma::stream::Stream::new_lzma_decoder(u64::MAX).map_err(io::Error::other)?;
            liblzma::read::XzDecoder::new_stream(raw, stream)
                .take(limit)
                .read_to_end(&mut out)?;
        }
        Compressor::Zstd => {
            zstd::stream::read::Decoder::new(raw)?
                .take(limit)
                .read_to_end(&mut out)?;
        }
        Compressor::Lz4 => {
            out = lz4_flex::block::decompress(raw, METADATA_BLOCK).map_err(io::Error::other)?;
        }
        Compressor::Lzo => {
            return Err(io::Error::other("no LZO decoder"));
        }
    }
    if out.len() > METADATA_BLOCK {
        return Err(io::Error::other("unpacks to more than 8 KiB"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;

    type Opened<R> = Result<SquashDirs<R>, DirError>;

    /// The image at `offset` in the file at `path`.
    fn open_file(path: &Path, offset: u64) -> Opened<impl FnMut(u64, &mut [u8]) -> io::Result<()>> {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::open(path).unwrap();
        SquashDirs::open(move |at, buf: &mut [u8]| file.read_exact_at(buf, offset + at))
    }

    /// The image held in `bytes`.
    fn open_bytes(bytes: &[u8]) -> Opened<impl FnMut(u64, &mut [u8]) -> io::Result<()> + '_> {
        SquashDirs::open(move |pos: u64, buf: &mut [u8]| {
            let pos = pos as usize;
            let src = bytes
                .get(pos..pos + buf.len())
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            buf.copy_from_slice(src);
            Ok(())
        })
    }

    /// Whether the test can make images; in CI it must.
    fn have_mksquashfs() -> bool {
        let have = Command::new("mksquashfs").arg("-version").output().is_ok();
        assert!(
            have || std::env::var_os("CI").is_none(),
            "mksquashfs is missing"
        );
        have
    }

    fn mksquashfs(tree: &Path, out: &Path, comp: &str) -> bool {
        let _ = std::fs::remove_file(out);
        Command::new("mksquashfs")
            .arg(tree)
            .arg(out)
            .args(["-noappend", "-quiet", "-no-progress", "-comp", comp])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// A tree whose LiveOS directory has enough entries to need several directory
    /// headers and metadata blocks, with the wanted name among them.
    fn tree(dir: &Path, nested: bool) -> std::path::PathBuf {
        let root = dir.join(if nested { "nested" } else { "flat" });
        let live = root.join("LiveOS");
        std::fs::create_dir_all(&live).unwrap();
        for i in 0..700 {
            std::fs::write(
                live.join(format!("file-{i:04}-{}", "x".repeat(i % 40))),
                b"",
            )
            .unwrap();
        }
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        std::fs::write(root.join("usr/lib/os-release"), b"ID=test\n").unwrap();
        if nested {
            std::fs::write(live.join("rootfs.img"), vec![0u8; 100_000]).unwrap();
        } else {
            std::fs::create_dir(live.join("rootfs.img.d")).unwrap();
        }
        root
    }

    #[test]
    fn lookups_agree_with_what_mksquashfs_stored() {
        if !have_mksquashfs() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let nested = tree(dir.path(), true);
        let flat = tree(dir.path(), false);
        let img = dir.path().join("t.sqfs");
        for comp in ["gzip", "xz", "zstd", "lz4", "lzma"] {
            if !mksquashfs(&nested, &img, comp) {
                // Not every build of mksquashfs has every compressor (lzma).
                assert_ne!(comp, "gzip");
                continue;
            }
            // At an offset inside a larger file, as inside an ISO.
            let iso = dir.path().join("t.iso");
            let mut bytes = vec![0xa5u8; 6144];
            bytes.extend(std::fs::read(&img).unwrap());
            std::fs::write(&iso, &bytes).unwrap();
            let mut sq = open_file(&iso, 6144).unwrap();
            assert_eq!(
                sq.lookup("LiveOS/rootfs.img").unwrap(),
                Some(Found::File),
                "{comp}"
            );
            assert_eq!(
                sq.lookup("LiveOS").unwrap(),
                Some(Found::Directory),
                "{comp}"
            );
            assert_eq!(sq.lookup("LiveOS/file-0699-").unwrap(), None, "{comp}");
            let last = format!("LiveOS/file-0699-{}", "x".repeat(699 % 40));
            assert_eq!(sq.lookup(&last).unwrap(), Some(Found::File), "{comp}");
            assert_eq!(sq.lookup("LiveOS/ext3fs.img").unwrap(), None, "{comp}");
            assert_eq!(sq.lookup("usr/lib/os-release").unwrap(), Some(Found::File));
            assert_eq!(sq.lookup("usr/lib/os-release/x").unwrap(), None);

            assert!(mksquashfs(&flat, &img, comp));
            let mut sq = open_file(&img, 0).unwrap();
            assert_eq!(sq.lookup("LiveOS/rootfs.img").unwrap(), None, "{comp}");
            assert_eq!(
                sq.lookup("LiveOS/rootfs.img.d").unwrap(),
                Some(Found::Directory),
                "{comp}"
            );
        }
        // LZO is left to unsquashfs.
        if mksquashfs(&nested, &img, "lzo") {
            assert!(matches!(open_file(&img, 0), Err(DirError::Compressor(_))));
        }
    }

    #[test]
    fn damaged_images_are_errors_not_loops() {
        if !have_mksquashfs() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let nested = tree(dir.path(), true);
        let img = dir.path().join("t.sqfs");
        assert!(mksquashfs(&nested, &img, "gzip"));
        let good = std::fs::read(&img).unwrap();
        let dir_table = u64_at(&good, 72) as usize;
        let inode_table = u64_at(&good, 64) as usize;
        // Every single-byte change in the metadata either still answers or is an
        // error: never a panic, never a hang.
        for at in (inode_table..good.len().min(dir_table + 4096)).step_by(97) {
            let mut bad = good.clone();
            bad[at] ^= 0x5a;
            let mut sq = open_bytes(&bad).unwrap();
            let _ = sq.lookup("LiveOS/rootfs.img");
        }
        let mut not = good.clone();
        not[0] = b'x';
        assert!(matches!(open_bytes(&not), Err(DirError::NotSquashfs)));
    }
}
