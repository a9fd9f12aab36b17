//! What `livestick write` tells a person after writing one target, as a value:
//! its `Display` is the text, so the command only chooses between it and the
//! JSON document. (A batch reports through `batch::Batch::finish`.)

use std::fmt::{self, Display, Formatter};

use crate::apply::ApplyReport;
use crate::plan::Plan;
use crate::size::human;
use crate::source::acquire;
use crate::source::live::LiveImage;
use crate::source::signed_checksum::SourceCheck;

/// One target's write, for a person.
pub struct WriteReport<'a> {
    /// The source's volume label, as the ISO names the system.
    pub source_label: &'a str,
    pub report: &'a ApplyReport,
    /// Whether the ISO's implanted MD5 was checked before writing (and passed:
    /// a failed check stops the write).
    pub md5_checked: bool,
    /// What checked the source, said once (`acquire::check_lines`).
    pub check_lines: Vec<String>,
}

impl<'a> WriteReport<'a> {
    pub fn new(
        live: &'a LiveImage,
        plan: &Plan,
        report: &'a ApplyReport,
        md5_checked: bool,
        source_check: &SourceCheck,
    ) -> Self {
        let iso_note = plan.iso_check.note(live);
        WriteReport {
            source_label: &live.label,
            report,
            md5_checked,
            check_lines: acquire::check_lines(source_check, iso_note.as_deref(), md5_checked),
        }
    }
}

impl Display for WriteReport<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let report = self.report;
        writeln!(
            f,
            "Wrote {} to {}: {} FAT32 \"{}\" UUID {}{}{}",
            self.source_label,
            report.target,
            report.table,
            report.label,
            report.fs_uuid,
            report
                .overlay
                .as_ref()
                .map(|o| format!(", overlay {o}"))
                .unwrap_or_default(),
            report
                .home
                .as_ref()
                .map(|h| format!(", home {h}"))
                .unwrap_or_default()
        )?;
        writeln!(
            f,
            "  {} files, {}; boots BIOS: {}, UEFI: {}",
            report.files.len(),
            human(report.files.iter().map(|f| f.size).sum()),
            if report.bios { "yes" } else { "no" },
            if report.uefi { "yes" } else { "no" }
        )?;
        // Persistence is allocated, not written: what the stick really took is this.
        writeln!(
            f,
            "  {} written to the stick, {}",
            human(report.bytes_written),
            if report.verified {
                format!("{} read back and verified", human(report.bytes_verified))
            } else {
                "not verified".to_string()
            }
        )?;
        if let Some(kept) = &report.kept_overlay {
            if kept.reset {
                writeln!(
                    f,
                    "  overlay {} emptied, its {} discarded: {}",
                    kept.to,
                    kept.used_text(),
                    kept.why
                )?;
            } else {
                writeln!(
                    f,
                    "  overlay {} kept with its {}: {}",
                    kept.to,
                    kept.used_text(),
                    kept.why
                )?;
            }
        }
        if self.md5_checked {
            writeln!(f, "  ISO implanted MD5 checked: passed")?;
        }
        for w in &report.warnings {
            writeln!(f, "  warning: {w}")?;
        }
        for line in &self.check_lines {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::WrittenFile;
    use crate::disk::partition::TableKind;
    use crate::plan::KeptOverlay;
    use crate::size::MIB;

    fn file(path: &str, size: u64) -> WrittenFile {
        WrittenFile {
            path: path.into(),
            size,
            written: size,
            sha256: String::new(),
            verified: true,
        }
    }

    fn applied() -> ApplyReport {
        ApplyReport {
            target: "/dev/sdz".into(),
            label: "FEDORA-WS".into(),
            fs_uuid: "1234-ABCD".into(),
            table: TableKind::Mbr,
            formatted: true,
            files: vec![
                file("/LiveOS/squashfs.img", 2 * 1024 * MIB),
                file("/x", MIB),
            ],
            overlay: None,
            kept_overlay: None,
            home: None,
            bios: true,
            uefi: false,
            verified: true,
            bytes_written: 3 * MIB,
            bytes_verified: 3 * MIB,
            warnings: Vec::new(),
            iso_check: crate::plan::IsoCheck::ImplantedMd5,
            iso_md5: None,
            checksum: None,
            repaired: Vec::new(),
        }
    }

    #[test]
    fn a_plain_write_says_what_went_where_and_what_was_checked() {
        let report = applied();
        let text = WriteReport {
            source_label: "Fedora-WS-Live-42",
            report: &report,
            md5_checked: true,
            check_lines: vec!["no published checksum checked: none given".into()],
        }
        .to_string();
        assert_eq!(
            text,
            "Wrote Fedora-WS-Live-42 to /dev/sdz: MBR FAT32 \"FEDORA-WS\" UUID 1234-ABCD\n\
             \x20 2 files, 2.0 GiB; boots BIOS: yes, UEFI: no\n\
             \x20 3 MiB written to the stick, 3 MiB read back and verified\n\
             \x20 ISO implanted MD5 checked: passed\n\
             \x20 no published checksum checked: none given\n"
        );
    }

    #[test]
    fn persistence_a_kept_overlay_and_warnings_each_get_their_line() {
        let mut report = applied();
        report.overlay = Some("LiveOS/overlay-FEDORA-WS-1234-ABCD".into());
        report.home = Some("LiveOS/home.img".into());
        report.verified = false;
        report.kept_overlay = Some(KeptOverlay {
            from: "LiveOS/overlay-OLD".into(),
            to: "LiveOS/overlay-FEDORA-WS-1234-ABCD".into(),
            size: 512 * MIB,
            reset: true,
            why: "the root image changed".into(),
            used: Some(12 * MIB),
        });
        report.warnings = vec!["the stick is slow".into()];
        let text = WriteReport {
            source_label: "L",
            report: &report,
            md5_checked: false,
            check_lines: vec!["a".into(), "b".into()],
        }
        .to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0]
                .ends_with(", overlay LiveOS/overlay-FEDORA-WS-1234-ABCD, home LiveOS/home.img"),
            "{text}"
        );
        assert_eq!(lines[2], "  3 MiB written to the stick, not verified");
        assert_eq!(
            lines[3],
            "  overlay LiveOS/overlay-FEDORA-WS-1234-ABCD emptied, its 12 MiB of changes discarded: the root image changed"
        );
        assert!(!text.contains("MD5"), "{text}");
        assert_eq!(lines[4..], ["  warning: the stick is slow", "  a", "  b"]);

        report.kept_overlay.as_mut().unwrap().reset = false;
        report.kept_overlay.as_mut().unwrap().used = None;
        let text = WriteReport {
            source_label: "L",
            report: &report,
            md5_checked: false,
            check_lines: Vec::new(),
        }
        .to_string();
        assert!(
            text.contains(
                "  overlay LiveOS/overlay-FEDORA-WS-1234-ABCD kept with its changes of unknown size: the root image changed\n"
            ),
            "{text}"
        );
    }
}
