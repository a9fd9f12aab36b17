//! `livestick write IMAGE TARGET…` when IMAGE is a raw disk image (or `--dd`):
//! the arguments checked, `raw_write`'s plan confirmed, its writes run for one
//! target, a batch (one read fanned out) or `--wait-for`, and the report.

use std::path::{Path, PathBuf};

use anyhow::bail;

use crate::batch;
use crate::cli::write::{TableArg, WriteArgs};
use crate::disk::target::{self, TargetKind, TargetProbe};
use crate::disk::{devices, identity};
use crate::error::{BadInput, ErrorKind, PartialBatchFailure};
use crate::progress::{Progress, ProgressMode};
use crate::raw_write::{self, RawPlan, RawReport, RawSource, StreamSource};
use crate::size::{human, parse_size};

/// The options that shape a live stick (persistence, boot menus, the FAT
/// layout), given on this command line: each is refused with a raw image.
fn live_only_options(args: &WriteArgs) -> Vec<&'static str> {
    [
        (args.overlay_size_mb.is_some(), "--overlay-size-mb"),
        (args.overlayfs, "--overlayfs"),
        (args.home_size_mb.is_some(), "--home-size-mb"),
        (args.swap_size_mb.is_some(), "--swap-size-mb"),
        (args.passphrase_file.is_some(), "--passphrase-file"),
        (args.passphrase_stdin, "--passphrase-stdin"),
        (args.reset_overlay, "--reset-overlay"),
        (args.skipcopy, "--skipcopy"),
        (args.delete_home, "--delete-home"),
        (args.copy_overlay, "--copy-overlay"),
        (args.copy_home, "--copy-home"),
        (args.multi, "--multi"),
        (args.noformat, "--noformat"),
        (args.updates.is_some(), "--updates"),
        (args.ks.is_some(), "--ks"),
        (args.extra_kernel_args.is_some(), "--extra-kernel-args"),
        (args.timeout.is_some(), "--timeout"),
        (args.total_timeout.is_some(), "--total-timeout"),
        (args.label.is_some(), "--label"),
        (args.partition_size_mb.is_some(), "--partition-size-mb"),
        (args.gpt || args.table == TableArg::Gpt, "--gpt"),
        (args.livedir != "LiveOS", "--livedir"),
    ]
    .into_iter()
    .filter_map(|(given, name)| given.then_some(name))
    .collect()
}

fn progress_mode(json: bool, quiet: bool) -> ProgressMode {
    use std::io::IsTerminal;
    if json {
        ProgressMode::Json
    } else if quiet || !std::io::stderr().is_terminal() {
        ProgressMode::Quiet
    } else {
        ProgressMode::Bar
    }
}

fn emit(json: bool, value: serde_json::Value) {
    if json {
        crate::outln!("{value}");
    }
}

fn plan_for(
    args: &WriteArgs,
    source: &RawSource,
    target_path: &Path,
) -> anyhow::Result<(RawPlan, TargetProbe)> {
    let probe = target::probe(target_path)?;
    let requested = match &args.size {
        Some(text) => Some(parse_size(text).map_err(|e| BadInput(format!("--size: {e}")))?),
        None => None,
    };
    let plan = raw_write::plan_raw(source, &args.iso, &probe, requested, args.force)?;
    Ok((plan, probe))
}

fn confirm(probe: &TargetProbe, args: &WriteArgs) -> anyhow::Result<()> {
    if probe.kind == TargetKind::BlockDevice
        && !super::confirm(&target::confirm_text(probe), args.yes)?
    {
        bail!(BadInput("not confirmed; nothing was written".into()));
    }
    Ok(())
}

fn print_report(report: &RawReport) {
    crate::outln!(
        "Wrote the raw image {} ({}) to {}",
        report.source.display(),
        human(report.image_size),
        report.target.display()
    );
    crate::outln!(
        "  {} written{}, {}",
        human(report.bytes_written),
        report
            .bmap
            .as_ref()
            .map(|b| format!(" (mapped ranges of {}, each checksum matched)", b.display()))
            .unwrap_or_default(),
        if report.verified {
            format!("{} read back and verified", human(report.bytes_verified))
        } else {
            "not verified".into()
        }
    );
    if let Some(sum) = &report.image_sha256 {
        crate::outln!("  image sha256 {sum}");
    }
}

