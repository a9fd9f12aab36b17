//! What `livestick overlay` reports, as values: each verb's result with its one
//! JSON object (`--json`, [`Report::to_json`]) and its text for a human
//! (`Display`). The front only chooses one and prints it.
//!
//! The JSON shapes are the contract scripts read: docs/json-maintenance.md
//! describes them and `schemas/overlay-*.schema.json` checks them. [`document`]
//! gives every one its `schema` version, the `target` the user named and
//! `repaired`, so no verb spells those out itself.

use std::fmt::{self, Display, Formatter};
use std::path::Path;

use serde::Serialize;

use crate::persist::merge;
use crate::persist::merge::plan::Layout;
use crate::persist::overlay::place::StickOverlay;
use crate::persist::overlay::{Kind, ResetPlan, dir, ovlfs};
use crate::persist::ovl_maint;
use crate::persist::snapshot::{self, SECTOR_BYTES};
use crate::size::human;

/// A report of one `livestick overlay` run: its `Display` is the text a human
/// reads, `to_json` its own fields as one JSON object ([`document`] completes it).
pub trait Report: Display {
    fn to_json(&self) -> serde_json::Result<String>;
}

/// The shape version of every `overlay` document; bumped when a field is renamed
/// or removed, so a script can refuse a shape it does not know.
pub const SCHEMA_VERSION: u64 = 1;

/// The whole `--json` document of a report: `schema`, `target` (what the user
/// named: the stick, the bare file or the directory), the report's fields, and
/// `repaired`: what was repaired when the stick was opened (`opened_repairs`),
/// then what the report itself says it repaired; `[]` for nothing.
pub fn document(
    report: &dyn Report,
    target: &Path,
    opened_repairs: &[String],
) -> serde_json::Result<serde_json::Value> {
    let mut value: serde_json::Value = serde_json::from_str(&report.to_json()?)?;
    if let Some(object) = value.as_object_mut() {
        let mut repaired = opened_repairs.to_vec();
        if let Some(serde_json::Value::Array(own)) = object.get("repaired") {
            repaired.extend(own.iter().filter_map(|l| l.as_str().map(str::to_string)));
        }
        object.insert("repaired".into(), serde_json::json!(repaired));
        object.insert("schema".into(), serde_json::json!(SCHEMA_VERSION));
        object.insert("target".into(), serde_json::json!(target));
    }
    Ok(value)
}

/// Where a status came from: an overlay file or directory named bare, or one
/// found on a stick (with its label, UUID and the overlays no boot uses).
fn status_document(
    overlay: &str,
    kind: Kind,
    stick: Option<&StickOverlay>,
    usage: &Usage<'_>,
) -> serde_json::Result<String> {
    let null = serde_json::Value::Null;
    let mut doc = serde_json::json!({
        "overlay": overlay, "kind": kind,
        "label": null, "fs_uuid": null, "expected_overlay": null,
        "orphaned": null, "orphaned_overlays": null, "notes": [],
        "size_bytes": null, "used_bytes": null, "free_bytes": null, "percent_used": null,
        "full": null, "upper_entries": null,
        "state": null, "dm_status": null, "chunk_sectors": null, "total_sectors": null,
        "allocated_sectors": null, "metadata_sectors": null, "exceptions": null,
        "metadata_areas": null, "free_data_chunks": null, "trap_size": null, "problems": null,
    });
    let fields = match usage {
        Usage::Ovlfs(u) => serde_json::json!({
            "size_bytes": u.size_bytes, "used_bytes": u.used_bytes,
            "free_bytes": u.bytes_free, "percent_used": u.percent_used,
            "problems": (!u.problems.is_empty()).then_some(&u.problems),
        }),
        Usage::Dir(st) => serde_json::json!({
            "upper_entries": st.upper_entries, "used_bytes": st.used_bytes,
            "free_bytes": st.bytes_free,
        }),
        Usage::Dm(r) => serde_json::json!({
            "size_bytes": r.cow_bytes,
            "used_bytes": r.allocated_sectors.map(|s| s * SECTOR_BYTES),
            "free_bytes": r.bytes_free, "percent_used": r.percent_used, "full": r.full,
            "state": r.state, "dm_status": r.dm_status, "chunk_sectors": r.chunk_sectors,
            "total_sectors": r.total_sectors, "allocated_sectors": r.allocated_sectors,
            "metadata_sectors": r.metadata_sectors, "exceptions": r.exceptions,
            "metadata_areas": r.metadata_areas, "free_data_chunks": r.free_data_chunks,
            "trap_size": r.trap_size, "problems": r.problems,
        }),
    };
    let stick = match stick {
        Some(t) => serde_json::json!({
            "label": t.info.label, "fs_uuid": t.info.fs_uuid,
            "expected_overlay": t.info.expected_overlay, "orphaned": t.orphaned,
            "orphaned_overlays": t.orphans(), "notes": t.name_notes(),
        }),
        None => null,
    };
    if let Some(object) = doc.as_object_mut() {
        for extra in [fields, stick] {
            if let serde_json::Value::Object(extra) = extra {
                object.extend(extra);
            }
        }
    }
    pretty(&doc)
}

