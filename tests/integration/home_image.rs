//! home.img: building it (plain and LUKS2), describing it, and growing it,
//! checked with e2fsprogs, blkid and cryptsetup on regular files.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use crate::support::{c_locale_output as run, installed as tool};
use crate::support::{e2fsck_clean as fsck_clean, luks_decrypt_to as decrypt_to};
use livestick::disk::ext4::{Ext4Info, Ext4Options, make_ext4_image};
use livestick::persist::home::{
    HomeEncryption, HomeError, build_home_image, home_info, home_info_from, home_resize,
};
use livestick::persist::luks::{
    DATA_OFFSET, LuksError, LuksParams, PbkdfKind, format_luks2, open_luks2,
};
use zeroize::Zeroizing;

const MIB: u64 = 1024 * 1024;
const PASS: &[u8] = b"home sweet home";

fn cheap() -> LuksParams {
    LuksParams {
        pbkdf: PbkdfKind::Argon2id,
        memory_kib: 64,
        parallel: 1,
        force_iterations: Some(4),
        ..LuksParams::default()
    }
}

fn luks(pass: &[u8]) -> HomeEncryption {
    HomeEncryption::Luks {
        passphrase: Zeroizing::new(pass.to_vec()),
        params: cheap(),
    }
}

/// Stream a built image into a file, as the write command streams it into FAT.
fn save(mut img: impl Read, path: &Path) {
    let mut f = File::create(path).unwrap();
    std::io::copy(&mut img, &mut f).unwrap();
}

fn blkid(path: &Path) -> String {
    match tool("blkid") {
        Some(b) => String::from_utf8_lossy(
            &run(&b, &["-p", "-o", "export", path.to_str().unwrap()]).stdout,
        )
        .into_owned(),
        None => String::new(),
    }
}

