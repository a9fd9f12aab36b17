//! Persistence beyond the overlay, and re-provisioning existing sticks
//! (issue 4): LUKS and plain home, swap, OverlayFS overlays, keeping home
//! and host files across a rewrite, --skipcopy, --reset-overlay, relabel.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::*;

const MIB: u64 = 1 << 20;

fn write(args: &[&str]) -> std::process::Output {
    let mut full = vec!["--json", "write"];
    full.extend_from_slice(args);
    livestick(&full)
}

fn ok(out: std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "livestick failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

fn new_stick(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

#[test]
fn encrypted_home_opens_with_cryptsetup_and_holds_home() {
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tmp();
    let image = new_stick(dir.path(), "luks.img");
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "correct horse\n").unwrap();
    ok(write(&[
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--size",
        "256M",
        "--home-size-mb",
        "40",
        "--passphrase-file",
        pass.to_str().unwrap(),
        "--luks-pbkdf",
        "pbkdf2",
        "--luks-iter-time",
        "10",
    ]));
    let start = part_start(&image);
    let home = dir.path().join("home.img");
    fat_copy_out(&image, start, "/LiveOS/home.img", &home);
    assert_eq!(std::fs::metadata(&home).unwrap().len(), 40 * MIB);
    let dump = run("cryptsetup", &["luksDump", home.to_str().unwrap()]);
    assert!(dump.contains("Version:       \t2"), "{dump}");
    assert!(dump.contains("aes-xts-plain64"), "{dump}");
    assert!(dump.contains("pbkdf2"), "{dump}");
    // The key file holds the passphrase without its final newline.
    let key = dir.path().join("key");
    std::fs::write(&key, "correct horse").unwrap();
    let status = Command::new("cryptsetup")
        .args(["open", "--test-passphrase", "--key-file"])
        .arg(&key)
        .arg(&home)
        .status()
        .unwrap();
    assert!(status.success(), "cryptsetup rejects the right passphrase");
    std::fs::write(&key, "wrong horse").unwrap();
    let status = Command::new("cryptsetup")
        .args(["open", "--test-passphrase", "--key-file"])
        .arg(&key)
        .arg(&home)
        .status()
        .unwrap();
    assert!(!status.success(), "cryptsetup accepts a wrong passphrase");
    // Our own LUKS reader shows ext4 labelled HOME inside.
    let file = std::fs::File::open(&home).unwrap();
    let mut volume = livestick::persist::luks::open_luks2(file, b"correct horse").unwrap();
    let mut sb = vec![0u8; 2048];
    use std::io::{Read, Seek, SeekFrom};
    volume.seek(SeekFrom::Start(0)).unwrap();
    volume.read_exact(&mut sb).unwrap();
    assert_eq!(&sb[1024 + 0x38..1024 + 0x3a], &[0x53, 0xef], "ext4 magic");
    assert_eq!(&sb[1024 + 0x78..1024 + 0x7c], b"HOME");
    assert!(
        livestick::persist::luks::open_luks2(std::fs::File::open(&home).unwrap(), b"nope").is_err()
    );
}

#[test]
fn swap_image_is_recognised_by_blkid() {
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tmp();
    let image = new_stick(dir.path(), "swap.img");
    ok(write(&[
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--size",
        "256M",
        "--swap-size-mb",
        "16",
    ]));
    let swap = dir.path().join("swap-out.img");
    fat_copy_out(&image, part_start(&image), "/LiveOS/swap.img", &swap);
    let blkid = run("blkid", &["-p", "-o", "export", swap.to_str().unwrap()]);
    assert!(blkid.contains("TYPE=swap"), "{blkid}");
}

#[test]
fn overlayfs_overlay_holds_ext4_with_upper_and_work_dirs() {
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tmp();
    let image = new_stick(dir.path(), "ovl.img");
    ok(write(&[
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--size",
        "256M",
        "--overlay-size-mb",
        "32",
        "--overlayfs",
        "--volume-id",
        "0000ABCD",
    ]));
    let start = part_start(&image);
    let overlay = dir.path().join("overlay.img");
    fat_copy_out(&image, start, "/LiveOS/overlay-LIVE-0000-ABCD", &overlay);
    let listing = run("debugfs", &["-R", "ls -l /", overlay.to_str().unwrap()]);
    assert!(listing.contains("overlayfs"), "{listing}");
    assert!(listing.contains("ovlwork"), "{listing}");
    let cfg = String::from_utf8(fat_read(&image, start, "/syslinux/syslinux.cfg")).unwrap();
    assert!(cfg.contains("rd.live.overlay.overlayfs"), "{cfg}");
}

/// A flat root (the tree directly in squashfs.img, as every current Fedora ISO has)
/// gets an OverlayFS overlay without --overlayfs, and the plan says why; a nested
/// rootfs.img keeps the dm-snapshot overlay unless asked.
#[test]
fn a_flat_root_gets_an_overlayfs_overlay_without_a_flag() {
    let dir = tmp();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/hostname"), "flat\n").unwrap();
    let flat = flat_iso_from(&root, dir.path());
    let image = new_stick(dir.path(), "flat.img");
    let plan = ok(write(&[
        flat.to_str().unwrap(),
        image.to_str().unwrap(),
        "--size",
        "256M",
        "--overlay-size-mb",
        "32",
        "--dry-run",
    ]));
    let step = &plan["overlay"];
    assert_eq!(step["kind"], "overlayfs", "{plan}");
    assert!(
        step["why"].as_str().unwrap().contains("directly in"),
        "{step}"
    );
    ok(write(&[
        flat.to_str().unwrap(),
        image.to_str().unwrap(),
        "--size",
        "256M",
        "--overlay-size-mb",
        "32",
        "--volume-id",
        "0000ABCD",
    ]));
    let start = part_start(&image);
    let overlay = dir.path().join("overlay.img");
    fat_copy_out(&image, start, "/LiveOS/overlay-LIVE-0000-ABCD", &overlay);
    let listing = run("debugfs", &["-R", "ls -l /", overlay.to_str().unwrap()]);
    assert!(listing.contains("overlayfs"), "{listing}");
    let cfg = String::from_utf8(fat_read(&image, start, "/syslinux/syslinux.cfg")).unwrap();
    assert!(cfg.contains("rd.live.overlay.overlayfs"), "{cfg}");

    // Nested: dm-snapshot, and the plan says so.
    let nested = synthetic_iso("fedora-classic.iso");
    let plan = ok(write(&[
        nested.to_str().unwrap(),
        dir.path().join("nested.img").to_str().unwrap(),
        "--size",
        "256M",
        "--overlay-size-mb",
        "32",
        "--dry-run",
    ]));
    assert_eq!(plan["overlay"]["kind"], "dm-snapshot", "{plan}");
    assert!(
        plan["overlay"]["why"]
            .as_str()
            .unwrap()
            .contains("rootfs.img")
    );
}

#[test]
fn rewrite_keeps_home_and_host_files_and_resets_the_overlay() {
    let iso_a = synthetic_iso("fedora-classic.iso");
    let iso_b = synthetic_iso("fedora-grub.iso");
    let dir = tmp();
    let image = new_stick(dir.path(), "stick.img");
    ok(write(&[
        iso_a.to_str().unwrap(),
        image.to_str().unwrap(),
        "--size",
        "256M",
        "--overlay-size-mb",
        "16",
        "--home-size-mb",
        "16",
        "--unencrypted-home",
        "--volume-id",
        "1111AAAA",
    ]));
    let start = part_start(&image);
    // A file in home (debugfs -w on a copy, put back), a host file, and a
    // non-empty overlay header as if the stick had been booted.
    let home = dir.path().join("home.img");
    fat_copy_out(&image, start, "/LiveOS/home.img", &home);
    let note = dir.path().join("note.txt");
    std::fs::write(&note, "persisted\n").unwrap();
    run(
        "debugfs",
        &[
            "-w",
            "-R",
            &format!("write {} note.txt", note.display()),
            home.to_str().unwrap(),
        ],
    );
    fat_put(&image, start, &home, "/LiveOS/home.img");
    fat_put(&image, start, &note, "/host-file.txt");
    let used = dir.path().join("used-overlay");
    let mut bytes = fat_read(&image, start, "/LiveOS/overlay-LIVE-1111-AAAA");
    bytes[..4].copy_from_slice(b"SnAp");
    bytes[4] = 1;
    std::fs::write(&used, &bytes).unwrap();
    fat_put(&image, start, &used, "/LiveOS/overlay-LIVE-1111-AAAA");
    // The fixtures share one root image, which would keep the overlay (see
    // rewrite.rs): the stick's is made to differ, as an older release's would.
    let older = dir.path().join("older-squashfs.img");
    let mut bytes = fat_read(&image, start, "/LiveOS/squashfs.img");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&older, &bytes).unwrap();
    fat_put(&image, start, &older, "/LiveOS/squashfs.img");

    // ISO B onto the same stick, no --format, new label.
    let report = ok(write(&[
        iso_b.to_str().unwrap(),
        image.to_str().unwrap(),
        "--label",
        "NEWLIVE",
    ]));
    assert_eq!(report["formatted"], false);
    assert_eq!(fat_read(&image, start, "/host-file.txt"), b"persisted\n");
    fat_copy_out(&image, start, "/LiveOS/home.img", &home);
    let cat = run("debugfs", &["-R", "cat note.txt", home.to_str().unwrap()]);
    assert_eq!(cat, "persisted\n", "home.img content survived");
    // The overlay follows the new label (never orphaned) and is empty.
    let listing = fat_ls(&image, start, "/LiveOS").to_lowercase();
    assert!(listing.contains("overlay-newlive-1111-aaaa"), "{listing}");
    assert!(!listing.contains("overlay-live-1111-aaaa"), "{listing}");
    let overlay = fat_read(&image, start, "/LiveOS/overlay-NEWLIVE-1111-AAAA");
    assert_eq!(overlay.len() as u64, 16 * MIB);
    assert!(
        overlay[..64 * 1024].iter().all(|&b| b == 0),
        "overlay was not reset"
    );
    let blkid = run(
        "blkid",
        &[
            "-p",
            "-o",
            "export",
            "--offset",
            &start.to_string(),
            image.to_str().unwrap(),
        ],
    );
    assert!(blkid.contains("LABEL=NEWLIVE"), "{blkid}");
    let cfg = String::from_utf8(fat_read(&image, start, "/syslinux/syslinux.cfg")).unwrap();
    assert!(
        cfg.contains("rd.live.overlay=UUID=1111-AAAA"),
        "kept overlay is still used:\n{cfg}"
    );
    assert!(cfg.contains("Fedora-LS-Grub-1"), "{cfg}");
    let part = run("sfdisk", &["--json", image.to_str().unwrap()]);
    let (_, len) = (
        start,
        serde_json::from_str::<serde_json::Value>(&part).unwrap()["partitiontable"]["partitions"]
            [0]["size"]
            .as_u64()
            .unwrap()
            * 512,
    );
    fsck_fat(&image, start, len, dir.path());
}

