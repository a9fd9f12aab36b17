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
use super::located::{StickPlace, check_space, staged_path, stick_extents};
use super::overlayfs::tree::ApplyReport;
use super::plan::{MergePlan, failpoint};
use crate::disk::extent_file::ExtentFile;
use crate::disk::fat;
use crate::disk::fat_raw::{self, SwapError, SwapReport};
use crate::disk::stick::{Stick, StickError};
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
fn sha256_reader(
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
fn reset_after_swap<F>(ov: &mut F, len: u64, fresh_overlay: Option<&Path>) -> Result<(), MergeError>
where
    F: Read + Write + Seek + snapshot::SyncData,
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
fn drop_cache(f: &File) {
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
    // between its two sector writes: then it names the live image's chain.
    if let Some(note) = detach_shared_leftover(stick.file_mut(), part, &staged)? {
        stick.file_mut().sync_all().map_err(io_at(&place.stick))?;
        report.repaired.push(note);
    }
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

    report.swap = Some(fat_raw::swap_contents(
        stick.file_mut(),
        part,
        &place.squashfs,
        &staged,
    )?);
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

/// Makes a leftover name on a stick (`X.new` of a stopped replacement) safe to remove:
/// when another directory entry names its cluster chain, which a swap stopped between
/// its two sector writes leaves, the leftover is detached from the chain, so removing
/// it frees nothing another file still uses. The check every free of a leftover goes
/// through. Returns what was repaired, for the report; `None` when the name owns its
/// chain (or does not exist, or is a directory) and may be freed as it is.
fn staging_failed(staged: &str, source: StickError) -> MergeError {
    MergeError::Stage {
        staged: staged.trim_start_matches('/').to_string(),
        source,
    }
}

pub fn detach_shared_leftover<D: Read + Write + Seek>(
    dev: &mut D,
    part: u64,
    path: &str,
) -> Result<Option<String>, SwapError> {
    let others = match fat_raw::other_names_of_chain(dev, part, path) {
        Ok(others) => others,
        Err(SwapError::NotFound(_) | SwapError::IsDir(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    if others.is_empty() {
        return Ok(None);
    }
    fat_raw::detach(dev, part, path)?;
    Ok(Some(format!(
        "{path} named the clusters of {} (a replacement stopped between its two directory writes): it was detached from them, not freed",
        others.join(", ")
    )))
}
