//! Which dracut built the ISO's initrd: dracut-ng ≥ 110 renamed the overlay
//! arguments (`rd.live.overlay*` → `rd.overlay*`), so the stick's kernel
//! arguments must match the initrd, not the host.
//!
//! Where dracut records its version depends on how the initrd was built:
//! - with the systemd module (Fedora's images), `usr/lib/initrd-release` is
//!   derived from the host's os-release and carries `DRACUT_VERSION=`;
//! - with dracut's shell init (dracut-ng ≥ 110 without systemd, as the boot
//!   fixtures are built), it says `NAME=dracut`, `ID=dracut`, `VERSION_ID="111"`
//!   and nothing else;
//! - always, an empty marker file `usr/lib/dracut/dracut-<version>`.
//!
//! So the archive is read entry by entry and all three are consulted.
//!
//! An initrd is one or more cpio archives: uncompressed early ones (microcode)
//! followed by a compressed main one. We skip the uncompressed ones and
//! decompress the rest in process, with the Rust decoders livestick already
//! links for compressed ISOs (zstd, xz/lzma, gzip, bzip2) and lz4_flex: the
//! answer never depends on which decompression programs the host has.

use std::io::Read;

/// The most decompressed bytes read from an initrd. A Fedora initrd unpacks
/// to about 100 MiB; the limit only bounds what a hostile one can cost.
const UNPACKED_LIMIT: u64 = 1 << 30;

/// The dracut version string (`059`, `110`, `105-2.fc41`…), if found.
pub fn dracut_version<R: Read>(initrd: &mut R, limit: u64) -> Option<String> {
    let mut bytes = Vec::new();
    initrd.take(limit).read_to_end(&mut bytes).ok()?;
    let start = skip_plain_cpio(&bytes);
    let rest = &bytes[start..];
    if let Some(v) = version_in_archive(rest) {
        return Some(v);
    }
    version_in_archive(&decompress(rest, UNPACKED_LIMIT)?)
}

/// The compressions dracut and the kernel know, by their magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    Zstd,
    Xz,
    /// The old `.lzma` format (`dracut --lzma`).
    Lzma,
    Gzip,
    Bzip2,
    /// `lz4 -l`, the only lz4 format the kernel unpacks (`dracut --lz4`).
    Lz4Legacy,
    /// The lz4 frame format (what plain `lz4` writes).
    Lz4Frame,
}

const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];

fn compression_of(head: &[u8]) -> Option<Compression> {
    Some(match head {
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
        [0xfd, b'7', b'z', b'X', b'Z', 0x00, ..] => Compression::Xz,
        [0x5d, 0x00, 0x00, ..] => Compression::Lzma,
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [b'B', b'Z', b'h', ..] => Compression::Bzip2,
        [0x02, 0x21, 0x4c, 0x18, ..] => Compression::Lz4Legacy,
        [0x04, 0x22, 0x4d, 0x18, ..] => Compression::Lz4Frame,
        _ => return None,
    })
}

/// The decompressed main archive, at most `limit` bytes. A stream that is cut
/// short or damaged yields what came before the damage: the version files may
/// well be in it.
fn decompress(data: &[u8], limit: u64) -> Option<Vec<u8>> {
    let reader: Box<dyn Read + '_> = match compression_of(data)? {
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(data).ok()?),
        Compression::Xz => Box::new(liblzma::read::XzDecoder::new_multi_decoder(data)),
        Compression::Lzma => {
            let stream = liblzma::stream::Stream::new_lzma_decoder(u64::MAX).ok()?;
            Box::new(liblzma::read::XzDecoder::new_stream(data, stream))
        }
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(data)),
        Compression::Bzip2 => Box::new(bzip2::read::MultiBzDecoder::new(data)),
        Compression::Lz4Legacy => return Some(lz4_legacy(data, limit)),
        Compression::Lz4Frame => Box::new(lz4_flex::frame::FrameDecoder::new(data)),
    };
    let mut out = Vec::new();
    // read_to_end keeps what it read before an error; that prefix is used.
    let _ = reader.take(limit).read_to_end(&mut out);
    Some(out)
}