fn debugfs(image: &Path, write: bool, cmd: &str) -> String {
    let d = tool("debugfs").expect("debugfs (e2fsprogs) is needed for this test");
    let mut args = vec![];
    if write {
        args.push("-w");
    }
    args.extend(["-R", cmd, image.to_str().unwrap()]);
    let out = run(&d, &args);
    assert!(out.status.success(), "debugfs {cmd}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn plain_home_is_ext4_home_with_lazy_inode_tables() {
    let dir = tempfile::tempdir().unwrap();
    let img = build_home_image(dir.path(), 32 * MIB, HomeEncryption::None).unwrap();
    assert_eq!(img.len(), 32 * MIB);
    assert!(!img.is_encrypted());
    let path = dir.path().join("home.img");
    save(img, &path);
    assert_eq!(fs::metadata(&path).unwrap().len(), 32 * MIB);
    // The temporary file is already unlinked: only home.img is in workdir.
    let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(names.len(), 1);

    let text = blkid(&path);
    if !text.is_empty() {
        assert!(
            text.contains("TYPE=ext4") && text.contains("LABEL=HOME"),
            "{text}"
        );
    }
    fsck_clean(&path);
    let info = home_info(&path, None).unwrap();
    assert!(!info.encrypted);
    let fs = info.fs.unwrap();
    assert_eq!(fs.label, "HOME");
    assert_eq!(fs.block_size, 4096);
    assert_eq!(fs.size_bytes, 32 * MIB);
    assert_eq!(fs.reserved_blocks, 0);
    // The superblock parser (used through readers) agrees with dumpe2fs.
    let via_reader = home_info_from(File::open(&path).unwrap(), None).unwrap();
    assert_eq!(via_reader.fs.unwrap(), fs);

    if let Some(d) = tool("dumpe2fs") {
        let out = String::from_utf8_lossy(&run(&d, &[path.to_str().unwrap()]).stdout).into_owned();
        // What mke2fs zeroes is a hole, and a hole is never written to the stick,
        // where it holds stale bytes: no group may claim a zeroed inode table (the
        // kernel zeroes them after the first mount).
        let groups = out
            .lines()
            .filter(|l| {
                l.strip_prefix("Group ")
                    .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
            })
            .count();
        assert!(groups > 0);
        assert_eq!(out.matches("ITABLE_ZEROED").count(), 0, "{out}");
        assert!(
            out.contains("user_xattr acl"),
            "default mount options: {out}"
        );
        assert!(out.contains("Filesystem OS type:       Linux"));
        let root = debugfs(&path, false, "stat /");
        assert!(root.contains("User:     0   Group:     0"), "{root}");
    }
}

#[test]
fn luks_home_opens_with_cryptsetup_and_holds_ext4_home() {
    let dir = tempfile::tempdir().unwrap();
    let img = build_home_image(dir.path(), 48 * MIB, luks(PASS)).unwrap();
    assert!(img.is_encrypted());
    assert_eq!(img.len(), 48 * MIB);
    let path = dir.path().join("home.img");
    save(img, &path);
    assert_eq!(fs::metadata(&path).unwrap().len(), 48 * MIB);

    let text = blkid(&path);
    if !text.is_empty() {
        assert!(text.contains("TYPE=crypto_LUKS"), "{text}");
        assert!(text.contains("VERSION=2"), "{text}");
    }
    if let Some(cs) = tool("cryptsetup") {
        let good = dir.path().join("good");
        fs::write(&good, PASS).unwrap();
        let bad = dir.path().join("bad");
        fs::write(&bad, b"home sweet home!").unwrap();
        let p = path.to_str().unwrap();
        let test = |k: &Path| {
            run(
                &cs,
                &[
                    "open",
                    "--disable-locks",
                    "--test-passphrase",
                    "--key-file",
                    k.to_str().unwrap(),
                    p,
                ],
            )
        };
        assert!(test(&good).status.success());
        assert_eq!(test(&bad).status.code(), Some(2));
    }

    let locked = home_info(&path, None).unwrap();
    assert!(locked.encrypted);
    assert!(locked.fs.is_none());
    let info = home_info(&path, Some(PASS)).unwrap();
    let fs = info.fs.unwrap();
    assert_eq!(fs.label, "HOME");
    assert_eq!(fs.size_bytes, 48 * MIB - DATA_OFFSET);
    let l = info.luks.unwrap();
    assert_eq!((l.cipher.as_str(), l.key_bits), ("aes-xts-plain64", 512));
    assert_eq!(l.keyslot_kdf, "argon2id");
    assert!(matches!(
        home_info(&path, Some(b"nope")),
        Err(HomeError::Luks(LuksError::WrongPassphrase))
    ));

    let plain = dir.path().join("plain.ext4");
    decrypt_to(&path, &plain, PASS);
    fsck_clean(&plain);
    let text = blkid(&plain);
    if !text.is_empty() {
        assert!(
            text.contains("TYPE=ext4") && text.contains("LABEL=HOME"),
            "{text}"
        );
    }
}

#[test]
fn bad_home_inputs_are_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    // A home over FAT32's file limit is the plan's call now (the ext4 live layout
    // takes it; `plan::tests::persistence_sizes_are_checked`), not the builder's.
    let e = build_home_image(dir.path(), 16 * MIB, luks(PASS))
        .err()
        .unwrap();
    assert!(e.to_string().contains("at least 32 MiB"), "{e}");
    let e = build_home_image(dir.path(), 32 * MIB + 512, HomeEncryption::None)
        .err()
        .unwrap();
    assert!(matches!(e, HomeError::NotWholeMib { .. }), "{e}");
    let e = build_home_image(dir.path(), 64 * MIB, luks(b""))
        .err()
        .unwrap();
    assert!(matches!(e, HomeError::EmptyPassphrase), "{e}");
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing was left behind"
    );
}

#[test]
fn grow_plain_home_keeps_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("home.img");
    save(
        build_home_image(dir.path(), 32 * MIB, HomeEncryption::None).unwrap(),
        &path,
    );
    let src = dir.path().join("hello.txt");
    fs::write(&src, b"kept across resize\n").unwrap();
    debugfs(&path, true, &format!("write {} hello.txt", src.display()));

    let info = home_resize(&path, 64 * MIB, None).unwrap();
    assert_eq!(fs::metadata(&path).unwrap().len(), 64 * MIB);
    assert_eq!(info.fs.unwrap().size_bytes, 64 * MIB);
    fsck_clean(&path);
    assert_eq!(
        debugfs(&path, false, "cat /hello.txt"),
        "kept across resize\n"
    );

    let e = home_resize(&path, 32 * MIB, None).unwrap_err();
    assert!(matches!(e, HomeError::Shrink { .. }), "{e}");
    assert!(
        e.to_string().contains("64 MiB") && e.to_string().contains("32 MiB"),
        "{e}"
    );
    // FAT's file limit is the command's to apply (a home on the ext4 live layout may
    // be larger): a bare home.img is refused past it, unchanged.
    let before = fs::read(&path).unwrap();
    let out = crate::support::livestick(&[
        "home",
        "resize",
        path.to_str().unwrap(),
        "--size-mb",
        "5000",
        "--yes",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("5000 MiB") && err.contains("4095"), "{err}");
    assert!(
        fs::read(&path).unwrap() == before,
        "the refused home changed"
    );
}

