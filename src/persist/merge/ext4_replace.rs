//! Replacing `squashfs.img` on a stick's ext4 live partition (the layout for
//! persistence over 4 GiB): `stage → verify → fold → swap → reset`, as on FAT
//! ([`super::replace`]), with ext4's own means.
//!
//! The new image is given blocks beside the old one as `squashfs.img.new` (debugfs
//! `fallocate`: unwritten extents, nothing written), streamed into them, synced and
//! read back with the cache dropped, and only then are its extents marked written.
//! The swap exchanges the inode numbers of the two directory entries in one write
//! of their one directory block (`ext4_fs::exchange_entries`, checksum tail
//! recomputed), so at every moment `squashfs.img` names one whole root image; then
//! the old image, now named `squashfs.img.new`, is freed. A stop anywhere leaves at
//! most `squashfs.img.new` beside a whole `squashfs.img`: before the swap the
//! unfinished new image, after it the old one. Either way it is a leftover the next
//! command on the place removes ([`repair_leftovers`]) and reports.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use super::error::{MergeError, io_at};
use super::fold::fold_chunks;
use super::located::{Ext4Place, check_space};
use super::plan::{MergePlan, failpoint};
use super::replace::{MergeReport, drop_cache, replace, reset_after_swap, sha256_reader};
use crate::disk::ext4_fs::{self, Ext4FileRw, Ext4Fs, FileMap, LivePartition};
use crate::disk::extent_file::ExtentFile;
use crate::io::{PartitionWindow, SyncData};
use crate::source::checksum::hex;
use crate::tools::{self, find_program};

/// Free blocks a staged image leaves alone: its extent tree's blocks and what
/// the live system writes next to its overlay.
pub const STAGE_MARGIN: u64 = 16 << 20;

/// Stage, verify, fold, swap and reset wherever the plan's files are: on the
/// ext4 live partition here, on FAT or plain files in [`replace`].
pub(crate) fn replace_in_place(
    plan: &MergePlan,
    built: &Path,
    root: &Path,
    fsck_changed: &[u64],
    fresh_overlay: Option<&Path>,
    report: &mut MergeReport,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<(), MergeError> {
    match &plan.ext4 {
        Some(place) => ext4_replace(
            plan,
            place,
            built,
            root,
            fsck_changed,
            fresh_overlay,
            report,
            progress,
        ),
        None => replace(
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

/// The name a staged image has beside `squashfs` ("/LiveOS/squashfs.img").
pub fn staged_of(squashfs: &str) -> String {
    format!("{squashfs}.new")
}

fn ext4_err(device: &Path) -> impl Fn(ext4_fs::Ext4FsError) -> MergeError + '_ {
    move |e| MergeError::Ext4 {
        device: device.to_path_buf(),
        what: e.to_string(),
    }
}

/// The partition's file system read afresh (debugfs changed it) and the map of
/// `path` in it, `None` when it is not there.
fn remap(
    dev: &mut File,
    device: &Path,
    partition: &LivePartition,
    path: &str,
) -> Result<(LivePartition, Option<FileMap>), MergeError> {
    let mut window = PartitionWindow::new(&mut *dev, partition.start, partition.len);
    let fs = Ext4Fs::open(&mut window).map_err(ext4_err(device))?;
    let map = fs.file(&mut window, path).map_err(ext4_err(device))?;
    let mut fresh = partition.clone();
    fresh.fs = fs;
    Ok((fresh, map))
}

/// [`remap`] of the overlay, which must still be there: each step that changed the
/// partition is followed by a fresh look before the overlay is written again.
fn remap_overlay(
    dev: &mut File,
    device: &Path,
    partition: &LivePartition,
    overlay: &str,
) -> Result<(LivePartition, FileMap), MergeError> {
    let (partition, map) = remap(dev, device, partition, overlay)?;
    let map = map.ok_or_else(|| MergeError::Ext4 {
        device: device.to_path_buf(),
        what: format!("{overlay} is gone"),
    })?;
    Ok((partition, map))
}

/// Runs a `debugfs -w` script on the partition in place (`DEVICE?offset=N`);
/// debugfs reports a failed command only as text, so callers check its effect.
fn debugfs_w(device: &Path, partition: &LivePartition, script: &str) -> Result<String, MergeError> {
    let shown = device.display().to_string();
    if shown.contains('?') {
        return Err(MergeError::Ext4 {
            device: device.to_path_buf(),
            what: "debugfs cannot name a device whose path has a '?'; rename the image file".into(),
        });
    }
    let exe = find_program(&tools::DEBUGFS)?;
    let spec = format!("{shown}?offset={}", partition.start);
    let mut child = Command::new(&exe)
        .args(["-w", "-f", "-", &spec])
        .env("LC_ALL", "C")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_at(&exe))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(io_at(&exe))?;
    }
    let out = child.wait_with_output().map_err(io_at(&exe))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(MergeError::Ext4 {
            device: device.to_path_buf(),
            what: format!("debugfs failed: {}", text.trim()),
        });
    }
    Ok(text)
}

