//! Targets opened once (issue 13): every command opens its target once, right after
//! its safety checks (`disk::target::open_target`, `open_write_target`), and
//! everything after goes through that handle. Proven two ways: `strace -f` counts
//! every open of the target's path by livestick and the programs it runs (one), and
//! failpoints rename another file over the path — `after-probe` between the first
//! look and the open (the open refuses it: exit 3, nothing written), `after-check`
//! right after the open (the command completes on the file it opened and never
//! touches the one at the path).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::fixtures::synthetic_iso;
use crate::support::*;

/// A stick with a 32 MiB overlay and a plain 16 MiB home.
fn stick(dir: &Path, name: &str) -> PathBuf {
    stick_of("fedora-classic.iso", dir, name, &["--size", "256M"])
}

/// A stick of `iso` with a 32 MiB overlay and a plain 16 MiB home, written with
/// `extra` options.
fn stick_of(iso: &str, dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let iso = synthetic_iso(iso);
    let img = dir.join(name);
    let mut args = vec![
        "write",
        iso.to_str().unwrap(),
        img.to_str().unwrap(),
        "--overlay-size-mb",
        "32",
        "--home-size-mb",
        "16",
        "--unencrypted-home",
        "--yes",
        "-q",
    ];
    args.extend_from_slice(extra);
    ok(&livestick(&args));
    img
}

/// `livestick args` with `decoy` renamed over `target` right after the first look.
fn with_swap(args: &[&str], decoy: &Path) -> Output {
    Command::new(bin())
        .args(args)
        .env("LIVESTICK_FAILPOINT", "after-probe")
        .env("LIVESTICK_FAILPOINT_SWAP", decoy)
        .output()
        .expect("livestick runs")
}

/// Refused, and the file swapped in is byte for byte what it was.
fn assert_refused_untouched(out: &Output, target: &Path, decoy_bytes: &[u8], exit: Option<i32>) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the swapped target was worked on: {err}"
    );
    if let Some(code) = exit {
        assert_eq!(out.status.code(), Some(code), "{err}");
        assert!(err.contains("changed after it was checked"), "{err}");
    }
    assert!(
        std::fs::read(target).unwrap() == decoy_bytes,
        "the file renamed over the target was written: {err}"
    );
}

#[test]
fn a_stick_swapped_after_the_first_look_is_never_written() {
    if !require(have("mcopy") && have("fsck.fat"), "mtools, dosfstools") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let iso = synthetic_iso("fedora-classic.iso");
    let target = stick(dir.path(), "target.img");
    let original = stick(dir.path(), "original.img");
    let t = target.to_str().unwrap();
    // Every verb of `overlay` and `home`, the ones that only look included: what
    // they would report is not the stick the user pointed at.
    let cases: [Vec<&str>; 9] = [
        vec!["write", iso.to_str().unwrap(), t, "--yes"],
        vec!["home", "resize", t, "--size-mb", "24", "--yes"],
        vec!["home", "info", t],
        vec!["overlay", "status", t],
        vec!["overlay", "grow", t, "--add-mb", "8", "--yes"],
        vec!["overlay", "reset", t, "--yes"],
        vec!["overlay", "recover", t, "--repair", "--yes"],
        vec!["overlay", "merge", t, "--yes"],
        vec!["overlay", "merge", t, "--dry-run"],
    ];
    for args in cases {
        // A fresh decoy each time: another stick, as a user might have plugged in.
        let decoy = dir.path().join("decoy.img");
        std::fs::copy(&original, &decoy).unwrap();
        let decoy_bytes = std::fs::read(&decoy).unwrap();
        let out = with_swap(&args, &decoy);
        // A safety refusal (3) for every verb: before, `overlay` took the swapped-in
        // stick for a bare file and refused it as not an overlay (2).
        assert_refused_untouched(&out, &target, &decoy_bytes, Some(3));
        let part = part_start(&target);
        let len = std::fs::metadata(&target).unwrap().len() - part;
        fsck_fat(&target, part, len, dir.path());
    }
}

/// A written stick's home.img copied out as a bare file into `dir`, and a copy of it
/// as the decoy a failpoint swaps in: (home, decoy, the decoy's bytes).
fn bare_home_and_decoy(dir: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
    let img = stick(dir, "stick.img");
    let part = part_start(&img);
    let home = dir.join("home.img");
    fat_copy_out(&img, part, "LiveOS/home.img", &home);
    let decoy = dir.join("decoy.img");
    std::fs::copy(&home, &decoy).unwrap();
    let decoy_bytes = std::fs::read(&decoy).unwrap();
    (home, decoy, decoy_bytes)
}

