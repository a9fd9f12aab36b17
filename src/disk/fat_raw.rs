//! Replacing a file on the stick's FAT filesystem without a moment where it is missing.
//!
//! FAT has no atomic rename-over: `fatfs` refuses to rename onto an existing name, and
//! "remove old, rename new" leaves the stick without a `squashfs.img` in between. What
//! a FAT file *is* lives in its 32-byte short directory entry: the first cluster and the
//! size. So the new image is written under a second name, and then the two entries
//! exchange their cluster/size/time fields. When both entries lie in one 512-byte sector
//! (the usual case: they are neighbours in `LiveOS/`), that is one sector write, which
//! a device performs whole or not at all: the stick boots the old image or the new one.
//! Otherwise it takes two sector writes, with a sync between: after the first the name
//! `squashfs.img` already means the new image (the stick boots new) and the two entries
//! share a chain until the second write gives the staged name the old chain back.
//! Names, attributes and long-name entries are never touched, so no checksum changes.
//!
//! One sector is the unit because it is the smallest write a block device takes: a
//! disk completes or drops it whole, while flash sticks promise nothing, so on flash
//! the crash window is one sector write, never more. [`move_beside`] brings the staged
//! entry into the target's sector first where it can; who orders the writes and
//! records an intent when it cannot is `persist::merge::replace`.

use std::io::{self, Read, Seek, SeekFrom, Write};

use thiserror::Error;

use crate::bytes::{read_u32, u16_at, u32_at};

const SECTOR: u64 = 512;

#[derive(Debug, Error)]
pub enum SwapError {
    #[error("I/O error on the stick: {0}")]
    Io(#[from] io::Error),
    #[error("not a FAT filesystem this code can update in place: {0}")]
    Unsupported(String),
    #[error("{0} not found on the stick")]
    NotFound(String),
    #[error("{0} is a directory, not a file")]
    IsDir(String),
}

impl crate::error::Classify for SwapError {
    fn kind(&self) -> crate::error::ErrorKind {
        // Always a failure during the work, never bad input: these raw edits run once
        // a command has begun changing the stick (a swap, a repair, an allocation),
        // where a missing or odd entry means the stick changed or is damaged, and the
        // bad-input hint ("nothing was written") would not be true. What a user can
        // get wrong (no home, no squashfs.img, not a FAT stick) is refused earlier by
        // the callers' own errors.
        crate::error::ErrorKind::Io
    }
}

/// Where a file's short directory entry is, and what it says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryLoc {
    /// Device offset of the 32-byte short entry.
    pub offset: u64,
    pub first_cluster: u32,
    pub size: u32,
}

/// How the swap went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SwapReport {
    /// One sector write (true), or two with a sync between.
    pub single_sector: bool,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Geo {
    pub(crate) cluster_bytes: u64,
    /// Device offset of the first FAT.
    pub(crate) fat_offset: u64,
    /// Bytes of one FAT copy.
    pub(crate) fat_bytes: u64,
    pub(crate) fats: u64,
    pub(crate) fat32: bool,
    /// Only [`geometry_any`] returns FAT12 volumes; everything that changes a
    /// volume in place refuses them.
    pub(crate) fat12: bool,
    pub(crate) data_offset: u64,
    /// FAT32: the root directory's first cluster. FAT16: 0 (fixed region).
    pub(crate) root_cluster: u32,
    pub(crate) root_region: (u64, u64),
    /// One past the highest valid cluster number.
    pub(crate) max_cluster: u32,
    /// Device offset of the FSInfo sector (FAT32), if the volume has one.
    pub(crate) fsinfo: Option<u64>,
}

pub(crate) fn geometry<D: Read + Seek>(dev: &mut D, part: u64) -> Result<Geo, SwapError> {
    let g = geometry_any(dev, part)?;
    if g.fat12 {
        return Err(SwapError::Unsupported(
            "FAT12 (a filesystem under 16 MiB cannot hold a live system)".into(),
        ));
    }
    Ok(g)
}

/// The layout of a FAT12, FAT16 or FAT32 volume at `part`.
pub(crate) fn geometry_any<D: Read + Seek>(dev: &mut D, part: u64) -> Result<Geo, SwapError> {
    let mut bpb = [0u8; 512];
    dev.seek(SeekFrom::Start(part))?;
    dev.read_exact(&mut bpb)?;
    let bps = u64::from(u16_at(&bpb, 11));
    let spc = u64::from(bpb[13]);
    let reserved = u64::from(u16_at(&bpb, 14));
    let fats = u64::from(bpb[16]);
    let root_entries = u64::from(u16_at(&bpb, 17));
    let total = match u16_at(&bpb, 19) {
        0 => u64::from(u32_at(&bpb, 32)),
        t => u64::from(t),
    };
    let fat_sectors = match u16_at(&bpb, 22) {
        0 => u64::from(u32_at(&bpb, 36)),
        f => u64::from(f),
    };
    if !(512..=4096).contains(&bps) || spc == 0 || fats == 0 || fat_sectors == 0 {
        return Err(SwapError::Unsupported("boot sector is not FAT".into()));
    }
    let root_sectors = (root_entries * 32).div_ceil(bps);
    let first_data = reserved + fats * fat_sectors + root_sectors;
    let clusters = total.saturating_sub(first_data) / spc;
    // The FAT type follows from the cluster count alone (Microsoft's rule).
    let fat12 = clusters < 4085;
    let fat32 = clusters >= 65525;
    let root_start = part + (reserved + fats * fat_sectors) * bps;
    let fsinfo_sector = u64::from(u16_at(&bpb, 48));
    Ok(Geo {
        cluster_bytes: spc * bps,
        fat_offset: part + reserved * bps,
        fat_bytes: fat_sectors * bps,
        fats,
        fsinfo: (fat32 && fsinfo_sector != 0 && fsinfo_sector != 0xffff)
            .then(|| part + fsinfo_sector * bps),
        fat32,
        fat12,
        data_offset: part + first_data * bps,
        root_cluster: if fat32 { u32_at(&bpb, 44) } else { 0 },
        root_region: (root_start, root_entries * 32),
        max_cluster: u32::try_from(clusters + 2).unwrap_or(u32::MAX),
    })
}

