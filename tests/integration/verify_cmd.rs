//! `livestick verify` and the stick manifest `LiveOS/livestick.json`: the manifest is
//! read with mtools and its hashes checked against `sha256sum` of the files mtools
//! copies out; damage is made with mtools and by flipping a byte found by content.

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::support::*;

const MANIFEST: &str = "LiveOS/livestick.json";

struct Stick {
    dir: tempfile::TempDir,
    image: PathBuf,
    part: u64,
}

impl Stick {
    fn s(&self) -> &str {
        self.image.to_str().unwrap()
    }

    /// Replaces the stick's manifest with `m`, through mtools.
    fn put_manifest(&self, m: &serde_json::Value) {
        let edited = self.dir.path().join("livestick.json");
        std::fs::write(&edited, serde_json::to_vec_pretty(m).unwrap()).unwrap();
        fat_put(&self.image, self.part, &edited, MANIFEST);
    }

    fn manifest(&self) -> serde_json::Value {
        serde_json::from_slice(&fat_read(&self.image, self.part, MANIFEST))
            .expect("the manifest is JSON")
    }
}

fn written(iso: &str, extra: &[&str]) -> Stick {
    let dir = tmp();
    let image = dir.path().join("stick.img");
    let iso = synthetic_iso(iso);
    let mut args = vec![
        "write",
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--size",
        "256M",
        "--yes",
        "--quiet",
    ];
    args.extend_from_slice(extra);
    ok(&livestick(&args));
    let part = part_start(&image);
    Stick { dir, image, part }
}

fn verify_json(args: &[&str]) -> (Output, serde_json::Value) {
    let out = livestick(&[&["--json", "verify"][..], args].concat());
    let value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "exactly one JSON object on stdout ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, value)
}

/// Where `needle` (a block of a file, unique in the image) sits in `image`.
fn offset_of(image: &Path, needle: &[u8]) -> u64 {
    let bytes = std::fs::read(image).unwrap();
    let found: Vec<usize> = bytes
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .take(2)
        .collect();
    assert_eq!(found.len(), 1, "the block is in the image once");
    found[0] as u64
}

fn flip_byte(image: &Path, at: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap();
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&[b[0] ^ 0x5a]).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn the_manifest_lists_every_written_file_with_the_sha256_of_its_bytes() {
    let t = written(
        "fedora-classic.iso",
        &[
            "--overlay-size-mb",
            "32",
            "--home-size-mb",
            "32",
            "--unencrypted-home",
            "--volume-id",
            "1234ABCD",
        ],
    );
    let m = t.manifest();
    assert_eq!(m["schema"], 1);
    let image = &m["images"][0];
    assert_eq!(image["live_dir"], "LiveOS");
    assert_eq!(image["source"]["name"], "fedora-classic.iso");
    let iso_len = std::fs::metadata(synthetic_iso("fedora-classic.iso"))
        .unwrap()
        .len();
    assert_eq!(image["source"]["size"], iso_len);
    assert!(
        image["source"]["implanted_md5"]
            .as_str()
            .is_some_and(|s| s.len() == 32),
        "{image:#}"
    );
    let table = sfdisk(&t.image);
    assert_eq!(m["layout"]["table"], "mbr");
    assert_eq!(m["layout"]["partition_start"], t.part);
    assert_eq!(
        m["layout"]["partition_len"].as_u64().unwrap(),
        table["partitiontable"]["partitions"][0]["size"]
            .as_u64()
            .unwrap()
            * 512
    );
    assert_eq!(m["layout"]["fs_uuid"], "1234-ABCD");
    assert_eq!(m["layout"]["fs_label"], "LIVE");

    let files = m["files"].as_array().unwrap();
    let paths: Vec<&str> = files.iter().map(|f| f["path"].as_str().unwrap()).collect();
    for expected in [
        "/LiveOS/squashfs.img",
        "/syslinux/syslinux.cfg",
        "/EFI/BOOT/grub.cfg",
        "/isolinux/vmlinuz",
    ] {
        assert!(paths.contains(&expected), "{expected} in {paths:?}");
    }
    for never in [
        "/LiveOS/livestick.json",
        "/LiveOS/.livestick",
        "/LiveOS/home.img",
    ] {
        assert!(!paths.contains(&never), "{never} is not a listed file");
    }
    // Each hash is of the bytes on the stick, as mtools reads them.
    let scratch = t.dir.path().join("out");
    for f in files {
        let path = f["path"].as_str().unwrap();
        fat_copy_out(&t.image, t.part, path, &scratch);
        assert_eq!(
            f["sha256"].as_str().unwrap(),
            sha256_file(&scratch),
            "{path}"
        );
        assert_eq!(
            f["size"].as_u64().unwrap(),
            std::fs::metadata(&scratch).unwrap().len()
        );
        std::fs::remove_file(&scratch).unwrap();
    }
    let configs: Vec<&str> = files
        .iter()
        .filter(|f| f["kind"] == "config")
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(configs.contains(&"/EFI/BOOT/grub.cfg"), "{configs:?}");
    let persistence = m["persistence"].as_array().unwrap();
    let kinds: Vec<(&str, u64)> = persistence
        .iter()
        .map(|p| (p["kind"].as_str().unwrap(), p["size"].as_u64().unwrap()))
        .collect();
    assert_eq!(kinds, [("overlay", 32 << 20), ("home", 32 << 20)]);
    assert!(
        persistence.iter().all(|p| p.get("sha256").is_none()),
        "persistence is never hashed"
    );
    fsck_fat(&t.image, t.part, 255 << 20, t.dir.path());
}

