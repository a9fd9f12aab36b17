//! The dm-snapshot overlay (`LiveOS/overlay-<LABEL>-<UUID>` as dracut's `PO` table
//! uses it): status, reset, grow and recover. The format itself (header, metadata
//! areas, geometry) is `persist::snapshot`'s; this module decides, from facts read
//! beforehand, what each verb does to a store in its place.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde::Serialize;

use crate::persist::merge::dm::{self as merge_dm, RepairReport};
use crate::persist::merge::located::Located;
use crate::persist::snapshot::{
    self, FAT_MAX_FILE_BYTES, GrowPlan, HeaderState, LIVEOS_CHUNK_SECTORS, Opened, RESET_BYTES,
    RecoverReport, SECTOR_BYTES, SnapshotError, StatusReport, Store,
};
use crate::size::human;

use super::place::{OverlayIo, Place};
use super::{Explain, GrowRequest, OverlayError, Progress, ResetPlan, StickRoom};

fn not_usable(show: &str, source: SnapshotError) -> OverlayError {
    OverlayError::NotUsable {
        overlay: show.to_string(),
        source,
    }
}

/// The store's status against an origin of `origin_sectors`, refused when the store
/// is damaged on its own.
pub fn status<R: Read + Seek>(
    f: &mut R,
    len: u64,
    origin_sectors: Option<u64>,
    show: &str,
) -> Result<StatusReport, OverlayError> {
    let report = snapshot::status(f, len, LIVEOS_CHUNK_SECTORS, origin_sectors)
        .map_err(|e| not_usable(show, e))?;
    check_intact(f, len, show)?;
    Ok(report)
}

/// Refuses a store the strict checks find damaged on its own (an entry outside the
/// file, a chunk used twice …): figures derived from it are meaningless, so none are
/// printed. A mismatch with a given origin is not damage of the store and stays a
/// reported problem.
pub fn check_intact<R: Read + Seek>(f: &mut R, len: u64, show: &str) -> Result<(), OverlayError> {
    let report =
        snapshot::status(f, len, LIVEOS_CHUNK_SECTORS, None).map_err(|e| not_usable(show, e))?;
    refuse_problems(show, &report.problems)
}

/// The refusal of a store with `problems` (pure).
pub fn refuse_problems(show: &str, problems: &[String]) -> Result<(), OverlayError> {
    if problems.is_empty() {
        return Ok(());
    }
    Err(OverlayError::BadInput(format!(
        "{show} is a damaged overlay: {}; the kernel may refuse it or read wrong data — copy it somewhere safe if its changes matter, then `livestick overlay reset` starts it afresh (every change it holds is lost)",
        problems.join("; ")
    )))
}

/// The chunk size in the header; a new (zeroed) store gets the one dracut uses.
pub fn chunk_sectors_of<R: Read + Seek>(f: &mut R) -> Result<u32, SnapshotError> {
    Ok(match snapshot::read_header(f)? {
        HeaderState::Initialised(h) => h.chunk_sectors,
        HeaderState::Uninitialised => LIVEOS_CHUNK_SECTORS,
    })
}

/// Decides a reset from what the store's status said (a damaged store can still be
/// reset; the plan says what can be said about what is lost).
pub fn plan_reset(show: &str, len: u64, status: &Result<StatusReport, SnapshotError>) -> ResetPlan {
    let discards = match status {
        Ok(r) if r.state == "uninitialised" => "nothing (it is already empty)".to_string(),
        Ok(r) => format!(
            "{} changed chunks ({}) of the live system, state {}",
            r.exceptions,
            human(r.exceptions * u64::from(r.chunk_sectors) * SECTOR_BYTES),
            r.state
        ),
        Err(e) => format!("an unreadable store ({e})"),
    };
    let zeroed = len.min(RESET_BYTES);
    ResetPlan {
        overlay: show.to_string(),
        discards,
        would: format!("would reset {show} (zero the first {})", human(zeroed)),
        kind: None,
        zeroed_bytes: Some(zeroed),
    }
}

