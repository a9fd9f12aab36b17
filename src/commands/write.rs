//! `livestick write ISO TARGET`: inspect → plan → (dry run | apply) → report.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use anyhow::{Context, bail};

use crate::apply::{self, ApplyOptions};
use crate::batch::{Batch, PlannedTarget};
use crate::boot::cmdline::DracutNames;
use crate::boot::cmdline::KernelArgs;
use crate::boot::syslinux;
use crate::cli::write::{DracutNamesArg, TableArg, WriteArgs};
use crate::disk::identity;
use crate::disk::partition::TableKind;
use crate::disk::target::{self, TargetKind};
use crate::error::BadInput;
use crate::persist::home::{self, PassphraseSource};
use crate::plan::{self, FormatMode, HomeEncryption, Plan, WriteOptions};
use crate::prepare;
use crate::progress::{Progress, ProgressMode};
use crate::size::{MIB, parse_size};
use crate::source::signed_checksum::SourceCheck;
use crate::source::{acquire, live};
use crate::write_facts;
use crate::write_report::WriteReport;

fn mib(option: &str, value: Option<u64>) -> anyhow::Result<Option<u64>> {
    match value {
        None => Ok(None),
        Some(0) => Err(BadInput(format!("--{option} must be at least 1 MiB")).into()),
        Some(n) => n
            .checked_mul(MIB)
            .map(Some)
            .ok_or_else(|| BadInput(format!("--{option} {n} is too large")).into()),
    }
}

/// A file the user names to be copied onto the stick: it must be readable now.
fn readable(option: &str, path: Option<&Path>) -> anyhow::Result<Option<PathBuf>> {
    let Some(path) = path else {
        return Ok(None);
    };
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(Some(path.to_path_buf())),
        Ok(_) => Err(BadInput(format!(
            "--{option} {} is not a regular file",
            path.display()
        ))
        .into()),
        Err(e) => Err(BadInput(format!("--{option} {}: {e}", path.display())).into()),
    }
}

/// The overlay argument spelling `--dracut-names` asks for, or (auto) the one the
/// ISO's initrd understands and whether its version was unreadable.
fn resolve_dracut(args: &WriteArgs, live: &live::LiveImage) -> (DracutNames, bool) {
    match args.dracut_names {
        DracutNamesArg::Classic => (DracutNames::Classic, false),
        DracutNamesArg::Renamed => (DracutNames::Renamed, false),
        DracutNamesArg::Auto => write_facts::initrd_dracut_names(live),
    }
}

