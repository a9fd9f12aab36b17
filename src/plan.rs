//! The write plan: everything `livestick write` will do, as plain data.
//!
//! Planning is a pure function of the [`LiveImage`], the target's probe (and,
//! when installing into an existing stick, what its FAT filesystem holds) and
//! the options. `--dry-run` prints it; `apply` executes it. Every check on the
//! user's input happens here, before the first byte is written.

use std::path::PathBuf;

use serde::Serialize;
use thiserror::Error;

use crate::boot::cmdline::{DracutNames, KernelArgs, OverlayBoot, StickArgs};
use crate::boot::render::{self, RenderParams};
use crate::disk::fat::{self, FAT_MAX_FILE};
use crate::disk::partition::{self, PartitionLayout, TableKind};
use crate::disk::target::{TargetKind, TargetProbe};
use crate::layout;
use crate::size::{MIB, human, mib_ceil};
use crate::source::live::{LiveImage, RootKind};

/// Bytes reserved for directories, configs and the SYSLINUX files.
const BOOT_SLACK: u64 = 2 * MIB;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FormatMode {
    /// Format when the target has no usable FAT partition (new or empty).
    Auto,
    /// `--format`: always create a new partition table and filesystem.
    Always,
    /// `--noformat`/existing stick: never format.
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HomeEncryption {
    None,
    Luks,
}

/// What the user asked for.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    pub format: FormatMode,
    pub table: TableKind,
    pub label: Option<String>,
    pub live_dir: String,
    pub overlay_size: Option<u64>,
    pub overlayfs: bool,
    /// Keep an existing overlay but empty it (`--reset-overlay`).
    pub reset_overlay: bool,
    /// Only rewrite boot configs and the boot loader (`--skipcopy`).
    pub skipcopy: bool,
    /// Delete an existing home.img (`--delete-home`).
    pub delete_home: bool,
    /// Add this image beside the stick's existing one(s) (`--multi`): its own
    /// live directory, boot files under it, and a menu chained from the main one.
    pub multi: bool,
    /// Carry the source stick's overlay over (`--copy-overlay`).
    pub copy_overlay: bool,
    /// Carry the source stick's home.img over (`--copy-home`).
    pub copy_home: bool,
    pub dracut: DracutNames,
    pub home_size: Option<u64>,
    pub home_encryption: HomeEncryption,
    pub swap_size: Option<u64>,
    pub extra_args: KernelArgs,
    pub timeout_secs: Option<u32>,
    /// SYSLINUX TOTALTIMEOUT (`--total-timeout`).
    pub total_timeout_secs: Option<u32>,
    /// `--format SIZE`: the FAT partition's size instead of the whole disk.
    pub partition_size: Option<u64>,
    /// An anaconda updates image to copy and name with `inst.updates=`.
    pub updates: Option<PathBuf>,
    /// A kickstart file to copy and name with `inst.ks=`.
    pub kickstart: Option<PathBuf>,
    pub volume_id: u32,
    pub bios: bool,
}

/// What is already on the target's FAT partition (no `--format`).
#[derive(Debug, Clone, Serialize)]
pub struct ExistingFs {
    pub table: TableKind,
    pub partition_start: u64,
    pub partition_len: u64,
    pub label: String,
    pub volume_id: u32,
    pub cluster_size: u64,
    pub free_bytes: u64,
    /// Every file on the filesystem (path, size), to see what a write
    /// replaces, keeps or deletes.
    pub files: Vec<(String, u64)>,
    /// The top-level boot menus as they are (`--multi` extends them).
    pub syslinux_cfg: Option<String>,
    pub grub_cfg: Option<String>,
}

