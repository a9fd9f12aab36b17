//! Block devices: discovery for `livestick devices`, the facts the safety
//! checks in [`crate::disk::target`] rely on, and the `--wait-for` watcher.
//!
//! # Why sysfs and the udev database file, not the `udev` crate
//!
//! The design card names the `udev` crate. It links libudev, so building
//! livestick would need libudev-dev and pkg-config, and running it would need
//! libudev.so — yet the places users run a stick writer (containers, minimal
//! rescue systems, CI runners like this one) often have no udev daemon at all,
//! and then libudev answers with nothing. Everything libudev would tell us is
//! in two places we can read directly:
//!
//! - sysfs (`/sys/class/block`, `/sys/dev/block/M:m`): sizes, sector sizes,
//!   the removable flag, model/vendor/serial, `holders/` and `slaves/`, and the
//!   device path, which is what the transport (USB, MMC, NVMe, …) is derived from;
//! - the udev database file `/run/udev/data/bM:m`, when udev runs: the `E:`
//!   properties (`ID_BUS`, `ID_SERIAL_SHORT`, `ID_MODEL`, `ID_VENDOR`), used to
//!   fill gaps. When it is absent the listing says so and sysfs alone is used.
//!
//! Hotplug events are polled from sysfs (the watcher below), which needs no
//! netlink socket and works the same with or without udev.
//!
//! Every function here reads through a [`Host`], which is either the running
//! system or a captured sysfs tree, so the safety rules are unit-tested over
//! fixtures (system disk behind LVM, md members, mounted partitions, no udev).
//! Partition tables and filesystems are read from the whole device at their
//! offsets: partition device nodes are never needed (some kernels parse no
//! tables at all, so `/dev/loop0p1` may never appear).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Serialize, Serializer};
use thiserror::Error;

use crate::bytes::{u16_at, u32_at};
use crate::disk::ext4::Ext4Info;
use crate::disk::fat;
use crate::disk::partition::{self, TableEntry, TableKind, has_boot_signature, is_boot_sector};
use crate::io::{PartitionWindow, ReadSeek, read_at};
use crate::layout;

/// Mount points that make a disk "the running system": refused even with `--force`.
pub const SYSTEM_MOUNT_POINTS: [&str; 5] = ["/", "/boot", "/boot/efi", "/efi", "/usr"];

/// What the listing says when the udev database is missing.
pub const NO_UDEV_NOTE: &str = "udev database not available; reading sysfs only";

/// How often the watcher looks at sysfs.
const POLL: Duration = Duration::from_millis(200);

#[derive(Debug, Error)]
pub enum DeviceError {
    #[error(
        "cannot read {path}: {source}; livestick finds block devices in sysfs — is /sys mounted?"
    )]
    Sysfs { path: PathBuf, source: io::Error },
    #[error(
        "waited {} s for {wanted} new device(s) but {} appeared ({}); plug in the rest and run again, or give a longer timeout",
        .waited.as_secs(),
        .found.len(),
        if .found.is_empty() { "none".to_string() } else {
            .found.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        }
    )]
    WaitTimedOut {
        wanted: usize,
        found: Vec<PathBuf>,
        waited: Duration,
    },
}

impl crate::error::Classify for DeviceError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            // Only `write --wait-for` waits, and a short count is the user's to fix.
            DeviceError::WaitTimedOut { .. } => ErrorKind::BadInput,
            DeviceError::Sysfs { .. } => ErrorKind::Io,
        }
    }
}

/// A device number, `major:minor`. Mounts, swap areas and holders are matched
/// by it and never by name: prefixes lie (`sda1` vs `sda10`) and one device has
/// many names (`/dev/dm-0`, `/dev/mapper/…`, `/dev/disk/by-uuid/…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevNum {
    pub major: u32,
    pub minor: u32,
}

impl DevNum {
    pub fn from_rdev(rdev: u64) -> DevNum {
        DevNum {
            major: libc::major(rdev),
            minor: libc::minor(rdev),
        }
    }

    /// Parses `8:16` (sysfs `dev`, mountinfo field 3).
    pub fn parse(text: &str) -> Option<DevNum> {
        let (major, minor) = text.trim().split_once(':')?;
        Some(DevNum {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
        })
    }
}

impl fmt::Display for DevNum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

impl Serialize for DevNum {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// How a disk is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Usb,
    Mmc,
    Sata,
    Scsi,
    Nvme,
    Virtio,
    Loop,
    /// device-mapper (LVM, dm-crypt, multipath)
    Dm,
    /// software RAID
    Md,
    /// other kernel-made devices (zram, ram disks)
    Virtual,
    Unknown,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        f.write_str(&s)
    }
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone)]
pub struct MountEntry {
    pub dev: DevNum,
    pub mount_point: String,
    pub fstype: String,
    pub source: String,
}

/// Parses mountinfo; malformed lines are skipped (the kernel writes it, but a
/// captured fixture may be hand-edited).
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() < 5 || fields.len() < sep + 3 {
            continue;
        }
        let Some(dev) = DevNum::parse(fields[2]) else {
            continue;
        };
        out.push(MountEntry {
            dev,
            mount_point: unescape_mount(fields[4]),
            fstype: fields[sep + 1].to_string(),
            source: unescape_mount(fields[sep + 2]),
        });
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A sysfs block node (whole disk or partition).
#[derive(Debug, Clone)]
struct Node {
    dir: PathBuf,
    name: String,
    dev: DevNum,
}

/// Where device state is read from: the running system, or a captured tree.
#[derive(Debug, Clone)]
pub struct Host {
    sys: PathBuf,
    udev_data: PathBuf,
    mounts: Vec<MountEntry>,
    swaps: Vec<String>,
    /// Resolve paths (swap devices, mount sources, loop backing files) with
    /// `stat` on this machine; a captured tree resolves `/dev/NAME` through its
    /// own `class/block/NAME/dev` instead.
    live: bool,
}

impl Host {
    /// The running system: `/sys`, `/run/udev/data`, `/proc/self/mountinfo`, `/proc/swaps`.
    pub fn live() -> Host {
        Host {
            sys: PathBuf::from("/sys"),
            udev_data: PathBuf::from("/run/udev/data"),
            mounts: parse_mountinfo(
                &fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
            ),
            swaps: parse_swaps(&fs::read_to_string("/proc/swaps").unwrap_or_default()),
            live: true,
        }
    }

    /// A captured tree: `sys` laid out like `/sys`, `udev_data` like
    /// `/run/udev/data` (may be missing), and the texts of mountinfo and swaps.
    pub fn from_tree(sys: &Path, udev_data: &Path, mountinfo: &str, swaps: &str) -> Host {
        Host {
            sys: fs::canonicalize(sys).unwrap_or_else(|_| sys.to_path_buf()),
            udev_data: udev_data.to_path_buf(),
            mounts: parse_mountinfo(mountinfo),
            swaps: parse_swaps(swaps),
            live: false,
        }
    }

    /// Whether udev's database is there to complete what sysfs says.
    pub fn has_udev_db(&self) -> bool {
        self.udev_data.is_dir()
    }

    pub fn mounts(&self) -> &[MountEntry] {
        &self.mounts
    }

    fn node(&self, dev: DevNum) -> Option<Node> {
        self.node_at(&self.sys.join(format!("dev/block/{dev}")))
    }

    fn node_at(&self, path: &Path) -> Option<Node> {
        let dir = fs::canonicalize(path).ok()?;
        let dev = DevNum::parse(&read_attr(&dir, "dev")?)?;
        let name = dir.file_name()?.to_string_lossy().into_owned();
        Some(Node { dir, name, dev })
    }

    fn node_named(&self, name: &str) -> Option<Node> {
        self.node_at(&self.sys.join("class/block").join(name))
    }

