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
//!   sequence (32 KiB to about 288 KiB: libblkid reads UDF's anchors only once it
//!   finds one there), LVM1/LVM2 (sectors 0-3), bcache (4 KiB), squashfs, cramfs,
//!   romfs, erofs, f2fs (1 KiB), nilfs2 primary, reiserfs (8/64 KiB), jfs,
//!   hfs/hfs+, ntfs, exfat, vfat, ufs (0/8/64/256 KiB), zfs labels L0 and L1
//!   (nvlists at 16 KiB and 272 KiB), stratis, vdo, bitlocker, refs, apfs,
//!   gfs, ocfs, highpoint 37x, and the rest of the fixed-offset magics, the
//!   farthest of which short of 1 MiB is at 512 KiB.
//! * **Spots past the head**, 4 KiB each (one header, one block):
//!   1 MiB (VMFS volume), 2 MiB (VMFS filesystem; bcachefs second superblock,
//!   util-linux 2.40 on; LUKS2 secondary header), 4 MiB (LUKS2 secondary
//!   header, the last offset libblkid tries).
//! * **Spots near the end**, each read relative to the end of the region
//!   (rounded out to 4 KiB relative to its start, as the probers round the
//!   end down to a sector or to 4/64/256 KiB; the region need not be a
//!   multiple of 512 bytes):
//!   - the last 64 KiB whole: GPT backup header (last sector of 512 or 4096
//!     bytes), Adaptec, JMicron, LSI, Silicon Image, VIA (last sector), Intel
//!     ISW (2 sectors of 512 or 4096 bytes), NVIDIA (2 sectors), HighPoint 45x
//!     (11 sectors), nilfs2 backup superblock (8 sectors), DRBD (4 KiB), md
//!     1.0 (8 KiB before the 4 KiB-aligned end), DDF's last-sector header,
//!     Promise FastTrack at 16 and 63 sectors;
//!   - md 0.90: 4 KiB, 64 KiB before the 64 KiB-aligned end;
//!   - DDF's other header, 257 sectors before the end;
//!   - Promise FastTrack's other sector offsets (255 ... 3087 sectors, the
//!     farthest about 1.51 MiB before the end);
//!   - bcachefs's superblock 1 MiB before the end (util-linux 2.40 on);
//!   - ZFS labels L2 and L3 (512 and 256 KiB before the 256 KiB-aligned end):
//!     the nvlist header 16 KiB into each (what util-linux 2.41 on reads) and
//!     the 128 KiB uberblock array in the second half of each (up to 2.40,
//!     Debian 12's 2.38 and Fedora's 2.40 among them, libblkid counts uberblock
//!     magics there).
//!
//!   Zeroing the last 2 MiB whole would cover them all too, at 4-5 times the
//!   bytes; each persistence file, the partition and the disk pay it on a
//!   slow stick.
//!
//! A region of at most [`WHOLE_UP_TO`] bytes is zeroed whole.
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

use crate::disk::partition;
use crate::io::RangeSet;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Zeroed whole at the start of every region.
pub const HEAD: u64 = MIB;
/// Zeroed whole at the end of every region.
pub const TAIL: u64 = 64 * KIB;
/// Offsets past the head that libblkid reads a header at, each zeroed for
/// [`SPOT_LEN`] bytes.
pub const FAR_SPOTS: [u64; 3] = [MIB, 2 * MIB, 4 * MIB];
/// Bytes zeroed at each of [`FAR_SPOTS`]: one LUKS2 binary header, one block.
pub const SPOT_LEN: u64 = 4 * KIB;
/// Regions up to this long are zeroed whole (every end-relative offset fits
/// in a longer one).
pub const WHOLE_UP_TO: u64 = 2 * MIB;
/// Promise FastTrack's metadata, in sectors before the end (libblkid's
/// `promise_raid.c`).
const PROMISE_SECTORS: [u64; 13] = [
    63, 255, 256, 16, 399, 591, 675, 735, 911, 974, 991, 951, 3087,
];
/// Granularity of the spots near the end: a spot a page long, not a sector,
/// never makes the page cache read the rest of the page from the stick.
const BLOCK: u64 = 4 * KIB;
/// ZFS vdev label size; labels L2 and L3 end at the 256 KiB-aligned end.
const ZFS_LABEL: u64 = 256 * KIB;
/// The most the spots near the end can add up to: [`TAIL`], md 0.90, DDF,
/// the Promise offsets and bcachefs at two blocks each when unaligned, and two
/// ZFS labels' nvlist headers and uberblock arrays.
pub const MAX_TAIL_BYTES: u64 =
    TAIL + BLOCK + (2 + 2 * PROMISE_SECTORS.len() as u64 + 2) * BLOCK + 2 * (BLOCK + 128 * KIB);
