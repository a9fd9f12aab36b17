//! What `livestick devices` shows a person: the [`Listing`] of
//! [`super::devices`] as text, one block per device (the JSON is the listing
//! itself). The listing's own notes go to stderr and are not part of it.

use std::fmt::{self, Display, Formatter, Write as _};

use crate::size::human;

use super::devices::{BlockDevice, FsInfo, Listing, LiveInfo};

/// The listing's text; `all` is whether fixed disks were asked for, which the
/// line for an empty listing depends on.
pub struct DevicesText<'a> {
    pub listing: &'a Listing,
    pub all: bool,
}

impl Display for DevicesText<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        if self.listing.devices.is_empty() {
            return writeln!(
                f,
                "{}",
                if self.all {
                    "no block devices found"
                } else {
                    "no removable devices found; plug in a stick, or use --all to see fixed disks and loop devices"
                }
            );
        }
        for (i, dev) in self.listing.devices.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", DeviceText(dev))?;
        }
        Ok(())
    }
}

/// One device: a heading line with its size, name and flags, then what is on it.
pub struct DeviceText<'a>(pub &'a BlockDevice);

impl Display for DeviceText<'_> {
    fn fmt(&self, out: &mut Formatter<'_>) -> fmt::Result {
        let dev = self.0;
        let f = &dev.facts;
        let mut name = String::new();
        for part in [&f.vendor, &f.model].into_iter().flatten() {
            if !name.is_empty() {
                name.push(' ');
            }
            name.push_str(part);
        }
        if let Some(backing) = &f.backing_file {
            name = format!("backed by {backing}");
        }
        let mut flags = vec![f.transport.to_string()];
        if f.removable {
            flags.push("removable".into());
        } else if f.hotplug {
            flags.push("hotplug".into());
        }
        if dev.fixed {
            flags.push("fixed".into());
        }
        if f.read_only {
            flags.push("read-only".into());
        }
        if f.logical_sector_size != 512 {
            flags.push(format!("{}-byte sectors", f.logical_sector_size));
        }
        writeln!(
            out,
            "{}  {}  {}  [{}]",
            f.path.display(),
            human(f.size),
            if name.is_empty() {
                "unknown model"
            } else {
                &name
            },
            flags.join(", ")
        )?;
        if let Some(serial) = &f.serial {
            writeln!(out, "    serial {serial}")?;
        }
        for mp in &dev.system {
            writeln!(
                out,
                "    SYSTEM DISK: {mp} is on it (livestick never writes here)"
            )?;
        }
        for finding in &dev.busy {
            writeln!(out, "    in use: {finding}")?;
        }
        if let Some(fs) = &dev.filesystem {
            writeln!(out, "    whole device: {}", fs_text(fs))?;
        }
        if let Some(table) = dev.table {
            writeln!(out, "    {table} partition table")?;
        }
        for p in &dev.partitions {
            let e = &p.entry;
            let mut line = format!(
                "    {:>2}  {:>9}  {}",
                e.number,
                human(e.len),
                e.type_name.unwrap_or(&e.type_id)
            );
            if let Some(fs) = &p.filesystem {
                let _ = write!(line, "  {}", fs_text(fs));
            }
            for mp in &p.mounted {
                let _ = write!(line, "  mounted on {mp}");
            }
            writeln!(out, "{line}")?;
        }
        if let Some(live) = &dev.live {
            writeln!(out, "    {}", live_text(live))?;
        }
        for note in &dev.notes {
            writeln!(out, "    note: {note}")?;
        }
        Ok(())
    }
}

fn fs_text(fs: &FsInfo) -> String {
    let mut s = fs.fs_type.clone();
    if let Some(label) = &fs.label {
        let _ = write!(s, " label {label}");
    }
    if let Some(uuid) = &fs.uuid {
        let _ = write!(s, " uuid {uuid}");
    }
    s
}

