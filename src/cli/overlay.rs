//! `livestick overlay status|merge|reset|recover|grow` arguments.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::squash::Compressor;

#[derive(Debug, Subcommand)]
pub enum OverlayCommand {
    /// What `dmsetup status` would print for the overlay, plus chunk size, exceptions,
    /// percent used and bytes free
    #[command(
        after_help = "Examples:\n  livestick overlay status LiveOS/overlay-Fedora-41-1-5-1a2b-3c4d\n  livestick overlay status overlay.img --origin rootfs.img --json"
    )]
    Status(StatusArgs),
    /// Merge the overlay into a new squashfs.img (recompressed), then reset the overlay;
    /// or, with --origin, merge it into a bare root image like dm `snapshot-merge`
    #[command(
        after_help = "Examples:\n  livestick overlay merge LiveOS/overlay-L-U --squashfs LiveOS/squashfs.img --workdir /var/tmp\n  livestick overlay merge overlay.img --origin rootfs.img            # in place, like snapshot-merge\n  livestick overlay merge overlay.img --origin rootfs.img --output merged.img"
    )]
    Merge(MergeArgs),
    /// Empty the overlay (a new store); everything it holds is lost
    #[command(
        after_help = "Examples:\n  livestick overlay reset LiveOS/overlay-LIVE-1234-ABCD --dry-run\n  livestick overlay reset LiveOS/overlay-LIVE-1234-ABCD --yes"
    )]
    Reset(ResetArgs),
    /// Make an overlay the kernel marked Invalid usable again (after validating it).
    /// An overlay that is only full (dmsetup shows Overflow; current kernels with
    /// dracut's `PO` table stop there) stays valid: give it room with `grow`.
    /// An OverlayFS overlay has no Invalid mark: its ext4 is checked with
    /// `e2fsck -f -n` (nothing changed) and repaired with --repair (`e2fsck -f -y`)
    #[command(
        after_help = "Examples:\n  livestick overlay recover LiveOS/overlay-LIVE-1234-ABCD --origin-size 6G --dry-run\n  livestick overlay recover overlay.img --origin rootfs.img --add-mb 512"
    )]
    Recover(RecoverArgs),
    /// Make the overlay file larger, keeping every change in it (an OverlayFS
    /// overlay: its ext4 is grown with resize2fs after `e2fsck -f -p`)
    #[command(
        after_help = "Examples:\n  livestick overlay grow LiveOS/overlay-LIVE-1234-ABCD --add-mb 1024\n  livestick overlay grow overlay.img --size-mb 4095 --dry-run"
    )]
    Grow(GrowArgs),
}

#[derive(Debug, Args)]
pub struct OriginArgs {
    /// The root image the overlay belongs to (rootfs.img), for range checks
    #[arg(long, value_name = "IMAGE")]
    pub origin: Option<PathBuf>,
    /// The root image's size instead of the image itself (e.g. 6G)
    #[arg(long, value_name = "SIZE", conflicts_with = "origin")]
    pub origin_size: Option<String>,
}

