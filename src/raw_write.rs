//! `livestick write IMAGE TARGET…` for a raw disk image (or any ISO with
//! `--dd`): the image written as it is, with no persistence.
//!
//! The same stages as a live write: [`detect`] and [`RawSource::open`] inspect
//! the source (compression, size, a `.bmap` beside it), [`plan_raw`] checks the
//! target and decides, pure apart from the probe it is given, and
//! [`write_target`] applies: the image's first MiB (partition table and boot
//! code) is zeroed first and written last, after the rest was streamed,
//! checked against the block map and read back. A stream that fails, or a map
//! that does not match, therefore leaves a stick with no partition table: it
//! boots nothing and shows no half-written partitions. A batch reads the image
//! once and fans the chunks out to every target (`batch::broadcast`).

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::apply::{ApplyError, IsoSource};
use crate::disk::stick;
use crate::disk::target::{self, TargetError, TargetKind, TargetProbe};
use crate::error::{Classify, ErrorKind};
use crate::io::{BoundedDirty, CheckHash, RangeSet, StreamHash};
use crate::progress::Progress;
use crate::size::{MIB, human};
use crate::source::bmap::{self, Bmap, BmapError, StreamCheck};
use crate::source::compressed::StatedSize;
use crate::source::live;
use crate::source::raw::{self, Content, RawError, RawImage};

pub mod run;

/// The part of the image written last: partition table (MBR and the primary
/// GPT with its entries), boot code, and on most images the boot loader's
/// first stage. Nothing on the target that boots or names a partition
/// survives zeroing it.
pub const HEAD: u64 = MIB;
/// Zeroed at the end of a target larger than the image: a stale backup GPT
/// or an md superblock there would describe partitions that are gone.
pub const TAIL: u64 = 2 * MIB;
/// Syncs every this many bytes on a block device (as `apply` does).
const DIRTY_LIMIT: u64 = 8 << 20;
const CHUNK: usize = 4 << 20;

/// Why a source is written raw, for the plan.
const NO_PERSISTENCE: &str = "a raw disk image is written as it is: its partition table, boot loader and kernel command line are its own, so livestick cannot add an overlay, home.img or swap to it";

#[derive(Debug, Error)]
pub enum RawWriteError {
    #[error(transparent)]
    Source(#[from] RawError),
    #[error("reading the block map {}: {source}", .path.display())]
    BmapRead {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the block map {} cannot be used: {source}; fix or remove it, or give another with --bmap", .path.display())]
    BmapMalformed {
        path: PathBuf,
        #[source]
        source: Box<BmapError>,
    },
    #[error("the image {} does not match its block map {}: {source}; nothing bootable was written — use the map made for this image, or remove it", .image.display(), .bmap.display())]
    BmapMismatch {
        image: PathBuf,
        bmap: PathBuf,
        #[source]
        source: Box<BmapError>,
    },
    #[error(
        "the image {} is {}{} ({} bytes) but {} holds only {} ({} bytes); use a larger stick",
        .image.display(), if *.exact { "" } else { "at least " }, human(*.image_size), .image_size,
        .target.display(), human(*.target_size), .target_size
    )]
    TooSmall {
        image: PathBuf,
        target: PathBuf,
        image_size: u64,
        exact: bool,
        target_size: u64,
    },
    #[error("{option} is for live ISOs: {why}; drop {option} to write the image {} as it is", .image.display())]
    PersistenceRefused {
        option: String,
        why: &'static str,
        image: PathBuf,
    },
    #[error("--bmap {}: the source {} is no partitioned disk image, which is what a block map goes with (a live ISO is written file by file); add --dd to write it byte for byte with that map", .bmap.display(), .image.display())]
    BmapForLiveIso { bmap: PathBuf, image: PathBuf },
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error("writing {} failed at byte {at}: {source}", .target.display())]
    Write {
        target: PathBuf,
        at: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "reading back {} from {} found different bytes than were written (in {what}); the stick or its connection is faulty — the partition table was not written, so it boots nothing",
        human(*.bytes), .target.display()
    )]
    ReadBack {
        target: PathBuf,
        what: &'static str,
        bytes: u64,
    },
    #[error("{0}")]
    Stream(String),
    /// Bad input found while the image streamed: by then the target's first MiB
    /// was zeroed and part of the image written, so unlike other bad input it did
    /// not leave the target as it was.
    #[error(
        "{why}; {} was already being written: its first MiB is zeroed, so it boots nothing until it is written again", .target.display()
    )]
    StoppedMidWrite {
        target: PathBuf,
        // Not a `source`: its words are in this message already.
        why: Box<RawWriteError>,
    },
}