#[test]
fn skipcopy_rewrites_only_configs_and_keeps_the_overlay_content() {
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tmp();
    let image = new_stick(dir.path(), "skip.img");
    ok(write(&[
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--size",
        "256M",
        "--overlay-size-mb",
        "8",
        "--volume-id",
        "2222BBBB",
    ]));
    let start = part_start(&image);
    let overlay_path = "/LiveOS/overlay-LIVE-2222-BBBB";
    let mut bytes = fat_read(&image, start, overlay_path);
    bytes[..4].copy_from_slice(b"SnAp");
    let used = dir.path().join("used");
    std::fs::write(&used, &bytes).unwrap();
    fat_put(&image, start, &used, overlay_path);
    let report = ok(write(&[
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--skipcopy",
        "--extra-kernel-args",
        "systemd.unit=multi-user.target",
    ]));
    assert!(
        report["files"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["path"] != "/LiveOS/squashfs.img"),
        "--skipcopy copied squashfs.img"
    );
    assert_eq!(
        &fat_read(&image, start, overlay_path)[..4],
        b"SnAp",
        "skipcopy reset the overlay"
    );
    let cfg = String::from_utf8(fat_read(&image, start, "/syslinux/syslinux.cfg")).unwrap();
    assert!(cfg.contains("systemd.unit=multi-user.target"), "{cfg}");
    // --reset-overlay empties it.
    ok(write(&[
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--skipcopy",
        "--reset-overlay",
    ]));
    assert_eq!(&fat_read(&image, start, overlay_path)[..4], &[0, 0, 0, 0]);
}

