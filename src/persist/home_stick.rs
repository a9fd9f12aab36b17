//! `LiveOS/home.img` on a stick (or a bare home.img file): inspected in place and
//! grown without root, without mounting the FAT filesystem.
//!
//! Reading goes through the file's FAT extents ([`ExtentFile`]), so `home info` on a
//! 4 GiB home reads a few kilobytes. Growing cannot be done in place safely:
//! e2fsprogs need a regular file, and rewriting the home over its own clusters would
//! leave a half-written filesystem if the stick were pulled. So the home is copied
//! out, as it is on the stick (an encrypted home stays encrypted), to a private
//! temporary directory, grown there with
//! [`home::home_resize`](crate::persist::home::home_resize) (which decrypts an
//! encrypted home into memory only, never onto a disk), written back as
//! `home.img.new` next to the old one, verified, and the two directory entries swap
//! their contents ([`crate::disk::fat_raw::swap_contents`]). Crash windows:
//!
//! - before the swap: `home.img` is the old, intact home; a partial or complete
//!   `home.img.new` is left over and the next `home resize` removes it;
//! - the swap goes through [`replace::swap_on_stick`], as a merge's does: one sector
//!   write (the staged entry is moved beside home.img first when it is elsewhere), or,
//!   when home.img's sector has no free slot, two writes under a recorded intent that
//!   the next command completes ([`replace::repair_leftovers`], run when the stick is
//!   opened here);
//! - after the swap `home.img.new` names the old home until it is removed.
//!
//! The space check therefore counts the whole new size next to the old home.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use zeroize::Zeroizing;

use crate::disk::ext4::Ext4Info;
use crate::disk::extent_file::ExtentFile;
use crate::disk::fat::{self, FatError};
use crate::disk::fat_raw::SwapError;
use crate::disk::stick::{Stick, StickError};
use crate::io::{IoAt, io_at};
use crate::persist::home::{self, FAT_MAX_FILE_MIB, HomeError, HomeKind};
use crate::persist::luks::{DATA_OFFSET, LuksError};
use crate::persist::merge::replace::{self, ReplaceError};
use crate::source::checksum::{HashingReader, hex};

const MIB: u64 = 1024 * 1024;
/// Copy buffer: large enough for USB throughput, small enough to zeroize cheaply.
const CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HomeStickError {
    #[error(transparent)]
    Stick(#[from] StickError),
    #[error(transparent)]
    Home(#[from] HomeError),
    #[error(transparent)]
    Swap(#[from] SwapError),
    #[error(transparent)]
    Replace(#[from] ReplaceError),
    #[error("{stick}: {source}")]
    Fat {
        stick: PathBuf,
        #[source]
        source: FatError,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{stick} has no {home}: it was written without a persistent home (add one with `livestick write … --home-size-mb N`)"
    )]
    NoHome { stick: PathBuf, home: String },
    #[error(
        "home.img is {current_mib} MiB and {requested_mib} MiB was asked for: home resize only grows. Shrinking is refused because resize2fs would have to move your files out of the space being cut off and a stop half way would lose them; to get a smaller home, copy your files off, rewrite the stick with `--delete-home --home-size-mb N` and copy them back"
    )]
    Shrink {
        current_mib: u64,
        requested_mib: u64,
    },
    #[error(
        "home.img cannot be {requested_mib} MiB: a file on FAT32 holds at most {max} MiB (4 GiB − 1 byte); choose {max} or less (it is {current_mib} MiB now)",
        max = FAT_MAX_FILE_MIB
    )]
    TooLarge {
        requested_mib: u64,
        current_mib: u64,
    },
    #[error(
        "not enough free space on {stick} to grow {home} from {current_mib} MiB to {requested_mib} MiB: the new home is written next to the old one before they are swapped, so {needed_mib} MiB ({needed} bytes) must be free and only {free_mib} MiB ({free} bytes) is; free {short_mib} MiB on the stick or choose at most {max_mib} MiB"
    )]
    NoSpace {
        stick: PathBuf,
        home: String,
        current_mib: u64,
        requested_mib: u64,
        needed: u64,
        needed_mib: u64,
        free: u64,
        free_mib: u64,
        short_mib: u64,
        max_mib: u64,
    },
    #[error(
        "not enough free space in the work directory {dir} for the temporary copy of the home: {needed_mib} MiB needed, {free_mib} MiB free; choose another with --workdir DIR"
    )]
    NoWorkSpace {
        dir: PathBuf,
        needed_mib: u64,
        free_mib: u64,
    },
    #[error(
        "the copy of the grown home on {stick} ({staged}) does not read back as written (sha256 {got}, expected {want}); the old home.img is untouched and the copy was removed — check the stick for hardware errors"
    )]
    VerifyMismatch {
        stick: PathBuf,
        staged: String,
        got: String,
        want: String,
    },
    #[error(
        "not enough free space on ext4 partition {partition} of {stick} to grow {home} from {current_mib} MiB to {requested_mib} MiB: its new blocks take {needed_mib} MiB ({needed} bytes) and only {free_mib} MiB ({free} bytes) is free; choose at most {max_mib} MiB"
    )]
    NoRoomOnExt4 {
        stick: PathBuf,
        partition: u32,
        home: String,
        current_mib: u64,
        requested_mib: u64,
        needed: u64,
        needed_mib: u64,
        free: u64,
        free_mib: u64,
        max_mib: u64,
    },
    #[error("{0} is neither ext4 nor LUKS2: it is not a home image")]
    NotHome(String),
    /// A failed write of the grown copy surfaces at the sync, as an error of the
    /// whole device: this names the step, so the user knows the old home is intact.
    #[error("writing the grown home as {staged} failed; the old home.img is untouched: {source}")]
    Staging {
        staged: String,
        #[source]
        source: StickError,
    },
}

