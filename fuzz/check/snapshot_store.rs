//! The checks run on one input, shared by the cargo-fuzz target
//! (`fuzz/fuzz_targets/snapshot_store.rs`, nightly) and by `tests/integration/fuzz_corpus.rs`
//! (stable, so CI replays the committed corpus without cargo-fuzz).
//!
//! The input is the whole overlay (COW) file. The parameters a caller would supply (the
//! size the caller believes the file has, the origin size, where to write) come from the
//! last 8 bytes, so a kernel-made vector is a meaningful seed as it stands.
//!
//! Any panic is a bug: a parser panic directly, an `assert!` here when the library
//! contradicts itself (a validated store whose view cannot be produced, a merge that
//! disagrees with the view, a write that does not read back). Memory stays bounded: the
//! overlay is only ever the input itself, and every origin is at most [`ORIGIN_CAP`].

use std::collections::HashMap;
use std::io::{self, Cursor, Read, Seek, SeekFrom};

use livestick::persist::snapshot::{
    self as snap, CowWriter, LIVEOS_CHUNK_SECTORS, Opened, SECTOR_BYTES, Store,
};

/// Largest origin a run builds in memory (the view and the merge targets are this long).
const ORIGIN_CAP: u64 = 256 << 10;
/// Largest single write handed to the copy-on-write writer.
const WRITE_CAP: u64 = 64 * 1024;

/// Runs every check on one input. Panics only on a bug.
pub fn fuzz_one(data: &[u8]) {
    // The header reader on its own, including inputs shorter than a header.
    let _ = snap::read_header(&mut Cursor::new(data));

    let param = param_word(data);
    let len = data.len() as u64;
    // The file as it is, as a loop device sees it (whole sectors), claimed longer than
    // the stream holds (a truncated file or a lying caller), and an arbitrary size.
    let cow_sizes = [
        len,
        len / SECTOR_BYTES * SECTOR_BYTES,
        len.saturating_add((param & 0xffff) * SECTOR_BYTES),
        param,
    ];
    for cow_bytes in cow_sizes {
        check_store(data, cow_bytes, param);
    }
}

/// The caller-side parameters: the last 8 bytes, little-endian (0 for tiny inputs).
fn param_word(data: &[u8]) -> u64 {
    match data.len().checked_sub(8).and_then(|at| data.get(at..)) {
        Some(tail) if data.len() >= 24 => {
            let mut w = [0u8; 8];
            w.copy_from_slice(tail);
            u64::from_le_bytes(w)
        }
        _ => 0,
    }
}

fn check_store(data: &[u8], cow_bytes: u64, param: u64) {
    // `exact`: every byte the caller claims is really in the stream, so a store that
    // passes validation must never hit end of file.
    let exact = cow_bytes <= data.len() as u64;
    let origin_sectors = param >> 32;

    let opened = match snap::open_store(&mut Cursor::new(data), cow_bytes) {
        Ok(o) => o,
        Err(_) => {
            // Whatever the kernel refuses, recovery refuses too, without writing.
            check_recover(data, cow_bytes, None, false);
            return;
        }
    };
    for origin in [None, Some(origin_sectors)] {
        let r = snap::status_of(&opened, cow_bytes, LIVEOS_CHUNK_SECTORS, origin);
        assert!(!r.dm_status.is_empty());
        // `--json` and the text report read every field; `{:?}` does too.
        let _ = format!("{r:?}");
    }
    let store = match &opened {
        Opened::Valid(s) => s.as_ref(),
        Opened::Invalid { store: Some(s), .. } => s.as_ref(),
        Opened::Invalid { store: None, .. } | Opened::Uninitialised { .. } => {
            check_recover(data, cow_bytes, None, false);
            return;
        }
    };

    let _ = store.dm_status().to_string();
    let _ = store.free_data_chunks();
    let _ = store.next_free();
    let _ = store.validate(None);
    let _ = store.validate(Some(origin_sectors));
    let map = store.chunk_map();
    assert!(map.len() <= store.exceptions.len());
    assert!(
        map.windows(2).all(|w| w[0].0 < w[1].0),
        "chunk_map unsorted"
    );

    let chunk_bytes = store.geometry.chunk_bytes();
    // An origin just big enough for every entry (exercises the view on real stores),
    // and one from the input (mostly too small: exercises the refusals).
    let fit = map
        .last()
        .and_then(|&(old, _)| old.checked_add(1)?.checked_mul(chunk_bytes))
        .filter(|&b| b <= ORIGIN_CAP);
    let from_param = (param >> 12) % (ORIGIN_CAP + 1);
    for origin_bytes in fit.into_iter().chain([from_param]) {
        let view_ok = check_view(data, cow_bytes, store, origin_bytes, exact);
        check_recover(data, cow_bytes, Some(origin_bytes / SECTOR_BYTES), view_ok);
        if view_ok && exact {
            check_writer(data, cow_bytes, store, origin_bytes, param);
        }
    }
}

