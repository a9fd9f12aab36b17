//! `livestick write ISO TARGET`: inspect → plan → (dry run | apply) → report.

use std::fs::File;
use std::io::{BufReader, IsTerminal};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use anyhow::{Context, bail};

use crate::apply::{self, ApplyOptions, Prepared, SparseImage};
use crate::batch;
use crate::boot::cmdline::DracutNames;
use crate::boot::cmdline::KernelArgs;
use crate::boot::syslinux;
use crate::cli::write::{DracutNamesArg, TableArg, WriteArgs};
use crate::disk::devices;
use crate::disk::ext4::{self, Ext4Options};
use crate::disk::identity;
use crate::disk::partition::TableKind;
use crate::disk::target::{self, TargetKind};
use crate::error::{BadInput, PartialBatchFailure};
use crate::persist::home::{self, PassphraseSource};
use crate::persist::luks::{LuksParams, PbkdfKind};
use crate::persist::swap;
use crate::plan::{self, FormatMode, HomeEncryption, Plan, WriteOptions};
use crate::progress::{Progress, ProgressMode};
use crate::size::{MIB, human, parse_size};
use crate::source::{checksum, compressed, initrd, live};

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

/// The overlay argument spelling the ISO's initrd understands, and whether its
/// version was unreadable (then the classic spelling, which the plan notes).
fn resolve_dracut(args: &WriteArgs, live: &live::LiveImage) -> (DracutNames, bool) {
    match args.dracut_names {
        DracutNamesArg::Classic => (DracutNames::Classic, false),
        DracutNamesArg::Renamed => (DracutNames::Renamed, false),
        DracutNamesArg::Auto => {
            let initrd = live
                .primary_menu()
                .menu
                .entries
                .first()
                .and_then(|e| e.initrds.first());
            let version = initrd.and_then(|path| {
                let mut source = apply::open_source(live).ok()?;
                let mut reader = source.open(path, 0).ok()?;
                initrd::dracut_version(&mut reader, 512 << 20)
            });
            match version {
                Some(v) if initrd::uses_renamed_overlay_args(&v) => (DracutNames::Renamed, false),
                Some(_) => (DracutNames::Classic, false),
                None => (DracutNames::Classic, true),
            }
        }
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
    let home_size = match args.home_size_mb {
        Some(n) => Some(
            home::home_size_from_mib(n, home_encryption == HomeEncryption::Luks)
                .map_err(|e| BadInput(format!("--home-size-mb: {e}")))?,
        ),
        None => None,
    };
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
        iso_md5: claimed_md5(live),
    })
}

/// The implanted MD5 an ISO claims (read from its header, not computed).
fn claimed_md5(live: &live::LiveImage) -> Option<String> {
    if live.source_kind != live::SourceKind::Iso || !live.implanted_md5 {
        return None;
    }
    let iso = live::open_iso(&live.path).ok()?;
    checksum::implanted_md5(iso.application_data()).map(|md5| md5.md5_hex())
}

/// What the plan needs to know about the overlay an existing stick keeps: whether
/// its root image is the one this write copies, and how much the overlay holds.
/// Read here, before planning, so that planning stays pure.
fn inspect_kept_overlay(
    target_path: &Path,
    fs: &mut plan::ExistingFs,
    opts: &WriteOptions,
    live: &live::LiveImage,
) {
    let Some((overlay, len)) = fs.current_overlay(&opts.live_dir) else {
        return;
    };
    if opts.overlay_size.is_some() || opts.copy_overlay || opts.multi {
        return;
    }
    fs.overlay_used = crate::live_source::overlay_used(target_path, &overlay, len);
    if opts.reset_overlay || opts.skipcopy {
        return;
    }
    let iso_sha256 = || -> std::io::Result<String> {
        let mut source = apply::open_source(live).map_err(std::io::Error::other)?;
        let reader = source
            .open(&live.squashfs.path, live.squashfs.size)
            .map_err(std::io::Error::other)?;
        Ok(checksum::hex(&checksum::sha256_reader(reader)?))
    };
    fs.root = Some(crate::live_source::compare_root(
        target_path,
        fs,
        live,
        &opts.live_dir,
        opts.iso_md5.as_deref(),
        iso_sha256,
    ));
}