/// Removes `squashfs.img.new` a stopped merge left in the live directory of the
/// ext4 live partition: before the swap it is the unfinished new image, after it
/// the old one; `squashfs.img` is whole either way. Returns what was repaired,
/// for stderr and JSON `repaired`. `dev` must be synced by the caller before (its
/// writes must be on the device debugfs opens).
pub fn repair_leftovers(
    dev: &mut File,
    device: &Path,
    partition: &LivePartition,
    live_dir: &str,
) -> Result<Vec<String>, MergeError> {
    let squashfs = format!("/{}/squashfs.img", live_dir.trim_matches('/'));
    let staged = staged_of(&squashfs);
    let (_, map) = remap(dev, device, partition, &staged)?;
    if map.is_none() {
        return Ok(Vec::new());
    }
    debugfs_w(
        device,
        partition,
        &format!("rm {}\n", staged.trim_start_matches('/')),
    )?;
    dev.sync_all().map_err(io_at(device))?;
    if remap(dev, device, partition, &staged)?.1.is_some() {
        return Err(MergeError::Ext4 {
            device: device.to_path_buf(),
            what: format!("debugfs did not remove {staged}"),
        });
    }
    Ok(vec![format!(
        "{staged} was left by a merge that stopped (the unfinished new image, or the old one after the swap; {squashfs} is whole): removed and its blocks freed"
    )])
}

/// What [`repair_leftovers`] would remove, read only (for a dry run).
pub fn leftovers(
    dev: &mut File,
    device: &Path,
    partition: &LivePartition,
    live_dir: &str,
) -> Result<Vec<String>, MergeError> {
    let squashfs = format!("/{}/squashfs.img", live_dir.trim_matches('/'));
    let staged = staged_of(&squashfs);
    Ok(match remap(dev, device, partition, &staged)?.1 {
        Some(_) => vec![format!(
            "{staged} was left by a merge that stopped: it is removed and its blocks freed"
        )],
        None => Vec::new(),
    })
}

