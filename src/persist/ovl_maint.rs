//! Checking, repairing and growing an OverlayFS overlay (`rd.live.overlay.overlayfs`):
//! a file holding an ext4 file system with `overlayfs/` (the upper dir) and `ovlwork/`.
//!
//! There is no dm "Invalid" bit here: the equivalent of a damaged overlay is an ext4
//! that e2fsck does not call clean. Checks run `e2fsck -f -n` (read-only), repairs
//! `e2fsck -f -y`, grows `e2fsck -f -p` (what resize2fs asks for: journal replay and
//! the safe fixes a boot-time fsck makes) and then `resize2fs`. e2fsprogs is the
//! reference implementation of ext4; nothing is mounted and no root is needed.
//!
//! A bare overlay file is checked and changed in place. An overlay on a stick is not,
//! although e2fsprogs accepts `stick.img?offset=N`: resize2fs then truncates the
//! *containing* file to the new file-system size (it ignores the offset), which would
//! cut an image-file stick short, and a fragmented overlay (after a grow on a FAT
//! with files behind it) has no single offset at all. So on a stick the overlay is
//! copied into a work directory ([`WorkCopy`], sparse), the tools run on the copy,
//! and only the 4 KiB blocks they changed are written back through the FAT extents,
//! the primary superblock last (as e2fsprogs itself writes it last): until then the
//! stick holds the old, valid file system. Read-only checks of a contiguous overlay
//! run in place (`e2fsck -n` opens it read-only and never resizes anything).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;
use thiserror::Error;

use crate::disk::ext4::{self, Ext4Error, Superblock};
use crate::io::{IoAt, SyncData};
use crate::persist::workdir;
use crate::tools::{DEBUGFS, DUMPE2FS, E2FSCK, RESIZE2FS, Tool, ToolMissing, find_program};

/// Granularity of the write-back: the blocks e2fsck/resize2fs changed.
pub const WRITE_BACK_CHUNK: u64 = 4096;
/// Where the primary ext4 superblock lives in the overlay file.
const SUPERBLOCK: std::ops::Range<u64> =
    ext4::SUPERBLOCK_OFFSET..ext4::SUPERBLOCK_OFFSET + ext4::SUPERBLOCK_BYTES as u64;
/// Problems listed in a report; the rest are counted.
const MAX_PROBLEMS: usize = 40;

#[derive(Debug, Error)]
pub enum OvlMaintError {
    #[error(transparent)]
    ToolMissing(#[from] ToolMissing),
    #[error(transparent)]
    Ext4(#[from] Ext4Error),
    /// Reading a work copy to tell what a tool changed.
    #[error(transparent)]
    WorkCopy(#[from] IoAt),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot grow {overlay} from {current} bytes to {requested} bytes: {reason}")]
    CannotGrow {
        overlay: String,
        current: u64,
        requested: u64,
        reason: String,
    },
    #[error(
        "the ext4 file system in {overlay} says it has {fs_bytes} bytes but the file holds only {file_bytes}: the file was cut short, and neither e2fsck nor resize2fs can bring the missing part back. Reset the overlay (`livestick overlay reset`) after saving what you need from it"
    )]
    FsLargerThanFile {
        overlay: String,
        fs_bytes: u64,
        file_bytes: u64,
    },
    #[error("`{tool}` could not run on {overlay}: exit {code} ({meaning}). Output:\n{output}")]
    ToolFailed {
        tool: &'static str,
        overlay: String,
        code: i32,
        meaning: &'static str,
        output: String,
    },
    #[error(
        "not enough space in the work dir {dir} for a copy of {overlay}: {needed} bytes needed ({needed_mib} MiB), {free} bytes free ({free_mib} MiB). Free space there or pass --workdir DIR on a file system with room"
    )]
    NoRoom {
        dir: PathBuf,
        overlay: String,
        needed: u64,
        needed_mib: u64,
        free: u64,
        free_mib: u64,
    },
    #[error(
        "read-back of {overlay} at byte {offset} does not match what was written: the medium did not keep the write. Run `livestick overlay recover TARGET` to see the state of the file system"
    )]
    Verify { overlay: String, offset: u64 },
}

