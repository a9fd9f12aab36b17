//! Giving a FAT file its clusters without writing them.
//!
//! An overlay, home or swap image is gigabytes of which only a few MiB carry data
//! (a header, ext4 metadata). `fatfs` can only make a file longer by writing every
//! byte of it, which on a USB stick costs minutes. Here a file that `fatfs` created
//! empty gets a cluster chain in every FAT copy, a matching FSInfo, and its size in
//! its directory entry; the data clusters keep whatever the stick held before. The
//! caller writes the bytes that matter through the returned extents and makes the
//! rest safe by construction (see `disk::wipe`).
//!
//! The chain is written before the directory entry points at it, so an interrupted
//! allocation leaves lost clusters (which `fsck.fat` reclaims), never a file whose
//! chain is half-made.

use std::io::{self, Read, Seek, SeekFrom, Write};

use thiserror::Error;

use crate::bytes::{put_u16, put_u32, u16_at, u32_at};
use crate::disk::fat_raw::{self, Geo, SwapError};

#[derive(Debug, Error)]
pub enum AllocError {
    #[error(transparent)]
    Fat(#[from] SwapError),
    #[error("I/O error on the stick: {0}")]
    Io(#[from] io::Error),
    #[error(
        "{path} needs {needed} free clusters but the filesystem has {free}; free space on the stick or ask for a smaller size"
    )]
    NoSpace {
        path: String,
        needed: u64,
        free: u64,
    },
    #[error("{0} already has data; only an empty file can be allocated in place")]
    NotEmpty(String),
    #[error("{path} is {size} bytes; FAT files must stay below 4 GiB (4095 MiB)")]
    TooLarge { path: String, size: u64 },
}

impl crate::error::Classify for AllocError {
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::Io
    }
}

/// FAT32 end-of-chain mark (the top four bits of an entry are reserved).
const FAT32_EOC: u32 = 0x0fff_ffff;
const FAT16_EOC: u32 = 0xffff;
/// How much of a FAT is read or written per request.
const FAT_CHUNK: u64 = 1 << 20;

/// Allocates `size` bytes of clusters to the empty file `path` on the FAT filesystem
/// that starts at `part` in `dev`, preferring one contiguous run. Returns the file's
/// data extents as `(device offset, length)` in file order, `length` summing to `size`.
/// No FAT driver may have the filesystem open.
pub fn allocate<D: Read + Write + Seek>(
    dev: &mut D,
    part: u64,
    path: &str,
    size: u64,
) -> Result<Vec<(u64, u64)>, AllocError> {
    let (g, entry) = empty_entry(dev, part, path, size)?;
    let needed = size.div_ceil(g.cluster_bytes);
    let clusters = if needed == 0 {
        Vec::new()
    } else {
        let free = free_clusters(dev, &g, needed)?;
        if (free.len() as u64) < needed {
            return Err(AllocError::NoSpace {
                path: path.to_string(),
                needed,
                free: count_free(dev, &g)?,
            });
        }
        free
    };
    give_chain(dev, &g, entry, &clusters, size)
}

/// Gives the empty file `path` exactly `clusters` (free ones, in file order) for its
/// `size` bytes: a file whose place was decided elsewhere, such as SYSLINUX's loader,
/// whose boot sector names the sectors it lies in. Returns its data extents.
pub fn place<D: Read + Write + Seek>(
    dev: &mut D,
    part: u64,
    path: &str,
    clusters: &[u32],
    size: u64,
) -> Result<Vec<(u64, u64)>, AllocError> {
    let (g, entry) = empty_entry(dev, part, path, size)?;
    if clusters.len() as u64 != size.div_ceil(g.cluster_bytes) {
        return Err(AllocError::Fat(SwapError::Unsupported(format!(
            "{path}: {} clusters cannot hold exactly {size} bytes",
            clusters.len()
        ))));
    }
    let limit = cluster_limit(&g);
    for &c in clusters {
        if !(2..limit).contains(&c) || fat_raw::next_cluster(dev, &g, c)? != 0 {
            return Err(AllocError::Fat(SwapError::Unsupported(format!(
                "{path}: cluster {c} is not free"
            ))));
        }
    }
    give_chain(dev, &g, entry, clusters, size)
}

/// The geometry and the entry of `path`, which must be an empty file; `size` must fit FAT.
fn empty_entry<D: Read + Seek>(
    dev: &mut D,
    part: u64,
    path: &str,
    size: u64,
) -> Result<(Geo, fat_raw::EntryLoc), AllocError> {
    if size > u64::from(u32::MAX) {
        return Err(AllocError::TooLarge {
            path: path.to_string(),
            size,
        });
    }
    let g = fat_raw::geometry(dev, part)?;
    let entry = fat_raw::find_entry(dev, part, path)?;
    if entry.first_cluster != 0 || entry.size != 0 {
        return Err(AllocError::NotEmpty(path.to_string()));
    }
    Ok((g, entry))
}

