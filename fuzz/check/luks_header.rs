//! The checks run on one input, shared by the cargo-fuzz target
//! (`fuzz/fuzz_targets/luks_header.rs`, nightly) and by `tests/integration/fuzz_corpus.rs`
//! (stable, so CI replays the committed corpus without cargo-fuzz).
//!
//! The input is a whole LUKS2 container (headers, keyslot areas, a few data
//! sectors); the seeds open with the passphrase `pw`. Any panic is a bug: the
//! reader must refuse a bad header with an error, never panic, abort on an
//! allocation or run for long. Small limits keep each run cheap: a few
//! hundred KiB of Argon2 memory and a few thousand PBKDF2 iterations at most,
//! so a header asking for more exercises the refusals instead.

use std::io::{Cursor, Read, Seek, SeekFrom, Write};

use livestick::persist::luks::{LuksError, LuksLimits, open_luks2_with_limits};

const LIMITS: LuksLimits = LuksLimits {
    max_memory_kib: 256,
    memory_reason: "the fuzz limit",
    max_pbkdf2_iterations: 4000,
    max_argon2_kib_passes: 1024,
};

/// Bytes of plaintext a run reads and writes back at most.
const IO_CAP: usize = 64 * 1024;

/// Runs every check on one input. Panics only on a bug.
pub fn fuzz_one(data: &[u8]) {
    for pass in [&b"pw"[..], b"not the passphrase"] {
        match open_luks2_with_limits(Cursor::new(data.to_vec()), pass, &LIMITS) {
            Ok(vol) => check_volume(vol, data.len() as u64),
            // Every refusal has a message that says what to do; formatting it
            // must not panic either.
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
    // The empty passphrase is refused before the header is read.
    assert!(matches!(
        open_luks2_with_limits(Cursor::new(data), b"", &LIMITS),
        Err(LuksError::EmptyPassphrase)
    ));
}

/// An opened volume is consistent with the file: key sizes of aes-xts, data
/// inside the file, and what is written through it reads back.
fn check_volume(mut vol: livestick::persist::luks::LuksVolume<Cursor<Vec<u8>>>, file_len: u64) {
    let info = vol.info().clone();
    assert!(
        info.key_bits == 256 || info.key_bits == 512,
        "{}",
        info.key_bits
    );
    assert!(info.data_offset <= file_len);
    assert!(vol.len() <= file_len - info.data_offset);
    let _ = format!("{info:?}");

    let n = (vol.len() as usize).min(IO_CAP);
    let mut plain = vec![0u8; n];
    vol.read_exact(&mut plain).expect("read inside the segment");
    // Write a changed copy, unaligned, and read it back.
    let at = (n / 3) as u64;
    let patch: Vec<u8> = plain[at as usize..].iter().map(|b| b ^ 0x5a).collect();
    vol.seek(SeekFrom::Start(at)).expect("seek");
    vol.write_all(&patch).expect("write inside the segment");
    vol.seek(SeekFrom::Start(0)).expect("seek");
    let mut back = vec![0u8; n];
    vol.read_exact(&mut back).expect("read back");
    assert_eq!(&back[..at as usize], &plain[..at as usize]);
    assert_eq!(&back[at as usize..], &patch[..]);
    // Past the end: reads give nothing, writes are refused.
    vol.seek(SeekFrom::Start(vol.len())).expect("seek");
    assert_eq!(vol.read(&mut [0u8; 16]).expect("read at end"), 0);
    assert!(vol.write(&[0u8; 16]).is_err());
}
