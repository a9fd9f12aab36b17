//! The livecd-iso-to-disk compatible front end.
//!
//! Labs have scripts that call `livecd-iso-to-disk [options] <source> <target>`.
//! When livestick runs under that name (a symlink) or as `livestick
//! iso-to-disk`, this module reads the old command line into a typed
//! [`CompatArgs`] and maps it onto the native [`WriteArgs`], so the write
//! itself is always the native one.
//!
//! The old grammar (options with optional values, `--foo` before or after the
//! positionals) does not fit clap, so it is parsed by hand here. Two traps of
//! the old parser are fixed on purpose:
//! - `--format` (and `--overlayfs`) take an optional value only when the next
//!   word is a valid value *and* two positionals remain without it, so
//!   `--format x.iso /dev/sdb` never swallows the ISO path;
//! - values are parsed as data (numbers, names); nothing is ever handed to a
//!   shell, so `$(…)` in a value is just an invalid number.
//!
//! Every old option is listed once in [`OPTIONS`] with its status; the help
//! text and `docs/compatibility.md` follow that table.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::write::{DracutNamesArg, TableArg, WriteArgs};
use crate::error::{Classify, ErrorKind};

/// FAT32's largest file is 4 GiB − 1 byte; the old tool turned exactly 4096
/// MiB into 4 GiB − 512 B, livestick's whole-MiB sizes top out at 4095.
const FAT_MAX_MIB: u64 = 4095;

/// The program name that selects this front end (argv[0]'s file name).
pub const PROGRAM: &str = "livecd-iso-to-disk";

/// Environment variable that pins the FAT volume id (like the hidden native
/// `--volume-id`), so compatible runs can be compared with native ones.
pub const VOLUME_ID_ENV: &str = "LIVESTICK_VOLUME_ID";

/// How an old option takes its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arity {
    Flag,
    Value,
    /// A value only when the next word is one (`--format [spec]`, `--overlayfs [temp]`).
    OptionalValue,
}

/// What livestick does with an old option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Same meaning, same native option.
    Supported,
    /// Same intent, expressed with other native options.
    Mapped,
    /// Accepted; livestick already behaves this way, so it changes nothing.
    NoOp,
    /// Refused, with the reason and what to use instead.
    Refused(&'static str),
    /// Not in livecd-iso-to-disk: a livestick option accepted in this mode.
    Extension,
}

#[derive(Debug, Clone, Copy)]
pub struct OldOption {
    pub name: &'static str,
    pub aliases: &'static [&'static str],
    pub arity: Arity,
    pub status: Status,
    /// One line for `--help`: the native equivalent.
    pub native: &'static str,
}

const fn opt(
    name: &'static str,
    aliases: &'static [&'static str],
    arity: Arity,
    status: Status,
    native: &'static str,
) -> OldOption {
    OldOption {
        name,
        aliases,
        arity,
        status,
        native,
    }
}

use Arity::{Flag, OptionalValue, Value};
use Status::{Extension, Mapped, NoOp, Refused, Supported};

/// Every livecd-iso-to-disk option (reference §1), and the livestick
/// extensions accepted in this mode.
pub static OPTIONS: &[OldOption] = &[
    // Target preparation.
    opt(
        "--format",
        &[],
        OptionalValue,
        Mapped,
        "--format (FAT32; SIZE → --partition-size-mb; ext4 → --ext4; ext2/ext3/btrfs/xfs/f2fs refused)",
    ),
    opt(
        "--msdos",
        &[],
        Flag,
        Mapped,
        "FAT32, which --format always makes",
    ),
    opt(
        "--efi",
        &["--mactel"],
        Flag,
        Mapped,
        "--gpt (with --format)",
    ),
    opt(
        "--noesp",
        &[],
        Flag,
        NoOp,
        "the FAT32 partition is the ESP already",
    ),
    opt(
        "--nomac",
        &[],
        Flag,
        NoOp,
        "livestick never makes an HFS+ partition",
    ),
    opt(
        "--reset-mbr",
        &["--resetmbr"],
        Flag,
        NoOp,
        "SYSLINUX MBR boot code is written on every write",
    ),
    opt("--force", &[], Flag, Mapped, "--force --yes --delete-home"),
    opt(
        "--label",
        &[],
        Value,
        Supported,
        "--label (spaces become _, cut to 11)",
    ),
    // Content.
    opt(
        "--livedir",
        &[],
        Value,
        Supported,
        "--live-dir (spaces become _, / becomes -)",
    ),
    opt("--multi", &[], Flag, Supported, "--multi"),
    opt("--skipcopy", &["--reconfig"], Flag, Supported, "--skipcopy"),
    opt("--noverify", &[], Flag, Supported, "--noverify"),
    opt(
        "--compress",
        &[],
        Flag,
        NoOp,
        "squashfs.img is always copied as is",
    ),
    opt(
        "--skipcompress",
        &[],
        Flag,
        Refused(
            "it copies the uncompressed rootfs.img, which current Fedora ISOs no longer contain (flat squashfs or EROFS root) and which would not fit FAT32's 4 GiB file limit; drop it — squashfs.img is copied as is",
        ),
        "",
    ),
    opt(
        "--no-overlay",
        &[],
        Flag,
        Refused(
            "it only made sense with --skipcompress's writable rootfs.img, which livestick does not copy; drop it for a RAM overlay, or use --overlay-size-mb N for a persistent one",
        ),
        "",
    ),
    opt(
        "--xo",
        &[],
        Flag,
        Refused(
            "it wrote a boot script for the OLPC XO-1, whose i686 kernels Fedora no longer builds; drop it and boot the stick with the BIOS or UEFI loader livestick installs",
        ),
        "",
    ),
    opt(
        "--xo-no-home",
        &[],
        Flag,
        Refused("it only applied to --xo (OLPC XO-1), which livestick does not support; drop it"),
        "",
    ),
    opt("--updates", &[], Value, Supported, "--updates FILE"),
    opt("--ks", &[], Value, Supported, "--ks FILE"),
    // Persistence.
    opt(
        "--overlay-size-mb",
        &[],
        Value,
        Supported,
        "--overlay-size-mb (4096 becomes 4095; fstype ext4 only)",
    ),
    opt(
        "--overlayfs",
        &[],
        OptionalValue,
        Mapped,
        "--overlayfs; `temp` → --extra-kernel-args rd.live.overlay.overlayfs",
    ),
    opt("--copy-overlay", &[], Flag, Supported, "--copy-overlay"),
    opt("--reset-overlay", &[], Flag, Supported, "--reset-overlay"),
    opt(
        "--home-size-mb",
        &[],
        Value,
        Supported,
        "--home-size-mb (4096 becomes 4095; fstype ext4 only)",
    ),
    opt("--copy-home", &[], Flag, Supported, "--copy-home"),
    opt("--delete-home", &[], Flag, Supported, "--delete-home"),
    opt(
        "--crypted-home",
        &[],
        Flag,
        NoOp,
        "home.img is LUKS unless --unencrypted-home",
    ),
    opt(
        "--unencrypted-home",
        &[],
        Flag,
        Supported,
        "--unencrypted-home",
    ),
    opt(
        "--swap-size-mb",
        &[],
        Value,
        Supported,
        "--swap-size-mb (4096 becomes 4095)",
    ),
    // Boot.
    opt(
        "--extra-kernel-args",
        &[],
        Value,
        Supported,
        "--extra-kernel-args",
    ),
    opt(
        "--timeout",
        &[],
        Value,
        Mapped,
        "--timeout in seconds (tenths rounded; -1 → forever; 0 and -0 → at once)",
    ),
    opt(
        "--totaltimeout",
        &[],
        Value,
        Mapped,
        "--total-timeout (seconds)",
    ),
    opt(
        "--nobootmsg",
        &[],
        Flag,
        NoOp,
        "livestick's menus never display boot.msg",
    ),
    opt(
        "--nomenu",
        &[],
        Flag,
        Mapped,
        "--timeout 0 (the default entry boots at once)",
    ),
    // livestick extensions.
    opt(
        "--yes",
        &["-y"],
        Flag,
        Extension,
        "answer yes to the confirmation",
    ),
    opt(
        "--dry-run",
        &[],
        Flag,
        Extension,
        "print the plan, write nothing",
    ),
    opt(
        "--size",
        &[],
        Value,
        Extension,
        "create or grow an image file target to SIZE",
    ),
    opt("--json", &[], Flag, Extension, "machine-readable output"),
    opt("--quiet", &["-q"], Flag, Extension, "errors only"),
    opt(
        "--passphrase-file",
        &[],
        Value,
        Extension,
        "home.img LUKS passphrase from FILE",
    ),
    opt(
        "--passphrase-stdin",
        &[],
        Flag,
        Extension,
        "home.img LUKS passphrase from stdin",
    ),
    opt(
        "--volume-id",
        &[],
        Value,
        Extension,
        "pin the FAT volume id (hex); also $LIVESTICK_VOLUME_ID",
    ),
];

