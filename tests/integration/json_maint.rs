//! The `--json` documents of the maintenance commands (`inspect`, `devices`,
//! `doctor`, `overlay *`, `home *`) checked against `schemas/*.schema.json` on the
//! fixtures: every overlay kind (dm-snapshot, OverlayFS file, OverlayFS directory),
//! on a stick and bare, planned and done, and the error document of each command
//! (docs/json-maintenance.md says which schema describes which document).

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

use super::support::fixtures::{boot_iso, synthetic_iso};
use super::support::schema::valid_document;
use super::support::{
    debugfs_w, fat_copy_out, fat_put, is_root, livestick, loop_device, part_start, require, tmp,
};

/// `livestick ARGS --json`.
fn json_run(args: &[&str]) -> Output {
    let mut all = args.to_vec();
    all.push("--json");
    livestick(&all)
}

/// Runs `livestick ARGS --json`, expects success, and returns the document after
/// checking it against `schemas/<schema>.schema.json`.
fn valid(args: &[&str], schema: &str) -> Value {
    let out = json_run(args);
    assert!(
        out.status.success(),
        "livestick {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let doc = valid_document(&out.stdout, schema);
    assert_eq!(doc["schema"], 1, "{doc}");
    doc
}

/// Runs `livestick ARGS --json`, expects a failure (exit `code` when given), and
/// returns the error document after checking it against
/// `schemas/error.schema.json` and that it names the exit code the process had.
fn error_of(args: &[&str], code: Option<i32>) -> Value {
    let out = json_run(args);
    let status = out.status.code().expect("exited");
    assert_ne!(status, 0, "livestick {args:?} succeeded");
    if let Some(code) = code {
        assert_eq!(
            status,
            code,
            "livestick {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let doc = valid_document(&out.stdout, "error");
    assert_eq!(doc["exit_code"], status, "{doc}");
    doc
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Sticks written from the fixtures, one per overlay layout the maintenance
/// commands take, each with what the test needs beside it.
struct Sticks {
    dir: tempfile::TempDir,
    /// Classic isolinux ISO, dm-snapshot overlay, plain home.
    dm: PathBuf,
    /// GRUB-only ISO, OverlayFS overlay file (nested root image).
    ovl: PathBuf,
    /// kiwi ISO, no overlay, LUKS home of 32 MiB (passphrase in `pass`).
    luks: PathBuf,
    pass: PathBuf,
}

impl Sticks {
    fn new() -> Sticks {
        let dir = tmp();
        let at = |n: &str| dir.path().join(n);
        let (dm, ovl, luks, pass) = (at("dm.img"), at("ovl.img"), at("luks.img"), at("pass"));
        std::fs::write(&pass, "correct horse").expect("passphrase file");
        let quiet_write = |iso: PathBuf, target: &Path, extra: &[&str]| {
            let mut args = vec!["write", s(&iso), s(target), "--size", "300M", "--yes", "-q"];
            args.extend_from_slice(extra);
            let out = livestick(&args);
            assert!(
                out.status.success(),
                "write {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        quiet_write(
            synthetic_iso("fedora-classic"),
            &dm,
            &[
                "--overlay-size-mb",
                "16",
                "--home-size-mb",
                "16",
                "--unencrypted-home",
            ],
        );
        quiet_write(
            synthetic_iso("fedora-grub"),
            &ovl,
            &["--overlay-size-mb", "16", "--overlayfs"],
        );
        quiet_write(
            synthetic_iso("fedora42"),
            &luks,
            &["--home-size-mb", "32", "--passphrase-file", s(&pass)],
        );
        Sticks {
            dir,
            dm,
            ovl,
            luks,
            pass,
        }
    }

    fn at(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn work(&self) -> &str {
        s(self.dir.path())
    }

    /// A copy of `stick` to change, so the others stay as written.
    fn copy(&self, stick: &Path, name: &str) -> PathBuf {
        let to = self.at(name);
        std::fs::copy(stick, &to).expect("copy stick");
        to
    }

    /// The stick's overlay file copied out of its FAT: a bare overlay.
    fn bare_overlay(&self, stick: &Path, name: &str) -> PathBuf {
        let status = valid(&["overlay", "status", s(stick)], "overlay-status");
        let fat_path = status["expected_overlay"].as_str().expect("overlay name");
        let to = self.at(name);
        fat_copy_out(stick, part_start(stick), fat_path, &to);
        to
    }

    /// `overlayfs/` and `ovlwork/` in a directory, as dracut keeps them on an ext4 stick.
    fn overlay_dir(&self, name: &str) -> PathBuf {
        let dir = self.at(name);
        std::fs::create_dir_all(dir.join("overlayfs/etc")).expect("upper dir");
        std::fs::create_dir_all(dir.join("ovlwork")).expect("work dir");
        std::fs::write(dir.join("overlayfs/etc/motd"), "changed\n").expect("upper file");
        dir
    }
}

#[test]
fn inspect_documents_follow_the_schema_for_every_fixture_and_stick() {
    let sticks = Sticks::new();
    let mut sources: Vec<PathBuf> = ["fedora-classic", "fedora-grub", "fedora42"]
        .iter()
        .map(|n| synthetic_iso(n))
        .collect();
    sources.push(boot_iso("boot-flat"));
    sources.extend([sticks.dm.clone(), sticks.ovl.clone(), sticks.luks.clone()]);
    for source in &sources {
        let doc = valid(&["inspect", s(source)], "inspect");
        assert_eq!(doc["source"], s(source), "the subject is `source`: {doc}");
        assert!(doc["volume_bytes"].as_u64().unwrap() > 0, "{doc}");
        assert!(doc["squashfs"]["size_bytes"].as_u64().unwrap() > 0, "{doc}");
        let kind = if source.extension().is_some_and(|e| e == "iso") {
            "iso"
        } else {
            "stick"
        };
        assert_eq!(doc["source_kind"], kind, "{doc}");
    }
    let classic = valid(&["inspect", s(&sources[0])], "inspect");
    let menu = &classic["menus"][0]["menu"];
    assert_eq!(menu["source"], "isolinux", "{menu}");
    let purposes: Vec<&str> = menu["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["purpose"].as_str().unwrap())
        .collect();
    assert!(purposes.contains(&"basic-graphics"), "{purposes:?}");
    assert!(purposes.contains(&"media-check"), "{purposes:?}");
    let stick = valid(&["inspect", s(&sticks.dm)], "inspect");
    assert_eq!(
        stick["source_overlay"]["size_bytes"],
        16u64 << 20,
        "{stick}"
    );
    assert_eq!(stick["source_home"]["size_bytes"], 16u64 << 20, "{stick}");
    let flat = valid(&["inspect", s(&sources[3])], "inspect");
    assert_eq!(flat["root"]["kind"], "flat", "{flat}");
}

#[test]
fn devices_and_doctor_documents_follow_their_schemas() {
    valid(&["devices"], "devices");
    valid(&["devices", "--all"], "devices");
    let doctor = valid(&["doctor"], "doctor");
    assert!(
        doctor["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "mcopy"),
        "{doctor}"
    );

    if !require(is_root(), "root (a loop device for `devices --all`)") {
        return;
    }
    let sticks = Sticks::new();
    let Some(dev) = loop_device(&["-P"], &sticks.dm) else {
        return;
    };
    let listing = valid(&["devices", "--all"], "devices");
    let entry = listing["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["target"] == dev.0.as_str())
        .unwrap_or_else(|| panic!("{} not listed: {listing:#}", dev.0));
    assert_eq!(entry["size_bytes"], 300u64 << 20, "{entry}");
    assert_eq!(entry["partitions"][0]["start_bytes"], 1u64 << 20, "{entry}");
    let live = &entry["live"];
    assert_eq!(live["home_bytes"], 16u64 << 20, "{live}");
    assert_eq!(live["overlays"][0]["kind"], "dm-snapshot", "{live}");
    assert_eq!(live["overlays"][0]["size_bytes"], 16u64 << 20, "{live}");
    assert!(
        live["overlays"][0]["path"]
            .as_str()
            .unwrap()
            .starts_with("/LiveOS/overlay-"),
        "{live}"
    );
}

#[test]
fn overlay_status_of_every_kind_and_place_follows_one_schema() {
    let sticks = Sticks::new();
    let dm_bare = sticks.bare_overlay(&sticks.dm, "dm.ovl");
    let ovl_bare = sticks.bare_overlay(&sticks.ovl, "ovl.ovl");
    let dir = sticks.overlay_dir("dir-overlay");
    let cases: [(&Path, &str, bool); 5] = [
        (&sticks.dm, "dm-snapshot", true),
        (&sticks.ovl, "overlayfs", true),
        (&dm_bare, "dm-snapshot", false),
        (&ovl_bare, "overlayfs", false),
        (&dir, "overlayfs-dir", false),
    ];
    for (target, kind, on_stick) in cases {
        let doc = valid(&["overlay", "status", s(target)], "overlay-status");
        assert_eq!(doc["target"], s(target), "{doc}");
        assert_eq!(doc["kind"], kind, "{doc}");
        assert_eq!(doc["repaired"], serde_json::json!([]), "{doc}");
        assert_eq!(doc["label"].is_string(), on_stick, "{doc}");
        assert_eq!(doc["orphaned"].is_boolean(), on_stick, "{doc}");
        assert_eq!(doc["state"].is_string(), kind == "dm-snapshot", "{doc}");
        assert_eq!(
            doc["upper_entries"].is_u64(),
            kind == "overlayfs-dir",
            "{doc}"
        );
        if kind != "overlayfs-dir" {
            assert_eq!(doc["size_bytes"], 16u64 << 20, "{doc}");
            let (used, free) = (doc["used_bytes"].as_u64(), doc["free_bytes"].as_u64());
            assert!(used.unwrap() + free.unwrap() <= 16 << 20, "{doc}");
        }
    }
}

#[test]
fn overlay_changes_follow_their_schemas_for_each_kind_and_place() {
    let sticks = Sticks::new();
    let work = sticks.work();
    for (stick, kind) in [(&sticks.dm, "dm-snapshot"), (&sticks.ovl, "overlayfs")] {
        let name = stick.file_stem().unwrap().to_str().unwrap().to_string();
        let bare = sticks.bare_overlay(stick, &format!("{name}.ovl"));
        for target in [stick.clone(), bare] {
            let t = s(&target);
            let doc = valid(&["overlay", "reset", t, "--dry-run"], "overlay-reset");
            assert_eq!(
                (&doc["kind"], &doc["dry_run"]),
                (&kind.into(), &true.into())
            );
            let doc = valid(
                &["overlay", "grow", t, "--add-mb", "1", "--dry-run"],
                "overlay-grow",
            );
            assert_eq!(doc["kind"], kind, "{doc}");
            let doc = valid(&["overlay", "recover", t, "--dry-run"], "overlay-recover");
            assert_eq!(doc["kind"], kind, "{doc}");

            let grown = valid(
                &["overlay", "grow", t, "--add-mb", "1", "--workdir", work],
                "overlay-grow",
            );
            assert_eq!(grown["dry_run"], false, "{grown}");
            assert_eq!(grown["grow"]["new_bytes"], 17u64 << 20, "{grown}");
            let status = valid(&["overlay", "status", t], "overlay-status");
            assert_eq!(status["size_bytes"], 17u64 << 20, "{status}");
            valid(
                &["overlay", "recover", t, "--add-mb", "1", "--workdir", work],
                "overlay-recover",
            );
            let reset = valid(&["overlay", "reset", t, "--yes"], "overlay-reset");
            assert_eq!(reset["dry_run"], false, "{reset}");
            assert_eq!(reset["target"], t, "{reset}");
        }
        valid(
            &["overlay", "merge", s(stick), "--dry-run", "--workdir", work],
            "overlay-merge-plan",
        );
    }
    // A dm-snapshot repair on the stick (e2fsck on the view).
    let repaired = valid(
        &[
            "overlay",
            "recover",
            s(&sticks.dm),
            "--repair",
            "--workdir",
            work,
        ],
        "overlay-recover",
    );
    assert!(repaired["repair"].is_object(), "{repaired}");
    // A directory overlay: reset only (grow and recover refuse it by name).
    let dir = sticks.overlay_dir("dir-overlay");
    let doc = valid(&["overlay", "reset", s(&dir), "--dry-run"], "overlay-reset");
    assert_eq!(doc["kind"], "overlayfs-dir", "{doc}");
    assert!(doc["zeroed_bytes"].is_null(), "{doc}");
    valid(&["overlay", "reset", s(&dir), "--yes"], "overlay-reset");
}

#[test]
fn overlay_merges_follow_their_schemas() {
    let sticks = Sticks::new();
    let work = sticks.work();
    // A bare OverlayFS overlay with one new file, beside its squashfs.img.
    let bare_dir = sticks.at("bare");
    std::fs::create_dir_all(&bare_dir).unwrap();
    let overlay = bare_dir.join("overlay.img");
    std::fs::rename(sticks.bare_overlay(&sticks.ovl, "ovl.ovl"), &overlay).unwrap();
    let squashfs = bare_dir.join("squashfs.img");
    fat_copy_out(
        &sticks.ovl,
        part_start(&sticks.ovl),
        "/LiveOS/squashfs.img",
        &squashfs,
    );
    let note = sticks.at("note.txt");
    std::fs::write(&note, "merged\n").unwrap();
    debugfs_w(
        &overlay,
        &format!("write {} overlayfs/note.txt\n", s(&note)),
    );
    let plan = valid(
        &[
            "overlay",
            "merge",
            s(&overlay),
            "--dry-run",
            "--workdir",
            work,
        ],
        "overlay-merge-plan",
    );
    assert_eq!(plan["nothing_to_merge"], false, "{plan}");
    assert!(plan["stick"].is_null(), "{plan}");
    let done = valid(
        &["overlay", "merge", s(&overlay), "--yes", "--workdir", work],
        "overlay-merge",
    );
    assert_eq!(done["exceptions_applied"], 1, "{done}");
    assert_eq!(done["overlayfs"]["created"], 1, "{done}");

    // On the stick: the same change put back into its overlay, merged in place
    // (the new squashfs.img swapped in through the FAT).
    let stick = sticks.copy(&sticks.ovl, "merged.img");
    let status = valid(&["overlay", "status", s(&stick)], "overlay-status");
    let fat_path = status["expected_overlay"].as_str().expect("overlay name");
    let changed = sticks.at("changed.ovl");
    fat_copy_out(&stick, part_start(&stick), fat_path, &changed);
    debugfs_w(
        &changed,
        &format!("write {} overlayfs/note.txt\n", s(&note)),
    );
    fat_put(&stick, part_start(&stick), &changed, fat_path);
    let plan = valid(
        &[
            "overlay",
            "merge",
            s(&stick),
            "--dry-run",
            "--workdir",
            work,
        ],
        "overlay-merge-plan",
    );
    assert_eq!(plan["target"], s(&stick), "{plan}");
    assert_eq!(plan["stick"]["partition_start_bytes"], 1u64 << 20, "{plan}");
    let done = valid(
        &["overlay", "merge", s(&stick), "--yes", "--workdir", work],
        "overlay-merge",
    );
    assert!(done["swap"]["single_sector"].is_boolean(), "{done}");
    assert_eq!(done["overlay_reset"], true, "{done}");

    // `--origin`: a dm-snapshot overlay into a bare root image, also when it is empty.
    let dm = sticks.bare_overlay(&sticks.dm, "dm.ovl");
    let origin = sticks.at("origin.img");
    std::fs::write(&origin, vec![0u8; 16 << 20]).unwrap();
    let doc = valid(
        &[
            "overlay",
            "merge",
            s(&dm),
            "--origin",
            s(&origin),
            "--dry-run",
        ],
        "overlay-merge-origin",
    );
    assert_eq!(doc["exceptions"], 0, "{doc}");
    assert_eq!(doc["target"], s(&dm), "{doc}");
}

#[test]
fn home_documents_follow_their_schemas_plain_and_luks() {
    let sticks = Sticks::new();
    let work = sticks.work();
    let pass = s(&sticks.pass);
    let plain = valid(&["home", "info", s(&sticks.dm)], "home-info");
    assert_eq!(plain["path"], "/LiveOS/home.img", "{plain}");
    assert_eq!(plain["size_bytes"], 16u64 << 20, "{plain}");
    assert!(plain["luks"].is_null(), "{plain}");
    let locked = valid(&["home", "info", s(&sticks.luks)], "home-info");
    assert_eq!(locked["locked"], true, "{locked}");
    assert!(locked["fs"].is_null(), "{locked}");
    let open = valid(
        &["home", "info", s(&sticks.luks), "--passphrase-file", pass],
        "home-info",
    );
    assert_eq!(open["luks"]["opened_keyslot"], "0", "{open}");
    assert!(open["fs"]["block_bytes"].as_u64().unwrap() > 0, "{open}");

    let bare = sticks.at("home.img");
    fat_copy_out(
        &sticks.dm,
        part_start(&sticks.dm),
        "/LiveOS/home.img",
        &bare,
    );
    let doc = valid(&["home", "info", s(&bare)], "home-info");
    assert!(
        doc["path"].is_null() && doc["stick_free_bytes"].is_null(),
        "{doc}"
    );

    let plan = valid(
        &[
            "home",
            "resize",
            s(&sticks.dm),
            "--size-mb",
            "24",
            "--dry-run",
            "--workdir",
            work,
        ],
        "home-resize",
    );
    assert!(plan["result"].is_null(), "{plan}");
    assert_eq!(plan["target"], s(&sticks.dm), "{plan}");
    let same = valid(
        &[
            "home",
            "resize",
            s(&sticks.dm),
            "--size-mb",
            "16",
            "--workdir",
            work,
        ],
        "home-resize",
    );
    assert_eq!(same["plan"]["unchanged"], true, "{same}");
    let stick = sticks.copy(&sticks.dm, "resized.img");
    let grown = valid(
        &[
            "home",
            "resize",
            s(&stick),
            "--size-mb",
            "24",
            "--yes",
            "--workdir",
            work,
        ],
        "home-resize",
    );
    assert_eq!(grown["result"]["size_bytes"], 24u64 << 20, "{grown}");
    valid(
        &[
            "home",
            "resize",
            s(&bare),
            "--size-mb",
            "20",
            "--yes",
            "--workdir",
            work,
        ],
        "home-resize",
    );
    let luks = sticks.copy(&sticks.luks, "luks-resized.img");
    let grown = valid(
        &[
            "home",
            "resize",
            s(&luks),
            "--size-mb",
            "40",
            "--passphrase-file",
            pass,
            "--yes",
            "--workdir",
            work,
        ],
        "home-resize",
    );
    assert_eq!(grown["result"]["encrypted"], true, "{grown}");
}

#[test]
fn maintenance_errors_follow_the_error_schema() {
    let dir = tmp();
    let missing = dir.path().join("no-such-stick.img");
    let m = s(&missing);
    for args in [
        vec!["inspect", m],
        vec!["overlay", "status", m],
        vec!["overlay", "reset", m, "--dry-run"],
        vec!["overlay", "grow", m, "--add-mb", "1"],
        vec!["overlay", "recover", m],
        vec!["overlay", "merge", m, "--dry-run"],
        vec!["home", "info", m],
        vec!["home", "resize", m, "--size-mb", "64"],
    ] {
        let doc = error_of(&args, Some(2));
        assert_eq!(doc["kind"], "bad-input", "{args:?}: {doc}");
    }
    // A damaged dm-snapshot store: a header whose chunk size is not a power of two.
    let damaged = dir.path().join("damaged.ovl");
    let mut store = vec![0u8; 8 << 20];
    for (i, word) in [0x7041_6e53u32, 1, 1, 3].iter().enumerate() {
        store[i * 4..i * 4 + 4].copy_from_slice(&word.to_le_bytes());
    }
    std::fs::write(&damaged, &store).unwrap();
    for args in [
        vec!["overlay", "status", s(&damaged)],
        vec!["overlay", "grow", s(&damaged), "--add-mb", "1"],
    ] {
        let doc = error_of(&args, Some(2));
        assert!(
            doc["causes"].to_string().contains("chunk size"),
            "{args:?}: {doc}"
        );
    }
    // Bad options: clap's usage errors carry the same document.
    for args in [
        vec!["overlay", "status", m, "--bogus"],
        vec!["home", "resize", m],
        vec!["devices", "--bogus"],
        vec!["doctor", "--bogus"],
    ] {
        let doc = error_of(&args, None);
        assert_eq!(doc["kind"], "usage", "{args:?}: {doc}");
    }
}

/// Every schema of this part, so that a new field or a renamed one must be written
/// into its schema (and so into docs/json-maintenance.md) before a test passes.
const MAINTENANCE_SCHEMAS: [&str; 13] = [
    "inspect",
    "inspect-raw",
    "devices",
    "doctor",
    "overlay-status",
    "overlay-reset",
    "overlay-grow",
    "overlay-recover",
    "overlay-merge-plan",
    "overlay-merge",
    "overlay-merge-origin",
    "home-info",
    "home-resize",
];

/// The objects of `schema` that let through a field they do not list, or list a
/// field as optional, by their place in the schema.
fn open_objects(schema: &Value, at: &str, found: &mut Vec<String>) {
    match schema {
        Value::Object(map) => {
            if let Some(Value::Object(properties)) = map.get("properties") {
                if map.get("additionalProperties") != Some(&Value::Bool(false)) {
                    found.push(format!("{at}: additionalProperties is not false"));
                }
                let required: Vec<&str> = map
                    .get("required")
                    .and_then(Value::as_array)
                    .map(|r| r.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                for key in properties.keys() {
                    if !required.contains(&key.as_str()) {
                        found.push(format!("{at}: {key} is not required"));
                    }
                }
            }
            for (key, sub) in map {
                open_objects(sub, &format!("{at}/{key}"), found);
            }
        }
        Value::Array(items) => {
            for (i, sub) in items.iter().enumerate() {
                open_objects(sub, &format!("{at}/{i}"), found);
            }
        }
        _ => {}
    }
}

#[test]
fn every_maintenance_schema_is_closed_and_requires_every_field() {
    for name in MAINTENANCE_SCHEMAS {
        let path = super::support::repo()
            .join("schemas")
            .join(format!("{name}.schema.json"));
        let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // Compiles, or names the file.
        super::support::schema::validator(name);
        assert_eq!(
            schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{name}"
        );
        // One shape, or one per overlay kind (`oneOf`): each says `schema: 1`.
        let shapes = match schema["oneOf"].as_array() {
            Some(kinds) => kinds.iter().collect(),
            None => vec![&schema],
        };
        for shape in shapes {
            assert_eq!(shape["properties"]["schema"]["const"], 1, "{name}");
        }
        let mut open = Vec::new();
        open_objects(&schema, name, &mut open);
        assert!(open.is_empty(), "{}", open.join("\n"));
        let docs = std::fs::read_to_string(super::support::repo().join("docs/json-maintenance.md"))
            .unwrap();
        assert!(
            docs.contains(&format!("`{name}`")),
            "docs/json-maintenance.md does not name {name}"
        );
    }
}
