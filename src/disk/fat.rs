//! The stick's FAT32 filesystem, written with `fatfs` through a
//! [`PartitionWindow`]: no mount, no loop device, no root for image files.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;

use thiserror::Error;

use crate::bytes::{u16_at, u32_at};
use crate::disk::fat_raw;
use crate::io::PartitionWindow;

/// FAT32 cannot hold a file of 4 GiB or more.
pub const FAT_MAX_FILE: u64 = u32::MAX as u64;
/// FAT32 needs at least this many clusters, or drivers take it for FAT16.
const FAT32_MIN_CLUSTERS: u64 = 65_525;

pub type FatFs<'a, F> = fatfs::FileSystem<&'a mut PartitionWindow<F>>;

#[derive(Debug, Error)]
pub enum FatError {
    #[error(
        "invalid label {0:?}: a FAT label has 1 to 11 characters from A-Z, a-z, 0-9, '_' and '-'"
    )]
    InvalidLabel(String),
    #[error("the partition ({0} bytes) is too small for FAT32; use a target of at least 64 MiB")]
    TooSmall(u64),
    #[error("no FAT filesystem in the partition: {0}; write the stick with --format")]
    NotFat(io::Error),
    #[error("{path}: {source}")]
    File { path: String, source: io::Error },
    #[error("{path} is {size} bytes; FAT32 files must stay below 4 GiB (4095 MiB)")]
    FileTooLarge { path: String, size: u64 },
    #[error(
        "the FAT filesystem is damaged: {0}; run `fsck.fat -a` on the partition, or rewrite the stick with --format"
    )]
    Damaged(String),
    #[error("I/O error on the FAT filesystem: {0}")]
    Io(#[from] io::Error),
}

impl crate::error::Classify for FatError {
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::Io
    }
}

/// Checks a FAT volume label. Lower case is kept as given: dracut and udev
/// match `LABEL=` exactly, so we must not change what the user asked for.
pub fn validate_label(label: &str) -> Result<(), FatError> {
    let ok = !label.is_empty()
        && label.len() <= 11
        && label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(FatError::InvalidLabel(label.to_string()))
    }
}

/// `ABCD-1234`, the way blkid and dracut spell a FAT volume id.
pub fn format_volume_id(id: u32) -> String {
    format!("{:04X}-{:04X}", id >> 16, id & 0xffff)
}

/// Parses `ABCD-1234` back into a volume id.
pub fn parse_volume_id(text: &str) -> Option<u32> {
    let (hi, lo) = text.split_once('-')?;
    if hi.len() != 4 || lo.len() != 4 {
        return None;
    }
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u32::from_str_radix(lo, 16).ok()?;
    Some(hi << 16 | lo)
}

/// Cluster size as Windows and mkfs.fat choose it, shrunk where the partition
/// is small so FAT32 keeps its minimum cluster count. For a stick given back to
/// plain use (`restore`), which will hold many small files.
pub fn cluster_size_for(len: u64) -> Result<u32, FatError> {
    let cluster: u64 = match len {
        l if l <= 8 << 30 => 4096,
        l if l <= 16 << 30 => 8192,
        l if l <= 32 << 30 => 16384,
        _ => 32768,
    };
    shrink_to_fat32(len, cluster)
}

/// Cluster size of a live stick's FAT: 32 KiB, shrunk where the partition is small
/// so FAT32 keeps its minimum cluster count. A live stick holds a few large files
/// (the root image, overlay, home), so large clusters waste little, while both FATs
/// are written in full (stale bytes there would read as cluster chains): on a 16 GiB
/// stick 8 KiB clusters make 16 MiB of FAT to write and read back, 32 KiB make 4.
pub fn live_cluster_size_for(len: u64) -> Result<u32, FatError> {
    shrink_to_fat32(len, 32768)
}

fn shrink_to_fat32(len: u64, mut cluster: u64) -> Result<u32, FatError> {
    while cluster > 512 && len / cluster < FAT32_MIN_CLUSTERS + 1024 {
        cluster /= 2;
    }
    if len / cluster < FAT32_MIN_CLUSTERS + 1024 {
        return Err(FatError::TooSmall(len));
    }
    Ok(cluster as u32)
}

/// Formats the window as FAT32. `hidden_sectors` is the partition's first LBA:
/// BIOS boot code (syslinux's boot sector) adds it to find its own sectors.
pub fn format<F: Read + Write + Seek>(
    window: &mut PartitionWindow<F>,
    label: &str,
    volume_id: u32,
    hidden_sectors: u32,
) -> Result<(), FatError> {
    format_with_clusters(
        window,
        label,
        volume_id,
        hidden_sectors,
        cluster_size_for(window.len())?,
    )
}

fn format_with_clusters<F: Read + Write + Seek>(
    window: &mut PartitionWindow<F>,
    label: &str,
    volume_id: u32,
    hidden_sectors: u32,
    cluster: u32,
) -> Result<(), FatError> {
    validate_label(label)?;
    let len = window.len();
    let mut label_bytes = [b' '; 11];
    label_bytes[..label.len()].copy_from_slice(label.as_bytes());
    let options = fatfs::FormatVolumeOptions::new()
        .fat_type(fatfs::FatType::Fat32)
        .bytes_per_cluster(cluster)
        .total_sectors(u32::try_from(len / 512).map_err(|_| FatError::TooSmall(len))?)
        .volume_id(volume_id)
        .volume_label(label_bytes);
    window.seek(SeekFrom::Start(0))?;
    fatfs::format_volume(&mut *window, options)?;
    align_data_region(window, len)?;
    // fatfs writes 0 hidden sectors; patch the boot sector and its FAT32 backup.
    let mut sector = [0u8; 512];
    window.seek(SeekFrom::Start(0))?;
    window.read_exact(&mut sector)?;
    let backup = u16_at(&sector, 0x32) as u64;
    for at in [0, backup * 512] {
        window.seek(SeekFrom::Start(at + 0x1c))?;
        window.write_all(&hidden_sectors.to_le_bytes())?;
    }
    window.flush()?;
    Ok(())
}

/// Moves the FATs and the root directory's cluster of a volume fatfs has just
/// formatted so that the data region starts on a cluster boundary, as mkfs.fat
/// lays it out. fatfs 0.3.6 always reserves 8 sectors, so the first cluster lands
/// wherever the FATs end: on a 16 GiB stick 3 KiB past a 4 KiB boundary. Every
/// cluster then straddles two of the stick's pages, so each 4 KiB the live system
/// writes into the overlay or home (a dm-snapshot chunk, an ext4 block) costs the
/// stick's controller two partial page writes, and the partial blocks at either
/// end of each file reach it through the page cache instead of in whole blocks.
/// The reserved sectors grow by what the alignment needs (fewer than a cluster's
/// sectors, zeroed); the cluster count drops by at most one, whose FAT entry is
/// then marked in use as fatfs marks every entry past the last cluster.
fn align_data_region<F: Read + Write + Seek>(
    window: &mut PartitionWindow<F>,
    len: u64,
) -> Result<(), FatError> {
    const SECTOR: u64 = 512;
    let mut boot = [0u8; 512];
    window.seek(SeekFrom::Start(0))?;
    window.read_exact(&mut boot)?;
    let reserved = u64::from(u16_at(&boot, 14));
    let per_cluster = u64::from(boot[13]);
    let fats = u64::from(boot[16]);
    let fat_sectors = u64::from(u32_at(&boot, 36));
    let total = u64::from(u32_at(&boot, 32));
    let backup = u64::from(u16_at(&boot, 0x32));
    if u16_at(&boot, 11) != SECTOR as u16 || per_cluster == 0 || fat_sectors == 0 {
        return Err(FatError::Damaged(
            "fatfs made a FAT32 boot sector livestick does not expect".into(),
        ));
    }
    let meta = reserved + fats * fat_sectors;
    let pad = (per_cluster - meta % per_cluster) % per_cluster;
    if pad == 0 {
        return Ok(());
    }
    let clusters_before = total.saturating_sub(meta) / per_cluster;
    let clusters = total.saturating_sub(meta + pad) / per_cluster;
    let new_reserved = u16::try_from(reserved + pad).map_err(|_| FatError::TooSmall(len))?;
    if clusters < FAT32_MIN_CLUSTERS {
        return Err(FatError::TooSmall(len));
    }
    // The FATs and the root cluster move `pad` sectors on.
    let moved = (fats * fat_sectors + per_cluster) * SECTOR;
    let (from, shift) = (reserved * SECTOR, pad * SECTOR);
    window.copy_within(from, moved, from + shift)?;
    window.seek(SeekFrom::Start(from))?;
    window.write_all(&vec![0u8; shift as usize])?;
    for fat in 0..fats {
        let base = (u64::from(new_reserved) + fat * fat_sectors) * SECTOR;
        for lost in clusters + 2..clusters_before + 2 {
            window.seek(SeekFrom::Start(base + 4 * lost))?;
            window.write_all(&0x0FFF_FFFFu32.to_le_bytes())?;
        }
    }
    for at in [0, backup * SECTOR] {
        window.seek(SeekFrom::Start(at + 14))?;
        window.write_all(&new_reserved.to_le_bytes())?;
    }
    Ok(())
}

