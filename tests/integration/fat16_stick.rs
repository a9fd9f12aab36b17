//! A FAT16 stick (mkfs.fat makes one on small sticks, and older tools left them)
//! written without `--format`: fatfs writes FAT16 as well as FAT32, and livestick's
//! own repairs and relabelling must read it as FAT16. Read as FAT32 they left every
//! new directory's `.` and `..` behind long-name entries (fsck.fat rewrites them) and
//! put a new label where neither blkid nor dracut looks, so the overlay named after
//! it was never found.

use crate::support::*;

#[test]
fn a_fat16_stick_is_written_without_format_and_relabelled() {
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("stick.img");
    stick_made_by_mkfs_fat(
        &image,
        400,
        "e",
        &["-F", "16", "-n", "OLD", "-i", "0A0B0C0D"],
    );
    let start = 1u64 << 20;
    assert_eq!(blkid_value(&image, start, "VERSION"), "FAT16");

    ok(&livestick(&[
        "write",
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--noformat",
        "--label",
        "NEWL",
        "--overlay-size-mb",
        "60",
        "--home-size-mb",
        "40",
        "--unencrypted-home",
        "--swap-size-mb",
        "20",
        "--yes",
        "--force",
        "--quiet",
    ]));
    fsck_fat(&image, start, (400 << 20) - start, dir.path());
    assert_eq!(blkid_value(&image, start, "VERSION"), "FAT16");
    assert_eq!(blkid_value(&image, start, "LABEL"), "NEWL");
    let live = fat_ls(&image, start, "/LiveOS");
    assert!(
        live.contains("overlay-NEWL-0A0B-0C0D"),
        "the overlay is named after the label blkid reads: {live}"
    );
}
