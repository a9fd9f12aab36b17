//! Applying the upper tree onto a lower root with OverlayFS semantics ([`apply`]),
//! through the [`Target`] trait and its two implementations:
//! - [`HostTree`]: an extracted tree on the host (EROFS), changed with plain system
//!   calls (as root, or in a child under fakeroot: see [`super::fakeroot`]);
//! - [`Ext4Target`]: the nested `LiveOS/rootfs.img`, changed in place by one
//!   `debugfs -w` script (`write`, `mkdir`, `symlink`, `mknod`, `ln`, `rm`, `rmdir`,
//!   `set_inode_field`, `ea_set`, `ea_rm`); no mount and no root needed, and every
//!   file not named by the upper dir keeps its inode, labels and all.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::debugfs::{Debugfs, Kind, kind_of_mode, parse_listing, parse_stat, q, qp};
use super::error::{OvlError, io_at};
use super::upper::{UpperEntry, UpperTree, upper_root_entry};
use crate::persist::host_xattr::{list_xattrs, remove_xattr, set_xattr};

/// What the tree steps of a merge produced: the apply report, the path e2fsck checks
/// (the root image or tree), e2fsck's exit code.
pub(crate) type Applied = (ApplyReport, PathBuf, Option<i32>);

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
            fs::remove_dir_all(&p).map_err(io_at(&p))?;
        } else {
            fs::remove_file(&p).map_err(io_at(&p))?;
        }
        Ok(())
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
        Ok(fs::hard_link(self.p(first), &p).map_err(io_at(&p))?)
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

/// Applies the upper dir to an extracted tree whose `/` keeps its own metadata (see
/// the module docs), its mtime included, although entries were added to it.
pub(super) fn apply_host_tree(
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
