//! `livestick write` arguments, which the livecd-iso-to-disk front end
//! (`cli::compat`) also produces.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

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

// `write --help` groups its options under these headings (in this order: clap
// shows a heading where its first option is declared).
const SOURCE: &str = "Source";
const TARGET: &str = "Target & layout";
const PERSIST: &str = "Persistence";
const BOOT: &str = "Boot";
const VERIFY: &str = "Verification";
const OUTPUT: &str = "Output";
const SAFETY: &str = "Safety";

#[derive(Debug, Clone, Args)]
pub struct WriteArgs {
    /// The live ISO to write (or a stick written by livestick), or a raw disk image
    /// (.raw, .img, also xz/zstd/gzip/bzip2 compressed) to write as it is: a file,
    /// an http(s):// URL (downloaded and verified first) or a release name like
    /// fedora:42/workstation/x86_64
    #[arg(help_heading = SOURCE)]
    pub iso: PathBuf,
    /// The sticks (block devices) or image files to write to; several are
    /// written at once from one read of the ISO
    #[arg(required_unless_present_any = ["wait_for", "download_only"], num_args = 1.., help_heading = TARGET)]
    pub targets: Vec<PathBuf>,
    /// Wait for N sticks to be plugged in and write each as it appears
    #[arg(long, value_name = "N", help_heading = TARGET)]
    pub wait_for: Option<usize>,
    /// With --wait-for: give up waiting after DURATION (90s, 10m, 1h; a plain
    /// number is seconds). The sticks plugged in by then are written and
    /// reported; the batch ends as partial (exit 5), or exit 2 if none came
    #[arg(long, value_name = "DURATION", requires = "wait_for", value_parser = parse_duration, help_heading = TARGET)]
    pub wait_timeout: Option<std::time::Duration>,

    /// Create or grow an image file to this size (4G, 8GiB, 512M, …)
    #[arg(long, value_name = "SIZE", help_heading = TARGET)]
    pub size: Option<String>,
    /// Create a new partition table and FAT32 filesystem (erases the target).
    /// The default when the target is new or has no partition table.
    #[arg(long, help_heading = TARGET)]
    pub format: bool,
    /// Never format: install into the existing FAT partition, keeping other files
    #[arg(long, conflicts_with = "format", help_heading = TARGET)]
    pub noformat: bool,
    /// Partition table for --format
    #[arg(long, value_enum, default_value_t = TableArg::Mbr, help_heading = TARGET)]
    pub table: TableArg,
    /// Shorthand for --table gpt
    #[arg(long, conflicts_with = "table", help_heading = TARGET)]
    pub gpt: bool,
    /// FAT volume label for --format (1-11 of A-Z a-z 0-9 _ -)
    #[arg(long, help_heading = TARGET)]
    pub label: Option<String>,
    /// Directory for squashfs.img, the overlay and home.img on the stick
    #[arg(long = "live-dir", visible_alias = "livedir", value_name = "DIR", default_value = "LiveOS", help_heading = TARGET)]
    pub livedir: String,

