//! Leftovers of a replacement stopped between its two directory writes (issue 13,
//! part 1): `X` and `X.new` name the same cluster chain. Freeing `X.new` would free
//! what `X` still uses, so every command that meets such a leftover detaches it from
//! the chain and reports it instead.

use std::io::{Cursor, Read, Seek, SeekFrom, Write};
use std::path::Path;

use crate::support::fixtures::synthetic_iso;
use crate::support::*;
use livestick::disk::extent_file::ExtentFile;
use livestick::disk::fat;
use livestick::disk::fat_raw;
use livestick::disk::stick::{Stick, StickError};
use livestick::persist::snapshot::{self, CowWriter, Opened};
use livestick::squash;

/// Creates `leftover` empty, then makes its directory entry name `live`'s cluster chain
/// and size: what a swap stopped after its first sector write leaves.
fn share_chain(img: &Path, live: &str, leftover: &str) {
    let mut stick = Stick::open(img, true).unwrap();
    let path = stick.path.clone();
    stick
        .with_fs(|fs| {
            let fat_err = |source| StickError::Fat {
                path: path.clone(),
                source,
            };
            // A staged file of an earlier run owns its chain: plain removal is safe.
            fat::remove_all(fs, leftover).map_err(fat_err)?;
            fat::write_file(fs, leftover, &mut std::io::empty(), 0, |_| {})
                .map(|_| ())
                .map_err(fat_err)
        })
        .unwrap();
    let part = stick.partition.start;
    let live_e = fat_raw::find_entry(stick.file_mut(), part, live).unwrap();
    let left_e = fat_raw::find_entry(stick.file_mut(), part, leftover).unwrap();
    assert_ne!(live_e.first_cluster, left_e.first_cluster);
    let f = stick.file_mut();
    let mut a = [0u8; 32];
    f.seek(SeekFrom::Start(live_e.offset)).unwrap();
    f.read_exact(&mut a).unwrap();
    let mut b = [0u8; 32];
    f.seek(SeekFrom::Start(left_e.offset)).unwrap();
    f.read_exact(&mut b).unwrap();
    // Times, first cluster and size; name and attributes stay.
    b[13..32].copy_from_slice(&a[13..32]);
    f.seek(SeekFrom::Start(left_e.offset)).unwrap();
    f.write_all(&b).unwrap();
    f.sync_all().unwrap();
    let again = fat_raw::find_entry(stick.file_mut(), part, leftover).unwrap();
    assert_eq!(again.first_cluster, live_e.first_cluster);
    assert_eq!(
        fat_raw::other_names_of_chain(stick.file_mut(), part, leftover).unwrap(),
        [live.to_string()]
    );
}

fn partition_len(img: &Path) -> u64 {
    Stick::open(img, false).unwrap().partition.len
}

#[test]
fn write_keeps_a_home_whose_chain_a_leftover_home_img_new_names() {
    if !require(have("mcopy") && have("fsck.fat"), "mtools, dosfstools") {
        return;
    }
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("stick.img");
    let (iso_s, img_s) = (iso.to_str().unwrap(), img.to_str().unwrap());
    ok(&livestick(&[
        "write",
        iso_s,
        img_s,
        "--size",
        "256M",
        "--home-size-mb",
        "16",
        "--unencrypted-home",
        "--yes",
    ]));
    let part = part_start(&img);
    let home_before = fat_read(&img, part, "/LiveOS/home.img");
    share_chain(&img, "/LiveOS/home.img", "/LiveOS/home.img.new");

    // The same ISO again: home.img is kept, leftovers go.
    let out = ok(&livestick(&["write", iso_s, img_s, "--yes", "--json"]));
    assert!(
        out.contains("home.img.new named the clusters of /LiveOS/home.img"),
        "the repair is reported: {out}"
    );
    let ls = fat_ls(&img, part, "LiveOS");
    assert!(!ls.to_lowercase().contains("home.img.new"), "{ls}");
    assert!(
        fat_read(&img, part, "/LiveOS/home.img") == home_before,
        "home.img intact"
    );
    fsck_fat(&img, part, partition_len(&img), dir.path());
}