impl crate::error::Classify for HomeStickError {
    fn kind(&self) -> crate::error::ErrorKind {
        match self {
            HomeStickError::Io { source, .. } => crate::error::open_failure_kind(source),
            HomeStickError::Stick(e) => crate::error::Classify::kind(e),
            // `transparent`: the home's own error decides (a wrong passphrase is 2).
            HomeStickError::Home(e) => crate::error::Classify::kind(e),
            HomeStickError::Replace(e) => crate::error::Classify::kind(e),
            // What the user asked for or named: nothing was changed.
            HomeStickError::NoHome { .. }
            | HomeStickError::Shrink { .. }
            | HomeStickError::TooLarge { .. }
            | HomeStickError::NoSpace { .. }
            | HomeStickError::NoRoomOnExt4 { .. }
            | HomeStickError::NoWorkSpace { .. }
            | HomeStickError::NotHome(_) => crate::error::ErrorKind::BadInput,
            _ => crate::error::ErrorKind::Io,
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            HomeStickError::Io { source, .. } => crate::error::open_failure_hint(source),
            HomeStickError::Stick(e) => crate::error::Classify::hint(e),
            HomeStickError::Home(e) => crate::error::Classify::hint(e),
            HomeStickError::Replace(e) => crate::error::Classify::hint(e),
            HomeStickError::NotHome(_) => crate::persist::home::BAD_HOME_HINT,
            _ => self.kind().hint(),
        }
    }
}

impl From<IoAt> for HomeStickError {
    fn from(IoAt { path, source }: IoAt) -> Self {
        HomeStickError::Io { path, source }
    }
}

/// What the plaintext LUKS2 header says, readable without the passphrase.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LuksSummary {
    pub uuid: String,
    pub label: String,
    pub cipher: String,
    pub key_bits: u32,
    #[serde(rename = "sector_bytes")]
    pub sector_size: u32,
    #[serde(rename = "data_offset_bytes")]
    pub data_offset: u64,
    /// The key-derivation function of each keyslot, in keyslot order ("argon2id", …).
    pub keyslots: Vec<String>,
    /// The keyslot the passphrase opened (only when unlocked).
    pub opened_keyslot: Option<String>,
}

/// Parse the primary LUKS2 header and its JSON area. Checksums are not verified:
/// this is only for display; opening the container (which checks them) is separate.
pub fn luks_summary<R: Read + Seek>(r: &mut R) -> Result<LuksSummary, LuksError> {
    if crate::persist::luks::is_luks1(r)? {
        return Err(LuksError::NotLuks2(
            crate::persist::luks::LUKS1_ADVICE.into(),
        ));
    }
    // The primary header, or the secondary where the primary is damaged.
    let at = crate::persist::luks::luks2_header_offset(r)?
        .ok_or_else(|| LuksError::NotLuks2("no LUKS2 header magic".into()))?;
    let mut bin = [0u8; 4096];
    r.seek(SeekFrom::Start(at))?;
    r.read_exact(&mut bin)?;
    let hdr_size = u64::from_be_bytes(bin[8..16].try_into().unwrap_or_default());
    // LUKS2 allows header areas of 16 KiB to 4 MiB.
    if !(16384..=4 << 20).contains(&hdr_size) {
        return Err(LuksError::InvalidMetadata(format!(
            "header size {hdr_size} bytes"
        )));
    }
    let cstr = |b: &[u8]| {
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        String::from_utf8_lossy(&b[..end]).into_owned()
    };
    let label = cstr(&bin[24..72]);
    let uuid = cstr(&bin[168..208]);
    let mut area = vec![0u8; (hdr_size - 4096) as usize];
    r.read_exact(&mut area)?;
    let end = area.iter().position(|&c| c == 0).unwrap_or(area.len());
    let j: serde_json::Value = serde_json::from_slice(&area[..end])
        .map_err(|e| LuksError::InvalidMetadata(format!("JSON area: {e}")))?;
    let seg = j["segments"]
        .as_object()
        .and_then(|m| m.values().next())
        .cloned()
        .unwrap_or_default();
    let mut slots: Vec<(u64, &serde_json::Value)> = j["keyslots"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.parse().ok()?, v)))
                .collect()
        })
        .unwrap_or_default();
    slots.sort_by_key(|(k, _)| *k);
    let key_bits = slots
        .first()
        .and_then(|(_, v)| v["key_size"].as_u64())
        .map_or(0, |b| (b * 8) as u32);
    Ok(LuksSummary {
        uuid,
        label,
        cipher: seg["encryption"].as_str().unwrap_or("").to_string(),
        key_bits,
        sector_size: seg["sector_size"].as_u64().unwrap_or(0) as u32,
        data_offset: seg["offset"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        keyslots: slots
            .iter()
            .map(|(_, v)| v["kdf"]["type"].as_str().unwrap_or("?").to_string())
            .collect(),
        opened_keyslot: None,
    })
}

/// What `livestick home info` reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HomeReport {
    /// The stick or the bare file given.
    pub target: PathBuf,
    /// `/LiveOS/home.img` on a stick; `None` for a bare file.
    #[serde(rename = "path")]
    pub home: Option<String>,
    #[serde(rename = "size_bytes")]
    pub file_size: u64,
    pub encrypted: bool,
    /// Encrypted and no passphrase given: the filesystem was not read.
    pub locked: bool,
    pub luks: Option<LuksSummary>,
    pub fs: Option<Ext4Info>,
    /// Free bytes inside the filesystem (`free blocks × block size`).
    pub fs_free_bytes: Option<u64>,
    /// Free bytes on the stick's FAT filesystem.
    pub stick_free_bytes: Option<u64>,
    /// A `home.img.new` an interrupted resize left behind (removed by the next resize).
    #[serde(rename = "stale_staging_bytes")]
    pub stale_staging: Option<u64>,
    /// Leftovers of a stopped replacement repaired when the stick was opened.
    pub repaired: Vec<String>,
}

