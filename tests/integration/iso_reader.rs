//! The ISO reader and the implanted-MD5 check against images made by the real
//! tools: `xorriso` builds them, `implantisomd5`/`checkisomd5` are the
//! reference for the checksum.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::checked as run;
use livestick::source::checksum::{
    HashingReader, Md5Outcome, implanted_md5, sha256_reader, verify_implanted_md5,
};
use livestick::source::iso::{IsoError, IsoImage, NameScheme};

/// Fails loudly (with the package to install) when a tool is missing: a
/// skipped test would hide that the reader was never checked.
fn require(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is needed by this test: apt-get install {package} (Fedora: dnf install {package})"
    );
}

/// Deterministic pseudo-random bytes (no rand dependency needed in tests).
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A source tree like a small live ISO, plus the awkward cases: long and
/// non-ASCII names, a 12-level deep path, an empty file, and a directory with
/// enough entries to span several sectors (so records end in zero padding).
fn make_tree(root: &Path, big: usize) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut add = |rel: &str, data: Vec<u8>| {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, &data).unwrap();
        files.insert(format!("/{rel}"), data);
    };
    add("LiveOS/squashfs.img", pseudo_random(big, 1));
    add(
        "isolinux/isolinux.cfg",
        b"label linux\n  kernel vmlinuz\n  append initrd=initrd.img root=live:CDLABEL=X\n".to_vec(),
    );
    add("EFI/BOOT/grub.cfg", b"search --label X\n".to_vec());
    add("images/pxeboot/vmlinuz", pseudo_random(70_000, 2));
    add("MixedCase.Txt", b"case".to_vec());
    add("empty", Vec::new());
    add(
        "a-very-long-file-name-well-beyond-the-sixty-four-characters-joliet-allows-üñí.txt",
        b"long".to_vec(),
    );
    add(
        "d1/d2/d3/d4/d5/d6/d7/d8/d9/d10/d11/d12/deep.txt",
        b"deep".to_vec(),
    );
    for i in 0..120 {
        add(
            &format!("many/file-with-a-longish-name-number-{i:04}.dat"),
            format!("{i}").into_bytes(),
        );
    }
    files
}

fn xorriso_mkisofs(args: &[&str], src: &Path, out: &Path) {
    require("xorriso", "xorriso");
    let mut cmd = Command::new("xorriso");
    cmd.args(["-as", "mkisofs"])
        .args(args)
        .arg("-o")
        .arg(out)
        .arg(src);
    run(&mut cmd);
}

struct Fixture {
    _dir: tempfile::TempDir,
    iso: PathBuf,
    files: BTreeMap<String, Vec<u8>>,
}

fn build(args: &[&str], big: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let files = make_tree(&src, big);
    let iso = dir.path().join("test.iso");
    xorriso_mkisofs(args, &src, &iso);
    Fixture {
        _dir: dir,
        iso,
        files,
    }
}

fn open(path: &Path) -> IsoImage<File> {
    IsoImage::open(File::open(path).unwrap()).unwrap()
}

/// Every file of the source tree is found under its own name, and its bytes
/// read through the extents (both ways) equal the original.
fn check_contents(iso: &mut IsoImage<File>, files: &BTreeMap<String, Vec<u8>>) {
    for (path, data) in files {
        let entry = iso
            .lookup(path)
            .unwrap()
            .unwrap_or_else(|| panic!("{path} not found"));
        assert!(!entry.is_dir, "{path}");
        assert_eq!(entry.path, *path);
        assert_eq!(entry.size, data.len() as u64, "{path}");
        let read = iso.read_to_vec(&entry, 1 << 30).unwrap();
        assert!(read == *data, "{path}: read_to_vec differs");
        let mut streamed = Vec::new();
        iso.open_file(&entry).read_to_end(&mut streamed).unwrap();
        assert!(streamed == *data, "{path}: open_file differs");
    }
}

