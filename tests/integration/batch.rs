//! Several targets from one ISO read, and `--wait-for` (issue 6).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;

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
    assert_eq!(ev[0]["schema"], 3);
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
    // The sticks share one staged filesystem with SYSLINUX in it; each carries its
    // own volume ID, in the boot sector blkid reads and in its backup, and the loader.
    for (img, cfg) in [(&a, &cfg_a), (&b, &cfg_b)] {
        assert_eq!(
            blkid_value(img, start, "UUID"),
            uuid(cfg),
            "{}",
            img.display()
        );
        let primary = read_at(img, start + 0x43, 4);
        let backup = read_at(img, start + 6 * 512 + 0x43, 4);
        assert_eq!(primary, backup, "{}", img.display());
        assert!(
            fat_ls(img, start, "syslinux")
                .to_lowercase()
                .contains("ldlinux"),
            "{}",
            img.display()
        );
    }
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
    let lro = Loop::attach_with(&["-r"], &ro).expect("losetup -r failed");
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
        .map(|e| e["target"].as_str().unwrap_or("").to_string())
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
    let _alone = watch_loop_devices(dir.path());
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
            .any(|e| e["event"] == "plugged" && e["target"] == dev.0.as_str()),
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

/// The NDJSON event stream is a versioned contract (docs/ndjson-events.md):
/// a recorded session, with paths and hashes replaced by placeholders, must
/// keep its shape. A change here needs a schema version bump.
#[test]
fn ndjson_events_match_the_recorded_session() {
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tempfile::tempdir().unwrap();
    let t1 = dir.path().join("t1.img");
    let t2 = dir.path().join("t2.img");
    let bad = dir.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    let out = livestick(&[
        "--json",
        "write",
        iso.to_str().unwrap(),
        t1.to_str().unwrap(),
        t2.to_str().unwrap(),
        bad.to_str().unwrap(),
        "--size",
        "256M",
    ]);
    let names = [
        (t1.to_str().unwrap().to_string(), "<T1>"),
        (t2.to_str().unwrap().to_string(), "<T2>"),
        (bad.to_str().unwrap().to_string(), "<BAD>"),
        (iso.to_str().unwrap().to_string(), "<ISO>"),
    ];
    let placeholder = |v: &serde_json::Value| -> serde_json::Value {
        let s = v.as_str().unwrap_or("");
        names
            .iter()
            .find(|(p, _)| p == s)
            .map(|(_, n)| serde_json::json!(n))
            .unwrap_or_else(|| serde_json::json!(if v.is_null() { "null" } else { "<other>" }))
    };
    let keys = |v: &serde_json::Value| -> Vec<String> {
        let mut k: Vec<String> = v
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        k.sort();
        k
    };
    let mut lines: Vec<String> = events(&out.stdout)
        .iter()
        .map(|e| {
            let mut n = serde_json::Map::new();
            n.insert("keys".into(), serde_json::json!(keys(e)));
            if let Some(ev) = e.get("event") {
                n.insert("event".into(), ev.clone());
            }
            for field in ["target", "source"] {
                if let Some(v) = e.get(field) {
                    n.insert(field.into(), placeholder(v));
                }
            }
            for field in ["schema", "phase", "exit_code", "kind"] {
                if let Some(v) = e.get(field) {
                    n.insert(field.into(), v.clone());
                }
            }
            if let Some(r) = e.get("report") {
                n.insert("report_keys".into(), serde_json::json!(keys(r)));
            }
            if let Some(t) = e.get("targets").and_then(|t| t.as_array()) {
                let mut ts: Vec<serde_json::Value> = t
                    .iter()
                    .map(|x| {
                        if x.is_string() {
                            placeholder(x)
                        } else {
                            serde_json::json!({"target": placeholder(&x["target"]), "ok": x["ok"], "keys": keys(x)})
                        }
                    })
                    .collect();
                ts.sort_by_key(|x| x.to_string());
                n.insert("targets".into(), serde_json::json!(ts));
            }
            serde_json::Value::Object(n).to_string()
        })
        .collect();
    // Writers finish in any order: compare the done/failed events as a set.
    let first = lines.remove(0);
    let last = lines.split_off(lines.len() - 2);
    lines.sort();
    let mut normalized = vec![first];
    normalized.extend(lines);
    normalized.extend(last);
    let got = normalized.join("\n") + "\n";
    let golden = repo().join("tests/golden/batch-events.ndjson");
    if std::env::var("LIVESTICK_BLESS").is_ok() {
        std::fs::write(&golden, &got).unwrap();
    }
    let want = std::fs::read_to_string(&golden).expect("tests/golden/batch-events.ndjson");
    assert_eq!(
        got, want,
        "NDJSON event shape changed; bump EVENTS_SCHEMA and re-record with LIVESTICK_BLESS=1"
    );
}

