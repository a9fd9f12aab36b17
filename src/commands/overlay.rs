//! `livestick overlay status|merge|reset|recover|grow`: maintenance of the persistent
//! overlay, on a stick (block device or image file, its FAT filesystem never mounted)
//! or on a bare overlay file (with its squashfs.img or root image).
//!
//! On a stick the overlay is found as `LiveOS/overlay-<LABEL>-<UUID>` and read and
//! written in place through its FAT extents; squashfs.img is replaced by a directory
//! entry swap (see `disk::fat_raw`).

use std::path::Path;

use anyhow::{Context, bail};

use crate::cli::overlay::{
    GrowArgs, MergeArgs, OriginArgs, OverlayCommand, RecoverArgs, ResetArgs, StatusArgs, StickSel,
};
use crate::disk::target;
use crate::error::{BadInput, BadInputBecause};
use crate::persist::merge::{self, MergeRequest, StickMergeRequest};
use crate::persist::overlay::any::Overlay;
use crate::persist::overlay::dm::RootImage;
use crate::persist::overlay::place::{self, Bare, Place, Selection, StickOverlay, Target};
use crate::persist::overlay::report::{
    self, BareDmStatus, BareOvlfsStatus, DirStatus, Grown, MergeDryRun, Merged, OvlfsOutcome,
    PlumbingReport, Recovered, Report, Reset, StickStatus,
};
use crate::persist::overlay::{GrowRequest, Kind, OverlayError, ResetPlan, dir, dm, ovlfs, store};
use crate::persist::ovl_maint;
use crate::persist::snapshot::SECTOR_BYTES;
use crate::progress::{Progress, ProgressMode};
use crate::size::parse_size;

/// One report: its JSON document (`report::document`) with `--json`, its text
/// otherwise. `target` is what the user named.
fn print_report(report: &impl Report, json: bool, target: &Path) -> anyhow::Result<()> {
    if json {
        let opened_repairs = REPAIRED.lock().map(|r| r.clone()).unwrap_or_default();
        let doc = report::document(report, target, &opened_repairs)?;
        crate::outln!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        crate::out!("{report}");
    }
    Ok(())
}

/// What the repair of a stopped replacement's leftovers did when the stick was
/// opened (`replace::repair_stick`, before any verb runs). Kept here rather than
/// passed to each report because every verb opens the stick its own way, and each
/// report must carry it: one process runs one command.
static REPAIRED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn note_repaired(lines: &[String]) {
    if let Ok(mut repaired) = REPAIRED.lock() {
        repaired.extend_from_slice(lines);
    }
}

pub fn run(cmd: OverlayCommand, json: bool) -> anyhow::Result<()> {
    let changes = |dry_run: bool| {
        if dry_run {
            target::Use::DryRun
        } else {
            target::Use::Change
        }
    };
    let (path, usage) = match &cmd {
        // `status` repairs the leftovers of a stopped replacement when it may.
        OverlayCommand::Status(a) => (&a.target, target::Use::Look),
        OverlayCommand::Merge(a) => (&a.target, changes(a.dry_run)),
        OverlayCommand::Reset(a) => (&a.target, changes(a.dry_run)),
        OverlayCommand::Recover(a) => (&a.target, changes(a.dry_run)),
        OverlayCommand::Grow(a) => (&a.target, changes(a.dry_run)),
    };
    // The one open of the target (issue 13): every step below reaches it through
    // this handle, whatever the path names by then.
    let _opened = target::open_target(path, usage)?;
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
        OverlayError::NotUsable { overlay, source } => anyhow::Error::new(BadInputBecause {
            message: format!("{overlay} is not a usable overlay"),
            source: Box::new(source),
        }),
        OverlayError::Context { context, source } => lift(*source).context(context),
        OverlayError::Snapshot(e) => e.into(),
        OverlayError::Maint(e) => e.into(),
        OverlayError::Store(e) => e.into(),
        OverlayError::Stick(e) => e.into(),
        OverlayError::Alloc(e) => e.into(),
        OverlayError::Merge(e) => e.into(),
        OverlayError::Io(e) => e.into(),
        OverlayError::CannotOpen(e) => e.into(),
        OverlayError::Refused(m) => anyhow::Error::new(BadInput(m)),
    }
}

fn selection(sel: &StickSel) -> Selection {
    Selection {
        live_dir: sel.live_dir.clone(),
        overlay_file: sel.overlay_file.clone(),
    }
}

