//! Little-endian integers at byte offsets of on-disk structures: the one home
//! for what every format module (FAT, MBR/GPT, ISO 9660, squashfs, dm-snapshot,
//! swap, …) used to spell out with its own `from_le_bytes` helper.
//!
//! A leaf: imports nothing from the crate.
//!
//! Readers never panic: a field that does not fit in the slice (a short read
//! of a damaged or truncated image) reads as zero, the value an absent
//! structure has, so parsers decide what a zero means instead of crashing on
//! input a user handed them. Writers fill buffers livestick sized itself, so a
//! field out of range there is a bug and panics.

use std::io::{self, Read};

fn field<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    at.checked_add(N)
        .and_then(|end| b.get(at..end))
        .and_then(|s| s.try_into().ok())
        .unwrap_or([0; N])
}

/// The u16 stored little-endian at `b[at..at + 2]`; zero if it does not fit.
pub fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(field(b, at))
}

/// The u32 stored little-endian at `b[at..at + 4]`; zero if it does not fit.
pub fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(field(b, at))
}

/// The u64 stored little-endian at `b[at..at + 8]`; zero if it does not fit.
pub fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(field(b, at))
}

/// Stores `v` little-endian at `b[at..at + 2]`.
pub fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

/// Stores `v` little-endian at `b[at..at + 4]`.
pub fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Stores `v` little-endian at `b[at..at + 8]`.
pub fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Reads one little-endian u32 from a stream (a FAT entry, a header word).
pub fn read_u32<R: Read + ?Sized>(r: &mut R) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_little_endian_at_an_offset() {
        let b = [
            0xff, 0x34, 0x12, 0x78, 0x56, 0x34, 0x12, 0xf0, 0xde, 0xbc, 0x9a,
        ];
        assert_eq!(u16_at(&b, 1), 0x1234);
        assert_eq!(u32_at(&b, 3), 0x1234_5678);
        assert_eq!(u64_at(&b, 3), 0x9abc_def0_1234_5678);
    }

    #[test]
    fn a_field_past_the_end_reads_as_zero() {
        let b = [1u8, 2, 3];
        assert_eq!(u16_at(&b, 1), 0x0302);
        assert_eq!(u16_at(&b, 2), 0);
        assert_eq!(u32_at(&b, 0), 0);
        assert_eq!(u64_at(&b, usize::MAX - 2), 0);
        assert_eq!(u32_at(&[], 0), 0);
    }

    #[test]
    fn writes_read_back() {
        let mut b = [0u8; 16];
        put_u16(&mut b, 0, 0xbeef);
        put_u32(&mut b, 2, 0xdead_beef);
        put_u64(&mut b, 6, u64::MAX - 1);
        assert_eq!(b[..2], [0xef, 0xbe]);
        assert_eq!(u16_at(&b, 0), 0xbeef);
        assert_eq!(u32_at(&b, 2), 0xdead_beef);
        assert_eq!(u64_at(&b, 6), u64::MAX - 1);
        assert_eq!(b[14..], [0, 0]);
    }

    #[test]
    fn reads_from_a_stream() {
        let mut r: &[u8] = &[0x78, 0x56, 0x34, 0x12, 0xaa];
        assert_eq!(read_u32(&mut r).unwrap(), 0x1234_5678);
        assert!(read_u32(&mut r).is_err());
    }
}
