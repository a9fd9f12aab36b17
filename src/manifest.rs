//! The stick manifest, `<live dir>/livestick.json`: what livestick wrote on a stick,
//! so that `livestick verify` can tell a month later whether the stick still holds it.
//!
//! It lists the source (ISO name, size, implanted MD5, label), the layout (table,
//! partition, FAT label and serial), every file livestick copied or rendered with its
//! size and sha256 (the hashes `apply` computed while writing: nothing is read again
//! to make it), and the persistence files by name and size only (their content is the
//! user's, and changes by design).
//!
//! Every command that changes a listed file keeps it true: `write` (also
//! re-provisioning, `--skipcopy` and `--multi`, which keep the entries of files they
//! leave alone) through [`updated`], `overlay merge` through [`record_replacement`],
//! `home resize` through [`record_persistence_size`]; after a write, each rewrite goes
//! through [`rewrite_on_stick`], which never leaves a torn manifest.
//! It also carries the root record (`ends_sha256` on the root image's entry, read by
//! `live_source::compare_root`) that answers one cheap question before planning: is the root
//! image the one this ISO has? Sticks written before it did have it in
//! `LiveOS/.livestick` (`live_source::RootRecord`), which is read there and removed
//! by the next write that copies the root image.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::disk::extent_file::ExtentFile;
use crate::disk::fat::{self, FatFs};
use crate::disk::partition::PartitionError;
use crate::disk::stick::{Stick, StickError};
use crate::disk::target;
use crate::persist::merge::located::{Companion, NewRoot};
use crate::persist::merge::replace;

use crate::plan::Plan;
use crate::source::checksum::hex;
use crate::source::signed_checksum::utc_text;

/// The manifest's file name in the live directory.
pub const FILE_NAME: &str = crate::layout::MANIFEST;
/// Bumped when a field changes meaning; readers refuse a newer schema.
pub const SCHEMA: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: u32,
    /// The livestick that last changed the stick.
    pub livestick_version: String,
    /// When the manifest was last rewritten (UTC, RFC 3339).
    pub updated_at: String,
    /// One per live directory written (`--multi` adds one).
    pub images: Vec<ImageRecord>,
    pub layout: LayoutRecord,
    /// Every file livestick copied or rendered, by path on the FAT file system.
    pub files: Vec<FileRecord>,
    /// Overlay, home and swap as written: names and sizes, never hashes.
    pub persistence: Vec<PersistRecord>,
    /// The BIOS boot code outside every file, as the last write with BIOS boot put
    /// it there. Absent when no write installed it (UEFI only), and on sticks
    /// written before livestick recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootRecord>,
}

/// The boot code a write put where no file is, hashed as written, so that `verify`
/// reads it back like the files: a stick whose loader's first sectors were
/// overwritten boots nothing on BIOS while every file still reads intact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootRecord {
    /// sha256 of the MBR boot code: the disk's first 440 bytes (SYSLINUX's
    /// `mbr.bin`, or `gptmbr.bin` on a GPT stick).
    pub mbr_code_sha256: String,
    /// sha256 of the FAT partition's boot sector without its parameter block
    /// ([`fat::BOOT_SECTOR_PARAMETERS`]): SYSLINUX's code, which finds
    /// `ldlinux.sys`. The parameters (label, serial) are the file system's and may
    /// change by design.
    pub boot_sector_code_sha256: String,
}

/// What a write installed for BIOS boot beside the files it copied: SYSLINUX's
/// loader files (path, size, sha256), recorded as files of kind `loader`, and the
/// boot code outside them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootWritten {
    pub loader_files: Vec<(String, u64, String)>,
    pub record: BootRecord,
}

impl BootRecord {
    /// The record of `mbr_code` (the 440 bytes of code) and of the partition boot
    /// sector `boot_sector` as written.
    pub fn of(mbr_code: &[u8], boot_sector: &[u8]) -> BootRecord {
        BootRecord {
            mbr_code_sha256: mbr_code_sha256(mbr_code),
            boot_sector_code_sha256: boot_sector_code_sha256(boot_sector),
        }
    }
}

/// The sha256 [`BootRecord::mbr_code_sha256`] holds, of the disk's first sector.
pub fn mbr_code_sha256(first_sector: &[u8]) -> String {
    hex(&Sha256::digest(
        &first_sector[..first_sector.len().min(440)],
    ))
}

/// The sha256 [`BootRecord::boot_sector_code_sha256`] holds, of a partition's
/// boot sector (512 bytes).
pub fn boot_sector_code_sha256(sector: &[u8]) -> String {
    let sector = &sector[..sector.len().min(512)];
    let params = fat::BOOT_SECTOR_PARAMETERS;
    let mut hasher = Sha256::new();
    hasher.update(&sector[..params.start.min(sector.len())]);
    hasher.update(sector.get(params.end..).unwrap_or_default());
    hex(&hasher.finalize())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub live_dir: String,
    pub source: SourceRecord,
    pub written_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRecord {
    /// The ISO's file name (or the source stick's path).
    pub name: String,
    pub size: Option<u64>,
    /// sha256 of the whole ISO, when a write computed it.
    pub sha256: Option<String>,
    /// The MD5 implanted in the ISO, when it has one.
    pub implanted_md5: Option<String>,
    /// The ISO's volume label.
    pub label: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutRecord {
    /// `mbr` or `gpt`.
    pub table: String,
    pub partition_start: u64,
    pub partition_len: u64,
    pub fs_label: String,
    /// The FAT volume serial, as dracut's `UUID=` names it (`B494-8509`).
    pub fs_uuid: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub path: String,
    pub size: u64,
    pub sha256: String,
    /// Where the bytes came from: the path inside the ISO for copied files; `None` for
    /// rendered boot configurations and files from the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iso_path: Option<String>,
    /// `copied`, `config` or `merged` (a root image `overlay merge` rebuilt).
    pub kind: String,
    /// `ext4` for a file of the ext4 live partition (the layout for persistence over
    /// 4 GiB), read there by its extents; absent for a file on the FAT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<String>,
    /// For the root image as `write` copied it: the sha256 of its first and last
    /// 64 KiB (`checksum::ends_sha256`), which ties this record to the copy on the
    /// stick cheaply (the same-ISO rewrite reads 128 KiB, not the image). Absent for
    /// every other file and for a merged image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ends_sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistRecord {
    pub path: String,
    /// `overlay`, `home` or `swap`.
    pub kind: String,
    pub size: u64,
}

#[derive(Debug, Error)]
pub enum ManifestError {
    #[error(
        "{stick} has no livestick manifest (LiveOS/{FILE_NAME}): it was written by an older livestick or by another tool, so there is no record to verify against"
    )]
    Missing { stick: PathBuf },
    #[error("the manifest {path} on {stick} cannot be read: {reason}")]
    Damaged {
        stick: PathBuf,
        path: String,
        reason: String,
    },
    #[error(
        "the manifest {path} on {stick} has schema {found}; this livestick reads schema {SCHEMA} — update livestick"
    )]
    NewerSchema {
        stick: PathBuf,
        path: String,
        found: u32,
    },
    #[error(
        "{stick} is not a stick livestick wrote: {reason}; there is no manifest to verify against"
    )]
    NotAStick { stick: PathBuf, reason: String },
    #[error(transparent)]
    Stick(StickError),
    #[error("the passphrase does not unlock {path} on {stick}: {detail}")]
    Passphrase {
        stick: PathBuf,
        path: String,
        detail: String,
    },
    #[error("replacing the manifest: {0}")]
    Replace(crate::persist::merge::replace::ReplaceError),
    #[error("{step}: {source}")]
    Io {
        step: String,
        #[source]
        source: io::Error,
    },
}

impl crate::error::Classify for ManifestError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            ManifestError::Missing { .. }
            | ManifestError::Damaged { .. }
            | ManifestError::NewerSchema { .. }
            | ManifestError::NotAStick { .. }
            | ManifestError::Passphrase { .. } => ErrorKind::BadInput,
            ManifestError::Stick(source) => source.kind(),
            ManifestError::Replace(source) => source.kind(),
            ManifestError::Io { .. } => ErrorKind::Io,
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            ManifestError::Missing { .. } => {
                "rewrite the stick with this livestick (`livestick write ISO STICK`) to give it a manifest; `livestick overlay status` and `livestick home info` still report its persistence"
            }
            ManifestError::Damaged { .. } => {
                "the record itself is damaged, so nothing on the stick can be trusted to be what was written: rewrite the stick"
            }
            ManifestError::Passphrase { .. } => {
                "give the home's passphrase with --passphrase-file FILE (its bytes exactly, one final newline dropped), or leave it out: verify then reports the encrypted home as not checked"
            }
            ManifestError::Stick(source) => source.hint(),
            ManifestError::Replace(source) => source.hint(),
            _ => self.kind().hint(),
        }
    }
}