/// Builds the plan for one target; every input check happens here.
pub fn make_plan(
    args: &WriteArgs,
    target_path: &Path,
    opts: &WriteOptions,
    live: &live::LiveImage,
) -> anyhow::Result<(Plan, target::TargetProbe, Option<syslinux::SyslinuxFiles>)> {
    let probe = target::probe(target_path)?;
    let requested = match &args.size {
        Some(text) => Some(parse_size(text).map_err(|e| BadInput(format!("--size: {e}")))?),
        None => None,
    };
    let target_size = target::planned_size(&probe, requested)?;
    // A dry run too: a plan is never shown for a target `write` would refuse.
    target::check_safe(&probe, args.force)?;
    let existing = match opts.format {
        FormatMode::Always => None,
        FormatMode::Auto | FormatMode::Never if probe.exists && probe.size > 0 => {
            if !args.dry_run {
                // Leftovers of a stopped replacement first (issue 13): reading the stick
                // refuses chains two entries share. A target that is no stick yet has
                // none; its real errors come from reading it just below.
                let live_dir = &opts.live_dir;
                for line in crate::persist::merge::replace::repair_stick(target_path, live_dir)
                    .unwrap_or_default()
                {
                    eprintln!("livestick write: repaired: {line}");
                }
            }
            let found = apply::read_existing(target_path);
            match (found, opts.format) {
                (Ok(Some(fs)), _) => Some(fs),
                (Ok(None), FormatMode::Never) => bail!(BadInput(format!(
                    "{} has no partition table and --noformat was given; drop --noformat to create one",
                    target_path.display()
                ))),
                (Ok(None), _) => None,
                (Err(e), FormatMode::Auto)
                    if probe.kind == TargetKind::ImageFile && is_blank(target_path) =>
                {
                    let _ = e;
                    None
                }
                (Err(e), _) => return Err(e.into()),
            }
        }
        FormatMode::Never => bail!(BadInput(format!(
            "{} is empty and --noformat was given; drop --noformat to format it",
            target_path.display()
        ))),
        FormatMode::Auto => None,
    };
    let existing = existing.map(|mut fs| {
        inspect_kept_overlay(target_path, &mut fs, opts, live);
        fs
    });
    let syslinux_files = syslinux::locate()?;
    let plan = plan::plan_write(
        live,
        &probe,
        target_size,
        existing,
        opts,
        Some(&syslinux_files.modules_dir),
    )?;
    Ok((plan, probe, Some(syslinux_files)))
}

/// An image file whose first MiB is all zeros has nothing worth keeping.
fn is_blank(path: &Path) -> bool {
    use std::io::Read;
    let mut head = vec![0u8; 1 << 20];
    match File::open(path).and_then(|mut f| f.read(&mut head)) {
        Ok(n) => head[..n].iter().all(|&b| b == 0),
        Err(_) => false,
    }
}

fn verify_iso(live: &live::LiveImage, progress: &Progress) -> anyhow::Result<Option<String>> {
    if live.source_kind != live::SourceKind::Iso {
        // A stick has no implanted checksum; its files are verified on read-back.
        return Ok(None);
    }
    let mut iso = live::open_iso(&live.path)?;
    let Some(md5) = checksum::implanted_md5(iso.application_data()) else {
        return Ok(None);
    };
    let volume_size = iso.volume_size();
    let _ = iso.lookup("/");
    let mut reader = BufReader::with_capacity(1 << 20, File::open(&live.path)?);
    progress.phase("md5", volume_size);
    let mut last = 0u64;
    let outcome = checksum::verify_implanted_md5(&mut reader, &md5, volume_size, |done, _| {
        progress.inc(done.saturating_sub(last));
        last = done;
    })
    .with_context(|| format!("checking the implanted MD5 of {}", live.path.display()))?;
    if !outcome.passed() {
        bail!(BadInput(format!(
            "{} fails its implanted MD5 check ({outcome}): the ISO is corrupt or incomplete — download it again (or pass --noverify to write it anyway)",
            live.path.display()
        )));
    }
    Ok(Some(md5.md5_hex()))
}