/// Writes the raw image `args.iso` (found raw for `why`) to the targets.
/// `events_schema` is the version of the NDJSON events a batch prints, the
/// live write's (`commands::write::EVENTS_SCHEMA`).
pub fn run(
    args: &WriteArgs,
    why: String,
    json: bool,
    quiet: bool,
    events_schema: u32,
) -> anyhow::Result<()> {
    if let Some(option) = live_only_options(args).first() {
        return Err(raw_write::refuse_option(option, &args.iso).into());
    }
    let source = RawSource::open(&args.iso, why, args.bmap.as_deref())?;
    if let Some(n) = args.wait_for {
        return run_wait_for(args, &source, n, json, quiet, events_schema);
    }
    if args.targets.len() > 1 {
        return run_batch(args, &source, json, quiet, events_schema);
    }
    let target_path = args
        .targets
        .first()
        .ok_or_else(|| BadInput("give a target stick or image file".into()))?;
    let (plan, probe) = plan_for(args, &source, target_path)?;
    if args.dry_run {
        if json {
            crate::outln!("{}", serde_json::to_string_pretty(&plan)?);
        } else {
            crate::out!("{}", plan.to_table());
        }
        return Ok(());
    }
    confirm(&probe, args)?;
    let progress = Progress::new(progress_mode(json, quiet), probe.path.display().to_string());
    let mut stream = source.stream()?;
    let digest = stream.digest();
    let result = raw_write::write_target(
        &plan,
        &probe,
        &mut stream,
        &digest,
        !args.no_verify_write,
        &progress,
    );
    progress.finish();
    let report = result?;
    if json {
        crate::outln!("{}", serde_json::to_string_pretty(&report)?);
    } else if !quiet {
        print_report(&report);
    }
    Ok(())
}

/// Many targets from one read (and one decompression) of the image.
fn run_batch(
    args: &WriteArgs,
    source: &RawSource,
    json: bool,
    quiet: bool,
    events_schema: u32,
) -> anyhow::Result<()> {
    emit(
        json,
        serde_json::json!({"event": "start", "schema": events_schema,
            "iso": args.iso, "kind": "raw-image", "targets": args.targets}),
    );
    let mut outcomes: Vec<(PathBuf, Option<Result<RawReport, String>>)> = Vec::new();
    let mut planned = Vec::new();
    for target_path in &args.targets {
        match plan_for(args, source, target_path) {
            Ok(p) => {
                planned.push(p);
                outcomes.push((target_path.clone(), None));
            }
            Err(e) => {
                let msg = format!("{e:#}");
                emit(
                    json,
                    serde_json::json!({"event": "failed", "device": target_path, "phase": "plan", "error": msg}),
                );
                outcomes.push((target_path.clone(), Some(Err(msg))));
            }
        }
    }
    if args.dry_run {
        let plans: Vec<&RawPlan> = planned.iter().map(|(p, _)| p).collect();
        if json {
            crate::outln!("{}", serde_json::to_string_pretty(&plans)?);
        } else {
            for p in plans {
                crate::out!("{}", p.to_table());
            }
        }
        return finish(outcomes, json, quiet);
    }
    for (_, probe) in &planned {
        confirm(probe, args)?;
    }
    let stream = source.stream()?;
    let digest = stream.digest();
    let failure = stream.failure();
    let name = args.iso.display().to_string();
    let (reader, readers) = batch::broadcast(
        Box::new(StreamSource(Some(stream))),
        vec![(name.clone(), source.known_size().0)],
        planned.len(),
    );
    let multi = indicatif::MultiProgress::new();
    let mode = progress_mode(json, quiet);
    let results: Vec<(PathBuf, Result<RawReport, String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = planned
            .iter()
            .zip(readers)
            .map(|((plan, probe), mut from)| {
                let progress = Progress::in_multi(mode, &multi, probe.path.display().to_string());
                let digest = &digest;
                let name = &name;
                scope.spawn(move || {
                    let result = (|| -> anyhow::Result<RawReport> {
                        use crate::apply::IsoSource;
                        let mut stream = from.open(name, 0)?;
                        Ok(raw_write::write_target(
                            plan,
                            probe,
                            &mut stream,
                            digest,
                            !args.no_verify_write,
                            &progress,
                        )?)
                    })();
                    // Dropping the receiver lets the reader go on without this target.
                    drop(from);
                    progress.finish();
                    (probe.path.clone(), result.map_err(|e| format!("{e:#}")))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| (PathBuf::from("?"), Err("writer thread panicked".into())))
            })
            .collect()
    });
    let _ = reader.join();
    for (target_path, result) in results {
        match &result {
            Ok(r) => emit(
                json,
                serde_json::json!({"event": "done", "device": target_path, "report": r}),
            ),
            Err(e) => emit(
                json,
                serde_json::json!({"event": "failed", "device": target_path, "phase": "write", "error": e}),
            ),
        }
        if let Some(slot) = outcomes
            .iter_mut()
            .find(|(t, o)| t == &target_path && o.is_none())
        {
            slot.1 = Some(result);
        }
    }
    let bad_image = failure.lock().ok().and_then(|f| f.clone());
    if let Some(f) = bad_image.filter(|f| f.kind == ErrorKind::BadInput)
        && outcomes.iter().all(|(_, o)| matches!(o, Some(Err(_))))
    {
        // Every target stopped because the image is bad: that is the error
        // (bad input), not an I/O failure of each stick.
        let _ = finish(outcomes, json, quiet);
        bail!(BadInput(format!(
            "{}; no target was made bootable (each target's first MiB is zeroed)",
            f.message
        )));
    }
    finish(outcomes, json, quiet)
}