fn pretty<T: Serialize + ?Sized>(v: &T) -> serde_json::Result<String> {
    serde_json::to_string_pretty(v)
}

/// The status of a bare OverlayFS overlay file.
pub struct BareOvlfsStatus<'a> {
    pub path: &'a Path,
    pub usage: &'a ovlfs::Usage,
}

impl Report for BareOvlfsStatus<'_> {
    fn to_json(&self) -> serde_json::Result<String> {
        status_document(
            &self.path.display().to_string(),
            Kind::Overlayfs,
            None,
            &Usage::Ovlfs(self.usage),
        )
    }
}

impl Display for BareOvlfsStatus<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        writeln!(f, "overlay:        {}", self.path.display())?;
        ovlfs_usage(f, self.usage)
    }
}

/// The status of a bare dm-snapshot overlay file.
pub struct BareDmStatus<'a> {
    pub path: &'a Path,
    pub report: &'a snapshot::StatusReport,
}

impl Report for BareDmStatus<'_> {
    fn to_json(&self) -> serde_json::Result<String> {
        status_document(
            &self.path.display().to_string(),
            Kind::DmSnapshot,
            None,
            &Usage::Dm(self.report),
        )
    }
}

impl Display for BareDmStatus<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        dm_status(f, &self.path.display().to_string(), self.report)
    }
}

fn ovlfs_usage(f: &mut Formatter<'_>, usage: &ovlfs::Usage) -> fmt::Result {
    writeln!(
        f,
        "kind:           OverlayFS (ext4 with overlayfs/ + ovlwork/)"
    )?;
    writeln!(f, "size:           {}", human(usage.size_bytes))?;
    writeln!(
        f,
        "used:           {:.2} % ({} free)",
        usage.percent_used,
        human(usage.bytes_free)
    )?;
    for problem in &usage.problems {
        writeln!(f, "problem:        {problem}")?;
    }
    Ok(())
}

/// The status of an OverlayFS directory overlay.
pub struct DirStatus<'a> {
    pub path: &'a Path,
    pub status: &'a dir::Status,
}

impl Report for DirStatus<'_> {
    fn to_json(&self) -> serde_json::Result<String> {
        status_document(
            &self.path.display().to_string(),
            Kind::OverlayfsDir,
            None,
            &Usage::Dir(self.status),
        )
    }
}

impl Display for DirStatus<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let st = self.status;
        writeln!(f, "overlay:        {}", self.path.display())?;
        writeln!(
            f,
            "kind:           OverlayFS directory (overlayfs/ + ovlwork/ on the stick's file system)"
        )?;
        writeln!(
            f,
            "upper dir:      {} entries, {}",
            st.upper_entries,
            human(st.used_bytes)
        )?;
        writeln!(
            f,
            "free:           {} on its file system",
            human(st.bytes_free)
        )
    }
}

/// An overlay's status: OverlayFS usage, the dm-snapshot report, or a
/// directory overlay's upper dir (never on a FAT stick).
pub enum Usage<'a> {
    Ovlfs(&'a ovlfs::Usage),
    Dm(&'a snapshot::StatusReport),
    Dir(&'a dir::Status),
}

/// The status of the overlay on a stick, with the stick's label and the
/// overlays no boot uses.
pub struct StickStatus<'a> {
    pub overlay: &'a StickOverlay,
    pub usage: Usage<'a>,
}

impl Report for StickStatus<'_> {
    fn to_json(&self) -> serde_json::Result<String> {
        let t = self.overlay;
        status_document(&t.show(), t.kind, Some(t), &self.usage)
    }
}