/// The stick is not what was written: exit 4 (docs/exit-codes.md), after the
/// report has been printed.
#[derive(Debug, Error)]
#[error("{stick}: {summary}")]
pub struct NotIntact {
    pub stick: String,
    pub summary: String,
}

impl crate::error::Classify for NotIntact {
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::Io
    }

    fn hint(&self) -> &'static str {
        "the files listed as changed or missing are not what was written: the stick is failing or was changed by something else — rewrite it (`livestick write ISO STICK`), or replace it if the check fails again"
    }
}

/// The manifest as stored: pretty JSON, one file per line of `files`.
pub fn render(manifest: &Manifest) -> String {
    let mut text = serde_json::to_string_pretty(manifest).unwrap_or_default();
    text.push('\n');
    text
}

/// Reads a stored manifest; `Err` names what is wrong with it.
pub fn parse(bytes: &[u8]) -> Result<Manifest, String> {
    #[derive(Deserialize)]
    struct Version {
        schema: u32,
    }
    let version: Version = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if version.schema > SCHEMA {
        return Err(format!("schema {}", version.schema));
    }
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

/// Now, in UTC, as RFC 3339 (`2026-12-06T12:07:20Z`).
pub fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    utc_text(secs)
}

/// What one write adds: its image, its layout, the files it wrote and its
/// persistence files.
pub struct WriteRecord {
    pub image: ImageRecord,
    pub layout: LayoutRecord,
    pub files: Vec<FileRecord>,
    pub persistence: Vec<PersistRecord>,
    pub boot: Option<BootRecord>,
}

/// The record of `plan` once written: `written` holds each file's path, size and
/// sha256 as `apply` hashed it while writing; `boot` what it installed for BIOS
/// boot, when it is known by then.
pub fn record_of_write<'a>(
    plan: &Plan,
    written: impl IntoIterator<Item = (&'a str, u64, String)>,
    boot: Option<&BootWritten>,
    now: &str,
) -> WriteRecord {
    let iso_path_of = |dest: &str| {
        plan.copies
            .iter()
            .find(|c| c.dest.eq_ignore_ascii_case(dest))
            .and_then(|c| match &c.source {
                crate::plan::CopySource::Iso { path } => Some(path.clone()),
                crate::plan::CopySource::Host { .. } => None,
            })
    };
    let is_config = |dest: &str| {
        plan.configs
            .iter()
            .any(|c| c.dest.eq_ignore_ascii_case(dest))
    };
    let mut files: Vec<FileRecord> = written
        .into_iter()
        .map(|(path, size, sha256)| FileRecord {
            path: path.to_string(),
            size,
            sha256,
            iso_path: iso_path_of(path),
            kind: if is_config(path) { "config" } else { "copied" }.to_string(),
            filesystem: None,
            ends_sha256: None,
        })
        .collect();
    if let Some(boot) = boot {
        files.extend(boot.loader_files.iter().map(loader_record));
    }
    let mut persistence = Vec::new();
    if let Some(o) = &plan.overlay {
        persistence.push(persist(&o.path, "overlay", o.size));
    } else if let Some(k) = &plan.kept_overlay {
        persistence.push(persist(&k.to, "overlay", k.size));
    }
    if let Some(h) = &plan.home {
        persistence.push(persist(&h.path, "home", h.size));
    }
    if let Some(s) = &plan.swap {
        persistence.push(persist(&s.path, "swap", s.size));
    }
    let name = plan
        .source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| plan.source.display().to_string());
    WriteRecord {
        image: ImageRecord {
            live_dir: plan.live_dir.clone(),
            source: SourceRecord {
                name,
                size: std::fs::metadata(&plan.source)
                    .ok()
                    .filter(|m| m.is_file())
                    .map(|m| m.len()),
                sha256: None,
                implanted_md5: plan.root_record.as_ref().and_then(|r| r.iso_md5.clone()),
                label: plan.source_label.clone(),
            },
            written_at: now.to_string(),
        },
        layout: LayoutRecord {
            table: plan.table.to_string().to_ascii_lowercase(),
            partition_start: plan.partition_start,
            partition_len: plan.partition_len,
            fs_label: plan.label.clone(),
            fs_uuid: plan.fs_uuid.clone(),
        },
        files,
        persistence,
        boot: boot.map(|b| b.record.clone()),
    }
}

fn loader_record((path, size, sha256): &(String, u64, String)) -> FileRecord {
    FileRecord {
        path: path.clone(),
        size: *size,
        sha256: sha256.clone(),
        iso_path: None,
        kind: "loader".to_string(),
        filesystem: None,
        ends_sha256: None,
    }
}

fn persist(path: &str, kind: &str, size: u64) -> PersistRecord {
    PersistRecord {
        path: path.to_string(),
        kind: kind.to_string(),
        size,
    }
}

/// The manifest after a write: the write's record, plus what the previous manifest
/// (if any) said about files this write left alone. `on_stick` gives the size a
/// path has on the stick now (`None`: gone); an old entry survives only if its file
/// is still there with the recorded size and the write neither rewrote nor deleted
/// it — the write's deletes have already happened when this is called.
pub fn updated(
    previous: Option<Manifest>,
    write: WriteRecord,
    on_stick: impl Fn(&str) -> Option<u64>,
    now: &str,
) -> Manifest {
    let same = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
    let mut files = write.files;
    let mut persistence = write.persistence;
    let mut images = vec![write.image];
    // A write without BIOS boot leaves the boot code where it was.
    let mut boot = write.boot;
    if let Some(old) = previous {
        boot = boot.or(old.boot);
        let kept: Vec<FileRecord> = old
            .files
            .into_iter()
            .filter(|f| !files.iter().any(|n| same(&n.path, &f.path)))
            .filter(|f| on_stick(&f.path) == Some(f.size))
            .collect();
        files.splice(0..0, kept);
        let kept_persist: Vec<PersistRecord> = old
            .persistence
            .into_iter()
            .filter(|p| !persistence.iter().any(|n| same(&n.path, &p.path)))
            .filter_map(|mut p| {
                p.size = on_stick(&p.path)?;
                Some(p)
            })
            .collect();
        persistence.splice(0..0, kept_persist);
        let live_dir = images[0].live_dir.clone();
        images.splice(
            0..0,
            old.images
                .into_iter()
                .filter(|i| !same(&i.live_dir, &live_dir)),
        );
    }
    Manifest {
        schema: SCHEMA,
        livestick_version: env!("CARGO_PKG_VERSION").to_string(),
        updated_at: now.to_string(),
        images,
        layout: write.layout,
        files,
        persistence,
        boot,
    }
}

/// Where the manifest of the FAT file system `fs` is: `/LiveOS/livestick.json`, or
/// the one in another top-level directory (`--livedir`).
pub fn find<F: Read + Write + Seek>(fs: &FatFs<'_, F>) -> Option<String> {
    let preferred = format!("/LiveOS/{FILE_NAME}");
    if fat::exists(fs, &preferred) {
        return Some(preferred);
    }
    fat::list_dir(fs, "")
        .into_iter()
        .filter(|e| e.is_dir)
        .map(|e| format!("{}/{FILE_NAME}", e.path.trim_end_matches('/')))
        .find(|path| fat::exists(fs, path))
}

/// Reads the manifest of `fs`, if it has a readable one.
pub fn read<F: Read + Write + Seek>(fs: &FatFs<'_, F>) -> Option<(String, Manifest)> {
    let path = find(fs)?;
    let bytes = fat::read_file(fs, &path).ok()?;
    parse(&bytes).ok().map(|m| (path, m))
}

/// Writes the manifest of a write that just put its files on `fs`: called by
/// `apply` after the copies and configs, before the read-back (which then checks
/// the manifest's own bytes with the other metadata). `written` as in
/// [`record_of_write`].
pub fn write_after_apply<'a, F: Read + Write + Seek>(
    fs: &FatFs<'_, F>,
    plan: &Plan,
    written: impl IntoIterator<Item = (&'a str, u64, String)>,
    boot: Option<&BootWritten>,
) -> Result<String, fat::FatError> {
    write_after_apply_with_ext4(fs, plan, written, &[], &[], boot)
}

