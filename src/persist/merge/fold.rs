//! Writing the chunks of an image a tool (e2fsck) changed (found with
//! `persist::workdir::changed_chunks`) into a dm-snapshot overlay as the live system
//! would have: the merge folds e2fsck's changes in before the swap, `recover --repair`
//! folds its repairs in.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use super::error::{MergeError, io_at};
use crate::io::SyncData;
use crate::persist::snapshot::{self, CowWriter, LIVEOS_CHUNK_SECTORS, Opened};

/// Writes chunks `changed` of `image` into the overlay as the live system would have:
/// existing exceptions are overwritten in place, others become new exceptions. Checks
/// first that there is room for all of them, so nothing is half done for lack of space.
/// Returns the number of chunks written.
pub fn fold_chunks<C>(
    cow: &mut C,
    cow_bytes: u64,
    image: &Path,
    changed: &[u64],
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64, MergeError>
where
    C: Read + Write + Seek + SyncData,
{
    if changed.is_empty() {
        return Ok(0);
    }
    let store = match snapshot::open_store(cow, cow_bytes)? {
        Opened::Valid(s) => *s,
        Opened::Invalid { .. } => return Err(MergeError::OverlayInvalid),
        Opened::Uninitialised { .. } => {
            // A new store: initialise it as the kernel would, then add the chunks.
            snapshot::create_new_store(cow, cow_bytes, LIVEOS_CHUNK_SECTORS)?;
            match snapshot::open_store(cow, cow_bytes)? {
                Opened::Valid(s) => *s,
                _ => return Err(MergeError::OverlayInvalid),
            }
        }
    };
    let chunk_bytes = store.geometry.chunk_bytes();
    let have: HashSet<u64> = store.exceptions.iter().map(|e| e.old_chunk).collect();
    let new_chunks = changed.iter().filter(|c| !have.contains(c)).count() as u64;
    let free = store.free_data_chunks();
    if new_chunks > free {
        return Err(MergeError::FoldNoRoom {
            changed: changed.len() as u64,
            new_chunks,
            free,
        });
    }
    let mut img = File::open(image).map_err(io_at(image))?;
    let image_bytes = img.metadata().map_err(io_at(image))?.len();
    let mut writer = CowWriter::new(store, image_bytes)?;
    let view_bytes = image_bytes / snapshot::SECTOR_BYTES * snapshot::SECTOR_BYTES;
    let mut buf = vec![0u8; chunk_bytes as usize];
    for (i, &c) in changed.iter().enumerate() {
        let at = c * chunk_bytes;
        let n = chunk_bytes.min(view_bytes.saturating_sub(at)) as usize;
        if n == 0 {
            continue;
        }
        img.seek(SeekFrom::Start(at)).map_err(io_at(image))?;
        img.read_exact(&mut buf[..n]).map_err(io_at(image))?;
        writer.write_at(&mut img, cow, at, &buf[..n])?;
        progress(i as u64 + 1, changed.len() as u64);
    }
    Ok(changed.len() as u64)
}
