//! `livestick doctor`: which external programs each feature needs, whether
//! they are here (path and version), and which Debian and Fedora package
//! provides each. livestick itself is user space only; these programs are the
//! reference implementations of formats it does not own (DESIGN.md).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::cli::DoctorArgs;
use crate::tools::{self, Tool};

/// One thing to look for: a program of [`tools::REGISTRY`], or a file or
/// service some feature needs besides its programs.
struct Need {
    feature: &'static str,
    /// Needed by `livestick write` with default options: missing means the
    /// basic write fails.
    required: bool,
    what: What,
    debian: &'static str,
    fedora: &'static str,
}

enum What {
    Program(Tool),
    /// Any one of these files.
    File {
        name: &'static str,
        candidates: &'static [&'static str],
    },
    /// A running service, found by its socket or directory.
    Service {
        name: &'static str,
        probe: &'static str,
    },
}

const DEVICES: &str = "device discovery";

/// What doctor checks besides programs. Each is reported next to the programs
/// of its feature.
fn other_needs() -> Vec<Need> {
    vec![
        Need {
            feature: tools::BIOS,
            required: true,
            what: What::File {
                name: "SYSLINUX mbr.bin",
                candidates: &[
                    "/usr/lib/syslinux/mbr/mbr.bin",
                    "/usr/share/syslinux/mbr.bin",
                    "/usr/lib/syslinux/mbr.bin",
                ],
            },
            debian: "syslinux-common",
            fedora: "syslinux-nonlinux",
        },
        Need {
            feature: tools::BIOS,
            required: true,
            what: What::File {
                name: "SYSLINUX menu.c32",
                candidates: &[
                    "/usr/lib/syslinux/modules/bios/menu.c32",
                    "/usr/share/syslinux/menu.c32",
                    "/usr/lib/syslinux/bios/menu.c32",
                ],
            },
            debian: "syslinux-common",
            fedora: "syslinux-nonlinux",
        },
        Need {
            feature: tools::QEMU,
            required: false,
            what: What::File {
                name: "OVMF UEFI firmware",
                candidates: &[
                    "/usr/share/OVMF/OVMF_CODE_4M.fd",
                    "/usr/share/OVMF/OVMF_CODE.fd",
                    "/usr/share/edk2/ovmf/OVMF_CODE.fd",
                    "/usr/share/edk2/x64/OVMF_CODE.fd",
                ],
            },
            debian: "ovmf",
            fedora: "edk2-ovmf",
        },
        Need {
            feature: DEVICES,
            required: false,
            what: What::Service {
                name: "udev",
                probe: "/run/udev/control",
            },
            debian: "udev",
            fedora: "systemd-udev",
        },
    ]
}

/// Every program of the registry, with the other needs placed after the last
/// entry of their feature (the report prints a heading when the feature
/// changes, so a feature must stay in one run).
fn needs() -> Vec<Need> {
    let mut all: Vec<Need> = tools::REGISTRY
        .iter()
        .map(|t| Need {
            feature: t.feature,
            required: t.required,
            what: What::Program(*t),
            debian: t.debian,
            fedora: t.fedora,
        })
        .collect();
    for need in other_needs() {
        match all.iter().rposition(|n| n.feature == need.feature) {
            Some(i) => all.insert(i + 1, need),
            None => all.push(need),
        }
    }
    all
}

#[derive(Debug, Serialize)]
pub struct Finding {
    pub feature: &'static str,
    pub name: &'static str,
    pub kind: &'static str,
    pub required: bool,
    pub found: bool,
    pub path: Option<PathBuf>,
    pub version: Option<String>,
    pub debian: &'static str,
    pub fedora: &'static str,
    pub note: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub livestick: &'static str,
    /// Every required item was found: `livestick write` can run.
    pub ok: bool,
    pub checks: Vec<Finding>,
}

/// The first non-empty line the program prints about itself. A program that
/// hangs is killed after a few seconds: doctor must always finish.
fn version_of(path: &Path, args: &[&str]) -> Option<String> {
    let mut child = Command::new(path)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
    let mut text = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut text);
    }
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut text);
    }
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.to_ascii_lowercase().starts_with("usage"))
        .map(|l| l.chars().take(100).collect())
}

fn check(need: &Need) -> Finding {
    let (name, kind, path, version, note) = match &need.what {
        What::Program(tool) => {
            let path = tools::find_program(tool).ok();
            let version = path
                .as_deref()
                .and_then(|p| version_of(p, tool.version_args));
            (tool.name, "program", path, version, None)
        }
        What::File { name, candidates } => {
            let path = candidates.iter().map(PathBuf::from).find(|p| p.is_file());
            (*name, "file", path, None, None)
        }
        What::Service { name, probe } => {
            let path = Some(PathBuf::from(probe)).filter(|p| p.exists());
            let note = path.is_none().then(|| {
                "no udev: running in a container? devices are then read from sysfs only".to_string()
            });
            (*name, "service", path, None, note)
        }
    };
    Finding {
        feature: need.feature,
        name,
        kind,
        required: need.required,
        found: path.is_some(),
        path,
        version,
        debian: need.debian,
        fedora: need.fedora,
        note,
    }
}

pub fn report() -> Report {
    let checks: Vec<Finding> = needs().iter().map(check).collect();
    Report {
        livestick: env!("CARGO_PKG_VERSION"),
        ok: checks.iter().all(|c| c.found || !c.required),
        checks,
    }
}

pub fn run(_args: &DoctorArgs, json: bool) -> anyhow::Result<()> {
    let report = report();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let mut feature = "";
    for c in &report.checks {
        if c.feature != feature {
            feature = c.feature;
            println!("{feature}");
        }
        let mark = if c.found {
            "ok  "
        } else if c.required {
            "MISSING"
        } else {
            "--  "
        };
        let detail = match (&c.path, &c.version) {
            (Some(p), Some(v)) => format!("{}  ({v})", p.display()),
            (Some(p), None) => p.display().to_string(),
            (None, _) => format!(
                "not found — Debian/Ubuntu: apt install {}; Fedora: dnf install {}",
                c.debian, c.fedora
            ),
        };
        println!("  {mark:<7} {:<20} {detail}", c.name);
        if let Some(note) = &c.note {
            println!("          {note}");
        }
    }
    println!();
    if report.ok {
        println!(
            "livestick write can run; features marked -- are unavailable until their package is installed."
        );
    } else {
        println!("livestick write cannot run until the MISSING items are installed.");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doctor_checks_every_registered_program_with_its_feature_in_one_run() {
        let needs = needs();
        for t in tools::REGISTRY {
            assert!(
                needs
                    .iter()
                    .any(|n| matches!(&n.what, What::Program(p) if p == t)),
                "doctor does not check {}",
                t.name
            );
        }
        // One heading per feature: once left, a feature never comes back.
        for i in 1..needs.len() {
            if needs[i - 1].feature != needs[i].feature {
                assert!(
                    needs[..i].iter().all(|n| n.feature != needs[i].feature),
                    "{:?} is split",
                    needs[i].feature
                );
            }
        }
        assert!(
            needs
                .iter()
                .all(|n| !n.debian.is_empty() && !n.fedora.is_empty())
        );
    }
}