fn luks_params(args: &WriteArgs) -> LuksParams {
    let mut params = LuksParams::default();
    if let Some(kdf) = &args.luks_pbkdf {
        params.pbkdf = if kdf == "pbkdf2" {
            PbkdfKind::Pbkdf2
        } else {
            PbkdfKind::Argon2id
        };
    }
    if let Some(ms) = args.luks_iter_time {
        params.iter_time_ms = ms;
    }
    if let Some(kib) = args.luks_pbkdf_memory {
        params.memory_kib = kib;
    }
    params
}

fn passphrase_source(args: &WriteArgs) -> PassphraseSource {
    match (&args.passphrase_file, args.passphrase_stdin) {
        (Some(path), _) => PassphraseSource::File(path.clone()),
        (None, true) => PassphraseSource::Stdin,
        (None, false) => PassphraseSource::Terminal,
    }
}

fn prepare(
    plan: &Plan,
    args: &WriteArgs,
    passphrase: Option<&Zeroizing<Vec<u8>>>,
    workdir: &Path,
) -> anyhow::Result<Prepared> {
    let mut prepared = Prepared {
        home: None,
        swap: None,
        overlay: None,
        copied: copied_persistence(plan, args)?,
        syslinux: None,
    };
    if let Some(home_step) = &plan.home {
        let encryption = match home_step.encryption {
            HomeEncryption::None => home::HomeEncryption::None,
            HomeEncryption::Luks => {
                let passphrase = passphrase
                    .cloned()
                    .ok_or_else(|| BadInput("an encrypted home needs a passphrase".into()))?;
                home::HomeEncryption::Luks {
                    passphrase,
                    params: luks_params(args),
                }
            }
        };
        let image = home::build_home_image(workdir, home_step.size, encryption)
            .context("building home.img")?;
        let regions = image.data_regions();
        prepared.home = Some(SparseImage::new(Box::new(image), home_step.size, regions));
    }
    if let Some(overlay) = &plan.overlay
        && overlay.kind == crate::boot::cmdline::OverlayBoot::OverlayFs
    {
        // dracut mounts this file as ext4 and uses overlayfs/ as the upper and
        // ovlwork/ as the work directory.
        let root = workdir.join("overlay-root");
        std::fs::create_dir_all(root.join("overlayfs"))?;
        std::fs::create_dir_all(root.join("ovlwork"))?;
        let path = workdir.join("overlay.img");
        let opts = Ext4Options {
            root_dir: Some(root),
            ..Ext4Options::default()
        };
        ext4::make_ext4_image(&path, overlay.size, "", &opts)
            .context("making the OverlayFS overlay")?;
        let image = File::open(&path)?;
        let regions = crate::disk::sparse::data_regions(&image)?;
        prepared.overlay = Some(SparseImage::new(Box::new(image), overlay.size, regions));
    } else if let Some(overlay) = &plan.overlay {
        // A new dm-snapshot store is a zeroed header: finding it, the kernel writes
        // the header and zeroes each exception area itself before using it.
        prepared.overlay = Some(SparseImage::zeros(
            overlay.size,
            std::iter::once(crate::persist::snapshot::new_store_range(overlay.size)),
        ));
    }
    if let Some(swap_step) = &plan.swap {
        let header = swap::swap_header(swap_step.size, None, uuid::Uuid::new_v4())
            .map_err(|e| BadInput(format!("--swap-size-mb: {e}")))?;
        // The kernel reads only the first page; swapon writes the rest as it pages out.
        let page = header.len() as u64;
        prepared.swap = Some(SparseImage::new(
            Box::new(crate::io::Zeros::with_prefix(header, swap_step.size)),
            swap_step.size,
            std::iter::once(0..page),
        ));
    }
    Ok(prepared)
}

