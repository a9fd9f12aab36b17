//! Kernel command lines: parsing them the way the kernel does, editing them as a
//! list of arguments, and the one rewrite every stick needs (`rewrite_for_stick`).
//!
//! Everything here works on parsed arguments, never on regexes over text, so a
//! label that happens to contain `root=` or a value with spaces cannot be mangled.

use std::fmt;

use serde::{Serialize, Serializer};

/// One kernel argument: a bare flag (`quiet`, `value == None`) or `key=value`
/// (`value == Some`, possibly empty for `key=`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KernelArg {
    pub key: String,
    pub value: Option<String>,
}

impl KernelArg {
    /// A bare flag such as `rd.live.image`.
    pub fn flag(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            value: None,
        }
    }

    /// A `key=value` argument.
    pub fn pair(key: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            value: Some(value.into()),
        }
    }

    /// Splits one already-separated word (for example a GRUB word, whose quotes
    /// GRUB has removed) at its first `=`. No quote processing happens here.
    pub fn from_word(word: &str) -> Self {
        match word.split_once('=') {
            Some((k, v)) => Self::pair(k, v),
            None => Self::flag(word),
        }
    }

    /// The argument as one word without kernel quoting (what GRUB needs as a
    /// single word, since GRUB adds the kernel quotes itself).
    pub fn to_word(&self) -> String {
        match &self.value {
            Some(v) => format!("{}={}", self.key, v),
            None => self.key.clone(),
        }
    }
}

fn has_space(s: &str) -> bool {
    s.chars().any(|c| c.is_ascii_whitespace())
}

impl fmt::Display for KernelArg {
    /// Kernel syntax: a value holding whitespace is wrapped in double quotes,
    /// which the kernel strips again (`key="a b"`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if has_space(&self.key) {
            write!(f, "\"{}\"", self.key)?;
        } else {
            f.write_str(&self.key)?;
        }
        match &self.value {
            None => Ok(()),
            // A value that already holds quotes got its spaces protected by
            // them (that is how it was parsed), so it is written back as is;
            // wrapping it would toggle those quotes the wrong way.
            Some(v) if has_space(v) && !v.contains('"') => write!(f, "=\"{v}\""),
            Some(v) => write!(f, "={v}"),
        }
    }
}

/// An ordered kernel command line. Order matters (for duplicated keys the
/// last one usually wins in dracut, and everything after `--` goes to init),
/// so this is a list, not a map.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelArgs {
    args: Vec<KernelArg>,
}