    /// The device number behind a path such as a swap device, a mount source
    /// or a loop backing file; `None` when it is not a block device.
    fn resolve_block(&self, path: &str) -> Option<DevNum> {
        if self.live {
            let meta = fs::metadata(path).ok()?;
            return meta
                .file_type()
                .is_block_device()
                .then(|| DevNum::from_rdev(meta.rdev()));
        }
        let name = path.strip_prefix("/dev/")?;
        self.node_named(name).map(|n| n.dev)
    }

    fn links(&self, node: &Node, sub: &str) -> Vec<Node> {
        let mut out: Vec<Node> = fs::read_dir(node.dir.join(sub))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| self.node_at(&e.path()))
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn partitions(&self, node: &Node) -> Vec<Node> {
        let mut out: Vec<Node> = fs::read_dir(&node.dir)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().join("partition").is_file())
                    .filter_map(|e| self.node_at(&e.path()))
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by_key(|n| partition_number(n).unwrap_or(u32::MAX));
        out
    }

    fn is_partition(node: &Node) -> bool {
        node.dir.join("partition").is_file()
    }

    /// The whole disk a partition lives on (the node itself for a disk).
    fn whole_disk(&self, node: &Node) -> Node {
        if Self::is_partition(node)
            && let Some(parent) = node.dir.parent().and_then(|p| self.node_at(p))
        {
            return parent;
        }
        node.clone()
    }

    fn dev_path(&self, node: &Node) -> PathBuf {
        let name = read_uevent(&node.dir, "DEVNAME").unwrap_or_else(|| node.name.clone());
        PathBuf::from("/dev").join(name)
    }

    fn udev_props(&self, dev: DevNum) -> BTreeMap<String, String> {
        let Ok(text) = fs::read_to_string(self.udev_data.join(format!("b{dev}"))) else {
            return BTreeMap::new();
        };
        text.lines()
            .filter_map(|l| l.strip_prefix("E:"))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn mounts_of(&self, dev: DevNum) -> Vec<&MountEntry> {
        self.mounts
            .iter()
            .filter(|m| self.mount_dev(m) == Some(dev))
            .collect()
    }

    /// The block device a mount lives on. Filesystems such as btrfs report an
    /// anonymous `0:N` device in mountinfo; their source path names the real one.
    fn mount_dev(&self, m: &MountEntry) -> Option<DevNum> {
        if m.dev.major != 0 {
            return Some(m.dev);
        }
        if m.source.starts_with('/') {
            return self.resolve_block(&m.source);
        }
        None
    }

    fn loops_backed_by(&self, dev: DevNum) -> Vec<String> {
        let Ok(rd) = fs::read_dir(self.sys.join("class/block")) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for entry in rd.flatten() {
            let Some(node) = self.node_at(&entry.path()) else {
                continue;
            };
            if let Some(backing) = read_attr(&node.dir, "loop/backing_file")
                && self.resolve_block(backing.trim_end_matches(" (deleted)")) == Some(dev)
            {
                out.push(node.name);
            }
        }
        out.sort();
        out
    }

    /// What uses the loop devices attached to the file whose device and inode
    /// numbers are `file`: their mounts, swap and holders (a loop device attached
    /// and idle is no finding). Only on the running system, where backing files
    /// can be looked at.
    pub fn busy_loops_of_file(&self, file: (u64, u64)) -> Vec<String> {
        use std::os::unix::fs::MetadataExt;
        if !self.live {
            return Vec::new();
        }
        let Ok(rd) = fs::read_dir(self.sys.join("class/block")) else {
            return Vec::new();
        };
        let mut loops: Vec<Node> = rd
            .flatten()
            .filter_map(|entry| self.node_at(&entry.path()))
            .filter(|node| {
                read_attr(&node.dir, "loop/backing_file")
                    .and_then(|b| fs::metadata(b.trim_end_matches(" (deleted)")).ok())
                    .is_some_and(|m| m.is_file() && (m.dev(), m.ino()) == file)
            })
            .collect();
        loops.sort_by(|a, b| a.name.cmp(&b.name));
        loops
            .iter()
            .flat_map(|node| {
                self.busy_findings(node.dev)
                    .into_iter()
                    .map(move |finding| {
                        format!("the file is attached to /dev/{}, and {finding}", node.name)
                    })
            })
            .collect()
    }

    /// Everything that uses the device or one of its partitions — mounts, swap,
    /// holders (followed recursively: dm, LVM, md, bcache) and loop devices
    /// stacked on it — one finding per line, matched by major:minor only.
    pub fn busy_findings(&self, dev: DevNum) -> Vec<String> {
        let Some(node) = self.node(dev) else {
            return Vec::new();
        };
        let mut nodes = vec![node.clone()];
        nodes.extend(self.partitions(&node));
        let mut findings = Vec::new();
        let mut seen = HashSet::new();
        for n in &nodes {
            self.usage(n, None, 0, &mut seen, &mut findings);
        }
        findings
    }

    fn usage(
        &self,
        node: &Node,
        under: Option<&str>,
        depth: usize,
        seen: &mut HashSet<DevNum>,
        out: &mut Vec<String>,
    ) {
        // Holder graphs are DAGs in practice; the bound only guards a damaged tree.
        if depth > 16 || !seen.insert(node.dev) {
            return;
        }
        let who = match under {
            Some(base) => format!("/dev/{} (on {base})", node.name),
            None => format!("/dev/{}", node.name),
        };
        for m in self.mounts_of(node.dev) {
            out.push(format!("{who} is mounted on {}", m.mount_point));
        }
        for swap in &self.swaps {
            if self.resolve_block(swap) == Some(node.dev) {
                out.push(format!("{who} is used as swap"));
            }
        }
        for lo in self.loops_backed_by(node.dev) {
            out.push(format!(
                "{who} is the backing device of loop device /dev/{lo}"
            ));
        }
        let base = under
            .map(str::to_string)
            .unwrap_or(format!("/dev/{}", node.name));
        for holder in self.links(node, "holders") {
            out.push(format!(
                "{who} is held by /dev/{}{}",
                holder.name,
                describe_holder(&holder.dir)
            ));
            self.usage(&holder, Some(&base), depth + 1, seen, out);
            for part in self.partitions(&holder) {
                self.usage(&part, Some(&base), depth + 1, seen, out);
            }
        }
    }

    /// The disks the running system lives on, with the mount point that puts
    /// each there. Followed down through `slaves/` (dm, LVM, md), partitions to
    /// their disk, and loop devices to the filesystem holding their backing file.
    pub fn system_disks(&self) -> Vec<SystemUse> {
        let mut out: Vec<SystemUse> = Vec::new();
        for mp in SYSTEM_MOUNT_POINTS {
            for m in self.mounts.iter().filter(|m| m.mount_point == mp) {
                let Some(dev) = self.mount_dev(m) else {
                    continue;
                };
                let mut devs = BTreeSet::new();
                self.below(dev, 0, &mut devs);
                for d in devs {
                    if !out.iter().any(|u| u.dev == d && u.mount_point == mp) {
                        out.push(SystemUse {
                            mount_point: mp.to_string(),
                            dev: d,
                        });
                    }
                }
            }
        }
        out
    }

    fn below(&self, dev: DevNum, depth: usize, out: &mut BTreeSet<DevNum>) {
        if depth > 16 || !out.insert(dev) {
            return;
        }
        let Some(node) = self.node(dev) else {
            return;
        };
        let disk = self.whole_disk(&node);
        out.insert(disk.dev);
        for n in [&node, &disk] {
            for slave in self.links(n, "slaves") {
                self.below(slave.dev, depth + 1, out);
            }
        }
        if self.live
            && let Some(backing) = read_attr(&node.dir, "loop/backing_file")
            && let Ok(meta) = fs::metadata(backing.trim_end_matches(" (deleted)"))
        {
            let next = if meta.file_type().is_block_device() {
                DevNum::from_rdev(meta.rdev())
            } else {
                DevNum::from_rdev(meta.dev())
            };
            self.below(next, depth + 1, out);
        }
    }

    /// The whole disk `dev` is a partition of (`dev` itself for a disk).
    pub fn whole_disk_of(&self, dev: DevNum) -> DevNum {
        self.node(dev)
            .map(|n| self.whole_disk(&n).dev)
            .unwrap_or(dev)
    }

    /// The devices `dev` is built on directly (`slaves/`: dm, LVM, md).
    pub fn slaves_of(&self, dev: DevNum) -> Vec<DevNum> {
        self.node(dev)
            .map(|n| {
                self.links(&n, "slaves")
                    .into_iter()
                    .map(|s| s.dev)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The file (or device) a loop device reads and writes, as the kernel
    /// names it; `None` for anything that is not an attached loop device.
    pub fn loop_backing_file(&self, dev: DevNum) -> Option<PathBuf> {
        let node = self.node(dev)?;
        let backing = read_attr(&node.dir, "loop/backing_file")?;
        Some(PathBuf::from(backing.trim_end_matches(" (deleted)")))
    }

    /// The block device behind a file system's device number: itself, or for
    /// an anonymous `0:N` one (btrfs, overlayfs) what its mount source names.
    pub fn fs_device(&self, dev: DevNum) -> Option<DevNum> {
        if dev.major != 0 {
            return Some(dev);
        }
        self.mounts
            .iter()
            .filter(|m| m.dev == dev)
            .find_map(|m| self.mount_dev(m))
    }

    /// What sysfs (and udev, when present) say about one device, without reading it.
    pub fn facts(&self, dev: DevNum) -> Option<DeviceFacts> {
        let node = self.node(dev)?;
        let disk = self.whole_disk(&node);
        let udev = self.udev_props(disk.dev);
        let device_dir = fs::canonicalize(disk.dir.join("device")).ok();
        let dev_attr = |rel: &str| device_dir.as_ref().and_then(|d| read_attr(d, rel));
        let udev_get = |key: &str| {
            udev.get(key)
                .map(|v| v.replace('_', " ").trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let transport = self.transport(&disk, &udev);
        let hotplug = device_dir.as_ref().is_some_and(|d| {
            self.ancestors(d)
                .any(|a| read_attr(&a, "removable").as_deref() == Some("removable"))
        });
        let serial = udev
            .get("ID_SERIAL_SHORT")
            .cloned()
            .or_else(|| read_attr(&disk.dir, "serial"))
            .or_else(|| dev_attr("serial"))
            .or_else(|| {
                // USB mass storage: the serial is on the USB device, above the SCSI host.
                device_dir.as_ref().and_then(|d| {
                    self.ancestors(d)
                        .find(|a| a.join("idVendor").is_file())
                        .and_then(|a| read_attr(&a, "serial"))
                })
            });
        let model = dev_attr("model")
            .or_else(|| dev_attr("name"))
            .or_else(|| udev_get("ID_MODEL"));
        let vendor = dev_attr("vendor")
            .filter(|v| !v.starts_with("0x"))
            .or_else(|| udev_get("ID_VENDOR"));
        let sectors: u64 = read_attr(&node.dir, "size")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let queue = |rel: &str| {
            read_attr(&disk.dir, rel)
                .and_then(|s| s.parse().ok())
                .unwrap_or(512)
        };
        Some(DeviceFacts {
            path: self.dev_path(&node),
            name: node.name.clone(),
            devnum: node.dev,
            // sysfs counts in 512-byte units whatever the logical sector size.
            size: sectors.saturating_mul(512),
            model,
            vendor,
            serial,
            transport,
            removable: read_attr(&disk.dir, "removable").as_deref() == Some("1"),
            hotplug,
            read_only: read_attr(&node.dir, "ro").as_deref() == Some("1"),
            logical_sector_size: queue("queue/logical_block_size"),
            physical_sector_size: queue("queue/physical_block_size"),
            backing_file: read_attr(&disk.dir, "loop/backing_file"),
            partition_of: Self::is_partition(&node).then(|| self.dev_path(&disk)),
        })
    }

    /// The device's sysfs ancestors, from `start` up to (not including) `/sys/devices`.
    fn ancestors<'a>(&'a self, start: &'a Path) -> impl Iterator<Item = PathBuf> + 'a {
        let stop = self.sys.join("devices");
        start
            .ancestors()
            .take_while(move |a| a.starts_with(&stop) && *a != stop)
            .map(Path::to_path_buf)
    }

    fn transport(&self, disk: &Node, udev: &BTreeMap<String, String>) -> Transport {
        if disk.dir.join("loop").is_dir() {
            return Transport::Loop;
        }
        if disk.dir.join("dm").is_dir() {
            return Transport::Dm;
        }
        if disk.dir.join("md").is_dir() {
            return Transport::Md;
        }
        let path = disk.dir.to_string_lossy();
        // A SATA disk in a USB enclosure is a USB device: test USB first.
        if path.contains("/usb") {
            return Transport::Usb;
        }
        if path.contains("/mmc_host/") {
            return Transport::Mmc;
        }
        match udev.get("ID_BUS").map(String::as_str) {
            Some("usb") => return Transport::Usb,
            Some("ata") => return Transport::Sata,
            Some("scsi") => return Transport::Scsi,
            Some("nvme") => return Transport::Nvme,
            _ => {}
        }
        if path.contains("/nvme") {
            Transport::Nvme
        } else if path.contains("/virtio") {
            Transport::Virtio
        } else if path.contains("/ata") {
            Transport::Sata
        } else if path.contains("/host") && path.contains("/target") {
            Transport::Scsi
        } else if path.contains("/virtual/") {
            Transport::Virtual
        } else {
            Transport::Unknown
        }
    }

    /// Whole-disk names under `class/block`, in natural order (`loop2` before `loop10`).
    fn disk_names(&self) -> Result<Vec<String>, DeviceError> {
        let dir = self.sys.join("class/block");
        let rd = fs::read_dir(&dir).map_err(|source| DeviceError::Sysfs {
            path: dir.clone(),
            source,
        })?;
        let mut names: Vec<String> = rd
            .flatten()
            .filter(|e| !e.path().join("partition").exists())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort_by_key(|n| natural_key(n));
        Ok(names)
    }
}

fn natural_key(name: &str) -> (String, u64) {
    let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let (stem, num) = name.split_at(name.len() - digits);
    (stem.to_string(), num.parse().unwrap_or(0))
}

fn parse_swaps(text: &str) -> Vec<String> {
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .map(unescape_mount)
        .collect()
}

fn read_attr(dir: &Path, rel: &str) -> Option<String> {
    fs::read_to_string(dir.join(rel))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn read_uevent(dir: &Path, key: &str) -> Option<String> {
    let text = fs::read_to_string(dir.join("uevent")).ok()?;
    text.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
}

fn partition_number(node: &Node) -> Option<u32> {
    read_attr(&node.dir, "partition")?.parse().ok()
}

fn describe_holder(dir: &Path) -> String {
    if let Some(name) = read_attr(dir, "dm/name") {
        let uuid = read_attr(dir, "dm/uuid").unwrap_or_default();
        let kind = if uuid.starts_with("LVM-") {
            "LVM volume"
        } else if uuid.starts_with("CRYPT-") {
            "dm-crypt volume"
        } else if uuid.starts_with("mpath-") {
            "multipath map"
        } else {
            "device-mapper volume"
        };
        return format!(" ({kind} {name})");
    }
    if let Some(level) = read_attr(dir, "md/level") {
        return format!(" (software RAID {level})");
    }
    String::new()
}

/// A disk the running system needs, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SystemUse {
    pub mount_point: String,
    pub dev: DevNum,
}

/// What sysfs and udev say about a device, without reading its contents.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceFacts {
    /// The device node (`/dev/sdb`): what a write or maintenance would target.
    #[serde(rename = "target")]
    pub path: PathBuf,
    pub name: String,
    pub devnum: DevNum,
    #[serde(rename = "size_bytes")]
    pub size: u64,
    pub model: Option<String>,
    pub vendor: Option<String>,
    pub serial: Option<String>,
    pub transport: Transport,
    /// The kernel's removable-media flag (card readers, most USB sticks).
    pub removable: bool,
    /// On a bus that can be unplugged (USB, SD slot) whatever the flag says:
    /// USB SSDs and some sticks report removable = 0.
    pub hotplug: bool,
    pub read_only: bool,
    #[serde(rename = "logical_sector_bytes")]
    pub logical_sector_size: u32,
    #[serde(rename = "physical_sector_bytes")]
    pub physical_sector_size: u32,
    /// For loop devices: the file they show.
    pub backing_file: Option<String>,
    /// Set when this is a partition: the whole disk it is on.
    pub partition_of: Option<PathBuf>,
}

impl DeviceFacts {
    /// Removable in the sense that matters for a stick writer: flagged
    /// removable, hotpluggable, or on USB/MMC.
    pub fn removable_class(&self) -> bool {
        self.removable || self.hotplug || matches!(self.transport, Transport::Usb | Transport::Mmc)
    }
}

// ---------------------------------------------------------------------------
// Reading what a device holds: partition table, filesystems, LiveOS.

/// A filesystem found by its superblock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FsInfo {
    /// `vfat`, `ext4`, `ext3`, `ext2`, `iso9660`, `swap`, `crypto_LUKS`, `squashfs`
    /// (blkid's names, so scripts can compare).
    pub fs_type: String,
    pub label: Option<String>,
    pub uuid: Option<String>,
}

fn text_field(b: &[u8]) -> Option<String> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let s = String::from_utf8_lossy(&b[..end]).trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// Identifies the filesystem at `offset` by its superblock. Reads at most 40 KiB.
pub fn peek_filesystem<R: Read + Seek>(r: &mut R, offset: u64, len: u64) -> Option<FsInfo> {
    let b = read_at(r, offset, len.min(40 * 1024) as usize).ok()?;
    let fs = |t: &str, label: Option<String>, uuid: Option<String>| {
        Some(FsInfo {
            fs_type: t.to_string(),
            label,
            uuid,
        })
    };
    if b.len() >= 6 && &b[0..6] == b"LUKS\xba\xbe" {
        return fs("crypto_LUKS", None, b.get(168..208).and_then(text_field));
    }
    if b.len() >= 4 && &b[0..4] == b"hsqs" {
        return fs("squashfs", None, None);
    }
    if b.len() >= 2048 && crate::disk::ext4::image_has_magic(&b) {
        let sb = &b[1024..2048];
        let compat = u32_at(sb, 0x5c);
        let incompat = u32_at(sb, 0x60);
        // extents, 64bit or flex_bg mean ext4; a journal alone means ext3.
        let t = if incompat & (0x40 | 0x80 | 0x200) != 0 {
            "ext4"
        } else if compat & 0x4 != 0 {
            "ext3"
        } else {
            "ext2"
        };
        let info = Ext4Info::from_superblock(sb).ok();
        return fs(
            t,
            info.as_ref()
                .map(|i| i.label.clone())
                .filter(|l| !l.is_empty()),
            info.map(|i| i.uuid),
        );
    }
    if b.len() >= 4096 && &b[4086..4096] == b"SWAPSPACE2" {
        let uuid = uuid::Uuid::from_slice(&b[1024 + 12..1024 + 28])
            .ok()
            .map(|u| u.hyphenated().to_string());
        return fs("swap", text_field(&b[1024 + 28..1024 + 44]), uuid);
    }
    if b.len() >= 32768 + 72 && &b[32769..32774] == b"CD001" {
        return fs("iso9660", text_field(&b[32768 + 40..32768 + 72]), None);
    }
    if has_boot_signature(&b) && is_boot_sector(&b[..512]) {
        if b.get(3..7) == Some(b"NTFS") {
            return fs("ntfs", None, None);
        }
        // FAT32 has no 16-bit FAT size; its extended boot record sits further on.
        let fat32 = u16_at(&b, 22) == 0;
        let (id_at, label_at) = if fat32 { (67, 71) } else { (39, 43) };
        let label = text_field(&b[label_at..label_at + 11]).filter(|l| l != "NO NAME");
        let id = u32_at(&b, id_at);
        return fs("vfat", label, Some(fat::format_volume_id(id)));
    }
    None
}

/// An overlay file found in a LiveOS directory.
#[derive(Debug, Clone, Serialize)]
pub struct OverlayInfo {
    /// Path on the stick (`/LiveOS/overlay-LABEL-UUID`).
    #[serde(rename = "path")]
    pub file: String,
    #[serde(rename = "size_bytes")]
    pub size: u64,
    /// `dm-snapshot` or `overlayfs` (an ext4 image used as the upper layer).
    pub kind: Option<&'static str>,
    /// For dm-snapshot: `uninitialised`, `valid` or `invalid`.
    pub state: Option<String>,
    pub percent_used: Option<f64>,
    /// What `dmsetup status` would show.
    pub dm_status: Option<String>,
    /// Why the overlay could not be read, when it could not (never fails the listing).
    pub problem: Option<String>,
}

/// Describes the overlay formats `disk/` does not own. The listing reads
/// what it can itself (an ext4 image, the OverlayFS kind); for any other
/// overlay file it asks this, so that a layer above `disk/` that knows the
/// dm-snapshot store (`persist::snapshot`) can fill in `kind`, `state`,
/// `percent_used` and `dm_status`, or `problem`, without `disk/` importing it.
pub trait OverlayProbe {
    /// `file` is at offset 0 and holds `size` bytes.
    fn describe(&self, file: &mut dyn ReadSeek, size: u64, info: &mut OverlayInfo);
}

/// Leaves every overlay that is not an ext4 image undescribed (`kind: None`).
pub struct NoOverlayProbe;

impl OverlayProbe for NoOverlayProbe {
    fn describe(&self, _: &mut dyn ReadSeek, _: u64, _: &mut OverlayInfo) {}
}

/// A LiveOS found on a FAT partition.
#[derive(Debug, Clone, Serialize)]
pub struct LiveInfo {
    /// The partition it is on (0 for a filesystem on the whole device).
    pub partition: u32,
    /// The FAT label: what `root=live:LABEL=` names.
    pub label: String,
    pub uuid: String,
    /// `LiveOS` unless written with `--livedir`.
    pub live_dir: String,
    #[serde(rename = "squashfs_bytes")]
    pub squashfs_size: Option<u64>,
    pub overlays: Vec<OverlayInfo>,
    /// Size of `home.img` when present.
    #[serde(rename = "home_bytes")]
    pub home_size: Option<u64>,
    /// The ext4 live layout (persistence over 4 GiB): the live directory is on ext4
    /// `partition`, and this FAT partition holds the boot files; `null` when the
    /// live directory is on the FAT.
    pub boot_partition: Option<u32>,
}

/// A `Read + Seek` that satisfies fatfs's `Write` bound but refuses every
/// write, so looking at a stick can never change it.
struct ReadOnly<R>(R);

impl<R: Read> Read for ReadOnly<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}
impl<R: Seek> Seek for ReadOnly<R> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.0.seek(pos)
    }
}
impl<R> Write for ReadOnly<R> {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "device opened read-only for listing",
        ))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Looks for a LiveOS in the FAT filesystem at `[start, start + len)`,
