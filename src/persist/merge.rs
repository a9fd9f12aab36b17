//! Merging a LiveOS overlay into a new `squashfs.img` ("image recompression and overlay
//! refreshment"), in user space and crash-safe.
//!
//! The plan is pure data ([`MergePlan`]); [`execute_merge`] runs it in steps:
//! `extract → apply → fsck → build → stage → verify → swap → reset`. The old
//! `squashfs.img` is replaced only by a rename after the new one is written, synced and
//! read back; the overlay is reset only after that rename. So at every instant the
//! directory holds the old image with the old overlay, or the new image (with the old
//! overlay, whose chunks already equal the merged data, or with an empty one).
//! `LIVESTICK_FAILPOINT=<step>` stops a run right after that step, for the crash tests.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::persist::snapshot::{self, LIVEOS_CHUNK_SECTORS, Opened, SnapshotError, StatusReport};
use crate::squash::{self, Compressor, ImageKind, SquashError, SquashInfo};

/// Root images a dm-snapshot overlay can sit on, in the order dracut looks for them.
pub const ROOT_IMAGES: [&str; 2] = ["LiveOS/rootfs.img", "LiveOS/ext3fs.img"];
/// The steps of a merge, in order; also the names `LIVESTICK_FAILPOINT` accepts.
pub const STEPS: [&str; 8] = [
    "extract", "apply", "fsck", "build", "stage", "verify", "swap", "reset",
];

