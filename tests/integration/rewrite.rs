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
/// A 256 MiB stick written from `classic` with a 16 MiB overlay and a fixed volume
/// id: its scratch directory, the image, and the FAT partition's start.
fn classic_stick(classic: &Path) -> (tempfile::TempDir, std::path::PathBuf, u64) {
    let dir = tmp();
    let image = dir.path().join("stick.img");
    json_of(&[
        classic.to_str().unwrap(),
        image.to_str().unwrap(),
        "--size",
        "256M",
        "--overlay-size-mb",
        "16",
        "--volume-id",
        "3333CCCC",
    ]);
    let start = part_start(&image);
    (dir, image, start)
}

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

/// The manifest's entry for the root image, and the implanted MD5 it records.
fn root_record_in_manifest(image: &Path, start: u64) -> (serde_json::Value, serde_json::Value) {
    let manifest: serde_json::Value =
        serde_json::from_slice(&fat_read(image, start, "/LiveOS/livestick.json"))
            .expect("the manifest is JSON");
    let record = listed_entry(&manifest, "/LiveOS/squashfs.img");
    (
        record,
        manifest["images"][0]["source"]["implanted_md5"].clone(),
    )
}

/// sha256 of the first and last 64 KiB of an image larger than 128 KiB: what the
/// root record ties itself to the copy on the stick with.
fn ends_sha256(image: &[u8]) -> String {
    use sha2::Digest;
    assert!(image.len() > 128 * 1024);
    let mut hasher = sha2::Sha256::new();
    hasher.update(&image[..64 * 1024]);
    hasher.update(&image[image.len() - 64 * 1024..]);
    crate::support::dm_snapshot::hex(&hasher.finalize())
}

#[test]
fn same_root_image_keeps_the_overlay_and_a_changed_one_empties_it() {
    let classic = synthetic_iso("fedora-classic.iso");
    let grub = synthetic_iso("fedora-grub.iso");
    let (dir, image, start) = classic_stick(&classic);
    let (iso, img) = (classic.to_str().unwrap(), image.to_str().unwrap());
    // The manifest's record of the root image names what was written.
    let from_iso = dir.path().join("iso-squashfs.img");
    iso_extract(&classic, "/LiveOS/squashfs.img", &from_iso);
    let (record, iso_md5) = root_record_in_manifest(&image, start);
    assert_eq!(
        record["sha256"],
        sha256_file(&from_iso).as_str(),
        "{record}"
    );
    assert_eq!(
        record["ends_sha256"],
        ends_sha256(&std::fs::read(&from_iso).unwrap()).as_str(),
        "{record}"
    );
    assert!(iso_md5.is_string(), "{iso_md5}");

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

    // Without the record (no manifest) the stick's image is hashed: the same, so
    // still kept.
    fat_delete(&image, start, "/LiveOS/livestick.json");
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

/// Issue 15: the manifest carries the root record and `.livestick` is no longer
/// written. A stick of an older livestick (a manifest without the record, or none,
/// and `LiveOS/.livestick` beside the image) is still recognised by that file: the
/// same ISO keeps its overlay after 128 KiB read, and the write that follows moves
/// the record into the manifest and deletes the old file.
#[test]
fn an_old_stick_with_only_its_livestick_record_keeps_its_overlay() {
    let classic = synthetic_iso("fedora-classic.iso");
    let (dir, image, start) = classic_stick(&classic);
    let (iso, img) = (classic.to_str().unwrap(), image.to_str().unwrap());
    let listing = fat_ls(&image, start, "/LiveOS").to_lowercase();
    assert!(!listing.contains(".livestick"), "{listing}");
    let (record, iso_md5) = root_record_in_manifest(&image, start);
    let md5 = iso_md5.as_str().expect("the fixture has an implanted MD5");
    boot_and_write(&image);
    let overlay_before = fat_read(&image, start, OVERLAY);

    // Made old: the record as the older livestick wrote it, and no manifest.
    let root = fat_read(&image, start, "/LiveOS/squashfs.img");
    let old_record = dir.path().join("livestick-record");
    std::fs::write(
        &old_record,
        format!(
            "# livestick: the root image this live directory's overlay was written for\n\
             size={}\nsha256={}\nends_sha256={}\niso_md5={md5}\n",
            root.len(),
            record["sha256"].as_str().unwrap(),
            ends_sha256(&root)
        ),
    )
    .unwrap();
    fat_put(&image, start, &old_record, "/LiveOS/.livestick");
    fat_delete(&image, start, "/LiveOS/livestick.json");

    let plan = json_of(&[iso, img, "--dry-run"]);
    assert_eq!(kept(&plan)["reset"], false, "{plan}");
    let why = kept(&plan)["why"].as_str().unwrap();
    assert!(
        why.contains("written from this ISO (implanted MD5"),
        "the old record was read: {why}"
    );
    assert!(
        plan["deletes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d == "/LiveOS/.livestick"),
        "{plan}"
    );
    let report = json_of(&[iso, img]);
    assert_eq!(kept(&report)["reset"], false, "{report}");
    assert_eq!(fat_read(&image, start, OVERLAY), overlay_before);
    let listing = fat_ls(&image, start, "/LiveOS").to_lowercase();
    assert!(!listing.contains(".livestick"), "{listing}");
    let (record_now, _) = root_record_in_manifest(&image, start);
    assert_eq!(record_now["ends_sha256"], ends_sha256(&root).as_str());

    // A broken old record (another image's ends) is not trusted: the image is hashed.
    fat_delete(&image, start, "/LiveOS/livestick.json");
    std::fs::write(
        &old_record,
        format!(
            "size={}\nsha256={}\nends_sha256={}\niso_md5={md5}\n",
            root.len(),
            record["sha256"].as_str().unwrap(),
            "0".repeat(64)
        ),
    )
    .unwrap();
    fat_put(&image, start, &old_record, "/LiveOS/.livestick");
    let plan = json_of(&[iso, img, "--dry-run"]);
    let why = kept(&plan)["why"].as_str().unwrap();
    assert!(why.contains("same size and sha256"), "{why}");
}
