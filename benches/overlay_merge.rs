//! Overlay merge throughput, measured against baselines in the same run (not a test):
//!
//!   cargo bench --bench overlay_merge            # 256 MiB origin
//!   LIVESTICK_BENCH_MIB=2048 cargo bench --bench overlay_merge
//!
//! 1. `write_view` (origin + overlay → merged image) against `cp` of the same origin:
//!    the ratio is merge throughput / cp throughput (goal ≥ 0.8).
//! 2. A whole LiveOS merge (extract, apply, build, stage, verify, swap, reset; no fsck)
//!    against `mksquashfs` run directly on a tree holding the merged image.
//! 3. An OverlayFS merge into a flat squashfs (sqfs2tar → upper applied → tar2sqfs,
//!    then stage, verify, swap, reset) against `mksquashfs` run directly on the merged
//!    tree, same compressor.

use std::io::{Cursor, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use livestick::persist::merge::{self, MergeRequest};
use livestick::persist::snapshot::{self, CowWriter, Opened};

const CHUNK: u64 = 4096;

fn mib() -> u64 {
    std::env::var("LIVESTICK_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

fn time(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

fn drop_caches_hint(p: &Path) {
    // Best effort: both sides get the same (warm) page cache; say so in the output.
    let _ = std::fs::File::open(p).and_then(|f| f.sync_all());
}

fn main() {
    let size = mib() << 20;
    let dir = tempfile::tempdir_in(std::env::var("TMPDIR").unwrap_or("/var/tmp".into()))
        .expect("temp dir");
    let d = dir.path();
    // Origin: pseudo-random bytes (compressible neither by cp nor by us).
    let origin = d.join("rootfs.img");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&origin).unwrap());
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..mib() {
            for b in buf.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&buf).unwrap();
        }
    }
    // Overlay: 10 % of the chunks changed, spread over the image.
    let chunks = size / CHUNK;
    let changed = chunks / 10;
    let cow_len = (changed + changed / 256 + 64) * CHUNK;
    let mut cow = Cursor::new(vec![0u8; cow_len as usize]);
    snapshot::create_new_store(&mut cow, cow_len, 8).unwrap();
    let Opened::Valid(store) = snapshot::open_store(&mut cow, cow_len).unwrap() else {
        panic!("new store")
    };
    let mut w = CowWriter::new(*store, size).unwrap();
    let mut o = std::fs::File::open(&origin).unwrap();
    let data = vec![0x5au8; CHUNK as usize];
    for i in 0..changed {
        w.write_at(&mut o, &mut cow, (i * 10) * CHUNK, &data)
            .unwrap();
    }
    let overlay = d.join("overlay");
    std::fs::write(&overlay, cow.into_inner()).unwrap();

    // 1. write_view vs cp
    let cp_out = d.join("cp.img");
    drop_caches_hint(&origin);
    let t_cp = time(|| {
        let s = Command::new("cp")
            .arg(&origin)
            .arg(&cp_out)
            .status()
            .unwrap();
        assert!(s.success());
        std::fs::File::open(&cp_out).unwrap().sync_all().unwrap();
    });
    std::fs::remove_file(&cp_out).unwrap();
    let merged = d.join("merged.img");
    let t_merge = time(|| {
        let mut ov = std::fs::File::open(&overlay).unwrap();
        let ov_len = ov.metadata().unwrap().len();
        let Opened::Valid(store) = snapshot::open_store(&mut ov, ov_len).unwrap() else {
            panic!()
        };
        let mut o = std::fs::File::open(&origin).unwrap();
        let mut out =
            std::io::BufWriter::with_capacity(4 << 20, std::fs::File::create(&merged).unwrap());
        snapshot::write_view(&mut o, size, &mut ov, &store, &mut out, &mut |_, _| {}).unwrap();
        out.into_inner().unwrap().sync_all().unwrap();
    });
    let mbps = |t: Duration| size as f64 / (1 << 20) as f64 / t.as_secs_f64();
    println!(
        "origin {} MiB, {} of {} chunks in the overlay (warm page cache for both)",
        mib(),
        changed,
        chunks
    );
    println!(
        "cp                {:>8.1} MiB/s  ({:.2?})",
        mbps(t_cp),
        t_cp
    );
    println!(
        "merge (view)      {:>8.1} MiB/s  ({:.2?})",
        mbps(t_merge),
        t_merge
    );
    println!(
        "ratio merge/cp    {:>8.2}  (goal >= 0.80)",
        t_cp.as_secs_f64() / t_merge.as_secs_f64()
    );

    // 2. whole LiveOS merge vs mksquashfs directly on the same tree
    if [livestick::tools::MKSQUASHFS, livestick::tools::UNSQUASHFS]
        .iter()
        .any(|t| livestick::tools::find_program(t).is_err())
    {
        println!("mksquashfs/unsquashfs missing: recompression comparison skipped");
        return;
    }
    let tree = d.join("tree/LiveOS");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::rename(&merged, tree.join("rootfs.img")).unwrap();
    let direct = d.join("direct.sqfs");
    let args = ["-comp", "gzip", "-noappend", "-no-progress", "-quiet"];
    let t_direct = time(|| {
        let s = Command::new("mksquashfs")
            .arg(d.join("tree"))
            .arg(&direct)
            .args(args)
            .status()
            .unwrap();
        assert!(s.success());
    });
    // The LiveOS pair: squashfs.img of the original origin + the overlay.
    let live = d.join("stick/LiveOS");
    std::fs::create_dir_all(&live).unwrap();
    std::fs::copy(&origin, tree.join("rootfs.img")).unwrap();
    let sq = live.join("squashfs.img");
    let s = Command::new("mksquashfs")
        .arg(d.join("tree"))
        .arg(&sq)
        .args(args)
        .status()
        .unwrap();
    assert!(s.success());
    std::fs::remove_dir_all(d.join("tree")).unwrap();
    std::fs::copy(&overlay, live.join("overlay-B-0000-0000")).unwrap();
    let work = d.join("work");
    std::fs::create_dir_all(&work).unwrap();
    let plan = merge::plan_merge(&MergeRequest {
        squashfs: sq,
        overlay: live.join("overlay-B-0000-0000"),
        workdir: work,
        fsck: false,
        compress: None,
    })
    .unwrap();
    let t_full = time(|| {
        merge::execute_merge(&plan, &mut |_, _, _| {}).unwrap();
    });
    println!("mksquashfs direct {:>8.2?}", t_direct);
    println!(
        "full merge        {:>8.2?}  ({:.2}x the direct mksquashfs)",
        t_full,
        t_full.as_secs_f64() / t_direct.as_secs_f64()
    );
    flat_overlayfs(d);
}

