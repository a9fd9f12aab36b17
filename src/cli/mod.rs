//! Command-line types (clap). Kept apart from the logic: each subcommand's
//! arguments are plain data handed to one function in `commands/`, and
//! nothing here imports `commands/`.
//!
//! Also the rest of the command-line contract: which exit code an error
//! gets (`error_kind`, by the kinds of `crate::error`), so that the binary's
//! `main` stays a thin `match` and the mapping is unit-tested.

pub mod compat;
pub mod devices;
pub mod home;
pub mod overlay;
pub mod restore;
pub mod verify;
pub mod write;

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::error::{Classifier, Classify, ErrorKind, classifier};
use write::WriteArgs;

/// The hidden step a non-root EROFS `overlay merge` runs under fakeroot
/// (`livestick internal-fakeroot-step JOB`). It is recognised in `main` before
/// clap parses anything, so it never appears in help, completions or the man
/// page, which list only what a user may type.
pub const FAKEROOT_STEP: &str = "internal-fakeroot-step";

/// The commands that only print a fixed text (a script, a page): `--json` and
/// `--quiet` mean nothing there, so their help does not offer them and giving
/// them is a usage error.
const WITHOUT_OUTPUT_OPTIONS: [&str; 2] = ["completions", "man"];

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
    #[arg(long, global = true, help_heading = "Output")]
    pub json: bool,
    /// No progress bars or notes; errors only
    #[arg(long, short, global = true, help_heading = "Output")]
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
        command: overlay::OverlayCommand,
    },
    /// Persistent home: info (size, use, encryption) and resize (grow)
    #[command(
        after_help = "Examples:\n  livestick home info /dev/sdb\n  livestick home info stick.img --passphrase-file pass.txt --json\n  livestick home resize /dev/sdb --size-mb 2048"
    )]
    Home {
        #[command(subcommand)]
        command: home::HomeCommand,
    },
    /// List the sticks this machine has, what is on them, and whether livestick would write them
    #[command(
        after_help = "Examples:\n  livestick devices\n  livestick devices --all --json | jq '.devices[].target'"
    )]
    Devices(devices::DevicesArgs),
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
    /// Check that a stick still holds what livestick wrote: every file re-read and hashed
    #[command(
        after_help = "Examples:\n  livestick verify /dev/sdb\n  livestick verify /dev/sdb --iso Fedora.iso --deep\n  livestick verify stick.img --json | jq .overall\n\nExit 0: intact. Exit 4: a file changed or missing, a persistence problem, or an ISO that does not match. Exit 2: no manifest (a stick written by another tool or an older livestick)."
    )]
    Verify(verify::VerifyArgs),
    /// Turn a stick back into plain storage: one FAT32 (or exFAT) partition, no boot code
    #[command(
        after_help = "Examples:\n  livestick restore /dev/sdb\n  livestick restore /dev/sdb --label PHOTOS --save-home ~/home-backup.img\n  livestick restore /dev/sdb --fs exfat --yes"
    )]
    Restore(restore::RestoreArgs),
    /// Check the external programs each feature needs, and which package provides each
    #[command(
        after_help = "Examples:\n  livestick doctor\n  livestick doctor --json | jq '.checks[] | select(.found == false)'"
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
}

impl Command {
    /// True for the commands that only read and print: stopping one of them
    /// at any point loses nothing.
    pub fn changes_nothing(&self) -> bool {
        match self {
            Command::Inspect(_)
            | Command::Devices(_)
            | Command::Doctor(_)
            | Command::Completions(_)
            | Command::Man(_)
            | Command::Verify(_) => true,
            Command::Restore(args) => args.dry_run,
            Command::Write(args) => args.dry_run,
            Command::Home { command } => match command {
                home::HomeCommand::Info(_) => true,
                home::HomeCommand::Resize(args) => args.dry_run,
            },
            Command::Overlay { command } => matches!(command, overlay::OverlayCommand::Status(_)),
            Command::IsoToDisk(_) => false,
        }
    }
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
    /// The live ISO, a live stick used as a source, or a raw disk image (plain or compressed)
    pub iso: PathBuf,
}

