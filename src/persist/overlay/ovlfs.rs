//! The OverlayFS overlay file (`rd.live.overlay.overlayfs`): an ext4 file system
//! with `overlayfs/` and `ovlwork/`. Its ext4 is checked and repaired with e2fsck and
//! grown with resize2fs (`persist::ovl_maint`, which owns those tools and the work
//! copy); it is reset to a fresh empty ext4 (`store`). A bare file is changed in
//! place; an overlay on a stick through a work copy whose changed blocks are written
//! back, so a failure of any tool leaves the stick as it was.

use std::io::{Read, Seek};
use std::path::Path;

use serde::Serialize;

use crate::disk::ext4::{Ext4Info, Superblock};
use crate::persist::ovl_maint::{self, FsckMode, FsckReport, GrowPlan, Super, WriteBack};
use crate::persist::snapshot::FAT_MAX_FILE_BYTES;
use crate::size::{MIB, human};

use super::place::{Bare, OverlayIo, Place};
use super::{Explain, GrowRequest, Kind, OverlayError, Progress, ResetPlan, StickRoom, store};

/// How full the overlay's ext4 is, for `status`.
#[derive(Debug, Clone, PartialEq)]
pub struct Usage {
    pub size_bytes: u64,
    /// `None` when a bare file's superblock cannot be read.
    pub used_bytes: Option<u64>,
    pub bytes_free: u64,
    pub percent_used: f64,
    /// What is wrong with it, when its primary superblock cannot be read.
    pub problems: Vec<String>,
}

/// The usage of an overlay on a stick from its superblock; when the primary is
/// unreadable, from the backup of block group 1 if there is one, with what is
/// wrong and what to do (`target` is the stick as the user named it).
pub fn usage_on_stick_of<R: Read + Seek>(r: &mut R, len: u64, target: &str) -> Usage {
    if let Ok(sb) = Superblock::read_from(r) {
        return usage_on_stick(Some(&sb), len);
    }
    let repair = format!(
        "`livestick overlay recover {target}` checks it; with --repair e2fsck rewrites the primary superblock from its backup"
    );
    match Super::read_or_backup(r) {
        Ok(sb) => Usage {
            problems: vec![format!(
                "its primary ext4 superblock is damaged; these figures are from the backup at byte {}; {repair}",
                sb.backup_at.unwrap_or_default()
            )],
            ..usage_of(sb.free_bytes, sb.fs_bytes, len)
        },
        Err(_) => Usage {
            problems: vec![format!(
                "its ext4 superblock and the backup of block group 1 cannot be read, so its usage is unknown; {repair}"
            )],
            ..usage_on_stick(None, len)
        },
    }
}

/// Usage of a bare overlay file from its superblock facts (unreadable: nothing used).
pub fn usage_of_bare(info: Option<&Ext4Info>, len: u64) -> Usage {
    let report = store::status_report(info, len, 0);
    Usage {
        size_bytes: len,
        used_bytes: info.map(|i| i.used_bytes),
        bytes_free: report.bytes_free,
        percent_used: report.percent_used,
        problems: Vec::new(),
    }
}

/// Usage of an overlay on a stick from its superblock (unreadable: all of it used,
/// none free, so nobody is told there is room that may not be there).
pub fn usage_on_stick(sb: Option<&Superblock>, len: u64) -> Usage {
    let (free, total) = sb.map_or((0, len), |s| (s.free_bytes(), s.size_bytes()));
    usage_of(free, total, len)
}

/// Usage of a `len`-byte overlay whose ext4 of `total` bytes has `free` free.
fn usage_of(free: u64, total: u64, len: u64) -> Usage {
    let used = total.saturating_sub(free);
    let percent_used = if total == 0 {
        0.0
    } else {
        (used as f64 * 10000.0 / total as f64).round() / 100.0
    };
    Usage {
        size_bytes: len,
        used_bytes: Some(used),
        bytes_free: free,
        percent_used,
        problems: Vec::new(),
    }
}

