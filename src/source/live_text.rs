//! What `livestick inspect` shows a person: a [`LiveImage`] as a table of
//! labelled lines (the JSON is the image itself).

use std::fmt::{self, Display, Formatter};

use crate::size::human;

use super::live::{LiveImage, RootKind};

/// The human-readable view of a [`LiveImage`].
pub struct LiveImageText<'a>(pub &'a LiveImage);

impl Display for LiveImageText<'_> {
    fn fmt(&self, out: &mut Formatter<'_>) -> fmt::Result {
        let image = self.0;
        let root = match &image.root {
            RootKind::Nested { image } => {
                format!("nested {image} (dm-snapshot or OverlayFS overlay)")
            }
            RootKind::Flat => "flat root in squashfs (OverlayFS overlay only)".to_string(),
            RootKind::Erofs => "EROFS image".to_string(),
            RootKind::Unknown { reason } => format!("unknown ({reason})"),
            RootKind::Unrecognised { reason } => format!("not a root image ({reason})"),
        };
        writeln!(out, "ISO:           {}", image.path.display())?;
        writeln!(out, "label:         {}", image.label)?;
        writeln!(out, "size:          {}", human(image.volume_size))?;
        writeln!(out, "layout:        {}", image.layout)?;
        writeln!(
            out,
            "squashfs:      {} ({}, {})",
            image.squashfs.path,
            human(image.squashfs.size),
            image.compressor.as_deref().unwrap_or("unknown compressor")
        )?;
        writeln!(out, "root:          {root}")?;
        if let Some(l) = &image.ext4_live {
            writeln!(
                out,
                "ext4 layout:   boot files on FAT partition {}; the live directory on ext4 partition {} (label {}, UUID {}, {}, {} free)",
                l.boot_partition,
                l.partition,
                l.label,
                l.uuid,
                human(l.size_bytes),
                human(l.free_bytes)
            )?;
            for f in &l.files {
                writeln!(out, "  {:>10}  {}", human(f.size_bytes), f.path)?;
            }
        }
        writeln!(
            out,
            "implanted MD5: {}",
            if image.implanted_md5 {
                "present (checked before writing)"
            } else {
                "absent (nothing can check this ISO's contents before writing)"
            }
        )?;
        writeln!(out, "kernels:       {}", image.kernels.join(", "))?;
        writeln!(out, "initrds:       {}", image.initrds.join(", "))?;
        writeln!(out, "EFI files:")?;
        for f in &image.efi_files {
            writeln!(out, "  {:>10}  {}", human(f.size), f.path)?;
        }
        for m in &image.menus {
            writeln!(
                out,
                "menu:          {} ({}, timeout {}, default {})",
                m.path,
                m.menu.source,
                m.menu
                    .timeout_secs
                    .map(|t| format!("{t}s"))
                    .unwrap_or_else(|| "none".into()),
                m.menu.default_index
            )?;
            for e in &m.menu.entries {
                writeln!(out, "  [{}] {}", e.purpose, e.title)?;
                writeln!(
                    out,
                    "      kernel: {}  initrd: {}",
                    e.kernel,
                    e.initrds.join(",")
                )?;
                writeln!(out, "      args:   {}", e.args)?;
            }
        }
        for w in &image.warnings {
            writeln!(out, "warning: {w}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::size::MIB;
    use crate::source::iso::IsoEntry;
    use crate::source::live::{self, FileInfo, LayoutKind, SourceKind};

    const ISOLINUX: &str = "timeout 50\n\
        default linux\n\
        label linux\n\
        \x20 menu label ^Start Fedora-Test-42\n\
        \x20 kernel vmlinuz\n\
        \x20 append initrd=initrd.img root=live:CDLABEL=Fedora-Test-42 rd.live.image quiet\n";

    fn image(root: RootKind) -> LiveImage {
        let mut menus = Vec::new();
        let mut errors = Vec::new();
        live::parse_menu_file(
            "/isolinux/isolinux.cfg",
            false,
            ISOLINUX.as_bytes(),
            &mut menus,
            &mut errors,
        );
        assert!(errors.is_empty(), "{errors:?}");
        let squashfs = FileInfo {
            path: "/LiveOS/squashfs.img".into(),
            size: 1500 * MIB,
        };
        LiveImage {
            path: PathBuf::from("/isos/Fedora-Test-Live-42.iso"),
            source_kind: SourceKind::Iso,
            label: "Fedora-Test-42".into(),
            volume_size: 2048 * MIB,
            layout: LayoutKind::Isolinux,
            live_dir: "LiveOS".into(),
            ext4_live: None,
            squashfs: squashfs.clone(),
            root,
            compressor: None,
            menus,
            kernels: vec!["/isolinux/vmlinuz".into()],
            initrds: vec!["/isolinux/initrd.img".into()],
            boot_files: Vec::new(),
            warnings: vec!["a menu names a missing kernel".into()],
            efi_files: vec![FileInfo {
                path: "/EFI/BOOT/BOOTX64.EFI".into(),
                size: MIB,
            }],
            live_files: vec![squashfs],
            implanted_md5: false,
            source_overlay: None,
            source_home: None,
            squashfs_entry: IsoEntry {
                path: "/LiveOS/squashfs.img".into(),
                name: "squashfs.img".into(),
                is_dir: false,
                size: 1500 * MIB,
                extents: Vec::new(),
            },
        }
    }

    #[test]
    fn every_fact_has_its_labelled_line() {
        let img = image(RootKind::Nested {
            image: "LiveOS/rootfs.img".into(),
        });
        let text = LiveImageText(&img).to_string();
        let head: Vec<&str> = text.lines().take(11).collect();
        assert_eq!(
            head,
            [
                "ISO:           /isos/Fedora-Test-Live-42.iso",
                "label:         Fedora-Test-42",
                "size:          2 GiB",
                &format!("layout:        {}", LayoutKind::Isolinux),
                "squashfs:      /LiveOS/squashfs.img (1.5 GiB, unknown compressor)",
                "root:          nested LiveOS/rootfs.img (dm-snapshot or OverlayFS overlay)",
                "implanted MD5: absent (nothing can check this ISO's contents before writing)",
                "kernels:       /isolinux/vmlinuz",
                "initrds:       /isolinux/initrd.img",
                "EFI files:",
                "       1 MiB  /EFI/BOOT/BOOTX64.EFI",
            ]
        );
        let menu = &img.menus[0].menu;
        assert!(
            text.contains(&format!(
                "menu:          /isolinux/isolinux.cfg ({}, timeout 5s, default 0)\n",
                menu.source
            )),
            "{text}"
        );
        let entry = &menu.entries[0];
        assert!(
            text.contains(&format!(
                "  [{}] {}\n      kernel: /isolinux/vmlinuz  initrd: /isolinux/initrd.img\n      args:   {}\n",
                entry.purpose, entry.title, entry.args
            )),
            "{text}"
        );
        assert!(
            text.ends_with("warning: a menu names a missing kernel\n"),
            "{text}"
        );
    }

    #[test]
    fn each_root_kind_says_which_overlays_it_takes() {
        for (root, line) in [
            (
                RootKind::Flat,
                "root:          flat root in squashfs (OverlayFS overlay only)\n",
            ),
            (RootKind::Erofs, "root:          EROFS image\n"),
            (
                RootKind::Unknown {
                    reason: "unreadable".into(),
                },
                "root:          unknown (unreadable)\n",
            ),
            (
                RootKind::Unrecognised {
                    reason: "neither squashfs nor EROFS".into(),
                },
                "root:          not a root image (neither squashfs nor EROFS)\n",
            ),
        ] {
            let text = LiveImageText(&image(root)).to_string();
            assert!(text.contains(line), "{line:?} in {text}");
        }
        let mut img = image(RootKind::Flat);
        img.implanted_md5 = true;
        img.compressor = Some("zstd".into());
        let text = LiveImageText(&img).to_string();
        assert!(text.contains("(1.5 GiB, zstd)\n"), "{text}");
        assert!(
            text.contains("implanted MD5: present (checked before writing)\n"),
            "{text}"
        );
    }
}
