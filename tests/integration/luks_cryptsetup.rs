//! The LUKS2 writer and reader, checked against the real `cryptsetup` on
//! regular files (no device-mapper, no mount). Every test uses cheap KDF
//! settings so the suite stays fast.
//!
//! What each test proves:
//! - `luksdump_shows_our_parameters_and_test_passphrase_accepts`: our headers,
//!   JSON, keyslot KDF, AF split, keyslot encryption and digest are what
//!   cryptsetup expects (it only accepts a passphrase when the merged key
//!   matches the digest), and a wrong passphrase is rejected.
//! - `cryptsetup_recovers_the_volume_key_we_wrote`: the key cryptsetup
//!   unlocks is byte for byte the key we encrypted the data with.
//! - `cryptsetup_reencrypt_decrypts_our_data`: cryptsetup re-keys our
//!   container offline (decrypting our ciphertext with its own code, then
//!   encrypting with a new key); our reader then finds the same ext4 `HOME`,
//!   which it could not if cryptsetup had read our sectors differently.
//! - `we_open_what_cryptsetup_encrypted`: data encrypted by cryptsetup (512-
//!   and 4096-byte sectors, pbkdf2 and argon2id) decrypts with our reader to
//!   an ext4 that `blkid` and `dumpe2fs` call `HOME`.
//! - `metadata_regions_alone_make_a_container`: `LuksEncryptingReader::
//!   metadata_regions()` names every byte of the header area that matters:
//!   a container written as only those ranges plus the data sectors that hold
//!   something, over random bytes, passes `cryptsetup open --test-passphrase`,
//!   shows its keyslot in `luksDump`, is `crypto_LUKS` with its UUID to
//!   `blkid -p`, and decrypts with our reader.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::support::{c_locale_output as run, installed as tool};
use livestick::disk::ext4::{Ext4Info, Ext4Options, ext4_info, make_ext4_image};
use livestick::persist::luks::{
    DATA_OFFSET, LuksEncryptingReader, LuksError, LuksParams, PbkdfKind, format_luks2,
    format_luks2_with_volume_key, open_luks2,
};

const PASS: &[u8] = b"correct horse battery staple";
const MIB: u64 = 1024 * 1024;

/// cryptsetup, or `None` (test skipped with a note) when it is not installed.
fn cryptsetup() -> Option<PathBuf> {
    let t = tool("cryptsetup");
    if t.is_none() {
        eprintln!("SKIP: cryptsetup is not installed (Debian: cryptsetup-bin, Fedora: cryptsetup)");
    }
    t
}

fn key_file(dir: &Path, name: &str, pass: &[u8]) -> String {
    let p = dir.join(name);
    fs::write(&p, pass).unwrap();
    p.to_str().unwrap().to_string()
}

/// An 8 MiB ext4 image labelled HOME.
fn home_ext4(dir: &Path) -> PathBuf {
    let p = dir.join("plain.ext4");
    make_ext4_image(&p, 8 * MIB, "HOME", &blocks_4k()).unwrap();
    p
}

/// 4 KiB ext4 blocks: a 4096-byte encryption sector needs them.
fn blocks_4k() -> Ext4Options {
    Ext4Options {
        block_size: Some(4096),
        ..Ext4Options::default()
    }
}

fn cheap_argon2() -> LuksParams {
    LuksParams {
        pbkdf: PbkdfKind::Argon2id,
        memory_kib: 64,
        parallel: 1,
        force_iterations: Some(4),
        sector_size: 4096,
        ..LuksParams::default()
    }
}

fn cheap_pbkdf2() -> LuksParams {
    LuksParams {
        pbkdf: PbkdfKind::Pbkdf2,
        force_iterations: Some(1000),
        sector_size: 512,
        ..LuksParams::default()
    }
}

