//! `livestick restore`: a live stick (or any stick) back to plain storage — one
//! partition over the whole stick, FAT32 (or exFAT through `mkfs.exfat`), no boot
//! code, no boot flag, and no old signature left where blkid or udev would find one.
//!
//! Same shape as a write: [`inspect`] reads what the stick holds (all the reading),
//! [`plan`] decides from those facts alone (pure, unit-tested), [`save_home`] copies
//! home.img off first when asked, and [`apply`] writes: tables and signatures wiped
//! first, the new file system, the partition table last, everything read back.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::disk::ext4_fs;
use crate::disk::ext4_live;
use crate::disk::extent_file::ExtentFile;
use crate::disk::fat::{self, FatError};
use crate::disk::identity::{Identity, IdentityError};
use crate::disk::partition::{self, SECTOR, TableKind};
use crate::disk::stick::Stick;
use crate::disk::target::{self, TargetError, TargetKind, TargetProbe};
use crate::disk::wipe;
use crate::io::{PartitionWindow, WriteRecorder, check_ranges, zero_ranges};
use crate::size::human;
use crate::source::checksum::hex;
use crate::tools::Tool;

/// MBR partition type of an exFAT (and NTFS) partition.
const MBR_EXFAT: u8 = 0x07;

/// `mkfs.exfat` of exfatprogs. Kept here until `tools::REGISTRY` lists it (that
/// registry belongs to `doctor`).
pub const MKFS_EXFAT: Tool = Tool {
    name: "mkfs.exfat",
    feature: "restore --fs exfat",
    debian: "exfatprogs",
    fedora: "exfatprogs",
    required: false,
    version_args: &["-V"],
};

/// The file system `restore` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PlainFs {
    Fat32,
    Exfat,
}

impl std::fmt::Display for PlainFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PlainFs::Fat32 => "FAT32",
            PlainFs::Exfat => "exFAT",
        })
    }
}

#[derive(Debug, Error)]
pub enum RestoreError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(
        "invalid label {label:?} for {fs}: use 1 to {max} letters, digits, '-' or '_' (for example --label USB)"
    )]
    Label {
        label: String,
        fs: PlainFs,
        max: usize,
    },
    #[error(
        "{path} is {size} bytes: too small for one {fs} partition after the 1 MiB of alignment"
    )]
    TooSmall {
        path: PathBuf,
        size: u64,
        fs: PlainFs,
    },
    #[error(
        "--fs exfat needs `mkfs.exfat`, which is not installed; install `exfatprogs` (Debian/Ubuntu: apt install exfatprogs; Fedora: dnf install exfatprogs), or use --fs fat32"
    )]
    NoMkfsExfat,
    #[error("--save-home {file}: the file exists; livestick never overwrites it — name a new file")]
    SaveHomeExists { file: PathBuf },
    #[error(
        "--save-home {file} is on the stick being restored ({why}); the copy would be erased with it — name a file on another disk"
    )]
    SaveHomeOnStick { file: PathBuf, why: String },
    #[error(
        "--save-home: {stick} has no home.img (found: {found}); nothing to save — run again without --save-home"
    )]
    NoHome { stick: PathBuf, found: String },
    #[error(
        "--save-home {file}: the stick has {count} homes ({homes}) and {file} is not a directory — give --save-home an existing directory, and each home is saved in it as <live dir>-home.img"
    )]
    SeveralHomes {
        file: PathBuf,
        count: usize,
        homes: String,
    },
    #[error(
        "--save-home {file}: not enough space there ({free} free, home.img is {size}); name a file on a disk with more room"
    )]
    SaveHomeNoRoom {
        file: PathBuf,
        free: String,
        size: String,
    },
    #[error(
        "saving home.img to {file}: the copy reads back with sha256 {actual}, the stick's home.img has {expected}; the stick was not touched — check the disk of {file}"
    )]
    SaveHomeMismatch {
        file: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{step}: {source}")]
    Io {
        step: String,
        #[source]
        source: io::Error,
    },
    #[error("{step}: {source}")]
    Fat {
        step: String,
        #[source]
        source: FatError,
    },
    #[error("{step}: mkfs.exfat failed: {output}")]
    Mkfs { step: String, output: String },
    #[error(
        "restoring {path}: the read-back of what was written differs ({what}); the stick may be failing — try another port or another stick"
    )]
    ReadBack { path: PathBuf, what: String },
}

impl crate::error::Classify for RestoreError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            RestoreError::Target(e) => e.kind(),
            RestoreError::Identity(e) => e.kind(),
            RestoreError::Label { .. }
            | RestoreError::TooSmall { .. }
            | RestoreError::NoMkfsExfat
            | RestoreError::SaveHomeExists { .. }
            | RestoreError::NoHome { .. }
            | RestoreError::SeveralHomes { .. }
            | RestoreError::SaveHomeNoRoom { .. } => ErrorKind::BadInput,
            RestoreError::SaveHomeOnStick { .. } => ErrorKind::Refused,
            RestoreError::Io { source, .. } => crate::error::open_failure_kind(source),
            RestoreError::Fat { .. }
            | RestoreError::Mkfs { .. }
            | RestoreError::SaveHomeMismatch { .. }
            | RestoreError::ReadBack { .. } => ErrorKind::Io,
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            RestoreError::Target(e) => e.hint(),
            RestoreError::Identity(e) => e.hint(),
            RestoreError::Io { source, .. } => crate::error::open_failure_hint(source),
            RestoreError::Fat { .. }
            | RestoreError::Mkfs { .. }
            | RestoreError::ReadBack { .. } => {
                "the stick is left without a partition table (nothing will mount it); run the same command again"
            }
            RestoreError::SaveHomeOnStick { .. } => {
                "nothing was written; give --save-home a path on another disk (ls -l / df FILE shows where it is)"
            }
            RestoreError::SaveHomeMismatch { .. } => {
                "the stick was not touched and the incomplete copy was removed; check the disk the copy went to, then run the same command again"
            }
            _ => "nothing was written; fix the option named above",
        }
    }
}

