//! Executes a [`Plan`] on the target, then reads everything back.
//!
//! Write order keeps the stick either bootable-old or clearly incomplete:
//! a new table is wiped first and written last, so a run that stops midway
//! leaves a stick that boots nothing rather than half a live system.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use serde::Serialize;
use thiserror::Error;

use crate::boot::syslinux::{self, SyslinuxFiles};
use crate::disk::extent_file::ExtentFile;
use crate::disk::fat::{self, FatError};
use crate::disk::fat_alloc::{self, AllocError};
use crate::disk::fat_raw::{self, SwapError};
use crate::disk::partition::{self, PartitionError, TableKind};
use crate::disk::stick::{Stick, StickError};
use crate::disk::target::{self, TargetError, TargetKind, TargetProbe};
use crate::disk::wipe;
use crate::io::{
    BoundedDirty, Corrupter, PartitionWindow, RangeSet, ReadBack, ReadBackMismatch, StepTags,
    WriteRecorder, WrittenDigest, check_ranges, zero_ranges,
};

/// Dirty data allowed in the page cache for a block device before its writer thread
/// waits for it to reach the stick (see [`BoundedDirty`]): small, so the stick gets
/// data again as soon as a batch is on it.
const DIRTY_LIMIT: u64 = 8 << 20;
use crate::plan::{CopySource, Plan};
use crate::progress::Progress;
use crate::source::checksum::hex;
use crate::source::live;

#[derive(Debug, Error)]
pub enum ApplyError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Stick(#[from] StickError),
    #[error("{step}: {source}")]
    Fat { step: String, source: FatError },
    #[error("{step}: {source}")]
    Partition {
        step: String,
        source: PartitionError,
    },
    #[error("installing SYSLINUX: {0}")]
    Syslinux(#[from] syslinux::SyslinuxError),
    /// Staging the new filesystem failed for another stick of the same command.
    #[error("{0}")]
    StagedElsewhere(String),
    /// An image made while the ISO's files were written could not be made.
    #[error("{what}")]
    Preparing {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("reading {path} from the ISO: {reason}")]
    Source { path: String, reason: String },
    #[error("{step}: {source}")]
    Io { step: String, source: io::Error },
    #[error("{step}: {source}")]
    Alloc { step: String, source: AllocError },
    #[error("{step}: {source}")]
    Layout { step: String, source: SwapError },
    #[error(transparent)]
    Ext4Live(#[from] crate::disk::ext4_live::Ext4LiveError),
    #[error(
        "read-back verification failed for {path}: wrote bytes with check value {expected}, read back {actual}; the stick (or its USB connection) is corrupting data — try another stick or port"
    )]
    VerifyMismatch {
        path: String,
        expected: String,
        actual: String,
    },
    /// A write the stick failed, named after the step that wrote there (see
    /// [`StepTags`]) rather than the one running when the failure surfaced.
    #[error("{step}: {error} ({found})")]
    WriteFailed {
        step: String,
        error: String,
        /// How and when it was found ("found when syncing, while …").
        found: String,
    },
}

impl crate::error::Classify for ApplyError {
    fn kind(&self) -> crate::error::ErrorKind {
        match self {
            // Only `open_for_write`'s I/O errors and a stick's come through
            // these, so asking them changes nothing but a target the user may
            // not open, or that is not there: bad input, not I/O.
            ApplyError::Target(e) => e.kind(),
            ApplyError::Stick(e) => e.kind(),
            ApplyError::Ext4Live(e) => e.kind(),
            _ => crate::error::ErrorKind::Io,
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            ApplyError::Target(e) => e.hint(),
            ApplyError::Stick(e) => e.hint(),
            _ => self.kind().hint(),
        }
    }
}

impl ApplyError {
    fn io(step: impl Into<String>) -> impl FnOnce(io::Error) -> ApplyError {
        let step = step.into();
        move |source| ApplyError::Io { step, source }
    }
    fn fat(step: impl Into<String>) -> impl FnOnce(FatError) -> ApplyError {
        let step = step.into();
        move |source| ApplyError::Fat { step, source }
    }
}

/// A file as written and read back.
#[derive(Debug, Clone, Serialize)]
pub struct WrittenFile {
    pub path: String,
    #[serde(rename = "size_bytes")]
    pub size: u64,
    /// Bytes of the file livestick wrote: all of a copied file; for an allocated
    /// persistence file only its data regions (headers, metadata, signature wipes).
    #[serde(rename = "written_bytes")]
    pub written: u64,
    /// sha256 of the bytes written, in file order.
    pub sha256: String,
    pub verified: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApplyReport {
    pub target: String,
    pub label: String,
    pub fs_uuid: String,
    pub table: TableKind,
    pub formatted: bool,
    pub files: Vec<WrittenFile>,
    pub overlay: Option<String>,
    /// An overlay the stick had, kept with its content or emptied, and why; null
    /// when there was none.
    pub kept_overlay: Option<crate::plan::KeptOverlay>,
    pub home: Option<String>,
    pub bios: bool,
    pub uefi: bool,
    pub verified: bool,
    /// Distinct bytes of the target livestick wrote (each byte once, however often
    /// it was rewritten), and of those how many were read back and matched.
    #[serde(rename = "written_bytes")]
    pub bytes_written: u64,
    #[serde(rename = "verified_bytes")]
    pub bytes_verified: u64,
    pub warnings: Vec<String>,
    /// What checked the source before writing (the plan's).
    pub iso_check: crate::plan::IsoCheck,
    /// The implanted MD5 that was checked and matched; set by the caller, which
    /// checks it once for a whole batch.
    pub iso_md5: Option<String>,
    /// The published-checksum check of the source; set by the caller, which
    /// made it before any target was opened.
    pub checksum: Option<crate::source::signed_checksum::SourceCheck>,
    /// What repairing a stopped replacement's leftovers did before the write.
    pub repaired: Vec<String>,
}

/// The version of the write report's JSON shape (docs/json.md,
/// schemas/write-report.schema.json).
pub const REPORT_SCHEMA: u32 = 1;

impl ApplyReport {
    /// The report as `write --json` prints it for one target.
    pub fn to_json(&self) -> Result<serde_json::Value, serde_json::Error> {
        let mut value = serde_json::to_value(self)?;
        if let Some(object) = value.as_object_mut() {
            object.insert("schema".into(), REPORT_SCHEMA.into());
        }
        Ok(value)
    }
}

/// Where the bytes of the ISO's files come from: the ISO itself, or (in a
/// batch) a broadcast of one read of it to every target.
pub trait IsoSource {
    /// A reader of the ISO file at `path`, `size` bytes long.
    fn open(&mut self, path: &str, size: u64) -> Result<Box<dyn Read + '_>, ApplyError>;

    /// The same file as [`IsoSource::open`], read through a buffer the source
    /// lends: a source that holds the bytes already (a batch's broadcast) lends
    /// its own, and the writer takes them from there without a copy.
    fn open_buffered(
        &mut self,
        path: &str,
        size: u64,
    ) -> Result<Box<dyn io::BufRead + '_>, ApplyError> {
        let reader = self.open(path, size)?;
        Ok(Box::new(io::BufReader::with_capacity(1 << 20, reader)))
    }

    /// Whether the source gives the sha256 of each file it was read to the end
    /// ([`IsoSource::digest_of_last`]), so the writer need not hash it again.
    fn hashes_files(&self) -> bool {
        false
    }

    /// The sha256 of the file last opened, once it was read to the end.
    fn digest_of_last(&mut self) -> Option<[u8; 32]> {
        None
    }

    /// Where the bytes of the ISO file at `path` lie in a file of the host, for a
    /// reader that reads them itself (a batch's, past the page cache); `None` when
    /// the source has no such file (a stick, a source unpacked in memory).
    fn file_extents(&mut self, _path: &str) -> Option<FileExtents> {
        None
    }
}

/// The bytes of one ISO file as byte extents of a host file.
pub struct FileExtents {
    pub file: File,
    /// `(offset, length)` in file order.
    pub extents: Vec<(u64, u64)>,
}

/// Reads the ISO directly.
pub struct DirectIsoSource {
    iso: crate::source::iso::IsoImage<std::io::BufReader<File>>,
}

impl DirectIsoSource {
    pub fn open(path: &Path) -> Result<Self, ApplyError> {
        let iso = live::open_iso(path).map_err(|e| ApplyError::Source {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(DirectIsoSource { iso })
    }
}

impl IsoSource for DirectIsoSource {
    fn open(&mut self, path: &str, _size: u64) -> Result<Box<dyn Read + '_>, ApplyError> {
        let entry = self
            .iso
            .lookup(path)
            .map_err(|e| ApplyError::Source {
                path: path.to_string(),
                reason: e.to_string(),
            })?
            .ok_or_else(|| ApplyError::Source {
                path: path.to_string(),
                reason: "no longer on the ISO (did the file change?)".into(),
            })?;
        Ok(Box::new(self.iso.open_file(&entry)))
    }

    fn file_extents(&mut self, path: &str) -> Option<FileExtents> {
        let entry = self.iso.lookup(path).ok().flatten()?;
        let file = self.iso.get_ref().get_ref().try_clone().ok()?;
        Some(FileExtents {
            file,
            extents: entry.extents.iter().map(|e| (e.offset, e.len)).collect(),
        })
    }
}

impl IsoSource for crate::live_source::StickSource {
    fn open(&mut self, path: &str, _size: u64) -> Result<Box<dyn Read + '_>, ApplyError> {
        let reader = self.reader(path).map_err(|e| ApplyError::Source {
            path: path.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Box::new(reader))
    }
}

/// The right reader for the write's source: the ISO, or another stick.
pub fn open_source(live: &live::LiveImage) -> Result<Box<dyn IsoSource + Send>, ApplyError> {
    match live.source_kind {
        live::SourceKind::Iso => Ok(Box::new(DirectIsoSource::open(&live.path)?)),
        live::SourceKind::Stick => Ok(Box::new(
            crate::live_source::StickSource::open(&live.path).map_err(|e| ApplyError::Source {
                path: live.path.display().to_string(),
                reason: e.to_string(),
            })?,
        )),
    }
}

/// `Read + Seek` in one object, for the content of a [`SparseImage`].
pub trait ReadSeek: Read + Seek {}
impl<T: Read + Seek> ReadSeek for T {}

/// A persistence file as it must be on the stick: `len` bytes of which only `regions`
/// carry data. Everything else is allocated, not written: those clusters keep what
/// the stick held, which each format tolerates by construction (a dm-snapshot store
/// needs only a zeroed header, ext4 is made with lazy init and a checksummed
/// journal, swap needs its first page). Stale signatures are wiped on top.
pub struct SparseImage {
    len: u64,
    regions: RangeSet,
    content: Box<dyn ReadSeek + Send>,
}

impl SparseImage {
    /// `content` is read only inside `regions` (clamped to `len`).
    pub fn new(
        content: Box<dyn ReadSeek + Send>,
        len: u64,
        regions: impl IntoIterator<Item = std::ops::Range<u64>>,
    ) -> Self {
        let regions = regions
            .into_iter()
            .map(|r| r.start.min(len)..r.end.min(len))
            .collect();
        SparseImage {
            len,
            regions,
            content,
        }
    }

