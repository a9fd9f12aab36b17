//! `livestick home info|resize`: the persistent home on a stick (block device or
//! image file, its FAT filesystem never mounted) or a bare home.img file.
//!
//! The library side is `persist::home_stick`, and the reports' text is
//! `persist::home_report`; this module parses arguments, reads the passphrase only
//! when the home is encrypted, and prints the report as JSON or text.

use std::io::IsTerminal;
use std::path::Path;

use anyhow::bail;
use serde::Serialize;
use zeroize::Zeroizing;

use crate::cli::home::{HomeCommand, InfoArgs, PassArgs, ResizeArgs};
use crate::disk::{stick, target};
use crate::error::{BadInput, CannotOpen};
use crate::persist::home::{self, HomeKind, PassphraseSource};
use crate::persist::home_report::{HomeText, ResizeReport};
use crate::persist::home_stick::{self, HomeReport, ResizePlan, StickHome};
use crate::progress::{Progress, ProgressMode};
use crate::size::MIB;

pub fn run(cmd: HomeCommand, json: bool) -> anyhow::Result<()> {
    // The one open of the target (issue 13), a stick or a bare home.img: every step
    // below reaches it through this handle, whatever the path names by then. `info`
    // repairs the leftovers of a stopped replacement on a stick when it may.
    let (path, usage) = match &cmd {
        HomeCommand::Info(a) => (&a.target, target::Use::Look),
        HomeCommand::Resize(a) if a.dry_run => (&a.target, target::Use::DryRun),
        HomeCommand::Resize(a) => (&a.target, target::Use::Change),
    };
    let _opened = target::open_target(path, usage)?;
    match cmd {
        HomeCommand::Info(a) => info(&a, json),
        HomeCommand::Resize(a) => resize(&a, json),
    }
}

/// Where the passphrase comes from, if the user named a place.
fn passphrase_source(pass: &PassArgs) -> Option<PassphraseSource> {
    match (&pass.passphrase_file, pass.passphrase_stdin) {
        (Some(f), _) => Some(PassphraseSource::File(f.clone())),
        (None, true) => Some(PassphraseSource::Stdin),
        (None, false) => None,
    }
}

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    crate::outln!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// A stick, or a bare home.img file.
fn is_stick(path: &Path) -> anyhow::Result<bool> {
    let meta = std::fs::metadata(path).map_err(|source| CannotOpen {
        path: path.to_path_buf(),
        source,
    })?;
    if stick::looks_like_stick(path) {
        return Ok(true);
    }
    if !meta.is_file() {
        bail!(BadInput(format!(
            "{} is neither a live stick (no partition table with a FAT partition) nor a home.img file",
            path.display()
        )));
    }
    Ok(false)
}

/// Opens the stick's home; `writable` and `dry_run` both pass the safety
/// checks of a change (a dry run shows no plan for a stick it would refuse).
fn open_stick(
    path: &Path,
    live_dir: &str,
    writable: bool,
    dry_run: bool,
) -> anyhow::Result<StickHome> {
    if dry_run {
        target::check_maintenance(&target::probe(path)?)?;
    }
    StickHome::open(path, live_dir, writable).map_err(|e| match e {
        // Unwrapped from the transparent `HomeStickError::Stick`, so that the
        // stick's own error (a refusal, a permission problem) is in the chain
        // and decides the exit code.
        home_stick::HomeStickError::Stick(
            e @ stick::StickError::Target(target::TargetError::Busy { .. }),
        ) => anyhow::Error::new(e).context(
            "unmount it (and detach loop devices) first: the live system may be writing to home.img",
        ),
        home_stick::HomeStickError::Stick(e) => anyhow::Error::new(e),
        e => anyhow::Error::from(e),
    })
}

fn read_pass(src: PassphraseSource) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    Ok(home::read_passphrase(src)?)
}

