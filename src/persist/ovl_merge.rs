//! The OverlayFS overlay file itself (an ext4 file system holding `overlayfs/`, the
//! upper dir, and `ovlwork/`): detection, usage, a fresh one, reset; the directory
//! overlay of an ext4 stick (usage, its ext4 copy for a merge, emptying it).
//!
//! The merge of such an overlay lives in [`crate::persist::merge::overlayfs`]; its
//! items are re-exported here at their old paths.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::disk::ext4::{self, Ext4Info, Ext4Options};
use crate::persist::snapshot::{self, StatusReport, SyncData};

pub use crate::persist::host_xattr::{get_xattr, list_xattrs, set_xattr};
pub use crate::persist::merge::overlayfs::debugfs::{Debugfs, Kind};
pub use crate::persist::merge::overlayfs::error::{OvlError, UPPER_DIR, WORK_DIR};
pub use crate::persist::merge::overlayfs::fakeroot::{FakerootJob, run_fakeroot_job};
pub use crate::persist::merge::overlayfs::tree::{
    ApplyReport, Ext4Target, HostTree, Target, apply,
};
pub use crate::persist::merge::overlayfs::upper::{
    UpperEntry, UpperTree, read_upper_details, read_upper_meta, walk_upper,
};
pub use crate::persist::merge::plan::{Layout, OvlPlan};

use crate::persist::merge::overlayfs::error::io_at;

/// Whether an overlay file holds ext4 (OverlayFS persistence) rather than a
/// dm-snapshot store.
pub fn is_ext4<R: Read + Seek>(r: &mut R) -> bool {
    let mut m = [0u8; 2];
    r.seek(SeekFrom::Start(1080)).is_ok() && r.read_exact(&mut m).is_ok() && m == [0x53, 0xEF]
}

/// The overlay's ext4 superblock facts (label, UUID, usage).
pub fn overlay_info<R: Read + Seek>(r: &mut R) -> Option<Ext4Info> {
    Ext4Info::read_from(r).ok()
}

/// A status report in the dm-snapshot shape, for plans and JSON that carry one.
pub fn status_report(info: Option<&Ext4Info>, len: u64, entries: u64) -> StatusReport {
    let (used, total) = info.map_or((0, len), |i| (i.used_bytes, i.size_bytes));
    let free = total.saturating_sub(used);
    StatusReport {
        state: "overlayfs",
        dm_status: format!("OverlayFS on ext4: {used} of {total} bytes used"),
        chunk_sectors: 0,
        cow_bytes: len,
        total_sectors: len / snapshot::SECTOR_BYTES,
        allocated_sectors: None,
        metadata_sectors: None,
        exceptions: entries,
        metadata_areas: 0,
        percent_used: if total == 0 {
            0.0
        } else {
            (used as f64 * 10000.0 / total as f64).round() / 100.0
        },
        free_data_chunks: 0,
        bytes_free: free,
        full: free == 0,
        trap_size: false,
        problems: Vec::new(),
    }
}

/// Builds an empty OverlayFS overlay (ext4 with `overlayfs/` and `ovlwork/`) of `len`
/// bytes in `dir`, with the old one's UUID and label.
pub fn build_fresh_overlay(
    dir: &Path,
    len: u64,
    like: Option<&Ext4Info>,
) -> Result<PathBuf, OvlError> {
    let root = dir.join("fresh-overlay-root");
    fs::create_dir_all(root.join(UPPER_DIR)).map_err(io_at(&root))?;
    fs::create_dir_all(root.join(WORK_DIR)).map_err(io_at(&root))?;
    let img = dir.join("fresh-overlay.img");
    let opts = Ext4Options {
        root_dir: Some(root.clone()),
        uuid: like.and_then(|i| uuid::Uuid::parse_str(&i.uuid).ok()),
        ..Ext4Options::default()
    };
    let label = like.map(|i| i.label.clone()).unwrap_or_default();
    ext4::make_ext4_image(&img, len, &label, &opts)?;
    let _ = fs::remove_dir_all(&root);
    Ok(img)
}

