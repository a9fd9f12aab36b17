//! Shared helpers for the command-level tests: running the built binary,
//! building the synthetic fixture ISOs once, and reading images back with
//! independent tools (sfdisk, mtools, fsck.fat, dumpe2fs).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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

/// Builds the synthetic ISOs once (serialised with flock across test binaries).
pub fn synthetic_iso(name: &str) -> PathBuf {
    let out = repo().join("fixtures/out");
    std::fs::create_dir_all(&out).expect("fixtures/out");
    let status = Command::new("flock")
        .arg(out.join(".lock"))
        .arg("bash")
        .arg(repo().join("fixtures/build-iso.sh"))
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("flock and bash are installed (util-linux)");
    assert!(
        status.success(),
        "building fixture ISOs failed; run `bash scripts/deps.sh` as root to install the tools"
    );
    out.join(name)
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
