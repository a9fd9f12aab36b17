//! EROFS root images (Fedora 42+ kiwi spins ship `LiveOS/squashfs.img` as EROFS): the
//! superblock facts a rebuild needs, read in Rust, and the erofs-utils tools
//! (`fsck.erofs --extract`, `mkfs.erofs`) behind one place that says what the
//! installed version can and cannot do.
//!
//! Two limits of older erofs-utils matter for a merge and are probed at run time
//! rather than guessed from version numbers:
//! - the compressors `mkfs.erofs` was built with (`--help` lists them): when the
//!   source's algorithm is missing, the rebuild uses another one and says so;
//! - whether `fsck.erofs --extract` restores extended attributes: when it does not,
//!   a merge would silently drop SELinux labels and file capabilities, so it is
//!   refused unless the caller accepts that loss explicitly.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

use crate::persist::host_xattr::{get_xattr, set_xattr};
use crate::squash;
use crate::tools::{FSCK_EROFS, MKFS_EROFS, Tool, find_program};

pub mod superblock;
pub mod xattr;

use superblock::io_err;
// The types this module's functions name, so that a caller needs no child module;
// reading a superblock is `superblock::read_superblock`.
pub use superblock::{ErofsError, ErofsInfo};

/// The compressors the installed mkfs.erofs offers (`Available compressors are: …`).
pub fn available_compressors() -> Result<Vec<String>, ErofsError> {
    help_list(MKFS_EROFS, "Available compressors are:")
}

/// The comma-separated list after `prefix` in a tool's `--help`.
fn help_list(tool: Tool, prefix: &str) -> Result<Vec<String>, ErofsError> {
    let exe = find_program(&tool)?;
    let out = Command::new(&exe)
        .arg("--help")
        .env("LC_ALL", "C")
        .output()
        .map_err(io_err(&exe))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text
        .lines()
        .find_map(|l| l.trim().strip_prefix(prefix))
        .map(|l| {
            l.split(',')
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty())
                .collect()
        })
        .unwrap_or_default())
}

/// The `mkfs.erofs` arguments that rebuild an image like `info`, and a note when the
/// source's compression cannot be kept.
pub fn mkfs_args(info: &ErofsInfo, available: &[String]) -> (Vec<String>, Option<String>) {
    let has = |c: &str| available.iter().any(|a| a == c);
    let mut args = vec![format!("-U{}", info.uuid)];
    let Some(&alg) = info.algorithms.first() else {
        return (args, None);
    };
    // lz4hc writes the same format as lz4 (same decompressor) and compresses better.
    let want: &[&str] = match alg {
        "lz4" => &["lz4hc", "lz4"],
        other => &[other],
    };
    if let Some(c) = want.iter().find(|c| has(c)) {
        args.push(format!("-z{c}"));
        return (args, None);
    }
    let fallback = ["lz4hc", "lz4"].into_iter().find(|c| has(c));
    let note = match fallback {
        Some(c) => {
            args.push(format!("-z{c}"));
            format!(
                "the image used {alg}, which this mkfs.erofs cannot write (it offers {}): the new image uses {c}, readable by every EROFS kernel but larger",
                available.join(", ")
            )
        }
        None => format!(
            "the image used {alg}, which this mkfs.erofs cannot write: the new image is uncompressed"
        ),
    };
    (args, Some(note))
}

/// The algorithms the installed fsck.erofs decompresses (`--help` lists them).
pub fn fsck_algorithms() -> Result<Vec<String>, ErofsError> {
    help_list(FSCK_EROFS, "Supported algorithms are:")
}

/// Refuses an image fsck.erofs could not extract: one of its algorithms is missing
/// from `supported` (lz4hc data is plain lz4 to a decompressor).
pub fn check_extractable(info: &ErofsInfo, supported: &[String]) -> Result<(), ErofsError> {
    if decompressible(info, supported) {
        return Ok(());
    }
    refuse_undecompressible(info, supported, &fsck_version())
}