/// The lz4 legacy format: the magic, then blocks of at most 8 MiB, each a
/// little-endian compressed length and an lz4 block; another magic may start
/// a new stream, and the kernel stops at anything else (padding).
fn lz4_legacy(mut data: &[u8], limit: u64) -> Vec<u8> {
    const BLOCK_MAX: usize = 8 << 20;
    let mut out = Vec::new();
    while let Some(word) = data.get(..4) {
        if word == LZ4_LEGACY_MAGIC {
            data = &data[4..];
            continue;
        }
        let size = u32::from_le_bytes([word[0], word[1], word[2], word[3]]) as usize;
        let Some(block) = data.get(4..4 + size).filter(|_| size > 0) else {
            break;
        };
        if out.len() as u64 >= limit {
            break;
        }
        let start = out.len();
        out.resize(start + BLOCK_MAX, 0);
        match lz4_flex::block::decompress_into(block, &mut out[start..]) {
            Ok(n) => out.truncate(start + n),
            Err(_) => {
                out.truncate(start);
                break;
            }
        }
        data = &data[4 + size..];
    }
    out
}

/// One entry of a "newc" cpio archive.
struct CpioEntry<'a> {
    name: &'a [u8],
    data: &'a [u8],
}

/// Walks the "newc" archive at `bytes[*at..]` until its trailer, leaving `*at`
/// just past it (or at the end of `bytes` when the archive is cut short).
/// A header that is not newc ends the walk where it stands.
fn walk_cpio<'a>(bytes: &'a [u8], at: &mut usize, mut visit: impl FnMut(CpioEntry<'a>)) {
    loop {
        let Some(header) = bytes.get(*at..*at + 110) else {
            *at = bytes.len();
            return;
        };
        if !header.starts_with(b"070701") && !header.starts_with(b"070702") {
            return;
        }
        let field = |i: usize| {
            std::str::from_utf8(&header[6 + i * 8..14 + i * 8])
                .ok()
                .and_then(|h| usize::from_str_radix(h, 16).ok())
                .unwrap_or(0)
        };
        let file_size = field(6);
        let name_size = field(11);
        let name_start = *at + 110;
        let name = bytes
            .get(name_start..name_start.saturating_add(name_size.saturating_sub(1)))
            .unwrap_or_default();
        let name_end = name_start.saturating_add(name_size).div_ceil(4) * 4;
        let data_end = name_end.saturating_add(file_size);
        let data = bytes.get(name_end..data_end).unwrap_or_default();
        *at = data_end.div_ceil(4) * 4;
        if name == b"TRAILER!!!" {
            return;
        }
        visit(CpioEntry { name, data });
        if *at >= bytes.len() {
            *at = bytes.len();
            return;
        }
    }
}

/// Offset just past leading uncompressed "newc" cpio archives (and the zero
/// padding between them).
fn skip_plain_cpio(bytes: &[u8]) -> usize {
    let mut at = 0;
    loop {
        while at < bytes.len() && bytes[at] == 0 {
            at += 1;
        }
        if !bytes[at..].starts_with(b"070701") && !bytes[at..].starts_with(b"070702") {
            return at;
        }
        walk_cpio(bytes, &mut at, |_| {});
    }
}

/// The version recorded in an uncompressed main archive: `initrd-release`
/// first (its `DRACUT_VERSION=`, or `VERSION_ID=` when the release *is*
/// dracut's own), then the `dracut-<version>` marker file.
fn version_in_archive(bytes: &[u8]) -> Option<String> {
    let mut release = None;
    let mut marker = None;
    let mut at = 0;
    walk_cpio(bytes, &mut at, |entry| {
        let name = entry.name.strip_prefix(b".").unwrap_or(entry.name);
        let name = name.strip_prefix(b"/").unwrap_or(name);
        // etc/initrd-release is a symlink to the usr/lib one in systemd images
        // (its data is the link target), so usr/lib's wins whatever the order.
        if name == b"usr/lib/initrd-release" || (name == b"etc/initrd-release" && release.is_none())
        {
            release = Some(entry.data);
        } else if let Some(v) = name
            .strip_prefix(b"usr/lib/dracut/dracut-")
            .or_else(|| name.strip_prefix(b"lib/dracut/dracut-"))
        {
            marker = clean_version(v);
        }
    });
    release
        .and_then(version_in_release)
        .or(marker)
        // Not a cpio archive we can walk (cut short by the read limit, or an
        // unknown format): the key itself is still evidence.
        .or_else(|| value_after(bytes, b"DRACUT_VERSION="))
}

/// `DRACUT_VERSION=` of an os-release style file, or its `VERSION_ID=` when
/// `ID=dracut` (shell-init images name dracut itself as the release).
fn version_in_release(text: &[u8]) -> Option<String> {
    let mut id_is_dracut = false;
    let mut version_id = None;
    for line in text.split(|&b| b == b'\n') {
        let Some(eq) = line.iter().position(|&b| b == b'=') else {
            continue;
        };
        let (key, value) = (&line[..eq], &line[eq + 1..]);
        match key {
            b"DRACUT_VERSION" => {
                if let Some(v) = clean_version(value) {
                    return Some(v);
                }
            }
            b"ID" => id_is_dracut = clean_version(value).as_deref() == Some("dracut"),
            b"VERSION_ID" => version_id = clean_version(value),
            _ => {}
        }
    }
    version_id.filter(|_| id_is_dracut)
}