impl ExistingFs {
    fn size_of(&self, path: &str) -> Option<u64> {
        self.files
            .iter()
            .find(|(p, _)| p.eq_ignore_ascii_case(path))
            .map(|(_, s)| *s)
    }
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case", tag = "from")]
pub enum CopySource {
    Iso { path: String },
    Host { path: PathBuf },
}

#[derive(Debug, Clone, Serialize)]
pub struct CopyStep {
    pub source: CopySource,
    pub dest: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConfigStep {
    pub dest: String,
    pub content: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct OverlayStep {
    pub path: String,
    pub size: u64,
    pub kind: OverlayBoot,
    /// Why this kind: the root image's layout, or `--overlayfs`.
    pub why: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct HomeStep {
    pub path: String,
    pub size: u64,
    pub encryption: HomeEncryption,
}

/// An overlay already on the stick that the write keeps.
#[derive(Debug, Clone, Serialize)]
pub struct KeptOverlay {
    pub from: String,
    pub to: String,
    pub size: u64,
    /// Emptied (header zeroed): required whenever the root image changes,
    /// because its blocks describe changes to the old image.
    pub reset: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct SwapStep {
    pub path: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetSummary {
    pub path: PathBuf,
    pub kind: TargetKind,
    pub exists: bool,
    pub size_before: u64,
    pub size: u64,
}

/// Everything `apply` will do.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub source: PathBuf,
    pub source_label: String,
    pub target: TargetSummary,
    /// A new partition table and filesystem, or `None` to install into the existing one.
    pub format: Option<PartitionLayout>,
    pub partition_start: u64,
    pub partition_len: u64,
    pub table: TableKind,
    pub label: String,
    pub fs_uuid: String,
    pub volume_id: u32,
    pub live_dir: String,
    pub copies: Vec<CopyStep>,
    pub configs: Vec<ConfigStep>,
    pub overlay: Option<OverlayStep>,
    pub kept_overlay: Option<KeptOverlay>,
    pub home: Option<HomeStep>,
    /// An existing home.img that stays as it is.
    pub kept_home: Option<String>,
    pub swap: Option<SwapStep>,
    /// Files removed from the existing filesystem before writing.
    pub deletes: Vec<String>,
    /// New FAT label for an existing filesystem.
    pub relabel: Option<String>,
    /// Install SYSLINUX and MBR boot code for BIOS boot.
    pub bios: bool,
    pub uefi: bool,
    /// Bytes of files copied; persistence adds only its metadata on top.
    pub bytes_to_write: u64,
    pub space_available: u64,
    pub space_needed: u64,
    pub free_after: u64,
    pub notes: Vec<String>,
}

#[derive(Debug, Error)]
pub enum PlanError {
    #[error(transparent)]
    Fat(#[from] fat::FatError),
    #[error(transparent)]
    Partition(#[from] partition::PartitionError),
    #[error(
        "the target is too small by {short_mib} MiB: this write needs {needed_mib} MiB but the partition holds {available_mib} MiB; use a larger stick or --size, or smaller --overlay-size-mb/--home-size-mb"
    )]
    TooSmall {
        needed_mib: u64,
        available_mib: u64,
        short_mib: u64,
    },
    #[error(
        "--{option} {mib} MiB is over the FAT32 limit of 4095 MiB for one file; choose at most 4095"
    )]
    OverFatLimit { option: &'static str, mib: u64 },
    #[error("--{option} must be at least 1 MiB")]
    ZeroSize { option: &'static str },
    #[error(
        "{0} is larger than 4 GiB and cannot be stored on FAT32; this ISO cannot be written in file mode"
    )]
    SourceFileTooLarge(String),
    #[error(
        "--{0} was given but the source stick has no {1}; drop --{0} (or use --{2} to make a new one)"
    )]
    NothingToCopy(&'static str, &'static str, &'static str),
    #[error("--{0} and --{1} both say what the new {2} should be; give one of them")]
    Conflicting(&'static str, &'static str, &'static str),
    #[error(
        "--partition-size-mb {asked_mib} is more than the target holds ({max_mib} MiB after the partition table); choose at most {max_mib}"
    )]
    PartitionTooLarge { asked_mib: u64, max_mib: u64 },
    #[error("--partition-size-mb applies to a new partition table only; add --format")]
    PartitionSizeNeedsFormat,
    #[error(
        "--overlayfs needs --overlay-size-mb N: on FAT the OverlayFS upper layer lives in an ext4 image file of that size"
    )]
    OverlayFsNeedsSize,
    #[error(
        "--multi adds an image beside the one in /{0}: give it its own directory with --livedir NAME"
    )]
    MultiSameDir(String),
    #[error("{0} works on an existing stick only; the target is new or being formatted")]
    NeedsExisting(&'static str),
    #[error(
        "{path} already exists on the stick; add --delete-home to replace it (its files are lost) or drop --home-size-mb to keep it"
    )]
    HomeExists { path: String },
    #[error("invalid --livedir {0:?}: use a single directory name of letters, digits, '_' or '-'")]
    InvalidLiveDir(String),
    #[error("rendering the boot configuration: {0}")]
    Render(String),
}