fn live_text(live: &LiveInfo) -> String {
    let mut s = format!("LiveOS: label {} in /{}", live.label, live.live_dir);
    if let Some(boot) = live.boot_partition {
        let _ = write!(
            s,
            " on ext4 partition {} (boot files on partition {boot})",
            live.partition
        );
    }
    if live.squashfs_size.is_none() {
        s.push_str(", no squashfs.img");
    }
    for o in &live.overlays {
        let name = o.file.rsplit('/').next().unwrap_or(&o.file);
        let _ = write!(s, "; overlay {name} ({}", human(o.size));
        if let Some(kind) = o.kind {
            let _ = write!(s, ", {kind}");
        }
        if let Some(p) = o.percent_used {
            let _ = write!(s, ", {p:.1}% used");
        }
        if let Some(state) = &o.state
            && state != "valid"
        {
            let _ = write!(s, ", {state}");
        }
        if let Some(problem) = &o.problem {
            let _ = write!(s, ", unreadable: {problem}");
        }
        s.push(')');
    }
    if live.overlays.is_empty() {
        s.push_str("; no overlay");
    }
    match live.home_size {
        Some(size) => {
            let _ = write!(s, "; home.img {}", human(size));
        }
        None => s.push_str("; no home.img"),
    }
    s
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::disk::devices::{DevNum, DeviceFacts, OverlayInfo, PartitionInfo, Transport};
    use crate::disk::partition::{TableEntry, TableKind};
    use crate::size::MIB;

    fn stick() -> BlockDevice {
        BlockDevice {
            facts: DeviceFacts {
                path: PathBuf::from("/dev/sdz"),
                name: "sdz".into(),
                devnum: DevNum {
                    major: 8,
                    minor: 16,
                },
                size: 16 * 1024 * MIB,
                model: Some("Cruzer".into()),
                vendor: Some("SanDisk".into()),
                serial: Some("4C53".into()),
                transport: Transport::Usb,
                removable: true,
                hotplug: true,
                read_only: false,
                logical_sector_size: 512,
                physical_sector_size: 512,
                backing_file: None,
                partition_of: None,
            },
            fixed: false,
            system: Vec::new(),
            busy: Vec::new(),
            mounted: Vec::new(),
            table: Some(TableKind::Mbr),
            filesystem: None,
            partitions: vec![PartitionInfo {
                entry: TableEntry {
                    number: 1,
                    start: MIB,
                    len: 16 * 1024 * MIB - MIB,
                    type_id: "0x0c".into(),
                    type_name: Some("FAT32 (LBA)"),
                    name: None,
                    part_uuid: None,
                    bootable: true,
                },
                kernel_name: Some("sdz1".into()),
                filesystem: Some(FsInfo {
                    fs_type: "vfat".into(),
                    label: Some("FEDORA-WS".into()),
                    uuid: Some("1234-ABCD".into()),
                }),
                mounted: Vec::new(),
            }],
            live: Some(LiveInfo {
                partition: 1,
                boot_partition: None,
                label: "FEDORA-WS".into(),
                uuid: "1234-ABCD".into(),
                live_dir: "LiveOS".into(),
                squashfs_size: Some(2 * 1024 * MIB),
                overlays: vec![OverlayInfo {
                    file: "/LiveOS/overlay-FEDORA-WS-1234-ABCD".into(),
                    size: 512 * MIB,
                    kind: Some("dm-snapshot"),
                    state: Some("valid".into()),
                    percent_used: Some(12.5),
                    dm_status: None,
                    problem: None,
                }],
                home_size: None,
            }),
            notes: Vec::new(),
        }
    }

    fn listing(devices: Vec<BlockDevice>) -> Listing {
        Listing {
            udev: true,
            notes: Vec::new(),
            devices,
        }
    }

    #[test]
    fn a_live_stick_reads_as_one_block() {
        let text = DevicesText {
            listing: &listing(vec![stick()]),
            all: false,
        }
        .to_string();
        assert_eq!(
            text,
            "/dev/sdz  16 GiB  SanDisk Cruzer  [usb, removable]\n\
             \x20   serial 4C53\n\
             \x20   MBR partition table\n\
             \x20    1   16.0 GiB  FAT32 (LBA)  vfat label FEDORA-WS uuid 1234-ABCD\n\
             \x20   LiveOS: label FEDORA-WS in /LiveOS; overlay overlay-FEDORA-WS-1234-ABCD (512 MiB, dm-snapshot, 12.5% used); no home.img\n"
        );
    }

    #[test]
    fn refusals_and_unreadable_overlays_are_said() {
        let mut dev = stick();
        dev.facts.model = None;
        dev.facts.vendor = None;
        dev.facts.removable = false;
        dev.facts.logical_sector_size = 4096;
        dev.fixed = true;
        dev.system = vec!["/boot".into()];
        dev.busy = vec!["/dev/sdz1 is mounted on /mnt".into()];
        dev.partitions[0].mounted = vec!["/mnt".into()];
        let live = dev.live.as_mut().unwrap();
        live.squashfs_size = None;
        live.home_size = Some(1024 * MIB);
        live.overlays[0].state = Some("invalid".into());
        live.overlays[0].problem = Some("bad header".into());
        dev.notes = vec!["the serial could not be read".into()];
        let text = DeviceText(&dev).to_string();
        assert!(
            text.starts_with(
                "/dev/sdz  16 GiB  unknown model  [usb, hotplug, fixed, 4096-byte sectors]\n"
            ),
            "{text}"
        );
        for line in [
            "    SYSTEM DISK: /boot is on it (livestick never writes here)\n",
            "    in use: /dev/sdz1 is mounted on /mnt\n",
            "  mounted on /mnt\n",
            "LiveOS: label FEDORA-WS in /LiveOS, no squashfs.img; overlay overlay-FEDORA-WS-1234-ABCD (512 MiB, dm-snapshot, 12.5% used, invalid, unreadable: bad header); home.img 1 GiB\n",
            "    note: the serial could not be read\n",
        ] {
            assert!(text.contains(line), "{line:?} in {text}");
        }

        dev.live.as_mut().unwrap().overlays.clear();
        dev.facts.backing_file = Some("/srv/stick.img".into());
        let text = DeviceText(&dev).to_string();
        assert!(text.contains("  backed by /srv/stick.img  "), "{text}");
        assert!(text.contains("; no overlay; home.img"), "{text}");
    }

    #[test]
    fn devices_are_apart_and_an_empty_listing_says_what_to_do() {
        let two = DevicesText {
            listing: &listing(vec![stick(), stick()]),
            all: true,
        }
        .to_string();
        let one = DeviceText(&stick()).to_string();
        assert_eq!(two, format!("{one}\n{one}"));
        let none = |all| {
            DevicesText {
                listing: &listing(Vec::new()),
                all,
            }
            .to_string()
        };
        assert_eq!(none(true), "no block devices found\n");
        assert!(none(false).contains("use --all"), "{}", none(false));
    }
}
