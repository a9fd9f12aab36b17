//! Faults on the bus (issue 13, part 7): livestick runs inside the harness VM of
//! `benches/vm/` (Debian's kernel, QEMU TCG) while the stick fails under it, and
//! afterwards the image is judged with independent tools (sfdisk, fsck.fat, mtools,
//! e2fsck) and, where the old system must still boot, with one boot through the
//! boot harness.
//!
//! - write errors: QEMU's `blkdebug` fails every write that touches one sector. It
//!   has no request counter, so the sector is chosen where the step under test
//!   writes: the same command is first run on the host on a copy, and the file it
//!   wrote is found there with `mshowfat` (cluster allocation is deterministic, so
//!   the VM's run writes the same clusters);
//! - unplug: a `usb-storage` stick is pulled with QMP `device_del` while livestick
//!   writes to it.
//!
//! In every case livestick must exit 4 (I/O) and name what it was doing. What each
//! test proves, and what none can, is in docs/reliability.md.
//!
//! Each VM boots in ~20 s under TCG; the merge case adds two boots of the stick; the
//! four tests take 2–5 minutes on 2 cores.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::boot::harness::{Firmware, boot_env_ready};
use crate::boot::scenarios::{
    CLASSIC, Stick, assert_persisted, boot, write_stick, write_stick_with,
};
use crate::support::fixtures::boot_iso;
use crate::support::vm::{
    Disk, VmRun, qmp, run_vm, vm_env_ready, wait_for_console, write_error_rules,
};
use crate::support::{
    debugfs_w, e2fsck_clean, fat_copy_out, fat_put, fsck_fat, livestick, luks_decrypt_to, ok,
    part_start, run,
};

/// Exit status of an I/O failure (docs/exit-codes.md).
const EXIT_IO: i32 = 4;
/// Size of the sticks the VM writes from scratch: small, so TCG stays quick.
const SMALL_STICK: u64 = 512 << 20;
/// Persistence of the sticks in these tests, as `write_stick` makes them.
const PERSIST: [&str; 5] = [
    "--overlay-size-mb",
    "64",
    "--home-size-mb",
    "32",
    "--unencrypted-home",
];

fn ready() -> bool {
    vm_env_ready() && boot_env_ready(&[Firmware::Bios])
}

fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("a scratch directory")
}

/// A stick that held something else: random bytes in its first 8 MiB and a
/// valid MBR with one Linux partition, so "the failed write left no partition
/// table" cannot pass by accident.
fn used_small_stick(path: &Path) {
    use std::io::Write;
    let mut head = vec![0u8; 8 << 20];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut head);
    let mut f = std::fs::File::create(path).expect("create the stick image");
    f.write_all(&head).expect("stale bytes");
    f.set_len(SMALL_STICK).expect("size the stick");
    drop(f);
    let mut sfdisk = Command::new("sfdisk")
        .args(["--quiet", "--label", "dos"])
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("run sfdisk");
    sfdisk
        .stdin
        .take()
        .expect("sfdisk's stdin")
        .write_all(b"2048,,83\n")
        .expect("feed sfdisk");
    assert!(sfdisk.wait().expect("sfdisk").success(), "sfdisk failed");
}

/// The FAT partition's geometry: (partition offset, first data byte, cluster size).
fn fat_geometry(image: &Path) -> (u64, u64, u64) {
    let part = part_start(image);
    let bs = crate::support::read_at(image, part, 512);
    let le16 = |at: usize| u64::from(u16::from_le_bytes([bs[at], bs[at + 1]]));
    let le32 = |at: usize| {
        u64::from(u32::from_le_bytes([
            bs[at],
            bs[at + 1],
            bs[at + 2],
            bs[at + 3],
        ]))
    };
    let sector = le16(11);
    let per_cluster = u64::from(bs[13]);
    let reserved = le16(14);
    let fats = u64::from(bs[16]);
    let fat_sectors = le32(36);
    (
        part,
        part + (reserved + fats * fat_sectors) * sector,
        per_cluster * sector,
    )
}

