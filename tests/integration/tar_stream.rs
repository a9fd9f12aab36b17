//! `persist::tar_stream` against the real tools: archives made by GNU tar (GNU and
//! pax formats) and by sqfs2tar are read member for member; what the writer makes is
//! listed by GNU tar and packed by tar2sqfs into a squashfs that unsquashfs shows
//! with the same owners, links, devices and xattrs.

use std::path::Path;
use std::process::Command;

use crate::support::stdout_of as run;
use crate::support::*;
use livestick::persist::tar_stream::{EntryKind, TarEntry, TarReader, TarWriter};

fn read_all(bytes: &[u8]) -> Vec<(TarEntry, Vec<u8>)> {
    let mut r = TarReader::new(bytes);
    let mut out = Vec::new();
    while let Some(e) = r.next_entry().unwrap() {
        let mut data = Vec::new();
        r.copy_data(&mut data).unwrap();
        out.push((e, data));
    }
    out
}

fn find<'a>(all: &'a [(TarEntry, Vec<u8>)], path: &str) -> &'a (TarEntry, Vec<u8>) {
    all.iter()
        .find(|(e, _)| e.path == path.as_bytes())
        .unwrap_or_else(|| panic!("{path} missing"))
}

/// A small tree with every kind a root image has (devices only as root).
fn tree(root: &Path) -> String {
    let long = format!("d/{}", "n".repeat(140));
    std::fs::create_dir_all(root.join("d")).unwrap();
    std::fs::write(root.join(&long), "long name\n").unwrap();
    std::fs::write(root.join("d/a"), vec![b'x'; 70_000]).unwrap();
    std::fs::hard_link(root.join("d/a"), root.join("d/b")).unwrap();
    std::os::unix::fs::symlink("a", root.join("d/sym")).unwrap();
    nix::unistd::mkfifo(
        &root.join("d/fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    xattr::set(root.join("d/a"), "user.note", b"bin\0ary=\n").unwrap();
    if is_root() {
        xattr::set(
            root.join("d/a"),
            "security.selinux",
            b"system_u:object_r:bin_t:s0\0",
        )
        .unwrap();
        std::os::unix::fs::chown(root.join("d/a"), Some(70_000_000), Some(42)).unwrap();
        nix::sys::stat::mknod(
            &root.join("d/null"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )
        .unwrap();
    }
    long
}

/// `xattrs`: GNU tar's own format cannot carry them (it stores big ids in base-256).
fn check_members(all: &[(TarEntry, Vec<u8>)], long: &str, what: &str, xattrs: bool) {
    // One name carries the data, the other links to it (GNU tar goes by readdir order).
    let (mut a, mut data) = (&find(all, "d/a").0, &find(all, "d/a").1);
    let mut b = &find(all, "d/b").0;
    if a.kind == EntryKind::HardLink {
        (a, data, b) = (
            &find(all, "d/b").0,
            &find(all, "d/b").1,
            &find(all, "d/a").0,
        );
    }
    assert_eq!(a.kind, EntryKind::File, "{what}");
    assert_eq!(data.len(), 70_000, "{what}");
    assert!(
        !xattrs
            || a.xattrs
                .iter()
                .any(|(k, v)| k == "user.note" && v == b"bin\0ary=\n"),
        "{what}: {:?}",
        a.xattrs
    );
    assert_eq!(
        (b.kind, b.link.as_slice()),
        (EntryKind::HardLink, a.path.as_slice()),
        "{what}"
    );
    let (s, _) = find(all, "d/sym");
    assert_eq!(
        (s.kind, s.link.as_slice()),
        (EntryKind::Symlink, b"a".as_slice()),
        "{what}"
    );
    assert_eq!(find(all, "d/fifo").0.kind, EntryKind::Fifo, "{what}");
    assert_eq!(find(all, long).1, b"long name\n", "{what}");
    if is_root() {
        assert_eq!((a.uid, a.gid), (70_000_000, 42), "{what}");
        assert!(
            !xattrs
                || a.xattrs
                    .iter()
                    .any(|(k, v)| k == "security.selinux" && v == b"system_u:object_r:bin_t:s0\0"),
            "{what}"
        );
        let null = &find(all, "d/null").0;
        assert_eq!(
            (null.kind, null.dev),
            (EntryKind::CharDev, (1, 3)),
            "{what}"
        );
    }
}

#[test]
fn reads_gnu_tar_in_gnu_and_pax_formats() {
    if !require(have("tar"), "GNU tar") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    let long = tree(&root);
    for (format, xattrs) in [("gnu", false), ("posix", true)] {
        let bytes = run(Command::new("tar")
            .args(if xattrs {
                &["--xattrs", "--xattrs-include=*"][..]
            } else {
                &[][..]
            })
            .arg("--numeric-owner")
            .arg(format!("--format={format}"))
            .arg("-C")
            .arg(&root)
            .args(["-cf", "-", "."]));
        check_members(&read_all(&bytes), &long, format, xattrs);
    }
}

#[test]
fn reads_sqfs2tar_and_feeds_tar2sqfs() {
    if !require(
        have("sqfs2tar") && have("tar2sqfs") && have("mksquashfs") && have("unsquashfs"),
        "squashfs-tools and squashfs-tools-ng",
    ) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    let long = tree(&root);
    let sq = d.path().join("in.sqfs");
    run(Command::new("mksquashfs").arg(&root).arg(&sq).args([
        "-noappend",
        "-quiet",
        "-xattrs",
        "-comp",
        "gzip",
    ]));
    let bytes = run(Command::new("sqfs2tar")
        .args(["--root-becomes", "."])
        .arg(&sq));
    let members = read_all(&bytes);
    check_members(&members, &long, "sqfs2tar", true);
    assert_eq!(members[0].0.path, b"", "the root comes first");

    // Everything read, written again, packed by tar2sqfs: the same image contents.
    let mut w = TarWriter::new(Vec::new());
    for (e, data) in &members {
        w.append(e, Some(&mut data.as_slice())).unwrap();
    }
    let ours = w.finish().unwrap();
    let listed = String::from_utf8(run(Command::new("tar")
        .args(["--numeric-owner", "-tvf", "-"])
        .stdin(
            std::fs::File::open({
                let p = d.path().join("ours.tar");
                std::fs::write(&p, &ours).unwrap();
                p
            })
            .unwrap(),
        )))
    .unwrap();
    assert!(listed.contains("./d/b link to ./d/a"), "{listed}");
    assert!(listed.contains(&long), "{listed}");

    let out = d.path().join("out.sqfs");
    let mut child = Command::new("tar2sqfs")
        .args(["--quiet", "--no-skip", "-c", "gzip"])
        .arg(&out)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&ours).unwrap();
    assert!(child.wait().unwrap().success());
    let list = |p: &Path| {
        String::from_utf8(run(Command::new("unsquashfs")
            .args(["-lln", "-d", ""])
            .arg(p)))
        .unwrap()
    };
    assert_eq!(list(&sq), list(&out));
    // Hard links stay one inode; xattrs arrive (read back as root, where labels show).
    let x = d.path().join("x");
    run(Command::new("unsquashfs").arg("-d").arg(&x).arg(&out));
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(x.join("d/a")).unwrap().ino(),
        std::fs::metadata(x.join("d/b")).unwrap().ino()
    );
    assert_eq!(
        xattr::get(x.join("d/a"), "user.note").unwrap().unwrap(),
        b"bin\0ary=\n"
    );
    if is_root() {
        assert_eq!(
            xattr::get(x.join("d/a"), "security.selinux")
                .unwrap()
                .unwrap(),
            b"system_u:object_r:bin_t:s0\0"
        );
    }
}