/// The shape version of the `home info` and `home resize` documents
/// (docs/json-maintenance.md, `schemas/home-*.schema.json`).
pub const SCHEMA_VERSION: u64 = 1;

impl HomeReport {
    /// The `home info --json` document: `schema`, then the report.
    pub fn to_document(&self) -> serde_json::Result<serde_json::Value> {
        let mut doc = serde_json::to_value(self)?;
        if let Some(object) = doc.as_object_mut() {
            object.insert("schema".into(), serde_json::json!(SCHEMA_VERSION));
        }
        Ok(doc)
    }
}

/// The `home resize --json` document: the target once, the plan, and the home
/// after the resize (`null` on a dry run or when nothing changed); what was
/// repaired when the stick was opened is said once, at the top.
pub fn resize_document(
    plan: &ResizePlan,
    result: Option<&HomeReport>,
    dry_run: bool,
) -> serde_json::Result<serde_json::Value> {
    let mut after = serde_json::to_value(result)?;
    let mut repaired = serde_json::json!([]);
    if let Some(object) = after.as_object_mut() {
        object.remove("target");
        if let Some(own) = object.remove("repaired") {
            repaired = own;
        }
    }
    Ok(serde_json::json!({
        "schema": SCHEMA_VERSION, "target": plan.target, "dry_run": dry_run,
        "plan": plan, "result": after, "repaired": repaired,
    }))
}

/// Describe a home.img seen through `r` (`file_size` bytes).
fn report_from<R: Read + Seek>(
    mut r: R,
    target: &Path,
    home: Option<String>,
    passphrase: Option<&[u8]>,
) -> Result<HomeReport, HomeStickError> {
    let what = home.clone().unwrap_or_else(|| target.display().to_string());
    let kind = home::detect_home_kind(&mut r).map_err(io_at(target))?;
    let luks = match kind {
        Some(HomeKind::Luks2) => Some(luks_summary(&mut r).map_err(HomeError::from)?),
        Some(HomeKind::Plain) => None,
        None => return Err(HomeStickError::NotHome(what)),
    };
    let info = home::home_info_from(r, passphrase)?;
    let luks = luks.map(|mut s| {
        s.opened_keyslot = info.luks.as_ref().map(|l| l.keyslot.clone());
        s
    });
    Ok(HomeReport {
        target: target.to_path_buf(),
        home,
        file_size: info.file_size,
        encrypted: info.encrypted,
        locked: info.encrypted && info.fs.is_none(),
        luks,
        fs_free_bytes: info.fs.as_ref().map(|f| f.free_blocks * f.block_size),
        fs: info.fs,
        stick_free_bytes: None,
        repaired: Vec::new(),
        stale_staging: None,
    })
}

/// Whether `path` holds a plain or an encrypted home (or neither).
pub fn kind_of_file(path: &Path) -> Result<Option<HomeKind>, HomeStickError> {
    let mut f = crate::disk::target::open_path(path, false).map_err(StickError::from)?;
    Ok(home::detect_home_kind(&mut f).map_err(io_at(path))?)
}

/// `home info` on a bare home.img file.
pub fn file_report(path: &Path, passphrase: Option<&[u8]>) -> Result<HomeReport, HomeStickError> {
    let f = crate::disk::target::open_path(path, false).map_err(StickError::from)?;
    report_from(f, path, None, passphrase)
}

/// A stick with a home.img, opened for `home info` or `home resize`.
pub struct StickHome {
    pub stick: Stick,
    pub live_dir: String,
    /// `/LiveOS/home.img`.
    pub home: String,
    /// `/LiveOS/home.img.new`.
    pub staged: String,
    pub size: u64,
    pub free_bytes: u64,
    pub cluster_bytes: u64,
    /// Size of a leftover `home.img.new`, if any.
    pub stale: Option<u64>,
    /// What was repaired when the stick was opened (`replace::repair_leftovers`).
    pub repaired: Vec<String>,
}

impl StickHome {
    /// Opens `path` as a stick and finds `<live_dir>/home.img` on it.
    pub fn open(path: &Path, live_dir: &str, writable: bool) -> Result<StickHome, HomeStickError> {
        // What the path names now is what every open below must find: the repair
        // and the work each open the stick afresh (see `target::pin`).
        crate::disk::target::pin(path).map_err(StickError::from)?;
        // Leftovers of a stopped replacement first: reading the stick refuses chains
        // two entries share, and a half-swapped home.img is completed here.
        let repaired = replace::repair_stick(path, live_dir)?;
        let mut stick = Stick::open(path, writable)?;
        let info = stick.info(live_dir)?;
        let home = format!("/{live_dir}/home.img");
        let staged = format!("{home}.new");
        let size = info.home.ok_or_else(|| HomeStickError::NoHome {
            stick: path.to_path_buf(),
            home: home.trim_start_matches('/').to_string(),
        })?;
        let (cluster_bytes, stale) = {
            // Looking is read-only; with_fs on a writable stick would rewrite FAT metadata.
            let mut ro = Stick::open(path, false)?;
            ro.with_fs(|fs| {
                let stats = fs.stats().map_err(|e| StickError::Fat {
                    path: path.to_path_buf(),
                    source: FatError::Io(e),
                })?;
                let stale = fat::list_dir(fs, &format!("/{live_dir}"))
                    .into_iter()
                    .find(|e| !e.is_dir && e.path.eq_ignore_ascii_case(&staged))
                    .map(|e| e.size);
                Ok((u64::from(stats.cluster_size()), stale))
            })?
        };
        Ok(StickHome {
            stick,
            live_dir: live_dir.to_string(),
            home,
            staged,
            size,
            free_bytes: info.free_bytes,
            cluster_bytes,
            stale,
            repaired,
        })
    }

