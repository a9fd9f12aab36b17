//! Replays the committed cargo-fuzz corpora (and any committed crash regressions) through
//! the same checks as the targets in `fuzz/fuzz_targets/` (snapshot_store, tar_stream,
//! erofs_xattr, luks_header), on the stable toolchain, so CI exercises every input the fuzzer found
//! interesting without nightly or cargo-fuzz.

use std::path::{Path, PathBuf};

#[path = "../../fuzz/check/snapshot_store.rs"]
mod check;
#[path = "../../fuzz/check/erofs_xattr.rs"]
mod check_erofs_xattr;
#[path = "../../fuzz/check/luks_header.rs"]
mod check_luks_header;
#[path = "../../fuzz/check/tar_stream.rs"]
mod check_tar_stream;

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

#[test]
fn snapshot_store_corpus_and_regressions() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let corpus = inputs(&root.join("corpus/snapshot_store"));
    // The corpus is committed; an empty one means the path moved, not that all is well.
    assert!(!corpus.is_empty(), "no corpus under {}", root.display());
    // Only the committed, minimised crashes; fresh `crash-*` files stay local.
    let regressions: Vec<PathBuf> = inputs(&root.join("artifacts/snapshot_store"))
        .into_iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("regression-"))
        })
        .collect();
    for path in corpus.iter().chain(&regressions) {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // A panic names the input, so a CI failure can be replayed with `cargo fuzz run`.
        let name = path.display().to_string();
        let r = std::panic::catch_unwind(|| check::fuzz_one(&data));
        assert!(r.is_ok(), "fuzz check failed on {name}");
    }
}

fn replay(target: &str, check: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let corpus = inputs(&root.join("corpus").join(target));
    assert!(!corpus.is_empty(), "no corpus for {target}");
    let regressions = inputs(&root.join("artifacts").join(target))
        .into_iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("regression-"))
        });
    for path in corpus.iter().cloned().chain(regressions) {
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let r = std::panic::catch_unwind(|| check(&data));
        assert!(r.is_ok(), "fuzz check failed on {}", path.display());
    }
}

#[test]
fn tar_stream_corpus_and_regressions() {
    replay("tar_stream", check_tar_stream::fuzz_one);
}

#[test]
fn erofs_xattr_corpus_and_regressions() {
    replay("erofs_xattr", check_erofs_xattr::fuzz_one);
}

#[test]
fn luks_header_corpus_and_regressions() {
    replay("luks_header", check_luks_header::fuzz_one);
}

/// The seeds made by cryptsetup 2.6 (pbkdf2 and argon2i/argon2id, 256- and
/// 512-bit keys, 512- and 4096-byte sectors) and by livestick still open with
/// the hardened reader, so the fuzzer starts from headers that reach the keyslot
/// and data paths.
#[test]
fn luks_header_seeds_open() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/luks_header");
    let seeds = [
        "cryptsetup-a",
        "cryptsetup-b",
        "cryptsetup-c",
        "cryptsetup-d",
        "livestick-pbkdf2",
        "livestick-argon2id",
    ];
    for name in seeds {
        let data = std::fs::read(dir.join(name)).unwrap();
        let r = livestick::persist::luks::open_luks2(std::io::Cursor::new(data), b"pw");
        assert!(r.is_ok(), "{name}: {:?}", r.err());
    }
}

