//! Where stale signatures live in a region, and zeroing them.
//!
//! livestick allocates persistence files (overlay, home.img, swap.img) and the
//! FAT partition without writing their bytes, so whatever the stick held before
//! is still there. libblkid (`blkid`, udev, dracut) probes such a region and may
//! find a stale signature that outranks the real content, e.g. an md 0.90
//! superblock where a new partition ends makes it probe as `linux_raid_member`.
//! [`signature_spots`] lists the byte ranges whose zeroing leaves libblkid
//! nothing to find; [`wipe_signatures`] zeroes them.
//!
//! The list was derived by reading libblkid's probers (util-linux
//! `libblkid/src/superblocks/*.c`, `libblkid/src/partitions/*.c`). Every
//! prober reads at an offset fixed from the start of the region, fixed from its
//! end, or reached through a pointer read at one of those (which is harmless
//! once the place holding the pointer is zeroed). So the spots are:
//!
//! * **The head, `[0, 1 MiB)`**, zeroed whole. It holds nearly every
//!   signature: partition tables (MBR/DOS, GPT primary header at LBA 1 for
//!   512- and 4096-byte sectors, Mac, BSD, Sun, SGI, Atari, AIX, Solaris,
//!   UnixWare, DASD), md 1.1 (0) and 1.2 (4 KiB), LUKS1/LUKS2 primary header
//!   (0) and the LUKS2 secondary header at 16, 32, 64, 128, 256 and 512 KiB,
//!   ext2/3/4 (1 KiB), xfs and its external log (first 256 KiB), btrfs primary
//!   superblock (64 KiB), swap and swsuspend (the last bytes of the first page,
//!   for pages of 4 to 64 KiB), iso9660 and the UDF volume recognition
//!   sequence (32 KiB onwards), UDF anchors at sector 256/512 for blocks up to
//!   1 KiB, LVM1/LVM2 (sectors 0-3), bcache (4 KiB), squashfs, cramfs, romfs,
//!   erofs, f2fs (1 and 5 KiB), nilfs2 primary, reiserfs (8/64 KiB), jfs,
//!   hfs/hfs+, ntfs, exfat, vfat, ufs (0/8/64/256 KiB), zfs labels L0 and L1
//!   (nvlists at 16 KiB and 272 KiB), stratis, vdo, bitlocker, refs, apfs,
//!   gfs, ocfs, highpoint 37x, and the rest of the fixed-offset magics, the
//!   farthest of which short of 1 MiB is at 512 KiB.
//! * **Spots past the head**, 4 KiB each (one header, one block):
//!   1 MiB (VMFS volume; UDF anchor at sector 256 of 4 KiB / 512 of 2 KiB),
//!   2 MiB (VMFS filesystem; bcachefs second superblock; LUKS2 secondary
//!   header; UDF anchor at sector 512 of 4 KiB), 4 MiB (LUKS2 secondary
//!   header, the last offset libblkid tries).
//! * **The tail, the last 2 MiB**, zeroed whole. Every prober that reads
//!   relative to the end reaches less than that (the region need not be a
//!   multiple of 512 bytes; the probers round its end down to a sector or
//!   to 4/64/256 KiB, which costs at most that much more):
//!   Promise FastTrack (13 sector offsets up to 3087 sectors, about 1.51 MiB,
//!   before the end), bcachefs third superblock (1 MiB before the end), ZFS
//!   labels L2 and L3 (512/256 KiB before the 256 KiB-aligned end), md 0.90
//!   (64 KiB before the 64 KiB-aligned end), md 1.0 (8 KiB before the 4
//!   KiB-aligned end), DDF (last sector and 257 sectors before the end),
//!   HighPoint 45x (11 sectors), Intel ISW (2 sectors, of 512 or 4096 bytes),
//!   NVIDIA (2 sectors), Adaptec, JMicron, LSI, Silicon Image and VIA (last
//!   sector), nilfs2 backup superblock (8 sectors), DRBD (4 KiB), and the GPT
//!   backup header in the last sector.
//!
//! A region shorter than head plus tail is zeroed whole.
//!
//! Left out, on purpose: copies libblkid never reads, such as btrfs mirror
//! superblocks (64 MiB, 256 GiB), ext and xfs backup superblocks, the NTFS
//! backup boot sector, and GPT partition entries (the headers point to them).
//! Signatures reached only through a caller's hint (`session_offset` for
//! multi-session iso9660/UDF) and zoned-device btrfs superblocks (USB sticks are
//! not zoned) are also out. Data inside the region that merely looks like a
//! filesystem to other programs (e.g. file contents) is not libblkid's concern.
//!
//! The spots are relative to the region: the bytes must be zeroed where
//! libblkid will read them. For a FAT file that is its clusters in file order;
//! pass a writer that maps file offsets onto them if the file is fragmented.
use std::io::{self, Seek, SeekFrom, Write};
use std::ops::Range;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Zeroed whole at the start of every region.
pub const HEAD: u64 = MIB;
/// Zeroed whole at the end of every region.
pub const TAIL: u64 = 2 * MIB;
/// Offsets past the head that libblkid reads a header at, each zeroed for
/// [`SPOT_LEN`] bytes.
pub const FAR_SPOTS: [u64; 3] = [MIB, 2 * MIB, 4 * MIB];
/// Bytes zeroed at each of [`FAR_SPOTS`]: one LUKS2 binary header, one block.
pub const SPOT_LEN: u64 = 4 * KIB;
/// The most [`signature_spots`] ever asks to zero in one region.
pub const MAX_WIPE_BYTES: u64 = HEAD + TAIL + FAR_SPOTS.len() as u64 * SPOT_LEN;
// The budget: every persistence file and the partition pay this on a slow stick.
const _: () = assert!(MAX_WIPE_BYTES <= 3 * MIB + 16 * KIB);

