//! Command-line types (clap). Kept apart from the logic: each subcommand's
//! arguments are plain data handed to one function in `commands/`.
//!
//! Also the rest of the command-line contract: the exit codes
//! (`docs/exit-codes.md`) and the hints printed with errors, so that the
//! binary's `main` stays a thin `match` and the mapping is unit-tested.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

const EXAMPLES: &str = "\
Examples:
  livestick inspect Fedora-Workstation-Live-41.iso
  livestick write Fedora.iso stick.img --size 8G --overlay-size-mb 2048
  livestick write Fedora.iso /dev/sdb --overlay-size-mb 4095 --home-size-mb 1024 --unencrypted-home
  livestick write Fedora.iso /dev/sdb --dry-run --json";

/// `--version`: the version, the cargo features compiled in, and the target.
/// `-V` prints only the version line.
static LONG_VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    // Add `#[cfg(feature = …)]`-gated names here as cargo features appear;
    // none exist yet, and naming an undeclared feature is a compile warning.
    let features: &[&str] = &[];
    format!(
        "{}\nfeatures: {}\ntarget: {}-{}\nexternal programs: run `livestick doctor`",
        env!("CARGO_PKG_VERSION"),
        if features.is_empty() {
            "none (default build)".to_string()
        } else {
            features.join(", ")
        },
        std::env::consts::ARCH,
        std::env::consts::OS,
    )
});

#[derive(Debug, Parser)]
#[command(
    name = "livestick",
    version,
    long_version = LONG_VERSION.as_str(),
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
    /// Maintain a persistent overlay: status, merge, reset, recover, grow
    #[command(
        after_help = "Examples:\n  livestick overlay status LiveOS/overlay-LIVE-1234-ABCD\n  livestick overlay merge LiveOS/overlay-LIVE-1234-ABCD --squashfs LiveOS/squashfs.img\n  livestick overlay grow LiveOS/overlay-LIVE-1234-ABCD --add-mb 1024"
    )]
    Overlay {
        #[command(subcommand)]
        command: crate::commands::overlay::OverlayCommand,
    },
    /// Persistent home: info (size, use, encryption) and resize (grow)
    #[command(
        after_help = "Examples:\n  livestick home info /dev/sdb\n  livestick home info stick.img --passphrase-file pass.txt --json\n  livestick home resize /dev/sdb --size-mb 2048"
    )]
    Home {
        #[command(subcommand)]
        command: crate::commands::home::HomeCommand,
    },
    /// List the sticks this machine has, what is on them, and whether livestick would write them
    #[command(
        after_help = "Examples:\n  livestick devices\n  livestick devices --all --json | jq '.devices[].path'"
    )]
    Devices(crate::commands::devices::DevicesArgs),
    /// livecd-iso-to-disk compatible front end: the old options and positionals
    #[command(
        name = "iso-to-disk",
        disable_help_flag = true,
        long_about = "Accepts livecd-iso-to-disk's command line (`[options] <source> <target>`) \
and runs the equivalent `livestick write`. Installing livestick as (or symlinking it to) \
`livecd-iso-to-disk` does the same. `livestick iso-to-disk --help` lists every old option \
with its status; docs/compatibility.md explains each.",
        after_help = ISO_TO_DISK_EXAMPLES
    )]
    IsoToDisk(IsoToDiskArgs),
    /// Check the external programs each feature needs, and which package provides each
    #[command(
        after_help = "Examples:\n  livestick doctor\n  livestick doctor --json | jq '.programs[] | select(.found == false)'"
    )]
    Doctor(DoctorArgs),
    /// Print a shell completion script
    #[command(
        after_help = "Examples:\n  livestick completions bash > /etc/bash_completion.d/livestick\n  livestick completions zsh > \"${fpath[1]}/_livestick\"\n  livestick completions fish > ~/.config/fish/completions/livestick.fish"
    )]
    Completions(CompletionsArgs),
    /// Print the manual page (roff), covering every subcommand
    #[command(
        after_help = "Examples:\n  livestick man > /usr/local/share/man/man1/livestick.1\n  livestick man | man -l -\n  livestick man --dir /usr/local/share/man/man1   # one page per subcommand"
    )]
    Man(ManArgs),
    /// Internal: the EROFS merge steps a non-root `overlay merge` runs under fakeroot
    #[command(name = "internal-fakeroot-step", hide = true)]
    InternalFakerootStep {
        /// The job file the parent wrote
        job: std::path::PathBuf,
    },
}

