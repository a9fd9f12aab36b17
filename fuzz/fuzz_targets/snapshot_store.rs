//! cargo-fuzz target: arbitrary bytes as a dm-snapshot overlay file.
//! The checks live in `../check/snapshot_store.rs`, shared with `tests/integration/fuzz_corpus.rs`
//! so CI replays the corpus on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../check/snapshot_store.rs"]
mod check;

fuzz_target!(|data: &[u8]| {
    check::fuzz_one(data);
});