/// Which overlay on a stick (ignored for a bare overlay file).
#[derive(Debug, Args)]
pub struct StickSel {
    /// Directory of the live files on the stick
    #[arg(
        long,
        visible_alias = "livedir",
        value_name = "DIR",
        default_value = "LiveOS"
    )]
    pub live_dir: String,
    /// Work on this overlay file of the live dir instead of overlay-LABEL-UUID (e.g. an
    /// orphaned one whose name no longer matches the stick)
    #[arg(long, value_name = "NAME")]
    pub overlay_file: Option<String>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Stick (block device or image file) or bare overlay file (LiveOS/overlay-LABEL-UUID)
    pub target: PathBuf,
    #[command(flatten)]
    pub sel: StickSel,
    #[command(flatten)]
    pub origin: OriginArgs,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Stick (block device or image file) or bare overlay file (LiveOS/overlay-LABEL-UUID)
    pub target: PathBuf,
    #[command(flatten)]
    pub sel: StickSel,
    /// Plumbing: merge into this bare root image (in place unless --output); no squashfs
    #[arg(long, value_name = "IMAGE", conflicts_with = "squashfs")]
    pub origin: Option<PathBuf>,
    /// With --origin: write the merged image here and change neither input
    #[arg(long, value_name = "FILE", requires = "origin")]
    pub output: Option<PathBuf>,
    /// The squashfs.img holding the root image (default: squashfs.img next to the overlay)
    #[arg(long, value_name = "PATH")]
    pub squashfs: Option<PathBuf>,
    /// Where to extract and rebuild (needs the root image size plus the new squashfs)
    #[arg(long, value_name = "DIR", default_value = "/var/tmp")]
    pub workdir: PathBuf,
    /// Do not run `e2fsck -f -p` on the merged root image
    #[arg(long)]
    pub no_fsck: bool,
    /// Compressor for the new squashfs (default: the one the old image used)
    #[arg(long, value_enum)]
    pub compress: Option<Compressor>,
    /// Print the plan (with the space needed) and change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Do not ask for confirmation (a merge on a stick rewrites its squashfs.img)
    #[arg(long, short)]
    pub yes: bool,
    /// EROFS roots: rebuild even when the image's xattrs cannot be carried over
    /// (livestick cannot read them from this image and fsck.erofs does not extract
    /// them); the new image then has no SELinux labels or file capabilities
    #[arg(long)]
    pub allow_xattr_loss: bool,
}

#[derive(Debug, Args)]
pub struct ResetArgs {
    /// Stick (block device or image file) or bare overlay file (LiveOS/overlay-LABEL-UUID)
    pub target: PathBuf,
    #[command(flatten)]
    pub sel: StickSel,
    /// Do not ask for confirmation
    #[arg(long, short)]
    pub yes: bool,
    /// Say what would be lost and change nothing
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct RecoverArgs {
    /// Stick (block device or image file) or bare overlay file (LiveOS/overlay-LABEL-UUID)
    pub target: PathBuf,
    #[command(flatten)]
    pub sel: StickSel,
    #[command(flatten)]
    pub origin: OriginArgs,
    /// Also grow the overlay by this many MiB (an overlay that was invalidated because
    /// it ran full would run full again on the next writes)
    #[arg(long, value_name = "N")]
    pub add_mb: Option<u64>,
    /// Then run `e2fsck -f -y` on the file system seen through the overlay and write
    /// what it repaired into the overlay (OverlayFS: on the overlay's own ext4)
    #[arg(long)]
    pub repair: bool,
    /// With --repair on a bare overlay file: the squashfs.img holding the root image
    /// (default: squashfs.img next to the overlay), unless --origin is given
    #[arg(long, value_name = "PATH", conflicts_with = "origin")]
    pub squashfs: Option<PathBuf>,
    /// With --repair: where to build the repaired view (needs the root image's size);
    /// an OverlayFS overlay on a stick is checked and repaired in a copy here (needs
    /// the overlay's size)
    #[arg(long, value_name = "DIR", default_value = "/var/tmp")]
    pub workdir: PathBuf,
    /// Answer yes to every confirmation (for scripts; this command keeps every
    /// change in the overlay, so it asks none today)
    #[arg(long, short)]
    pub yes: bool,
    /// Show what would be done and change nothing
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("amount").required(true).args(["size_mb", "add_mb"])))]
pub struct GrowArgs {
    /// Stick (block device or image file) or bare overlay file (LiveOS/overlay-LABEL-UUID)
    pub target: PathBuf,
    #[command(flatten)]
    pub sel: StickSel,
    /// New total size in MiB (at most 4095: the FAT file size limit)
    #[arg(long, value_name = "N")]
    pub size_mb: Option<u64>,
    /// Add this many MiB
    #[arg(long, value_name = "N")]
    pub add_mb: Option<u64>,
    /// OverlayFS overlay on a stick: where it is copied to be checked and resized
    /// (needs room for the grown overlay; only the blocks resize2fs changes are
    /// written back)
    #[arg(long, value_name = "DIR", default_value = "/var/tmp")]
    pub workdir: PathBuf,
    /// Answer yes to every confirmation (for scripts; this command keeps every
    /// change in the overlay, so it asks none today)
    #[arg(long, short)]
    pub yes: bool,
    /// Show the new size and change nothing
    #[arg(long)]
    pub dry_run: bool,
}
