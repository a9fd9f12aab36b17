//! `livestick overlay status|merge|reset|recover|grow`: maintenance of the persistent
//! dm-snapshot overlay, on a bare overlay file (with its squashfs.img or root image).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, IsTerminal, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::persist::merge::{self, MergeRequest};
use crate::persist::snapshot::{
    self, FAT_MAX_FILE_BYTES, LIVEOS_CHUNK_SECTORS, Opened, RESET_BYTES, SECTOR_BYTES,
};
use crate::progress::{Progress, ProgressMode};
use crate::size::{MIB, human, parse_size};
use crate::squash::Compressor;

#[derive(Debug, Subcommand)]
pub enum OverlayCommand {
    /// What `dmsetup status` would print for the overlay, plus chunk size, exceptions,
    /// percent used and bytes free
    #[command(
        after_help = "Examples:\n  livestick overlay status LiveOS/overlay-Fedora-41-1-5-1a2b-3c4d\n  livestick overlay status overlay.img --origin rootfs.img --json"
    )]
    Status(StatusArgs),
    /// Merge the overlay into a new squashfs.img (recompressed), then reset the overlay;
    /// or, with --origin, merge it into a bare root image like dm `snapshot-merge`
    #[command(
        after_help = "Examples:\n  livestick overlay merge LiveOS/overlay-L-U --squashfs LiveOS/squashfs.img --workdir /var/tmp\n  livestick overlay merge overlay.img --origin rootfs.img            # in place, like snapshot-merge\n  livestick overlay merge overlay.img --origin rootfs.img --output merged.img"
    )]
    Merge(MergeArgs),
    /// Empty the overlay (a new store); everything it holds is lost
    Reset(ResetArgs),
    /// Make an overlay the kernel marked Invalid usable again (after validating it)
    Recover(RecoverArgs),
    /// Make the overlay file larger, keeping every change in it
    Grow(GrowArgs),
}

#[derive(Debug, Args)]
pub struct OriginArgs {
    /// The root image the overlay belongs to (rootfs.img), for range checks
    #[arg(long, value_name = "IMAGE")]
    pub origin: Option<PathBuf>,
    /// The root image's size instead of the image itself (e.g. 6G)
    #[arg(long, value_name = "SIZE", conflicts_with = "origin")]
    pub origin_size: Option<String>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Overlay file (LiveOS/overlay-LABEL-UUID)
    pub target: PathBuf,
    #[command(flatten)]
    pub origin: OriginArgs,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Overlay file (LiveOS/overlay-LABEL-UUID)
    pub target: PathBuf,
    /// Plumbing: merge into this bare root image (in place unless --output); no squashfs
    #[arg(long, value_name = "IMAGE", conflicts_with = "squashfs")]
    pub origin: Option<PathBuf>,
    /// With --origin: write the merged image here and change neither input
    #[arg(long, value_name = "FILE", requires = "origin")]
    pub output: Option<PathBuf>,
    /// The squashfs.img holding the root image (default: squashfs.img next to the overlay)
    #[arg(long, value_name = "PATH")]
    pub squashfs: Option<PathBuf>,
    /// Where to extract and rebuild (needs the root image size plus the new squashfs)
    #[arg(long, value_name = "DIR", default_value = "/var/tmp")]
    pub workdir: PathBuf,
    /// Do not run `e2fsck -f -p` on the merged root image
    #[arg(long)]
    pub no_fsck: bool,
    /// Compressor for the new squashfs (default: the one the old image used)
    #[arg(long, value_enum)]
    pub compress: Option<Compressor>,
    /// Print the plan (with the space needed) and change nothing
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct ResetArgs {
    /// Overlay file (LiveOS/overlay-LABEL-UUID)
    pub target: PathBuf,
    /// Do not ask for confirmation
    #[arg(long, short)]
    pub yes: bool,
    /// Say what would be lost and change nothing
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct RecoverArgs {
    /// Overlay file (LiveOS/overlay-LABEL-UUID)
    pub target: PathBuf,
    #[command(flatten)]
    pub origin: OriginArgs,
    /// Also grow the overlay by this many MiB (an overlay that ran full fails again at once)
    #[arg(long, value_name = "N")]
    pub add_mb: Option<u64>,
    /// Show what would be done and change nothing
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("amount").required(true).args(["size_mb", "add_mb"])))]
pub struct GrowArgs {
    /// Overlay file (LiveOS/overlay-LABEL-UUID)
    pub target: PathBuf,
    /// New total size in MiB (at most 4095: the FAT file size limit)
    #[arg(long, value_name = "N")]
    pub size_mb: Option<u64>,
    /// Add this many MiB
    #[arg(long, value_name = "N")]
    pub add_mb: Option<u64>,
    /// Show the new size and change nothing
    #[arg(long)]
    pub dry_run: bool,
}