    /// home.img read (and written) in place through its FAT extents.
    pub fn reader(&mut self) -> Result<ExtentFile<&mut File>, HomeStickError> {
        let extents = self.stick.file_extents(&self.home)?;
        Ok(ExtentFile::new(self.stick.file_mut(), &extents))
    }

    pub fn kind(&mut self) -> Result<Option<HomeKind>, HomeStickError> {
        let path = self.stick.path.clone();
        let mut r = self.reader()?;
        Ok(home::detect_home_kind(&mut r).map_err(io_at(&path))?)
    }

    /// `home info`: only the LUKS header and the ext4 superblock are read.
    pub fn report(&mut self, passphrase: Option<&[u8]>) -> Result<HomeReport, HomeStickError> {
        let target = self.stick.path.clone();
        let home = self.home.clone();
        let (free, stale) = (self.free_bytes, self.stale);
        let r = self.reader()?;
        let mut rep = report_from(r, &target, Some(home), passphrase)?;
        rep.stick_free_bytes = Some(free);
        rep.stale_staging = stale;
        rep.repaired = self.repaired.clone();
        Ok(rep)
    }

    /// Bytes a file of `len` bytes takes on the FAT filesystem.
    fn on_fat(&self, len: u64) -> u64 {
        len.div_ceil(self.cluster_bytes) * self.cluster_bytes
    }
}

/// What `home resize` will do (also the `--dry-run` output).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ResizePlan {
    /// Said once, at the top of the `home resize` document.
    #[serde(skip_serializing)]
    pub target: PathBuf,
    #[serde(rename = "path")]
    pub home: Option<String>,
    pub encrypted: bool,
    pub current_bytes: u64,
    pub new_bytes: u64,
    /// Already the requested size: nothing to do.
    pub unchanged: bool,
    /// FAT bytes the staged copy takes (stick only).
    pub stick_needed_bytes: Option<u64>,
    pub stick_free_bytes: Option<u64>,
    pub workdir: PathBuf,
    pub workdir_needed_bytes: u64,
    /// Memory the decrypted copy of an encrypted home takes (0 for a plain home):
    /// checked against MemAvailable by [`home::check_staging_memory`].
    pub memory_needed_bytes: u64,
    pub steps: Vec<String>,
}

/// Checks a requested size against the FAT limit and the current size.
pub fn check_new_size(current: u64, requested_mib: u64) -> Result<u64, HomeStickError> {
    if requested_mib > FAT_MAX_FILE_MIB {
        return Err(HomeStickError::TooLarge {
            requested_mib,
            current_mib: current.div_ceil(MIB),
        });
    }
    check_growth(current, requested_mib)
}

/// Checks a requested size against the current size only: on the ext4 live
/// partition a file has no 4 GiB limit, the partition's free space is the bound.
pub fn check_growth(current: u64, requested_mib: u64) -> Result<u64, HomeStickError> {
    let current_mib = current.div_ceil(MIB);
    let new = requested_mib
        .checked_mul(MIB)
        .ok_or(HomeStickError::TooLarge {
            requested_mib,
            current_mib,
        })?;
    if new < current {
        return Err(HomeStickError::Shrink {
            current_mib,
            requested_mib,
        });
    }
    Ok(new)
}

fn free_space_of(dir: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(s.blocks_available() as u64 * s.fragment_size() as u64)
}

/// Memory the decrypted copy of an encrypted home of `current` bytes grown to `new`
/// takes, checked against what is available now; 0 for a plain home. Planning
/// assumes the usual 16 MiB LUKS2 header; the resize itself checks again with the
/// container's own data offset before it decrypts anything.
fn check_memory(encrypted: bool, current: u64, new: u64) -> Result<u64, HomeStickError> {
    if !encrypted {
        return Ok(0);
    }
    let need = home::luks_staging_bytes(
        current.saturating_sub(DATA_OFFSET),
        new.saturating_sub(DATA_OFFSET),
    );
    home::check_staging_memory(need)?;
    Ok(need)
}

fn check_workdir(dir: &Path, needed: u64) -> Result<(), HomeStickError> {
    if let Some(free) = free_space_of(dir)
        && free < needed
    {
        return Err(HomeStickError::NoWorkSpace {
            dir: dir.to_path_buf(),
            needed_mib: needed.div_ceil(MIB),
            free_mib: free / MIB,
        });
    }
    Ok(())
}