/// `--extra-kernel-args` plus the installer arguments that name the copied
/// updates image and kickstart on this stick (by its UUID, as anaconda's
/// `hd:` syntax takes it).
fn installer_args(opts: &WriteOptions, fs_uuid: &str, dir: &str) -> KernelArgs {
    let mut args = opts.extra_args.clone();
    if opts.updates.is_some() {
        args.replace(crate::boot::cmdline::KernelArg::pair(
            "inst.updates",
            format!("hd:UUID={fs_uuid}:/{dir}/updates.img"),
        ));
    }
    if opts.kickstart.is_some() {
        args.replace(crate::boot::cmdline::KernelArg::pair(
            "inst.ks",
            format!("hd:UUID={fs_uuid}:/{dir}/ks.cfg"),
        ));
    }
    args
}

/// The menu with every kernel and initrd path under `prefix` (an additional
/// image's directory for `--multi`).
fn with_prefix(menu: &crate::boot::menu::BootMenu, prefix: &str) -> crate::boot::menu::BootMenu {
    let mut menu = menu.clone();
    if !prefix.is_empty() {
        for e in &mut menu.entries {
            e.kernel = format!("{prefix}{}", e.kernel);
            for i in &mut e.initrds {
                *i = format!("{prefix}{i}");
            }
        }
    }
    menu
}

/// An additional image's own SYSLINUX menu: modules come from /syslinux (where
/// ldlinux is), and one entry leads back to the main menu.
fn multi_syslinux_own(rendered: &str) -> String {
    let mut text = rendered.replace("\nUI menu.c32", "\nUI /syslinux/menu.c32");
    text.push_str(
        "\nLABEL multimain\n  MENU LABEL Return to the main menu\n  CONFIG /syslinux/syslinux.cfg\n",
    );
    text
}

/// The stick's main SYSLINUX menu with an entry leading to the image in
/// `dir`, placed before the first entry (once, however often it is rewritten).
fn multi_syslinux_main(main: &str, dir: &str, title: &str) -> String {
    let chain = format!("CONFIG /{dir}/syslinux/syslinux.cfg");
    if main.contains(&chain) {
        return main.to_string();
    }
    let block = format!(
        "LABEL {dir}\n  MENU LABEL Go to {} ({dir})\n  {chain}\n\n",
        title.replace(['\n', '\r'], " ")
    );
    let mut out = String::new();
    let mut inserted = false;
    for line in main.split_inclusive('\n') {
        if !inserted && line.trim_start().to_ascii_uppercase().starts_with("LABEL ") {
            out.push_str(&block);
            inserted = true;
        }
        out.push_str(line);
    }
    if !inserted {
        out.push('\n');
        out.push_str(&block);
    }
    out
}

/// UEFI: the new image's entries first, then the stick's previous menu
/// without entries that boot from `dir` (a re-install replaces them). GRUB
/// runs the file top to bottom, so the repeated settings are harmless.
fn multi_grub(new: &str, previous: &str, dir: &str) -> String {
    let marker = format!(" /{dir}/");
    let mut kept = String::new();
    let mut block = String::new();
    let mut depth = 0usize;
    for line in previous.split_inclusive('\n') {
        let trimmed = line.trim_start();
        if depth == 0 && trimmed.starts_with("menuentry ") {
            block.clear();
        }
        if depth > 0 || trimmed.starts_with("menuentry ") {
            block.push_str(line);
            depth += line.matches('{').count();
            depth = depth.saturating_sub(line.matches('}').count());
            if depth == 0 {
                if !block.contains(&marker) {
                    kept.push_str(&block);
                }
                block.clear();
            }
            continue;
        }
        kept.push_str(line);
    }
    format!("{new}\n# Images installed before (livestick --multi)\n{kept}")
}

/// Rounds a file size up to whole clusters, as FAT allocates it.
fn on_disk(size: u64, cluster: u64) -> u64 {
    size.div_ceil(cluster).max(1) * cluster
}

