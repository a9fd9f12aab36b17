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
use crate::source::live::{LiveImage, RootKind, SourceKind};

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

impl std::fmt::Display for HomeEncryption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HomeEncryption::None => "unencrypted",
            HomeEncryption::Luks => "LUKS2-encrypted",
        })
    }
}

/// What checks the source before anything is written (JSON `iso_check`). A
/// source nothing checks must not look like one whose check was turned off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IsoCheck {
    /// Nothing can: the ISO carries no implanted MD5, or the source is a stick.
    None,
    /// The MD5 implanted in the ISO (what checkisomd5 checks).
    ImplantedMd5,
    /// There is an implanted MD5, and `--noverify` turned its check off.
    Skipped,
}

impl IsoCheck {
    /// The check `write` runs on `live` before writing.
    pub fn for_source(live: &LiveImage, noverify: bool) -> IsoCheck {
        if live.source_kind != SourceKind::Iso || !live.implanted_md5 {
            IsoCheck::None
        } else if noverify {
            IsoCheck::Skipped
        } else {
            IsoCheck::ImplantedMd5
        }
    }

    /// The plan's note when the source goes unchecked.
    pub fn note(self, live: &LiveImage) -> Option<String> {
        match self {
            IsoCheck::ImplantedMd5 => None,
            IsoCheck::Skipped => Some(
                "the ISO's implanted MD5 is not checked (--noverify): a damaged download \
                 is written as it is"
                    .to_string(),
            ),
            IsoCheck::None if live.source_kind == SourceKind::Stick => Some(
                "nothing checks the source stick's files before they are copied (a stick has \
                 no implanted MD5); the copy is read back after writing"
                    .to_string(),
            ),
            IsoCheck::None => Some(format!(
                "nothing checks {} before writing: it carries no implanted MD5; compare it \
                 with the distribution's CHECKSUM file (sha256sum -c) first",
                live.path.display()
            )),
        }
    }
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
    /// The initrd's dracut version could not be read, so `dracut` is the classic
    /// spelling by default: the plan says so.
    pub dracut_unknown: bool,
    /// `--force`: also write an ISO whose root image livestick does not recognise.
    pub force: bool,
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
    /// The implanted MD5 the ISO claims, recorded beside the root image so that a
    /// rewrite recognises the same ISO without reading it.
    pub iso_md5: Option<String>,
    /// `--ext4`: put the live system on an ext4 partition (chosen by itself when a
    /// persistence file is over FAT32's limit): see [`Ext4LiveStep`].
    pub ext4_live: bool,
    /// `--noverify`: the implanted MD5 is not checked (the plan says so).
    pub noverify: bool,
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
    /// Whether the live directory's root image is the one this write copies,
    /// inspected before planning; `None` when it was not (the overlay is emptied).
    pub root: Option<RootMatch>,
    /// Bytes of changes the [current overlay](ExistingFs::current_overlay) holds,
    /// when it could be read.
    pub overlay_used: Option<u64>,
    /// The stick's ext4 live partition, when it has the ext4 layout: its live
    /// directory's files are in `files` too, so that what a write keeps, replaces
    /// or deletes is decided as on a FAT stick.
    pub ext4_live: Option<crate::disk::ext4_live::ExistingLive>,
}

impl ExistingFs {
    /// Whether `path` is a file of the ext4 live partition rather than of the FAT.
    pub fn on_ext4(&self, path: &str) -> bool {
        self.ext4_live
            .as_ref()
            .is_some_and(|l| l.files.iter().any(|(p, _)| p.eq_ignore_ascii_case(path)))
    }

    pub fn size_of(&self, path: &str) -> Option<u64> {
        self.files
            .iter()
            .find(|(p, _)| p.eq_ignore_ascii_case(path))
            .map(|(_, s)| *s)
    }

    /// Every overlay file in the live directory `dir`.
    fn overlays_in(&self, dir: &str) -> Vec<&(String, u64)> {
        let live_prefix = format!("/{dir}/").to_ascii_lowercase();
        self.files
            .iter()
            .filter(|(p, _)| {
                let lower = p.to_ascii_lowercase();
                lower.starts_with(&live_prefix)
                    && layout::is_overlay_name(&lower[live_prefix.len()..])
            })
            .collect()
    }

    /// The overlay dracut used until now in `dir` (path, size): the one named for
    /// the current label and UUID, else the first one found.
    pub fn current_overlay(&self, dir: &str) -> Option<(String, u64)> {
        let overlays = self.overlays_in(dir);
        // dracut names the overlay after the live device: the ext4 one on that layout.
        let named = match &self.ext4_live {
            Some(l) => layout::overlay_path(dir, &l.label, &l.uuid),
            None => layout::overlay_path(dir, &self.label, &fat::format_volume_id(self.volume_id)),
        };
        overlays
            .iter()
            .find(|(p, _)| p.eq_ignore_ascii_case(&named))
            .or(overlays.first())
            .map(|(p, s)| (p.clone(), *s))
    }
}

/// Whether a stick's root image is the one a write copies, and how that is known.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RootMatch {
    pub same: bool,
    pub why: String,
}

impl RootMatch {
    pub fn same(why: impl Into<String>) -> RootMatch {
        RootMatch {
            same: true,
            why: why.into(),
        }
    }

    pub fn changed(why: impl Into<String>) -> RootMatch {
        RootMatch {
            same: false,
            why: why.into(),
        }
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
    #[serde(rename = "size_bytes")]
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
    #[serde(rename = "size_bytes")]
    pub size: u64,
    pub kind: OverlayBoot,
    /// Why this kind: the root image's layout, or `--overlayfs`.
    pub why: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct HomeStep {
    pub path: String,
    #[serde(rename = "size_bytes")]
    pub size: u64,
    pub encryption: HomeEncryption,
}

/// An overlay already on the stick that the write keeps.
#[derive(Debug, Clone, Serialize)]
pub struct KeptOverlay {
    pub from: String,
    pub to: String,
    #[serde(rename = "size_bytes")]
    pub size: u64,
    /// Emptied (header zeroed): required whenever the root image changes,
    /// because its blocks describe changes to the old image.
    pub reset: bool,
    /// Why it keeps its content or is emptied.
    pub why: String,
    /// Bytes of changes it holds before the write, when they could be read.
    #[serde(rename = "used_bytes")]
    pub used: Option<u64>,
}

impl KeptOverlay {
    /// What it holds, for people: "12 MiB of changes", or that it is not known.
    pub fn used_text(&self) -> String {
        match self.used {
            Some(bytes) => format!("{} of changes", human(bytes)),
            None => "changes of unknown size".to_string(),
        }
    }
}

/// The record of the root image written, beside it: see
/// `live_source::compare_root`. Its sha256 is known only once the image is written.
#[derive(Debug, Clone, Serialize)]
pub struct RootRecordStep {
    pub path: String,
    /// The copied root image it describes.
    pub root_image: String,
    pub iso_md5: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SwapStep {
    pub path: String,
    #[serde(rename = "size_bytes")]
    pub size: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetSummary {
    pub path: PathBuf,
    pub kind: TargetKind,
    pub exists: bool,
    #[serde(rename = "size_before_bytes")]
    pub size_before: u64,
    #[serde(rename = "size_bytes")]
    pub size: u64,
}

/// Everything `apply` will do.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub source: PathBuf,
    pub source_label: String,
    pub target: TargetSummary,
    /// A new partition table and filesystem, or `None` to install into the existing one.
    /// In JSON these four are one `format` object ([`Plan::to_json`]).
    #[serde(skip)]
    pub format: Option<PartitionLayout>,
    #[serde(skip)]
    pub partition_start: u64,
    #[serde(skip)]
    pub partition_len: u64,
    #[serde(skip)]
    pub table: TableKind,
    pub label: String,
    pub fs_uuid: String,
    pub volume_id: u32,
    pub live_dir: String,
    pub copies: Vec<CopyStep>,
    pub configs: Vec<ConfigStep>,
    pub overlay: Option<OverlayStep>,
    pub kept_overlay: Option<KeptOverlay>,
    /// Written after the copies when the root image is copied.
    pub root_record: Option<RootRecordStep>,
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
    #[serde(rename = "to_write_bytes")]
    pub bytes_to_write: u64,
    /// The ext4 live partition (partition 2), when the live system goes there.
    pub ext4_live: Option<Ext4LiveStep>,
    #[serde(rename = "available_bytes")]
    pub space_available: u64,
    #[serde(rename = "needed_bytes")]
    pub space_needed: u64,
    #[serde(rename = "free_after_bytes")]
    pub free_after: u64,
    /// What checks the source before writing.
    pub iso_check: IsoCheck,
    pub notes: Vec<String>,
    /// What repairing the leftovers of a stopped replacement did before this plan
    /// was made (a dry run: what it will do; the space above already counts it),
    /// one line each, as `overlay` and `home` report it. Set by the caller, which
    /// reads the stick.
    pub repaired: Vec<String>,
}

/// The version of the plan's JSON shape (docs/json.md, schemas/write-plan.schema.json).
pub const PLAN_SCHEMA: u32 = 1;

/// The partition the live system goes on, as the plan's JSON says it: one object,
/// so a script finds the table and the partition in one place whether the write
/// makes a new table (`new`) or installs into the existing one.
#[derive(Serialize)]
struct FormatJson {
    new: bool,
    table: TableKind,
    start_bytes: u64,
    size_bytes: u64,
}

impl Plan {
    /// The plan as `write --dry-run --json` prints it: the fields, `format`, the
    /// published-checksum check and the `schema` version.
    pub fn to_json(
        &self,
        checksum: &crate::source::signed_checksum::SourceCheck,
    ) -> Result<serde_json::Value, serde_json::Error> {
        let mut value = serde_json::to_value(self)?;
        if let Some(object) = value.as_object_mut() {
            object.insert("schema".into(), PLAN_SCHEMA.into());
            object.insert(
                "format".into(),
                serde_json::to_value(FormatJson {
                    new: self.format.is_some(),
                    table: self.table,
                    start_bytes: self.partition_start,
                    size_bytes: self.partition_len,
                })?,
            );
            object.insert("checksum".into(), serde_json::to_value(checksum)?);
        }
        Ok(value)
    }
}

#[derive(Debug, Error)]
pub enum PlanError {
    #[error(
        "{0}: a stick written from it would not boot its live system; check the ISO (its download, `checkisomd5`), or give --force to write it anyway"
    )]
    UnrecognisedRoot(String),
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
        "the stick's ext4 live partition has {free_mib} MiB free, and this write needs {needed_mib} MiB there ({what}): the new root image is written beside the old one, which is freed only once the new one is in place; use smaller persistence sizes, or --format to write the stick anew (its overlay and home.img are lost)"
    )]
    Ext4InPlaceNoRoom {
        free_mib: u64,
        needed_mib: u64,
        what: String,
    },
    #[error(
        "{0} on a stick with the ext4 live layout is not supported without --format (its live device is the ext4 partition, whose label and layout this write keeps); drop it, or add --format to write the stick anew"
    )]
    Ext4InPlaceUnsupported(String),
    #[error(
        "the stick's ext4 live partition {partition} was not cleanly unmounted (its journal holds changes not yet written home): a rewrite beside them could be undone when they are replayed; replay the journal first ({hint}), then write again"
    )]
    Ext4NeedsReplay { partition: u32, hint: String },
    #[error(
        "--partition-size-mb {asked_mib} is more than the target holds for the ext4 live partition: {max_mib} MiB are left after the partition table and the {fat_mib} MiB FAT boot partition; choose at most {max_mib}, or leave the option out to use the whole disk"
    )]
    Ext4PartitionTooLarge {
        asked_mib: u64,
        max_mib: u64,
        fat_mib: u64,
    },
    #[error(
        "--overlayfs needs --overlay-size-mb N: on FAT the OverlayFS upper layer lives in an ext4 image file of that size"
    )]
    OverlayFsNeedsSize,
    #[error(
        "--multi adds an image beside the one in /{0}: give it its own directory with --live-dir NAME (--livedir NAME under livecd-iso-to-disk)"
    )]
    MultiSameDir(String),
    #[error("{0} works on an existing stick only; the target is new or being formatted")]
    NeedsExisting(&'static str),
    #[error(
        "{path} already exists on the stick; add --delete-home to replace it (its files are lost) or drop --home-size-mb to keep it"
    )]
    HomeExists { path: String },
    #[error("invalid --live-dir {0:?}: use a single directory name of letters, digits, '_' or '-'")]
    InvalidLiveDir(String),
    #[error("rendering the boot configuration: {0}")]
    Render(String),
    #[error(
        "{why}, so the live system goes on an ext4 partition beside a small FAT boot partition; this stick's FAT partition ({partition_mib} MiB, {free_mib} MiB free) cannot hold that layout without repartitioning: add --format (erases the stick; the new layout needs {needed_mib} MiB of its {disk_mib} MiB) or keep every size at most 4095 MiB"
    )]
    Ext4NeedsFormat {
        why: String,
        partition_mib: u64,
        free_mib: u64,
        needed_mib: u64,
        disk_mib: u64,
    },
    #[error(
        "the target is too small by {short_mib} MiB for the ext4 live layout ({why}, so the live system goes on an ext4 partition): the ext4 partition needs {needed_mib} MiB (root image, persistence and the file system's own {overhead_mib} MiB) but only {available_mib} MiB are left after the {fat_mib} MiB boot partition; use a larger stick or smaller --overlay-size-mb/--home-size-mb/--swap-size-mb"
    )]
    Ext4TooSmall {
        why: String,
        needed_mib: u64,
        available_mib: u64,
        short_mib: u64,
        overhead_mib: u64,
        fat_mib: u64,
    },
}

