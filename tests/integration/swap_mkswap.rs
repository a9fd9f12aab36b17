//! swap.img against the real util-linux tools: `blkid` and `swaplabel`
//! recognise ours, and its signature page is byte for byte what `mkswap`
//! writes for the same size, label and UUID.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use crate::support::{c_locale_output as run, installed as tool};
use livestick::persist::swap::{read_swap_header, write_swap_image};

const UUID: &str = "01234567-89ab-cdef-0123-456789abcdef";

fn ours(dir: &Path, size: u64, label: Option<&str>) -> PathBuf {
    let p = dir.join("swap.img");
    let mut f = File::create(&p).unwrap();
    write_swap_image(&mut f, size, label, Some(UUID.parse().unwrap())).unwrap();
    p
}

#[test]
fn blkid_and_swaplabel_recognise_ours() {
    let (Some(blkid), Some(swaplabel)) = (tool("blkid"), tool("swaplabel")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let p = ours(dir.path(), 8 << 20, Some("LIVESWAP"));
    assert_eq!(fs::metadata(&p).unwrap().len(), 8 << 20);
    let out = run(&blkid, &["-p", "-o", "export", p.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "TYPE=swap",
        "VERSION=1",
        "LABEL=LIVESWAP",
        &format!("UUID={UUID}"),
    ] {
        assert!(text.contains(want), "blkid lacks {want}: {text}");
    }
    let out = run(&swaplabel, &[p.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("LABEL: LIVESWAP"), "{text}");
    assert!(text.contains(&format!("UUID:  {UUID}")), "{text}");
}

#[test]
fn signature_page_equals_mkswap() {
    let Some(mkswap) = tool("mkswap") else { return };
    for (size, label) in [(1u64 << 20, Some("MYSWAP")), (64 << 20, None)] {
        let dir = tempfile::tempdir().unwrap();
        let theirs = dir.path().join("theirs.img");
        File::create(&theirs).unwrap().set_len(size).unwrap();
        let mut args = vec!["-U", UUID];
        if let Some(l) = label {
            args.extend(["-L", l]);
        }
        let t = theirs.to_str().unwrap();
        args.push(t);
        let out = run(&mkswap, &args);
        assert!(out.status.success(), "{out:?}");
        let p = ours(dir.path(), size, label);
        let a = fs::read(&theirs).unwrap();
        let b = fs::read(&p).unwrap();
        assert_eq!(a.len(), b.len());
        assert!(
            a[..4096] == b[..4096],
            "signature page differs from mkswap's"
        );
        assert!(a == b, "swap image differs from mkswap's");
        let info = read_swap_header(&a).unwrap();
        assert_eq!(info.last_page as u64, size / 4096 - 1);
        assert_eq!(info.label, label.unwrap_or(""));
    }
}
