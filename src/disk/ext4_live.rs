//! The ext4 live partition: the layout livecd-iso-to-disk used for persistence
//! larger than FAT32's 4 GiB file limit. Partition 1 stays a small FAT for the
//! boot loaders, kernels and menus; partition 2 is ext4, the live device dracut
//! mounts (`root=live:UUID=<ext4 uuid>`), holding `LiveOS/` with the root image,
//! the overlay, home.img and swap.img.
//!
//! The file system is built in a sparse file on the host with mke2fs (lazy inode
//! tables, a checksummed journal: see `disk::ext4::make_ext4_image`), its files
//! are given their blocks with debugfs `fallocate` (no data written), and their
//! block maps are read back with `disk::ext4_fs`. The caller then copies only the
//! image's metadata (its data regions) to the stick and streams each file's
//! content straight into that file's blocks there: the target is opened once, and
//! a 6 GiB overlay costs its extent tree, not 6 GiB of writes. A file left
//! *unwritten* (the dm-snapshot overlay) keeps debugfs's unwritten extents, which
//! the kernel reads as zeros whatever the stick held: a new, empty store.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use thiserror::Error;

use crate::disk::ext4::{self, Ext4Error, Ext4Options};
use crate::disk::ext4_fs::{self, Ext4Fs, Ext4FsError};
use crate::disk::partition::TableKind;
use crate::io::RangeSet;
use crate::size::MIB;
use crate::tools::{DEBUGFS, find_program};

#[derive(Debug, Error)]
pub enum Ext4LiveError {
    #[error("making the ext4 live partition: {0}")]
    Make(#[from] Ext4Error),
    #[error("mapping the ext4 live partition: {0}")]
    Map(#[from] Ext4FsError),
    #[error(
        "debugfs could not allocate {path} ({detail}); the ext4 partition has too little room: use a larger stick or smaller --overlay-size-mb/--home-size-mb"
    )]
    Allocate { path: String, detail: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("writing the partition table entry of the ext4 partition: {0}")]
    Table(String),
    #[error(
        "changing the ext4 live partition in place with debugfs: {detail}; the stick holds the old root image (or the new one) and its overlay: run the same command again"
    )]
    InPlace { detail: String },
}

