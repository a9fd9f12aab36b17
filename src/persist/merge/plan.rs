//! The plan of a merge, computed from [`MergeFacts`] alone: which layout and tools,
//! how much room in the work dir and beside the old image, the mksquashfs/tar2sqfs/
//! mkfs.erofs arguments, notes and steps, or the refusal. No I/O: every check on the
//! user's input and the system happens here, from facts [`super::inspect`] read.

use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::error::MergeError;
use super::facts::{
    ErofsFacts, ImageFacts, Listing, MergeFacts, OverlayFacts, OvlFacts, SnapshotFacts,
};
use super::located::{Located, StickPlace, check_space, staged_path};
use super::overlayfs::error::{OvlError, UPPER_DIR, WORK_DIR};
use crate::disk::ext4::Ext4Info;
use crate::persist::erofs::{self, ErofsInfo};
use crate::persist::snapshot::{self, LIVEOS_CHUNK_SECTORS, Opened, StatusReport};
use crate::squash::{self, Compressor, SquashInfo};
use crate::tools;

/// The steps of a merge, in order; also the names `LIVESTICK_FAILPOINT` accepts.
pub const STEPS: [&str; 9] = [
    "extract", "apply", "fsck", "build", "stage", "verify", "fold", "swap", "reset",
];

/// What the user asked for beyond where the files are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeOptions {
    /// e2fsck the merged root image (`--no-fsck` turns it off).
    pub fsck: bool,
    /// Recompress a squashfs with another compressor.
    pub compress: Option<Compressor>,
}

/// Everything a merge will do, computed without changing anything.
#[derive(Debug, Clone, Serialize)]
pub struct MergePlan {
    /// What to call the image in messages (a path, or `STICK:/LiveOS/squashfs.img`).
    pub squashfs: PathBuf,
    pub squashfs_at: Located,
    pub squashfs_bytes: u64,
    /// The squashfs superblock (`None` for an EROFS image).
    pub squash: Option<SquashInfo>,
    /// `LiveOS/rootfs.img`, or `/` when the image is the root tree itself.
    pub root_image: String,
    pub root_image_bytes: u64,
    pub overlay: PathBuf,
    pub overlay_at: Located,
    pub overlay_status: StatusReport,
    pub exceptions: u64,
    /// Set for a merge on a stick; `None` for a pair of plain files.
    pub stick: Option<StickPlace>,
    pub workdir: PathBuf,
    pub workdir_needed_bytes: u64,
    pub workdir_free_bytes: u64,
    pub target_dir: PathBuf,
    pub target_needed_bytes: u64,
    pub target_free_bytes: u64,
    pub mksquashfs_args: Vec<String>,
    pub fsck: bool,
    pub nothing_to_merge: bool,
    pub notes: Vec<String>,
    pub steps: Vec<String>,
    /// Stop with an error right after this step (crash tests); from `LIVESTICK_FAILPOINT`.
    #[serde(skip)]
    pub failpoint: Option<String>,
    /// Set when the overlay is an OverlayFS one (ext4 with overlayfs/ + ovlwork/).
    pub ovl: Option<OvlPlan>,
    /// EROFS: go on even though fsck.erofs cannot extract xattrs (`--allow-xattr-loss`).
    pub allow_xattr_loss: bool,
}

/// How the root file system sits in the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "layout")]
pub enum Layout {
    /// The root tree is the squashfs itself.
    Flat,
    /// The root is `LiveOS/rootfs.img` (ext4) inside the squashfs.
    Nested { root_image: String },
    /// The root tree is an EROFS image (`squashfs.img` in name only).
    Erofs {
        info: ErofsInfo,
        mkfs_args: Vec<String>,
        /// fsck.erofs cannot restore xattrs on extraction.
        xattrs_lost: bool,
    },
}

/// The OverlayFS part of a merge plan.
#[derive(Debug, Clone, Serialize)]
pub struct OvlPlan {
    pub layout: Layout,
    pub upper_entries: u64,
    pub overlay_used_bytes: u64,
    #[serde(skip)]
    pub overlay_info: Option<Ext4Info>,
    /// Flat squashfs: how tar2sqfs rebuilds it (empty for the other layouts).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tar2sqfs_args: Vec<String>,
    /// A directory overlay (on an ext4 stick): it is read through an ext4 copy made
    /// with `mke2fs -d`, and emptied after the swap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overlay_dir: Option<PathBuf>,
    /// Flat squashfs: lower file bytes the upper dir replaces or hides, set aside
    /// while streaming in case a surviving hard link still needs them (at most).
    pub stash_bytes: u64,
}