/// Byte `p` of the synthetic origin: the sector number, so misplaced data shows.
fn origin_byte(p: u64) -> u8 {
    ((p >> 9) as u8) ^ 0xa5
}

fn origin_vec(len: u64) -> Vec<u8> {
    (0..len).map(origin_byte).collect()
}

/// Reads the synthetic origin without holding it in memory.
struct PatternOrigin {
    len: u64,
    pos: u64,
}

impl Read for PatternOrigin {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.len.saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = origin_byte(self.pos + i as u64);
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for PatternOrigin {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let base = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = base.ok_or_else(|| io::Error::other("seek before the start"))?;
        Ok(self.pos)
    }
}

/// Produces the view of a `origin_bytes` origin and, when the store validates against
/// it, checks it against the exception map, against `apply_exceptions` and against
/// `merge_in_place`. Returns whether the store validated (so it is safe to write to).
fn check_view(data: &[u8], cow_bytes: u64, store: &Store, origin_bytes: u64, exact: bool) -> bool {
    let view_len = origin_bytes / SECTOR_BYTES * SECTOR_BYTES;
    let valid = store.header.is_valid() && store.validate(Some(view_len / SECTOR_BYTES)).is_ok();
    let mut view = Vec::new();
    let mut last = 0u64;
    let r = snap::write_view(
        &mut PatternOrigin {
            len: origin_bytes,
            pos: 0,
        },
        origin_bytes,
        &mut Cursor::new(data),
        store,
        &mut view,
        &mut |done, total| {
            assert!(
                done <= total && total == view_len,
                "progress {done}/{total}"
            );
            assert!(done >= last, "progress went back");
            last = done;
        },
    );
    if !valid {
        assert!(
            r.is_err(),
            "write_view accepted a store that does not validate"
        );
        return false;
    }
    if !exact {
        // The claimed length may exceed the stream: an I/O error is the right answer.
        return true;
    }
    if let Err(e) = r {
        panic!("write_view failed on a validated store: {e}");
    }
    assert_eq!(view.len() as u64, view_len, "view length");
    let chunk_bytes = store.geometry.chunk_bytes();
    let map: HashMap<u64, u64> = store.chunk_map().into_iter().collect();
    for p in (0..view_len).step_by(SECTOR_BYTES as usize) {
        let expected = match map.get(&(p / chunk_bytes)) {
            Some(&new) => data[(new * chunk_bytes + p % chunk_bytes) as usize],
            None => origin_byte(p),
        };
        assert_eq!(view[p as usize], expected, "view byte {p}");
    }

    // The in-place paths must leave the origin equal to the view.
    let mut origin = Cursor::new(origin_vec(origin_bytes));
    if let Err(e) = snap::apply_exceptions(
        &mut Cursor::new(data),
        store,
        &mut origin,
        origin_bytes,
        &mut |_, _| {},
    ) {
        panic!("apply_exceptions failed on a validated store: {e}");
    }
    assert!(origin.get_ref()[..view.len()] == view[..], "apply != view");

    let mut origin = Cursor::new(origin_vec(origin_bytes));
    let mut cow = Cursor::new(data.to_vec());
    if let Err(e) = snap::merge_in_place(&mut cow, store, &mut origin, origin_bytes, &mut |_, _| {})
    {
        panic!("merge_in_place failed on a validated store: {e}");
    }
    assert!(origin.get_ref()[..view.len()] == view[..], "merge != view");
    // Every loaded entry is cleared: a reload finds an empty store.
    match snap::open_store(&mut cow, cow_bytes) {
        Ok(Opened::Valid(s)) => assert!(s.exceptions.is_empty(), "entries left after merge"),
        other => panic!("merged store does not reload as valid: {other:?}"),
    }
    true
}