impl crate::error::Classify for Ext4LiveError {
    fn kind(&self) -> crate::error::ErrorKind {
        match self {
            Ext4LiveError::Make(e) => e.kind(),
            Ext4LiveError::Map(e) => e.kind(),
            _ => crate::error::ErrorKind::Io,
        }
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Ext4LiveError {
    let what = what.into();
    move |source| Ext4LiveError::Io { what, source }
}

/// ext4 block size of the live partition: the kernel's page, and what every
/// offset here is computed in.
pub const BLOCK: u64 = 4096;

/// A file of the live partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveFile {
    /// Absolute path inside the partition, "/LiveOS/squashfs.img".
    pub path: String,
    pub size: u64,
    /// livestick writes bytes into it (its extents are marked written). `false`
    /// leaves it unwritten: it reads as zeros (a fresh dm-snapshot store).
    pub written: bool,
    /// A sparse host file holding the file's content where it has any (a copied
    /// overlay's used parts, a copied home's blocks in use): debugfs writes its
    /// data and leaves its holes as holes, which are then allocated unwritten
    /// (reading as zeros). Nothing is written where the source had nothing.
    pub from_host: Option<PathBuf>,
}

/// `f` as debugfs made it (its `log` says why when it did not): its block map and
/// byte runs, its extents marked written when livestick writes its bytes.
fn map_created<F: Read + Write + Seek>(
    fs: &Ext4Fs,
    io: &mut F,
    f: &LiveFile,
    log: &str,
) -> Result<(ext4_fs::FileMap, Vec<(u64, u64)>), Ext4LiveError> {
    let Some(map) = fs.file(io, &f.path)? else {
        return Err(Ext4LiveError::Allocate {
            path: f.path.clone(),
            detail: format!("debugfs did not create it: {}", last_lines(log)),
        });
    };
    let runs = map
        .byte_runs(BLOCK, &f.path)
        .map_err(|e| Ext4LiveError::Allocate {
            path: f.path.clone(),
            detail: format!("{e}: {}", last_lines(log)),
        })?;
    if f.written {
        ext4_fs::mark_initialised(fs, io, map.inode)?;
    }
    Ok((map, runs))
}

/// The debugfs lines that make `f`: empty or from its host file, given all its
/// blocks (unwritten where it has no data yet), and sized.
fn make_script(f: &LiveFile) -> String {
    let rel = f.path.trim_start_matches('/');
    let mut script = match &f.from_host {
        Some(host) => format!("write {} {rel}\n", host.display()),
        None => format!("write /dev/null {rel}\n"),
    };
    let blocks = f.size.div_ceil(BLOCK);
    if blocks > 0 {
        script.push_str(&format!("fallocate {rel} 0 {}\n", blocks - 1));
    }
    script.push_str(&format!("sif {rel} size {}\n", f.size));
    script.push_str(&mode_line(rel));
    script
}

/// The debugfs line that gives a file of the ext4 live partition its permissions:
/// debugfs `write` copies its source's (`/dev/null`'s 0666), and dracut mounts this
/// partition read-write on the live system. Persistence (overlay, home, swap) is
/// the owner's alone, 0600; everything else reads for all and writes for root,
/// 0644.
pub fn mode_line(rel: &str) -> String {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    let private = crate::layout::is_overlay_name(name)
        || name.eq_ignore_ascii_case(crate::layout::HOME)
        || name.eq_ignore_ascii_case(crate::layout::SWAP);
    let mode = if private { 0o100600 } else { 0o100644 };
    format!("sif {rel} mode 0{mode:o}\n")
}

/// Whether `map` (the file at `path` on the partition `fs_io`) reads as its host
/// file `host` does: debugfs wrote it, so it is checked before it is trusted.
fn same_as_host<F: Read + Seek + ?Sized>(
    fs: &Ext4Fs,
    fs_io: &mut F,
    map: &ext4_fs::FileMap,
    host: &Path,
) -> Result<bool, Ext4LiveError> {
    let mut theirs = File::open(host).map_err(io_err(format!("reading {}", host.display())))?;
    let mut ours = ext4_fs::Ext4File::new(fs_io, 0, fs.block_size, map);
    let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut left = map.size;
    while left > 0 {
        let n = left.min(a.len() as u64) as usize;
        ours.read_exact(&mut a[..n])
            .map_err(io_err("reading a copied file back"))?;
        theirs
            .read_exact(&mut b[..n])
            .map_err(io_err(format!("reading {}", host.display())))?;
        if a[..n] != b[..n] {
            return Ok(false);
        }
        left -= n as u64;
    }
    Ok(true)
}

/// A file of the live partition with its byte runs in the partition.
pub type MappedFile = (LiveFile, Vec<(u64, u64)>);

/// The partition as built on the host, ready to be copied onto the stick.
pub struct BuiltLive {
    _dir: tempfile::TempDir,
    image: File,
    /// Byte ranges of the partition that carry metadata (superblocks, descriptors,
    /// bitmaps, inode table heads, directories, extent blocks, the journal
    /// superblock): everything to copy except file contents.
    pub metadata: RangeSet,
    /// Each file of the request, in order: its byte runs in the partition.
    pub files: Vec<MappedFile>,
    pub uuid: String,
    pub label: String,
}

impl BuiltLive {
    /// Copies the metadata into `partition` (a window on the ext4 partition);
    /// returns the bytes written.
    pub fn copy_metadata<W: Write + Seek + ?Sized>(
        &mut self,
        partition: &mut W,
    ) -> Result<u64, Ext4LiveError> {
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0;
        for r in self.metadata.iter() {
            let mut at = r.start;
            while at < r.end {
                let n = (r.end - at).min(buf.len() as u64) as usize;
                self.image
                    .seek(SeekFrom::Start(at))
                    .map_err(io_err("reading the built ext4 image"))?;
                self.image
                    .read_exact(&mut buf[..n])
                    .map_err(io_err("reading the built ext4 image"))?;
                partition
                    .seek(SeekFrom::Start(at))
                    .map_err(io_err("writing the ext4 metadata"))?;
                partition
                    .write_all(&buf[..n])
                    .map_err(io_err("writing the ext4 metadata"))?;
                at += n as u64;
                total += n as u64;
            }
        }
        partition
            .flush()
            .map_err(io_err("writing the ext4 metadata"))?;
        Ok(total)
    }
}

/// The ext4 UUID of a live partition, derived from the FAT volume ID the plan
/// already drew at random, so that planning stays a pure function and the two
/// partitions of one stick are recognisably a pair.
pub fn uuid_for(volume_id: u32) -> uuid::Uuid {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("livestick ext4 live partition {volume_id:08x}"));
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

/// The journal mke2fs gives a file system of `blocks` 4 KiB blocks
/// (`ext2fs_default_journal_size`), in bytes.
fn journal_bytes(blocks: u64) -> u64 {
    let journal_blocks = match blocks {
        b if b < 32_768 => 1024,
        b if b < 256 * 1024 => 4096,
        b if b < 512 * 1024 => 8192,
        b if b < 4096 * 1024 => 16_384,
        b if b < 8192 * 1024 => 32_768,
        b if b < 16_384 * 1024 => 65_536,
        b if b < 32_768 * 1024 => 131_072,
        _ => 262_144,
    };
    journal_blocks * BLOCK
}

/// Bytes of a `len`-byte ext4 partition its own metadata takes: inode tables
/// (256 bytes per 16 KiB, mke2fs's ratio), bitmaps and descriptors, the journal,
/// and a margin for extent blocks and directories. An estimate on the safe side:
/// debugfs has the last word when it allocates.
pub fn overhead(len: u64) -> u64 {
    let blocks = len / BLOCK;
    len / 64 + blocks / (8 * BLOCK) * 2 * BLOCK + journal_bytes(blocks) + 8 * MIB
}

/// Bytes a file of `size` takes in the partition (whole blocks).
pub fn on_disk(size: u64) -> u64 {
    size.div_ceil(BLOCK) * BLOCK
}

fn debugfs(image: &Path, script: &str) -> Result<String, Ext4LiveError> {
    debugfs_recording(image, script, None)
}

/// [`debugfs`], keeping an undo record at `undo` (a path that must not exist yet)
/// when one is given.
fn debugfs_recording(
    image: &Path,
    script: &str,
    undo: Option<&Path>,
) -> Result<String, Ext4LiveError> {
    let exe = find_program(&DEBUGFS).map_err(Ext4Error::from)?;
    let mut command = Command::new(&exe);
    command.arg("-w");
    if let Some(undo) = undo {
        command.arg("-z").arg(undo);
    }
    let mut child = command
        .args(["-f".as_ref(), "-".as_ref(), image.as_os_str()])
        .env("LC_ALL", "C")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err(format!("running {}", exe.display())))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(io_err("feeding debugfs"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(io_err("waiting for debugfs"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(Ext4LiveError::Allocate {
            path: image.display().to_string(),
            detail: text.trim().to_string(),
        });
    }
    Ok(text)
}

/// debugfs on the live partition of `dev` in place (reached through `by_fd`),
/// with the byte ranges of `dev` it wrote, read from its undo record: a write
/// reads them back as it reads back its own.
fn debugfs_in_place(
    by_fd: &Path,
    dev: &mut File,
    partition: (u64, u64),
    script: &str,
) -> Result<(String, RangeSet), Ext4LiveError> {
    let (start, len) = partition;
    let dir = tempfile::tempdir().map_err(io_err("making room for debugfs's undo record"))?;
    let undo = dir.path().join("undo");
    let log = debugfs_recording(&in_place_spec(by_fd, start), script, Some(&undo))?;
    // The undo record's notice says how to take the change back; nobody should.
    let log: String = log
        .lines()
        .filter(|l| {
            !l.starts_with("Overwriting existing filesystem")
                && !l.trim_start().starts_with("e2undo ")
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let mut written = RangeSet::new();
    let mut record = File::open(&undo).map_err(io_err("reading debugfs's undo record"))?;
    let recorded = record
        .metadata()
        .map_err(io_err("reading debugfs's undo record"))?
        .len();
    if recorded > 0 {
        let mut window = crate::io::PartitionWindow::new(&mut *dev, start, len);
        let ranges =
            crate::disk::e2undo::written_ranges(&mut record, &mut window).map_err(|e| {
                Ext4LiveError::InPlace {
                    detail: format!("debugfs's record of what it wrote: {e}"),
                }
            })?;
        for r in ranges {
            written.insert(start + r.start.min(len)..start + r.end.min(len));
        }
    }
    Ok((log, written))
}

/// Builds the live partition's file system (`len` bytes, `label`, `uuid`) in a
/// sparse file under `work` (the system's temporary directory when `None`), with
/// `files` allocated in it, and maps them.
pub fn build(
    len: u64,
    label: &str,
    uuid: uuid::Uuid,
    files: &[LiveFile],
    work: Option<&Path>,
) -> Result<BuiltLive, Ext4LiveError> {
    let dir = match work {
        Some(w) => tempfile::tempdir_in(w),
        None => tempfile::tempdir(),
    }
    .map_err(io_err("making a work directory for the ext4 image"))?;
    let path: PathBuf = dir.path().join("live.ext4");
    ext4::make_ext4_image(
        &path,
        len / BLOCK * BLOCK,
        label,
        &Ext4Options {
            uuid: Some(uuid),
            block_size: Some(BLOCK as u32),
            // The live partition is livestick's and the live system's alone: no
            // blocks kept back for root.
            reserved_percent: Some(0),
            ..Default::default()
        },
    )?;
    // One debugfs run: directories, then each file empty, given its blocks, and
    // sized. debugfs reports a failed command only as text, so each file is
    // checked below by mapping it.
    let mut script = String::new();
    let mut dirs: Vec<String> = Vec::new();
    for f in files {
        let parts: Vec<&str> = f.path.trim_start_matches('/').split('/').collect();
        for i in 1..parts.len() {
            let d = parts[..i].join("/");
            if !dirs.contains(&d) {
                script.push_str(&format!("mkdir {d}\n"));
                dirs.push(d);
            }
        }
        script.push_str(&make_script(f));
    }
    let log = debugfs(&path, &script)?;
    let mut image = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_err(format!("opening {}", path.display())))?;
    let fs = Ext4Fs::open(&mut image)?;
    let mut mapped = Vec::new();
    let mut contents = RangeSet::new();
    for f in files {
        let (_, runs) = map_created(&fs, &mut image, f, &log)?;
        // A file debugfs wrote from the host is metadata here: its data blocks are
        // the image's data, copied with the rest; its unwritten blocks are holes.
        if f.from_host.is_none() {
            for &(at, n) in &runs {
                contents.insert(at..at + on_disk(n));
            }
        }
        mapped.push((f.clone(), runs));
    }
    image
        .sync_all()
        .map_err(io_err("syncing the built ext4 image"))?;
    let regions: RangeSet = crate::disk::sparse::data_regions(&image)
        .map_err(io_err("finding the ext4 image's data"))?
        .into_iter()
        .collect();
    Ok(BuiltLive {
        _dir: dir,
        image,
        metadata: regions.difference(&contents),
        files: mapped,
        uuid: fs.uuid.clone(),
        label: fs.label.clone(),
    })
}

fn last_lines(log: &str) -> String {
    let lines: Vec<&str> = log.lines().rev().take(4).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" / ")
}

/// Gives `path` (inside the ext4 live `partition` of `device`) blocks up to `new_size` bytes and that size. debugfs works on the
/// partition in place (`device?offset=N`) and allocates as debugfs `fallocate`
/// does: unwritten extents, no bytes written, reading as zeros. The blocks are
/// allocated and checked before the size is set, so a partition that runs out of
/// room leaves the file as it was (with some blocks past its end that e2fsck
/// accepts).
pub fn grow_file(
    device: &Path,
    partition: &ext4_fs::LivePartition,
    path: &str,
    old_size: u64,
    new_size: u64,
) -> Result<(), Ext4LiveError> {
    let shown = device.display().to_string();
    if shown.contains('?') {
        return Err(Ext4LiveError::Allocate {
            path: path.to_string(),
            detail: format!("debugfs cannot name a device whose path has a '?': {shown}"),
        });
    }
    // debugfs reaches the command's opened target as `/proc/self/fd/N`.
    let tool_path = crate::disk::opened::tool_path(device);
    let spec = PathBuf::from(format!(
        "{}?offset={}",
        tool_path.display(),
        partition.start
    ));
    let rel = path.trim_start_matches('/');
    if new_size > old_size {
        let last = new_size.div_ceil(BLOCK);
        // From block 0: a hole anywhere (a file written sparse by another tool)
        // becomes an unwritten extent too, so that livestick can write into it.
        let log = debugfs(&spec, &format!("fallocate {rel} 0 {}\n", last - 1))?;
        let mut f = crate::disk::opened::open_path(device, false)
            .map_err(io_err(format!("opening {shown}")))?;
        let mut window = crate::io::PartitionWindow::new(&mut f, partition.start, partition.len);
        let fs = Ext4Fs::open(&mut window)?;
        let mut map = fs
            .file(&mut window, path)?
            .ok_or_else(|| Ext4LiveError::Allocate {
                path: path.to_string(),
                detail: "it is gone".into(),
            })?;
        map.size = new_size;
        map.byte_runs(BLOCK, path)
            .map_err(|e| Ext4LiveError::Allocate {
                path: path.to_string(),
                detail: format!("{e}: {}", last_lines(&log)),
            })?;
    }
    debugfs(&spec, &format!("sif {rel} size {new_size}\n"))?;
    Ok(())
}

/// Where things are on a stick of the ext4 live layout, as `inspect STICK` shows it:
/// the FAT boot partition holds the boot loaders, kernels and menus; the ext4 one
/// the live directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Ext4LiveLayout {
    /// The FAT partition with the boot files.
    pub boot_partition: u32,
    /// The ext4 partition that is the live device (`root=live:UUID=<uuid>`).
    pub partition: u32,
    pub start_bytes: u64,
    pub size_bytes: u64,
    pub uuid: String,
    pub label: String,
    /// Free space of the ext4 file system (what `overlay grow`/`home resize` may take).
    pub free_bytes: u64,
    /// The live directory's files on it, squashfs.img, the overlay, home.img….
    pub files: Vec<Ext4LiveEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Ext4LiveEntry {
    /// Absolute path inside the ext4 file system.
    pub path: String,
    pub size_bytes: u64,
}

/// A stick's ext4 live layout, with the byte runs of its squashfs.img on the device.
pub type LayoutAndRoot = (Ext4LiveLayout, Vec<(u64, u64)>);

/// The ext4 live layout of `dev` (boot partition `boot_partition`), with the byte
/// runs of `/<live_dir>/squashfs.img` on the whole device; `None` for a stick
/// without an ext4 partition holding the live directory.
pub fn layout_of<R: Read + Write + Seek>(
    dev: &mut R,
    live_dir: &str,
    boot_partition: u32,
) -> Result<Option<LayoutAndRoot>, Ext4FsError> {
    let Some(p) = ext4_fs::find_live_partition(dev, live_dir)? else {
        return Ok(None);
    };
    let mut window = crate::io::PartitionWindow::new(dev, p.start, p.len);
    let dir = p.fs.lookup(&mut window, &format!("/{live_dir}"))?;
    let mut files = Vec::new();
    if let Some(dir) = dir {
        let mut names = p.fs.read_dir(&mut window, &dir)?;
        names.sort();
        for (name, number) in names {
            let inode = p.fs.inode(&mut window, number)?;
            if !inode.is_dir() {
                files.push(Ext4LiveEntry {
                    path: format!("/{live_dir}/{name}"),
                    size_bytes: inode.size,
                });
            }
        }
    }
    let squashfs = format!("/{live_dir}/squashfs.img");
    let runs = match p.fs.file(&mut window, &squashfs)? {
        Some(map) => map
            .byte_runs(p.fs.block_size, &squashfs)?
            .into_iter()
            .map(|(at, n)| (p.start + at, n))
            .collect(),
        None => Vec::new(),
    };
    Ok(Some((
        Ext4LiveLayout {
            boot_partition,
            partition: p.number,
            start_bytes: p.start,
            size_bytes: p.len,
            uuid: p.fs.uuid.clone(),
            label: p.fs.label.clone(),
            free_bytes: p.fs.free_blocks * p.fs.block_size,
            files,
        },
        runs,
    )))
}

/// How the user replays the journal of a live partition that was not cleanly
/// unmounted. e2fsck replays it on the partition's own device node; e2fsprogs 1.47
/// cannot on a partition inside an image file (`file?offset=N`: the replay reopens
/// the file without the offset), so an image is attached with its partitions first.
pub fn replay_hint(device: &Path, partition: u32) -> String {
    use std::os::unix::fs::FileTypeExt;
    let is_block = std::fs::metadata(device).is_ok_and(|m| m.file_type().is_block_device());
    let shown = device.display().to_string();
    if is_block {
        // The kernel's names: sdb2, but nvme0n1p2, mmcblk0p2, loop0p2.
        let sep = if shown.ends_with(|c: char| c.is_ascii_digit()) {
            "p"
        } else {
            ""
        };
        format!("run `e2fsck -p {shown}{sep}{partition}`")
    } else {
        format!(
            "attach the image with `losetup -P --show {shown}` and run `e2fsck -p` on partition {partition} of the loop device it prints (e2fsck cannot replay a journal at an offset of a file)"
        )
    }
}

/// MBR type of a Linux file system.
const MBR_LINUX: u8 = 0x83;

/// Adds partition 2 (`start`, `len` bytes) for the ext4 live partition to the
/// table `partition::write_table` just wrote with partition 1.
pub fn add_partition<D: Read + Write + Seek + std::fmt::Debug>(
    disk: &mut D,
    table: TableKind,
    start: u64,
    len: u64,
) -> Result<(), Ext4LiveError> {
    let sector = crate::disk::partition::SECTOR;
    let (first, sectors) = (start / sector, len / sector);
    match table {
        TableKind::Mbr => {
            let mut mbr = mbrman::MBR::read_from(disk, sector as u32)
                .map_err(|e| Ext4LiveError::Table(e.to_string()))?;
            mbr[2] = mbrman::MBRPartitionEntry {
                boot: mbrman::BOOT_INACTIVE,
                first_chs: mbrman::CHS::empty(),
                sys: MBR_LINUX,
                last_chs: mbrman::CHS::empty(),
                starting_lba: u32::try_from(first)
                    .map_err(|_| Ext4LiveError::Table("start beyond 2 TiB on MBR".into()))?,
                sectors: u32::try_from(sectors)
                    .map_err(|_| Ext4LiveError::Table("length beyond 2 TiB on MBR".into()))?,
            };
            mbr.write_into(disk)
                .map_err(|e| Ext4LiveError::Table(e.to_string()))?;
        }
        TableKind::Gpt => {
            let mut gpt = gpt::GptConfig::new()
                .writable(true)
                .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
                .open_from_device(&mut *disk)
                .map_err(|e| Ext4LiveError::Table(e.to_string()))?;
            gpt.add_partition_at(
                "LIVE-EXT4",
                2,
                first,
                sectors,
                gpt::partition_types::LINUX_FS,
                0,
            )
            .map_err(|e| Ext4LiveError::Table(e.to_string()))?;
            gpt.write()
                .map_err(|e| Ext4LiveError::Table(e.to_string()))?;
        }
    }
    disk.flush()
        .map_err(io_err("writing the partition table"))?;
    Ok(())
}

/// What an existing stick's ext4 live partition holds, read before planning a
/// rewrite in place (`write ISO STICK` without `--format`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ExistingLive {
    /// 1-based partition number.
    pub number: u32,
    pub start: u64,
    pub len: u64,
    pub uuid: String,
    pub label: String,
    pub free_bytes: u64,
    /// The journal holds changes not yet written home: changing the file system
    /// beside them could be undone by their replay.
    pub needs_recovery: bool,
    /// How the user replays that journal ([`replay_hint`]), set by the caller that
    /// knows the device's path.
    pub replay_hint: Option<String>,
    /// Every file of the live directory (absolute path inside the partition, size).
    pub files: Vec<(String, u64)>,
}

/// The ext4 live partition of `dev` holding `/<live_dir>/squashfs.img`, `None` when
/// the stick has none.
pub fn existing_live<R: Read + Write + Seek>(
    dev: &mut R,
    live_dir: &str,
) -> Result<Option<ExistingLive>, Ext4FsError> {
    let Some(p) = ext4_fs::find_live_partition(dev, live_dir)? else {
        return Ok(None);
    };
    let Some((layout, _)) = layout_of(dev, live_dir, 0)? else {
        return Ok(None);
    };
    Ok(Some(ExistingLive {
        number: p.number,
        start: p.start,
        len: p.len,
        uuid: layout.uuid,
        label: layout.label,
        free_bytes: layout.free_bytes,
        needs_recovery: p.fs.needs_recovery,
        replay_hint: None,
        files: layout
            .files
            .into_iter()
            .map(|f| (f.path, f.size_bytes))
            .collect(),
    }))
}

/// The name a copied file is written under beside the one it replaces, until
/// [`finish_in_place`] swaps the two: a stop before the swap leaves the old file
/// in place, and the next write removes the leftover.
pub fn staged_path(path: &str) -> String {
    format!("{path}.new")
}

/// debugfs's name for the partition at `start` of the target, through the handle
/// the write already holds (`target::inheritable_path`): never the path again.
fn in_place_spec(by_fd: &Path, start: u64) -> PathBuf {
    PathBuf::from(format!("{}?offset={start}", by_fd.display()))
}

/// The first step of a rewrite in place: removes what the write replaces
/// (`removes`: the root record first, leftovers of a stopped rewrite, files the
/// plan deletes or makes anew), renames a kept overlay (`renames`), and allocates
/// `files` (a copied file under its [`staged_path`]) as [`build`] does, unwritten;
/// then maps them on `dev` and marks the extents of each file to be written
/// written. debugfs works on the partition through `by_fd`; nothing of the old
/// root image is touched. Returns each file with its byte runs in the partition.
pub fn allocate_in_place(
    by_fd: &Path,
    dev: &mut File,
    partition: (u64, u64),
    removes: &[String],
    renames: &[(String, String)],
    files: &[LiveFile],
) -> Result<(Vec<MappedFile>, RangeSet), Ext4LiveError> {
    let (start, len) = partition;
    let mut script = String::new();
    {
        let mut window = crate::io::PartitionWindow::new(&mut *dev, start, len);
        let fs = Ext4Fs::open(&mut window)?;
        for path in removes {
            if fs.lookup(&mut window, path)?.is_some() {
                script.push_str(&format!("rm {}\n", path.trim_start_matches('/')));
            }
        }
        for (from, to) in renames {
            if fs.lookup(&mut window, from)?.is_some() && fs.lookup(&mut window, to)?.is_none() {
                script.push_str(&format!(
                    "ln {} {}\nunlink {}\n",
                    from.trim_start_matches('/'),
                    to.trim_start_matches('/'),
                    from.trim_start_matches('/')
                ));
            }
        }
    }
    for f in files {
        script.push_str(&make_script(f));
    }
    let (log, mut written) = if script.is_empty() {
        (String::new(), RangeSet::new())
    } else {
        debugfs_in_place(by_fd, dev, partition, &script)?
    };
    let mut recorder = crate::io::WriteRecorder::new(&mut *dev)
        .map_err(io_err("opening the ext4 live partition"))?;
    let mut window = crate::io::PartitionWindow::new(&mut recorder, start, len);
    let fs = Ext4Fs::open(&mut window)?;
    for path in removes
        .iter()
        .filter(|r| !files.iter().any(|f| f.path.eq_ignore_ascii_case(r)))
    {
        if fs.lookup(&mut window, path)?.is_some() {
            return Err(Ext4LiveError::InPlace {
                detail: format!("{path} could not be removed: {}", last_lines(&log)),
            });
        }
    }
    let mut mapped = Vec::new();
    for f in files {
        let (map, runs) = map_created(&fs, &mut window, f, &log)?;
        if let Some(host) = &f.from_host
            && !same_as_host(&fs, &mut window, &map, host)?
        {
            return Err(Ext4LiveError::InPlace {
                detail: format!("{} does not read back as copied", f.path),
            });
        }
        mapped.push((f.clone(), runs));
    }
    window
        .flush()
        .map_err(io_err("writing the ext4 live partition"))?;
    drop(window);
    written.extend(recorder.written());
    dev.sync_all()
        .map_err(io_err("syncing the ext4 live partition"))?;
    Ok((mapped, written))
}

/// The last step of a rewrite in place, once the staged files are written and read
/// back: each staged copy takes its place (the two directory entries swapped, the
/// old file then removed; a file new to the stick is renamed), and `record` (path,
/// text), the root record, is written last, since it vouches for the root image.
/// Returns the byte ranges of `dev` written (debugfs's included).
pub fn finish_in_place(
    by_fd: &Path,
    dev: &mut File,
    partition: (u64, u64),
    placed: &[String],
    record: Option<(&str, &str)>,
) -> Result<RangeSet, Ext4LiveError> {
    let (start, len) = partition;
    let mut script = String::new();
    let mut written = RangeSet::new();
    {
        let mut recorder = crate::io::WriteRecorder::new(&mut *dev)
            .map_err(io_err("opening the ext4 live partition"))?;
        let mut window = crate::io::PartitionWindow::new(&mut recorder, start, len);
        let fs = Ext4Fs::open(&mut window)?;
        for path in placed {
            let staged = staged_path(path);
            let rel = path.trim_start_matches('/');
            let staged_rel = staged.trim_start_matches('/');
            if fs.lookup(&mut window, path)?.is_some() {
                let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
                let staged_name = staged.rsplit_once('/').map_or(staged.as_str(), |(_, n)| n);
                ext4_fs::exchange_entries(&fs, &mut window, dir, name, staged_name)?;
                window
                    .flush()
                    .map_err(io_err(format!("putting {path} in place")))?;
                // The swap is on the stick before the old file is freed.
                window
                    .get_mut()
                    .get_mut()
                    .sync_all()
                    .map_err(io_err(format!("putting {path} in place")))?;
                script.push_str(&format!("rm {staged_rel}\n"));
            } else {
                script.push_str(&format!("ln {staged_rel} {rel}\nunlink {staged_rel}\n"));
            }
        }
        drop(window);
        written.extend(recorder.written());
    }
    let host = tempfile::NamedTempFile::new().map_err(io_err("staging the root record"))?;
    if let Some((path, text)) = record {
        std::fs::write(host.path(), text).map_err(io_err("staging the root record"))?;
        let rel = path.trim_start_matches('/');
        script.push_str(&format!(
            "rm {rel}\nwrite {} {rel}\n",
            host.path().display()
        ));
    }
    let log = if script.is_empty() {
        String::new()
    } else {
        let (log, by_debugfs) = debugfs_in_place(by_fd, dev, partition, &script)?;
        written.extend(&by_debugfs);
        log
    };
    dev.sync_all()
        .map_err(io_err("syncing the ext4 live partition"))?;
    let mut window = crate::io::PartitionWindow::new(&mut *dev, start, len);
    let fs = Ext4Fs::open(&mut window)?;
    for path in placed {
        let staged = staged_path(path);
        if fs.lookup(&mut window, path)?.is_none() || fs.lookup(&mut window, &staged)?.is_some() {
            return Err(Ext4LiveError::InPlace {
                detail: format!("{path} was not put in place: {}", last_lines(&log)),
            });
        }
    }
    if let Some((path, text)) = record {
        // Read back: the record is what a later rewrite trusts instead of hashing.
        let found = fs.read_small(&mut window, path)?;
        if found.as_deref() != Some(text.as_bytes()) {
            return Err(Ext4LiveError::InPlace {
                detail: format!("{path} does not read back as written: {}", last_lines(&log)),
            });
        }
    }
    Ok(written)
}

/// A file of the live partition on `dev`, opened for reading as a mounted ext4
/// would read it (unwritten extents as zeros), with its size; `None` when the stick
/// has no live partition or no such file.
pub fn open_live_file<'a, R: Read + Write + Seek>(
    dev: &'a mut R,
    live_dir: &str,
    path: &str,
) -> Result<Option<ext4_fs::Ext4File<&'a mut R>>, Ext4FsError> {
    let Some(p) = ext4_fs::find_live_partition(&mut *dev, live_dir)? else {
        return Ok(None);
    };
    let map = {
        let mut window = crate::io::PartitionWindow::new(&mut *dev, p.start, p.len);
        p.fs.file(&mut window, path)?
    };
    Ok(map.map(|m| ext4_fs::Ext4File::new(dev, p.start, p.fs.block_size, &m)))
}

