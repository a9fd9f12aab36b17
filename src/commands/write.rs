//! `livestick write ISO TARGET`: inspect → plan → (dry run | apply) → report.

use std::fs::File;
use std::io::{BufReader, IsTerminal};
use std::path::Path;

use anyhow::{Context, bail};

use crate::apply::{self, ApplyOptions, Prepared};
use crate::boot::cmdline::KernelArgs;
use crate::boot::syslinux;
use crate::cli::{TableArg, WriteArgs};
use crate::disk::ext4::{self, Ext4Options};
use crate::disk::partition::TableKind;
use crate::disk::target::{self, TargetKind};
use crate::plan::{self, FormatMode, HomeEncryption, Plan, WriteOptions};
use crate::progress::{Progress, ProgressMode};
use crate::size::{MIB, human, parse_size};
use crate::source::{checksum, live};

/// A problem with what the user gave us (exit code 2), as opposed to an I/O failure.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

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

fn options_from(args: &WriteArgs) -> anyhow::Result<WriteOptions> {
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
    let home_size = mib("home-size-mb", args.home_size_mb)?;
    let home_encryption = if args.unencrypted_home {
        HomeEncryption::None
    } else {
        HomeEncryption::Luks
    };
    Ok(WriteOptions {
        format,
        table,
        label: args.label.clone(),
        live_dir: args.livedir.clone(),
        overlay_size: mib("overlay-size-mb", args.overlay_size_mb)?,
        overlayfs: args.overlayfs,
        home_size,
        home_encryption,
        swap_size: mib("swap-size-mb", args.swap_size_mb)?,
        extra_args: KernelArgs::parse(args.extra_kernel_args.as_deref().unwrap_or("")),
        timeout_secs: args.timeout,
        volume_id,
        bios: true,
    })
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
    if !args.dry_run {
        target::check_safe(&probe, args.force)?;
    }
    let existing = match opts.format {
        FormatMode::Always => None,
        FormatMode::Auto | FormatMode::Never if probe.exists && probe.size > 0 => {
            let names = [format!("/{}", opts.live_dir)];
            let found = apply::read_existing(target_path, &opts.live_dir, &names);
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
            "{} fails its implanted MD5 check ({outcome:?}): the ISO is corrupt or incomplete — download it again (or pass --noverify to write it anyway)",
            live.path.display()
        )));
    }
    Ok(Some(md5.md5_hex()))
}

fn prepare(plan: &Plan, args: &WriteArgs, workdir: &Path) -> anyhow::Result<Prepared> {
    let mut prepared = Prepared {
        home: None,
        swap: None,
        overlay_image: None,
        syslinux: None,
    };
    if let Some(home) = &plan.home {
        match home.encryption {
            HomeEncryption::None => {
                let path = workdir.join("home.img");
                ext4::make_ext4_image(&path, home.size, "HOME", &Ext4Options::default())
                    .context("making home.img")?;
                prepared.home = Some(File::open(&path)?);
            }
            HomeEncryption::Luks => {
                let _ = args;
                bail!(BadInput(
                    "an encrypted home.img is not available in this build yet; add --unencrypted-home for a plain ext4 home".into()
                ));
            }
        }
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
        prepared.overlay_image = Some(File::open(&path)?);
    }
    if plan.swap.is_some() {
        bail!(BadInput(
            "--swap-size-mb is not available in this build yet".into()
        ));
    }
    Ok(prepared)
}

pub fn run(args: &WriteArgs, json: bool, quiet: bool) -> anyhow::Result<()> {
    if args.targets.len() != 1 || args.wait_for.is_some() {
        bail!(BadInput(
            "writing several targets at once is not available in this build yet; give one target".into()
        ));
    }
    let target = &args.targets[0];
    let opts = options_from(args)?;
    let live = live::inspect(&args.iso)?;
    let (plan, probe, syslinux_files) = make_plan(args, target, &opts, &live)?;
    if args.dry_run {
        if json {
            println!("{}", serde_json::to_string_pretty(&plan)?);
        } else {
            print!("{}", plan.to_table());
        }
        return Ok(());
    }
    let mode = if json {
        ProgressMode::Json
    } else if quiet || !std::io::stderr().is_terminal() {
        ProgressMode::Quiet
    } else {
        ProgressMode::Bar
    };
    let progress = Progress::new(mode, probe.path.display().to_string());
    let md5 = if args.noverify {
        None
    } else {
        verify_iso(&live, &progress)?
    };
    if probe.kind == TargetKind::BlockDevice {
        let question = format!(
            "Erase and write {} ({} {}, serial {})?",
            probe.path.display(),
            probe.model.as_deref().unwrap_or("unknown model"),
            human(probe.size),
            probe.serial.as_deref().unwrap_or("unknown")
        );
        if !super::confirm(&question, args.yes)? {
            bail!(BadInput("not confirmed; nothing was written".into()));
        }
    }
    let workdir = tempfile::Builder::new()
        .prefix("livestick-")
        .tempdir()
        .context("creating a temporary directory")?;
    let mut prepared = prepare(&plan, args, workdir.path())?;
    prepared.syslinux = syslinux_files;
    let report = apply::apply(
        &plan,
        &probe,
        prepared,
        &ApplyOptions {
            verify_write: !args.no_verify_write,
        },
        &progress,
    )
    .map_err(|e| {
        anyhow::Error::new(e).context(format!(
            "writing {} did not complete; the stick is incomplete and will not boot — run the same command again",
            probe.path.display()
        ))
    })?;
    if json {
        let mut value = serde_json::to_value(&report)?;
        value["iso_md5"] = serde_json::json!(md5);
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else if !quiet {
        println!(
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
        println!(
            "  {} files, {} {}; boots BIOS: {}, UEFI: {}",
            report.files.len(),
            human(report.files.iter().map(|f| f.size).sum()),
            if report.verified {
                "verified by read-back"
            } else {
                "not verified"
            },
            if report.bios { "yes" } else { "no" },
            if report.uefi { "yes" } else { "no" }
        );
        if md5.is_some() {
            println!("  ISO implanted MD5 checked: passed");
        }
        for w in &report.warnings {
            println!("  warning: {w}");
        }
    }
    Ok(())
}