/// describing its overlays with `probe`.
/// `Ok(None)`: a FAT filesystem without a live directory.
pub fn live_info<R: Read + Seek>(
    r: R,
    partition: u32,
    start: u64,
    len: u64,
    probe: &dyn OverlayProbe,
) -> Result<Option<LiveInfo>, String> {
    let mut ro = ReadOnly(r);
    let mut window = PartitionWindow::new(&mut ro, start, len);
    let fs = fat::open(&mut window).map_err(|e| e.to_string())?;
    let root = fat::list_dir(&fs, "/");
    let is_live_dir = |dir: &str| {
        fat::list_dir(&fs, dir).iter().any(|e| {
            let n = e.path.rsplit('/').next().unwrap_or("").to_ascii_lowercase();
            n == layout::SQUASHFS || n == "rootfs.img" || layout::is_overlay_name(&n)
        })
    };
    let mut dirs: Vec<&fat::FatEntry> = root.iter().filter(|e| e.is_dir).collect();
    // LiveOS first: the default, and the one dracut looks for without rd.live.dir.
    dirs.sort_by_key(|e| !e.path.eq_ignore_ascii_case("/LiveOS"));
    let Some(dir) = dirs.into_iter().find(|e| is_live_dir(&e.path)) else {
        return Ok(None);
    };
    let live_dir = dir.path.trim_start_matches('/').to_string();
    let entries = fat::list_dir(&fs, &dir.path);
    let file_named = |name: &str| {
        entries.iter().find(|e| {
            !e.is_dir
                && e.path
                    .rsplit('/')
                    .next()
                    .is_some_and(|n| n.eq_ignore_ascii_case(name))
        })
    };
    let mut overlays = Vec::new();
    for e in entries.iter().filter(|e| {
        !e.is_dir
            && e.path
                .rsplit('/')
                .next()
                .is_some_and(|n| n.to_ascii_lowercase().starts_with("overlay-"))
    }) {
        overlays.push(overlay_info(&fs, &e.path, e.size, probe));
    }
    Ok(Some(LiveInfo {
        partition,
        label: fs.volume_label().trim_end().to_string(),
        uuid: fat::format_volume_id(fs.volume_id()),
        live_dir,
        squashfs_size: file_named(layout::SQUASHFS).map(|e| e.size),
        overlays,
        home_size: file_named(layout::HOME).map(|e| e.size),
        boot_partition: None,
    }))
}