impl Classify for RawWriteError {
    fn kind(&self) -> ErrorKind {
        match self {
            RawWriteError::Source(e) => e.kind(),
            RawWriteError::Target(e) => e.kind(),
            RawWriteError::BmapRead { source, .. } => crate::error::open_failure_kind(source),
            RawWriteError::BmapMalformed { .. }
            | RawWriteError::BmapMismatch { .. }
            | RawWriteError::TooSmall { .. }
            | RawWriteError::PersistenceRefused { .. }
            | RawWriteError::BmapForLiveIso { .. } => ErrorKind::BadInput,
            // Still the input's fault (exit 2), though the target was changed:
            // the message and hint say so.
            RawWriteError::StoppedMidWrite { why, .. } => why.kind(),
            RawWriteError::Write { .. }
            | RawWriteError::ReadBack { .. }
            | RawWriteError::Stream(_) => ErrorKind::Io,
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            RawWriteError::Source(e) => e.hint(),
            RawWriteError::Target(e) => e.hint(),
            RawWriteError::StoppedMidWrite { .. } => {
                "the target was changed and boots nothing; fix what the message names (the image, its block map, or a larger stick), then write it again"
            }
            _ => self.kind().hint(),
        }
    }
}

/// A source to write raw, inspected.
#[derive(Debug, Clone)]
pub struct RawSource {
    pub image: RawImage,
    /// Why it is written raw (for the plan).
    pub why: String,
    pub bmap: Option<(PathBuf, Bmap)>,
    /// `--noverify`: the block map's checksums are not checked (see
    /// [`RawSource::skip_range_checksums`]).
    pub range_checksums_skipped: bool,
}

/// How far the image's start is read to tell what it is: past the ISO 9660
/// primary volume descriptor.
const SNIFF: usize = 64 * 1024;

/// Whether `path` is to be written raw: always with `dd`; otherwise when its
/// content is a partitioned disk image that is not a live stick, or a hybrid
/// ISO (one with a partition table) without `LiveOS/squashfs.img`. `None` means the live path
/// (which reports a source that is neither with its own words). A compressed
/// ISO always takes the live path, which unpacks it (`source::compressed`).
pub fn detect(path: &Path, dd: bool) -> Result<Option<String>, RawWriteError> {
    if dd {
        return Ok(Some(
            "--dd: the image is written byte for byte, as dd would".into(),
        ));
    }
    let Ok(image) = RawImage::open(path) else {
        return Ok(None);
    };
    let Ok(head) = image.head(SNIFF) else {
        return Ok(None);
    };
    Ok(match raw::content_of(&head) {
        // Without a partition table an ISO cannot boot from a stick; the live
        // path says why it cannot be made into a live stick either.
        Content::Iso { .. } if image.compression.is_some() => None,
        Content::Iso { hybrid: false } => None,
        Content::Iso { hybrid: true } => {
            // Only an ISO that reads well and plainly has no live system: a
            // damaged or truncated live ISO must be reported as such (live path).
            let not_live = live::open_iso(path).is_ok_and(|mut iso| {
                iso.volume_size() <= image.file_len
                    && matches!(iso.lookup("/LiveOS/squashfs.img"), Ok(None))
            });
            not_live.then(|| {
                "a hybrid ISO with no LiveOS/squashfs.img (an installer, not a live ISO): written as it is"
                    .to_string()
            })
        }
        Content::Disk { .. } if image.compression.is_none() && is_live_stick(path) => None,
        Content::Disk { gpt } => Some(format!(
            "a disk image with {} partition table, not a live ISO: written as it is",
            if gpt { "a GPT" } else { "an MBR" }
        )),
        Content::Unknown => None,
    })
}

/// A live stick used as a source (livecd-iso-to-disk's "live device"): a FAT
/// with `LiveOS/squashfs.img`. A disk image with an EFI FAT partition and no
/// live system is not one.
fn is_live_stick(path: &Path) -> bool {
    // Only a FAT that reads well and plainly holds no live system makes a disk
    // image: a damaged stick must be reported as such (live path), as a damaged
    // live ISO is.
    stick::looks_like_stick(path)
        && stick::Stick::open(path, false)
            .and_then(|mut s| s.info("LiveOS"))
            .map_or(true, |info| info.squashfs.is_some())
}

/// A stick of the ext4 live layout (a FAT boot partition, `LiveOS/` on an ext4
/// partition): `inspect` describes it as a live stick, not as a disk image.
pub fn is_ext4_live_stick(path: &Path) -> bool {
    crate::disk::opened::open_path(path, false).is_ok_and(|mut f| {
        matches!(
            crate::disk::ext4_fs::find_live_partition(&mut f, "LiveOS"),
            Ok(Some(_))
        )
    })
}

