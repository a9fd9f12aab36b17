//! A stick is never blank (issue 11): persistence is allocated, not written, so what
//! livestick leaves alone keeps old bytes and old signatures. These tests fill the
//! target with random bytes, or plant real signatures exactly where the new overlay,
//! home and swap land, write, and check with independent tools that each file is
//! exactly what livestick meant: blkid, e2fsck, fsck.fat, cryptsetup, and livestick's
//! own dm-snapshot reader.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::*;
use livestick::disk::fat_raw;

const MIB: u64 = 1 << 20;
const STICK: u64 = 512 * MIB;

fn write_json(args: &[&str]) -> serde_json::Value {
    let mut full = vec!["--json", "write"];
    full.extend_from_slice(args);
    let out = livestick(&full);
    assert!(
        out.status.success(),
        "livestick write failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("write --json prints its report")
}

/// The device extents of `path` in the FAT partition of `image`.
fn extents(image: &Path, path: &str) -> Vec<(u64, u64)> {
    let mut f = File::open(image).unwrap();
    fat_raw::file_extents(&mut f, part_start(image), path).unwrap()
}

fn put(image: &Path, at: u64, bytes: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(bytes).unwrap();
}

fn get(image: &Path, at: u64, len: u64) -> Vec<u8> {
    read_at(image, at, len as usize)
}

/// `blkid -p` of `len` bytes at `offset` of `image`: TYPE, or None when it finds nothing.
fn blkid_type(image: &Path, offset: u64, len: u64) -> Option<String> {
    let out = Command::new(tool("blkid"))
        .args(["-p", "-o", "export", "--offset"])
        .arg(offset.to_string())
        .arg("--size")
        .arg(len.to_string())
        .arg(image)
        .output()
        .expect("blkid (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout);
    let found = text
        .lines()
        .find_map(|l| l.strip_prefix("TYPE=").map(str::to_string));
    if found.is_none() {
        // Exit 2 is "nothing found"; anything else (say, ambivalent results) is a finding.
        assert_eq!(
            out.status.code(),
            Some(2),
            "blkid at {offset}+{len}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    found
}

/// Copies the bytes of a FAT file out by its extents (independent of fatfs and mtools).
fn copy_out(image: &Path, path: &str, dest: &Path) {
    let mut out = File::create(dest).unwrap();
    for (at, len) in extents(image, path) {
        out.write_all(&get(image, at, len)).unwrap();
    }
}

/// What livestick's own dm-snapshot reader says of the overlay on the stick.
fn overlay_status(image: &Path) -> serde_json::Value {
    let out = livestick(&["--json", "overlay", "status", image.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "overlay status: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Where the persistence files land: extents of the overlay, home and swap (the
/// overlay's name carries the random volume id, so it is found by role).
struct Layout {
    files: Vec<(&'static str, Vec<(u64, u64)>)>,
}

impl Layout {
    fn place(&self, role: &str) -> (u64, u64) {
        let e = &self.files.iter().find(|(r, _)| *r == role).unwrap().1;
        (e[0].0, e.iter().map(|x| x.1).sum())
    }
}

fn role_paths(report: &serde_json::Value) -> Vec<(&'static str, String)> {
    vec![
        ("overlay", report["overlay"].as_str().unwrap().to_string()),
        ("home", "/LiveOS/home.img".to_string()),
        ("swap", "/LiveOS/swap.img".to_string()),
    ]
}

const PERSIST_ARGS: [&str; 8] = [
    "--overlay-size-mb",
    "64",
    "--home-size-mb",
    "64",
    "--swap-size-mb",
    "16",
    "--yes",
    "--force",
];

/// Writes a clean stick once to learn where the persistence files land: the same
/// write over any content puts them at the same offsets.
fn learn_layout(iso: &Path, dir: &Path, extra: &[&str]) -> Layout {
    let clean = dir.join("clean.img");
    let mut args = vec![
        iso.to_str().unwrap(),
        clean.to_str().unwrap(),
        "--size",
        "512M",
    ];
    args.extend_from_slice(&PERSIST_ARGS);
    args.extend_from_slice(extra);
    let report = write_json(&args);
    let files = role_paths(&report)
        .into_iter()
        .map(|(role, path)| (role, extents(&clean, &path)))
        .collect();
    std::fs::remove_file(&clean).unwrap();
    Layout { files }
}

/// Everything a written stick must satisfy whatever it held before.
fn check_stick(
    image: &Path,
    report: &serde_json::Value,
    layout: &Layout,
    dir: &Path,
    passphrase: Option<&Path>,
) {
    let start = part_start(image);
    let len = part_len(image);
    // The partition is FAT and nothing else; fsck.fat finds it clean.
    assert_eq!(blkid_type(image, start, len).as_deref(), Some("vfat"));
    fsck_fat(image, start, len, dir);
    let paths = role_paths(report);
    for ((role, path), (_, expected)) in paths.iter().zip(&layout.files) {
        assert_eq!(&extents(image, path), expected, "the {role} {path} moved");
    }
    let overlay = &paths[0].1;
    let at = |path: &str| {
        let e = extents(image, path);
        let size: u64 = e.iter().map(|x| x.1).sum();
        assert_eq!(e.len(), 1, "{path} is contiguous on a fresh stick");
        (e[0].0, size)
    };
    // A new dm-snapshot store has no signature at all, and our reader sees it empty.
    let (o_at, o_len) = at(overlay);
    assert_eq!(blkid_type(image, o_at, o_len), None, "overlay");
    assert_eq!(get(image, o_at, 64 * 1024), vec![0u8; 64 * 1024]);
    let status = overlay_status(image);
    assert_eq!(status["state"], "uninitialised", "{status}");
    assert_eq!(status["exceptions"], 0, "{status}");
    assert_eq!(status["problems"], serde_json::json!([]), "{status}");
    // Swap: blkid sees swap, as mkswap made it.
    let (s_at, s_len) = at("/LiveOS/swap.img");
    assert_eq!(blkid_type(image, s_at, s_len).as_deref(), Some("swap"));
    // Home: ext4 (checked by e2fsck), or LUKS whose content is a clean ext4.
    let (h_at, h_len) = at("/LiveOS/home.img");
    let home = dir.join("home.img");
    copy_out(image, "/LiveOS/home.img", &home);
    match passphrase {
        None => {
            assert_eq!(blkid_type(image, h_at, h_len).as_deref(), Some("ext4"));
            e2fsck_clean(&home);
        }
        Some(pass) => {
            assert_eq!(
                blkid_type(image, h_at, h_len).as_deref(),
                Some("crypto_LUKS")
            );
            let out = Command::new(tool("cryptsetup"))
                .args(["open", "--test-passphrase", "--key-file"])
                .arg(pass)
                .arg(&home)
                .output()
                .expect("cryptsetup");
            assert!(
                out.status.success(),
                "cryptsetup open --test-passphrase: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let plain = dir.join("home.plain");
            decrypt(&home, pass, &plain);
            e2fsck_clean(&plain);
            std::fs::remove_file(plain).ok();
        }
    }
    std::fs::remove_file(home).ok();
}

/// The decrypted content of a LUKS2 home, through livestick's reader (cryptsetup
/// would need device-mapper to open it).
fn decrypt(container: &Path, pass: &Path, dest: &Path) {
    let mut secret = std::fs::read(pass).unwrap();
    if secret.last() == Some(&b'\n') {
        secret.pop();
    }
    luks_decrypt_to(container, dest, &secret);
}

fn write_over(iso: &Path, image: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![iso.to_str().unwrap(), image.to_str().unwrap(), "--format"];
    args.extend_from_slice(&PERSIST_ARGS);
    args.extend_from_slice(extra);
    write_json(&args)
}

fn assert_counts(report: &serde_json::Value) {
    let written = report["written_bytes"].as_u64().unwrap();
    assert!(written > 0);
    assert_eq!(
        report["verified_bytes"].as_u64(),
        Some(written),
        "read-back covers exactly the bytes written"
    );
    // Allocated, not written: the 144 MiB of persistence costs a few MiB.
    let persist: u64 = report["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["size_bytes"] != f["written_bytes"])
        .map(|f| f["written_bytes"].as_u64().unwrap())
        .sum();
    assert!(persist < 24 * MIB, "persistence wrote {persist} bytes");
}

#[test]
fn written_over_random_bytes_plain_home() {
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tmp();
    let layout = learn_layout(&iso, dir.path(), &["--unencrypted-home"]);
    let image = dir.path().join("random.img");
    fill_random(&image, STICK);
    let report = write_over(&iso, &image, &["--unencrypted-home"]);
    assert_counts(&report);
    check_stick(&image, &report, &layout, dir.path(), None);
}

#[test]
fn written_over_random_bytes_encrypted_home() {
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tmp();
    let pass = dir.path().join("pass");
    // No final newline: cryptsetup --key-file takes every byte of the file.
    std::fs::write(&pass, "stale but safe").unwrap();
    let pass_arg = pass.to_str().unwrap();
    let luks = [
        "--passphrase-file",
        pass_arg,
        "--luks-pbkdf",
        "pbkdf2",
        "--luks-iter-time",
        "10",
    ];
    let layout = learn_layout(&iso, dir.path(), &luks);
    let image = dir.path().join("random.img");
    fill_random(&image, STICK);
    let report = write_over(&iso, &image, &luks);
    assert_counts(&report);
    check_stick(&image, &report, &layout, dir.path(), Some(&pass));
}

/// Real signatures made by the real tools, planted where the new files land and
/// where the new partition ends; each is first shown to fool blkid.
#[test]
fn written_over_stale_signatures() {
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tmp();
    let layout = learn_layout(&iso, dir.path(), &["--unencrypted-home"]);
    let image = dir.path().join("stale.img");
    File::create(&image).unwrap().set_len(STICK).unwrap();
    // Learn where the partition goes from a clean write's table.
    let probe = dir.path().join("probe.img");
    write_over(&iso, &probe, &["--unencrypted-home", "--size", "512M"]);
    let (p_start, p_len) = (part_start(&probe), part_len(&probe));
    std::fs::remove_file(&probe).unwrap();

    let (o_at, o_len) = layout.place("overlay");
    let (h_at, h_len) = layout.place("home");
    let (s_at, s_len) = layout.place("swap");

    // The overlay's place held a LUKS container: dracut would try to mount it.
    let luks = dir.path().join("luks.sig");
    File::create(&luks).unwrap().set_len(o_len).unwrap();
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "old").unwrap();
    run(
        "cryptsetup",
        &[
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks2",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            pass.to_str().unwrap(),
            luks.to_str().unwrap(),
        ],
    );
    put(&image, o_at, &get(&luks, 0, 16 * MIB));
    assert_eq!(
        blkid_type(&image, o_at, o_len).as_deref(),
        Some("crypto_LUKS")
    );
    // The home's place held an old ext4 with its journal: e2fsck must not care.
    let old = dir.path().join("old.ext4");
    File::create(&old).unwrap().set_len(h_len).unwrap();
    run("mke2fs", &["-q", "-F", "-t", "ext4", old.to_str().unwrap()]);
    put(&image, h_at, &std::fs::read(&old).unwrap());
    // The swap's place held an ext4 superblock.
    put(&image, s_at, &get(&old, 0, 64 * 1024));
    assert_eq!(blkid_type(&image, s_at, s_len).as_deref(), Some("ext4"));
    // An md 0.90 superblock where the new partition ends: the partition probed as
    // linux_raid_member, udev made no by-uuid link, and the stick did not boot.
    let md_at = p_start + (p_len & !(64 * 1024 - 1)) - 64 * 1024;
    // magic, version 0.90.0, a set UUID word and RAID level 1: what blkid checks.
    let md: Vec<u8> = [0xa92b_4efcu32, 0, 90, 0, 0, 1, 0, 1, 0]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    put(&image, md_at, &md);
    // A GPT backup header at the end of the disk.
    let gpt = dir.path().join("gpt.img");
    File::create(&gpt).unwrap().set_len(STICK).unwrap();
    let mut make_gpt = Command::new(tool("sfdisk"))
        .arg("--quiet")
        .arg(&gpt)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    make_gpt
        .stdin
        .take()
        .unwrap()
        .write_all(b"label: gpt\n,10M\n")
        .unwrap();
    assert!(make_gpt.wait().unwrap().success());
    // Only the backup entries and header (the last 33 sectors), so the md
    // superblock 64 KiB before the end survives.
    put(
        &image,
        STICK - 33 * 512,
        &get(&gpt, STICK - 33 * 512, 33 * 512),
    );
    let before = Command::new(tool("blkid"))
        .args(["-p", "-o", "export", "--offset"])
        .arg(p_start.to_string())
        .arg("--size")
        .arg(p_len.to_string())
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&before.stdout).contains("linux_raid_member"),
        "the planted md superblock fools blkid: {}",
        String::from_utf8_lossy(&before.stdout)
    );

    let report = write_over(&iso, &image, &["--unencrypted-home"]);
    assert_counts(&report);
    check_stick(&image, &report, &layout, dir.path(), None);
    // No trace of the old GPT: sfdisk sees the new MBR table only.
    let table = sfdisk(&image);
    assert_eq!(table["partitiontable"]["label"], "dos", "{table}");
    let whole = run("blkid", &["-p", "-o", "export", image.to_str().unwrap()]);
    assert!(
        whole.contains("PTTYPE=dos") && !whole.contains("gpt"),
        "{whole}"
    );
}

/// The dry run says what the write will cost, and a smaller write stays small.
#[test]
fn persistence_costs_only_its_metadata() {
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tmp();
    let image: PathBuf = dir.path().join("big.img");
    let report = write_json(&[
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--size",
        "9G",
        "--overlay-size-mb",
        "4095",
        "--home-size-mb",
        "4095",
        "--unencrypted-home",
        "--yes",
    ]);
    assert_counts(&report);
    let written = report["written_bytes"].as_u64().unwrap();
    let iso_len = std::fs::metadata(&iso).unwrap().len();
    // FAT tables of a 9 GiB FAT32: 2 × 9 MiB; the rest is the ISO's files and metadata.
    assert!(
        written < iso_len + 64 * MIB,
        "wrote {written} bytes for a {iso_len}-byte ISO"
    );
    // The image file stays sparse where nothing was written.
    use std::os::unix::fs::MetadataExt;
    let blocks = std::fs::metadata(&image).unwrap().blocks() * 512;
    assert!(blocks < written + 16 * MIB, "{blocks} bytes allocated");
}

/// An OverlayFS overlay (an ext4 image, for a flat root) over random bytes: blkid
/// sees ext4, e2fsck finds it clean, and it holds exactly overlayfs/ and ovlwork/.
#[test]
fn overlayfs_overlay_written_over_random_bytes() {
    let iso = synthetic_iso("fedora42.iso");
    let dir = tmp();
    let image = dir.path().join("random.img");
    fill_random(&image, STICK);
    let report = write_json(&[
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--format",
        "--overlayfs",
        "--overlay-size-mb",
        "128",
        "--yes",
    ]);
    assert_counts(&report);
    let overlay = report["overlay"].as_str().unwrap();
    let e = extents(&image, overlay);
    assert_eq!(e.len(), 1);
    let (at, len) = e[0];
    assert_eq!(blkid_type(&image, at, len).as_deref(), Some("ext4"));
    let copy = dir.path().join("overlay.ext4");
    copy_out(&image, overlay, &copy);
    e2fsck_clean(&copy);
    let listing = run("debugfs", &["-R", "ls -p /", copy.to_str().unwrap()]);
    let names: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split('/').nth(5))
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .collect();
    assert_eq!(names, ["lost+found", "overlayfs", "ovlwork"], "{listing}");
}

/// Read-back catches a stick that corrupts a copied file, a persistence file's
/// metadata, or the FAT itself (a byte flipped on the stick between the write and the
/// read-back, through `LIVESTICK_FAILPOINT`): exit 4, naming what.
#[test]
fn read_back_catches_corruption_of_each_kind_of_byte() {
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tmp();
    for (point, names) in [
        ("corrupt-file", "/"),
        ("corrupt-persist", "/LiveOS/overlay-"),
        ("corrupt-meta", "the FAT, directories and boot sectors"),
    ] {
        let image = dir.path().join(format!("{point}.img"));
        let out = Command::new(crate::support::bin())
            .env("LIVESTICK_FAILPOINT", point)
            .args(["write", iso.to_str().unwrap(), image.to_str().unwrap()])
            .args(["--size", "256M", "--overlay-size-mb", "16", "--yes"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{point}: {text}");
        assert!(
            text.contains("read-back verification failed") && text.contains(names),
            "{point}: {text}"
        );
    }
    // Without the failpoint the same write verifies.
    let image = dir.path().join("fine.img");
    let report = write_json(&[
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--size",
        "256M",
        "--overlay-size-mb",
        "16",
        "--yes",
    ]);
    assert_eq!(report["verified"], true);
}

/// The human report says what the stick really took, and that all of it was read back.
#[test]
fn the_report_says_how_much_was_written_and_verified() {
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tmp();
    let image = dir.path().join("stick.img");
    let out = livestick(&[
        "write",
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--size",
        "1G",
        "--overlay-size-mb",
        "512",
        "--yes",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let line = text
        .lines()
        .find(|l| l.contains("written to the stick"))
        .unwrap_or_else(|| panic!("no byte count in: {text}"));
    let (written, verified) = line
        .trim()
        .split_once(" written to the stick, ")
        .unwrap_or_else(|| panic!("{line}"));
    assert_eq!(
        verified.strip_suffix(" read back and verified"),
        Some(written),
        "{line}"
    );
}