/// Inspects a store for [`plan_reset`].
pub fn inspect_reset<R: Read + Seek>(f: &mut R, len: u64) -> Result<StatusReport, SnapshotError> {
    snapshot::status(f, len, LIVEOS_CHUNK_SECTORS, None)
}

/// Zeroes the bytes that make the store new.
pub fn apply_reset<F: OverlayIo>(f: &mut F, len: u64) -> Result<(), OverlayError> {
    Ok(snapshot::reset_store(f, len)?)
}

/// What a grow starts from, read beforehand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrowFacts {
    pub show: String,
    pub current_bytes: u64,
    pub chunk_sectors: u32,
    /// On a stick: the FAT limit and its free space are hard limits.
    pub room: Option<StickRoom>,
}

/// Reads what a grow needs and refuses a store that is not intact: growing a
/// damaged store would make room the kernel then fills beside entries that already
/// point at the wrong place.
pub fn inspect_grow<R: Read + Seek>(
    f: &mut R,
    show: &str,
    len: u64,
    room: Option<StickRoom>,
) -> Result<GrowFacts, OverlayError> {
    let chunk_sectors = chunk_sectors_of(f).map_err(|e| not_usable(show, e))?;
    check_intact(f, len, show)
        .explain(|| format!("refusing to grow {show}; nothing was changed"))?;
    Ok(GrowFacts {
        show: show.to_string(),
        current_bytes: len,
        chunk_sectors,
        room,
    })
}

/// The new size: whole chunks, never a trap size, capped at the FAT limit for a bare
/// file and refused beyond it (or beyond the free space) on a stick.
pub fn plan_grow(facts: &GrowFacts, request: GrowRequest) -> Result<GrowPlan, OverlayError> {
    let requested = request.bytes(facts.current_bytes);
    if let Some(room) = &facts.room {
        room.check_fat_limit(&facts.show, requested)?;
    }
    let plan = snapshot::plan_grow(
        facts.current_bytes,
        requested,
        facts.chunk_sectors,
        facts
            .room
            .as_ref()
            .map_or(FAT_MAX_FILE_BYTES, StickRoom::max_file_bytes),
    )?;
    if let Some(room) = &facts.room {
        room.check_free(plan.added_bytes)?;
    }
    Ok(plan)
}

/// Grows the store as planned. A bare file gets zeros appended (sparse where the
/// file system can); areas and data chunks past the old end are zero, which is what
/// the kernel expects. On a stick the file gets clusters appended to its chain (not
/// written), and only the metadata area the kernel could read next is zeroed
/// (`snapshot::grow_zero_ranges`), before the new size makes it part of the file:
/// a grow costs the bus one chunk.
pub fn apply_grow(
    place: &mut Place,
    plan: &GrowPlan,
    progress: Progress<'_>,
) -> Result<(), OverlayError> {
    match place {
        Place::Bare(bare) => {
            progress("grow", 0, plan.added_bytes);
            bare.extend(plan.new_bytes)?;
            progress("grow", plan.added_bytes, plan.added_bytes);
        }
        Place::Stick(t) => {
            let zero =
                snapshot::grow_zero_ranges(plan.chunk_sectors, plan.current_bytes, plan.new_bytes);
            let bytes: u64 = zero.iter().map(|r| r.end - r.start).sum();
            progress("grow", 0, bytes);
            t.allocate(plan.new_bytes, &zero)?;
            progress("grow", bytes, bytes);
        }
        Place::Ext4(o) => {
            // The new blocks are unwritten: they read as zeros, so the zeroed areas
            // cost nothing (zeros written into unwritten blocks are skipped).
            let zero =
                snapshot::grow_zero_ranges(plan.chunk_sectors, plan.current_bytes, plan.new_bytes);
            progress("grow", 0, plan.added_bytes);
            o.allocate(plan.new_bytes)?;
            let mut io = o.io();
            crate::io::zero_ranges(&mut io, zero.iter().cloned())?;
            crate::io::SyncData::sync_data(&mut io)?;
            progress("grow", plan.added_bytes, plan.added_bytes);
        }
    }
    Ok(())
}

