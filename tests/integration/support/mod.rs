//! The one support module of the integration tests: running the built binary, the
//! fixture ISOs (`fixtures`), the dm-snapshot kernel vectors (`dm_snapshot`), reading
//! images back with independent tools (sfdisk, mtools, fsck.fat, dumpe2fs), and the
//! machine-wide resources the tests share now that they run in one process.

pub mod dm_snapshot;
pub mod fixtures;
pub mod schema;
pub mod vm;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Condvar, Mutex, MutexGuard};

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

/// Runs `cmd` (a name on PATH or a path), which must succeed; its stdout.
pub fn run(cmd: &(impl AsRef<OsStr> + ?Sized), args: &[&str]) -> String {
    let cmd = cmd.as_ref();
    let shown = cmd.to_string_lossy();
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{shown} not runnable ({e}); run scripts/deps.sh"));
    assert!(
        out.status.success(),
        "{shown} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a prepared command whatever its exit status; panics only if it cannot start.
pub fn output_of(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

/// Runs a prepared command, which must succeed; its output.
pub fn checked(cmd: &mut Command) -> Output {
    let out = output_of(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `exe` in the C locale (so its messages can be matched) whatever its exit
/// status.
pub fn c_locale_output(exe: &Path, args: &[&str]) -> Output {
    output_of(Command::new(exe).args(args).env("LC_ALL", "C"))
}

/// [`checked`]'s stdout.
pub fn stdout_of(cmd: &mut Command) -> Vec<u8> {
    checked(cmd).stdout
}

/// The stdout of a run that must have succeeded (livestick's or a tool's).
pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed ({:?}): {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A scratch directory under `$TMPDIR` (or /tmp), removed on drop.
pub fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("livestick-test-")
        .tempdir()
        .expect("a scratch directory in the temp dir")
}

/// A sparse file of `size` bytes, `dir/name`.
pub fn sparse(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(size))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    path
}

/// `len` bytes from a generator seeded by `len` (the same bytes every run, so a
/// failure can be reproduced), written over `path` in 4 MiB requests.
pub fn fill_random(path: &Path, len: u64) {
    use rand::{RngCore, SeedableRng};
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("create the file to fill");
    let mut rng = rand::rngs::StdRng::seed_from_u64(len);
    let mut buf = vec![0u8; 4 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n]).expect("write random bytes");
        left -= n as u64;
    }
    f.sync_all().expect("sync the filled file");
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

/// Writes `image`'s partition table from an sfdisk `script` (as `sfdisk IMAGE < script`).
pub fn sfdisk_script(image: &Path, script: &str) {
    use std::io::Write as _;
    let mut child = Command::new(tool("sfdisk"))
        .args(["--no-reread", "--no-tell-kernel", "-q"])
        .arg(image)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("sfdisk");
    child
        .stdin
        .take()
        .expect("sfdisk's stdin")
        .write_all(script.as_bytes())
        .expect("feed sfdisk");
    assert!(child.wait().expect("sfdisk").success(), "sfdisk: {script}");
}

/// A stick image of `mib` MiB with one bootable partition from 1 MiB to the end, of
/// MBR type `kind`, formatted by mkfs.fat with `mkfs_args` (`-F 16`, a label, …), as
/// other tools leave sticks.
pub fn stick_made_by_mkfs_fat(image: &Path, mib: u64, kind: &str, mkfs_args: &[&str]) {
    std::fs::File::create(image)
        .expect("the image")
        .set_len(mib << 20)
        .expect("the image's size");
    sfdisk_script(image, &format!("start=2048, type={kind}, bootable\n"));
    let made = Command::new(tool("mkfs.fat"))
        .args(mkfs_args)
        .args(["--offset", "2048"])
        .arg(image)
        .arg(((mib - 1) * 1024).to_string())
        .output()
        .expect("mkfs.fat");
    assert!(made.status.success(), "{made:?}");
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

/// Loop devices are machine-wide, and the tests now share one process: a test that
/// waits for "the next new device" (the `devices` watcher, `write --wait-for`) would
/// take another test's loop device for its own, and `write --wait-for` would write
/// over it. While such a test holds a [`LoopWatch`], every other test's attach
/// waits.
struct LoopDevices {
    /// The directory of the watching test, whose own images may still be attached.
    watcher: Option<PathBuf>,
    /// Attaches under way; a watch starts only when none is.
    attaching: usize,
}

static LOOP_DEVICES: Mutex<LoopDevices> = Mutex::new(LoopDevices {
    watcher: None,
    attaching: 0,
});
static LOOP_DEVICES_CHANGED: Condvar = Condvar::new();

fn loop_devices() -> MutexGuard<'static, LoopDevices> {
    LOOP_DEVICES.lock().unwrap_or_else(|e| e.into_inner())
}

fn wait_for_loop_devices(
    state: MutexGuard<'static, LoopDevices>,
) -> MutexGuard<'static, LoopDevices> {
    LOOP_DEVICES_CHANGED
        .wait(state)
        .unwrap_or_else(|e| e.into_inner())
}

/// Held by a test that watches for new block devices: until it drops, only images
/// under `own_dir` (the test's scratch directory) are attached as loop devices.
pub struct LoopWatch;

pub fn watch_loop_devices(own_dir: &Path) -> LoopWatch {
    let mut state = loop_devices();
    while state.watcher.is_some() || state.attaching > 0 {
        state = wait_for_loop_devices(state);
    }
    state.watcher = Some(own_dir.to_path_buf());
    LoopWatch
}

impl Drop for LoopWatch {
    fn drop(&mut self) {
        loop_devices().watcher = None;
        LOOP_DEVICES_CHANGED.notify_all();
    }
}

/// A loop device over `image` (root only), detached on drop.
pub struct Loop(pub String);

impl Loop {
    /// `losetup -f --show -P image`: partitions are scanned.
    pub fn attach(image: &Path) -> Option<Loop> {
        Self::attach_with(&["-P"], image)
    }

    /// `losetup -f --show <options> image`.
    pub fn attach_with(options: &[&str], image: &Path) -> Option<Loop> {
        let mut state = loop_devices();
        while state
            .watcher
            .as_ref()
            .is_some_and(|own| !image.starts_with(own))
        {
            state = wait_for_loop_devices(state);
        }
        state.attaching += 1;
        drop(state);
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .args(options)
            .arg(image)
            .output();
        loop_devices().attaching -= 1;
        LOOP_DEVICES_CHANGED.notify_all();
        let out = out.ok()?;
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

/// [`Loop::attach_with`], or `None` once [`require`] has said why (a failure in CI).
pub fn loop_device(options: &[&str], image: &Path) -> Option<Loop> {
    let dev = Loop::attach_with(options, image);
    if dev.is_none() {
        require(false, &format!("loop devices (losetup {options:?})"));
    }
    dev
}

/// Where a program is installed: the sbin and bin directories first (an ordinary
/// user's PATH often lacks sbin, and e2fsprogs lives there), then PATH.
fn locate(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(PathBuf::from)
        .chain(std::env::split_paths(&path))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Whether a program is installed.
pub fn have(name: &str) -> bool {
    locate(name).is_some()
}

/// A program by name, for a test that needs it: its path, or the bare name (so
/// running it fails with the name in the message).
pub fn tool(name: &str) -> PathBuf {
    locate(name).unwrap_or_else(|| PathBuf::from(name))
}

/// A program a check may do without: its path, or `None` with a note that the
/// check is skipped.
pub fn installed(name: &str) -> Option<PathBuf> {
    let found = locate(name);
    if found.is_none() {
        eprintln!("note: {name} is not installed; the checks that need it are skipped");
    }
    found
}

/// [`have`], for a test that needs the program: fails in CI, skips loudly elsewhere.
pub fn need(name: &str) -> bool {
    require(have(name), &format!("{name} (run scripts/deps.sh)"))
}

/// [`run`] for a program found with [`tool`].
pub fn sh(cmd: &str, args: &[&str]) -> String {
    run(&tool(cmd), args)
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
    iso_of_tree(&iso, "FLAT-OVL", &out);
    out
}

/// An ISO 9660 image (Rock Ridge, Joliet) of the directory `tree`, labelled `label`.
pub fn iso_of_tree(tree: &Path, label: &str, out: &Path) {
    sh(
        "xorriso",
        &[
            "-as",
            "mkisofs",
            "-quiet",
            "-V",
            label,
            "-R",
            "-J",
            "-o",
            out.to_str().unwrap(),
            tree.to_str().unwrap(),
        ],
    );
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

/// Byte length of the first partition of `image`, from sfdisk.
pub fn part_len(image: &Path) -> u64 {
    sfdisk(image)["partitiontable"]["partitions"][0]["size"]
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

/// `livestick overlay <args>` in this process, parsed by the binary's own clap types.
pub fn overlay(args: &[&str]) -> anyhow::Result<()> {
    use clap::Parser;
    #[derive(Parser)]
    struct OverlayCli {
        #[command(subcommand)]
        cmd: livestick::cli::overlay::OverlayCommand,
    }
    let cli = OverlayCli::try_parse_from(std::iter::once("overlay").chain(args.iter().copied()))?;
    livestick::commands::overlay::run(cli.cmd, true)
}

/// `debugfs -w` with `script` on standard input; panics if debugfs reports an error
/// (it exits 0 after a failed request, so its messages are what tell).
pub fn debugfs_w(image: &(impl AsRef<OsStr> + ?Sized), script: &str) {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new(tool("debugfs"))
        .args(["-w", "-f", "-"])
        .arg(image.as_ref())
        .env("LC_ALL", "C")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("debugfs runs (e2fsprogs)");
    child
        .stdin
        .take()
        .expect("debugfs's stdin")
        .write_all(script.as_bytes())
        .expect("the script reaches debugfs");
    let out = child.wait_with_output().expect("debugfs finishes");
    let err = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = err
        .lines()
        .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
        .collect();
    assert!(
        out.status.success() && errors.is_empty(),
        "debugfs script failed: {errors:?}"
    );
}

/// One field of `dumpe2fs -h`, e.g. "Block count".
pub fn dumpe2fs_field(image: &Path, name: &str) -> String {
    let out = ok(&c_locale_output(
        &tool("dumpe2fs"),
        &["-h", &image.to_string_lossy()],
    ));
    out.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("dumpe2fs -h has no {name}:\n{out}"))
}

/// `e2fsck -f -n` finds nothing to fix.
pub fn e2fsck_clean(image: &Path) {
    let out = c_locale_output(&tool("e2fsck"), &["-f", "-n", &image.to_string_lossy()]);
    assert!(
        out.status.success(),
        "e2fsck -fn {}:\n{}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The plaintext of a LUKS2 container, read with livestick's reader, into `out`.
pub fn luks_decrypt_to(container: &Path, out: &Path, passphrase: &[u8]) {
    let file = std::fs::File::open(container).expect("open the LUKS container");
    let mut volume =
        livestick::persist::luks::open_luks2(file, passphrase).expect("the passphrase opens it");
    let mut plain = std::fs::File::create(out).expect("create the plaintext file");
    std::io::copy(&mut volume, &mut plain).expect("decrypt");
}

/// One tag (`UUID`, `TYPE`, `LABEL`) of the file system at `offset` in `image`, as
/// libblkid's low-level probe reads it (`blkid -p --offset`), not livestick.
pub fn blkid_value(image: &Path, offset: u64, tag: &str) -> String {
    run(
        "blkid",
        &[
            "-p",
            "--offset",
            &offset.to_string(),
            "-s",
            tag,
            "-o",
            "value",
            image.to_str().expect("a UTF-8 path"),
        ],
    )
    .trim()
    .to_string()
}

/// A stand-in for the program `name` in `dir` (made if missing): a shell `script`,
/// executable. Livestick runs it with [`path_first`]`(dir)` as its `PATH`.
pub fn stand_in(dir: &Path, name: &str, script: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).expect("make the stand-ins' directory");
    let path = dir.join(name);
    std::fs::write(&path, script).expect("write the stand-in");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        .expect("make the stand-in executable");
}

/// This process's `PATH` with `dir` first.
pub fn path_first(dir: &Path) -> String {
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// The entry for `path` in the `files` of a stick manifest or a `verify` report.
pub fn listed(doc: &serde_json::Value, path: &str) -> Option<serde_json::Value> {
    doc["files"]
        .as_array()?
        .iter()
        .find(|f| f["path"] == path)
        .cloned()
}

/// [`listed`], which must be there: a panic names the document otherwise.
pub fn listed_entry(doc: &serde_json::Value, path: &str) -> serde_json::Value {
    listed(doc, path).unwrap_or_else(|| panic!("{path} is not listed: {doc:#}"))
}

/// Deletes `path` from the FAT at `start` in `image`, with mtools (not livestick).
pub fn fat_delete(image: &Path, start: u64, path: &str) {
    let out = std::process::Command::new("mdel")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{start}", image.display()))
        .arg(format!("::{path}"))
        .output()
        .expect("mtools installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Puts a file `name` holding `content` into the upper directory of the OverlayFS
/// overlay a stick's live system uses (found by `overlay status`), as the live
/// system would write it: the overlay file copied out with mtools, the file added
/// with `debugfs -w`, the overlay copied back.
pub fn put_into_overlayfs_overlay(stick: &Path, name: &str, content: &[u8], scratch: &Path) {
    let status = livestick(&["--json", "overlay", "status", stick.to_str().unwrap()]);
    let status: serde_json::Value = serde_json::from_str(&ok(&status)).expect("status JSON");
    let on_fat = status["expected_overlay"].as_str().expect("an overlay");
    let part = part_start(stick);
    let copy = scratch.join("overlay-copy.img");
    fat_copy_out(stick, part, on_fat, &copy);
    let file = scratch.join(name);
    std::fs::write(&file, content).unwrap();
    debugfs_w(
        &copy,
        &format!("write {} overlayfs/{name}\n", file.display()),
    );
    fat_put(stick, part, &copy, on_fat);
}
