//! `livestick overlay grow|recover` on OverlayFS overlays (`write --overlayfs`): the
//! overlay is an ext4 file system holding `overlayfs/` (upper) and `ovlwork/`; grow
//! extends the file and runs resize2fs, recover runs e2fsck (-n, or -y with --repair).
//! "A boot" and "damage" are edits with `debugfs -w`. Results are read back with
//! independent tools: mtools copies the overlay out of the FAT, e2fsck and debugfs
//! read it, fsck.fat checks the FAT, sha256 shows a refused command changed nothing.
//! The premise is "no root": as root (CI), the commands run as uid 65534 via setpriv.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use crate::support::debugfs_w as dbg_w;
use crate::support::*;
use livestick::disk::extent_file::ExtentFile;
use livestick::disk::stick::Stick;
use serde_json::Value;

fn tools_ok() -> bool {
    let mut need = vec![
        "mksquashfs",
        "xorriso",
        "debugfs",
        "e2fsck",
        "resize2fs",
        "mcopy",
        "fsck.fat",
    ];
    if is_root() {
        need.push("setpriv");
    }
    need.iter().all(|t| tool(t).is_file())
}

fn ready() -> bool {
    require(
        tools_ok(),
        "squashfs-tools, xorriso, e2fsprogs, mtools, dosfstools (and setpriv as root)",
    )
}

/// `e2fsck -f -n`: (exit code, output).
fn e2fsck_n(image: &Path) -> (i32, String) {
    let out = Command::new(tool("e2fsck"))
        .args(["-f", "-n"])
        .arg(image)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn cat(image: &Path, path: &str) -> String {
    sh(
        "debugfs",
        &["-R", &format!("cat {path}"), image.to_str().unwrap()],
    )
}

/// Makes `dir` and everything in it belong to the user `as_nobody` runs as.
fn give_away(dir: &Path) {
    if !is_root() {
        return;
    }
    std::os::unix::fs::chown(dir, Some(NOBODY), Some(NOBODY)).unwrap();
    if dir.is_dir() {
        for e in std::fs::read_dir(dir).unwrap() {
            give_away(&e.unwrap().path());
        }
    }
}

fn json(out: &Output) -> Value {
    let text = ok(out);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn failed(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "expected a failure: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A tiny ISO whose squashfs.img is a flat root tree (OverlayFS required).
fn flat_iso() -> &'static Path {
    static ISO: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, p) = ISO.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/hostname"), "base\n").unwrap();
        let out = flat_iso_from(&root, d.path());
        (d, out)
    });
    p
}

/// A 256 MiB stick with a 32 MiB OverlayFS overlay, written once and copied per test.
fn base_stick() -> &'static Path {
    static BASE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, p) = BASE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("base.img");
        let out = livestick(&[
            "write",
            flat_iso().to_str().unwrap(),
            img.to_str().unwrap(),
            "--size",
            "256M",
            "--overlay-size-mb",
            "32",
            "--overlayfs",
            "--yes",
        ]);
        ok(&out);
        (dir, img)
    });
    p
}

struct T {
    dir: tempfile::TempDir,
    img: PathBuf,
    part: u64,
    part_len: u64,
    overlay: String,
}