impl crate::error::Classify for OvlMaintError {
    fn kind(&self) -> crate::error::ErrorKind {
        match self {
            OvlMaintError::CannotGrow { .. }
            | OvlMaintError::FsLargerThanFile { .. }
            | OvlMaintError::NoRoom { .. } => crate::error::ErrorKind::BadInput,
            _ => crate::error::ErrorKind::Io,
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            OvlMaintError::CannotGrow { .. } => {
                "nothing was changed; ask for a size larger than the overlay (--add-mb N, or a larger --size-mb)"
            }
            OvlMaintError::NoRoom { .. } => {
                "nothing was changed; free space in the work dir, or pass --workdir DIR on a file system with room"
            }
            OvlMaintError::FsLargerThanFile { .. } => {
                "nothing was changed; save what you need from the overlay, then `livestick overlay reset` starts it afresh"
            }
            _ => self.kind().hint(),
        }
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> OvlMaintError {
    let what = what.into();
    move |source| OvlMaintError::Io { what, source }
}

/// What the primary superblock says, beyond [`crate::disk::ext4::Ext4Info`]: the flags that make a file
/// system need a check before it may be resized.
#[derive(Debug, Clone, Serialize)]
pub struct Super {
    #[serde(rename = "block_bytes")]
    pub block_size: u64,
    pub blocks: u64,
    /// `blocks × block_size`: the file system's size, at most the file's.
    pub fs_bytes: u64,
    pub free_bytes: u64,
    /// `needs_recovery`: the journal holds transactions not yet written home (the
    /// live system was not shut down cleanly).
    pub needs_recovery: bool,
    /// Inodes on the orphan list (deleted while open when the system stopped).
    pub orphans: bool,
    /// The kernel recorded an error (`s_state` has EXT2_ERROR_FS).
    pub errors_recorded: bool,
    /// `s_error_count`: errors the kernel counted since the last check.
    pub error_count: u32,
    /// The primary superblock is unreadable; these facts come from the backup at
    /// this byte offset (e2fsck finds it too, and a repair rewrites the primary).
    #[serde(skip)]
    pub backup_at: Option<u64>,
}

impl Super {
    pub fn read_from<R: Read + Seek>(r: &mut R) -> Result<Super, OvlMaintError> {
        let mut sb = vec![0u8; 1024];
        r.seek(SeekFrom::Start(SUPERBLOCK.start))
            .and_then(|_| r.read_exact(&mut sb))
            .map_err(io_err("reading the overlay's ext4 superblock"))?;
        Super::parse(&sb)
    }

    pub fn parse(sb: &[u8]) -> Result<Super, OvlMaintError> {
        Ok(Super::from(&Superblock::parse(sb)?))
    }

    /// The primary superblock, or when that is unreadable the first backup that
    /// mke2fs put at the start of block group 1 (for 1, 2 or 4 KiB blocks) and
    /// that says it is one; the primary's error when there is none.
    pub fn read_or_backup<R: Read + Seek>(r: &mut R) -> Result<Super, OvlMaintError> {
        let primary = match Super::read_from(r) {
            Ok(sb) => return Ok(sb),
            Err(e) => e,
        };
        for block in [1024u64, 2048, 4096] {
            // Group 1 starts after 8 × block_size blocks; 1 KiB blocks start at 1.
            let first_block = if block == 1024 { 1 } else { 0 };
            let at = (8 * block + first_block) * block;
            let mut sb = vec![0u8; ext4::SUPERBLOCK_BYTES];
            if r.seek(SeekFrom::Start(at))
                .and_then(|_| r.read_exact(&mut sb))
                .is_err()
            {
                continue;
            }
            let group = crate::bytes::u16_at(&sb, 0x5a);
            match Superblock::parse(&sb) {
                Ok(found) if found.block_size == block && group == 1 => {
                    return Ok(Super {
                        backup_at: Some(at),
                        ..Super::from(&found)
                    });
                }
                _ => continue,
            }
        }
        Err(primary)
    }

    /// Findings from the superblock alone, in words.
    pub fn findings(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(at) = self.backup_at {
            v.push(format!(
                "the primary superblock is damaged: read from its backup at byte {at} (--repair rewrites it from there)"
            ));
        }
        if self.needs_recovery {
            v.push(
                "the journal was not replayed: the live system was not shut down cleanly (a read-only check skips the journal; --repair replays it)".to_string(),
            );
        }
        if self.orphans {
            v.push("inodes on the orphan list wait to be released".to_string());
        }
        if self.errors_recorded || self.error_count > 0 {
            v.push(format!(
                "the kernel recorded file-system errors ({} since the last check)",
                self.error_count
            ));
        }
        v
    }
}

impl From<&Superblock> for Super {
    fn from(sb: &Superblock) -> Super {
        Super {
            block_size: sb.block_size,
            blocks: sb.block_count,
            fs_bytes: sb.size_bytes(),
            free_bytes: sb.free_bytes(),
            needs_recovery: sb.needs_recovery(),
            orphans: sb.has_orphans(),
            errors_recorded: sb.errors_recorded(),
            error_count: sb.error_count,
            backup_at: None,
        }
    }
}

/// A grow of an OverlayFS overlay: the file and the ext4 in it end at `new_bytes`.
#[derive(Debug, Clone, Serialize)]
pub struct GrowPlan {
    /// The overlay file's size now.
    pub current_bytes: u64,
    /// The ext4 file system's size now (smaller than the file after a grow that
    /// stopped before resize2fs).
    pub fs_bytes_before: u64,
    pub requested_bytes: u64,
    pub new_bytes: u64,
    /// Bytes appended to the file (0 when it already has the size).
    pub added_bytes: u64,
    #[serde(rename = "block_bytes")]
    pub block_size: u64,
    pub notes: Vec<String>,
}

/// Plans a grow to `requested` bytes, at most `max_bytes` (the FAT limit; capped with a
/// note, as for dm-snapshot overlays) and whole ext4 blocks. Shrinking is refused, and
/// so is a grow that would change nothing.
pub fn plan_grow(
    overlay: &str,
    file_bytes: u64,
    sb: &Super,
    requested: u64,
    max_bytes: u64,
) -> Result<GrowPlan, OvlMaintError> {
    if sb.fs_bytes > file_bytes {
        return Err(OvlMaintError::FsLargerThanFile {
            overlay: overlay.to_string(),
            fs_bytes: sb.fs_bytes,
            file_bytes,
        });
    }
    let cannot = |reason: String| OvlMaintError::CannotGrow {
        overlay: overlay.to_string(),
        current: file_bytes,
        requested,
        reason,
    };
    let mut notes = Vec::new();
    let mut target = requested;
    if target > max_bytes {
        notes.push(format!(
            "capped at {max_bytes} bytes, the largest file a FAT32 stick can hold"
        ));
        target = max_bytes;
    }
    let bs = sb.block_size.max(1024);
    if !target.is_multiple_of(bs) {
        target = target / bs * bs;
        notes.push(format!(
            "rounded down to whole {bs}-byte ext4 blocks: {target} bytes"
        ));
    }
    if target < file_bytes {
        return Err(cannot(format!(
            "that is smaller than the overlay ({target} bytes after rounding); shrinking is not supported"
        )));
    }
    if target == sb.fs_bytes {
        return Err(cannot(format!(
            "the overlay and its ext4 already have {target} bytes; ask for more (--add-mb N or a larger --size-mb)"
        )));
    }
    if target == file_bytes {
        notes.push(
            "the file already has this size (an earlier grow stopped before resize2fs): only the ext4 inside grows".to_string(),
        );
    }
    Ok(GrowPlan {
        current_bytes: file_bytes,
        fs_bytes_before: sb.fs_bytes,
        requested_bytes: requested,
        new_bytes: target,
        added_bytes: target - file_bytes,
        block_size: bs,
        notes,
    })
}

/// How e2fsck is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FsckMode {
    /// `-n`: read-only, answers no to every question.
    Check,
    /// `-p`: preen, the fixes a boot-time fsck makes unattended.
    Preen,
    /// `-y`: answers yes to every question.
    Repair,
}

impl FsckMode {
    fn flag(self) -> &'static str {
        match self {
            FsckMode::Check => "-n",
            FsckMode::Preen => "-p",
            FsckMode::Repair => "-y",
        }
    }
}