#[test]
fn rock_ridge_joliet_image_reads_back_exactly() {
    let fx = build(
        &["-R", "-J", "-joliet-long", "-V", "Fedora-LS-Test-1"],
        3_000_000,
    );
    let mut iso = open(&fx.iso);
    assert_eq!(iso.volume_id(), "Fedora-LS-Test-1");
    assert_eq!(iso.name_scheme(), NameScheme::RockRidge);
    assert_eq!(iso.volume_size(), fs::metadata(&fx.iso).unwrap().len());
    assert_eq!(iso.application_data().len(), 512);
    check_contents(&mut iso, &fx.files);

    // walk lists exactly the source tree: every file and every directory.
    let walked = iso.walk("/").unwrap();
    let walked_files: Vec<&str> = walked
        .iter()
        .filter(|e| !e.is_dir)
        .map(|e| e.path.as_str())
        .collect();
    let expected: Vec<&str> = fx.files.keys().map(String::as_str).collect();
    let mut sorted = walked_files.clone();
    sorted.sort();
    assert_eq!(sorted, expected);
    assert!(
        walked
            .iter()
            .any(|e| e.is_dir && e.path == "/d1/d2/d3/d4/d5/d6/d7/d8/d9/d10/d11/d12")
    );
    // Parents come before their children.
    for (i, e) in walked.iter().enumerate() {
        if let Some((parent, _)) = e.path.rsplit_once('/')
            && !parent.is_empty()
        {
            let p = walked.iter().position(|d| d.path == parent).unwrap();
            assert!(p < i, "{} listed before its parent", e.path);
        }
    }

    // Rock Ridge names are case-sensitive.
    assert!(iso.lookup("/liveos/squashfs.img").unwrap().is_none());
    assert!(iso.lookup("/MixedCase.Txt").unwrap().is_some());
    assert!(iso.lookup("LiveOS//./squashfs.img").unwrap().is_some());
    assert!(iso.lookup("/LiveOS/squashfs.img/x").unwrap().is_none());

    let listing = iso.read_dir("/many").unwrap();
    assert_eq!(listing.len(), 120);
    let root = iso.lookup("/").unwrap().unwrap();
    assert!(root.is_dir && root.path == "/");

    assert!(matches!(
        iso.read_dir("/nope"),
        Err(IsoError::NotFound { .. })
    ));
    assert!(matches!(
        iso.read_dir("/empty"),
        Err(IsoError::NotADirectory { .. })
    ));
    let big = iso.lookup("/LiveOS/squashfs.img").unwrap().unwrap();
    let err = iso.read_to_vec(&big, 1024).unwrap_err();
    assert!(matches!(err, IsoError::FileTooLarge { .. }), "{err}");
}

/// Native xorriso: its mkisofs emulation always writes Rock Ridge.
fn xorriso_native(args: &[&str], src: &Path, out: &Path) {
    require("xorriso", "xorriso");
    run(Command::new("xorriso")
        .args(args)
        .arg("-outdev")
        .arg(out)
        .arg("-map")
        .arg(src)
        .args(["/", "-commit"]));
}

#[test]
fn joliet_only_image_uses_joliet_names() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let files = make_tree(&src, 100_000);
    let iso_path = dir.path().join("joliet.iso");
    xorriso_native(
        &[
            "-rockridge",
            "off",
            "-joliet",
            "on",
            "-compliance",
            "joliet_long_names",
            "-volid",
            "JOLIET",
        ],
        &src,
        &iso_path,
    );
    let fx = Fixture {
        _dir: dir,
        iso: iso_path,
        files,
    };
    let mut iso = open(&fx.iso);
    assert_eq!(iso.name_scheme(), NameScheme::Joliet);
    check_contents(&mut iso, &fx.files);
    // No Rock Ridge: a case-insensitive match is accepted.
    let e = iso.lookup("/liveos/SQUASHFS.IMG").unwrap().unwrap();
    assert_eq!(e.path, "/LiveOS/squashfs.img");
}