    /// `len` bytes of which `regions` are zeros (a new dm-snapshot store, a swap tail).
    pub fn zeros(len: u64, regions: impl IntoIterator<Item = std::ops::Range<u64>>) -> Self {
        SparseImage::new(Box::new(crate::io::Zeros::new(len)), len, regions)
    }

    /// Adds the places where libblkid would find a stale signature in a file this long,
    /// so that dracut and the live system see exactly the format livestick meant.
    fn with_signature_wipes(mut self) -> Self {
        for r in wipe::signature_spots(self.len) {
            self.regions.insert(r);
        }
        self
    }
}

/// Inputs of a write that are not the ISO's files. What is cheap, and whatever can be
/// refused for bad input, is made before the target is touched; what takes programs
/// (mke2fs, the SYSLINUX installer) may still be in the making when `apply` starts
/// ([`Pending`]): the ISO's files are on their way to the stick meanwhile, and each
/// is waited for where it is first needed.
pub struct Prepared<'a> {
    /// The home image, exactly `plan.home.size` bytes (plain ext4 or LUKS).
    pub home: Option<SparseImage>,
    /// The swap image, exactly `plan.swap.size` bytes.
    pub swap: Option<SparseImage>,
    /// The overlay: a new dm-snapshot store or an OverlayFS ext4 image,
    /// exactly `plan.overlay.size` bytes.
    pub overlay: Option<SparseImage>,
    /// Overlay and home carried over from a source stick, by destination path: only
    /// the parts their formats use are written (`--copy-overlay`, `--copy-home`).
    pub copied: Vec<(String, SparseImage)>,
    pub syslinux: Option<SyslinuxFiles>,
    /// The home image and an OverlayFS overlay, when they are still being made.
    pub later_images: Option<Pending<'a, LaterImages>>,
    /// The new FAT32 filesystem with SYSLINUX installed in it, made beside the stick
    /// ([`BootFatStages::stage`]); `None` where the write formats nothing or boots no
    /// BIOS.
    pub boot_fat: Option<Pending<'a, StagedFat>>,
}

/// The images [`Prepared::later_images`] brings: each replaces the field of its name.
#[derive(Default)]
pub struct LaterImages {
    pub home: Option<SparseImage>,
    pub overlay: Option<SparseImage>,
}

/// Something made on another thread while `apply` writes, asked for where it is needed.
pub struct Pending<'a, T>(Box<dyn FnOnce() -> Result<T, ApplyError> + 'a>);

impl<'a, T: 'a> Pending<'a, T> {
    pub fn later(wait: impl FnOnce() -> Result<T, ApplyError> + 'a) -> Self {
        Pending(Box::new(wait))
    }

    fn wait(self) -> Result<T, ApplyError> {
        (self.0)()
    }
}

impl Prepared<'_> {
    /// Waits for the images still being made and puts them in their fields.
    fn take_later_images(&mut self) -> Result<(), ApplyError> {
        if let Some(pending) = self.later_images.take() {
            let later = pending.wait()?;
            if later.home.is_some() {
                self.home = later.home;
            }
            if later.overlay.is_some() {
                self.overlay = later.overlay;
            }
        }
        Ok(())
    }
}

/// A twin of the new FAT32 filesystem with SYSLINUX installed in it
/// ([`BootFatStages::stage`]): the installer and the mtools it runs read and write a
/// sparse file, not the stick, while the ISO's files are written; the loader is then
/// taken over ([`adopt_staged_loader`]) with the stick's own boot parameters, volume
/// ID included.
pub struct StagedFat {
    image: std::sync::Arc<StagedImage>,
}

/// What staging wrote: the reserved sectors, both FATs, the root and `/syslinux`
/// directories and SYSLINUX's loader files, as (offset, bytes) in the partition.
struct StagedImage {
    len: u64,
    regions: Vec<(u64, Vec<u8>)>,
}

impl StagedFat {
    /// The staged filesystem as a device of its own.
    fn device(&self) -> io::Result<crate::io::MemDevice> {
        let mut device = crate::io::MemDevice::new(self.image.len);
        for (at, bytes) in &self.image.regions {
            device.seek(SeekFrom::Start(*at))?;
            device.write_all(bytes)?;
        }
        Ok(device)
    }
}

/// SYSLINUX's loader files, made by its installer in the staged filesystem.
const LOADER_FILES: [&str; 2] = ["/syslinux/ldlinux.sys", "/syslinux/ldlinux.c32"];

/// Room for the loader files: the last clusters of the filesystem that 4 MiB takes.
/// On the stick they are set aside while the ISO's files are written from the start;
/// in the staged filesystem the installer's next file is made to start there.
/// ldlinux.sys names the sectors it lies in, so it must land on the stick in the same
/// clusters: the room is where both agree, and what the loader leaves of it is free
/// space at the end, as if it had not been set aside.
fn loader_room<D: Read + Seek>(device: &mut D) -> Result<std::ops::Range<u32>, AllocError> {
    fat_alloc::last_clusters(device, 0, 4 << 20)
}

/// One loader file as the installer left it in the staged filesystem.
struct LoaderFile {
    path: &'static str,
    attributes: u8,
    clusters: Vec<u32>,
    bytes: Vec<u8>,
}

/// The loader files of a staged filesystem, each checked to lie in [`loader_room`].
fn staged_loader_files<D: Read + Seek>(device: &mut D) -> Result<Vec<LoaderFile>, ApplyError> {
    let step = "reading SYSLINUX's loader from the staged filesystem";
    let fail = |source: SwapError| ApplyError::Layout {
        step: step.into(),
        source,
    };
    let room = loader_room(device).map_err(|source| ApplyError::Alloc {
        step: step.into(),
        source,
    })?;
    let geometry = fat_raw::geometry(device, 0).map_err(fail)?;
    let mut files = Vec::new();
    for path in LOADER_FILES {
        let (entry, attributes, clusters) =
            fat_raw::file_clusters(device, 0, path).map_err(fail)?;
        if let Some(outside) = clusters.iter().find(|c| !room.contains(c)) {
            return Err(ApplyError::io(step)(io::Error::other(format!(
                "the SYSLINUX installer put {path} in cluster {outside}, outside the clusters {room:?} set aside for it"
            ))));
        }
        let size = u64::from(entry.size);
        let mut bytes = Vec::with_capacity(entry.size as usize);
        for (at, len) in fat_raw::cluster_extents(&geometry, &clusters, size) {
            bytes.extend(
                crate::io::read_at(device, at, len as usize).map_err(ApplyError::io(step))?,
            );
        }
        files.push(LoaderFile {
            path,
            attributes,
            clusters,
            bytes,
        });
    }
    Ok(files)
}

/// Puts SYSLINUX, as the installer made it in `staged`, into the filesystem in
/// `window`, whose room for it ([`loader_room`]) was set aside when it was formatted
/// and whose files were written since: the loader files in the clusters the
/// installer chose (for the empty entries made for them), with its attributes, and
/// its boot sector code around this filesystem's parameters, in both boot sectors.
/// The room's other clusters become free.
fn adopt_staged_loader<D: Read + Write + Seek>(
    window: &mut PartitionWindow<D>,
    staged: &StagedFat,
) -> Result<(), ApplyError> {
    let step = "installing SYSLINUX's loader";
    let mut device = staged.device().map_err(ApplyError::io(step))?;
    let files = staged_loader_files(&mut device)?;
    let alloc = |source: AllocError| ApplyError::Alloc {
        step: step.into(),
        source,
    };
    let layout = |source: SwapError| ApplyError::Layout {
        step: step.into(),
        source,
    };
    let mine = fat_raw::geometry(window, 0).map_err(layout)?;
    let theirs = fat_raw::geometry(&mut device, 0).map_err(layout)?;
    if (mine.cluster_bytes, mine.fat_offset, mine.data_offset)
        != (theirs.cluster_bytes, theirs.fat_offset, theirs.data_offset)
    {
        return Err(ApplyError::io(step)(io::Error::other(
            "the staged filesystem's layout differs from the stick's",
        )));
    }
    let room = loader_room(window).map_err(alloc)?;
    fat_alloc::release(window, 0, room).map_err(alloc)?;
    for file in &files {
        let extents = fat_alloc::place(
            window,
            0,
            file.path,
            &file.clusters,
            file.bytes.len() as u64,
        )
        .map_err(alloc)?;
        let mut content = ExtentFile::new(&mut *window, &extents);
        content
            .write_all(&file.bytes)
            .map_err(ApplyError::io(step))?;
        let entry = fat_raw::find_entry(window, 0, file.path).map_err(layout)?;
        fat_raw::set_attributes(window, &entry, file.attributes).map_err(ApplyError::io(step))?;
    }
    let mut boot = crate::io::read_at(&mut device, 0, 512).map_err(ApplyError::io(step))?;
    let own = crate::io::read_at(window, 0, 512).map_err(ApplyError::io(step))?;
    if boot.len() != 512 || own.len() != 512 {
        return Err(ApplyError::io(step)(io::Error::from(
            io::ErrorKind::UnexpectedEof,
        )));
    }
    boot[fat::BOOT_SECTOR_PARAMETERS].copy_from_slice(&own[fat::BOOT_SECTOR_PARAMETERS]);
    window
        .seek(SeekFrom::Start(0))
        .map_err(ApplyError::io(step))?;
    window.write_all(&boot).map_err(ApplyError::io(step))?;
    fat::sync_backup_boot_sector(window).map_err(ApplyError::fat(step))?;
    // Placing the loader moved FSInfo's next-free hint past it, to the end: a FAT
    // driver would start the next file there and wrap around.
    fat_alloc::forget_next_free(window, 0).map_err(alloc)?;
    Ok(())
}

/// The staged filesystems of one `write` command: made once for each partition size
/// and label, and shared by the sticks of a batch that have them (only the volume ID
/// differs, and each stick keeps its own boot parameters when it takes the loader
/// over). Under an emulated CPU each program the installer runs costs a fraction of a
/// second, times every stick.
#[derive(Default)]
pub struct BootFatStages {
    made: std::sync::Mutex<std::collections::HashMap<StageKey, StageSlot>>,
}

type StageKey = (u64, u64, String);
type StageSlot = std::sync::Arc<std::sync::OnceLock<Result<std::sync::Arc<StagedImage>, String>>>;

const STAGE_STEP: &str = "making the FAT32 filesystem and its SYSLINUX boot sector";