fn info(a: &InfoArgs, json: bool) -> anyhow::Result<()> {
    let stick = is_stick(&a.target)?;
    if stick && let Some(rep) = ext4_live_info(a)? {
        if json {
            return print_json(&rep.to_document()?);
        }
        crate::out!("{}", HomeText(&rep));
        return Ok(());
    }
    let mut h = if stick {
        Some(open_stick(&a.target, &a.live_dir, false, false)?)
    } else {
        None
    };
    let kind = match &mut h {
        Some(h) => h.kind()?,
        None => home_stick::kind_of_file(&a.target)?,
    };
    // Info never prompts: a locked home is reported as locked.
    let pass = match (kind, passphrase_source(&a.pass)) {
        (Some(HomeKind::Luks2), Some(src)) => Some(read_pass(src)?),
        _ => None,
    };
    let rep = match &mut h {
        Some(h) => h.report(pass.as_deref().map(|p| &p[..]))?,
        None => home_stick::file_report(&a.target, pass.as_deref().map(|p| &p[..]))?,
    };
    if json {
        return print_json(&rep.to_document()?);
    }
    crate::out!("{}", HomeText(&rep));
    Ok(())
}

/// `home info` on the ext4 live layout; `None` for a stick of the FAT layout.
fn ext4_live_info(a: &InfoArgs) -> anyhow::Result<Option<HomeReport>> {
    let Some(locked) = home_stick::ext4_live_report(&a.target, &a.live_dir, None)? else {
        return Ok(None);
    };
    let pass = match passphrase_source(&a.pass) {
        Some(src) if locked.locked => read_pass(src)?,
        _ => return Ok(Some(locked)),
    };
    Ok(home_stick::ext4_live_report(
        &a.target,
        &a.live_dir,
        Some(&pass[..]),
    )?)
}

fn progress_bar(json: bool, what: &Path) -> Progress {
    Progress::new(
        if json {
            ProgressMode::Json
        } else {
            ProgressMode::Bar
        },
        what.display().to_string(),
    )
}

fn resize(a: &ResizeArgs, json: bool) -> anyhow::Result<()> {
    let stick = is_stick(&a.target)?;
    let workdir = a.workdir.clone().unwrap_or_else(std::env::temp_dir);
    if !workdir.is_dir() {
        bail!(BadInput(format!(
            "the work directory {} does not exist; create it or choose another with --workdir DIR",
            workdir.display()
        )));
    }
    if stick {
        // A disk no change may touch is refused before the first look inside it.
        target::check_maintenance(&target::probe(&a.target)?)?;
    }
    if stick && let Some(h) = home_stick::open_ext4_live_home(&a.target, &a.live_dir, !a.dry_run)? {
        return ext4_live_resize(a, h, &workdir, json);
    }
    let mut h = if stick {
        Some(open_stick(&a.target, &a.live_dir, !a.dry_run, a.dry_run)?)
    } else {
        None
    };
    let kind = match &mut h {
        Some(h) => h.kind()?,
        None => home_stick::kind_of_file(&a.target)?,
    };
    let encrypted = match kind {
        Some(HomeKind::Luks2) => true,
        Some(HomeKind::Plain) => false,
        None => bail!(home_stick::HomeStickError::NotHome(match &h {
            Some(h) => format!("{}:{}", a.target.display(), h.home),
            None => a.target.display().to_string(),
        })),
    };
    // Size limits first: a bad size is reported without asking for a passphrase.
    let current = match &h {
        Some(h) => h.size,
        None => target::probe(&a.target)?.size,
    };
    home_stick::check_new_size(current, a.size_mb)?;
    let grows = a.size_mb * MIB != current;
    let pass = resize_passphrase(a, encrypted && grows)?;
    let pass = pass.as_deref().map(|p| &p[..]);
    // Unlocking now checks the passphrase before anything changes.
    match &mut h {
        Some(h) if encrypted && pass.is_some() => {
            h.report(pass)?;
        }
        None if encrypted && pass.is_some() => {
            home_stick::file_report(&a.target, pass)?;
        }
        _ => {}
    }
    let plan = match &h {
        Some(h) => home_stick::plan_stick_resize(h, encrypted, a.size_mb, &workdir)?,
        None => home_stick::plan_file_resize(&a.target, encrypted, a.size_mb, &workdir)?,
    };
    if a.dry_run || plan.unchanged {
        return resize_report(&plan, None, a.dry_run, json);
    }
    let bar = progress_bar(json, &a.target);
    let mut phase = String::new();
    let mut last = 0u64;
    let mut tracked = |name: &str, done: u64, total: u64| {
        if name != phase {
            phase = name.to_string();
            bar.phase(name, total);
            last = 0;
        }
        bar.inc(done.saturating_sub(last));
        last = done;
    };
    let result = match &mut h {
        Some(h) => home_stick::resize_on_stick(h, &plan, pass, &mut tracked),
        None => home_stick::resize_file(&plan, pass),
    };
    bar.finish();
    let result = result?;
    // The stick's manifest records the home's new size, so that `verify` stays true.
    if let Some(h) = &mut h
        && let Err(e) = crate::manifest::rewrite_on_stick(&mut h.stick, |m| {
            crate::manifest::record_persistence_size(m, &h.home, "home", plan.new_bytes)
        })
    {
        eprintln!(
            "warning: home.img was resized, but the stick's manifest could not be updated ({e}); `livestick verify` will report the old size"
        );
    }
    resize_report(&plan, Some(result), false, json)
}