/// The full clap command (every `--help` shows examples from its
/// `after_help`; a test checks it).
pub fn command() -> clap::Command {
    let cmd = Cli::command();
    // A subcommand's own argument of the same id stops a global from being
    // propagated to it: these hidden stand-ins keep --json and --quiet out of
    // the help, man page and completions of commands they mean nothing to,
    // while still recognising them so that the refusal can name them.
    WITHOUT_OUTPUT_OPTIONS.into_iter().fold(cmd, |cmd, name| {
        cmd.mut_subcommand(name, |sub| {
            sub.arg(
                clap::Arg::new("json")
                    .long("json")
                    .action(clap::ArgAction::SetTrue)
                    .hide(true),
            )
            .arg(
                clap::Arg::new("quiet")
                    .long("quiet")
                    .short('q')
                    .action(clap::ArgAction::SetTrue)
                    .hide(true),
            )
        })
    })
}

/// A usage error when `--json` or `--quiet` was given to a command that has
/// no output for them to change.
fn reject_meaningless_globals(
    cmd: &mut clap::Command,
    matches: &clap::ArgMatches,
) -> Result<(), clap::Error> {
    let Some((name, sub)) = matches.subcommand() else {
        return Ok(());
    };
    if !WITHOUT_OUTPUT_OPTIONS.contains(&name) {
        return Ok(());
    }
    for flag in ["json", "quiet"] {
        if sub.value_source(flag) == Some(clap::parser::ValueSource::CommandLine) {
            let sub_cmd = cmd.find_subcommand_mut(name).ok_or_else(|| {
                clap::Error::raw(clap::error::ErrorKind::InvalidSubcommand, name.to_string())
            })?;
            return Err(sub_cmd.error(
                clap::error::ErrorKind::ArgumentConflict,
                format!(
                    "--{flag} does not apply to `livestick {name}`, which prints a fixed text; leave it out"
                ),
            ));
        }
    }
    Ok(())
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
    reject_meaningless_globals(&mut cmd, &matches)?;
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

impl Classify for clap::Error {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Usage
    }
}

/// Every typed error livestick classifies. The types of
/// `persist::{merge, overlay, ovl_maint, snapshot}` are not listed (yet):
/// the chain walk passes over them to the errors they wrap, as it always has.
const CLASSIFIERS: &[Classifier] = &[
    classifier::<crate::error::BadInput>,
    classifier::<crate::error::BadInputBecause>,
    classifier::<crate::error::PartialBatchFailure>,
    classifier::<crate::error::NoConfirmation>,
    classifier::<crate::error::CannotOpen>,
    classifier::<clap::Error>,
    classifier::<compat::CompatError>,
    classifier::<crate::apply::ApplyError>,
    classifier::<crate::batch::BatchError>,
    classifier::<crate::boot::menu::MenuError>,
    classifier::<crate::boot::render::RenderError>,
    classifier::<crate::boot::syslinux::SyslinuxError>,
    classifier::<crate::disk::devices::DeviceError>,
    classifier::<crate::disk::ext4::Ext4Error>,
    classifier::<crate::disk::fat::FatError>,
    classifier::<crate::disk::fat_alloc::AllocError>,
    classifier::<crate::disk::fat_raw::SwapError>,
    classifier::<crate::disk::identity::IdentityError>,
    classifier::<crate::disk::partition::PartitionError>,
    classifier::<crate::disk::stick::StickError>,
    classifier::<crate::disk::target::TargetError>,
    classifier::<crate::manifest::ManifestError>,
    classifier::<crate::manifest::NotIntact>,
    classifier::<crate::restore::RestoreError>,
    classifier::<crate::persist::erofs::ErofsError>,
    classifier::<crate::persist::home::HomeError>,
    classifier::<crate::persist::home_stick::HomeStickError>,
    classifier::<crate::persist::luks::LuksError>,
    classifier::<crate::persist::merge::replace::ReplaceError>,
    classifier::<crate::persist::merge::MergeError>,
    classifier::<crate::persist::merge::overlayfs::error::OvlError>,
    classifier::<crate::persist::snapshot::SnapshotError>,
    classifier::<crate::persist::ovl_maint::OvlMaintError>,
    classifier::<crate::persist::swap::SwapError>,
    classifier::<crate::persist::tar_stream::TarError>,
    classifier::<crate::plan::PlanError>,
    classifier::<crate::prepare::PrepareError>,
    classifier::<crate::prepare::WriteError>,
    classifier::<crate::write_facts::FactsError>,
    classifier::<crate::live_source::NamedLiveError>,
    classifier::<crate::raw_write::RawWriteError>,
    classifier::<crate::raw_inspect::RawInspectError>,
    classifier::<crate::raw_write::run::RawRunError>,
    classifier::<crate::size::SizeError>,
    classifier::<crate::source::checksum::ChecksumError>,
    classifier::<crate::source::compressed::DecompressError>,
    classifier::<crate::source::download::DownloadError>,
    classifier::<crate::source::releases::ReleaseError>,
    classifier::<crate::source::signed_checksum::SignedChecksumError>,
    classifier::<crate::source::iso::IsoError>,
    classifier::<crate::source::live::LiveError>,
    classifier::<crate::squash::SquashError>,
    classifier::<crate::tools::ToolMissing>,
];