impl Display for StickStatus<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let t = self.overlay;
        match self.usage {
            Usage::Ovlfs(u) => {
                writeln!(
                    f,
                    "stick:          {} ({} {})",
                    t.stick.path.display(),
                    t.info.label,
                    t.info.fs_uuid
                )?;
                writeln!(f, "overlay:        {}", t.overlay)?;
                ovlfs_usage(f, u)?;
            }
            Usage::Dir(st) => {
                writeln!(f, "stick:          {}", t.stick.path.display())?;
                DirStatus {
                    path: Path::new(&t.overlay),
                    status: st,
                }
                .fmt(f)?;
            }
            Usage::Dm(r) => {
                writeln!(
                    f,
                    "stick:          {} (label {}, UUID {})",
                    t.stick.path.display(),
                    t.info.label,
                    t.info.fs_uuid
                )?;
                dm_status(f, &t.overlay, r)?;
            }
        }
        for n in &t.name_notes() {
            writeln!(f, "note:           {n}")?;
        }
        Ok(())
    }
}

/// A merge of a bare dm-snapshot overlay into its root image (`--origin`).
#[derive(Serialize)]
pub struct PlumbingReport<'a> {
    pub overlay: &'a Path,
    pub origin: &'a Path,
    pub output: Option<&'a Path>,
    pub exceptions: u64,
    pub dry_run: bool,
    pub overlay_after: Option<String>,
}

impl Report for PlumbingReport<'_> {
    fn to_json(&self) -> serde_json::Result<String> {
        pretty(self)
    }
}

impl Display for PlumbingReport<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let (n, overlay, origin, output) =
            (self.exceptions, self.overlay, self.origin, self.output);
        match (self.dry_run, output) {
            (true, _) => writeln!(
                f,
                "would merge {n} chunks of {} into {}",
                overlay.display(),
                output.unwrap_or(origin).display()
            ),
            (false, Some(out)) => writeln!(
                f,
                "wrote the merged image ({n} chunks applied) to {}; {} and {} are unchanged",
                out.display(),
                origin.display(),
                overlay.display()
            ),
            (false, None) => writeln!(
                f,
                "merged {n} chunks into {}; the overlay is now empty ({})",
                origin.display(),
                self.overlay_after.as_deref().unwrap_or("?")
            ),
        }
    }
}

/// A merge into squashfs.img that was carried out.
pub struct Merged<'a> {
    pub plan: &'a merge::MergePlan,
    pub report: &'a merge::MergeReport,
}

impl Report for Merged<'_> {
    fn to_json(&self) -> serde_json::Result<String> {
        pretty(&self.report)
    }
}

impl Display for Merged<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let (plan, report) = (self.plan, self.report);
        match &report.overlayfs {
            Some(r) => {
                writeln!(
                    f,
                    "merged {} upper-dir entries into {} ({} → {}), overlay reset",
                    report.exceptions_applied,
                    plan.squashfs.display(),
                    human(report.old_squashfs_bytes),
                    human(report.new_squashfs_bytes)
                )?;
                writeln!(
                    f,
                    "  {} created, {} replaced, {} removed by whiteouts, {} directories updated",
                    r.created, r.replaced, r.removed, r.dirs_updated
                )?;
                for n in &r.notes {
                    writeln!(f, "  note: {n}")?;
                }
            }
            None => writeln!(
                f,
                "merged {} chunks into {} ({} → {}), overlay reset",
                report.exceptions_applied,
                plan.squashfs.display(),
                human(report.old_squashfs_bytes),
                human(report.new_squashfs_bytes)
            )?,
        }
        if report.fsck_chunks_folded > 0 {
            writeln!(
                f,
                "e2fsck changed {} chunks; they were written into the overlay before the swap",
                report.fsck_chunks_folded
            )?;
        }
        for r in &report.repaired {
            writeln!(f, "repaired: {r}")?;
        }
        Ok(())
    }
}