impl BootFatStages {
    /// The FAT32 filesystem `plan` formats, with SYSLINUX installed in `/syslinux`
    /// (made in `workdir` unless a stick of this command already made it). `None`
    /// where the plan formats nothing or boots no BIOS: SYSLINUX is then installed on
    /// the stick at the end.
    pub fn stage(
        &self,
        plan: &Plan,
        files: &SyslinuxFiles,
        workdir: &Path,
    ) -> Result<Option<StagedFat>, ApplyError> {
        if plan.format.is_none() || !plan.bios {
            return Ok(None);
        }
        let key = (plan.partition_start, plan.partition_len, plan.label.clone());
        let slot = match self.made.lock() {
            Ok(mut made) => made.entry(key).or_default().clone(),
            Err(_) => {
                return Err(ApplyError::io(STAGE_STEP)(io::Error::other(
                    "a staging failed",
                )));
            }
        };
        // The stick that makes the staging gets its error whole; the others its text.
        let mut failed_here = None;
        let made = slot.get_or_init(|| match stage_image(plan, files, workdir) {
            Ok(image) => Ok(std::sync::Arc::new(image)),
            Err(e) => {
                let text = e.to_string();
                failed_here = Some(e);
                Err(text)
            }
        });
        if let Some(e) = failed_here {
            return Err(e);
        }
        match made {
            Ok(image) => Ok(Some(StagedFat {
                image: image.clone(),
            })),
            Err(text) => Err(ApplyError::StagedElsewhere(text.clone())),
        }
    }
}

/// Formats `plan`'s FAT32 filesystem in an unlinked sparse file, installs SYSLINUX
/// into it and reads back what both wrote.
fn stage_image(
    plan: &Plan,
    files: &SyslinuxFiles,
    workdir: &Path,
) -> Result<StagedImage, ApplyError> {
    let step = STAGE_STEP;
    let path = workdir.join("boot-fat.img");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(ApplyError::io(step))?;
    // Unlinked once the installer is done: nothing is left behind, whatever happens.
    let staged = (|| -> Result<(), ApplyError> {
        file.set_len(plan.partition_len)
            .map_err(ApplyError::io(step))?;
        let hidden = u32::try_from(plan.partition_start / partition::SECTOR).unwrap_or(u32::MAX);
        // Made in memory and written out in large writes: fatfs formats sector by
        // sector, each a system call.
        let mut made = crate::io::MemDevice::new(plan.partition_len);
        {
            let mut window = PartitionWindow::new(&mut made, 0, plan.partition_len);
            fat::format_live(&mut window, &plan.label, plan.volume_id, hidden)
                .map_err(ApplyError::fat(step))?;
            let fs = fat::open(&mut window).map_err(ApplyError::fat(step))?;
            fat::create_dir_all(&fs, "/syslinux").map_err(ApplyError::fat(step))?;
            fs.unmount().map_err(ApplyError::io(step))?;
            window.flush().map_err(ApplyError::io(step))?;
        }
        let alloc = |source| ApplyError::Alloc {
            step: step.into(),
            source,
        };
        // The installer's loader goes where the stick keeps room for it.
        let room = loader_room(&mut made).map_err(alloc)?;
        fat_alloc::start_next_file_at(&mut made, 0, room.start).map_err(alloc)?;
        for (at, bytes) in made.written() {
            use std::os::unix::fs::FileExt;
            file.write_all_at(bytes, at).map_err(ApplyError::io(step))?;
        }
        drop(made);
        syslinux::install(files, &path, 0, "/syslinux")?;
        let mut window = PartitionWindow::new(&mut file, 0, plan.partition_len);
        fat::sync_backup_boot_sector(&mut window).map_err(ApplyError::fat(step))?;
        window.flush().map_err(ApplyError::io(step))?;
        // Found here, beside the stick, rather than when the stick is half written.
        staged_loader_files(&mut window)?;
        Ok(())
    })();
    let removed = std::fs::remove_file(&path).map_err(ApplyError::io(step));
    staged?;
    removed?;
    let mut regions = Vec::new();
    for range in crate::disk::sparse::data_regions(&file).map_err(ApplyError::io(step))? {
        let bytes = crate::io::read_at(&mut file, range.start, (range.end - range.start) as usize)
            .map_err(ApplyError::io(step))?;
        regions.push((range.start, bytes));
    }
    Ok(StagedImage {
        len: plan.partition_len,
        regions,
    })
}

/// The persistence images of `plan` with their paths, overlay first, each with the
/// wipes of old signatures it needs; taken out of `prepared`.
fn persistent_images(plan: &Plan, prepared: &mut Prepared<'_>) -> Vec<(String, SparseImage)> {
    [
        (
            plan.overlay.as_ref().map(|o| o.path.clone()),
            prepared.overlay.take(),
        ),
        (
            plan.home.as_ref().map(|h| h.path.clone()),
            prepared.home.take(),
        ),
        (
            plan.swap.as_ref().map(|s| s.path.clone()),
            prepared.swap.take(),
        ),
    ]
    .into_iter()
    .filter_map(|(path, image)| Some((path?, image?)))
    .chain(std::mem::take(&mut prepared.copied))
    .map(|(path, image)| (path, image.with_signature_wipes()))
    .collect()
}

/// A byte range and the read-back check value of what was written there.
type HashedRange = (std::ops::Range<u64>, u64);

/// A persistence file after its data regions were written.
struct Persisted {
    path: String,
    size: u64,
    /// The written regions of the file, with the read-back check value of each.
    regions: Vec<HashedRange>,
    /// The same bytes as device offsets.
    on_device: RangeSet,
    sha256: [u8; 32],
}

/// Maps file ranges onto the device through the file's extents.
fn device_ranges(extents: &[(u64, u64)], regions: &RangeSet) -> RangeSet {
    let mut out = RangeSet::new();
    let mut file_at = 0u64;
    for &(dev_at, len) in extents {
        let extent = file_at..file_at + len;
        for r in regions.iter() {
            let lo = r.start.max(extent.start);
            let hi = r.end.min(extent.end);
            if lo < hi {
                out.insert(dev_at + (lo - file_at)..dev_at + (hi - file_at));
            }
        }
        file_at += len;
    }
    out
}

/// Writes `image`'s regions into `file` (the allocated persistence file): the check
/// value of each region, for the read-back, and the sha256 of them all, for the report.
fn write_regions<F: Read + Write + Seek>(
    file: &mut ExtentFile<F>,
    image: &mut SparseImage,
    mut progress: impl FnMut(u64),
) -> io::Result<(Vec<HashedRange>, [u8; 32])> {
    use crate::io::StreamHash;
    let mut whole = crate::io::Sha256Hash::default();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 4 << 20];
    for r in image.regions.iter() {
        let mut part = crate::io::CheckHash::default();
        image.content.seek(SeekFrom::Start(r.start))?;
        file.seek(SeekFrom::Start(r.start))?;
        let mut left = r.end - r.start;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            image.content.read_exact(&mut buf[..n])?;
            file.write_all(&buf[..n])?;
            part.update(&buf[..n]);
            whole.update(&buf[..n]);
            left -= n as u64;
            progress(n as u64);
        }
        out.push((r, part.finish()));
    }
    file.flush()?;
    Ok((out, whole.finish()))
}

/// The extents of each file at `paths`, as device offsets, from the FAT read into
/// memory once (a chain is followed entry by entry; from the device that would be a
/// read per cluster).
fn chains_of<'p>(
    file: &mut File,
    start: u64,
    len: u64,
    paths: impl IntoIterator<Item = &'p str>,
) -> Result<Vec<Vec<(u64, u64)>>, ApplyError> {
    let mut window = PartitionWindow::new(file, start, len);
    fat::cache_metadata(&mut window).map_err(ApplyError::fat("reading the FAT"))?;
    paths
        .into_iter()
        .map(|path| {
            fat_raw::file_extents(&mut window, 0, path)
                .map(|extents| extents.into_iter().map(|(at, n)| (start + at, n)).collect())
                .map_err(|source| ApplyError::Layout {
                    step: format!("finding {path} to verify it"),
                    source,
                })
        })
        .collect()
}

/// `LIVESTICK_FAILPOINT=corrupt-file|corrupt-persist|corrupt-meta`: the target
/// corrupts one byte of a copied file, of a persistence file or of the FAT after it
/// is written and before it is read back, as a failing stick would. Tests prove with
/// it that the read-back catches each kind of byte.
struct TestCorruption {
    point: String,
    corrupter: Corrupter,
}

impl TestCorruption {
    fn from_env(target: &BoundedDirty<'_>) -> Option<TestCorruption> {
        let point = std::env::var("LIVESTICK_FAILPOINT").ok()?;
        if !point.starts_with("corrupt-") {
            return None;
        }
        let corrupter = target.corrupter()?;
        Some(TestCorruption { point, corrupter })
    }

    /// When this is the failpoint, every write into `within` from now on is corrupted.
    fn arm_every(&self, point: &str, within: std::ops::Range<u64>) -> Result<(), ApplyError> {
        if self.point == point {
            self.corrupter
                .corrupt_every_write(within, 1)
                .map_err(ApplyError::io("corrupting for a test"))?;
        }
        Ok(())
    }

    /// When this is the failpoint, the next write of at least `min_len` bytes into
    /// `within` is corrupted.
    fn arm(
        &self,
        point: &str,
        within: std::ops::Range<u64>,
        min_len: u64,
    ) -> Result<(), ApplyError> {
        if self.point == point {
            self.corrupter
                .corrupt_next_write(within, min_len)
                .map_err(ApplyError::io("corrupting for a test"))?;
        }
        Ok(())
    }
}

/// Says which file (or the FAT) a read-back mismatch hit.
fn name_mismatch(
    file: &mut File,
    (start, len): (u64, u64),
    written: &[(String, u64, WrittenDigest)],
    persisted: &[Persisted],
    bad: &ReadBackMismatch,
) -> ApplyError {
    let range = &bad.range;
    let what = if let Some(p) = persisted.iter().find(|p| p.on_device.overlaps(range)) {
        format!("{} (device bytes {}..{})", p.path, range.start, range.end)
    } else {
        // The FAT is read afresh to find the files' chains; if that fails as well,
        // the mismatch is still reported, by its place on the device.
        let chains = chains_of(file, start, len, written.iter().map(|w| w.0.as_str()));
        let hit = chains.ok().and_then(|chains| {
            written.iter().zip(chains).find_map(|(w, chain)| {
                chain
                    .iter()
                    .any(|&(at, n)| at < range.end && range.start < at + n)
                    .then(|| w.0.clone())
            })
        });
        hit.unwrap_or_else(|| {
            format!(
                "the FAT, directories and boot sectors (device bytes {}..{})",
                range.start, range.end
            )
        })
    };
    mismatch(&what, bad.expected, bad.actual)
}

fn mismatch(what: &str, expected: u64, actual: u64) -> ApplyError {
    ApplyError::VerifyMismatch {
        path: what.to_string(),
        expected: format!("{expected:016x}"),
        actual: format!("{actual:016x}"),
    }
}

