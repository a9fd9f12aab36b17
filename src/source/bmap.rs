//! bmaptool's block map (`IMAGE.bmap`), format versions 1.4 and 2.0 (and the
//! 1.x files before them, whose range checksums are sha1).
//!
//! A block map names the blocks of a disk image that hold data (the rest were
//! holes when it was made: the file systems in the image do not use them) and
//! a checksum for each range. livestick writes only the mapped ranges and
//! checks each range's checksum as the stream passes it, so a map that does
//! not belong to the image is caught before the image's first MiB (its
//! partition table) is written.
//!
//! Pure functions over text and byte streams; no I/O.

use std::ops::Range;

use sha1::Sha1;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::error::{Classify, ErrorKind};

/// The hash a block map uses for its range checksums and its own checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChecksumKind {
    Sha1,
    Sha256,
}

impl ChecksumKind {
    fn hex_len(self) -> usize {
        match self {
            ChecksumKind::Sha1 => 40,
            ChecksumKind::Sha256 => 64,
        }
    }

    fn name(self) -> &'static str {
        match self {
            ChecksumKind::Sha1 => "sha1",
            ChecksumKind::Sha256 => "sha256",
        }
    }
}

/// A run of mapped blocks, `first..=last`, with its checksum when the map has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedRange {
    pub first: u64,
    pub last: u64,
    pub checksum: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bmap {
    pub version: String,
    pub image_size: u64,
    pub block_size: u64,
    pub mapped_blocks: u64,
    pub checksum_kind: ChecksumKind,
    pub ranges: Vec<MappedRange>,
}

#[derive(Debug, Error)]
pub enum BmapError {
    #[error("it is not well-formed XML ({0})")]
    Xml(String),
    #[error("its root element is <{0}>, not <bmap>")]
    NotBmap(String),
    #[error("its format version {0:?} is not one livestick reads (1.x and 2.x)")]
    Version(String),
    #[error("<{0}> is missing")]
    Missing(&'static str),
    #[error("<{field}> is {value:?}, not {expected}")]
    Invalid {
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("{0}")]
    Ranges(String),
    #[error(
        "its own checksum does not match (it says {stated}, its content hashes to {actual}): the file is damaged or was edited"
    )]
    FileChecksum { stated: String, actual: String },
    #[error(
        "blocks {first}-{last} (bytes {start}-{end}) of the image hash to {actual}, the map says {expected}: the map is not for this image, or the image is damaged"
    )]
    Mismatch {
        first: u64,
        last: u64,
        start: u64,
        end: u64,
        expected: String,
        actual: String,
    },
    #[error("the image is {actual} bytes long; the map says ImageSize {stated}")]
    SizeMismatch { stated: u64, actual: u64 },
}

impl Classify for BmapError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::BadInput
    }
}

impl Bmap {
    /// The bytes of the image a range covers (the last block may be partial).
    pub fn bytes(&self, range: &MappedRange) -> Range<u64> {
        let start = range.first * self.block_size;
        let end = (range.last + 1)
            .saturating_mul(self.block_size)
            .min(self.image_size);
        start..end
    }

    /// Every mapped byte range, in order.
    pub fn byte_ranges(&self) -> Vec<Range<u64>> {
        self.ranges.iter().map(|r| self.bytes(r)).collect()
    }

    pub fn mapped_bytes(&self) -> u64 {
        self.byte_ranges().iter().map(|r| r.end - r.start).sum()
    }

    pub fn checksum_name(&self) -> &'static str {
        self.checksum_kind.name()
    }
}

fn number(field: &'static str, text: Option<&str>) -> Result<u64, BmapError> {
    let text = text.ok_or(BmapError::Missing(field))?.trim();
    text.parse().map_err(|_| BmapError::Invalid {
        field,
        value: text.to_string(),
        expected: "a whole number",
    })
}

