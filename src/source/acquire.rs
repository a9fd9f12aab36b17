//! The step before inspection: a URL or release name becomes a verified file in
//! the cache ([`super::download`]), and a local image is checked against its
//! CHECKSUM ([`super::signed_checksum`]), before any target is probed or opened.
//! What the rest of `write` needs from it is [`Acquired`]: the local file to
//! inspect and what checked it, which the plan notes and the report repeat.

use std::path::{Path, PathBuf};

use crate::progress::{Progress, ProgressMode};

use super::download::{self, DownloadError, DownloadOptions};
use super::signed_checksum::SourceCheck;

/// A source made local and checked.
#[derive(Debug, Clone)]
pub struct Acquired {
    /// The file to read: the cached download, or the local image as given.
    pub path: PathBuf,
    pub check: SourceCheck,
}

/// Downloads `source` when it is a URL or release name, and checks it against a
/// published checksum when there is one. `read_local` false (a dry run) leaves a
/// local image unread: its CHECKSUM's signature is still checked.
pub fn acquire(
    source: &Path,
    opts: &DownloadOptions,
    read_local: bool,
    mode: ProgressMode,
) -> Result<Acquired, DownloadError> {
    let progress = Progress::for_source(mode, "source");
    let (path, check) = download::prepare(source, opts, read_local, &progress)?;
    progress.finish();
    Ok(Acquired { path, check })
}

/// The version of `--download-only --json`'s document.
pub const DOWNLOAD_SCHEMA: u32 = 1;

impl Acquired {
    /// `--download-only --json` (schemas/download.schema.json): what the user
    /// named, the file it became and its check.
    pub fn to_json(&self, source: &Path) -> serde_json::Result<String> {
        serde_json::to_string_pretty(&serde_json::json!({
            "schema": DOWNLOAD_SCHEMA,
            "source": source,
            "file": self.path,
            "checksum": self.check,
        }))
    }
}

/// The report's lines about what checked the source, after a write: one line
/// about the published checksum, which says plainly when the image was not
/// checked at all. `iso_note` is the plan's note on the implanted MD5
/// (`plan::IsoCheck::note`), if it has one; `md5_checked` whether that MD5 was
/// checked. A checked CHECKSUM needs no note about the MD5, and "nothing was
/// checked" is said once.
pub fn check_lines(check: &SourceCheck, iso_note: Option<&str>, md5_checked: bool) -> Vec<String> {
    match (check, iso_note) {
        (SourceCheck::NotChecked { why }, Some(note)) if !md5_checked => vec![format!(
            "note: the image was NOT checked: {note}; no published checksum either: {why}"
        )],
        (SourceCheck::NotChecked { .. }, Some(note)) => {
            vec![format!("note: {note}"), check_line(check, md5_checked)]
        }
        _ => vec![check_line(check, md5_checked)],
    }
}

/// The line about published checksums, which says so plainly when the image
/// could not be checked at all.
pub fn check_line(check: &SourceCheck, md5_checked: bool) -> String {
    match check {
        SourceCheck::NotChecked { why } if !md5_checked => format!(
            "the image was NOT checked: no implanted MD5 was checked and no published checksum: {why}"
        ),
        _ => check.summary(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::signed_checksum::{ChecksumReport, Trust};

    fn not_checked() -> SourceCheck {
        SourceCheck::NotChecked {
            why: "no CHECKSUM beside the image".into(),
        }
    }

    fn checked() -> SourceCheck {
        SourceCheck::Checked(ChecksumReport {
            file: "/isos/Fedora-CHECKSUM".into(),
            image: "Fedora.iso".into(),
            trust: Trust::Unsigned,
            signed: false,
            expected_sha256: "ab".repeat(32),
            actual_sha256: Some("ab".repeat(32)),
            matched: Some(true),
            discovered: true,
        })
    }

    #[test]
    fn nothing_checked_is_said_once_and_plainly() {
        let lines = check_lines(&not_checked(), Some("the ISO has no implanted MD5"), false);
        assert_eq!(
            lines,
            vec![
                "note: the image was NOT checked: the ISO has no implanted MD5; no published checksum either: no CHECKSUM beside the image"
            ]
        );
        let lines = check_lines(&not_checked(), None, false);
        assert_eq!(
            lines,
            vec![
                "the image was NOT checked: no implanted MD5 was checked and no published checksum: no CHECKSUM beside the image"
            ]
        );
    }

    #[test]
    fn a_checked_md5_leaves_the_missing_checksum_a_plain_note() {
        let lines = check_lines(&not_checked(), Some("an MD5 note"), true);
        assert_eq!(
            lines,
            vec![
                "note: an MD5 note".to_string(),
                "no published checksum checked: no CHECKSUM beside the image".to_string(),
            ]
        );
        assert_eq!(
            check_lines(&not_checked(), None, true),
            vec!["no published checksum checked: no CHECKSUM beside the image"]
        );
    }

    #[test]
    fn a_checked_checksum_needs_no_md5_note() {
        let check = checked();
        for md5 in [false, true] {
            let lines = check_lines(&check, Some("the ISO has no implanted MD5"), md5);
            assert_eq!(lines, vec![check.summary()]);
            assert!(lines[0].contains("sha256 matched"), "{lines:?}");
        }
    }

    #[test]
    fn download_only_json_names_the_file_and_its_check() {
        let acquired = Acquired {
            path: PathBuf::from("/cache/Fedora.iso"),
            check: checked(),
        };
        let text = acquired
            .to_json(Path::new("https://example.org/Fedora.iso"))
            .unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["schema"], DOWNLOAD_SCHEMA);
        assert_eq!(value["source"], "https://example.org/Fedora.iso");
        assert_eq!(value["file"], "/cache/Fedora.iso");
        assert_eq!(value["checksum"]["status"], "checked");
        assert_eq!(value["checksum"]["matched"], true);
    }
}
