//! Leftovers of a replacement stopped between its two directory writes (issue 13,
//! part 1): `X` and `X.new` name the same cluster chain. Freeing `X.new` would free
//! what `X` still uses, so every command that meets such a leftover detaches it from
//! the chain and reports it instead. A replacement today is one sector write (the
//! staged entry is moved beside the target first) or two under a recorded intent that
//! the next command completes; orphaned clusters and the dirty mark are repaired too.

use std::io::{Cursor, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::support::fixtures::synthetic_iso;
use crate::support::*;
use livestick::disk::extent_file::ExtentFile;
use livestick::disk::fat;
use livestick::disk::fat_raw;
use livestick::disk::stick::{Stick, StickError};
use livestick::persist::merge::replace;
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
    let out = livestick(&["write", iso_s, img_s, "--yes", "--json"]);
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("home.img.new named the clusters of /LiveOS/home.img"),
        "the repair is reported: {err}"
    );
    let repaired = json_of(&out)["repaired"].to_string();
    assert!(
        repaired.contains("home.img.new named the clusters of /LiveOS/home.img"),
        "and in the JSON report: {repaired}"
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
    let out = livestick(&merge);
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("squashfs.img.new named the clusters of /LiveOS/squashfs.img"),
        "the repair is reported: {err}"
    );
    assert!(
        rootfs_on(&img, part, dir.path()) == after,
        "the new root image is the merged one"
    );
    let ls = fat_ls(&img, part, "LiveOS");
    assert!(!ls.to_lowercase().contains(".new"), "{ls}");
    fsck_fat(&img, part, partition_len(&img), dir.path());
}

/// A stick with a plain 16 MiB home.
fn home_stick(dir: &Path) -> PathBuf {
    let iso = synthetic_iso("fedora-classic.iso");
    let img = dir.join("stick.img");
    ok(&livestick(&[
        "write",
        iso.to_str().unwrap(),
        img.to_str().unwrap(),
        "--size",
        "256M",
        "--home-size-mb",
        "16",
        "--unencrypted-home",
        "--yes",
    ]));
    img
}

/// A stick in `dir` with a 32 MiB overlay and a 16 MiB plain home whose `LiveOS/` is
/// crowded (see [`crowd_live_dir`]), and a work directory for resizes:
/// (the ISO written, the stick, the work directory).
fn crowded_overlay_home_stick(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let iso = synthetic_iso("fedora-classic.iso");
    let img = dir.join("stick.img");
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
    crowd_live_dir(&img);
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    (iso, img, work)
}

/// Fills every free slot of `LiveOS/` up to several sectors past its last entry (one-
/// slot names first, so that no hole is left before the end), so that a file created
/// now lands in a sector of its own, away from `home.img`'s.
fn crowd_live_dir(img: &Path) {
    let mut stick = Stick::open(img, true).unwrap();
    let path = stick.path.clone();
    stick
        .with_fs(|fs| {
            let fat_err = |source| StickError::Fat {
                path: path.clone(),
                source,
            };
            for i in 0..48 {
                fat::write_file(
                    fs,
                    &format!("/LiveOS/F{i:02}.TXT"),
                    &mut &b"x"[..],
                    1,
                    |_| {},
                )
                .map_err(fat_err)?;
            }
            Ok(())
        })
        .unwrap();
}

