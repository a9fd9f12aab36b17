//! `livestick restore`: a stick back to plain storage, checked with sfdisk, blkid,
//! fsck.fat and mtools; `--save-home` checked with sha256sum against mtools' copy.

use std::path::{Path, PathBuf};

use crate::support::*;

fn live_stick(dir: &Path, extra: &[&str]) -> PathBuf {
    let image = dir.join("stick.img");
    let iso = synthetic_iso("fedora-classic.iso");
    let mut args = vec![
        "write",
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--size",
        "256M",
        "--overlay-size-mb",
        "32",
        "--home-size-mb",
        "32",
        "--unencrypted-home",
        "--yes",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    ok(&livestick(&args));
    image
}

/// What a restored stick must be, read with independent tools: one MBR partition from
/// 1 MiB to the end, not active, no boot code, a clean FAT32 with `label` and no files,
/// and nothing else blkid recognises on the disk or in the partition.
fn assert_plain(image: &Path, label: &str, scratch: &Path) {
    let size = std::fs::metadata(image).unwrap().len();
    let table = sfdisk(image);
    let t = &table["partitiontable"];
    assert_eq!(t["label"], "dos", "{table:#}");
    let parts = t["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 1, "{table:#}");
    assert_eq!(parts[0]["start"], 2048);
    assert_eq!(parts[0]["type"], "c");
    assert!(
        parts[0].get("bootable").is_none(),
        "no boot flag: {table:#}"
    );
    let len = parts[0]["size"].as_u64().unwrap() * 512;
    assert_eq!(len, (size - (1 << 20)) / (1 << 20) * (1 << 20));
    let mbr = read_at(image, 0, 512);
    assert!(mbr[..440].iter().all(|&b| b == 0), "boot code removed");
    let blkid = |offset: u64| {
        std::process::Command::new(tool("blkid"))
            .args(["-p", "-o", "export", "--offset", &offset.to_string()])
            .arg(image)
            .output()
            .unwrap()
    };
    let part = String::from_utf8_lossy(&blkid(1 << 20).stdout).into_owned();
    assert!(part.contains("TYPE=vfat"), "{part}");
    assert!(part.contains("VERSION=FAT32"), "{part}");
    assert!(part.contains(&format!("LABEL={label}")), "{part}");
    let whole = String::from_utf8_lossy(&blkid(0).stdout).into_owned();
    assert!(whole.contains("PTTYPE=dos"), "{whole}");
    assert!(
        !whole.contains("TYPE=\"") || !whole.contains("crypto"),
        "{whole}"
    );
    fsck_fat(image, 1 << 20, len, scratch);
    let ls = fat_ls(image, 1 << 20, "/");
    assert!(ls.trim().is_empty(), "no files: {ls}");
    let mdir = std::process::Command::new(tool("mdir"))
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{}", image.display(), 1 << 20))
        .arg("::")
        .output()
        .unwrap();
    let mdir = String::from_utf8_lossy(&mdir.stdout);
    assert!(
        mdir.contains(&format!("Volume in drive : is {label}")),
        "{mdir}"
    );
}

#[test]
fn a_live_stick_becomes_one_plain_fat32_partition() {
    let dir = tmp();
    let stick = live_stick(dir.path(), &[]);
    let s = stick.to_str().unwrap();
    // The dry run names what is found and what is lost, and writes nothing.
    let before = sha256_file(&stick);
    let dry = ok(&livestick(&["restore", s, "--dry-run"]));
    assert!(dry.contains("a live stick written by livestick"), "{dry}");
    assert!(dry.contains("home.img (32 MiB)"), "{dry}");
    assert_eq!(sha256_file(&stick), before);
    // Without --yes and without a terminal: refused, unchanged.
    let out = livestick(&["restore", s]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("home.img (32 MiB)"),
        "the question names the home: {err}"
    );
    assert_eq!(sha256_file(&stick), before);

    let out = livestick(&["--json", "restore", s, "--label", "PHOTOS", "--yes"]);
    let text = ok(&out);
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(report["fs"], "fat32");
    assert_eq!(report["label"], "PHOTOS");
    assert_eq!(report["written_bytes"], report["verified_bytes"]);
    assert_plain(&stick, "PHOTOS", dir.path());

    // --quiet: errors only, nothing on either stream for a restore that worked.
    let out = livestick(&["restore", s, "--label", "QUIET", "--yes", "--quiet"]);
    assert_eq!(ok(&out), "");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    assert_plain(&stick, "QUIET", dir.path());
}

#[test]
fn a_gpt_stick_over_stale_signatures_is_restored_too() {
    let dir = tmp();
    let stick = dir.path().join("stick.img");
    // Random bytes first: whatever restore leaves unwritten holds old data.
    fill_random(&stick, 256 << 20);
    let iso = synthetic_iso("fedora-classic.iso");
    ok(&livestick(&[
        "write",
        iso.to_str().unwrap(),
        stick.to_str().unwrap(),
        "--gpt",
        "--overlay-size-mb",
        "16",
        "--yes",
        "--quiet",
    ]));
    assert_eq!(sfdisk(&stick)["partitiontable"]["label"], "gpt");
    ok(&livestick(&["restore", stick.to_str().unwrap(), "--yes"]));
    assert_plain(&stick, "USB", dir.path());
    // No GPT is left at either end for a partitioner to find.
    let tail = read_at(&stick, (256 << 20) - 512, 512);
    assert!(!tail.starts_with(b"EFI PART"), "backup GPT header wiped");
    assert!(!read_at(&stick, 512, 512).starts_with(b"EFI PART"));
}

#[test]
fn save_home_copies_home_img_off_first_and_checks_it() {
    let dir = tmp();
    let stick = live_stick(dir.path(), &[]);
    let s = stick.to_str().unwrap();
    let home = dir.path().join("home-from-stick.img");
    fat_copy_out(&stick, part_start(&stick), "LiveOS/home.img", &home);
    let want = sha256_file(&home);
    let saved = dir.path().join("saved-home.img");
    let out = livestick(&[
        "--json",
        "restore",
        s,
        "--save-home",
        saved.to_str().unwrap(),
        "--yes",
    ]);
    let report: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(sha256_file(&saved), want);
    assert_eq!(report["saved_home"]["sha256"], want.as_str());
    assert_eq!(report["saved_home"]["size_bytes"], 32 << 20);
    e2fsck_clean(&saved);
    assert_plain(&stick, "USB", dir.path());

    // An existing file is never overwritten: bad input, the stick unchanged.
    let stick = live_stick(&dir.path().join("again").tap_mkdir(), &[]);
    let before = sha256_file(&stick);
    let out = livestick(&[
        "restore",
        stick.to_str().unwrap(),
        "--save-home",
        saved.to_str().unwrap(),
        "--yes",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the file exists"));
    assert_eq!(sha256_file(&stick), before);
    assert_eq!(sha256_file(&saved), want);
}

#[test]
fn every_home_of_a_multi_stick_is_named_and_saved_into_a_directory() {
    let dir = tmp();
    let stick = live_stick(dir.path(), &[]);
    let s = stick.to_str().unwrap();
    let second = synthetic_iso("fedora-grub.iso");
    ok(&livestick(&[
        "write",
        second.to_str().unwrap(),
        s,
        "--multi",
        "--livedir",
        "Grub",
        "--overlay-size-mb",
        "8",
        "--home-size-mb",
        "24",
        "--unencrypted-home",
        "--yes",
        "--quiet",
    ]));
    let start = part_start(&stick);
    let mut want = Vec::new();
    for (dir_name, path) in [("LiveOS", "LiveOS/home.img"), ("Grub", "Grub/home.img")] {
        let copy = dir.path().join(format!("mtools-{dir_name}.img"));
        fat_copy_out(&stick, start, path, &copy);
        want.push(sha256_file(&copy));
    }

    // The plan names both homes as lost.
    let plan = crate::support::schema::valid_document(
        ok(&livestick(&["--json", "restore", s, "--dry-run"])).as_bytes(),
        "restore-plan",
    );
    let homes: Vec<(&str, u64)> = plan["found"]["homes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["path"].as_str().unwrap(),
                h["size_bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        homes,
        [("/LiveOS/home.img", 32 << 20), ("/Grub/home.img", 24 << 20)]
    );
    let lost = plan["lost"].to_string();
    assert!(
        lost.contains("/LiveOS/home.img") && lost.contains("/Grub/home.img"),
        "{lost}"
    );

    // One file for two homes: bad input naming both, the stick unchanged.
    let before = sha256_file(&stick);
    let one_file = dir.path().join("home-copy.img");
    let out = livestick(&[
        "restore",
        s,
        "--save-home",
        one_file.to_str().unwrap(),
        "--yes",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/LiveOS/home.img, /Grub/home.img") && err.contains("existing directory"),
        "{err}"
    );
    assert_eq!(sha256_file(&stick), before);
    assert!(!one_file.exists());

    // A directory takes each, checked against mtools' copies, readable only by
    // their owner (a home holds private files).
    let saves = dir.path().join("saves").tap_mkdir();
    let report = crate::support::schema::valid_document(
        ok(&livestick(&[
            "--json",
            "restore",
            s,
            "--save-home",
            saves.to_str().unwrap(),
            "--yes",
        ]))
        .as_bytes(),
        "restore",
    );
    for (name, want) in ["LiveOS-home.img", "Grub-home.img"].iter().zip(&want) {
        let saved = saves.join(name);
        assert_eq!(&sha256_file(&saved), want, "{name}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&saved).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{name}");
        e2fsck_clean(&saved);
    }
    let saved = report["saved_homes"].as_array().unwrap();
    assert_eq!(saved.len(), 2);
    assert_eq!(saved[1]["from"], "/Grub/home.img");
    assert_eq!(saved[1]["sha256"], want[1].as_str());
    assert_eq!(report["saved_home"], saved[0]);
    assert_plain(&stick, "USB", dir.path());
}

#[test]
fn the_ext4_layouts_home_is_named_and_saved() {
    let dir = tmp();
    // Persistence over FAT32's 4 GiB limit: the live directory on ext4 partition 2.
    let stick = dir.path().join("stick.img");
    fill_random(&stick, 64 << 20);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&stick)
        .unwrap()
        .set_len(8 << 30)
        .unwrap();
    let iso = synthetic_iso("fedora-classic.iso");
    let s = stick.to_str().unwrap();
    ok(&livestick(&[
        "write",
        iso.to_str().unwrap(),
        s,
        "--format",
        "--overlay-size-mb",
        "5000",
        "--home-size-mb",
        "48",
        "--unencrypted-home",
        "--yes",
        "--quiet",
    ]));
    let p2 = sfdisk(&stick)["partitiontable"]["partitions"][1]["start"]
        .as_u64()
        .unwrap()
        * 512;
    // debugfs's copy of the home, through the partition's offset.
    let dumped = dir.path().join("debugfs-home.img");
    sh(
        "debugfs",
        &[
            "-R",
            &format!("dump /LiveOS/home.img {}", dumped.display()),
            &format!("{s}?offset={p2}"),
        ],
    );
    let want = sha256_file(&dumped);

    let plan = crate::support::schema::valid_document(
        ok(&livestick(&["--json", "restore", s, "--dry-run"])).as_bytes(),
        "restore-plan",
    );
    let home = &plan["found"]["homes"][0];
    assert_eq!(home["path"], "/LiveOS/home.img", "{plan:#}");
    assert_eq!(home["filesystem"], "ext4");
    assert_eq!(home["partition"], 2);
    assert_eq!(plan["found"]["live"], true);
    let description = plan["found"]["description"].as_str().unwrap();
    assert!(description.contains("ext4 partition 2"), "{description}");
    let lost = plan["lost"].to_string();
    assert!(
        lost.contains("/LiveOS/home.img in ext4 partition 2"),
        "{lost}"
    );
    assert!(lost.contains("/LiveOS/overlay-"), "{lost}");

    let saved = dir.path().join("saved-home.img");
    ok(&livestick(&[
        "restore",
        s,
        "--save-home",
        saved.to_str().unwrap(),
        "--yes",
    ]));
    assert_eq!(sha256_file(&saved), want);
    e2fsck_clean(&saved);
    // Restored (the full check of a plain stick is the tests' above; copying out an
    // 8 GiB partition for fsck.fat would cost this one half a minute).
    let parts = sfdisk(&stick)["partitiontable"]["partitions"].clone();
    assert_eq!(parts.as_array().map(Vec::len), Some(1), "{parts:#}");
    let blkid = sh("blkid", &["-p", "--offset", "1048576", s]);
    assert!(
        blkid.contains("TYPE=\"vfat\"") && blkid.contains("LABEL=\"USB\""),
        "{blkid}"
    );
}

#[test]
fn save_home_on_the_stick_itself_is_refused() {
    if !require(is_root(), "root (a loop device and a mount)") || !need("mkfs.ext4") {
        return;
    }
    // A stick another tool made: one ext4 over the whole device, mounted; the copy
    // would land on it.
    let dir = tmp();
    let stick = sparse(dir.path(), "ext4-stick.img", 64 << 20);
    sh("mkfs.ext4", &["-q", "-F", stick.to_str().unwrap()]);
    let Some(dev) = loop_device(&[], &stick) else {
        return;
    };
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    // Read-only and without journal replay: the kernel writes nothing to it, so
    // "nothing written" can be checked byte for byte.
    let mounted = std::process::Command::new("mount")
        .args(["-o", "ro,noload"])
        .arg(&dev.0)
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !require(mounted, "mounting an ext4 loop device") {
        return;
    }
    let before = sha256_file(&stick);
    let out = livestick(&[
        "restore",
        stick.to_str().unwrap(),
        "--save-home",
        mnt.join("home.img").to_str().unwrap(),
        "--yes",
    ]);
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    // The image is mounted through its loop device, which the safety check sees
    // first; the save-home check stands behind it for what that cannot see.
    assert!(
        err.contains("is on the stick being restored")
            || (err.contains("is in use") && err.contains("is mounted on")),
        "{err}"
    );
    assert_eq!(sha256_file(&stick), before, "nothing written");
}

#[test]
fn any_stick_is_restored_and_restore_says_what_it_found() {
    let dir = tmp();
    // Not a live stick: random bytes with an ext4 superblock at 1 MiB and no table.
    let stick = dir.path().join("stick.img");
    fill_random(&stick, 128 << 20);
    let ext4 = sparse(dir.path(), "fs.img", 32 << 20);
    sh("mkfs.ext4", &["-q", "-F", ext4.to_str().unwrap()]);
    let fs = std::fs::read(&ext4).unwrap();
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&stick)
            .unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&fs).unwrap();
    }
    let out = livestick(&["restore", stick.to_str().unwrap(), "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no partition table"),
        "says what it found: {err}"
    );
    assert_plain(&stick, "USB", dir.path());

    // A file system or swap over the whole disk is named, not only "no table".
    for (what, make) in [
        (
            "an ext4 file system labelled \"DATA\"",
            ["mkfs.ext4", "-q", "-F", "-L", "DATA"].as_slice(),
        ),
        (
            "a swap area labelled \"SWAP\"",
            ["mkswap", "-L", "SWAP"].as_slice(),
        ),
    ] {
        let whole = sparse(dir.path(), "whole.img", 64 << 20);
        let (tool_name, args) = make.split_first().unwrap();
        let mut args = args.to_vec();
        args.push(whole.to_str().unwrap());
        sh(tool_name, &args);
        let plan: serde_json::Value = serde_json::from_str(&ok(&livestick(&[
            "--json",
            "restore",
            whole.to_str().unwrap(),
            "--dry-run",
        ])))
        .unwrap();
        let found = plan["found"]["description"].as_str().unwrap();
        assert_eq!(
            found,
            format!("no partition table; the whole disk holds {what}")
        );
        let lost = plan["lost"].as_array().unwrap();
        assert!(
            lost.iter().any(|l| l.as_str().unwrap().contains(what)),
            "{plan:#}"
        );
        std::fs::remove_file(&whole).unwrap();
    }

    // A label FAT cannot hold: bad input before anything is written.
    let out = livestick(&[
        "restore",
        stick.to_str().unwrap(),
        "--label",
        "MUCH TOO LONG",
        "--yes",
    ]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn restore_on_a_loop_device() {
    if !require(is_root(), "root (loop devices)") {
        return;
    }
    let dir = tmp();
    let stick = live_stick(dir.path(), &[]);
    let Some(dev) = loop_device(&[], &stick) else {
        return;
    };
    // A loop device is not removable: refused without --force, as write refuses it.
    let out = livestick(&["restore", &dev.0, "--yes"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let out = livestick(&["restore", &dev.0, "--yes", "--force", "--label", "LAB"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    drop(dev);
    assert_plain(&stick, "LAB", dir.path());
}

/// `restore --fs exfat` with exfatprogs' mkfs.exfat: one MBR partition of type 7,
/// an exFAT that blkid names with the label, and that `fsck.exfat -n` finds clean,
/// over a live stick with home.img and random bytes in its free space.
#[test]
fn restore_fs_exfat_makes_a_clean_labelled_exfat() {
    if !require(
        have("mkfs.exfat") && have("fsck.exfat"),
        "exfatprogs (scripts/deps.sh)",
    ) {
        return;
    }
    let dir = tmp();
    let stick = live_stick(dir.path(), &[]);
    let s = stick.to_str().unwrap();
    // exFAT holds 11 characters: a longer label is bad input, nothing written.
    let before = sha256_file(&stick);
    let out = livestick(&[
        "restore",
        s,
        "--fs",
        "exfat",
        "--label",
        "Lab-Data_201",
        "--yes",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(sha256_file(&stick), before);
    let out = livestick(&[
        "--json",
        "restore",
        s,
        "--fs",
        "exfat",
        "--label",
        "Lab-Data_26",
        "--yes",
    ]);
    let report: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(report["fs"], "exfat", "{report}");
    assert_eq!(report["label"], "Lab-Data_26");

    let size = std::fs::metadata(&stick).unwrap().len();
    let table = sfdisk(&stick);
    let parts = table["partitiontable"]["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 1, "{table:#}");
    assert_eq!(parts[0]["start"], 2048);
    assert_eq!(parts[0]["type"], "7", "{table:#}");
    assert!(parts[0].get("bootable").is_none(), "{table:#}");
    let len = parts[0]["size"].as_u64().unwrap() * 512;
    assert_eq!(len, (size - (1 << 20)) / (1 << 20) * (1 << 20));
    assert!(
        read_at(&stick, 0, 440).iter().all(|&b| b == 0),
        "boot code removed"
    );

    let blkid = std::process::Command::new(tool("blkid"))
        .args(["-p", "-o", "export", "--offset", "1048576"])
        .arg(&stick)
        .output()
        .unwrap();
    let part = String::from_utf8_lossy(&blkid.stdout);
    assert!(part.contains("TYPE=exfat"), "{part}");
    assert!(part.contains("LABEL=Lab-Data_26"), "{part}");

    // fsck.exfat reads a file: the partition copied out of the stick.
    let copy = dir.path().join("part.img");
    std::fs::write(&copy, read_at(&stick, 1 << 20, len as usize)).unwrap();
    let fsck = std::process::Command::new(tool("fsck.exfat"))
        .arg("-n")
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "fsck.exfat -n: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
}

/// Without mkfs.exfat, `--fs exfat` is refused naming the package, and nothing is
/// written. livestick looks on PATH and in the sbin directories, so the program is
/// hidden in a private mount namespace (an empty, non-executable file bound over it)
/// and PATH holds none.
#[test]
fn restore_fs_exfat_without_mkfs_exfat_is_refused_unchanged() {
    if !require(
        is_root() && have("unshare"),
        "root and unshare (a private mount namespace)",
    ) {
        return;
    }
    let dir = tmp();
    let stick = live_stick(dir.path(), &[]);
    let empty = dir.path().join("not-a-program");
    std::fs::write(&empty, "").unwrap();
    let before = sha256_file(&stick);
    let out = std::process::Command::new(tool("unshare"))
        .args(["--mount", "--propagation", "private", "/bin/sh", "-c"])
        .arg(
            r#"for d in /usr/local/sbin /usr/local/bin /usr/sbin /sbin /usr/bin /bin; do
                 if [ -e "$d/mkfs.exfat" ]; then "$MOUNT" --bind "$EMPTY" "$d/mkfs.exfat" || exit 99; fi
               done
               exec "$@""#,
        )
        .arg("sh")
        .arg(bin())
        .args(["restore", stick.to_str().unwrap(), "--fs", "exfat", "--yes"])
        .env("EMPTY", &empty)
        .env("MOUNT", tool("mount"))
        .env("PATH", dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("mkfs.exfat") && err.contains("exfatprogs"),
        "{err}"
    );
    assert_eq!(sha256_file(&stick), before);
}

trait TapMkdir {
    fn tap_mkdir(self) -> PathBuf;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> PathBuf {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}
