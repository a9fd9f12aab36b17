//! EROFS without root: extract, apply and mkfs.erofs run in one child process under
//! `fakeroot` (`livestick internal-fakeroot-step JOB`), which records owners, device
//! nodes and security xattrs for mkfs.erofs without privileges.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use super::error::{OvlError, io_at};
use super::tree::{Applied, ApplyReport, apply_host_tree};
use super::upper::UpperTree;
use crate::persist::erofs;
use crate::persist::merge::error::MergeError;
use crate::persist::merge::plan::{Layout, MergePlan, OvlPlan, failpoints};
use crate::tools::{FAKEROOT, find_program};

/// The EROFS steps a non-root merge hands to a child under fakeroot (`livestick
/// internal-fakeroot-step JOB`): in that process the faked uid 0 lets extraction,
/// chown, mknod and security xattrs succeed, and mkfs.erofs, its child, sees them.
/// The parent has read the upper dir already (contents staged in its work dir).
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct FakerootJob {
    pub upper: UpperTree,
    pub erofs: PathBuf,
    pub work: PathBuf,
    pub built: PathBuf,
    pub mkfs_args: Vec<String>,
    /// Where the child writes its [`ApplyReport`] (JSON).
    pub report: PathBuf,
}

/// Runs a [`FakerootJob`] (the child side).
pub fn run_fakeroot_job(job: &Path) -> Result<(), OvlError> {
    let text = fs::read(job).map_err(io_at(job))?;
    let job: FakerootJob = serde_json::from_slice(&text).map_err(|e| OvlError::Host {
        path: job.to_path_buf(),
        what: format!("not a fakeroot job: {e}"),
    })?;
    let tree = job.work.join("tree");
    erofs::unpack(&job.erofs, &tree)?;
    let rep = apply_host_tree(&tree, &job.upper, &mut |_, _| {})?;
    erofs::build(&tree, &job.built, &job.mkfs_args)?;
    let out = serde_json::to_vec(&rep).map_err(|e| OvlError::Host {
        path: job.report.clone(),
        what: e.to_string(),
    })?;
    Ok(fs::write(&job.report, out).map_err(io_at(&job.report))?)
}

/// EROFS without root: the tree steps in a child under fakeroot.
pub(super) fn fakeroot_steps(
    plan: &MergePlan,
    ovl: &OvlPlan,
    work: &Path,
    upper: &UpperTree,
    built: &Path,
    progress: &mut dyn FnMut(&str, u64, u64),
) -> Result<Applied, MergeError> {
    let Layout::Erofs { mkfs_args, .. } = &ovl.layout else {
        return Err(OvlError::Host {
            path: work.to_path_buf(),
            what: "fakeroot steps are for EROFS roots only".into(),
        }
        .into());
    };
    let (src, copied) = plan
        .squashfs_at
        .whole_file_or_copy(work, "erofs-source.img")?;
    let job = FakerootJob {
        upper: upper.clone(),
        erofs: src.clone(),
        work: work.join("fakeroot"),
        built: built.to_path_buf(),
        mkfs_args: mkfs_args.clone(),
        report: work.join("fakeroot-report.json"),
    };
    fs::create_dir_all(&job.work).map_err(io_at(&job.work))?;
    let job_file = work.join("fakeroot-job.json");
    let text = serde_json::to_vec(&job).map_err(|e| OvlError::Host {
        path: job_file.clone(),
        what: e.to_string(),
    })?;
    fs::write(&job_file, text).map_err(io_at(&job_file))?;
    progress("extract", 0, plan.root_image_bytes);
    let me = std::env::current_exe().map_err(io_at(Path::new("/proc/self/exe")))?;
    let out = Command::new(find_program(&FAKEROOT)?)
        .arg("--")
        .arg(&me)
        .arg("internal-fakeroot-step")
        .arg(&job_file)
        .output()
        .map_err(io_at(&me));
    if copied {
        let _ = fs::remove_file(&src);
    }
    let _ = fs::remove_dir_all(&job.work);
    let out = out?;
    if !out.status.success() {
        return Err(OvlError::Fakeroot {
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }
        .into());
    }
    let report = fs::read(&job.report).map_err(io_at(&job.report))?;
    let applied: ApplyReport = serde_json::from_slice(&report).map_err(|e| OvlError::Host {
        path: job.report.clone(),
        what: e.to_string(),
    })?;
    progress("extract", plan.root_image_bytes, plan.root_image_bytes);
    failpoints(plan, &["extract", "apply", "fsck"])?;
    Ok((applied, built.to_path_buf(), None))
}