/// What one e2fsck run found or did.
#[derive(Debug, Clone, Serialize)]
pub struct FsckReport {
    pub mode: FsckMode,
    pub command: String,
    pub exit_code: i32,
    pub meaning: &'static str,
    /// Nothing to fix: exit 0 and no superblock flag asking for a check.
    pub clean: bool,
    /// e2fsck changed the file system (exit 1 or 2).
    pub modified: bool,
    /// Problems remain (exit 4: found by a check, or not fixed by -p/-y).
    pub errors_left: bool,
    /// Superblock findings (journal not replayed, orphans, recorded errors), taken
    /// before the run.
    pub findings: Vec<String>,
    /// The problems e2fsck printed, without its questions and answers.
    pub problems: Vec<String>,
    /// Problems beyond the ones listed.
    pub more_problems: usize,
    /// Its closing line: files and blocks in use.
    pub summary: Option<String>,
    pub output: String,
}

fn exit_meaning(code: i32, mode: FsckMode) -> &'static str {
    match code {
        0 => "no errors",
        1 | 2 => "errors corrected",
        4 if mode == FsckMode::Check => "errors found, not corrected (read-only check)",
        4 => "errors left uncorrected",
        8 => "operational error",
        12 => "interrupted",
        16 => "usage or syntax error",
        32 => "canceled by request",
        128 => "shared-library error",
        _ => "unexpected exit status",
    }
}

/// Runs `e2fsck -f <mode>` on `image` (a path, or `device?offset=N` for read-only
/// checks in place). `show` names the overlay in the report. Exit codes 0, 1, 2 and 4
/// are reports; anything else means e2fsck could not do its job and is an error.
pub fn fsck(
    image: &OsStr,
    show: &str,
    mode: FsckMode,
    sb: &Super,
) -> Result<FsckReport, OvlMaintError> {
    let exe = find_program(&E2FSCK)?;
    let image = not_an_option(image);
    let out = Command::new(&exe)
        .arg("-f")
        .arg(mode.flag())
        .arg(&image)
        .env("LC_ALL", "C")
        .output()
        .map_err(io_err(format!("running {}", exe.display())))?;
    let code = out.status.code().unwrap_or(-1);
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stderr));
    // e2fsck starts its lines with the image's path (options stripped); name the
    // overlay instead.
    let name = image.to_string_lossy();
    let name = format!("{}:", name.split('?').next().unwrap_or_default());
    let output = output
        .lines()
        .map(|l| match l.strip_prefix(&name) {
            Some(rest) => format!("{show}:{rest}"),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let meaning = exit_meaning(code, mode);
    if !matches!(code, 0 | 1 | 2 | 4) {
        return Err(OvlMaintError::ToolFailed {
            tool: "e2fsck",
            overlay: show.to_string(),
            code,
            meaning,
            output: output.trim().to_string(),
        });
    }
    let (mut problems, summary) = parse_fsck_output(&output, show);
    let more_problems = problems.len().saturating_sub(MAX_PROBLEMS);
    problems.truncate(MAX_PROBLEMS);
    let findings = sb.findings();
    Ok(FsckReport {
        mode,
        command: format!("e2fsck -f {}", mode.flag()),
        exit_code: code,
        meaning,
        clean: code == 0 && (mode != FsckMode::Check || findings.is_empty()),
        modified: matches!(code, 1 | 2),
        errors_left: code == 4,
        findings,
        problems,
        more_problems,
        summary,
        output,
    })
}

/// The problem lines of e2fsck's output, and its closing summary. Drops the banner,
/// pass headers, remarks about the run itself (preen's "RUN fsck MANUALLY" included:
/// the caller says what to run) and the questions with their answers ("Fix? no"),
/// keeping what each question was about. `name` is the prefix preen mode puts on
/// every line.
pub fn parse_fsck_output(output: &str, name: &str) -> (Vec<String>, Option<String>) {
    let mut problems = Vec::new();
    let mut summary = None;
    let prefix = format!("{name}: ");
    for line in output.lines() {
        let line = line.trim();
        let line = line.strip_prefix(&prefix).unwrap_or(line);
        if line.is_empty()
            || line.starts_with("e2fsck 1.")
            || line.starts_with("Pass ")
            || line.contains("***** ")
            || line.starts_with("Warning: skipping journal recovery")
            || line.contains("UNEXPECTED INCONSISTENCY")
            || line.starts_with("(i.e., without -a or -p options)")
        {
            continue;
        }
        // "NAME: 13/8192 files (0.0% non-contiguous), 6940/32768 blocks"
        let rest = line.rsplit_once(": ").map_or(line, |(_, r)| r);
        if rest.starts_with(|c: char| c.is_ascii_digit())
            && rest.contains(" files (")
            && rest.ends_with(" blocks")
        {
            summary = Some(rest.to_string());
            continue;
        }
        let text = strip_question(line);
        if !text.is_empty() {
            problems.push(text.to_string());
        }
    }
    (problems, summary)
}

/// "Inode 14 ref count is 3, should be 1.  Fix? no" → "Inode 14 ref count is 3,
/// should be 1."; a line that is only a question and its answer → "".
fn strip_question(line: &str) -> &str {
    let Some(q) = line
        .strip_suffix("? no")
        .or_else(|| line.strip_suffix("? yes"))
    else {
        return line;
    };
    // The question starts after the last sentence end ("." or ")" or ":" + space).
    match q.rfind(['.', ')', ':', ']']) {
        Some(i) if q[i + 1..].starts_with(' ') => line[..=i].trim_end(),
        _ => "",
    }
}

/// `resize2fs <image> <new_bytes/1024>K` on a file that already has `new_bytes`
/// (never `device?offset=N`: resize2fs would truncate the containing file).
pub fn resize(image: &Path, show: &str, new_bytes: u64) -> Result<String, OvlMaintError> {
    let exe = find_program(&RESIZE2FS)?;
    let out = Command::new(&exe)
        .arg(not_an_option(image.as_os_str()))
        .arg(format!("{}K", new_bytes / 1024))
        .env("LC_ALL", "C")
        .output()
        .map_err(io_err(format!("running {}", exe.display())))?;
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(OvlMaintError::ToolFailed {
            tool: "resize2fs",
            overlay: show.to_string(),
            code: out.status.code().unwrap_or(-1),
            meaning: "the file system was not resized",
            output: output.trim().to_string(),
        });
    }
    Ok(output)
}