/// The disk sector (512 bytes, whole image) that holds byte `within` of the
/// file's first cluster run, from `mshowfat` (mtools, not livestick's FAT code).
fn sector_of(image: &Path, path: &str, within: u64) -> u64 {
    let (part, data, cluster) = fat_geometry(image);
    let out = String::from_utf8_lossy(
        &crate::support::checked(
            Command::new("mshowfat")
                .env("MTOOLS_SKIP_CHECK", "1")
                .arg("-i")
                .arg(format!("{}@@{part}", image.display()))
                .arg(format!("::{path}")),
        )
        .stdout,
    )
    .into_owned();
    // "::/LiveOS/squashfs.img <1234-5678><…>"
    let first = out
        .split('<')
        .nth(1)
        .and_then(|r| r.split(['-', '>']).next())
        .and_then(|c| c.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("mshowfat {path}: no cluster in {out:?}"));
    (data + (first - 2) * cluster + within) / 512
}

/// A sparse copy of a stick, for a dry run of the command on the host.
fn copy_of(image: &Path, dir: &Path) -> PathBuf {
    let copy = dir.join("probe.img");
    run(
        "cp",
        &[
            "--sparse=always",
            &image.display().to_string(),
            &copy.display().to_string(),
        ],
    );
    copy
}

/// livestick in the VM exited 4 and said what it was doing; the fault was hit.
/// A write error reaches livestick at the next sync, often during a later step;
/// `write` names the step that wrote the failing range all the same (the batch is
/// read back after the failed sync: the lost write holds old bytes), see
/// docs/reliability.md.
fn assert_failed_at(run: &VmRun, step_words: &[&str]) {
    let stderr = run.stderr();
    assert_eq!(
        run.status,
        Some(EXIT_IO),
        "livestick in the VM: expected exit {EXIT_IO}; stderr:\n{stderr}\nconsole {}:\n{}",
        run.log.display(),
        run.tail(40)
    );
    for w in step_words {
        assert!(
            stderr.contains(w),
            "livestick's error does not name the failing step ({w:?}):\n{stderr}"
        );
    }
    assert!(
        run.console.contains("I/O error") || run.console.contains("Input/output error"),
        "no I/O error on the console: the fault was never hit\n{}",
        run.tail(40)
    );
}

/// As [`assert_failed_at`], for a stick pulled out: the kernel may log an I/O
/// error, or, when the device is gone before the next write reaches it (its
/// capacity is then 0), the write fails with "No space left on device" and no
/// I/O error is logged. Either shows the unplug was hit mid-write.
fn assert_unplugged_at(run: &VmRun, step_words: &[&str]) {
    let stderr = run.stderr();
    let gone = stderr.contains("No space left on device") || stderr.contains("No such device");
    if !gone {
        return assert_failed_at(run, step_words);
    }
    assert_eq!(
        run.status,
        Some(EXIT_IO),
        "livestick in the VM: expected exit {EXIT_IO}; stderr:\n{stderr}"
    );
    for w in step_words {
        assert!(
            stderr.contains(w),
            "livestick's error does not name the failing step ({w:?}):\n{stderr}"
        );
    }
}

/// Nothing a firmware boots from: no MBR boot signature or no partition in it,
/// and no GPT header at either end.
fn assert_boots_nothing(image: &Path) {
    let mbr = crate::support::read_at(image, 0, 512);
    let signed = mbr[510..512] == [0x55, 0xaa];
    let any_partition = mbr[446..510].chunks(16).any(|e| e[4] != 0);
    assert!(
        !(signed && any_partition),
        "the interrupted write left a partition table: {}",
        String::from_utf8_lossy(
            &Command::new("sfdisk")
                .arg("-d")
                .arg(image)
                .output()
                .expect("sfdisk")
                .stdout
        )
    );
    let len = std::fs::metadata(image).expect("stat the stick").len();
    for at in [512, len - 512] {
        assert_ne!(
            &crate::support::read_at(image, at, 8)[..],
            b"EFI PART",
            "a GPT header at byte {at}"
        );
    }
}

