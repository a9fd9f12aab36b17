//! `livestick verify` arguments.

use std::path::PathBuf;

use clap::Args;

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The stick (block device or image file) written by livestick
    pub target: PathBuf,
    /// The ISO it was written from: also check that it is the recorded one (size,
    /// implanted MD5) and that every copied file's record matches the ISO's file
    #[arg(long, value_name = "ISO")]
    pub iso: Option<PathBuf>,
    /// Also check the persistence file systems: `e2fsck -fn` on the home and an
    /// OverlayFS overlay (read-only), every exception of a dm-snapshot overlay
    #[arg(long)]
    pub deep: bool,
    /// With --deep: the passphrase of an encrypted home, which is then unlocked in
    /// memory and checked with `e2fsck -fn` (without it, the home is reported as not
    /// checked)
    #[command(flatten)]
    pub pass: crate::cli::home::PassArgs,
}