/// A recover, decided: what the validating dry run of the recovery found, and the
/// grow that goes with it (`--add-mb`).
#[derive(Debug, Clone, Serialize)]
pub struct RecoverPlan {
    pub check: RecoverReport,
    pub grow: Option<GrowPlan>,
}

impl RecoverPlan {
    /// The store's size once the plan is applied.
    pub fn new_bytes(&self, current: u64) -> u64 {
        self.grow.as_ref().map_or(current, |g| g.new_bytes)
    }
}

/// Validates the metadata by a dry run of the recovery: nothing may change if the
/// metadata itself is corrupt.
pub fn inspect_recover<F: OverlayIo>(
    f: &mut F,
    show: &str,
    len: u64,
    origin_sectors: Option<u64>,
) -> Result<RecoverReport, OverlayError> {
    snapshot::recover_invalid(f, len, origin_sectors, true)
        .explain(|| format!("{show}: the metadata is damaged; nothing was changed"))
}

/// Decides a recover from the dry run's findings. An overlay that was invalidated
/// because it ran full would run full again on its first writes, so `--add-mb` grows
/// it first, under the same limits as `grow`.
/// `add`: the grow facts and `--add-mb`, when given.
pub fn plan_recover(
    check: RecoverReport,
    add: Option<(&GrowFacts, u64)>,
) -> Result<RecoverPlan, OverlayError> {
    let grow = match add {
        Some((facts, add_mb)) => Some(plan_grow(facts, GrowRequest::AddMb(add_mb))?),
        None => None,
    };
    Ok(RecoverPlan { check, grow })
}

/// Clears the Invalid mark of a store of `len` bytes.
pub fn apply_recover<F: OverlayIo>(
    f: &mut F,
    len: u64,
    origin_sectors: Option<u64>,
) -> Result<RecoverReport, OverlayError> {
    Ok(snapshot::recover_invalid(f, len, origin_sectors, false)?)
}

/// Where `--repair` finds the root image the overlay belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootImage {
    /// `--origin IMAGE`.
    File(std::path::PathBuf),
    /// Inside this squashfs.img (a bare file's, by path).
    InSquashfs(std::path::PathBuf),
    /// Inside the stick's squashfs.img.
    OnStick,
}

/// What [`repair`] needs, checked before a recover changes anything (grows the
/// overlay, marks it valid): its programs, the root image to check against, and a
/// scratch directory under `workdir`. A repair that could not run must not leave a
/// stick recovered but unchecked.
pub fn repair_preflight(
    place: &mut Place,
    root: &RootImage,
    workdir: &Path,
) -> Result<(), OverlayError> {
    crate::tools::find_program(&crate::tools::E2FSCK)
        .map_err(crate::persist::merge::MergeError::from)?;
    if !matches!(root, RootImage::File(_)) {
        crate::tools::find_program(&crate::tools::UNSQUASHFS)
            .map_err(crate::persist::merge::MergeError::from)?;
    }
    match (&mut *place, root) {
        (Place::Bare(_), RootImage::OnStick) => {
            return Err(OverlayError::Refused(
                "a bare overlay file has no stick to find squashfs.img on; pass --origin or --squashfs"
                    .to_string(),
            ));
        }
        (Place::Stick(t), _) => {
            let sq = t.squashfs_path();
            Located::on_stick(&mut t.stick, &sq)?;
        }
        (Place::Ext4(o), _) => {
            o.squashfs_located()?;
        }
        (Place::Bare(_), _) => {}
    }
    tempfile::Builder::new()
        .prefix("livestick-repair-")
        .tempdir_in(workdir)
        .explain(|| format!("work dir {}", workdir.display()))?;
    Ok(())
}