fn options_from(args: &WriteArgs, live: &live::LiveImage) -> anyhow::Result<WriteOptions> {
    // The spelling only matters for OverlayFS (cmdline::rewrite_for_stick), which a
    // flat root gets without the flag: reading it means decompressing the initrd,
    // so it is skipped otherwise.
    let (dracut, dracut_unknown) =
        if args.overlayfs || matches!(live.root, live::RootKind::Flat | live::RootKind::Erofs) {
            resolve_dracut(args, live)
        } else {
            (DracutNames::Classic, false)
        };
    let volume_id = match &args.volume_id {
        Some(text) => {
            u32::from_str_radix(text.trim_start_matches("0x").replace('-', "").as_str(), 16)
                .map_err(|_| BadInput(format!("--volume-id {text:?} is not 8 hex digits")))?
        }
        None => rand::random(),
    };
    let format = if args.format {
        FormatMode::Always
    } else if args.noformat {
        FormatMode::Never
    } else {
        FormatMode::Auto
    };
    let table = if args.gpt || args.table == TableArg::Gpt {
        TableKind::Gpt
    } else {
        TableKind::Mbr
    };
    let home_encryption = if args.unencrypted_home {
        HomeEncryption::None
    } else {
        HomeEncryption::Luks
    };
    let home_size = args
        .home_size_mb
        .map(|n| home::home_size_for_write(n, home_encryption == HomeEncryption::Luks))
        .transpose()
        .map_err(|e| BadInput(format!("--home-size-mb: {e}")))?;
    if (args.copy_overlay || args.copy_home) && live.source_kind != live::SourceKind::Stick {
        bail!(BadInput(format!(
            "--copy-overlay and --copy-home carry persistence over from another stick, but the source {} is an ISO image; give the old stick as the source",
            live.path.display()
        )));
    }
    Ok(WriteOptions {
        noverify: args.noverify,
        format,
        table,
        label: args.label.clone(),
        live_dir: args.livedir.clone(),
        overlay_size: mib("overlay-size-mb", args.overlay_size_mb)?,
        overlayfs: args.overlayfs,
        reset_overlay: args.reset_overlay,
        skipcopy: args.skipcopy,
        delete_home: args.delete_home,
        multi: args.multi,
        copy_overlay: args.copy_overlay,
        copy_home: args.copy_home,
        dracut,
        dracut_unknown,
        home_size,
        home_encryption,
        swap_size: mib("swap-size-mb", args.swap_size_mb)?,
        extra_args: KernelArgs::parse(args.extra_kernel_args.as_deref().unwrap_or("")),
        partition_size: mib("partition-size-mb", args.partition_size_mb)?,
        updates: readable("updates", args.updates.as_deref())?,
        kickstart: readable("ks", args.ks.as_deref())?,
        timeout_secs: args.timeout,
        total_timeout_secs: args.total_timeout,
        volume_id,
        bios: true,
        force: args.force,
        iso_md5: write_facts::claimed_md5(live),
        ext4_live: args.ext4,
    })
}

/// A target's plan, with what was learnt making it and the target's one open.
pub type Planned = (
    Plan,
    target::TargetProbe,
    Option<syslinux::SyslinuxFiles>,
    target::Opened,
);

/// Builds the plan for one target; every input check happens here. The target stays
/// open (its one open) while the returned [`target::Opened`] is held.
pub fn make_plan(
    args: &WriteArgs,
    target_path: &Path,
    opts: &WriteOptions,
    live: &live::LiveImage,
) -> anyhow::Result<Planned> {
    // Pinned: the one open below must find what is probed here (`target::pin`).
    target::pin(target_path)?;
    let probe = target::probe(target_path)?;
    let requested = match &args.size {
        Some(text) => Some(parse_size(text).map_err(|e| BadInput(format!("--size: {e}")))?),
        None => None,
    };
    let target_size = target::planned_size(&probe, requested)?;
    // A dry run too: a plan is never shown for a target `write` would refuse.
    target::check_safe(&probe, args.force)?;
    // The one open of an existing target (issue 13): the leftover repair, the read of
    // the stick, the write and SYSLINUX all go through this handle.
    let opened = target::open_write_target(target_path, &probe, args.dry_run)?;
    let (existing, repaired) =
        write_facts::existing_stick(target_path, &probe, opts, live, !args.dry_run, |line| {
            eprintln!("livestick write: repaired: {line}")
        })?;
    let syslinux_files = syslinux::locate()?;
    let mut plan = plan::plan_write(
        live,
        &probe,
        target_size,
        existing,
        opts,
        Some(&syslinux_files.modules_dir),
    )?;
    plan.repaired = repaired;
    Ok((plan, probe, Some(syslinux_files), opened))
}

fn passphrase_source(args: &WriteArgs) -> PassphraseSource {
    match (&args.passphrase_file, args.passphrase_stdin) {
        (Some(path), _) => PassphraseSource::File(path.clone()),
        (None, true) => PassphraseSource::Stdin,
        (None, false) => PassphraseSource::Terminal,
    }
}