/// `write` of a fresh stick fails inside LiveOS/squashfs.img: livestick exits 4
/// naming the step, and the stick holds no partition table (the old one was wiped
/// first, the new one is written last), so it boots nothing rather than half a
/// system.
#[test]
fn write_error_in_squashfs_img_leaves_a_stick_that_boots_nothing() {
    if !ready() {
        return;
    }
    let iso = boot_iso("boot-classic.iso");
    let dir = scratch();
    let probe = crate::support::sparse(dir.path(), "probe.img", SMALL_STICK);
    let mut args = vec!["write", iso.to_str().unwrap(), probe.to_str().unwrap()];
    args.extend(["--format", "--timeout", "1", "--yes", "--quiet"]);
    args.extend(PERSIST);
    ok(&livestick(&args));
    // 1 MiB into the root image: its copy is well under way there.
    let sector = sector_of(&probe, "LiveOS/squashfs.img", 1 << 20);
    std::fs::remove_file(&probe).ok();

    let stick = dir.path().join("stick.img");
    used_small_stick(&stick);
    let rules = write_error_rules(dir.path(), &[sector]);
    let mut ls = vec![
        "write",
        "@iso",
        "@stick",
        "--format",
        "--timeout",
        "1",
        "--yes",
        "--force",
    ];
    ls.extend(PERSIST);
    let vm = run_vm(
        "write-error",
        &ls,
        &[
            Disk::Virtio {
                id: "iso",
                file: &iso,
                opts: "readonly=on,cache=writeback",
            },
            Disk::Faulty {
                id: "stick",
                file: &stick,
                rules: &rules,
            },
        ],
        Duration::from_secs(600),
        None,
    );
    assert_failed_at(
        &vm,
        &[
            "will not boot",
            "caused by: writing /LiveOS/squashfs.img: ",
            // Whole blocks go to a stick past the page cache: the stick refuses the
            // write itself, not a later sync.
            "reported by the writer",
        ],
    );
    assert_boots_nothing(&stick);
}

/// `overlay merge` fails while it stages the new squashfs.img: exit 4 naming the
/// step; the FAT is still consistent enough for fsck.fat, and the stick boots the
/// old system with the overlay the first boot wrote.
#[test]
fn merge_error_while_staging_keeps_the_old_system_and_overlay() {
    if !ready() {
        return;
    }
    let iso = boot_iso("boot-classic.iso");
    let stick = write_stick(&iso, &[]);
    assert_persisted(&boot(&stick, Firmware::Bios, "faults-merge-1"), CLASSIC, 0);

    let dir = scratch();
    let probe = copy_of(&stick.image, dir.path());
    ok(&livestick(&[
        "overlay",
        "merge",
        probe.to_str().unwrap(),
        "--yes",
        "--quiet",
        "--workdir",
        dir.path().to_str().unwrap(),
    ]));
    // The merged image now carries the name; its first cluster is the first the
    // staging wrote.
    let sector = sector_of(&probe, "LiveOS/squashfs.img", 4096);
    std::fs::remove_file(&probe).ok();

    let rules = write_error_rules(dir.path(), &[sector]);
    let vm = run_vm(
        "merge-error",
        &["overlay", "merge", "@stick", "--yes", "--workdir", "/tmp"],
        &[Disk::Faulty {
            id: "stick",
            file: &stick.image,
            rules: &rules,
        }],
        Duration::from_secs(600),
        None,
    );
    assert_failed_at(&vm, &["squashfs.img"]);
    check_fat_but_dirty_bit(&stick, dir.path());
    assert_persisted(&boot(&stick, Firmware::Bios, "faults-merge-2"), CLASSIC, 1);
}

/// `home resize` fails while it writes the new home.img: exit 4 naming the step;
/// home.img is the old one, e2fsck finds it clean and a known file reads back.
#[test]
fn home_resize_error_leaves_home_img_intact() {
    if !ready() {
        return;
    }
    let iso = boot_iso("boot-classic.iso");
    let stick = write_stick(&iso, &[]);
    let dir = scratch();
    let part = part_start(&stick.image);
    let home = dir.path().join("home.img");
    fat_copy_out(&stick.image, part, "LiveOS/home.img", &home);
    let known = dir.path().join("known.txt");
    let content = "what the user has, never lost\n".repeat(200);
    std::fs::write(&known, &content).expect("write the known file");
    debugfs_w(&home, &format!("write {} known.txt\n", known.display()));
    fat_put(&stick.image, part, &home, "LiveOS/home.img");
    let home_len = std::fs::metadata(&home).expect("stat home.img").len();

    let probe = copy_of(&stick.image, dir.path());
    ok(&livestick(&[
        "home",
        "resize",
        probe.to_str().unwrap(),
        "--size-mb",
        "64",
        "--yes",
        "--quiet",
        "--workdir",
        dir.path().to_str().unwrap(),
    ]));
    // The new home.img's superblock (byte 1024): written by any resize.
    let sector = sector_of(&probe, "LiveOS/home.img", 1024);
    std::fs::remove_file(&probe).ok();

    let rules = write_error_rules(dir.path(), &[sector]);
    let vm = run_vm(
        "resize-error",
        &[
            "home",
            "resize",
            "@stick",
            "--size-mb",
            "64",
            "--yes",
            "--workdir",
            "/tmp",
        ],
        &[Disk::Faulty {
            id: "stick",
            file: &stick.image,
            rules: &rules,
        }],
        Duration::from_secs(600),
        None,
    );
    assert_failed_at(&vm, &["home.img"]);
    check_fat(&stick, dir.path());
    let after = dir.path().join("home-after.img");
    fat_copy_out(&stick.image, part, "LiveOS/home.img", &after);
    assert_eq!(
        std::fs::metadata(&after).expect("stat home.img").len(),
        home_len,
        "home.img changed size although the resize failed"
    );
    e2fsck_clean(&after);
    let read = run("debugfs", &["-R", "cat known.txt", after.to_str().unwrap()]);
    assert_eq!(read, content, "the known file in home.img changed");
}

