//! The ISO's boot menus (isolinux.cfg and grub.cfg) parsed into one model.
//!
//! Both parsers are forgiving on purpose: real ISOs carry themes, help texts,
//! submenus and conditionals that do not matter for booting, and refusing a
//! whole ISO over an unknown directive would help nobody. What they cannot use
//! they skip, and what might surprise a user they record in `warnings`.

use serde::Serialize;
use thiserror::Error;

use super::cmdline::KernelArgs;

/// The menu files a live stick's FAT may hold, each with whether GRUB reads it
/// (else SYSLINUX): where a stick's entries, and their kernel arguments, are.
pub const STICK_MENUS: [(&str, bool); 5] = [
    ("/syslinux/syslinux.cfg", false),
    ("/isolinux/isolinux.cfg", false),
    ("/syslinux/extlinux.conf", false),
    ("/EFI/BOOT/grub.cfg", true),
    ("/boot/grub2/grub.cfg", true),
];

/// Which syntax a menu was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MenuSource {
    Isolinux,
    Grub,
}

impl std::fmt::Display for MenuSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MenuSource::Isolinux => "isolinux",
            MenuSource::Grub => "GRUB",
        })
    }
}

/// What an entry is for, so rendering can drop or keep it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntryPurpose {
    /// Boots the live system.
    Live,
    /// "Test this media": pointless on a stick (dracut only checks iso9660).
    MediaCheck,
    /// `nomodeset`.
    BasicGraphics,
    Rescue,
    /// Anything else that has a kernel (memtest, an installer, …).
    Other,
}

impl std::fmt::Display for EntryPurpose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EntryPurpose::Live => "live",
            EntryPurpose::MediaCheck => "media check",
            EntryPurpose::BasicGraphics => "basic graphics",
            EntryPurpose::Rescue => "rescue",
            EntryPurpose::Other => "other",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MenuEntry {
    pub title: String,
    /// Absolute path on the ISO (and on the stick, where paths are kept).
    pub kernel: String,
    /// Absolute paths, in load order.
    pub initrds: Vec<String>,
    pub args: KernelArgs,
    pub purpose: EntryPurpose,
}

impl MenuEntry {
    /// True for entries that boot a Linux live/installer system through an
    /// initrd, whose command line the stick must rewrite. Entries such as
    /// memtest keep their arguments as they are.
    pub fn is_linux_boot(&self) -> bool {
        !self.initrds.is_empty()
            || self.args.contains("root")
            || self.args.contains("rd.live.image")
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BootMenu {
    pub source: MenuSource,
    pub title: Option<String>,
    /// `None`: no timeout given, or the menu waits forever.
    pub timeout_secs: Option<u32>,
    /// Index into `entries`.
    pub default_index: usize,
    pub entries: Vec<MenuEntry>,
    /// Top-level console lines (`serial`, `terminal_*` for GRUB; `serial`,
    /// `console` for isolinux) in the source syntax, passed through when the
    /// same syntax is rendered so serial-console setups keep working.
    pub preamble: Vec<String>,
    /// Things skipped or left alone that a user may want to know about
    /// (`include`d files not followed, `$variables` in paths, …).
    pub warnings: Vec<String>,
}

impl BootMenu {
    /// The serial console the preamble configures, in either syntax.
    pub fn serial_console(&self) -> Option<SerialConsole> {
        self.preamble
            .iter()
            .find_map(|l| SerialConsole::from_line(self.source, l))
    }
}

/// A serial console setting common to both boot loaders.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SerialConsole {
    pub unit: u8,
    pub speed: u32,
}

impl SerialConsole {
    /// Both loaders default to 9600 baud when no speed is given.
    const DEFAULT_SPEED: u32 = 9600;

    fn from_line(source: MenuSource, line: &str) -> Option<Self> {
        let mut words = line.split_whitespace();
        let first = words.next()?;
        if !first.eq_ignore_ascii_case("serial") {
            return None;
        }
        let mut s = Self {
            unit: 0,
            speed: Self::DEFAULT_SPEED,
        };
        match source {
            MenuSource::Isolinux => {
                if let Some(p) = words.next() {
                    s.unit = p.parse().ok()?;
                }
                if let Some(b) = words.next() {
                    s.speed = b.parse().ok()?;
                }
            }
            MenuSource::Grub => {
                for w in words {
                    if let Some(u) = w.strip_prefix("--unit=") {
                        s.unit = u.parse().ok()?;
                    } else if let Some(b) = w.strip_prefix("--speed=") {
                        s.speed = b.parse().ok()?;
                    } else if let Some(n) = w.strip_prefix("com") {
                        s.unit = n.parse().ok()?;
                    }
                }
            }
        }
        Some(s)
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MenuError {
    #[error(
        "{file} has no bootable Linux entry ({detail}); livestick needs a menu entry with a \
         kernel to boot the live system. Check that the ISO is a Fedora-style live image \
         (`livestick inspect ISO` lists what was found)"
    )]
    NoBootableEntry { file: String, detail: String },
}

impl crate::error::Classify for MenuError {
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::Io
    }
}