/// Hashes `ranges` as the page cache holds them (what was just written), drops the
/// cache, and hashes them again from the stick: a read-back of exactly those bytes.
fn read_back_ranges(
    file: &mut File,
    kind: TargetKind,
    ranges: &RangeSet,
    what: &str,
) -> Result<(), ApplyError> {
    let expected = check_ranges(file, ranges.iter(), |_| {})
        .map_err(ApplyError::io(format!("reading {what}")))?;
    target::sync_and_drop_cache(file, kind).map_err(ApplyError::io(format!("syncing {what}")))?;
    let actual = check_ranges(file, ranges.iter(), |_| {})
        .map_err(ApplyError::io(format!("reading back {what}")))?;
    if actual != expected {
        return Err(mismatch(what, expected, actual));
    }
    Ok(())
}

pub struct ApplyOptions {
    pub verify_write: bool,
}

/// Writes the plan to the target. A write the stick fails is reported by the step
/// that wrote the failing range, not by the step during which a later sync found it.
pub fn apply(
    plan: &Plan,
    probe: &TargetProbe,
    source: &mut dyn IsoSource,
    prepared: Prepared<'_>,
    options: &ApplyOptions,
    progress: &Progress,
) -> Result<ApplyReport, ApplyError> {
    let tags = StepTags::default();
    apply_tagged(plan, probe, source, prepared, options, progress, &tags)
        .map_err(|e| name_failed_step(e, &tags))
}

/// `e`, or, when the stick failed a write, that failure named by the step(s) that
/// wrote where it failed, and when it was found.
fn name_failed_step(e: ApplyError, tags: &StepTags) -> ApplyError {
    let Some(failure) = tags.failure() else {
        return e;
    };
    if failure.steps.is_empty() {
        return e;
    }
    let surfaced = match &e {
        ApplyError::Fat { step, .. }
        | ApplyError::Partition { step, .. }
        | ApplyError::Io { step, .. }
        | ApplyError::Alloc { step, .. }
        | ApplyError::Layout { step, .. } => Some(step.clone()),
        _ => None,
    };
    let how = if failure.found_when_syncing {
        "found when syncing"
    } else {
        "reported by the writer"
    };
    let found = match surfaced {
        Some(step) if !failure.steps.contains(&step) => format!("{how}, while {step}"),
        _ => how.to_string(),
    };
    let step = match failure.steps.as_slice() {
        [one] => one.clone(),
        // A sync does not say which of the writes since the one before it failed.
        many => format!("{} (one of these)", many.join(" or ")),
    };
    ApplyError::WriteFailed {
        step,
        error: failure.error,
        found,
    }
}

/// `LIVESTICK_FAILPOINT=write-error` with `LIVESTICK_FAILPOINT_OFFSET=N`: every
/// write touching device byte N is reported lost by the next sync, as QEMU's
/// blkdebug makes a stick do (`io::Corrupter::fail_writes`). Tests prove with it that
/// the error names the step that wrote there.
fn write_error_failpoint(target: &BoundedDirty<'_>) -> Result<(), ApplyError> {
    if std::env::var("LIVESTICK_FAILPOINT").as_deref() != Ok("write-error") {
        return Ok(());
    }
    let at = std::env::var("LIVESTICK_FAILPOINT_OFFSET")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    if let (Some(at), Some(corrupter)) = (at, target.corrupter()) {
        corrupter
            .fail_writes(at..at + 1)
            .map_err(ApplyError::io("failing writes for a test"))?;
    }
    Ok(())
}