/// Links `clusters` into a chain in every FAT, updates FSInfo, then points the entry
/// at the chain with its size.
fn give_chain<D: Read + Write + Seek>(
    dev: &mut D,
    g: &Geo,
    entry: fat_raw::EntryLoc,
    clusters: &[u32],
    size: u64,
) -> Result<Vec<(u64, u64)>, AllocError> {
    write_chain(dev, g, clusters)?;
    update_fsinfo(dev, g, clusters)?;
    // The entry last: until now nothing points at the new chain.
    // Bytes 20..32 of the entry in one write (one sector): both halves of the first
    // cluster and the size change together, or not at all. Bytes 22..26 (time and
    // date) stay as fatfs wrote them.
    let first = clusters.first().copied().unwrap_or(0);
    let mut fields = [0u8; 12];
    dev.seek(SeekFrom::Start(entry.offset + 20))?;
    dev.read_exact(&mut fields)?;
    put_u16(&mut fields, 0, (first >> 16) as u16);
    put_u16(&mut fields, 6, first as u16);
    put_u32(&mut fields, 8, size as u32);
    dev.seek(SeekFrom::Start(entry.offset + 20))?;
    dev.write_all(&fields)?;
    dev.flush()?;
    Ok(fat_raw::cluster_extents(g, clusters, size))
}

/// FAT32's bad-cluster mark: every FAT driver's allocator passes over it.
const FAT32_BAD: u32 = 0x0fff_fff7;

/// Sets the free clusters `clusters` aside (FAT32 only) so that no FAT driver
/// allocates them until [`release`]: room kept for files placed later with
/// [`place`]. They are marked bad, which `fsck.fat` would report if the
/// filesystem were left so; the caller releases them before it is done.
pub fn reserve<D: Read + Write + Seek>(
    dev: &mut D,
    part: u64,
    clusters: std::ops::Range<u32>,
) -> Result<(), AllocError> {
    let g = fat_raw::geometry(dev, part)?;
    if !g.fat32 || clusters.start < 2 || clusters.end > cluster_limit(&g) {
        return Err(AllocError::Fat(SwapError::Unsupported(format!(
            "clusters {clusters:?} cannot be set aside on this filesystem"
        ))));
    }
    let mut bytes = read_entries(dev, &g, &clusters)?;
    if bytes.chunks_exact(4).any(|e| entry_value(&g, e) != 0) {
        return Err(AllocError::Fat(SwapError::Unsupported(format!(
            "clusters {clusters:?} are not all free"
        ))));
    }
    for e in bytes.chunks_exact_mut(4) {
        let reserved = u32_at(e, 0) & !FAT32_EOC;
        put_u32(e, 0, reserved | FAT32_BAD);
    }
    write_entries(dev, &g, clusters.start, &bytes)?;
    recount_fsinfo(dev, &g)?;
    dev.flush()?;
    Ok(())
}

/// The last clusters of the filesystem that `bytes` take: room at the end, where
/// setting it aside leaves no hole among the files written from the start.
pub fn last_clusters<D: Read + Seek>(
    dev: &mut D,
    part: u64,
    bytes: u64,
) -> Result<std::ops::Range<u32>, AllocError> {
    let g = fat_raw::geometry(dev, part)?;
    let limit = cluster_limit(&g);
    let count = u32::try_from(bytes.div_ceil(g.cluster_bytes)).unwrap_or(u32::MAX);
    Ok(limit.saturating_sub(count).max(2)..limit)
}

/// Frees what [`reserve`] set aside in `clusters` and is still marked so.
pub fn release<D: Read + Write + Seek>(
    dev: &mut D,
    part: u64,
    clusters: std::ops::Range<u32>,
) -> Result<(), AllocError> {
    let g = fat_raw::geometry(dev, part)?;
    if g.fat32 {
        let mut bytes = read_entries(dev, &g, &clusters)?;
        let mut changed = false;
        for e in bytes.chunks_exact_mut(4) {
            if entry_value(&g, e) == FAT32_BAD {
                // The top four bits are reserved and stay.
                let reserved = u32_at(e, 0) & !FAT32_EOC;
                put_u32(e, 0, reserved);
                changed = true;
            }
        }
        if changed {
            write_entries(dev, &g, clusters.start, &bytes)?;
        }
    }
    recount_fsinfo(dev, &g)?;
    dev.flush()?;
    Ok(())
}

/// Makes the file at `path` `new_size` bytes long by appending clusters to its chain
/// (preferring the ones right after its last cluster); the old bytes stay where they
/// are and the new ones keep whatever the stick held. Returns the extents of the
/// whole file. No FAT driver may have the filesystem open.
pub fn extend<D: Read + Write + Seek>(
    dev: &mut D,
    part: u64,
    path: &str,
    new_size: u64,
) -> Result<Vec<(u64, u64)>, AllocError> {
    extend_with(dev, part, path, new_size, |_, _| Ok(()))
}

