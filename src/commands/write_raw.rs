//! `livestick write IMAGE TARGET…` when IMAGE is a raw disk image (or `--dd`):
//! the arguments checked, `raw_write`'s plan confirmed, its writes run for one
//! target, a batch (one read fanned out) or `--wait-for`, and the report.

use anyhow::bail;

use crate::cli::write::{TableArg, WriteArgs};
use crate::disk::target::{self, TargetKind, TargetProbe};
use crate::error::BadInput;
use crate::progress::{Progress, ProgressMode};
use crate::raw_write::run::{self, RawBatch, RawOptions};
use crate::raw_write::{self, RawPlan, RawReport, RawSource};
use crate::size::human;

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
        (args.gpt, "--gpt"),
        (args.table == TableArg::Gpt && !args.gpt, "--table gpt"),
        (args.livedir != "LiveOS", "--livedir"),
        (args.ext4, "--ext4"),
        (args.unencrypted_home, "--unencrypted-home"),
        (args.luks_pbkdf.is_some(), "--luks-pbkdf"),
        (args.luks_iter_time.is_some(), "--luks-iter-time"),
        (args.luks_pbkdf_memory.is_some(), "--luks-pbkdf-memory"),
        (args.volume_id.is_some(), "--volume-id"),
        (
            args.dracut_names != crate::cli::write::DracutNamesArg::Auto,
            "--dracut-names",
        ),
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

fn options(args: &WriteArgs) -> RawOptions<'_> {
    RawOptions {
        image: &args.iso,
        size: args.size.as_deref(),
        force: args.force,
        verify: !args.no_verify_write,
    }
}

fn confirm(probe: &TargetProbe, args: &WriteArgs) -> anyhow::Result<()> {
    if probe.kind == TargetKind::BlockDevice
        && !super::confirm(&target::confirm_text(probe), args.yes)?
    {
        bail!(BadInput("not confirmed; nothing was written".into()));
    }
    Ok(())
}

fn print_report(report: &RawReport, checksums_checked: bool) {
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
            .map(|b| if checksums_checked {
                format!(" (mapped ranges of {}, each checksum matched)", b.display())
            } else {
                format!(
                    " (mapped ranges of {}, checksums not checked: --noverify)",
                    b.display()
                )
            })
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
pub fn run(args: &WriteArgs, why: String, json: bool, quiet: bool) -> anyhow::Result<()> {
    if let Some(option) = live_only_options(args).first() {
        return Err(raw_write::refuse_option(option, &args.iso).into());
    }
    // `--dd` writes every byte, as dd would: a map found beside the image would
    // leave its unmapped ranges holding the stick's old bytes. One given with
    // --bmap is followed.
    let mut source = RawSource::open(&args.iso, why, args.bmap.as_deref(), !args.dd)?;
    if args.noverify {
        source.skip_range_checksums();
    }
    if let Some(n) = args.wait_for {
        return run_wait_for(args, &source, n, json, quiet);
    }
    if args.targets.len() > 1 {
        return run_batch(args, &source, json, quiet);
    }
    let target_path = args
        .targets
        .first()
        .ok_or_else(|| BadInput("give a target stick or image file".into()))?;
    let (plan, probe) = run::plan_target(&source, &options(args), target_path)?;
    if args.dry_run {
        if json {
            let value = raw_write::with_schema(&plan)?;
            crate::outln!("{}", serde_json::to_string_pretty(&value)?);
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
        let value = raw_write::with_schema(&report)?;
        crate::outln!("{}", serde_json::to_string_pretty(&value)?);
    } else if !quiet {
        print_report(&report, !source.range_checksums_skipped);
    }
    Ok(())
}

/// Many targets from one read (and one decompression) of the image.
fn run_batch(args: &WriteArgs, source: &RawSource, json: bool, quiet: bool) -> anyhow::Result<()> {
    // A dry run prints one document of plans, not the events of a batch that runs.
    let events = json && !args.dry_run;
    let mut batch = RawBatch::start(events, source, options(args), &args.targets);
    if args.dry_run {
        let plans: Vec<&RawPlan> = batch.planned().iter().map(|(p, _)| p).collect();
        if json {
            let plans = plans
                .iter()
                .map(raw_write::with_schema)
                .collect::<Result<Vec<_>, _>>()?;
            let document = crate::batch::plans_document(plans, &batch.failures());
            crate::outln!("{}", serde_json::to_string_pretty(&document)?);
        } else {
            for p in plans {
                crate::out!("{}", p.to_table());
            }
        }
        batch.finish(quiet || json)?;
        return Ok(());
    }
    for (_, probe) in batch.planned() {
        confirm(probe, args)?;
    }
    batch.write_all(progress_mode(json, quiet))?;
    batch.finish(quiet)?;
    Ok(())
}

/// `--wait-for N`: each stick, as it is plugged in, reads the image itself.
fn run_wait_for(
    args: &WriteArgs,
    source: &RawSource,
    n: usize,
    json: bool,
    quiet: bool,
) -> anyhow::Result<()> {
    if n == 0 {
        bail!(BadInput("--wait-for needs at least 1 stick".into()));
    }
    if !args.yes || args.dry_run {
        bail!(BadInput(
            "--wait-for writes each stick as soon as it is plugged in, without asking: add --yes (and no --dry-run) to confirm that every new stick may be erased".into()
        ));
    }
    let mode = progress_mode(json, quiet);
    RawBatch::wait_for(
        json,
        quiet,
        mode,
        source,
        options(args),
        n,
        args.wait_timeout,
    )?
    .finish(quiet)?;
    Ok(())
}
