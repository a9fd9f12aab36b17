//! Merging an OverlayFS overlay (`rd.live.overlay.overlayfs`) into a new root image.
//!
//! The overlay file is an ext4 file system holding `overlayfs/` (the upper dir) and
//! `ovlwork/`. It is read without mounting, with `debugfs` (e2fsprogs, the reference
//! implementation of ext4): `ls -p` walks the tree, `stat` gives times, device numbers,
//! fast symlink targets and xattr names, `ea_get -f` and `dump` copy xattr values and
//! file contents out byte for byte. Every read names inodes (`<ino>`), so no file
//! name ever has to be quoted on a debugfs command line.
//!
//! The upper dir is then applied onto the root tree with OverlayFS semantics: files,
//! symlinks and device nodes replace; a whiteout (char device 0:0, or a file with
//! `trusted.overlay.whiteout`) deletes; a directory with `trusted.overlay.opaque=y`
//! replaces the whole lower directory; any other directory is merged and takes the
//! upper's owner, mode and xattrs (copy-up copied them from the lower one).
//! `trusted.overlay.*` attributes are OverlayFS bookkeeping and are not carried over.
//! Overlays using `redirect_dir` or `metacopy` are refused: their files only make
//! sense together with the lower layer they point into.
//!
//! Two targets:
//! - [`HostTree`]: an extracted tree on the host (EROFS), changed with plain system
//!   calls; keeping owners, devices and security xattrs takes root, so without root
//!   extract, apply and mkfs.erofs run in one child process under `fakeroot`, which
//!   records them for mkfs.erofs without privileges (a flat squashfs never lands on the
//!   host at all: see [`super::ovl_tar`]);
//! - [`Ext4Target`]: the nested `LiveOS/rootfs.img`, changed in place by one
//!   `debugfs -w` script (`write`, `mkdir`, `symlink`, `mknod`, `ln`, `rm`, `rmdir`,
//!   `set_inode_field`, `ea_set`, `ea_rm`); no mount and no root needed, and every
//!   file not named by the upper dir keeps its inode, labels and all.
//!
//! What is not carried over: the metadata of the upper root directory itself
//! (dracut creates it; the image's `/` keeps its own), sockets (debugfs cannot make
//! them; they are meaningless in an image anyway), ctime/atime (mtime is kept), and
//! names that are not UTF-8 or contain `"` or a newline (refused by name).

use crate::io::read_full;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;
use thiserror::Error;

use crate::disk::ext4::{self, Ext4Info, Ext4Options};
use crate::persist::erofs::{self, ErofsError, ErofsInfo};
use crate::persist::erofs_xattr;
use crate::persist::merge::{
    self, Inputs, Located, MergeError, MergePlan, MergeReport, free_bytes, with_readable_squashfs,
};
use crate::persist::ovl_tar;
use crate::persist::snapshot::{self, StatusReport, SyncData};
use crate::squash::{self, Compressor, ImageKind, SquashError};
use crate::tools::{self, DEBUGFS, FAKEROOT, ToolMissing, find_program};

/// The upper and work directories dracut uses inside the overlay file system.
pub const UPPER_DIR: &str = "overlayfs";
pub const WORK_DIR: &str = "ovlwork";

#[derive(Debug, Error)]
pub enum OvlError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    ToolMissing(#[from] ToolMissing),
    #[error(transparent)]
    Tool(#[from] SquashError),
    #[error(transparent)]
    Erofs(#[from] ErofsError),
    #[error(transparent)]
    Tar(#[from] crate::persist::tar_stream::TarError),
    #[error(transparent)]
    Ext4(#[from] ext4::Ext4Error),
    #[error("unexpected output from debugfs on {image} ({what}): {line:?}")]
    Parse {
        image: String,
        what: &'static str,
        line: String,
    },
    #[error(
        "{0}: the overlay file system has no /overlayfs directory, so it is not an OverlayFS overlay made by livestick or dracut"
    )]
    NoUpper(String),
    #[error(
        "{path:?}: a name that is not UTF-8 or contains a double quote or a newline cannot be passed to debugfs; rename or remove it in the live system, then merge again. Nothing was changed"
    )]
    BadName { path: String },
    #[error(
        "/{path} carries {xattr}: the live system's OverlayFS used {feature}, whose files only make sense together with the old lower layer; a file-by-file merge would be wrong. Nothing was changed"
    )]
    Unsupported {
        path: String,
        xattr: String,
        feature: &'static str,
    },
    #[error(
        "the fakeroot step of the merge (extract, apply, mkfs.erofs) failed ({status}):\n{stderr}"
    )]
    Fakeroot { status: String, stderr: String },
    #[error(
        "{0}: a directory overlay marks opaque directories and whiteouts with trusted.overlay.* attributes, which only root can read; without them the merge would be wrong. Run it as root (the directory sits on a mounted file system, which took root anyway)"
    )]
    DirNeedsRoot(PathBuf),
    #[error("debugfs reported errors while applying the overlay to {image}:\n{errors}")]
    ApplyFailed { image: PathBuf, errors: String },
    #[error("{path}: {what}")]
    Host { path: PathBuf, what: String },
}

pub(crate) fn io_at(path: &Path) -> impl FnOnce(io::Error) -> OvlError + '_ {
    move |source| OvlError::Io {
        path: path.to_path_buf(),
        source,
    }
}

// ---------------------------------------------------------------------------------
// debugfs

/// `debugfs` on one image (optionally at a byte offset inside a device or stick
/// image, with e2fsprogs' `image?offset=N` syntax).
#[derive(Debug, Clone)]
pub struct Debugfs {
    spec: std::ffi::OsString,
    show: String,
}

/// The output of one command of a script.
#[derive(Debug, Clone, Default)]
struct Section {
    body: String,
}

impl Debugfs {
    pub fn new(image: &Path, offset: u64) -> Debugfs {
        let mut spec = image.as_os_str().to_owned();
        if offset != 0 {
            spec.push(format!("?offset={offset}"));
        }
        Debugfs {
            spec,
            show: image.display().to_string(),
        }
    }

    /// Runs `cmds` as one script (`-f`), read-only unless `write`. Returns each
    /// command's standard output in order, and standard error (errors of single
    /// commands do not stop debugfs; callers decide what they mean).
    fn run(
        &self,
        cmds: &[String],
        write: bool,
        scratch: &Path,
    ) -> Result<(Vec<Section>, String), OvlError> {
        let exe = find_program(&DEBUGFS)?;
        if cmds.is_empty() {
            return Ok((Vec::new(), String::new()));
        }
        let mut script = tempfile::Builder::new()
            .prefix("livestick-debugfs-")
            .tempfile_in(scratch)
            .map_err(io_at(scratch))?;
        for c in cmds {
            writeln!(script, "{c}").map_err(io_at(scratch))?;
        }
        script.flush().map_err(io_at(scratch))?;
        let mut cmd = Command::new(&exe);
        if write {
            cmd.arg("-w");
        }
        let out = cmd
            .arg("-f")
            .arg(script.path())
            .arg(&self.spec)
            .env("LC_ALL", "C")
            .output()
            .map_err(io_at(&exe))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            return Err(SquashError::ToolFailed {
                command: format!("debugfs -f SCRIPT {}", self.show),
                status: out.status.to_string(),
                stderr,
            }
            .into());
        }
        // debugfs echoes each command of a script as "debugfs: CMD"; what follows
        // until the next echo is that command's output.
        let mut sections: Vec<Section> = Vec::with_capacity(cmds.len());
        for line in stdout.lines() {
            if line.starts_with("debugfs: ") {
                sections.push(Section::default());
            } else if let Some(s) = sections.last_mut() {
                s.body.push_str(line);
                s.body.push('\n');
            }
        }
        if sections.len() != cmds.len() {
            return Err(OvlError::Parse {
                image: self.show.clone(),
                what: "one echo per command",
                line: format!("{} commands, {} outputs", cmds.len(), sections.len()),
            });
        }
        Ok((sections, stderr))
    }
}

/// A name or path for a debugfs command line: quoted (spaces are fine), but debugfs
/// has no escape for a double quote, and a newline would end the command.
fn q(s: &str) -> Result<String, OvlError> {
    if s.contains('"') || s.contains('\n') {
        return Err(OvlError::BadName {
            path: s.to_string(),
        });
    }
    Ok(format!("\"{s}\""))
}

fn qp(p: &Path) -> Result<String, OvlError> {
    match p.to_str() {
        Some(s) => q(s),
        None => Err(OvlError::BadName {
            path: p.display().to_string(),
        }),
    }
}

/// The kind of an inode, from the type bits of its mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Dir,
    File,
    Symlink,
    CharDev,
    BlockDev,
    Fifo,
    Socket,
    /// An OverlayFS whiteout: the lower entry of this name is deleted.
    Whiteout,
}

fn kind_of_mode(mode: u32) -> Option<Kind> {
    Some(match mode & 0o170000 {
        0o040000 => Kind::Dir,
        0o100000 => Kind::File,
        0o120000 => Kind::Symlink,
        0o020000 => Kind::CharDev,
        0o060000 => Kind::BlockDev,
        0o010000 => Kind::Fifo,
        0o140000 => Kind::Socket,
        _ => return None,
    })
}

/// One line of `ls -p`: `/ino/mode/uid/gid/name/size/`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listed {
    ino: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    name: String,
    size: u64,
}

fn parse_ls_line(line: &str) -> Option<Listed> {
    let inner = line.strip_prefix('/')?.strip_suffix('/')?;
    let mut it = inner.splitn(5, '/');
    let ino = it.next()?.parse().ok()?;
    let mode = u32::from_str_radix(it.next()?, 8).ok()?;
    let uid = it.next()?.parse().ok()?;
    let gid = it.next()?.parse().ok()?;
    // The name cannot contain '/', so the last '/' separates it from the size
    // (empty for directories).
    let (name, size) = it.next()?.rsplit_once('/')?;
    Some(Listed {
        ino,
        mode,
        uid,
        gid,
        name: name.to_string(),
        size: if size.is_empty() {
            0
        } else {
            size.parse().ok()?
        },
    })
}

