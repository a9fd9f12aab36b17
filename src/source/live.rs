//! The live image model: what a Fedora-style live ISO holds and how it boots.
//!
//! `inspect` reads only directory records, boot menus and a few superblock
//! bytes; the squashfs image itself is not read until it is copied.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;
use thiserror::Error;

use crate::boot::menu::{self, BootMenu};
use crate::bytes::{u16_at, u32_at};
use crate::source::checksum;
use crate::source::iso::{IsoEntry, IsoError, IsoImage};
use crate::squash;

/// Menus larger than this are not boot menus.
const MENU_LIMIT: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LayoutKind {
    /// isolinux for BIOS, `EFI/BOOT` for UEFI (Fedora ≤ 36 and most remixes).
    Isolinux,
    /// GRUB for both, kernel in `images/pxeboot` (Fedora ≥ 37).
    GrubOnly,
    /// kiwi-built: `boot/x86_64/loader/{linux,initrd}` (Fedora ≥ 42 spins).
    Kiwi,
}

impl std::fmt::Display for LayoutKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LayoutKind::Isolinux => "isolinux (BIOS) + EFI/BOOT",
            LayoutKind::GrubOnly => "GRUB only",
            LayoutKind::Kiwi => "kiwi",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum RootKind {
    /// squashfs.img holds `LiveOS/rootfs.img` (or `ext3fs.img`): a dm-snapshot overlay works.
    Nested { image: String },
    /// The root filesystem is the squashfs itself: only an OverlayFS overlay works.
    Flat,
    /// The root image is EROFS rather than squashfs.
    Erofs,
    /// Could not be determined (unsquashfs missing, or the image is fragmented in the ISO).
    Unknown { reason: String },
    /// squashfs.img is neither squashfs nor EROFS: the live system cannot boot from it.
    Unrecognised { reason: String },
}

/// A boot menu found on the ISO, with the path it was read from.
#[derive(Debug, Clone, Serialize)]
pub struct MenuFile {
    pub path: String,
    pub menu: BootMenu,
}

#[derive(Debug, Clone, Serialize)]
pub struct FileInfo {
    pub path: String,
    #[serde(rename = "size_bytes")]
    pub size: u64,
}

impl From<&IsoEntry> for FileInfo {
    fn from(e: &IsoEntry) -> Self {
        FileInfo {
            path: e.path.clone(),
            size: e.size,
        }
    }
}

/// Where the live system is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    /// A live ISO image.
    Iso,
    /// Another live stick (block device or image file), as livecd-iso-to-disk
    /// accepts: its overlay and home can be carried over.
    Stick,
}

/// Everything livestick needs to know about a live ISO.
#[derive(Debug, Clone, Serialize)]
pub struct LiveImage {
    /// What was inspected: the ISO or the stick, as the user named it.
    #[serde(rename = "source")]
    pub path: PathBuf,
    pub source_kind: SourceKind,
    pub label: String,
    #[serde(rename = "volume_bytes")]
    pub volume_size: u64,
    pub layout: LayoutKind,
    /// The directory holding squashfs.img on the ISO, normally `LiveOS`.
    pub live_dir: String,
    pub squashfs: FileInfo,
    pub root: RootKind,
    /// The squashfs compressor (`xz`, `zstd`, …), from its superblock.
    pub compressor: Option<String>,
    pub menus: Vec<MenuFile>,
    pub kernels: Vec<String>,
    pub initrds: Vec<String>,
    /// The kernels and initrds the menus name that exist on the ISO.
    pub boot_files: Vec<FileInfo>,
    /// Things worth knowing that do not stop a write (a menu naming a missing kernel).
    pub warnings: Vec<String>,
    pub efi_files: Vec<FileInfo>,
    /// Every file of the live directory (squashfs.img, osmin.img, …).
    pub live_files: Vec<FileInfo>,
    pub implanted_md5: bool,
    /// A stick source's overlay that dracut uses (`overlay-<LABEL>-<UUID>`).
    pub source_overlay: Option<FileInfo>,
    /// A stick source's home.img.
    pub source_home: Option<FileInfo>,
    /// A stick source of the ext4 live layout: its ext4 partition and what is on it
    /// (`null` for an ISO or a stick with the live directory on its FAT).
    pub ext4_live: Option<crate::disk::ext4_live::Ext4LiveLayout>,
    #[serde(skip)]
    pub(crate) squashfs_entry: IsoEntry,
}