/// How a command uses the stick it opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Only looks (`status`): nothing is refused.
    Look,
    /// Reads now but is a change (a dry run, or a step that reopens the stick
    /// to write later): refused now by the safety checks of a change.
    ReadForChange,
    /// A dry run of a change: the checks of a change, and leftovers of a stopped
    /// replacement are only reported (the real run repairs them).
    DryRun,
    /// Writes: the safety checks and `O_EXCL` of `disk::target`.
    Write,
}

fn open_stick(
    path: &Path,
    sel: &StickSel,
    access: Access,
    allow_orphan: bool,
) -> anyhow::Result<StickOverlay> {
    if matches!(access, Access::ReadForChange | Access::DryRun) {
        target::check_maintenance(&target::probe(path)?)?;
    }
    // Leftovers of a stopped replacement first (issue 13): reading the stick refuses
    // chains two entries share. A dry run only says what the real run will repair.
    if access == Access::DryRun {
        let needed = crate::persist::merge::replace::repairs_needed(path, &sel.live_dir)?;
        for line in &needed {
            eprintln!("livestick overlay: the real run first repairs: {line}");
        }
        let opened = StickOverlay::open(path, &selection(sel), false, allow_orphan).map_err(lift);
        return match opened {
            Err(e) if !needed.is_empty() => Err(e.context(
                "this dry run changes nothing, so it reads the stick before that repair; run the command without --dry-run (it repairs first) or `livestick overlay status` to repair",
            )),
            other => other,
        };
    }
    let repaired = crate::persist::merge::replace::repair_stick(path, &sel.live_dir)?;
    for line in &repaired {
        eprintln!("livestick overlay: repaired: {line}");
    }
    note_repaired(&repaired);
    let writable = access == Access::Write;
    StickOverlay::open(path, &selection(sel), writable, allow_orphan).map_err(lift)
}

/// The overlay on a stick: on its ext4 live partition when it has one (the layout
/// for persistence over 4 GiB), else on its FAT.
fn open_stick_place(path: &Path, sel: &StickSel, access: Access) -> anyhow::Result<Place> {
    let writable = access == Access::Write;
    // A target no change may touch (the system disk) is refused before the first
    // look inside it, which may fail for a reason that would hide the refusal.
    if access != Access::Look {
        target::check_maintenance(&target::probe(path)?)?;
    }
    ext4_leftovers(path, sel, access)?;
    if let Some(o) = place::ext4_live_overlay(path, &selection(sel), writable).map_err(lift)? {
        say_repaired(&o.repaired);
        return Ok(Place::Ext4(Box::new(o)));
    }
    Ok(Place::Stick(Box::new(open_stick(
        path, sel, access, false,
    )?)))
}

/// Leftovers of a stopped merge on an ext4 live partition, repaired before a change
/// (said only, for a dry run) and reported like those of a FAT stick.
fn ext4_leftovers(path: &Path, sel: &StickSel, access: Access) -> anyhow::Result<()> {
    if matches!(access, Access::Look | Access::ReadForChange) {
        return Ok(());
    }
    let write = access == Access::Write;
    let lines = merge::ext4_replace::repair_ext4_stick(path, &sel.live_dir, write)?;
    if write {
        say_repaired(&lines);
    } else {
        for line in &lines {
            eprintln!("livestick overlay: the real run first repairs: {line}");
        }
    }
    Ok(())
}

/// What opening a stick repaired: on stderr now, in the report's `repaired` later.
fn say_repaired(lines: &[String]) {
    for line in lines {
        eprintln!("livestick overlay: repaired: {line}");
    }
    note_repaired(lines);
}

/// The plan of a merge on a stick whose live directory is on its ext4 partition;
/// `None` for a FAT stick.
fn ext4_merge_plan(a: &MergeArgs) -> anyhow::Result<Option<(merge::MergePlan, String)>> {
    target::check_maintenance(&target::probe(&a.target)?)?;
    let Some(o) = place::ext4_live_overlay(&a.target, &selection(&a.sel), false).map_err(lift)?
    else {
        return Ok(None);
    };
    let (overlay, show, unreplayed) = (o.overlay.clone(), o.show(), o.partition.fs.needs_recovery);
    drop(o);
    if unreplayed && !a.dry_run {
        // Replayed first, as before every other change on the partition.
        let o = place::ext4_live_overlay(&a.target, &selection(&a.sel), true).map_err(lift)?;
        if let Some(o) = o {
            say_repaired(&o.repaired);
        }
    }
    ext4_leftovers(&a.target, &a.sel, change(a.dry_run))?;
    let req = merge::Ext4MergeRequest {
        stick: a.target.clone(),
        live_dir: a.sel.live_dir.clone(),
        overlay,
        workdir: a.workdir.clone(),
        fsck: !a.no_fsck,
        compress: a.compress,
    };
    Ok(Some((merge::plan_ext4_merge(&req)?, show)))
}

