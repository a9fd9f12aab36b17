//! `livestick devices` and the `--wait-for` watcher, on loop devices.
//!
//! Loop devices are not removable, so they are listed with `--all` (marked
//! `fixed`, transport `loop`) and the watcher is asked to include fixed disks.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::support::*;
use livestick::disk::devices::{self, Host, Transport};

const MIB: u64 = 1 << 20;

/// The watcher must not see another test's loop device as "the new one": the
/// tests of this file take turns, and the watcher also holds a
/// `support::LoopWatch`, which holds back every other file's attaches.
static LOOPS: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    LOOPS.lock().unwrap_or_else(|e| e.into_inner())
}

/// `livestick devices …`, or `None` (skipped here, a failure in CI) while the
/// subcommand is not wired into the CLI.
fn devices_cli(args: &[&str]) -> Option<serde_json::Value> {
    let mut full = vec!["devices"];
    full.extend_from_slice(args);
    let out = livestick(&full);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && stderr.contains("unrecognized subcommand") {
        require(false, "`livestick devices` wired into src/cli.rs");
        return None;
    }
    assert!(out.status.success(), "livestick devices {args:?}: {stderr}");
    Some(serde_json::from_slice(&out.stdout).expect("devices --json prints JSON"))
}

fn find<'a>(listing: &'a serde_json::Value, path: &str) -> Option<&'a serde_json::Value> {
    listing["devices"]
        .as_array()?
        .iter()
        .find(|d| d["target"] == path)
}

#[test]
fn a_fresh_loop_device_is_listed_with_all() {
    if !require(is_root(), "root (loop devices)") {
        return;
    }
    let _turn = serial();
    let dir = tempfile::tempdir().unwrap();
    let image = sparse(dir.path(), "fresh.img", 96 * MIB);
    let Some(dev) = loop_device(&["-P"], &image) else {
        return;
    };

    let listing = devices::list(&Host::live(), true).unwrap();
    let found = listing
        .devices
        .iter()
        .find(|d| d.facts.path == Path::new(&dev.0))
        .unwrap_or_else(|| panic!("{} not listed: {listing:#?}", dev.0));
    assert_eq!(found.facts.transport, Transport::Loop);
    assert_eq!(found.facts.size, 96 * MIB);
    assert!(found.fixed);
    assert_eq!(found.facts.backing_file.as_deref(), image.to_str());
    assert!(found.table.is_none() && found.partitions.is_empty() && found.live.is_none());
    assert!(found.busy.is_empty(), "{:?}", found.busy);
    if !Path::new("/run/udev/data").is_dir() {
        assert!(
            listing.notes.iter().any(|n| n == devices::NO_UDEV_NOTE),
            "{:?}",
            listing.notes
        );
    }
    // Without --all a loop device (not removable) is not offered.
    let removable_only = devices::list(&Host::live(), false).unwrap();
    assert!(
        removable_only
            .devices
            .iter()
            .all(|d| d.facts.path != Path::new(&dev.0))
    );

    let Some(json) = devices_cli(&["--all", "--json"]) else {
        return;
    };
    let entry = find(&json, &dev.0).unwrap_or_else(|| panic!("{} not in {json:#}", dev.0));
    assert_eq!(entry["transport"], "loop");
    assert_eq!(entry["size_bytes"], 96 * MIB);
    assert_eq!(entry["fixed"], true);
    assert_eq!(entry["backing_file"], image.to_str().unwrap());
    let plain = devices_cli(&["--json"]).unwrap();
    assert!(find(&plain, &dev.0).is_none());
}

