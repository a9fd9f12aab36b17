//! `livestick overlay …` subcommands on bare files, driven through their clap types
//! (the same parsing the binary uses) against the kernel vectors.

use std::path::Path;

use crate::support::dm_snapshot::*;
use crate::support::overlay;
use livestick::persist::snapshot;

fn write(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p.to_str().unwrap().to_string()
}

fn dm_status(path: &str) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len();
    snapshot::status(&mut f, len, 8, None).unwrap().dm_status
}

#[test]
fn merge_plumbing_in_place_and_to_output() {
    let d = tempfile::tempdir().unwrap();
    let cow = load_zst(&fixtures().join("p16-merge/cow-before-merge.img.zst"));
    let origin = make_origin(32777, 2);
    let merged = "3f6ab4d62a3301f9e5b99a97a420bac17eef4d8f979d704aae4a0da4c3b48e9d";

    let ov = write(d.path(), "ov", &cow);
    let org = write(d.path(), "origin.img", &origin);
    let out = d.path().join("merged.img");
    overlay(&[
        "merge",
        &ov,
        "--origin",
        &org,
        "--output",
        out.to_str().unwrap(),
    ])
    .unwrap();
    assert_eq!(sha256_hex(&std::fs::read(&out).unwrap()), merged);
    assert_eq!(
        std::fs::read(&ov).unwrap(),
        cow,
        "--output leaves the overlay alone"
    );
    assert_eq!(
        std::fs::read(&org).unwrap(),
        origin,
        "--output leaves the origin alone"
    );

    overlay(&["merge", &ov, "--origin", &org, "--dry-run"]).unwrap();
    assert_eq!(std::fs::read(&org).unwrap(), origin);

    overlay(&["merge", &ov, "--origin", &org]).unwrap();
    assert_eq!(sha256_hex(&std::fs::read(&org).unwrap()), merged);
    let kernel_after = load_zst(&fixtures().join("p16-merge/cow-after-merge.img.zst"));
    assert!(
        std::fs::read(&ov).unwrap() == kernel_after,
        "overlay as the kernel leaves it"
    );
    assert_eq!(dm_status(&ov), "32/4096 32");
}

/// `--output` naming the origin or the overlay itself is refused before anything is
/// opened: the output is created first, which would empty that input.
#[test]
fn merge_to_an_output_that_is_an_input_is_refused_unchanged() {
    let d = tempfile::tempdir().unwrap();
    let cow = load_zst(&fixtures().join("p16-merge/cow-before-merge.img.zst"));
    let origin = make_origin(32777, 2);
    let ov = write(d.path(), "ov", &cow);
    let org = write(d.path(), "origin.img", &origin);
    // Another spelling of the origin's path.
    let org_again = d.path().join(".").join("origin.img");
    for out in [org.as_str(), ov.as_str(), org_again.to_str().unwrap()] {
        let refused = overlay(&["merge", &ov, "--origin", &org, "--output", out]).unwrap_err();
        assert!(
            refused.to_string().contains("would destroy"),
            "{out}: {refused:#}"
        );
        assert_eq!(
            std::fs::read(&org).unwrap(),
            origin,
            "{out}: origin changed"
        );
        assert_eq!(std::fs::read(&ov).unwrap(), cow, "{out}: overlay changed");
    }
}

/// `recover --repair` checks that the repair can run (its work dir here) before it
/// grows the overlay or marks it valid: a failed repair must not leave the store
/// recovered but unchecked.
#[test]
fn recover_with_a_repair_that_cannot_run_changes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let cow = load_zst(&fixtures().join("p8-full-invalid/cow-after-run.img.zst"));
    let ov = write(d.path(), "ov", &cow);
    let org = write(d.path(), "origin.img", &make_origin(16384, 8));
    let missing = d.path().join("no-such-dir");
    for add in [None, Some("1")] {
        let mut args = vec![
            "recover",
            ov.as_str(),
            "--origin",
            org.as_str(),
            "--repair",
            "--workdir",
            missing.to_str().unwrap(),
        ];
        if let Some(mb) = add {
            args.extend(["--add-mb", mb]);
        }
        let refused = overlay(&args).unwrap_err();
        assert!(
            format!("{refused:#}").contains("no-such-dir"),
            "{args:?}: {refused:#}"
        );
        assert_eq!(
            std::fs::read(&ov).unwrap(),
            cow,
            "{args:?} changed the overlay"
        );
    }
}

#[test]
fn merge_refuses_an_invalid_overlay_and_recover_fixes_it() {
    let d = tempfile::tempdir().unwrap();
    let cow = load_zst(&fixtures().join("p8-full-invalid/cow-after-run.img.zst"));
    let ov = write(d.path(), "ov", &cow);
    let org = write(d.path(), "origin.img", &make_origin(16384, 8));
    let invalid = overlay(&["merge", &ov, "--origin", &org]).unwrap_err();
    assert_eq!(
        kind(&invalid),
        livestick::error::ErrorKind::BadInput,
        "{invalid:#}"
    );
    assert!(
        format!("{invalid:#}").contains("overlay recover"),
        "says what to do: {invalid:#}"
    );
    assert_eq!(std::fs::read(&ov).unwrap(), cow);

    overlay(&["recover", &ov, "--origin", &org, "--dry-run"]).unwrap();
    assert_eq!(std::fs::read(&ov).unwrap(), cow, "dry run changes nothing");
    overlay(&["recover", &ov, "--origin", &org]).unwrap();
    assert_eq!(dm_status(&ov), "152/153 16");

    // Recover with growth: the same entries, more room.
    let ov2 = write(d.path(), "ov2", &cow);
    overlay(&["recover", &ov2, "--origin-size", "8M", "--add-mb", "1"]).unwrap();
    let len = std::fs::metadata(&ov2).unwrap().len();
    assert_eq!(dm_status(&ov2), format!("152/{} 16", len / 512));
}

