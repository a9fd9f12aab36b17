//! The source of a write: a live ISO (`source::live`), or another live stick
//! (livecd-iso-to-disk's "live device" source), whose menus, live files and
//! EFI loaders are read from its FAT filesystem in place and whose overlay and
//! home can be carried over.
//!
//! This sits above `source/` and `disk/` (beside `plan`, `apply`): the ISO
//! model lives in `source/`, the stick's FAT and extents in `disk/`, and
//! neither imports the other.

use std::fs::File;
use std::io::{self, Read, Seek};
use std::path::Path;

use crate::disk::extent_file::ExtentFile;
use crate::disk::fat::{self, FatEntry};
use crate::disk::stick::{self, Stick, StickError};
use crate::layout;
use crate::source::iso::{Extent, IsoEntry, IsoError};
use crate::source::live::{
    self, FileInfo, LayoutKind, LiveError, LiveImage, MenuFile, SourceKind, boot_files_of,
    check_menus, classify_root, parse_menu_file,
};

const LIVE_DIR: &str = "LiveOS";

fn stick_err(path: &Path) -> impl Fn(StickError) -> LiveError + '_ {
    move |e| LiveError::Stick {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Files in the live directory that belong to this stick, not to the live
/// system: they are never copied as part of it.
fn is_persistence(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    layout::is_overlay_name(&lower)
        || lower == layout::HOME
        || lower == layout::SWAP
        || lower.ends_with(".new")
        || lower.ends_with(".old")
        || lower == layout::ROOT_RECORD
        || lower == layout::MANIFEST
}

struct Found {
    menus: Vec<MenuFile>,
    menu_errors: Vec<(String, String)>,
    live_files: Vec<FileInfo>,
    efi_files: Vec<FileInfo>,
    all_files: Vec<FatEntry>,
}

/// Reads the source's structure into a [`LiveImage`]: a live ISO, or another
/// live stick (which has a partition table and no ISO 9660 volume).
pub fn inspect(path: &Path) -> Result<LiveImage, LiveError> {
    match live::inspect_iso(path) {
        // Hybrid ISOs carry a partition table too, so the ISO is tried first,
        // and only a file with no ISO 9660 volume at all may be a stick (a
        // truncated ISO must say it is truncated).
        Err(
            err @ LiveError::Iso {
                source: IsoError::NotIso { .. },
                ..
            },
        ) => {
            if stick::looks_like_stick(path) {
                inspect_stick(path)
            } else {
                Err(err)
            }
        }
        other => other,
    }
}

/// An inspection error told with the name the user gave the source, not the
/// `/proc/self/fd/N` its unpacked copy is read through (`source::compressed`).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct NamedLiveError {
    message: String,
    hint: &'static str,
}

impl crate::error::Classify for NamedLiveError {
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::BadInput
    }

    fn hint(&self) -> &'static str {
        self.hint
    }
}

/// [`inspect`] of the source read at `path`, which the user named `display`:
/// errors name `display`.
pub fn inspect_named(path: &Path, display: &Path) -> Result<LiveImage, NamedLiveError> {
    use crate::error::Classify;
    inspect(path).map_err(|e| NamedLiveError {
        message: if path == display {
            e.to_string()
        } else {
            e.to_string()
                .replace(&path.display().to_string(), &display.display().to_string())
        },
        hint: e.hint(),
    })
}

