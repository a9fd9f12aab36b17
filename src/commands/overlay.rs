//! `livestick overlay status|merge|reset|recover|grow`: maintenance of the persistent
//! overlay, on a stick (block device or image file, its FAT filesystem never mounted)
//! or on a bare overlay file (with its squashfs.img or root image).
//!
//! On a stick the overlay is found as `LiveOS/overlay-<LABEL>-<UUID>` and read and
//! written in place through its FAT extents; squashfs.img is replaced by a directory
//! entry swap (see `disk::fat_raw`).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::disk::extent_file::ExtentFile;
use crate::disk::fat;
use crate::disk::fat_alloc;
use crate::disk::stick::{self, Stick, StickError, StickInfo};
use crate::persist::merge::{self, Located, MergeRequest, StickMergeRequest};
use crate::persist::overlay::store;
use crate::persist::snapshot::{
    self, FAT_MAX_FILE_BYTES, LIVEOS_CHUNK_SECTORS, Opened, RESET_BYTES, SECTOR_BYTES,
};
use crate::persist::{ovl_maint, ovl_merge};
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
    /// Make an overlay the kernel marked Invalid usable again (after validating it).
    /// An overlay that is only full (dmsetup shows Overflow; current kernels with
    /// dracut's `PO` table stop there) stays valid: give it room with `grow`.
    /// An OverlayFS overlay has no Invalid mark: its ext4 is checked with
    /// `e2fsck -f -n` (nothing changed) and repaired with --repair (`e2fsck -f -y`)
    Recover(RecoverArgs),
    /// Make the overlay file larger, keeping every change in it (an OverlayFS
    /// overlay: its ext4 is grown with resize2fs after `e2fsck -f -p`)
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

/// Which overlay on a stick (ignored for a bare overlay file).
#[derive(Debug, Args)]
pub struct StickSel {
    /// Directory of the live files on the stick
    #[arg(long, value_name = "DIR", default_value = "LiveOS")]
    pub live_dir: String,
    /// Work on this overlay file of the live dir instead of overlay-LABEL-UUID (e.g. an
    /// orphaned one whose name no longer matches the stick)
    #[arg(long, value_name = "NAME")]
    pub overlay_file: Option<String>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Stick (block device or image file) or bare overlay file (LiveOS/overlay-LABEL-UUID)
    pub target: PathBuf,
    #[command(flatten)]
    pub sel: StickSel,
    #[command(flatten)]
    pub origin: OriginArgs,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Stick (block device or image file) or bare overlay file (LiveOS/overlay-LABEL-UUID)
    pub target: PathBuf,
    #[command(flatten)]
    pub sel: StickSel,
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
    /// Do not ask for confirmation (a merge on a stick rewrites its squashfs.img)
    #[arg(long, short)]
    pub yes: bool,
    /// EROFS roots: rebuild even when the image's xattrs cannot be carried over
    /// (livestick cannot read them from this image and fsck.erofs does not extract
    /// them); the new image then has no SELinux labels or file capabilities
    #[arg(long)]
    pub allow_xattr_loss: bool,
}