impl KernelArgs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a command line with the kernel's own rules: whitespace separates
    /// arguments except inside double quotes; a leading quote on the argument
    /// or on its value is removed together with the matching trailing quote;
    /// quotes elsewhere stay literal (as the kernel leaves them).
    pub fn parse(line: &str) -> Self {
        let mut args = Vec::new();
        let mut token = String::new();
        let mut in_quote = false;
        let mut in_token = false;
        for c in line.chars() {
            if c.is_ascii_whitespace() && !in_quote {
                if in_token {
                    args.push(split_kernel_token(&token));
                    token.clear();
                    in_token = false;
                }
                continue;
            }
            if c == '"' {
                in_quote = !in_quote;
            }
            token.push(c);
            in_token = true;
        }
        if in_token {
            args.push(split_kernel_token(&token));
        }
        Self { args }
    }

    /// Builds arguments from words that are already separated and unquoted
    /// (GRUB's `linux` line): one argument per word.
    pub fn from_words<I, S>(words: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self {
            args: words
                .into_iter()
                .map(|w| KernelArg::from_word(w.as_ref()))
                .collect(),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &KernelArg> {
        self.args.iter()
    }

    pub fn len(&self) -> usize {
        self.args.len()
    }

    pub fn is_empty(&self) -> bool {
        self.args.is_empty()
    }

    /// True when any argument has this key, flag or `key=value`.
    pub fn contains(&self, key: &str) -> bool {
        self.args.iter().any(|a| a.key == key)
    }

    /// The value of the last argument with this key (dracut's `getarg` also
    /// takes the last one). A bare flag gives `Some("")`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.get_arg(key)
            .map(|a| a.value.as_deref().unwrap_or_default())
    }

    /// The last argument with this key, to tell `key` from `key=`.
    pub fn get_arg(&self, key: &str) -> Option<&KernelArg> {
        self.args.iter().rev().find(|a| a.key == key)
    }

    /// Every value given for a key, in order (`console=` may legitimately repeat).
    pub fn get_all(&self, key: &str) -> Vec<&str> {
        self.args
            .iter()
            .filter(|a| a.key == key)
            .map(|a| a.value.as_deref().unwrap_or_default())
            .collect()
    }

    /// Removes the first argument with this key and returns it.
    pub fn remove(&mut self, key: &str) -> Option<KernelArg> {
        let i = self.args.iter().position(|a| a.key == key)?;
        Some(self.args.remove(i))
    }

    /// Removes every argument with this key; returns how many there were.
    pub fn remove_all(&mut self, key: &str) -> usize {
        self.remove_where(|a| a.key == key)
    }

    /// Removes every argument matching a predicate; returns how many.
    pub fn remove_where(&mut self, mut pred: impl FnMut(&KernelArg) -> bool) -> usize {
        let before = self.args.len();
        self.args.retain(|a| !pred(a));
        before - self.args.len()
    }

    /// Sets `key=value`: the first occurrence is changed in place (so the
    /// argument keeps its position) and later duplicates are removed; when the
    /// key is absent it is pushed.
    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        self.replace(KernelArg::pair(key, value));
    }

    /// Like `set`, for any argument (also a bare flag).
    pub fn replace(&mut self, arg: KernelArg) {
        match self.args.iter().position(|a| a.key == arg.key) {
            Some(i) => {
                let key = arg.key.clone();
                self.args[i] = arg;
                let mut seen = 0usize;
                self.args.retain(|a| {
                    if a.key == key {
                        seen += 1;
                        seen == 1
                    } else {
                        true
                    }
                });
            }
            None => self.push(arg),
        }
    }

    /// Appends an argument to the kernel's part of the line: before a `--`
    /// separator if there is one, because words after `--` are handed to init.
    pub fn push(&mut self, arg: KernelArg) {
        match self.init_separator() {
            Some(i) => self.args.insert(i, arg),
            None => self.args.push(arg),
        }
    }

    /// Appends a bare flag (see `push`).
    pub fn push_flag(&mut self, key: &str) {
        self.push(KernelArg::flag(key));
    }

    /// Inserts at a position (clamped to the length).
    pub fn insert(&mut self, index: usize, arg: KernelArg) {
        let i = index.min(self.args.len());
        self.args.insert(i, arg);
    }

    fn init_separator(&self) -> Option<usize> {
        self.args
            .iter()
            .position(|a| a.key == "--" && a.value.is_none())
    }

    /// Each argument as one GRUB word (no kernel quoting; GRUB adds it).
    pub fn words(&self) -> Vec<String> {
        self.args.iter().map(KernelArg::to_word).collect()
    }
}

/// Turns one whitespace-delimited token (quotes still in it) into an argument,
/// stripping quotes exactly where the kernel's `next_arg` strips them.
fn split_kernel_token(token: &str) -> KernelArg {
    let quoted = token.starts_with('"');
    let body = if quoted { &token[1..] } else { token };
    match body.split_once('=') {
        None => {
            let key = if quoted {
                body.strip_suffix('"').unwrap_or(body)
            } else {
                body
            };
            KernelArg::flag(key)
        }
        Some((key, value)) => {
            let value = if let Some(v) = value.strip_prefix('"') {
                v.strip_suffix('"').unwrap_or(v)
            } else if quoted {
                value.strip_suffix('"').unwrap_or(value)
            } else {
                value
            };
            KernelArg::pair(key, value)
        }
    }
}

impl fmt::Display for KernelArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, a) in self.args.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{a}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for KernelArgs {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::parse(s))
    }
}

impl FromIterator<KernelArg> for KernelArgs {
    fn from_iter<T: IntoIterator<Item = KernelArg>>(iter: T) -> Self {
        Self {
            args: iter.into_iter().collect(),
        }
    }
}

