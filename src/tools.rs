//! The one registry of external programs livestick runs: the reference tools
//! for formats it does not own (syslinux, e2fsprogs, squashfs-tools, …), what
//! needs each, and which Debian and Fedora package installs it. Every module
//! that runs a program finds it through [`find_program`], so a missing one is
//! always reported the same way, and `livestick doctor` lists exactly
//! [`REGISTRY`] (a test checks that no module starts a program by a name of
//! its own). Decompression is not here: ISOs and initrds are unpacked by Rust
//! crates in process.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use thiserror::Error;

/// An external program and the packages that provide it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tool {
    /// The executable's file name.
    pub name: &'static str,
    /// What needs it, as `doctor` groups its report.
    pub feature: &'static str,
    /// Debian/Ubuntu package.
    pub debian: &'static str,
    /// Fedora package.
    pub fedora: &'static str,
    /// Needed by a plain `livestick write` (default options): missing means
    /// the basic write fails, so `doctor` reports it as MISSING.
    pub required: bool,
    /// Arguments that make it print its version, for `doctor`.
    pub version_args: &'static [&'static str],
}

/// A program livestick needs is not installed; names both packages.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "`{name}` is not installed; install the package `{debian}` (Debian/Ubuntu: apt install {debian}) or `{fedora}` (Fedora: dnf install {fedora})"
)]
pub struct ToolMissing {
    pub name: &'static str,
    pub debian: &'static str,
    pub fedora: &'static str,
}

impl crate::error::Classify for ToolMissing {
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::Io
    }
}

/// Feature names, shared by the entries so `doctor` groups them.
pub const BIOS: &str = "BIOS boot (write)";
pub const EXT4: &str = "home.img and OverlayFS overlays";
pub const SQUASH: &str = "inspect and overlay merge (squashfs)";
pub const FLAT_OVL: &str = "overlay merge of OverlayFS into a flat squashfs";
pub const EROFS: &str = "overlay merge of EROFS roots";
pub const LUKS: &str = "LUKS home checks (optional)";
pub const QEMU: &str = "boot tests (optional)";

/// An optional program (all but the BIOS installer and mtools are).
const fn optional(
    name: &'static str,
    feature: &'static str,
    debian: &'static str,
    fedora: &'static str,
    version_args: &'static [&'static str],
) -> Tool {
    Tool {
        name,
        feature,
        debian,
        fedora,
        required: false,
        version_args,
    }
}

const fn e2fsprogs(name: &'static str, version_args: &'static [&'static str]) -> Tool {
    optional(name, EXT4, "e2fsprogs", "e2fsprogs", version_args)
}

/// The mtools-based SYSLINUX installer (works on image files without root).
pub const SYSLINUX: Tool = Tool {
    name: "syslinux",
    feature: BIOS,
    debian: "syslinux",
    fedora: "syslinux",
    required: true,
    version_args: &["--version"],
};
/// The syslinux installer writes through mtools.
pub const MCOPY: Tool = Tool {
    name: "mcopy",
    feature: BIOS,
    debian: "mtools",
    fedora: "mtools",
    required: true,
    version_args: &["--version"],
};
pub const MKE2FS: Tool = e2fsprogs("mke2fs", &["-V"]);
pub const RESIZE2FS: Tool = e2fsprogs("resize2fs", &[]);
pub const E2FSCK: Tool = e2fsprogs("e2fsck", &["-V"]);
/// A new ext4 gets its journal checksum and a random first sequence through
/// debugfs; an OverlayFS overlay's upper tree is read through it for a merge.
pub const DEBUGFS: Tool = e2fsprogs("debugfs", &["-V"]);
/// A copied home is read by its block bitmaps through dumpe2fs.
pub const DUMPE2FS: Tool = e2fsprogs("dumpe2fs", &["-V"]);
pub const UNSQUASHFS: Tool = optional(
    "unsquashfs",
    SQUASH,
    "squashfs-tools",
    "squashfs-tools",
    &["-version"],
);
pub const MKSQUASHFS: Tool = optional(
    "mksquashfs",
    SQUASH,
    "squashfs-tools",
    "squashfs-tools",
    &["-version"],
);
/// squashfs-tools-ng: a squashfs turned into a tar stream and back, owners and
/// xattrs included, with no file system in between (so no root needed).
pub const SQFS2TAR: Tool = optional(
    "sqfs2tar",
    FLAT_OVL,
    "squashfs-tools-ng",
    "squashfs-tools-ng",
    &["--version"],
);
pub const TAR2SQFS: Tool = optional(
    "tar2sqfs",
    FLAT_OVL,
    "squashfs-tools-ng",
    "squashfs-tools-ng",
    &["--version"],
);
pub const MKFS_EROFS: Tool = optional("mkfs.erofs", EROFS, "erofs-utils", "erofs-utils", &["-V"]);
pub const FSCK_EROFS: Tool = optional("fsck.erofs", EROFS, "erofs-utils", "erofs-utils", &["-V"]);
/// Without root, extract, apply and mkfs.erofs run under fakeroot, which keeps
/// owners, device nodes and xattrs for the new image.
pub const FAKEROOT: Tool = optional("fakeroot", EROFS, "fakeroot", "fakeroot", &["--version"]);
/// Only the test suite runs it (livestick's LUKS is its own code); listed so
/// a developer sees what the LUKS checks need.
pub const CRYPTSETUP: Tool = optional(
    "cryptsetup",
    LUKS,
    "cryptsetup-bin",
    "cryptsetup",
    &["--version"],
);
/// Only the boot tests run it.
pub const QEMU_X86_64: Tool = optional(
    "qemu-system-x86_64",
    QEMU,
    "qemu-system-x86",
    "qemu-system-x86-core",
    &["--version"],
);

/// Every external program, in the order `doctor` reports them (grouped by
/// feature).
pub const REGISTRY: &[Tool] = &[
    SYSLINUX,
    MCOPY,
    MKE2FS,
    RESIZE2FS,
    E2FSCK,
    DEBUGFS,
    DUMPE2FS,
    UNSQUASHFS,
    MKSQUASHFS,
    SQFS2TAR,
    TAR2SQFS,
    MKFS_EROFS,
    FSCK_EROFS,
    FAKEROOT,
    CRYPTSETUP,
    QEMU_X86_64,
];

impl Tool {
    /// The error for this program being absent.
    pub fn missing(&self) -> ToolMissing {
        ToolMissing {
            name: self.name,
            debian: self.debian,
            fedora: self.fedora,
        }
    }
}

/// Finds `tool` on PATH, then in the sbin directories, which an ordinary
/// user's PATH often lacks on Debian although the tools run fine from there.
/// PATH comes first so a test (or a user) can put a stand-in before the real
/// program.
pub fn find_program(tool: &Tool) -> Result<PathBuf, ToolMissing> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(tool.name))
        .find(|p| is_executable(p))
        .ok_or_else(|| tool.missing())
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