#[derive(Debug, Args)]
pub struct ResetArgs {
    /// Stick (block device or image file) or bare overlay file (LiveOS/overlay-LABEL-UUID)
    pub target: PathBuf,
    #[command(flatten)]
    pub sel: StickSel,
    /// Do not ask for confirmation
    #[arg(long, short)]
    pub yes: bool,
    /// Say what would be lost and change nothing
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct RecoverArgs {
    /// Stick (block device or image file) or bare overlay file (LiveOS/overlay-LABEL-UUID)
    pub target: PathBuf,
    #[command(flatten)]
    pub sel: StickSel,
    #[command(flatten)]
    pub origin: OriginArgs,
    /// Also grow the overlay by this many MiB (an overlay that was invalidated because
    /// it ran full would run full again on the next writes)
    #[arg(long, value_name = "N")]
    pub add_mb: Option<u64>,
    /// Then run `e2fsck -f -y` on the file system seen through the overlay and write
    /// what it repaired into the overlay (OverlayFS: on the overlay's own ext4)
    #[arg(long)]
    pub repair: bool,
    /// With --repair on a bare overlay file: the squashfs.img holding the root image
    /// (default: squashfs.img next to the overlay), unless --origin is given
    #[arg(long, value_name = "PATH", conflicts_with = "origin")]
    pub squashfs: Option<PathBuf>,
    /// With --repair: where to build the repaired view (needs the root image's size);
    /// an OverlayFS overlay on a stick is checked and repaired in a copy here (needs
    /// the overlay's size)
    #[arg(long, value_name = "DIR", default_value = "/var/tmp")]
    pub workdir: PathBuf,
    /// Answer yes to every confirmation (for scripts; this command keeps every
    /// change in the overlay, so it asks none today)
    #[arg(long, short)]
    pub yes: bool,
    /// Show what would be done and change nothing
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("amount").required(true).args(["size_mb", "add_mb"])))]
pub struct GrowArgs {
    /// Stick (block device or image file) or bare overlay file (LiveOS/overlay-LABEL-UUID)
    pub target: PathBuf,
    #[command(flatten)]
    pub sel: StickSel,
    /// New total size in MiB (at most 4095: the FAT file size limit)
    #[arg(long, value_name = "N")]
    pub size_mb: Option<u64>,
    /// Add this many MiB
    #[arg(long, value_name = "N")]
    pub add_mb: Option<u64>,
    /// OverlayFS overlay on a stick: where it is copied to be checked and resized
    /// (needs room for the grown overlay; only the blocks resize2fs changes are
    /// written back)
    #[arg(long, value_name = "DIR", default_value = "/var/tmp")]
    pub workdir: PathBuf,
    /// Answer yes to every confirmation (for scripts; this command keeps every
    /// change in the overlay, so it asks none today)
    #[arg(long, short)]
    pub yes: bool,
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
            "{} has a partition table (or is a block device) but no FAT partition with a live system: it is neither a live stick nor an overlay file",
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

/// A 0-byte file holds no overlay: resetting or reading it would only report
/// an empty store, which hides that the wrong file was named.
fn refuse_empty(len: u64, show: &str) -> anyhow::Result<()> {
    if len == 0 {
        bail!(super::write::BadInput(format!(
            "{show} is empty (0 bytes): it is not an overlay; name the overlay file (LiveOS/overlay-LABEL-UUID) or the stick"
        )));
    }
    Ok(())
}

fn not_usable(show: &str, e: snapshot::SnapshotError) -> anyhow::Error {
    anyhow::Error::new(e).context(super::write::BadInput(format!(
        "{show} is not a usable overlay"
    )))
}

/// Refuses a store the strict checks find damaged on its own (an entry
/// outside the file, a chunk used twice …): figures derived from it are
/// meaningless, so none are printed. A mismatch with a given origin is not
/// damage of the store and stays a reported problem.
fn check_intact<R: Read + Seek>(f: &mut R, len: u64, show: &str) -> anyhow::Result<()> {
    let report =
        snapshot::status(f, len, LIVEOS_CHUNK_SECTORS, None).map_err(|e| not_usable(show, e))?;
    if report.problems.is_empty() {
        return Ok(());
    }
    bail!(super::write::BadInput(format!(
        "{show} is a damaged overlay: {}; the kernel may refuse it or read wrong data — copy it somewhere safe if its changes matter, then `livestick overlay reset` starts it afresh (every change it holds is lost)",
        report.problems.join("; ")
    )))
}

/// Growing a damaged store would make room the kernel then fills beside
/// entries that already point at the wrong place: refused, nothing changed.
fn check_before_grow<R: Read + Seek>(f: &mut R, len: u64, show: &str) -> anyhow::Result<()> {
    check_intact(f, len, show)
        .with_context(|| format!("refusing to grow {show}; nothing was changed"))
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
    if stick::looks_like_stick(&a.target) {
        return stick_status(a, json);
    }
    if a.target.is_dir() {
        return dir_status(&a.target, json);
    }
    let path = overlay_file(&a.target)?;
    let (mut f, len) = open_ro(&path)?;
    refuse_empty(len, &path.display().to_string())?;
    if store::is_ext4(&mut f) {
        let info = store::overlay_info(&mut f);
        let report = store::status_report(info.as_ref(), len, 0);
        if json {
            return print_json(&serde_json::json!({
                "overlay": path, "kind": "overlayfs", "size_bytes": len,
                "used_bytes": info.as_ref().map(|i| i.used_bytes),
                "bytes_free": report.bytes_free, "percent_used": report.percent_used,
            }));
        }
        println!("overlay         {}", path.display());
        println!("kind            OverlayFS (ext4 with overlayfs/ + ovlwork/)");
        println!("size            {}", human(len));
        println!(
            "used            {:.2} % ({} free)",
            report.percent_used,
            human(report.bytes_free)
        );
        return Ok(());
    }
    let report = snapshot::status(
        &mut f,
        len,
        LIVEOS_CHUNK_SECTORS,
        origin_sectors(&a.origin)?,
    )
    .map_err(|e| not_usable(&path.display().to_string(), e))?;
    check_intact(&mut f, len, &path.display().to_string())?;
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
    print_status(&path.display().to_string(), &report);
    Ok(())
}

fn print_status(overlay: &str, report: &snapshot::StatusReport) {
    println!("overlay         {overlay}");
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
}

fn merge_cmd(a: &MergeArgs, json: bool) -> anyhow::Result<()> {
    if stick::looks_like_stick(&a.target) {
        return stick_merge(a, json);
    }
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
    let mut plan = merge::plan_merge(&req)?;
    plan.allow_xattr_loss = a.allow_xattr_loss;
    if a.dry_run || plan.nothing_to_merge {
        return print_merge_plan(&plan, json);
    }
    run_merge_plan(&plan, json, &path)
}

fn print_merge_plan(plan: &merge::MergePlan, json: bool) -> anyhow::Result<()> {
    {
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
        match &plan.ovl {
            Some(o) => println!(
                "  overlay       {} (OverlayFS: {} upper-dir entries, {} used; layout {})",
                plan.overlay.display(),
                o.upper_entries,
                human(o.overlay_used_bytes),
                match &o.layout {
                    ovl_merge::Layout::Flat => "flat squashfs",
                    ovl_merge::Layout::Nested { .. } => "squashfs with a nested root image",
                    ovl_merge::Layout::Erofs { .. } => "EROFS",
                }
            ),
            None => println!(
                "  overlay       {} ({} exceptions, {})",
                plan.overlay.display(),
                plan.exceptions,
                plan.overlay_status.dm_status
            ),
        }
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
        Ok(())
    }
}

fn run_merge_plan(plan: &merge::MergePlan, json: bool, path: &Path) -> anyhow::Result<()> {
    let mut phases = Phases::new(progress(json, path));
    let report = merge::execute_merge(plan, &mut |p, d, t| phases.update(p, d, t));
    phases.bar.finish();
    let report = report?;
    if json {
        return print_json(&report);
    }
    match &report.overlayfs {
        Some(r) => {
            println!(
                "merged {} upper-dir entries into {} ({} → {}), overlay reset",
                report.exceptions_applied,
                plan.squashfs.display(),
                human(report.old_squashfs_bytes),
                human(report.new_squashfs_bytes)
            );
            println!(
                "  {} created, {} replaced, {} removed by whiteouts, {} directories updated",
                r.created, r.replaced, r.removed, r.dirs_updated
            );
            for n in &r.notes {
                println!("  note: {n}");
            }
        }
        None => println!(
            "merged {} chunks into {} ({} → {}), overlay reset",
            report.exceptions_applied,
            plan.squashfs.display(),
            human(report.old_squashfs_bytes),
            human(report.new_squashfs_bytes)
        ),
    }
    if report.fsck_chunks_folded > 0 {
        println!(
            "e2fsck changed {} chunks; they were written into the overlay before the swap",
            report.fsck_chunks_folded
        );
    }
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

fn reset(a: &ResetArgs, json: bool) -> anyhow::Result<()> {
    if stick::looks_like_stick(&a.target) {
        return stick_reset(a, json);
    }
    if a.target.is_dir() {
        return dir_reset(a, json);
    }
    let path = overlay_file(&a.target)?;
    let (mut f, len) = if a.dry_run {
        open_ro(&path)?
    } else {
        open_rw(&path)?
    };
    refuse_empty(len, &path.display().to_string())?;
    reset_common(&mut f, len, &path.display().to_string(), a, json)
}

/// A directory overlay (`overlay-LABEL-UUID/` with overlayfs/ and ovlwork/, as
/// dracut keeps it on an ext4 stick): what its upper dir holds.
fn dir_status(dir: &Path, json: bool) -> anyhow::Result<()> {
    let (used, entries) = store::upper_dir_usage(dir)?;
    let free = merge::free_bytes(dir)?;
    if json {
        return print_json(&serde_json::json!({
            "overlay": dir, "kind": "overlayfs-dir", "upper_entries": entries,
            "used_bytes": used, "bytes_free": free,
        }));
    }
    println!("overlay         {}", dir.display());
    println!(
        "kind            OverlayFS directory (overlayfs/ + ovlwork/ on the stick's file system)"
    );
    println!("upper dir       {entries} entries, {}", human(used));
    println!("free            {} on its file system", human(free));
    Ok(())
}

fn dir_reset(a: &ResetArgs, json: bool) -> anyhow::Result<()> {
    let dir = &a.target;
    let (used, entries) = store::upper_dir_usage(dir)?;
    let path = dir.display().to_string();
    let lost = format!(
        "{entries} entries ({}) in its OverlayFS upper dir",
        human(used)
    );
    confirmed_reset(
        &path,
        &lost,
        &format!("would empty {path}/overlayfs and {path}/ovlwork"),
        a,
        json,
        serde_json::json!({"kind": "overlayfs-dir"}),
        serde_json::json!({"kind": "overlayfs-dir"}),
        || store::empty_overlay_dir(dir).with_context(|| format!("emptying {path}")),
    )
}

/// grow and recover have nothing to do on a directory overlay: it has no size or
/// file system of its own.
fn refuse_dir(target: &Path, what: &str) -> anyhow::Result<()> {
    if target.is_dir() {
        bail!(
            "{} is a directory overlay (overlayfs/ + ovlwork/ on the stick's own file system): it has no size or file system of its own to {what}; {what} the stick's file system instead (resize2fs / e2fsck on its partition)",
            target.display()
        );
    }
    Ok(())
}

fn reset_common<F: Read + Write + Seek + snapshot::SyncData>(
    f: &mut F,
    len: u64,
    path: &str,
    a: &ResetArgs,
    json: bool,
) -> anyhow::Result<()> {
    if store::is_ext4(f) {
        return reset_overlayfs(f, len, path, a, json);
    }
    // A damaged store can still be reset; say what we can about what is lost.
    let report = snapshot::status(f, len, LIVEOS_CHUNK_SECTORS, None);
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
    confirmed_reset(
        path,
        &lost,
        &format!(
            "would reset {path} (zero the first {})",
            human(len.min(RESET_BYTES))
        ),
        a,
        json,
        serde_json::json!({"zeroed_bytes": len.min(RESET_BYTES)}),
        serde_json::json!({}),
        || Ok(snapshot::reset_store(f, len)?),
    )
}

/// Reset of an OverlayFS overlay: a new empty ext4 with overlayfs/ and ovlwork/, same
/// size, UUID and label, written over the old one in place.
fn reset_overlayfs<F: Read + Write + Seek + snapshot::SyncData>(
    f: &mut F,
    len: u64,
    path: &str,
    a: &ResetArgs,
    json: bool,
) -> anyhow::Result<()> {
    let info = store::overlay_info(f);
    let lost = match &info {
        Some(i) => format!(
            "{} of files in its OverlayFS upper dir",
            human(i.used_bytes)
        ),
        None => "an OverlayFS overlay whose superblock cannot be read".to_string(),
    };
    confirmed_reset(
        path,
        &lost,
        &format!("would reset {path} (a new empty ext4 with overlayfs/ and ovlwork/)"),
        a,
        json,
        serde_json::json!({"kind": "overlayfs"}),
        serde_json::json!({"kind": "overlayfs"}),
        || {
            store::reset_overlay(f, len, &std::env::temp_dir())
                .with_context(|| format!("resetting {path}"))
        },
    )
}

/// What every reset shares: the dry run (`would`, then what is lost), the
/// confirmation naming what is lost, `act`, the report. `dry_extra` and `done_extra`
/// are added to the JSON objects.
#[allow(clippy::too_many_arguments)]
fn confirmed_reset(
    path: &str,
    lost: &str,
    would: &str,
    a: &ResetArgs,
    json: bool,
    dry_extra: serde_json::Value,
    done_extra: serde_json::Value,
    act: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let with = |mut base: serde_json::Value, extra: serde_json::Value| {
        if let (Some(b), serde_json::Value::Object(e)) = (base.as_object_mut(), extra) {
            b.extend(e);
        }
        base
    };
    if a.dry_run {
        if json {
            return print_json(&with(
                serde_json::json!({"overlay": path, "dry_run": true, "would_discard": lost}),
                dry_extra,
            ));
        }
        println!("{would}, discarding {lost}");
        return Ok(());
    }
    let question = format!(
        "Reset {path}? This discards {lost}: every change made in the live system since the last merge or reset."
    );
    if !super::confirm(&question, a.yes)? {
        bail!("not confirmed; nothing changed");
    }
    act()?;
    if json {
        return print_json(&with(
            serde_json::json!({"overlay": path, "reset": true, "discarded": lost}),
            done_extra,
        ));
    }
    println!("reset {path}: discarded {lost}");
    Ok(())
}

fn recover(a: &RecoverArgs, json: bool) -> anyhow::Result<()> {
    if stick::looks_like_stick(&a.target) {
        return stick_recover(a, json);
    }
    refuse_dir(&a.target, "check")?;
    let path = overlay_file(&a.target)?;
    if is_ext4_file(&path)? {
        return ovl_bare_recover(a, &path, json);
    }
    let show = path.display().to_string();
    let origin = origin_sectors(&a.origin)?;
    // --repair needs the root image: --origin, or the one inside squashfs.img.
    let repair_source = if a.repair {
        if let Some(o) = &a.origin.origin {
            Some((o.clone(), None))
        } else {
            let sq = match &a.squashfs {
                Some(p) => p.clone(),
                None => path.with_file_name("squashfs.img"),
            };
            if !sq.is_file() {
                bail!(
                    "--repair needs the root image: pass --origin IMAGE or --squashfs PATH (no squashfs.img next to {show})"
                );
            }
            Some((PathBuf::new(), Some(sq)))
        }
    } else {
        None
    };
    let (mut f, len) = if a.dry_run {
        open_ro(&path)?
    } else {
        open_rw(&path)?
    };
    // Validate (dry run) first: nothing may change if the metadata itself is corrupt.
    let check = snapshot::recover_invalid(&mut f, len, origin, true)
        .with_context(|| format!("{show}: the metadata is damaged; nothing was changed"))?;
    let mut grow_plan = None;
    if let Some(add) = a.add_mb {
        let chunk = chunk_sectors_of(&mut f)?;
        grow_plan = Some(snapshot::plan_grow(
            len,
            len.saturating_add(add.saturating_mul(MIB)),
            chunk,
            FAT_MAX_FILE_BYTES,
        )?);
    }
    if a.dry_run {
        return recover_report(&show, &check, grow_plan.as_ref(), None, true, json);
    }
    // Grow first: an overlay that ran full would fail again on its first write.
    if let Some(p) = &grow_plan {
        f.set_len(p.new_bytes)?;
        f.sync_all()?;
    }
    let new_len = grow_plan.as_ref().map_or(len, |p| p.new_bytes);
    let report = snapshot::recover_invalid(&mut f, new_len, origin, false)?;
    let repair = match repair_source {
        None => None,
        Some((origin_img, squashfs)) => {
            let scratch = tempfile::Builder::new()
                .prefix("livestick-repair-")
                .tempdir_in(&a.workdir)
                .with_context(|| format!("work dir {}", a.workdir.display()))?;
            let origin_img = match squashfs {
                Some(sq) => merge::extract_root_image(&Located::file(&sq)?, &sq, scratch.path())?,
                None => origin_img,
            };
            let mut phases = Phases::new(progress(json, &path));
            let r = merge::repair_view(
                &origin_img,
                &mut f,
                new_len,
                scratch.path(),
                &mut |p, d, t| phases.update(p, d, t),
            );
            phases.bar.finish();
            Some(r?)
        }
    };
    recover_report(
        &show,
        &report,
        grow_plan.as_ref(),
        repair.as_ref(),
        false,
        json,
    )
}

fn recover_report(
    show: &str,
    report: &snapshot::RecoverReport,
    grow_plan: Option<&snapshot::GrowPlan>,
    repair: Option<&merge::RepairReport>,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        return print_json(&serde_json::json!({
            "overlay": show, "dry_run": dry_run, "recover": report,
            "grow": grow_plan, "repair": repair,
        }));
    }
    if !report.was_invalid {
        println!(
            "{show} is not marked Invalid; nothing to recover ({})",
            report.dm_status_after
        );
    } else {
        let verb = if dry_run {
            "would recover"
        } else {
            "recovered"
        };
        println!(
            "{verb} {show}: {} exceptions in {} metadata area(s); status now {}",
            report.exceptions, report.metadata_areas, report.dm_status_after
        );
    }
    if let Some(p) = grow_plan {
        println!(
            "{} from {} to {}",
            if dry_run { "would grow" } else { "grown" },
            human(p.current_bytes),
            human(p.new_bytes)
        );
    }
    if report.full && grow_plan.is_none() {
        println!(
            "warning: the overlay is still full; the first new chunk invalidates it again. Add --add-mb N"
        );
    }
    match repair {
        Some(r) => println!(
            "e2fsck -f -y on the view exited {}: {} chunks changed, {} written into the overlay",
            r.fsck_exit_code, r.chunks_changed, r.chunks_folded
        ),
        None if report.was_invalid => println!(
            "writes after the failure were lost: check the file system before trusting it (`overlay recover --repair` runs e2fsck -f -y on the view and keeps its repairs), then merge"
        ),
        None => {}
    }
    Ok(())
}

fn grow(a: &GrowArgs, json: bool) -> anyhow::Result<()> {
    if stick::looks_like_stick(&a.target) {
        return stick_grow(a, json);
    }
    refuse_dir(&a.target, "grow")?;
    let path = overlay_file(&a.target)?;
    if is_ext4_file(&path)? {
        return ovl_bare_grow(a, &path, json);
    }
    let (mut f, len) = if a.dry_run {
        open_ro(&path)?
    } else {
        open_rw(&path)?
    };
    refuse_empty(len, &path.display().to_string())?;
    let chunk = chunk_sectors_of(&mut f)
        .with_context(|| format!("{} is not an overlay", path.display()))?;
    check_before_grow(&mut f, len, &path.display().to_string())?;
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
    grow_report(&path.display().to_string(), &plan, a.dry_run, json)
}

fn grow_report(
    show: &str,
    plan: &snapshot::GrowPlan,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        return print_json(&serde_json::json!({"overlay": show, "dry_run": dry_run, "grow": plan}));
    }
    let verb = if dry_run { "would grow" } else { "grew" };
    println!(
        "{verb} {show} from {} to {} ({} usable data chunks)",
        human(plan.current_bytes),
        human(plan.new_bytes),
        plan.usable_data_chunks_after
    );
    for n in &plan.notes {
        println!("note: {n}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// Sticks: the overlay found by name on the FAT filesystem and reached in place.

/// What an overlay file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum OverlayKind {
    /// dm-snapshot exception store (or a zeroed, new one).
    DmSnapshot,
    /// An ext4 file system with `overlayfs/` and `ovlwork/` (rd.live.overlay.overlayfs).
    Overlayfs,
}

/// A stick opened for an overlay command, with the overlay chosen.
struct StickTarget {
    stick: Stick,
    info: StickInfo,
    /// Path of the overlay on the FAT filesystem.
    overlay: String,
    overlay_bytes: u64,
    /// The overlay's name does not match the label/UUID: dracut will not use it.
    orphaned: bool,
    kind: OverlayKind,
}

impl StickTarget {
    fn show(&self) -> String {
        format!("{}:{}", self.stick.path.display(), self.overlay)
    }

    /// The overlay, read and written in place on the stick.
    fn overlay_file(&mut self) -> anyhow::Result<ExtentFile<&mut File>> {
        let extents = merge::stick_extents(&mut self.stick, &self.overlay)
            .with_context(|| format!("locating {}", self.show()))?;
        Ok(ExtentFile::new(self.stick.file_mut(), &extents))
    }
}

fn ext4_magic<R: Read + Seek>(r: &mut R) -> bool {
    let mut m = [0u8; 2];
    r.seek(SeekFrom::Start(1080)).is_ok() && r.read_exact(&mut m).is_ok() && m == [0x53, 0xEF]
}

/// Opens `path` as a stick and picks its overlay: `--overlay-file`, else the one dracut
/// will use. `allow_orphan` lets `status` fall back to a single orphaned overlay.
fn open_stick(
    path: &Path,
    sel: &StickSel,
    writable: bool,
    allow_orphan: bool,
) -> anyhow::Result<StickTarget> {
    let mut stick = Stick::open(path, writable).map_err(|e| match e {
        StickError::Target(crate::disk::target::TargetError::Busy { path, findings }) => {
            anyhow::anyhow!(
                "{} is in use ({}); unmount it (and detach loop devices) first: changing the overlay or squashfs.img under a running or mounted system corrupts them",
                path.display(),
                findings.join("; ")
            )
        }
        e => anyhow::Error::from(e).context(format!(
            "{} is not a live stick this command can work on",
            path.display()
        )),
    })?;
    let info = stick.info(&sel.live_dir)?;
    if info.squashfs.is_none() {
        bail!(StickError::NotLive {
            path: path.to_path_buf(),
            live_dir: sel.live_dir.clone(),
        });
    }
    let names = || {
        info.overlays
            .iter()
            .map(|(p, s)| format!("{p} ({})", human(*s)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let chosen = if let Some(name) = &sel.overlay_file {
        let want = format!("/{}/{}", sel.live_dir, name.trim_start_matches('/'));
        info.overlays
            .iter()
            .find(|(p, _)| p.eq_ignore_ascii_case(&want) || p.eq_ignore_ascii_case(name))
            .cloned()
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{} has no overlay {want}; overlays present: {}",
                    path.display(),
                    if info.overlays.is_empty() {
                        "none".to_string()
                    } else {
                        names()
                    }
                )
            })?
    } else if let Some(o) = info.overlay() {
        o.clone()
    } else {
        let orphans = info.orphaned_overlays();
        match orphans.as_slice() {
            [] => bail!(
                "{} has no persistent overlay (expected {}); it was written without --overlay-size-mb",
                path.display(),
                info.expected_overlay
            ),
            [one] if allow_orphan => (*one).clone(),
            _ => bail!(
                "{} has no overlay named {}, but has {}: its name no longer matches the stick's label/UUID, so the live system ignores it (its changes are orphaned). Rename it to {} to use it again, or pass --overlay-file NAME to work on it",
                path.display(),
                info.expected_overlay,
                names(),
                info.expected_overlay
            ),
        }
    };
    let orphaned = chosen.0 != info.expected_overlay;
    let mut t = StickTarget {
        stick,
        overlay: chosen.0,
        overlay_bytes: chosen.1,
        orphaned,
        kind: OverlayKind::DmSnapshot,
        info,
    };
    let is_ext4 = {
        let mut f = t.overlay_file()?;
        ext4_magic(&mut f)
    };
    if is_ext4 {
        t.kind = OverlayKind::Overlayfs;
    }
    Ok(t)
}

/// Size of the root image inside squashfs.img (for range checks), when unsquashfs is
/// installed and the image can be read in place.
fn stick_root_image_bytes(t: &mut StickTarget) -> Option<u64> {
    let sq = format!("/{}/squashfs.img", t.info.live_dir);
    let at = Located::on_stick(&mut t.stick, &sq).ok()?;
    let off = at.contiguous_at()?;
    let listing = crate::squash::list_at(&at.device, off).ok()?;
    merge::ROOT_IMAGES
        .iter()
        .find_map(|n| listing.iter().find(|e| e.is_file && e.path == *n))
        .map(|e| e.size)
}

/// Free and total bytes of the ext4 file system in an OverlayFS overlay.
fn ext4_usage<R: Read + Seek>(r: &mut R) -> Option<(u64, u64)> {
    let mut sb = [0u8; 1024];
    r.seek(SeekFrom::Start(1024)).ok()?;
    r.read_exact(&mut sb).ok()?;
    let u32_at = |i: usize| u64::from(u32::from_le_bytes([sb[i], sb[i + 1], sb[i + 2], sb[i + 3]]));
    let block = 1024u64.checked_shl(u32::try_from(u32_at(0x18)).ok()?)?;
    let wide = u32_at(0x60) & 0x80 != 0; // INCOMPAT_64BIT: high halves are meaningful
    let (hi_total, hi_free) = if wide {
        (u32_at(0x150), u32_at(0x158))
    } else {
        (0, 0)
    };
    let total = (hi_total << 32 | u32_at(0x04)) * block;
    let free = (hi_free << 32 | u32_at(0x0C)) * block;
    Some((free, total))
}

fn stick_status(a: &StatusArgs, json: bool) -> anyhow::Result<()> {
    let mut t = open_stick(&a.target, &a.sel, false, true)?;
    let orphans: Vec<String> = t
        .info
        .orphaned_overlays()
        .iter()
        .map(|(p, _)| p.clone())
        .collect();
    let mut notes = Vec::new();
    if t.orphaned {
        notes.push(format!(
            "{} does not match the stick's label/UUID: the live system looks for {} and ignores this one (its changes are orphaned); rename it to use it again",
            t.overlay, t.info.expected_overlay
        ));
    } else if !orphans.is_empty() {
        notes.push(format!(
            "orphaned overlay(s) the live system ignores: {}",
            orphans.join(", ")
        ));
    }
    if t.kind == OverlayKind::Overlayfs {
        let usage = {
            let mut f = t.overlay_file()?;
            ext4_usage(&mut f)
        };
        let (free, total) = usage.unwrap_or((0, t.overlay_bytes));
        let used = total.saturating_sub(free);
        let percent = if total == 0 {
            0.0
        } else {
            (used as f64 * 10000.0 / total as f64).round() / 100.0
        };
        if json {
            return print_json(&serde_json::json!({
                "stick": t.stick.path, "label": t.info.label, "fs_uuid": t.info.fs_uuid,
                "overlay": t.overlay, "expected_overlay": t.info.expected_overlay,
                "orphaned": t.orphaned, "orphaned_overlays": orphans, "kind": t.kind,
                "size_bytes": t.overlay_bytes, "used_bytes": used, "bytes_free": free,
                "percent_used": percent, "notes": notes,
            }));
        }
        println!(
            "stick           {} ({} {})",
            t.stick.path.display(),
            t.info.label,
            t.info.fs_uuid
        );
        println!("overlay         {}", t.overlay);
        println!("kind            OverlayFS (ext4 with overlayfs/ + ovlwork/)");
        println!("size            {}", human(t.overlay_bytes));
        println!("used            {:.2} % ({} free)", percent, human(free));
        for n in &notes {
            println!("note            {n}");
        }
        return Ok(());
    }
    let origin = match origin_sectors(&a.origin)? {
        Some(s) => Some(s),
        None => stick_root_image_bytes(&mut t).map(|b| b / SECTOR_BYTES),
    };
    let len = t.overlay_bytes;
    let report = {
        let mut f = t.overlay_file()?;
        snapshot::status(&mut f, len, LIVEOS_CHUNK_SECTORS, origin)
            .map_err(|e| not_usable(&t.show(), e))?
    };
    {
        let show = t.show();
        check_intact(&mut t.overlay_file()?, len, &show)?;
    }
    if json {
        #[derive(Serialize)]
        struct Out<'a> {
            stick: &'a Path,
            label: &'a str,
            fs_uuid: &'a str,
            overlay: &'a str,
            expected_overlay: &'a str,
            orphaned: bool,
            orphaned_overlays: &'a [String],
            kind: OverlayKind,
            notes: &'a [String],
            #[serde(flatten)]
            report: &'a snapshot::StatusReport,
        }
        return print_json(&Out {
            stick: &t.stick.path,
            label: &t.info.label,
            fs_uuid: &t.info.fs_uuid,
            overlay: &t.overlay,
            expected_overlay: &t.info.expected_overlay,
            orphaned: t.orphaned,
            orphaned_overlays: &orphans,
            kind: t.kind,
            notes: &notes,
            report: &report,
        });
    }
    println!(
        "stick           {} (label {}, UUID {})",
        t.stick.path.display(),
        t.info.label,
        t.info.fs_uuid
    );
    print_status(&t.overlay, &report);
    for n in &notes {
        println!("note            {n}");
    }
    Ok(())
}

fn stick_merge(a: &MergeArgs, json: bool) -> anyhow::Result<()> {
    if a.origin.is_some() || a.squashfs.is_some() {
        bail!(
            "--origin and --squashfs are for bare files; on a stick the squashfs.img and overlay are found on it"
        );
    }
    let (overlay, show) = {
        let t = open_stick(&a.target, &a.sel, false, false)?;
        (t.overlay.clone(), t.show())
    };
    let req = StickMergeRequest {
        stick: a.target.clone(),
        live_dir: a.sel.live_dir.clone(),
        overlay,
        workdir: a.workdir.clone(),
        fsck: !a.no_fsck,
        compress: a.compress,
    };
    let mut plan = merge::plan_stick_merge(&req)?;
    plan.allow_xattr_loss = a.allow_xattr_loss;
    if a.dry_run || plan.nothing_to_merge {
        return print_merge_plan(&plan, json);
    }
    let question = format!(
        "Merge {} {} of {show} into a new {} and empty the overlay?",
        plan.exceptions,
        if plan.ovl.is_some() {
            "changed paths"
        } else {
            "chunks"
        },
        plan.squashfs.display()
    );
    if !super::confirm(&question, a.yes)? {
        bail!("not confirmed; nothing changed");
    }
    run_merge_plan(&plan, json, &a.target)
}

fn stick_reset(a: &ResetArgs, json: bool) -> anyhow::Result<()> {
    let mut t = open_stick(&a.target, &a.sel, !a.dry_run, false)?;
    let show = t.show();
    let len = t.overlay_bytes;
    let mut f = t.overlay_file()?;
    reset_common(&mut f, len, &show, a, json)
}

fn stick_recover(a: &RecoverArgs, json: bool) -> anyhow::Result<()> {
    let t = open_stick(&a.target, &a.sel, false, false)?;
    if t.kind == OverlayKind::Overlayfs {
        return ovl_stick_recover(a, t, json);
    }
    drop(t);
    let mut t = open_stick(&a.target, &a.sel, !a.dry_run, false)?;
    let show = t.show();
    let origin = match origin_sectors(&a.origin)? {
        Some(s) => Some(s),
        None => stick_root_image_bytes(&mut t).map(|b| b / SECTOR_BYTES),
    };
    let len = t.overlay_bytes;
    let check = {
        let mut f = t.overlay_file()?;
        snapshot::recover_invalid(&mut f, len, origin, true)
            .with_context(|| format!("{show}: the metadata is damaged; nothing was changed"))?
    };
    let mut grow_plan = None;
    if let Some(add) = a.add_mb {
        let chunk = {
            let mut f = t.overlay_file()?;
            chunk_sectors_of(&mut f)?
        };
        grow_plan = Some(stick_grow_plan(
            &t,
            len.saturating_add(add.saturating_mul(MIB)),
            chunk,
        )?);
    }
    if a.dry_run {
        return recover_report(&show, &check, grow_plan.as_ref(), None, true, json);
    }
    if let Some(p) = &grow_plan {
        grow_on_stick(&mut t, p, json)?;
    }
    let new_len = grow_plan.as_ref().map_or(len, |p| p.new_bytes);
    let report = {
        let mut f = t.overlay_file()?;
        snapshot::recover_invalid(&mut f, new_len, origin, false)?
    };
    let repair = if a.repair {
        let squashfs = format!("/{}/squashfs.img", t.info.live_dir);
        let at = Located::on_stick(&mut t.stick, &squashfs)?;
        let scratch = tempfile::Builder::new()
            .prefix("livestick-repair-")
            .tempdir_in(&a.workdir)
            .with_context(|| format!("work dir {}", a.workdir.display()))?;
        let origin_img = match &a.origin.origin {
            Some(p) => p.clone(),
            None => merge::extract_root_image(&at, Path::new(&squashfs), scratch.path())?,
        };
        let mut phases = Phases::new(progress(json, &a.target));
        let mut f = t.overlay_file()?;
        let r = merge::repair_view(
            &origin_img,
            &mut f,
            new_len,
            scratch.path(),
            &mut |p, d, t| phases.update(p, d, t),
        );
        phases.bar.finish();
        Some(r?)
    } else {
        None
    };
    recover_report(
        &show,
        &report,
        grow_plan.as_ref(),
        repair.as_ref(),
        false,
        json,
    )
}

fn chunk_sectors_of<R: Read + Seek>(f: &mut R) -> anyhow::Result<u32> {
    Ok(match snapshot::read_header(f)? {
        snapshot::HeaderState::Initialised(h) => h.chunk_sectors,
        snapshot::HeaderState::Uninitialised => LIVEOS_CHUNK_SECTORS,
    })
}

/// A grow on a stick: the FAT file limit and the free space are hard errors with the
/// figures, not silent caps: the user asked for a size the stick cannot give.
fn stick_grow_plan(
    t: &StickTarget,
    requested: u64,
    chunk: u32,
) -> anyhow::Result<snapshot::GrowPlan> {
    check_fat_limit(t, requested)?;
    let plan = snapshot::plan_grow(t.overlay_bytes, requested, chunk, FAT_MAX_FILE_BYTES)?;
    check_stick_free(t, plan.added_bytes)?;
    Ok(plan)
}

fn check_fat_limit(t: &StickTarget, requested: u64) -> anyhow::Result<()> {
    if requested > fat::FAT_MAX_FILE {
        bail!(
            "{} cannot grow to {} ({requested} bytes): a file on FAT32 must stay below 4 GiB, at most {} MiB ({} bytes)",
            t.show(),
            human(requested),
            fat::FAT_MAX_FILE / MIB,
            fat::FAT_MAX_FILE
        );
    }
    Ok(())
}

fn check_stick_free(t: &StickTarget, added: u64) -> anyhow::Result<()> {
    if added > t.info.free_bytes {
        bail!(
            "not enough free space on {} to grow {} by {} ({} bytes): {} ({} bytes) free",
            t.stick.path.display(),
            t.overlay,
            human(added),
            added,
            human(t.info.free_bytes),
            t.info.free_bytes
        );
    }
    Ok(())
}

/// Appends zeros to the overlay through the FAT driver (new clusters, new size). The
/// directory entry's size changes last, so a stop half way leaves the old, intact
/// overlay (and some lost clusters fsck.fat frees).
/// A dm-snapshot grow costs the bus one chunk: the file gets clusters appended to its
/// chain (not written), and only the metadata area the kernel could read next is
/// zeroed (`snapshot::grow_zero_ranges`), before the new size makes it part of the file.
fn grow_on_stick(t: &mut StickTarget, plan: &snapshot::GrowPlan, json: bool) -> anyhow::Result<()> {
    let mut phases = Phases::new(progress(json, &t.stick.path));
    let zero = snapshot::grow_zero_ranges(plan.chunk_sectors, plan.current_bytes, plan.new_bytes);
    let bytes: u64 = zero.iter().map(|r| r.end - r.start).sum();
    phases.update("grow", 0, bytes);
    let start = t.stick.partition.start;
    let path = t.overlay.clone();
    fat_alloc::extend_with(
        t.stick.file_mut(),
        start,
        &path,
        plan.new_bytes,
        |dev, extents| {
            let mut file = ExtentFile::new(dev, extents);
            crate::io::zero_ranges(&mut file, zero.iter().cloned())?;
            file.into_inner().sync_data()
        },
    )
    .with_context(|| format!("growing {}", t.show()))?;
    t.stick
        .file_mut()
        .sync_all()
        .with_context(|| format!("syncing {}", t.stick.path.display()))?;
    phases.update("grow", bytes, bytes);
    t.overlay_bytes = plan.new_bytes;
    phases.bar.finish();
    Ok(())
}

/// Appends `added` zero bytes to the overlay through the FAT driver (see `grow_on_stick`).
fn extend_on_stick(
    t: &mut StickTarget,
    added: u64,
    new_bytes: u64,
    phases: &mut Phases,
) -> anyhow::Result<()> {
    let path = t.overlay.clone();
    phases.update("grow", 0, added);
    t.stick.with_fs(|fs| {
        let io = |source| StickError::Io {
            path: PathBuf::from(&path),
            source,
        };
        let mut f = fs
            .root_dir()
            .open_file(path.trim_start_matches('/'))
            .map_err(io)?;
        f.seek(SeekFrom::End(0)).map_err(io)?;
        let zeros = vec![0u8; 1 << 20];
        let mut done = 0u64;
        while done < added {
            let n = (added - done).min(zeros.len() as u64) as usize;
            f.write_all(&zeros[..n]).map_err(io)?;
            done += n as u64;
            phases.update("grow", done, added);
        }
        f.flush().map_err(io)?;
        Ok(())
    })?;
    t.overlay_bytes = new_bytes;
    Ok(())
}

fn stick_grow(a: &GrowArgs, json: bool) -> anyhow::Result<()> {
    let mut t = open_stick(&a.target, &a.sel, !a.dry_run, false)?;
    if t.kind == OverlayKind::Overlayfs {
        return ovl_stick_grow(a, t, json);
    }
    let len = t.overlay_bytes;
    let show = t.show();
    let chunk = {
        let mut f = t.overlay_file()?;
        let chunk =
            chunk_sectors_of(&mut f).with_context(|| format!("{show} is not an overlay"))?;
        check_before_grow(&mut f, len, &show)?;
        chunk
    };
    let requested = match (a.size_mb, a.add_mb) {
        (Some(s), _) => s.saturating_mul(MIB),
        (None, Some(add)) => len.saturating_add(add.saturating_mul(MIB)),
        (None, None) => bail!("give --size-mb N or --add-mb N"),
    };
    let plan = stick_grow_plan(&t, requested, chunk)?;
    if !a.dry_run {
        grow_on_stick(&mut t, &plan, json)?;
    }
    grow_report(&t.show(), &plan, a.dry_run, json)
}

// ---------------------------------------------------------------------------------
// OverlayFS overlays: the ext4 inside is checked and repaired with e2fsck and grown
// with resize2fs (persist::ovl_maint). A bare file is changed in place; an overlay on
// a stick through a work copy whose changed blocks are written back.

fn is_ext4_file(path: &Path) -> anyhow::Result<bool> {
    let (mut f, _) = open_ro(path)?;
    Ok(store::is_ext4(&mut f))
}

fn requested_bytes(size_mb: Option<u64>, add_mb: Option<u64>, len: u64) -> anyhow::Result<u64> {
    match (size_mb, add_mb) {
        (Some(s), _) => Ok(s.saturating_mul(MIB)),
        (None, Some(add)) => Ok(len.saturating_add(add.saturating_mul(MIB))),
        (None, None) => bail!("give --size-mb N or --add-mb N"),
    }
}

/// --origin, --origin-size and --squashfs describe the root image a dm-snapshot
/// overlay belongs to; an OverlayFS overlay is checked on its own.
fn refuse_dm_only_args(a: &RecoverArgs, show: &str) -> anyhow::Result<()> {
    if a.origin.origin.is_some() || a.origin.origin_size.is_some() || a.squashfs.is_some() {
        bail!(super::write::BadInput(format!(
            "{show} is an OverlayFS overlay (an ext4 file system): it is checked and repaired on its own, so --origin, --origin-size and --squashfs (which name the root image of a device-mapper snapshot overlay) do not apply; run the command without them"
        )));
    }
    Ok(())
}

/// What an OverlayFS recover or grow found and did (or, in a dry run, would do).
#[derive(Serialize)]
struct OvlOutcome {
    overlay: String,
    kind: OverlayKind,
    dry_run: bool,
    /// The superblock before anything ran.
    superblock: ovl_maint::Super,
    /// Where the tools ran: in place, or on a work copy.
    method: String,
    check: Option<ovl_maint::FsckReport>,
    repair: Option<ovl_maint::FsckReport>,
    /// `e2fsck -f -n` after the repair.
    check_after: Option<ovl_maint::FsckReport>,
    /// `e2fsck -f -p` before resize2fs.
    preen: Option<ovl_maint::FsckReport>,
    grow: Option<ovl_maint::GrowPlan>,
    grown: bool,
    write_back: Option<ovl_maint::WriteBack>,
    notes: Vec<String>,
}

impl OvlOutcome {
    fn new(
        overlay: String,
        dry_run: bool,
        superblock: ovl_maint::Super,
        grow: Option<ovl_maint::GrowPlan>,
    ) -> OvlOutcome {
        OvlOutcome {
            overlay,
            kind: OverlayKind::Overlayfs,
            dry_run,
            superblock,
            method: "in place".to_string(),
            check: None,
            repair: None,
            check_after: None,
            preen: None,
            grow,
            grown: false,
            write_back: None,
            notes: Vec::new(),
        }
    }
}

fn super_of(path: &Path) -> anyhow::Result<ovl_maint::Super> {
    let (mut f, _) = open_ro(path)?;
    Ok(ovl_maint::Super::read_from(&mut f)?)
}

/// Which e2fsck/resize2fs steps an OverlayFS recover or grow runs.
#[derive(Clone, Copy)]
struct OvlSteps<'a> {
    /// `e2fsck -f -n` first.
    check: bool,
    /// `e2fsck -f -y` when the check found problems.
    repair: bool,
    grow: Option<&'a ovl_maint::GrowPlan>,
}