/// Serialized as the command line a user would type, which is what
/// `inspect --json` readers want to see.
impl Serialize for KernelArgs {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// How the stick's root overlay is built, which decides the overlay arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OverlayBoot {
    /// No persistent overlay: dracut uses a temporary one in RAM.
    None,
    /// A dm-snapshot persistent store file `LiveOS/overlay-<LABEL>-<UUID>`.
    DmSnapshot,
    /// The same file holding ext4 with `overlayfs/` and `ovlwork/`.
    #[serde(rename = "overlayfs")]
    OverlayFs,
}

/// How the plan and reports name the overlay kind (the JSON's kebab-case words).
impl fmt::Display for OverlayBoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OverlayBoot::None => "no overlay",
            OverlayBoot::DmSnapshot => "dm-snapshot",
            OverlayBoot::OverlayFs => "OverlayFS",
        })
    }
}

/// Whether a menu entry's arguments mount the live root with an OverlayFS overlay:
/// `rd.live.overlay.overlayfs` (dracut ≤ 059, dracut-ng < 110) or `rd.overlay`
/// (dracut-ng ≥ 110, a boolean or a device), unless set false as dracut's
/// `getargbool` reads it (`0`, `no`, `off`).
pub fn boots_overlayfs(args: &KernelArgs) -> bool {
    let on = |key: &str| {
        args.get_arg(key).is_some_and(|a| {
            !matches!(
                a.value.as_deref().map(str::to_ascii_lowercase).as_deref(),
                Some("0" | "no" | "off" | "false")
            )
        })
    };
    on("rd.live.overlay.overlayfs") || on("rd.overlay")
}

/// The live directory a menu entry boots (`rd.live.dir=`, the older `live_dir=`,
/// else dracut's default `LiveOS`), and whether the entry boots a live root at all.
pub fn live_dir_booted(args: &KernelArgs) -> Option<&str> {
    let live =
        args.contains("rd.live.image") || args.get("root").is_some_and(|r| r.starts_with("live:"));
    live.then(|| {
        args.get("rd.live.dir")
            .or_else(|| args.get("live_dir"))
            .unwrap_or(DEFAULT_LIVE_DIR)
            .trim_matches('/')
    })
}

/// Which spelling of the overlay arguments the ISO's initrd understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum DracutNames {
    /// dracut ≤ 059 and dracut-ng < 110: `rd.live.overlay=`, `rd.live.overlay.overlayfs`.
    Classic,
    /// dracut-ng ≥ 110: `rd.overlay=<devspec>` (which also switches OverlayFS
    /// on, being the same key as the boolean `rd.overlay`), `rd.overlay.readonly`,
    /// `rd.overlay.reset`.
    Renamed,
}

/// What the stick needs on every Linux entry's command line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StickArgs {
    /// The FAT volume ID as udev shows it, "ABCD-1234".
    pub fs_uuid: String,
    /// The directory holding squashfs.img and the overlay, normally "LiveOS".
    pub live_dir: String,
    pub overlay: OverlayBoot,
    pub dracut: DracutNames,
    /// `--extra-kernel-args`, appended last; each replaces same-key arguments.
    pub extra: KernelArgs,
}

const DEFAULT_LIVE_DIR: &str = "LiveOS";

/// Arguments that describe where the ISO's live root, overlay or installer
/// stage2 was; on the stick they are stale and get replaced or dropped.
fn is_stale_for_stick(a: &KernelArg) -> bool {
    let k = a.key.as_str();
    matches!(
        k,
        "root"
            | "rd.live.image"
            | "liveimg"
            | "rd.live.dir"
            | "live_dir"
            // The media check is a no-op on a stick partition (dracut only
            // checks iso9660/udf devices), so it only confuses.
            | "rd.live.check"
            | "check"
            // Persistence arguments of whatever the ISO was made from; we
            // write the ones matching the overlay we actually create.
            | "overlay"
            | "readonly_overlay"
            | "reset_overlay"
            | "rd.overlay"
            // The installer's stage2 points at the ISO's label, which the
            // stick does not carry.
            | "inst.stage2"
            // These name the ISO itself or its filesystem type (iso9660),
            // both wrong for a FAT partition.
            | "iso-scan/filename"
            | "rootfstype"
    ) || k.starts_with("rd.live.overlay")
        || k.starts_with("rd.overlay.")
        // ro/rw are decided below from whether there is an overlay.
        || (a.value.is_none() && (k == "ro" || k == "rw"))
}

