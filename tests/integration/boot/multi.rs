//! `--multi` (issue 12 part 7): two live images on one stick, each with its own
//! persistence, and the older one booted by picking its entry in the boot menu
//! the way a user does: keys pressed through QEMU's monitor while GRUB counts
//! down.

use super::harness::{Boot, Firmware, boot_env_ready};
use super::scenarios::{CLASSIC, Stick, assert_persisted, boot, boot_with, livestick, used_stick};
use crate::support::fixtures::boot_iso;

#[test]
fn multi_stick_boots_the_first_image_from_its_menu_entry_with_its_own_persistence() {
    if !boot_env_ready(&[Firmware::Uefi]) {
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir for the stick");
    let image = dir.path().join("stick.img");
    used_stick(&image);
    let img = image.to_str().expect("UTF-8 path");
    let classic = boot_iso("boot-classic.iso");
    let flat = boot_iso("boot-flat.iso");
    // A menu timeout long enough for the keys to arrive under TCG.
    livestick(&[
        "write",
        classic.to_str().expect("UTF-8 path"),
        img,
        "--format",
        "--timeout",
        "10",
        "--yes",
        "--quiet",
        "--overlay-size-mb",
        "64",
        "--home-size-mb",
        "32",
        "--unencrypted-home",
    ]);
    livestick(&[
        "write",
        flat.to_str().expect("UTF-8 path"),
        img,
        "--multi",
        "--livedir",
        "Second",
        "--timeout",
        "10",
        "--yes",
        "--quiet",
        "--overlay-size-mb",
        "64",
    ]);
    let stick = Stick { dir, image };

    // The image installed last is the menu's default: the flat one, with its
    // OverlayFS overlay in Second/ and no home of its own.
    let first = boot(&stick, Firmware::Uefi, "multi-1-default");
    first
        .expect("overlay", "overlayfs")
        .expect("root_count", "0");

    // The first image, picked from the menu (its entry is the second one): its
    // own dm-snapshot overlay and home, untouched by the other image's boot.
    let pick = |name: &str| {
        boot_with(
            Boot::stick(&stick.image, Firmware::Uefi, name)
                .keys_when("Start LSBOOT", &["down", "ret"]),
        )
    };
    assert_persisted(&pick("multi-2-pick"), CLASSIC, 0);
    assert_persisted(&pick("multi-3-pick"), CLASSIC, 1);

    // And the default again: the flat image kept what its first boot wrote.
    let again = boot(&stick, Firmware::Uefi, "multi-4-default");
    again
        .expect("overlay", "overlayfs")
        .expect("root_count", "1");
}