/// The e2fsck/resize2fs sequence on `image` (the bare overlay, or the work copy of
/// one on a stick): with `check`, `e2fsck -f -n`; with `repair` and problems found,
/// `e2fsck -f -y` and `-n` again; with `grow`, `e2fsck -f -p`, then `extend` (the
/// file takes its new size), then resize2fs. An unclean file system is not grown
/// unless it was repaired first.
fn run_ovl_tools(
    image: &Path,
    target: &Path,
    steps: OvlSteps<'_>,
    out: &mut OvlOutcome,
    phases: &mut Phases,
    extend: &mut dyn FnMut(&mut Phases) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    use ovl_maint::FsckMode;
    let OvlSteps {
        check,
        repair,
        grow,
    } = steps;
    let show = out.overlay.clone();
    let fsck = |mode: FsckMode, phases: &mut Phases| -> anyhow::Result<ovl_maint::FsckReport> {
        let phase = match mode {
            FsckMode::Check => "check",
            FsckMode::Preen => "preen",
            FsckMode::Repair => "repair",
        };
        phases.update(phase, 0, 1);
        let sb = super_of(image)?;
        let r = ovl_maint::fsck(image.as_os_str(), &show, mode, &sb)?;
        phases.update(phase, 1, 1);
        Ok(r)
    };
    let mut may_grow = true;
    if check {
        let c = fsck(FsckMode::Check, phases)?;
        let clean = c.clean;
        let problems = summarize_problems(&c);
        out.check = Some(c);
        if !clean && repair {
            let r = fsck(FsckMode::Repair, phases)?;
            out.repair = Some(r);
            let after = fsck(FsckMode::Check, phases)?;
            if !after.clean && grow.is_some() {
                may_grow = false;
                out.notes.push(
                    "not grown: e2fsck -f -y left problems (see above); the repairs it made were kept"
                        .to_string(),
                );
            }
            out.check_after = Some(after);
        } else if !clean && grow.is_some() {
            bail!(super::write::BadInput(format!(
                "{show} needs repairing before it can grow, so nothing was changed. e2fsck -f -n found:{problems}\nAdd --repair: `livestick overlay recover {} --repair --add-mb N` repairs it (e2fsck -f -y), then grows it",
                target.display()
            )));
        }
    }
    let Some(g) = grow.filter(|_| may_grow) else {
        return Ok(());
    };
    let p = fsck(FsckMode::Preen, phases)?;
    if p.errors_left {
        bail!(super::write::BadInput(format!(
            "e2fsck -f -p (the check resize2fs asks for) found problems in {show} that it does not fix unattended (exit {}), so it was not grown:{}\nRepair and grow in one go with `livestick overlay recover {} --repair --add-mb N` (e2fsck -f -y first)",
            p.exit_code,
            summarize_problems(&p),
            target.display()
        )));
    }
    out.preen = Some(p);
    extend(phases)?;
    phases.update("resize", 0, 1);
    ovl_maint::resize(image, &show, g.new_bytes)?;
    phases.update("resize", 1, 1);
    out.grown = true;
    Ok(())
}

