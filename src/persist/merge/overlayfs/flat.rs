//! An OverlayFS upper dir merged into a flat squashfs as a stream, without root.
//!
//! A flat root tree extracted onto the host keeps its owners, device nodes and
//! security xattrs only when the extracting process is root. Instead, the lower
//! image travels as a tar stream, `sqfs2tar` → livestick → `tar2sqfs`
//! (squashfs-tools-ng), and the upper dir is applied to the stream: every tar member
//! carries its owner, mode, time, device number and xattrs, so nothing is lost and
//! nothing needs privileges.
//!
//! Semantics are those of [`super::tree::apply`] (OverlayFS): an upper entry
//! replaces the lower entry at its path; a whiteout deletes it; an opaque directory
//! hides everything below it; any other upper directory over a lower directory is
//! merged and takes the upper's owner, mode, time and xattrs. Lower members the
//! upper does not touch pass through unchanged; upper members are appended after the
//! lower ones, parents first.
//!
//! One subtlety: a tar stream stores a hard-linked file's data once, with its first
//! name; later names are links to it. When the upper dir replaces or deletes that
//! first name, the other names still need the old contents (OverlayFS breaks the link
//! on copy-up), so the data of every dropped lower file is set aside in the work dir
//! until the stream ends, and the first surviving link gets it back.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::debugfs::Kind;
use super::error::{OvlError, io_at};
use super::tree::ApplyReport;
use super::upper::{UpperEntry, UpperTree};
use crate::persist::tar_stream::{EntryKind, TarEntry, TarReader, TarWriter};
use crate::squash::SquashError;
use crate::tools;

/// What the upper dir does to one lower path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Untouched: passes through.
    Keep,
    /// An upper entry (index into the upper entries) sits at this very path.
    Hit(usize),
    /// A whiteout, a non-directory or an opaque directory above it hides it.
    Under,
}

/// The upper entries by path, for deciding each lower member's fate.
pub struct UpperIndex<'a> {
    up: &'a UpperTree,
    by_path: HashMap<&'a [u8], usize>,
}

impl<'a> UpperIndex<'a> {
    pub fn new(up: &'a UpperTree) -> UpperIndex<'a> {
        let by_path = up
            .entries
            .iter()
            .enumerate()
            // A socket in the upper dir is not carried over and hides nothing (as in
            // the host-tree apply).
            .filter(|(_, e)| e.kind != Kind::Socket)
            .map(|(i, e)| (e.path.as_bytes(), i))
            .collect();
        UpperIndex { up, by_path }
    }

    pub fn fate(&self, path: &[u8]) -> Fate {
        if path.is_empty() {
            return Fate::Keep;
        }
        let mut start = 0;
        loop {
            let end = path[start..]
                .iter()
                .position(|&b| b == b'/')
                .map_or(path.len(), |i| start + i);
            // The upper tree is connected: below a path it lacks, it has nothing.
            let Some(&i) = self.by_path.get(&path[..end]) else {
                return Fate::Keep;
            };
            if end == path.len() {
                return Fate::Hit(i);
            }
            let e = &self.up.entries[i];
            if e.kind != Kind::Dir || e.opaque {
                return Fate::Under;
            }
            start = end + 1;
        }
    }

    /// Bytes of lower regular files the upper dir replaces or hides: the most the
    /// hard-link stash can hold.
    pub fn dropped_bytes<'p>(&self, lower_files: impl Iterator<Item = (&'p str, u64)>) -> u64 {
        lower_files
            .filter(|(p, _)| self.fate(p.as_bytes()) != Fate::Keep)
            .map(|(_, size)| size)
            .sum()
    }
}

fn upper_member(path: &[u8], u: &UpperEntry, kind: EntryKind) -> TarEntry {
    TarEntry {
        mode: u.perm,
        uid: u64::from(u.uid),
        gid: u64::from(u.gid),
        mtime: u.mtime,
        xattrs: u.xattrs.clone(),
        dev: u.rdev,
        ..TarEntry::new(path, kind)
    }
}

