//! Replays the committed cargo-fuzz corpora (and any committed crash regressions) through
//! the same checks as the targets in `fuzz/fuzz_targets/` (snapshot_store, tar_stream,
//! erofs_xattr), on the stable toolchain, so CI exercises every input the fuzzer found
//! interesting without nightly or cargo-fuzz.

use std::path::{Path, PathBuf};

#[path = "../fuzz/check/snapshot_store.rs"]
mod check;
#[path = "../fuzz/check/erofs_xattr.rs"]
mod check_erofs_xattr;
#[path = "../fuzz/check/tar_stream.rs"]
mod check_tar_stream;

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

#[test]
fn snapshot_store_corpus_and_regressions() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let corpus = inputs(&root.join("corpus/snapshot_store"));
    // The corpus is committed; an empty one means the path moved, not that all is well.
    assert!(!corpus.is_empty(), "no corpus under {}", root.display());
    // Only the committed, minimised crashes; fresh `crash-*` files stay local.
    let regressions: Vec<PathBuf> = inputs(&root.join("artifacts/snapshot_store"))
        .into_iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("regression-"))
        })
        .collect();
    for path in corpus.iter().chain(&regressions) {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // A panic names the input, so a CI failure can be replayed with `cargo fuzz run`.
        let name = path.display().to_string();
        let r = std::panic::catch_unwind(|| check::fuzz_one(&data));
        assert!(r.is_ok(), "fuzz check failed on {name}");
    }
}

fn replay(target: &str, check: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let corpus = inputs(&root.join("corpus").join(target));
    assert!(!corpus.is_empty(), "no corpus for {target}");
    let regressions = inputs(&root.join("artifacts").join(target))
        .into_iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("regression-"))
        });
    for path in corpus.iter().cloned().chain(regressions) {
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let r = std::panic::catch_unwind(|| check(&data));
        assert!(r.is_ok(), "fuzz check failed on {}", path.display());
    }
}

#[test]
fn tar_stream_corpus_and_regressions() {
    replay("tar_stream", check_tar_stream::fuzz_one);
}

#[test]
fn erofs_xattr_corpus_and_regressions() {
    replay("erofs_xattr", check_erofs_xattr::fuzz_one);
}