#[test]
fn delete_home_replaces_it_and_an_existing_home_is_not_overwritten_silently() {
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tmp();
    let image = new_stick(dir.path(), "home.img");
    ok(write(&[
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--size",
        "256M",
        "--home-size-mb",
        "16",
        "--unencrypted-home",
    ]));
    let out = write(&[
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--home-size-mb",
        "24",
        "--unencrypted-home",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--delete-home"));
    ok(write(&[
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--home-size-mb",
        "24",
        "--unencrypted-home",
        "--delete-home",
        "--yes",
    ]));
    let home = fat_read(&image, part_start(&image), "/LiveOS/home.img");
    assert_eq!(home.len() as u64, 24 * MIB);
}

#[test]
fn format_over_a_stick_with_a_home_asks_first_and_names_the_home() {
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tmp();
    let image = new_stick(dir.path(), "formatted.img");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
    ok(write(&[
        &s(&iso),
        &s(&image),
        "--size",
        "256M",
        "--home-size-mb",
        "16",
        "--unencrypted-home",
    ]));
    let before = std::fs::read(&image).unwrap();
    // No terminal to ask on (stdin is not one) and no --yes: refused, untouched.
    let out = write(&[&s(&iso), &s(&image), "--format"]);
    let err = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("/LiveOS/home.img (16 MiB)"), "{err}");
    assert!(err.contains("--yes"), "{err}");
    assert!(
        std::fs::read(&image).unwrap() == before,
        "nothing was written"
    );
    // With --yes the new table goes down, home and all.
    ok(write(&[&s(&iso), &s(&image), "--format", "--yes"]));
    let home = std::process::Command::new("mtype")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{}", s(&image), part_start(&image)))
        .arg("::/LiveOS/home.img")
        .output()
        .unwrap();
    assert!(!home.status.success(), "home.img is gone");
    // A stick without a home is formatted as before, no question.
    ok(write(&[&s(&iso), &s(&image), "--format"]));
}

#[test]
fn persistence_bad_input() {
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tmp();
    let image = dir.path().join("bad.img");
    let i = image.to_str().unwrap();
    let iso_s = iso.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![iso_s, i, "--size", "256M", "--home-size-mb", "4096"],
            "4095",
        ),
        (
            vec![
                iso_s,
                i,
                "--size",
                "64M",
                "--home-size-mb",
                "200",
                "--unencrypted-home",
            ],
            "too small",
        ),
        (
            vec![
                iso_s,
                i,
                "--size",
                "256M",
                "--home-size-mb",
                "32",
                "--passphrase-file",
                "/nonexistent/pass",
            ],
            "passphrase",
        ),
        (
            vec![iso_s, i, "--size", "256M", "--copy-home"],
            "--copy-home",
        ),
        (
            vec![iso_s, i, "--size", "256M", "--skipcopy"],
            "existing stick",
        ),
    ];
    for (args, needle) in cases {
        let out = write(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: expected {needle:?} in {stderr}"
        );
        assert!(!image.exists(), "{args:?} created the image");
    }
    let empty = dir.path().join("empty-pass");
    std::fs::write(&empty, "\n").unwrap();
    let out = write(&[
        iso_s,
        i,
        "--size",
        "256M",
        "--home-size-mb",
        "32",
        "--passphrase-file",
        empty.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .to_lowercase()
            .contains("empty")
    );
    assert!(
        !image.exists(),
        "an empty passphrase left a half-written image"
    );
}