impl MenuError {
    /// Names the actual file once the caller knows its path on the ISO.
    pub fn in_file(self, path: &str) -> Self {
        match self {
            MenuError::NoBootableEntry { detail, .. } => MenuError::NoBootableEntry {
                file: path.to_string(),
                detail,
            },
        }
    }
}

/// Classifies an entry from its arguments first (they decide what really
/// happens at boot) and its title second.
pub fn classify(title: &str, args: &KernelArgs) -> EntryPurpose {
    let t = title.to_ascii_lowercase();
    if args.contains("rd.live.check") || args.contains("check") || t.contains("test this media") {
        EntryPurpose::MediaCheck
    } else if args.contains("nomodeset") || t.contains("basic graphics") {
        EntryPurpose::BasicGraphics
    } else if args.contains("rescue")
        || args.get("systemd.unit") == Some("rescue.target")
        || t.contains("rescue")
    {
        EntryPurpose::Rescue
    } else if args.contains("rd.live.image")
        || args.contains("liveimg")
        || args.get("root").is_some_and(|r| r.starts_with("live:"))
    {
        EntryPurpose::Live
    } else {
        EntryPurpose::Other
    }
}

/// Joins a possibly relative path onto a directory and normalises `.`, `..`
/// and repeated slashes, giving an absolute path.
fn absolute(dir: &str, path: &str) -> String {
    let joined = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{dir}/{path}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for p in joined.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

// ---------------------------------------------------------------- isolinux

#[derive(Default)]
struct PendingLabel {
    name: String,
    title: Option<String>,
    kernel: Option<String>,
    kernel_args: Vec<String>,
    append: Option<String>,
    initrds: Vec<String>,
    is_default: bool,
    /// `localboot`, `com32` modules, `menu exit`…: not a kernel to boot.
    not_linux: bool,
}

/// Kernel file extensions SYSLINUX boots as something other than Linux.
fn is_non_linux_image(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    [".c32", ".com", ".cbt", ".bs", ".bss", ".bin", ".0"]
        .iter()
        .any(|ext| lower.ends_with(ext))
}

fn strip_hotkey(s: &str) -> String {
    s.replace('^', "").trim().to_string()
}

/// Parses isolinux.cfg / syslinux.cfg. `cfg_dir` is the directory of the file
/// on the ISO (for example "/isolinux"): SYSLINUX resolves relative paths
/// against it, and the model stores absolute paths.
pub fn parse_isolinux(text: &str, cfg_dir: &str) -> Result<BootMenu, MenuError> {
    let dir = absolute("/", cfg_dir);
    let mut menu = BootMenu {
        source: MenuSource::Isolinux,
        title: None,
        timeout_secs: None,
        default_index: 0,
        entries: Vec::new(),
        preamble: Vec::new(),
        warnings: Vec::new(),
    };
    let mut labels: Vec<PendingLabel> = Vec::new();
    let mut current: Option<PendingLabel> = None;
    let mut global_append: Option<String> = None;
    let mut default_label: Option<String> = None;
    let mut menu_depth = 0usize;
    let mut in_help = false;
    let mut includes = 0usize;

    for raw in text.lines() {
        let line = raw.trim();
        if in_help {
            // Help text is free prose and may contain words like "kernel".
            if line.eq_ignore_ascii_case("endtext") {
                in_help = false;
            }
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (kw, rest) = split_keyword(line);
        let kw = kw.to_ascii_lowercase();
        match kw.as_str() {
            "label" => {
                labels.extend(current.take());
                current = Some(PendingLabel {
                    name: rest.to_string(),
                    ..Default::default()
                });
            }
            "menu" => {
                let (sub, arg) = split_keyword(rest);
                match sub.to_ascii_lowercase().as_str() {
                    "label" => {
                        if let Some(c) = current.as_mut() {
                            c.title = Some(strip_hotkey(arg));
                        }
                    }
                    "default" => {
                        if let Some(c) = current.as_mut() {
                            c.is_default = true;
                        }
                    }
                    "title" if menu_depth == 0 => menu.title = Some(arg.trim().to_string()),
                    // Submenus are flattened: their labels join the list.
                    "begin" => {
                        labels.extend(current.take());
                        menu_depth += 1;
                    }
                    "end" => {
                        labels.extend(current.take());
                        menu_depth = menu_depth.saturating_sub(1);
                    }
                    "exit" | "goto" | "quit" => {
                        if let Some(c) = current.as_mut() {
                            c.not_linux = true;
                        }
                    }
                    "include" => includes += 1,
                    _ => {}
                }
            }
            "kernel" | "linux" => {
                if let Some(c) = current.as_mut() {
                    let mut words = rest.split_whitespace();
                    if let Some(k) = words.next() {
                        if kw == "kernel" && is_non_linux_image(k) {
                            c.not_linux = true;
                        }
                        c.kernel = Some(k.to_string());
                        c.kernel_args = words.map(str::to_string).collect();
                    }
                }
            }
            "localboot" | "com32" | "comboot" | "pxe" | "fdimage" | "bss" | "boot" | "config" => {
                if let Some(c) = current.as_mut() {
                    c.not_linux = true;
                }
            }
            "append" => match current.as_mut() {
                Some(c) => c.append = Some(rest.to_string()),
                None => global_append = Some(rest.to_string()),
            },
            "initrd" => {
                if let Some(c) = current.as_mut() {
                    c.initrds.extend(split_initrds(rest));
                }
            }
            "text" => in_help = true,
            "default" => {
                let first = rest.split_whitespace().next().unwrap_or_default();
                if !first.is_empty() && !is_non_linux_image(first) {
                    default_label = Some(first.to_string());
                }
            }
            "timeout" => {
                if let Ok(tenths) = rest.trim().parse::<u32>() {
                    // SYSLINUX's 0 means "wait forever"; round partial seconds
                    // up so a short timeout never becomes "boot at once".
                    menu.timeout_secs = (tenths > 0).then(|| tenths.div_ceil(10));
                }
            }
            "serial" | "console" if current.is_none() => menu.preamble.push(line.to_string()),
            "include" => includes += 1,
            _ => {}
        }
    }
    labels.extend(current.take());
    if includes > 0 {
        menu.warnings.push(format!(
            "{includes} include directive(s) not followed; only entries in this file are used"
        ));
    }

    let total = labels.len();
    let mut default_from_label = None;
    let mut default_from_menu = None;
    for l in labels {
        let Some(kernel) = l.kernel.as_deref().filter(|_| !l.not_linux) else {
            continue;
        };
        let append = match &l.append {
            Some(a) => a.clone(),
            None => global_append.clone().unwrap_or_default(),
        };
        // `append -` means "no arguments" in SYSLINUX.
        let append = if append.trim() == "-" {
            String::new()
        } else {
            append
        };
        let mut args = KernelArgs::parse(&format!("{} {}", l.kernel_args.join(" "), append));
        let mut initrds: Vec<String> = l.initrds.iter().map(|p| absolute(&dir, p)).collect();
        for v in args.get_all("initrd") {
            initrds.extend(split_initrds(v).map(|p| absolute(&dir, &p)));
        }
        args.remove_all("initrd");
        let title = l.title.clone().unwrap_or_else(|| l.name.clone());
        let purpose = classify(&title, &args);
        let idx = menu.entries.len();
        if l.is_default && default_from_menu.is_none() {
            default_from_menu = Some(idx);
        }
        if default_label
            .as_deref()
            .is_some_and(|d| d.eq_ignore_ascii_case(&l.name))
        {
            default_from_label = Some(idx);
        }
        menu.entries.push(MenuEntry {
            title,
            kernel: absolute(&dir, kernel),
            initrds,
            args,
            purpose,
        });
    }
    if menu.entries.is_empty() {
        let mut detail = format!("{total} label(s), none with a Linux kernel");
        if includes > 0 {
            detail.push_str("; entries in `include`d files are not followed");
        }
        return Err(MenuError::NoBootableEntry {
            file: format!("{}/isolinux.cfg", dir.trim_end_matches('/')),
            detail,
        });
    }
    menu.default_index = default_from_menu.or(default_from_label).unwrap_or(0);
    Ok(menu)
}

fn split_keyword(line: &str) -> (&str, &str) {
    match line.find(|c: char| c.is_ascii_whitespace()) {
        Some(i) => (&line[..i], line[i..].trim()),
        None => (line, ""),
    }
}

fn split_initrds(list: &str) -> impl Iterator<Item = String> + '_ {
    list.split(|c: char| c == ',' || c.is_ascii_whitespace())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

// -------------------------------------------------------------------- GRUB

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    /// A word with GRUB quoting removed; `plain` when no part was quoted or
    /// escaped (only plain `{`/`}` open and close blocks).
    Word { text: String, plain: bool },
    /// End of a command: newline or `;`.
    End,
}

/// Splits grub.cfg into words with GRUB's quoting rules: '…' literal, "…"
/// with `\` escapes, `\` outside quotes, `#` comments at a word start,
/// `\`-newline continuation. `$variables` are kept as written.
fn grub_tokens(text: &str) -> Vec<Tok> {
    let mut toks = Vec::new();
    let mut chars = text.chars().peekable();
    let mut word = String::new();
    let mut in_word = false;
    let mut plain = true;
    let flush = |toks: &mut Vec<Tok>, word: &mut String, in_word: &mut bool, plain: &mut bool| {
        if *in_word {
            toks.push(Tok::Word {
                text: std::mem::take(word),
                plain: *plain,
            });
        }
        *in_word = false;
        *plain = true;
    };
    while let Some(c) = chars.next() {
        match c {
            '\n' | ';' => {
                flush(&mut toks, &mut word, &mut in_word, &mut plain);
                toks.push(Tok::End);
            }
            ' ' | '\t' | '\r' => flush(&mut toks, &mut word, &mut in_word, &mut plain),
            '#' if !in_word => {
                while chars.peek().is_some_and(|&c| c != '\n') {
                    chars.next();
                }
            }
            '\'' => {
                in_word = true;
                plain = false;
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    word.push(c);
                }
            }
            '"' => {
                in_word = true;
                plain = false;
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => match chars.next() {
                            Some('\n') => {}
                            Some(e @ ('"' | '\\' | '$')) => word.push(e),
                            Some(e) => {
                                word.push('\\');
                                word.push(e);
                            }
                            None => word.push('\\'),
                        },
                        c => word.push(c),
                    }
                }
            }
            '\\' => match chars.next() {
                Some('\n') => {}
                // A continuation in a CRLF file.
                Some('\r') if chars.peek() == Some(&'\n') => {
                    chars.next();
                }
                Some(e) => {
                    in_word = true;
                    plain = false;
                    word.push(e);
                }
                None => {}
            },
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    flush(&mut toks, &mut word, &mut in_word, &mut plain);
    toks
}