/// [`write_after_apply`] on the ext4 live layout: the manifest stays on the FAT
/// (where `verify` and every other livestick look for it first, and where the
/// boot files it lists are), and also lists the files written into the ext4
/// partition (`ext4_written`: path, size, sha256), marked `filesystem: ext4`.
/// `ext4_now` lists the ext4 partition's files as they are after the write, so
/// that the entries of files the write left there stay.
pub fn write_after_apply_with_ext4<'a, F: Read + Write + Seek>(
    fs: &FatFs<'_, F>,
    plan: &Plan,
    written: impl IntoIterator<Item = (&'a str, u64, String)>,
    ext4_written: &'a [(String, u64, String)],
    ext4_now: &[(String, u64)],
    boot: Option<&BootWritten>,
) -> Result<String, fat::FatError> {
    let now = now_utc();
    let mut record = record_of_write(
        plan,
        written.into_iter().chain(
            ext4_written
                .iter()
                .map(|(path, size, sum)| (path.as_str(), *size, sum.clone())),
        ),
        boot,
        &now,
    );
    for f in &mut record.files {
        if ext4_written
            .iter()
            .any(|(path, _, _)| path.eq_ignore_ascii_case(&f.path))
        {
            f.filesystem = Some("ext4".into());
        }
    }
    let previous = read(fs);
    let path = match &previous {
        // `--multi` or a rewrite: one manifest per stick, where it already is.
        Some((path, _)) => path.clone(),
        None => format!("/{}/{FILE_NAME}", plan.live_dir.trim_matches('/')),
    };
    let files = fat::walk_files(fs, "")?;
    let on_stick = |p: &str| {
        files
            .iter()
            .map(|e| (&e.path, e.size))
            .chain(ext4_now.iter().map(|(path, size)| (path, *size)))
            .find(|(path, _)| path.eq_ignore_ascii_case(p))
            .map(|(_, size)| size)
    };
    // The root image's record (what `.livestick` held before): its ends' hash, read
    // back through the file system that just wrote it. On the ext4 layout the record
    // stays beside the image in the ext4 partition.
    if let Some(step) = &plan.root_record
        && let Some(entry) = record
            .files
            .iter_mut()
            .find(|f| f.path.eq_ignore_ascii_case(&step.root_image) && f.filesystem.is_none())
    {
        let read_err = |source| fat::FatError::File {
            path: step.root_image.clone(),
            source,
        };
        let mut image = fs
            .root_dir()
            .open_file(step.root_image.trim_start_matches('/'))
            .map_err(read_err)?;
        entry.ends_sha256 =
            Some(crate::source::checksum::ends_sha256(&mut image, entry.size).map_err(read_err)?);
    }
    if let Some(home) = &plan.kept_home
        && let Some(size) = on_stick(home)
    {
        record.persistence.push(persist(home, "home", size));
    }
    let manifest = updated(previous.map(|(_, m)| m), record, on_stick, &now);
    let text = render(&manifest);
    fat::write_file(fs, &path, &mut text.as_bytes(), text.len() as u64, |_| {})?;
    Ok(path)
}

/// After a write whose BIOS boot was installed once its manifest was written (on a
/// stick it did not format, SYSLINUX's installer runs last): the manifest on `fs`
/// gets the loader files and boot code as installed. `Ok(false)` when `fs` has no
/// readable manifest.
pub fn record_boot<F: Read + Write + Seek>(
    fs: &FatFs<'_, F>,
    boot: &BootWritten,
) -> Result<bool, fat::FatError> {
    let Some((path, mut manifest)) = read(fs) else {
        return Ok(false);
    };
    let loaders: Vec<FileRecord> = boot.loader_files.iter().map(loader_record).collect();
    manifest
        .files
        .retain(|f| !loaders.iter().any(|l| l.path.eq_ignore_ascii_case(&f.path)));
    manifest.files.extend(loaders);
    manifest.boot = Some(boot.record.clone());
    manifest.updated_at = now_utc();
    let text = render(&manifest);
    fat::write_file(fs, &path, &mut text.as_bytes(), text.len() as u64, |_| {})?;
    Ok(true)
}

/// After `overlay merge` swapped in a new root image: its entry now names the new
/// size and sha256 (kind `merged`, no ISO path: it no longer matches the ISO).
pub fn record_replacement(manifest: &mut Manifest, path: &str, size: u64, sha256: &str) {
    let entry = FileRecord {
        path: path.to_string(),
        size,
        sha256: sha256.to_string(),
        iso_path: None,
        kind: "merged".to_string(),
        filesystem: manifest
            .files
            .iter()
            .find(|f| f.path.eq_ignore_ascii_case(path))
            .and_then(|f| f.filesystem.clone()),
        ends_sha256: None,
    };
    match manifest
        .files
        .iter_mut()
        .find(|f| f.path.eq_ignore_ascii_case(path))
    {
        Some(f) => *f = entry,
        None => manifest.files.push(entry),
    }
}

/// After `home resize` (or any change of a persistence file's size): its record
/// names the new size, so that `verify` reports what the stick holds.
pub fn record_persistence_size(manifest: &mut Manifest, path: &str, kind: &str, size: u64) {
    match manifest
        .persistence
        .iter_mut()
        .find(|p| p.path.eq_ignore_ascii_case(path))
    {
        Some(p) => p.size = size,
        None => manifest.persistence.push(persist(path, kind, size)),
    }
}

/// [`record_replacement`] on the stick at `stick` (opened for writing through the
/// maintenance checks and `O_EXCL`): called after `overlay merge` swapped in a new
/// root image. `Ok(false)` when the stick has no manifest.
pub fn record_replacement_on_stick(
    stick: &Path,
    path: &str,
    size: u64,
    sha256: &str,
) -> Result<bool, ManifestError> {
    let mut opened = Stick::open(stick, true).map_err(ManifestError::Stick)?;
    rewrite_on_stick(&mut opened, |m| record_replacement(m, path, size, sha256))
}

/// Changes the manifest of an open stick with `change` and puts the result in place
/// the way `overlay merge` replaces the root image: written in full under
/// `<manifest>.new`, synced, then swapped in (`replace::swap_on_stick`, one sector
/// write where it can) and the old copy freed. A stop at any point leaves either
/// the old manifest or the new one whole, never a torn one; a leftover `.new` is
/// removed by the next rewrite. `Ok(false)` when the stick has no readable manifest
/// (it is left without one).
pub fn rewrite_on_stick(
    stick: &mut Stick,
    change: impl FnOnce(&mut Manifest),
) -> Result<bool, ManifestError> {
    let Some(staged) = stage_on_stick(stick, change)? else {
        return Ok(false);
    };
    failpoint("manifest-staged")?;
    replace::swap_on_stick(stick, &staged.target, &staged.staged)
        .map_err(ManifestError::Replace)?;
    let part = stick.partition.start;
    let path = stick.path.clone();
    let replace_err = |e| ManifestError::Replace(e);
    if replace::detach_shared_leftover(stick.file_mut(), part, &staged.staged)
        .map_err(|e| replace_err(e.into()))?
        .is_some()
    {
        stick
            .file_mut()
            .sync_all()
            .map_err(|source| ManifestError::Io {
                step: format!("syncing {}", path.display()),
                source,
            })?;
    }
    stick
        .with_fs(|fs| {
            fat::remove_all(fs, &staged.staged).map_err(|source| StickError::Fat {
                path: path.clone(),
                source,
            })
        })
        .map_err(ManifestError::Stick)?;
    Ok(true)
}

/// The first half of [`rewrite_on_stick`]: the manifest changed by `change` written
/// in full under `<manifest>.new` and synced (a leftover of that name replaced),
/// the manifest itself untouched. `Ok(None)` when the stick has no readable one.
pub fn stage_on_stick(
    stick: &mut Stick,
    change: impl FnOnce(&mut Manifest),
) -> Result<Option<Companion>, ManifestError> {
    let path = stick.path.clone();
    let fat_err = |source| StickError::Fat {
        path: path.clone(),
        source,
    };
    // with_fs syncs the staged copy when it closes the file system.
    stick
        .with_fs(|fs| {
            let Some((at, mut manifest)) = read(fs) else {
                return Ok(None);
            };
            change(&mut manifest);
            manifest.updated_at = now_utc();
            manifest.livestick_version = env!("CARGO_PKG_VERSION").to_string();
            let text = render(&manifest);
            let staged = format!("{at}.new");
            fat::remove_all(fs, &staged).map_err(fat_err)?;
            if let Err(e) =
                fat::write_file(fs, &staged, &mut text.as_bytes(), text.len() as u64, |_| {})
            {
                // A stick with no room left (ENOSPC) keeps no empty or partial copy:
                // the manifest stays as it was, and nothing is left to explain.
                let _ = fat::remove_all(fs, &staged);
                return Err(fat_err(e));
            }
            Ok(Some(Companion { target: at, staged }))
        })
        .map_err(ManifestError::Stick)
}

