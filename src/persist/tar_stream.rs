//! A tar stream reader and writer: just what a root tree needs to travel between
//! `sqfs2tar` and `tar2sqfs` (squashfs-tools-ng) with owners, modes, times, device
//! numbers, hard links and xattrs intact, so that no process ever has to recreate the
//! tree on a host file system (which keeps owners and security xattrs only as root).
//!
//! Read: POSIX ustar, GNU (`ustar  \0` magic, `L`/`K` long names) and pax (`x` local
//! records: `path`, `linkpath`, `size`, `uid`, `gid`, `mtime`, `SCHILY.xattr.*`; `g`
//! global records are skipped), octal and base-256 numbers. GNU sparse members and
//! other types are refused by name rather than misread.
//! Written: POSIX ustar with a pax record set in front whenever a field does not fit
//! (long names, xattrs, large numbers), which `tar2sqfs` and GNU tar both read.
//!
//! Paths are bytes (a root image may hold names that are not UTF-8) and normalised:
//! no leading `./` or `/`, no trailing `/`; the root directory is the empty path.

use std::io::{self, Read, Write};

use thiserror::Error;

const BLOCK: usize = 512;

#[derive(Debug, Error)]
pub enum TarError {
    #[error("reading or writing the tar stream: {0}")]
    Io(#[from] io::Error),
    #[error("malformed tar stream at byte {offset}: {what}")]
    Format { offset: u64, what: String },
    #[error("{path}: tar member type {kind:?} is not supported ({why})")]
    Unsupported {
        path: String,
        kind: char,
        why: &'static str,
    },
}

impl crate::error::Classify for TarError {
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::Io
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    HardLink,
    Symlink,
    CharDev,
    BlockDev,
    Dir,
    Fifo,
}

impl EntryKind {
    fn flag(self) -> u8 {
        match self {
            EntryKind::File => b'0',
            EntryKind::HardLink => b'1',
            EntryKind::Symlink => b'2',
            EntryKind::CharDev => b'3',
            EntryKind::BlockDev => b'4',
            EntryKind::Dir => b'5',
            EntryKind::Fifo => b'6',
        }
    }
}

/// One member of the stream (its data, for a file, follows separately).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarEntry {
    pub path: Vec<u8>,
    pub kind: EntryKind,
    /// Permission bits with set-id and sticky (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: i64,
    /// Bytes of data (regular files only; 0 for everything else).
    pub size: u64,
    /// Symlink target, or the (normalised) path a hard link points to.
    pub link: Vec<u8>,
    pub dev: (u32, u32),
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl TarEntry {
    pub fn new(path: &[u8], kind: EntryKind) -> TarEntry {
        TarEntry {
            path: normalise(path),
            kind,
            mode: if kind == EntryKind::Dir { 0o755 } else { 0o644 },
            uid: 0,
            gid: 0,
            mtime: 0,
            size: 0,
            link: Vec::new(),
            dev: (0, 0),
            xattrs: Vec::new(),
        }
    }

    pub fn path_lossy(&self) -> String {
        String::from_utf8_lossy(&self.path).into_owned()
    }
}

/// `./etc/`, `/etc`, `etc/` → `etc`; `.`, `./`, `/` → empty (the root).
pub fn normalise(path: &[u8]) -> Vec<u8> {
    let mut p = path;
    loop {
        if let Some(rest) = p.strip_prefix(b"./") {
            p = rest;
        } else if let Some(rest) = p.strip_prefix(b"/") {
            p = rest;
        } else {
            break;
        }
    }
    while let Some(rest) = p.strip_suffix(b"/") {
        p = rest;
    }
    if p == b"." {
        p = b"";
    }
    p.to_vec()
}

// ---------------------------------------------------------------------------------
// Reading

/// Reads members one by one; the data of the current member is read with
/// [`TarReader::copy_data`] or skipped by the next [`TarReader::next_entry`].
pub struct TarReader<R: Read> {
    r: R,
    offset: u64,
    /// Data bytes of the current member not read yet.
    data_left: u64,
    /// Padding after the current member's data.
    pad_left: u64,
}

#[derive(Default)]
struct Pending {
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<i64>,
    xattrs: Vec<(String, Vec<u8>)>,
}

fn padding(n: u64) -> u64 {
    (BLOCK as u64 - n % BLOCK as u64) % BLOCK as u64
}

impl<R: Read> TarReader<R> {
    pub fn new(r: R) -> TarReader<R> {
        TarReader {
            r,
            offset: 0,
            data_left: 0,
            pad_left: 0,
        }
    }