/// Reads a stick written by livestick or livecd-iso-to-disk as a source.
pub fn inspect_stick(path: &Path) -> Result<LiveImage, LiveError> {
    let mut stick = Stick::open(path, false).map_err(stick_err(path))?;
    let info = stick.info(LIVE_DIR).map_err(stick_err(path))?;
    // The ext4 live layout: boot files on the FAT, the live directory on ext4.
    let ext4_live = match info.squashfs {
        Some(_) => None,
        None => {
            let boot = stick.partition.number;
            crate::disk::ext4_live::layout_of(stick.file_mut(), LIVE_DIR, boot).map_err(|e| {
                LiveError::Stick {
                    path: path.to_path_buf(),
                    message: format!("reading its ext4 live partition: {e}"),
                }
            })?
        }
    };
    let ext4_file = |name: &str| {
        ext4_live.as_ref().and_then(|(l, _)| {
            l.files
                .iter()
                .find(|f| f.path == format!("/{LIVE_DIR}/{name}"))
                .map(|f| f.size_bytes)
        })
    };
    let squashfs_size = info
        .squashfs
        .or_else(|| ext4_file(layout::SQUASHFS))
        .ok_or_else(|| LiveError::NotLive(path.to_path_buf()))?;
    let found = stick
        .with_fs(|fs| {
            let mut menus = Vec::new();
            let mut menu_errors = Vec::new();
            for (menu_path, is_grub) in crate::boot::menu::STICK_MENUS {
                if !fat::exists(fs, menu_path) {
                    continue;
                }
                let Ok(bytes) = fat::read_file(fs, menu_path) else {
                    continue;
                };
                parse_menu_file(menu_path, is_grub, &bytes, &mut menus, &mut menu_errors);
            }
            let walk_err = |source| StickError::Fat {
                path: path.to_path_buf(),
                source,
            };
            let efi_entries = fat::walk_files(fs, "/EFI").map_err(walk_err)?;
            if menus.is_empty() {
                // As on an ISO (`source::live`): a distribution's signed GRUB reads
                // its menu from its own directory, which a stick copied unchanged.
                let mut vendor: Vec<&FatEntry> = efi_entries
                    .iter()
                    .filter(|e| live::is_vendor_grub_cfg(&e.path))
                    .collect();
                vendor.sort_by(|a, b| a.path.cmp(&b.path));
                for entry in vendor {
                    let Ok(bytes) = fat::read_file(fs, &entry.path) else {
                        continue;
                    };
                    parse_menu_file(&entry.path, true, &bytes, &mut menus, &mut menu_errors);
                }
            }
            let live_files = fat::list_dir(fs, &format!("/{LIVE_DIR}"))
                .into_iter()
                .filter(|e| !e.is_dir)
                .filter(|e| !is_persistence(e.path.rsplit('/').next().unwrap_or("")))
                .map(|e| FileInfo {
                    path: e.path,
                    size: e.size,
                })
                .collect();
            let efi_files = efi_entries
                .into_iter()
                .map(|e| FileInfo {
                    path: e.path,
                    size: e.size,
                })
                .collect();
            Ok(Found {
                menus,
                menu_errors,
                live_files,
                efi_files,
                all_files: fat::walk_files(fs, "").map_err(walk_err)?,
            })
        })
        .map_err(stick_err(path))?;
    check_menus(path, &found.menus, &found.menu_errors)?;
    let (kernels, initrds) = boot_files_of(&found.menus);
    let mut warnings: Vec<String> = found
        .menu_errors
        .iter()
        .map(|(m, e)| format!("{m} not used: {e}"))
        .collect();
    let mut boot_files = Vec::new();
    for p in kernels.iter().chain(initrds.iter()) {
        match found
            .all_files
            .iter()
            .find(|f| f.path.eq_ignore_ascii_case(p))
        {
            Some(f) => boot_files.push(FileInfo {
                path: f.path.clone(),
                size: f.size,
            }),
            None => warnings.push(format!("a boot menu names {p}, which is not on the stick")),
        }
    }
    let squashfs_path = format!("/{LIVE_DIR}/squashfs.img");
    let extents = match &ext4_live {
        Some((_, runs)) => runs.clone(),
        None => stick
            .file_extents(&squashfs_path)
            .map_err(stick_err(path))?,
    };
    let squashfs_entry = IsoEntry {
        path: squashfs_path.clone(),
        name: layout::SQUASHFS.into(),
        is_dir: false,
        size: squashfs_size,
        extents: extents
            .iter()
            .map(|&(offset, len)| Extent { offset, len })
            .collect(),
    };
    let mut head = Vec::new();
    ExtentFile::new(stick.file_mut(), &extents)
        .take(1028)
        .read_to_end(&mut head)
        .map_err(|e| LiveError::Stick {
            path: path.to_path_buf(),
            message: format!("reading squashfs.img: {e}"),
        })?;
    let (root, compressor) = classify_root(&head, path, &squashfs_entry);
    let layout = if found.all_files.iter().any(|f| {
        f.path
            .to_ascii_lowercase()
            .starts_with("/boot/x86_64/loader/")
    }) {
        LayoutKind::Kiwi
    } else if kernels.iter().any(|k| k.starts_with("/isolinux")) {
        LayoutKind::Isolinux
    } else {
        LayoutKind::GrubOnly
    };
    let home = info
        .home
        .or_else(|| ext4_file("home.img"))
        .map(|size| FileInfo {
            path: format!("/{LIVE_DIR}/home.img"),
            size,
        });
    let mut overlay = info.overlay().map(|(p, s)| FileInfo {
        path: p.clone(),
        size: *s,
    });
    let mut live_files = found.live_files;
    if let Some((l, _)) = &ext4_live {
        let expected = layout::overlay_path(LIVE_DIR, &l.label, &l.uuid);
        overlay = l
            .files
            .iter()
            .find(|f| f.path == expected)
            .map(|f| FileInfo {
                path: f.path.clone(),
                size: f.size_bytes,
            });
        live_files = l
            .files
            .iter()
            .filter(|f| !is_persistence(f.path.rsplit('/').next().unwrap_or("")))
            .map(|f| FileInfo {
                path: f.path.clone(),
                size: f.size_bytes,
            })
            .collect();
    }
    Ok(LiveImage {
        path: path.to_path_buf(),
        source_kind: SourceKind::Stick,
        label: info.label.clone(),
        volume_size: stick.probe.size,
        layout,
        live_dir: LIVE_DIR.to_string(),
        squashfs: FileInfo {
            path: squashfs_path,
            size: squashfs_size,
        },
        root,
        compressor,
        menus: found.menus,
        kernels,
        initrds,
        boot_files,
        warnings,
        efi_files: found.efi_files,
        live_files,
        implanted_md5: false,
        source_overlay: overlay,
        source_home: home,
        ext4_live: ext4_live.map(|(l, _)| l),
        squashfs_entry,
    })
}