/// Plans growing the home on a stick to `requested_mib`, checking every limit.
pub fn plan_stick_resize(
    h: &StickHome,
    encrypted: bool,
    requested_mib: u64,
    workdir: &Path,
) -> Result<ResizePlan, HomeStickError> {
    let new = check_new_size(h.size, requested_mib)?;
    let unchanged = new == h.size;
    let needed = h.on_fat(new);
    // A stale staged copy is removed first; its clusters count as free unless it
    // shares the home's chain (then removing it frees nothing).
    let free = h.free_bytes + h.stale.map_or(0, |s| h.on_fat(s));
    if !unchanged && needed > free {
        let room = free.saturating_sub(h.cluster_bytes) / MIB;
        return Err(HomeStickError::NoSpace {
            stick: h.stick.path.clone(),
            home: h.home.trim_start_matches('/').to_string(),
            current_mib: h.size.div_ceil(MIB),
            requested_mib,
            needed,
            needed_mib: needed.div_ceil(MIB),
            free,
            free_mib: free / MIB,
            short_mib: (needed - free).div_ceil(MIB),
            max_mib: room.min(FAT_MAX_FILE_MIB),
        });
    }
    // The copy of the home as it is on the stick (still encrypted), grown in place.
    let work_need = new;
    let mut memory_need = 0;
    if !unchanged {
        check_workdir(workdir, work_need)?;
        memory_need = check_memory(encrypted, h.size, new)?;
    }
    let home = h.home.trim_start_matches('/');
    let staged = h.staged.trim_start_matches('/');
    let mut steps = Vec::new();
    if !unchanged {
        if h.stale.is_some() {
            steps.push(format!(
                "remove {staged} left by an interrupted resize (it never replaced home.img)"
            ));
        }
        if encrypted {
            steps.push(
                "unlock home.img with the passphrase (checked before anything changes)".into(),
            );
        }
        steps.push(format!(
            "copy {home} ({} MiB{}) to a private temporary directory in {}",
            h.size.div_ceil(MIB),
            if encrypted { ", still encrypted" } else { "" },
            workdir.display()
        ));
        steps.push(grow_step(encrypted, new));
        steps.push(format!(
            "write it to {staged} next to the old home ({} MiB on the stick), sync and verify its sha256",
            needed.div_ceil(MIB)
        ));
        steps.push(format!(
            "swap the directory entries of {staged} and home.img (one sector write when they share a sector), then remove the old home"
        ));
    }
    Ok(ResizePlan {
        target: h.stick.path.clone(),
        home: Some(h.home.clone()),
        encrypted,
        current_bytes: h.size,
        new_bytes: new,
        unchanged,
        stick_needed_bytes: Some(needed),
        stick_free_bytes: Some(free),
        workdir: workdir.to_path_buf(),
        workdir_needed_bytes: work_need,
        memory_needed_bytes: memory_need,
        steps,
    })
}

fn grow_step(encrypted: bool, new: u64) -> String {
    if encrypted {
        format!(
            "grow the LUKS2 container to {} MiB: decrypt into memory only (a memfd, never a file on disk), e2fsck -f -p and resize2fs it there, re-encrypt the changed blocks and the new space",
            new / MIB
        )
    } else {
        format!("grow it to {} MiB: e2fsck -f -p, then resize2fs", new / MIB)
    }
}

/// Plans growing a bare home.img file in place.
pub fn plan_file_resize(
    path: &Path,
    encrypted: bool,
    requested_mib: u64,
    workdir: &Path,
) -> Result<ResizePlan, HomeStickError> {
    crate::disk::target::pin(path).map_err(StickError::from)?;
    // The size of the file opened, whatever the path names by now.
    let current = crate::disk::target::probe(path)
        .map_err(StickError::from)?
        .size;
    let new = check_new_size(current, requested_mib)?;
    let unchanged = new == current;
    // In place, and nothing decrypted goes to a disk: no work-directory space.
    let work_need = 0;
    let memory_need = if unchanged {
        0
    } else {
        check_memory(encrypted, current, new)?
    };
    let mut steps = Vec::new();
    if !unchanged {
        if encrypted {
            steps.push("unlock it with the passphrase (checked before anything changes)".into());
        }
        steps.push(grow_step(encrypted, new));
    }
    Ok(ResizePlan {
        target: path.to_path_buf(),
        home: None,
        encrypted,
        current_bytes: current,
        new_bytes: new,
        unchanged,
        stick_needed_bytes: None,
        stick_free_bytes: None,
        workdir: workdir.to_path_buf(),
        workdir_needed_bytes: work_need,
        memory_needed_bytes: memory_need,
        steps,
    })
}

/// A private (0700) directory in `workdir` for the copy of the home as it is on the
/// stick (encrypted if the home is); removed on drop.
fn private_dir(workdir: &Path) -> Result<tempfile::TempDir, HomeStickError> {
    Ok(tempfile::Builder::new()
        .prefix("livestick-home-")
        .tempdir_in(workdir)
        .map_err(io_at(workdir))?)
}

/// Grows a bare home.img file following `plan`.
pub fn resize_file(
    plan: &ResizePlan,
    passphrase: Option<&[u8]>,
) -> Result<HomeReport, HomeStickError> {
    // Opened once: this open is checked against the file planned on (pinned by
    // `plan_file_resize`), and the resize and the report after it go through this
    // handle only, so a file renamed over the path meanwhile is never written.
    let probe = crate::disk::target::probe(&plan.target).map_err(StickError::from)?;
    let mut file =
        crate::disk::target::open_existing(&probe, !plan.unchanged).map_err(StickError::from)?;
    if !plan.unchanged {
        file = home::home_resize_opened(
            file,
            &plan.target,
            plan.new_bytes,
            passphrase,
            home::OnDamage::LeaveUnchanged,
        )?;
    }
    report_from(&file, &plan.target, None, passphrase)
}

/// Removes a `home.img.new` left by an interrupted run. If the run stopped between
/// the two sector writes of a swap, the stale name shares home.img's chain: then it is
/// first detached from it ([`replace::detach_shared_leftover`]), so removing it frees
/// nothing of the home.
fn remove_stale(h: &mut StickHome) -> Result<(), HomeStickError> {
    let part = h.stick.partition.start;
    let path = h.stick.path.clone();
    if let Some(note) = replace::detach_shared_leftover(h.stick.file_mut(), part, &h.staged)? {
        h.stick.file_mut().sync_all().map_err(io_at(&path))?;
        h.repaired.push(note);
    }
    let staged = h.staged.clone();
    h.stick.with_fs(|fs| {
        fat::remove_all(fs, &staged).map_err(|source| StickError::Fat {
            path: path.clone(),
            source,
        })
    })?;
    h.stale = None;
    Ok(())
}