/// A relative path starting with `-` would be read as an option: `./-x`.
fn not_an_option(path: &OsStr) -> OsString {
    if path.as_encoded_bytes().starts_with(b"-") {
        let mut p = OsString::from("./");
        p.push(path);
        p
    } else {
        path.to_os_string()
    }
}

/// `device?offset=N`, how e2fsprogs reads a contiguous file inside a device or image
/// in place; None when the path itself holds a `?` (e2fsprogs would split it there).
pub fn in_place_spec(device: &Path, offset: u64) -> Option<OsString> {
    if device.as_os_str().to_string_lossy().contains('?') {
        return None;
    }
    // The command's opened target as `/proc/self/fd/N`, never its path again.
    let mut s = crate::disk::target::tool_path(device).into_os_string();
    s.push(format!("?offset={offset}"));
    Some(s)
}

/// Free bytes in `dir`, checked against a copy of `needed` bytes.
pub fn check_workdir(dir: &Path, overlay: &str, needed: u64) -> Result<u64, OvlMaintError> {
    let free = workdir::free_bytes(dir).map_err(|e| OvlMaintError::Io {
        what: format!(
            "work dir {} (pass --workdir DIR to use another)",
            dir.display()
        ),
        // Worded as it always was: the directory, then the cause.
        source: io::Error::other(format!("{}: {e}", dir.display())),
    })?;
    if needed > free {
        return Err(OvlMaintError::NoRoom {
            dir: dir.to_path_buf(),
            overlay: overlay.to_string(),
            needed,
            needed_mib: needed.div_ceil(1 << 20),
            free,
            free_mib: free >> 20,
        });
    }
    Ok(free)
}

/// What a write-back did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WriteBack {
    pub chunks_written: u64,
    pub bytes_written: u64,
}

/// A sparse copy of an overlay in a work directory (deleted on drop), with the chunk
/// fingerprints of the state the overlay on the stick is in, so that what the tools
/// change can be written back alone.
pub struct WorkCopy {
    file: tempfile::NamedTempFile,
    show: String,
    baseline: Vec<u64>,
    /// Chunks written back whether or not they changed: see [`WorkCopy::settle_fresh_area`].
    forced: Vec<u64>,
}