/// [`extend`], calling `prepare` with the device and the file's new extents after the
/// chain is linked and before the directory entry gives the file its new size: the
/// place to write what must be in the new space before anyone can read it.
pub fn extend_with<D: Read + Write + Seek>(
    dev: &mut D,
    part: u64,
    path: &str,
    new_size: u64,
    prepare: impl FnOnce(&mut D, &[(u64, u64)]) -> io::Result<()>,
) -> Result<Vec<(u64, u64)>, AllocError> {
    if new_size > u64::from(u32::MAX) {
        return Err(AllocError::TooLarge {
            path: path.to_string(),
            size: new_size,
        });
    }
    let g = fat_raw::geometry(dev, part)?;
    let entry = fat_raw::find_entry(dev, part, path)?;
    if entry.first_cluster == 0 {
        return Err(AllocError::Fat(SwapError::Unsupported(format!(
            "{path} is empty: it has no cluster chain to extend"
        ))));
    }
    // The existing chain, bounded so a looping one cannot hang us.
    let limit = cluster_limit(&g);
    let mut chain = vec![entry.first_cluster];
    loop {
        let last = chain[chain.len() - 1];
        let next = fat_raw::next_cluster(dev, &g, last)?;
        if !(2..limit).contains(&next) {
            break;
        }
        if chain.len() as u64 > u64::from(limit) {
            return Err(AllocError::Fat(SwapError::Unsupported(format!(
                "{path}: its cluster chain loops"
            ))));
        }
        chain.push(next);
    }
    let needed = new_size.div_ceil(g.cluster_bytes).max(1);
    if u64::from(entry.size) > new_size {
        return Err(AllocError::NotEmpty(format!(
            "{path} is already larger than {new_size} bytes"
        )));
    }
    if needed < chain.len() as u64 {
        // A grow stopped before it set the size left clusters past the file's end:
        // the chain is cut where the new size ends (the end mark first, so that a
        // stop here leaves lost clusters, never a cross-link) and the rest freed.
        let excess: std::collections::HashSet<u32> =
            chain[needed as usize..].iter().copied().collect();
        write_chain(dev, &g, &chain[needed as usize - 1..needed as usize])?;
        free_clusters_in_fat(dev, &g, |c| excess.contains(&c))?;
        recount_fsinfo(dev, &g)?;
        chain.truncate(needed as usize);
    }
    let have = chain.len() as u64;
    let added = needed - have;
    let last = chain[chain.len() - 1];
    let fresh = if added == 0 {
        Vec::new()
    } else {
        let after = free_run_after(dev, &g, last, added)?;
        let fresh = match after {
            Some(run) => run,
            None => free_clusters(dev, &g, added)?,
        };
        if (fresh.len() as u64) < added {
            return Err(AllocError::NoSpace {
                path: path.to_string(),
                needed: added,
                free: count_free(dev, &g)?,
            });
        }
        fresh
    };
    // The new clusters, linked from the old last one: written as one chain.
    let mut tail = vec![last];
    tail.extend_from_slice(&fresh);
    write_chain(dev, &g, &tail)?;
    update_fsinfo(dev, &g, &fresh)?;
    chain.extend_from_slice(&fresh);
    let all = fat_raw::cluster_extents(&g, &chain, new_size);
    prepare(dev, &all)?;
    // The size last: until it changes, the file is the old one plus lost clusters.
    dev.seek(SeekFrom::Start(entry.offset + 28))?;
    dev.write_all(&(new_size as u32).to_le_bytes())?;
    dev.flush()?;
    Ok(all)
}

/// `count` free clusters right after `last`, if they are all free.
fn free_run_after<D: Read + Seek>(
    dev: &mut D,
    g: &Geo,
    last: u32,
    count: u64,
) -> io::Result<Option<Vec<u32>>> {
    let first = u64::from(last) + 1;
    if first + count > u64::from(cluster_limit(g)) {
        return Ok(None);
    }
    let width = entry_width(g);
    let mut buf = vec![0u8; FAT_CHUNK as usize];
    let mut at = first;
    while at < first + count {
        let n = ((first + count - at) * width).min(FAT_CHUNK) / width;
        let bytes = (n * width) as usize;
        dev.seek(SeekFrom::Start(g.fat_offset + at * width))?;
        dev.read_exact(&mut buf[..bytes])?;
        if buf[..bytes]
            .chunks_exact(width as usize)
            .any(|e| entry_value(g, e) != 0)
        {
            return Ok(None);
        }
        at += n;
    }
    Ok(Some((first as u32..(first + count) as u32).collect()))
}

/// Removes the file `path` without a FAT driver: its directory slots are marked deleted,
/// then its chain is freed in every FAT copy (a crash between leaves lost clusters,
/// which [`reclaim_lost`] frees). For small files the repair code writes itself.
pub fn remove_file<D: Read + Write + Seek>(
    dev: &mut D,
    part: u64,
    path: &str,
) -> Result<(), AllocError> {
    let g = fat_raw::geometry(dev, part)?;
    let first = fat_raw::delete_entry(dev, &g, path)?;
    let mut chain = Vec::new();
    let mut c = first;
    while (2..g.max_cluster).contains(&c) && chain.len() < g.max_cluster as usize {
        chain.push(c);
        c = fat_raw::next_cluster(dev, &g, c)?;
    }
    let chain: std::collections::HashSet<u32> = chain.into_iter().collect();
    free_clusters_in_fat(dev, &g, |c| chain.contains(&c))?;
    recount_fsinfo(dev, &g)?;
    dev.flush()?;
    Ok(())
}

/// Frees every allocated cluster that no directory entry's chain reaches (what an
/// interrupted swap, allocation or FAT driver leaves), in every FAT copy, and puts the
/// true free count into FSInfo. Returns how many clusters were freed; 0 without a
/// change when part of the directory tree cannot be walked.
pub fn reclaim_lost<D: Read + Write + Seek>(dev: &mut D, part: u64) -> Result<u64, AllocError> {
    let g = fat_raw::geometry(dev, part)?;
    let Some(used) = fat_raw::referenced_clusters(dev, &g)? else {
        return Ok(0);
    };
    let is_used = |c: u32| used[c as usize / 64] & (1 << (c % 64)) != 0;
    let bad = if g.fat32 { 0x0fff_fff7 } else { 0xfff7 };
    let mut lost = Vec::new();
    scan_fat(dev, &g, |c, v| {
        if v != 0 && v != bad && !is_used(c) {
            lost.push(c);
        }
        true
    })?;
    if lost.is_empty() {
        return Ok(0);
    }
    let lost_set: std::collections::HashSet<u32> = lost.iter().copied().collect();
    free_clusters_in_fat(dev, &g, |c| lost_set.contains(&c))?;
    recount_fsinfo(dev, &g)?;
    dev.flush()?;
    Ok(lost.len() as u64)
}

