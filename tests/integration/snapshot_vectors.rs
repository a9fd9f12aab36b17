//! Every check in `fixtures/dm-snapshot/checks.json` (made by the real kernel) run against
//! `livestick::persist::snapshot`. A new vector added to checks.json is covered without
//! touching this file; an unknown check kind fails the test instead of being skipped.

use std::io::Cursor;

use crate::support::dm_snapshot::*;
use livestick::persist::snapshot::{
    self, Header, Opened, SnapshotError, Store, create_new_store, merge_in_place, open_store,
    recover_invalid,
};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn checks() -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures().join("checks.json")).expect("checks.json");
    serde_json::from_str::<Vec<Value>>(&text).expect("checks.json is a list")
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("field {key} missing in {v}"))
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("field {key} missing in {v}"))
}

fn cow_file(case: &str, name: &str) -> Vec<u8> {
    load_zst(&fixtures().join(case).join(name))
}

/// The origin a check runs over: the generated pattern, or for checks after a merge, the
/// merged origin, produced by our own merge of that case's `merge` check (and verified
/// against the sha256 the kernel left).
fn origin_for(all: &[Value], check: &Value) -> Vec<u8> {
    let o = &check["origin"];
    let origin = if o.get("generator").is_some() {
        make_origin(u(o, "sectors"), u(o, "seed"))
    } else {
        let case = s(check, "case");
        let m = all
            .iter()
            .find(|c| s(c, "case") == case && s(c, "check") == "merge")
            .unwrap_or_else(|| panic!("{case}: no merge check to build the merged origin"));
        let mut origin = make_origin(u(&m["origin"], "sectors"), u(&m["origin"], "seed"));
        let cow = cow_file(case, s(m, "cow"));
        let len = cow.len() as u64;
        let mut cow = Cursor::new(cow);
        if let Ok(Opened::Valid(store)) = open_store(&mut cow, len) {
            let olen = origin.len() as u64;
            merge_in_place(
                &mut cow,
                &store,
                &mut Cursor::new(&mut origin),
                olen,
                &mut |_, _| {},
            )
            .expect("merge for the merged origin");
        }
        origin
    };
    assert_eq!(sha256_hex(&origin), s(o, "sha256"), "origin of {check}");
    origin
}

/// The sha256 of the snapshot view, or the error a view is refused with.
fn view_sha(origin: &[u8], cow: &[u8]) -> Result<String, SnapshotError> {
    let mut c = Cursor::new(cow);
    match open_store(&mut c, cow.len() as u64)? {
        Opened::Uninitialised { .. } => Ok(sha256_hex(origin)),
        Opened::Invalid { .. } => Err(SnapshotError::Invalid),
        Opened::Valid(store) => {
            let mut h = HashWriter(Sha256::new());
            snapshot::write_view(
                &mut Cursor::new(origin),
                origin.len() as u64,
                &mut c,
                &store,
                &mut h,
                &mut |_, _| {},
            )?;
            Ok(hex(&h.0.finalize()))
        }
    }
}