/// The shape version of the `inspect --json` document (docs/json-maintenance.md,
/// `schemas/inspect.schema.json`).
pub const INSPECT_SCHEMA_VERSION: u64 = 1;

impl LiveImage {
    /// The `inspect --json` document: `schema`, then what was found.
    pub fn to_document(&self) -> serde_json::Result<serde_json::Value> {
        let mut doc = serde_json::to_value(self)?;
        if let Some(object) = doc.as_object_mut() {
            object.insert("schema".into(), serde_json::json!(INSPECT_SCHEMA_VERSION));
        }
        Ok(doc)
    }
}

#[derive(Debug, Error)]
pub enum LiveError {
    #[error("source ISO {0} does not exist")]
    Missing(PathBuf),
    #[error("cannot read source ISO {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Iso { path: PathBuf, source: IsoError },
    #[error(
        "{0} has no LiveOS/squashfs.img: it is not a live image (an installer DVD or netinst ISO cannot be made into a live stick)"
    )]
    NotLive(PathBuf),
    #[error(
        "{0} has no boot menu (isolinux/isolinux.cfg, EFI/BOOT/grub.cfg, boot/grub2/grub.cfg or EFI/<vendor>/grub.cfg), so there is nothing to say how to boot it"
    )]
    NoMenu(PathBuf),
    #[error("{path}: {message}")]
    Stick { path: PathBuf, message: String },
    #[error("{path}: boot menu {menu}: {message}")]
    Menu {
        path: PathBuf,
        menu: String,
        message: String,
    },
}

impl crate::error::Classify for LiveError {
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::BadInput
    }

    fn hint(&self) -> &'static str {
        match self {
            LiveError::Open { source, .. } => crate::error::open_failure_hint(source),
            _ => self.kind().hint(),
        }
    }
}

fn iso_err(path: &Path) -> impl FnOnce(IsoError) -> LiveError + '_ {
    move |source| LiveError::Iso {
        path: path.to_path_buf(),
        source,
    }
}

/// Opens the ISO file as an [`IsoImage`].
pub fn open_iso(path: &Path) -> Result<IsoImage<BufReader<File>>, LiveError> {
    let file = File::open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            LiveError::Missing(path.to_path_buf())
        } else {
            LiveError::Open {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
        return Err(LiveError::Open {
            path: path.to_path_buf(),
            source: std::io::Error::other("is a directory, not an ISO image"),
        });
    }
    IsoImage::open(BufReader::with_capacity(64 * 1024, file)).map_err(iso_err(path))
}

/// Reads a live ISO's structure into a [`LiveImage`]. A source that may also
/// be another live stick is inspected by `live_source::inspect`, above both
/// `source/` and `disk/`.
pub fn inspect_iso(path: &Path) -> Result<LiveImage, LiveError> {
    inspect_opened_iso(path, open_iso(path)?)
}