/// `Write`, or `DryRun`.
fn change(dry_run: bool) -> Access {
    if dry_run {
        Access::DryRun
    } else {
        Access::Write
    }
}

/// A bare overlay file, after refusing a disk that is not a live stick.
fn open_bare(path: &Path, writable: bool) -> anyhow::Result<Bare> {
    place::refuse_disk(path).map_err(lift)?;
    let mut bare = Bare::open(path, writable).map_err(lift)?;
    bare.refuse_not_an_overlay().map_err(lift)?;
    Ok(bare)
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
    match place::target_of(&a.target).map_err(lift)? {
        Target::Stick => stick_status(a, json),
        Target::Dir => dir_status(&a.target, json),
        Target::File => file_status(a, json),
    }
}

fn file_status(a: &StatusArgs, json: bool) -> anyhow::Result<()> {
    let bare = open_bare(&a.target, false)?;
    bare.refuse_empty().map_err(lift)?;
    overlay_file_status(Place::Bare(bare), a, json)
}

/// `status` of an overlay reported as a file of its own: a bare file, or one on a
/// stick's ext4 live partition.
fn overlay_file_status(mut place: Place, a: &StatusArgs, json: bool) -> anyhow::Result<()> {
    let show = place.show();
    let path = std::path::PathBuf::from(&show);
    let len = place.bytes();
    if place.kind() == Kind::Overlayfs {
        let info = store::overlay_info(&mut place.io().map_err(lift)?);
        let usage = ovlfs::usage_of_bare(info.as_ref(), len);
        return print_report(
            &BareOvlfsStatus {
                path: &path,
                usage: &usage,
            },
            json,
            &a.target,
        );
    }
    let origin = origin_sectors(&a.origin)?;
    let status = dm::status(&mut place.io().map_err(lift)?, len, origin, &show).map_err(lift)?;
    print_report(
        &BareDmStatus {
            path: &path,
            report: &status,
        },
        json,
        &a.target,
    )
}

fn dir_status(dir_path: &Path, json: bool) -> anyhow::Result<()> {
    let st = dir::status(dir_path).map_err(lift)?;
    print_report(
        &DirStatus {
            path: dir_path,
            status: &st,
        },
        json,
        dir_path,
    )
}

fn stick_status(a: &StatusArgs, json: bool) -> anyhow::Result<()> {
    if let Some(o) = place::ext4_live_overlay(&a.target, &selection(&a.sel), false).map_err(lift)? {
        if !json {
            for note in o.name_notes() {
                eprintln!("note: {note}");
            }
        }
        return overlay_file_status(Place::Ext4(Box::new(o)), a, json);
    }
    let mut t = open_stick(&a.target, &a.sel, Access::Look, true)?;
    let show = t.show();
    let len = t.overlay_bytes;
    if t.kind == Kind::Overlayfs {
        let target = a.target.display().to_string();
        let usage = ovlfs::usage_on_stick_of(&mut t.io().map_err(lift)?, len, &target);
        return print_report(
            &StickStatus {
                overlay: &t,
                usage: report::Usage::Ovlfs(&usage),
            },
            json,
            &a.target,
        );
    }
    let origin = match origin_sectors(&a.origin)? {
        Some(s) => Some(s),
        None => t.root_image_bytes().map(|b| b / SECTOR_BYTES),
    };
    let status = dm::status(&mut t.io().map_err(lift)?, len, origin, &show).map_err(lift)?;
    print_report(
        &StickStatus {
            overlay: &t,
            usage: report::Usage::Dm(&status),
        },
        json,
        &a.target,
    )
}

// ---------------------------------------------------------------------------------
// merge: the merge module plans and runs it

