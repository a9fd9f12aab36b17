//! The `--json` documents of `write`, `verify`, `restore`, the error document and
//! the stderr progress events, each checked against its schema in `schemas/`
//! (docs/json.md) on the fixture ISOs: success and error, single targets and
//! batches (line by line), live ISOs and raw disk images.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::support::schema::{assert_valid, valid_document, validator};
use crate::support::{bin, livestick, ok, repo, sparse, synthetic_iso, tmp};

const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// Every JSON document in `bytes`, in order (pretty or one per line).
fn documents(bytes: &[u8]) -> Vec<Value> {
    serde_json::Deserializer::from_slice(bytes)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", String::from_utf8_lossy(bytes)))
}

/// Every stderr line that is a JSON object, each a valid progress event. Other
/// lines (the error a failing command signs on stderr) are for people.
fn progress_events(out: &Output) -> Vec<Value> {
    let events: Vec<Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    for event in &events {
        assert_valid(event, "progress-event");
    }
    events
}

/// The error document of a failed command: its only stdout document, valid, with
/// the exit code the process ended with.
fn error_document(out: &Output, code: i32) -> Value {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let doc = valid_document(&out.stdout, "error");
    assert_eq!(doc["exit_code"], code);
    assert_eq!(doc["schema"], 1);
    doc
}

fn write_json(args: &[&str]) -> Output {
    let mut all = vec!["write", "--json"];
    all.extend_from_slice(args);
    livestick(&all)
}

#[test]
fn every_schema_compiles_and_forbids_unknown_fields() {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(repo().join("schemas")).expect("schemas/") {
        let path = entry.expect("a directory entry").path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".schema.json"))
        else {
            continue;
        };
        validator(name);
        let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(
            schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{name}"
        );
        every_object_is_closed(&schema, name, "");
        names.push(name.to_string());
    }
    for mine in [
        "write-plan",
        "write-plans",
        "write-report",
        "raw-write-plan",
        "raw-write-report",
        "batch-event",
        "progress-event",
        "download",
        "verify",
        "restore",
        "restore-plan",
        "error",
    ] {
        assert!(
            names.iter().any(|n| n == mine),
            "schemas/{mine}.schema.json"
        );
    }
}

/// Every object schema lists its fields, allows no others and requires each one
/// (a field that does not apply is null, never absent).
fn every_object_is_closed(schema: &Value, name: &str, at: &str) {
    match schema {
        Value::Object(map) => {
            if let Some(props) = map.get("properties").and_then(Value::as_object) {
                assert_eq!(
                    map.get("additionalProperties"),
                    Some(&Value::Bool(false)),
                    "{name}{at}: additionalProperties"
                );
                let required: Vec<&str> = map["required"]
                    .as_array()
                    .unwrap_or_else(|| panic!("{name}{at}: required"))
                    .iter()
                    .filter_map(Value::as_str)
                    .collect();
                for key in props.keys() {
                    assert!(
                        required.contains(&key.as_str()),
                        "{name}{at}: {key} not required"
                    );
                }
            }
            for (key, value) in map {
                every_object_is_closed(value, name, &format!("{at}/{key}"));
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                every_object_is_closed(item, name, &format!("{at}/{i}"));
            }
        }
        _ => {}
    }
}

