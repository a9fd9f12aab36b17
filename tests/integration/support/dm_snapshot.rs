//! Shared helpers for the overlay tests: the kernel vectors in `fixtures/dm-snapshot/`,
//! their deterministic sector patterns (described in that folder's README), and hashing.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/dm-snapshot")
}

/// Decompresses a `.zst` fixture.
pub fn load_zst(path: &Path) -> Vec<u8> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut dec = ruzstd::decoding::StreamingDecoder::new(file)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    dec.read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    out
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One 512-byte sector of the vectors' text pattern: 16 records of 32 bytes, each
/// `<tag><id:05> lba<lba:010> r<k:02>` padded with spaces to 31 bytes and a newline.
pub fn pattern_sector(tag: char, id: u64, lba: u64, out: &mut [u8]) {
    for k in 0..16 {
        let rec = format!("{tag}{id:05} lba{lba:010} r{k:02}");
        let slot = &mut out[k * 32..(k + 1) * 32];
        slot.fill(b' ');
        slot[..rec.len()].copy_from_slice(rec.as_bytes());
        slot[31] = b'\n';
    }
}

/// An origin as `vectools.py origin SECTORS SEED` describes it.
pub fn make_origin(sectors: u64, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; (sectors * 512) as usize];
    for (lba, s) in v.chunks_exact_mut(512).enumerate() {
        pattern_sector('O', seed, lba as u64, s);
    }
    v
}

/// The bytes the guest's writer put down for `w LBA COUNT WID`.
pub fn write_data(lba: u64, count: u64, wid: u64) -> Vec<u8> {
    let mut v = vec![0u8; (count * 512) as usize];
    for (i, s) in v.chunks_exact_mut(512).enumerate() {
        pattern_sector('W', wid, lba + i as u64, s);
    }
    v
}

/// `w LBA COUNT WID ok|err ...` lines of a results file: (lba, count, wid, ok).
pub fn read_write_results(path: &Path) -> Vec<(u64, u64, u64, bool)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter(|l| l.starts_with("w "))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let n = |i: usize| f[i].parse::<u64>().expect("number in write script");
            (n(1), n(2), n(3), f.get(4) == Some(&"ok"))
        })
        .collect()
}

/// What a boot leaves in a dm-snapshot overlay `cow` (`len` bytes), wherever it
/// lies (a FAT file, a file of the ext4 live partition): the kernel initialises a
/// new store, then the live system changes three chunks of a 4 MiB root. Returns
/// the chunks changed.
pub fn boot_and_change<F>(cow: &mut F, len: u64) -> u64
where
    F: std::io::Read + std::io::Write + std::io::Seek + livestick::io::SyncData,
{
    use livestick::persist::snapshot::{self, CowWriter, Opened};
    use std::io::Cursor;
    const MIB: u64 = 1 << 20;
    if let Opened::Uninitialised { .. } = snapshot::open_store(cow, len).expect("a store") {
        snapshot::create_new_store(cow, len, 8).expect("initialises");
    }
    let Opened::Valid(store) = snapshot::open_store(cow, len).expect("a store") else {
        panic!("the store is not valid after initialising it")
    };
    let origin = vec![0u8; 4 * MIB as usize];
    let mut writer = CowWriter::new(*store, origin.len() as u64).expect("a writer");
    for at in [0u64, MIB, 3 * MIB] {
        writer
            .write_at(
                &mut Cursor::new(&origin),
                cow,
                at,
                b"changed by the live system",
            )
            .expect("writes a chunk");
    }
    writer.store().exceptions.len() as u64
}
