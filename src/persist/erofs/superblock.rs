//! The EROFS superblock: the format facts both the tool driver ([`super`]) and the
//! xattr reader ([`super::xattr`]) need, and the error type they share. Imports nothing
//! of the EROFS modules, so they only import downward.

use std::io::{self, Read, Seek, SeekFrom};

use serde::Serialize;
use thiserror::Error;

use crate::squash::SquashError;
use crate::tools::ToolMissing;

pub(crate) use crate::squash::EROFS_MAGIC;
pub(crate) const SB_OFFSET: u64 = 1024;
/// feature_incompat: per-image compression configurations (then the algorithm
/// field is a bitmap of the algorithms used).
const INCOMPAT_COMPR_CFGS: u32 = 0x0002;
/// feature_incompat: LZ4 0-padding, set by every compressing mkfs.erofs.
const INCOMPAT_ZERO_PADDING: u32 = 0x0001;
/// Bit i of `available_compr_algs` → algorithm name, in on-disk order.
const ALGORITHMS: [&str; 4] = ["lz4", "lzma", "deflate", "zstd"];

#[derive(Debug, Error)]
pub enum ErofsError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{0} is not an EROFS image (no magic at offset 1024)")]
    NotErofs(String),
    #[error(transparent)]
    ToolMissing(#[from] ToolMissing),
    #[error(transparent)]
    Tool(#[from] SquashError),
    #[error(
        "the image is compressed with {algorithm}, which the installed fsck.erofs (erofs-utils {version}) cannot decompress (it supports: {supported}); install an erofs-utils built with {algorithm} support (erofs-utils 1.6 or later with liblzma, as Fedora ships it). Nothing was changed"
    )]
    CannotDecompress {
        algorithm: String,
        version: String,
        supported: String,
    },
    #[error("{what}: cannot read its EROFS metadata: {detail}")]
    Format { what: String, detail: String },
    #[error(
        "the installed fsck.erofs (erofs-utils {version}) does not restore extended attributes when it extracts, so a rebuilt image would lose every SELinux label and file capability; install an erofs-utils whose fsck.erofs --extract keeps xattrs, or pass --allow-xattr-loss for an image without them"
    )]
    NoXattrExtract { version: String },
}

impl crate::error::Classify for ErofsError {
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::Io
    }
}

/// EROFS code names I/O errors through the crate's one helper.
pub(crate) use crate::io::io_at as io_err;

impl From<crate::io::IoAt> for ErofsError {
    fn from(crate::io::IoAt { path, source }: crate::io::IoAt) -> Self {
        ErofsError::Io {
            what: path.display().to_string(),
            source,
        }
    }
}

/// What the superblock says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErofsInfo {
    #[serde(rename = "block_bytes")]
    pub block_size: u32,
    /// Algorithms the image uses (`lz4`, `lzma`, …); empty when nothing is compressed.
    pub algorithms: Vec<&'static str>,
    pub uuid: String,
    pub volume_name: String,
    pub blocks: u64,
}

/// Little-endian fields through the crate's one helper.
pub(crate) use crate::bytes::{u16_at, u32_at, u64_at};

/// Reads the EROFS superblock (128 bytes at offset 1024).
pub fn read_superblock<R: Read + Seek>(r: &mut R, what: &str) -> Result<ErofsInfo, ErofsError> {
    let io = |source| ErofsError::Io {
        what: what.to_string(),
        source,
    };
    let mut sb = [0u8; 128];
    r.seek(SeekFrom::Start(SB_OFFSET)).map_err(io)?;
    r.read_exact(&mut sb)
        .map_err(|_| ErofsError::NotErofs(what.to_string()))?;
    if u32_at(&sb, 0) != EROFS_MAGIC {
        return Err(ErofsError::NotErofs(what.to_string()));
    }
    let blkszbits = sb[12];
    let incompat = u32_at(&sb, 80);
    let algs_field = u16_at(&sb, 84);
    let algorithms = if incompat & INCOMPAT_COMPR_CFGS != 0 {
        ALGORITHMS
            .iter()
            .enumerate()
            .filter(|(i, _)| algs_field & (1 << i) != 0)
            .map(|(_, n)| *n)
            .collect()
    } else if incompat & INCOMPAT_ZERO_PADDING != 0 {
        // Without per-image configurations the only compressor is LZ4 (the field
        // then holds its max distance, not a bitmap).
        vec!["lz4"]
    } else {
        Vec::new()
    };
    let uuid: String = sb[48..64].iter().map(|b| format!("{b:02x}")).collect();
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        &uuid[0..8],
        &uuid[8..12],
        &uuid[12..16],
        &uuid[16..20],
        &uuid[20..32]
    );
    let name_end = sb[64..80].iter().position(|&b| b == 0).unwrap_or(16);
    Ok(ErofsInfo {
        block_size: 1u32.checked_shl(u32::from(blkszbits)).unwrap_or(4096),
        algorithms,
        uuid,
        volume_name: String::from_utf8_lossy(&sb[64..64 + name_end]).into_owned(),
        blocks: u64::from(u32_at(&sb, 36)),
    })
}