#[test]
fn a_single_write_plans_reports_and_shows_progress_in_its_schemas() {
    let dir = tmp();
    let iso = synthetic_iso("fedora-classic.iso");
    let target = sparse(dir.path(), "stick.img", 256 * MIB);
    let persistence = [
        "--overlay-size-mb",
        "16",
        "--home-size-mb",
        "16",
        "--unencrypted-home",
        "--swap-size-mb",
        "8",
    ];
    let mut args = vec![s(&iso), s(&target)];
    args.extend(persistence);
    let mut dry_run = args.clone();
    dry_run.push("--dry-run");
    let out = write_json(&dry_run);
    let plan = valid_document(ok(&out).as_bytes(), "write-plan");
    assert_eq!(plan["format"]["new"], true);
    assert_eq!(plan["format"]["table"], "mbr");
    for gone in ["table", "partition_start", "partition_len", "space_needed"] {
        assert!(plan.get(gone).is_none(), "{gone} in {plan:#}");
    }
    assert_eq!(plan["overlay"]["kind"], "dm-snapshot");
    assert_eq!(plan["overlay"]["size_bytes"], 16 * MIB);
    assert_eq!(plan["checksum"]["status"], "not-checked");
    assert_eq!(plan["iso_check"], "implanted-md5");

    let out = write_json(&args);
    let report = valid_document(ok(&out).as_bytes(), "write-report");
    assert_eq!(report["target"], s(&target));
    assert_eq!(report["kept_overlay"], Value::Null);
    assert!(report["iso_md5"].as_str().is_some_and(|m| m.len() == 32));
    assert!(report["written_bytes"].as_u64().unwrap() > 0);
    assert_eq!(report["verified_bytes"], report["written_bytes"]);
    let events = progress_events(&out);
    let phases: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "phase")
        .map(|e| e["phase"].as_str().unwrap())
        .collect();
    for phase in ["md5", "write", "verify"] {
        assert!(phases.contains(&phase), "{phase} in {phases:?}");
    }
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "progress" && e["done_bytes"] == e["total_bytes"]),
        "{events:?}"
    );

    // The same stick again: the plan installs into it and keeps its overlay.
    let out = write_json(&[s(&iso), s(&target), "--dry-run", "--noverify"]);
    let plan = valid_document(ok(&out).as_bytes(), "write-plan");
    assert_eq!(plan["format"]["new"], false);
    assert_eq!(plan["iso_check"], "skipped");
    assert!(
        plan["kept_overlay"]["size_bytes"].as_u64().is_some(),
        "{plan:#}"
    );
    let out = write_json(&[s(&iso), s(&target), "--reset-overlay", "--noverify"]);
    let report = valid_document(ok(&out).as_bytes(), "write-report");
    assert_eq!(report["kept_overlay"]["reset"], true, "{report:#}");
    assert_eq!(report["iso_md5"], Value::Null);
}

#[test]
fn an_overlayfs_plan_says_its_kind_in_kebab_case() {
    let dir = tmp();
    let iso = synthetic_iso("fedora42.iso");
    let target = sparse(dir.path(), "stick.img", 256 * MIB);
    let out = write_json(&[
        s(&iso),
        s(&target),
        "--dry-run",
        "--overlayfs",
        "--overlay-size-mb",
        "32",
    ]);
    let plan = valid_document(ok(&out).as_bytes(), "write-plan");
    assert_eq!(plan["overlay"]["kind"], "overlayfs");
    assert_eq!(plan["iso_check"], "none");
    assert_eq!(plan["ext4_live"], Value::Null);

    // The ext4 live layout: its partition in the plan, in the same words.
    let big = sparse(dir.path(), "big.img", 1024 * MIB);
    let out = write_json(&[
        s(&iso),
        s(&big),
        "--dry-run",
        "--ext4",
        "--overlay-size-mb",
        "64",
    ]);
    let plan = valid_document(ok(&out).as_bytes(), "write-plan");
    assert!(
        plan["ext4_live"]["size_bytes"].as_u64().unwrap() > 0,
        "{plan:#}"
    );
}

#[test]
fn write_errors_are_error_documents() {
    let dir = tmp();
    let iso = synthetic_iso("fedora42.iso");
    let target = sparse(dir.path(), "stick.img", 256 * MIB);
    let small = sparse(dir.path(), "small.img", MIB);
    let not_iso = dir.path().join("notes.txt");
    std::fs::write(&not_iso, "not an ISO\n").unwrap();

    let doc = error_document(&write_json(&[s(&not_iso), s(&target)]), 2);
    assert_eq!(doc["kind"], "bad-input");
    let doc = error_document(&write_json(&[s(&iso), s(&small)]), 2);
    assert!(
        doc["error"].as_str().unwrap().contains("too small"),
        "{doc:#}"
    );
    let doc = error_document(&write_json(&[s(&iso), s(&target), "--bogus"]), 1);
    assert_eq!(doc["kind"], "usage");
    assert_eq!(doc["step"], "parsing the command line");
    // The livecd-iso-to-disk front end speaks the same document.
    let out = Command::new(bin())
        .args(["iso-to-disk", "--json", "--bogus", s(&iso), s(&target)])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let code = out.status.code().unwrap();
    error_document(&out, code);
    // Nothing was written on a refused target.
    assert_eq!(std::fs::read(&small).unwrap(), vec![0u8; MIB as usize]);
}