#[derive(Debug, Error)]
pub enum MergeError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Squash(#[from] SquashError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "not enough space for {what} in {path}: {needed} bytes needed ({needed_mib} MiB), {free} bytes free ({free_mib} MiB)"
    )]
    NoSpace {
        what: &'static str,
        path: PathBuf,
        needed: u64,
        needed_mib: u64,
        free: u64,
        free_mib: u64,
    },
    #[error(
        "{squashfs} holds no LiveOS/rootfs.img or LiveOS/ext3fs.img: a dm-snapshot overlay needs a nested root image (this image looks like {what})"
    )]
    NoRootImage { squashfs: PathBuf, what: String },
    #[error(
        "{0} is an EROFS image (Fedora 42+ kiwi spins); those use OverlayFS persistence, not a dm-snapshot overlay, and merging them is not implemented yet"
    )]
    Erofs(PathBuf),
    #[error(
        "the overlay is marked Invalid; run `livestick overlay recover` first (the kernel refuses to merge it too)"
    )]
    OverlayInvalid,
    #[error("the overlay does not fit the root image: {0}")]
    OverlayCorrupt(SnapshotError),
    #[error(
        "e2fsck found errors it could not fix in the merged image (exit code {code}); the stick was not changed. Output:\n{output}"
    )]
    FsckFailed { code: i32, output: String },
    #[error(
        "read-back of {path} does not match what was written (sha256 {got}, expected {want}); the old image is still in place"
    )]
    VerifyMismatch {
        path: PathBuf,
        got: String,
        want: String,
    },
    #[error("stopped at failpoint after step `{0}` (LIVESTICK_FAILPOINT)")]
    Failpoint(&'static str),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> MergeError + '_ {
    move |source| MergeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What the user asked for.
#[derive(Debug, Clone)]
pub struct MergeRequest {
    pub squashfs: PathBuf,
    pub overlay: PathBuf,
    pub workdir: PathBuf,
    pub fsck: bool,
    pub compress: Option<Compressor>,
}

/// Everything a merge will do, computed without changing anything.
#[derive(Debug, Clone, Serialize)]
pub struct MergePlan {
    pub squashfs: PathBuf,
    pub squashfs_bytes: u64,
    pub squash: SquashInfo,
    pub root_image: String,
    pub root_image_bytes: u64,
    pub overlay: PathBuf,
    pub overlay_status: StatusReport,
    pub exceptions: u64,
    pub workdir: PathBuf,
    pub workdir_needed_bytes: u64,
    pub workdir_free_bytes: u64,
    pub target_dir: PathBuf,
    pub target_needed_bytes: u64,
    pub target_free_bytes: u64,
    pub mksquashfs_args: Vec<String>,
    pub fsck: bool,
    pub nothing_to_merge: bool,
    pub notes: Vec<String>,
    pub steps: Vec<String>,
    /// Stop with an error right after this step (crash tests); from `LIVESTICK_FAILPOINT`.
    #[serde(skip)]
    pub failpoint: Option<String>,
}

/// Free bytes for an unprivileged user on the file system holding `path`.
pub fn free_bytes(path: &Path) -> Result<u64, MergeError> {
    let st = nix::sys::statvfs::statvfs(path).map_err(|e| MergeError::Io {
        path: path.to_path_buf(),
        source: io::Error::from(e),
    })?;
    Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

fn same_fs(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    matches!((fs::metadata(a), fs::metadata(b)), (Ok(x), Ok(y)) if x.dev() == y.dev())
}

fn check_space(what: &'static str, path: &Path, needed: u64, free: u64) -> Result<(), MergeError> {
    if needed > free {
        return Err(MergeError::NoSpace {
            what,
            path: path.to_path_buf(),
            needed,
            needed_mib: needed.div_ceil(1 << 20),
            free,
            free_mib: free / (1 << 20),
        });
    }
    Ok(())
}

/// Plans a merge of `overlay` into `squashfs` (a bare pair of files, or the files on a
/// mounted or extracted stick). Checks the overlay, the image kind, the tools and the
/// free space; changes nothing.
pub fn plan_merge(req: &MergeRequest) -> Result<MergePlan, MergeError> {
    let mut sq = File::open(&req.squashfs).map_err(io_at(&req.squashfs))?;
    let squashfs_bytes = sq.metadata().map_err(io_at(&req.squashfs))?.len();
    let what = req.squashfs.display().to_string();
    let info = match squash::detect_image_kind(&mut sq, &what)? {
        ImageKind::Squashfs(info) => info,
        ImageKind::Erofs => return Err(MergeError::Erofs(req.squashfs.clone())),
        other => {
            return Err(MergeError::NoRootImage {
                squashfs: req.squashfs.clone(),
                what: format!("{other:?}"),
            });
        }
    };
    squash::require_tool(squash::UNSQUASHFS)?;
    squash::require_tool(squash::MKSQUASHFS)?;
    if req.fsck {
        squash::require_tool(squash::E2FSCK)?;
    }
    let listing = squash::list(&req.squashfs)?;
    let root = ROOT_IMAGES
        .iter()
        .find_map(|name| listing.iter().find(|e| e.is_file && e.path == *name))
        .ok_or_else(|| MergeError::NoRootImage {
            squashfs: req.squashfs.clone(),
            what: if listing
                .iter()
                .any(|e| e.path == "usr" || e.path.starts_with("usr/"))
            {
                "a flat root file system (OverlayFS persistence)".to_string()
            } else {
                format!("{} entries, none of them a root image", listing.len())
            },
        })?;
    let extracted_bytes: u64 = listing.iter().filter(|e| e.is_file).map(|e| e.size).sum();

    let mut ov = File::open(&req.overlay).map_err(io_at(&req.overlay))?;
    let ov_len = snapshot::stream_len(&mut ov).map_err(io_at(&req.overlay))?;
    let opened = snapshot::open_store(&mut ov, ov_len)?;
    let origin_sectors = root.size / snapshot::SECTOR_BYTES;
    let overlay_status =
        snapshot::status_of(&opened, ov_len, LIVEOS_CHUNK_SECTORS, Some(origin_sectors));
    let (exceptions, used_bytes) = match &opened {
        Opened::Uninitialised { .. } => (0, 0),
        Opened::Invalid { .. } => return Err(MergeError::OverlayInvalid),
        Opened::Valid(store) => {
            store
                .validate(Some(origin_sectors))
                .map_err(MergeError::OverlayCorrupt)?;
            let n = store.exceptions.len() as u64;
            (n, n * store.geometry.chunk_bytes())
        }
    };

    let mut args = info.mksquashfs_args();
    let mut notes = Vec::new();
    if let Some(c) = req.compress
        && c != info.compressor
    {
        // Options stored for the old compressor do not apply to another one.
        args = vec![
            "-comp".into(),
            c.name().into(),
            "-b".into(),
            info.block_size.to_string(),
        ];
        notes.push(format!(
            "recompressing with {} instead of {}",
            c.name(),
            info.compressor.name()
        ));
    }
    if info.has_xattrs && !nix::unistd::geteuid().is_root() {
        notes.push(
            "the squashfs carries xattrs at its top level; without root, unsquashfs cannot restore security.* ones (the root image's own SELinux labels are kept: they live inside it)"
                .to_string(),
        );
    }
    // The new image is at most the old one plus the changed data, uncompressed.
    let new_image_estimate = squashfs_bytes.saturating_add(used_bytes);
    let workdir_needed = extracted_bytes.saturating_add(new_image_estimate);
    let target_dir = req
        .squashfs
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let target_dir = if target_dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        target_dir
    };
    let workdir_free = free_bytes(&req.workdir)?;
    let target_free = free_bytes(&target_dir)?;
    let nothing_to_merge = exceptions == 0;
    if !nothing_to_merge {
        if same_fs(&req.workdir, &target_dir) {
            check_space(
                "the extracted image, the new squashfs and its staged copy",
                &req.workdir,
                workdir_needed.saturating_add(new_image_estimate),
                workdir_free,
            )?;
        } else {
            check_space(
                "the extracted image and the new squashfs",
                &req.workdir,
                workdir_needed,
                workdir_free,
            )?;
            check_space(
                "the new squashfs next to the old one",
                &target_dir,
                new_image_estimate,
                target_free,
            )?;
        }
    }
    let steps = vec![
        format!(
            "extract {} ({} bytes) from {} into {}",
            root.path,
            root.size,
            req.squashfs.display(),
            req.workdir.display()
        ),
        format!("apply {exceptions} overlay chunks to it"),
        if req.fsck {
            "e2fsck -f -p the merged image".to_string()
        } else {
            "skip e2fsck (--no-fsck)".to_string()
        },
        format!("mksquashfs {}", args.join(" ")),
        format!("write {}.new, sync", req.squashfs.display()),
        "read it back and compare sha256".to_string(),
        format!("rename it over {}", req.squashfs.display()),
        format!("reset the overlay {}", req.overlay.display()),
    ];
    Ok(MergePlan {
        squashfs: req.squashfs.clone(),
        squashfs_bytes,
        squash: info,
        root_image: root.path.clone(),
        root_image_bytes: root.size,
        overlay: req.overlay.clone(),
        overlay_status,
        exceptions,
        workdir: req.workdir.clone(),
        workdir_needed_bytes: workdir_needed,
        workdir_free_bytes: workdir_free,
        target_dir,
        target_needed_bytes: new_image_estimate,
        target_free_bytes: target_free,
        mksquashfs_args: args,
        fsck: req.fsck,
        nothing_to_merge,
        notes,
        steps,
        failpoint: std::env::var("LIVESTICK_FAILPOINT").ok(),
    })
}

/// What a finished merge did.
#[derive(Debug, Clone, Serialize)]
pub struct MergeReport {
    pub exceptions_applied: u64,
    pub fsck_exit_code: Option<i32>,
    pub old_squashfs_bytes: u64,
    pub new_squashfs_bytes: u64,
    pub new_squashfs_sha256: String,
    pub overlay_reset: bool,
}

fn failpoint(plan: &MergePlan, step: &'static str) -> Result<(), MergeError> {
    if plan.failpoint.as_deref() == Some(step) {
        return Err(MergeError::Failpoint(step));
    }
    Ok(())
}

/// Copies `src` to a new file `dst`, hashing on the way, and syncs it.
fn copy_hashed(
    src: &Path,
    dst: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<String, MergeError> {
    let mut input = File::open(src).map_err(io_at(src))?;
    let total = input.metadata().map_err(io_at(src))?.len();
    let mut out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dst)
        .map_err(io_at(dst))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut done = 0u64;
    loop {
        let n = input.read(&mut buf).map_err(io_at(src))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io_at(dst))?;
        done += n as u64;
        progress("stage", done, total);
    }
    out.sync_all().map_err(io_at(dst))?;
    Ok(hex(&hasher.finalize()))
}

pub fn sha256_file(
    path: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<String, MergeError> {
    let mut f = File::open(path).map_err(io_at(path))?;
    let total = f.metadata().map_err(io_at(path))?.len();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut done = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(io_at(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        progress("verify", done, total);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Runs a plan. `progress(step, done, total)` reports each step's progress.
pub fn execute_merge(
    plan: &MergePlan,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<MergeReport, MergeError> {
    let work = plan
        .workdir
        .join(format!("livestick-merge-{}", std::process::id()));
    let result = run_steps(plan, &work, progress);
    // The work directory holds only copies; it goes whatever happened.
    let _ = fs::remove_dir_all(&work);
    result
}

fn run_steps(
    plan: &MergePlan,
    work: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<MergeReport, MergeError> {
    fs::create_dir_all(work).map_err(io_at(work))?;
    let tree = work.join("tree");
    progress("extract", 0, plan.root_image_bytes);
    squash::extract(&plan.squashfs, &tree)?;
    progress("extract", plan.root_image_bytes, plan.root_image_bytes);
    failpoint(plan, "extract")?;

    let root = tree.join(&plan.root_image);
    let mut origin = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&root)
        .map_err(io_at(&root))?;
    let origin_bytes = origin.metadata().map_err(io_at(&root))?.len();
    let mut ov = File::open(&plan.overlay).map_err(io_at(&plan.overlay))?;
    let ov_len = snapshot::stream_len(&mut ov).map_err(io_at(&plan.overlay))?;
    let applied = match snapshot::open_store(&mut ov, ov_len)? {
        Opened::Valid(store) => {
            snapshot::apply_exceptions(&mut ov, &store, &mut origin, origin_bytes, &mut |d, t| {
                progress("apply", d, t)
            })?
        }
        Opened::Uninitialised { .. } => 0,
        Opened::Invalid { .. } => return Err(MergeError::OverlayInvalid),
    };
    drop(origin);
    failpoint(plan, "apply")?;

    let mut fsck_code = None;
    if plan.fsck {
        let kind = squash::detect_image_kind(
            &mut File::open(&root).map_err(io_at(&root))?,
            &plan.root_image,
        )?;
        if kind == ImageKind::Ext {
            progress("fsck", 0, 1);
            // 1 = errors corrected, 2 = corrected and "reboot" (meaningless for an image).
            match squash::run_tool(
                squash::E2FSCK,
                &["-f".as_ref(), "-p".as_ref(), root.as_os_str()],
                &[1, 2],
            ) {
                Ok((code, _)) => fsck_code = Some(code),
                Err(SquashError::ToolFailed { status, stderr, .. }) => {
                    let code = status
                        .rsplit(' ')
                        .next()
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(-1);
                    return Err(MergeError::FsckFailed {
                        code,
                        output: stderr,
                    });
                }
                Err(e) => return Err(e.into()),
            }
            progress("fsck", 1, 1);
        }
    }
    failpoint(plan, "fsck")?;

    let built = work.join("squashfs.img");
    progress("build", 0, 1);
    squash::build(&tree, &built, &plan.mksquashfs_args)?;
    progress("build", 1, 1);
    // The extracted tree is no longer needed; free its space before staging.
    let _ = fs::remove_dir_all(&tree);
    failpoint(plan, "build")?;

    let staged = staged_path(&plan.squashfs);
    let want = copy_hashed(&built, &staged, progress)?;
    failpoint(plan, "stage")?;

    let got = sha256_file(&staged, progress)?;
    if got != want {
        let _ = fs::remove_file(&staged);
        return Err(MergeError::VerifyMismatch {
            path: staged,
            got,
            want,
        });
    }
    failpoint(plan, "verify")?;

    let new_len = fs::metadata(&staged).map_err(io_at(&staged))?.len();
    fs::rename(&staged, &plan.squashfs).map_err(io_at(&plan.squashfs))?;
    File::open(&plan.target_dir)
        .and_then(|d| d.sync_all())
        .map_err(io_at(&plan.target_dir))?;
    failpoint(plan, "swap")?;

    let mut ov = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&plan.overlay)
        .map_err(io_at(&plan.overlay))?;
    snapshot::reset_store(&mut ov, ov_len)?;
    failpoint(plan, "reset")?;

    Ok(MergeReport {
        exceptions_applied: applied,
        fsck_exit_code: fsck_code,
        old_squashfs_bytes: plan.squashfs_bytes,
        new_squashfs_bytes: new_len,
        new_squashfs_sha256: want,
        overlay_reset: true,
    })
}

/// `squashfs.img` → `squashfs.img.new`, in the same directory (so the rename is atomic).
pub fn staged_path(squashfs: &Path) -> PathBuf {
    let mut name = squashfs
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".new");
    squashfs.with_file_name(name)
}