#[test]
fn a_fresh_stick_verifies_intact_with_its_persistence_and_its_iso() {
    let t = written(
        "fedora-classic.iso",
        &[
            "--overlay-size-mb",
            "32",
            "--home-size-mb",
            "32",
            "--unencrypted-home",
        ],
    );
    let iso = synthetic_iso("fedora-classic.iso");
    let (out, r) = verify_json(&[t.s(), "--deep", "--iso", iso.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{r:#}");
    assert_eq!(r["overall"], "intact");
    assert_eq!(r["exit_code"], 0);
    assert_eq!(r["changed"], 0);
    assert_eq!(r["missing"], 0);
    assert_eq!(
        r["intact"].as_u64().unwrap(),
        t.manifest()["files"].as_array().unwrap().len() as u64
    );
    let persistence = r["persistence"].as_array().unwrap();
    let home = persistence.iter().find(|p| p["kind"] == "home").unwrap();
    assert_eq!(home["deep"]["clean"], true, "{home:#}");
    assert!(home["status"].as_str().unwrap().contains("plain ext4"));
    let overlay = persistence.iter().find(|p| p["kind"] == "overlay").unwrap();
    assert!(
        overlay["status"]
            .as_str()
            .unwrap()
            .contains("dm-snapshot overlay: uninitialised"),
        "{overlay:#}"
    );
    assert_eq!(r["iso"]["same_as_recorded"], true, "{:#}", r["iso"]);
    assert_eq!(r["iso"]["implanted_md5_ok"], true);
    assert!(r["iso"]["files_matching"].as_u64().unwrap() >= 4);
    assert_eq!(r["iso"]["files_differing"].as_array().unwrap().len(), 0);

    // Another ISO is not the recorded one: exit 4, and the report says why.
    let other = synthetic_iso("fedora-grub.iso");
    let (out, r) = verify_json(&[t.s(), "--iso", other.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(r["iso"]["same_as_recorded"], false);
    assert!(r["iso"]["why"].as_str().unwrap().contains("bytes"), "{r:#}");

    // The human report names every file and the verdict.
    let out = livestick(&["verify", t.s()]);
    let text = ok(&out);
    assert!(text.contains("intact   /LiveOS/squashfs.img"), "{text}");
    assert!(text.contains("intact: "), "{text}");
}

#[test]
fn a_changed_byte_in_squashfs_img_is_found_and_exits_4() {
    let t = written("fedora-classic.iso", &[]);
    let squashfs = fat_read(&t.image, t.part, "LiveOS/squashfs.img");
    // A block from the middle of the image: its place on the stick, found by content.
    let at = squashfs.len() / 2 / 4096 * 4096;
    let block = &squashfs[at..at + 4096];
    let on_stick = offset_of(&t.image, block);
    flip_byte(&t.image, on_stick + 100);
    let (out, r) = verify_json(&[t.s()]);
    assert_eq!(out.status.code(), Some(4), "{r:#}");
    assert_eq!(r["overall"], "damaged");
    assert_eq!(r["exit_code"], 4);
    assert_eq!(r["changed"], 1);
    let sq = listed_entry(&r, "/LiveOS/squashfs.img");
    assert_eq!(sq["state"], "changed");
    assert_ne!(sq["sha256"], sq["recorded_sha256"]);
    assert_eq!(
        listed_entry(&r, "/EFI/BOOT/grub.cfg")["state"],
        "intact",
        "only the damaged file is named"
    );
    let out = livestick(&["verify", t.s()]);
    assert_eq!(out.status.code(), Some(4));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("CHANGED  /LiveOS/squashfs.img"), "{text}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("1 file changed"), "{err}");
    assert!(err.contains("hint: "), "{err}");
}

#[test]
fn a_truncated_file_and_a_deleted_one_are_changed_and_missing() {
    let t = written("fedora-classic.iso", &[]);
    let scratch = t.dir.path().join("vmlinuz");
    fat_copy_out(&t.image, t.part, "isolinux/vmlinuz", &scratch);
    let len = std::fs::metadata(&scratch).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&scratch)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    fat_put(&t.image, t.part, &scratch, "isolinux/vmlinuz");
    let mdel = std::process::Command::new(tool("mdel"))
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{}", t.image.display(), t.part))
        .arg("::syslinux/menu.c32")
        .output()
        .unwrap();
    assert!(mdel.status.success());
    let (out, r) = verify_json(&[t.s()]);
    assert_eq!(out.status.code(), Some(4));
    let truncated = listed_entry(&r, "/isolinux/vmlinuz");
    assert_eq!(truncated["state"], "changed");
    assert_eq!(truncated["size_bytes"], len / 2);
    assert_eq!(truncated["recorded_size_bytes"], len);
    assert!(
        truncated["detail"].as_str().unwrap().contains("truncated"),
        "{truncated:#}"
    );
    assert_eq!(listed_entry(&r, "/syslinux/menu.c32")["state"], "missing");
    assert_eq!(
        (r["changed"].as_u64(), r["missing"].as_u64()),
        (Some(1), Some(1))
    );
}

#[test]
fn a_persistence_file_cut_short_or_deleted_is_a_problem() {
    let t = written(
        "fedora-classic.iso",
        &[
            "--overlay-size-mb",
            "32",
            "--home-size-mb",
            "16",
            "--unencrypted-home",
        ],
    );
    let home = t.dir.path().join("home.img");
    fat_copy_out(&t.image, t.part, "LiveOS/home.img", &home);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&home)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    fat_put(&t.image, t.part, &home, "LiveOS/home.img");
    let (out, r) = verify_json(&[t.s()]);
    assert_eq!(out.status.code(), Some(4), "{r:#}");
    let cut = persistence_of(&r, "home");
    assert_eq!(cut["ok"], false, "{cut:#}");
    assert_eq!(cut["recorded_size_bytes"], 16 << 20);
    assert!(
        cut["status"].as_str().unwrap().contains("cut short"),
        "{cut:#}"
    );

    let overlay = persistence_of(&r, "overlay")["path"]
        .as_str()
        .unwrap()
        .to_string();
    let mdel = std::process::Command::new(tool("mdel"))
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{}", t.image.display(), t.part))
        .arg(format!("::{overlay}"))
        .output()
        .unwrap();
    assert!(mdel.status.success(), "{mdel:?}");
    let (out, r) = verify_json(&[t.s()]);
    assert_eq!(out.status.code(), Some(4), "{r:#}");
    let gone = persistence_of(&r, "overlay");
    assert_eq!(gone["ok"], false, "{gone:#}");
    assert!(
        gone["status"].as_str().unwrap().contains("missing"),
        "{gone:#}"
    );
}

/// Marks the FAT32 volume at `part` not cleanly closed (the boot sector's status
/// byte) and leaves one lost cluster (allocated, no file), as a stick pulled while
/// mounted can be.
fn leave_dirty_with_a_lost_cluster(image: &Path, part: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap();
    let mut boot = [0u8; 512];
    f.seek(SeekFrom::Start(part)).unwrap();
    f.read_exact(&mut boot).unwrap();
    let bps = u64::from(u16::from_le_bytes([boot[11], boot[12]]));
    let reserved = u64::from(u16::from_le_bytes([boot[14], boot[15]]));
    let fats = u64::from(boot[16]);
    let fat_bytes = u64::from(u32::from_le_bytes(boot[36..40].try_into().unwrap())) * bps;
    let fat = part + reserved * bps;
    let mut table = vec![0u8; fat_bytes as usize];
    f.seek(SeekFrom::Start(fat)).unwrap();
    f.read_exact(&mut table).unwrap();
    // A free cluster well inside the volume.
    let free = (table.len() / 8..table.len() / 4)
        .step_by(4)
        .find(|&at| table[at..at + 4] == [0, 0, 0, 0])
        .expect("a free cluster") as u64;
    for copy in 0..fats {
        f.seek(SeekFrom::Start(fat + copy * fat_bytes + free))
            .unwrap();
        f.write_all(&0x0fff_ffffu32.to_le_bytes()).unwrap();
    }
    f.seek(SeekFrom::Start(part + 0x41)).unwrap();
    f.write_all(&[boot[0x41] | 1]).unwrap();
}

#[test]
fn verify_writes_nothing_to_a_stick_that_is_only_dirty() {
    for with_manifest in [true, false] {
        let t = written("fedora-classic.iso", &[]);
        if !with_manifest {
            let mdel = std::process::Command::new(tool("mdel"))
                .env("MTOOLS_SKIP_CHECK", "1")
                .arg("-i")
                .arg(format!("{}@@{}", t.image.display(), t.part))
                .arg(format!("::{MANIFEST}"))
                .output()
                .unwrap();
            assert!(mdel.status.success(), "{mdel:?}");
        }
        leave_dirty_with_a_lost_cluster(&t.image, t.part);
        let before = std::fs::read(&t.image).unwrap();
        let out = livestick(&["verify", t.s()]);
        let expected = if with_manifest { 0 } else { 2 };
        assert_eq!(out.status.code(), Some(expected), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("repaired"), "{stderr}");
        assert!(
            std::fs::read(&t.image).unwrap() == before,
            "verify changed the stick (manifest: {with_manifest})"
        );
    }
}

#[test]
fn a_stick_without_a_manifest_is_bad_input_with_a_clear_message() {
    // Written by livestick, manifest removed (an older livestick wrote none).
    let t = written("fedora-classic.iso", &[]);
    let out = std::process::Command::new(tool("mdel"))
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{}", t.image.display(), t.part))
        .arg(format!("::{MANIFEST}"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = livestick(&["verify", t.s()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has no livestick manifest"), "{err}");
    assert!(err.contains("older livestick or by another tool"), "{err}");

    // A stick another tool made: sfdisk + mkfs.fat, some files.
    if !need("mkfs.fat") {
        return;
    }
    let other = t.dir.path().join("other.img");
    std::fs::File::create(&other)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let sfdisk = std::process::Command::new(tool("sfdisk"))
        .arg(&other)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(b"label: dos\nstart=2048, type=c\n")?;
            child.wait()
        })
        .unwrap();
    assert!(sfdisk.success());
    sh(
        "mkfs.fat",
        &[
            "-F",
            "32",
            "--offset",
            "2048",
            other.to_str().unwrap(),
            &format!("{}", (64 << 20) / 1024 - 1024),
        ],
    );
    let out = livestick(&["--json", "verify", other.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(e["kind"], "bad-input");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("no livestick manifest")
    );

    // A damaged manifest is bad input too, and says so.
    let garbage = t.dir.path().join("livestick.json");
    std::fs::write(&garbage, b"{\"schema\": 1, \"files\": [").unwrap();
    fat_put(&t.image, t.part, &garbage, MANIFEST);
    let out = livestick(&["verify", t.s()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be read"));

    // A manifest emptied of its files or images would check nothing: damaged too.
    let t = written("fedora-classic.iso", &[]);
    for emptied in ["files", "images"] {
        let mut m = t.manifest();
        m[emptied] = serde_json::json!([]);
        t.put_manifest(&m);
        let out = livestick(&["verify", t.s()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{emptied}: {err}");
        assert!(
            err.contains("cannot be read") || err.contains("damaged"),
            "{err}"
        );
        assert!(
            err.contains("root image") || err.contains("no image"),
            "{err}"
        );
    }
    // A file or persistence record listed twice would be checked and counted twice.
    for list in ["files", "persistence"] {
        let t = written(
            "fedora-classic.iso",
            &["--home-size-mb", "16", "--unencrypted-home"],
        );
        let mut m = t.manifest();
        let first = m[list][0].clone();
        m[list].as_array_mut().unwrap().push(first.clone());
        t.put_manifest(&m);
        let out = livestick(&["verify", t.s()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{list}: {err}");
        assert!(
            err.contains(&format!("lists {} twice", first["path"].as_str().unwrap())),
            "{err}"
        );
    }
}

#[test]
fn rewrites_keep_the_manifest_true_and_never_delete_it() {
    let t = written(
        "fedora-classic.iso",
        &[
            "--overlay-size-mb",
            "16",
            "--home-size-mb",
            "16",
            "--unencrypted-home",
        ],
    );
    let first = t.manifest();
    let iso = synthetic_iso("fedora-classic.iso");
    // Re-provisioning in place (no new table): the old home stays.
    ok(&livestick(&[
        "write",
        iso.to_str().unwrap(),
        t.s(),
        "--yes",
        "--quiet",
    ]));
    let second = t.manifest();
    assert_ne!(first["updated_at"], serde_json::Value::Null);
    let (out, r) = verify_json(&[t.s()]);
    assert_eq!(out.status.code(), Some(0), "{r:#}");
    assert!(
        second["persistence"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["kind"] == "home" && p["size"] == 16 << 20),
        "the kept home is listed: {second:#}"
    );
    // --skipcopy rewrites only the configs; the root image's entry is kept.
    ok(&livestick(&[
        "write",
        iso.to_str().unwrap(),
        t.s(),
        "--skipcopy",
        "--yes",
        "--quiet",
    ]));
    let third = t.manifest();
    let sq = |m: &serde_json::Value| listed(m, "/LiveOS/squashfs.img");
    assert_eq!(sq(&third), sq(&first), "{third:#}");
    let (out, r) = verify_json(&[t.s()]);
    assert_eq!(out.status.code(), Some(0), "{r:#}");

    // A stick used as the source: its manifest is not copied as a live file.
    let copy = t.dir.path().join("copy.img");
    ok(&livestick(&[
        "write",
        t.s(),
        copy.to_str().unwrap(),
        "--size",
        "256M",
        "--yes",
        "--quiet",
    ]));
    let copied: serde_json::Value =
        serde_json::from_slice(&fat_read(&copy, part_start(&copy), MANIFEST)).unwrap();
    assert_eq!(copied["images"][0]["source"]["name"], "stick.img");
    assert!(
        copied["files"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["path"] != "/LiveOS/livestick.json"),
        "{copied:#}"
    );
    let (out, r) = verify_json(&[copy.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{r:#}");
}

#[test]
fn a_multi_image_stick_lists_both_images() {
    let t = written("fedora-classic.iso", &[]);
    let second = synthetic_iso("fedora-grub.iso");
    ok(&livestick(&[
        "write",
        second.to_str().unwrap(),
        t.s(),
        "--multi",
        "--livedir",
        "F2",
        "--yes",
        "--quiet",
    ]));
    let m = t.manifest();
    let dirs: Vec<&str> = m["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["live_dir"].as_str().unwrap())
        .collect();
    assert_eq!(dirs, ["LiveOS", "F2"], "{m:#}");
    let paths: Vec<&str> = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(paths.contains(&"/LiveOS/squashfs.img"), "{paths:?}");
    assert!(paths.contains(&"/F2/squashfs.img"), "{paths:?}");
    let (out, r) = verify_json(&[t.s()]);
    assert_eq!(out.status.code(), Some(0), "{r:#}");
    // Each ISO against its own image: the first image's boot files at the root
    // are not compared with the second ISO, and match the first.
    let first = synthetic_iso("fedora-classic.iso");
    for iso in [&second, &first] {
        let (out, r) = verify_json(&[t.s(), "--iso", iso.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{}: {r:#}", iso.display());
        assert_eq!(r["iso"]["files_differing"], serde_json::json!([]), "{r:#}");
    }
}

#[test]
fn verify_reads_a_loop_device_with_the_page_cache_dropped() {
    if !require(is_root(), "root (loop devices)") {
        return;
    }
    let t = written("fedora-classic.iso", &[]);
    let Some(dev) = loop_device(&[], &t.image) else {
        return;
    };
    let (out, r) = verify_json(&[&dev.0]);
    assert_eq!(out.status.code(), Some(0), "{r:#}");
    // Damage under the device, behind the page cache: the bytes come from the medium.
    let sq = fat_read(&t.image, t.part, "LiveOS/squashfs.img");
    let at = offset_of(&t.image, &sq[8192..8192 + 4096]);
    // Read through the device first so the old bytes are cached.
    let _ = std::fs::read(&dev.0);
    flip_byte(&t.image, at + 7);
    let (out, r) = verify_json(&[&dev.0]);
    assert_eq!(out.status.code(), Some(4), "{r:#}");
    assert_eq!(listed_entry(&r, "/LiveOS/squashfs.img")["state"], "changed");
}

fn home_record(manifest: &serde_json::Value) -> serde_json::Value {
    persistence_of(manifest, "home")
}

/// The `persistence` entry of `kind` in a manifest or a verify report.
fn persistence_of(doc: &serde_json::Value, kind: &str) -> serde_json::Value {
    doc["persistence"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["kind"] == kind)
        .cloned()
        .unwrap_or_else(|| panic!("no {kind} in persistence: {doc:#}"))
}

/// Issue 15 part 5: `home resize` keeps the manifest true: the home's recorded size
/// is the new one, and `verify` finds the stick intact with it (mtools reads the
/// manifest and the home's size independently).
#[test]
fn home_resize_records_the_new_size_and_verify_stays_intact() {
    let t = written(
        "fedora-classic.iso",
        &["--home-size-mb", "16", "--unencrypted-home"],
    );
    assert_eq!(home_record(&t.manifest())["size"], 16 << 20);
    let before = t.manifest()["updated_at"].clone();
    // The manifest's time has whole seconds: the rewrite must fall in a later one.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    ok(&livestick(&[
        "home",
        "resize",
        t.s(),
        "--size-mb",
        "40",
        "--workdir",
        t.dir.path().to_str().unwrap(),
    ]));
    let manifest = t.manifest();
    assert_eq!(home_record(&manifest)["size"], 40 << 20, "{manifest:#}");
    assert!(
        fat_ls(&t.image, t.part, "/LiveOS").contains("home.img"),
        "the home is still there"
    );
    assert_ne!(manifest["updated_at"], before);
    let (out, r) = verify_json(&[t.s(), "--deep"]);
    assert_eq!(out.status.code(), Some(0), "{r:#}");
    let home = persistence_of(&r, "home");
    assert_eq!(home["size_bytes"], 40 << 20, "{home:#}");
    assert_eq!(home["recorded_size_bytes"], 40 << 20, "{home:#}");
    assert_eq!(home["deep"]["clean"], true, "{home:#}");
    // The rewrite went through a staged copy, which is gone.
    let ls = fat_ls(&t.image, t.part, "/LiveOS").to_lowercase();
    assert!(!ls.contains("livestick.json.new"), "{ls}");
}

/// `overlay merge` swaps the stick's manifest in with the new root image (issue 15):
/// the manifest naming the new image is staged before the image's swap, under an
/// intent (`LiveOS/.livestick-follow`). Stopped with both staged
/// (`LIVESTICK_FAILPOINT=manifest-staged`), after the image's swap and before the
/// manifest's (`root-swapped`), or inside a two-sector swap (`swap-half`), the next
/// `verify` repairs the stick first (rolling back or finishing) and reports it
/// intact, with the manifest recording the root image the stick now holds and no
/// leftover names; a later rewrite (`home resize`) still works. An uninterrupted
/// merge records the new root image and verifies intact.
#[test]
fn a_merge_stopped_while_rewriting_the_manifest_leaves_a_readable_one() {
    if !require(
        ["debugfs", "unsquashfs", "mksquashfs", "mcopy"]
            .iter()
            .all(|t| have(t)),
        "e2fsprogs, squashfs-tools, mtools",
    ) {
        return;
    }
    let iso = crate::support::fixtures::boot_iso("boot-flat");
    let dir = tmp();
    let image = dir.path().join("stick.img");
    ok(&livestick(&[
        "write",
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--size",
        "256M",
        "--overlay-size-mb",
        "32",
        "--overlayfs",
        "--home-size-mb",
        "16",
        "--unencrypted-home",
        "--yes",
        "--quiet",
    ]));
    let t = Stick {
        part: part_start(&image),
        image,
        dir,
    };
    let work = t.dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    // "A boot": one new file in the OverlayFS upper dir, written with debugfs.
    let boot = |name: &str| {
        let mut s = livestick::disk::stick::Stick::open(&t.image, false).unwrap();
        let overlay = s.info("LiveOS").unwrap().expected_overlay.clone();
        let ext = s.file_extents(&overlay).unwrap();
        let payload = t.dir.path().join(name);
        std::fs::write(&payload, format!("{name}\n")).unwrap();
        debugfs_w(
            &format!("{}?offset={}", t.image.display(), ext[0].0),
            &format!(
                "mkdir /overlayfs/{name}\nwrite {} /overlayfs/{name}/{name}\n",
                payload.display()
            ),
        );
    };
    let merge = |failpoint: Option<&str>| {
        let mut cmd = std::process::Command::new(bin());
        cmd.args(["overlay", "merge", t.s(), "--yes", "--workdir"])
            .arg(&work);
        if let Some(step) = failpoint {
            cmd.env("LIVESTICK_FAILPOINT", step);
        }
        cmd.output().unwrap()
    };
    let sq_sha = || {
        crate::support::dm_snapshot::sha256_hex(&fat_read(&t.image, t.part, "LiveOS/squashfs.img"))
    };
    let sq_record = |m: &serde_json::Value| listed_entry(m, "/LiveOS/squashfs.img");

    let leftovers = || {
        let ls = fat_ls(&t.image, t.part, "/LiveOS").to_lowercase();
        // A staged root image of a stopped merge is the next merge's to remove.
        assert!(
            !ls.contains("livestick.json.new") && !ls.contains(".livestick-follow"),
            "leftovers after the repair: {ls}"
        );
    };
    for (round, step) in ["manifest-staged", "root-swapped", "swap-half"]
        .into_iter()
        .enumerate()
    {
        boot(&format!("stopped-{round}"));
        let root_before = sq_sha();
        let out = merge(Some(step));
        let err = String::from_utf8_lossy(&out.stderr);
        if step == "swap-half" && out.status.success() {
            // Both swaps fitted in one directory sector each: nothing to stop.
            assert!(!err.contains("failpoint"), "{err}");
        } else {
            assert_ne!(out.status.code(), Some(0), "{step}: {err}");
            assert!(err.contains(step), "{step}: {err}");
        }
        let root_now = sq_sha();
        if step == "manifest-staged" {
            assert_eq!(root_now, root_before, "nothing was swapped");
        } else {
            assert_ne!(root_now, root_before, "{step}: the new image is in place");
        }
        let out = livestick(&["--json", "verify", t.s()]);
        let err = String::from_utf8_lossy(&out.stderr);
        let r: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{step}: verify JSON ({e}): {err}"));
        assert_eq!(out.status.code(), Some(0), "{step}: {r:#}\n{err}");
        assert_eq!(listed_entry(&r, "/LiveOS/squashfs.img")["state"], "intact");
        let expected_line = match step {
            "manifest-staged" => "rolled back",
            "root-swapped" => "completed",
            _ => "",
        };
        assert!(err.contains(expected_line), "{step}: {err}");
        assert_eq!(sq_record(&t.manifest())["sha256"], sq_sha().as_str());
        leftovers();
        fsck_fat(&t.image, t.part, part_len(&t.image), t.dir.path());
    }

    // The next rewrite puts a new manifest in place and clears the leftover.
    ok(&livestick(&[
        "home",
        "resize",
        t.s(),
        "--size-mb",
        "24",
        "--workdir",
        work.to_str().unwrap(),
    ]));
    let ls = fat_ls(&t.image, t.part, "/LiveOS").to_lowercase();
    assert!(!ls.contains("livestick.json.new"), "{ls}");
    assert_eq!(home_record(&t.manifest())["size"], 24 << 20);

    // Uninterrupted: the merged root image is recorded, and the stick is intact.
    boot("second");
    let out = merge(None);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let record = sq_record(&t.manifest());
    assert_eq!(record["kind"], "merged", "{record:#}");
    assert_eq!(record["sha256"], sq_sha().as_str());
    let (out, r) = verify_json(&[t.s()]);
    assert_eq!(out.status.code(), Some(0), "{r:#}");
    let ls = fat_ls(&t.image, t.part, "/LiveOS").to_lowercase();
    assert!(!ls.contains(".new"), "{ls}");
    fsck_fat(&t.image, t.part, part_len(&t.image), t.dir.path());
}

/// Issue 15 part 5: `verify --deep --passphrase-file` unlocks a LUKS home written
/// by `write` with livestick's own reader and runs `e2fsck -fn` on the plaintext in
/// memory: clean on a fresh stick, damaged after the root inode is cleared inside
/// the container (debugfs on a decrypted copy, written back through the cipher).
/// Without a passphrase the home is reported, in text and JSON, as not checked and
/// why; a wrong one is bad input.
#[test]
fn verify_deep_unlocks_a_luks_home_with_a_passphrase_file() {
    let dir = tmp();
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "correct horse\n").unwrap();
    let t = written(
        "fedora-classic.iso",
        &[
            "--home-size-mb",
            "40",
            "--passphrase-file",
            pass.to_str().unwrap(),
        ],
    );
    let home_of = |r: &serde_json::Value| {
        r["persistence"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["kind"] == "home")
            .cloned()
            .unwrap_or_else(|| panic!("verify reports the home: {r:#}"))
    };

    // No passphrase: reported, not checked, and why.
    let (out, r) = verify_json(&[t.s(), "--deep"]);
    assert_eq!(out.status.code(), Some(0), "{r:#}");
    let home = home_of(&r);
    assert_eq!(home["deep"]["clean"], serde_json::Value::Null, "{home:#}");
    let why = home["deep"]["detail"].as_str().unwrap();
    assert!(
        why.starts_with("not checked") && why.contains("no passphrase"),
        "{why}"
    );
    let text = ok(&livestick(&["verify", t.s(), "--deep"]));
    assert!(
        text.contains("not checked: the home is encrypted"),
        "{text}"
    );

    // The passphrase: unlocked in memory and clean.
    let (out, r) = verify_json(&[t.s(), "--deep", "--passphrase-file", pass.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{r:#}");
    let home = home_of(&r);
    assert_eq!(home["deep"]["clean"], true, "{home:#}");
    assert!(
        home["deep"]["detail"]
            .as_str()
            .unwrap()
            .contains("e2fsck -fn: clean"),
        "{home:#}"
    );
    assert!(
        home["status"].as_str().unwrap().contains("unlocked"),
        "{home:#}"
    );

    // A wrong passphrase, and a passphrase without --deep: bad input.
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "battery staple\n").unwrap();
    let out = livestick(&[
        "verify",
        t.s(),
        "--deep",
        "--passphrase-file",
        wrong.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not unlock"), "{err}");
    let out = livestick(&["verify", t.s(), "--passphrase-file", pass.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // Damage inside the container: debugfs clears the root inode of a decrypted
    // copy, which is written back through livestick's LUKS writer.
    {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut s = livestick::disk::stick::Stick::open(&t.image, false).unwrap();
        let extents = s.file_extents("/LiveOS/home.img").unwrap();
        drop(s);
        assert_eq!(extents.len(), 1, "a fresh stick's home is one run");
        let (start, len) = extents[0];
        let mut disk = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&t.image)
            .unwrap();
        let window = livestick::io::PartitionWindow::new(&mut disk, start, len);
        let mut vol = livestick::persist::luks::open_luks2(window, b"correct horse").unwrap();
        let mut plain = Vec::new();
        vol.seek(SeekFrom::Start(0)).unwrap();
        vol.read_to_end(&mut plain).unwrap();
        let copy = dir.path().join("plain.img");
        std::fs::write(&copy, &plain).unwrap();
        debugfs_w(copy.to_str().unwrap(), "clri <2>\n");
        let damaged = std::fs::read(&copy).unwrap();
        assert_ne!(damaged, plain);
        vol.seek(SeekFrom::Start(0)).unwrap();
        vol.write_all(&damaged).unwrap();
        vol.flush().unwrap();
    }
    let (out, r) = verify_json(&[t.s(), "--deep", "--passphrase-file", pass.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4), "{r:#}");
    let home = home_of(&r);
    assert_eq!(home["deep"]["clean"], false, "{home:#}");
    assert_eq!(home["ok"], false, "{home:#}");
    assert!(
        home["deep"]["detail"]
            .as_str()
            .unwrap()
            .contains("e2fsck -fn found problems"),
        "{home:#}"
    );
}

/// `overlay grow` keeps the manifest true, for both kinds: the record names the new
/// size and `verify` shows the size it finds equal to the one recorded.
#[test]
fn overlay_grow_records_the_new_size_and_verify_agrees() {
    for (iso, extra) in [
        ("fedora-classic.iso", &[][..]),
        ("fedora-classic.iso", &["--overlayfs"][..]),
    ] {
        let mut args = vec!["--overlay-size-mb", "32"];
        args.extend_from_slice(extra);
        let t = written(iso, &args);
        assert_eq!(persistence_of(&t.manifest(), "overlay")["size"], 32 << 20);
        ok(&livestick(&[
            "overlay",
            "grow",
            t.s(),
            "--size-mb",
            "48",
            "--workdir",
            t.dir.path().to_str().unwrap(),
            "--yes",
        ]));
        assert_eq!(
            persistence_of(&t.manifest(), "overlay")["size"],
            48 << 20,
            "{extra:?}: {:#}",
            t.manifest()
        );
        let (out, r) = verify_json(&[t.s()]);
        assert_eq!(out.status.code(), Some(0), "{extra:?}: {r:#}");
        let overlay = persistence_of(&r, "overlay");
        assert_eq!(overlay["size_bytes"], 48 << 20, "{extra:?}: {overlay:#}");
        assert_eq!(
            overlay["recorded_size_bytes"],
            48 << 20,
            "{extra:?}: {overlay:#}"
        );
    }
}

#[test]
fn on_the_ext4_layout_verify_reads_the_root_image_inside_ext4_and_finds_a_flipped_byte() {
    let t = written(
        "fedora-classic.iso",
        &[
            "--ext4",
            "--overlay-size-mb",
            "32",
            "--home-size-mb",
            "32",
            "--unencrypted-home",
        ],
    );
    // The manifest stays on the FAT and lists the ext4 partition's root image.
    let m = t.manifest();
    let root = listed_entry(&m, "/LiveOS/squashfs.img");
    assert_eq!(root["filesystem"], "ext4", "{m:#}");
    let from_iso = t.dir.path().join("iso-squashfs.img");
    iso_extract(
        &synthetic_iso("fedora-classic.iso"),
        "/LiveOS/squashfs.img",
        &from_iso,
    );
    assert_eq!(root["sha256"], sha256_file(&from_iso));

    let (out, r) = verify_json(&["--deep", t.s()]);
    assert_eq!(out.status.code(), Some(0), "{r:#}");
    assert_eq!(r["overall"], "intact", "{r:#}");
    assert_eq!(listed_entry(&r, "/LiveOS/squashfs.img")["state"], "intact");
    // The overlay and home inside ext4, checked in place.
    let persistence = r["persistence"].as_array().expect("persistence");
    assert_eq!(persistence.len(), 2, "{r:#}");
    for p in persistence {
        assert_eq!(p["ok"], true, "{p:#}");
        assert_eq!(p["deep"]["clean"], true, "{p:#}");
    }

    // A byte of the root image flipped where it lies inside the ext4 partition.
    let squashfs = std::fs::read(&from_iso).unwrap();
    let at = squashfs.len() / 2 / 4096 * 4096;
    let on_stick = offset_of(&t.image, &squashfs[at..at + 4096]);
    flip_byte(&t.image, on_stick + 100);
    let (out, r) = verify_json(&[t.s()]);
    assert_eq!(out.status.code(), Some(4), "{r:#}");
    assert_eq!(r["changed"], 1, "{r:#}");
    let sq = listed_entry(&r, "/LiveOS/squashfs.img");
    assert_eq!(sq["state"], "changed");
    assert_ne!(sq["sha256"], sq["recorded_sha256"]);
    assert_eq!(listed_entry(&r, "/EFI/BOOT/grub.cfg")["state"], "intact");
}

/// sha256 of `bytes`, with sha256sum (not livestick's hasher).
fn sha256_of_bytes(dir: &Path, bytes: &[u8]) -> String {
    let scratch = dir.join("bytes");
    std::fs::write(&scratch, bytes).unwrap();
    sha256_file(&scratch)
}

fn read_bytes(image: &Path, at: u64, len: usize) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(image).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

/// The manifest's BIOS boot record checked against the stick's bytes, hashed by
/// sha256sum: the MBR's first 440 bytes, the boot sector less bytes 11..90, and the
/// loader files as mtools reads them.
fn assert_boot_record_matches_the_stick(t: &Stick) {
    let m = t.manifest();
    let boot = &m["boot"];
    assert_eq!(
        boot["mbr_code_sha256"],
        sha256_of_bytes(t.dir.path(), &read_bytes(&t.image, 0, 440)),
        "{m:#}"
    );
    let sector = read_bytes(&t.image, t.part, 512);
    let code = [&sector[..11], &sector[90..]].concat();
    assert_eq!(
        boot["boot_sector_code_sha256"],
        sha256_of_bytes(t.dir.path(), &code),
        "{m:#}"
    );
    for loader in ["/syslinux/ldlinux.sys", "/syslinux/ldlinux.c32"] {
        let entry = listed_entry(&m, loader);
        assert_eq!(entry["kind"], "loader", "{entry:#}");
        assert_eq!(
            entry["sha256"],
            sha256_of_bytes(t.dir.path(), &fat_read(&t.image, t.part, loader)),
            "{loader}"
        );
    }
}

fn boot_area<'a>(report: &'a serde_json::Value, area: &str) -> &'a serde_json::Value {
    report["boot"]
        .as_array()
        .and_then(|areas| areas.iter().find(|a| a["area"] == area))
        .unwrap_or_else(|| panic!("no boot area {area}: {report:#}"))
}

#[test]
fn bios_boot_code_and_loader_are_recorded_and_a_changed_byte_in_them_is_found() {
    let t = written("fedora-classic.iso", &[]);
    assert_boot_record_matches_the_stick(&t);
    let (out, r) = verify_json(&[t.s()]);
    assert_eq!(out.status.code(), Some(0), "{r:#}");
    for area in ["MBR boot code", "partition boot sector"] {
        assert_eq!(boot_area(&r, area)["state"], "intact", "{r:#}");
    }
    assert_eq!(listed_entry(&r, "/syslinux/ldlinux.sys")["state"], "intact");

    // A new label changes the file system's parameters, not the boot code. (Written
    // directly: mlabel through mtools' `@@offset` damages the FAT it rewrites.)
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&t.image)
            .unwrap();
        f.seek(SeekFrom::Start(t.part + 0x47)).unwrap();
        f.write_all(b"RELABELLED ").unwrap();
        f.sync_all().unwrap();
    }
    let (out, r) = verify_json(&[t.s()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "a relabelled stick is intact: {r:#}"
    );

    // One byte of each, changed and put back in turn.
    let ldlinux = fat_read(&t.image, t.part, "syslinux/ldlinux.sys");
    let block = &ldlinux[ldlinux.len() / 2 / 512 * 512..][..512];
    let in_loader = offset_of(&t.image, block) + 7;
    for (at, what) in [
        (0x100, "MBR boot code"),
        (t.part + 0x100, "partition boot sector"),
        (in_loader, "/syslinux/ldlinux.sys"),
    ] {
        flip_byte(&t.image, at);
        let (out, r) = verify_json(&[t.s()]);
        assert_eq!(out.status.code(), Some(4), "{what}: {r:#}");
        assert_eq!(r["overall"], "damaged");
        if what.starts_with('/') {
            assert_eq!(listed_entry(&r, what)["state"], "changed", "{r:#}");
            assert_eq!(r["changed"], 1);
        } else {
            let area = boot_area(&r, what);
            assert_eq!(area["state"], "changed", "{r:#}");
            assert_ne!(area["sha256"], area["recorded_sha256"]);
            assert_eq!(r["changed"], 0, "no file changed: {r:#}");
            let out = livestick(&["verify", t.s()]);
            assert_eq!(out.status.code(), Some(4));
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains(&format!("CHANGED  {what}")), "{text}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(&format!("the {what} changed")), "{err}");
        }
        flip_byte(&t.image, at);
    }
    let (out, r) = verify_json(&[t.s()]);
    assert_eq!(out.status.code(), Some(0), "{r:#}");

    // Re-provisioned without a new table, SYSLINUX's installer runs on the stick
    // itself after the manifest is written: the manifest is brought up to date.
    let iso = synthetic_iso("fedora-classic.iso");
    ok(&livestick(&[
        "write",
        iso.to_str().unwrap(),
        t.s(),
        "--yes",
        "--quiet",
    ]));
    assert_boot_record_matches_the_stick(&t);
    let (out, r) = verify_json(&[t.s()]);
    assert_eq!(out.status.code(), Some(0), "{r:#}");
    flip_byte(&t.image, t.part + 0x100);
    let (out, r) = verify_json(&[t.s()]);
    assert_eq!(out.status.code(), Some(4), "{r:#}");
    assert_eq!(boot_area(&r, "partition boot sector")["state"], "changed");
}

#[test]
fn an_invalid_overlay_is_a_problem_that_names_recover_not_a_rewrite() {
    let t = written("fedora-classic.iso", &["--overlay-size-mb", "16"]);
    let overlay = t.manifest()["persistence"][0]["path"]
        .as_str()
        .unwrap()
        .to_string();
    // What the kernel leaves when the store runs full, put where the overlay is.
    let cow = crate::support::dm_snapshot::load_zst(
        &crate::support::dm_snapshot::fixtures().join("p8-full-invalid/cow-after-run.img.zst"),
    );
    let invalid = t.dir.path().join("invalid.cow");
    std::fs::write(&invalid, &cow).unwrap();
    fat_put(&t.image, t.part, &invalid, overlay.trim_start_matches('/'));
    let out = livestick(&["verify", t.s()]);
    assert_eq!(out.status.code(), Some(4));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("invalid") && text.contains("livestick overlay recover"),
        "{text}"
    );
}