pub fn run(cmd: OverlayCommand, json: bool) -> anyhow::Result<()> {
    match cmd {
        OverlayCommand::Status(a) => status(&a, json),
        OverlayCommand::Merge(a) => merge_cmd(&a, json),
        OverlayCommand::Reset(a) => reset(&a, json),
        OverlayCommand::Recover(a) => recover(&a, json),
        OverlayCommand::Grow(a) => grow(&a, json),
    }
}

/// Refuses targets that are whole sticks (partition table or block device) until the
/// stick layer is wired in, instead of misreading a disk as an overlay.
fn overlay_file(path: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    let mut looks_like_disk = meta.file_type().is_block_device();
    if meta.is_file() && meta.len() >= 512 {
        let mut f = File::open(path).with_context(|| format!("{}", path.display()))?;
        let mut sector = [0u8; 512];
        f.read_exact(&mut sector)?;
        // An overlay's chunk 0 is a 16-byte header and zeros; a disk has an MBR signature.
        looks_like_disk |= sector[510] == 0x55 && sector[511] == 0xAA;
    }
    if looks_like_disk {
        bail!(
            "{} is a whole stick or disk image; pass the overlay file itself (LiveOS/overlay-LABEL-UUID on the mounted stick) for now",
            path.display()
        );
    }
    Ok(path.to_path_buf())
}

fn origin_sectors(o: &OriginArgs) -> anyhow::Result<Option<u64>> {
    if let Some(p) = &o.origin {
        let len = std::fs::metadata(p)
            .with_context(|| format!("origin {}", p.display()))?
            .len();
        return Ok(Some(len / SECTOR_BYTES));
    }
    if let Some(s) = &o.origin_size {
        return Ok(Some(parse_size(s)? / SECTOR_BYTES));
    }
    Ok(None)
}

fn open_rw(path: &Path) -> anyhow::Result<(File, u64)> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let len = snapshot::stream_len(&mut f)?;
    Ok((f, len))
}

fn open_ro(path: &Path) -> anyhow::Result<(File, u64)> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = snapshot::stream_len(&mut f)?;
    Ok((f, len))
}

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn progress(json: bool, what: &Path) -> Progress {
    Progress::new(
        if json {
            ProgressMode::Json
        } else {
            ProgressMode::Bar
        },
        what.display().to_string(),
    )
}

/// Adapts the library's `(done, total)` callbacks to a phase-based bar.
struct Phases {
    bar: Progress,
    phase: String,
    last: u64,
}

impl Phases {
    fn new(bar: Progress) -> Phases {
        Phases {
            bar,
            phase: String::new(),
            last: 0,
        }
    }
    fn update(&mut self, phase: &str, done: u64, total: u64) {
        if phase != self.phase {
            self.bar.phase(phase, total);
            self.phase = phase.to_string();
            self.last = 0;
        }
        self.bar.inc(done.saturating_sub(self.last));
        self.last = done;
    }
}

fn status(a: &StatusArgs, json: bool) -> anyhow::Result<()> {
    let path = overlay_file(&a.target)?;
    let (mut f, len) = open_ro(&path)?;
    let report = snapshot::status(
        &mut f,
        len,
        LIVEOS_CHUNK_SECTORS,
        origin_sectors(&a.origin)?,
    )
    .with_context(|| format!("{} is not a usable overlay", path.display()))?;
    if json {
        #[derive(Serialize)]
        struct Out<'a> {
            overlay: &'a Path,
            #[serde(flatten)]
            report: &'a snapshot::StatusReport,
        }
        return print_json(&Out {
            overlay: &path,
            report: &report,
        });
    }
    println!("overlay         {}", path.display());
    println!("state           {}", report.state);
    println!("dmsetup status  {}", report.dm_status);
    println!(
        "chunk size      {} sectors ({})",
        report.chunk_sectors,
        human(u64::from(report.chunk_sectors) * SECTOR_BYTES)
    );
    println!(
        "size            {} ({} sectors)",
        human(report.cow_bytes),
        report.total_sectors
    );
    println!(
        "exceptions      {} in {} metadata area(s)",
        report.exceptions, report.metadata_areas
    );
    println!("used            {:.2} %", report.percent_used);
    println!(
        "free            {} ({} chunks){}",
        human(report.bytes_free),
        report.free_data_chunks,
        if report.full {
            ": FULL, the next new chunk overflows"
        } else {
            ""
        }
    );
    if report.state == "uninitialised" {
        println!("note            new store: the kernel initialises it on first boot");
    }
    if report.trap_size {
        println!(
            "warning         this size lets the last metadata area invalidate the overlay when it fills; `overlay grow --add-mb 1` fixes it"
        );
    }
    for p in &report.problems {
        println!("problem         {p}");
    }
    Ok(())
}