/// Where the FAT volume at `part` ends by its boot sector: past its last cluster, or
/// past its tables where those reach further.
pub(crate) fn volume_end<D: Read + Seek>(dev: &mut D, part: u64) -> Result<u64, SwapError> {
    let g = geometry_any(dev, part)?;
    let clusters_end = g.data_offset + u64::from(g.max_cluster.saturating_sub(2)) * g.cluster_bytes;
    Ok(clusters_end.max(g.fat_offset + g.fats * g.fat_bytes))
}

pub(crate) fn next_cluster<D: Read + Seek>(dev: &mut D, g: &Geo, c: u32) -> io::Result<u32> {
    if g.fat32 {
        dev.seek(SeekFrom::Start(g.fat_offset + u64::from(c) * 4))?;
        Ok(read_u32(dev)? & 0x0fff_ffff)
    } else {
        let mut e = [0u8; 2];
        dev.seek(SeekFrom::Start(g.fat_offset + u64::from(c) * 2))?;
        dev.read_exact(&mut e)?;
        Ok(u32::from(u16_at(&e, 0)))
    }
}

/// The most bytes of entries a FAT directory can hold: 65536 of 32 bytes.
const MAX_DIR_BYTES: u64 = 65536 * 32;

/// The byte runs (device offsets) of a directory: a cluster chain, or FAT16's fixed root.
pub(crate) fn dir_runs<D: Read + Seek>(
    dev: &mut D,
    g: &Geo,
    first: u32,
) -> io::Result<Vec<(u64, u64)>> {
    if first == 0 {
        return Ok(vec![g.root_region]);
    }
    // A directory holds at most 65536 entries (2 MiB); a chain that loops or runs
    // on past that is damage, refused before its entries are read over and over.
    let most = (MAX_DIR_BYTES.div_ceil(g.cluster_bytes.max(1))) as usize;
    let mut runs = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut c = first;
    while (2..g.max_cluster).contains(&c) {
        if !seen.insert(c) || runs.len() == most {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the cluster chain of a directory (from cluster {first}) loops or runs past \
                     the 65536 entries a directory can hold: the FAT filesystem is damaged; run \
                     `fsck.fat -a` on the partition, or rewrite the stick with --format"
                ),
            ));
        }
        runs.push((
            g.data_offset + u64::from(c - 2) * g.cluster_bytes,
            g.cluster_bytes,
        ));
        c = next_cluster(dev, g, c)?;
    }
    Ok(runs)
}

/// One short directory entry, with its long name when it has one.
struct DirEntry {
    /// The long name, else the short one (`NAME.EXT`).
    name: String,
    short: String,
    loc: EntryLoc,
    is_dir: bool,
    /// Device offsets of the long-name slots that belong to the short entry, in
    /// directory order: moving or deleting the entry moves or deletes them too.
    lfn_slots: Vec<u64>,
}