/// The overlay and home a write carries over from a source stick, each read in place
/// and written only where its format says it is used: a dm-snapshot store's header,
/// metadata areas and exception chunks; an ext4 file system's in-use blocks. A LUKS
/// home cannot be read without its passphrase and is copied whole.
fn copied_persistence(plan: &Plan, args: &WriteArgs) -> anyhow::Result<Vec<(String, SparseImage)>> {
    use crate::plan::CopySource;
    let mut out = Vec::new();
    for copy in &plan.copies {
        let CopySource::Iso { path } = &copy.source else {
            continue;
        };
        let name = path.rsplit('/').next().unwrap_or("").to_ascii_lowercase();
        let overlay = args.copy_overlay && crate::layout::is_overlay_name(&name);
        let home = args.copy_home && name == crate::layout::HOME;
        if !overlay && !home {
            continue;
        }
        let mut stick = crate::disk::stick::Stick::open(&plan.source, false)
            .with_context(|| format!("opening {}", plan.source.display()))?;
        let extents = stick
            .file_extents(path)
            .with_context(|| format!("finding {path} on {}", plan.source.display()))?;
        drop(stick);
        let file = File::open(&plan.source)
            .with_context(|| format!("opening {}", plan.source.display()))?;
        let mut content = crate::disk::extent_file::ExtentFile::new(file, &extents);
        let whole = vec![0..copy.size];
        let regions = match home::detect_home_kind(&mut content)? {
            Some(home::HomeKind::Plain) => match extents.as_slice() {
                // dumpe2fs reads the file system by offset: one extent only.
                [(at, _)] => ext4::used_regions(&plan.source, *at, copy.size)
                    .with_context(|| format!("reading the block bitmaps of {path}"))?,
                _ => whole,
            },
            Some(home::HomeKind::Luks2) => whole,
            None => match crate::persist::snapshot::open_store(&mut content, copy.size) {
                Ok(crate::persist::snapshot::Opened::Valid(store)) => store.used_regions(),
                Ok(crate::persist::snapshot::Opened::Uninitialised { .. }) => {
                    std::iter::once(crate::persist::snapshot::new_store_range(copy.size)).collect()
                }
                _ => whole,
            },
        };
        out.push((
            copy.dest.clone(),
            SparseImage::new(Box::new(content), copy.size, regions),
        ));
    }
    Ok(out)
}

