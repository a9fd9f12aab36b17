//! Property tests for the user-space copy-on-write writer: random writes through the
//! overlay, read back through the snapshot view, equal the same writes on a plain copy;
//! and a store that runs full stays loadable and valid (never the kernel's trap).

use std::io::Cursor;

use livestick::persist::snapshot::{
    CowWriter, Opened, SnapshotError, create_new_store, open_store, write_view,
};
use proptest::prelude::*;

fn origin_of(sectors: u64) -> Vec<u8> {
    (0..sectors * 512)
        .map(|i| (i / 512 % 251) as u8 ^ (i % 512) as u8)
        .collect()
}

fn fresh(cow_len: u64, chunk: u32) -> (Cursor<Vec<u8>>, Box<livestick::persist::snapshot::Store>) {
    let mut cow = Cursor::new(vec![0x5Au8; cow_len as usize]);
    create_new_store(&mut cow, cow_len, chunk).expect("create");
    match open_store(&mut cow, cow_len).expect("open") {
        Opened::Valid(s) => (cow, s),
        other => panic!("fresh store opened as {other:?}"),
    }
}

fn view(origin: &[u8], cow: &mut Cursor<Vec<u8>>) -> Vec<u8> {
    let len = cow.get_ref().len() as u64;
    let Opened::Valid(store) = open_store(cow, len).expect("reload") else {
        panic!("store no longer valid")
    };
    store
        .validate(Some(origin.len() as u64 / 512))
        .expect("valid after writes");
    let mut out = Vec::new();
    write_view(
        &mut Cursor::new(origin),
        origin.len() as u64,
        cow,
        &store,
        &mut out,
        &mut |_, _| {},
    )
    .expect("view");
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn writes_through_the_overlay_equal_writes_on_a_copy(
        chunk_log in 0u32..4,
        origin_sectors in 1u64..300,
        writes in prop::collection::vec((0u64..1_000_000, 1u64..5000, any::<u8>()), 1..60),
    ) {
        let chunk = 1u32 << chunk_log;
        let origin = origin_of(origin_sectors);
        let origin_chunks = origin_sectors.div_ceil(u64::from(chunk));
        // Room for every origin chunk plus the metadata areas and one spare area.
        let epa = u64::from(chunk) * 32;
        let cow_chunks = 2 + origin_chunks + origin_chunks / epa + 2;
        let (mut cow, store) = fresh(cow_chunks * u64::from(chunk) * 512, chunk);
        let mut w = CowWriter::new(*store, origin.len() as u64).unwrap();
        let mut plain = origin.clone();
        let mut o = Cursor::new(&origin[..]);
        for (off, len, fill) in writes {
            let off = off % plain.len() as u64;
            let len = len.min(plain.len() as u64 - off);
            let data = vec![fill; len as usize];
            w.write_at(&mut o, &mut cow, off, &data).unwrap();
            plain[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        prop_assert!(view(&origin, &mut cow) == plain);
    }

    #[test]
    fn a_full_store_stays_loadable(
        cow_chunks in 3u64..80,
        writes in prop::collection::vec(0u64..200, 1..120),
    ) {
        // chunk 1 sector: 32 entries per area, so area ends and the trap come up often.
        let origin = origin_of(200);
        let (mut cow, store) = fresh(cow_chunks * 512, 1);
        let mut w = CowWriter::new(*store, origin.len() as u64).unwrap();
        let mut plain = origin.clone();
        let mut o = Cursor::new(&origin[..]);
        for sector in writes {
            let data = vec![0xC3u8; 512];
            match w.write_at(&mut o, &mut cow, sector * 512, &data) {
                Ok(()) => plain[(sector * 512) as usize..][..512].copy_from_slice(&data),
                Err(SnapshotError::StoreFull { .. } | SnapshotError::AreaTrap { .. }) => {}
                Err(e) => panic!("unexpected {e}"),
            }
        }
        prop_assert!(view(&origin, &mut cow) == plain);
    }
}
