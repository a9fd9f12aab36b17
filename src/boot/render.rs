//! Renders the stick's boot configs (SYSLINUX for BIOS, GRUB for UEFI) from a
//! parsed `BootMenu`, whichever loader the ISO's menu was written for: a
//! GRUB-only ISO still gets a working syslinux.cfg, and the reverse.
//!
//! Templates live in `syslinux-templates/` with `{{NAME}}` placeholders, so
//! the wording and layout can be read and changed without touching code.

use serde::Serialize;
use thiserror::Error;

use super::cmdline::{KernelArgs, StickArgs, rewrite_for_stick};
use super::menu::{BootMenu, EntryPurpose, MenuEntry, MenuSource, grub_quote};

const SYSLINUX_CFG: &str = include_str!("../../syslinux-templates/syslinux.cfg");
const SYSLINUX_ENTRY: &str = include_str!("../../syslinux-templates/syslinux-entry.cfg");
const GRUB_CFG: &str = include_str!("../../syslinux-templates/grub.cfg");
const GRUB_ENTRY: &str = include_str!("../../syslinux-templates/grub-entry.cfg");

/// `RenderParams::timeout_secs` value meaning "show the menu until a choice
/// is made" (`--timeout -1` in livecd-iso-to-disk terms).
pub const WAIT_FOREVER: u32 = u32::MAX;

/// SYSLINUX keeps the timeout in tenths; an hour is plenty and keeps the
/// number far from any overflow in the loader.
const MAX_TIMEOUT_SECS: u32 = 3600;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RenderParams {
    /// The menu title (SYSLINUX `MENU TITLE`; a comment in grub.cfg).
    pub title: String,
    /// The FAT volume label.
    pub label: String,
    /// The FAT volume ID "ABCD-1234"; must equal `stick.fs_uuid`.
    pub fs_uuid: String,
    /// Seconds before the default boots; 0 boots it at once; `WAIT_FOREVER`.
    pub timeout_secs: u32,
    /// SYSLINUX `TOTALTIMEOUT` in seconds: boot the default even when a key
    /// stopped the countdown (livecd-iso-to-disk `--totaltimeout`). GRUB has none.
    pub total_timeout_secs: Option<u32>,
    pub stick: StickArgs,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RenderError {
    #[error(
        "the boot menu has no entry left to put on the stick (only media-check entries, \
         which do nothing on a USB stick); check the ISO with `livestick inspect`"
    )]
    NoEntries,
    #[error(
        "filesystem UUID {0:?} is not usable in a boot config (empty, or has spaces or quotes)"
    )]
    InvalidUuid(String),
    #[error(
        "the config would search for UUID {search} but the kernel arguments name {args}; \
         both must be the stick's FAT volume ID"
    )]
    UuidMismatch { search: String, args: String },
    #[error("label {0:?} cannot go into a boot config (it has a line break)")]
    InvalidLabel(String),
    #[error(
        "entry {title:?}: path {path:?} cannot be written into {loader} (spaces, commas or \
         line breaks); rename the file on the ISO side or use the other loader"
    )]
    UnsafePath {
        title: String,
        path: String,
        loader: &'static str,
    },
    #[error(
        "entry {title:?}: a kernel argument contains a line break, which no boot config can hold"
    )]
    UnsafeArgs { title: String },
    #[error("internal template error in {template}: {what}")]
    Template {
        template: &'static str,
        what: String,
    },
}

impl crate::error::Classify for RenderError {
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::Io
    }
}

/// An entry as it goes onto the stick.
struct Out<'a> {
    entry: &'a MenuEntry,
    args: KernelArgs,
    title: String,
}

/// Control characters (a newline in a title) would start a new config line.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

fn check_params(p: &RenderParams) -> Result<(), RenderError> {
    let bad = |s: &str| {
        s.is_empty()
            || s.chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '\'')
    };
    if bad(&p.fs_uuid) {
        return Err(RenderError::InvalidUuid(p.fs_uuid.clone()));
    }
    if p.stick.fs_uuid.trim() != p.fs_uuid {
        return Err(RenderError::UuidMismatch {
            search: p.fs_uuid.clone(),
            args: p.stick.fs_uuid.clone(),
        });
    }
    if p.label.chars().any(char::is_control) {
        return Err(RenderError::InvalidLabel(p.label.clone()));
    }
    Ok(())
}