/// Asks before erasing a block device or deleting home.img (unless --yes).
fn confirm_target(
    plan: &Plan,
    probe: &target::TargetProbe,
    args: &WriteArgs,
) -> anyhow::Result<()> {
    if probe.kind == TargetKind::BlockDevice {
        let mut question = target::confirm_text(probe);
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

fn progress_mode(json: bool, quiet: bool) -> ProgressMode {
    if json {
        ProgressMode::Json
    } else if quiet || !std::io::stderr().is_terminal() {
        ProgressMode::Quiet
    } else {
        ProgressMode::Bar
    }
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

fn incomplete(path: &Path) -> impl FnOnce(apply::ApplyError) -> anyhow::Error + '_ {
    move |e| {
        anyhow::Error::new(e).context(format!(
            "writing {} did not complete; the stick is incomplete and will not boot — run the same command again",
            path.display()
        ))
    }
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
    workdir: &Path,
    source: &mut dyn apply::IsoSource,
    progress: &Progress,
) -> anyhow::Result<apply::ApplyReport> {
    std::fs::create_dir_all(workdir)?;
    let mut prepared = prepare(plan, args, passphrase, workdir)?;
    prepared.syslinux = syslinux_files;
    let created = target::CreatedImage::create(probe)?;
    let probe = match &created {
        // apply opens what is now an existing file, the one made just above.
        Some(_) => &target::TargetProbe {
            exists: true,
            ..probe.clone()
        },
        None => probe,
    };
    let result = apply::apply(
        plan,
        probe,
        source,
        prepared,
        &ApplyOptions {
            verify_write: !args.no_verify_write,
        },
        progress,
    );
    match (result, created) {
        (Ok(report), _) => Ok(report),
        (Err(e), Some(image)) => Err(remove_new_image(image, e)),
        (Err(e), None) => Err(incomplete(&probe.path)(e)),
    }
}

/// A new image that a failed write leaves is incomplete and boots nothing,
/// and often sits on the file system that just ran full: it is removed.
fn remove_new_image(image: target::CreatedImage, e: apply::ApplyError) -> anyhow::Error {
    let path = image.path().display().to_string();
    let outcome = match image.remove() {
        Ok(true) => format!(
            "the new image file {path} was removed; fix the cause and run the same command again"
        ),
        Ok(false) => {
            format!("{path} is no longer the file this write created, so it was left alone")
        }
        Err(r) => format!(
            "the new image file {path} is incomplete and could not be removed ({r}); delete it, fix the cause and run the same command again"
        ),
    };
    anyhow::Error::new(e).context(format!("writing {path} did not complete; {outcome}"))
}

pub fn run(args: &WriteArgs, json: bool, quiet: bool) -> anyhow::Result<()> {
    // Before the source is inspected or any target probed: a target that is
    // the source (or a batch naming one stick twice) is refused by identity.
    identity::check_distinct(&args.iso, &args.targets)?;
    if args.targets.len() > 1 || args.wait_for.is_some() {
        return run_batch(args, json, quiet);
    }
    let target = args
        .targets
        .first()
        .ok_or_else(|| BadInput("give a target stick or image file".into()))?;
    let unpacked = compressed::open(&args.iso, progress_mode(json, quiet))?;
    let live = crate::live_source::inspect(unpacked.path())?;
    let opts = options_from(args, &live)?;
    let (mut plan, probe, syslinux_files) = make_plan(args, target, &opts, &live)?;
    plan.notes.extend(unpacked.note());
    if args.dry_run {
        if json {
            crate::outln!("{}", serde_json::to_string_pretty(&plan)?);
        } else {
            crate::out!("{}", plan.to_table());
        }
        return Ok(());
    }
    let progress = Progress::new(progress_mode(json, quiet), probe.path.display().to_string());
    let md5 = if args.noverify {
        None
    } else {
        verify_iso(&live, &progress)?
    };
    confirm_target(&plan, &probe, args)?;
    let passphrase = home_passphrase(args, needs_passphrase(&[&plan]))?;
    let workdir = tempfile::Builder::new()
        .prefix("livestick-")
        .tempdir()
        .context("creating a temporary directory")?;
    let mut source = apply::open_source(&live)?;
    let report = write_one(
        args,
        &plan,
        &probe,
        syslinux_files,
        passphrase.as_ref(),
        workdir.path(),
        source.as_mut(),
        &progress,
    )?;
    if json {
        let mut value = serde_json::to_value(&report)?;
        value["iso_md5"] = serde_json::json!(md5);
        value["iso_check"] = serde_json::json!(plan.iso_check);
        crate::outln!("{}", serde_json::to_string_pretty(&value)?);
    } else if !quiet {
        print_report(&live, &report, md5.is_some());
        if let Some(note) = plan.iso_check.note(&live) {
            crate::outln!("  note: {note}");
        }
    }
    Ok(())
}

fn print_report(live: &live::LiveImage, report: &apply::ApplyReport, md5_checked: bool) {
    crate::outln!(
        "Wrote {} to {}: {} FAT32 \"{}\" UUID {}{}{}",
        live.label,
        report.target,
        report.table,
        report.label,
        report.fs_uuid,
        report
            .overlay
            .as_ref()
            .map(|o| format!(", overlay {o}"))
            .unwrap_or_default(),
        report
            .home
            .as_ref()
            .map(|h| format!(", home {h}"))
            .unwrap_or_default()
    );
    crate::outln!(
        "  {} files, {}; boots BIOS: {}, UEFI: {}",
        report.files.len(),
        human(report.files.iter().map(|f| f.size).sum()),
        if report.bios { "yes" } else { "no" },
        if report.uefi { "yes" } else { "no" }
    );
    // Persistence is allocated, not written: what the stick really took is this.
    crate::outln!(
        "  {} written to the stick, {}",
        human(report.bytes_written),
        if report.verified {
            format!("{} read back and verified", human(report.bytes_verified))
        } else {
            "not verified".to_string()
        }
    );
    if let Some(kept) = &report.kept_overlay {
        if kept.reset {
            println!(
                "  overlay {} emptied, its {} discarded: {}",
                kept.to,
                kept.used_text(),
                kept.why
            );
        } else {
            println!(
                "  overlay {} kept with its {}: {}",
                kept.to,
                kept.used_text(),
                kept.why
            );
        }
    }
    if md5_checked {
        crate::outln!("  ISO implanted MD5 checked: passed");
    }
    for w in &report.warnings {
        crate::outln!("  warning: {w}");
    }
}

/// The schema version of the NDJSON events `write --json` prints for a batch
/// (docs/ndjson-events.md).
pub const EVENTS_SCHEMA: u32 = 2;

fn emit(json: bool, value: serde_json::Value) {
    if json {
        crate::outln!("{value}");
    }
}

enum Outcome {
    Done(Box<apply::ApplyReport>),
    Failed(String),
}

/// Several targets from one read of the ISO: each target is planned, checked
/// and written on its own thread; one that fails is reported and dropped while
/// the others finish.
fn run_batch(args: &WriteArgs, json: bool, quiet: bool) -> anyhow::Result<()> {
    let unpacked = compressed::open(&args.iso, progress_mode(json, quiet))?;
    let live = crate::live_source::inspect(unpacked.path())?;
    let opts = options_from(args, &live)?;
    if let Some(n) = args.wait_for {
        return run_wait_for(args, &live, &opts, n, json, quiet);
    }
    let mut outcomes: Vec<(PathBuf, Option<Outcome>)> = Vec::new();
    let mut planned = Vec::new();
    emit(
        json,
        serde_json::json!({"event": "start", "schema": EVENTS_SCHEMA, "iso": live.path,
            "targets": args.targets}),
    );
    for target in &args.targets {
        // Each target gets its own volume id (and so its own overlay name).
        let mut own = opts.clone();
        own.volume_id = if args.volume_id.is_some() {
            opts.volume_id.wrapping_add(planned.len() as u32)
        } else {
            rand::random()
        };
        match make_plan(args, target, &own, &live) {
            Ok(mut p) => {
                p.0.notes.extend(unpacked.note());
                planned.push((target.clone(), p));
                outcomes.push((target.clone(), None));
            }
            Err(e) => {
                let msg = format!("{e:#}");
                emit(
                    json,
                    serde_json::json!({"event": "failed", "device": target, "phase": "plan", "error": msg}),
                );
                outcomes.push((target.clone(), Some(Outcome::Failed(msg))));
            }
        }
    }
    if args.dry_run {
        let plans: Vec<&Plan> = planned.iter().map(|(_, (p, _, _))| p).collect();
        if json {
            crate::outln!("{}", serde_json::to_string_pretty(&plans)?);
        } else {
            for p in plans {
                crate::out!("{}", p.to_table());
            }
        }
        return finish_batch(outcomes, json, quiet);
    }
    let md5 = if args.noverify {
        None
    } else {
        verify_iso(&live, &Progress::new(progress_mode(json, quiet), "iso"))?
    };
    for (_, (plan, probe, _)) in &planned {
        confirm_target(plan, probe, args)?;
    }
    let plans: Vec<&Plan> = planned.iter().map(|(_, (p, _, _))| p).collect();
    let passphrase = home_passphrase(args, needs_passphrase(&plans))?;
    let workdir = tempfile::Builder::new()
        .prefix("livestick-")
        .tempdir()
        .context("creating a temporary directory")?;

    // Every plan copies the same ISO files in the same order (same ISO, same
    // options), which is what lets one reader feed them all.
    let iso_files: Vec<(String, u64)> = planned
        .first()
        .map(|(_, (p, _, _))| iso_files_of(p))
        .unwrap_or_default();
    let same = planned
        .iter()
        .all(|(_, (p, _, _))| iso_files_of(p) == iso_files);
    let (reader, mut sources): (
        Option<std::thread::JoinHandle<()>>,
        Vec<Box<dyn apply::IsoSource + Send>>,
    ) = if same {
        let (handle, sources) =
            batch::broadcast(apply::open_source(&live)?, iso_files, planned.len());
        (
            Some(handle),
            sources
                .into_iter()
                .map(|s| Box::new(s) as Box<dyn apply::IsoSource + Send>)
                .collect(),
        )
    } else {
        let mut v: Vec<Box<dyn apply::IsoSource + Send>> = Vec::new();
        for _ in &planned {
            v.push(apply::open_source(&live)?);
        }
        (None, v)
    };

    let multi = indicatif::MultiProgress::new();
    let mode = progress_mode(json, quiet);
    let results: Vec<(PathBuf, Outcome)> = std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for (i, (target, (plan, probe, syslinux_files))) in planned.iter().enumerate() {
            let source = sources.remove(0);
            let progress = Progress::in_multi(mode, &multi, target.display().to_string());
            let passphrase = passphrase.clone();
            let workdir = workdir.path().join(format!("target-{i}"));
            handles.push(scope.spawn(move || {
                let mut source = source;
                let result = write_one(
                    args,
                    plan,
                    probe,
                    syslinux_files.clone(),
                    passphrase.as_ref(),
                    &workdir,
                    source.as_mut(),
                    &progress,
                );
                // Dropping the source lets the reader skip this target.
                drop(source);
                progress.finish();
                let outcome = match result {
                    Ok(r) => Outcome::Done(Box::new(r)),
                    Err(e) => Outcome::Failed(format!("{e:#}")),
                };
                (target.clone(), outcome)
            }));
        }
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    (
                        PathBuf::from("?"),
                        Outcome::Failed("writer thread panicked".into()),
                    )
                })
            })
            .collect()
    });
    if let Some(handle) = reader {
        let _ = handle.join();
    }
    for (target, outcome) in results {
        match &outcome {
            Outcome::Done(r) => emit(
                json,
                serde_json::json!({"event": "done", "device": target, "report": r, "iso_md5": md5}),
            ),
            Outcome::Failed(e) => emit(
                json,
                serde_json::json!({"event": "failed", "device": target, "phase": "write", "error": e}),
            ),
        }
        if let Some(slot) = outcomes
            .iter_mut()
            .find(|(t, o)| t == &target && o.is_none())
        {
            slot.1 = Some(outcome);
        }
    }
    finish_batch(outcomes, json, quiet)
}

