//! Persistence scenarios from issue 5: write a stick from the bootable
//! fixture ISO, boot it several times under different firmware, and check
//! that what one boot wrote (to `/` through the overlay, and to `/home`) is
//! there in the next. A stick without a working persistent overlay fails
//! here: the second boot would report `root_marker=absent`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::harness::{Boot, BootResult, Firmware, boot_env_ready, tail_of_file};
use crate::support::fixtures::boot_iso;

/// A stick image in its own temporary directory (removed on drop).
pub(crate) struct Stick {
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
}

/// Runs the livestick binary; panics with its output unless it succeeds.
pub(crate) fn livestick(args: &[&str]) -> Output {
    let out = Command::new(crate::support::bin())
        .args(args)
        .output()
        .expect("run livestick");
    assert!(
        out.status.success(),
        "livestick {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

const STICK_BYTES: u64 = 1 << 30;

/// A 1 GiB stick that was used before: random bytes everywhere (an 8 MiB random
/// block repeated), and an md 0.90 RAID superblock where the new FAT partition
/// ends, which once made the partition probe as `linux_raid_member` so udev made
/// no by-uuid link and dracut never found the live system. Persistence is
/// allocated, not written, so every boot test runs over stale bytes.
pub(crate) fn used_stick(image: &Path) {
    use rand::RngCore;
    use std::io::{Seek, SeekFrom, Write};
    let mut block = vec![0u8; 8 << 20];
    rand::thread_rng().fill_bytes(&mut block);
    let mut f = std::fs::File::create(image).expect("create the stick image");
    for _ in 0..STICK_BYTES / block.len() as u64 {
        f.write_all(&block)
            .expect("fill the stick with stale bytes");
    }
    // The partition runs from 1 MiB to the end of the stick.
    let part_len = STICK_BYTES - (1 << 20);
    let md_at = (1 << 20) + (part_len & !0xffff) - 0x10000;
    let md: Vec<u8> = [0xa92b_4efcu32, 0, 90, 0, 0, 1, 0, 1, 0]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    f.seek(SeekFrom::Start(md_at)).expect("seek");
    f.write_all(&md).expect("plant an md superblock");
}

/// `livestick write ISO IMAGE --format --timeout 1 --yes --quiet` plus `options`
/// (overlay, home, layout …) onto a used 1 GiB stick image.
pub(crate) fn write_stick_with(iso: &Path, options: &[&str]) -> Stick {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir for the stick");
    let image = dir.path().join("stick.img");
    used_stick(&image);
    let mut args = vec![
        "write".to_string(),
        iso.display().to_string(),
        image.display().to_string(),
    ];
    args.extend(
        ["--format", "--timeout", "1", "--yes", "--quiet"]
            .iter()
            .chain(options)
            .map(|s| s.to_string()),
    );
    livestick(&args.iter().map(String::as_str).collect::<Vec<_>>());
    Stick { dir, image }
}

/// The default test stick: a 64 MiB dm-snapshot overlay and a 32 MiB plain
/// home, plus `extra`.
pub(crate) fn write_stick(iso: &Path, extra: &[&str]) -> Stick {
    let mut options = vec![
        "--overlay-size-mb",
        "64",
        "--home-size-mb",
        "32",
        "--unencrypted-home",
    ];
    options.extend_from_slice(extra);
    write_stick_with(iso, &options)
}

pub(crate) fn boot(stick: &Stick, firmware: Firmware, name: &str) -> BootResult {
    boot_with(Boot::stick(&stick.image, firmware, name))
}

/// Runs a prepared boot and logs its main report (visible with --nocapture).
pub(crate) fn boot_with(b: Boot) -> BootResult {
    let (name, firmware) = (b.name.clone(), b.firmware);
    let r = b.run();
    eprintln!(
        "{name}: {:?} in {:.1?}: {:?}",
        firmware,
        r.elapsed,
        r.boot()
    );
    r
}

/// What a persistent stick must report on every boot.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Setup {
    /// `dm-snapshot` or `overlayfs`.
    pub overlay: &'static str,
    pub home_luks: bool,
}

/// The classic stick: dm-snapshot overlay, plain home.
pub(crate) const CLASSIC: Setup = Setup {
    overlay: "dm-snapshot",
    home_luks: false,
};

/// Every mismatch between a boot's report and `setup` with `previous` boots
/// already behind it (0: a fresh stick, nothing may be there yet). Returned
/// rather than asserted so the negative control can prove it does fail.
pub(crate) fn persistence_problems(r: &BootResult, setup: Setup, previous: u32) -> Vec<String> {
    let report = r.boot();
    let n = previous.to_string();
    let (marker, count) = if previous == 0 {
        ("absent", "0")
    } else {
        ("present", n.as_str())
    };
    let luks = if setup.home_luks { "yes" } else { "no" };
    let want = [
        ("overlay", setup.overlay),
        ("overlay_persistent", "yes"),
        ("overlay_state", "valid"),
        ("rw", "yes"),
        ("live_fs", "vfat"),
        ("home", "mounted"),
        ("home_luks", luks),
        ("root_marker", marker),
        ("root_count", count),
        ("home_marker", marker),
        ("home_count", count),
    ];
    let mut problems: Vec<String> = want
        .iter()
        .filter_map(|(k, v)| {
            let got = report.get(*k).map(String::as_str);
            (got != Some(*v)).then(|| format!("{k}: expected {v:?}, got {got:?}"))
        })
        .collect();
    let file = report.get("overlay_file").map(String::as_str);
    if !file.is_some_and(|f| f.starts_with("overlay-")) {
        problems.push(format!("overlay_file: expected overlay-…, got {file:?}"));
    }
    problems
}

/// Asserts [`persistence_problems`] finds nothing, showing the console tail.
pub(crate) fn assert_persisted(r: &BootResult, setup: Setup, previous: u32) {
    let problems = persistence_problems(r, setup, previous);
    assert!(
        problems.is_empty(),
        "persistence check failed after {previous} earlier boot(s):\n  {}\nreport: {:?}\nlog: {}\n{}",
        problems.join("\n  "),
        r.boot(),
        r.log.display(),
        tail_of_file(&r.log, 40)
    );
}

fn assert_fresh(r: &BootResult) {
    assert_persisted(r, CLASSIC, 0);
}

/// `previous` boots have already written their markers.
fn assert_seen(r: &BootResult, previous: u32) {
    assert_persisted(r, CLASSIC, previous);
}

/// MBR + FAT, dm-snapshot overlay, plain home: boot 1 writes markers, boot 2
/// sees them (BIOS), boot 3 sees them (UEFI).
#[test]
fn mbr_stick_persists_across_bios_and_uefi_boots() {
    if !boot_env_ready(&[Firmware::Bios, Firmware::Uefi]) {
        return;
    }
    let stick = write_stick(&boot_iso("boot-classic.iso"), &[]);
    assert_fresh(&boot(&stick, Firmware::Bios, "mbr-1-bios"));
    assert_seen(&boot(&stick, Firmware::Bios, "mbr-2-bios"), 1);
    assert_seen(&boot(&stick, Firmware::Uefi, "mbr-3-uefi"), 2);
}

/// GPT layout: the same, UEFI first, then BIOS (gptmbr.bin + syslinux).
#[test]
fn gpt_stick_persists_across_uefi_and_bios_boots() {
    if !boot_env_ready(&[Firmware::Bios, Firmware::Uefi]) {
        return;
    }
    let stick = write_stick(&boot_iso("boot-classic.iso"), &["--gpt"]);
    assert_fresh(&boot(&stick, Firmware::Uefi, "gpt-1-uefi"));
    assert_seen(&boot(&stick, Firmware::Uefi, "gpt-2-uefi"), 1);
    assert_seen(&boot(&stick, Firmware::Bios, "gpt-3-bios"), 2);
}

/// LUKS home: home.img is LUKS2 (pbkdf2 at 10 ms, so unlocking under TCG
/// takes no time), the guest's init opens it with the passphrase QEMU hands
/// it through fw_cfg, and what boot 1 wrote in /home is there in boot 2. A
/// third boot with a wrong passphrase must leave the home locked: proof that
/// the unlock really depends on the key and that home_luks is not guessed.
#[test]
fn luks_home_unlocks_with_passphrase_and_persists() {
    if !boot_env_ready(&[Firmware::Bios, Firmware::Uefi]) {
        return;
    }
    // A space and no final newline: the passphrase must reach cryptsetup
    // byte for byte on both sides.
    let passphrase = "live stick 5";
    let key = tempfile::NamedTempFile::new_in(env!("CARGO_TARGET_TMPDIR")).expect("key file");
    std::fs::write(key.path(), passphrase).expect("write key file");
    let key_path = key.path().display().to_string();
    let stick = write_stick_with(
        &boot_iso("boot-classic.iso"),
        &[
            "--overlay-size-mb",
            "64",
            "--home-size-mb",
            "32",
            "--passphrase-file",
            &key_path,
            "--luks-pbkdf",
            "pbkdf2",
            "--luks-iter-time",
            "10",
        ],
    );
    let luks = Setup {
        home_luks: true,
        ..CLASSIC
    };
    let b = |fw, name| Boot::stick(&stick.image, fw, name);
    assert_persisted(
        &boot_with(b(Firmware::Bios, "luks-1-bios").passphrase(passphrase)),
        luks,
        0,
    );
    assert_persisted(
        &boot_with(b(Firmware::Uefi, "luks-2-uefi").passphrase(passphrase)),
        luks,
        1,
    );
    let wrong = boot_with(b(Firmware::Bios, "luks-3-wrong").passphrase("live stick 6"));
    wrong
        .expect("home_luks", "yes")
        .expect("home", "locked")
        .expect("home_marker", "nohome")
        // The root overlay does not depend on the home passphrase.
        .expect("root_marker", "present")
        .expect("root_count", "2");
}

/// GRUB-only ISO (Fedora >= 37: no isolinux on the ISO): livestick adds
/// SYSLINUX for BIOS itself, so the stick boots under SeaBIOS too — which
/// livecd-iso-to-disk cannot do — and under OVMF through the ISO's GRUB.
#[test]
fn grub_only_iso_stick_boots_bios_and_uefi_with_persistence() {
    if !boot_env_ready(&[Firmware::Bios, Firmware::Uefi]) {
        return;
    }
    let stick = write_stick(&boot_iso("boot-grub.iso"), &[]);
    assert_fresh(&boot(&stick, Firmware::Bios, "grub-1-bios"));
    assert_seen(&boot(&stick, Firmware::Uefi, "grub-2-uefi"), 1);
}

/// Flat squashfs (the root tree directly in squashfs.img, no rootfs.img):
/// only an OverlayFS overlay can work, livestick chooses it without a flag (as
/// every current Fedora ISO needs), and it must persist across a reboot.
#[test]
fn flat_squashfs_stick_persists_with_overlayfs() {
    if !boot_env_ready(&[Firmware::Bios, Firmware::Uefi]) {
        return;
    }
    let stick = write_stick(&boot_iso("boot-flat.iso"), &[]);
    let overlayfs = Setup {
        overlay: "overlayfs",
        ..CLASSIC
    };
    assert_persisted(&boot(&stick, Firmware::Uefi, "flat-1-uefi"), overlayfs, 0);
    assert_persisted(&boot(&stick, Firmware::Bios, "flat-2-bios"), overlayfs, 1);
}

/// A same-ISO rewrite (issue 12 part 5): the ISO written again onto a stick that
/// was booted, without `--format`, keeps both the overlay and the home, so what
/// boot 1 wrote to `/` and to `/home` is there in boot 2.
#[test]
fn same_iso_rewrite_keeps_overlay_and_home() {
    if !boot_env_ready(&[Firmware::Bios]) {
        return;
    }
    let iso = boot_iso("boot-classic.iso");
    let stick = write_stick(&iso, &[]);
    assert_fresh(&boot(&stick, Firmware::Bios, "rewrite-1-bios"));
    let (iso, image) = (iso.display().to_string(), stick.image.display().to_string());
    livestick(&["write", &iso, &image, "--timeout", "1", "--yes", "--quiet"]);
    assert_seen(&boot(&stick, Firmware::Bios, "rewrite-2-bios"), 1);
}

/// Negative control (issue 5, "How it is checked"): the same stick with
/// `rd.live.overlay` removed from syslinux.cfg and grub.cfg boots with a
/// temporary overlay, so what boot 1 wrote to `/` is gone in boot 2 — and
/// the persistence check the other scenarios use must say so. If it passed
/// here, it would prove nothing anywhere else.
#[test]
fn stick_without_rd_live_overlay_fails_the_persistence_check() {
    if !boot_env_ready(&[Firmware::Bios, Firmware::Uefi]) {
        return;
    }
    let stick = write_stick(&boot_iso("boot-classic.iso"), &[]);
    for cfg in ["::/syslinux/syslinux.cfg", "::/EFI/BOOT/grub.cfg"] {
        let text = read_stick_file(&stick, cfg);
        let stripped = drop_kernel_arg(&text, "rd.live.overlay");
        assert!(
            text.contains("rd.live.overlay=") && !stripped.contains("rd.live.overlay"),
            "{cfg}: expected rd.live.overlay to remove:\n{text}"
        );
        write_stick_file(&stick, cfg, &stripped);
    }
    // BIOS reads syslinux.cfg, UEFI grub.cfg: both edits are exercised.
    let first = boot(&stick, Firmware::Bios, "nooverlay-1-bios");
    let second = boot(&stick, Firmware::Uefi, "nooverlay-2-uefi");
    // The edit took effect: dracut fell back to a RAM overlay.
    first.expect("overlay_persistent", "no");
    second.expect("overlay_persistent", "no");
    let problems = persistence_problems(&second, CLASSIC, 1);
    assert!(
        problems.iter().any(|p| p.starts_with("root_marker:")),
        "the persistence check must report the lost root marker; it found {problems:?}\nreport: {:?}",
        second.boot()
    );
}

/// Byte offset of the FAT partition of an MBR stick (the only partition
/// livestick writes there), from the partition table's first entry.
fn fat_offset(image: &Path) -> u64 {
    let mut mbr = [0u8; 512];
    std::io::Read::read_exact(
        &mut std::fs::File::open(image).expect("open the stick"),
        &mut mbr,
    )
    .expect("read the stick's MBR");
    assert_ne!(mbr[450], 0xee, "fat_offset reads MBR sticks only, not GPT");
    u64::from(u32::from_le_bytes(mbr[454..458].try_into().unwrap())) * 512
}

/// `mtools` image spec for the stick's FAT partition: `IMAGE@@OFFSET`.
pub(crate) fn mtools_image(stick: &Stick) -> String {
    format!("{}@@{}", stick.image.display(), fat_offset(&stick.image))
}

/// A file on the stick's FAT filesystem, read with mtools (independent of
/// livestick's own FAT code).
pub(crate) fn read_stick_file(stick: &Stick, path: &str) -> String {
    let out = Command::new("mtype")
        .args(["-i", &mtools_image(stick), path])
        .output()
        .expect("run mtype (apt-get install -y mtools)");
    assert!(
        out.status.success(),
        "mtype {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("config is UTF-8")
}

/// Replaces a file on the stick's FAT filesystem with mtools.
pub(crate) fn write_stick_file(stick: &Stick, path: &str, text: &str) {
    let local = stick.dir.path().join("edited.cfg");
    std::fs::write(&local, text).expect("write edited config");
    let out = Command::new("mcopy")
        .args(["-o", "-i", &mtools_image(stick)])
        .arg(&local)
        .arg(path)
        .output()
        .expect("run mcopy (apt-get install -y mtools)");
    assert!(
        out.status.success(),
        "mcopy {path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `text` with every whitespace-separated token `name` or `name…` (so also
/// `name=…` and `name.overlayfs`) removed; indentation is kept.
fn drop_kernel_arg(text: &str, name: &str) -> String {
    text.lines()
        .map(|line| {
            let indent = &line[..line.len() - line.trim_start().len()];
            let kept: Vec<&str> = line
                .split_whitespace()
                .filter(|t| !t.starts_with(name))
                .collect();
            format!("{indent}{}\n", kept.join(" "))
        })
        .collect()
}