/// `home resize` of a bare file through the command, with its exit code and stderr.
fn resize_command(path: &Path, mib: &str, extra: &[&str]) -> (Option<i32>, String) {
    let mut args = vec![
        "home",
        "resize",
        path.to_str().unwrap(),
        "--size-mb",
        mib,
        "--yes",
    ];
    args.extend_from_slice(extra);
    let out = crate::support::livestick(&args);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_damaged_home_is_refused_as_bad_input_and_left_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("home.img");
    save(
        build_home_image(dir.path(), 32 * MIB, HomeEncryption::None).unwrap(),
        &path,
    );
    let src = dir.path().join("a");
    fs::write(&src, vec![7u8; 20000]).unwrap();
    debugfs(&path, true, &format!("write {} a", src.display()));
    debugfs(&path, true, &format!("write {} b", src.display()));
    // b's one extent pointed at a's blocks: a block claimed twice, which
    // `e2fsck -p` leaves to a person.
    let a_start = debugfs(&path, false, "bmap a 0");
    debugfs(&path, true, &format!("sif b block[5] {}", a_start.trim()));
    let before = fs::read(&path).unwrap();

    let (code, err) = resize_command(&path, "64", &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(path.to_str().unwrap()),
        "named by its path: {err}"
    );
    assert!(!err.contains("/proc/self/fd"), "{err}");
    assert!(
        err.contains("e2fsck -f") && err.contains("nothing was changed"),
        "{err}"
    );
    assert!(
        fs::read(&path).unwrap() == before,
        "the refused home changed"
    );
}

#[test]
fn a_home_cut_short_is_refused_and_info_warns() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.img");
    save(
        build_home_image(dir.path(), 32 * MIB, HomeEncryption::None).unwrap(),
        &plain,
    );
    let encrypted = dir.path().join("luks.img");
    save(
        build_home_image(dir.path(), 40 * MIB, luks(PASS)).unwrap(),
        &encrypted,
    );
    let pass = dir.path().join("pass");
    fs::write(&pass, PASS).unwrap();
    for (path, extra) in [
        (&plain, vec![]),
        (
            &encrypted,
            vec!["--passphrase-file", pass.to_str().unwrap()],
        ),
    ] {
        // The end of the file lost, as a copy cut short leaves it.
        let len = fs::metadata(path).unwrap().len();
        File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_len(len - 4 * MIB)
            .unwrap();
        let before = fs::read(path).unwrap();

        let mut info = vec!["home", "info", path.to_str().unwrap()];
        info.extend_from_slice(&extra);
        let out = crate::support::livestick(&info);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{out:?}");
        assert!(text.contains("cut short"), "{text}");

        let (code, err) = resize_command(path, "48", &extra);
        assert_eq!(code, Some(2), "{err}");
        assert!(
            err.contains("cut short") && err.contains("nothing was changed"),
            "{err}"
        );
        assert!(
            fs::read(path).unwrap() == before,
            "the refused home changed"
        );
    }
}

