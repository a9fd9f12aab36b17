//! What `livestick home info|resize` reports, as values: `info`'s
//! [`HomeReport`] as text ([`HomeText`]), and a resize's plan and result
//! ([`ResizeReport`]: its JSON by `Serialize`, its text by `Display`). The
//! front only chooses one and prints it.

use std::fmt::{self, Display, Formatter};

use serde::Serialize;

use crate::persist::home;
use crate::persist::home_stick::{HomeReport, ResizePlan};
use crate::size::{MIB, human};

/// `home info`'s text: one labelled line per fact.
pub struct HomeText<'a>(pub &'a HomeReport);

impl Display for HomeText<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let rep = self.0;
        match &rep.home {
            Some(home) => writeln!(f, "home:        {}:{home}", rep.target.display())?,
            None => writeln!(f, "home:        {}", rep.target.display())?,
        }
        writeln!(
            f,
            "size:        {} ({} bytes)",
            human(rep.file_size),
            rep.file_size
        )?;
        match &rep.luks {
            Some(l) => {
                writeln!(
                    f,
                    "encrypted:   yes, LUKS2 {} {}-bit, {}-byte sectors, keyslots: {}",
                    l.cipher,
                    l.key_bits,
                    l.sector_size,
                    l.keyslots.join(", ")
                )?;
                writeln!(f, "luks uuid:   {}", l.uuid)?;
                if let Some(k) = &l.opened_keyslot {
                    writeln!(f, "unlocked:    keyslot {k}")?;
                }
            }
            None => writeln!(f, "encrypted:   no")?,
        }
        match &rep.fs {
            Some(fs) => {
                writeln!(
                    f,
                    "fs:          ext4, label {:?}, uuid {}",
                    fs.label, fs.uuid
                )?;
                writeln!(
                    f,
                    "fs size:     {} ({} bytes)",
                    human(fs.size_bytes),
                    fs.size_bytes
                )?;
                let pct = (fs.used_bytes * 100)
                    .checked_div(fs.size_bytes)
                    .unwrap_or(0);
                writeln!(
                    f,
                    "used:        {} ({} bytes, {pct}%)",
                    human(fs.used_bytes),
                    fs.used_bytes
                )?;
                let free = rep.fs_free_bytes.unwrap_or(0);
                writeln!(f, "free:        {} ({} bytes)", human(free), free)?;
                let room = rep
                    .file_size
                    .saturating_sub(rep.luks.as_ref().map_or(0, |l| l.data_offset));
                if fs.size_bytes > room {
                    writeln!(
                        f,
                        "warning:     the file system is larger than the room it has ({} of {} bytes): home.img was cut short and its end is lost; `home resize` refuses it",
                        room, fs.size_bytes
                    )?;
                }
            }
            None => writeln!(
                f,
                "fs:          locked (give --passphrase-file FILE or --passphrase-stdin to see size, use and label)"
            )?,
        }
        if let Some(free) = rep.stick_free_bytes {
            writeln!(
                f,
                "stick free:  {} ({} MiB) — home can grow to {} MiB",
                human(free),
                free / MIB,
                grow_limit(rep.file_size, free)
            )?;
        }
        if let Some(s) = rep.stale_staging {
            writeln!(
                f,
                "note:        a home.img.new ({}) from an interrupted resize is on the stick; the next `home resize` removes it",
                human(s)
            )?;
        }
        Ok(())
    }
}

/// The largest size in MiB the home can be resized to: the new copy is written
/// next to the old one, so it must fit in the free space, and below the FAT file
/// limit; never less than what it is.
pub fn grow_limit(current: u64, free: u64) -> u64 {
    (free / MIB).min(home::FAT_MAX_FILE_MIB).max(current / MIB)
}

/// What `home resize` did or would do: its `--json` document, and its text.
#[derive(Serialize)]
pub struct ResizeReport<'a> {
    pub dry_run: bool,
    pub plan: &'a ResizePlan,
    /// The home after the resize (absent on a dry run).
    pub result: Option<HomeReport>,
}