/// Source files read from another stick through their FAT extents.
pub struct StickSource {
    stick: Stick,
}

impl StickSource {
    pub fn open(path: &Path) -> Result<Self, StickError> {
        Ok(StickSource {
            stick: Stick::open(path, false)?,
        })
    }

    pub fn reader(&mut self, path: &str) -> Result<ExtentFile<&mut File>, StickError> {
        let extents = self.stick.file_extents(path)?;
        Ok(ExtentFile::new(self.stick.file_mut(), &extents))
    }
}

/// The root image as it was written, which [`compare_root`] reads: from the
/// manifest (`manifest::root_record`), or from [`layout::ROOT_RECORD`] on a stick
/// written before the manifest carried it (this type's text form, no longer written
/// to a FAT stick).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootRecord {
    pub size: u64,
    /// sha256 of the whole image, computed while it was written.
    pub sha256: String,
    /// `checksum::ends_sha256` of the image as written: ties the record to this copy.
    pub ends_sha256: String,
    /// The implanted MD5 the ISO claimed, when it was written from one.
    pub iso_md5: Option<String>,
}

impl RootRecord {
    pub fn render(&self) -> String {
        let mut text = format!(
            "# livestick: the root image this live directory's overlay was written for\n\
             size={}\nsha256={}\nends_sha256={}\n",
            self.size, self.sha256, self.ends_sha256
        );
        if let Some(md5) = &self.iso_md5 {
            text.push_str(&format!("iso_md5={md5}\n"));
        }
        text
    }

    /// `None` for anything that is not a complete record.
    pub fn parse(text: &str) -> Option<RootRecord> {
        let value = |key: &str| {
            text.lines()
                .filter_map(|l| l.split_once('='))
                .find(|(k, _)| k.trim() == key)
                .map(|(_, v)| v.trim().to_string())
        };
        let is_hex = |v: &String| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit());
        Some(RootRecord {
            size: value("size")?.parse().ok()?,
            sha256: value("sha256").filter(is_hex)?,
            ends_sha256: value("ends_sha256").filter(is_hex)?,
            iso_md5: value("iso_md5"),
        })
    }
}