    /// Put the live system on an ext4 partition beside a small FAT boot partition
    /// (erases the target), as livecd-iso-to-disk's ext4 sticks were: persistence
    /// files may then be larger than 4095 MiB. Chosen by itself for a new or
    /// --format'ed target when --overlay-size-mb/--home-size-mb/--swap-size-mb is
    /// over 4095
    #[arg(long, conflicts_with = "noformat", help_heading = TARGET)]
    pub ext4: bool,
    /// Persistent overlay of N MiB (at most 4095 on FAT32; larger puts the live
    /// system on an ext4 partition, see --ext4)
    #[arg(long, value_name = "N", help_heading = PERSIST)]
    pub overlay_size_mb: Option<u64>,
    /// Make the overlay an OverlayFS upper layer instead of a device-mapper snapshot
    #[arg(long, help_heading = PERSIST)]
    pub overlayfs: bool,
    /// Persistent /home image of N MiB (LUKS-encrypted unless --unencrypted-home)
    #[arg(long, value_name = "N", help_heading = PERSIST)]
    pub home_size_mb: Option<u64>,
    /// Make home.img plain ext4
    #[arg(long, help_heading = PERSIST)]
    pub unencrypted_home: bool,
    /// Read the home passphrase from FILE (its bytes exactly, one final newline dropped)
    #[arg(long, value_name = "FILE", help_heading = PERSIST)]
    pub passphrase_file: Option<PathBuf>,
    /// Read the home passphrase from standard input
    #[arg(long, conflicts_with = "passphrase_file", help_heading = PERSIST)]
    pub passphrase_stdin: bool,
    /// LUKS key derivation for home.img
    #[arg(long, value_name = "KDF", value_parser = ["argon2id", "pbkdf2"], help_heading = PERSIST)]
    pub luks_pbkdf: Option<String>,
    /// LUKS key-derivation time in milliseconds
    #[arg(long, value_name = "MS", help_heading = PERSIST)]
    pub luks_iter_time: Option<u32>,
    /// LUKS argon2 memory cost in KiB
    #[arg(long, value_name = "KIB", help_heading = PERSIST)]
    pub luks_pbkdf_memory: Option<u32>,
    /// On an existing stick: keep the overlay file but empty it (renamed to the new label/UUID)
    #[arg(long, help_heading = PERSIST)]
    pub reset_overlay: bool,
    /// On an existing stick: only rewrite boot configs and the boot loader
    #[arg(long, alias = "reconfig", help_heading = BOOT)]
    pub skipcopy: bool,
    /// Delete an existing home.img instead of keeping it (asks first)
    #[arg(long, help_heading = PERSIST)]
    pub delete_home: bool,
    /// When the source is another stick: carry its overlay over
    #[arg(long, help_heading = SOURCE)]
    pub copy_overlay: bool,
    /// When the source is another stick: carry its home.img over
    #[arg(long, help_heading = SOURCE)]
    pub copy_home: bool,
    /// Overlay argument spelling for the ISO's dracut (auto detects it from the initrd)
    #[arg(long, value_enum, default_value_t = DracutNamesArg::Auto, help_heading = BOOT)]
    pub dracut_names: DracutNamesArg,
    /// Swap image of N MiB
    #[arg(long, value_name = "N", help_heading = PERSIST)]
    pub swap_size_mb: Option<u64>,

    /// Extra kernel arguments for every boot entry (replace same-named ones)
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true, help_heading = BOOT)]
    pub extra_kernel_args: Option<String>,
    /// Boot menu timeout in seconds; 0 boots the default entry at once,
    /// `forever` (or -1) waits for a choice
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout, allow_hyphen_values = true, help_heading = BOOT)]
    pub timeout: Option<u32>,
    /// SYSLINUX total timeout in seconds: boot the default even while the user
    /// is browsing the menu
    #[arg(long, value_name = "SECONDS", help_heading = BOOT)]
    pub total_timeout: Option<u32>,

    /// Write the image byte for byte as a raw disk image, even a live ISO
    /// (a disk image that is not a live ISO is written so without it)
    #[arg(long, help_heading = SOURCE)]
    pub dd: bool,
    /// bmaptool block map of a raw image (default: IMAGE.bmap beside it, if
    /// present, except with --dd): only its mapped ranges are written, each checked
    #[arg(long, value_name = "FILE", help_heading = VERIFY)]
    pub bmap: Option<PathBuf>,

    /// Source check: do not check the ISO against the MD5 implanted in it
    /// (checkisomd5's check of the download, before anything is written); for a
    /// raw image, do not check its block map's per-range checksums.
    /// Not the read-back (see --no-verify-write), and not a CHECKSUM file given
    /// or found beside the image, which is still checked
    #[arg(long, help_heading = VERIFY)]
    pub noverify: bool,
    /// Target check: do not read the stick back after writing (the comparison
    /// of every written byte with what was meant, which catches a failing
    /// stick). Not the ISO's own MD5: see --noverify
    #[arg(long, help_heading = VERIFY)]
    pub no_verify_write: bool,
    /// Print the plan and write nothing
    #[arg(long, help_heading = OUTPUT)]
    pub dry_run: bool,
    /// Answer yes to every confirmation
    #[arg(long, short, help_heading = SAFETY)]
    pub yes: bool,
    /// Write to a non-removable disk
    #[arg(long, help_heading = SAFETY)]
    pub force: bool,
    /// FAT volume id (hex, e.g. 1234ABCD); random by default. For reproducible images.
    #[arg(long, hide = true, help_heading = SAFETY)]
    pub volume_id: Option<String>,

    // Options livecd-iso-to-disk users know under other spellings.
    /// With --format: make the live partition N MiB instead of the whole disk
    #[arg(long, value_name = "N", help_heading = TARGET)]
    pub partition_size_mb: Option<u64>,
    /// Install beside an existing live image (its own directory and menu entries)
    #[arg(long, help_heading = TARGET)]
    pub multi: bool,
    /// Copy FILE to the stick as updates.img and boot the installer with inst.updates= it
    #[arg(long, value_name = "FILE", help_heading = BOOT)]
    pub updates: Option<PathBuf>,
    /// Copy FILE to the stick as ks.cfg and boot the installer with inst.ks= it
    #[arg(long, value_name = "FILE", help_heading = BOOT)]
    pub ks: Option<PathBuf>,

    #[command(flatten)]
    pub source_check: SourceCheckArgs,
}

