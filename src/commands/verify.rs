//! `livestick verify STICK [--iso ISO] [--deep]`: is the stick still what livestick
//! wrote? Every file the manifest lists is read back from the device (page cache
//! dropped first) and hashed; persistence is reported, not hashed. The library side
//! is `manifest` (reading, checking); this module prints.

use std::io::IsTerminal;

use serde::Serialize;

use crate::cli::verify::VerifyArgs;
use crate::manifest::{self, BootCheck, FileCheck, FileState, IsoCheck, NotIntact, PersistCheck};
use crate::progress::{Progress, ProgressMode};
use crate::size::human;

/// The version of `verify --json`'s shape (docs/json.md, schemas/verify.schema.json).
const VERIFY_SCHEMA: u32 = 1;

#[derive(Serialize)]
struct VerifyReport<'a> {
    schema: u32,
    target: String,
    manifest: &'a str,
    written_by: &'a str,
    updated_at: &'a str,
    #[serde(serialize_with = "images_json")]
    images: &'a [manifest::ImageRecord],
    /// `intact` when every listed file and every check passed, else `damaged`.
    overall: &'static str,
    /// The exit code the command ends with (docs/exit-codes.md).
    exit_code: u8,
    intact: usize,
    changed: usize,
    missing: usize,
    files: &'a [FileCheck],
    /// The MBR boot code and the partition boot sector, read back; null when the
    /// manifest records none (UEFI only, or written by an older livestick).
    boot: Option<&'a [BootCheck]>,
    persistence: &'a [PersistCheck],
    /// `--iso`'s findings; null without `--iso`.
    iso: Option<&'a IsoCheck>,
}

/// The manifest's image records in the report's words (`size_bytes`): the
/// manifest on the stick keeps its own stored shape.
fn images_json<S: serde::Serializer>(
    images: &&[manifest::ImageRecord],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let views: Vec<serde_json::Value> = images
        .iter()
        .map(|image| {
            let source = &image.source;
            serde_json::json!({
                "live_dir": image.live_dir,
                "source": {
                    "name": source.name,
                    "size_bytes": source.size,
                    "sha256": source.sha256,
                    "implanted_md5": source.implanted_md5,
                    "label": source.label,
                },
                "written_at": image.written_at,
            })
        })
        .collect();
    views.serialize(serializer)
}