fn iso_files_of(plan: &Plan) -> Vec<(String, u64)> {
    plan.copies
        .iter()
        .filter_map(|c| match &c.source {
            crate::plan::CopySource::Iso { path } => Some((path.clone(), c.size)),
            crate::plan::CopySource::Host { .. } => None,
        })
        .collect()
}

fn finish_batch(
    outcomes: Vec<(PathBuf, Option<Outcome>)>,
    json: bool,
    quiet: bool,
) -> anyhow::Result<()> {
    let total = outcomes.len();
    let mut details = Vec::new();
    let mut rows = Vec::new();
    for (target, outcome) in &outcomes {
        match outcome {
            Some(Outcome::Done(r)) => rows.push(serde_json::json!({"device": target, "ok": true,
                "label": r.label, "fs_uuid": r.fs_uuid, "verified": r.verified})),
            Some(Outcome::Failed(e)) => {
                details.push(format!("{}: {e}", target.display()));
                rows.push(serde_json::json!({"device": target, "ok": false, "error": e}));
            }
            None => rows.push(serde_json::json!({"device": target, "ok": true, "dry_run": true})),
        }
    }
    emit(
        json,
        serde_json::json!({"event": "report", "targets": rows}),
    );
    if !json && !quiet {
        crate::outln!("{:<32} {:<8} DETAIL", "TARGET", "RESULT");
        for (target, outcome) in &outcomes {
            let (result, detail) = match outcome {
                Some(Outcome::Done(r)) => (
                    "ok",
                    format!(
                        "{} UUID {} {}",
                        r.label,
                        r.fs_uuid,
                        if r.verified {
                            "verified"
                        } else {
                            "not verified"
                        }
                    ),
                ),
                Some(Outcome::Failed(e)) => ("FAILED", e.lines().next().unwrap_or("").to_string()),
                None => ("planned", String::new()),
            };
            crate::outln!("{:<32} {:<8} {}", target.display(), result, detail);
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

/// `--wait-for N`: write each stick as it is plugged in. The sticks arrive at
/// different times, so each reads the ISO itself (from the page cache after
/// the first) instead of sharing one broadcast.
fn run_wait_for(
    args: &WriteArgs,
    live: &live::LiveImage,
    opts: &WriteOptions,
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
    let md5 = if args.noverify {
        None
    } else {
        verify_iso(live, &Progress::new(progress_mode(json, quiet), "iso"))?
    };
    let passphrase = home_passphrase(
        args,
        opts.home_size.is_some() && opts.home_encryption == HomeEncryption::Luks,
    )?;
    let workdir = tempfile::Builder::new()
        .prefix("livestick-")
        .tempdir()
        .context("creating a temporary directory")?;
    emit(
        json,
        serde_json::json!({"event": "start", "schema": EVENTS_SCHEMA, "iso": live.path, "wait_for": n}),
    );
    if !json && !quiet {
        eprintln!("Waiting for {n} stick(s) to be plugged in…");
    }
    let multi = indicatif::MultiProgress::new();
    let mode = progress_mode(json, quiet);
    let outcomes = std::sync::Mutex::new(Vec::<(PathBuf, Option<Outcome>)>::new());
    let wait_result = std::thread::scope(|scope| {
        let mut index = 0usize;
        // With --force, fixed disks (and loop devices) that appear count too.
        devices::wait_for_new_devices(n, None, args.force, |device| {
            index += 1;
            let mut own = opts.clone();
            own.volume_id = rand::random();
            let workdir = workdir.path().join(format!("target-{index}"));
            let passphrase = passphrase.clone();
            let progress = Progress::in_multi(mode, &multi, device.display().to_string());
            let outcomes = &outcomes;
            let md5 = md5.clone();
            emit(
                json,
                serde_json::json!({"event": "plugged", "device": device}),
            );
            scope.spawn(move || {
                let result = (|| -> anyhow::Result<apply::ApplyReport> {
                    identity::check_distinct(&args.iso, std::slice::from_ref(&device))?;
                    let (plan, probe, syslinux_files) = make_plan(args, &device, &own, live)?;
                    let mut source = apply::open_source(live)?;
                    write_one(
                        args,
                        &plan,
                        &probe,
                        syslinux_files,
                        passphrase.as_ref(),
                        &workdir,
                        source.as_mut(),
                        &progress,
                    )
                })();
                progress.finish();
                let outcome = match result {
                    Ok(r) => {
                        emit(json, serde_json::json!({"event": "done", "device": device, "report": r, "iso_md5": md5}));
                        Outcome::Done(Box::new(r))
                    }
                    Err(e) => {
                        let msg = format!("{e:#}");
                        emit(json, serde_json::json!({"event": "failed", "device": device, "phase": "write", "error": msg}));
                        Outcome::Failed(msg)
                    }
                };
                if let Ok(mut all) = outcomes.lock() {
                    all.push((device, Some(outcome)));
                }
            });
        })
    });
    let outcomes = outcomes.into_inner().unwrap_or_default();
    wait_result?;
    finish_batch(outcomes, json, quiet)
}
