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
use super::located::{Ext4Place, Located, StickPlace, check_space, staged_path};
use super::overlayfs::error::OvlError;
use crate::disk::ext4::Ext4Info;
use crate::persist::erofs::{self, ErofsInfo};
use crate::persist::overlay::store::{UPPER_DIR, WORK_DIR};
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
    /// Set for a merge on a stick's ext4 live partition (`stick` is `None` then):
    /// the JSON names the place through `target_dir` and the paths.
    #[serde(skip)]
    pub ext4: Option<Ext4Place>,
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
    /// On a stick: stages the stick's manifest for the new root image, so that it is
    /// swapped in with the image (`located::StageCompanion`); set by the command,
    /// since the manifest lives above this layer.
    #[serde(skip)]
    pub stage_companion: Option<super::located::StageCompanion>,
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
    pub tar2sqfs_args: Vec<String>,
    /// A directory overlay (on an ext4 stick): it is read through an ext4 copy made
    /// with `mke2fs -d`, and emptied after the swap (`null` for an overlay file).
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
    match (&facts.place.stick, &facts.place.ext4) {
        (Some(s), _) => format!("{}.new", s.squashfs),
        (None, Some(e)) => format!("{}.new", e.squashfs),
        (None, None) => staged_path(&facts.place.squashfs).display().to_string(),
    }
}