fn lookup(word: &str) -> Option<&'static OldOption> {
    OPTIONS
        .iter()
        .find(|o| o.name == word || o.aliases.contains(&word))
}

/// Why an old command line cannot run.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CompatError {
    #[error("{0}\n(`livecd-iso-to-disk --help` lists the options livestick accepts)")]
    Usage(String),
    #[error("{option} is not supported: {reason}")]
    Refused {
        option: &'static str,
        reason: &'static str,
    },
    #[error("{option} {value:?}: {reason}")]
    BadValue {
        option: &'static str,
        value: String,
        reason: String,
    },
    /// The command line is fine but the source or target is not usable.
    #[error("{0}")]
    BadTarget(String),
}

impl Classify for CompatError {
    fn kind(&self) -> ErrorKind {
        match self {
            CompatError::Usage(_) | CompatError::Refused { .. } | CompatError::BadValue { .. } => {
                ErrorKind::Usage
            }
            CompatError::BadTarget(_) => ErrorKind::BadInput,
        }
    }
}

/// Filesystem types the old `--format`, `--overlay-size-mb` and `--home-size-mb` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    Ext2,
    Ext3,
    Ext4,
    Vfat,
    Btrfs,
    Xfs,
    F2fs,
}

impl FsType {
    fn parse(word: &str) -> Option<FsType> {
        Some(match word {
            "ext2" => FsType::Ext2,
            "ext3" => FsType::Ext3,
            "ext4" => FsType::Ext4,
            "fat" | "vfat" | "msdos" => FsType::Vfat,
            "btrfs" => FsType::Btrfs,
            "xfs" => FsType::Xfs,
            "f2fs" => FsType::F2fs,
            _ => return None,
        })
    }
}

/// `--format [size_MiB][,fstype[,blksz[,extra…]]]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FormatSpec {
    pub size_mb: Option<u64>,
    pub fstype: Option<FsType>,
    pub block_size: Option<String>,
    pub extra: Vec<String>,
}

fn digits(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

impl FormatSpec {
    pub fn parse(value: &str) -> Result<FormatSpec, String> {
        // A bare filesystem type (`--format vfat`) is accepted too: it cannot
        // be mistaken for a size, so the size field is simply absent.
        let shifted;
        let value = match value.split(',').next().and_then(FsType::parse) {
            Some(_) => {
                shifted = format!(",{value}");
                shifted.as_str()
            }
            None => value,
        };
        let mut fields = value.split(',');
        let mut spec = FormatSpec::default();
        match fields.next() {
            None | Some("") => {}
            Some(size) => {
                let n = digits(size)
                    .ok_or_else(|| format!("{size:?} is not a size in MiB (digits only)"))?;
                if n < 512 {
                    return Err(format!(
                        "the partition size must be at least 512 MiB, not {n}"
                    ));
                }
                spec.size_mb = Some(n);
            }
        }
        match fields.next() {
            None | Some("") => {}
            Some(fs) => {
                spec.fstype = Some(FsType::parse(fs).ok_or_else(|| {
                    format!(
                        "{fs:?} is not one of ext2, ext3, ext4, fat, vfat, msdos, btrfs, xfs, f2fs"
                    )
                })?)
            }
        }
        match fields.next() {
            None | Some("") => {}
            Some(b) if b == "-" || digits(b).is_some() => spec.block_size = Some(b.to_string()),
            Some(b) => return Err(format!("{b:?} is not a block size")),
        }
        for extra in fields {
            if extra.is_empty()
                || !extra
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(format!("{extra:?} is not an f2fs feature name"));
            }
            spec.extra.push(extra.to_string());
        }
        Ok(spec)
    }
}

/// `--overlay-size-mb` / `--home-size-mb`: `size[,fstype[,blksz]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeSpec {
    pub mb: u64,
    pub fstype: Option<FsType>,
    pub block_size: Option<u64>,
}

impl SizeSpec {
    pub fn parse(value: &str) -> Result<SizeSpec, String> {
        let mut fields = value.split(',');
        let size = fields.next().unwrap_or_default();
        let mb = digits(size).ok_or_else(|| {
            format!("{size:?} is not a size in MiB (digits only; values are never run by a shell)")
        })?;
        if mb == 0 {
            return Err("the size must be at least 1 MiB".into());
        }
        let fstype = match fields.next() {
            None | Some("") => None,
            Some(fs) => {
                Some(FsType::parse(fs).ok_or_else(|| format!("{fs:?} is not a filesystem type"))?)
            }
        };
        let block_size = match fields.next() {
            None | Some("") => None,
            Some(b) => Some(digits(b).ok_or_else(|| format!("{b:?} is not a block size"))?),
        };
        if let Some(rest) = fields.next() {
            return Err(format!(
                "unexpected {rest:?}; the form is size[,fstype[,blksz]]"
            ));
        }
        Ok(SizeSpec {
            mb,
            fstype,
            block_size,
        })
    }
}