/// The entries of an `ls -p` output, without `.` and `..`; `None` when the output is
/// not a listing (the directory does not exist).
fn parse_listing(body: &str, image: &str) -> Result<Option<Vec<Listed>>, OvlError> {
    let mut out = Vec::new();
    let mut seen_dot = false;
    for line in body.lines().filter(|l| !l.trim().is_empty()) {
        let l = parse_ls_line(line).ok_or_else(|| OvlError::Parse {
            image: image.to_string(),
            what: "ls -p (a name with a newline?)",
            line: line.to_string(),
        })?;
        match l.name.as_str() {
            "." => seen_dot = true,
            ".." => {}
            _ => out.push(l),
        }
    }
    Ok(seen_dot.then_some(out))
}

/// What `stat` says beyond `ls -p`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct StatInfo {
    mtime: i64,
    rdev: (u32, u32),
    fast_link: Option<String>,
    xattr_names: Vec<String>,
}

fn parse_stat(body: &str) -> StatInfo {
    let mut s = StatInfo::default();
    let mut in_xattrs = false;
    for line in body.lines() {
        if in_xattrs {
            if let Some(rest) = line.strip_prefix("  ")
                && let Some((name, _)) = rest.split_once(" (")
            {
                s.xattr_names.push(name.to_string());
                continue;
            }
            in_xattrs = false;
        }
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix("mtime: 0x") {
            // "mtime: 0x6553f100:00000000 -- …": seconds, then nanoseconds << 2 |
            // two epoch bits (large inodes only).
            let stamp = rest.split_whitespace().next().unwrap_or("");
            let (secs, extra) = stamp.split_once(':').unwrap_or((stamp, "0"));
            let secs = u32::from_str_radix(secs, 16).unwrap_or(0) as i32 as i64;
            let epoch = i64::from(u32::from_str_radix(extra, 16).unwrap_or(0) & 3);
            s.mtime = secs + (epoch << 32);
        } else if let Some(i) = t.find("Device major/minor number: ") {
            let rest = &t[i + "Device major/minor number: ".len()..];
            let dev = rest.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = dev.split_once(':') {
                s.rdev = (a.parse().unwrap_or(0), b.parse().unwrap_or(0));
            }
        } else if let Some(rest) = t.strip_prefix("Fast link dest: \"") {
            s.fast_link = Some(rest.strip_suffix('"').unwrap_or(rest).to_string());
        } else if t.starts_with("Extended attributes:") {
            in_xattrs = true;
        }
    }
    s
}

// ---------------------------------------------------------------------------------
// The upper directory

/// One entry of the upper directory.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct UpperEntry {
    /// Path relative to the root, without a leading `/` (`etc/hostname`).
    pub path: String,
    pub ino: u32,
    pub kind: Kind,
    /// Permission bits (`mode & 0o7777`).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: i64,
    pub rdev: (u32, u32),
    pub target: Option<String>,
    /// xattrs to carry over (`trusted.overlay.*` removed).
    pub xattrs: Vec<(String, Vec<u8>)>,
    pub opaque: bool,
    pub children: Vec<usize>,
    /// The staged contents of a regular file (one per inode).
    pub content: Option<PathBuf>,
}

/// The upper directory, read out of the overlay.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct UpperTree {
    pub entries: Vec<UpperEntry>,
    /// The entries directly in the upper directory.
    pub top: Vec<usize>,
}

impl UpperTree {
    pub fn whiteouts(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| e.kind == Kind::Whiteout)
            .count()
    }
    pub fn opaque_dirs(&self) -> usize {
        self.entries.iter().filter(|e| e.opaque).count()
    }
    /// Bytes of regular-file contents.
    pub fn file_bytes(&self) -> u64 {
        let mut seen = HashSet::new();
        self.entries
            .iter()
            .filter(|e| e.kind == Kind::File && seen.insert(e.ino))
            .map(|e| e.size)
            .sum()
    }
}

/// A stand-in entry for the tree's root (only its times are used), and the defaults
/// of every entry before its details are read.
pub(crate) fn upper_root_entry() -> UpperEntry {
    UpperEntry {
        path: String::new(),
        ino: 0,
        kind: Kind::Dir,
        perm: 0o755,
        uid: 0,
        gid: 0,
        size: 0,
        mtime: 0,
        rdev: (0, 0),
        target: None,
        xattrs: Vec::new(),
        opaque: false,
        children: Vec::new(),
        content: None,
    }
}

/// Walks `/overlayfs` with `ls -p`, one debugfs run per directory level. Fills the
/// structure (names, kinds, owners, modes, sizes), not the details.
pub fn walk_upper(dbg: &Debugfs, scratch: &Path) -> Result<UpperTree, OvlError> {
    let (root, _) = dbg.run(&[format!("ls -p /{UPPER_DIR}")], false, scratch)?;
    let top = root
        .first()
        .map(|s| parse_listing(&s.body, &dbg.show))
        .transpose()?
        .flatten()
        .ok_or_else(|| OvlError::NoUpper(dbg.show.clone()))?;
    let mut tree = UpperTree::default();
    // (listing, parent entry index or None for the top, parent path)
    let mut level: Vec<(Vec<Listed>, Option<usize>, String)> = vec![(top, None, String::new())];
    while !level.is_empty() {
        let mut dirs: Vec<(usize, u32)> = Vec::new();
        for (listing, parent, base) in level {
            let mut listing = listing;
            // A stable order: the merge is reproducible and tests can predict it.
            listing.sort_by(|a, b| a.name.cmp(&b.name));
            for l in listing {
                let path = if base.is_empty() {
                    l.name.clone()
                } else {
                    format!("{base}/{}", l.name)
                };
                if path.contains('"') || path.contains('\n') || path.contains('\u{FFFD}') {
                    return Err(OvlError::BadName { path });
                }
                let Some(kind) = kind_of_mode(l.mode) else {
                    return Err(OvlError::Parse {
                        image: dbg.show.clone(),
                        what: "an inode type",
                        line: format!("{path}: mode {:o}", l.mode),
                    });
                };
                let i = tree.entries.len();
                tree.entries.push(UpperEntry {
                    path,
                    ino: l.ino,
                    kind,
                    perm: l.mode & 0o7777,
                    uid: l.uid,
                    gid: l.gid,
                    size: l.size,
                    ..upper_root_entry()
                });
                match parent {
                    Some(p) => tree.entries[p].children.push(i),
                    None => tree.top.push(i),
                }
                if kind == Kind::Dir {
                    dirs.push((i, l.ino));
                }
            }
        }
        if dirs.is_empty() {
            break;
        }
        let cmds: Vec<String> = dirs
            .iter()
            .map(|(_, ino)| format!("ls -p <{ino}>"))
            .collect();
        let (out, _) = dbg.run(&cmds, false, scratch)?;
        level = Vec::with_capacity(dirs.len());
        for ((i, _), s) in dirs.iter().zip(out) {
            let listing = parse_listing(&s.body, &dbg.show)?.unwrap_or_default();
            level.push((listing, Some(*i), tree.entries[*i].path.clone()));
        }
    }
    Ok(tree)
}

/// Reads what the walk left out: times, device numbers, symlink targets, xattrs
/// (values via files, byte for byte) and file contents, staged under `stage`.
pub fn read_upper_details(
    dbg: &Debugfs,
    tree: &mut UpperTree,
    stage: &Path,
) -> Result<(), OvlError> {
    read_upper(dbg, tree, stage, true)
}

/// Times, device numbers and xattrs (whiteouts, opaque dirs), without copying any
/// contents out: what planning needs to know which lower paths the upper dir hides.
/// Symlinks whose target is stored in a block keep `target: None`.
pub fn read_upper_meta(dbg: &Debugfs, tree: &mut UpperTree, stage: &Path) -> Result<(), OvlError> {
    read_upper(dbg, tree, stage, false)
}

