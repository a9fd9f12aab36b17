//! Checks for one fuzz input of `persist::tar_stream`, shared by the cargo-fuzz target
//! and `tests/integration/fuzz_corpus.rs`.
//!
//! Arbitrary bytes as a tar stream: reading never panics, and every member read (with
//! its data) survives a write and a second read unchanged.

use livestick::persist::tar_stream::{TarEntry, TarReader, TarWriter};

pub fn fuzz_one(data: &[u8]) {
    let mut r = TarReader::new(data);
    let mut members: Vec<(TarEntry, Vec<u8>)> = Vec::new();
    while let Ok(Some(e)) = r.next_entry() {
        let mut body = Vec::new();
        if r.copy_data(&mut body).is_err() {
            break;
        }
        members.push((e, body));
        if members.len() > 10_000 {
            break;
        }
    }
    let mut w = TarWriter::new(Vec::new());
    let mut written = Vec::new();
    for (e, body) in &members {
        if w.append(e, Some(&mut body.as_slice())).is_ok() {
            written.push((e.clone(), body.clone()));
        } else {
            // A refused member leaves nothing behind only if it failed before its
            // header; the writer refuses before writing, so stop comparing here.
            break;
        }
    }
    let bytes = w.finish().expect("writing to memory");
    let mut back = TarReader::new(bytes.as_slice());
    for (want, body) in &written {
        let got = back
            .next_entry()
            .expect("our own stream reads back")
            .expect("every member written is read back");
        let mut data = Vec::new();
        back.copy_data(&mut data).expect("its data reads back");
        assert_eq!(&got, want);
        assert_eq!(&data, body);
    }
    assert!(matches!(back.next_entry(), Ok(None)));
}