/// `--overlayfs [temp]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverlayFsMode {
    Persistent,
    Temp,
}

/// `--timeout` in the old units: tenths of a second, `-0`, or `-1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldTimeout {
    Tenths(u32),
    /// `-0`: boot at once.
    Immediate,
    /// `-1`: wait for a choice.
    Forever,
}

impl OldTimeout {
    fn parse(value: &str) -> Result<OldTimeout, String> {
        match value {
            "-1" => Ok(OldTimeout::Forever),
            "-0" => Ok(OldTimeout::Immediate),
            v => digits(v)
                .and_then(|n| u32::try_from(n).ok())
                .map(OldTimeout::Tenths)
                .ok_or_else(|| format!("{v:?} is not tenths of a second, -0 or -1")),
        }
    }

    /// Native seconds. Tenths are rounded (as the old GRUB config did), but a
    /// non-zero delay stays at least one second. `0` boots at once in both
    /// loaders; the old tool made SYSLINUX wait forever on `0` but GRUB boot
    /// at once — one meaning for both is the fix.
    pub fn seconds(self) -> u32 {
        match self {
            OldTimeout::Forever => crate::boot::render::WAIT_FOREVER,
            OldTimeout::Immediate | OldTimeout::Tenths(0) => 0,
            OldTimeout::Tenths(n) => (n.saturating_add(5) / 10).max(1),
        }
    }
}

/// A `<source>` or `<target>` word: a path, or `live` (the booted device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    Path(PathBuf),
    Live,
}

impl Place {
    fn from_word(word: &OsString) -> Place {
        if word == "live" {
            Place::Live
        } else {
            Place::Path(PathBuf::from(word))
        }
    }
}

/// The old command line, read but not yet resolved against the system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompatArgs {
    pub source: Place,
    pub target: Place,
    pub format: Option<FormatSpec>,
    pub msdos: bool,
    pub efi: bool,
    pub noesp: bool,
    pub nomac: bool,
    pub reset_mbr: bool,
    pub force: bool,
    pub label: Option<String>,
    pub livedir: Option<String>,
    pub multi: bool,
    pub skipcopy: bool,
    pub noverify: bool,
    pub updates: Option<PathBuf>,
    pub ks: Option<PathBuf>,
    pub overlay: Option<SizeSpec>,
    pub overlayfs: Option<OverlayFsMode>,
    pub copy_overlay: bool,
    pub reset_overlay: bool,
    pub home: Option<SizeSpec>,
    pub copy_home: bool,
    pub delete_home: bool,
    /// Last of `--crypted-home` / `--unencrypted-home` wins, as in the old tool.
    pub unencrypted_home: bool,
    pub swap_size_mb: Option<u64>,
    pub extra_kernel_args: Vec<String>,
    pub timeout: Option<OldTimeout>,
    pub totaltimeout: Option<u32>,
    pub nobootmsg: bool,
    pub nomenu: bool,
    pub compress: bool,
    // livestick extensions.
    pub yes: bool,
    pub dry_run: bool,
    pub size: Option<String>,
    pub json: bool,
    pub quiet: bool,
    pub passphrase_file: Option<PathBuf>,
    pub passphrase_stdin: bool,
    pub volume_id: Option<String>,
}

/// The outcome of reading an old command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Help,
    Run(Box<CompatArgs>),
}

/// The words `-h`, `-?`, `--help` and `-help` ask for help. The old parser
/// also did so for any word *containing* `-help` (a label like `my-helper`);
/// that trap is not copied.
fn is_help(word: &OsString) -> bool {
    ["-h", "-?", "--help", "-help"].iter().any(|h| word == *h)
}

fn valid_optional(option: &str, value: &str) -> bool {
    match option {
        "--format" => !value.is_empty() && FormatSpec::parse(value).is_ok(),
        "--overlayfs" => value == "temp",
        _ => false,
    }
}

/// Reads the old command line (without the program name).
pub fn parse(argv: &[OsString]) -> Result<Parsed, CompatError> {
    if argv.iter().any(is_help) {
        return Ok(Parsed::Help);
    }
    // Pass 1: split words into options (with values) and positionals. An
    // optional value is only a candidate here.
    struct Item {
        option: &'static OldOption,
        spelled: String,
        value: Option<String>,
        /// Index into `words` of a separate word that may be this option's value.
        candidate: Option<usize>,
    }
    let mut items: Vec<Item> = Vec::new();
    let mut words: Vec<&OsString> = Vec::new();
    let mut positional_only = false;
    let mut i = 0;
    while i < argv.len() {
        let arg = &argv[i];
        i += 1;
        let text = arg.to_str();
        if text == Some("--") && !positional_only {
            positional_only = true;
            continue;
        }
        let is_option = !positional_only
            && text.is_some_and(|t| t.starts_with('-') && t.len() > 1 && t != "-0" && t != "-1");
        if !is_option {
            words.push(arg);
            continue;
        }
        let text = text.unwrap_or_default();
        let (name, inline) = match text.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v.to_string())),
            _ => (text, None),
        };
        let option =
            lookup(name).ok_or_else(|| CompatError::Usage(format!("unknown option {name}")))?;
        if let Refused(reason) = option.status {
            return Err(CompatError::Refused {
                option: option.name,
                reason,
            });
        }
        let mut item = Item {
            option,
            spelled: name.to_string(),
            value: None,
            candidate: None,
        };
        match (option.arity, inline) {
            (Flag, Some(v)) => {
                return Err(CompatError::Usage(format!(
                    "{name} takes no value (got {v:?})"
                )));
            }
            (Flag, None) => {}
            (Value | OptionalValue, Some(v)) => item.value = Some(v),
            (Value, None) => {
                let v = argv
                    .get(i)
                    .ok_or_else(|| CompatError::Usage(format!("{name} needs a value")))?;
                let v = v.to_str().ok_or_else(|| CompatError::BadValue {
                    option: option.name,
                    value: v.to_string_lossy().into_owned(),
                    reason: "not valid UTF-8".into(),
                })?;
                item.value = Some(v.to_string());
                i += 1;
            }
            (OptionalValue, None) => {
                if let Some(next) = argv.get(i).and_then(|w| w.to_str())
                    && !positional_only
                    && valid_optional(option.name, next)
                {
                    // Decided in pass 2; remember which positional word it is.
                    item.candidate = Some(words.len());
                    words.push(&argv[i]);
                    i += 1;
                }
            }
        }
        items.push(item);
    }
    // Pass 2: a candidate becomes a value only while two positionals remain.
    let mut spare = words.len().saturating_sub(2);
    let mut consumed = vec![false; words.len()];
    for item in items.iter_mut() {
        if let Some(w) = item.candidate
            && spare > 0
        {
            item.value = words[w].to_str().map(str::to_string);
            consumed[w] = true;
            spare -= 1;
        }
    }
    let positionals: Vec<&OsString> = words
        .iter()
        .zip(&consumed)
        .filter(|(_, c)| !**c)
        .map(|(w, _)| *w)
        .collect();
    let [source, target] = positionals.as_slice() else {
        return Err(CompatError::Usage(format!(
            "expected exactly two arguments, <source> <target>; got {}{}",
            positionals.len(),
            if positionals.is_empty() {
                String::new()
            } else {
                format!(
                    ": {}",
                    positionals
                        .iter()
                        .map(|p| p.to_string_lossy())
                        .collect::<Vec<_>>()
                        .join(" ")
                )
            }
        )));
    };
    let mut args = CompatArgs::new(Place::from_word(source), Place::from_word(target));
    for item in items {
        args.set(item.option, &item.spelled, item.value)?;
    }
    args.check()?;
    Ok(Parsed::Run(Box::new(args)))
}