fn is_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Parses and checks a block map: the numbers agree with each other, the
/// ranges are in order, inside the image and add up to `MappedBlocksCount`,
/// every checksum is well-formed, and the file's own checksum (1.4 and later)
/// matches.
pub fn parse(text: &str) -> Result<Bmap, BmapError> {
    let doc = roxmltree::Document::parse(text).map_err(|e| BmapError::Xml(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "bmap" {
        return Err(BmapError::NotBmap(root.tag_name().name().to_string()));
    }
    let version = root
        .attribute("version")
        .ok_or(BmapError::Missing("bmap version="))?
        .trim()
        .to_string();
    let major = version.split('.').next().unwrap_or("");
    if major != "1" && major != "2" {
        return Err(BmapError::Version(version));
    }
    let child = |name: &str| {
        root.children()
            .find(|n| n.is_element() && n.tag_name().name() == name)
    };
    let child_text = |name: &str| child(name).map(|n| n.text().unwrap_or(""));
    let image_size = number("ImageSize", child_text("ImageSize"))?;
    let block_size = number("BlockSize", child_text("BlockSize"))?;
    if block_size == 0 || block_size % 512 != 0 {
        return Err(BmapError::Invalid {
            field: "BlockSize",
            value: block_size.to_string(),
            expected: "a positive multiple of 512",
        });
    }
    let blocks = image_size.div_ceil(block_size);
    if let Some(text) = child_text("BlocksCount") {
        let stated = number("BlocksCount", Some(text))?;
        if stated != blocks {
            return Err(BmapError::Ranges(format!(
                "BlocksCount {stated} does not fit ImageSize {image_size} in blocks of {block_size} ({blocks})"
            )));
        }
    }
    let mapped_blocks = number("MappedBlocksCount", child_text("MappedBlocksCount"))?;
    let checksum_kind = match child_text("ChecksumType").map(str::trim) {
        None => ChecksumKind::Sha1,
        Some("sha1") => ChecksumKind::Sha1,
        Some("sha256") => ChecksumKind::Sha256,
        Some(other) => {
            return Err(BmapError::Invalid {
                field: "ChecksumType",
                value: other.to_string(),
                expected: "sha1 or sha256",
            });
        }
    };
    if let Some((field, stated)) = child_text("BmapFileChecksum")
        .map(|t| ("BmapFileChecksum", t))
        .or_else(|| child_text("BmapFileSHA1").map(|t| ("BmapFileSHA1", t)))
    {
        check_file_checksum(text, field, stated.trim(), checksum_kind)?;
    }
    let map = child("BlockMap").ok_or(BmapError::Missing("BlockMap"))?;
    let mut ranges = Vec::new();
    let mut next_free = 0u64;
    for node in map
        .children()
        .filter(|n| n.is_element() && n.tag_name().name() == "Range")
    {
        let body = node.text().unwrap_or("").trim();
        let parse_block = |t: &str| {
            t.trim().parse::<u64>().map_err(|_| BmapError::Invalid {
                field: "Range",
                value: body.to_string(),
                expected: "a block number or FIRST-LAST",
            })
        };
        let (first, last) = match body.split_once('-') {
            Some((a, b)) => (parse_block(a)?, parse_block(b)?),
            None => {
                let b = parse_block(body)?;
                (b, b)
            }
        };
        if last < first || first < next_free || last >= blocks {
            return Err(BmapError::Ranges(format!(
                "range {body} is out of order, overlaps the one before or lies past the image's {blocks} blocks"
            )));
        }
        next_free = last + 1;
        let checksum = node
            .attribute("chksum")
            .or_else(|| node.attribute("sha1"))
            .map(|c| c.trim().to_ascii_lowercase());
        if let Some(c) = &checksum
            && !is_hex(c, checksum_kind.hex_len())
        {
            return Err(BmapError::Invalid {
                field: "Range chksum",
                value: c.clone(),
                expected: match checksum_kind {
                    ChecksumKind::Sha1 => "40 hex digits (sha1)",
                    ChecksumKind::Sha256 => "64 hex digits (sha256)",
                },
            });
        }
        ranges.push(MappedRange {
            first,
            last,
            checksum,
        });
    }
    let counted: u64 = ranges.iter().map(|r| r.last - r.first + 1).sum();
    if counted != mapped_blocks {
        return Err(BmapError::Ranges(format!(
            "its ranges hold {counted} blocks but MappedBlocksCount says {mapped_blocks}"
        )));
    }
    Ok(Bmap {
        version,
        image_size,
        block_size,
        mapped_blocks,
        checksum_kind,
        ranges,
    })
}

/// bmaptool hashes the file with its own checksum replaced by as many `0`s.
fn check_file_checksum(
    text: &str,
    field: &'static str,
    stated: &str,
    kind: ChecksumKind,
) -> Result<(), BmapError> {
    // BmapFileSHA1 (format 1.3) is always sha1, whatever the ranges use.
    let kind = if field == "BmapFileSHA1" {
        ChecksumKind::Sha1
    } else {
        kind
    };
    if !is_hex(stated, kind.hex_len()) {
        return Err(BmapError::Invalid {
            field,
            value: stated.to_string(),
            expected: "a hex checksum",
        });
    }
    let zeroed = text.replacen(stated, &"0".repeat(stated.len()), 1);
    let actual = hex_digest(kind, zeroed.as_bytes());
    if actual.eq_ignore_ascii_case(stated) {
        Ok(())
    } else {
        Err(BmapError::FileChecksum {
            stated: stated.to_string(),
            actual,
        })
    }
}

fn hex_digest(kind: ChecksumKind, bytes: &[u8]) -> String {
    let mut h = RangeHasher::new(kind);
    h.update(bytes);
    h.finish()
}

enum RangeHasher {
    Sha1(Sha1),
    Sha256(Sha256),
}

impl RangeHasher {
    fn new(kind: ChecksumKind) -> Self {
        match kind {
            ChecksumKind::Sha1 => RangeHasher::Sha1(Sha1::new()),
            ChecksumKind::Sha256 => RangeHasher::Sha256(Sha256::new()),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            RangeHasher::Sha1(h) => h.update(bytes),
            RangeHasher::Sha256(h) => h.update(bytes),
        }
    }

    fn finish(self) -> String {
        let bytes: Vec<u8> = match self {
            RangeHasher::Sha1(h) => h.finalize().to_vec(),
            RangeHasher::Sha256(h) => h.finalize().to_vec(),
        };
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Checks an image stream against a map as it passes, in order: each range's
/// checksum when its last byte has gone by, the size at the end.
pub struct StreamCheck {
    bmap: Bmap,
    next: usize,
    hasher: Option<RangeHasher>,
    pos: u64,
}

impl StreamCheck {
    pub fn new(bmap: Bmap) -> Self {
        StreamCheck {
            bmap,
            next: 0,
            hasher: None,
            pos: 0,
        }
    }

    /// The next bytes of the image, following those fed before.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), BmapError> {
        while !data.is_empty() {
            let Some(range) = self.bmap.ranges.get(self.next) else {
                self.pos += data.len() as u64;
                return Ok(());
            };
            let bytes = self.bmap.bytes(range);
            if self.pos < bytes.start {
                let skip = (bytes.start - self.pos).min(data.len() as u64) as usize;
                self.pos += skip as u64;
                data = &data[skip..];
                continue;
            }
            let take = (bytes.end - self.pos).min(data.len() as u64) as usize;
            if range.checksum.is_some() {
                self.hasher
                    .get_or_insert_with(|| RangeHasher::new(self.bmap.checksum_kind))
                    .update(&data[..take]);
            }
            self.pos += take as u64;
            data = &data[take..];
            if self.pos == bytes.end {
                self.close_range()?;
            }
        }
        Ok(())
    }

    fn close_range(&mut self) -> Result<(), BmapError> {
        let range = &self.bmap.ranges[self.next];
        let bytes = self.bmap.bytes(range);
        self.next += 1;
        let (Some(expected), Some(hasher)) = (&range.checksum, self.hasher.take()) else {
            return Ok(());
        };
        let actual = hasher.finish();
        if &actual == expected {
            Ok(())
        } else {
            Err(BmapError::Mismatch {
                first: range.first,
                last: range.last,
                start: bytes.start,
                end: bytes.end,
                expected: expected.clone(),
                actual,
            })
        }
    }

    /// The stream ended: it must have been exactly `ImageSize` long.
    pub fn finish(&self) -> Result<(), BmapError> {
        if self.pos != self.bmap.image_size || self.next < self.bmap.ranges.len() {
            return Err(BmapError::SizeMismatch {
                stated: self.bmap.image_size,
                actual: self.pos,
            });
        }
        Ok(())
    }

    pub fn image_size(&self) -> u64 {
        self.bmap.image_size
    }

    /// Called when more bytes arrived than the map's ImageSize allows.
    pub fn past_end(&self) -> bool {
        self.pos > self.bmap.image_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha256_hex(bytes: &[u8]) -> String {
        hex_digest(ChecksumKind::Sha256, bytes)
    }

    /// A map as bmaptool 3.6 writes it (format 2.0), its file checksum filled in.
    fn made(image: &[u8], block: u64, ranges: &[(u64, u64)]) -> String {
        let mut body = String::new();
        let mut mapped = 0;
        for &(a, b) in ranges {
            let end = ((b + 1) * block).min(image.len() as u64) as usize;
            let sum = sha256_hex(&image[(a * block) as usize..end]);
            mapped += b - a + 1;
            body.push_str(&format!(
                "        <Range chksum=\"{sum}\"> {a}-{b} </Range>\n"
            ));
        }
        let zeros = "0".repeat(64);
        let text = format!(
            "<?xml version=\"1.0\" ?>\n<bmap version=\"2.0\">\n    <ImageSize> {} </ImageSize>\n    <BlockSize> {block} </BlockSize>\n    <BlocksCount> {} </BlocksCount>\n    <MappedBlocksCount> {mapped} </MappedBlocksCount>\n    <ChecksumType> sha256 </ChecksumType>\n    <BmapFileChecksum> {zeros} </BmapFileChecksum>\n    <BlockMap>\n{body}    </BlockMap>\n</bmap>\n",
            image.len(),
            (image.len() as u64).div_ceil(block)
        );
        let sum = sha256_hex(text.as_bytes());
        text.replace(&zeros, &sum)
    }

    fn image() -> Vec<u8> {
        let mut v = vec![0u8; 10 * 4096 + 100];
        for (i, b) in v.iter_mut().enumerate().take(8192) {
            *b = (i % 251) as u8;
        }
        v[9 * 4096..].fill(7);
        v
    }

    #[test]
    fn a_matching_map_checks_out_over_any_chunking() {
        let img = image();
        let map = parse(&made(&img, 4096, &[(0, 1), (9, 10)])).unwrap();
        assert_eq!(map.mapped_blocks, 4);
        assert_eq!(map.byte_ranges(), vec![0..8192, 9 * 4096..img.len() as u64]);
        for chunk in [1, 511, 4096, 100_000] {
            let mut check = StreamCheck::new(map.clone());
            for c in img.chunks(chunk) {
                check.feed(c).unwrap();
            }
            check.finish().unwrap();
        }
    }

    #[test]
    fn a_changed_byte_in_a_mapped_range_is_named() {
        let img = image();
        let map = parse(&made(&img, 4096, &[(0, 1), (9, 10)])).unwrap();
        let mut bad = img.clone();
        bad[9 * 4096 + 5] ^= 1;
        let mut check = StreamCheck::new(map);
        let err = bad
            .chunks(4096)
            .try_for_each(|c| check.feed(c))
            .unwrap_err();
        assert!(
            matches!(
                err,
                BmapError::Mismatch {
                    first: 9,
                    last: 10,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_stream_of_another_length_is_refused_at_the_end() {
        let img = image();
        let map = parse(&made(&img, 4096, &[(0, 1)])).unwrap();
        let mut check = StreamCheck::new(map);
        check.feed(&img[..img.len() - 1]).unwrap();
        assert!(matches!(
            check.finish(),
            Err(BmapError::SizeMismatch { .. })
        ));
    }

    #[test]
    fn malformed_maps_say_what_is_wrong() {
        let img = image();
        let good = made(&img, 4096, &[(0, 1), (9, 10)]);
        // Edited after it was made: its own checksum no longer matches.
        let edited = good.replace("> 9-10 <", "> 8-10 <");
        assert!(matches!(
            parse(&edited),
            Err(BmapError::FileChecksum { .. })
        ));
        assert!(matches!(
            parse("<bmap version=\"2.0\">"),
            Err(BmapError::Xml(_))
        ));
        assert!(matches!(parse("<map/>"), Err(BmapError::NotBmap(_))));
        assert!(matches!(
            parse("<bmap version=\"3.0\"/>"),
            Err(BmapError::Version(_))
        ));
        let no_sum = |s: &str| {
            let start = s.find("    <BmapFileChecksum>").unwrap();
            let end = s.find("</BmapFileChecksum>\n").unwrap() + "</BmapFileChecksum>\n".len();
            format!("{}{}", &s[..start], &s[end..])
        };
        let unchecked = no_sum(&good);
        parse(&unchecked).unwrap();
        for (from, to) in [
            ("<MappedBlocksCount> 4 ", "<MappedBlocksCount> 5 "),
            ("> 9-10 <", "> 0-10 <"),
            ("> 9-10 <", "> 9-11 <"),
            ("> 9-10 <", "> ten <"),
            ("<BlockSize> 4096 ", "<BlockSize> 0 "),
            ("<ChecksumType> sha256 ", "<ChecksumType> md5 "),
        ] {
            let text = unchecked.replace(from, to);
            assert_ne!(text, unchecked, "{from}");
            assert!(parse(&text).is_err(), "{from} -> {to} was accepted");
        }
        let no_size = unchecked
            .replace("<ImageSize>", "<Other>")
            .replace("</ImageSize>", "</Other>");
        assert!(matches!(
            parse(&no_size),
            Err(BmapError::Missing("ImageSize"))
        ));
    }

    #[test]
    fn format_1_4_with_sha1_ranges_and_single_blocks() {
        let img = image();
        let sum = hex_digest(ChecksumKind::Sha1, &img[4096..8192]);
        let zeros = "0".repeat(40);
        let text = format!(
            "<?xml version=\"1.0\" ?>\n<bmap version=\"1.4\">\n<ImageSize> {} </ImageSize>\n<BlockSize> 4096 </BlockSize>\n<BlocksCount> 11 </BlocksCount>\n<MappedBlocksCount> 1 </MappedBlocksCount>\n<ChecksumType> sha1 </ChecksumType>\n<BmapFileChecksum> {zeros} </BmapFileChecksum>\n<BlockMap>\n<Range chksum=\"{sum}\"> 1 </Range>\n</BlockMap>\n</bmap>\n",
            img.len()
        );
        let text = text.replace(&zeros, &hex_digest(ChecksumKind::Sha1, text.as_bytes()));
        let map = parse(&text).unwrap();
        assert_eq!(map.checksum_kind, ChecksumKind::Sha1);
        assert_eq!(map.byte_ranges(), vec![4096..8192]);
        let mut check = StreamCheck::new(map);
        check.feed(&img).unwrap();
        check.finish().unwrap();
    }
}