// What `livestick doctor` checks: the registry, and the files and services
// some features need besides their programs.

/// One thing to look for: a program of [`REGISTRY`], or a file or
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
            feature: BIOS,
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
            feature: BIOS,
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
            feature: QEMU,
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
    let mut all: Vec<Need> = REGISTRY
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

/// The shape version of the `doctor --json` document (docs/json-maintenance.md,
/// `schemas/doctor.schema.json`).
pub const SCHEMA_VERSION: u64 = 1;

#[derive(Debug, Serialize)]
pub struct Report {
    /// [`SCHEMA_VERSION`]: scripts check it before reading the rest.
    pub schema: u64,
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
            let path = find_program(tool).ok();
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

/// What `livestick doctor` reports: every program of [`REGISTRY`] and every
/// other need, found or not, with its packages.
pub fn report() -> Report {
    let checks: Vec<Finding> = needs().iter().map(check).collect();
    Report {
        schema: SCHEMA_VERSION,
        livestick: env!("CARGO_PKG_VERSION"),
        ok: checks.iter().all(|c| c.found || !c.required),
        checks,
    }
}

/// `livestick doctor`'s text: each feature as a heading over its checks, each
/// missing one with the packages that bring it, then whether `write` can run.
impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut feature = "";
        for c in &self.checks {
            if c.feature != feature {
                feature = c.feature;
                writeln!(f, "{feature}")?;
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
            writeln!(f, "  {mark:<7} {:<20} {detail}", c.name)?;
            if let Some(note) = &c.note {
                writeln!(f, "          {note}")?;
            }
        }
        writeln!(f)?;
        if self.ok {
            writeln!(
                f,
                "livestick write can run; features marked -- are unavailable until their package is installed."
            )
        } else {
            writeln!(
                f,
                "livestick write cannot run until the MISSING items are installed."
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(feature: &'static str, name: &'static str, required: bool) -> Finding {
        Finding {
            feature,
            name,
            kind: "program",
            required,
            found: false,
            path: None,
            version: None,
            debian: "deb-pkg",
            fedora: "rpm-pkg",
            note: None,
        }
    }

    #[test]
    fn the_doctor_text_heads_each_feature_and_names_packages() {
        let mut found = finding("write", "mkfs.ext4", true);
        found.found = true;
        found.path = Some(PathBuf::from("/usr/sbin/mkfs.ext4"));
        found.version = Some("mke2fs 1.47.0".into());
        let mut bare = finding("write", "syslinux", true);
        bare.found = true;
        bare.path = Some(PathBuf::from("/usr/bin/syslinux"));
        let mut service = finding("devices", "udev", false);
        service.note = Some("no udev here".into());
        let report = Report {
            schema: SCHEMA_VERSION,
            livestick: "0.0.0",
            ok: true,
            checks: vec![found, bare, service],
        };
        assert_eq!(
            report.to_string(),
            "write\n\
             \x20 ok      mkfs.ext4            /usr/sbin/mkfs.ext4  (mke2fs 1.47.0)\n\
             \x20 ok      syslinux             /usr/bin/syslinux\n\
             devices\n\
             \x20 --      udev                 not found — Debian/Ubuntu: apt install deb-pkg; Fedora: dnf install rpm-pkg\n\
             \x20         no udev here\n\
             \n\
             livestick write can run; features marked -- are unavailable until their package is installed.\n"
        );
        let missing = Report {
            schema: SCHEMA_VERSION,
            livestick: "0.0.0",
            ok: false,
            checks: vec![finding("write", "mkfs.ext4", true)],
        };
        let text = missing.to_string();
        assert!(text.contains("  MISSING mkfs.ext4 "), "{text}");
        assert!(
            text.ends_with("\nlivestick write cannot run until the MISSING items are installed.\n"),
            "{text}"
        );
    }

    #[test]
    fn every_program_names_both_packages() {
        for t in REGISTRY {
            assert!(!t.name.is_empty() && !t.name.contains('/'), "{t:?}");
            assert!(!t.feature.is_empty(), "{t:?}");
            assert!(!t.debian.trim().is_empty(), "{t:?} lacks a Debian package");
            assert!(!t.fedora.trim().is_empty(), "{t:?} lacks a Fedora package");
            assert!(
                !t.debian.contains(char::is_whitespace) && !t.fedora.contains(char::is_whitespace),
                "one package name each: {t:?}"
            );
        }
    }

    #[test]
    fn one_entry_per_program_grouped_by_feature() {
        for (i, t) in REGISTRY.iter().enumerate() {
            assert!(
                REGISTRY[i + 1..].iter().all(|u| u.name != t.name),
                "{} twice",
                t.name
            );
            // doctor prints a feature heading when the feature changes, so a
            // feature must not come back after another one.
            if i > 0 && REGISTRY[i - 1].feature != t.feature {
                assert!(
                    REGISTRY[..i].iter().all(|u| u.feature != t.feature),
                    "{} is apart from the rest of {:?}",
                    t.name,
                    t.feature
                );
            }
        }
    }

    #[test]
    fn only_the_bios_tools_are_required_for_write() {
        let required: Vec<&str> = REGISTRY
            .iter()
            .filter(|t| t.required)
            .map(|t| t.name)
            .collect();
        assert_eq!(required, ["syslinux", "mcopy"]);
    }

    /// The `src/` files, with the part of each before its unit tests.
    fn library_sources() -> Vec<(std::path::PathBuf, String)> {
        fn walk(dir: &Path, out: &mut Vec<(std::path::PathBuf, String)>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, out);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
                    out.push((path, code.to_string()));
                }
            }
        }
        let mut out = Vec::new();
        walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut out);
        assert!(out.len() > 50, "src/ not found");
        out
    }

    #[test]
    fn every_program_livestick_starts_comes_from_the_registry() {
        // A program started by a literal name would escape both `doctor` and
        // the missing-program message; its path must come from find_program
        // (or be livestick itself, for the fakeroot step).
        for (path, code) in library_sources() {
            for (n, line) in code.lines().enumerate() {
                for call in [
                    "Command::new(\"",
                    "Command::new(&\"",
                    "process::Command::new(\"",
                ] {
                    assert!(
                        !line.contains(call),
                        "{}:{}: starts a program by name; add it to tools::REGISTRY and use find_program: {line}",
                        path.display(),
                        n + 1
                    );
                }
            }
        }
        // Every Tool constant defined here is in the registry doctor lists.
        let here =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/tools.rs"))
                .unwrap();
        let registry = here
            .split_once("pub const REGISTRY: &[Tool] = &[")
            .and_then(|(_, rest)| rest.split_once("];"))
            .map(|(list, _)| list)
            .expect("the REGISTRY list");
        let mut constants = 0;
        for line in here.lines() {
            if let Some(rest) = line.strip_prefix("pub const ")
                && let Some((name, ty)) = rest.split_once(':')
                && ty.trim_start().starts_with("Tool ")
            {
                constants += 1;
                assert!(
                    registry.contains(&format!("    {name},")),
                    "{name} is not in REGISTRY"
                );
            }
        }
        assert_eq!(constants, REGISTRY.len());
    }

    #[test]
    fn a_missing_program_names_it_and_both_packages() {
        let t = Tool {
            name: "livestick-no-such-tool",
            feature: "tests",
            debian: "pkg-deb",
            fedora: "pkg-fed",
            required: false,
            version_args: &[],
        };
        let e = find_program(&t).unwrap_err();
        assert_eq!(e, t.missing());
        let text = e.to_string();
        for part in [
            "livestick-no-such-tool",
            "apt install pkg-deb",
            "dnf install pkg-fed",
        ] {
            assert!(text.contains(part), "{part} not in: {text}");
        }
    }

    #[test]
    fn finds_an_installed_program() {
        // sh is on every system the tests run on; the entry is made up so the
        // test does not depend on which registered tools are installed.
        let sh = Tool {
            name: "sh",
            feature: "tests",
            debian: "dash",
            fedora: "bash",
            required: false,
            version_args: &[],
        };
        let p = find_program(&sh).expect("sh");
        assert!(p.ends_with("sh") && is_executable(&p), "{}", p.display());
    }

    #[test]
    fn doctor_checks_every_registered_program_with_its_feature_in_one_run() {
        let needs = needs();
        for t in REGISTRY {
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
