//! Inspection for a merge: every read planning needs (the stick's FAT, the image's
//! superblock and listing, the overlay's store or upper dir through debugfs, erofs-utils'
//! abilities, tool probes, free space), gathered into [`MergeFacts`] in the order the
//! plan checks them. Nothing here decides; [`super::plan::plan`] does.

use std::fs;
use std::path::{Path, PathBuf};

use super::error::{MergeError, io_at};
use super::facts::{
    ErofsDetails, ErofsFacts, ImageFacts, Listing, MergeFacts, OverlayFacts, OvlFacts, Place,
    RootImage, SnapshotFacts, ToolsFound, UpperFacts,
};
use super::located::{Located, StickPlace, free_bytes, stick_extents, with_readable_squashfs};
use super::overlayfs::error::OvlError;
use super::overlayfs::flat::UpperIndex;
use super::overlayfs::upper::{overlay_debugfs, read_upper_meta, walk_upper};
use crate::disk::stick::{Stick, StickError};
use crate::layout::ROOT_IMAGES;
use crate::persist::erofs::{self, xattr as erofs_xattr};
use crate::persist::merge::overlayfs::dir::image_from_dir;
use crate::persist::overlay::store;
use crate::persist::snapshot;
use crate::persist::workdir;
use crate::squash::{self, ImageKind, SquashEntry};
use crate::tools::{self, find_program};

/// A bare pair of files (or a directory overlay), for [`inspect_files`].
pub struct FilesToInspect<'a> {
    pub squashfs: &'a Path,
    pub overlay: &'a Path,
    pub workdir: &'a Path,
    pub fsck: bool,
}

/// A stick, for [`inspect_stick`].
pub struct StickToInspect<'a> {
    pub stick: &'a Path,
    pub live_dir: &'a str,
    /// `/LiveOS/overlay-LABEL-UUID`
    pub overlay: &'a str,
    pub workdir: &'a Path,
    pub fsck: bool,
}

/// Inspects a bare pair of files: `squashfs.img` and its overlay (a file, or a
/// directory overlay, read through an ext4 copy made in the work dir).
pub fn inspect_files(req: &FilesToInspect<'_>) -> Result<MergeFacts, MergeError> {
    let target_dir = req
        .squashfs
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    if req.overlay.is_dir() {
        // Planned on an ext4 copy of it, gone once inspection is done; the merge
        // makes its own copy.
        let scratch = tempfile::Builder::new()
            .prefix("livestick-ovldir-")
            .tempdir_in(req.workdir)
            .map_err(io_at(req.workdir))?;
        let img = scratch.path().join("overlay.img");
        image_from_dir(req.overlay, &img)?;
        let place = Place {
            squashfs: req.squashfs.to_path_buf(),
            squashfs_at: Located::plain(req.squashfs)?,
            overlay: req.overlay.to_path_buf(),
            overlay_at: Located::plain(&img)?,
            stick: None,
            target_free: free_bytes(&target_dir)?,
            target_dir,
            overlay_dir: Some(req.overlay.to_path_buf()),
            ext4: None,
        };
        return inspect_place(place, req.workdir, req.fsck);
    }
    let place = Place {
        squashfs: req.squashfs.to_path_buf(),
        squashfs_at: Located::plain(req.squashfs)?,
        overlay: req.overlay.to_path_buf(),
        overlay_at: Located::plain(req.overlay)?,
        stick: None,
        target_free: free_bytes(&target_dir)?,
        target_dir,
        overlay_dir: None,
        ext4: None,
    };
    inspect_place(place, req.workdir, req.fsck)
}

