//! squashfs images: the facts livestick needs (compressor and its options, block size,
//! xattrs) read from the superblock in Rust, root-image kind detection (squashfs, EROFS,
//! ext2/3/4), and the reference tools (`unsquashfs`, `mksquashfs`, `e2fsck`,
//! `mkfs.erofs`) run through [`run_tool`], which finds them in [`crate::tools`].

use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;
use std::process::Command;

use serde::Serialize;
use thiserror::Error;

use crate::bytes::{u16_at, u32_at, u64_at};
use crate::tools::{MKSQUASHFS, Tool, ToolMissing, UNSQUASHFS, find_program};

pub const SQUASHFS_MAGIC: u32 = 0x7371_7368; // "hsqs"
pub const EROFS_MAGIC: u32 = 0xE0F5_E1E2;
pub const EROFS_MAGIC_OFFSET: u64 = 1024;
const FLAG_COMPRESSOR_OPTIONS: u16 = 0x0400;
const NO_TABLE: u64 = u64::MAX;

#[derive(Debug, Error)]
pub enum SquashError {
    #[error("I/O error reading {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{0} is not a squashfs image (no \"hsqs\" magic)")]
    NotSquashfs(String),
    #[error("{what}: squashfs version {major}.{minor} is not supported (only 4.0)")]
    Version {
        what: String,
        major: u16,
        minor: u16,
    },
    #[error("{what}: unknown squashfs compressor id {id}")]
    UnknownCompressor { what: String, id: u16 },
    #[error(transparent)]
    ToolMissing(#[from] ToolMissing),
    #[error("`{command}` failed ({status}): {stderr}")]
    ToolFailed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("could not parse the output of `{command}`: {line:?}")]
    BadListing { command: String, line: String },
}

impl crate::error::Classify for SquashError {
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::Io
    }
}

/// squashfs compressors by their on-disk id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Compressor {
    Gzip,
    Lzma,
    Lzo,
    Xz,
    Lz4,
    Zstd,
}

impl Compressor {
    pub fn from_id(id: u16) -> Option<Compressor> {
        Some(match id {
            1 => Compressor::Gzip,
            2 => Compressor::Lzma,
            3 => Compressor::Lzo,
            4 => Compressor::Xz,
            5 => Compressor::Lz4,
            6 => Compressor::Zstd,
            _ => return None,
        })
    }

    /// The `-comp` argument of mksquashfs.
    pub fn name(self) -> &'static str {
        match self {
            Compressor::Gzip => "gzip",
            Compressor::Lzma => "lzma",
            Compressor::Lzo => "lzo",
            Compressor::Xz => "xz",
            Compressor::Lz4 => "lz4",
            Compressor::Zstd => "zstd",
        }
    }
}

/// What the superblock says about a squashfs image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SquashInfo {
    pub compressor: Compressor,
    #[serde(rename = "block_bytes")]
    pub block_size: u32,
    #[serde(rename = "used_bytes")]
    pub bytes_used: u64,
    pub inodes: u32,
    pub has_xattrs: bool,
    /// mksquashfs arguments that reproduce the compressor options stored in the image
    /// (e.g. `-Xbcj x86`, `-Xcompression-level 19`); empty when defaults were used.
    pub compressor_args: Vec<String>,
}

impl SquashInfo {
    /// The mksquashfs arguments that rebuild an image the way this one was built.
    pub fn mksquashfs_args(&self) -> Vec<String> {
        let mut a = vec![
            "-comp".to_string(),
            self.compressor.name().to_string(),
            "-b".to_string(),
            self.block_size.to_string(),
        ];
        a.extend(self.compressor_args.iter().cloned());
        a
    }
}

/// `tar2sqfs` arguments for a compressor and block size, with the stored compressor
/// options given as mksquashfs arguments (what [`SquashInfo::compressor_args`] holds)
/// translated to its `-X` list. The only option tar2sqfs 1.2 lacks, the arm64 BCJ
/// filter, is left out: the image still decompresses everywhere, a little larger.
pub fn tar2sqfs_args(c: Compressor, block_size: u32, mksquashfs_options: &[String]) -> Vec<String> {
    let mut a = vec![
        "-c".to_string(),
        c.name().to_string(),
        "-b".to_string(),
        block_size.to_string(),
    ];
    let mut extra: Vec<String> = Vec::new();
    let mut it = mksquashfs_options.iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "-Xdict-size" => extra.extend(it.next().map(|v| format!("dictsize={v}"))),
            "-Xcompression-level" => extra.extend(it.next().map(|v| format!("level={v}"))),
            "-Xbcj" => {
                if let Some(list) = it.next() {
                    extra.extend(
                        list.split(',')
                            .filter(|f| *f != "arm64")
                            .map(str::to_string),
                    );
                }
            }
            "-Xhc" => extra.push("hc".to_string()),
            _ => {}
        }
    }
    if !extra.is_empty() {
        a.push("-X".to_string());
        a.push(extra.join(","));
    }
    a
}

