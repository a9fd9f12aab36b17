//! Raw disk images (`raw_write`, `source::{raw, bmap}`): Fedora's `.raw.xz`
//! layout made here with `sfdisk` and `mkfs.*` (GPT: an EFI FAT, an ext4
//! /boot, an ext4 root with files), compressed with the real `xz`, `zstd` and
//! `gzip`, its block map made by bmaptool (Debian's `bmap-tools`). Every
//! target starts as random bytes with a stale GPT, so nothing passes because a
//! target happened to be blank; the results are read with `sfdisk`, `blkid`,
//! `fsck.fat` and `e2fsck`, never with livestick.
//!
//! What a failure leaves is decided and tested here: a check that can be made
//! before streaming (a malformed map, a map for another size, a target too
//! small, a persistence option) leaves the target byte for byte as it was; a
//! failure found while streaming (truncated or corrupt compressed data, a
//! range whose checksum does not match, a read-back difference) leaves the
//! rest written but the first MiB zeroed: no partition table, nothing boots.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use crate::support::*;

const MIB: u64 = 1 << 20;
const IMAGE_SIZE: u64 = 64 * MIB;
/// Partition starts and lengths in sectors, as the fixture's sfdisk script says.
const PARTS: [(&str, u64, u64); 3] = [
    ("EFI", 2048, 32768),
    ("boot", 34816, 32768),
    ("root", 67584, 61440),
];

fn tool(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn compress(program: &str, args: &[&str], src: &Path, dest: &Path) {
    let out = std::fs::File::create(dest).expect("create the compressed copy");
    let status = Command::new(program)
        .args(args)
        .arg(src)
        .stdout(out)
        .status()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    assert!(status.success(), "{program} failed");
}

/// The image, made once per run in its own directory: `disk.raw` (sparse, as
/// the image builders leave it), `disk.raw.xz`, `.zst`, `.gz` and
/// `disk.raw.bmap`.
fn fixture() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let done = fixtures::out_dir().join("raw");
        if done.join("disk.raw.bmap").is_file() {
            return done;
        }
        let dir = fixtures::out_dir().join(format!(".raw-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let raw = dir.join("disk.raw");
        std::fs::File::create(&raw)
            .and_then(|f| f.set_len(IMAGE_SIZE))
            .unwrap();
        let script = "label: gpt\n\
            size=16MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=\"EFI\"\n\
            size=16MiB, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"boot\"\n\
            type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"root\"\n";
        let mut child = Command::new("sfdisk")
            .args(["-q", raw.to_str().unwrap()])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("sfdisk runs");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "sfdisk failed");
        let r = raw.to_str().unwrap();
        tool(
            "mkfs.fat",
            &["-F", "16", "-n", "EFI", "--offset", "2048", r, "16384"],
        );
        let root = dir.join("rootfs");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/os-release"), "NAME=Fedora\n").unwrap();
        fill_random(&root.join("blob"), 3 * MIB);
        tool(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-L",
                "boot",
                "-E",
                &format!("offset={}", 34816 * 512),
                r,
                "16384",
            ],
        );
        tool(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-L",
                "root",
                "-d",
                root.to_str().unwrap(),
                "-E",
                &format!("offset={}", 67584 * 512),
                r,
                "30720",
            ],
        );
        compress("xz", &["-T2", "-1", "-c"], &raw, &dir.join("disk.raw.xz"));
        compress("zstd", &["-q", "-c"], &raw, &dir.join("disk.raw.zst"));
        compress("gzip", &["-1", "-c"], &raw, &dir.join("disk.raw.gz"));
        let bmap = Command::new("bmaptool")
            .args(["create", r])
            .output()
            .expect("bmaptool runs (Debian package bmap-tools, scripts/deps.sh)");
        assert!(bmap.status.success(), "bmaptool create failed");
        std::fs::write(dir.join("disk.raw.bmap"), &bmap.stdout).unwrap();
        // Appears whole, for a second test process running at the same time;
        // if one was quicker, its copy is used.
        if std::fs::rename(&dir, &done).is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        done
    })
}

/// `name` from the fixture, copied into `dir` (so that a map beside it is
/// found only when the test puts one there).
fn source(dir: &Path, name: &str) -> PathBuf {
    let dest = dir.join(name);
    std::fs::copy(fixture().join(name), &dest).unwrap();
    dest
}