/// The content of a small file (the root record) of the live partition on `dev`.
pub fn read_live_small<R: Read + Write + Seek>(
    dev: &mut R,
    live_dir: &str,
    path: &str,
) -> Result<Option<Vec<u8>>, Ext4FsError> {
    let Some(p) = ext4_fs::find_live_partition(&mut *dev, live_dir)? else {
        return Ok(None);
    };
    let mut window = crate::io::PartitionWindow::new(&mut *dev, p.start, p.len);
    p.fs.read_small(&mut window, path)
}

/// The root image of the live partition on `dev` as a rewrite compares it: its
/// byte runs on the whole device (every extent written: livestick marks them so)
/// and the root record beside it, if any. `None` when the stick has no live
/// partition holding `/<live_dir>/squashfs.img`.
pub type RootOnExt4 = (Vec<(u64, u64)>, Option<Vec<u8>>);

pub fn root_on_ext4<R: Read + Write + Seek>(
    dev: &mut R,
    live_dir: &str,
    record: &str,
) -> Result<Option<RootOnExt4>, Ext4FsError> {
    let Some((_, runs)) = layout_of(&mut *dev, live_dir, 0)? else {
        return Ok(None);
    };
    Ok(Some((runs, read_live_small(dev, live_dir, record)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_is_stable_per_volume_id_and_a_v4() {
        let a = uuid_for(0x1234_abcd);
        assert_eq!(a, uuid_for(0x1234_abcd));
        assert_ne!(a, uuid_for(0x1234_abce));
        assert_eq!(a.get_version_num(), 4);
    }

    #[test]
    fn overhead_grows_with_the_partition() {
        assert!(overhead(8 << 30) > overhead(1 << 30));
        // Journal and tables of an 8 GiB partition: well under 5 %.
        assert!(overhead(8 << 30) < (8u64 << 30) / 20);
    }

    /// A file of `size` bytes the build writes (not left unwritten).
    fn file(path: &str, size: u64) -> LiveFile {
        LiveFile {
            path: path.into(),
            size,
            written: true,
            from_host: None,
        }
    }

    #[test]
    fn swapping_two_entries_puts_the_staged_file_in_place_and_e2fsck_agrees() {
        if find_program(&DEBUGFS).is_err() {
            return;
        }
        let mut built = build(
            64 << 20,
            "LIVE",
            uuid_for(9),
            &[
                file("/LiveOS/squashfs.img", 3 << 20),
                file(&staged_path("/LiveOS/squashfs.img"), 5 << 20),
            ],
            None,
        )
        .expect("build");
        let fs = Ext4Fs::open(&mut built.image).expect("open");
        let size_of = |image: &mut File, path: &str| {
            fs.file(image, path)
                .expect("read")
                .map(|m| (m.inode, m.size))
        };
        let old = size_of(&mut built.image, "/LiveOS/squashfs.img").expect("old");
        let new = size_of(&mut built.image, "/LiveOS/squashfs.img.new").expect("new");
        ext4_fs::exchange_entries(
            &fs,
            &mut built.image,
            "/LiveOS",
            "squashfs.img",
            "squashfs.img.new",
        )
        .expect("swap");
        built.image.sync_all().expect("sync");
        assert_eq!(size_of(&mut built.image, "/LiveOS/squashfs.img"), Some(new));
        assert_eq!(
            size_of(&mut built.image, "/LiveOS/squashfs.img.new"),
            Some(old)
        );
        // The directory block's checksum was recomputed: e2fsck finds nothing.
        let out = Command::new("e2fsck")
            .arg("-fn")
            .arg(built._dir.path().join("live.ext4"))
            .output()
            .expect("e2fsck");
        assert!(out.status.success(), "{out:?}");
    }

    #[test]
    fn built_partition_maps_its_files_and_leaves_the_overlay_unwritten() {
        if find_program(&DEBUGFS).is_err() {
            return;
        }
        let files = [
            LiveFile {
                path: "/LiveOS/squashfs.img".into(),
                size: 10_000_000,
                written: true,
                from_host: None,
            },
            LiveFile {
                path: "/LiveOS/overlay-LIVE-x".into(),
                size: 300 << 20,
                written: false,
                from_host: None,
            },
        ];
        let built = build(512 << 20, "LIVE", uuid_for(7), &files, None).expect("build");
        assert_eq!(built.uuid, uuid_for(7).hyphenated().to_string());
        let squash = &built.files[0].1;
        assert_eq!(squash.iter().map(|r| r.1).sum::<u64>(), 10_000_000);
        let overlay = &built.files[1].1;
        assert_eq!(overlay.iter().map(|r| r.1).sum::<u64>(), 300 << 20);
        // Metadata is small and never overlaps a file's blocks.
        assert!(
            built.metadata.total() < 40 << 20,
            "{}",
            built.metadata.total()
        );
        for (_, runs) in &built.files {
            for &(at, n) in runs {
                let set: RangeSet = [at..at + n].into_iter().collect();
                assert!(built.metadata.intersection(&set).is_empty());
            }
        }
    }

    /// Every byte of the disk that differs between `before` and `after` lies in
    /// `ranges`, and `ranges` are few bytes (metadata, not whole files).
    fn assert_changes_recorded(before: &[u8], after: &[u8], ranges: &RangeSet, what: &str) {
        let missed: Vec<usize> = (0..before.len())
            .filter(|&i| before[i] != after[i])
            .filter(|&i| !ranges.iter().any(|r| r.contains(&(i as u64))))
            .take(8)
            .collect();
        assert!(
            missed.is_empty(),
            "{what}: changed but not reported: {missed:?}"
        );
        assert!(
            (0..before.len()).any(|i| before[i] != after[i]),
            "{what} changed nothing"
        );
        assert!(ranges.total() < 1 << 20, "{what}: {} bytes", ranges.total());
    }

    #[test]
    fn the_in_place_steps_report_every_byte_they_and_debugfs_write() {
        let mut built = build(
            64 << 20,
            "LIVE",
            uuid_for(11),
            &[
                file("/LiveOS/squashfs.img", 3 << 20),
                file("/LiveOS/old-record", 100),
            ],
            None,
        )
        .expect("build");
        let mut partition = Vec::new();
        built.image.seek(SeekFrom::Start(0)).expect("seek");
        built
            .image
            .read_to_end(&mut partition)
            .expect("read the partition");
        // The partition at 1 MiB of a disk whose other bytes are stale.
        let start = 1u64 << 20;
        let mut disk: Vec<u8> = (0..start as usize).map(|i| (i * 7 % 251) as u8).collect();
        disk.extend_from_slice(&partition);
        disk.extend((0..start as usize).map(|i| (i * 13 % 251) as u8));
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("disk");
        std::fs::write(&path, &disk).expect("write the disk");
        let mut dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open the disk");
        let part = (start, partition.len() as u64);

        let before = std::fs::read(&path).expect("read");
        let (mapped, allocated) = allocate_in_place(
            &path,
            &mut dev,
            part,
            &["/LiveOS/old-record".to_string()],
            &[],
            &[file(&staged_path("/LiveOS/squashfs.img"), 5 << 20)],
        )
        .expect("allocate in place");
        assert_eq!(mapped.len(), 1);
        let after = std::fs::read(&path).expect("read");
        assert_changes_recorded(&before, &after, &allocated, "allocating in place");

        let before = after;
        let finished = finish_in_place(
            &path,
            &mut dev,
            part,
            &["/LiveOS/squashfs.img".to_string()],
            Some(("/LiveOS/root-record", "size 5242880\n")),
        )
        .expect("finish in place");
        let after = std::fs::read(&path).expect("read");
        assert_changes_recorded(&before, &after, &finished, "finishing in place");
        // Nothing outside the partition.
        for ranges in [&allocated, &finished] {
            assert!(
                ranges
                    .iter()
                    .all(|r| r.start >= start && r.end <= start + part.1)
            );
        }
    }
}
