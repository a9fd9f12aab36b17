//! `livestick overlay merge|reset|status` on OverlayFS overlays (`write --overlayfs`):
//! the overlay is an ext4 file system holding `overlayfs/` (upper) and `ovlwork/`.
//! "A boot" is simulated by editing that ext4 with `debugfs -w` (files, whiteouts as
//! `mknod c 0 0`, `trusted.overlay.opaque`), exactly what the kernel leaves behind.
//! Results are read back with independent tools: mtools, unsquashfs, debugfs, e2fsck,
//! fsck.fat, fsck.erofs.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::support::debugfs_w as dbg_w;
use crate::support::*;
use livestick::disk::stick::Stick;
use livestick::persist::host_xattr::{get_xattr, set_xattr};
use livestick::persist::merge::overlayfs::error::OvlError;
use livestick::persist::merge::plan::Layout;
use livestick::persist::merge::{self, MergeError, MergeRequest, STEPS, StickMergeRequest};

fn tools_ok() -> bool {
    [
        "unsquashfs",
        "mksquashfs",
        "sqfs2tar",
        "tar2sqfs",
        "debugfs",
        "e2fsck",
        "mcopy",
        "fsck.fat",
        "xorriso",
    ]
    .iter()
    .all(|t| tool(t).is_file())
}

/// debugfs read-only on an image; stdout.
fn dbg(image: &str, cmd: &str) -> String {
    sh("debugfs", &["-R", cmd, image])
}

/// A tiny ISO whose squashfs.img is the root tree itself (boot-flat.iso style).
fn flat_iso() -> &'static Path {
    static ISO: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, p) = ISO.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        for dir in ["etc/keep", "etc/opq/old", "usr/bin", "var/gone", "home"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        std::fs::write(root.join("etc/hostname"), "base\n").unwrap();
        std::fs::write(root.join("etc/opq/old/f"), "old\n").unwrap();
        std::fs::write(root.join("etc/opq/keepname"), "lower\n").unwrap();
        std::fs::write(root.join("var/gone/y"), "x\n").unwrap();
        std::fs::write(root.join("etc/keep/k"), "keep\n").unwrap();
        std::fs::write(root.join("usr/bin/tool"), "bin\n").unwrap();
        std::fs::write(root.join("etc/motd"), "gone soon\n").unwrap();
        // Hard links whose first name the live system deletes: the other keeps the data.
        std::fs::write(root.join("etc/hl1"), "linked\n").unwrap();
        std::fs::hard_link(root.join("etc/hl1"), root.join("etc/hl2")).unwrap();
        std::fs::write(root.join("usr/bin/tool2"), "bin\n").unwrap();
        std::fs::hard_link(root.join("usr/bin/tool2"), root.join("usr/bin/tool3")).unwrap();
        if is_root() {
            // Owners and device nodes a non-root merge must keep.
            std::os::unix::fs::chown(root.join("etc/keep/k"), Some(1234), Some(1234)).unwrap();
            std::fs::create_dir_all(root.join("dev")).unwrap();
            nix::sys::stat::mknod(
                &root.join("dev/null"),
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::from_bits_truncate(0o666),
                nix::sys::stat::makedev(1, 3),
            )
            .unwrap();
        }
        set_xattr(
            &root.join("etc/keep/k"),
            "security.selinux",
            b"system_u:object_r:etc_t:s0\0",
        )
        .unwrap();
        set_xattr(&root.join("etc"), "user.lower", b"1").unwrap();
        let out = flat_iso_from(&root, d.path());
        (d, out)
    });
    p
}

struct T {
    dir: tempfile::TempDir,
    img: PathBuf,
    part: u64,
    part_len: u64,
    overlay: String,
}

