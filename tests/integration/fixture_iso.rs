//! The fixture ISOs are what they claim to be, checked with independent
//! tools (xorriso, checkisomd5, unsquashfs, debugfs), and the bootable one
//! boots under QEMU with the harness — before any livestick code is involved.

use std::path::Path;
use std::process::Command;

use crate::boot::harness::{self, Boot, Firmware};
use crate::support::fixtures::{self, boot_iso, synthetic_iso};
use crate::support::{repo, run};

fn path_str(p: &Path) -> &str {
    p.to_str().expect("fixture paths are UTF-8")
}

/// Every file in the ISO (Rock Ridge names), as `/a/b` paths.
fn iso_files(iso: &Path) -> Vec<String> {
    run(
        "xorriso",
        &["-indev", path_str(iso), "-find", "/", "-type", "f"],
    )
    .lines()
    .map(|l| l.trim().trim_matches('\'').to_string())
    .collect()
}

fn iso_label(iso: &Path) -> String {
    let out = Command::new("xorriso")
        .args(["-indev", path_str(iso), "-pvd_info"])
        .output()
        .expect("xorriso runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    text.lines()
        .find_map(|l| l.strip_prefix("Volume Id    : "))
        .expect("xorriso -pvd_info prints the volume id")
        .trim()
        .to_string()
}

fn iso_read(iso: &Path, file: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let dest = dir.path().join("out");
    run(
        "xorriso",
        &[
            "-osirrox",
            "on",
            "-indev",
            path_str(iso),
            "-extract",
            file,
            path_str(&dest),
        ],
    );
    std::fs::read(&dest).expect("extracted file")
}

fn iso_text(iso: &Path, file: &str) -> String {
    String::from_utf8(iso_read(iso, file)).expect("config is UTF-8")
}

fn assert_has(files: &[String], want: &[&str]) {
    for w in want {
        assert!(
            files.iter().any(|f| f == w),
            "missing {w}; ISO has {files:?}"
        );
    }
}

/// Squashfs listing and the nested ext4's known file, through unsquashfs + debugfs.
fn assert_nested_rootfs(iso: &Path) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sq = dir.path().join("squashfs.img");
    std::fs::write(&sq, iso_read(iso, "/LiveOS/squashfs.img")).expect("write squashfs");
    let listing = run("unsquashfs", &["-l", path_str(&sq)]);
    assert!(listing.contains("LiveOS/rootfs.img"), "{listing}");
    let ext = dir.path().join("x");
    run("unsquashfs", &["-d", path_str(&ext), path_str(&sq)]);
    let rootfs = ext.join("LiveOS/rootfs.img");
    let marker = run(
        "debugfs",
        &["-R", "cat /etc/livestick-fixture", path_str(&rootfs)],
    );
    assert_eq!(marker, "livestick synthetic rootfs marker v1\n");
    let size = std::fs::metadata(&sq).expect("squashfs").len();
    assert!(
        size > 6 << 20,
        "squashfs.img should hold ~6 MiB of random data, is {size}"
    );
}

#[test]
fn classic_iso_has_fedora_36_layout_and_valid_md5() {
    let iso = synthetic_iso("fedora-classic.iso");
    assert_eq!(iso_label(&iso), "Fedora-LS-Test-1");
    let files = iso_files(&iso);
    assert_has(
        &files,
        &[
            "/isolinux/isolinux.cfg",
            "/isolinux/isolinux.bin",
            "/isolinux/ldlinux.c32",
            "/isolinux/vmlinuz",
            "/isolinux/initrd.img",
            "/EFI/BOOT/BOOTX64.EFI",
            "/EFI/BOOT/grub.cfg",
            "/images/pxeboot/vmlinuz",
            "/images/pxeboot/initrd.img",
            "/images/efiboot.img",
            "/LiveOS/squashfs.img",
        ],
    );
    let cfg = iso_text(&iso, "/isolinux/isolinux.cfg");
    for want in [
        "menu title Fedora-LS-Test-1",
        "timeout 600",
        "label linux",
        "menu label ^Start Fedora-LS-Test-1",
        "kernel vmlinuz",
        "append initrd=initrd.img root=live:CDLABEL=Fedora-LS-Test-1 rd.live.image quiet",
        "label check",
        "rd.live.check",
        "nomodeset",
        "menu default",
    ] {
        assert!(cfg.contains(want), "isolinux.cfg lacks {want:?}:\n{cfg}");
    }
    let grub = iso_text(&iso, "/EFI/BOOT/grub.cfg");
    for want in [
        "search --no-floppy --set=root -l 'Fedora-LS-Test-1'",
        "linuxefi /images/pxeboot/vmlinuz root=live:CDLABEL=Fedora-LS-Test-1 rd.live.image quiet",
        "initrdefi /images/pxeboot/initrd.img",
        "submenu 'Troubleshooting -->'",
    ] {
        assert!(grub.contains(want), "grub.cfg lacks {want:?}:\n{grub}");
    }
    // The check entry lives inside the submenu.
    let sub = grub.split("submenu").nth(1).expect("submenu");
    assert!(sub.contains("rd.live.check"));
    assert!(iso_read(&iso, "/images/pxeboot/vmlinuz").starts_with(b"LIVESTICK-SYNTHETIC-KERNEL\n"));
    let st = Command::new("checkisomd5")
        .arg(&iso)
        .output()
        .expect("checkisomd5 runs");
    assert!(st.status.success(), "checkisomd5 fails: {st:?}");
    assert_nested_rootfs(&iso);
}