/// Formats the window as a live stick's FAT32 ([`live_cluster_size_for`]).
pub fn format_live<F: Read + Write + Seek>(
    window: &mut PartitionWindow<F>,
    label: &str,
    volume_id: u32,
    hidden_sectors: u32,
) -> Result<(), FatError> {
    let cluster = live_cluster_size_for(window.len())?;
    format_with_clusters(window, label, volume_id, hidden_sectors, cluster)
}

/// A floor under [`MadeFat::metadata_len`] for a live FAT32 of `len` bytes, known
/// without formatting: two FATs of four bytes per cluster must cover the clusters
/// that the rest holds, so `meta >= 8 * (len - meta) / cluster`.
pub fn live_metadata_floor(len: u64) -> u64 {
    let cluster = live_cluster_size_for(len).map_or(512, u64::from);
    (u128::from(len) * 8 / (u128::from(cluster) + 8)) as u64
}

/// A live stick's FAT32 ([`format_live`]) made in memory, to be loaded into a window
/// ([`MadeFat::load`]) once the caller knows what its metadata will cover: the
/// reserved sectors and both FATs then stay in the window's cache and reach the
/// device once, at its next flush, instead of being written, read back and written
/// again. Only the root directory's cluster is written when it is loaded.
pub struct MadeFat {
    device: crate::io::MemDevice,
    written: Vec<Range<u64>>,
    metadata_len: u64,
}

impl MadeFat {
    /// A live stick's FAT32, as [`format_live`] makes it.
    pub fn live(
        len: u64,
        label: &str,
        volume_id: u32,
        hidden_sectors: u32,
    ) -> Result<MadeFat, FatError> {
        let cluster = live_cluster_size_for(len)?;
        Self::with_clusters(len, label, volume_id, hidden_sectors, cluster)
    }

    /// Plain storage's FAT32, as [`format`] makes it.
    pub fn plain(
        len: u64,
        label: &str,
        volume_id: u32,
        hidden_sectors: u32,
    ) -> Result<MadeFat, FatError> {
        let cluster = cluster_size_for(len)?;
        Self::with_clusters(len, label, volume_id, hidden_sectors, cluster)
    }

    fn with_clusters(
        len: u64,
        label: &str,
        volume_id: u32,
        hidden_sectors: u32,
        cluster: u32,
    ) -> Result<MadeFat, FatError> {
        let mut device = crate::io::MemDevice::new(len);
        let metadata_len = {
            let mut mem = PartitionWindow::new(&mut device, 0, len);
            format_with_clusters(&mut mem, label, volume_id, hidden_sectors, cluster)?;
            mem.flush()?;
            metadata_len(&mut mem)?
        };
        let written = device
            .written()
            .map(|(at, bytes)| at..at + bytes.len() as u64)
            .collect();
        Ok(MadeFat {
            device,
            written,
            metadata_len,
        })
    }

    /// Bytes from the start of the partition to the first data cluster: the reserved
    /// sectors and both FATs, which [`MadeFat::load`] has written whole by the
    /// window's next flush.
    pub fn metadata_len(&self) -> u64 {
        self.metadata_len
    }

    pub fn load<F: Read + Write + Seek>(
        mut self,
        window: &mut PartitionWindow<F>,
    ) -> Result<(), FatError> {
        load_staged(window, &mut self.device, &self.written)
    }
}

/// Takes a FAT filesystem made elsewhere (`staged`, as long as the window, of which
/// `written` are the byte ranges that hold anything) into the window: its reserved
/// sectors and FATs into the window's cache, where they reach the device once, at
/// the next flush; what lies past them is written through the window now.
pub fn load_staged<F: Read + Write + Seek, S: Read + Write + Seek>(
    window: &mut PartitionWindow<F>,
    staged: &mut S,
    written: &[Range<u64>],
) -> Result<(), FatError> {
    let len = window.len();
    let meta = {
        let mut view = PartitionWindow::new(&mut *staged, 0, len);
        metadata_len(&mut view)?
    };
    staged.seek(SeekFrom::Start(0))?;
    window.preload_prefix_from(&mut *staged, meta)?;
    let mut buf = vec![0u8; 1 << 20];
    for range in written {
        let mut at = range.start.max(meta);
        while at < range.end {
            let n = ((range.end - at) as usize).min(buf.len());
            staged.seek(SeekFrom::Start(at))?;
            staged.read_exact(&mut buf[..n])?;
            window.seek(SeekFrom::Start(at))?;
            window.write_all(&buf[..n])?;
            at += n as u64;
        }
    }
    Ok(())
}

/// Bytes from the start of the partition to the first data cluster: the
/// reserved sectors and the FATs, which `fatfs` updates with tiny writes.
pub fn metadata_len<F: Read + Write + Seek>(window: &mut PartitionWindow<F>) -> io::Result<u64> {
    let mut bpb = [0u8; 512];
    window.seek(SeekFrom::Start(0))?;
    window.read_exact(&mut bpb)?;
    let bytes_per_sector = u16_at(&bpb, 11) as u64;
    let reserved = u16_at(&bpb, 14) as u64;
    let fats = bpb[16] as u64;
    let fat16_size = u16_at(&bpb, 22) as u64;
    let fat32_size = u32_at(&bpb, 36) as u64;
    let fat_size = if fat16_size != 0 {
        fat16_size
    } else {
        fat32_size
    };
    Ok((reserved + fats * fat_size) * bytes_per_sector)
}

/// Reads the reserved sectors and FATs into the window's cache, once their size in
/// the boot sector is believable: a damaged boot sector could otherwise make the
/// cache read the whole partition into memory.
pub fn cache_metadata<F: Read + Write + Seek>(
    window: &mut PartitionWindow<F>,
) -> Result<u64, FatError> {
    let meta = metadata_len(window).map_err(FatError::NotFat)?;
    if meta == 0 || meta > window.len() || meta > 256 << 20 {
        return Err(FatError::NotFat(io::Error::new(
            io::ErrorKind::InvalidData,
            "boot sector does not describe a FAT filesystem",
        )));
    }
    window.cache_prefix(meta)?;
    Ok(meta)
}

