//! The prepare stage of a write: what is not copied from the ISO is built
//! here, in a temporary directory: the home image (ext4, LUKS2 streamed on the
//! fly), the OverlayFS overlay image, a new dm-snapshot store, the swap header,
//! and the overlay and home a write carries over from a source stick. What can
//! be refused is checked before `apply` touches the stick; what takes programs
//! is built while `apply` writes the ISO's files. Each comes out as a [`SparseImage`] that
//! names the only regions its format needs written ("persistence is
//! allocated, not written", docs/design.md).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;
use zeroize::Zeroizing;

use crate::apply::{
    self, ApplyError, ApplyOptions, ApplyReport, IsoSource, LaterImages, Pending, Prepared,
    SparseImage,
};
use crate::boot::cmdline::OverlayBoot;
use crate::boot::syslinux::SyslinuxFiles;
use crate::disk::ext4::{self, Ext4Error, Ext4Options};
use crate::disk::stick::{Stick, StickError};
use crate::disk::target::{CreatedImage, TargetError, TargetProbe};
use crate::error::{Classify, ErrorKind};
use crate::layout;
use crate::persist::home::{self, HomeError};
use crate::persist::luks::{LuksParams, PbkdfKind};
use crate::persist::snapshot;
use crate::persist::swap::{self, SwapError};
use crate::plan::{CopySource, HomeEncryption, Plan};
use crate::progress::Progress;

/// What the prepare stage needs beyond the plan: which persistence the user
/// carries over and how a new encrypted home is protected.
pub struct PrepareInputs<'a> {
    /// `--copy-overlay`: carry the source stick's overlay over.
    pub copy_overlay: bool,
    /// `--copy-home`: carry the source stick's home.img over.
    pub copy_home: bool,
    /// Read once for every target of a batch; needed when the plan encrypts a home.
    pub passphrase: Option<&'a Zeroizing<Vec<u8>>>,
    pub luks: LuksParams,
    /// The new filesystems with SYSLINUX in them, shared by the sticks of one command.
    pub boot_fats: &'a apply::BootFatStages,
}

#[derive(Debug, Error)]
pub enum PrepareError {
    #[error("an encrypted home needs a passphrase")]
    NoPassphrase,
    #[error("building home.img")]
    Home {
        #[source]
        source: HomeError,
    },
    #[error("making the OverlayFS overlay")]
    Overlay {
        #[source]
        source: Ext4Error,
    },
    #[error("--swap-size-mb: {0}")]
    SwapSize(SwapError),
    #[error("opening {}", path.display())]
    OpenStick {
        path: PathBuf,
        #[source]
        source: StickError,
    },
    #[error("finding {file} on {}", stick.display())]
    FindFile {
        file: String,
        stick: PathBuf,
        #[source]
        source: StickError,
    },
    #[error("opening {}", path.display())]
    OpenFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading the block bitmaps of {file}")]
    Bitmaps {
        file: String,
        #[source]
        source: Ext4Error,
    },
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl Classify for PrepareError {
    fn kind(&self) -> ErrorKind {
        match self {
            PrepareError::NoPassphrase | PrepareError::SwapSize(_) => ErrorKind::BadInput,
            // What the step wraps decides, as it did when the step was an anyhow context.
            PrepareError::Home { source } => source.kind(),
            PrepareError::Overlay { source } | PrepareError::Bitmaps { source, .. } => {
                source.kind()
            }
            PrepareError::OpenStick { source, .. } | PrepareError::FindFile { source, .. } => {
                source.kind()
            }
            PrepareError::OpenFile { .. } | PrepareError::Io(_) => ErrorKind::Io,
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            PrepareError::Home { source } => source.hint(),
            PrepareError::Overlay { source } | PrepareError::Bitmaps { source, .. } => {
                source.hint()
            }
            PrepareError::OpenStick { source, .. } | PrepareError::FindFile { source, .. } => {
                source.hint()
            }
            _ => self.kind().hint(),
        }
    }
}

/// The LUKS2 parameters of a new home: cryptsetup's defaults, changed where
/// the user gave `--luks-pbkdf`, `--luks-iter-time` or `--luks-pbkdf-memory`.
pub fn luks_params(
    pbkdf: Option<&str>,
    iter_time_ms: Option<u32>,
    memory_kib: Option<u32>,
) -> LuksParams {
    let mut params = LuksParams::default();
    if let Some(kdf) = pbkdf {
        params.pbkdf = if kdf == "pbkdf2" {
            PbkdfKind::Pbkdf2
        } else {
            PbkdfKind::Argon2id
        };
    }
    if let Some(ms) = iter_time_ms {
        params.iter_time_ms = ms;
    }
    if let Some(kib) = memory_kib {
        params.memory_kib = kib;
    }
    params
}

/// What a write needs besides the ISO's files and is made before the stick is
/// touched: everything that can be refused as bad input, and what is cheap (a new
/// dm-snapshot store, the swap header, the overlay and home carried over). The home
/// image and an OverlayFS overlay are left to [`build_images`].
pub fn prepare_now(
    plan: &Plan,
    inputs: &PrepareInputs<'_>,
) -> Result<Prepared<'static>, PrepareError> {
    let mut prepared = Prepared {
        home: None,
        swap: None,
        overlay: None,
        copied: copied_persistence(plan, inputs)?,
        syslinux: None,
        later_images: None,
        boot_fat: None,
    };
    if let Some(home_step) = &plan.home {
        home::check_build_input(home_step.size, &home_encryption(home_step, inputs)?)
            .map_err(|source| PrepareError::Home { source })?;
    }
    if let Some(overlay) = &plan.overlay
        && overlay.kind != OverlayBoot::OverlayFs
    {
        // A new dm-snapshot store is a zeroed header: finding it, the kernel writes
        // the header and zeroes each exception area itself before using it.
        prepared.overlay = Some(SparseImage::zeros(
            overlay.size,
            std::iter::once(snapshot::new_store_range(overlay.size)),
        ));
    }
    if let Some(swap_step) = &plan.swap {
        let header = swap::swap_header(swap_step.size, None, uuid::Uuid::new_v4())
            .map_err(PrepareError::SwapSize)?;
        // The kernel reads only the first page; swapon writes the rest as it pages out.
        let page = header.len() as u64;
        prepared.swap = Some(SparseImage::new(
            Box::new(crate::io::Zeros::with_prefix(header, swap_step.size)),
            swap_step.size,
            std::iter::once(0..page),
        ));
    }
    Ok(prepared)
}