fn finish(
    outcomes: Vec<(PathBuf, Option<Result<RawReport, String>>)>,
    json: bool,
    quiet: bool,
) -> anyhow::Result<()> {
    let total = outcomes.len();
    let mut rows = Vec::new();
    let mut details = Vec::new();
    for (target_path, outcome) in &outcomes {
        match outcome {
            Some(Ok(r)) => rows.push(serde_json::json!({"device": target_path, "ok": true,
                "kind": "raw-image", "image_sha256": r.image_sha256, "verified": r.verified})),
            Some(Err(e)) => {
                details.push(format!("{}: {e}", target_path.display()));
                rows.push(serde_json::json!({"device": target_path, "ok": false, "error": e}));
            }
            None => {
                rows.push(serde_json::json!({"device": target_path, "ok": true, "dry_run": true}))
            }
        }
    }
    emit(
        json,
        serde_json::json!({"event": "report", "targets": rows}),
    );
    if !json && !quiet {
        crate::outln!("{:<32} {:<8} DETAIL", "TARGET", "RESULT");
        for (target_path, outcome) in &outcomes {
            let (result, detail) = match outcome {
                Some(Ok(r)) => (
                    "ok",
                    format!(
                        "raw image, {} written, {}",
                        human(r.bytes_written),
                        if r.verified {
                            "verified"
                        } else {
                            "not verified"
                        }
                    ),
                ),
                Some(Err(e)) => ("FAILED", e.lines().next().unwrap_or("").to_string()),
                None => ("planned", String::new()),
            };
            crate::outln!("{:<32} {:<8} {}", target_path.display(), result, detail);
        }
    }
    let failed = details.len();
    if failed == 0 {
        Ok(())
    } else if failed == total {
        bail!("every target failed: {}", details.join("; "))
    } else {
        Err(PartialBatchFailure {
            failed,
            total,
            details,
        }
        .into())
    }
}

/// `--wait-for N`: each stick, as it is plugged in, reads the image itself.
fn run_wait_for(
    args: &WriteArgs,
    source: &RawSource,
    n: usize,
    json: bool,
    quiet: bool,
    events_schema: u32,
) -> anyhow::Result<()> {
    if n == 0 {
        bail!(BadInput("--wait-for needs at least 1 stick".into()));
    }
    if !args.yes || args.dry_run {
        bail!(BadInput(
            "--wait-for writes each stick as soon as it is plugged in, without asking: add --yes (and no --dry-run) to confirm that every new stick may be erased".into()
        ));
    }
    emit(
        json,
        serde_json::json!({"event": "start", "schema": events_schema,
            "iso": args.iso, "kind": "raw-image", "wait_for": n}),
    );
    if !json && !quiet {
        eprintln!("Waiting for {n} stick(s) to be plugged in…");
    }
    let multi = indicatif::MultiProgress::new();
    let mode = progress_mode(json, quiet);
    let outcomes = std::sync::Mutex::new(Vec::new());
    let wait_result = std::thread::scope(|scope| {
        devices::wait_for_new_devices(n, None, args.force, |device| {
            let progress = Progress::in_multi(mode, &multi, device.display().to_string());
            let outcomes = &outcomes;
            emit(
                json,
                serde_json::json!({"event": "plugged", "device": device}),
            );
            scope.spawn(move || {
                let result = (|| -> anyhow::Result<RawReport> {
                    identity::check_distinct(&args.iso, std::slice::from_ref(&device))?;
                    let (plan, probe) = plan_for(args, source, &device)?;
                    let mut stream = source.stream()?;
                    let digest = stream.digest();
                    Ok(raw_write::write_target(
                        &plan,
                        &probe,
                        &mut stream,
                        &digest,
                        !args.no_verify_write,
                        &progress,
                    )?)
                })();
                progress.finish();
                let result = result.map_err(|e| format!("{e:#}"));
                match &result {
                    Ok(r) => emit(
                        json,
                        serde_json::json!({"event": "done", "device": device, "report": r}),
                    ),
                    Err(e) => emit(
                        json,
                        serde_json::json!({"event": "failed", "device": device, "phase": "write", "error": e}),
                    ),
                }
                if let Ok(mut all) = outcomes.lock() {
                    all.push((device, Some(result)));
                }
            });
        })
    });
    let outcomes = outcomes.into_inner().unwrap_or_default();
    wait_result?;
    finish(outcomes, json, quiet)
}
