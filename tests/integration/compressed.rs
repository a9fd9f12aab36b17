//! Compressed source ISOs (`source::compressed`): copies of a synthetic fixture
//! made with the real `xz`, `zstd`, `gzip` and `bzip2` programs, written and
//! inspected like the plain ISO, and every kind of bad stream refused with the
//! target unchanged. The sticks are read back with mtools, not livestick.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use crate::support::*;

/// The compressors, the name each copy gets, and their arguments (`-c`: to stdout).
const COMPRESSORS: [(&str, &str, &[&str]); 4] = [
    ("xz", "iso.xz", &["-T2", "-1", "-c"]),
    ("zstd", "iso.zst", &["-q", "-c"]),
    ("gzip", "iso.gz", &["-1", "-c"]),
    ("bzip2", "iso.bz2", &["-1", "-c"]),
];

fn compress(program: &str, args: &[&str], iso: &Path, dest: &Path) {
    let out = std::fs::File::create(dest).expect("create the compressed copy");
    let status = Command::new(program)
        .args(args)
        .arg(iso)
        .stdout(out)
        .status()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    assert!(status.success(), "{program} failed");
}

/// The plain fixture and its compressed copies, one per compressor, made once
/// per test run beside the fixture (a rename makes each appear whole, for a
/// second test process running at the same time). Shared with `signed_checksum`.
pub fn copies() -> (PathBuf, Vec<PathBuf>) {
    static COPIES: OnceLock<Vec<PathBuf>> = OnceLock::new();
    let iso = synthetic_iso("fedora-classic.iso");
    let copies = COPIES.get_or_init(|| {
        let dir = fixtures::out_dir().join("compressed");
        std::fs::create_dir_all(&dir).expect("create fixtures/out/compressed");
        COMPRESSORS
            .iter()
            .map(|(program, suffix, args)| {
                let dest = dir.join(format!("fedora-classic.{suffix}"));
                let partial = dir.join(format!(".fedora-classic.{suffix}.{}", std::process::id()));
                compress(program, args, &iso, &partial);
                std::fs::rename(&partial, &dest).expect("rename the compressed copy");
                dest
            })
            .collect()
    });
    (iso, copies.clone())
}

fn write_to(source: &Path, image: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "--json",
        "write",
        source.to_str().unwrap(),
        image.to_str().unwrap(),
        "--size",
        "64M",
        "--volume-id",
        "1234ABCD",
    ];
    args.extend_from_slice(extra);
    livestick(&args)
}

fn partition_offset(image: &Path) -> u64 {
    sfdisk(image)["partitiontable"]["partitions"][0]["start"]
        .as_u64()
        .unwrap()
        * 512
}

/// Every file on the stick's FAT with its sha256, read with mtools.
fn files_on(image: &Path) -> Vec<(String, String)> {
    let offset = partition_offset(image);
    let listing = Command::new("mdir")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-/", "-a", "-b", "-i"])
        .arg(format!("{}@@{offset}", image.display()))
        .arg("::/")
        .output()
        .expect("mtools installed");
    assert!(listing.status.success());
    let mut files: Vec<(String, String)> = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .filter(|line| !line.ends_with('/'))
        .map(|line| {
            let path = line.trim_start_matches("::").to_string();
            let bytes = fat_read(image, offset, &path);
            let digest = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(&bytes));
            (path, digest)
        })
        .collect();
    files.sort();
    files
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_stick_written_from_each_compressed_copy_has_the_plain_isos_files() {
    let dir = tmp();
    let (iso, copies) = copies();
    let plain = dir.path().join("plain.img");
    ok(&write_to(&iso, &plain, &[]));
    let expected = files_on(&plain);
    assert!(
        expected.iter().any(|(p, _)| p == "/LiveOS/squashfs.img"),
        "{expected:?}"
    );
    for copy in &copies {
        let image = dir.path().join("from-copy.img");
        let out = write_to(copy, &image, &[]);
        ok(&out);
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(
            report["iso_md5"].is_string(),
            "{}: the implanted MD5 is checked on the unpacked copy",
            copy.display()
        );
        // The manifest names the source as given and when it was written, so it
        // differs by design; every other file is the same byte for byte.
        let without_manifest = |files: Vec<(String, String)>| -> Vec<(String, String)> {
            files
                .into_iter()
                .filter(|(p, _)| p != "/LiveOS/livestick.json")
                .collect()
        };
        assert_eq!(
            without_manifest(files_on(&image)),
            without_manifest(expected.clone()),
            "{}",
            copy.display()
        );
        std::fs::remove_file(&image).unwrap();
    }
}

#[test]
fn the_plan_of_a_compressed_source_says_where_it_is_unpacked() {
    let dir = tmp();
    let (_, copies) = copies();
    let image = dir.path().join("stick.img");
    let out = write_to(&copies[1], &image, &["--dry-run"]);
    ok(&out);
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let notes = plan["notes"].to_string();
    assert!(
        notes.contains("zstd-compressed") && notes.contains("unnamed temporary file"),
        "{notes}"
    );
    assert!(!image.exists(), "a dry run creates nothing");
}