/// A used stick: random bytes with a stale GPT at both ends.
fn used_target(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    fill_random(&path, size);
    let mut child = Command::new("sfdisk")
        .args(["-q", path.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"label: gpt\nsize=40MiB, name=\"old\"\n")
        .unwrap();
    assert!(child.wait().unwrap().success());
    path
}

fn write(args: &[&str]) -> Output {
    let mut all = vec!["--json", "write"];
    all.extend_from_slice(args);
    livestick(&all)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn report(out: &Output) -> serde_json::Value {
    serde_json::from_str(&ok(out)).expect("a JSON report")
}

fn read_range(path: &Path, start: u64, len: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(start)).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf).unwrap();
    buf
}

/// The target holds the fixture's three partitions, each file system clean by
/// its own checker.
fn assert_fedora_layout(target: &Path, scratch: &Path) {
    let table = sfdisk(target);
    let parts = table["partitiontable"]["partitions"].as_array().unwrap();
    assert_eq!(table["partitiontable"]["label"], "gpt");
    assert_eq!(parts.len(), 3, "{table}");
    for ((name, start, size), part) in PARTS.iter().zip(parts) {
        assert_eq!(part["name"], *name);
        assert_eq!(part["start"].as_u64(), Some(*start));
        assert_eq!(part["size"].as_u64(), Some(*size));
    }
    let blkid = |start: u64| {
        run(
            "blkid",
            &[
                "-p",
                "-o",
                "export",
                "--offset",
                &(start * 512).to_string(),
                s(target),
            ],
        )
    };
    assert!(blkid(2048).contains("TYPE=vfat"));
    assert!(blkid(34816).contains("TYPE=ext4") && blkid(34816).contains("LABEL=boot"));
    assert!(blkid(67584).contains("TYPE=ext4") && blkid(67584).contains("LABEL=root"));
    fsck_fat(target, 2048 * 512, 32768 * 512, scratch);
    for (name, start, size) in &PARTS[1..] {
        let copy = scratch.join(format!("{name}.ext4"));
        std::fs::write(&copy, read_range(target, start * 512, size * 512)).unwrap();
        let out = Command::new("e2fsck")
            .args(["-fn", s(&copy)])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "e2fsck -fn {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::remove_file(&copy).unwrap();
    }
}

#[test]
fn each_compressed_fedora_raw_is_written_whole_over_a_used_stick() {
    let dir = tmp();
    let raw = fixture().join("disk.raw");
    let want = sha256_file(&raw);
    for name in ["disk.raw.xz", "disk.raw.zst", "disk.raw.gz", "disk.raw"] {
        // No map beside it here: every byte is written, holes as zeros.
        let src = source(dir.path(), name);
        let target = used_target(dir.path(), "stick.img", 100 * MIB);
        let before_tail = read_range(&target, 64 * MIB, 34 * MIB);
        let r = report(&write(&[s(&src), s(&target)]));
        assert_eq!(r["kind"], "raw-image");
        assert_eq!(r["source"], s(&src), "the path the user gave");
        assert_eq!(r["image_sha256"], want, "{name}");
        // The image and the zeroed last 2 MiB of the larger target, all read back.
        assert_eq!(
            r["written_bytes"].as_u64(),
            Some(IMAGE_SIZE + 2 * MIB),
            "{name}"
        );
        assert_eq!(r["zeroed_bytes"].as_u64(), Some(2 * MIB));
        assert_eq!(r["verified_bytes"], r["written_bytes"]);
        assert_eq!(
            read_range(&target, 0, IMAGE_SIZE),
            std::fs::read(&raw).unwrap(),
            "{name}: the image byte for byte"
        );
        // Past the image: left alone, but the last 2 MiB (the old backup GPT) zeroed.
        assert_eq!(read_range(&target, 64 * MIB, 34 * MIB), before_tail);
        assert!(
            read_range(&target, 98 * MIB, 2 * MIB)
                .iter()
                .all(|&b| b == 0)
        );
        assert_eq!(std::fs::metadata(&target).unwrap().len(), 100 * MIB);
        assert_fedora_layout(&target, dir.path());
        std::fs::remove_file(&src).unwrap();
    }
}