#[test]
fn plain_iso9660_image_falls_back_to_case_insensitive_names() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let mut files = BTreeMap::new();
    for (rel, data) in [
        ("LiveOS/squashfs.img", pseudo_random(200_000, 3)),
        ("isolinux/isolinux.cfg", b"label x\n".to_vec()),
        ("EFI/BOOT/BOOTX64.EFI", pseudo_random(5000, 4)),
    ] {
        let p = src.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, &data).unwrap();
        files.insert(rel, data);
    }
    let iso_path = dir.path().join("plain.iso");
    xorriso_native(&["-rockridge", "off", "-volid", "PLAIN"], &src, &iso_path);
    let mut iso = open(&iso_path);
    assert_eq!(iso.name_scheme(), NameScheme::Iso9660);
    // ISO 9660 level 1 names are upper case; ";1" and the dot are stripped.
    let names: Vec<String> = iso.walk("/").unwrap().into_iter().map(|e| e.path).collect();
    assert!(
        names.contains(&"/LIVEOS/SQUASHFS.IMG".to_string()),
        "{names:?}"
    );
    for (rel, data) in files {
        let e = iso.lookup(rel).unwrap().unwrap();
        assert_eq!(iso.read_to_vec(&e, 1 << 20).unwrap(), data, "{rel}");
    }
}

#[test]
fn rock_ridge_relocated_deep_directories_are_followed() {
    require("xorriso", "xorriso");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let deep = "a/b/c/d/e/f/g/h/i/j/k/deep.txt";
    fs::create_dir_all(src.join(deep).parent().unwrap()).unwrap();
    fs::write(src.join(deep), b"relocated").unwrap();
    let iso_path = dir.path().join("reloc.iso");
    // Native mode: -compliance deep_paths_off makes xorriso relocate
    // directories deeper than 8 levels (Rock Ridge CL/PL/RE entries).
    run(Command::new("xorriso")
        .args(["-compliance", "deep_paths_off", "-outdev"])
        .arg(&iso_path)
        .args(["-volid", "RELOC", "-map"])
        .arg(&src)
        .args(["/", "-commit"]));
    let mut iso = open(&iso_path);
    let e = iso.lookup(&format!("/{deep}")).unwrap().unwrap();
    assert_eq!(iso.read_to_vec(&e, 100).unwrap(), b"relocated");
    // The relocated directory is shown only at its real place.
    let walked: Vec<String> = iso.walk("/").unwrap().into_iter().map(|e| e.path).collect();
    assert_eq!(walked.len(), 12, "{walked:?}");
    assert!(walked.iter().all(|p| p.starts_with("/a")), "{walked:?}");
}

fn implant(iso: &Path) {
    require("implantisomd5", "isomd5sum");
    run(Command::new("implantisomd5").arg(iso));
}

fn checkisomd5_passes(iso: &Path) -> bool {
    require("checkisomd5", "isomd5sum");
    Command::new("checkisomd5")
        .arg(iso)
        .output()
        .unwrap()
        .status
        .success()
}

fn our_check(path: &Path) -> Md5Outcome {
    let iso = open(path);
    let md5 = implanted_md5(iso.application_data()).expect("implanted md5");
    let size = iso.volume_size();
    let mut f = iso.into_inner();
    let mut last = (0, 0);
    let outcome = verify_implanted_md5(&mut f, &md5, size, |d, t| {
        assert!(d >= last.0 && d <= t);
        last = (d, t);
    })
    .unwrap();
    if outcome.passed() {
        assert_eq!(last.0, last.1, "progress reaches the total");
        assert_eq!(last.1, size - md5.skip_sectors * 2048);
    }
    outcome
}

#[test]
fn implanted_md5_agrees_with_checkisomd5() {
    // Several sizes: fragment boundaries fall differently in each, which
    // exercises the fragment-sum sampling.
    for (i, big) in [0usize, 40_000, 700_000, 3_333_333, 9_000_001]
        .into_iter()
        .enumerate()
    {
        let fx = build(&["-R", "-J", "-joliet-long", "-V", "MD5TEST"], big);
        {
            let iso = open(&fx.iso);
            assert!(implanted_md5(iso.application_data()).is_none());
        }
        implant(&fx.iso);
        assert!(checkisomd5_passes(&fx.iso));
        let md5 = implanted_md5(open(&fx.iso).application_data()).unwrap();
        assert_eq!(md5.skip_sectors, 15);
        assert_eq!(md5.fragment_count, 20, "case {i}");
        assert_eq!(our_check(&fx.iso), Md5Outcome::Passed, "case {i}: {big}");
    }
}

