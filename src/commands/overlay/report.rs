//! What `livestick overlay` prints: one JSON object (`--json`) or text for a human,
//! from the reports the library returns.

use std::path::Path;

use serde::Serialize;

use crate::persist::merge;
use crate::persist::merge::plan::Layout;
use crate::persist::overlay::place::StickOverlay;
use crate::persist::overlay::{Kind, dir, ovlfs};
use crate::persist::ovl_maint;
use crate::persist::snapshot::{self, SECTOR_BYTES};
use crate::size::human;

/// One report as pretty JSON on stdout.
pub(super) fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    crate::outln!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// A stick overlay's status: OverlayFS usage, or the dm-snapshot report.
pub(super) enum Usage<'a> {
    Ovlfs(&'a ovlfs::Usage),
    Dm(&'a snapshot::StatusReport),
}

pub(super) fn bare_ovlfs_status(
    path: &Path,
    usage: &ovlfs::Usage,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        return print_json(&serde_json::json!({
            "overlay": path, "kind": "overlayfs", "size_bytes": usage.size_bytes,
            "used_bytes": usage.used_bytes,
            "bytes_free": usage.bytes_free, "percent_used": usage.percent_used,
        }));
    }
    crate::outln!("overlay:        {}", path.display());
    print_ovlfs_usage(usage);
    Ok(())
}

pub(super) fn bare_dm_status(
    path: &Path,
    report: &snapshot::StatusReport,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        #[derive(Serialize)]
        struct Out<'a> {
            overlay: &'a Path,
            #[serde(flatten)]
            report: &'a snapshot::StatusReport,
        }
        return print_json(&Out {
            overlay: path,
            report,
        });
    }
    print_status(&path.display().to_string(), report);
    Ok(())
}

fn print_ovlfs_usage(usage: &ovlfs::Usage) {
    crate::outln!("kind:           OverlayFS (ext4 with overlayfs/ + ovlwork/)");
    crate::outln!("size:           {}", human(usage.size_bytes));
    crate::outln!(
        "used:           {:.2} % ({} free)",
        usage.percent_used,
        human(usage.bytes_free)
    );
}

pub(super) fn dir_status(dir_path: &Path, st: &dir::Status, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(&serde_json::json!({
            "overlay": dir_path, "kind": Kind::OverlayfsDir, "upper_entries": st.upper_entries,
            "used_bytes": st.used_bytes, "bytes_free": st.bytes_free,
        }));
    }
    crate::outln!("overlay:        {}", dir_path.display());
    crate::outln!(
        "kind:           OverlayFS directory (overlayfs/ + ovlwork/ on the stick's file system)"
    );
    crate::outln!(
        "upper dir:      {} entries, {}",
        st.upper_entries,
        human(st.used_bytes)
    );
    crate::outln!(
        "free:           {} on its file system",
        human(st.bytes_free)
    );
    Ok(())
}

pub(super) fn stick_status(t: &StickOverlay, usage: Usage<'_>, json: bool) -> anyhow::Result<()> {
    let orphans = t.orphans();
    let notes = t.name_notes();
    if json {
        let report = match usage {
            Usage::Ovlfs(u) => {
                return print_json(&serde_json::json!({
                    "stick": t.stick.path, "label": t.info.label, "fs_uuid": t.info.fs_uuid,
                    "overlay": t.overlay, "expected_overlay": t.info.expected_overlay,
                    "orphaned": t.orphaned, "orphaned_overlays": orphans, "kind": t.kind,
                    "size_bytes": u.size_bytes, "used_bytes": u.used_bytes,
                    "bytes_free": u.bytes_free, "percent_used": u.percent_used,
                    "notes": notes,
                }));
            }
            Usage::Dm(r) => r,
        };
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
            report,
        });
    }
    match usage {
        Usage::Ovlfs(u) => {
            crate::outln!(
                "stick:          {} ({} {})",
                t.stick.path.display(),
                t.info.label,
                t.info.fs_uuid
            );
            crate::outln!("overlay:        {}", t.overlay);
            print_ovlfs_usage(u);
        }
        Usage::Dm(r) => {
            crate::outln!(
                "stick:          {} (label {}, UUID {})",
                t.stick.path.display(),
                t.info.label,
                t.info.fs_uuid
            );
            print_status(&t.overlay, r);
        }
    }
    for n in &notes {
        crate::outln!("note:           {n}");
    }
    Ok(())
}

#[derive(Serialize)]
pub(super) struct PlumbingReport<'a> {
    pub overlay: &'a Path,
    pub origin: &'a Path,
    pub output: Option<&'a Path>,
    pub exceptions: u64,
    pub dry_run: bool,
    pub overlay_after: Option<String>,
}