/// Section 3: a flat root tree of many files, 5 % of them changed in an OverlayFS
/// upper dir.
fn flat_overlayfs(d: &Path) {
    use livestick::tools::{MKSQUASHFS, SQFS2TAR, TAR2SQFS, find_program};
    if [MKSQUASHFS, SQFS2TAR, TAR2SQFS]
        .iter()
        .any(|t| find_program(t).is_err())
        || !Path::new("/sbin/mke2fs").exists() && !Path::new("/usr/sbin/mke2fs").exists()
    {
        println!("squashfs-tools-ng or e2fsprogs missing: flat OverlayFS comparison skipped");
        return;
    }
    let files = (mib() * 8).max(64);
    let tree = d.join("flat-tree");
    let upper_src = d.join("flat-upper");
    let mut bytes = 0u64;
    for i in 0..files {
        let dir = tree.join(format!("usr/share/d{:03}", i % 100));
        std::fs::create_dir_all(&dir).unwrap();
        // Text-like and compressible, as most of a root tree is.
        let body = format!("line {i} of a root file system, with some words in it\n")
            .repeat(200 + (i as usize % 1500));
        bytes += body.len() as u64;
        std::fs::write(dir.join(format!("f{i}")), &body).unwrap();
        if i % 20 == 0 {
            let up = upper_src.join(format!("overlayfs/usr/share/d{:03}", i % 100));
            std::fs::create_dir_all(&up).unwrap();
            std::fs::write(
                up.join(format!("f{i}")),
                format!("changed {i}\n").repeat(300),
            )
            .unwrap();
        }
    }
    std::fs::create_dir_all(upper_src.join("ovlwork")).unwrap();
    let live = d.join("flat/LiveOS");
    std::fs::create_dir_all(&live).unwrap();
    let sq = live.join("squashfs.img");
    let args = ["-comp", "gzip", "-noappend", "-no-progress", "-quiet"];
    let s = Command::new("mksquashfs")
        .arg(&tree)
        .arg(&sq)
        .args(args)
        .status()
        .unwrap();
    assert!(s.success());
    let overlay = live.join("overlay-B-0000-0000");
    let s = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&upper_src)
        .arg(&overlay)
        .arg(format!("{}M", mib().max(64)))
        .status()
        .unwrap();
    assert!(s.success());
    // The merged tree, for the baseline: the same changes applied by hand.
    let s = Command::new("cp")
        .arg("-a")
        .arg(upper_src.join("overlayfs/."))
        .arg(&tree)
        .status()
        .unwrap();
    assert!(s.success());
    let direct = d.join("flat-direct.sqfs");
    let t_direct = time(|| {
        let s = Command::new("mksquashfs")
            .arg(&tree)
            .arg(&direct)
            .args(args)
            .status()
            .unwrap();
        assert!(s.success());
    });
    let work = d.join("flat-work");
    std::fs::create_dir_all(&work).unwrap();
    let plan = merge::plan_merge(&MergeRequest {
        squashfs: sq,
        overlay,
        workdir: work,
        fsck: false,
        compress: None,
    })
    .unwrap();
    let t_merge = time(|| {
        merge::execute_merge(&plan, &mut |_, _, _| {}).unwrap();
    });
    println!(
        "flat OverlayFS: {files} files, {} MiB unpacked, {} changed",
        bytes >> 20,
        files.div_ceil(20)
    );
    println!("mksquashfs direct {:>8.2?}", t_direct);
    println!(
        "flat merge        {:>8.2?}  ({:.2}x the direct mksquashfs)",
        t_merge,
        t_merge.as_secs_f64() / t_direct.as_secs_f64()
    );
}