/// Byte ranges, relative to the start of a region `len` bytes long, that must be
/// zeroed so that libblkid finds no stale signature in it (merged, sorted, within
/// `[0, len)`).
pub fn signature_spots(len: u64) -> Vec<Range<u64>> {
    if len == 0 {
        return Vec::new();
    }
    if len <= HEAD + TAIL {
        return std::iter::once(0..len).collect();
    }
    let mut spots = Vec::with_capacity(FAR_SPOTS.len() + 2);
    spots.push(0..HEAD);
    spots.extend(
        FAR_SPOTS
            .iter()
            .map(|&at| at..at.saturating_add(SPOT_LEN).min(len)),
    );
    spots.push(len - TAIL..len);
    merge(spots, len)
}

/// Zeroes [`signature_spots`]`(len)` of the region `[start, start+len)` of `dev`;
/// returns the ranges written, as absolute offsets in `dev`.
pub fn wipe_signatures<W: Write + Seek>(
    dev: &mut W,
    start: u64,
    len: u64,
) -> io::Result<Vec<Range<u64>>> {
    if start.checked_add(len).is_none() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("region at {start} of {len} bytes runs past the largest offset"),
        ));
    }
    let zeros = vec![0u8; 64 * KIB as usize];
    let mut written = Vec::new();
    for spot in signature_spots(len) {
        let abs = start + spot.start..start + spot.end;
        dev.seek(SeekFrom::Start(abs.start))?;
        let mut left = abs.end - abs.start;
        while left > 0 {
            let n = left.min(zeros.len() as u64);
            // n <= zeros.len(), so the cast cannot truncate.
            dev.write_all(&zeros[..n as usize])?;
            left -= n;
        }
        written.push(abs);
    }
    dev.flush()?;
    Ok(written)
}

