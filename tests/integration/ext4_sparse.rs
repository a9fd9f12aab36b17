//! ext4 images copied as sparse files: only the data regions of what
//! `make_ext4_image` builds are written to the stick, and everything else keeps
//! what the stick held before. These tests put that "before" in place (random
//! bytes, an old ext4 with files, an old journal with an unreplayed
//! transaction), copy the data regions over it, and judge the result with
//! e2fsprogs alone (e2fsck, dumpe2fs, debugfs), never with livestick's code.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::{dumpe2fs_field as field, fill_random};
use livestick::disk::ext4::{Ext4Error, Ext4Options, make_ext4_image, set_journal_sequence};
use livestick::disk::sparse::data_regions;

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;

/// The e2fsprogs tools, or `false` (skipped here, a failure when CI=true).
fn have_e2fsprogs() -> bool {
    ["mke2fs", "e2fsck", "dumpe2fs", "debugfs"].iter().all(|t| {
        crate::support::require(
            crate::support::tool(t).is_file(),
            &format!("`{t}` (e2fsprogs)"),
        )
    })
}

fn e2(tool: &str, args: &[&str]) -> Output {
    Command::new(crate::support::tool(tool))
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .unwrap_or_else(|e| panic!("{tool} runs: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `e2(..)` that must succeed; its stdout.
fn e2_ok(tool: &str, args: &[&str]) -> String {
    let o = e2(tool, args);
    assert!(o.status.success(), "{tool} {args:?} failed: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// debugfs -w with a script of requests on standard input.
fn debugfs_script(image: &Path, script: &str) -> String {
    let mut child = Command::new(crate::support::tool("debugfs"))
        .args(["-w", "-f", "-", p(image)])
        .env("LC_ALL", "C")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "debugfs failed: {}", text(&o));
    text(&o)
}

/// Write the data regions of `src` onto `dst` at the same offsets, as
/// livestick writes an image to the stick; the bytes written.
fn copy_data_regions(src: &Path, dst: &Path) -> u64 {
    let s = File::open(src).unwrap();
    let d = OpenOptions::new().write(true).open(dst).unwrap();
    assert!(d.metadata().unwrap().len() >= s.metadata().unwrap().len());
    let mut buf = vec![0u8; MIB as usize];
    let mut total = 0;
    for r in data_regions(&s).unwrap() {
        let mut at = r.start;
        while at < r.end {
            let n = (r.end - at).min(MIB) as usize;
            s.read_exact_at(&mut buf[..n], at).unwrap();
            d.write_all_at(&buf[..n], at).unwrap();
            at += n as u64;
        }
        total += r.end - r.start;
    }
    d.sync_all().unwrap();
    total
}

/// What was on the stick before.
#[derive(Clone, Copy, Debug)]
enum Stale {
    /// Random bytes, e.g. a stick wiped with random data or an old LUKS volume.
    Random,
    /// An old ext4 of the same size and layout with files and directories in
    /// it and a committed, unreplayed transaction in its journal: its inode
    /// tables, directories and journal lie exactly where the new ones will.
    Ext4,
}

/// The images livestick builds with `make_ext4_image`.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// home.img, plain: the options of `persist::home::home_ext4_options`.
    Home,
    /// The OverlayFS overlay of `prepare::prepare`: default options,
    /// no label, `overlayfs/` and `ovlwork/` from a root directory.
    Overlay,
}

impl Kind {
    fn block_size(self) -> Option<u32> {
        match self {
            Kind::Home => Some(4096),
            Kind::Overlay => None,
        }
    }

    fn build(self, dir: &Path, size: u64) -> PathBuf {
        let img = dir.join("new.img");
        match self {
            Kind::Home => {
                let opts = Ext4Options {
                    block_size: Some(4096),
                    reserved_percent: Some(0),
                    ..Ext4Options::default()
                };
                make_ext4_image(&img, size, "HOME", &opts).unwrap();
            }
            Kind::Overlay => {
                let root = dir.join("overlay-root");
                std::fs::create_dir_all(root.join("overlayfs")).unwrap();
                std::fs::create_dir_all(root.join("ovlwork")).unwrap();
                let opts = Ext4Options {
                    root_dir: Some(root),
                    ..Ext4Options::default()
                };
                make_ext4_image(&img, size, "", &opts).unwrap();
            }
        }
        img
    }

    fn expected_root(self) -> Vec<&'static str> {
        match self {
            Kind::Home => vec!["lost+found"],
            Kind::Overlay => vec!["lost+found", "overlayfs", "ovlwork"],
        }
    }
}

/// An old ext4 as a previous tool (or livestick before this change) left it:
/// made by mke2fs with fully written inode tables and journal, then used.
fn fill_stale_ext4(dir: &Path, path: &Path, size: u64, block_size: Option<u32>) {
    File::create(path).unwrap().set_len(size).unwrap();
    let mut args = vec![
        "-q".to_string(),
        "-F".into(),
        "-t".into(),
        "ext4".into(),
        "-E".into(),
        "lazy_itable_init=0,lazy_journal_init=0,nodiscard".into(),
    ];
    if let Some(b) = block_size {
        args.extend(["-b".into(), b.to_string(), "-m".into(), "0".into()]);
    }
    args.extend([p(path).to_string(), format!("{}k", size / 1024)]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    e2_ok("mke2fs", &args);
    let content = dir.join("old-content");
    std::fs::write(&content, "old file content\n".repeat(1000)).unwrap();
    let mut script = String::from("mkdir olddir\nmkdir overlayfs\nmkdir stale-dir\n");
    for i in 0..200 {
        script += &format!("write {} olddir/file{i}\n", p(&content));
    }
    for i in 0..40 {
        script += &format!("write {} overlayfs/upper{i}\n", p(&content));
    }
    // A transaction left in the journal, as after a crash.
    script += &format!("jo -c\njw -b 3000 {}\njc\n", p(&content));
    debugfs_script(path, &script);
    let ls = e2_ok("debugfs", &["-R", "ls -l /olddir", p(path)]);
    assert!(ls.contains("file199"), "the old fs has its files: {ls}");
}

/// The names in a directory listing of `debugfs -R 'ls -l DIR'`, without `.`/`..`.
fn root_names(image: &Path) -> Vec<String> {
    let ls = e2_ok("debugfs", &["-R", "ls -l /", p(image)]);
    let mut names: Vec<String> = ls
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .filter(|n| *n != "." && *n != "..")
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

fn copy_over_stale(kind: Kind, size: u64, stale: Stale) {
    if !have_e2fsprogs() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("stick-area");
    match stale {
        Stale::Random => fill_random(&target, size),
        Stale::Ext4 => fill_stale_ext4(dir.path(), &target, size, kind.block_size()),
    }
    let old_uuid = match stale {
        Stale::Random => String::new(),
        Stale::Ext4 => field(&target, "Filesystem UUID"),
    };

    let new = kind.build(dir.path(), size);
    let uuid = field(&new, "Filesystem UUID");
    assert_ne!(uuid, old_uuid);
    // The image itself: a checksummed journal, and no group that claims a
    // zeroed inode table (those tables are holes: stale bytes on the stick).
    let features = field(&new, "Journal features");
    assert!(
        features.contains("journal_checksum_v3"),
        "journal features: {features}"
    );
    assert_ne!(
        field(&new, "Journal sequence"),
        "0x00000001",
        "the journal starts at a random sequence"
    );
    let groups = e2_ok("dumpe2fs", &[p(&new)]);
    assert!(
        groups.lines().filter(|l| l.starts_with("Group ")).count() > 0
            && !groups.contains("ITABLE_ZEROED"),
        "group descriptors must not promise zeroed inode tables"
    );

    let written = copy_data_regions(&new, &target);
    eprintln!(
        "{kind:?} {} MiB over {stale:?}: {written} bytes of data regions",
        size / MIB
    );
    assert!(written < size / 4, "{written} of {size} bytes are data");

    let fsck = e2("e2fsck", &["-fn", p(&target)]);
    assert_eq!(fsck.status.code(), Some(0), "e2fsck -fn: {}", text(&fsck));
    assert_eq!(field(&target, "Filesystem UUID"), uuid);
    assert_eq!(root_names(&target), kind.expected_root());
    if matches!(kind, Kind::Overlay) {
        for d in ["/overlayfs", "/ovlwork", "/lost+found"] {
            let ls = e2_ok("debugfs", &["-R", &format!("ls {d}"), p(&target)]);
            let names: Vec<&str> = ls
                .split_whitespace()
                .filter(|w| !w.starts_with('('))
                .collect();
            assert!(
                !names
                    .iter()
                    .any(|n| n.starts_with("upper") || n.starts_with("file")),
                "{d} shows stale entries: {ls}"
            );
        }
    }
}

#[test]
fn home_64mib_over_random_bytes() {
    copy_over_stale(Kind::Home, 64 * MIB, Stale::Random);
}

#[test]
fn home_64mib_over_an_old_ext4() {
    copy_over_stale(Kind::Home, 64 * MIB, Stale::Ext4);
}

#[test]
fn home_1gib_over_random_bytes() {
    copy_over_stale(Kind::Home, GIB, Stale::Random);
}

#[test]
fn home_1gib_over_an_old_ext4() {
    copy_over_stale(Kind::Home, GIB, Stale::Ext4);
}

#[test]
fn overlay_64mib_over_random_bytes() {
    copy_over_stale(Kind::Overlay, 64 * MIB, Stale::Random);
}

#[test]
fn overlay_64mib_over_an_old_ext4() {
    copy_over_stale(Kind::Overlay, 64 * MIB, Stale::Ext4);
}

#[test]
fn overlay_1gib_over_random_bytes() {
    copy_over_stale(Kind::Overlay, GIB, Stale::Random);
}

#[test]
fn overlay_1gib_over_an_old_ext4() {
    copy_over_stale(Kind::Overlay, GIB, Stale::Ext4);
}

// ---------------------------------------------------------------------------
// The journal
// ---------------------------------------------------------------------------

const SIZE: u64 = 64 * MIB;
/// The block the stale transaction writes, and the one the new one writes.
const STALE_TARGET: u64 = 5000;
const NEW_TARGET: u64 = 3000;

fn block(image: &Path, n: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    File::open(image)
        .unwrap()
        .read_exact_at(&mut b, n * 4096)
        .unwrap();
    b
}

/// An image like home.img straight from mke2fs: its journal starts at
/// sequence 1, as every mke2fs journal does.
fn mke2fs_home_like(path: &Path, features: &str) {
    mke2fs_lazy(path, SIZE, &["-b", "4096", "-m", "0", "-O", features]);
}

/// mke2fs on a new sparse file of `size` bytes with the lazy inode tables and journal
/// livestick asks for, root owned by root, and `args` before the file.
fn mke2fs_lazy(path: &Path, size: u64, args: &[&str]) {
    File::create(path).unwrap().set_len(size).unwrap();
    let size_k = format!("{}k", size / 1024);
    let mut all = vec![
        "-q",
        "-F",
        "-t",
        "ext4",
        "-E",
        "lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0",
    ];
    all.extend_from_slice(args);
    all.extend([p(path), size_k.as_str()]);
    e2_ok("mke2fs", &all);
}

/// home.img as livestick makes it, with a chosen UUID or a random one.
fn livestick_home(path: &Path, uuid: Option<uuid::Uuid>) {
    let opts = Ext4Options {
        block_size: Some(4096),
        reserved_percent: Some(0),
        uuid,
        ..Ext4Options::default()
    };
    make_ext4_image(path, SIZE, "HOME", &opts).unwrap();
}

fn journal_sequence(image: &Path) -> u32 {
    let v = field(image, "Journal sequence");
    u32::from_str_radix(v.trim_start_matches("0x"), 16).unwrap()
}

/// What became of the stale transaction.
#[derive(Debug, PartialEq)]
struct Outcome {
    /// It followed the new transaction with the very ID recovery expected
    /// next, so only checksums could stop it.
    in_sequence: bool,
    /// Its block was written into the filesystem.
    replayed: bool,
}

/// The experiment. `old` is the filesystem the stick held: its journal gets
/// two committed, unreplayed transactions (a dummy block, then
/// `STALE_TARGET` ← 'S'…) at journal blocks 1–6. A second later the data
/// regions of `new` are copied over it, and the new filesystem "crashes
/// after mount": debugfs writes its own transaction (`NEW_TARGET` ← 'N'…)
/// at journal blocks 1–3, over the old first one, leaving the stale second
/// right behind it. `e2fsck -fy` then recovers the journal.
fn stale_transaction(dir: &Path, old: &Path, new: &Path) -> Outcome {
    let target = dir.join("stick-area");
    std::fs::rename(old, &target).unwrap();
    let dummy = dir.join("dummy");
    let stale = dir.join("stale");
    let fresh = dir.join("fresh");
    std::fs::write(&dummy, [b'D'; 4096]).unwrap();
    std::fs::write(&stale, [b'S'; 4096]).unwrap();
    std::fs::write(&fresh, [b'N'; 4096]).unwrap();
    let s0 = journal_sequence(&target);
    debugfs_script(
        &target,
        &format!(
            "jo -c\njw -b 4000 {}\njw -b {STALE_TARGET} {}\njc\n",
            p(&dummy),
            p(&stale)
        ),
    );
    let log = e2_ok("debugfs", &["-R", "logdump", p(&target)]);
    assert!(
        log.contains(&format!(
            "Found expected sequence {}, type 2 (commit block) at block 6",
            s0.wrapping_add(1)
        )),
        "the old journal holds the stale transaction: {log}"
    );
    // Recovery tells a stale commit from a corrupt one by its time (whole
    // seconds): the old transactions were written before the new ones.
    // (debugfs takes commit times from the clock, not E2FSPROGS_FAKE_TIME.)
    std::thread::sleep(std::time::Duration::from_millis(1100));

    // Same size, same options: the new journal lies on the old one.
    let old_map = e2_ok("debugfs", &["-R", "bmap <8> 4", p(&target)]);
    let new_map = e2_ok("debugfs", &["-R", "bmap <8> 4", p(new)]);
    assert_eq!(old_map, new_map, "journal block 4 is at the same place");

    copy_data_regions(new, &target);
    assert_eq!(
        field(&target, "Filesystem UUID"),
        field(new, "Filesystem UUID")
    );
    let s1 = journal_sequence(&target);
    let before = block(&target, STALE_TARGET);
    assert!(before != [b'S'; 4096]);

    debugfs_script(
        &target,
        &format!("jo\njw -b {NEW_TARGET} {}\njc\n", p(&fresh)),
    );
    let log = e2_ok("debugfs", &["-R", "logdump", p(&target)]);
    assert!(
        log.contains(&format!(
            "Found expected sequence {s1}, type 2 (commit block) at block 3"
        )),
        "the new transaction: {log}"
    );
    // logdump checks sequence numbers only, not checksums.
    let in_sequence = log.contains(&format!(
        "Found expected sequence {}, type 1 (descriptor block) at block 4",
        s1.wrapping_add(1)
    ));
    assert!(field(&target, "Filesystem features").contains("needs_recovery"));

    let fsck = e2("e2fsck", &["-fy", p(&target)]);
    assert!(
        matches!(fsck.status.code(), Some(0 | 1)),
        "e2fsck -fy: {}",
        text(&fsck)
    );
    assert!(
        text(&fsck).contains("recovering journal"),
        "{}",
        text(&fsck)
    );
    assert!(
        block(&target, NEW_TARGET) == [b'N'; 4096],
        "the new transaction was not replayed: {}",
        text(&fsck)
    );
    let clean = e2("e2fsck", &["-fn", p(&target)]);
    assert_eq!(clean.status.code(), Some(0), "{}", text(&clean));
    let after = block(&target, STALE_TARGET);
    let replayed = after == [b'S'; 4096];
    assert!(
        replayed || after == before,
        "{STALE_TARGET} keeps the new filesystem's content"
    );
    Outcome {
        in_sequence,
        replayed,
    }
}

/// Checksums alone: the sequence defence is undone (the new journal starts
/// at 1 like the old mke2fs one), and the old journal is as checksummed as
/// the new one, so the stale transaction is well-formed and in sequence;
/// only the checksum seed (the UUID) differs.
#[test]
fn checksums_keep_a_stale_journal_out() {
    if !have_e2fsprogs() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.img");
    let new = dir.path().join("new.img");
    mke2fs_home_like(&old, "has_journal,metadata_csum");
    livestick_home(&new, None);
    set_journal_sequence(&new, 1).unwrap();
    assert_eq!(
        stale_transaction(dir.path(), &old, &new),
        Outcome {
            in_sequence: true,
            replayed: false
        }
    );
}

/// The same over an old journal without checksums (its tags are laid out
/// differently, which checksum v3 recovery rejects just the same).
#[test]
fn checksums_keep_an_unchecksummed_stale_journal_out() {
    if !have_e2fsprogs() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.img");
    let new = dir.path().join("new.img");
    mke2fs_home_like(&old, "has_journal,^metadata_csum");
    livestick_home(&new, None);
    set_journal_sequence(&new, 1).unwrap();
    assert!(!stale_transaction(dir.path(), &old, &new).replayed);
}

/// The random first sequence alone: old and new have the same UUID (as an
/// overlay reset that keeps it), so the checksums of the stale transaction
/// verify; it is out of sequence and ends the log.
#[test]
fn a_random_first_sequence_keeps_a_same_uuid_stale_journal_out() {
    if !have_e2fsprogs() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.img");
    let new = dir.path().join("new.img");
    let uuid = uuid::Uuid::new_v4();
    livestick_home(&old, Some(uuid));
    livestick_home(&new, Some(uuid));
    let (s_old, s_new) = (journal_sequence(&old), journal_sequence(&new));
    assert!(
        s_old != 1 && s_new != 1 && s_old != s_new,
        "{s_old} {s_new}"
    );
    assert_eq!(
        stale_transaction(dir.path(), &old, &new),
        Outcome {
            in_sequence: false,
            replayed: false
        }
    );
}

/// Control: with the same UUID and the same first sequence (the random start
/// undone), the stale transaction verifies and is replayed: the checksums do
/// not cover this case, and the test above can fail.
#[test]
fn same_uuid_and_sequence_replays_the_stale_journal() {
    if !have_e2fsprogs() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.img");
    let new = dir.path().join("new.img");
    let uuid = uuid::Uuid::new_v4();
    livestick_home(&old, Some(uuid));
    livestick_home(&new, Some(uuid));
    set_journal_sequence(&new, journal_sequence(&old)).unwrap();
    assert_eq!(
        stale_transaction(dir.path(), &old, &new),
        Outcome {
            in_sequence: true,
            replayed: true
        }
    );
}

/// Control: without `metadata_csum` and with mke2fs's first sequence (what
/// `make_ext4_image` would be without both defences), the stale block is
/// replayed, so the tests above can fail.
#[test]
fn without_either_defence_the_stale_journal_is_replayed() {
    if !have_e2fsprogs() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.img");
    let new = dir.path().join("new.img");
    mke2fs_home_like(&old, "has_journal,^metadata_csum");
    mke2fs_home_like(&new, "has_journal,^metadata_csum");
    assert_eq!(
        stale_transaction(dir.path(), &old, &new),
        Outcome {
            in_sequence: true,
            replayed: true
        }
    );
}

#[test]
fn set_journal_sequence_refuses_a_journal_in_use() {
    if !have_e2fsprogs() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    livestick_home(&img, None);
    let data = dir.path().join("data");
    std::fs::write(&data, [1u8; 4096]).unwrap();
    debugfs_script(&img, &format!("jo\njw -b 3000 {}\njc\n", p(&data)));
    assert!(matches!(
        set_journal_sequence(&img, 7),
        Err(Ext4Error::Journal { .. })
    ));
}

/// The journal superblock (1024 bytes) of the ext4 image at `path`, found the
/// way e2fsprogs finds it.
fn journal_superblock(path: &Path, block_size: u64) -> Vec<u8> {
    let block: u64 = e2_ok("debugfs", &["-R", "bmap <8> 0", p(path)])
        .trim()
        .parse()
        .unwrap();
    let mut sb = vec![0u8; 1024];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut sb, block * block_size)
        .unwrap();
    sb
}

/// livestick turns the journal's checksums on itself, as debugfs's
/// `journal_open -c` would: the same journal superblock, byte for byte, from
/// mke2fs with the same UUID, then debugfs, then the same first sequence.
#[test]
fn the_journal_is_checksummed_exactly_as_debugfs_does_it() {
    if !have_e2fsprogs() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (block_size, features, size) in [
        (4096u64, "64bit", SIZE),
        (4096, "^64bit", SIZE),
        (1024, "64bit", SIZE),
        (1024, "^64bit", 256 * MIB),
    ] {
        let uuid = uuid::Uuid::new_v4();
        let ours = dir.path().join("ours.img");
        let theirs = dir.path().join("theirs.img");
        let opts = Ext4Options {
            block_size: Some(block_size as u32),
            reserved_percent: Some(0),
            uuid: Some(uuid),
            features: vec![features.into()],
            ..Ext4Options::default()
        };
        make_ext4_image(&ours, size, "HOME", &opts).unwrap();
        let uuid = uuid.hyphenated().to_string();
        let block_size_text = block_size.to_string();
        let features = format!("has_journal,metadata_csum,{features}");
        mke2fs_lazy(
            &theirs,
            size,
            &[
                "-L",
                "HOME",
                "-O",
                &features,
                "-U",
                &uuid,
                "-b",
                &block_size_text,
                "-m",
                "0",
            ],
        );
        debugfs_script(&theirs, "journal_open -c\njournal_close\n");
        set_journal_sequence(&theirs, journal_sequence(&ours)).unwrap();
        let case = format!("{block_size} {features}");
        assert!(
            field(&ours, "Journal features").contains("journal_checksum_v3"),
            "{case}"
        );
        assert_eq!(
            journal_superblock(&ours, block_size),
            journal_superblock(&theirs, block_size),
            "{case}"
        );
        let fsck = e2("e2fsck", &["-fn", p(&ours)]);
        assert!(fsck.status.success(), "{case}: {}", text(&fsck));
    }
}

/// A journal of 256 MiB in 1 KiB blocks takes more extents than its inode holds:
/// its superblock is found through an extent index block.
#[test]
fn a_journal_behind_an_extent_index_block_is_found() {
    if !have_e2fsprogs() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("deep.img");
    mke2fs_lazy(
        &img,
        2 * GIB,
        &[
            "-b",
            "1024",
            "-J",
            "size=256",
            "-O",
            "has_journal,metadata_csum",
        ],
    );
    // The superblock's copy of the journal inode's extent root: depth 1.
    let mut root = [0u8; 12];
    File::open(&img)
        .unwrap()
        .read_exact_at(&mut root, 1024 + 0x10C)
        .unwrap();
    assert_eq!(u16::from_le_bytes([root[6], root[7]]), 1, "{root:?}");
    set_journal_sequence(&img, 0x1234_5678).unwrap();
    assert_eq!(field(&img, "Journal sequence"), "0x12345678");
    let fsck = e2("e2fsck", &["-fn", p(&img)]);
    assert!(fsck.status.success(), "{}", text(&fsck));
}