/// Asks before erasing a block device or deleting home.img (unless --yes).
fn confirm_target(
    plan: &Plan,
    probe: &target::TargetProbe,
    args: &WriteArgs,
) -> anyhow::Result<()> {
    // A new table takes every home on the stick with it: asked about as --delete-home
    // is, an image file included (it has no other question).
    let homes_lost = homes_a_format_loses(plan, probe);
    if probe.kind == TargetKind::BlockDevice {
        let mut question = target::confirm_text(probe);
        if !homes_lost.is_empty() {
            question = format!("{homes_lost} is lost with everything in it. {question}");
        }
        if let Some(kept) = plan.kept_overlay.as_ref().filter(|k| k.reset) {
            question = format!(
                "The overlay {} is emptied, its {} lost ({}). {question}",
                kept.to,
                kept.used_text(),
                kept.why
            );
        }
        if !super::confirm(&question, args.yes)? {
            bail!(BadInput("not confirmed; nothing was written".into()));
        }
    }
    if probe.kind == TargetKind::ImageFile
        && !homes_lost.is_empty()
        && !super::confirm(
            &format!(
                "Formatting {} deletes {homes_lost} with everything in it. Go on?",
                probe.path.display()
            ),
            args.yes,
        )?
    {
        bail!(BadInput(format!(
            "not formatted, nothing was written: {} holds {homes_lost}, which a new partition table deletes; write without --format to keep it (re-provisioning keeps home.img), or add --yes to format anyway",
            probe.path.display()
        )));
    }
    if let Some(home) = plan.deletes.iter().find(|d| d.ends_with("/home.img"))
        && !super::confirm(
            &format!(
                "Delete {home} on {} with everything in it?",
                probe.path.display()
            ),
            args.yes,
        )?
    {
        bail!(BadInput("home.img not deleted; nothing was written".into()));
    }
    Ok(())
}

/// The homes (`home.img` in any live directory, with their sizes) on a target that
/// `plan` formats, for the confirmation; empty when there is none or the target
/// holds no readable stick.
fn homes_a_format_loses(plan: &Plan, probe: &target::TargetProbe) -> String {
    if plan.format.is_none() || !probe.exists || probe.size == 0 {
        return String::new();
    }
    let Ok(Some(old)) = apply::read_existing(&probe.path) else {
        return String::new();
    };
    old.files
        .iter()
        .filter(|(path, _)| {
            path.rsplit('/')
                .next()
                .is_some_and(|name| name.eq_ignore_ascii_case(crate::layout::HOME))
        })
        .map(|(path, size)| format!("{path} ({})", crate::size::human(*size)))
        .collect::<Vec<_>>()
        .join(" and ")
}

fn progress_mode(json: bool, quiet: bool) -> ProgressMode {
    ProgressMode::from_flags(json, quiet)
}

/// Whether any plan makes an encrypted home.
fn needs_passphrase(plans: &[&Plan]) -> bool {
    plans.iter().any(|p| {
        p.home
            .as_ref()
            .is_some_and(|h| h.encryption == HomeEncryption::Luks)
    })
}

/// Reads the home passphrase once (for every target of a batch).
fn home_passphrase(args: &WriteArgs, needs: bool) -> anyhow::Result<Option<Zeroizing<Vec<u8>>>> {
    if !needs {
        return Ok(None);
    }
    let pass = home::read_passphrase(passphrase_source(args))
        .map_err(|e| BadInput(format!("home passphrase: {e}")))?;
    Ok(Some(pass))
}

/// Prepares one target's home/swap/overlay images and applies its plan: the
/// same steps for a single write, each member of a batch, and `--wait-for`.
#[allow(clippy::too_many_arguments)]
fn write_one(
    args: &WriteArgs,
    plan: &Plan,
    probe: &target::TargetProbe,
    syslinux_files: Option<syslinux::SyslinuxFiles>,
    passphrase: Option<&Zeroizing<Vec<u8>>>,
    boot_fats: &apply::BootFatStages,
    workdir: &Path,
    source: &mut dyn apply::IsoSource,
    progress: &Progress,
) -> anyhow::Result<apply::ApplyReport> {
    let inputs = prepare::PrepareInputs {
        copy_overlay: args.copy_overlay,
        copy_home: args.copy_home,
        passphrase,
        boot_fats,
        luks: prepare::luks_params(
            args.luks_pbkdf.as_deref(),
            args.luks_iter_time,
            args.luks_pbkdf_memory,
        ),
    };
    let options = ApplyOptions {
        verify_write: !args.no_verify_write,
    };
    Ok(prepare::write_target(
        plan,
        probe,
        syslinux_files,
        &inputs,
        &options,
        workdir,
        source,
        progress,
    )?)
}