fn stick_part(img: &Path) -> (u64, u64) {
    let s = Stick::open(img, false).unwrap();
    (s.partition.start, s.partition.len)
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn a_staged_entry_in_another_sector_is_moved_beside_the_target_for_a_one_sector_swap() {
    if !require(have("mcopy") && have("fsck.fat"), "mtools, dosfstools") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = home_stick(dir.path());
    let (part, len) = stick_part(&img);
    let home = fat_read(&img, part, "/LiveOS/home.img");
    crowd_live_dir(&img);
    let mut stick = Stick::open(&img, true).unwrap();
    let path = stick.path.clone();
    stick
        .with_fs(|fs| {
            let new = vec![0x5au8; 64 << 10];
            fat::write_file(
                fs,
                "/LiveOS/home.img.new",
                &mut &new[..],
                new.len() as u64,
                |_| {},
            )
            .map(|_| ())
            .map_err(|source| StickError::Fat {
                path: path.clone(),
                source,
            })
        })
        .unwrap();
    // Then a hole of two slots in home.img's sector: the last two fillers there go.
    let home_e = fat_raw::find_entry(stick.file_mut(), part, "/LiveOS/home.img").unwrap();
    let mut in_home_sector: Vec<String> = Vec::new();
    for f in (0..48).map(|i| format!("/LiveOS/F{i:02}.TXT")) {
        let e = fat_raw::find_entry(stick.file_mut(), part, &f).unwrap();
        if e.offset / 512 == home_e.offset / 512 {
            in_home_sector.push(f);
        }
    }
    assert!(in_home_sector.len() >= 2, "{in_home_sector:?}");
    stick
        .with_fs(|fs| {
            for f in &in_home_sector[in_home_sector.len() - 2..] {
                fat::remove_all(fs, f).map_err(|source| StickError::Fat {
                    path: path.clone(),
                    source,
                })?;
            }
            Ok(())
        })
        .unwrap();
    assert!(
        !fat_raw::share_a_sector(
            stick.file_mut(),
            part,
            "/LiveOS/home.img",
            "/LiveOS/home.img.new"
        )
        .unwrap(),
        "the test needs the two entries in different sectors"
    );
    let report =
        replace::swap_on_stick(&mut stick, "/LiveOS/home.img", "/LiveOS/home.img.new").unwrap();
    assert!(report.single_sector, "one sector write");
    drop(stick);
    assert_eq!(
        fat_read(&img, part, "/LiveOS/home.img"),
        vec![0x5au8; 64 << 10]
    );
    assert!(fat_read(&img, part, "/LiveOS/home.img.new") == home);
    fsck_fat(&img, part, len, dir.path());
}

#[test]
fn a_two_sector_resize_stopped_half_way_is_completed_by_home_info() {
    if !require(
        ["mcopy", "fsck.fat", "resize2fs", "e2fsck"]
            .iter()
            .all(|t| have(t)),
        "mtools, dosfstools, e2fsprogs",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = home_stick(dir.path());
    let (part, len) = stick_part(&img);
    crowd_live_dir(&img);
    let img_s = img.to_str().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let resize = [
        "home",
        "resize",
        img_s,
        "--size-mb",
        "24",
        "--workdir",
        work.to_str().unwrap(),
    ];
    let out = std::process::Command::new(bin())
        .args(resize)
        .env("LIVESTICK_FAILPOINT", "swap-half")
        .output()
        .unwrap();
    assert!(!out.status.success(), "stopped at the failpoint");
    let ls = fat_ls(&img, part, "LiveOS");
    assert!(
        ls.contains(".livestick-replace"),
        "the intent is on the stick: {ls}"
    );

    // Read-only in intent, but it completes the replacement first and says so.
    let out = livestick(&["home", "info", img_s, "--json"]);
    let v = json_of(&out);
    assert!(out.status.success());
    let repaired = v["repaired"].to_string();
    assert!(repaired.contains("completed"), "{repaired}");
    assert_eq!(
        v["size_bytes"],
        24u64 << 20,
        "the grown home is the live one"
    );
    let ls = fat_ls(&img, part, "LiveOS");
    assert!(!ls.contains(".livestick-replace"), "{ls}");
    fsck_fat(&img, part, len, dir.path());

    // The next resize removes the old home that home.img.new now names, and goes
    // through the same two writes under an intent to the end.
    let mut again = resize;
    again[4] = "32";
    ok(&livestick(&again));
    let ls = fat_ls(&img, part, "LiveOS");
    assert!(!ls.to_lowercase().contains("home.img.new"), "{ls}");
    assert!(!ls.contains(".livestick-replace"), "{ls}");
    let v = json_of(&livestick(&["home", "info", img_s, "--json"]));
    assert_eq!(v["size_bytes"], 32u64 << 20);
    fsck_fat(&img, part, len, dir.path());
}

#[test]
fn an_intent_of_a_replacement_that_never_began_is_rolled_back() {
    if !require(have("mcopy") && have("fsck.fat"), "mtools, dosfstools") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = home_stick(dir.path());
    let (part, len) = stick_part(&img);
    let home = fat_read(&img, part, "/LiveOS/home.img");
    let mut stick = Stick::open(&img, true).unwrap();
    let path = stick.path.clone();
    stick
        .with_fs(|fs| {
            fat::write_file(
                fs,
                "/LiveOS/home.img.new",
                &mut &home[..],
                home.len() as u64,
                |_| {},
            )
            .map(|_| ())
            .map_err(|source| StickError::Fat {
                path: path.clone(),
                source,
            })
        })
        .unwrap();
    let intent = replace::Intent {
        target: "/LiveOS/home.img".into(),
        staged: "/LiveOS/home.img.new".into(),
        old: fat_raw::content_fields(stick.file_mut(), part, "/LiveOS/home.img").unwrap(),
        new: fat_raw::content_fields(stick.file_mut(), part, "/LiveOS/home.img.new").unwrap(),
    };
    let text = intent.to_text();
    stick
        .with_fs(|fs| {
            fat::write_file(
                fs,
                "/LiveOS/.livestick-replace",
                &mut text.as_bytes(),
                text.len() as u64,
                |_| {},
            )
            .map(|_| ())
            .map_err(|source| StickError::Fat {
                path: path.clone(),
                source,
            })
        })
        .unwrap();
    drop(stick);
    let out = livestick(&["home", "info", img.to_str().unwrap(), "--json"]);
    let v = json_of(&out);
    assert!(v["repaired"].to_string().contains("rolled back"), "{v}");
    assert!(fat_read(&img, part, "/LiveOS/home.img") == home);
    let ls = fat_ls(&img, part, "LiveOS");
    assert!(!ls.contains(".livestick-replace"), "{ls}");
    fsck_fat(&img, part, len, dir.path());
}

#[test]
fn an_old_two_sector_swap_stopped_half_way_leaves_no_lost_clusters_and_no_dirty_mark() {
    if !require(have("mcopy") && have("fsck.fat"), "mtools, dosfstools") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = home_stick(dir.path());
    let (part, len) = stick_part(&img);
    let home = fat_read(&img, part, "/LiveOS/home.img");
    let mut stick = Stick::open(&img, true).unwrap();
    let path = stick.path.clone();
    stick
        .with_fs(|fs| {
            fat::write_file(
                fs,
                "/LiveOS/home.img.new",
                &mut &home[..],
                home.len() as u64,
                |_| {},
            )
            .map(|_| ())
            .map_err(|source| StickError::Fat {
                path: path.clone(),
                source,
            })
        })
        .unwrap();
    // The first write of a swap without intent (livestick before this change):
    // home.img names the new chain, the old chain is named by nothing.
    let new = fat_raw::content_fields(stick.file_mut(), part, "/LiveOS/home.img.new").unwrap();
    fat_raw::set_content_fields(stick.file_mut(), part, "/LiveOS/home.img", &new).unwrap();
    // And a FAT driver that was stopped: the dirty mark (FAT32: boot sector byte 0x41).
    let mut b = [0u8; 1];
    stick.read_at(part + 0x41, &mut b).unwrap();
    stick.write_at(part + 0x41, &[b[0] | 1]).unwrap();
    stick.file_mut().sync_all().unwrap();
    drop(stick);

    let out = livestick(&["home", "info", img.to_str().unwrap(), "--json"]);
    let v = json_of(&out);
    let repaired = v["repaired"].to_string();
    assert!(repaired.contains("detached"), "{repaired}");
    assert!(repaired.contains("clusters no file named"), "{repaired}");
    assert!(repaired.contains("not cleanly closed"), "{repaired}");
    assert!(
        fat_read(&img, part, "/LiveOS/home.img") == home,
        "home intact"
    );
    let mut s = Stick::open(&img, false).unwrap();
    assert!(!fat_raw::is_dirty(s.file_mut(), part).unwrap());
    drop(s);
    fsck_fat(&img, part, len, dir.path());
}

#[test]
fn a_directory_to_delete_is_checked_file_by_file() {
    if !require(have("mcopy") && have("fsck.fat"), "mtools, dosfstools") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = home_stick(dir.path());
    let (part, len) = stick_part(&img);
    let home = fat_read(&img, part, "/LiveOS/home.img");
    let mut stick = Stick::open(&img, true).unwrap();
    let path = stick.path.clone();
    stick
        .with_fs(|fs| {
            fat::create_dir_all(fs, "/LiveOS/old").map_err(|source| StickError::Fat {
                path: path.clone(),
                source,
            })
        })
        .unwrap();
    drop(stick);
    share_chain(&img, "/LiveOS/home.img", "/LiveOS/old/home.img.new");
    let mut stick = Stick::open(&img, true).unwrap();
    let note = replace::detach_shared_leftover(stick.file_mut(), part, "/LiveOS/old")
        .unwrap()
        .expect("the shared file inside is found");
    assert!(note.contains("/LiveOS/old/home.img.new"), "{note}");
    stick
        .with_fs(|fs| {
            fat::remove_all(fs, "/LiveOS/old").map_err(|source| StickError::Fat {
                path: path.clone(),
                source,
            })
        })
        .unwrap();
    drop(stick);
    assert!(
        fat_read(&img, part, "/LiveOS/home.img") == home,
        "home intact"
    );
    fsck_fat(&img, part, len, dir.path());
}

#[test]
fn overlay_status_clears_the_dirty_mark_and_says_so() {
    if !require(have("mcopy") && have("fsck.fat"), "mtools, dosfstools") {
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
    let (part, len) = stick_part(&img);
    let mut stick = Stick::open(&img, true).unwrap();
    let mut b = [0u8; 1];
    stick.read_at(part + 0x41, &mut b).unwrap();
    stick.write_at(part + 0x41, &[b[0] | 1]).unwrap();
    stick.file_mut().sync_all().unwrap();
    drop(stick);
    let out = livestick(&["overlay", "status", img.to_str().unwrap()]);
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("repaired") && err.contains("not cleanly closed"),
        "{err}"
    );
    let mut s = Stick::open(&img, false).unwrap();
    assert!(!fat_raw::is_dirty(s.file_mut(), part).unwrap());
    drop(s);
    fsck_fat(&img, part, len, dir.path());
}

#[test]
fn a_dry_run_over_a_leftover_plans_the_repaired_stick_and_writes_nothing() {
    if !require(have("mcopy") && have("fsck.fat"), "mtools, dosfstools") {
        return;
    }
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tempfile::tempdir().unwrap();
    let img = home_stick(dir.path());
    let dry = [
        "write",
        iso.to_str().unwrap(),
        img.to_str().unwrap(),
        "--dry-run",
        "--json",
    ];
    let out = livestick(&dry);
    ok(&out);
    let clean = json_of(&out);
    assert_eq!(clean["repaired"], serde_json::json!([]), "{clean}");
    share_chain(&img, "/LiveOS/home.img", "/LiveOS/home.img.new");
    let before = std::fs::read(&img).unwrap();

    let out = livestick(&dry);
    ok(&out);
    let plan = json_of(&out);
    let repaired = plan["repaired"].to_string();
    assert!(
        repaired.contains("home.img.new named the clusters of /LiveOS/home.img"),
        "the plan says what the write will repair first: {repaired}"
    );
    assert!(
        std::fs::read(&img).unwrap() == before,
        "a dry run writes nothing, the repair included"
    );
    // The leftover names home.img's 16 MiB: the repair detaches it, so deleting it
    // frees nothing and the plan counts nothing for it (what the repair does free is
    // the one cluster the helper's empty file had, lost when its entry was rewritten).
    let (left, was) = (
        plan["available_bytes"].as_u64(),
        clean["available_bytes"].as_u64(),
    );
    assert!(
        left.unwrap() < was.unwrap() + (1 << 20),
        "{left:?} vs {was:?}"
    );
    let table = livestick(&dry[..dry.len() - 1]);
    ok(&table);
    assert!(
        String::from_utf8_lossy(&table.stdout).contains("repairs first: /LiveOS/home.img.new"),
        "{}",
        String::from_utf8_lossy(&table.stdout)
    );
    // The same figures as the plan after the repair has been done for real.
    ok(&livestick(&["home", "info", img.to_str().unwrap()]));
    let out = livestick(&dry);
    ok(&out);
    let after = json_of(&out);
    assert_eq!(after["repaired"], serde_json::json!([]), "{after}");
    for figure in ["space_available", "space_needed", "free_after"] {
        assert_eq!(plan[figure], after[figure], "{figure}: {plan}");
    }
}

/// Stops a `home resize` to `mib` MiB between its two directory writes, under an intent
/// (the live directory must be crowded, so that the two entries are in two sectors).
fn stop_a_resize_half_way(img: &Path, work: &Path, mib: u64) {
    let out = std::process::Command::new(bin())
        .args(["home", "resize", img.to_str().unwrap(), "--size-mb"])
        .arg(mib.to_string())
        .arg("--workdir")
        .arg(work)
        .env("LIVESTICK_FAILPOINT", "swap-half")
        .output()
        .unwrap();
    assert!(!out.status.success(), "stopped at the failpoint");
    let (part, _) = stick_part(img);
    let ls = fat_ls(img, part, "LiveOS");
    assert!(
        ls.contains(".livestick-replace"),
        "the intent is on the stick: {ls}"
    );
}

#[test]
fn every_overlay_verb_and_write_report_the_repair_in_their_json() {
    if !require(
        ["mcopy", "fsck.fat", "resize2fs", "e2fsck"]
            .iter()
            .all(|t| have(t)),
        "mtools, dosfstools, e2fsprogs",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (iso, img, work) = crowded_overlay_home_stick(dir.path());
    let (iso_s, img_s) = (iso.to_str().unwrap(), img.to_str().unwrap());
    let verbs: [&[&str]; 4] = [
        &["overlay", "status"],
        &["overlay", "grow", "--add-mb", "8", "--yes"],
        &["overlay", "recover", "--yes"],
        &["overlay", "reset", "--yes"],
    ];
    let mut mib = 16;
    for verb in verbs {
        mib += 8;
        stop_a_resize_half_way(&img, &work, mib);
        let args = [verb, &[img_s, "--json"][..]].concat();
        let out = livestick(&args);
        ok(&out);
        let repaired = json_of(&out)["repaired"].to_string();
        assert!(
            repaired.contains("the replacement of /LiveOS/home.img stopped half-way: completed"),
            "{args:?}: {repaired}"
        );
        // Nothing left to repair: the next report says so with an empty list.
        let out = livestick(&["overlay", "status", img_s, "--json"]);
        ok(&out);
        assert_eq!(json_of(&out)["repaired"], serde_json::json!([]), "{args:?}");
    }
    mib += 8;
    stop_a_resize_half_way(&img, &work, mib);
    let out = livestick(&["write", iso_s, img_s, "--yes", "--json"]);
    ok(&out);
    let repaired = json_of(&out)["repaired"].to_string();
    assert!(
        repaired.contains("stopped half-way: completed"),
        "write: {repaired}"
    );
    let (part, len) = stick_part(&img);
    let v = json_of(&livestick(&["home", "info", img_s, "--json"]));
    assert_eq!(v["size_bytes"], mib << 20, "the grown home is the live one");
    fsck_fat(&img, part, len, dir.path());
}

/// A dry run of an overlay verb over leftovers of a stopped replacement changes
/// nothing on the stick: it says what the real run repairs first.
#[test]
fn an_overlay_dry_run_over_a_leftover_changes_nothing_and_says_what_the_real_run_repairs() {
    if !require(
        ["mcopy", "fsck.fat", "resize2fs", "e2fsck"]
            .iter()
            .all(|t| have(t)),
        "mtools, dosfstools, e2fsprogs",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_, img, work) = crowded_overlay_home_stick(dir.path());
    let img_s = img.to_str().unwrap();
    stop_a_resize_half_way(&img, &work, 24);
    let before = sha256_file(&img);
    for verb in [
        &["overlay", "reset", "--dry-run"][..],
        &["overlay", "grow", "--add-mb", "8", "--dry-run"][..],
    ] {
        let out = livestick(&[verb, &[img_s][..]].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("the real run first repairs") && stderr.contains("stopped half-way"),
            "{verb:?}: {stderr}"
        );
        assert_eq!(sha256_file(&img), before, "{verb:?} changed the stick");
    }
    // The real run repairs, as before.
    let out = livestick(&["overlay", "status", img_s, "--json"]);
    ok(&out);
    assert!(
        json_of(&out)["repaired"]
            .to_string()
            .contains("stopped half-way: completed")
    );
}