fn summarize_problems(r: &ovl_maint::FsckReport) -> String {
    let mut all: Vec<&str> = r.findings.iter().map(String::as_str).collect();
    all.extend(r.problems.iter().map(String::as_str));
    if all.is_empty() {
        format!(" exit {}, {}", r.exit_code, r.meaning)
    } else {
        format!("\n  - {}", all.join("\n  - "))
    }
}

/// On a stick: the tools run on a work copy; only if they all succeed is the overlay
/// extended through the FAT and are the changed blocks written back (primary
/// superblock last), so a failure of any tool leaves the stick as it was.
fn ovl_stick_change(
    t: &mut StickTarget,
    workdir: &Path,
    target: &Path,
    steps: OvlSteps<'_>,
    out: &mut OvlOutcome,
    json: bool,
) -> anyhow::Result<()> {
    let grow = steps.grow;
    let show = t.show();
    let len = t.overlay_bytes;
    let new_len = grow.map_or(len, |g| g.new_bytes);
    ovl_maint::check_workdir(workdir, &show, new_len)?;
    let mut phases = Phases::new(progress(json, &t.stick.path));
    let mut copy = {
        let mut f = t.overlay_file()?;
        ovl_maint::WorkCopy::create(&mut f, len, workdir, &show, &mut |d, n| {
            phases.update("copy", d, n)
        })?
    };
    out.method = format!("a work copy in {}", workdir.display());
    copy.set_len(new_len)?;
    copy.mark_baseline()?;
    run_ovl_tools(
        copy.path(),
        target,
        steps,
        out,
        &mut phases,
        &mut |_| Ok(()),
    )
    .with_context(|| format!("{show}: stopped before anything on the stick was changed"))?;
    if let Some(g) = grow.filter(|g| out.grown && g.added_bytes > 0) {
        extend_on_stick(t, g.added_bytes, g.new_bytes, &mut phases)?;
    }
    let wb = {
        let mut f = t.overlay_file()?;
        copy.write_back(&mut f, &mut |d, n| phases.update("write back", d, n))?
    };
    phases.bar.finish();
    out.write_back = Some(wb);
    Ok(())
}