/// Writes the fresh overlay `template` over `ov` (same length), in place.
///
/// Order: the old superblock's magic goes first (synced), so a stop half way leaves
/// a file no one mounts as a half-old, half-new ext4; then every block that differs
/// from the template, except the first 4 KiB; then the first 4 KiB (the new
/// superblock), synced. Only blocks that differ are written: most of a 4 GiB overlay
/// is unused and already zero.
pub fn write_fresh_overlay<F>(ov: &mut F, len: u64, template: &Path) -> Result<(), OvlError>
where
    F: Read + Write + Seek + SyncData,
{
    let dev = |source| OvlError::Io {
        path: PathBuf::from("overlay"),
        source,
    };
    let mut t = File::open(template).map_err(io_at(template))?;
    let tlen = t.metadata().map_err(io_at(template))?.len();
    if tlen != len {
        return Err(OvlError::Host {
            path: template.to_path_buf(),
            what: format!("fresh overlay is {tlen} bytes, the overlay {len}"),
        });
    }
    ov.seek(SeekFrom::Start(1080)).map_err(dev)?;
    ov.write_all(&[0, 0]).map_err(dev)?;
    ov.flush().map_err(dev)?;
    ov.sync_data().map_err(dev)?;
    const BLOCK: usize = 1 << 20;
    let mut a = vec![0u8; BLOCK];
    let mut b = vec![0u8; BLOCK];
    // Only what mke2fs wrote: the fresh ext4 trusts no zeros elsewhere (lazy inode
    // tables, a checksummed journal with a random sequence), so the old overlay's
    // other blocks can stay as they are, unread and unwritten.
    let regions = crate::disk::sparse::data_regions(&t).map_err(io_at(template))?;
    for region in regions {
        let mut at = region.start.max(4096);
        while at < region.end.min(len) {
            let n = (region.end.min(len) - at).min(BLOCK as u64) as usize;
            t.seek(SeekFrom::Start(at)).map_err(io_at(template))?;
            t.read_exact(&mut a[..n]).map_err(io_at(template))?;
            ov.seek(SeekFrom::Start(at)).map_err(dev)?;
            ov.read_exact(&mut b[..n]).map_err(dev)?;
            if a[..n] != b[..n] {
                ov.seek(SeekFrom::Start(at)).map_err(dev)?;
                ov.write_all(&a[..n]).map_err(dev)?;
            }
            at += n as u64;
        }
    }
    ov.flush().map_err(dev)?;
    ov.sync_data().map_err(dev)?;
    let head = (len.min(4096)) as usize;
    t.seek(SeekFrom::Start(0)).map_err(io_at(template))?;
    t.read_exact(&mut a[..head]).map_err(io_at(template))?;
    ov.seek(SeekFrom::Start(0)).map_err(dev)?;
    ov.write_all(&a[..head]).map_err(dev)?;
    ov.flush().map_err(dev)?;
    ov.sync_data().map_err(dev)?;
    Ok(())
}

/// Resets an OverlayFS overlay in place (`overlay reset`): builds the empty file system
/// in `scratch` and writes it over the old one.
pub fn reset_overlay<F>(ov: &mut F, len: u64, scratch: &Path) -> Result<(), OvlError>
where
    F: Read + Write + Seek + SyncData,
{
    let info = overlay_info(ov);
    let dir = tempfile::Builder::new()
        .prefix("livestick-ovl-reset-")
        .tempdir_in(scratch)
        .map_err(io_at(scratch))?;
    let fresh = build_fresh_overlay(dir.path(), len, info.as_ref())?;
    write_fresh_overlay(ov, len, &fresh)
}

/// Copies a directory overlay (`overlay-LABEL-UUID/` with overlayfs/ and ovlwork/,
/// as dracut keeps it on an ext4 stick) into an ext4 image with `mke2fs -d`, which
/// keeps owners, modes, times, device nodes, hard links and xattrs: everything
/// downstream then reads one format. Needs root to see trusted.overlay.* attributes.
pub fn image_from_dir(dir: &Path, out: &Path) -> Result<(), OvlError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(OvlError::DirNeedsRoot(dir.to_path_buf()));
    }
    let (bytes, entries) = tally(dir)?;
    // A sparse file: room for every block and an inode per 16 KiB for every entry.
    let size = (bytes + entries * 16384 + (16 << 20)).next_multiple_of(1 << 20);
    let opts = Ext4Options {
        root_dir: Some(dir.to_path_buf()),
        ..Ext4Options::default()
    };
    ext4::make_ext4_image(out, size, "overlay", &opts)?;
    Ok(())
}

/// Bytes (in 4 KiB blocks) and entries below a directory overlay; it must hold
/// overlayfs/.
fn tally(dir: &Path) -> Result<(u64, u64), OvlError> {
    if !dir.join(UPPER_DIR).is_dir() {
        return Err(OvlError::NoUpper(dir.display().to_string()));
    }
    tally_below(dir)
}

/// What a directory overlay's upper dir holds: (bytes in 4 KiB blocks, entries).
pub fn upper_dir_usage(dir: &Path) -> Result<(u64, u64), OvlError> {
    tally(dir)?;
    tally_below(&dir.join(UPPER_DIR))
}

fn tally_below(upper: &Path) -> Result<(u64, u64), OvlError> {
    let (mut bytes, mut entries) = (0u64, 0u64);
    let mut dirs = vec![upper.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).map_err(io_at(&d))? {
            let e = e.map_err(io_at(&d))?;
            let m = fs::symlink_metadata(e.path()).map_err(io_at(&e.path()))?;
            entries += 1;
            if m.is_dir() {
                dirs.push(e.path());
            } else if m.is_file() {
                bytes += m.len().div_ceil(4096) * 4096;
            }
        }
    }
    Ok((bytes, entries))
}

/// Empties a directory overlay after its merge: everything below overlayfs/ and
/// ovlwork/ goes, the two directories stay.
pub fn empty_overlay_dir(dir: &Path) -> Result<(), OvlError> {
    for sub in [UPPER_DIR, WORK_DIR] {
        let d = dir.join(sub);
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd {
            let p = e.map_err(io_at(&d))?.path();
            let is_dir = fs::symlink_metadata(&p).map_err(io_at(&p))?.is_dir();
            if is_dir {
                fs::remove_dir_all(&p).map_err(io_at(&p))?;
            } else {
                fs::remove_file(&p).map_err(io_at(&p))?;
            }
        }
    }
    Ok(())
}