#[test]
fn with_its_bmap_only_mapped_ranges_are_written_each_checked() {
    let dir = tmp();
    let src = source(dir.path(), "disk.raw.xz");
    // bmaptool's convention: disk.raw.xz finds disk.raw.bmap.
    let map = source(dir.path(), "disk.raw.bmap");
    let target = used_target(dir.path(), "stick.img", 100 * MIB);
    let old = std::fs::read(&target).unwrap();
    let plan: serde_json::Value =
        serde_json::from_str(&ok(&write(&[s(&src), s(&target), "--dry-run"]))).unwrap();
    assert_eq!(plan["kind"], "raw-image");
    assert_eq!(plan["bmap"]["path"], s(&map));
    assert!(plan["persistence"].as_str().unwrap().starts_with("none: "));
    assert_eq!(
        std::fs::read(&target).unwrap(),
        old,
        "a dry run writes nothing"
    );
    let r = report(&write(&[s(&src), s(&target)]));
    assert_eq!(r["bmap"], s(&map));
    let mapped = plan["bmap"]["mapped_bytes"].as_u64().unwrap();
    assert!(mapped < IMAGE_SIZE / 4, "{plan}");
    assert_eq!(r["verified_bytes"], r["written_bytes"]);
    let image = std::fs::read(fixture().join("disk.raw")).unwrap();
    let now = std::fs::read(&target).unwrap();
    // Ranges from bmaptool's own map: identical to the image; an unmapped block
    // past the first MiB keeps the stick's old bytes (proof it was not written).
    let text = std::fs::read_to_string(&map).unwrap();
    let mut unmapped_checked = false;
    let mut next = 0u64;
    for line in text.lines().filter(|l| l.contains("<Range")) {
        let body = line
            .split('>')
            .nth(1)
            .unwrap()
            .split('<')
            .next()
            .unwrap()
            .trim();
        let (a, b) = body
            .split_once('-')
            .map(|(a, b)| (a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap()))
            .unwrap_or_else(|| (body.parse().unwrap(), body.parse().unwrap()));
        let (start, end) = ((a * 4096) as usize, ((b + 1) * 4096) as usize);
        assert_eq!(now[start..end], image[start..end], "range {body}");
        if !unmapped_checked && a > next && next * 4096 >= MIB {
            let at = (next * 4096) as usize;
            assert_eq!(
                now[at..at + 4096],
                old[at..at + 4096],
                "unmapped block {next}"
            );
            unmapped_checked = true;
        }
        next = b + 1;
    }
    assert!(unmapped_checked, "the map has a gap past the first MiB");
    assert_eq!(
        now[..MIB as usize],
        image[..MIB as usize],
        "first MiB whole"
    );
    assert_fedora_layout(&target, dir.path());
}