#[test]
fn a_bare_home_file_swapped_after_the_first_look_is_never_written() {
    if !require(have("mcopy") && have("resize2fs"), "mtools, e2fsprogs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (home, decoy, decoy_bytes) = bare_home_and_decoy(dir.path());
    let out = with_swap(
        &[
            "home",
            "resize",
            home.to_str().unwrap(),
            "--size-mb",
            "24",
            "--yes",
        ],
        &decoy,
    );
    assert_refused_untouched(&out, &home, &decoy_bytes, Some(3));
    // The control: without the swap the same command grows the file.
    ok(&livestick(&[
        "home",
        "resize",
        home.to_str().unwrap(),
        "--size-mb",
        "24",
        "--yes",
    ]));
    assert_eq!(std::fs::metadata(&home).unwrap().len(), 24 << 20);
}

/// The window after the last check (issue 13): `LIVESTICK_FAILPOINT=after-check`
/// renames the decoy over a bare home.img right after the handle `home resize`
/// writes through was opened and checked. Opened once, the resize (e2fsck and
/// resize2fs included) and its report go through that handle: the original file
/// is grown, the decoy at the path is not touched. Before, `home::home_resize` opened
/// the path afresh after the check and grew whatever was there by then.
#[test]
fn a_bare_home_file_swapped_after_its_checked_open_is_grown_through_the_handle() {
    if !require(have("mcopy") && have("resize2fs"), "mtools, e2fsprogs") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (home, decoy, decoy_bytes) = bare_home_and_decoy(dir.path());
    // Kept open by name elsewhere: the original is renamed over, so this link is
    // how the test reads what the resize did to it.
    let original = dir.path().join("original-link.img");
    std::fs::hard_link(&home, &original).unwrap();
    let out = Command::new(bin())
        .args([
            "--json",
            "home",
            "resize",
            home.to_str().unwrap(),
            "--size-mb",
            "24",
            "--yes",
        ])
        .env("LIVESTICK_FAILPOINT", "after-check")
        .env("LIVESTICK_FAILPOINT_SWAP", &decoy)
        .output()
        .expect("livestick runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!decoy.exists(), "the failpoint never swapped: {err}");
    assert!(
        std::fs::read(&home).unwrap() == decoy_bytes,
        "the file renamed over home.img after the check was written: {err}"
    );
    assert_eq!(std::fs::metadata(&original).unwrap().len(), 24 << 20);
    e2fsck_clean(&original);
    // The report is of the file grown, read through the same handle.
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        doc["result"]["size_bytes"],
        serde_json::json!(24 << 20),
        "{doc}"
    );
    assert_eq!(
        doc["result"]["fs"]["size_bytes"],
        serde_json::json!(24 << 20),
        "{doc}"
    );
}

/// A new image file is created with `O_EXCL` and opened again for the write; a file
/// renamed over it in between (`LIVESTICK_FAILPOINT=after-create`) is refused as
/// replaced (3) and left as it was, neither written nor removed as "the new image".
/// Before, that second open had no identity to check and wrote whatever was there.
#[test]
fn a_file_renamed_over_a_new_image_before_its_write_is_never_written() {
    let dir = tempfile::tempdir().unwrap();
    let iso = synthetic_iso("fedora-classic.iso");
    let target = dir.path().join("new.img");
    let decoy = dir.path().join("decoy.img");
    let decoy_bytes: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&decoy, &decoy_bytes).unwrap();
    let out = Command::new(bin())
        .args([
            "write",
            iso.to_str().unwrap(),
            target.to_str().unwrap(),
            "--size",
            "256M",
            "--yes",
        ])
        .env("LIVESTICK_FAILPOINT", "after-create")
        .env("LIVESTICK_FAILPOINT_SWAP", &decoy)
        .output()
        .expect("livestick runs");
    assert!(!decoy.exists(), "the failpoint never swapped");
    assert_refused_untouched(&out, &target, &decoy_bytes, Some(3));
}