/// How the plan's new home is protected, with the passphrase it needs.
fn home_encryption(
    home_step: &crate::plan::HomeStep,
    inputs: &PrepareInputs<'_>,
) -> Result<home::HomeEncryption, PrepareError> {
    Ok(match home_step.encryption {
        HomeEncryption::None => home::HomeEncryption::None,
        HomeEncryption::Luks => {
            let passphrase = inputs
                .passphrase
                .cloned()
                .ok_or(PrepareError::NoPassphrase)?;
            home::HomeEncryption::Luks {
                passphrase,
                params: inputs.luks.clone(),
            }
        }
    })
}

/// The images that take programs to make (mke2fs; LUKS's key derivation): the home
/// image and an OverlayFS overlay, in `workdir`. Their inputs were checked by
/// [`prepare_now`].
pub fn build_images(
    plan: &Plan,
    inputs: &PrepareInputs<'_>,
    workdir: &Path,
) -> Result<LaterImages, PrepareError> {
    let mut images = LaterImages::default();
    if let Some(home_step) = &plan.home {
        let encryption = home_encryption(home_step, inputs)?;
        let image = home::build_home_image(workdir, home_step.size, encryption)
            .map_err(|source| PrepareError::Home { source })?;
        let regions = image.data_regions();
        images.home = Some(SparseImage::new(Box::new(image), home_step.size, regions));
    }
    if let Some(overlay) = &plan.overlay
        && overlay.kind == OverlayBoot::OverlayFs
    {
        // dracut mounts this file as ext4 and uses overlayfs/ as the upper and
        // ovlwork/ as the work directory.
        let root = workdir.join("overlay-root");
        std::fs::create_dir_all(root.join("overlayfs"))?;
        std::fs::create_dir_all(root.join("ovlwork"))?;
        let path = workdir.join("overlay.img");
        let opts = Ext4Options {
            root_dir: Some(root),
            ..Ext4Options::default()
        };
        ext4::make_ext4_image(&path, overlay.size, "", &opts)
            .map_err(|source| PrepareError::Overlay { source })?;
        let image = File::open(&path)?;
        let regions = crate::disk::sparse::data_regions(&image)?;
        images.overlay = Some(SparseImage::new(Box::new(image), overlay.size, regions));
    }
    Ok(images)
}