/// Inspects a stick: its `squashfs.img` and overlay are read in place through their
/// FAT extents.
pub fn inspect_stick(req: &StickToInspect<'_>) -> Result<MergeFacts, MergeError> {
    let mut stick = Stick::open(req.stick, false)?;
    let info = stick.info(req.live_dir)?;
    let squashfs = format!("/{}/squashfs.img", req.live_dir);
    if info.squashfs.is_none() {
        return Err(StickError::NotLive {
            path: req.stick.to_path_buf(),
            live_dir: req.live_dir.to_string(),
        }
        .into());
    }
    let sq_extents = stick_extents(&mut stick, &squashfs)?;
    let ov_extents = stick_extents(&mut stick, req.overlay)?;
    let cluster_bytes = stick.with_fs(|fs| Ok(u64::from(fs.cluster_size())))?;
    let show = |p: &str| PathBuf::from(format!("{}:{p}", req.stick.display()));
    let place = Place {
        squashfs: show(&squashfs),
        squashfs_at: Located {
            device: req.stick.to_path_buf(),
            extents: sq_extents,
        },
        overlay: show(req.overlay),
        overlay_at: Located {
            device: req.stick.to_path_buf(),
            extents: ov_extents,
        },
        stick: Some(StickPlace {
            stick: req.stick.to_path_buf(),
            partition_start: stick.partition.start,
            squashfs,
            overlay: req.overlay.to_string(),
            cluster_bytes,
        }),
        target_dir: show(&format!("/{}", req.live_dir)),
        target_free: info.free_bytes,
        overlay_dir: None,
        ext4: None,
    };
    inspect_place(place, req.workdir, req.fsck)
}

/// A stick with the ext4 live layout, for [`inspect_ext4`].
pub struct Ext4ToInspect<'a> {
    pub stick: &'a Path,
    pub live_dir: &'a str,
    /// `/LiveOS/overlay-LABEL-UUID`, inside the ext4 file system
    pub overlay: &'a str,
    pub workdir: &'a Path,
    pub fsck: bool,
}

/// Inspects a stick whose live directory is on its ext4 partition: squashfs.img
/// is read in place through its extents (every one written: livestick marks a root
/// image's extents written), the overlay through a sparse copy in the work dir of
/// its written extents only, since an unwritten extent reads as zeros through ext4
/// but holds stale bytes on the stick. Refused while the partition's journal needs
/// replaying.
pub fn inspect_ext4(req: &Ext4ToInspect<'_>) -> Result<MergeFacts, MergeError> {
    use crate::disk::ext4_fs;
    let device = req.stick;
    let fail = |what: String| MergeError::Ext4 {
        device: device.to_path_buf(),
        what,
    };
    let mut dev = crate::disk::opened::open_path(device, false).map_err(io_at(device))?;
    let partition = ext4_fs::find_live_partition(&mut dev, req.live_dir)
        .map_err(|e| fail(e.to_string()))?
        .ok_or_else(|| {
            fail(format!(
                "no ext4 partition holds /{}/squashfs.img",
                req.live_dir
            ))
        })?;
    if partition.fs.needs_recovery {
        return Err(fail(format!(
            "ext4 live partition {} was not cleanly unmounted: its journal holds changes not yet written home, which the merge must see. `livestick overlay merge` without --dry-run replays it first; or {}",
            partition.number,
            crate::disk::ext4_live::replay_hint(device, partition.number)
        )));
    }
    let squashfs = format!("/{}/squashfs.img", req.live_dir);
    let bs = partition.fs.block_size;
    let (sq_map, ov_map) = {
        let mut window = crate::io::PartitionWindow::new(&mut dev, partition.start, partition.len);
        let mut map = |path: &str| {
            partition
                .fs
                .file(&mut window, path)
                .map_err(|e| fail(e.to_string()))?
                .ok_or_else(|| fail(format!("no {path} on ext4 partition {}", partition.number)))
        };
        (map(&squashfs)?, map(req.overlay)?)
    };
    if sq_map.has_unwritten() {
        return Err(fail(format!(
            "{squashfs} has unwritten (allocated, never written) blocks, so it cannot be read in place; write the ISO onto the stick again"
        )));
    }
    let sq_extents = sq_map
        .byte_runs(bs, &squashfs)
        .map_err(|e| fail(e.to_string()))?
        .into_iter()
        .map(|(at, len)| (partition.start + at, len))
        .collect();
    let scratch = tempfile::Builder::new()
        .prefix("livestick-ext4-merge-")
        .tempdir_in(req.workdir)
        .map_err(io_at(req.workdir))?;
    let written: u64 = ov_map
        .extents
        .iter()
        .filter(|e| !e.unwritten)
        .map(|e| e.len * bs)
        .sum();
    super::located::check_space(
        "the overlay's written blocks, copied to be read",
        req.workdir,
        written,
        free_bytes(req.workdir)?,
    )?;
    let copy = scratch.path().join("overlay.img");
    copy_written(&mut dev, &partition, &ov_map, &copy)?;
    let show = |p: &str| PathBuf::from(format!("{}:{p}", device.display()));
    let free = (partition.fs.free_blocks * bs).saturating_sub(super::ext4_replace::STAGE_MARGIN);
    let place = Place {
        squashfs: show(&squashfs),
        squashfs_at: Located {
            device: device.to_path_buf(),
            extents: sq_extents,
        },
        overlay: show(req.overlay),
        overlay_at: Located::plain(&copy)?,
        stick: None,
        target_dir: PathBuf::from(format!(
            "{} (ext4 partition {}):/{}",
            device.display(),
            partition.number,
            req.live_dir
        )),
        target_free: free,
        overlay_dir: None,
        ext4: Some(super::located::Ext4Place {
            device: device.to_path_buf(),
            partition,
            live_dir: req.live_dir.to_string(),
            squashfs,
            overlay: req.overlay.to_string(),
            scratch: std::sync::Arc::new(scratch),
        }),
    };
    inspect_place(place, req.workdir, req.fsck)
}