/// Copies home.img off the stick into `dest`, keeping runs of zeros as holes.
fn copy_out(
    h: &mut StickHome,
    dest: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<(), HomeStickError> {
    let path = h.stick.path.clone();
    let mut r = h.reader()?;
    let len = r.len();
    let mut out = tempfile_create(dest)?;
    let mut buf = Zeroizing::new(vec![0u8; CHUNK]);
    r.seek(SeekFrom::Start(0)).map_err(io_at(&path))?;
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(CHUNK as u64) as usize;
        r.read_exact(&mut buf[..n]).map_err(io_at(&path))?;
        if buf[..n].iter().any(|&b| b != 0) {
            out.seek(SeekFrom::Start(off)).map_err(io_at(dest))?;
            out.write_all(&buf[..n]).map_err(io_at(dest))?;
        }
        off += n as u64;
        progress("copy out", off, len);
    }
    out.set_len(len).map_err(io_at(dest))?;
    Ok(())
}

/// Creates `dest` readable by the owner only.
fn tempfile_create(dest: &Path) -> Result<File, HomeStickError> {
    use std::os::unix::fs::OpenOptionsExt;
    Ok(std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .map_err(io_at(dest))?)
}

/// Tells the kernel to forget cached pages of the stick, so the verification reads
/// what reached the device rather than what is still in memory.
fn drop_cache(f: &File) {
    use std::os::fd::AsRawFd;
    let _ = nix::fcntl::posix_fadvise(
        f.as_raw_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
}

/// Grows the home on a stick following `plan` (see the module documentation).
/// `progress` gets `(phase, done, total)`.
pub fn resize_on_stick(
    h: &mut StickHome,
    plan: &ResizePlan,
    passphrase: Option<&[u8]>,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<HomeReport, HomeStickError> {
    if plan.unchanged {
        return h.report(passphrase);
    }
    let stick_path = h.stick.path.clone();
    if plan.encrypted {
        // A wrong passphrase fails here, before the stick is touched.
        let pass = passphrase.ok_or(HomeError::PassphraseNeeded("resize it"))?;
        let r = h.reader()?;
        crate::persist::luks::open_luks2(r, pass).map_err(HomeError::from)?;
    }
    let tmp = private_dir(&plan.workdir)?;
    let copy = tmp.path().join("home.img");
    copy_out(h, &copy, progress)?;
    progress("grow", 0, 1);
    home::home_resize(&copy, plan.new_bytes, passphrase)?;
    progress("grow", 1, 1);

    if h.stale.is_some() {
        remove_stale(h)?;
    }
    let staged = h.staged.clone();
    let new_len = plan.new_bytes;
    let mut input = File::open(&copy).map_err(io_at(&copy))?;
    let mut done = 0u64;
    let sum = h
        .stick
        .with_fs(|fs| {
            fat::write_file(fs, &staged, &mut input, new_len, |n| {
                done += n;
                progress("write", done, new_len);
            })
            .map_err(|source| StickError::Fat {
                path: stick_path.clone(),
                source,
            })
        })
        .map_err(|source| HomeStickError::Staging {
            staged: staged.trim_start_matches('/').to_string(),
            source,
        })?;
    drop(input);
    // A plain home's copy holds the user's files; don't keep it longer than needed.
    drop(tmp);

    drop_cache(h.stick.file_mut());
    let extents = h.stick.file_extents(&staged)?;
    let got = {
        let f = ExtentFile::new(&mut *h.stick.file_mut(), &extents);
        let len = f.len();
        let mut hashing = HashingReader::new(f);
        crate::io::copy_with_progress(&mut hashing, &mut std::io::sink(), |done| {
            progress("verify", done, len)
        })
        .map_err(io_at(&stick_path))?;
        hex(&hashing.finish())
    };
    let want = hex(&sum);
    if got != want {
        let _ = h.stick.with_fs(|fs| {
            let _ = fat::remove_all(fs, &staged);
            Ok(())
        });
        return Err(HomeStickError::VerifyMismatch {
            stick: stick_path,
            staged: staged.trim_start_matches('/').to_string(),
            got,
            want,
        });
    }

    let home = h.home.clone();
    replace::swap_on_stick(&mut h.stick, &home, &staged)?;
    // The staged name now holds the old home; free its clusters (unless another name
    // still uses them).
    let part = h.stick.partition.start;
    if let Some(note) = replace::detach_shared_leftover(h.stick.file_mut(), part, &staged)? {
        h.stick.file_mut().sync_all().map_err(io_at(&stick_path))?;
        h.repaired.push(note);
    }
    h.stick.with_fs(|fs| {
        fat::remove_all(fs, &staged).map_err(|source| StickError::Fat {
            path: stick_path.clone(),
            source,
        })
    })?;
    h.size = new_len;
    let mut rep = h.report(passphrase)?;
    let live_dir = h.live_dir.clone();
    rep.stick_free_bytes = h.stick.info(&live_dir).ok().map(|i| i.free_bytes);
    Ok(rep)
}

/// `home info` on a stick with the ext4 live layout (home.img on ext4 partition 2,
/// read in place by its extents); `None` when the stick has no such partition.
pub fn ext4_live_report(
    path: &Path,
    live_dir: &str,
    passphrase: Option<&[u8]>,
) -> Result<Option<HomeReport>, HomeStickError> {
    use crate::disk::ext4_fs;
    let mut f = crate::disk::target::open_path(path, false).map_err(StickError::from)?;
    let Ok(Some(p)) = ext4_fs::find_live_partition(&mut f, live_dir) else {
        return Ok(None);
    };
    let home = format!("/{live_dir}/home.img");
    let map = {
        let mut window = crate::io::PartitionWindow::new(&mut f, p.start, p.len);
        p.fs.file(&mut window, &home)
            .map_err(|e| HomeStickError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::other(e.to_string()),
            })?
    };
    let Some(map) = map else {
        return Err(HomeStickError::NoHome {
            stick: path.to_path_buf(),
            home: home.trim_start_matches('/').to_string(),
        });
    };
    let r = ext4_fs::Ext4File::new(&mut f, p.start, p.fs.block_size, &map);
    Ok(Some(report_from(r, path, Some(home), passphrase)?))
}

/// home.img on a stick's ext4 live partition, read and written in place by its
/// extents (`ext4_fs::Ext4FileRw`), for `home resize`.
pub struct Ext4LiveHome {
    pub device: PathBuf,
    pub partition: crate::disk::ext4_fs::LivePartition,
    /// "/LiveOS/home.img".
    pub home: String,
    pub map: crate::disk::ext4_fs::FileMap,
    /// What opening it repaired (the partition's journal replayed), for the report.
    pub repaired: Vec<String>,
    file: File,
}

/// Free blocks of the ext4 live partition a grow leaves alone: the extent tree's new
/// blocks and what the live system writes beside its home.
const EXT4_MARGIN: u64 = 16 * MIB;

fn ext4_err(path: &Path) -> impl Fn(crate::disk::ext4_fs::Ext4FsError) -> HomeStickError + '_ {
    move |e| HomeStickError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// Opens home.img of a stick with the ext4 live layout through the safety checks of
/// a change (`O_EXCL` when `writable`); `None` for a stick of the FAT layout. A
/// change is refused while the partition's journal holds changes not written home.
pub fn open_ext4_live_home(
    path: &Path,
    live_dir: &str,
    writable: bool,
) -> Result<Option<Ext4LiveHome>, HomeStickError> {
    use crate::disk::ext4_fs;
    {
        let mut look = crate::disk::target::open_path(path, false).map_err(StickError::from)?;
        if !matches!(
            ext4_fs::find_live_partition(&mut look, live_dir),
            Ok(Some(_))
        ) {
            return Ok(None);
        }
    }
    let probe = crate::disk::target::probe(path).map_err(StickError::from)?;
    let mut file =
        crate::disk::target::open_existing(&probe, writable).map_err(StickError::from)?;
    let Some(mut partition) =
        ext4_fs::find_live_partition(&mut file, live_dir).map_err(ext4_err(path))?
    else {
        return Ok(None);
    };
    let mut repaired = Vec::new();
    if writable && partition.fs.needs_recovery {
        // What the kernel would do on mounting it, before any change beside it.
        let (replayed, line) =
            ext4_fs::replay_partition(&mut file, &partition).map_err(|e| HomeStickError::Io {
                path: path.to_path_buf(),
                source: std::io::Error::other(format!(
                    "the ext4 live partition {} was not cleanly unmounted and livestick cannot replay its journal ({e}); to replay it, {} (or boot the stick and shut the live system down cleanly), then try again",
                    partition.number,
                    crate::disk::ext4_live::replay_hint(path, partition.number)
                )),
            })?;
        partition = replayed;
        repaired.push(line);
    }
    let home = format!("/{live_dir}/home.img");
    let map = {
        let mut window = crate::io::PartitionWindow::new(&mut file, partition.start, partition.len);
        partition
            .fs
            .file(&mut window, &home)
            .map_err(ext4_err(path))?
    };
    let Some(map) = map else {
        return Err(HomeStickError::NoHome {
            stick: path.to_path_buf(),
            home: home.trim_start_matches('/').to_string(),
        });
    };
    Ok(Some(Ext4LiveHome {
        device: path.to_path_buf(),
        partition,
        home,
        map,
        repaired,
        file,
    }))
}

impl Ext4LiveHome {
    pub fn size(&self) -> u64 {
        self.map.size
    }

    /// home.img's bytes, in place.
    pub fn io(&mut self) -> crate::disk::ext4_fs::Ext4FileRw<&mut File> {
        crate::disk::ext4_fs::Ext4FileRw::new(&mut self.file, &self.partition, &self.map)
    }

    pub fn kind(&mut self) -> Result<Option<HomeKind>, HomeStickError> {
        let path = self.device.clone();
        Ok(home::detect_home_kind(&mut self.io()).map_err(io_at(&path))?)
    }

    /// Bytes of the partition a grow may take.
    pub fn free_bytes(&self) -> u64 {
        let fs = &self.partition.fs;
        (fs.free_blocks * fs.block_size).saturating_sub(EXT4_MARGIN)
    }

    pub fn report(&mut self, passphrase: Option<&[u8]>) -> Result<HomeReport, HomeStickError> {
        let device = self.device.clone();
        let home = self.home.clone();
        let free = self.free_bytes();
        let mut rep = report_from(self.io(), &device, Some(home), passphrase)?;
        rep.stick_free_bytes = Some(free);
        rep.repaired = self.repaired.clone();
        Ok(rep)
    }
}

/// Plans growing home.img on the ext4 live partition: its new blocks come from the
/// partition's allocator (unwritten, nothing written), the file system inside is
/// grown on a work copy, and only the blocks that changed are written back.
pub fn plan_ext4_live_resize(
    h: &Ext4LiveHome,
    encrypted: bool,
    requested_mib: u64,
    workdir: &Path,
) -> Result<ResizePlan, HomeStickError> {
    let new = check_growth(h.size(), requested_mib)?;
    let unchanged = new == h.size();
    let block = h.partition.fs.block_size;
    let needed = new.div_ceil(block) * block - h.size().div_ceil(block) * block;
    let free = h.free_bytes();
    if !unchanged && needed > free {
        return Err(HomeStickError::NoRoomOnExt4 {
            stick: h.device.clone(),
            partition: h.partition.number,
            home: h.home.trim_start_matches('/').to_string(),
            current_mib: h.size().div_ceil(MIB),
            requested_mib,
            needed,
            needed_mib: needed.div_ceil(MIB),
            free,
            free_mib: free / MIB,
            max_mib: (h.size() + free) / MIB,
        });
    }
    let mut memory_need = 0;
    if !unchanged {
        check_workdir(workdir, new)?;
        memory_need = check_memory(encrypted, h.size(), new)?;
    }
    let home = h.home.trim_start_matches('/');
    let mut steps = Vec::new();
    if !unchanged {
        if encrypted {
            steps.push(
                "unlock home.img with the passphrase (checked before anything changes)".into(),
            );
        }
        steps.push(format!(
            "copy {home} ({} MiB{}) to a private temporary directory in {}",
            h.size().div_ceil(MIB),
            if encrypted { ", still encrypted" } else { "" },
            workdir.display()
        ));
        steps.push(grow_step(encrypted, new));
        steps.push(format!(
            "give {home} {} MiB more blocks on ext4 partition {} (allocated unwritten: nothing is written to them)",
            needed.div_ceil(MIB),
            h.partition.number
        ));
        steps.push(format!(
            "write the blocks the grow changed back into {home} in place, sync and read them back"
        ));
    }
    Ok(ResizePlan {
        target: h.device.clone(),
        home: Some(h.home.clone()),
        encrypted,
        current_bytes: h.size(),
        new_bytes: new,
        unchanged,
        stick_needed_bytes: Some(needed),
        stick_free_bytes: Some(free),
        workdir: workdir.to_path_buf(),
        workdir_needed_bytes: if unchanged { 0 } else { new },
        memory_needed_bytes: memory_need,
        steps,
    })
}

/// Grows home.img on the ext4 live partition following `plan`. Every tool works on
/// the copy: a failure there leaves the stick as it was.
pub fn resize_on_ext4_live(
    h: &mut Ext4LiveHome,
    plan: &ResizePlan,
    passphrase: Option<&[u8]>,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<HomeReport, HomeStickError> {
    if plan.unchanged {
        return h.report(passphrase);
    }
    let device = h.device.clone();
    let maint = |e: crate::persist::ovl_maint::OvlMaintError| HomeStickError::Io {
        path: device.clone(),
        source: std::io::Error::other(e.to_string()),
    };
    // Where the file system starts inside home.img: its superblock and group
    // descriptors (the first MiB of it) go back last, after a sync of the rest.
    let fs_start = if plan.encrypted {
        // A wrong passphrase fails here, before the stick is touched.
        let pass = passphrase.ok_or(HomeError::PassphraseNeeded("resize it"))?;
        let volume = crate::persist::luks::open_luks2(h.io(), pass).map_err(HomeError::from)?;
        volume.info().data_offset
    } else {
        0
    };
    let tmp = private_dir(&plan.workdir)?;
    let show = format!("{}:{}", device.display(), h.home);
    let len = h.size();
    let mut copy = crate::persist::ovl_maint::WorkCopy::create(
        &mut h.io(),
        len,
        tmp.path(),
        &show,
        &mut |d, n| progress("copy out", d, n),
    )
    .map_err(maint)?;
    // The copy as the stick has it; what the grow changes (the new space included,
    // whose zeros cost nothing in unwritten blocks) is written back.
    copy.mark_baseline().map_err(maint)?;
    progress("grow", 0, 1);
    home::home_resize(copy.path(), plan.new_bytes, passphrase)?;
    progress("grow", 1, 1);
    h.file.sync_all().map_err(io_at(&device))?;
    crate::disk::ext4_live::grow_file(&device, &h.partition, &h.home, h.map.size, plan.new_bytes)
        .map_err(|e| HomeStickError::Io {
        path: device.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let map = {
        let mut window =
            crate::io::PartitionWindow::new(&mut h.file, h.partition.start, h.partition.len);
        let fs = crate::disk::ext4_fs::Ext4Fs::open(&mut window).map_err(ext4_err(&device))?;
        let map = fs.file(&mut window, &h.home).map_err(ext4_err(&device))?;
        h.partition.fs = fs;
        map
    };
    h.map = map.ok_or_else(|| HomeStickError::NoHome {
        stick: device.clone(),
        home: h.home.trim_start_matches('/').to_string(),
    })?;
    copy.write_back_holding(&mut h.io(), fs_start..fs_start + (1 << 20), &mut |d, n| {
        progress("write back", d, n)
    })
    .map_err(maint)?;
    drop(copy);
    drop(tmp);
    h.report(passphrase)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_checked_with_figures() {
        assert_eq!(check_new_size(32 * MIB, 64).unwrap(), 64 * MIB);
        assert_eq!(check_new_size(32 * MIB, 32).unwrap(), 32 * MIB);
        let e = check_new_size(32 * MIB, 16).unwrap_err().to_string();
        assert!(
            e.contains("32 MiB") && e.contains("16 MiB") && e.contains("only grows"),
            "{e}"
        );
        let e = check_new_size(32 * MIB, 4096).unwrap_err().to_string();
        assert!(e.contains("4096 MiB") && e.contains("4095"), "{e}");
        // On the ext4 live partition the FAT limit does not apply; shrinking still
        // does not.
        assert_eq!(check_growth(32 * MIB, 6000).unwrap(), 6000 * MIB);
        let e = check_growth(32 * MIB, 16).unwrap_err().to_string();
        assert!(e.contains("only grows"), "{e}");
    }

    #[test]
    fn luks_summary_rejects_non_luks() {
        let mut c = std::io::Cursor::new(vec![0u8; 8192]);
        assert!(luks_summary(&mut c).is_err());
    }
}
