//! `livestick overlay …` on whole sticks (image files made by `livestick write`):
//! the overlay is found by label/UUID and changed in place, squashfs.img is replaced
//! crash-safely inside FAT. Results are read back with independent tools (mtools,
//! fsck.fat, unsquashfs, e2fsck); "a boot" is simulated by writing through the
//! user-space copy-on-write writer exactly where the kernel would.

use std::io::{Cursor, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::support::*;
use livestick::disk::extent_file::ExtentFile;
use livestick::disk::fat;
use livestick::disk::stick::Stick;
use livestick::persist::merge::{self, MergeError, STEPS, StickMergeRequest};
use livestick::persist::snapshot::{self, CowWriter, Opened};
use livestick::squash;

const CHUNK: usize = 4096;

fn err_of(args: &[&str]) -> String {
    format!("{:#}", overlay(args).expect_err("expected an error"))
}

/// A stick with a 32 MiB overlay, written once and copied for every test.
fn base_stick() -> &'static Path {
    static BASE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, p) = BASE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("base.img");
        let iso = synthetic_iso("fedora-classic.iso");
        let out = livestick(&[
            "write",
            iso.to_str().unwrap(),
            image.to_str().unwrap(),
            "--size",
            "256M",
            "--volume-id",
            "1234ABCD",
            "--overlay-size-mb",
            "32",
            "--yes",
        ]);
        assert!(
            out.status.success(),
            "write: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (dir, image)
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
    fn work(&self) -> PathBuf {
        let w = self.dir.path().join("work");
        std::fs::create_dir_all(&w).unwrap();
        w
    }
}

fn stick() -> T {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("stick.img");
    std::fs::copy(base_stick(), &img).unwrap();
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

/// The root image inside the stick's squashfs.img, read with mtools + unsquashfs.
fn rootfs_on(t: &T) -> Vec<u8> {
    let scratch = tempfile::tempdir_in(t.dir.path()).unwrap();
    let sq = scratch.path().join("squashfs.img");
    fat_copy_out(&t.img, t.part, "LiveOS/squashfs.img", &sq);
    let x = scratch.path().join("x");
    squash::extract(&sq, &x).unwrap();
    std::fs::read(x.join("LiveOS/rootfs.img")).unwrap()
}

/// What the live system would see: the root image through the overlay (read with mtools).
fn booted_view(t: &T) -> Vec<u8> {
    let mut root = rootfs_on(t);
    let cow = fat_read(&t.img, t.part, &t.overlay);
    let mut c = Cursor::new(&cow[..]);
    if let Opened::Valid(store) = snapshot::open_store(&mut c, cow.len() as u64).unwrap() {
        let len = root.len() as u64;
        snapshot::apply_exceptions(
            &mut c,
            &store,
            &mut Cursor::new(&mut root),
            len,
            &mut |_, _| {},
        )
        .unwrap();
    }
    root
}

/// The changed root image: a file written and one removed with debugfs.
fn changed_root(t: &T, before: &[u8]) -> Vec<u8> {
    let b = t.dir.path().join("b.img");
    std::fs::write(&b, before).unwrap();
    let payload = t.dir.path().join("payload");
    std::fs::write(&payload, vec![0x42u8; 300_000]).unwrap();
    for cmd in [
        format!("write {} payload", payload.display()),
        "rm etc/livestick-fixture".to_string(),
    ] {
        run_cmd("debugfs", &["-w", "-R", &cmd, b.to_str().unwrap()]);
    }
    std::fs::read(&b).unwrap()
}

fn run_cmd(cmd: &str, args: &[&str]) {
    let p = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(cmd))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(cmd));
    let out = std::process::Command::new(p).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A "boot": the kernel initialises the store, then the live system writes `after`.
fn boot_and_write(t: &T, before: &[u8], after: &[u8]) -> u64 {
    let mut s = Stick::open(&t.img, true).unwrap();
    let extents = s.file_extents(&t.overlay).unwrap();
    let mut cow = ExtentFile::new(s.file_mut(), &extents);
    let len = cow.len();
    if let Opened::Uninitialised { .. } = snapshot::open_store(&mut cow, len).unwrap() {
        snapshot::create_new_store(&mut cow, len, 8).unwrap();
    }
    let Opened::Valid(store) = snapshot::open_store(&mut cow, len).unwrap() else {
        panic!("store not valid")
    };
    let mut w = CowWriter::new(*store, before.len() as u64).unwrap();
    let mut origin = Cursor::new(before);
    for (i, (x, y)) in before.chunks(CHUNK).zip(after.chunks(CHUNK)).enumerate() {
        if x != y {
            w.write_at(&mut origin, &mut cow, (i * CHUNK) as u64, y)
                .unwrap();
        }
    }
    w.store().exceptions.len() as u64
}