/// A URL or release name becomes a verified file in the cache, and a local image
/// is checked against its CHECKSUM, before any target is probed or opened.
/// `None` when `--download-only` has done everything asked.
fn acquire_source(
    args: &WriteArgs,
    json: bool,
    quiet: bool,
) -> anyhow::Result<Option<(WriteArgs, SourceCheck)>> {
    // A local image is read later, once, by write_facts::check_source (its sha256
    // beside the implanted-MD5 pass); --download-only has nothing later.
    let read_local = !args.dry_run && args.source_check.download_only;
    let acquired = acquire::acquire(
        &args.iso,
        &args.source_check.download_options(),
        read_local,
        progress_mode(json, quiet),
    )?;
    if args.source_check.download_only {
        if json {
            crate::outln!("{}", acquired.to_json(&args.iso)?);
        } else {
            crate::outln!("{}", acquired.path.display());
            if !quiet {
                eprintln!("{}", acquired.check.summary());
            }
        }
        return Ok(None);
    }
    let local = WriteArgs {
        iso: acquired.path,
        ..args.clone()
    };
    Ok(Some((local, acquired.check)))
}

pub fn run(args: &WriteArgs, json: bool, quiet: bool) -> anyhow::Result<()> {
    let Some((local, mut source_check)) = acquire_source(args, json, quiet)? else {
        return Ok(());
    };
    let args = &local;
    // Before the source is inspected or any target probed: a target that is
    // the source (or a batch naming one stick twice) is refused by identity.
    identity::check_distinct(&args.iso, &args.targets)?;
    // A raw disk image (or --dd) is written as it is, by raw_write.
    if let Some(why) = crate::raw_write::detect(&args.iso, args.dd)? {
        if !args.dry_run {
            let progress = Progress::new(progress_mode(json, quiet), "source");
            write_facts::check_published(&args.iso, &mut source_check, &progress)?;
            progress.finish();
        }
        return super::write_raw::run(args, why, json, quiet);
    }
    if let Some(bmap) = &args.bmap {
        return Err(crate::raw_write::RawWriteError::BmapForLiveIso {
            bmap: bmap.clone(),
            image: args.iso.clone(),
        }
        .into());
    }
    if args.targets.len() > 1 || args.wait_for.is_some() {
        return run_batch(args, &mut source_check, json, quiet);
    }
    let target = args
        .targets
        .first()
        .ok_or_else(|| BadInput("give a target stick or image file".into()))?;
    let unpacked = write_facts::unpack_source(
        &args.iso,
        &mut source_check,
        !args.dry_run,
        progress_mode(json, quiet),
    )?;
    let live = crate::live_source::inspect_named(unpacked.path(), &args.iso)?;
    // Checked before any target is probed.
    let md5 = if args.dry_run {
        None
    } else {
        let progress = Progress::new(progress_mode(json, quiet), "source");
        let md5 = write_facts::check_source(
            &args.iso,
            &live,
            &mut source_check,
            !args.noverify,
            &progress,
        )?;
        progress.finish();
        md5
    };
    let opts = options_from(args, &live)?;
    let (mut plan, probe, syslinux_files, _opened) = make_plan(args, target, &opts, &live)?;
    plan.notes.extend(unpacked.note());
    plan.notes.push(source_check.summary());
    plan.source = args.iso.clone();
    if args.dry_run {
        if json {
            let value = plan.to_json(&source_check)?;
            crate::outln!("{}", serde_json::to_string_pretty(&value)?);
        } else {
            crate::out!("{}", plan.to_table());
        }
        return Ok(());
    }
    let progress = Progress::new(progress_mode(json, quiet), probe.path.display().to_string());
    confirm_target(&plan, &probe, args)?;
    let passphrase = home_passphrase(args, needs_passphrase(&[&plan]))?;
    let workdir = tempfile::Builder::new()
        .prefix("livestick-")
        .tempdir()
        .context("creating a temporary directory")?;
    let written = crate::batch::with_reader_of_one(apply::open_source(&live)?, &plan, |source| {
        write_one(
            args,
            &plan,
            &probe,
            syslinux_files,
            passphrase.as_ref(),
            &apply::BootFatStages::default(),
            workdir.path(),
            source,
            &progress,
        )
    });
    let mut report = written?;
    if json {
        report.iso_md5 = md5.clone();
        report.checksum = Some(source_check.clone());
        crate::outln!("{}", serde_json::to_string_pretty(&report.to_json()?)?);
    } else if !quiet {
        crate::out!(
            "{}",
            WriteReport::new(&live, &plan, &report, md5.is_some(), &source_check)
        );
    }
    Ok(())
}

