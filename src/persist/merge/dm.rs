//! The dm-snapshot merge: the root image extracted, the overlay's exceptions applied
//! to it, e2fsck, mksquashfs; then [`super::replace`]. Also `recover --repair`'s view
//! (origin + overlay) checked by e2fsck, its repairs folded in ([`super::fold`]).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::error::{MergeError, io_at};
use super::ext4_replace::replace_in_place;
use super::fold::fold_chunks;
use super::located::{Located, check_space, free_bytes, with_readable_squashfs};
use super::plan::{MergePlan, failpoint};
use super::replace::MergeReport;
use crate::io::SyncData;
use crate::persist::snapshot::{self, LIVEOS_CHUNK_SECTORS, Opened};
use crate::persist::workdir::{changed_chunks, chunk_fingerprints};
use crate::squash::{self, ImageKind, SquashError};
use crate::tools::{self, find_program};

use crate::layout::ROOT_IMAGES;

/// Runs `e2fsck -f <mode>` on an image: Ok(exit code) when it is clean or was fixed.
pub fn run_e2fsck(image: &Path, mode: &str) -> Result<i32, MergeError> {
    // 1 = errors corrected, 2 = corrected and "reboot" (meaningless for an image).
    match squash::run_tool(
        tools::E2FSCK,
        &["-f".as_ref(), mode.as_ref(), image.as_os_str()],
        &[1, 2],
    ) {
        Ok((code, _)) => Ok(code),
        Err(SquashError::ToolFailed { status, stderr, .. }) => {
            let code = status
                .rsplit(' ')
                .next()
                .and_then(|c| c.parse().ok())
                .unwrap_or(-1);
            Err(MergeError::FsckFailed {
                code,
                output: stderr,
            })
        }
        Err(e) => Err(e.into()),
    }
}

pub(super) fn run_steps(
    plan: &MergePlan,
    work: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<MergeReport, MergeError> {
    fs::create_dir_all(work).map_err(io_at(work))?;
    let tree = work.join("tree");
    progress("extract", 0, plan.root_image_bytes);
    with_readable_squashfs(&plan.squashfs_at, work, |p, off| {
        Ok(squash::extract_at(p, off, &tree, &[])?)
    })?;
    progress("extract", plan.root_image_bytes, plan.root_image_bytes);
    failpoint(plan, "extract")?;

    let root = tree.join(&plan.root_image);
    let mut origin = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&root)
        .map_err(io_at(&root))?;
    let origin_bytes = origin.metadata().map_err(io_at(&root))?.len();
    let mut ov = plan.overlay_at.open(false)?;
    let ov_len = ov.len();
    let (applied, chunk_bytes) = match snapshot::open_store(&mut ov, ov_len)? {
        Opened::Valid(store) => (
            snapshot::apply_exceptions(&mut ov, &store, &mut origin, origin_bytes, &mut |d, t| {
                progress("apply", d, t)
            })?,
            store.geometry.chunk_bytes(),
        ),
        Opened::Uninitialised { .. } => (0, u64::from(LIVEOS_CHUNK_SECTORS) * 512),
        Opened::Invalid { .. } => return Err(MergeError::OverlayInvalid),
    };
    drop(origin);
    drop(ov);
    failpoint(plan, "apply")?;

    let mut fsck_code = None;
    let mut fsck_changed = Vec::new();
    if plan.fsck {
        let kind = squash::detect_image_kind(
            &mut File::open(&root).map_err(io_at(&root))?,
            &plan.root_image,
        )?;
        if kind == ImageKind::Ext {
            progress("fsck", 0, 1);
            let before = chunk_fingerprints(&root, chunk_bytes)?;
            fsck_code = Some(run_e2fsck(&root, "-p")?);
            fsck_changed = changed_chunks(&root, chunk_bytes, &before)?;
            progress("fsck", 1, 1);
        }
    }
    failpoint(plan, "fsck")?;

    let built = work.join("squashfs.img");
    progress("build", 0, 1);
    squash::build(&tree, &built, &plan.mksquashfs_args)?;
    progress("build", 1, 1);
    failpoint(plan, "build")?;

    let new_len = fs::metadata(&built).map_err(io_at(&built))?.len();
    let mut report = MergeReport {
        exceptions_applied: applied,
        fsck_exit_code: fsck_code,
        fsck_chunks_folded: 0,
        old_squashfs_bytes: plan.squashfs_bytes,
        new_squashfs_bytes: new_len,
        new_squashfs_sha256: String::new(),
        swap: None,
        overlay_reset: false,
        repaired: Vec::new(),
        overlayfs: None,
    };
    replace_in_place(
        plan,
        &built,
        &root,
        &fsck_changed,
        None,
        &mut report,
        progress,
    )?;
    Ok(report)
}