    fn format(&self, what: impl Into<String>) -> TarError {
        TarError::Format {
            offset: self.offset,
            what: what.into(),
        }
    }

    fn skip(&mut self, mut n: u64) -> Result<(), TarError> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let want = n.min(buf.len() as u64) as usize;
            self.r
                .read_exact(&mut buf[..want])
                .map_err(|e| self.short(e))?;
            self.offset += want as u64;
            n -= want as u64;
        }
        Ok(())
    }

    fn short(&self, e: io::Error) -> TarError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            self.format("the stream ends inside a member")
        } else {
            TarError::Io(e)
        }
    }

    /// Reads a whole block; `None` at a clean end of the stream.
    fn block(&mut self) -> Result<Option<[u8; BLOCK]>, TarError> {
        let mut b = [0u8; BLOCK];
        let mut got = 0;
        while got < BLOCK {
            match self.r.read(&mut b[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(self.format("the stream ends inside a header")),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.offset += BLOCK as u64;
        Ok(Some(b))
    }

    /// Reads an extension member's payload (bounded: these are names and records).
    fn payload(&mut self, size: u64) -> Result<Vec<u8>, TarError> {
        if size > 64 << 20 {
            return Err(self.format(format!("an extension header of {size} bytes")));
        }
        let mut v = vec![0u8; size as usize];
        self.r.read_exact(&mut v).map_err(|e| self.short(e))?;
        self.offset += size;
        self.skip(padding(size))?;
        Ok(v)
    }

    /// The next member, or `None` at the end of the archive.
    pub fn next_entry(&mut self) -> Result<Option<TarEntry>, TarError> {
        self.skip(self.data_left + self.pad_left)?;
        self.data_left = 0;
        self.pad_left = 0;
        let mut pending = Pending::default();
        loop {
            let Some(h) = self.block()? else {
                return Ok(None);
            };
            if h.iter().all(|&b| b == 0) {
                return Ok(None);
            }
            self.check_sum(&h)?;
            let flag = h[156];
            let size = self.number(&h[124..136], "size")?;
            match flag {
                b'x' => {
                    let records = self.payload(size)?;
                    self.pax(&records, &mut pending)?;
                }
                b'g' => {
                    self.payload(size)?;
                }
                b'L' => pending.path = Some(cstr(&self.payload(size)?).to_vec()),
                b'K' => pending.link = Some(cstr(&self.payload(size)?).to_vec()),
                _ => return self.member(&h, flag, size, pending).map(Some),
            }
        }
    }

    fn member(
        &mut self,
        h: &[u8; BLOCK],
        flag: u8,
        size: u64,
        p: Pending,
    ) -> Result<TarEntry, TarError> {
        let posix = &h[257..263] == b"ustar\0";
        let path = match p.path {
            Some(path) => path,
            None => {
                let name = cstr(&h[0..100]);
                let prefix = cstr(&h[345..500]);
                if posix && !prefix.is_empty() {
                    [prefix, b"/", name].concat()
                } else {
                    name.to_vec()
                }
            }
        };
        let kind = match flag {
            b'0' | 0 | b'7' => EntryKind::File,
            b'1' => EntryKind::HardLink,
            b'2' => EntryKind::Symlink,
            b'3' => EntryKind::CharDev,
            b'4' => EntryKind::BlockDev,
            b'5' => EntryKind::Dir,
            b'6' => EntryKind::Fifo,
            other => {
                return Err(TarError::Unsupported {
                    path: String::from_utf8_lossy(&path).into_owned(),
                    kind: other as char,
                    why: match other {
                        b'S' => "GNU sparse file",
                        b'M' | b'V' => "GNU multi-volume member",
                        _ => "unknown member type",
                    },
                });
            }
        };
        let size = p.size.unwrap_or(size);
        let link = p.link.unwrap_or_else(|| cstr(&h[157..257]).to_vec());
        let entry = TarEntry {
            kind,
            mode: (self.number(&h[100..108], "mode")? & 0o7777) as u32,
            uid: match p.uid {
                Some(v) => v,
                None => self.number(&h[108..116], "uid")?,
            },
            gid: match p.gid {
                Some(v) => v,
                None => self.number(&h[116..124], "gid")?,
            },
            mtime: match p.mtime {
                Some(v) => v,
                None => self.signed(&h[136..148], "mtime")?,
            },
            size: if kind == EntryKind::File { size } else { 0 },
            link: if kind == EntryKind::HardLink {
                normalise(&link)
            } else {
                link
            },
            dev: if matches!(kind, EntryKind::CharDev | EntryKind::BlockDev) {
                (
                    self.number(&h[329..337], "devmajor")? as u32,
                    self.number(&h[337..345], "devminor")? as u32,
                )
            } else {
                (0, 0)
            },
            xattrs: p.xattrs,
            path: normalise(&path),
        };
        // Only regular files carry data (a hard link's size field is 0 or ignored).
        self.data_left = entry.size;
        self.pad_left = padding(entry.size);
        Ok(entry)
    }

    fn check_sum(&self, h: &[u8; BLOCK]) -> Result<(), TarError> {
        let stored = self.number(&h[148..156], "checksum")?;
        let mut unsigned = 0u64;
        let mut signed = 0i64;
        for (i, &b) in h.iter().enumerate() {
            let b = if (148..156).contains(&i) { b' ' } else { b };
            unsigned += u64::from(b);
            signed += i64::from(b as i8);
        }
        if stored != unsigned && stored as i64 != signed {
            return Err(self.format(format!(
                "header checksum {stored:o} does not match the header ({unsigned:o}); not a tar stream or a damaged one"
            )));
        }
        Ok(())
    }

    fn signed(&self, field: &[u8], what: &str) -> Result<i64, TarError> {
        if field.first().is_some_and(|&b| b == 0xff) {
            // Base-256 two's complement (negative times).
            let mut v: i64 = -1;
            for &b in &field[1..] {
                v = (v << 8) | i64::from(b);
            }
            return Ok(v);
        }
        self.number(field, what).map(|v| v as i64)
    }

    fn number(&self, field: &[u8], what: &str) -> Result<u64, TarError> {
        if field.first().is_some_and(|&b| b & 0x80 != 0) {
            let mut v: u64 = u64::from(field[0] & 0x7f);
            for &b in &field[1..] {
                v = v
                    .checked_mul(256)
                    .and_then(|v| v.checked_add(u64::from(b)))
                    .ok_or_else(|| self.format(format!("{what} does not fit in 64 bits")))?;
            }
            return Ok(v);
        }
        let text = field
            .iter()
            .copied()
            .skip_while(|&b| b == b' ')
            .take_while(|&b| b != 0 && b != b' ')
            .collect::<Vec<u8>>();
        if text.is_empty() {
            return Ok(0);
        }
        let s = std::str::from_utf8(&text).map_err(|_| self.format(format!("{what} field")))?;
        u64::from_str_radix(s, 8).map_err(|_| self.format(format!("{what} field {s:?}")))
    }

    fn pax(&self, mut records: &[u8], p: &mut Pending) -> Result<(), TarError> {
        while !records.is_empty() {
            let space = records
                .iter()
                .position(|&b| b == b' ')
                .ok_or_else(|| self.format("a pax record without a length"))?;
            let len: usize = std::str::from_utf8(&records[..space])
                .ok()
                .and_then(|s| s.parse().ok())
                .filter(|&l| l > space + 1 && l <= records.len())
                .ok_or_else(|| self.format("a pax record length"))?;
            let record = &records[space + 1..len];
            let record = record.strip_suffix(b"\n").unwrap_or(record);
            let eq = record
                .iter()
                .position(|&b| b == b'=')
                .ok_or_else(|| self.format("a pax record without '='"))?;
            let (key, value) = (&record[..eq], &record[eq + 1..]);
            let num = |v: &[u8]| -> Result<u64, TarError> {
                std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| self.format("a pax number"))
            };
            match key {
                b"path" => p.path = Some(value.to_vec()),
                b"linkpath" => p.link = Some(value.to_vec()),
                b"size" => p.size = Some(num(value)?),
                b"uid" => p.uid = Some(num(value)?),
                b"gid" => p.gid = Some(num(value)?),
                b"mtime" => {
                    // Seconds with an optional fraction; image times keep seconds.
                    let whole = value.split(|&b| b == b'.').next().unwrap_or(value);
                    let t = std::str::from_utf8(whole)
                        .ok()
                        .and_then(|s| s.parse::<i64>().ok())
                        .ok_or_else(|| self.format("a pax mtime"))?;
                    p.mtime = Some(t);
                }
                k if k.starts_with(b"SCHILY.xattr.") => {
                    let name = String::from_utf8_lossy(&k[b"SCHILY.xattr.".len()..]).into_owned();
                    p.xattrs.push((name, value.to_vec()));
                }
                _ => {}
            }
            records = &records[len..];
        }
        Ok(())
    }

    /// The current member's data as a reader (ends with the data).
    pub fn data(&mut self) -> DataReader<'_, R> {
        DataReader { tar: self }
    }

    /// Copies the current member's data to `w`; returns the bytes copied.
    pub fn copy_data(&mut self, w: &mut dyn Write) -> Result<u64, TarError> {
        let copied = io::copy(&mut self.data(), w);
        copied.map_err(|e| self.short(e))
    }
}

