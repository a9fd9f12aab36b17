//! The extended attributes of every inode of an EROFS image, read in user space.
//!
//! `fsck.erofs --extract` of erofs-utils 1.5 (Debian 12) writes files, owners and
//! modes but no xattrs, so a root tree rebuilt from its output would lose every
//! SELinux label and file capability. This module walks the image's directory tree
//! itself and lists each path's xattrs, which the merge then sets on the extracted
//! tree (as root, or under fakeroot which records them for mkfs.erofs).
//!
//! Layout read (`erofs_fs.h`): the superblock at 1024 (block size, root nid,
//! `meta_blkaddr`, `xattr_blkaddr`); inodes at `meta_blkaddr * block + nid * 32`,
//! compact (32 bytes) or extended (64); an inode's xattr body right after it (a
//! 12-byte header with the shared-xattr count, 4-byte shared ids pointing into the
//! xattr area, then inline entries `name_len, name_index, value_size, name, value`,
//! each padded to 4 bytes); directory data in blocks of 12-byte dirents (`nid`,
//! `nameoff`, `file_type`) followed by their names, stored plain (`FLAT_PLAIN`) or
//! with the last partial block inline after the xattr body (`FLAT_INLINE`).
//! Directories stored any other way, and long xattr name prefixes (erofs-utils 1.7+),
//! are refused by name: nothing is guessed.

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom};

use super::superblock::{EROFS_MAGIC, ErofsError, SB_OFFSET, u16_at, u32_at, u64_at};

const S_IFMT: u16 = 0o170000;
const S_IFDIR: u16 = 0o040000;
const FLAT_PLAIN: u16 = 0;
const FLAT_INLINE: u16 = 2;
/// Directories bigger than this are refused as damaged (a root image's largest
/// directories hold some tens of thousands of entries).
const MAX_DIR_BYTES: u64 = 256 << 20;
const MAX_INODES: usize = 50_000_000;

/// One path (relative, no leading `/`; the root is empty) and its xattrs.
pub type PathXattrs = (Vec<u8>, Vec<(String, Vec<u8>)>);

fn bad(what: &str, detail: String) -> ErofsError {
    ErofsError::Format {
        what: what.to_string(),
        detail,
    }
}

fn prefix(index: u8) -> Option<&'static str> {
    Some(match index {
        1 => "user.",
        2 => "system.posix_acl_access",
        3 => "system.posix_acl_default",
        4 => "trusted.",
        5 => "lustre.",
        6 => "security.",
        _ => return None,
    })
}

struct Image<'a, R: Read + Seek> {
    r: &'a mut R,
    what: &'a str,
    block: u64,
    meta: u64,
    xattr_area: u64,
    /// The image's length: nothing may claim to lie beyond it.
    len: u64,
}

struct Inode {
    mode: u16,
    layout: u16,
    size: u64,
    raw_blkaddr: u64,
    /// Where the xattr body starts, and its length.
    xattr_at: u64,
    xattr_len: u64,
}

