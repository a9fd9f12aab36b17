//! The safety rules before a write to a block device, on loop devices and on
//! this machine's own system disk (probed and checked, never written).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::loop_device as loop_over;
use crate::support::*;
use livestick::disk::devices::{DevNum, Host};
use livestick::disk::target::{self, TargetError, TargetKind};

const MIB: u64 = 1 << 20;

fn refusal(path: &str, force: bool) -> TargetError {
    let probe = target::probe(Path::new(path)).unwrap();
    assert_eq!(probe.kind, TargetKind::BlockDevice);
    match target::check_safe(&probe, force) {
        Ok(()) => panic!("{path} was accepted: {probe:#?}"),
        Err(e) => e,
    }
}

struct Unmount(PathBuf);
impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

struct SwapOff(String);
impl Drop for SwapOff {
    fn drop(&mut self) {
        let _ = Command::new("swapoff").arg(&self.0).status();
    }
}

/// A loop device over `image`, made swap and swapped on (off again when the guard
/// drops); `None` where loop devices or swapon are not to be had here.
fn swap_on_a_loop_over(image: &Path) -> Option<(Loop, SwapOff)> {
    let dev = loop_over(&[], image)?;
    run("mkswap", &["-q", &dev.0]);
    let on = Command::new("swapon")
        .arg(&dev.0)
        .status()
        .is_ok_and(|s| s.success());
    if !on {
        // Containers often forbid swapon; the rule is unit-tested over fixtures.
        eprintln!("SKIPPED: swapon is not permitted here");
        return None;
    }
    let off = SwapOff(dev.0.clone());
    Some((dev, off))
}