impl SquashInfo {
    /// The tar2sqfs arguments that rebuild an image the way this one was built.
    pub fn tar2sqfs_args(&self) -> Vec<String> {
        tar2sqfs_args(self.compressor, self.block_size, &self.compressor_args)
    }
}

/// Reads the squashfs 4.0 superblock (and the compressor options block after it).
pub fn read_superblock<R: Read + Seek>(r: &mut R, what: &str) -> Result<SquashInfo, SquashError> {
    let io = |source| SquashError::Io {
        what: what.to_string(),
        source,
    };
    let mut sb = [0u8; 96 + 2 + 16];
    r.seek(SeekFrom::Start(0)).map_err(io)?;
    let mut got = 0;
    while got < sb.len() {
        match r.read(&mut sb[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io(e)),
        }
    }
    if got < 96 || u32_at(&sb, 0) != SQUASHFS_MAGIC {
        return Err(SquashError::NotSquashfs(what.to_string()));
    }
    let (major, minor) = (u16_at(&sb, 28), u16_at(&sb, 30));
    if major != 4 {
        return Err(SquashError::Version {
            what: what.to_string(),
            major,
            minor,
        });
    }
    let id = u16_at(&sb, 20);
    let compressor = Compressor::from_id(id).ok_or(SquashError::UnknownCompressor {
        what: what.to_string(),
        id,
    })?;
    let flags = u16_at(&sb, 24);
    let mut compressor_args = Vec::new();
    if flags & FLAG_COMPRESSOR_OPTIONS != 0 && got >= 98 {
        // A metadata block: u16 header (bit 15 = stored uncompressed), then the options.
        let header = u16_at(&sb, 96);
        let len = usize::from(header & 0x7fff);
        if header & 0x8000 != 0 && got >= 98 + len {
            compressor_args = options_args(compressor, &sb[98..98 + len]);
        }
    }
    Ok(SquashInfo {
        compressor,
        block_size: u32_at(&sb, 12),
        bytes_used: u64_at(&sb, 40),
        inodes: u32_at(&sb, 4),
        has_xattrs: u64_at(&sb, 56) != NO_TABLE,
        compressor_args,
    })
}

/// Turns a stored compressor-options block back into mksquashfs arguments.
fn options_args(c: Compressor, o: &[u8]) -> Vec<String> {
    let mut a = Vec::new();
    match c {
        Compressor::Xz if o.len() >= 8 => {
            a.push("-Xdict-size".to_string());
            a.push(u32_at(o, 0).to_string());
            const FILTERS: [&str; 7] = [
                "x86", "powerpc", "ia64", "arm", "armthumb", "sparc", "arm64",
            ];
            let bits = u32_at(o, 4);
            let names: Vec<&str> = FILTERS
                .iter()
                .enumerate()
                .filter(|(i, _)| bits & (1 << i) != 0)
                .map(|(_, n)| *n)
                .collect();
            if !names.is_empty() {
                a.push("-Xbcj".to_string());
                a.push(names.join(","));
            }
        }
        Compressor::Zstd | Compressor::Gzip if o.len() >= 4 => {
            a.push("-Xcompression-level".to_string());
            a.push(u32_at(o, 0).to_string());
        }
        Compressor::Lz4 if o.len() >= 8 && u32_at(o, 4) & 1 != 0 => a.push("-Xhc".to_string()),
        _ => {}
    }
    a
}

/// The kind of a root filesystem image, by magic number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ImageKind {
    Squashfs(SquashInfo),
    /// Fedora 42+ kiwi spins ship an EROFS root.
    Erofs,
    /// ext2/3/4 (`rootfs.img`, `ext3fs.img`).
    Ext,
    Unknown,
}

/// Detects what an image holds from its magic numbers.
pub fn detect_image_kind<R: Read + Seek>(r: &mut R, what: &str) -> Result<ImageKind, SquashError> {
    let io = |source| SquashError::Io {
        what: what.to_string(),
        source,
    };
    let mut head = vec![0u8; 2048];
    r.seek(SeekFrom::Start(0)).map_err(io)?;
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io(e)),
        }
    }
    head.truncate(got);
    if got >= 4 && u32_at(&head, 0) == SQUASHFS_MAGIC {
        return Ok(ImageKind::Squashfs(read_superblock(r, what)?));
    }
    if got >= EROFS_MAGIC_OFFSET as usize + 4
        && u32_at(&head, EROFS_MAGIC_OFFSET as usize) == EROFS_MAGIC
    {
        return Ok(ImageKind::Erofs);
    }
    if crate::disk::ext4::image_has_magic(&head) {
        return Ok(ImageKind::Ext);
    }
    Ok(ImageKind::Unknown)
}