fn merge_cmd(a: &MergeArgs, json: bool) -> anyhow::Result<()> {
    let path = overlay_file(&a.target)?;
    if let Some(origin) = &a.origin {
        return merge_plumbing(&path, origin, a.output.as_deref(), a.dry_run, json);
    }
    let squashfs = match &a.squashfs {
        Some(p) => p.clone(),
        None => {
            let sibling = path.with_file_name("squashfs.img");
            if !sibling.is_file() {
                bail!(
                    "no squashfs.img next to {}; pass --squashfs PATH (or --origin IMAGE to merge into a bare root image)",
                    path.display()
                );
            }
            sibling
        }
    };
    let req = MergeRequest {
        squashfs,
        overlay: path.clone(),
        workdir: a.workdir.clone(),
        fsck: !a.no_fsck,
        compress: a.compress,
    };
    let plan = merge::plan_merge(&req)?;
    if a.dry_run || plan.nothing_to_merge {
        if json {
            return print_json(&plan);
        }
        if plan.nothing_to_merge {
            println!("the overlay holds no changes: nothing to merge");
            return Ok(());
        }
        println!("merge plan (dry run, nothing changed)");
        println!(
            "  squashfs      {} ({})",
            plan.squashfs.display(),
            human(plan.squashfs_bytes)
        );
        println!(
            "  root image    {} ({})",
            plan.root_image,
            human(plan.root_image_bytes)
        );
        println!(
            "  overlay       {} ({} exceptions, {})",
            plan.overlay.display(),
            plan.exceptions,
            plan.overlay_status.dm_status
        );
        println!(
            "  work dir      {}: needs {}, {} free",
            plan.workdir.display(),
            human(plan.workdir_needed_bytes),
            human(plan.workdir_free_bytes)
        );
        println!(
            "  stick dir     {}: needs up to {}, {} free",
            plan.target_dir.display(),
            human(plan.target_needed_bytes),
            human(plan.target_free_bytes)
        );
        for note in &plan.notes {
            println!("  note          {note}");
        }
        for (i, s) in plan.steps.iter().enumerate() {
            println!("  {}. {s}", i + 1);
        }
        return Ok(());
    }
    let mut phases = Phases::new(progress(json, &path));
    let report = merge::execute_merge(&plan, &mut |p, d, t| phases.update(p, d, t));
    phases.bar.finish();
    let report = report?;
    if json {
        return print_json(&report);
    }
    println!(
        "merged {} chunks into {} ({} → {}), overlay reset",
        report.exceptions_applied,
        plan.squashfs.display(),
        human(report.old_squashfs_bytes),
        human(report.new_squashfs_bytes)
    );
    Ok(())
}

#[derive(Serialize)]
struct PlumbingReport<'a> {
    overlay: &'a Path,
    origin: &'a Path,
    output: Option<&'a Path>,
    exceptions: u64,
    dry_run: bool,
    overlay_after: Option<String>,
}