/// Checking the source against a published checksum, and downloading it.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Source")]
pub struct SourceCheckArgs {
    /// The image's CHECKSUM file (path, or URL for a downloaded source): its
    /// signature and the image's sha256 are checked before anything is written,
    /// even with --noverify. Default: a *-CHECKSUM file beside the image
    #[arg(long, value_name = "FILE|URL")]
    pub checksum: Option<String>,
    /// OpenPGP public keys that may sign the CHECKSUM (a file or a directory of
    /// key files). Default: Fedora's keys in /etc/pki/rpm-gpg and
    /// /usr/share/distribution-gpg-keys/fedora
    #[arg(long, value_name = "FILE|DIR")]
    pub keyring: Option<PathBuf>,
    /// Use a CHECKSUM that is not signed (or whose signature cannot be checked
    /// for want of a key), or download a URL with no CHECKSUM at all
    #[arg(long)]
    pub allow_unsigned: bool,
    /// Where a URL source is downloaded (default $XDG_CACHE_HOME/livestick or
    /// ~/.cache/livestick); an interrupted download resumes from there
    #[arg(long, value_name = "DIR")]
    pub download_dir: Option<PathBuf>,
    /// Download and verify the source, print its path, and write nothing
    #[arg(long)]
    pub download_only: bool,
    /// Trust the certificate authorities in this PEM file too, for https:// sources
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Seconds to wait for a server to connect or to send more data
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub download_timeout: u64,
    /// The releases.json that fedora:VERSION/VARIANT/ARCH names are looked up in
    #[arg(long, value_name = "URL")]
    pub releases_url: Option<String>,
}

/// `--timeout`: whole seconds, or `forever`/`-1` for "wait for a choice"
/// (`boot::render::WAIT_FOREVER`).
/// `90`, `90s`, `10m`, `1h`: a wait of at least one second.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let scale = match unit {
        "s" | "sec" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        _ => 0,
    };
    number
        .parse::<u64>()
        .ok()
        .filter(|&n| n > 0 && scale > 0)
        .and_then(|n| n.checked_mul(scale))
        .map(std::time::Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is not a duration such as 90s, 10m or 1h"))
}

pub fn parse_timeout(text: &str) -> Result<u32, String> {
    match text {
        "forever" | "-1" => Ok(crate::boot::render::WAIT_FOREVER),
        _ => text
            .parse::<u32>()
            .ok()
            .filter(|&s| s != crate::boot::render::WAIT_FOREVER)
            .ok_or_else(|| format!("{text:?} is not a number of seconds or `forever`")),
    }
}

impl Default for SourceCheckArgs {
    /// What the command line gives when none of these options is used (the
    /// livecd-iso-to-disk front end has none of them).
    fn default() -> Self {
        SourceCheckArgs {
            checksum: None,
            keyring: None,
            allow_unsigned: false,
            download_dir: None,
            download_only: false,
            ca_file: None,
            download_timeout: 30,
            releases_url: None,
        }
    }
}

impl SourceCheckArgs {
    /// The options `source::download` takes, with the defaults of what was not
    /// given: a timeout of at least a second, Fedora's releases.json.
    pub fn download_options(&self) -> crate::source::download::DownloadOptions {
        crate::source::download::DownloadOptions {
            dir: self.download_dir.clone(),
            checksum: self.checksum.clone(),
            keyring: self.keyring.clone(),
            allow_unsigned: self.allow_unsigned,
            ca_file: self.ca_file.clone(),
            timeout: std::time::Duration::from_secs(self.download_timeout.max(1)),
            releases_url: self
                .releases_url
                .clone()
                .unwrap_or_else(|| crate::source::releases::DEFAULT_RELEASES_URL.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "0", "soon", "5d", "-1", "1.5m"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