fn merge_cmd(a: &MergeArgs, json: bool) -> anyhow::Result<()> {
    if place::target_of(&a.target).map_err(lift)? == Target::Stick {
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
                bail!(BadInput(format!(
                    "no squashfs.img next to {}; pass --squashfs PATH (or --origin IMAGE to merge into a bare root image)",
                    path.display()
                )));
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
        return print_report(&MergeDryRun(&plan), json, &path);
    }
    run_merge_plan(&plan, json, &path)
}

fn stick_merge(a: &MergeArgs, json: bool) -> anyhow::Result<()> {
    if a.origin.is_some() || a.squashfs.is_some() {
        bail!(BadInput(
            "--origin and --squashfs are for bare files; on a stick the squashfs.img and overlay are found on it".into()
        ));
    }
    let (mut plan, show) = match ext4_merge_plan(a)? {
        Some(planned) => planned,
        None => {
            let (overlay, show) = {
                let t = open_stick(&a.target, &a.sel, Access::ReadForChange, false)?;
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
            (merge::plan_stick_merge(&req)?, show)
        }
    };
    plan.allow_xattr_loss = a.allow_xattr_loss;
    if a.dry_run || plan.nothing_to_merge {
        return print_report(&MergeDryRun(&plan), json, &a.target);
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
        bail!(BadInput("not confirmed; nothing changed".into()));
    }
    run_merge_plan(&plan, json, &a.target)
}

// ---------------------------------------------------------------------------------
// reset

fn reset(a: &ResetArgs, json: bool) -> anyhow::Result<()> {
    let mut overlay = match place::target_of(&a.target).map_err(lift)? {
        Target::Stick => Overlay::in_file(open_stick_place(&a.target, &a.sel, change(a.dry_run))?),
        Target::Dir => Overlay::Dir(a.target.clone()),
        Target::File => {
            let bare = open_bare(&a.target, !a.dry_run)?;
            bare.refuse_empty().map_err(lift)?;
            Overlay::in_file(Place::Bare(bare))
        }
    };
    let plan = overlay.plan_reset().map_err(lift)?;
    confirmed_reset(&plan, a, json, || overlay.apply_reset(&plan))
}

/// What every reset shares: the dry run (`would`, then what is lost), the
/// confirmation naming what is lost, `act`, the report.
fn confirmed_reset(
    plan: &ResetPlan,
    a: &ResetArgs,
    json: bool,
    act: impl FnOnce() -> Result<(), OverlayError>,
) -> anyhow::Result<()> {
    if a.dry_run {
        return print_report(
            &Reset {
                plan,
                dry_run: true,
            },
            json,
            &a.target,
        );
    }
    let question = format!(
        "Reset {}? This discards {}: every change made in the live system since the last merge or reset.",
        plan.overlay, plan.discards
    );
    if !super::confirm(&question, a.yes)? {
        bail!(BadInput("not confirmed; nothing changed".into()));
    }
    act().map_err(lift)?;
    print_report(
        &Reset {
            plan,
            dry_run: false,
        },
        json,
        &a.target,
    )
}

// ---------------------------------------------------------------------------------
// recover

fn recover(a: &RecoverArgs, json: bool) -> anyhow::Result<()> {
    match place::target_of(&a.target).map_err(lift)? {
        Target::Stick => {
            // Opened once, writable unless a dry run: both kinds may change it.
            let mut place = open_stick_place(&a.target, &a.sel, change(a.dry_run))?;
            if place.kind() == Kind::Overlayfs {
                return ovlfs_recover(a, place, json);
            }
            let origin = match (origin_sectors(&a.origin)?, &mut place) {
                (Some(s), _) => Some(s),
                (None, Place::Stick(t)) => t.root_image_bytes().map(|b| b / SECTOR_BYTES),
                (None, Place::Ext4(o)) => o.root_image_bytes().map(|b| b / SECTOR_BYTES),
                (None, _) => None,
            };
            let root = match &a.origin.origin {
                Some(p) => RootImage::File(p.clone()),
                None => RootImage::OnStick,
            };
            dm_recover(a, place, origin, root, json)
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
                bail!(BadInput(format!(
                    "--repair needs the root image: pass --origin IMAGE or --squashfs PATH (no squashfs.img next to {show})"
                )));
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
        Some(_) => {
            let chunk_sectors = dm::chunk_sectors_of(&mut place.io().map_err(lift)?)?;
            Some(dm::GrowFacts {
                show: show.clone(),
                current_bytes: len,
                chunk_sectors,
                room: place.room(),
            })
        }
        None => None,
    };
    let plan = dm::plan_recover(check, facts.as_ref().zip(a.add_mb)).map_err(lift)?;
    if a.repair {
        dm::repair_preflight(&mut place, &root, &a.workdir).map_err(lift)?;
    }
    if a.dry_run {
        return print_report(
            &Recovered {
                show: &show,
                report: &plan.check,
                grow_plan: plan.grow.as_ref(),
                repair: None,
                dry_run: true,
            },
            json,
            &a.target,
        );
    }
    // Grow first: an overlay that ran full would fail again on its first write.
    if let Some(g) = &plan.grow {
        // A bare file is extended in one call: no bar, as before.
        if !matches!(place, Place::Bare(_)) {
            let device = place.device().to_path_buf();
            with_bar(json, &device, |p| dm::apply_grow(&mut place, g, p))?;
        } else {
            dm::apply_grow(&mut place, g, &mut |_, _, _| {}).map_err(lift)?;
        }
        record_grown_size(&mut place, plan.new_bytes(len));
    }
    let new_len = plan.new_bytes(len);
    let report =
        dm::apply_recover(&mut place.io().map_err(lift)?, new_len, origin).map_err(lift)?;
    let repair = if a.repair {
        let device = match &place {
            Place::Bare(b) => b.path.clone(),
            _ => a.target.clone(),
        };
        Some(with_bar(json, &device, |p| {
            dm::repair(&mut place, &root, new_len, &a.workdir, p)
        })?)
    } else {
        None
    };
    print_report(
        &Recovered {
            show: &show,
            report: &report,
            grow_plan: plan.grow.as_ref(),
            repair: repair.as_ref(),
            dry_run: false,
        },
        json,
        &a.target,
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
    let workdir = (!matches!(place, Place::Bare(_))).then_some(a.workdir.as_path());
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
        return print_report(
            &OvlfsOutcome {
                outcome: &out,
                target: &a.target,
            },
            json,
            &a.target,
        );
    }
    if !place.is_writable() {
        // Checked read-only so far; the change needs the stick writable.
        drop(place);
        place = open_stick_place(&a.target, &a.sel, Access::Write)?;
    }
    let device = place.device().to_path_buf();
    with_bar(json, &device, |p| {
        ovlfs::apply_change(&mut place, &a.workdir, &a.target, plan.steps(), &mut out, p)
    })?;
    if let Some(grow) = &plan.grow {
        record_grown_size(&mut place, grow.new_bytes);
    }
    print_report(
        &OvlfsOutcome {
            outcome: &out,
            target: &a.target,
        },
        json,
        &a.target,
    )
}

// ---------------------------------------------------------------------------------
// grow

fn grow(a: &GrowArgs, json: bool) -> anyhow::Result<()> {
    let mut place = match place::target_of(&a.target).map_err(lift)? {
        Target::Stick => open_stick_place(&a.target, &a.sel, change(a.dry_run))?,
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
        record_grown_size(&mut place, plan.new_bytes);
    }
    print_report(
        &Grown {
            show: &place.show(),
            plan: &plan,
            dry_run: a.dry_run,
        },
        json,
        &a.target,
    )
}

fn ovlfs_grow(a: &GrowArgs, mut place: Place, json: bool) -> anyhow::Result<()> {
    let show = place.show();
    let len = place.bytes();
    let sb = ovlfs::inspect(&mut place.io().map_err(lift)?, &show).map_err(lift)?;
    if let Some(at) = sb.backup_at {
        // e2fsck -p and resize2fs would stop on the damaged primary superblock.
        bail!(BadInput(format!(
            "{show}: its primary ext4 superblock is damaged (it was read from the backup at byte {at}), so nothing was changed; `livestick overlay recover {} --repair --add-mb N` repairs it (e2fsck rewrites it from the backup), then grows it",
            a.target.display()
        )));
    }
    let request = GrowRequest::from_options(a.size_mb, a.add_mb).map_err(lift)?;
    let room = place.room();
    let plan = ovlfs::plan_grow(&show, len, &sb, request, room.as_ref()).map_err(lift)?;
    let workdir = (!matches!(place, Place::Bare(_))).then_some(a.workdir.as_path());
    if workdir.is_some() {
        ovl_maint::check_workdir(&a.workdir, &show, plan.new_bytes)?;
    }
    let mut out = ovlfs::plan_grow_outcome(show, a.dry_run, sb, plan.clone(), workdir);
    if a.dry_run {
        return print_report(
            &OvlfsOutcome {
                outcome: &out,
                target: &a.target,
            },
            json,
            &a.target,
        );
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
    record_grown_size(&mut place, plan.new_bytes);
    print_report(
        &OvlfsOutcome {
            outcome: &out,
            target: &a.target,
        },
        json,
        &a.target,
    )
}

/// The stick's manifest records the overlay's new size, so that `verify` stays true.
fn record_grown_size(place: &mut Place, new_bytes: u64) {
    let record = |m: &mut crate::manifest::Manifest, overlay: &str| {
        crate::manifest::record_persistence_size(m, overlay, "overlay", new_bytes)
    };
    let done = match place {
        Place::Stick(t) => {
            let overlay = t.overlay.clone();
            crate::manifest::rewrite_on_stick(&mut t.stick, |m| record(m, &overlay))
        }
        // On the ext4 layout the manifest is on the stick's FAT, which lists the
        // overlay inside ext4.
        Place::Ext4(o) => {
            let overlay = o.overlay.clone();
            crate::disk::stick::Stick::open(&o.device, true)
                .map_err(crate::manifest::ManifestError::Stick)
                .and_then(|mut stick| {
                    crate::manifest::rewrite_on_stick(&mut stick, |m| record(m, &overlay))
                })
        }
        Place::Bare(_) => return,
    };
    if let Err(e) = done {
        eprintln!(
            "warning: the overlay was grown, but the stick's manifest could not be updated ({e}); `livestick verify` will report the old size"
        );
    }
}

fn run_merge_plan(plan: &merge::MergePlan, json: bool, path: &Path) -> anyhow::Result<()> {
    let mut phases = Phases::new(progress(json, path));
    // The stick's manifest names the new root image: staged before the swap and
    // swapped in with the image, so that `verify` stays true whenever it stops.
    let mut plan = plan.clone();
    plan.stage_companion = Some(crate::manifest::stage_root_replacement);
    let plan = &plan;
    let done = merge::execute_merge(plan, &mut |p, d, t| phases.update(p, d, t));
    phases.bar.finish();
    let done = done?;
    // On the ext4 layout the manifest (on the FAT) lists the root image inside
    // ext4: it names the new one once it is in place. A stop in between leaves
    // `verify` reporting the image changed until the next write.
    if let Some(ext4) = &plan.ext4
        && !plan.nothing_to_merge
        && let Err(e) = crate::manifest::record_replacement_on_stick(
            &ext4.device,
            &ext4.squashfs,
            done.new_squashfs_bytes,
            &done.new_squashfs_sha256,
        )
    {
        eprintln!(
            "warning: the merge is done, but the stick's manifest could not name the new root image ({e}); `livestick verify` will report {} as changed until the stick is written again",
            ext4.squashfs
        );
    }
    print_report(
        &Merged {
            plan,
            report: &done,
        },
        json,
        path,
    )
}

/// The seed's `snapshot-merge` on plain files.
fn merge_plumbing(
    overlay: &Path,
    origin: &Path,
    output: Option<&Path>,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<()> {
    if let Some(out) = output {
        // The output is created (emptied) before the inputs are read: naming one of
        // them would destroy it.
        for input in [overlay, origin] {
            crate::disk::identity::check_distinct(input, &[out.to_path_buf()])?;
        }
    }
    let in_place = output.is_none() && !dry_run;
    let mut bare = Bare::open(overlay, in_place).map_err(lift)?;
    let Some(plan) =
        dm::plan_origin_merge(&mut bare.file, bare.len, overlay, origin).map_err(lift)?
    else {
        if json {
            // A script reads the same document, with nothing applied.
            let nothing = PlumbingReport {
                overlay,
                origin,
                output,
                exceptions: 0,
                dry_run,
                overlay_after: None,
            };
            return print_report(&nothing, json, overlay);
        }
        crate::outln!(
            "{} is a new, empty store: nothing to merge",
            overlay.display()
        );
        return Ok(());
    };
    let n = plan.exceptions();
    let mut report = PlumbingReport {
        overlay,
        origin,
        output,
        exceptions: n,
        dry_run,
        overlay_after: None,
    };
    if !dry_run {
        report.overlay_after = Some(with_bar(json, overlay, |p| {
            dm::apply_origin_merge(&plan, &mut bare.file, bare.len, origin, output, p)
        })?);
    }
    print_report(&report, json, overlay)
}