struct HashWriter(Sha256);
impl std::io::Write for HashWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.update(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn status_of(cow: &[u8], origin_sectors: u64) -> Result<String, SnapshotError> {
    let r = snapshot::status(
        &mut Cursor::new(cow),
        cow.len() as u64,
        8,
        Some(origin_sectors),
    )?;
    Ok(r.dm_status)
}

fn expect_status_and_view(what: &str, check: &Value, origin: &[u8], cow: &[u8]) {
    let want = s(check, "expect_status");
    if want == "REFUSED" {
        assert!(
            status_of(cow, origin.len() as u64 / 512).is_err(),
            "{what}: the kernel refused this store, we accepted it"
        );
        return;
    }
    assert_eq!(
        status_of(cow, origin.len() as u64 / 512).expect(what),
        want,
        "{what}: status"
    );
    match check["expect_view_sha256"].as_str() {
        Some("ERROR") | None if want == "Invalid" => {
            assert!(
                matches!(view_sha(origin, cow), Err(SnapshotError::Invalid)),
                "{what}: view of an Invalid store must fail"
            );
        }
        Some(sha) => assert_eq!(view_sha(origin, cow).expect(what), sha, "{what}: view"),
        None => {}
    }
}

fn run_check(all: &[Value], check: &Value) {
    let case = s(check, "case");
    let kind = s(check, "check");
    let what = format!("{case}/{kind}/{}", check["cow"].as_str().unwrap_or("-"));
    match kind {
        "status+view" => {
            let cow = cow_file(case, s(check, "cow"));
            assert_eq!(sha256_hex(&cow), s(check, "cow_sha256"), "{what}: cow sha");
            assert_eq!(cow.len() as u64, u(check, "cow_sectors") * 512);
            let origin = origin_for(all, check);
            expect_status_and_view(&what, check, &origin, &cow);
        }
        "merge" => {
            let mut origin = origin_for(all, check);
            let mut cow = cow_file(case, s(check, "cow"));
            let len = cow.len() as u64;
            let olen = origin.len() as u64;
            let opened = open_store(&mut Cursor::new(&cow), len).expect(&what);
            let result = match opened {
                Opened::Valid(store) => merge_in_place(
                    &mut Cursor::new(&mut cow),
                    &store,
                    &mut Cursor::new(&mut origin),
                    olen,
                    &mut |_, _| {},
                ),
                Opened::Invalid { .. } => Err(SnapshotError::Invalid),
                Opened::Uninitialised { .. } => Ok(0),
            };
            if check["merge_refused"].as_bool() == Some(true) {
                assert!(
                    matches!(result, Err(SnapshotError::Invalid)),
                    "{what}: must refuse"
                );
            } else {
                result.expect(&what);
            }
            assert_eq!(
                sha256_hex(&origin),
                s(check, "expect_merged_origin_sha256"),
                "{what}: merged origin"
            );
            assert_eq!(
                sha256_hex(&cow),
                s(check, "expect_cow_after_sha256"),
                "{what}: overlay after the merge"
            );
            let final_status = s(check, "expect_final_merge_status");
            assert_eq!(
                status_of(&cow, olen / 512).expect(&what),
                final_status,
                "{what}: status after merge"
            );
            if let Some(f) = check["expect_cow_after_file"].as_str() {
                assert_eq!(cow, cow_file(case, f), "{what}: overlay bytes");
            }
        }
        "recover" => {
            let input = &check["cow_input"];
            let mut cow = cow_file(case, s(input, "derived_from"));
            let len = cow.len() as u64;
            let origin = origin_for(all, check);
            let report = recover_invalid(
                &mut Cursor::new(&mut cow),
                len,
                Some(origin.len() as u64 / 512),
                false,
            )
            .expect(&what);
            assert!(report.was_invalid && report.changed, "{what}");
            assert_eq!(report.dm_status_after, s(check, "expect_status"));
            assert_eq!(
                sha256_hex(&cow),
                s(input, "sha256"),
                "{what}: recovered bytes"
            );
            expect_status_and_view(&what, check, &origin, &cow);
        }
        "header-variant" => {
            let base = s(check, "base_cow")
                .split_whitespace()
                .next()
                .expect("base cow name");
            let mut cow = cow_file(case, base);
            let h = &check["header"];
            let header = Header {
                magic: u(h, "magic") as u32,
                valid: u(h, "valid") as u32,
                version: u(h, "version") as u32,
                chunk_sectors: u(h, "chunk_size") as u32,
            };
            cow[..16].copy_from_slice(&header.to_bytes());
            cow[16..512].fill(0);
            let origin = origin_for(all, check);
            let what = format!("{what}/{}", s(check, "variant"));
            expect_status_and_view(&what, check, &origin, &cow);
        }
        other => panic!("{case}: unknown check kind {other:?}; teach this test about it"),
    }
}

#[test]
fn every_kernel_check_passes() {
    let all = checks();
    assert!(all.len() >= 32, "checks.json shrank");
    for check in &all {
        run_check(&all, check);
    }
}

/// `apply_exceptions` (used by the LiveOS merge) gives the kernel's merged origin and
/// leaves the overlay untouched.
#[test]
fn apply_exceptions_matches_kernel_merge_and_keeps_overlay() {
    let all = checks();
    for check in all.iter().filter(|c| s(c, "check") == "merge") {
        let case = s(check, "case");
        let mut origin = origin_for(&all, check);
        let cow = cow_file(case, s(check, "cow"));
        let mut c = Cursor::new(&cow[..]);
        let Opened::Valid(store) = open_store(&mut c, cow.len() as u64).unwrap() else {
            continue;
        };
        let olen = origin.len() as u64;
        snapshot::apply_exceptions(
            &mut c,
            &store,
            &mut Cursor::new(&mut origin),
            olen,
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(
            sha256_hex(&origin),
            s(check, "expect_merged_origin_sha256"),
            "{case}"
        );
        // The overlay was only ever reachable through a read-only `Cursor<&[u8]>`.
    }
}

/// Growing keeps every exception and the view; only `total` changes.
#[test]
fn grow_keeps_the_view() {
    let all = checks();
    for check in all.iter().filter(|c| s(c, "check") == "status+view") {
        if s(check, "expect_status") == "Invalid" {
            continue;
        }
        let case = s(check, "case");
        let mut cow = cow_file(case, s(check, "cow"));
        let origin = origin_for(&all, check);
        let before = view_sha(&origin, &cow).unwrap();
        let plan = snapshot::plan_grow(
            cow.len() as u64,
            cow.len() as u64 + (1 << 20),
            8,
            snapshot::FAT_MAX_FILE_BYTES,
        )
        .unwrap();
        let old_len = cow.len() as u64;
        snapshot::extend_with_zeros(
            &mut Cursor::new(&mut cow),
            old_len,
            plan.new_bytes,
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(cow.len() as u64, plan.new_bytes);
        assert_eq!(view_sha(&origin, &cow).unwrap(), before, "{case}");
        let st = status_of(&cow, origin.len() as u64 / 512).unwrap();
        let old = s(check, "expect_status");
        let (alloc, rest) = old.split_once('/').unwrap();
        let meta = rest.split_once(' ').unwrap().1;
        assert_eq!(
            st,
            format!("{alloc}/{} {meta}", plan.new_bytes / 512),
            "{case}"
        );
    }
}

/// A store created by us is byte-identical to the one the kernel initialises from a
/// zeroed magic (`crafted-header-variants`, variant `magic0`, last in its run).
#[test]
fn create_new_store_matches_the_kernel() {
    let kernel = cow_file("crafted-header-variants", "cow-final.img.zst");
    let mut ours = Cursor::new(vec![0xEEu8; kernel.len()]);
    create_new_store(&mut ours, kernel.len() as u64, 8).unwrap();
    let ours = ours.into_inner();
    assert_eq!(ours[..8192], kernel[..8192]);
    assert!(
        ours[8192..].iter().all(|&b| b == 0xEE),
        "nothing past area 0 is written"
    );
}

/// The kernel's own write sequences, replayed through our user-space writer onto a
/// zeroed overlay, give the kernel's overlay file byte for byte.
#[test]
fn replayed_kernel_writes_give_the_kernel_overlay() {
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "p8-basic",
            &["run-wres-a.txt", "run-wres-b.txt"],
            "cow-final.img.zst",
        ),
        (
            "po8-liveos",
            &["run-wres-a.txt", "run-wres-b.txt"],
            "cow-final.img.zst",
        ),
        (
            "p16-merge",
            &["run-wres-a.txt", "run-wres-b.txt"],
            "cow-before-merge.img.zst",
        ),
        (
            "p8-multiarea-merge",
            &[
                "run-wres-b1.txt",
                "run-wres-b2.txt",
                "run-wres-b3.txt",
                "run-wres-b4.txt",
            ],
            "cow-before-merge.img.zst",
        ),
        (
            "p8-area-exact-reopen",
            &["run-wres-b1.txt", "run-wres-b2.txt"],
            "cow-area0-full.img.zst",
        ),
        (
            "p8-area-exact-reopen",
            &["run-wres-b1.txt", "run-wres-b2.txt", "reopen-wres-p2.txt"],
            "cow-final.img.zst",
        ),
    ];
    for (case, scripts, expect) in cases {
        let info: Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join(case).join("case.json")).unwrap(),
        )
        .unwrap();
        let chunk = u(&info, "chunk") as u32;
        let origin = make_origin(u(&info, "origin_sectors"), u(&info, "seed"));
        let cow_len = u(&info, "cow_sectors") * 512;
        let mut cow = Cursor::new(vec![0u8; cow_len as usize]);
        create_new_store(&mut cow, cow_len, chunk).unwrap();
        let Opened::Valid(store) = open_store(&mut cow, cow_len).unwrap() else {
            panic!("fresh store")
        };
        let mut w = snapshot::CowWriter::new(*store, origin.len() as u64).unwrap();
        let mut o = Cursor::new(&origin[..]);
        for script in *scripts {
            for (lba, count, wid, ok) in read_write_results(&fixtures().join(case).join(script)) {
                assert!(ok, "{case}: only fully successful runs are replayed");
                w.write_at(&mut o, &mut cow, lba * 512, &write_data(lba, count, wid))
                    .unwrap();
            }
        }
        let kernel = cow_file(case, expect);
        assert!(
            cow.get_ref()[..] == kernel[..],
            "{case}: {expect} differs from the replay"
        );
        let _: &Store = w.store();
    }
}
