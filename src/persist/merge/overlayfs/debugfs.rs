//! `debugfs` (e2fsprogs, the reference implementation of ext4) as a reader and writer
//! of ext4 images without mounting them: one script per run, each command's output
//! split by debugfs's own echo, and parsers for `ls -p` and `stat`. Every read names
//! inodes (`<ino>`), so no file name ever has to be quoted on a debugfs command line;
//! [`q`] refuses the names debugfs cannot say.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use serde::Serialize;

use super::error::{OvlError, io_at};
use crate::squash::SquashError;
use crate::tools::{DEBUGFS, find_program};

/// `debugfs` on one image (optionally at a byte offset inside a device or stick
/// image, with e2fsprogs' `image?offset=N` syntax).
#[derive(Debug, Clone)]
pub struct Debugfs {
    spec: std::ffi::OsString,
    pub(super) show: String,
}

/// The output of one command of a script.
#[derive(Debug, Clone, Default)]
pub(super) struct Section {
    pub(super) body: String,
}

impl Debugfs {
    pub fn new(image: &Path, offset: u64) -> Debugfs {
        let mut spec = crate::disk::target::tool_path(image).into_os_string();
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
    pub(super) fn run(
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
pub(super) fn q(s: &str) -> Result<String, OvlError> {
    if s.contains('"') || s.contains('\n') {
        return Err(OvlError::BadName {
            path: s.to_string(),
        });
    }
    Ok(format!("\"{s}\""))
}

pub(super) fn qp(p: &Path) -> Result<String, OvlError> {
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

pub(super) fn kind_of_mode(mode: u32) -> Option<Kind> {
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
pub(super) struct Listed {
    pub(super) ino: u32,
    pub(super) mode: u32,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) name: String,
    pub(super) size: u64,
}

pub(super) fn parse_ls_line(line: &str) -> Option<Listed> {
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
pub(super) fn parse_listing(body: &str, image: &str) -> Result<Option<Vec<Listed>>, OvlError> {
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
pub(super) struct StatInfo {
    pub(super) mtime: i64,
    pub(super) rdev: (u32, u32),
    pub(super) fast_link: Option<String>,
    pub(super) xattr_names: Vec<String>,
}

pub(super) fn parse_stat(body: &str) -> StatInfo {
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