/// [`open`] for a volume that has been in use, with FSInfo's free-cluster count made
/// that of the FAT first (in the window: written at its next flush, and only if the
/// window is flushed). fatfs 0.3.6 takes the count as it finds it, and a stick pulled
/// out before its system updated it keeps a stale one: a write planned on it could
/// find, after the old system was already deleted, that its files do not fit. A
/// volume livestick has just made counts right and is opened with [`open`].
pub fn open_in_use<F: Read + Write + Seek>(
    window: &mut PartitionWindow<F>,
) -> Result<FatFs<'_, F>, FatError> {
    cache_metadata(window)?;
    match fat_raw::geometry_any(window, 0) {
        Ok(g) => crate::disk::fat_alloc::recount_fsinfo(window, &g)?,
        Err(fat_raw::SwapError::Io(e)) => return Err(FatError::Io(e)),
        // Not a layout fat_raw reads: open decides.
        Err(_) => {}
    }
    open(window)
}

/// Opens the FAT filesystem in the window, holding its FAT region in memory.
pub fn open<F: Read + Write + Seek>(
    window: &mut PartitionWindow<F>,
) -> Result<FatFs<'_, F>, FatError> {
    cache_metadata(window)?;
    check_chains(window)?;
    window.seek(SeekFrom::Start(0))?;
    fatfs::FileSystem::new(window, fatfs::FsOptions::new()).map_err(FatError::NotFat)
}

/// Refuses a volume whose cluster chains `fatfs` could not follow safely, before
/// it follows any: fatfs 0.3.6 walks chains unchecked, so a directory whose
/// chain loops lists forever, a file's loop reads the same clusters over again,
/// and a chain that leaves the data area reads whatever lies there. Every
/// chain is followed to its end; each cluster must lie in the data area and be
/// reached only once (a second visit is a loop, or two entries sharing clusters),
/// and a file's chain must be as long as its size needs. A chain longer than its
/// file's size is accepted (an interrupted grow, which writes the size last, leaves
/// exactly that) as long as its tail is no other entry's.
fn check_chains<D: Read + Seek>(dev: &mut D) -> Result<(), FatError> {
    let g = match fat_raw::geometry_any(dev, 0) {
        Ok(g) => g,
        Err(fat_raw::SwapError::Io(e)) => return Err(FatError::Io(e)),
        // Not a layout fat_raw understands: fatfs decides, and refuses it.
        Err(_) => return Ok(()),
    };
    let mut chains = Chains::new(g);
    let root = if g.fat32 { Some(g.root_cluster) } else { None };
    let mut pending = vec![(String::new(), root)];
    while let Some((path, first)) = pending.pop() {
        let runs = match first {
            None => vec![g.root_region],
            Some(first) => chains
                .follow(dev, &path_or_root(&path), first, None)?
                .into_iter()
                .map(|c| {
                    (
                        g.data_offset + u64::from(c - 2) * g.cluster_bytes,
                        g.cluster_bytes,
                    )
                })
                .collect(),
        };
        'entries: for (at, len) in runs {
            let mut bytes = vec![0u8; len as usize];
            dev.seek(SeekFrom::Start(at))?;
            dev.read_exact(&mut bytes)?;
            for e in bytes.chunks_exact(32) {
                if e[0] == 0 {
                    break 'entries;
                }
                // Deleted, and `.` / `..` (which point back up the tree).
                if e[0] == 0xe5 || e[..11] == *b".          " || e[..11] == *b"..         " {
                    continue;
                }
                // Long-name pieces and the volume label have no chain.
                if e[11] & 0x08 != 0 {
                    continue;
                }
                let hi = if g.fat32 { u32::from(u16_at(e, 20)) } else { 0 };
                let first = hi << 16 | u32::from(u16_at(e, 26));
                let child = format!("{path}/{}", short_name(e));
                if e[11] & 0x10 != 0 {
                    pending.push((child, Some(first)));
                } else {
                    let needed = u64::from(u32_at(e, 28)).div_ceil(g.cluster_bytes);
                    if needed > 0 {
                        chains.follow(dev, &child, first, Some(needed))?;
                    }
                }
            }
        }
    }
    Ok(())
}

fn path_or_root(path: &str) -> String {
    if path.is_empty() {
        "/".into()
    } else {
        path.into()
    }
}

/// `NAME.EXT` from a short directory entry, for messages.
fn short_name(e: &[u8]) -> String {
    let base = String::from_utf8_lossy(&e[0..8]).trim_end().to_string();
    let ext = String::from_utf8_lossy(&e[8..11]).trim_end().to_string();
    if ext.is_empty() {
        base
    } else {
        format!("{base}.{ext}")
    }
}

/// The first FAT copy (the one fatfs reads), read where chains lead, and the
/// clusters already reached. Read whole, the FAT of a 16 GiB stick is 16 MiB, most
/// of it free clusters nobody follows: on a fresh filesystem the walk reads one page.
struct Chains {
    g: fat_raw::Geo,
    /// [`FAT_PAGE`] pieces of the FAT by index, as read.
    pages: std::collections::HashMap<u64, Vec<u8>>,
    /// One past the highest cluster that both the boot sector and the FAT's size allow.
    limit: u32,
    seen: Vec<u64>,
}

const FAT_PAGE: u64 = 64 << 10;

impl Chains {
    fn new(g: fat_raw::Geo) -> Chains {
        // FAT12 packs two entries in three bytes.
        let entries_in_fat = if g.fat12 {
            g.fat_bytes * 2 / 3
        } else if g.fat32 {
            g.fat_bytes / 4
        } else {
            g.fat_bytes / 2
        };
        let limit = g
            .max_cluster
            .min(u32::try_from(entries_in_fat).unwrap_or(u32::MAX));
        Chains {
            g,
            pages: std::collections::HashMap::new(),
            limit,
            seen: vec![0; (limit as usize).div_ceil(64)],
        }
    }

    /// The [`FAT_PAGE`] piece of the FAT numbered `index`, read on first use.
    fn page<D: Read + Seek>(&mut self, dev: &mut D, index: u64) -> io::Result<&[u8]> {
        if !self.pages.contains_key(&index) {
            let start = index * FAT_PAGE;
            let mut page = vec![0u8; FAT_PAGE.min(self.g.fat_bytes - start) as usize];
            dev.seek(SeekFrom::Start(self.g.fat_offset + start))?;
            dev.read_exact(&mut page)?;
            self.pages.insert(index, page);
        }
        Ok(&self.pages[&index])
    }

