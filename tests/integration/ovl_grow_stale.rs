//! `overlay grow` of an OverlayFS overlay (an ext4 in a FAT file) on a stick appends
//! clusters without writing their data: the added space keeps whatever the stick held.
//! These tests grow over random bytes and over an old ext4 (superblock, descriptors
//! that say "inode table zeroed", full inode tables) planted where the new clusters
//! land, then read the result with e2fsprogs, blkid and fsck.fat: clean, the old files
//! intact, the new space usable (a debugfs write that needs it), and the new inode
//! tables not promised to be zeros.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::*;
use livestick::disk::stick::Stick;
use livestick::persist::ovl_maint::{self, WorkCopy};

fn ready() -> bool {
    require(
        [
            "mksquashfs",
            "xorriso",
            "debugfs",
            "dumpe2fs",
            "e2fsck",
            "mke2fs",
            "resize2fs",
            "mcopy",
            "fsck.fat",
            "blkid",
        ]
        .iter()
        .all(|t| have(t)),
        "squashfs-tools, xorriso, e2fsprogs, mtools, dosfstools, util-linux",
    )
}

/// Groups past `from_block` whose descriptors say their inode table is zeroed.
fn zeroed_groups_past(image: &Path, from_block: u64) -> Vec<String> {
    let out = ok(&c_locale_output(
        &tool("dumpe2fs"),
        &[&image.to_string_lossy()],
    ));
    out.lines()
        .filter(|l| {
            l.starts_with("Group ") && l.contains("ITABLE_ZEROED") && l.contains("(Blocks ")
        })
        .filter(|l| {
            let first = l
                .split_once("(Blocks ")
                .and_then(|(_, r)| r.split('-').next())
                .and_then(|n| n.parse::<u64>().ok())
                .expect("a group line names its blocks");
            first >= from_block
        })
        .map(str::to_string)
        .collect()
}

/// An old, full ext4 of `len` bytes: every inode table written and flagged zeroed
/// (`lazy_itable_init=0`), files in it: the stale content that must not leak into
/// the grown overlay.
fn old_ext4(dir: &Path, len: u64) -> PathBuf {
    let img = sparse(dir, "old-ext4.img", len);
    run(
        &tool("mke2fs"),
        &[
            "-q",
            "-F",
            "-t",
            "ext4",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            "-L",
            "OLDFS",
            img.to_str().unwrap(),
        ],
    );
    let payload = dir.join("old-payload");
    std::fs::write(&payload, vec![0xC3u8; 1 << 20]).unwrap();
    let mut script = String::new();
    for i in 0..14 {
        script.push_str(&format!("write {} /old-{i}\n", payload.display()));
    }
    debugfs_w(&img, &script);
    img
}

/// Writes `src` into `dst` at byte `at`, keeping the rest of `dst`.
fn plant(dst: &Path, at: u64, src: &Path) {
    use std::io::{Seek, SeekFrom, Write};
    let bytes = std::fs::read(src).unwrap();
    let mut f = std::fs::OpenOptions::new().write(true).open(dst).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&bytes).unwrap();
    f.sync_all().unwrap();
}

/// Writes a file that needs the added space and reads it back; `e2fsck -f -n` after.
fn new_space_is_usable(image: &Path, dir: &Path, len: usize) {
    let big = dir.join("new-space");
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    std::fs::write(&big, &data).unwrap();
    debugfs_w(image, &format!("write {} /after-grow\n", big.display()));
    let back = dir.join("new-space.back");
    let out = Command::new(tool("debugfs"))
        .args(["-R", &format!("dump /after-grow {}", back.display())])
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        std::fs::read(&back).unwrap() == data,
        "the file written into the new space reads back"
    );
    e2fsck_clean(image);
}

