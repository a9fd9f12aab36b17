//! `livestick restore STICK`: back to plain storage. Arguments → safety checks →
//! inspect → plan → confirm → save home → apply → report; the library side is
//! `restore`.

use std::io::IsTerminal;

use anyhow::bail;
use serde::Serialize;

use crate::cli::restore::{RestoreArgs, RestoreFs};
use crate::disk::target::{self, TargetKind};
use crate::error::{BadInput, CannotOpen};
use crate::progress::{Progress, ProgressMode};
use crate::restore::{self, PlainFs, RestoreOptions, RestorePlan};
use crate::size::human;

pub fn run(a: &RestoreArgs, json: bool, quiet: bool) -> anyhow::Result<()> {
    let probe = target::probe(&a.target)?;
    if !probe.exists {
        return Err(CannotOpen {
            path: a.target.clone(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or device"),
        }
        .into());
    }
    // The rules of `write`, before anything is opened for writing (dry runs too).
    target::check_safe(&probe, a.force)?;
    // The one open of the stick (issue 13): the inspection, the saved home and the
    // write all go through this handle.
    let _opened = target::open_write_target(&a.target, &probe, a.dry_run)?;
    let found = restore::inspect(&probe)?;
    let save_home_is_dir = a.save_home.as_ref().is_some_and(|file| file.is_dir());
    let (save_home_taken, save_home_on_stick, save_home_free) = match &a.save_home {
        Some(file) => {
            // Where the copies go; a stick they cannot go to is the plan's to refuse.
            let saves = restore::save_destinations(&a.target, &found, file, save_home_is_dir)
                .unwrap_or_default();
            let taken = saves
                .iter()
                .map(|(_, to)| to.clone())
                .filter(|to| std::fs::symlink_metadata(to).is_ok())
                .collect();
            let first = saves
                .first()
                .map_or_else(|| file.clone(), |(_, to)| to.clone());
            (
                taken,
                restore::on_the_stick(&first, &a.target)?,
                free_bytes_for(&first),
            )
        }
        None => (Vec::new(), None, None),
    };
    let fs = match a.fs {
        RestoreFs::Fat32 => PlainFs::Fat32,
        RestoreFs::Exfat => PlainFs::Exfat,
    };
    let opts = RestoreOptions {
        label: a.label.clone(),
        fs,
        save_home: a.save_home.clone(),
        mkfs_exfat: crate::tools::find_program(&restore::MKFS_EXFAT).is_ok(),
        save_home_is_dir,
        save_home_taken,
        save_home_on_stick,
        save_home_free,
        volume_id: rand::random(),
    };
    let plan = restore::plan(&probe, found, &opts)?;
    if a.dry_run {
        return print_plan(&plan, json);
    }
    if !json && !quiet {
        eprintln!("{}", plan.found.description);
    }
    let question = format!(
        "{} Lost: {}.",
        target::confirm_text(&probe),
        plan.lost.join("; ")
    );
    if !super::confirm(&question, a.yes)? {
        bail!(BadInput("not confirmed; nothing was written".into()));
    }
    let mode = if json {
        ProgressMode::Json
    } else if quiet || !std::io::stderr().is_terminal() {
        ProgressMode::Quiet
    } else {
        ProgressMode::Bar
    };
    let progress = Progress::new(mode, a.target.display().to_string());
    let mut saved = Vec::new();
    let saves = &plan.save_homes.0;
    if !saves.is_empty() {
        progress.phase("save-home", saves.iter().map(|(home, _)| home.size).sum());
    }
    for (home, to) in saves {
        let copy = restore::save_home(&probe, home, to, |n| progress.inc(n));
        match copy {
            Ok(copy) => saved.push(copy),
            Err(e) => {
                // The copies made before stay: each is complete and checked.
                // Said whatever the progress mode: the user needs to know what
                // is in the save directory now.
                progress.finish();
                for done in &saved {
                    eprintln!(
                        "livestick restore: {} was saved to {} (complete, checked by sha256) before this failed; the stick was not changed",
                        done.from,
                        done.to.display()
                    );
                }
                return Err(e.into());
            }
        }
    }
    progress.phase("restore", 0);
    let mut report = restore::apply(&plan, &probe)?;
    progress.finish();
    report.saved_homes = restore::SavedHomes(saved);
    if json {
        crate::outln!("{}", serde_json::to_string_pretty(&with_schema(&report)?)?);
        return Ok(());
    }
    // --quiet: errors only, as `write` prints them.
    if quiet {
        return Ok(());
    }
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    for s in &report.saved_homes.0 {
        crate::outln!(
            "saved:       {} → {} ({}, sha256 {})",
            s.from,
            s.to.display(),
            human(s.size),
            s.sha256
        );
    }
    crate::outln!(
        "restored:    {}: one {} partition of {} (MBR, from 1 MiB, no boot code), label {}{}",
        report.target.display(),
        report.fs,
        human(report.partition_len),
        report.label,
        report
            .fs_uuid
            .as_ref()
            .map(|u| format!(", UUID {u}"))
            .unwrap_or_default()
    );
    crate::outln!(
        "verified:    {} written and read back",
        human(report.bytes_written)
    );
    if probe.kind == TargetKind::BlockDevice {
        crate::outln!(
            "             replug the stick if the system does not show the new partition"
        );
    }
    Ok(())
}

/// Free bytes in the directory `file` will be created in, when it can be asked.
fn free_bytes_for(file: &std::path::Path) -> Option<u64> {
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    let stat = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(stat.blocks_available() as u64 * stat.fragment_size() as u64)
}

/// The version of restore's report and dry-run plan (docs/json.md,
/// schemas/restore.schema.json, schemas/restore-plan.schema.json).
const RESTORE_SCHEMA: u32 = 1;

/// A plan or report as `restore --json` prints it: with its `schema`.
fn with_schema<T: Serialize>(value: &T) -> anyhow::Result<serde_json::Value> {
    let mut value = serde_json::to_value(value)?;
    if let Some(object) = value.as_object_mut() {
        object.insert("schema".into(), RESTORE_SCHEMA.into());
    }
    Ok(value)
}

fn print_plan(plan: &RestorePlan, json: bool) -> anyhow::Result<()> {
    if json {
        crate::outln!("{}", serde_json::to_string_pretty(&with_schema(plan)?)?);
        return Ok(());
    }
    crate::outln!(
        "target:      {} ({})",
        plan.target.display(),
        human(plan.size)
    );
    crate::outln!("found:       {}", plan.found.description);
    crate::outln!(
        "new layout:  MBR, one {} partition from 1 MiB, {} ({} bytes), label {}, no boot code, no boot flag",
        plan.fs,
        human(plan.partition_len),
        plan.partition_len,
        plan.label
    );
    for (home, to) in &plan.save_homes.0 {
        crate::outln!(
            "save first:  {} → {} (checked by sha256)",
            home.path,
            to.display()
        );
    }
    for l in &plan.lost {
        crate::outln!("lost:        {l}");
    }
    crate::outln!("dry run: nothing was written");
    Ok(())
}