/// Applies `up` to the lower tree streaming through `lower`, writing the merged tree
/// to `out`. `progress` gets the lower data bytes read so far.
pub fn merge_stream<R: Read, W: Write>(
    up: &UpperTree,
    lower: &mut TarReader<R>,
    out: &mut TarWriter<W>,
    stash_dir: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<ApplyReport, OvlError> {
    fs::create_dir_all(stash_dir).map_err(io_at(stash_dir))?;
    let index = UpperIndex::new(up);
    let n = up.entries.len();
    let mut hit = vec![false; n];
    let mut merged = vec![false; n];
    // Dropped lower files (by path): metadata, and their data set aside.
    let mut stash: HashMap<Vec<u8>, (TarEntry, Option<PathBuf>)> = HashMap::new();
    // A dropped link target → the surviving name that now holds its data.
    let mut moved: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    let mut read = 0u64;
    let result = (|| -> Result<(), OvlError> {
        while let Some(e) = lower.next_entry()? {
            let keep = match index.fate(&e.path) {
                Fate::Keep => true,
                Fate::Hit(i) => {
                    hit[i] = true;
                    let u = &up.entries[i];
                    if u.kind == Kind::Dir && !u.opaque && e.kind == EntryKind::Dir {
                        merged[i] = true;
                        out.append(&upper_member(&e.path, u, EntryKind::Dir), None)?;
                        continue;
                    }
                    false
                }
                Fate::Under => false,
            };
            match (keep, e.kind) {
                (true, EntryKind::File) => {
                    out.append(&e, Some(&mut lower.data()))?;
                    read += e.size;
                    progress(read);
                }
                (true, EntryKind::HardLink) => {
                    if let Some(now) = moved.get(&e.link) {
                        let link = TarEntry {
                            link: now.clone(),
                            ..e.clone()
                        };
                        out.append(&link, None)?;
                    } else if let Some((meta, data)) = stash.remove(&e.link) {
                        let file = TarEntry {
                            path: e.path.clone(),
                            ..meta
                        };
                        match &data {
                            Some(p) => {
                                let mut f = File::open(p).map_err(io_at(p))?;
                                out.append(&file, Some(&mut f))?;
                                let _ = fs::remove_file(p);
                            }
                            None => out.append(&file, Some(&mut io::empty()))?,
                        }
                        moved.insert(e.link.clone(), e.path.clone());
                    } else {
                        out.append(&e, None)?;
                    }
                }
                (true, _) => out.append(&e, None)?,
                (false, EntryKind::File) => {
                    let data = if e.size > 0 {
                        let p = stash_dir.join(format!("d{}", stash.len()));
                        let mut f = BufWriter::new(File::create(&p).map_err(io_at(&p))?);
                        lower.copy_data(&mut f)?;
                        f.flush().map_err(io_at(&p))?;
                        Some(p)
                    } else {
                        None
                    };
                    read += e.size;
                    progress(read);
                    stash.insert(e.path.clone(), (e, data));
                }
                (false, _) => {}
            }
        }
        Ok(())
    })();
    for (_, data) in stash.into_values() {
        if let Some(p) = data {
            let _ = fs::remove_file(p);
        }
    }
    result?;

    let mut rep = ApplyReport::default();
    let mut first_name: HashMap<u32, &str> = HashMap::new();
    for (i, u) in up.entries.iter().enumerate() {
        match u.kind {
            Kind::Whiteout => {
                if hit[i] {
                    rep.removed += 1;
                }
                continue;
            }
            Kind::Socket => continue,
            _ if merged[i] => {
                rep.dirs_updated += 1;
                continue;
            }
            _ => {}
        }
        if hit[i] {
            rep.replaced += 1;
        } else {
            rep.created += 1;
        }
        let path = u.path.as_bytes();
        match u.kind {
            Kind::Dir => out.append(&upper_member(path, u, EntryKind::Dir), None)?,
            Kind::File => {
                if let Some(first) = first_name.get(&u.ino) {
                    let link = TarEntry {
                        link: first.as_bytes().to_vec(),
                        ..upper_member(path, u, EntryKind::HardLink)
                    };
                    out.append(&link, None)?;
                } else {
                    let src = u.content.as_ref().ok_or_else(|| OvlError::Host {
                        path: PathBuf::from(format!("/{}", u.path)),
                        what: "its contents were not read out of the overlay".into(),
                    })?;
                    let mut f = File::open(src).map_err(io_at(src))?;
                    let size = f.metadata().map_err(io_at(src))?.len();
                    let file = TarEntry {
                        size,
                        ..upper_member(path, u, EntryKind::File)
                    };
                    out.append(&file, Some(&mut f))?;
                    first_name.insert(u.ino, &u.path);
                }
            }
            Kind::Symlink => {
                let link = TarEntry {
                    link: u.target.clone().unwrap_or_default().into_bytes(),
                    ..upper_member(path, u, EntryKind::Symlink)
                };
                out.append(&link, None)?;
            }
            Kind::CharDev => out.append(&upper_member(path, u, EntryKind::CharDev), None)?,
            Kind::BlockDev => out.append(&upper_member(path, u, EntryKind::BlockDev), None)?,
            Kind::Fifo => out.append(&upper_member(path, u, EntryKind::Fifo), None)?,
            Kind::Whiteout | Kind::Socket => {}
        }
    }
    if up.entries.iter().any(|e| e.kind == Kind::Socket) {
        rep.notes.push(
            "sockets in the overlay were not carried over (they only mean something to a running process)".into(),
        );
    }
    Ok(rep)
}

/// Collects a child's stderr on a thread (so a full pipe never stalls it).
fn drain(child: &mut Child) -> std::thread::JoinHandle<String> {
    let mut err = child.stderr.take();
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    })
}