/// The read-only check of an overlay on a stick: in place when it is contiguous
/// (`stick?offset=N`), else on a work copy.
fn ovl_stick_check(
    t: &mut StickTarget,
    workdir: &Path,
    out: &mut OvlOutcome,
    json: bool,
) -> anyhow::Result<()> {
    let show = t.show();
    let offset = t.overlay_file()?.contiguous_offset();
    let spec = offset.and_then(|o| ovl_maint::in_place_spec(&t.stick.path, o));
    let mut phases = Phases::new(progress(json, &t.stick.path));
    let report = match spec {
        Some(spec) => {
            out.method = format!("in place, read-only ({})", spec.to_string_lossy());
            phases.update("check", 0, 1);
            let r = ovl_maint::fsck(&spec, &show, ovl_maint::FsckMode::Check, &out.superblock)?;
            phases.update("check", 1, 1);
            r
        }
        None => {
            ovl_maint::check_workdir(workdir, &show, t.overlay_bytes)?;
            let len = t.overlay_bytes;
            let copy = {
                let mut f = t.overlay_file()?;
                ovl_maint::WorkCopy::create(&mut f, len, workdir, &show, &mut |d, n| {
                    phases.update("copy", d, n)
                })?
            };
            out.method = format!(
                "a work copy in {} (the overlay is not contiguous on the stick)",
                workdir.display()
            );
            phases.update("check", 0, 1);
            let r = ovl_maint::fsck(
                copy.path().as_os_str(),
                &show,
                ovl_maint::FsckMode::Check,
                &out.superblock,
            )?;
            phases.update("check", 1, 1);
            r
        }
    };
    phases.bar.finish();
    out.check = Some(report);
    Ok(())
}

