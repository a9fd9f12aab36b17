//! The source of a write: a live ISO (`source::live`), or another live stick
//! (livecd-iso-to-disk's "live device" source), whose menus, live files and
//! EFI loaders are read from its FAT filesystem in place and whose overlay and
//! home can be carried over.
//!
//! This sits above `source/` and `disk/` (beside `plan`, `apply`): the ISO
//! model lives in `source/`, the stick's FAT and extents in `disk/`, and
//! neither imports the other.

use std::fs::File;
use std::io::Read;
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

/// Reads a stick written by livestick or livecd-iso-to-disk as a source.
pub fn inspect_stick(path: &Path) -> Result<LiveImage, LiveError> {
    let mut stick = Stick::open(path, false).map_err(stick_err(path))?;
    let info = stick.info(LIVE_DIR).map_err(stick_err(path))?;
    let squashfs_size = info
        .squashfs
        .ok_or_else(|| LiveError::NotLive(path.to_path_buf()))?;
    let found = stick
        .with_fs(|fs| {
            let mut menus = Vec::new();
            let mut menu_errors = Vec::new();
            for (menu_path, is_grub) in [
                ("/syslinux/syslinux.cfg", false),
                ("/isolinux/isolinux.cfg", false),
                ("/syslinux/extlinux.conf", false),
                ("/EFI/BOOT/grub.cfg", true),
                ("/boot/grub2/grub.cfg", true),
            ] {
                if !fat::exists(fs, menu_path) {
                    continue;
                }
                let Ok(bytes) = fat::read_file(fs, menu_path) else {
                    continue;
                };
                parse_menu_file(menu_path, is_grub, &bytes, &mut menus, &mut menu_errors);
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
            let walk_err = |source| StickError::Fat {
                path: path.to_path_buf(),
                source,
            };
            let efi_files = fat::walk_files(fs, "/EFI")
                .map_err(walk_err)?
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
    let extents = stick
        .file_extents(&squashfs_path)
        .map_err(stick_err(path))?;
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
    let home = info.home.map(|size| FileInfo {
        path: format!("/{LIVE_DIR}/home.img"),
        size,
    });
    let overlay = info.overlay().map(|(p, s)| FileInfo {
        path: p.clone(),
        size: *s,
    });
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
        live_files: found.live_files,
        implanted_md5: false,
        source_overlay: overlay,
        source_home: home,
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