pub fn run(a: &VerifyArgs, json: bool, quiet: bool) -> anyhow::Result<()> {
    let passphrase = deep_passphrase(a)?;
    // Opened once, through the safety checks of a change when they pass (verify
    // repairs a stopped replacement first), read-only otherwise.
    let _opened = crate::disk::target::open_target(&a.target, crate::disk::target::Use::Look)?;
    for line in manifest::repair_before_verify(&a.target) {
        eprintln!("livestick verify: repaired: {line}");
    }
    let mut v = manifest::open_for_verify(&a.target)?;
    let show = a.target.display().to_string();
    let mode = if json {
        ProgressMode::Json
    } else if quiet || !std::io::stderr().is_terminal() {
        ProgressMode::Quiet
    } else {
        ProgressMode::Bar
    };
    let progress = Progress::new(mode, show.clone());
    let total: u64 = v.manifest.files.iter().map(|f| f.size).sum();
    progress.phase("verify", total);
    let files = v.check_files(|n| progress.inc(n))?;
    let boot = v.check_boot()?;
    let persistence = v.check_persistence(a.deep, passphrase.as_deref().map(|p| &p[..]))?;
    let iso = match &a.iso {
        Some(iso) => {
            let size = std::fs::metadata(iso).map(|m| m.len()).unwrap_or(0);
            progress.phase("iso", size);
            Some(manifest::check_iso(&v.manifest, None, iso, |n| {
                progress.inc(n)
            })?)
        }
        None => None,
    };
    progress.finish();
    let count = |state: FileState| files.iter().filter(|f| f.state == state).count();
    let (intact, changed, missing) = (
        count(FileState::Intact),
        count(FileState::Changed),
        count(FileState::Missing),
    );
    let persist_bad = persistence.iter().filter(|p| !p.ok).count();
    let iso_bad = iso.as_ref().is_some_and(|i| !i.ok());
    let boot_bad: Vec<&str> = boot
        .iter()
        .flatten()
        .filter(|b| b.state != FileState::Intact)
        .map(|b| b.area.as_str())
        .collect();
    let all_good =
        changed == 0 && missing == 0 && persist_bad == 0 && !iso_bad && boot_bad.is_empty();
    let report = VerifyReport {
        schema: VERIFY_SCHEMA,
        target: show.clone(),
        manifest: &v.manifest_path,
        written_by: &v.manifest.livestick_version,
        updated_at: &v.manifest.updated_at,
        images: &v.manifest.images,
        overall: if all_good { "intact" } else { "damaged" },
        exit_code: if all_good {
            0
        } else {
            crate::error::ErrorKind::Io.exit_code()
        },
        intact,
        changed,
        missing,
        files: &files,
        boot: boot.as_deref(),
        persistence: &persistence,
        iso: iso.as_ref(),
    };
    if json {
        crate::outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    if all_good {
        return Ok(());
    }
    let mut parts = Vec::new();
    if changed + missing > 0 {
        parts.push(format!(
            "{changed} file{} changed and {missing} missing of {} written",
            if changed == 1 { "" } else { "s" },
            files.len()
        ));
    }
    if !boot_bad.is_empty() {
        parts.push(format!("the {} changed", boot_bad.join(" and the ")));
    }
    if persist_bad > 0 {
        parts.push(format!(
            "{persist_bad} persistence file{} with problems",
            if persist_bad == 1 { "" } else { "s" }
        ));
    }
    if iso_bad {
        parts.push("the ISO does not match the record".into());
    }
    Err(NotIntact {
        stick: show,
        summary: parts.join("; "),
    }
    .into())
}

/// The passphrase of an encrypted home, read before the stick is opened: only
/// `--deep` unlocks a home, so a passphrase without it is a mistake said at once.
fn deep_passphrase(a: &VerifyArgs) -> anyhow::Result<Option<zeroize::Zeroizing<Vec<u8>>>> {
    use crate::persist::home::{self, PassphraseSource};
    let source = match (&a.pass.passphrase_file, a.pass.passphrase_stdin) {
        (Some(file), _) => PassphraseSource::File(file.clone()),
        (None, true) => PassphraseSource::Stdin,
        (None, false) => return Ok(None),
    };
    if !a.deep {
        anyhow::bail!(crate::error::BadInput(
            "a passphrase is used only by --deep (to unlock an encrypted home for e2fsck -fn): add --deep, or leave the passphrase out".into()
        ));
    }
    Ok(Some(home::read_passphrase(source)?))
}

fn print_text(r: &VerifyReport<'_>) {
    crate::outln!("stick:       {}", r.target);
    crate::outln!(
        "manifest:    {} (livestick {}, {})",
        r.manifest,
        r.written_by,
        r.updated_at
    );
    for image in r.images {
        let s = &image.source;
        crate::outln!(
            "image:       /{}: {} ({}{}), label {}, written {}",
            image.live_dir,
            s.name,
            s.size.map(human).unwrap_or_else(|| "size unknown".into()),
            s.implanted_md5
                .as_ref()
                .map(|m| format!(", implanted MD5 {m}"))
                .unwrap_or_default(),
            s.label,
            image.written_at
        );
    }
    crate::outln!();
    for f in r.files {
        let state = match f.state {
            FileState::Intact => "intact ",
            FileState::Changed => "CHANGED",
            FileState::Missing => "MISSING",
        };
        match &f.detail {
            Some(d) => crate::outln!("  {state}  {}  ({d})", f.path),
            None => crate::outln!("  {state}  {}", f.path),
        }
    }
    match r.boot {
        Some(areas) => {
            for b in areas {
                match &b.state {
                    FileState::Intact => crate::outln!("  intact   {}", b.area),
                    _ => crate::outln!(
                        "  CHANGED  {}  ({})",
                        b.area,
                        b.detail.as_deref().unwrap_or("its bytes differ")
                    ),
                }
            }
        }
        None => crate::outln!("  (no BIOS boot code recorded: not checked)"),
    }
    if !r.persistence.is_empty() {
        crate::outln!();
        for p in r.persistence {
            let mark = if p.ok { "ok     " } else { "PROBLEM" };
            crate::outln!("  {mark}  {} ({}): {}", p.path, human(p.size), p.status);
            if let Some(d) = &p.deep {
                crate::outln!("           deep check: {}", d.detail);
            }
        }
    }
    if let Some(iso) = r.iso {
        crate::outln!();
        crate::outln!(
            "iso:         {}: {}{}",
            iso.iso.display(),
            if iso.same_as_recorded {
                "the recorded image"
            } else {
                "NOT the recorded image"
            },
            format_args!(" ({})", iso.why)
        );
        match iso.implanted_md5_ok {
            Some(true) => crate::outln!("             implanted MD5 verified"),
            Some(false) => crate::outln!("             implanted MD5 FAILED: the ISO is damaged"),
            None => crate::outln!("             no implanted MD5 to check"),
        }
        crate::outln!(
            "             {} copied file{} match the ISO",
            iso.files_matching,
            if iso.files_matching == 1 { "" } else { "s" }
        );
        for d in &iso.files_differing {
            crate::outln!("             DIFFERS: {d}");
        }
    }
    crate::outln!();
    crate::outln!(
        "{}: {} intact, {} changed, {} missing",
        if r.overall == "intact" {
            "intact"
        } else {
            "DAMAGED"
        },
        r.intact,
        r.changed,
        r.missing
    );
}
