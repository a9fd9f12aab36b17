//! `livestick home info|resize` arguments.

use std::path::PathBuf;

use clap::{Args, Subcommand};

#[derive(Debug, Subcommand)]
pub enum HomeCommand {
    /// Size, use, label and encryption of LiveOS/home.img
    #[command(
        after_help = "Examples:\n  livestick home info /dev/sdb\n  livestick home info stick.img --passphrase-file key.txt --json\n  livestick home info home.img"
    )]
    Info(InfoArgs),
    /// Make home.img larger (never smaller), with the ext4 filesystem inside it
    #[command(
        after_help = "Examples:\n  livestick home resize /dev/sdb --size-mb 2048\n  livestick home resize stick.img --size-mb 512 --passphrase-file key.txt --dry-run"
    )]
    Resize(ResizeArgs),
}

/// Where the passphrase of an encrypted home comes from.
#[derive(Debug, Args)]
pub struct PassArgs {
    /// Read the passphrase from FILE (its bytes exactly, one final newline dropped)
    #[arg(long, value_name = "FILE", conflicts_with = "passphrase_stdin")]
    pub passphrase_file: Option<PathBuf>,
    /// Read the passphrase from standard input
    #[arg(long)]
    pub passphrase_stdin: bool,
}

#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Stick (block device or image file) or a bare home.img
    pub target: PathBuf,
    /// Directory of the live files on the stick
    #[arg(
        long,
        visible_alias = "livedir",
        value_name = "DIR",
        default_value = "LiveOS"
    )]
    pub live_dir: String,
    #[command(flatten)]
    pub pass: PassArgs,
}

#[derive(Debug, Args)]
pub struct ResizeArgs {
    /// Stick (block device or image file) or a bare home.img
    pub target: PathBuf,
    /// New size in MiB: larger than now, at most 4095 (the FAT file size limit)
    #[arg(long, value_name = "N")]
    pub size_mb: u64,
    /// Directory of the live files on the stick
    #[arg(
        long,
        visible_alias = "livedir",
        value_name = "DIR",
        default_value = "LiveOS"
    )]
    pub live_dir: String,
    /// Where the temporary copy of a stick's home goes (a private subdirectory is
    /// made); an encrypted home stays encrypted there, it is decrypted in memory only
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<PathBuf>,
    #[command(flatten)]
    pub pass: PassArgs,
    /// Answer yes to every confirmation (for scripts; growing keeps every file,
    /// so it asks none today)
    #[arg(long, short)]
    pub yes: bool,
    /// Show the plan and check every limit, change nothing
    #[arg(long)]
    pub dry_run: bool,
}