fn status_of(t: &T) -> snapshot::StatusReport {
    let mut s = Stick::open(&t.img, false).unwrap();
    let extents = s.file_extents(&t.overlay).unwrap();
    let mut cow = ExtentFile::new(s.file_mut(), &extents);
    let len = cow.len();
    snapshot::status(&mut cow, len, 8, None).unwrap()
}

fn tools_ok() -> bool {
    [
        "unsquashfs",
        "mksquashfs",
        "debugfs",
        "e2fsck",
        "mcopy",
        "fsck.fat",
    ]
    .iter()
    .all(|t| have(t))
}

#[test]
fn status_on_a_fresh_stick_then_after_a_boot() {
    if !require(tools_ok(), "squashfs-tools, e2fsprogs, mtools, dosfstools") {
        return;
    }
    let t = stick();
    overlay(&["status", t.s()]).unwrap();
    let r = status_of(&t);
    assert_eq!(r.state, "uninitialised");
    assert_eq!(r.exceptions, 0);
    // A new store: only the header and the first metadata area count as used.
    assert!(r.percent_used < 0.1, "{}", r.percent_used);

    let before = rootfs_on(&t);
    let after = changed_root(&t, &before);
    let n = boot_and_write(&t, &before, &after);
    assert!(n > 0);
    overlay(&["status", t.s()]).unwrap();
    let r = status_of(&t);
    assert_eq!(r.state, "valid");
    assert_eq!(r.exceptions, n);
    assert!(r.percent_used > 0.0);
    assert!(booted_view(&t) == after, "the boot's writes are visible");
    fsck_fat(&t.img, t.part, t.part_len, t.dir.path());
}

#[test]
fn merge_on_a_stick_replaces_squashfs_and_resets_the_overlay() {
    if !require(tools_ok(), "squashfs-tools, e2fsprogs, mtools, dosfstools") {
        return;
    }
    let t = stick();
    let before = rootfs_on(&t);
    let after = changed_root(&t, &before);
    boot_and_write(&t, &before, &after);
    let old_sq = fat_read(&t.img, t.part, "LiveOS/squashfs.img");
    let work = t.work();
    overlay(&[
        "merge",
        t.s(),
        "--yes",
        "--no-fsck",
        "--workdir",
        work.to_str().unwrap(),
    ])
    .unwrap();
    let new_sq = fat_read(&t.img, t.part, "LiveOS/squashfs.img");
    assert!(new_sq != old_sq, "squashfs.img replaced");
    // The manifest names the new image, so `verify` finds the stick intact.
    let manifest: serde_json::Value =
        serde_json::from_slice(&fat_read(&t.img, t.part, "LiveOS/livestick.json")).unwrap();
    let entry = listed_entry(&manifest, "/LiveOS/squashfs.img");
    assert_eq!(entry["kind"], "merged");
    assert_eq!(entry["size"], new_sq.len());
    assert_eq!(
        entry["sha256"].as_str().unwrap(),
        crate::support::dm_snapshot::sha256_hex(&new_sq)
    );
    let verified = livestick(&["verify", t.s()]);
    assert_eq!(
        verified.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&verified.stdout)
    );
    assert!(
        rootfs_on(&t) == after,
        "merged root image = the booted view"
    );
    let cow = fat_read(&t.img, t.part, &t.overlay);
    assert_eq!(cow.len(), 32 << 20, "overlay keeps its size");
    assert!(cow[..65536].iter().all(|&b| b == 0), "overlay reset");
    let ls = fat_ls(&t.img, t.part, "LiveOS");
    assert!(
        !ls.to_lowercase().contains(".new"),
        "no staged file left: {ls}"
    );
    fsck_fat(&t.img, t.part, t.part_len, t.dir.path());
    assert_eq!(
        std::fs::read_dir(&work).unwrap().count(),
        0,
        "work dir cleaned"
    );
    // Nothing left to merge: a second run changes nothing.
    overlay(&["merge", t.s(), "--yes", "--workdir", work.to_str().unwrap()]).unwrap();
    assert!(fat_read(&t.img, t.part, "LiveOS/squashfs.img") == new_sq);
}

