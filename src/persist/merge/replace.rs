//! Replacing `squashfs.img` with the built image, the same for every overlay kind:
//! `stage → verify → fold → swap → reset`. The new image is written under a second
//! name, synced and read back; the chunks e2fsck changed are folded into the overlay;
//! then the two names are swapped (a rename, or on a stick the FAT directory entries
//! in one sector write, `disk::fat_raw`), and only then is the overlay reset.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::error::{MergeError, io_at};
use super::fold::fold_chunks;
use super::located::{Companion, NewRoot, StickPlace, check_space, staged_path, stick_extents};
use super::overlayfs::tree::ApplyReport;
use super::plan::{MergePlan, failpoint};
use crate::disk::extent_file::ExtentFile;
use crate::disk::fat;
use crate::disk::fat_raw::{self, SwapError, SwapReport};
use crate::disk::stick::{Stick, StickError};
use crate::io::SyncData;
use crate::persist::overlay::store;
use crate::persist::snapshot;
use crate::source::checksum::{HashingReader, hex};

/// What a finished merge did.
#[derive(Debug, Clone, Serialize)]
pub struct MergeReport {
    pub exceptions_applied: u64,
    pub fsck_exit_code: Option<i32>,
    /// Chunks e2fsck changed, written into the overlay before the swap.
    pub fsck_chunks_folded: u64,
    pub old_squashfs_bytes: u64,
    pub new_squashfs_bytes: u64,
    pub new_squashfs_sha256: String,
    /// On a stick: whether the directory entries were swapped in one sector write.
    pub swap: Option<SwapReport>,
    pub overlay_reset: bool,
    /// For an OverlayFS overlay: what applying the upper dir did.
    pub overlayfs: Option<ApplyReport>,
    /// Leftovers of a stopped replacement that were repaired instead of freed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub repaired: Vec<String>,
}

/// Copies `src` to a new file `dst`, hashing on the way, and syncs it.
fn copy_hashed(
    src: &Path,
    dst: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<String, MergeError> {
    let mut input = File::open(src).map_err(io_at(src))?;
    let total = input.metadata().map_err(io_at(src))?.len();
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dst)
        .map_err(io_at(dst))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut done = 0u64;
    loop {
        let n = input.read(&mut buf).map_err(io_at(src))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io_at(dst))?;
        done += n as u64;
        progress("stage", done, total);
    }
    out.sync_all().map_err(io_at(dst))?;
    Ok(hex(&hasher.finalize()))
}