/// Looks for a LiveOS on an ext4 partition of the device (the ext4 live layout,
/// boot files on FAT partition `boot`), its files read through their extents.
pub fn ext4_live_info<R: Read + Seek>(
    r: R,
    boot: u32,
    probe: &dyn OverlayProbe,
) -> Result<Option<LiveInfo>, String> {
    use crate::disk::{ext4_fs, ext4_live};
    let mut ro = ReadOnly(r);
    let live_dir = "LiveOS";
    let Some(part) = ext4_fs::find_live_partition(&mut ro, live_dir).map_err(|e| e.to_string())?
    else {
        return Ok(None);
    };
    let Some((found, _)) =
        ext4_live::layout_of(&mut ro, live_dir, boot).map_err(|e| e.to_string())?
    else {
        return Ok(None);
    };
    let named = |name: &str| {
        found
            .files
            .iter()
            .find(|f| f.path == format!("/{live_dir}/{name}"))
            .map(|f| f.size_bytes)
    };
    let mut overlays = Vec::new();
    for f in found
        .files
        .iter()
        .filter(|f| layout::is_overlay_name(f.path.rsplit('/').next().unwrap_or("")))
    {
        let mut info = OverlayInfo {
            file: f.path.clone(),
            size: f.size_bytes,
            kind: None,
            state: None,
            percent_used: None,
            dm_status: None,
            problem: None,
        };
        let map = {
            let mut window = PartitionWindow::new(&mut ro, part.start, part.len);
            part.fs.file(&mut window, &f.path)
        };
        match map {
            Ok(Some(map)) => {
                let mut file =
                    ext4_fs::Ext4File::new(&mut ro, part.start, part.fs.block_size, &map);
                if let Ok(ext) = Ext4Info::read_from(&mut file) {
                    info.kind = Some("overlayfs");
                    info.percent_used = Some(if ext.size_bytes == 0 {
                        0.0
                    } else {
                        ext.used_bytes as f64 * 100.0 / ext.size_bytes as f64
                    });
                } else if let Err(e) = file.seek(SeekFrom::Start(0)) {
                    info.problem = Some(e.to_string());
                } else {
                    probe.describe(&mut file, f.size_bytes, &mut info);
                }
            }
            Ok(None) => info.problem = Some("gone while listing".into()),
            Err(e) => info.problem = Some(e.to_string()),
        }
        overlays.push(info);
    }
    Ok(Some(LiveInfo {
        partition: found.partition,
        label: found.label.clone(),
        uuid: found.uuid.clone(),
        live_dir: live_dir.to_string(),
        squashfs_size: named(layout::SQUASHFS),
        overlays,
        home_size: named(layout::HOME),
        boot_partition: Some(boot),
    }))
}

