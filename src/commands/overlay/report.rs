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
    println!("{}", serde_json::to_string_pretty(v)?);
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
    println!("overlay         {}", path.display());
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
    println!("kind            OverlayFS (ext4 with overlayfs/ + ovlwork/)");
    println!("size            {}", human(usage.size_bytes));
    println!(
        "used            {:.2} % ({} free)",
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
            println!(
                "stick           {} ({} {})",
                t.stick.path.display(),
                t.info.label,
                t.info.fs_uuid
            );
            println!("overlay         {}", t.overlay);
            print_ovlfs_usage(u);
        }
        Usage::Dm(r) => {
            println!(
                "stick           {} (label {}, UUID {})",
                t.stick.path.display(),
                t.info.label,
                t.info.fs_uuid
            );
            print_status(&t.overlay, r);
        }
    }
    for n in &notes {
        println!("note            {n}");
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
    for r in &report.repaired {
        println!("repaired: {r}");
    }
    Ok(())
}

pub(super) fn print_status(overlay: &str, report: &snapshot::StatusReport) {
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

pub(super) fn print_merge_plan(plan: &merge::MergePlan, json: bool) -> anyhow::Result<()> {
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
                    Layout::Flat => "flat squashfs",
                    Layout::Nested { .. } => "squashfs with a nested root image",
                    Layout::Erofs { .. } => "EROFS",
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

pub(super) fn print_fsck(show: &str, r: &ovl_maint::FsckReport) {
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

pub(super) fn ovl_report(out: &ovlfs::Outcome, target: &Path, json: bool) -> anyhow::Result<()> {
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
