//! The ext4 live layout (issue 12 part 4): persistence over FAT32's 4 GiB file
//! limit puts the live directory on an ext4 partition 2 beside a FAT boot
//! partition 1. Checked with tools independent of livestick: sfdisk, fsck.fat,
//! e2fsck, debugfs, blkid, mtools, xorriso.

use std::path::Path;
use std::process::Command;

use crate::support::fixtures::boot_iso;
use crate::support::{self, fill_random, livestick, synthetic_iso, tmp};

/// sha256 of a sparse file's data regions and their offsets (what a write could
/// change; the holes read as zeros), without reading gigabytes of holes.
fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::io::AsRawFd;
    let mut f = std::fs::File::open(path).expect("open");
    let len = f.metadata().expect("stat").len();
    let fd = f.as_raw_fd();
    let mut hash = sha2::Sha256::new();
    let mut at: i64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    while (at as u64) < len {
        use nix::unistd::{Whence, lseek};
        let Ok(data) = lseek(fd, at, Whence::SeekData) else {
            break;
        };
        let hole = lseek(fd, data, Whence::SeekHole).expect("SEEK_HOLE");
        hash.update(data.to_le_bytes());
        f.seek(SeekFrom::Start(data as u64)).expect("seek");
        let mut left = (hole - data) as u64;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            f.read_exact(&mut buf[..n]).expect("read");
            hash.update(&buf[..n]);
            left -= n as u64;
        }
        at = hole;
    }
    format!("{:x}", hash.finalize())
}

/// Blocks the host really holds for `path`, in bytes.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "livestick failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (start, size) in bytes of each partition, from `sfdisk --json`.
fn partitions(image: &Path) -> Vec<(u64, u64, serde_json::Value)> {
    let table = support::sfdisk(image);
    table["partitiontable"]["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| {
            (
                p["start"].as_u64().expect("start") * 512,
                p["size"].as_u64().expect("size") * 512,
                p.clone(),
            )
        })
        .collect()
}