/// The live entries of the directory at `first` (no deleted ones, no volume label).
fn read_dir<D: Read + Seek>(dev: &mut D, g: &Geo, first: u32) -> io::Result<Vec<DirEntry>> {
    let mut out = Vec::new();
    // Each long-name slot: its sequence number, its 13 UTF-16 units and the
    // checksum of the short name it belongs to.
    let mut lfn: Vec<(u8, [u16; 13], u8)> = Vec::new();
    let mut lfn_slots: Vec<u64> = Vec::new();
    for (at, len) in dir_runs(dev, g, first)? {
        let mut buf = vec![0u8; len as usize];
        dev.seek(SeekFrom::Start(at))?;
        dev.read_exact(&mut buf)?;
        for (i, e) in buf.chunks_exact(32).enumerate() {
            if e[0] == 0 {
                return Ok(out);
            }
            if e[0] == 0xe5 {
                lfn.clear();
                lfn_slots.clear();
                continue;
            }
            if e[11] == 0x0f {
                let mut units = [0u16; 13];
                for (k, o) in [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30]
                    .into_iter()
                    .enumerate()
                {
                    units[k] = u16_at(e, o);
                }
                lfn.push((e[0] & 0x1f, units, e[13]));
                lfn_slots.push(at + i as u64 * 32);
                continue;
            }
            if e[11] & 0x08 != 0 {
                // The volume label entry.
                lfn.clear();
                lfn_slots.clear();
                continue;
            }
            lfn.sort_by_key(|(seq, _, _)| *seq);
            // Long-name slots name this entry only when they carry its short
            // name's checksum and count 1, 2, …: stale slots before an entry
            // written without a long name (or left by another tool) are not its.
            let sum = short_name_checksum(&e[..11]);
            let belongs = lfn
                .iter()
                .enumerate()
                .all(|(i, (seq, _, check))| usize::from(*seq) == i + 1 && *check == sum);
            if !belongs {
                lfn.clear();
                lfn_slots.clear();
            }
            let long: Vec<u16> = lfn
                .iter()
                .flat_map(|(_, u, _)| u.iter().copied())
                .take_while(|&u| u != 0 && u != 0xffff)
                .collect();
            lfn.clear();
            let base = String::from_utf8_lossy(&e[0..8]).trim_end().to_string();
            let ext = String::from_utf8_lossy(&e[8..11]).trim_end().to_string();
            let short = if ext.is_empty() {
                base
            } else {
                format!("{base}.{ext}")
            };
            let hi = if g.fat32 { u32::from(u16_at(e, 20)) } else { 0 };
            out.push(DirEntry {
                name: if long.is_empty() {
                    short.clone()
                } else {
                    String::from_utf16_lossy(&long)
                },
                short,
                loc: EntryLoc {
                    offset: at + i as u64 * 32,
                    first_cluster: hi << 16 | u32::from(u16_at(e, 26)),
                    size: u32_at(e, 28),
                },
                is_dir: e[11] & 0x10 != 0,
                lfn_slots: std::mem::take(&mut lfn_slots),
            });
        }
    }
    Ok(out)
}

/// The checksum of an 11-byte short name that its long-name slots carry.
fn short_name_checksum(short: &[u8]) -> u8 {
    short
        .iter()
        .fold(0u8, |sum, &b| sum.rotate_right(1).wrapping_add(b))
}

/// Finds `name` (long or short name, any case) in the directory at `first`.
fn find_in_dir<D: Read + Seek>(
    dev: &mut D,
    g: &Geo,
    first: u32,
    name: &str,
) -> io::Result<Option<DirEntry>> {
    Ok(read_dir(dev, g, first)?
        .into_iter()
        .find(|e| e.name.eq_ignore_ascii_case(name) || e.short.eq_ignore_ascii_case(name)))
}

/// Finds the short directory entry of the file at `path` (`/LiveOS/squashfs.img`) on the
/// FAT filesystem starting at device offset `part`.
pub fn find_entry<D: Read + Seek>(
    dev: &mut D,
    part: u64,
    path: &str,
) -> Result<EntryLoc, SwapError> {
    let g = geometry(dev, part)?;
    Ok(find_file(dev, &g, path)?.loc)
}

/// The directory entry of the file at `path`.
fn find_file<D: Read + Seek>(dev: &mut D, g: &Geo, path: &str) -> Result<DirEntry, SwapError> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let mut dir = g.root_cluster;
    for (i, p) in parts.iter().enumerate() {
        let e =
            find_in_dir(dev, g, dir, p)?.ok_or_else(|| SwapError::NotFound(path.to_string()))?;
        if i + 1 == parts.len() {
            if e.is_dir {
                return Err(SwapError::IsDir(path.to_string()));
            }
            return Ok(e);
        }
        if !e.is_dir {
            return Err(SwapError::NotFound(path.to_string()));
        }
        dir = e.loc.first_cluster;
        if dir == 0 && g.fat32 {
            // `..` of a first-level directory: cluster 0 means the root.
            dir = g.root_cluster;
        }
    }
    Err(SwapError::NotFound(path.to_string()))
}

/// The data extents of the file at `path` as `(device offset, length)`, contiguous
/// clusters merged: on FAT16 as on FAT32 (`disk::fat::file_extents` reads FAT32 only).
pub fn file_extents<D: Read + Seek>(
    dev: &mut D,
    part: u64,
    path: &str,
) -> Result<Vec<(u64, u64)>, SwapError> {
    let g = geometry(dev, part)?;
    let (entry, _, clusters) = file_clusters(dev, part, path)?;
    Ok(cluster_extents(&g, &clusters, u64::from(entry.size)))
}

/// The data extents of `size` bytes held by `clusters` in file order, as `(device
/// offset, length)`, contiguous clusters merged.
pub(crate) fn cluster_extents(g: &Geo, clusters: &[u32], size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut left = size;
    for &c in clusters {
        let at = g.data_offset + u64::from(c - 2) * g.cluster_bytes;
        let len = left.min(g.cluster_bytes);
        match out.last_mut() {
            Some((o, l)) if *o + *l == at => *l += len,
            _ => out.push((at, len)),
        }
        left -= len;
    }
    out
}

/// The file at `path`: its entry, its attribute byte and its clusters in file order
/// (as many as its size needs, so a looping chain cannot hang us).
pub fn file_clusters<D: Read + Seek>(
    dev: &mut D,
    part: u64,
    path: &str,
) -> Result<(EntryLoc, u8, Vec<u32>), SwapError> {
    let g = geometry(dev, part)?;
    let entry = find_entry(dev, part, path)?;
    let mut attributes = [0u8; 1];
    dev.seek(SeekFrom::Start(entry.offset + 11))?;
    dev.read_exact(&mut attributes)?;
    let needed = u64::from(entry.size).div_ceil(g.cluster_bytes);
    let mut clusters = Vec::new();
    let mut c = entry.first_cluster;
    while (clusters.len() as u64) < needed && (2..g.max_cluster).contains(&c) {
        clusters.push(c);
        c = next_cluster(dev, &g, c)?;
    }
    if (clusters.len() as u64) < needed {
        return Err(SwapError::Unsupported(format!(
            "{path}: its cluster chain is shorter than its size"
        )));
    }
    Ok((entry, attributes[0], clusters))
}