#[test]
fn another_stick_as_source_carries_overlay_and_home_over() {
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tmp();
    let old = new_stick(dir.path(), "old.img");
    ok(write(&[
        iso.to_str().unwrap(),
        old.to_str().unwrap(),
        "--size",
        "256M",
        "--overlay-size-mb",
        "16",
        "--home-size-mb",
        "16",
        "--unencrypted-home",
        "--volume-id",
        "0A0A0A0A",
    ]));
    let start = part_start(&old);
    // A used overlay and a file in home, as after some boots.
    let overlay_path = "/LiveOS/overlay-LIVE-0A0A-0A0A";
    let mut overlay = fat_read(&old, start, overlay_path);
    overlay[..4].copy_from_slice(b"SnAp");
    overlay[4] = 1;
    overlay[5 * 4096] = 0x42;
    let used = dir.path().join("used");
    std::fs::write(&used, &overlay).unwrap();
    fat_put(&old, start, &used, overlay_path);
    let home = dir.path().join("home.img");
    fat_copy_out(&old, start, "/LiveOS/home.img", &home);
    let note = dir.path().join("note.txt");
    std::fs::write(&note, "carried\n").unwrap();
    run(
        "debugfs",
        &[
            "-w",
            "-R",
            &format!("write {} note.txt", note.display()),
            home.to_str().unwrap(),
        ],
    );
    fat_put(&old, start, &home, "/LiveOS/home.img");

    // The old stick inspects as a source.
    let out = livestick(&["inspect", "--json", old.to_str().unwrap()]);
    let v = ok(out);
    assert_eq!(v["source_kind"], "stick");
    assert_eq!(v["label"], "LIVE");
    assert_eq!(v["source_overlay"]["path"], overlay_path);

    let new = new_stick(dir.path(), "new.img");
    ok(write(&[
        old.to_str().unwrap(),
        new.to_str().unwrap(),
        "--size",
        "256M",
        "--label",
        "COPY",
        "--copy-overlay",
        "--copy-home",
        "--volume-id",
        "0B0B0B0B",
    ]));
    let nstart = part_start(&new);
    assert_eq!(
        fat_read(&new, nstart, "/LiveOS/overlay-COPY-0B0B-0B0B"),
        overlay
    );
    fat_copy_out(&new, nstart, "/LiveOS/home.img", &home);
    assert_eq!(
        run("debugfs", &["-R", "cat note.txt", home.to_str().unwrap()]),
        "carried\n"
    );
    assert_eq!(
        fat_read(&new, nstart, "/LiveOS/squashfs.img"),
        fat_read(&old, start, "/LiveOS/squashfs.img")
    );
    let cfg = String::from_utf8(fat_read(&new, nstart, "/syslinux/syslinux.cfg")).unwrap();
    assert!(cfg.contains("root=live:UUID=0B0B-0B0B"), "{cfg}");
    assert!(cfg.contains("rd.live.overlay=UUID=0B0B-0B0B"), "{cfg}");
    assert!(!cfg.contains("0A0A-0A0A"), "{cfg}");
    let listing = fat_ls(&new, nstart, "/LiveOS").to_lowercase();
    assert!(
        !listing.contains("overlay-live-"),
        "the source's overlay name leaked: {listing}"
    );

    // Bad input: copying from an ISO, or a home the source does not have.
    let bare = new_stick(dir.path(), "bare.img");
    ok(write(&[
        iso.to_str().unwrap(),
        bare.to_str().unwrap(),
        "--size",
        "256M",
    ]));
    let target = dir.path().join("never.img");
    for (args, needle) in [
        (
            vec![
                iso.to_str().unwrap(),
                target.to_str().unwrap(),
                "--size",
                "256M",
                "--copy-home",
            ],
            "ISO image",
        ),
        (
            vec![
                bare.to_str().unwrap(),
                target.to_str().unwrap(),
                "--size",
                "256M",
                "--copy-home",
            ],
            "no home.img",
        ),
        (
            vec![
                bare.to_str().unwrap(),
                target.to_str().unwrap(),
                "--size",
                "256M",
                "--copy-overlay",
            ],
            "no overlay",
        ),
    ] {
        let out = write(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(!target.exists());
    }
}

/// `home` (an ext4 image) as a stick pulled while mounted leaves it: a new file's
/// data is in its blocks, but the bitmaps, inode and directory that say so are
/// only in the journal (written there with debugfs's journal commands), with
/// `needs_recovery` set. Returns the file's bytes.
fn leave_a_file_in_the_journal_only(home: &Path, dir: &Path) -> Vec<u8> {
    let block: usize = run("dumpe2fs", &["-h", home.to_str().unwrap()])
        .lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("a block size");
    let before = std::fs::read(home).unwrap();
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 31 % 253) as u8).collect();
    let host = dir.join("f.bin");
    std::fs::write(&host, &data).unwrap();
    run(
        "debugfs",
        &[
            "-w",
            "-R",
            &format!("write {} f", host.display()),
            home.to_str().unwrap(),
        ],
    );
    let mut after = std::fs::read(home).unwrap();
    let file_blocks: Vec<usize> = run("debugfs", &["-R", "blocks f", home.to_str().unwrap()])
        .split_whitespace()
        .map(|b| b.parse().unwrap())
        .collect();
    let metadata: Vec<usize> = (0..before.len() / block)
        .filter(|b| before[b * block..(b + 1) * block] != after[b * block..(b + 1) * block])
        .filter(|b| !file_blocks.contains(b))
        .collect();
    assert!(metadata.len() >= 3, "{metadata:?}");
    let journaled = dir.join("meta.bin");
    let mut meta = Vec::new();
    for &b in &metadata {
        meta.extend_from_slice(&after[b * block..(b + 1) * block]);
        after[b * block..(b + 1) * block].copy_from_slice(&before[b * block..(b + 1) * block]);
    }
    std::fs::write(&journaled, meta).unwrap();
    std::fs::write(home, &after).unwrap();
    let list: Vec<String> = metadata.iter().map(ToString::to_string).collect();
    let script = dir.join("journal.cmds");
    std::fs::write(
        &script,
        format!("jo\njw -b {} {}\njc\n", list.join(","), journaled.display()),
    )
    .unwrap();
    run(
        "debugfs",
        &["-w", "-f", script.to_str().unwrap(), home.to_str().unwrap()],
    );
    let header = run("dumpe2fs", &["-h", home.to_str().unwrap()]);
    assert!(header.contains("needs_recovery"), "{header}");
    data
}