/// [`apply`], each write tagged in `tags` with the step that makes it.
#[allow(clippy::too_many_arguments)]
fn apply_tagged(
    plan: &Plan,
    probe: &TargetProbe,
    source: &mut dyn IsoSource,
    prepared: Prepared<'_>,
    options: &ApplyOptions,
    progress: &Progress,
    tags: &StepTags,
) -> Result<ApplyReport, ApplyError> {
    let mut warnings = Vec::new();
    // Built before the target is opened: a partition that cannot hold its files
    // fails here, with the stick untouched.
    // A copied overlay or home goes into the ext4 partition as a sparse host file
    // debugfs writes: its used parts only, the rest unwritten.
    let mut prepared = prepared;
    // The ext4 layout builds its partition from every image before it opens the stick.
    if plan.ext4_live.is_some() {
        prepared.take_later_images()?;
    }
    let host_copies = match &plan.ext4_live {
        Some(_) => materialise_copied(&mut prepared)?,
        None => Vec::new(),
    };
    let mut ext4_built = build_ext4_live(plan, &prepared, &host_copies)?;
    let mut file = target::open_for_write(probe, plan.target.size)?;
    let start = plan.partition_start;
    let len = plan.partition_len;
    // debugfs reaches the ext4 live partition through the handle opened above.
    let by_fd = match &plan.ext4_live {
        Some(_) => Some(
            target::inheritable_path(&file)
                .map_err(ApplyError::io("passing the target to debugfs"))?,
        ),
        None => None,
    };
    let in_place = plan.ext4_live.as_ref().filter(|step| step.in_place);
    // What debugfs and the extent edits write here is read back with the rest.
    let (in_place_files, allocated_in_place) = match (in_place, &by_fd) {
        (Some(step), Some(by_fd)) => {
            allocate_ext4_in_place(plan, step, &prepared, &host_copies, by_fd, &mut file)?
        }
        _ => (Vec::new(), RangeSet::new()),
    };
    let syslinux_files = prepared.syslinux.take();
    let mut boot_fat = prepared.boot_fat.take();
    let syslinux_staged = boot_fat.is_some();
    let mbr_code = syslinux_files
        .as_ref()
        .filter(|_| plan.bios)
        .map(|files| mbr_boot_code(files, plan.table));
    // The staged loader, once waited for: the manifest records it, then it goes in.
    let mut staged: Option<StagedFat> = None;
    let mut boot_written: Option<crate::manifest::BootWritten> = None;
    // Persistence files, by path: made empty with the ISO's files, then given their
    // clusters, with only their data regions written, once their images are made.
    let persistent_paths: Vec<String> = [
        plan.overlay.as_ref().map(|o| o.path.clone()),
        plan.home.as_ref().map(|h| h.path.clone()),
        plan.swap.as_ref().map(|s| s.path.clone()),
    ]
    .into_iter()
    .flatten()
    .chain(prepared.copied.iter().map(|(path, _)| path.clone()))
    .collect();
    // On the ext4 layout they live in partition 2, written after the FAT.
    let (persistent_paths, mut ext4_persistent) = match plan.ext4_live {
        Some(_) => (Vec::new(), persistent_images(plan, &mut prepared)),
        None => (persistent_paths, Vec::new()),
    };
    let mut ext4_files: Vec<WrittenFile> = Vec::new();
    let is_allocated = |dest: &str| {
        persistent_paths
            .iter()
            .any(|path| path.eq_ignore_ascii_case(dest))
    };
    let copied_bytes: u64 = plan
        .copies
        .iter()
        .filter(|c| is_allocated(&c.dest))
        .map(|c| c.size)
        .sum();

    let mut written: Vec<(String, u64, WrittenDigest)> = Vec::new();
    let mut persisted: Vec<Persisted> = Vec::new();
    let mut before_verify: RangeSet;
    let read_back: Option<ReadBack>;
    {
        let dirty_limit = match probe.kind {
            TargetKind::BlockDevice => DIRTY_LIMIT,
            TargetKind::ImageFile => 0,
        };
        // Verification reads each synced batch back while the next is written.
        let mut bounded = if options.verify_write {
            BoundedDirty::verifying(&mut file, dirty_limit)
                .map_err(ApplyError::io("opening the target"))?
        } else {
            BoundedDirty::new(&mut file, dirty_limit)
        };
        bounded
            .tag_steps(tags.clone())
            .map_err(ApplyError::io("opening the target"))?;
        write_error_failpoint(&bounded)?;
        let failpoint = TestCorruption::from_env(&bounded);
        let mut recorder =
            WriteRecorder::new(&mut bounded).map_err(ApplyError::io("opening the target"))?;
        let hidden = u32::try_from(start / partition::SECTOR).unwrap_or(u32::MAX);
        // Made in memory while the old tables and signatures are wiped: the stick
        // takes those writes meanwhile.
        let new_fat = plan.format.as_ref().map(|_| {
            let label = plan.label.clone();
            let volume_id = plan.volume_id;
            std::thread::spawn(move || fat::MadeFat::live(len, &label, volume_id, hidden))
        });
        if new_fat.is_some() {
            tags.set("clearing the old partition table");
            partition::wipe_tables(&mut recorder, plan.target.size).map_err(|source| {
                ApplyError::Partition {
                    step: "clearing the old partition table".into(),
                    source,
                }
            })?;
            // Old signatures at either end of the disk and of the new partition would
            // make udev and blkid see a RAID member or another filesystem. Not where
            // the new FAT's reserved sectors and tables go: they are written whole.
            let spots = wipe::disk_and_partition_spots(
                plan.target.size,
                start,
                len,
                fat::live_metadata_floor(len),
            );
            tags.set("wiping old signatures");
            zero_ranges(&mut recorder, spots.iter())
                .map_err(ApplyError::io("wiping old signatures"))?;
        }
        let new_fat = match new_fat.map(|made| made.join()) {
            Some(Ok(made)) => {
                Some(made.map_err(ApplyError::fat("formatting the FAT32 filesystem"))?)
            }
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => None,
        };
        let mut window = PartitionWindow::new(&mut recorder, start, len);
        if let Some(made) = new_fat {
            tags.set("formatting the FAT32 filesystem");
            made.load(&mut window)
                .map_err(ApplyError::fat("formatting the FAT32 filesystem"))?;
            // A new FAT goes to the stick once, whole, after every file's chain
            // is in it: nothing reads it from the stick before, and the stick
            // boots nothing until its partition table is written last.
            window.hold_metadata(true);
            if syslinux_staged {
                // Kept free of the ISO's files for the loader being staged meanwhile.
                let step = "setting aside room for SYSLINUX's loader";
                let alloc = |source| ApplyError::Alloc {
                    step: step.into(),
                    source,
                };
                let room = loader_room(&mut window).map_err(alloc)?;
                fat_alloc::reserve(&mut window, 0, room).map_err(alloc)?;
            }
        }
        if let Some(label) = &plan.relabel {
            tags.set(format!("relabelling the filesystem to {label}"));
            fat::set_label(&mut window, label).map_err(ApplyError::fat(format!(
                "relabelling the filesystem to {label}"
            )))?;
        }
        // What is known now (the ext4 layout counts its own below); the images still
        // being made, and the wipes of old signatures, add theirs when they come.
        let persist_total: u64 = match plan.ext4_live {
            Some(_) => 0,
            None => [&prepared.overlay, &prepared.home, &prepared.swap]
                .into_iter()
                .flatten()
                .chain(prepared.copied.iter().map(|(_, image)| image))
                .map(|image| image.regions.total())
                .sum(),
        };
        // A leftover whose chain another file still names (`home.img.new` of a
        // replacement stopped between its two directory writes) is detached from it
        // first, so deleting it frees nothing that file uses.
        for path in &plan.deletes {
            tags.set(format!("checking {path} before deleting it"));
            let repaired =
                crate::persist::merge::replace::detach_shared_leftover(&mut window, 0, path)
                    .map_err(|e| match e {
                        crate::disk::fat_raw::SwapError::Io(source) => source,
                        other => io::Error::other(other.to_string()),
                    })
                    .map_err(ApplyError::io(format!(
                        "checking {path} before deleting it"
                    )))?;
            warnings.extend(repaired);
        }
        let fat_area = match &failpoint {
            Some(_) => {
                start
                    ..start
                        + fat::metadata_len(&mut window)
                            .map_err(ApplyError::io("reading the FAT boot sector"))?
            }
            None => start..start,
        };
        // fatfs flushes after each file; the stick's queue need not run dry each time.
        window.hold_device_flush(true);
        {
            tags.set("opening the FAT filesystem");
            let fs =
                fat::open(&mut window).map_err(ApplyError::fat("opening the FAT filesystem"))?;
            for path in &plan.deletes {
                tags.set(format!("deleting {path}"));
                fat::remove_all(&fs, path).map_err(ApplyError::fat(format!("deleting {path}")))?;
            }
            // On the ext4 layout the kept overlay is in the ext4 partition (below).
            if let Some(kept) = plan.kept_overlay.as_ref().filter(|_| in_place.is_none()) {
                tags.set(format!("keeping the overlay {}", kept.to));
                if !kept.from.eq_ignore_ascii_case(&kept.to) {
                    fat::rename(&fs, &kept.from, &kept.to).map_err(ApplyError::fat(format!(
                        "renaming the overlay {} to {}",
                        kept.from, kept.to
                    )))?;
                }
                // One the plan makes anew (an OverlayFS overlay) is emptied by that.
                let remade = plan
                    .overlay
                    .as_ref()
                    .is_some_and(|o| o.path.eq_ignore_ascii_case(&kept.to));
                if kept.reset && !remade {
                    fat::reset_overlay_header(&fs, &kept.to)
                        .map_err(ApplyError::fat(format!("emptying the overlay {}", kept.to)))?;
                }
            }

            progress.phase(
                "write",
                plan.bytes_to_write - copied_bytes.min(plan.bytes_to_write) + persist_total,
            );
            if let Some(corrupt) = &failpoint {
                corrupt.arm("corrupt-file", fat_area.end..start + len, 256 << 10)?;
            }
            for copy in plan.copies.iter().filter(|c| !is_allocated(&c.dest)) {
                let step = format!("writing {}", copy.dest);
                tags.set(step.as_str());
                let sum = match &copy.source {
                    CopySource::Iso { path } if source.hashes_files() => {
                        let mut reader = crate::io::Exactly::new(
                            source.open_buffered(path, copy.size)?,
                            copy.size,
                        );
                        fat::write_file_buffered(&fs, &copy.dest, &mut reader, copy.size, |n| {
                            progress.inc(n)
                        })
                        .map_err(ApplyError::fat(step.clone()))?;
                        drop(reader);
                        let sha256 = source.digest_of_last().ok_or_else(|| {
                            ApplyError::io(step)(io::Error::other(
                                "the batch's ISO reader gave no digest for the file",
                            ))
                        })?;
                        WrittenDigest { sha256 }
                    }
                    CopySource::Iso { path } => {
                        let mut reader =
                            crate::io::Exactly::new(source.open(path, copy.size)?, copy.size);
                        fat::write_file_hashed(&fs, &copy.dest, &mut reader, copy.size, |n| {
                            progress.inc(n)
                        })
                        .map_err(ApplyError::fat(step))?
                    }
                    CopySource::Host { path } => {
                        let host = File::open(path)
                            .map_err(ApplyError::io(format!("reading {}", path.display())))?;
                        let mut host = crate::io::Exactly::new(host, copy.size);
                        fat::write_file_hashed(&fs, &copy.dest, &mut host, copy.size, |n| {
                            progress.inc(n)
                        })
                        .map_err(ApplyError::fat(step))?
                    }
                };
                written.push((copy.dest.clone(), copy.size, sum));
            }
            // Persistence files start empty (replacing any old file of that name);
            // their clusters are allocated below, once fatfs has let go of the FAT.
            // So do the loader files, which go where the staging put them.
            let loader_paths = LOADER_FILES.iter().filter(|_| syslinux_staged);
            for path in persistent_paths
                .iter()
                .map(String::as_str)
                .chain(loader_paths.copied())
            {
                tags.set(format!("creating {path}"));
                fat::write_file(&fs, path, &mut io::empty(), 0, |_| {})
                    .map_err(ApplyError::fat(format!("creating {path}")))?;
            }
            for config in &plan.configs {
                let step = format!("writing {}", config.dest);
                tags.set(step.as_str());
                let bytes = config.content.as_bytes();
                let sum = fat::write_file_hashed(
                    &fs,
                    &config.dest,
                    &mut &bytes[..],
                    bytes.len() as u64,
                    |_| {},
                )
                .map_err(ApplyError::fat(step))?;
                written.push((config.dest.clone(), bytes.len() as u64, sum));
            }
            // The staging ran beside the copies and is done by now; its loader and
            // boot sector are what the stick gets, so the manifest records them.
            if let Some(pending) = boot_fat.take() {
                tags.set("waiting for SYSLINUX's staged filesystem");
                let made = pending.wait()?;
                if let Some(code) = &mbr_code {
                    boot_written = Some(staged_boot_written(&made, code)?);
                }
                staged = Some(made);
            }
            // After every file it lists, so that it names exactly what was written
            // (on the ext4 layout, once the ext4 partition's files are: below).
            if plan.ext4_live.is_none() {
                tags.set("writing the stick manifest");
                crate::manifest::write_after_apply(
                    &fs,
                    plan,
                    written
                        .iter()
                        .map(|(path, size, sum)| (path.as_str(), *size, hex(&sum.sha256))),
                    boot_written.as_ref(),
                )
                .map_err(ApplyError::fat("writing the stick manifest"))?;
            }
            tags.set("closing the FAT filesystem");
            fs.unmount()
                .map_err(ApplyError::io("closing the FAT filesystem"))?;
        }
        if let Some(corrupt) = &failpoint {
            // The FAT is written again as files are allocated: every write of it.
            corrupt.arm_every("corrupt-meta", fat_area.clone())?;
        }
        tags.set("flushing the FAT filesystem");
        window.hold_device_flush(false);
        window
            .flush()
            .map_err(ApplyError::io("flushing the FAT filesystem"))?;
        // Before the persistence files: the room it does not use is theirs too.
        if let Some(staged) = &staged {
            tags.set("installing SYSLINUX's loader");
            adopt_staged_loader(&mut window, staged)?;
        }
        let mut persistent = match plan.ext4_live {
            Some(_) => Vec::new(),
            None => {
                tags.set("waiting for the persistence images");
                prepared.take_later_images()?;
                let images = persistent_images(plan, &mut prepared);
                let total: u64 = images.iter().map(|(_, i)| i.regions.total()).sum();
                progress.grow(total.saturating_sub(persist_total));
                images
            }
        };
        for (path, image) in &mut persistent {
            let step = format!("allocating {path}");
            tags.set(step.as_str());
            let extents =
                fat_alloc::allocate(&mut window, 0, path, image.len).map_err(|source| {
                    ApplyError::Alloc {
                        step: step.clone(),
                        source,
                    }
                })?;
            let on_device = device_ranges(&extents, &image.regions).shifted(start);
            if let (Some(corrupt), true, Some(first)) =
                (&failpoint, persisted.is_empty(), on_device.iter().next())
            {
                corrupt.arm("corrupt-persist", first, 1)?;
            }
            let mut target_file = ExtentFile::new(&mut window, &extents);
            tags.set(format!("writing {path}"));
            let (regions, sha256) = write_regions(&mut target_file, image, |n| progress.inc(n))
                .map_err(ApplyError::io(format!("writing {path}")))?;
            persisted.push(Persisted {
                path: path.clone(),
                size: image.len,
                regions,
                on_device,
                sha256,
            });
        }
        tags.set("finishing the FAT filesystem");
        fat::repair_fatfs_quirks(&mut window)
            .map_err(ApplyError::fat("finishing the FAT filesystem"))?;
        window.hold_metadata(false);
        window
            .flush()
            .map_err(ApplyError::io("flushing the FAT filesystem"))?;
        drop(window);
        if let (Some(step), Some(built)) = (&plan.ext4_live, ext4_built.as_mut()) {
            tags.set("writing the ext4 live partition");
            let mut part = PartitionWindow::new(&mut recorder, step.start, step.len);
            ext4_files = write_ext4_live(
                &mut part,
                built,
                step,
                source,
                &mut ext4_persistent,
                progress,
            )?;
            ext4_files.extend(host_copies.iter().map(HostCopy::report));
        }
        if let Some(step) = in_place {
            tags.set("writing into the ext4 live partition");
            let mut part = PartitionWindow::new(&mut recorder, step.start, step.len);
            ext4_files = write_live_files(
                &mut part,
                &in_place_files,
                step,
                source,
                &mut ext4_persistent,
                progress,
            )?;
            ext4_files.extend(host_copies.iter().map(HostCopy::report));
        }
        before_verify = recorder.into_written();
        before_verify.extend(&allocated_in_place);
        read_back = bounded
            .finish_read_back()
            .map_err(ApplyError::io("reading back what was written"))?;
    }
    if let Some(bad) = read_back.as_ref().and_then(|r| r.mismatch.as_ref()) {
        return Err(name_mismatch(
            &mut file,
            (start, len),
            &written,
            &persisted,
            bad,
        ));
    }
    file.sync_all()
        .map_err(ApplyError::io("syncing the target"))?;

    // Written after the read-back of the write phase: read back on their own.
    let mut after_write = RangeSet::new();
    if let (Some(step), Some(by_fd)) = (&plan.ext4_live, &by_fd) {
        let runs = match &ext4_built {
            Some(built) => built.files.clone(),
            None => in_place_files.clone(),
        };
        tags.set("finishing the ext4 live partition");
        after_write.extend(&finish_ext4_live(
            plan,
            step,
            by_fd,
            &mut file,
            &runs,
            &ext4_files,
        )?);
        tags.set("writing the stick manifest");
        after_write.extend(&write_manifest_ext4(
            plan,
            step,
            &mut file,
            &written,
            &ext4_files,
            boot_written.as_ref(),
        )?);
    }
    if plan.bios
        && !syslinux_staged
        && let Some(files) = &syslinux_files
    {
        progress.note("installing SYSLINUX");
        // Through the handle written so far, never the path again (opened once).
        let by_fd = target::inheritable_path(&file).map_err(ApplyError::io(
            "passing the target to the SYSLINUX installer",
        ))?;
        syslinux::install(files, &by_fd, start, "/syslinux")?;
        let mut recorder =
            WriteRecorder::new(&mut file).map_err(ApplyError::io("opening the target"))?;
        let mut window = PartitionWindow::new(&mut recorder, start, len);
        fat::sync_backup_boot_sector(&mut window)
            .map_err(ApplyError::fat("updating the backup boot sector"))?;
        if let Some(code) = &mbr_code {
            tags.set("recording the boot code in the stick manifest");
            record_installed_boot(&mut window, code)?;
        }
        drop(window);
        after_write.extend(recorder.written());
        // What the installer wrote: the boot sector and its loader files.
        after_write.insert(start..start + partition::SECTOR);
        for loader in ["/syslinux/ldlinux.sys", "/syslinux/ldlinux.c32"] {
            if let Ok(extents) = fat_raw::file_extents(&mut file, start, loader) {
                for (at, n) in extents {
                    after_write.insert(at..at + n);
                }
            }
        }
    }
    before_verify.extend(&after_write);

    // Every range written, and every range read back, each counted once however
    // often it was written (the table goes where the old tables were zeroed).
    let mut written_ranges = before_verify.clone();
    let mut verified_ranges = RangeSet::new();
    let verified = options.verify_write;
    if options.verify_write {
        // Everything the write phase wrote was read back while it was written, each
        // byte in its final content; what is left (what SYSLINUX and the backup boot
        // sector wrote since, anything the read-back could not cover) is read back now.
        let while_writing = read_back
            .map(|r| r.verified)
            .unwrap_or_default()
            .difference(&after_write)
            .intersection(&before_verify);
        let rest = before_verify.difference(&while_writing);
        progress.phase("verify", rest.total());
        if !rest.is_empty() {
            read_back_ranges(
                &mut file,
                probe.kind,
                &rest,
                "the FAT, directories and boot sectors",
            )?;
        }
        verified_ranges.extend(&while_writing);
        verified_ranges.extend(&rest);
    }

    // Boot-critical bytes last.
    let boot_code = mbr_code;
    let mut recorder =
        WriteRecorder::new(&mut file).map_err(ApplyError::io("opening the target"))?;
    match &plan.format {
        Some(layout) => {
            partition::write_table(&mut recorder, layout, boot_code.as_ref(), plan.volume_id)
                .map_err(|source| ApplyError::Partition {
                    step: "writing the partition table".into(),
                    source,
                })?
        }
        None => {
            if let Some(code) = boot_code {
                write_boot_code(&mut recorder, &code, plan)
                    .map_err(ApplyError::io("writing the MBR boot code"))?;
            }
        }
    }
    if let (Some(step), Some(_)) = (&plan.ext4_live, &plan.format) {
        crate::disk::ext4_live::add_partition(&mut recorder, plan.table, step.start, step.len)?;
    }
    let last = recorder.into_written();
    file.sync_all()
        .map_err(ApplyError::io("syncing the target"))?;
    written_ranges.extend(&last);
    if options.verify_write && !last.is_empty() {
        read_back_ranges(&mut file, probe.kind, &last, "the partition table")?;
        verified_ranges.extend(&last);
    }
    if probe.kind == TargetKind::BlockDevice
        && let Err(warning) = target::reread_partitions(&file)
    {
        warnings.push(warning);
    }
    progress.finish();

    let mut files: Vec<WrittenFile> = written
        .iter()
        .map(|(path, size, sum)| WrittenFile {
            path: path.clone(),
            size: *size,
            written: *size,
            sha256: hex(&sum.sha256),
            verified,
        })
        .collect();
    files.extend(persisted.iter().map(|p| WrittenFile {
        path: p.path.clone(),
        size: p.size,
        written: p.regions.iter().map(|(r, _)| r.end - r.start).sum(),
        sha256: hex(&p.sha256),
        verified,
    }));
    files.extend(
        ext4_files
            .into_iter()
            .map(|f| WrittenFile { verified, ..f }),
    );
    Ok(ApplyReport {
        target: probe.path.display().to_string(),
        label: plan.label.clone(),
        fs_uuid: plan.fs_uuid.clone(),
        table: plan.table,
        formatted: plan.format.is_some(),
        files,
        overlay: plan.overlay.as_ref().map(|o| o.path.clone()),
        kept_overlay: plan.kept_overlay.clone(),
        home: plan.home.as_ref().map(|h| h.path.clone()),
        bios: plan.bios,
        uefi: plan.uefi,
        verified,
        bytes_written: written_ranges.total(),
        bytes_verified: verified_ranges.total(),
        warnings,
        iso_check: plan.iso_check,
        iso_md5: None,
        checksum: None,
        repaired: plan.repaired.clone(),
    })
}