/// Writes the livestick-made seeds of `fuzz/corpus/luks_header` (the
/// cryptsetup-made ones come from `cryptsetup luksFormat`, see fuzz/README.md):
/// `cargo test --test fuzz_corpus write_luks_header_seeds -- --ignored`.
///
/// A container as `format_luks2` writes it is 16 MiB before its first data
/// byte, too big to fuzz; the seeds keep its headers and keyslot and move the
/// data segment right after the keyslot area (JSON and checksums rewritten),
/// so they still open with `pw`. One more is the plain first 64 KiB.
#[test]
#[ignore]
fn write_luks_header_seeds() {
    use livestick::persist::luks::{LuksParams, PbkdfKind, format_luks2};
    use sha2::{Digest, Sha256};
    use std::io::Cursor;

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/luks_header");
    std::fs::create_dir_all(&dir).unwrap();
    let pbkdf2 = LuksParams {
        pbkdf: PbkdfKind::Pbkdf2,
        force_iterations: Some(1000),
        sector_size: 512,
        ..LuksParams::default()
    };
    let argon2 = LuksParams {
        memory_kib: 32,
        ..LuksParams::insecure_fast()
    };
    for (name, params) in [("livestick-pbkdf2", pbkdf2), ("livestick-argon2id", argon2)] {
        let plain: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let mut out = Cursor::new(Vec::new());
        format_luks2(&mut plain.as_slice(), 8192, &mut out, b"pw", &params).unwrap();
        let full = out.into_inner();
        if name == "livestick-pbkdf2" {
            std::fs::write(dir.join("livestick-truncated-64k"), &full[..65536]).unwrap();
        }
        // Headers (2 × 16 KiB) and the 252 KiB keyslot area, then the data.
        let meta_end = 32768 + 258048;
        let data_offset = livestick::persist::luks::DATA_OFFSET as usize;
        let mut small = full[..meta_end].to_vec();
        small.extend_from_slice(&full[data_offset..]);
        for hdr in [0usize, 16384] {
            let area = &mut small[hdr + 4096..hdr + 16384];
            let end = area.iter().position(|&b| b == 0).unwrap();
            let mut json: serde_json::Value = serde_json::from_slice(&area[..end]).unwrap();
            json["segments"]["0"]["offset"] = meta_end.to_string().into();
            json["config"]["keyslots_size"] = "258048".into();
            let text = serde_json::to_vec(&json).unwrap();
            area.fill(0);
            area[..text.len()].copy_from_slice(&text);
            small[hdr + 448..hdr + 512].fill(0);
            let sum = Sha256::digest(&small[hdr..hdr + 16384]);
            small[hdr + 448..hdr + 480].copy_from_slice(&sum);
        }
        std::fs::write(dir.join(name), &small).unwrap();
    }
}

#[path = "../../fuzz/check/stick_image.rs"]
mod check_stick_image;

#[test]
fn stick_image_corpus_and_regressions() {
    replay("stick_image", check_stick_image::fuzz_one);
}

/// The records that make `image` (whole sectors; all-zero ones left out): how
/// the seeds are made from real stick images.
fn records_of(image: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (n, s) in image.chunks(512).enumerate() {
        if s.iter().any(|&b| b != 0) {
            out.extend_from_slice(&(n as u32).to_le_bytes());
            let mut sector = [0u8; 512];
            sector[..s.len()].copy_from_slice(s);
            out.extend_from_slice(&sector);
        }
    }
    out
}

/// The damaged seeds are refused by `fat::open`, naming the damage, before
/// fatfs follows the looping chain (a file's, or a directory inside itself).
#[test]
fn stick_image_damaged_seeds_are_refused() {
    use livestick::disk::fat::{self, FatError};
    use livestick::disk::partition;
    use livestick::io::PartitionWindow;

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/stick_image");
    for (name, says) in [
        (
            "damaged-file-chain-loops",
            "SQUASHFS.IMG: its cluster chain reaches cluster",
        ),
        ("damaged-directory-inside-itself", "a second time"),
    ] {
        let data = std::fs::read(dir.join(name)).unwrap();
        let mut disk = check_stick_image::SparseDisk::from_records(&data);
        let size = check_stick_image::DISK_BYTES;
        let (start, len) = match partition::find_fat_partition(&mut disk, size) {
            Ok(p) => (p.start, p.len),
            Err(_) => (0, size),
        };
        let mut window = PartitionWindow::new(&mut disk, start, len);
        match fat::open(&mut window) {
            Err(FatError::Damaged(why)) => assert!(why.contains(says), "{name}: {why}"),
            other => panic!("{name}: {:?}", other.map(|_| ())),
        }
    }
}

