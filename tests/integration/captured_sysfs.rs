//! The safety rules on block-device trees captured from real machines
//! (`fixtures/sysfs/capture.sh`), not built by hand: each capture is a sysfs
//! subset, the udev database if the machine had one, mountinfo and swaps.
//! The dm/LVM/md layouts, which this project's CI kernel cannot produce, are
//! covered by the hand-built trees in `disk::devices`'s unit tests.

use std::path::PathBuf;

use livestick::disk::devices::{self, DevNum, Host, Transport};

fn capture(name: &str) -> (PathBuf, Host) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/sysfs")
        .join(name);
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("captured file");
    let host = Host::from_tree(
        &dir.join("sys"),
        &dir.join("udev-data"),
        &read("mountinfo"),
        &read("swaps"),
    );
    (dir, host)
}

/// A CI virtual machine: root on a virtio disk (/dev/vda), loop devices, a
/// zram device, and no udev at all.
#[test]
fn ci_vm_without_udev() {
    let (_, host) = capture("ci-vm-no-udev");
    assert!(!host.has_udev_db());
    let vda = DevNum {
        major: 254,
        minor: 0,
    };
    let system = host.system_disks();
    assert!(
        system.iter().any(|s| s.dev == vda && s.mount_point == "/"),
        "the disk holding / is the system disk: {system:?}"
    );
    let listing = devices::list(&host, true).expect("listing a captured tree");
    assert!(!listing.udev);
    assert!(
        listing.notes.iter().any(|n| n.contains("udev")),
        "{:?}",
        listing.notes
    );
    let disk = listing
        .devices
        .iter()
        .find(|d| d.facts.name == "vda")
        .expect("vda is listed with --all");
    assert!(disk.fixed, "a virtio disk is not removable");
    assert!(disk.system.iter().any(|m| m == "/"), "{:?}", disk.system);
    assert_eq!(disk.facts.transport, Transport::Virtio);
    assert_eq!(disk.facts.logical_sector_size, 512);
    for d in listing
        .devices
        .iter()
        .filter(|d| d.facts.name.starts_with("loop"))
    {
        assert_eq!(d.facts.transport, Transport::Loop, "{}", d.facts.name);
        assert!(d.system.is_empty(), "{} is not a system disk", d.facts.name);
    }
    // Without --all only removable sticks are shown: none on this machine.
    let sticks = devices::list(&host, false).expect("listing");
    assert!(
        sticks.devices.iter().all(|d| d.facts.name != "vda"),
        "the system disk is never offered as a stick"
    );
}