/// The data of a [`TarReader`]'s current member.
pub struct DataReader<'a, R: Read> {
    tar: &'a mut TarReader<R>,
}

impl<R: Read> Read for DataReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let t = &mut *self.tar;
        if t.data_left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let want = t.data_left.min(buf.len() as u64) as usize;
        let n = t.r.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the tar stream ends inside a member (byte {})", t.offset),
            ));
        }
        t.offset += n as u64;
        t.data_left -= n as u64;
        Ok(n)
    }
}

fn cstr(b: &[u8]) -> &[u8] {
    match b.iter().position(|&c| c == 0) {
        Some(n) => &b[..n],
        None => b,
    }
}

// ---------------------------------------------------------------------------------
// Writing

pub struct TarWriter<W: Write> {
    w: W,
}

const MAX_OCTAL_8: u64 = 0o7777777;
const MAX_OCTAL_12: u64 = 0o77777777777;

fn octal(field: &mut [u8], v: u64) {
    let digits = field.len() - 1;
    let s = format!("{v:0digits$o}");
    field[..digits].copy_from_slice(&s.as_bytes()[s.len() - digits..]);
    field[digits] = 0;
}

fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    // The length counts its own digits: grow until it is consistent.
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while body + len.to_string().len() != len {
        len = body + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

impl<W: Write> TarWriter<W> {
    pub fn new(w: W) -> TarWriter<W> {
        TarWriter { w }
    }

    /// Writes one member; `data` must yield exactly `e.size` bytes for a file.
    pub fn append(&mut self, e: &TarEntry, data: Option<&mut dyn Read>) -> Result<(), TarError> {
        let name: Vec<u8> = if e.path.is_empty() {
            b"./".to_vec()
        } else {
            [b"./".as_slice(), &e.path].concat()
        };
        let link: Vec<u8> = if e.kind == EntryKind::HardLink {
            [b"./".as_slice(), &e.link].concat()
        } else {
            e.link.clone()
        };
        let size = if e.kind == EntryKind::File { e.size } else { 0 };
        if matches!(e.kind, EntryKind::CharDev | EntryKind::BlockDev)
            && (u64::from(e.dev.0) > MAX_OCTAL_8 || u64::from(e.dev.1) > MAX_OCTAL_8)
        {
            return Err(TarError::Format {
                offset: 0,
                what: format!(
                    "{}: device number {}:{} does not fit a tar header",
                    e.path_lossy(),
                    e.dev.0,
                    e.dev.1
                ),
            });
        }
        let mut pax = Vec::new();
        // A NUL would end the name in a header field: such names go in pax records.
        if name.len() > 100 || name.contains(&0) {
            pax_record(&mut pax, b"path", &name);
        }
        if link.len() > 100 || link.contains(&0) {
            pax_record(&mut pax, b"linkpath", &link);
        }
        if size > MAX_OCTAL_12 {
            pax_record(&mut pax, b"size", size.to_string().as_bytes());
        }
        if e.uid > MAX_OCTAL_8 {
            pax_record(&mut pax, b"uid", e.uid.to_string().as_bytes());
        }
        if e.gid > MAX_OCTAL_8 {
            pax_record(&mut pax, b"gid", e.gid.to_string().as_bytes());
        }
        if e.mtime < 0 || e.mtime as u64 > MAX_OCTAL_12 {
            pax_record(&mut pax, b"mtime", e.mtime.to_string().as_bytes());
        }
        for (k, v) in &e.xattrs {
            pax_record(&mut pax, format!("SCHILY.xattr.{k}").as_bytes(), v);
        }
        if !pax.is_empty() {
            let mut h = header(b"./PaxHeaders/entry", b'x', pax.len() as u64);
            seal(&mut h);
            self.w.write_all(&h)?;
            self.w.write_all(&pax)?;
            self.w
                .write_all(&[0u8; BLOCK][..padding(pax.len() as u64) as usize])?;
        }
        let mut h = header(
            &name[..name.len().min(100)],
            e.kind.flag(),
            size.min(MAX_OCTAL_12),
        );
        octal(&mut h[100..108], u64::from(e.mode & 0o7777));
        octal(&mut h[108..116], e.uid.min(MAX_OCTAL_8));
        octal(&mut h[116..124], e.gid.min(MAX_OCTAL_8));
        octal(
            &mut h[136..148],
            e.mtime.clamp(0, MAX_OCTAL_12 as i64) as u64,
        );
        let l = &link[..link.len().min(100)];
        h[157..157 + l.len()].copy_from_slice(l);
        if matches!(e.kind, EntryKind::CharDev | EntryKind::BlockDev) {
            octal(&mut h[329..337], u64::from(e.dev.0));
            octal(&mut h[337..345], u64::from(e.dev.1));
        }
        seal(&mut h);
        self.w.write_all(&h)?;
        if size > 0 {
            let data = data.ok_or_else(|| TarError::Format {
                offset: 0,
                what: format!("{}: no data given for {size} bytes", e.path_lossy()),
            })?;
            let copied = io::copy(&mut data.take(size), &mut self.w)?;
            if copied != size {
                return Err(TarError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "{}: {copied} bytes of data where the header says {size}",
                        e.path_lossy()
                    ),
                )));
            }
            self.w.write_all(&[0u8; BLOCK][..padding(size) as usize])?;
        }
        Ok(())
    }

    /// Ends the archive (two zero blocks) and hands back the writer.
    pub fn finish(mut self) -> Result<W, TarError> {
        self.w.write_all(&[0u8; 2 * BLOCK])?;
        self.w.flush()?;
        Ok(self.w)
    }
}