/// The most [`signature_spots`] ever asks to zero in one region.
pub const MAX_WIPE_BYTES: u64 = {
    let spread = HEAD + FAR_SPOTS.len() as u64 * SPOT_LEN + MAX_TAIL_BYTES;
    if spread > WHOLE_UP_TO {
        spread
    } else {
        WHOLE_UP_TO
    }
};
// The budget: every persistence file and the partition pay this on a slow stick.
const _: () = assert!(HEAD + FAR_SPOTS.len() as u64 * SPOT_LEN + MAX_TAIL_BYTES <= 3 * MIB / 2);

/// Byte ranges, relative to the start of a region `len` bytes long, that must be
/// zeroed so that libblkid finds no stale signature in it (merged, sorted, within
/// `[0, len)`).
pub fn signature_spots(len: u64) -> Vec<Range<u64>> {
    if len == 0 {
        return Vec::new();
    }
    if len <= WHOLE_UP_TO {
        return std::iter::once(0..len).collect();
    }
    let mut spots = Vec::with_capacity(FAR_SPOTS.len() + 24);
    spots.push(0..HEAD);
    spots.extend(
        FAR_SPOTS
            .iter()
            .map(|&at| at..at.saturating_add(SPOT_LEN).min(len)),
    );
    spots.extend(end_spots(len));
    merge(spots, len)
}

/// Where a stick written anew is zeroed against stale signatures: the spots of the
/// whole disk but the ranges [`partition::table_ranges`] (zeroed just before), and
/// the spots of the partition at `part_start` of `part_len` bytes from
/// `written_from` on (what lies below is written whole: a new FAT's reserved sectors
/// and tables). Device offsets.
pub fn disk_and_partition_spots(
    disk_size: u64,
    part_start: u64,
    part_len: u64,
    written_from: u64,
) -> RangeSet {
    let mut spots: RangeSet = signature_spots(disk_size).into_iter().collect();
    for zeroed in partition::table_ranges(disk_size) {
        spots.remove(zeroed);
    }
    for r in signature_spots(part_len) {
        let from = r.start.max(written_from);
        if from < r.end {
            spots.insert(part_start + from..part_start + r.end);
        }
    }
    spots
}

