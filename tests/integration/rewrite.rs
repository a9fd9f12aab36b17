//! A rewrite keeps what did not change (issue 12 part 5): writing an ISO onto a
//! stick that holds the same root image keeps the overlay byte for byte; a changed
//! root image empties it, and the plan and the report name it and what it held.

use std::path::Path;

use livestick::disk::extent_file::ExtentFile;
use livestick::disk::stick::Stick;

use crate::support::*;

const MIB: u64 = 1 << 20;
const OVERLAY: &str = "/LiveOS/overlay-LIVE-3333-CCCC";

fn json_of(args: &[&str]) -> serde_json::Value {
    let mut full = vec!["--json", "write"];
    full.extend_from_slice(args);
    let out = livestick(&full);
    serde_json::from_str(&ok(&out)).expect("JSON on stdout")
}

/// What a boot leaves in the dm-snapshot store: the kernel initialises it, then
/// the live system changes three chunks of its root. Returns the changed chunks.
fn boot_and_write(image: &Path) -> u64 {
    let mut stick = Stick::open(image, true).expect("opens the stick");
    let extents = stick
        .file_extents(OVERLAY)
        .expect("the overlay is on the stick");
    let mut cow = ExtentFile::new(stick.file_mut(), &extents);
    let len = cow.len();
    crate::support::dm_snapshot::boot_and_change(&mut cow, len)
}

fn kept(value: &serde_json::Value) -> &serde_json::Value {
    &value["kept_overlay"]
}