fn spawn(
    tool: tools::Tool,
    args: &[&std::ffi::OsStr],
    stdin: Stdio,
    stdout: Stdio,
) -> Result<Child, OvlError> {
    let exe = tools::find_program(&tool)?;
    Ok(Command::new(&exe)
        .args(args)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_at(&exe))?)
}

fn failed(tool: &str, args: &[&std::ffi::OsStr], status: String, stderr: &str) -> OvlError {
    OvlError::Tool(SquashError::ToolFailed {
        command: format!(
            "{tool} {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        ),
        status,
        stderr: stderr.trim().to_string(),
    })
}

/// Builds `out_image` from the flat squashfs `lower_image` (a plain file) with the
/// upper dir applied: `sqfs2tar` | merge | `tar2sqfs ARGS`. Returns what was applied;
/// files sqfs2tar could not put in a tar stream (sockets) are named in the notes.
pub fn rebuild_flat(
    lower_image: &Path,
    up: &UpperTree,
    out_image: &Path,
    tar2sqfs_args: &[String],
    work: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<ApplyReport, OvlError> {
    let jobs = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .to_string();
    let read_args: Vec<&std::ffi::OsStr> = vec![
        "--root-becomes".as_ref(),
        ".".as_ref(),
        lower_image.as_os_str(),
    ];
    let mut write_args: Vec<&std::ffi::OsStr> = vec![
        "--quiet".as_ref(),
        "--no-skip".as_ref(),
        "-j".as_ref(),
        jobs.as_ref(),
    ];
    write_args.extend(tar2sqfs_args.iter().map(std::ffi::OsStr::new));
    write_args.push(out_image.as_os_str());

    let mut reader = spawn(tools::SQFS2TAR, &read_args, Stdio::null(), Stdio::piped())?;
    let reader_err = drain(&mut reader);
    let mut writer = match spawn(tools::TAR2SQFS, &write_args, Stdio::piped(), Stdio::null()) {
        Ok(w) => w,
        Err(e) => {
            let _ = reader.kill();
            let _ = reader.wait();
            return Err(e);
        }
    };
    let writer_err = drain(&mut writer);

    let merged = match (reader.stdout.take(), writer.stdin.take()) {
        (Some(from), Some(to)) => {
            let mut lower = TarReader::new(BufReader::with_capacity(1 << 20, from));
            let mut out = TarWriter::new(BufWriter::with_capacity(1 << 20, to));
            merge_stream(up, &mut lower, &mut out, &work.join("stash"), progress).and_then(|rep| {
                // Closing tar2sqfs's stdin (dropping the writer) ends its input.
                out.finish()?;
                Ok(rep)
            })
        }
        _ => Err(OvlError::Host {
            path: lower_image.to_path_buf(),
            what: "could not connect sqfs2tar to tar2sqfs".into(),
        }),
    };
    if merged.is_err() {
        // Whatever tar2sqfs wrote is incomplete; stop both before reporting.
        let _ = writer.kill();
        let _ = reader.kill();
    }
    let writer_status = writer.wait().map_err(io_at(out_image))?;
    let reader_status = reader.wait().map_err(io_at(lower_image))?;
    let writer_err = writer_err.join().unwrap_or_default();
    let reader_err = reader_err.join().unwrap_or_default();
    let _ = fs::remove_dir_all(work.join("stash"));
    let mut rep = match merged {
        Ok(r) => r,
        Err(e) => {
            let _ = fs::remove_file(out_image);
            // A tool's own complaint explains a broken stream better than the stream.
            if !reader_status.success() && !reader_err.trim().is_empty() {
                return Err(failed(
                    "sqfs2tar",
                    &read_args,
                    reader_status.to_string(),
                    &reader_err,
                ));
            }
            if !writer_status.success() && !writer_err.trim().is_empty() {
                return Err(failed(
                    "tar2sqfs",
                    &write_args,
                    writer_status.to_string(),
                    &writer_err,
                ));
            }
            return Err(e);
        }
    };
    if !reader_status.success() {
        let _ = fs::remove_file(out_image);
        return Err(failed(
            "sqfs2tar",
            &read_args,
            reader_status.to_string(),
            &reader_err,
        ));
    }
    if !writer_status.success() {
        let _ = fs::remove_file(out_image);
        return Err(failed(
            "tar2sqfs",
            &write_args,
            writer_status.to_string(),
            &writer_err,
        ));
    }
    for line in reader_err.lines().map(str::trim).filter(|l| !l.is_empty()) {
        rep.notes.push(format!("sqfs2tar: {line}"));
    }
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: Kind, opaque: bool) -> UpperEntry {
        UpperEntry {
            path: path.into(),
            kind,
            opaque,
            ..super::super::upper::upper_root_entry()
        }
    }

    #[test]
    fn fates_follow_overlayfs_rules() {
        let up = UpperTree {
            entries: vec![
                entry("etc", Kind::Dir, false),
                entry("etc/opq", Kind::Dir, true),
                entry("etc/gone", Kind::Whiteout, false),
                entry("etc/file", Kind::File, false),
                entry("etc/sock", Kind::Socket, false),
            ],
            top: vec![0],
        };
        let ix = UpperIndex::new(&up);
        assert_eq!(ix.fate(b""), Fate::Keep);
        assert_eq!(ix.fate(b"usr/bin/x"), Fate::Keep);
        assert_eq!(ix.fate(b"etc"), Fate::Hit(0));
        assert_eq!(ix.fate(b"etc/other"), Fate::Keep);
        assert_eq!(ix.fate(b"etc/opq"), Fate::Hit(1));
        assert_eq!(ix.fate(b"etc/opq/old"), Fate::Under);
        assert_eq!(ix.fate(b"etc/gone"), Fate::Hit(2));
        assert_eq!(ix.fate(b"etc/gone/deep/er"), Fate::Under);
        assert_eq!(ix.fate(b"etc/file/x"), Fate::Under);
        assert_eq!(ix.fate(b"etc/sock"), Fate::Keep);
        assert_eq!(ix.fate(b"etcetera"), Fate::Keep);
        assert_eq!(
            ix.dropped_bytes(
                [("etc/opq/old", 5u64), ("etc/keep", 7), ("etc/gone", 11)].into_iter()
            ),
            16
        );
    }
}