/// Classifies an error by the typed errors in its chain (the outermost one
/// livestick knows decides); anything unknown is an I/O failure.
pub fn error_kind(err: &anyhow::Error) -> ErrorKind {
    crate::error::error_kind_among(err, CLASSIFIERS)
}

/// The kind of `err` (as [`error_kind`]) and the hint to print with it.
pub fn error_verdict(err: &anyhow::Error) -> crate::error::Verdict {
    crate::error::verdict_among(err, CLASSIFIERS)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use anyhow::Context;

    use super::*;
    use crate::disk::target::TargetError;

    #[test]
    fn library_errors_are_classified_through_contexts() {
        let busy = Err::<(), _>(TargetError::Busy {
            path: PathBuf::from("/dev/sdb"),
            findings: vec!["/dev/sdb1 is mounted on /run/media".into()],
        })
        .context("checking /dev/sdb")
        .context("writing /dev/sdb")
        .unwrap_err();
        assert_eq!(error_kind(&busy), ErrorKind::Refused);

        let size = crate::size::parse_size("12 parsecs")
            .context("--size")
            .unwrap_err();
        assert_eq!(error_kind(&size), ErrorKind::BadInput);

        let usage = anyhow::Error::new(compat::CompatError::Usage("no target".into()));
        assert_eq!(error_kind(&usage), ErrorKind::Usage);

        let clap = parse_from(["livestick", "write", "--bogus"]).unwrap_err();
        assert_eq!(error_kind(&anyhow::Error::new(clap)), ErrorKind::Usage);
    }

    #[test]
    fn a_refusal_inside_a_transparent_wrapper_decides() {
        // `transparent` hides the wrapped refusal from the chain: the wrapper
        // answers with the kind of what it wraps.
        let wrapped = anyhow::Error::new(crate::disk::stick::StickError::Target(
            TargetError::NotRemovable(PathBuf::from("/dev/sda")),
        ))
        .context("opening /dev/sda");
        assert_eq!(error_kind(&wrapped), ErrorKind::Refused);
        let system = anyhow::Error::new(crate::disk::stick::StickError::Target(
            TargetError::SystemDisk {
                path: PathBuf::from("/dev/vda"),
                findings: vec!["/ is on /dev/vda".into()],
            },
        ));
        assert_eq!(error_kind(&system), ErrorKind::Refused);
    }

    #[test]
    fn a_bad_input_with_its_cause_is_bad_input() {
        let err = anyhow::Error::new(crate::error::BadInputBecause {
            message: "overlay.img is not a usable overlay".into(),
            source: Box::new(std::io::Error::other("exception table damaged")),
        })
        .context("overlay status");
        assert_eq!(error_kind(&err), ErrorKind::BadInput);
        assert_eq!(err.chain().count(), 3, "the cause stays in the chain");
    }
}
