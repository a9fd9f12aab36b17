//! Read-back overlapped with writing, on a block device (a loop device: the path a
//! USB stick takes, where each 8 MiB batch is synced and read back from the device
//! itself, past the page cache, while the next is written).

use std::path::Path;
use std::process::Command;

use crate::support::*;

const MIB: u64 = 1 << 20;

fn backing(dir: &Path, name: &str, len: u64) -> std::path::PathBuf {
    let image = dir.join(name);
    // Stale, non-zero bytes everywhere: a read-back that read nothing real
    // (zeros from a hole) could not match what was written.
    let mut bytes = vec![0u8; len as usize];
    for (i, chunk) in bytes.chunks_mut(4096).enumerate() {
        chunk.fill((i % 251) as u8 | 1);
    }
    std::fs::write(&image, bytes).unwrap();
    image
}

/// Each kind of byte (a copied file, a persistence file, the FAT), corrupted on the
/// device after it was written and before its batch is read back, fails the write
/// with exit 4 and names what; the same write without corruption verifies every byte
/// it wrote.
#[test]
fn a_block_device_is_read_back_while_it_is_written() {
    if !require(is_root(), "root (loop devices)") {
        return;
    }
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tmp();
    for (point, names) in [
        ("corrupt-file", "/"),
        ("corrupt-persist", "/LiveOS/overlay-"),
        ("corrupt-meta", "the FAT, directories and boot sectors"),
    ] {
        let image = backing(dir.path(), &format!("{point}.img"), 256 * MIB);
        let Some(dev) = loop_device(&[], &image) else {
            return;
        };
        let out = Command::new(crate::support::bin())
            .env("LIVESTICK_FAILPOINT", point)
            .args(["write", iso.to_str().unwrap(), &dev.0])
            .args(["--overlay-size-mb", "64", "--home-size-mb", "32"])
            .args(["--unencrypted-home", "--force", "--yes"])
            .output()
            .unwrap();
        drop(dev);
        let text = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{point}: {text}");
        assert!(
            text.contains("read-back verification failed") && text.contains(names),
            "{point}: {text}"
        );
    }
    // Three sectors past a whole number of 4 KiB blocks: the stick is read back past
    // the page cache in aligned blocks, and its last block reads short.
    let image = backing(dir.path(), "fine.img", 256 * MIB + 3 * 512);
    let Some(dev) = loop_device(&[], &image) else {
        return;
    };
    let out = livestick(&[
        "--json",
        "write",
        iso.to_str().unwrap(),
        &dev.0,
        "--overlay-size-mb",
        "64",
        "--home-size-mb",
        "32",
        "--unencrypted-home",
        "--force",
        "--yes",
    ]);
    drop(dev);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verified"], true);
    let written = report["written_bytes"].as_u64().unwrap();
    // More than one batch: the ISO's files alone are 15 MiB.
    assert!(written > 12 * MIB, "{written}");
    assert_eq!(report["verified_bytes"].as_u64(), Some(written));
    let start = part_start(&image);
    let len = part_len(&image);
    fsck_fat(&image, start, len, dir.path());
}
