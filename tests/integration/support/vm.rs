//! The harness VM of `benches/vm/` driven from the tests: livestick runs inside a
//! small QEMU (TCG) VM against a stick disk the host makes fail, with QEMU's
//! `blkdebug` (write errors at chosen sectors) or by pulling a `usb-storage` stick
//! out through QMP. The guest side is `benches/vm/faults-guest.sh`; its console
//! lines (`LS-STDERR …`, `FAULT-STATUS n`) are what a [`VmRun`] parses.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{in_ci, repo};

/// A disk of the VM.
pub enum Disk<'a> {
    /// A virtio disk the guest finds as `@id`; `opts` are extra `-drive` options.
    Virtio {
        id: &'a str,
        file: &'a Path,
        opts: &'a str,
    },
    /// A virtio disk whose writes fail where blkdebug's `rules` file says.
    Faulty {
        id: &'a str,
        file: &'a Path,
        rules: &'a Path,
    },
    /// A usb-storage stick (`@usb` in the guest), QMP device id `id`.
    Usb {
        id: &'a str,
        file: &'a Path,
        opts: &'a str,
    },
}

/// What a VM run left: the guest script's exit status (livestick's) and the console.
pub struct VmRun {
    /// `None` when the guest never reported one (did not boot, crashed, timed out).
    pub status: Option<i32>,
    pub console: String,
    pub log: PathBuf,
}

impl VmRun {
    /// livestick's standard error as the guest relayed it.
    pub fn stderr(&self) -> String {
        self.prefixed("LS-STDERR ")
    }

    fn prefixed(&self, prefix: &str) -> String {
        self.console
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').split_once(prefix).map(|(_, r)| r))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    /// The last `n` console lines, for assertion messages.
    pub fn tail(&self, n: usize) -> String {
        crate::boot::harness::tail(&self.console, n)
    }
}

/// Can this machine run the VM? Checks the same things `benches/vm/` needs: QEMU, a
/// Debian kernel with its modules in /boot, static busybox, cpio, modprobe. Skips
/// with a message outside CI; in CI (`CI=true`) a missing piece is a failure.
pub fn vm_env_ready() -> bool {
    let mut missing = Vec::new();
    for (prog, pkg) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
        ("cpio", "cpio"),
        ("modprobe", "kmod"),
        ("mksquashfs", "squashfs-tools"),
        ("mtype", "mtools"),
        ("fsck.fat", "dosfstools"),
        ("sfdisk", "fdisk"),
        ("e2fsck", "e2fsprogs"),
        ("syslinux", "syslinux"),
    ] {
        if !super::have(prog) {
            missing.push(format!("{prog} (apt-get install -y {pkg})"));
        }
    }
    let kernel = std::fs::read_dir("/lib/modules")
        .map(|dir| {
            dir.flatten().any(|m| {
                let k = m.file_name();
                Path::new("/boot")
                    .join(format!("vmlinuz-{}", k.to_string_lossy()))
                    .exists()
                    && m.path().join("modules.dep").exists()
            })
        })
        .unwrap_or(false);
    if !kernel {
        missing
            .push("a kernel with modules in /boot (apt-get install -y linux-image-amd64)".into());
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("the fault-injection VM needs: {}", missing.join(", "));
    if in_ci() {
        panic!("{msg}");
    }
    eprintln!("SKIPPED: {msg}");
    false
}

/// Where the VM's files go: `<CARGO_TARGET_TMPDIR>/faults-vm`.
pub fn work_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("faults-vm");
    std::fs::create_dir_all(&dir).expect("create the VM work directory");
    dir
}

/// The initramfs with this build's livestick, the fault guest script and the USB
/// modules; built once per test process.
pub fn initramfs() -> &'static Path {
    static INITRD: OnceLock<PathBuf> = OnceLock::new();
    INITRD.get_or_init(|| {
        let out = work_dir().join(format!("initramfs-{}.cpio", std::process::id()));
        let vm = repo().join("benches/vm");
        let status = Command::new("bash")
            .arg(vm.join("livestick-initramfs.sh"))
            .arg(&out)
            .arg(vm.join("faults-guest.sh"))
            .arg(super::bin())
            .env("VM_MODULES", "xhci_pci usb_storage sd_mod")
            .stdout(Stdio::null())
            .status()
            .expect("run benches/vm/livestick-initramfs.sh");
        assert!(status.success(), "building the VM initramfs failed");
        out
    })
}

/// A blkdebug rules file beside `dir`: every write that touches one of `sectors`
/// (512-byte units of the whole disk) fails with EIO, every time.
pub fn write_error_rules(dir: &Path, sectors: &[u64]) -> PathBuf {
    let mut text = String::new();
    for s in sectors {
        // `write_aio` is the event the raw format driver raises for each guest
        // write; `iotype` keeps reads of the sector working, so read-back and
        // later reads see what is there rather than another error.
        text.push_str(&format!(
            "[inject-error]\nevent = \"write_aio\"\niotype = \"write\"\nerrno = \"5\"\nsector = \"{s}\"\nonce = \"off\"\n\n"
        ));
    }
    let path = dir.join("blkdebug.conf");
    std::fs::write(&path, text).expect("write the blkdebug rules");
    path
}