fn inspect_opened_iso(
    path: &Path,
    mut iso: IsoImage<BufReader<File>>,
) -> Result<LiveImage, LiveError> {
    let live_dir = "LiveOS".to_string();
    let squashfs_entry = iso
        .lookup(&format!("/{live_dir}/squashfs.img"))
        .map_err(iso_err(path))?
        .filter(|e| !e.is_dir)
        .ok_or_else(|| LiveError::NotLive(path.to_path_buf()))?;

    let mut menus = Vec::new();
    let mut menu_errors = Vec::new();
    for (menu_path, is_grub) in [
        ("/isolinux/isolinux.cfg", false),
        ("/syslinux/syslinux.cfg", false),
        ("/EFI/BOOT/grub.cfg", true),
        ("/boot/grub2/grub.cfg", true),
    ] {
        let Some(entry) = iso.lookup(menu_path).map_err(iso_err(path))? else {
            continue;
        };
        if entry.is_dir {
            continue;
        }
        let bytes = iso.read_to_vec(&entry, MENU_LIMIT).map_err(iso_err(path))?;
        parse_menu_file(menu_path, is_grub, &bytes, &mut menus, &mut menu_errors);
    }
    if menus.is_empty() {
        // A distribution's signed GRUB reads its menu from its own directory
        // (Debian's from EFI/debian/), and some ISOs carry no other menu.
        for entry in vendor_grub_menus(&mut iso, path)? {
            let bytes = iso.read_to_vec(&entry, MENU_LIMIT).map_err(iso_err(path))?;
            parse_menu_file(&entry.path, true, &bytes, &mut menus, &mut menu_errors);
        }
    }
    check_menus(path, &menus, &menu_errors)?;
    let (kernels, initrds) = boot_files_of(&menus);
    let mut boot_files = Vec::new();
    let mut warnings: Vec<String> = menu_errors
        .iter()
        .map(|(menu, message)| format!("{menu} not used: {message}"))
        .collect();
    for p in kernels.iter().chain(initrds.iter()) {
        match iso.lookup(p).map_err(iso_err(path))? {
            Some(e) if !e.is_dir => boot_files.push(FileInfo::from(&e)),
            _ => warnings.push(format!("a boot menu names {p}, which is not on the ISO")),
        }
    }
    let has = |iso: &mut IsoImage<_>, p: &str| matches!(iso.lookup(p), Ok(Some(_)));
    let layout = if has(&mut iso, "/boot/x86_64/loader") {
        LayoutKind::Kiwi
    } else if menus.iter().any(|m| m.path.starts_with("/isolinux")) {
        LayoutKind::Isolinux
    } else {
        LayoutKind::GrubOnly
    };
    let efi_files = match iso.lookup("/EFI").map_err(iso_err(path))? {
        Some(_) => iso
            .walk("/EFI")
            .map_err(iso_err(path))?
            .iter()
            .filter(|e| !e.is_dir)
            .map(FileInfo::from)
            .collect(),
        None => Vec::new(),
    };
    let live_files = iso
        .walk(&format!("/{live_dir}"))
        .map_err(iso_err(path))?
        .iter()
        .filter(|e| !e.is_dir)
        .map(FileInfo::from)
        .collect();
    let implanted_md5 = checksum::implanted_md5(iso.application_data()).is_some();
    let label = iso.volume_id().to_string();
    let volume_size = iso.volume_size();

    let (root, compressor) = probe_root(&mut iso, path, &squashfs_entry);
    Ok(LiveImage {
        path: path.to_path_buf(),
        source_kind: SourceKind::Iso,
        label,
        volume_size,
        layout,
        live_dir,
        squashfs: FileInfo::from(&squashfs_entry),
        root,
        compressor,
        menus,
        kernels,
        initrds,
        boot_files,
        warnings,
        efi_files,
        live_files,
        implanted_md5,
        source_overlay: None,
        source_home: None,
        ext4_live: None,
        squashfs_entry,
    })
}

/// Every `EFI/<vendor>/grub.cfg` on the ISO other than EFI/BOOT's, in path order.
fn vendor_grub_menus(
    iso: &mut IsoImage<BufReader<File>>,
    path: &Path,
) -> Result<Vec<IsoEntry>, LiveError> {
    if iso.lookup("/EFI").map_err(iso_err(path))?.is_none() {
        return Ok(Vec::new());
    }
    let mut found: Vec<IsoEntry> = iso
        .walk("/EFI")
        .map_err(iso_err(path))?
        .into_iter()
        .filter(|e| !e.is_dir && is_vendor_grub_cfg(&e.path))
        .collect();
    found.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(found)
}

/// `/EFI/<vendor>/grub.cfg`, one level below EFI/, any case, EFI/BOOT excluded.
pub fn is_vendor_grub_cfg(path: &str) -> bool {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    matches!(parts.as_slice(), [efi, vendor, name]
        if efi.eq_ignore_ascii_case("EFI")
            && !vendor.eq_ignore_ascii_case("BOOT")
            && name.eq_ignore_ascii_case("grub.cfg"))
}