fn io_err(step: impl Into<String>) -> impl FnOnce(io::Error) -> RestoreError {
    let step = step.into();
    move |source| RestoreError::Io { step, source }
}

/// What the stick holds before the restore.
#[derive(Debug, Clone, Serialize)]
pub struct Found {
    /// For people: "a livestick stick (LIVE, live image in /LiveOS)", "an MBR
    /// table with 2 partitions", "no partition table".
    pub description: String,
    /// A live stick written by livestick or livecd-iso-to-disk.
    pub live: bool,
    /// livestick's manifest is on it.
    pub manifest: bool,
    /// The first of `homes`: `/<dir>/home.img` and its size.
    #[serde(serialize_with = "json::file_or_null")]
    pub home: Option<(String, u64)>,
    /// Every live directory's home.img: a `--multi` stick has one for each, and the
    /// ext4 live layout keeps them in its ext4 partition.
    pub homes: Vec<FoundHome>,
    /// Other persistence files (overlays, swap) with their sizes.
    #[serde(serialize_with = "json::files")]
    pub persistence: Vec<(String, u64)>,
}

/// A home.img on the stick, and the file system it is in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FoundHome {
    pub path: String,
    #[serde(rename = "size_bytes")]
    pub size: u64,
    /// The 1-based partition holding it.
    pub partition: u32,
    /// `vfat`, or `ext4` for the ext4 live layout's partition.
    pub filesystem: HomeFs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HomeFs {
    Vfat,
    Ext4,
}

/// The homes `--save-home` copies off, each with the file it goes to.
#[derive(Debug, Clone, Default)]
pub struct SaveHomes(pub Vec<(FoundHome, PathBuf)>);

/// The copies `--save-home` made.
#[derive(Debug, Clone, Default)]
pub struct SavedHomes(pub Vec<SavedHome>);

/// The JSON words of restore's plan and report (docs/json.md): a file on the stick
/// is `{"path", "size_bytes"}`, not a pair.
mod json {
    use serde::Serialize;
    use serde::ser::Serializer;
    use serde_json::json;

    pub fn file_or_null<S: Serializer>(
        file: &Option<(String, u64)>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        file.as_ref()
            .map(|(path, size)| json!({"path": path, "size_bytes": size}))
            .serialize(s)
    }

    pub fn files<S: Serializer>(files: &[(String, u64)], s: S) -> Result<S::Ok, S::Error> {
        files
            .iter()
            .map(|(path, size)| json!({"path": path, "size_bytes": size}))
            .collect::<Vec<_>>()
            .serialize(s)
    }

    /// `save_home` (the first, or null, as before `--multi` sticks were covered)
    /// and `save_homes` (all).
    impl Serialize for super::SaveHomes {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeMap;
            let each: Vec<_> = self
                .0
                .iter()
                .map(|(home, file)| json!({"path": home.path, "file": file}))
                .collect();
            let mut map = s.serialize_map(Some(2))?;
            map.serialize_entry("save_home", &each.first())?;
            map.serialize_entry("save_homes", &each)?;
            map.end()
        }
    }

    /// `saved_home` (the first, or null) and `saved_homes` (all).
    impl Serialize for super::SavedHomes {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeMap;
            let mut map = s.serialize_map(Some(2))?;
            map.serialize_entry("saved_home", &self.0.first())?;
            map.serialize_entry("saved_homes", &self.0)?;
            map.end()
        }
    }
}

