//! cargo-fuzz target: arbitrary bytes through `persist::erofs::xattr`. The checks live in
//! `../check/erofs_xattr.rs`, shared with `tests/integration/fuzz_corpus.rs` so CI replays the corpus on
//! stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../check/erofs_xattr.rs"]
mod check;

fuzz_target!(|data: &[u8]| {
    check::fuzz_one(data);
});
