//! A damaged FAT must be refused with a message, never walked until the stack
//! overflows (issue 13): a directory whose entry points back at its parent makes
//! the tree infinitely deep.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use crate::support::*;
use livestick::disk::fat_raw;

#[test]
fn a_directory_that_contains_itself_is_reported_not_followed() {
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("stick.img");
    let out = livestick(&[
        "write",
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--size",
        "256M",
        "--yes",
        "--quiet",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let start = part_start(&image);
    // /loop/inner, then inner's entry is pointed at /loop's own cluster.
    let target = format!("{}@@{start}", image.display());
    for d in ["::/loop", "::/loop/inner"] {
        let made = std::process::Command::new("mmd")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-i", &target, d])
            .output()
            .expect("mtools");
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
    }
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    // fat_raw::find_entry finds files only; the directory entries are found by hand.
    assert!(fat_raw::find_entry(&mut f, start, "/loop").is_err());
    let outer_cluster = dir_cluster(&mut f, start, "/loop");
    let inner_entry = entry_offset(&mut f, start, outer_cluster, b"INNER      ");
    f.seek(SeekFrom::Start(inner_entry + 20)).unwrap();
    f.write_all(&((outer_cluster >> 16) as u16).to_le_bytes())
        .unwrap();
    f.seek(SeekFrom::Start(inner_entry + 26)).unwrap();
    f.write_all(&(outer_cluster as u16).to_le_bytes()).unwrap();
    drop(f);

    for args in [
        vec!["inspect", image.to_str().unwrap()],
        vec![
            "write",
            iso.to_str().unwrap(),
            image.to_str().unwrap(),
            "--dry-run",
        ],
    ] {
        let began = Instant::now();
        let out = livestick(&args);
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted a looping tree");
        assert_ne!(out.status.code(), Some(101), "{args:?} panicked: {text}");
        assert!(text.contains("damaged"), "{args:?}: {text}");
        assert!(
            began.elapsed() < Duration::from_secs(20),
            "{args:?} took {:?}",
            began.elapsed()
        );
    }
}

/// First cluster of the directory at `path` (one level below the root).
fn dir_cluster(f: &mut File, start: u64, path: &str) -> u32 {
    let name = path.trim_start_matches('/').to_ascii_uppercase();
    let mut short = [b' '; 11];
    short[..name.len()].copy_from_slice(name.as_bytes());
    let root = root_cluster(f, start);
    let at = entry_offset(f, start, root, &short);
    let e = read(f, at, 32);
    u32::from(u16::from_le_bytes([e[20], e[21]])) << 16
        | u32::from(u16::from_le_bytes([e[26], e[27]]))
}

fn root_cluster(f: &mut File, start: u64) -> u32 {
    let b = read(f, start, 512);
    u32::from_le_bytes([b[44], b[45], b[46], b[47]])
}

/// Device offset of the short entry named `short` in the directory's first cluster.
fn entry_offset(f: &mut File, start: u64, cluster: u32, short: &[u8]) -> u64 {
    let b = read(f, start, 512);
    let bps = u64::from(u16::from_le_bytes([b[11], b[12]]));
    let spc = u64::from(b[13]);
    let reserved = u64::from(u16::from_le_bytes([b[14], b[15]]));
    let fats = u64::from(b[16]);
    let fat_sectors = u64::from(u32::from_le_bytes([b[36], b[37], b[38], b[39]]));
    let data = start + (reserved + fats * fat_sectors) * bps;
    let at = data + u64::from(cluster - 2) * spc * bps;
    let dir = read(f, at, (spc * bps) as usize);
    let i = dir
        .chunks_exact(32)
        .position(|e| &e[..11] == short)
        .expect("entry in the directory's first cluster");
    at + i as u64 * 32
}

fn read(f: &mut File, at: u64, len: usize) -> Vec<u8> {
    use std::io::Read;
    let mut buf = vec![0u8; len];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut buf).unwrap();
    buf
}

/// A partition made smaller than its FAT (by a partitioning tool, or a damaged boot
/// sector): the maintenance commands and a write without `--format` change clusters
/// by their place on the device, so they would write past the partition's end into
/// whatever follows it. Refused, the stick unchanged.
#[test]
fn a_filesystem_larger_than_its_partition_is_refused_unchanged() {
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("stick.img");
    let out = livestick(&[
        "write",
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--size",
        "300M",
        "--overlay-size-mb",
        "20",
        "--yes",
        "--quiet",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sfdisk_script(&image, "start=2048, size=409600, type=c, bootable\n");
    let before = sha256_file(&image);
    let s = image.to_str().unwrap();
    for args in [
        vec!["overlay", "grow", s, "--add-mb", "200", "--yes"],
        vec![
            "write",
            iso.to_str().unwrap(),
            s,
            "--noformat",
            "--overlay-size-mb",
            "30",
            "--yes",
            "--force",
        ],
    ] {
        let out = livestick(&args);
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} went ahead");
        assert!(
            text.contains("made smaller than its filesystem"),
            "{args:?}: {text}"
        );
        assert_eq!(sha256_file(&image), before, "{args:?} changed the stick");
    }
}

/// FSInfo's free-cluster count as a stick pulled out before its system updated it
/// leaves it: too high. The plan counts the FAT instead, so a write that does not
/// fit is refused before anything is written (believing the count, it deleted the
/// old files and then found no room); one that fits leaves a right count.
#[test]
fn a_stale_free_count_is_not_believed() {
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("stick.img");
    stick_made_by_mkfs_fat(&image, 400, "c", &["-F", "32", "-n", "LIVE"]);
    let filler = dir.path().join("filler.bin");
    File::create(&filler).unwrap().set_len(250 << 20).unwrap();
    let copied = std::process::Command::new(tool("mcopy"))
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{}", image.display(), 1 << 20))
        .arg(&filler)
        .arg("::/filler.bin")
        .output()
        .expect("mcopy");
    assert!(copied.status.success(), "{copied:?}");
    // The FSInfo sector's free count (offset 488) said 90000 clusters, about 350 MiB.
    let start = 1u64 << 20;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    let bpb = read(&mut f, start, 512);
    let fsinfo = start + u64::from(u16::from_le_bytes([bpb[48], bpb[49]])) * 512;
    f.seek(SeekFrom::Start(fsinfo + 488)).unwrap();
    f.write_all(&90_000u32.to_le_bytes()).unwrap();
    drop(f);

    let before = sha256_file(&image);
    let write = |overlay_mb: &str| {
        livestick(&[
            "write",
            iso.to_str().unwrap(),
            image.to_str().unwrap(),
            "--noformat",
            "--overlay-size-mb",
            overlay_mb,
            "--yes",
            "--force",
        ])
    };
    let refused = write("140");
    let text = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{text}");
    assert!(text.contains("too small"), "{text}");
    assert_eq!(
        sha256_file(&image),
        before,
        "a refused write changed the stick"
    );

    ok(&write("40"));
    let len = (400u64 << 20) - start;
    fsck_fat(&image, start, len, dir.path());
}