const ISO_TO_DISK_EXAMPLES: &str = "\
Examples:
  livestick iso-to-disk --format --efi --overlay-size-mb 2048 Fedora.iso /dev/sdb
  livestick iso-to-disk --reset-overlay Fedora.iso /dev/sdb1
  ln -s livestick /usr/local/bin/livecd-iso-to-disk   # scripts keep working";

#[derive(Debug, Args)]
pub struct IsoToDiskArgs {
    /// livecd-iso-to-disk options followed by <source> <target>
    #[arg(
        num_args = 0..,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    pub args: Vec<OsString>,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to generate completions for
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write one page per command (livestick.1, livestick-write.1, …) into DIR
    /// instead of printing a single page with every subcommand
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
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
    /// Boot menu timeout in seconds; 0 boots the default entry at once,
    /// `forever` (or -1) waits for a choice
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout, allow_hyphen_values = true)]
    pub timeout: Option<u32>,
    /// SYSLINUX total timeout in seconds: boot the default even while the user
    /// is browsing the menu
    #[arg(long, value_name = "SECONDS")]
    pub total_timeout: Option<u32>,

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

    // Options livecd-iso-to-disk users know under other spellings.
    /// With --format: make the live partition N MiB instead of the whole disk
    #[arg(long, value_name = "N")]
    pub partition_size_mb: Option<u64>,
    /// Install beside an existing live image (its own directory and menu entries)
    #[arg(long)]
    pub multi: bool,
    /// Copy FILE to the stick as updates.img and boot the installer with inst.updates= it
    #[arg(long, value_name = "FILE")]
    pub updates: Option<PathBuf>,
    /// Copy FILE to the stick as ks.cfg and boot the installer with inst.ks= it
    #[arg(long, value_name = "FILE")]
    pub ks: Option<PathBuf>,
}

/// `--timeout`: whole seconds, or `forever`/`-1` for "wait for a choice"
/// (`boot::render::WAIT_FOREVER`).
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

/// The full clap command: the derived one, plus examples for subcommands
/// defined elsewhere that do not carry their own yet (every `--help` shows
/// examples; a test checks it).
pub fn command() -> clap::Command {
    Cli::command().mut_subcommand("overlay", |overlay| {
        let examples = [
            (
                "reset",
                "Examples:\n  livestick overlay reset LiveOS/overlay-LIVE-1234-ABCD --dry-run\n  livestick overlay reset LiveOS/overlay-LIVE-1234-ABCD --yes",
            ),
            (
                "recover",
                "Examples:\n  livestick overlay recover LiveOS/overlay-LIVE-1234-ABCD --origin-size 6G --dry-run\n  livestick overlay recover overlay.img --origin rootfs.img --add-mb 512",
            ),
            (
                "grow",
                "Examples:\n  livestick overlay grow LiveOS/overlay-LIVE-1234-ABCD --add-mb 1024\n  livestick overlay grow overlay.img --size-mb 4095 --dry-run",
            ),
        ];
        examples
            .into_iter()
            .fold(overlay, |overlay, (name, text)| {
                overlay.mut_subcommand(name, |sub| {
                    if sub.get_after_help().is_none() {
                        sub.after_help(text)
                    } else {
                        sub
                    }
                })
            })
    })
}

/// Parses `argv` (program name first) with [`command`].
pub fn parse_from<I, T>(argv: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    parse_with_step(argv).map(|(cli, _)| cli)
}