#[test]
fn a_written_stick_shows_its_liveos_overlay_and_home() {
    if !require(is_root(), "root (loop devices)") {
        return;
    }
    let iso = synthetic_iso("fedora-classic.iso");
    let _turn = serial();
    let dir = tempfile::tempdir().unwrap();
    let image = sparse(dir.path(), "stick.img", 256 * MIB);
    let Some(dev) = loop_device(&["-P"], &image) else {
        return;
    };
    let out = livestick(&[
        "write",
        iso.to_str().unwrap(),
        &dev.0,
        "--force",
        "--yes",
        "--overlay-size-mb",
        "16",
        "--home-size-mb",
        "16",
        "--unencrypted-home",
        "--label",
        "LIVETEST",
        "--volume-id",
        "CAFE0002",
    ]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let listing = livestick::commands::devices::list(&Host::live(), true).unwrap();
    let stick = listing
        .devices
        .iter()
        .find(|d| d.facts.path == Path::new(&dev.0))
        .unwrap_or_else(|| panic!("{} not listed", dev.0));
    assert_eq!(
        stick.table,
        Some(livestick::disk::partition::TableKind::Mbr)
    );
    let part = &stick.partitions[0];
    assert_eq!(part.entry.number, 1);
    let fs = part
        .filesystem
        .as_ref()
        .expect("FAT found by its boot sector");
    assert_eq!(fs.fs_type, "vfat");
    assert_eq!(fs.uuid.as_deref(), Some("CAFE-0002"));
    let live = stick.live.as_ref().unwrap_or_else(|| panic!("{stick:#?}"));
    assert_eq!(live.label, "LIVETEST");
    assert_eq!(live.uuid, "CAFE-0002");
    assert_eq!(live.live_dir, "LiveOS");
    assert!(live.squashfs_size.is_some());
    assert_eq!(live.overlays.len(), 1, "{:?}", live.overlays);
    let overlay = &live.overlays[0];
    assert_eq!(overlay.file, "/LiveOS/overlay-LIVETEST-CAFE-0002");
    assert_eq!(overlay.size, 16 * MIB);
    assert_eq!(overlay.kind, Some("dm-snapshot"));
    assert_eq!(overlay.state.as_deref(), Some("uninitialised"));
    assert!(overlay.problem.is_none(), "{overlay:?}");
    assert!(overlay.percent_used.unwrap() < 1.0);
    assert_eq!(live.home_size, Some(16 * MIB));

    let Some(json) = devices_cli(&["--all", "--json"]) else {
        return;
    };
    let entry = find(&json, &dev.0).unwrap();
    assert_eq!(entry["live"]["label"], "LIVETEST");
    assert_eq!(
        entry["live"]["overlays"][0]["path"],
        "/LiveOS/overlay-LIVETEST-CAFE-0002"
    );
    assert_eq!(entry["partitions"][0]["filesystem"]["fs_type"], "vfat");
    // The table view names the LiveOS too.
    let text = livestick(&["devices", "--all"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("LiveOS: label LIVETEST"), "{text}");
}

#[test]
fn whole_device_ext4_is_identified_and_mounts_are_shown() {
    if !require(is_root(), "root (loop devices, mount)") {
        return;
    }
    let _turn = serial();
    let dir = tempfile::tempdir().unwrap();
    let image = sparse(dir.path(), "ext4.img", 64 * MIB);
    run(
        "mke2fs",
        &[
            "-q",
            "-t",
            "ext4",
            "-L",
            "DATA",
            "-F",
            image.to_str().unwrap(),
        ],
    );
    let Some(dev) = loop_device(&["-P"], &image) else {
        return;
    };
    let listing = devices::list(&Host::live(), true).unwrap();
    let found = listing
        .devices
        .iter()
        .find(|d| d.facts.path == Path::new(&dev.0))
        .unwrap();
    let fs = found.filesystem.as_ref().unwrap();
    assert_eq!(fs.fs_type, "ext4");
    assert_eq!(fs.label.as_deref(), Some("DATA"));
    assert!(found.live.is_none());
}

#[test]
fn the_watcher_reports_a_loop_device_attached_after_it_started() {
    if !require(is_root(), "root (loop devices)") {
        return;
    }
    let _turn = serial();
    let dir = tempfile::tempdir().unwrap();
    let _alone = watch_loop_devices(dir.path());
    let image = sparse(dir.path(), "plugged.img", 48 * MIB);
    // A device present before the watch starts is never reported.
    let early = sparse(dir.path(), "early.img", 48 * MIB);
    let Some(before) = loop_device(&["-P"], &early) else {
        return;
    };

    let plug = {
        let image = image.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(700));
            Loop::attach(&image)
        })
    };
    let mut seen = Vec::new();
    // Another process on this machine may attach a loop device meanwhile, so
    // wait for up to three and look for ours among them.
    let result =
        devices::wait_for_new_devices(3, Some(Duration::from_secs(4)), true, |p| seen.push(p));
    let plugged = plug.join().unwrap().expect("losetup attaches the device");
    let found = match result {
        Ok(found) => found,
        Err(devices::DeviceError::WaitTimedOut { found, .. }) => found,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(found, seen, "on_new is called once per device, in order");
    assert!(
        found.contains(&PathBuf::from(&plugged.0)),
        "{found:?} lacks {}",
        plugged.0
    );
    assert!(!found.contains(&PathBuf::from(&before.0)), "{found:?}");

    // Removable-only watching ignores loop devices.
    let again = sparse(dir.path(), "ignored.img", 48 * MIB);
    let plug = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        Loop::attach(&again)
    });
    let err = devices::wait_for_new_devices(1, Some(Duration::from_millis(1500)), false, |_| {});
    let _ignored = plug.join().unwrap();
    match err {
        Err(devices::DeviceError::WaitTimedOut { found, .. }) => {
            assert!(
                found.iter().all(|p| !p.starts_with("/dev/loop")),
                "{found:?}"
            )
        }
        // A real stick plugged in during the test is fine, a loop device is not.
        Ok(found) => assert!(found.iter().all(|p| !p.starts_with("/dev/loop"))),
        Err(e) => panic!("{e}"),
    }
}