/// Stage, verify, fold, swap and reset on the ext4 live partition.
#[allow(clippy::too_many_arguments)]
fn ext4_replace(
    plan: &MergePlan,
    place: &Ext4Place,
    built: &Path,
    root: &Path,
    fsck_changed: &[u64],
    fresh_overlay: Option<&Path>,
    report: &mut MergeReport,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<(), MergeError> {
    let device = place.device.as_path();
    let staged = staged_of(&place.squashfs);
    let new_len = report.new_squashfs_bytes;
    let probe = crate::disk::target::probe(device).map_err(crate::disk::stick::StickError::from)?;
    let mut dev = crate::disk::target::open_existing(&probe, true)
        .map_err(crate::disk::stick::StickError::from)?;
    report.repaired.extend(repair_leftovers(
        &mut dev,
        device,
        &place.partition,
        &place.live_dir,
    )?);
    let (partition, _) = remap(&mut dev, device, &place.partition, &place.squashfs)?;
    if partition.fs.needs_recovery {
        return Err(MergeError::Ext4 {
            device: device.to_path_buf(),
            what: format!(
                "ext4 partition {} was not cleanly unmounted since the merge was planned; nothing was changed",
                partition.number
            ),
        });
    }
    let bs = partition.fs.block_size;
    check_space(
        "the new squashfs.img next to the old one on the ext4 partition",
        &plan.target_dir,
        new_len.div_ceil(bs) * bs + STAGE_MARGIN,
        partition.fs.free_blocks * bs,
    )?;

    // Stage: blocks given (unwritten), the bytes streamed straight into them.
    let rel = staged.trim_start_matches('/');
    debugfs_w(
        device,
        &partition,
        &format!(
            "write /dev/null {rel}\n{}",
            crate::disk::ext4_live::mode_line(rel)
        ),
    )?;
    if new_len > 0 {
        crate::disk::ext4_live::grow_file(device, &partition, &staged, 0, new_len).map_err(
            |e| MergeError::Ext4 {
                device: device.to_path_buf(),
                what: e.to_string(),
            },
        )?;
    }
    let (partition, map) = remap(&mut dev, device, &partition, &staged)?;
    let map = map.ok_or_else(|| MergeError::Ext4 {
        device: device.to_path_buf(),
        what: format!("debugfs did not create {staged}"),
    })?;
    let runs: Vec<(u64, u64)> = map
        .byte_runs(bs, &staged)
        .map_err(ext4_err(device))?
        .into_iter()
        .map(|(at, len)| (partition.start + at, len))
        .collect();
    let want = {
        let mut input = File::open(built).map_err(io_at(built))?;
        let mut out = ExtentFile::new(&mut dev, &runs);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 4 << 20];
        let mut done = 0u64;
        loop {
            let n = input.read(&mut buf).map_err(io_at(built))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|source| staging_failed(device, &staged, source))?;
            done += n as u64;
            progress("stage", done, new_len);
        }
        out.flush()
            .map_err(|source| staging_failed(device, &staged, source))?;
        hex(&hasher.finalize())
    };
    dev.sync_all()
        .map_err(|source| staging_failed(device, &staged, source))?;
    failpoint(plan, "stage")?;

    drop_cache(&dev);
    let got = {
        let mut back = ExtentFile::new(&mut dev, &runs);
        sha256_reader(&mut back, device, new_len, progress)?
    };
    if got != want {
        dev.sync_all().map_err(io_at(device))?;
        let _ = repair_leftovers(&mut dev, device, &partition, &place.live_dir);
        return Err(MergeError::VerifyMismatch {
            path: PathBuf::from(format!("{}:{staged}", device.display())),
            got,
            want,
        });
    }
    // Only now does ext4 read the blocks instead of zeros.
    {
        let mut window = PartitionWindow::new(&mut dev, partition.start, partition.len);
        ext4_fs::mark_initialised(&partition.fs, &mut window, map.inode)
            .map_err(ext4_err(device))?;
        window.flush().map_err(io_at(device))?;
    }
    dev.sync_all().map_err(io_at(device))?;
    failpoint(plan, "verify")?;

    let (partition, overlay) = remap_overlay(&mut dev, device, &partition, &place.overlay)?;
    {
        let mut ov = Ext4FileRw::new(&mut dev, &partition, &overlay);
        let ov_len = ov.len();
        report.fsck_chunks_folded =
            fold_chunks(&mut ov, ov_len, root, fsck_changed, &mut |d, t| {
                progress("fold", d, t)
            })?;
        ov.sync_data().map_err(io_at(device))?;
    }
    failpoint(plan, "fold")?;

    let dir = format!("/{}", place.live_dir.trim_matches('/'));
    let name = |p: &str| p.rsplit('/').next().unwrap_or(p).to_string();
    {
        let mut window = PartitionWindow::new(&mut dev, partition.start, partition.len);
        ext4_fs::exchange_entries(
            &partition.fs,
            &mut window,
            &dir,
            &name(&place.squashfs),
            &name(&staged),
        )
        .map_err(ext4_err(device))?;
        window.flush().map_err(io_at(device))?;
    }
    dev.sync_all().map_err(io_at(device))?;
    // The state a stop between the exchange and the free leaves, for the tests.
    failpoint(plan, "swap-half")?;
    debugfs_w(device, &partition, &format!("rm {rel}\n"))?;
    dev.sync_all().map_err(io_at(device))?;
    failpoint(plan, "swap")?;

    let (partition, overlay) = remap_overlay(&mut dev, device, &partition, &place.overlay)?;
    {
        let mut ov = Ext4FileRw::new(&mut dev, &partition, &overlay);
        let ov_len = ov.len();
        reset_after_swap(&mut ov, ov_len, fresh_overlay)?;
        ov.sync_data().map_err(io_at(device))?;
    }
    report.overlay_reset = true;
    report.new_squashfs_sha256 = want;
    failpoint(plan, "reset")?;
    Ok(())
}