/// `write` over an existing stick goes through the handle it opened and checked, to
/// the end: `LIVESTICK_FAILPOINT=after-check` renames a decoy over the image right
/// after that open, and the write completes on the stick it opened (the SYSLINUX
/// installer included, which reaches it as `/proc/self/fd/N`), leaving the decoy at
/// the path untouched. Before, the installer was given the path and wrote into the
/// decoy.
#[test]
fn a_stick_swapped_after_the_checked_open_of_a_write_is_never_written() {
    if !require(have("mcopy") && have("fsck.fat"), "mtools, dosfstools") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let iso = synthetic_iso("fedora-classic.iso");
    let target = stick(dir.path(), "target.img");
    // The original is renamed over: this link is how the test reads what the write
    // did to it.
    let original = dir.path().join("original-link.img");
    std::fs::hard_link(&target, &original).unwrap();
    let decoy = dir.path().join("decoy.img");
    let decoy_bytes: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&decoy, &decoy_bytes).unwrap();
    let out = Command::new(bin())
        .args(["write", iso.to_str().unwrap(), target.to_str().unwrap()])
        .args(["--format", "--yes"])
        .env("LIVESTICK_FAILPOINT", "after-check")
        .env("LIVESTICK_FAILPOINT_SWAP", &decoy)
        .output()
        .expect("livestick runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(!decoy.exists(), "the failpoint never swapped: {err}");
    assert!(
        std::fs::read(&target).unwrap() == decoy_bytes,
        "the file renamed over the stick after its checked open was written: {err}"
    );
    let part = part_start(&original);
    let len = std::fs::metadata(&original).unwrap().len() - part;
    fsck_fat(&original, part, len, dir.path());
    let listing = fat_ls(&original, part, "syslinux");
    assert!(
        listing.to_ascii_lowercase().contains("ldlinux"),
        "no SYSLINUX on the stick written: {listing}"
    );
}

/// Every open (attempted or not) of `target` by `livestick args` and every program it
/// runs, as `strace -f` saw them, with the command's output.
fn opens_of(target: &str, args: &[&str]) -> (Output, Vec<String>) {
    let scratch = tempfile::tempdir().unwrap();
    let trace = scratch.path().join("trace");
    let out = Command::new(tool("strace"))
        .args(["-f", "-qq", "-e", "trace=open,openat,creat", "-o"])
        .arg(&trace)
        .arg(bin())
        .args(args)
        .output()
        .expect("strace runs");
    let quoted = format!("\"{target}\"");
    let opens = std::fs::read_to_string(&trace)
        .expect("strace's trace")
        .lines()
        .filter(|line| line.contains(&quoted))
        .map(str::to_string)
        .collect();
    (out, opens)
}

/// `livestick args` succeeds (or, with `may_refuse`, refuses with exit 2, as a verb the
/// layout does not support yet does) and opens `target` exactly once, successfully.
fn assert_opened_once(target: &str, args: &[&str], may_refuse: bool) {
    let (out, opens) = opens_of(target, args);
    let err = String::from_utf8_lossy(&out.stderr);
    let refused = may_refuse && out.status.code() == Some(2);
    assert!(out.status.success() || refused, "{args:?}: {err}");
    assert_eq!(
        opens.len(),
        1,
        "{args:?} opened {target} other than once:\n{}\n{err}",
        opens.join("\n")
    );
    assert!(
        !opens[0].contains("= -1"),
        "{args:?}: the one open failed: {}",
        opens[0]
    );
}

/// The verbs of `overlay` and `home` a stick of either layout takes, each opening the
/// stick once; `merge` may be refused by a layout that cannot merge yet, and on a
/// dm-snapshot overlay emptied by `reset` it has nothing to merge.
fn maintenance_verbs(t: &str, merge_may_refuse: bool) {
    for (args, may_refuse) in [
        (vec!["overlay", "status", t], false),
        (vec!["overlay", "grow", t, "--add-mb", "8", "--yes"], false),
        (vec!["overlay", "recover", t, "--dry-run"], false),
        (vec!["overlay", "reset", t, "--yes"], false),
        (vec!["overlay", "merge", t, "--dry-run"], merge_may_refuse),
        (vec!["overlay", "merge", t, "--yes"], merge_may_refuse),
        (vec!["home", "info", t], false),
        (
            vec!["home", "resize", t, "--size-mb", "24", "--dry-run"],
            false,
        ),
        (vec!["home", "resize", t, "--size-mb", "24", "--yes"], false),
    ] {
        assert_opened_once(t, &args, may_refuse);
    }
}

