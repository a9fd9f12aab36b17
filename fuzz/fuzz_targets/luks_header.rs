//! cargo-fuzz target: arbitrary bytes as a LUKS2 container through the header
//! reader (`persist::luks::open_luks2_with_limits`). The checks live in
//! `../check/luks_header.rs`, shared with `tests/integration/fuzz_corpus.rs` so CI replays
//! the corpus on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../check/luks_header.rs"]
mod check;

fuzz_target!(|data: &[u8]| {
    check::fuzz_one(data);
});