/// Where bmaptool's convention puts a map: `IMAGE.bmap`, or the image's name
/// without its compression suffix plus `.bmap` (`disk.raw.xz` → `disk.raw.bmap`).
pub fn bmap_beside(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_string_lossy().into_owned();
    let mut candidates = vec![path.with_file_name(format!("{name}.bmap"))];
    for suffix in [".xz", ".zst", ".gz", ".bz2"] {
        if let Some(stem) = name.strip_suffix(suffix) {
            candidates.push(path.with_file_name(format!("{stem}.bmap")));
        }
    }
    candidates.into_iter().find(|c| c.is_file())
}

impl RawSource {
    /// Inspects the image and its block map (`bmap`, else with `look_beside` one
    /// beside it), and checks that they agree as far as can be told before streaming.
    pub fn open(
        path: &Path,
        why: String,
        bmap: Option<&Path>,
        look_beside: bool,
    ) -> Result<RawSource, RawWriteError> {
        let image = RawImage::open(path)?;
        let bmap_path = bmap
            .map(Path::to_path_buf)
            .or_else(|| look_beside.then(|| bmap_beside(path)).flatten());
        let bmap = match bmap_path {
            None => None,
            Some(p) => {
                let text =
                    std::fs::read_to_string(&p).map_err(|source| RawWriteError::BmapRead {
                        path: p.clone(),
                        source,
                    })?;
                let map = bmap::parse(&text).map_err(|source| RawWriteError::BmapMalformed {
                    path: p.clone(),
                    source: Box::new(source),
                })?;
                let stated = match image.size {
                    StatedSize::Exact(n) => Some((n, true)),
                    StatedSize::AtLeast(n) => Some((n, false)),
                    StatedSize::Unknown => None,
                };
                match stated {
                    Some((n, true)) if n != map.image_size => {
                        return Err(RawWriteError::BmapMismatch {
                            image: path.to_path_buf(),
                            bmap: p,
                            source: Box::new(BmapError::SizeMismatch {
                                stated: map.image_size,
                                actual: n,
                            }),
                        });
                    }
                    Some((n, false)) if n > map.image_size => {
                        return Err(RawWriteError::BmapMismatch {
                            image: path.to_path_buf(),
                            bmap: p,
                            source: Box::new(BmapError::SizeMismatch {
                                stated: map.image_size,
                                actual: n,
                            }),
                        });
                    }
                    _ => {}
                }
                Some((p, map))
            }
        };
        Ok(RawSource {
            image,
            why,
            bmap,
            range_checksums_skipped: false,
        })
    }

    /// `--noverify` for a raw image: what it skips for a live ISO is the image's
    /// check of itself (the implanted MD5); a raw image's own check is its block
    /// map's per-range checksums, so those are not checked. The map still decides
    /// what is written and the stream must still be the size it states; a published
    /// CHECKSUM is still checked, and the read-back is `--no-verify-write`'s.
    pub fn skip_range_checksums(&mut self) {
        if let Some((_, map)) = &mut self.bmap {
            for range in &mut map.ranges {
                range.checksum = None;
            }
        }
        self.range_checksums_skipped = true;
    }

    /// The image size as known before streaming, and whether exactly.
    pub fn known_size(&self) -> (u64, bool) {
        match (&self.bmap, self.image.size) {
            (Some((_, map)), _) => (map.image_size, true),
            (None, StatedSize::Exact(n)) => (n, true),
            (None, StatedSize::AtLeast(n)) => (n, false),
            (None, StatedSize::Unknown) => (0, false),
        }
    }

    /// The image, decompressed, with the block map checked as it passes and
    /// the image's sha256 computed once for every target.
    pub fn stream(&self) -> Result<CheckedStream, RawWriteError> {
        Ok(CheckedStream {
            inner: self.image.stream()?,
            check: self
                .bmap
                .as_ref()
                .map(|(p, m)| (p.clone(), StreamCheck::new(m.clone()))),
            exact: self.image.exact_size(),
            image: self.image.path.clone(),
            hasher: Some(Sha256::new()),
            at: 0,
            digest: Arc::new(Mutex::new(None)),
            failure: Arc::new(Mutex::new(None)),
        })
    }
}

/// The image stream, checked: block-map checksums as each range passes, the
/// size at the end (against the map and the size the file states). An error
/// reaches the reader as an `io::Error` carrying a [`RawWriteError`] (or a
/// [`RawError`]), before the read that would end the stream: a target never
/// sees the end of an image that failed a check.
pub struct CheckedStream {
    inner: raw::RawStream,
    check: Option<(PathBuf, StreamCheck)>,
    exact: Option<u64>,
    image: PathBuf,
    hasher: Option<Sha256>,
    at: u64,
    digest: Arc<Mutex<Option<String>>>,
    failure: Arc<Mutex<Option<StreamFailure>>>,
}

