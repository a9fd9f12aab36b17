//! Overlay maintenance on the ext4 live layout (issue 12 part 4): the overlay file
//! on the ext4 partition 2 is one more place of the overlay interface, read and
//! written in place by its extents. Checked with e2fsck -fn on the partition,
//! debugfs (stat, ex, dump) and `livestick overlay status`, on sticks whose every
//! byte was random before the write (unwritten extents must keep reading as zeros).

use std::io::{Cursor, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{fill_random, listed_entry, livestick, synthetic_iso, tmp};
use livestick::disk::ext4_fs::{Ext4FileRw, find_live_partition};
use livestick::io::SyncData;
use livestick::persist::snapshot::{self, CowWriter, Opened};

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "livestick failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn debugfs(image: &Path, offset: u64, cmd: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", cmd])
        .arg(format!("{}?offset={offset}", image.display()))
        .output()
        .expect("run debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn e2fsck_clean(spec: &str) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(spec)
        .output()
        .expect("run e2fsck");
    assert!(
        out.status.success(),
        "e2fsck -fn {spec}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Blocks the host really holds for `path`, in bytes.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

/// A stick of the ext4 live layout written over random bytes, with its ext4
/// partition's offset and the overlay's path there.
struct Ext4Stick {
    _dir: tempfile::TempDir,
    image: PathBuf,
    part: u64,
    overlay: String,
}

impl Ext4Stick {
    fn s(&self) -> &str {
        self.image.to_str().expect("utf-8 path")
    }

    fn check_partition(&self) {
        e2fsck_clean(&format!("{}?offset={}", self.image.display(), self.part));
    }

    /// The overlay as debugfs reads it, in a host file.
    fn dump_overlay(&self) -> PathBuf {
        let out = self._dir.path().join("overlay.dump");
        let _ = std::fs::remove_file(&out);
        debugfs(
            &self.image,
            self.part,
            &format!("dump {} {}", self.overlay, out.display()),
        );
        assert!(out.is_file(), "debugfs dumped nothing");
        out
    }

    fn overlay_size(&self) -> u64 {
        let stat = debugfs(&self.image, self.part, &format!("stat {}", self.overlay));
        stat.split("Size: ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no size in {stat}"))
    }

    fn status(&self) -> serde_json::Value {
        let out = ok(&livestick(&["overlay", "status", self.s(), "--json"]));
        serde_json::from_str(&out).expect("status JSON")
    }
}

fn ext4_stick(iso: &str, size: u64, extra: &[&str]) -> Ext4Stick {
    ext4_stick_over(iso, size, extra, true)
}

/// A stick of the ext4 live layout written over random bytes (`random`), or over
/// a sparse file when it must be larger than random bytes are quick to make.
fn ext4_stick_over(iso: &str, size: u64, extra: &[&str], random: bool) -> Ext4Stick {
    let dir = tmp();
    let image = dir.path().join("stick.img");
    if random {
        fill_random(&image, size);
    } else {
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size))
            .expect("sparse stick image");
    }
    let iso = if iso.starts_with("boot-") {
        crate::support::fixtures::boot_iso(iso)
    } else {
        synthetic_iso(iso)
    };
    let mut args = vec![
        "write",
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--ext4",
        "--yes",
        "--overlay-size-mb",
        "64",
    ];
    args.extend_from_slice(extra);
    ok(&livestick(&args));
    let table = crate::support::sfdisk(&image);
    let parts = table["partitiontable"]["partitions"]
        .as_array()
        .expect("partitions")
        .clone();
    assert_eq!(parts.len(), 2, "{table}");
    let part = parts[1]["start"].as_u64().expect("start") * 512;
    let ls = debugfs(&image, part, "ls /LiveOS");
    let name = ls
        .split_whitespace()
        .find(|w| w.starts_with("overlay-"))
        .unwrap_or_else(|| panic!("no overlay in {ls}"))
        .to_string();
    let t = Ext4Stick {
        _dir: dir,
        image,
        part,
        overlay: format!("/LiveOS/{name}"),
    };
    t.check_partition();
    t
}

