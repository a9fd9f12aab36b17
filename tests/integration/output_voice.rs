//! Human output is written for people: every command run on the fixtures
//! (plans, reports, notes, errors) is free of Rust type names (`DmSnapshot`,
//! `ImageFile`, `Some(…)`, a bare `None`), ends with a newline, and an error
//! under the livecd-iso-to-disk name is signed with that name.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::support::*;

/// Words with an inner capital that are not type names: units and the names
/// of things as their projects spell them.
const KNOWN_WORDS: &[&str] = &[
    "KiB",
    "MiB",
    "GiB",
    "TiB",
    "LiveOS",
    "OverlayFS",
    "SquashFS",
    "UniquePartitionGUID",
];

/// Words of `text` that look like a Rust type name (`DmSnapshot`,
/// `GrubOnly`): a capital, lower-case letters, then another capital.
fn type_like_words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| {
            let b = w.as_bytes();
            let lower_run = b
                .iter()
                .skip(1)
                .take_while(|c| c.is_ascii_lowercase())
                .count();
            b.first().is_some_and(u8::is_ascii_uppercase)
                && lower_run > 0
                && b.get(1 + lower_run).is_some_and(u8::is_ascii_uppercase)
        })
        .filter(|w| !KNOWN_WORDS.contains(w))
        .map(str::to_string)
        .collect()
}

/// What is wrong with one stream of a command's output, if anything.
fn leaks(text: &str) -> Vec<String> {
    let mut found: Vec<String> = type_like_words(text)
        .into_iter()
        .map(|w| format!("type-like word {w:?}"))
        .collect();
    if text.contains("Some(") {
        found.push("`Some(`".into());
    }
    if text
        .split(|c: char| !c.is_ascii_alphanumeric())
        .any(|w| w == "None")
    {
        found.push("`None`".into());
    }
    if !text.is_empty() && !text.ends_with('\n') {
        found.push("no final newline".into());
    }
    found
}

/// Checks both streams of a run; returns its stdout.
fn check(what: &str, out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    for (stream, text) in [("stdout", &stdout), ("stderr", &stderr)] {
        let found = leaks(text);
        assert!(
            found.is_empty(),
            "`{what}` {stream}: {}\n{text}",
            found.join(", ")
        );
    }
    stdout
}

fn run_in(dir: &Path, args: &[&str]) -> Output {
    output_of(
        Command::new(bin())
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null()),
    )
}

/// Runs a command that must succeed and checks its human output.
fn human(dir: &Path, args: &[&str]) -> String {
    let out = run_in(dir, args);
    assert!(
        out.status.success(),
        "`livestick {}` failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    check(&args.join(" "), &out)
}

/// Runs a command that must fail with `code` and checks its human output.
fn failing(dir: &Path, code: i32, args: &[&str]) -> Output {
    let out = run_in(dir, args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "`livestick {}`: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    check(&args.join(" "), &out);
    out
}

#[test]
fn the_checker_finds_what_it_is_for() {
    assert_eq!(
        type_like_words("s.img (ImageFile, 1 GiB) and (200 MiB, DmSnapshot)"),
        ["ImageFile", "DmSnapshot"]
    );
    assert_eq!(type_like_words("layout GrubOnly"), ["GrubOnly"]);
    assert!(type_like_words("an OverlayFS overlay in LiveOS of 4 GiB").is_empty());
    assert!(type_like_words("UEFI BIOS SYSLINUX Fedora-LS-42").is_empty());
    assert_eq!(leaks("home (64 MiB, None)\n"), ["`None`"]);
    assert_eq!(leaks("label Some(\"X\")\n"), ["`Some(`"]);
    assert_eq!(leaks("done"), ["no final newline"]);
    assert!(leaks("").is_empty());
}

#[test]
fn every_command_speaks_without_type_names_on_the_fixtures() {
    let dir = tmp();
    let d = dir.path();
    let isos = ["fedora-classic", "fedora-grub", "fedora42"].map(synthetic_iso);
    for iso in &isos {
        let iso = iso.to_str().unwrap();
        let text = human(d, &["inspect", iso]);
        assert!(text.contains("label:"), "{text}");
        for extra in [&[][..], &["--overlayfs"][..]] {
            let mut args = vec![
                "write",
                iso,
                "plan.img",
                "--size",
                "2G",
                "--overlay-size-mb",
                "64",
                "--home-size-mb",
                "64",
                "--unencrypted-home",
                "--swap-size-mb",
                "16",
                "--dry-run",
            ];
            args.extend_from_slice(extra);
            let plan = human(d, &args);
            // One style: each entry of the plan is `key: value` (the
            // deeper lines are its file lists).
            for line in plan
                .lines()
                .filter(|l| l.starts_with("  ") && !l.starts_with("    "))
            {
                assert!(
                    line.contains(':'),
                    "plan line without a key: {line:?}\n{plan}"
                );
            }
        }
    }

    // A written stick with every kind of file, then each command that reads
    // or plans on it.
    let classic = isos[0].to_str().unwrap();
    human(
        d,
        &[
            "write",
            classic,
            "stick.img",
            "--size",
            "1G",
            "--overlay-size-mb",
            "64",
            "--home-size-mb",
            "64",
            "--unencrypted-home",
            "--swap-size-mb",
            "16",
            "--yes",
        ],
    );
    let status = human(d, &["overlay", "status", "stick.img"]);
    for line in status.lines() {
        assert!(
            line.contains(": "),
            "overlay status speaks in `key: value` lines: {line:?}\n{status}"
        );
    }
    human(
        d,
        &["overlay", "status", "stick.img", "--livedir", "LiveOS"],
    );
    human(
        d,
        &["overlay", "grow", "stick.img", "--add-mb", "8", "--dry-run"],
    );
    human(d, &["overlay", "reset", "stick.img", "--dry-run"]);
    let info = human(d, &["home", "info", "stick.img"]);
    assert!(info.lines().all(|l| l.contains(": ")), "{info}");
    human(
        d,
        &[
            "home",
            "resize",
            "stick.img",
            "--size-mb",
            "80",
            "--dry-run",
        ],
    );
    human(d, &["home", "info", "stick.img", "--live-dir", "LiveOS"]);
    // Re-planning over the written stick: the kept overlay and home.
    human(
        d,
        &[
            "write",
            classic,
            "stick.img",
            "--overlay-size-mb",
            "64",
            "--dry-run",
        ],
    );

    // An OverlayFS stick.
    human(
        d,
        &[
            "write",
            isos[2].to_str().unwrap(),
            "ovl.img",
            "--size",
            "1G",
            "--overlay-size-mb",
            "64",
            "--overlayfs",
            "--noverify",
            "--yes",
        ],
    );
    human(d, &["overlay", "status", "ovl.img"]);

    human(d, &["devices"]);
    human(d, &["devices", "--all"]);
    human(d, &["doctor"]);

    // Errors speak too: bad input, a refusal, a usage error.
    failing(d, 2, &["write", "missing.iso", "x.img", "--size", "1G"]);
    fill_random(&d.join("junk.iso"), 1 << 20);
    failing(d, 2, &["inspect", "junk.iso"]);
    failing(d, 2, &["overlay", "status", "missing.img"]);
    failing(d, 1, &["write", classic]);
    failing(d, 1, &["man", "--json"]);
}

#[test]
fn errors_under_the_old_name_are_signed_with_it() {
    let dir = tmp();
    let old = dir.path().join("livecd-iso-to-disk");
    std::os::unix::fs::symlink(bin(), &old).unwrap();
    let out = output_of(
        Command::new(&old)
            .args(["--noverify", "missing.iso", "x.img"])
            .current_dir(dir.path())
            .stdin(Stdio::null()),
    );
    assert_eq!(out.status.code(), Some(2));
    check("livecd-iso-to-disk missing.iso", &out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("livecd-iso-to-disk: error:")),
        "{stderr}"
    );
    assert!(!stderr.contains("livestick iso-to-disk"), "{stderr}");

    // The same under `livestick iso-to-disk`: that is what the user typed.
    let out = output_of(
        Command::new(bin())
            .args(["iso-to-disk", "--noverify", "missing.iso", "x.img"])
            .current_dir(dir.path())
            .stdin(Stdio::null()),
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("livestick iso-to-disk: error:")),
        "{stderr}"
    );
}