/// Whether every algorithm of the image is in `supported`.
pub fn decompressible(info: &ErofsInfo, supported: &[String]) -> bool {
    info.algorithms.iter().all(|alg| {
        supported
            .iter()
            .any(|s| s == alg || (*alg == "lz4" && s == "lz4hc"))
    })
}

/// [`check_extractable`] with the fsck.erofs version given, so a plan can decide
/// without running the tool.
pub fn refuse_undecompressible(
    info: &ErofsInfo,
    supported: &[String],
    version: &str,
) -> Result<(), ErofsError> {
    for alg in &info.algorithms {
        let ok = supported
            .iter()
            .any(|s| s == alg || (*alg == "lz4" && s == "lz4hc"));
        if !ok {
            return Err(ErofsError::CannotDecompress {
                algorithm: alg.to_string(),
                version: version.to_string(),
                supported: if supported.is_empty() {
                    "none listed".to_string()
                } else {
                    supported.join(", ")
                },
            });
        }
    }
    Ok(())
}

/// `fsck.erofs -V` (for messages).
pub fn fsck_version() -> String {
    find_program(&FSCK_EROFS)
        .ok()
        .and_then(|exe| Command::new(exe).arg("-V").output().ok())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .and_then(|s| s.split_whitespace().last().map(str::to_string))
        .unwrap_or_else(|| "unknown".to_string())
}

/// Whether `fsck.erofs --extract` restores xattrs: builds a one-file image with a
/// `user.` xattr in `scratch`, extracts it and looks.
pub fn extract_keeps_xattrs(scratch: &Path) -> Result<bool, ErofsError> {
    let dir = tempfile::Builder::new()
        .prefix("livestick-erofs-probe-")
        .tempdir_in(scratch)
        .map_err(io_err(scratch))?;
    let src = dir.path().join("src");
    fs::create_dir(&src).map_err(io_err(&src))?;
    let file = src.join("f");
    fs::write(&file, b"probe").map_err(io_err(&file))?;
    if set_xattr(&file, "user.livestick", b"1").is_err() {
        // The work dir's file system has no user xattrs: nothing to learn here.
        return Ok(false);
    }
    let img = dir.path().join("probe.img");
    build(&src, &img, &[])?;
    let out = dir.path().join("out");
    extract(&img, &out)?;
    Ok(get_xattr(&out.join("f"), "user.livestick").is_some())
}

/// The image's tree in `dest`, xattrs included: [`extract`], then
/// [`restore_xattrs`] for what this fsck.erofs leaves out.
pub fn unpack(image: &Path, dest: &Path) -> Result<(), ErofsError> {
    extract(image, dest)?;
    restore_xattrs(image, dest)?;
    Ok(())
}

/// Sets on the tree extracted into `tree` the xattrs the image holds (read by
/// [`xattr`]), which fsck.erofs 1.5 leaves out. Returns the
/// number of paths labelled. A tree without a path the image has is an error: the
/// extraction and the image disagree.
pub fn restore_xattrs(image: &Path, tree: &Path) -> Result<usize, ErofsError> {
    let mut f = fs::File::open(image).map_err(io_err(image))?;
    let paths = xattr::read_xattrs(&mut f, &image.display().to_string())?;
    for (rel, xattrs) in &paths {
        let p = tree.join(std::ffi::OsStr::from_bytes(rel));
        for (name, value) in xattrs {
            set_xattr(&p, name, value).map_err(|source| ErofsError::Io {
                what: format!("setting {name} on {}", p.display()),
                source,
            })?;
        }
    }
    Ok(paths.len())
}

/// Extracts the image into `dest` (created), keeping owners and modes (as root).
pub fn extract(image: &Path, dest: &Path) -> Result<(), ErofsError> {
    let arg = {
        let mut a = std::ffi::OsString::from("--extract=");
        a.push(dest.as_os_str());
        a
    };
    let mut args: Vec<&std::ffi::OsStr> = vec![arg.as_os_str()];
    if nix::unistd::geteuid().is_root() {
        args.push("--preserve".as_ref());
    }
    args.push(image.as_os_str());
    squash::run_tool(FSCK_EROFS, &args, &[])?;
    Ok(())
}