#[test]
fn every_command_opens_a_fat_stick_image_once() {
    if !require(
        have("strace") && have("mcopy") && have("resize2fs"),
        "strace, mtools, e2fsprogs",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let iso = synthetic_iso("fedora-classic.iso");
    let target = stick(dir.path(), "target.img");
    let t = target.to_str().unwrap();
    maintenance_verbs(t, false);
    // `recover --repair` of the dm-snapshot overlay reads the root image in
    // squashfs.img on the stick (unsquashfs, through the handle).
    assert_opened_once(t, &["overlay", "recover", t, "--repair", "--yes"], false);
    let i = iso.to_str().unwrap();
    assert_opened_once(t, &["write", i, t, "--dry-run"], false);
    assert_opened_once(t, &["write", i, t, "--yes"], false);
    // `verify` repairs a stopped replacement first, then reads every file back.
    assert_opened_once(t, &["verify", t], false);
    assert_opened_once(t, &["verify", t, "--deep"], false);
    let part = part_start(&target);
    let len = std::fs::metadata(&target).unwrap().len() - part;
    fsck_fat(&target, part, len, dir.path());
}

/// A merge that has something to merge: a file put into the OverlayFS overlay of a
/// stick; extraction, the debugfs reads and the staging all go through the handle.
#[test]
fn a_merge_with_changes_opens_its_stick_once() {
    if !require(
        have("strace") && have("mcopy") && have("debugfs") && have("mksquashfs"),
        "strace, mtools, e2fsprogs, squashfs-tools",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let target = stick_of(
        "fedora-grub.iso",
        dir.path(),
        "ovl.img",
        &["--size", "300M", "--overlayfs"],
    );
    put_into_overlayfs_overlay(&target, "note.txt", b"merged\n", dir.path());
    let t = target.to_str().unwrap();
    assert_opened_once(t, &["overlay", "merge", t, "--dry-run"], false);
    let (out, opens) = opens_of(t, &["--json", "overlay", "merge", t, "--yes"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(opens.len(), 1, "{}\n{err}", opens.join("\n"));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(doc["overlayfs"]["created"], 1, "{doc}");
    let part = part_start(&target);
    let len = std::fs::metadata(&target).unwrap().len() - part;
    fsck_fat(&target, part, len, dir.path());
}

#[test]
fn every_command_opens_an_ext4_layout_stick_once() {
    if !require(
        have("strace") && have("debugfs") && have("resize2fs"),
        "strace, e2fsprogs",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let target = stick_of(
        "fedora-classic.iso",
        dir.path(),
        "ext4.img",
        &["--size", "1G", "--ext4"],
    );
    let t = target.to_str().unwrap();
    // `merge` on this layout is refused today (issue 12); opened once all the same.
    maintenance_verbs(t, true);
    let iso = synthetic_iso("fedora-classic.iso");
    let i = iso.to_str().unwrap();
    assert_opened_once(t, &["write", i, t, "--dry-run"], false);
    assert_opened_once(t, &["write", i, t, "--format", "--ext4", "--yes"], false);
    let p2 = &sfdisk(&target)["partitiontable"]["partitions"][1]["start"];
    let spec = format!("{}?offset={}", t, p2.as_u64().expect("partition 2") * 512);
    let check = Command::new(tool("e2fsck"))
        .args(["-fn", &spec])
        .output()
        .expect("e2fsck runs");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}

/// On a loop device (a block device, opened with `O_EXCL`): `write` onto the stick it
/// holds and the maintenance verbs open `/dev/loopN` once each.
#[test]
fn every_command_opens_a_loop_device_once() {
    if !require(is_root(), "root (loop devices)")
        || !require(
            have("strace") && have("mcopy") && have("resize2fs"),
            "strace, mtools, e2fsprogs",
        )
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let iso = synthetic_iso("fedora-classic.iso");
    let image = stick(dir.path(), "loop.img");
    let Some(dev) = loop_device(&[], &image) else {
        return;
    };
    let t = dev.0.as_str();
    let i = iso.to_str().unwrap();
    // A loop device is not removable: `write` needs --force.
    assert_opened_once(t, &["write", i, t, "--force", "--yes"], false);
    maintenance_verbs(t, false);
    drop(dev);
    let part = part_start(&image);
    let len = std::fs::metadata(&image).unwrap().len() - part;
    fsck_fat(&image, part, len, dir.path());
}

/// `LIVESTICK_FAILPOINT=after-check` renames a decoy over the stick right after the
/// command's one open: each verb completes on the stick it opened (its report is of
/// that stick, its change made there), and the decoy at the path is byte for byte
/// what it was. Before, each later open by path reached the decoy and was refused.
#[test]
fn a_stick_swapped_after_its_one_open_is_worked_on_through_the_handle() {
    if !require(
        have("mcopy") && have("fsck.fat") && have("resize2fs"),
        "mtools, dosfstools, e2fsprogs",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = stick(dir.path(), "base.img");
    let other = stick(dir.path(), "other.img");
    let json_of = |args: &[&str]| -> serde_json::Value {
        serde_json::from_str(&ok(&livestick(args))).expect("JSON")
    };
    let cases: [Vec<&str>; 7] = [
        vec!["overlay", "status"],
        vec!["overlay", "grow", "--add-mb", "8", "--yes"],
        vec!["overlay", "reset", "--yes"],
        vec!["overlay", "recover", "--repair", "--yes"],
        vec!["overlay", "merge", "--yes"],
        vec!["home", "info"],
        vec!["home", "resize", "--size-mb", "24", "--yes"],
    ];
    for verb in cases {
        let target = dir.path().join("target.img");
        std::fs::copy(&base, &target).unwrap();
        // The original is renamed over: this link is how the test reads it after.
        let original = dir.path().join("original-link.img");
        let _ = std::fs::remove_file(&original);
        std::fs::hard_link(&target, &original).unwrap();
        let o = original.to_str().unwrap();
        let status_before = json_of(&["--json", "overlay", "status", o]);
        let decoy = dir.path().join("decoy.img");
        std::fs::copy(&other, &decoy).unwrap();
        let decoy_bytes = std::fs::read(&decoy).unwrap();
        let mut args = vec!["--json"];
        args.extend_from_slice(&verb[..verb.len().min(2)]);
        args.push(target.to_str().unwrap());
        args.extend_from_slice(&verb[2..]);
        let out = Command::new(bin())
            .args(&args)
            .env("LIVESTICK_FAILPOINT", "after-check")
            .env("LIVESTICK_FAILPOINT_SWAP", &decoy)
            .output()
            .expect("livestick runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{verb:?}: {err}");
        assert!(
            !decoy.exists(),
            "{verb:?}: the failpoint never swapped: {err}"
        );
        assert!(
            std::fs::read(&target).unwrap() == decoy_bytes,
            "{verb:?}: the file renamed over the stick after its one open was touched: {err}"
        );
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let status_after = json_of(&["--json", "overlay", "status", o]);
        match verb[1] {
            // The report is of the stick opened: its overlay, by its label and UUID.
            "status" => assert_eq!(
                doc["expected_overlay"], status_before["expected_overlay"],
                "{doc}"
            ),
            "grow" => assert_eq!(
                status_after["size_bytes"].as_u64(),
                status_before["size_bytes"].as_u64().map(|b| b + (8 << 20)),
                "{status_after}"
            ),
            "resize" => {
                let home = json_of(&["--json", "home", "info", o]);
                assert_eq!(home["size_bytes"], serde_json::json!(24 << 20), "{home}");
            }
            _ => {}
        }
        let part = part_start(&original);
        let len = std::fs::metadata(&original).unwrap().len() - part;
        fsck_fat(&original, part, len, dir.path());
    }
}

/// `restore` (its dry run, and the real one saving home.img first) opens the stick
/// once, and so does a raw disk image written over it.
#[test]
fn restore_and_a_raw_write_open_the_stick_once() {
    if !require(
        have("strace") && have("mcopy") && have("sfdisk"),
        "strace, mtools, fdisk",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let target = stick(dir.path(), "target.img");
    let t = target.to_str().unwrap();
    let saved = dir.path().join("saved-home.img");
    assert_opened_once(t, &["restore", t, "--dry-run"], false);
    let save = saved.to_str().unwrap();
    assert_opened_once(t, &["restore", t, "--save-home", save, "--yes"], false);
    assert_eq!(std::fs::metadata(&saved).unwrap().len(), 16 << 20);
    // A raw image: a GPT and no live system, written as it is.
    let raw = dir.path().join("disk.raw");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(8 << 20))
        .unwrap();
    let mut sfdisk = Command::new("sfdisk")
        .args(["-q", raw.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("sfdisk runs");
    use std::io::Write;
    sfdisk
        .stdin
        .take()
        .unwrap()
        .write_all(b"label: gpt\nsize=4MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n")
        .unwrap();
    assert!(sfdisk.wait().unwrap().success(), "sfdisk failed");
    assert_opened_once(t, &["write", raw.to_str().unwrap(), t, "--yes"], false);
    assert_eq!(
        read_at(&target, 0, 8 << 20),
        std::fs::read(&raw).unwrap(),
        "the raw image is on the stick"
    );
}