/// A source nothing checks says so, and does not look like one whose check
/// was turned off: JSON `iso_check` in the plan and the report, a note for
/// people.
#[test]
fn what_checked_the_source_is_said() {
    let dir = tmp();
    let d = dir.path();
    let with_md5 = synthetic_iso("fedora-classic");
    let without_md5 = synthetic_iso("fedora42");
    let plan_of = |iso: &Path, extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "write",
            iso.to_str().unwrap(),
            "plan.img",
            "--size",
            "1G",
            "--dry-run",
            "--json",
        ];
        args.extend_from_slice(extra);
        serde_json::from_str(&ok(&run_in(d, &args))).unwrap()
    };
    let checked = plan_of(&with_md5, &[]);
    assert_eq!(checked["iso_check"], "implanted-md5", "{checked}");
    let skipped = plan_of(&with_md5, &["--noverify"]);
    assert_eq!(skipped["iso_check"], "skipped");
    assert!(
        skipped["notes"].to_string().contains("--noverify"),
        "{skipped}"
    );
    for extra in [&[][..], &["--noverify"][..]] {
        let none = plan_of(&without_md5, extra);
        assert_eq!(none["iso_check"], "none", "{extra:?}");
        assert!(
            none["notes"].to_string().contains("no implanted MD5"),
            "{none}"
        );
    }

    // The report of a real write carries it too, and people read the note.
    let out = run_in(
        d,
        &[
            "write",
            without_md5.to_str().unwrap(),
            "a.img",
            "--size",
            "1G",
            "--yes",
            "--json",
        ],
    );
    let report: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    assert_eq!(report["iso_check"], "none");
    assert!(report["iso_md5"].is_null());
    let out = run_in(
        d,
        &[
            "write",
            without_md5.to_str().unwrap(),
            "b.img",
            "--size",
            "1G",
            "--yes",
        ],
    );
    let text = check("write fedora42.iso b.img", &out);
    assert!(
        text.contains("nothing checks") && text.contains("no implanted MD5"),
        "{text}"
    );
    let out = run_in(
        d,
        &[
            "write",
            with_md5.to_str().unwrap(),
            "c.img",
            "--size",
            "1G",
            "--yes",
        ],
    );
    let text = check("write fedora-classic.iso c.img", &out);
    assert!(text.contains("implanted MD5 checked: passed"), "{text}");
    assert!(!text.contains("nothing checks"), "{text}");
}
