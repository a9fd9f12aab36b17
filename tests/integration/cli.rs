//! The command-line contract: help with examples everywhere, completions,
//! the man page, --version, doctor, and every exit code of docs/exit-codes.md.

use std::path::Path;
use std::process::{Command, Output};

use crate::support::*;
use clap::CommandFactory;
use livestick::cli::{self, Cli};
use livestick::error::{ErrorKind, PartialBatchFailure};

/// Every subcommand path, e.g. ["write"], ["overlay", "merge"].
fn paths(cmd: &clap::Command, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    // Hidden subcommands are internal plumbing, not for users.
    for sub in cmd
        .get_subcommands()
        .filter(|s| s.get_name() != "help" && !s.is_hide_set())
    {
        let mut p = prefix.clone();
        p.push(sub.get_name().to_string());
        out.push(p.clone());
        paths(sub, p, out);
    }
}

fn all_paths() -> Vec<Vec<String>> {
    let mut out = Vec::new();
    paths(&cli::command(), Vec::new(), &mut out);
    out
}

#[test]
fn clap_definitions_are_consistent() {
    Cli::command().debug_assert();
    cli::command().debug_assert();
}

#[test]
fn every_help_renders_with_examples() {
    let top = ok(&livestick(&["--help"]));
    assert!(top.contains("Examples:"), "{top}");
    for path in all_paths() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        if path == ["iso-to-disk"] {
            // Its --help is livecd-iso-to-disk's; clap's help is `help iso-to-disk`.
            args.insert(0, "help");
        } else {
            args.push("--help");
        }
        let text = ok(&livestick(&args));
        assert!(
            text.contains("Examples:"),
            "`livestick {}` has no examples:\n{text}",
            args.join(" ")
        );
    }
}

#[test]
fn completions_generate_for_each_shell() {
    for (shell, needle) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef livestick"),
        ("fish", "complete -c livestick"),
    ] {
        let text = ok(&livestick(&["completions", shell]));
        assert!(text.contains(needle), "{shell}: {text}");
        for sub in ["write", "inspect", "doctor", "iso-to-disk"] {
            assert!(text.contains(sub), "{shell} completion lacks {sub}");
        }
    }
    let out = livestick(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn man_page_covers_every_subcommand() {
    let page = ok(&livestick(&["man"]));
    assert!(
        page.starts_with(".ie") || page.contains(".TH livestick 1"),
        "{page}"
    );
    assert_eq!(page.matches(".TH ").count(), 1, "one page");
    for path in all_paths() {
        let heading = format!(".SH \"LIVESTICK {}\"", path.join(" ").to_uppercase());
        assert!(page.contains(&heading), "man page lacks {heading}");
    }
    assert!(page.contains("EXIT STATUS"));
    // groff renders it without warnings, when installed (-k: UTF-8 input
    // through preconv, as man-db does).
    if let Ok(out) = Command::new("groff")
        .args(["-k", "-man", "-Tutf8", "-ww", "-z"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(page.as_bytes())?;
            child.wait_with_output()
        })
    {
        let warnings = String::from_utf8_lossy(&out.stderr);
        assert!(warnings.trim().is_empty(), "groff: {warnings}");
    }
    let dir = tempfile::tempdir().unwrap();
    ok(&livestick(&["man", "--dir", dir.path().to_str().unwrap()]));
    for name in [
        "livestick.1",
        "livestick-write.1",
        "livestick-overlay-merge.1",
    ] {
        assert!(dir.path().join(name).is_file(), "{name} not written");
    }
}

#[test]
fn version_shows_features() {
    let long = ok(&livestick(&["--version"]));
    assert!(long.starts_with(&format!("livestick {}", env!("CARGO_PKG_VERSION"))));
    assert!(long.contains("features:"), "{long}");
    let short = ok(&livestick(&["-V"]));
    assert_eq!(
        short.trim(),
        format!("livestick {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn doctor_lists_programs_with_packages() {
    let text = ok(&livestick(&["doctor"]));
    for program in [
        "syslinux",
        "mcopy",
        "mke2fs",
        "resize2fs",
        "e2fsck",
        "unsquashfs",
        "mksquashfs",
        "mkfs.erofs",
        "cryptsetup",
        "qemu-system-x86_64",
    ] {
        assert!(text.contains(program), "doctor lacks {program}:\n{text}");
    }
    let v: serde_json::Value =
        serde_json::from_str(&ok(&livestick(&["doctor", "--json"]))).expect("JSON");
    let checks = v["checks"].as_array().unwrap();
    assert!(
        checks
            .iter()
            .all(|c| c["debian"].is_string() && c["fedora"].is_string())
    );
    let syslinux = checks.iter().find(|c| c["name"] == "syslinux").unwrap();
    // The test environment has SYSLINUX (scripts/deps.sh), so the write can run.
    assert_eq!(syslinux["found"], true);
    assert!(syslinux["path"].is_string());
    assert!(v["ok"].is_boolean());
}

fn code(o: &Output) -> Option<i32> {
    o.status.code()
}

/// The JSON error object is the whole of stdout, and matches the exit code.
fn json_error(o: &Output, expected: i32, kind: &str) {
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {}",
            String::from_utf8_lossy(&o.stdout)
        )
    });
    assert_eq!(v["exit_code"], expected);
    assert_eq!(v["kind"], kind);
    for key in ["error", "step", "hint"] {
        assert!(v[key].is_string(), "{key} missing: {v}");
    }
    assert!(v["causes"].is_array());
}