pub(super) fn plumbing(report: &PlumbingReport<'_>, json: bool) -> anyhow::Result<()> {
    let (n, overlay, origin, output) = (
        report.exceptions,
        report.overlay,
        report.origin,
        report.output,
    );
    let dry_run = report.dry_run;
    if json {
        return print_json(report);
    }
    match (dry_run, output) {
        (true, _) => crate::outln!(
            "would merge {n} chunks of {} into {}",
            overlay.display(),
            output.unwrap_or(origin).display()
        ),
        (false, Some(out)) => crate::outln!(
            "wrote the merged image ({n} chunks applied) to {}; {} and {} are unchanged",
            out.display(),
            origin.display(),
            overlay.display()
        ),
        (false, None) => crate::outln!(
            "merged {n} chunks into {}; the overlay is now empty ({})",
            origin.display(),
            report.overlay_after.as_deref().unwrap_or("?")
        ),
    }
    Ok(())
}

pub(super) fn merged(
    plan: &merge::MergePlan,
    report: &merge::MergeReport,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        return print_json(&report);
    }
    match &report.overlayfs {
        Some(r) => {
            crate::outln!(
                "merged {} upper-dir entries into {} ({} → {}), overlay reset",
                report.exceptions_applied,
                plan.squashfs.display(),
                human(report.old_squashfs_bytes),
                human(report.new_squashfs_bytes)
            );
            crate::outln!(
                "  {} created, {} replaced, {} removed by whiteouts, {} directories updated",
                r.created,
                r.replaced,
                r.removed,
                r.dirs_updated
            );
            for n in &r.notes {
                crate::outln!("  note: {n}");
            }
        }
        None => crate::outln!(
            "merged {} chunks into {} ({} → {}), overlay reset",
            report.exceptions_applied,
            plan.squashfs.display(),
            human(report.old_squashfs_bytes),
            human(report.new_squashfs_bytes)
        ),
    }
    if report.fsck_chunks_folded > 0 {
        crate::outln!(
            "e2fsck changed {} chunks; they were written into the overlay before the swap",
            report.fsck_chunks_folded
        );
    }
    for r in &report.repaired {
        crate::outln!("repaired: {r}");
    }
    Ok(())
}

pub(super) fn print_status(overlay: &str, report: &snapshot::StatusReport) {
    crate::outln!("overlay:        {overlay}");
    crate::outln!("state:          {}", report.state);
    crate::outln!("dmsetup status: {}", report.dm_status);
    crate::outln!(
        "chunk size:     {} sectors ({})",
        report.chunk_sectors,
        human(u64::from(report.chunk_sectors) * SECTOR_BYTES)
    );
    crate::outln!(
        "size:           {} ({} sectors)",
        human(report.cow_bytes),
        report.total_sectors
    );
    crate::outln!(
        "exceptions:     {} in {} metadata area(s)",
        report.exceptions,
        report.metadata_areas
    );
    crate::outln!("used:           {:.2} %", report.percent_used);
    crate::outln!(
        "free:           {} ({} chunks){}",
        human(report.bytes_free),
        report.free_data_chunks,
        if report.full {
            ": FULL, the next new chunk overflows"
        } else {
            ""
        }
    );
    if report.state == "uninitialised" {
        crate::outln!("note:           new store: the kernel initialises it on first boot");
    }
    if report.trap_size {
        crate::outln!(
            "warning:        this size lets the last metadata area invalidate the overlay when it fills; `overlay grow --add-mb 1` fixes it"
        );
    }
    for p in &report.problems {
        crate::outln!("problem:        {p}");
    }
}

pub(super) fn print_merge_plan(plan: &merge::MergePlan, json: bool) -> anyhow::Result<()> {
    {
        if json {
            return print_json(&plan);
        }
        if plan.nothing_to_merge {
            crate::outln!("the overlay holds no changes: nothing to merge");
            return Ok(());
        }
        crate::outln!("merge plan (dry run, nothing changed)");
        crate::outln!(
            "  squashfs      {} ({})",
            plan.squashfs.display(),
            human(plan.squashfs_bytes)
        );
        crate::outln!(
            "  root image    {} ({})",
            plan.root_image,
            human(plan.root_image_bytes)
        );
        match &plan.ovl {
            Some(o) => crate::outln!(
                "  overlay       {} (OverlayFS: {} upper-dir entries, {} used; layout {})",
                plan.overlay.display(),
                o.upper_entries,
                human(o.overlay_used_bytes),
                match &o.layout {
                    Layout::Flat => "flat squashfs",
                    Layout::Nested { .. } => "squashfs with a nested root image",
                    Layout::Erofs { .. } => "EROFS",
                }
            ),
            None => crate::outln!(
                "  overlay       {} ({} exceptions, {})",
                plan.overlay.display(),
                plan.exceptions,
                plan.overlay_status.dm_status
            ),
        }
        crate::outln!(
            "  work dir      {}: needs {}, {} free",
            plan.workdir.display(),
            human(plan.workdir_needed_bytes),
            human(plan.workdir_free_bytes)
        );
        crate::outln!(
            "  stick dir     {}: needs up to {}, {} free",
            plan.target_dir.display(),
            human(plan.target_needed_bytes),
            human(plan.target_free_bytes)
        );
        for note in &plan.notes {
            crate::outln!("  note          {note}");
        }
        for (i, s) in plan.steps.iter().enumerate() {
            crate::outln!("  {}. {s}", i + 1);
        }
        Ok(())
    }
}