/// QEMU -drive/-device arguments of the disks, as `benches/vm/lib.sh` makes them.
fn disk_args(disks: &[Disk<'_>]) -> Vec<String> {
    let q = |p: &Path| p.display().to_string().replace(',', ",,");
    let with = |opts: &str| {
        if opts.is_empty() {
            String::new()
        } else {
            format!(",{opts}")
        }
    };
    let mut args: Vec<String> = Vec::new();
    for d in disks {
        match d {
            Disk::Virtio { id, file, opts } => {
                args.extend(virtio_args(id, &q(file), &with(opts)));
            }
            Disk::Faulty { id, file, rules } => {
                let file = format!("blkdebug:{}:{}", q(rules), q(file));
                args.extend(virtio_args(id, &file, ""));
            }
            Disk::Usb { id, file, opts } => {
                args.push("-drive".into());
                args.push(format!(
                    "file={},format=raw,if=none,id={id}-drive,cache=none,aio=threads{}",
                    q(file),
                    with(opts)
                ));
                args.push("-device".into());
                args.push(format!("qemu-xhci,id={id}-xhci"));
                args.push("-device".into());
                args.push(format!(
                    "usb-storage,bus={id}-xhci.0,drive={id}-drive,id={id},removable=on"
                ));
            }
        }
    }
    args
}

/// What a test does while the VM runs, given the console log and the QMP socket.
pub type WhileRunning<'a> = dyn Fn(&Path, &Path) + 'a;

/// A virtio disk, serial `id`. cache=none (unless `extra` names a cache mode): the
/// guest's writes reach the file with O_DIRECT, as `vm_disk` does.
fn virtio_args(id: &str, file: &str, extra: &str) -> Vec<String> {
    let cache = if extra.contains("cache=") {
        ""
    } else {
        ",cache=none,aio=threads"
    };
    vec![
        "-drive".into(),
        format!("file={file},format=raw,if=none,id={id}{cache}{extra}"),
        "-device".into(),
        format!("virtio-blk-pci,drive={id},serial={id}"),
    ]
}

/// Runs `livestick LS_ARGS` in the VM (`ls_args`: words, `@ID` for a disk) and
/// waits for it to power off. `during`, if given, is called with the console log's
/// path and the QMP socket while the VM runs.
pub fn run_vm(
    name: &str,
    ls_args: &[&str],
    disks: &[Disk<'_>],
    timeout: Duration,
    during: Option<&WhileRunning<'_>>,
) -> VmRun {
    let dir = work_dir();
    let log = dir.join(format!("{name}-{}.log", std::process::id()));
    let qmp = dir.join(format!("{name}-{}.qmp", std::process::id()));
    let _ = std::fs::remove_file(&qmp);
    for a in ls_args {
        assert!(
            !a.contains(',') && !a.contains(' '),
            "{a:?}: the guest's arguments travel comma-separated on the kernel command line"
        );
    }
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("benches/vm/run.sh"))
        .arg(initramfs())
        .arg(&log)
        .args(disk_args(disks))
        .env("VM_APPEND", format!("guest.LS_ARGS={}", ls_args.join(",")))
        .env("VM_QUIET", "1")
        .env("VM_MEM", "1024")
        .env("VM_TIMEOUT", timeout.as_secs().to_string())
        .env("VM_QMP", &qmp)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().expect("start benches/vm/run.sh");
    if let Some(f) = during {
        f(&log, &qmp);
    }
    let _ = child.wait().expect("wait for the VM");
    let console = String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
    let status = console.lines().rev().find_map(|l| {
        l.trim_end_matches('\r')
            .strip_prefix("FAULT-STATUS ")
            .and_then(|n| n.trim().parse().ok())
    });
    let _ = std::fs::remove_file(&qmp);
    VmRun {
        status,
        console,
        log,
    }
}

/// Waits until the console log holds `needle` (panics after `timeout`).
pub fn wait_for_console(log: &Path, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
        if text.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the VM console never showed {needle:?} within {timeout:?}; log {}\n{}",
            log.display(),
            crate::boot::harness::tail(&text, 30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends one QMP command (after the capabilities handshake) and waits for its reply.
pub fn qmp(socket: &Path, command: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    let stream = loop {
        match UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "QMP socket {}: {e}",
                    socket.display()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("QMP read timeout");
    let mut reader = BufReader::new(stream.try_clone().expect("clone the QMP stream"));
    let mut writer = stream;
    let mut line = String::new();
    // The greeting, then each command's `return` (events may come between).
    reader.read_line(&mut line).expect("QMP greeting");
    let mut send = |text: &str| -> String {
        writer
            .write_all(format!("{text}\n").as_bytes())
            .expect("write to QMP");
        loop {
            let mut reply = String::new();
            let n = reader.read_line(&mut reply).expect("read from QMP");
            assert!(n > 0, "QMP closed before replying to {text}");
            if reply.contains("\"return\"") || reply.contains("\"error\"") {
                return reply;
            }
        }
    };
    send(r#"{"execute": "qmp_capabilities"}"#);
    send(command)
}