/// Runs `e2fsck -f -y` on the file system seen through the overlay and writes what it
/// repaired into the overlay, in a scratch dir under `workdir`.
pub fn repair(
    place: &mut Place,
    root: &RootImage,
    len: u64,
    workdir: &Path,
    progress: Progress<'_>,
) -> Result<RepairReport, OverlayError> {
    // On a stick the squashfs.img is located first, even when --origin names the
    // root image: a stick without it is refused before any scratch space is used.
    let at = match &mut *place {
        Place::Stick(t) => {
            let sq = t.squashfs_path();
            Some((
                Located::on_stick(&mut t.stick, &sq)?,
                std::path::PathBuf::from(sq),
            ))
        }
        Place::Bare(_) => None,
        // squashfs.img on the ext4 partition is read in place like the FAT's.
        Place::Ext4(o) => {
            let sq = o.squashfs_path();
            Some((
                o.squashfs_located()?,
                std::path::PathBuf::from(format!("{}:{sq}", o.device.display())),
            ))
        }
    };
    let scratch = tempfile::Builder::new()
        .prefix("livestick-repair-")
        .tempdir_in(workdir)
        .explain(|| format!("work dir {}", workdir.display()))?;
    let origin_img = match (root, at) {
        (RootImage::File(p), _) => p.clone(),
        (RootImage::InSquashfs(sq), _) => {
            merge_dm::extract_root_image(&Located::file(sq)?, sq, scratch.path())?
        }
        (RootImage::OnStick, Some((at, sq))) => {
            merge_dm::extract_root_image(&at, &sq, scratch.path())?
        }
        (RootImage::OnStick, None) => {
            return Err(OverlayError::Refused(
                "a bare overlay file has no stick to find squashfs.img on; pass --origin or --squashfs"
                    .to_string(),
            ));
        }
    };
    let r = match place {
        Place::Bare(b) => {
            merge_dm::repair_view(&origin_img, &mut b.file, len, scratch.path(), progress)
        }
        Place::Stick(t) => {
            merge_dm::repair_view(&origin_img, &mut t.io()?, len, scratch.path(), progress)
        }
        Place::Ext4(o) => {
            merge_dm::repair_view(&origin_img, &mut o.io(), len, scratch.path(), progress)
        }
    };
    Ok(r?)
}

/// A merge of the store into its origin (the seed's `snapshot-merge` on plain files),
/// decided: the store read and checked against the origin.
pub struct OriginMerge {
    pub store: Box<Store>,
    pub origin_bytes: u64,
}

impl OriginMerge {
    pub fn exceptions(&self) -> u64 {
        self.store.exceptions.len() as u64
    }
}

/// Reads the store behind `ov` and checks that it fits `origin`; `None` when it is a
/// new, empty store (nothing to merge). A store marked Invalid is refused: the kernel
/// refuses to merge it too.
pub fn plan_origin_merge<R: Read + Seek>(
    ov: &mut R,
    ov_len: u64,
    overlay: &Path,
    origin: &Path,
) -> Result<Option<OriginMerge>, OverlayError> {
    let store = match snapshot::open_store(ov, ov_len)? {
        Opened::Valid(s) => s,
        Opened::Invalid { .. } => {
            return Err(OverlayError::Refused(format!(
                "{} is marked Invalid; the kernel refuses to merge it too. Run `livestick overlay recover` first",
                overlay.display()
            )));
        }
        Opened::Uninitialised { .. } => return Ok(None),
    };
    let origin_bytes = std::fs::metadata(origin)
        .explain(|| format!("origin {}", origin.display()))?
        .len();
    store
        .validate(Some(origin_bytes / SECTOR_BYTES))
        .explain(|| format!("{} does not fit {}", overlay.display(), origin.display()))?;
    Ok(Some(OriginMerge {
        store,
        origin_bytes,
    }))
}