/// Like [`parse_from`], also naming the subcommand path ("write",
/// "overlay merge") that errors report as the failing step.
pub fn parse_with_step<I, T>(argv: I) -> Result<(Cli, String), clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut cmd = command();
    let matches = cmd.try_get_matches_from_mut(argv)?;
    let mut step = Vec::new();
    let mut m = &matches;
    while let Some((name, sub)) = m.subcommand() {
        step.push(name);
        m = sub;
    }
    let step = step.join(" ");
    Cli::from_arg_matches(&matches)
        .map(|cli| (cli, step))
        .map_err(|e| e.format(&mut cmd))
}

/// What went wrong, as far as a script needs to know: each kind has an exit
/// code (`docs/exit-codes.md`) and a hint for a human.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// Exit 1: the command line is wrong (unknown option, missing argument,
    /// a livecd-iso-to-disk option livestick refuses).
    Usage,
    /// Exit 2: the inputs are wrong (bad ISO, target too small, invalid
    /// label, a feature not available in this build).
    BadInput,
    /// Exit 3: the target was refused for safety (mounted, in use, not
    /// removable, no confirmation); nothing was written.
    Refused,
    /// Exit 4: reading or writing failed, or a needed program failed.
    Io,
    /// Exit 5: several targets were written and some of them failed.
    PartialBatch,
}

impl ErrorKind {
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::Usage => 1,
            ErrorKind::BadInput => 2,
            ErrorKind::Refused => 3,
            ErrorKind::Io => 4,
            ErrorKind::PartialBatch => 5,
        }
    }

    pub fn hint(self) -> &'static str {
        match self {
            ErrorKind::Usage => {
                "run `livestick help <command>` for the options; `livestick iso-to-disk --help` for the livecd-iso-to-disk ones"
            }
            ErrorKind::BadInput => {
                "nothing was written; fix the input named above (`livestick inspect ISO` shows what livestick sees in an ISO)"
            }
            ErrorKind::Refused => {
                "nothing was written; check that this is the stick you mean — the message names the option that overrides the check"
            }
            ErrorKind::Io => {
                "check the device and its connection (dmesg), free space, and `livestick doctor` for missing programs; then run the same command again"
            }
            ErrorKind::PartialBatch => {
                "the targets that succeeded are complete; run the command again for the ones listed as failed"
            }
        }
    }
}

/// Classifies an error by the typed errors in its chain. Anything unknown is
/// an I/O failure: it is the safe reading for a script (retry, do not assume
/// the input was at fault).
pub fn error_kind(err: &anyhow::Error) -> ErrorKind {
    use crate::disk::target::TargetError;
    for cause in err.chain() {
        if cause.is::<crate::commands::write::PartialBatchFailure>() {
            return ErrorKind::PartialBatch;
        }
        if let Some(c) = cause.downcast_ref::<crate::compat::CompatError>() {
            return c.kind();
        }
        if let Some(i) = cause.downcast_ref::<crate::disk::identity::IdentityError>() {
            return match i {
                crate::disk::identity::IdentityError::Io { .. } => ErrorKind::BadInput,
                _ => ErrorKind::Refused,
            };
        }
        if let Some(t) = cause.downcast_ref::<TargetError>() {
            return match t {
                TargetError::Busy { .. } | TargetError::NotRemovable(_) => ErrorKind::Refused,
                TargetError::Io { .. } => ErrorKind::Io,
                _ => ErrorKind::BadInput,
            };
        }
        if cause.is::<crate::commands::write::BadInput>()
            || cause.is::<crate::plan::PlanError>()
            || cause.is::<crate::source::live::LiveError>()
            || cause.is::<crate::size::SizeError>()
        {
            return ErrorKind::BadInput;
        }
        if cause.is::<clap::Error>() {
            return ErrorKind::Usage;
        }
        if cause.is::<crate::commands::NoConfirmation>() {
            return ErrorKind::Refused;
        }
    }
    ErrorKind::Io
}