/// Several targets from one read of the ISO: each target is planned, checked
/// and written on its own thread; one that fails is reported and dropped while
/// the others finish.
fn run_batch(
    args: &WriteArgs,
    source_check: &mut SourceCheck,
    json: bool,
    quiet: bool,
) -> anyhow::Result<()> {
    // The NDJSON events keep their recorded shape (docs/ndjson-events.md); the
    // check is in every plan's notes, and said once here for a person.
    if !json && !quiet {
        eprintln!("{}", source_check.summary());
    }
    let unpacked = write_facts::unpack_source(
        &args.iso,
        source_check,
        !args.dry_run,
        progress_mode(json, quiet),
    )?;
    let live = crate::live_source::inspect_named(unpacked.path(), &args.iso)?;
    let opts = options_from(args, &live)?;
    if let Some(n) = args.wait_for {
        return run_wait_for(args, &live, &opts, n, source_check, json, quiet);
    }
    // Checked before any target is probed.
    let md5 = if args.dry_run {
        None
    } else {
        let progress = Progress::for_source(progress_mode(json, quiet), "iso");
        let md5 =
            write_facts::check_source(&args.iso, &live, source_check, !args.noverify, &progress)?;
        progress.finish();
        md5
    };
    // A dry run prints one document of plans, not the events of a batch that runs.
    let mut batch = Batch::start(json && !args.dry_run, &args.iso, &args.targets);
    // Each target's one open, held until the batch is done.
    let mut held_open = Vec::new();
    let mut take =
        |batch: &mut Batch, target: &PathBuf, planned: anyhow::Result<Planned>| match planned {
            Ok((mut plan, probe, syslinux, opened)) => {
                held_open.push(opened);
                plan.notes.extend(unpacked.note());
                plan.notes.push(source_check.summary());
                plan.source = args.iso.clone();
                batch.planned(PlannedTarget {
                    target: target.clone(),
                    plan,
                    probe,
                    syslinux,
                });
            }
            Err(e) => {
                let kind = crate::cli::error_kind(&e);
                batch.plan_failed(target, e, kind)
            }
        };
    if args.volume_id.is_some() {
        // Numbered in turn: each target that plans takes the next volume id.
        for target in &args.targets {
            let mut own = opts.clone();
            own.volume_id = opts.volume_id.wrapping_add(batch.planned_count() as u32);
            let planned = make_plan(args, target, &own, &live);
            take(&mut batch, target, planned);
        }
    } else {
        // Side by side: each probes and reads its own stick (a few tenths of a
        // second each on a slow CPU), and the batch starts writing once all are done.
        let planned: Vec<_> = std::thread::scope(|scope| {
            let planning: Vec<_> = args
                .targets
                .iter()
                .map(|target| {
                    let mut own = opts.clone();
                    // Each target gets its own volume id (and so its own overlay name).
                    own.volume_id = rand::random();
                    let live = &live;
                    scope.spawn(move || make_plan(args, target, &own, live))
                })
                .collect();
            planning
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                })
                .collect()
        });
        for (target, planned) in args.targets.iter().zip(planned) {
            take(&mut batch, target, planned);
        }
    }
    if args.dry_run {
        let plans: Vec<&Plan> = batch.planned_targets().iter().map(|p| &p.plan).collect();
        if json {
            let plans = plans
                .iter()
                .map(|p| p.to_json(source_check))
                .collect::<Result<Vec<_>, _>>()?;
            let document = crate::batch::plans_document(plans, &batch.failures());
            crate::outln!("{}", serde_json::to_string_pretty(&document)?);
        } else {
            for p in plans {
                crate::out!("{}", p.to_table());
            }
        }
        return Ok(batch.finish(quiet || json)?);
    }
    for p in batch.planned_targets() {
        confirm_target(&p.plan, &p.probe, args)?;
    }
    let plans: Vec<&Plan> = batch.planned_targets().iter().map(|p| &p.plan).collect();
    let passphrase = home_passphrase(args, needs_passphrase(&plans))?;
    let workdir = tempfile::Builder::new()
        .prefix("livestick-")
        .tempdir()
        .context("creating a temporary directory")?;
    let boot_fats = apply::BootFatStages::default();
    batch.write_all(
        &live,
        progress_mode(json, quiet),
        workdir.path(),
        md5.as_deref(),
        |p, source, workdir, progress| {
            write_one(
                args,
                &p.plan,
                &p.probe,
                p.syslinux.clone(),
                passphrase.as_ref(),
                &boot_fats,
                workdir,
                source,
                progress,
            )
            .map(|report| with_checksum(report, source_check))
        },
        crate::cli::error_kind,
    )?;
    Ok(batch.finish(quiet)?)
}