fn bad(option: &'static OldOption, value: &str, reason: String) -> CompatError {
    CompatError::BadValue {
        option: option.name,
        value: value.to_string(),
        reason,
    }
}

impl CompatArgs {
    fn new(source: Place, target: Place) -> CompatArgs {
        CompatArgs {
            source,
            target,
            format: None,
            msdos: false,
            efi: false,
            noesp: false,
            nomac: false,
            reset_mbr: false,
            force: false,
            label: None,
            livedir: None,
            multi: false,
            skipcopy: false,
            noverify: false,
            updates: None,
            ks: None,
            overlay: None,
            overlayfs: None,
            copy_overlay: false,
            reset_overlay: false,
            home: None,
            copy_home: false,
            delete_home: false,
            unencrypted_home: false,
            swap_size_mb: None,
            extra_kernel_args: Vec::new(),
            timeout: None,
            totaltimeout: None,
            nobootmsg: false,
            nomenu: false,
            compress: false,
            yes: false,
            dry_run: false,
            size: None,
            json: false,
            quiet: false,
            passphrase_file: None,
            passphrase_stdin: false,
            volume_id: None,
        }
    }

    fn set(
        &mut self,
        option: &'static OldOption,
        spelled: &str,
        value: Option<String>,
    ) -> Result<(), CompatError> {
        let v = value.clone().unwrap_or_default();
        let text = || v.clone();
        match option.name {
            "--format" => {
                self.format = Some(match &value {
                    Some(v) => FormatSpec::parse(v).map_err(|r| bad(option, v, r))?,
                    None => FormatSpec::default(),
                })
            }
            "--msdos" => self.msdos = true,
            "--efi" => self.efi = true,
            "--noesp" => self.noesp = true,
            "--nomac" => self.nomac = true,
            "--reset-mbr" => self.reset_mbr = true,
            "--force" => self.force = true,
            "--label" => self.label = Some(text()),
            "--livedir" => self.livedir = Some(text()),
            "--multi" => self.multi = true,
            "--skipcopy" => self.skipcopy = true,
            "--noverify" => self.noverify = true,
            "--compress" => self.compress = true,
            "--updates" => self.updates = Some(PathBuf::from(text())),
            "--ks" => self.ks = Some(PathBuf::from(text())),
            "--overlay-size-mb" => {
                self.overlay = Some(SizeSpec::parse(&v).map_err(|r| bad(option, &v, r))?)
            }
            "--overlayfs" => {
                self.overlayfs = Some(if value.is_some() {
                    if v != "temp" {
                        return Err(bad(option, &v, "the only value is `temp`".into()));
                    }
                    OverlayFsMode::Temp
                } else {
                    OverlayFsMode::Persistent
                })
            }
            "--copy-overlay" => self.copy_overlay = true,
            "--reset-overlay" => self.reset_overlay = true,
            "--home-size-mb" => {
                self.home = Some(SizeSpec::parse(&v).map_err(|r| bad(option, &v, r))?)
            }
            "--copy-home" => self.copy_home = true,
            "--delete-home" => self.delete_home = true,
            "--crypted-home" => self.unencrypted_home = false,
            "--unencrypted-home" => self.unencrypted_home = true,
            "--swap-size-mb" => {
                let n = digits(&v)
                    .filter(|&n| n > 0)
                    .ok_or_else(|| bad(option, &v, "not a size in MiB (digits only)".into()))?;
                self.swap_size_mb = Some(n);
            }
            "--extra-kernel-args" => self.extra_kernel_args.push(text()),
            "--timeout" => {
                self.timeout = Some(OldTimeout::parse(&v).map_err(|r| bad(option, &v, r))?)
            }
            "--totaltimeout" => {
                let n = digits(&v)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| bad(option, &v, "not tenths of a second".into()))?;
                self.totaltimeout = Some(n);
            }
            "--nobootmsg" => self.nobootmsg = true,
            "--nomenu" => self.nomenu = true,
            "--yes" => self.yes = true,
            "--dry-run" => self.dry_run = true,
            "--size" => self.size = Some(text()),
            "--json" => self.json = true,
            "--quiet" => self.quiet = true,
            "--passphrase-file" => self.passphrase_file = Some(PathBuf::from(text())),
            "--passphrase-stdin" => self.passphrase_stdin = true,
            "--volume-id" => self.volume_id = Some(text()),
            _ => {
                return Err(CompatError::Usage(format!(
                    "{spelled} is listed but not handled; this is a livestick bug"
                )));
            }
        }
        Ok(())
    }

    /// The combinations the old tool refused, refused the same way.
    fn check(&self) -> Result<(), CompatError> {
        let usage = |m: &str| Err(CompatError::Usage(m.to_string()));
        if let Some(fs) = self.format.as_ref().and_then(|f| f.fstype)
            && fs != FsType::Vfat
            && fs != FsType::Ext4
        {
            return Err(CompatError::Refused {
                option: "--format",
                reason: "livestick writes the live partition as FAT32, or as ext4 beside a FAT boot partition (--format ext4); drop the filesystem type or give ext4",
            });
        }
        if self.format.as_ref().is_some_and(|f| f.block_size.is_some()) {
            return Err(CompatError::Refused {
                option: "--format",
                reason: "livestick picks the FAT32 cluster size from the partition size; drop the block size",
            });
        }
        for (name, spec) in [
            ("--overlay-size-mb", &self.overlay),
            ("--home-size-mb", &self.home),
        ] {
            let Some(spec) = spec else { continue };
            if spec.block_size.is_some() {
                return Err(CompatError::Refused {
                    option: if name == "--home-size-mb" {
                        "--home-size-mb"
                    } else {
                        "--overlay-size-mb"
                    },
                    reason: "livestick chooses the ext4 block size itself; drop the block size",
                });
            }
            let is_overlay_fs = name == "--overlay-size-mb" && self.overlayfs.is_some();
            if let Some(fs) = spec.fstype
                && fs != FsType::Ext4
                && (is_overlay_fs || name == "--home-size-mb")
            {
                return Err(CompatError::Refused {
                    option: if name == "--home-size-mb" {
                        "--home-size-mb"
                    } else {
                        "--overlay-size-mb"
                    },
                    reason: "livestick makes home.img and OverlayFS overlay files as ext4 only; drop the filesystem type",
                });
            }
        }
        if self.overlay.is_some() && self.copy_overlay {
            return usage(
                "--overlay-size-mb and --copy-overlay cannot be combined: make a new overlay or copy the old one",
            );
        }
        if self.overlay.is_some() && self.reset_overlay {
            return usage(
                "--overlay-size-mb and --reset-overlay cannot be combined: make a new overlay or reset the existing one",
            );
        }
        if self.home.is_some() && self.copy_home {
            return usage(
                "--home-size-mb and --copy-home cannot be combined: make a new home.img or copy the old one",
            );
        }
        match (self.overlayfs, &self.overlay) {
            (Some(OverlayFsMode::Temp), Some(_)) => {
                return usage(
                    "--overlayfs temp is a RAM overlay and cannot have --overlay-size-mb; drop one of them",
                );
            }
            (Some(OverlayFsMode::Persistent), None)
                if !self.copy_overlay && !self.reset_overlay && !self.skipcopy =>
            {
                return usage(
                    "--overlayfs on a FAT32 stick needs --overlay-size-mb N (the overlay is an ext4 file); use --overlayfs temp for a RAM overlay",
                );
            }
            _ => {}
        }
        if self.passphrase_file.is_some() && self.passphrase_stdin {
            return usage("--passphrase-file and --passphrase-stdin cannot be combined");
        }
        Ok(())
    }

    /// Whether an asked size of exactly 4096 MiB becomes 4095 (FAT32's largest
    /// whole-MiB file): not when the persistence goes on ext4, asked for
    /// (`--format ext4`) or chosen by livestick because another size is over the
    /// FAT32 limit.
    fn clamps_4096(&self) -> bool {
        let ext4_format =
            !self.skipcopy && self.format.as_ref().and_then(|f| f.fstype) == Some(FsType::Ext4);
        let over_fat = [
            self.overlay.as_ref().map(|s| s.mb),
            self.home.as_ref().map(|s| s.mb),
            self.swap_size_mb,
        ]
        .into_iter()
        .flatten()
        .any(|mb| mb > 4096);
        !ext4_format && !over_fat
    }

    /// Notes for the user about what the mapping changed.
    pub fn notices(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.format.as_ref().is_some_and(|f| f.fstype.is_none()) && !self.msdos {
            out.push("--format makes a FAT32 live partition (livecd-iso-to-disk defaulted to ext4 with a separate ESP)".into());
        }
        for (name, mb) in [
            ("--overlay-size-mb", self.overlay.as_ref().map(|s| s.mb)),
            ("--home-size-mb", self.home.as_ref().map(|s| s.mb)),
            ("--swap-size-mb", self.swap_size_mb),
        ] {
            if mb == Some(4096) && self.clamps_4096() {
                out.push(format!(
                    "{name} 4096 is made 4095 MiB, the largest whole-MiB file FAT32 holds"
                ));
            }
        }
        if self.skipcopy
            && (self.format.is_some()
                || self.overlay.is_some()
                || self.home.is_some()
                || self.swap_size_mb.is_some()
                || self.copy_overlay
                || self.copy_home)
        {
            out.push("--skipcopy ignores --format and the creation of overlay, home and swap, as livecd-iso-to-disk did".into());
        }
        if self.timeout == Some(OldTimeout::Tenths(0)) {
            out.push("--timeout 0 boots the default entry at once in SYSLINUX and GRUB alike; use -1 to wait for a choice".into());
        }
        if let Some(label) = &self.label
            && sanitize_label(label) != *label
        {
            out.push(format!(
                "--label {label:?} becomes {:?} (FAT labels hold 11 characters, no spaces)",
                sanitize_label(label)
            ));
        }
        out
    }

    /// Maps onto the native write, given where the target really is.
    pub fn to_write_args(&self, target: &ResolvedTarget) -> Result<WriteArgs, CompatError> {
        let source = match &self.source {
            Place::Live => {
                return Err(CompatError::BadTarget(
                    "source `live` (the running live system) is not supported: livestick writes from an ISO image; give the ISO the stick was made from".into(),
                ));
            }
            Place::Path(p) if p.is_dir() => {
                return Err(CompatError::BadTarget(format!(
                    "source {} is a directory; livestick writes from an ISO image, not from a mounted tree — give the ISO file",
                    p.display()
                )));
            }
            Place::Path(p) => p.clone(),
        };
        let skip = self.skipcopy;
        let format = self.format.is_some() && !skip;
        let disk = match target {
            ResolvedTarget::Whole(p) => p.clone(),
            ResolvedTarget::Partition { disk, name, .. } if format => {
                return Err(CompatError::BadTarget(format!(
                    "--format erases the whole disk: name the disk {}, not its partition {}",
                    disk.display(),
                    name.display()
                )));
            }
            ResolvedTarget::Partition { disk, .. } => disk.clone(),
        };
        // livecd-iso-to-disk's ext4 layout: the live directory on an ext4 partition.
        let ext4 = format && self.format.as_ref().and_then(|f| f.fstype) == Some(FsType::Ext4);
        let clamps = self.clamps_4096();
        let clamp = |mb: u64| {
            if mb == 4096 && clamps {
                FAT_MAX_MIB
            } else {
                mb
            }
        };
        let mut extra = self.extra_kernel_args.join(" ");
        if self.overlayfs == Some(OverlayFsMode::Temp) {
            if !extra.is_empty() {
                extra.push(' ');
            }
            extra.push_str("rd.live.overlay.overlayfs");
        }
        let timeout = if self.nomenu {
            Some(0)
        } else {
            self.timeout.map(OldTimeout::seconds)
        };
        let volume_id = self
            .volume_id
            .clone()
            .or_else(|| std::env::var(VOLUME_ID_ENV).ok().filter(|v| !v.is_empty()));
        Ok(WriteArgs {
            dd: false,
            bmap: None,
            iso: source,
            targets: vec![disk],
            wait_for: None,
            wait_timeout: None,
            size: self.size.clone(),
            format,
            ext4,
            noformat: false,
            table: if self.efi && format {
                TableArg::Gpt
            } else {
                TableArg::Mbr
            },
            gpt: false,
            label: self.label.as_deref().map(sanitize_label),
            livedir: self
                .livedir
                .as_deref()
                .map(sanitize_livedir)
                .unwrap_or_else(|| "LiveOS".to_string()),
            overlay_size_mb: if skip {
                None
            } else {
                self.overlay.as_ref().map(|s| clamp(s.mb))
            },
            overlayfs: self.overlayfs == Some(OverlayFsMode::Persistent),
            home_size_mb: if skip {
                None
            } else {
                self.home.as_ref().map(|s| clamp(s.mb))
            },
            unencrypted_home: self.unencrypted_home,
            passphrase_file: self.passphrase_file.clone(),
            passphrase_stdin: self.passphrase_stdin,
            luks_pbkdf: None,
            luks_iter_time: None,
            luks_pbkdf_memory: None,
            reset_overlay: self.reset_overlay,
            skipcopy: skip,
            delete_home: self.delete_home || self.force,
            copy_overlay: self.copy_overlay && !skip,
            copy_home: self.copy_home && !skip,
            dracut_names: DracutNamesArg::Auto,
            swap_size_mb: if skip {
                None
            } else {
                self.swap_size_mb.map(clamp)
            },
            extra_kernel_args: (!extra.is_empty()).then_some(extra),
            timeout,
            total_timeout: self.totaltimeout.map(|t| t.div_ceil(10)),
            noverify: self.noverify,
            no_verify_write: false,
            dry_run: self.dry_run,
            yes: self.yes || self.force,
            force: self.force,
            volume_id,
            partition_size_mb: if format {
                self.format.as_ref().and_then(|f| f.size_mb)
            } else {
                None
            },
            multi: self.multi,
            updates: self.updates.clone(),
            ks: self.ks.clone(),
            source_check: Default::default(),
        })
    }
}

