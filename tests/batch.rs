//! Several targets from one ISO read, and `--wait-for` (issue 6).

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

const MIB: u64 = 1 << 20;

fn events(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("each line is one JSON object"))
        .collect()
}

fn check_stick(image: &Path, scratch: &Path) -> String {
    let table = sfdisk(image);
    let part = &table["partitiontable"]["partitions"][0];
    let start = part["start"].as_u64().unwrap() * 512;
    let len = part["size"].as_u64().unwrap() * 512;
    fsck_fat(image, start, len, scratch);
    String::from_utf8(fat_read(image, start, "/syslinux/syslinux.cfg")).unwrap()
}

#[test]
fn a_batch_writes_every_good_target_and_reports_the_bad_one() {
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    let bad = dir.path().join("a-directory");
    std::fs::create_dir(&bad).unwrap();
    let out = livestick(&[
        "--json",
        "write",
        iso.to_str().unwrap(),
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        bad.to_str().unwrap(),
        "--size",
        "256M",
        "--overlay-size-mb",
        "16",
    ]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "partial failure has its own exit code: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ev = events(&out.stdout);
    assert_eq!(ev[0]["event"], "start");
    assert_eq!(ev[0]["schema"], 1);
    let done: Vec<_> = ev.iter().filter(|e| e["event"] == "done").collect();
    let failed: Vec<_> = ev.iter().filter(|e| e["event"] == "failed").collect();
    assert_eq!(done.len(), 2, "{ev:?}");
    assert_eq!(failed.len(), 1, "{ev:?}");
    assert!(failed[0]["error"].as_str().unwrap().contains("directory"));
    let report = ev
        .iter()
        .find(|e| e["event"] == "report")
        .expect("a final report event");
    assert_eq!(report["targets"].as_array().unwrap().len(), 3);
    let error = ev.last().unwrap();
    assert_eq!(error["exit_code"], 5, "{error}");
    // Each stick has its own UUID, its own overlay name, and is complete.
    let cfg_a = check_stick(&a, dir.path());
    let cfg_b = check_stick(&b, dir.path());
    let uuid = |cfg: &str| {
        cfg.split("root=live:UUID=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    assert_ne!(uuid(&cfg_a), uuid(&cfg_b));
    let start = MIB;
    let iso_sq = dir.path().join("sq");
    iso_extract(&iso, "/LiveOS/squashfs.img", &iso_sq);
    for img in [&a, &b] {
        let sq = dir.path().join("sq-stick");
        fat_copy_out(img, start, "/LiveOS/squashfs.img", &sq);
        assert_eq!(sha256_file(&sq), sha256_file(&iso_sq));
        std::fs::remove_file(&sq).unwrap();
    }
}

#[test]
fn every_target_failing_is_an_error_not_a_partial_success() {
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tempfile::tempdir().unwrap();
    let out = livestick(&[
        "write",
        iso.to_str().unwrap(),
        dir.path().to_str().unwrap(),
        "/dev/livestick-none",
        "--size",
        "256M",
    ]);
    assert_ne!(out.status.code(), Some(0));
    assert_ne!(out.status.code(), Some(5));
    assert!(!Path::new("/dev/livestick-none").exists());
}

#[test]
fn loop_batch_survives_a_read_only_and_a_too_small_device() {
    if !require(is_root(), "root (loop devices)") {
        return;
    }
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tempfile::tempdir().unwrap();
    let mk = |name: &str, size: u64| {
        let p = dir.path().join(name);
        std::fs::File::create(&p).unwrap().set_len(size).unwrap();
        p
    };
    let good1 = mk("good1", 256 * MIB);
    let good2 = mk("good2", 256 * MIB);
    let small = mk("small", 36 * MIB);
    let ro = mk("ro", 256 * MIB);
    let (Some(l1), Some(l2), Some(ls)) = (
        Loop::attach(&good1),
        Loop::attach(&good2),
        Loop::attach(&small),
    ) else {
        require(false, "loop devices");
        return;
    };
    let ro_dev = Command::new("losetup")
        .args(["-f", "--show", "-r"])
        .arg(&ro)
        .output()
        .unwrap();
    let lro = Loop(String::from_utf8_lossy(&ro_dev.stdout).trim().to_string());
    assert!(lro.0.starts_with("/dev/loop"), "losetup -r failed");
    let ro_before = sha256_file(&ro);
    let out = livestick(&[
        "--json",
        "write",
        iso.to_str().unwrap(),
        &l1.0,
        &lro.0,
        &l2.0,
        &ls.0,
        "--force",
        "--yes",
        "--overlay-size-mb",
        "24",
    ]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ev = events(&out.stdout);
    let failed: Vec<String> = ev
        .iter()
        .filter(|e| e["event"] == "failed")
        .map(|e| e["device"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(failed.len(), 2, "{ev:?}");
    assert!(
        failed.contains(&lro.0) && failed.contains(&ls.0),
        "{failed:?}"
    );
    drop((l1, l2, ls, lro));
    check_stick(&good1, dir.path());
    check_stick(&good2, dir.path());
    assert_eq!(
        ro_before,
        sha256_file(&ro),
        "the read-only device was changed"
    );
}

#[test]
fn wait_for_writes_sticks_as_they_appear() {
    if !require(is_root(), "root (loop devices)") {
        return;
    }
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("plugged");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(256 * MIB)
        .unwrap();
    let child = Command::new(bin())
        .args([
            "--json",
            "write",
            iso.to_str().unwrap(),
            "--wait-for",
            "1",
            "--yes",
            "--force",
            "--noverify",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let mut child = child;
    let attached = Loop::attach(&image);
    if attached.is_none() {
        // Nothing will ever be plugged in: stop the waiting writer.
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let Some(dev) = attached else {
        require(false, "loop devices");
        return;
    };
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ev = events(&out.stdout);
    assert!(
        ev.iter()
            .any(|e| e["event"] == "plugged" && e["device"] == dev.0.as_str()),
        "{ev:?}"
    );
    drop(dev);
    check_stick(&image, dir.path());
}

#[test]
fn wait_for_demands_yes() {
    let iso = synthetic_iso("fedora-classic.iso");
    let out = livestick(&["write", iso.to_str().unwrap(), "--wait-for", "2"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes"));
}
