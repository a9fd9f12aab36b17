//! The inspect stage of a write, past the source itself: the facts
//! `plan::plan_write` needs and must not read for itself (it stays pure).
//! Which overlay spelling the ISO's initrd understands, the MD5 the ISO
//! claims, what an existing stick holds and how full its kept overlay is, and
//! the ISO's implanted MD5 check before anything is written.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::apply::{self, ApplyError};
use crate::boot::cmdline::DracutNames;
use crate::disk::target::{TargetKind, TargetProbe};
use crate::error::{Classify, ErrorKind};
use crate::plan::{ExistingFs, FormatMode, WriteOptions};
use crate::progress::{Progress, ProgressMode};
use crate::source::checksum::{self, ChecksumError};
use crate::source::compressed::{self, DecompressError};
use crate::source::initrd;
use crate::source::live::{self, LiveError, LiveImage};
use crate::source::signed_checksum::{self, ChecksumReport, SignedChecksumError, SourceCheck};

#[derive(Debug, Error)]
pub enum FactsError {
    #[error(
        "{} has no partition table and --noformat was given; drop --noformat to create one",
        path.display()
    )]
    NoTableNoFormat { path: PathBuf },
    #[error(
        "{} is empty and --noformat was given; drop --noformat to format it",
        path.display()
    )]
    EmptyNoFormat { path: PathBuf },
    #[error(transparent)]
    Existing(ApplyError),
    #[error(transparent)]
    Iso(LiveError),
    #[error("checking the implanted MD5 of {}", path.display())]
    Checksum {
        path: PathBuf,
        #[source]
        source: ChecksumError,
    },
    #[error(
        "{} fails its implanted MD5 check ({outcome}): the ISO is corrupt or incomplete — download it again (or pass --noverify to write it anyway)",
        path.display()
    )]
    Md5Mismatch { path: PathBuf, outcome: String },
    #[error(transparent)]
    Published(#[from] SignedChecksumError),
    #[error(transparent)]
    Unpack(#[from] DecompressError),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl Classify for FactsError {
    fn kind(&self) -> ErrorKind {
        match self {
            FactsError::NoTableNoFormat { .. }
            | FactsError::EmptyNoFormat { .. }
            | FactsError::Md5Mismatch { .. } => ErrorKind::BadInput,
            // What this wraps decides, as it did before the stage had an error of its own.
            FactsError::Existing(e) => e.kind(),
            FactsError::Iso(e) => e.kind(),
            FactsError::Checksum { source, .. } => source.kind(),
            FactsError::Published(e) => e.kind(),
            FactsError::Unpack(e) => e.kind(),
            FactsError::Io(_) => ErrorKind::Io,
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            FactsError::Existing(e) => e.hint(),
            FactsError::Iso(e) => e.hint(),
            FactsError::Checksum { source, .. } => source.hint(),
            FactsError::Published(e) => e.hint(),
            FactsError::Unpack(e) => e.hint(),
            _ => self.kind().hint(),
        }
    }
}

/// The overlay argument spelling the ISO's initrd understands, and whether its
/// version was unreadable (then the classic spelling, which the plan notes).
pub fn initrd_dracut_names(live: &LiveImage) -> (DracutNames, bool) {
    let initrd = live
        .primary_menu()
        .menu
        .entries
        .first()
        .and_then(|e| e.initrds.first());
    let version = initrd.and_then(|path| {
        let mut source = apply::open_source(live).ok()?;
        let mut reader = source.open(path, 0).ok()?;
        initrd::dracut_version(&mut reader, 512 << 20)
    });
    match version {
        Some(v) if initrd::uses_renamed_overlay_args(&v) => (DracutNames::Renamed, false),
        Some(_) => (DracutNames::Classic, false),
        None => (DracutNames::Classic, true),
    }
}

/// The implanted MD5 an ISO claims (read from its header, not computed).
pub fn claimed_md5(live: &LiveImage) -> Option<String> {
    if live.source_kind != live::SourceKind::Iso || !live.implanted_md5 {
        return None;
    }
    let iso = live::open_iso(&live.path).ok()?;
    checksum::implanted_md5(iso.application_data()).map(|md5| md5.md5_hex())
}

/// What the target already holds that the write keeps: its FAT and files, and
/// the overlay it carries (see [`inspect_kept_overlay`]); `None` when the target
/// is formatted afresh. A real write (`repair`) first repairs what a stopped
/// replacement left and tells `on_repaired` each repair.
pub fn existing_stick(
    target_path: &Path,
    probe: &TargetProbe,
    opts: &WriteOptions,
    live: &LiveImage,
    repair: bool,
    mut on_repaired: impl FnMut(&str),
) -> Result<(Option<ExistingFs>, Vec<String>), FactsError> {
    let mut repaired = Vec::new();
    let existing = match opts.format {
        FormatMode::Always => None,
        FormatMode::Auto | FormatMode::Never if probe.exists && probe.size > 0 => {
            if repair {
                // Leftovers of a stopped replacement first (issue 13): reading the stick
                // refuses chains two entries share. A target that is no stick yet has
                // none; its real errors come from reading it just below.
                let live_dir = &opts.live_dir;
                for line in crate::persist::merge::replace::repair_stick(target_path, live_dir)
                    .unwrap_or_default()
                {
                    on_repaired(&line);
                    repaired.push(line);
                }
                // On the ext4 layout: the journal a powered-off live system left, then
                // a stopped merge's staged image. A replay that cannot run leaves the
                // journal flagged, and the plan refuses with the figures and the way out.
                let ext4 =
                    crate::persist::merge::ext4_replace::replay_ext4_journal(target_path, live_dir)
                        .and_then(|mut lines| {
                            lines.extend(crate::persist::merge::ext4_replace::repair_ext4_stick(
                                target_path,
                                live_dir,
                                true,
                            )?);
                            Ok(lines)
                        });
                for line in ext4.unwrap_or_default() {
                    on_repaired(&line);
                    repaired.push(line);
                }
            }
            // A dry run repairs in memory: it writes nothing, yet plans what the write
            // will find. Where that repair cannot run, the plain read says why.
            let found = if repair {
                apply::read_existing(target_path)
            } else {
                match apply::read_existing_repaired(target_path, &opts.live_dir) {
                    Ok((fs, lines)) => {
                        repaired = lines;
                        Ok(fs)
                    }
                    Err(_) => apply::read_existing(target_path),
                }
            };
            match (found, opts.format) {
                (Ok(Some(fs)), _) => Some(fs),
                (Ok(None), FormatMode::Never) => {
                    return Err(FactsError::NoTableNoFormat {
                        path: target_path.to_path_buf(),
                    });
                }
                (Ok(None), _) => None,
                (Err(_), FormatMode::Auto)
                    if probe.kind == TargetKind::ImageFile && is_blank(probe) =>
                {
                    None
                }
                (Err(e), _) => return Err(FactsError::Existing(e)),
            }
        }
        FormatMode::Never => {
            return Err(FactsError::EmptyNoFormat {
                path: target_path.to_path_buf(),
            });
        }
        FormatMode::Auto => None,
    };
    let existing = existing.map(|mut fs| {
        inspect_kept_overlay(target_path, &mut fs, opts, live);
        fs
    });
    Ok((existing, repaired))
}

/// What the plan needs to know about the overlay an existing stick keeps: whether
/// its root image is the one this write copies, and how much the overlay holds.
/// Read here, before planning, so that planning stays pure.
fn inspect_kept_overlay(
    target_path: &Path,
    fs: &mut ExistingFs,
    opts: &WriteOptions,
    live: &LiveImage,
) {
    let Some((overlay, len)) = fs.current_overlay(&opts.live_dir) else {
        return;
    };
    if opts.overlay_size.is_some() || opts.copy_overlay || opts.multi {
        return;
    }
    fs.overlay_used = crate::live_source::overlay_used(target_path, &overlay, len);
    if opts.reset_overlay || opts.skipcopy {
        return;
    }
    let iso_sha256 = || -> io::Result<String> {
        let mut source = apply::open_source(live).map_err(io::Error::other)?;
        let reader = source
            .open(&live.squashfs.path, live.squashfs.size)
            .map_err(io::Error::other)?;
        Ok(checksum::hex(&checksum::sha256_reader(reader)?))
    };
    fs.root = Some(crate::live_source::compare_root(
        target_path,
        fs,
        live,
        &opts.live_dir,
        opts.iso_md5.as_deref(),
        iso_sha256,
    ));
}

/// An image file whose first MiB is all zeros has nothing worth keeping. Read
/// through the probe (`open_existing` checks the inode): a file swapped in since the
/// probe is never judged blank, so never formatted on its say-so.
fn is_blank(probe: &TargetProbe) -> bool {
    let mut head = vec![0u8; 1 << 20];
    let Ok(mut file) = crate::disk::target::open_existing(probe, false) else {
        return false;
    };
    match file.read(&mut head) {
        Ok(n) => head[..n].iter().all(|&b| b == 0),
        Err(_) => false,
    }
}

/// Checks the ISO's implanted MD5 (isomd5sum) before anything is written and
/// returns it; `None` for a source without one (a stick's files are verified
/// on read-back instead).
pub fn verify_iso(live: &LiveImage, progress: &Progress) -> Result<Option<String>, FactsError> {
    if live.source_kind != live::SourceKind::Iso {
        return Ok(None);
    }
    let mut iso = live::open_iso(&live.path).map_err(FactsError::Iso)?;
    let Some(md5) = checksum::implanted_md5(iso.application_data()) else {
        return Ok(None);
    };
    let volume_size = iso.volume_size();
    let _ = iso.lookup("/");
    let mut reader = BufReader::with_capacity(1 << 20, File::open(&live.path)?);
    progress.phase("md5", volume_size);
    let mut last = 0u64;
    let outcome = checksum::verify_implanted_md5(&mut reader, &md5, volume_size, |done, _| {
        progress.inc(done.saturating_sub(last));
        last = done;
    })
    .map_err(|source| FactsError::Checksum {
        path: live.path.clone(),
        source,
    })?;
    if !outcome.passed() {
        return Err(FactsError::Md5Mismatch {
            path: live.path.clone(),
            outcome: format!("{outcome:?}"),
        });
    }
    Ok(Some(md5.md5_hex()))
}

/// Opens the source the user gave, unpacking a compressed one. When its published
/// checksum is still to be compared (`check`, and a CHECKSUM was found), that
/// checksum describes the compressed file: its sha256 is taken from the bytes the
/// decompressor reads, and compared as soon as the stream ends, before the
/// unpacked ISO is inspected or any target probed, so the compressed file is read
/// once. A plain source is left to [`check_source`], which shares its read with
/// the implanted MD5.
pub fn unpack_source(
    given: &Path,
    published: &mut SourceCheck,
    check: bool,
    mode: ProgressMode,
) -> Result<compressed::Source, FactsError> {
    let pending = check
        && matches!(published, SourceCheck::Checked(report) if report.actual_sha256.is_none());
    let source = compressed::open_hashing(given, mode, pending)?;
    if let (SourceCheck::Checked(report), Some(digest)) = (published, source.compressed_sha256()) {
        signed_checksum::finish_compare(given, report, digest)?;
    }
    Ok(source)
}

/// Every check a write makes of its source before any target is probed: the
/// published checksum's sha256 of the file the user gave (when one was found and
/// the image not read yet) and, unless `--noverify`, the ISO's implanted MD5. When
/// both cover the same file they share one read of it; a compressed source's
/// CHECKSUM was compared by [`unpack_source`] while it was unpacked. Returns the
/// implanted MD5 that passed, if any.
pub fn check_source(
    given: &Path,
    live: &LiveImage,
    published: &mut SourceCheck,
    implanted: bool,
    progress: &Progress,
) -> Result<Option<String>, FactsError> {
    let pending = match published {
        SourceCheck::Checked(report) if report.actual_sha256.is_none() => Some(report),
        _ => None,
    };
    let Some(report) = pending else {
        return if implanted {
            verify_iso(live, progress)
        } else {
            Ok(None)
        };
    };
    if implanted && live.source_kind == live::SourceKind::Iso && live.path == given {
        let mut iso = live::open_iso(&live.path).map_err(FactsError::Iso)?;
        if let Some(md5) = checksum::implanted_md5(iso.application_data()) {
            let volume_size = iso.volume_size();
            let _ = iso.lookup("/");
            drop(iso);
            return md5_and_sha256(given, &md5, volume_size, report, progress).map(Some);
        }
    }
    signed_checksum::verify_image(given, report, progress)?;
    if implanted {
        verify_iso(live, progress)
    } else {
        Ok(None)
    }
}

/// The published checksum alone, for a source with no implanted MD5 to share
/// its read with (a raw image).
pub fn check_published(
    given: &Path,
    published: &mut SourceCheck,
    progress: &Progress,
) -> Result<(), FactsError> {
    if let SourceCheck::Checked(report) = published
        && report.actual_sha256.is_none()
    {
        signed_checksum::verify_image(given, report, progress)?;
    }
    Ok(())
}

/// The implanted-MD5 pass with a sha256 of the whole file riding on its reads,
/// then the rest of the file (the padding past the volume, which only the sha256
/// covers) read on.
fn md5_and_sha256(
    path: &Path,
    md5: &checksum::ImplantedMd5,
    volume_size: u64,
    report: &mut ChecksumReport,
    progress: &Progress,
) -> Result<String, FactsError> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    progress.phase("md5 + sha256", len);
    let mut tee = Sha256InOrder::new(file);
    let mut last = 0u64;
    let outcome = {
        let mut reader = BufReader::with_capacity(1 << 20, &mut tee);
        checksum::verify_implanted_md5(&mut reader, md5, volume_size, |done, _| {
            progress.inc(done.saturating_sub(last));
            last = done;
        })
        .map_err(|source| FactsError::Checksum {
            path: path.to_path_buf(),
            source,
        })?
    };
    if !outcome.passed() {
        return Err(FactsError::Md5Mismatch {
            path: path.to_path_buf(),
            outcome: format!("{outcome:?}"),
        });
    }
    let digest = tee.finish(|n| progress.inc(n))?;
    signed_checksum::finish_compare(path, report, digest)?;
    Ok(md5.md5_hex())
}