/// What the kernel does to a dm-snapshot store in use: a new store, then
/// exceptions for `chunks` changed chunks, written through the overlay's extents
/// (and the unwritten extents they land in marked written).
fn use_dm_store(t: &Ext4Stick, chunks: u64) {
    let mut dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&t.image)
        .unwrap();
    let part = find_live_partition(&mut dev, "LiveOS").unwrap().unwrap();
    let map = {
        let mut window = livestick::io::PartitionWindow::new(&mut dev, part.start, part.len);
        part.fs.file(&mut window, &t.overlay).unwrap().unwrap()
    };
    let mut cow = Ext4FileRw::new(&mut dev, &part, &map);
    let len = cow.len();
    if let Opened::Uninitialised { .. } = snapshot::open_store(&mut cow, len).unwrap() {
        snapshot::create_new_store(&mut cow, len, 8).unwrap();
    }
    let Opened::Valid(store) = snapshot::open_store(&mut cow, len).unwrap() else {
        panic!("store not valid")
    };
    let origin_bytes = 4u64 << 20;
    let before = vec![0u8; origin_bytes as usize];
    let mut w = CowWriter::new(*store, origin_bytes).unwrap();
    let mut origin = Cursor::new(&before);
    for i in 0..chunks {
        let data = vec![(i % 250 + 1) as u8; 4096];
        w.write_at(&mut origin, &mut cow, i * 3 * 4096, &data)
            .unwrap();
    }
    cow.flush().unwrap();
    cow.sync_data().unwrap();
}

/// Marks the store invalid, as the kernel does when it runs full.
fn invalidate(t: &Ext4Stick) {
    let mut dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&t.image)
        .unwrap();
    let part = find_live_partition(&mut dev, "LiveOS").unwrap().unwrap();
    let map = {
        let mut window = livestick::io::PartitionWindow::new(&mut dev, part.start, part.len);
        part.fs.file(&mut window, &t.overlay).unwrap().unwrap()
    };
    let mut cow = Ext4FileRw::new(&mut dev, &part, &map);
    cow.seek(SeekFrom::Start(4)).unwrap();
    cow.write_all(&0u32.to_le_bytes()).unwrap();
    cow.sync_data().unwrap();
}