/// Drops media-check entries, rewrites Linux entries' arguments for the stick
/// and works out where the default went.
fn prepare<'a>(menu: &'a BootMenu, p: &RenderParams) -> Result<(Vec<Out<'a>>, usize), RenderError> {
    check_params(p)?;
    let mut out = Vec::new();
    let mut default = None;
    for (i, e) in menu.entries.iter().enumerate() {
        if e.purpose == EntryPurpose::MediaCheck {
            continue;
        }
        if i == menu.default_index {
            default = Some(out.len());
        }
        let args = if e.is_linux_boot() {
            rewrite_for_stick(&e.args, &p.stick)
        } else {
            // memtest and the like have nothing to do with the live root.
            e.args.clone()
        };
        let title = one_line(&e.title);
        if args.iter().any(|a| {
            a.key.contains(['\n', '\r'])
                || a.value.as_deref().is_some_and(|v| v.contains(['\n', '\r']))
        }) {
            return Err(RenderError::UnsafeArgs { title });
        }
        out.push(Out {
            entry: e,
            args,
            title,
        });
    }
    if out.is_empty() {
        return Err(RenderError::NoEntries);
    }
    // Fedora makes "Test this media" the default; on the stick the live entry
    // it would have booted after the check takes its place.
    let default = default
        .or_else(|| {
            out.iter()
                .position(|o| o.entry.purpose == EntryPurpose::Live)
        })
        .unwrap_or(0);
    Ok((out, default))
}

fn menu_title(menu: &BootMenu, p: &RenderParams) -> String {
    let t = one_line(&p.title);
    if !t.is_empty() {
        return t;
    }
    menu.title
        .as_deref()
        .map(one_line)
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| one_line(&p.label))
}

/// Fills `{{NAME}}` placeholders. A line holding nothing but one placeholder
/// is dropped when the value is empty and otherwise gets the line's
/// indentation on each of the value's lines, so optional and multi-line
/// pieces stay tidy. Values are inserted verbatim, never re-scanned.
fn fill(
    template: &'static str,
    name: &'static str,
    vars: &[(&str, &str)],
) -> Result<String, RenderError> {
    let lookup = |key: &str| {
        vars.iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .ok_or_else(|| RenderError::Template {
                template: name,
                what: format!("no value for {{{{{key}}}}}"),
            })
    };
    let mut out = String::new();
    for line in template.lines() {
        let trimmed = line.trim();
        let indent = &line[..line.len() - line.trim_start().len()];
        if let Some(key) = trimmed
            .strip_prefix("{{")
            .and_then(|r| r.strip_suffix("}}"))
            .filter(|k| !k.contains("{{") && !k.contains("}}"))
        {
            let value = lookup(key)?;
            for v in value.lines() {
                if !v.is_empty() {
                    out.push_str(indent);
                }
                out.push_str(v);
                out.push('\n');
            }
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after.find("}}").ok_or_else(|| RenderError::Template {
                template: name,
                what: format!("unclosed placeholder in {line:?}"),
            })?;
            out.push_str(lookup(&after[..end])?);
            rest = &after[end + 2..];
        }
        out.push_str(rest);
        out.push('\n');
    }
    Ok(out)
}

/// A SYSLINUX label name for each entry: short, unique, and telling.
fn label_names(entries: &[Out<'_>]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for o in entries {
        let base = match o.entry.purpose {
            EntryPurpose::Live => "linux",
            EntryPurpose::BasicGraphics => "basic",
            EntryPurpose::Rescue => "rescue",
            EntryPurpose::MediaCheck => "check",
            EntryPurpose::Other => "other",
        };
        let mut name = base.to_string();
        let mut n = 1;
        while names.iter().any(|x| x.eq_ignore_ascii_case(&name)) {
            n += 1;
            name = format!("{base}{n}");
        }
        names.push(name);
    }
    names
}

/// SYSLINUX has no quoting: a path must be one word, and initrd lists are
/// comma-separated.
fn syslinux_path(o: &Out<'_>, path: &str) -> Result<String, RenderError> {
    if path.is_empty()
        || path
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == ',')
    {
        return Err(RenderError::UnsafePath {
            title: o.title.clone(),
            path: path.to_string(),
            loader: "syslinux.cfg",
        });
    }
    Ok(path.to_string())
}