/// The overlay and home a write carries over from a source stick, each read in place
/// and written only where its format says it is used: a dm-snapshot store's header,
/// metadata areas and exception chunks; an ext4 file system's in-use blocks. A LUKS
/// home cannot be read without its passphrase and is copied whole.
fn copied_persistence(
    plan: &Plan,
    inputs: &PrepareInputs<'_>,
) -> Result<Vec<(String, SparseImage)>, PrepareError> {
    let mut out = Vec::new();
    // On the ext4 layout the live directory's copies go to partition 2.
    let ext4_copies = plan.ext4_live.iter().flat_map(|e| e.copies.iter());
    for copy in plan.copies.iter().chain(ext4_copies) {
        let CopySource::Iso { path } = &copy.source else {
            continue;
        };
        let name = path.rsplit('/').next().unwrap_or("").to_ascii_lowercase();
        let overlay = inputs.copy_overlay && layout::is_overlay_name(&name);
        let home = inputs.copy_home && name == layout::HOME;
        if !overlay && !home {
            continue;
        }
        let mut stick =
            Stick::open(&plan.source, false).map_err(|source| PrepareError::OpenStick {
                path: plan.source.clone(),
                source,
            })?;
        let extents = stick
            .file_extents(path)
            .map_err(|source| PrepareError::FindFile {
                file: path.clone(),
                stick: plan.source.clone(),
                source,
            })?;
        drop(stick);
        let file = File::open(&plan.source).map_err(|source| PrepareError::OpenFile {
            path: plan.source.clone(),
            source,
        })?;
        let mut content = crate::disk::extent_file::ExtentFile::new(file, &extents);
        let whole = vec![0..copy.size];
        let regions = match home::detect_home_kind(&mut content)? {
            Some(home::HomeKind::Plain) => match extents.as_slice() {
                // dumpe2fs reads the file system by offset: one extent only.
                [(at, _)] => {
                    ext4::used_regions(&plan.source, *at, copy.size).map_err(|source| {
                        PrepareError::Bitmaps {
                            file: path.clone(),
                            source,
                        }
                    })?
                }
                _ => whole,
            },
            Some(home::HomeKind::Luks2) => whole,
            None => match snapshot::open_store(&mut content, copy.size) {
                Ok(snapshot::Opened::Valid(store)) => store.used_regions(),
                Ok(snapshot::Opened::Uninitialised { .. }) => {
                    std::iter::once(snapshot::new_store_range(copy.size)).collect()
                }
                _ => whole,
            },
        };
        out.push((
            copy.dest.clone(),
            SparseImage::new(Box::new(content), copy.size, regions),
        ));
    }
    Ok(out)
}

/// Why one target was not written.
#[derive(Debug, Error)]
pub enum WriteError {
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(
        "writing {} did not complete; the stick is incomplete and will not boot — run the same command again",
        path.display()
    )]
    Incomplete {
        path: PathBuf,
        #[source]
        source: ApplyError,
    },
    /// A write that made a new image file failed; `what` names the file and says
    /// what became of it.
    #[error("writing {what}")]
    NewImage {
        what: String,
        #[source]
        source: ApplyError,
    },
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl Classify for WriteError {
    fn kind(&self) -> ErrorKind {
        match self {
            WriteError::Prepare(e) => e.kind(),
            WriteError::Target(e) => e.kind(),
            WriteError::Incomplete { source, .. } | WriteError::NewImage { source, .. } => {
                source.kind()
            }
            WriteError::Io(_) => ErrorKind::Io,
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            WriteError::Prepare(e) => e.hint(),
            WriteError::Target(e) => e.hint(),
            WriteError::Incomplete { source, .. } | WriteError::NewImage { source, .. } => {
                source.hint()
            }
            WriteError::Io(_) => self.kind().hint(),
        }
    }
}