/// Decides a reset: a new empty ext4 with overlayfs/ and ovlwork/, same size, UUID and
/// label, written over the old one in place. `upper` is what its upper dir holds
/// ([`store::upper_contents`]): that is what the reset discards.
pub fn plan_reset(show: &str, info: Option<&Ext4Info>, upper: Option<(u64, u64)>) -> ResetPlan {
    ResetPlan {
        overlay: show.to_string(),
        discards: match (upper, info) {
            (Some((_, 0)), _) => {
                "nothing: its OverlayFS upper dir is empty (the live system changed nothing)"
                    .to_string()
            }
            (Some((bytes, entries)), _) => format!(
                "{entries} entries ({} in files) in its OverlayFS upper dir",
                human(bytes)
            ),
            (None, Some(i)) => format!(
                "{} used in its ext4, whose upper dir cannot be read",
                human(i.used_bytes)
            ),
            (None, None) => "an OverlayFS overlay whose superblock cannot be read".to_string(),
        },
        would: format!("would reset {show} (a new empty ext4 with overlayfs/ and ovlwork/)"),
        kind: Some(Kind::Overlayfs),
        zeroed_bytes: None,
    }
}

pub fn apply_reset<F: OverlayIo>(f: &mut F, len: u64, show: &str) -> Result<(), OverlayError> {
    store::reset_overlay(f, len, &std::env::temp_dir()).explain(|| format!("resetting {show}"))
}

/// The superblock facts every plan of this kind starts from.
pub fn inspect<R: Read + Seek>(f: &mut R, show: &str) -> Result<Super, OverlayError> {
    Super::read_or_backup(f).explain(|| show.to_string())
}

/// --origin, --origin-size and --squashfs describe the root image a dm-snapshot
/// overlay belongs to; an OverlayFS overlay is checked on its own.
pub fn refuse_root_image_args(show: &str, given: bool) -> Result<(), OverlayError> {
    if given {
        return Err(OverlayError::BadInput(format!(
            "{show} is an OverlayFS overlay (an ext4 file system): it is checked and repaired on its own, so --origin, --origin-size and --squashfs (which name the root image of a device-mapper snapshot overlay) do not apply; run the command without them"
        )));
    }
    Ok(())
}

/// The new size: whole ext4 blocks, capped at the FAT limit for a bare file and
/// refused beyond it (or beyond the free space) on a stick.
pub fn plan_grow(
    show: &str,
    len: u64,
    sb: &Super,
    request: GrowRequest,
    room: Option<&StickRoom>,
) -> Result<GrowPlan, OverlayError> {
    let requested = request.bytes(len);
    if let Some(room) = room {
        room.check_fat_limit(show, requested)?;
    }
    let max = room.map_or(FAT_MAX_FILE_BYTES, StickRoom::max_file_bytes);
    let plan = ovl_maint::plan_grow(show, len, sb, requested, max)?;
    if let Some(room) = room {
        room.check_free(plan.added_bytes)?;
    }
    Ok(plan)
}

/// A grow, decided: the outcome to fill in, with the method and (in a dry run) what
/// would be done. `workdir` is where an overlay on a stick is copied to.
pub fn plan_grow_outcome(
    show: String,
    dry_run: bool,
    sb: Super,
    plan: GrowPlan,
    workdir: Option<&Path>,
) -> Outcome {
    let mut out = Outcome::new(show, dry_run, sb, Some(plan.clone()));
    if let Some(dir) = workdir {
        out.method = format!("a work copy in {}", dir.display());
    }
    if dry_run {
        out.notes.push(match workdir {
            Some(dir) => format!(
                "would copy the overlay to {}, run e2fsck -f -p and resize2fs there, append {} to the overlay through the FAT, and write back the blocks they change (the primary superblock last)",
                dir.display(),
                human(plan.added_bytes)
            ),
            None => format!(
                "would run e2fsck -f -p, extend the file by {}, then run resize2fs, all in place",
                human(plan.added_bytes)
            ),
        });
        out.notes.extend(out.superblock.findings());
    }
    out
}