/// The stick is pulled out (QMP `device_del` of its usb-storage device) while
/// `write` copies the ISO to it: livestick exits 4 naming the step.
#[test]
fn unplugged_stick_mid_write_exits_4_naming_the_step() {
    if !ready() {
        return;
    }
    let iso = boot_iso("boot-classic.iso");
    let dir = scratch();
    let stick = dir.path().join("stick.img");
    used_small_stick(&stick);
    let mut ls = vec![
        "--json",
        "write",
        "@iso",
        "@usb",
        "--format",
        "--timeout",
        "1",
        "--yes",
        "--force",
    ];
    ls.extend(PERSIST);
    let unplug = |log: &Path, socket: &Path| {
        wait_for_console(log, "FAULT-START", Duration::from_secs(300));
        // The write phase has begun (tables wiped, files on their way); a few
        // seconds into it, at ~4 MB/s, the copy is in the middle.
        wait_for_console(log, r#""phase":"write""#, Duration::from_secs(300));
        std::thread::sleep(Duration::from_secs(3));
        let reply = qmp(
            socket,
            r#"{"execute": "device_del", "arguments": {"id": "stick"}}"#,
        );
        assert!(reply.contains("\"return\""), "device_del: {reply}");
    };
    let vm = run_vm(
        "unplug",
        &ls,
        &[
            Disk::Virtio {
                id: "iso",
                file: &iso,
                opts: "readonly=on,cache=writeback",
            },
            // ~4 MB/s: the copy lasts long enough to be caught in the middle.
            Disk::Usb {
                id: "stick",
                file: &stick,
                opts: "throttling.bps-write=4000000",
            },
        ],
        Duration::from_secs(600),
        Some(&unplug),
    );
    assert_unplugged_at(&vm, &["will not boot", "caused by:"]);
    assert_boots_nothing(&stick);
}

/// The passphrase of the LUKS homes below, as a 512-byte file: the guest reads it
/// from a virtio disk of exactly that size (`--passphrase-file @key` takes a device's
/// bytes as they are), the host from the same file. No final newline.
fn luks_key(dir: &Path) -> (PathBuf, Vec<u8>) {
    let passphrase: Vec<u8> = b"what the user has, never lost; "
        .iter()
        .copied()
        .cycle()
        .take(512)
        .collect();
    let key = dir.join("key.img");
    std::fs::write(&key, &passphrase).expect("write the key");
    (key, passphrase)
}

/// A GPT stick with a LUKS home: cheap PBKDF2 so that TCG derives the key quickly.
fn gpt_luks_options(key: &Path) -> Vec<String> {
    [
        "--gpt",
        "--overlay-size-mb",
        "64",
        "--home-size-mb",
        "32",
        "--passphrase-file",
        &key.display().to_string(),
        "--luks-pbkdf",
        "pbkdf2",
        "--luks-iter-time",
        "10",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A GPT stick with a LUKS home, written from scratch in the VM, fails inside
/// squashfs.img: exit 4 naming the step, and no GPT header at either end nor a
/// protective MBR, so it boots nothing.
#[test]
fn write_error_on_a_gpt_stick_with_a_luks_home_leaves_a_stick_that_boots_nothing() {
    if !ready() {
        return;
    }
    let iso = boot_iso("boot-classic.iso");
    let dir = scratch();
    let (key, _) = luks_key(dir.path());
    let options = gpt_luks_options(&key);
    let probe = crate::support::sparse(dir.path(), "probe.img", SMALL_STICK);
    let mut args = vec!["write", iso.to_str().unwrap(), probe.to_str().unwrap()];
    args.extend(["--format", "--timeout", "1", "--yes", "--quiet"]);
    args.extend(options.iter().map(String::as_str));
    ok(&livestick(&args));
    assert_eq!(
        crate::support::sfdisk(&probe)["partitiontable"]["label"],
        "gpt",
        "the probe stick is GPT"
    );
    let sector = sector_of(&probe, "LiveOS/squashfs.img", 1 << 20);
    std::fs::remove_file(&probe).ok();

    let stick = dir.path().join("stick.img");
    used_small_stick(&stick);
    let rules = write_error_rules(dir.path(), &[sector]);
    let mut ls = vec![
        "write",
        "@iso",
        "@stick",
        "--format",
        "--timeout",
        "1",
        "--yes",
        "--force",
    ];
    // The same options, with the key read from its disk in the guest.
    let guest_options: Vec<&str> = options
        .iter()
        .map(|o| {
            if *o == key.display().to_string() {
                "@key"
            } else {
                o.as_str()
            }
        })
        .collect();
    ls.extend(guest_options);
    let vm = run_vm(
        "write-error-gpt-luks",
        &ls,
        &[
            Disk::Virtio {
                id: "iso",
                file: &iso,
                opts: "readonly=on,cache=writeback",
            },
            Disk::Virtio {
                id: "key",
                file: &key,
                opts: "readonly=on",
            },
            Disk::Faulty {
                id: "stick",
                file: &stick,
                rules: &rules,
            },
        ],
        Duration::from_secs(600),
        None,
    );
    assert_failed_at(&vm, &["will not boot", "caused by:"]);
    assert_boots_nothing(&stick);
}

/// `home resize` of the LUKS home of a GPT stick fails while it writes the grown
/// copy: exit 4 naming the step; home.img is byte for byte the old one, its
/// passphrase still opens it (cryptsetup), and the ext4 inside checks clean.
#[test]
fn home_resize_error_leaves_a_luks_home_on_a_gpt_stick_intact() {
    if !ready() || !crate::support::require(crate::support::have("cryptsetup"), "cryptsetup") {
        return;
    }
    let iso = boot_iso("boot-classic.iso");
    let dir = scratch();
    let (key, passphrase) = luks_key(dir.path());
    let options = gpt_luks_options(&key);
    let stick = write_stick_with(
        &iso,
        &options.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_eq!(
        crate::support::sfdisk(&stick.image)["partitiontable"]["label"],
        "gpt",
        "the stick is GPT"
    );
    let part = part_start(&stick.image);
    let home_before = dir.path().join("home-before.img");
    fat_copy_out(&stick.image, part, "LiveOS/home.img", &home_before);

    let probe = copy_of(&stick.image, dir.path());
    ok(&livestick(&[
        "home",
        "resize",
        probe.to_str().unwrap(),
        "--size-mb",
        "64",
        "--passphrase-file",
        key.to_str().unwrap(),
        "--yes",
        "--quiet",
        "--workdir",
        dir.path().to_str().unwrap(),
    ]));
    // The grown copy's LUKS header: the first thing a resize writes of it.
    let sector = sector_of(&probe, "LiveOS/home.img", 0);
    std::fs::remove_file(&probe).ok();

    let rules = write_error_rules(dir.path(), &[sector]);
    let vm = run_vm(
        "resize-error-gpt-luks",
        &[
            "home",
            "resize",
            "@stick",
            "--size-mb",
            "64",
            "--passphrase-file",
            "@key",
            "--yes",
            "--workdir",
            "/tmp",
        ],
        &[
            Disk::Virtio {
                id: "key",
                file: &key,
                opts: "readonly=on",
            },
            Disk::Faulty {
                id: "stick",
                file: &stick.image,
                rules: &rules,
            },
        ],
        Duration::from_secs(600),
        None,
    );
    assert_failed_at(&vm, &["home.img"]);
    check_fat(&stick, dir.path());
    let after = dir.path().join("home-after.img");
    fat_copy_out(&stick.image, part, "LiveOS/home.img", &after);
    assert!(
        std::fs::read(&after).expect("read home.img") == std::fs::read(&home_before).expect("read"),
        "home.img changed although the resize failed"
    );
    let opens = Command::new("cryptsetup")
        .args(["open", "--disable-locks", "--test-passphrase", "--key-file"])
        .arg(&key)
        .arg(&after)
        .status()
        .expect("run cryptsetup");
    assert!(opens.success(), "cryptsetup no longer opens home.img");
    let plain = dir.path().join("home-plain.ext4");
    luks_decrypt_to(&after, &plain, &passphrase);
    e2fsck_clean(&plain);
}

/// `fsck.fat -n` on the stick's FAT partition.
fn check_fat(stick: &Stick, scratch: &Path) {
    let part = part_start(&stick.image);
    let len = std::fs::metadata(&stick.image).expect("stat").len() - part;
    fsck_fat(&stick.image, part, len, scratch);
}

/// `fsck.fat -n` finds nothing but the dirty bit a step stopped by an error leaves
/// set (byte 65 of the boot sector, hence its "difference" from the backup): no
/// lost clusters, no cross-links, no bad chains. The dirty bit is issue 13's
/// "interrupted merges leave FAT damage", which the replacement work repairs.
fn check_fat_but_dirty_bit(stick: &Stick, scratch: &Path) {
    let part = part_start(&stick.image);
    let fat = scratch.join("partition.fat");
    run(
        "dd",
        &[
            &format!("if={}", stick.image.display()),
            &format!("of={}", fat.display()),
            "bs=1M",
            &format!("skip={}", part >> 20),
            "status=none",
        ],
    );
    let out = crate::support::output_of(Command::new("fsck.fat").arg("-n").arg(&fat));
    std::fs::remove_file(&fat).ok();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let known = [
        "fsck.fat ",
        "There are differences between boot sector and its backup.",
        "This is mostly harmless. Differences: (offset:original/backup)",
        "65:01/00",
        "Not automatically fixing this.",
        "Dirty bit is set. Fs was not properly unmounted and some data may be corrupt.",
        "Automatically removing dirty bit.",
        "Leaving filesystem unchanged.",
    ];
    let problems: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.contains(" files, ") && !known.iter().any(|k| l.starts_with(k))
        })
        .collect();
    assert!(
        problems.is_empty() && out.status.code().is_some_and(|c| c <= 1),
        "fsck.fat -n finds more than the dirty bit: {problems:?}\n{text}"
    );
}

/// On the host, no VM: `LIVESTICK_FAILPOINT=write-error` fails every write that
/// touches one device byte and reports it at the next sync, as blkdebug makes the
/// stick do (on an image file, at the end of its read-back batch). The byte is in the
/// last cluster of LiveOS/squashfs.img, so the failure surfaces only once later steps
/// write; the error must still name the step that wrote there, and say it was found
/// when syncing. Before, it named whatever step was running when the sync found it.
#[test]
fn a_write_error_found_at_a_later_sync_names_the_step_that_wrote_there() {
    if !crate::support::require(
        crate::support::have("mshowfat") && crate::support::have("mcopy"),
        "mtools",
    ) {
        return;
    }
    let iso = crate::support::fixtures::synthetic_iso("fedora-classic.iso");
    let dir = scratch();
    let write = |image: &Path| -> Command {
        let mut cmd = Command::new(crate::support::bin());
        cmd.args(["write", iso.to_str().unwrap(), image.to_str().unwrap()])
            .args(["--format", "--overlay-size-mb", "32", "--yes", "--quiet"]);
        cmd
    };
    // The same write on a copy first: allocation is deterministic, so the failing
    // write's byte is found where this run put the root image.
    let probe = crate::support::sparse(dir.path(), "probe.img", 256 << 20);
    ok(&write(&probe).output().expect("livestick runs"));
    let part = part_start(&probe);
    let root = dir.path().join("squashfs.img");
    fat_copy_out(&probe, part, "LiveOS/squashfs.img", &root);
    let size = std::fs::metadata(&root).expect("stat squashfs.img").len();
    let at = sector_of(&probe, "LiveOS/squashfs.img", size - 1) * 512;

    let stick = crate::support::sparse(dir.path(), "stick.img", 256 << 20);
    let out = write(&stick)
        .env("LIVESTICK_FAILPOINT", "write-error")
        .env("LIVESTICK_FAILPOINT_OFFSET", at.to_string())
        .output()
        .expect("livestick runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(EXIT_IO), "{stderr}");
    assert!(
        stderr.contains("writing /LiveOS/squashfs.img: Input/output error"),
        "the error does not name the step that wrote the failing range:\n{stderr}"
    );
    // The sync alone cannot tell which write of its batch failed; the read-back of
    // the batch after it does (the lost write left the old bytes there).
    assert!(!stderr.contains("one of these"), "{stderr}");
    assert!(stderr.contains("found when syncing"), "{stderr}");
    assert_boots_nothing(&stick);
}