fn ovl_stick_recover(a: &RecoverArgs, mut t: StickTarget, json: bool) -> anyhow::Result<()> {
    let show = t.show();
    refuse_dm_only_args(a, &show)?;
    let len = t.overlay_bytes;
    let sb = {
        let mut f = t.overlay_file()?;
        ovl_maint::Super::read_from(&mut f).with_context(|| show.clone())?
    };
    let grow = match a.add_mb {
        Some(add) => {
            let requested = len.saturating_add(add.saturating_mul(MIB));
            check_fat_limit(&t, requested)?;
            let p = ovl_maint::plan_grow(&show, len, &sb, requested, FAT_MAX_FILE_BYTES)?;
            check_stick_free(&t, p.added_bytes)?;
            Some(p)
        }
        None => None,
    };
    let mut out = OvlOutcome::new(show, a.dry_run, sb, grow.clone());
    if a.dry_run || !(a.repair || grow.is_some()) {
        ovl_stick_check(&mut t, &a.workdir, &mut out, json)?;
        if a.dry_run {
            let copy = format!("a work copy in {}", a.workdir.display());
            let clean = out.check.as_ref().is_some_and(|c| c.clean);
            if a.repair && !clean {
                out.notes.push(format!(
                    "would run e2fsck -f -y on {copy}, then write back the blocks it changes (the primary superblock last)"
                ));
            }
            if let Some(g) = &grow {
                if clean || a.repair {
                    out.notes.push(format!(
                        "would append {} through the FAT, run e2fsck -f -p and resize2fs on {copy}, and write back the blocks they change",
                        human(g.added_bytes)
                    ));
                } else {
                    out.notes.push(
                        "would not grow: the file system needs repairing first (add --repair)"
                            .to_string(),
                    );
                }
            }
        }
        return ovl_report(&out, &a.target, json);
    }
    drop(t);
    let mut t = open_stick(&a.target, &a.sel, true, false)?;
    let steps = OvlSteps {
        check: true,
        repair: a.repair,
        grow: grow.as_ref(),
    };
    ovl_stick_change(&mut t, &a.workdir, &a.target, steps, &mut out, json)?;
    ovl_report(&out, &a.target, json)
}