/// Sets the attribute byte (read-only, hidden, system, ...) of `entry`.
pub fn set_attributes<D: Write + Seek>(
    dev: &mut D,
    entry: &EntryLoc,
    attributes: u8,
) -> io::Result<()> {
    dev.seek(SeekFrom::Start(entry.offset + 11))?;
    dev.write_all(&[attributes])
}

/// The bytes of a short entry that say what the file is: times, dates, first cluster
/// (both halves) and size. Name (0..11), attributes (11) and case flags (12) stay.
const CONTENT_FIELDS: std::ops::Range<usize> = 13..32;

/// Makes `target` name the contents of `staged` and `staged` name the old contents of
/// `target`, as described in the module documentation. Both must be files on the same
/// filesystem; the caller has flushed and closed any FAT driver on it.
pub fn swap_contents<D: Read + Write + Seek + crate::io::SyncData>(
    dev: &mut D,
    part: u64,
    target: &str,
    staged: &str,
) -> Result<SwapReport, SwapError> {
    let a = find_entry(dev, part, target)?;
    let b = find_entry(dev, part, staged)?;
    let sector_of = |o: u64| o / SECTOR * SECTOR;
    let synced = |dev: &mut D, at: u64, s: &[u8]| -> io::Result<()> {
        write_sector(dev, at, s)?;
        dev.sync_data()
    };
    let (sa, sb) = (sector_of(a.offset), sector_of(b.offset));
    let (ia, ib) = ((a.offset - sa) as usize, (b.offset - sb) as usize);
    if sa == sb {
        let mut s = read_sector(dev, sa)?;
        let fa: Vec<u8> = s[ia + CONTENT_FIELDS.start..ia + CONTENT_FIELDS.end].to_vec();
        let fb: Vec<u8> = s[ib + CONTENT_FIELDS.start..ib + CONTENT_FIELDS.end].to_vec();
        s[ia + CONTENT_FIELDS.start..ia + CONTENT_FIELDS.end].copy_from_slice(&fb);
        s[ib + CONTENT_FIELDS.start..ib + CONTENT_FIELDS.end].copy_from_slice(&fa);
        synced(dev, sa, &s)?;
        return Ok(SwapReport {
            single_sector: true,
        });
    }
    let mut s_a = read_sector(dev, sa)?;
    let mut s_b = read_sector(dev, sb)?;
    let fa: Vec<u8> = s_a[ia + CONTENT_FIELDS.start..ia + CONTENT_FIELDS.end].to_vec();
    let fb: Vec<u8> = s_b[ib + CONTENT_FIELDS.start..ib + CONTENT_FIELDS.end].to_vec();
    // The boot-relevant name first: from here on the stick boots the new image.
    s_a[ia + CONTENT_FIELDS.start..ia + CONTENT_FIELDS.end].copy_from_slice(&fb);
    synced(dev, sa, &s_a)?;
    s_b[ib + CONTENT_FIELDS.start..ib + CONTENT_FIELDS.end].copy_from_slice(&fa);
    synced(dev, sb, &s_b)?;
    Ok(SwapReport {
        single_sector: false,
    })
}

/// Whether the short entries of `a` and `b` lie in one sector: then exchanging their
/// contents is a single sector write.
pub fn share_a_sector<D: Read + Seek>(
    dev: &mut D,
    part: u64,
    a: &str,
    b: &str,
) -> Result<bool, SwapError> {
    let ea = find_entry(dev, part, a)?;
    let eb = find_entry(dev, part, b)?;
    Ok(ea.offset / SECTOR == eb.offset / SECTOR)
}