/// One command: its words, and whether its last word is a plain `{`.
struct Command {
    words: Vec<String>,
    opens_block: bool,
    closes_block: bool,
}

fn grub_commands(toks: Vec<Tok>) -> Vec<Command> {
    let mut cmds = Vec::new();
    let mut words: Vec<String> = Vec::new();
    let mut push = |words: &mut Vec<String>, opens: bool, closes: bool| {
        if !words.is_empty() || opens || closes {
            cmds.push(Command {
                words: std::mem::take(words),
                opens_block: opens,
                closes_block: closes,
            });
        }
    };
    for t in toks {
        match t {
            Tok::End => push(&mut words, false, false),
            Tok::Word { text, plain: true } if text == "{" => push(&mut words, true, false),
            Tok::Word { text, plain: true } if text == "}" => {
                push(&mut words, false, false);
                push(&mut words, false, true);
            }
            Tok::Word { text, .. } => words.push(text),
        }
    }
    push(&mut words, false, false);
    cmds
}

/// A top-level or submenu item, kept to resolve `set default=` (which counts
/// submenus and kernel-less entries too).
enum Item {
    Entry {
        title: String,
        id: Option<String>,
        flat: Option<usize>,
    },
    Submenu {
        title: String,
        id: Option<String>,
        items: Vec<Item>,
    },
}