fn dm_status(f: &mut Formatter<'_>, overlay: &str, report: &snapshot::StatusReport) -> fmt::Result {
    writeln!(f, "overlay:        {overlay}")?;
    writeln!(f, "state:          {}", report.state)?;
    writeln!(f, "dmsetup status: {}", report.dm_status)?;
    writeln!(
        f,
        "chunk size:     {} sectors ({})",
        report.chunk_sectors,
        human(u64::from(report.chunk_sectors) * SECTOR_BYTES)
    )?;
    writeln!(
        f,
        "size:           {} ({} sectors)",
        human(report.cow_bytes),
        report.total_sectors
    )?;
    writeln!(
        f,
        "exceptions:     {} in {} metadata area(s)",
        report.exceptions, report.metadata_areas
    )?;
    writeln!(f, "used:           {:.2} %", report.percent_used)?;
    writeln!(
        f,
        "free:           {} ({} chunks){}",
        human(report.bytes_free),
        report.free_data_chunks,
        if report.full {
            ": FULL, the next new chunk overflows"
        } else {
            ""
        }
    )?;
    if report.state == "uninitialised" {
        writeln!(
            f,
            "note:           new store: the kernel initialises it on first boot"
        )?;
    }
    if report.trap_size {
        writeln!(
            f,
            "warning:        this size lets the last metadata area invalidate the overlay when it fills; `overlay grow --add-mb 1` fixes it"
        )?;
    }
    for p in &report.problems {
        writeln!(f, "problem:        {p}")?;
    }
    Ok(())
}

/// A merge plan (`overlay merge --dry-run`).
pub struct MergeDryRun<'a>(pub &'a merge::MergePlan);

impl Report for MergeDryRun<'_> {
    fn to_json(&self) -> serde_json::Result<String> {
        pretty(&self.0)
    }
}

impl Display for MergeDryRun<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let plan = self.0;
        if plan.nothing_to_merge {
            return writeln!(f, "the overlay holds no changes: nothing to merge");
        }
        writeln!(f, "merge plan (dry run, nothing changed)")?;
        writeln!(
            f,
            "  squashfs      {} ({})",
            plan.squashfs.display(),
            human(plan.squashfs_bytes)
        )?;
        writeln!(
            f,
            "  root image    {} ({})",
            plan.root_image,
            human(plan.root_image_bytes)
        )?;
        match &plan.ovl {
            Some(o) => writeln!(
                f,
                "  overlay       {} (OverlayFS: {} upper-dir entries, {} used; layout {})",
                plan.overlay.display(),
                o.upper_entries,
                human(o.overlay_used_bytes),
                match &o.layout {
                    Layout::Flat => "flat squashfs",
                    Layout::Nested { .. } => "squashfs with a nested root image",
                    Layout::Erofs { .. } => "EROFS",
                }
            )?,
            None => writeln!(
                f,
                "  overlay       {} ({} exceptions, {})",
                plan.overlay.display(),
                plan.exceptions,
                plan.overlay_status.dm_status
            )?,
        }
        writeln!(
            f,
            "  work dir      {}: needs {}, {} free",
            plan.workdir.display(),
            human(plan.workdir_needed_bytes),
            human(plan.workdir_free_bytes)
        )?;
        writeln!(
            f,
            "  stick dir     {}: needs up to {}, {} free",
            plan.target_dir.display(),
            human(plan.target_needed_bytes),
            human(plan.target_free_bytes)
        )?;
        for note in &plan.notes {
            writeln!(f, "  note          {note}")?;
        }
        for (i, s) in plan.steps.iter().enumerate() {
            writeln!(f, "  {}. {s}", i + 1)?;
        }
        Ok(())
    }
}

/// A dm-snapshot recovery, planned or done, with the grow and the repair that
/// came with it.
pub struct Recovered<'a> {
    pub show: &'a str,
    pub report: &'a snapshot::RecoverReport,
    pub grow_plan: Option<&'a snapshot::GrowPlan>,
    pub repair: Option<&'a merge::dm::RepairReport>,
    pub dry_run: bool,
}

impl Report for Recovered<'_> {
    fn to_json(&self) -> serde_json::Result<String> {
        pretty(&serde_json::json!({
            "overlay": self.show, "kind": Kind::DmSnapshot, "dry_run": self.dry_run,
            "recover": self.report,
            "grow": self.grow_plan, "repair": self.repair,
        }))
    }
}

