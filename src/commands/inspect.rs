//! `livestick inspect ISO`

use std::io::IsTerminal;

use crate::cli::InspectArgs;
use crate::live_source;
use crate::progress::ProgressMode;
use crate::size::human;
use crate::source::compressed;
use crate::source::live::{LiveImage, RootKind};

pub fn run(args: &InspectArgs, json: bool) -> anyhow::Result<()> {
    let mode = if json || !std::io::stderr().is_terminal() {
        ProgressMode::Quiet
    } else {
        ProgressMode::Bar
    };
    let unpacked = compressed::open(&args.iso, mode)?;
    let mut image = live_source::inspect(unpacked.path())?;
    // A compressed ISO is read from its unpacked copy; the user named the original.
    image.path = args.iso.clone();
    if json {
        println!("{}", serde_json::to_string_pretty(&image)?);
    } else {
        print!("{}", table(&image));
    }
    Ok(())
}

/// The human-readable view of a [`LiveImage`].
pub fn table(image: &LiveImage) -> String {
    let mut out = String::new();
    let root = match &image.root {
        RootKind::Nested { image } => format!("nested {image} (dm-snapshot or OverlayFS overlay)"),
        RootKind::Flat => "flat root in squashfs (OverlayFS overlay only)".to_string(),
        RootKind::Erofs => "EROFS image".to_string(),
        RootKind::Unknown { reason } => format!("unknown ({reason})"),
        RootKind::Unrecognised { reason } => format!("not a root image ({reason})"),
    };
    out.push_str(&format!("ISO:           {}\n", image.path.display()));
    out.push_str(&format!("label:         {}\n", image.label));
    out.push_str(&format!("size:          {}\n", human(image.volume_size)));
    out.push_str(&format!("layout:        {}\n", image.layout));
    out.push_str(&format!(
        "squashfs:      {} ({}, {})\n",
        image.squashfs.path,
        human(image.squashfs.size),
        image.compressor.as_deref().unwrap_or("unknown compressor")
    ));
    out.push_str(&format!("root:          {root}\n"));
    if let Some(l) = &image.ext4_live {
        out.push_str(&format!(
            "ext4 layout:   boot files on FAT partition {}; the live directory on ext4 partition {} (label {}, UUID {}, {}, {} free)\n",
            l.boot_partition,
            l.partition,
            l.label,
            l.uuid,
            human(l.size_bytes),
            human(l.free_bytes)
        ));
        for f in &l.files {
            out.push_str(&format!("  {:>10}  {}\n", human(f.size_bytes), f.path));
        }
    }
    out.push_str(&format!(
        "implanted MD5: {}\n",
        if image.implanted_md5 {
            "present (checked before writing)"
        } else {
            "absent (nothing can check this ISO's contents before writing)"
        }
    ));
    out.push_str(&format!("kernels:       {}\n", image.kernels.join(", ")));
    out.push_str(&format!("initrds:       {}\n", image.initrds.join(", ")));
    out.push_str("EFI files:\n");
    for f in &image.efi_files {
        out.push_str(&format!("  {:>10}  {}\n", human(f.size), f.path));
    }
    for m in &image.menus {
        out.push_str(&format!(
            "menu:          {} ({}, timeout {}, default {})\n",
            m.path,
            m.menu.source,
            m.menu
                .timeout_secs
                .map(|t| format!("{t}s"))
                .unwrap_or_else(|| "none".into()),
            m.menu.default_index
        ));
        for e in &m.menu.entries {
            out.push_str(&format!("  [{}] {}\n", e.purpose, e.title));
            out.push_str(&format!(
                "      kernel: {}  initrd: {}\n",
                e.kernel,
                e.initrds.join(",")
            ));
            out.push_str(&format!("      args:   {}\n", e.args));
        }
    }
    for w in &image.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    out
}