/// Old label rules: whitespace becomes `_`, and a FAT label holds 11 characters.
pub fn sanitize_label(label: &str) -> String {
    label
        .chars()
        .map(|c| if c.is_whitespace() { '_' } else { c })
        .take(11)
        .collect()
}

/// Old live-directory rules: whitespace becomes `_`, `/` becomes `-`.
pub fn sanitize_livedir(dir: &str) -> String {
    dir.chars()
        .map(|c| match c {
            c if c.is_whitespace() => '_',
            '/' => '-',
            c => c,
        })
        .collect()
}

/// Where a `<target>` really is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolvedTarget {
    /// A whole disk, or an image file.
    Whole(PathBuf),
    /// A partition (`/dev/sdb1`): livestick writes through its whole disk.
    Partition {
        name: PathBuf,
        disk: PathBuf,
        number: u32,
    },
}

/// Splits a partition device name the kernel's way: `sdb1` → (`sdb`, 1),
/// `nvme0n1p2` / `mmcblk0p1` / `loop0p1` → (…, N) with the `p` dropped when
/// the disk name ends in a digit. `None` for a whole-disk name.
pub fn split_partition_name(name: &str) -> Option<(String, u32)> {
    let digits_at = name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    if digits_at == name.len() || digits_at == 0 {
        return None;
    }
    let number: u32 = name[digits_at..].parse().ok()?;
    let head = &name[..digits_at];
    if let Some(disk) = head.strip_suffix('p')
        && disk.ends_with(|c: char| c.is_ascii_digit())
    {
        return Some((disk.to_string(), number));
    }
    if head.ends_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    // Whole disks whose names end in a digit only with a `p` before the
    // partition number; `sda`, `vdb`, `xvda` take the number directly.
    if ["sd", "vd", "hd", "xvd"]
        .iter()
        .any(|p| head.starts_with(p))
    {
        return Some((head.to_string(), number));
    }
    None
}