fn debugfs(image: &Path, offset: u64, cmd: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", cmd])
        .arg(format!("{}?offset={offset}", image.display()))
        .output()
        .expect("run debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn e2fsck_clean(image: &Path, offset: u64) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(format!("{}?offset={offset}", image.display()))
        .output()
        .expect("run e2fsck");
    assert!(
        out.status.success(),
        "e2fsck -fn on the ext4 partition: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A sparse stick of `size` bytes whose first `stale` bytes are random.
fn used_stick(dir: &Path, size: u64, stale: u64) -> std::path::PathBuf {
    let image = dir.join("stick.img");
    fill_random(&image, stale);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .expect("open")
        .set_len(size)
        .expect("size");
    image
}

#[test]
fn six_gib_overlay_goes_on_an_ext4_partition_costing_its_metadata() {
    let dir = tmp();
    let image = used_stick(dir.path(), 8 << 30, 256 << 20);
    let before = allocated(&image);
    let iso = boot_iso("boot-classic.iso");
    let out = ok(&livestick(&[
        "write",
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--format",
        "--yes",
        "--json",
        "--overlay-size-mb",
        "6144",
        "--home-size-mb",
        "64",
        "--unencrypted-home",
    ]));
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    let written = report["written_bytes"].as_u64().unwrap();
    assert!(written < 80 << 20, "wrote {written} bytes");
    assert_eq!(report["verified_bytes"], report["written_bytes"]);
    assert!(
        allocated(&image) - before < 80 << 20,
        "the image is not sparse"
    );

    let parts = partitions(&image);
    assert_eq!(parts.len(), 2, "{parts:?}");
    let (p1, p1_len, e1) = &parts[0];
    let (p2, _, e2) = &parts[1];
    assert_eq!(e1["bootable"], serde_json::json!(true));
    assert_eq!(e1["type"], serde_json::json!("c"));
    assert_eq!(e2["type"], serde_json::json!("83"));
    support::fsck_fat(&image, *p1, *p1_len, dir.path());
    e2fsck_clean(&image, *p2);

    // blkid sees ext4 on partition 2, and the menus point dracut at it.
    let blkid = support::sh(
        "blkid",
        &["-p", "--offset", &p2.to_string(), image.to_str().unwrap()],
    );
    assert!(
        blkid.contains("TYPE=\"ext4\"") && blkid.contains("LABEL=\"LIVE\""),
        "{blkid}"
    );
    let uuid = blkid
        .split("UUID=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("a UUID")
        .to_string();
    let grub = String::from_utf8(support::fat_read(&image, *p1, "/EFI/BOOT/grub.cfg")).unwrap();
    assert!(grub.contains(&format!("root=live:UUID={uuid}")), "{grub}");
    assert!(
        grub.contains(&format!("rd.live.overlay=UUID={uuid}")),
        "{grub}"
    );
    // The FAT holds the boot files, not the live system: its LiveOS/ has only
    // livestick's manifest (which `verify` reads).
    let live_on_fat = support::fat_ls(&image, *p1, "/LiveOS");
    for name in ["squashfs", "overlay", "home", "swap"] {
        assert!(!live_on_fat.contains(name), "{live_on_fat}");
    }

    // The files, with their sizes, as debugfs lists them.
    let overlay = format!("/LiveOS/overlay-LIVE-{uuid}");
    let stat = debugfs(&image, *p2, &format!("stat {overlay}"));
    assert!(stat.contains("Size: 6442450944"), "{stat}");
    let extents = debugfs(&image, *p2, &format!("ex {overlay}"));
    assert!(
        extents.contains("Uninit"),
        "a fresh overlay stays unwritten:\n{extents}"
    );
    let home = debugfs(&image, *p2, "stat /LiveOS/home.img");
    assert!(home.contains("Size: 67108864"), "{home}");
    assert!(!debugfs(&image, *p2, "ex /LiveOS/squashfs.img").contains("Uninit"));
    // dracut mounts this partition read-write: persistence is the owner's alone.
    assert!(stat.contains("Mode:  0600"), "{stat}");
    assert!(home.contains("Mode:  0600"), "{home}");
    let root = debugfs(&image, *p2, "stat /LiveOS/squashfs.img");
    assert!(root.contains("Mode:  0644"), "{root}");

    // The root image is the ISO's, byte for byte.
    let ours = dir.path().join("squashfs.ours");
    let theirs = dir.path().join("squashfs.iso");
    debugfs(
        &image,
        *p2,
        &format!("dump /LiveOS/squashfs.img {}", ours.display()),
    );
    support::iso_extract(&iso, "/LiveOS/squashfs.img", &theirs);
    assert_eq!(support::sha256_file(&ours), support::sha256_file(&theirs));

    // The overlay is found and read through its extents: unwritten extents read as
    // zeros, so the store is new although its blocks hold stale random bytes.
    let status = ok(&livestick(&[
        "overlay",
        "status",
        image.to_str().unwrap(),
        "--json",
    ]));
    let status: serde_json::Value = serde_json::from_str(&status).expect("status JSON");
    assert_eq!(
        status["state"],
        serde_json::json!("uninitialised"),
        "{status}"
    );
    assert!(
        status["overlay"].as_str().unwrap().ends_with(&overlay),
        "{status}"
    );

    // A merge of the new, empty store has nothing to do and changes nothing.
    let sum = sha256_file(&image);
    let merge = livestick(&["overlay", "merge", image.to_str().unwrap(), "--yes"]);
    assert!(merge.status.success(), "{merge:?}");
    assert_eq!(sha256_file(&image), sum);
}

#[test]
fn ext4_flag_with_small_persistence_and_compat_format_ext4() {
    let dir = tmp();
    let image = used_stick(dir.path(), 1 << 30, 64 << 20);
    let iso = synthetic_iso("fedora-classic.iso");
    ok(&livestick(&[
        "write",
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--ext4",
        "--yes",
        "--overlay-size-mb",
        "64",
    ]));
    let parts = partitions(&image);
    assert_eq!(parts.len(), 2, "{parts:?}");
    e2fsck_clean(&image, parts[1].0);
    let ls = debugfs(&image, parts[1].0, "ls -l /LiveOS");
    assert!(
        ls.contains("squashfs.img") && ls.contains("overlay-LIVE-"),
        "{ls}"
    );

    // A batch: one read of the ISO fans out to both sticks, the ext4 partition's
    // root image included.
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    ok(&livestick(&[
        "write",
        iso.to_str().unwrap(),
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--size",
        "1G",
        "--ext4",
        "--yes",
        "--overlay-size-mb",
        "64",
    ]));
    for stick in [&a, &b] {
        let parts = partitions(stick);
        assert_eq!(parts.len(), 2, "{parts:?}");
        e2fsck_clean(stick, parts[1].0);
    }

    // The livecd-iso-to-disk front end: `--format ext4` is this layout.
    let old = dir.path().join("old.img");
    std::fs::File::create(&old)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let out = Command::new(support::bin())
        .args(["iso-to-disk", "--format", "ext4", "--overlay-size-mb", "64"])
        .arg(&iso)
        .arg(&old)
        .output()
        .expect("run");
    ok(&out);
    let parts = partitions(&old);
    assert_eq!(parts.len(), 2, "{parts:?}");
    e2fsck_clean(&old, parts[1].0);
}

#[test]
fn persistence_larger_than_the_stick_is_refused_with_figures_before_writing() {
    let dir = tmp();
    let image = used_stick(dir.path(), 4 << 30, 16 << 20);
    let sum = sha256_file(&image);
    let iso = synthetic_iso("fedora-classic.iso");
    let out = livestick(&[
        "write",
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--format",
        "--yes",
        "--overlay-size-mb",
        "6144",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("too small by") && err.contains("6144") || err.contains("needs"),
        "{err}"
    );
    assert!(err.contains("MiB"), "{err}");
    assert_eq!(sha256_file(&image), sum, "the stick changed");
}

#[test]
fn an_existing_fat_stick_is_refused_with_figures_and_format_named() {
    let dir = tmp();
    let image = used_stick(dir.path(), 8 << 30, 16 << 20);
    let iso = synthetic_iso("fedora-classic.iso");
    ok(&livestick(&[
        "write",
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--yes",
    ]));
    let sum = sha256_file(&image);
    let out = livestick(&[
        "write",
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--yes",
        "--overlay-size-mb",
        "6144",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--format") && err.contains("4095") && err.contains("MiB free"),
        "{err}"
    );
    assert_eq!(sha256_file(&image), sum, "the stick changed");
}

/// The UUID of the ext4 file system at `offset` of `image`, as blkid reads it.
fn ext4_uuid(image: &Path, offset: u64) -> String {
    support::blkid_value(image, offset, "UUID")
}

/// The `--json write` report or plan of `args`.
fn write_json(args: &[&str]) -> serde_json::Value {
    let mut full = vec!["--json", "write"];
    full.extend_from_slice(args);
    serde_json::from_str(&ok(&livestick(&full))).expect("JSON on stdout")
}

/// Opens `path` of the ext4 live partition of `image` for writing as the kernel
/// would (into unwritten extents, marking them written) and hands it to `f`.
fn with_live_file<T>(
    image: &Path,
    path: &str,
    f: impl FnOnce(&mut livestick::disk::ext4_fs::Ext4FileRw<&mut std::fs::File>, u64) -> T,
) -> T {
    use livestick::disk::ext4_fs::{Ext4FileRw, find_live_partition};
    use livestick::io::SyncData;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .expect("open the stick");
    let p = find_live_partition(&mut file, "LiveOS")
        .expect("reads the partitions")
        .expect("an ext4 live partition");
    let map = {
        let mut window = livestick::io::PartitionWindow::new(&mut file, p.start, p.len);
        p.fs.file(&mut window, path)
            .expect("reads the ext4")
            .unwrap_or_else(|| panic!("{path} is on the ext4 partition"))
    };
    let mut rw = Ext4FileRw::new(&mut file, &p, &map);
    let out = f(&mut rw, map.size);
    rw.sync_data().expect("syncs");
    out
}

/// sha256 of `path` of the ext4 partition at `offset`, as debugfs dumps it.
fn dumped_sha256(image: &Path, offset: u64, path: &str, scratch: &Path) -> String {
    let out = scratch.join("dumped");
    let _ = std::fs::remove_file(&out);
    debugfs(image, offset, &format!("dump {path} {}", out.display()));
    support::sha256_file(&out)
}

#[test]
fn an_ext4_stick_is_rewritten_in_place_keeping_home_and_the_overlay_of_the_same_root() {
    let dir = tmp();
    let image = used_stick(dir.path(), 1 << 30, 300 << 20);
    let classic = synthetic_iso("fedora-classic.iso");
    let grub = synthetic_iso("fedora-grub.iso");
    let (iso, img) = (classic.to_str().unwrap(), image.to_str().unwrap());
    write_json(&[
        iso,
        img,
        "--ext4",
        "--yes",
        "--overlay-size-mb",
        "64",
        "--home-size-mb",
        "32",
        "--unencrypted-home",
    ]);
    let parts = partitions(&image);
    let (p1, p2) = (parts[0].0, parts[1].0);
    let uuid = ext4_uuid(&image, p2);
    let overlay = format!("/LiveOS/overlay-LIVE-{uuid}");
    // The root record sits beside the root image, inside the ext4 partition.
    let from_iso = dir.path().join("iso-squashfs.img");
    support::iso_extract(&classic, "/LiveOS/squashfs.img", &from_iso);
    let record = debugfs(&image, p2, "cat /LiveOS/.livestick");
    assert!(
        record.contains(&format!("sha256={}\n", support::sha256_file(&from_iso))),
        "{record}"
    );
    // The live system ran: three chunks changed in the overlay.
    let changed = with_live_file(&image, &overlay, |cow, len| {
        crate::support::dm_snapshot::boot_and_change(cow, len)
    });
    assert_eq!(changed, 3);
    e2fsck_clean(&image, p2);
    let overlay_before = dumped_sha256(&image, p2, &overlay, dir.path());
    let home_before = dumped_sha256(&image, p2, "/LiveOS/home.img", dir.path());
    let home_inode = debugfs(&image, p2, "stat /LiveOS/home.img");
    let home_inode = home_inode.lines().next().unwrap_or_default().to_string();
    // A leftover of a rewrite stopped before its swap: removed by the next one.
    support::debugfs_w(
        &format!("{img}?offset={p2}"),
        "write /dev/null LiveOS/squashfs.img.new\n",
    );

    // The same ISO again, without --format: recognised by the record on ext4.
    let plan = write_json(&[iso, img, "--dry-run"]);
    assert_eq!(plan["ext4_live"]["in_place"], true, "{plan}");
    assert_eq!(plan["kept_overlay"]["reset"], false, "{plan}");
    assert_eq!(plan["kept_overlay"]["used_bytes"], 3 * 8 * 512, "{plan}");
    assert!(
        plan["kept_overlay"]["why"]
            .as_str()
            .unwrap()
            .contains("written from this ISO (implanted MD5"),
        "{plan}"
    );
    assert_eq!(
        plan["ext4_live"]["deletes"],
        serde_json::json!(["/LiveOS/squashfs.img.new"]),
        "{plan}"
    );
    assert_eq!(plan["format"]["new"], false, "{plan}");
    // Stopped between writing the new image and swapping it in: the old image
    // and its overlay are whole, the staged copy waits beside them, the ext4 clean.
    let root_inode = debugfs(&image, p2, "stat /LiveOS/squashfs.img");
    let stopped = Command::new(support::bin())
        .args(["write", iso, img, "--yes"])
        .env("LIVESTICK_FAILPOINT", "ext4-staged")
        .output()
        .expect("run livestick");
    assert_eq!(stopped.status.code(), Some(4), "{stopped:?}");
    e2fsck_clean(&image, p2);
    assert_eq!(
        debugfs(&image, p2, "stat /LiveOS/squashfs.img")
            .lines()
            .next(),
        root_inode.lines().next()
    );
    assert!(debugfs(&image, p2, "ls /LiveOS").contains("squashfs.img.new"));
    assert_eq!(
        dumped_sha256(&image, p2, &overlay, dir.path()),
        overlay_before
    );
    // Run again: done.
    let report = write_json(&[iso, img, "--yes"]);
    assert_eq!(report["kept_overlay"]["reset"], false, "{report}");
    assert_eq!(
        report["written_bytes"], report["verified_bytes"],
        "{report}"
    );
    // Both partitions as they were; the ext4 clean; overlay and home untouched.
    let after = partitions(&image);
    assert_eq!(
        after.iter().map(|p| (p.0, p.1)).collect::<Vec<_>>(),
        parts.iter().map(|p| (p.0, p.1)).collect::<Vec<_>>()
    );
    e2fsck_clean(&image, p2);
    support::fsck_fat(&image, p1, parts[0].1, dir.path());
    assert_eq!(
        dumped_sha256(&image, p2, &overlay, dir.path()),
        overlay_before
    );
    assert_eq!(
        dumped_sha256(&image, p2, "/LiveOS/home.img", dir.path()),
        home_before
    );
    let home_now = debugfs(&image, p2, "stat /LiveOS/home.img");
    assert_eq!(home_now.lines().next().unwrap_or_default(), home_inode);
    let ls = debugfs(&image, p2, "ls /LiveOS");
    assert!(!ls.contains("squashfs.img.new"), "{ls}");
    assert_eq!(
        dumped_sha256(&image, p2, "/LiveOS/squashfs.img", dir.path()),
        support::sha256_file(&from_iso)
    );
    // verify reads the root image inside the ext4 partition: intact.
    let verified = ok(&livestick(&["--json", "verify", img]));
    let verified: serde_json::Value = serde_json::from_str(&verified).expect("JSON");
    let root = support::listed_entry(&verified, "/LiveOS/squashfs.img");
    assert_eq!(root["state"], "intact", "{verified}");

    // The root image replaced behind the record's back (as `overlay merge` does): a
    // rewrite compares it in full, finds it changed, empties the overlay in place
    // (a new store: a zeroed header) and writes the ISO's image again; home.img stays.
    with_live_file(&image, "/LiveOS/squashfs.img", |root, len| {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut last = [0u8; 1];
        root.seek(SeekFrom::Start(len - 1)).unwrap();
        root.read_exact(&mut last).unwrap();
        root.seek(SeekFrom::Start(len - 1)).unwrap();
        root.write_all(&[last[0] ^ 0xff]).unwrap();
    });
    let plan = write_json(&[iso, img, "--dry-run"]);
    assert_eq!(plan["kept_overlay"]["reset"], true, "{plan}");
    assert!(
        plan["kept_overlay"]["why"]
            .as_str()
            .unwrap()
            .contains("the root image changes"),
        "{plan}"
    );
    write_json(&[iso, img, "--yes"]);
    e2fsck_clean(&image, p2);
    let emptied = with_live_file(&image, &overlay, |cow, len| {
        livestick::persist::snapshot::status(
            cow,
            len,
            livestick::persist::snapshot::LIVEOS_CHUNK_SECTORS,
            None,
        )
        .expect("a store")
    });
    assert_eq!(emptied.exceptions, 0, "{emptied:?}");
    assert_eq!(
        dumped_sha256(&image, p2, "/LiveOS/home.img", dir.path()),
        home_before
    );
    assert_eq!(
        dumped_sha256(&image, p2, "/LiveOS/squashfs.img", dir.path()),
        support::sha256_file(&from_iso)
    );
    let other = grub.to_str().unwrap();

    // --delete-home and --reset-overlay work there too.
    let report = write_json(&[other, img, "--yes", "--delete-home", "--reset-overlay"]);
    assert_eq!(report["kept_overlay"]["reset"], true, "{report}");
    assert!(!debugfs(&image, p2, "ls /LiveOS").contains("home.img"));
    e2fsck_clean(&image, p2);

    // New persistence sizes follow what a FAT stick does: a new overlay size makes
    // it anew, a swap and a home are added, an existing home is never replaced
    // silently (exit 2, the stick unchanged).
    write_json(&[
        other,
        img,
        "--yes",
        "--overlay-size-mb",
        "96",
        "--swap-size-mb",
        "8",
        "--home-size-mb",
        "16",
        "--unencrypted-home",
    ]);
    e2fsck_clean(&image, p2);
    let stat = debugfs(&image, p2, &format!("stat {overlay}"));
    assert!(stat.contains(&format!("Size: {}", 96 << 20)), "{stat}");
    let ls = debugfs(&image, p2, "ls -l /LiveOS");
    assert!(ls.contains("swap.img") && ls.contains("home.img"), "{ls}");
    let before = sha256_file(&image);
    let again = livestick(&["write", other, img, "--yes", "--home-size-mb", "16"]);
    assert_eq!(again.status.code(), Some(2), "{again:?}");
    assert_eq!(sha256_file(&image), before, "the stick changed");
}

#[test]
fn copy_overlay_and_home_onto_the_ext4_layout_copy_their_used_parts_only() {
    use livestick::disk::extent_file::ExtentFile;
    let dir = tmp();
    let iso = synthetic_iso("fedora-classic.iso");
    // The source: a FAT stick after some boots (three overlay chunks changed, a
    // file in home).
    let old = dir.path().join("old.img");
    ok(&livestick(&[
        "write",
        iso.to_str().unwrap(),
        old.to_str().unwrap(),
        "--size",
        "512M",
        "--yes",
        "--overlay-size-mb",
        "128",
        "--home-size-mb",
        "64",
        "--unencrypted-home",
        "--volume-id",
        "0A0A0A0A",
    ]));
    {
        let mut stick = livestick::disk::stick::Stick::open(&old, true).expect("opens");
        let extents = stick
            .file_extents("/LiveOS/overlay-LIVE-0A0A-0A0A")
            .expect("the overlay");
        let mut cow = ExtentFile::new(stick.file_mut(), &extents);
        let len = cow.len();
        assert_eq!(
            crate::support::dm_snapshot::boot_and_change(&mut cow, len),
            3
        );
    }
    let start = support::part_start(&old);
    let home = dir.path().join("home.img");
    support::fat_copy_out(&old, start, "/LiveOS/home.img", &home);
    let note = dir.path().join("note.txt");
    std::fs::write(&note, "carried\n").unwrap();
    support::debugfs_w(&home, &format!("write {} note.txt\n", note.display()));
    support::fat_put(&old, start, &home, "/LiveOS/home.img");

    // Onto the ext4 layout, over stale random bytes.
    let new = used_stick(dir.path(), 1 << 30, 400 << 20);
    let report = write_json(&[
        old.to_str().unwrap(),
        new.to_str().unwrap(),
        "--ext4",
        "--yes",
        "--copy-overlay",
        "--copy-home",
    ]);
    // Whole files would be 192 MiB; their used parts are a few MiB.
    let written = report["written_bytes"].as_u64().expect("written_bytes");
    assert!(written < 48 << 20, "wrote {written} bytes: {report}");
    assert_eq!(report["verified_bytes"], report["written_bytes"]);
    let parts = partitions(&new);
    let p2 = parts[1].0;
    e2fsck_clean(&new, p2);
    let ls = debugfs(&new, p2, "ls /LiveOS");
    // Named for the ext4 partition, the live device dracut looks on.
    let overlay = format!("/LiveOS/overlay-LIVE-{}", ext4_uuid(&new, p2));
    assert!(ls.contains(&overlay[8..]), "{overlay} on ext4: {ls}");
    // The overlay's store as the kernel will read it: the same three changes; the
    // parts never copied stay unwritten extents (zeros, whatever the stick held).
    let status = with_live_file(&new, &overlay, |cow, len| {
        livestick::persist::snapshot::status(
            cow,
            len,
            livestick::persist::snapshot::LIVEOS_CHUNK_SECTORS,
            None,
        )
        .expect("a store")
    });
    assert_eq!(status.exceptions, 3, "{status:?}");
    assert!(status.problems.is_empty(), "{status:?}");
    let extents = debugfs(&new, p2, &format!("ex {overlay}"));
    assert!(extents.contains("Uninit"), "{extents}");
    // home.img: its file, and a clean ext4.
    let copied = dir.path().join("copied-home.img");
    debugfs(
        &new,
        p2,
        &format!("dump /LiveOS/home.img {}", copied.display()),
    );
    assert_eq!(
        support::run("debugfs", &["-R", "cat note.txt", copied.to_str().unwrap()]),
        "carried\n"
    );
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&copied)
        .output()
        .expect("e2fsck");
    assert!(fsck.status.success(), "{fsck:?}");
}

/// `verify --deep` runs e2fsck on the ext4 layout's overlay and home too. A file
/// that lies in pieces in the ext4 partition (past a block group's backup
/// superblock) is checked on a copy; before, it was never checked at all.
#[test]
fn verify_deep_checks_the_ext4_layouts_overlay_and_home_even_in_pieces() {
    let dir = tmp();
    let image = used_stick(dir.path(), 1 << 30, 64 << 20);
    let iso = synthetic_iso("fedora-classic.iso");
    let s = image.to_str().unwrap();
    ok(&livestick(&[
        "write",
        iso.to_str().unwrap(),
        s,
        "--ext4",
        "--overlayfs",
        "--overlay-size-mb",
        "300",
        "--home-size-mb",
        "32",
        "--unencrypted-home",
        "--yes",
    ]));
    let deep = |expect_ok: bool| -> serde_json::Value {
        let out = livestick(&["--json", "verify", s, "--deep"]);
        assert_eq!(out.status.success(), expect_ok, "{out:?}");
        serde_json::from_slice(&out.stdout).expect("a JSON report")
    };
    let report = deep(true);
    let persistence = report["persistence"].as_array().unwrap();
    assert_eq!(persistence.len(), 2, "{report:#}");
    for p in persistence {
        assert_eq!(p["deep"]["clean"], true, "{p:#}");
    }
    let overlay = persistence.iter().find(|p| p["kind"] == "overlay").unwrap();
    assert!(
        overlay["deep"]["detail"]
            .as_str()
            .unwrap()
            .contains("on a copy"),
        "{overlay:#}"
    );

    // Damage inside the overlay's ext4 (its free inode count, through the
    // partition): found on the copy.
    let p2 = partitions(&image)[1].0;
    let path = overlay["path"].as_str().unwrap();
    let extents = debugfs(&image, p2, &format!("ex {path}"));
    let first_block: u64 = extents
        .lines()
        .find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            // "0/ 1   1/  3     0 - 32767 34816 - 67583  32768"
            let dash = cols.iter().rposition(|c| *c == "-")?;
            cols.get(dash - 1)?.parse().ok()
        })
        .expect("an extent");
    let free_inodes_at = p2 + first_block * 4096 + 1024 + 0x10;
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .unwrap();
        f.seek(SeekFrom::Start(free_inodes_at)).unwrap();
        f.write_all(&7u32.to_le_bytes()).unwrap();
    }
    let report = deep(false);
    let overlay = report["persistence"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["kind"] == "overlay")
        .unwrap()
        .clone();
    assert_eq!(overlay["deep"]["clean"], false, "{overlay:#}");
}
