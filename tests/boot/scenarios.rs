//! Persistence scenarios from issue 5: write a stick from the bootable
//! fixture ISO, boot it several times under different firmware, and check
//! that what one boot wrote (to `/` through the overlay, and to `/home`) is
//! there in the next. A stick without a working persistent overlay fails
//! here: the second boot would report `root_marker=absent`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::fixtures::boot_iso;
use crate::harness::{Boot, BootResult, Firmware, boot_env_ready};

/// A stick image in its own temporary directory (removed on drop).
struct Stick {
    _dir: tempfile::TempDir,
    image: PathBuf,
}

/// `livestick write ISO IMAGE --size 1G --overlay-size-mb 64
/// --home-size-mb 32 --unencrypted-home --yes` plus `extra`.
fn write_stick(iso: &Path, extra: &[&str]) -> Stick {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir for the stick");
    let image = dir.path().join("stick.img");
    let out = Command::new(env!("CARGO_BIN_EXE_livestick"))
        .arg("write")
        .arg(iso)
        .arg(&image)
        .args([
            "--size",
            "1G",
            "--overlay-size-mb",
            "64",
            "--home-size-mb",
            "32",
        ])
        .args(["--unencrypted-home", "--timeout", "1", "--yes", "--quiet"])
        .args(extra)
        .output()
        .expect("run livestick write");
    assert!(
        out.status.success(),
        "livestick write {} {} {extra:?} failed ({}):\n{}{}",
        iso.display(),
        image.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Stick { _dir: dir, image }
}

fn boot(stick: &Stick, firmware: Firmware, name: &str) -> BootResult {
    let r = Boot::stick(&stick.image, firmware, name).run();
    eprintln!(
        "{name}: {:?} in {:.1?}: {:?}",
        firmware,
        r.elapsed,
        r.boot()
    );
    r
}

/// What every boot of a dm-snapshot stick with a plain home must show.
fn assert_persistent_setup(r: &BootResult) {
    r.expect("overlay", "dm-snapshot")
        .expect("overlay_persistent", "yes")
        .expect("overlay_state", "valid")
        .expect("rw", "yes")
        .expect("live_fs", "vfat")
        .expect("home", "mounted")
        .expect("home_luks", "no");
    assert!(
        r.get("overlay_file").starts_with("overlay-"),
        "overlay file {:?}",
        r.get("overlay_file")
    );
}

fn assert_fresh(r: &BootResult) {
    assert_persistent_setup(r);
    r.expect("root_marker", "absent")
        .expect("home_marker", "absent");
}

/// `previous` boots have already written their markers.
fn assert_seen(r: &BootResult, previous: u32) {
    assert_persistent_setup(r);
    let n = previous.to_string();
    r.expect("root_marker", "present")
        .expect("root_count", &n)
        .expect("home_marker", "present")
        .expect("home_count", &n);
}

/// MBR + FAT, dm-snapshot overlay, plain home: boot 1 writes markers, boot 2
/// sees them (BIOS), boot 3 sees them (UEFI).
#[test]
fn mbr_stick_persists_across_bios_and_uefi_boots() {
    if !boot_env_ready(&[Firmware::Bios, Firmware::Uefi]) {
        return;
    }
    let stick = write_stick(&boot_iso("boot-classic.iso"), &[]);
    assert_fresh(&boot(&stick, Firmware::Bios, "mbr-1-bios"));
    assert_seen(&boot(&stick, Firmware::Bios, "mbr-2-bios"), 1);
    assert_seen(&boot(&stick, Firmware::Uefi, "mbr-3-uefi"), 2);
}

/// GPT layout: the same, UEFI first, then BIOS (gptmbr.bin + syslinux).
#[test]
fn gpt_stick_persists_across_uefi_and_bios_boots() {
    if !boot_env_ready(&[Firmware::Bios, Firmware::Uefi]) {
        return;
    }
    let stick = write_stick(&boot_iso("boot-classic.iso"), &["--gpt"]);
    assert_fresh(&boot(&stick, Firmware::Uefi, "gpt-1-uefi"));
    assert_seen(&boot(&stick, Firmware::Uefi, "gpt-2-uefi"), 1);
    assert_seen(&boot(&stick, Firmware::Bios, "gpt-3-bios"), 2);
}