impl T {
    fn s(&self) -> &str {
        self.img.to_str().unwrap()
    }
    fn work(&self) -> String {
        let w = self.dir.path().join("work");
        std::fs::create_dir_all(&w).unwrap();
        give_away(&w);
        w.display().to_string()
    }
    fn extents(&self) -> Vec<(u64, u64)> {
        Stick::open(&self.img, false)
            .unwrap()
            .file_extents(&self.overlay)
            .unwrap()
    }
    /// The overlay copied out of the FAT by mtools (independent of livestick).
    fn overlay_copy(&self) -> PathBuf {
        let p = self.dir.path().join(format!(
            "ov-{}.img",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        fat_copy_out(&self.img, self.part, &self.overlay, &p);
        p
    }
    /// Edits the overlay's ext4 with a debugfs script: in place at `stick?offset=N`
    /// when contiguous (as the other OverlayFS tests do), else on a copy written back
    /// through its extents (the cluster chain stays as it is).
    fn edit(&self, script: &str) {
        let ext = self.extents();
        if let [(off, _)] = ext.as_slice() {
            let spec = PathBuf::from(format!("{}?offset={off}", self.img.display()));
            return dbg_w(&spec, script);
        }
        let mut s = Stick::open(&self.img, true).unwrap();
        let mut f = ExtentFile::new(s.file_mut(), &ext);
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).unwrap();
        let copy = self.dir.path().join("edit.img");
        std::fs::write(&copy, &bytes).unwrap();
        dbg_w(&copy, script);
        f.seek(SeekFrom::Start(0)).unwrap();
        f.write_all(&std::fs::read(&copy).unwrap()).unwrap();
        f.flush().unwrap();
    }
    /// "A boot": files the live system left in the upper dir.
    fn boot(&self) {
        let a = self.dir.path().join("payload-a");
        std::fs::write(&a, "kept across the grow\n").unwrap();
        let big = self.dir.path().join("payload-big");
        std::fs::write(&big, vec![0x5Au8; 3 << 20]).unwrap();
        self.edit(&format!(
            "mkdir /overlayfs/etc\nwrite {} /overlayfs/etc/hostname\nmkdir /overlayfs/home\nwrite {} /overlayfs/home/big\n",
            a.display(),
            big.display()
        ));
    }
    fn check_boot_files(&self, overlay: &Path) {
        assert_eq!(
            cat(overlay, "/overlayfs/etc/hostname"),
            "kept across the grow\n"
        );
        let big = cat(overlay, "/overlayfs/home/big");
        assert!(big.len() == 3 << 20 && big.bytes().all(|b| b == 0x5A));
    }
    /// Damage e2fsck -p fixes by itself (counts) and damage it does not (an invalid
    /// mode): e2fsck -y fixes both.
    fn damage(&self) {
        let empty = self.dir.path().join("payload-empty");
        std::fs::write(&empty, "").unwrap();
        self.edit(&format!(
            "sif /overlayfs/etc/hostname links_count 3\nssv free_inodes_count 9\nwrite {} /overlayfs/bad\nsif /overlayfs/bad mode 0170644\n",
            empty.display()
        ));
    }
    fn sha(&self) -> String {
        sha256_file(&self.img)
    }
    /// `overlay recover --repair --json` as an ordinary user, through a work copy.
    fn recover_repair(&self) -> Value {
        json(&as_nobody(&[
            "overlay",
            "recover",
            self.s(),
            "--repair",
            "--workdir",
            &self.work(),
            "--json",
        ]))
    }
    fn status(&self) -> Value {
        json(&livestick(&["overlay", "status", self.s(), "--json"]))
    }
}

fn stick() -> T {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("stick.img");
    std::fs::copy(base_stick(), &img).unwrap();
    give_away(dir.path());
    let mut s = Stick::open(&img, false).unwrap();
    let info = s.info("LiveOS").unwrap();
    T {
        part: s.partition.start,
        part_len: s.partition.len,
        overlay: info.expected_overlay.clone(),
        img,
        dir,
    }
}

#[test]
fn grow_on_a_stick_keeps_the_upper_files_and_checks_clean() {
    if !ready() {
        return;
    }
    let t = stick();
    t.boot();
    let before = t.status();
    assert_eq!(before["size_bytes"], 32 << 20);
    let out = json(&as_nobody(&[
        "overlay",
        "grow",
        t.s(),
        "--add-mb",
        "32",
        "--workdir",
        &t.work(),
        "--json",
    ]));
    assert_eq!(out["kind"], "overlayfs");
    assert_eq!(out["grown"], true);
    assert_eq!(out["grow"]["new_bytes"], 64 << 20);
    assert!(out["write_back"]["chunks_written"].as_u64().unwrap() > 0);
    // The work copy is gone.
    assert_eq!(std::fs::read_dir(t.work()).unwrap().count(), 0);

    let after = t.status();
    assert_eq!(after["size_bytes"], 64 << 20, "{after}");
    let total = |v: &Value| v["used_bytes"].as_u64().unwrap() + v["free_bytes"].as_u64().unwrap();
    assert!(
        total(&after) > total(&before) + (30 << 20),
        "the ext4 is larger: {before} → {after}"
    );
    let ov = t.overlay_copy();
    assert_eq!(std::fs::metadata(&ov).unwrap().len(), 64 << 20);
    let (code, text) = e2fsck_n(&ov);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("/65536 blocks"),
        "1 KiB blocks, 64 MiB: {text}"
    );
    t.check_boot_files(&ov);
    fsck_fat(&t.img, t.part, t.part_len, t.dir.path());