#[test]
fn grub_iso_has_fedora_37_layout() {
    let iso = synthetic_iso("fedora-grub");
    assert_eq!(iso_label(&iso), "Fedora-LS-Grub-1");
    let files = iso_files(&iso);
    assert!(
        !files.iter().any(|f| f.starts_with("/isolinux/")),
        "no isolinux on Fedora >= 37: {files:?}"
    );
    assert_has(
        &files,
        &[
            "/images/pxeboot/vmlinuz",
            "/images/pxeboot/initrd.img",
            "/images/eltorito.img",
            "/EFI/BOOT/grub.cfg",
            "/EFI/BOOT/BOOTX64.EFI",
            "/boot/grub2/grub.cfg",
            "/LiveOS/squashfs.img",
        ],
    );
    for cfg in ["/EFI/BOOT/grub.cfg", "/boot/grub2/grub.cfg"] {
        let text = iso_text(&iso, cfg);
        assert!(
            text.contains("\tlinux /images/pxeboot/vmlinuz root=live:CDLABEL=Fedora-LS-Grub-1 rd.live.image quiet"),
            "{cfg}:\n{text}"
        );
        assert!(
            text.contains("\tinitrd /images/pxeboot/initrd.img"),
            "{cfg}:\n{text}"
        );
        assert!(
            !text.contains("linuxefi"),
            "{cfg} uses plain linux lines:\n{text}"
        );
    }
    assert!(
        Command::new("checkisomd5")
            .arg(&iso)
            .status()
            .expect("checkisomd5")
            .success()
    );
    assert_nested_rootfs(&iso);
}

#[test]
fn fedora42_iso_has_kiwi_layout_and_no_md5() {
    let iso = synthetic_iso("fedora42");
    assert_eq!(iso_label(&iso), "Fedora-LS-42");
    let files = iso_files(&iso);
    assert_has(
        &files,
        &[
            "/boot/x86_64/loader/linux",
            "/boot/x86_64/loader/initrd",
            "/boot/grub2/grub.cfg",
            "/EFI/BOOT/grub.cfg",
            "/LiveOS/squashfs.img",
        ],
    );
    assert!(
        !files.iter().any(|f| f.starts_with("/images/pxeboot")),
        "{files:?}"
    );
    let grub = iso_text(&iso, "/boot/grub2/grub.cfg");
    assert!(
        grub.contains(
            "linux ($root)/boot/x86_64/loader/linux root=live:CDLABEL=Fedora-LS-42 rd.live.image"
        ),
        "{grub}"
    );
    let efi = iso_text(&iso, "/EFI/BOOT/grub.cfg");
    assert!(
        efi.contains("configfile ($root)/boot/grub2/grub.cfg"),
        "{efi}"
    );
    let st = Command::new("checkisomd5")
        .arg(&iso)
        .output()
        .expect("checkisomd5");
    assert!(
        !st.status.success(),
        "fedora42.iso is built without an implanted MD5"
    );
    assert_nested_rootfs(&iso);
}

#[test]
fn manifest_matches_the_isos() {
    for (name, sha) in fixtures::synthetic_manifest() {
        let iso = synthetic_iso(&name);
        let got = run("sha256sum", &[path_str(&iso)]);
        assert_eq!(
            got.split_whitespace().next(),
            Some(sha.as_str()),
            "{name} is stale"
        );
    }
}

#[test]
fn synthetic_build_is_reproducible() {
    let reference = fixtures::synthetic_manifest();
    let dir = tempfile::tempdir().expect("tempdir");
    let script = repo().join("fixtures/build-iso.sh");
    run("bash", &[path_str(&script), path_str(dir.path())]);
    let again = std::fs::read_to_string(dir.path().join("MANIFEST")).expect("MANIFEST");
    for line in again.lines().filter(|l| !l.starts_with('#')) {
        let mut it = line.split_whitespace();
        let (name, sha) = (it.next().expect("name"), it.next().expect("sha"));
        assert_eq!(
            reference.get(name).map(String::as_str),
            Some(sha),
            "{name} differs between builds"
        );
    }
}

/// Proves fixture + harness: the bootable ISO as a CD under SeaBIOS
/// (isolinux), through dracut's dmsquash-live, to the test init's report.
#[test]
fn boot_classic_iso_boots_as_cdrom_under_seabios() {
    if !harness::boot_env_ready(&[Firmware::Bios]) {
        return;
    }
    let iso = boot_iso("boot-classic.iso");
    let r = Boot::cdrom(&iso, Firmware::Bios, "cdrom-seabios").run();
    eprintln!("booted in {:.1?}: {:?}", r.elapsed, r.boot());
    r.expect("root_marker", "absent")
        .expect("overlay", "dm-snapshot")
        .expect("overlay_persistent", "no")
        .expect("overlay_state", "valid")
        .expect("rw", "yes")
        .expect("home", "absent")
        .expect("live_fs", "iso9660");
    let written = r.phase("written").expect("phase=written line");
    assert_eq!(written.get("root_count").map(String::as_str), Some("1"));
}

/// The same ISO under OVMF boots through the El Torito EFI image and GRUB.
#[test]
fn boot_classic_iso_boots_as_cdrom_under_ovmf() {
    if !harness::boot_env_ready(&[Firmware::Uefi]) {
        return;
    }
    let iso = boot_iso("boot-classic");
    let r = Boot::cdrom(&iso, Firmware::Uefi, "cdrom-ovmf").run();
    r.expect("overlay", "dm-snapshot")
        .expect("live_fs", "iso9660");
}
