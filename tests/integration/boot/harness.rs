//! QEMU boot harness for the boot tests.
//!
//! Boots a stick image (or an ISO as a CD) under software emulation, with the
//! serial console in a log file, and returns the `LSREPORT key=value …` lines
//! that the fixture root's init (`fixtures/boot/init.sh`) prints. The boot tests
//! and `fixture_iso` use it as `crate::boot::harness`.
//!
//! Any boot that does not reach the init's report and power off — a dracut
//! "Press [Enter]" or emergency-shell prompt, a GRUB/syslinux error, a kernel
//! panic, the hard timeout — panics with the last 40 console lines.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// OVMF as Debian's `ovmf` package installs it (a single image for `-bios`).
pub const OVMF: &str = "/usr/share/ovmf/OVMF.fd";
/// OVMF with Secure Boot: SMM-protected variable store, enforced by the code
/// image, and a variable template with Microsoft's keys enrolled (which trust
/// the shim a distribution signs with Microsoft's UEFI CA).
pub const OVMF_SECURE_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd";
pub const OVMF_MS_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd";
pub const QEMU: &str = "qemu-system-x86_64";

/// Firmware to boot with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS, QEMU's default: exercises MBR boot code + syslinux (or BIOS GRUB).
    Bios,
    /// OVMF: exercises `EFI/BOOT/BOOTX64.EFI` + grub.cfg.
    Uefi,
    /// OVMF with Secure Boot enforced and Microsoft's keys: only a signed
    /// chain (shim → GRUB → kernel) boots.
    UefiSecureBoot,
}

/// How the image is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Media {
    /// A raw image on `qemu-xhci` + `usb-storage`, like a real stick.
    UsbStick,
    /// An ISO on the q35 AHCI controller as a CD-ROM.
    Cdrom,
}

/// One boot.
#[derive(Clone, Debug)]
pub struct Boot {
    pub image: PathBuf,
    pub media: Media,
    pub firmware: Firmware,
    /// Fed to the guest as fw_cfg `opt/livestick/passphrase` (exact bytes).
    pub passphrase: Option<String>,
    /// Hard limit for the whole boot, firmware to power-off.
    pub timeout: Duration,
    /// Names the log file: `<CARGO_TARGET_TMPDIR>/boot-logs/<name>-<n>.log`.
    pub name: String,
    /// Keys to press, as a user at the keyboard would, once the console shows
    /// the text (a boot menu entry): QEMU monitor `sendkey` names.
    pub keys: Option<(String, Vec<String>)>,
}

impl Boot {
    /// A stick image under the given firmware, 180 s timeout.
    pub fn stick(image: &Path, firmware: Firmware, name: &str) -> Boot {
        Boot {
            image: image.to_path_buf(),
            media: Media::UsbStick,
            firmware,
            passphrase: None,
            timeout: Duration::from_secs(180),
            name: name.to_string(),
            keys: None,
        }
    }

    /// An ISO as a CD-ROM under the given firmware, 180 s timeout.
    pub fn cdrom(iso: &Path, firmware: Firmware, name: &str) -> Boot {
        Boot {
            media: Media::Cdrom,
            ..Boot::stick(iso, firmware, name)
        }
    }

    pub fn passphrase(mut self, p: &str) -> Boot {
        self.passphrase = Some(p.to_string());
        self
    }

    pub fn timeout(mut self, t: Duration) -> Boot {
        self.timeout = t;
        self
    }

    /// Presses `keys` (QEMU `sendkey` names such as `down`, `ret`) once the
    /// console shows `when`: how a test picks a boot menu entry.
    pub fn keys_when(mut self, when: &str, keys: &[&str]) -> Boot {
        self.keys = Some((
            when.to_string(),
            keys.iter().map(|k| k.to_string()).collect(),
        ));
        self
    }

    /// Boots, waits for power-off, returns the reports. Panics on any failure.
    pub fn run(&self) -> BootResult {
        run_boot(self)
    }
}

/// One `LSREPORT` line as key → value.
pub type Report = BTreeMap<String, String>;

/// What a successful boot reported.
#[derive(Clone, Debug)]
pub struct BootResult {
    pub reports: Vec<Report>,
    pub log: PathBuf,
    pub elapsed: Duration,
}

impl BootResult {
    /// The main report (`boot=1`): markers, overlay, home as found at boot.
    pub fn boot(&self) -> &Report {
        self.reports
            .iter()
            .find(|r| r.contains_key("boot"))
            .unwrap_or_else(|| panic!("no `LSREPORT boot=1` line; log {}", self.log.display()))
    }

    /// The report of a later phase (`written`, `filled`, `poweroff`).
    pub fn phase(&self, phase: &str) -> Option<&Report> {
        self.reports
            .iter()
            .find(|r| r.get("phase").map(String::as_str) == Some(phase))
    }

