//! ext4 images through e2fsprogs, the reference implementation.
//!
//! No Rust crate formats ext4, so this is the one module that runs
//! `mke2fs`, `e2fsck`, `resize2fs` and `dumpe2fs`, always on regular files
//! (no root, no loop device). It also parses the ext4 superblock itself, so
//! `home info` can describe a filesystem seen only through a decrypting
//! reader, where no file exists for `dumpe2fs` to open.

use std::fs::OpenOptions;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Errors from creating, checking, resizing or inspecting an ext4 image.
#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    #[error(
        "`{tool}` is not installed; install the package `e2fsprogs` (Debian/Ubuntu: apt install e2fsprogs, Fedora: dnf install e2fsprogs)"
    )]
    NotInstalled { tool: &'static str },
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

/// Find an e2fsprogs tool on PATH or in the sbin directories, which an
/// ordinary user's PATH often lacks on Debian.
pub fn find_tool(tool: &'static str) -> Result<PathBuf, Ext4Error> {
    crate::tools::find_program(tool).ok_or(Ext4Error::NotInstalled { tool })
}

fn run(tool: &'static str, args: &[&std::ffi::OsStr], path: &Path) -> Result<String, Ext4Error> {
    let exe = find_tool(tool)?;
    let out = Command::new(&exe)
        .args(args)
        // Stable, parseable output whatever the user's locale.
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| Ext4Error::Io {
            path: exe.clone(),
            source,
        })?;
    // e2fsck -p exits 1 when it fixed something, which is a success here.
    let ok = out.status.success() || (tool == "e2fsck" && out.status.code() == Some(1));
    if !ok {
        return Err(Ext4Error::Failed {
            tool,
            path: path.to_path_buf(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Ext4Error + '_ {
    move |source| Ext4Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Create (or overwrite) the regular file `path` as an ext4 image of exactly
/// `size` bytes labelled `label`.
///
/// Inode tables and the journal are initialised now
/// (`lazy_itable_init=0,lazy_journal_init=0`): otherwise the kernel finishes
/// that work on first mount, writing hundreds of MiB through the live
/// system's overlay. The root directory belongs to root whoever runs us.
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
    find_tool("mke2fs")?;
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(io_err(path))?;
    // A sparse file of the final size: mke2fs writes only metadata.
    f.set_len(size).map_err(io_err(path))?;
    drop(f);

    let mut args: Vec<std::ffi::OsString> = vec![
        "-q".into(),
        "-F".into(),
        "-t".into(),
        "ext4".into(),
        "-L".into(),
        label.into(),
        "-E".into(),
        "lazy_itable_init=0,lazy_journal_init=0,nodiscard,root_owner=0:0".into(),
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
    if !opts.features.is_empty() {
        args.extend(["-O".into(), opts.features.join(",").into()]);
    }
    if let Some(d) = &opts.root_dir {
        args.extend(["-d".into(), d.as_os_str().to_owned()]);
    }
    args.push(path.as_os_str().to_owned());
    args.push(format!("{}k", size / 1024).into());
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    run("mke2fs", &refs, path)?;
    Ok(())
}

/// Check the filesystem in `path` (`e2fsck -f -p`), as resize2fs requires.
pub fn check_ext4_image(path: &Path) -> Result<(), Ext4Error> {
    run(
        "e2fsck",
        &["-f".as_ref(), "-p".as_ref(), path.as_os_str()],
        path,
    )?;
    Ok(())
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
    find_tool("resize2fs")?;
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    let len = f.metadata().map_err(io_err(path))?.len();
    if len < new_size {
        f.set_len(new_size).map_err(io_err(path))?;
    }
    drop(f);
    check_ext4_image(path)?;
    let size_arg = format!("{}K", new_size / 1024);
    run("resize2fs", &[path.as_os_str(), size_arg.as_ref()], path)?;
    Ok(())
}

/// What `home info` reports about an ext4 filesystem.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Ext4Info {
    pub label: String,
    pub uuid: String,
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
        if sb.len() < 1024 {
            return Err(Ext4Error::NotExt4("superblock is cut short".into()));
        }
        let u32_at =
            |o: usize| u64::from(u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]));
        let magic = u16::from_le_bytes([sb[0x38], sb[0x39]]);
        if magic != 0xEF53 {
            return Err(Ext4Error::NotExt4(format!(
                "superblock magic is {magic:#06x}, not 0xef53"
            )));
        }
        let log = u32_at(0x18);
        if log > 6 {
            return Err(Ext4Error::NotExt4(format!("block size 2^{} KiB", log)));
        }
        // The high halves of the counters only mean something with the 64bit feature.
        let is64 = u32_at(0x60) & 0x80 != 0;
        let wide = |lo: usize, hi: usize| u32_at(lo) | if is64 { u32_at(hi) << 32 } else { 0 };
        let label_raw = &sb[0x78..0x88];
        let end = label_raw.iter().position(|&b| b == 0).unwrap_or(16);
        let uuid = uuid::Uuid::from_slice(&sb[0x68..0x78])
            .map(|u| u.hyphenated().to_string())
            .unwrap_or_default();
        Ok(Ext4Info {
            label: String::from_utf8_lossy(&label_raw[..end]).into_owned(),
            uuid,
            block_size: 1024 << log,
            block_count: wide(0x04, 0x150),
            reserved_blocks: wide(0x08, 0x154),
            free_blocks: wide(0x0C, 0x158),
            size_bytes: 0,
            used_bytes: 0,
        }
        .finish())
    }

    /// Read the superblock from any reader positioned over an ext4 image.
    pub fn read_from<R: Read + Seek>(r: &mut R) -> Result<Ext4Info, Ext4Error> {
        let mut sb = vec![0u8; 1024];
        let path = PathBuf::from("<image>");
        r.seek(SeekFrom::Start(1024)).map_err(io_err(&path))?;
        r.read_exact(&mut sb).map_err(io_err(&path))?;
        Ext4Info::from_superblock(&sb)
    }
}

/// Describe the ext4 filesystem in the regular file `path` with `dumpe2fs -h`.
pub fn ext4_info(path: &Path) -> Result<Ext4Info, Ext4Error> {
    let out = run("dumpe2fs", &["-h".as_ref(), path.as_os_str()], path)?;
    parse_dumpe2fs(&out)
}

fn parse_dumpe2fs(out: &str) -> Result<Ext4Info, Ext4Error> {
    let field = |name: &str| -> Option<&str> {
        out.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
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
    fn superblock_magic_checked() {
        assert!(matches!(
            Ext4Info::from_superblock(&[0u8; 1024]),
            Err(Ext4Error::NotExt4(_))
        ));
    }
}