fn header(name: &[u8], flag: u8, size: u64) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    h[..name.len()].copy_from_slice(name);
    octal(&mut h[100..108], 0o644);
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], 0);
    h[156] = flag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h
}

fn seal(h: &mut [u8; BLOCK]) {
    h[148..156].copy_from_slice(b"        ");
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(bytes: &[u8]) -> Vec<(TarEntry, Vec<u8>)> {
        let mut r = TarReader::new(bytes);
        let mut out = Vec::new();
        while let Some(e) = r.next_entry().unwrap() {
            let mut data = Vec::new();
            r.copy_data(&mut data).unwrap();
            out.push((e, data));
        }
        out
    }

    #[test]
    fn normalises_paths() {
        assert_eq!(normalise(b"./etc/"), b"etc");
        assert_eq!(normalise(b"/etc/x"), b"etc/x");
        assert_eq!(normalise(b"./"), b"");
        assert_eq!(normalise(b"."), b"");
        assert_eq!(normalise(b"a/b"), b"a/b");
    }

    #[test]
    fn pax_record_lengths_count_themselves() {
        for n in [0usize, 1, 5, 90, 95, 96, 97, 990, 995, 9990] {
            let mut out = Vec::new();
            pax_record(&mut out, b"path", &vec![b'a'; n]);
            let space = out.iter().position(|&b| b == b' ').unwrap();
            let len: usize = std::str::from_utf8(&out[..space]).unwrap().parse().unwrap();
            assert_eq!(len, out.len(), "value of {n} bytes");
        }
    }

    #[test]
    fn round_trips_every_kind_long_names_big_ids_and_xattrs() {
        let long = [b"d/".as_slice(), &[b'n'; 150]].concat();
        let mut entries = vec![
            TarEntry::new(b"", EntryKind::Dir),
            TarEntry::new(b"d", EntryKind::Dir),
            TarEntry {
                size: 5,
                uid: 70000000,
                gid: 3,
                mtime: -5,
                mode: 0o4755,
                xattrs: vec![
                    (
                        "security.selinux".into(),
                        b"system_u:object_r:bin_t:s0\0".to_vec(),
                    ),
                    (
                        "security.capability".into(),
                        vec![1, 0, 0, 2, 0x20, 0, b'\n', b'='],
                    ),
                ],
                ..TarEntry::new(&long, EntryKind::File)
            },
            TarEntry {
                link: long.clone(),
                ..TarEntry::new(b"d/hard", EntryKind::HardLink)
            },
            TarEntry {
                link: vec![b'x'; 200],
                ..TarEntry::new(b"d/sym", EntryKind::Symlink)
            },
            TarEntry {
                dev: (1, 3),
                ..TarEntry::new(b"d/null", EntryKind::CharDev)
            },
            TarEntry {
                dev: (8, 1),
                ..TarEntry::new(b"d/sda1", EntryKind::BlockDev)
            },
            TarEntry::new(b"d/fifo", EntryKind::Fifo),
            TarEntry::new(b"d/\xff\xfe", EntryKind::File),
        ];
        entries[1].mtime = 1_700_000_000;
        let mut w = TarWriter::new(Vec::new());
        for e in &entries {
            let mut data: &[u8] = if e.size > 0 { b"hello" } else { b"" };
            w.append(e, Some(&mut data)).unwrap();
        }
        let bytes = w.finish().unwrap();
        let back = read_all(&bytes);
        assert_eq!(back.len(), entries.len());
        for ((got, data), want) in back.iter().zip(&entries) {
            assert_eq!(got, want);
            assert_eq!(data.len() as u64, want.size);
        }
        assert_eq!(back[2].1, b"hello");
    }

    #[test]
    fn short_data_is_an_error_not_a_short_member() {
        let mut w = TarWriter::new(Vec::new());
        let e = TarEntry {
            size: 10,
            ..TarEntry::new(b"f", EntryKind::File)
        };
        let mut data: &[u8] = b"abc";
        assert!(w.append(&e, Some(&mut data)).is_err());
    }

    #[test]
    fn damaged_streams_are_errors_not_panics() {
        let mut w = TarWriter::new(Vec::new());
        let e = TarEntry {
            size: 600,
            ..TarEntry::new(b"f", EntryKind::File)
        };
        let data = vec![7u8; 600];
        w.append(&e, Some(&mut data.as_slice())).unwrap();
        let bytes = w.finish().unwrap();
        // A flipped header byte breaks the checksum.
        let mut bad = bytes.clone();
        bad[10] ^= 1;
        assert!(matches!(
            TarReader::new(bad.as_slice()).next_entry(),
            Err(TarError::Format { .. })
        ));
        // Truncated inside the data.
        let mut r = TarReader::new(&bytes[..700]);
        r.next_entry().unwrap();
        assert!(r.copy_data(&mut Vec::new()).is_err());
        // Truncated inside a header.
        assert!(TarReader::new(&bytes[..100]).next_entry().is_err());
        // An unknown member type is refused by name.
        let mut sparse = bytes.clone();
        sparse[156] = b'S';
        seal((&mut sparse[..512]).try_into().unwrap());
        assert!(matches!(
            TarReader::new(sparse.as_slice()).next_entry(),
            Err(TarError::Unsupported { kind: 'S', .. })
        ));
        // Random bytes never panic.
        for seed in 0..200u32 {
            let noise: Vec<u8> = (0..2048u32)
                .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed * 7919) >> 13) as u8)
                .collect();
            let mut r = TarReader::new(noise.as_slice());
            while let Ok(Some(_)) = r.next_entry() {}
        }
    }
}