    /// A key of the main report; panics with the whole report when absent.
    pub fn get(&self, key: &str) -> &str {
        let r = self.boot();
        r.get(key)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("report has no {key:?}: {r:?}"))
    }

    /// Asserts `key=value` in the main report, naming the log on failure.
    pub fn expect(&self, key: &str, value: &str) -> &Self {
        let got = self.get(key);
        assert_eq!(
            got,
            value,
            "LSREPORT {key}: expected {value:?}, got {got:?}\nreport: {:?}\nlog: {}\n{}",
            self.boot(),
            self.log.display(),
            tail_of_file(&self.log, 40)
        );
        self
    }
}

/// Parses every `LSREPORT k=v …` line in a console log.
pub fn parse_reports(console: &str) -> Vec<Report> {
    console
        .lines()
        .filter_map(|line| {
            let at = line.find("LSREPORT ")?;
            let rest = &line[at + "LSREPORT ".len()..];
            Some(
                rest.split_whitespace()
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        })
        .collect()
}

/// Console text that means the boot is stuck or dead; checked while it runs.
const FATAL: &[(&str, &str)] = &[
    (
        "Press [Enter]",
        "dracut is waiting at a prompt (overlay not found?)",
    ),
    ("Entering emergency mode", "dracut emergency shell"),
    // dracut gives up at once but only drops to its shell after rd.retry.
    ("dracut: FATAL", "dracut gave up (see the line above it)"),
    ("Refusing to continue", "dracut gave up"),
    ("dracut:/#", "dracut debug shell"),
    ("Could not boot.", "dracut could not find the root"),
    ("rdsosreport.txt", "dracut emergency shell"),
    ("Kernel panic", "kernel panic"),
    ("No bootable device", "firmware found nothing to boot"),
    ("UEFI Interactive Shell", "OVMF found nothing to boot"),
    ("grub rescue>", "GRUB rescue prompt"),
    ("Press any key to continue", "GRUB error"),
    (
        "Could not find kernel image",
        "syslinux cannot find the kernel",
    ),
    ("Failed to load ldlinux.c32", "syslinux installation broken"),
    ("Boot error", "boot sector error"),
    ("Missing operating system", "MBR found no active partition"),
];

/// Is this machine able to run boot tests? Skips (false, with a message)
/// outside CI; in CI (`CI=true`) a missing prerequisite is a test failure.
pub fn boot_env_ready(firmware: &[Firmware]) -> bool {
    let mut missing = Vec::new();
    if !on_path(QEMU) {
        missing.push("qemu-system-x86_64 (apt-get install -y qemu-system-x86)".to_string());
    }
    if firmware.contains(&Firmware::Uefi) && !Path::new(OVMF).exists() {
        missing.push(format!("{OVMF} (apt-get install -y ovmf)"));
    }
    if firmware.contains(&Firmware::UefiSecureBoot) {
        for f in [OVMF_SECURE_CODE, OVMF_MS_VARS] {
            if !Path::new(f).exists() {
                missing.push(format!("{f} (apt-get install -y ovmf)"));
            }
        }
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (dracut builds the boot fixture's initramfs as root)".to_string());
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("boot tests need: {}", missing.join(", "));
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    false
}

fn on_path(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

fn log_path(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("boot-logs");
    std::fs::create_dir_all(&dir).expect("create boot log dir");
    let n = N.fetch_add(1, Ordering::SeqCst);
    dir.join(format!("{name}-{}-{n}.log", std::process::id()))
}

/// The QEMU command line for a boot (exposed so tests can print it).
pub fn qemu_command(boot: &Boot, log: &Path, fw_cfg_file: Option<&Path>) -> Command {
    let mut c = Command::new(QEMU);
    let machine = match boot.firmware {
        // The secure variable store lives in SMM.
        Firmware::UefiSecureBoot => "q35,smm=on",
        Firmware::Bios | Firmware::Uefi => "q35",
    };
    c.args([
        "-machine", machine, "-accel", "tcg", "-cpu", "qemu64", "-m", "1024",
    ]);
    c.args(["-nographic", "-no-reboot"]);
    if boot.keys.is_some() {
        c.arg("-monitor").arg(format!(
            "unix:{},server=on,wait=off",
            monitor_path(log).display()
        ));
    } else {
        c.args(["-monitor", "none"]);
    }
    c.arg("-serial").arg(format!("file:{}", log.display()));
    match boot.firmware {
        Firmware::Bios => {}
        Firmware::Uefi => {
            c.arg("-bios").arg(OVMF);
        }
        Firmware::UefiSecureBoot => {
            // Each boot gets a fresh copy of the variable template beside its
            // log: the firmware writes its variables back.
            let vars = log.with_extension("vars.fd");
            std::fs::copy(OVMF_MS_VARS, &vars).expect("copy the OVMF variable template");
            c.args(["-global", "driver=cfi.pflash01,property=secure,value=on"]);
            c.arg("-drive").arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={OVMF_SECURE_CODE}"
            ));
            c.arg("-drive").arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                vars.display().to_string().replace(',', ",,")
            ));
        }
    }
    let img = boot.image.display().to_string();
    // A comma in a path would split QEMU's option; double it as QEMU wants.
    let img = img.replace(',', ",,");
    match boot.media {
        Media::UsbStick => {
            c.arg("-drive")
                .arg(format!("file={img},format=raw,if=none,id=stick"));
            c.args(["-device", "qemu-xhci,id=xhci"]);
            c.args([
                "-device",
                "usb-storage,bus=xhci.0,drive=stick,removable=on,bootindex=0",
            ]);
        }
        Media::Cdrom => {
            c.arg("-drive").arg(format!(
                "file={img},format=raw,if=none,id=cd,media=cdrom,readonly=on"
            ));
            c.args(["-device", "ide-cd,drive=cd,bootindex=0"]);
        }
    }
    if let Some(f) = fw_cfg_file {
        c.arg("-fw_cfg").arg(format!(
            "name=opt/livestick/passphrase,file={}",
            f.display()
        ));
    }
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

fn run_boot(boot: &Boot) -> BootResult {
    assert!(
        boot.image.is_file(),
        "boot image {} does not exist",
        boot.image.display()
    );
    let log = log_path(&boot.name);
    let _ = std::fs::remove_file(&log);
    let pass_file = boot.passphrase.as_ref().map(|p| {
        let f = log.with_extension("passphrase");
        std::fs::write(&f, p.as_bytes()).expect("write passphrase file");
        f
    });
    let mut cmd = qemu_command(boot, &log, pass_file.as_deref());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {QEMU}: {e}"));
    let outcome = watch(&mut child, &log, boot.timeout, boot.keys.as_ref());
    let elapsed = start.elapsed();
    let console = read_lossy(&log);
    let fail = |why: &str| -> ! {
        panic!(
            "boot {:?} ({:?}, {:?}) of {} failed after {:.0?}: {why}\nlog: {}\n--- last 40 console lines ---\n{}",
            boot.name,
            boot.firmware,
            boot.media,
            boot.image.display(),
            elapsed,
            log.display(),
            tail(&console, 40)
        )
    };
    match outcome {
        Outcome::Exited(status, stderr) => {
            if !status.success() {
                fail(&format!("QEMU exited with {status}: {stderr}"));
            }
        }
        Outcome::Fatal(why) => fail(why),
        Outcome::Timeout => fail(&format!("no power-off within {:?}", boot.timeout)),
    }
    let reports = parse_reports(&console);
    if !reports.iter().any(|r| r.contains_key("boot")) {
        fail("the machine powered off without an `LSREPORT boot=1` line");
    }
    if !reports
        .iter()
        .any(|r| r.get("phase").map(String::as_str) == Some("poweroff"))
    {
        fail("the init did not reach its clean power-off");
    }
    BootResult {
        reports,
        log,
        elapsed,
    }
}

enum Outcome {
    Exited(std::process::ExitStatus, String),
    Fatal(&'static str),
    Timeout,
}

/// The QEMU monitor socket of a boot that presses keys, beside its log.
fn monitor_path(log: &Path) -> PathBuf {
    log.with_extension("monitor")
}

/// Presses keys through the QEMU monitor, one at a time, as a person would.
fn send_keys(log: &Path, keys: &[String]) {
    use std::io::Write as _;
    let path = monitor_path(log);
    let mut monitor = std::os::unix::net::UnixStream::connect(&path)
        .unwrap_or_else(|e| panic!("connect to the QEMU monitor {}: {e}", path.display()));
    for key in keys {
        writeln!(monitor, "sendkey {key}").expect("send a key to the QEMU monitor");
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn watch(
    child: &mut Child,
    log: &Path,
    timeout: Duration,
    keys: Option<&(String, Vec<String>)>,
) -> Outcome {
    let deadline = Instant::now() + timeout;
    let mut keys_pending = keys;
    loop {
        if let Some(status) = child.try_wait().expect("wait for QEMU") {
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
            }
            return Outcome::Exited(status, stderr);
        }
        let console = read_lossy(log);
        if let Some((_, why)) = FATAL.iter().find(|(pat, _)| console.contains(pat)) {
            kill(child);
            return Outcome::Fatal(why);
        }
        if let Some((when, keys)) = keys_pending
            && console.contains(when.as_str())
        {
            send_keys(log, keys);
            keys_pending = None;
        }
        if Instant::now() >= deadline {
            kill(child);
            return Outcome::Timeout;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The last `n` lines, with terminal control sequences made harmless.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    for l in &lines[lines.len().saturating_sub(n)..] {
        let clean: String = l
            .chars()
            .filter(|c| !c.is_control() || *c == '\t')
            .collect();
        let _ = writeln!(out, "{clean}");
    }
    out
}

pub fn tail_of_file(path: &Path, n: usize) -> String {
    tail(&read_lossy(path), n)
}