    // A second grow, by --size-mb, from the grown state.
    ok(&as_nobody(&[
        "overlay",
        "grow",
        t.s(),
        "--size-mb",
        "80",
        "--workdir",
        &t.work(),
    ]));
    let ov = t.overlay_copy();
    assert_eq!(std::fs::metadata(&ov).unwrap().len(), 80 << 20);
    assert_eq!(e2fsck_n(&ov).0, 0);
    t.check_boot_files(&ov);
    fsck_fat(&t.img, t.part, t.part_len, t.dir.path());
}

#[test]
fn grow_of_a_bare_overlay_file() {
    if !ready() {
        return;
    }
    let t = stick();
    t.boot();
    let ov = t.overlay_copy();
    give_away(&ov);
    let dry = ok(&as_nobody(&[
        "overlay",
        "grow",
        ov.to_str().unwrap(),
        "--add-mb",
        "16",
        "--dry-run",
    ]));
    assert!(dry.contains("would grow"), "{dry}");
    assert_eq!(std::fs::metadata(&ov).unwrap().len(), 32 << 20);
    let out = json(&as_nobody(&[
        "overlay",
        "grow",
        ov.to_str().unwrap(),
        "--add-mb",
        "16",
        "--json",
    ]));
    assert_eq!(out["grown"], true);
    assert_eq!(out["method"], "in place");
    assert_eq!(std::fs::metadata(&ov).unwrap().len(), 48 << 20);
    let (code, text) = e2fsck_n(&ov);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("/49152 blocks"), "{text}");
    t.check_boot_files(&ov);
    let st = json(&livestick(&[
        "overlay",
        "status",
        ov.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(st["kind"], "overlayfs");
    assert_eq!(st["size_bytes"], 48 << 20);
    // Beyond the FAT limit: capped at the largest FAT file, like a dm overlay.
    let dry = json(&livestick(&[
        "overlay",
        "grow",
        ov.to_str().unwrap(),
        "--size-mb",
        "5000",
        "--dry-run",
        "--json",
    ]));
    assert_eq!(dry["grow"]["new_bytes"], (u32::MAX as u64) / 1024 * 1024);
    assert_eq!(std::fs::metadata(&ov).unwrap().len(), 48 << 20);
}

#[test]
fn refused_grows_leave_the_stick_unchanged() {
    if !ready() {
        return;
    }
    let t = stick();
    t.boot();
    let sha = t.sha();
    let work = t.work();
    let e = failed(&as_nobody(&["overlay", "grow", t.s(), "--size-mb", "5000"]));
    assert!(e.contains("4095") && e.contains("FAT32"), "{e}");
    assert_eq!(t.sha(), sha);
    let e = failed(&as_nobody(&["overlay", "grow", t.s(), "--size-mb", "1000"]));
    assert!(
        e.contains("not enough free space") && e.contains("bytes"),
        "{e}"
    );
    assert_eq!(t.sha(), sha);
    let e = failed(&as_nobody(&["overlay", "grow", t.s(), "--size-mb", "16"]));
    assert!(e.contains("shrinking is not supported"), "{e}");
    assert_eq!(t.sha(), sha);
    let e = failed(&as_nobody(&["overlay", "grow", t.s(), "--size-mb", "32"]));
    assert!(e.contains("already have"), "{e}");
    assert_eq!(t.sha(), sha);
    let e = failed(&as_nobody(&[
        "overlay",
        "grow",
        t.s(),
        "--add-mb",
        "8",
        "--workdir",
        "/nonexistent/dir",
    ]));
    assert!(e.contains("/nonexistent/dir"), "{e}");
    assert_eq!(t.sha(), sha);

    // A dry run shows the plan and changes nothing.
    let dry = ok(&as_nobody(&[
        "overlay",
        "grow",
        t.s(),
        "--add-mb",
        "16",
        "--dry-run",
        "--workdir",
        &work,
    ]));
    assert!(
        dry.contains("would grow") && dry.contains("48 MiB"),
        "{dry}"
    );
    assert_eq!(t.sha(), sha);

    // Damage e2fsck -p does not fix unattended: refused after the checks on the work
    // copy, before anything on the stick changed.
    t.damage();
    let sha = t.sha();
    let out = as_nobody(&[
        "overlay",
        "grow",
        t.s(),
        "--add-mb",
        "16",
        "--workdir",
        &work,
    ]);
    let e = failed(&out);
    assert!(
        e.contains("e2fsck -f -p") && e.contains("invalid mode") && e.contains("--repair"),
        "{e}"
    );
    assert!(
        e.contains("stopped before anything on the stick was changed"),
        "{e}"
    );
    assert_eq!(t.sha(), sha);
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), 0, "copy removed");
}