/// Runs a checked tool; `ok_codes` lists exit codes that mean success (e2fsck uses 1 and
/// 2 for "fixed"). Returns the exit code and stdout.
pub fn run_tool(
    tool: Tool,
    args: &[&std::ffi::OsStr],
    ok_codes: &[i32],
) -> Result<(i32, String), SquashError> {
    let exe = find_program(&tool)?;
    let command = std::iter::once(tool.name.to_string())
        .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let out = Command::new(&exe)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| SquashError::Io {
            what: exe.display().to_string(),
            source,
        })?;
    let code = out.status.code().unwrap_or(-1);
    if !(out.status.success() || ok_codes.contains(&code)) {
        let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if stderr.is_empty() {
            stderr = String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
        // Keep error messages readable: the tail says what went wrong.
        if stderr.len() > 2000 {
            stderr = stderr[stderr.len() - 2000..].to_string();
        }
        return Err(SquashError::ToolFailed {
            command,
            status: out.status.to_string(),
            stderr,
        });
    }
    Ok((code, String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// One regular file inside a squashfs image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SquashEntry {
    /// Path inside the image, without a leading `/`.
    pub path: String,
    pub size: u64,
    pub is_file: bool,
}

/// Lists an image with `unsquashfs -lls` (sizes included).
pub fn list(image: &Path) -> Result<Vec<SquashEntry>, SquashError> {
    list_at(image, 0)
}

/// `unsquashfs` arguments that read the image starting `offset` bytes into `file` (a
/// squashfs.img read in place on a stick).
fn offset_args(offset: u64) -> Vec<std::ffi::OsString> {
    if offset == 0 {
        Vec::new()
    } else {
        vec!["-o".into(), offset.to_string().into()]
    }
}

/// Lists the image that starts `offset` bytes into `file`.
pub fn list_at(file: &Path, offset: u64) -> Result<Vec<SquashEntry>, SquashError> {
    // A stick the command opened is read through its handle (`/proc/self/fd/N`).
    let file = &crate::disk::opened::tool_path(file);
    let off = offset_args(offset);
    let mut args: Vec<&std::ffi::OsStr> = off.iter().map(|a| a.as_os_str()).collect();
    args.extend([
        "-lls".as_ref(),
        "-d".as_ref(),
        "".as_ref(),
        file.as_os_str(),
    ]);
    let (_, out) = run_tool(UNSQUASHFS, &args, &[])?;
    let mut entries = Vec::new();
    for line in out.lines() {
        // `-rw-r--r-- root/root   6442450944 2024-04-14 12:00 /LiveOS/rootfs.img`
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 6
            || !fields[0].starts_with(['-', 'd', 'l', 'c', 'b', 'p', 's'])
            || !fields[1].contains('/')
        {
            continue;
        }
        let size = fields[2].parse::<u64>().ok();
        // Device nodes print "major,minor" instead of a size; they are not files we use.
        let Some(size) = size else { continue };
        let name_start = line
            .find(&format!(" {} ", fields[4]))
            .map(|i| i + fields[4].len() + 2)
            .ok_or_else(|| SquashError::BadListing {
                command: "unsquashfs -lls".to_string(),
                line: line.to_string(),
            })?;
        let mut path = line[name_start..].trim_start().to_string();
        if let Some((p, _)) = path.split_once(" -> ") {
            path = p.to_string();
        }
        let path = path.trim_start_matches('/').to_string();
        if path.is_empty() {
            continue;
        }
        entries.push(SquashEntry {
            path,
            size,
            is_file: fields[0].starts_with('-'),
        });
    }
    Ok(entries)
}

/// Extracts the whole image into `dest` (which must not exist yet).
pub fn extract(image: &Path, dest: &Path) -> Result<(), SquashError> {
    extract_at(image, 0, dest, &[])
}

/// Extracts the image that starts `offset` bytes into `file` into `dest` (which must
/// not exist yet): everything, or only the paths in `only`.
pub fn extract_at(file: &Path, offset: u64, dest: &Path, only: &[&str]) -> Result<(), SquashError> {
    let file = &crate::disk::opened::tool_path(file);
    let off = offset_args(offset);
    let mut args: Vec<&std::ffi::OsStr> = off.iter().map(|a| a.as_os_str()).collect();
    args.extend([
        "-no-progress".as_ref(),
        "-d".as_ref(),
        dest.as_os_str(),
        file.as_os_str(),
    ]);
    args.extend(only.iter().map(std::ffi::OsStr::new));
    run_tool(UNSQUASHFS, &args, &[])?;
    Ok(())
}

/// Builds `out` from the contents of `tree` (tree's children become the image root),
/// keeping xattrs, with the given compressor arguments.
pub fn build(tree: &Path, out: &Path, args: &[String]) -> Result<(), SquashError> {
    let mut a: Vec<&std::ffi::OsStr> = vec![
        tree.as_os_str(),
        out.as_os_str(),
        "-noappend".as_ref(),
        "-xattrs".as_ref(),
        "-no-progress".as_ref(),
    ];
    a.extend(args.iter().map(std::ffi::OsStr::new));
    run_tool(MKSQUASHFS, &a, &[])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn sb(comp: u16, opts: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; 4096];
        v[0..4].copy_from_slice(&SQUASHFS_MAGIC.to_le_bytes());
        v[12..16].copy_from_slice(&131072u32.to_le_bytes());
        v[20..22].copy_from_slice(&comp.to_le_bytes());
        v[28..30].copy_from_slice(&4u16.to_le_bytes());
        v[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
        if !opts.is_empty() {
            v[24..26].copy_from_slice(&FLAG_COMPRESSOR_OPTIONS.to_le_bytes());
            v[96..98].copy_from_slice(&(0x8000u16 | opts.len() as u16).to_le_bytes());
            v[98..98 + opts.len()].copy_from_slice(opts);
        }
        v
    }

    #[test]
    fn tar2sqfs_args_carry_the_stored_compressor_options() {
        let xz = |opts: &[&str]| {
            tar2sqfs_args(
                Compressor::Xz,
                1 << 20,
                &opts.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
        };
        assert_eq!(xz(&[]), ["-c", "xz", "-b", "1048576"]);
        assert_eq!(
            xz(&["-Xdict-size", "1048576", "-Xbcj", "x86,arm64"]),
            ["-c", "xz", "-b", "1048576", "-X", "dictsize=1048576,x86"]
        );
        assert_eq!(
            tar2sqfs_args(
                Compressor::Zstd,
                131072,
                &["-Xcompression-level".into(), "19".into()]
            ),
            ["-c", "zstd", "-b", "131072", "-X", "level=19"]
        );
        assert_eq!(
            tar2sqfs_args(Compressor::Lz4, 131072, &["-Xhc".into()]),
            ["-c", "lz4", "-b", "131072", "-X", "hc"]
        );
    }

    #[test]
    fn compressor_and_options_round_trip() {
        let mut xz = Vec::new();
        xz.extend(65536u32.to_le_bytes());
        xz.extend(1u32.to_le_bytes());
        let info = read_superblock(&mut Cursor::new(sb(4, &xz)), "t").unwrap();
        assert_eq!(info.compressor, Compressor::Xz);
        assert_eq!(
            info.mksquashfs_args(),
            [
                "-comp",
                "xz",
                "-b",
                "131072",
                "-Xdict-size",
                "65536",
                "-Xbcj",
                "x86"
            ]
        );
        assert!(!info.has_xattrs);
        let info = read_superblock(&mut Cursor::new(sb(6, &19u32.to_le_bytes())), "t").unwrap();
        assert_eq!(info.compressor_args, ["-Xcompression-level", "19"]);
        assert!(matches!(
            read_superblock(&mut Cursor::new(sb(9, &[])), "t"),
            Err(SquashError::UnknownCompressor { id: 9, .. })
        ));
        assert!(matches!(
            read_superblock(&mut Cursor::new(vec![0u8; 10]), "t"),
            Err(SquashError::NotSquashfs(_))
        ));
    }

    #[test]
    fn image_kinds_by_magic() {
        let mut erofs = vec![0u8; 4096];
        erofs[1024..1028].copy_from_slice(&EROFS_MAGIC.to_le_bytes());
        assert_eq!(
            detect_image_kind(&mut Cursor::new(erofs), "t").unwrap(),
            ImageKind::Erofs
        );
        let mut ext = vec![0u8; 4096];
        ext[1080..1082].copy_from_slice(&crate::disk::ext4::MAGIC.to_le_bytes());
        assert_eq!(
            detect_image_kind(&mut Cursor::new(ext), "t").unwrap(),
            ImageKind::Ext
        );
        assert_eq!(
            detect_image_kind(&mut Cursor::new(vec![1u8; 100]), "t").unwrap(),
            ImageKind::Unknown
        );
    }
}