fn make_container(dir: &Path, params: &LuksParams, name: &str) -> PathBuf {
    let plain = home_ext4(dir);
    let out_path = dir.join(name);
    let mut src = File::open(&plain).unwrap();
    let mut out = File::create(&out_path).unwrap();
    let f = format_luks2(&mut src, 8 * MIB, &mut out, PASS, params).unwrap();
    assert_eq!(f.total_len, DATA_OFFSET + 8 * MIB);
    assert_eq!(fs::metadata(&out_path).unwrap().len(), f.total_len);
    out_path
}

/// Decrypt the container with our reader into a file and check it is ext4 `HOME`
/// according to our superblock parser, `dumpe2fs` and `blkid`.
fn assert_home_inside(container: &Path, dir: &Path) {
    let mut vol = open_luks2(File::open(container).unwrap(), PASS).unwrap();
    let info = Ext4Info::read_from(&mut vol).unwrap();
    assert_eq!(info.label, "HOME");
    vol.seek(SeekFrom::Start(0)).unwrap();
    let plain = dir.join("decrypted.ext4");
    let mut bytes = Vec::new();
    vol.read_to_end(&mut bytes).unwrap();
    fs::write(&plain, &bytes).unwrap();
    assert_eq!(ext4_info(&plain).unwrap().label, "HOME");
    // Every block decrypted right: a read-only full check finds nothing.
    if let Some(fsck) = tool("e2fsck") {
        let out = run(&fsck, &["-f", "-n", plain.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "e2fsck on the decrypted image: {out:?}"
        );
    }
    if let Some(blkid) = tool("blkid") {
        let out = run(&blkid, &["-p", "-o", "export", plain.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("TYPE=ext4"), "blkid: {text}");
        assert!(text.contains("LABEL=HOME"), "blkid: {text}");
    }
}

#[test]
fn luksdump_shows_our_parameters_and_test_passphrase_accepts() {
    let Some(cs) = cryptsetup() else { return };
    for (params, expect) in [
        (
            cheap_argon2(),
            vec![
                "sector: 4096 [bytes]",
                "PBKDF:      argon2id",
                "Time cost:  4",
                "Memory:     64",
                "Threads:    1",
            ],
        ),
        (
            cheap_pbkdf2(),
            vec![
                "sector: 512 [bytes]",
                "PBKDF:      pbkdf2",
                "Iterations: 1000",
            ],
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let img = make_container(dir.path(), &params, "home.img");
        let img_s = img.to_str().unwrap();
        let dump = run(&cs, &["luksDump", "--disable-locks", img_s]);
        assert!(dump.status.success(), "{dump:?}");
        let text = String::from_utf8_lossy(&dump.stdout);
        for want in [
            "Version:       \t2",
            "Metadata area: \t16384 [bytes]",
            "Keyslots area: \t16744448 [bytes]",
            "offset: 16777216 [bytes]",
            "length: (whole device)",
            "cipher: aes-xts-plain64",
            "Key:        512 bits",
            "Cipher:     aes-xts-plain64",
            "Cipher key: 512 bits",
            "AF stripes: 4000",
            "AF hash:    sha256",
            "Area offset:32768 [bytes]",
            "Area length:258048 [bytes]",
        ]
        .iter()
        .chain(expect.iter())
        {
            assert!(text.contains(want), "luksDump lacks {want:?}:\n{text}");
        }
        let good = key_file(dir.path(), "good", PASS);
        let ok = run(
            &cs,
            &[
                "open",
                "--disable-locks",
                "--test-passphrase",
                "--key-file",
                &good,
                img_s,
            ],
        );
        assert!(ok.status.success(), "right passphrase refused: {ok:?}");
        let bad = key_file(dir.path(), "bad", b"correct horse battery stapler");
        let no = run(
            &cs,
            &[
                "open",
                "--disable-locks",
                "--test-passphrase",
                "--key-file",
                &bad,
                img_s,
            ],
        );
        // cryptsetup's exit code 2 means "no permission (bad passphrase)".
        assert_eq!(no.status.code(), Some(2), "wrong passphrase: {no:?}");
        // And our own reader agrees on both.
        assert_home_inside(&img, dir.path());
        assert!(matches!(
            open_luks2(File::open(&img).unwrap(), b"correct horse battery stapler"),
            Err(LuksError::WrongPassphrase)
        ));
    }
}

#[test]
fn cryptsetup_recovers_the_volume_key_we_wrote() {
    let Some(cs) = cryptsetup() else { return };
    let dir = tempfile::tempdir().unwrap();
    let plain = home_ext4(dir.path());
    let img = dir.path().join("home.img");
    let vk: [u8; 64] = std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(11));
    format_luks2_with_volume_key(
        &mut File::open(&plain).unwrap(),
        8 * MIB,
        &mut File::create(&img).unwrap(),
        PASS,
        &cheap_argon2(),
        &vk,
    )
    .unwrap();
    let good = key_file(dir.path(), "good", PASS);
    let out = run(
        &cs,
        &[
            "luksDump",
            "--disable-locks",
            "--batch-mode",
            "--dump-volume-key",
            "--key-file",
            &good,
            img.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    // The key is printed as hex pairs after "MK dump:", over several lines.
    let start = text.find("MK dump:").expect("MK dump in output") + "MK dump:".len();
    let hex: String = text[start..]
        .split_whitespace()
        .take_while(|w| w.len() == 2 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .collect();
    let expect: String = vk.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, expect);
}

#[test]
fn cryptsetup_reencrypt_decrypts_our_data() {
    let Some(cs) = cryptsetup() else { return };
    for params in [cheap_argon2(), cheap_pbkdf2()] {
        let dir = tempfile::tempdir().unwrap();
        let img = make_container(dir.path(), &params, "home.img");
        let before = fs::read(&img).unwrap();
        let good = key_file(dir.path(), "good", PASS);
        let out = run(
            &cs,
            &[
                "reencrypt",
                "--disable-locks",
                "--batch-mode",
                "--force-offline-reencrypt",
                "--key-file",
                &good,
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
                img.to_str().unwrap(),
            ],
        );
        assert!(out.status.success(), "reencrypt failed: {out:?}");
        let after = fs::read(&img).unwrap();
        let d = DATA_OFFSET as usize;
        assert_ne!(
            &before[d..d + 4096],
            &after[d..d + 4096],
            "cryptsetup did not re-encrypt the data"
        );
        assert_home_inside(&img, dir.path());
    }
}

#[test]
fn we_open_what_cryptsetup_encrypted() {
    let Some(cs) = cryptsetup() else { return };
    let cases: [&[&str]; 3] = [
        &[
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--sector-size",
            "512",
        ],
        &[
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--sector-size",
            "4096",
        ],
        &[
            "--pbkdf",
            "argon2id",
            "--pbkdf-memory",
            "32",
            "--pbkdf-parallel",
            "1",
            "--pbkdf-force-iterations",
            "4",
            "--sector-size",
            "4096",
        ],
    ];
    for extra in cases {
        let dir = tempfile::tempdir().unwrap();
        // ext4 in the first 8 MiB of a 24 MiB file; cryptsetup encrypts it in
        // place, shifting the data to make room for its header.
        let img = dir.path().join("home.img");
        make_ext4_image(&img, 8 * MIB, "HOME", &blocks_4k()).unwrap();
        File::options()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(24 * MIB)
            .unwrap();
        let good = key_file(dir.path(), "good", PASS);
        let mut args = vec![
            "reencrypt",
            "--disable-locks",
            "--batch-mode",
            "--encrypt",
            "--type",
            "luks2",
            "--reduce-device-size",
            "16M",
            "--key-file",
            &good,
        ];
        args.extend_from_slice(extra);
        args.push(img.to_str().unwrap());
        let out = run(&cs, &args);
        assert!(out.status.success(), "cryptsetup encrypt failed: {out:?}");
        let vol = open_luks2(File::open(&img).unwrap(), PASS).unwrap();
        let ss: u32 = extra[extra.len() - 1].parse().unwrap();
        assert_eq!(vol.info().sector_size, ss);
        assert_eq!(vol.info().key_bits, 512);
        drop(vol);
        assert_home_inside(&img, dir.path());
        assert!(matches!(
            open_luks2(File::open(&img).unwrap(), b"nope"),
            Err(LuksError::WrongPassphrase)
        ));
    }
}

#[test]
fn metadata_regions_alone_make_a_container() {
    use rand::RngCore;
    let Some(cs) = cryptsetup() else { return };
    for (params, kdf_line) in [
        (cheap_pbkdf2(), "Iterations: 1000"),
        (cheap_argon2(), "PBKDF:      argon2id"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let plain_path = home_ext4(dir.path());
        let plain = fs::read(&plain_path).unwrap();
        let mut enc =
            LuksEncryptingReader::new(File::open(&plain_path).unwrap(), 8 * MIB, PASS, &params)
                .unwrap();
        // Random bytes everywhere first: stale data the writer never touches.
        let img = dir.path().join("home.img");
        let mut junk = vec![0u8; enc.len() as usize];
        rand::thread_rng().fill_bytes(&mut junk);
        fs::write(&img, &junk).unwrap();
        drop(junk);

        // The metadata regions, then the data sectors whose plaintext is not zero.
        let ss = u64::from(params.sector_size);
        let mut ranges = enc.metadata_regions();
        assert!(ranges.iter().all(|r| r.end <= DATA_OFFSET));
        let copied_sectors: Vec<u64> = (0..8 * MIB / ss)
            .filter(|&i| {
                plain[(i * ss) as usize..((i + 1) * ss) as usize]
                    .iter()
                    .any(|&b| b != 0)
            })
            .collect();
        ranges.extend(
            copied_sectors
                .iter()
                .map(|&i| DATA_OFFSET + i * ss..DATA_OFFSET + (i + 1) * ss),
        );
        let mut out = File::options().write(true).open(&img).unwrap();
        for r in &ranges {
            let mut buf = vec![0u8; (r.end - r.start) as usize];
            enc.seek(SeekFrom::Start(r.start)).unwrap();
            enc.read_exact(&mut buf).unwrap();
            out.seek(SeekFrom::Start(r.start)).unwrap();
            out.write_all(&buf).unwrap();
        }
        drop(out);

        let img_s = img.to_str().unwrap();
        let good = key_file(dir.path(), "good", PASS);
        let ok = run(
            &cs,
            &[
                "open",
                "--disable-locks",
                "--test-passphrase",
                "--key-file",
                &good,
                img_s,
            ],
        );
        assert!(ok.status.success(), "right passphrase refused: {ok:?}");
        let dump = run(&cs, &["luksDump", "--disable-locks", img_s]);
        assert!(dump.status.success(), "{dump:?}");
        let text = String::from_utf8_lossy(&dump.stdout);
        let uuid = enc.uuid().hyphenated().to_string();
        for want in [
            "Keyslots:\n  0: luks2",
            "Key:        512 bits",
            kdf_line,
            "AF stripes: 4000",
            "Area offset:32768 [bytes]",
            &format!("UUID:          \t{uuid}"),
        ] {
            assert!(text.contains(want), "luksDump lacks {want:?}:\n{text}");
        }
        if let Some(blkid) = tool("blkid") {
            let out = run(&blkid, &["-p", "-o", "export", img_s]);
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "blkid: {out:?}");
            assert!(text.contains("TYPE=crypto_LUKS"), "blkid: {text}");
            assert!(text.contains(&format!("UUID={uuid}")), "blkid: {text}");
            assert!(text.contains("VERSION=2"), "blkid: {text}");
        }
        // Our reader: every sector written decrypts to its plaintext, and the
        // superblock names HOME.
        let mut vol = open_luks2(File::open(&img).unwrap(), PASS).unwrap();
        let mut back = Vec::new();
        vol.read_to_end(&mut back).unwrap();
        for &i in &copied_sectors {
            let r = (i * ss) as usize..((i + 1) * ss) as usize;
            assert!(back[r.clone()] == plain[r], "sector {i}");
        }
        vol.seek(SeekFrom::Start(0)).unwrap();
        assert_eq!(Ext4Info::read_from(&mut vol).unwrap().label, "HOME");
    }
}