/// Why the stream stopped, kept for a batch: its broadcaster hands errors to
/// the targets as text, and the kind (a bad image is bad input) would be lost.
#[derive(Debug, Clone)]
pub struct StreamFailure {
    pub message: String,
    pub kind: ErrorKind,
}

impl StreamFailure {
    fn of(e: &io::Error) -> StreamFailure {
        let inner = e.get_ref();
        if let Some(raw) = inner.and_then(|i| i.downcast_ref::<RawError>()) {
            StreamFailure {
                message: raw.to_string(),
                kind: raw.kind(),
            }
        } else if let Some(typed) = inner.and_then(|i| i.downcast_ref::<RawWriteError>()) {
            StreamFailure {
                message: typed.to_string(),
                kind: typed.kind(),
            }
        } else {
            StreamFailure {
                message: e.to_string(),
                kind: ErrorKind::Io,
            }
        }
    }
}

impl CheckedStream {
    /// Where the image's sha256 appears once the stream has ended well.
    pub fn digest(&self) -> Arc<Mutex<Option<String>>> {
        Arc::clone(&self.digest)
    }

    /// Where the stream leaves why it failed, if it does.
    pub fn failure(&self) -> Arc<Mutex<Option<StreamFailure>>> {
        Arc::clone(&self.failure)
    }

    fn mismatch(&self, bmap: &Path, source: BmapError) -> io::Error {
        io::Error::other(RawWriteError::BmapMismatch {
            image: self.image.clone(),
            bmap: bmap.to_path_buf(),
            source: Box::new(source),
        })
    }
}

impl Read for CheckedStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let result = self.read_checked(buf);
        if let Err(e) = &result
            && let Ok(mut slot) = self.failure.lock()
            && slot.is_none()
        {
            *slot = Some(StreamFailure::of(e));
        }
        result
    }
}

impl CheckedStream {
    fn read_checked(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 {
            if let Some((path, check)) = &self.check
                && let Err(e) = check.finish()
            {
                return Err(self.mismatch(path, e));
            }
            if let Some(size) = self.exact
                && size != self.at
            {
                return Err(io::Error::other(RawWriteError::Stream(format!(
                    "the image {} gave {} bytes, not the {size} its file states",
                    self.image.display(),
                    self.at
                ))));
            }
            if let Some(h) = self.hasher.take()
                && let Ok(mut slot) = self.digest.lock()
            {
                *slot = Some(crate::source::checksum::hex(&h.finalize()));
            }
            return Ok(0);
        }
        self.at += n as u64;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        if let Some((path, check)) = &mut self.check {
            let fed = check.feed(&buf[..n]);
            let past = check.past_end();
            let path = path.clone();
            if let Err(e) = fed {
                return Err(self.mismatch(&path, e));
            }
            if past {
                return Err(self.mismatch(
                    &path,
                    BmapError::SizeMismatch {
                        stated: self
                            .check
                            .as_ref()
                            .map(|(_, c)| c.image_size())
                            .unwrap_or(0),
                        actual: self.at,
                    },
                ));
            }
        }
        Ok(n)
    }
}

/// The stream as the batch broadcaster wants it: one "file", the image.
pub struct StreamSource(pub Option<CheckedStream>);