/// Moves the directory entry of `staged` (its long-name slots and its short entry, byte
/// for byte, so no checksum changes) into free slots of the sector that holds
/// `target`'s short entry, so that [`swap_contents`] becomes one sector write. Both
/// must be in one directory. Returns false, changing nothing, when that sector has no
/// run of free slots long enough.
///
/// The copy is written (and `sync`ed) before the old slots are marked deleted: a crash
/// between leaves two entries named `staged` on the same chain, which the leftover
/// repair detaches one by one, never a chain that nothing names.
pub fn move_beside<D: Read + Write + Seek>(
    dev: &mut D,
    part: u64,
    staged: &str,
    target: &str,
    sync: &mut dyn FnMut(&mut D) -> io::Result<()>,
) -> Result<bool, SwapError> {
    let g = geometry(dev, part)?;
    let parent = |p: &str| p.rsplit_once('/').map(|(d, _)| d.to_ascii_lowercase());
    if parent(staged) != parent(target) {
        return Ok(false);
    }
    let t = find_file(dev, &g, target)?;
    let st = find_file(dev, &g, staged)?;
    let sector = t.loc.offset / SECTOR * SECTOR;
    if st.loc.offset / SECTOR * SECTOR == sector {
        return Ok(true);
    }
    let mut slots: Vec<u64> = st.lfn_slots.clone();
    slots.push(st.loc.offset);
    let mut here = read_sector(dev, sector)?;
    let per_sector = (SECTOR / 32) as usize;
    let n = slots.len();
    let deleted_run = |k: usize| (k..k + n).all(|j| here[j * 32] == 0xe5);
    // Slots past the end of the directory, leaving one end mark in this sector after
    // the run (what follows the end is not trusted to be zero in the next sector).
    let end_run = |k: usize| k + n < per_sector && (k..per_sector).all(|j| here[j * 32] == 0);
    let free_run = (0..=per_sector.saturating_sub(n)).find(|&k| deleted_run(k) || end_run(k));
    let Some(k) = free_run else {
        return Ok(false);
    };
    for (j, &from) in slots.iter().enumerate() {
        let mut e = [0u8; 32];
        dev.seek(SeekFrom::Start(from))?;
        dev.read_exact(&mut e)?;
        here[(k + j) * 32..(k + j + 1) * 32].copy_from_slice(&e);
    }
    write_sector(dev, sector, &here)?;
    sync(dev)?;
    // The old slots, the short entry first: long-name slots without their short
    // entry are ignored by every reader.
    for &from in slots.iter().rev() {
        let at = from / SECTOR * SECTOR;
        let mut s = read_sector(dev, at)?;
        s[(from - at) as usize] = 0xe5;
        write_sector(dev, at, &s)?;
    }
    sync(dev)?;
    Ok(true)
}

/// The 19 bytes of `path`'s short entry that say what the file is (times, clusters,
/// size): what a replacement exchanges, and what its intent records.
pub fn content_fields<D: Read + Seek>(
    dev: &mut D,
    part: u64,
    path: &str,
) -> Result<Vec<u8>, SwapError> {
    let e = find_entry(dev, part, path)?;
    let mut b = [0u8; 32];
    dev.seek(SeekFrom::Start(e.offset))?;
    dev.read_exact(&mut b)?;
    Ok(b[CONTENT_FIELDS].to_vec())
}

/// Writes `fields` (from [`content_fields`]) into `path`'s short entry: one sector write.
pub fn set_content_fields<D: Read + Write + Seek>(
    dev: &mut D,
    part: u64,
    path: &str,
    fields: &[u8],
) -> Result<(), SwapError> {
    if fields.len() != CONTENT_FIELDS.len() {
        return Err(SwapError::Unsupported(format!(
            "{} bytes of directory entry fields, not {}",
            fields.len(),
            CONTENT_FIELDS.len()
        )));
    }
    let e = find_entry(dev, part, path)?;
    let sector = e.offset / SECTOR * SECTOR;
    let at = (e.offset - sector) as usize;
    let mut s = read_sector(dev, sector)?;
    s[at + CONTENT_FIELDS.start..at + CONTENT_FIELDS.end].copy_from_slice(fields);
    write_sector(dev, sector, &s)?;
    Ok(())
}

/// Marks `path`'s directory slots deleted (short entry first) and returns the first
/// cluster its entry named; freeing the chain is the caller's (`fat_alloc::free_chain`).
pub(crate) fn delete_entry<D: Read + Write + Seek>(
    dev: &mut D,
    g: &Geo,
    path: &str,
) -> Result<u32, SwapError> {
    let e = find_file(dev, g, path)?;
    let mut slots = e.lfn_slots.clone();
    slots.push(e.loc.offset);
    for &from in slots.iter().rev() {
        let at = from / SECTOR * SECTOR;
        let mut s = read_sector(dev, at)?;
        s[(from - at) as usize] = 0xe5;
        write_sector(dev, at, &s)?;
    }
    Ok(e.loc.first_cluster)
}

fn read_sector<D: Read + Seek>(dev: &mut D, at: u64) -> io::Result<Vec<u8>> {
    let mut s = vec![0u8; SECTOR as usize];
    dev.seek(SeekFrom::Start(at))?;
    dev.read_exact(&mut s)?;
    Ok(s)
}

fn write_sector<D: Write + Seek>(dev: &mut D, at: u64, s: &[u8]) -> io::Result<()> {
    dev.seek(SeekFrom::Start(at))?;
    dev.write_all(s)?;
    dev.flush()
}

/// Directories deeper than this are not walked (a directory that contains itself).
const MAX_WALK_DEPTH: usize = 64;

/// Every file and directory on the filesystem with its path, `.` and `..` left out.
/// `complete` is false when a directory was not walked (too deep, or seen before).
struct Walk {
    entries: Vec<(String, DirEntry)>,
    complete: bool,
}

fn walk_all<D: Read + Seek>(dev: &mut D, g: &Geo) -> io::Result<Walk> {
    let mut entries = Vec::new();
    let mut complete = true;
    let mut seen = std::collections::HashSet::from([g.root_cluster]);
    let mut dirs = vec![(String::new(), g.root_cluster, 0usize)];
    while let Some((dir, first, depth)) = dirs.pop() {
        for e in read_dir(dev, g, first)? {
            if e.short == "." || e.short == ".." {
                continue;
            }
            let p = format!("{dir}/{}", e.name);
            if e.is_dir {
                let c = e.loc.first_cluster;
                if depth < MAX_WALK_DEPTH && (2..g.max_cluster).contains(&c) && seen.insert(c) {
                    dirs.push((p.clone(), c, depth + 1));
                } else {
                    complete = false;
                }
            }
            entries.push((p, e));
        }
    }
    Ok(Walk { entries, complete })
}