/// The seed's `snapshot-merge` on plain files.
fn merge_plumbing(
    overlay: &Path,
    origin: &Path,
    output: Option<&Path>,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<()> {
    let in_place = output.is_none() && !dry_run;
    let (mut ov, ov_len) = if in_place {
        open_rw(overlay)?
    } else {
        open_ro(overlay)?
    };
    let store = match snapshot::open_store(&mut ov, ov_len)? {
        Opened::Valid(s) => s,
        Opened::Invalid { .. } => bail!(
            "{} is marked Invalid; the kernel refuses to merge it too. Run `livestick overlay recover` first",
            overlay.display()
        ),
        Opened::Uninitialised { .. } => {
            println!(
                "{} is a new, empty store: nothing to merge",
                overlay.display()
            );
            return Ok(());
        }
    };
    let origin_len = std::fs::metadata(origin)
        .with_context(|| format!("origin {}", origin.display()))?
        .len();
    store
        .validate(Some(origin_len / SECTOR_BYTES))
        .with_context(|| format!("{} does not fit {}", overlay.display(), origin.display()))?;
    let n = store.exceptions.len() as u64;
    let mut report = PlumbingReport {
        overlay,
        origin,
        output,
        exceptions: n,
        dry_run,
        overlay_after: None,
    };
    if !dry_run {
        let mut phases = Phases::new(progress(json, overlay));
        let result = if let Some(out) = output {
            let mut o = File::open(origin)?;
            let mut w = std::io::BufWriter::with_capacity(
                4 << 20,
                File::create(out).with_context(|| format!("creating {}", out.display()))?,
            );
            snapshot::write_view(&mut o, origin_len, &mut ov, &store, &mut w, &mut |d, t| {
                phases.update("merge", d, t)
            })
            .map_err(anyhow::Error::from)
            .and_then(|()| {
                let f = w.into_inner().map_err(|e| e.into_error())?;
                f.sync_all()?;
                Ok(())
            })
        } else {
            let mut o = OpenOptions::new()
                .read(true)
                .write(true)
                .open(origin)
                .with_context(|| format!("opening {}", origin.display()))?;
            snapshot::merge_in_place(&mut ov, &store, &mut o, origin_len, &mut |d, t| {
                phases.update("merge", d, t)
            })
            .map(|_| ())
            .map_err(anyhow::Error::from)
        };
        phases.bar.finish();
        result?;
        ov.seek(SeekFrom::Start(0))?;
        report.overlay_after =
            Some(snapshot::status(&mut ov, ov_len, LIVEOS_CHUNK_SECTORS, None)?.dm_status);
    }
    if json {
        return print_json(&report);
    }
    match (dry_run, output) {
        (true, _) => println!(
            "would merge {n} chunks of {} into {}",
            overlay.display(),
            output.unwrap_or(origin).display()
        ),
        (false, Some(out)) => println!(
            "wrote the merged image ({n} chunks applied) to {}; {} and {} are unchanged",
            out.display(),
            origin.display(),
            overlay.display()
        ),
        (false, None) => println!(
            "merged {n} chunks into {}; the overlay is now empty ({})",
            origin.display(),
            report.overlay_after.as_deref().unwrap_or("?")
        ),
    }
    Ok(())
}

/// Asks on the terminal; without one (and without --yes) the answer is no.
fn confirm(question: &str, yes: bool) -> anyhow::Result<bool> {
    if yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        bail!("{question}\nrefusing without confirmation: no terminal to ask on; add --yes");
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "Yes" | "YES"))
}

fn reset(a: &ResetArgs, json: bool) -> anyhow::Result<()> {
    let path = overlay_file(&a.target)?;
    let (mut f, len) = if a.dry_run {
        open_ro(&path)?
    } else {
        open_rw(&path)?
    };
    // A damaged store can still be reset; say what we can about what is lost.
    let report = snapshot::status(&mut f, len, LIVEOS_CHUNK_SECTORS, None);
    let lost = match &report {
        Ok(r) if r.state == "uninitialised" => "nothing (it is already empty)".to_string(),
        Ok(r) => format!(
            "{} changed chunks ({}) of the live system, state {}",
            r.exceptions,
            human(r.exceptions * u64::from(r.chunk_sectors) * SECTOR_BYTES),
            r.state
        ),
        Err(e) => format!("an unreadable store ({e})"),
    };
    let question = format!(
        "Reset {}? This discards {lost}: every change made in the live system since the last merge or reset.",
        path.display()
    );
    if a.dry_run {
        if json {
            return print_json(
                &serde_json::json!({"overlay": path, "dry_run": true, "would_discard": lost, "zeroed_bytes": len.min(RESET_BYTES)}),
            );
        }
        println!(
            "would reset {} (zero the first {}), discarding {lost}",
            path.display(),
            human(len.min(RESET_BYTES))
        );
        return Ok(());
    }
    if !confirm(&question, a.yes)? {
        bail!("not confirmed; nothing changed");
    }
    snapshot::reset_store(&mut f, len)?;
    if json {
        return print_json(&serde_json::json!({"overlay": path, "reset": true, "discarded": lost}));
    }
    println!("reset {}: discarded {lost}", path.display());
    Ok(())
}