impl Display for Recovered<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let (show, report, dry_run) = (self.show, self.report, self.dry_run);
        if !report.was_invalid {
            writeln!(
                f,
                "{show} is not marked Invalid; nothing to recover ({})",
                report.dm_status_after
            )?;
        } else {
            let verb = if dry_run {
                "would recover"
            } else {
                "recovered"
            };
            writeln!(
                f,
                "{verb} {show}: {} exceptions in {} metadata area(s); status now {}",
                report.exceptions, report.metadata_areas, report.dm_status_after
            )?;
        }
        if let Some(p) = self.grow_plan {
            writeln!(
                f,
                "{} from {} to {}",
                if dry_run { "would grow" } else { "grown" },
                human(p.current_bytes),
                human(p.new_bytes)
            )?;
        }
        if report.full && self.grow_plan.is_none() {
            writeln!(
                f,
                "warning: the overlay is still full; the first new chunk invalidates it again. Add --add-mb N"
            )?;
        }
        match self.repair {
            Some(r) => writeln!(
                f,
                "e2fsck -f -y on the view exited {}: {} chunks changed, {} written into the overlay",
                r.fsck_exit_code, r.chunks_changed, r.chunks_folded
            )?,
            None if report.was_invalid => writeln!(
                f,
                "writes after the failure were lost: check the file system before trusting it (`overlay recover --repair` runs e2fsck -f -y on the view and keeps its repairs), then merge"
            )?,
            None => {}
        }
        Ok(())
    }
}

/// A reset of any kind of overlay, planned (`--dry-run`) or done.
pub struct Reset<'a> {
    pub plan: &'a ResetPlan,
    pub dry_run: bool,
}

impl Report for Reset<'_> {
    fn to_json(&self) -> serde_json::Result<String> {
        let plan = self.plan;
        pretty(&serde_json::json!({
            "overlay": plan.overlay,
            // A dm-snapshot plan names no kind: it is the only kind that zeroes.
            "kind": plan.kind.unwrap_or(Kind::DmSnapshot),
            "dry_run": self.dry_run, "discarded": plan.discards,
            "zeroed_bytes": plan.zeroed_bytes,
        }))
    }
}

impl Display for Reset<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let plan = self.plan;
        if self.dry_run {
            writeln!(f, "{}, discarding {}", plan.would, plan.discards)
        } else {
            writeln!(f, "reset {}: discarded {}", plan.overlay, plan.discards)
        }
    }
}

/// A dm-snapshot grow, planned or done.
pub struct Grown<'a> {
    pub show: &'a str,
    pub plan: &'a snapshot::GrowPlan,
    pub dry_run: bool,
}

impl Report for Grown<'_> {
    fn to_json(&self) -> serde_json::Result<String> {
        pretty(&serde_json::json!({
            "overlay": self.show, "kind": Kind::DmSnapshot, "dry_run": self.dry_run,
            "grow": self.plan,
        }))
    }
}

impl Display for Grown<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let (show, plan) = (self.show, self.plan);
        let verb = if self.dry_run { "would grow" } else { "grew" };
        writeln!(
            f,
            "{verb} {show} from {} to {} ({} usable data chunks)",
            human(plan.current_bytes),
            human(plan.new_bytes),
            plan.usable_data_chunks_after
        )?;
        for n in &plan.notes {
            writeln!(f, "note: {n}")?;
        }
        Ok(())
    }
}

fn fsck(f: &mut Formatter<'_>, show: &str, r: &ovl_maint::FsckReport) -> fmt::Result {
    let state = if r.clean {
        "clean"
    } else if r.exit_code == 0 && r.mode == ovl_maint::FsckMode::Check {
        "no errors in the checked state, but the superblock asks for a repair run"
    } else {
        r.meaning
    };
    writeln!(f, "{} on {show}: {state} (exit {})", r.command, r.exit_code)?;
    for finding in &r.findings {
        writeln!(f, "  finding: {finding}")?;
    }
    for p in &r.problems {
        writeln!(f, "  problem: {p}")?;
    }
    if r.more_problems > 0 {
        writeln!(
            f,
            "  … and {} more (--json has e2fsck's whole output)",
            r.more_problems
        )?;
    }
    if let Some(s) = &r.summary {
        writeln!(f, "  in use: {s}")?;
    }
    Ok(())
}

/// An OverlayFS recover or grow, planned or done; `target` is what the user
/// named, for the command that repairs it.
pub struct OvlfsOutcome<'a> {
    pub outcome: &'a ovlfs::Outcome,
    pub target: &'a Path,
}

impl Report for OvlfsOutcome<'_> {
    fn to_json(&self) -> serde_json::Result<String> {
        pretty(self.outcome)
    }
}