/// `overlay merge`'s `located::StageCompanion`: the manifest naming the new root
/// image, staged on the stick so that the merge swaps it in with the image (and the
/// repair every command runs first finishes that after a stop in between).
pub fn stage_root_replacement(
    stick: &mut Stick,
    root: &NewRoot<'_>,
) -> Result<Option<Companion>, String> {
    stage_on_stick(stick, |m| {
        record_replacement(m, root.path, root.size, root.sha256)
    })
    .map_err(|e| e.to_string())
}

/// Before `verify` reads a stick: the leftovers of a stopped replacement are
/// repaired first, as every command that changes a stick does (opened for writing
/// only when there are some), so that a merge stopped between swapping in its root
/// image and its manifest reads as the finished merge. Nothing else is written: a
/// volume only marked not cleanly closed or holding lost clusters, or a stick
/// with no manifest, is read as it is. The live directory is the manifest's.
/// Returns what was repaired, for stderr; a stick that cannot be repaired is read
/// as it is, and `verify` reports what it finds.
pub fn repair_before_verify(path: &Path) -> Vec<String> {
    // A stick read without a manifest: nothing livestick stopped, and verify
    // refuses it anyway. One that cannot be read as it is (a swap stopped half-way
    // shares a chain between two names) is repaired in the default live directory.
    let live_dir =
        match Stick::open(path, false).and_then(|mut stick| stick.with_fs(|fs| Ok(find(fs)))) {
            Ok(None) => return Vec::new(),
            Ok(Some(at)) => at
                .trim_start_matches('/')
                .split_once('/')
                .map_or_else(|| "LiveOS".to_string(), |(dir, _)| dir.to_string()),
            Err(_) => "LiveOS".to_string(),
        };
    replace::finish_stopped_replacement(path, &live_dir).unwrap_or_default()
}