/// Rewrites an ISO entry's arguments for the stick.
///
/// Result order: `root=live:UUID=… [rw] rd.live.image [rd.live.dir=…]
/// [overlay args] <the ISO's remaining args> <extra>`. The stick arguments come
/// first so a human reading the config sees what livestick decided; `extra`
/// comes last so it can override anything (an extra argument replaces every
/// argument with the same key, ours included).
///
/// `rw` is added (and `ro` dropped) only with a persistent overlay: dracut
/// mounts the live partition with the command line's `ro`/`rw`, and the
/// overlay file must be writable; without an overlay a read-only mount keeps
/// the FAT clean if the stick is pulled.
///
/// With `DracutNames::Renamed` and a dm-snapshot overlay the classic
/// `rd.live.overlay=` spelling is kept on purpose: in dracut-ng ≥ 110 the new
/// `rd.overlay=<devspec>` is also the boolean that turns OverlayFS on, which
/// would make dracut mount the COW store as a filesystem and fail. The old
/// name is still accepted there (with a deprecation warning).
pub fn rewrite_for_stick(args: &KernelArgs, stick: &StickArgs) -> KernelArgs {
    let uuid = stick.fs_uuid.trim();
    let live_dir = stick.live_dir.trim_matches('/');
    let mut out = KernelArgs::new();
    out.push(KernelArg::pair("root", format!("live:UUID={uuid}")));
    if stick.overlay != OverlayBoot::None {
        out.push_flag("rw");
    }
    out.push_flag("rd.live.image");
    if !live_dir.is_empty() && live_dir != DEFAULT_LIVE_DIR {
        out.push(KernelArg::pair("rd.live.dir", live_dir));
    }
    let devspec = format!("UUID={uuid}");
    match (stick.overlay, stick.dracut) {
        (OverlayBoot::None, _) => {}
        (OverlayBoot::DmSnapshot, _) => out.push(KernelArg::pair("rd.live.overlay", devspec)),
        (OverlayBoot::OverlayFs, DracutNames::Classic) => {
            out.push(KernelArg::pair("rd.live.overlay", devspec));
            out.push_flag("rd.live.overlay.overlayfs");
        }
        // One argument does both jobs here; a second bare `rd.overlay` would
        // be read by `getarg rd.overlay` (last wins) as an empty devspec.
        //
        // The `:auto` path (dmsquash-live's default, `/<live dir>/overlay-
        // <LABEL>-<UUID>`: the file livestick makes) is not decoration. Since
        // dracut-ng 111 the overlayfs module reads a bare `rd.overlay=UUID=…`
        // as a whole device to hold the overlay: it mounts the live partition
        // a second time, makes `overlay/` and `ovlwork/` in the stick's root,
        // and links them *into* the upper directory dmsquash-live already set
        // up (seen booting boot-ng.iso). With a path it cannot resolve the
        // device, warns, and leaves dmsquash-live's overlay alone.
        (OverlayBoot::OverlayFs, DracutNames::Renamed) => {
            out.push(KernelArg::pair("rd.overlay", format!("{devspec}:auto")))
        }
    }
    let mut for_init = false;
    for a in args.iter() {
        // Words after `--` belong to init, not to dracut: copy them verbatim.
        if for_init || (a.key == "--" && a.value.is_none()) {
            for_init = true;
            out.args.push(a.clone());
            continue;
        }
        if is_stale_for_stick(a) || a.key == "initrd" {
            continue;
        }
        // Drop exact duplicates (the ISO configs sometimes repeat `quiet`).
        if out.iter().any(|b| b == a) {
            continue;
        }
        out.args.push(a.clone());
    }
    for e in stick.extra.iter() {
        out.remove_all(&e.key);
        out.push(e.clone());
    }
    out
}