impl Display for OvlfsOutcome<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let out = self.outcome;
        let show = &out.overlay;
        writeln!(
            f,
            "overlay:        {show} (OverlayFS: ext4 with overlayfs/ + ovlwork/)"
        )?;
        writeln!(f, "method:         {}", out.method)?;
        if let Some(c) = &out.check {
            fsck(f, show, c)?;
            if !c.clean && out.repair.is_none() && !out.dry_run {
                writeln!(
                    f,
                    "nothing was changed; `livestick overlay recover {} --repair` fixes this with e2fsck -f -y",
                    self.target.display()
                )?;
            }
        }
        if let Some(r) = &out.repair {
            fsck(f, show, r)?;
        }
        if let Some(c) = &out.check_after {
            fsck(f, show, c)?;
        }
        if let Some(p) = out.preen.as_ref().filter(|p| p.modified) {
            writeln!(f, "e2fsck -f -p before resizing: {}", p.meaning)?;
        }
        if let Some(g) = &out.grow {
            let verb = if out.dry_run {
                "would grow"
            } else if out.grown {
                "grew"
            } else {
                "did not grow"
            };
            writeln!(
                f,
                "{verb} {show} from {} to {} (its ext4 from {})",
                human(g.current_bytes),
                human(g.new_bytes),
                human(g.fs_bytes_before)
            )?;
            for n in &g.notes {
                writeln!(f, "note: {n}")?;
            }
        }
        if let Some(w) = &out.write_back {
            writeln!(
                f,
                "{} changed blocks of 4 KiB written back to {show}",
                w.chunks_written
            )?;
        }
        for n in &out.notes {
            writeln!(f, "note: {n}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grow_reads_as_text_and_as_one_json_object() {
        let plan = snapshot::plan_grow(64 << 20, 128 << 20, 8, 4 << 30).expect("plan");
        let grown = Grown {
            show: "LiveOS/overlay-L-U",
            plan: &plan,
            dry_run: true,
        };
        let text = grown.to_string();
        assert!(
            text.starts_with("would grow LiveOS/overlay-L-U from 64 MiB to "),
            "{text}"
        );
        assert!(text.ends_with('\n'), "{text:?}");
        let json: serde_json::Value =
            serde_json::from_str(&grown.to_json().expect("json")).expect("valid JSON");
        assert_eq!(json["overlay"], "LiveOS/overlay-L-U");
        assert_eq!(json["dry_run"], true);
        assert_eq!(json["grow"]["new_bytes"], plan.new_bytes);
    }

    #[test]
    fn a_bare_ovlfs_status_names_the_file_and_its_usage() {
        let usage = ovlfs::Usage {
            size_bytes: 100 << 20,
            used_bytes: Some(25 << 20),
            bytes_free: 75 << 20,
            percent_used: 25.0,
            problems: Vec::new(),
        };
        let status = BareOvlfsStatus {
            path: Path::new("overlay.img"),
            usage: &usage,
        };
        let text = status.to_string();
        assert!(
            text.starts_with("overlay:        overlay.img\nkind:           OverlayFS"),
            "{text}"
        );
        assert!(
            text.contains("used:           25.00 % (75 MiB free)"),
            "{text}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&status.to_json().expect("json")).expect("valid JSON");
        assert_eq!(json["kind"], "overlayfs");
        assert_eq!(json["used_bytes"], 25u64 << 20);
    }

    #[test]
    fn every_status_document_has_the_same_keys_whatever_the_kind() {
        let usage = ovlfs::Usage {
            size_bytes: 100 << 20,
            used_bytes: None,
            bytes_free: 75 << 20,
            percent_used: 25.0,
            problems: Vec::new(),
        };
        let upper = dir::Status {
            upper_entries: 2,
            used_bytes: 4096,
            bytes_free: 1 << 20,
        };
        let file = BareOvlfsStatus {
            path: Path::new("overlay.img"),
            usage: &usage,
        };
        let directory = DirStatus {
            path: Path::new("overlay-dir"),
            status: &upper,
        };
        let file = document(&file, Path::new("overlay.img"), &[]).expect("json");
        let repaired = ["completed a stopped replacement".to_string()];
        let directory = document(&directory, Path::new("overlay-dir"), &repaired).expect("json");
        let keys = |v: &serde_json::Value| {
            let mut k: Vec<String> = v.as_object().expect("object").keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(keys(&file), keys(&directory));
        assert_eq!(file["schema"], SCHEMA_VERSION);
        assert_eq!(file["target"], "overlay.img");
        assert!(file["used_bytes"].is_null(), "{file}");
        assert_eq!(file["repaired"], serde_json::json!([]));
        assert_eq!(directory["kind"], "overlayfs-dir");
        assert!(directory["size_bytes"].is_null(), "{directory}");
        assert_eq!(directory["repaired"], serde_json::json!(repaired));
    }
}