/// The state and exceptions `overlay status` reads in a dump debugfs made of the
/// overlay (a second, independent read path to the same bytes).
fn dumped_state(t: &Ext4Stick) -> (String, u64) {
    let dump = t.dump_overlay();
    let out = ok(&livestick(&[
        "overlay",
        "status",
        dump.to_str().unwrap(),
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    (
        v["state"].as_str().unwrap_or_default().to_string(),
        v["exceptions"].as_u64().unwrap_or(0),
    )
}

#[test]
fn dm_snapshot_overlay_on_ext4_resets_recovers_and_grows_in_place() {
    let t = ext4_stick("fedora-classic.iso", 1 << 30, &[]);
    assert_eq!(t.status()["state"], "uninitialised", "{}", t.status());

    // In use: exceptions written; the partition stays clean and debugfs reads
    // what status reads.
    use_dm_store(&t, 40);
    t.check_partition();
    assert_eq!(dumped_state(&t), ("valid".to_string(), 40));
    let st = t.status();
    assert_eq!(st["state"], "valid", "{st}");
    assert_eq!(st["exceptions"], 40, "{st}");

    // A dry run changes nothing.
    let sum = crate::support::sha256_file(&t.image);
    ok(&livestick(&["overlay", "reset", t.s(), "--dry-run"]));
    assert_eq!(crate::support::sha256_file(&t.image), sum);

    let out = ok(&livestick(&["overlay", "reset", t.s(), "--yes", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("reset JSON");
    assert_eq!(v["dry_run"], false, "{v}");
    assert_eq!(v["kind"], "dm-snapshot", "{v}");
    t.check_partition();
    assert_eq!(dumped_state(&t).0, "uninitialised");
    assert_eq!(t.status()["state"], "uninitialised");

    // Invalidated by overflow, then recovered: the exceptions are kept.
    use_dm_store(&t, 25);
    invalidate(&t);
    assert_eq!(t.status()["state"], "invalid");
    ok(&livestick(&["overlay", "recover", t.s(), "--dry-run"]));
    assert_eq!(t.status()["state"], "invalid", "a dry run changes nothing");
    ok(&livestick(&["overlay", "recover", t.s()]));
    t.check_partition();
    assert_eq!(dumped_state(&t), ("valid".to_string(), 25));

    // Grown without writing zeros: new blocks are unwritten extents.
    let before = allocated(&t.image);
    ok(&livestick(&["overlay", "grow", t.s(), "--add-mb", "192"]));
    let grown = t.overlay_size();
    assert!(grown > 255 << 20 && grown <= 256 << 20, "{grown}");
    assert!(
        allocated(&t.image) - before < 4 << 20,
        "the grow wrote {} bytes",
        allocated(&t.image) - before
    );
    t.check_partition();
    let ex = debugfs(&t.image, t.part, &format!("ex {}", t.overlay));
    assert!(ex.contains("Uninit"), "{ex}");
    assert_eq!(dumped_state(&t), ("valid".to_string(), 25));
    assert_eq!(t.status()["size_bytes"], grown, "{}", t.status());

    // More than the partition has: refused with the figures, nothing changed.
    let sum = crate::support::sha256_file(&t.image);
    let out = livestick(&["overlay", "grow", t.s(), "--size-mb", "100000"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not enough free space") && err.contains("bytes"),
        "{err}"
    );
    assert_eq!(crate::support::sha256_file(&t.image), sum);
}

#[test]
fn overlayfs_overlay_on_ext4_resets_and_grows_in_place() {
    let t = ext4_stick("fedora-classic.iso", 1 << 30, &["--overlayfs"]);
    let st = t.status();
    assert!(st["used_bytes"].is_u64(), "not an OverlayFS overlay: {st}");

    ok(&livestick(&["overlay", "reset", t.s(), "--yes"]));
    t.check_partition();
    let dump = t.dump_overlay();
    e2fsck_clean(dump.to_str().unwrap());
    let ls = Command::new("debugfs")
        .args(["-R", "ls /"])
        .arg(&dump)
        .output()
        .expect("debugfs");
    let ls = String::from_utf8_lossy(&ls.stdout);
    assert!(ls.contains("overlayfs") && ls.contains("ovlwork"), "{ls}");

    let work = t._dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    ok(&livestick(&[
        "overlay",
        "grow",
        t.s(),
        "--add-mb",
        "64",
        "--workdir",
        work.to_str().unwrap(),
    ]));
    assert_eq!(t.overlay_size(), 128 << 20);
    t.check_partition();
    // The grown ext4 reads clean although the new blocks held random bytes: what
    // resize2fs wrote is marked written, the rest still reads as zeros.
    let dump = t.dump_overlay();
    e2fsck_clean(dump.to_str().unwrap());
    let blocks = crate::support::dumpe2fs_field(&dump, "Block count");
    let bsize = crate::support::dumpe2fs_field(&dump, "Block size");
    let fs_bytes: u64 = blocks.parse::<u64>().unwrap() * bsize.parse::<u64>().unwrap();
    assert_eq!(fs_bytes, 128 << 20);
}

impl Ext4Stick {
    fn dump(&self, path: &str, name: &str) -> PathBuf {
        let out = self._dir.path().join(name);
        let _ = std::fs::remove_file(&out);
        debugfs(
            &self.image,
            self.part,
            &format!("dump {path} {}", out.display()),
        );
        assert!(out.is_file(), "debugfs dumped nothing of {path}");
        out
    }
}

fn debugfs_cat(ext4: &Path, file: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {file}")])
        .arg(ext4)
        .output()
        .expect("debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn debugfs_w(spec: &str, script: &str) {
    let mut child = Command::new("debugfs")
        .args(["-w", "-f", "-", spec])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("debugfs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())
        .expect("feed debugfs");
    assert!(child.wait().expect("debugfs").success());
}

#[test]
fn plain_home_on_ext4_grows_in_place_keeping_its_files() {
    let t = ext4_stick(
        "fedora-classic.iso",
        1 << 30,
        &["--home-size-mb", "64", "--unencrypted-home"],
    );
    // inspect shows the layout: boot files on the FAT, the live directory on ext4.
    let out = ok(&livestick(&["inspect", t.s(), "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("inspect JSON");
    let l = &v["ext4_live"];
    assert_eq!(l["partition"], 2, "{v}");
    assert_eq!(l["boot_partition"], 1, "{v}");
    assert_eq!(l["start_bytes"], t.part, "{v}");
    let files: Vec<&str> = l["files"]
        .as_array()
        .expect("files")
        .iter()
        .filter_map(|f| f["path"].as_str())
        .collect();
    assert!(files.contains(&"/LiveOS/squashfs.img"), "{files:?}");
    assert!(files.contains(&"/LiveOS/home.img"), "{files:?}");
    assert!(files.contains(&t.overlay.as_str()), "{files:?}");
    assert_eq!(v["source_home"]["size_bytes"], 64u64 << 20, "{v}");
    assert_eq!(v["source_overlay"]["path"], t.overlay.as_str(), "{v}");
    let text = ok(&livestick(&["inspect", t.s()]));
    assert!(text.contains("ext4 partition 2"), "{text}");
    // What `devices` lists for such a stick (its listing of block devices reads each
    // one the same way).
    let file = std::fs::File::open(&t.image).unwrap();
    let live = livestick::disk::devices::ext4_live_info(
        &file,
        1,
        &livestick::disk::devices::NoOverlayProbe,
    )
    .unwrap()
    .expect("a LiveOS on the ext4 partition");
    assert_eq!((live.partition, live.boot_partition), (2, Some(1)));
    assert_eq!(live.home_size, Some(64 << 20));
    assert!(live.squashfs_size.is_some());
    assert_eq!(live.overlays.len(), 1, "{:?}", live.overlays);
    assert_eq!(live.overlays[0].file, t.overlay);
    assert_eq!(live.overlays[0].size, 64 << 20);

    // A file in the home, put there by debugfs on a copy, the copy put back.
    let home = t.dump("/LiveOS/home.img", "home.img");
    let note = t._dir.path().join("note.txt");
    std::fs::write(&note, "kept across resize\n").unwrap();
    debugfs_w(
        home.to_str().unwrap(),
        &format!("write {} note.txt\n", note.display()),
    );
    let part = format!("{}?offset={}", t.image.display(), t.part);
    debugfs_w(
        &part,
        &format!(
            "rm /LiveOS/home.img\nwrite {} LiveOS/home.img\n",
            home.display()
        ),
    );
    t.check_partition();

    let sum = crate::support::sha256_file(&t.image);
    let out = ok(&livestick(&[
        "home",
        "resize",
        t.s(),
        "--size-mb",
        "96",
        "--dry-run",
    ]));
    assert!(out.contains("96"), "{out}");
    assert_eq!(crate::support::sha256_file(&t.image), sum);

    let work = t._dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    ok(&livestick(&[
        "home",
        "resize",
        t.s(),
        "--size-mb",
        "96",
        "--workdir",
        work.to_str().unwrap(),
    ]));
    t.check_partition();
    let home = t.dump("/LiveOS/home.img", "home2.img");
    assert_eq!(std::fs::metadata(&home).unwrap().len(), 96 << 20);
    e2fsck_clean(home.to_str().unwrap());
    assert_eq!(debugfs_cat(&home, "note.txt"), "kept across resize\n");
    let blocks: u64 = crate::support::dumpe2fs_field(&home, "Block count")
        .parse()
        .unwrap();
    assert_eq!(blocks * 4096, 96 << 20);
    let ex = debugfs(&t.image, t.part, "ex /LiveOS/home.img");
    assert!(
        ex.contains("Uninit"),
        "the new blocks resize2fs left alone stay unwritten:\n{ex}"
    );

    // More than the partition has: refused with the figures, nothing changed.
    let sum = crate::support::sha256_file(&t.image);
    let out = livestick(&["home", "resize", t.s(), "--size-mb", "4000"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ext4 partition 2") && err.contains("free") && err.contains("MiB"),
        "{err}"
    );
    assert_eq!(crate::support::sha256_file(&t.image), sum);
}

#[test]
fn luks_home_on_ext4_grows_in_place() {
    const PASS: &str = "correct horse battery staple\n";
    let dir = tmp();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, PASS).unwrap();
    let t = ext4_stick(
        "fedora-classic.iso",
        1 << 30,
        &[
            "--home-size-mb",
            "64",
            "--passphrase-file",
            pw.to_str().unwrap(),
        ],
    );
    let work = t._dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    ok(&livestick(&[
        "home",
        "resize",
        t.s(),
        "--size-mb",
        "80",
        "--passphrase-file",
        pw.to_str().unwrap(),
        "--workdir",
        work.to_str().unwrap(),
    ]));
    t.check_partition();
    let home = t.dump("/LiveOS/home.img", "home.img");
    assert_eq!(std::fs::metadata(&home).unwrap().len(), 80 << 20);
    let key = dir.path().join("key");
    std::fs::write(&key, PASS.trim_end()).unwrap();
    let opened = Command::new("cryptsetup")
        .args(["open", "--test-passphrase", "--key-file"])
        .arg(&key)
        .arg(&home)
        .status()
        .expect("cryptsetup");
    assert!(opened.success(), "cryptsetup opens the grown container");
    let plain = dir.path().join("plain.ext4");
    crate::support::luks_decrypt_to(&home, &plain, PASS.trim_end().as_bytes());
    e2fsck_clean(plain.to_str().unwrap());
    let blocks: u64 = crate::support::dumpe2fs_field(&plain, "Block count")
        .parse()
        .unwrap();
    assert!(blocks * 4096 > 60 << 20, "{blocks} blocks");
}

/// The size of the ext4 inside home.img, read by debugfs where the file's
/// first extent lies on the stick (the superblock is in its first block).
fn home_fs_bytes(t: &Ext4Stick) -> u64 {
    let ex = debugfs(&t.image, t.part, "ex /LiveOS/home.img");
    // "Level Entries Logical Physical Length Flags": the leaf (two ranges, where an
    // index node has one block) starting at file block 0.
    let physical: u64 = ex
        .lines()
        .find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            if cols.iter().filter(|c| **c == "-").count() != 2 {
                return None;
            }
            let at = cols.iter().position(|c| *c == "-")?;
            (cols.get(at.checked_sub(1)?)? == &"0")
                .then(|| cols.get(at + 2)?.parse().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("no first extent in {ex}"));
    // -c: only the superblock and descriptors are read, which lie in that first
    // extent; the bitmaps further on need the file's other extents.
    let out = Command::new("debugfs")
        .args(["-c", "-R", "stats"])
        .arg(format!(
            "{}?offset={}",
            t.image.display(),
            t.part + physical * 4096
        ))
        .output()
        .expect("run debugfs");
    let stats = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {stats}"))
    };
    let (blocks, bsize) = (field("Block count:"), field("Block size:"));
    blocks * bsize
}

#[test]
fn home_on_ext4_grows_past_fat_file_limit() {
    let t = ext4_stick_over(
        "fedora-classic.iso",
        6 << 30,
        &["--home-size-mb", "64", "--unencrypted-home"],
        false,
    );
    let work = t._dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let out = ok(&livestick(&[
        "home",
        "resize",
        t.s(),
        "--size-mb",
        "4200",
        "--workdir",
        work.to_str().unwrap(),
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("resize JSON");
    assert_eq!(v["plan"]["new_bytes"], 4200u64 << 20, "{v}");
    t.check_partition();
    let stat = debugfs(&t.image, t.part, "stat /LiveOS/home.img");
    assert!(stat.contains(&format!("Size: {}", 4200u64 << 20)), "{stat}");
    assert_eq!(home_fs_bytes(&t), 4200 << 20);

    // The partition's free space is the bound, said with its figures.
    let sum = crate::support::sha256_file(&t.image);
    let out = livestick(&["home", "resize", t.s(), "--size-mb", "9000"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ext4 partition 2") && err.contains("free") && !err.contains("FAT32"),
        "{err}"
    );
    assert_eq!(crate::support::sha256_file(&t.image), sum);
}

#[test]
fn luks_home_on_ext4_plans_past_fat_file_limit() {
    const PASS: &str = "correct horse battery staple\n";
    let dir = tmp();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, PASS).unwrap();
    let t = ext4_stick_over(
        "fedora-classic.iso",
        6 << 30,
        &[
            "--home-size-mb",
            "64",
            "--passphrase-file",
            pw.to_str().unwrap(),
        ],
        false,
    );
    let sum = crate::support::sha256_file(&t.image);
    let out = ok(&livestick(&[
        "home",
        "resize",
        t.s(),
        "--size-mb",
        "4200",
        "--passphrase-file",
        pw.to_str().unwrap(),
        "--dry-run",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("resize plan JSON");
    assert_eq!(v["plan"]["new_bytes"], 4200u64 << 20, "{v}");
    assert_eq!(crate::support::sha256_file(&t.image), sum);
}

/// The root image inside the stick's squashfs.img (LiveOS/rootfs.img), read out
/// with debugfs and unsquashfs.
fn root_image_of(t: &Ext4Stick, name: &str) -> PathBuf {
    let sq = t.dump("/LiveOS/squashfs.img", &format!("{name}.squashfs"));
    let dir = t._dir.path().join(name);
    let out = Command::new("unsquashfs")
        .args(["-no-xattrs", "-d"])
        .arg(&dir)
        .arg(&sq)
        .arg("LiveOS/rootfs.img")
        .output()
        .expect("run unsquashfs");
    assert!(out.status.success(), "{out:?}");
    dir.join("LiveOS/rootfs.img")
}

/// What a boot does to the dm-snapshot overlay of `t`, written in place as the
/// kernel writes it: each `(offset, bytes)` of `changes` written over the root
/// image `origin` lands in the store as an exception.
fn boot_writes(t: &Ext4Stick, origin: &Path, changes: &[(u64, Vec<u8>)]) {
    let mut dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&t.image)
        .unwrap();
    let part = find_live_partition(&mut dev, "LiveOS").unwrap().unwrap();
    let map = {
        let mut window = livestick::io::PartitionWindow::new(&mut dev, part.start, part.len);
        part.fs.file(&mut window, &t.overlay).unwrap().unwrap()
    };
    let mut cow = Ext4FileRw::new(&mut dev, &part, &map);
    let len = cow.len();
    if let Opened::Uninitialised { .. } = snapshot::open_store(&mut cow, len).unwrap() {
        snapshot::create_new_store(&mut cow, len, 8).unwrap();
    }
    let Opened::Valid(store) = snapshot::open_store(&mut cow, len).unwrap() else {
        panic!("store not valid")
    };
    let origin_bytes = std::fs::metadata(origin).unwrap().len();
    let mut w = CowWriter::new(*store, origin_bytes).unwrap();
    let mut o = std::fs::File::open(origin).unwrap();
    for (at, data) in changes {
        w.write_at(&mut o, &mut cow, *at, data).unwrap();
    }
    cow.flush().unwrap();
    cow.sync_data().unwrap();
}

#[test]
fn dm_snapshot_repair_on_ext4_reads_the_root_image_on_the_stick() {
    let t = ext4_stick("fedora-classic.iso", 1 << 30, &[]);
    let root = root_image_of(&t, "before");
    // The live system rewrote the first chunk (the superblock's) with what it held.
    let mut first = vec![0u8; 4096];
    std::io::Read::read_exact(&mut std::fs::File::open(&root).unwrap(), &mut first).unwrap();
    boot_writes(&t, &root, &[(0, first)]);
    let work = t._dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    // No --origin: the root image is the one in the stick's squashfs.img.
    let out = ok(&livestick(&[
        "overlay",
        "recover",
        t.s(),
        "--repair",
        "--workdir",
        work.to_str().unwrap(),
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("recover JSON");
    let repair = &v["repair"];
    assert!(repair["fsck_exit_code"].as_i64().unwrap() <= 1, "{v}");
    // e2fsck -f -y records its check in the superblock: that chunk is folded in.
    assert!(repair["chunks_folded"].as_u64().unwrap() >= 1, "{v}");
    t.check_partition();
    assert_eq!(dumped_state(&t).0, "valid");
}

/// Runs livestick with `LIVESTICK_FAILPOINT=step`.
fn livestick_stopped_at(step: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_livestick"))
        .args(args)
        .env("LIVESTICK_FAILPOINT", step)
        .output()
        .expect("run livestick")
}

/// The names in /LiveOS of the ext4 partition, as debugfs lists them.
fn live_names(t: &Ext4Stick) -> Vec<String> {
    debugfs(&t.image, t.part, "ls -l /LiveOS")
        .lines()
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .collect()
}

fn squashfs_sum(t: &Ext4Stick) -> String {
    crate::support::sha256_file(&t.dump("/LiveOS/squashfs.img", "sq.sum"))
}

#[test]
fn dm_snapshot_merge_on_ext4_swaps_in_one_block_and_repairs_a_stop() {
    let t = ext4_stick("fedora-classic.iso", 1 << 30, &[]);
    let before = root_image_of(&t, "before");
    // What the live system did: a new file in the root file system. The chunks it
    // changed are what it wrote through the overlay.
    let after = t._dir.path().join("after.img");
    std::fs::copy(&before, &after).unwrap();
    let payload = t._dir.path().join("payload");
    std::fs::write(&payload, vec![0x42u8; 300_000]).unwrap();
    debugfs_w(
        after.to_str().unwrap(),
        &format!("write {} payload\n", payload.display()),
    );
    let (old, new) = (
        std::fs::read(&before).unwrap(),
        std::fs::read(&after).unwrap(),
    );
    let changes: Vec<(u64, Vec<u8>)> = old
        .chunks(4096)
        .zip(new.chunks(4096))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, (_, y))| ((i * 4096) as u64, y.to_vec()))
        .collect();
    assert!(!changes.is_empty());
    boot_writes(&t, &before, &changes);
    let old_sum = squashfs_sum(&t);
    let work = t._dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let merge = |step: Option<&str>| {
        let args = [
            "overlay",
            "merge",
            t.s(),
            "--yes",
            "--no-fsck",
            "--workdir",
            work.to_str().unwrap(),
            "--json",
        ];
        match step {
            Some(s) => livestick_stopped_at(s, &args),
            None => livestick(&args),
        }
    };

    // A dry run plans on the partition and changes nothing.
    let sum = crate::support::sha256_file(&t.image);
    let out = ok(&livestick(&[
        "overlay",
        "merge",
        t.s(),
        "--dry-run",
        "--json",
        "--workdir",
        work.to_str().unwrap(),
    ]));
    let plan: serde_json::Value = serde_json::from_str(&out).expect("plan JSON");
    assert_eq!(plan["exceptions"], changes.len(), "{plan}");
    assert!(
        plan["target_dir"]
            .as_str()
            .unwrap()
            .contains("ext4 partition 2"),
        "{plan}"
    );
    assert_eq!(crate::support::sha256_file(&t.image), sum);

    // Too little room on the partition for the new image beside the old one:
    // refused before anything is built, with the figures.
    let stats = debugfs(&t.image, t.part, "stats");
    let free: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("Free blocks:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no free blocks in {stats}"));
    let part = format!("{}?offset={}", t.image.display(), t.part);
    debugfs_w(
        &part,
        &format!(
            "write /dev/null filler\nfallocate filler 0 {}\n",
            free - 1000
        ),
    );
    let out = livestick(&[
        "overlay",
        "merge",
        t.s(),
        "--yes",
        "--workdir",
        work.to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not enough space")
            && err.contains("ext4 partition 2")
            && err.contains("bytes needed"),
        "{err}"
    );
    debugfs_w(&part, "rm filler\n");
    t.check_partition();
    assert_eq!(squashfs_sum(&t), old_sum);

    // Each crash window leaves one whole squashfs.img (old before the exchange, new
    // after) and a partition e2fsck finds clean; the next run repairs the leftover.
    for (step, swapped) in [
        ("stage", false),
        ("verify", false),
        ("fold", false),
        ("swap-half", true),
    ] {
        let out = merge(Some(step));
        assert!(!out.status.success(), "{step}: {out:?}");
        t.check_partition();
        assert_eq!(squashfs_sum(&t) != old_sum, swapped, "{step}");
        assert!(
            live_names(&t).contains(&"squashfs.img.new".to_string()),
            "{step}: {:?}",
            live_names(&t)
        );
        if swapped {
            // The old image is the leftover: the overlay still holds the changes,
            // which the new image holds too.
            assert_eq!(
                crate::support::sha256_file(&t.dump("/LiveOS/squashfs.img.new", "left")),
                old_sum,
                "{step}"
            );
            break;
        }
    }
    let out = ok(&merge(None));
    let v: serde_json::Value = serde_json::from_str(&out).expect("merge JSON");
    let repaired = v["repaired"].to_string();
    assert!(repaired.contains("squashfs.img.new"), "{v}");
    assert_eq!(v["overlay_reset"], true, "{v}");
    t.check_partition();
    assert!(
        !live_names(&t).iter().any(|n| n.ends_with(".new")),
        "{:?}",
        live_names(&t)
    );
    // The new root image holds the file, read by unsquashfs and debugfs.
    let merged = root_image_of(&t, "merged");
    assert_eq!(debugfs_cat(&merged, "payload").len(), 300_000);
    let ex = debugfs(&t.image, t.part, "ex /LiveOS/squashfs.img");
    assert!(
        !ex.contains("Uninit"),
        "the new image's extents are written:\n{ex}"
    );
    let mode = debugfs(&t.image, t.part, "stat /LiveOS/squashfs.img");
    assert!(mode.contains("Mode:  0644"), "not writable by all: {mode}");
    assert_eq!(dumped_state(&t).0, "uninitialised");
    assert_eq!(t.status()["state"], "uninitialised");
    // The manifest names the merged image: `verify` reads it inside ext4, intact.
    let out = livestick(&["--json", "verify", t.s()]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("verify JSON");
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    let root = listed_entry(&report, "/LiveOS/squashfs.img");
    assert_eq!(root["state"], "intact", "{report:#}");
}

#[test]
fn overlayfs_merge_on_ext4_builds_the_flat_root_and_empties_the_overlay() {
    // A flat root gets an OverlayFS overlay by itself.
    let t = ext4_stick("boot-flat.iso", 1 << 30, &[]);
    assert_eq!(t.status()["kind"], "overlayfs", "{}", t.status());
    // What the live system did: a file in the upper dir. The overlay is changed on
    // a copy by debugfs and put back in its place.
    let ov = t.dump_overlay();
    let payload = t._dir.path().join("payload");
    std::fs::write(&payload, b"merged from the ext4 layout\n").unwrap();
    debugfs_w(
        ov.to_str().unwrap(),
        &format!("write {} overlayfs/merged-note\n", payload.display()),
    );
    let part = format!("{}?offset={}", t.image.display(), t.part);
    let rel = t.overlay.trim_start_matches('/');
    debugfs_w(&part, &format!("rm {rel}\nwrite {} {rel}\n", ov.display()));
    t.check_partition();
    assert!(upper_listing(&t).contains("merged-note"));

    let work = t._dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let out = ok(&livestick(&[
        "overlay",
        "merge",
        t.s(),
        "--yes",
        "--workdir",
        work.to_str().unwrap(),
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("merge JSON");
    assert_eq!(v["overlay_reset"], true, "{v}");
    t.check_partition();
    let sq = t.dump("/LiveOS/squashfs.img", "merged.squashfs");
    let x = t._dir.path().join("merged-tree");
    let unsq = Command::new("unsquashfs")
        .args(["-no-xattrs", "-d"])
        .arg(&x)
        .arg(&sq)
        .output()
        .expect("unsquashfs");
    assert!(unsq.status.success(), "{unsq:?}");
    assert_eq!(
        std::fs::read_to_string(x.join("merged-note")).unwrap(),
        "merged from the ext4 layout\n"
    );
    // The overlay is a fresh, empty file system.
    let fresh = t.dump_overlay();
    e2fsck_clean(fresh.to_str().unwrap());
    let upper = upper_listing(&t);
    assert!(!upper.contains("merged-note"), "{upper}");
}

/// The upper directory of the stick's OverlayFS overlay, listed by debugfs.
fn upper_listing(t: &Ext4Stick) -> String {
    let ov = t.dump_overlay();
    let out = Command::new("debugfs")
        .args(["-R", "ls -l overlayfs"])
        .arg(&ov)
        .output()
        .expect("debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_journal_left_to_replay_is_replayed_before_a_change() {
    let t = ext4_stick(
        "fedora-classic.iso",
        1 << 30,
        &["--home-size-mb", "64", "--unencrypted-home"],
    );
    // A committed transaction left in the journal, as a live system powered off
    // with the partition mounted leaves one (debugfs writes it: jo, jw, jc).
    let data = t._dir.path().join("logged");
    let logged: Vec<u8> = (0..4096u32).map(|i| (i * 31 + 7) as u8).collect();
    std::fs::write(&data, &logged).unwrap();
    let stats = debugfs(&t.image, t.part, "stats");
    let blocks: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("Block count:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no block count in {stats}"));
    // A free block near the end, away from everything written.
    let target = blocks - 10;
    let part = format!("{}?offset={}", t.image.display(), t.part);
    debugfs_w(
        &part,
        &format!("jo -c\njw -b {target} {}\njc\n", data.display()),
    );
    // `status` only looks, and says the journal is still to be replayed.
    let looked = livestick(&["overlay", "status", t.s()]);
    let said = String::from_utf8_lossy(&looked.stderr);
    assert!(said.contains("not cleanly unmounted"), "{looked:?}");

    let out = ok(&livestick(&["overlay", "reset", t.s(), "--yes", "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("reset JSON");
    assert!(
        v["repaired"]
            .to_string()
            .contains("journal was replayed (1 blocks of 1"),
        "{v}"
    );
    t.check_partition();
    let mut got = vec![0u8; 4096];
    let mut f = std::fs::File::open(&t.image).unwrap();
    f.seek(SeekFrom::Start(t.part + target * 4096)).unwrap();
    std::io::Read::read_exact(&mut f, &mut got).unwrap();
    assert!(got == logged, "the logged block was written home");
    let looked = livestick(&["overlay", "status", t.s()]);
    let said = String::from_utf8_lossy(&looked.stderr);
    assert!(!said.contains("not cleanly"), "{looked:?}");

    // `home resize` replays it too, and its report says so.
    debugfs_w(
        &part,
        &format!("jo -c\njw -b {} {}\njc\n", target - 1, data.display()),
    );
    let work = t._dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let out = ok(&livestick(&[
        "home",
        "resize",
        t.s(),
        "--size-mb",
        "80",
        "--workdir",
        work.to_str().unwrap(),
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("resize JSON");
    assert!(
        v["repaired"].to_string().contains("journal was replayed"),
        "{v}"
    );
    t.check_partition();
}

#[test]
fn overlay_file_on_the_ext4_layout_names_only_an_overlay() {
    let t = ext4_stick(
        "fedora-classic.iso",
        1 << 30,
        &["--home-size-mb", "16", "--unencrypted-home"],
    );
    let home_before = debugfs(&t.image, t.part, "stat /LiveOS/home.img");
    for other in ["home.img", "squashfs.img", "nothing-here"] {
        for verb in [
            &["reset", "--yes"][..],
            &["status"][..],
            &["grow", "--add-mb", "8", "--yes"][..],
        ] {
            let mut args = vec!["overlay", verb[0], t.s(), "--overlay-file", other];
            args.extend_from_slice(&verb[1..]);
            let out = livestick(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
            assert!(
                err.contains(&format!("has no overlay /LiveOS/{other}"))
                    && err.contains(&t.overlay),
                "names what is there: {err}"
            );
        }
    }
    assert_eq!(
        debugfs(&t.image, t.part, "stat /LiveOS/home.img"),
        home_before,
        "the home is untouched"
    );
    t.check_partition();
    // Its own name still works; a grow is recorded in the manifest (on the FAT),
    // so that verify agrees with the new size.
    let name = t.overlay.rsplit('/').next().unwrap().to_string();
    ok(&livestick(&[
        "overlay",
        "status",
        t.s(),
        "--overlay-file",
        &name,
    ]));
    let before = t.overlay_size();
    ok(&livestick(&[
        "overlay",
        "grow",
        t.s(),
        "--add-mb",
        "8",
        "--yes",
    ]));
    assert_eq!(t.overlay_size(), before + (8 << 20));
    let out = livestick(&["verify", t.s()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