    /// `n` (2 or 4) little-endian bytes of the FAT at `at`, as a number. No entry
    /// straddles two pages: FAT16 and FAT32 entries are aligned to their size, and a
    /// FAT12 FAT (4084 clusters at most) fits in one page; an entry that ends past the
    /// FAT is damage.
    fn entry_bytes<D: Read + Seek>(&mut self, dev: &mut D, at: u64, n: u64) -> io::Result<u32> {
        let within = (at % FAT_PAGE) as usize;
        let page = self.page(dev, at / FAT_PAGE)?;
        let entry = page.get(within..within + n as usize).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a FAT entry at byte {at} of the FAT runs past its end"),
            )
        })?;
        let mut bytes = [0u8; 4];
        bytes[..n as usize].copy_from_slice(entry);
        Ok(u32::from_le_bytes(bytes))
    }

    fn next<D: Read + Seek>(&mut self, dev: &mut D, c: u32) -> io::Result<u32> {
        let c = u64::from(c);
        Ok(if self.g.fat32 {
            self.entry_bytes(dev, c * 4, 4)? & 0x0fff_ffff
        } else if self.g.fat12 {
            let pair = self.entry_bytes(dev, c + c / 2, 2)?;
            if c % 2 == 1 { pair >> 4 } else { pair & 0xfff }
        } else {
            self.entry_bytes(dev, c * 2, 2)?
        })
    }

    fn is_end(&self, value: u32) -> bool {
        let first_end = if self.g.fat32 {
            0x0fff_fff8
        } else if self.g.fat12 {
            0xff8
        } else {
            0xfff8
        };
        value >= first_end
    }

    /// Whether `c` is reached for the first time (and marks it).
    fn first_visit(&mut self, c: u32) -> bool {
        let (word, bit) = (c as usize / 64, 1u64 << (c % 64));
        let fresh = self.seen[word] & bit == 0;
        self.seen[word] |= bit;
        fresh
    }

    /// The chain from `first` to its end, which must come no sooner than `needed`
    /// clusters. Past what a file's size needs, too: fatfs never reads there, but
    /// growing the file appends to the chain's end, so a tail that leads into
    /// another file's clusters would give it that file's bytes.
    fn follow<D: Read + Seek>(
        &mut self,
        dev: &mut D,
        path: &str,
        first: u32,
        needed: Option<u64>,
    ) -> Result<Vec<u32>, FatError> {
        let mut chain = Vec::new();
        let mut c = first;
        loop {
            if !(2..self.limit).contains(&c) {
                return Err(FatError::Damaged(format!(
                    "{path}: its cluster chain reaches cluster {c}, outside the data area"
                )));
            }
            if !self.first_visit(c) {
                return Err(FatError::Damaged(format!(
                    "{path}: its cluster chain reaches cluster {c} a second time \
                     (a loop, or clusters shared with another entry)"
                )));
            }
            chain.push(c);
            let next = self.next(dev, c)?;
            if self.is_end(next) {
                if let Some(needed) = needed
                    && (chain.len() as u64) < needed
                {
                    return Err(FatError::Damaged(format!(
                        "{path}: its cluster chain ends after {} clusters, its size needs {needed}",
                        chain.len()
                    )));
                }
                break;
            }
            c = next;
        }
        Ok(chain)
    }
}

fn components(path: &str) -> Vec<&str> {
    path.split('/').filter(|c| !c.is_empty()).collect()
}

/// Creates `path` and its parents.
pub fn create_dir_all<F: Read + Write + Seek>(
    fs: &FatFs<'_, F>,
    path: &str,
) -> Result<(), FatError> {
    let mut dir = fs.root_dir();
    for part in components(path) {
        dir = dir.create_dir(part).map_err(|source| FatError::File {
            path: path.to_string(),
            source,
        })?;
    }
    Ok(())
}

fn parent_of(path: &str) -> &str {
    path.trim_end_matches('/')
        .rsplit_once('/')
        .map(|(p, _)| p)
        .unwrap_or("")
}

/// Writes `reader` to `path` (replacing it), returning the sha256 of the bytes
/// written; `progress` gets the byte count of each chunk as it lands.
pub fn write_file<F: Read + Write + Seek, R: Read + ?Sized>(
    fs: &FatFs<'_, F>,
    path: &str,
    reader: &mut R,
    size_hint: u64,
    progress: impl FnMut(u64),
) -> Result<[u8; 32], FatError> {
    Ok(write_file_hashed(fs, path, reader, size_hint, progress)?.sha256)
}

/// [`write_file`], returning the read-back check value beside the sha256.
pub fn write_file_hashed<F: Read + Write + Seek, R: Read + ?Sized>(
    fs: &FatFs<'_, F>,
    path: &str,
    reader: &mut R,
    size_hint: u64,
    progress: impl FnMut(u64),
) -> Result<crate::io::WrittenDigest, FatError> {
    write_file_with(
        fs,
        path,
        reader,
        size_hint,
        crate::io::WrittenHash::default(),
        progress,
    )
}

/// [`write_file`] with the digest `hasher` makes of the bytes written.
pub fn write_file_with<F: Read + Write + Seek, R: Read + ?Sized, H: crate::io::StreamHash>(
    fs: &FatFs<'_, F>,
    path: &str,
    reader: &mut R,
    size_hint: u64,
    hasher: H,
    mut progress: impl FnMut(u64),
) -> Result<H::Out, FatError> {
    let mut file = create_truncated(fs, path, size_hint)?;
    let (digest, _) = crate::io::hash_while(
        hasher,
        size_hint,
        |buf| crate::io::read_full(reader, buf),
        |chunk| {
            file.write_all(chunk)?;
            progress(chunk.len() as u64);
            Ok(())
        },
    )
    .map_err(file_err(path))?;
    file.flush().map_err(file_err(path))?;
    Ok(digest)
}

/// [`write_file`] from a reader that lends its own buffer, for bytes whose digest
/// their source computes (a batch hashes each ISO file once for all its targets):
/// no digest here, and no copy of the bytes on their way to the filesystem.
pub fn write_file_buffered<F: Read + Write + Seek, R: io::BufRead + ?Sized>(
    fs: &FatFs<'_, F>,
    path: &str,
    reader: &mut R,
    size_hint: u64,
    mut progress: impl FnMut(u64),
) -> Result<(), FatError> {
    let mut file = create_truncated(fs, path, size_hint)?;
    loop {
        let chunk = match reader.fill_buf() {
            Ok([]) => break,
            Ok(chunk) => chunk,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(file_err(path)(e)),
        };
        let n = chunk.len();
        file.write_all(chunk).map_err(file_err(path))?;
        reader.consume(n);
        progress(n as u64);
    }
    file.flush().map_err(file_err(path))
}

/// The file at `path`, created (with its directories) or emptied.
fn create_truncated<'a, 'w, F: Read + Write + Seek>(
    fs: &'a FatFs<'w, F>,
    path: &str,
    size_hint: u64,
) -> Result<fatfs::File<'a, &'w mut PartitionWindow<F>>, FatError> {
    if size_hint > FAT_MAX_FILE {
        return Err(FatError::FileTooLarge {
            path: path.to_string(),
            size: size_hint,
        });
    }
    create_dir_all(fs, parent_of(path))?;
    let mut file = fs
        .root_dir()
        .create_file(path.trim_start_matches('/'))
        .map_err(file_err(path))?;
    file.truncate().map_err(file_err(path))?;
    Ok(file)
}

/// Wraps an I/O error with the path it happened on.
fn file_err(path: &str) -> impl Fn(io::Error) -> FatError + '_ {
    move |source| FatError::File {
        path: path.to_string(),
        source,
    }
}

/// Opens an existing file by its absolute path on the filesystem.
fn open_existing<'a, 'w, F: Read + Write + Seek>(
    fs: &'a FatFs<'w, F>,
    path: &str,
) -> Result<fatfs::File<'a, &'w mut PartitionWindow<F>>, FatError> {
    fs.root_dir()
        .open_file(path.trim_start_matches('/'))
        .map_err(file_err(path))
}

/// Reads a small file entirely.
pub fn read_file<F: Read + Write + Seek>(
    fs: &FatFs<'_, F>,
    path: &str,
) -> Result<Vec<u8>, FatError> {
    let err = file_err(path);
    let mut file = open_existing(fs, path)?;
    let mut out = Vec::new();
    file.read_to_end(&mut out).map_err(err)?;
    Ok(out)
}

/// Whether `path` exists (file or directory).
pub fn exists<F: Read + Write + Seek>(fs: &FatFs<'_, F>, path: &str) -> bool {
    let parts = components(path);
    let Some((last, parents)) = parts.split_last() else {
        return true;
    };
    let mut dir = fs.root_dir();
    for part in parents {
        match dir.open_dir(part) {
            Ok(d) => dir = d,
            Err(_) => return false,
        }
    }
    dir.iter()
        .filter_map(Result::ok)
        .any(|e| e.file_name().eq_ignore_ascii_case(last))
}