impl WorkCopy {
    /// Copies `len` bytes of `src` into a new file in `dir` (blocks of zeros become
    /// holes). `progress(done, total)`.
    pub fn create<R: Read + Seek>(
        src: &mut R,
        len: u64,
        dir: &Path,
        show: &str,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<WorkCopy, OvlMaintError> {
        let file = tempfile::Builder::new()
            .prefix("livestick-overlay-")
            .suffix(".img")
            .tempfile_in(dir)
            .map_err(io_err(format!(
                "creating a work file in {} (pass --workdir DIR for a writable directory with room)",
                dir.display()
            )))?;
        let what = || format!("copying {show} to {}", file.path().display());
        src.seek(SeekFrom::Start(0)).map_err(io_err(what()))?;
        let mut out = file.as_file();
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0u64;
        progress(0, len);
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            src.read_exact(&mut buf[..n]).map_err(io_err(what()))?;
            for (i, block) in buf[..n].chunks(WRITE_BACK_CHUNK as usize).enumerate() {
                if block.iter().any(|&b| b != 0) {
                    let at = done + i as u64 * WRITE_BACK_CHUNK;
                    out.seek(SeekFrom::Start(at)).map_err(io_err(what()))?;
                    out.write_all(block).map_err(io_err(what()))?;
                }
            }
            done += n as u64;
            progress(done, len);
        }
        out.set_len(len).map_err(io_err(what()))?;
        Ok(WorkCopy {
            file,
            show: show.to_string(),
            baseline: Vec::new(),
            forced: Vec::new(),
        })
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Extends the copy with zeros, as the overlay on the stick will be extended.
    pub fn set_len(&self, len: u64) -> Result<(), OvlMaintError> {
        self.file
            .as_file()
            .set_len(len)
            .map_err(io_err(format!("extending {}", self.path().display())))
    }

    /// Records the copy's state as the one the stick's overlay has (before the tools
    /// run; after the copy is extended like the overlay will be).
    pub fn mark_baseline(&mut self) -> Result<(), OvlMaintError> {
        self.baseline = workdir::chunk_fingerprints(self.path(), WRITE_BACK_CHUNK)?;
        Ok(())
    }

    /// Writes the chunks changed since [`WorkCopy::mark_baseline`] into `ov` (the
    /// overlay on the stick, already as long as the copy): all but the primary
    /// superblock first, a sync, then the superblock, a sync; then reads them back.
    pub fn write_back<W: Read + Write + Seek + SyncData>(
        &self,
        ov: &mut W,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<WriteBack, OvlMaintError> {
        self.write_back_holding(ov, SUPERBLOCK, progress)
    }

    /// [`WorkCopy::write_back`] with `held` (bytes of the file) written last instead
    /// of the superblock alone: the bytes that make the file system the new one, so
    /// that until they land, after a sync of everything else, it is the old one. For
    /// a LUKS container that is the encrypted start of its data, where the inner
    /// superblock and group descriptors are; the container's own first KiB is the
    /// LUKS header, which a grow does not change.
    pub fn write_back_holding<W: Read + Write + Seek + SyncData>(
        &self,
        ov: &mut W,
        held: std::ops::Range<u64>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<WriteBack, OvlMaintError> {
        let mut changed = workdir::changed_chunks(self.path(), WRITE_BACK_CHUNK, &self.baseline)?;
        changed.extend(&self.forced);
        changed.sort_unstable();
        changed.dedup();
        let mut copy = File::open(self.path())
            .map_err(io_err(format!("reading {}", self.path().display())))?;
        let len = copy
            .metadata()
            .map_err(io_err(format!("reading {}", self.path().display())))?
            .len();
        let ov_len = ov
            .seek(SeekFrom::End(0))
            .map_err(io_err(format!("writing {}", self.show)))?;
        if ov_len < len {
            return Err(OvlMaintError::Io {
                what: format!("writing {} back", self.show),
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the overlay has {ov_len} bytes, the work copy {len}"),
                ),
            });
        }
        let show = self.show.clone();
        let werr = move || io_err(format!("writing {show} back"));
        let total = changed.len() as u64 * WRITE_BACK_CHUNK;
        let mut report = WriteBack::default();
        let mut buf = vec![0u8; WRITE_BACK_CHUNK as usize];
        // What falls in `held`, by offset: written last.
        let mut last: Vec<(u64, Vec<u8>)> = Vec::new();
        progress(0, total);
        for (i, &c) in changed.iter().enumerate() {
            let at = c * WRITE_BACK_CHUNK;
            let n = WRITE_BACK_CHUNK.min(len - at.min(len)) as usize;
            copy.seek(SeekFrom::Start(at)).map_err(werr())?;
            copy.read_exact(&mut buf[..n]).map_err(werr())?;
            let end = at + n as u64;
            let pieces: Vec<(u64, u64)> = if at < held.end && held.start < end {
                let (lo, hi) = (held.start.max(at), held.end.min(end));
                last.push((lo, buf[(lo - at) as usize..(hi - at) as usize].to_vec()));
                vec![(at, lo), (hi, end)]
            } else {
                vec![(at, end)]
            };
            for (from, to) in pieces.into_iter().filter(|(f, t)| f < t) {
                ov.seek(SeekFrom::Start(from)).map_err(werr())?;
                ov.write_all(&buf[(from - at) as usize..(to - at) as usize])
                    .map_err(werr())?;
            }
            report.chunks_written += 1;
            report.bytes_written += n as u64;
            progress((i as u64 + 1) * WRITE_BACK_CHUNK, total);
        }
        ov.flush().map_err(werr())?;
        ov.sync_data().map_err(werr())?;
        // The held range's first 4 KiB (the block with the superblock, for a file
        // system that starts there) after a sync of the rest of it: until that
        // block lands the old superblock describes the old file system, whichever
        // of its new group descriptors and bitmaps have landed.
        let first_block = held.start..held.start.saturating_add(4096).min(held.end);
        for in_first_block in [false, true] {
            let mut wrote = false;
            for (at, bytes) in &last {
                let end = at + bytes.len() as u64;
                let (lo, hi) = (first_block.start.max(*at), first_block.end.min(end));
                let pieces = if lo < hi {
                    if in_first_block {
                        vec![(lo, hi)]
                    } else {
                        vec![(*at, lo), (hi, end)]
                    }
                } else if in_first_block {
                    Vec::new()
                } else {
                    vec![(*at, end)]
                };
                for (from, to) in pieces.into_iter().filter(|(f, t)| f < t) {
                    ov.seek(SeekFrom::Start(from)).map_err(werr())?;
                    ov.write_all(&bytes[(from - at) as usize..(to - at) as usize])
                        .map_err(werr())?;
                    wrote = true;
                }
            }
            if wrote {
                ov.flush().map_err(werr())?;
                ov.sync_data().map_err(werr())?;
            }
        }
        // Read back what was written: the stick must now equal the copy.
        let mut back = vec![0u8; WRITE_BACK_CHUNK as usize];
        for &c in &changed {
            let at = c * WRITE_BACK_CHUNK;
            let n = WRITE_BACK_CHUNK.min(len - at.min(len)) as usize;
            copy.seek(SeekFrom::Start(at)).map_err(werr())?;
            copy.read_exact(&mut buf[..n]).map_err(werr())?;
            ov.seek(SeekFrom::Start(at)).map_err(werr())?;
            ov.read_exact(&mut back[..n]).map_err(werr())?;
            if buf[..n] != back[..n] {
                return Err(OvlMaintError::Verify {
                    overlay: self.show.clone(),
                    offset: at,
                });
            }
        }
        Ok(report)
    }
}

/// `bg_flags` bits of an ext4 group descriptor, as dumpe2fs names them.
const BG_INODE_UNINIT: u16 = 0x1;
const BG_BLOCK_UNINIT: u16 = 0x2;
const BG_ITABLE_ZEROED: u16 = 0x4;

/// One block group, as `dumpe2fs` (without `-h`) lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Group {
    index: u64,
    first_block: u64,
    flags: u16,
    /// Blocks of its inode table, end exclusive.
    inode_table: std::ops::Range<u64>,
}

/// The block groups in dumpe2fs output: "Group N: (Blocks a-b) ... [FLAGS]" and, below
/// it, "Inode table at x-y". None when a group lacks either.
fn parse_groups(text: &str) -> Option<Vec<Group>> {
    let mut groups: Vec<Group> = Vec::new();
    let mut table_seen = true;
    for line in text.lines() {
        // "Group descriptor size:" in the header is no group.
        if let Some(rest) = line
            .strip_prefix("Group ")
            .filter(|r| r.contains("(Blocks "))
        {
            if !table_seen {
                return None;
            }
            let (index, rest) = rest.split_once(':')?;
            let first = rest.split_once("(Blocks ")?.1.split(['-', ')']).next()?;
            let flags = match rest.rsplit_once('[') {
                Some((_, f)) => f
                    .trim_end_matches(']')
                    .split(',')
                    .map(|f| match f.trim() {
                        "INODE_UNINIT" => BG_INODE_UNINIT,
                        "BLOCK_UNINIT" => BG_BLOCK_UNINIT,
                        "ITABLE_ZEROED" => BG_ITABLE_ZEROED,
                        _ => 0,
                    })
                    .fold(0, |a, b| a | b),
                None => 0,
            };
            groups.push(Group {
                index: index.trim().parse().ok()?,
                first_block: first.trim().parse().ok()?,
                flags,
                inode_table: 0..0,
            });
            table_seen = false;
        } else if let Some(rest) = line.trim_start().strip_prefix("Inode table at ") {
            let g = groups.last_mut()?;
            let span = rest.split_whitespace().next()?;
            let (a, b) = span.split_once('-').unwrap_or((span, span));
            g.inode_table = a.parse().ok()?..b.parse::<u64>().ok()? + 1;
            table_seen = true;
        }
    }
    (table_seen && !groups.is_empty()).then_some(groups)
}

/// The groups a grow added (they start at or past `fresh_start`, the old file
/// system's end) that hold no inodes: their inode tables may keep stale bytes,
/// provided their descriptors do not say "zeroed".
fn lazy_groups(groups: &[Group], block_size: u64, fresh_start: u64) -> Vec<&Group> {
    groups
        .iter()
        .filter(|g| g.first_block * block_size >= fresh_start && g.flags & BG_INODE_UNINIT != 0)
        .collect()
}

/// The [`WRITE_BACK_CHUNK`]s to write in `fresh` (bytes): every block `used` marks
/// in use there, except the inode tables of `lazy` groups.
fn fresh_chunks(
    used: &[std::ops::Range<u64>],
    lazy: &[&Group],
    block_size: u64,
    fresh: std::ops::Range<u64>,
) -> Vec<u64> {
    let mut skip: Vec<std::ops::Range<u64>> = lazy
        .iter()
        .map(|g| g.inode_table.start * block_size..g.inode_table.end * block_size)
        .collect();
    skip.sort_by_key(|r| r.start);
    let mut chunks = Vec::new();
    for r in used {
        let mut pieces = vec![r.start.max(fresh.start)..r.end.min(fresh.end)];
        for s in &skip {
            pieces = pieces
                .into_iter()
                .flat_map(|p| {
                    if s.end <= p.start || p.end <= s.start {
                        vec![p]
                    } else {
                        vec![p.start..s.start.max(p.start), s.end.min(p.end)..p.end]
                    }
                })
                .filter(|p| p.start < p.end)
                .collect();
        }
        for p in pieces.into_iter().filter(|p| p.start < p.end) {
            chunks.extend(p.start / WRITE_BACK_CHUNK..p.end.div_ceil(WRITE_BACK_CHUNK));
        }
    }
    chunks.sort_unstable();
    chunks.dedup();
    chunks
}

/// What [`WorkCopy::settle_fresh_area`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FreshArea {
    /// New groups whose inode tables are left for the kernel to zero after mount.
    pub lazy_inode_tables: u64,
    /// Of those, the groups whose descriptors said "zeroed" until livestick cleared it.
    pub zeroed_flags_cleared: u64,
    /// Metadata blocks of the new space written back even where the copy equals its baseline.
    pub metadata_bytes: u64,
}

