//! The OverlayFS overlay as a store: an ext4 file with `overlayfs/` (the upper dir)
//! and `ovlwork/`, or those two directories on the stick's own file system. What it
//! holds, and how it is made empty again; merging it is `persist::merge`'s business.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::disk::ext4::{self, Ext4Info, Ext4Options};
use crate::io::SyncData;
use crate::persist::snapshot::{self, StatusReport};

/// The upper and work directories dracut uses inside the overlay file system.
pub const UPPER_DIR: &str = "overlayfs";
pub const WORK_DIR: &str = "ovlwork";

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Ext4(#[from] ext4::Ext4Error),
    #[error(
        "{0}: the overlay file system has no /overlayfs directory, so it is not an OverlayFS overlay made by livestick or dracut"
    )]
    NoUpper(String),
    #[error("{path}: {what}")]
    Host { path: PathBuf, what: String },
}

use crate::io::io_at;

impl From<crate::io::IoAt> for StoreError {
    fn from(crate::io::IoAt { path, source }: crate::io::IoAt) -> Self {
        StoreError::Io { path, source }
    }
}

/// Whether an overlay file holds ext4 (OverlayFS persistence) rather than a
/// dm-snapshot store.
pub fn is_ext4<R: Read + Seek>(r: &mut R) -> bool {
    ext4::has_magic(r)
}

/// The overlay's ext4 superblock facts (label, UUID, usage).
pub fn overlay_info<R: Read + Seek>(r: &mut R) -> Option<Ext4Info> {
    Ext4Info::read_from(r).ok()
}

/// What the live system left in an OverlayFS overlay's upper dir: `(bytes of its
/// files, entries)`, entries counting files, directories, links and whiteouts
/// alike; `None` when its ext4 or the upper dir cannot be read. Not the file
/// system's used blocks: those include its journal and tables, which an empty
/// overlay has too.
pub fn upper_contents<R: Read + Seek>(r: &mut R) -> Option<(u64, u64)> {
    use crate::disk::ext4_fs::Ext4Fs;
    // A damaged directory tree could name a directory twice: each is walked once,
    // and a tree past any real overlay's size is not walked to its end.
    const MOST_ENTRIES: u64 = 10_000_000;
    let fs = Ext4Fs::open(r).ok()?;
    let upper = fs.lookup(r, &format!("/{UPPER_DIR}")).ok()??;
    let (mut bytes, mut entries) = (0u64, 0u64);
    let mut seen = std::collections::HashSet::from([upper.number]);
    let mut dirs = vec![upper];
    while let Some(dir) = dirs.pop() {
        for (_, number) in fs.read_dir(r, &dir).ok()? {
            if !seen.insert(number) {
                continue;
            }
            entries += 1;
            if entries > MOST_ENTRIES {
                return None;
            }
            let inode = fs.inode(r, number).ok()?;
            if inode.is_dir() {
                dirs.push(inode);
            } else {
                bytes += inode.size;
            }
        }
    }
    Some((bytes, entries))
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
) -> Result<PathBuf, StoreError> {
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
pub fn write_fresh_overlay<F>(ov: &mut F, len: u64, template: &Path) -> Result<(), StoreError>
where
    F: Read + Write + Seek + SyncData,
{
    let dev = |source| StoreError::Io {
        path: PathBuf::from("overlay"),
        source,
    };
    let mut t = File::open(template).map_err(io_at(template))?;
    let tlen = t.metadata().map_err(io_at(template))?.len();
    if tlen != len {
        return Err(StoreError::Host {
            path: template.to_path_buf(),
            what: format!("fresh overlay is {tlen} bytes, the overlay {len}"),
        });
    }
    ov.seek(SeekFrom::Start(ext4::MAGIC_OFFSET)).map_err(dev)?;
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
pub fn reset_overlay<F>(ov: &mut F, len: u64, scratch: &Path) -> Result<(), StoreError>
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

/// Bytes (in 4 KiB blocks) and entries below a directory overlay; it must hold
/// overlayfs/.
pub fn tally(dir: &Path) -> Result<(u64, u64), StoreError> {
    if !dir.join(UPPER_DIR).is_dir() {
        return Err(StoreError::NoUpper(dir.display().to_string()));
    }
    tally_below(dir)
}

/// What a directory overlay's upper dir holds: (bytes in 4 KiB blocks, entries).
pub fn upper_dir_usage(dir: &Path) -> Result<(u64, u64), StoreError> {
    tally(dir)?;
    tally_below(&dir.join(UPPER_DIR))
}

fn tally_below(upper: &Path) -> Result<(u64, u64), StoreError> {
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
pub fn empty_overlay_dir(dir: &Path) -> Result<(), StoreError> {
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