#[test]
fn a_new_image_file_is_made_at_the_image_size_or_as_asked() {
    let dir = tmp();
    let src = source(dir.path(), "disk.raw.zst");
    let exact = dir.path().join("exact.img");
    ok(&write(&[s(&src), s(&exact)]));
    assert_eq!(std::fs::metadata(&exact).unwrap().len(), IMAGE_SIZE);
    assert_eq!(
        sha256_file(&exact),
        sha256_file(&fixture().join("disk.raw"))
    );
    let larger = dir.path().join("larger.img");
    ok(&write(&[s(&src), s(&larger), "--size", "80M"]));
    assert_eq!(std::fs::metadata(&larger).unwrap().len(), 80 * MIB);
    assert_fedora_layout(&larger, dir.path());
    // Smaller than the image: refused with both figures, nothing created.
    let small = dir.path().join("small.img");
    let out = write(&[s(&src), s(&small), "--size", "32M"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("64 MiB") && err.contains("32 MiB"), "{err}");
    assert!(!small.exists());
}

#[test]
fn persistence_options_are_refused_with_the_reason() {
    let dir = tmp();
    let src = source(dir.path(), "disk.raw.xz");
    let target = used_target(dir.path(), "stick.img", 100 * MIB);
    let old = sha256_file(&target);
    for extra in [
        &["--overlay-size-mb", "100"][..],
        &["--home-size-mb", "100", "--unencrypted-home"],
        &["--swap-size-mb", "64"],
        &["--label", "LIVE"],
        // Options for the live layout, given with a raw image: refused, not dropped.
        &["--ext4"],
        &["--unencrypted-home"],
        &["--luks-pbkdf", "pbkdf2"],
        &["--volume-id", "1234ABCD"],
        &["--dracut-names", "renamed"],
        &["--table", "gpt"],
    ] {
        let mut args = vec![s(&src), s(&target)];
        args.extend_from_slice(extra);
        let out = write(&args);
        assert_eq!(out.status.code(), Some(2), "{extra:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        // Named as it was typed (`--table gpt`, not a `--gpt` nobody gave).
        let typed = extra.join(" ");
        let named = if extra[0] == "--table" {
            typed.as_str()
        } else {
            extra[0]
        };
        assert!(
            err.contains(named) && err.contains("raw disk image"),
            "{err}"
        );
    }
    assert_eq!(sha256_file(&target), old);
}

/// Targets named through symlinks (as /dev/disk/by-id/… names them): each result is
/// reported under the name given. A failed write was reported as "planned" and the
/// batch exited 0, because the result was looked up by the device's own name.
#[test]
fn a_batch_through_symlinks_reports_each_failure_under_the_name_given() {
    if !require(is_root(), "root (loop devices)") {
        return;
    }
    let dir = tmp();
    let a = used_target(dir.path(), "a.img", 100 * MIB);
    let b = used_target(dir.path(), "b.img", 100 * MIB);
    let (Some(la), Some(lb)) = (loop_device(&[], &a), loop_device(&[], &b)) else {
        return;
    };
    let (sa, sb) = (dir.path().join("by-id-a"), dir.path().join("by-id-b"));
    std::os::unix::fs::symlink(&la.0, &sa).unwrap();
    std::os::unix::fs::symlink(&lb.0, &sb).unwrap();

    // A mapped block that does not match its map: each write stops mid-stream.
    let src = source(dir.path(), "disk.raw");
    source(dir.path(), "disk.raw.bmap");
    let mut image = std::fs::read(&src).unwrap();
    image[(67584 * 512 + 1024 + 100) as usize] ^= 0xFF;
    std::fs::write(&src, &image).unwrap();
    let out = write(&[s(&src), s(&sa), s(&sb), "--yes", "--force"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}{err}");
    assert!(err.contains("boots nothing"), "{err}");
    let report: serde_json::Value = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["event"] == "report")
        .expect("a report event");
    for (row, given) in report["targets"].as_array().unwrap().iter().zip([&sa, &sb]) {
        assert_eq!(row["target"], s(given), "{report}");
        assert_eq!(row["ok"], false, "{report}");
        assert_eq!(row["dry_run"], false, "{report}");
    }

    // Written: each `done` event and report row under the name given, verified.
    let good = dir.path().join("good.raw");
    std::fs::copy(fixture().join("disk.raw"), &good).unwrap();
    let out = write(&[s(&good), s(&sa), s(&sb), "--yes", "--force"]);
    let text = ok(&out);
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let done: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "done")
        .map(|e| e["target"].as_str().unwrap())
        .collect();
    assert_eq!(done.len(), 2, "{text}");
    assert!(done.contains(&s(&sa)) && done.contains(&s(&sb)), "{text}");
    let report = events.iter().find(|e| e["event"] == "report").unwrap();
    for row in report["targets"].as_array().unwrap() {
        assert_eq!(row["ok"], true, "{report}");
        assert_eq!(row["verified"], true, "{report}");
    }
}

/// `--dd` writes every byte of the image, as dd would: a `.bmap` beside it is not
/// followed (its unmapped ranges would keep the stick's old bytes); one named with
/// `--bmap` is.
#[test]
fn dd_writes_every_byte_even_with_a_bmap_beside_the_image() {
    let dir = tmp();
    let src = source(dir.path(), "disk.raw");
    source(dir.path(), "disk.raw.bmap");
    let want = std::fs::read(&src).unwrap();
    let target = used_target(dir.path(), "stick.img", 100 * MIB);
    let r = report(&write(&[s(&src), s(&target), "--dd"]));
    assert_eq!(r["bmap"], serde_json::Value::Null, "{r}");
    assert_eq!(read_range(&target, 0, IMAGE_SIZE), want);
    // Named with --bmap: followed (only the mapped ranges are written).
    let target = used_target(dir.path(), "stick2.img", 100 * MIB);
    let map = dir.path().join("disk.raw.bmap");
    let r = report(&write(&[s(&src), s(&target), "--dd", "--bmap", s(&map)]));
    assert_eq!(r["bmap"], s(&map), "{r}");
    assert!(r["written_bytes"].as_u64().unwrap() < IMAGE_SIZE, "{r}");
}

/// `--wait-for` with a raw image keeps to `--wait-timeout` (it waited forever).
#[test]
fn a_raw_wait_for_gives_up_after_its_timeout() {
    let dir = tmp();
    let src = source(dir.path(), "disk.raw.xz");
    let started = std::time::Instant::now();
    let out = livestick(&[
        "write",
        s(&src),
        "--wait-for",
        "1",
        "--wait-timeout",
        "2s",
        "--yes",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("Waiting up to 2 s") && err.contains("but 0 appeared"),
        "{err}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(120));
}

/// Zeroed first MiB and no partition table: what a failure mid-stream leaves.
fn assert_not_bootable(target: &Path) {
    assert!(
        read_range(target, 0, MIB).iter().all(|&b| b == 0),
        "the first MiB is zeroed"
    );
    let out = Command::new("sfdisk")
        .args(["--json", s(target)])
        .output()
        .unwrap();
    assert!(
        !out.status.success() || out.stdout.is_empty(),
        "no partition table is left: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn a_broken_stream_leaves_nothing_bootable_and_names_the_source() {
    let dir = tmp();
    let xz = std::fs::read(fixture().join("disk.raw.xz")).unwrap();
    let gz = std::fs::read(fixture().join("disk.raw.gz")).unwrap();
    let truncated = dir.path().join("truncated.raw.xz");
    std::fs::write(&truncated, &xz[..xz.len() * 2 / 3]).unwrap();
    let mut bad = gz.clone();
    let middle = bad.len() / 2;
    for b in &mut bad[middle..middle + 64] {
        *b ^= 0x55;
    }
    let corrupt = dir.path().join("corrupt.raw.gz");
    std::fs::write(&corrupt, &bad).unwrap();
    for (src, words) in [(&truncated, "ends early"), (&corrupt, "corrupt")] {
        let target = used_target(dir.path(), "stick.img", 100 * MIB);
        let out = write(&[s(src), s(&target)]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(s(src)) && err.contains(words), "{err}");
        assert!(err.contains("decompressing"), "names the step: {err}");
        // Not "nothing was written": the target was changed, and is unbootable.
        assert!(
            err.contains("boots nothing until it is written again")
                && !err.contains("nothing was written"),
            "{err}"
        );
        assert_not_bootable(&target);
    }
    // A batch: the same error, still bad input, for every target.
    let a = used_target(dir.path(), "a.img", 100 * MIB);
    let b = used_target(dir.path(), "b.img", 100 * MIB);
    let out = write(&[s(&truncated), s(&a), s(&b)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(s(&truncated)) && err.contains("ends early"),
        "{err}"
    );
    assert_not_bootable(&a);
    assert_not_bootable(&b);
}

#[test]
fn a_bmap_that_does_not_fit_is_refused() {
    let dir = tmp();
    let src = source(dir.path(), "disk.raw");
    let good = std::fs::read_to_string(fixture().join("disk.raw.bmap")).unwrap();
    let map = dir.path().join("disk.raw.bmap");

    // Malformed, and another image's size: refused before anything is written.
    // One range checksum edited: the map's own checksum no longer matches.
    let at = good.find("chksum=\"").unwrap() + "chksum=\"".len();
    let flipped = if &good[at..at + 1] == "0" { "1" } else { "0" };
    let edited = format!("{}{flipped}{}", &good[..at], &good[at + 1..]);
    // The image one block longer than the map says.
    let longer = dir.path().join("longer.raw");
    let mut bytes = std::fs::read(&src).unwrap();
    bytes.extend_from_slice(&[0u8; 4096]);
    std::fs::write(&longer, &bytes).unwrap();
    for (image, text, words) in [
        (&src, good.replace("</BlockMap>", ""), "not well-formed XML"),
        (&src, edited, "own checksum"),
        (&longer, good.clone(), "ImageSize 67108864"),
    ] {
        std::fs::write(&map, &text).unwrap();
        let target = used_target(dir.path(), "stick.img", 100 * MIB);
        let old = sha256_file(&target);
        let out = write(&[s(image), s(&target), "--bmap", s(&map)]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains(s(&map)) && err.contains(words),
            "{words}: {err}"
        );
        assert_eq!(sha256_file(&target), old, "{words}: target unchanged");
    }

    // The map of another image of the same size (one byte changed in a mapped
    // range): found while streaming, before the first MiB is written.
    std::fs::write(&map, &good).unwrap();
    let mut image = std::fs::read(&src).unwrap();
    let at = (67584 * 512 + 1024 + 100) as usize; // the root file system's superblock
    image[at] ^= 0xFF;
    std::fs::write(&src, &image).unwrap();
    let target = used_target(dir.path(), "stick.img", 100 * MIB);
    let out = write(&[s(&src), s(&target), "--bmap", s(&map)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(s(&src)) && err.contains(s(&map)) && err.contains("does not match"),
        "{err}"
    );
    assert!(
        err.contains("was already being written") && !err.contains("hint: nothing was written"),
        "{err}"
    );
    assert_not_bootable(&target);
}

#[test]
fn a_read_back_difference_leaves_nothing_bootable() {
    let dir = tmp();
    let src = source(dir.path(), "disk.raw.zst");
    let target = used_target(dir.path(), "stick.img", 100 * MIB);
    let out = Command::new(bin())
        .args(["write", s(&src), s(&target)])
        .env("LIVESTICK_FAILPOINT", "raw-corrupt")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("reading back"), "{err}");
    assert_not_bootable(&target);
}

#[test]
fn a_batch_reads_the_image_once_for_every_target() {
    let dir = tmp();
    let src = source(dir.path(), "disk.raw.xz");
    let a = used_target(dir.path(), "a.img", 100 * MIB);
    let b = used_target(dir.path(), "b.img", 80 * MIB);
    let out = write(&[s(&src), s(&a), s(&b)]);
    let text = ok(&out);
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        events.iter().filter(|e| e["event"] == "done").count(),
        2,
        "{text}"
    );
    let want = std::fs::read(fixture().join("disk.raw")).unwrap();
    for t in [&a, &b] {
        assert_eq!(read_range(t, 0, IMAGE_SIZE), want);
        assert_fedora_layout(t, dir.path());
    }
    // One target refused (a directory): the other is written, exit 5.
    let c = used_target(dir.path(), "c.img", 100 * MIB);
    let out = write(&[s(&src), s(&c), s(dir.path())]);
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(read_range(&c, 0, IMAGE_SIZE), want);
}

#[test]
fn dd_writes_a_live_iso_as_it_is_and_a_bmap_alone_does_not() {
    let dir = tmp();
    let iso = synthetic_iso("fedora-classic.iso");
    let target = dir.path().join("dd.img");
    let r = report(&write(&[s(&iso), s(&target), "--dd"]));
    assert_eq!(r["kind"], "raw-image");
    assert_eq!(sha256_file(&target), sha256_file(&iso));
    // An ISO with a partition table and no live system (an installer): raw,
    // without --dd. (One without a partition table is refused as before: it
    // could not boot from a stick, see write::bad_input_is_refused_and_the_target_is_untouched.)
    let hybrid = dir.path().join("netinst.iso");
    tool(
        "xorriso",
        &[
            "-as",
            "mkisofs",
            "-quiet",
            "-o",
            s(&hybrid),
            s(&fixture().join("rootfs")),
        ],
    );
    let mut bytes = std::fs::read(&hybrid).unwrap();
    bytes[510] = 0x55;
    bytes[511] = 0xAA;
    std::fs::write(&hybrid, &bytes).unwrap();
    let plan: serde_json::Value = serde_json::from_str(&ok(&write(&[
        s(&hybrid),
        s(&dir.path().join("n.img")),
        "--dry-run",
    ])))
    .unwrap();
    assert_eq!(plan["kind"], "raw-image");
    assert!(
        plan["why"].as_str().unwrap().contains("hybrid ISO"),
        "{plan}"
    );
    let map = dir.path().join("some.bmap");
    std::fs::copy(fixture().join("disk.raw.bmap"), &map).unwrap();
    let out = write(&[
        s(&iso),
        s(&dir.path().join("x.img")),
        "--size",
        "64M",
        "--bmap",
        s(&map),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--dd"), "{err}");
}

#[test]
fn a_compressed_live_iso_is_named_as_given() {
    let dir = tmp();
    let iso = synthetic_iso("fedora-classic.iso");
    let xz = dir.path().join("fedora.iso.xz");
    compress("xz", &["-T2", "-0", "-c"], &iso, &xz);
    let out = write(&[
        s(&xz),
        s(&dir.path().join("t.img")),
        "--size",
        "64M",
        "--dry-run",
    ]);
    let plan: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(plan["source"], s(&xz));
    // An unpacked copy that is no live ISO: the error names the file given.
    let not_live = dir.path().join("plain.iso");
    tool(
        "xorriso",
        &[
            "-as",
            "mkisofs",
            "-quiet",
            "-o",
            s(&not_live),
            s(&fixture().join("rootfs")),
        ],
    );
    let zst = dir.path().join("plain.iso.zst");
    compress("zstd", &["-q", "-c"], &not_live, &zst);
    let out = write(&[s(&zst), s(&dir.path().join("u.img")), "--size", "64M"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(s(&zst)) && !err.contains("/proc/self/fd"),
        "{err}"
    );
}

#[test]
fn a_loop_device_gets_the_image_and_its_partitions() {
    if !require(is_root(), "root (a loop device)") {
        return;
    }
    let dir = tmp();
    let src = source(dir.path(), "disk.raw.xz");
    let backing = used_target(dir.path(), "loop.img", 100 * MIB);
    let Some(dev) = loop_device(&[], &backing) else {
        return;
    };
    // A loop device is not removable: --force, as for any fixed disk.
    let r = report(&write(&[s(&src), &dev.0, "--yes", "--force"]));
    assert_eq!(r["verified_bytes"], r["written_bytes"]);
    drop(dev);
    assert_eq!(
        read_range(&backing, 0, IMAGE_SIZE),
        std::fs::read(fixture().join("disk.raw")).unwrap()
    );
    assert_fedora_layout(&backing, dir.path());
}

#[test]
fn wait_for_writes_the_image_to_each_stick_as_it_appears() {
    if !require(is_root(), "root (loop devices)") {
        return;
    }
    let dir = tmp();
    let src = source(dir.path(), "disk.raw.gz");
    let _alone = watch_loop_devices(dir.path());
    let backing = used_target(dir.path(), "plugged.img", 100 * MIB);
    let mut child = Command::new(bin())
        .args([
            "--json",
            "write",
            s(&src),
            "--wait-for",
            "1",
            "--yes",
            "--force",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let attached = Loop::attach_with(&[], &backing);
    if attached.is_none() {
        // Nothing will ever be plugged in: stop the waiting writer.
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let Some(dev) = attached else {
        require(false, "loop devices");
        return;
    };
    let text = ok(&out);
    assert!(
        text.lines()
            .any(|l| l.contains("\"done\"") && l.contains(dev.0.as_str())),
        "{text}"
    );
    drop(dev);
    assert_eq!(
        read_range(&backing, 0, IMAGE_SIZE),
        std::fs::read(fixture().join("disk.raw")).unwrap()
    );
    assert_fedora_layout(&backing, dir.path());
}

/// What `inspect` says of a raw image, checked against its schema.
fn inspect_raw(image: &Path) -> serde_json::Value {
    let out = livestick(&["--json", "inspect", s(image)]);
    let doc = crate::support::schema::valid_document(ok_bytes(&out), "inspect-raw");
    assert_eq!(doc["schema"], 1, "{doc}");
    doc
}

fn ok_bytes(out: &Output) -> &[u8] {
    assert!(
        out.status.success(),
        "livestick failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    &out.stdout
}

/// Issue 15: `inspect` describes a raw disk image, plain or compressed, as `sfdisk`
/// and `blkid` see the plain one: the GPT's partitions (start, size, type, name,
/// PARTUUID), each file system's type, label and UUID, the sizes, and the block map
/// beside it; as text too.
#[test]
fn inspect_describes_a_raw_image_as_sfdisk_and_blkid_see_it() {
    let dir = tmp();
    let plain = source(dir.path(), "disk.raw");
    let xz = source(dir.path(), "disk.raw.xz");
    let zst = source(dir.path(), "disk.raw.zst");
    let table = sfdisk(&fixture().join("disk.raw"));
    let expected = table["partitiontable"]["partitions"].as_array().unwrap();
    for image in [&plain, &xz, &zst] {
        let doc = inspect_raw(image);
        assert_eq!(doc["source"], s(image));
        assert_eq!(doc["source_kind"], "raw-image");
        assert_eq!(doc["table"], "gpt", "{doc}");
        assert_eq!(doc["image_bytes"], IMAGE_SIZE, "{doc}");
        assert_eq!(doc["file_bytes"], std::fs::metadata(image).unwrap().len());
        let compression = match image.extension().and_then(|e| e.to_str()) {
            Some("xz") => serde_json::json!("xz"),
            Some("zst") => serde_json::json!("zstd"),
            _ => serde_json::Value::Null,
        };
        assert_eq!(doc["compression"], compression, "{doc}");
        assert!(doc["bmap"].is_null(), "no map beside it yet: {doc}");
        let parts = doc["partitions"].as_array().unwrap();
        assert_eq!(parts.len(), expected.len(), "{doc}");
        for (got, want) in parts.iter().zip(expected) {
            let start = want["start"].as_u64().unwrap() * 512;
            assert_eq!(got["start_bytes"], start, "{got}");
            assert_eq!(got["size_bytes"], want["size"].as_u64().unwrap() * 512);
            assert_eq!(
                got["type_id"].as_str().unwrap(),
                want["type"].as_str().unwrap().to_ascii_lowercase()
            );
            assert_eq!(got["name"], want["name"], "{got}");
            assert_eq!(
                got["part_uuid"].as_str().unwrap(),
                want["uuid"].as_str().unwrap().to_ascii_lowercase()
            );
            let raw = fixture().join("disk.raw");
            let fs = &got["filesystem"];
            assert_eq!(fs["fs_type"], blkid_value(&raw, start, "TYPE"), "{got}");
            assert_eq!(fs["label"], blkid_value(&raw, start, "LABEL"), "{got}");
            assert_eq!(
                fs["uuid"].as_str().unwrap().to_ascii_lowercase(),
                blkid_value(&raw, start, "UUID").to_ascii_lowercase(),
                "{got}"
            );
        }
    }

    // The block map beside the image (as `write` finds it) is described.
    std::fs::copy(
        fixture().join("disk.raw.bmap"),
        dir.path().join("disk.raw.bmap"),
    )
    .unwrap();
    for image in [&plain, &xz] {
        let doc = inspect_raw(image);
        let bmap = &doc["bmap"];
        assert_eq!(bmap["path"], s(&dir.path().join("disk.raw.bmap")), "{doc}");
        assert_eq!(bmap["image_bytes"], IMAGE_SIZE);
        let mapped = bmap["mapped_bytes"].as_u64().unwrap();
        assert!(mapped > 3 * MIB && mapped < IMAGE_SIZE, "{bmap}");
    }

    let text = ok(&livestick(&["inspect", s(&xz)]));
    for line in [
        "kind: raw disk image",
        "compression: xz",
        "partition table: GPT",
        "partition 1: 16 MiB at 1 MiB, EFI system, named \"EFI\"",
        "labelled \"root\"",
        "block map: ",
    ] {
        assert!(text.contains(line), "{line:?} in:\n{text}");
    }
}

/// A compressed raw image cut before its last partition's superblock is refused
/// naming the file and the step, exit 2 (`inspect` unpacks only that far, so a cut
/// past it is `write`'s to find).
#[test]
fn inspect_of_a_truncated_raw_image_names_it() {
    let dir = tmp();
    for name in ["disk.raw.xz", "disk.raw.zst"] {
        let image = source(dir.path(), name);
        let bytes = std::fs::read(&image).unwrap();
        // About the first 9 to 18 MiB of the image: the root partition is at 33 MiB.
        std::fs::write(&image, &bytes[..2000]).unwrap();
        let out = livestick(&["inspect", s(&image)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(
            stderr.contains(name) && stderr.contains("decompressing"),
            "{stderr}"
        );
    }
}

/// Issue 15: `--noverify` with a raw image skips the image's own checks, the block
/// map's per-range checksums (as it skips a live ISO's implanted MD5): a byte
/// changed in a mapped range, refused without it, is written with it, and the plan
/// and report say the checksums were not checked. The map still decides what is
/// written and the read-back still runs. Without a map the plan says nothing was
/// skipped; a published CHECKSUM is checked all the same.
#[test]
fn noverify_skips_only_the_block_maps_checksums() {
    let dir = tmp();
    let src = source(dir.path(), "disk.raw");
    let map = source(dir.path(), "disk.raw.bmap");
    let mut image = std::fs::read(&src).unwrap();
    let at = (67584 * 512 + 1024 + 100) as usize; // the root file system's superblock
    image[at] ^= 0xFF;
    std::fs::write(&src, &image).unwrap();

    let target = used_target(dir.path(), "stick.img", 100 * MIB);
    let out = write(&[s(&src), s(&target)]);
    assert_eq!(out.status.code(), Some(2), "checked without --noverify");
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not match"));

    let plan: serde_json::Value = serde_json::from_str(&ok(&write(&[
        s(&src),
        s(&target),
        "--noverify",
        "--dry-run",
    ])))
    .unwrap();
    let notes = plan["notes"].to_string();
    assert!(
        notes.contains("NOT checked") && notes.contains("--noverify"),
        "{notes}"
    );
    let target = used_target(dir.path(), "stick.img", 100 * MIB);
    let r = report(&write(&[s(&src), s(&target), "--noverify"]));
    assert_eq!(r["bmap"], s(&map));
    assert_eq!(
        r["verified_bytes"], r["written_bytes"],
        "the read-back still ran"
    );
    assert_eq!(
        read_range(&target, at as u64, 1),
        [image[at]],
        "the image as given"
    );
    let target = used_target(dir.path(), "stick.img", 100 * MIB);
    let text = ok(&livestick(&["write", s(&src), s(&target), "--noverify"]));
    assert!(text.contains("checksums not checked: --noverify"), "{text}");

    // No map: nothing to skip, and the plan says so.
    std::fs::remove_file(&map).unwrap();
    let plan: serde_json::Value = serde_json::from_str(&ok(&write(&[
        s(&src),
        s(&target),
        "--noverify",
        "--dry-run",
    ])))
    .unwrap();
    assert!(
        plan["notes"].to_string().contains("nothing was skipped"),
        "{plan}"
    );

    // A published CHECKSUM that does not describe the image: refused, --noverify or not.
    let checksum = dir.path().join("disk-CHECKSUM");
    std::fs::write(
        &checksum,
        crate::signed_checksum::checksum_text(
            &[("disk.raw", &"ab".repeat(32))],
            crate::signed_checksum::SignedBy::Nobody,
        ),
    )
    .unwrap();
    let old = sha256_file(&target);
    let out = write(&[
        s(&src),
        s(&target),
        "--noverify",
        "--checksum",
        s(&checksum),
        "--allow-unsigned",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("does not match its checksum"), "{err}");
    assert_eq!(sha256_file(&target), old, "the target is unchanged");
}