/// The paths of every other file on the filesystem whose directory entry names the
/// first cluster of `path`'s: its chain is theirs too (an interrupted two-sector swap
/// leaves `X` and `X.new` so). The check before freeing a chain: empty means `path`
/// alone names it. A file without clusters shares nothing.
pub fn other_names_of_chain<D: Read + Seek>(
    dev: &mut D,
    part: u64,
    path: &str,
) -> Result<Vec<String>, SwapError> {
    let entry = find_entry(dev, part, path)?;
    if entry.first_cluster == 0 {
        return Ok(Vec::new());
    }
    let g = geometry(dev, part)?;
    Ok(walk_all(dev, &g)?
        .entries
        .into_iter()
        .filter(|(_, e)| {
            !e.is_dir && e.loc.first_cluster == entry.first_cluster && e.loc.offset != entry.offset
        })
        .map(|(p, _)| p)
        .collect())
}

/// The files under the directory `dir` (a path, any depth) whose chain another entry
/// also names, each with those other names, such that once each listed file is
/// [`detach`]ed every chain has one name left: of two files inside `dir` that share
/// a chain only one is listed, a staged `*.new` name before any other, so the live
/// name keeps the chain.
pub fn shared_chains_under<D: Read + Seek>(
    dev: &mut D,
    part: u64,
    dir: &str,
) -> Result<Vec<(String, Vec<String>)>, SwapError> {
    let g = geometry(dev, part)?;
    let walk = walk_all(dev, &g)?;
    let prefix = format!("/{}/", dir.trim_matches('/')).to_ascii_lowercase();
    let mut detached: Vec<u64> = Vec::new();
    let mut out = Vec::new();
    let staged_first = walk
        .entries
        .iter()
        .filter(|(p, _)| p.to_ascii_lowercase().ends_with(".new"))
        .chain(
            walk.entries
                .iter()
                .filter(|(p, _)| !p.to_ascii_lowercase().ends_with(".new")),
        );
    for (p, e) in staged_first {
        if e.is_dir || e.loc.first_cluster == 0 || !p.to_ascii_lowercase().starts_with(&prefix) {
            continue;
        }
        let others: Vec<String> = walk
            .entries
            .iter()
            .filter(|(_, o)| {
                !o.is_dir
                    && o.loc.first_cluster == e.loc.first_cluster
                    && o.loc.offset != e.loc.offset
                    && !detached.contains(&o.loc.offset)
            })
            .map(|(op, _)| op.clone())
            .collect();
        if !others.is_empty() {
            detached.push(e.loc.offset);
            out.push((p.clone(), others));
        }
    }
    Ok(out)
}

/// A bitmap of every cluster some directory entry's chain (file or directory) reaches,
/// FAT32's root included; `None` when part of the tree could not be walked, so that
/// nothing is taken for lost that a hidden directory may use.
pub(crate) fn referenced_clusters<D: Read + Seek>(
    dev: &mut D,
    g: &Geo,
) -> io::Result<Option<Vec<u64>>> {
    let walk = walk_all(dev, g)?;
    if !walk.complete {
        return Ok(None);
    }
    let mut used = vec![0u64; (g.max_cluster as usize).div_ceil(64)];
    let mut starts: Vec<u32> = walk
        .entries
        .iter()
        .map(|(_, e)| e.loc.first_cluster)
        .collect();
    if g.fat32 {
        starts.push(g.root_cluster);
    }
    for first in starts {
        let mut c = first;
        while (2..g.max_cluster).contains(&c) {
            let (word, bit) = (c as usize / 64, c % 64);
            if used[word] & (1 << bit) != 0 {
                // Reached a cluster already marked: the rest of this chain is too.
                break;
            }
            used[word] |= 1 << bit;
            c = next_cluster(dev, g, c)?;
        }
    }
    Ok(Some(used))
}

/// Whether the volume is marked as not cleanly unmounted: the status byte of the boot
/// sector (where `fatfs` and Linux set it while writing) or the clean bit of FAT[1].
pub fn is_dirty<D: Read + Seek>(dev: &mut D, part: u64) -> Result<bool, SwapError> {
    let g = geometry(dev, part)?;
    let mut b = [0u8; 1];
    dev.seek(SeekFrom::Start(part + status_byte(&g)))?;
    dev.read_exact(&mut b)?;
    let fat1 = next_cluster_raw(dev, &g, 1)?;
    Ok(b[0] & 1 != 0 || fat1 & clean_bit(&g) == 0)
}