/// Resolves `live` and partition targets through /run/initramfs and sysfs.
/// Anything that is not a block device (an image file, a path that does not
/// exist yet) is left for the native write to judge.
pub fn resolve_target(target: &Place) -> Result<ResolvedTarget, CompatError> {
    let path = match target {
        Place::Live => {
            let link = Path::new("/run/initramfs/livedev");
            std::fs::canonicalize(link).map_err(|_| {
                CompatError::BadTarget(format!(
                    "target `live` means the device this live system booted from, but {} does not exist: this system was not booted from a live stick",
                    link.display()
                ))
            })?
        }
        Place::Path(p) => p.clone(),
    };
    use std::os::unix::fs::FileTypeExt;
    let is_block = std::fs::metadata(&path).is_ok_and(|m| m.file_type().is_block_device());
    if !is_block {
        return Ok(ResolvedTarget::Whole(path));
    }
    let real = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
    let Some(name) = real.file_name().and_then(|n| n.to_str()) else {
        return Ok(ResolvedTarget::Whole(path));
    };
    let sys = Path::new("/sys/class/block").join(name);
    let number = std::fs::read_to_string(sys.join("partition"))
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok());
    match number {
        Some(number) => {
            // The sysfs entry of a partition lives inside its disk's directory.
            let disk = std::fs::canonicalize(&sys)
                .ok()
                .and_then(|p| p.parent().and_then(|d| d.file_name()).map(PathBuf::from))
                .or_else(|| split_partition_name(name).map(|(d, _)| PathBuf::from(d)))
                .ok_or_else(|| {
                    CompatError::BadTarget(format!(
                        "cannot find the disk that holds {}",
                        path.display()
                    ))
                })?;
            Ok(ResolvedTarget::Partition {
                name: path,
                disk: Path::new("/dev").join(disk),
                number,
            })
        }
        None => Ok(ResolvedTarget::Whole(path)),
    }
}

/// livestick installs into the first FAT partition of a disk; a partition
/// target must be that one, or the write would land somewhere else.
fn check_partition_is_the_fat_one(target: &ResolvedTarget) -> Result<(), CompatError> {
    let ResolvedTarget::Partition { name, disk, number } = target else {
        return Ok(());
    };
    // If the disk cannot be read here, the native write reports why.
    let Ok(mut file) = File::open(disk) else {
        return Ok(());
    };
    let Ok(size) = file.seek(SeekFrom::End(0)) else {
        return Ok(());
    };
    match crate::disk::partition::find_fat_partition(&mut file, size) {
        Ok(found) if found.number != *number => Err(CompatError::BadTarget(format!(
            "{} is partition {number} of {}, but livestick installs into its first FAT partition, number {}; name that partition, or use --format to erase the disk",
            name.display(),
            disk.display(),
            found.number
        ))),
        _ => Ok(()),
    }
}

/// The help text of compatibility mode, from [`OPTIONS`].
pub fn help(program: &str) -> String {
    let mut out = format!(
        "{program} (livestick {}, livecd-iso-to-disk compatibility mode)\n\n\
         Usage: {program} [options] <source> <target>\n\n\
         <source>  a live ISO image\n\
         <target>  a stick (/dev/sdb), its partition (/dev/sdb1), an image file, or `live`\n\n\
         Options (→ what livestick does; docs/compatibility.md has the details):\n",
        env!("CARGO_PKG_VERSION")
    );
    for o in OPTIONS {
        let names = std::iter::once(o.name)
            .chain(o.aliases.iter().copied())
            .collect::<Vec<_>>()
            .join(", ");
        let value = match o.arity {
            Flag => "",
            Value => " VALUE",
            OptionalValue => " [VALUE]",
        };
        let what = match o.status {
            Supported | Mapped => format!("→ {}", o.native),
            NoOp => format!("accepted, no effect: {}", o.native),
            Refused(_) => "refused (see docs/compatibility.md)".to_string(),
            Extension => format!("livestick: {}", o.native),
        };
        out.push_str(&format!("  {names}{value}\n      {what}\n"));
    }
    out.push_str("\nThe native command is `livestick write`; `livestick write --help` shows it.\n");
    out.push_str(&format!(
        "\nExamples:\n  {program} --format --efi --overlay-size-mb 2048 Fedora.iso /dev/sdb\n  \
         {program} --reset-overlay Fedora.iso /dev/sdb1\n  \
         {program} --noverify --size 8G --home-size-mb 1024 --unencrypted-home Fedora.iso stick.img\n"
    ));
    out
}

