//! `livestick devices`: the sticks (and with `--all`, every disk) this machine
//! has, what is on them, and whether livestick would write to them.

use std::fmt::Write as _;

use crate::cli::devices::DevicesArgs;
use crate::disk::devices::{
    self, BlockDevice, DeviceError, FsInfo, Host, Listing, LiveInfo, OverlayInfo, OverlayProbe,
};
use crate::io::ReadSeek;
use crate::persist::snapshot;
use crate::size::human;

pub fn run(args: &DevicesArgs, json: bool) -> anyhow::Result<()> {
    let listing = list(&Host::live(), args.all)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&listing)?);
        return Ok(());
    }
    for note in &listing.notes {
        eprintln!("note: {note}");
    }
    if listing.devices.is_empty() {
        println!(
            "{}",
            if args.all {
                "no block devices found"
            } else {
                "no removable devices found; plug in a stick, or use --all to see fixed disks and loop devices"
            }
        );
        return Ok(());
    }
    let mut out = String::new();
    for (i, dev) in listing.devices.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        render(&mut out, dev);
    }
    print!("{out}");
    Ok(())
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

fn render(out: &mut String, dev: &BlockDevice) {
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
    let _ = writeln!(
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
    );
    if let Some(serial) = &f.serial {
        let _ = writeln!(out, "    serial {serial}");
    }
    for mp in &dev.system {
        let _ = writeln!(
            out,
            "    SYSTEM DISK: {mp} is on it (livestick never writes here)"
        );
    }
    for finding in &dev.busy {
        let _ = writeln!(out, "    in use: {finding}");
    }
    if let Some(fs) = &dev.filesystem {
        let _ = writeln!(out, "    whole device: {}", fs_text(fs));
    }
    if let Some(table) = dev.table {
        let _ = writeln!(out, "    {table} partition table");
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
        let _ = writeln!(out, "{line}");
    }
    if let Some(live) = &dev.live {
        let _ = writeln!(out, "    {}", live_text(live));
    }
    for note in &dev.notes {
        let _ = writeln!(out, "    note: {note}");
    }
}

/// What `livestick devices` lists: `disk::devices`'s listing with each
/// dm-snapshot overlay described by `persist::snapshot`, which `disk/` may not
/// import.
pub fn list(host: &Host, all: bool) -> Result<Listing, DeviceError> {
    devices::list_with(host, all, &DmSnapshotProbe)
}

/// Reads an overlay file that is not an ext4 image as a dm-snapshot store.
struct DmSnapshotProbe;

impl OverlayProbe for DmSnapshotProbe {
    fn describe(&self, mut file: &mut dyn ReadSeek, size: u64, info: &mut OverlayInfo) {
        match snapshot::status(&mut file, size, 8, None) {
            Ok(report) => {
                info.kind = Some("dm-snapshot");
                info.state = Some(report.state.to_string());
                info.percent_used = Some(report.percent_used);
                info.dm_status = Some(report.dm_status);
            }
            Err(e) => info.problem = Some(e.to_string()),
        }
    }
}