/// Clears both dirty marks (see [`is_dirty`]); for after the leftovers are repaired.
pub fn clear_dirty<D: Read + Write + Seek>(dev: &mut D, part: u64) -> Result<(), SwapError> {
    let g = geometry(dev, part)?;
    let mut b = [0u8; 1];
    let at = part + status_byte(&g);
    dev.seek(SeekFrom::Start(at))?;
    dev.read_exact(&mut b)?;
    b[0] &= !1;
    dev.seek(SeekFrom::Start(at))?;
    dev.write_all(&b)?;
    let width = if g.fat32 { 4 } else { 2 };
    for copy in 0..g.fats {
        let at = g.fat_offset + copy * g.fat_bytes + width;
        let mut e = vec![0u8; width as usize];
        dev.seek(SeekFrom::Start(at))?;
        dev.read_exact(&mut e)?;
        if g.fat32 {
            let v = u32_at(&e, 0) | clean_bit(&g);
            e.copy_from_slice(&v.to_le_bytes());
        } else {
            let v = u16_at(&e, 0) | clean_bit(&g) as u16;
            e.copy_from_slice(&v.to_le_bytes());
        }
        dev.seek(SeekFrom::Start(at))?;
        dev.write_all(&e)?;
    }
    dev.flush()?;
    Ok(())
}

/// Offset in the boot sector of the byte whose bit 0 says "dirty".
fn status_byte(g: &Geo) -> u64 {
    if g.fat32 { 0x41 } else { 0x25 }
}

/// The bit of FAT[1] that is set while the volume is clean.
fn clean_bit(g: &Geo) -> u32 {
    if g.fat32 { 1 << 27 } else { 1 << 15 }
}

/// A FAT entry with its reserved bits (FAT[1] keeps flags there).
fn next_cluster_raw<D: Read + Seek>(dev: &mut D, g: &Geo, c: u32) -> io::Result<u32> {
    if g.fat32 {
        dev.seek(SeekFrom::Start(g.fat_offset + u64::from(c) * 4))?;
        read_u32(dev)
    } else {
        next_cluster(dev, g, c)
    }
}

/// Makes the directory entry of `path` name no clusters (first cluster and size 0) in
/// one sector write: removing it afterwards frees nothing. For a name whose chain
/// another entry still uses ([`other_names_of_chain`]); the caller syncs.
pub fn detach<D: Read + Write + Seek>(dev: &mut D, part: u64, path: &str) -> Result<(), SwapError> {
    let e = find_entry(dev, part, path)?;
    let sector = e.offset / SECTOR * SECTOR;
    let at = (e.offset - sector) as usize;
    let mut s = read_sector(dev, sector)?;
    // First cluster high (20..22) and low (26..28) halves, size (28..32).
    s[at + 20..at + 22].fill(0);
    s[at + 26..at + 32].fill(0);
    write_sector(dev, sector, &s)?;
    Ok(())
}

/// A device seen through writes kept in memory: reads return what the device holds
/// with every earlier write of this view laid over it, and nothing reaches the device.
/// For a dry run that must show the stick as a command would find it after
/// `persist::merge::replace::repair_leftovers`, while writing nothing.
pub struct MemoryWrites<D> {
    inner: D,
    pos: u64,
    /// Whole sectors, by device offset, as this view has written them.
    sectors: std::collections::BTreeMap<u64, Vec<u8>>,
}

impl<D: Read + Seek> MemoryWrites<D> {
    pub fn new(inner: D) -> MemoryWrites<D> {
        MemoryWrites {
            inner,
            pos: 0,
            sectors: std::collections::BTreeMap::new(),
        }
    }

    /// The device's sector at `at`, zeros past its end (as a write there would leave).
    fn device_sector(&mut self, at: u64) -> io::Result<Vec<u8>> {
        let mut s = vec![0u8; SECTOR as usize];
        self.inner.seek(SeekFrom::Start(at))?;
        let mut got = 0;
        while got < s.len() {
            match self.inner.read(&mut s[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(s)
    }
}

impl<D: Read + Seek> Read for MemoryWrites<D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.seek(SeekFrom::Start(self.pos))?;
        let n = self.inner.read(buf)?;
        let (start, end) = (self.pos, self.pos + n as u64);
        let first = start / SECTOR * SECTOR;
        for (&at, s) in self.sectors.range(first..end) {
            let from = at.max(start);
            let to = (at + SECTOR).min(end);
            buf[(from - start) as usize..(to - start) as usize]
                .copy_from_slice(&s[(from - at) as usize..(to - at) as usize]);
        }
        self.pos = end;
        Ok(n)
    }
}

impl<D: Read + Seek> Write for MemoryWrites<D> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let (start, end) = (self.pos, self.pos + buf.len() as u64);
        let mut at = start / SECTOR * SECTOR;
        while at < end {
            let mut s = match self.sectors.remove(&at) {
                Some(s) => s,
                None => self.device_sector(at)?,
            };
            let from = at.max(start);
            let to = (at + SECTOR).min(end);
            s[(from - at) as usize..(to - at) as usize]
                .copy_from_slice(&buf[(from - start) as usize..(to - start) as usize]);
            self.sectors.insert(at, s);
            at += SECTOR;
        }
        self.pos = end;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<D: Read + Seek> Seek for MemoryWrites<D> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let base = match to {
            SeekFrom::Start(n) => {
                self.pos = n;
                return Ok(n);
            }
            SeekFrom::Current(d) => (self.pos, d),
            SeekFrom::End(d) => (self.inner.seek(SeekFrom::End(0))?, d),
        };
        self.pos = base
            .0
            .checked_add_signed(base.1)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn a_long_name_belongs_to_the_entry_whose_checksum_it_carries() {
        // The checksum of "README  TXT", as the FAT specification computes it.
        assert_eq!(short_name_checksum(b"README  TXT"), 0x73);
        let len = 64u64 << 20;
        let mut dev = crate::io::MemDevice::new(len);
        let path = "/LiveOS/overlay-LIVE-1234-ABCD";
        {
            let mut window = crate::io::PartitionWindow::new(&mut dev, 0, len);
            crate::disk::fat::MadeFat::plain(len, "LIVE", 1, 0)
                .unwrap()
                .load(&mut window)
                .unwrap();
            let fs = crate::disk::fat::open(&mut window).unwrap();
            crate::disk::fat::write_file(&fs, path, &mut &b"x"[..], 1, |_| {}).unwrap();
            fs.unmount().unwrap();
            window.flush().unwrap();
        }
        let entry = find_entry(&mut dev, 0, path).unwrap();
        assert_eq!(entry.size, 1);
        // A long-name slot whose checksum is not its short entry's (stale, or
        // left by another tool) does not name it: the file is found by its short
        // name only.
        let g = geometry(&mut dev, 0).unwrap();
        let mut slot = [0u8; 32];
        dev.seek(SeekFrom::Start(entry.offset - 32)).unwrap();
        dev.read_exact(&mut slot).unwrap();
        assert_eq!(
            slot[11], 0x0f,
            "the slot before the entry is a long-name slot"
        );
        slot[13] = slot[13].wrapping_add(1);
        dev.seek(SeekFrom::Start(entry.offset - 32)).unwrap();
        dev.write_all(&slot).unwrap();
        assert!(find_entry(&mut dev, 0, path).is_err());
        let live = find_in_dir(&mut dev, &g, g.root_cluster, "LiveOS")
            .unwrap()
            .expect("LiveOS");
        let names: Vec<String> = read_dir(&mut dev, &g, live.loc.first_cluster)
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert!(names.iter().any(|n| n.starts_with("OVERLA")), "{names:?}");
    }