/// Parses one menu file into `menus`, or records why it is unusable: a menu
/// without entries (kiwi's EFI grub.cfg only chains to boot/grub2/grub.cfg)
/// is fine as long as another menu has them.
pub(crate) fn parse_menu_file(
    menu_path: &str,
    is_grub: bool,
    bytes: &[u8],
    menus: &mut Vec<MenuFile>,
    errors: &mut Vec<(String, String)>,
) {
    let text = String::from_utf8_lossy(bytes);
    let cfg_dir = menu_path.rsplit_once('/').map(|(d, _)| d).unwrap_or("/");
    let parsed = if is_grub {
        menu::parse_grub(&text)
    } else {
        menu::parse_isolinux(&text, cfg_dir)
    };
    match parsed {
        Ok(menu) => menus.push(MenuFile {
            path: menu_path.to_string(),
            menu,
        }),
        Err(e) => errors.push((menu_path.to_string(), e.to_string())),
    }
}

/// At least one usable menu, or the first reason there is none.
pub(crate) fn check_menus(
    path: &Path,
    menus: &[MenuFile],
    errors: &[(String, String)],
) -> Result<(), LiveError> {
    if !menus.is_empty() {
        return Ok(());
    }
    Err(match errors.first() {
        Some((menu, message)) => LiveError::Menu {
            path: path.to_path_buf(),
            menu: menu.clone(),
            message: message.clone(),
        },
        None => LiveError::NoMenu(path.to_path_buf()),
    })
}

/// Every kernel and initrd the menus name, each once, in menu order.
pub(crate) fn boot_files_of(menus: &[MenuFile]) -> (Vec<String>, Vec<String>) {
    let mut kernels = Vec::new();
    let mut initrds = Vec::new();
    for e in menus.iter().flat_map(|m| &m.menu.entries) {
        if !kernels.contains(&e.kernel) {
            kernels.push(e.kernel.clone());
        }
        for i in &e.initrds {
            if !initrds.contains(i) {
                initrds.push(i.clone());
            }
        }
    }
    (kernels, initrds)
}