fn read_upper(
    dbg: &Debugfs,
    tree: &mut UpperTree,
    stage: &Path,
    with_contents: bool,
) -> Result<(), OvlError> {
    fs::create_dir_all(stage).map_err(io_at(stage))?;
    // One stat per inode (hard links share it).
    let mut inos: Vec<u32> = tree.entries.iter().map(|e| e.ino).collect();
    inos.sort_unstable();
    inos.dedup();
    let cmds: Vec<String> = inos.iter().map(|i| format!("stat <{i}>")).collect();
    let (out, _) = dbg.run(&cmds, false, stage)?;
    let stats: HashMap<u32, StatInfo> = inos
        .iter()
        .zip(out)
        .map(|(i, s)| (*i, parse_stat(&s.body)))
        .collect();

    // xattr values and contents, by inode, into files.
    let mut cmds = Vec::new();
    let mut xattr_files: HashMap<(u32, String), PathBuf> = HashMap::new();
    for (n, (ino, st)) in stats.iter().enumerate() {
        for (k, name) in st.xattr_names.iter().enumerate() {
            let f = stage.join(format!("x{n}-{k}"));
            cmds.push(format!("ea_get -f {} <{ino}> {}", qp(&f)?, q(name)?));
            xattr_files.insert((*ino, name.clone()), f);
        }
    }
    let mut contents: HashMap<u32, PathBuf> = HashMap::new();
    for e in &tree.entries {
        let st = &stats[&e.ino];
        let wants_dump = with_contents
            && (e.kind == Kind::File || (e.kind == Kind::Symlink && st.fast_link.is_none()));
        if wants_dump && !contents.contains_key(&e.ino) {
            let f = stage.join(format!("f{}", e.ino));
            cmds.push(format!("dump <{}> {}", e.ino, qp(&f)?));
            contents.insert(e.ino, f);
        }
    }
    let (_, stderr) = dbg.run(&cmds, false, stage)?;

    for e in &mut tree.entries {
        let st = &stats[&e.ino];
        e.mtime = st.mtime;
        e.rdev = st.rdev;
        for name in &st.xattr_names {
            let f = &xattr_files[&(e.ino, name.clone())];
            // ea_get writes nothing for an empty value.
            let value = fs::read(f).unwrap_or_default();
            match name.as_str() {
                "trusted.overlay.opaque" if e.kind == Kind::Dir && value.first() == Some(&b'y') => {
                    e.opaque = true
                }
                "trusted.overlay.whiteout" if e.kind == Kind::File => e.kind = Kind::Whiteout,
                "trusted.overlay.redirect" | "trusted.overlay.metacopy" => {
                    return Err(OvlError::Unsupported {
                        path: e.path.clone(),
                        xattr: name.clone(),
                        feature: if name.ends_with("redirect") {
                            "redirect_dir (renamed directories)"
                        } else {
                            "metacopy (metadata-only copy-up)"
                        },
                    });
                }
                n if n.starts_with("trusted.overlay.") => {}
                _ => e.xattrs.push((name.clone(), value)),
            }
        }
        if e.kind == Kind::CharDev && e.rdev == (0, 0) {
            e.kind = Kind::Whiteout;
        }
        match e.kind {
            Kind::File => e.content = contents.get(&e.ino).cloned(),
            Kind::Symlink => {
                e.target = match &st.fast_link {
                    Some(t) => Some(t.clone()),
                    None if !with_contents => None,
                    None => {
                        let f = contents.get(&e.ino).ok_or_else(|| OvlError::Host {
                            path: PathBuf::from(&e.path),
                            what: "symlink target not read".into(),
                        })?;
                        Some(String::from_utf8_lossy(&fs::read(f).map_err(io_at(f))?).into_owned())
                    }
                };
            }
            _ => {}
        }
        if let Some(f) = &e.content
            && !f.exists()
        {
            return Err(OvlError::Host {
                path: PathBuf::from(format!("/{}", e.path)),
                what: format!(
                    "debugfs could not copy it out of the overlay: {}",
                    stderr.trim()
                ),
            });
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// Applying

/// What an apply did.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct ApplyReport {
    /// Paths written that did not exist in the lower tree.
    pub created: u64,
    /// Paths written over a lower entry (and lower entries replaced by opaque dirs).
    pub replaced: u64,
    /// Merged directories whose owner/mode/xattrs were updated.
    pub dirs_updated: u64,
    /// Lower entries deleted by whiteouts.
    pub removed: u64,
    pub notes: Vec<String>,
}

/// Where the upper dir is applied.
pub trait Target {
    /// The kind of `path` in the tree as it is now (`None`: absent).
    fn kind_of(&mut self, path: &str) -> Result<Option<Kind>, OvlError>;
    fn remove_all(&mut self, path: &str) -> Result<(), OvlError>;
    fn make_dir(&mut self, e: &UpperEntry) -> Result<(), OvlError>;
    /// A merged directory takes the upper's owner, mode and xattrs.
    fn update_dir(&mut self, e: &UpperEntry) -> Result<(), OvlError>;
    /// Called after a directory's children: sets its mtime.
    fn finish_dir(&mut self, e: &UpperEntry) -> Result<(), OvlError>;
    fn make_file(&mut self, e: &UpperEntry) -> Result<(), OvlError>;
    fn make_hardlink(&mut self, e: &UpperEntry, first: &str) -> Result<(), OvlError>;
    fn make_symlink(&mut self, e: &UpperEntry) -> Result<(), OvlError>;
    fn make_node(&mut self, e: &UpperEntry) -> Result<(), OvlError>;
}

/// Applies the upper tree onto `t` with OverlayFS semantics.
pub fn apply(
    up: &UpperTree,
    t: &mut dyn Target,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ApplyReport, OvlError> {
    let mut rep = ApplyReport::default();
    let mut links: HashMap<u32, String> = HashMap::new();
    let mut done = 0u64;
    let total = up.entries.len() as u64;
    apply_children(up, &up.top, t, &mut rep, &mut links, &mut |n| {
        done += n;
        progress(done, total)
    })?;
    if up.entries.iter().any(|e| e.kind == Kind::Socket) {
        rep.notes.push(
            "sockets in the overlay were not carried over (they only mean something to a running process)".into(),
        );
    }
    Ok(rep)
}

fn apply_children(
    up: &UpperTree,
    kids: &[usize],
    t: &mut dyn Target,
    rep: &mut ApplyReport,
    links: &mut HashMap<u32, String>,
    tick: &mut dyn FnMut(u64),
) -> Result<(), OvlError> {
    for &i in kids {
        let e = &up.entries[i];
        let lower = t.kind_of(&e.path)?;
        match e.kind {
            Kind::Whiteout => {
                if lower.is_some() {
                    t.remove_all(&e.path)?;
                    rep.removed += 1;
                }
            }
            Kind::Dir => {
                if lower == Some(Kind::Dir) && !e.opaque {
                    t.update_dir(e)?;
                    rep.dirs_updated += 1;
                } else {
                    if lower.is_some() {
                        t.remove_all(&e.path)?;
                        rep.replaced += 1;
                    } else {
                        rep.created += 1;
                    }
                    t.make_dir(e)?;
                }
                apply_children(up, &e.children, t, rep, links, tick)?;
                t.finish_dir(e)?;
            }
            Kind::Socket => {}
            kind => {
                if lower.is_some() {
                    t.remove_all(&e.path)?;
                    rep.replaced += 1;
                } else {
                    rep.created += 1;
                }
                match kind {
                    Kind::File => {
                        if let Some(first) = links.get(&e.ino) {
                            t.make_hardlink(e, first)?;
                        } else {
                            t.make_file(e)?;
                            links.insert(e.ino, e.path.clone());
                        }
                    }
                    Kind::Symlink => t.make_symlink(e)?,
                    _ => t.make_node(e)?,
                }
            }
        }
        tick(1);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// Host tree target

use crate::persist::host_xattr::remove_xattr;
pub use crate::persist::host_xattr::{get_xattr, list_xattrs, set_xattr};

/// An extracted root tree on the host.
pub struct HostTree {
    root: PathBuf,
}

impl HostTree {
    pub fn new(root: &Path) -> HostTree {
        HostTree {
            root: root.to_path_buf(),
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Owner, then mode (chown clears set-id bits), then xattrs (chown also clears
    /// security.capability).
    fn set_meta(&self, p: &Path, e: &UpperEntry, replace_xattrs: bool) -> Result<(), OvlError> {
        let host = |what: String| OvlError::Host {
            path: p.to_path_buf(),
            what,
        };
        std::os::unix::fs::lchown(p, Some(e.uid), Some(e.gid))
            .map_err(|err| host(format!("chown {}:{}: {err}", e.uid, e.gid)))?;
        if e.kind != Kind::Symlink {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(p, fs::Permissions::from_mode(e.perm))
                .map_err(|err| host(format!("chmod {:o}: {err}", e.perm)))?;
        }
        if replace_xattrs {
            let keep: HashSet<&str> = e.xattrs.iter().map(|(n, _)| n.as_str()).collect();
            for name in list_xattrs(p).unwrap_or_default() {
                if !keep.contains(name.as_str()) {
                    remove_xattr(p, &name)
                        .map_err(|err| host(format!("removing xattr {name}: {err}")))?;
                }
            }
        }
        for (name, value) in &e.xattrs {
            set_xattr(p, name, value).map_err(|err| host(format!("xattr {name}: {err}")))?;
        }
        if e.kind != Kind::Dir {
            self.set_time(p, e)?;
        }
        Ok(())
    }

    fn set_time(&self, p: &Path, e: &UpperEntry) -> Result<(), OvlError> {
        use nix::sys::stat::{UtimensatFlags, utimensat};
        use nix::sys::time::TimeSpec;
        let t = TimeSpec::new(e.mtime, 0);
        utimensat(None, p, &t, &t, UtimensatFlags::NoFollowSymlink).map_err(|err| OvlError::Host {
            path: p.to_path_buf(),
            what: format!("setting mtime: {err}"),
        })
    }
}

impl Target for HostTree {
    fn kind_of(&mut self, path: &str) -> Result<Option<Kind>, OvlError> {
        use std::os::unix::fs::FileTypeExt;
        let p = self.p(path);
        match fs::symlink_metadata(&p) {
            Ok(m) => {
                let t = m.file_type();
                Ok(Some(if t.is_dir() {
                    Kind::Dir
                } else if t.is_symlink() {
                    Kind::Symlink
                } else if t.is_char_device() {
                    Kind::CharDev
                } else if t.is_block_device() {
                    Kind::BlockDev
                } else if t.is_fifo() {
                    Kind::Fifo
                } else if t.is_socket() {
                    Kind::Socket
                } else {
                    Kind::File
                }))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(OvlError::Io { path: p, source: e }),
        }
    }

    fn remove_all(&mut self, path: &str) -> Result<(), OvlError> {
        let p = self.p(path);
        let is_dir = fs::symlink_metadata(&p)
            .map(|m| m.is_dir())
            .map_err(io_at(&p))?;
        if is_dir {
            fs::remove_dir_all(&p).map_err(io_at(&p))
        } else {
            fs::remove_file(&p).map_err(io_at(&p))
        }
    }

    fn make_dir(&mut self, e: &UpperEntry) -> Result<(), OvlError> {
        let p = self.p(&e.path);
        fs::create_dir(&p).map_err(io_at(&p))?;
        self.set_meta(&p, e, false)
    }

    fn update_dir(&mut self, e: &UpperEntry) -> Result<(), OvlError> {
        let p = self.p(&e.path);
        self.set_meta(&p, e, true)
    }

    fn finish_dir(&mut self, e: &UpperEntry) -> Result<(), OvlError> {
        let p = self.p(&e.path);
        self.set_time(&p, e)
    }

    fn make_file(&mut self, e: &UpperEntry) -> Result<(), OvlError> {
        let p = self.p(&e.path);
        let src = e.content.as_ref().ok_or_else(|| OvlError::Host {
            path: p.clone(),
            what: "no staged contents".into(),
        })?;
        // Staged in the same work dir: a rename, not a copy (but a copy works too).
        if fs::rename(src, &p).is_err() {
            fs::copy(src, &p).map_err(io_at(&p))?;
        }
        self.set_meta(&p, e, false)
    }

    fn make_hardlink(&mut self, e: &UpperEntry, first: &str) -> Result<(), OvlError> {
        let p = self.p(&e.path);
        fs::hard_link(self.p(first), &p).map_err(io_at(&p))
    }

    fn make_symlink(&mut self, e: &UpperEntry) -> Result<(), OvlError> {
        let p = self.p(&e.path);
        std::os::unix::fs::symlink(e.target.as_deref().unwrap_or(""), &p).map_err(io_at(&p))?;
        self.set_meta(&p, e, false)
    }

    fn make_node(&mut self, e: &UpperEntry) -> Result<(), OvlError> {
        use nix::sys::stat::{Mode, SFlag, makedev, mknod};
        let p = self.p(&e.path);
        let kind = match e.kind {
            Kind::CharDev => SFlag::S_IFCHR,
            Kind::BlockDev => SFlag::S_IFBLK,
            _ => SFlag::S_IFIFO,
        };
        mknod(
            &p,
            kind,
            Mode::from_bits_truncate(e.perm),
            makedev(u64::from(e.rdev.0), u64::from(e.rdev.1)),
        )
        .map_err(|err| OvlError::Host {
            path: p.clone(),
            what: format!("mknod: {err}"),
        })?;
        self.set_meta(&p, e, false)
    }
}

// ---------------------------------------------------------------------------------
// ext4 image target (nested rootfs.img), through one debugfs -w script

/// A lower directory as listed: name → (inode, kind).
type DirMap = HashMap<String, (u32, Kind)>;

pub struct Ext4Target {
    image: PathBuf,
    dbg: Debugfs,
    scratch: PathBuf,
    /// Directory (relative path) → its entries now (`None`: does not exist).
    dirs: HashMap<String, Option<DirMap>>,
    /// xattr names of the lower directories the upper dir merges into.
    dir_xattrs: HashMap<String, Vec<String>>,
    script: Vec<String>,
    /// First path of each hard-link group → number of names.
    link_counts: Vec<(String, u32)>,
    n_values: usize,
}

fn parent_and_name(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

impl Ext4Target {
    /// Opens `image` and lists, in one debugfs run, every lower directory the upper
    /// tree names (and their xattrs), so lookups need no debugfs run each.
    pub fn new(image: &Path, up: &UpperTree, scratch: &Path) -> Result<Ext4Target, OvlError> {
        let mut t = Ext4Target {
            image: image.to_path_buf(),
            dbg: Debugfs::new(image, 0),
            scratch: scratch.to_path_buf(),
            dirs: HashMap::new(),
            dir_xattrs: HashMap::new(),
            script: Vec::new(),
            link_counts: Vec::new(),
            n_values: 0,
        };
        let mut paths = vec![String::new()];
        paths.extend(
            up.entries
                .iter()
                .filter(|e| e.kind == Kind::Dir)
                .map(|e| e.path.clone()),
        );
        t.load(&paths)?;
        Ok(t)
    }

    fn load(&mut self, paths: &[String]) -> Result<(), OvlError> {
        let mut cmds = Vec::new();
        for p in paths {
            cmds.push(format!("ls -p {}", q(&format!("/{p}"))?));
            cmds.push(format!("ea_list {}", q(&format!("/{p}"))?));
        }
        let (out, _) = self.dbg.run(&cmds, false, &self.scratch)?;
        for (p, pair) in paths.iter().zip(out.chunks(2)) {
            let listing = parse_listing(&pair[0].body, &self.dbg.show)?;
            let map = listing.map(|l| {
                l.into_iter()
                    .filter_map(|x| kind_of_mode(x.mode).map(|k| (x.name, (x.ino, k))))
                    .collect::<DirMap>()
            });
            let names = parse_stat(&pair[1].body).xattr_names;
            self.dirs.insert(p.clone(), map);
            self.dir_xattrs.insert(p.clone(), names);
        }
        Ok(())
    }

    fn dir(&mut self, path: &str) -> Result<Option<&mut DirMap>, OvlError> {
        if !self.dirs.contains_key(path) {
            self.load(&[path.to_string()])?;
        }
        Ok(self.dirs.get_mut(path).and_then(|d| d.as_mut()))
    }

    fn abs(path: &str) -> Result<String, OvlError> {
        q(&format!("/{path}"))
    }

    fn value_file(&mut self, value: &[u8]) -> Result<PathBuf, OvlError> {
        self.n_values += 1;
        let f = self.scratch.join(format!("v{}", self.n_values));
        fs::write(&f, value).map_err(io_at(&f))?;
        Ok(f)
    }

    /// Owner, mode and xattrs of a new or merged inode, as debugfs commands.
    fn meta_cmds(&mut self, e: &UpperEntry, type_bits: u32) -> Result<(), OvlError> {
        let p = Self::abs(&e.path)?;
        if e.kind != Kind::Symlink {
            self.script
                .push(format!("sif {p} mode 0{:o}", type_bits | e.perm));
        }
        self.script.push(format!("sif {p} uid {}", e.uid));
        self.script.push(format!("sif {p} gid {}", e.gid));
        for (name, value) in &e.xattrs {
            let f = self.value_file(value)?;
            self.script
                .push(format!("ea_set -f {} {p} {}", qp(&f)?, q(name)?));
        }
        if e.kind != Kind::Dir {
            self.time_cmds(e)?;
        }
        Ok(())
    }

    fn time_cmds(&mut self, e: &UpperEntry) -> Result<(), OvlError> {
        let p = Self::abs(&e.path)?;
        self.script.push(format!("sif {p} mtime @{}", e.mtime));
        self.script.push(format!("sif {p} atime @{}", e.mtime));
        Ok(())
    }

    fn added(&mut self, path: &str, kind: Kind) -> Result<(), OvlError> {
        let (parent, name) = parent_and_name(path);
        if let Some(d) = self.dir(parent)? {
            d.insert(name.to_string(), (0, kind));
        }
        if kind == Kind::Dir {
            self.dirs.insert(path.to_string(), Some(DirMap::new()));
        }
        Ok(())
    }

    /// Runs the script. debugfs goes on after a failed command, so its error output
    /// is the verdict.
    pub fn finish(mut self) -> Result<(), OvlError> {
        for (first, n) in std::mem::take(&mut self.link_counts) {
            let p = Self::abs(&first)?;
            self.script.push(format!("sif {p} links_count {n}"));
        }
        let (_, stderr) = self.dbg.run(&self.script, true, &self.scratch)?;
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with("debugfs "))
            .collect();
        if !errors.is_empty() {
            let mut text = errors
                .iter()
                .take(20)
                .copied()
                .collect::<Vec<_>>()
                .join("\n");
            if errors.len() > 20 {
                text.push_str(&format!("\n… and {} more", errors.len() - 20));
            }
            return Err(OvlError::ApplyFailed {
                image: self.image.clone(),
                errors: text,
            });
        }
        Ok(())
    }
}

impl Target for Ext4Target {
    fn kind_of(&mut self, path: &str) -> Result<Option<Kind>, OvlError> {
        let (parent, name) = parent_and_name(path);
        Ok(self.dir(parent)?.and_then(|d| d.get(name)).map(|(_, k)| *k))
    }

    fn remove_all(&mut self, path: &str) -> Result<(), OvlError> {
        let (parent, name) = parent_and_name(path);
        let entry = self.dir(parent)?.and_then(|d| d.remove(name));
        let Some((ino, kind)) = entry else {
            return Ok(());
        };
        if kind != Kind::Dir {
            self.script.push(format!("rm {}", Self::abs(path)?));
            return Ok(());
        }
        // The lower subtree, level by level (by inode: no quoting), then removed
        // bottom-up: files with rm, directories with rmdir once empty.
        let mut order: Vec<(String, bool)> = vec![(path.to_string(), true)];
        let mut level = vec![(path.to_string(), ino)];
        while !level.is_empty() {
            let cmds: Vec<String> = level.iter().map(|(_, i)| format!("ls -p <{i}>")).collect();
            let (out, _) = self.dbg.run(&cmds, false, &self.scratch)?;
            let mut next = Vec::new();
            for ((dir, _), s) in level.iter().zip(out) {
                for l in parse_listing(&s.body, &self.dbg.show)?.unwrap_or_default() {
                    let child = format!("{dir}/{}", l.name);
                    let is_dir = kind_of_mode(l.mode) == Some(Kind::Dir);
                    if is_dir {
                        next.push((child.clone(), l.ino));
                    }
                    order.push((child, is_dir));
                }
            }
            level = next;
        }
        for (p, is_dir) in order.iter().rev() {
            let verb = if *is_dir { "rmdir" } else { "rm" };
            self.script.push(format!("{verb} {}", Self::abs(p)?));
        }
        // Whatever was listed under it is gone.
        let prefix = format!("{path}/");
        self.dirs
            .retain(|k, _| k != path && !k.starts_with(&prefix));
        Ok(())
    }

    fn make_dir(&mut self, e: &UpperEntry) -> Result<(), OvlError> {
        self.script.push(format!("mkdir {}", Self::abs(&e.path)?));
        self.meta_cmds(e, 0o040000)?;
        self.added(&e.path, Kind::Dir)
    }

    fn update_dir(&mut self, e: &UpperEntry) -> Result<(), OvlError> {
        let p = Self::abs(&e.path)?;
        let keep: HashSet<&str> = e.xattrs.iter().map(|(n, _)| n.as_str()).collect();
        let lower = self.dir_xattrs.get(&e.path).cloned().unwrap_or_default();
        for name in lower.iter().filter(|n| !keep.contains(n.as_str())) {
            self.script.push(format!("ea_rm {p} {}", q(name)?));
        }
        self.meta_cmds(e, 0o040000)
    }

    fn finish_dir(&mut self, e: &UpperEntry) -> Result<(), OvlError> {
        self.time_cmds(e)
    }

    fn make_file(&mut self, e: &UpperEntry) -> Result<(), OvlError> {
        let src = e.content.clone().ok_or_else(|| OvlError::Host {
            path: PathBuf::from(&e.path),
            what: "no staged contents".into(),
        })?;
        self.script
            .push(format!("write {} {}", qp(&src)?, Self::abs(&e.path)?));
        self.meta_cmds(e, 0o100000)?;
        self.added(&e.path, Kind::File)
    }

    fn make_hardlink(&mut self, e: &UpperEntry, first: &str) -> Result<(), OvlError> {
        self.script
            .push(format!("ln {} {}", Self::abs(first)?, Self::abs(&e.path)?));
        match self.link_counts.iter_mut().find(|(f, _)| f == first) {
            Some((_, n)) => *n += 1,
            None => self.link_counts.push((first.to_string(), 2)),
        }
        self.added(&e.path, Kind::File)
    }

    fn make_symlink(&mut self, e: &UpperEntry) -> Result<(), OvlError> {
        let target = e.target.as_deref().unwrap_or("");
        self.script
            .push(format!("symlink {} {}", Self::abs(&e.path)?, q(target)?));
        self.meta_cmds(e, 0o120000)?;
        self.added(&e.path, Kind::Symlink)
    }

    fn make_node(&mut self, e: &UpperEntry) -> Result<(), OvlError> {
        // debugfs mknod links the name into the current directory as given.
        let (parent, name) = parent_and_name(&e.path);
        let (spec, bits) = match e.kind {
            Kind::CharDev => (format!("c {} {}", e.rdev.0, e.rdev.1), 0o020000),
            Kind::BlockDev => (format!("b {} {}", e.rdev.0, e.rdev.1), 0o060000),
            _ => ("p".to_string(), 0o010000),
        };
        self.script
            .push(format!("cd {}", q(&format!("/{parent}"))?));
        self.script.push(format!("mknod {} {spec}", q(name)?));
        self.script.push("cd /".to_string());
        self.meta_cmds(e, bits)?;
        self.added(&e.path, e.kind)
    }
}

// ---------------------------------------------------------------------------------
// The overlay file itself: detection, usage, reset

/// Whether an overlay file holds ext4 (OverlayFS persistence) rather than a
/// dm-snapshot store.
pub fn is_ext4<R: Read + Seek>(r: &mut R) -> bool {
    let mut m = [0u8; 2];
    r.seek(SeekFrom::Start(1080)).is_ok() && r.read_exact(&mut m).is_ok() && m == [0x53, 0xEF]
}

/// The overlay's ext4 superblock facts (label, UUID, usage).
pub fn overlay_info<R: Read + Seek>(r: &mut R) -> Option<Ext4Info> {
    Ext4Info::read_from(r).ok()
}

/// A status report in the dm-snapshot shape, for plans and JSON that carry one.
pub fn status_report(info: Option<&Ext4Info>, len: u64, entries: u64) -> StatusReport {
    let (used, total) = info.map_or((0, len), |i| (i.used_bytes, i.size_bytes));
    let free = total.saturating_sub(used);
    StatusReport {
        state: "overlayfs",
        dm_status: format!("OverlayFS on ext4: {used} of {total} bytes used"),
        chunk_sectors: 0,
        cow_bytes: len,
        total_sectors: len / snapshot::SECTOR_BYTES,
        allocated_sectors: None,
        metadata_sectors: None,
        exceptions: entries,
        metadata_areas: 0,
        percent_used: if total == 0 {
            0.0
        } else {
            (used as f64 * 10000.0 / total as f64).round() / 100.0
        },
        free_data_chunks: 0,
        bytes_free: free,
        full: free == 0,
        trap_size: false,
        problems: Vec::new(),
    }
}

/// Builds an empty OverlayFS overlay (ext4 with `overlayfs/` and `ovlwork/`) of `len`
/// bytes in `dir`, with the old one's UUID and label.
pub fn build_fresh_overlay(
    dir: &Path,
    len: u64,
    like: Option<&Ext4Info>,
) -> Result<PathBuf, OvlError> {
    let root = dir.join("fresh-overlay-root");
    fs::create_dir_all(root.join(UPPER_DIR)).map_err(io_at(&root))?;
    fs::create_dir_all(root.join(WORK_DIR)).map_err(io_at(&root))?;
    let img = dir.join("fresh-overlay.img");
    let opts = Ext4Options {
        root_dir: Some(root.clone()),
        uuid: like.and_then(|i| uuid::Uuid::parse_str(&i.uuid).ok()),
        ..Ext4Options::default()
    };
    let label = like.map(|i| i.label.clone()).unwrap_or_default();
    ext4::make_ext4_image(&img, len, &label, &opts)?;
    let _ = fs::remove_dir_all(&root);
    Ok(img)
}

/// Writes the fresh overlay `template` over `ov` (same length), in place.
///
/// Order: the old superblock's magic goes first (synced), so a stop half way leaves
/// a file no one mounts as a half-old, half-new ext4; then every block that differs
/// from the template, except the first 4 KiB; then the first 4 KiB (the new
/// superblock), synced. Only blocks that differ are written: most of a 4 GiB overlay
/// is unused and already zero.
pub fn write_fresh_overlay<F>(ov: &mut F, len: u64, template: &Path) -> Result<(), OvlError>
where
    F: Read + Write + Seek + SyncData,
{
    let dev = |source| OvlError::Io {
        path: PathBuf::from("overlay"),
        source,
    };
    let mut t = File::open(template).map_err(io_at(template))?;
    let tlen = t.metadata().map_err(io_at(template))?.len();
    if tlen != len {
        return Err(OvlError::Host {
            path: template.to_path_buf(),
            what: format!("fresh overlay is {tlen} bytes, the overlay {len}"),
        });
    }
    ov.seek(SeekFrom::Start(1080)).map_err(dev)?;
    ov.write_all(&[0, 0]).map_err(dev)?;
    ov.flush().map_err(dev)?;
    ov.sync_data().map_err(dev)?;
    const BLOCK: usize = 1 << 20;
    let mut a = vec![0u8; BLOCK];
    let mut b = vec![0u8; BLOCK];
    // Only what mke2fs wrote: the fresh ext4 trusts no zeros elsewhere (lazy inode
    // tables, a checksummed journal with a random sequence), so the old overlay's
    // other blocks can stay as they are, unread and unwritten.
    let regions = crate::disk::sparse::data_regions(&t).map_err(io_at(template))?;
    for region in regions {
        let mut at = region.start.max(4096);
        while at < region.end.min(len) {
            let n = (region.end.min(len) - at).min(BLOCK as u64) as usize;
            t.seek(SeekFrom::Start(at)).map_err(io_at(template))?;
            t.read_exact(&mut a[..n]).map_err(io_at(template))?;
            ov.seek(SeekFrom::Start(at)).map_err(dev)?;
            ov.read_exact(&mut b[..n]).map_err(dev)?;
            if a[..n] != b[..n] {
                ov.seek(SeekFrom::Start(at)).map_err(dev)?;
                ov.write_all(&a[..n]).map_err(dev)?;
            }
            at += n as u64;
        }
    }
    ov.flush().map_err(dev)?;
    ov.sync_data().map_err(dev)?;
    let head = (len.min(4096)) as usize;
    t.seek(SeekFrom::Start(0)).map_err(io_at(template))?;
    t.read_exact(&mut a[..head]).map_err(io_at(template))?;
    ov.seek(SeekFrom::Start(0)).map_err(dev)?;
    ov.write_all(&a[..head]).map_err(dev)?;
    ov.flush().map_err(dev)?;
    ov.sync_data().map_err(dev)?;
    Ok(())
}

/// Resets an OverlayFS overlay in place (`overlay reset`): builds the empty file system
/// in `scratch` and writes it over the old one.
pub fn reset_overlay<F>(ov: &mut F, len: u64, scratch: &Path) -> Result<(), OvlError>
where
    F: Read + Write + Seek + SyncData,
{
    let info = overlay_info(ov);
    let dir = tempfile::Builder::new()
        .prefix("livestick-ovl-reset-")
        .tempdir_in(scratch)
        .map_err(io_at(scratch))?;
    let fresh = build_fresh_overlay(dir.path(), len, info.as_ref())?;
    write_fresh_overlay(ov, len, &fresh)
}

// ---------------------------------------------------------------------------------
// Merge plan and steps

/// How the root file system sits in the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "layout")]
pub enum Layout {
    /// The root tree is the squashfs itself.
    Flat,
    /// The root is `LiveOS/rootfs.img` (ext4) inside the squashfs.
    Nested { root_image: String },
    /// The root tree is an EROFS image (`squashfs.img` in name only).
    Erofs {
        info: ErofsInfo,
        mkfs_args: Vec<String>,
        /// fsck.erofs cannot restore xattrs on extraction.
        xattrs_lost: bool,
    },
}

/// The OverlayFS part of a merge plan.
#[derive(Debug, Clone, Serialize)]
pub struct OvlPlan {
    pub layout: Layout,
    pub upper_entries: u64,
    pub overlay_used_bytes: u64,
    #[serde(skip)]
    pub overlay_info: Option<Ext4Info>,
    /// Flat squashfs: how tar2sqfs rebuilds it (empty for the other layouts).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tar2sqfs_args: Vec<String>,
    /// A directory overlay (on an ext4 stick): it is read through an ext4 copy made
    /// with `mke2fs -d`, and emptied after the swap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overlay_dir: Option<PathBuf>,
    /// Flat squashfs: lower file bytes the upper dir replaces or hides, set aside
    /// while streaming in case a surviving hard link still needs them (at most).
    pub stash_bytes: u64,
}

/// How debugfs reaches the overlay: in place (plain file, or one run of bytes on a
/// stick) or through a copy in `work`.
fn overlay_debugfs(at: &Located, work: &Path) -> Result<Debugfs, OvlError> {
    if let Some(off) = at.contiguous_at() {
        return Ok(Debugfs::new(&at.device, off));
    }
    let copy = work.join("overlay-copy.img");
    let mut src = at.open(false).map_err(|e| OvlError::Host {
        path: at.device.clone(),
        what: e.to_string(),
    })?;
    let mut dst = File::create(&copy).map_err(io_at(&copy))?;
    // Sparse: zero blocks are skipped, most of an overlay is unused.
    let mut buf = vec![0u8; 1 << 20];
    let mut at_off = 0u64;
    loop {
        let n = read_full(&mut src, &mut buf).map_err(io_at(&copy))?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            dst.seek(SeekFrom::Start(at_off)).map_err(io_at(&copy))?;
            dst.write_all(&buf[..n]).map_err(io_at(&copy))?;
        }
        at_off += n as u64;
    }
    dst.set_len(at_off).map_err(io_at(&copy))?;
    Ok(Debugfs::new(&copy, 0))
}

/// Plans a merge of an OverlayFS overlay (called by `merge::plan_*` once the overlay
/// is known to hold ext4).
pub(crate) fn plan(
    inp: Inputs,
    workdir: &Path,
    fsck: bool,
    compress: Option<Compressor>,
) -> Result<MergePlan, MergeError> {
    find_program(&DEBUGFS)?;
    let what = inp.squashfs.display().to_string();
    let kind = squash::detect_image_kind(&mut inp.squashfs_at.open(false)?, &what)?;
    let is_root = nix::unistd::geteuid().is_root();
    let mut notes = Vec::new();

    let scratch = tempfile::Builder::new()
        .prefix("livestick-ovl-plan-")
        .tempdir_in(workdir)
        .map_err(|source| MergeError::Io {
            path: workdir.to_path_buf(),
            source,
        })?;
    let (info, len) = {
        let mut ov = inp.overlay_at.open(false)?;
        let len = ov.len();
        (overlay_info(&mut ov), len)
    };
    let dbg = overlay_debugfs(&inp.overlay_at, scratch.path())?;
    let mut upper = walk_upper(&dbg, scratch.path())?;
    let entries = upper.entries.len() as u64;
    let upper_bytes = upper.file_bytes();
    let mut stash_bytes = 0;

    let (squash_info, layout, root_image, root_bytes, mut args) = match kind {
        ImageKind::Squashfs(sq) => {
            find_program(&tools::UNSQUASHFS)?;
            find_program(&tools::MKSQUASHFS)?;
            let listing = with_readable_squashfs(&inp.squashfs_at, workdir, |p, off| {
                Ok(squash::list_at(p, off)?)
            })?;
            let total: u64 = listing.iter().filter(|e| e.is_file).map(|e| e.size).sum();
            let nested = merge::ROOT_IMAGES
                .iter()
                .find_map(|n| listing.iter().find(|e| e.is_file && e.path == *n));
            let args = sq.mksquashfs_args();
            match nested {
                Some(root) => {
                    if fsck {
                        find_program(&tools::E2FSCK)?;
                    }
                    (
                        Some(sq),
                        Layout::Nested {
                            root_image: root.path.clone(),
                        },
                        root.path.clone(),
                        total,
                        args,
                    )
                }
                None => {
                    // Streamed through tar: no tree on the host, so no root needed.
                    find_program(&tools::SQFS2TAR)?;
                    find_program(&tools::TAR2SQFS)?;
                    read_upper_meta(&dbg, &mut upper, scratch.path())?;
                    stash_bytes = ovl_tar::UpperIndex::new(&upper).dropped_bytes(
                        listing
                            .iter()
                            .filter(|e| e.is_file)
                            .map(|e| (e.path.as_str(), e.size)),
                    );
                    (Some(sq), Layout::Flat, "/".to_string(), total, args)
                }
            }
        }
        ImageKind::Erofs => {
            find_program(&tools::FSCK_EROFS)?;
            find_program(&tools::MKFS_EROFS)?;
            if !is_root {
                find_program(&FAKEROOT)?;
                notes.push(
                    "not root: extract, apply and mkfs.erofs run under fakeroot, which keeps owners, device nodes and xattrs for the new image without privileges".into(),
                );
            }
            let info = erofs::read_superblock(&mut inp.squashfs_at.open(false)?, &what)
                .map_err(OvlError::from)?;
            erofs::check_extractable(&info, &erofs::fsck_algorithms().map_err(OvlError::from)?)
                .map_err(OvlError::from)?;
            let available = erofs::available_compressors().map_err(OvlError::from)?;
            let (mkfs_args, note) = erofs::mkfs_args(&info, &available);
            notes.extend(note);
            // fsck.erofs 1.5 extracts no xattrs; livestick reads them from the image
            // itself and sets them on the extracted tree.
            let ours = erofs_xattr::read_xattrs(&mut inp.squashfs_at.open(false)?, &what);
            let keeps = match &ours {
                Ok(paths) => {
                    notes.push(format!(
                        "xattrs (SELinux labels, capabilities) of {} paths are read from the image by livestick and set on the extracted tree",
                        paths.len()
                    ));
                    true
                }
                Err(e) => {
                    notes.push(format!("livestick cannot read the image's xattrs: {e}"));
                    erofs::extract_keeps_xattrs(workdir).map_err(OvlError::from)?
                }
            };
            if !keeps {
                notes.push(format!(
                    "fsck.erofs {} does not restore xattrs on extraction: SELinux labels and capabilities of the image would be lost (refused unless --allow-xattr-loss)",
                    erofs::fsck_version()
                ));
            }
            // The unpacked size is not in the superblock; EROFS images of root file
            // systems unpack to about 2-3 times their size.
            let estimate = inp.squashfs_at.len().saturating_mul(3);
            notes.push(format!(
                "EROFS: {} ({}); the unpacked size is estimated at 3x the image",
                if info.algorithms.is_empty() {
                    "uncompressed".to_string()
                } else {
                    info.algorithms.join("+")
                },
                mkfs_args.join(" ")
            ));
            (
                None,
                Layout::Erofs {
                    info,
                    mkfs_args: mkfs_args.clone(),
                    xattrs_lost: !keeps,
                },
                "/".to_string(),
                estimate,
                mkfs_args,
            )
        }
        other => {
            return Err(MergeError::NoRootImage {
                squashfs: inp.squashfs.clone(),
                what: format!("{other:?}"),
            });
        }
    };
    drop(scratch);
    let tar2sqfs_args = match (&layout, &squash_info) {
        (Layout::Flat, Some(sq)) => match compress {
            Some(c) if c != sq.compressor => squash::tar2sqfs_args(c, sq.block_size, &[]),
            _ => sq.tar2sqfs_args(),
        },
        _ => Vec::new(),
    };
    if let (Some(c), Some(sq)) = (compress, &squash_info)
        && c != sq.compressor
    {
        args = vec![
            "-comp".into(),
            c.name().into(),
            "-b".into(),
            sq.block_size.to_string(),
        ];
        notes.push(format!(
            "recompressing with {} instead of {}",
            c.name(),
            sq.compressor.name()
        ));
    } else if compress.is_some() && squash_info.is_none() {
        notes.push(
            "--compress applies to squashfs; the EROFS image keeps its own compression".into(),
        );
    }
    if inp.squashfs_at.contiguous_at().is_none() {
        notes.push(
            "squashfs.img is fragmented on the stick: it is copied to the work dir to be read"
                .to_string(),
        );
    } else if layout == Layout::Flat && inp.squashfs_at.contiguous_at() != Some(0) {
        notes.push(
            "squashfs.img is copied to the work dir first: sqfs2tar reads whole files only"
                .to_string(),
        );
    }
    if inp.overlay_at.contiguous_at().is_none() {
        notes.push(
            "the overlay is fragmented on the stick: it is copied to the work dir to be read"
                .to_string(),
        );
    }
    let squashfs_bytes = inp.squashfs_at.len();
    let new_image_estimate = squashfs_bytes.saturating_add(upper_bytes);
    let copies = match layout {
        Layout::Erofs { .. } => squashfs_bytes,
        Layout::Flat if inp.squashfs_at.contiguous_at() != Some(0) => squashfs_bytes,
        _ if inp.squashfs_at.contiguous_at().is_none() => squashfs_bytes,
        _ => 0,
    };
    // The flat merge streams: no extracted tree, only what the stash may hold.
    let unpacked = if layout == Layout::Flat {
        stash_bytes
    } else {
        root_bytes
    };
    let overlay_copy = if inp.overlay_at.contiguous_at().is_none() {
        info.as_ref().map_or(len, |i| i.used_bytes)
    } else {
        0
    };
    let workdir_needed = unpacked
        .saturating_add(upper_bytes)
        .saturating_add(new_image_estimate)
        .saturating_add(copies)
        .saturating_add(overlay_copy);
    let workdir_free = free_bytes(workdir)?;
    let nothing_to_merge = entries == 0;
    let on_stick = inp.stick.is_some();
    let target_needed = if on_stick {
        squashfs_bytes
    } else {
        new_image_estimate
    };
    if !nothing_to_merge {
        merge::check_merge_space(
            &inp,
            [
                "the extracted root, the upper dir and the new image",
                "the extracted root, the upper dir, the new image and its staged copy",
            ],
            workdir,
            workdir_needed,
            workdir_free,
            target_needed,
        )?;
    }
    let staged = match &inp.stick {
        Some(s) => format!("{}.new", s.squashfs),
        None => merge::staged_path(&inp.squashfs).display().to_string(),
    };
    let (extract_step, apply_step, build_step) = match &layout {
        Layout::Flat => (
            "read the upper dir out of the overlay (debugfs)".to_string(),
            format!(
                "stream {} through sqfs2tar and apply {entries} upper-dir entries to the stream (owners, devices and xattrs travel in the tar headers: no root needed)",
                inp.squashfs.display()
            ),
            format!("tar2sqfs {}", tar2sqfs_args.join(" ")),
        ),
        Layout::Nested { root_image } => (
            format!("read the upper dir out of the overlay (debugfs) and extract {root_image}"),
            format!("apply {entries} upper-dir entries inside {root_image} (debugfs -w)"),
            format!("mksquashfs {}", args.join(" ")),
        ),
        Layout::Erofs { mkfs_args, .. } => (
            "read the upper dir out of the overlay (debugfs) and extract the EROFS image (fsck.erofs --extract)".to_string(),
            format!("apply {entries} upper-dir entries to the root tree"),
            format!("mkfs.erofs {}", mkfs_args.join(" ")),
        ),
    };
    let steps = vec![
        extract_step,
        apply_step,
        if fsck && matches!(layout, Layout::Nested { .. }) {
            "e2fsck -f -p the merged root image".to_string()
        } else {
            "no e2fsck (nothing block-based to check)".to_string()
        },
        format!("{build_step}; build the empty overlay file system"),
        format!("write {staged}, sync"),
        "read it back and compare sha256".to_string(),
        "nothing to fold (OverlayFS works on files: the old overlay over the new image shows the same tree)".to_string(),
        if on_stick {
            format!(
                "swap the directory entries of {staged} and squashfs.img (one sector write), remove the old image"
            )
        } else {
            format!("rename it over {}", inp.squashfs.display())
        },
        format!(
            "reset the overlay {} (a new empty ext4 with overlayfs/ and ovlwork/)",
            inp.overlay.display()
        ),
    ];
    let used = info.as_ref().map_or(0, |i| i.used_bytes);
    Ok(MergePlan {
        squashfs: inp.squashfs,
        squashfs_at: inp.squashfs_at,
        squashfs_bytes,
        squash: squash_info,
        root_image,
        root_image_bytes: root_bytes,
        overlay: inp.overlay,
        overlay_at: inp.overlay_at,
        overlay_status: status_report(info.as_ref(), len, entries),
        exceptions: entries,
        stick: inp.stick,
        workdir: workdir.to_path_buf(),
        workdir_needed_bytes: workdir_needed,
        workdir_free_bytes: workdir_free,
        target_dir: inp.target_dir,
        target_needed_bytes: target_needed,
        target_free_bytes: inp.target_free,
        mksquashfs_args: args,
        fsck: fsck && matches!(layout, Layout::Nested { .. }),
        nothing_to_merge,
        notes,
        steps,
        failpoint: std::env::var("LIVESTICK_FAILPOINT").ok(),
        ovl: Some(OvlPlan {
            layout,
            upper_entries: entries,
            overlay_used_bytes: used,
            overlay_info: info,
            tar2sqfs_args,
            stash_bytes,
            overlay_dir: None,
        }),
        allow_xattr_loss: false,
    })
}

type Applied = (ApplyReport, PathBuf, Option<i32>);

/// The EROFS steps a non-root merge hands to a child under fakeroot (`livestick
/// internal-fakeroot-step JOB`): in that process the faked uid 0 lets extraction,
/// chown, mknod and security xattrs succeed, and mkfs.erofs, its child, sees them.
/// The parent has read the upper dir already (contents staged in its work dir).
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct FakerootJob {
    pub upper: UpperTree,
    pub erofs: PathBuf,
    pub work: PathBuf,
    pub built: PathBuf,
    pub mkfs_args: Vec<String>,
    /// Where the child writes its [`ApplyReport`] (JSON).
    pub report: PathBuf,
}

/// Runs a [`FakerootJob`] (the child side).
pub fn run_fakeroot_job(job: &Path) -> Result<(), OvlError> {
    let text = fs::read(job).map_err(io_at(job))?;
    let job: FakerootJob = serde_json::from_slice(&text).map_err(|e| OvlError::Host {
        path: job.to_path_buf(),
        what: format!("not a fakeroot job: {e}"),
    })?;
    let tree = job.work.join("tree");
    erofs::unpack(&job.erofs, &tree)?;
    let rep = apply_host_tree(&tree, &job.upper, &mut |_, _| {})?;
    erofs::build(&tree, &job.built, &job.mkfs_args)?;
    let out = serde_json::to_vec(&rep).map_err(|e| OvlError::Host {
        path: job.report.clone(),
        what: e.to_string(),
    })?;
    fs::write(&job.report, out).map_err(io_at(&job.report))
}

/// EROFS without root: the tree steps in a child under fakeroot.
fn fakeroot_steps(
    plan: &MergePlan,
    ovl: &OvlPlan,
    work: &Path,
    upper: &UpperTree,
    built: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<Applied, MergeError> {
    let Layout::Erofs { mkfs_args, .. } = &ovl.layout else {
        return Err(OvlError::Host {
            path: work.to_path_buf(),
            what: "fakeroot steps are for EROFS roots only".into(),
        }
        .into());
    };
    let (src, copied) = plan
        .squashfs_at
        .whole_file_or_copy(work, "erofs-source.img")?;
    let job = FakerootJob {
        upper: upper.clone(),
        erofs: src.clone(),
        work: work.join("fakeroot"),
        built: built.to_path_buf(),
        mkfs_args: mkfs_args.clone(),
        report: work.join("fakeroot-report.json"),
    };
    fs::create_dir_all(&job.work).map_err(io_at(&job.work))?;
    let job_file = work.join("fakeroot-job.json");
    let text = serde_json::to_vec(&job).map_err(|e| OvlError::Host {
        path: job_file.clone(),
        what: e.to_string(),
    })?;
    fs::write(&job_file, text).map_err(io_at(&job_file))?;
    progress("extract", 0, plan.root_image_bytes);
    let me = std::env::current_exe().map_err(io_at(Path::new("/proc/self/exe")))?;
    let out = Command::new(find_program(&FAKEROOT)?)
        .arg("--")
        .arg(&me)
        .arg("internal-fakeroot-step")
        .arg(&job_file)
        .output()
        .map_err(io_at(&me));
    if copied {
        let _ = fs::remove_file(&src);
    }
    let _ = fs::remove_dir_all(&job.work);
    let out = out?;
    if !out.status.success() {
        return Err(OvlError::Fakeroot {
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }
        .into());
    }
    let report = fs::read(&job.report).map_err(io_at(&job.report))?;
    let applied: ApplyReport = serde_json::from_slice(&report).map_err(|e| OvlError::Host {
        path: job.report.clone(),
        what: e.to_string(),
    })?;
    progress("extract", plan.root_image_bytes, plan.root_image_bytes);
    failpoints(plan, &["extract", "apply", "fsck"])?;
    Ok((applied, built.to_path_buf(), None))
}

/// The step boundaries a combined step passes at once (each may be a failpoint).
fn failpoints(plan: &MergePlan, steps: &[&'static str]) -> Result<(), MergeError> {
    steps.iter().try_for_each(|s| merge::failpoint(plan, s))
}

/// Applies the upper dir to an extracted tree whose `/` keeps its own metadata (see
/// the module docs), its mtime included, although entries were added to it.
fn apply_host_tree(
    tree: &Path,
    upper: &UpperTree,
    tick: &mut dyn FnMut(u64, u64),
) -> Result<ApplyReport, OvlError> {
    let root_mtime = fs::metadata(tree).ok().map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.mtime()
    });
    let mut t = HostTree::new(tree);
    let r = apply(upper, &mut t, tick)?;
    if let Some(mtime) = root_mtime {
        let mut e = upper_root_entry();
        e.mtime = mtime;
        t.set_time(tree, &e)?;
    }
    Ok(r)
}

/// Flat squashfs: one stream from the old image to the new, the upper dir applied on
/// the way (see [`ovl_tar`]).
fn flat_steps(
    plan: &MergePlan,
    ovl: &OvlPlan,
    work: &Path,
    upper: &UpperTree,
    built: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<Applied, MergeError> {
    let (src, copied) = plan
        .squashfs_at
        .whole_file_or_copy(work, "lower-squashfs.img")?;
    progress("extract", plan.root_image_bytes, plan.root_image_bytes);
    let streamed = merge::failpoint(plan, "extract").and_then(|()| {
        let total = plan.root_image_bytes;
        Ok(ovl_tar::rebuild_flat(
            &src,
            upper,
            built,
            &ovl.tar2sqfs_args,
            work,
            &mut |done| progress("apply", done.min(total), total),
        )?)
    });
    if copied {
        let _ = fs::remove_file(&src);
    }
    let applied = streamed?;
    progress("apply", plan.root_image_bytes, plan.root_image_bytes);
    failpoints(plan, &["apply", "fsck"])?;
    Ok((applied, built.to_path_buf(), None))
}

/// Nested rootfs.img and EROFS: the root extracted into the work dir, changed there,
/// then rebuilt.
fn tree_steps(
    plan: &MergePlan,
    ovl: &OvlPlan,
    work: &Path,
    upper: &UpperTree,
    built: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<Applied, MergeError> {
    let tree = work.join("tree");
    match &ovl.layout {
        Layout::Flat | Layout::Nested { .. } => {
            with_readable_squashfs(&plan.squashfs_at, work, |p, off| {
                Ok(squash::extract_at(p, off, &tree, &[])?)
            })?;
        }
        Layout::Erofs { .. } => {
            let (src, copied) = plan
                .squashfs_at
                .whole_file_or_copy(work, "erofs-source.img")?;
            let unpacked = erofs::unpack(&src, &tree);
            if copied {
                let _ = fs::remove_file(&src);
            }
            unpacked.map_err(OvlError::from)?;
        }
    }
    progress("extract", plan.root_image_bytes, plan.root_image_bytes);
    merge::failpoint(plan, "extract")?;

    let total = upper.entries.len() as u64;
    let mut tick = |d, t| progress("apply", d, t);
    let (applied, root) = match &ovl.layout {
        Layout::Nested { root_image } => {
            let img = tree.join(root_image);
            let scratch = work.join("debugfs");
            fs::create_dir_all(&scratch).map_err(|source| MergeError::Io {
                path: scratch.clone(),
                source,
            })?;
            let mut t = Ext4Target::new(&img, upper, &scratch)?;
            let r = apply(upper, &mut t, &mut tick)?;
            t.finish()?;
            (r, img)
        }
        _ => (apply_host_tree(&tree, upper, &mut tick)?, tree.clone()),
    };
    progress("apply", total, total);
    merge::failpoint(plan, "apply")?;

    let mut fsck_code = None;
    if plan.fsck && matches!(ovl.layout, Layout::Nested { .. }) {
        progress("fsck", 0, 1);
        fsck_code = Some(merge::run_e2fsck(&root, "-p")?);
        progress("fsck", 1, 1);
    }
    merge::failpoint(plan, "fsck")?;

    progress("build", 0, 1);
    match &ovl.layout {
        Layout::Erofs { mkfs_args, .. } => {
            erofs::build(&tree, built, mkfs_args).map_err(OvlError::from)?
        }
        _ => squash::build(&tree, built, &plan.mksquashfs_args)?,
    }
    Ok((applied, root, fsck_code))
}

/// Copies a directory overlay (`overlay-LABEL-UUID/` with overlayfs/ and ovlwork/,
/// as dracut keeps it on an ext4 stick) into an ext4 image with `mke2fs -d`, which
/// keeps owners, modes, times, device nodes, hard links and xattrs: everything
/// downstream then reads one format. Needs root to see trusted.overlay.* attributes.
pub fn image_from_dir(dir: &Path, out: &Path) -> Result<(), OvlError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(OvlError::DirNeedsRoot(dir.to_path_buf()));
    }
    let (bytes, entries) = tally(dir)?;
    // A sparse file: room for every block and an inode per 16 KiB for every entry.
    let size = (bytes + entries * 16384 + (16 << 20)).next_multiple_of(1 << 20);
    let opts = Ext4Options {
        root_dir: Some(dir.to_path_buf()),
        ..Ext4Options::default()
    };
    ext4::make_ext4_image(out, size, "overlay", &opts)?;
    Ok(())
}

/// Bytes (in 4 KiB blocks) and entries below a directory overlay; it must hold
/// overlayfs/.
fn tally(dir: &Path) -> Result<(u64, u64), OvlError> {
    if !dir.join(UPPER_DIR).is_dir() {
        return Err(OvlError::NoUpper(dir.display().to_string()));
    }
    tally_below(dir)
}

/// What a directory overlay's upper dir holds: (bytes in 4 KiB blocks, entries).
pub fn upper_dir_usage(dir: &Path) -> Result<(u64, u64), OvlError> {
    tally(dir)?;
    tally_below(&dir.join(UPPER_DIR))
}

fn tally_below(upper: &Path) -> Result<(u64, u64), OvlError> {
    let (mut bytes, mut entries) = (0u64, 0u64);
    let mut dirs = vec![upper.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(&d).map_err(io_at(&d))? {
            let e = e.map_err(io_at(&d))?;
            let m = fs::symlink_metadata(e.path()).map_err(io_at(&e.path()))?;
            entries += 1;
            if m.is_dir() {
                dirs.push(e.path());
            } else if m.is_file() {
                bytes += m.len().div_ceil(4096) * 4096;
            }
        }
    }
    Ok((bytes, entries))
}

/// Empties a directory overlay after its merge: everything below overlayfs/ and
/// ovlwork/ goes, the two directories stay.
pub fn empty_overlay_dir(dir: &Path) -> Result<(), OvlError> {
    for sub in [UPPER_DIR, WORK_DIR] {
        let d = dir.join(sub);
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd {
            let p = e.map_err(io_at(&d))?.path();
            let is_dir = fs::symlink_metadata(&p).map_err(io_at(&p))?.is_dir();
            if is_dir {
                fs::remove_dir_all(&p).map_err(io_at(&p))?;
            } else {
                fs::remove_file(&p).map_err(io_at(&p))?;
            }
        }
    }
    Ok(())
}

/// Marks a plan made through [`image_from_dir`]'s copy as one for the directory.
pub(crate) fn for_dir_overlay(plan: &mut MergePlan, dir: &Path) {
    plan.overlay = dir.to_path_buf();
    if let Some(ovl) = plan.ovl.as_mut() {
        ovl.overlay_dir = Some(dir.to_path_buf());
    }
    plan.steps.insert(
        0,
        format!(
            "copy the directory overlay {} into an ext4 image in the work dir (mke2fs -d)",
            dir.display()
        ),
    );
    if let Some(last) = plan.steps.last_mut() {
        *last = format!(
            "empty {}/{UPPER_DIR} and {}/{WORK_DIR}",
            dir.display(),
            dir.display()
        );
    }
}

/// Runs the OverlayFS steps of a plan up to the built image, then the shared
/// stage/verify/swap/reset steps.
pub(crate) fn run_steps(
    plan: &MergePlan,
    ovl: &OvlPlan,
    work: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<MergeReport, MergeError> {
    if let Layout::Erofs {
        xattrs_lost: true, ..
    } = &ovl.layout
        && !plan.allow_xattr_loss
    {
        return Err(OvlError::Erofs(ErofsError::NoXattrExtract {
            version: erofs::fsck_version(),
        })
        .into());
    }
    fs::create_dir_all(work).map_err(|source| MergeError::Io {
        path: work.to_path_buf(),
        source,
    })?;
    if let Some(dir) = &ovl.overlay_dir {
        // The merge reads a fresh copy; the directory is emptied once the new image
        // is in place (a stop before that leaves the old upper over the new image,
        // which shows the same tree).
        let img = work.join("overlay-dir.img");
        image_from_dir(dir, &img)?;
        let mut inner_ovl = ovl.clone();
        inner_ovl.overlay_dir = None;
        let mut inner = plan.clone();
        inner.overlay_at = Located::plain(&img)?;
        inner.ovl = Some(inner_ovl.clone());
        let mut report = run_steps(&inner, &inner_ovl, work, progress)?;
        empty_overlay_dir(dir)?;
        report.overlay_reset = true;
        return Ok(report);
    }
    let stage = work.join("upper");
    progress("extract", 0, plan.root_image_bytes);
    let dbg = overlay_debugfs(&plan.overlay_at, work)?;
    let mut upper = walk_upper(&dbg, work)?;
    read_upper_details(&dbg, &mut upper, &stage)?;
    let total = upper.entries.len() as u64;
    let built = work.join("squashfs.img");
    let (applied, root, fsck_code) = if ovl.layout == Layout::Flat {
        flat_steps(plan, ovl, work, &upper, &built, progress)?
    } else if matches!(ovl.layout, Layout::Erofs { .. }) && !nix::unistd::geteuid().is_root() {
        fakeroot_steps(plan, ovl, work, &upper, &built, progress)?
    } else {
        tree_steps(plan, ovl, work, &upper, &built, progress)?
    };
    let _ = fs::remove_dir_all(&stage);
    // Built before anything on the stick changes, so the reset cannot fail for
    // want of mke2fs after the swap.
    let fresh = build_fresh_overlay(work, plan.overlay_at.len(), ovl.overlay_info.as_ref())?;
    progress("build", 1, 1);
    merge::failpoint(plan, "build")?;

    let new_len = fs::metadata(&built)
        .map_err(|source| MergeError::Io {
            path: built.clone(),
            source,
        })?
        .len();
    let mut report = MergeReport {
        exceptions_applied: total,
        fsck_exit_code: fsck_code,
        fsck_chunks_folded: 0,
        old_squashfs_bytes: plan.squashfs_bytes,
        new_squashfs_bytes: new_len,
        new_squashfs_sha256: String::new(),
        swap: None,
        overlay_reset: false,
        overlayfs: Some(applied),
    };
    merge::replace(
        plan,
        &built,
        &root,
        &[],
        Some(&fresh),
        &mut report,
        progress,
    )?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ls_lines() {
        let l = parse_ls_line("/17/100600/1000/0/hello2/3/").unwrap();
        assert_eq!(
            (l.ino, l.mode, l.uid, l.name.as_str(), l.size),
            (17, 0o100600, 1000, "hello2", 3)
        );
        let d = parse_ls_line("/20/040755/0/0/sp ace//").unwrap();
        assert_eq!((d.name.as_str(), d.size), ("sp ace", 0));
        assert!(parse_ls_line("garbage").is_none());
        assert_eq!(
            parse_listing("/2/040755/0/0/.//\n/2/040755/0/0/..//\n", "x").unwrap(),
            Some(vec![])
        );
        assert_eq!(parse_listing("", "x").unwrap(), None);
    }

    #[test]
    fn parses_stat_output() {
        let body = "Inode: 18   Type: character special    Mode:  0000   Flags: 0x0\n \
 mtime: 0x6553f100:00000001 -- Tue Nov 14 22:13:20 2023\n\
Size of extra inode fields: 32\n\
Extended attributes:\n  security.selinux (26) = \"system_u:object_r:etc_t:s0\"\n  user.x (2) = 01 02 \n\
Inode checksum: 0x23145ac1\n\
(New-style) Device major/minor number: 01:03 (hex 01:03)\n\
Fast link dest: \"/etc/hello2\"\n";
        let s = parse_stat(body);
        assert_eq!(s.mtime, 0x6553f100 + (1i64 << 32));
        assert_eq!(s.rdev, (1, 3));
        assert_eq!(s.fast_link.as_deref(), Some("/etc/hello2"));
        assert_eq!(s.xattr_names, vec!["security.selinux", "user.x"]);
    }

    #[test]
    fn quoting_refuses_what_debugfs_cannot_say() {
        assert_eq!(q("a b").unwrap(), "\"a b\"");
        assert!(matches!(q("a\"b"), Err(OvlError::BadName { .. })));
        assert!(matches!(q("a\nb"), Err(OvlError::BadName { .. })));
    }
}
