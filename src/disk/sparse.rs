//! Where a sparse file holds data.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;

/// The data regions of a (sparse) file, sorted, merged, as reported by SEEK_DATA/SEEK_HOLE.
pub fn data_regions(file: &File) -> io::Result<Vec<Range<u64>>> {
    let len = file.metadata()?.len();
    let fd = file.as_raw_fd();
    let mut out: Vec<Range<u64>> = Vec::new();
    let mut at: i64 = 0;
    while (at as u64) < len {
        let data = match nix::unistd::lseek(fd, at, nix::unistd::Whence::SeekData) {
            Ok(d) => d,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(nix::errno::Errno::EINVAL) => return Ok(std::iter::once(0..len).collect()),
            Err(e) => return Err(e.into()),
        };
        let hole = nix::unistd::lseek(fd, data, nix::unistd::Whence::SeekHole)?;
        out.push(data as u64..(hole as u64).min(len));
        at = hole;
    }
    Ok(out)
}
