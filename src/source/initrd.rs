//! Which dracut built the ISO's initrd: dracut-ng ≥ 110 renamed the overlay
//! arguments (`rd.live.overlay*` → `rd.overlay*`), so the stick's kernel
//! arguments must match the initrd, not the host.
//!
//! dracut records its version as `DRACUT_VERSION=` in `usr/lib/initrd-release`
//! inside the image. An initrd is one or more cpio archives: uncompressed
//! early ones (microcode) followed by a compressed main one. We skip the
//! uncompressed ones and stream the rest through the matching decompressor.

use std::io::{Read, Write};
use std::process::{Command, Stdio};

use crate::tools;

/// The dracut version string (`059`, `110`, `105-2.fc41`…), if found.
pub fn dracut_version<R: Read>(initrd: &mut R, limit: u64) -> Option<String> {
    let mut bytes = Vec::new();
    initrd.take(limit).read_to_end(&mut bytes).ok()?;
    let start = skip_plain_cpio(&bytes);
    let rest = &bytes[start..];
    if let Some(v) = find_version(rest) {
        return Some(v);
    }
    let tool = match rest {
        [0x28, 0xb5, 0x2f, 0xfd, ..] => tools::ZSTD,
        [0xfd, b'7', b'z', b'X', b'Z', 0x00, ..] => tools::XZ,
        [0x1f, 0x8b, ..] => tools::GZIP,
        [0x02, 0x21, 0x4c, 0x18, ..] => tools::LZ4,
        _ => return None,
    };
    // A missing decompressor leaves the version unknown (the caller's
    // default), as it did before; `doctor` lists the four.
    let exe = tools::find_program(&tool).ok()?;
    let mut child = Command::new(exe)
        .arg("-dcq")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut stdin = child.stdin.take()?;
    let input = rest.to_vec();
    let feeder = std::thread::spawn(move || {
        // A decompressor that stops early closes the pipe; that is fine.
        let _ = stdin.write_all(&input);
    });
    let mut out = Vec::new();
    child.stdout.take()?.read_to_end(&mut out).ok()?;
    let _ = child.wait();
    let _ = feeder.join();
    find_version(&out)
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
        // Walk the archive entry by entry until its trailer.
        loop {
            let Some(header) = bytes.get(at..at + 110) else {
                return bytes.len();
            };
            let field = |i: usize| {
                std::str::from_utf8(&header[6 + i * 8..14 + i * 8])
                    .ok()
                    .and_then(|h| usize::from_str_radix(h, 16).ok())
                    .unwrap_or(0)
            };
            let file_size = field(6);
            let name_size = field(11);
            let name = bytes.get(at + 110..at + 110 + name_size.saturating_sub(1));
            let name_end = (at + 110 + name_size).div_ceil(4) * 4;
            let data_end = (name_end + file_size).div_ceil(4) * 4;
            at = data_end;
            if name == Some(b"TRAILER!!!".as_slice()) || at >= bytes.len() {
                break;
            }
        }
    }
}

fn find_version(bytes: &[u8]) -> Option<String> {
    const KEY: &[u8] = b"DRACUT_VERSION=";
    let pos = bytes.windows(KEY.len()).position(|w| w == KEY)?;
    let value: Vec<u8> = bytes[pos + KEY.len()..]
        .iter()
        .copied()
        .take_while(|&b| b != b'\n' && b != 0)
        .filter(|&b| b != b'"' && b != b'\'')
        .take(64)
        .collect();
    let text = String::from_utf8(value).ok()?;
    (!text.is_empty()).then_some(text)
}

/// Whether a dracut version uses the renamed (`rd.overlay*`) arguments.
pub fn uses_renamed_overlay_args(version: &str) -> bool {
    let major: String = version.chars().take_while(|c| c.is_ascii_digit()).collect();
    major.parse::<u32>().map(|m| m >= 110).unwrap_or(false)
}

#[cfg(test)]
mod tests {
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
        let mut gz = Command::new(tools::find_program(&tools::GZIP).unwrap())
            .arg("-c")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        gz.stdin.take().unwrap().write_all(&main).unwrap();
        let mut compressed = Vec::new();
        gz.stdout
            .take()
            .unwrap()
            .read_to_end(&mut compressed)
            .unwrap();
        gz.wait().unwrap();
        let mut initrd = early;
        initrd.extend(compressed);
        let v = dracut_version(&mut &initrd[..], 1 << 30).unwrap();
        assert_eq!(v, "110-1");
        assert!(uses_renamed_overlay_args(&v));
        assert!(!uses_renamed_overlay_args("059"));
        assert!(!uses_renamed_overlay_args("unknown"));
        assert_eq!(dracut_version(&mut &b"random bytes"[..], 100), None);
    }
}