#[test]
fn merge_with_fsck_keeps_the_view_equal_to_the_new_image() {
    if !require(tools_ok(), "squashfs-tools, e2fsprogs, mtools, dosfstools") {
        return;
    }
    let t = stick();
    let before = rootfs_on(&t);
    let after = changed_root(&t, &before);
    boot_and_write(&t, &before, &after);
    let mut plan = merge::plan_stick_merge(&StickMergeRequest {
        stick: t.img.clone(),
        live_dir: "LiveOS".into(),
        overlay: t.overlay.clone(),
        workdir: t.work(),
        fsck: true,
        compress: None,
    })
    .unwrap();
    // Stop between the swap and the reset: new image + old overlay must show the new image.
    plan.failpoint = Some("swap".into());
    let e = merge::execute_merge(&plan, &mut |_, _, _| {}).unwrap_err();
    assert!(matches!(e, MergeError::Failpoint("swap")), "{e}");
    let new_root = rootfs_on(&t);
    assert!(new_root != before);
    assert!(
        booted_view(&t) == new_root,
        "e2fsck's changes were folded into the overlay before the swap"
    );
    let img = t.dir.path().join("check.img");
    std::fs::write(&img, &new_root).unwrap();
    run_cmd("e2fsck", &["-f", "-n", img.to_str().unwrap()]);
}

#[test]
fn a_stop_after_any_step_leaves_a_bootable_consistent_stick() {
    if !require(tools_ok(), "squashfs-tools, e2fsprogs, mtools, dosfstools") {
        return;
    }
    let t = stick();
    let before = rootfs_on(&t);
    let after = changed_root(&t, &before);
    boot_and_write(&t, &before, &after);
    let pristine = std::fs::read(&t.img).unwrap();
    let old_sq = fat_read(&t.img, t.part, "LiveOS/squashfs.img");
    for step in STEPS {
        std::fs::write(&t.img, &pristine).unwrap();
        let mut plan = merge::plan_stick_merge(&StickMergeRequest {
            stick: t.img.clone(),
            live_dir: "LiveOS".into(),
            overlay: t.overlay.clone(),
            workdir: t.work(),
            fsck: false,
            compress: None,
        })
        .unwrap();
        plan.failpoint = Some(step.to_string());
        let e = merge::execute_merge(&plan, &mut |_, _, _| {}).unwrap_err();
        assert!(
            matches!(e, MergeError::Failpoint(s) if s == step),
            "{step}: {e}"
        );
        let sq_now = fat_read(&t.img, t.part, "LiveOS/squashfs.img");
        let swapped =
            STEPS.iter().position(|s| *s == step) >= STEPS.iter().position(|s| *s == "swap");
        assert_eq!(
            sq_now != old_sq,
            swapped,
            "{step}: replaced at the wrong step"
        );
        assert!(
            booted_view(&t) == after,
            "{step}: the stick no longer boots the changed system"
        );
        fsck_fat(&t.img, t.part, t.part_len, t.dir.path());
    }
    // A later run cleans up a stale staged image and finishes.
    overlay(&[
        "merge",
        t.s(),
        "--yes",
        "--no-fsck",
        "--workdir",
        t.work().to_str().unwrap(),
    ])
    .unwrap();
    assert!(rootfs_on(&t) == after);
    assert!(
        !fat_ls(&t.img, t.part, "LiveOS")
            .to_lowercase()
            .contains(".new")
    );
    fsck_fat(&t.img, t.part, t.part_len, t.dir.path());
}

#[test]
fn grow_inside_fat_keeps_every_exception_and_checks_limits() {
    if !require(tools_ok(), "squashfs-tools, e2fsprogs, mtools, dosfstools") {
        return;
    }
    let t = stick();
    let before = rootfs_on(&t);
    let after = changed_root(&t, &before);
    let n = boot_and_write(&t, &before, &after);
    overlay(&["grow", t.s(), "--add-mb", "16"]).unwrap();
    assert_eq!(fat_read(&t.img, t.part, &t.overlay).len(), 48 << 20);
    let r = status_of(&t);
    assert_eq!(r.exceptions, n);
    assert!(booted_view(&t) == after, "grow keeps the view");
    fsck_fat(&t.img, t.part, t.part_len, t.dir.path());

    let e = err_of(&["grow", t.s(), "--size-mb", "5000"]);
    assert!(e.contains("4095") && e.contains("FAT32"), "{e}");
    let e = err_of(&["grow", t.s(), "--size-mb", "1000"]);
    assert!(
        e.contains("not enough free space") && e.contains("bytes"),
        "{e}"
    );
    assert_eq!(fat_read(&t.img, t.part, &t.overlay).len(), 48 << 20);
}

