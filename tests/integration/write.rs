//! `livestick write`: images are read back with independent tools (sfdisk,
//! mtools, fsck.fat, dumpe2fs, xorriso), never with livestick's own readers.

use std::path::{Path, PathBuf};

use crate::support::*;

const MIB: u64 = 1 << 20;

struct Written {
    _dir: tempfile::TempDir,
    image: PathBuf,
    json: serde_json::Value,
}

fn write_ok(iso: &Path, extra: &[&str]) -> Written {
    write_ok_sized(iso, "256M", extra)
}

/// [`write_ok`] to an image file of `size`.
fn write_ok_sized(iso: &Path, size: &str, extra: &[&str]) -> Written {
    let dir = tmp();
    let image = dir.path().join("stick.img");
    let mut args = vec![
        "--json",
        "write",
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--size",
        size,
        "--volume-id",
        "1234ABCD",
    ];
    args.extend_from_slice(extra);
    let out = livestick(&args);
    assert!(
        out.status.success(),
        "write failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let json = serde_json::from_slice(&out.stdout).expect("JSON report on stdout");
    Written {
        _dir: dir,
        image,
        json,
    }
}

fn first_partition(image: &Path) -> (serde_json::Value, u64, u64) {
    let table = sfdisk(image);
    let part = table["partitiontable"]["partitions"][0].clone();
    let start = part["start"].as_u64().unwrap() * 512;
    let size = part["size"].as_u64().unwrap() * 512;
    (table, start, size)
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap()
}

#[test]
fn classic_iso_to_mbr_image_with_overlay_and_home() {
    let iso = synthetic_iso("fedora-classic.iso");
    let w = write_ok(
        &iso,
        &[
            "--overlay-size-mb",
            "32",
            "--home-size-mb",
            "16",
            "--unencrypted-home",
        ],
    );
    let (table, start, len) = first_partition(&w.image);
    assert_eq!(table["partitiontable"]["label"], "dos");
    let part = &table["partitiontable"]["partitions"][0];
    assert_eq!(part["type"], "c");
    assert_eq!(part["bootable"], true);
    assert_eq!(start, MIB, "partition aligned to 1 MiB");
    fsck_fat(&w.image, start, len, w._dir.path());
    let blkid = run(
        "blkid",
        &[
            "-p",
            "-o",
            "export",
            "--offset",
            &start.to_string(),
            w.image.to_str().unwrap(),
        ],
    );
    assert!(blkid.contains("TYPE=vfat"), "{blkid}");
    assert!(blkid.contains("LABEL=LIVE"), "{blkid}");
    assert!(blkid.contains("UUID=1234-ABCD"), "{blkid}");

    // squashfs.img is byte-identical to the ISO's.
    let from_iso = w._dir.path().join("iso-squashfs.img");
    iso_extract(&iso, "/LiveOS/squashfs.img", &from_iso);
    let from_stick = w._dir.path().join("stick-squashfs.img");
    fat_copy_out(&w.image, start, "/LiveOS/squashfs.img", &from_stick);
    assert_eq!(sha256_file(&from_iso), sha256_file(&from_stick));

    // Boot configs carry rewritten arguments and drop the media check.
    for cfg in ["/syslinux/syslinux.cfg", "/EFI/BOOT/grub.cfg"] {
        let c = text(fat_read(&w.image, start, cfg));
        assert!(c.contains("root=live:UUID=1234-ABCD"), "{cfg}:\n{c}");
        assert!(c.contains("rd.live.image"), "{cfg}");
        assert!(c.contains("rd.live.overlay=UUID=1234-ABCD"), "{cfg}");
        assert!(
            !c.contains("CDLABEL"),
            "{cfg} still names the ISO label:\n{c}"
        );
        assert!(
            !c.contains("rd.live.check"),
            "{cfg} keeps the media check:\n{c}"
        );
    }
    let grub = text(fat_read(&w.image, start, "/EFI/BOOT/grub.cfg"));
    assert!(
        grub.contains("search --no-floppy --fs-uuid --set=root 1234-ABCD"),
        "{grub}"
    );

    // BIOS boot: ldlinux installed, MBR boot code from SYSLINUX.
    let listing = fat_ls(&w.image, start, "/syslinux");
    assert!(listing.to_lowercase().contains("ldlinux.sys"), "{listing}");
    assert!(listing.to_lowercase().contains("menu.c32"), "{listing}");
    let image = std::fs::read(&w.image).unwrap();
    let mbr_bin = std::fs::read("/usr/lib/syslinux/mbr/mbr.bin").unwrap();
    assert_eq!(&image[..440], &mbr_bin[..440]);

    // UEFI loader copied.
    let efi = fat_read(&w.image, start, "/EFI/BOOT/BOOTX64.EFI");
    let efi_iso = w._dir.path().join("bootx64.efi");
    iso_extract(&iso, "/EFI/BOOT/BOOTX64.EFI", &efi_iso);
    assert_eq!(efi, std::fs::read(&efi_iso).unwrap());

    // Overlay: named for label and UUID, 32 MiB, a new store (chunk 0 zeroed).
    let overlay = fat_read(&w.image, start, "/LiveOS/overlay-LIVE-1234-ABCD");
    assert_eq!(overlay.len() as u64, 32 * MIB);
    assert!(overlay[..64 * 1024].iter().all(|&b| b == 0));

    // home.img: ext4 labelled HOME, 16 MiB.
    let home = w._dir.path().join("home.img");
    fat_copy_out(&w.image, start, "/LiveOS/home.img", &home);
    assert_eq!(std::fs::metadata(&home).unwrap().len(), 16 * MIB);
    let dump = run("dumpe2fs", &["-h", home.to_str().unwrap()]);
    assert!(dump.contains("Filesystem volume name:   HOME"), "{dump}");

    // The JSON report lists every file as verified.
    assert_eq!(w.json["verified"], true);
    assert!(
        w.json["files"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["verified"] == true)
    );
    assert!(w.json["iso_md5"].is_string(), "implanted MD5 was checked");
}

#[test]
fn gpt_layout_uses_gptmbr_and_legacy_boot_attribute() {
    let iso = synthetic_iso("fedora-classic.iso");
    let w = write_ok(&iso, &["--gpt", "--overlay-size-mb", "8"]);
    let (table, start, len) = first_partition(&w.image);
    assert_eq!(table["partitiontable"]["label"], "gpt");
    let part = &table["partitiontable"]["partitions"][0];
    assert_eq!(start, MIB);
    assert!(
        part["attrs"]
            .as_str()
            .unwrap_or("")
            .contains("LegacyBIOSBootable"),
        "{part}"
    );
    fsck_fat(&w.image, start, len, w._dir.path());
    let image = std::fs::read(&w.image).unwrap();
    let gptmbr = std::fs::read("/usr/lib/syslinux/mbr/gptmbr.bin").unwrap();
    assert_eq!(&image[..440], &gptmbr[..440]);
}

#[test]
fn grub_only_iso_gets_a_syslinux_menu_for_bios() {
    let iso = synthetic_iso("fedora-grub.iso");
    let w = write_ok(&iso, &["--overlay-size-mb", "8", "--timeout", "5"]);
    let (_, start, len) = first_partition(&w.image);
    fsck_fat(&w.image, start, len, w._dir.path());
    let cfg = text(fat_read(&w.image, start, "/syslinux/syslinux.cfg"));
    assert!(cfg.contains("/images/pxeboot/vmlinuz"), "{cfg}");
    assert!(cfg.contains("root=live:UUID=1234-ABCD"), "{cfg}");
    assert!(
        cfg.contains("TIMEOUT 50"),
        "--timeout 5 is 50 tenths:\n{cfg}"
    );
    let kernel = fat_read(&w.image, start, "/images/pxeboot/vmlinuz");
    assert!(kernel.starts_with(b"LIVESTICK-SYNTHETIC-KERNEL"));
}

#[test]
fn fedora42_kiwi_layout_is_written() {
    let iso = synthetic_iso("fedora42.iso");
    let w = write_ok(&iso, &["--extra-kernel-args", "console=ttyS0 quiet=no"]);
    let (_, start, _) = first_partition(&w.image);
    for cfg in [
        "/EFI/BOOT/grub.cfg",
        "/boot/grub2/grub.cfg",
        "/syslinux/syslinux.cfg",
    ] {
        let c = text(fat_read(&w.image, start, cfg));
        assert!(c.contains("/boot/x86_64/loader/linux"), "{cfg}:\n{c}");
        assert!(c.contains("console=ttyS0"), "{cfg}: extra args missing");
        assert!(
            !c.contains("rd.live.overlay"),
            "{cfg}: no overlay was asked for"
        );
    }
    let initrd = fat_read(&w.image, start, "/boot/x86_64/loader/initrd");
    assert!(initrd.starts_with(b"LIVESTICK-SYNTHETIC-INITRD"));
}

#[test]
fn inspect_reports_the_live_image() {
    let iso = synthetic_iso("fedora-classic.iso");
    let out = livestick(&["inspect", "--json", iso.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["label"], "Fedora-LS-Test-1");
    assert_eq!(v["layout"], "isolinux");
    assert_eq!(v["root"]["kind"], "nested");
    assert_eq!(v["compressor"], "xz");
    assert_eq!(v["implanted_md5"], true);
    assert!(v["menus"].as_array().unwrap().len() >= 2);
    let human = livestick(&["inspect", iso.to_str().unwrap()]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.contains("Fedora-LS-Test-1"));
    assert!(human.contains("media check"), "{human}");
    let grub = synthetic_iso("fedora-grub.iso");
    let v: serde_json::Value =
        serde_json::from_slice(&livestick(&["inspect", "--json", grub.to_str().unwrap()]).stdout)
            .unwrap();
    assert_eq!(v["layout"], "grub-only");
    assert_eq!(v["kernels"][0], "/images/pxeboot/vmlinuz");
}

#[test]
fn dry_run_prints_the_plan_and_writes_nothing() {
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tmp();
    let image = dir.path().join("never.img");
    let out = livestick(&[
        "--json",
        "write",
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--size",
        "256M",
        "--overlay-size-mb",
        "64",
        "--home-size-mb",
        "16",
        "--unencrypted-home",
        "--dry-run",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!image.exists(), "dry run created the target");
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["format"]["table"], "mbr");
    assert_eq!(plan["overlay"]["size_bytes"], 64 * MIB);
    assert!(plan["free_after_bytes"].as_u64().unwrap() > 0);
    assert!(
        plan["copies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["dest"] == "/LiveOS/squashfs.img")
    );
    let out = livestick(&[
        "write",
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--size",
        "256M",
        "--dry-run",
    ]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("/LiveOS/squashfs.img"), "{table}");
    assert!(table.contains("free after"), "{table}");
    assert!(!image.exists());
}

#[test]
fn rewrite_without_format_keeps_host_files() {
    let iso = synthetic_iso("fedora-classic.iso");
    let w = write_ok(&iso, &["--overlay-size-mb", "8"]);
    let (_, start, _) = first_partition(&w.image);
    let note = w._dir.path().join("notes.txt");
    std::fs::write(&note, "keep me\n").unwrap();
    fat_put(&w.image, start, &note, "/notes.txt");
    // A second write of another ISO into the same stick, no --format.
    let grub = synthetic_iso("fedora-grub.iso");
    let out = livestick(&[
        "write",
        grub.to_str().unwrap(),
        w.image.to_str().unwrap(),
        "--overlay-size-mb",
        "8",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fat_read(&w.image, start, "/notes.txt"), b"keep me\n");
    let cfg = text(fat_read(&w.image, start, "/EFI/BOOT/grub.cfg"));
    assert!(cfg.contains("Fedora-LS-Grub-1"), "{cfg}");
    assert!(
        cfg.contains("root=live:UUID=1234-ABCD"),
        "the stick keeps its UUID:\n{cfg}"
    );
}

/// Runs a write that must fail; checks the exit code, that the message
/// contains `needle`, and that the target is exactly as before.
fn refused(args: &[&str], target: &Path, code: i32, needle: &str) {
    let hash = |p: &Path| p.is_file().then(|| sha256_file(p));
    let before = hash(target);
    let before_len = target.metadata().ok().map(|m| m.len());
    let out = livestick(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "exit code for {args:?}: {stderr}"
    );
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
    let after = hash(target);
    assert_eq!(before, after, "target changed for {args:?}");
    assert_eq!(before_len, target.metadata().ok().map(|m| m.len()));
}

#[test]
fn bad_input_is_refused_and_the_target_is_untouched() {
    let iso = synthetic_iso("fedora-classic.iso");
    let iso_s = iso.to_str().unwrap();
    let dir = tmp();
    let existing = dir.path().join("existing.img");
    std::fs::write(&existing, vec![0x5au8; 4 * MIB as usize]).unwrap();
    let ex = existing.to_str().unwrap();
    let new = dir.path().join("new.img");
    let nw = new.to_str().unwrap();

    // Source missing.
    refused(
        &["write", "/nonexistent/x.iso", nw, "--size", "256M"],
        &new,
        2,
        "does not exist",
    );
    // Not an ISO.
    let junk = dir.path().join("junk.iso");
    std::fs::write(&junk, vec![7u8; 2 * MIB as usize]).unwrap();
    refused(
        &["write", junk.to_str().unwrap(), nw, "--size", "256M"],
        &new,
        2,
        "ISO",
    );
    // Truncated ISO.
    let truncated = dir.path().join("truncated.iso");
    let bytes = std::fs::read(&iso).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    refused(
        &["write", truncated.to_str().unwrap(), nw, "--size", "256M"],
        &new,
        2,
        "incomplete",
    );
    // ISO without LiveOS.
    let plain_root = dir.path().join("plain");
    std::fs::create_dir_all(plain_root.join("docs")).unwrap();
    std::fs::write(plain_root.join("docs/readme.txt"), "not live").unwrap();
    let plain = dir.path().join("plain.iso");
    run(
        "xorriso",
        &[
            "-as",
            "mkisofs",
            "-quiet",
            "-R",
            "-V",
            "PLAIN",
            "-o",
            plain.to_str().unwrap(),
            plain_root.to_str().unwrap(),
        ],
    );
    refused(
        &["write", plain.to_str().unwrap(), nw, "--size", "256M"],
        &new,
        2,
        "not a live image",
    );
    // Target too small, with the shortfall in MiB.
    refused(
        &[
            "write",
            iso_s,
            nw,
            "--size",
            "64M",
            "--overlay-size-mb",
            "100",
        ],
        &new,
        2,
        "too small by",
    );
    refused(
        &["write", iso_s, ex, "--overlay-size-mb", "8"],
        &existing,
        2,
        "too small",
    );
    // Overlay and home over the FAT32 file limit go on an ext4 partition, which
    // must hold them: refused with the limit and the figures.
    refused(
        &[
            "write",
            iso_s,
            nw,
            "--size",
            "2G",
            "--overlay-size-mb",
            "4096",
        ],
        &new,
        2,
        "4095",
    );
    refused(
        &[
            "write",
            iso_s,
            nw,
            "--size",
            "2G",
            "--home-size-mb",
            "5000",
            "--unencrypted-home",
        ],
        &new,
        2,
        "4095",
    );
    // Invalid label.
    refused(
        &[
            "write",
            iso_s,
            nw,
            "--size",
            "256M",
            "--label",
            "bad label!",
        ],
        &new,
        2,
        "invalid label",
    );
    refused(
        &[
            "write",
            iso_s,
            nw,
            "--size",
            "256M",
            "--label",
            "TWELVE_CHARS",
        ],
        &new,
        2,
        "invalid label",
    );
    // Target is a directory.
    refused(
        &["write", iso_s, dir.path().to_str().unwrap()],
        dir.path(),
        2,
        "is a directory",
    );
    // Missing size for a new image, a size that would shrink, a bad size.
    refused(&["write", iso_s, nw], &new, 2, "--size");
    refused(
        &["write", iso_s, ex, "--size", "1M"],
        &existing,
        2,
        "shrink",
    );
    refused(
        &["write", iso_s, nw, "--size", "12Q"],
        &new,
        2,
        "unknown unit",
    );
    // A device path that does not exist is never created.
    let ghost = Path::new("/dev/livestick-test-ghost");
    refused(
        &["write", iso_s, "/dev/livestick-test-ghost"],
        ghost,
        2,
        "does not exist",
    );
}

#[test]
fn loop_device_is_written_like_a_stick() {
    if !require(is_root(), "root (loop devices)") {
        return;
    }
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tmp();
    let image = dir.path().join("loop-backing.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(256 * MIB)
        .unwrap();
    let Some(dev) = Loop::attach(&image) else {
        require(false, "loop devices (losetup -f)");
        return;
    };
    // A loop device is not removable: refused without --force, untouched.
    refused(
        &["write", iso.to_str().unwrap(), &dev.0, "--yes"],
        &image,
        3,
        "--force",
    );
    let out = livestick(&[
        "write",
        iso.to_str().unwrap(),
        &dev.0,
        "--force",
        "--yes",
        "--overlay-size-mb",
        "16",
        "--volume-id",
        "CAFE0001",
    ]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    drop(dev);
    let (table, start, len) = first_partition(&image);
    assert_eq!(table["partitiontable"]["label"], "dos");
    fsck_fat(&image, start, len, dir.path());
    let cfg = text(fat_read(&image, start, "/syslinux/syslinux.cfg"));
    assert!(cfg.contains("root=live:UUID=CAFE-0001"), "{cfg}");
}

#[test]
fn mounted_block_device_is_refused() {
    if !require(is_root(), "root (loop devices, mount)") {
        return;
    }
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tmp();
    let image = dir.path().join("mounted.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    run(
        "mke2fs",
        &["-q", "-t", "ext4", "-F", image.to_str().unwrap()],
    );
    let before = sha256_file(&image);
    let Some(dev) = Loop::attach(&image) else {
        require(false, "loop devices (losetup -f)");
        return;
    };
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    // Read-only and without journal replay, so the mount itself changes no byte.
    let mounted = std::process::Command::new("mount")
        .args(["-o", "ro,noload"])
        .arg(&dev.0)
        .arg(&mnt)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !require(mounted, "mounting an ext4 loop device") {
        return;
    }
    let out = livestick(&["write", iso.to_str().unwrap(), &dev.0, "--force", "--yes"]);
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("is mounted on"), "{stderr}");
    drop(dev);
    assert_eq!(before, sha256_file(&image));
}

/// An ISO whose LiveOS/squashfs.img is neither squashfs nor EROFS (a broken download,
/// a wrong file) is refused as bad input, naming the file and --force, and the target
/// stays untouched; with --force it is written, and the plan says it will not boot.
#[test]
fn a_root_image_that_is_no_filesystem_is_refused_unless_forced() {
    let dir = tmp();
    let root = dir.path().join("iso");
    std::fs::create_dir_all(root.join("LiveOS")).unwrap();
    std::fs::create_dir_all(root.join("isolinux")).unwrap();
    std::fs::write(root.join("LiveOS/squashfs.img"), vec![0x5au8; 1 << 20]).unwrap();
    std::fs::write(root.join("isolinux/vmlinuz"), "kernel").unwrap();
    std::fs::write(root.join("isolinux/initrd.img"), "initrd").unwrap();
    std::fs::write(
        root.join("isolinux/isolinux.cfg"),
        "default linux\nlabel linux\n  kernel vmlinuz\n  append initrd=initrd.img root=live:CDLABEL=BROKEN rd.live.image\n",
    )
    .unwrap();
    let iso = dir.path().join("broken.iso");
    run(
        "xorriso",
        &[
            "-as",
            "mkisofs",
            "-quiet",
            "-V",
            "BROKEN",
            "-R",
            "-J",
            "-o",
            iso.to_str().unwrap(),
            root.to_str().unwrap(),
        ],
    );
    let image = dir.path().join("stick.img");
    std::fs::write(&image, vec![7u8; 4 << 20]).unwrap();
    let before = sha256_file(&image);
    let out = livestick(&[
        "write",
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--yes",
    ]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("neither squashfs nor EROFS") && text.contains("--force"),
        "{text}"
    );
    assert_eq!(
        sha256_file(&image),
        before,
        "a refused write touched the target"
    );
    let plan = livestick(&[
        "--json",
        "write",
        iso.to_str().unwrap(),
        dir.path().join("forced.img").to_str().unwrap(),
        "--size",
        "256M",
        "--force",
        "--dry-run",
    ]);
    assert!(
        plan.status.success(),
        "{}",
        String::from_utf8_lossy(&plan.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert!(
        plan["notes"].to_string().contains("will not boot"),
        "{plan}"
    );
}

/// Issue 12, bad input: an initrd whose dracut version cannot be read (the synthetic
/// fixtures' initrds are no dracut images) gets the classic spellings and a note in
/// the plan; a known spelling asked for on the command line gets no note.
#[test]
fn an_unreadable_dracut_version_is_noted_in_the_plan() {
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tmp();
    let image = dir.path().join("never.img");
    let plan_notes = |extra: &[&str]| -> Vec<String> {
        let mut args = vec![
            "--json",
            "write",
            iso.to_str().unwrap(),
            image.to_str().unwrap(),
            "--size",
            "256M",
            "--overlay-size-mb",
            "64",
            "--overlayfs",
            "--dry-run",
        ];
        args.extend_from_slice(extra);
        let out = livestick(&args);
        let json: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
        json["notes"]
            .as_array()
            .unwrap_or_else(|| panic!("no notes in {json}"))
            .iter()
            .map(|n| n.as_str().unwrap().to_string())
            .collect()
    };
    let notes = plan_notes(&[]);
    assert!(
        notes
            .iter()
            .any(|n| n.contains("dracut version") && n.contains("classic")),
        "{notes:?}"
    );
    let chosen = plan_notes(&["--dracut-names", "classic"]);
    assert!(
        !chosen.iter().any(|n| n.contains("dracut version")),
        "{chosen:?}"
    );
    assert!(!image.exists(), "dry run created the target");
}

/// SYSLINUX is installed into a staged copy of the new filesystem while the ISO's
/// files are written: an installer that fails stops the write before the partition
/// table is written, so the stick (here a used one: random bytes) boots nothing, and
/// the error says what failed and that the stick is incomplete.
#[test]
fn a_failing_syslinux_installer_leaves_a_stick_that_boots_nothing() {
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tmp();
    let bin_dir = dir.path().join("bin");
    stand_in(
        &bin_dir,
        "syslinux",
        "#!/bin/sh\necho 'syslinux: broken on purpose' >&2\nexit 1\n",
    );
    let path = path_first(&bin_dir);
    let stick = dir.path().join("used.img");
    fill_random(&stick, 256 * MIB);
    let out = output_of(
        std::process::Command::new(bin())
            .args(["write", iso.to_str().unwrap(), stick.to_str().unwrap()])
            .args(["--yes", "--force", "--overlay-size-mb", "32"])
            .env("PATH", path),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("broken on purpose"), "{stderr}");
    assert!(stderr.contains("will not boot"), "{stderr}");
    let mut mbr = [0u8; 512];
    std::io::Read::read_exact(&mut std::fs::File::open(&stick).unwrap(), &mut mbr).unwrap();
    assert_ne!(
        &mbr[510..512],
        &[0x55, 0xaa],
        "a partition table was written"
    );
    let table = std::process::Command::new("sfdisk")
        .args(["--json", stick.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!table.status.success(), "sfdisk found a table: {table:?}");
}

/// A file whose bytes are not the size planned for it (here one of /proc, which
/// reports 0 bytes and holds more; as a file edited during the write would) is
/// never written short or long: exit 4 naming the file and the planned size,
/// the stick left booting nothing, and each cause said once.
#[test]
fn a_source_file_that_is_not_its_planned_size_stops_the_write() {
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tmp();
    let stick = dir.path().join("used.img");
    fill_random(&stick, 256 * MIB);
    let out = livestick(&[
        "write",
        iso.to_str().unwrap(),
        stick.to_str().unwrap(),
        "--yes",
        "--force",
        "--updates",
        "/proc/self/status",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("will not boot"), "{stderr}");
    assert!(stderr.contains("writing /LiveOS/updates.img"), "{stderr}");
    assert!(
        stderr.contains("holds more than the 0 bytes planned for it"),
        "{stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    for pair in lines.windows(2) {
        if let Some(cause) = pair[1].strip_prefix("  caused by: ") {
            assert!(!pair[0].contains(cause), "said twice: {stderr}");
        }
    }
    let mut mbr = [0u8; 512];
    std::io::Read::read_exact(&mut std::fs::File::open(&stick).unwrap(), &mut mbr).unwrap();
    assert_ne!(
        &mbr[510..512],
        &[0x55, 0xaa],
        "a partition table was written"
    );
}

/// The FAT's first data cluster starts on a cluster boundary, as mkfs.fat lays a
/// FAT out (fatfs alone puts it wherever its FATs end): no cluster straddles the
/// stick's pages, so the live system's 4 KiB writes into the overlay and home are
/// whole pages of the stick. Checked from the boot sector's bytes, for partitions
/// of several sizes, each clean for fsck.fat.
#[test]
fn the_fat_data_region_starts_on_a_cluster_boundary() {
    let iso = synthetic_iso("fedora-classic.iso");
    for size in ["300M", "1G", "2051M"] {
        let w = write_ok_sized(&iso, size, &["--yes", "--overlay-size-mb", "64"]);
        let (_, start, len) = first_partition(&w.image);
        let boot = read_at(&w.image, start, 512);
        let u16_at = |at: usize| u64::from(u16::from_le_bytes([boot[at], boot[at + 1]]));
        let fat_sectors = u64::from(u32::from_le_bytes(boot[36..40].try_into().unwrap()));
        let (reserved, per_cluster, fats) = (u16_at(14), u64::from(boot[13]), u64::from(boot[16]));
        let data = reserved + fats * fat_sectors;
        assert_eq!(
            data % per_cluster,
            0,
            "{size}: data region at sector {data}, clusters of {per_cluster} sectors"
        );
        assert_eq!(
            (start + data * 512) % 4096,
            0,
            "{size}: not on a 4 KiB page"
        );
        fsck_fat(&w.image, start, len, w._dir.path());
    }
}