/// `recover_invalid` never writes on a dry run, never writes when it fails, and a
/// store it accepts reloads as valid with the same entries.
fn check_recover(data: &[u8], cow_bytes: u64, origin_sectors: Option<u64>, must_succeed: bool) {
    let mut copy = Cursor::new(data.to_vec());
    let dry = snap::recover_invalid(&mut copy, cow_bytes, origin_sectors, true);
    assert!(copy.get_ref()[..] == data[..], "dry run changed the file");
    if must_succeed && cow_bytes <= data.len() as u64 {
        assert!(dry.is_ok(), "recover refused a validated store: {dry:?}");
    }
    let wet = snap::recover_invalid(&mut copy, cow_bytes, origin_sectors, false);
    assert_eq!(dry.is_ok(), wet.is_ok(), "dry run and real run disagree");
    match wet {
        Err(_) => assert!(copy.get_ref()[..] == data[..], "failed recovery wrote"),
        Ok(rep) if rep.changed => {
            let before = entries(data, cow_bytes);
            match snap::open_store(&mut copy, cow_bytes) {
                Ok(Opened::Valid(s)) => {
                    assert_eq!(Some(s.exceptions.clone()), before, "entries changed")
                }
                other => panic!("recovered store does not reload as valid: {other:?}"),
            }
        }
        Ok(_) => assert!(copy.get_ref()[..] == data[..], "unchanged recovery wrote"),
    }
}

/// The entries a load of `data` finds, valid or not.
fn entries(data: &[u8], cow_bytes: u64) -> Option<Vec<snap::Exception>> {
    match snap::open_store(&mut Cursor::new(data), cow_bytes).ok()? {
        Opened::Valid(s) | Opened::Invalid { store: Some(s), .. } => Some(s.exceptions),
        _ => None,
    }
}

/// Writes through the user-space copy-on-write writer and reads the result back.
fn check_writer(data: &[u8], cow_bytes: u64, store: &Store, origin_bytes: u64, param: u64) {
    let origin_bytes = origin_bytes / SECTOR_BYTES * SECTOR_BYTES;
    if origin_bytes == 0 {
        return;
    }
    let mut w = match CowWriter::new(store.clone(), origin_bytes) {
        Ok(w) => w,
        Err(e) => panic!("CowWriter refused a validated store: {e}"),
    };
    let mut cow = Cursor::new(data.to_vec());
    let mut expect = origin_vec(origin_bytes);
    let mut origin = PatternOrigin {
        len: origin_bytes,
        pos: 0,
    };
    // Apply the existing view first so `expect` is the view after the writes.
    let mut view = Vec::new();
    if snap::write_view(
        &mut origin,
        origin_bytes,
        &mut Cursor::new(data),
        store,
        &mut view,
        &mut |_, _| {},
    )
    .is_err()
    {
        return;
    }
    expect.copy_from_slice(&view);
    let mut p = param;
    let mut refused = false;
    for k in 0..3u8 {
        let offset = (p & 0xfffff) % origin_bytes;
        let len = ((p >> 20) & 0xffff)
            .min(WRITE_CAP)
            .min(origin_bytes - offset);
        p = p.rotate_left(23) ^ 0x9e37_79b9_7f4a_7c15;
        let fill = vec![0x5a ^ k; len as usize];
        match w.write_at(&mut origin, &mut cow, offset, &fill) {
            Ok(()) => expect[offset as usize..(offset + len) as usize].copy_from_slice(&fill),
            // Full or at an area trap: a typed refusal. The chunks before the one refused
            // were written (as the kernel does per chunk), so the exact view is unknown.
            Err(_) => {
                refused = true;
                break;
            }
        }
    }
    let written = w.store().exceptions.clone();
    let reread = match snap::open_store(&mut cow, cow_bytes) {
        Ok(Opened::Valid(s)) => s,
        other => panic!("written store does not reload as valid: {other:?}"),
    };
    // Entries the kernel ignored after the end marker can resurface (the kernel does the
    // same), so only the prefix is guaranteed.
    assert!(
        reread.exceptions.starts_with(&written),
        "writer entries lost"
    );
    if !refused && reread.exceptions.len() == written.len() {
        let mut view = Vec::new();
        if let Err(e) = snap::write_view(
            &mut origin,
            origin_bytes,
            &mut cow,
            &reread,
            &mut view,
            &mut |_, _| {},
        ) {
            panic!("view of the written store failed: {e}");
        }
        assert!(view == expect, "written data does not read back");
    }
}