fn overlay_info<F: Read + Write + Seek>(
    fs: &fat::FatFs<'_, F>,
    path: &str,
    size: u64,
    probe: &dyn OverlayProbe,
) -> OverlayInfo {
    let mut info = OverlayInfo {
        file: path.to_string(),
        size,
        kind: None,
        state: None,
        percent_used: None,
        dm_status: None,
        problem: None,
    };
    let mut file = match fs.root_dir().open_file(path.trim_start_matches('/')) {
        Ok(f) => f,
        Err(e) => {
            info.problem = Some(format!("cannot open: {e}"));
            return info;
        }
    };
    // The OverlayFS variant keeps an ext4 image as the upper layer.
    if let Ok(ext) = Ext4Info::read_from(&mut file) {
        info.kind = Some("overlayfs");
        info.percent_used = Some(if ext.size_bytes == 0 {
            0.0
        } else {
            ext.used_bytes as f64 * 100.0 / ext.size_bytes as f64
        });
        return info;
    }
    if let Err(e) = file.seek(SeekFrom::Start(0)) {
        info.problem = Some(e.to_string());
        return info;
    }
    probe.describe(&mut file, size, &mut info);
    info
}

// ---------------------------------------------------------------------------
// The listing.

/// A partition as `livestick devices` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionInfo {
    #[serde(flatten)]
    pub entry: TableEntry,
    /// The kernel's node for it, when the kernel parsed the table (`sdb1`).
    pub kernel_name: Option<String>,
    pub filesystem: Option<FsInfo>,
    pub mounted: Vec<String>,
}

/// One whole device in the listing.
#[derive(Debug, Clone, Serialize)]
pub struct BlockDevice {
    #[serde(flatten)]
    pub facts: DeviceFacts,
    /// Not removable, not hotpluggable, not USB/MMC: shown only with `--all`.
    pub fixed: bool,
    /// Mount points of the running system on this disk (refused even with --force).
    pub system: Vec<String>,
    /// Everything that makes a write refuse: mounts, swap, holders.
    pub busy: Vec<String>,
    /// Mount points of the whole device itself.
    pub mounted: Vec<String>,
    pub table: Option<TableKind>,
    /// A filesystem on the whole device (no partition table).
    pub filesystem: Option<FsInfo>,
    pub partitions: Vec<PartitionInfo>,
    pub live: Option<LiveInfo>,
    /// What could not be read, and why; the listing never fails for one device.
    pub notes: Vec<String>,
}

/// What `livestick devices` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    /// Whether the udev database completed the sysfs facts.
    pub udev: bool,
    pub notes: Vec<String>,
    pub devices: Vec<BlockDevice>,
}

/// The shape version of the `devices --json` document (docs/json-maintenance.md,
/// `schemas/devices.schema.json`).
pub const SCHEMA_VERSION: u64 = 1;

