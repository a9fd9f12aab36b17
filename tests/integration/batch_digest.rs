//! A batch hashes each ISO file once, in the reader every target shares, instead of
//! once per target: the sha256 each stick's manifest gives for a copied file is still
//! that of the bytes on that stick (read back with mtools) and the one a single write
//! gives.

use std::collections::BTreeMap;
use std::path::Path;

use crate::support::dm_snapshot::sha256_hex;
use crate::support::*;

/// Copied files of the stick's manifest: path → sha256.
fn copied_digests(image: &Path) -> BTreeMap<String, String> {
    let text = String::from_utf8(fat_read(image, part_start(image), "LiveOS/livestick.json"))
        .expect("the manifest is UTF-8");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("the manifest is JSON");
    doc["files"]
        .as_array()
        .expect("the manifest lists files")
        .iter()
        .filter(|f| f["kind"] == "copied")
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_string(),
                f["sha256"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn a_batch_reports_the_digest_of_what_each_stick_holds() {
    if !need("mtype") {
        return;
    }
    let dir = tmp();
    let iso = synthetic_iso("fedora42.iso");
    let single = sparse(dir.path(), "single.img", 1 << 30);
    let batch: Vec<_> = (0..3)
        .map(|i| sparse(dir.path(), &format!("batch{i}.img"), 1 << 30))
        .collect();
    ok(&livestick(&[
        "write",
        iso.to_str().unwrap(),
        single.to_str().unwrap(),
        "--yes",
    ]));
    let mut args = vec!["write", iso.to_str().unwrap()];
    args.extend(batch.iter().map(|b| b.to_str().unwrap()));
    args.push("--yes");
    ok(&livestick(&args));

    let expected = copied_digests(&single);
    assert!(
        expected.contains_key("/LiveOS/squashfs.img"),
        "{expected:?}"
    );
    for stick in &batch {
        let got = copied_digests(stick);
        assert_eq!(got, expected, "{}", stick.display());
        for (path, sha) in &got {
            let bytes = fat_read(stick, part_start(stick), path.trim_start_matches('/'));
            assert_eq!(&sha256_hex(&bytes), sha, "{path} on {}", stick.display());
        }
    }
}