fn ovl_stick_grow(a: &GrowArgs, mut t: StickTarget, json: bool) -> anyhow::Result<()> {
    let show = t.show();
    let len = t.overlay_bytes;
    let sb = {
        let mut f = t.overlay_file()?;
        ovl_maint::Super::read_from(&mut f).with_context(|| show.clone())?
    };
    let requested = requested_bytes(a.size_mb, a.add_mb, len)?;
    check_fat_limit(&t, requested)?;
    let plan = ovl_maint::plan_grow(&show, len, &sb, requested, FAT_MAX_FILE_BYTES)?;
    check_stick_free(&t, plan.added_bytes)?;
    ovl_maint::check_workdir(&a.workdir, &show, plan.new_bytes)?;
    let mut out = OvlOutcome::new(show, a.dry_run, sb, Some(plan.clone()));
    out.method = format!("a work copy in {}", a.workdir.display());
    if a.dry_run {
        out.notes.push(format!(
            "would copy the overlay to {}, run e2fsck -f -p and resize2fs there, append {} to the overlay through the FAT, and write back the blocks they change (the primary superblock last)",
            a.workdir.display(),
            human(plan.added_bytes)
        ));
        out.notes.extend(out.superblock.findings());
        return ovl_report(&out, &a.target, json);
    }
    let steps = OvlSteps {
        check: false,
        repair: false,
        grow: Some(&plan),
    };
    ovl_stick_change(&mut t, &a.workdir, &a.target, steps, &mut out, json)?;
    ovl_report(&out, &a.target, json)
}