/// A recover, decided from the superblock and what the user asked.
#[derive(Debug, Clone)]
pub struct RecoverPlan {
    pub grow: Option<GrowPlan>,
    /// Whether anything is changed; if not, only the read-only check runs.
    pub changes: bool,
    pub repair: bool,
}

impl RecoverPlan {
    pub fn steps(&self) -> Steps<'_> {
        Steps {
            check: true,
            repair: self.repair,
            grow: self.grow.as_ref(),
        }
    }
}

pub fn plan_recover(
    show: &str,
    len: u64,
    sb: &Super,
    add_mb: Option<u64>,
    repair: bool,
    dry_run: bool,
    room: Option<&StickRoom>,
) -> Result<RecoverPlan, OverlayError> {
    let grow = match add_mb {
        Some(add) => Some(plan_grow(show, len, sb, GrowRequest::AddMb(add), room)?),
        None => None,
    };
    Ok(RecoverPlan {
        changes: !dry_run && (repair || grow.is_some()),
        grow,
        repair,
    })
}

/// What a dry run of a recover would do, once the read-only check said whether the
/// file system is `clean`. `workdir`: the overlay is on a stick and would be changed
/// in a work copy there.
pub fn recover_dry_run_notes(
    clean: bool,
    plan: &RecoverPlan,
    workdir: Option<&Path>,
) -> Vec<String> {
    let mut notes = Vec::new();
    let copy = workdir.map(|d| format!("a work copy in {}", d.display()));
    if plan.repair && !clean {
        notes.push(match &copy {
            Some(copy) => format!(
                "would run e2fsck -f -y on {copy}, then write back the blocks it changes (the primary superblock last)"
            ),
            None => "would run e2fsck -f -y in place, then e2fsck -f -n again".to_string(),
        });
    }
    if let Some(g) = &plan.grow {
        notes.push(if clean || plan.repair {
            match &copy {
                Some(copy) => format!(
                    "would append {} through the FAT, run e2fsck -f -p and resize2fs on {copy}, and write back the blocks they change",
                    human(g.added_bytes)
                ),
                None => format!(
                    "would run e2fsck -f -p, extend the file by {}, then run resize2fs",
                    human(g.added_bytes)
                ),
            }
        } else {
            "would not grow: the file system needs repairing first (add --repair)".to_string()
        });
    }
    notes
}

/// What an OverlayFS recover or grow found and did (or, in a dry run, would do).
#[derive(Debug, Serialize)]
pub struct Outcome {
    pub overlay: String,
    pub kind: Kind,
    pub dry_run: bool,
    /// The superblock before anything ran.
    pub superblock: Super,
    /// Where the tools ran: in place, or on a work copy.
    pub method: String,
    pub check: Option<FsckReport>,
    pub repair: Option<FsckReport>,
    /// `e2fsck -f -n` after the repair.
    pub check_after: Option<FsckReport>,
    /// `e2fsck -f -p` before resize2fs.
    pub preen: Option<FsckReport>,
    pub grow: Option<GrowPlan>,
    pub grown: bool,
    pub write_back: Option<WriteBack>,
    pub notes: Vec<String>,
}