/// Runs an e2fsprogs tool in the C locale; its stdout, or why it failed.
fn run_e2fsprogs(tool: Tool, args: &[&OsStr], show: &str) -> Result<String, OvlMaintError> {
    let exe = find_program(&tool)?;
    let out = Command::new(&exe)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .map_err(io_err(format!("running {}", exe.display())))?;
    if !out.status.success() {
        return Err(OvlMaintError::ToolFailed {
            tool: tool.name,
            overlay: show.to_string(),
            code: out.status.code().unwrap_or(-1),
            meaning: "it could not read the grown file system",
            output: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl WorkCopy {
    /// After a grow, before the write-back to a stick whose added clusters were not
    /// written: `fresh` (bytes past the old file system's end) holds zeros in the copy
    /// but stale bytes on the stick, and a content diff cannot see where a tool wrote
    /// zeros over zeros. resize2fs writes no bitmaps behind BLOCK_UNINIT/INODE_UNINIT
    /// and, where it finds no lazy init in /sys, writes new inode tables as zeros and
    /// marks them ITABLE_ZEROED. So the new groups' ITABLE_ZEROED is cleared here (the
    /// kernel's lazyinit zeroes those tables after mount; e2fsck and the kernel read no
    /// inode of an INODE_UNINIT group, the state mke2fs's own lazy tables are in), and
    /// every other block the bitmaps mark in use in `fresh` is written back, changed
    /// or not. Free blocks are never read, so the stale rest stays unwritten.
    pub fn settle_fresh_area(
        &mut self,
        fresh: std::ops::Range<u64>,
    ) -> Result<FreshArea, OvlMaintError> {
        let image = not_an_option(self.path().as_os_str());
        let show = self.show.clone();
        let listing = || run_e2fsprogs(DUMPE2FS, &[&image], &show);
        let unexpected = |what: &str| OvlMaintError::ToolFailed {
            tool: DUMPE2FS.name,
            overlay: show.clone(),
            code: 0,
            meaning: "its output was not understood",
            output: what.to_string(),
        };
        let sb = Super::read_from(
            &mut File::open(self.path())
                .map_err(io_err(format!("reading {}", self.path().display())))?,
        )?;
        let text = listing()?;
        let groups = parse_groups(&text).ok_or_else(|| unexpected("no block group list"))?;
        let lazy = lazy_groups(&groups, sb.block_size, fresh.start);
        let script: String = lazy
            .iter()
            .filter(|g| g.flags & BG_ITABLE_ZEROED != 0)
            .map(|g| {
                format!(
                    "set_bg {i} flags {f}\nset_bg {i} checksum calc\n",
                    i = g.index,
                    f = g.flags & !BG_ITABLE_ZEROED
                )
            })
            .collect();
        let cleared = script.lines().count() as u64 / 2;
        if cleared > 0 {
            let mut file =
                tempfile::NamedTempFile::new_in(self.path().parent().unwrap_or(Path::new(".")))
                    .map_err(io_err("writing a debugfs script"))?;
            file.write_all(script.as_bytes())
                .map_err(io_err("writing a debugfs script"))?;
            run_e2fsprogs(
                DEBUGFS,
                &[
                    OsStr::new("-w"),
                    OsStr::new("-f"),
                    file.path().as_os_str(),
                    &image,
                ],
                &show,
            )?;
            // debugfs reports a failed command on stderr and still exits 0: look again.
            let after =
                parse_groups(&listing()?).ok_or_else(|| unexpected("no block group list"))?;
            if let Some(g) = lazy_groups(&after, sb.block_size, fresh.start)
                .iter()
                .find(|g| g.flags & BG_ITABLE_ZEROED != 0)
            {
                return Err(unexpected(&format!(
                    "group {} still says its inode table is zeroed after debugfs set_bg",
                    g.index
                )));
            }
        }
        let used = ext4::parse_used_regions(&text, sb.fs_bytes)
            .ok_or_else(|| unexpected("no block size, block count or free block list"))?;
        let chunks = fresh_chunks(&used, &lazy, sb.block_size, fresh);
        let report = FreshArea {
            lazy_inode_tables: lazy.len() as u64,
            zeroed_flags_cleared: cleared,
            metadata_bytes: chunks.len() as u64 * WRITE_BACK_CHUNK,
        };
        self.forced = chunks;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn sb(block_size_log: u32, blocks: u32) -> Vec<u8> {
        let mut sb = vec![0u8; 1024];
        sb[0x04..0x08].copy_from_slice(&blocks.to_le_bytes());
        sb[0x18..0x1C].copy_from_slice(&block_size_log.to_le_bytes());
        sb[0x38..0x3A].copy_from_slice(&0xEF53u16.to_le_bytes());
        sb
    }

    #[test]
    fn groups_and_the_fresh_chunks_to_write() {
        let text = "Group descriptor size:    64\nBlock size:               1024\nBlock count:              24576\n\
Group 0: (Blocks 1-8192) csum 0x32d0 [ITABLE_ZEROED]\n  Inode table at 275-786 (+274)\n  Free blocks: 5000-8192\n\
Group 1: (Blocks 8193-16384) csum 0xf0f9 [INODE_UNINIT]\n  Inode table at 787-1298 (bg #0 + 786)\n  Free blocks: 8193-16384\n\
Group 2: (Blocks 16385-24575) csum 0x29ea [INODE_UNINIT, BLOCK_UNINIT, ITABLE_ZEROED]\n  Block bitmap at 16385 (+0)\n  Inode table at 16390-16901 (+5)\n  Free blocks: 16902-24575\n";
        let groups = parse_groups(text).unwrap();
        assert_eq!(groups.len(), 3);
        assert_eq!(
            groups[2].flags,
            BG_INODE_UNINIT | BG_BLOCK_UNINIT | BG_ITABLE_ZEROED
        );
        assert_eq!(groups[2].inode_table, 16390..16902);
        // The old file system ended at block 16385: only group 2 is new.
        let lazy = lazy_groups(&groups, 1024, 16385 * 1024);
        assert_eq!(lazy.iter().map(|g| g.index).collect::<Vec<_>>(), vec![2]);
        let used = ext4::parse_used_regions(text, 24576 * 1024).unwrap();
        let chunks = fresh_chunks(&used, &lazy, 1024, 16385 * 1024..24576 * 1024);
        // Blocks 16385-16389 (the bitmaps) in 4 KiB chunks 4096 and 4097; not the table.
        assert_eq!(chunks, vec![4096, 4097]);
        // A group without its inode table line is not understood.
        assert!(parse_groups("Group 0: (Blocks 1-8192) csum 0x1\n").is_none());
    }

    #[test]
    fn superblock_flags() {
        let mut raw = sb(0, 32768);
        let s = Super::parse(&raw).unwrap();
        assert_eq!((s.block_size, s.fs_bytes), (1024, 32 << 20));
        assert!(s.findings().is_empty());
        raw[0x60] |= 0x4;
        raw[0xE8] = 12;
        raw[0x3A] = 0x2;
        raw[0x194] = 3;
        let s = Super::parse(&raw).unwrap();
        assert!(s.needs_recovery && s.orphans && s.errors_recorded);
        assert_eq!(s.findings().len(), 3);
        assert!(Super::parse(&[0u8; 1024]).is_err());
    }

    #[test]
    fn grow_plans() {
        let s = Super::parse(&sb(0, 32768)).unwrap();
        let p = plan_grow("o", 32 << 20, &s, 64 << 20, u32::MAX as u64).unwrap();
        assert_eq!((p.added_bytes, p.new_bytes), (32 << 20, 64 << 20));
        let p = plan_grow("o", 32 << 20, &s, 8 << 30, u32::MAX as u64).unwrap();
        assert_eq!(p.new_bytes, (u32::MAX as u64) / 1024 * 1024);
        assert_eq!(p.notes.len(), 2, "{:?}", p.notes);
        // Shrinking, and a grow to the size the overlay has.
        assert!(plan_grow("o", 32 << 20, &s, 16 << 20, u64::MAX).is_err());
        assert!(plan_grow("o", 32 << 20, &s, 32 << 20, u64::MAX).is_err());
        // Finishing a grow that stopped after the file was extended.
        let p = plan_grow("o", 64 << 20, &s, 64 << 20, u64::MAX).unwrap();
        assert_eq!((p.added_bytes, p.fs_bytes_before), (0, 32 << 20));
        // An ext4 larger than its file.
        assert!(matches!(
            plan_grow("o", 16 << 20, &s, 64 << 20, u64::MAX),
            Err(OvlMaintError::FsLargerThanFile { .. })
        ));
    }

    #[test]
    fn fsck_output_is_reduced_to_problems() {
        let out = "Pass 1: Checking inodes, blocks, and sizes
Pass 2: Checking directory structure
Inode 14 ref count is 3, should be 1.  Fix? no

Pass 5: Checking group summary information
Block bitmap differences:  -(3000--3019)
Fix? no

Free inodes count wrong (9, counted=8178).
Fix? no

Resize inode not valid.  Recreate? yes

Entry 'x' in / (2) has deleted/unused inode 15.  Clear? yes


stick.img:/LiveOS/o: ********** WARNING: Filesystem still has errors **********

stick.img:/LiveOS/o: 8183/8192 files (0.0% non-contiguous), 6941/32768 blocks
e2fsck 1.47.0 (5-Feb-2023)
";
        let preen = "o.img: Inode 14 (...) has invalid mode (0170644).


o.img: UNEXPECTED INCONSISTENCY; RUN fsck MANUALLY.
\t(i.e., without -a or -p options)
";
        let (p, s) = parse_fsck_output(preen, "o.img");
        assert_eq!(p, ["Inode 14 (...) has invalid mode (0170644)."]);
        assert_eq!(s, None);
        let (p, s) = parse_fsck_output(out, "stick.img:/LiveOS/o");
        assert_eq!(
            p,
            [
                "Inode 14 ref count is 3, should be 1.",
                "Block bitmap differences:  -(3000--3019)",
                "Free inodes count wrong (9, counted=8178).",
                "Resize inode not valid.",
                "Entry 'x' in / (2) has deleted/unused inode 15.",
            ]
        );
        assert_eq!(
            s.as_deref(),
            Some("8183/8192 files (0.0% non-contiguous), 6941/32768 blocks")
        );
    }

    #[test]
    fn in_place_spec_refuses_question_marks() {
        assert_eq!(
            in_place_spec(Path::new("/dev/sdb"), 4096).unwrap(),
            "/dev/sdb?offset=4096"
        );
        assert!(in_place_spec(Path::new("/tmp/a?b.img"), 0).is_none());
    }

    use crate::io::SyncRecorder as Recorder;

    #[test]
    fn write_back_writes_changed_chunks_superblock_last() {
        let dir = tempfile::tempdir().unwrap();
        let mut orig = vec![0u8; 64 << 10];
        orig[1024..1028].copy_from_slice(b"SB01");
        orig[40000] = 7;
        let mut src = Cursor::new(orig.clone());
        let mut copy =
            WorkCopy::create(&mut src, orig.len() as u64, dir.path(), "o", &mut |_, _| {}).unwrap();
        assert_eq!(
            std::fs::read(copy.path()).unwrap(),
            orig,
            "sparse copy reads back"
        );
        copy.set_len(80 << 10).unwrap();
        copy.mark_baseline().unwrap();
        // "The tools": change the superblock, a GDT byte in chunk 0, one in the middle
        // and one in the extension.
        let mut want = std::fs::read(copy.path()).unwrap();
        want[1024..1028].copy_from_slice(b"SB02");
        want[2100] = 1;
        want[50000] = 9;
        want[70000] = 3;
        std::fs::write(copy.path(), &want).unwrap();
        let mut stick = orig.clone();
        stick.resize(80 << 10, 0);
        let mut rec = Recorder {
            inner: Cursor::new(stick),
            writes: Vec::new(),
            syncs: Vec::new(),
        };
        let r = copy.write_back(&mut rec, &mut |_, _| {}).unwrap();
        assert_eq!(r.chunks_written, 3);
        assert_eq!(rec.inner.get_ref(), &want);
        let last = *rec.writes.last().unwrap();
        assert_eq!(last, (1024, 1024), "the superblock is written last");
        assert!(
            rec.writes[..rec.writes.len() - 1]
                .iter()
                .all(|&(o, n)| o + n as u64 <= 1024 || o >= 2048),
            "{:?}",
            rec.writes
        );
        assert_eq!(rec.syncs, [rec.writes.len() - 1, rec.writes.len()]);
    }

    /// A held range across chunks (an encrypted home's first MiB of data, where its
    /// superblock and group descriptors are) goes back after a sync of the rest, and
    /// the container's own first KiB is no longer special.
    #[test]
    fn write_back_holding_writes_the_held_range_last() {
        let dir = tempfile::tempdir().unwrap();
        let orig = vec![0u8; 64 << 10];
        let mut src = Cursor::new(orig.clone());
        let mut copy =
            WorkCopy::create(&mut src, orig.len() as u64, dir.path(), "o", &mut |_, _| {}).unwrap();
        copy.mark_baseline().unwrap();
        let mut want = orig.clone();
        // Changed: the container's "superblock" place, two chunks inside the held
        // range (one straddling its start), one after it.
        want[1024] = 1;
        want[8190..8194].copy_from_slice(&[2, 2, 2, 2]);
        want[20000] = 3;
        want[40000] = 4;
        std::fs::write(copy.path(), &want).unwrap();
        let mut rec = Recorder {
            inner: Cursor::new(orig.clone()),
            writes: Vec::new(),
            syncs: Vec::new(),
        };
        let held = 8192..24576;
        copy.write_back_holding(&mut rec, held.clone(), &mut |_, _| {})
            .unwrap();
        assert_eq!(rec.inner.get_ref(), &want);
        let [first_sync, second_sync, last_sync] = rec.syncs[..] else {
            panic!("three syncs: {:?}", rec.syncs);
        };
        let within = |r: std::ops::Range<u64>| {
            move |&(o, n): &(u64, usize)| o < r.end && r.start < o + n as u64
        };
        let first_block = held.start..held.start + 4096;
        assert!(
            !rec.writes[..first_sync].iter().any(within(held.clone())),
            "{:?}",
            rec.writes
        );
        // The rest of the held range, then its first block alone, each synced.
        let rest = &rec.writes[first_sync..second_sync];
        assert!(
            !rest.is_empty() && rest.iter().all(within(held.clone())),
            "{:?}",
            rec.writes
        );
        assert!(
            !rest.iter().any(within(first_block.clone())),
            "{:?}",
            rec.writes
        );
        let last = &rec.writes[second_sync..];
        assert!(
            !last.is_empty()
                && last
                    .iter()
                    .all(|&(o, n)| o >= first_block.start && o + n as u64 <= first_block.end),
            "{:?}",
            rec.writes
        );
        assert_eq!(last_sync, rec.writes.len());
    }
}