/// Sorts, clips to `[0, len)`, drops empty ranges and joins touching ones.
fn merge(mut spots: Vec<Range<u64>>, len: u64) -> Vec<Range<u64>> {
    spots.retain(|r| r.start < len.min(r.end));
    for r in &mut spots {
        r.end = r.end.min(len);
    }
    spots.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(spots.len());
    for r in spots {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn total(spots: &[Range<u64>]) -> u64 {
        spots.iter().map(|r| r.end - r.start).sum()
    }

    fn check_shape(len: u64) {
        let spots = signature_spots(len);
        for r in &spots {
            assert!(r.start < r.end, "empty range {r:?} for {len}");
            assert!(r.end <= len, "{r:?} past {len}");
        }
        for w in spots.windows(2) {
            assert!(w[0].end < w[1].start, "{:?} not sorted/merged for {len}", w);
        }
        assert!(total(&spots) <= MAX_WIPE_BYTES, "{len}: {}", total(&spots));
        assert!(total(&spots) <= len);
    }

    #[test]
    fn ranges_are_sorted_merged_in_bounds_and_within_budget() {
        let sizes = [
            0,
            1,
            511,
            4096,
            MIB,
            HEAD + TAIL - 1,
            HEAD + TAIL,
            HEAD + TAIL + 1,
            4 * MIB + 100,
            5 * MIB,
            6 * MIB + 4097,
            64 * MIB,
            256 * MIB,
            (1u64 << 32) - 1,
            1 << 32,
            u64::MAX,
        ];
        for len in sizes {
            check_shape(len);
        }
    }

    #[test]
    fn small_regions_are_zeroed_whole() {
        for len in [1, 4096, 3 * MIB] {
            assert_eq!(
                signature_spots(len),
                std::iter::once(0..len).collect::<Vec<_>>()
            );
        }
        assert!(signature_spots(0).is_empty());
    }

    #[test]
    fn spots_of_a_4gib_and_a_256mib_region() {
        let g4 = 1u64 << 32;
        assert_eq!(
            signature_spots(g4),
            vec![
                0..MIB + 4 * KIB,
                2 * MIB..2 * MIB + 4 * KIB,
                4 * MIB..4 * MIB + 4 * KIB,
                g4 - 2 * MIB..g4,
            ]
        );
        assert_eq!(total(&signature_spots(g4)), MAX_WIPE_BYTES);
        let m256 = 256 * MIB;
        assert_eq!(total(&signature_spots(m256)), MAX_WIPE_BYTES);
        // The tail swallows the 4 MiB spot of a region barely past 5 MiB.
        let odd = 5 * MIB + 3;
        assert_eq!(
            signature_spots(odd),
            vec![
                0..MIB + 4 * KIB,
                2 * MIB..2 * MIB + 4 * KIB,
                odd - 2 * MIB..odd
            ]
        );
    }

    #[test]
    fn every_end_relative_probe_falls_in_the_tail() {
        // The farthest-from-the-end read of each end-relative prober, for
        // awkward (unaligned) sizes; see the module documentation.
        for len in [
            64 * MIB,
            64 * MIB + 511,
            256 * MIB - 1,
            (1 << 32) - 1,
            100 * MIB + 12345,
        ] {
            let tail_start = len - TAIL;
            let promise = ((len >> 9) - 3087) << 9;
            let zfs_l2 = len - 4 * 256 * KIB - len % (256 * KIB) + 2 * 256 * KIB + 16 * KIB;
            let md090 = (len & !(64 * KIB - 1)) - 64 * KIB;
            let md10 = (len & !(4 * KIB - 1)) - 8 * KIB;
            let bcachefs = len - MIB;
            let ddf = (len / 512 - 257) * 512;
            for at in [promise, zfs_l2, md090, md10, bcachefs, ddf] {
                assert!(at >= tail_start, "{at} before the tail of {len}");
            }
        }
    }

    #[test]
    fn wipe_zeroes_exactly_the_spots() {
        let len = 7 * MIB + 333;
        let start = 4096;
        let mut dev = Cursor::new(vec![0xa5u8; (start + len + 8192) as usize]);
        let written = wipe_signatures(&mut dev, start, len).unwrap();
        let data = dev.into_inner();
        let expect: Vec<Range<u64>> = signature_spots(len)
            .into_iter()
            .map(|r| r.start + start..r.end + start)
            .collect();
        assert_eq!(written, expect);
        for (i, b) in data.iter().enumerate() {
            let i = i as u64;
            let inside = written.iter().any(|r| r.contains(&i));
            assert_eq!(*b == 0, inside, "byte {i}");
        }
    }

    #[test]
    fn overflowing_region_is_refused() {
        let mut dev = Cursor::new(Vec::new());
        assert!(wipe_signatures(&mut dev, u64::MAX - 10, 100).is_err());
    }
}
