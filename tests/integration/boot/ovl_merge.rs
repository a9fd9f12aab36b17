//! OverlayFS merge proven by booting: a flat-squashfs stick boots and writes into
//! its OverlayFS upper dir; `livestick overlay merge`, run as an ordinary user
//! (uid 65534), streams the root tree through sqfs2tar/tar2sqfs with the upper dir
//! applied; the next boot finds what boot 1 wrote in the new squashfs.img, over an
//! empty upper dir, and keeps persisting.

use std::process::Command;

use livestick::disk::stick::Stick as StickFs;

use super::harness::{Firmware, boot_env_ready};
use super::scenarios::{CLASSIC, Setup, Stick, assert_persisted, boot, livestick, write_stick};
use crate::support::fixtures::boot_iso;

const OVERLAYFS: Setup = Setup {
    overlay: "overlayfs",
    ..CLASSIC
};

/// The entries of the overlay's upper dir, read offline with debugfs.
fn upper_entries(stick: &Stick) -> Vec<String> {
    let mut s = StickFs::open(&stick.image, false).expect("open the stick");
    let info = s.info("LiveOS").expect("LiveOS on the stick");
    let ext = s
        .file_extents(&info.expected_overlay)
        .expect("overlay extents");
    let spec = format!("{}?offset={}", stick.image.display(), ext[0].0);
    let out = Command::new("debugfs")
        .args(["-R", "ls -p /overlayfs", &spec])
        .output()
        .expect("debugfs runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split('/').nth(5).map(str::to_string))
        .filter(|n| !n.is_empty() && n != "." && n != "..")
        .collect()
}

/// `livestick ARGS` as uid/gid 65534, on files opened to that user.
fn livestick_unprivileged(stick: &Stick, args: &[&str]) {
    use std::os::unix::fs::PermissionsExt;
    let open = |p: &std::path::Path, mode| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod")
    };
    open(stick.dir.path(), 0o777);
    open(&stick.image, 0o666);
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(crate::support::bin())
        .args(args)
        .output()
        .expect("setpriv runs");
    assert!(
        out.status.success(),
        "livestick {args:?} as uid 65534 failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn flat_overlayfs_merge_without_root_keeps_changes_and_boots() {
    if !boot_env_ready(&[Firmware::Bios, Firmware::Uefi]) {
        return;
    }
    let stick = write_stick(&boot_iso("boot-flat.iso"), &["--overlayfs"]);
    assert_persisted(
        &boot(&stick, Firmware::Bios, "ovlmerge-1-bios"),
        OVERLAYFS,
        0,
    );
    let before = upper_entries(&stick);
    assert!(
        !before.is_empty(),
        "boot 1 left nothing in the upper dir to merge"
    );

    let image = stick.image.display().to_string();
    let workdir = stick.dir.path().join("work");
    std::fs::create_dir_all(&workdir).expect("work dir");
    std::fs::set_permissions(
        &workdir,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .expect("chmod work dir");
    let workdir = workdir.display().to_string();
    let plan = livestick(&[
        "overlay",
        "merge",
        &image,
        "--dry-run",
        "--workdir",
        &workdir,
    ]);
    let plan = String::from_utf8_lossy(&plan.stdout);
    assert!(
        plan.contains("sqfs2tar") && plan.contains("tar2sqfs"),
        "{plan}"
    );
    livestick_unprivileged(
        &stick,
        &[
            "overlay",
            "merge",
            &image,
            "--yes",
            "--quiet",
            "--workdir",
            &workdir,
        ],
    );
    assert_eq!(
        upper_entries(&stick),
        Vec::<String>::new(),
        "the upper dir is empty after the merge"
    );

    // Boot 2 reads boot 1's marker from the new squashfs.img and writes the next.
    assert_persisted(
        &boot(&stick, Firmware::Uefi, "ovlmerge-2-uefi"),
        OVERLAYFS,
        1,
    );
    assert_persisted(
        &boot(&stick, Firmware::Bios, "ovlmerge-3-bios"),
        OVERLAYFS,
        2,
    );
}