/// What [`repair_view`] did.
#[derive(Debug, Clone, Serialize)]
pub struct RepairReport {
    pub fsck_exit_code: i32,
    pub chunks_changed: u64,
    pub chunks_folded: u64,
    pub fsck_output: String,
}

/// `e2fsck -f -y` on the snapshot view (origin + overlay, built in `workdir`), then the
/// chunks it changed are written into the overlay as new or updated exceptions, so the
/// live system sees the repaired file system on its next boot. The origin is not changed.
pub fn repair_view<C>(
    origin: &Path,
    cow: &mut C,
    cow_bytes: u64,
    workdir: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<RepairReport, MergeError>
where
    C: Read + Write + Seek + SyncData,
{
    find_program(&tools::E2FSCK)?;
    let origin_bytes = fs::metadata(origin).map_err(io_at(origin))?.len();
    check_space(
        "the file system seen through the overlay",
        workdir,
        origin_bytes,
        free_bytes(workdir)?,
    )?;
    let store = match snapshot::open_store(cow, cow_bytes)? {
        Opened::Valid(s) => s,
        Opened::Invalid { .. } => return Err(MergeError::OverlayInvalid),
        Opened::Uninitialised { .. } => {
            return Ok(RepairReport {
                fsck_exit_code: 0,
                chunks_changed: 0,
                chunks_folded: 0,
                fsck_output: "the overlay is empty: nothing to repair in it".into(),
            });
        }
    };
    let view = workdir.join(format!("livestick-view-{}.img", std::process::id()));
    let result = (|| {
        {
            let mut o = File::open(origin).map_err(io_at(origin))?;
            let mut w =
                io::BufWriter::with_capacity(4 << 20, File::create(&view).map_err(io_at(&view))?);
            snapshot::write_view(&mut o, origin_bytes, cow, &store, &mut w, &mut |d, t| {
                progress("view", d, t)
            })?;
            w.flush().map_err(io_at(&view))?;
        }
        let chunk_bytes = store.geometry.chunk_bytes();
        let before = chunk_fingerprints(&view, chunk_bytes)?;
        progress("fsck", 0, 1);
        // -y fixes everything it can; exit 4 (errors left) is reported, not fatal:
        // what it did fix is still worth keeping.
        let (code, output) = match squash::run_tool(
            tools::E2FSCK,
            &["-f".as_ref(), "-y".as_ref(), view.as_os_str()],
            &[1, 2, 4],
        ) {
            Ok(r) => r,
            Err(SquashError::ToolFailed { status, stderr, .. }) => {
                return Err(MergeError::FsckFailed {
                    code: status
                        .rsplit(' ')
                        .next()
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(-1),
                    output: stderr,
                });
            }
            Err(e) => return Err(e.into()),
        };
        progress("fsck", 1, 1);
        let changed = changed_chunks(&view, chunk_bytes, &before)?;
        let folded = fold_chunks(cow, cow_bytes, &view, &changed, &mut |d, t| {
            progress("fold", d, t)
        })?;
        Ok(RepairReport {
            fsck_exit_code: code,
            chunks_changed: changed.len() as u64,
            chunks_folded: folded,
            fsck_output: output,
        })
    })();
    let _ = fs::remove_file(&view);
    result
}

/// Extracts the root image (`LiveOS/rootfs.img` or `ext3fs.img`) out of a squashfs image
/// read in place, into `dest_dir`; returns its path.
pub fn extract_root_image(
    squashfs_at: &Located,
    what: &Path,
    dest_dir: &Path,
) -> Result<PathBuf, MergeError> {
    let tree = dest_dir.join("root");
    with_readable_squashfs(squashfs_at, dest_dir, |p, off| {
        let listing = squash::list_at(p, off)?;
        let root = ROOT_IMAGES
            .iter()
            .find(|name| listing.iter().any(|e| e.is_file && e.path == **name))
            .ok_or_else(|| MergeError::NoRootImage {
                squashfs: what.to_path_buf(),
                what: format!("{} entries, none of them a root image", listing.len()),
            })?;
        let size = listing
            .iter()
            .find(|e| e.path == *root)
            .map_or(0, |e| e.size);
        check_space("the root image", dest_dir, size, free_bytes(dest_dir)?)?;
        squash::extract_at(p, off, &tree, &[root])?;
        Ok(tree.join(root))
    })
}