fn e2fsck_and_read(home: &Path, path: &str, dir: &Path) -> Vec<u8> {
    let out = Command::new("e2fsck")
        .arg("-fy")
        .arg(home)
        .output()
        .unwrap();
    assert!(out.status.code().is_some_and(|c| c <= 1), "{out:?}");
    let dumped = dir.join("dumped");
    let _ = std::fs::remove_file(&dumped);
    run(
        "debugfs",
        &[
            "-R",
            &format!("dump {path} {}", dumped.display()),
            home.to_str().unwrap(),
        ],
    );
    std::fs::read(&dumped).unwrap_or_default()
}

#[test]
fn a_home_with_a_journal_to_replay_is_copied_whole() {
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tmp();
    let old = new_stick(dir.path(), "old.img");
    ok(write(&[
        iso.to_str().unwrap(),
        old.to_str().unwrap(),
        "--size",
        "256M",
        "--home-size-mb",
        "32",
        "--unencrypted-home",
    ]));
    let start = part_start(&old);
    let home = dir.path().join("home.img");
    fat_copy_out(&old, start, "/LiveOS/home.img", &home);
    let data = leave_a_file_in_the_journal_only(&home, dir.path());
    // Control: replaying the journal is what keeps the file.
    let control = dir.path().join("control.img");
    std::fs::copy(&home, &control).unwrap();
    assert_eq!(e2fsck_and_read(&control, "f", dir.path()), data);
    fat_put(&old, start, &home, "/LiveOS/home.img");

    let new = new_stick(dir.path(), "new.img");
    ok(write(&[
        old.to_str().unwrap(),
        new.to_str().unwrap(),
        "--size",
        "256M",
        "--copy-home",
    ]));
    let copied = dir.path().join("copied.img");
    fat_copy_out(&new, part_start(&new), "/LiveOS/home.img", &copied);
    assert_eq!(
        std::fs::read(&copied).unwrap(),
        std::fs::read(&home).unwrap(),
        "a home with a journal to replay is copied whole"
    );
    assert_eq!(e2fsck_and_read(&copied, "f", dir.path()), data);
}