#[test]
fn recover_an_invalid_overlay_on_a_stick_with_repair() {
    if !require(tools_ok(), "squashfs-tools, e2fsprogs, mtools, dosfstools") {
        return;
    }
    let t = stick();
    let before = rootfs_on(&t);
    let after = changed_root(&t, &before);
    let n = boot_and_write(&t, &before, &after);
    // What the kernel does when the store overflows: valid = 0.
    {
        let mut s = Stick::open(&t.img, true).unwrap();
        let extents = s.file_extents(&t.overlay).unwrap();
        let mut cow = ExtentFile::new(s.file_mut(), &extents);
        cow.seek(SeekFrom::Start(4)).unwrap();
        cow.write_all(&0u32.to_le_bytes()).unwrap();
    }
    assert_eq!(status_of(&t).state, "invalid");
    let e = err_of(&["merge", t.s(), "--yes", "--no-fsck"]);
    assert!(e.contains("recover"), "{e}");
    overlay(&["recover", t.s(), "--dry-run"]).unwrap();
    assert_eq!(status_of(&t).state, "invalid", "dry run changes nothing");
    overlay(&[
        "recover",
        t.s(),
        "--repair",
        "--workdir",
        t.work().to_str().unwrap(),
    ])
    .unwrap();
    let r = status_of(&t);
    assert_eq!(r.state, "valid");
    assert!(r.exceptions >= n);
    // The view is now a file system e2fsck calls clean.
    let img = t.dir.path().join("view.img");
    std::fs::write(&img, booted_view(&t)).unwrap();
    run_cmd("e2fsck", &["-f", "-n", img.to_str().unwrap()]);
}

#[test]
fn orphaned_overlay_is_reported_and_can_be_chosen() {
    if !require(tools_ok(), "squashfs-tools, e2fsprogs, mtools, dosfstools") {
        return;
    }
    let t = stick();
    {
        let mut s = Stick::open(&t.img, true).unwrap();
        let overlay = t.overlay.clone();
        s.with_fs(|fs| {
            fat::rename(fs, &overlay, "/LiveOS/overlay-OLDLABEL-0000-0001").unwrap();
            Ok(())
        })
        .unwrap();
    }
    // status falls back to the orphan and says so; changing commands refuse to guess.
    overlay(&["status", t.s()]).unwrap();
    let e = err_of(&["reset", t.s(), "--yes"]);
    assert!(
        e.contains("orphaned") && e.contains("overlay-OLDLABEL-0000-0001"),
        "{e}"
    );
    assert!(e.contains(&t.overlay), "{e}");
    overlay(&[
        "reset",
        t.s(),
        "--yes",
        "--overlay-file",
        "overlay-OLDLABEL-0000-0001",
    ])
    .unwrap();
}

#[test]
fn bad_inputs_have_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let e = err_of(&["status", d.path().join("missing.img").to_str().unwrap()]);
    assert!(e.contains("missing.img"), "{e}");

    // A disk image with a partition table but no FAT filesystem.
    let disk = d.path().join("disk.img");
    let mut bytes = vec![0u8; 4 << 20];
    bytes[510] = 0x55;
    bytes[511] = 0xAA;
    std::fs::write(&disk, &bytes).unwrap();
    let e = err_of(&["status", disk.to_str().unwrap()]);
    assert!(
        e.contains("no FAT partition") || e.contains("partition"),
        "{e}"
    );
    // A write without --format to such a target: its input, not a failing device.
    let iso = synthetic_iso("fedora-classic.iso");
    std::fs::File::options()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    sfdisk_script(&disk, "start=2048, type=83\n");
    let out = livestick(&[
        "write",
        iso.to_str().unwrap(),
        disk.to_str().unwrap(),
        "--yes",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("no FAT partition") && err.contains("--format"),
        "{err}"
    );
    assert!(!err.contains("dmesg"), "{err}");

    if !require(tools_ok(), "squashfs-tools, e2fsprogs, mtools, dosfstools") {
        return;
    }
    // A live stick without an overlay.
    let img = d.path().join("plain.img");
    let iso = synthetic_iso("fedora-classic.iso");
    let out = livestick(&[
        "write",
        iso.to_str().unwrap(),
        img.to_str().unwrap(),
        "--size",
        "256M",
        "--yes",
    ]);
    assert!(out.status.success());
    let e = err_of(&["merge", img.to_str().unwrap(), "--yes"]);
    assert!(e.contains("no persistent overlay"), "{e}");
    // Bare-file options make no sense on a stick.
    let t = stick();
    let e = err_of(&["merge", t.s(), "--origin", "/nonexistent", "--yes"]);
    assert!(e.contains("bare files"), "{e}");
    // Without a terminal and without --yes, a merge on a stick is refused.
    let before = rootfs_on(&t);
    let after = changed_root(&t, &before);
    boot_and_write(&t, &before, &after);
    let e = err_of(&["merge", t.s(), "--no-fsck"]);
    assert!(e.contains("--yes"), "{e}");
}