#[test]
fn recover_on_a_clean_overlay_says_clean_and_changes_nothing() {
    if !ready() {
        return;
    }
    let t = stick();
    t.boot();
    let sha = t.sha();
    let text = ok(&as_nobody(&["overlay", "recover", t.s()]));
    assert!(
        text.contains("e2fsck -f -n") && text.contains(": clean (exit 0)"),
        "{text}"
    );
    assert!(text.contains("in place, read-only"), "{text}");
    let out = json(&as_nobody(&["overlay", "recover", t.s(), "--json"]));
    assert_eq!(out["check"]["clean"], true);
    assert_eq!(out["check"]["exit_code"], 0);
    assert!(out["check"]["problems"].as_array().unwrap().is_empty());
    assert_eq!(t.sha(), sha);
    // --repair on a clean overlay: nothing to repair, nothing written.
    let out = t.recover_repair();
    assert_eq!(out["check"]["clean"], true);
    assert!(out["repair"].is_null());
    assert_eq!(out["write_back"]["chunks_written"], 0);
    assert_eq!(t.sha(), sha);
    // The dm-snapshot-only options are refused by name.
    let e = failed(&as_nobody(&[
        "overlay",
        "recover",
        t.s(),
        "--origin-size",
        "6G",
    ]));
    assert!(e.contains("OverlayFS") && e.contains("--origin"), "{e}");
    assert_eq!(t.sha(), sha);
}

#[test]
fn recover_reports_damage_unchanged_and_repairs_it() {
    if !ready() {
        return;
    }
    let t = stick();
    t.boot();
    t.damage();
    let sha = t.sha();
    assert_eq!(e2fsck_n(&t.overlay_copy()).0, 4);

    // Without --repair: a report, nothing changed.
    let text = ok(&as_nobody(&["overlay", "recover", t.s()]));
    assert!(
        text.contains("exit 4") && text.contains("ref count is 3, should be 1"),
        "{text}"
    );
    assert!(text.contains("--repair"), "{text}");
    let out = json(&as_nobody(&["overlay", "recover", t.s(), "--json"]));
    assert_eq!(out["check"]["clean"], false);
    assert_eq!(out["check"]["exit_code"], 4);
    let problems = out["check"]["problems"].to_string();
    assert!(
        problems.contains("Free inodes count wrong") && problems.contains("invalid mode"),
        "{problems}"
    );
    assert_eq!(t.sha(), sha);
    // A dry run of the repair, and a grow without --repair: refused, unchanged.
    let dry = ok(&as_nobody(&[
        "overlay",
        "recover",
        t.s(),
        "--repair",
        "--add-mb",
        "16",
        "--dry-run",
    ]));
    assert!(dry.contains("would run e2fsck -f -y"), "{dry}");
    assert_eq!(t.sha(), sha);
    let out = as_nobody(&[
        "overlay",
        "recover",
        t.s(),
        "--add-mb",
        "16",
        "--workdir",
        &t.work(),
    ]);
    let e = failed(&out);
    assert_eq!(out.status.code(), Some(2), "bad input: {e}");
    assert!(e.contains("needs repairing before it can grow"), "{e}");
    assert_eq!(t.sha(), sha);

    // --repair --add-mb: e2fsck -f -y, then the grow; as an ordinary user.
    let out = json(&as_nobody(&[
        "overlay",
        "recover",
        t.s(),
        "--repair",
        "--add-mb",
        "16",
        "--workdir",
        &t.work(),
        "--json",
    ]));
    assert_eq!(out["repair"]["modified"], true, "{out}");
    assert_eq!(out["check_after"]["clean"], true, "{out}");
    assert_eq!(out["grown"], true);
    let ov = t.overlay_copy();
    let (code, text) = e2fsck_n(&ov);
    assert_eq!(code, 0, "{text}");
    assert_eq!(std::fs::metadata(&ov).unwrap().len(), 48 << 20);
    t.check_boot_files(&ov);
    fsck_fat(&t.img, t.part, t.part_len, t.dir.path());
    let text = ok(&as_nobody(&["overlay", "recover", t.s()]));
    assert!(text.contains(": clean (exit 0)"), "{text}");
}

