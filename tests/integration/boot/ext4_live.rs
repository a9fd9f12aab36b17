//! Persistence past FAT32's 4 GiB (issue 12 part 4): a 6 GiB dm-snapshot overlay
//! and a 5 GiB home on the ext4 live layout (a FAT boot partition, an ext4 live
//! partition), written over stale bytes onto a sparse 12 GiB stick image, booted
//! twice. The kernel's `dmsetup status` reports the store's size, the live
//! partition is mounted as ext4, and `/` and `/home` persist.

use std::path::Path;
use std::process::Command;

use super::harness::{Boot, Firmware, boot_env_ready, tail_of_file};
use super::scenarios::{Stick, boot_with, livestick};
use crate::support::fixtures::boot_iso;

const STICK_BYTES: u64 = 12 << 30;
/// Stale random bytes over the head of the stick, where partition 2's metadata,
/// the root image and the start of the overlay land.
const STALE_BYTES: u64 = 1 << 30;
const OVERLAY_MIB: u64 = 6144;
const HOME_MIB: u64 = 5120;

/// Blocks the host really holds for `path`, in bytes.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat the stick").blocks() * 512
}

/// A sparse 12 GiB stick whose first GiB holds stale random bytes.
fn used_big_stick(image: &Path) {
    use rand::RngCore;
    use std::io::Write;
    let mut block = vec![0u8; 8 << 20];
    rand::thread_rng().fill_bytes(&mut block);
    let mut f = std::fs::File::create(image).expect("create the stick image");
    for _ in 0..STALE_BYTES / block.len() as u64 {
        f.write_all(&block)
            .expect("fill the stick with stale bytes");
    }
    f.set_len(STICK_BYTES).expect("size the stick");
}

/// Partition 2 of the stick as `sfdisk --json` lists it: (start, size) in bytes.
fn partition_2(image: &Path) -> (u64, u64) {
    let table = crate::support::sfdisk(image);
    let parts = table["partitiontable"]["partitions"]
        .as_array()
        .expect("partitions");
    assert_eq!(parts.len(), 2, "two partitions expected: {table}");
    assert_eq!(parts[0]["bootable"], serde_json::json!(true), "{table}");
    assert_eq!(parts[1]["type"], serde_json::json!("83"), "{table}");
    let n = |v: &serde_json::Value| v.as_u64().expect("number") * 512;
    (n(&parts[1]["start"]), n(&parts[1]["size"]))
}

fn e2fsck_clean(image: &Path, offset: u64) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(format!("{}?offset={offset}", image.display()))
        .output()
        .expect("run e2fsck");
    assert!(
        out.status.success(),
        "e2fsck -fn on partition 2: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn six_gib_dm_snapshot_overlay_and_five_gib_home_on_ext4_persist() {
    if !boot_env_ready(&[Firmware::Bios, Firmware::Uefi]) {
        return;
    }
    let (stick, p2) = write_big(&boot_iso("boot-classic.iso"));
    let dm_size = format!("/{}", (OVERLAY_MIB << 20) / 512);
    for (n, firmware) in [(0u32, Firmware::Bios), (1, Firmware::Uefi)] {
        let r = boot_twice_step(&stick, n, firmware, "dm-snapshot", "ext4-dm");
        // `dmsetup status live-rw`: "<allocated>/<total sectors> …": the kernel
        // sees the whole 6 GiB store.
        let used = r.get("overlay_used");
        assert!(
            used.ends_with(&dm_size),
            "overlay_used {used}, expected …{dm_size}\n{}",
            tail_of_file(&r.log, 40)
        );
    }
    // The live system wrote through ext4 into the overlay and home: still clean.
    e2fsck_clean(&stick.image, p2);
}

/// A flat root (the plain command chooses OverlayFS): a 6 GiB OverlayFS overlay
/// (an ext4 image file inside the ext4 live partition) and a 5 GiB home.
#[test]
fn six_gib_overlayfs_overlay_and_five_gib_home_on_ext4_persist() {
    if !boot_env_ready(&[Firmware::Bios, Firmware::Uefi]) {
        return;
    }
    let (stick, p2) = write_big(&boot_iso("boot-flat.iso"));
    for (n, firmware) in [(0u32, Firmware::Uefi), (1, Firmware::Bios)] {
        let r = boot_twice_step(&stick, n, firmware, "overlayfs", "ext4-ovl");
        // `df` of the upper layer, in 512-byte sectors: the 6 GiB file system.
        let used = r.get("overlay_used");
        let total: u64 = used
            .split('/')
            .nth(1)
            .and_then(|t| t.parse().ok())
            .unwrap_or(0);
        assert!(
            total * 512 > (OVERLAY_MIB - 512) << 20,
            "overlay_used {used}: not a 6 GiB upper layer"
        );
    }
    e2fsck_clean(&stick.image, p2);
}

