//! The upper directory (`overlayfs/`) read out of the overlay's ext4 file system with
//! debugfs: its structure ([`walk_upper`], one run per directory level), then times,
//! device numbers, xattrs and, for a merge, file contents staged on the host
//! ([`read_upper_details`]). OverlayFS bookkeeping (`trusted.overlay.*`) becomes
//! whiteouts and opaque flags; `redirect_dir` and `metacopy` are refused.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::debugfs::{
    Debugfs, Kind, Listed, StatInfo, kind_of_mode, parse_listing, parse_stat, q, qp,
};
use super::error::{OvlError, io_at};
use crate::io::read_full;
use crate::persist::merge::located::Located;
use crate::persist::overlay::store::UPPER_DIR;

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

/// How debugfs reaches the overlay: in place (plain file, or one run of bytes on a
/// stick) or through a copy in `work`.
pub(crate) fn overlay_debugfs(at: &Located, work: &Path) -> Result<Debugfs, OvlError> {
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