/// `home resize` of home.img on a stick's ext4 live partition: the same checks,
/// passphrase and report as on a FAT stick, the work in `home_stick`.
fn ext4_live_resize(
    a: &ResizeArgs,
    mut h: home_stick::Ext4LiveHome,
    workdir: &Path,
    json: bool,
) -> anyhow::Result<()> {
    let encrypted = match h.kind()? {
        Some(HomeKind::Luks2) => true,
        Some(HomeKind::Plain) => false,
        None => bail!(home_stick::HomeStickError::NotHome(format!(
            "{}:{}",
            a.target.display(),
            h.home
        ))),
    };
    home_stick::check_growth(h.size(), a.size_mb)?;
    let grows = a.size_mb * MIB != h.size();
    let pass = resize_passphrase(a, encrypted && grows)?;
    let pass = pass.as_deref().map(|p| &p[..]);
    if encrypted && pass.is_some() {
        h.report(pass)?;
    }
    let plan = home_stick::plan_ext4_live_resize(&h, encrypted, a.size_mb, workdir)?;
    if a.dry_run || plan.unchanged {
        return resize_report(&plan, None, a.dry_run, json);
    }
    let bar = progress_bar(json, &a.target);
    let mut phase = String::new();
    let mut last = 0u64;
    let result = home_stick::resize_on_ext4_live(&mut h, &plan, pass, &mut |name, done, total| {
        if name != phase {
            phase = name.to_string();
            bar.phase(name, total);
            last = 0;
        }
        bar.inc(done.saturating_sub(last));
        last = done;
    });
    bar.finish();
    resize_report(&plan, Some(result?), false, json)
}

/// The passphrase a resize needs (`needed`: an encrypted home that changes size),
/// from the options, else the terminal; a dry run asks for none.
fn resize_passphrase(a: &ResizeArgs, needed: bool) -> anyhow::Result<Option<Zeroizing<Vec<u8>>>> {
    Ok(match (needed, passphrase_source(&a.pass)) {
        (false, _) => None,
        (true, Some(src)) => Some(read_pass(src)?),
        (true, None) if a.dry_run => None,
        (true, None) if std::io::stdin().is_terminal() => {
            Some(read_pass(PassphraseSource::TerminalOnce)?)
        }
        (true, None) => bail!(BadInput(
            "home.img is encrypted: a passphrase is needed to resize it; without a terminal use --passphrase-file FILE or --passphrase-stdin"
                .into()
        )),
    })
}

fn resize_report(
    plan: &ResizePlan,
    result: Option<HomeReport>,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        return print_json(&home_stick::resize_document(
            plan,
            result.as_ref(),
            dry_run,
        )?);
    }
    let report = ResizeReport {
        dry_run,
        plan,
        result,
    };
    crate::out!("{report}");
    Ok(())
}