fn flip_byte(path: &Path, offset: u64) {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&[b[0] ^ 0x55]).unwrap();
}

#[test]
fn corrupted_image_fails_like_checkisomd5() {
    let fx = build(&["-R", "-J", "-joliet-long", "-V", "CORRUPT"], 6_000_000);
    implant(&fx.iso);
    let squash = {
        let mut iso = open(&fx.iso);
        iso.lookup("/LiveOS/squashfs.img").unwrap().unwrap()
    };
    let extent = squash.extents[0];

    // Early in the image: a fragment sum catches it before the end.
    let early = fx._dir.path().join("early.iso");
    fs::copy(&fx.iso, &early).unwrap();
    flip_byte(&early, extent.offset + 1000);
    assert!(!checkisomd5_passes(&early));
    assert!(
        matches!(
            our_check(&early),
            Md5Outcome::FragmentFailed { fragment: 1.. }
        ),
        "{:?}",
        our_check(&early)
    );

    // After the last fragment boundary (just before the skipped sectors):
    // only the full MD5 can catch it.
    let late = fx._dir.path().join("late.iso");
    fs::copy(&fx.iso, &late).unwrap();
    let covered = open(&fx.iso).volume_size() - 15 * 2048;
    flip_byte(&late, covered - 100);
    assert!(!checkisomd5_passes(&late));
    match our_check(&late) {
        Md5Outcome::Failed { expected, actual } => {
            assert_eq!(expected.len(), 32);
            assert_ne!(expected, actual);
        }
        other => panic!("expected Failed, got {other:?}"),
    }

    // The application data itself is not covered (it is read as spaces).
    let appdata = fx._dir.path().join("appdata.iso");
    fs::copy(&fx.iso, &appdata).unwrap();
    flip_byte(&appdata, 32768 + 883 + 511);
    assert!(checkisomd5_passes(&appdata));
    assert_eq!(our_check(&appdata), Md5Outcome::Passed);
}