/// Copies the written extents of a file on the ext4 live partition into a sparse
/// file `to` of the file's size: what ext4 reads, without reading (or writing) the
/// unwritten blocks at all.
fn copy_written(
    dev: &mut fs::File,
    partition: &crate::disk::ext4_fs::LivePartition,
    map: &crate::disk::ext4_fs::FileMap,
    to: &Path,
) -> Result<(), MergeError> {
    use std::io::{Seek, SeekFrom, Write};
    let bs = partition.fs.block_size;
    let mut out = fs::File::create(to).map_err(io_at(to))?;
    let mut buf = vec![0u8; 1 << 20];
    for e in map.extents.iter().filter(|e| !e.unwritten) {
        let start = e.logical * bs;
        if start >= map.size {
            continue;
        }
        let len = (e.len * bs).min(map.size - start);
        let from = partition.start + e.physical * bs;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            dev.seek(SeekFrom::Start(from + done))
                .and_then(|_| std::io::Read::read_exact(dev, &mut buf[..n]))
                .map_err(io_at(to))?;
            out.seek(SeekFrom::Start(start + done))
                .and_then(|_| out.write_all(&buf[..n]))
                .map_err(io_at(to))?;
            done += n as u64;
        }
    }
    out.set_len(map.size).map_err(io_at(to))?;
    out.sync_all().map_err(io_at(to))?;
    Ok(())
}

/// Which of [`ToolsFound::CANDIDATES`] are installed.
pub fn probe_tools() -> ToolsFound {
    ToolsFound(
        ToolsFound::CANDIDATES
            .iter()
            .filter(|t| find_program(t).is_ok())
            .map(|t| t.name)
            .collect(),
    )
}

fn same_fs(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    matches!((fs::metadata(a), fs::metadata(b)), (Ok(x), Ok(y)) if x.dev() == y.dev())
}