/// Human errors name the step, the causes and a hint.
fn human_error(o: &Output) {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("error:"), "{stderr}");
    assert!(stderr.contains("hint:"), "{stderr}");
}

#[test]
fn exit_0_success() {
    for args in [&["--help"][..], &["--version"], &["doctor"], &["man"]] {
        assert_eq!(code(&livestick(args)), Some(0), "{args:?}");
    }
    let iso = synthetic_iso("fedora-classic.iso");
    let out = livestick(&["inspect", iso.to_str().unwrap()]);
    assert_eq!(code(&out), Some(0));
}

#[test]
fn exit_1_usage() {
    let out = livestick(&["write", "--bogus"]);
    assert_eq!(code(&out), Some(1));
    let out = livestick(&["--json", "write", "--bogus"]);
    assert_eq!(code(&out), Some(1));
    json_error(&out, 1, "usage");
    let out = livestick(&["iso-to-disk", "--xo", "a.iso", "b.img"]);
    assert_eq!(code(&out), Some(1));
    human_error(&out);
    assert_eq!(ErrorKind::Usage.exit_code(), 1);
}

#[test]
fn exit_2_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("s.img");
    let args = [
        "write",
        "/nonexistent/x.iso",
        img.to_str().unwrap(),
        "--size",
        "256M",
    ];
    let out = livestick(&args);
    assert_eq!(code(&out), Some(2));
    human_error(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("livestick write: error:"));
    let out = livestick(&[&["--json"][..], &args].concat());
    json_error(&out, 2, "bad-input");
    assert!(!img.exists());
}