/// sha256 of everything `r` yields.
pub(super) fn sha256_reader(
    r: &mut dyn Read,
    what: &Path,
    total: u64,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<String, MergeError> {
    let mut hashing = HashingReader::new(r);
    crate::io::copy_with_progress(&mut hashing, &mut std::io::sink(), |done| {
        progress("verify", done, total)
    })
    .map_err(io_at(what))?;
    Ok(hex(&hashing.finish()))
}

pub fn sha256_file(
    path: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<String, MergeError> {
    let mut f = File::open(path).map_err(io_at(path))?;
    let total = f.metadata().map_err(io_at(path))?.len();
    sha256_reader(&mut f, path, total, progress)
}

/// Stage, verify, fold, swap and reset, on a pair of plain files or on a stick.
/// `fresh_overlay`: an OverlayFS overlay is reset by writing this empty file system
/// over it; a dm-snapshot one by a new store header.
pub(crate) fn replace(
    plan: &MergePlan,
    built: &Path,
    root: &Path,
    fsck_changed: &[u64],
    fresh_overlay: Option<&Path>,
    report: &mut MergeReport,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<(), MergeError> {
    match &plan.stick {
        Some(place) => stick_replace(
            plan,
            place,
            built,
            root,
            fsck_changed,
            fresh_overlay,
            report,
            progress,
        ),
        None => dir_replace(
            plan,
            built,
            root,
            fsck_changed,
            fresh_overlay,
            report,
            progress,
        ),
    }
}

/// Empties the overlay after the swap.
pub(super) fn reset_after_swap<F>(
    ov: &mut F,
    len: u64,
    fresh_overlay: Option<&Path>,
) -> Result<(), MergeError>
where
    F: Read + Write + Seek + SyncData,
{
    match fresh_overlay {
        Some(t) => Ok(store::write_fresh_overlay(ov, len, t)?),
        None => Ok(snapshot::reset_store(ov, len)?),
    }
}

/// Stage, verify, fold, swap and reset for a pair of plain files.
fn dir_replace(
    plan: &MergePlan,
    built: &Path,
    root: &Path,
    fsck_changed: &[u64],
    fresh_overlay: Option<&Path>,
    report: &mut MergeReport,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<(), MergeError> {
    let staged = staged_path(&plan.squashfs);
    let want = copy_hashed(built, &staged, progress)?;
    failpoint(plan, "stage")?;

    let got = sha256_file(&staged, progress)?;
    if got != want {
        let _ = fs::remove_file(&staged);
        return Err(MergeError::VerifyMismatch {
            path: staged,
            got,
            want,
        });
    }
    failpoint(plan, "verify")?;

    let mut ov = plan.overlay_at.open(true)?;
    let ov_len = ov.len();
    report.fsck_chunks_folded = fold_chunks(&mut ov, ov_len, root, fsck_changed, &mut |d, t| {
        progress("fold", d, t)
    })?;
    failpoint(plan, "fold")?;

    fs::rename(&staged, &plan.squashfs).map_err(io_at(&plan.squashfs))?;
    File::open(&plan.target_dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(&plan.target_dir))?;
    failpoint(plan, "swap")?;

    reset_after_swap(&mut ov, ov_len, fresh_overlay)?;
    report.overlay_reset = true;
    report.new_squashfs_sha256 = want;
    failpoint(plan, "reset")?;
    Ok(())
}

/// Drops the page cache of the stick so a read-back comes from the medium, not from
/// the memory the write went through.
pub(super) fn drop_cache(f: &File) {
    use std::os::fd::AsRawFd;
    let _ = nix::fcntl::posix_fadvise(
        f.as_raw_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
}

/// Stage, verify, fold, swap and reset on a stick's FAT filesystem.
#[allow(clippy::too_many_arguments)]
fn stick_replace(
    plan: &MergePlan,
    place: &StickPlace,
    built: &Path,
    root: &Path,
    fsck_changed: &[u64],
    fresh_overlay: Option<&Path>,
    report: &mut MergeReport,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<(), MergeError> {
    let staged = format!("{}.new", place.squashfs);
    let new_len = report.new_squashfs_bytes;
    if new_len > fat::FAT_MAX_FILE {
        return Err(MergeError::NoSpace {
            what: "the new squashfs.img (FAT32 files must stay below 4 GiB)",
            path: plan.squashfs.clone(),
            needed: new_len,
            needed_mib: new_len.div_ceil(1 << 20),
            free: fat::FAT_MAX_FILE,
            free_mib: fat::FAT_MAX_FILE >> 20,
        });
    }
    let mut stick = Stick::open(&place.stick, true)?;
    let part = place.partition_start;
    // A staged image from a stopped run was never swapped in, unless the swap stopped
    // between its two sector writes: then the intent finishes it, or it names the
    // live image's chain and is detached from it.
    report.repaired.extend(repair_leftovers(
        stick.file_mut(),
        part,
        parent_dir(&place.squashfs),
        &mut |f| f.sync_data(),
    )?);
    let mut input = File::open(built).map_err(io_at(built))?;
    let target_dir = plan.target_dir.clone();
    let mut done = 0u64;
    let staged_sum = stick
        .with_fs(|fs| {
            Ok((|| {
                // What is left of a stale staged image owns its chain (checked above).
                fat::remove_all(fs, &staged).map_err(|e| StickError::Fat {
                    path: place.stick.clone(),
                    source: e,
                })?;
                let free = fat::free_bytes(fs).map_err(|e| StickError::Fat {
                    path: place.stick.clone(),
                    source: e,
                })?;
                let needed = new_len.div_ceil(place.cluster_bytes) * place.cluster_bytes;
                check_space(
                    "the new squashfs.img next to the old one",
                    &target_dir,
                    needed,
                    free,
                )?;
                let sum = fat::write_file(fs, &staged, &mut input, new_len, |n| {
                    done += n;
                    progress("stage", done, new_len);
                })
                .map_err(|e| StickError::Fat {
                    path: place.stick.clone(),
                    source: e,
                })?;
                Ok::<_, MergeError>(sum)
            })())
        })
        .map_err(|source| staging_failed(&staged, source))?
        .map_err(|e| match e {
            MergeError::Stick(source) => staging_failed(&staged, source),
            other => other,
        })?;
    let want = hex(&staged_sum);
    failpoint(plan, "stage")?;

    drop_cache(stick.file_mut());
    let extents = stick_extents(&mut stick, &staged)?;
    let got = {
        let mut f = ExtentFile::new(&mut *stick.file_mut(), &extents);
        let len = f.len();
        sha256_reader(&mut f, &place.stick, len, progress)?
    };
    if got != want {
        let _ = detach_shared_leftover(stick.file_mut(), part, &staged);
        let _ = stick.with_fs(|fs| {
            let _ = fat::remove_all(fs, &staged);
            Ok(())
        });
        return Err(MergeError::VerifyMismatch {
            path: PathBuf::from(format!("{}:{staged}", place.stick.display())),
            got,
            want,
        });
    }
    failpoint(plan, "verify")?;

    {
        let mut ov = ExtentFile::new(&mut *stick.file_mut(), &plan.overlay_at.extents);
        let ov_len = ov.len();
        report.fsck_chunks_folded =
            fold_chunks(&mut ov, ov_len, root, fsck_changed, &mut |d, t| {
                progress("fold", d, t)
            })?;
    }
    failpoint(plan, "fold")?;

    let companion = match plan.stage_companion {
        Some(stage) => {
            let root = NewRoot {
                path: &place.squashfs,
                size: new_len,
                sha256: &want,
            };
            stage(&mut stick, &root).map_err(|why| MergeError::Io {
                path: PathBuf::from(format!("{}:{}", place.stick.display(), place.squashfs)),
                source: std::io::Error::other(format!(
                    "staging the stick's manifest for the new root image failed ({why}); nothing was swapped: the stick still holds the old image, and `livestick verify` reports it intact"
                )),
            })?
        }
        None => None,
    };
    report.swap = Some(match &companion {
        Some(companion) => {
            swap_with_companion(plan, &mut stick, &place.squashfs, &staged, companion)?
        }
        None => swap_on_stick(&mut stick, &place.squashfs, &staged)?,
    });
    // The staged name now holds the old image; free its clusters (unless another
    // name still uses them).
    if let Some(note) = detach_shared_leftover(stick.file_mut(), part, &staged)? {
        stick.file_mut().sync_all().map_err(io_at(&place.stick))?;
        report.repaired.push(note);
    }
    stick.with_fs(|fs| {
        fat::remove_all(fs, &staged).map_err(|e| StickError::Fat {
            path: place.stick.clone(),
            source: e,
        })
    })?;
    failpoint(plan, "swap")?;

    let mut ov = ExtentFile::new(&mut *stick.file_mut(), &plan.overlay_at.extents);
    let ov_len = ov.len();
    reset_after_swap(&mut ov, ov_len, fresh_overlay)?;
    report.overlay_reset = true;
    report.new_squashfs_sha256 = want;
    failpoint(plan, "reset")?;
    Ok(())
}

/// A failure while the new image is staged beside the old one: the step is named
/// and the old file is still whole.
fn staging_failed(staged: &str, source: StickError) -> MergeError {
    MergeError::Stage {
        staged: staged.trim_start_matches('/').to_string(),
        source,
    }
}

/// The intent file of a replacement with a companion, in the live directory from
/// before the root image's swap until after the companion's.
pub const FOLLOW_NAME: &str = ".livestick-follow";

const FOLLOW_MAGIC: &str = "livestick follow 1";

/// What a replacement with a companion is about to do: once `first` names
/// `first_new` (the new root image's entry fields), `target` must name `new` (its
/// staged copy's). Written and synced before the first swap, removed after the
/// second, so that [`repair_leftovers`] finishes the second (or drops the staged copy
/// when the first never happened) whenever the two were stopped in between.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Follow {
    pub first: String,
    pub first_new: Vec<u8>,
    pub target: String,
    pub staged: String,
    pub new: Vec<u8>,
}

impl Follow {
    pub fn to_text(&self) -> String {
        format!(
            "{FOLLOW_MAGIC}\nfirst {}\nfirst_new {}\ntarget {}\nstaged {}\nnew {}\n",
            self.first,
            hex(&self.first_new),
            self.target,
            self.staged,
            hex(&self.new)
        )
    }

    /// `None` for anything but what [`Follow::to_text`] writes (a torn or foreign file).
    pub fn parse(text: &str) -> Option<Follow> {
        let mut lines = text.lines();
        if lines.next()? != FOLLOW_MAGIC {
            return None;
        }
        let mut field = |key: &str| {
            lines
                .next()
                .and_then(|l| l.strip_prefix(key))
                .and_then(|l| l.strip_prefix(' '))
                .map(str::to_string)
        };
        let first = field("first")?;
        let first_new = unhex(&field("first_new")?)?;
        let target = field("target")?;
        let staged = field("staged")?;
        let new = unhex(&field("new")?)?;
        (!first_new.is_empty() && first_new.len() == new.len()).then_some(Follow {
            first,
            first_new,
            target,
            staged,
            new,
        })
    }
}

/// Swaps the verified new root image in and then its companion, under a [`Follow`]
/// intent, so that no stop leaves the stick's manifest naming the other image once
/// the next command has repaired the stick. Failpoints: `manifest-staged` (intent
/// written, nothing swapped) and `root-swapped` (the image swapped, not the manifest).
fn swap_with_companion(
    plan: &MergePlan,
    stick: &mut Stick,
    target: &str,
    staged: &str,
    companion: &Companion,
) -> Result<SwapReport, MergeError> {
    let part = stick.partition.start;
    let path = stick.path.clone();
    let follow = Follow {
        first: target.to_string(),
        first_new: fat_raw::content_fields(stick.file_mut(), part, staged)?,
        target: companion.target.clone(),
        staged: companion.staged.clone(),
        new: fat_raw::content_fields(stick.file_mut(), part, &companion.staged)?,
    };
    let follow_path = format!("{}/{FOLLOW_NAME}", parent_dir(target));
    let text = follow.to_text();
    let fat_err = |source| StickError::Fat {
        path: path.clone(),
        source,
    };
    // with_fs syncs the stick when it closes the filesystem.
    stick.with_fs(|fs| {
        fat::write_file(
            fs,
            &follow_path,
            &mut text.as_bytes(),
            text.len() as u64,
            |_| {},
        )
        .map(|_| ())
        .map_err(fat_err)
    })?;
    failpoint(plan, "manifest-staged")?;
    let report = swap_on_stick(stick, target, staged)?;
    failpoint(plan, "root-swapped")?;
    swap_on_stick(stick, &companion.target, &companion.staged)?;
    // The staged name now holds the old copy.
    detach_shared_leftover(stick.file_mut(), part, &companion.staged)?;
    stick.file_mut().sync_all().map_err(io_at(&path))?;
    crate::disk::fat_alloc::remove_file(stick.file_mut(), part, &companion.staged)
        .map_err(ReplaceError::from)?;
    stick.file_mut().sync_all().map_err(io_at(&path))?;
    crate::disk::fat_alloc::remove_file(stick.file_mut(), part, &follow_path)
        .map_err(ReplaceError::from)?;
    stick.file_mut().sync_all().map_err(io_at(&path))?;
    Ok(report)
}

/// Makes a leftover name on a stick (`X.new` of a stopped replacement) safe to remove:
/// when another directory entry names its cluster chain, which a swap stopped between
/// its two sector writes leaves, the leftover is detached from the chain, so removing
/// it frees nothing another file still uses. For a directory, every file under it is
/// checked so (of two inside that share a chain, one keeps it to be freed). The check
/// every free of a leftover goes through. Returns what was repaired, for the report;
/// `None` when the name owns its chain (or does not exist) and may be freed as it is.
pub fn detach_shared_leftover<D: Read + Write + Seek>(
    dev: &mut D,
    part: u64,
    path: &str,
) -> Result<Option<String>, SwapError> {
    let shared = match fat_raw::other_names_of_chain(dev, part, path) {
        Ok(others) if others.is_empty() => return Ok(None),
        Ok(others) => vec![(path.to_string(), others)],
        Err(SwapError::NotFound(_)) => return Ok(None),
        Err(SwapError::IsDir(_)) => fat_raw::shared_chains_under(dev, part, path)?,
        Err(e) => return Err(e),
    };
    if shared.is_empty() {
        return Ok(None);
    }
    let mut notes = Vec::new();
    for (file, others) in shared {
        fat_raw::detach(dev, part, &file)?;
        notes.push(format!(
            "{file} named the clusters of {} (a replacement stopped between its two directory writes): it was detached from them, not freed",
            others.join(", ")
        ));
    }
    Ok(Some(notes.join("; ")))
}

/// The intent file a replacement leaves in the live directory while its two directory
/// entries are not in one sector (see [`swap_on_stick`]).
pub const INTENT_NAME: &str = ".livestick-replace";

/// What a two-sector replacement is about to do, written and synced before its first
/// entry write and removed after its last: enough for a later command to finish it or
/// to see that it never began.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    pub target: String,
    pub staged: String,
    /// `target`'s entry fields before (`fat_raw::content_fields`): the old file.
    pub old: Vec<u8>,
    /// `staged`'s entry fields before: the new file.
    pub new: Vec<u8>,
}

const INTENT_MAGIC: &str = "livestick replace 1";

impl Intent {
    pub fn to_text(&self) -> String {
        format!(
            "{INTENT_MAGIC}\ntarget {}\nstaged {}\nold {}\nnew {}\n",
            self.target,
            self.staged,
            hex(&self.old),
            hex(&self.new)
        )
    }

    /// `None` for anything but what [`Intent::to_text`] writes (a torn or foreign file).
    pub fn parse(text: &str) -> Option<Intent> {
        let mut lines = text.lines();
        if lines.next()? != INTENT_MAGIC {
            return None;
        }
        let mut field = |key: &str| {
            lines
                .next()
                .and_then(|l| l.strip_prefix(key))
                .and_then(|l| l.strip_prefix(' '))
                .map(str::to_string)
        };
        let target = field("target")?;
        let staged = field("staged")?;
        let old = unhex(&field("old")?)?;
        let new = unhex(&field("new")?)?;
        (old.len() == new.len() && !old.is_empty()).then_some(Intent {
            target,
            staged,
            old,
            new,
        })
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum ReplaceError {
    #[error(transparent)]
    Swap(#[from] SwapError),
    #[error(transparent)]
    Stick(#[from] StickError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("stopped at failpoint `{0}` (LIVESTICK_FAILPOINT)")]
    Failpoint(&'static str),
}

impl crate::error::Classify for ReplaceError {
    fn kind(&self) -> crate::error::ErrorKind {
        match self {
            // `transparent`: opening the stick decides (a refusal is 3, a path the
            // user may not open 2), as when a command opens it itself.
            ReplaceError::Stick(e) => crate::error::Classify::kind(e),
            _ => crate::error::ErrorKind::Io,
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            ReplaceError::Stick(e) => crate::error::Classify::hint(e),
            _ => self.kind().hint(),
        }
    }
}

impl From<crate::disk::fat_alloc::AllocError> for ReplaceError {
    fn from(e: crate::disk::fat_alloc::AllocError) -> Self {
        use crate::disk::fat_alloc::AllocError;
        match e {
            AllocError::Fat(e) => ReplaceError::Swap(e),
            AllocError::Io(e) => ReplaceError::Swap(SwapError::Io(e)),
            // Removing or reclaiming allocates nothing.
            other => ReplaceError::Swap(SwapError::Unsupported(other.to_string())),
        }
    }
}

impl From<ReplaceError> for MergeError {
    fn from(e: ReplaceError) -> Self {
        match e {
            ReplaceError::Swap(e) => MergeError::Swap(e),
            ReplaceError::Stick(e) => MergeError::Stick(e),
            ReplaceError::Io { path, source } => MergeError::Io { path, source },
            ReplaceError::Failpoint(step) => MergeError::Failpoint(step),
        }
    }
}

/// `LIVESTICK_FAILPOINT=swap-half` stops a two-sector replacement after its first
/// entry write: the state a crash there leaves, for the tests.
fn swap_failpoint(step: &'static str) -> Result<(), ReplaceError> {
    if std::env::var("LIVESTICK_FAILPOINT").as_deref() == Ok(step) {
        return Err(ReplaceError::Failpoint(step));
    }
    Ok(())
}

fn parent_dir(path: &str) -> &str {
    path.rsplit_once('/').map(|(d, _)| d).unwrap_or("")
}

/// Replaces the file `target` on the stick by `staged` (a verified copy next to it):
/// afterwards `target` names the new contents and `staged` the old, which the caller
/// frees. The one way livestick replaces a file on a stick.
///
/// The unit is one 512-byte sector write: a device takes a sector whole or not at all
/// (flash sticks do not promise even that, so on flash the window is that one sector).
/// So the staged entry is first moved into the target's sector when it is elsewhere;
/// only when that sector has no free slots does the exchange take two writes, and then
/// an [`Intent`] is written and synced first, so that [`repair_leftovers`] can finish
/// it after a crash instead of leaving the old chain named by nothing.
pub fn swap_on_stick(
    stick: &mut Stick,
    target: &str,
    staged: &str,
) -> Result<SwapReport, ReplaceError> {
    let part = stick.partition.start;
    let path = stick.path.clone();
    let io_err = |source| ReplaceError::Io {
        path: path.clone(),
        source,
    };
    if !fat_raw::share_a_sector(stick.file_mut(), part, target, staged)? {
        fat_raw::move_beside(stick.file_mut(), part, staged, target, &mut |f| {
            f.sync_data()
        })?;
    }
    if fat_raw::share_a_sector(stick.file_mut(), part, target, staged)? {
        return Ok(fat_raw::swap_contents(
            stick.file_mut(),
            part,
            target,
            staged,
        )?);
    }
    let intent = Intent {
        target: target.to_string(),
        staged: staged.to_string(),
        old: fat_raw::content_fields(stick.file_mut(), part, target)?,
        new: fat_raw::content_fields(stick.file_mut(), part, staged)?,
    };
    let intent_path = format!("{}/{INTENT_NAME}", parent_dir(target));
    let text = intent.to_text();
    let fat_err = |source| StickError::Fat {
        path: path.clone(),
        source,
    };
    // with_fs syncs the stick when it closes the filesystem.
    stick.with_fs(|fs| {
        fat::write_file(
            fs,
            &intent_path,
            &mut text.as_bytes(),
            text.len() as u64,
            |_| {},
        )
        .map(|_| ())
        .map_err(fat_err)
    })?;
    // The boot-relevant name first: from here on the stick has the new file.
    fat_raw::set_content_fields(stick.file_mut(), part, target, &intent.new)?;
    stick.file_mut().sync_data().map_err(io_err)?;
    swap_failpoint("swap-half")?;
    fat_raw::set_content_fields(stick.file_mut(), part, staged, &intent.old)?;
    stick.file_mut().sync_data().map_err(io_err)?;
    crate::disk::fat_alloc::remove_file(stick.file_mut(), part, &intent_path)?;
    stick.file_mut().sync_data().map_err(io_err)?;
    Ok(SwapReport {
        single_sector: false,
    })
}

/// Whether the stick holds anything [`repair_leftovers`] would change: an intent file,
/// a leftover sharing a chain, or the dirty mark. Reads only.
pub fn needs_repair<D: Read + Seek>(
    dev: &mut D,
    part: u64,
    live_dir: &str,
) -> Result<bool, SwapError> {
    Ok(leftovers_found(dev, part, live_dir)? || fat_raw::is_dirty(dev, part)?)
}

/// An intent file, or a staged name sharing a chain: what the FAT reader refuses or
/// what would lose a file if freed (unlike the dirty mark alone).
fn leftovers_found<D: Read + Seek>(
    dev: &mut D,
    part: u64,
    live_dir: &str,
) -> Result<bool, SwapError> {
    for name in [INTENT_NAME, FOLLOW_NAME] {
        let intent_path = format!("/{}/{name}", live_dir.trim_matches('/'));
        match fat_raw::find_entry(dev, part, &intent_path) {
            Ok(_) => return Ok(true),
            Err(SwapError::NotFound(_) | SwapError::IsDir(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(fat_raw::shared_chains_under(dev, part, live_dir)?
        .iter()
        .any(|(path, _)| path.to_ascii_lowercase().ends_with(".new")))
}

/// Brings a stick back to a state every command may work on, before anything else
/// touches `live_dir`: an [`Intent`] left by a stopped replacement is completed (the
/// target already names the new file: the staged name gets the old one back) or
/// rolled back (nothing was written: the staged file is a plain leftover), then
/// removed; a file in `live_dir` whose chain another entry names (a two-sector swap of
/// an older livestick, or a move stopped half-way) is detached from it; clusters no
/// entry reaches any more are freed, and the dirty mark is cleared. Returns one line
/// per repair, for stderr and JSON `repaired`. `sync` makes a write durable before the
/// next one depends on it.
pub fn repair_leftovers<D: Read + Write + Seek>(
    dev: &mut D,
    part: u64,
    live_dir: &str,
    sync: &mut dyn FnMut(&mut D) -> std::io::Result<()>,
) -> Result<Vec<String>, ReplaceError> {
    let mut repaired = Vec::new();
    let live = live_dir.trim_matches('/');
    let intent_path = format!("/{live}/{INTENT_NAME}");
    let dirty = fat_raw::is_dirty(dev, part)?;
    let mut reclaim = dirty;
    let sync_err = |source| ReplaceError::Io {
        path: PathBuf::from(&intent_path),
        source,
    };
    match fat_raw::file_extents(dev, part, &intent_path) {
        Ok(extents) => {
            reclaim = true;
            let mut text = Vec::new();
            ExtentFile::new(&mut *dev, &extents)
                .read_to_end(&mut text)
                .map_err(sync_err)?;
            let text = String::from_utf8_lossy(&text);
            repaired.push(match Intent::parse(&text) {
                Some(intent) => settle_intent(dev, part, &intent)?,
                None => format!(
                    "{intent_path} was torn (a replacement stopped before it began): removed"
                ),
            });
            sync(dev).map_err(sync_err)?;
            crate::disk::fat_alloc::remove_file(dev, part, &intent_path)?;
            sync(dev).map_err(sync_err)?;
        }
        Err(SwapError::NotFound(_) | SwapError::IsDir(_)) => {}
        Err(e) => return Err(e.into()),
    }
    // A companion's intent after the replacement's: by now the root image is either
    // the new one or the old one for good.
    let follow_path = format!("/{live}/{FOLLOW_NAME}");
    match fat_raw::file_extents(dev, part, &follow_path) {
        Ok(extents) => {
            reclaim = true;
            let mut text = Vec::new();
            ExtentFile::new(&mut *dev, &extents)
                .read_to_end(&mut text)
                .map_err(sync_err)?;
            let text = String::from_utf8_lossy(&text);
            repaired.push(match Follow::parse(&text) {
                Some(follow) => settle_follow(dev, part, &follow, sync)?,
                None => format!(
                    "{follow_path} was torn (a merge stopped before it swapped anything): removed"
                ),
            });
            sync(dev).map_err(sync_err)?;
            crate::disk::fat_alloc::remove_file(dev, part, &follow_path)?;
            sync(dev).map_err(sync_err)?;
        }
        Err(SwapError::NotFound(_) | SwapError::IsDir(_)) => {}
        Err(e) => return Err(e.into()),
    }
    for (path, others) in fat_raw::shared_chains_under(dev, part, live)? {
        // Only a staged name is a leftover of ours; clusters two other files share
        // are damage of another kind, which the FAT reader refuses with its own advice.
        if !path.to_ascii_lowercase().ends_with(".new") {
            continue;
        }
        fat_raw::detach(dev, part, &path)?;
        sync(dev).map_err(sync_err)?;
        reclaim = true;
        repaired.push(format!(
            "{path} named the clusters of {} (a replacement stopped between its two directory writes): it was detached from them, not freed",
            others.join(", ")
        ));
    }
    if reclaim {
        let freed = crate::disk::fat_alloc::reclaim_lost(dev, part)?;
        if freed > 0 {
            repaired.push(format!(
                "{freed} clusters no file named any more (left by a stopped write) were freed"
            ));
        }
    }
    if dirty {
        fat_raw::clear_dirty(dev, part)?;
        repaired.push(
            "the filesystem was marked as not cleanly closed (a write was stopped); its leftovers were repaired and the mark cleared"
                .to_string(),
        );
    }
    sync(dev).map_err(sync_err)?;
    Ok(repaired)
}

/// Completes or rolls back the replacement `intent` describes; what was done.
fn settle_intent<D: Read + Write + Seek>(
    dev: &mut D,
    part: u64,
    intent: &Intent,
) -> Result<String, ReplaceError> {
    let fields = |dev: &mut D, path: &str| match fat_raw::content_fields(dev, part, path) {
        Ok(f) => Ok(Some(f)),
        Err(SwapError::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    };
    let target = fields(dev, &intent.target)?;
    let staged = fields(dev, &intent.staged)?;
    let (t, s) = (&intent.target, &intent.staged);
    Ok(match (target, staged) {
        (Some(tf), Some(sf)) if tf == intent.new && sf == intent.new => {
            fat_raw::set_content_fields(dev, part, s, &intent.old)?;
            format!(
                "the replacement of {t} stopped half-way: completed ({t} is the new file, {s} the old one, to be removed)"
            )
        }
        (Some(tf), _) if tf == intent.old => format!(
            "the replacement of {t} stopped before it began: rolled back ({t} is unchanged)"
        ),
        (Some(tf), Some(sf)) if tf == intent.new && sf == intent.old => {
            format!("the replacement of {t} had finished; its intent file was removed")
        }
        _ => format!(
            "the replacement of {t} left an intent that no longer matches {t} and {s}: nothing was changed but the intent file"
        ),
    })
}

/// Finishes or drops the companion swap `follow` describes; what was done.
fn settle_follow<D: Read + Write + Seek>(
    dev: &mut D,
    part: u64,
    follow: &Follow,
    sync: &mut dyn FnMut(&mut D) -> std::io::Result<()>,
) -> Result<String, ReplaceError> {
    let fields = |dev: &mut D, path: &str| match fat_raw::content_fields(dev, part, path) {
        Ok(f) => Ok(Some(f)),
        Err(SwapError::NotFound(_)) => Ok(None),
        Err(e) => Err(e),
    };
    let sync_err = |source| ReplaceError::Io {
        path: PathBuf::from(&follow.target),
        source,
    };
    let root = fields(dev, &follow.first)?;
    let target = fields(dev, &follow.target)?;
    let staged = fields(dev, &follow.staged)?;
    let (r, t, s) = (&follow.first, &follow.target, &follow.staged);
    let root_swapped = root.as_deref() == Some(&follow.first_new[..]);
    let line = match (root_swapped, target, staged) {
        (true, Some(tf), Some(sf)) if tf != follow.new && sf == follow.new => {
            // One sector write names the new copy; the old one's clusters are then
            // lost (freed below), and the staged name lets go of the chain it shares.
            fat_raw::set_content_fields(dev, part, t, &follow.new)?;
            sync(dev).map_err(sync_err)?;
            fat_raw::detach(dev, part, s)?;
            sync(dev).map_err(sync_err)?;
            crate::disk::fat_alloc::remove_file(dev, part, s)?;
            format!(
                "a merge stopped after it swapped in the new {r} and before {t}: completed ({t} now describes the new image)"
            )
        }
        (true, Some(tf), staged) if tf == follow.new => {
            if staged.is_some() {
                detach_shared_leftover(dev, part, s)?;
                sync(dev).map_err(sync_err)?;
                crate::disk::fat_alloc::remove_file(dev, part, s)?;
            }
            format!("the merge that replaced {r} had finished; its intent file was removed")
        }
        (false, _, Some(sf)) if sf == follow.new => {
            crate::disk::fat_alloc::remove_file(dev, part, s)?;
            format!(
                "a merge stopped before it swapped in a new {r}: rolled back ({r} and {t} are unchanged, the staged {s} was removed)"
            )
        }
        _ => format!(
            "a merge left an intent that no longer matches {r}, {t} and {s}: nothing was changed but the intent file"
        ),
    };
    sync(dev).map_err(sync_err)?;
    Ok(line)
}

/// [`repair_leftovers`] on the stick at `path`, opened for writing only when
/// [`needs_repair`] finds something (so a read-only command on a healthy stick stays
/// read-only). A mounted stick is left alone (its dirty mark is the kernel's, and its
/// FAT is the kernel's to change); so is one that only carries the dirty mark when it
/// cannot be opened for writing, since reading it is safe.
pub fn repair_stick(path: &Path, live_dir: &str) -> Result<Vec<String>, ReplaceError> {
    repair_stick_when(path, live_dir, true)
}

/// [`repair_stick`] only when a stopped replacement left something behind: a
/// volume that is merely not cleanly closed, or has lost clusters, is left as it
/// is (for `verify`, which otherwise only looks, and leaves those to fsck).
pub fn finish_stopped_replacement(
    path: &Path,
    live_dir: &str,
) -> Result<Vec<String>, ReplaceError> {
    repair_stick_when(path, live_dir, false)
}

fn repair_stick_when(
    path: &Path,
    live_dir: &str,
    also_when_dirty: bool,
) -> Result<Vec<String>, ReplaceError> {
    let leftovers = {
        let mut ro = Stick::open(path, false)?;
        if !ro.probe.busy.is_empty() {
            return Ok(Vec::new());
        }
        let part = ro.partition.start;
        let leftovers = leftovers_found(ro.file_mut(), part, live_dir)?;
        let dirty = also_when_dirty && fat_raw::is_dirty(ro.file_mut(), part)?;
        if !leftovers && !dirty {
            return Ok(Vec::new());
        }
        leftovers
    };
    let mut stick = match Stick::open(path, true) {
        Ok(stick) => stick,
        Err(_) if !leftovers => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let part = stick.partition.start;
    repair_leftovers(stick.file_mut(), part, live_dir, &mut |f| f.sync_data())
}

/// What [`repair_stick`] would do, worked out on a view that keeps its writes in
/// memory: a dry run says it and changes nothing.
pub fn repairs_needed(path: &Path, live_dir: &str) -> Result<Vec<String>, ReplaceError> {
    let mut ro = Stick::open(path, false)?;
    if !ro.probe.busy.is_empty() {
        return Ok(Vec::new());
    }
    let part = ro.partition.start;
    if !needs_repair(ro.file_mut(), part, live_dir)? {
        return Ok(Vec::new());
    }
    let mut view = fat_raw::MemoryWrites::new(ro.file_mut());
    repair_leftovers(&mut view, part, live_dir, &mut |_| Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follow_intent_reads_back_as_written_and_a_torn_one_not_at_all() {
        let follow = Follow {
            first: "/LiveOS/squashfs.img".into(),
            first_new: (0..19).collect(),
            target: "/LiveOS/livestick.json".into(),
            staged: "/LiveOS/livestick.json.new".into(),
            new: (50..69).collect(),
        };
        let text = follow.to_text();
        assert_eq!(Follow::parse(&text), Some(follow));
        for cut in [0, 10, text.len() / 2, text.len() - 3] {
            assert_eq!(Follow::parse(&text[..cut]), None, "{cut}");
        }
        assert_eq!(Follow::parse(&text.replace("follow", "replace")), None);
    }

    #[test]
    fn an_intent_reads_back_as_written_and_a_torn_one_not_at_all() {
        let intent = Intent {
            target: "/LiveOS/home.img".into(),
            staged: "/LiveOS/home.img.new".into(),
            old: (0..19).collect(),
            new: (100..119).collect(),
        };
        let text = intent.to_text();
        assert_eq!(Intent::parse(&text), Some(intent));
        // A crash while the intent was written leaves a prefix of it.
        for cut in [0, 10, text.len() / 2, text.len() - 3] {
            assert_eq!(Intent::parse(&text[..cut]), None, "{cut}");
        }
        assert_eq!(Intent::parse("something else\n"), None);
    }
}