/// Where the ISO's command line says the live root is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum LiveRoot {
    /// `CDLABEL=` (what Fedora ISOs use).
    CdLabel(String),
    Label(String),
    Uuid(String),
    PartUuid(String),
    PartLabel(String),
    /// Anything else: a device path, an ISO/image path, a URL.
    Other(String),
}

impl LiveRoot {
    /// The label, for either label form.
    pub fn label(&self) -> Option<&str> {
        match self {
            LiveRoot::CdLabel(l) | LiveRoot::Label(l) => Some(l),
            _ => None,
        }
    }
}

/// Reads the live root the ISO's entry points at: `root=live:<spec>`, or the
/// legacy `root=<spec>` together with `rd.live.image`/`liveimg`. Returns
/// `None` for entries that are not live boots.
pub fn live_root_label(args: &KernelArgs) -> Option<LiveRoot> {
    let root = args.get("root")?;
    let spec = match root.strip_prefix("live:") {
        Some(s) => s,
        None if args.contains("rd.live.image") || args.contains("liveimg") => root,
        None => return None,
    };
    let (kind, rest) = spec.split_once('=').unwrap_or(("", spec));
    let rest = rest.to_string();
    Some(match kind {
        "CDLABEL" => LiveRoot::CdLabel(rest),
        "LABEL" => LiveRoot::Label(rest),
        "UUID" => LiveRoot::Uuid(rest),
        "PARTUUID" => LiveRoot::PartUuid(rest),
        "PARTLABEL" => LiveRoot::PartLabel(rest),
        _ => LiveRoot::Other(spec.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stick(overlay: OverlayBoot, dracut: DracutNames) -> StickArgs {
        StickArgs {
            fs_uuid: "ABCD-1234".into(),
            live_dir: "LiveOS".into(),
            overlay,
            dracut,
            extra: KernelArgs::new(),
        }
    }

    const FEDORA: &str =
        "initrd=initrd.img root=live:CDLABEL=Fedora-WS-Live-40-1-14  rd.live.image quiet rhgb";

    #[test]
    fn parses_flags_pairs_and_keeps_order() {
        let a = KernelArgs::parse(FEDORA);
        let keys: Vec<_> = a.iter().map(|a| a.key.as_str()).collect();
        assert_eq!(keys, ["initrd", "root", "rd.live.image", "quiet", "rhgb"]);
        assert_eq!(a.get("root"), Some("live:CDLABEL=Fedora-WS-Live-40-1-14"));
        assert_eq!(a.get("quiet"), Some(""));
        assert_eq!(a.get("nothere"), None);
        assert!(a.contains("rhgb"));
    }

    #[test]
    fn whitespace_of_all_kinds_separates() {
        let a = KernelArgs::parse(" \tquiet\r\n  rhgb\t");
        assert_eq!(a.to_string(), "quiet rhgb");
    }

    #[test]
    fn quotes_like_the_kernel() {
        let a = KernelArgs::parse(r#"a="x y" "b=c d" "flag with space" e=f"g h" x="#);
        let v: Vec<_> = a.iter().cloned().collect();
        assert_eq!(v[0], KernelArg::pair("a", "x y"));
        assert_eq!(v[1], KernelArg::pair("b", "c d"));
        assert_eq!(v[2], KernelArg::flag("flag with space"));
        // The kernel only strips a quote at the start of the value.
        assert_eq!(v[3], KernelArg::pair("e", "f\"g h\""));
        assert_eq!(v[4], KernelArg::pair("x", ""));
    }

    #[test]
    fn display_requotes_and_round_trips() {
        for line in [
            FEDORA,
            r#"a="x y" "flag with space" e=f"g h" x= -- single init"#,
            "console=tty0 console=ttyS0,115200n8",
        ] {
            let a = KernelArgs::parse(line);
            let shown = a.to_string();
            assert_eq!(KernelArgs::parse(&shown), a, "{shown}");
        }
        assert_eq!(KernelArgs::parse(r#"a="x y""#).to_string(), r#"a="x y""#);
    }

    #[test]
    fn edits() {
        let mut a = KernelArgs::parse("quiet console=tty0 rhgb console=ttyS0");
        assert_eq!(a.get("console"), Some("ttyS0"), "last one wins");
        assert_eq!(a.get_all("console"), ["tty0", "ttyS0"]);
        a.set("console", "ttyS1");
        assert_eq!(a.to_string(), "quiet console=ttyS1 rhgb");
        assert_eq!(a.remove("quiet"), Some(KernelArg::flag("quiet")));
        assert_eq!(a.remove("quiet"), None);
        a.push_flag("x");
        a.push_flag("x");
        assert_eq!(a.remove_all("x"), 2);
        a.set("new", "v");
        assert_eq!(a.to_string(), "console=ttyS1 rhgb new=v");
    }

    #[test]
    fn push_stays_before_init_separator() {
        let mut a = KernelArgs::parse("quiet -- single");
        a.push_flag("rd.live.image");
        a.set("k", "v");
        assert_eq!(a.to_string(), "quiet rd.live.image k=v -- single");
    }

    #[test]
    fn rewrite_fedora_entry_no_overlay() {
        let a = KernelArgs::parse(FEDORA);
        let r = rewrite_for_stick(&a, &stick(OverlayBoot::None, DracutNames::Classic));
        assert_eq!(
            r.to_string(),
            "root=live:UUID=ABCD-1234 rd.live.image quiet rhgb"
        );
    }

    #[test]
    fn rewrite_check_entry_drops_check_and_stale_args() {
        let a = KernelArgs::parse(
            "root=CDLABEL=OLD liveimg ro rd.live.check check rd.live.overlay=LABEL=X:/o \
             rd.live.overlay.overlayfs overlay=UUID=1 rd.overlay.reset inst.stage2=hd:LABEL=OLD \
             rd.live.dir=Old rd.live.ram quiet quiet",
        );
        let r = rewrite_for_stick(&a, &stick(OverlayBoot::DmSnapshot, DracutNames::Classic));
        assert_eq!(
            r.to_string(),
            "root=live:UUID=ABCD-1234 rw rd.live.image rd.live.overlay=UUID=ABCD-1234 rd.live.ram quiet"
        );
    }

    #[test]
    fn a_menu_line_says_whether_it_boots_overlayfs_and_which_live_dir() {
        let line = |l: &str| KernelArgs::parse(l);
        let classic = line(
            "append initrd=initrd.img root=live:UUID=1 rd.live.image rd.live.overlay=UUID=1 rd.live.overlay.overlayfs",
        );
        assert!(boots_overlayfs(&classic));
        assert_eq!(live_dir_booted(&classic), Some("LiveOS"));
        let renamed =
            line("linux /vmlinuz root=live:UUID=1 rd.live.dir=/Grub/ rd.overlay=UUID=1:auto");
        assert!(boots_overlayfs(&renamed));
        assert_eq!(live_dir_booted(&renamed), Some("Grub"));
        let dm = line("append root=live:UUID=1 rd.live.image rd.live.overlay=UUID=1");
        assert!(!boots_overlayfs(&dm));
        assert!(!boots_overlayfs(&line(
            "append root=live:UUID=1 rd.live.overlay.overlayfs=0"
        )));
        assert!(!boots_overlayfs(&line(
            "linux /vmlinuz root=live:UUID=1 rd.overlay=no"
        )));
        assert_eq!(
            live_dir_booted(&line("menu label Boot from local drive")),
            None
        );
    }

    #[test]
    fn rewrite_overlayfs_classic_and_renamed() {
        let a = KernelArgs::parse(FEDORA);
        let c = rewrite_for_stick(&a, &stick(OverlayBoot::OverlayFs, DracutNames::Classic));
        assert_eq!(
            c.to_string(),
            "root=live:UUID=ABCD-1234 rw rd.live.image rd.live.overlay=UUID=ABCD-1234 \
             rd.live.overlay.overlayfs quiet rhgb"
        );
        let n = rewrite_for_stick(&a, &stick(OverlayBoot::OverlayFs, DracutNames::Renamed));
        assert_eq!(
            n.to_string(),
            "root=live:UUID=ABCD-1234 rw rd.live.image rd.overlay=UUID=ABCD-1234:auto quiet rhgb"
        );
        // A DM store must not get the new name: it would switch OverlayFS on.
        let d = rewrite_for_stick(&a, &stick(OverlayBoot::DmSnapshot, DracutNames::Renamed));
        assert!(d.contains("rd.live.overlay"));
        assert!(!d.contains("rd.overlay"));
    }

    #[test]
    fn rewrite_live_dir_and_extra() {
        let a = KernelArgs::parse(FEDORA);
        let mut s = stick(OverlayBoot::None, DracutNames::Classic);
        s.live_dir = "/F40/".into();
        s.extra = KernelArgs::parse("rhgb=0 console=ttyS0,115200 quiet");
        let r = rewrite_for_stick(&a, &s);
        assert_eq!(
            r.to_string(),
            "root=live:UUID=ABCD-1234 rd.live.image rd.live.dir=F40 rhgb=0 console=ttyS0,115200 quiet"
        );
    }

    #[test]
    fn extra_may_override_stick_args() {
        let a = KernelArgs::parse(FEDORA);
        let mut s = stick(OverlayBoot::DmSnapshot, DracutNames::Classic);
        s.extra = KernelArgs::parse("rd.live.overlay=none");
        let r = rewrite_for_stick(&a, &s);
        assert_eq!(r.get_all("rd.live.overlay"), ["none"]);
    }

    #[test]
    fn rewrite_is_idempotent() {
        for overlay in [
            OverlayBoot::None,
            OverlayBoot::DmSnapshot,
            OverlayBoot::OverlayFs,
        ] {
            for dracut in [DracutNames::Classic, DracutNames::Renamed] {
                let mut s = stick(overlay, dracut);
                s.live_dir = "Other".into();
                s.extra = KernelArgs::parse("console=ttyS0 x=\"a b\"");
                let once = rewrite_for_stick(&KernelArgs::parse(FEDORA), &s);
                let twice = rewrite_for_stick(&once, &s);
                assert_eq!(once, twice, "{overlay:?} {dracut:?}");
            }
        }
    }

    #[test]
    fn keeps_init_args_after_separator() {
        let a = KernelArgs::parse("root=live:LABEL=x quiet -- 3");
        let mut s = stick(OverlayBoot::None, DracutNames::Classic);
        s.extra = KernelArgs::parse("nomodeset");
        let r = rewrite_for_stick(&a, &s);
        assert_eq!(
            r.to_string(),
            "root=live:UUID=ABCD-1234 rd.live.image quiet nomodeset -- 3"
        );
    }

    #[test]
    fn reads_live_root() {
        let a = KernelArgs::parse(FEDORA);
        assert_eq!(
            live_root_label(&a),
            Some(LiveRoot::CdLabel("Fedora-WS-Live-40-1-14".into()))
        );
        assert_eq!(
            live_root_label(&a).as_ref().and_then(LiveRoot::label),
            Some("Fedora-WS-Live-40-1-14")
        );
        let legacy = KernelArgs::parse("root=LABEL=F9 liveimg");
        assert_eq!(live_root_label(&legacy), Some(LiveRoot::Label("F9".into())));
        let uuid = KernelArgs::parse("root=live:UUID=ABCD-1234");
        assert_eq!(
            live_root_label(&uuid),
            Some(LiveRoot::Uuid("ABCD-1234".into()))
        );
        let iso = KernelArgs::parse("root=live:/f.iso");
        assert_eq!(
            live_root_label(&iso),
            Some(LiveRoot::Other("/f.iso".into()))
        );
        assert_eq!(live_root_label(&KernelArgs::parse("root=/dev/sda1")), None);
        assert_eq!(live_root_label(&KernelArgs::parse("quiet")), None);
    }

    #[test]
    fn serializes_as_command_line() {
        let a = KernelArgs::parse(r#"a="x y" quiet"#);
        assert_eq!(
            serde_json::to_string(&a).ok().as_deref(),
            Some(r#""a=\"x y\" quiet""#)
        );
    }
}