#[test]
fn exit_3_refused() {
    if !require(is_root(), "root (a loop device is a non-removable disk)") {
        return;
    }
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("backing.img");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let Some(dev) = Loop::attach(&backing) else {
        require(false, "loop devices (losetup -f)");
        return;
    };
    let before = sha256_file(&backing);
    let out = livestick(&["--json", "write", iso.to_str().unwrap(), &dev.0, "--yes"]);
    assert_eq!(
        code(&out),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_error(&out, 3, "refused");
    human_error(&out);
    drop(dev);
    assert_eq!(before, sha256_file(&backing));
}

#[test]
fn exit_4_io() {
    // /proc does not let anyone create directories: a plain I/O failure.
    let out = livestick(&["man", "--dir", "/proc/livestick-test/man1"]);
    assert_eq!(
        code(&out),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    human_error(&out);
    // `man` takes no --json (it prints a fixed text): the JSON error of an
    // I/O failure comes from reading a file that fails every read.
    let out = livestick(&["--json", "overlay", "status", "/proc/self/mem"]);
    json_error(&out, 4, "io");
    assert!(!Path::new("/proc/livestick-test").exists());
}

#[test]
fn exit_5_partial_batch() {
    // One good image file and one impossible target (a directory).
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.img");
    let bad = dir.path().join("a-directory");
    std::fs::create_dir(&bad).unwrap();
    let out = livestick(&[
        "write",
        iso.to_str().unwrap(),
        good.to_str().unwrap(),
        bad.to_str().unwrap(),
        "--size",
        "256M",
        "--noverify",
    ]);
    assert_eq!(
        code(&out),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    human_error(&out);
    assert!(good.is_file());
    // The typed error behind it, as the batch writer returns it.
    let err = anyhow::Error::new(PartialBatchFailure {
        failed: 1,
        total: 3,
        details: vec!["b.img: pulled".into()],
    })
    .context("writing 3 sticks");
    assert_eq!(cli::error_kind(&err), ErrorKind::PartialBatch);
    assert_eq!(ErrorKind::PartialBatch.exit_code(), 5);
    assert!(
        err.root_cause()
            .to_string()
            .starts_with("1 of 3 targets failed")
    );
}

#[test]
fn error_kinds_have_distinct_codes_and_hints() {
    let kinds = [
        ErrorKind::Usage,
        ErrorKind::BadInput,
        ErrorKind::Refused,
        ErrorKind::Io,
        ErrorKind::PartialBatch,
    ];
    let codes: Vec<u8> = kinds.iter().map(|k| k.exit_code()).collect();
    assert_eq!(codes, [1, 2, 3, 4, 5]);
    assert!(kinds.iter().all(|k| !k.hint().is_empty()));
    let doc = std::fs::read_to_string(repo().join("docs/exit-codes.md")).unwrap();
    for (k, c) in kinds.iter().zip(codes) {
        let name = serde_json::to_value(k).unwrap();
        let name = name.as_str().unwrap();
        assert!(
            doc.contains(&format!("| {c} | `{name}` |")),
            "doc lacks code {c} ({name})"
        );
    }
}

/// Every command that changes something accepts --yes, so scripts can pass it
/// uniformly (the brief's own examples do).
#[test]
fn every_changing_command_accepts_yes() {
    use clap::Parser;
    for argv in [
        &["livestick", "write", "a.iso", "b.img", "--yes"][..],
        &["livestick", "overlay", "merge", "s.img", "--yes"],
        &["livestick", "overlay", "reset", "s.img", "--yes"],
        &[
            "livestick",
            "overlay",
            "recover",
            "s.img",
            "--repair",
            "--yes",
        ],
        &[
            "livestick",
            "overlay",
            "grow",
            "s.img",
            "--add-mb",
            "8",
            "--yes",
        ],
    ] {
        if let Err(e) = Cli::try_parse_from(argv) {
            panic!("{argv:?}: {e}");
        }
    }
}

/// A question nobody could answer (no terminal, no --yes) is a safety refusal,
/// recognised by its type wherever it is wrapped.
#[test]
fn missing_confirmation_is_a_refusal() {
    let err = anyhow::Error::new(livestick::error::NoConfirmation {
        question: "Erase /dev/sdz?".into(),
    })
    .context("writing /dev/sdz");
    assert_eq!(cli::error_kind(&err), ErrorKind::Refused);
    assert_eq!(cli::error_kind(&err).exit_code(), 3);
}

/// `livestick write ISO TARGET…` with file writes limited to `limit` bytes
/// (RLIMIT_FSIZE, SIGXFSZ ignored so the write fails with EFBIG instead of
/// killing the process): a full disk that needs no privileges.
fn write_with_file_limit(iso: &Path, target: &Path, extra: &[&str], limit: u64) -> Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(bin());
    cmd.arg("write").arg(iso).arg(target).args(extra);
    cmd.args(["--yes", "--quiet"]);
    // SAFETY: between fork and exec only async-signal-safe calls (signal,
    // setrlimit) on values owned by the closure.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().expect("livestick runs")
}

#[test]
fn a_failed_write_removes_the_image_it_created_and_never_an_existing_one() {
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tempfile::tempdir().unwrap();
    // A new image: it fails while the image is being sized and filled. The limit lets
    // the new filesystem be staged (a sparse file as long as the partition, which
    // starts 1 MiB into the image) but not the 1 GiB image be made.
    let limit = (1 << 30) - (512 << 10);
    let new = dir.path().join("new.img");
    let out = write_with_file_limit(&iso, &new, &["--size", "1G"], limit);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(
        !new.exists(),
        "the incomplete new image is removed: {stderr}"
    );
    assert!(stderr.contains("was removed"), "{stderr}");
    // An existing image that the same failure leaves incomplete stays.
    let existing = dir.path().join("existing.img");
    std::fs::File::create(&existing)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let out = write_with_file_limit(&iso, &existing, &[], limit);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("did not complete"),
        "{out:?}"
    );
    assert_eq!(std::fs::metadata(&existing).unwrap().len(), 1 << 30);
    // A real ENOSPC, on a small tmpfs (root only).
    if !require(is_root(), "root (mounting a tmpfs)") {
        return;
    }
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&small)
        .status()
        .is_ok_and(|s| s.success());
    if !require(mounted, "mounting a tmpfs") {
        return;
    }
    let target = small.join("full.img");
    let out = write_with_file_limit(&iso, &target, &["--size", "1G"], u64::MAX);
    let _ = Command::new("umount").arg(&small).status();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("No space left"), "{stderr}");
    assert!(stderr.contains("was removed"), "{stderr}");
}

