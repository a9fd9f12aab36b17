//! e2fsprogs' undo files (`E2UNDO02`), read for one thing: which byte ranges of
//! a file system a program such as `debugfs -z FILE` wrote. The undo file keeps
//! the old content of every block the program wrote (once, however often it was
//! written), so its keys are an exact list of the blocks it touched. livestick
//! reads them to read back what debugfs wrote on a stick, the way it reads back
//! its own writes.
//!
//! Layout (little-endian): a 512-byte header (magic, key count, where the keys
//! start in units of the undo file's block size, that block size and the file
//! system's, a finished flag, crc32c of the header); from the key offset on,
//! key blocks (magic `0xCADECADE`, crc32c of the block, then as many 16-byte
//! keys as fit after the 16-byte head), each followed by the saved blocks its
//! keys describe. A key is (file system block, crc32c of the saved bytes, size
//! in bytes); the block is in units of the file system's block size, counted
//! from the start of the file system (the `offset=` given to the program).
//!
//! One quirk of e2fsprogs (1.43-1.47) when the file system sits at an offset:
//! the primary superblock is written through `io_channel_write_byte`, whose undo
//! record adds the offset twice, so the key names the block at `offset + 1024`
//! of the file system and the superblock itself has none. [`written_ranges`]
//! puts the superblock back and keeps that other block only where its bytes
//! changed (the key saved them), since debugfs may also have written it.
use std::io::{self, Read, Seek, SeekFrom};
use std::ops::Range;

use thiserror::Error;

use super::ext4::crc32c;

const MAGIC: &[u8; 8] = b"E2UNDO02";
const HEADER_LEN: usize = 512;
const KEY_BLOCK_MAGIC: u32 = 0xCADE_CADE;
const KEY_LEN: usize = 16;
/// The header's state flag a program sets when it closed the undo file.
const STATE_FINISHED: u32 = 1;
/// e2fsprogs keeps one key's saved bytes to this many undo blocks.
const MAX_EXTENT_BLOCKS: u64 = 512;
/// Where an ext2/3/4 superblock is, from the file system's start.
const SUPERBLOCK: Range<u64> = 1024..2048;