/// Usable data bytes of a FAT32 filesystem of `len` bytes with `cluster`-byte
/// clusters: what is left after the reserved sectors and two FATs.
fn fat32_data_bytes(len: u64, cluster: u64) -> u64 {
    let reserved = 32 * 512;
    let clusters = len / cluster;
    let fat_bytes = (clusters + 2) * 4;
    let fat_bytes = fat_bytes.div_ceil(512) * 512;
    len.saturating_sub(reserved + 2 * fat_bytes)
}

fn check_size(option: &'static str, size: Option<u64>) -> Result<(), PlanError> {
    if let Some(size) = size {
        if size < MIB {
            return Err(PlanError::ZeroSize { option });
        }
        if size > FAT_MAX_FILE {
            return Err(PlanError::OverFatLimit {
                option,
                mib: size / MIB,
            });
        }
    }
    Ok(())
}

/// Builds the plan. `existing` is `Some` when the target already has a FAT
/// partition and the user did not ask for `--format`.
pub fn plan_write(
    live: &LiveImage,
    target: &TargetProbe,
    target_size: u64,
    existing: Option<ExistingFs>,
    opts: &WriteOptions,
    syslinux_modules: Option<&std::path::Path>,
) -> Result<Plan, PlanError> {
    check_size("overlay-size-mb", opts.overlay_size)?;
    check_size("home-size-mb", opts.home_size)?;
    check_size("swap-size-mb", opts.swap_size)?;
    if opts.live_dir.is_empty()
        || !opts
            .live_dir
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(PlanError::InvalidLiveDir(opts.live_dir.clone()));
    }
    if let Some(label) = &opts.label {
        fat::validate_label(label)?;
    }
    if opts.overlayfs && opts.overlay_size.is_none() && !opts.copy_overlay && existing.is_none() {
        return Err(PlanError::OverlayFsNeedsSize);
    }
    // A flat root (the tree directly in squashfs.img or an EROFS image) has no block
    // device a device-mapper snapshot could sit on: only OverlayFS can work, so it is
    // chosen without a flag. A nested rootfs.img keeps dm-snapshot unless asked.
    let flat_root = matches!(live.root, RootKind::Flat | RootKind::Erofs);
    let overlayfs = opts.overlayfs || flat_root;
    let overlay_why = if opts.overlayfs {
        "--overlayfs was given".to_string()
    } else if flat_root {
        format!(
            "the root is directly in {} ({}), where a device-mapper snapshot cannot work",
            live.squashfs.path,
            if live.root == RootKind::Erofs {
                "EROFS"
            } else {
                "squashfs"
            }
        )
    } else {
        "the root is LiveOS/rootfs.img inside squashfs.img: a device-mapper snapshot of it"
            .to_string()
    };

    let (format, table, part_start, part_len, label, volume_id, cluster, available) =
        match &existing {
            Some(fs) => (
                None,
                fs.table,
                fs.partition_start,
                fs.partition_len,
                opts.label.clone().unwrap_or_else(|| fs.label.clone()),
                fs.volume_id,
                fs.cluster_size,
                fs.free_bytes,
            ),
            None => {
                let mut layout = partition::layout_single(target_size, opts.table)?;
                if let Some(size) = opts.partition_size {
                    if size > layout.len {
                        return Err(PlanError::PartitionTooLarge {
                            asked_mib: size / MIB,
                            max_mib: layout.len / MIB,
                        });
                    }
                    layout.len = size / MIB * MIB;
                }
                let cluster = fat::cluster_size_for(layout.len)? as u64;
                let available = fat32_data_bytes(layout.len, cluster);
                (
                    Some(layout.clone()),
                    opts.table,
                    layout.start,
                    layout.len,
                    opts.label.clone().unwrap_or_else(|| "LIVE".to_string()),
                    opts.volume_id,
                    cluster,
                    available,
                )
            }
        };
    let fs_uuid = fat::format_volume_id(volume_id);
    let dir = &opts.live_dir;
    if existing.is_some() && opts.partition_size.is_some() {
        return Err(PlanError::PartitionSizeNeedsFormat);
    }
    if existing.is_none() {
        for (flag, name) in [
            (opts.multi, "--multi"),
            (opts.reset_overlay, "--reset-overlay"),
            (opts.skipcopy, "--skipcopy"),
            (opts.delete_home, "--delete-home"),
        ] {
            if flag {
                return Err(PlanError::NeedsExisting(name));
            }
        }
    }

    // --multi needs a stick with a boot menu to chain from; like
    // livecd-iso-to-disk, without one it is a plain install.
    let multi = opts.multi
        && existing
            .as_ref()
            .is_some_and(|fs| fs.syslinux_cfg.is_some() || fs.grub_cfg.is_some());
    if multi && dir.eq_ignore_ascii_case(&live.live_dir) {
        return Err(PlanError::MultiSameDir(dir.clone()));
    }
    // Boot files of an additional image live under its directory, so two
    // images' kernels never collide.
    let boot_prefix = if multi {
        format!("/{dir}")
    } else {
        String::new()
    };
    let mut copies = Vec::new();
    let add_iso = |copies: &mut Vec<CopyStep>, src: &str, dest: String, size: u64| {
        if !copies.iter().any(|c: &CopyStep| c.dest == dest) {
            copies.push(CopyStep {
                source: CopySource::Iso {
                    path: src.to_string(),
                },
                dest,
                size,
            });
        }
    };
    for f in &live.live_files {
        let rel = f
            .path
            .strip_prefix(&format!("/{}/", live.live_dir))
            .unwrap_or(&f.path);
        add_iso(&mut copies, &f.path, format!("/{dir}/{rel}"), f.size);
    }
    let keep_efi_loaders = multi
        && existing.as_ref().is_some_and(|fs| {
            fs.files
                .iter()
                .any(|(p, _)| p.eq_ignore_ascii_case("/EFI/BOOT/BOOTX64.EFI"))
        });
    for f in &live.efi_files {
        // The first image's loaders stay: they boot the combined menu.
        if f.path.eq_ignore_ascii_case("/EFI/BOOT/grub.cfg") || keep_efi_loaders {
            continue;
        }
        add_iso(&mut copies, &f.path, f.path.clone(), f.size);
    }
    for f in &live.boot_files {
        add_iso(
            &mut copies,
            &f.path,
            format!("{boot_prefix}{}", f.path),
            f.size,
        );
    }
    if opts.skipcopy {
        copies.clear();
    }
    // Persistence carried over from a source stick, renamed for the new
    // label and UUID so the live system finds it.
    let mut copied_overlay = None;
    if opts.copy_overlay {
        if opts.overlay_size.is_some() {
            return Err(PlanError::Conflicting(
                "copy-overlay",
                "overlay-size-mb",
                "overlay",
            ));
        }
        let src = live
            .source_overlay
            .as_ref()
            .ok_or(PlanError::NothingToCopy(
                "copy-overlay",
                "overlay",
                "overlay-size-mb",
            ))?;
        let dest = layout::overlay_path(dir, &label, &fs_uuid);
        add_iso(&mut copies, &src.path, dest.clone(), src.size);
        copied_overlay = Some(dest);
    }
    if opts.copy_home {
        if opts.home_size.is_some() {
            return Err(PlanError::Conflicting("copy-home", "home-size-mb", "home"));
        }
        let src = live.source_home.as_ref().ok_or(PlanError::NothingToCopy(
            "copy-home",
            "home.img",
            "home-size-mb",
        ))?;
        add_iso(
            &mut copies,
            &src.path,
            format!("/{dir}/{}", layout::HOME),
            src.size,
        );
    }
    for c in &copies {
        if c.size > FAT_MAX_FILE {
            return Err(PlanError::SourceFileTooLarge(c.dest.clone()));
        }
    }
    let mut notes = Vec::new();
    if opts.bios {
        match syslinux_modules {
            Some(modules) => {
                for module in crate::boot::syslinux::MENU_MODULES {
                    let path = modules.join(module);
                    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                    copies.push(CopyStep {
                        source: CopySource::Host { path },
                        dest: format!("/syslinux/{module}"),
                        size,
                    });
                }
            }
            None => notes.push(
                "SYSLINUX not found on this host: the stick will not boot in BIOS mode".into(),
            ),
        }
    }

    for (host, name) in [(&opts.updates, "updates.img"), (&opts.kickstart, "ks.cfg")] {
        if let Some(path) = host {
            let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            copies.push(CopyStep {
                source: CopySource::Host { path: path.clone() },
                dest: format!("/{dir}/{name}"),
                size,
            });
        }
    }
    let overlay_path = layout::overlay_path(dir, &label, &fs_uuid);
    let home_path = format!("/{dir}/home.img");
    // What the existing stick holds that this write keeps, renames or deletes.
    let mut deletes = Vec::new();
    let mut kept_overlay = None;
    let mut kept_home = None;
    let mut relabel = None;
    if let Some(fs) = &existing {
        if label != fs.label {
            relabel = Some(label.clone());
        }
        let live_prefix = format!("/{dir}/").to_ascii_lowercase();
        let old_overlays: Vec<&(String, u64)> = fs
            .files
            .iter()
            .filter(|(p, _)| {
                let lower = p.to_ascii_lowercase();
                lower.starts_with(&live_prefix)
                    && lower[live_prefix.len()..].starts_with("overlay-")
            })
            .collect();
        // The overlay dracut used until now: named for the current label/UUID.
        let current = layout::overlay_path(dir, &fs.label, &fs_uuid);
        let current = old_overlays
            .iter()
            .find(|(p, _)| p.eq_ignore_ascii_case(&current))
            .or(old_overlays.first())
            .map(|(p, s)| (p.clone(), *s));
        let new_overlay = opts.overlay_size.is_some() || opts.copy_overlay;
        match (&current, new_overlay) {
            (Some((path, size)), false) => {
                kept_overlay = Some(KeptOverlay {
                    from: path.clone(),
                    to: overlay_path.clone(),
                    size: *size,
                    reset: opts.reset_overlay || !opts.skipcopy,
                });
            }
            (Some((path, _)), true) => deletes.push(path.clone()),
            (None, _) => {}
        }
        for (path, _) in &old_overlays {
            if current.as_ref().is_none_or(|(c, _)| c != path) {
                deletes.push(path.clone());
            }
        }
        if fs.size_of(&home_path).is_some() {
            if opts.delete_home {
                deletes.push(home_path.clone());
            } else if opts.home_size.is_some() || opts.copy_home {
                return Err(PlanError::HomeExists { path: home_path });
            } else {
                kept_home = Some(home_path.clone());
            }
        }
        // Old live files the new ISO does not have (e.g. osmin.img) would
        // only waste space and confuse the next tool.
        if !opts.skipcopy {
            for (path, _) in &fs.files {
                let lower = path.to_ascii_lowercase();
                if lower.starts_with(&live_prefix)
                    && !copies.iter().any(|c| c.dest.eq_ignore_ascii_case(path))
                    && !old_overlays.iter().any(|(p, _)| p == path)
                    && !path.eq_ignore_ascii_case(&home_path)
                    && !path.eq_ignore_ascii_case(&format!("/{dir}/swap.img"))
                {
                    deletes.push(path.clone());
                }
            }
        }
    }
    let overlay_kind = match (opts.overlay_size, overlayfs, &kept_overlay) {
        _ if copied_overlay.is_some() && !overlayfs => OverlayBoot::DmSnapshot,
        (None, _, None) if copied_overlay.is_none() => OverlayBoot::None,
        (_, true, _) => OverlayBoot::OverlayFs,
        _ => OverlayBoot::DmSnapshot,
    };
    let overlay = opts.overlay_size.map(|size| OverlayStep {
        path: overlay_path.clone(),
        size,
        kind: overlay_kind,
        why: overlay_why.clone(),
    });
    let home = opts.home_size.map(|size| HomeStep {
        path: home_path.clone(),
        size,
        encryption: opts.home_encryption,
    });
    let swap = opts.swap_size.map(|size| SwapStep {
        path: format!("/{dir}/swap.img"),
        size,
    });

    let stick = StickArgs {
        fs_uuid: fs_uuid.clone(),
        live_dir: dir.clone(),
        overlay: overlay_kind,
        dracut: opts.dracut,
        extra: installer_args(opts, &fs_uuid, dir),
    };
    let primary = live.primary_menu();
    let params = RenderParams {
        title: primary
            .menu
            .title
            .clone()
            .unwrap_or_else(|| live.label.clone()),
        label: label.clone(),
        fs_uuid: fs_uuid.clone(),
        timeout_secs: opts
            .timeout_secs
            .or(primary.menu.timeout_secs)
            .unwrap_or(10),
        total_timeout_secs: opts.total_timeout_secs,
        stick,
    };
    let mut configs = Vec::new();
    let primary_menu = with_prefix(&primary.menu, &boot_prefix);
    let efi_menu = with_prefix(&live.efi_menu().menu, &boot_prefix);
    if opts.bios {
        let text = render::render_syslinux(&primary_menu, &params)
            .map_err(|e| PlanError::Render(e.to_string()))?;
        match existing.as_ref().and_then(|fs| fs.syslinux_cfg.as_ref()) {
            Some(main) if multi => {
                configs.push(ConfigStep {
                    dest: format!("/{dir}/syslinux/syslinux.cfg"),
                    content: multi_syslinux_own(&text),
                });
                configs.push(ConfigStep {
                    dest: "/syslinux/syslinux.cfg".into(),
                    content: multi_syslinux_main(main, dir, &params.title),
                });
            }
            _ => configs.push(ConfigStep {
                dest: "/syslinux/syslinux.cfg".into(),
                content: text,
            }),
        }
    }
    let uefi = live
        .efi_files
        .iter()
        .any(|f| f.path.to_ascii_uppercase().starts_with("/EFI/BOOT/BOOT"));
    if uefi {
        let mut text = render::render_grub(&efi_menu, &params)
            .map_err(|e| PlanError::Render(e.to_string()))?;
        if multi && let Some(previous) = existing.as_ref().and_then(|fs| fs.grub_cfg.as_ref()) {
            text = multi_grub(&text, previous, dir);
        }
        if live.menus.iter().any(|m| m.path == "/boot/grub2/grub.cfg") {
            configs.push(ConfigStep {
                dest: "/boot/grub2/grub.cfg".into(),
                content: text.clone(),
            });
        }
        configs.push(ConfigStep {
            dest: "/EFI/BOOT/grub.cfg".into(),
            content: text,
        });
    } else {
        notes.push("the ISO has no EFI/BOOT loader: the stick will not boot in UEFI mode".into());
    }

    // Persistence is allocated, not written: only the copies cost the bus their
    // size; overlay, home and swap add their metadata (a few MiB) on top.
    let data_bytes: u64 = copies.iter().map(|c| c.size).sum::<u64>();
    let space_needed: u64 = copies
        .iter()
        .map(|c| on_disk(c.size, cluster))
        .chain(
            configs
                .iter()
                .map(|c| on_disk(c.content.len() as u64, cluster)),
        )
        .chain(overlay.iter().map(|o| on_disk(o.size, cluster)))
        .chain(home.iter().map(|h| on_disk(h.size, cluster)))
        .chain(swap.iter().map(|s| on_disk(s.size, cluster)))
        .sum::<u64>()
        + BOOT_SLACK;
    // Space that comes back on an existing stick: files this write replaces
    // (same path) or deletes.
    let available = match &existing {
        Some(fs) => {
            let reclaimed: u64 = fs
                .files
                .iter()
                .filter(|(p, _)| {
                    deletes.iter().any(|d| d.eq_ignore_ascii_case(p))
                        || copies.iter().any(|c| c.dest.eq_ignore_ascii_case(p))
                        || configs.iter().any(|c| c.dest.eq_ignore_ascii_case(p))
                        || overlay
                            .as_ref()
                            .is_some_and(|o| o.path.eq_ignore_ascii_case(p))
                        || swap
                            .as_ref()
                            .is_some_and(|s| s.path.eq_ignore_ascii_case(p))
                })
                .map(|(_, s)| on_disk(*s, cluster))
                .sum();
            available + reclaimed
        }
        None => available,
    };
    if space_needed > available {
        let needed_mib = mib_ceil(space_needed);
        let available_mib = available / MIB;
        return Err(PlanError::TooSmall {
            needed_mib,
            available_mib,
            short_mib: needed_mib.saturating_sub(available_mib).max(1),
        });
    }
    if target.kind == TargetKind::ImageFile && !target.exists {
        notes.push(format!("creates the image file ({})", human(target_size)));
    } else if target.kind == TargetKind::ImageFile && target_size > target.size {
        notes.push(format!(
            "grows the image file from {} to {}",
            human(target.size),
            human(target_size)
        ));
    }
    Ok(Plan {
        source: live.path.clone(),
        source_label: live.label.clone(),
        target: TargetSummary {
            path: target.path.clone(),
            kind: target.kind,
            exists: target.exists,
            size_before: target.size,
            size: target_size,
        },
        format,
        partition_start: part_start,
        partition_len: part_len,
        table,
        label,
        fs_uuid,
        volume_id,
        live_dir: dir.clone(),
        copies,
        configs,
        overlay,
        kept_overlay,
        home,
        kept_home,
        swap,
        deletes,
        relabel,
        bios: opts.bios,
        uefi,
        bytes_to_write: data_bytes,
        space_available: available,
        space_needed,
        free_after: available - space_needed,
        notes,
    })
}

