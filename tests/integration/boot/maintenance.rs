//! Offline maintenance between boots (issue 5 §3): `livestick overlay
//! merge`, `recover --repair` and `grow` on a stick image that a real kernel
//! has written through its dm-snapshot overlay, and a boot afterwards that
//! shows the kernel accepts the result.

use std::path::Path;
use std::time::Duration;

use super::harness::{Boot, BootResult, Firmware, boot_env_ready};
use super::scenarios::{
    CLASSIC, Setup, Stick, assert_persisted, boot, boot_with, livestick, write_stick,
    write_stick_with,
};
use crate::support::fixtures::boot_iso;

/// `overlay_used=<used>/<total>`: the `dmsetup status` figures in 512-byte
/// sectors (used counts the header and metadata chunks as well as data).
fn overlay_used(r: &BootResult) -> (u64, u64) {
    let v = r.get("overlay_used");
    let parsed = v
        .split_once('/')
        .and_then(|(u, t)| Some((u.parse().ok()?, t.parse().ok()?)));
    parsed.unwrap_or_else(|| panic!("overlay_used {v:?} is not <used>/<total>"))
}

/// `livestick overlay status STICK --json`, parsed.
fn offline_status(stick: &Stick) -> serde_json::Value {
    let image = stick.image.display().to_string();
    let out = livestick(&["overlay", "status", &image, "--json"]);
    serde_json::from_slice(&out.stdout).expect("overlay status --json is JSON")
}

/// Merge: after boot 1 wrote to the overlay, `overlay merge` folds it into
/// a new squashfs.img offline. Boot 2 must still see what boot 1 wrote (now
/// in the squashfs) with an overlay as empty as on a fresh stick.
#[test]
fn merged_overlay_keeps_changes_and_boots_empty() {
    if !boot_env_ready(&[Firmware::Bios, Firmware::Uefi]) {
        return;
    }
    let stick = write_stick(&boot_iso("boot-classic.iso"), &[]);
    let first = boot(&stick, Firmware::Bios, "merge-1-bios");
    assert_persisted(&first, CLASSIC, 0);
    let before = offline_status(&stick);
    assert!(
        before["exceptions"].as_u64().unwrap_or(0) > 0,
        "boot 1 left nothing in the overlay to merge: {before}"
    );
    // A store's used count never shrinks on its own: without the merge,
    // boot 2 would start from at least this.
    let used_before = before["allocated_sectors"]
        .as_u64()
        .expect("allocated_sectors");

    let image = stick.image.display().to_string();
    let workdir = stick.dir.path().display().to_string();
    livestick(&[
        "overlay",
        "merge",
        &image,
        "--yes",
        "--quiet",
        "--workdir",
        &workdir,
    ]);
    let after = offline_status(&stick);
    assert_eq!(
        after["exceptions"].as_u64(),
        Some(0),
        "merge left exceptions: {after}"
    );
    assert!(
        after["percent_used"].as_f64().is_some_and(|p| p < 0.5),
        "overlay after merge is not 0 % used: {after}"
    );

    let second = boot(&stick, Firmware::Uefi, "merge-2-uefi");
    assert_persisted(&second, CLASSIC, 1);
    // The init reads `dmsetup status` before it writes anything, so this is
    // the empty store plus what the root mount itself dirtied.
    let (used, total) = overlay_used(&second);
    assert!(
        used < used_before && used * 100 / total == 0,
        "overlay at boot after merge: {used}/{total} sectors used; before the merge \
         it held {used_before}"
    );
}

/// `livestick write ISO STICK --skipcopy`: boot configs as written at first,
/// without the `--extra-kernel-args` a phase needed; overlay and home stay.
fn rewrite_configs(stick: &Stick, iso: &Path) {
    let image = stick.image.display().to_string();
    let iso = iso.display().to_string();
    livestick(&[
        "write",
        &iso,
        &image,
        "--skipcopy",
        "--timeout",
        "1",
        "--yes",
        "--quiet",
    ]);
    let status = offline_status(stick);
    assert!(
        status["exceptions"].as_u64().unwrap_or(0) > 0,
        "write --skipcopy emptied the overlay: {status}"
    );
}

/// A small overlay (32 MiB; the root image is 256 MiB) so that a fill
/// overflows the snapshot long before the file system is full, with
/// `extra_args` on every boot entry.
fn write_fill_stick(iso: &Path, extra_args: &str) -> Stick {
    write_stick_with(
        iso,
        &[
            "--overlay-size-mb",
            "32",
            "--home-size-mb",
            "32",
            "--unencrypted-home",
            "--extra-kernel-args",
            extra_args,
        ],
    )
}

/// Boots with a fill phase; checks the `phase=filled` state it reached.
fn boot_and_fill(stick: &Stick, firmware: Firmware, name: &str, state: &str) -> BootResult {
    // The fill adds ~10 s; the default 180 s is for a hung boot, not this.
    let r = boot_with(Boot::stick(&stick.image, firmware, name).timeout(Duration::from_secs(420)));
    assert_persisted(&r, CLASSIC, 0);
    let filled = r
        .phase("filled")
        .unwrap_or_else(|| panic!("no phase=filled report; log {}", r.log.display()));
    assert_eq!(
        filled.get("overlay_state").map(String::as_str),
        Some(state),
        "overlay state after the fill: {filled:?}\nlog: {}",
        r.log.display()
    );
    r
}