#[derive(Default)]
struct EntryBody {
    kernel: Option<String>,
    args: Vec<String>,
    initrds: Vec<String>,
}

struct GrubParser {
    cmds: std::vec::IntoIter<Command>,
    menu: BootMenu,
    default: Option<String>,
    skipped: usize,
    /// Targets of `configfile` commands (kiwi-built ISOs hand over to
    /// boot/grub2/grub.cfg this way from EFI/BOOT/grub.cfg).
    configfiles: Vec<String>,
}

/// GRUB paths may start with a device, `($root)/…` or `(hd0,1)/…`; on the
/// stick `root` is the FAT partition, so the path alone is what counts.
fn grub_path(p: &str, warnings: &mut Vec<String>) -> String {
    let path = match (p.starts_with('('), p.find(')')) {
        (true, Some(i)) => &p[i + 1..],
        _ => p,
    };
    if path.contains('$') || !path.starts_with('/') {
        warnings.push(format!(
            "path {p:?} uses a GRUB variable or is not absolute; it is kept as written"
        ));
        return path.to_string();
    }
    absolute("/", path)
}

/// The title and `--id` of a `menuentry`/`submenu` command.
fn title_and_id(words: &[String]) -> (String, Option<String>) {
    let mut title = None;
    let mut id = None;
    let mut it = words.iter().skip(1);
    while let Some(w) = it.next() {
        match w.as_str() {
            "--id" => id = it.next().cloned(),
            "--class" | "--users" | "--hotkey" => {
                it.next();
            }
            w if w.starts_with("--id=") => id = Some(w["--id=".len()..].to_string()),
            w if w.starts_with("--") => {}
            w if title.is_none() => title = Some(w.to_string()),
            _ => {}
        }
    }
    (title.unwrap_or_default(), id)
}

impl GrubParser {
    /// Reads commands until the block closes (or the file ends), collecting
    /// entries. `depth` is 0 at top level.
    fn block(&mut self, depth: usize) -> Vec<Item> {
        let mut items = Vec::new();
        while let Some(cmd) = self.cmds.next() {
            if cmd.closes_block {
                if depth > 0 {
                    return items;
                }
                continue;
            }
            let first = cmd.words.first().map(String::as_str).unwrap_or_default();
            match first {
                "menuentry" if cmd.opens_block => {
                    let (title, id) = title_and_id(&cmd.words);
                    let body = self.entry_body();
                    let flat = self.finish_entry(&title, body);
                    items.push(Item::Entry { title, id, flat });
                }
                "submenu" if cmd.opens_block => {
                    let (title, id) = title_and_id(&cmd.words);
                    let sub = self.block(depth + 1);
                    items.push(Item::Submenu {
                        title,
                        id,
                        items: sub,
                    });
                }
                // Function bodies are not run where they are defined.
                _ if cmd.opens_block => self.skip_block(),
                "set" => {
                    for w in &cmd.words[1..] {
                        if let Some(v) = w.strip_prefix("default=") {
                            // `${saved_entry}` and friends are runtime state.
                            if !v.contains('$') {
                                self.default = Some(v.to_string());
                            }
                        } else if let Some(Ok(t)) =
                            w.strip_prefix("timeout=").map(str::parse::<i64>)
                        {
                            // -1 (wait forever) becomes None.
                            self.menu.timeout_secs = u32::try_from(t).ok();
                        }
                    }
                }
                "configfile" | "source" => {
                    if let Some(target) = cmd.words.get(1) {
                        let mut ignored = Vec::new();
                        self.configfiles.push(grub_path(target, &mut ignored));
                    }
                }
                "serial" | "terminal_input" | "terminal_output" | "terminal" if depth == 0 => {
                    self.menu.preamble.push(
                        cmd.words
                            .iter()
                            .map(|w| grub_quote(w))
                            .collect::<Vec<_>>()
                            .join(" "),
                    );
                }
                _ => {}
            }
        }
        if depth > 0 {
            self.menu
                .warnings
                .push("a submenu is not closed with `}` before the end of the file".into());
        }
        items
    }

