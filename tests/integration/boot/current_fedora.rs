//! Current Fedora (issue 12): the dracut-ng 111 fixtures built from the
//! vendored source, and a Secure Boot chain of signed loaders.
//!
//! - `boot-ng.iso`: kiwi layout, an EROFS root directly in
//!   `LiveOS/squashfs.img`, menus without any overlay argument. The plain
//!   `write` command (no `--overlayfs`) must give it a persistent OverlayFS
//!   overlay under dracut-ng's spelling, booted UEFI then BIOS.
//! - `boot-ng-nested.iso`: the same initramfs with a nested `rootfs.img`, so a
//!   dm-snapshot overlay, which dracut-ng still only finds by the deprecated
//!   `rd.live.overlay=`.
//! - `boot-sb.iso`: Debian's Microsoft-signed shim, its signed GRUB (which reads
//!   `/EFI/debian/grub.cfg`) and its signed kernel, booted with OVMF enforcing
//!   Secure Boot with Microsoft's keys.

use std::process::Command;

use super::harness::{BootResult, Firmware, boot_env_ready};
use super::scenarios::{
    CLASSIC, Setup, Stick, assert_persisted, boot, mtools_image, read_stick_file, write_stick,
};
use crate::support::fixtures::boot_iso;

fn console(r: &BootResult) -> String {
    String::from_utf8_lossy(&std::fs::read(&r.log).expect("read the boot log")).into_owned()
}

/// The names in the root directory of the stick's FAT.
fn fat_root(stick: &Stick) -> Vec<String> {
    let out = Command::new("mdir")
        .args(["-b", "-i", &mtools_image(stick), "::/"])
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .expect("run mdir (apt-get install -y mtools)");
    assert!(
        out.status.success(),
        "mdir: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            l.trim_start_matches("::/")
                .trim_end_matches('/')
                .to_string()
        })
        .collect()
}

/// The plain command on a current-Fedora ISO: OverlayFS chosen by itself,
/// spelled for dracut-ng, and `/` and `/home` persist across UEFI and BIOS.
#[test]
fn dracut_ng_erofs_stick_persists_with_the_plain_command() {
    if !boot_env_ready(&[Firmware::Bios, Firmware::Uefi]) {
        return;
    }
    let stick = write_stick(&boot_iso("boot-ng.iso"), &[]);
    let grub = read_stick_file(&stick, "::/EFI/BOOT/grub.cfg");
    assert!(
        grub.contains(":auto")
            && grub.contains("rd.overlay=UUID=")
            && !grub.contains("rd.live.overlay"),
        "dracut-ng spelling expected in grub.cfg:\n{grub}"
    );
    let overlayfs = Setup {
        overlay: "overlayfs",
        ..CLASSIC
    };
    let first = boot(&stick, Firmware::Uefi, "ng-1-uefi");
    assert_persisted(&first, overlayfs, 0);
    let second = boot(&stick, Firmware::Bios, "ng-2-bios");
    assert_persisted(&second, overlayfs, 1);
    for r in [&first, &second] {
        let log = console(r);
        assert!(
            log.contains("dracut-111"),
            "not dracut-ng 111: {}",
            r.log.display()
        );
        assert!(
            !log.contains("is deprecated"),
            "dracut-ng warned about a deprecated argument: {}",
            r.log.display()
        );
    }
    // dracut-ng 111 with a bare rd.overlay=UUID=… mounts the partition as an
    // overlay device and leaves these behind in the stick's root.
    let root = fat_root(&stick);
    assert!(
        !root.iter().any(|n| n == "overlay" || n == "ovlwork"),
        "the stick's root gained overlay directories: {root:?}"
    );
}

/// A dm-snapshot overlay under dracut-ng: still named by the deprecated
/// `rd.live.overlay=` (dracut-ng's `rd.overlay=` would switch OverlayFS on).
#[test]
fn dracut_ng_dm_snapshot_stick_persists() {
    if !boot_env_ready(&[Firmware::Bios, Firmware::Uefi]) {
        return;
    }
    let stick = write_stick(&boot_iso("boot-ng-nested.iso"), &[]);
    let first = boot(&stick, Firmware::Bios, "ngdm-1-bios");
    assert_persisted(&first, CLASSIC, 0);
    assert!(console(&first).contains("dracut-111"), "not dracut-ng 111");
    assert_persisted(&boot(&stick, Firmware::Uefi, "ngdm-2-uefi"), CLASSIC, 1);
}

/// Secure Boot enforced with Microsoft's keys: shim → signed GRUB (menu
/// rendered into /EFI/debian/grub.cfg) → signed kernel, and persistence.
#[test]
fn secure_boot_stick_boots_the_signed_chain_and_persists() {
    if !boot_env_ready(&[Firmware::UefiSecureBoot]) {
        return;
    }
    let stick = write_stick(&boot_iso("boot-sb.iso"), &[]);
    let debian = read_stick_file(&stick, "::/EFI/debian/grub.cfg");
    assert!(
        debian.contains("root=live:UUID=") && !debian.contains("CDLABEL"),
        "the signed GRUB's config must be the stick's menu:\n{debian}"
    );
    for (n, name) in ["sb-1", "sb-2"].into_iter().enumerate() {
        let r = boot(&stick, Firmware::UefiSecureBoot, name);
        r.expect("secure_boot", "enabled");
        assert!(
            console(&r).contains("Secure boot enabled"),
            "the kernel does not say Secure Boot is on: {}",
            r.log.display()
        );
        assert_persisted(&r, CLASSIC, n as u32);
    }
}