impl Plan {
    /// The plan as people read it (`--dry-run`).
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let t = &self.target;
        out.push_str(&format!(
            "Plan: {} ({}) -> {} ({:?}, {})\n",
            self.source.display(),
            self.source_label,
            t.path.display(),
            t.kind,
            human(t.size)
        ));
        match &self.format {
            Some(layout) => out.push_str(&format!(
                "  partition table  new {} ; partition 1 FAT32 at {} MiB, {} , label {}, UUID {}, boot flag\n",
                layout.table,
                layout.start / MIB,
                human(layout.len),
                self.label,
                self.fs_uuid
            )),
            None => out.push_str(&format!(
                "  partition        existing {} partition at {} MiB, {}, label {}, UUID {} (files outside /{} and the boot dirs are kept)\n",
                self.table,
                self.partition_start / MIB,
                human(self.partition_len),
                self.label,
                self.fs_uuid,
                self.live_dir
            )),
        }
        out.push_str("  files\n");
        for c in &self.copies {
            let from = match &c.source {
                CopySource::Iso { path } => format!("iso:{path}"),
                CopySource::Host { path } => format!("host:{}", path.display()),
            };
            out.push_str(&format!(
                "    {:>10}  {}  <- {}\n",
                human(c.size),
                c.dest,
                from
            ));
        }
        out.push_str("  configs\n");
        for c in &self.configs {
            out.push_str(&format!(
                "    {:>10}  {}\n",
                human(c.content.len() as u64),
                c.dest
            ));
        }
        if let Some(o) = &self.overlay {
            out.push_str(&format!(
                "  overlay          {} ({}, {:?}: {})\n",
                o.path,
                human(o.size),
                o.kind,
                o.why
            ));
        }
        if let Some(k) = &self.kept_overlay {
            out.push_str(&format!(
                "  overlay          keeps {} as {} ({}){}\n",
                k.from,
                k.to,
                human(k.size),
                if k.reset {
                    ", emptied: the root image changes"
                } else {
                    ""
                }
            ));
        }
        if let Some(h) = &self.kept_home {
            out.push_str(&format!("  home             keeps {h}\n"));
        }
        for d in &self.deletes {
            out.push_str(&format!("  delete           {d}\n"));
        }
        if let Some(l) = &self.relabel {
            out.push_str(&format!("  relabel          {l}\n"));
        }
        if let Some(h) = &self.home {
            out.push_str(&format!(
                "  home             {} ({}, {:?})\n",
                h.path,
                human(h.size),
                h.encryption
            ));
        }
        if let Some(s) = &self.swap {
            out.push_str(&format!(
                "  swap             {} ({})\n",
                s.path,
                human(s.size)
            ));
        }
        out.push_str(&format!(
            "  boot             BIOS: {}   UEFI: {}\n",
            if self.bios {
                "SYSLINUX + MBR code"
            } else {
                "no"
            },
            if self.uefi { "EFI/BOOT" } else { "no" }
        ));
        out.push_str(&format!(
            "  space            {} needed of {}, {} free after\n",
            human(self.space_needed),
            human(self.space_available),
            human(self.free_after)
        ));
        for n in &self.notes {
            out.push_str(&format!("  note: {n}\n"));
        }
        out
    }
}