/// Makes the next file any FAT driver writes start at cluster `first` (FAT32, with
/// `first - 1` free): FSInfo's next-free hint names the cluster before it, which
/// mtools takes as the last one allocated, and that cluster is set aside
/// ([`reserve`]), so a driver that takes the hint as the next free cluster passes
/// over it to `first` as well. No scan over the clusters before it.
pub fn start_next_file_at<D: Read + Write + Seek>(
    dev: &mut D,
    part: u64,
    first: u32,
) -> Result<(), AllocError> {
    let before = first.saturating_sub(1);
    reserve(dev, part, before..first)?;
    set_next_free_hint(dev, part, before)?;
    dev.flush()?;
    Ok(())
}

/// Sets FSInfo's next-free hint (FAT32) to "unknown", so that the next driver to
/// allocate searches from the first cluster. Drivers read the hint differently (fatfs
/// writes the next free cluster, mtools takes it as the last one allocated and starts
/// after it): one that started past a free cluster would leave it a hole for good.
pub fn forget_next_free<D: Read + Write + Seek>(dev: &mut D, part: u64) -> Result<(), AllocError> {
    set_next_free_hint(dev, part, u32::MAX)
}

/// Writes `hint` as FSInfo's next-free cluster, when the volume keeps FSInfo.
fn set_next_free_hint<D: Read + Write + Seek>(
    dev: &mut D,
    part: u64,
    hint: u32,
) -> Result<(), AllocError> {
    let g = fat_raw::geometry(dev, part)?;
    if let Some((at, _)) = fsinfo(dev, &g)? {
        dev.seek(SeekFrom::Start(at + 492))?;
        dev.write_all(&hint.to_le_bytes())?;
    }
    Ok(())
}

/// Where the FSInfo sector is and what it holds (FAT32, with both signatures).
fn fsinfo<D: Read + Seek>(dev: &mut D, g: &Geo) -> io::Result<Option<(u64, [u8; 512])>> {
    let Some(at) = g.fsinfo else {
        return Ok(None);
    };
    let mut sector = [0u8; 512];
    dev.seek(SeekFrom::Start(at))?;
    dev.read_exact(&mut sector)?;
    let signed = &sector[0..4] == b"RRaA" && &sector[484..488] == b"rrAa";
    Ok(signed.then_some((at, sector)))
}

/// Puts the true free cluster count into FSInfo (FAT32), after clusters were freed
/// or where the count may be stale. A count already right is left unwritten.
pub(crate) fn recount_fsinfo<D: Read + Write + Seek>(dev: &mut D, g: &Geo) -> io::Result<()> {
    if let Some((at, sector)) = fsinfo(dev, g)? {
        let free = u32::try_from(count_free(dev, g)?).unwrap_or(u32::MAX);
        if u32_at(&sector, 488) != free {
            dev.seek(SeekFrom::Start(at + 488))?;
            dev.write_all(&free.to_le_bytes())?;
        }
    }
    Ok(())
}

/// Sets to free every FAT entry whose cluster `free` picks, chunk by chunk, in every copy.
fn free_clusters_in_fat<D: Read + Write + Seek>(
    dev: &mut D,
    g: &Geo,
    free: impl Fn(u32) -> bool,
) -> io::Result<()> {
    let width = entry_width(g);
    let limit = u64::from(cluster_limit(g));
    let mut cluster = 2u64;
    let mut buf = vec![0u8; FAT_CHUNK as usize];
    while cluster < limit {
        let count = ((limit - cluster) * width).min(FAT_CHUNK) / width;
        let bytes = (count * width) as usize;
        dev.seek(SeekFrom::Start(g.fat_offset + cluster * width))?;
        dev.read_exact(&mut buf[..bytes])?;
        let mut changed = false;
        for (i, e) in buf[..bytes].chunks_exact_mut(width as usize).enumerate() {
            if free((cluster + i as u64) as u32) {
                if g.fat32 {
                    // The top four bits are reserved and stay.
                    let reserved = u32_at(e, 0) & !FAT32_EOC;
                    put_u32(e, 0, reserved);
                } else {
                    put_u16(e, 0, 0);
                }
                changed = true;
            }
        }
        if changed {
            write_entries(dev, g, cluster as u32, &buf[..bytes])?;
        }
        cluster += count;
    }
    Ok(())
}

fn entry_width(g: &Geo) -> u64 {
    if g.fat32 { 4 } else { 2 }
}

/// One past the highest cluster both the boot sector and the FAT's size allow.
fn cluster_limit(g: &Geo) -> u32 {
    let by_fat = g.fat_bytes / entry_width(g);
    g.max_cluster.min(u32::try_from(by_fat).unwrap_or(u32::MAX))
}

fn entry_value(g: &Geo, bytes: &[u8]) -> u32 {
    if g.fat32 {
        u32_at(bytes, 0) & FAT32_EOC
    } else {
        u32::from(u16_at(bytes, 0))
    }
}