/// The MBR boot code for a table: SYSLINUX's `mbr.bin`, or `gptmbr.bin` for GPT.
fn mbr_boot_code(files: &SyslinuxFiles, table: TableKind) -> [u8; 440] {
    match table {
        TableKind::Mbr => files.mbr,
        TableKind::Gpt => files.gptmbr,
    }
}

/// What the stick gets from a staged loader, for the manifest: the loader files as
/// the staging made them (they are placed unchanged) and its boot sector's code
/// (only the parameter block is the stick's own).
fn staged_boot_written(
    staged: &StagedFat,
    mbr_code: &[u8; 440],
) -> Result<crate::manifest::BootWritten, ApplyError> {
    let step = "reading SYSLINUX's loader from the staged filesystem";
    let mut device = staged.device().map_err(ApplyError::io(step))?;
    let loader_files = staged_loader_files(&mut device)?
        .into_iter()
        .map(|f| {
            let sha256 = hex(&<sha2::Sha256 as sha2::Digest>::digest(&f.bytes));
            (f.path.to_string(), f.bytes.len() as u64, sha256)
        })
        .collect();
    let sector = crate::io::read_at(&mut device, 0, 512).map_err(ApplyError::io(step))?;
    Ok(crate::manifest::BootWritten {
        loader_files,
        record: crate::manifest::BootRecord::of(mbr_code, &sector),
    })
}

/// After SYSLINUX's installer ran on the stick itself (one this write did not
/// format): its loader files and boot sector, read back through `window`, go into
/// the manifest written before it ran.
fn record_installed_boot<D: Read + Write + Seek>(
    window: &mut PartitionWindow<D>,
    mbr_code: &[u8; 440],
) -> Result<(), ApplyError> {
    let step = "recording the boot code in the stick manifest";
    let sector = crate::io::read_at(window, 0, 512).map_err(ApplyError::io(step))?;
    {
        let fs = fat::open(&mut *window).map_err(ApplyError::fat(step))?;
        let mut loader_files = Vec::new();
        for path in LOADER_FILES {
            let bytes = fat::read_file(&fs, path).map_err(ApplyError::fat(step))?;
            let sha256 = hex(&<sha2::Sha256 as sha2::Digest>::digest(&bytes));
            loader_files.push((path.to_string(), bytes.len() as u64, sha256));
        }
        let boot = crate::manifest::BootWritten {
            loader_files,
            record: crate::manifest::BootRecord::of(mbr_code, &sector),
        };
        crate::manifest::record_boot(&fs, &boot).map_err(ApplyError::fat(step))?;
        fs.unmount().map_err(ApplyError::io(step))?;
    }
    window.flush().map_err(ApplyError::io(step))?;
    fat::repair_fatfs_quirks(window).map_err(ApplyError::fat(step))?;
    window.flush().map_err(ApplyError::io(step))
}

/// On an existing stick: MBR boot code into the first 440 bytes, keeping the
/// table, and the mark BIOS boots by on our partition: the boot flag (MBR) or the
/// legacy BIOS bootable attribute (GPT).
fn write_boot_code<D: Read + Write + Seek>(
    file: &mut D,
    code: &[u8; 440],
    plan: &Plan,
) -> io::Result<()> {
    file.seek(SeekFrom::Start(0))?;
    file.write_all(code)?;
    if plan.table == TableKind::Mbr {
        let mut table = [0u8; 64];
        file.seek(SeekFrom::Start(446))?;
        file.read_exact(&mut table)?;
        for i in 0..4 {
            let e = &mut table[i * 16..(i + 1) * 16];
            let lba = u32::from_le_bytes([e[8], e[9], e[10], e[11]]) as u64;
            e[0] = if lba * partition::SECTOR == plan.partition_start {
                0x80
            } else {
                0
            };
        }
        file.seek(SeekFrom::Start(446))?;
        file.write_all(&table)?;
    }
    if plan.table == TableKind::Gpt {
        // gptmbr.bin boots only the partition marked legacy BIOS bootable.
        partition::set_gpt_legacy_bios_bootable(file, plan.partition_start)
            .map_err(|e| io::Error::other(e.to_string()))?;
    }
    file.flush()
}

/// The stick a write without `--format` will change, opened read-only to plan on;
/// `None` when it has no partition table. A volume past its partition is refused here,
/// before the plan, as the maintenance commands refuse it.
fn existing_stick(path: &Path) -> Result<Option<Stick>, ApplyError> {
    let mut stick = match Stick::open(path, false) {
        Ok(stick) => stick,
        Err(StickError::Partition {
            source: PartitionError::NoTable,
            ..
        }) => return Ok(None),
        Err(source) => return Err(ApplyError::Stick(source)),
    };
    stick
        .refuse_a_volume_past_its_partition()
        .map_err(ApplyError::Stick)?;
    Ok(Some(stick))
}

/// Reads what an existing stick's FAT partition holds, for planning without `--format`.
pub fn read_existing(path: &Path) -> Result<Option<crate::plan::ExistingFs>, ApplyError> {
    let Some(mut stick) = existing_stick(path)? else {
        return Ok(None);
    };
    let part = stick.partition.clone();
    let ext4 = existing_ext4(stick.file_mut(), path)?;
    let existing = stick.with_fs(|fs| existing_of(fs, &part, path, ext4))?;
    Ok(Some(existing))
}

/// [`read_existing`] of the stick as a write would find it after repairing the
/// leftovers of a stopped replacement (`replace::repair_leftovers`), with the lines
/// that repair would report; the repair is done in memory only, so a dry run shows
/// the plan the write will make (a leftover that shares a live file's clusters is
/// detached by the repair and frees nothing) and writes nothing.
pub fn read_existing_repaired(
    path: &Path,
    live_dir: &str,
) -> Result<(Option<crate::plan::ExistingFs>, Vec<String>), ApplyError> {
    let Some(mut stick) = existing_stick(path)? else {
        return Ok((None, Vec::new()));
    };
    let part = stick.partition.clone();
    let ext4 = existing_ext4(stick.file_mut(), path)?;
    let mut view = fat_raw::MemoryWrites::new(stick.file_mut());
    let repaired = crate::persist::merge::replace::repair_leftovers(
        &mut view,
        part.start,
        live_dir,
        &mut |_| Ok(()),
    )
    .map_err(|e| ApplyError::Io {
        step: "repairing leftovers of a stopped replacement (in memory)".into(),
        source: io::Error::other(e),
    })?;
    let mut window = PartitionWindow::new(&mut view, part.start, part.len);
    let fat_err = |source| StickError::Fat {
        path: path.to_path_buf(),
        source,
    };
    let fs = fat::open_in_use(&mut window).map_err(fat_err)?;
    Ok((Some(existing_of(&fs, &part, path, ext4)?), repaired))
}

