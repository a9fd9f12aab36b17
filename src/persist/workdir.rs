//! The host side of maintenance: a merge or an overlay check works on copies in a
//! work directory of the host (`--workdir`). How much room that directory has, and
//! which chunks of a copy a tool (e2fsck, resize2fs) changed, are needed by both
//! `merge` and `ovl_maint`, so they live here, below both.

use std::fs::File;
use std::hash::Hasher;
use std::io;
use std::path::Path;

use crate::io::{IoAt, io_at, read_full};

/// Free bytes for an unprivileged user on the file system holding `path`. A plain
/// `io::Result`, so that callers word the failure themselves (or keep it as a fact).
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
    Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

/// A cheap fingerprint of every `chunk_bytes` chunk of a file: enough to tell which
/// chunks a tool changed, without keeping a copy of the file.
pub fn chunk_fingerprints(path: &Path, chunk_bytes: u64) -> Result<Vec<u64>, IoAt> {
    let mut f = File::open(path).map_err(io_at(path))?;
    let chunk = chunk_bytes as usize;
    let mut buf = vec![0u8; (4 << 20) / chunk * chunk];
    let mut out = Vec::new();
    loop {
        let got = read_full(&mut f, &mut buf).map_err(io_at(path))?;
        if got == 0 {
            break;
        }
        for c in buf[..got].chunks(chunk) {
            let mut h = std::hash::DefaultHasher::new();
            h.write(c);
            out.push(h.finish());
        }
        if got < buf.len() {
            break;
        }
    }
    Ok(out)
}

/// The chunks whose fingerprint differs between `before` and the file now.
pub fn changed_chunks(path: &Path, chunk_bytes: u64, before: &[u64]) -> Result<Vec<u64>, IoAt> {
    let after = chunk_fingerprints(path, chunk_bytes)?;
    Ok(after
        .iter()
        .enumerate()
        .filter(|(i, h)| before.get(*i) != Some(h))
        .map(|(i, _)| i as u64)
        .collect())
}