/// Renders `syslinux.cfg` (BIOS).
pub fn render_syslinux(menu: &BootMenu, p: &RenderParams) -> Result<String, RenderError> {
    let (entries, default) = prepare(menu, p)?;
    let names = label_names(&entries);
    let mut blocks = Vec::new();
    for (i, (o, name)) in entries.iter().zip(&names).enumerate() {
        let kernel = syslinux_path(o, &o.entry.kernel)?;
        let initrds = o
            .entry
            .initrds
            .iter()
            .map(|i| syslinux_path(o, i))
            .collect::<Result<Vec<_>, _>>()?;
        let mut append = Vec::new();
        if !initrds.is_empty() {
            append.push(format!("initrd={}", initrds.join(",")));
        }
        if !o.args.is_empty() {
            append.push(o.args.to_string());
        }
        let append = if append.is_empty() {
            String::new()
        } else {
            format!("APPEND {}", append.join(" "))
        };
        let menu_default = if i == default { "MENU DEFAULT" } else { "" };
        blocks.push(fill(
            SYSLINUX_ENTRY,
            "syslinux-entry.cfg",
            &[
                ("NAME", name),
                ("TITLE", &o.title),
                ("MENU_DEFAULT", menu_default),
                ("KERNEL", &kernel),
                ("APPEND", &append),
            ],
        )?);
    }
    let serial = match menu.source {
        MenuSource::Isolinux => menu.preamble.join("\n"),
        MenuSource::Grub => menu
            .serial_console()
            .map(|s| format!("SERIAL {} {}", s.unit, s.speed))
            .unwrap_or_default(),
    };
    let timeout = match p.timeout_secs {
        WAIT_FOREVER => 0,
        // 0 means "wait forever" to SYSLINUX; a tenth of a second is the
        // closest thing to "at once" that still lets a held key stop it.
        0 => 1,
        s => s.min(MAX_TIMEOUT_SECS) * 10,
    };
    fill(
        SYSLINUX_CFG,
        "syslinux.cfg",
        &[
            ("LABEL", &one_line(&p.label)),
            ("FS_UUID", &p.fs_uuid),
            ("SERIAL", &serial),
            ("TITLE", &menu_title(menu, p)),
            ("TIMEOUT", &timeout.to_string()),
            (
                "TOTALTIMEOUT",
                &p.total_timeout_secs
                    .map(|s| format!("TOTALTIMEOUT {}", s.clamp(1, MAX_TIMEOUT_SECS) * 10))
                    .unwrap_or_default(),
            ),
            ("ENTRIES", &blocks.join("\n")),
        ],
    )
}

/// A GRUB word. Words from a GRUB menu keep `$variables` working as in the
/// source; words from an isolinux menu are literal, so `$` is escaped.
fn grub_word(w: &str, source: MenuSource) -> String {
    if source == MenuSource::Isolinux && w.contains('$') {
        let mut s = String::from("\"");
        for c in w.chars() {
            if matches!(c, '"' | '\\' | '$') {
                s.push('\\');
            }
            s.push(c);
        }
        s.push('"');
        s
    } else {
        grub_quote(w)
    }
}

/// Single quotes keep everything literal; a quote inside is closed, escaped
/// and reopened (`'\''`), which GRUB joins back into one word.
fn grub_title(t: &str) -> String {
    format!("'{}'", t.replace('\'', "'\\''"))
}

fn grub_path(o: &Out<'_>, path: &str, source: MenuSource) -> Result<String, RenderError> {
    if path.is_empty() || path.chars().any(char::is_control) {
        return Err(RenderError::UnsafePath {
            title: o.title.clone(),
            path: path.to_string(),
            loader: "grub.cfg",
        });
    }
    Ok(grub_word(path, source))
}