impl IsoSource for StreamSource {
    fn open(&mut self, path: &str, _size: u64) -> Result<Box<dyn Read + '_>, ApplyError> {
        match self.0.take() {
            Some(stream) => Ok(Box::new(stream)),
            None => Err(ApplyError::Source {
                path: path.to_string(),
                reason: "the image stream was already read".into(),
            }),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BmapSummary {
    pub path: PathBuf,
    pub version: String,
    #[serde(rename = "block_size_bytes")]
    pub block_size: u64,
    pub mapped_bytes: u64,
    pub ranges: usize,
    pub checksum: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct RawTarget {
    pub path: PathBuf,
    pub kind: TargetKind,
    pub exists: bool,
    #[serde(rename = "size_before_bytes")]
    pub size_before: u64,
    #[serde(rename = "size_bytes")]
    pub size: u64,
}

/// Everything a raw write will do (`--dry-run` prints it).
#[derive(Debug, Clone, Serialize)]
pub struct RawPlan {
    /// The path the user gave.
    pub source: PathBuf,
    /// Always "raw-image": what a script tells a raw plan from a live one by.
    pub kind: &'static str,
    pub why: String,
    pub compression: Option<String>,
    /// The image size, as far as known before streaming.
    #[serde(rename = "image_size_bytes")]
    pub image_size: u64,
    pub image_size_exact: bool,
    pub bmap: Option<BmapSummary>,
    pub target: RawTarget,
    #[serde(rename = "to_write_bytes")]
    pub bytes_to_write: u64,
    pub persistence: String,
    pub notes: Vec<String>,
    /// The block map's byte ranges; `None` writes every byte.
    #[serde(skip)]
    pub mapped: Option<Vec<Range<u64>>>,
}

/// Checks a target for a raw write and decides what is written.
pub fn plan_raw(
    source: &RawSource,
    display: &Path,
    probe: &TargetProbe,
    requested: Option<u64>,
    force: bool,
) -> Result<RawPlan, RawWriteError> {
    target::check_safe(probe, force)?;
    let (image_size, exact) = source.known_size();
    let target_size = match target::planned_size(probe, requested) {
        Ok(size) => size,
        Err(TargetError::NeedSize(_)) => image_size,
        Err(e) => return Err(e.into()),
    };
    let too_small = |target_size| RawWriteError::TooSmall {
        image: display.to_path_buf(),
        target: probe.path.clone(),
        image_size,
        exact,
        target_size,
    };
    match probe.kind {
        TargetKind::BlockDevice if image_size > target_size => return Err(too_small(target_size)),
        TargetKind::ImageFile if requested.is_some_and(|r| r < image_size) => {
            return Err(too_small(target_size));
        }
        _ => {}
    }
    // An image file is at least as large as the image; never shrunk.
    let target_size = match probe.kind {
        TargetKind::ImageFile => target_size.max(image_size),
        TargetKind::BlockDevice => target_size,
    };
    let bmap = source.bmap.as_ref().map(|(path, map)| BmapSummary {
        path: path.clone(),
        version: map.version.clone(),
        block_size: map.block_size,
        mapped_bytes: map.mapped_bytes(),
        ranges: map.ranges.len(),
        checksum: map.checksum_name(),
    });
    let mut notes = Vec::new();
    if !exact {
        notes.push(format!(
            "the {} stream does not state its unpacked size{}: a target too small for it is found while writing, before its partition table is written",
            source
                .image
                .compression
                .map(|f| f.name())
                .unwrap_or("image"),
            if image_size > 0 {
                format!(" exactly (at least {})", human(image_size))
            } else {
                String::new()
            }
        ));
    }
    match &bmap {
        Some(b) => notes.push(format!(
            "block map {}: only its {} mapped ranges ({}) are written, {}; the unmapped blocks keep the target's old bytes, as bmaptool leaves them (the image's file systems do not use them)",
            b.path.display(),
            b.ranges,
            human(b.mapped_bytes),
            if source.range_checksums_skipped {
                format!("NOT checked against their {} checksums (--noverify)", b.checksum)
            } else {
                format!("each checked against its {} while streaming", b.checksum)
            }
        )),
        None => notes.push(
            "no block map: every byte of the image is written, holes as zeros (a target is never blank, so what a hole means must be written)".into(),
        ),
    }
    if source.range_checksums_skipped && bmap.is_none() {
        notes.push(
            "--noverify skips a raw image's own checksums, those of its block map, and this image has none: nothing was skipped (a published CHECKSUM is still checked; --no-verify-write skips the read-back)".into(),
        );
    }
    notes.push(format!(
        "the first {} (partition table, boot code) is zeroed first and written last, after the rest is written and read back, so a failed write leaves nothing bootable",
        human(HEAD.min(image_size.max(HEAD)))
    ));
    if target_size > image_size && image_size > 0 {
        notes.push(format!(
            "{} past the image stay as they were, but the last {} of the target are zeroed (no stale backup GPT or RAID superblock)",
            human(target_size - image_size),
            human(TAIL.min(target_size - image_size))
        ));
    }
    if probe.kind == TargetKind::ImageFile && !probe.exists {
        notes.push(format!("creates the image file ({})", human(target_size)));
    }
    let bytes_to_write = bmap.as_ref().map(|b| b.mapped_bytes).unwrap_or(image_size);
    Ok(RawPlan {
        source: display.to_path_buf(),
        kind: "raw-image",
        why: source.why.clone(),
        compression: source.image.describe_compression(),
        image_size,
        image_size_exact: exact,
        bmap,
        target: RawTarget {
            path: probe.path.clone(),
            kind: probe.kind,
            exists: probe.exists,
            size_before: probe.size,
            size: target_size,
        },
        bytes_to_write,
        persistence: format!("none: {NO_PERSISTENCE}"),
        notes,
        mapped: source.bmap.as_ref().map(|(_, m)| m.byte_ranges()),
    })
}

/// The refusal for a persistence or live-layout option given with a raw image.
pub fn refuse_option(option: &str, image: &Path) -> RawWriteError {
    RawWriteError::PersistenceRefused {
        option: option.to_string(),
        why: NO_PERSISTENCE,
        image: image.to_path_buf(),
    }
}

impl RawPlan {
    /// The plan as people read it.
    pub fn to_table(&self) -> String {
        let mut out = format!(
            "Plan: {} -> {} ({:?}, {})\n  source          raw image, {}{}\n  image size      {}{}\n  writes          {}\n  persistence     {}\n",
            self.source.display(),
            self.target.path.display(),
            self.target.kind,
            human(self.target.size),
            self.why,
            self.compression
                .as_ref()
                .map(|c| format!(" ({c})"))
                .unwrap_or_default(),
            if self.image_size_exact {
                ""
            } else {
                "at least "
            },
            human(self.image_size),
            human(self.bytes_to_write),
            self.persistence,
        );
        for note in &self.notes {
            out.push_str(&format!("  note: {note}\n"));
        }
        out
    }
}

/// What a raw write did.
#[derive(Debug, Clone, Serialize)]
pub struct RawReport {
    pub source: PathBuf,
    pub kind: &'static str,
    pub target: PathBuf,
    #[serde(rename = "image_size_bytes")]
    pub image_size: u64,
    pub image_sha256: Option<String>,
    pub bmap: Option<PathBuf>,
    /// Distinct bytes written: the image's (its mapped ranges with a block
    /// map, and its first MiB) and the zeroed end of a larger target.
    #[serde(rename = "written_bytes")]
    pub bytes_written: u64,
    /// Of those, read back from the target and compared: all of them unless
    /// `--no-verify-write`.
    #[serde(rename = "verified_bytes")]
    pub bytes_verified: u64,
    /// Of the bytes written, the zeros at the end of a target larger than the image.
    #[serde(rename = "zeroed_bytes")]
    pub bytes_zeroed: u64,
    pub verified: bool,
}

/// The version of the raw plan's and raw report's JSON shapes (docs/json.md,
/// schemas/raw-write-plan.schema.json, schemas/raw-write-report.schema.json).
pub const RAW_SCHEMA: u32 = 1;

/// `value` (a raw plan or report) as `write --json` prints it: with its `schema`.
pub fn with_schema<T: Serialize>(value: &T) -> Result<serde_json::Value, serde_json::Error> {
    let mut value = serde_json::to_value(value)?;
    if let Some(object) = value.as_object_mut() {
        object.insert("schema".into(), RAW_SCHEMA.into());
    }
    Ok(value)
}

/// Writes the image from `stream` to one target, as [`plan_raw`] decided.
/// `digest` is where the stream leaves the image's sha256 (shared in a batch).
pub fn write_target(
    plan: &RawPlan,
    probe: &TargetProbe,
    stream: &mut dyn Read,
    digest: &Arc<Mutex<Option<String>>>,
    verify: bool,
    progress: &Progress,
) -> Result<RawReport, RawWriteError> {
    let created = target::CreatedImage::create(probe)?;
    let opened = match &created {
        Some(image) => image.probe(probe),
        None => probe.clone(),
    };
    let result = write_opened(plan, &opened, stream, digest, verify, progress);
    match (result, created) {
        // A new image file that a failed write leaves boots nothing: it goes, and
        // the target is as it was (not there).
        (Err(e), Some(image)) => {
            let _ = image.remove();
            Err(e)
        }
        // Bad input seen once the stream had begun, on a target that existed:
        // that target is changed now, which its message must say.
        (Err(e), None)
            if e.kind() == ErrorKind::BadInput && !matches!(e, RawWriteError::Target(_)) =>
        {
            Err(RawWriteError::StoppedMidWrite {
                target: probe.path.clone(),
                why: Box::new(e),
            })
        }
        (result, _) => result,
    }
}

fn write_opened(
    plan: &RawPlan,
    probe: &TargetProbe,
    stream: &mut dyn Read,
    digest: &Arc<Mutex<Option<String>>>,
    verify: bool,
    progress: &Progress,
) -> Result<RawReport, RawWriteError> {
    let path = &probe.path;
    let mut file = target::open_for_write(probe, plan.target.size)?;
    let size = plan.target.size;
    let write_err = |at: u64| {
        move |source: io::Error| RawWriteError::Write {
            target: path.clone(),
            at,
            source,
        }
    };
    // The old partition table and boot code go first, synced: from here on an
    // interrupted write leaves a target that boots nothing.
    let head_len = HEAD.min(size);
    file.seek(SeekFrom::Start(0)).map_err(write_err(0))?;
    file.write_all(&vec![0u8; head_len as usize])
        .map_err(write_err(0))?;
    file.sync_data().map_err(write_err(0))?;

    let ranges = MappedRanges(plan.mapped.clone());
    let limit = if probe.kind == TargetKind::BlockDevice {
        DIRTY_LIMIT
    } else {
        0
    };
    let mut head = Vec::with_capacity(HEAD as usize);
    let mut written = RangeSet::new();
    let mut check = CheckHash::default();
    let mut pos = 0u64;
    progress.phase("write", plan.bytes_to_write.max(plan.image_size));
    {
        let mut out = BoundedDirty::new(&mut file, limit);
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(stream_error(e)),
            };
            let chunk = &buf[..n];
            let chunk_range = pos..pos + n as u64;
            if probe.kind == TargetKind::BlockDevice && chunk_range.end > size {
                return Err(RawWriteError::TooSmall {
                    image: plan.source.clone(),
                    target: path.clone(),
                    image_size: chunk_range.end,
                    exact: false,
                    target_size: size,
                });
            }
            if chunk_range.start < HEAD {
                let end = chunk_range.end.min(HEAD);
                head.extend_from_slice(&chunk[..(end - pos) as usize]);
            }
            for r in ranges.within(chunk_range.start.max(HEAD)..chunk_range.end) {
                let bytes = &chunk[(r.start - pos) as usize..(r.end - pos) as usize];
                out.seek(SeekFrom::Start(r.start))
                    .map_err(write_err(r.start))?;
                out.write_all(bytes).map_err(write_err(r.start))?;
                check.update(bytes);
                written.insert(r);
            }
            progress.inc(n as u64);
            pos = chunk_range.end;
        }
        out.flush().map_err(write_err(pos))?;
    }
    let image_size = pos;
    // What lies past the image on a larger target is not the image's: its end
    // is zeroed so no stale backup GPT or RAID superblock describes it.
    let tail = if size > image_size {
        size.saturating_sub(TAIL).max(image_size)..size
    } else {
        size..size
    };
    if !tail.is_empty() {
        crate::io::zero_ranges(&mut file, std::iter::once(tail.clone()))
            .map_err(write_err(tail.start))?;
    }
    target::sync_and_drop_cache(&file, probe.kind).map_err(write_err(0))?;
    let mut verified_bytes = 0;
    if verify {
        progress.phase("verify", written.total());
        let expected = check.finish();
        let got = crate::io::check_ranges(&mut file, written.iter(), |n| progress.inc(n))
            .map_err(write_err(0))?;
        if got != expected || failpoint("raw-corrupt") {
            return Err(RawWriteError::ReadBack {
                target: path.clone(),
                what: "the image past its first MiB",
                bytes: written.total(),
            });
        }
        verified_bytes += written.total();
        let mut zeros = vec![0u8; (tail.end - tail.start) as usize];
        file.seek(SeekFrom::Start(tail.start))
            .and_then(|_| file.read_exact(&mut zeros))
            .map_err(write_err(tail.start))?;
        if zeros.iter().any(|&b| b != 0) {
            return Err(RawWriteError::ReadBack {
                target: path.clone(),
                what: "the zeroed end of the target",
                bytes: zeros.len() as u64,
            });
        }
        verified_bytes += zeros.len() as u64;
    }
    // Last: the image's own partition table and boot code.
    progress.phase("boot", head.len() as u64);
    file.seek(SeekFrom::Start(0)).map_err(write_err(0))?;
    file.write_all(&head).map_err(write_err(0))?;
    if probe.kind == TargetKind::ImageFile && file.metadata().map_err(write_err(0))?.len() < size {
        file.set_len(size).map_err(write_err(size))?;
    }
    target::sync_and_drop_cache(&file, probe.kind).map_err(write_err(0))?;
    if verify {
        let mut back = vec![0u8; head.len()];
        file.seek(SeekFrom::Start(0)).map_err(write_err(0))?;
        file.read_exact(&mut back).map_err(write_err(0))?;
        if back != head {
            return Err(RawWriteError::ReadBack {
                target: path.clone(),
                what: "the first MiB, written last",
                bytes: head.len() as u64,
            });
        }
        verified_bytes += head.len() as u64;
    }
    progress.inc(head.len() as u64);
    if probe.kind == TargetKind::BlockDevice {
        let _ = target::reread_partitions(&file);
    }
    let mut all = written.clone();
    all.insert(0..head.len() as u64);
    all.insert(tail.clone());
    Ok(RawReport {
        source: plan.source.clone(),
        kind: "raw-image",
        target: path.clone(),
        image_size,
        image_sha256: digest.lock().ok().and_then(|d| d.clone()),
        bmap: plan.bmap.as_ref().map(|b| b.path.clone()),
        bytes_written: all.total(),
        bytes_verified: verified_bytes,
        bytes_zeroed: tail.end - tail.start,
        verified: verify,
    })
}

/// `LIVESTICK_FAILPOINT=raw-corrupt`: the read-back is told it found a
/// difference, so the tests can show what a faulty stick leaves.
fn failpoint(name: &str) -> bool {
    std::env::var("LIVESTICK_FAILPOINT").is_ok_and(|v| v == name)
}

/// An error from the image stream, with its type back when it has one.
fn stream_error(e: io::Error) -> RawWriteError {
    let e = match RawError::from_io(e) {
        Ok(raw) => return RawWriteError::Source(raw),
        Err(e) => e,
    };
    if !e.get_ref().is_some_and(|i| i.is::<RawWriteError>()) {
        // A batch's broadcaster hands errors on as text only.
        return RawWriteError::Stream(format!("reading the image: {e}"));
    }
    match e.into_inner().map(|i| i.downcast::<RawWriteError>()) {
        Some(Ok(typed)) => *typed,
        Some(Err(other)) => RawWriteError::Stream(format!("reading the image: {other}")),
        None => RawWriteError::Stream("reading the image failed".into()),
    }
}

/// The byte ranges a target gets: the block map's, or all of the image.
struct MappedRanges(Option<Vec<Range<u64>>>);

impl MappedRanges {
    fn within(&self, window: Range<u64>) -> Vec<Range<u64>> {
        if window.start >= window.end {
            return Vec::new();
        }
        match &self.0 {
            None => vec![window],
            Some(ranges) => ranges
                .iter()
                .filter_map(|r| {
                    let start = r.start.max(window.start);
                    let end = r.end.min(window.end);
                    (start < end).then_some(start..end)
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(size: StatedSize) -> RawSource {
        RawSource {
            image: RawImage {
                path: PathBuf::from("disk.raw.xz"),
                compression: Some(crate::source::compressed::Format::Xz),
                size,
                file_len: 1 << 20,
            },
            why: "test".into(),
            bmap: None,
            range_checksums_skipped: false,
        }
    }

    fn device(size: u64) -> TargetProbe {
        let mut probe = TargetProbe::image(Path::new("/dev/sdz"), size, true);
        probe.kind = TargetKind::BlockDevice;
        probe.removable = Some(true);
        probe
    }

    #[test]
    fn a_device_smaller_than_the_image_is_refused_with_both_sizes() {
        let src = source(StatedSize::Exact(8 << 30));
        let err = plan_raw(
            &src,
            Path::new("disk.raw.xz"),
            &device(4 << 30),
            None,
            false,
        )
        .unwrap_err();
        assert!(matches!(err, RawWriteError::TooSmall { .. }), "{err}");
        assert_eq!(err.kind(), ErrorKind::BadInput);
        let text = err.to_string();
        assert!(text.contains("8 GiB") && text.contains("4 GiB"), "{text}");
        // Large enough: planned, every byte written, nothing about persistence.
        let plan = plan_raw(
            &src,
            Path::new("disk.raw.xz"),
            &device(16 << 30),
            None,
            false,
        )
        .unwrap();
        assert_eq!(plan.bytes_to_write, 8 << 30);
        assert_eq!(plan.target.size, 16 << 30);
        assert!(plan.persistence.starts_with("none: "));
        assert!(plan.notes.iter().any(|n| n.contains("no block map")));
    }

    #[test]
    fn a_new_image_file_takes_the_image_size_unless_asked_for_more() {
        let src = source(StatedSize::Exact(64 << 20));
        let new = TargetProbe::image(Path::new("new.img"), 0, false);
        let plan = plan_raw(&src, Path::new("x"), &new, None, false).unwrap();
        assert_eq!(plan.target.size, 64 << 20);
        let plan = plan_raw(&src, Path::new("x"), &new, Some(80 << 20), false).unwrap();
        assert_eq!(plan.target.size, 80 << 20);
        assert!(matches!(
            plan_raw(&src, Path::new("x"), &new, Some(32 << 20), false),
            Err(RawWriteError::TooSmall { .. })
        ));
        // An existing larger file is never shrunk; a smaller one grows.
        let big = TargetProbe::image(Path::new("big.img"), 100 << 20, true);
        assert_eq!(
            plan_raw(&src, Path::new("x"), &big, None, false)
                .unwrap()
                .target
                .size,
            100 << 20
        );
        let small = TargetProbe::image(Path::new("small.img"), 1 << 20, true);
        assert_eq!(
            plan_raw(&src, Path::new("x"), &small, None, false)
                .unwrap()
                .target
                .size,
            64 << 20
        );
    }

    #[test]
    fn an_unstated_size_is_noted_and_checked_while_writing() {
        let src = source(StatedSize::Unknown);
        let plan = plan_raw(&src, Path::new("x"), &device(1 << 30), None, false).unwrap();
        assert!(!plan.image_size_exact);
        assert!(plan.notes.iter().any(|n| n.contains("found while writing")));
    }
}