/// Reads what the stick holds: its table, and on a FAT partition the live
/// directories, home.img and the manifest; on the ext4 live layout the live
/// directories of its ext4 partition. Reading only: nothing is refused here.
pub fn inspect(probe: &TargetProbe) -> Result<Found, RestoreError> {
    let path = &probe.path;
    let mut file = target::open_existing(probe, false)?;
    let table = partition::read_table(&mut file, probe.size, SECTOR).map_err(io_err(format!(
        "reading the partition table of {}",
        path.display()
    )))?;
    // A damaged ext4 is not a live partition here: the restore erases it either way.
    let on_ext4 = ext4_fs::find_any_live_partition(&mut file)
        .ok()
        .flatten()
        .and_then(|(p, dirs)| {
            let mut files = Vec::new();
            for dir in &dirs {
                let (layout, _) = ext4_live::layout_of(&mut file, dir, 0).ok()??;
                files.extend(layout.files.into_iter().map(|f| (f.path, f.size_bytes)));
            }
            Some((p.number, p.fs.label.clone(), dirs, files))
        });
    // A file system over the whole disk, or an ISO written to it with dd (whose
    // hybrid MBR is a table too): what the user would otherwise lose unnamed.
    let whole_disk = crate::disk::devices::peek_filesystem(&mut file, 0, probe.size)
        .filter(|fs| table.is_none() || fs.fs_type == "iso9660");
    drop(file);
    let mut table_text = match &table {
        None => "no partition table".to_string(),
        Some((kind, entries)) => format!(
            "{kind} partition table with {} partition{}",
            entries.len(),
            if entries.len() == 1 { "" } else { "s" }
        ),
    };
    if let Some(fs) = whole_disk {
        let what = match fs.fs_type.as_str() {
            "crypto_LUKS" => "a LUKS encrypted volume".to_string(),
            "iso9660" => "an ISO 9660 image written to it whole".to_string(),
            "swap" => "a swap area".to_string(),
            "vfat" => "a FAT file system".to_string(),
            "squashfs" => "a squashfs image".to_string(),
            "ntfs" => "an NTFS file system".to_string(),
            other if other.starts_with("ext") => format!("an {other} file system"),
            other => format!("a {other} file system"),
        };
        let label = fs
            .label
            .map(|l| format!(" labelled {l:?}"))
            .unwrap_or_default();
        table_text = format!("{table_text}; the whole disk holds {what}{label}");
    }
    let mut found = Found {
        description: table_text.clone(),
        live: false,
        manifest: false,
        home: None,
        homes: Vec::new(),
        persistence: Vec::new(),
    };
    let fat = Stick::open(path, false).ok().and_then(|mut stick| {
        let partition = stick.partition.number;
        stick
            .with_fs(|fs| {
                let label = fs.volume_label().trim_end().to_string();
                let files = fat::walk_files(fs, "").unwrap_or_default();
                Ok((label, files, crate::manifest::find(fs).is_some()))
            })
            .ok()
            .map(|(label, files, manifest)| (partition, label, files, manifest))
    });
    let fat_files: Vec<(String, u64)> = fat
        .as_ref()
        .map(|(_, _, files, _)| files.iter().map(|f| (f.path.clone(), f.size)).collect())
        .unwrap_or_default();
    let fat_live_dirs = live_dirs_of(&fat_files);
    if let Some((partition, _, _, _)) = &fat {
        add_live_files(
            &mut found,
            &fat_files,
            &fat_live_dirs,
            *partition,
            HomeFs::Vfat,
        );
    }
    if let Some((partition, _, dirs, files)) = &on_ext4 {
        let dirs: Vec<String> = dirs.iter().map(|d| format!("/{d}")).collect();
        add_live_files(&mut found, files, &dirs, *partition, HomeFs::Ext4);
    }
    found.home = found.homes.first().map(|h| (h.path.clone(), h.size));
    found.manifest = fat.as_ref().is_some_and(|(_, _, _, manifest)| *manifest);
    found.live = !fat_live_dirs.is_empty() || on_ext4.is_some();
    let by = if found.manifest {
        " written by livestick"
    } else {
        ""
    };
    found.description = match (&fat, &on_ext4) {
        (Some((_, label, _, _)), None) if found.live => format!(
            "a live stick{by} ({table_text}, FAT label {label:?}, live image in {})",
            fat_live_dirs.join(", ")
        ),
        (fat, Some((partition, ext4_label, dirs, _))) => format!(
            "a live stick{by} ({table_text}{}, live image in {} on ext4 partition {partition} labelled {ext4_label:?})",
            fat.as_ref()
                .map(|(_, label, _, _)| format!(", boot files on FAT label {label:?}"))
                .unwrap_or_default(),
            dirs.iter()
                .map(|d| format!("/{d}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        (Some((_, label, files, _)), None) => {
            let used: u64 = files.iter().map(|f| f.size).sum();
            format!(
                "not a live stick: {table_text}, a FAT file system labelled {label:?} holding {} file{} ({})",
                files.len(),
                if files.len() == 1 { "" } else { "s" },
                human(used)
            )
        }
        (None, None) => table_text,
    };
    Ok(found)
}

/// The live directories among a file system's files: those holding a root image
/// (squashfs.img, or an older ISO's rootfs.img/ext3fs.img).
fn live_dirs_of(files: &[(String, u64)]) -> Vec<String> {
    let mut dirs: Vec<String> = files
        .iter()
        .filter_map(|(path, _)| {
            let (dir, name) = path.rsplit_once('/')?;
            (crate::layout::is_root_image_name(name) && !dir.is_empty()).then(|| dir.to_string())
        })
        .collect();
    dirs.dedup_by(|a, b| a.eq_ignore_ascii_case(b));
    dirs
}

/// Adds the homes and the other persistence files of `live_dirs` to `found`.
fn add_live_files(
    found: &mut Found,
    files: &[(String, u64)],
    live_dirs: &[String],
    partition: u32,
    filesystem: HomeFs,
) {
    for (path, size) in files {
        let Some((dir, name)) = path.rsplit_once('/') else {
            continue;
        };
        if !live_dirs.iter().any(|d| d.eq_ignore_ascii_case(dir)) {
            continue;
        }
        if name.eq_ignore_ascii_case(crate::layout::HOME) {
            found.homes.push(FoundHome {
                path: path.clone(),
                size: *size,
                partition,
                filesystem,
            });
        } else if crate::layout::is_overlay_name(name)
            || name.eq_ignore_ascii_case(crate::layout::SWAP)
        {
            found.persistence.push((path.clone(), *size));
        }
    }
}

/// Where `--save-home PATH` puts each home of the stick: PATH itself for a stick
/// with one home; with PATH an existing directory (`is_dir`), each home in it as
/// `<live dir>-home.img`. A stick with several homes needs the directory.
pub fn save_destinations(
    stick: &Path,
    found: &Found,
    to: &Path,
    is_dir: bool,
) -> Result<Vec<(FoundHome, PathBuf)>, RestoreError> {
    match (found.homes.as_slice(), is_dir) {
        ([], _) => Err(RestoreError::NoHome {
            stick: stick.to_path_buf(),
            found: found.description.clone(),
        }),
        ([one], false) => Ok(vec![(one.clone(), to.to_path_buf())]),
        (homes, false) => Err(RestoreError::SeveralHomes {
            file: to.to_path_buf(),
            count: homes.len(),
            homes: homes
                .iter()
                .map(|h| h.path.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }),
        (homes, true) => {
            let mut out: Vec<(FoundHome, PathBuf)> = Vec::new();
            for home in homes {
                let dir = home
                    .path
                    .rsplit_once('/')
                    .map_or("", |(dir, _)| dir)
                    .trim_matches('/')
                    .replace('/', "-");
                // Two homes whose names flatten alike (`/a/b` and `/a-b`, or one live
                // directory on both the FAT and the ext4 partition) get numbered.
                let mut name = to.join(format!("{dir}-home.img"));
                let mut n = 1;
                while out.iter().any(|(_, taken)| taken == &name) {
                    n += 1;
                    name = to.join(format!("{dir}-{n}-home.img"));
                }
                out.push((home.clone(), name));
            }
            Ok(out)
        }
    }
}

/// What the user asked for.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub label: String,
    pub fs: PlainFs,
    pub save_home: Option<PathBuf>,
    /// Whether `mkfs.exfat` is installed (asked by the caller, so the plan stays pure).
    pub mkfs_exfat: bool,
    /// `--save-home` names an existing directory: each home is saved in it.
    pub save_home_is_dir: bool,
    /// The files [`save_destinations`] names that exist already.
    pub save_home_taken: Vec<PathBuf>,
    /// Why `--save-home`'s files would be on the stick, if they would.
    pub save_home_on_stick: Option<String>,
    /// Free bytes where `--save-home`'s files go.
    pub save_home_free: Option<u64>,
    pub volume_id: u32,
}

/// What [`apply`] will do; also the `--dry-run` output.
#[derive(Debug, Clone, Serialize)]
pub struct RestorePlan {
    pub target: PathBuf,
    #[serde(rename = "size_bytes")]
    pub size: u64,
    pub found: Found,
    pub table: TableKind,
    #[serde(rename = "partition_start_bytes")]
    pub partition_start: u64,
    #[serde(rename = "partition_size_bytes")]
    pub partition_len: u64,
    pub fs: PlainFs,
    pub label: String,
    /// `ABCD-1234` (FAT32; exFAT's serial is mkfs.exfat's choice).
    pub fs_uuid: Option<String>,
    #[serde(skip)]
    pub volume_id: u32,
    /// Each home.img to save and the file it is saved to.
    #[serde(flatten)]
    pub save_homes: SaveHomes,
    /// What the restore erases, for the confirmation.
    pub lost: Vec<String>,
}

/// Decides the restore from the facts; every check on the user's input is here.
pub fn plan(
    probe: &TargetProbe,
    found: Found,
    opts: &RestoreOptions,
) -> Result<RestorePlan, RestoreError> {
    let max = match opts.fs {
        PlainFs::Fat32 => 11,
        // The exFAT volume label is 11 UTF-16 units (mkfs.exfat refuses more, and it
        // runs after the stick's signatures are wiped: refuse here, before).
        PlainFs::Exfat => 11,
    };
    let label_ok = match opts.fs {
        PlainFs::Fat32 => fat::validate_label(&opts.label).is_ok(),
        PlainFs::Exfat => {
            !opts.label.is_empty()
                && opts.label.len() <= max
                && opts
                    .label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        }
    };
    if !label_ok {
        return Err(RestoreError::Label {
            label: opts.label.clone(),
            fs: opts.fs,
            max,
        });
    }
    if opts.fs == PlainFs::Exfat && !opts.mkfs_exfat {
        return Err(RestoreError::NoMkfsExfat);
    }
    let layout = partition::layout_single(probe.size, TableKind::Mbr).map_err(|_| {
        RestoreError::TooSmall {
            path: probe.path.clone(),
            size: probe.size,
            fs: opts.fs,
        }
    })?;
    if opts.fs == PlainFs::Fat32 && fat::cluster_size_for(layout.len).is_err() {
        return Err(RestoreError::TooSmall {
            path: probe.path.clone(),
            size: probe.size,
            fs: opts.fs,
        });
    }
    let save_homes = match &opts.save_home {
        None => Vec::new(),
        Some(file) => {
            if let Some(why) = &opts.save_home_on_stick {
                return Err(RestoreError::SaveHomeOnStick {
                    file: file.clone(),
                    why: why.clone(),
                });
            }
            let saves = save_destinations(&probe.path, &found, file, opts.save_home_is_dir)?;
            if let Some((_, taken)) = saves
                .iter()
                .find(|(_, to)| opts.save_home_taken.contains(to))
            {
                return Err(RestoreError::SaveHomeExists {
                    file: taken.clone(),
                });
            }
            let size: u64 = saves.iter().map(|(home, _)| home.size).sum();
            if let Some(free) = opts.save_home_free
                && free < size
            {
                return Err(RestoreError::SaveHomeNoRoom {
                    file: file.clone(),
                    free: human(free),
                    size: human(size),
                });
            }
            saves
        }
    };
    let mut lost = Vec::new();
    for home in &found.homes {
        let on = match home.filesystem {
            HomeFs::Vfat => String::new(),
            HomeFs::Ext4 => format!(" in ext4 partition {}", home.partition),
        };
        lost.push(match save_homes.iter().find(|(saved, _)| saved == home) {
            None => format!(
                "{}{on} ({}), a persistent home with every user file in it",
                home.path,
                human(home.size)
            ),
            Some((_, to)) => format!(
                "{}{on} ({}) on the stick; a copy is saved to {} first",
                home.path,
                human(home.size),
                to.display()
            ),
        });
    }
    for (path, size) in &found.persistence {
        lost.push(format!("{path} ({})", human(*size)));
    }
    lost.push(format!(
        "everything else on {}: {}",
        probe.path.display(),
        found.description
    ));
    Ok(RestorePlan {
        target: probe.path.clone(),
        size: probe.size,
        found,
        table: TableKind::Mbr,
        partition_start: layout.start,
        partition_len: layout.len,
        fs: opts.fs,
        label: opts.label.clone(),
        fs_uuid: (opts.fs == PlainFs::Fat32).then(|| fat::format_volume_id(opts.volume_id)),
        volume_id: opts.volume_id,
        save_homes: SaveHomes(save_homes),
        lost,
    })
}

/// Why `file` (to be created) is on the stick at `stick`, if it is: compared by
/// the device its directory lives on, a loop device's backing file included.
pub fn on_the_stick(file: &Path, stick: &Path) -> Result<Option<String>, RestoreError> {
    let host = crate::disk::devices::Host::live();
    let parent = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let stick_id = Identity::of(stick, &host)?;
    let ids = [Identity::of(file, &host)?, Identity::of(parent, &host)?];
    Ok(ids.iter().find_map(|id| id.same_as(&stick_id)))
}

/// The copy of home.img `save_home` made.
#[derive(Debug, Clone, Serialize)]
pub struct SavedHome {
    pub from: String,
    pub to: PathBuf,
    #[serde(rename = "size_bytes")]
    pub size: u64,
    pub sha256: String,
}

/// Copies a home.img off the stick into a new file (never over an existing one),
/// syncs it, reads it back from the disk and compares its sha256 with the one
/// computed while reading the stick. The stick is not changed.
pub fn save_home(
    probe: &TargetProbe,
    home: &FoundHome,
    to: &Path,
    mut progress: impl FnMut(u64),
) -> Result<SavedHome, RestoreError> {
    let finding = || format!("finding {} on {}", home.path, probe.path.display());
    let not_found = || RestoreError::Io {
        step: finding(),
        source: io::Error::new(io::ErrorKind::NotFound, "it is no longer there"),
    };
    use std::os::unix::fs::OpenOptionsExt;
    // A home holds private files: the copy is its owner's alone.
    let mut out = OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => RestoreError::SaveHomeExists {
                file: to.to_path_buf(),
            },
            _ => io_err(format!("creating {}", to.display()))(e),
        })?;
    let copied = match home.filesystem {
        HomeFs::Vfat => Stick::open(&probe.path, false)
            .and_then(|mut stick| {
                let extents = stick.file_extents(&home.path)?;
                Ok((stick, extents))
            })
            .map_err(|e| RestoreError::Io {
                step: finding(),
                source: io::Error::other(e.to_string()),
            })
            .and_then(|(mut stick, extents)| {
                let size: u64 = extents.iter().map(|e| e.1).sum();
                let reader = ExtentFile::new(stick.file_mut(), &extents);
                copy_hashed(reader, size, &probe.path, &mut out, to, &mut progress)
                    .map(|sha256| (sha256, size))
            }),
        HomeFs::Ext4 => {
            let mut dev = target::open_existing(probe, false)?;
            let found = ext4_fs::find_any_live_partition(&mut dev)
                .and_then(|p| {
                    let Some((p, _)) = p else { return Ok(None) };
                    let mut window = PartitionWindow::new(&mut dev, p.start, p.len);
                    Ok(p.fs.file(&mut window, &home.path)?.map(|map| (p, map)))
                })
                .map_err(|e| RestoreError::Io {
                    step: finding(),
                    source: io::Error::other(e.to_string()),
                })?;
            let (p, map) = found.ok_or_else(not_found)?;
            let reader = ext4_fs::Ext4File::new(&mut dev, p.start, p.fs.block_size, &map);
            let size = reader.len();
            copy_hashed(reader, size, &probe.path, &mut out, to, &mut progress)
                .map(|sha256| (sha256, size))
        }
    };
    let result = copied.and_then(|(expected, size)| {
        out.sync_all()
            .map_err(io_err(format!("syncing {}", to.display())))?;
        drop_cache(&out);
        let actual = crate::source::checksum::sha256_reader(
            File::open(to).map_err(io_err(format!("reading back {}", to.display())))?,
        )
        .map_err(io_err(format!("reading back {}", to.display())))?;
        let (expected, actual) = (hex(&expected), hex(&actual));
        if expected != actual {
            return Err(RestoreError::SaveHomeMismatch {
                file: to.to_path_buf(),
                expected,
                actual,
            });
        }
        Ok((expected, size))
    });
    match result {
        Ok((sha256, size)) => Ok(SavedHome {
            from: home.path.clone(),
            to: to.to_path_buf(),
            size,
            sha256,
        }),
        Err(e) => {
            // Only the file created here, and only because it is incomplete.
            let _ = std::fs::remove_file(to);
            Err(e)
        }
    }
}