/// Builds `out` from `tree` with `args` (see [`mkfs_args`]).
pub fn build(tree: &Path, out: &Path, args: &[String]) -> Result<(), ErofsError> {
    let mut a: Vec<&std::ffi::OsStr> = vec!["--quiet".as_ref(), "--preserve-mtime".as_ref()];
    a.extend(args.iter().map(std::ffi::OsStr::new));
    a.push(out.as_os_str());
    a.push(tree.as_os_str());
    squash::run_tool(MKFS_EROFS, &a, &[])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::superblock::{EROFS_MAGIC, read_superblock};
    use super::*;
    use std::io;

    #[test]
    fn an_algorithm_fsck_erofs_lacks_is_refused_by_name() {
        let info = |algs: &[&'static str]| ErofsInfo {
            block_size: 4096,
            algorithms: algs.to_vec(),
            uuid: String::new(),
            volume_name: String::new(),
            blocks: 1,
        };
        let debian12 = ["lz4hc".to_string(), "lz4".to_string()];
        assert!(check_extractable(&info(&[]), &debian12).is_ok());
        assert!(check_extractable(&info(&["lz4"]), &debian12).is_ok());
        assert!(check_extractable(&info(&["lz4"]), &["lz4hc".to_string()]).is_ok());
        let e = check_extractable(&info(&["lz4", "lzma"]), &debian12).unwrap_err();
        assert!(
            e.to_string().contains("lzma") && e.to_string().contains("lz4hc, lz4"),
            "{e}"
        );
    }

    fn sb(incompat: u32, algs: u16) -> Vec<u8> {
        let mut img = vec![0u8; 4096];
        img[1024..1028].copy_from_slice(&EROFS_MAGIC.to_le_bytes());
        img[1024 + 12] = 12;
        img[1024 + 80..1024 + 84].copy_from_slice(&incompat.to_le_bytes());
        img[1024 + 84..1024 + 86].copy_from_slice(&algs.to_le_bytes());
        img[1024 + 64..1024 + 68].copy_from_slice(b"root");
        img
    }

    #[test]
    fn reads_the_algorithms() {
        let i = read_superblock(&mut io::Cursor::new(sb(3, 0b1010)), "x").unwrap();
        assert_eq!(i.algorithms, vec!["lzma", "zstd"]);
        assert_eq!(i.block_size, 4096);
        assert_eq!(i.volume_name, "root");
        let i = read_superblock(&mut io::Cursor::new(sb(1, 0xffff)), "x").unwrap();
        assert_eq!(i.algorithms, vec!["lz4"]);
        let i = read_superblock(&mut io::Cursor::new(sb(0, 0)), "x").unwrap();
        assert!(i.algorithms.is_empty());
        assert!(matches!(
            read_superblock(&mut io::Cursor::new(vec![0u8; 100]), "x"),
            Err(ErofsError::NotErofs(_))
        ));
    }

    #[test]
    fn keeps_or_replaces_the_compressor() {
        let avail = vec!["lz4hc".to_string(), "lz4".to_string()];
        let mut info = read_superblock(&mut io::Cursor::new(sb(1, 0)), "x").unwrap();
        let (a, note) = mkfs_args(&info, &avail);
        assert!(
            a.contains(&"-zlz4hc".to_string()) && note.is_none(),
            "{a:?}"
        );
        info.algorithms = vec!["lzma"];
        let (a, note) = mkfs_args(&info, &avail);
        assert!(a.contains(&"-zlz4hc".to_string()), "{a:?}");
        assert!(note.unwrap().contains("lzma"));
        info.algorithms = vec![];
        let (a, _) = mkfs_args(&info, &avail);
        assert!(!a.iter().any(|x| x.starts_with("-z")));
    }
}