#[test]
fn multi_adds_a_second_image_with_a_chained_menu() {
    let first = synthetic_iso("fedora-classic.iso");
    let second = synthetic_iso("fedora-grub.iso");
    let dir = tmp();
    let image = new_stick(dir.path(), "multi.img");
    ok(write(&[
        first.to_str().unwrap(),
        image.to_str().unwrap(),
        "--size",
        "256M",
        "--overlay-size-mb",
        "8",
        "--volume-id",
        "3333CCCC",
    ]));
    let start = part_start(&image);
    let first_squash = fat_read(&image, start, "/LiveOS/squashfs.img");
    let first_overlay = fat_read(&image, start, "/LiveOS/overlay-LIVE-3333-CCCC");

    // Bad input first: the same directory, and --multi on a new image.
    let out = write(&[second.to_str().unwrap(), image.to_str().unwrap(), "--multi"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--livedir"));
    let fresh = dir.path().join("fresh.img");
    let out = write(&[
        second.to_str().unwrap(),
        fresh.to_str().unwrap(),
        "--size",
        "256M",
        "--multi",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!fresh.exists());

    ok(write(&[
        second.to_str().unwrap(),
        image.to_str().unwrap(),
        "--multi",
        "--livedir",
        "Grub",
        "--overlay-size-mb",
        "8",
    ]));
    // The first image is untouched, overlay included.
    assert_eq!(
        fat_read(&image, start, "/LiveOS/squashfs.img"),
        first_squash
    );
    assert_eq!(
        fat_read(&image, start, "/LiveOS/overlay-LIVE-3333-CCCC"),
        first_overlay
    );
    assert!(!fat_read(&image, start, "/isolinux/vmlinuz").is_empty());
    // The second lives under /Grub with its own boot files and overlay.
    assert!(!fat_read(&image, start, "/Grub/squashfs.img").is_empty());
    assert!(
        fat_read(&image, start, "/Grub/images/pxeboot/vmlinuz")
            .starts_with(b"LIVESTICK-SYNTHETIC-KERNEL")
    );
    assert_eq!(
        fat_read(&image, start, "/Grub/overlay-LIVE-3333-CCCC").len() as u64,
        8 * MIB
    );
    let own = String::from_utf8(fat_read(&image, start, "/Grub/syslinux/syslinux.cfg")).unwrap();
    assert!(own.contains("LINUX /Grub/images/pxeboot/vmlinuz"), "{own}");
    assert!(own.contains("rd.live.dir=Grub"), "{own}");
    assert!(own.contains("UI /syslinux/menu.c32"), "{own}");
    assert!(own.contains("CONFIG /syslinux/syslinux.cfg"), "{own}");
    let main = String::from_utf8(fat_read(&image, start, "/syslinux/syslinux.cfg")).unwrap();
    assert!(
        main.contains("CONFIG /Grub/syslinux/syslinux.cfg"),
        "{main}"
    );
    assert!(
        main.contains("LINUX /isolinux/vmlinuz"),
        "first image's entries kept:\n{main}"
    );
    let grub = String::from_utf8(fat_read(&image, start, "/EFI/BOOT/grub.cfg")).unwrap();
    assert!(
        grub.contains("linux /Grub/images/pxeboot/vmlinuz"),
        "{grub}"
    );
    assert!(
        grub.contains("linux /images/pxeboot/vmlinuz"),
        "first image's UEFI entries kept:\n{grub}"
    );
    // Installing the second image again replaces its entries, never duplicates them.
    ok(write(&[
        second.to_str().unwrap(),
        image.to_str().unwrap(),
        "--multi",
        "--livedir",
        "Grub",
    ]));
    let main = String::from_utf8(fat_read(&image, start, "/syslinux/syslinux.cfg")).unwrap();
    assert_eq!(
        main.matches("CONFIG /Grub/syslinux/syslinux.cfg").count(),
        1,
        "{main}"
    );
    let grub = String::from_utf8(fat_read(&image, start, "/EFI/BOOT/grub.cfg")).unwrap();
    let per_install = grub.matches("linux /Grub/images/pxeboot/vmlinuz").count();
    assert!(
        per_install > 0 && per_install <= 3,
        "entries duplicated:\n{grub}"
    );
    let len = part_len(&image);
    fsck_fat(&image, start, len, dir.path());
}

/// Free bytes of the FAT at `start` of `image`, as mtools' `minfo` counts them.
fn fat_free_bytes(image: &Path, start: u64) -> u64 {
    let info = run(
        "minfo",
        &["-i", &format!("{}@@{start}", image.display()), "::"],
    );
    let field = |name: &str| -> u64 {
        info.split(name)
            .nth(1)
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {info}"))
    };
    field("free clusters=") * field("cluster size:") * 512
}

#[test]
fn a_manifest_update_on_a_full_stick_leaves_no_staged_copy() {
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tmp();
    let stick = new_stick(dir.path(), "full.img");
    ok(write(&[
        iso.to_str().unwrap(),
        stick.to_str().unwrap(),
        "--size",
        "128M",
        "--overlay-size-mb",
        "16",
    ]));
    let start = part_start(&stick);
    // Fill the stick but for the 1 MiB the grow takes: the manifest's new copy
    // then finds no room.
    let filler = dir.path().join("filler");
    let free = fat_free_bytes(&stick, start);
    std::fs::File::create(&filler)
        .unwrap()
        .set_len(free - (1 << 20))
        .unwrap();
    fat_put(&stick, start, &filler, "/filler");
    assert_eq!(fat_free_bytes(&stick, start), 1 << 20);

    let out = livestick(&["overlay", "grow", stick.to_str().unwrap(), "--add-mb", "1"]);
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("manifest could not be updated"), "{stderr}");
    let listing = fat_ls(&stick, start, "/LiveOS").to_lowercase();
    assert!(listing.contains("livestick.json"), "{listing}");
    assert!(!listing.contains("livestick.json.new"), "{listing}");
    let len = part_len(&stick);
    fsck_fat(&stick, start, len, dir.path());
}