/// Copies `size` bytes of `reader` into `out`; their sha256.
fn copy_hashed(
    mut reader: impl Read,
    size: u64,
    device: &Path,
    out: &mut File,
    to: &Path,
    progress: &mut impl FnMut(u64),
) -> Result<[u8; 32], RestoreError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut left = size;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        reader.read_exact(&mut buf[..want]).map_err(io_err(format!(
            "reading home.img from {}",
            device.display()
        )))?;
        hasher.update(&buf[..want]);
        out.write_all(&buf[..want])
            .map_err(io_err(format!("writing {}", to.display())))?;
        progress(want as u64);
        left -= want as u64;
    }
    Ok(hasher.finalize().into())
}

fn drop_cache(file: &File) {
    use std::os::fd::AsRawFd;
    let _ = nix::fcntl::posix_fadvise(
        file.as_raw_fd(),
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
}

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub target: PathBuf,
    pub table: TableKind,
    #[serde(rename = "partition_start_bytes")]
    pub partition_start: u64,
    #[serde(rename = "partition_size_bytes")]
    pub partition_len: u64,
    pub fs: PlainFs,
    pub label: String,
    pub fs_uuid: Option<String>,
    #[serde(flatten)]
    pub saved_homes: SavedHomes,
    /// Distinct bytes written, and of those read back and matched.
    #[serde(rename = "written_bytes")]
    pub bytes_written: u64,
    #[serde(rename = "verified_bytes")]
    pub bytes_verified: u64,
    pub warnings: Vec<String>,
}

