//! `livestick overlay status|merge|reset|recover|grow`: maintenance of the persistent
//! overlay, on a stick (block device or image file, its FAT filesystem never mounted)
//! or on a bare overlay file (with its squashfs.img or root image).
//!
//! On a stick the overlay is found as `LiveOS/overlay-<LABEL>-<UUID>` and read and
//! written in place through its FAT extents; squashfs.img is replaced by a directory
//! entry swap (see `disk::fat_raw`).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde::Serialize;

use super::write::BadInput;
use crate::disk::ext4::Superblock;
use crate::persist::merge::{self, MergeRequest, StickMergeRequest};
use crate::persist::overlay::dm::RootImage;
use crate::persist::overlay::place::{
    self, Bare, OverlayIo, Place, Selection, StickOverlay, Target,
};
use crate::persist::overlay::{
    self, GrowRequest, Kind, OverlayError, ResetPlan, dir, dm, ovlfs, store,
};
use crate::persist::snapshot::{self, LIVEOS_CHUNK_SECTORS, Opened, SECTOR_BYTES};
use crate::persist::{ovl_maint, ovl_merge};
use crate::progress::{Progress, ProgressMode};
use crate::size::{human, parse_size};
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

/// Turns the library's typed error into the chain the front reports, with
/// `BadInput` where the exit code has always said bad input.
fn lift(e: OverlayError) -> anyhow::Error {
    match e {
        OverlayError::BadInput(m) => anyhow::Error::new(BadInput(m)),
        OverlayError::NotUsable { overlay, source } => anyhow::Error::new(source)
            .context(BadInput(format!("{overlay} is not a usable overlay"))),
        OverlayError::Context { context, source } => lift(*source).context(context),
        OverlayError::Snapshot(e) => e.into(),
        OverlayError::Maint(e) => e.into(),
        OverlayError::Store(e) => e.into(),
        OverlayError::Stick(e) => e.into(),
        OverlayError::Alloc(e) => e.into(),
        OverlayError::Merge(e) => e.into(),
        OverlayError::Io(e) => e.into(),
        e @ OverlayError::Refused(_) => anyhow::Error::new(e),
    }
}

fn selection(sel: &StickSel) -> Selection {
    Selection {
        live_dir: sel.live_dir.clone(),
        overlay_file: sel.overlay_file.clone(),
    }
}

fn open_stick(
    path: &Path,
    sel: &StickSel,
    writable: bool,
    allow_orphan: bool,
) -> anyhow::Result<StickOverlay> {
    StickOverlay::open(path, &selection(sel), writable, allow_orphan).map_err(lift)
}

