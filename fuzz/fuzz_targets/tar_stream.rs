//! cargo-fuzz target: arbitrary bytes through `persist::tar_stream`. The checks live in
//! `../check/tar_stream.rs`, shared with `tests/integration/fuzz_corpus.rs` so CI replays the corpus on
//! stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../check/tar_stream.rs"]
mod check;

fuzz_target!(|data: &[u8]| {
    check::fuzz_one(data);
});