/// Writes the plan: the old tables and every signature spot of the disk and of
/// the new partition zeroed, the new file system, then the MBR (no boot code, no
/// boot flag) last; then everything written is read back after a cache drop.
pub fn apply(plan: &RestorePlan, probe: &TargetProbe) -> Result<RestoreReport, RestoreError> {
    let mut file = target::open_for_write(probe, plan.size)?;
    let show = plan.target.display().to_string();
    let (start, len) = (plan.partition_start, plan.partition_len);
    let written;
    {
        // Made in memory first: the stick then takes its reserved sectors and FATs
        // once, whole, instead of zeros from the format and again from the move
        // that aligns its data region.
        let made = match plan.fs {
            PlainFs::Fat32 => {
                let hidden = u32::try_from(start / SECTOR).unwrap_or(u32::MAX);
                let made = fat::MadeFat::plain(len, &plan.label, plan.volume_id, hidden).map_err(
                    |source| RestoreError::Fat {
                        step: format!("making the FAT32 file system on {show}"),
                        source,
                    },
                )?;
                Some(made)
            }
            PlainFs::Exfat => None,
        };
        let mut recorder =
            WriteRecorder::new(&mut file).map_err(io_err(format!("opening {show}")))?;
        partition::wipe_tables(&mut recorder, plan.size).map_err(|e| RestoreError::Io {
            step: format!("clearing the old partition tables of {show}"),
            source: io::Error::other(e.to_string()),
        })?;
        // Not where the new FAT's reserved sectors and tables go: they are written whole.
        let metadata_len = made.as_ref().map_or(0, fat::MadeFat::metadata_len);
        let spots = wipe::disk_and_partition_spots(plan.size, start, len, metadata_len);
        zero_ranges(&mut recorder, spots.iter())
            .map_err(io_err(format!("wiping old signatures on {show}")))?;
        let mut window = PartitionWindow::new(&mut recorder, start, len);
        match made {
            Some(made) => made.load(&mut window).map_err(|source| RestoreError::Fat {
                step: format!("writing the FAT32 file system to {show}"),
                source,
            })?,
            None => make_exfat(&mut window, plan, &show)?,
        }
        window
            .flush()
            .map_err(io_err(format!("writing the file system to {show}")))?;
        drop(window);
        write_plain_mbr(&mut recorder, plan)
            .map_err(io_err(format!("writing the partition table of {show}")))?;
        written = recorder.into_written();
    }
    // Read back: what the page cache holds is what was written; after the drop the
    // same ranges come from the stick.
    let expected = check_ranges(&mut file, written.iter(), |_| {})
        .map_err(io_err(format!("reading {show}")))?;
    target::sync_and_drop_cache(&file, probe.kind).map_err(io_err(format!("syncing {show}")))?;
    let actual = check_ranges(&mut file, written.iter(), |_| {})
        .map_err(io_err(format!("reading back {show}")))?;
    if expected != actual {
        return Err(RestoreError::ReadBack {
            path: plan.target.clone(),
            what: "the partition table, signatures or file system metadata".into(),
        });
    }
    let mut warnings = Vec::new();
    if probe.kind == TargetKind::BlockDevice
        && let Err(w) = target::reread_partitions(&file)
    {
        warnings.push(w);
    }
    let total = written.total();
    Ok(RestoreReport {
        target: plan.target.clone(),
        table: plan.table,
        partition_start: start,
        partition_len: len,
        fs: plan.fs,
        label: plan.label.clone(),
        fs_uuid: plan.fs_uuid.clone(),
        saved_homes: SavedHomes::default(),
        bytes_written: total,
        bytes_verified: total,
        warnings,
    })
}

