//! The one support module of the integration tests: running the built binary, the
//! fixture ISOs (`fixtures`), the dm-snapshot kernel vectors (`dm_snapshot`), reading
//! images back with independent tools (sfdisk, mtools, fsck.fat, dumpe2fs), and the
//! machine-wide resources the tests share now that they run in one process.
#![allow(dead_code)]

pub mod dm_snapshot;
pub mod fixtures;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use fixtures::synthetic_iso;

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_livestick"))
}

pub fn livestick(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("livestick runs")
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} not runnable ({e}); run scripts/deps.sh"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn sha256_file(path: &Path) -> String {
    run("sha256sum", &[path.to_str().unwrap()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// `mtype` a file out of the FAT filesystem at `offset` bytes.
pub fn fat_read(image: &Path, offset: u64, path: &str) -> Vec<u8> {
    let out = Command::new("mtype")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{offset}", image.display()))
        .arg(format!("::{path}"))
        .output()
        .expect("mtools installed");
    assert!(
        out.status.success(),
        "mtype {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

pub fn fat_copy_out(image: &Path, offset: u64, path: &str, dest: &Path) {
    let out = Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-n")
        .arg("-i")
        .arg(format!("{}@@{offset}", image.display()))
        .arg(format!("::{path}"))
        .arg(dest)
        .output()
        .expect("mtools installed");
    assert!(
        out.status.success(),
        "mcopy {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn fat_put(image: &Path, offset: u64, src: &Path, path: &str) {
    let out = Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-o")
        .arg("-i")
        .arg(format!("{}@@{offset}", image.display()))
        .arg(src)
        .arg(format!("::{path}"))
        .output()
        .expect("mtools installed");
    assert!(
        out.status.success(),
        "mcopy to {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn fat_ls(image: &Path, offset: u64, dir: &str) -> String {
    let out = Command::new("mdir")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-a", "-b", "-i"])
        .arg(format!("{}@@{offset}", image.display()))
        .arg(format!("::{dir}"))
        .output()
        .expect("mtools installed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// sfdisk's JSON view of the image.
pub fn sfdisk(image: &Path) -> serde_json::Value {
    serde_json::from_str(&run("sfdisk", &["--json", image.to_str().unwrap()])).expect("sfdisk json")
}

/// Copies the partition out and runs `fsck.fat -n` on it (this fsck has no --offset).
pub fn fsck_fat(image: &Path, offset: u64, len: u64, scratch: &Path) {
    let part = scratch.join("partition.fat");
    run(
        "dd",
        &[
            &format!("if={}", image.display()),
            &format!("of={}", part.display()),
            "bs=1M",
            &format!("skip={}", offset / (1 << 20)),
            &format!("count={}", len / (1 << 20)),
            "status=none",
        ],
    );
    let out = Command::new("fsck.fat")
        .arg("-n")
        .arg(&part)
        .output()
        .expect("dosfstools");
    assert!(
        out.status.success(),
        "fsck.fat -n is not clean:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(part).ok();
}

/// Extracts one file from an ISO with xorriso (independent of our reader).
pub fn iso_extract(iso: &Path, path: &str, dest: &Path) {
    run(
        "xorriso",
        &[
            "-osirrox",
            "on",
            "-indev",
            iso.to_str().unwrap(),
            "-extract",
            path,
            dest.to_str().unwrap(),
        ],
    );
}

pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

pub fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

/// For tests that need root or loop devices: fail in CI, skip loudly elsewhere.
pub fn require(cond: bool, what: &str) -> bool {
    if cond {
        return true;
    }
    if in_ci() {
        panic!("this test needs {what}, which CI must provide");
    }
    eprintln!("SKIPPED: this test needs {what}");
    false
}

/// A loop device over `image` (root only), detached on drop.
pub struct Loop(pub String);

impl Loop {
    pub fn attach(image: &Path) -> Option<Loop> {
        let out = Command::new("losetup")
            .args(["-f", "--show", "-P"])
            .arg(image)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        Some(Loop(
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        ))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// A program by name: on PATH or in the sbin directories (an ordinary user's PATH
/// often lacks those, and e2fsprogs lives there).
pub fn tool(name: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// [`run`] for a program found with [`tool`].
pub fn sh(cmd: &str, args: &[&str]) -> String {
    run(&tool(cmd).to_string_lossy(), args)
}

/// A tiny ISO (label FLAT-OVL) in `dir` whose squashfs.img is the tree `root` itself,
/// xattrs included: the flat layout, which needs an OverlayFS overlay.
pub fn flat_iso_from(root: &Path, dir: &Path) -> PathBuf {
    let iso = dir.join("iso");
    std::fs::create_dir_all(iso.join("LiveOS")).unwrap();
    std::fs::create_dir_all(iso.join("isolinux")).unwrap();
    sh(
        "mksquashfs",
        &[
            root.to_str().unwrap(),
            iso.join("LiveOS/squashfs.img").to_str().unwrap(),
            "-comp",
            "gzip",
            "-noappend",
            "-quiet",
            "-xattrs",
        ],
    );
    std::fs::write(iso.join("isolinux/vmlinuz"), "kernel").unwrap();
    std::fs::write(iso.join("isolinux/initrd.img"), "initrd").unwrap();
    std::fs::write(
        iso.join("isolinux/isolinux.cfg"),
        "default linux\nlabel linux\n  kernel vmlinuz\n  append initrd=initrd.img root=live:CDLABEL=FLAT-OVL rd.live.image\n",
    )
    .unwrap();
    let out = dir.join("flat.iso");
    sh(
        "xorriso",
        &[
            "-as",
            "mkisofs",
            "-quiet",
            "-V",
            "FLAT-OVL",
            "-R",
            "-J",
            "-o",
            out.to_str().unwrap(),
            iso.to_str().unwrap(),
        ],
    );
    out
}

/// The uid and gid livestick runs as when a test proves it needs no root.
pub const NOBODY: u32 = 65534;

/// livestick as an ordinary user: uid/gid [`NOBODY`] when the tests run as root
/// (files it touches must be opened to that user), as is otherwise.
pub fn as_nobody(args: &[&str]) -> Output {
    as_nobody_in(Path::new("."), args)
}

pub fn as_nobody_in(cwd: &Path, args: &[&str]) -> Output {
    if !is_root() {
        return Command::new(bin())
            .args(args)
            .current_dir(cwd)
            .output()
            .expect("livestick runs");
    }
    Command::new(tool("setpriv"))
        .current_dir(cwd)
        .args([
            format!("--reuid={NOBODY}"),
            format!("--regid={NOBODY}"),
            "--clear-groups".into(),
            "--".into(),
        ])
        .arg(bin())
        .args(args)
        .output()
        .expect("setpriv runs")
}

/// Byte offset of the first partition of `image`, from sfdisk.
pub fn part_start(image: &Path) -> u64 {
    sfdisk(image)["partitiontable"]["partitions"][0]["start"]
        .as_u64()
        .expect("a partition")
        * 512
}

/// `len` bytes of `file` at `at`.
pub fn read_at(file: &Path, at: u64, len: usize) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(file).expect("open");
    let mut buf = vec![0u8; len];
    f.seek(SeekFrom::Start(at)).expect("seek");
    f.read_exact(&mut buf).expect("read");
    buf
}