/// What `main` runs: parse, resolve, map. Returns `None` for help (already
/// printed) or the native arguments plus the output switches.
pub fn prepare(
    argv: &[OsString],
    program: &str,
) -> Result<Option<(WriteArgs, bool, bool)>, CompatError> {
    let args = match parse(argv)? {
        Parsed::Help => {
            print!("{}", help(program));
            return Ok(None);
        }
        Parsed::Run(args) => args,
    };
    if !args.quiet {
        for n in args.notices() {
            eprintln!("{program}: note: {n}");
        }
    }
    let target = resolve_target(&args.target)?;
    check_partition_is_the_fat_one(&target)?;
    let write = args.to_write_args(&target)?;
    Ok(Some((write, args.json, args.quiet)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    fn run(words: &[&str]) -> CompatArgs {
        match parse(&argv(words)) {
            Ok(Parsed::Run(a)) => *a,
            other => panic!("{words:?}: {other:?}"),
        }
    }

    fn err(words: &[&str]) -> CompatError {
        parse(&argv(words)).expect_err("must fail")
    }

    fn whole(p: &str) -> ResolvedTarget {
        ResolvedTarget::Whole(PathBuf::from(p))
    }

    #[test]
    fn format_never_swallows_the_iso_path() {
        let a = run(&["--format", "x.iso", "/dev/sdb"]);
        assert_eq!(a.format, Some(FormatSpec::default()));
        assert_eq!(a.source, Place::Path("x.iso".into()));
        assert_eq!(a.target, Place::Path("/dev/sdb".into()));
        // An ISO literally named like a format value stays the ISO.
        let a = run(&["--format", "4096", "/dev/sdb"]);
        assert_eq!(a.format, Some(FormatSpec::default()));
        assert_eq!(a.source, Place::Path("4096".into()));
        // A real value is taken when two positionals remain.
        let a = run(&["--format", "4096,vfat", "x.iso", "/dev/sdb"]);
        assert_eq!(a.format.as_ref().unwrap().size_mb, Some(4096));
        assert_eq!(a.format.as_ref().unwrap().fstype, Some(FsType::Vfat));
        let a = run(&["--format=1024", "x.iso", "/dev/sdb"]);
        assert_eq!(a.format.unwrap().size_mb, Some(1024));
        // The old parser ate `--msdos` as the value; here it is an option.
        let a = run(&["--format", "--msdos", "x.iso", "/dev/sdb"]);
        assert!(a.msdos && a.format == Some(FormatSpec::default()));
    }

    #[test]
    fn overlayfs_takes_temp_only() {
        let a = run(&["--overlayfs", "temp", "x.iso", "t.img"]);
        assert_eq!(a.overlayfs, Some(OverlayFsMode::Temp));
        let a = run(&["--overlayfs", "--overlay-size-mb", "64", "x.iso", "t.img"]);
        assert_eq!(a.overlayfs, Some(OverlayFsMode::Persistent));
        // A file named `temp` as the source is not swallowed.
        let a = run(&["--overlayfs", "temp", "t.img", "--overlay-size-mb", "8"]);
        assert_eq!(a.source, Place::Path("temp".into()));
        assert!(matches!(
            err(&["--overlayfs", "x.iso", "t.img"]),
            CompatError::Usage(_)
        ));
    }

    #[test]
    fn values_are_data_never_shell() {
        for v in ["$(touch /tmp/pwned)", "`id`", "12;rm", "1e3", "-5", ""] {
            let e = err(&["--overlay-size-mb", v, "x.iso", "t.img"]);
            assert!(matches!(e, CompatError::BadValue { .. }), "{v}: {e:?}");
        }
        assert!(matches!(
            err(&["--home-size-mb", "$(reboot)", "x.iso", "t.img"]),
            CompatError::BadValue { .. }
        ));
    }

    #[test]
    fn format_value_not_valid_becomes_positional_and_fails_cleanly() {
        let e = err(&["--format", "$(reboot)", "x.iso", "t.img"]);
        assert!(
            matches!(e, CompatError::Usage(ref m) if m.contains("exactly two")),
            "{e:?}"
        );
    }

    #[test]
    fn help_words_but_not_words_containing_help() {
        for h in ["-h", "-?", "--help", "-help"] {
            assert_eq!(parse(&argv(&[h])).unwrap(), Parsed::Help);
        }
        let a = run(&["--label", "my-helper", "x.iso", "t.img"]);
        assert_eq!(a.label.as_deref(), Some("my-helper"));
    }

    #[test]
    fn obsolete_options_are_refused_with_a_reason() {
        for o in ["--xo", "--xo-no-home", "--skipcompress", "--no-overlay"] {
            match err(&[o, "x.iso", "t.img"]) {
                CompatError::Refused { option, reason } => {
                    assert_eq!(option, o);
                    assert!(reason.contains("drop"), "{reason}");
                }
                e => panic!("{o}: {e:?}"),
            }
        }
        // livecd-iso-to-disk's SIZE sized the partition holding LiveOS/: with ext4
        // that is livestick's ext4 live partition.
        let sized = run(&["--format", "4096,ext4", "x.iso", "/dev/sdb"])
            .to_write_args(&whole("/dev/sdb"))
            .unwrap();
        assert_eq!(sized.partition_size_mb, Some(4096));
        assert!(sized.ext4);
        assert!(matches!(
            err(&["--home-size-mb", "64,btrfs", "x.iso", "t.img"]),
            CompatError::Refused { .. }
        ));
    }

    #[test]
    fn usage_errors() {
        assert!(matches!(
            err(&["--bogus", "x.iso", "t.img"]),
            CompatError::Usage(_)
        ));
        assert!(matches!(err(&["x.iso"]), CompatError::Usage(_)));
        assert!(matches!(err(&["a", "b", "c"]), CompatError::Usage(_)));
        assert!(matches!(
            err(&["x.iso", "t.img", "--label"]),
            CompatError::Usage(_)
        ));
        assert!(matches!(
            err(&["--noverify=yes", "x.iso", "t.img"]),
            CompatError::Usage(_)
        ));
        assert!(matches!(
            err(&["--overlay-size-mb", "8", "--copy-overlay", "x.iso", "t.img"]),
            CompatError::Usage(_)
        ));
        assert!(matches!(
            err(&[
                "--overlayfs",
                "temp",
                "--overlay-size-mb",
                "8",
                "x.iso",
                "t.img"
            ]),
            CompatError::Usage(_)
        ));
    }

    #[test]
    fn options_may_follow_positionals_and_double_dash_ends_options() {
        let a = run(&["x.iso", "t.img", "--noverify"]);
        assert!(a.noverify);
        let a = run(&["--", "--weird.iso", "t.img"]);
        assert_eq!(a.source, Place::Path("--weird.iso".into()));
        let a = run(&["live", "live"]);
        assert_eq!((a.source, a.target), (Place::Live, Place::Live));
    }

    #[test]
    fn timeouts_in_tenths() {
        let t = |s: &str| OldTimeout::parse(s).unwrap().seconds();
        assert_eq!(t("-1"), crate::boot::render::WAIT_FOREVER);
        assert_eq!(t("-0"), 0);
        assert_eq!(t("0"), 0);
        assert_eq!(t("50"), 5);
        assert_eq!(t("55"), 6);
        assert_eq!(t("54"), 5);
        assert_eq!(t("3"), 1);
        assert_eq!(t("600"), 60);
        assert!(OldTimeout::parse("-2").is_err());
    }

    #[test]
    fn mapping_onto_write_args() {
        let a = run(&[
            "--format",
            "--efi",
            "--force",
            "--label",
            "my live stick",
            "--livedir",
            "Live OS/x",
            "--overlay-size-mb",
            "4096",
            "--home-size-mb",
            "64",
            "--unencrypted-home",
            "--extra-kernel-args",
            "console=ttyS0",
            "--overlayfs",
            "--timeout",
            "-1",
            "--noverify",
            "x.iso",
            "/dev/sdb",
        ]);
        let w = a.to_write_args(&whole("/dev/sdb")).unwrap();
        assert!(w.format && w.table == TableArg::Gpt);
        assert!(w.force && w.yes && w.delete_home);
        assert_eq!(w.label.as_deref(), Some("my_live_sti"));
        assert_eq!(w.livedir, "Live_OS-x");
        assert_eq!(w.overlay_size_mb, Some(4095));
        assert!(w.overlayfs && w.unencrypted_home && w.noverify);
        assert_eq!(w.home_size_mb, Some(64));
        assert_eq!(w.timeout, Some(crate::boot::render::WAIT_FOREVER));
        assert_eq!(w.extra_kernel_args.as_deref(), Some("console=ttyS0"));
        // Another size over FAT32's limit puts persistence on ext4: 4096 stays 4096.
        let big = run(&[
            "--overlay-size-mb",
            "4096",
            "--home-size-mb",
            "5000",
            "x.iso",
            "s.img",
        ]);
        assert!(
            big.notices().iter().all(|n| !n.contains("4095")),
            "{:?}",
            big.notices()
        );
        let w = big.to_write_args(&whole("s.img")).unwrap();
        assert_eq!(
            (w.overlay_size_mb, w.home_size_mb),
            (Some(4096), Some(5000))
        );
        // --efi without --format keeps whatever table the stick has.
        let w = run(&["--efi", "x.iso", "s.img"])
            .to_write_args(&whole("s.img"))
            .unwrap();
        assert_eq!(w.table, TableArg::Mbr);
        assert!(!w.format);
    }

    #[test]
    fn skipcopy_ignores_creation_like_the_old_tool() {
        let a = run(&[
            "--skipcopy",
            "--format",
            "--overlay-size-mb",
            "8",
            "x.iso",
            "s.img",
        ]);
        let w = a.to_write_args(&whole("s.img")).unwrap();
        assert!(w.skipcopy && !w.format && w.overlay_size_mb.is_none());
        assert!(!a.notices().is_empty());
    }

    #[test]
    fn pending_options_are_mapped_and_named() {
        let a = run(&[
            "--multi",
            "--ks",
            "ks.cfg",
            "--updates",
            "u.img",
            "--totaltimeout",
            "95",
            "--format",
            "2048",
            "x.iso",
            "/dev/sdb",
        ]);
        let w = a.to_write_args(&whole("/dev/sdb")).unwrap();
        assert!(w.multi);
        assert_eq!(w.ks, Some(PathBuf::from("ks.cfg")));
        assert_eq!(w.updates, Some(PathBuf::from("u.img")));
        assert_eq!(w.total_timeout, Some(10));
        assert_eq!(w.partition_size_mb, Some(2048));
    }

    #[test]
    fn partition_targets() {
        assert_eq!(split_partition_name("sdb1"), Some(("sdb".into(), 1)));
        assert_eq!(split_partition_name("sdaa12"), Some(("sdaa".into(), 12)));
        assert_eq!(
            split_partition_name("nvme0n1p2"),
            Some(("nvme0n1".into(), 2))
        );
        assert_eq!(
            split_partition_name("mmcblk0p1"),
            Some(("mmcblk0".into(), 1))
        );
        assert_eq!(split_partition_name("loop0p3"), Some(("loop0".into(), 3)));
        assert_eq!(split_partition_name("nvme0n1"), None);
        assert_eq!(split_partition_name("loop0"), None);
        assert_eq!(split_partition_name("sdb"), None);
        let part = ResolvedTarget::Partition {
            name: "/dev/sdb1".into(),
            disk: "/dev/sdb".into(),
            number: 1,
        };
        let w = run(&["x.iso", "/dev/sdb1"]).to_write_args(&part).unwrap();
        assert_eq!(w.targets, vec![PathBuf::from("/dev/sdb")]);
        let e = run(&["--format", "x.iso", "/dev/sdb1"])
            .to_write_args(&part)
            .unwrap_err();
        assert!(e.to_string().contains("name the disk /dev/sdb"), "{e}");
        // An image file is its own target.
        assert_eq!(
            resolve_target(&Place::Path("/nonexistent/stick.img".into())).unwrap(),
            whole("/nonexistent/stick.img")
        );
    }

    #[test]
    fn live_source_is_refused_with_a_reason() {
        let e = run(&["live", "s.img"])
            .to_write_args(&whole("s.img"))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::BadInput);
        assert!(e.to_string().contains("ISO"));
    }

    #[test]
    fn every_option_is_handled_and_in_help() {
        let text = help("livecd-iso-to-disk");
        for o in OPTIONS {
            assert!(text.contains(o.name), "{} missing from help", o.name);
            if matches!(o.status, Refused(_)) {
                continue;
            }
            let mut words = vec![o.name.to_string()];
            match (o.name, o.arity) {
                ("--overlayfs", _) => words.extend(["--overlay-size-mb".into(), "8".into()]),
                ("--timeout" | "--totaltimeout" | "--swap-size-mb", _) => words.push("10".into()),
                ("--overlay-size-mb" | "--home-size-mb", _) => words.push("8".into()),
                (_, Value) => words.push("v".into()),
                _ => {}
            }
            words.extend(["x.iso".into(), "t.img".into()]);
            let refs: Vec<&str> = words.iter().map(String::as_str).collect();
            run(&refs);
            for alias in o.aliases {
                if o.arity == Flag {
                    run(&[alias, "x.iso", "t.img"]);
                }
            }
        }
    }
}