/// One directory entry, for listings and plans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FatEntry {
    pub path: String,
    pub is_dir: bool,
    pub size: u64,
}

/// A FAT directory holds at most 65,536 32-byte entries; a directory whose cluster
/// chain loops would otherwise list forever (fatfs follows chains unchecked).
const MAX_DIR_ENTRIES: usize = 65_536;
/// Deeper than any live stick's tree: a directory that contains itself (two damaged
/// bytes in an entry) is found here instead of by a stack overflow.
const MAX_DEPTH: usize = 32;

/// Lists `path` (not recursive). A missing directory lists as empty.
pub fn list_dir<F: Read + Write + Seek>(fs: &FatFs<'_, F>, path: &str) -> Vec<FatEntry> {
    let dir = if components(path).is_empty() {
        fs.root_dir()
    } else {
        match fs.root_dir().open_dir(path.trim_start_matches('/')) {
            Ok(d) => d,
            Err(_) => return Vec::new(),
        }
    };
    let base = path.trim_end_matches('/');
    dir.iter()
        .take(MAX_DIR_ENTRIES)
        .filter_map(Result::ok)
        .filter(|e| e.file_name() != "." && e.file_name() != "..")
        .map(|e| FatEntry {
            path: format!("{base}/{}", e.file_name()),
            is_dir: e.is_dir(),
            size: e.len(),
        })
        .collect()
}

/// Every file below `dir`, recursively (directories themselves left out). A tree
/// deeper than any real one (a directory that contains itself) is reported damaged.
pub fn walk_files<F: Read + Write + Seek>(
    fs: &FatFs<'_, F>,
    dir: &str,
) -> Result<Vec<FatEntry>, FatError> {
    let mut out = Vec::new();
    walk_into(fs, dir, 0, &mut out)?;
    Ok(out)
}

fn walk_into<F: Read + Write + Seek>(
    fs: &FatFs<'_, F>,
    dir: &str,
    depth: usize,
    out: &mut Vec<FatEntry>,
) -> Result<(), FatError> {
    if depth > MAX_DEPTH {
        return Err(FatError::Damaged(format!(
            "{dir} is nested more than {MAX_DEPTH} directories deep (a directory that contains itself?)"
        )));
    }
    for entry in list_dir(fs, dir) {
        if entry.is_dir {
            walk_into(fs, &entry.path, depth + 1, out)?;
        } else {
            out.push(entry);
        }
    }
    Ok(())
}

/// Removes a file, or a directory with everything below it. Missing is fine.
pub fn remove_all<F: Read + Write + Seek>(fs: &FatFs<'_, F>, path: &str) -> Result<(), FatError> {
    remove_below(fs, path, 0)
}

fn remove_below<F: Read + Write + Seek>(
    fs: &FatFs<'_, F>,
    path: &str,
    depth: usize,
) -> Result<(), FatError> {
    if depth > MAX_DEPTH {
        return Err(FatError::Damaged(format!(
            "{path} is nested more than {MAX_DEPTH} directories deep (a directory that contains itself?)"
        )));
    }
    if !exists(fs, path) {
        return Ok(());
    }
    let trimmed = path.trim_start_matches('/');
    let is_dir = fs.root_dir().open_dir(trimmed).is_ok();
    if is_dir {
        for entry in list_dir(fs, path) {
            remove_below(fs, &entry.path, depth + 1)?;
        }
    }
    fs.root_dir()
        .remove(trimmed)
        .map_err(|source| FatError::File {
            path: path.to_string(),
            source,
        })
}

/// Renames a file within the filesystem (replacing nothing: the target must not exist).
pub fn rename<F: Read + Write + Seek>(
    fs: &FatFs<'_, F>,
    from: &str,
    to: &str,
) -> Result<(), FatError> {
    let root = fs.root_dir();
    root.rename(
        from.trim_start_matches('/'),
        &root,
        to.trim_start_matches('/'),
    )
    .map_err(|source| FatError::File {
        path: format!("{from} -> {to}"),
        source,
    })
}

/// Free bytes on the filesystem.
pub fn free_bytes<F: Read + Write + Seek>(fs: &FatFs<'_, F>) -> Result<u64, FatError> {
    let stats = fs.stats()?;
    Ok(stats.free_clusters() as u64 * stats.cluster_size() as u64)
}

/// The layout of the FAT16 or FAT32 volume in the window (fat_raw's reading of the
/// boot sector, which knows both; FAT12 cannot hold a live system).
fn raw_geometry<F: Read + Write + Seek>(
    window: &mut PartitionWindow<F>,
) -> Result<fat_raw::Geo, FatError> {
    fat_raw::geometry(window, 0).map_err(|e| match e {
        fat_raw::SwapError::Io(e) => FatError::Io(e),
        other => FatError::NotFat(io::Error::new(
            io::ErrorKind::InvalidData,
            other.to_string(),
        )),
    })
}

/// The first cluster of the root directory for [`fat_raw::dir_runs`]: FAT32's
/// chain, or 0 for FAT16's fixed region.
fn root_first(g: &fat_raw::Geo) -> u32 {
    if g.fat32 { g.root_cluster } else { 0 }
}

/// Corrects what `fatfs` 0.3.6 gets wrong, so `fsck.fat` finds the volume clean:
/// it writes long-name entries in front of every directory's `.` and `..`
/// (which fsck and some firmware reject), and leaves the FSInfo free-cluster
/// count unset. Run on a flushed, unmounted filesystem.
pub fn repair_fatfs_quirks<F: Read + Write + Seek>(
    window: &mut PartitionWindow<F>,
) -> Result<(), FatError> {
    let g = raw_geometry(window)?;
    let cluster_offset = |c: u32| g.data_offset + u64::from(c - 2) * g.cluster_bytes;
    // Walk every directory from the root; bounded by the cluster count so a
    // damaged tree cannot send it round for ever.
    let mut pending = vec![(root_first(&g), true, false)];
    let mut visited = 0u32;
    while let Some((first, is_root, parent_is_root)) = pending.pop() {
        visited += 1;
        if visited > g.max_cluster {
            break;
        }
        if !is_root {
            let at = cluster_offset(first);
            let mut head = [0u8; 128];
            window.seek(SeekFrom::Start(at))?;
            window.read_exact(&mut head)?;
            let is_lfn = |i: usize| head[i * 32 + 11] == 0x0f;
            let name = |i: usize| &head[i * 32..i * 32 + 11];
            if is_lfn(0) && name(1) == b".          " && is_lfn(2) && name(3) == b"..         " {
                let mut fixed = [0u8; 128];
                fixed[0..32].copy_from_slice(&head[32..64]);
                fixed[32..64].copy_from_slice(&head[96..128]);
                fixed[64..96].copy_from_slice(&head[0..32]);
                fixed[96..128].copy_from_slice(&head[64..96]);
                fixed[64] = 0xe5;
                fixed[96] = 0xe5;
                window.seek(SeekFrom::Start(at))?;
                window.write_all(&fixed)?;
            }
            // `..` of a directory in the root must point at cluster 0, not the root's cluster.
            window.seek(SeekFrom::Start(at))?;
            window.read_exact(&mut head)?;
            if parent_is_root && &head[32..43] == b"..         " {
                for b in [52usize, 53, 58, 59] {
                    head[b] = 0;
                }
                window.seek(SeekFrom::Start(at + 32))?;
                window.write_all(&head[32..64])?;
            }
        }
        // Collect subdirectories of this directory.
        'runs: for (at, len) in fat_raw::dir_runs(window, &g, first)? {
            let mut buf = vec![0u8; len as usize];
            window.seek(SeekFrom::Start(at))?;
            window.read_exact(&mut buf)?;
            for entry in buf.chunks_exact(32) {
                if entry[0] == 0 {
                    break 'runs;
                }
                let attr = entry[11];
                if entry[0] == 0xe5 || attr == 0x0f || attr & 0x10 == 0 || entry[0] == b'.' {
                    continue;
                }
                let hi = if g.fat32 {
                    u32::from(u16_at(entry, 20))
                } else {
                    0
                };
                let child = hi << 16 | u32::from(u16_at(entry, 26));
                if (2..g.max_cluster).contains(&child) {
                    pending.push((child, false, is_root));
                }
            }
        }
    }
    // FSInfo (FAT32 only): free cluster count and next-free hint.
    if let Some(fsinfo) = g.fsinfo {
        let mut free = 0u32;
        let mut first_free = 0xffff_ffffu32;
        let mut fat = vec![0u8; g.fat_bytes.min(u64::from(g.max_cluster) * 4) as usize];
        window.seek(SeekFrom::Start(g.fat_offset))?;
        window.read_exact(&mut fat)?;
        for (i, e) in fat.chunks_exact(4).enumerate().skip(2) {
            if u32_at(e, 0) & 0x0fff_ffff == 0 {
                free += 1;
                if first_free == 0xffff_ffff {
                    first_free = i as u32;
                }
            }
        }
        let mut sig = [0u8; 4];
        window.seek(SeekFrom::Start(fsinfo))?;
        window.read_exact(&mut sig)?;
        if &sig == b"RRaA" {
            window.seek(SeekFrom::Start(fsinfo + 488))?;
            window.write_all(&free.to_le_bytes())?;
            window.write_all(&first_free.to_le_bytes())?;
        }
    }
    window.flush()?;
    Ok(())
}