#[test]
fn batch_events_follow_their_schema_line_by_line() {
    let dir = tmp();
    let iso = synthetic_iso("fedora-classic.iso");
    let t1 = sparse(dir.path(), "t1.img", 256 * MIB);
    let t2 = sparse(dir.path(), "t2.img", 256 * MIB);
    let small = sparse(dir.path(), "small.img", MIB);
    let out = write_json(&[
        s(&iso),
        s(&t1),
        s(&t2),
        s(&small),
        "--overlay-size-mb",
        "16",
    ]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("one JSON per line: {l}: {e}")))
        .collect();
    for line in &lines {
        assert_valid(line, "batch-event");
        assert!(line.get("device").is_none(), "{line}");
    }
    assert_eq!(lines[0]["event"], "start");
    assert_eq!(lines[0]["schema"], 3);
    assert_eq!(lines[0]["source"], s(&iso));
    assert_eq!(lines[0]["wait_for"], Value::Null);
    let done: Vec<&Value> = lines.iter().filter(|l| l["event"] == "done").collect();
    assert_eq!(done.len(), 2, "{stdout}");
    for d in &done {
        assert_eq!(d["schema"], 3);
        assert_eq!(d["iso_check"], "implanted-md5");
        assert!(d["iso_md5"].as_str().is_some_and(|m| m.len() == 32), "{d}");
        assert_eq!(d["checksum"]["status"], "not-checked");
        assert!(d["repaired"].is_array());
        assert!(d["overlay"].is_string());
    }
    assert!(
        lines
            .iter()
            .any(|l| l["event"] == "failed" && l["target"] == s(&small) && l["phase"] == "plan")
    );
    let report = &lines[lines.len() - 2];
    assert_eq!(report["event"], "report");
    assert_eq!(report["targets"].as_array().unwrap().len(), 3);
    let last = &lines[lines.len() - 1];
    assert_eq!(last["kind"], "partial-batch");
    assert_eq!(last["exit_code"], 5);
    progress_events(&out);

    // A dry run prints one document of plans (and the error of the partial batch).
    let out = write_json(&[s(&iso), s(&t1), s(&t2), s(&small), "--dry-run"]);
    assert_eq!(out.status.code(), Some(5));
    let docs = documents(&out.stdout);
    assert_eq!(docs.len(), 2, "{docs:?}");
    assert_valid(&docs[0], "write-plans");
    assert_eq!(docs[0]["plans"].as_array().unwrap().len(), 2);
    assert_eq!(docs[0]["failed"][0]["target"], s(&small));
    assert_valid(&docs[1], "error");
    let out = write_json(&[s(&iso), s(&t1), s(&t2), "--dry-run"]);
    let plans = valid_document(ok(&out).as_bytes(), "write-plans");
    assert_eq!(plans["failed"], serde_json::json!([]));
}