/// A reader that feeds sha256 every byte of the file in file order as it passes
/// by, whatever seeks its user makes (the MD5 pass looks for the primary volume
/// descriptor first, then reads from the start); bytes read again or out of order
/// are not hashed twice.
struct Sha256InOrder<R> {
    inner: R,
    position: u64,
    hashed: u64,
    hasher: sha2::Sha256,
}

impl<R: Read + Seek> Sha256InOrder<R> {
    fn new(inner: R) -> Self {
        use sha2::Digest;
        Sha256InOrder {
            inner,
            position: 0,
            hashed: 0,
            hasher: sha2::Sha256::new(),
        }
    }

    /// Reads what the user of the reader left unread up to the end of the file,
    /// telling `read` each amount, and gives the file's sha256.
    fn finish(mut self, mut read: impl FnMut(u64)) -> io::Result<[u8; 32]> {
        use sha2::Digest;
        self.seek(SeekFrom::Start(self.hashed))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match self.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            read(n as u64);
        }
        Ok(self.hasher.finalize().into())
    }
}

impl<R: Read> Read for Sha256InOrder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use sha2::Digest;
        let n = self.inner.read(buf)?;
        let end = self.position + n as u64;
        if self.position <= self.hashed && self.hashed < end {
            let from = (self.hashed - self.position) as usize;
            self.hasher.update(&buf[from..n]);
            self.hashed = end;
        }
        self.position = end;
        Ok(n)
    }
}

impl<R: Seek> Seek for Sha256InOrder<R> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.position = self.inner.seek(to)?;
        Ok(self.position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;
    use std::io::Cursor;

    #[test]
    fn the_in_order_sha256_hashes_each_byte_once_whatever_the_seeks() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 991) as u8).collect();
        let mut tee = Sha256InOrder::new(Cursor::new(&data));
        let mut buf = vec![0u8; 4096];
        // A look ahead (not hashed yet), back to the start, a partial re-read.
        tee.seek(SeekFrom::Start(32_768)).unwrap();
        tee.read_exact(&mut buf).unwrap();
        tee.seek(SeekFrom::Start(0)).unwrap();
        let mut head = vec![0u8; 100_000];
        tee.read_exact(&mut head).unwrap();
        tee.seek(SeekFrom::Start(50_000)).unwrap();
        tee.read_exact(&mut head[..70_000]).unwrap();
        let mut told = 0u64;
        let digest = tee.finish(|n| told += n).unwrap();
        let expected: [u8; 32] = sha2::Sha256::digest(&data).into();
        assert_eq!(digest, expected);
        assert_eq!(told, 300_000 - 120_000);
    }
}