    fn skip_block(&mut self) {
        let mut depth = 1usize;
        for cmd in self.cmds.by_ref() {
            if cmd.opens_block {
                depth += 1;
            }
            if cmd.closes_block {
                depth -= 1;
                if depth == 0 {
                    return;
                }
            }
        }
    }

    fn entry_body(&mut self) -> EntryBody {
        let mut body = EntryBody::default();
        let mut depth = 1usize;
        for cmd in self.cmds.by_ref() {
            if cmd.opens_block {
                depth += 1;
                continue;
            }
            if cmd.closes_block {
                depth -= 1;
                if depth == 0 {
                    return body;
                }
                continue;
            }
            let Some((first, rest)) = cmd.words.split_first() else {
                continue;
            };
            match first.as_str() {
                "linux" | "linuxefi" | "linux16" => {
                    if let Some((k, a)) = rest.split_first() {
                        body.kernel = Some(k.clone());
                        body.args = a.to_vec();
                    }
                }
                "initrd" | "initrdefi" | "initrd16" => body.initrds = rest.to_vec(),
                _ => {}
            }
        }
        self.menu
            .warnings
            .push("a menuentry is not closed with `}` before the end of the file".into());
        body
    }

    fn finish_entry(&mut self, title: &str, body: EntryBody) -> Option<usize> {
        let Some(kernel) = body.kernel else {
            // chainloader, fwsetup, reboot…: nothing livestick can boot.
            self.skipped += 1;
            return None;
        };
        let warnings = &mut self.menu.warnings;
        let kernel = grub_path(&kernel, warnings);
        let initrds = body
            .initrds
            .iter()
            .map(|p| grub_path(p, warnings))
            .collect();
        if body.args.iter().any(|a| a.contains('$')) {
            warnings.push(format!(
                "entry {title:?} has GRUB variables in its kernel arguments; they are kept as written"
            ));
        }
        let args = KernelArgs::from_words(&body.args);
        let purpose = classify(title, &args);
        self.menu.entries.push(MenuEntry {
            title: title.to_string(),
            kernel,
            initrds,
            args,
            purpose,
        });
        Some(self.menu.entries.len() - 1)
    }
}

/// Finds the flat index a GRUB `default` names: a number, a `>`-separated
/// path of numbers/titles/ids through submenus, or a title or id.
fn resolve_grub_default(items: &[Item], spec: &str) -> Option<usize> {
    let mut level = items;
    let mut parts = spec.split('>').peekable();
    while let Some(part) = parts.next() {
        let item = match part.parse::<usize>() {
            Ok(n) => level.get(n)?,
            Err(_) => level.iter().find(|i| match i {
                Item::Entry { title, id, .. } | Item::Submenu { title, id, .. } => {
                    title == part || id.as_deref() == Some(part)
                }
            })?,
        };
        match item {
            Item::Entry { flat, .. } => return if parts.peek().is_none() { *flat } else { None },
            Item::Submenu { items, .. } => level = items,
        }
    }
    None
}

/// Quotes a word so GRUB reads it back as the same single word.
pub(crate) fn grub_quote(w: &str) -> String {
    let safe = !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,+@%^~!$(){}[]".contains(c))
        && w != "{"
        && w != "}";
    if safe {
        w.to_string()
    } else {
        // Double quotes keep `$variables` working as they did in the source.
        let mut s = String::from("\"");
        for c in w.chars() {
            if c == '"' || c == '\\' {
                s.push('\\');
            }
            s.push(c);
        }
        s.push('"');
        s
    }
}

/// The files a grub.cfg hands over to with `configfile` or `source`, as
/// absolute paths (device prefixes such as `($root)` removed), so the caller
/// can find the real menu of a kiwi-built ISO.
pub fn grub_config_targets(text: &str) -> Vec<String> {
    let mut ignored = Vec::new();
    grub_commands(grub_tokens(text))
        .into_iter()
        .filter(|c| {
            matches!(
                c.words.first().map(String::as_str),
                Some("configfile" | "source")
            )
        })
        .filter_map(|c| c.words.get(1).map(|t| grub_path(t, &mut ignored)))
        .collect()
}