/// Squashfs compressor ids from the superblock (offset 20).
fn probe_root<R: Read + Seek>(
    iso: &mut IsoImage<R>,
    iso_path: &Path,
    squashfs: &IsoEntry,
) -> (RootKind, Option<String>) {
    let mut head = [0u8; 1028];
    let read = {
        let mut reader = iso.open_file(squashfs);
        let mut got = 0;
        while got < head.len() {
            match reader.read(&mut head[got..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        got
    };
    classify_root(&head[..read], iso_path, squashfs)
}

/// The root kind and compressor from the image's first bytes; `unsquashfs`
/// reads `container` in place at the image's offset when it is one extent.
pub(crate) fn classify_root(
    head: &[u8],
    container: &Path,
    squashfs: &IsoEntry,
) -> (RootKind, Option<String>) {
    if head.len() >= 1028
        && u32_at(head, squash::EROFS_MAGIC_OFFSET as usize) == squash::EROFS_MAGIC
    {
        return (RootKind::Erofs, Some("erofs".into()));
    }
    if head.len() < 96 || u32_at(head, 0) != squash::SQUASHFS_MAGIC {
        let magic: Vec<String> = head.iter().take(4).map(|b| format!("{b:02x}")).collect();
        return (
            RootKind::Unrecognised {
                reason: format!(
                    "LiveOS/squashfs.img is neither squashfs nor EROFS (it starts with {})",
                    magic.join(" ")
                ),
            },
            None,
        );
    }
    let compressor = squash::Compressor::from_id(u16_at(head, 20)).map(|c| c.name().to_string());
    let root = match squashfs.extents.as_slice() {
        [extent] => list_nested_root(container, extent.offset),
        _ => RootKind::Unknown {
            reason:
                "squashfs.img is stored in several pieces, so unsquashfs cannot read it in place"
                    .into(),
        },
    };
    (root, compressor)
}

/// Whether the squashfs at `offset` in the ISO holds a nested root filesystem
/// image: looked up in its directory tree (`squash_dir`), or, where that cannot
/// read it (an LZO image, or one it finds damaged), by `unsquashfs`.
pub(crate) fn list_nested_root(iso_path: &Path, offset: u64) -> RootKind {
    use std::os::unix::fs::FileExt;
    let looked_up = std::fs::File::open(iso_path)
        .map_err(crate::squash_dir::DirError::Io)
        .and_then(|file| {
            let mut image = crate::squash_dir::SquashDirs::open(move |at, buf: &mut [u8]| {
                file.read_exact_at(buf, offset + at)
            })?;
            for candidate in NESTED_ROOT_IMAGES {
                if image.lookup(candidate)?.is_some() {
                    return Ok(RootKind::Nested {
                        image: candidate.to_string(),
                    });
                }
            }
            Ok(RootKind::Flat)
        });
    looked_up.unwrap_or_else(|_| list_nested_root_with_unsquashfs(iso_path, offset))
}

/// Where a live ISO's squashfs keeps a nested root image, in the order dracut tries.
const NESTED_ROOT_IMAGES: [&str; 2] = ["LiveOS/rootfs.img", "LiveOS/ext3fs.img"];

/// Asks `unsquashfs` (reading the ISO in place at the image's offset) whether
/// the squashfs holds a nested root filesystem image.
fn list_nested_root_with_unsquashfs(iso_path: &Path, offset: u64) -> RootKind {
    let exe = match crate::tools::find_program(&crate::tools::UNSQUASHFS) {
        Ok(exe) => exe,
        Err(missing) => {
            return RootKind::Unknown {
                reason: missing.to_string(),
            };
        }
    };
    let output = Command::new(&exe)
        .arg("-o")
        .arg(offset.to_string())
        .arg("-l")
        .arg(iso_path)
        .output();
    let output = match output {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            return RootKind::Unknown {
                reason: format!(
                    "unsquashfs could not list the image: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
            };
        }
        Err(e) => {
            return RootKind::Unknown {
                reason: format!("could not run {}: {e}", exe.display()),
            };
        }
    };
    let listing = String::from_utf8_lossy(&output.stdout);
    for candidate in NESTED_ROOT_IMAGES {
        if listing
            .lines()
            .any(|l| l.trim_end() == format!("squashfs-root/{candidate}"))
        {
            return RootKind::Nested {
                image: candidate.to_string(),
            };
        }
    }
    RootKind::Flat
}

impl LiveImage {
    /// The menu the stick's configs are rendered from: isolinux when the ISO
    /// has it (it names every BIOS entry), else the EFI GRUB menu.
    pub fn primary_menu(&self) -> &MenuFile {
        self.menus
            .iter()
            .find(|m| m.path.ends_with("isolinux.cfg") || m.path.ends_with("syslinux.cfg"))
            .or_else(|| self.menus.iter().find(|m| m.path == "/EFI/BOOT/grub.cfg"))
            .unwrap_or(&self.menus[0])
    }

    /// The EFI GRUB menu when the ISO has one (its serial/terminal preamble and
    /// entries are what UEFI users saw), else the primary menu.
    pub fn efi_menu(&self) -> &MenuFile {
        self.menus
            .iter()
            .find(|m| m.path == "/EFI/BOOT/grub.cfg")
            .unwrap_or_else(|| self.primary_menu())
    }

    pub fn squashfs_entry(&self) -> &IsoEntry {
        &self.squashfs_entry
    }

    /// Seeks a reader of the ISO to the squashfs image's first byte.
    pub fn squashfs_offset(&self) -> Option<u64> {
        self.squashfs_entry.extents.first().map(|e| e.offset)
    }
}

/// Reads `len` bytes at `offset` of the ISO file (for small probes).
pub fn read_at(path: &Path, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::is_vendor_grub_cfg;

    #[test]
    fn vendor_grub_menus_are_one_level_below_efi() {
        assert!(is_vendor_grub_cfg("/EFI/debian/grub.cfg"));
        assert!(is_vendor_grub_cfg("/efi/fedora/GRUB.CFG"));
        assert!(!is_vendor_grub_cfg("/EFI/BOOT/grub.cfg"));
        assert!(!is_vendor_grub_cfg("/EFI/grub.cfg"));
        assert!(!is_vendor_grub_cfg("/EFI/fedora/x86_64/grub.cfg"));
        assert!(!is_vendor_grub_cfg("/boot/fedora/grub.cfg"));
    }
}