impl crate::error::Classify for PlanError {
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::BadInput
    }
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

/// The live directories of an existing stick's first image (the one its top-level
/// menus boot): top-level directories that hold a root image (`squashfs.img`, or an
/// older ISO's `rootfs.img`) and no boot files of their own. An image `--multi`
/// added keeps its kernel and menus under its directory, and installing it again
/// there replaces it.
fn live_dirs_of(fs: &ExistingFs) -> Vec<String> {
    let nested = |dir: &str| {
        fs.files.iter().any(|(p, _)| {
            p.trim_start_matches('/')
                .split_once('/')
                .is_some_and(|(d, rest)| d.eq_ignore_ascii_case(dir) && rest.contains('/'))
        })
    };
    let mut dirs: Vec<String> = Vec::new();
    for (path, _) in &fs.files {
        let Some((dir, name)) = path.trim_start_matches('/').split_once('/') else {
            continue;
        };
        if nested(dir) {
            continue;
        }
        if crate::layout::is_root_image_name(name)
            && !dirs.iter().any(|d| d.eq_ignore_ascii_case(dir))
        {
            dirs.push(dir.to_string());
        }
    }
    dirs
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
    // A stick that already has the ext4 layout keeps it: its live directory is there.
    let in_place_ext4 = existing.as_ref().and_then(|fs| fs.ext4_live.clone());
    let ext4_why = ext4_live_reason(opts).or_else(|| {
        in_place_ext4.as_ref().map(|l| {
            format!(
                "the stick keeps its live system on ext4 partition {} (livecd-iso-to-disk's ext4 layout)",
                l.number
            )
        })
    });
    if let Some(l) = &in_place_ext4 {
        if opts.multi {
            return Err(PlanError::Ext4InPlaceUnsupported("--multi".into()));
        }
        if opts.label.as_ref().is_some_and(|label| *label != l.label) {
            return Err(PlanError::Ext4InPlaceUnsupported(format!(
                "--label (the ext4 live partition is labelled {})",
                l.label
            )));
        }
    }
    if ext4_why.is_none() {
        check_size("overlay-size-mb", opts.overlay_size)?;
        check_size("home-size-mb", opts.home_size)?;
        check_size("swap-size-mb", opts.swap_size)?;
    } else {
        check_size_ext4(opts)?;
    }
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
    let overlay_why = match &live.root {
        _ if opts.overlayfs => "--overlayfs was given".to_string(),
        RootKind::Flat | RootKind::Erofs => format!(
            "the root is directly in {} ({}), where a device-mapper snapshot cannot work",
            live.squashfs.path,
            if live.root == RootKind::Erofs {
                "EROFS"
            } else {
                "squashfs"
            }
        ),
        RootKind::Nested { image } => {
            format!("the root is {image} inside squashfs.img: a device-mapper snapshot of it")
        }
        RootKind::Unknown { reason } | RootKind::Unrecognised { reason } => format!(
            "the root image's layout is unknown ({reason}): a device-mapper snapshot, as for a nested root"
        ),
    };
    // A live image whose root is no file system the initramfs can mount boots to a
    // dracut shell: that is a broken download or a wrong file, not a stick to write.
    if let RootKind::Unrecognised { reason } = &live.root
        && !opts.force
    {
        return Err(PlanError::UnrecognisedRoot(reason.clone()));
    }

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
                // On the ext4 layout the size is the ext4 live partition's (placed below).
                if let Some(size) = opts.partition_size.filter(|_| ext4_why.is_none()) {
                    if size > layout.len {
                        return Err(PlanError::PartitionTooLarge {
                            asked_mib: size / MIB,
                            max_mib: layout.len / MIB,
                        });
                    }
                    layout.len = size / MIB * MIB;
                }
                let cluster = fat::live_cluster_size_for(layout.len)? as u64;
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
    // dracut names the overlay after the live device: the ext4 partition on that layout.
    let ext4_uuid = ext4_why.is_some().then(|| match &in_place_ext4 {
        Some(l) => l.uuid.clone(),
        None => crate::disk::ext4_live::uuid_for(volume_id)
            .hyphenated()
            .to_string(),
    });
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
    // Not the directory of an image already there (wherever its --livedir put it):
    // the new image would replace its root image under its menu entries and kernel.
    if multi
        && let Some(taken) = existing
            .as_ref()
            .map(live_dirs_of)
            .unwrap_or_default()
            .into_iter()
            .find(|taken| taken.eq_ignore_ascii_case(dir))
    {
        return Err(PlanError::MultiSameDir(taken));
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
        // The first image's loaders stay: they boot the combined menu. GRUB
        // configs are rendered for the stick below, wherever they are.
        if is_grub_cfg(&f.path) || keep_efi_loaders {
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
        let dest = layout::overlay_path(
            dir,
            in_place_ext4.as_ref().map_or(&label, |l| &l.label),
            ext4_uuid.as_deref().unwrap_or(&fs_uuid),
        );
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
    if opts.dracut_unknown {
        notes.push(
            "the dracut version of the ISO's initrd could not be read: the overlay is named with \
             the classic rd.live.overlay spellings; if the initrd is dracut-ng 110 or newer, \
             pass --dracut-names renamed"
                .to_string(),
        );
    }
    if let RootKind::Unrecognised { reason } = &live.root {
        notes.push(format!(
            "written anyway (--force): {reason}; the live system will not boot"
        ));
    }
    if opts.bios {
        match syslinux_modules {
            Some(modules) => {
                // The installer puts its own loader there, made before the copy: an
                // ISO's file of that name would replace it with another version's.
                copies.retain(|c| {
                    !["/syslinux/ldlinux.sys", "/syslinux/ldlinux.c32"]
                        .iter()
                        .any(|loader| c.dest.eq_ignore_ascii_case(loader))
                });
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
    // dracut names the overlay by the label and UUID of the device it is on.
    let overlay_label = in_place_ext4.as_ref().map_or(&label, |l| &l.label);
    let overlay_path =
        layout::overlay_path(dir, overlay_label, ext4_uuid.as_deref().unwrap_or(&fs_uuid));
    let home_path = format!("/{dir}/home.img");
    // The manifest, rewritten by every write that copies the root image, carries the
    // root record; a `.livestick` of an older livestick is then deleted with the
    // other old live files. On the ext4 layout the image is in the ext4 partition
    // and its record stays beside it there (the manifest on the FAT lists it).
    let record_path = if ext4_uuid.is_some() {
        format!("/{dir}/{}", layout::ROOT_RECORD)
    } else {
        format!("/{dir}/{}", layout::MANIFEST)
    };
    let root_image = format!("/{dir}/{}", layout::SQUASHFS);
    let root_record = copies
        .iter()
        .any(|c| c.dest.eq_ignore_ascii_case(&root_image))
        .then(|| RootRecordStep {
            path: record_path.clone(),
            root_image,
            iso_md5: opts.iso_md5.clone(),
        });
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
        let old_overlays = fs.overlays_in(dir);
        let current = fs.current_overlay(dir);
        let new_overlay = opts.overlay_size.is_some() || opts.copy_overlay;
        match (&current, new_overlay) {
            (Some((path, size)), false) => {
                let (reset, why) = keep_or_empty(opts, fs.root.as_ref());
                kept_overlay = Some(KeptOverlay {
                    from: path.clone(),
                    to: overlay_path.clone(),
                    size: *size,
                    reset,
                    why,
                    used: fs.overlay_used,
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
                    && !path.eq_ignore_ascii_case(&record_path)
                    && !path.eq_ignore_ascii_case(&format!("/{dir}/{}", layout::MANIFEST))
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
    // An OverlayFS overlay is an ext4 file system: zeroing its head, which empties a
    // dm-snapshot store, would leave a file nothing mounts. One to be emptied is made
    // anew instead, as a new overlay of the same size would be.
    // On the ext4 layout the overlay is emptied in place instead, through its extents.
    let remade_from = kept_overlay
        .as_ref()
        .filter(|k| k.reset && overlay_kind == OverlayBoot::OverlayFs && in_place_ext4.is_none())
        .map(|k| (k.from.clone(), k.size));
    let overlay = opts
        .overlay_size
        .or(remade_from.as_ref().map(|(_, size)| *size))
        .map(|size| OverlayStep {
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
        // A signed GRUB reads its vendor directory's config (Debian's
        // /EFI/debian/grub.cfg), not /EFI/BOOT's: each one the ISO carries
        // gets the stick's menu, never the ISO's, which names the ISO's label.
        for f in &live.efi_files {
            if is_grub_cfg(&f.path) && !f.path.eq_ignore_ascii_case("/EFI/BOOT/grub.cfg") {
                configs.push(ConfigStep {
                    dest: f.path.clone(),
                    content: text.clone(),
                });
            }
        }
        configs.push(ConfigStep {
            dest: "/EFI/BOOT/grub.cfg".into(),
            content: text,
        });
    } else {
        notes.push("the ISO has no EFI/BOOT loader: the stick will not boot in UEFI mode".into());
    }

    let mut ext4_live = match (&ext4_why, &ext4_uuid) {
        (Some(why), Some(uuid)) => Some(place_ext4_live(
            Ext4Request {
                why,
                uuid,
                label: &label,
                fs_uuid: &fs_uuid,
                dir,
                target_size,
                existing: existing.as_ref(),
                deletes: &deletes,
                overlay: overlay.as_ref(),
                home: home.as_ref(),
                swap: swap.as_ref(),
                opts,
            },
            &mut copies,
            &mut configs,
        )?),
        _ => None,
    };
    // In place, the ext4 partition's files are removed there, not on the FAT.
    if let Some(step) = ext4_live.as_mut() {
        step.overlay_kind = overlay_kind;
    }
    if let (Some(step), Some(fs)) = (ext4_live.as_mut(), &existing)
        && step.in_place
    {
        let (on_ext4, on_fat): (Vec<String>, Vec<String>) = std::mem::take(&mut deletes)
            .into_iter()
            .partition(|p| fs.on_ext4(p));
        step.deletes = on_ext4;
        deletes = on_fat;
    }
    let (format, part_len, cluster, available, root_record) = match &ext4_live {
        Some(e) if !e.in_place => {
            let fat = partition::PartitionLayout {
                len: e.fat_len,
                ..format
                    .clone()
                    .ok_or(PlanError::NeedsExisting("the ext4 layout"))?
            };
            let cluster = fat::live_cluster_size_for(fat.len)? as u64;
            (
                Some(fat),
                e.fat_len,
                cluster,
                fat32_data_bytes(e.fat_len, cluster),
                root_record,
            )
        }
        _ => (format, part_len, cluster, available, root_record),
    };
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
        // On the ext4 layout persistence lives on partition 2 (checked there).
        - ext4_live.as_ref().map_or(0, |_| {
            [overlay.as_ref().map(|o| o.size), home.as_ref().map(|h| h.size), swap.as_ref().map(|s| s.size)]
                .into_iter()
                .flatten()
                .map(|size| on_disk(size, cluster))
                .sum::<u64>()
        })
        + BOOT_SLACK;
    // Space that comes back on an existing stick: files this write replaces
    // (same path) or deletes.
    let available = match &existing {
        Some(fs) => {
            let reclaimed: u64 = fs
                .files
                .iter()
                .filter(|(p, _)| !fs.on_ext4(p))
                .filter(|(p, _)| {
                    deletes.iter().any(|d| d.eq_ignore_ascii_case(p))
                        || copies.iter().any(|c| c.dest.eq_ignore_ascii_case(p))
                        || configs.iter().any(|c| c.dest.eq_ignore_ascii_case(p))
                        || overlay
                            .as_ref()
                            .is_some_and(|o| o.path.eq_ignore_ascii_case(p))
                        || remade_from
                            .as_ref()
                            .is_some_and(|(from, _)| from.eq_ignore_ascii_case(p))
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
    let iso_check = IsoCheck::for_source(live, opts.noverify);
    notes.extend(iso_check.note(live));
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
        root_record,
        home,
        kept_home,
        swap,
        deletes,
        relabel,
        bios: opts.bios,
        uefi,
        bytes_to_write: data_bytes
            + ext4_live
                .as_ref()
                .map_or(0, |e| e.copies.iter().map(|c| c.size).sum::<u64>()),
        ext4_live,
        space_available: available,
        space_needed,
        free_after: available - space_needed,
        iso_check,
        notes,
        repaired: Vec::new(),
    })
}

impl Plan {
    /// The plan as people read it (`--dry-run`).
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let t = &self.target;
        out.push_str(&format!(
            "Plan: {} ({}) -> {} ({}, {})\n",
            self.source.display(),
            self.source_label,
            t.path.display(),
            t.kind,
            human(t.size)
        ));
        match &self.format {
            Some(layout) => out.push_str(&format!(
                "  partition table: new {}; partition 1: FAT32 at {} MiB, {}, label {}, UUID {}, boot flag\n",
                layout.table,
                layout.start / MIB,
                human(layout.len),
                self.label,
                self.fs_uuid
            )),
            None => out.push_str(&format!(
                "  partition:       existing {} partition at {} MiB, {}, label {}, UUID {} (files outside /{} and the boot dirs are kept)\n",
                self.table,
                self.partition_start / MIB,
                human(self.partition_len),
                self.label,
                self.fs_uuid,
                self.live_dir
            )),
        }
        if let Some(e) = &self.ext4_live {
            out.push_str(&format!(
                "  partition 2:     ext4 at {} MiB, {}, label {}, UUID {}: the live device, holding /{} ({})\n",
                e.start / MIB,
                human(e.len),
                e.label,
                e.uuid,
                self.live_dir,
                e.why
            ));
            for c in &e.copies {
                out.push_str(&format!("    {:>10}  ext4:{}\n", human(c.size), c.dest));
            }
            if e.in_place {
                out.push_str(
                    "    kept as it is: each copy is written beside the file it replaces and swapped in once read back\n",
                );
                for d in &e.deletes {
                    out.push_str(&format!("    delete ext4:{d}\n"));
                }
                out.push_str(&format!(
                    "    space {} needed there, beside the files it replaces\n",
                    human(e.space_needed)
                ));
            } else {
                out.push_str(&format!(
                    "    space {} needed of {} (ext4 metadata {})\n",
                    human(e.space_needed),
                    human(e.len),
                    human(e.overhead)
                ));
            }
        }
        out.push_str("  files:\n");
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
        out.push_str("  configs:\n");
        for c in &self.configs {
            out.push_str(&format!(
                "    {:>10}  {}\n",
                human(c.content.len() as u64),
                c.dest
            ));
        }
        if let Some(o) = &self.overlay {
            out.push_str(&format!(
                "  overlay:         {} ({}, {}: {})\n",
                o.path,
                human(o.size),
                o.kind,
                o.why
            ));
        }
        if let Some(k) = &self.kept_overlay {
            let name = if k.from.eq_ignore_ascii_case(&k.to) {
                k.from.clone()
            } else {
                format!("{} as {}", k.from, k.to)
            };
            let fate = if k.reset {
                format!("emptied, its {} lost", k.used_text())
            } else {
                format!("kept with its {}", k.used_text())
            };
            out.push_str(&format!(
                "  overlay:         keeps {name} ({}), {fate}: {}\n",
                human(k.size),
                k.why
            ));
        }
        if let Some(h) = &self.kept_home {
            out.push_str(&format!("  home:            keeps {h}\n"));
        }
        for d in &self.deletes {
            out.push_str(&format!("  delete:          {d}\n"));
        }
        if let Some(l) = &self.relabel {
            out.push_str(&format!("  relabel:         {l}\n"));
        }
        if let Some(h) = &self.home {
            out.push_str(&format!(
                "  home:            {} ({}, {})\n",
                h.path,
                human(h.size),
                h.encryption
            ));
        }
        if let Some(s) = &self.swap {
            out.push_str(&format!(
                "  swap:            {} ({})\n",
                s.path,
                human(s.size)
            ));
        }
        out.push_str(&format!(
            "  boot:            BIOS: {}   UEFI: {}\n",
            if self.bios {
                "SYSLINUX + MBR code"
            } else {
                "no"
            },
            if self.uefi { "EFI/BOOT" } else { "no" }
        ));
        out.push_str(&format!(
            "  space:           {} needed of {}, {} free after\n",
            human(self.space_needed),
            human(self.space_available),
            human(self.free_after)
        ));
        for n in &self.notes {
            out.push_str(&format!("  note: {n}\n"));
        }
        for r in &self.repaired {
            out.push_str(&format!("  repairs first: {r}\n"));
        }
        out
    }
}

/// The ext4 live partition: partition 2, the live device dracut mounts, holding
/// the live directory (root image, overlay, home.img, swap.img) beside a small FAT
/// partition 1 for the boot loaders, kernels and menus.
#[derive(Debug, Clone, Serialize)]
pub struct Ext4LiveStep {
    /// Why the live system goes on ext4.
    pub why: String,
    /// Partition 2 on the disk, bytes.
    #[serde(rename = "start_bytes")]
    pub start: u64,
    #[serde(rename = "size_bytes")]
    pub len: u64,
    /// Partition 1 (FAT, boot files only), bytes.
    #[serde(rename = "fat_size_bytes")]
    pub fat_len: u64,
    pub uuid: String,
    pub label: String,
    /// Files copied into the ext4 partition rather than onto the FAT.
    pub copies: Vec<CopyStep>,
    /// Bytes its files take, plus its own metadata (`overhead`).
    #[serde(rename = "needed_bytes")]
    pub space_needed: u64,
    #[serde(rename = "overhead_bytes")]
    pub overhead: u64,
    /// The stick already has the layout: both partitions stay, the copies are
    /// written beside the files they replace and swapped in, persistence is kept.
    pub in_place: bool,
    /// Files of the ext4 partition the write removes (in place only).
    pub deletes: Vec<String>,
    /// The overlay kind the menus name: an overlay emptied in place is made one of
    /// these, whatever it was (in the plan's JSON as `overlay.kind`).
    #[serde(skip)]
    pub overlay_kind: OverlayBoot,
}

/// Why this write needs the ext4 live layout, `None` when the FAT layout serves.
fn ext4_live_reason(opts: &WriteOptions) -> Option<String> {
    if opts.ext4_live {
        return Some("--ext4 was given".into());
    }
    [
        ("overlay-size-mb", opts.overlay_size),
        ("home-size-mb", opts.home_size),
        ("swap-size-mb", opts.swap_size),
    ]
    .into_iter()
    .find_map(|(option, size)| {
        size.filter(|&s| s > FAT_MAX_FILE).map(|s| {
            format!(
                "--{option} {} MiB is over FAT32's 4095 MiB file limit",
                s / MIB
            )
        })
    })
}

/// The size checks of the ext4 layout: ext4 has no 4 GiB file limit, only the
/// stick's size, checked once the partitions are placed.
fn check_size_ext4(opts: &WriteOptions) -> Result<(), PlanError> {
    for (option, size) in [
        ("overlay-size-mb", opts.overlay_size),
        ("home-size-mb", opts.home_size),
        ("swap-size-mb", opts.swap_size),
    ] {
        if size.is_some_and(|s| s < MIB) {
            return Err(PlanError::ZeroSize { option });
        }
    }
    Ok(())
}

/// What [`place_ext4_live`] decides from.
struct Ext4Request<'a> {
    why: &'a str,
    uuid: &'a str,
    label: &'a str,
    fs_uuid: &'a str,
    dir: &'a str,
    target_size: u64,
    existing: Option<&'a ExistingFs>,
    /// What the write deletes (the ext4 partition's files among them, in place).
    deletes: &'a [String],
    overlay: Option<&'a OverlayStep>,
    home: Option<&'a HomeStep>,
    swap: Option<&'a SwapStep>,
    opts: &'a WriteOptions,
}

/// Places the ext4 live partition: moves the live directory's copies off the FAT,
/// sizes the FAT for what is left (boot files and menus, with room to spare),
/// checks that partition 2 holds the live files, persistence and its own
/// metadata, and points the menus' kernel arguments at the ext4 UUID (GRUB still
/// finds its files on the FAT by the FAT's UUID).
fn place_ext4_live(
    req: Ext4Request<'_>,
    copies: &mut Vec<CopyStep>,
    configs: &mut [ConfigStep],
) -> Result<Ext4LiveStep, PlanError> {
    use crate::disk::ext4_live;
    let live_prefix = format!("/{}/", req.dir).to_ascii_lowercase();
    let (live, boot): (Vec<CopyStep>, Vec<CopyStep>) = std::mem::take(copies)
        .into_iter()
        .partition(|c| c.dest.to_ascii_lowercase().starts_with(&live_prefix));
    *copies = boot;
    let boot_bytes: u64 = copies
        .iter()
        .map(|c| c.size)
        .chain(configs.iter().map(|c| c.content.len() as u64))
        .sum();
    // Room for the boot files twice over (a kernel update, a second image), and
    // never below what FAT32 and the firmware are happy with.
    let fat_len = (mib_ceil(boot_bytes * 2) + 32).max(64) * MIB;
    let persistence: u64 = [
        req.overlay.map(|o| o.size),
        req.home.map(|h| h.size),
        req.swap.map(|s| s.size),
    ]
    .into_iter()
    .flatten()
    .map(ext4_live::on_disk)
    .sum();
    let files = live.iter().map(|c| ext4_live::on_disk(c.size)).sum::<u64>() + persistence;
    if let Some(fs) = req.existing
        && let Some(l) = &fs.ext4_live
    {
        return place_in_place(req, l, fs.partition_len, live, files, configs);
    }
    if let Some(fs) = req.existing {
        let needed = fat_len + files + ext4_live::overhead(req.target_size);
        return Err(PlanError::Ext4NeedsFormat {
            why: req.why.to_string(),
            partition_mib: fs.partition_len / MIB,
            free_mib: fs.free_bytes / MIB,
            needed_mib: mib_ceil(needed),
            disk_mib: req.target_size / MIB,
        });
    }
    let whole = partition::layout_single(req.target_size, req.opts.table)?;
    let rest = whole.len.saturating_sub(fat_len);
    // --partition-size-mb sizes the live partition, as livecd-iso-to-disk's
    // `--format SIZE,ext4` sized the ext4 partition that held LiveOS/; the FAT boot
    // partition is livestick's to size, and the rest of the disk stays unallocated.
    let len = match req.opts.partition_size {
        Some(size) if size > rest => {
            return Err(PlanError::Ext4PartitionTooLarge {
                asked_mib: size / MIB,
                max_mib: rest / MIB,
                fat_mib: fat_len / MIB,
            });
        }
        Some(size) => size / MIB * MIB,
        None => rest,
    };
    let overhead = ext4_live::overhead(len);
    let space_needed = files + overhead;
    if space_needed > len {
        let needed_mib = mib_ceil(space_needed);
        let available_mib = len / MIB;
        return Err(PlanError::Ext4TooSmall {
            why: req.why.to_string(),
            needed_mib,
            available_mib,
            short_mib: needed_mib.saturating_sub(available_mib).max(1),
            overhead_mib: mib_ceil(overhead),
            fat_mib: fat_len / MIB,
        });
    }
    name_ext4_in_menus(&req, configs);
    Ok(Ext4LiveStep {
        why: req.why.to_string(),
        start: whole.start + fat_len,
        len,
        fat_len,
        uuid: req.uuid.to_string(),
        label: req.label.to_string(),
        copies: live,
        space_needed,
        overhead,
        in_place: false,
        deletes: Vec::new(),
        overlay_kind: OverlayBoot::None,
    })
}

/// Every kernel argument that names the live device by the FAT's UUID
/// (`root=live:UUID=`, the overlay's devspec, an installer's `hd:UUID=`) now
/// names the ext4 partition, where the live directory is.
fn name_ext4_in_menus(req: &Ext4Request<'_>, configs: &mut [ConfigStep]) {
    let (from, to) = (
        format!("UUID={}", req.fs_uuid),
        format!("UUID={}", req.uuid),
    );
    for c in configs.iter_mut() {
        c.content = c.content.replace(&from, &to);
    }
}

/// [`place_ext4_live`] on a stick that already has the layout: both partitions
/// stay; the new files (`files` bytes on disk: the copies, allocated beside the
/// files they replace, and any persistence made anew) must fit in the ext4
/// partition's free space plus what the write deletes there first.
fn place_in_place(
    req: Ext4Request<'_>,
    live: &crate::disk::ext4_live::ExistingLive,
    fat_len: u64,
    copies: Vec<CopyStep>,
    files: u64,
    configs: &mut [ConfigStep],
) -> Result<Ext4LiveStep, PlanError> {
    use crate::disk::ext4_live;
    if live.needs_recovery {
        return Err(PlanError::Ext4NeedsReplay {
            partition: live.number,
            hint: live
                .replay_hint
                .clone()
                .unwrap_or_else(|| "`livestick overlay status STICK` says how".into()),
        });
    }
    let made_anew = [
        req.overlay.map(|o| &o.path),
        req.home.map(|h| &h.path),
        req.swap.map(|s| &s.path),
    ];
    let freed: u64 = live
        .files
        .iter()
        .filter(|(p, _)| {
            req.deletes.iter().any(|d| d.eq_ignore_ascii_case(p))
                || made_anew
                    .iter()
                    .flatten()
                    .any(|n| n.eq_ignore_ascii_case(p))
        })
        .map(|(_, size)| ext4_live::on_disk(*size))
        .sum();
    let room = live.free_bytes + freed;
    if files > room {
        return Err(PlanError::Ext4InPlaceNoRoom {
            free_mib: room / MIB,
            needed_mib: mib_ceil(files),
            what: copies
                .iter()
                .map(|c| format!("{} {}", c.dest, human(c.size)))
                .chain(made_anew.iter().flatten().map(|p| format!("{p} made anew")))
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    name_ext4_in_menus(&req, configs);
    Ok(Ext4LiveStep {
        why: req.why.to_string(),
        start: live.start,
        len: live.len,
        fat_len,
        uuid: live.uuid.clone(),
        label: live.label.clone(),
        copies,
        space_needed: files,
        overhead: 0,
        in_place: true,
        deletes: Vec::new(),
        overlay_kind: OverlayBoot::None,
    })
}

/// Whether a kept overlay keeps its content, and why. Its blocks describe changes
/// to one root image: over any other they are garbage, so only a root image known
/// to be the same keeps them.
fn keep_or_empty(opts: &WriteOptions, root: Option<&RootMatch>) -> (bool, String) {
    match root {
        _ if opts.reset_overlay => (true, "--reset-overlay was given".into()),
        _ if opts.skipcopy => (false, "--skipcopy leaves the root image as it is".into()),
        Some(m) if m.same => (false, format!("the root image is unchanged: {}", m.why)),
        Some(m) => (true, format!("the root image changes: {}", m.why)),
        None => (
            true,
            "the root image is rewritten and was not compared with the stick's".into(),
        ),
    }
}

/// Whether an ISO path names a GRUB config (`grub.cfg` in any directory).
fn is_grub_cfg(path: &str) -> bool {
    path.rsplit('/')
        .next()
        .is_some_and(|name| name.eq_ignore_ascii_case("grub.cfg"))
}

#[cfg(test)]
mod tests {
    //! `plan_write` on a `LiveImage` built in memory: no ISO, no target, no I/O
    //! (BIOS is planned without SYSLINUX modules, so no host file is probed).

    use super::*;
    use crate::size::GIB;
    use crate::source::iso::{Extent, IsoEntry};
    use crate::source::live::{self, FileInfo, LayoutKind, SourceKind};

    const ISOLINUX: &str = "default vesamenu.c32\n\
timeout 600\n\
menu title Fedora-Test-Live 42\n\
label linux\n\
  menu label ^Start Fedora-Test-Live 42\n\
  kernel vmlinuz\n\
  append initrd=initrd.img root=live:CDLABEL=Fedora-Test-42 rd.live.image quiet rhgb\n\
label check\n\
  menu label Test this ^media & start Fedora-Test-Live 42\n\
  menu default\n\
  kernel vmlinuz\n\
  append initrd=initrd.img root=live:CDLABEL=Fedora-Test-42 rd.live.image rd.live.check quiet\n\
label basic\n\
  menu label Start Fedora-Test-Live 42 in ^basic graphics mode\n\
  kernel vmlinuz\n\
  append initrd=initrd.img root=live:CDLABEL=Fedora-Test-42 rd.live.image nomodeset quiet\n";

    const GRUB: &str = "set default=\"1\"\n\
set timeout=60\n\
search --no-floppy --set=root -l 'Fedora-Test-42'\n\
menuentry 'Start Fedora-Test-Live 42' --class fedora {\n\
\tlinuxefi /images/pxeboot/vmlinuz root=live:CDLABEL=Fedora-Test-42 rd.live.image quiet rhgb\n\
\tinitrdefi /images/pxeboot/initrd.img\n\
}\n\
menuentry 'Test this media & start Fedora-Test-Live 42' --class fedora {\n\
\tlinuxefi /images/pxeboot/vmlinuz root=live:CDLABEL=Fedora-Test-42 rd.live.image rd.live.check quiet\n\
\tinitrdefi /images/pxeboot/initrd.img\n\
}\n";

    /// Every size a multiple of 4 KiB (the cluster of the targets below), so
    /// what a file takes on the stick is its size.
    const SQUASHFS: u64 = 1500 * MIB;
    const VOLUME_ID: u32 = 0x1234_abcd;
    const UUID: &str = "1234-ABCD";
    /// The ISO's files by (path, size): the live directory, EFI, and the
    /// kernels/initrds the menus name.
    const LIVE_FILES: [(&str, u64); 2] = [
        ("/LiveOS/squashfs.img", SQUASHFS),
        ("/LiveOS/osmin.img", 8 * MIB),
    ];
    const EFI_FILES: [(&str, u64); 4] = [
        ("/EFI/BOOT/BOOTX64.EFI", 1024 * 1024),
        ("/EFI/BOOT/grubx64.efi", 2048 * 1024),
        ("/EFI/BOOT/fonts/unicode.pf2", 2400 * 1024),
        ("/EFI/BOOT/grub.cfg", 4096),
    ];
    const BOOT_FILES: [(&str, u64); 4] = [
        ("/isolinux/vmlinuz", 14 * MIB),
        ("/images/pxeboot/vmlinuz", 14 * MIB),
        ("/isolinux/initrd.img", 120 * MIB),
        ("/images/pxeboot/initrd.img", 120 * MIB),
    ];

    fn files(list: &[(&str, u64)]) -> Vec<FileInfo> {
        list.iter()
            .map(|(path, size)| FileInfo {
                path: path.to_string(),
                size: *size,
            })
            .collect()
    }

    fn size_of(path: &str) -> u64 {
        LIVE_FILES
            .iter()
            .chain(&EFI_FILES)
            .chain(&BOOT_FILES)
            .find(|(p, _)| *p == path)
            .map(|(_, s)| *s)
            .unwrap_or_else(|| panic!("{path} is not on the test ISO"))
    }

    /// A Fedora-style live ISO with an isolinux and an EFI GRUB menu, parsed
    /// by the parsers `inspect` uses.
    fn live(root: RootKind) -> LiveImage {
        let mut menus = Vec::new();
        let mut errors = Vec::new();
        live::parse_menu_file(
            "/isolinux/isolinux.cfg",
            false,
            ISOLINUX.as_bytes(),
            &mut menus,
            &mut errors,
        );
        live::parse_menu_file(
            "/EFI/BOOT/grub.cfg",
            true,
            GRUB.as_bytes(),
            &mut menus,
            &mut errors,
        );
        assert!(errors.is_empty(), "test menus parse: {errors:?}");
        let (kernels, initrds) = live::boot_files_of(&menus);
        // What inspect does: the files the menus name, as found on the ISO.
        let boot_files = kernels
            .iter()
            .chain(&initrds)
            .map(|p| FileInfo {
                path: p.clone(),
                size: size_of(p),
            })
            .collect();
        LiveImage {
            path: PathBuf::from("/isos/Fedora-Test-Live-42.iso"),
            source_kind: SourceKind::Iso,
            label: "Fedora-Test-42".into(),
            volume_size: 2 * GIB,
            layout: LayoutKind::Isolinux,
            live_dir: "LiveOS".into(),
            squashfs: FileInfo {
                path: "/LiveOS/squashfs.img".into(),
                size: SQUASHFS,
            },
            root,
            compressor: Some("xz".into()),
            menus,
            kernels,
            initrds,
            boot_files,
            warnings: Vec::new(),
            efi_files: files(&EFI_FILES),
            live_files: files(&LIVE_FILES),
            implanted_md5: true,
            source_overlay: None,
            source_home: None,
            ext4_live: None,
            squashfs_entry: IsoEntry {
                path: "/LiveOS/squashfs.img".into(),
                name: "squashfs.img".into(),
                is_dir: false,
                size: SQUASHFS,
                extents: vec![Extent {
                    offset: 64 * MIB,
                    len: SQUASHFS,
                }],
            },
        }
    }

    fn nested() -> LiveImage {
        live(RootKind::Nested {
            image: "LiveOS/rootfs.img".into(),
        })
    }

    fn opts() -> WriteOptions {
        WriteOptions {
            format: FormatMode::Auto,
            table: TableKind::Mbr,
            label: None,
            live_dir: "LiveOS".into(),
            overlay_size: None,
            overlayfs: false,
            reset_overlay: false,
            skipcopy: false,
            delete_home: false,
            multi: false,
            copy_overlay: false,
            copy_home: false,
            dracut: DracutNames::Classic,
            dracut_unknown: false,
            home_size: None,
            home_encryption: HomeEncryption::None,
            swap_size: None,
            extra_args: KernelArgs::new(),
            timeout_secs: None,
            total_timeout_secs: None,
            partition_size: None,
            updates: None,
            kickstart: None,
            volume_id: VOLUME_ID,
            bios: true,
            force: false,
            iso_md5: None,
            ext4_live: false,
            noverify: false,
        }
    }

    /// An image file that does not exist yet.
    fn new_image() -> TargetProbe {
        TargetProbe::image(std::path::Path::new("/tmp/stick.img"), 0, false)
    }

    fn plan_new(live: &LiveImage, size: u64, opts: &WriteOptions) -> Result<Plan, PlanError> {
        plan_write(live, &new_image(), size, None, opts, None)
    }

    fn plan_existing(
        live: &LiveImage,
        fs: ExistingFs,
        opts: &WriteOptions,
    ) -> Result<Plan, PlanError> {
        let mut target = new_image();
        target.exists = true;
        target.size = 8 * GIB;
        plan_write(live, &target, 8 * GIB, Some(fs), opts, None)
    }

    fn config<'a>(plan: &'a Plan, dest: &str) -> &'a str {
        &plan
            .configs
            .iter()
            .find(|c| c.dest == dest)
            .unwrap_or_else(|| panic!("no config {dest} in {:?}", plan.configs))
            .content
    }

    /// The Linux command lines of a rendered config (SYSLINUX `APPEND`, GRUB `linux`).
    fn cmdlines(text: &str) -> Vec<&str> {
        text.lines()
            .map(str::trim)
            .filter(|l| l.starts_with("APPEND ") || l.starts_with("linux "))
            .collect()
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    fn dests(plan: &Plan) -> Vec<String> {
        sorted(plan.copies.iter().map(|c| c.dest.clone()).collect())
    }

    /// What the fresh plan copies: the live directory, the EFI files but the
    /// ISO's grub.cfg (rendered instead), and the kernels/initrds the menus name.
    fn expected_copies() -> Vec<String> {
        sorted(
            LIVE_FILES
                .iter()
                .chain(&EFI_FILES[..3])
                .chain(&BOOT_FILES)
                .map(|(p, _)| p.to_string())
                .collect(),
        )
    }

    fn copied_bytes() -> u64 {
        LIVE_FILES
            .iter()
            .chain(&EFI_FILES[..3])
            .chain(&BOOT_FILES)
            .map(|(_, s)| s)
            .sum()
    }

    #[test]
    fn fresh_image_mbr_layout_copies_and_configs() {
        let plan = plan_new(&nested(), 8 * GIB, &opts()).expect("plans");
        assert_eq!(
            plan.format,
            Some(PartitionLayout {
                table: TableKind::Mbr,
                disk_size: 8 * GIB,
                start: MIB,
                len: 8 * GIB - MIB,
            })
        );
        assert_eq!(plan.table, TableKind::Mbr);
        assert_eq!(
            (plan.partition_start, plan.partition_len),
            (MIB, 8 * GIB - MIB)
        );
        assert_eq!(plan.label, "LIVE");
        assert_eq!(plan.volume_id, VOLUME_ID);
        assert_eq!(plan.fs_uuid, UUID);
        assert_eq!(plan.live_dir, "LiveOS");
        assert!(!plan.target.exists);
        assert_eq!((plan.target.size_before, plan.target.size), (0, 8 * GIB));

        assert_eq!(dests(&plan), expected_copies());
        for c in &plan.copies {
            match &c.source {
                CopySource::Iso { path } => assert_eq!(path, &c.dest, "ISO path kept"),
                CopySource::Host { path } => panic!("unexpected host copy {}", path.display()),
            }
            assert_eq!(c.size, size_of(&c.dest), "{}", c.dest);
        }

        let dests: Vec<&str> = plan.configs.iter().map(|c| c.dest.as_str()).collect();
        assert_eq!(dests, ["/syslinux/syslinux.cfg", "/EFI/BOOT/grub.cfg"]);
        for cfg in ["/syslinux/syslinux.cfg", "/EFI/BOOT/grub.cfg"] {
            let text = config(&plan, cfg);
            let lines = cmdlines(text);
            assert!(!lines.is_empty(), "{cfg}: no entries in\n{text}");
            for line in lines {
                assert!(line.contains("root=live:UUID=1234-ABCD"), "{cfg}: {line}");
                assert!(!line.contains("CDLABEL"), "{cfg}: ISO root kept: {line}");
                assert!(!line.contains("rd.live.overlay"), "{cfg}: {line}");
                assert!(!line.split(' ').any(|w| w == "rw"), "{cfg}: {line}");
            }
        }
        assert!(config(&plan, "/syslinux/syslinux.cfg").contains("/isolinux/vmlinuz"));
        assert!(config(&plan, "/EFI/BOOT/grub.cfg").contains("/images/pxeboot/vmlinuz"));

        assert!(plan.overlay.is_none() && plan.home.is_none() && plan.swap.is_none());
        assert!(plan.kept_overlay.is_none() && plan.kept_home.is_none());
        assert!(plan.deletes.is_empty() && plan.relabel.is_none());
        assert!(plan.bios && plan.uefi);
        assert!(
            plan.notes.iter().any(|n| n.contains("SYSLINUX not found")),
            "{:?}",
            plan.notes
        );
        assert!(
            plan.notes
                .iter()
                .any(|n| n.starts_with("creates the image file")),
            "{:?}",
            plan.notes
        );
        assert_eq!(plan.bytes_to_write, copied_bytes());
        assert!(plan.space_needed >= copied_bytes() + BOOT_SLACK);
        assert!(plan.space_available < plan.partition_len);
        assert_eq!(plan.free_after, plan.space_available - plan.space_needed);
    }

    #[test]
    fn gpt_layout_leaves_the_backup_table_room() {
        let o = WriteOptions {
            table: TableKind::Gpt,
            ..opts()
        };
        let plan = plan_new(&nested(), 8 * GIB, &o).expect("plans");
        // 33 sectors of backup GPT at the end, rounded down to whole MiB.
        assert_eq!(
            plan.format,
            Some(PartitionLayout {
                table: TableKind::Gpt,
                disk_size: 8 * GIB,
                start: MIB,
                len: 8 * GIB - 2 * MIB,
            })
        );
        assert_eq!(plan.table, TableKind::Gpt);
        assert_eq!(plan.partition_start, MIB);
        assert_eq!(dests(&plan), expected_copies());
    }

    #[test]
    fn label_and_partition_size_are_taken() {
        let o = WriteOptions {
            label: Some("MYSTICK".into()),
            partition_size: Some(4 * GIB + MIB / 2),
            ..opts()
        };
        let plan = plan_new(&nested(), 8 * GIB, &o).expect("plans");
        assert_eq!(plan.label, "MYSTICK");
        assert_eq!(plan.partition_len, 4 * GIB, "rounded down to whole MiB");
        assert_eq!(plan.format.as_ref().map(|l| l.len), Some(4 * GIB));
        assert!(config(&plan, "/syslinux/syslinux.cfg").contains("MYSTICK"));

        let too_big = WriteOptions {
            partition_size: Some(8 * GIB),
            ..opts()
        };
        assert!(matches!(
            plan_new(&nested(), 8 * GIB, &too_big),
            Err(PlanError::PartitionTooLarge {
                asked_mib: 8192,
                max_mib: 8191
            })
        ));
    }

    #[test]
    fn nested_root_overlay_is_a_dm_snapshot() {
        let o = WriteOptions {
            overlay_size: Some(GIB),
            ..opts()
        };
        let plan = plan_new(&nested(), 8 * GIB, &o).expect("plans");
        let overlay = plan.overlay.as_ref().expect("an overlay step");
        assert_eq!(overlay.path, "/LiveOS/overlay-LIVE-1234-ABCD");
        assert_eq!(overlay.size, GIB);
        assert_eq!(overlay.kind, OverlayBoot::DmSnapshot);
        assert!(overlay.why.contains("LiveOS/rootfs.img"), "{}", overlay.why);
        assert!(
            overlay.why.contains("device-mapper snapshot"),
            "{}",
            overlay.why
        );
        for cfg in ["/syslinux/syslinux.cfg", "/EFI/BOOT/grub.cfg"] {
            for line in cmdlines(config(&plan, cfg)) {
                let words: Vec<&str> = line.split(' ').collect();
                assert!(words.contains(&"root=live:UUID=1234-ABCD"), "{line}");
                assert!(words.contains(&"rd.live.overlay=UUID=1234-ABCD"), "{line}");
                assert!(words.contains(&"rw"), "{line}");
                assert!(!line.contains("overlayfs"), "{line}");
            }
        }
    }

    #[test]
    fn older_nested_root_names_its_image() {
        let live = live(RootKind::Nested {
            image: "LiveOS/ext3fs.img".into(),
        });
        let o = WriteOptions {
            overlay_size: Some(GIB),
            ..opts()
        };
        let plan = plan_new(&live, 8 * GIB, &o).expect("plans");
        let overlay = plan.overlay.as_ref().expect("an overlay step");
        assert_eq!(overlay.kind, OverlayBoot::DmSnapshot);
        assert!(overlay.why.contains("LiveOS/ext3fs.img"), "{}", overlay.why);
        assert!(!overlay.why.contains("rootfs.img"), "{}", overlay.why);
    }

    #[test]
    fn unknown_root_does_not_claim_a_rootfs_img() {
        let live = live(RootKind::Unknown {
            reason: "unsquashfs not found".into(),
        });
        let o = WriteOptions {
            overlay_size: Some(GIB),
            ..opts()
        };
        let plan = plan_new(&live, 8 * GIB, &o).expect("plans");
        let overlay = plan.overlay.as_ref().expect("an overlay step");
        assert_eq!(overlay.kind, OverlayBoot::DmSnapshot);
        assert!(overlay.why.contains("unknown"), "{}", overlay.why);
        assert!(
            overlay.why.contains("unsquashfs not found"),
            "{}",
            overlay.why
        );
        assert!(!overlay.why.contains("rootfs.img"), "{}", overlay.why);
    }

    #[test]
    fn a_root_image_that_is_no_filesystem_is_refused_without_force() {
        let live = live(RootKind::Unrecognised {
            reason:
                "LiveOS/squashfs.img is neither squashfs nor EROFS (it starts with 00 00 00 00)"
                    .into(),
        });
        match plan_new(&live, 8 * GIB, &opts()) {
            Err(e @ PlanError::UnrecognisedRoot(_)) => {
                let text = e.to_string();
                assert!(text.contains("neither squashfs nor EROFS"), "{text}");
                assert!(text.contains("--force"), "{text}");
            }
            other => panic!("{other:?}"),
        }
        let forced = WriteOptions {
            force: true,
            ..opts()
        };
        let plan = plan_new(&live, 8 * GIB, &forced).expect("written anyway with --force");
        assert!(
            plan.notes.iter().any(|n| n.contains("will not boot")),
            "{:?}",
            plan.notes
        );
    }

    #[test]
    fn flat_and_erofs_roots_get_overlayfs_without_the_flag() {
        for (root, format) in [(RootKind::Flat, "squashfs"), (RootKind::Erofs, "EROFS")] {
            let o = WriteOptions {
                overlay_size: Some(GIB),
                ..opts()
            };
            let plan = plan_new(&live(root.clone()), 8 * GIB, &o).expect("plans");
            let overlay = plan.overlay.as_ref().expect("an overlay step");
            assert_eq!(overlay.kind, OverlayBoot::OverlayFs, "{root:?}");
            assert!(
                overlay.why.contains("/LiveOS/squashfs.img") && overlay.why.contains(format),
                "{root:?}: {}",
                overlay.why
            );
            assert!(!overlay.why.contains("--overlayfs"), "{}", overlay.why);
            for line in cmdlines(config(&plan, "/EFI/BOOT/grub.cfg")) {
                let words: Vec<&str> = line.split(' ').collect();
                assert!(words.contains(&"rd.live.overlay=UUID=1234-ABCD"), "{line}");
                assert!(words.contains(&"rd.live.overlay.overlayfs"), "{line}");
            }
        }
    }

    #[test]
    fn overlayfs_flag_on_a_nested_root() {
        let o = WriteOptions {
            overlay_size: Some(GIB),
            overlayfs: true,
            dracut: DracutNames::Renamed,
            ..opts()
        };
        let plan = plan_new(&nested(), 8 * GIB, &o).expect("plans");
        let overlay = plan.overlay.as_ref().expect("an overlay step");
        assert_eq!(overlay.kind, OverlayBoot::OverlayFs);
        assert_eq!(overlay.why, "--overlayfs was given");
        // dracut-ng >= 110 spelling: one `rd.overlay=<devspec>` does both jobs.
        for line in cmdlines(config(&plan, "/syslinux/syslinux.cfg")) {
            let words: Vec<&str> = line.split(' ').collect();
            assert!(words.contains(&"rd.overlay=UUID=1234-ABCD:auto"), "{line}");
            assert!(!line.contains("rd.live.overlay"), "{line}");
        }

        let no_size = WriteOptions {
            overlayfs: true,
            ..opts()
        };
        assert!(matches!(
            plan_new(&nested(), 8 * GIB, &no_size),
            Err(PlanError::OverlayFsNeedsSize)
        ));
    }

    #[test]
    fn persistence_sizes_are_checked() {
        let cases: [(WriteOptions, &str); 6] = [
            (
                WriteOptions {
                    overlay_size: Some(4096 * MIB),
                    ..opts()
                },
                "overlay-size-mb",
            ),
            (
                WriteOptions {
                    home_size: Some(5000 * MIB),
                    ..opts()
                },
                "home-size-mb",
            ),
            (
                WriteOptions {
                    swap_size: Some(4096 * MIB),
                    ..opts()
                },
                "swap-size-mb",
            ),
            (
                WriteOptions {
                    overlay_size: Some(0),
                    ..opts()
                },
                "overlay-size-mb",
            ),
            (
                WriteOptions {
                    home_size: Some(MIB - 1),
                    ..opts()
                },
                "home-size-mb",
            ),
            (
                WriteOptions {
                    swap_size: Some(0),
                    ..opts()
                },
                "swap-size-mb",
            ),
        ];
        for (i, (o, name)) in cases.iter().enumerate() {
            match plan_new(&nested(), 16 * GIB, o) {
                // Over FAT32's file limit: the live system goes on ext4, saying why.
                Ok(plan) if i < 3 => {
                    let e = plan.ext4_live.expect("the ext4 live layout");
                    assert!(e.why.contains(name), "{}", e.why);
                    assert!(e.why.contains(if i == 1 { "5000" } else { "4096" }));
                }
                Err(PlanError::ZeroSize { option }) if i >= 3 => assert_eq!(option, *name),
                other => panic!("case {i} ({name}): {other:?}"),
            }
        }
        // The largest FAT32 file is allowed, for each of them.
        let max = WriteOptions {
            overlay_size: Some(4095 * MIB),
            home_size: Some(4095 * MIB),
            swap_size: Some(4095 * MIB),
            ..opts()
        };
        let plan = plan_new(&nested(), 16 * GIB, &max).expect("4095 MiB fits FAT32");
        assert_eq!(plan.overlay.map(|o| o.size), Some(4095 * MIB));
        assert_eq!(plan.home.map(|h| h.size), Some(4095 * MIB));
        assert_eq!(plan.swap.map(|s| s.size), Some(4095 * MIB));
    }

    #[test]
    fn too_small_target_is_refused_with_its_figures() {
        let with_overlay = WriteOptions {
            overlay_size: Some(GIB),
            ..opts()
        };
        // Both targets get 4 KiB clusters, so the need does not depend on the target.
        let needed = plan_new(&nested(), 8 * GIB, &with_overlay)
            .expect("fits 8 GiB")
            .space_needed;
        let available = plan_new(&nested(), 2 * GIB, &opts())
            .expect("the image alone fits 2 GiB")
            .space_available;
        assert!(needed > available);
        let err = plan_new(&nested(), 2 * GIB, &with_overlay).expect_err("2 GiB is too small");
        let (needed_mib, available_mib) = (mib_ceil(needed), available / MIB);
        match &err {
            PlanError::TooSmall {
                needed_mib: n,
                available_mib: a,
                short_mib: s,
            } => {
                assert_eq!((*n, *a), (needed_mib, available_mib));
                assert_eq!(*s, needed_mib - available_mib);
            }
            other => panic!("{other:?}"),
        }
        let message = err.to_string();
        assert!(
            message.contains(&format!("needs {needed_mib} MiB"))
                && message.contains(&format!("holds {available_mib} MiB")),
            "{message}"
        );

        // A disk too small for any FAT32 partition says so too.
        assert!(matches!(
            plan_new(&nested(), 16 * MIB, &opts()),
            Err(PlanError::Partition(
                partition::PartitionError::DiskTooSmall { .. }
            ))
        ));
    }

    #[test]
    fn persistence_is_allocated_not_written() {
        let bare = plan_new(&nested(), 8 * GIB, &opts()).expect("plans");
        let o = WriteOptions {
            overlay_size: Some(GIB),
            home_size: Some(512 * MIB),
            swap_size: Some(256 * MIB),
            ..opts()
        };
        let plan = plan_new(&nested(), 8 * GIB, &o).expect("plans");
        assert_eq!(
            plan.home.as_ref().map(|h| h.path.as_str()),
            Some("/LiveOS/home.img")
        );
        assert_eq!(
            plan.swap.as_ref().map(|s| s.path.as_str()),
            Some("/LiveOS/swap.img")
        );
        assert_eq!(bare.bytes_to_write, copied_bytes());
        assert_eq!(
            plan.bytes_to_write,
            copied_bytes(),
            "persistence is not written"
        );
        assert_eq!(
            plan.bytes_to_write,
            plan.copies.iter().map(|c| c.size).sum::<u64>()
        );
        // ... but its space is allocated.
        assert!(
            plan.space_needed >= bare.space_needed + GIB + 512 * MIB + 256 * MIB,
            "{} vs {}",
            plan.space_needed,
            bare.space_needed
        );
        assert_eq!(plan.space_available, bare.space_available);
    }

    #[test]
    fn bad_input_is_refused() {
        for label in ["", "TWELVE_CHARS", "has space", "ÜNICODE"] {
            let o = WriteOptions {
                label: Some(label.into()),
                ..opts()
            };
            assert!(
                matches!(
                    plan_new(&nested(), 8 * GIB, &o),
                    Err(PlanError::Fat(fat::FatError::InvalidLabel(l))) if l == label
                ),
                "label {label:?}"
            );
        }
        for dir in ["", "Live/OS", "..", "/LiveOS", "Live OS"] {
            let o = WriteOptions {
                live_dir: dir.into(),
                ..opts()
            };
            assert!(
                matches!(
                    plan_new(&nested(), 8 * GIB, &o),
                    Err(PlanError::InvalidLiveDir(d)) if d == dir
                ),
                "livedir {dir:?}"
            );
        }
        for (o, flag) in [
            (
                WriteOptions {
                    skipcopy: true,
                    ..opts()
                },
                "--skipcopy",
            ),
            (
                WriteOptions {
                    delete_home: true,
                    ..opts()
                },
                "--delete-home",
            ),
            (
                WriteOptions {
                    reset_overlay: true,
                    ..opts()
                },
                "--reset-overlay",
            ),
        ] {
            assert!(
                matches!(
                    plan_new(&nested(), 8 * GIB, &o),
                    Err(PlanError::NeedsExisting(f)) if f == flag
                ),
                "{flag}"
            );
        }
    }

    #[test]
    fn own_live_dir_moves_files_and_boot_args() {
        let o = WriteOptions {
            live_dir: "Fedora_42".into(),
            overlay_size: Some(GIB),
            ..opts()
        };
        let plan = plan_new(&nested(), 8 * GIB, &o).expect("plans");
        let d = dests(&plan);
        assert!(d.contains(&"/Fedora_42/squashfs.img".to_string()), "{d:?}");
        assert!(!d.iter().any(|p| p.starts_with("/LiveOS/")), "{d:?}");
        assert_eq!(
            plan.overlay.as_ref().map(|o| o.path.as_str()),
            Some("/Fedora_42/overlay-LIVE-1234-ABCD")
        );
        for line in cmdlines(config(&plan, "/EFI/BOOT/grub.cfg")) {
            assert!(
                line.split(' ').any(|w| w == "rd.live.dir=Fedora_42"),
                "{line}"
            );
        }
    }

    // --- installing into an existing stick ---

    const OLD_OVERLAY: &str = "/LiveOS/overlay-OLDLIVE-DEAD-BEEF";
    const STALE_OVERLAY: &str = "/LiveOS/overlay-OTHER-0000-0000";
    const FREE: u64 = 3 * GIB;

    fn stick() -> ExistingFs {
        ExistingFs {
            table: TableKind::Mbr,
            partition_start: MIB,
            partition_len: 8 * GIB - MIB,
            label: "OLDLIVE".into(),
            volume_id: 0xdead_beef,
            cluster_size: 4096,
            free_bytes: FREE,
            files: vec![
                // Listed before the current one: the current one is found by name.
                (STALE_OVERLAY.into(), 100 * MIB),
                ("/LiveOS/squashfs.img".into(), 1400 * MIB),
                ("/LiveOS/livemin.img".into(), 12 * MIB),
                (OLD_OVERLAY.into(), 512 * MIB),
                ("/LiveOS/home.img".into(), GIB),
                ("/LiveOS/swap.img".into(), 256 * MIB),
                ("/isolinux/vmlinuz".into(), 13 * MIB),
                ("/EFI/BOOT/BOOTX64.EFI".into(), 1024 * 1024),
                ("/syslinux/syslinux.cfg".into(), 4096),
                ("/Documents/notes.txt".into(), 40960),
            ],
            syslinux_cfg: Some("UI menu.c32\nLABEL old\n  KERNEL /isolinux/vmlinuz\n".into()),
            grub_cfg: None,
            root: None,
            overlay_used: Some(12 * MIB),
            ext4_live: None,
        }
    }

    /// A stick of the ext4 live layout: boot files on the FAT, the live directory on
    /// ext4 partition 2 (listed with the FAT's files, as `read_existing` lists them).
    fn ext4_stick(free: u64) -> ExistingFs {
        let uuid = "0b6c8a4e-1d2f-4c3b-9a8e-7f6d5c4b3a21";
        let overlay = format!("/LiveOS/overlay-OLDLIVE-{uuid}");
        let live_files: Vec<(String, u64)> = vec![
            ("/LiveOS/squashfs.img".into(), 1400 * MIB),
            ("/LiveOS/squashfs.img.new".into(), 700 * MIB),
            (overlay, 6 * GIB),
            ("/LiveOS/home.img".into(), 5 * GIB),
            ("/LiveOS/.livestick".into(), 200),
        ];
        let mut fs = stick();
        fs.files = vec![
            ("/isolinux/vmlinuz".into(), 13 * MIB),
            ("/syslinux/syslinux.cfg".into(), 4096),
            ("/LiveOS/livestick.json".into(), 2000),
        ];
        fs.files.extend(live_files.clone());
        fs.partition_len = 1024 * MIB;
        fs.free_bytes = 700 * MIB;
        fs.root = Some(RootMatch::same("the test says so"));
        fs.ext4_live = Some(crate::disk::ext4_live::ExistingLive {
            number: 2,
            start: 1025 * MIB,
            len: 16 * GIB,
            uuid: uuid.into(),
            label: "OLDLIVE".into(),
            free_bytes: free,
            needs_recovery: false,
            replay_hint: None,
            files: live_files,
        });
        fs
    }

    #[test]
    fn an_ext4_stick_is_rewritten_in_place_keeping_overlay_and_home() {
        let plan = plan_existing(&nested(), ext4_stick(4 * GIB), &opts()).expect("plans");
        let e = plan.ext4_live.as_ref().expect("the ext4 layout is kept");
        assert!(e.in_place && plan.format.is_none());
        assert_eq!((e.start, e.len), (1025 * MIB, 16 * GIB));
        assert!(e.copies.iter().any(|c| c.dest == "/LiveOS/squashfs.img"));
        assert!(!plan.copies.iter().any(|c| c.dest.starts_with("/LiveOS/")));
        // The leftover of a stopped rewrite goes, on ext4, not on the FAT.
        assert_eq!(e.deletes, ["/LiveOS/squashfs.img.new"]);
        assert!(plan.deletes.is_empty(), "{:?}", plan.deletes);
        let kept = plan.kept_overlay.as_ref().expect("overlay kept");
        assert!(!kept.reset, "{kept:?}");
        assert!(kept.to.ends_with(&e.uuid));
        assert_eq!(plan.kept_home.as_deref(), Some("/LiveOS/home.img"));
        assert!(plan.overlay.is_none() && plan.home.is_none());
        assert!(plan.root_record.is_some());
        for c in &plan.configs {
            if c.content.contains("root=live:") {
                assert!(c.content.contains(&format!("root=live:UUID={}", e.uuid)));
            }
        }
        assert!(plan.to_table().contains("kept as it is"));
        // A changed root empties the overlay in place (no new overlay file).
        let mut changed = ext4_stick(4 * GIB);
        changed.root = Some(RootMatch::changed("another ISO"));
        let plan = plan_existing(&live(RootKind::Flat), changed, &opts()).expect("plans");
        assert!(plan.kept_overlay.as_ref().is_some_and(|k| k.reset));
        assert!(plan.overlay.is_none());
    }

    #[test]
    fn an_ext4_stick_without_room_or_with_a_journal_to_replay_is_refused() {
        // 1400 MiB to write beside the old image, 700 MiB of leftover freed first.
        match plan_existing(&nested(), ext4_stick(500 * MIB), &opts()) {
            Err(e @ PlanError::Ext4InPlaceNoRoom { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains("1200 MiB free") && text.contains("--format"),
                    "{text}"
                );
            }
            other => panic!("{other:?}"),
        }
        let mut dirty = ext4_stick(4 * GIB);
        if let Some(l) = dirty.ext4_live.as_mut() {
            l.needs_recovery = true;
        }
        assert!(matches!(
            plan_existing(&nested(), dirty, &opts()),
            Err(PlanError::Ext4NeedsReplay { partition: 2, .. })
        ));
        let relabel = WriteOptions {
            label: Some("OTHER".into()),
            ..opts()
        };
        assert!(matches!(
            plan_existing(&nested(), ext4_stick(4 * GIB), &relabel),
            Err(PlanError::Ext4InPlaceUnsupported(_))
        ));
    }

    #[test]
    fn existing_stick_keeps_home_and_renames_the_overlay() {
        let plan = plan_existing(&nested(), stick(), &opts()).expect("plans");
        assert!(plan.format.is_none(), "no new table");
        assert_eq!(
            (plan.partition_start, plan.partition_len),
            (MIB, 8 * GIB - MIB)
        );
        assert_eq!(plan.fs_uuid, "DEAD-BEEF", "the stick keeps its volume id");
        assert_eq!(plan.label, "OLDLIVE");
        assert!(plan.relabel.is_none());
        assert_eq!(plan.kept_home.as_deref(), Some("/LiveOS/home.img"));
        assert!(plan.home.is_none());
        let kept = plan.kept_overlay.as_ref().expect("the overlay is kept");
        assert_eq!(kept.from, OLD_OVERLAY);
        assert_eq!(kept.to, OLD_OVERLAY);
        assert_eq!(kept.size, 512 * MIB);
        assert!(kept.reset, "a new root image empties the old overlay");
        assert!(plan.overlay.is_none());
        // The kept overlay is booted: the configs name it.
        for line in cmdlines(config(&plan, "/syslinux/syslinux.cfg")) {
            assert!(
                line.split(' ')
                    .any(|w| w == "rd.live.overlay=UUID=DEAD-BEEF"),
                "{line}"
            );
        }
        // Old live files this ISO lacks and other overlays go; the home, the
        // swap and anything outside the live directory stay.
        assert_eq!(
            sorted(plan.deletes.clone()),
            ["/LiveOS/livemin.img", STALE_OVERLAY]
        );
        assert_eq!(dests(&plan), expected_copies());
        // Space: what is free plus what this write replaces or deletes.
        let reclaimed = 100 * MIB + 1400 * MIB + 12 * MIB + 13 * MIB + 1024 * 1024 + 4096;
        assert_eq!(plan.space_available, FREE + reclaimed);
    }

    #[test]
    fn existing_stick_relabel_renames_the_overlay_and_reset_follows_flags() {
        let o = WriteOptions {
            label: Some("NEWLIVE".into()),
            ..opts()
        };
        let plan = plan_existing(&nested(), stick(), &o).expect("plans");
        assert_eq!(plan.label, "NEWLIVE");
        assert_eq!(plan.relabel.as_deref(), Some("NEWLIVE"));
        let kept = plan.kept_overlay.as_ref().expect("the overlay is kept");
        assert_eq!(kept.from, OLD_OVERLAY);
        assert_eq!(kept.to, "/LiveOS/overlay-NEWLIVE-DEAD-BEEF");
        assert!(kept.reset);
        assert!(config(&plan, "/syslinux/syslinux.cfg").contains("NEWLIVE"));

        // --skipcopy: only configs; the overlay still describes the same root.
        let skip = WriteOptions {
            skipcopy: true,
            ..opts()
        };
        let plan = plan_existing(&nested(), stick(), &skip).expect("plans");
        assert!(plan.copies.is_empty(), "{:?}", plan.copies);
        assert_eq!(plan.bytes_to_write, 0);
        assert!(!plan.configs.is_empty());
        let kept = plan.kept_overlay.as_ref().expect("the overlay is kept");
        assert!(!kept.reset, "same root image: the overlay stays valid");
        // Old live files are not touched without a copy; stale overlays still go.
        assert_eq!(plan.deletes, [STALE_OVERLAY]);

        let skip_reset = WriteOptions {
            skipcopy: true,
            reset_overlay: true,
            ..opts()
        };
        let plan = plan_existing(&nested(), stick(), &skip_reset).expect("plans");
        assert!(plan.kept_overlay.as_ref().is_some_and(|k| k.reset));
    }

    fn stick_with_root(root: RootMatch) -> ExistingFs {
        let mut fs = stick();
        fs.root = Some(root);
        fs.files.push(("/LiveOS/.livestick".into(), 300));
        fs
    }

    #[test]
    fn same_root_image_keeps_the_overlay_content() {
        let fs = stick_with_root(RootMatch::same("same size and sha256"));
        let plan = plan_existing(&nested(), fs, &opts()).expect("plans");
        let kept = plan.kept_overlay.as_ref().expect("the overlay is kept");
        assert!(
            !kept.reset,
            "the same root image keeps what the overlay holds"
        );
        assert!(
            kept.why.contains("unchanged: same size and sha256"),
            "{}",
            kept.why
        );
        assert_eq!(kept.used, Some(12 * MIB));
        let text = plan.to_table();
        assert!(
            text.contains(&format!(
                "keeps {OLD_OVERLAY} (512 MiB), kept with its 12 MiB of changes"
            )),
            "{text}"
        );
        // The root image is still copied, and its record written beside it, not deleted.
        assert!(dests(&plan).contains(&"/LiveOS/squashfs.img".to_string()));
        let record = plan.root_record.as_ref().expect("a record");
        assert_eq!(record.path, "/LiveOS/livestick.json");
        assert_eq!(record.root_image, "/LiveOS/squashfs.img");
        // The old stick's `.livestick` goes: the manifest carries the record now.
        assert!(plan.deletes.iter().any(|d| d == "/LiveOS/.livestick"));
        assert!(!plan.deletes.iter().any(|d| d.ends_with("livestick.json")));
        let json = serde_json::to_value(&plan).expect("serialises");
        assert_eq!(json["kept_overlay"]["reset"], false);
        assert!(
            json["kept_overlay"]["why"]
                .as_str()
                .is_some_and(|w| w.contains("unchanged"))
        );
    }

    #[test]
    fn changed_root_image_empties_the_overlay_and_names_what_is_lost() {
        let fs = stick_with_root(RootMatch::changed(
            "/LiveOS/squashfs.img is 1400 MiB on the stick and 1500 MiB in the ISO",
        ));
        let plan = plan_existing(&nested(), fs, &opts()).expect("plans");
        let kept = plan.kept_overlay.as_ref().expect("the overlay is kept");
        assert!(kept.reset);
        assert!(
            kept.why.starts_with("the root image changes: "),
            "{}",
            kept.why
        );
        let text = plan.to_table();
        assert!(
            text.contains(&format!(
                "keeps {OLD_OVERLAY} (512 MiB), emptied, its 12 MiB of changes lost: the root image changes"
            )),
            "{text}"
        );
        let json = serde_json::to_value(&plan).expect("serialises");
        assert_eq!(json["kept_overlay"]["reset"], true);
        assert_eq!(json["kept_overlay"]["used_bytes"], 12 * MIB);

        // Not compared (no facts): emptied, as before this comparison existed.
        let plan = plan_existing(&nested(), stick(), &opts()).expect("plans");
        let kept = plan.kept_overlay.as_ref().expect("the overlay is kept");
        assert!(kept.reset);
        assert!(kept.why.contains("not compared"), "{}", kept.why);
    }

    #[test]
    fn reset_overlay_empties_even_the_same_root_and_skipcopy_keeps_even_an_unknown_one() {
        let reset = WriteOptions {
            reset_overlay: true,
            ..opts()
        };
        let fs = stick_with_root(RootMatch::same("same ISO"));
        let plan = plan_existing(&nested(), fs, &reset).expect("plans");
        let kept = plan.kept_overlay.as_ref().expect("the overlay is kept");
        assert!(kept.reset);
        assert_eq!(kept.why, "--reset-overlay was given");

        let skip = WriteOptions {
            skipcopy: true,
            ..opts()
        };
        let fs = stick_with_root(RootMatch::changed("not read"));
        let plan = plan_existing(&nested(), fs, &skip).expect("plans");
        assert!(plan.kept_overlay.as_ref().is_some_and(|k| !k.reset));
        assert!(
            plan.root_record.is_none(),
            "no root image copied, no record"
        );
        assert!(!plan.deletes.iter().any(|d| d.ends_with(".livestick")));
    }

    #[test]
    fn an_emptied_overlayfs_overlay_is_made_anew_not_zeroed() {
        let fs = stick_with_root(RootMatch::changed("another release"));
        let plan = plan_existing(&live(RootKind::Flat), fs, &opts()).expect("plans");
        let kept = plan.kept_overlay.as_ref().expect("named as emptied");
        assert!(kept.reset);
        let overlay = plan.overlay.as_ref().expect("made anew");
        assert_eq!(
            (overlay.path.as_str(), overlay.size, overlay.kind),
            (OLD_OVERLAY, 512 * MIB, OverlayBoot::OverlayFs)
        );
        let kept_plan = plan_existing(
            &live(RootKind::Flat),
            stick_with_root(RootMatch::same("same")),
            &opts(),
        )
        .expect("plans");
        assert!(kept_plan.overlay.is_none(), "a kept one is left as it is");
        assert_eq!(
            plan.space_available,
            kept_plan.space_available + 512 * MIB,
            "the old overlay's space comes back for the new one"
        );
        assert_eq!(
            plan.space_needed,
            kept_plan.space_needed + 512 * MIB,
            "{}",
            plan.to_table()
        );
    }

    #[test]
    fn current_overlay_is_the_one_named_for_label_and_uuid() {
        assert_eq!(
            stick().current_overlay("LiveOS"),
            Some((OLD_OVERLAY.to_string(), 512 * MIB))
        );
        assert_eq!(stick().current_overlay("Second"), None);
    }

    #[test]
    fn existing_stick_new_overlay_replaces_the_old_one() {
        let o = WriteOptions {
            overlay_size: Some(GIB),
            ..opts()
        };
        let plan = plan_existing(&nested(), stick(), &o).expect("plans");
        assert!(plan.kept_overlay.is_none());
        let overlay = plan.overlay.as_ref().expect("a new overlay");
        assert_eq!(overlay.path, OLD_OVERLAY, "same label and UUID, same name");
        let deletes = sorted(plan.deletes.clone());
        assert!(deletes.contains(&OLD_OVERLAY.to_string()), "{deletes:?}");
        assert!(deletes.contains(&STALE_OVERLAY.to_string()), "{deletes:?}");
    }

    #[test]
    fn existing_home_needs_delete_home_to_be_replaced() {
        let o = WriteOptions {
            home_size: Some(GIB),
            ..opts()
        };
        match plan_existing(&nested(), stick(), &o) {
            Err(PlanError::HomeExists { path }) => assert_eq!(path, "/LiveOS/home.img"),
            other => panic!("{other:?}"),
        }

        let delete = WriteOptions {
            delete_home: true,
            ..opts()
        };
        let plan = plan_existing(&nested(), stick(), &delete).expect("plans");
        assert!(plan.kept_home.is_none());
        assert!(plan.home.is_none());
        assert!(plan.deletes.contains(&"/LiveOS/home.img".to_string()));
        let kept = plan_existing(&nested(), stick(), &opts()).expect("plans");
        assert_eq!(
            plan.space_available,
            kept.space_available + GIB,
            "the deleted home's space comes back"
        );

        let replace = WriteOptions {
            delete_home: true,
            home_size: Some(2 * GIB),
            home_encryption: HomeEncryption::Luks,
            ..opts()
        };
        let plan = plan_existing(&nested(), stick(), &replace).expect("plans");
        assert!(plan.deletes.contains(&"/LiveOS/home.img".to_string()));
        let home = plan.home.as_ref().expect("a new home");
        assert_eq!(home.path, "/LiveOS/home.img");
        assert_eq!(home.size, 2 * GIB);
        assert_eq!(home.encryption, HomeEncryption::Luks);
    }

    #[test]
    fn existing_stick_too_full_is_refused() {
        let full = ExistingFs {
            free_bytes: 0,
            ..stick()
        };
        // Reclaimed space (~1.5 GiB) is less than the new image, and the
        // kept home and overlay are not given back.
        match plan_existing(&nested(), full, &opts()) {
            Err(PlanError::TooSmall {
                needed_mib,
                available_mib,
                short_mib,
            }) => {
                assert_eq!(short_mib, needed_mib - available_mib);
                assert_eq!(available_mib, (100 + 1400 + 12 + 13 + 1));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn existing_overlay_kept_with_overlayfs_boots_as_overlayfs() {
        let o = WriteOptions {
            overlayfs: true,
            skipcopy: true,
            ..opts()
        };
        let plan = plan_existing(&nested(), stick(), &o).expect("no size needed: one is kept");
        assert!(plan.overlay.is_none());
        assert_eq!(
            plan.kept_overlay.as_ref().map(|k| k.from.as_str()),
            Some(OLD_OVERLAY)
        );
        for line in cmdlines(config(&plan, "/EFI/BOOT/grub.cfg")) {
            let words: Vec<&str> = line.split(' ').collect();
            assert!(words.contains(&"rd.live.overlay=UUID=DEAD-BEEF"), "{line}");
            assert!(words.contains(&"rd.live.overlay.overlayfs"), "{line}");
        }
    }

    #[test]
    fn multi_adds_an_image_beside_the_first() {
        let o = WriteOptions {
            multi: true,
            live_dir: "Second".into(),
            ..opts()
        };
        let plan = plan_existing(&nested(), stick(), &o).expect("plans");
        let d = dests(&plan);
        // Boot files under the new directory; the first image's EFI loaders stay.
        assert!(d.contains(&"/Second/squashfs.img".to_string()), "{d:?}");
        assert!(d.contains(&"/Second/isolinux/vmlinuz".to_string()), "{d:?}");
        assert!(
            d.contains(&"/Second/images/pxeboot/initrd.img".to_string()),
            "{d:?}"
        );
        assert!(!d.iter().any(|p| p.starts_with("/EFI/")), "{d:?}");
        assert!(!d.contains(&"/isolinux/vmlinuz".to_string()), "{d:?}");
        // The first image is left alone.
        assert!(plan.deletes.is_empty(), "{:?}", plan.deletes);
        assert!(plan.kept_home.is_none() && plan.kept_overlay.is_none());
        let own = config(&plan, "/Second/syslinux/syslinux.cfg");
        assert!(own.contains("/Second/isolinux/vmlinuz"), "{own}");
        assert!(own.contains("CONFIG /syslinux/syslinux.cfg"), "{own}");
        let main = config(&plan, "/syslinux/syslinux.cfg");
        assert!(
            main.contains("CONFIG /Second/syslinux/syslinux.cfg"),
            "{main}"
        );
        assert!(main.contains("LABEL old"), "{main}");

        let same = WriteOptions {
            multi: true,
            ..opts()
        };
        assert!(matches!(
            plan_existing(&nested(), stick(), &same),
            Err(PlanError::MultiSameDir(d)) if d == "LiveOS"
        ));

        // A first image in a directory of its own (--livedir My_Live): that one is
        // taken, whatever the case; the default LiveOS is free.
        let mut moved = stick();
        for (path, _) in &mut moved.files {
            if let Some(rest) = path.strip_prefix("/LiveOS/") {
                *path = format!("/My_Live/{rest}");
            }
        }
        let clash = WriteOptions {
            multi: true,
            live_dir: "my_live".into(),
            ..opts()
        };
        assert!(matches!(
            plan_existing(&nested(), moved.clone(), &clash),
            Err(PlanError::MultiSameDir(d)) if d == "My_Live"
        ));
        let plan = plan_existing(&nested(), moved, &same).expect("LiveOS is free");
        assert!(dests(&plan).contains(&"/LiveOS/squashfs.img".to_string()));

        // An image --multi added (its kernel under its directory) is installed again
        // in place.
        let mut added = stick();
        added.files.extend([
            ("/Second/squashfs.img".to_string(), 1400 * MIB),
            ("/Second/isolinux/vmlinuz".to_string(), 13 * MIB),
        ]);
        let again = WriteOptions {
            multi: true,
            live_dir: "Second".into(),
            ..opts()
        };
        plan_existing(&nested(), added, &again).expect("the added image is replaced");
    }

    #[test]
    fn partition_size_needs_a_new_table() {
        let o = WriteOptions {
            partition_size: Some(4 * GIB),
            ..opts()
        };
        assert!(matches!(
            plan_existing(&nested(), stick(), &o),
            Err(PlanError::PartitionSizeNeedsFormat)
        ));
    }

    /// A signed GRUB reads its vendor directory's config (Debian's
    /// /EFI/debian/grub.cfg): the stick's menu goes there too, and the ISO's,
    /// which names the ISO's label, is not copied.
    #[test]
    fn every_grub_cfg_under_efi_gets_the_sticks_menu() {
        let mut live = nested();
        for path in ["/EFI/debian/grub.cfg", "/EFI/fedora/GRUB.CFG"] {
            live.efi_files.push(FileInfo {
                path: path.into(),
                size: 700,
            });
        }
        let plan = plan_new(&live, 8 * GIB, &opts()).unwrap();
        let dests: Vec<&str> = plan.configs.iter().map(|c| c.dest.as_str()).collect();
        assert_eq!(
            dests,
            [
                "/syslinux/syslinux.cfg",
                "/EFI/debian/grub.cfg",
                "/EFI/fedora/GRUB.CFG",
                "/EFI/BOOT/grub.cfg"
            ]
        );
        let efi_boot = config(&plan, "/EFI/BOOT/grub.cfg");
        assert_eq!(config(&plan, "/EFI/debian/grub.cfg"), efi_boot);
        assert_eq!(config(&plan, "/EFI/fedora/GRUB.CFG"), efi_boot);
        assert!(
            plan.copies.iter().all(|c| !is_grub_cfg(&c.dest)),
            "no ISO grub.cfg copied: {:?}",
            dests_of_copies(&plan)
        );
    }

    fn dests_of_copies(plan: &Plan) -> Vec<&str> {
        plan.copies.iter().map(|c| c.dest.as_str()).collect()
    }

    /// What checks the source is in the plan, and a source nothing checks is
    /// told apart from one whose check was turned off.
    #[test]
    fn the_plan_says_what_checks_the_source() {
        let plan = plan_new(&nested(), 8 * GIB, &opts()).unwrap();
        assert_eq!(plan.iso_check, IsoCheck::ImplantedMd5);
        assert!(
            !plan.notes.iter().any(|n| n.contains("MD5")),
            "{:?}",
            plan.notes
        );
        let json = serde_json::to_value(&plan).unwrap();
        assert_eq!(json["iso_check"], "implanted-md5");

        let skipped = WriteOptions {
            noverify: true,
            ..opts()
        };
        let plan = plan_new(&nested(), 8 * GIB, &skipped).unwrap();
        assert_eq!(plan.iso_check, IsoCheck::Skipped);
        assert_eq!(serde_json::to_value(&plan).unwrap()["iso_check"], "skipped");
        assert!(
            plan.notes.iter().any(|n| n.contains("--noverify")),
            "{:?}",
            plan.notes
        );

        for noverify in [false, true] {
            let mut bare = nested();
            bare.implanted_md5 = false;
            let o = WriteOptions { noverify, ..opts() };
            let plan = plan_new(&bare, 8 * GIB, &o).unwrap();
            assert_eq!(plan.iso_check, IsoCheck::None);
            assert_eq!(serde_json::to_value(&plan).unwrap()["iso_check"], "none");
            assert!(
                plan.notes
                    .iter()
                    .any(|n| n.contains("nothing checks") && n.contains("no implanted MD5")),
                "{:?}",
                plan.notes
            );
        }

        let mut stick = nested();
        stick.source_kind = SourceKind::Stick;
        let plan = plan_new(&stick, 8 * GIB, &opts()).unwrap();
        assert_eq!(plan.iso_check, IsoCheck::None);
        assert!(
            plan.notes.iter().any(|n| n.contains("source stick")),
            "{:?}",
            plan.notes
        );
    }

    /// An initrd whose dracut version cannot be read: the classic spelling, and the
    /// plan says so (issue 12, bad input).
    #[test]
    fn an_unreadable_dracut_version_is_noted() {
        let o = WriteOptions {
            dracut_unknown: true,
            ..opts()
        };
        let plan = plan_new(&nested(), 8 * GIB, &o).unwrap();
        assert!(
            plan.notes
                .iter()
                .any(|n| n.contains("dracut version") && n.contains("--dracut-names renamed")),
            "{:?}",
            plan.notes
        );
        let quiet = plan_new(&nested(), 8 * GIB, &opts()).unwrap();
        assert!(!quiet.notes.iter().any(|n| n.contains("dracut version")));
    }

    #[test]
    fn ext4_live_layout_places_two_partitions_and_names_the_ext4_uuid() {
        let o = WriteOptions {
            overlay_size: Some(6144 * MIB),
            home_size: Some(64 * MIB),
            ..opts()
        };
        let plan = plan_new(&nested(), 12 * GIB, &o).expect("fits 12 GiB");
        let e = plan.ext4_live.as_ref().expect("ext4 layout");
        let fat = plan.format.as_ref().expect("new table");
        assert_eq!(fat.len, e.fat_len);
        assert_eq!(e.start, fat.start + fat.len);
        assert!(e.start + e.len <= 12 * GIB);
        // The live directory moved off the FAT; the root record goes beside the root
        // image, inside the ext4 partition (apply writes it there).
        assert!(plan.copies.iter().all(|c| !c.dest.starts_with("/LiveOS/")));
        assert!(e.copies.iter().any(|c| c.dest == "/LiveOS/squashfs.img"));
        assert!(
            plan.root_record
                .as_ref()
                .is_some_and(|r| r.path == "/LiveOS/.livestick")
        );
        // dracut names the overlay by the ext4 label and UUID.
        let overlay = plan.overlay.as_ref().expect("overlay");
        assert_eq!(overlay.path, format!("/LiveOS/overlay-LIVE-{}", e.uuid));
        for c in &plan.configs {
            if c.content.contains("root=live:") {
                assert!(
                    c.content.contains(&format!("root=live:UUID={}", e.uuid)),
                    "{}",
                    c.content
                );
                assert!(
                    !c.content.contains(&format!("UUID={}", plan.fs_uuid)),
                    "{}",
                    c.content
                );
            }
        }
        assert!(plan.to_table().contains("partition 2:     ext4"));
    }

    #[test]
    fn ext4_live_layout_refusals_carry_figures() {
        let big = WriteOptions {
            overlay_size: Some(6144 * MIB),
            ..opts()
        };
        match plan_new(&nested(), 4 * GIB, &big) {
            Err(e @ PlanError::Ext4TooSmall { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains("too small by") && text.contains("MiB"),
                    "{text}"
                );
            }
            other => panic!("{other:?}"),
        }
        match plan_write(&nested(), &new_image(), 8 * GIB, Some(stick()), &big, None) {
            Err(e @ PlanError::Ext4NeedsFormat { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains("--format") && text.contains("MiB free"),
                    "{text}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn partition_size_with_ext4_sizes_the_live_partition() {
        let sized = WriteOptions {
            ext4_live: true,
            partition_size: Some(2048 * MIB),
            ..opts()
        };
        let plan = plan_new(&nested(), 8 * GIB, &sized).expect("plan");
        let e = plan.ext4_live.as_ref().expect("ext4 layout");
        assert_eq!(e.len, 2048 * MIB);
        assert_eq!(e.start, plan.partition_start + e.fat_len);
        // Larger than the disk holds after the FAT: refused with the maximum.
        let huge = WriteOptions {
            partition_size: Some(9000 * MIB),
            ..sized.clone()
        };
        match plan_new(&nested(), 8 * GIB, &huge) {
            Err(e @ PlanError::Ext4PartitionTooLarge { .. }) => {
                let text = e.to_string();
                assert!(text.contains("9000") && text.contains("at most"), "{text}");
            }
            other => panic!("{other:?}"),
        }
        // Too small for the root image and the persistence: the figures.
        let small = WriteOptions {
            partition_size: Some(2 * MIB),
            overlay_size: Some(600 * MIB),
            ..sized
        };
        assert!(matches!(
            plan_new(&nested(), 8 * GIB, &small),
            Err(PlanError::Ext4TooSmall { .. })
        ));
    }
}
