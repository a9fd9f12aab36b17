//! disk::wipe against the real libblkid: real and hand-placed stale signatures
//! in random-filled regions are found by `blkid -p` before the wipe and by
//! neither `blkid -p` nor `wipefs --no-act` after it.
use crate::support::{checked as run_ok, need as have, output_of as run};
use livestick::disk::wipe::{MAX_WIPE_BYTES, signature_spots, wipe_signatures};
use rand::{RngCore, SeedableRng, rngs::StdRng};
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;
/// 64 MiB, 256 MiB and an odd size large enough for mkfs.xfs (300 MiB minimum).
const SIZES: [u64; 3] = [64 * MIB, 256 * MIB, 320 * MIB + 12345];

fn random_base(dir: &Path, len: u64) -> PathBuf {
    let path = dir.join(format!("random-{len}"));
    if path.exists() {
        return path;
    }
    let mut rng = StdRng::seed_from_u64(len);
    let mut f = fs::File::create(&path).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    let mut left = len;
    while left > 0 {
        let n = left.min(MIB) as usize;
        rng.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    // Random bytes must not look like anything to begin with.
    assert_clean(&path, &[]);
    path
}

fn fresh(dir: &Path, len: u64, case: &str) -> PathBuf {
    let path = dir.join(format!("{case}-{len}.img"));
    fs::copy(random_base(dir, len), &path).unwrap();
    path
}

fn blkid(path: &Path, extra: &[String]) -> (i32, String) {
    let out = run(Command::new("blkid")
        .args(["-p", "-o", "export"])
        .args(extra)
        .arg(path));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn assert_detects(path: &Path, extra: &[String], ty: &str) {
    let (code, out) = blkid(path, extra);
    assert_eq!(
        code,
        0,
        "{}: blkid found nothing, wanted {ty}",
        path.display()
    );
    assert!(
        out.lines()
            .any(|l| l == format!("TYPE={ty}") || l == format!("PTTYPE={ty}")),
        "{}: wanted {ty}, blkid said:\n{out}",
        path.display()
    );
}

fn assert_clean(path: &Path, extra: &[String]) {
    let (code, out) = blkid(path, extra);
    assert_eq!(code, 2, "{}: blkid still finds:\n{out}", path.display());
    if extra.is_empty() {
        let out = run(Command::new("wipefs").arg("--no-act").arg(path));
        assert!(out.status.success(), "wipefs failed on {}", path.display());
        assert!(
            out.stdout.is_empty(),
            "{}: wipefs still finds:\n{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

fn wipe_file(path: &Path) {
    let len = fs::metadata(path).unwrap().len();
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let written = wipe_signatures(&mut f, 0, len).unwrap();
    assert_eq!(written, signature_spots(len));
}

fn write_at(path: &Path, off: u64, data: &[u8]) {
    let mut f = OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    f.write_all(data).unwrap();
}

/// Detected before, gone after.
fn check(path: &Path, ty: &str) {
    assert_detects(path, &[], ty);
    wipe_file(path);
    assert_clean(path, &[]);
    fs::remove_file(path).unwrap();
}

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("livestick-wipe")
        .tempdir_in(std::env::var_os("TMPDIR").unwrap_or_else(|| "/var/tmp".into()))
        .unwrap()
}

#[test]
fn spots_are_sorted_merged_bounded_and_cheap() {
    for len in SIZES
        .into_iter()
        .chain([0, 1, 2 * MIB, 2 * MIB + 1, 3 * MIB + 1, 1 << 32])
    {
        let spots = signature_spots(len);
        for r in &spots {
            assert!(r.start < r.end && r.end <= len, "{r:?} for {len}");
        }
        for w in spots.windows(2) {
            assert!(w[0].end < w[1].start, "{w:?} for {len}");
        }
        let total: u64 = spots.iter().map(|r| r.end - r.start).sum();
        assert!(total <= len.min(MAX_WIPE_BYTES), "{total} for {len}");
    }
    // The budget: 2 MiB per file or partition (a region that short is zeroed whole;
    // a longer one costs its first MiB and about 300 KiB more).
    const { assert!(MAX_WIPE_BYTES <= 2 * MIB) };
}

#[test]
fn filesystems_made_by_real_tools_are_wiped() {
    let dir = tmp();
    let tree = dir.path().join("tree");
    fs::create_dir(&tree).unwrap();
    fs::write(tree.join("hello"), b"stale").unwrap();
    for len in SIZES {
        if have("mkswap") {
            let p = fresh(dir.path(), len, "swap");
            run_ok(Command::new("mkswap").arg("-q").arg(&p));
            check(&p, "swap");
        }
        if have("mke2fs") {
            let p = fresh(dir.path(), len, "ext4");
            run_ok(
                Command::new("mke2fs")
                    .args(["-q", "-F", "-t", "ext4"])
                    .arg(&p),
            );
            check(&p, "ext4");
        }
        if have("mkfs.vfat") {
            let p = fresh(dir.path(), len, "vfat");
            run_ok(Command::new("mkfs.vfat").arg(&p));
            check(&p, "vfat");
        }
        if len >= 256 * MIB && have("mkfs.btrfs") {
            let p = fresh(dir.path(), len, "btrfs");
            run_ok(Command::new("mkfs.btrfs").args(["-q", "-f"]).arg(&p));
            check(&p, "btrfs");
        }
        if len >= 300 * MIB && have("mkfs.xfs") {
            let p = fresh(dir.path(), len, "xfs");
            run_ok(Command::new("mkfs.xfs").args(["-q", "-f"]).arg(&p));
            check(&p, "xfs");
        }
        if have("mksquashfs") {
            let img = dir.path().join("t.sqfs");
            run_ok(Command::new("mksquashfs").arg(&tree).arg(&img).args([
                "-noappend",
                "-quiet",
                "-no-progress",
            ]));
            let p = fresh(dir.path(), len, "squashfs");
            write_at(&p, 0, &fs::read(&img).unwrap());
            check(&p, "squashfs");
        }
        if have("xorriso") {
            let img = dir.path().join("t.iso");
            let _ = fs::remove_file(&img);
            run_ok(
                Command::new("xorriso")
                    .args(["-as", "mkisofs", "-quiet", "-V", "STALE", "-o"])
                    .arg(&img)
                    .arg(&tree),
            );
            let p = fresh(dir.path(), len, "iso");
            write_at(&p, 0, &fs::read(&img).unwrap());
            check(&p, "iso9660");
        }
    }
}

fn luks_format(p: &Path, args: &[&str]) {
    let mut child = Command::new("cryptsetup")
        .args([
            "luksFormat",
            "-q",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
        ])
        .args(args)
        .args(["--key-file", "-"])
        .arg(p)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"stale").unwrap();
    assert!(child.wait().unwrap().success(), "luksFormat {args:?}");
}

#[test]
fn luks_and_gpt_are_wiped_including_their_far_copies() {
    if !have("cryptsetup") || !have("sfdisk") {
        return;
    }
    let dir = tmp();
    for len in SIZES {
        for ty in ["luks1", "luks2"] {
            let p = fresh(dir.path(), len, ty);
            luks_format(&p, &["--type", ty]);
            check(&p, "crypto_LUKS");
        }
        // Only the LUKS2 secondary header is left, at the two offsets past the
        // head that libblkid tries.
        for md in ["2048k", "4096k"] {
            let p = fresh(dir.path(), len, &format!("luks2-secondary-{md}"));
            luks_format(
                &p,
                &[
                    "--type",
                    "luks2",
                    "--luks2-metadata-size",
                    md,
                    "--luks2-keyslots-size",
                    "8m",
                ],
            );
            write_at(&p, 0, &vec![0u8; MIB as usize]);
            check(&p, "crypto_LUKS");
        }
        let p = fresh(dir.path(), len, "gpt");
        let mut child = Command::new("sfdisk")
            .arg("-q")
            .arg(&p)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"label: gpt\n")
            .unwrap();
        assert!(child.wait().unwrap().success(), "sfdisk");
        // Without the primary header blkid falls back to the backup at the end.
        write_at(&p, 512, &[0u8; 33 * 512]);
        check(&p, "gpt");
    }
}

const MD_MAGIC: u32 = 0xa92b_4efc;

fn md1(off: u64) -> Vec<u8> {
    let mut sb = vec![0u8; 256];
    sb[0..4].copy_from_slice(&MD_MAGIC.to_le_bytes());
    sb[4..8].copy_from_slice(&1u32.to_le_bytes());
    sb[144..152].copy_from_slice(&(off >> 9).to_le_bytes());
    let sum: u64 = sb
        .chunks(4)
        .map(|c| u64::from(u32::from_le_bytes(c.try_into().unwrap())))
        .sum();
    let csum = (sum >> 32) + (sum & 0xffff_ffff);
    sb[216..220].copy_from_slice(&(csum as u32).to_le_bytes());
    sb
}

fn nvidia() -> Vec<u8> {
    let mut nv = vec![0u8; 120];
    nv[0..8].copy_from_slice(b"NVIDIA  ");
    nv[8..12].copy_from_slice(&30u32.to_le_bytes());
    nv[16..18].copy_from_slice(&100u16.to_le_bytes());
    let sum = nv
        .chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .fold(0u32, u32::wrapping_add);
    nv[12..16].copy_from_slice(&sum.wrapping_neg().to_le_bytes());
    nv
}

/// Magic placed by hand where libblkid looks, for signatures no installed tool
/// writes to a plain file: (case, expected TYPE, offset, bytes).
fn planted(len: u64) -> Vec<(String, &'static str, u64, Vec<u8>)> {
    let sector = |from_end: u64| ((len >> 9) - from_end) << 9;
    let md090 = (len & !0xffff) - 0x10000;
    let md10 = (len & !0xfff) - 0x2000;
    let mut md0 = Vec::new();
    for w in [MD_MAGIC, 0, 90, 0, 0, 1, 0, 1, 0] {
        md0.extend_from_slice(&w.to_le_bytes());
    }
    let promise = b"Promise Technology, Inc.".to_vec();
    // DDF: the signature and a primary LBA of 0 (nothing else to check).
    let mut ddf = vec![0u8; 512];
    ddf[0..4].copy_from_slice(&0xde11_de11u32.to_be_bytes());
    // ZFS labels L2 and L3 (512 and 256 KiB before the 256 KiB-aligned end): Debian
    // 12's libblkid (2.38) takes four uberblock magics in one label's array as a pool.
    let labels_end = len - len % (256 << 10);
    let uberblocks = |label: u64| {
        let mut ub = vec![0u8; 4 << 10];
        for i in 0..4 {
            ub[i << 10..(i << 10) + 8].copy_from_slice(&0x00ba_b10cu64.to_le_bytes());
        }
        (label + (128 << 10), ub)
    };
    let (zfs2, ub2) = uberblocks(labels_end - (512 << 10));
    let (zfs3, ub3) = uberblocks(labels_end - (256 << 10));
    vec![
        ("ddf-far", "ddf_raid_member", sector(257), ddf.clone()),
        ("ddf-near", "ddf_raid_member", sector(1), ddf),
        ("zfs-l2", "zfs_member", zfs2, ub2),
        ("zfs-l3", "zfs_member", zfs3, ub3),
        ("md090", "linux_raid_member", md090, md0),
        ("md10", "linux_raid_member", md10, md1(md10)),
        ("md12", "linux_raid_member", 4096, md1(4096)),
        (
            "isw",
            "isw_raid_member",
            sector(2),
            b"Intel Raid ISM Cfg Sig. 1.0.00\0\0".to_vec(),
        ),
        ("lsi", "lsi_mega_raid_member", sector(1), b"$XIDE$".to_vec()),
        ("nvidia", "nvidia_raid_member", sector(2), nvidia()),
        (
            "vmfs-volume",
            "VMFS_volume_member",
            MIB,
            vec![0x0d, 0xd0, 0x01, 0xc0],
        ),
        ("vmfs", "VMFS", 2 * MIB, vec![0x5e, 0xf1, 0xab, 0x2f]),
    ]
    .into_iter()
    .map(|(case, ty, off, bytes)| (case.to_string(), ty, off, bytes))
    // Promise FastTrack at each of the sector offsets libblkid tries.
    .chain(
        [
            63, 255, 256, 16, 399, 591, 675, 735, 911, 974, 991, 951, 3087,
        ]
        .map(|s| {
            (
                format!("promise-{s}"),
                "promise_fasttrack_raid_member",
                sector(s),
                promise.clone(),
            )
        }),
    )
    .collect()
}

#[test]
fn hand_placed_raid_and_far_magics_are_wiped() {
    if !have("blkid") || !have("wipefs") {
        return;
    }
    let dir = tmp();
    for len in SIZES {
        for (case, ty, off, bytes) in planted(len) {
            let p = fresh(dir.path(), len, &case);
            write_at(&p, off, &bytes);
            check(&p, ty);
        }
    }
}

/// A region inside a larger image (a partition, a file's clusters): the spots
/// land relative to its start, and nothing outside it changes.
#[test]
fn a_region_inside_a_larger_image() {
    if !have("blkid") {
        return;
    }
    let dir = tmp();
    let (start, len) = (MIB + 512, 64 * MIB + 1536);
    let img = fresh(dir.path(), 2 * start + len, "image");
    let region = [format!("--offset={start}"), format!("--size={len}")];
    let md090 = start + (len & !0xffff) - 0x10000;
    let mut md0 = Vec::new();
    for w in [MD_MAGIC, 0, 90, 0, 0, 1, 0, 1, 0] {
        md0.extend_from_slice(&w.to_le_bytes());
    }
    write_at(&img, md090, &md0);
    assert_detects(&img, &region, "linux_raid_member");
    let before = fs::read(&img).unwrap();
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let written = wipe_signatures(&mut f, start, len).unwrap();
    assert_clean(&img, &region);
    let mut after = Vec::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_end(&mut after).unwrap();
    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
        let i = i as u64;
        if written.iter().any(|r| r.contains(&i)) {
            assert_eq!(*b, 0, "byte {i} not zeroed");
        } else {
            assert_eq!(a, b, "byte {i} outside the spots changed");
        }
    }
    assert!(
        written
            .iter()
            .all(|r| r.start >= start && r.end <= start + len)
    );
}