#[derive(Debug, Error)]
pub enum E2UndoError {
    #[error("reading the undo file: {0}")]
    Io(#[from] io::Error),
    #[error("not an e2fsprogs undo file (no E2UNDO02 magic)")]
    NotUndo,
    #[error("the undo file is damaged: {0}")]
    Damaged(String),
    #[error("the undo file was not finished: the program that wrote it stopped before closing it")]
    Unfinished,
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}

/// The byte ranges of the file system `fs` (read from its first byte) that the
/// program recorded in `undo` wrote, from the file system's start, sorted and
/// merged.
pub fn written_ranges<R: Read + Seek, D: Read + Seek>(
    undo: &mut R,
    fs: &mut D,
) -> Result<Vec<Range<u64>>, E2UndoError> {
    let mut header = [0u8; HEADER_LEN];
    undo.seek(SeekFrom::Start(0))?;
    undo.read_exact(&mut header).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => E2UndoError::NotUndo,
        _ => E2UndoError::Io(e),
    })?;
    if &header[..8] != MAGIC {
        return Err(E2UndoError::NotUndo);
    }
    if !crc32c(!0, &header[..HEADER_LEN - 4]) != !le32(&header, HEADER_LEN - 4) {
        return Err(E2UndoError::Damaged(
            "the header's checksum does not match".into(),
        ));
    }
    let num_keys = le64(&header, 8);
    let key_offset = le64(&header, 24);
    let block_size = u64::from(le32(&header, 32));
    let fs_block_size = u64::from(le32(&header, 36));
    let state = le32(&header, 44);
    let fs_offset = le64(&header, 64);
    if state & STATE_FINISHED == 0 {
        return Err(E2UndoError::Unfinished);
    }
    let sane = |n: u64| n.is_power_of_two() && (1024..=1 << 20).contains(&n);
    if !sane(block_size) || !sane(fs_block_size) {
        return Err(E2UndoError::Damaged(format!(
            "block sizes {block_size} and {fs_block_size}"
        )));
    }
    let keys_per_block = block_size / KEY_LEN as u64 - 1;
    // Each key: the range it names, where its saved bytes are in `undo`.
    let mut keys: Vec<(Range<u64>, u64)> = Vec::new();
    let mut key_block = vec![0u8; block_size as usize];
    let mut at_block = key_offset;
    let mut left = num_keys;
    while left > 0 {
        let pos = at_block
            .checked_mul(block_size)
            .ok_or_else(|| E2UndoError::Damaged("a key block past any file's end".into()))?;
        undo.seek(SeekFrom::Start(pos))?;
        undo.read_exact(&mut key_block)
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => {
                    E2UndoError::Damaged(format!("{left} keys missing: the file ends first"))
                }
                _ => E2UndoError::Io(e),
            })?;
        if le32(&key_block, 0) != KEY_BLOCK_MAGIC {
            return Err(E2UndoError::Damaged(format!(
                "no key block at undo block {at_block}"
            )));
        }
        let crc = le32(&key_block, 4);
        key_block[4..8].fill(0);
        if crc32c(!0, &key_block) != crc {
            return Err(E2UndoError::Damaged(format!(
                "the key block at undo block {at_block} fails its checksum"
            )));
        }
        at_block += 1;
        for key in key_block[KEY_LEN..]
            .chunks_exact(KEY_LEN)
            .take(left.min(keys_per_block) as usize)
        {
            let fs_block = le64(key, 0);
            let size = u64::from(le32(key, 12));
            if size == 0 || size > MAX_EXTENT_BLOCKS * block_size {
                return Err(E2UndoError::Damaged(format!(
                    "a key of {size} bytes at file system block {fs_block}"
                )));
            }
            let start = fs_block
                .checked_mul(fs_block_size)
                .filter(|s| s.checked_add(size).is_some())
                .ok_or_else(|| {
                    E2UndoError::Damaged(format!("file system block {fs_block} is out of range"))
                })?;
            keys.push((start..start + size, at_block * block_size));
            at_block += size.div_ceil(block_size);
        }
        left -= left.min(keys_per_block);
    }
    let mut ranges = Vec::with_capacity(keys.len() + 1);
    // The superblock's misplaced key (see the module's notes): the blocks that
    // hold `fs_offset + 1024 .. fs_offset + 2048` of the file system.
    let misplaced = (fs_offset != 0).then(|| {
        let first = fs_offset.saturating_add(SUPERBLOCK.start) / fs_block_size * fs_block_size;
        first
            ..fs_offset
                .saturating_add(SUPERBLOCK.end)
                .div_ceil(fs_block_size)
                * fs_block_size
    });
    for (range, saved_at) in keys {
        let Some(misplaced) = misplaced.clone() else {
            ranges.push(range);
            continue;
        };
        let overlap = range.start.max(misplaced.start)..range.end.min(misplaced.end);
        if overlap.is_empty() {
            ranges.push(range);
            continue;
        }
        ranges.push(range.start..overlap.start);
        ranges.push(overlap.end..range.end);
        ranges.push(SUPERBLOCK);
        let mut saved = vec![0u8; (overlap.end - overlap.start) as usize];
        undo.seek(SeekFrom::Start(saved_at + (overlap.start - range.start)))?;
        undo.read_exact(&mut saved)?;
        let mut now = vec![0u8; saved.len()];
        fs.seek(SeekFrom::Start(overlap.start))?;
        match fs.read_exact(&mut now) {
            Ok(()) if now != saved => ranges.push(overlap),
            Ok(()) => {}
            // Past the file system's end: not a block of it the program wrote.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
            Err(e) => return Err(e.into()),
        }
    }
    ranges.retain(|r| !r.is_empty());
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::path::Path;
    use std::process::Command;

    fn run(cmd: &mut Command) {
        let out = cmd.output().expect("run the e2fsprogs tool");
        assert!(
            out.status.success(),
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A 32 MiB file system at `offset` in a file of random bytes, given a file
    /// by `debugfs -z`; returns the image before and after, and the undo file.
    fn debugfs_changes(dir: &Path, offset: u64, block_size: u32) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let img = dir.join("img");
        let mut bytes = vec![0u8; 40 << 20];
        let mut x = 0x9E37_79B9_7F4A_7C15_u64;
        for b in bytes.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        fs::write(&img, &bytes).expect("write the image");
        run(Command::new("mkfs.ext4").args([
            "-q",
            "-F",
            "-b",
            &block_size.to_string(),
            "-E",
            &format!("offset={offset}"),
            img.to_str().expect("utf-8 path"),
            "32M",
        ]));
        let before = fs::read(&img).expect("read the image");
        let host = dir.join("record");
        fs::write(&host, "a record\n".repeat(700)).expect("write the host file");
        let undo = dir.join("undo");
        run(Command::new("debugfs")
            .arg("-w")
            .arg("-z")
            .arg(&undo)
            .arg("-R")
            .arg(format!("write {} record", host.display()))
            .arg(format!("{}?offset={offset}", img.display())));
        let after = fs::read(&img).expect("read the image");
        (before, after, fs::read(&undo).expect("read the undo file"))
    }

    #[test]
    fn every_byte_debugfs_changed_is_in_a_recorded_range() {
        for (offset, block_size) in [(1 << 20, 4096), (3 << 20, 1024)] {
            let dir = tempfile::tempdir().expect("temp dir");
            let (before, after, undo) = debugfs_changes(dir.path(), offset, block_size);
            let ranges = written_ranges(
                &mut io::Cursor::new(&undo),
                &mut io::Cursor::new(&after[offset as usize..]),
            )
            .expect("parse the undo file");
            let total: u64 = ranges.iter().map(|r| r.end - r.start).sum();
            assert!(
                total < 256 << 10,
                "{total} bytes recorded for one small file"
            );
            for r in &ranges {
                // Whole blocks, but the superblock the module puts back.
                assert!(
                    r.start % u64::from(block_size) == 0 || r.start == 1024,
                    "{r:?}"
                );
                assert!(r.end <= 32 << 20, "{r:?} past the file system");
            }
            let covered =
                |at: u64| at >= offset && ranges.iter().any(|r| r.contains(&(at - offset)));
            let changed: Vec<u64> = (0..before.len())
                .filter(|&i| before[i] != after[i])
                .map(|i| i as u64)
                .collect();
            assert!(changed.len() > 6300, "the record's bytes changed the image");
            let missed: Vec<&u64> = changed.iter().filter(|&&at| !covered(at)).collect();
            assert!(
                missed.is_empty(),
                "changed but not recorded: {:?}",
                &missed[..missed.len().min(8)]
            );
            // The record's own data is among them, not only metadata.
            let text = b"a record\na record\n";
            let at = after
                .windows(text.len())
                .position(|w| w == text)
                .expect("the record is in the image") as u64;
            assert!(covered(at));
            // The block e2fsprogs's undo record names in place of the superblock
            // (the offset counted twice) was not written, and is not counted.
            let misplaced = (offset + 1024) / u64::from(block_size) * u64::from(block_size);
            assert!(!ranges.iter().any(|r| r.contains(&misplaced)), "{ranges:?}");
        }
    }

    fn fix_header_crc(undo: &mut [u8]) {
        let crc = crc32c(!0, &undo[..HEADER_LEN - 4]);
        undo[HEADER_LEN - 4..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn a_damaged_or_unfinished_undo_file_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (_, after, undo) = debugfs_changes(dir.path(), 1 << 20, 4096);
        let fs = &after[1 << 20..];
        let parse =
            |bytes: &[u8]| written_ranges(&mut io::Cursor::new(bytes), &mut io::Cursor::new(fs));
        assert!(parse(&undo).is_ok());

        assert!(matches!(parse(&undo[..100]), Err(E2UndoError::NotUndo)));
        assert!(matches!(parse(&[0u8; 4096]), Err(E2UndoError::NotUndo)));

        let mut bad = undo.clone();
        bad[9] ^= 1; // the key count, under the header's checksum
        assert!(matches!(parse(&bad), Err(E2UndoError::Damaged(_))));

        let mut unfinished = undo.clone();
        unfinished[44] = 0;
        fix_header_crc(&mut unfinished);
        assert!(matches!(parse(&unfinished), Err(E2UndoError::Unfinished)));

        let key_block = (le64(&undo, 24) * u64::from(le32(&undo, 32))) as usize;
        let mut bad_key = undo.clone();
        bad_key[key_block + 16] ^= 1;
        assert!(matches!(parse(&bad_key), Err(E2UndoError::Damaged(_))));

        // More keys than the file holds.
        let mut more = undo.clone();
        more[8..16].copy_from_slice(&10_000u64.to_le_bytes());
        fix_header_crc(&mut more);
        assert!(matches!(parse(&more), Err(E2UndoError::Damaged(_))));
        assert!(matches!(
            parse(&undo[..key_block + 100]),
            Err(E2UndoError::Damaged(_))
        ));
    }
}