impl T {
    fn s(&self) -> &str {
        self.img.to_str().unwrap()
    }
    fn work(&self) -> PathBuf {
        let w = self.dir.path().join("work");
        std::fs::create_dir_all(&w).unwrap();
        w
    }
    /// The overlay as debugfs reads it in place: `stick.img?offset=N`.
    fn overlay_spec(&self) -> String {
        let mut s = Stick::open(&self.img, false).unwrap();
        let ext = s.file_extents(&self.overlay).unwrap();
        assert_eq!(ext.len(), 1, "a fresh stick has a contiguous overlay");
        format!("{}?offset={}", self.img.display(), ext[0].0)
    }
    /// "A boot": the live system's changes, written into the upper dir.
    fn boot(&self, script: &str) {
        dbg_w(&self.overlay_spec(), script);
    }
    fn squashfs(&self) -> PathBuf {
        let p = self.dir.path().join(format!(
            "sq-{}.img",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        fat_copy_out(&self.img, self.part, "LiveOS/squashfs.img", &p);
        p
    }
    /// Lets uid 65534 read and write the stick and the work dir (for merges that
    /// prove they need no root).
    fn open_to_nobody(&self) {
        use std::os::unix::fs::PermissionsExt;
        let all = |p: &Path, mode| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        all(self.dir.path(), 0o777);
        all(&self.img, 0o666);
        all(&self.work(), 0o777);
    }
    fn upper_listing(&self) -> String {
        dbg(&self.overlay_spec(), "ls -p /overlayfs")
    }
}

fn write_stick(iso: &Path) -> T {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("stick.img");
    let out = livestick(&[
        "write",
        iso.to_str().unwrap(),
        img.to_str().unwrap(),
        "--size",
        "256M",
        "--overlay-size-mb",
        "32",
        "--overlayfs",
        "--yes",
    ]);
    assert!(
        out.status.success(),
        "write: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut s = Stick::open(&img, false).unwrap();
    let info = s.info("LiveOS").unwrap();
    T {
        part: s.partition.start,
        part_len: s.partition.len,
        overlay: info.expected_overlay.clone(),
        img,
        dir,
    }
}

/// Payload files for the boot scripts.
fn payload(t: &T, name: &str, text: &str) -> String {
    let p = t.dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// What a live system on the flat stick typically leaves behind.
fn flat_boot(t: &T) {
    let host = payload(t, "hostname", "merged-host\n");
    let new = payload(t, "new", "brand new\n");
    let cap = t.dir.path().join("cap.bin");
    std::fs::write(
        &cap,
        [
            1u8, 0, 0, 2, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
    )
    .unwrap();
    t.boot(&format!(
        "mkdir /overlayfs/etc
sif /overlayfs/etc mode 040750
ea_set /overlayfs/etc trusted.overlay.origin 0123
ea_set /overlayfs/etc user.upper 2
write {host} /overlayfs/etc/hostname
sif /overlayfs/etc/hostname uid 1000
sif /overlayfs/etc/hostname mode 0100600
sif /overlayfs/etc/hostname mtime @1700000000
ea_set /overlayfs/etc/hostname security.selinux system_u:object_r:hostname_etc_t:s0
mkdir /overlayfs/etc/opq
ea_set /overlayfs/etc/opq trusted.overlay.opaque y
write {new} /overlayfs/etc/opq/fresh
cd /overlayfs/etc
mknod motd c 0 0
mknod hl1 c 0 0
symlink /overlayfs/etc/link hostname
mkdir /overlayfs/var
cd /overlayfs/var
mknod gone c 0 0
mkdir \"/overlayfs/new dir\"
write {new} \"/overlayfs/new dir/a\"
ln \"/overlayfs/new dir/a\" \"/overlayfs/new dir/b\"
sif \"/overlayfs/new dir/a\" links_count 2
mkdir /overlayfs/usr
mkdir /overlayfs/usr/bin
write {new} /overlayfs/usr/bin/ping
ea_set -f {cap} /overlayfs/usr/bin/ping security.capability
cd /overlayfs/usr/bin
mknod fifo p
",
        cap = cap.display()
    ));
}

#[test]
fn flat_merge_applies_files_whiteouts_opaque_dirs_and_xattrs() {
    if !require(
        tools_ok(),
        "squashfs-tools, e2fsprogs, mtools, dosfstools, xorriso",
    ) {
        return;
    }
    let t = write_stick(flat_iso());
    // The merge itself runs without root (as nobody when the tests run as root).
    t.open_to_nobody();
    let uuid_before = dbg(&t.overlay_spec(), "stats");
    let uuid_before = uuid_before
        .lines()
        .find(|l| l.starts_with("Filesystem UUID"))
        .unwrap()
        .to_string();
    // A fresh overlay: nothing to merge.
    let out = as_nobody(&[
        "overlay",
        "merge",
        t.s(),
        "--yes",
        "--workdir",
        t.work().to_str().unwrap(),
    ]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to merge"));

    flat_boot(&t);
    let old_sq = t.squashfs();
    let dry = as_nobody(&[
        "overlay",
        "merge",
        t.s(),
        "--dry-run",
        "--workdir",
        t.work().to_str().unwrap(),
    ]);
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    let dry = String::from_utf8_lossy(&dry.stdout);
    assert!(
        dry.contains("OverlayFS") && dry.contains("flat squashfs"),
        "{dry}"
    );
    assert_eq!(
        std::fs::read(t.squashfs()).unwrap(),
        std::fs::read(&old_sq).unwrap()
    );

    let out = as_nobody(&[
        "overlay",
        "merge",
        t.s(),
        "--yes",
        "--workdir",
        t.work().to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let sq = t.squashfs();
    let sqs = sq.to_str().unwrap();
    let list = sh("unsquashfs", &["-lln", "-d", "", sqs]);
    let has = |p: &str| {
        list.lines()
            .any(|l| l.ends_with(&format!(" {p}")) || l.contains(&format!(" {p} -> ")))
    };
    // Replaced, with the upper's owner and mode.
    assert_eq!(
        sh("unsquashfs", &["-cat", sqs, "etc/hostname"]),
        "merged-host\n"
    );
    let line = list
        .lines()
        .find(|l| l.ends_with(" /etc/hostname"))
        .unwrap();
    assert!(line.starts_with("-rw------- 1000/"), "{line}");
    // Whiteouts deleted a file and a whole directory.
    assert!(
        !has("/etc/motd") && !has("/var/gone") && !has("/var/gone/y"),
        "{list}"
    );
    assert!(has("/var"));
    // The opaque dir replaced the lower one entirely.
    assert!(
        has("/etc/opq/fresh") && !has("/etc/opq/old") && !has("/etc/opq/keepname"),
        "{list}"
    );
    // A hard link whose first name was deleted keeps the data; untouched links stay links.
    assert!(!has("/etc/hl1") && has("/etc/hl2"), "{list}");
    assert_eq!(sh("unsquashfs", &["-cat", sqs, "etc/hl2"]), "linked\n");
    if is_root() {
        // Owners and device nodes of the lower tree, kept by a merge without root.
        let k = list.lines().find(|l| l.ends_with(" /etc/keep/k")).unwrap();
        assert!(k.contains(" 1234/1234 "), "{k}");
        let null = list.lines().find(|l| l.ends_with(" /dev/null")).unwrap();
        assert!(null.starts_with('c') && null.contains("1,  3"), "{null}");
    }
    // Untouched lower files stay; new ones appear; a symlink, a fifo, a name with a space.
    assert!(has("/etc/keep/k") && has("/usr/bin/tool") && has("/usr/bin/ping"));
    assert!(list.contains("/etc/link -> hostname"), "{list}");
    assert!(
        list.lines()
            .any(|l| l.starts_with('p') && l.ends_with("/usr/bin/fifo")),
        "{list}"
    );
    assert_eq!(sh("unsquashfs", &["-cat", sqs, "new dir/b"]), "brand new\n");
    let etc = list.lines().find(|l| l.ends_with(" /etc")).unwrap();
    assert!(
        etc.starts_with("drwxr-x---"),
        "merged dir takes the upper's mode: {etc}"
    );

    // xattrs: SELinux labels and capabilities kept, OverlayFS bookkeeping dropped.
    let x = t.dir.path().join("x");
    sh("unsquashfs", &["-d", x.to_str().unwrap(), sqs]);
    let get = |p: &str, n: &str| get_xattr(&x.join(p), n);
    assert_eq!(
        get("etc/hostname", "security.selinux").unwrap(),
        b"system_u:object_r:hostname_etc_t:s0"
    );
    assert_eq!(
        get("usr/bin/ping", "security.capability").unwrap()[..4],
        [1, 0, 0, 2]
    );
    assert_eq!(
        get("etc/keep/k", "security.selinux").unwrap(),
        b"system_u:object_r:etc_t:s0\0"
    );
    assert!(get("etc", "trusted.overlay.origin").is_none());
    assert_eq!(get("etc", "user.upper").unwrap(), b"2");
    assert!(
        get("etc", "user.lower").is_none(),
        "the merged dir's xattrs are the upper's"
    );
    use std::os::unix::fs::MetadataExt;
    let (a, b) = (
        std::fs::metadata(x.join("new dir/a")).unwrap(),
        std::fs::metadata(x.join("new dir/b")).unwrap(),
    );
    assert_eq!(a.ino(), b.ino(), "hard links stay hard links");
    let (t2, t3) = (
        std::fs::metadata(x.join("usr/bin/tool2")).unwrap(),
        std::fs::metadata(x.join("usr/bin/tool3")).unwrap(),
    );
    assert_eq!(t2.ino(), t3.ino(), "lower hard links stay hard links");
    assert_eq!(
        std::fs::metadata(x.join("etc/hostname")).unwrap().mtime(),
        1_700_000_000
    );

    // The overlay is a new empty ext4 with the same UUID.
    let spec = t.overlay_spec();
    let root = dbg(&spec, "ls -p /");
    assert!(
        root.contains("/overlayfs//") && root.contains("/ovlwork//"),
        "{root}"
    );
    assert!(
        !t.upper_listing()
            .lines()
            .any(|l| !l.contains("/.//") && !l.contains("/..//") && !l.trim().is_empty())
    );
    let uuid_after = dbg(&spec, "stats");
    assert!(uuid_after.contains(&uuid_before), "{uuid_before}");
    sh("e2fsck", &["-f", "-n", &spec]);
    assert!(
        !fat_ls(&t.img, t.part, "LiveOS")
            .to_lowercase()
            .contains(".new")
    );
    fsck_fat(&t.img, t.part, t.part_len, t.dir.path());
    assert_eq!(
        std::fs::read_dir(t.work()).unwrap().count(),
        0,
        "work dir cleaned"
    );
}

/// When tar2sqfs fails half way through the stream (here: a stand-in that reads some
/// input and dies), the merge says which tool failed with its message, and the stick
/// and the work dir are left as they were.
#[test]
fn a_failing_tar2sqfs_leaves_the_stick_unchanged() {
    if !require(tools_ok(), "squashfs-tools, squashfs-tools-ng, e2fsprogs") {
        return;
    }
    let t = write_stick(flat_iso());
    flat_boot(&t);
    let before = std::fs::read(&t.img).unwrap();
    let bin_dir = t.dir.path().join("bin");
    stand_in(
        &bin_dir,
        "tar2sqfs",
        "#!/bin/sh\nhead -c 1024 >/dev/null\necho 'tar2sqfs: out of space (simulated)' >&2\nexit 1\n",
    );
    let path = path_first(&bin_dir);
    let out = std::process::Command::new(crate::support::bin())
        .env("PATH", path)
        .args([
            "overlay",
            "merge",
            t.s(),
            "--yes",
            "--workdir",
            t.work().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tar2sqfs") && err.contains("out of space (simulated)"),
        "{err}"
    );
    assert!(
        std::fs::read(&t.img).unwrap() == before,
        "the stick changed"
    );
    assert_eq!(
        std::fs::read_dir(t.work()).unwrap().count(),
        0,
        "work dir cleaned"
    );
}

/// `--compress` on a flat merge: tar2sqfs builds the new image with that compressor
/// (the plan says so); without it the source's compressor and block size are kept.
#[test]
fn flat_merge_recompresses_as_asked() {
    if !require(tools_ok(), "squashfs-tools, squashfs-tools-ng, e2fsprogs") {
        return;
    }
    let t = write_stick(flat_iso());
    flat_boot(&t);
    let work = t.work();
    let w = work.to_str().unwrap();
    let dry = livestick(&["overlay", "merge", t.s(), "--dry-run", "--workdir", w]);
    let plan = String::from_utf8_lossy(&dry.stdout);
    assert!(plan.contains("tar2sqfs -c gzip -b 131072"), "{plan}");
    let dry = livestick(&[
        "overlay",
        "merge",
        t.s(),
        "--dry-run",
        "--workdir",
        w,
        "--compress",
        "xz",
    ]);
    let plan = String::from_utf8_lossy(&dry.stdout);
    assert!(plan.contains("tar2sqfs -c xz -b 131072"), "{plan}");
    let out = livestick(&[
        "overlay",
        "merge",
        t.s(),
        "--yes",
        "--workdir",
        w,
        "--compress",
        "xz",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sq = t.squashfs();
    let sb = sh("unsquashfs", &["-s", sq.to_str().unwrap()]);
    assert!(sb.contains("Compression xz"), "{sb}");
    assert_eq!(
        sh(
            "unsquashfs",
            &["-cat", sq.to_str().unwrap(), "etc/hostname"]
        ),
        "merged-host\n"
    );
}

/// A work dir without room is refused before anything starts, with the figures.
#[test]
fn a_work_dir_without_room_is_refused_with_the_figures() {
    if !require(tools_ok(), "squashfs-tools, squashfs-tools-ng, e2fsprogs")
        || !require(is_root(), "root (a 4 KiB tmpfs as the work dir)")
    {
        return;
    }
    let t = write_stick(flat_iso());
    flat_boot(&t);
    let small = t.dir.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    sh(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=4k",
            "tmpfs",
            small.to_str().unwrap(),
        ],
    );
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _mounted = Unmount(&small);
    let before = std::fs::read(&t.img).unwrap();
    for extra in [&["--dry-run"][..], &["--yes"][..]] {
        let out = livestick(
            &[
                &[
                    "overlay",
                    "merge",
                    t.s(),
                    "--workdir",
                    small.to_str().unwrap(),
                ][..],
                extra,
            ]
            .concat(),
        );
        assert!(!out.status.success(), "{extra:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("not enough space for")
                && err.contains("bytes needed")
                && err.contains("bytes free")
                && err.contains(small.to_str().unwrap()),
            "{extra:?}: {err}"
        );
    }
    assert!(
        std::fs::read(&t.img).unwrap() == before,
        "the stick changed"
    );
    assert_eq!(std::fs::read_dir(&small).unwrap().count(), 0);
}

#[test]
fn nested_merge_edits_rootfs_img_in_place_with_debugfs() {
    if !require(
        tools_ok(),
        "squashfs-tools, e2fsprogs, mtools, dosfstools, xorriso",
    ) {
        return;
    }
    let t = write_stick(&synthetic_iso("fedora-classic.iso"));
    let os = payload(&t, "os-release", "NAME=Merged\n");
    let big = t.dir.path().join("big");
    std::fs::write(&big, vec![0x5au8; 300_000]).unwrap();
    t.boot(&format!(
        "mkdir /overlayfs/etc
write {os} /overlayfs/etc/os-release
sif /overlayfs/etc/os-release uid 42
sif /overlayfs/etc/os-release gid 43
sif /overlayfs/etc/os-release mode 0100640
ea_set /overlayfs/etc/os-release security.selinux system_u:object_r:etc_t:s0
cd /overlayfs/etc
mknod livestick-fixture c 0 0
mkdir /overlayfs/usr
mkdir /overlayfs/usr/share
mkdir /overlayfs/usr/share/new
write {big} /overlayfs/usr/share/new/big
ln /overlayfs/usr/share/new/big /overlayfs/usr/share/new/big2
sif /overlayfs/usr/share/new/big links_count 2
symlink /overlayfs/usr/share/new/l ../../../etc/os-release
cd /overlayfs/usr/share/new
mknod dev b 8 1
mknod fifo p
mkdir /overlayfs/home
ea_set /overlayfs/home trusted.overlay.opaque y
mkdir /overlayfs/home/liveuser
sif /overlayfs/home/liveuser uid 1000
",
        big = big.display()
    ));
    let work = t.work();
    let plan = merge::plan_stick_merge(&StickMergeRequest {
        stick: t.img.clone(),
        live_dir: "LiveOS".into(),
        overlay: t.overlay.clone(),
        workdir: work.clone(),
        fsck: true,
        compress: None,
    })
    .unwrap();
    assert_eq!(plan.root_image, "LiveOS/rootfs.img");
    let report = merge::execute_merge(&plan, &mut |_, _, _| {}).unwrap();
    let applied = report.overlayfs.unwrap();
    assert_eq!(applied.removed, 1, "{applied:?}");
    assert_eq!(report.fsck_exit_code, Some(0));

    let x = t.dir.path().join("x");
    sh(
        "unsquashfs",
        &["-d", x.to_str().unwrap(), t.squashfs().to_str().unwrap()],
    );
    let img = x.join("LiveOS/rootfs.img");
    let img = img.to_str().unwrap();
    sh("e2fsck", &["-f", "-n", img]);
    let etc = dbg(img, "ls -p /etc");
    assert!(
        !etc.contains("livestick-fixture"),
        "whiteout applied: {etc}"
    );
    assert!(etc.contains("/100640/42/43/os-release/12/"), "{etc}");
    let out = t.dir.path().join("os");
    dbg(img, &format!("dump /etc/os-release {}", out.display()));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "NAME=Merged\n");
    assert!(dbg(img, "ea_list /etc/os-release").contains("system_u:object_r:etc_t:s0"));
    let new = dbg(img, "ls -p /usr/share/new");
    assert!(
        new.contains("/big/300000/") && new.contains("/big2/300000/"),
        "{new}"
    );
    assert!(
        new.contains("/060")
            && new.contains("/dev/")
            && new.contains("/010")
            && new.contains("/fifo/"),
        "{new}"
    );
    let ino = |name: &str| {
        new.lines()
            .find(|l| l.contains(&format!("/{name}/")))
            .unwrap()
            .split('/')
            .nth(1)
            .unwrap()
            .to_string()
    };
    assert_eq!(ino("big"), ino("big2"), "hard link");
    assert!(dbg(img, "stat /usr/share/new/l").contains("../../../etc/os-release"));
    assert!(dbg(img, "stat /usr/share/new/dev").contains("08:01"));
    let home = dbg(img, "ls -p /home");
    assert!(home.contains("/1000/0/liveuser//"), "{home}");
    // The overlay is empty again.
    assert_eq!(
        t.upper_listing()
            .lines()
            .filter(|l| l.starts_with('/'))
            .count(),
        2
    );
    fsck_fat(&t.img, t.part, t.part_len, t.dir.path());
}

#[test]
fn a_stop_after_any_step_leaves_the_old_or_the_new_state() {
    if !require(
        tools_ok(),
        "squashfs-tools, e2fsprogs, mtools, dosfstools, xorriso",
    ) {
        return;
    }
    let t = write_stick(flat_iso());
    flat_boot(&t);
    let pristine = std::fs::read(&t.img).unwrap();
    let old_sq = std::fs::read(t.squashfs()).unwrap();
    let old_upper = t.upper_listing();
    let mut new_sq = None;
    for step in STEPS {
        std::fs::write(&t.img, &pristine).unwrap();
        let mut plan = merge::plan_stick_merge(&StickMergeRequest {
            stick: t.img.clone(),
            live_dir: "LiveOS".into(),
            overlay: t.overlay.clone(),
            workdir: t.work(),
            fsck: true,
            compress: None,
        })
        .unwrap();
        plan.failpoint = Some(step.to_string());
        let e = merge::execute_merge(&plan, &mut |_, _, _| {}).unwrap_err();
        assert!(
            matches!(e, MergeError::Failpoint(s) if s == step),
            "{step}: {e}"
        );
        let pos = |s: &str| STEPS.iter().position(|x| *x == s).unwrap();
        let sq_path = t.squashfs();
        let sq = std::fs::read(&sq_path).unwrap();
        if pos(step) < pos("swap") {
            assert!(sq == old_sq, "{step}: replaced too early");
        } else {
            assert!(sq != old_sq, "{step}: not replaced");
            // Every stop after the swap shows the same new tree (the image bytes
            // differ by mksquashfs's build time).
            let list = sh("unsquashfs", &["-lln", "-d", "", sq_path.to_str().unwrap()]);
            assert!(
                list.contains("/etc/opq/fresh") && !list.contains("/etc/motd"),
                "{list}"
            );
            match &new_sq {
                None => new_sq = Some(list),
                Some(n) => assert_eq!(*n, list, "{step}"),
            }
        }
        // The overlay keeps the live system's changes until the reset.
        let upper = t.upper_listing();
        if step == "reset" {
            assert_eq!(
                upper.lines().filter(|l| l.starts_with('/')).count(),
                2,
                "{upper}"
            );
        } else {
            assert_eq!(
                upper, old_upper,
                "{step}: the overlay changed before the reset"
            );
        }
        sh("e2fsck", &["-f", "-n", &t.overlay_spec()]);
        assert!(
            !fat_ls(&t.img, t.part, "LiveOS")
                .to_lowercase()
                .contains(".new")
                || pos(step) < pos("swap")
        );
        fsck_fat(&t.img, t.part, t.part_len, t.dir.path());
    }
    // After a stop between swap and reset the new image already holds every change,
    // and the old overlay over it shows the same tree; a second merge finishes the job.
    std::fs::write(&t.img, &pristine).unwrap();
    let mut plan = merge::plan_stick_merge(&StickMergeRequest {
        stick: t.img.clone(),
        live_dir: "LiveOS".into(),
        overlay: t.overlay.clone(),
        workdir: t.work(),
        fsck: true,
        compress: None,
    })
    .unwrap();
    plan.failpoint = Some("swap".into());
    merge::execute_merge(&plan, &mut |_, _, _| {}).unwrap_err();
    let out = livestick(&[
        "overlay",
        "merge",
        t.s(),
        "--yes",
        "--workdir",
        t.work().to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = sh(
        "unsquashfs",
        &["-lln", "-d", "", t.squashfs().to_str().unwrap()],
    );
    assert!(
        list.contains("/etc/opq/fresh") && !list.contains("/etc/motd"),
        "{list}"
    );
    fsck_fat(&t.img, t.part, t.part_len, t.dir.path());
}

#[test]
fn status_and_reset_on_an_overlayfs_stick() {
    if !require(
        tools_ok(),
        "squashfs-tools, e2fsprogs, mtools, dosfstools, xorriso",
    ) {
        return;
    }
    let t = write_stick(&synthetic_iso("fedora-classic.iso"));
    let big = t.dir.path().join("big");
    std::fs::write(&big, vec![1u8; 4 << 20]).unwrap();
    t.boot(&format!("write {} /overlayfs/big\n", big.display()));
    let out = livestick(&["overlay", "status", t.s(), "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["kind"], "overlayfs");
    let used = v["used_bytes"].as_u64().unwrap();
    assert!(used > 4 << 20, "{v}");

    let out = livestick(&["overlay", "reset", t.s(), "--dry-run"]);
    assert!(out.status.success());
    assert!(
        t.upper_listing().contains("/big/"),
        "dry run changes nothing"
    );
    let out = livestick(&["overlay", "reset", t.s()]);
    assert!(!out.status.success(), "no terminal and no --yes: refused");
    let out = livestick(&["overlay", "reset", t.s(), "--yes"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!t.upper_listing().contains("/big/"));
    sh("e2fsck", &["-f", "-n", &t.overlay_spec()]);
    let out = livestick(&["overlay", "status", t.s(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["used_bytes"].as_u64().unwrap() <= used - (4 << 20), "{v}");
    // grow works on OverlayFS overlays too (overlay_ovl_maint.rs has the rest).
    let size = v["size_bytes"].as_u64().unwrap();
    let out = livestick(&[
        "overlay",
        "grow",
        t.s(),
        "--add-mb",
        "4",
        "--workdir",
        t.work().to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = livestick(&["overlay", "status", t.s(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["size_bytes"].as_u64().unwrap(), size + (4 << 20), "{v}");
    fsck_fat(&t.img, t.part, t.part_len, t.dir.path());
}

#[test]
fn overlays_that_cannot_be_merged_file_by_file_are_refused_unchanged() {
    if !require(
        tools_ok(),
        "squashfs-tools, e2fsprogs, mtools, dosfstools, xorriso",
    ) {
        return;
    }
    let t = write_stick(&synthetic_iso("fedora-classic.iso"));
    t.boot("mkdir /overlayfs/etc\nmkdir /overlayfs/etc/moved\nea_set /overlayfs/etc/moved trusted.overlay.redirect /etc/old\n");
    let pristine = std::fs::read(&t.img).unwrap();
    let plan = merge::plan_stick_merge(&StickMergeRequest {
        stick: t.img.clone(),
        live_dir: "LiveOS".into(),
        overlay: t.overlay.clone(),
        workdir: t.work(),
        fsck: false,
        compress: None,
    })
    .unwrap();
    let e = merge::execute_merge(&plan, &mut |_, _, _| {}).unwrap_err();
    assert!(
        matches!(&e, MergeError::Ovl(OvlError::Unsupported { feature, .. }) if feature.contains("redirect")),
        "{e}"
    );
    assert!(e.to_string().contains("/etc/moved"), "{e}");
    assert!(
        std::fs::read(&t.img).unwrap() == pristine,
        "nothing changed"
    );

    // A name debugfs cannot express.
    let t = write_stick(&synthetic_iso("fedora-classic.iso"));
    // debugfs cannot make such a name either: build the overlay with mke2fs -d.
    let src = t.dir.path().join("ovsrc");
    std::fs::create_dir_all(src.join("overlayfs/odd")).unwrap();
    std::fs::create_dir_all(src.join("ovlwork")).unwrap();
    std::fs::write(src.join("overlayfs/odd/a\"b"), "x").unwrap();
    let ovimg = t.dir.path().join("ov.img");
    sh(
        "mke2fs",
        &[
            "-q",
            "-F",
            "-t",
            "ext4",
            "-d",
            src.to_str().unwrap(),
            ovimg.to_str().unwrap(),
            "32M",
        ],
    );
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut s = Stick::open(&t.img, false).unwrap();
        let off = s.file_extents(&t.overlay).unwrap()[0].0;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&t.img)
            .unwrap();
        f.seek(SeekFrom::Start(off)).unwrap();
        f.write_all(&std::fs::read(&ovimg).unwrap()).unwrap();
    }
    let out = livestick(&[
        "overlay",
        "merge",
        t.s(),
        "--yes",
        "--workdir",
        t.work().to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("double quote") && err.contains("odd/a"),
        "{err}"
    );
}

/// EROFS roots (Fedora 42+): merged on bare files (squashfs.img + overlay side by side).
/// A directory overlay, as dracut keeps it on an ext4 stick (`overlay-LABEL-UUID/`
/// holding overlayfs/ and ovlwork/): merged into a plain squashfs.img through an ext4
/// copy, then emptied; without root it is refused (trusted.overlay.* is root-only).
#[test]
fn directory_overlay_merges_and_is_emptied() {
    if !require(tools_ok(), "squashfs-tools, squashfs-tools-ng, e2fsprogs")
        || !require(
            is_root(),
            "root (whiteouts and trusted.overlay.opaque in a directory)",
        )
    {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let live = d.path().join("LiveOS");
    std::fs::create_dir_all(&live).unwrap();
    let sq = live.join("squashfs.img");
    iso_extract(flat_iso(), "/LiveOS/squashfs.img", &sq);
    let ov = live.join("overlay-LIVE-1234-ABCD");
    let up = ov.join("overlayfs");
    std::fs::create_dir_all(up.join("etc/opq")).unwrap();
    std::fs::create_dir_all(ov.join("ovlwork/work")).unwrap();
    std::fs::write(up.join("etc/hostname"), "from-dir\n").unwrap();
    std::os::unix::fs::chown(up.join("etc/hostname"), Some(1000), Some(1000)).unwrap();
    set_xattr(
        &up.join("etc/hostname"),
        "security.selinux",
        b"system_u:object_r:hostname_etc_t:s0",
    )
    .unwrap();
    set_xattr(&up.join("etc/opq"), "trusted.overlay.opaque", b"y").unwrap();
    std::fs::write(up.join("etc/opq/only"), "opaque\n").unwrap();
    nix::sys::stat::mknod(
        &up.join("etc/motd"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::empty(),
        0,
    )
    .unwrap();
    let work = d.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let args = [
        "overlay",
        "merge",
        ov.to_str().unwrap(),
        "--workdir",
        work.to_str().unwrap(),
        "--yes",
    ];
    // Without root: refused, nothing changed.
    {
        use std::os::unix::fs::PermissionsExt;
        for p in [d.path(), live.as_path(), work.as_path()] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
    }
    let before = std::fs::read(&sq).unwrap();
    let out = as_nobody(&args);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("trusted.overlay") && err.contains("root"),
        "{err}"
    );
    assert_eq!(std::fs::read(&sq).unwrap(), before);
    assert!(up.join("etc/hostname").exists());

    let ovs = ov.to_str().unwrap();
    let status = livestick(&["overlay", "status", ovs, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["kind"], "overlayfs-dir", "{v}");
    assert_eq!(v["upper_entries"], 5, "{v}");
    for cmd in [
        &["overlay", "grow", ovs, "--add-mb", "8"][..],
        &["overlay", "recover", ovs][..],
    ] {
        let out = livestick(cmd);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("directory overlay"),
            "{cmd:?}: {err}"
        );
    }
    let dry = livestick(&[&args[..], &["--dry-run"]].concat());
    let plan = String::from_utf8_lossy(&dry.stdout);
    assert!(dry.status.success() && plan.contains("mke2fs -d"), "{plan}");
    let out = livestick(&args);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let sqs = sq.to_str().unwrap();
    assert_eq!(
        sh("unsquashfs", &["-cat", sqs, "etc/hostname"]),
        "from-dir\n"
    );
    let list = sh("unsquashfs", &["-lln", "-d", "", sqs]);
    assert!(!list.contains("/etc/motd"), "whiteout applied: {list}");
    assert!(
        list.contains("/etc/opq/only") && !list.contains("/etc/opq/keepname"),
        "opaque dir applied: {list}"
    );
    let line = list
        .lines()
        .find(|l| l.ends_with(" /etc/hostname"))
        .unwrap();
    assert!(line.contains(" 1000/1000 "), "{line}");
    let x = d.path().join("x");
    sh("unsquashfs", &["-d", x.to_str().unwrap(), sqs]);
    assert_eq!(
        get_xattr(&x.join("etc/hostname"), "security.selinux").unwrap(),
        b"system_u:object_r:hostname_etc_t:s0"
    );
    // Emptied, the two directories kept.
    assert_eq!(std::fs::read_dir(&up).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(ov.join("ovlwork")).unwrap().count(), 0);
    assert_eq!(
        std::fs::read_dir(&work).unwrap().count(),
        0,
        "work dir cleaned"
    );

    // reset: a dry run changes nothing, a confirmed one empties the upper dir.
    std::fs::create_dir_all(up.join("var/tmp")).unwrap();
    std::fs::write(up.join("var/tmp/x"), "x").unwrap();
    let dry = livestick(&["overlay", "reset", ovs, "--dry-run"]);
    assert!(String::from_utf8_lossy(&dry.stdout).contains("3 entries"));
    assert!(up.join("var/tmp/x").exists());
    let out = livestick(&["overlay", "reset", ovs, "--yes"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_dir(&up).unwrap().count(), 0);
}

/// `DIR/LiveOS` with `squashfs.img` (EROFS, lz4hc, from `root`) and an empty
/// OverlayFS overlay as dracut/livestick make it: (LiveOS, squashfs.img, overlay).
fn erofs_live_dir(dir: &Path, root: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let live = dir.join("LiveOS");
    std::fs::create_dir_all(&live).unwrap();
    let sq = live.join("squashfs.img");
    sh(
        "mkfs.erofs",
        &["-zlz4hc", sq.to_str().unwrap(), root.to_str().unwrap()],
    );
    let ovroot = dir.join("ovroot");
    std::fs::create_dir_all(ovroot.join("overlayfs")).unwrap();
    std::fs::create_dir_all(ovroot.join("ovlwork")).unwrap();
    let ov = live.join("overlay-L-U");
    sh(
        "mke2fs",
        &[
            "-q",
            "-F",
            "-t",
            "ext4",
            "-d",
            ovroot.to_str().unwrap(),
            ov.to_str().unwrap(),
            "16M",
        ],
    );
    (live, sq, ov)
}

#[test]
fn erofs_root_is_rebuilt_with_mkfs_erofs_or_refused_by_name() {
    if !require(
        tools_ok() && tool("mkfs.erofs").is_file() && tool("fsck.erofs").is_file(),
        "erofs-utils",
    ) || !require(is_root(), "root")
    {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    std::fs::create_dir_all(root.join("etc/sub")).unwrap();
    std::fs::write(root.join("etc/hostname"), "erofs\n").unwrap();
    std::fs::write(root.join("etc/sub/gone"), "x\n").unwrap();
    let (live, sq, ov) = erofs_live_dir(d.path(), &root);
    let new = d.path().join("new");
    std::fs::write(&new, "merged\n").unwrap();
    dbg_w(
        ov.to_str().unwrap(),
        &format!(
            "mkdir /overlayfs/etc\nwrite {} /overlayfs/etc/hostname\nmkdir /overlayfs/etc/sub\ncd /overlayfs/etc/sub\nmknod gone c 0 0\n",
            new.display()
        ),
    );
    let work = d.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let req = MergeRequest {
        squashfs: sq.clone(),
        overlay: ov.clone(),
        workdir: work.clone(),
        fsck: true,
        compress: None,
    };
    // An algorithm the installed fsck.erofs cannot decompress (Fedora's lzma on
    // Debian 12's erofs-utils 1.5) is refused at planning, naming it.
    {
        let lzma = live.join("lzma.img");
        let mut b = std::fs::read(&sq).unwrap();
        let incompat = u32::from_le_bytes(b[1024 + 80..1024 + 84].try_into().unwrap()) | 0x2;
        b[1024 + 80..1024 + 84].copy_from_slice(&incompat.to_le_bytes());
        b[1024 + 84..1024 + 86].copy_from_slice(&0b10u16.to_le_bytes());
        std::fs::write(&lzma, &b).unwrap();
        let e = merge::plan_merge(&MergeRequest {
            squashfs: lzma.clone(),
            ..req.clone()
        })
        .unwrap_err();
        assert!(e.to_string().contains("lzma"), "{e}");
        assert_eq!(std::fs::read(&lzma).unwrap(), b, "nothing changed");
        std::fs::remove_file(&lzma).unwrap();
    }
    let mut plan = merge::plan_merge(&req).unwrap();
    assert!(plan.squash.is_none());
    let xattrs_lost = matches!(
        &plan.ovl.as_ref().unwrap().layout,
        Layout::Erofs {
            xattrs_lost: true,
            ..
        }
    );
    if xattrs_lost {
        // This erofs-utils cannot extract xattrs: refused by name, nothing changed.
        let before = std::fs::read(&sq).unwrap();
        let e = merge::execute_merge(&plan, &mut |_, _, _| {}).unwrap_err();
        assert!(
            e.to_string().contains("fsck.erofs") && e.to_string().contains("xattr"),
            "{e}"
        );
        assert!(std::fs::read(&sq).unwrap() == before);
        plan.allow_xattr_loss = true;
    }
    merge::execute_merge(&plan, &mut |_, _, _| {}).unwrap();
    let x = d.path().join("x");
    sh(
        "fsck.erofs",
        &[&format!("--extract={}", x.display()), sq.to_str().unwrap()],
    );
    assert_eq!(
        std::fs::read_to_string(x.join("etc/hostname")).unwrap(),
        "merged\n"
    );
    assert!(!x.join("etc/sub/gone").exists() && x.join("etc/sub").is_dir());
    let mut f = std::fs::File::open(&sq).unwrap();
    let info = livestick::persist::erofs::superblock::read_superblock(&mut f, "new").unwrap();
    assert_eq!(
        info.algorithms,
        vec!["lz4"],
        "the source's compression is kept"
    );
    assert!(
        !dbg(ov.to_str().unwrap(), "ls -p /overlayfs").contains("/etc/"),
        "overlay reset"
    );
}

/// Without root, an EROFS merge runs its extract/apply/mkfs.erofs steps under
/// fakeroot: the lower tree's owners and device nodes and the upper's owners and
/// security xattrs reach the new image although nobody had the privileges to set them.
#[test]
fn erofs_merge_without_root_runs_under_fakeroot() {
    if !require(
        tools_ok()
            && tool("mkfs.erofs").is_file()
            && tool("fsck.erofs").is_file()
            && tool("fakeroot").is_file()
            && tool("setpriv").is_file(),
        "erofs-utils, fakeroot, util-linux",
    ) || !require(
        is_root(),
        "root (to build a lower tree with other owners, then merge as nobody)",
    ) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    std::fs::create_dir_all(root.join("etc/sub")).unwrap();
    std::fs::create_dir_all(root.join("dev")).unwrap();
    std::fs::write(root.join("etc/owned"), "lower\n").unwrap();
    std::os::unix::fs::chown(root.join("etc/owned"), Some(1234), Some(4321)).unwrap();
    set_xattr(
        &root.join("etc/owned"),
        "security.selinux",
        b"system_u:object_r:lower_t:s0\0",
    )
    .unwrap();
    std::fs::write(root.join("etc/sub/gone"), "x\n").unwrap();
    nix::sys::stat::mknod(
        &root.join("dev/null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    let (live, sq, ov) = erofs_live_dir(d.path(), &root);
    let new = d.path().join("new");
    std::fs::write(&new, "merged\n").unwrap();
    dbg_w(
        ov.to_str().unwrap(),
        &format!(
            "mkdir /overlayfs/etc\nwrite {} /overlayfs/etc/hostname\nsif /overlayfs/etc/hostname uid 1000\nea_set /overlayfs/etc/hostname security.selinux system_u:object_r:hostname_etc_t:s0\nmkdir /overlayfs/etc/sub\ncd /overlayfs/etc/sub\nmknod gone c 0 0\n",
            new.display()
        ),
    );
    let work = d.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        for (p, mode) in [
            (d.path(), 0o777),
            (live.as_path(), 0o777),
            (work.as_path(), 0o777),
            (sq.as_path(), 0o666),
            (ov.as_path(), 0o666),
        ] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
    }
    let args = [
        "overlay",
        "merge",
        ov.to_str().unwrap(),
        "--squashfs",
        sq.to_str().unwrap(),
        "--workdir",
        work.to_str().unwrap(),
        "--yes",
    ];
    let dry = as_nobody(&[&args[..], &["--dry-run"]].concat());
    let dry_out = String::from_utf8_lossy(&dry.stdout);
    assert!(
        dry.status.success() && dry_out.contains("fakeroot"),
        "{dry_out}{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    let out = as_nobody(&args);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Read back as root, with owners and xattrs.
    let x = d.path().join("x");
    sh(
        "fsck.erofs",
        &[
            &format!("--extract={}", x.display()),
            "--preserve",
            sq.to_str().unwrap(),
        ],
    );
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let owned = std::fs::metadata(x.join("etc/owned")).unwrap();
    assert_eq!((owned.uid(), owned.gid()), (1234, 4321), "lower owner kept");
    let host = std::fs::metadata(x.join("etc/hostname")).unwrap();
    assert_eq!(host.uid(), 1000, "upper owner kept");
    assert_eq!(
        std::fs::read_to_string(x.join("etc/hostname")).unwrap(),
        "merged\n"
    );
    let null = std::fs::symlink_metadata(x.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device() && null.rdev() == nix::sys::stat::makedev(1, 3));
    assert!(!x.join("etc/sub/gone").exists());
    // Labels of both layers are in the new image (fsck.erofs 1.5 extracts no
    // xattrs, so they are read with livestick's reader, itself checked against
    // mkfs.erofs in erofs_xattr.rs).
    let labels: std::collections::HashMap<Vec<u8>, Vec<(String, Vec<u8>)>> =
        livestick::persist::erofs::xattr::read_xattrs(
            &mut std::fs::File::open(&sq).unwrap(),
            "new",
        )
        .unwrap()
        .into_iter()
        .collect();
    let label = |p: &str| {
        labels
            .get(p.as_bytes())
            .and_then(|x| x.iter().find(|(n, _)| n == "security.selinux"))
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        label("etc/owned").as_deref(),
        Some(&b"system_u:object_r:lower_t:s0\0"[..]),
        "the lower label is kept"
    );
    assert_eq!(
        label("etc/hostname").as_deref(),
        Some(&b"system_u:object_r:hostname_etc_t:s0"[..]),
        "the upper label is applied"
    );
    assert_eq!(
        std::fs::read_dir(&work).unwrap().count(),
        0,
        "work dir cleaned"
    );
}

/// A FAT16 stick (made with mkfs.fat, as older tools and small sticks have it): the
/// overlay and squashfs.img are found, read in place and replaced as on FAT32.
#[test]
fn merge_on_a_fat16_stick() {
    if !require(
        tools_ok() && tool("mkfs.fat").is_file() && tool("sfdisk").is_file(),
        "dosfstools, util-linux",
    ) || !require(is_root(), "root")
    {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("fat16.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(300 << 20)
        .unwrap();
    let table = d.path().join("table");
    std::fs::write(&table, "start=2048, type=6, bootable\n").unwrap();
    let out = std::process::Command::new(tool("sfdisk"))
        .arg("-q")
        .arg(&img)
        .stdin(std::fs::File::open(&table).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let blocks = ((300u64 << 20) / 512 - 2048) / 2;
    sh(
        "mkfs.fat",
        &[
            "-F",
            "16",
            "-n",
            "LIVE",
            "-i",
            "12345678",
            "--offset",
            "2048",
            img.to_str().unwrap(),
            &blocks.to_string(),
        ],
    );
    let part = 2048 * 512;
    let mmd = std::process::Command::new(tool("mmd"))
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{part}", img.display()))
        .arg("::/LiveOS")
        .output()
        .unwrap();
    assert!(mmd.status.success());
    let sq = d.path().join("squashfs.img");
    iso_extract(flat_iso(), "/LiveOS/squashfs.img", &sq);
    fat_put(&img, part, &sq, "LiveOS/squashfs.img");
    let src = d.path().join("ov");
    std::fs::create_dir_all(src.join("overlayfs/etc")).unwrap();
    std::fs::create_dir_all(src.join("ovlwork")).unwrap();
    std::fs::write(src.join("overlayfs/etc/hostname"), "fat16\n").unwrap();
    let ov = d.path().join("overlay.img");
    sh(
        "mke2fs",
        &[
            "-q",
            "-F",
            "-t",
            "ext4",
            "-d",
            src.to_str().unwrap(),
            ov.to_str().unwrap(),
            "16M",
        ],
    );
    fat_put(&img, part, &ov, "LiveOS/overlay-LIVE-1234-5678");

    let work = d.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let out = livestick(&[
        "overlay",
        "merge",
        img.to_str().unwrap(),
        "--yes",
        "--workdir",
        work.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let new = d.path().join("new.img");
    fat_copy_out(&img, part, "LiveOS/squashfs.img", &new);
    assert_eq!(
        sh(
            "unsquashfs",
            &["-cat", new.to_str().unwrap(), "etc/hostname"]
        ),
        "fat16\n"
    );
    let back = d.path().join("ov-after.img");
    fat_copy_out(&img, part, "LiveOS/overlay-LIVE-1234-5678", &back);
    assert!(
        !dbg(back.to_str().unwrap(), "ls -p /overlayfs").contains("/etc/"),
        "overlay reset"
    );
    assert!(!fat_ls(&img, part, "LiveOS").to_lowercase().contains(".new"));
    fsck_fat(&img, part, (300 << 20) - part, d.path());
}

/// A flat squashfs (no nested rootfs.img) cannot carry a dm-snapshot overlay, so
/// livestick gives it an OverlayFS overlay without being asked (issue 12).
#[test]
fn flat_squashfs_gets_an_overlayfs_overlay() {
    let iso = flat_iso();
    let inspect = std::process::Command::new(crate::support::bin())
        .args(["inspect", "--json"])
        .arg(iso)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(v["root"]["kind"], "flat", "{v}");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("flat.img");
    let out = std::process::Command::new(crate::support::bin())
        .args(["--json", "write"])
        .arg(iso)
        .arg(&img)
        .args(["--size", "256M", "--overlay-size-mb", "16", "--dry-run"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["overlay"]["kind"], "overlayfs", "{plan}");
    assert!(!img.exists(), "a dry run created the image");
}