/// The root image inside the stick's squashfs.img.
fn rootfs_on(img: &Path, part: u64, scratch: &Path) -> Vec<u8> {
    let sq = scratch.join("squashfs.img");
    fat_copy_out(img, part, "LiveOS/squashfs.img", &sq);
    let x = scratch.join("x");
    squash::extract(&sq, &x).unwrap();
    let root = std::fs::read(x.join("LiveOS/rootfs.img")).unwrap();
    std::fs::remove_dir_all(&x).unwrap();
    std::fs::remove_file(&sq).unwrap();
    root
}

/// A "boot" that changes one chunk of the root image through the overlay.
fn boot_and_change_one_chunk(img: &Path, overlay: &str, root: &[u8]) -> Vec<u8> {
    let mut s = Stick::open(img, true).unwrap();
    let extents = s.file_extents(overlay).unwrap();
    let mut cow = ExtentFile::new(s.file_mut(), &extents);
    let len = cow.len();
    snapshot::create_new_store(&mut cow, len, 8).unwrap();
    let Opened::Valid(store) = snapshot::open_store(&mut cow, len).unwrap() else {
        panic!("store not valid")
    };
    let mut w = CowWriter::new(*store, root.len() as u64).unwrap();
    let at = 1 << 20;
    let chunk = vec![0xa5u8; 4096];
    w.write_at(&mut Cursor::new(root), &mut cow, at as u64, &chunk)
        .unwrap();
    let mut after = root.to_vec();
    after[at..at + 4096].copy_from_slice(&chunk);
    after
}

#[test]
fn merge_rerun_keeps_the_root_image_a_leftover_squashfs_img_new_names() {
    if !require(
        ["unsquashfs", "mksquashfs", "mcopy", "fsck.fat"]
            .iter()
            .all(|t| have(t)),
        "squashfs-tools, mtools, dosfstools",
    ) {
        return;
    }
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("stick.img");
    ok(&livestick(&[
        "write",
        iso.to_str().unwrap(),
        img.to_str().unwrap(),
        "--size",
        "256M",
        "--overlay-size-mb",
        "32",
        "--yes",
    ]));
    let part = part_start(&img);
    let overlay = Stick::open(&img, false)
        .unwrap()
        .info("LiveOS")
        .unwrap()
        .expected_overlay;
    let root = rootfs_on(&img, part, dir.path());
    let after = boot_and_change_one_chunk(&img, &overlay, &root);
    share_chain(&img, "/LiveOS/squashfs.img", "/LiveOS/squashfs.img.new");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let merge = [
        "overlay",
        "merge",
        img.to_str().unwrap(),
        "--yes",
        "--no-fsck",
        "--json",
        "--workdir",
        work.to_str().unwrap(),
    ];

    // Stopped right after the new image is staged: the old one must still be whole
    // (freeing the leftover would have freed its chain for the staged copy to reuse).
    let out = std::process::Command::new(bin())
        .args(merge)
        .env("LIVESTICK_FAILPOINT", "stage")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("failpoint"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fsck_fat(&img, part, partition_len(&img), dir.path());
    assert!(
        rootfs_on(&img, part, dir.path()) == root,
        "the old root image is intact"
    );

    // The same leftover again, and a run to the end: repaired, reported, merged.
    share_chain(&img, "/LiveOS/squashfs.img", "/LiveOS/squashfs.img.new");
    let out = ok(&livestick(&merge));
    assert!(
        out.contains("squashfs.img.new named the clusters of /LiveOS/squashfs.img"),
        "the repair is reported: {out}"
    );
    assert!(
        rootfs_on(&img, part, dir.path()) == after,
        "the new root image is the merged one"
    );
    let ls = fat_ls(&img, part, "LiveOS");
    assert!(!ls.to_lowercase().contains(".new"), "{ls}");
    fsck_fat(&img, part, partition_len(&img), dir.path());
}