#[test]
fn a_luks1_home_and_a_damaged_primary_header_get_their_own_answers() {
    let dir = tempfile::tempdir().unwrap();
    let pass = dir.path().join("pass");
    fs::write(&pass, PASS).unwrap();
    let pass_args = ["--passphrase-file", pass.to_str().unwrap()];
    let info = |path: &Path, extra: &[&str]| {
        let mut args = vec!["home", "info", path.to_str().unwrap()];
        args.extend_from_slice(extra);
        crate::support::livestick(&args)
    };

    // LUKS1, as older livecd-iso-to-disk made it: say so, and how to convert.
    let luks1 = dir.path().join("luks1.img");
    File::create(&luks1).unwrap().set_len(40 * MIB).unwrap();
    let cryptsetup = tool("cryptsetup").expect("cryptsetup is needed for this test");
    let out = run(
        &cryptsetup,
        &[
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks1",
            "--pbkdf",
            "pbkdf2",
            "--iter-time",
            "10",
            "--key-file",
            pass.to_str().unwrap(),
            luks1.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    for extra in [&[][..], &pass_args[..]] {
        let out = info(&luks1, extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("LUKS1") && err.contains("cryptsetup convert"),
            "{err}"
        );
        assert!(!err.contains("inspect ISO"), "a hint about ISOs: {err}");
    }

    // A LUKS2 home whose primary header was overwritten opens from its secondary.
    let luks2 = dir.path().join("luks2.img");
    save(
        build_home_image(dir.path(), 40 * MIB, luks(PASS)).unwrap(),
        &luks2,
    );
    let mut f = File::options().write(true).open(&luks2).unwrap();
    f.write_all(&[0u8; 4096]).unwrap();
    drop(f);
    for extra in [&[][..], &pass_args[..]] {
        let out = info(&luks2, extra);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{out:?}");
        assert!(
            text.contains("encrypted:   yes, LUKS2") || text.contains("locked"),
            "{text}"
        );
    }
    let text = String::from_utf8_lossy(&info(&luks2, &pass_args).stdout).into_owned();
    assert!(text.contains("fs:          ext4"), "{text}");

    // Not a home at all: the hint points at `home info`, not at ISOs.
    let junk = dir.path().join("junk.img");
    fs::write(&junk, vec![0x5a; 1 << 20]).unwrap();
    let out = info(&junk, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("home info") && !err.contains("inspect ISO"),
        "{err}"
    );
}

#[test]
fn grow_luks_home_keeps_files_and_stays_openable() {
    let dir = tempfile::tempdir().unwrap();
    // A plaintext home with a file in it, encrypted into a 48 MiB container.
    let plain = dir.path().join("plain.ext4");
    let opts = Ext4Options {
        block_size: Some(4096),
        ..Ext4Options::default()
    };
    make_ext4_image(&plain, 32 * MIB, "HOME", &opts).unwrap();
    let src = dir.path().join("hello.txt");
    fs::write(&src, b"encrypted and kept\n").unwrap();
    debugfs(&plain, true, &format!("write {} hello.txt", src.display()));
    let path = dir.path().join("home.img");
    format_luks2(
        &mut File::open(&plain).unwrap(),
        32 * MIB,
        &mut File::create(&path).unwrap(),
        PASS,
        &cheap(),
    )
    .unwrap();
    let header_before = fs::read(&path).unwrap()[..DATA_OFFSET as usize].to_vec();

    // A wrong passphrase changes nothing.
    let before = fs::read(&path).unwrap();
    let e = home_resize(&path, 80 * MIB, Some(b"wrong")).unwrap_err();
    assert!(
        matches!(e, HomeError::Luks(LuksError::WrongPassphrase)),
        "{e}"
    );
    assert_eq!(fs::read(&path).unwrap(), before);
    let e = home_resize(&path, 80 * MIB, None).unwrap_err();
    assert!(matches!(e, HomeError::PassphraseNeeded(_)), "{e}");

    let info = home_resize(&path, 80 * MIB, Some(PASS)).unwrap();
    assert_eq!(fs::metadata(&path).unwrap().len(), 80 * MIB);
    assert_eq!(info.fs.as_ref().unwrap().size_bytes, 80 * MIB - DATA_OFFSET);
    assert_eq!(info.fs.unwrap().label, "HOME");
    // The header is untouched (same keys, same passphrase); the temp copy is gone.
    assert_eq!(
        &fs::read(&path).unwrap()[..DATA_OFFSET as usize],
        &header_before[..]
    );
    let left: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(left.len(), 3, "{left:?}");

    let out = dir.path().join("after.ext4");
    decrypt_to(&path, &out, PASS);
    fsck_clean(&out);
    assert_eq!(
        debugfs(&out, false, "cat /hello.txt"),
        "encrypted and kept\n"
    );
    // The new space is encrypted too: no run of plaintext zeros in the container.
    let raw = fs::read(&path).unwrap();
    let tail = &raw[raw.len() - 4096..];
    assert!(tail.iter().any(|&b| b != 0));
    if let Some(cs) = tool("cryptsetup") {
        let good = dir.path().join("good");
        fs::write(&good, PASS).unwrap();
        let r = run(
            &cs,
            &[
                "open",
                "--disable-locks",
                "--test-passphrase",
                "--key-file",
                good.to_str().unwrap(),
                path.to_str().unwrap(),
            ],
        );
        assert!(r.status.success(), "{r:?}");
    }
}

#[test]
fn info_via_reader_matches_for_luks() {
    let dir = tempfile::tempdir().unwrap();
    let mut img = build_home_image(dir.path(), 40 * MIB, luks(PASS)).unwrap();
    // Read the ciphertext back through the image's own Seek, out of order.
    img.seek(SeekFrom::Start(DATA_OFFSET)).unwrap();
    let mut data = vec![0u8; (40 * MIB - DATA_OFFSET) as usize];
    img.read_exact(&mut data).unwrap();
    img.seek(SeekFrom::Start(0)).unwrap();
    let mut head = vec![0u8; DATA_OFFSET as usize];
    img.read_exact(&mut head).unwrap();
    let mut all = head;
    all.extend_from_slice(&data);
    let path = dir.path().join("home.img");
    File::create(&path).unwrap().write_all(&all).unwrap();
    let a = home_info(&path, Some(PASS)).unwrap();
    let b = home_info_from(std::io::Cursor::new(all), Some(PASS)).unwrap();
    assert_eq!(a, b);
    let mut vol = open_luks2(File::open(&path).unwrap(), PASS).unwrap();
    assert_eq!(Ext4Info::read_from(&mut vol).unwrap().label, "HOME");
}
