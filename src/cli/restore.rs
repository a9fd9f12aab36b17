//! `livestick restore` arguments.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

/// The file system of the restored stick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RestoreFs {
    /// FAT32: every system reads it; files up to 4 GiB
    Fat32,
    /// exFAT (needs `mkfs.exfat` from exfatprogs): files over 4 GiB
    Exfat,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The stick (block device or image file) to turn back into plain storage
    pub target: PathBuf,
    /// Label of the new file system (FAT32 and exFAT: up to 11 characters)
    #[arg(long, value_name = "NAME", default_value = "USB")]
    pub label: String,
    /// File system of the one partition
    #[arg(long = "fs", value_enum, default_value = "fat32", value_name = "FS")]
    pub fs: RestoreFs,
    /// First copy LiveOS/home.img to FILE (a new file, not on the stick), checked by
    /// sha256; with an existing directory, every home of the stick (a --multi stick
    /// has several) goes into it as <live dir>-home.img
    #[arg(long, value_name = "FILE|DIR")]
    pub save_home: Option<PathBuf>,
    /// Erase without asking (scripts)
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Allow a device that does not report itself as removable
    #[arg(long)]
    pub force: bool,
    /// Show what would be done and stop
    #[arg(long)]
    pub dry_run: bool,
}