/// The stick's ext4 live partition (the layout for persistence over 4 GiB), if it
/// has one: found by the default live directory, as `inspect` and the
/// maintenance commands find it.
fn existing_ext4(
    file: &mut File,
    path: &Path,
) -> Result<Option<crate::disk::ext4_live::ExistingLive>, ApplyError> {
    use crate::disk::ext4_live;
    let mut live = ext4_live::existing_live(file, "LiveOS")
        .map_err(|e| ApplyError::Ext4Live(ext4_live::Ext4LiveError::Map(e)))?;
    if let Some(l) = live.as_mut().filter(|l| l.needs_recovery) {
        l.replay_hint = Some(ext4_live::replay_hint(path, l.number));
    }
    Ok(live)
}

/// What [`read_existing`] reads, from an opened FAT (and the ext4 live partition's
/// files, listed with the FAT's).
fn existing_of<F: Read + Write + Seek>(
    fs: &fat::FatFs<'_, F>,
    part: &partition::ExistingPartition,
    path: &Path,
    ext4_live: Option<crate::disk::ext4_live::ExistingLive>,
) -> Result<crate::plan::ExistingFs, StickError> {
    let read_text = |path: &str| {
        fat::exists(fs, path)
            .then(|| fat::read_file(fs, path).ok())
            .flatten()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    };
    Ok(crate::plan::ExistingFs {
        syslinux_cfg: read_text("/syslinux/syslinux.cfg"),
        grub_cfg: read_text("/EFI/BOOT/grub.cfg"),
        // Compared by the caller, which knows the source.
        root: None,
        overlay_used: None,
        table: part.table,
        partition_start: part.start,
        partition_len: part.len,
        label: fs.volume_label().trim_end().to_string(),
        volume_id: fs.volume_id(),
        cluster_size: fs.cluster_size() as u64,
        free_bytes: fat::free_bytes(fs).map_err(|source| StickError::Fat {
            path: path.to_path_buf(),
            source,
        })?,
        files: fat::walk_files(fs, "")
            .map_err(|source| StickError::Fat {
                path: path.to_path_buf(),
                source,
            })?
            .into_iter()
            .map(|e| (e.path, e.size))
            .chain(ext4_live.iter().flat_map(|l| l.files.clone()))
            .collect(),
        ext4_live,
    })
}

/// Builds the ext4 live partition of the plan (if any) on the host and maps its
/// files: the copies into it, then overlay, home and swap. A dm-snapshot overlay
/// stays unwritten (the kernel reads zeros: a new store); every other file's
/// extents are marked written, since its bytes are written into them.
fn build_ext4_live(
    plan: &Plan,
    prepared: &Prepared<'_>,
    host_copies: &[HostCopy],
) -> Result<Option<crate::disk::ext4_live::BuiltLive>, ApplyError> {
    use crate::disk::ext4_live::{self, LiveFile};
    let Some(step) = plan.ext4_live.as_ref().filter(|step| !step.in_place) else {
        return Ok(None);
    };
    let mut files: Vec<LiveFile> = host_copies.iter().map(HostCopy::live_file).collect();
    let mut add = |path: &str, size: u64, written: bool| {
        if !files.iter().any(|f| f.path.eq_ignore_ascii_case(path)) {
            files.push(LiveFile {
                path: path.to_string(),
                size,
                written,
                from_host: None,
            });
        }
    };
    for c in &step.copies {
        add(&c.dest, c.size, true);
    }
    if let (Some(o), Some(_)) = (&plan.overlay, &prepared.overlay) {
        add(
            &o.path,
            o.size,
            o.kind != crate::boot::cmdline::OverlayBoot::DmSnapshot,
        );
    }
    if let (Some(h), Some(_)) = (&plan.home, &prepared.home) {
        add(&h.path, h.size, true);
    }
    if let (Some(s), Some(_)) = (&plan.swap, &prepared.swap) {
        add(&s.path, s.size, true);
    }
    let uuid = uuid::Uuid::parse_str(&step.uuid).map_err(|e| ApplyError::Io {
        step: "reading the ext4 partition's UUID from the plan".into(),
        source: io::Error::other(e.to_string()),
    })?;
    Ok(Some(ext4_live::build(
        step.len,
        &step.label,
        uuid,
        &files,
        None,
    )?))
}

/// Writes the ext4 live partition into `part` (a window on partition 2): signature
/// wipes, the file system's metadata, then each file's content straight into its
/// blocks (copies from the source, persistence files by their data regions; an
/// unwritten file not at all). Everything goes through the caller's
/// `WriteRecorder`, so the read-back compares it with what was written.
fn write_ext4_live<F: Read + Write + Seek>(
    part: &mut PartitionWindow<F>,
    built: &mut crate::disk::ext4_live::BuiltLive,
    step: &crate::plan::Ext4LiveStep,
    source: &mut dyn IsoSource,
    persistent: &mut [(String, SparseImage)],
    progress: &Progress,
) -> Result<Vec<WrittenFile>, ApplyError> {
    let spots: RangeSet = wipe::signature_spots(step.len).into_iter().collect();
    zero_ranges(&mut *part, spots.iter()).map_err(ApplyError::io(
        "wiping old signatures on the ext4 partition",
    ))?;
    built.copy_metadata(&mut *part)?;
    let files = built.files.clone();
    write_live_files(part, &files, step, source, persistent, progress)
}

/// Writes each file of the ext4 live partition into its blocks (`files`: its byte
/// runs in `part`): copies from the source (one written under its staged name is
/// found by it), persistence files by their data regions, an unwritten file not
/// at all.
fn write_live_files<F: Read + Write + Seek>(
    part: &mut PartitionWindow<F>,
    files: &[crate::disk::ext4_live::MappedFile],
    step: &crate::plan::Ext4LiveStep,
    source: &mut dyn IsoSource,
    persistent: &mut [(String, SparseImage)],
    progress: &Progress,
) -> Result<Vec<WrittenFile>, ApplyError> {
    use crate::io::StreamHash;
    let mut out = Vec::new();
    for (file, runs) in files {
        // Written by debugfs from its host file, with the partition's metadata.
        if file.from_host.is_some() {
            continue;
        }
        if let Some((_, image)) = persistent
            .iter_mut()
            .find(|(p, _)| p.eq_ignore_ascii_case(&file.path))
        {
            if !file.written {
                // Unwritten extents read as zeros: nothing to write at all.
                out.push(WrittenFile {
                    path: file.path.clone(),
                    size: file.size,
                    written: 0,
                    sha256: hex(&crate::io::Sha256Hash::default().finish()),
                    verified: false,
                });
                continue;
            }
            let mut target_file = ExtentFile::new(&mut *part, runs);
            let (regions, sha256) = write_regions(&mut target_file, image, |n| progress.inc(n))
                .map_err(ApplyError::io(format!("writing {}", file.path)))?;
            out.push(WrittenFile {
                path: file.path.clone(),
                size: file.size,
                written: regions.iter().map(|(r, _)| r.end - r.start).sum(),
                sha256: hex(&sha256),
                verified: false,
            });
            continue;
        }
        let Some(copy) = step.copies.iter().find(|c| {
            c.dest.eq_ignore_ascii_case(&file.path)
                || crate::disk::ext4_live::staged_path(&c.dest).eq_ignore_ascii_case(&file.path)
        }) else {
            continue;
        };
        let reader: Box<dyn Read + '_> = match &copy.source {
            CopySource::Iso { path } => source.open(path, copy.size)?,
            CopySource::Host { path } => Box::new(
                File::open(path).map_err(ApplyError::io(format!("reading {}", path.display())))?,
            ),
        };
        let mut reader = crate::io::Exactly::new(reader, copy.size);
        let mut target_file = ExtentFile::new(&mut *part, runs);
        let mut whole = crate::io::Sha256Hash::default();
        let mut buf = vec![0u8; 4 << 20];
        // To the source's end, which `Exactly` holds to the planned size.
        loop {
            let n = crate::io::read_full(&mut reader, &mut buf).map_err(ApplyError::io(
                format!("reading {} from the source", copy.dest),
            ))?;
            if n == 0 {
                break;
            }
            target_file
                .write_all(&buf[..n])
                .map_err(ApplyError::io(format!("writing {}", copy.dest)))?;
            whole.update(&buf[..n]);
            progress.inc(n as u64);
        }
        target_file
            .flush()
            .map_err(ApplyError::io(format!("writing {}", copy.dest)))?;
        out.push(WrittenFile {
            path: copy.dest.clone(),
            size: copy.size,
            written: copy.size,
            sha256: hex(&whole.finish()),
            verified: false,
        });
    }
    Ok(out)
}

/// The first step of a rewrite in place of an ext4-layout stick (before anything
/// else is written): the root record and what the plan deletes or makes anew are
/// removed from the ext4 partition, a kept overlay renamed if its name changes,
/// and the new files allocated (each copy under its staged name, beside the file
/// it replaces). Returns each allocated file with its byte runs in the partition.
fn allocate_ext4_in_place(
    plan: &Plan,
    step: &crate::plan::Ext4LiveStep,
    prepared: &Prepared<'_>,
    host_copies: &[HostCopy],
    by_fd: &Path,
    file: &mut File,
) -> Result<(Vec<crate::disk::ext4_live::MappedFile>, RangeSet), ApplyError> {
    use crate::disk::ext4_live::{self, LiveFile};
    let mut files: Vec<LiveFile> = Vec::new();
    let mut removes: Vec<String> = step.deletes.clone();
    // The record vouches for the root image: gone before the image changes.
    if let Some(record) = &plan.root_record {
        removes.push(record.path.clone());
    }
    // A copied overlay or home is persistence, made anew under its own name.
    let copied: Vec<LiveFile> = host_copies.iter().map(HostCopy::live_file).collect();
    for c in step
        .copies
        .iter()
        .filter(|c| !copied.iter().any(|f| f.path.eq_ignore_ascii_case(&c.dest)))
    {
        removes.push(ext4_live::staged_path(&c.dest));
        files.push(LiveFile {
            path: ext4_live::staged_path(&c.dest),
            size: c.size,
            written: true,
            from_host: None,
        });
    }
    for f in copied {
        removes.push(f.path.clone());
        files.push(f);
    }
    let mut add = |path: &str, size: u64, written: bool| {
        removes.push(path.to_string());
        files.push(LiveFile {
            path: path.to_string(),
            size,
            written,
            from_host: None,
        });
    };
    if let (Some(o), Some(_)) = (&plan.overlay, &prepared.overlay) {
        add(
            &o.path,
            o.size,
            o.kind != crate::boot::cmdline::OverlayBoot::DmSnapshot,
        );
    }
    if let (Some(h), Some(_)) = (&plan.home, &prepared.home) {
        add(&h.path, h.size, true);
    }
    if let (Some(s), Some(_)) = (&plan.swap, &prepared.swap) {
        add(&s.path, s.size, true);
    }
    removes.dedup();
    let renames: Vec<(String, String)> = plan
        .kept_overlay
        .iter()
        .filter(|k| !k.from.eq_ignore_ascii_case(&k.to))
        .map(|k| (k.from.clone(), k.to.clone()))
        .collect();
    Ok(ext4_live::allocate_in_place(
        by_fd,
        file,
        (step.start, step.len),
        &removes,
        &renames,
        &files,
    )?)
}