/// The spots read relative to the end of a region longer than [`WHOLE_UP_TO`]
/// (so that none of the subtractions below can wrap): see the module
/// documentation for whose each is.
fn end_spots(len: u64) -> Vec<Range<u64>> {
    let blocks = |at: u64, n: u64| at / BLOCK * BLOCK..(at + n).div_ceil(BLOCK) * BLOCK;
    let sector_from_end = |n: u64| ((len >> 9) - n) << 9;
    let mut spots = vec![len - TAIL..len];
    let md090 = (len & !(64 * KIB - 1)) - 64 * KIB;
    spots.push(blocks(md090, 4 * KIB));
    spots.push(blocks(sector_from_end(257), 512));
    spots.extend(
        PROMISE_SECTORS
            .iter()
            .map(|&s| blocks(sector_from_end(s), 512)),
    );
    spots.push(blocks(len - MIB, 4 * KIB));
    let labels_end = len - len % ZFS_LABEL;
    for label in [labels_end - 2 * ZFS_LABEL, labels_end - ZFS_LABEL] {
        spots.push(blocks(label + 16 * KIB, 4 * KIB));
        spots.push(label + ZFS_LABEL / 2..label + ZFS_LABEL);
    }
    spots
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
            WHOLE_UP_TO - 1,
            WHOLE_UP_TO,
            WHOLE_UP_TO + 1,
            WHOLE_UP_TO + 511,
            3 * MIB + 7,
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
        for len in (WHOLE_UP_TO + 1..WHOLE_UP_TO + 2 * 256 * KIB).step_by(4093) {
            check_shape(len);
        }
    }

    #[test]
    fn small_regions_are_zeroed_whole() {
        for len in [1, 4096, WHOLE_UP_TO] {
            assert_eq!(
                signature_spots(len),
                std::iter::once(0..len).collect::<Vec<_>>()
            );
        }
        assert!(signature_spots(0).is_empty());
    }

    #[test]
    fn spots_of_a_4gib_region() {
        let g4 = 1u64 << 32;
        let from_end = |at: u64, n: u64| g4 - at..g4 - at + n;
        let sector = |s: u64| from_end(s * 512 / BLOCK * BLOCK + BLOCK, BLOCK);
        let mut want = vec![
            0..MIB + 4 * KIB,
            2 * MIB..2 * MIB + 4 * KIB,
            4 * MIB..4 * MIB + 4 * KIB,
            // bcachefs
            from_end(MIB, 4 * KIB),
            // ZFS L2 and L3: nvlist header, uberblocks
            from_end(512 * KIB - 16 * KIB, 4 * KIB),
            from_end(384 * KIB, 128 * KIB),
            from_end(256 * KIB - 16 * KIB, 4 * KIB),
            from_end(128 * KIB, 128 * KIB),
            // md 0.90 right before the last 64 KiB, then the last 64 KiB
            from_end(128 * KIB, 4 * KIB),
            from_end(64 * KIB, 64 * KIB),
        ];
        // Promise and DDF, by sector before the end; 16 and 63 are in the last 64 KiB.
        want.extend([3087, 991, 974, 951, 911, 735, 675, 591, 399, 257, 256].map(sector));
        let want = merge(want, g4);
        assert_eq!(signature_spots(g4), want);
        // 1 MiB of head, 12 KiB of far spots, 304 KiB near the end (the last 2 MiB
        // whole would be 2048 KiB); L3's uberblocks take in md 0.90, 255-257 sectors.
        assert_eq!(total(&want), 1328 * KIB, "{want:?}");
    }

    /// Where each end-relative prober reads, (offset, length), for a region `len` long.
    fn end_relative_reads(len: u64) -> Vec<(u64, u64)> {
        let sector = |n: u64| ((len >> 9) - n) << 9;
        let labels_end = len - len % (256 * KIB);
        let mut reads = vec![
            // GPT backup header (512- and 4096-byte sectors), one-sector RAIDs.
            (sector(1), 512),
            (((len >> 12) - 1) << 12, 4096),
            // ISW (512/4096), NVIDIA, HighPoint 45x, nilfs2 backup, DRBD.
            (sector(2), 512),
            (((len >> 12) - 2) << 12, 4096),
            (sector(11), 512),
            (sector(8), 1024),
            (len - 4 * KIB, 4 * KIB),
            // md 1.0 and 0.90, DDF.
            ((len & !(4 * KIB - 1)) - 8 * KIB, 4 * KIB),
            ((len & !(64 * KIB - 1)) - 64 * KIB, 4 * KIB),
            (sector(257), 512),
            // bcachefs's magic.
            (len - MIB + 24, 16),
        ];
        reads.extend(PROMISE_SECTORS.map(|s| (sector(s), 24)));
        for label in [labels_end - 512 * KIB, labels_end - 256 * KIB] {
            reads.push((label + 16 * KIB, 16));
            reads.push((label + 128 * KIB, 128 * KIB));
        }
        reads
    }

    #[test]
    fn every_end_relative_probe_is_covered() {
        // Awkward (unaligned) sizes too: see the module documentation.
        for len in [
            WHOLE_UP_TO + 1,
            WHOLE_UP_TO + 4095,
            3 * MIB + 7,
            64 * MIB,
            64 * MIB + 511,
            256 * MIB - 1,
            (1 << 32) - 1,
            100 * MIB + 12345,
        ] {
            let spots = signature_spots(len);
            for (at, n) in end_relative_reads(len) {
                assert!(
                    spots.iter().any(|r| r.start <= at && at + n <= r.end),
                    "{at}+{n} not zeroed in a region of {len}: {spots:?}"
                );
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