/// A failed write of the staged image: the step is named and the old image stands.
fn staging_failed(device: &Path, staged: &str, source: std::io::Error) -> MergeError {
    MergeError::Ext4 {
        device: device.to_path_buf(),
        what: format!(
            "stage: writing the new squashfs.img as {staged} failed; the old image is still in place: {source}"
        ),
    }
}

/// [`repair_leftovers`] on the stick at `device` when its live directory is on an
/// ext4 partition (nothing otherwise): opened for writing only when there is a
/// leftover, through the safety checks of every change. With `write` false, what
/// the real run would repair, read only (a dry run). One line per repair.
pub fn repair_ext4_stick(
    device: &Path,
    live_dir: &str,
    write: bool,
) -> Result<Vec<String>, MergeError> {
    let fail = |e: ext4_fs::Ext4FsError| MergeError::Ext4 {
        device: device.to_path_buf(),
        what: e.to_string(),
    };
    let (found, partition) = {
        let mut look = crate::disk::opened::open_path(device, false).map_err(io_at(device))?;
        let Some(partition) = ext4_fs::find_live_partition(&mut look, live_dir).map_err(fail)?
        else {
            return Ok(Vec::new());
        };
        (
            leftovers(&mut look, device, &partition, live_dir)?,
            partition,
        )
    };
    if found.is_empty() || !write {
        return Ok(found);
    }
    // The command opened its target once, through the safety checks of every
    // change; its handle serves here too.
    let mut dev = crate::disk::opened::open_path(device, true).map_err(io_at(device))?;
    repair_leftovers(&mut dev, device, &partition, live_dir)
}

/// Replays the journal of the stick's ext4 live partition in place when the live
/// system left it to replay (powered off with the partition mounted), as mounting it
/// would, before a `write` changes anything there; nothing when the stick has no
/// such partition or it was cleanly unmounted. The line says what was done.
pub fn replay_ext4_journal(device: &Path, live_dir: &str) -> Result<Vec<String>, MergeError> {
    let fail = |e: ext4_fs::Ext4FsError| MergeError::Ext4 {
        device: device.to_path_buf(),
        what: e.to_string(),
    };
    let mut dev = crate::disk::opened::open_path(device, true).map_err(io_at(device))?;
    let Some(partition) = ext4_fs::find_live_partition(&mut dev, live_dir).map_err(fail)? else {
        return Ok(Vec::new());
    };
    if !partition.fs.needs_recovery {
        return Ok(Vec::new());
    }
    let (_, line) = ext4_fs::replay_partition(&mut dev, &partition).map_err(fail)?;
    Ok(vec![line])
}
