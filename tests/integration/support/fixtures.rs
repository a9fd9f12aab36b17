//! Fixture ISOs for the integration tests, built once and cached.
//!
//! * [`synthetic_iso`]: `fedora-classic.iso`, `fedora-grub.iso`,
//!   `fedora42.iso` from `fixtures/build-iso.sh` (no root, ~2 s).
//! * [`boot_iso`]: `boot-classic.iso`, `boot-grub.iso`, `boot-flat.iso`
//!   from `fixtures/build-boot-iso.sh` (root for dracut, ~35 s).
//!
//! Both land in `fixtures/out/` (gitignored). The scripts keep their own
//! cache stamps (a hash of the builder), so each script runs once per test
//! process and is quick when nothing changed. Builds are serialised across
//! processes (two `cargo test` runs at once) with `flock`
//! on `fixtures/out/.lock`. When tools are missing the panic says which
//! `apt-get install` line to run; [`try_boot_iso`] reports that as
//! [`FixtureError::Unavailable`] instead, for tests that may skip.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use super::repo;

/// The ISOs `fixtures/build-iso.sh` makes.
pub const SYNTHETIC_ISOS: [&str; 3] = ["fedora-classic.iso", "fedora-grub.iso", "fedora42.iso"];
/// The ISOs `fixtures/build-boot-iso.sh` makes.
pub const BOOT_ISOS: [&str; 6] = [
    "boot-classic.iso",
    "boot-grub.iso",
    "boot-flat.iso",
    "boot-ng.iso",
    "boot-ng-nested.iso",
    "boot-sb.iso",
];

/// Why a fixture could not be built.
#[derive(Clone, Debug)]
pub enum FixtureError {
    /// A prerequisite is missing (tools, root): the message says how to fix it.
    Unavailable(String),
    /// The builder ran and failed.
    Failed(String),
}

impl fmt::Display for FixtureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FixtureError::Unavailable(m) => write!(f, "fixture prerequisites missing: {m}"),
            FixtureError::Failed(m) => write!(f, "fixture build failed: {m}"),
        }
    }
}

/// `fixtures/out/`, created on demand.
pub fn out_dir() -> PathBuf {
    let out = repo().join("fixtures/out");
    std::fs::create_dir_all(&out).expect("create fixtures/out");
    out
}

/// Path of a synthetic ISO (`fedora-classic`, `fedora-grub`, `fedora42`; the
/// `.iso` suffix is optional), building the set first if needed.
pub fn synthetic_iso(name: &str) -> PathBuf {
    let file = iso_file_name(name, &SYNTHETIC_ISOS);
    match build("build-iso.sh") {
        Ok(()) => out_dir().join(file),
        Err(e) => panic!("{e}"),
    }
}

/// Path of a bootable ISO (`boot-classic`, `boot-grub`, `boot-flat`; `.iso`
/// optional), building the set first if needed. Panics when it cannot.
pub fn boot_iso(name: &str) -> PathBuf {
    match try_boot_iso(name) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

/// Like [`boot_iso`], but hands back the error so a test can skip.
pub fn try_boot_iso(name: &str) -> Result<PathBuf, FixtureError> {
    let file = iso_file_name(name, &BOOT_ISOS);
    build("build-boot-iso.sh")?;
    Ok(out_dir().join(file))
}

/// The `MANIFEST` the synthetic builder writes: ISO name → sha256.
pub fn synthetic_manifest() -> HashMap<String, String> {
    synthetic_iso(SYNTHETIC_ISOS[0]);
    let text =
        std::fs::read_to_string(out_dir().join("MANIFEST")).expect("read fixtures/out/MANIFEST");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.to_string()))
        })
        .collect()
}

fn iso_file_name(name: &str, known: &[&str]) -> String {
    let file = if name.ends_with(".iso") {
        name.to_string()
    } else {
        format!("{name}.iso")
    };
    assert!(
        known.contains(&file.as_str()),
        "unknown fixture ISO {name:?}; known: {known:?}"
    );
    file
}

/// Runs a builder script once per process (and under the cross-process lock).
fn build(script: &str) -> Result<(), FixtureError> {
    static DONE: OnceLock<Mutex<HashMap<String, Result<(), FixtureError>>>> = OnceLock::new();
    let done = DONE.get_or_init(|| Mutex::new(HashMap::new()));
    // Held for the whole build: threads of one test binary wait for it too.
    let mut done = done.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(r) = done.get(script) {
        return r.clone();
    }
    let r = build_locked(script);
    done.insert(script.to_string(), r.clone());
    r
}

fn build_locked(script: &str) -> Result<(), FixtureError> {
    let out = out_dir();
    let lock = File::create(out.join(".lock")).expect("create fixtures/out/.lock");
    // flock(2): another test process (a second `cargo test`) waits for this build.
    lock.lock().expect("lock fixtures/out/.lock");
    let path = repo().join("fixtures").join(script);
    let res = run_builder(&path, &out);
    drop(lock);
    res
}

fn run_builder(script: &Path, out: &Path) -> Result<(), FixtureError> {
    let output = match Command::new("bash").arg(script).arg(out).output() {
        Ok(o) => o,
        Err(e) => return Err(FixtureError::Unavailable(format!("cannot run bash: {e}"))),
    };
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    match output.status.code() {
        Some(0) => Ok(()),
        // build-*.sh: 3 = tools missing (stderr has the apt-get line), 4 = not root.
        Some(3) | Some(4) => Err(FixtureError::Unavailable(format!(
            "{}: {}",
            script.display(),
            stderr.trim()
        ))),
        _ => Err(FixtureError::Failed(format!(
            "{} {} exited with {}:\n{}{}",
            script.display(),
            out.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            stderr
        ))),
    }
}