fn inspect_place(place: Place, workdir: &Path, fsck: bool) -> Result<MergeFacts, MergeError> {
    let tools = probe_tools();
    let is_root = nix::unistd::geteuid().is_root();
    let (overlay, complete) = if store::is_ext4(&mut place.overlay_at.open(false)?) {
        let (f, complete) = inspect_overlayfs(&place, workdir, &tools, is_root)?;
        (OverlayFacts::OverlayFs(Box::new(f)), complete)
    } else {
        let (f, complete) = inspect_snapshot(&place, workdir, &tools, fsck)?;
        (OverlayFacts::Snapshot(Box::new(f)), complete)
    };
    Ok(MergeFacts {
        workdir_shares_target_fs: place.stick.is_none()
            && place.ext4.is_none()
            && same_fs(workdir, &place.target_dir),
        workdir_free: complete.then(|| workdir::free_bytes(workdir)),
        place,
        workdir: workdir.to_path_buf(),
        is_root,
        tools,
        failpoint: std::env::var("LIVESTICK_FAILPOINT").ok(),
        overlay,
    })
}

/// The listing of `squashfs.img` summed up (see [`Listing`]).
pub fn summarise(entries: &[SquashEntry]) -> Listing {
    Listing {
        entries: entries.len() as u64,
        file_bytes: entries.iter().filter(|e| e.is_file).map(|e| e.size).sum(),
        root_image: ROOT_IMAGES
            .iter()
            .find_map(|name| entries.iter().find(|e| e.is_file && e.path == *name))
            .map(|e| RootImage {
                path: e.path.clone(),
                bytes: e.size,
            }),
        has_usr: entries
            .iter()
            .any(|e| e.path == "usr" || e.path.starts_with("usr/")),
    }
}

fn list_image(at: &Located, workdir: &Path) -> Result<Vec<SquashEntry>, MergeError> {
    with_readable_squashfs(at, workdir, |p, off| Ok(squash::list_at(p, off)?))
}

/// The facts of a dm-snapshot merge; `true` when inspection went to the end.
fn inspect_snapshot(
    place: &Place,
    workdir: &Path,
    tools: &ToolsFound,
    fsck: bool,
) -> Result<(SnapshotFacts, bool), MergeError> {
    let overlay_bytes = place.overlay_at.len();
    let what = place.squashfs.display().to_string();
    let stop = |image| {
        Ok((
            SnapshotFacts {
                image,
                overlay_bytes,
                store: None,
            },
            false,
        ))
    };
    let info = match squash::detect_image_kind(&mut place.squashfs_at.open(false)?, &what)? {
        ImageKind::Squashfs(info) => info,
        ImageKind::Erofs => return stop(ImageFacts::Erofs(None)),
        other => return stop(ImageFacts::Other(format!("{other:?}"))),
    };
    let mut needed = vec![&tools::UNSQUASHFS, &tools::MKSQUASHFS];
    if fsck {
        needed.push(&tools::E2FSCK);
    }
    if tools.require_all(&needed).is_err() {
        return stop(ImageFacts::Squashfs {
            info,
            listing: None,
        });
    }
    let listing = summarise(&list_image(&place.squashfs_at, workdir)?);
    let has_root = listing.root_image.is_some();
    let image = ImageFacts::Squashfs {
        info,
        listing: Some(listing),
    };
    if !has_root {
        return stop(image);
    }
    let mut ov = place.overlay_at.open(false)?;
    let ov_len = ov.len();
    let store = snapshot::open_store(&mut ov, ov_len)?;
    Ok((
        SnapshotFacts {
            image,
            overlay_bytes,
            store: Some(store),
        },
        true,
    ))
}