impl<R: Read + Seek> Image<'_, R> {
    fn read_at(&mut self, at: u64, buf: &mut [u8], what: &str) -> Result<(), ErofsError> {
        self.r
            .seek(SeekFrom::Start(at))
            .and_then(|_| self.r.read_exact(buf))
            .map_err(|e| bad(self.what, format!("{what} at byte {at}: {e}")))
    }

    fn inode(&mut self, nid: u64) -> Result<Inode, ErofsError> {
        let at = nid
            .checked_mul(32)
            .and_then(|o| o.checked_add(self.meta))
            .ok_or_else(|| bad(self.what, format!("inode number {nid} out of range")))?;
        let mut h = [0u8; 64];
        self.read_at(at, &mut h[..32], "an inode")?;
        let format = u16_at(&h, 0);
        let extended = format & 1 == 1;
        let layout = (format >> 1) & 0x7;
        let icount = u64::from(u16_at(&h, 2));
        let mode = u16_at(&h, 4);
        let (size, isize) = if extended {
            self.read_at(at + 32, &mut h[32..64], "an extended inode")?;
            (u64_at(&h, 8), 64)
        } else {
            (u64::from(u32_at(&h, 8)), 32)
        };
        Ok(Inode {
            mode,
            layout,
            size,
            raw_blkaddr: u64::from(u32_at(&h, 16)),
            xattr_at: at + isize,
            xattr_len: if icount == 0 {
                0
            } else {
                12 + (icount - 1) * 4
            },
        })
    }

    /// One xattr entry at `at`; returns it and its padded length.
    fn entry(
        &mut self,
        at: u64,
        limit: Option<u64>,
    ) -> Result<((String, Vec<u8>), u64), ErofsError> {
        let mut h = [0u8; 4];
        self.read_at(at, &mut h, "an xattr entry")?;
        let (name_len, index, value_len) = (h[0] as usize, h[1], u16_at(&h, 2) as usize);
        let total = (4 + name_len + value_len).div_ceil(4) as u64 * 4;
        if limit.is_some_and(|l| total > l) {
            return Err(bad(
                self.what,
                format!("an xattr entry at byte {at} runs past its inode's xattr body"),
            ));
        }
        let pre = prefix(index).ok_or_else(|| {
            bad(
                self.what,
                format!(
                    "xattr name index {index} at byte {at} (long name prefixes, from erofs-utils 1.7, are not read)"
                ),
            )
        })?;
        // name_len and value_len are at most 255 and 65535: the buffer stays small.
        let mut body = vec![0u8; name_len + value_len];
        self.read_at(at + 4, &mut body, "an xattr name and value")?;
        let name = format!("{pre}{}", String::from_utf8_lossy(&body[..name_len]));
        Ok(((name, body[name_len..].to_vec()), total))
    }

    fn xattrs(&mut self, ino: &Inode) -> Result<Vec<(String, Vec<u8>)>, ErofsError> {
        let mut out = Vec::new();
        if ino.xattr_len == 0 {
            return Ok(out);
        }
        let mut head = [0u8; 12];
        self.read_at(ino.xattr_at, &mut head, "an xattr body")?;
        let shared = u64::from(head[4]);
        let body_end = ino.xattr_at + ino.xattr_len;
        let mut at = ino.xattr_at + 12;
        if at + shared * 4 > body_end {
            return Err(bad(
                self.what,
                format!(
                    "{shared} shared xattrs do not fit the xattr body at byte {}",
                    ino.xattr_at
                ),
            ));
        }
        let mut ids = vec![0u8; (shared * 4) as usize];
        self.read_at(at, &mut ids, "shared xattr ids")?;
        at += shared * 4;
        for id in ids.chunks(4).map(|c| u64::from(u32_at(c, 0))) {
            let (e, _) = self.entry(self.xattr_area + id * 4, None)?;
            out.push(e);
        }
        while at + 4 <= body_end {
            let (e, len) = self.entry(at, Some(body_end - at))?;
            out.push(e);
            at += len;
        }
        Ok(out)
    }

    /// A directory's entries (without `.` and `..`): name, nid.
    fn dir_entries(&mut self, ino: &Inode, path: &[u8]) -> Result<Vec<(Vec<u8>, u64)>, ErofsError> {
        let show = || format!("/{}", String::from_utf8_lossy(path));
        if ino.size > MAX_DIR_BYTES || ino.size > self.len {
            return Err(bad(
                self.what,
                format!("directory {} claims {} bytes", show(), ino.size),
            ));
        }
        let mut data = vec![0u8; ino.size as usize];
        match ino.layout {
            FLAT_PLAIN => {
                self.read_at(ino.raw_blkaddr * self.block, &mut data, "directory data")?
            }
            FLAT_INLINE => {
                let full = (ino.size / self.block * self.block) as usize;
                self.read_at(
                    ino.raw_blkaddr * self.block,
                    &mut data[..full],
                    "directory data",
                )?;
                let tail_at = ino.xattr_at + ino.xattr_len;
                self.read_at(tail_at, &mut data[full..], "inline directory data")?;
            }
            other => {
                return Err(bad(
                    self.what,
                    format!(
                        "directory {} is stored with data layout {other} (compressed or chunked); only plain and inline directories are read",
                        show()
                    ),
                ));
            }
        }
        let mut out = Vec::new();
        for block in data.chunks(self.block as usize) {
            if block.len() < 12 {
                return Err(bad(
                    self.what,
                    format!("a directory block of {} in {}", block.len(), show()),
                ));
            }
            let first = u16_at(block, 8) as usize;
            if first < 12 || !first.is_multiple_of(12) || first > block.len() {
                return Err(bad(
                    self.what,
                    format!("dirent table of {first} bytes in {}", show()),
                ));
            }
            let n = first / 12;
            for i in 0..n {
                let nid = u64_at(block, i * 12);
                let start = u16_at(block, i * 12 + 8) as usize;
                let end = if i + 1 < n {
                    u16_at(block, (i + 1) * 12 + 8) as usize
                } else {
                    block.len()
                };
                if start < first || end < start || end > block.len() {
                    return Err(bad(self.what, format!("a name offset in {}", show())));
                }
                let mut name = &block[start..end];
                if i + 1 == n
                    && let Some(z) = name.iter().position(|&b| b == 0)
                {
                    name = &name[..z];
                }
                if name != b"." && name != b".." {
                    out.push((name.to_vec(), nid));
                }
            }
        }
        Ok(out)
    }
}

