//! Where a sparse file holds data, so that copying an image built as a sparse
//! temporary file (ext4 from `mke2fs`) writes only what it contains instead of
//! GiBs of zeros over a slow USB bus.
//!
//! Whatever lies under the holes on the target keeps its stale bytes: only
//! images that are correct over arbitrary bytes may be copied this way (see
//! [`crate::disk::ext4::make_ext4_image`]).

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::unistd::{Whence, lseek};

fn to_off(pos: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(pos).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("offset {pos} is beyond what lseek can address"),
        )
    })
}

fn to_pos(off: libc::off_t) -> io::Result<u64> {
    u64::try_from(off).map_err(|_| io::Error::other(format!("lseek returned {off}")))
}

/// The data regions of a (sparse) file, sorted, merged, as reported by SEEK_DATA/SEEK_HOLE.
///
/// Everything outside the regions reads as zeros. A file system that cannot
/// tell (lseek answers `EINVAL` to `SEEK_DATA`) gets the whole file as one
/// region, which is always correct, only slower to copy. The regions may be
/// coarser than what was written (file systems report whole blocks or
/// extents, and some report unwritten extents as data), never finer.
///
/// The file's offset is restored afterwards, so a reader positioned on it is
/// not disturbed.
pub fn data_regions(file: &File) -> io::Result<Vec<Range<u64>>> {
    let fd = file.as_raw_fd();
    let len = file.metadata()?.len();
    let saved = lseek(fd, 0, Whence::SeekCur).map_err(io::Error::from)?;
    let result = scan(fd, len);
    lseek(fd, saved, Whence::SeekSet).map_err(io::Error::from)?;
    result
}

fn scan(fd: std::os::fd::RawFd, len: u64) -> io::Result<Vec<Range<u64>>> {
    let mut regions: Vec<Range<u64>> = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let start = match lseek(fd, to_off(pos)?, Whence::SeekData) {
            Ok(s) => to_pos(s)?,
            // No data at or after `pos`: the rest is one hole.
            Err(Errno::ENXIO) => break,
            // SEEK_DATA unknown here: treat everything as data.
            Err(Errno::EINVAL) if pos == 0 => return Ok(std::iter::once(0..len).collect()),
            Err(e) => return Err(e.into()),
        };
        if start >= len {
            break;
        }
        let end = match lseek(fd, to_off(start)?, Whence::SeekHole) {
            // Every file has an implicit hole at its end, so this is at most
            // `len`; the clamp only guards against the file growing meanwhile.
            Ok(e) => to_pos(e)?.min(len),
            Err(Errno::ENXIO) => len,
            Err(e) => return Err(e.into()),
        };
        if end <= start {
            // A file system that contradicts itself would loop forever here.
            return Err(io::Error::other(format!(
                "SEEK_HOLE from data at {start} answered {end}"
            )));
        }
        match regions.last_mut() {
            Some(last) if last.end >= start => last.end = last.end.max(end),
            _ => regions.push(start..end),
        }
        pos = end;
    }
    Ok(regions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::FileExt;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn finds_the_written_regions_of_a_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let mut f = File::options()
            .create(true)
            .read(true)
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(16 * MIB).unwrap();
        let chunk = vec![0xA5u8; MIB as usize];
        // Whole MiBs, so any file system's allocation unit fits them exactly;
        // two adjacent writes must come back as one merged region.
        for at in [0, 8, 9, 15] {
            f.write_all_at(&chunk, at * MIB).unwrap();
        }
        f.sync_all().unwrap();
        f.seek(SeekFrom::Start(12345)).unwrap();

        let regions = data_regions(&f).unwrap();
        assert_eq!(f.stream_position().unwrap(), 12345, "offset restored");
        if regions.len() == 1 && regions[0] == (0..16 * MIB) {
            eprintln!("note: this file system does not report holes; only the fallback is checked");
            return;
        }
        assert_eq!(regions, [0..MIB, 8 * MIB..10 * MIB, 15 * MIB..16 * MIB]);

        // Outside the regions the file reads as zeros.
        let mut all = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut all).unwrap();
        let mut covered = vec![false; all.len()];
        for r in &regions {
            covered[r.start as usize..r.end as usize].fill(true);
        }
        assert!(all.iter().zip(&covered).all(|(&b, &c)| c || b == 0));
    }

    #[test]
    fn empty_and_all_hole_files_have_no_regions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut f = File::create(&path).unwrap();
        assert!(data_regions(&f).unwrap().is_empty());
        f.set_len(4 * MIB).unwrap();
        let r = data_regions(&f).unwrap();
        assert!(
            r.is_empty() || (r.len() == 1 && r[0] == (0..4 * MIB)),
            "{r:?}"
        );
        // A file with only data is one region.
        f.set_len(0).unwrap();
        f.write_all(&[1u8; 5000]).unwrap();
        let r = data_regions(&f).unwrap();
        assert!(r.len() == 1 && r[0] == (0..5000), "{r:?}");
    }
}