/// Whether the root image in `/<live_dir>/` of the stick at `target` is the one
/// this write copies (`live`'s squashfs.img), cheaply where it can be:
/// - sizes differ: changed, nothing read;
/// - the stick's record names the same ISO (its implanted MD5, `iso_md5`) and
///   still describes the stick's image: the same, only 128 KiB read;
/// - otherwise the ISO's image is hashed (`iso_sha256`) and compared with the
///   record's sha256, or with the stick's image hashed when there is no valid record.
///
/// The cheap path is safe because every write that copies a root image rewrites
/// the record beside it, and a root image replaced any other way (`overlay merge`,
/// another tool) has another size or other first and last 64 KiB, which the record
/// then no longer matches. An ISO whose bytes do not match its implanted MD5 is
/// refused before writing (unless `--noverify`).
pub fn compare_root(
    target: &Path,
    fs: &crate::plan::ExistingFs,
    live: &LiveImage,
    live_dir: &str,
    iso_md5: Option<&str>,
    iso_sha256: impl FnOnce() -> io::Result<String>,
) -> crate::plan::RootMatch {
    use crate::plan::RootMatch;
    let on_stick = format!("/{live_dir}/{}", layout::SQUASHFS);
    let Some(stick_size) = fs.size_of(&on_stick) else {
        return RootMatch::changed(format!("the stick has no {on_stick}"));
    };
    if stick_size != live.squashfs.size {
        return RootMatch::changed(format!(
            "{on_stick} is {stick_size} bytes on the stick and {} bytes in {}",
            live.squashfs.size,
            live.path.display()
        ));
    }
    let (record, ends, mut stick, extents) =
        match read_stick_root(target, live_dir, &on_stick, stick_size) {
            Ok(found) => (found.record, found.ends_sha256, found.stick, found.extents),
            Err(e) => return RootMatch::changed(format!("{on_stick} could not be read ({e})")),
        };
    let record = record.filter(|r| r.size == stick_size && r.ends_sha256 == ends);
    if let (Some(r), Some(md5)) = (&record, iso_md5)
        && r.iso_md5.as_deref() == Some(md5)
    {
        return RootMatch::same(format!(
            "{on_stick} was written from this ISO (implanted MD5 {md5}) and is unchanged since"
        ));
    }
    let stick_sha = match record {
        Some(r) => r.sha256,
        None => match crate::source::checksum::sha256_reader(ExtentFile::new(
            stick.file_mut(),
            &extents,
        )) {
            Ok(sum) => crate::source::checksum::hex(&sum),
            Err(e) => return RootMatch::changed(format!("{on_stick} could not be read ({e})")),
        },
    };
    match iso_sha256() {
        Ok(iso_sha) if iso_sha == stick_sha => RootMatch::same(format!(
            "{on_stick} has the same size and sha256 ({iso_sha}) on the stick and in {}",
            live.path.display()
        )),
        Ok(iso_sha) => RootMatch::changed(format!(
            "{on_stick} has sha256 {stick_sha} on the stick and {iso_sha} in {}",
            live.path.display()
        )),
        Err(e) => RootMatch::changed(format!(
            "{} could not be read to compare it ({e})",
            live.squashfs.path
        )),
    }
}

/// The stick's side of [`compare_root`]: its record and its root image, opened.
struct StickRoot {
    /// The record as found, whether or not it still describes the image.
    record: Option<RootRecord>,
    ends_sha256: String,
    stick: Stick,
    extents: Vec<(u64, u64)>,
}