/// livestick with a stdout whose reader is gone before it starts, as after
/// `livestick … | head -c1` once head has exited: every write to it fails.
fn with_closed_stdout(args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    Command::new(bin())
        .args(args)
        .stdout(writer)
        .output()
        .expect("livestick runs")
}

#[test]
fn a_closed_stdout_ends_a_command_that_changes_nothing_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let iso = synthetic_iso("fedora-classic.iso");
    for args in [
        &["inspect", iso.to_str().unwrap(), "--json"][..],
        &["inspect", iso.to_str().unwrap()],
        &["devices"],
        &["devices", "--all", "--json"],
        &["completions", "bash"],
    ] {
        let out = with_closed_stdout(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        // docs/exit-codes.md: 128 + SIGPIPE, as the shell reports it.
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGPIPE),
            "{args:?}: {:?} {stderr}",
            out.status
        );
    }
}

#[test]
fn permission_denied_is_bad_input_and_says_run_as_root() {
    use std::os::unix::fs::PermissionsExt;
    let iso = synthetic_iso("fedora-classic.iso");
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let closed = |path: &Path| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o000)).unwrap();
    };
    let target = dir.path().join("stick.img");
    std::fs::File::create(&target)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    closed(&target);
    let source = dir.path().join("source.iso");
    std::fs::copy(&iso, &source).unwrap();
    closed(&source);
    let new = dir.path().join("new.img");
    for args in [
        &[
            "write",
            iso.to_str().unwrap(),
            target.to_str().unwrap(),
            "--yes",
        ][..],
        &[
            "write",
            source.to_str().unwrap(),
            new.to_str().unwrap(),
            "--size",
            "1G",
            "--yes",
        ],
        &["inspect", source.to_str().unwrap()],
        &["home", "info", target.to_str().unwrap()],
    ] {
        let out = as_nobody(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(code(&out), Some(2), "{args:?}: {stderr}");
        human_error(&out);
        assert!(
            stderr.contains("as root") && stderr.contains("group with access"),
            "{args:?}: {stderr}"
        );
        let out = as_nobody(&[&["--json"][..], args].concat());
        json_error(&out, 2, "bad-input");
    }
    assert_eq!(std::fs::metadata(&target).unwrap().len(), 1 << 30);
    assert!(!new.exists());
}

#[test]
fn a_missing_file_is_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.img");
    let missing = missing.to_str().unwrap();
    let img = dir.path().join("s.img");
    for args in [
        &["inspect", missing][..],
        &["write", missing, img.to_str().unwrap(), "--size", "256M"],
        &["home", "info", missing],
        &["home", "resize", missing, "--size-mb", "100"],
    ] {
        let out = livestick(args);
        assert_eq!(
            code(&out),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        human_error(&out);
        let out = livestick(&[&["--json"][..], args].concat());
        json_error(&out, 2, "bad-input");
    }
    assert!(!img.exists());
}