#[test]
fn wait_for_starts_its_events_and_ends_in_an_error_document_when_nothing_comes() {
    let dir = tmp();
    let iso = synthetic_iso("fedora42.iso");
    let out = write_json(&[s(&iso), "--wait-for", "1", "--wait-timeout", "1s", "--yes"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = documents(&out.stdout);
    for line in &lines {
        assert_valid(line, "batch-event");
    }
    assert_eq!(lines[0]["event"], "start");
    assert_eq!(lines[0]["wait_for"], 1);
    assert_eq!(lines[0]["targets"], Value::Null);
    assert_eq!(lines[lines.len() - 2]["targets"], serde_json::json!([]));
    assert_valid(&lines[lines.len() - 1], "error");
    drop(dir);
}

/// A small MBR disk image that is no live stick: written as it is.
fn raw_image(dir: &Path) -> PathBuf {
    let image = sparse(dir, "disk.raw", 8 * MIB);
    let mut child = Command::new("sfdisk")
        .args(["-q", s(&image)])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("sfdisk (scripts/deps.sh)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"label: dos\nstart=2048, type=83\n")
        .unwrap();
    assert!(child.wait().unwrap().success());
    image
}

#[test]
fn raw_image_plans_reports_and_batches_follow_their_schemas() {
    let dir = tmp();
    let image = raw_image(dir.path());
    let t1 = sparse(dir.path(), "r1.img", 16 * MIB);
    let t2 = sparse(dir.path(), "r2.img", 16 * MIB);
    let plan = valid_document(
        ok(&write_json(&[s(&image), s(&t1), "--dry-run"])).as_bytes(),
        "raw-write-plan",
    );
    assert_eq!(plan["kind"], "raw-image");
    assert_eq!(plan["image_size_bytes"], 8 * MIB);
    let out = write_json(&[s(&image), s(&t1)]);
    let report = valid_document(ok(&out).as_bytes(), "raw-write-report");
    assert_eq!(report["verified_bytes"], report["written_bytes"]);
    progress_events(&out);

    let out = write_json(&[s(&image), s(&t1), s(&t2)]);
    for line in String::from_utf8_lossy(&ok(&out).into_bytes()).lines() {
        let event: Value = serde_json::from_str(line).unwrap();
        assert_valid(&event, "batch-event");
        if event["event"] == "done" {
            assert_eq!(event["kind"], "raw-image");
            assert!(event["image_sha256"].is_string());
        }
    }
    let plans = valid_document(
        ok(&write_json(&[s(&image), s(&t1), s(&t2), "--dry-run"])).as_bytes(),
        "write-plans",
    );
    assert_eq!(plans["plans"][1]["kind"], "raw-image");
}

#[test]
fn download_only_prints_its_document() {
    let iso = synthetic_iso("fedora42.iso");
    let out = write_json(&[s(&iso), "--download-only"]);
    let doc = valid_document(ok(&out).as_bytes(), "download");
    assert_eq!(doc["file"], s(&iso));
    assert_eq!(doc["checksum"]["status"], "not-checked");
}

#[test]
fn verify_and_restore_follow_their_schemas_intact_damaged_and_failing() {
    let dir = tmp();
    let iso = synthetic_iso("fedora-classic.iso");
    let target = sparse(dir.path(), "stick.img", 256 * MIB);
    ok(&livestick(&[
        "write",
        s(&iso),
        s(&target),
        "--overlay-size-mb",
        "16",
        "--home-size-mb",
        "16",
        "--unencrypted-home",
        "--quiet",
    ]));
    let out = livestick(&["verify", "--json", "--deep", "--iso", s(&iso), s(&target)]);
    let report = valid_document(ok(&out).as_bytes(), "verify");
    assert_eq!(report["overall"], "intact");
    assert_eq!(report["iso"]["source"], s(&iso));
    assert!(report["persistence"][0]["deep"].is_object(), "{report:#}");
    progress_events(&out);
    let out = livestick(&["verify", "--json", s(&target)]);
    let report = valid_document(ok(&out).as_bytes(), "verify");
    assert_eq!(report["iso"], Value::Null);
    assert_eq!(report["persistence"][0]["deep"], Value::Null);

    // Damaged: the verify report is the one document, exit 4.
    let start = crate::support::part_start(&target);
    let scratch = dir.path().join("cfg");
    std::fs::write(&scratch, "changed\n").unwrap();
    crate::support::fat_put(&target, start, &scratch, "syslinux/syslinux.cfg");
    let out = livestick(&["verify", "--json", s(&target)]);
    assert_eq!(out.status.code(), Some(4));
    let report = valid_document(&out.stdout, "verify");
    assert_eq!(report["overall"], "damaged");
    assert_eq!(report["exit_code"], 4);

    let plan = valid_document(
        ok(&livestick(&[
            "restore",
            "--json",
            "--yes",
            "--dry-run",
            s(&target),
        ]))
        .as_bytes(),
        "restore-plan",
    );
    assert!(
        plan["found"]["home"]["size_bytes"].as_u64().is_some(),
        "{plan:#}"
    );
    let saved = dir.path().join("home-saved.img");
    let out = livestick(&[
        "restore",
        "--json",
        "--yes",
        "--save-home",
        s(&saved),
        s(&target),
    ]);
    let report = valid_document(ok(&out).as_bytes(), "restore");
    assert_eq!(report["saved_home"]["size_bytes"], 16 * MIB);
    progress_events(&out);

    // No manifest now: verify's error is the error document.
    let doc = error_document(&livestick(&["verify", "--json", s(&target)]), 2);
    assert_eq!(doc["step"], "verify");
    let missing = dir.path().join("missing.img");
    error_document(&livestick(&["restore", "--json", "--yes", s(&missing)]), 2);
}
