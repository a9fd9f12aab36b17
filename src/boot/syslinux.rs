//! BIOS boot: SYSLINUX on the FAT partition plus MBR boot code.
//!
//! SYSLINUX's installer is the reference implementation of its boot sector
//! patching, so we run it (the mtools-based `syslinux`, which works on image
//! files and devices without root or mounting) with `--offset` pointing at the
//! partition. Everything else (MBR code, menu modules) is plain file copying.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

use crate::io::{IoAt, io_at};
use crate::tools::{MCOPY, SYSLINUX, ToolMissing, find_program};

/// Menu modules the rendered syslinux.cfg uses (`UI menu.c32`), copied from the
/// same SYSLINUX installation as the installer so their versions match ldlinux.
pub const MENU_MODULES: [&str; 2] = ["menu.c32", "libutil.c32"];

#[derive(Debug, Error)]
pub enum SyslinuxError {
    #[error(
        "{what} not found (looked in {looked}); install SYSLINUX: `apt-get install syslinux syslinux-common mtools` on Debian/Ubuntu, `dnf install syslinux syslinux-nonlinux mtools` on Fedora"
    )]
    Missing { what: String, looked: String },
    /// The installer or mtools is not installed. Not a `#[source]`: the text
    /// already says it all, and a cause would repeat it.
    #[error(
        "{0}; BIOS boot needs all of SYSLINUX: `apt-get install syslinux syslinux-common mtools` on Debian/Ubuntu, `dnf install syslinux syslinux-nonlinux mtools` on Fedora"
    )]
    Program(ToolMissing),
    #[error("{path} is {len} bytes; MBR boot code must be 440 bytes")]
    BadBootCode { path: PathBuf, len: usize },
    #[error("the SYSLINUX installer failed ({status}): {stderr}")]
    InstallFailed { status: String, stderr: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl crate::error::Classify for SyslinuxError {
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::Io
    }
}

impl From<IoAt> for SyslinuxError {
    fn from(IoAt { path, source }: IoAt) -> Self {
        SyslinuxError::Io { path, source }
    }
}

/// Where the host's SYSLINUX files are.
#[derive(Debug, Clone)]
pub struct SyslinuxFiles {
    pub mbr: [u8; 440],
    pub gptmbr: [u8; 440],
    pub modules_dir: PathBuf,
    pub installer: PathBuf,
}

const MBR_DIRS: [&str; 3] = [
    "/usr/lib/syslinux/mbr",
    "/usr/share/syslinux",
    "/usr/lib/syslinux",
];
const MODULE_DIRS: [&str; 3] = [
    "/usr/lib/syslinux/modules/bios",
    "/usr/share/syslinux",
    "/usr/lib/syslinux/bios",
];

fn find_in(dirs: &[&str], name: &str) -> Result<PathBuf, SyslinuxError> {
    dirs.iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| SyslinuxError::Missing {
            what: name.to_string(),
            looked: dirs.join(", "),
        })
}

fn boot_code(path: &Path) -> Result<[u8; 440], SyslinuxError> {
    let bytes = fs::read(path).map_err(io_at(path))?;
    // mbr.bin is 440 bytes; some builds pad to 512 — only the code area counts.
    if bytes.len() < 440 || bytes.len() > 512 {
        return Err(SyslinuxError::BadBootCode {
            path: path.to_path_buf(),
            len: bytes.len(),
        });
    }
    let mut code = [0u8; 440];
    code.copy_from_slice(&bytes[..440]);
    Ok(code)
}

/// Finds the installer, the MBR boot code and the menu modules.
pub fn locate() -> Result<SyslinuxFiles, SyslinuxError> {
    let installer = find_program(&SYSLINUX).map_err(SyslinuxError::Program)?;
    // The installer writes to the FAT file system through mtools.
    find_program(&MCOPY).map_err(SyslinuxError::Program)?;
    let mbr = boot_code(&find_in(&MBR_DIRS, "mbr.bin")?)?;
    let gptmbr = boot_code(&find_in(&MBR_DIRS, "gptmbr.bin")?)?;
    let menu = find_in(&MODULE_DIRS, MENU_MODULES[0])?;
    let modules_dir = menu
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(MODULE_DIRS[0]));
    Ok(SyslinuxFiles {
        mbr,
        gptmbr,
        modules_dir,
        installer,
    })
}

/// Installs ldlinux.sys/ldlinux.c32 into `directory` of the FAT filesystem at
/// `offset` bytes into `target`, and the boot sector that loads them.
pub fn install(
    files: &SyslinuxFiles,
    target: &Path,
    offset: u64,
    directory: &str,
) -> Result<(), SyslinuxError> {
    let output = Command::new(&files.installer)
        .arg("--install")
        .arg("--offset")
        .arg(offset.to_string())
        .arg("--directory")
        .arg(directory)
        .arg(target)
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .map_err(io_at(&files.installer))?;
    if !output.status.success() {
        return Err(SyslinuxError::InstallFailed {
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(())
}
