//! A target is what it was when the command first looked at it (issue 13, "targets
//! opened once"): `LIVESTICK_FAILPOINT=after-probe` renames another file over the
//! target right after that first look (`disk::target::pin`), as another process
//! could; every later open then finds a different file and refuses it, so the file
//! swapped in is never written. Without the pin, each open probes afresh and the
//! swapped-in stick would be changed.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::fixtures::synthetic_iso;
use crate::support::*;

/// A stick with a 32 MiB overlay and a plain 16 MiB home.
fn stick(dir: &Path, name: &str) -> PathBuf {
    let iso = synthetic_iso("fedora-classic.iso");
    let img = dir.join(name);
    ok(&livestick(&[
        "write",
        iso.to_str().unwrap(),
        img.to_str().unwrap(),
        "--size",
        "256M",
        "--overlay-size-mb",
        "32",
        "--home-size-mb",
        "16",
        "--unencrypted-home",
        "--yes",
    ]));
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