/// A bare overlay file: e2fsck and resize2fs work on it in place. A grow extends the
/// file first (an ext4 in a larger file is still valid), then resizes.
fn ovl_bare_change(
    path: &Path,
    f: &mut File,
    steps: OvlSteps<'_>,
    out: &mut OvlOutcome,
    json: bool,
) -> anyhow::Result<()> {
    let grow = steps.grow;
    let mut phases = Phases::new(progress(json, path));
    let mut extended = false;
    let result = run_ovl_tools(path, path, steps, out, &mut phases, &mut |phases| {
        if let Some(g) = grow.filter(|g| g.added_bytes > 0) {
            phases.update("grow", 0, g.added_bytes);
            f.set_len(g.new_bytes)
                .and_then(|()| f.sync_all())
                .with_context(|| format!("extending {}", path.display()))?;
            phases.update("grow", g.added_bytes, g.added_bytes);
            extended = true;
        }
        Ok(())
    });
    phases.bar.finish();
    match (result, grow) {
        (Err(e), Some(g)) if extended => Err(e.context(format!(
            "{} was extended to {} bytes but its ext4 still has {}: it is intact and usable; run `livestick overlay grow {} --size-mb {}` to finish",
            path.display(),
            g.new_bytes,
            g.fs_bytes_before,
            path.display(),
            g.new_bytes / MIB
        ))),
        (r, _) => r,
    }
}

fn ovl_bare_grow(a: &GrowArgs, path: &Path, json: bool) -> anyhow::Result<()> {
    let show = path.display().to_string();
    let (mut f, len) = if a.dry_run {
        open_ro(path)?
    } else {
        open_rw(path)?
    };
    let sb = ovl_maint::Super::read_from(&mut f).with_context(|| show.clone())?;
    let requested = requested_bytes(a.size_mb, a.add_mb, len)?;
    let plan = ovl_maint::plan_grow(&show, len, &sb, requested, FAT_MAX_FILE_BYTES)?;
    let mut out = OvlOutcome::new(show, a.dry_run, sb, Some(plan.clone()));
    if a.dry_run {
        out.notes.push(format!(
            "would run e2fsck -f -p, extend the file by {}, then run resize2fs, all in place",
            human(plan.added_bytes)
        ));
        out.notes.extend(out.superblock.findings());
        return ovl_report(&out, path, json);
    }
    let steps = OvlSteps {
        check: false,
        repair: false,
        grow: Some(&plan),
    };
    ovl_bare_change(path, &mut f, steps, &mut out, json)?;
    ovl_report(&out, path, json)
}

fn ovl_bare_recover(a: &RecoverArgs, path: &Path, json: bool) -> anyhow::Result<()> {
    let show = path.display().to_string();
    refuse_dm_only_args(a, &show)?;
    let changes = !a.dry_run && (a.repair || a.add_mb.is_some());
    let (mut f, len) = if changes {
        open_rw(path)?
    } else {
        open_ro(path)?
    };
    let sb = ovl_maint::Super::read_from(&mut f).with_context(|| show.clone())?;
    let grow = match a.add_mb {
        Some(add) => Some(ovl_maint::plan_grow(
            &show,
            len,
            &sb,
            len.saturating_add(add.saturating_mul(MIB)),
            FAT_MAX_FILE_BYTES,
        )?),
        None => None,
    };
    let mut out = OvlOutcome::new(show, a.dry_run, sb, grow.clone());
    if !changes {
        let mut phases = Phases::new(progress(json, path));
        phases.update("check", 0, 1);
        let r = ovl_maint::fsck(
            path.as_os_str(),
            &out.overlay,
            ovl_maint::FsckMode::Check,
            &out.superblock,
        );
        phases.update("check", 1, 1);
        phases.bar.finish();
        let clean = r.as_ref().is_ok_and(|r| r.clean);
        out.check = Some(r?);
        if a.dry_run && a.repair && !clean {
            out.notes
                .push("would run e2fsck -f -y in place, then e2fsck -f -n again".to_string());
        }
        if let (true, Some(g)) = (a.dry_run, &grow) {
            out.notes.push(if clean || a.repair {
                format!(
                    "would run e2fsck -f -p, extend the file by {}, then run resize2fs",
                    human(g.added_bytes)
                )
            } else {
                "would not grow: the file system needs repairing first (add --repair)".to_string()
            });
        }
        return ovl_report(&out, path, json);
    }
    let steps = OvlSteps {
        check: true,
        repair: a.repair,
        grow: grow.as_ref(),
    };
    ovl_bare_change(path, &mut f, steps, &mut out, json)?;
    ovl_report(&out, path, json)
}

fn print_fsck(show: &str, r: &ovl_maint::FsckReport) {
    let state = if r.clean {
        "clean"
    } else if r.exit_code == 0 && r.mode == ovl_maint::FsckMode::Check {
        "no errors in the checked state, but the superblock asks for a repair run"
    } else {
        r.meaning
    };
    println!("{} on {show}: {state} (exit {})", r.command, r.exit_code);
    for f in &r.findings {
        println!("  finding: {f}");
    }
    for p in &r.problems {
        println!("  problem: {p}");
    }
    if r.more_problems > 0 {
        println!(
            "  … and {} more (--json has e2fsck's whole output)",
            r.more_problems
        );
    }
    if let Some(s) = &r.summary {
        println!("  in use: {s}");
    }
}

fn ovl_report(out: &OvlOutcome, target: &Path, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(out);
    }
    let show = &out.overlay;
    println!("overlay         {show} (OverlayFS: ext4 with overlayfs/ + ovlwork/)");
    println!("method          {}", out.method);
    if let Some(c) = &out.check {
        print_fsck(show, c);
        if !c.clean && out.repair.is_none() && !out.dry_run {
            println!(
                "nothing was changed; `livestick overlay recover {} --repair` fixes this with e2fsck -f -y",
                target.display()
            );
        }
    }
    if let Some(r) = &out.repair {
        print_fsck(show, r);
    }
    if let Some(c) = &out.check_after {
        print_fsck(show, c);
    }
    if let Some(p) = out.preen.as_ref().filter(|p| p.modified) {
        println!("e2fsck -f -p before resizing: {}", p.meaning);
    }
    if let Some(g) = &out.grow {
        let verb = if out.dry_run {
            "would grow"
        } else if out.grown {
            "grew"
        } else {
            "did not grow"
        };
        println!(
            "{verb} {show} from {} to {} (its ext4 from {})",
            human(g.current_bytes),
            human(g.new_bytes),
            human(g.fs_bytes_before)
        );
        for n in &g.notes {
            println!("note: {n}");
        }
    }
    if let Some(w) = &out.write_back {
        println!(
            "{} changed blocks of 4 KiB written back to {show}",
            w.chunks_written
        );
    }
    for n in &out.notes {
        println!("note: {n}");
    }
    Ok(())
}

/// For callers that need to know whether a path is a stick.
pub fn is_stick(path: &Path) -> bool {
    stick::looks_like_stick(path)
}