/// A bare overlay file, after refusing a disk that is not a live stick.
fn open_bare(path: &Path, writable: bool) -> anyhow::Result<Bare> {
    place::refuse_disk(path).map_err(lift)?;
    Bare::open(path, writable).map_err(lift)
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

/// Adapts the library's `(phase, done, total)` callbacks to a phase-based bar.
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

/// Runs `step` with a bar named after `device`, finished afterwards.
fn with_bar<T>(
    json: bool,
    device: &Path,
    step: impl FnOnce(&mut dyn FnMut(&str, u64, u64)) -> Result<T, OverlayError>,
) -> anyhow::Result<T> {
    let mut phases = Phases::new(progress(json, device));
    let r = step(&mut |p, d, t| phases.update(p, d, t));
    phases.bar.finish();
    r.map_err(lift)
}

// ---------------------------------------------------------------------------------
// status

fn status(a: &StatusArgs, json: bool) -> anyhow::Result<()> {
    match place::target_of(&a.target) {
        Target::Stick => stick_status(a, json),
        Target::Dir => dir_status(&a.target, json),
        Target::File => file_status(a, json),
    }
}

fn file_status(a: &StatusArgs, json: bool) -> anyhow::Result<()> {
    let mut bare = open_bare(&a.target, false)?;
    bare.refuse_empty().map_err(lift)?;
    let path = bare.path.clone();
    let show = bare.show();
    if bare.kind() == Kind::Overlayfs {
        let info = store::overlay_info(&mut bare.file);
        let usage = ovlfs::usage_of_bare(info.as_ref(), bare.len);
        if json {
            return print_json(&serde_json::json!({
                "overlay": path, "kind": "overlayfs", "size_bytes": usage.size_bytes,
                "used_bytes": usage.used_bytes,
                "bytes_free": usage.bytes_free, "percent_used": usage.percent_used,
            }));
        }
        println!("overlay         {show}");
        print_ovlfs_usage(&usage);
        return Ok(());
    }
    let origin = origin_sectors(&a.origin)?;
    let report = dm::status(&mut bare.file, bare.len, origin, &show).map_err(lift)?;
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
    print_status(&show, &report);
    Ok(())
}

fn print_ovlfs_usage(usage: &ovlfs::Usage) {
    println!("kind            OverlayFS (ext4 with overlayfs/ + ovlwork/)");
    println!("size            {}", human(usage.size_bytes));
    println!(
        "used            {:.2} % ({} free)",
        usage.percent_used,
        human(usage.bytes_free)
    );
}

fn dir_status(dir_path: &Path, json: bool) -> anyhow::Result<()> {
    let st = dir::status(dir_path).map_err(lift)?;
    if json {
        return print_json(&serde_json::json!({
            "overlay": dir_path, "kind": Kind::OverlayfsDir, "upper_entries": st.upper_entries,
            "used_bytes": st.used_bytes, "bytes_free": st.bytes_free,
        }));
    }
    println!("overlay         {}", dir_path.display());
    println!(
        "kind            OverlayFS directory (overlayfs/ + ovlwork/ on the stick's file system)"
    );
    println!(
        "upper dir       {} entries, {}",
        st.upper_entries,
        human(st.used_bytes)
    );
    println!(
        "free            {} on its file system",
        human(st.bytes_free)
    );
    Ok(())
}

fn stick_status(a: &StatusArgs, json: bool) -> anyhow::Result<()> {
    let mut t = open_stick(&a.target, &a.sel, false, true)?;
    let orphans = t.orphans();
    let notes = t.name_notes();
    let show = t.show();
    let len = t.overlay_bytes;
    if t.kind == Kind::Overlayfs {
        let sb = Superblock::read_from(&mut t.io().map_err(lift)?).ok();
        let usage = ovlfs::usage_on_stick(sb.as_ref(), len);
        if json {
            return print_json(&serde_json::json!({
                "stick": t.stick.path, "label": t.info.label, "fs_uuid": t.info.fs_uuid,
                "overlay": t.overlay, "expected_overlay": t.info.expected_overlay,
                "orphaned": t.orphaned, "orphaned_overlays": orphans, "kind": t.kind,
                "size_bytes": usage.size_bytes, "used_bytes": usage.used_bytes,
                "bytes_free": usage.bytes_free, "percent_used": usage.percent_used,
                "notes": notes,
            }));
        }
        println!(
            "stick           {} ({} {})",
            t.stick.path.display(),
            t.info.label,
            t.info.fs_uuid
        );
        println!("overlay         {}", t.overlay);
        print_ovlfs_usage(&usage);
        for n in &notes {
            println!("note            {n}");
        }
        return Ok(());
    }
    let origin = match origin_sectors(&a.origin)? {
        Some(s) => Some(s),
        None => t.root_image_bytes().map(|b| b / SECTOR_BYTES),
    };
    let report = dm::status(&mut t.io().map_err(lift)?, len, origin, &show).map_err(lift)?;
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
            kind: Kind,
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

// ---------------------------------------------------------------------------------
// merge: the merge module plans and runs it

fn merge_cmd(a: &MergeArgs, json: bool) -> anyhow::Result<()> {
    if place::target_of(&a.target) == Target::Stick {
        return stick_merge(a, json);
    }
    place::refuse_disk(&a.target).map_err(lift)?;
    let path = a.target.clone();
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

// ---------------------------------------------------------------------------------
// reset

fn reset(a: &ResetArgs, json: bool) -> anyhow::Result<()> {
    match place::target_of(&a.target) {
        Target::Stick => {
            let mut t = open_stick(&a.target, &a.sel, !a.dry_run, false)?;
            let show = t.show();
            let len = t.overlay_bytes;
            reset_file(&mut t.io().map_err(lift)?, len, &show, a, json)
        }
        Target::Dir => {
            let (used, entries) = dir::inspect_reset(&a.target).map_err(lift)?;
            let plan = dir::plan_reset(&a.target, used, entries);
            confirmed_reset(&plan, a, json, || dir::apply_reset(&a.target))
        }
        Target::File => {
            let mut bare = open_bare(&a.target, !a.dry_run)?;
            bare.refuse_empty().map_err(lift)?;
            let show = bare.show();
            reset_file(&mut bare.file, bare.len, &show, a, json)
        }
    }
}

fn reset_file<F: OverlayIo>(
    f: &mut F,
    len: u64,
    show: &str,
    a: &ResetArgs,
    json: bool,
) -> anyhow::Result<()> {
    let plan = overlay::plan_file_reset(f, len, show);
    confirmed_reset(&plan, a, json, || overlay::apply_file_reset(f, len, &plan))
}

/// What every reset shares: the dry run (`would`, then what is lost), the
/// confirmation naming what is lost, `act`, the report.
fn confirmed_reset(
    plan: &ResetPlan,
    a: &ResetArgs,
    json: bool,
    act: impl FnOnce() -> Result<(), OverlayError>,
) -> anyhow::Result<()> {
    let path = &plan.overlay;
    let lost = &plan.discards;
    let with_kind = |mut base: serde_json::Value| {
        if let (Some(b), Some(kind)) = (base.as_object_mut(), plan.kind) {
            b.insert("kind".to_string(), serde_json::json!(kind));
        }
        base
    };
    if a.dry_run {
        if json {
            let mut dry = with_kind(
                serde_json::json!({"overlay": path, "dry_run": true, "would_discard": lost}),
            );
            if let (Some(b), Some(z)) = (dry.as_object_mut(), plan.zeroed_bytes) {
                b.insert("zeroed_bytes".to_string(), serde_json::json!(z));
            }
            return print_json(&dry);
        }
        println!("{}, discarding {lost}", plan.would);
        return Ok(());
    }
    let question = format!(
        "Reset {path}? This discards {lost}: every change made in the live system since the last merge or reset."
    );
    if !super::confirm(&question, a.yes)? {
        bail!("not confirmed; nothing changed");
    }
    act().map_err(lift)?;
    if json {
        return print_json(&with_kind(
            serde_json::json!({"overlay": path, "reset": true, "discarded": lost}),
        ));
    }
    println!("reset {path}: discarded {lost}");
    Ok(())
}

// ---------------------------------------------------------------------------------
// recover

fn recover(a: &RecoverArgs, json: bool) -> anyhow::Result<()> {
    match place::target_of(&a.target) {
        Target::Stick => {
            let t = open_stick(&a.target, &a.sel, false, false)?;
            if t.kind == Kind::Overlayfs {
                return ovlfs_recover(a, Place::Stick(Box::new(t)), json);
            }
            drop(t);
            let mut t = open_stick(&a.target, &a.sel, !a.dry_run, false)?;
            let origin = match origin_sectors(&a.origin)? {
                Some(s) => Some(s),
                None => t.root_image_bytes().map(|b| b / SECTOR_BYTES),
            };
            let root = match &a.origin.origin {
                Some(p) => RootImage::File(p.clone()),
                None => RootImage::OnStick,
            };
            dm_recover(a, Place::Stick(Box::new(t)), origin, root, json)
        }
        Target::Dir => Err(lift(dir::refuse(&a.target, "check"))),
        Target::File => {
            place::refuse_disk(&a.target).map_err(lift)?;
            if place::bare_kind(&a.target).map_err(lift)? == Kind::Overlayfs {
                let show = a.target.display().to_string();
                ovlfs::refuse_root_image_args(&show, root_image_args_given(a)).map_err(lift)?;
                let changes = !a.dry_run && (a.repair || a.add_mb.is_some());
                let bare = Bare::open(&a.target, changes).map_err(lift)?;
                return ovlfs_recover(a, Place::Bare(bare), json);
            }
            let show = a.target.display().to_string();
            let origin = origin_sectors(&a.origin)?;
            // --repair needs the root image: --origin, or the one inside squashfs.img.
            let root = match (&a.origin.origin, &a.squashfs) {
                (Some(o), _) => RootImage::File(o.clone()),
                (None, Some(sq)) => RootImage::InSquashfs(sq.clone()),
                (None, None) => RootImage::InSquashfs(a.target.with_file_name("squashfs.img")),
            };
            if let (true, RootImage::InSquashfs(sq)) = (a.repair, &root)
                && !sq.is_file()
            {
                bail!(
                    "--repair needs the root image: pass --origin IMAGE or --squashfs PATH (no squashfs.img next to {show})"
                );
            }
            let bare = Bare::open(&a.target, !a.dry_run).map_err(lift)?;
            dm_recover(a, Place::Bare(bare), origin, root, json)
        }
    }
}

fn root_image_args_given(a: &RecoverArgs) -> bool {
    a.origin.origin.is_some() || a.origin.origin_size.is_some() || a.squashfs.is_some()
}

fn dm_recover(
    a: &RecoverArgs,
    mut place: Place,
    origin: Option<u64>,
    root: RootImage,
    json: bool,
) -> anyhow::Result<()> {
    let show = place.show();
    let len = place.bytes();
    let check =
        dm::inspect_recover(&mut place.io().map_err(lift)?, &show, len, origin).map_err(lift)?;
    let facts = match a.add_mb {
        Some(_) => Some(dm::GrowFacts {
            show: show.clone(),
            current_bytes: len,
            chunk_sectors: dm::chunk_sectors_of(&mut place.io().map_err(lift)?)?,
            room: place.room(),
        }),
        None => None,
    };
    let plan = dm::plan_recover(check, facts.as_ref().zip(a.add_mb)).map_err(lift)?;
    if a.dry_run {
        return recover_report(&show, &plan.check, plan.grow.as_ref(), None, true, json);
    }
    // Grow first: an overlay that ran full would fail again on its first write.
    if let Some(g) = &plan.grow {
        // A bare file is extended in one call: no bar, as before.
        if let Place::Stick(_) = place {
            let device = place.device().to_path_buf();
            with_bar(json, &device, |p| dm::apply_grow(&mut place, g, p))?;
        } else {
            dm::apply_grow(&mut place, g, &mut |_, _, _| {}).map_err(lift)?;
        }
    }
    let new_len = plan.new_bytes(len);
    let report =
        dm::apply_recover(&mut place.io().map_err(lift)?, new_len, origin).map_err(lift)?;
    let repair = if a.repair {
        let device = match &place {
            Place::Bare(b) => b.path.clone(),
            Place::Stick(_) => a.target.clone(),
        };
        Some(with_bar(json, &device, |p| {
            dm::repair(&mut place, &root, new_len, &a.workdir, p)
        })?)
    } else {
        None
    };
    recover_report(
        &show,
        &report,
        plan.grow.as_ref(),
        repair.as_ref(),
        false,
        json,
    )
}

fn ovlfs_recover(a: &RecoverArgs, mut place: Place, json: bool) -> anyhow::Result<()> {
    let show = place.show();
    let len = place.bytes();
    ovlfs::refuse_root_image_args(&show, root_image_args_given(a)).map_err(lift)?;
    let sb = ovlfs::inspect(&mut place.io().map_err(lift)?, &show).map_err(lift)?;
    let room = place.room();
    let plan = ovlfs::plan_recover(
        &show,
        len,
        &sb,
        a.add_mb,
        a.repair,
        a.dry_run,
        room.as_ref(),
    )
    .map_err(lift)?;
    let mut out = ovlfs::Outcome::new(show, a.dry_run, sb, plan.grow.clone());
    let workdir = matches!(place, Place::Stick(_)).then_some(a.workdir.as_path());
    if !plan.changes {
        let device = place.device().to_path_buf();
        with_bar(json, &device, |p| {
            ovlfs::apply_check(&mut place, &a.workdir, &mut out, p)
        })?;
        if a.dry_run {
            let clean = out.check.as_ref().is_some_and(|c| c.clean);
            let notes = ovlfs::recover_dry_run_notes(clean, &plan, workdir);
            out.notes.extend(notes);
        }
        return ovl_report(&out, &a.target, json);
    }
    if let Place::Stick(t) = place {
        // Checked read-only so far; the change needs the stick writable.
        drop(t);
        place = Place::Stick(Box::new(open_stick(&a.target, &a.sel, true, false)?));
    }
    let device = place.device().to_path_buf();
    with_bar(json, &device, |p| {
        ovlfs::apply_change(&mut place, &a.workdir, &a.target, plan.steps(), &mut out, p)
    })?;
    ovl_report(&out, &a.target, json)
}

// ---------------------------------------------------------------------------------
// grow

fn grow(a: &GrowArgs, json: bool) -> anyhow::Result<()> {
    let mut place = match place::target_of(&a.target) {
        Target::Stick => Place::Stick(Box::new(open_stick(&a.target, &a.sel, !a.dry_run, false)?)),
        Target::Dir => return Err(lift(dir::refuse(&a.target, "grow"))),
        Target::File => Place::Bare(open_bare(&a.target, !a.dry_run)?),
    };
    if place.kind() == Kind::Overlayfs {
        return ovlfs_grow(a, place, json);
    }
    if let Place::Bare(b) = &place {
        b.refuse_empty().map_err(lift)?;
    }
    let show = place.show();
    let len = place.bytes();
    let room = place.room();
    let facts = dm::inspect_grow(&mut place.io().map_err(lift)?, &show, len, room).map_err(lift)?;
    let request = GrowRequest::from_options(a.size_mb, a.add_mb).map_err(lift)?;
    let plan = dm::plan_grow(&facts, request).map_err(lift)?;
    if !a.dry_run {
        let device = place.device().to_path_buf();
        with_bar(json, &device, |p| dm::apply_grow(&mut place, &plan, p))?;
    }
    grow_report(&place.show(), &plan, a.dry_run, json)
}

fn ovlfs_grow(a: &GrowArgs, mut place: Place, json: bool) -> anyhow::Result<()> {
    let show = place.show();
    let len = place.bytes();
    let sb = ovlfs::inspect(&mut place.io().map_err(lift)?, &show).map_err(lift)?;
    let request = GrowRequest::from_options(a.size_mb, a.add_mb).map_err(lift)?;
    let room = place.room();
    let plan = ovlfs::plan_grow(&show, len, &sb, request, room.as_ref()).map_err(lift)?;
    let workdir = matches!(place, Place::Stick(_)).then_some(a.workdir.as_path());
    if workdir.is_some() {
        ovl_maint::check_workdir(&a.workdir, &show, plan.new_bytes)?;
    }
    let mut out = ovlfs::plan_grow_outcome(show, a.dry_run, sb, plan.clone(), workdir);
    if a.dry_run {
        return ovl_report(&out, &a.target, json);
    }
    let steps = ovlfs::Steps {
        check: false,
        repair: false,
        grow: Some(&plan),
    };
    let device = place.device().to_path_buf();
    with_bar(json, &device, |p| {
        ovlfs::apply_change(&mut place, &a.workdir, &a.target, steps, &mut out, p)
    })?;
    ovl_report(&out, &a.target, json)
}

// ---------------------------------------------------------------------------------
// reports

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
    let Bare {
        file: mut ov,
        len: ov_len,
        ..
    } = Bare::open(overlay, in_place).map_err(lift)?;
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

fn ovl_report(out: &ovlfs::Outcome, target: &Path, json: bool) -> anyhow::Result<()> {
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