/// How the staged image takes the old one's name on a stick.
fn swap_step(facts: &MergeFacts, staged: &str) -> String {
    if facts.place.ext4.is_some() {
        format!(
            "exchange the inodes of {staged} and squashfs.img in their directory block (one block write), free the old image"
        )
    } else {
        format!(
            "swap the directory entries of {staged} and squashfs.img (one sector write), remove the old image"
        )
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
    let on_stick = place.stick.is_some() || place.ext4.is_some();
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
            swap_step(facts, &staged)
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
        ext4: place.ext4.clone(),
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
        stage_companion: None,
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
    let on_stick = place.stick.is_some() || place.ext4.is_some();
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
            swap_step(facts, &staged)
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
        ext4: place.ext4.clone(),
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
        stage_companion: None,
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

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;
    use crate::persist::merge::facts::{ErofsDetails, Place, RootImage, ToolsFound, UpperFacts};
    use crate::persist::snapshot::CowWriter;
    use crate::squash::Compressor;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    const SQ_BYTES: u64 = 800 * MIB;
    const ROOT_BYTES: u64 = 2 * GIB;

    fn file(path: &str, len: u64) -> Located {
        Located {
            device: PathBuf::from(path),
            extents: vec![(0, len)],
        }
    }

    fn bare_place(overlay_bytes: u64) -> Place {
        Place {
            squashfs: PathBuf::from("/media/LiveOS/squashfs.img"),
            squashfs_at: file("/media/LiveOS/squashfs.img", SQ_BYTES),
            overlay: PathBuf::from("/media/LiveOS/overlay-L-U"),
            overlay_at: file("/media/LiveOS/overlay-L-U", overlay_bytes),
            stick: None,
            target_dir: PathBuf::from("/media/LiveOS"),
            target_free: 100 * GIB,
            overlay_dir: None,
            ext4: None,
        }
    }

    /// The same files on a stick image: one run of bytes each, 1 MiB into the device.
    fn stick_place(overlay_bytes: u64) -> Place {
        let at = |off: u64, len: u64| Located {
            device: PathBuf::from("/dev/sdz"),
            extents: vec![(off, len)],
        };
        Place {
            squashfs: PathBuf::from("/dev/sdz:/LiveOS/squashfs.img"),
            squashfs_at: at(MIB, SQ_BYTES),
            overlay: PathBuf::from("/dev/sdz:/LiveOS/overlay-L-U"),
            overlay_at: at(MIB + SQ_BYTES, overlay_bytes),
            stick: Some(StickPlace {
                stick: PathBuf::from("/dev/sdz"),
                partition_start: MIB,
                squashfs: "/LiveOS/squashfs.img".into(),
                overlay: "/LiveOS/overlay-L-U".into(),
                cluster_bytes: 32768,
            }),
            target_dir: PathBuf::from("/dev/sdz:/LiveOS"),
            target_free: 3 * GIB,
            overlay_dir: None,
            ext4: None,
        }
    }

    fn squash_info() -> SquashInfo {
        SquashInfo {
            compressor: Compressor::Xz,
            block_size: 131072,
            bytes_used: SQ_BYTES,
            inodes: 3,
            has_xattrs: false,
            compressor_args: vec!["-Xbcj".into(), "x86".into()],
        }
    }

    fn nested_listing() -> Listing {
        Listing {
            entries: 3,
            file_bytes: ROOT_BYTES,
            root_image: Some(RootImage {
                path: "LiveOS/rootfs.img".into(),
                bytes: ROOT_BYTES,
            }),
            has_usr: false,
        }
    }

    fn flat_listing() -> Listing {
        Listing {
            entries: 40_000,
            file_bytes: 5 * GIB,
            root_image: None,
            has_usr: true,
        }
    }

    const COW_BYTES: u64 = 4 * MIB;

    /// A dm-snapshot store with an exception for each of `chunks` (4 KiB chunks) of an
    /// origin of `origin_bytes`.
    fn store_with(chunks: &[u64], origin_bytes: u64) -> Opened {
        let mut cow = Cursor::new(vec![0u8; COW_BYTES as usize]);
        snapshot::create_new_store(&mut cow, COW_BYTES, 8).unwrap();
        let Opened::Valid(store) = snapshot::open_store(&mut cow, COW_BYTES).unwrap() else {
            panic!("a new store opens as valid")
        };
        let mut w = CowWriter::new(*store, origin_bytes).unwrap();
        let mut origin = Cursor::new(vec![0u8; 4096]);
        for c in chunks {
            w.write_at(&mut origin, &mut cow, c * 4096, &[7u8; 4096])
                .unwrap();
        }
        snapshot::open_store(&mut cow, COW_BYTES).unwrap()
    }

    fn facts(place: Place, overlay: OverlayFacts) -> MergeFacts {
        MergeFacts {
            place,
            workdir: PathBuf::from("/var/tmp"),
            workdir_shares_target_fs: false,
            workdir_free: Some(Ok(50 * GIB)),
            is_root: false,
            tools: ToolsFound::all(),
            failpoint: None,
            overlay,
        }
    }

    fn dm(place: Place, image: ImageFacts, store: Option<Opened>) -> MergeFacts {
        facts(
            place,
            OverlayFacts::Snapshot(Box::new(SnapshotFacts {
                image,
                overlay_bytes: COW_BYTES,
                store,
            })),
        )
    }

    fn dm_nested(place: Place, chunks: &[u64]) -> MergeFacts {
        dm(
            place,
            ImageFacts::Squashfs {
                info: squash_info(),
                listing: Some(nested_listing()),
            },
            Some(store_with(chunks, ROOT_BYTES)),
        )
    }

    fn ovl(place: Place, image: ImageFacts, stash_bytes: Option<u64>) -> MergeFacts {
        facts(
            place,
            OverlayFacts::OverlayFs(Box::new(OvlFacts {
                overlay_bytes: GIB,
                overlay_info: None,
                upper: Some(UpperFacts {
                    entries: 12,
                    file_bytes: 30 * MIB,
                    status: crate::persist::overlay::store::status_report(None, GIB, 12),
                    stash_bytes,
                }),
                image: Some(image),
            })),
        )
    }

    fn erofs_facts(algorithms: &[&'static str], fsck: &[&str], mkfs: &[&str]) -> ErofsFacts {
        ErofsFacts {
            info: ErofsInfo {
                block_size: 4096,
                algorithms: algorithms.to_vec(),
                uuid: "0f0e0d0c-0b0a-0908-0706-050403020100".into(),
                volume_name: "root".into(),
                blocks: 1000,
            },
            fsck_algorithms: fsck.iter().map(|s| s.to_string()).collect(),
            fsck_version: "1.5".into(),
            details: Some(ErofsDetails {
                mkfs_compressors: mkfs.iter().map(|s| s.to_string()).collect(),
                xattr_paths: Ok(1234),
                extract_keeps_xattrs: None,
            }),
        }
    }

    const FSCK: MergeOptions = MergeOptions {
        fsck: true,
        compress: None,
    };

    fn without(mut f: MergeFacts, tool: &Tool) -> MergeFacts {
        f.tools.0.remove(tool.name);
        f
    }

    use crate::tools::Tool;

    #[test]
    fn dm_snapshot_over_a_nested_root_image_on_a_bare_pair() {
        let p = plan(&dm_nested(bare_place(COW_BYTES), &[0, 5, 9]), &FSCK).unwrap();
        assert_eq!(p.root_image, "LiveOS/rootfs.img");
        assert_eq!(p.exceptions, 3);
        assert!(!p.nothing_to_merge && p.fsck && p.ovl.is_none());
        assert_eq!(
            p.mksquashfs_args,
            ["-comp", "xz", "-b", "131072", "-Xbcj", "x86"]
        );
        // Extracted tree + new image (old image + changed chunks).
        assert_eq!(p.workdir_needed_bytes, ROOT_BYTES + SQ_BYTES + 3 * 4096);
        assert_eq!(p.target_needed_bytes, SQ_BYTES + 3 * 4096);
        assert_eq!(p.steps.len(), STEPS.len());
        assert!(p.steps[7].starts_with("rename it over /media/LiveOS/squashfs.img"));
        assert!(p.steps[4].contains("/media/LiveOS/squashfs.img.new"));
        assert!(p.notes.is_empty(), "{:?}", p.notes);
    }

    #[test]
    fn dm_snapshot_on_a_stick_swaps_entries_and_needs_the_old_size_beside_it() {
        let p = plan(&dm_nested(stick_place(COW_BYTES), &[1]), &FSCK).unwrap();
        assert_eq!(p.target_needed_bytes, SQ_BYTES);
        assert!(p.stick.is_some());
        assert!(
            p.steps[7].starts_with("swap the directory entries of /LiveOS/squashfs.img.new"),
            "{}",
            p.steps[7]
        );
    }

    #[test]
    fn a_fragmented_image_on_a_stick_is_copied_and_counted() {
        let mut place = stick_place(COW_BYTES);
        place.squashfs_at.extents = vec![(MIB, SQ_BYTES / 2), (3 * GIB, SQ_BYTES / 2)];
        let p = plan(&dm_nested(place, &[1]), &FSCK).unwrap();
        assert_eq!(
            p.workdir_needed_bytes,
            ROOT_BYTES + SQ_BYTES + 4096 + SQ_BYTES
        );
        assert!(p.notes.iter().any(|n| n.contains("fragmented")));
    }

    #[test]
    fn an_empty_store_is_nothing_to_merge_and_needs_no_room() {
        let mut f = dm_nested(bare_place(COW_BYTES), &[]);
        f.workdir_free = Some(Ok(0));
        if let OverlayFacts::Snapshot(s) = &mut f.overlay {
            s.store = Some(Opened::Uninitialised {
                cow_bytes: COW_BYTES,
            });
        }
        let p = plan(&f, &FSCK).unwrap();
        assert!(p.nothing_to_merge);
        assert_eq!(p.exceptions, 0);
    }

    #[test]
    fn not_enough_room_is_refused_before_anything_is_written() {
        let mut f = dm_nested(bare_place(COW_BYTES), &[2]);
        f.workdir_free = Some(Ok(GIB));
        let e = plan(&f, &FSCK).unwrap_err();
        assert!(
            matches!(
                e,
                MergeError::NoSpace {
                    what: "the extracted image and the new squashfs",
                    ..
                }
            ),
            "{e}"
        );
        // One file system for both: the staged copy counts there too.
        let mut f = dm_nested(bare_place(COW_BYTES), &[2]);
        f.workdir_shares_target_fs = true;
        f.workdir_free = Some(Ok(ROOT_BYTES + SQ_BYTES + 4096));
        let e = plan(&f, &FSCK).unwrap_err();
        assert!(
            matches!(e, MergeError::NoSpace { what, .. } if what.ends_with("and its staged copy")),
            "{e}"
        );
        // Beside the old image on the stick.
        let mut place = stick_place(COW_BYTES);
        place.target_free = SQ_BYTES - 1;
        let e = plan(&dm_nested(place, &[2]), &FSCK).unwrap_err();
        assert!(
            matches!(
                e,
                MergeError::NoSpace {
                    what: "the new image next to the old one",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn the_work_dirs_free_space_error_is_reported_as_read() {
        let mut f = dm_nested(bare_place(COW_BYTES), &[2]);
        f.workdir_free = Some(Err(io::Error::from(io::ErrorKind::NotFound)));
        let e = plan(&f, &FSCK).unwrap_err();
        assert!(
            matches!(&e, MergeError::Io { path, source } if path == Path::new("/var/tmp") && source.kind() == io::ErrorKind::NotFound),
            "{e}"
        );
    }

    #[test]
    fn missing_tools_are_refused_by_name_and_e2fsck_only_with_fsck() {
        let f = without(dm_nested(bare_place(COW_BYTES), &[1]), &tools::MKSQUASHFS);
        let e = plan(&f, &FSCK).unwrap_err();
        assert!(
            matches!(&e, MergeError::ToolMissing(t) if t.name == "mksquashfs"),
            "{e}"
        );
        let f = without(dm_nested(bare_place(COW_BYTES), &[1]), &tools::E2FSCK);
        let e = plan(&f, &FSCK).unwrap_err();
        assert!(
            matches!(&e, MergeError::ToolMissing(t) if t.name == "e2fsck"),
            "{e}"
        );
        let no_fsck = MergeOptions {
            fsck: false,
            compress: None,
        };
        let p = plan(&f, &no_fsck).unwrap();
        assert!(!p.fsck && p.steps[2].contains("--no-fsck"));
    }

    #[test]
    fn dm_snapshot_refuses_roots_it_cannot_sit_on() {
        let e = plan(
            &dm(bare_place(COW_BYTES), ImageFacts::Erofs(None), None),
            &FSCK,
        )
        .unwrap_err();
        assert!(matches!(e, MergeError::Erofs(_)), "{e}");
        let flat = ImageFacts::Squashfs {
            info: squash_info(),
            listing: Some(flat_listing()),
        };
        let e = plan(&dm(bare_place(COW_BYTES), flat, None), &FSCK).unwrap_err();
        assert!(
            matches!(&e, MergeError::NoRootImage { what, .. } if what.contains("flat root")),
            "{e}"
        );
        let e = plan(
            &dm(
                bare_place(COW_BYTES),
                ImageFacts::Other("Unknown".into()),
                None,
            ),
            &FSCK,
        )
        .unwrap_err();
        assert!(
            matches!(&e, MergeError::NoRootImage { what, .. } if what == "Unknown"),
            "{e}"
        );
    }

    #[test]
    fn a_store_is_checked_against_its_origin_the_nested_root_image() {
        // An exception beyond the end of the root image: the overlay belongs to
        // another (bigger) origin, like `overlay merge --origin` with the wrong image.
        let mut f = dm_nested(bare_place(COW_BYTES), &[]);
        if let OverlayFacts::Snapshot(s) = &mut f.overlay {
            s.store = Some(store_with(&[ROOT_BYTES / 4096 + 10], ROOT_BYTES * 2));
        }
        let e = plan(&f, &FSCK).unwrap_err();
        assert!(matches!(e, MergeError::OverlayCorrupt(_)), "{e}");
    }

    #[test]
    fn recompression_replaces_the_stored_options_and_says_so() {
        let o = MergeOptions {
            fsck: true,
            compress: Some(Compressor::Zstd),
        };
        let p = plan(&dm_nested(bare_place(COW_BYTES), &[1]), &o).unwrap();
        assert_eq!(p.mksquashfs_args, ["-comp", "zstd", "-b", "131072"]);
        assert!(
            p.notes
                .iter()
                .any(|n| n == "recompressing with zstd instead of xz")
        );
        // The same compressor: nothing changes.
        let o = MergeOptions {
            fsck: true,
            compress: Some(Compressor::Xz),
        };
        let p = plan(&dm_nested(bare_place(COW_BYTES), &[1]), &o).unwrap();
        assert_eq!(
            p.mksquashfs_args,
            ["-comp", "xz", "-b", "131072", "-Xbcj", "x86"]
        );
    }

    #[test]
    fn failpoint_and_step_names_come_through() {
        let mut f = dm_nested(bare_place(COW_BYTES), &[1]);
        f.failpoint = Some("swap".into());
        let p = plan(&f, &FSCK).unwrap();
        assert!(matches!(
            failpoint(&p, "swap"),
            Err(MergeError::Failpoint("swap"))
        ));
        assert!(failpoint(&p, "stage").is_ok());
    }

    #[test]
    fn overlayfs_over_a_nested_root_image_is_applied_by_debugfs() {
        let image = ImageFacts::Squashfs {
            info: squash_info(),
            listing: Some(nested_listing()),
        };
        let p = plan(&ovl(bare_place(GIB), image, None), &FSCK).unwrap();
        let o = p.ovl.as_ref().unwrap();
        assert_eq!(
            o.layout,
            Layout::Nested {
                root_image: "LiveOS/rootfs.img".into()
            }
        );
        assert!(p.fsck && p.exceptions == 12 && o.tar2sqfs_args.is_empty());
        assert_eq!(
            p.workdir_needed_bytes,
            ROOT_BYTES + 30 * MIB + SQ_BYTES + 30 * MIB
        );
        assert!(p.steps[1].contains("debugfs -w"));
    }

    #[test]
    fn overlayfs_over_a_flat_squashfs_streams_and_needs_only_the_stash() {
        let image = ImageFacts::Squashfs {
            info: squash_info(),
            listing: Some(flat_listing()),
        };
        let p = plan(&ovl(bare_place(GIB), image.clone(), Some(7 * MIB)), &FSCK).unwrap();
        let o = p.ovl.as_ref().unwrap();
        assert_eq!(o.layout, Layout::Flat);
        assert_eq!(o.stash_bytes, 7 * MIB);
        assert!(!p.fsck, "nothing block-based to check");
        assert_eq!(o.tar2sqfs_args[..4], ["-c", "xz", "-b", "131072"]);
        assert_eq!(
            p.workdir_needed_bytes,
            7 * MIB + 30 * MIB + SQ_BYTES + 30 * MIB
        );
        let f = without(ovl(bare_place(GIB), image, Some(0)), &tools::SQFS2TAR);
        let e = plan(&f, &FSCK).unwrap_err();
        assert!(
            matches!(&e, MergeError::ToolMissing(t) if t.name == "sqfs2tar"),
            "{e}"
        );
    }

    #[test]
    fn overlayfs_needs_debugfs_first() {
        let image = ImageFacts::Other("Unknown".into());
        let f = without(ovl(bare_place(GIB), image.clone(), None), &tools::DEBUGFS);
        let e = plan(&f, &FSCK).unwrap_err();
        assert!(
            matches!(&e, MergeError::ToolMissing(t) if t.name == "debugfs"),
            "{e}"
        );
        let e = plan(&ovl(bare_place(GIB), image, None), &FSCK).unwrap_err();
        assert!(matches!(e, MergeError::NoRootImage { .. }), "{e}");
    }

    #[test]
    fn erofs_compressed_with_lzma_is_refused_when_fsck_erofs_cannot_read_it() {
        let image = ImageFacts::Erofs(Some(erofs_facts(
            &["lz4", "lzma"],
            &["lz4hc", "lz4"],
            &["lz4hc", "lz4"],
        )));
        let e = plan(&ovl(bare_place(GIB), image, None), &FSCK).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("lzma") && text.contains("1.5") && text.contains("lz4hc, lz4"),
            "{text}"
        );
    }

    #[test]
    fn erofs_is_rebuilt_with_lz4hc_and_under_fakeroot_without_root() {
        let image = ImageFacts::Erofs(Some(erofs_facts(&["lz4"], &["lz4"], &["lz4hc", "lz4"])));
        let p = plan(&ovl(bare_place(GIB), image.clone(), None), &FSCK).unwrap();
        let Some(OvlPlan {
            layout:
                Layout::Erofs {
                    mkfs_args,
                    xattrs_lost,
                    ..
                },
            ..
        }) = &p.ovl
        else {
            panic!("an EROFS layout: {:?}", p.ovl)
        };
        assert!(mkfs_args.contains(&"-zlz4hc".to_string()), "{mkfs_args:?}");
        assert!(!xattrs_lost && !p.fsck && p.squash.is_none());
        assert_eq!(p.root_image_bytes, 3 * SQ_BYTES);
        assert!(p.notes[0].contains("fakeroot"), "{:?}", p.notes);
        assert!(p.notes.iter().any(|n| n.contains("1234 paths")));
        // Without fakeroot and without root: refused by name; as root, not needed.
        let f = without(ovl(bare_place(GIB), image.clone(), None), &tools::FAKEROOT);
        let e = plan(&f, &FSCK).unwrap_err();
        assert!(
            matches!(&e, MergeError::ToolMissing(t) if t.name == "fakeroot"),
            "{e}"
        );
        let mut f = without(ovl(bare_place(GIB), image, None), &tools::FAKEROOT);
        f.is_root = true;
        let p = plan(&f, &FSCK).unwrap();
        assert!(!p.notes.iter().any(|n| n.contains("fakeroot")));
    }

    #[test]
    fn an_algorithm_mkfs_erofs_cannot_write_falls_back_to_lz4hc_and_says_so() {
        let image = ImageFacts::Erofs(Some(erofs_facts(
            &["lzma"],
            &["lz4", "lzma"],
            &["lz4hc", "lz4"],
        )));
        let p = plan(&ovl(bare_place(GIB), image, None), &FSCK).unwrap();
        assert!(p.mksquashfs_args.contains(&"-zlz4hc".to_string()));
        assert!(
            p.notes
                .iter()
                .any(|n| n.contains("lzma") && n.contains("uses lz4hc")),
            "{:?}",
            p.notes
        );
    }

    #[test]
    fn erofs_xattrs_that_cannot_be_kept_are_marked_lost() {
        let mut f = erofs_facts(&[], &["lz4"], &["lz4"]);
        if let Some(d) = f.details.as_mut() {
            d.xattr_paths = Err("long xattr name prefixes".into());
            d.extract_keeps_xattrs = Some(false);
        }
        let p = plan(
            &ovl(bare_place(GIB), ImageFacts::Erofs(Some(f)), None),
            &FSCK,
        )
        .unwrap();
        assert!(matches!(
            p.ovl.as_ref().map(|o| &o.layout),
            Some(Layout::Erofs {
                xattrs_lost: true,
                ..
            })
        ));
        assert!(
            p.notes
                .iter()
                .any(|n| n.contains("refused unless --allow-xattr-loss"))
        );
    }

    #[test]
    fn a_directory_overlay_is_read_through_a_copy_and_emptied() {
        let mut place = bare_place(GIB);
        place.overlay_dir = Some(PathBuf::from("/run/initramfs/live/LiveOS/overlay-L-U"));
        let image = ImageFacts::Squashfs {
            info: squash_info(),
            listing: Some(nested_listing()),
        };
        let p = plan(&ovl(place, image, None), &FSCK).unwrap();
        assert!(p.steps[0].starts_with("copy the directory overlay"));
        assert_eq!(p.steps.len(), STEPS.len() + 1);
        assert!(
            p.steps
                .last()
                .unwrap()
                .starts_with("empty /run/initramfs/live/LiveOS/overlay-L-U/overlayfs")
        );
        assert_eq!(
            p.ovl.as_ref().and_then(|o| o.overlay_dir.as_deref()),
            Some(Path::new("/run/initramfs/live/LiveOS/overlay-L-U"))
        );
        assert_eq!(
            p.overlay,
            Path::new("/run/initramfs/live/LiveOS/overlay-L-U")
        );
    }
}