impl Listing {
    /// The `devices --json` document: `schema`, then the listing.
    pub fn to_document(&self) -> serde_json::Result<serde_json::Value> {
        let mut doc = serde_json::to_value(self)?;
        if let Some(object) = doc.as_object_mut() {
            object.insert("schema".into(), serde_json::json!(SCHEMA_VERSION));
        }
        Ok(doc)
    }
}

/// Lists whole block devices: removable ones, or all with `all` (fixed disks
/// marked, loop devices that have a backing file, dm/md). Reads each device's
/// partition table and filesystems itself; fails only if sysfs is unreadable.
/// Overlays other than ext4 images are left undescribed: `livestick devices`
/// lists through [`list_with`] and a probe that knows the dm-snapshot store.
pub fn list(host: &Host, all: bool) -> Result<Listing, DeviceError> {
    list_with(host, all, &NoOverlayProbe)
}

/// [`list`], describing overlays with `probe`.
pub fn list_with(host: &Host, all: bool, probe: &dyn OverlayProbe) -> Result<Listing, DeviceError> {
    let mut notes = Vec::new();
    if !host.has_udev_db() {
        notes.push(NO_UDEV_NOTE.to_string());
    }
    let system = host.system_disks();
    let mut devices = Vec::new();
    for name in host.disk_names()? {
        let Some(node) = host.node_named(&name) else {
            continue;
        };
        if read_attr(&node.dir, "hidden").as_deref() == Some("1") {
            continue;
        }
        let Some(facts) = host.facts(node.dev) else {
            continue;
        };
        // Unattached loop devices and unconfigured zram are just empty slots.
        if facts.transport == Transport::Loop && facts.backing_file.is_none() {
            continue;
        }
        let fixed = !facts.removable_class();
        if fixed && (!all || facts.size == 0) {
            continue;
        }
        let mut dev = BlockDevice {
            fixed,
            system: system
                .iter()
                .filter(|u| u.dev == node.dev)
                .map(|u| u.mount_point.clone())
                .collect(),
            busy: host.busy_findings(node.dev),
            mounted: host
                .mounts_of(node.dev)
                .iter()
                .map(|m| m.mount_point.clone())
                .collect(),
            table: None,
            filesystem: None,
            partitions: Vec::new(),
            live: None,
            notes: Vec::new(),
            facts,
        };
        if dev.facts.size == 0 {
            dev.notes.push("no medium".into());
        } else if host.live {
            read_contents(host, &node, &mut dev, probe);
        }
        devices.push(dev);
    }
    Ok(Listing {
        udev: host.has_udev_db(),
        notes,
        devices,
    })
}

fn read_contents(host: &Host, node: &Node, dev: &mut BlockDevice, probe: &dyn OverlayProbe) {
    let path = dev.facts.path.clone();
    // Open only the node that really is this device (a stale /dev could differ).
    let matches = fs::metadata(&path)
        .map(|m| m.file_type().is_block_device() && DevNum::from_rdev(m.rdev()) == node.dev)
        .unwrap_or(false);
    if !matches {
        dev.notes.push(format!(
            "{} is not this device's node; contents not read",
            path.display()
        ));
        return;
    }
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ENOMEDIUM) => {
            dev.notes.push("no medium".into());
            return;
        }
        Err(e) => {
            let hint = if e.kind() == io::ErrorKind::PermissionDenied
                && !nix::unistd::Uid::effective().is_root()
            {
                "; run as root to see partitions and LiveOS"
            } else {
                ""
            };
            dev.notes
                .push(format!("cannot read {}: {e}{hint}", path.display()));
            return;
        }
    };
    let size = dev.facts.size;
    let sector = u64::from(dev.facts.logical_sector_size.max(512));
    let mut r = &file;
    match partition::read_table(&mut r, size, sector) {
        Ok(Some((kind, entries))) => {
            dev.table = Some(kind);
            let known = host.partitions(node);
            for entry in entries {
                let knode = known
                    .iter()
                    .find(|k| partition_number(k) == Some(entry.number));
                let filesystem = if entry.is_extended() {
                    None
                } else {
                    peek_filesystem(&mut r, entry.start, entry.len)
                };
                if dev.live.is_none() && filesystem.as_ref().is_some_and(|f| f.fs_type == "vfat") {
                    match live_info(&file, entry.number, entry.start, entry.len, probe) {
                        Ok(live) => dev.live = live,
                        Err(e) => dev.notes.push(format!("partition {}: {e}", entry.number)),
                    }
                }
                if dev.live.is_none() && filesystem.as_ref().is_some_and(|f| f.fs_type == "ext4") {
                    let boot = dev
                        .partitions
                        .iter()
                        .find(|p| p.filesystem.as_ref().is_some_and(|f| f.fs_type == "vfat"))
                        .map_or(1, |p| p.entry.number);
                    match ext4_live_info(&file, boot, probe) {
                        Ok(live) => dev.live = live,
                        Err(e) => dev.notes.push(format!("partition {}: {e}", entry.number)),
                    }
                }
                dev.partitions.push(PartitionInfo {
                    kernel_name: knode.map(|k| k.name.clone()),
                    mounted: knode
                        .map(|k| {
                            host.mounts_of(k.dev)
                                .iter()
                                .map(|m| m.mount_point.clone())
                                .collect()
                        })
                        .unwrap_or_default(),
                    filesystem,
                    entry,
                });
            }
        }
        Ok(None) => {
            dev.filesystem = peek_filesystem(&mut r, 0, size);
            if dev.filesystem.as_ref().is_some_and(|f| f.fs_type == "vfat") {
                match live_info(&file, 0, 0, size, probe) {
                    Ok(live) => dev.live = live,
                    Err(e) => dev.notes.push(e),
                }
            }
        }
        Err(e) => dev
            .notes
            .push(format!("cannot read the partition table: {e}")),
    }
}

// ---------------------------------------------------------------------------
// The watcher.

/// A device the watcher may hand out, keyed by name and `diskseq` (which the
/// kernel bumps on every attach and media change), so a loop slot re-used or
/// a card re-inserted counts as new.
fn candidates(host: &Host, include_fixed: bool) -> BTreeMap<(String, String), PathBuf> {
    let mut out = BTreeMap::new();
    let Ok(names) = host.disk_names() else {
        return out;
    };
    for name in names {
        let Some(node) = host.node_named(&name) else {
            continue;
        };
        let Some(facts) = host.facts(node.dev) else {
            continue;
        };
        if facts.size == 0
            || read_attr(&node.dir, "hidden").as_deref() == Some("1")
            || (facts.transport == Transport::Loop && facts.backing_file.is_none())
            || (!include_fixed && !facts.removable_class())
        {
            continue;
        }
        // Hand out only a node that exists: devtmpfs creates it, udev may rename later.
        let ready = fs::metadata(&facts.path)
            .map(|m| m.file_type().is_block_device() && DevNum::from_rdev(m.rdev()) == node.dev)
            .unwrap_or(false);
        if !ready {
            continue;
        }
        let seq = read_attr(&node.dir, "diskseq").unwrap_or_else(|| node.dev.to_string());
        out.insert((name, seq), facts.path);
    }
    out
}

/// Waits for `n` whole-disk devices that appear after the call starts
/// (removable ones; also fixed ones and loop devices with `include_fixed`),
/// calling `on_new` as each one appears, and returns them in order.
/// Devices present at the start are never handed out. Without a timeout it
/// waits until `n` have appeared; on timeout it returns
/// [`DeviceError::WaitTimedOut`] listing the ones already handed out.
pub fn wait_for_new_devices(
    n: usize,
    timeout: Option<Duration>,
    include_fixed: bool,
    on_new: impl FnMut(PathBuf),
) -> Result<Vec<PathBuf>, DeviceError> {
    let sys = Host {
        sys: PathBuf::from("/sys"),
        udev_data: PathBuf::from("/run/udev/data"),
        mounts: Vec::new(),
        swaps: Vec::new(),
        live: true,
    };
    wait_in(&sys, n, timeout, include_fixed, on_new)
}