/// Every path with at least one xattr, in tree order (parents first).
pub fn read_xattrs<R: Read + Seek>(r: &mut R, what: &str) -> Result<Vec<PathXattrs>, ErofsError> {
    let mut sb = [0u8; 128];
    r.seek(SeekFrom::Start(SB_OFFSET))
        .and_then(|_| r.read_exact(&mut sb))
        .map_err(|_| ErofsError::NotErofs(what.to_string()))?;
    if u32_at(&sb, 0) != EROFS_MAGIC {
        return Err(ErofsError::NotErofs(what.to_string()));
    }
    let bits = u32::from(sb[12]);
    if !(9..=16).contains(&bits) {
        return Err(bad(what, format!("block size 2^{bits}")));
    }
    let block = 1u64 << bits;
    let len = r
        .seek(SeekFrom::End(0))
        .map_err(|e| bad(what, format!("its length: {e}")))?;
    let mut img = Image {
        r,
        what,
        len,
        block,
        meta: u64::from(u32_at(&sb, 40)) * block,
        xattr_area: u64::from(u32_at(&sb, 44)) * block,
    };
    let root = u64::from(u16_at(&sb, 14));
    let mut out = Vec::new();
    let mut seen_dirs = HashSet::new();
    let mut queue = std::collections::VecDeque::from([(Vec::new(), root)]);
    let mut inodes = 0usize;
    while let Some((path, nid)) = queue.pop_front() {
        inodes += 1;
        if inodes > MAX_INODES {
            return Err(bad(what, "more inodes than any root image holds".into()));
        }
        let ino = img.inode(nid)?;
        let x = img.xattrs(&ino)?;
        if !x.is_empty() {
            out.push((path.clone(), x));
        }
        if ino.mode & S_IFMT == S_IFDIR {
            if !seen_dirs.insert(nid) {
                return Err(bad(what, format!("directory loop at nid {nid}")));
            }
            for (name, child) in img.dir_entries(&ino, &path)? {
                let p = if path.is_empty() {
                    name
                } else {
                    [path.as_slice(), b"/", &name].concat()
                };
                queue.push_back((p, child));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(read_xattrs(&mut Cursor::new(vec![0u8; 100]), "x").is_err());
        let mut v = vec![0u8; 8192];
        v[1024..1028].copy_from_slice(&EROFS_MAGIC.to_le_bytes());
        v[1024 + 12] = 12;
        // Root nid 0 at meta block 0: an all-zero inode is an empty file; no xattrs.
        assert_eq!(
            read_xattrs(&mut Cursor::new(v.clone()), "x").unwrap(),
            vec![]
        );
        for seed in 0..300u32 {
            let mut w = v.clone();
            for (i, b) in w.iter_mut().enumerate().skip(1024 + 14) {
                *b = ((i as u32)
                    .wrapping_mul(2654435761)
                    .wrapping_add(seed.wrapping_mul(40503))
                    >> 11) as u8;
            }
            w[1024..1028].copy_from_slice(&EROFS_MAGIC.to_le_bytes());
            w[1024 + 12] = 12;
            let _ = read_xattrs(&mut Cursor::new(w), "x");
        }
    }
}