#[test]
fn recover_refuses_corrupt_metadata_without_changing_it() {
    let d = tempfile::tempdir().unwrap();
    let mut cow = load_zst(&fixtures().join("p8-full-invalid/cow-after-run.img.zst"));
    // Entry 3 of area 0 now points past the end of the file.
    cow[4096 + 3 * 16 + 8..4096 + 4 * 16].copy_from_slice(&9999u64.to_le_bytes());
    let ov = write(d.path(), "ov", &cow);
    let err = overlay(&["recover", &ov]).unwrap_err();
    assert!(format!("{err:#}").contains("area 0 entry 3"), "{err:#}");
    assert_eq!(std::fs::read(&ov).unwrap(), cow);
}

#[test]
fn grow_reset_and_status() {
    let d = tempfile::tempdir().unwrap();
    let cow = load_zst(&fixtures().join("p8-basic/cow-final.img.zst"));
    let ov = write(d.path(), "ov", &cow);
    overlay(&["status", &ov]).unwrap();
    overlay(&["status", &ov, "--origin-size", "1M"]).unwrap();

    overlay(&["grow", &ov, "--add-mb", "2", "--dry-run"]).unwrap();
    assert_eq!(std::fs::metadata(&ov).unwrap().len(), cow.len() as u64);
    overlay(&["grow", &ov, "--size-mb", "256"]).unwrap();
    // 256 MiB is a trap size; one chunk less is used.
    assert_eq!(std::fs::metadata(&ov).unwrap().len(), (256 << 20) - 4096);
    assert_eq!(
        dm_status(&ov),
        format!("1104/{} 16", ((256 << 20) - 4096) / 512)
    );
    let shrink = overlay(&["grow", &ov, "--size-mb", "10"]).unwrap_err();
    assert_eq!(
        kind(&shrink),
        livestick::error::ErrorKind::BadInput,
        "no shrinking, and it is the request that is wrong: {shrink:#}"
    );
    assert!(overlay(&["grow", &ov]).is_err(), "an amount is required");

    overlay(&["reset", &ov, "--dry-run"]).unwrap();
    assert_eq!(
        dm_status(&ov),
        format!("1104/{} 16", ((256 << 20) - 4096) / 512)
    );
    overlay(&["reset", &ov, "--yes"]).unwrap();
    let bytes = std::fs::read(&ov).unwrap();
    assert!(bytes[..65536].iter().all(|&b| b == 0));
    assert_eq!(
        dm_status(&ov),
        format!("16/{} 16", ((256 << 20) - 4096) / 512)
    );
}

#[test]
fn whole_disk_images_are_not_taken_for_overlays() {
    let d = tempfile::tempdir().unwrap();
    let mut disk = vec![0u8; 1 << 20];
    disk[510] = 0x55;
    disk[511] = 0xAA;
    let p = write(d.path(), "stick.img", &disk);
    assert!(overlay(&["status", &p]).is_err());
    assert!(overlay(&["reset", &p, "--yes"]).is_err());
    assert!(std::fs::read(&p).unwrap() == disk);
}

fn kind(err: &anyhow::Error) -> livestick::error::ErrorKind {
    livestick::cli::error_kind(err)
}

#[test]
fn a_damaged_store_fails_status_and_is_not_grown() {
    let d = tempfile::tempdir().unwrap();
    let mut cow = load_zst(&fixtures().join("p8-basic/cow-final.img.zst"));
    // Entry 0 of area 0 now points at chunk 2^64-1, far outside the file
    // (status printed 18446744073709551615/16384 and exit 0 for this).
    cow[4096 + 8..4096 + 16].copy_from_slice(&u64::MAX.to_le_bytes());
    let ov = write(d.path(), "ov", &cow);
    let err = overlay(&["status", &ov]).unwrap_err();
    let text = format!("{err:#}");
    assert_eq!(kind(&err), livestick::error::ErrorKind::BadInput, "{text}");
    assert!(
        text.contains("damaged overlay") && text.contains(&ov),
        "{text}"
    );
    assert!(text.contains("overlay reset"), "says what to do: {text}");
    let out = std::process::Command::new(crate::support::bin())
        .args(["overlay", "status", &ov])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("18446744073709551615"),
        "{out:?}"
    );
    for args in [
        &["grow", &ov, "--add-mb", "2"][..],
        &["grow", &ov, "--add-mb", "2", "--dry-run"][..],
    ] {
        let err = overlay(args).unwrap_err();
        assert_eq!(kind(&err), livestick::error::ErrorKind::BadInput, "{err:#}");
        assert!(format!("{err:#}").contains("refusing to grow"), "{err:#}");
    }
    assert!(
        std::fs::read(&ov).unwrap() == cow,
        "a refused grow changes nothing"
    );
}

#[test]
fn an_empty_file_is_not_an_overlay() {
    let d = tempfile::tempdir().unwrap();
    let ov = write(d.path(), "empty", b"");
    for args in [
        &["reset", &ov, "--yes"][..],
        &["status", &ov][..],
        &["grow", &ov, "--add-mb", "1"][..],
    ] {
        let err = overlay(args).unwrap_err();
        assert_eq!(kind(&err), livestick::error::ErrorKind::BadInput, "{err:#}");
        assert!(format!("{err:#}").contains("is empty"), "{err:#}");
    }
    assert_eq!(std::fs::metadata(&ov).unwrap().len(), 0);
}