/// Recover: boot 1 fills the overlay from inside the guest until the kernel
/// invalidates it (with the "P" table older dracut used: see
/// fixtures/boot/init.sh); `overlay recover --repair` makes it usable
/// offline; boot 2 comes up read-write with a valid overlay and what boot 1
/// wrote before the fill.
#[test]
fn recovered_overlay_boots_read_write() {
    if !boot_env_ready(&[Firmware::Bios, Firmware::Uefi]) {
        return;
    }
    let iso = boot_iso("boot-classic.iso");
    let stick = write_fill_stick(&iso, "livestick.fill=invalidate");
    boot_and_fill(&stick, Firmware::Bios, "recover-1-fill", "invalid");
    let status = offline_status(&stick);
    assert_eq!(
        status["state"].as_str(),
        Some("invalid"),
        "the kernel's invalidation is not on the stick: {status}"
    );

    rewrite_configs(&stick, &iso);
    let image = stick.image.display().to_string();
    let workdir = stick.dir.path().display().to_string();
    livestick(&[
        "overlay",
        "recover",
        &image,
        "--repair",
        "--quiet",
        "--workdir",
        &workdir,
    ]);
    let status = offline_status(&stick);
    assert_eq!(
        status["state"].as_str(),
        Some("valid"),
        "after recover --repair: {status}"
    );

    let second = boot(&stick, Firmware::Uefi, "recover-2-uefi");
    // The marker boot 1 synced before the fill survives the recovery.
    assert_persisted(&second, CLASSIC, 1);
    let written = second.phase("written").expect("phase=written report");
    assert_eq!(
        written.get("root_count").map(String::as_str),
        Some("2"),
        "boot 2 could not write to the recovered overlay: {written:?}"
    );
}

/// Grow: boot 1 runs the overlay full (since Linux 4.3 dracut's "PO" table
/// keeps a full store valid: `Overflow`); `overlay grow --add-mb 32` offline;
/// the next boot's kernel sees the larger store (dmsetup's total is the COW
/// device size), every change from before, and room for new ones.
#[test]
fn grown_overlay_shows_new_capacity_at_boot() {
    if !boot_env_ready(&[Firmware::Bios, Firmware::Uefi]) {
        return;
    }
    let iso = boot_iso("boot-classic.iso");
    let stick = write_fill_stick(&iso, "livestick.fill=1");
    let first = boot_and_fill(&stick, Firmware::Uefi, "grow-1-fill", "overflow");
    let (_, total_before) = overlay_used(&first);
    let full = offline_status(&stick);
    assert_eq!(full["full"].as_bool(), Some(true), "after the fill: {full}");

    rewrite_configs(&stick, &iso);
    let image = stick.image.display().to_string();
    livestick(&["overlay", "grow", &image, "--add-mb", "32", "--quiet"]);
    let grown = offline_status(&stick);
    assert_eq!(
        grown["exceptions"], full["exceptions"],
        "grow changed the exceptions: before {full}, after {grown}"
    );

    let second = boot(&stick, Firmware::Bios, "grow-2-bios");
    assert_persisted(&second, CLASSIC, 1);
    let (used, total_after) = overlay_used(&second);
    assert_eq!(
        total_after,
        total_before + 32 * 2048,
        "overlay total before grow {total_before} sectors, after {total_after}"
    );
    assert!(
        used < total_after,
        "grown overlay still full: {used}/{total_after}"
    );
    let after = offline_status(&stick);
    assert_eq!(
        after["full"].as_bool(),
        Some(false),
        "after boot 2: {after}"
    );
}

/// Grow of an OverlayFS overlay (flat squashfs): boot 1 writes through the upper
/// dir; `overlay grow --add-mb 64` offline runs e2fsck -f -p and resize2fs on a work
/// copy and writes the changed blocks back (the extension lands behind home.img, so
/// the overlay is fragmented on the FAT); boot 2's kernel mounts the grown ext4, sees
/// boot 1's changes and reports an upper file system about 64 MiB larger.
#[test]
fn grown_overlayfs_overlay_keeps_changes_and_is_larger_at_boot() {
    if !boot_env_ready(&[Firmware::Bios, Firmware::Uefi]) {
        return;
    }
    let stick = write_stick(&boot_iso("boot-flat.iso"), &["--overlayfs"]);
    let overlayfs = Setup {
        overlay: "overlayfs",
        ..CLASSIC
    };
    let first = boot(&stick, Firmware::Bios, "ovl-grow-1-bios");
    assert_persisted(&first, overlayfs, 0);
    let (_, total_before) = overlay_used(&first);

    let image = stick.image.display().to_string();
    let workdir = stick.dir.path().display().to_string();
    livestick(&[
        "overlay",
        "grow",
        &image,
        "--add-mb",
        "64",
        "--workdir",
        &workdir,
        "--quiet",
    ]);
    let grown = offline_status(&stick);
    assert_eq!(grown["kind"], "overlayfs", "{grown}");
    assert_eq!(grown["size_bytes"], 128 << 20, "{grown}");
    let check = livestick(&[
        "overlay",
        "recover",
        &image,
        "--workdir",
        &workdir,
        "--json",
    ]);
    let check: serde_json::Value = serde_json::from_slice(&check.stdout).expect("JSON");
    assert_eq!(check["check"]["clean"], true, "after the grow: {check}");
    assert!(
        check["method"]
            .as_str()
            .is_some_and(|m| m.contains("not contiguous")),
        "home.img follows the overlay, so the grown overlay is fragmented: {check}"
    );

    let second = boot(&stick, Firmware::Uefi, "ovl-grow-2-uefi");
    assert_persisted(&second, overlayfs, 1);
    let (_, total_after) = overlay_used(&second);
    // df's total leaves out the new block groups' inode tables and bitmaps (~6 %).
    assert!(
        total_after >= total_before + 56 * 2048,
        "upper file system total before the grow {total_before} sectors, after {total_after}"
    );
}