/// `LIVESTICK_FAILPOINT=manifest-staged` stops a manifest rewrite after the new copy
/// is written beside the old and before the swap: the state a crash there leaves,
/// for the tests.
fn failpoint(step: &'static str) -> Result<(), ManifestError> {
    if std::env::var("LIVESTICK_FAILPOINT").as_deref() == Ok(step) {
        return Err(ManifestError::Io {
            step: format!(
                "rewriting the manifest: stopped at failpoint `{step}` (LIVESTICK_FAILPOINT)"
            ),
            source: io::Error::other("failpoint"),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// verify: read every listed file back from the stick

/// What `verify` found for one listed file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileState {
    Intact,
    Changed,
    Missing,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileCheck {
    pub path: String,
    pub state: FileState,
    #[serde(rename = "recorded_size_bytes")]
    pub recorded_size: u64,
    /// Size on the stick now (`None` when missing).
    #[serde(rename = "size_bytes")]
    pub size: Option<u64>,
    pub recorded_sha256: String,
    /// sha256 read from the stick now (`None` when missing or of another size).
    pub sha256: Option<String>,
    /// Why it is changed or missing, for people (JSON `null` when intact).
    pub detail: Option<String>,
}

/// What `verify` found for one piece of boot code outside every file.
#[derive(Debug, Clone, Serialize)]
pub struct BootCheck {
    /// `MBR boot code` or `partition boot sector`.
    pub area: String,
    /// `intact` or `changed`.
    pub state: FileState,
    pub recorded_sha256: String,
    pub sha256: String,
    /// Why it matters when changed, for people (JSON `null` when intact).
    pub detail: Option<String>,
}

/// A stick opened for `verify` with its manifest.
pub struct Verifiable {
    pub stick: Stick,
    pub manifest_path: String,
    pub manifest: Manifest,
    /// Every file on the FAT file system now (path, size), and on the ext4 layout
    /// every file of the ext4 live partition's live directory.
    pub files: Vec<(String, u64)>,
    /// The ext4 live partition, when the stick has that layout: the files listed
    /// in `ext4_files` are read there, by their extents.
    pub ext4: Option<crate::disk::ext4_fs::LivePartition>,
    pub ext4_files: Vec<String>,
}

/// A file being verified, read where it is: on the FAT by its clusters, on the
/// ext4 live partition by its extents (unwritten ones as zeros, as ext4 reads them).
trait ReadSeek: Read + Seek {}
impl<T: Read + Seek> ReadSeek for T {}

/// Opens `path` read-only and reads its manifest: `Missing` when there is none.
pub fn open_for_verify(path: &Path) -> Result<Verifiable, ManifestError> {
    let stick_err = ManifestError::Stick;
    // A file or device without a FAT partition (random bytes, an empty file,
    // another tool's layout) is the user's input, not a failing stick.
    let mut stick = Stick::open(path, false).map_err(|e| match e {
        StickError::Partition { source, .. }
            if !matches!(&source, PartitionError::Io(io) if io.kind() != io::ErrorKind::UnexpectedEof) =>
        {
            ManifestError::NotAStick {
                stick: path.to_path_buf(),
                reason: match source {
                    PartitionError::NoTable => "it has no partition table".to_string(),
                    PartitionError::NoFatPartition => {
                        "its partition table has no FAT partition".to_string()
                    }
                    PartitionError::Io(_) => "it is shorter than a partition table".to_string(),
                    other => other.to_string(),
                },
            }
        }
        other => ManifestError::Stick(other),
    })?;
    let found = stick
        .with_fs(|fs| {
            let files = fat::walk_files(fs, "").map_err(|source| StickError::Fat {
                path: path.to_path_buf(),
                source,
            })?;
            let manifest = find(fs).map(|p| {
                let bytes = fat::read_file(fs, &p).map_err(|e| e.to_string());
                (p, bytes)
            });
            Ok((files, manifest))
        })
        .map_err(stick_err)?;
    let (files, manifest) = found;
    let Some((manifest_path, bytes)) = manifest else {
        return Err(ManifestError::Missing {
            stick: path.to_path_buf(),
        });
    };
    let damaged = |reason: String| ManifestError::Damaged {
        stick: path.to_path_buf(),
        path: manifest_path.clone(),
        reason,
    };
    let bytes = bytes.map_err(damaged)?;
    let manifest = match parse(&bytes) {
        Ok(m) => m,
        Err(reason) => {
            #[derive(Deserialize)]
            struct Version {
                schema: u32,
            }
            if let Ok(v) = serde_json::from_slice::<Version>(&bytes)
                && v.schema > SCHEMA
            {
                return Err(ManifestError::NewerSchema {
                    stick: path.to_path_buf(),
                    path: manifest_path,
                    found: v.schema,
                });
            }
            return Err(damaged(reason));
        }
    };
    if let Some(reason) = what_a_write_always_records_is_missing(&manifest) {
        return Err(damaged(reason));
    }
    let mut files: Vec<(String, u64)> = files.into_iter().map(|e| (e.path, e.size)).collect();
    let (mut ext4, mut ext4_files) = (None, Vec::new());
    let live_dir = manifest.images.first().map_or("LiveOS".to_string(), |i| {
        i.live_dir.trim_matches('/').to_string()
    });
    let ext4_err = |e: crate::disk::ext4_fs::Ext4FsError| ManifestError::Io {
        step: format!("reading the ext4 live partition of {}", path.display()),
        source: io::Error::other(e.to_string()),
    };
    if let Some(live) =
        crate::disk::ext4_live::existing_live(stick.file_mut(), &live_dir).map_err(ext4_err)?
    {
        ext4 = crate::disk::ext4_fs::find_live_partition(stick.file_mut(), &live_dir)
            .map_err(ext4_err)?;
        ext4_files = live.files.iter().map(|(p, _)| p.clone()).collect();
        files.extend(live.files);
    }
    Ok(Verifiable {
        stick,
        manifest_path,
        manifest,
        files,
        ext4,
        ext4_files,
    })
}

/// The first path of `paths` that an earlier one names already (FAT compares
/// names without case).
fn listed_twice<'a>(paths: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let mut seen: Vec<&str> = Vec::new();
    for path in paths {
        if seen.iter().any(|s| s.eq_ignore_ascii_case(path)) {
            return Some(path);
        }
        seen.push(path);
    }
    None
}

/// Why `manifest` cannot be one a write made: every write records its image and
/// that image's root file system (`squashfs.img`, or an older ISO's `rootfs.img`),
/// so a manifest without them was emptied or cut, and would check nothing.
fn what_a_write_always_records_is_missing(manifest: &Manifest) -> Option<String> {
    if manifest.images.is_empty() {
        return Some("it records no image".into());
    }
    // A write lists each file once: a second entry would be checked and counted twice,
    // and one of the two cannot be what was written.
    let files = manifest.files.iter().map(|f| f.path.as_str());
    let persistence = manifest.persistence.iter().map(|p| p.path.as_str());
    if let Some(twice) = listed_twice(files).or_else(|| listed_twice(persistence)) {
        return Some(format!("it lists {twice} twice"));
    }
    for image in &manifest.images {
        let dir = image.live_dir.trim_matches('/').to_ascii_lowercase();
        let has_root = manifest.files.iter().any(|f| {
            let lower = f.path.trim_start_matches('/').to_ascii_lowercase();
            lower
                .strip_prefix(&format!("{dir}/"))
                .is_some_and(crate::layout::is_root_image_name)
        });
        if !has_root {
            return Some(format!(
                "it lists no root image of /{}/ (squashfs.img), which every write records",
                image.live_dir.trim_matches('/')
            ));
        }
    }
    None
}

impl Verifiable {
    /// `path` opened for reading where it is, and where it lies on the device when
    /// it is one written run (so that e2fsck can read it in place).
    fn open_file(&mut self, path: &str) -> Result<(Box<dyn ReadSeek + '_>, Option<u64>), String> {
        let on_ext4 = self.ext4_files.iter().any(|p| p.eq_ignore_ascii_case(path));
        if let (true, Some(partition)) = (on_ext4, &self.ext4) {
            let map = {
                let mut window = crate::io::PartitionWindow::new(
                    self.stick.file_mut(),
                    partition.start,
                    partition.len,
                );
                partition
                    .fs
                    .file(&mut window, path)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("{path} is not on the ext4 live partition"))?
            };
            let partition = partition.clone();
            let file =
                crate::disk::ext4_fs::Ext4FileRw::new(self.stick.file_mut(), &partition, &map);
            let at = file.contiguous_offset();
            return Ok((Box::new(file), at));
        }
        let extents = self.stick.file_extents(path).map_err(|e| e.to_string())?;
        let on_stick: u64 = extents.iter().map(|e| e.1).sum();
        let size = self
            .files
            .iter()
            .find(|(p, _)| p.eq_ignore_ascii_case(path))
            .map_or(0, |(_, s)| *s);
        if on_stick < size {
            return Err(format!(
                "its cluster chain holds {on_stick} of its {size} bytes"
            ));
        }
        let file = ExtentFile::new(self.stick.file_mut(), &extents);
        let at = file.contiguous_offset();
        Ok((Box::new(file), at))
    }
}

impl Verifiable {
    /// Reads every listed file from the device, page cache dropped first so that
    /// the bytes come from the stick, not from memory; `progress` gets byte counts.
    pub fn check_files(
        &mut self,
        mut progress: impl FnMut(u64),
    ) -> Result<Vec<FileCheck>, ManifestError> {
        let kind = self.stick.probe.kind;
        target::sync_and_drop_cache(self.stick.file_mut(), kind).map_err(|source| {
            ManifestError::Io {
                step: format!("dropping the page cache of {}", self.stick.path.display()),
                source,
            }
        })?;
        let records = self.manifest.files.clone();
        let mut checks = Vec::with_capacity(records.len());
        for record in records {
            let now = self
                .files
                .iter()
                .find(|(p, _)| p.eq_ignore_ascii_case(&record.path))
                .map(|(_, s)| *s);
            let mut check = FileCheck {
                path: record.path.clone(),
                state: FileState::Intact,
                recorded_size: record.size,
                size: now,
                recorded_sha256: record.sha256.clone(),
                sha256: None,
                detail: None,
            };
            match now {
                None => {
                    check.state = FileState::Missing;
                    check.detail = Some("not on the stick".into());
                }
                Some(size) if size != record.size => {
                    check.state = FileState::Changed;
                    check.detail = Some(format!(
                        "{size} bytes on the stick, {} written{}",
                        record.size,
                        if size < record.size {
                            " (truncated)"
                        } else {
                            ""
                        }
                    ));
                }
                Some(size) => match self.sha256_of(&record.path, size, &mut progress) {
                    Ok(sum) => {
                        if sum != record.sha256 {
                            check.state = FileState::Changed;
                            check.detail = Some("its bytes differ from what was written".into());
                        }
                        check.sha256 = Some(sum);
                    }
                    Err(e) => {
                        check.state = FileState::Changed;
                        check.detail = Some(format!("could not be read back: {e}"));
                    }
                },
            }
            checks.push(check);
        }
        Ok(checks)
    }

    fn sha256_of(
        &mut self,
        path: &str,
        size: u64,
        progress: &mut impl FnMut(u64),
    ) -> Result<String, String> {
        let (mut reader, _) = self.open_file(path)?;
        let mut hasher = Sha256::new();
        // Large requests, as the write's read-back makes: a USB bus streams them.
        let mut buf = vec![0u8; 4 << 20];
        let mut left = size;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            reader
                .read_exact(&mut buf[..want])
                .map_err(|e| e.to_string())?;
            hasher.update(&buf[..want]);
            progress(want as u64);
            left -= want as u64;
        }
        Ok(hex(&hasher.finalize()))
    }

    /// Reads the boot code the manifest records back from the stick: the MBR's and
    /// the partition boot sector's. `None` when the manifest records none (a UEFI-only
    /// stick, or one written before livestick recorded it). Read after
    /// [`Self::check_files`], so past the page cache it dropped.
    pub fn check_boot(&mut self) -> Result<Option<Vec<BootCheck>>, ManifestError> {
        let Some(record) = self.manifest.boot.clone() else {
            return Ok(None);
        };
        let partition = self.stick.partition.start;
        let shown = self.stick.path.display().to_string();
        let read = |file: &mut File, at: u64, what: &str| {
            crate::io::read_at(file, at, 512).map_err(|source| ManifestError::Io {
                step: format!("reading the {what} of {shown}"),
                source,
            })
        };
        let mbr = read(self.stick.file_mut(), 0, "MBR")?;
        let sector = read(self.stick.file_mut(), partition, "partition boot sector")?;
        let check = |area: &str, recorded: &str, now: String, what_breaks: &str| {
            let intact = now == recorded;
            BootCheck {
                area: area.to_string(),
                state: if intact {
                    FileState::Intact
                } else {
                    FileState::Changed
                },
                recorded_sha256: recorded.to_string(),
                sha256: now,
                detail: (!intact)
                    .then(|| format!("its bytes differ from what was written: {what_breaks}")),
            }
        };
        Ok(Some(vec![
            check(
                "MBR boot code",
                &record.mbr_code_sha256,
                mbr_code_sha256(&mbr),
                "BIOS cannot start the stick's boot loader",
            ),
            check(
                "partition boot sector",
                &record.boot_sector_code_sha256,
                boot_sector_code_sha256(&sector),
                "BIOS cannot find ldlinux.sys",
            ),
        ]))
    }

    /// The device or image being verified.
    pub fn file(&mut self) -> &mut File {
        self.stick.file_mut()
    }
}

/// What `verify` says about one persistence file: reported, never hashed.
#[derive(Debug, Clone, Serialize)]
pub struct PersistCheck {
    pub path: String,
    /// `overlay`, `home` or `swap`.
    pub kind: String,
    #[serde(rename = "size_bytes")]
    pub size: u64,
    /// The size the manifest recorded, when it lists the file.
    #[serde(rename = "recorded_size_bytes")]
    pub recorded_size: Option<u64>,
    /// What its format says, as `overlay status` and `home info` report it.
    pub status: String,
    /// Bytes of changes or data it holds, when readable.
    #[serde(rename = "used_bytes")]
    pub used: Option<u64>,
    /// False when its format could not be read or the check found problems.
    pub ok: bool,
    /// The file-system-level check (`--deep`): `None` (JSON `null`) without `--deep`.
    pub deep: Option<DeepCheck>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeepCheck {
    /// `Some(true)` clean, `Some(false)` problems found, `None` not checked.
    pub clean: Option<bool>,
    pub detail: String,
}

impl Verifiable {
    /// The overlay, home and swap files in each live directory the manifest names,
    /// as found on the stick now. With `deep`, `e2fsck -fn` runs on each ext4 (home,
    /// OverlayFS overlay) in place through `device?offset=N` (read-only), and a
    /// dm-snapshot store's exceptions are all read and validated.
    /// `passphrase` unlocks an encrypted home for `deep`'s e2fsck; one that does not
    /// unlock it is the user's mistake (`Err`), not a problem of the stick.
    pub fn check_persistence(
        &mut self,
        deep: bool,
        passphrase: Option<&[u8]>,
    ) -> Result<Vec<PersistCheck>, ManifestError> {
        let mut dirs: Vec<String> = self
            .manifest
            .images
            .iter()
            .map(|i| format!("/{}/", i.live_dir.trim_matches('/')).to_ascii_lowercase())
            .collect();
        dirs.dedup();
        let found: Vec<(String, u64, &'static str)> = self
            .files
            .iter()
            .filter_map(|(path, size)| {
                let lower = path.to_ascii_lowercase();
                let (dir, name) = lower.rsplit_once('/')?;
                if !dirs.iter().any(|d| d.trim_end_matches('/') == dir) {
                    return None;
                }
                let kind = if crate::layout::is_overlay_name(name) {
                    "overlay"
                } else if name == crate::layout::HOME {
                    "home"
                } else if name == crate::layout::SWAP {
                    "swap"
                } else {
                    return None;
                };
                Some((path.clone(), *size, kind))
            })
            .collect();
        let mut checks = Vec::new();
        for (path, size, kind) in found {
            checks.push({
                let recorded_size = self
                    .manifest
                    .persistence
                    .iter()
                    .find(|p| p.path.eq_ignore_ascii_case(&path))
                    .map(|p| p.size);
                let mut check = PersistCheck {
                    path: path.clone(),
                    kind: kind.to_string(),
                    size,
                    recorded_size,
                    status: String::new(),
                    used: None,
                    ok: true,
                    deep: None,
                };
                match self.describe(&mut check, deep, passphrase) {
                    Ok(()) => {}
                    Err(PersistProblem::Unreadable(e)) => {
                        check.ok = false;
                        check.status = format!("could not be read: {e}");
                    }
                    Err(PersistProblem::Refused(e)) => return Err(e),
                }
                // A file cut short (or grown behind the manifest's back) is not the
                // one written, whatever its format still says.
                if let Some(recorded) = recorded_size.filter(|&r| r != size) {
                    check.ok = false;
                    check.status = format!(
                        "{} bytes, but {recorded} were written ({}); {}",
                        size,
                        if size < recorded {
                            "cut short: what lay past its end is gone"
                        } else {
                            "changed since"
                        },
                        check.status
                    );
                }
                check
            });
        }
        // What the manifest records and the stick no longer has.
        for record in &self.manifest.persistence {
            if checks
                .iter()
                .any(|c| c.path.eq_ignore_ascii_case(&record.path))
            {
                continue;
            }
            checks.push(PersistCheck {
                path: record.path.clone(),
                kind: record.kind.clone(),
                size: 0,
                recorded_size: Some(record.size),
                status: "missing: the manifest records it, the stick does not have it".into(),
                used: None,
                ok: false,
                deep: None,
            });
        }
        Ok(checks)
    }

    fn describe(
        &mut self,
        check: &mut PersistCheck,
        deep: bool,
        passphrase: Option<&[u8]>,
    ) -> Result<(), PersistProblem> {
        use crate::persist::{home, overlay::store, snapshot};
        let device = self.stick.path.clone();
        let (mut file, at) = self.open_file(&check.path)?;
        let in_place = at
            .filter(|_| !device.as_os_str().to_string_lossy().contains('?'))
            .map(|offset| format!("{}?offset={offset}", device.display()));
        // e2fsck reads a file in place only when it is one run on the device; one in
        // pieces (fragmented on the FAT, or any file of the ext4 live layout) is
        // checked on a copy.
        let size = check.size;
        let fsck = |file: &mut Box<dyn ReadSeek + '_>| match &in_place {
            Some(spec) => e2fsck_read_only(spec),
            None => e2fsck_on_copy(file, size),
        };
        match check.kind.as_str() {
            "overlay" if store::is_ext4(&mut file) => {
                let info =
                    store::overlay_info(&mut file).ok_or("its ext4 superblock cannot be read")?;
                check.used = Some(info.used_bytes);
                check.status = format!(
                    "OverlayFS overlay (ext4): {} of {} used",
                    crate::size::human(info.used_bytes),
                    crate::size::human(info.size_bytes)
                );
                if deep {
                    check.deep = Some(fsck(&mut file));
                }
            }
            "overlay" => {
                let status =
                    snapshot::status(&mut file, check.size, snapshot::LIVEOS_CHUNK_SECTORS, None)
                        .map_err(|e| e.to_string())?;
                let used =
                    status.exceptions * u64::from(status.chunk_sectors) * snapshot::SECTOR_BYTES;
                check.used = Some(used);
                check.ok = status.state != "invalid" && status.problems.is_empty();
                check.status = format!(
                    "dm-snapshot overlay: {}, {} chunks changed ({:.1}% used){}{}",
                    status.state,
                    status.exceptions,
                    status.percent_used,
                    if status.problems.is_empty() {
                        String::new()
                    } else {
                        format!("; problems: {}", status.problems.join("; "))
                    },
                    // The stick is not failing: the overlay ran full. Rewriting it
                    // would throw the changes away; recover keeps them.
                    if status.state == "invalid" {
                        "; the kernel marked it Invalid (it ran full): `livestick overlay recover STICK` makes it usable again and keeps its changes"
                    } else {
                        ""
                    }
                );
                if deep {
                    check.deep = Some(DeepCheck {
                        clean: Some(status.problems.is_empty()),
                        detail: if status.problems.is_empty() {
                            format!(
                                "every metadata area read: {} exceptions, all in range and distinct",
                                status.exceptions
                            )
                        } else {
                            status.problems.join("; ")
                        },
                    });
                }
            }
            "home" => match home::detect_home_kind(&mut file).map_err(|e| e.to_string())? {
                Some(home::HomeKind::Plain) => {
                    let info = crate::disk::ext4::Ext4Info::read_from(&mut file)
                        .map_err(|e| e.to_string())?;
                    check.used = Some(info.used_bytes);
                    check.status = format!(
                        "plain ext4 home: {} of {} used",
                        crate::size::human(info.used_bytes),
                        crate::size::human(info.size_bytes)
                    );
                    if deep {
                        check.deep = Some(fsck(&mut file));
                    }
                }
                Some(home::HomeKind::Luks2) => match (deep, passphrase) {
                    (true, Some(pass)) => {
                        let unlocked = luks_deep_check(&mut file, pass).map_err(|e| {
                            PersistProblem::Refused(ManifestError::Passphrase {
                                stick: device.clone(),
                                path: check.path.clone(),
                                detail: e.to_string(),
                            })
                        })?;
                        check.status = match &unlocked.fs {
                            Some(info) => format!(
                                "encrypted home (LUKS2), unlocked: ext4, {} of {} used",
                                crate::size::human(info.used_bytes),
                                crate::size::human(info.size_bytes)
                            ),
                            None => "encrypted home (LUKS2), unlocked: no ext4 inside".into(),
                        };
                        check.used = unlocked.fs.map(|i| i.used_bytes);
                        check.deep = Some(unlocked.check);
                    }
                    (true, None) => {
                        check.status = "encrypted home (LUKS2), locked".into();
                        check.deep = Some(DeepCheck {
                            clean: None,
                            detail: "not checked: the home is encrypted and no passphrase was given; add --passphrase-file FILE (or --passphrase-stdin) to unlock it in memory for e2fsck -fn".into(),
                        });
                    }
                    (false, _) => check.status = "encrypted home (LUKS2), locked".into(),
                },
                None => {
                    check.ok = false;
                    check.status = "neither ext4 nor LUKS: not a usable home".into();
                }
            },
            _ => {
                let mut page = vec![0u8; 4096];
                let n = crate::io::read_full(&mut file, &mut page).map_err(|e| e.to_string())?;
                let signed = n == page.len() && &page[4086..] == b"SWAPSPACE2";
                check.ok = signed;
                check.status = if signed {
                    "swap (signature present)".into()
                } else {
                    "no swap signature: the system will not use it".into()
                };
            }
        }
        if let Some(d) = &check.deep
            && d.clean == Some(false)
        {
            check.ok = false;
        }
        Ok(())
    }
}

/// Why a persistence file's report stopped.
enum PersistProblem {
    /// Its format cannot be read: reported as a problem of the stick.
    Unreadable(String),
    /// The user's input is wrong (a passphrase that does not unlock the home).
    Refused(ManifestError),
}

impl From<String> for PersistProblem {
    fn from(e: String) -> Self {
        PersistProblem::Unreadable(e)
    }
}

impl From<&str> for PersistProblem {
    fn from(e: &str) -> Self {
        PersistProblem::Unreadable(e.to_string())
    }
}

/// An encrypted home unlocked for `verify --deep`.
struct UnlockedCheck {
    fs: Option<crate::disk::ext4::Ext4Info>,
    check: DeepCheck,
}

/// Unlocks the LUKS2 home with livestick's own reader and runs `e2fsck -fn` on the
/// plaintext, which is decrypted into memory only (a memfd no file system names,
/// gone with the process), within the memory limit `home resize` keeps. `Err` only
/// when the passphrase does not unlock it (or the header cannot be read).
fn luks_deep_check<R: Read + Seek>(
    file: R,
    passphrase: &[u8],
) -> Result<UnlockedCheck, crate::persist::luks::LuksError> {
    use crate::persist::{home, luks};
    let mut vol = luks::open_luks2(file, passphrase)?;
    let fs = crate::disk::ext4::Ext4Info::read_from(&mut vol).ok();
    let not_checked = |why: String| UnlockedCheck {
        fs: fs.clone(),
        check: DeepCheck {
            clean: None,
            detail: format!("not checked: {why}"),
        },
    };
    let plain = vol.len();
    if let Err(e) = home::check_staging_memory(home::luks_staging_bytes(plain, plain)) {
        return Ok(not_checked(e.to_string()));
    }
    let (mut staged, staged_path) = match home::memory_stage() {
        Ok(stage) => stage,
        Err(e) => return Ok(not_checked(e.to_string())),
    };
    // Zeros stay holes: they cost no memory.
    let mut buf = zeroize::Zeroizing::new(vec![0u8; 1 << 20]);
    let copied = copy_keeping_holes(&mut vol, &mut staged, plain, &mut buf);
    if let Err(e) = copied {
        return Ok(not_checked(format!(
            "decrypting it into memory failed: {e}"
        )));
    }
    let check = e2fsck_read_only(&staged_path.to_string_lossy());
    Ok(UnlockedCheck { fs, check })
}

/// Copies the first `size` bytes of `from` into `to` through `buf`, leaving each
/// buffer of zeros a hole in `to`, which ends `size` long.
fn copy_keeping_holes<R: Read + Seek + ?Sized>(
    from: &mut R,
    to: &mut File,
    size: u64,
    buf: &mut [u8],
) -> io::Result<()> {
    from.seek(io::SeekFrom::Start(0))?;
    let mut at = 0u64;
    while at < size {
        let n = (size - at).min(buf.len() as u64) as usize;
        from.read_exact(&mut buf[..n])?;
        if buf[..n].iter().any(|&b| b != 0) {
            to.seek(io::SeekFrom::Start(at))?;
            to.write_all(&buf[..n])?;
        }
        at += n as u64;
    }
    to.set_len(size)
}

/// `e2fsck -f -n` on a copy of `file` (`size` bytes) in a temporary file, for a
/// file that is not one run on the stick. Zeros stay holes in the copy.
fn e2fsck_on_copy(file: &mut dyn ReadSeek, size: u64) -> DeepCheck {
    let copy = (|| -> io::Result<tempfile::NamedTempFile> {
        let mut copy = tempfile::Builder::new()
            .prefix("livestick-verify-")
            .tempfile()?;
        copy_keeping_holes(file, copy.as_file_mut(), size, &mut vec![0u8; 1 << 20])?;
        Ok(copy)
    })();
    match copy {
        Ok(copy) => {
            let mut check = e2fsck_read_only(&copy.path().to_string_lossy());
            check.detail = format!(
                "{} (on a copy: the file lies in pieces on the stick)",
                check.detail
            );
            check
        }
        Err(e) => DeepCheck {
            clean: None,
            detail: format!(
                "not checked: the file lies in pieces on the stick, and copying it to a temporary file (TMPDIR) for e2fsck failed: {e}"
            ),
        },
    }
}

/// `e2fsck -f -n` on `spec`: changes nothing, whatever it finds.
fn e2fsck_read_only(spec: &str) -> DeepCheck {
    let exe = match crate::tools::find_program(&crate::tools::E2FSCK) {
        Ok(exe) => exe,
        Err(missing) => {
            return DeepCheck {
                clean: None,
                detail: format!("not checked: {missing}"),
            };
        }
    };
    match std::process::Command::new(&exe)
        .args(["-f", "-n", spec])
        .env("LC_ALL", "C")
        .output()
    {
        Ok(out) => {
            let code = out.status.code().unwrap_or(-1);
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            let stdout = String::from_utf8_lossy(&out.stdout);
            let last = stdout.trim().lines().last().unwrap_or_default().to_string();
            match code {
                0 => DeepCheck {
                    clean: Some(true),
                    detail: format!("e2fsck -fn: clean ({last})"),
                },
                // A bit mask: 4 is "errors left uncorrected", also when e2fsck then
                // gives up (12: a file system too damaged to go on is damaged).
                c if c & 4 != 0 || c == 1 || c == 2 || c == 3 => DeepCheck {
                    clean: Some(false),
                    detail: format!("e2fsck -fn found problems (exit {code}): {}", text.trim()),
                },
                _ => DeepCheck {
                    clean: None,
                    detail: format!("e2fsck could not check it (exit {code}): {}", text.trim()),
                },
            }
        }
        Err(e) => DeepCheck {
            clean: None,
            detail: format!("not checked: running {}: {e}", exe.display()),
        },
    }
}

/// What the original ISO says about the stick's record (`verify --iso`).
#[derive(Debug, Clone, Serialize)]
pub struct IsoCheck {
    /// The ISO read (JSON `source`: what a command reads).
    #[serde(rename = "source")]
    pub iso: PathBuf,
    /// The ISO is the one recorded: same size and implanted MD5 (where recorded).
    pub same_as_recorded: bool,
    pub why: String,
    /// The ISO's own implanted MD5 check: `None` when it has none.
    pub implanted_md5_ok: Option<bool>,
    /// Files copied from the ISO whose recorded sha256 matches the ISO's file.
    pub files_matching: usize,
    /// Files copied from the ISO whose recorded sha256 does not match, or that the
    /// ISO lacks.
    pub files_differing: Vec<String>,
}

impl IsoCheck {
    pub fn ok(&self) -> bool {
        self.same_as_recorded
            && self.implanted_md5_ok != Some(false)
            && self.files_differing.is_empty()
    }
}

/// Compares the manifest with the original ISO: its identity, its implanted MD5, and
/// every copied file's recorded sha256 with the ISO's file (so that a manifest and
/// stick changed together are caught too).
pub fn check_iso(
    manifest: &Manifest,
    live_dir: Option<&str>,
    iso: &Path,
    mut progress: impl FnMut(u64),
) -> Result<IsoCheck, ManifestError> {
    let io_err = |step: String| move |source| ManifestError::Io { step, source };
    let size = std::fs::metadata(iso)
        .map_err(io_err(format!("reading {}", iso.display())))?
        .len();
    // On a `--multi` stick, the image written from an ISO of this size (else the
    // newest): its identity is compared, and only its own live files with the ISO.
    let image = match live_dir {
        Some(dir) => manifest
            .images
            .iter()
            .find(|i| i.live_dir.eq_ignore_ascii_case(dir)),
        None => manifest
            .images
            .iter()
            .rev()
            .find(|i| i.source.size == Some(size))
            .or(manifest.images.last()),
    };
    let other_dirs: Vec<String> = manifest
        .images
        .iter()
        .filter(|i| image.is_none_or(|chosen| !chosen.live_dir.eq_ignore_ascii_case(&i.live_dir)))
        .map(|i| format!("/{}/", i.live_dir.trim_matches('/')).to_ascii_lowercase())
        .collect();
    let mut file = File::open(iso).map_err(io_err(format!("opening {}", iso.display())))?;
    let mut image_iso = crate::source::iso::IsoImage::open(io::BufReader::new(
        file.try_clone()
            .map_err(io_err(format!("opening {}", iso.display())))?,
    ))
    .map_err(|e| ManifestError::Io {
        step: format!("reading {} as an ISO", iso.display()),
        source: io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
    })?;
    let implanted = crate::source::checksum::implanted_md5(image_iso.application_data());
    let volume_size = image_iso.volume_size();
    let implanted_md5_ok = match &implanted {
        Some(md5) => {
            let mut done = 0;
            let outcome = crate::source::checksum::verify_implanted_md5(
                &mut file,
                md5,
                volume_size,
                |now, _| {
                    progress(now.saturating_sub(done));
                    done = now;
                },
            )
            .map_err(|e| ManifestError::Io {
                step: format!("checking the implanted MD5 of {}", iso.display()),
                source: io::Error::other(e.to_string()),
            })?;
            Some(outcome.passed())
        }
        None => None,
    };
    let (same_as_recorded, why) = match image {
        None => (false, "the manifest records no image".to_string()),
        Some(image) => {
            let recorded = &image.source;
            let md5_now = implanted.as_ref().map(|m| m.md5_hex());
            if recorded.size.is_some_and(|s| s != size) {
                (
                    false,
                    format!(
                        "{} is {size} bytes; the stick was written from {} of {} bytes",
                        iso.display(),
                        recorded.name,
                        recorded.size.unwrap_or_default()
                    ),
                )
            } else if recorded.implanted_md5.is_some() && recorded.implanted_md5 != md5_now {
                (
                    false,
                    format!(
                        "{}'s implanted MD5 is {}; the stick was written from one with {}",
                        iso.display(),
                        md5_now.as_deref().unwrap_or("none"),
                        recorded.implanted_md5.as_deref().unwrap_or("none")
                    ),
                )
            } else {
                (
                    true,
                    format!("same size and implanted MD5 as {}", recorded.name),
                )
            }
        }
    };
    // The boot files outside every live directory (kernels and menus at the root)
    // are the first image's: `--multi` puts a later image's files in its own.
    let all_dirs: Vec<String> = manifest
        .images
        .iter()
        .map(|i| format!("/{}/", i.live_dir.trim_matches('/')).to_ascii_lowercase())
        .collect();
    let chose_the_first = match (image, manifest.images.first()) {
        (Some(chosen), Some(first)) => chosen.live_dir.eq_ignore_ascii_case(&first.live_dir),
        _ => true,
    };
    let mut files_matching = 0;
    let mut files_differing = Vec::new();
    for f in &manifest.files {
        let Some(iso_path) = &f.iso_path else {
            continue;
        };
        let lower = f.path.to_ascii_lowercase();
        if other_dirs.iter().any(|d| lower.starts_with(d)) {
            continue;
        }
        if !chose_the_first && !all_dirs.iter().any(|d| lower.starts_with(d)) {
            continue;
        }
        let entry = image_iso.lookup(iso_path).ok().flatten();
        let Some(entry) = entry else {
            files_differing.push(format!("{} ({iso_path} is not on the ISO)", f.path));
            continue;
        };
        let mut reader = image_iso.open_file(&entry);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(io_err(format!("reading {iso_path} from {}", iso.display())))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            progress(n as u64);
        }
        if hex(&hasher.finalize()) == f.sha256 {
            files_matching += 1;
        } else {
            files_differing.push(format!("{} (differs from {iso_path} in the ISO)", f.path));
        }
    }
    Ok(IsoCheck {
        iso: iso.to_path_buf(),
        same_as_recorded,
        why,
        implanted_md5_ok,
        files_matching,
        files_differing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, size: u64) -> FileRecord {
        FileRecord {
            path: path.into(),
            size,
            sha256: "ab".repeat(32),
            iso_path: Some(path.into()),
            kind: "copied".into(),
            filesystem: None,
            ends_sha256: None,
        }
    }

    fn write_of(live_dir: &str, files: Vec<FileRecord>) -> WriteRecord {
        WriteRecord {
            image: ImageRecord {
                live_dir: live_dir.into(),
                source: SourceRecord {
                    name: "Fedora.iso".into(),
                    size: Some(1 << 30),
                    sha256: None,
                    implanted_md5: Some("0123456789abcdef0123456789abcdef".into()),
                    label: "Fedora-WS-Live-42".into(),
                },
                written_at: "2026-12-06T12:00:00Z".into(),
            },
            layout: LayoutRecord {
                table: "mbr".into(),
                partition_start: 1 << 20,
                partition_len: 1 << 30,
                fs_label: "LIVE".into(),
                fs_uuid: "B494-8509".into(),
            },
            files,
            persistence: vec![persist("/LiveOS/home.img", "home", 1 << 28)],
            boot: None,
        }
    }

    #[test]
    fn the_boot_code_record_is_the_last_bios_writes_and_survives_a_uefi_only_rewrite() {
        let boot = |n: u8| BootRecord::of(&[n; 512], &[n; 512]);
        let mut first = write_of("LiveOS", vec![file("/LiveOS/squashfs.img", 10)]);
        first.boot = Some(boot(1));
        let first = updated(None, first, |_| None, "t1");
        let on_stick = |p: &str| (p == "/LiveOS/squashfs.img").then_some(10);
        let uefi_only = updated(
            Some(first.clone()),
            write_of("LiveOS", vec![]),
            on_stick,
            "t2",
        );
        assert_eq!(uefi_only.boot, Some(boot(1)), "left where it was");
        let mut bios = write_of("LiveOS", vec![]);
        bios.boot = Some(boot(2));
        assert_eq!(
            updated(Some(first), bios, on_stick, "t3").boot,
            Some(boot(2))
        );
        let text = render(&uefi_only);
        assert!(text.contains("boot_sector_code_sha256"));
        assert_eq!(parse(text.as_bytes()).unwrap(), uefi_only);
        // A manifest from before the record reads as one without it.
        let older = text.replace("\"boot\"", "\"unknown_field\"");
        assert_eq!(parse(older.as_bytes()).unwrap().boot, None);
    }

    #[test]
    fn the_boot_sector_hash_covers_the_code_and_not_the_file_systems_parameters() {
        let mut sector = [0x5au8; 512];
        let sum = boot_sector_code_sha256(&sector);
        sector[0x47] = b'X'; // the volume label, in the parameter block
        sector[0x43] ^= 0xff; // the serial
        assert_eq!(boot_sector_code_sha256(&sector), sum);
        for code_byte in [0, 2, 0x0a, 0x5a, 0x100, 0x1fe] {
            let mut changed = sector;
            changed[code_byte] ^= 1;
            assert_ne!(
                boot_sector_code_sha256(&changed),
                sum,
                "byte {code_byte:#x}"
            );
        }
        let mut mbr = [0u8; 512];
        let code = mbr_code_sha256(&mbr);
        mbr[446] = 0x80; // the partition table is not code
        assert_eq!(mbr_code_sha256(&mbr), code);
        mbr[439] = 1;
        assert_ne!(mbr_code_sha256(&mbr), code);
        assert_ne!(
            mbr_code_sha256(&[0u8; 100]),
            mbr_code_sha256(&[0u8; 512]),
            "a short read is not the code"
        );
    }

    #[test]
    fn a_manifest_round_trips_and_a_newer_schema_is_refused() {
        let m = updated(
            None,
            write_of("LiveOS", vec![file("/LiveOS/squashfs.img", 10)]),
            |_| None,
            "t",
        );
        assert_eq!(parse(render(&m).as_bytes()).unwrap(), m);
        let newer = render(&m).replace("\"schema\": 1", "\"schema\": 9");
        assert!(parse(newer.as_bytes()).unwrap_err().contains("schema 9"));
        assert!(parse(b"{\"schema\": 1}").is_err(), "incomplete");
        assert!(parse(b"not json").is_err());
    }

    #[test]
    fn a_rewrite_keeps_entries_of_files_it_left_alone_only_while_they_are_there() {
        let first = updated(
            None,
            write_of(
                "LiveOS",
                vec![
                    file("/LiveOS/squashfs.img", 10),
                    file("/LiveOS/osmin.img", 5),
                    file("/EFI/BOOT/grub.cfg", 3),
                ],
            ),
            |_| None,
            "t1",
        );
        // --skipcopy: only the config is rewritten; osmin.img was deleted meanwhile.
        let on_stick = |p: &str| match p {
            "/LiveOS/squashfs.img" => Some(10),
            "/EFI/BOOT/grub.cfg" => Some(4),
            "/LiveOS/home.img" => Some(1 << 29),
            _ => None,
        };
        let mut config = file("/EFI/BOOT/grub.cfg", 4);
        config.sha256 = "cd".repeat(32);
        let mut second = write_of("LiveOS", vec![config.clone()]);
        second.persistence.clear();
        let m = updated(Some(first), second, on_stick, "t2");
        let paths: Vec<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["/LiveOS/squashfs.img", "/EFI/BOOT/grub.cfg"]);
        assert_eq!(m.files[1], config, "the new hash wins");
        assert_eq!(m.images.len(), 1, "the same live directory is one image");
        assert_eq!(
            m.persistence,
            vec![persist("/LiveOS/home.img", "home", 1 << 29)],
            "a kept home is listed with its size now"
        );
    }

    #[test]
    fn a_multi_write_adds_its_image_beside_the_first() {
        let first = updated(
            None,
            write_of("LiveOS", vec![file("/LiveOS/squashfs.img", 10)]),
            |_| None,
            "t1",
        );
        let m = updated(
            Some(first),
            write_of("F41", vec![file("/F41/squashfs.img", 20)]),
            |p| (p == "/LiveOS/squashfs.img").then_some(10),
            "t2",
        );
        let dirs: Vec<&str> = m.images.iter().map(|i| i.live_dir.as_str()).collect();
        assert_eq!(dirs, ["LiveOS", "F41"]);
        assert_eq!(m.files.len(), 2);
    }

    #[test]
    fn utc_dates_are_civil_dates() {
        assert_eq!(utc_text(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_text(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_text(1_796_559_240), "2026-12-06T12:14:00Z");
    }
}