/// Empties a dm-snapshot overlay in place: zeros over its first 64 KiB, which
/// clears the header and the first metadata area for every chunk size up to
/// 32 KiB, so the kernel starts a new store on the next boot.
pub fn reset_overlay_header<F: Read + Write + Seek>(
    fs: &FatFs<'_, F>,
    path: &str,
) -> Result<(), FatError> {
    let err = |source| FatError::File {
        path: path.to_string(),
        source,
    };
    let mut file = fs
        .root_dir()
        .open_file(path.trim_start_matches('/'))
        .map_err(err)?;
    let len = file.seek(SeekFrom::End(0)).map_err(err)?;
    file.seek(SeekFrom::Start(0)).map_err(err)?;
    let zeros = vec![0u8; len.min(64 * 1024) as usize];
    file.write_all(&zeros).map_err(err)?;
    file.flush().map_err(err)?;
    Ok(())
}

/// Changes the volume label: the boot sector, its backup, and the label entry
/// in the root directory (which `blkid` and Windows read).
pub fn set_label<F: Read + Write + Seek>(
    window: &mut PartitionWindow<F>,
    label: &str,
) -> Result<(), FatError> {
    validate_label(label)?;
    let mut padded = [b' '; 11];
    padded[..label.len()].copy_from_slice(label.as_bytes());
    let g = raw_geometry(window)?;
    // The boot sector's label field: FAT32's, and its backup's; FAT16's sits earlier
    // (where FAT32 keeps the backup's sector number) and has no backup.
    let mut places = vec![0u64];
    if g.fat32 {
        let mut sector = [0u8; 512];
        window.seek(SeekFrom::Start(0))?;
        window.read_exact(&mut sector)?;
        let backup = u64::from(u16_at(&sector, 0x32));
        if backup != 0 && backup != 0xffff {
            places.push(backup * 512);
        }
    }
    let field = if g.fat32 { 0x47 } else { 0x2b };
    for at in places {
        window.seek(SeekFrom::Start(at + field))?;
        window.write_all(&padded)?;
    }
    // The root directory's volume-label entry, if it has one.
    'runs: for (at, len) in fat_raw::dir_runs(window, &g, root_first(&g))? {
        let mut buf = vec![0u8; len as usize];
        window.seek(SeekFrom::Start(at))?;
        window.read_exact(&mut buf)?;
        for (i, e) in buf.chunks_exact(32).enumerate() {
            if e[0] == 0 {
                break 'runs;
            }
            if e[0] != 0xe5 && e[11] & 0x0f == 0x08 {
                window.seek(SeekFrom::Start(at + i as u64 * 32))?;
                window.write_all(&padded)?;
                break 'runs;
            }
        }
    }
    window.flush()?;
    Ok(())
}

/// FAT32's BIOS parameter block in the boot sector (OEM name excluded): the
/// filesystem's own description (geometry, serial, label). A boot loader's code lies
/// around it: the jump before, the rest after.
pub const BOOT_SECTOR_PARAMETERS: std::ops::Range<usize> = 0x0b..0x5a;