#[test]
fn same_root_image_keeps_the_overlay_and_a_changed_one_empties_it() {
    let classic = synthetic_iso("fedora-classic.iso");
    let grub = synthetic_iso("fedora-grub.iso");
    let dir = tmp();
    let image = dir.path().join("stick.img");
    let (iso, img) = (classic.to_str().unwrap(), image.to_str().unwrap());
    json_of(&[
        iso,
        img,
        "--size",
        "256M",
        "--overlay-size-mb",
        "16",
        "--volume-id",
        "3333CCCC",
    ]);
    let start = part_start(&image);
    // The record beside the root image names what was written.
    let from_iso = dir.path().join("iso-squashfs.img");
    iso_extract(&classic, "/LiveOS/squashfs.img", &from_iso);
    let record = String::from_utf8(fat_read(&image, start, "/LiveOS/.livestick")).unwrap();
    assert!(
        record.contains(&format!("sha256={}\n", sha256_file(&from_iso))),
        "{record}"
    );
    assert!(record.contains("iso_md5="), "{record}");

    let changed = boot_and_write(&image);
    assert_eq!(changed, 3);
    let before = fat_read(&image, start, OVERLAY);
    let used = 3 * 8 * 512;

    // The same ISO again: recognised by its record, the overlay kept byte for byte.
    let plan = json_of(&[iso, img, "--dry-run"]);
    assert_eq!(kept(&plan)["reset"], false, "{plan}");
    assert_eq!(kept(&plan)["used_bytes"], used, "{plan}");
    let why = kept(&plan)["why"].as_str().unwrap();
    assert!(
        why.contains("written from this ISO (implanted MD5"),
        "{why}"
    );
    let report = json_of(&[iso, img]);
    assert_eq!(kept(&report)["reset"], false, "{report}");
    assert!(
        fat_read(&image, start, OVERLAY) == before,
        "the overlay changed"
    );

    // Without the record the stick's image is hashed: the same, so still kept.
    let out = std::process::Command::new("mdel")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{img}@@{start}"))
        .arg("::/LiveOS/.livestick")
        .output()
        .expect("mtools installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan = json_of(&[iso, img, "--dry-run"]);
    let why = kept(&plan)["why"].as_str().unwrap();
    assert_eq!(kept(&plan)["reset"], false, "{plan}");
    assert!(why.contains("same size and sha256"), "{why}");

    // Another ISO with the same root image (the fixtures share one): kept too,
    // found by hashing the ISO's image and comparing it with the record.
    json_of(&[iso, img]);
    let plan = json_of(&[grub.to_str().unwrap(), img, "--dry-run"]);
    assert_eq!(kept(&plan)["reset"], false, "{plan}");
    assert!(
        kept(&plan)["why"]
            .as_str()
            .unwrap()
            .contains("same size and sha256"),
        "{plan}"
    );

    // The stick's root image replaced behind the record's back (as `overlay merge`
    // does): the record no longer describes it, so the image is compared in full.
    let mut older = std::fs::read(&from_iso).unwrap();
    let last = older.len() - 1;
    older[last] ^= 0xff;
    let older_path = dir.path().join("older-squashfs.img");
    std::fs::write(&older_path, &older).unwrap();
    fat_put(&image, start, &older_path, "/LiveOS/squashfs.img");
    let table = livestick(&["write", iso, img, "--dry-run"]);
    let table = ok(&table);
    assert!(
        table.contains(&format!(
            "keeps {OVERLAY} (16 MiB), emptied, its 12 KiB of changes lost: the root image changes"
        )),
        "{table}"
    );
    let report = json_of(&[iso, img]);
    assert_eq!(kept(&report)["reset"], true, "{report}");
    assert_eq!(kept(&report)["used_bytes"], used, "{report}");
    let overlay = fat_read(&image, start, OVERLAY);
    assert_eq!(overlay.len() as u64, 16 * MIB);
    assert!(
        overlay[..64 * 1024].iter().all(|&b| b == 0),
        "the overlay was not emptied"
    );
}

/// An OverlayFS overlay (a flat root's, an ISO without an implanted MD5): the same
/// root image keeps the file the live system wrote into it; a changed one gets a
/// fresh, clean ext4 overlay rather than one with its head zeroed.
#[test]
fn overlayfs_overlay_is_kept_or_made_anew() {
    let dir = tmp();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/hostname"), "flat\n").unwrap();
    let flat = flat_iso_from(&root, dir.path());
    let image = dir.path().join("flat.img");
    let (iso, img) = (flat.to_str().unwrap(), image.to_str().unwrap());
    json_of(&[
        iso,
        img,
        "--size",
        "256M",
        "--overlay-size-mb",
        "32",
        "--volume-id",
        "0000ABCD",
    ]);
    let start = part_start(&image);
    let path = "/LiveOS/overlay-LIVE-0000-ABCD";
    let overlay = dir.path().join("overlay.img");
    fat_copy_out(&image, start, path, &overlay);
    let note = dir.path().join("note.txt");
    std::fs::write(&note, "persisted\n").unwrap();
    debugfs_w(
        &overlay,
        &format!("write {} overlayfs/note.txt\n", note.display()),
    );
    fat_put(&image, start, &overlay, path);

    let report = json_of(&[iso, img]);
    assert_eq!(kept(&report)["reset"], false, "{report}");
    assert!(
        kept(&report)["why"]
            .as_str()
            .unwrap()
            .contains("same size and sha256"),
        "{report}"
    );
    assert!(report["overlay"].is_null(), "no new overlay: {report}");
    fat_copy_out(&image, start, path, &overlay);
    let cat = run(
        "debugfs",
        &["-R", "cat overlayfs/note.txt", overlay.to_str().unwrap()],
    );
    assert_eq!(cat, "persisted\n");

    // Another root image on the stick: the overlay is emptied, as a fresh ext4.
    let mut older = fat_read(&image, start, "/LiveOS/squashfs.img");
    let last = older.len() - 1;
    older[last] ^= 0xff;
    let older_path = dir.path().join("older-squashfs.img");
    std::fs::write(&older_path, &older).unwrap();
    fat_put(&image, start, &older_path, "/LiveOS/squashfs.img");
    let report = json_of(&[iso, img]);
    assert_eq!(kept(&report)["reset"], true, "{report}");
    assert!(
        kept(&report)["used_bytes"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert_eq!(report["overlay"], path, "{report}");
    fat_copy_out(&image, start, path, &overlay);
    assert_eq!(std::fs::metadata(&overlay).unwrap().len(), 32 * MIB);
    e2fsck_clean(&overlay);
    let listing = run(
        "debugfs",
        &["-R", "ls -l overlayfs", overlay.to_str().unwrap()],
    );
    assert!(!listing.contains("note.txt"), "{listing}");
    let top = run("debugfs", &["-R", "ls -l /", overlay.to_str().unwrap()]);
    assert!(top.contains("ovlwork"), "{top}");
}