#[test]
fn fragmented_overlay_grows_and_recovers_through_a_work_copy() {
    if !ready() {
        return;
    }
    let t = stick();
    t.boot();
    assert_eq!(t.extents().len(), 1, "a fresh overlay is contiguous");
    // A file right behind the overlay: its extension must go elsewhere.
    let after = t.dir.path().join("after.bin");
    std::fs::write(&after, vec![0xA5u8; 64 << 10]).unwrap();
    fat_put(&t.img, t.part, &after, "LiveOS/after.bin");
    ok(&as_nobody(&[
        "overlay",
        "grow",
        t.s(),
        "--add-mb",
        "16",
        "--workdir",
        &t.work(),
    ]));
    assert!(t.extents().len() > 1, "fragmented: {:?}", t.extents());
    let ov = t.overlay_copy();
    assert_eq!(std::fs::metadata(&ov).unwrap().len(), 48 << 20);
    let (code, text) = e2fsck_n(&ov);
    assert_eq!(code, 0, "{text}");
    t.check_boot_files(&ov);
    assert_eq!(
        fat_read(&t.img, t.part, "LiveOS/after.bin"),
        vec![0xA5u8; 64 << 10]
    );
    fsck_fat(&t.img, t.part, t.part_len, t.dir.path());

    // A second grow of the fragmented overlay.
    ok(&as_nobody(&[
        "overlay",
        "grow",
        t.s(),
        "--add-mb",
        "8",
        "--workdir",
        &t.work(),
    ]));
    let ov = t.overlay_copy();
    assert_eq!(std::fs::metadata(&ov).unwrap().len(), 56 << 20);
    assert_eq!(e2fsck_n(&ov).0, 0);
    t.check_boot_files(&ov);

    // Check and repair of the fragmented overlay: no offset reaches it, a copy does.
    t.damage();
    let sha = t.sha();
    let out = json(&as_nobody(&[
        "overlay",
        "recover",
        t.s(),
        "--workdir",
        &t.work(),
        "--json",
    ]));
    assert_eq!(out["check"]["exit_code"], 4);
    assert!(
        out["method"].as_str().unwrap().contains("not contiguous"),
        "{out}"
    );
    assert_eq!(t.sha(), sha);
    let out = t.recover_repair();
    assert_eq!(out["check_after"]["clean"], true, "{out}");
    let ov = t.overlay_copy();
    assert_eq!(e2fsck_n(&ov).0, 0);
    t.check_boot_files(&ov);
    fsck_fat(&t.img, t.part, t.part_len, t.dir.path());
}