#[test]
fn inspect_shows_the_same_label_for_each_compressed_copy() {
    let (iso, copies) = copies();
    let inspect = |path: &Path| -> serde_json::Value {
        let out = livestick(&["--json", "inspect", path.to_str().unwrap()]);
        serde_json::from_str(&ok(&out)).unwrap()
    };
    let plain = inspect(&iso);
    for copy in &copies {
        let seen = inspect(copy);
        assert_eq!(seen["label"], plain["label"], "{}", copy.display());
        assert_eq!(seen["volume_bytes"], plain["volume_bytes"]);
        assert_eq!(
            seen["root"], plain["root"],
            "unsquashfs reads the unpacked copy"
        );
        assert_eq!(
            seen["source"],
            copy.to_str().unwrap(),
            "the path the user gave"
        );
    }
}

/// A target with content of its own, which a refused write must leave as it was.
fn existing_target(dir: &Path) -> (PathBuf, String) {
    let target = dir.join("target.img");
    fill_random(&target, 4 << 20);
    let digest = sha256_file(&target);
    (target, digest)
}

fn assert_refused(out: &Output, source: &Path, says: &str, target: &Path, digest: &str) {
    assert_eq!(out.status.code(), Some(2), "bad input: {}", stderr(out));
    let message = stderr(out);
    let name = source.file_name().unwrap().to_str().unwrap();
    assert!(
        message.contains("decompressing ") && message.contains(name) && message.contains(says),
        "{message}"
    );
    assert_eq!(sha256_file(target), digest, "the target is unchanged");
}

#[test]
fn a_truncated_stream_is_refused_before_the_target_is_touched() {
    let dir = tmp();
    let (_, copies) = copies();
    let (target, digest) = existing_target(dir.path());
    for copy in &copies {
        let bytes = std::fs::read(copy).unwrap();
        let cut = dir.path().join(format!(
            "cut-{}",
            copy.file_name().unwrap().to_str().unwrap()
        ));
        std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
        let out = write_to(&cut, &target, &[]);
        // zstd and gzip say the stream ends early; xz and bzip2 may find the
        // cut block corrupt first. Either names the file and the step.
        assert_refused(&out, &cut, "download it again", &target, &digest);
    }
}

#[test]
fn a_corrupt_byte_mid_stream_is_refused_before_the_target_is_touched() {
    let dir = tmp();
    let (_, copies) = copies();
    let (target, digest) = existing_target(dir.path());
    for copy in &copies {
        let mut bytes = std::fs::read(copy).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x55;
        let bad = dir.path().join(format!(
            "bad-{}",
            copy.file_name().unwrap().to_str().unwrap()
        ));
        std::fs::write(&bad, &bytes).unwrap();
        let out = write_to(&bad, &target, &[]);
        assert_refused(&out, &bad, "download it again", &target, &digest);
    }
}

#[test]
fn a_compressed_file_that_is_not_an_iso_is_refused() {
    let dir = tmp();
    let (target, digest) = existing_target(dir.path());
    let raw = dir.path().join("disk.raw");
    fill_random(&raw, 1 << 20);
    let packed = dir.path().join("disk.raw.zst");
    compress("zstd", &["-q", "-c"], &raw, &packed);
    let out = write_to(&packed, &target, &[]);
    assert_refused(
        &out,
        &packed,
        "not hold an ISO 9660 image",
        &target,
        &digest,
    );
    let out = livestick(&["inspect", packed.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

/// Runs livestick with `TMPDIR` on a 1 MiB tmpfs of its own, in a private mount
/// namespace, so nothing outside the test sees the mount.
fn livestick_with_small_tmp(dir: &Path, args: &[&str]) -> Output {
    let small = dir.join("small-tmp");
    std::fs::create_dir_all(&small).unwrap();
    output_of(
        Command::new("unshare")
            .args(["--mount", "sh", "-c"])
            .arg(r#"mount -t tmpfs -o size=1m livestick-test "$0" && exec "$@""#)
            .arg(&small)
            .arg(bin())
            .args(args)
            .env("TMPDIR", &small),
    )
}

#[test]
fn too_little_temporary_space_is_refused_before_the_target_is_touched() {
    if !require(is_root(), "root (to mount a small tmpfs for TMPDIR)") {
        return;
    }
    let dir = tmp();
    let (_, copies) = copies();
    let (target, digest) = existing_target(dir.path());
    // zstd states the unpacked size: refused before unpacking starts.
    let zst = &copies[1];
    let out = livestick_with_small_tmp(
        dir.path(),
        &["write", zst.to_str().unwrap(), target.to_str().unwrap()],
    );
    assert_refused(&out, zst, "free", &target, &digest);
    // bzip2 does not: the file system fills while unpacking.
    let bz2 = &copies[3];
    let out = livestick_with_small_tmp(
        dir.path(),
        &["write", bz2.to_str().unwrap(), target.to_str().unwrap()],
    );
    assert_refused(&out, bz2, "set TMPDIR", &target, &digest);
}
