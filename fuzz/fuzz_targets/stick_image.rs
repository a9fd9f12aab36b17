//! cargo-fuzz target: arbitrary bytes as a sparse stick image (partition
//! table, FAT, LiveOS tree). The checks live in `../check/stick_image.rs`,
//! shared with `tests/fuzz_corpus.rs` so CI replays the corpus on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../check/stick_image.rs"]
mod check;

fuzz_target!(|data: &[u8]| {
    check::fuzz_one(data);
});
