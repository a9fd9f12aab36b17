//! What a merge plan is computed from: everything [`super::inspect`] read (where the
//! files are, the image's layout and sizes, the overlay, free space, tools found,
//! compression), as plain data. [`super::plan::plan`] turns it into a plan or a
//! refusal without touching the system, so plans are unit-tested from hand-made facts.
//!
//! Inspection reads in the order planning checks, and stops reading once a fact
//! already decides a refusal (an image that is neither squashfs nor EROFS, a missing
//! tool, no root image for a dm-snapshot overlay, an EROFS compression fsck.erofs
//! cannot decompress): the facts after that point are `None`, and the plan refuses
//! before it would need them. So a refusal and a read error meet in the same order as
//! when planning read for itself.

use std::collections::BTreeSet;
use std::io;
use std::path::PathBuf;

use super::located::{Ext4Place, Located, StickPlace};
use crate::disk::ext4::Ext4Info;
use crate::persist::erofs::ErofsInfo;
use crate::persist::snapshot::{Opened, StatusReport};
use crate::squash::SquashInfo;
use crate::tools::{self, Tool, ToolMissing};

/// Everything a merge plan is computed from.
#[derive(Debug)]
pub struct MergeFacts {
    pub place: Place,
    pub workdir: PathBuf,
    /// The work dir and the directory of the old image are one file system (then a
    /// pair of plain files needs room for both there).
    pub workdir_shares_target_fs: bool,
    /// Free bytes in the work dir, or why they could not be read; `None` when
    /// inspection stopped at a refusal before reading them.
    pub workdir_free: Option<io::Result<u64>>,
    pub is_root: bool,
    pub tools: ToolsFound,
    /// `LIVESTICK_FAILPOINT`: stop after this step (crash tests).
    pub failpoint: Option<String>,
    pub overlay: OverlayFacts,
}

/// Where the files of a merge are.
#[derive(Debug, Clone)]
pub struct Place {
    /// What to call the image in messages (a path, or `STICK:/LiveOS/squashfs.img`).
    pub squashfs: PathBuf,
    pub squashfs_at: Located,
    pub overlay: PathBuf,
    /// The overlay's bytes (for a directory overlay, its ext4 copy made for planning).
    pub overlay_at: Located,
    /// Set for a merge on a stick.
    pub stick: Option<StickPlace>,
    /// Where the new image goes next to the old one.
    pub target_dir: PathBuf,
    pub target_free: u64,
    /// A directory overlay (on an ext4 stick), read through an ext4 copy.
    pub overlay_dir: Option<PathBuf>,
    /// Set for a merge on a stick's ext4 live partition.
    pub ext4: Option<Ext4Place>,
}

/// The programs found on this system, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ToolsFound(pub BTreeSet<&'static str>);

impl ToolsFound {
    /// Every program a merge may run; inspection probes them all.
    pub const CANDIDATES: [Tool; 9] = [
        tools::DEBUGFS,
        tools::UNSQUASHFS,
        tools::MKSQUASHFS,
        tools::E2FSCK,
        tools::SQFS2TAR,
        tools::TAR2SQFS,
        tools::FSCK_EROFS,
        tools::MKFS_EROFS,
        tools::FAKEROOT,
    ];

    /// All of [`Self::CANDIDATES`] (for tests).
    pub fn all() -> ToolsFound {
        ToolsFound(Self::CANDIDATES.iter().map(|t| t.name).collect())
    }

    pub fn has(&self, tool: &Tool) -> bool {
        self.0.contains(tool.name)
    }

    /// Ok when `tool` was found, else the error naming its packages.
    pub fn require(&self, tool: &Tool) -> Result<(), ToolMissing> {
        if self.has(tool) {
            Ok(())
        } else {
            Err(tool.missing())
        }
    }

    /// Ok when every tool was found, else the first missing one.
    pub fn require_all(&self, tools: &[&Tool]) -> Result<(), ToolMissing> {
        tools.iter().try_for_each(|t| self.require(t))
    }
}

/// The overlay, by kind.
#[derive(Debug)]
pub enum OverlayFacts {
    /// A dm-snapshot store (`overlay-LABEL-UUID`, the classic persistence).
    Snapshot(Box<SnapshotFacts>),
    /// An ext4 file system with `overlayfs/` and `ovlwork/` (`rd.live.overlay.overlayfs`).
    OverlayFs(Box<OvlFacts>),
}

/// What `squashfs.img` holds.
#[derive(Debug, Clone)]
pub enum ImageFacts {
    Squashfs {
        info: SquashInfo,
        /// `None` when unsquashfs or mksquashfs (or e2fsck, for a dm-snapshot merge
        /// with fsck) is missing: the plan refuses first.
        listing: Option<Listing>,
    },
    /// An EROFS root; `None` for a dm-snapshot overlay (refused) or when an erofs-utils
    /// tool (or fakeroot, without root) is missing.
    Erofs(Option<ErofsFacts>),
    /// Neither: what it looks like (`Ext`, `Unknown`).
    Other(String),
}

/// What `unsquashfs -lls` said, summed up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// Entries of every kind.
    pub entries: u64,
    /// Bytes of regular files: what extracting everything takes.
    pub file_bytes: u64,
    /// The nested root image (`LiveOS/rootfs.img`, `LiveOS/ext3fs.img`), if any.
    pub root_image: Option<RootImage>,
    /// A `usr` entry: the image is a flat root tree.
    pub has_usr: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootImage {
    pub path: String,
    pub bytes: u64,
}

/// What the EROFS image and the installed erofs-utils say.
#[derive(Debug, Clone)]
pub struct ErofsFacts {
    pub info: ErofsInfo,
    /// Algorithms the installed fsck.erofs decompresses.
    pub fsck_algorithms: Vec<String>,
    /// `fsck.erofs -V`, for messages.
    pub fsck_version: String,
    /// The rest is read only when fsck.erofs can extract the image.
    pub details: Option<ErofsDetails>,
}

#[derive(Debug, Clone)]
pub struct ErofsDetails {
    /// Compressors the installed mkfs.erofs offers.
    pub mkfs_compressors: Vec<String>,
    /// livestick's own xattr reader: the number of paths with xattrs, or why it
    /// could not read them.
    pub xattr_paths: Result<usize, String>,
    /// Whether `fsck.erofs --extract` keeps xattrs; probed only when livestick's
    /// reader failed.
    pub extract_keeps_xattrs: Option<bool>,
}

/// A dm-snapshot overlay and the image it sits on.
#[derive(Debug)]
pub struct SnapshotFacts {
    pub image: ImageFacts,
    pub overlay_bytes: u64,
    /// The store, read once the root image (its origin) is known.
    pub store: Option<Opened>,
}

/// An OverlayFS overlay and the image it sits on.
#[derive(Debug, Clone)]
pub struct OvlFacts {
    pub overlay_bytes: u64,
    pub overlay_info: Option<Ext4Info>,
    /// `None` when debugfs is missing (then nothing else was read).
    pub upper: Option<UpperFacts>,
    pub image: Option<ImageFacts>,
}

/// The upper directory, counted.
#[derive(Debug, Clone)]
pub struct UpperFacts {
    pub entries: u64,
    /// Bytes of regular-file contents (hard links once).
    pub file_bytes: u64,
    /// The overlay as `overlay status` reports it.
    pub status: StatusReport,
    /// A flat squashfs: lower file bytes the upper dir replaces or hides (what the
    /// hard-link stash may hold); `None` for other layouts or when sqfs2tar/tar2sqfs
    /// is missing.
    pub stash_bytes: Option<u64>,
}