/// The facts of an OverlayFS merge; `true` when inspection went to the end.
fn inspect_overlayfs(
    place: &Place,
    workdir: &Path,
    tools: &ToolsFound,
    is_root: bool,
) -> Result<(OvlFacts, bool), MergeError> {
    let mut facts = OvlFacts {
        overlay_bytes: place.overlay_at.len(),
        overlay_info: None,
        upper: None,
        image: None,
    };
    if !tools.has(&tools::DEBUGFS) {
        return Ok((facts, false));
    }
    let what = place.squashfs.display().to_string();
    let kind = squash::detect_image_kind(&mut place.squashfs_at.open(false)?, &what)?;
    let scratch = tempfile::Builder::new()
        .prefix("livestick-ovl-plan-")
        .tempdir_in(workdir)
        .map_err(|source| MergeError::Io {
            path: workdir.to_path_buf(),
            source,
        })?;
    let (info, len) = {
        let mut ov = place.overlay_at.open(false)?;
        let len = ov.len();
        (store::overlay_info(&mut ov), len)
    };
    let dbg = overlay_debugfs(&place.overlay_at, scratch.path())?;
    let mut upper = walk_upper(&dbg, scratch.path())?;
    let entries = upper.entries.len() as u64;
    let mut stash_bytes = None;
    let (image, complete) = match kind {
        ImageKind::Squashfs(sq) => {
            if tools
                .require_all(&[&tools::UNSQUASHFS, &tools::MKSQUASHFS])
                .is_err()
            {
                (
                    ImageFacts::Squashfs {
                        info: sq,
                        listing: None,
                    },
                    false,
                )
            } else {
                let raw = list_image(&place.squashfs_at, workdir)?;
                let listing = summarise(&raw);
                let mut complete = true;
                if listing.root_image.is_none() {
                    // Flat: what the upper dir hides decides the stash.
                    if tools
                        .require_all(&[&tools::SQFS2TAR, &tools::TAR2SQFS])
                        .is_ok()
                    {
                        read_upper_meta(&dbg, &mut upper, scratch.path())?;
                        stash_bytes = Some(
                            UpperIndex::new(&upper).dropped_bytes(
                                raw.iter()
                                    .filter(|e| e.is_file)
                                    .map(|e| (e.path.as_str(), e.size)),
                            ),
                        );
                    } else {
                        complete = false;
                    }
                }
                (
                    ImageFacts::Squashfs {
                        info: sq,
                        listing: Some(listing),
                    },
                    complete,
                )
            }
        }
        ImageKind::Erofs => {
            let mut needed = vec![&tools::FSCK_EROFS, &tools::MKFS_EROFS];
            if !is_root {
                needed.push(&tools::FAKEROOT);
            }
            if tools.require_all(&needed).is_err() {
                (ImageFacts::Erofs(None), false)
            } else {
                let f = inspect_erofs(place, workdir, &what)?;
                let complete = f.details.is_some();
                (ImageFacts::Erofs(Some(f)), complete)
            }
        }
        other => (ImageFacts::Other(format!("{other:?}")), false),
    };
    drop(scratch);
    facts.upper = Some(UpperFacts {
        entries,
        file_bytes: upper.file_bytes(),
        status: store::status_report(info.as_ref(), len, entries),
        stash_bytes,
    });
    facts.overlay_info = info;
    facts.image = Some(image);
    Ok((facts, complete))
}

/// The EROFS image and what the installed erofs-utils can do with it.
fn inspect_erofs(place: &Place, workdir: &Path, what: &str) -> Result<ErofsFacts, MergeError> {
    let info = erofs::superblock::read_superblock(&mut place.squashfs_at.open(false)?, what)
        .map_err(OvlError::from)?;
    let fsck_algorithms = erofs::fsck_algorithms().map_err(OvlError::from)?;
    let fsck_version = erofs::fsck_version();
    let details = if erofs::decompressible(&info, &fsck_algorithms) {
        let mkfs_compressors = erofs::available_compressors().map_err(OvlError::from)?;
        // fsck.erofs 1.5 extracts no xattrs; livestick reads them from the image
        // itself and sets them on the extracted tree.
        let xattr_paths = erofs_xattr::read_xattrs(&mut place.squashfs_at.open(false)?, what)
            .map(|paths| paths.len())
            .map_err(|e| e.to_string());
        let extract_keeps_xattrs = match xattr_paths {
            Ok(_) => None,
            Err(_) => Some(erofs::extract_keeps_xattrs(workdir).map_err(OvlError::from)?),
        };
        Some(ErofsDetails {
            mkfs_compressors,
            xattr_paths,
            extract_keeps_xattrs,
        })
    } else {
        None
    };
    Ok(ErofsFacts {
        info,
        fsck_algorithms,
        fsck_version,
        details,
    })
}