fn wait_in(
    host: &Host,
    n: usize,
    timeout: Option<Duration>,
    include_fixed: bool,
    mut on_new: impl FnMut(PathBuf),
) -> Result<Vec<PathBuf>, DeviceError> {
    // Fail early, not after the timeout, when sysfs is not there at all.
    host.disk_names()?;
    let started = Instant::now();
    let mut seen: BTreeSet<(String, String)> =
        candidates(host, include_fixed).into_keys().collect();
    let mut found = Vec::new();
    while found.len() < n {
        for (key, path) in candidates(host, include_fixed) {
            if found.len() < n && seen.insert(key) {
                found.push(path.clone());
                on_new(path);
            }
        }
        if found.len() >= n {
            break;
        }
        if let Some(limit) = timeout
            && started.elapsed() >= limit
        {
            return Err(DeviceError::WaitTimedOut {
                wanted: n,
                found,
                waited: limit,
            });
        }
        std::thread::sleep(POLL);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A captured-sysfs builder: devices under `devices/…`, with the
    /// `class/block` and `dev/block` links the kernel makes.
    struct Tree {
        root: tempfile::TempDir,
    }

    impl Tree {
        fn new() -> Tree {
            let t = Tree {
                root: tempfile::tempdir().unwrap(),
            };
            fs::create_dir_all(t.sys().join("class/block")).unwrap();
            fs::create_dir_all(t.sys().join("dev/block")).unwrap();
            t
        }
        fn sys(&self) -> PathBuf {
            self.root.path().join("sys")
        }
        fn attr(&self, rel: &str, value: &str) {
            let p = self.sys().join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, format!("{value}\n")).unwrap();
        }
        /// A block node at `devices/<path>` (its last component is the name).
        fn block(&self, path: &str, dev: &str, sectors: u64) -> PathBuf {
            let dir = self.sys().join("devices").join(path);
            fs::create_dir_all(dir.join("holders")).unwrap();
            fs::create_dir_all(dir.join("slaves")).unwrap();
            fs::write(dir.join("dev"), format!("{dev}\n")).unwrap();
            fs::write(dir.join("size"), format!("{sectors}\n")).unwrap();
            let name = dir.file_name().unwrap().to_owned();
            symlink(&dir, self.sys().join("class/block").join(&name)).unwrap();
            symlink(&dir, self.sys().join("dev/block").join(dev)).unwrap();
            dir
        }
        fn disk(&self, path: &str, dev: &str, removable: bool) -> PathBuf {
            let dir = self.block(path, dev, 1 << 24);
            fs::write(dir.join("removable"), if removable { "1\n" } else { "0\n" }).unwrap();
            fs::write(dir.join("ro"), "0\n").unwrap();
            fs::create_dir_all(dir.join("queue")).unwrap();
            fs::write(dir.join("queue/logical_block_size"), "512\n").unwrap();
            fs::write(dir.join("queue/physical_block_size"), "512\n").unwrap();
            dir
        }
        fn partition(&self, disk: &Path, name: &str, dev: &str, number: u32) -> PathBuf {
            let rel = disk.join(name);
            let rel = rel.strip_prefix(self.sys().join("devices")).unwrap();
            let dir = self.block(rel.to_str().unwrap(), dev, 1 << 20);
            fs::write(dir.join("partition"), format!("{number}\n")).unwrap();
            dir
        }
        /// `lower` is held by `upper` (and `upper` lists `lower` as a slave).
        fn hold(&self, lower: &Path, upper: &Path) {
            symlink(
                upper,
                lower.join("holders").join(upper.file_name().unwrap()),
            )
            .unwrap();
            symlink(lower, upper.join("slaves").join(lower.file_name().unwrap())).unwrap();
        }
        fn host(&self, mountinfo: &str, swaps: &str) -> Host {
            Host::from_tree(
                &self.sys(),
                &self.root.path().join("udev-data"),
                mountinfo,
                swaps,
            )
        }
    }

    const SWAPS_HEADER: &str = "Filename\tType\tSize\tUsed\tPriority\n";

    fn mountinfo(lines: &[(&str, &str)]) -> String {
        lines
            .iter()
            .enumerate()
            .map(|(i, (dev, mp))| {
                format!("{} 1 {dev} / {mp} rw,relatime - ext4 /dev/x rw\n", 20 + i)
            })
            .collect()
    }

    /// A laptop: SATA disk with /boot on sda1 and LVM root on sda2, a USB
    /// stick with a mounted partition, and a two-disk md array.
    fn laptop() -> (Tree, PathBuf, PathBuf) {
        let t = Tree::new();
        let sda = t.disk(
            "pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda",
            "8:0",
            false,
        );
        t.attr(
            "devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/model",
            "Samsung SSD 870",
        );
        symlink(
            t.sys()
                .join("devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0"),
            sda.join("device"),
        )
        .unwrap();
        t.partition(&sda, "sda1", "8:1", 1);
        let sda2 = t.partition(&sda, "sda2", "8:2", 2);
        let dm0 = t.block("virtual/block/dm-0", "253:0", 1 << 22);
        t.attr("devices/virtual/block/dm-0/dm/name", "fedora-root");
        t.attr("devices/virtual/block/dm-0/dm/uuid", "LVM-abcdef");
        t.hold(&sda2, &dm0);

        let usb = "pci0000:00/0000:00:14.0/usb1/1-2";
        t.attr(&format!("devices/{usb}/removable"), "removable");
        t.attr(&format!("devices/{usb}/idVendor"), "0781");
        t.attr(&format!("devices/{usb}/serial"), "4C530001170822117474");
        let scsi = format!("{usb}/1-2:1.0/host6/target6:0:0/6:0:0:0");
        t.attr(&format!("devices/{scsi}/model"), "Cruzer Blade");
        t.attr(&format!("devices/{scsi}/vendor"), "SanDisk");
        let sdb = t.disk(&format!("{scsi}/block/sdb"), "8:16", false);
        symlink(t.sys().join("devices").join(&scsi), sdb.join("device")).unwrap();
        t.partition(&sdb, "sdb1", "8:17", 1);

        let sdc = t.disk(
            "pci0000:00/0000:00:1f.2/ata2/host1/target1:0:0/1:0:0:0/block/sdc",
            "8:32",
            false,
        );
        let sdc1 = t.partition(&sdc, "sdc1", "8:33", 1);
        let sdd = t.disk(
            "pci0000:00/0000:00:1f.2/ata3/host2/target2:0:0/2:0:0:0/block/sdd",
            "8:48",
            false,
        );
        let sdd1 = t.partition(&sdd, "sdd1", "8:49", 1);
        let md0 = t.block("virtual/block/md0", "9:0", 1 << 22);
        t.attr("devices/virtual/block/md0/md/level", "raid1");
        t.hold(&sdc1, &md0);
        t.hold(&sdd1, &md0);
        (t, sda, sdb)
    }

    #[test]
    fn system_disk_is_found_through_lvm_and_boot_partition() {
        let (t, _, _) = laptop();
        let host = t.host(
            &mountinfo(&[
                ("253:0", "/"),
                ("8:1", "/boot"),
                ("8:17", "/run/media/u/STICK"),
            ]),
            SWAPS_HEADER,
        );
        let sys = host.system_disks();
        let sda = DevNum::parse("8:0").unwrap();
        assert!(
            sys.iter().any(|u| u.dev == sda && u.mount_point == "/"),
            "{sys:?}"
        );
        assert!(
            sys.iter().any(|u| u.dev == sda && u.mount_point == "/boot"),
            "{sys:?}"
        );
        assert!(!sys.iter().any(|u| u.dev == DevNum::parse("8:16").unwrap()));
        let busy = host.busy_findings(sda);
        assert!(
            busy.contains(&"/dev/sda1 is mounted on /boot".to_string()),
            "{busy:?}"
        );
        assert!(
            busy.contains(&"/dev/sda2 is held by /dev/dm-0 (LVM volume fedora-root)".to_string()),
            "{busy:?}"
        );
        assert!(
            busy.contains(&"/dev/dm-0 (on /dev/sda2) is mounted on /".to_string()),
            "{busy:?}"
        );
    }

    #[test]
    fn mounted_partition_of_a_stick_is_busy_by_number_not_name() {
        let (t, _, _) = laptop();
        // 8:170 would be "sdk10"-like: a name-prefix match would be fooled, a number match is not.
        let host = t.host(
            &mountinfo(&[("8:17", "/run/media/u/STICK"), ("8:170", "/x")]),
            SWAPS_HEADER,
        );
        let busy = host.busy_findings(DevNum::parse("8:16").unwrap());
        assert_eq!(
            busy,
            vec!["/dev/sdb1 is mounted on /run/media/u/STICK".to_string()]
        );
        assert!(
            host.busy_findings(DevNum::parse("8:0").unwrap())
                .iter()
                .all(|f| !f.contains("/x"))
        );
    }

    #[test]
    fn md_members_and_swap_are_busy() {
        let (t, _, _) = laptop();
        let swaps = format!("{SWAPS_HEADER}/dev/sdd1  partition\t1048572\t0\t-2\n");
        let host = t.host(&mountinfo(&[("9:0", "/srv")]), &swaps);
        let sdc = host.busy_findings(DevNum::parse("8:32").unwrap());
        assert_eq!(
            sdc,
            vec![
                "/dev/sdc1 is held by /dev/md0 (software RAID raid1)".to_string(),
                "/dev/md0 (on /dev/sdc1) is mounted on /srv".to_string(),
            ]
        );
        let sdd = host.busy_findings(DevNum::parse("8:48").unwrap());
        assert!(
            sdd.contains(&"/dev/sdd1 is used as swap".to_string()),
            "{sdd:?}"
        );
        assert!(
            sdd.iter().any(|f| f.contains("held by /dev/md0")),
            "{sdd:?}"
        );
    }

    #[test]
    fn usb_stick_facts_come_from_sysfs_without_udev() {
        let (t, _, _) = laptop();
        let host = t.host("", SWAPS_HEADER);
        assert!(!host.has_udev_db());
        let f = host.facts(DevNum::parse("8:16").unwrap()).unwrap();
        assert_eq!(f.transport, Transport::Usb);
        assert!(!f.removable, "the flag as the kernel reports it");
        assert!(f.hotplug && f.removable_class());
        assert_eq!(f.serial.as_deref(), Some("4C530001170822117474"));
        assert_eq!(f.model.as_deref(), Some("Cruzer Blade"));
        assert_eq!(f.vendor.as_deref(), Some("SanDisk"));
        assert_eq!(f.path, PathBuf::from("/dev/sdb"));
        assert_eq!(f.size, (1u64 << 24) * 512);
        let sda = host.facts(DevNum::parse("8:0").unwrap()).unwrap();
        assert_eq!(sda.transport, Transport::Sata);
        assert!(!sda.removable_class());
        let part = host.facts(DevNum::parse("8:17").unwrap()).unwrap();
        assert_eq!(part.partition_of, Some(PathBuf::from("/dev/sdb")));
        let listing = list(&host, false).unwrap();
        assert_eq!(listing.notes, vec![NO_UDEV_NOTE.to_string()]);
        let names: Vec<&str> = listing
            .devices
            .iter()
            .map(|d| d.facts.name.as_str())
            .collect();
        assert_eq!(names, vec!["sdb"]);
        let all = list(&host, true).unwrap();
        let sda = all.devices.iter().find(|d| d.facts.name == "sda").unwrap();
        assert!(sda.fixed);
    }

    #[test]
    fn udev_database_fills_gaps() {
        let (t, _, _) = laptop();
        let udev = t.root.path().join("udev-data");
        fs::create_dir_all(&udev).unwrap();
        fs::write(
            udev.join("b8:0"),
            "S:disk/by-id/ata-x\nE:ID_BUS=ata\nE:ID_SERIAL_SHORT=S5Y1NX0R\nE:ID_VENDOR=ATA\n",
        )
        .unwrap();
        let host = t.host("", SWAPS_HEADER);
        assert!(host.has_udev_db());
        let f = host.facts(DevNum::parse("8:0").unwrap()).unwrap();
        assert_eq!(f.serial.as_deref(), Some("S5Y1NX0R"));
        assert_eq!(f.vendor.as_deref(), Some("ATA"));
        assert!(list(&host, false).unwrap().notes.is_empty());
    }

    #[test]
    fn mountinfo_escapes_and_btrfs_style_sources() {
        let m = parse_mountinfo(
            "36 35 0:40 / /run/media/u/MY\\040STICK rw - vfat /dev/sdb1 rw\nbad line\n",
        );
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].mount_point, "/run/media/u/MY STICK");
        assert_eq!(
            m[0].dev,
            DevNum {
                major: 0,
                minor: 40
            }
        );
        let (t, _, _) = laptop();
        // An anonymous 0:N device is resolved through its source.
        let host = t.host(
            "36 35 0:40 / /run/media/u/S rw - btrfs /dev/sdb1 rw\n",
            SWAPS_HEADER,
        );
        assert_eq!(
            host.busy_findings(DevNum::parse("8:16").unwrap()),
            vec!["/dev/sdb1 is mounted on /run/media/u/S".to_string()]
        );
    }

    #[test]
    fn tables_and_filesystems_are_read_from_a_plain_file() {
        use crate::disk::partition::layout_single;
        let size = 80u64 << 20;
        for kind in [TableKind::Mbr, TableKind::Gpt] {
            let mut disk = tempfile::tempfile().unwrap();
            disk.set_len(size).unwrap();
            let layout = layout_single(size, kind).unwrap();
            partition::write_table(&mut disk, &layout, None, 0x1234_5678).unwrap();
            let (found, entries) = partition::read_table(&mut disk, size, 512)
                .unwrap()
                .unwrap();
            assert_eq!(found, kind);
            assert_eq!(entries.len(), 1);
            assert_eq!(
                (entries[0].start, entries[0].len),
                (layout.start, layout.len)
            );
            {
                let mut w = PartitionWindow::new(&mut disk, layout.start, layout.len);
                fat::format(&mut w, "LIVESTICK", 0x1234_abcd, 2048).unwrap();
                w.flush().unwrap();
            }
            let fsinfo = peek_filesystem(&mut disk, layout.start, layout.len).unwrap();
            assert_eq!(fsinfo.fs_type, "vfat");
            assert_eq!(fsinfo.uuid.as_deref(), Some("1234-ABCD"));
            // FAT without a LiveOS directory.
            assert!(
                live_info(&disk, 1, layout.start, layout.len, &NoOverlayProbe)
                    .unwrap()
                    .is_none()
            );
        }
        let mut blank = tempfile::tempfile().unwrap();
        blank.set_len(size).unwrap();
        assert!(
            partition::read_table(&mut blank, size, 512)
                .unwrap()
                .is_none()
        );
        assert!(peek_filesystem(&mut blank, 0, size).is_none());
    }

    #[test]
    fn watcher_times_out_naming_what_it_saw() {
        let (t, _, _) = laptop();
        let host = t.host("", SWAPS_HEADER);
        let err = wait_in(&host, 1, Some(Duration::from_millis(50)), true, |_| {}).unwrap_err();
        assert!(
            matches!(err, DeviceError::WaitTimedOut { wanted: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("none"), "{err}");
    }
}