#[test]
fn grow_on_a_stick_over_stale_bytes_writes_only_metadata() {
    if !ready() {
        return;
    }
    let dir = tmp();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/hostname"), "base\n").unwrap();
    let iso = flat_iso_from(&root, dir.path());
    // A used stick: random bytes everywhere livestick does not write.
    let img = dir.path().join("stick.img");
    fill_random(&img, 256 << 20);
    ok(&livestick(&[
        "write",
        iso.to_str().unwrap(),
        img.to_str().unwrap(),
        "--overlay-size-mb",
        "32",
        "--overlayfs",
        "--yes",
    ]));
    let mut s = Stick::open(&img, false).unwrap();
    let info = s.info("LiveOS").unwrap();
    let overlay = info.expected_overlay.clone();
    let (part, part_len) = (s.partition.start, s.partition.len);
    let extents = s.file_extents(&overlay).unwrap();
    drop(s);
    assert_eq!(extents.len(), 1, "a fresh overlay is one run: {extents:?}");
    let (ov_at, ov_len) = extents[0];
    assert_eq!(ov_len, 32 << 20);
    // "A boot": files in the upper dir.
    let kept = dir.path().join("kept");
    std::fs::write(&kept, "kept across the grow\n").unwrap();
    debugfs_w(
        &PathBuf::from(format!("{}?offset={ov_at}", img.display())),
        &format!(
            "mkdir /overlayfs/etc\nwrite {} /overlayfs/etc/hostname\n",
            kept.display()
        ),
    );
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let grow = |image: &Path| {
        ok(&livestick(&[
            "overlay",
            "grow",
            image.to_str().unwrap(),
            "--add-mb",
            "64",
            "--workdir",
            work.to_str().unwrap(),
            "--json",
        ]))
    };
    // Where the added clusters land (the allocation is deterministic): a grow of a
    // copy tells; the old ext4 goes there, random bytes stay around it.
    let probe = dir.path().join("probe.img");
    std::fs::copy(&img, &probe).unwrap();
    grow(&probe);
    let probed = Stick::open(&probe, false)
        .unwrap()
        .file_extents(&overlay)
        .unwrap();
    std::fs::remove_file(&probe).unwrap();
    // The device bytes that hold the grown file past its old end: right after the old
    // run when the clusters there were free, in a run of their own otherwise.
    let mut file_at = 0;
    let mut added = None;
    for &(at, len) in &probed {
        if file_at + len > ov_len {
            let skip = ov_len.saturating_sub(file_at);
            added = Some((at + skip, len - skip));
            break;
        }
        file_at += len;
    }
    let (added_at, added_len) = added.expect("the grown overlay reaches past its old end");
    assert!(added_len >= 24 << 20, "{probed:?}");
    let stale = old_ext4(dir.path(), 24 << 20);
    plant(&img, added_at, &stale);

    let out = grow(&img);
    let out: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(out["grown"], true, "{out}");
    assert_eq!(out["grow"]["new_bytes"], 96 << 20);
    let written = out["write_back"]["bytes_written"].as_u64().unwrap();
    // 64 MiB added, of which 4 MiB are the new groups' inode tables (1 KiB blocks,
    // 2048 inodes of 256 bytes per 8 MiB group): none of it is written.
    assert!(
        written < 3 << 20,
        "only metadata is written back, not the added space: {written} bytes"
    );
    let mut s = Stick::open(&img, false).unwrap();
    let grown = s.file_extents(&overlay).unwrap();
    assert_eq!(
        grown, probed,
        "the grow appended the clusters holding the old ext4"
    );

    let ov = dir.path().join("overlay-copy.img");
    fat_copy_out(&img, part, &overlay, &ov);
    assert_eq!(std::fs::metadata(&ov).unwrap().len(), 96 << 20);
    e2fsck_clean(&ov);
    let stale_left = read_at(&ov, (32 << 20) + (44 << 20), 1 << 20);
    assert!(
        stale_left.iter().any(|&b| b != 0),
        "the added space was not written with zeros"
    );
    assert_eq!(
        sh(
            "blkid",
            &["-p", "-o", "value", "-s", "TYPE", ov.to_str().unwrap()]
        )
        .trim(),
        "ext4"
    );
    assert_eq!(
        sh(
            "debugfs",
            &["-R", "cat /overlayfs/etc/hostname", ov.to_str().unwrap()]
        ),
        "kept across the grow\n"
    );
    // 1 KiB blocks: block 32769 is the first one the grow added.
    assert_eq!(zeroed_groups_past(&ov, 32769), Vec::<String>::new());
    new_space_is_usable(&ov, dir.path(), 60 << 20);
    fsck_fat(&img, part, part_len, dir.path());
}