/// A 1 GiB stick image written from the synthetic ISO, with an empty 64 MiB
/// overlay and a plain 32 MiB home: what the maintenance rows run on.
pub(crate) fn maintained_stick(dir: &Path) -> std::path::PathBuf {
    let iso = synthetic_iso("fedora-classic.iso");
    let stick = dir.join("stick.img");
    ok(&livestick(&[
        "write",
        iso.to_str().unwrap(),
        stick.to_str().unwrap(),
        "--size",
        "1G",
        "--overlay-size-mb",
        "64",
        "--home-size-mb",
        "32",
        "--unencrypted-home",
        "--yes",
        "--quiet",
        "--noverify",
    ]));
    stick
}

/// `args` exits with `expected`; an error also as the documented JSON object
/// (with `--json`) and as the human message with a hint.
fn exits_with(args: &[&str], expected: i32, kind: &str, env: &[(&str, &Path)]) {
    let run = |args: &[&str]| {
        let mut cmd = Command::new(bin());
        cmd.args(args);
        for (name, value) in env {
            cmd.env(name, value);
        }
        cmd.output().expect("livestick runs")
    };
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), Some(expected), "{args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    if expected == 0 {
        return;
    }
    let json = run(&[&["--json"][..], args].concat());
    if expected == 1 {
        // clap's own message; the JSON object is exit_1_usage's.
        assert_eq!(code(&json), Some(1), "{args:?}");
        return;
    }
    human_error(&out);
    json_error(&json, expected, kind);
}