fn recover(a: &RecoverArgs, json: bool) -> anyhow::Result<()> {
    let path = overlay_file(&a.target)?;
    let origin = origin_sectors(&a.origin)?;
    let (mut f, len) = if a.dry_run {
        open_ro(&path)?
    } else {
        open_rw(&path)?
    };
    // Validate (dry run) first: nothing may change if the metadata itself is corrupt.
    let check = snapshot::recover_invalid(&mut f, len, origin, true).with_context(|| {
        format!(
            "{}: the metadata is damaged; nothing was changed",
            path.display()
        )
    })?;
    let mut grow_plan = None;
    if let Some(add) = a.add_mb {
        let chunk = match snapshot::read_header(&mut f)? {
            snapshot::HeaderState::Initialised(h) => h.chunk_sectors,
            snapshot::HeaderState::Uninitialised => LIVEOS_CHUNK_SECTORS,
        };
        grow_plan = Some(snapshot::plan_grow(
            len,
            len.saturating_add(add.saturating_mul(MIB)),
            chunk,
            FAT_MAX_FILE_BYTES,
        )?);
    }
    let report = if a.dry_run {
        check
    } else {
        // Grow first (§7): an overlay that ran full would fail again on its first write.
        if let Some(p) = &grow_plan {
            f.set_len(p.new_bytes)?;
            f.sync_all()?;
        }
        let new_len = grow_plan.as_ref().map_or(len, |p| p.new_bytes);
        snapshot::recover_invalid(&mut f, new_len, origin, false)?
    };
    if json {
        return print_json(
            &serde_json::json!({"overlay": path, "dry_run": a.dry_run, "recover": report, "grow": grow_plan}),
        );
    }
    if !report.was_invalid {
        println!(
            "{} is not marked Invalid; nothing to recover ({})",
            path.display(),
            report.dm_status_after
        );
        return Ok(());
    }
    let verb = if a.dry_run {
        "would recover"
    } else {
        "recovered"
    };
    println!(
        "{verb} {}: {} exceptions in {} metadata area(s); status now {}",
        path.display(),
        report.exceptions,
        report.metadata_areas,
        report.dm_status_after
    );
    if let Some(p) = &grow_plan {
        println!(
            "grown from {} to {}",
            human(p.current_bytes),
            human(p.new_bytes)
        );
    }
    if report.full {
        println!(
            "warning: the overlay is still full; the first new chunk invalidates it again. Add --add-mb N"
        );
    }
    println!(
        "writes after the failure were lost: check the file system before trusting it (e2fsck -f on the root image seen through the overlay), then merge"
    );
    Ok(())
}

fn grow(a: &GrowArgs, json: bool) -> anyhow::Result<()> {
    let path = overlay_file(&a.target)?;
    let (mut f, len) = if a.dry_run {
        open_ro(&path)?
    } else {
        open_rw(&path)?
    };
    let chunk = match snapshot::read_header(&mut f)
        .with_context(|| format!("{} is not an overlay", path.display()))?
    {
        snapshot::HeaderState::Initialised(h) => h.chunk_sectors,
        snapshot::HeaderState::Uninitialised => LIVEOS_CHUNK_SECTORS,
    };
    let requested = match (a.size_mb, a.add_mb) {
        (Some(s), _) => s.saturating_mul(MIB),
        (None, Some(add)) => len.saturating_add(add.saturating_mul(MIB)),
        (None, None) => bail!("give --size-mb N or --add-mb N"),
    };
    let plan = snapshot::plan_grow(len, requested, chunk, FAT_MAX_FILE_BYTES)?;
    if !a.dry_run {
        // Zeros appended by set_len (sparse where the file system can); areas and data
        // chunks past the old end are zero, which is what the kernel expects (§8.1).
        let mut phases = Phases::new(progress(json, &path));
        phases.update("grow", 0, plan.added_bytes);
        f.set_len(plan.new_bytes)?;
        f.sync_all()?;
        phases.update("grow", plan.added_bytes, plan.added_bytes);
        phases.bar.finish();
    }
    if json {
        return print_json(
            &serde_json::json!({"overlay": path, "dry_run": a.dry_run, "grow": plan}),
        );
    }
    let verb = if a.dry_run { "would grow" } else { "grew" };
    println!(
        "{verb} {} from {} to {} ({} usable data chunks)",
        path.display(),
        human(plan.current_bytes),
        human(plan.new_bytes),
        plan.usable_data_chunks_after
    );
    for n in &plan.notes {
        println!("note: {n}");
    }
    Ok(())
}
