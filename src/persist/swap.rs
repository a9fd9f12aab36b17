//! `LiveOS/swap.img`: a Linux swap area with the version-1 signature that
//! `mkswap` writes, produced without running mkswap so it can be streamed
//! straight into a file on the stick's FAT filesystem.
//!
//! The first page holds, after 1024 bytes of boot-sector space, the header
//! (`version`, `last_page`, `nr_badpages`, UUID, label) and ends with the
//! magic `SWAPSPACE2` in its last 10 bytes. Pages are 4096 bytes: the page
//! size of x86-64 and of Fedora's aarch64 kernels; the kernel only accepts
//! the signature at `PAGE_SIZE - 10`. Integers are little-endian, the byte
//! order of those architectures (the kernel reads them in native order).
//! The rest of the file must be allocated (no holes, or `swapon` refuses
//! it), so every byte is written.

use std::io::{self, Seek, SeekFrom, Write};

use crate::bytes::{put_u32, u32_at};

/// Page size of the swap area.
pub const SWAP_PAGE_SIZE: u64 = 4096;
/// mkswap's minimum: 10 pages.
pub const MIN_SWAP_SIZE: u64 = 10 * SWAP_PAGE_SIZE;
const MAGIC: &[u8; 10] = b"SWAPSPACE2";
const VERSION_OFFSET: usize = 1024;
const LAST_PAGE_OFFSET: usize = 1028;
const NR_BADPAGES_OFFSET: usize = 1032;
const UUID_OFFSET: usize = 1036;
const LABEL_OFFSET: usize = 1052;
const LABEL_LEN: usize = 16;

/// Errors from writing or reading a swap signature.
#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error(
        "swap size {size} bytes is invalid: it must be a multiple of {page} bytes and at least {min} bytes ({min_kib} KiB)",
        page = SWAP_PAGE_SIZE, min = MIN_SWAP_SIZE, min_kib = MIN_SWAP_SIZE / 1024
    )]
    BadSize { size: u64 },
    #[error(
        "swap size {mib} MiB is too large: a file on FAT holds at most {max} MiB (4 GiB − 1 byte); choose {max} or less",
        max = FAT_MAX_FILE_MIB
    )]
    TooLarge { mib: u64 },
    #[error("swap size 0 MiB: give --swap-size-mb a positive number of MiB")]
    Zero,
    #[error("swap label {0:?} is longer than 16 bytes; choose a shorter label")]
    LabelTooLong(String),
    #[error("not a swap area: {0}")]
    NotSwap(String),
    #[error("I/O error writing the swap image: {0}")]
    Io(#[from] io::Error),
}

impl crate::error::Classify for SwapError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            // A size or label the user chose, or a file they named that holds no
            // swap area: theirs to fix, and nothing was written.
            SwapError::BadSize { .. }
            | SwapError::TooLarge { .. }
            | SwapError::Zero
            | SwapError::LabelTooLong(_)
            | SwapError::NotSwap(_) => ErrorKind::BadInput,
            // Writing the area failed half-way: the device's fault, try again.
            SwapError::Io(_) => ErrorKind::Io,
        }
    }
}

/// The largest file FAT32 holds is 4 GiB − 1 byte; whole MiB below that.
pub const FAT_MAX_FILE_MIB: u64 = 4095;

/// Check `--swap-size-mb` and return the size in bytes.
pub fn swap_size_from_mib(mib: u64) -> Result<u64, SwapError> {
    match mib {
        0 => Err(SwapError::Zero),
        m if m > FAT_MAX_FILE_MIB => Err(SwapError::TooLarge { mib: m }),
        m => Ok(m * 1024 * 1024),
    }
}

/// The identity of a swap area, as `swaplabel` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwapInfo {
    /// Usable pages after the header page (`last_page`).
    pub last_page: u32,
    pub uuid: uuid::Uuid,
    pub label: String,
}

/// The first page of a swap area of `size` bytes.
pub fn swap_header(size: u64, label: Option<&str>, uuid: uuid::Uuid) -> Result<Vec<u8>, SwapError> {
    if !size.is_multiple_of(SWAP_PAGE_SIZE) || size < MIN_SWAP_SIZE {
        return Err(SwapError::BadSize { size });
    }
    let last_page =
        u32::try_from(size / SWAP_PAGE_SIZE - 1).map_err(|_| SwapError::BadSize { size })?;
    let label = label.unwrap_or("");
    if label.len() > LABEL_LEN {
        return Err(SwapError::LabelTooLong(label.to_string()));
    }
    let mut page = vec![0u8; SWAP_PAGE_SIZE as usize];
    put_u32(&mut page, VERSION_OFFSET, 1);
    put_u32(&mut page, LAST_PAGE_OFFSET, last_page);
    put_u32(&mut page, NR_BADPAGES_OFFSET, 0);
    page[UUID_OFFSET..UUID_OFFSET + 16].copy_from_slice(uuid.as_bytes());
    page[LABEL_OFFSET..LABEL_OFFSET + label.len()].copy_from_slice(label.as_bytes());
    let magic_at = SWAP_PAGE_SIZE as usize - MAGIC.len();
    page[magic_at..].copy_from_slice(MAGIC);
    Ok(page)
}

