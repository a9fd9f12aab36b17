//! `persist::erofs::xattr` against images made by mkfs.erofs: every path's xattrs read
//! from the image equal those of the source tree, for plain and compressed images,
//! inline and multi-block directories, shared and inline xattrs, long names.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use crate::support::*;
use livestick::persist::erofs::xattr::read_xattrs;

type Map = BTreeMap<Vec<u8>, BTreeMap<String, Vec<u8>>>;

fn source_xattrs(root: &Path) -> Map {
    let mut out = Map::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let rel = p.strip_prefix(root).unwrap();
        let rel = rel.as_os_str().as_encoded_bytes().to_vec();
        let mut x = BTreeMap::new();
        for name in xattr::list(&p).unwrap() {
            let name = name.to_string_lossy().into_owned();
            x.insert(name.clone(), xattr::get(&p, &name).unwrap().unwrap());
        }
        if !x.is_empty() {
            out.insert(rel, x);
        }
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out
}

fn tree(root: &Path) {
    let set = |p: &Path, n: &str, v: &[u8]| xattr::set(p, n, v).unwrap();
    std::fs::create_dir_all(root.join("big")).unwrap();
    std::fs::create_dir_all(root.join("a/b/c")).unwrap();
    set(root, "user.root", b"1");
    for i in 0..300 {
        let f = root.join(format!("big/file-{i:04}-{}", "x".repeat(i % 40)));
        std::fs::write(&f, format!("{i}\n").repeat(i % 7)).unwrap();
        // Shared by many inodes (mkfs.erofs puts those in the shared area) ...
        set(&f, "user.label", b"common_label_t");
        // ... and one of its own, inline.
        if i % 3 == 0 {
            set(&f, "user.own", format!("value {i}").as_bytes());
        }
    }
    let long = root.join(format!("a/b/c/{}", "n".repeat(200)));
    std::fs::write(&long, vec![b'z'; 10_000]).unwrap();
    set(&long, "user.long", &[0u8, 1, 2, 255]);
    set(&root.join("a/b"), "user.dir", b"d");
    std::os::unix::fs::symlink("b/c", root.join("a/link")).unwrap();
    if is_root() {
        for p in [
            root.to_path_buf(),
            root.join("a"),
            long.clone(),
            root.join("a/link"),
        ] {
            xattr::set(&p, "security.selinux", b"system_u:object_r:usr_t:s0\0").unwrap();
        }
        set(
            &long,
            "security.capability",
            &[
                1, 0, 0, 2, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
        );
        set(&root.join("a"), "trusted.overlay.opaque", b"y");
    }
}

#[test]
fn xattrs_read_from_mkfs_erofs_images_equal_the_source_tree() {
    if !require(have("mkfs.erofs"), "erofs-utils") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    tree(&root);
    let want = source_xattrs(&root);
    assert!(want.len() > 300, "{}", want.len());
    for (name, args) in [
        ("plain", &[][..]),
        ("lz4hc", &["-zlz4hc"][..]),
        ("lz4-no-shared", &["-zlz4", "-x", "-1"][..]),
    ] {
        let img = d.path().join(format!("{name}.img"));
        let out = Command::new("mkfs.erofs")
            .args(args)
            .arg(&img)
            .arg(&root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: Map = read_xattrs(&mut std::fs::File::open(&img).unwrap(), name)
            .unwrap()
            .into_iter()
            .map(|(p, x)| (p, x.into_iter().collect()))
            .collect();
        if args.contains(&"-1") {
            // -x -1 builds without xattrs at all.
            assert!(got.is_empty(), "{name}: {got:?}");
        } else {
            assert_eq!(got, want, "{name}");
        }
    }
}

#[test]
fn a_damaged_image_is_an_error_naming_the_problem() {
    if !require(have("mkfs.erofs"), "erofs-utils") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    tree(&root);
    let img = d.path().join("x.img");
    let out = Command::new("mkfs.erofs")
        .arg(&img)
        .arg(&root)
        .output()
        .unwrap();
    assert!(out.status.success());
    let bytes = std::fs::read(&img).unwrap();
    // Truncated: the metadata the superblock points at is gone.
    let cut = &bytes[..4096 + 64];
    let e = read_xattrs(&mut std::io::Cursor::new(cut.to_vec()), "cut.img").unwrap_err();
    assert!(e.to_string().contains("cut.img"), "{e}");
    // Every single-byte corruption of the first metadata block is an error or a
    // result, never a panic.
    for i in (4096..8192.min(bytes.len())).step_by(7) {
        let mut b = bytes.clone();
        b[i] ^= 0xa5;
        let _ = read_xattrs(&mut std::io::Cursor::new(b), "flip");
    }
}