pub(super) fn recover_report(
    show: &str,
    report: &snapshot::RecoverReport,
    grow_plan: Option<&snapshot::GrowPlan>,
    repair: Option<&merge::dm::RepairReport>,
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
        crate::outln!(
            "{show} is not marked Invalid; nothing to recover ({})",
            report.dm_status_after
        );
    } else {
        let verb = if dry_run {
            "would recover"
        } else {
            "recovered"
        };
        crate::outln!(
            "{verb} {show}: {} exceptions in {} metadata area(s); status now {}",
            report.exceptions,
            report.metadata_areas,
            report.dm_status_after
        );
    }
    if let Some(p) = grow_plan {
        crate::outln!(
            "{} from {} to {}",
            if dry_run { "would grow" } else { "grown" },
            human(p.current_bytes),
            human(p.new_bytes)
        );
    }
    if report.full && grow_plan.is_none() {
        crate::outln!(
            "warning: the overlay is still full; the first new chunk invalidates it again. Add --add-mb N"
        );
    }
    match repair {
        Some(r) => crate::outln!(
            "e2fsck -f -y on the view exited {}: {} chunks changed, {} written into the overlay",
            r.fsck_exit_code,
            r.chunks_changed,
            r.chunks_folded
        ),
        None if report.was_invalid => crate::outln!(
            "writes after the failure were lost: check the file system before trusting it (`overlay recover --repair` runs e2fsck -f -y on the view and keeps its repairs), then merge"
        ),
        None => {}
    }
    Ok(())
}

pub(super) fn grow_report(
    show: &str,
    plan: &snapshot::GrowPlan,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<()> {
    if json {
        return print_json(&serde_json::json!({"overlay": show, "dry_run": dry_run, "grow": plan}));
    }
    let verb = if dry_run { "would grow" } else { "grew" };
    crate::outln!(
        "{verb} {show} from {} to {} ({} usable data chunks)",
        human(plan.current_bytes),
        human(plan.new_bytes),
        plan.usable_data_chunks_after
    );
    for n in &plan.notes {
        crate::outln!("note: {n}");
    }
    Ok(())
}

pub(super) fn print_fsck(show: &str, r: &ovl_maint::FsckReport) {
    let state = if r.clean {
        "clean"
    } else if r.exit_code == 0 && r.mode == ovl_maint::FsckMode::Check {
        "no errors in the checked state, but the superblock asks for a repair run"
    } else {
        r.meaning
    };
    crate::outln!("{} on {show}: {state} (exit {})", r.command, r.exit_code);
    for f in &r.findings {
        crate::outln!("  finding: {f}");
    }
    for p in &r.problems {
        crate::outln!("  problem: {p}");
    }
    if r.more_problems > 0 {
        crate::outln!(
            "  … and {} more (--json has e2fsck's whole output)",
            r.more_problems
        );
    }
    if let Some(s) = &r.summary {
        crate::outln!("  in use: {s}");
    }
}

pub(super) fn ovl_report(out: &ovlfs::Outcome, target: &Path, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(out);
    }
    let show = &out.overlay;
    crate::outln!("overlay:        {show} (OverlayFS: ext4 with overlayfs/ + ovlwork/)");
    crate::outln!("method:         {}", out.method);
    if let Some(c) = &out.check {
        print_fsck(show, c);
        if !c.clean && out.repair.is_none() && !out.dry_run {
            crate::outln!(
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
        crate::outln!("e2fsck -f -p before resizing: {}", p.meaning);
    }
    if let Some(g) = &out.grow {
        let verb = if out.dry_run {
            "would grow"
        } else if out.grown {
            "grew"
        } else {
            "did not grow"
        };
        crate::outln!(
            "{verb} {show} from {} to {} (its ext4 from {})",
            human(g.current_bytes),
            human(g.new_bytes),
            human(g.fs_bytes_before)
        );
        for n in &g.notes {
            crate::outln!("note: {n}");
        }
    }
    if let Some(w) = &out.write_back {
        crate::outln!(
            "{} changed blocks of 4 KiB written back to {show}",
            w.chunks_written
        );
    }
    for n in &out.notes {
        crate::outln!("note: {n}");
    }
    Ok(())
}