/// Parses a grub.cfg. Submenus are flattened in order; entries without a
/// `linux` line (chainloader, firmware setup) are skipped.
pub fn parse_grub(text: &str) -> Result<BootMenu, MenuError> {
    let mut p = GrubParser {
        cmds: grub_commands(grub_tokens(text)).into_iter(),
        menu: BootMenu {
            source: MenuSource::Grub,
            title: None,
            timeout_secs: None,
            default_index: 0,
            entries: Vec::new(),
            preamble: Vec::new(),
            warnings: Vec::new(),
        },
        default: None,
        skipped: 0,
        configfiles: Vec::new(),
    };
    let items = p.block(0);
    if p.menu.entries.is_empty() {
        let mut detail = format!(
            "{} menuentry(s) without a `linux` line, none with one",
            p.skipped
        );
        if !p.configfiles.is_empty() {
            detail.push_str(&format!(
                "; it loads {} with `configfile`, whose menu is the one to read",
                p.configfiles.join(", ")
            ));
        }
        return Err(MenuError::NoBootableEntry {
            file: "grub.cfg".into(),
            detail,
        });
    }
    for c in &p.configfiles {
        p.menu.warnings.push(format!(
            "`configfile`/`source` {c} not followed; only entries in this file are used"
        ));
    }
    if let Some(d) = p.default.take() {
        match resolve_grub_default(&items, &d) {
            Some(i) => p.menu.default_index = i,
            None => p.menu.warnings.push(format!(
                "default entry {d:?} does not name a bootable entry; using the first one"
            )),
        }
    }
    Ok(p.menu)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISOLINUX: &str = "default vesamenu.c32\r\n\
timeout 600\r\n\
\r\n\
display boot.msg\r\n\
menu clear\r\n\
menu background splash.png\r\n\
menu title Fedora-Workstation-Live 40\r\n\
MENU COLOR border * #00000000 #00000000 none\r\n\
\r\n\
label linux\r\n\
  menu label ^Start Fedora-Workstation-Live 40\r\n\
  kernel vmlinuz\r\n\
  append initrd=initrd.img root=live:CDLABEL=Fedora-WS-Live-40-1-14  rd.live.image quiet rhgb\r\n\
\r\n\
label check\r\n\
  menu label Test this ^media & start Fedora-Workstation-Live 40\r\n\
  menu default\r\n\
  kernel vmlinuz\r\n\
  append initrd=initrd.img root=live:CDLABEL=Fedora-WS-Live-40-1-14  rd.live.image rd.live.check quiet\r\n\
\r\n\
menu separator # insert an empty line\r\n\
menu begin ^Troubleshooting\r\n\
  menu title Troubleshooting Fedora-Workstation-Live 40\r\n\
label basic\r\n\
\tmenu indent count 5\r\n\
\tmenu label Start Fedora-Workstation-Live 40 in ^basic graphics mode\r\n\
\ttext help\r\n\
\t\tTry this option out if you're having trouble starting.\r\n\
\t\tkernel nonsense.c32\r\n\
\tendtext\r\n\
\tkernel vmlinuz\r\n\
\tappend initrd=initrd.img root=live:CDLABEL=Fedora-WS-Live-40-1-14  rd.live.image nomodeset quiet rhgb\r\n\
label rescue\r\n\
  menu label ^Rescue a Fedora-Workstation-Live 40 system\r\n\
  kernel vmlinuz\r\n\
  append initrd=initrd.img root=live:CDLABEL=Fedora-WS-Live-40-1-14  rd.live.image rescue quiet rhgb\r\n\
label memtest\r\n\
  menu label Run a ^memory test\r\n\
  kernel memtest\r\n\
label local\r\n\
  menu label Boot from ^local drive\r\n\
  localboot 0xffff\r\n\
label returntomain\r\n\
  menu label Return to ^main menu\r\n\
  menu exit\r\n\
menu end\r\n";

    #[test]
    fn isolinux_fedora() {
        let m = parse_isolinux(ISOLINUX, "/isolinux").expect("parses");
        assert_eq!(m.title.as_deref(), Some("Fedora-Workstation-Live 40"));
        assert_eq!(m.timeout_secs, Some(60));
        let titles: Vec<_> = m.entries.iter().map(|e| e.title.as_str()).collect();
        assert_eq!(
            titles,
            [
                "Start Fedora-Workstation-Live 40",
                "Test this media & start Fedora-Workstation-Live 40",
                "Start Fedora-Workstation-Live 40 in basic graphics mode",
                "Rescue a Fedora-Workstation-Live 40 system",
                "Run a memory test",
            ]
        );
        let purposes: Vec<_> = m.entries.iter().map(|e| e.purpose).collect();
        assert_eq!(
            purposes,
            [
                EntryPurpose::Live,
                EntryPurpose::MediaCheck,
                EntryPurpose::BasicGraphics,
                EntryPurpose::Rescue,
                EntryPurpose::Other,
            ]
        );
        assert_eq!(m.default_index, 1, "menu default is on the check entry");
        let e = &m.entries[0];
        assert_eq!(e.kernel, "/isolinux/vmlinuz");
        assert_eq!(e.initrds, ["/isolinux/initrd.img"]);
        assert_eq!(
            e.args.to_string(),
            "root=live:CDLABEL=Fedora-WS-Live-40-1-14 rd.live.image quiet rhgb"
        );
        assert!(!m.entries[4].is_linux_boot());
        assert!(m.warnings.is_empty());
    }

    #[test]
    fn isolinux_directives_and_defaults() {
        let cfg = "SERIAL 0 115200\n\
            # comment\n\
            DEFAULT second\n\
            TIMEOUT 5\n\
            APPEND console=ttyS0\n\
            include other.cfg\n\
            LABEL first\n  LINUX ../images/pxeboot/vmlinuz\n  INITRD a.img,/b.img\n\
            LABEL second\n  KERNEL /boot/vmlinuz extra=1\n  INITRD one.img\n  APPEND initrd=two.img,three.img x=\"a b\"\n\
            LABEL nope\n  COM32 hdt.c32\n\
            LABEL third\n  KERNEL vmlinuz\n  APPEND -\n";
        let m = parse_isolinux(cfg, "isolinux/").expect("parses");
        assert_eq!(m.timeout_secs, Some(1), "5 tenths round up");
        assert_eq!(m.preamble, ["SERIAL 0 115200"]);
        assert_eq!(
            m.serial_console(),
            Some(SerialConsole {
                unit: 0,
                speed: 115200
            })
        );
        assert_eq!(m.entries.len(), 3);
        assert_eq!(m.default_index, 1);
        assert_eq!(m.entries[0].title, "first", "label name without menu label");
        assert_eq!(m.entries[0].kernel, "/images/pxeboot/vmlinuz");
        assert_eq!(m.entries[0].initrds, ["/isolinux/a.img", "/b.img"]);
        assert_eq!(
            m.entries[0].args.to_string(),
            "console=ttyS0",
            "global append"
        );
        assert_eq!(
            m.entries[1].initrds,
            [
                "/isolinux/one.img",
                "/isolinux/two.img",
                "/isolinux/three.img"
            ]
        );
        assert_eq!(m.entries[1].args.to_string(), "extra=1 x=\"a b\"");
        assert!(m.entries[2].args.is_empty());
        assert_eq!(m.warnings.len(), 1);
    }

    #[test]
    fn isolinux_timeout_zero_waits_forever() {
        let m = parse_isolinux("timeout 0\nlabel a\nkernel k\n", "/").expect("parses");
        assert_eq!(m.timeout_secs, None);
        assert_eq!(m.entries[0].kernel, "/k");
    }

    #[test]
    fn isolinux_without_entries_is_an_error() {
        let err = parse_isolinux("include a.cfg\nlabel local\n localboot 0\n", "/isolinux")
            .expect_err("no entry");
        let msg = err.to_string();
        assert!(msg.contains("/isolinux/isolinux.cfg"), "{msg}");
        assert!(msg.contains("include"), "{msg}");
        let named = parse_isolinux("", "/syslinux")
            .expect_err("empty")
            .in_file("/syslinux/syslinux.cfg");
        assert!(
            named
                .to_string()
                .starts_with("/syslinux/syslinux.cfg has no bootable")
        );
    }

    const GRUB: &str = "set default=\"1\"\n\
\n\
function load_video {\n\
  insmod all_video\n\
  linux /not/an/entry\n\
}\n\
\n\
load_video\n\
set gfxpayload=keep\n\
insmod gzio\n\
insmod part_gpt\n\
insmod ext2\n\
serial --unit=0 --speed=115200\n\
terminal_input serial console\n\
terminal_output serial console\n\
\n\
set timeout=60\n\
### END /etc/grub.d/00_header ###\n\
\n\
search --no-floppy --set=root -l 'Fedora-WS-Live-40-1-14'\n\
\n\
### BEGIN /etc/grub.d/10_linux ###\n\
menuentry 'Start Fedora-Workstation-Live 40' --class fedora --class gnu-linux --class gnu --class os {\n\
\tlinuxefi /images/pxeboot/vmlinuz root=live:CDLABEL=Fedora-WS-Live-40-1-14  rd.live.image quiet rhgb\n\
\tinitrdefi /images/pxeboot/initrd.img\n\
}\n\
menuentry 'Test this media & start Fedora-Workstation-Live 40' --class fedora --class gnu-linux --class gnu --class os {\n\
\tlinuxefi /images/pxeboot/vmlinuz root=live:CDLABEL=Fedora-WS-Live-40-1-14  rd.live.image rd.live.check quiet\n\
\tinitrdefi /images/pxeboot/initrd.img\n\
}\n\
submenu 'Troubleshooting -->' {\n\
\tmenuentry 'Start Fedora-Workstation-Live 40 in basic graphics mode' --class fedora --class gnu-linux --class gnu --class os {\n\
\t\tlinuxefi /images/pxeboot/vmlinuz root=live:CDLABEL=Fedora-WS-Live-40-1-14  rd.live.image nomodeset quiet rhgb\n\
\t\tinitrdefi /images/pxeboot/initrd.img\n\
\t}\n\
\tmenuentry 'Boot first drive' --class fedora --class gnu-linux --class gnu --class os {\n\
\t\tchainloader (hd0)+1\n\
\t}\n\
}\n";

    #[test]
    fn grub_fedora() {
        let m = parse_grub(GRUB).expect("parses");
        assert_eq!(m.timeout_secs, Some(60));
        assert_eq!(m.default_index, 1);
        assert_eq!(m.entries.len(), 3);
        assert_eq!(m.entries[0].kernel, "/images/pxeboot/vmlinuz");
        assert_eq!(m.entries[0].initrds, ["/images/pxeboot/initrd.img"]);
        assert_eq!(
            m.entries[0].args.to_string(),
            "root=live:CDLABEL=Fedora-WS-Live-40-1-14 rd.live.image quiet rhgb"
        );
        assert_eq!(m.entries[1].purpose, EntryPurpose::MediaCheck);
        assert_eq!(m.entries[2].purpose, EntryPurpose::BasicGraphics);
        assert_eq!(
            m.preamble,
            [
                "serial --unit=0 --speed=115200",
                "terminal_input serial console",
                "terminal_output serial console"
            ]
        );
        assert_eq!(
            m.serial_console(),
            Some(SerialConsole {
                unit: 0,
                speed: 115200
            })
        );
        assert!(m.warnings.is_empty(), "{:?}", m.warnings);
    }

    #[test]
    fn grub_f42_quirks() {
        let cfg = "set default=\"Troubleshooting>Basic\"\r\n\
            set timeout=-1\r\n\
            menuentry \"Fedora \\\"42\\\" live\" --id=live {\r\n\
            \tlinux ($root)/boot/x86_64/loader/linux root=live:CDLABEL=F42 'x=a b' rd.live.image\r\n\
            \tinitrd ($root)/boot/x86_64/loader/initrd /boot/x86_64/loader/extra.img\r\n\
            }\r\n\
            menuentry 'It'\\''s \"quoted\"' { linux16 /k ; initrd16 /i }\r\n\
            submenu Troubleshooting {\r\n\
              menuentry 'no kernel' { chainloader +1 }\r\n\
              menuentry Basic {\r\n\
                linux /k nomodeset \\\r\n  quiet\r\n\
              }\r\n\
            }\r\n\
            menuentry iso { linux $isopath/vmlinuz iso-scan/filename=${iso} }\r\n";
        let m = parse_grub(cfg).expect("parses");
        assert_eq!(m.timeout_secs, None);
        let titles: Vec<_> = m.entries.iter().map(|e| e.title.as_str()).collect();
        assert_eq!(
            titles,
            ["Fedora \"42\" live", "It's \"quoted\"", "Basic", "iso"]
        );
        assert_eq!(m.default_index, 2);
        let e = &m.entries[0];
        assert_eq!(e.kernel, "/boot/x86_64/loader/linux");
        assert_eq!(
            e.initrds,
            [
                "/boot/x86_64/loader/initrd",
                "/boot/x86_64/loader/extra.img"
            ]
        );
        assert_eq!(e.args.get("x"), Some("a b"));
        assert_eq!(m.entries[1].kernel, "/k");
        assert_eq!(m.entries[1].initrds, ["/i"]);
        assert_eq!(m.entries[2].args.to_string(), "nomodeset quiet");
        assert_eq!(m.entries[3].kernel, "$isopath/vmlinuz");
        assert_eq!(m.entries[3].args.get("iso-scan/filename"), Some("${iso}"));
        assert_eq!(m.warnings.len(), 2, "{:?}", m.warnings);
    }

    #[test]
    fn grub_default_by_number_path_and_id() {
        let cfg = "menuentry a --id=ida { linux /a }\nsubmenu s { menuentry b { linux /b } menuentry c { linux /c } }\n";
        let with = |d: &str| {
            parse_grub(&format!("set default={d}\n{cfg}"))
                .map(|m| m.default_index)
                .ok()
        };
        assert_eq!(with("0"), Some(0));
        assert_eq!(with("1>1"), Some(2));
        assert_eq!(with("ida"), Some(0));
        assert_eq!(with("s>b"), Some(1));
        assert_eq!(with("7"), Some(0), "unknown falls back to the first");
        assert_eq!(with("${saved_entry}"), Some(0));
    }

    #[test]
    fn grub_without_entries_is_an_error() {
        let err = parse_grub("menuentry 'UEFI Firmware Settings' { fwsetup }\n")
            .expect_err("nothing bootable");
        assert!(
            err.to_string()
                .contains("grub.cfg has no bootable Linux entry")
        );
    }

    #[test]
    fn grub_kiwi_efi_stub_points_at_the_real_menu() {
        let stub = "set btrfs_relative_path=\"yes\"\n\
            search --file --set=root /boot/0x4c533432\n\
            set prefix=($root)/boot/grub2\n\
            configfile ($root)/boot/grub2/grub.cfg\n";
        assert_eq!(grub_config_targets(stub), ["/boot/grub2/grub.cfg"]);
        let err = parse_grub(stub).expect_err("no entries in the stub");
        assert!(
            err.to_string()
                .contains("/boot/grub2/grub.cfg with `configfile`"),
            "{err}"
        );
    }

    #[test]
    fn grub_quote_round_trips() {
        for w in [
            "plain",
            "a b",
            "it's",
            "say \"hi\"",
            "${x}",
            "back\\slash",
            "{",
            "",
        ] {
            let toks = grub_tokens(&grub_quote(w));
            assert_eq!(
                toks,
                [Tok::Word {
                    text: w.to_string(),
                    plain: grub_quote(w) == w
                }],
                "{w}"
            );
        }
    }

    #[test]
    fn absolute_paths() {
        assert_eq!(absolute("/isolinux", "vmlinuz"), "/isolinux/vmlinuz");
        assert_eq!(absolute("/isolinux/", "./a/../b"), "/isolinux/b");
        assert_eq!(absolute("/isolinux", "//x//y"), "/x/y");
        assert_eq!(absolute("/", "../../k"), "/k");
    }
}