/// Writes the seeds of `fuzz/corpus/stick_image` (sparse records of real stick
/// images, see `fuzz/check/stick_image.rs`):
/// `cargo test --test fuzz_corpus write_stick_image_seeds -- --ignored`.
/// Sticks as livestick writes them (MBR, GPT, no table) with a LiveOS tree; the
/// same with a file's chain looping and with a directory inside itself; FAT16
/// and FAT12 volumes from mkfs.fat and mtools; an MBR with logical partitions
/// from sfdisk.
#[test]
#[ignore]
fn write_stick_image_seeds() {
    use livestick::disk::partition::{TableKind, layout_single, write_table};
    use livestick::disk::{fat, fat_raw};
    use livestick::io::PartitionWindow;
    use std::io::{Cursor, Seek, SeekFrom, Write};
    use std::process::Command;

    const DISK: u64 = check_stick_image::DISK_BYTES;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/stick_image");
    std::fs::create_dir_all(&dir).unwrap();
    let save = |name: &str, image: &[u8]| {
        std::fs::write(dir.join(name), records_of(image)).unwrap();
    };
    let files: [(&str, Vec<u8>); 6] = [
        ("/LiveOS/squashfs.img", b"hsqs".repeat(600)),
        (
            "/LiveOS/overlay-LIVE-1234-ABCD",
            b"SnAp\x01\0\0\0\x01\0\0\0\x08\0\0\0".to_vec(),
        ),
        ("/LiveOS/home.img", vec![0x5a; 3000]),
        (
            "/syslinux/syslinux.cfg",
            b"label linux\n  kernel /syslinux/vmlinuz\n".to_vec(),
        ),
        (
            "/EFI/BOOT/grub.cfg",
            b"menuentry 'Live' {\n linux /vmlinuz\n}\n".to_vec(),
        ),
        ("/EFI/BOOT/BOOTX64.EFI", b"MZ".repeat(700)),
    ];
    let live_stick = |table: Option<TableKind>| -> Cursor<Vec<u8>> {
        let mut disk = Cursor::new(vec![0u8; DISK as usize]);
        let (start, len) = match table {
            Some(t) => {
                let layout = layout_single(DISK, t).unwrap();
                write_table(&mut disk, &layout, Some(&[0x90; 440]), 0x1234_abcd).unwrap();
                (layout.start, layout.len)
            }
            None => (0, DISK),
        };
        let mut w = PartitionWindow::new(&mut disk, start, len);
        fat::format(&mut w, "LIVE", 0x1234_abcd, (start / 512) as u32).unwrap();
        let fs = fat::open(&mut w).unwrap();
        for (path, bytes) in &files {
            fat::write_file(&fs, path, &mut &bytes[..], bytes.len() as u64, |_| {}).unwrap();
        }
        fs.unmount().unwrap();
        w.flush().unwrap();
        drop(w);
        disk
    };
    save("livestick-mbr", live_stick(Some(TableKind::Mbr)).get_ref());
    save("livestick-gpt", live_stick(Some(TableKind::Gpt)).get_ref());
    save("livestick-superfloppy", live_stick(None).get_ref());

    // The same stick, damaged: squashfs.img's chain loops back to its start;
    // /EFI/BOOT's entry for itself points at /EFI (a directory inside itself).
    let mut disk = live_stick(Some(TableKind::Mbr));
    let part = 1 << 20;
    let first = fat_raw::find_entry(&mut disk, part, "/LiveOS/squashfs.img")
        .unwrap()
        .first_cluster;
    let mut bpb = [0u8; 512];
    bpb.copy_from_slice(&disk.get_ref()[part as usize..part as usize + 512]);
    let fat_at = part + u64::from(u16::from_le_bytes([bpb[14], bpb[15]])) * 512;
    let entry = |c: u32| (fat_at + u64::from(c) * 4) as usize;
    disk.get_mut()[entry(first + 1)..entry(first + 1) + 4].copy_from_slice(&first.to_le_bytes());
    save("damaged-file-chain-loops", disk.get_ref());
    let mut disk = live_stick(None);
    let grub = fat_raw::find_entry(&mut disk, 0, "/EFI/BOOT/grub.cfg").unwrap();
    // grub.cfg's entry now claims to be a directory whose first cluster is the
    // directory it sits in.
    let boot_cluster = {
        let mut bpb = [0u8; 512];
        bpb.copy_from_slice(&disk.get_ref()[..512]);
        let cluster_bytes = u64::from(bpb[13]) * 512;
        let data = (u64::from(u16::from_le_bytes([bpb[14], bpb[15]]))
            + u64::from(bpb[16])
                * u64::from(u32::from_le_bytes([bpb[36], bpb[37], bpb[38], bpb[39]])))
            * 512;
        ((grub.offset - data) / cluster_bytes + 2) as u32
    };
    let at = grub.offset as usize;
    disk.get_mut()[at + 11] = 0x10;
    disk.get_mut()[at + 20..at + 22].copy_from_slice(&((boot_cluster >> 16) as u16).to_le_bytes());
    disk.get_mut()[at + 26..at + 28].copy_from_slice(&(boot_cluster as u16).to_le_bytes());
    disk.get_mut()[at + 28..at + 32].fill(0);
    save("damaged-directory-inside-itself", disk.get_ref());

    // FAT16 and FAT12 as mkfs.fat makes them, with files copied in by mtools.
    for (name, fat_bits, mib) in [("mkfs-fat16", "16", 32), ("mkfs-fat12", "12", 4)] {
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("fat.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        let run = |cmd: &mut Command| assert!(cmd.status().unwrap().success(), "{cmd:?}");
        run(Command::new("mkfs.fat")
            .args(["-F", fat_bits, "-n", "LIVE"])
            .arg(&img));
        let i = img.to_str().unwrap();
        for d in ["::/LiveOS", "::/EFI", "::/EFI/BOOT"] {
            run(Command::new("mmd")
                .env("MTOOLS_SKIP_CHECK", "1")
                .args(["-i", i, d]));
        }
        for (path, bytes) in &files {
            let src = tmp.path().join("f");
            std::fs::write(&src, bytes).unwrap();
            let to = format!("::{path}");
            if path.starts_with("/syslinux") {
                continue;
            }
            run(Command::new("mcopy")
                .env("MTOOLS_SKIP_CHECK", "1")
                .args(["-i", i])
                .arg(&src)
                .arg(&to));
        }
        save(name, &std::fs::read(&img).unwrap());
    }

    // An MBR with an extended partition and two logical ones, and a FAT32
    // primary partition livestick would install into.
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(DISK).unwrap();
    let i = img.to_str().unwrap().to_string();
    let mut child = Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel", &i])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(
            format!(
                "label: dos\n{i}1 : start=2048, size=4096, type=83\n{i}2 : start=8192, size=16384, type=5\n\
                 {i}3 : start=32768, size=98304, type=c, bootable\n{i}5 : size=4096, type=82\n{i}6 : size=4096, type=c\n"
            )
            .as_bytes(),
        )
        .unwrap();
    assert!(child.wait().unwrap().success());
    let mut disk = Cursor::new(std::fs::read(&img).unwrap());
    {
        let mut w = PartitionWindow::new(&mut disk, 32768 * 512, 98304 * 512);
        fat::format(&mut w, "LIVE", 7, 32768).unwrap();
        w.flush().unwrap();
    }
    disk.seek(SeekFrom::Start(0)).unwrap();
    save("sfdisk-logical-partitions", disk.get_ref());
}