    /// A root directory whose cluster chain loops, or runs past the 65536 entries a
    /// directory can hold, is refused as damage instead of read over and over (a
    /// loop made a dry run read gigabytes before the chain check refused it).
    #[test]
    fn a_directory_chain_that_loops_or_runs_on_is_refused() {
        let len = 64u64 << 20;
        let fresh = || {
            let mut dev = crate::io::MemDevice::new(len);
            let mut window = crate::io::PartitionWindow::new(&mut dev, 0, len);
            crate::disk::fat::MadeFat::plain(len, "LIVE", 1, 0)
                .unwrap()
                .load(&mut window)
                .unwrap();
            window.flush().unwrap();
            drop(window);
            dev
        };
        let link = |dev: &mut crate::io::MemDevice, g: &Geo, from: u32, to: u32| {
            for copy in 0..g.fats {
                let at = g.fat_offset + copy * g.fat_bytes + u64::from(from) * 4;
                dev.seek(SeekFrom::Start(at)).unwrap();
                dev.write_all(&to.to_le_bytes()).unwrap();
            }
        };
        let refused = |dev: &mut crate::io::MemDevice| match find_entry(dev, 0, "/LiveOS/home.img")
        {
            Err(SwapError::Io(e)) => {
                assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
                assert!(e.to_string().contains("damaged"), "{e}");
            }
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("found a file in a damaged directory"),
        };

        let mut dev = fresh();
        let g = geometry(&mut dev, 0).unwrap();
        assert_eq!(g.cluster_bytes, 512);
        link(&mut dev, &g, g.root_cluster, g.root_cluster);
        refused(&mut dev);

        // 4097 clusters of 512 bytes: one past a directory's 2 MiB.
        let mut dev = fresh();
        let root = g.root_cluster;
        for c in root..root + 4096 {
            link(&mut dev, &g, c, c + 1);
        }
        link(&mut dev, &g, root + 4096, 0x0fff_ffff);
        refused(&mut dev);
        // 4096 of them are a directory, if a full one.
        link(&mut dev, &g, root + 4095, 0x0fff_ffff);
        assert!(matches!(
            find_entry(&mut dev, 0, "/LiveOS/home.img"),
            Err(SwapError::NotFound(_))
        ));
    }

    #[test]
    fn memory_writes_are_read_back_and_never_reach_the_device() {
        let device: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let mut view = MemoryWrites::new(Cursor::new(device.clone()));
        // Across a sector boundary, and a second write over part of the first.
        view.seek(SeekFrom::Start(500)).unwrap();
        view.write_all(&[0xaa; 30]).unwrap();
        view.seek(SeekFrom::Start(510)).unwrap();
        view.write_all(&[0xbb; 4]).unwrap();
        let mut want = device.clone();
        want[500..530].fill(0xaa);
        want[510..514].fill(0xbb);
        let mut got = Vec::new();
        view.seek(SeekFrom::Start(0)).unwrap();
        view.read_to_end(&mut got).unwrap();
        assert_eq!(got, want);
        // A read that starts inside a written sector.
        let mut part = [0u8; 8];
        view.seek(SeekFrom::Start(508)).unwrap();
        view.read_exact(&mut part).unwrap();
        assert_eq!(part, want[508..516]);
        assert_eq!(view.seek(SeekFrom::End(-1)).unwrap(), 4095);
        assert_eq!(view.inner.get_ref(), &device, "the device is untouched");
    }
}