impl Outcome {
    pub fn new(
        overlay: String,
        dry_run: bool,
        superblock: Super,
        grow: Option<GrowPlan>,
    ) -> Outcome {
        Outcome {
            overlay,
            kind: Kind::Overlayfs,
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

/// Which e2fsck/resize2fs steps an OverlayFS recover or grow runs.
#[derive(Clone, Copy)]
pub struct Steps<'a> {
    /// `e2fsck -f -n` first.
    pub check: bool,
    /// `e2fsck -f -y` when the check found problems.
    pub repair: bool,
    pub grow: Option<&'a GrowPlan>,
}

/// The read-only check (`e2fsck -f -n`): a bare file in place; an overlay on a stick
/// in place when it is contiguous (`stick?offset=N`), else on a work copy.
pub fn apply_check(
    place: &mut Place,
    workdir: &Path,
    out: &mut Outcome,
    progress: Progress<'_>,
) -> Result<(), OverlayError> {
    match place {
        Place::Bare(bare) => {
            progress("check", 0, 1);
            let r = ovl_maint::fsck(
                bare.path.as_os_str(),
                &out.overlay,
                FsckMode::Check,
                &out.superblock,
            );
            progress("check", 1, 1);
            out.check = Some(r?);
            Ok(())
        }
        Place::Stick(_) | Place::Ext4(_) => check_on_stick(place, workdir, out, progress),
    }
}

fn check_on_stick(
    t: &mut Place,
    workdir: &Path,
    out: &mut Outcome,
    progress: Progress<'_>,
) -> Result<(), OverlayError> {
    let show = t.show();
    let offset = t.contiguous_offset()?;
    let spec = offset.and_then(|o| ovl_maint::in_place_spec(t.device(), o));
    let report = match spec {
        Some(spec) => {
            out.method = format!("in place, read-only ({})", spec.to_string_lossy());
            progress("check", 0, 1);
            let r = ovl_maint::fsck(&spec, &show, FsckMode::Check, &out.superblock)?;
            progress("check", 1, 1);
            r
        }
        None => {
            ovl_maint::check_workdir(workdir, &show, t.bytes())?;
            let len = t.bytes();
            let copy =
                ovl_maint::WorkCopy::create(&mut t.io()?, len, workdir, &show, &mut |d, n| {
                    progress("copy", d, n)
                })?;
            out.method = format!(
                "a work copy in {} (the overlay is not contiguous on the stick)",
                workdir.display()
            );
            progress("check", 0, 1);
            let r = ovl_maint::fsck(
                copy.path().as_os_str(),
                &show,
                FsckMode::Check,
                &out.superblock,
            )?;
            progress("check", 1, 1);
            r
        }
    };
    out.check = Some(report);
    Ok(())
}

/// Runs `steps` on the overlay. A bare file: the tools work on it in place, and a
/// grow extends the file first (an ext4 in a larger file is still valid), then
/// resizes. On a stick: the tools run on a work copy in `workdir`; only if they all
/// succeed is the overlay extended through the FAT and are the changed blocks
/// written back (primary superblock last). `target` is what the user named, for the
/// commands the messages suggest.
pub fn apply_change(
    place: &mut Place,
    workdir: &Path,
    target: &Path,
    steps: Steps<'_>,
    out: &mut Outcome,
    progress: Progress<'_>,
) -> Result<(), OverlayError> {
    match place {
        Place::Bare(bare) => change_bare(bare, steps, out, progress),
        Place::Stick(_) | Place::Ext4(_) => {
            change_on_stick(place, workdir, target, steps, out, progress)
        }
    }
}

fn change_bare(
    bare: &mut Bare,
    steps: Steps<'_>,
    out: &mut Outcome,
    progress: Progress<'_>,
) -> Result<(), OverlayError> {
    let grow = steps.grow;
    let path = bare.path.clone();
    let mut extended = false;
    let result = run_tools(&path, &path, steps, out, progress, &mut |progress| {
        if let Some(g) = grow.filter(|g| g.added_bytes > 0) {
            progress("grow", 0, g.added_bytes);
            bare.file
                .set_len(g.new_bytes)
                .and_then(|()| bare.file.sync_all())
                .explain(|| format!("extending {}", path.display()))?;
            progress("grow", g.added_bytes, g.added_bytes);
            extended = true;
        }
        Ok(())
    });
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

fn change_on_stick(
    t: &mut Place,
    workdir: &Path,
    target: &Path,
    steps: Steps<'_>,
    out: &mut Outcome,
    progress: Progress<'_>,
) -> Result<(), OverlayError> {
    let grow = steps.grow;
    let show = t.show();
    let len = t.bytes();
    let new_len = grow.map_or(len, |g| g.new_bytes);
    ovl_maint::check_workdir(workdir, &show, new_len)?;
    let mut copy = ovl_maint::WorkCopy::create(&mut t.io()?, len, workdir, &show, &mut |d, n| {
        progress("copy", d, n)
    })?;
    out.method = format!("a work copy in {}", workdir.display());
    copy.set_len(new_len)?;
    copy.mark_baseline()?;
    run_tools(copy.path(), target, steps, out, progress, &mut |_| Ok(()))
        .explain(|| format!("{show}: stopped before anything on the stick was changed"))?;
    if let Some(g) = grow.filter(|_| out.grown) {
        copy.settle_fresh_area(g.fs_bytes_before..g.new_bytes)?;
    }
    if let Some(g) = grow.filter(|g| out.grown && g.added_bytes > 0) {
        t.extend_on_stick(g.added_bytes, g.new_bytes, progress)?;
    }
    let wb = copy.write_back(&mut t.io()?, &mut |d, n| progress("write back", d, n))?;
    out.write_back = Some(wb);
    Ok(())
}

/// e2fsck's problems for a message, one a line.
pub fn summarize_problems(r: &FsckReport) -> String {
    let mut all: Vec<&str> = r.findings.iter().map(String::as_str).collect();
    all.extend(r.problems.iter().map(String::as_str));
    if all.is_empty() {
        format!(" exit {}, {}", r.exit_code, r.meaning)
    } else {
        format!("\n  - {}", all.join("\n  - "))
    }
}

/// The e2fsck/resize2fs sequence on `image` (the bare overlay, or the work copy of
/// one on a stick): with `check`, `e2fsck -f -n`; with `repair` and problems found,
/// `e2fsck -f -y` and `-n` again; with `grow`, `e2fsck -f -p`, then `extend` (the
/// file takes its new size), then resize2fs. An unclean file system is not grown
/// unless it was repaired first.
fn run_tools(
    image: &Path,
    target: &Path,
    steps: Steps<'_>,
    out: &mut Outcome,
    progress: Progress<'_>,
    extend: &mut dyn FnMut(Progress<'_>) -> Result<(), OverlayError>,
) -> Result<(), OverlayError> {
    let Steps {
        check,
        repair,
        grow,
    } = steps;
    let show = out.overlay.clone();
    let fsck = |mode: FsckMode, progress: Progress<'_>| -> Result<FsckReport, OverlayError> {
        let phase = match mode {
            FsckMode::Check => "check",
            FsckMode::Preen => "preen",
            FsckMode::Repair => "repair",
        };
        progress(phase, 0, 1);
        let sb = Super::read_or_backup(&mut Bare::open(image, false)?.file)?;
        let r = ovl_maint::fsck(image.as_os_str(), &show, mode, &sb)?;
        progress(phase, 1, 1);
        Ok(r)
    };
    let mut may_grow = true;
    if check {
        let c = fsck(FsckMode::Check, progress)?;
        let clean = c.clean;
        let problems = summarize_problems(&c);
        out.check = Some(c);
        if !clean && repair {
            out.repair = Some(fsck(FsckMode::Repair, progress)?);
            let after = fsck(FsckMode::Check, progress)?;
            if !after.clean && grow.is_some() {
                may_grow = false;
                out.notes.push(
                    "not grown: e2fsck -f -y left problems (see above); the repairs it made were kept"
                        .to_string(),
                );
            }
            out.check_after = Some(after);
        } else if !clean && grow.is_some() {
            return Err(OverlayError::BadInput(format!(
                "{show} needs repairing before it can grow, so nothing was changed. e2fsck -f -n found:{problems}\nAdd --repair: `livestick overlay recover {} --repair --add-mb N` repairs it (e2fsck -f -y), then grows it",
                target.display()
            )));
        }
    }
    let Some(g) = grow.filter(|_| may_grow) else {
        return Ok(());
    };
    let p = fsck(FsckMode::Preen, progress)?;
    if p.errors_left {
        return Err(OverlayError::BadInput(format!(
            "e2fsck -f -p (the check resize2fs asks for) found problems in {show} that it does not fix unattended (exit {}), so it was not grown:{}\nRepair and grow in one go with `livestick overlay recover {} --repair --add-mb N` (e2fsck -f -y first)",
            p.exit_code,
            summarize_problems(&p),
            target.display()
        )));
    }
    out.preen = Some(p);
    extend(progress)?;
    progress("resize", 0, 1);
    ovl_maint::resize(image, &show, g.new_bytes)?;
    progress("resize", 1, 1);
    out.grown = true;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn sb(fs_bytes: u64) -> Super {
        Super {
            block_size: 4096,
            blocks: fs_bytes / 4096,
            fs_bytes,
            free_bytes: fs_bytes / 2,
            needs_recovery: false,
            orphans: false,
            errors_recorded: false,
            error_count: 0,
            backup_at: None,
        }
    }

    fn room(free: u64) -> StickRoom {
        StickRoom {
            stick: PathBuf::from("stick.img"),
            overlay: "/LiveOS/overlay-L-U".to_string(),
            free_bytes: free,
            on_fat: true,
        }
    }

    #[test]
    fn bare_grow_keeps_whole_blocks_and_caps_at_fat() {
        let p = plan_grow("o", 64 * MIB, &sb(64 * MIB), GrowRequest::AddMb(64), None).unwrap();
        assert_eq!((p.new_bytes, p.added_bytes), (128 * MIB, 64 * MIB));
        let p = plan_grow(
            "o",
            64 * MIB,
            &sb(64 * MIB),
            GrowRequest::SizeMb(8192),
            None,
        )
        .unwrap();
        assert_eq!(p.new_bytes, FAT_MAX_FILE_BYTES / 4096 * 4096);
        assert!(p.notes.iter().any(|n| n.contains("capped")));
    }

    #[test]
    fn stick_grow_refuses_fat_limit_and_free_space() {
        let err = plan_grow(
            "o",
            64 * MIB,
            &sb(64 * MIB),
            GrowRequest::SizeMb(4096),
            Some(&room(u64::MAX)),
        )
        .unwrap_err();
        assert!(matches!(err, OverlayError::Refused(m) if m.contains("4 GiB")));
        let err = plan_grow(
            "o",
            64 * MIB,
            &sb(64 * MIB),
            GrowRequest::AddMb(64),
            Some(&room(63 * MIB)),
        )
        .unwrap_err();
        assert!(matches!(err, OverlayError::Refused(m) if m.contains("not enough free space")));
        assert!(
            plan_grow(
                "o",
                64 * MIB,
                &sb(64 * MIB),
                GrowRequest::AddMb(64),
                Some(&room(64 * MIB))
            )
            .is_ok()
        );
    }

    #[test]
    fn grow_refuses_shrinking_and_a_cut_short_file() {
        let err = plan_grow("o", 64 * MIB, &sb(64 * MIB), GrowRequest::SizeMb(32), None);
        assert!(matches!(
            err,
            Err(OverlayError::Maint(
                ovl_maint::OvlMaintError::CannotGrow { .. }
            ))
        ));
        let err = plan_grow("o", 32 * MIB, &sb(64 * MIB), GrowRequest::AddMb(64), None);
        assert!(matches!(
            err,
            Err(OverlayError::Maint(
                ovl_maint::OvlMaintError::FsLargerThanFile { .. }
            ))
        ));
    }

    #[test]
    fn grow_outcome_says_what_a_dry_run_would_do() {
        let plan = plan_grow("o", 64 * MIB, &sb(64 * MIB), GrowRequest::AddMb(64), None).unwrap();
        let bare = plan_grow_outcome("o".into(), true, sb(64 * MIB), plan.clone(), None);
        assert_eq!(bare.method, "in place");
        assert_eq!(bare.notes.len(), 1);
        assert!(bare.notes[0].contains("all in place"));
        let dir = Path::new("/var/tmp");
        let stick = plan_grow_outcome("o".into(), true, sb(64 * MIB), plan.clone(), Some(dir));
        assert_eq!(stick.method, "a work copy in /var/tmp");
        assert!(stick.notes[0].starts_with("would copy the overlay to /var/tmp"));
        let real = plan_grow_outcome("o".into(), false, sb(64 * MIB), plan, Some(dir));
        assert!(real.notes.is_empty());
    }

    #[test]
    fn recover_steps_follow_the_request() {
        let check_only =
            plan_recover("o", 64 * MIB, &sb(64 * MIB), None, false, false, None).unwrap();
        assert!(!check_only.changes && check_only.grow.is_none());
        let repair = plan_recover("o", 64 * MIB, &sb(64 * MIB), None, true, false, None).unwrap();
        assert!(repair.changes);
        assert!(repair.steps().check && repair.steps().repair && repair.steps().grow.is_none());
        let grow =
            plan_recover("o", 64 * MIB, &sb(64 * MIB), Some(16), false, false, None).unwrap();
        assert!(grow.changes && grow.steps().grow.is_some() && !grow.steps().repair);
        let dry = plan_recover("o", 64 * MIB, &sb(64 * MIB), Some(16), true, true, None).unwrap();
        assert!(!dry.changes);
        let err = plan_recover(
            "o",
            64 * MIB,
            &sb(64 * MIB),
            Some(16),
            false,
            false,
            Some(&room(MIB)),
        );
        assert!(matches!(err, Err(OverlayError::Refused(_))));
    }

    #[test]
    fn recover_dry_runs_say_what_would_be_done() {
        let plan = plan_recover("o", 64 * MIB, &sb(64 * MIB), Some(16), true, true, None).unwrap();
        let bare = recover_dry_run_notes(false, &plan, None);
        assert_eq!(
            bare[0],
            "would run e2fsck -f -y in place, then e2fsck -f -n again"
        );
        assert!(bare[1].starts_with("would run e2fsck -f -p, extend the file by"));
        let stick = recover_dry_run_notes(false, &plan, Some(Path::new("/w")));
        assert!(stick[0].starts_with("would run e2fsck -f -y on a work copy in /w"));
        assert!(stick[1].starts_with("would append"));
        let no_repair =
            plan_recover("o", 64 * MIB, &sb(64 * MIB), Some(16), false, true, None).unwrap();
        assert_eq!(
            recover_dry_run_notes(false, &no_repair, None),
            vec!["would not grow: the file system needs repairing first (add --repair)"]
        );
        assert_eq!(recover_dry_run_notes(true, &no_repair, None).len(), 1);
        let check = plan_recover("o", 64 * MIB, &sb(64 * MIB), None, false, true, None).unwrap();
        assert!(recover_dry_run_notes(false, &check, None).is_empty());
    }

    #[test]
    fn root_image_arguments_are_refused() {
        assert!(refuse_root_image_args("o", false).is_ok());
        assert!(matches!(
            refuse_root_image_args("o", true),
            Err(OverlayError::BadInput(m)) if m.starts_with("o is an OverlayFS overlay")
        ));
    }

    #[test]
    fn reset_and_usage() {
        let plan = plan_reset("o", None, None);
        assert_eq!(plan.kind, Some(Kind::Overlayfs));
        assert_eq!(
            plan.discards,
            "an OverlayFS overlay whose superblock cannot be read"
        );
        let bare = usage_of_bare(None, 100);
        assert_eq!((bare.used_bytes, bare.bytes_free), (None, 100));
        let stick = usage_on_stick(None, 100);
        assert_eq!((stick.used_bytes, stick.bytes_free), (Some(100), 0));
        assert_eq!(stick.percent_used, 100.0);
    }
}