#[test]
fn bare_file_recover_reports_then_repairs_and_grows() {
    if !ready() {
        return;
    }
    let t = stick();
    t.boot();
    t.damage();
    let ov = t.overlay_copy();
    give_away(&ov);
    let sha = sha256_file(&ov);
    let out = json(&as_nobody(&[
        "overlay",
        "recover",
        ov.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(out["check"]["clean"], false);
    assert_eq!(sha256_file(&ov), sha);
    // grow refuses what e2fsck -p does not fix; the file keeps its size.
    let e = failed(&as_nobody(&[
        "overlay",
        "grow",
        ov.to_str().unwrap(),
        "--add-mb",
        "16",
    ]));
    assert!(e.contains("e2fsck -f -p") && e.contains("--repair"), "{e}");
    assert_eq!(std::fs::metadata(&ov).unwrap().len(), 32 << 20);
    let out = json(&as_nobody(&[
        "overlay",
        "recover",
        ov.to_str().unwrap(),
        "--repair",
        "--add-mb",
        "16",
        "--json",
    ]));
    assert_eq!(out["check_after"]["clean"], true, "{out}");
    assert_eq!(out["grown"], true);
    assert_eq!(std::fs::metadata(&ov).unwrap().len(), 48 << 20);
    let (code, text) = e2fsck_n(&ov);
    assert_eq!(code, 0, "{text}");
    t.check_boot_files(&ov);
}

/// A grow that stopped after the file was extended (the ext4 inside still has its old
/// size) leaves a usable overlay, and `grow --size-mb` of the file's size finishes it.
#[test]
fn an_interrupted_grow_is_usable_and_finished_by_grow() {
    if !ready() {
        return;
    }
    let t = stick();
    t.boot();
    // A name that starts with '-' reaches e2fsck and resize2fs as a file, not an option.
    let ov = t.dir.path().join("-overlay.img");
    std::fs::rename(t.overlay_copy(), &ov).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&ov)
        .unwrap()
        .set_len(48 << 20)
        .unwrap();
    give_away(&ov);
    let (code, text) = e2fsck_n(&ov);
    assert_eq!(code, 0, "an ext4 in a larger file is valid: {text}");
    let status = json(&livestick(&[
        "overlay",
        "status",
        ov.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(status["size_bytes"], 48 << 20);
    let out = json(&as_nobody_in(
        t.dir.path(),
        &[
            "overlay",
            "grow",
            "--json",
            "--size-mb",
            "48",
            "--",
            "-overlay.img",
        ],
    ));
    assert_eq!(out["grown"], true);
    assert_eq!(out["grow"]["added_bytes"], 0);
    assert_eq!(out["grow"]["fs_bytes_before"], 32 << 20);
    let (code, text) = e2fsck_n(&ov);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("/49152 blocks"), "{text}");
    t.check_boot_files(&ov);
}

/// An OverlayFS overlay whose primary superblock is gone is still OverlayFS: the
/// stick's menus say so (`rd.live.overlay.overlayfs`). Read as a new dm-snapshot
/// store instead, status said "empty" and a reset made it a snapshot store the
/// live system cannot mount. e2fsck finds the backup superblock and repairs it.
#[test]
fn an_overlay_with_its_superblock_gone_stays_overlayfs_and_recovers() {
    if !ready() {
        return;
    }
    let t = stick();
    t.boot();
    {
        let mut s = Stick::open(&t.img, true).unwrap();
        let ext = s.file_extents(&t.overlay).unwrap();
        let mut f = ExtentFile::new(s.file_mut(), &ext);
        f.seek(SeekFrom::Start(1024)).unwrap();
        f.write_all(&[0u8; 1024]).unwrap();
        f.flush().unwrap();
    }
    let (code, text) = e2fsck_n(&t.overlay_copy());
    assert_ne!(code, 0, "the damage is real: {text}");
    let sha = t.sha();

    let status = t.status();
    assert_eq!(status["kind"], "overlayfs", "{status:#}");
    // Not "100 % used": the figures come from the backup, with what is wrong.
    let problems = status["problems"].to_string();
    assert!(
        problems.contains("primary ext4 superblock is damaged") && problems.contains("--repair"),
        "{status:#}"
    );
    assert!(
        status["percent_used"].as_f64().unwrap() < 100.0,
        "{status:#}"
    );
    // A grow cannot run resize2fs on it: bad input naming the way out, unchanged.
    let out = as_nobody(&["overlay", "grow", t.s(), "--add-mb", "16", "--yes"]);
    let e = failed(&out);
    assert_eq!(out.status.code(), Some(2), "{e}");
    assert!(
        e.contains("overlay recover") && e.contains("--repair --add-mb"),
        "{e}"
    );
    assert_eq!(t.sha(), sha);
    let dry = ok(&as_nobody(&["overlay", "reset", t.s(), "--dry-run"]));
    assert!(dry.contains("ext4 with overlayfs/ and ovlwork/"), "{dry}");
    assert_eq!(t.sha(), sha);

    let report = ok(&as_nobody(&["overlay", "recover", t.s()]));
    assert!(report.contains("--repair"), "{report}");
    assert_eq!(t.sha(), sha);
    let out = t.recover_repair();
    assert_eq!(out["check_after"]["clean"], true, "{out}");
    let ov = t.overlay_copy();
    let (code, text) = e2fsck_n(&ov);
    assert_eq!(code, 0, "{text}");
    t.check_boot_files(&ov);
    assert_eq!(t.status()["kind"], "overlayfs");
}

/// A reset says what the live system left in the upper dir, not the ext4's own
/// used blocks (its journal and tables, which an empty overlay has too).
#[test]
fn a_reset_counts_what_the_upper_dir_holds() {
    if !ready() {
        return;
    }
    let t = stick();
    let dry = ok(&as_nobody(&["overlay", "reset", t.s(), "--dry-run"]));
    assert!(
        dry.contains("discarding nothing: its OverlayFS upper dir is empty"),
        "{dry}"
    );
    t.boot();
    // /overlayfs/etc, etc/hostname, /overlayfs/home, home/big: 3 MiB and 21 bytes.
    let dry = ok(&as_nobody(&["overlay", "reset", t.s(), "--dry-run"]));
    assert!(
        dry.contains("4 entries (3.0 MiB in files) in its OverlayFS upper dir"),
        "{dry}"
    );
}