/// Makes the FAT32 backup boot sector equal the primary again after a boot
/// loader installer rewrote only the primary.
pub fn sync_backup_boot_sector<F: Read + Write + Seek>(
    window: &mut PartitionWindow<F>,
) -> Result<(), FatError> {
    let mut sector = [0u8; 512];
    window.seek(SeekFrom::Start(0))?;
    window.read_exact(&mut sector)?;
    let backup = u16_at(&sector, 0x32) as u64;
    if backup != 0 && backup != 0xffff {
        window.seek(SeekFrom::Start(backup * 512))?;
        window.write_all(&sector)?;
        window.flush()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metadata_floor_is_never_above_what_the_format_makes() {
        for mib in [80u64, 300, 1024, 2048, 7 * 1024 + 3, 16 * 1024, 64 * 1024] {
            let len = mib << 20;
            let made = MadeFat::live(len, "LIVE", 0x1234_5678, 2048).unwrap();
            let floor = live_metadata_floor(len);
            assert!(floor <= made.metadata_len(), "{mib} MiB: {floor}");
            // And close to it: it is what lets the wipes skip the FATs.
            assert!(floor * 10 >= made.metadata_len() * 9, "{mib} MiB: {floor}");
        }
    }

    #[test]
    fn labels_and_ids() {
        assert!(validate_label("LIVE").is_ok());
        assert!(validate_label("Fedora_37-x").is_ok());
        assert!(validate_label("").is_err());
        assert!(validate_label("TWELVE_CHARS").is_err());
        assert!(validate_label("bad label").is_err());
        assert_eq!(format_volume_id(0xabcd_1234), "ABCD-1234");
        assert_eq!(parse_volume_id("ABCD-1234"), Some(0xabcd_1234));
        assert_eq!(parse_volume_id("ABCD1234"), None);
    }

    #[test]
    fn cluster_sizes_keep_fat32_valid() {
        assert_eq!(cluster_size_for(4 << 30).unwrap(), 4096);
        assert_eq!(cluster_size_for(64 << 20).unwrap(), 512);
        assert_eq!(cluster_size_for(64 << 30).unwrap(), 32768);
        assert!(cluster_size_for(16 << 20).is_err());
        assert_eq!(live_cluster_size_for(16 << 30).unwrap(), 32768);
        assert_eq!(live_cluster_size_for(4 << 30).unwrap(), 32768);
        // 2 GiB of 32 KiB clusters is too few for FAT32: halved until it is not.
        assert_eq!(live_cluster_size_for(2 << 30).unwrap(), 16384);
        assert_eq!(live_cluster_size_for(64 << 20).unwrap(), 512);
        assert!(live_cluster_size_for(16 << 20).is_err());
    }

    /// Whatever the partition's size, the first data cluster starts on a cluster
    /// boundary (as mkfs.fat lays a FAT out), over stale bytes the reserved sectors
    /// added for it hold zeros, a cluster lost to them is marked in use, and the
    /// volume works: its label, a file written and read back.
    #[test]
    fn the_data_region_starts_on_a_cluster_boundary() {
        // 64 MiB (512-byte clusters) up to a 16 GiB stick's partition, and a size
        // that is no multiple of any cluster.
        for len in [
            64 << 20,
            (80 << 20) + 4096,
            1 << 30,
            (16u64 << 30) - (1 << 20),
        ] {
            let mut device = crate::io::MemDevice::new(len);
            // Stale bytes where the FATs, the root cluster and the padding land.
            device
                .write_all(&vec![0xA5u8; (6 << 20).min(len as usize)])
                .unwrap();
            let mut window = PartitionWindow::new(&mut device, 0, len);
            format_live(&mut window, "LIVE", 7, 2048).unwrap();
            let mut boot = [0u8; 512];
            window.seek(SeekFrom::Start(0)).unwrap();
            window.read_exact(&mut boot).unwrap();
            let reserved = u64::from(u16_at(&boot, 14));
            let per_cluster = u64::from(boot[13]);
            let fat_sectors = u64::from(u32_at(&boot, 36));
            let meta = reserved + 2 * fat_sectors;
            assert_eq!(meta % per_cluster, 0, "{len}: data at sector {meta}");
            assert_eq!(metadata_len(&mut window).unwrap(), meta * 512);
            let mut backup = [0u8; 512];
            window.seek(SeekFrom::Start(6 * 512)).unwrap();
            window.read_exact(&mut backup).unwrap();
            assert_eq!(backup[..90], boot[..90], "{len}: the backup boot sector");
            let padding =
                crate::io::read_at(&mut window, 8 * 512, (reserved as usize - 8) * 512).unwrap();
            assert!(padding.iter().all(|&b| b == 0), "{len}: stale padding");
            let clusters = (len / 512 - meta) / per_cluster;
            for fat in 0..2 {
                let at = (reserved + fat * fat_sectors) * 512;
                let head = crate::io::read_at(&mut window, at, 12).unwrap();
                assert_eq!(u32_at(&head, 8), 0x0FFF_FFFF, "{len}: root's entry");
                // The entry past the last cluster: fatfs marks every such entry in use.
                let past = crate::io::read_at(&mut window, at + 4 * (clusters + 2), 4).unwrap();
                assert_eq!(
                    u32_at(&past, 0),
                    0x0FFF_FFFF,
                    "{len}: past the last cluster"
                );
            }
            window.flush().unwrap();
            let fs = open(&mut window).unwrap();
            assert_eq!(
                fs.read_volume_label_from_root_dir().unwrap().unwrap(),
                "LIVE"
            );
            assert_eq!(fs.stats().unwrap().total_clusters() as u64, clusters);
            let data: Vec<u8> = (0..100_000u32).map(|i| (i % 241) as u8).collect();
            write_file(&fs, "/LiveOS/squashfs.img", &mut &data[..], 100_000, |_| {}).unwrap();
            assert!(read_file(&fs, "/LiveOS/squashfs.img").unwrap() == data);
            assert_eq!(fs.root_dir().iter().count(), 1, "{len}: stale root entries");
        }
    }

    #[test]
    fn format_write_read_back() {
        let mut disk = tempfile::tempfile().unwrap();
        disk.set_len(80 << 20).unwrap();
        let mut window = PartitionWindow::new(&mut disk, 1 << 20, 79 << 20);
        format(&mut window, "LIVE", 0x1234_abcd, 2048).unwrap();
        {
            let fs = open(&mut window).unwrap();
            assert_eq!(fs.volume_id(), 0x1234_abcd);
            let data = vec![42u8; 3 << 20];
            let sum =
                write_file(&fs, "/LiveOS/squashfs.img", &mut &data[..], 3 << 20, |_| {}).unwrap();
            let zeros = vec![0u8; 1 << 20];
            write_file(
                &fs,
                "/LiveOS/overlay-LIVE-1234-ABCD",
                &mut &zeros[..],
                1 << 20,
                |_| {},
            )
            .unwrap();
            let back = read_file(&fs, "/LiveOS/squashfs.img").unwrap();
            assert!(back == data);
            assert_eq!(
                sum,
                <[u8; 32]>::from(<sha2::Sha256 as sha2::Digest>::digest(&back))
            );
            assert!(exists(&fs, "/liveos/SQUASHFS.IMG"));
            assert_eq!(list_dir(&fs, "/LiveOS").len(), 2);
            fs.unmount().unwrap();
        }
        window.flush().unwrap();
        {
            let fs = open(&mut window).unwrap();
            rename(&fs, "/LiveOS/overlay-LIVE-1234-ABCD", "/LiveOS/overlay-X").unwrap();
            remove_all(&fs, "/LiveOS").unwrap();
            assert!(!exists(&fs, "/LiveOS"));
            fs.unmount().unwrap();
        }
        window.flush().unwrap();
        let mut sector = [0u8; 512];
        disk.seek(SeekFrom::Start((1 << 20) + 0x1c)).unwrap();
        disk.read_exact(&mut sector[..4]).unwrap();
        assert_eq!(u32_at(&sector, 0), 2048);
    }

    /// A 64 MiB FAT32 volume (512-byte clusters) in memory holding `files`.
    fn volume_with(files: &[(&str, usize)]) -> std::io::Cursor<Vec<u8>> {
        let mut disk = std::io::Cursor::new(vec![0u8; 64 << 20]);
        let mut w = PartitionWindow::new(&mut disk, 0, 64 << 20);
        format(&mut w, "LIVE", 1, 0).unwrap();
        let fs = open(&mut w).unwrap();
        for (path, len) in files {
            let data = vec![7u8; *len];
            write_file(&fs, path, &mut &data[..], *len as u64, |_| {}).unwrap();
        }
        fs.unmount().unwrap();
        w.flush().unwrap();
        drop(w);
        disk
    }

    /// Points `cluster`'s FAT entry at `next`, in every FAT copy.
    fn set_next(disk: &mut std::io::Cursor<Vec<u8>>, cluster: u32, next: u32) {
        let g = fat_raw::geometry(disk, 0).unwrap();
        for copy in 0..g.fats {
            let at = (g.fat_offset + copy * g.fat_bytes + u64::from(cluster) * 4) as usize;
            disk.get_mut()[at..at + 4].copy_from_slice(&next.to_le_bytes());
        }
    }

    fn damage(disk: &mut std::io::Cursor<Vec<u8>>) -> String {
        let mut w = PartitionWindow::new(disk, 0, 64 << 20);
        match open(&mut w) {
            Err(FatError::Damaged(why)) => why,
            other => panic!("opened: {:?}", other.map(|_| ())),
        }
    }

    const IMG: &str = "/LiveOS/squashfs.img";

    /// Reads and writes through to `inner`, counting the bytes read.
    struct ReadCounter<'a, D> {
        inner: &'a mut D,
        read: u64,
    }

    impl<D: Read> Read for ReadCounter<'_, D> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read += n as u64;
            Ok(n)
        }
    }

    impl<D: Write> Write for ReadCounter<'_, D> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.inner.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.inner.flush()
        }
    }

    impl<D: Seek> Seek for ReadCounter<'_, D> {
        fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
            self.inner.seek(pos)
        }
    }

    /// A damaged boot sector (a failing stick's, found when a read-back mismatch is
    /// named) must not make the FAT cache read the partition into memory.
    #[test]
    fn a_boot_sector_claiming_huge_tables_is_refused_before_they_are_read() {
        let len = 1u64 << 30;
        let mut device = crate::io::MemDevice::new(len);
        {
            let mut window = PartitionWindow::new(&mut device, 0, len);
            MadeFat::live(len, "LIVE", 1, 2048)
                .unwrap()
                .load(&mut window)
                .unwrap();
            window.flush().unwrap();
        }
        // FATs past the partition's end; FATs of 600 MiB inside it.
        for fat_sectors in [u32::MAX / 4, (600u32 << 20) / 512 / 2] {
            device.seek(SeekFrom::Start(36)).unwrap();
            device.write_all(&fat_sectors.to_le_bytes()).unwrap();
            let mut counter = ReadCounter {
                inner: &mut device,
                read: 0,
            };
            let mut window = PartitionWindow::new(&mut counter, 0, len);
            let refused = cache_metadata(&mut window);
            assert!(matches!(refused, Err(FatError::NotFat(_))), "{refused:?}");
            drop(window);
            assert!(counter.read <= 64 << 10, "{fat_sectors}: {}", counter.read);
        }
    }

    #[test]
    fn a_file_whose_chain_loops_is_refused_before_fatfs_reads_it() {
        let mut disk = volume_with(&[(IMG, 4 * 512)]);
        let first = fat_raw::find_entry(&mut disk, 0, IMG)
            .unwrap()
            .first_cluster;
        set_next(&mut disk, first + 2, first);
        let why = damage(&mut disk);
        assert!(why.contains("SQUASHFS.IMG"), "{why}");
        assert!(why.contains("a second time"), "{why}");
        let text = FatError::Damaged(why).to_string();
        assert!(text.contains("damaged"), "{text}");
    }

    #[test]
    fn a_chain_shorter_than_its_file_or_outside_the_volume_is_refused() {
        let mut disk = volume_with(&[(IMG, 4 * 512)]);
        let first = fat_raw::find_entry(&mut disk, 0, IMG)
            .unwrap()
            .first_cluster;
        set_next(&mut disk, first + 1, 0x0fff_ffff);
        let why = damage(&mut disk);
        assert!(
            why.contains("ends after 2 clusters, its size needs 4"),
            "{why}"
        );
        set_next(&mut disk, first + 1, 0x0fff_fff0);
        let why = damage(&mut disk);
        assert!(why.contains("outside the data area"), "{why}");
    }

    #[test]
    fn files_sharing_clusters_and_a_looping_directory_are_refused() {
        let mut disk = volume_with(&[(IMG, 2 * 512), ("/LiveOS/home.img", 2 * 512)]);
        let img = fat_raw::find_entry(&mut disk, 0, IMG)
            .unwrap()
            .first_cluster;
        let home = fat_raw::find_entry(&mut disk, 0, "/LiveOS/home.img")
            .unwrap()
            .first_cluster;
        set_next(&mut disk, home, img);
        assert!(damage(&mut disk).contains("a second time"));

        let mut disk = volume_with(&[]);
        let root = fat_raw::geometry(&mut disk, 0).unwrap().root_cluster;
        set_next(&mut disk, root, root);
        let why = damage(&mut disk);
        assert!(why.starts_with("/: "), "{why}");
    }

    #[test]
    fn a_loop_far_into_a_long_chain_is_found_on_a_later_page_of_the_fat() {
        // 40000 clusters: its chain runs across three pages of the FAT.
        let clusters = 40_000u32;
        let mut disk = volume_with(&[(IMG, clusters as usize * 512)]);
        let first = fat_raw::find_entry(&mut disk, 0, IMG)
            .unwrap()
            .first_cluster;
        assert!(u64::from(first + clusters) * 4 > 2 * FAT_PAGE);
        let mut w = PartitionWindow::new(&mut disk, 0, 64 << 20);
        assert!(open(&mut w).is_ok(), "the whole chain is sound");
        drop(w);
        set_next(&mut disk, first + clusters - 2, first + 35_000);
        let why = damage(&mut disk);
        assert!(
            why.contains(&format!("cluster {}", first + 35_000)),
            "{why}"
        );
        assert!(why.contains("a second time"), "{why}");
    }

    /// A FAT16 volume made by mkfs.fat, with a file of 300 clusters written by fatfs.
    #[test]
    fn fat16_chains_are_followed_and_a_loop_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fat16.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        let made = ["/usr/sbin/mkfs.fat", "/sbin/mkfs.fat", "mkfs.fat"]
            .iter()
            .find_map(|mkfs| {
                std::process::Command::new(mkfs)
                    .args(["-F", "16", "-s", "1"])
                    .arg(&img)
                    .output()
                    .ok()
            });
        let Some(out) = made else {
            assert!(
                std::env::var("CI").is_err(),
                "mkfs.fat (dosfstools) is missing"
            );
            return;
        };
        assert!(out.status.success(), "{out:?}");
        let mut disk = std::io::Cursor::new(std::fs::read(&img).unwrap());
        {
            let mut w = PartitionWindow::new(&mut disk, 0, 32 << 20);
            let fs = open(&mut w).unwrap();
            let data = vec![7u8; 300 * 512];
            write_file(&fs, "/big.bin", &mut &data[..], data.len() as u64, |_| {}).unwrap();
            fs.unmount().unwrap();
            w.flush().unwrap();
        }
        let g = fat_raw::geometry_any(&mut disk, 0).unwrap();
        assert!(!g.fat32 && !g.fat12);
        let first = fat_raw::find_entry(&mut disk, 0, "/big.bin")
            .unwrap()
            .first_cluster;
        let mut w = PartitionWindow::new(&mut disk, 0, 32 << 20);
        assert!(open(&mut w).is_ok());
        drop(w);
        for copy in 0..g.fats {
            let at = (g.fat_offset + copy * g.fat_bytes + u64::from(first + 250) * 2) as usize;
            disk.get_mut()[at..at + 2].copy_from_slice(&((first + 10) as u16).to_le_bytes());
        }
        let mut w = PartitionWindow::new(&mut disk, 0, 32 << 20);
        match open(&mut w) {
            Err(FatError::Damaged(why)) => assert!(why.contains("a second time"), "{why}"),
            other => panic!("opened: {:?}", other.map(|_| ())),
        }
    }

    /// Past what its size needs, a chain that leads into another file's clusters is
    /// damage too: growing the file appends at the chain's end and would hand it the
    /// other file's bytes (found by review: a grown overlay took over home.img).
    #[test]
    fn a_tail_past_the_size_into_another_file_is_refused() {
        let mut disk = volume_with(&[(IMG, 2 * 512), ("/LiveOS/home.img", 2 * 512)]);
        let img = fat_raw::find_entry(&mut disk, 0, IMG).unwrap();
        let home = fat_raw::find_entry(&mut disk, 0, "/LiveOS/home.img")
            .unwrap()
            .first_cluster;
        let at = img.offset as usize + 28;
        disk.get_mut()[at..at + 4].copy_from_slice(&512u32.to_le_bytes());
        set_next(&mut disk, img.first_cluster + 1, home);
        let why = damage(&mut disk);
        assert!(why.contains("a second time"), "{why}");
    }

    #[test]
    fn a_chain_longer_than_its_file_is_read_up_to_the_size() {
        // What an interrupted grow leaves: the new clusters chained, the size not yet written.
        let mut disk = volume_with(&[(IMG, 4 * 512)]);
        let entry = fat_raw::find_entry(&mut disk, 0, IMG).unwrap();
        let at = entry.offset as usize + 28;
        disk.get_mut()[at..at + 4].copy_from_slice(&1000u32.to_le_bytes());
        let mut w = PartitionWindow::new(&mut disk, 0, 64 << 20);
        let fs = open(&mut w).unwrap();
        assert_eq!(read_file(&fs, IMG).unwrap(), vec![7u8; 1000]);
    }
}
