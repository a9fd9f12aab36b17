//! The inspect stage of a write, past the source itself: the facts
//! `plan::plan_write` needs and must not read for itself (it stays pure).
//! Which overlay spelling the ISO's initrd understands, the MD5 the ISO
//! claims, what an existing stick holds and how full its kept overlay is, and
//! the ISO's implanted MD5 check before anything is written.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::apply::{self, ApplyError};
use crate::boot::cmdline::DracutNames;
use crate::disk::target::{TargetKind, TargetProbe};
use crate::error::{Classify, ErrorKind};
use crate::plan::{ExistingFs, FormatMode, WriteOptions};
use crate::progress::Progress;
use crate::source::checksum::{self, ChecksumError};
use crate::source::initrd;
use crate::source::live::{self, LiveError, LiveImage};

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
            FactsError::Io(_) => ErrorKind::Io,
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            FactsError::Existing(e) => e.hint(),
            FactsError::Iso(e) => e.hint(),
            FactsError::Checksum { source, .. } => source.hint(),
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