/// The MBR of plain storage: no boot code (the 440 bytes zeroed), one partition
/// from 1 MiB to the end, not active.
fn write_plain_mbr<D: Read + Write + Seek>(disk: &mut D, plan: &RestorePlan) -> io::Result<()> {
    let mut sector = [0u8; 512];
    sector[440..444].copy_from_slice(&plan.volume_id.to_le_bytes());
    let entry = &mut sector[446..462];
    entry[0] = 0; // not active: nothing boots from plain storage
    // CHS fields as "beyond 8 GiB" (0xFE 0xFF 0xFF), as fdisk writes for LBA use.
    entry[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
    entry[4] = match plan.fs {
        PlainFs::Fat32 => partition::MBR_FAT32_LBA,
        PlainFs::Exfat => MBR_EXFAT,
    };
    entry[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    let first = u32::try_from(plan.partition_start / SECTOR).unwrap_or(u32::MAX);
    let count = u32::try_from(plan.partition_len / SECTOR).unwrap_or(u32::MAX);
    entry[8..12].copy_from_slice(&first.to_le_bytes());
    entry[12..16].copy_from_slice(&count.to_le_bytes());
    sector[510] = 0x55;
    sector[511] = 0xaa;
    disk.seek(SeekFrom::Start(0))?;
    disk.write_all(&sector)?;
    disk.flush()
}

/// exFAT through `mkfs.exfat` on a sparse file of the partition's size (user space:
/// never on the device itself), then its data regions copied into the partition.
fn make_exfat<F: Read + Write + Seek>(
    window: &mut PartitionWindow<F>,
    plan: &RestorePlan,
    show: &str,
) -> Result<(), RestoreError> {
    let exe = crate::tools::find_program(&MKFS_EXFAT).map_err(|_| RestoreError::NoMkfsExfat)?;
    let step = format!("making the exFAT file system for {show}");
    let image = tempfile::NamedTempFile::new().map_err(io_err(step.clone()))?;
    image
        .as_file()
        .set_len(plan.partition_len)
        .map_err(io_err(step.clone()))?;
    let out = std::process::Command::new(&exe)
        .arg("-L")
        .arg(&plan.label)
        .arg(image.path())
        .env("LC_ALL", "C")
        .output()
        .map_err(io_err(format!("running {}", exe.display())))?;
    if !out.status.success() {
        let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        return Err(RestoreError::Mkfs {
            step,
            output: output.trim().to_string(),
        });
    }
    let mut made = File::open(image.path()).map_err(io_err(step.clone()))?;
    let regions = crate::disk::sparse::data_regions(&made).map_err(io_err(step.clone()))?;
    let mut buf = vec![0u8; 1 << 20];
    for r in regions {
        let mut at = r.start;
        while at < r.end {
            let n = ((r.end - at) as usize).min(buf.len());
            made.seek(SeekFrom::Start(at))
                .and_then(|_| made.read_exact(&mut buf[..n]))
                .map_err(io_err(step.clone()))?;
            window
                .seek(SeekFrom::Start(at))
                .and_then(|_| window.write_all(&buf[..n]))
                .map_err(io_err(format!("writing the exFAT file system to {show}")))?;
            at += n as u64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(size: u64) -> TargetProbe {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stick.img");
        std::fs::write(&path, b"").unwrap();
        let mut p = target::probe(&path).unwrap();
        p.size = size;
        p
    }

    fn home_in(dir: &str, size: u64) -> FoundHome {
        FoundHome {
            path: format!("/{dir}/home.img"),
            size,
            partition: 1,
            filesystem: HomeFs::Vfat,
        }
    }

    fn found(home: Option<u64>) -> Found {
        let homes: Vec<FoundHome> = home.map(|s| home_in("LiveOS", s)).into_iter().collect();
        Found {
            description: "a live stick".into(),
            live: true,
            manifest: true,
            home: home.map(|s| ("/LiveOS/home.img".to_string(), s)),
            homes,
            persistence: vec![("/LiveOS/overlay-LIVE-1234-ABCD".into(), 512 << 20)],
        }
    }

    fn opts() -> RestoreOptions {
        RestoreOptions {
            label: "USB".into(),
            fs: PlainFs::Fat32,
            save_home: None,
            mkfs_exfat: false,
            save_home_is_dir: false,
            save_home_taken: Vec::new(),
            save_home_on_stick: None,
            save_home_free: None,
            volume_id: 0x1234_abcd,
        }
    }

    /// Bytes this thread has handed to write system calls (`wchar`): what a write
    /// costs the stick, counted however often the same range is written.
    fn bytes_this_thread_wrote() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").unwrap();
        io.lines()
            .find_map(|l| l.strip_prefix("wchar: "))
            .unwrap()
            .parse()
            .unwrap()
    }

    /// The FAT is made in memory and reaches the stick once, whole: formatted on the
    /// stick, its tables were written as zeros and then again by the move that
    /// aligns the data region (twice the bytes on a 16 GiB stick).
    #[test]
    fn the_stick_takes_its_new_filesystem_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stick.img");
        let mut stale = vec![0u8; 8 << 20];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for b in &mut stale {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *b = state as u8;
        }
        std::fs::write(&path, &stale).unwrap();
        let size = 16u64 << 30;
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(size)
            .unwrap();
        let probe = target::probe(&path).unwrap();
        let plan = plan(&probe, found(None), &opts()).unwrap();
        let before = bytes_this_thread_wrote();
        let report = apply(&plan, &probe).unwrap();
        let handed = bytes_this_thread_wrote() - before;
        assert_eq!(report.bytes_written, report.bytes_verified);
        // Both FATs of 8 MiB (8 KiB clusters), the signature spots, the table.
        assert!(
            report.bytes_written > 16 << 20 && report.bytes_written < 20 << 20,
            "{}",
            report.bytes_written
        );
        assert!(
            handed <= report.bytes_written + (64 << 10),
            "{handed} bytes written for {} distinct",
            report.bytes_written
        );
    }

    #[test]
    fn one_partition_over_the_stick_naming_what_is_lost() {
        let p = plan(&probe(8 << 30), found(Some(1 << 30)), &opts()).unwrap();
        assert_eq!(
            (p.partition_start, p.partition_len),
            (1 << 20, (8 << 30) - (1 << 20))
        );
        assert_eq!(p.table, TableKind::Mbr);
        assert!(p.lost[0].contains("home.img (1 GiB)"), "{:?}", p.lost);
        assert!(
            p.lost.iter().any(|l| l.contains("overlay-LIVE")),
            "{:?}",
            p.lost
        );
        assert_eq!(p.fs_uuid.as_deref(), Some("1234-ABCD"));
    }

    #[test]
    fn bad_labels_exfat_without_mkfs_and_tiny_sticks_are_bad_input() {
        for label in ["", "TWELVE_CHARS", "no spaces", "ümlaut"] {
            let o = RestoreOptions {
                label: label.into(),
                ..opts()
            };
            assert!(
                matches!(
                    plan(&probe(8 << 30), found(None), &o),
                    Err(RestoreError::Label { .. })
                ),
                "{label:?}"
            );
        }
        // exFAT's label field holds 11 characters, as FAT's does.
        let too_long = RestoreOptions {
            fs: PlainFs::Exfat,
            label: "TWELVE_CHARS".into(),
            mkfs_exfat: true,
            ..opts()
        };
        assert!(matches!(
            plan(&probe(8 << 30), found(None), &too_long),
            Err(RestoreError::Label { max: 11, .. })
        ));
        let exfat = RestoreOptions {
            fs: PlainFs::Exfat,
            label: "Eleven_Ch-1".into(),
            ..opts()
        };
        assert!(matches!(
            plan(&probe(8 << 30), found(None), &exfat),
            Err(RestoreError::NoMkfsExfat)
        ));
        let with_mkfs = RestoreOptions {
            mkfs_exfat: true,
            ..exfat
        };
        assert!(plan(&probe(8 << 30), found(None), &with_mkfs).is_ok());
        assert!(matches!(
            plan(&probe(16 << 20), found(None), &opts()),
            Err(RestoreError::TooSmall { .. })
        ));
    }

    #[test]
    fn save_home_refuses_an_existing_file_a_file_on_the_stick_and_a_stick_without_home() {
        let to = PathBuf::from("/backup/home.img");
        let base = RestoreOptions {
            save_home: Some(to.clone()),
            ..opts()
        };
        let exists = RestoreOptions {
            save_home_taken: vec![to.clone()],
            ..base.clone()
        };
        assert!(matches!(
            plan(&probe(8 << 30), found(Some(1 << 30)), &exists),
            Err(RestoreError::SaveHomeExists { .. })
        ));
        let on_stick = RestoreOptions {
            save_home_on_stick: Some("the same device".into()),
            ..base.clone()
        };
        assert!(matches!(
            plan(&probe(8 << 30), found(Some(1 << 30)), &on_stick),
            Err(RestoreError::SaveHomeOnStick { .. })
        ));
        assert!(matches!(
            plan(&probe(8 << 30), found(None), &base),
            Err(RestoreError::NoHome { .. })
        ));
        let no_room = RestoreOptions {
            save_home_free: Some(1 << 20),
            ..base.clone()
        };
        assert!(matches!(
            plan(&probe(8 << 30), found(Some(1 << 30)), &no_room),
            Err(RestoreError::SaveHomeNoRoom { .. })
        ));
        let ok = plan(&probe(8 << 30), found(Some(1 << 30)), &base).unwrap();
        assert_eq!(ok.save_homes.0, vec![(home_in("LiveOS", 1 << 30), to)]);
        assert!(ok.lost[0].contains("a copy is saved"), "{:?}", ok.lost);
        let json = serde_json::to_value(&ok).unwrap();
        assert_eq!(json["save_home"]["path"], "/LiveOS/home.img");
        assert_eq!(json["save_homes"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn homes_whose_names_flatten_alike_get_distinct_files() {
        let mut found = found(None);
        found.homes = ["a-b-2", "a/b", "a-b"]
            .iter()
            .map(|d| home_in(d, 1 << 20))
            .collect();
        let saves = save_destinations(Path::new("s.img"), &found, Path::new("/b"), true).unwrap();
        let files: Vec<&Path> = saves.iter().map(|(_, to)| to.as_path()).collect();
        assert_eq!(
            files,
            [
                Path::new("/b/a-b-2-home.img"),
                Path::new("/b/a-b-home.img"),
                Path::new("/b/a-b-3-home.img")
            ]
        );
    }

    #[test]
    fn a_stick_with_several_homes_names_each_and_saves_them_into_a_directory() {
        let mut two = found(Some(1 << 30));
        two.homes.push(FoundHome {
            path: "/Other/home.img".into(),
            size: 2 << 30,
            partition: 2,
            filesystem: HomeFs::Ext4,
        });
        let p = plan(&probe(8 << 30), two.clone(), &opts()).unwrap();
        assert!(
            p.lost[0].starts_with("/LiveOS/home.img (1 GiB)"),
            "{:?}",
            p.lost
        );
        assert!(
            p.lost[1].starts_with("/Other/home.img in ext4 partition 2 (2 GiB)"),
            "{:?}",
            p.lost
        );

        // One file cannot hold two homes: bad input naming both and the way out.
        let file = RestoreOptions {
            save_home: Some("/backup/home.img".into()),
            ..opts()
        };
        let e = plan(&probe(8 << 30), two.clone(), &file).unwrap_err();
        assert!(matches!(e, RestoreError::SeveralHomes { count: 2, .. }));
        let text = e.to_string();
        assert!(text.contains("/LiveOS/home.img, /Other/home.img"), "{text}");
        assert!(text.contains("existing directory"), "{text}");

        let dir = RestoreOptions {
            save_home: Some("/backup".into()),
            save_home_is_dir: true,
            ..opts()
        };
        let p = plan(&probe(8 << 30), two.clone(), &dir).unwrap();
        let files: Vec<&Path> = p.save_homes.0.iter().map(|(_, to)| to.as_path()).collect();
        assert_eq!(
            files,
            [
                Path::new("/backup/LiveOS-home.img"),
                Path::new("/backup/Other-home.img")
            ]
        );
        assert!(p.lost.iter().take(2).all(|l| l.contains("a copy is saved")));
        // Either copy existing already, or too little room for both, refuses.
        let taken = RestoreOptions {
            save_home_taken: vec!["/backup/Other-home.img".into()],
            ..dir.clone()
        };
        assert!(matches!(
            plan(&probe(8 << 30), two.clone(), &taken),
            Err(RestoreError::SaveHomeExists { file }) if file == Path::new("/backup/Other-home.img")
        ));
        let small = RestoreOptions {
            save_home_free: Some(2 << 30),
            ..dir
        };
        assert!(matches!(
            plan(&probe(8 << 30), two, &small),
            Err(RestoreError::SaveHomeNoRoom { .. })
        ));
    }
}