/// The entries of `clusters` in the first FAT, as stored.
fn read_entries<D: Read + Seek>(
    dev: &mut D,
    g: &Geo,
    clusters: &std::ops::Range<u32>,
) -> io::Result<Vec<u8>> {
    let width = entry_width(g);
    let count = u64::from(clusters.end.saturating_sub(clusters.start));
    let mut bytes = vec![0u8; (count * width) as usize];
    dev.seek(SeekFrom::Start(
        g.fat_offset + u64::from(clusters.start) * width,
    ))?;
    dev.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// Writes `bytes` as the entries from cluster `first` on, in every FAT copy.
fn write_entries<D: Write + Seek>(
    dev: &mut D,
    g: &Geo,
    first: u32,
    bytes: &[u8],
) -> io::Result<()> {
    let at = u64::from(first) * entry_width(g);
    for copy in 0..g.fats {
        dev.seek(SeekFrom::Start(g.fat_offset + copy * g.fat_bytes + at))?;
        dev.write_all(bytes)?;
    }
    Ok(())
}

/// Calls `visit(cluster, value)` for every cluster from 2 on, reading the first FAT
/// in large requests; stops when `visit` returns false.
fn scan_fat<D: Read + Seek>(
    dev: &mut D,
    g: &Geo,
    mut visit: impl FnMut(u32, u32) -> bool,
) -> io::Result<()> {
    let width = entry_width(g);
    let limit = u64::from(cluster_limit(g));
    let mut cluster = 2u64;
    let mut buf = vec![0u8; FAT_CHUNK as usize];
    while cluster < limit {
        let count = ((limit - cluster) * width).min(FAT_CHUNK) / width;
        let bytes = (count * width) as usize;
        dev.seek(SeekFrom::Start(g.fat_offset + cluster * width))?;
        dev.read_exact(&mut buf[..bytes])?;
        for (i, e) in buf[..bytes].chunks_exact(width as usize).enumerate() {
            if !visit((cluster + i as u64) as u32, entry_value(g, e)) {
                return Ok(());
            }
        }
        cluster += count;
    }
    Ok(())
}

/// `needed` free clusters: the first contiguous run long enough, or else the first
/// free clusters in disk order (a fragmented file still reads in device order).
fn free_clusters<D: Read + Seek>(dev: &mut D, g: &Geo, needed: u64) -> io::Result<Vec<u32>> {
    let mut run_start = 0u32;
    let mut run_len = 0u64;
    let mut found = None;
    scan_fat(dev, g, |c, v| {
        if v == 0 {
            if run_len == 0 {
                run_start = c;
            }
            run_len += 1;
            if run_len == needed {
                found = Some(run_start);
                return false;
            }
        } else {
            run_len = 0;
        }
        true
    })?;
    if let Some(start) = found {
        return Ok((start..start + needed as u32).collect());
    }
    let mut scattered = Vec::new();
    scan_fat(dev, g, |c, v| {
        if v == 0 {
            scattered.push(c);
        }
        (scattered.len() as u64) < needed
    })?;
    Ok(scattered)
}

fn count_free<D: Read + Seek>(dev: &mut D, g: &Geo) -> io::Result<u64> {
    let mut free = 0u64;
    scan_fat(dev, g, |_, v| {
        free += u64::from(v == 0);
        true
    })?;
    Ok(free)
}

/// Links `clusters` in order, the last one marked end-of-chain, in every FAT copy.
/// Consecutive clusters are written as one request.
fn write_chain<D: Read + Write + Seek>(dev: &mut D, g: &Geo, clusters: &[u32]) -> io::Result<()> {
    let width = entry_width(g) as usize;
    let mut i = 0;
    while i < clusters.len() {
        // A stretch of consecutive cluster numbers, at most one chunk of FAT.
        let mut j = i + 1;
        while j < clusters.len()
            && clusters[j] == clusters[j - 1] + 1
            && ((j - i + 1) * width) as u64 <= FAT_CHUNK
        {
            j += 1;
        }
        let first = u64::from(clusters[i]);
        let mut bytes = vec![0u8; (j - i) * width];
        dev.seek(SeekFrom::Start(g.fat_offset + first * width as u64))?;
        dev.read_exact(&mut bytes)?;
        for (k, e) in bytes.chunks_exact_mut(width).enumerate() {
            let next = match clusters.get(i + k + 1) {
                Some(&n) => n,
                None if g.fat32 => FAT32_EOC,
                None => FAT16_EOC,
            };
            if g.fat32 {
                let reserved = u32_at(e, 0) & !FAT32_EOC;
                put_u32(e, 0, reserved | next);
            } else {
                put_u16(e, 0, next as u16);
            }
        }
        write_entries(dev, g, clusters[i], &bytes)?;
        i = j;
    }
    Ok(())
}

/// FSInfo's free count and next-free hint, when the volume keeps them.
fn update_fsinfo<D: Read + Write + Seek>(dev: &mut D, g: &Geo, clusters: &[u32]) -> io::Result<()> {
    let Some(&last) = clusters.last() else {
        return Ok(());
    };
    let Some((at, mut sector)) = fsinfo(dev, g)? else {
        return Ok(());
    };
    let free = u32_at(&sector, 488);
    // 0xffffffff means "unknown"; it stays unknown rather than becoming a wrong number.
    let free = if free == u32::MAX {
        free
    } else {
        free.saturating_sub(clusters.len() as u32)
    };
    put_u32(&mut sector, 488, free);
    // The hint must name a cluster of the volume; past the last one it is "unknown".
    let hint = if last + 1 < g.max_cluster {
        last + 1
    } else {
        u32::MAX
    };
    put_u32(&mut sector, 492, hint);
    dev.seek(SeekFrom::Start(at + 488))?;
    dev.write_all(&sector[488..496])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::fat;
    use crate::io::PartitionWindow;

    /// An 80 MiB image with a FAT32 partition at 1 MiB holding `files` as empty files,
    /// and `busy` bytes of a file written by fatfs first.
    fn stick_with_empty(files: &[&str], busy: u64) -> std::fs::File {
        let mut disk = tempfile::tempfile().unwrap();
        disk.set_len(80 << 20).unwrap();
        let mut window = PartitionWindow::new(&mut disk, 1 << 20, 79 << 20);
        fat::format(&mut window, "LIVE", 0x1234_abcd, 2048).unwrap();
        {
            let fs = fat::open(&mut window).unwrap();
            let data = vec![7u8; busy as usize];
            fat::write_file(&fs, "/LiveOS/squashfs.img", &mut &data[..], busy, |_| {}).unwrap();
            for f in files {
                fat::write_file(&fs, f, &mut &[][..], 0, |_| {}).unwrap();
            }
            fs.unmount().unwrap();
        }
        window.flush().unwrap();
        fat::repair_fatfs_quirks(&mut window).unwrap();
        drop(window);
        disk
    }

    #[test]
    fn allocated_file_reads_back_through_fatfs() {
        let mut disk = stick_with_empty(&["/LiveOS/overlay-LIVE-1234-ABCD"], 3 << 20);
        let extents = allocate(
            &mut disk,
            1 << 20,
            "/LiveOS/overlay-LIVE-1234-ABCD",
            (10 << 20) + 100,
        )
        .unwrap();
        assert_eq!(extents.len(), 1, "one contiguous run: {extents:?}");
        assert_eq!(extents[0].1, (10 << 20) + 100);
        // Mark the first and last bytes through the extents; fatfs must see them
        // at the file's first and last offsets.
        let (at, len) = extents[0];
        disk.seek(SeekFrom::Start(at)).unwrap();
        disk.write_all(b"head").unwrap();
        disk.seek(SeekFrom::Start(at + len - 4)).unwrap();
        disk.write_all(b"tail").unwrap();
        let mut window = PartitionWindow::new(&mut disk, 1 << 20, 79 << 20);
        let fs = fat::open(&mut window).unwrap();
        let bytes = fat::read_file(&fs, "/LiveOS/overlay-LIVE-1234-ABCD").unwrap();
        assert_eq!(bytes.len() as u64, (10 << 20) + 100);
        assert_eq!(&bytes[..4], b"head");
        assert_eq!(&bytes[bytes.len() - 4..], b"tail");
        // FSInfo agrees with the FAT, as fsck.fat checks.
        let free = fat::free_bytes(&fs).unwrap();
        drop(fs);
        let before = free;
        fat::repair_fatfs_quirks(&mut window).unwrap();
        let fs = fat::open(&mut window).unwrap();
        assert_eq!(fat::free_bytes(&fs).unwrap(), before);
    }

    /// A file that takes the volume's last clusters leaves FSInfo's next-free hint
    /// "unknown", not a cluster past the volume; its entry names the chain and size.
    #[test]
    fn a_chain_to_the_last_cluster_leaves_a_next_free_hint_inside_the_volume() {
        let path = "/LiveOS/home.img";
        let mut disk = stick_with_empty(&[path], 0);
        let part = 1 << 20;
        let g = fat_raw::geometry(&mut disk, part).unwrap();
        let free = count_free(&mut disk, &g).unwrap();
        allocate(&mut disk, part, path, free * g.cluster_bytes).unwrap();
        assert_eq!(count_free(&mut disk, &g).unwrap(), 0);
        let (at, sector) = fsinfo(&mut disk, &g).unwrap().unwrap();
        assert!(at > part);
        assert_eq!(u32_at(&sector, 488), 0);
        let hint = u32_at(&sector, 492);
        assert!(hint == u32::MAX || hint < g.max_cluster, "{hint}");
        let entry = fat_raw::find_entry(&mut disk, part, path).unwrap();
        assert_eq!(u64::from(entry.size), free * g.cluster_bytes);
        assert!((2..g.max_cluster).contains(&entry.first_cluster));
    }

    #[test]
    fn set_aside_clusters_are_passed_over_then_placed_where_asked_and_freed() {
        let mut disk = stick_with_empty(&[], 0);
        let part = 1 << 20;
        let room = 10..10 + 16;
        reserve(&mut disk, part, room.clone()).unwrap();
        // Set aside twice, or over a used cluster: refused.
        assert!(reserve(&mut disk, part, room.clone()).is_err());
        let cluster = fat_raw::geometry(&mut disk, part).unwrap().cluster_bytes;
        let data = vec![9u8; (3 * cluster) as usize];
        {
            let mut window = PartitionWindow::new(&mut disk, part, 79 << 20);
            let fs = fat::open(&mut window).unwrap();
            fat::write_file(&fs, "/big.bin", &mut &data[..], data.len() as u64, |_| {}).unwrap();
            fat::write_file(&fs, "/syslinux/ldlinux.sys", &mut &[][..], 0, |_| {}).unwrap();
            fs.unmount().unwrap();
            window.flush().unwrap();
        }
        let (_, _, big) = fat_raw::file_clusters(&mut disk, part, "/big.bin").unwrap();
        assert!(big.iter().all(|c| !room.contains(c)), "{big:?}");
        // Placing into the set-aside room before it is released: refused.
        let loader = b"loader bytes".repeat(1000);
        let size = loader.len() as u64;
        let wanted: Vec<u32> = (12..12 + size.div_ceil(cluster) as u32).collect();
        assert!(place(&mut disk, part, "/syslinux/ldlinux.sys", &wanted, size).is_err());
        release(&mut disk, part, room.clone()).unwrap();
        // Too few clusters for the size: refused.
        assert!(place(&mut disk, part, "/syslinux/ldlinux.sys", &wanted[..1], size).is_err());
        let extents = place(&mut disk, part, "/syslinux/ldlinux.sys", &wanted, size).unwrap();
        let mut content = crate::disk::extent_file::ExtentFile::new(&mut disk, &extents);
        content.write_all(&loader).unwrap();
        drop(content);
        let (entry, _, placed) =
            fat_raw::file_clusters(&mut disk, part, "/syslinux/ldlinux.sys").unwrap();
        assert_eq!(placed, wanted);
        fat_raw::set_attributes(&mut disk, &entry, 0x07).unwrap();
        assert_eq!(
            fat_raw::file_clusters(&mut disk, part, "/syslinux/ldlinux.sys")
                .unwrap()
                .1,
            0x07
        );
        let mut window = PartitionWindow::new(&mut disk, part, 79 << 20);
        let fs = fat::open(&mut window).unwrap();
        assert_eq!(
            fat::read_file(&fs, "/syslinux/ldlinux.sys").unwrap(),
            loader
        );
        // The room's other clusters are free again, and FSInfo says so.
        let free = fat::free_bytes(&fs).unwrap();
        drop(fs);
        fat::repair_fatfs_quirks(&mut window).unwrap();
        let fs = fat::open(&mut window).unwrap();
        assert_eq!(fat::free_bytes(&fs).unwrap(), free);
        drop(fs);
        drop(window);
        let g = fat_raw::geometry(&mut disk, part).unwrap();
        let mut marked = 0;
        scan_fat(&mut disk, &g, |_, v| {
            marked += u32::from(v == FAT32_BAD);
            true
        })
        .unwrap();
        assert_eq!(marked, 0);
    }

    #[test]
    fn the_next_file_starts_where_it_is_told_to() {
        let mut disk = stick_with_empty(&[], 0);
        let part = 1 << 20;
        let first = fat_raw::geometry(&mut disk, part).unwrap().max_cluster - 40;
        start_next_file_at(&mut disk, part, first).unwrap();
        let mut window = PartitionWindow::new(&mut disk, part, 79 << 20);
        let fs = fat::open(&mut window).unwrap();
        fat::write_file(&fs, "/next.bin", &mut &b"next"[..], 4, |_| {}).unwrap();
        fs.unmount().unwrap();
        window.flush().unwrap();
        drop(window);
        let (_, _, clusters) = fat_raw::file_clusters(&mut disk, part, "/next.bin").unwrap();
        assert_eq!(clusters, vec![first]);
    }

    #[test]
    fn fragmented_free_space_still_allocates_in_disk_order() {
        // Fill the volume with small files, delete every other one: no run is long enough.
        let mut disk = tempfile::tempfile().unwrap();
        disk.set_len(80 << 20).unwrap();
        let mut window = PartitionWindow::new(&mut disk, 1 << 20, 79 << 20);
        fat::format(&mut window, "LIVE", 1, 2048).unwrap();
        {
            let fs = fat::open(&mut window).unwrap();
            let chunk = vec![1u8; 1 << 20];
            let mut i = 0;
            while fat::free_bytes(&fs).unwrap() > 2 << 20 {
                fat::write_file(&fs, &format!("/f{i}"), &mut &chunk[..], 1 << 20, |_| {}).unwrap();
                i += 1;
            }
            for k in (0..i).step_by(2) {
                fat::remove_all(&fs, &format!("/f{k}")).unwrap();
            }
            fat::write_file(&fs, "/big", &mut &[][..], 0, |_| {}).unwrap();
            fs.unmount().unwrap();
        }
        window.flush().unwrap();
        let free = {
            let fs = fat::open(&mut window).unwrap();
            fat::free_bytes(&fs).unwrap()
        };
        drop(window);
        let want = free - (1 << 20);
        let extents = allocate(&mut disk, 1 << 20, "/big", want).unwrap();
        assert!(extents.len() > 10, "fragmented: {}", extents.len());
        assert!(extents.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(extents.iter().map(|e| e.1).sum::<u64>(), want);
        let mut window = PartitionWindow::new(&mut disk, 1 << 20, 79 << 20);
        let fs = fat::open(&mut window).unwrap();
        assert_eq!(fat::read_file(&fs, "/big").unwrap().len() as u64, want);
    }

    #[test]
    fn refuses_more_than_is_free_and_files_with_data() {
        let mut disk = stick_with_empty(&["/home.img"], 1 << 20);
        let before = {
            let mut b = Vec::new();
            disk.seek(SeekFrom::Start(0)).unwrap();
            disk.read_to_end(&mut b).unwrap();
            b
        };
        match allocate(&mut disk, 1 << 20, "/home.img", 200 << 20) {
            Err(AllocError::NoSpace { needed, free, .. }) => assert!(needed > free),
            other => panic!("{other:?}"),
        }
        match allocate(&mut disk, 1 << 20, "/LiveOS/squashfs.img", 1 << 20) {
            Err(AllocError::NotEmpty(_)) => {}
            other => panic!("{other:?}"),
        }
        match allocate(&mut disk, 1 << 20, "/missing", 1 << 20) {
            Err(AllocError::Fat(SwapError::NotFound(_))) => {}
            other => panic!("{other:?}"),
        }
        let mut after = Vec::new();
        disk.seek(SeekFrom::Start(0)).unwrap();
        disk.read_to_end(&mut after).unwrap();
        assert!(before == after, "a refused allocation changes nothing");
    }

    #[test]
    fn extend_appends_to_the_chain_and_keeps_the_old_bytes() {
        let mut disk = stick_with_empty(&["/LiveOS/overlay"], 1 << 20);
        let first = allocate(&mut disk, 1 << 20, "/LiveOS/overlay", 3 << 20).unwrap();
        disk.seek(SeekFrom::Start(first[0].0)).unwrap();
        disk.write_all(b"SnAp").unwrap();
        let all = extend(&mut disk, 1 << 20, "/LiveOS/overlay", 5 << 20).unwrap();
        assert_eq!(all, vec![(first[0].0, 5 << 20)], "grown in place");
        // Something else after it, then a grow that must jump over it.
        {
            let mut window = PartitionWindow::new(&mut disk, 1 << 20, 79 << 20);
            let fs = fat::open(&mut window).unwrap();
            let data = vec![9u8; 1 << 20];
            fat::write_file(&fs, "/after", &mut &data[..], 1 << 20, |_| {}).unwrap();
            fs.unmount().unwrap();
            window.flush().unwrap();
        }
        let all = extend(&mut disk, 1 << 20, "/LiveOS/overlay", (7 << 20) + 1).unwrap();
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!(all.iter().map(|e| e.1).sum::<u64>(), (7 << 20) + 1);
        let mut window = PartitionWindow::new(&mut disk, 1 << 20, 79 << 20);
        let fs = fat::open(&mut window).unwrap();
        let bytes = fat::read_file(&fs, "/LiveOS/overlay").unwrap();
        assert_eq!(bytes.len() as u64, (7 << 20) + 1);
        assert_eq!(&bytes[..4], b"SnAp");
        assert_eq!(fat::read_file(&fs, "/after").unwrap(), vec![9u8; 1 << 20]);
        drop(fs);
        // Shrinking is refused.
        drop(window);
        assert!(matches!(
            extend(&mut disk, 1 << 20, "/LiveOS/overlay", 1 << 20),
            Err(AllocError::NotEmpty(_))
        ));
    }

    /// The clusters of `path`'s chain, followed from its entry.
    fn chain_length(disk: &mut std::fs::File, path: &str) -> u64 {
        let g = fat_raw::geometry(disk, 1 << 20).unwrap();
        let mut c = fat_raw::find_entry(disk, 1 << 20, path)
            .unwrap()
            .first_cluster;
        let mut n = 0;
        while (2..g.max_cluster).contains(&c) {
            n += 1;
            c = fat_raw::next_cluster(disk, &g, c).unwrap();
        }
        n
    }

    #[test]
    fn a_grow_after_a_stopped_grow_gives_the_file_exactly_its_new_size() {
        let path = "/LiveOS/overlay";
        let mut disk = stick_with_empty(&[path], 1 << 20);
        allocate(&mut disk, 1 << 20, path, 3 << 20).unwrap();
        let g = fat_raw::geometry(&mut disk, 1 << 20).unwrap();
        let clusters = |bytes: u64| bytes.div_ceil(g.cluster_bytes);
        let free_at_start = count_free(&mut disk, &g).unwrap();
        // A grow to 9 MiB stopped after linking its clusters, before the size.
        let stopped = extend_with(&mut disk, 1 << 20, path, 9 << 20, |_, _| {
            Err(io::Error::other("stopped"))
        });
        assert!(stopped.is_err());
        assert_eq!(chain_length(&mut disk, path), clusters(9 << 20));
        assert_eq!(
            fat_raw::find_entry(&mut disk, 1 << 20, path).unwrap().size,
            3 << 20
        );

        // A smaller grow than the stopped one: the chain is cut to it, the rest freed.
        let all = extend(&mut disk, 1 << 20, path, 5 << 20).unwrap();
        assert_eq!(all.iter().map(|e| e.1).sum::<u64>(), 5 << 20);
        assert_eq!(chain_length(&mut disk, path), clusters(5 << 20));
        assert_eq!(
            count_free(&mut disk, &g).unwrap(),
            free_at_start - clusters(2 << 20)
        );
        // And a larger one after another stop adds only what is missing.
        let _ = extend_with(&mut disk, 1 << 20, path, 8 << 20, |_, _| {
            Err(io::Error::other("stopped"))
        });
        let all = extend(&mut disk, 1 << 20, path, 11 << 20).unwrap();
        assert_eq!(all.iter().map(|e| e.1).sum::<u64>(), 11 << 20);
        assert_eq!(chain_length(&mut disk, path), clusters(11 << 20));
        assert_eq!(
            count_free(&mut disk, &g).unwrap(),
            free_at_start - clusters(8 << 20)
        );
        // FSInfo agrees with the FAT.
        let mut window = PartitionWindow::new(&mut disk, 1 << 20, 79 << 20);
        let fs = fat::open(&mut window).unwrap();
        assert_eq!(
            fat::free_bytes(&fs).unwrap(),
            (free_at_start - clusters(8 << 20)) * g.cluster_bytes
        );
    }
}