impl Display for ResizeReport<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let plan = self.plan;
        let name = match &plan.home {
            Some(h) => format!("{}:{h}", plan.target.display()),
            None => plan.target.display().to_string(),
        };
        if plan.unchanged {
            return writeln!(
                f,
                "{name} is already {} MiB; nothing to do",
                plan.new_bytes / MIB
            );
        }
        if self.dry_run {
            writeln!(
                f,
                "would grow {name} from {} MiB to {} MiB ({}):",
                plan.current_bytes / MIB,
                plan.new_bytes / MIB,
                if plan.encrypted { "LUKS2" } else { "ext4" }
            )?;
            for (i, s) in plan.steps.iter().enumerate() {
                writeln!(f, "  {}. {s}", i + 1)?;
            }
            if let (Some(need), Some(free)) = (plan.stick_needed_bytes, plan.stick_free_bytes) {
                writeln!(
                    f,
                    "stick space: {} MiB needed for the new copy, {} MiB free",
                    need.div_ceil(MIB),
                    free / MIB
                )?;
            }
            writeln!(
                f,
                "work space:  up to {} MiB in {}",
                plan.workdir_needed_bytes.div_ceil(MIB),
                plan.workdir.display()
            )?;
            if plan.memory_needed_bytes > 0 {
                writeln!(
                    f,
                    "memory:      about {} MiB for the decrypted copy (never written to a disk)",
                    plan.memory_needed_bytes.div_ceil(MIB)
                )?;
            }
            return Ok(());
        }
        writeln!(
            f,
            "grew {name} from {} MiB to {} MiB",
            plan.current_bytes / MIB,
            plan.new_bytes / MIB
        )?;
        if let Some(r) = &self.result {
            write!(f, "{}", HomeText(r))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::disk::ext4::Ext4Info;
    use crate::persist::home_stick::LuksSummary;

    fn plain() -> HomeReport {
        HomeReport {
            target: PathBuf::from("/dev/sdz"),
            home: Some("/LiveOS/home.img".into()),
            file_size: 256 * MIB,
            encrypted: false,
            locked: false,
            luks: None,
            fs: Some(Ext4Info {
                label: "HOME".into(),
                uuid: "0b1e".into(),
                block_size: 4096,
                block_count: 65536,
                free_blocks: 49152,
                reserved_blocks: 0,
                size_bytes: 256 * MIB,
                used_bytes: 64 * MIB,
            }),
            fs_free_bytes: Some(192 * MIB),
            stick_free_bytes: Some(1000 * MIB),
            stale_staging: None,
            repaired: Vec::new(),
        }
    }

    #[test]
    fn a_plain_home_on_a_stick() {
        assert_eq!(
            HomeText(&plain()).to_string(),
            "home:        /dev/sdz:/LiveOS/home.img\n\
             size:        256 MiB (268435456 bytes)\n\
             encrypted:   no\n\
             fs:          ext4, label \"HOME\", uuid 0b1e\n\
             fs size:     256 MiB (268435456 bytes)\n\
             used:        64 MiB (67108864 bytes, 25%)\n\
             free:        192 MiB (201326592 bytes)\n\
             stick free:  1000 MiB (1000 MiB) — home can grow to 1000 MiB\n"
        );
    }

    #[test]
    fn a_locked_home_says_how_to_unlock_it() {
        let mut rep = plain();
        rep.home = None;
        rep.target = PathBuf::from("/tmp/home.img");
        rep.encrypted = true;
        rep.locked = true;
        rep.fs = None;
        rep.fs_free_bytes = None;
        rep.stick_free_bytes = None;
        rep.stale_staging = Some(3 * MIB);
        rep.luks = Some(LuksSummary {
            uuid: "c0ffee".into(),
            label: String::new(),
            cipher: "aes-xts-plain64".into(),
            key_bits: 512,
            sector_size: 4096,
            data_offset: 16 * MIB,
            keyslots: vec!["argon2id".into(), "pbkdf2".into()],
            opened_keyslot: None,
        });
        let text = HomeText(&rep).to_string();
        assert_eq!(
            text,
            "home:        /tmp/home.img\n\
             size:        256 MiB (268435456 bytes)\n\
             encrypted:   yes, LUKS2 aes-xts-plain64 512-bit, 4096-byte sectors, keyslots: argon2id, pbkdf2\n\
             luks uuid:   c0ffee\n\
             fs:          locked (give --passphrase-file FILE or --passphrase-stdin to see size, use and label)\n\
             note:        a home.img.new (3 MiB) from an interrupted resize is on the stick; the next `home resize` removes it\n"
        );
        rep.luks.as_mut().unwrap().opened_keyslot = Some("0".into());
        assert!(
            HomeText(&rep)
                .to_string()
                .contains("luks uuid:   c0ffee\nunlocked:    keyslot 0\n")
        );
    }

    #[test]
    fn the_grow_limit_is_the_free_space_under_fats_limit() {
        assert_eq!(grow_limit(256 * MIB, 1000 * MIB), 1000);
        assert_eq!(grow_limit(256 * MIB, 9000 * MIB), home::FAT_MAX_FILE_MIB);
        // A stick too full to grow still shows the home's own size.
        assert_eq!(grow_limit(256 * MIB, 10 * MIB), 256);
    }

    fn plan() -> ResizePlan {
        ResizePlan {
            target: PathBuf::from("/dev/sdz"),
            home: Some("/LiveOS/home.img".into()),
            encrypted: true,
            current_bytes: 256 * MIB,
            new_bytes: 512 * MIB,
            unchanged: false,
            stick_needed_bytes: Some(512 * MIB + 1),
            stick_free_bytes: Some(1000 * MIB),
            workdir: PathBuf::from("/var/tmp"),
            workdir_needed_bytes: 512 * MIB,
            memory_needed_bytes: 512 * MIB,
            steps: vec!["copy".into(), "grow".into()],
        }
    }

    #[test]
    fn a_dry_run_lists_the_steps_and_the_room_they_need() {
        let plan = plan();
        let report = ResizeReport {
            dry_run: true,
            plan: &plan,
            result: None,
        };
        assert_eq!(
            report.to_string(),
            "would grow /dev/sdz:/LiveOS/home.img from 256 MiB to 512 MiB (LUKS2):\n\
             \x20 1. copy\n\
             \x20 2. grow\n\
             stick space: 513 MiB needed for the new copy, 1000 MiB free\n\
             work space:  up to 512 MiB in /var/tmp\n\
             memory:      about 512 MiB for the decrypted copy (never written to a disk)\n"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["dry_run"], true);
        assert_eq!(json["plan"]["new_bytes"], 512 * MIB);
        assert!(json["result"].is_null());
        let text = serde_json::to_string(&report).unwrap();
        assert!(text.starts_with("{\"dry_run\":true,\"plan\":{"), "{text}");
    }

    #[test]
    fn a_done_resize_shows_the_home_after_it() {
        let mut plan = plan();
        let report = ResizeReport {
            dry_run: false,
            plan: &plan,
            result: Some(plain()),
        };
        let text = report.to_string();
        assert!(
            text.starts_with(
                "grew /dev/sdz:/LiveOS/home.img from 256 MiB to 512 MiB\nhome:        /dev/sdz:/LiveOS/home.img\n"
            ),
            "{text}"
        );
        plan.unchanged = true;
        plan.home = None;
        let report = ResizeReport {
            dry_run: true,
            plan: &plan,
            result: None,
        };
        assert_eq!(
            report.to_string(),
            "/dev/sdz is already 512 MiB; nothing to do\n"
        );
    }
}
