//! Replays the committed cargo-fuzz corpora (and any committed crash regressions) through
//! the same checks as the targets in `fuzz/fuzz_targets/` (snapshot_store, tar_stream,
//! erofs_xattr, luks_header), on the stable toolchain, so CI exercises every input the fuzzer found
//! interesting without nightly or cargo-fuzz.

use std::path::{Path, PathBuf};

#[path = "../../fuzz/check/snapshot_store.rs"]
mod check;
#[path = "../../fuzz/check/erofs_xattr.rs"]
mod check_erofs_xattr;
#[path = "../../fuzz/check/luks_header.rs"]
mod check_luks_header;
#[path = "../../fuzz/check/tar_stream.rs"]
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

#[test]
fn luks_header_corpus_and_regressions() {
    replay("luks_header", check_luks_header::fuzz_one);
}

/// The seeds made by cryptsetup 2.6 (pbkdf2 and argon2i/argon2id, 256- and
/// 512-bit keys, 512- and 4096-byte sectors) and by livestick still open with
/// the hardened reader, so the fuzzer starts from headers that reach the keyslot
/// and data paths.
#[test]
fn luks_header_seeds_open() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/luks_header");
    let seeds = [
        "cryptsetup-a",
        "cryptsetup-b",
        "cryptsetup-c",
        "cryptsetup-d",
        "livestick-pbkdf2",
        "livestick-argon2id",
    ];
    for name in seeds {
        let data = std::fs::read(dir.join(name)).unwrap();
        let r = livestick::persist::luks::open_luks2(std::io::Cursor::new(data), b"pw");
        assert!(r.is_ok(), "{name}: {:?}", r.err());
    }
}

/// Writes the livestick-made seeds of `fuzz/corpus/luks_header` (the
/// cryptsetup-made ones come from `cryptsetup luksFormat`, see fuzz/README.md):
/// `cargo test --test fuzz_corpus write_luks_header_seeds -- --ignored`.
///
/// A container as `format_luks2` writes it is 16 MiB before its first data
/// byte, too big to fuzz; the seeds keep its headers and keyslot and move the
/// data segment right after the keyslot area (JSON and checksums rewritten),
/// so they still open with `pw`. One more is the plain first 64 KiB.
#[test]
#[ignore]
fn write_luks_header_seeds() {
    use livestick::persist::luks::{LuksParams, PbkdfKind, format_luks2};
    use sha2::{Digest, Sha256};
    use std::io::Cursor;

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/luks_header");
    std::fs::create_dir_all(&dir).unwrap();
    let pbkdf2 = LuksParams {
        pbkdf: PbkdfKind::Pbkdf2,
        force_iterations: Some(1000),
        sector_size: 512,
        ..LuksParams::default()
    };
    let argon2 = LuksParams {
        memory_kib: 32,
        ..LuksParams::insecure_fast()
    };
    for (name, params) in [("livestick-pbkdf2", pbkdf2), ("livestick-argon2id", argon2)] {
        let plain: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let mut out = Cursor::new(Vec::new());
        format_luks2(&mut plain.as_slice(), 8192, &mut out, b"pw", &params).unwrap();
        let full = out.into_inner();
        if name == "livestick-pbkdf2" {
            std::fs::write(dir.join("livestick-truncated-64k"), &full[..65536]).unwrap();
        }
        // Headers (2 × 16 KiB) and the 252 KiB keyslot area, then the data.
        let meta_end = 32768 + 258048;
        let data_offset = livestick::persist::luks::DATA_OFFSET as usize;
        let mut small = full[..meta_end].to_vec();
        small.extend_from_slice(&full[data_offset..]);
        for hdr in [0usize, 16384] {
            let area = &mut small[hdr + 4096..hdr + 16384];
            let end = area.iter().position(|&b| b == 0).unwrap();
            let mut json: serde_json::Value = serde_json::from_slice(&area[..end]).unwrap();
            json["segments"]["0"]["offset"] = meta_end.to_string().into();
            json["config"]["keyslots_size"] = "258048".into();
            let text = serde_json::to_vec(&json).unwrap();
            area.fill(0);
            area[..text.len()].copy_from_slice(&text);
            small[hdr + 448..hdr + 512].fill(0);
            let sum = Sha256::digest(&small[hdr..hdr + 16384]);
            small[hdr + 448..hdr + 480].copy_from_slice(&sum);
        }
        std::fs::write(dir.join(name), &small).unwrap();
    }
}
