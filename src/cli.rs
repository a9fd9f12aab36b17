//! Command-line types (clap). Kept apart from the logic: each subcommand's
//! arguments are plain data handed to one function in `commands/`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

const EXAMPLES: &str = "\
Examples:
  livestick inspect Fedora-Workstation-Live-41.iso
  livestick write Fedora.iso stick.img --size 8G --overlay-size-mb 2048
  livestick write Fedora.iso /dev/sdb --overlay-size-mb 4095 --home-size-mb 1024 --unencrypted-home
  livestick write Fedora.iso /dev/sdb --dry-run --json";

#[derive(Debug, Parser)]
#[command(
    name = "livestick",
    version,
    about = "Write Fedora-style live ISOs to USB sticks with persistence, and maintain them — in user space",
    after_help = EXAMPLES,
    propagate_version = true
)]
pub struct Cli {
    /// Print machine-readable JSON on stdout instead of tables
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress bars or notes; errors only
    #[arg(long, short, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show what a live ISO holds: label, layout, squashfs, kernels, boot menus, EFI files
    #[command(
        after_help = "Examples:\n  livestick inspect Fedora.iso\n  livestick inspect Fedora.iso --json | jq .label"
    )]
    Inspect(InspectArgs),
    /// Write a live ISO to a stick or image file, with persistence
    #[command(after_help = EXAMPLES)]
    Write(Box<WriteArgs>),
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The live ISO image
    pub iso: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TableArg {
    Mbr,
    Gpt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DracutNamesArg {
    Auto,
    Classic,
    Renamed,
}

#[derive(Debug, Args)]
pub struct WriteArgs {
    /// The live ISO image to write
    pub iso: PathBuf,
    /// The sticks (block devices) or image files to write to; several are
    /// written at once from one read of the ISO
    #[arg(required_unless_present = "wait_for", num_args = 1..)]
    pub targets: Vec<PathBuf>,
    /// Wait for N sticks to be plugged in and write each as it appears
    #[arg(long, value_name = "N")]
    pub wait_for: Option<usize>,

    /// Create or grow an image file to this size (4G, 8GiB, 512M, …)
    #[arg(long, value_name = "SIZE")]
    pub size: Option<String>,
    /// Create a new partition table and FAT32 filesystem (erases the target).
    /// The default when the target is new or has no partition table.
    #[arg(long)]
    pub format: bool,
    /// Never format: install into the existing FAT partition, keeping other files
    #[arg(long, conflicts_with = "format")]
    pub noformat: bool,
    /// Partition table for --format
    #[arg(long, value_enum, default_value_t = TableArg::Mbr)]
    pub table: TableArg,
    /// Shorthand for --table gpt
    #[arg(long, conflicts_with = "table")]
    pub gpt: bool,
    /// FAT volume label for --format (1-11 of A-Z a-z 0-9 _ -)
    #[arg(long)]
    pub label: Option<String>,
    /// Directory for squashfs.img, the overlay and home.img on the stick
    #[arg(long, default_value = "LiveOS")]
    pub livedir: String,

    /// Persistent overlay of N MiB (at most 4095 on FAT32)
    #[arg(long, value_name = "N")]
    pub overlay_size_mb: Option<u64>,
    /// Make the overlay an OverlayFS upper layer instead of a device-mapper snapshot
    #[arg(long)]
    pub overlayfs: bool,
    /// Persistent /home image of N MiB (LUKS-encrypted unless --unencrypted-home)
    #[arg(long, value_name = "N")]
    pub home_size_mb: Option<u64>,
    /// Make home.img plain ext4
    #[arg(long)]
    pub unencrypted_home: bool,
    /// Read the home passphrase from FILE (its bytes exactly, one final newline dropped)
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// Read the home passphrase from standard input
    #[arg(long, conflicts_with = "passphrase_file")]
    pub passphrase_stdin: bool,
    /// LUKS key derivation for home.img
    #[arg(long, value_name = "KDF", value_parser = ["argon2id", "pbkdf2"])]
    pub luks_pbkdf: Option<String>,
    /// LUKS key-derivation time in milliseconds
    #[arg(long, value_name = "MS")]
    pub luks_iter_time: Option<u32>,
    /// LUKS argon2 memory cost in KiB
    #[arg(long, value_name = "KIB")]
    pub luks_pbkdf_memory: Option<u32>,
    /// On an existing stick: keep the overlay file but empty it (renamed to the new label/UUID)
    #[arg(long)]
    pub reset_overlay: bool,
    /// On an existing stick: only rewrite boot configs and the boot loader
    #[arg(long, alias = "reconfig")]
    pub skipcopy: bool,
    /// Delete an existing home.img instead of keeping it (asks first)
    #[arg(long)]
    pub delete_home: bool,
    /// When the source is another stick: carry its overlay over
    #[arg(long)]
    pub copy_overlay: bool,
    /// When the source is another stick: carry its home.img over
    #[arg(long)]
    pub copy_home: bool,
    /// Overlay argument spelling for the ISO's dracut (auto detects it from the initrd)
    #[arg(long, value_enum, default_value_t = DracutNamesArg::Auto)]
    pub dracut_names: DracutNamesArg,
    /// Swap image of N MiB
    #[arg(long, value_name = "N")]
    pub swap_size_mb: Option<u64>,

    /// Extra kernel arguments for every boot entry (replace same-named ones)
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub extra_kernel_args: Option<String>,
    /// Boot menu timeout in seconds
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u32>,

    /// Skip checking the ISO's implanted MD5
    #[arg(long)]
    pub noverify: bool,
    /// Skip reading back what was written
    #[arg(long)]
    pub no_verify_write: bool,
    /// Print the plan and write nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Answer yes to every confirmation
    #[arg(long, short)]
    pub yes: bool,
    /// Write to a non-removable disk
    #[arg(long)]
    pub force: bool,
    /// FAT volume id (hex, e.g. 1234ABCD); random by default. For reproducible images.
    #[arg(long, hide = true)]
    pub volume_id: Option<String>,
}