fn value_after(bytes: &[u8], key: &[u8]) -> Option<String> {
    let pos = bytes.windows(key.len()).position(|w| w == key)?;
    let value: Vec<u8> = bytes[pos + key.len()..]
        .iter()
        .copied()
        .take_while(|&b| b != b'\n' && b != 0)
        .collect();
    clean_version(&value)
}

/// A version string without quotes, at most 64 printable bytes.
fn clean_version(raw: &[u8]) -> Option<String> {
    let value: Vec<u8> = raw
        .iter()
        .copied()
        .take_while(|&b| b != b'\n' && b != 0)
        .filter(|&b| b != b'"' && b != b'\'')
        .take(64)
        .collect();
    let text = String::from_utf8(value).ok()?;
    let text = text.trim();
    (!text.is_empty() && text.chars().all(|c| c.is_ascii_graphic())).then(|| text.to_string())
}

/// Whether a dracut version uses the renamed (`rd.overlay*`) arguments.
pub fn uses_renamed_overlay_args(version: &str) -> bool {
    let major: String = version.chars().take_while(|c| c.is_ascii_digit()).collect();
    major.parse::<u32>().map(|m| m >= 110).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::process::{Command, Stdio};

    use super::*;

    fn newc(name: &str, data: &[u8]) -> Vec<u8> {
        let mut out = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            1,
            0o100644,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        )
        .into_bytes();
        out.extend(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out
    }

    #[test]
    fn finds_the_version_behind_an_early_cpio_and_gzip() {
        let mut early = newc("kernel/x86/microcode/GenuineIntel.bin", &[0xaa; 100]);
        early.extend(newc("TRAILER!!!", b""));
        let main = newc(
            "usr/lib/initrd-release",
            b"NAME=dracut\nDRACUT_VERSION=\"110-1\"\n",
        );
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&main).unwrap();
        let compressed = gz.finish().unwrap();
        let mut initrd = early;
        initrd.extend(compressed);
        let v = dracut_version(&mut &initrd[..], 1 << 30).unwrap();
        assert_eq!(v, "110-1");
        assert!(uses_renamed_overlay_args(&v));
        assert!(!uses_renamed_overlay_args("059"));
        assert!(!uses_renamed_overlay_args("unknown"));
        assert_eq!(dracut_version(&mut &b"random bytes"[..], 100), None);
    }

    /// `tool args` run over `input`: the bytes the real program makes.
    fn made_by(tool: &str, args: &[&str], input: &[u8]) -> Vec<u8> {
        let mut child = Command::new(tool)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{tool} not runnable ({e}); run scripts/deps.sh"));
        let mut stdin = child.stdin.take().unwrap();
        let input = input.to_vec();
        let feeder = std::thread::spawn(move || stdin.write_all(&input).unwrap());
        let out = child.wait_with_output().unwrap();
        feeder.join().unwrap();
        assert!(out.status.success(), "{tool} {args:?} failed");
        out.stdout
    }

    /// A main archive whose version files come after 9 MiB of other files, so
    /// that a decoder must get through more than one block (lz4 legacy blocks
    /// hold 8 MiB) to find them.
    fn big_main_archive(version: &str) -> Vec<u8> {
        let filler: Vec<u8> = (0..9u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8 & 0x0f)
            .collect();
        let mut main = newc("usr/lib/modules/big.ko", &filler);
        main.extend(newc(
            "usr/lib/initrd-release",
            format!("NAME=dracut\nDRACUT_VERSION=\"{version}\"\n").as_bytes(),
        ));
        main.extend(newc("TRAILER!!!", b""));
        main
    }

    fn early_microcode() -> Vec<u8> {
        let mut early = newc("kernel/x86/microcode/AuthenticAMD.bin", &[0x55; 300]);
        early.extend(newc("TRAILER!!!", b""));
        early
    }

    #[test]
    fn every_compression_dracut_writes_is_read_in_process() {
        let main = big_main_archive("110-7");
        for (tool, args, expected) in [
            ("zstd", &["-q", "-c", "-T1"][..], Compression::Zstd),
            ("xz", &["--check=crc32", "-c", "-0"][..], Compression::Xz),
            ("xz", &["--format=lzma", "-c", "-0"][..], Compression::Lzma),
            ("gzip", &["-c", "-1"][..], Compression::Gzip),
            ("bzip2", &["-c", "-1"][..], Compression::Bzip2),
            ("lz4", &["-l", "-c"][..], Compression::Lz4Legacy),
            ("lz4", &["-c"][..], Compression::Lz4Frame),
        ] {
            let compressed = made_by(tool, args, &main);
            assert_eq!(
                compression_of(&compressed),
                Some(expected),
                "{tool} {args:?}"
            );
            let mut initrd = early_microcode();
            initrd.extend(&compressed);
            assert_eq!(
                dracut_version(&mut &initrd[..], 1 << 30).as_deref(),
                Some("110-7"),
                "{tool} {args:?}"
            );
            // The whole archive comes back, byte for byte.
            assert_eq!(
                decompress(&compressed, 1 << 30).as_deref(),
                Some(&main[..]),
                "{tool} {args:?}"
            );
        }
    }

    #[test]
    fn damaged_or_cut_streams_give_what_precedes_the_damage_or_nothing() {
        let mut main = newc(
            "usr/lib/initrd-release",
            b"NAME=dracut\nDRACUT_VERSION=111\n",
        );
        main.extend(big_main_archive("999"));
        for (tool, args) in [
            ("zstd", &["-q", "-c"][..]),
            ("xz", &["-c", "-0"][..]),
            ("gzip", &["-c"][..]),
            ("lz4", &["-l", "-c"][..]),
        ] {
            let compressed = made_by(tool, args, &main);
            // Cut in the middle: the release file at the start still counts.
            let cut = &compressed[..compressed.len() / 2];
            assert_eq!(
                dracut_version(&mut &cut[..], 1 << 30).as_deref(),
                Some("111"),
                "{tool} cut short"
            );
            // Garbage after the magic: no version, no panic.
            let mut garbage = compressed[..8].to_vec();
            garbage.extend((0..4096u32).map(|i| (i * 7919 % 251) as u8));
            assert_eq!(dracut_version(&mut &garbage[..], 1 << 30), None, "{tool}");
        }
        // The limit bounds the unpacked size: nothing past it is looked at.
        let lz4 = made_by("lz4", &["-l", "-c"], &big_main_archive("112"));
        assert!(decompress(&lz4, 1 << 20).unwrap().len() <= 8 << 20);
    }

    #[test]
    fn reads_the_shell_init_release_of_dracut_ng() {
        // What dracut-ng 111 without its systemd module writes.
        let mut main = newc(
            "usr/lib/initrd-release",
            b"NAME=dracut\nID=dracut\nVERSION_ID=\"111\"\nANSI_COLOR=\"0;34\"\n",
        );
        main.extend(newc("TRAILER!!!", b""));
        assert_eq!(version_in_archive(&main).as_deref(), Some("111"));
    }

    #[test]
    fn a_host_release_without_dracut_version_falls_back_to_the_marker_file() {
        // A host's os-release copied in: its VERSION_ID is the distribution's,
        // not dracut's, and must not be taken for it.
        let mut main = newc(
            "usr/lib/initrd-release",
            b"NAME=\"Debian GNU/Linux\"\nID=debian\nVERSION_ID=\"12\"\n",
        );
        main.extend(newc("usr/lib/dracut/dracut-110-2", b"dracut-110-2\n"));
        main.extend(newc("TRAILER!!!", b""));
        assert_eq!(version_in_archive(&main).as_deref(), Some("110-2"));

        let mut no_marker = newc("usr/lib/initrd-release", b"ID=debian\nVERSION_ID=12\n");
        no_marker.extend(newc("TRAILER!!!", b""));
        assert_eq!(version_in_archive(&no_marker), None);
    }

    #[test]
    fn dracut_version_wins_over_the_marker_and_symlinks_are_not_releases() {
        let mut main = newc("etc/initrd-release", b"../usr/lib/initrd-release");
        main.extend(newc("usr/lib/dracut/dracut-105", b""));
        main.extend(newc(
            "usr/lib/initrd-release",
            b"NAME=Fedora\nID=fedora\nVERSION_ID=42\nDRACUT_VERSION=\"105-4.fc42\"\n",
        ));
        main.extend(newc("TRAILER!!!", b""));
        assert_eq!(version_in_archive(&main).as_deref(), Some("105-4.fc42"));
    }

    #[test]
    fn a_truncated_archive_still_yields_a_version_key_or_nothing() {
        let main = newc(
            "usr/lib/initrd-release",
            b"NAME=dracut\nDRACUT_VERSION=059\n",
        );
        assert_eq!(
            version_in_archive(&main[..main.len() - 2]).as_deref(),
            Some("059")
        );
        assert_eq!(version_in_archive(&main[..60]), None);
        assert_eq!(version_in_archive(b"070701zzzz"), None);
    }
}
