//! The OverlayFS steps of a merge up to the built image (`extract → apply → fsck →
//! build`), by layout: a flat squashfs streams through [`super::flat`], a nested
//! rootfs.img is changed by debugfs, an EROFS tree on the host (or under fakeroot);
//! then the shared stage/verify/swap/reset of [`crate::persist::merge::replace`].

use std::fs;
use std::path::Path;

use super::error::OvlError;
use super::fakeroot::fakeroot_steps;
use super::flat;
use super::tree::{Applied, Ext4Target, apply, apply_host_tree};
use super::upper::{UpperTree, overlay_debugfs, read_upper_details, walk_upper};
use crate::persist::erofs::{self, ErofsError};
use crate::persist::merge::dm::run_e2fsck;
use crate::persist::merge::error::{MergeError, io_at};
use crate::persist::merge::ext4_replace::replace_in_place;
use crate::persist::merge::located::{Located, with_readable_squashfs};
use crate::persist::merge::overlayfs::dir::image_from_dir;
use crate::persist::merge::plan::{Layout, MergePlan, OvlPlan, failpoint, failpoints};
use crate::persist::merge::replace::MergeReport;
use crate::persist::overlay::store::{build_fresh_overlay, empty_overlay_dir};
use crate::squash;

/// Flat squashfs: one stream from the old image to the new, the upper dir applied on
/// the way (see [`flat`]).
fn flat_steps(
    plan: &MergePlan,
    ovl: &OvlPlan,
    work: &Path,
    upper: &UpperTree,
    built: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<Applied, MergeError> {
    let (src, copied) = plan
        .squashfs_at
        .whole_file_or_copy(work, "lower-squashfs.img")?;
    progress("extract", plan.root_image_bytes, plan.root_image_bytes);
    let streamed = failpoint(plan, "extract").and_then(|()| {
        let total = plan.root_image_bytes;
        Ok(flat::rebuild_flat(
            &src,
            upper,
            built,
            &ovl.tar2sqfs_args,
            work,
            &mut |done| progress("apply", done.min(total), total),
        )?)
    });
    if copied {
        let _ = fs::remove_file(&src);
    }
    let applied = streamed?;
    progress("apply", plan.root_image_bytes, plan.root_image_bytes);
    failpoints(plan, &["apply", "fsck"])?;
    Ok((applied, built.to_path_buf(), None))
}

/// Nested rootfs.img and EROFS: the root extracted into the work dir, changed there,
/// then rebuilt.
fn tree_steps(
    plan: &MergePlan,
    ovl: &OvlPlan,
    work: &Path,
    upper: &UpperTree,
    built: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<Applied, MergeError> {
    let tree = work.join("tree");
    match &ovl.layout {
        Layout::Flat | Layout::Nested { .. } => {
            with_readable_squashfs(&plan.squashfs_at, work, |p, off| {
                Ok(squash::extract_at(p, off, &tree, &[])?)
            })?;
        }
        Layout::Erofs { .. } => {
            let (src, copied) = plan
                .squashfs_at
                .whole_file_or_copy(work, "erofs-source.img")?;
            let unpacked = erofs::unpack(&src, &tree);
            if copied {
                let _ = fs::remove_file(&src);
            }
            unpacked.map_err(OvlError::from)?;
        }
    }
    progress("extract", plan.root_image_bytes, plan.root_image_bytes);
    failpoint(plan, "extract")?;

    let total = upper.entries.len() as u64;
    let mut tick = |d, t| progress("apply", d, t);
    let (applied, root) = match &ovl.layout {
        Layout::Nested { root_image } => {
            let img = tree.join(root_image);
            let scratch = work.join("debugfs");
            fs::create_dir_all(&scratch).map_err(io_at(&scratch))?;
            let mut t = Ext4Target::new(&img, upper, &scratch)?;
            let r = apply(upper, &mut t, &mut tick)?;
            t.finish()?;
            (r, img)
        }
        _ => (apply_host_tree(&tree, upper, &mut tick)?, tree.clone()),
    };
    progress("apply", total, total);
    failpoint(plan, "apply")?;

    let mut fsck_code = None;
    if plan.fsck && matches!(ovl.layout, Layout::Nested { .. }) {
        progress("fsck", 0, 1);
        fsck_code = Some(run_e2fsck(&root, "-p")?);
        progress("fsck", 1, 1);
    }
    failpoint(plan, "fsck")?;

    progress("build", 0, 1);
    match &ovl.layout {
        Layout::Erofs { mkfs_args, .. } => {
            erofs::build(&tree, built, mkfs_args).map_err(OvlError::from)?
        }
        _ => squash::build(&tree, built, &plan.mksquashfs_args)?,
    }
    Ok((applied, root, fsck_code))
}

/// Runs the OverlayFS steps of a plan up to the built image, then the shared
/// stage/verify/swap/reset steps.
pub(crate) fn run_steps(
    plan: &MergePlan,
    ovl: &OvlPlan,
    work: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<MergeReport, MergeError> {
    if let Layout::Erofs {
        xattrs_lost: true, ..
    } = &ovl.layout
        && !plan.allow_xattr_loss
    {
        return Err(OvlError::Erofs(ErofsError::NoXattrExtract {
            version: erofs::fsck_version(),
        })
        .into());
    }
    fs::create_dir_all(work).map_err(io_at(work))?;
    if let Some(dir) = &ovl.overlay_dir {
        // The merge reads a fresh copy; the directory is emptied once the new image
        // is in place (a stop before that leaves the old upper over the new image,
        // which shows the same tree).
        let img = work.join("overlay-dir.img");
        image_from_dir(dir, &img)?;
        let mut inner_ovl = ovl.clone();
        inner_ovl.overlay_dir = None;
        let mut inner = plan.clone();
        inner.overlay_at = Located::plain(&img)?;
        inner.ovl = Some(inner_ovl.clone());
        let mut report = run_steps(&inner, &inner_ovl, work, progress)?;
        empty_overlay_dir(dir)?;
        report.overlay_reset = true;
        return Ok(report);
    }
    let stage = work.join("upper");
    progress("extract", 0, plan.root_image_bytes);
    let dbg = overlay_debugfs(&plan.overlay_at, work)?;
    let mut upper = walk_upper(&dbg, work)?;
    read_upper_details(&dbg, &mut upper, &stage)?;
    let total = upper.entries.len() as u64;
    let built = work.join("squashfs.img");
    let (applied, root, fsck_code) = if ovl.layout == Layout::Flat {
        flat_steps(plan, ovl, work, &upper, &built, progress)?
    } else if matches!(ovl.layout, Layout::Erofs { .. }) && !nix::unistd::geteuid().is_root() {
        fakeroot_steps(plan, ovl, work, &upper, &built, progress)?
    } else {
        tree_steps(plan, ovl, work, &upper, &built, progress)?
    };
    let _ = fs::remove_dir_all(&stage);
    // Built before anything on the stick changes, so the reset cannot fail for
    // want of mke2fs after the swap.
    let fresh = build_fresh_overlay(work, plan.overlay_at.len(), ovl.overlay_info.as_ref())?;
    progress("build", 1, 1);
    failpoint(plan, "build")?;

    let new_len = fs::metadata(&built).map_err(io_at(&built))?.len();
    let mut report = MergeReport {
        exceptions_applied: total,
        fsck_exit_code: fsck_code,
        fsck_chunks_folded: 0,
        old_squashfs_bytes: plan.squashfs_bytes,
        new_squashfs_bytes: new_len,
        new_squashfs_sha256: String::new(),
        swap: None,
        overlay_reset: false,
        repaired: Vec::new(),
        overlayfs: Some(applied),
    };
    replace_in_place(
        plan,
        &built,
        &root,
        &[],
        Some(&fresh),
        &mut report,
        progress,
    )?;
    Ok(report)
}