/// A batch member's report with the source's published-checksum check, which
/// its `done` event carries like the single-target report.
fn with_checksum(mut report: apply::ApplyReport, check: &SourceCheck) -> apply::ApplyReport {
    report.checksum = Some(check.clone());
    report
}

/// `--wait-for N`: write each stick as it is plugged in.
fn run_wait_for(
    args: &WriteArgs,
    live: &live::LiveImage,
    opts: &WriteOptions,
    n: usize,
    source_check: &mut SourceCheck,
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
    let md5 = write_facts::check_source(
        &args.iso,
        live,
        source_check,
        !args.noverify,
        &Progress::for_source(progress_mode(json, quiet), "iso"),
    )?;
    let passphrase = home_passphrase(
        args,
        opts.home_size.is_some() && opts.home_encryption == HomeEncryption::Luks,
    )?;
    let workdir = tempfile::Builder::new()
        .prefix("livestick-")
        .tempdir()
        .context("creating a temporary directory")?;
    let boot_fats = apply::BootFatStages::default();
    let batch = Batch::wait_for(
        json,
        quiet,
        progress_mode(json, quiet),
        &args.iso,
        n,
        args.wait_timeout,
        args.force,
        workdir.path(),
        md5.as_deref(),
        |device, workdir, progress| -> anyhow::Result<apply::ApplyReport> {
            let mut own = opts.clone();
            own.volume_id = rand::random();
            identity::check_distinct(&args.iso, &[device.to_path_buf()])?;
            let (plan, probe, syslinux_files, _opened) = make_plan(args, device, &own, live)?;
            let written =
                crate::batch::with_reader_of_one(apply::open_source(live)?, &plan, |source| {
                    write_one(
                        args,
                        &plan,
                        &probe,
                        syslinux_files,
                        passphrase.as_ref(),
                        &boot_fats,
                        workdir,
                        source,
                        progress,
                    )
                });
            written.map(|report| with_checksum(report, source_check))
        },
        crate::cli::error_kind,
    )?;
    Ok(batch.finish(quiet)?)
}