/// Write a complete swap area of exactly `size` bytes to `w` from offset 0:
/// zeros first, the signature page last (so an interrupted write is not a
/// valid swap area). `uuid` is random when `None`.
pub fn write_swap_image<W: Write + Seek>(
    w: &mut W,
    size: u64,
    label: Option<&str>,
    uuid: Option<uuid::Uuid>,
) -> Result<SwapInfo, SwapError> {
    let uuid = uuid.unwrap_or_else(uuid::Uuid::new_v4);
    let header = swap_header(size, label, uuid)?;
    let zeros = vec![0u8; 1024 * 1024];
    w.seek(SeekFrom::Start(SWAP_PAGE_SIZE))?;
    let mut left = size - SWAP_PAGE_SIZE;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        w.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    w.flush()?;
    w.seek(SeekFrom::Start(0))?;
    w.write_all(&header)?;
    w.flush()?;
    read_swap_header(&header)
}

/// Parse a swap signature page (what `swaplabel` prints).
pub fn read_swap_header(page: &[u8]) -> Result<SwapInfo, SwapError> {
    let ps = SWAP_PAGE_SIZE as usize;
    if page.len() < ps {
        return Err(SwapError::NotSwap(format!(
            "{} bytes is less than one {ps}-byte page",
            page.len()
        )));
    }
    if &page[ps - MAGIC.len()..ps] != MAGIC {
        return Err(SwapError::NotSwap(
            "no SWAPSPACE2 signature at the end of the first 4096-byte page".into(),
        ));
    }
    let version = u32_at(page, VERSION_OFFSET);
    if version != 1 {
        return Err(SwapError::NotSwap(format!(
            "swap header version {version}, expected 1"
        )));
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&page[UUID_OFFSET..UUID_OFFSET + 16]);
    let raw = &page[LABEL_OFFSET..LABEL_OFFSET + LABEL_LEN];
    let end = raw.iter().position(|&b| b == 0).unwrap_or(LABEL_LEN);
    Ok(SwapInfo {
        last_page: u32_at(page, LAST_PAGE_OFFSET),
        uuid: uuid::Uuid::from_bytes(uuid),
        label: String::from_utf8_lossy(&raw[..end]).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn header_fields_round_trip() {
        let u = uuid::Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        let mut c = Cursor::new(Vec::new());
        let info = write_swap_image(&mut c, 1 << 20, Some("MYSWAP"), Some(u)).unwrap();
        assert_eq!(c.get_ref().len(), 1 << 20);
        assert_eq!(info.last_page, 255);
        assert_eq!(info.label, "MYSWAP");
        assert_eq!(read_swap_header(c.get_ref()).unwrap(), info);
        // Everything past the header page is zero.
        assert!(c.get_ref()[4096..].iter().all(|&b| b == 0));
    }

    #[test]
    fn bad_inputs() {
        let u = uuid::Uuid::nil();
        assert!(matches!(
            swap_header(4096 * 9, None, u),
            Err(SwapError::BadSize { .. })
        ));
        assert!(matches!(
            swap_header(4096 * 10 + 1, None, u),
            Err(SwapError::BadSize { .. })
        ));
        assert!(matches!(
            swap_header(1 << 20, Some("seventeen_chars__"), u),
            Err(SwapError::LabelTooLong(_))
        ));
        assert!(matches!(
            read_swap_header(&[0u8; 4096]),
            Err(SwapError::NotSwap(_))
        ));
    }

    #[test]
    fn a_size_or_label_is_bad_input_and_a_failed_write_is_io() {
        use crate::error::{Classify, ErrorKind};
        let u = uuid::Uuid::nil();
        let bad_input = [
            swap_size_from_mib(0).unwrap_err(),
            swap_size_from_mib(FAT_MAX_FILE_MIB + 1).unwrap_err(),
            swap_header(4096 * 9, None, u).unwrap_err(),
            swap_header(1 << 20, Some("seventeen_chars__"), u).unwrap_err(),
            read_swap_header(&[0u8; 4096]).unwrap_err(),
        ];
        for e in bad_input {
            assert_eq!(e.kind(), ErrorKind::BadInput, "{e}");
        }
        // A device that takes nothing: the write fails during the work.
        let mut full = [0u8; 4096];
        let mut w = Cursor::new(&mut full[..]);
        let e = write_swap_image(&mut w, 1 << 20, None, None).unwrap_err();
        assert!(matches!(e, SwapError::Io(_)), "{e}");
        assert_eq!(e.kind(), ErrorKind::Io);
    }
}