#[test]
fn truncated_image_is_reported_as_incomplete_download() {
    let fx = build(&["-R", "-J", "-V", "TRUNC"], 500_000);
    let len = fs::metadata(&fx.iso).unwrap().len();
    let f = fs::OpenOptions::new().write(true).open(&fx.iso).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    let err = IsoImage::open(File::open(&fx.iso).unwrap())
        .err()
        .expect("truncated image refused");
    assert!(matches!(err, IsoError::Truncated { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("incomplete"), "{msg}");
    assert!(msg.contains(&len.to_string()), "{msg}");
}

#[test]
fn not_an_iso_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    for (name, data) in [
        ("empty", Vec::new()),
        ("small", b"hello".to_vec()),
        ("random", pseudo_random(200_000, 9)),
        ("zeros", vec![0u8; 100_000]),
    ] {
        let p = dir.path().join(name);
        fs::write(&p, &data).unwrap();
        let err = IsoImage::open(File::open(&p).unwrap())
            .err()
            .unwrap_or_else(|| panic!("{name} accepted"));
        assert!(matches!(err, IsoError::NotIso { .. }), "{name}: {err}");
        assert!(err.to_string().contains("is this an ISO image?"), "{err}");
    }
}

/// Damaging bytes of a real image anywhere in its metadata must give an
/// error or a result, never a panic or a hang.
#[test]
fn damaged_metadata_never_panics() {
    let fx = build(&["-R", "-J", "-V", "FUZZ"], 30_000);
    let pristine = fs::read(&fx.iso).unwrap();
    let meta_end = {
        let mut iso = open(&fx.iso);
        let squash = iso.lookup("/LiveOS/squashfs.img").unwrap().unwrap();
        squash.extents[0].offset as usize
    };
    let noise = pseudo_random(4000, 77);
    for round in 0..400 {
        let mut img = pristine.clone();
        for k in 0..4 {
            let r =
                usize::from(noise[round * 4 + k]) | usize::from(noise[(round * 7 + k) % 4000]) << 8;
            let at = 32768 + (r * 131 + round * 17) % (meta_end - 32768);
            img[at] = noise[(round + k * 11) % 4000];
        }
        let Ok(mut iso) = IsoImage::open(std::io::Cursor::new(img)) else {
            continue;
        };
        if let Ok(entries) = iso.walk("/") {
            for e in entries.iter().filter(|e| !e.is_dir).take(50) {
                let _ = iso.read_to_vec(e, 1 << 20);
            }
        }
        let _ = iso.lookup("/LiveOS/squashfs.img");
    }
}

#[test]
fn hashing_reader_matches_sha256_of_the_file() {
    let fx = build(&["-R", "-V", "SHA"], 1_000_000);
    let mut iso = open(&fx.iso);
    let e = iso.lookup("/LiveOS/squashfs.img").unwrap().unwrap();
    let mut hashing = HashingReader::new(iso.open_file(&e));
    std::io::copy(&mut hashing, &mut std::io::sink()).unwrap();
    assert_eq!(hashing.bytes_read(), e.size);
    let via_iso = hashing.finish();
    let direct = sha256_reader(&fx.files["/LiveOS/squashfs.img"][..]).unwrap();
    assert_eq!(via_iso, direct);
}

/// A file above 4 GiB is stored as several extents (ISO level 3). The
/// image is about 4.3 GB, so this runs only when asked:
/// `cargo test --test iso_reader -- --ignored`.
#[test]
#[ignore = "writes a 4.3 GB image"]
fn multi_extent_file_over_4_gib() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir_all(src.join("LiveOS")).unwrap();
    let big = src.join("LiveOS/squashfs.img");
    let size: u64 = (4 << 30) + 123_457;
    {
        // Sparse, with marks at the start, across the 4 GiB boundary and
        // at the end, so extent order mistakes show.
        let mut f = File::create(&big).unwrap();
        f.set_len(size).unwrap();
        for (at, mark) in [
            (0u64, b"start"),
            ((4u64 << 30) - 2050, b"cross"),
            (size - 5, b"final"),
        ] {
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(mark).unwrap();
        }
    }
    let iso_path = dir.path().join("big.iso");
    xorriso_mkisofs(
        &["-R", "-J", "-iso-level", "3", "-V", "BIG"],
        &src,
        &iso_path,
    );
    let mut iso = open(&iso_path);
    let e = iso.lookup("/LiveOS/squashfs.img").unwrap().unwrap();
    assert_eq!(e.size, size);
    assert!(e.extents.len() >= 2, "{:?}", e.extents);
    assert_eq!(e.extents.iter().map(|x| x.len).sum::<u64>(), size);
    // Compare windows across the file (hashing 4 GiB in a debug build takes
    // minutes), including both sides of every extent boundary.
    let mut src_file = File::open(&big).unwrap();
    let mut reader = iso.open_file(&e);
    let mut boundaries = vec![0u64, (4u64 << 30) - 2050, size - 4096];
    let mut at = 0;
    for x in &e.extents {
        at += x.len;
        boundaries.push(at.saturating_sub(2048));
    }
    for start in boundaries.into_iter().filter(|&s| s < size) {
        let len = 4096.min(size - start) as usize;
        let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
        reader.seek(SeekFrom::Start(start)).unwrap();
        reader.read_exact(&mut a).unwrap();
        src_file.seek(SeekFrom::Start(start)).unwrap();
        src_file.read_exact(&mut b).unwrap();
        assert!(a == b, "bytes differ at {start}");
    }
    reader.seek(SeekFrom::Start((4u64 << 30) - 2050)).unwrap();
    let mut mark = [0u8; 5];
    reader.read_exact(&mut mark).unwrap();
    assert_eq!(&mark, b"cross");
}