/// Prepares one target's images and applies its plan: the same steps for a
/// single write, each member of a batch, and `--wait-for`. A new image file
/// the write made is removed when the write fails.
#[allow(clippy::too_many_arguments)]
pub fn write_target(
    plan: &Plan,
    probe: &TargetProbe,
    syslinux: Option<SyslinuxFiles>,
    inputs: &PrepareInputs<'_>,
    options: &ApplyOptions,
    workdir: &Path,
    source: &mut dyn IsoSource,
    progress: &Progress,
) -> Result<ApplyReport, WriteError> {
    std::fs::create_dir_all(workdir)?;
    let now = prepare_now(plan, inputs)?;
    let created = CreatedImage::create(probe)?;
    let probe = match &created {
        // apply opens what is now an existing file, the one made just above.
        Some(image) => &image.probe(probe),
        None => probe,
    };
    // The new FAT with SYSLINUX in it and the home image are made while the ISO's
    // files are written: under an emulated CPU each program they run costs a
    // fraction of a second, and the stick can take data meanwhile.
    let staged_files = syslinux.clone();
    let result = std::thread::scope(|scope| {
        let mut prepared: Prepared<'_> = now;
        let staging = match &staged_files {
            Some(files) if plan.format.is_some() && plan.bios => {
                Some(scope.spawn(|| inputs.boot_fats.stage(plan, files, workdir)))
            }
            _ => None,
        };
        let images = scope.spawn(|| build_images(plan, inputs, workdir));
        prepared.later_images = Some(Pending::later(move || {
            joined(images).map_err(|e| ApplyError::Preparing {
                what: "making the persistence images".into(),
                source: Box::new(e),
            })
        }));
        prepared.boot_fat = staging.map(|staging| {
            Pending::later(move || {
                joined(staging)?.ok_or_else(|| {
                    ApplyError::StagedElsewhere("the new filesystem was not staged".into())
                })
            })
        });
        prepared.syslinux = syslinux;
        apply::apply(plan, probe, source, prepared, options, progress)
    });
    match (result, created) {
        (Ok(report), _) => Ok(report),
        (Err(e), Some(image)) => Err(remove_new_image(image, e)),
        (Err(source), None) => Err(WriteError::Incomplete {
            path: probe.path.clone(),
            source,
        }),
    }
}

/// What a thread of [`write_target`] made; its panic goes on here.
fn joined<T>(handle: std::thread::ScopedJoinHandle<'_, T>) -> T {
    match handle.join() {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// A new image that a failed write leaves is incomplete and boots nothing,
/// and often sits on the file system that just ran full: it is removed.
fn remove_new_image(image: CreatedImage, source: ApplyError) -> WriteError {
    let path = image.path().display().to_string();
    let outcome = match image.remove() {
        Ok(true) => format!(
            "the new image file {path} was removed; fix the cause and run the same command again"
        ),
        Ok(false) => {
            format!("{path} is no longer the file this write created, so it was left alone")
        }
        Err(r) => format!(
            "the new image file {path} is incomplete and could not be removed ({r}); delete it, fix the cause and run the same command again"
        ),
    };
    WriteError::NewImage {
        what: format!("{path} did not complete; {outcome}"),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luks_options_change_only_what_they_name() {
        let defaults = LuksParams::default();
        assert_eq!(luks_params(None, None, None), defaults);
        let p = luks_params(Some("pbkdf2"), Some(500), None);
        assert_eq!(p.pbkdf, PbkdfKind::Pbkdf2);
        assert_eq!(p.iter_time_ms, 500);
        assert_eq!(p.memory_kib, defaults.memory_kib);
        let p = luks_params(Some("argon2id"), None, Some(65536));
        assert_eq!(p.pbkdf, PbkdfKind::Argon2id);
        assert_eq!(p.memory_kib, 65536);
    }

    #[test]
    fn a_step_keeps_the_exit_code_of_what_it_wraps() {
        // A swap too small to hold its own header page.
        let swap_error = swap::swap_header(1, None, uuid::Uuid::nil()).expect_err("1 byte");
        let message = format!("--swap-size-mb: {swap_error}");
        let bad_size = PrepareError::SwapSize(swap_error);
        assert_eq!(bad_size.kind(), ErrorKind::BadInput);
        assert_eq!(PrepareError::NoPassphrase.kind(), ErrorKind::BadInput);
        let io = PrepareError::Io(io::Error::other("disk full"));
        assert_eq!(io.kind(), ErrorKind::Io);
        let wrapped = WriteError::Prepare(bad_size);
        assert_eq!(wrapped.kind(), ErrorKind::BadInput);
        assert_eq!(wrapped.to_string(), message);
    }
}
