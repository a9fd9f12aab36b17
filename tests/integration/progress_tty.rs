//! Progress as people see it: under a pseudo-terminal (`script`), one bar per
//! phase, each drawn only once its total is known, no frame mixing two phases,
//! no note outliving its phase; off a terminal one line per phase; `--quiet`
//! nothing.

use std::path::Path;
use std::process::Command;

use crate::support::*;

/// One drawn bar: its phase, bytes done and total, and the rest of the line.
#[derive(Debug)]
struct Frame {
    phase: String,
    done: f64,
    total: f64,
    rest: String,
}

/// Drops terminal escape sequences (`ESC [ … letter`).
fn strip_escapes(raw: &str) -> String {
    let mut out = String::new();
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            out.push('\n');
            continue;
        }
        out.push(c);
    }
    out
}

/// indicatif's binary byte counts: "0 B", "512 B", "12.00 MiB".
fn bytes(text: &str) -> Option<f64> {
    let (number, unit) = text.trim().split_once(' ')?;
    let scale = match unit {
        "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some(number.parse::<f64>().ok()? * scale)
}

fn frames(raw: &str) -> Vec<Frame> {
    let text = strip_escapes(raw);
    let mut out = Vec::new();
    for piece in text.split(['\r', '\n']) {
        let Some((phase, after)) = piece.split_once(" [") else {
            continue;
        };
        let Some((_, counts)) = after.split_once("] ") else {
            continue;
        };
        let Some((done, rest)) = counts.split_once('/') else {
            continue;
        };
        // "<n> <unit> <rate> ETA …": the total is the first two words.
        let mut words = rest.split_whitespace();
        let (Some(n), Some(unit)) = (words.next(), words.next()) else {
            continue;
        };
        let (Some(done), Some(total)) = (bytes(done), bytes(&format!("{n} {unit}"))) else {
            continue;
        };
        out.push(Frame {
            phase: phase.trim().rsplit(' ').next().unwrap_or("").to_string(),
            done,
            total,
            rest: words.collect::<Vec<_>>().join(" "),
        });
    }
    out
}

fn under_pty(args: &[&str], log: &Path) -> String {
    let mut line = shell_quote(&bin().to_string_lossy());
    for a in args {
        line.push(' ');
        line.push_str(&shell_quote(a));
    }
    let out = checked(Command::new("script").args(["-qec", &line]).arg(log));
    assert!(out.status.success());
    std::fs::read_to_string(log).unwrap()
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[test]
fn a_terminal_sees_one_true_bar_per_phase() {
    if !require(have("script"), "script (util-linux) for a pseudo-terminal") {
        return;
    }
    let dir = tmp();
    let iso = synthetic_iso("fedora-classic.iso");
    let image = dir.path().join("stick.img");
    let log = dir.path().join("screen.log");
    let raw = under_pty(
        &[
            "write",
            iso.to_str().unwrap(),
            image.to_str().unwrap(),
            "--size",
            "256M",
            "--overlay-size-mb",
            "64",
            "--yes",
        ],
        &log,
    );
    let frames = frames(&raw);
    assert!(!frames.is_empty(), "no bar was drawn:\n{raw}");
    for f in &frames {
        assert!(f.total > 0.0, "a bar was drawn before its total: {f:?}");
        assert!(
            f.done <= f.total,
            "a bar shows more done than its total (a count from another phase): {f:?}"
        );
        if f.phase != "write" {
            assert!(
                !f.rest.contains("installing SYSLINUX"),
                "a note outlived its phase: {f:?}"
            );
        }
    }
    // Phases appear in order, each once.
    let mut order: Vec<&str> = Vec::new();
    for f in &frames {
        if order.last() != Some(&f.phase.as_str()) {
            order.push(&f.phase);
        }
    }
    // What is written is read back while it is written; a verify bar is drawn only
    // for bytes left to read back after that (none here: on a new stick SYSLINUX is
    // in the staged filesystem, written and read back with the rest).
    assert!(
        order == ["md5", "write"] || order == ["md5", "write", "verify"],
        "{frames:?}"
    );
    // The report follows the cleared bars.
    assert!(raw.contains("read back and verified"), "{raw}");
}

#[test]
fn a_log_gets_one_line_per_phase_and_quiet_gets_none() {
    let dir = tmp();
    let iso = synthetic_iso("fedora-classic.iso");
    let image = dir.path().join("stick.img");
    let args = [
        "write",
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--size",
        "256M",
        "--yes",
    ];
    let out = livestick(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains('\r') && !stderr.contains('\x1b'),
        "terminal control codes in a log: {stderr:?}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    let at = |what: &str| {
        lines
            .iter()
            .position(|l| l.contains(what))
            .unwrap_or_else(|| panic!("no line for {what:?} in:\n{stderr}"))
    };
    let (md5, write, verify) = (
        at("checking the ISO's implanted MD5 ("),
        at(": writing ("),
        at("reading back what was written ("),
    );
    assert!(md5 < write && write < verify, "{stderr}");
    assert!(
        lines[write].starts_with(image.to_str().unwrap()),
        "a line names its device: {stderr}"
    );

    let quiet = livestick(&[&["--quiet"][..], &args[..]].concat());
    let stderr = String::from_utf8_lossy(&quiet.stderr);
    assert!(quiet.status.success(), "{stderr}");
    assert!(
        !stderr.contains("writing ("),
        "--quiet printed progress: {stderr}"
    );
}