fn read_stick_root(
    target: &Path,
    live_dir: &str,
    on_stick: &str,
    size: u64,
) -> Result<StickRoot, String> {
    let mut stick = Stick::open(target, false).map_err(|e| e.to_string())?;
    // The manifest carries the record; a stick written before it did has only
    // `.livestick`, which is read then.
    let record_path = format!("/{live_dir}/{}", layout::ROOT_RECORD);
    let record = stick
        .with_fs(|fs| {
            let in_manifest = crate::manifest::read(fs)
                .and_then(|(_, manifest)| root_record_in(&manifest, on_stick));
            Ok(in_manifest.or_else(|| {
                fat::exists(fs, &record_path)
                    .then(|| fat::read_file(fs, &record_path).ok())
                    .flatten()
                    .and_then(|bytes| RootRecord::parse(&String::from_utf8_lossy(&bytes)))
            }))
        })
        .map_err(|e| e.to_string())?;
    // On the ext4 live layout the image and its record are in the ext4 partition
    // (the manifest on the FAT lists the image without a record).
    let (record, extents) = match stick.file_extents(on_stick) {
        Ok(extents) => (record, extents),
        Err(e) => {
            match crate::disk::ext4_live::root_on_ext4(stick.file_mut(), live_dir, &record_path) {
                Ok(Some((runs, bytes))) => (
                    bytes
                        .and_then(|b| RootRecord::parse(&String::from_utf8_lossy(&b)))
                        .or(record),
                    runs,
                ),
                _ => return Err(e.to_string()),
            }
        }
    };
    let ends_sha256 = crate::source::checksum::ends_sha256(
        &mut ExtentFile::new(stick.file_mut(), &extents),
        size,
    )
    .map_err(|e| e.to_string())?;
    Ok(StickRoot {
        record,
        ends_sha256,
        stick,
        extents,
    })
}

/// The manifest's record of the root image at `path` (`/LiveOS/squashfs.img`) as
/// `write` copied it, for [`compare_root`]: its size,
/// sha256 and ends' hash, and the implanted MD5 of the ISO its live directory was
/// written from. `None` when the manifest does not list it with its ends' hash (a
/// merged image, a manifest of an older livestick).
fn root_record_in(manifest: &crate::manifest::Manifest, path: &str) -> Option<RootRecord> {
    let file = manifest
        .files
        .iter()
        .find(|f| f.path.eq_ignore_ascii_case(path))?;
    let live_dir = path.trim_start_matches('/').split('/').next()?;
    let iso_md5 = manifest
        .images
        .iter()
        .find(|i| i.live_dir.trim_matches('/').eq_ignore_ascii_case(live_dir))
        .and_then(|i| i.source.implanted_md5.clone());
    Some(RootRecord {
        size: file.size,
        sha256: file.sha256.clone(),
        ends_sha256: file.ends_sha256.clone()?,
        iso_md5,
    })
}

/// Bytes of changes the overlay at `path` (`len` bytes) on the stick holds: the
/// ext4 blocks in use of an OverlayFS overlay, the changed chunks of a dm-snapshot
/// store. `None` when it cannot be read as either.
pub fn overlay_used(target: &Path, path: &str, len: u64) -> Option<u64> {
    use crate::persist::{overlay::store, snapshot};
    fn used_of<R: Read + Seek>(file: &mut R, len: u64) -> Option<u64> {
        if store::is_ext4(file) {
            return store::overlay_info(file).map(|info| info.used_bytes);
        }
        let report = snapshot::status(file, len, snapshot::LIVEOS_CHUNK_SECTORS, None).ok()?;
        Some(report.exceptions * u64::from(report.chunk_sectors) * snapshot::SECTOR_BYTES)
    }
    let mut stick = Stick::open(target, false).ok()?;
    match stick.file_extents(path) {
        Ok(extents) => used_of(&mut ExtentFile::new(stick.file_mut(), &extents), len),
        // On the ext4 live layout, read as ext4 reads it: unwritten extents as zeros.
        Err(_) => {
            let live_dir = path.trim_start_matches('/').split('/').next()?;
            let mut file =
                crate::disk::ext4_live::open_live_file(stick.file_mut(), live_dir, path).ok()??;
            used_of(&mut file, len)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_record_round_trips_and_rejects_partial_text() {
        let record = RootRecord {
            size: 1 << 30,
            sha256: "ab".repeat(32),
            ends_sha256: "cd".repeat(32),
            iso_md5: Some("0123456789abcdef0123456789abcdef".into()),
        };
        assert_eq!(RootRecord::parse(&record.render()), Some(record.clone()));
        let without_md5 = RootRecord {
            iso_md5: None,
            ..record.clone()
        };
        assert_eq!(RootRecord::parse(&without_md5.render()), Some(without_md5));
        let cut: String = record
            .render()
            .lines()
            .take(2)
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(RootRecord::parse(&cut), None);
        assert_eq!(
            RootRecord::parse("size=1\nsha256=xyz\nends_sha256=xyz\n"),
            None
        );
    }
}