/// Renders `EFI/BOOT/grub.cfg` (UEFI; `linux`/`initrd` work in GRUB ≥ 2.04
/// on both EFI and BIOS, so the `…efi` variants are not needed).
pub fn render_grub(menu: &BootMenu, p: &RenderParams) -> Result<String, RenderError> {
    let (entries, default) = prepare(menu, p)?;
    let mut blocks = Vec::new();
    for o in &entries {
        let kernel = grub_path(o, &o.entry.kernel, menu.source)?;
        let initrds = o
            .entry
            .initrds
            .iter()
            .map(|i| grub_path(o, i, menu.source))
            .collect::<Result<Vec<_>, _>>()?;
        let initrd = if initrds.is_empty() {
            String::new()
        } else {
            format!("initrd {}", initrds.join(" "))
        };
        // GRUB hands each word to the kernel as one argument (adding the
        // kernel's quotes when a word has spaces), so no kernel quoting here.
        let args: String = o
            .args
            .words()
            .iter()
            .map(|w| format!(" {}", grub_word(w, menu.source)))
            .collect();
        blocks.push(fill(
            GRUB_ENTRY,
            "grub-entry.cfg",
            &[
                ("TITLE", &grub_title(&o.title)),
                ("KERNEL", &kernel),
                ("ARGS", &args),
                ("INITRD", &initrd),
            ],
        )?);
    }
    let preamble = match menu.source {
        MenuSource::Grub => menu.preamble.join("\n"),
        MenuSource::Isolinux => menu
            .serial_console()
            .map(|s| {
                format!(
                    "serial --unit={} --speed={}\nterminal_input serial console\n\
                     terminal_output serial console",
                    s.unit, s.speed
                )
            })
            .unwrap_or_default(),
    };
    let timeout = match p.timeout_secs {
        WAIT_FOREVER => "-1".to_string(),
        s => s.min(MAX_TIMEOUT_SECS).to_string(),
    };
    fill(
        GRUB_CFG,
        "grub.cfg",
        &[
            ("TITLE", &menu_title(menu, p)),
            ("LABEL", &one_line(&p.label)),
            ("FS_UUID", &p.fs_uuid),
            ("DEFAULT", &default.to_string()),
            ("TIMEOUT", &timeout),
            ("PREAMBLE", &preamble),
            ("ENTRIES", &blocks.join("\n")),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::cmdline::{DracutNames, KernelArgs, OverlayBoot};
    use crate::boot::menu::{parse_grub, parse_isolinux};

    fn params() -> RenderParams {
        RenderParams {
            title: "Fedora Live".into(),
            label: "LIVE".into(),
            fs_uuid: "ABCD-1234".into(),
            timeout_secs: 10,
            total_timeout_secs: None,
            stick: StickArgs {
                fs_uuid: "ABCD-1234".into(),
                live_dir: "LiveOS".into(),
                overlay: OverlayBoot::DmSnapshot,
                dracut: DracutNames::Classic,
                extra: KernelArgs::parse("console=ttyS0,115200"),
            },
        }
    }

    const ISO: &str = "serial 0 115200\nmenu title Fedora\ntimeout 600\n\
        label linux\n menu label ^Start Fedora\n kernel vmlinuz\n \
        append initrd=initrd.img root=live:CDLABEL=F40 rd.live.image quiet\n\
        label check\n menu label Test this ^media & start Fedora\n menu default\n kernel vmlinuz\n \
        append initrd=initrd.img root=live:CDLABEL=F40 rd.live.image rd.live.check quiet\n\
        label memtest\n menu label Memory test\n kernel memtest\n";

    #[test]
    fn syslinux_from_isolinux() {
        let m = parse_isolinux(ISO, "/isolinux").expect("parses");
        let cfg = render_syslinux(&m, &params()).expect("renders");
        let expected = "\
# Written by livestick: BIOS boot of a live image from a USB stick.
# Stick filesystem: label LIVE, UUID ABCD-1234.
# Kernel and initrd paths are absolute because the boot files keep the paths
# they had on the ISO; this file may live in any directory.
serial 0 115200
UI menu.c32
MENU TITLE Fedora Live
# Tenths of a second; 0 would mean \"wait forever\".
TIMEOUT 100

LABEL linux
  MENU LABEL Start Fedora
  MENU DEFAULT
  LINUX /isolinux/vmlinuz
  APPEND initrd=/isolinux/initrd.img root=live:UUID=ABCD-1234 rw rd.live.image rd.live.overlay=UUID=ABCD-1234 quiet console=ttyS0,115200

LABEL other
  MENU LABEL Memory test
  LINUX /isolinux/memtest
";
        assert_eq!(cfg, expected);
    }

    #[test]
    fn grub_from_isolinux() {
        let m = parse_isolinux(ISO, "/isolinux").expect("parses");
        let cfg = render_grub(&m, &params()).expect("renders");
        assert!(cfg.contains("set default=\"0\"\n"), "{cfg}");
        assert!(cfg.contains("set timeout=10\n"));
        assert!(cfg.contains("search --no-floppy --fs-uuid --set=root ABCD-1234\n"));
        assert!(cfg.contains(
            "serial --unit=0 --speed=115200\nterminal_input serial console\nterminal_output serial console\n"
        ));
        assert!(
            cfg.contains(
                "menuentry 'Start Fedora' --class gnu-linux --class gnu --class os {\n\
             \tlinux /isolinux/vmlinuz root=live:UUID=ABCD-1234 rw rd.live.image \
             rd.live.overlay=UUID=ABCD-1234 quiet console=ttyS0,115200\n\
             \tinitrd /isolinux/initrd.img\n}\n"
            ),
            "{cfg}"
        );
        assert!(
            cfg.contains("\tlinux /isolinux/memtest\n}\n"),
            "no empty initrd line"
        );
        assert!(!cfg.contains("check"));
    }

    #[test]
    fn timeouts() {
        let m = parse_isolinux(ISO, "/isolinux").expect("parses");
        let mut p = params();
        p.timeout_secs = 0;
        assert!(render_syslinux(&m, &p).is_ok_and(|c| c.contains("\nTIMEOUT 1\n")));
        assert!(render_grub(&m, &p).is_ok_and(|c| c.contains("set timeout=0\n")));
        p.timeout_secs = WAIT_FOREVER;
        assert!(render_syslinux(&m, &p).is_ok_and(|c| c.contains("\nTIMEOUT 0\n")));
        assert!(render_grub(&m, &p).is_ok_and(|c| c.contains("set timeout=-1\n")));
        p.timeout_secs = 1_000_000;
        assert!(render_syslinux(&m, &p).is_ok_and(|c| c.contains("\nTIMEOUT 36000\n")));
    }

    #[test]
    fn grub_titles_and_words_are_quoted() {
        let cfg = "menuentry 'It'\\''s \"x\" $y' { linux /k a=\"b c\" v=$x }\n";
        let m = parse_grub(cfg).expect("parses");
        let out = render_grub(&m, &params()).expect("renders");
        assert!(out.contains("menuentry 'It'\\''s \"x\" $y' "), "{out}");
        assert!(out.contains(" \"a=b c\" v=$x\n"), "{out}");
        let back = parse_grub(&out).expect("parses back");
        assert_eq!(back.entries[0].title, m.entries[0].title);
        assert_eq!(back.entries[0].args.get("a"), Some("b c"));
    }

    #[test]
    fn isolinux_dollar_is_literal_in_grub() {
        let m = parse_isolinux("label a\nkernel /k\nappend x=$HOME\n", "/").expect("parses");
        let out = render_grub(&m, &params()).expect("renders");
        assert!(out.contains(" \"x=\\$HOME\""), "{out}");
        let back = parse_grub(&out).expect("parses back");
        assert_eq!(back.entries[0].args.get("x"), Some("$HOME"));
    }

    #[test]
    fn errors() {
        let m = parse_isolinux(ISO, "/isolinux").expect("parses");
        let mut p = params();
        p.fs_uuid = "ABCD 1234".into();
        assert!(matches!(
            render_grub(&m, &p),
            Err(RenderError::InvalidUuid(_))
        ));
        let mut p = params();
        p.stick.fs_uuid = "FFFF-0000".into();
        assert!(matches!(
            render_syslinux(&m, &p),
            Err(RenderError::UuidMismatch { .. })
        ));
        let only_check =
            parse_isolinux("label c\nkernel k\nappend rd.live.check\n", "/").expect("parses");
        assert_eq!(
            render_syslinux(&only_check, &params()),
            Err(RenderError::NoEntries)
        );
        let spaced = parse_grub("menuentry a { linux '/my kernel' }\n").expect("parses");
        assert!(matches!(
            render_syslinux(&spaced, &params()),
            Err(RenderError::UnsafePath { .. })
        ));
        assert!(render_grub(&spaced, &params()).is_ok_and(|c| c.contains("linux \"/my kernel\"")));
    }

    #[test]
    fn fill_rules() {
        let t = "a {{X}} b\n  {{OPT}}\n  {{MULTI}}\nend";
        let out = fill(t, "t", &[("X", "1"), ("OPT", ""), ("MULTI", "p\nq")]);
        assert_eq!(out.as_deref(), Ok("a 1 b\n  p\n  q\nend\n"));
        assert!(fill("{{NOPE}}", "t", &[]).is_err());
        assert!(fill("x {{OPEN", "t", &[]).is_err());
        assert_eq!(
            fill("{{X}}", "t", &[("X", "{{Y}}")]).as_deref(),
            Ok("{{Y}}\n")
        );
    }
}