/// Every target failing for the same reason exits with that reason's code, as a
/// single target would (docs/ndjson-events.md): two image files too small for the
/// ISO are bad input (2), not an I/O failure (4) whose hint sends one to dmesg.
#[test]
fn every_target_failing_alike_exits_with_its_own_code() {
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tmp();
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    let one = livestick(&[
        "write",
        iso.to_str().unwrap(),
        a.to_str().unwrap(),
        "--size",
        "1M",
        "--yes",
    ]);
    assert_eq!(one.status.code(), Some(2));
    let both = livestick(&[
        "write",
        iso.to_str().unwrap(),
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--size",
        "1M",
        "--yes",
    ]);
    let err = String::from_utf8_lossy(&both.stderr);
    assert_eq!(both.status.code(), Some(2), "{err}");
    assert!(err.contains("every target failed"), "{err}");
    assert!(!err.contains("dmesg"), "{err}");
    assert!(!a.exists() && !b.exists());
}

/// `--wait-timeout`: nobody plugs anything in, so the wait ends after the
/// duration with exit 2 naming what was awaited (before, it waited forever).
#[test]
fn wait_for_gives_up_after_its_timeout_when_nothing_comes() {
    let iso = synthetic_iso("fedora-classic.iso");
    let started = std::time::Instant::now();
    let out = livestick(&[
        "write",
        iso.to_str().unwrap(),
        "--wait-for",
        "1",
        "--wait-timeout",
        "2s",
        "--yes",
        "--noverify",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("Waiting up to 2 s") && stderr.contains("but 0 appeared"),
        "{stderr}"
    );
    // It did stop (a generous bound: this is about "not forever", not speed).
    assert!(started.elapsed() < Duration::from_secs(120));

    let bad = livestick(&[
        "write",
        iso.to_str().unwrap(),
        "--wait-for",
        "1",
        "--wait-timeout",
        "soon",
        "--yes",
    ]);
    assert_ne!(bad.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("not a duration"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let alone = livestick(&[
        "write",
        iso.to_str().unwrap(),
        "x.img",
        "--wait-timeout",
        "10s",
    ]);
    assert_ne!(alone.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&alone.stderr).contains("--wait-for"),
        "{}",
        String::from_utf8_lossy(&alone.stderr)
    );
}

/// Two sticks awaited, one plugged in before the timeout: it is written and
/// reported, and the batch ends as partial (exit 5) naming the shortfall.
#[test]
fn wait_for_writes_what_came_and_is_partial_after_its_timeout() {
    if !require(is_root(), "root (loop devices)") {
        return;
    }
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tempfile::tempdir().unwrap();
    let _alone = watch_loop_devices(dir.path());
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
            "2",
            "--wait-timeout",
            "8",
            "--yes",
            "--force",
            "--noverify",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let attached = Loop::attach(&image);
    let out = child.wait_with_output().unwrap();
    let Some(dev) = attached else {
        require(false, "loop devices");
        return;
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("but 1 appeared"), "{stderr}");
    let ev = events(&out.stdout);
    assert!(
        ev.iter()
            .any(|e| e["event"] == "done" && e["target"] == dev.0.as_str()),
        "{ev:?}"
    );
    drop(dev);
    check_stick(&image, dir.path());
}