/// The ext4 partition's last steps, once what was written into it has been read
/// back: a kept overlay the plan empties is emptied (before the new root image
/// is in place, so a stop never leaves old changes over a new root), the staged
/// copies take their places (in place), and the root record is written beside
/// the root image. Returns the byte ranges written, debugfs's included, for the
/// read-back that follows.
fn finish_ext4_live(
    plan: &Plan,
    step: &crate::plan::Ext4LiveStep,
    by_fd: &Path,
    file: &mut File,
    runs: &[crate::disk::ext4_live::MappedFile],
    written: &[WrittenFile],
) -> Result<RangeSet, ApplyError> {
    use crate::disk::ext4_live;
    // `LIVESTICK_FAILPOINT=ext4-staged`: the state a stop leaves between writing the
    // staged copies and putting them in place, for the tests.
    if step.in_place && std::env::var("LIVESTICK_FAILPOINT").as_deref() == Ok("ext4-staged") {
        return Err(ApplyError::io("putting the new root image in place")(
            io::Error::other("stopped at failpoint `ext4-staged` (LIVESTICK_FAILPOINT)"),
        ));
    }
    let mut wrote = RangeSet::new();
    if step.in_place
        && let Some(kept) = plan.kept_overlay.as_ref().filter(|k| k.reset)
    {
        wrote.extend(&empty_ext4_overlay(plan, step, file, &kept.to)?);
    }
    let root_image = format!("/{}/{}", plan.live_dir, crate::layout::SQUASHFS);
    let record = match (
        &plan.root_record,
        written
            .iter()
            .find(|w| w.path.eq_ignore_ascii_case(&root_image)),
    ) {
        (Some(record), Some(image)) => {
            let what = format!("recording {} in {}", record.root_image, record.path);
            let image_runs: Vec<(u64, u64)> = runs
                .iter()
                .find(|(f, _)| {
                    f.path.eq_ignore_ascii_case(&root_image)
                        || f.path
                            .eq_ignore_ascii_case(&ext4_live::staged_path(&root_image))
                })
                .map(|(_, r)| r.iter().map(|&(at, n)| (step.start + at, n)).collect())
                .unwrap_or_default();
            let ends = crate::source::checksum::ends_sha256(
                &mut ExtentFile::new(&mut *file, &image_runs),
                image.size,
            )
            .map_err(ApplyError::io(what))?;
            Some((
                record.path.clone(),
                crate::live_source::RootRecord {
                    size: image.size,
                    sha256: image.sha256.clone(),
                    ends_sha256: ends,
                    iso_md5: record.iso_md5.clone(),
                }
                .render(),
            ))
        }
        _ => None,
    };
    let placed: Vec<String> = step
        .copies
        .iter()
        .filter(|c| {
            let staged = ext4_live::staged_path(&c.dest);
            step.in_place
                && runs
                    .iter()
                    .any(|(f, _)| f.path.eq_ignore_ascii_case(&staged))
        })
        .map(|c| c.dest.clone())
        .collect();
    wrote.extend(&ext4_live::finish_in_place(
        by_fd,
        file,
        (step.start, step.len),
        &placed,
        record.as_ref().map(|(p, t)| (p.as_str(), t.as_str())),
    )?);
    Ok(wrote)
}

/// Empties the overlay `path` of the ext4 partition in place, through its extents
/// (returns the byte ranges written):
/// a dm-snapshot store by its zeroed header (zeros into unwritten extents are
/// skipped), an OverlayFS overlay by a fresh ext4 written over it.
fn empty_ext4_overlay(
    plan: &Plan,
    step: &crate::plan::Ext4LiveStep,
    file: &mut File,
    path: &str,
) -> Result<RangeSet, ApplyError> {
    use crate::disk::ext4_fs;
    use crate::io::SyncData;
    let what = format!("emptying the overlay {path}");
    let err = |e: String| ApplyError::io(what.clone())(io::Error::other(e));
    let partition = ext4_fs::find_live_partition(&mut *file, &plan.live_dir)
        .map_err(|e| err(e.to_string()))?
        .filter(|p| p.start == step.start)
        .ok_or_else(|| err("the ext4 live partition is gone".into()))?;
    let map = {
        let mut window = PartitionWindow::new(&mut *file, partition.start, partition.len);
        partition
            .fs
            .file(&mut window, path)
            .map_err(|e| err(e.to_string()))?
            .ok_or_else(|| err("it is not on the ext4 partition".into()))?
    };
    let len = map.size;
    let mut recorder = WriteRecorder::new(&mut *file).map_err(ApplyError::io(what.clone()))?;
    let mut rw = ext4_fs::Ext4FileRw::new(&mut recorder, &partition, &map);
    // Emptied into the kind the menus now name (a flat root needs OverlayFS, a
    // nested one dm-snapshot), whatever kind the old ISO's overlay was.
    if step.overlay_kind == crate::boot::cmdline::OverlayBoot::OverlayFs {
        crate::persist::overlay::store::reset_overlay(&mut rw, len, &std::env::temp_dir())
            .map_err(|e| err(e.to_string()))?;
    } else {
        crate::persist::snapshot::reset_store(&mut rw, len).map_err(|e| err(e.to_string()))?;
    }
    rw.sync_data().map_err(ApplyError::io(what.clone()))?;
    drop(rw);
    Ok(recorder.into_written())
}

/// Writes the manifest on the FAT of an ext4-layout stick once both partitions
/// are written: the FAT's files and the ext4 partition's copies, each with the
/// sha256 hashed while writing. Returns the byte ranges written, for the read-back.
fn write_manifest_ext4(
    plan: &Plan,
    step: &crate::plan::Ext4LiveStep,
    file: &mut File,
    written: &[(String, u64, WrittenDigest)],
    ext4_written: &[WrittenFile],
    boot: Option<&crate::manifest::BootWritten>,
) -> Result<RangeSet, ApplyError> {
    let step_name = "writing the stick manifest";
    let copies: Vec<(String, u64, String)> = ext4_written
        .iter()
        .filter(|w| {
            step.copies
                .iter()
                .any(|c| c.dest.eq_ignore_ascii_case(&w.path))
        })
        .map(|w| (w.path.clone(), w.size, w.sha256.clone()))
        .collect();
    let now: Vec<(String, u64)> = crate::disk::ext4_live::existing_live(&mut *file, &plan.live_dir)
        .map_err(|e| ApplyError::io(step_name)(io::Error::other(e.to_string())))?
        .map(|l| l.files)
        .unwrap_or_default();
    let mut recorder = WriteRecorder::new(&mut *file).map_err(ApplyError::io(step_name))?;
    {
        let mut window =
            PartitionWindow::new(&mut recorder, plan.partition_start, plan.partition_len);
        {
            let fs = fat::open(&mut window).map_err(ApplyError::fat(step_name))?;
            crate::manifest::write_after_apply_with_ext4(
                &fs,
                plan,
                written
                    .iter()
                    .map(|(path, size, sum)| (path.as_str(), *size, hex(&sum.sha256))),
                &copies,
                &now,
                boot,
            )
            .map_err(ApplyError::fat(step_name))?;
            fs.unmount().map_err(ApplyError::io(step_name))?;
        }
        window.flush().map_err(ApplyError::io(step_name))?;
        fat::repair_fatfs_quirks(&mut window).map_err(ApplyError::fat(step_name))?;
        window.flush().map_err(ApplyError::io(step_name))?;
    }
    let ranges = recorder.into_written();
    file.sync_all().map_err(ApplyError::io(step_name))?;
    Ok(ranges)
}

/// A copied overlay or home made a sparse host file: only its used parts (whole
/// blocks of the source) hold data; the rest are holes.
struct HostCopy {
    dest: String,
    size: u64,
    file: tempfile::NamedTempFile,
    /// Bytes of data it holds, and their sha256 in order (as `write_regions` hashes).
    written: u64,
    sha256: String,
}

impl HostCopy {
    fn live_file(&self) -> crate::disk::ext4_live::LiveFile {
        crate::disk::ext4_live::LiveFile {
            path: self.dest.clone(),
            size: self.size,
            written: false,
            from_host: Some(self.file.path().to_path_buf()),
        }
    }

    fn report(&self) -> WrittenFile {
        WrittenFile {
            path: self.dest.clone(),
            size: self.size,
            written: self.written,
            sha256: self.sha256.clone(),
            verified: false,
        }
    }
}

/// Takes the copied overlay and home out of `prepared` as sparse host files.
fn materialise_copied(prepared: &mut Prepared<'_>) -> Result<Vec<HostCopy>, ApplyError> {
    use crate::io::StreamHash;
    let block = crate::disk::ext4_live::BLOCK;
    let mut out = Vec::new();
    for (dest, mut image) in std::mem::take(&mut prepared.copied) {
        let what = format!("copying {dest} from the source stick");
        let mut file = tempfile::NamedTempFile::new().map_err(ApplyError::io(what.clone()))?;
        file.as_file()
            .set_len(image.len)
            .map_err(ApplyError::io(what.clone()))?;
        let mut whole = crate::io::Sha256Hash::default();
        let mut written = 0u64;
        let mut buf = vec![0u8; 4 << 20];
        // Whole blocks: a block of the partition holds the source's bytes or none.
        let regions: RangeSet = image
            .regions
            .iter()
            .map(|r| r.start / block * block..(r.end.div_ceil(block) * block).min(image.len))
            .collect();
        for r in regions.iter() {
            image
                .content
                .seek(SeekFrom::Start(r.start))
                .map_err(ApplyError::io(what.clone()))?;
            file.as_file_mut()
                .seek(SeekFrom::Start(r.start))
                .map_err(ApplyError::io(what.clone()))?;
            let mut left = r.end - r.start;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                image
                    .content
                    .read_exact(&mut buf[..n])
                    .map_err(ApplyError::io(what.clone()))?;
                file.as_file_mut()
                    .write_all(&buf[..n])
                    .map_err(ApplyError::io(what.clone()))?;
                whole.update(&buf[..n]);
                written += n as u64;
                left -= n as u64;
            }
        }
        file.as_file_mut()
            .flush()
            .map_err(ApplyError::io(what.clone()))?;
        out.push(HostCopy {
            dest,
            size: image.len,
            file,
            written,
            sha256: hex(&whole.finish()),
        });
    }
    Ok(out)
}