/// Applies the store to its origin: into `output` (neither input changes), or in
/// place into `origin` (which empties the store). Returns the store's status after.
pub fn apply_origin_merge(
    plan: &OriginMerge,
    ov: &mut File,
    ov_len: u64,
    origin: &Path,
    output: Option<&Path>,
    progress: Progress<'_>,
) -> Result<String, OverlayError> {
    let mut step = |d, t| progress("merge", d, t);
    if let Some(out) = output {
        let mut o = File::open(origin)?;
        let created = File::create(out).explain(|| format!("creating {}", out.display()))?;
        let mut w = std::io::BufWriter::with_capacity(4 << 20, created);
        snapshot::write_view(
            &mut o,
            plan.origin_bytes,
            ov,
            &plan.store,
            &mut w,
            &mut step,
        )?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
    } else {
        let mut o = OpenOptions::new()
            .read(true)
            .write(true)
            .open(origin)
            .explain(|| format!("opening {}", origin.display()))?;
        snapshot::merge_in_place(ov, &plan.store, &mut o, plan.origin_bytes, &mut step)?;
    }
    ov.seek(SeekFrom::Start(0))?;
    Ok(snapshot::status(ov, ov_len, LIVEOS_CHUNK_SECTORS, None)?.dm_status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::fat;
    use crate::size::MIB;
    use std::path::PathBuf;

    const CHUNK: u32 = LIVEOS_CHUNK_SECTORS;

    fn facts(current: u64, room: Option<StickRoom>) -> GrowFacts {
        GrowFacts {
            show: "stick.img:/LiveOS/overlay-L-U".to_string(),
            current_bytes: current,
            chunk_sectors: CHUNK,
            room,
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
    fn grow_adds_whole_chunks() {
        let plan = plan_grow(&facts(64 * MIB, None), GrowRequest::AddMb(64)).unwrap();
        assert_eq!(plan.current_bytes, 64 * MIB);
        assert_eq!(plan.new_bytes % (u64::from(CHUNK) * SECTOR_BYTES), 0);
        assert!(plan.new_bytes > 64 * MIB && plan.new_bytes <= 128 * MIB);
        assert_eq!(plan.added_bytes, plan.new_bytes - 64 * MIB);
        let sized = plan_grow(&facts(64 * MIB, None), GrowRequest::SizeMb(128)).unwrap();
        assert_eq!(sized.new_bytes, plan.new_bytes);
    }

    #[test]
    fn grow_rounds_down_to_whole_chunks() {
        // 2 MiB chunks: 3 MiB more is one chunk more.
        let f = GrowFacts {
            chunk_sectors: 4096,
            ..facts(64 * MIB, None)
        };
        let plan = plan_grow(&f, GrowRequest::AddMb(3)).unwrap();
        assert_eq!(plan.new_bytes, 66 * MIB);
        assert_eq!(plan.added_bytes, 2 * MIB);
        let err = plan_grow(&f, GrowRequest::AddMb(1)).unwrap_err();
        assert!(matches!(
            err,
            OverlayError::Snapshot(SnapshotError::CannotGrow { .. })
        ));
    }

    #[test]
    fn bare_grow_is_capped_at_the_fat_limit_with_a_note() {
        let plan = plan_grow(&facts(64 * MIB, None), GrowRequest::SizeMb(8192)).unwrap();
        assert!(plan.new_bytes <= FAT_MAX_FILE_BYTES);
        assert!(plan.notes.iter().any(|n| n.contains("capped")));
    }

    #[test]
    fn stick_grow_beyond_the_fat_limit_is_refused() {
        let err = plan_grow(
            &facts(64 * MIB, Some(room(u64::MAX))),
            GrowRequest::SizeMb(4096),
        )
        .unwrap_err();
        match err {
            OverlayError::Refused(m) => {
                assert!(m.contains("must stay below 4 GiB"), "{m}");
                assert!(m.contains(&(fat::FAT_MAX_FILE / MIB).to_string()), "{m}");
            }
            e => panic!("{e:?}"),
        }
        assert!(
            plan_grow(
                &facts(64 * MIB, Some(room(u64::MAX))),
                GrowRequest::SizeMb(4095)
            )
            .is_ok()
        );
    }

    #[test]
    fn stick_grow_beyond_free_space_is_refused() {
        let err = plan_grow(
            &facts(64 * MIB, Some(room(10 * MIB))),
            GrowRequest::AddMb(64),
        )
        .unwrap_err();
        match err {
            OverlayError::Refused(m) => assert!(m.contains("not enough free space"), "{m}"),
            e => panic!("{e:?}"),
        }
        assert!(
            plan_grow(
                &facts(64 * MIB, Some(room(64 * MIB))),
                GrowRequest::AddMb(64)
            )
            .is_ok()
        );
    }

    #[test]
    fn shrinking_is_refused() {
        let err = plan_grow(&facts(64 * MIB, None), GrowRequest::SizeMb(32)).unwrap_err();
        assert!(matches!(
            err,
            OverlayError::Snapshot(SnapshotError::CannotGrow { .. })
        ));
    }

    fn recover_report(was_invalid: bool) -> RecoverReport {
        RecoverReport {
            was_invalid,
            changed: false,
            exceptions: 3,
            metadata_areas: 1,
            dm_status_after: "8/131072 16".to_string(),
            free_data_chunks: 10,
            full: false,
            trap_size: false,
        }
    }

    #[test]
    fn recover_grows_only_when_asked() {
        let plan = plan_recover(recover_report(true), None).unwrap();
        assert!(plan.grow.is_none());
        assert_eq!(plan.new_bytes(64 * MIB), 64 * MIB);
        let plan = plan_recover(recover_report(true), Some((&facts(64 * MIB, None), 16))).unwrap();
        let g = plan.grow.as_ref().unwrap();
        assert!(g.new_bytes > 64 * MIB);
        assert_eq!(plan.new_bytes(64 * MIB), g.new_bytes);
    }

    #[test]
    fn recover_on_a_stick_keeps_the_grow_limits() {
        let err = plan_recover(
            recover_report(true),
            Some((&facts(64 * MIB, Some(room(MIB))), 16)),
        )
        .unwrap_err();
        assert!(matches!(err, OverlayError::Refused(_)));
    }

    fn status(state: &'static str, exceptions: u64) -> StatusReport {
        StatusReport {
            state,
            dm_status: String::new(),
            chunk_sectors: CHUNK,
            cow_bytes: 64 * MIB,
            total_sectors: 64 * MIB / SECTOR_BYTES,
            allocated_sectors: None,
            metadata_sectors: None,
            exceptions,
            metadata_areas: 1,
            percent_used: 0.0,
            free_data_chunks: 0,
            bytes_free: 0,
            full: false,
            trap_size: false,
            problems: Vec::new(),
        }
    }

    #[test]
    fn reset_says_what_is_lost() {
        let plan = plan_reset("o", 64 * MIB, &Ok(status("uninitialised", 0)));
        assert_eq!(plan.discards, "nothing (it is already empty)");
        assert_eq!(plan.zeroed_bytes, Some(RESET_BYTES));
        assert_eq!(plan.kind, None);
        let plan = plan_reset("o", 64 * MIB, &Ok(status("valid", 2)));
        assert!(
            plan.discards.starts_with("2 changed chunks"),
            "{}",
            plan.discards
        );
        assert!(plan.discards.ends_with("state valid"), "{}", plan.discards);
        let plan = plan_reset("o", 1000, &Err(SnapshotError::TooShort { len: 1000 }));
        assert!(plan.discards.starts_with("an unreadable store"));
        assert_eq!(plan.zeroed_bytes, Some(1000));
        assert!(plan.would.starts_with("would reset o (zero the first"));
    }

    #[test]
    fn damaged_stores_are_refused_as_bad_input() {
        assert!(refuse_problems("o", &[]).is_ok());
        let err = refuse_problems("o", &["chunk 7 used twice".to_string()]).unwrap_err();
        match err {
            OverlayError::BadInput(m) => assert!(m.starts_with("o is a damaged overlay: chunk 7")),
            e => panic!("{e:?}"),
        }
    }
}