/// Boot `n` (0: fresh) of a big stick: the live partition is ext4, the overlay
/// persistent, and what boot `n - 1` left in `/` and `/home` is there.
fn boot_twice_step(
    stick: &Stick,
    n: u32,
    firmware: Firmware,
    overlay: &str,
    name: &str,
) -> super::harness::BootResult {
    let r = boot_with(
        Boot::stick(&stick.image, firmware, &format!("{name}-{n}"))
            .timeout(std::time::Duration::from_secs(400)),
    );
    let marker = if n == 0 { "absent" } else { "present" };
    for (k, v) in [
        ("overlay", overlay),
        ("overlay_persistent", "yes"),
        ("overlay_state", "valid"),
        ("live_fs", "ext4"),
        ("rw", "yes"),
        ("home", "mounted"),
        ("root_marker", marker),
        ("home_marker", marker),
        ("root_count", &n.to_string()),
    ] {
        r.expect(k, v);
    }
    assert!(r.get("overlay_file").starts_with("overlay-LIVE-"));
    r
}

/// Writes `iso` with a 6 GiB overlay and a 5 GiB home onto a used, sparse 12 GiB
/// stick and checks what the write cost and left, before any boot.
fn write_big(iso: &Path) -> (Stick, u64) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir for the stick");
    let image = dir.path().join("stick.img");
    used_big_stick(&image);
    let before = allocated(&image);
    let out = livestick(&[
        "write",
        &iso.display().to_string(),
        &image.display().to_string(),
        "--format",
        "--timeout",
        "1",
        "--yes",
        "--json",
        "--overlay-size-mb",
        &OVERLAY_MIB.to_string(),
        "--home-size-mb",
        &HOME_MIB.to_string(),
        "--unencrypted-home",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("a JSON report");
    let written = report["written_bytes"].as_u64().expect("written_bytes");
    // The root image and boot files (about 60 MiB) plus metadata; 11 GiB of
    // persistence costs a few MiB, not its size.
    assert!(written < 100 << 20, "wrote {written} bytes: {report}");
    assert_eq!(report["verified_bytes"], report["written_bytes"]);
    let grown = allocated(&image) - before;
    assert!(grown < 100 << 20, "the stick image grew by {grown} bytes");

    let (p2, p2_len) = partition_2(&image);
    assert!(p2_len > (OVERLAY_MIB + HOME_MIB) << 20);
    e2fsck_clean(&image, p2);
    let blkid = crate::support::sh(
        "blkid",
        &[
            "-p",
            "--offset",
            &p2.to_string(),
            &image.display().to_string(),
        ],
    );
    assert!(blkid.contains("TYPE=\"ext4\""), "{blkid}");

    (Stick { dir, image }, p2)
}

/// A dm-snapshot overlay on the ext4 layout, reset and then grown by livestick in
/// place (through its extents, the new blocks unwritten): after the reset `/`
/// starts empty while `/home` keeps its marker, the kernel sees the grown store,
/// and `/` persists again on the next boot.
#[test]
fn overlay_reset_and_grown_on_ext4_persists() {
    if !boot_env_ready(&[Firmware::Bios]) {
        return;
    }
    let (stick, p2) = maintenance_stick();
    let s = |p: &Path| p.display().to_string();
    let boot = |n: u32| maintenance_boot(&stick, &format!("ext4-maint-{n}"));
    let r = boot(0);
    r.expect("root_marker", "absent");
    r.expect("home_marker", "absent");

    // The test init powers off with the live partition mounted: its journal still
    // holds the kernel's changes (among them the overlay's extents it marked
    // written). The first change replays it in place, as mounting it would, and
    // says so.
    let out = livestick(&["overlay", "reset", &s(&stick.image), "--yes", "--json"]);
    assert!(out.status.success(), "reset: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("reset JSON");
    assert!(
        v["repaired"].to_string().contains("journal was replayed"),
        "{v}"
    );
    e2fsck_clean(&stick.image, p2);
    let out = livestick(&["overlay", "grow", &s(&stick.image), "--add-mb", "256"]);
    assert!(out.status.success(), "grow: {out:?}");
    e2fsck_clean(&stick.image, p2);
    let status = livestick(&["overlay", "status", &s(&stick.image), "--json"]);
    let status: serde_json::Value =
        serde_json::from_slice(&status.stdout).expect("overlay status JSON");
    let sectors = status["total_sectors"].as_u64().expect("total_sectors");
    assert!(sectors * 512 > 500 << 20, "{status}");

    let r = boot(1);
    r.expect("root_marker", "absent");
    r.expect("root_count", "0");
    r.expect("home_marker", "present");
    let used = r.get("overlay_used");
    assert!(
        used.ends_with(&format!("/{sectors}")),
        "overlay_used {used}, expected …/{sectors}\n{}",
        tail_of_file(&r.log, 40)
    );
    let r = boot(2);
    r.expect("root_marker", "present");
    r.expect("root_count", "1");
    r.expect("home_marker", "present");

    // The same ISO written again without --format (issue 12 part 5 on this
    // layout): the write replays the journal boot 2 left, writes the root image
    // beside the old one and swaps it in, and keeps the overlay and home: `/` and
    // `/home` persist across the rewrite.
    let iso = boot_iso("boot-classic.iso");
    let out = livestick(&["--json", "write", &s(&iso), &s(&stick.image), "--yes"]);
    assert!(out.status.success(), "rewrite: {out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    assert_eq!(report["kept_overlay"]["reset"], false, "{report}");
    assert!(
        report["repaired"]
            .to_string()
            .contains("journal was replayed"),
        "{report}"
    );
    e2fsck_clean(&stick.image, p2);
    let r = boot(3);
    r.expect("root_marker", "present");
    r.expect("root_count", "2");
    r.expect("home_marker", "present");
    e2fsck_clean(&stick.image, p2);
}

/// A 2 GiB stick of the ext4 live layout (its first 512 MiB stale random bytes)
/// written from boot-classic.iso with a 256 MiB dm-snapshot overlay and a 64 MiB
/// plain home, for the maintenance boots; with partition 2's offset.
fn maintenance_stick() -> (Stick, u64) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir for the stick");
    let image = dir.path().join("stick.img");
    {
        use rand::RngCore;
        use std::io::Write;
        let mut block = vec![0u8; 8 << 20];
        rand::thread_rng().fill_bytes(&mut block);
        let mut f = std::fs::File::create(&image).expect("create the stick image");
        for _ in 0..64 {
            f.write_all(&block).expect("stale bytes");
        }
        f.set_len(2 << 30).expect("size the stick");
    }
    let s = |p: &Path| p.display().to_string();
    let iso = boot_iso("boot-classic.iso");
    let out = livestick(&[
        "write",
        &s(&iso),
        &s(&image),
        "--ext4",
        "--timeout",
        "1",
        "--yes",
        "--overlay-size-mb",
        "256",
        "--home-size-mb",
        "64",
        "--unencrypted-home",
    ]);
    assert!(out.status.success(), "write: {out:?}");
    let (p2, _) = partition_2(&image);
    (Stick { dir, image }, p2)
}

/// A BIOS boot of a [`maintenance_stick`]: its dm-snapshot overlay in use on the
/// ext4 live partition, its home mounted.
fn maintenance_boot(stick: &Stick, name: &str) -> super::harness::BootResult {
    let r = boot_with(
        Boot::stick(&stick.image, Firmware::Bios, name)
            .timeout(std::time::Duration::from_secs(400)),
    );
    for (k, v) in [
        ("overlay", "dm-snapshot"),
        ("overlay_persistent", "yes"),
        ("overlay_state", "valid"),
        ("live_fs", "ext4"),
        ("home", "mounted"),
    ] {
        r.expect(k, v);
    }
    r
}

#[test]
fn merged_on_ext4_boots_with_the_change_and_an_empty_overlay() {
    if !boot_env_ready(&[Firmware::Bios]) {
        return;
    }
    let (stick, p2) = maintenance_stick();
    let s = |p: &Path| p.display().to_string();
    let r = maintenance_boot(&stick, "ext4-merge-0");
    r.expect("root_marker", "absent");

    // The merge replays the journal the boot left (the overlay's extents the
    // kernel marked written are in it), then merges what the boot wrote.
    let work = stick.dir.path().join("work");
    std::fs::create_dir(&work).expect("work dir");
    let out = livestick(&[
        "overlay",
        "merge",
        &s(&stick.image),
        "--yes",
        "--workdir",
        &s(&work),
        "--json",
    ]);
    assert!(out.status.success(), "merge: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("merge JSON");
    assert!(
        v["repaired"].to_string().contains("journal was replayed"),
        "{v}"
    );
    assert!(v["exceptions_applied"].as_u64().unwrap_or(0) > 0, "{v}");
    e2fsck_clean(&stick.image, p2);
    let status = livestick(&["overlay", "status", &s(&stick.image), "--json"]);
    let status: serde_json::Value =
        serde_json::from_slice(&status.stdout).expect("overlay status JSON");
    assert_eq!(status["state"], "uninitialised", "{status}");

    // Boot 1's marker now comes from the new squashfs.img, under an empty overlay.
    let r = maintenance_boot(&stick, "ext4-merge-1");
    r.expect("root_marker", "present");
    r.expect("root_count", "1");
    r.expect("home_marker", "present");
}