/// docs/exit-codes.md, row by row for every command: each code a command can
/// produce without root (the refusals of devices are in safety.rs).
#[test]
fn every_command_exits_with_each_code_it_documents() {
    let dir = tmp();
    let iso = synthetic_iso("fedora-classic.iso");
    let iso = iso.to_str().unwrap();
    let stick = maintained_stick(dir.path());
    let stick = stick.to_str().unwrap();
    let missing = dir.path().join("missing.img");
    let missing = missing.to_str().unwrap();
    let new = dir.path().join("new.img");
    let new = new.to_str().unwrap();
    // Not an overlay, not a home: random bytes.
    let random = dir.path().join("random.img");
    fill_random(&random, 1 << 20);
    let random = random.to_str().unwrap();
    let empty = dir.path().join("empty.img");
    std::fs::File::create(&empty).unwrap();
    let empty = empty.to_str().unwrap();
    let none: &[(&str, &Path)] = &[];

    // 0: success (a dry run for what would change something).
    for args in [
        &["inspect", iso][..],
        &["devices"],
        &["iso-to-disk", "--help"],
        &["write", iso, new, "--size", "1G", "--dry-run"],
        &["overlay", "status", stick],
        &["overlay", "merge", stick, "--dry-run"],
        &["overlay", "reset", stick, "--dry-run"],
        &["overlay", "grow", stick, "--add-mb", "8", "--dry-run"],
        &["overlay", "recover", stick, "--dry-run"],
        &["home", "info", stick],
        &["home", "resize", stick, "--size-mb", "40", "--dry-run"],
        &["verify", stick],
        &["restore", stick, "--dry-run"],
    ] {
        exits_with(args, 0, "", none);
    }
    assert!(!Path::new(new).exists(), "a dry run creates nothing");

    // 1: usage, for every command.
    for command in [
        &["inspect"][..],
        &["devices"],
        &["iso-to-disk"],
        &["write"],
        &["overlay", "status"],
        &["overlay", "merge"],
        &["overlay", "reset"],
        &["overlay", "grow"],
        &["overlay", "recover"],
        &["home", "info"],
        &["home", "resize"],
        &["verify"],
        &["restore"],
    ] {
        exits_with(&[command, &["--bogus"]].concat(), 1, "usage", none);
    }

    // 2: bad input — a missing file for every command that reads one, and
    // what each maintenance command finds wrong with what it was given.
    for args in [
        &["inspect", missing][..],
        &["write", missing, new, "--size", "1G"],
        &["iso-to-disk", missing, new],
        &["overlay", "status", missing],
        &["overlay", "merge", missing, "--yes"],
        &["overlay", "reset", missing, "--yes"],
        &["overlay", "grow", missing, "--add-mb", "8"],
        &["overlay", "recover", missing],
        &["overlay", "status", random],
        &["overlay", "status", empty],
        &["overlay", "grow", random, "--add-mb", "8"],
        &["overlay", "reset", empty, "--yes"],
        &["overlay", "merge", random, "--yes"],
        &["overlay", "grow", stick, "--size-mb", "9999"],
        &["overlay", "merge", stick, "--squashfs", random],
        &["home", "info", missing],
        &["home", "info", random],
        &["home", "resize", missing, "--size-mb", "40"],
        &["home", "resize", stick, "--size-mb", "16"],
        &["home", "resize", stick, "--size-mb", "9999"],
        &["verify", missing],
        &["verify", random],
        &["restore", missing, "--yes"],
        &["restore", stick, "--label", "NOT A LABEL", "--yes"],
    ] {
        exits_with(args, 2, "bad-input", none);
    }
    assert!(!Path::new(new).exists());

    // 3: refused — a change nobody confirmed (no terminal, no --yes).
    exits_with(&["overlay", "reset", stick], 3, "refused", none);
    exits_with(&["restore", stick], 3, "refused", none);

    // 4: an external program that fails (a stand-in first on PATH).
    let tools = dir.path().join("failing-tools");
    for name in ["unsquashfs", "mksquashfs", "e2fsck", "resize2fs"] {
        stand_in(&tools, name, "#!/bin/sh\nexit 8\n");
    }
    let path = path_first(&tools);
    let failing: &[(&str, &Path)] = &[("PATH", Path::new(&path))];
    let workdir = dir.path().join("work");
    std::fs::create_dir(&workdir).unwrap();
    let workdir = workdir.to_str().unwrap();
    exits_with(
        &["overlay", "merge", stick, "--yes", "--workdir", workdir],
        4,
        "io",
        failing,
    );
    exits_with(
        &[
            "home",
            "resize",
            stick,
            "--size-mb",
            "40",
            "--workdir",
            workdir,
        ],
        4,
        "io",
        failing,
    );
    // verify: a listed file that is no longer what was written (here a boot menu
    // replaced with mtools). Its JSON is the report itself, with `exit_code`.
    let damaged = dir.path().join("damaged.img");
    std::fs::copy(stick, &damaged).unwrap();
    let menu = dir.path().join("grub.cfg");
    std::fs::write(&menu, "menuentry 'not what was written' {}\n").unwrap();
    fat_put(&damaged, part_start(&damaged), &menu, "EFI/BOOT/grub.cfg");
    let out = livestick(&["--json", "verify", damaged.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["exit_code"], 4);
    assert_eq!(report["overall"], "damaged");
    // restore: mkfs.exfat that fails (a stand-in first on PATH).
    stand_in(&tools, "mkfs.exfat", "#!/bin/sh\nexit 1\n");
    exits_with(
        &[
            "restore",
            damaged.to_str().unwrap(),
            "--fs",
            "exfat",
            "--yes",
        ],
        4,
        "io",
        failing,
    );
    // 5: see exit_5_partial_batch; 141: see the closed-stdout tests.
}

#[test]
fn a_closed_stdout_never_panics_a_command_that_changes_something() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tmp();
    let iso = synthetic_iso("fedora-classic.iso");
    let iso = iso.to_str().unwrap();
    let one = dir.path().join("one.img");
    let two = dir.path().join("two.img");
    let (one_s, two_s) = (one.to_str().unwrap(), two.to_str().unwrap());
    for args in [
        // The report after a complete stick.
        &[
            "write",
            iso,
            one_s,
            "--size",
            "1G",
            "--overlay-size-mb",
            "64",
            "--yes",
            "--noverify",
        ][..],
        // Batch events on stdout, from the worker threads.
        &[
            "--json",
            "write",
            iso,
            one_s,
            two_s,
            "--size",
            "1G",
            "--overlay-size-mb",
            "64",
            "--yes",
            "--noverify",
        ],
        &["overlay", "reset", one_s, "--yes"],
    ] {
        let out = with_closed_stdout(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        let status = out.status;
        // Changing commands finish their work and exit as it went; a command
        // that changes nothing may stop at once by SIGPIPE (141).
        assert!(
            status.code() == Some(0) || status.signal() == Some(libc::SIGPIPE),
            "{args:?}: {status:?} {stderr}"
        );
    }
    assert!(one.is_file() && two.is_file());
    // The sticks are complete: their overlay is there for status to read.
    let out = livestick(&["overlay", "status", two.to_str().unwrap()]);
    ok(&out);
}