/// Stops a run right after `step` when the plan says so (crash tests).
pub(crate) fn failpoint(plan: &MergePlan, step: &'static str) -> Result<(), MergeError> {
    if plan.failpoint.as_deref() == Some(step) {
        return Err(MergeError::Failpoint(step));
    }
    Ok(())
}

/// The step boundaries a combined step passes at once (each may be a failpoint).
pub(crate) fn failpoints(plan: &MergePlan, steps: &[&'static str]) -> Result<(), MergeError> {
    steps.iter().try_for_each(|s| failpoint(plan, s))
}

/// Plans a merge from what was inspected: the plan, or why not.
pub fn plan(facts: &MergeFacts, options: &MergeOptions) -> Result<MergePlan, MergeError> {
    let mut plan = match &facts.overlay {
        OverlayFacts::Snapshot(s) => plan_snapshot(facts, s, options)?,
        OverlayFacts::OverlayFs(o) => plan_overlayfs(facts, o, options)?,
    };
    if let Some(dir) = &facts.place.overlay_dir {
        for_dir_overlay(&mut plan, dir);
    }
    Ok(plan)
}

/// The facts a plan needs were not read: the facts were not made by inspection.
fn unread(what: &'static str) -> MergeError {
    MergeError::Unread(what)
}

/// Free bytes in the work dir, or the error reading them gave.
fn workdir_free(facts: &MergeFacts) -> Result<u64, MergeError> {
    match &facts.workdir_free {
        Some(Ok(free)) => Ok(*free),
        Some(Err(e)) => Err(MergeError::Io {
            path: facts.workdir.clone(),
            source: io::Error::new(e.kind(), e.to_string()),
        }),
        None => Err(unread("the work dir's free space")),
    }
}

/// Room for a merge: `workdir_needed` in the work dir and `target_needed` beside the
/// old image. When both are one file system (a pair of plain files, not a stick), the
/// sum must fit there.
fn check_merge_space(
    facts: &MergeFacts,
    [what, what_with_staged]: [&'static str; 2],
    workdir_needed: u64,
    workdir_free: u64,
    target_needed: u64,
) -> Result<(), MergeError> {
    let workdir = &facts.workdir;
    if facts.workdir_shares_target_fs {
        return check_space(
            what_with_staged,
            workdir,
            workdir_needed.saturating_add(target_needed),
            workdir_free,
        );
    }
    check_space(what, workdir, workdir_needed, workdir_free)?;
    check_space(
        "the new image next to the old one",
        &facts.place.target_dir,
        target_needed,
        facts.place.target_free,
    )
}

/// The name the new image is staged under, next to the old one.
fn staged_name(facts: &MergeFacts) -> String {
    match &facts.place.stick {
        Some(s) => format!("{}.new", s.squashfs),
        None => staged_path(&facts.place.squashfs).display().to_string(),
    }
}

/// mksquashfs arguments for `compress` instead of the image's own compressor, and the
/// note that says so; `None` when the image keeps its compressor.
fn recompression(info: &SquashInfo, compress: Option<Compressor>) -> Option<(Vec<String>, String)> {
    let c = compress.filter(|c| *c != info.compressor)?;
    // Options stored for the old compressor do not apply to another one.
    Some((
        vec![
            "-comp".into(),
            c.name().into(),
            "-b".into(),
            info.block_size.to_string(),
        ],
        format!(
            "recompressing with {} instead of {}",
            c.name(),
            info.compressor.name()
        ),
    ))
}

fn plan_snapshot(
    facts: &MergeFacts,
    s: &SnapshotFacts,
    options: &MergeOptions,
) -> Result<MergePlan, MergeError> {
    let place = &facts.place;
    let fsck = options.fsck;
    let squashfs_bytes = place.squashfs_at.len();
    let (info, listing) = match &s.image {
        ImageFacts::Squashfs { info, listing } => (info, listing),
        ImageFacts::Erofs(_) => return Err(MergeError::Erofs(place.squashfs.clone())),
        ImageFacts::Other(what) => {
            return Err(MergeError::NoRootImage {
                squashfs: place.squashfs.clone(),
                what: what.clone(),
            });
        }
    };
    facts.tools.require(&tools::UNSQUASHFS)?;
    facts.tools.require(&tools::MKSQUASHFS)?;
    if fsck {
        facts.tools.require(&tools::E2FSCK)?;
    }
    let listing = listing.as_ref().ok_or(unread("the image's listing"))?;
    let root = listing
        .root_image
        .as_ref()
        .ok_or_else(|| MergeError::NoRootImage {
            squashfs: place.squashfs.clone(),
            what: if listing.has_usr {
                "a flat root file system (OverlayFS persistence)".to_string()
            } else {
                format!("{} entries, none of them a root image", listing.entries)
            },
        })?;
    let extracted_bytes = listing.file_bytes;

    let opened = s.store.as_ref().ok_or(unread("the overlay's store"))?;
    let ov_len = s.overlay_bytes;
    let origin_sectors = root.bytes / snapshot::SECTOR_BYTES;
    let overlay_status =
        snapshot::status_of(opened, ov_len, LIVEOS_CHUNK_SECTORS, Some(origin_sectors));
    let (exceptions, used_bytes) = match opened {
        Opened::Uninitialised { .. } => (0, 0),
        Opened::Invalid { .. } => return Err(MergeError::OverlayInvalid),
        Opened::Valid(store) => {
            store
                .validate(Some(origin_sectors))
                .map_err(MergeError::OverlayCorrupt)?;
            let n = store.exceptions.len() as u64;
            (n, n * store.geometry.chunk_bytes())
        }
    };

    let mut args = info.mksquashfs_args();
    let mut notes = Vec::new();
    if let Some((a, note)) = recompression(info, options.compress) {
        args = a;
        notes.push(note);
    }
    if info.has_xattrs && !facts.is_root {
        notes.push(
            "the squashfs carries xattrs at its top level; without root, unsquashfs cannot restore security.* ones (the root image's own SELinux labels are kept: they live inside it)"
                .to_string(),
        );
    }
    let fragmented = place.squashfs_at.contiguous_at().is_none();
    if fragmented {
        notes.push(
            "squashfs.img is fragmented on the stick: it is copied to the work dir to be read"
                .to_string(),
        );
    }
    // The new image is at most the old one plus the changed data, uncompressed.
    let new_image_estimate = squashfs_bytes.saturating_add(used_bytes);
    let fragmented_copy = if fragmented { squashfs_bytes } else { 0 };
    let workdir_needed = extracted_bytes
        .saturating_add(new_image_estimate)
        .saturating_add(fragmented_copy);
    let workdir_free = workdir_free(facts)?;
    let nothing_to_merge = exceptions == 0;
    let on_stick = place.stick.is_some();
    // On a stick the staged image sits next to the old one until the swap. Its exact
    // size is checked again before it is written; here the old size is the estimate
    // (recompressed images rarely grow by much).
    let target_needed = if on_stick {
        squashfs_bytes
    } else {
        new_image_estimate
    };
    if !nothing_to_merge {
        check_merge_space(
            facts,
            [
                "the extracted image and the new squashfs",
                "the extracted image, the new squashfs and its staged copy",
            ],
            workdir_needed,
            workdir_free,
            target_needed,
        )?;
    }
    let staged = staged_name(facts);
    let steps = vec![
        format!(
            "extract {} ({} bytes) from {} into {}",
            root.path,
            root.bytes,
            place.squashfs.display(),
            facts.workdir.display()
        ),
        format!("apply {exceptions} overlay chunks to it"),
        if fsck {
            "e2fsck -f -p the merged image".to_string()
        } else {
            "skip e2fsck (--no-fsck)".to_string()
        },
        format!("mksquashfs {}", args.join(" ")),
        format!("write {staged}, sync"),
        "read it back and compare sha256".to_string(),
        "write the chunks e2fsck changed into the overlay too (old image + overlay = new image)"
            .to_string(),
        if on_stick {
            format!(
                "swap the directory entries of {staged} and squashfs.img (one sector write), remove the old image"
            )
        } else {
            format!("rename it over {}", place.squashfs.display())
        },
        format!("reset the overlay {}", place.overlay.display()),
    ];
    Ok(MergePlan {
        squashfs: place.squashfs.clone(),
        squashfs_at: place.squashfs_at.clone(),
        squashfs_bytes,
        squash: Some(info.clone()),
        root_image: root.path.clone(),
        root_image_bytes: root.bytes,
        overlay: place.overlay.clone(),
        overlay_at: place.overlay_at.clone(),
        overlay_status,
        exceptions,
        stick: place.stick.clone(),
        workdir: facts.workdir.clone(),
        workdir_needed_bytes: workdir_needed,
        workdir_free_bytes: workdir_free,
        target_dir: place.target_dir.clone(),
        target_needed_bytes: target_needed,
        target_free_bytes: place.target_free,
        mksquashfs_args: args,
        fsck,
        nothing_to_merge,
        notes,
        steps,
        failpoint: facts.failpoint.clone(),
        ovl: None,
        allow_xattr_loss: false,
    })
}

/// What the image facts of an OverlayFS merge give: the squashfs superblock (none for
/// EROFS), the layout, the root image's name, the bytes it unpacks to, the build
/// arguments.
type OvlLayout = (Option<SquashInfo>, Layout, String, u64, Vec<String>);

/// The layout of an EROFS root and the notes it brings.
fn erofs_layout(
    facts: &MergeFacts,
    f: &ErofsFacts,
    notes: &mut Vec<String>,
) -> Result<OvlLayout, MergeError> {
    let place = &facts.place;
    if !facts.is_root {
        notes.push(
            "not root: extract, apply and mkfs.erofs run under fakeroot, which keeps owners, device nodes and xattrs for the new image without privileges".into(),
        );
    }
    erofs::refuse_undecompressible(&f.info, &f.fsck_algorithms, &f.fsck_version)
        .map_err(OvlError::from)?;
    let details = f
        .details
        .as_ref()
        .ok_or(unread("mkfs.erofs' compressors"))?;
    let (mkfs_args, note) = erofs::mkfs_args(&f.info, &details.mkfs_compressors);
    notes.extend(note);
    let keeps = match &details.xattr_paths {
        Ok(paths) => {
            notes.push(format!(
                "xattrs (SELinux labels, capabilities) of {paths} paths are read from the image by livestick and set on the extracted tree"
            ));
            true
        }
        Err(e) => {
            notes.push(format!("livestick cannot read the image's xattrs: {e}"));
            details
                .extract_keeps_xattrs
                .ok_or(unread("whether fsck.erofs keeps xattrs"))?
        }
    };
    if !keeps {
        notes.push(format!(
            "fsck.erofs {} does not restore xattrs on extraction: SELinux labels and capabilities of the image would be lost (refused unless --allow-xattr-loss)",
            f.fsck_version
        ));
    }
    // The unpacked size is not in the superblock; EROFS images of root file
    // systems unpack to about 2-3 times their size.
    let estimate = place.squashfs_at.len().saturating_mul(3);
    notes.push(format!(
        "EROFS: {} ({}); the unpacked size is estimated at 3x the image",
        if f.info.algorithms.is_empty() {
            "uncompressed".to_string()
        } else {
            f.info.algorithms.join("+")
        },
        mkfs_args.join(" ")
    ));
    Ok((
        None,
        Layout::Erofs {
            info: f.info.clone(),
            mkfs_args: mkfs_args.clone(),
            xattrs_lost: !keeps,
        },
        "/".to_string(),
        estimate,
        mkfs_args,
    ))
}

/// The layout of a squashfs root (nested root image or flat tree).
fn squashfs_layout(
    facts: &MergeFacts,
    sq: &SquashInfo,
    listing: Option<&Listing>,
    stash_bytes: Option<u64>,
    fsck: bool,
) -> Result<(OvlLayout, u64), MergeError> {
    facts.tools.require(&tools::UNSQUASHFS)?;
    facts.tools.require(&tools::MKSQUASHFS)?;
    let listing = listing.ok_or(unread("the image's listing"))?;
    let args = sq.mksquashfs_args();
    match &listing.root_image {
        Some(root) => {
            if fsck {
                facts.tools.require(&tools::E2FSCK)?;
            }
            Ok((
                (
                    Some(sq.clone()),
                    Layout::Nested {
                        root_image: root.path.clone(),
                    },
                    root.path.clone(),
                    listing.file_bytes,
                    args,
                ),
                0,
            ))
        }
        None => {
            // Streamed through tar: no tree on the host, so no root needed.
            facts.tools.require(&tools::SQFS2TAR)?;
            facts.tools.require(&tools::TAR2SQFS)?;
            let stash = stash_bytes.ok_or(unread("what the upper dir hides"))?;
            Ok((
                (
                    Some(sq.clone()),
                    Layout::Flat,
                    "/".to_string(),
                    listing.file_bytes,
                    args,
                ),
                stash,
            ))
        }
    }
}

fn plan_overlayfs(
    facts: &MergeFacts,
    o: &OvlFacts,
    options: &MergeOptions,
) -> Result<MergePlan, MergeError> {
    let place = &facts.place;
    let fsck = options.fsck;
    let compress = options.compress;
    facts.tools.require(&tools::DEBUGFS)?;
    let upper = o.upper.as_ref().ok_or(unread("the upper dir"))?;
    let image = o.image.as_ref().ok_or(unread("the image's kind"))?;
    let entries = upper.entries;
    let upper_bytes = upper.file_bytes;
    let mut notes = Vec::new();
    let ((squash_info, layout, root_image, root_bytes, mut args), stash_bytes) = match image {
        ImageFacts::Squashfs { info, listing } => {
            squashfs_layout(facts, info, listing.as_ref(), upper.stash_bytes, fsck)?
        }
        ImageFacts::Erofs(f) => {
            facts.tools.require(&tools::FSCK_EROFS)?;
            facts.tools.require(&tools::MKFS_EROFS)?;
            if !facts.is_root {
                facts.tools.require(&tools::FAKEROOT)?;
            }
            let f = f.as_ref().ok_or(unread("the EROFS image"))?;
            (erofs_layout(facts, f, &mut notes)?, 0)
        }
        ImageFacts::Other(what) => {
            return Err(MergeError::NoRootImage {
                squashfs: place.squashfs.clone(),
                what: what.clone(),
            });
        }
    };
    let tar2sqfs_args = match (&layout, &squash_info) {
        (Layout::Flat, Some(sq)) => match compress {
            Some(c) if c != sq.compressor => squash::tar2sqfs_args(c, sq.block_size, &[]),
            _ => sq.tar2sqfs_args(),
        },
        _ => Vec::new(),
    };
    match &squash_info {
        Some(sq) => {
            if let Some((a, note)) = recompression(sq, compress) {
                args = a;
                notes.push(note);
            }
        }
        None if compress.is_some() => notes.push(
            "--compress applies to squashfs; the EROFS image keeps its own compression".into(),
        ),
        None => {}
    }
    if place.squashfs_at.contiguous_at().is_none() {
        notes.push(
            "squashfs.img is fragmented on the stick: it is copied to the work dir to be read"
                .to_string(),
        );
    } else if layout == Layout::Flat && place.squashfs_at.contiguous_at() != Some(0) {
        notes.push(
            "squashfs.img is copied to the work dir first: sqfs2tar reads whole files only"
                .to_string(),
        );
    }
    if place.overlay_at.contiguous_at().is_none() {
        notes.push(
            "the overlay is fragmented on the stick: it is copied to the work dir to be read"
                .to_string(),
        );
    }
    let squashfs_bytes = place.squashfs_at.len();
    let new_image_estimate = squashfs_bytes.saturating_add(upper_bytes);
    let copies = match layout {
        Layout::Erofs { .. } => squashfs_bytes,
        Layout::Flat if place.squashfs_at.contiguous_at() != Some(0) => squashfs_bytes,
        _ if place.squashfs_at.contiguous_at().is_none() => squashfs_bytes,
        _ => 0,
    };
    // The flat merge streams: no extracted tree, only what the stash may hold.
    let unpacked = if layout == Layout::Flat {
        stash_bytes
    } else {
        root_bytes
    };
    let info = o.overlay_info.as_ref();
    let overlay_copy = if place.overlay_at.contiguous_at().is_none() {
        info.map_or(o.overlay_bytes, |i| i.used_bytes)
    } else {
        0
    };
    let workdir_needed = unpacked
        .saturating_add(upper_bytes)
        .saturating_add(new_image_estimate)
        .saturating_add(copies)
        .saturating_add(overlay_copy);
    let workdir_free = workdir_free(facts)?;
    let nothing_to_merge = entries == 0;
    let on_stick = place.stick.is_some();
    let target_needed = if on_stick {
        squashfs_bytes
    } else {
        new_image_estimate
    };
    if !nothing_to_merge {
        check_merge_space(
            facts,
            [
                "the extracted root, the upper dir and the new image",
                "the extracted root, the upper dir, the new image and its staged copy",
            ],
            workdir_needed,
            workdir_free,
            target_needed,
        )?;
    }
    let staged = staged_name(facts);
    let (extract_step, apply_step, build_step) = match &layout {
        Layout::Flat => (
            "read the upper dir out of the overlay (debugfs)".to_string(),
            format!(
                "stream {} through sqfs2tar and apply {entries} upper-dir entries to the stream (owners, devices and xattrs travel in the tar headers: no root needed)",
                place.squashfs.display()
            ),
            format!("tar2sqfs {}", tar2sqfs_args.join(" ")),
        ),
        Layout::Nested { root_image } => (
            format!("read the upper dir out of the overlay (debugfs) and extract {root_image}"),
            format!("apply {entries} upper-dir entries inside {root_image} (debugfs -w)"),
            format!("mksquashfs {}", args.join(" ")),
        ),
        Layout::Erofs { mkfs_args, .. } => (
            "read the upper dir out of the overlay (debugfs) and extract the EROFS image (fsck.erofs --extract)".to_string(),
            format!("apply {entries} upper-dir entries to the root tree"),
            format!("mkfs.erofs {}", mkfs_args.join(" ")),
        ),
    };
    let steps = vec![
        extract_step,
        apply_step,
        if fsck && matches!(layout, Layout::Nested { .. }) {
            "e2fsck -f -p the merged root image".to_string()
        } else {
            "no e2fsck (nothing block-based to check)".to_string()
        },
        format!("{build_step}; build the empty overlay file system"),
        format!("write {staged}, sync"),
        "read it back and compare sha256".to_string(),
        "nothing to fold (OverlayFS works on files: the old overlay over the new image shows the same tree)".to_string(),
        if on_stick {
            format!(
                "swap the directory entries of {staged} and squashfs.img (one sector write), remove the old image"
            )
        } else {
            format!("rename it over {}", place.squashfs.display())
        },
        format!(
            "reset the overlay {} (a new empty ext4 with overlayfs/ and ovlwork/)",
            place.overlay.display()
        ),
    ];
    let used = info.map_or(0, |i| i.used_bytes);
    Ok(MergePlan {
        squashfs: place.squashfs.clone(),
        squashfs_at: place.squashfs_at.clone(),
        squashfs_bytes,
        squash: squash_info,
        root_image,
        root_image_bytes: root_bytes,
        overlay: place.overlay.clone(),
        overlay_at: place.overlay_at.clone(),
        overlay_status: upper.status.clone(),
        exceptions: entries,
        stick: place.stick.clone(),
        workdir: facts.workdir.clone(),
        workdir_needed_bytes: workdir_needed,
        workdir_free_bytes: workdir_free,
        target_dir: place.target_dir.clone(),
        target_needed_bytes: target_needed,
        target_free_bytes: place.target_free,
        mksquashfs_args: args,
        fsck: fsck && matches!(layout, Layout::Nested { .. }),
        nothing_to_merge,
        notes,
        steps,
        failpoint: facts.failpoint.clone(),
        ovl: Some(OvlPlan {
            layout,
            upper_entries: entries,
            overlay_used_bytes: used,
            overlay_info: o.overlay_info.clone(),
            tar2sqfs_args,
            stash_bytes,
            overlay_dir: None,
        }),
        allow_xattr_loss: false,
    })
}

/// Marks a plan made through an ext4 copy of a directory overlay as one for the
/// directory.
fn for_dir_overlay(plan: &mut MergePlan, dir: &Path) {
    plan.overlay = dir.to_path_buf();
    if let Some(ovl) = plan.ovl.as_mut() {
        ovl.overlay_dir = Some(dir.to_path_buf());
    }
    plan.steps.insert(
        0,
        format!(
            "copy the directory overlay {} into an ext4 image in the work dir (mke2fs -d)",
            dir.display()
        ),
    );
    if let Some(last) = plan.steps.last_mut() {
        *last = format!(
            "empty {}/{UPPER_DIR} and {}/{WORK_DIR}",
            dir.display(),
            dir.display()
        );
    }
}