/// resize2fs zeroes new inode tables and flags them ITABLE_ZEROED where it finds no
/// lazy init in /sys (this host has it, so the flags are set here by debugfs as such
/// a resize2fs would): the settle step clears them, and the tables stay stale.
#[test]
fn zeroed_flags_of_new_groups_are_cleared_before_the_write_back() {
    if !ready() {
        return;
    }
    let dir = tmp();
    let old = sparse(dir.path(), "overlay.img", 32 << 20);
    run(
        &tool("mke2fs"),
        &[
            "-q",
            "-F",
            "-t",
            "ext4",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
            "-O",
            "has_journal,metadata_csum",
            old.to_str().unwrap(),
        ],
    );
    let kept = dir.path().join("kept");
    std::fs::write(&kept, "old file\n").unwrap();
    debugfs_w(&old, &format!("write {} /kept\n", kept.display()));

    // The stick's view of the overlay: the old file system, then stale bytes.
    let stick = dir.path().join("stick-overlay.img");
    fill_random(&stick, 96 << 20);
    plant(&stick, 0, &old);
    plant(&stick, 32 << 20, &old_ext4(dir.path(), 24 << 20));

    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let mut src = std::fs::File::open(&old).unwrap();
    let mut copy =
        WorkCopy::create(&mut src, 32 << 20, &work, "test overlay", &mut |_, _| {}).unwrap();
    copy.set_len(96 << 20).unwrap();
    copy.mark_baseline().unwrap();
    ovl_maint::resize(copy.path(), "test overlay", 96 << 20).unwrap();
    let listing = ok(&c_locale_output(
        &tool("dumpe2fs"),
        &[&copy.path().to_string_lossy()],
    ));
    let mut script = String::new();
    for line in listing
        .lines()
        .filter(|l| l.starts_with("Group ") && l.contains("(Blocks "))
    {
        let (n, rest) = line["Group ".len()..].split_once(':').unwrap();
        let first: u64 = rest
            .split_once("(Blocks ")
            .and_then(|(_, r)| r.split('-').next())
            .and_then(|b| b.parse().ok())
            .unwrap();
        if first >= 32769 {
            // As such a resize2fs leaves them: the bitmaps as they are, the table zeroed.
            let flags = 1 | 4 | if line.contains("BLOCK_UNINIT") { 2 } else { 0 };
            script.push_str(&format!(
                "set_bg {n} flags {flags}\nset_bg {n} checksum calc\n"
            ));
        }
    }
    debugfs_w(copy.path(), &script);
    assert!(!zeroed_groups_past(copy.path(), 32769).is_empty());

    let fresh = copy.settle_fresh_area(32 << 20..96 << 20).unwrap();
    assert_eq!(fresh.lazy_inode_tables, 8, "{fresh:?}");
    assert_eq!(fresh.zeroed_flags_cleared, 8, "{fresh:?}");
    assert!(
        fresh.metadata_bytes > 0 && fresh.metadata_bytes < 1 << 20,
        "{fresh:?}"
    );
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&stick)
        .unwrap();
    let wb = copy.write_back(&mut f, &mut |_, _| {}).unwrap();
    drop(f);
    assert!(wb.bytes_written < 2 << 20, "{wb:?}");

    e2fsck_clean(&stick);
    assert_eq!(zeroed_groups_past(&stick, 32769), Vec::<String>::new());
    assert_eq!(
        sh("debugfs", &["-R", "cat /kept", stick.to_str().unwrap()]),
        "old file\n"
    );
    new_space_is_usable(&stick, dir.path(), 60 << 20);
}

/// A block bitmap resize2fs writes as zeros into the added space (the last group of a
/// grown flex group: full, its metadata in the group before) reads the same as the
/// work copy's hole: the write-back must write it all the same, or the stick keeps
/// stale bits there.
#[test]
fn metadata_written_as_zeros_in_the_added_space_reaches_the_stick() {
    if !ready() {
        return;
    }
    let dir = tmp();
    let old = sparse(dir.path(), "overlay.img", 128 << 20);
    run(
        &tool("mke2fs"),
        &[
            "-q",
            "-F",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-E",
            "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
            "-O",
            "has_journal,metadata_csum",
            old.to_str().unwrap(),
        ],
    );
    // 18 groups of 128 MiB: groups 16 and 17 are new, 17's bitmaps lie in group 16.
    let new_len: u64 = 2304 << 20;
    let stick = sparse(dir.path(), "stick-overlay.img", new_len);
    plant(&stick, 0, &old);
    let noise = dir.path().join("noise");
    fill_random(&noise, 16 << 20);
    plant(&stick, 2 << 30, &noise);

    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let mut src = std::fs::File::open(&old).unwrap();
    let mut copy =
        WorkCopy::create(&mut src, 128 << 20, &work, "test overlay", &mut |_, _| {}).unwrap();
    copy.set_len(new_len).unwrap();
    copy.mark_baseline().unwrap();
    ovl_maint::resize(copy.path(), "test overlay", new_len).unwrap();
    copy.settle_fresh_area(128 << 20..new_len).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&stick)
        .unwrap();
    copy.write_back(&mut f, &mut |_, _| {}).unwrap();
    drop(f);
    e2fsck_clean(&stick);
}