#[test]
fn a_loop_device_passes_with_force_only_and_the_question_names_it() {
    if !require(is_root(), "root (loop devices)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = sparse(dir.path(), "plain.img", 64 * MIB);
    let Some(dev) = loop_over(&[], &image) else {
        return;
    };
    let probe = target::probe(Path::new(&dev.0)).unwrap();
    assert_eq!(probe.size, 64 * MIB);
    assert_eq!(probe.logical_sector_size, 512);
    assert!(!probe.read_only && probe.busy.is_empty() && probe.system.is_empty());
    let err = target::check_safe(&probe, false).unwrap_err();
    assert!(matches!(err, TargetError::NotRemovable(_)), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    target::check_safe(&probe, true).unwrap();
    let question = target::confirm_text(&probe);
    assert!(question.contains(&dev.0), "{question}");
    assert!(question.contains("64 MiB"), "{question}");
    assert!(question.contains("serial unknown"), "{question}");
    assert!(question.contains("NOT removable"), "{question}");
}

#[test]
fn a_mounted_loop_device_is_refused_with_the_mount_line() {
    if !require(is_root(), "root (loop devices, mount)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = sparse(dir.path(), "ext4.img", 64 * MIB);
    run(
        "mke2fs",
        &["-q", "-t", "ext4", "-F", image.to_str().unwrap()],
    );
    let Some(dev) = loop_over(&[], &image) else {
        return;
    };
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-o", "ro,noload"])
        .arg(&dev.0)
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !require(mounted, "mounting an ext4 loop device") {
        return;
    }
    let _unmount = Unmount(mnt.clone());
    let err = refusal(&dev.0, true);
    let TargetError::Busy { findings, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!(
        findings,
        &vec![format!("{} is mounted on {}", dev.0, mnt.display())]
    );
    let text = err.to_string();
    assert!(text.contains("is in use"), "{text}");
    // The whole message: what is wrong on the first line, each finding on its own.
    assert_eq!(text.lines().count(), 2, "{text}");
}

#[test]
fn a_loop_device_used_as_swap_is_refused() {
    if !require(is_root(), "root (loop devices, swapon)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = sparse(dir.path(), "swap.img", 64 * MIB);
    let Some((dev, _off)) = swap_on_a_loop_over(&image) else {
        return;
    };
    let err = refusal(&dev.0, true);
    assert!(
        matches!(&err, TargetError::Busy { findings, .. } if findings == &vec![format!("{} is used as swap", dev.0)]),
        "{err}"
    );
}

#[test]
fn a_loop_device_backing_another_loop_device_is_refused() {
    if !require(is_root(), "root (loop devices)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = sparse(dir.path(), "lower.img", 64 * MIB);
    let Some(lower) = loop_over(&[], &image) else {
        return;
    };
    let Some(upper) = loop_over(&[], Path::new(&lower.0)) else {
        return;
    };
    let err = refusal(&lower.0, true);
    let TargetError::Busy { findings, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!(
        findings,
        &vec![format!(
            "{} is the backing device of loop device {}",
            lower.0, upper.0
        )]
    );
    drop(upper);
    // Released: accepted again.
    let probe = target::probe(Path::new(&lower.0)).unwrap();
    target::check_safe(&probe, true).unwrap();
}

#[test]
fn read_only_4kn_and_too_small_devices_are_refused_before_any_write() {
    if !require(is_root(), "root (loop devices)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = sparse(dir.path(), "ro.img", 64 * MIB);
    let before = sha256_file(&image);
    let Some(ro) = loop_over(&["-r"], &image) else {
        return;
    };
    let err = refusal(&ro.0, true);
    assert!(matches!(err, TargetError::ReadOnly(_)), "{err}");
    assert!(err.to_string().contains("unlock"), "{err}");
    drop(ro);

    let Some(kn) = loop_over(&["--sector-size", "4096"], &image) else {
        return;
    };
    let probe = target::probe(Path::new(&kn.0)).unwrap();
    assert_eq!(probe.logical_sector_size, 4096);
    let err = target::check_safe(&probe, true).unwrap_err();
    assert!(
        matches!(err, TargetError::SectorSize { logical: 4096, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("512-byte logical sectors only"),
        "{err}"
    );
    drop(kn);

    let small = sparse(dir.path(), "small.img", 16 * MIB);
    let Some(tiny) = loop_over(&[], &small) else {
        return;
    };
    let err = refusal(&tiny.0, true);
    assert!(matches!(err, TargetError::TooSmall { .. }), "{err}");
    assert!(err.to_string().contains("16 MiB"), "{err}");
    drop(tiny);
    assert_eq!(sha256_file(&image), before);
}

#[test]
fn links_to_devices_are_canonicalised() {
    if !require(is_root(), "root (loop devices)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = sparse(dir.path(), "linked.img", 64 * MIB);
    let Some(dev) = loop_over(&[], &image) else {
        return;
    };
    let link = dir.path().join("my-stick");
    std::os::unix::fs::symlink(&dev.0, &link).unwrap();
    let probe = target::probe(&link).unwrap();
    assert_eq!(probe.kind, TargetKind::BlockDevice);
    assert_eq!(probe.path, PathBuf::from(&dev.0));

    // The same for whatever /dev/disk/by-* links this machine has (udev makes them).
    let mut checked = 0;
    for kind in ["by-id", "by-path", "by-uuid", "by-label", "by-diskseq"] {
        let Ok(entries) = std::fs::read_dir(Path::new("/dev/disk").join(kind)) else {
            continue;
        };
        for entry in entries.flatten().take(3) {
            let Ok(real) = std::fs::canonicalize(entry.path()) else {
                continue;
            };
            if let Ok(probe) = target::probe(&entry.path()) {
                assert_eq!(probe.path, real, "{}", entry.path().display());
                checked += 1;
            }
        }
    }
    if checked == 0 {
        eprintln!("note: no /dev/disk/by-* links here (no udev); checked a private link only");
    }
}

#[test]
fn nothing_is_created_under_dev() {
    let dir = tempfile::tempdir().unwrap();
    let missing = "/dev/livestick-test-no-such-device";
    assert!(matches!(
        target::probe(Path::new(missing)),
        Err(TargetError::MissingDevice(_))
    ));
    // A dangling link into /dev is not an image file to create either.
    let link = dir.path().join("stick");
    std::os::unix::fs::symlink(missing, &link).unwrap();
    let err = target::probe(&link).unwrap_err();
    assert!(matches!(err, TargetError::MissingDevice(_)), "{err}");
    assert!(err.to_string().contains("livestick devices"), "{err}");
    // Nor a path whose directory is /dev by another name.
    let dev_alias = dir.path().join("devdir");
    std::os::unix::fs::symlink("/dev", &dev_alias).unwrap();
    assert!(matches!(
        target::probe(&dev_alias.join("livestick-test-new")),
        Err(TargetError::MissingDevice(_))
    ));
    // The CLI refuses the same way and creates nothing.
    let iso = synthetic_iso("fedora-classic.iso");
    let out = livestick(&[
        "write",
        iso.to_str().unwrap(),
        link.to_str().unwrap(),
        "--size",
        "1G",
        "--yes",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not exist"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!Path::new(missing).exists());
    assert!(!Path::new("/dev/livestick-test-new").exists());
}

/// The device node of a device number, from sysfs (never created).
fn node_of(dev: DevNum) -> Option<PathBuf> {
    let uevent = std::fs::read_to_string(format!("/sys/dev/block/{dev}/uevent")).ok()?;
    let name = uevent.lines().find_map(|l| l.strip_prefix("DEVNAME="))?;
    let path = PathBuf::from("/dev").join(name);
    path.exists().then_some(path)
}

#[test]
fn the_disk_holding_root_is_refused_even_with_force() {
    let host = Host::live();
    let root: Vec<_> = host
        .system_disks()
        .into_iter()
        .filter(|u| u.mount_point == "/")
        .collect();
    let Some(path) = root.iter().find_map(|u| node_of(u.dev)) else {
        // Containers with an overlay root have no block device behind `/`.
        eprintln!("SKIPPED: `/` is not on a block device with a node here: {root:?}");
        return;
    };
    if !require(is_root(), "root (to open the system disk read-only)") {
        return;
    }
    // Probe and check only: nothing is opened for writing.
    let probe = target::probe(&path).unwrap();
    assert!(
        probe.system.iter().any(|s| s.starts_with("/ is on")),
        "{probe:#?}"
    );
    let err = target::check_safe(&probe, true).unwrap_err();
    assert!(matches!(err, TargetError::SystemDisk { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("even with --force"), "{text}");
    assert!(text.contains("/ is on"), "{text}");
    // `devices --all` marks it.
    let listing = livestick::disk::devices::list(&host, true).unwrap();
    let disk = listing
        .devices
        .iter()
        .find(|d| d.facts.path == path || Some(&path) == d.facts.partition_of.as_ref());
    if let Some(disk) = disk {
        assert!(disk.system.contains(&"/".to_string()), "{disk:#?}");
        assert!(disk.fixed || disk.facts.removable_class());
    }
}

/// `livestick write ARGS…`, expecting the identity refusal: exit 3, a message
/// naming both paths.
fn refused_as_same(args: &[&str], names: &[&str]) {
    let out = livestick(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{args:?}: {stderr}");
    for name in names {
        assert!(stderr.contains(name), "{args:?} must name {name}: {stderr}");
    }
    assert!(
        stderr.contains("give another stick") || stderr.contains("drop one of them"),
        "{stderr}"
    );
}

fn copy_of_iso(dir: &Path) -> PathBuf {
    let iso = dir.join("x.iso");
    std::fs::copy(synthetic_iso("fedora-classic.iso"), &iso).unwrap();
    iso
}

#[test]
fn the_source_is_never_its_own_target() {
    let dir = tempfile::tempdir().unwrap();
    let iso = copy_of_iso(dir.path());
    let before = sha256_file(&iso);
    let s = iso.to_str().unwrap();
    refused_as_same(&["write", s, s, "--size", "1G", "--yes"], &[s]);
    // Another spelling, and a hard link: the same inode.
    let dotted = dir.path().join(".").join("x.iso");
    let d = dotted.to_str().unwrap();
    refused_as_same(&["write", s, d, "--size", "1G", "--yes"], &[s, d]);
    let hard = dir.path().join("hard.iso");
    std::fs::hard_link(&iso, &hard).unwrap();
    let h = hard.to_str().unwrap();
    refused_as_same(&["write", s, h, "--size", "1G", "--yes"], &[s, h]);
    // As one target of a batch, and through the livecd-iso-to-disk front end.
    let other = dir.path().join("other.img");
    let o = other.to_str().unwrap();
    refused_as_same(&["write", s, o, h, "--size", "1G", "--yes"], &[s, h]);
    refused_as_same(&["iso-to-disk", s, s], &[s]);
    refused_as_same(&["write", s, s, "--size", "1G", "--dry-run"], &[s]);
    assert_eq!(sha256_file(&iso), before, "the ISO is unchanged");
    assert!(!other.exists(), "a refused batch writes no target");
}

#[test]
fn a_batch_names_each_target_once() {
    let dir = tempfile::tempdir().unwrap();
    let iso = synthetic_iso("fedora-classic.iso");
    let existing = sparse(dir.path(), "a.img", 256 * MIB);
    std::fs::write(&existing, b"old contents").unwrap();
    let before = sha256_file(&existing);
    let a = existing.to_str().unwrap();
    let dotted = format!("{}/./a.img", dir.path().display());
    refused_as_same(
        &[
            "write",
            iso.to_str().unwrap(),
            a,
            &dotted,
            "--size",
            "1G",
            "--yes",
        ],
        &[a, &dotted],
    );
    assert_eq!(sha256_file(&existing), before);
    // Two names of an image file that does not exist yet: nothing is created.
    let new = dir.path().join("new.img");
    let n = new.to_str().unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(dir.path(), &link).unwrap();
    let via_link = link.join("new.img");
    let l = via_link.to_str().unwrap();
    refused_as_same(
        &[
            "write",
            iso.to_str().unwrap(),
            n,
            l,
            "--size",
            "1G",
            "--yes",
        ],
        &[n, l],
    );
    assert!(!new.exists());
}

#[test]
fn a_source_stick_is_not_the_target_of_its_own_copy() {
    let dir = tempfile::tempdir().unwrap();
    let iso = synthetic_iso("fedora-classic.iso");
    let stick = dir.path().join("stick.img");
    let s = stick.to_str().unwrap();
    let out = livestick(&[
        "write",
        iso.to_str().unwrap(),
        s,
        "--size",
        "1G",
        "--overlay-size-mb",
        "64",
        "--unencrypted-home",
        "--home-size-mb",
        "16",
        "--yes",
        "--quiet",
    ]);
    assert!(out.status.success(), "{out:?}");
    let before = sha256_file(&stick);
    refused_as_same(
        &["write", s, s, "--copy-overlay", "--copy-home", "--yes"],
        &[s],
    );
    if require(is_root(), "root (loop devices)") {
        let Some(dev) = loop_over(&[], &stick) else {
            return;
        };
        refused_as_same(
            &["write", &dev.0, s, "--copy-overlay", "--copy-home", "--yes"],
            &[&dev.0, s],
        );
    }
    assert_eq!(sha256_file(&stick), before, "the source stick is unchanged");
}

#[test]
fn a_loop_device_over_the_source_is_refused_even_with_force() {
    if !require(is_root(), "root (loop devices)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let iso = copy_of_iso(dir.path());
    let before = sha256_file(&iso);
    let Some(dev) = loop_over(&[], &iso) else {
        return;
    };
    let s = iso.to_str().unwrap();
    refused_as_same(&["write", s, &dev.0, "--force", "--yes"], &[s, &dev.0]);
    // A loop device and its file in one batch are one target.
    let other = dir.path().join("other.img");
    let Some(dev2) = loop_over(&[], &sparse(dir.path(), "b.img", 256 * MIB)) else {
        return;
    };
    let b = dir.path().join("b.img");
    refused_as_same(
        &[
            "write",
            s,
            other.to_str().unwrap(),
            &dev2.0,
            b.to_str().unwrap(),
            "--size",
            "1G",
            "--force",
            "--yes",
        ],
        &[&dev2.0, b.to_str().unwrap()],
    );
    assert_eq!(sha256_file(&iso), before, "the ISO is unchanged");
}

#[test]
fn a_stick_that_holds_the_source_is_refused_even_with_force() {
    if !require(is_root(), "root (loop devices, mount)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = sparse(dir.path(), "stick.img", 128 * MIB);
    run(
        "mke2fs",
        &["-q", "-t", "ext4", "-F", image.to_str().unwrap()],
    );
    // debugfs puts the ISO into the file system without mounting it read-write.
    let iso = synthetic_iso("fedora-classic.iso");
    sh(
        "debugfs",
        &[
            "-w",
            "-R",
            &format!("write {} x.iso", iso.display()),
            image.to_str().unwrap(),
        ],
    );
    let Some(dev) = loop_over(&[], &image) else {
        return;
    };
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-o", "ro,noload"])
        .arg(&dev.0)
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !require(mounted, "mounting an ext4 loop device") {
        return;
    }
    let _unmount = Unmount(mnt.clone());
    let before = sha256_file(&image);
    let source = mnt.join("x.iso");
    let s = source.to_str().unwrap();
    refused_as_same(&["write", s, &dev.0, "--force", "--yes"], &[s, &dev.0]);
    assert_eq!(sha256_file(&image), before, "the stick is unchanged");
}

/// The maintenance commands that change a stick, as dry runs and for real.
fn changing_maintenance(stick: &str) -> Vec<Vec<String>> {
    let rows: [&[&str]; 10] = [
        &["overlay", "merge", stick, "--dry-run"],
        &["overlay", "reset", stick, "--dry-run"],
        &["overlay", "grow", stick, "--add-mb", "8", "--dry-run"],
        &["overlay", "recover", stick, "--dry-run"],
        &["home", "resize", stick, "--size-mb", "40", "--dry-run"],
        &["overlay", "merge", stick, "--yes"],
        &["overlay", "reset", stick, "--yes"],
        &["overlay", "grow", stick, "--add-mb", "8", "--yes"],
        &["overlay", "recover", stick, "--yes"],
        &["home", "resize", stick, "--size-mb", "40"],
    ];
    rows.iter()
        .map(|r| r.iter().map(|s| s.to_string()).collect())
        .collect()
}

fn refused(args: &[String], why: &str) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = livestick(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{args:?}: {stderr}");
    assert!(stderr.contains(why), "{args:?}: {stderr}");
    let out = livestick(&[&["--json"][..], &args].concat());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["kind"], "refused", "{args:?}: {v}");
}

/// Issue 13 part 8: maintenance opens a stick through the safety checks of
/// `write` — a stick in use (here: the backing device of another loop device)
/// or held exclusively by another program is refused (3) by every command
/// that would change it, dry runs included, and left as it was; looking at it
/// is allowed. Released, the same commands work on it.
#[test]
fn maintenance_refuses_a_stick_in_use_and_opens_it_exclusively() {
    if !require(is_root(), "root (loop devices)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = crate::cli::maintained_stick(dir.path());
    let Some(stick) = loop_over(&[], &image) else {
        return;
    };
    let before = sha256_file(&image);
    {
        let Some(_upper) = loop_over(&[], Path::new(&stick.0)) else {
            return;
        };
        for args in changing_maintenance(&stick.0) {
            refused(&args, "in use");
        }
        // Looking changes nothing and is not refused.
        ok(&livestick(&["overlay", "status", &stick.0]));
        ok(&livestick(&["home", "info", &stick.0]));
    }
    {
        // Another program's exclusive open: the kernel says EBUSY.
        use std::os::unix::fs::OpenOptionsExt;
        let _held = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(&stick.0)
            .unwrap();
        // (A merge of an empty overlay has nothing to write and opens nothing.)
        for args in changing_maintenance(&stick.0)
            .into_iter()
            .filter(|a| !a.iter().any(|s| s == "--dry-run" || s == "merge"))
        {
            refused(&args, "exclusive open");
        }
    }
    drop(stick);
    assert_eq!(before, sha256_file(&image), "nothing was written");
    // Released: the same stick is maintained through a loop device again.
    let Some(stick) = loop_over(&[], &image) else {
        return;
    };
    ok(&livestick(&["overlay", "reset", &stick.0, "--yes"]));
    ok(&livestick(&[
        "overlay", "grow", &stick.0, "--add-mb", "8", "--yes",
    ]));
}

/// The running system's disk is refused (3) by `write` and by every
/// maintenance command that would change it, whoever runs them, before
/// anything is opened for writing; as an ordinary user, the refusal comes
/// before "permission denied".
#[test]
fn the_system_disk_is_refused_by_every_command_that_would_change_it() {
    let host = Host::live();
    let Some(path) = host
        .system_disks()
        .into_iter()
        .filter(|u| u.mount_point == "/")
        .find_map(|u| node_of(u.dev))
    else {
        eprintln!("SKIPPED: `/` is not on a block device with a node here");
        return;
    };
    let disk = path.to_str().unwrap();
    let mut rows: Vec<Vec<String>> = changing_maintenance(disk)
        .into_iter()
        .filter(|a| a.iter().any(|s| s == "--dry-run"))
        .collect();
    // An ISO on the system disk would be refused as the source itself: the
    // source goes to a tmpfs (and readable by anyone), if there is one.
    let scratch = tempfile::Builder::new()
        .prefix("livestick-sysdisk-")
        .tempdir_in("/dev/shm")
        .ok();
    if let Some(scratch) = &scratch {
        use std::os::unix::fs::PermissionsExt;
        let open = std::fs::Permissions::from_mode(0o755);
        std::fs::set_permissions(scratch.path(), open).unwrap();
        let iso = scratch.path().join("source.iso");
        std::fs::copy(synthetic_iso("fedora-classic.iso"), &iso).unwrap();
        std::fs::set_permissions(&iso, std::fs::Permissions::from_mode(0o644)).unwrap();
        let iso = iso.to_str().unwrap().to_string();
        for extra in [&["--dry-run"][..], &["--yes", "--force"]] {
            let mut row = vec!["write".to_string(), iso.clone(), disk.to_string()];
            row.extend(extra.iter().map(|s| s.to_string()));
            rows.push(row);
        }
    }
    for args in &rows {
        refused(args, "holds the running system");
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = as_nobody(&argv);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "as nobody {argv:?}: {stderr}");
        assert!(stderr.contains("holds the running system"), "{stderr}");
    }
}

#[test]
fn an_image_file_behind_a_loop_device_in_use_is_refused_and_left_unchanged() {
    if !require(is_root(), "root (loop devices, swapon)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = sparse(dir.path(), "swapped.img", 64 * MIB);
    let Some((dev, off)) = swap_on_a_loop_over(&image) else {
        return;
    };
    let before = std::fs::read(&image).unwrap();
    let file = image.to_str().unwrap();
    let iso = crate::support::fixtures::synthetic_iso("fedora-classic.iso");
    for args in [
        vec!["restore", file, "--yes"],
        vec!["write", iso.to_str().unwrap(), file, "--format", "--yes"],
    ] {
        let out = livestick(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{args:?}: {err}");
        assert!(
            err.contains(&format!("attached to {}", dev.0)) && err.contains("used as swap"),
            "{err}"
        );
        assert!(err.contains("swapoff"), "the hint says what to do: {err}");
        assert!(std::fs::read(&image).unwrap() == before, "{args:?} wrote");
    }
    // Attached but idle, as the tests' own sticks are: written as any file.
    drop(off);
    ok(&livestick(&["restore", file, "--yes", "--quiet"]));
}
