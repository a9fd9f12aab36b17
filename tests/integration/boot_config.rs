//! Boot configs end to end: real-world-shaped ISO menus are parsed, rendered
//! for the stick in both loaders' syntax, and the rendered text is parsed back
//! with the same parsers to show the stick boots the same entries with the
//! rewritten arguments.

use livestick::boot::cmdline::{
    DracutNames, KernelArgs, LiveRoot, OverlayBoot, StickArgs, live_root_label, rewrite_for_stick,
};
use livestick::boot::menu::{
    BootMenu, EntryPurpose, MenuEntry, MenuSource, SerialConsole, parse_grub, parse_isolinux,
};
use livestick::boot::render::{RenderParams, WAIT_FOREVER, render_grub, render_syslinux};

/// Shaped like Fedora Workstation Live's isolinux.cfg, with CRLF line ends,
/// tabs, a help text, a submenu, localboot and a memtest entry.
const FEDORA_ISOLINUX: &str = "default vesamenu.c32\r
timeout 600\r
serial 0 115200\r
\r
display boot.msg\r
\r
# Clear the screen when exiting the menu.\r
menu clear\r
menu background splash.png\r
menu title Fedora-Workstation-Live 40\r
menu vshift 8\r
menu rows 18\r
menu tabmsg Press Tab for full configuration options on menu items.\r
menu color border * #00000000 #00000000 none\r
\r
menu separator # insert an empty line\r
\r
label linux\r
  menu label ^Start Fedora-Workstation-Live 40\r
  kernel vmlinuz\r
  append initrd=initrd.img root=live:CDLABEL=Fedora-WS-Live-40-1-14  rd.live.image quiet rhgb console=ttyS0,115200\r
\r
label check\r
  menu label Test this ^media & start Fedora-Workstation-Live 40\r
  menu default\r
  kernel vmlinuz\r
  append initrd=initrd.img root=live:CDLABEL=Fedora-WS-Live-40-1-14  rd.live.image rd.live.check quiet\r
\r
menu separator # insert an empty line\r
\r
# utilities submenu\r
menu begin ^Troubleshooting\r
  menu title Troubleshooting Fedora-Workstation-Live 40\r
\r
label basic\r
\tmenu indent count 5\r
\tmenu label Start Fedora-Workstation-Live 40 in ^basic graphics mode\r
\ttext help\r
\t\tTry this option out if you're having trouble starting\r
\t\tFedora-Workstation-Live 40.\r
\tendtext\r
\tkernel vmlinuz\r
\tappend initrd=initrd.img root=live:CDLABEL=Fedora-WS-Live-40-1-14  rd.live.image nomodeset quiet rhgb\r
\r
label rescue\r
  menu indent count 5\r
  menu label ^Rescue a Fedora-Workstation-Live 40 system\r
  kernel vmlinuz\r
  append initrd=initrd.img,extra.img root=live:CDLABEL=Fedora-WS-Live-40-1-14  rd.live.image rescue quiet rhgb \"vendor.note=a b\"\r
\r
label memtest\r
  menu label Run a ^memory test\r
  kernel memtest\r
\r
label local\r
  menu label Boot from ^local drive\r
  localboot 0xffff\r
\r
label returntomain\r
  menu label Return to ^main menu\r
  menu exit\r
\r
menu end\r
";

/// Shaped like Fedora's EFI/BOOT/grub.cfg (linuxefi, a submenu with a
/// chainloader entry, a function, the check entry as default).
const FEDORA_EFI_GRUB: &str = "set default=\"1\"

function load_video {
  insmod efi_gop
  insmod efi_uga
  insmod video_bochs
  insmod video_cirrus
  insmod all_video
}

load_video
set gfxpayload=keep
insmod gzio
insmod part_gpt
insmod ext2
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console

set timeout=60
### END /etc/grub.d/00_header ###

search --no-floppy --set=root -l 'Fedora-WS-Live-40-1-14'

### BEGIN /etc/grub.d/10_linux ###
menuentry 'Start Fedora-Workstation-Live 40' --class fedora --class gnu-linux --class gnu --class os {
\tlinuxefi /images/pxeboot/vmlinuz root=live:CDLABEL=Fedora-WS-Live-40-1-14  rd.live.image quiet rhgb console=ttyS0,115200
\tinitrdefi /images/pxeboot/initrd.img
}
menuentry 'Test this media & start Fedora-Workstation-Live 40' --class fedora --class gnu-linux --class gnu --class os {
\tlinuxefi /images/pxeboot/vmlinuz root=live:CDLABEL=Fedora-WS-Live-40-1-14  rd.live.image rd.live.check quiet
\tinitrdefi /images/pxeboot/initrd.img
}
submenu 'Troubleshooting -->' {
\tmenuentry 'Start Fedora-Workstation-Live 40 in basic graphics mode' --class fedora --class gnu-linux --class gnu --class os {
\t\tlinuxefi /images/pxeboot/vmlinuz root=live:CDLABEL=Fedora-WS-Live-40-1-14  rd.live.image nomodeset quiet rhgb
\t\tinitrdefi /images/pxeboot/initrd.img
\t}
\tmenuentry 'Boot first drive' --class fedora --class gnu-linux --class gnu --class os {
\t\tchainloader (hd0)+1
\t}
}
";

/// Shaped like Fedora 42's boot/grub2/grub.cfg: `($root)` paths, plain
/// `linux`/`initrd`, several initrds, a quoted argument with spaces, an
/// entry with a title holding a quote.
const F42_GRUB: &str = "set btrfs_relative_path=\"y\"
export btrfs_relative_path
search --file --set=root /boot/0x4c533432
set default=\"0\"
set timeout=5
set timeout_style=menu
if [ \"${grub_platform}\" = \"efi\" ]; then
    echo \"Please press 't' to show the boot menu on this console\"
fi
insmod gzio
menuentry 'Start Fedora-KDE-Live 42' --class fedora --class gnu-linux --class gnu --class os {
    set gfxpayload=keep
    echo Loading kernel...
\tlinux ($root)/boot/x86_64/loader/linux root=live:CDLABEL=Fedora-KDE-Live-42-1-1 rd.live.image quiet rhgb \"systemd.setenv=GREETING=hello world\"
\tinitrd ($root)/boot/x86_64/loader/initrd ($root)/boot/x86_64/loader/microcode.img
}
menuentry 'Test this media & start Fedora-KDE-Live 42' --class fedora --class gnu-linux --class gnu --class os {
\tlinux ($root)/boot/x86_64/loader/linux root=live:CDLABEL=Fedora-KDE-Live-42-1-1 rd.live.image rd.live.check quiet
\tinitrd ($root)/boot/x86_64/loader/initrd
}
submenu 'Troubleshooting -->' {
\tmenuentry 'Start in \"safe\" graphics -- it'\\''s slow' {
\t\tlinux ($root)/boot/x86_64/loader/linux root=live:CDLABEL=Fedora-KDE-Live-42-1-1 rd.live.image nomodeset
\t\tinitrd ($root)/boot/x86_64/loader/initrd
\t}
\tmenuentry 'UEFI Firmware Settings' { fwsetup }
}
menuentry \"Start Fedora-KDE-Live 42 (Failsafe)\" --class fedora --class gnu-linux --class gnu --class os {
    linux ($root)/boot/x86_64/loader/linux root=live:CDLABEL=Fedora-KDE-Live-42-1-1 rd.live.image nomodeset ide=nodma apm=off noresume edd=off nomodeset 3
    initrd ($root)/boot/x86_64/loader/initrd
}
";

fn params(overlay: OverlayBoot, dracut: DracutNames, live_dir: &str) -> RenderParams {
    RenderParams {
        title: "Fedora Live on a stick".into(),
        label: "LIVE".into(),
        fs_uuid: "1A2B-3C4D".into(),
        timeout_secs: 10,
        total_timeout_secs: None,
        stick: StickArgs {
            fs_uuid: "1A2B-3C4D".into(),
            live_dir: live_dir.into(),
            overlay,
            dracut,
            extra: KernelArgs::parse("rd.live.ram=0 quiet"),
        },
    }
}

fn all_params() -> Vec<RenderParams> {
    let mut v = Vec::new();
    for overlay in [
        OverlayBoot::None,
        OverlayBoot::DmSnapshot,
        OverlayBoot::OverlayFs,
    ] {
        for dracut in [DracutNames::Classic, DracutNames::Renamed] {
            for dir in ["LiveOS", "F40"] {
                v.push(params(overlay, dracut, dir));
            }
        }
    }
    v
}

fn sources() -> Vec<(&'static str, BootMenu)> {
    vec![
        (
            "fedora isolinux",
            parse_isolinux(FEDORA_ISOLINUX, "/isolinux").expect("isolinux parses"),
        ),
        (
            "fedora efi grub",
            parse_grub(FEDORA_EFI_GRUB).expect("efi grub parses"),
        ),
        ("f42 grub", parse_grub(F42_GRUB).expect("f42 grub parses")),
    ]
}

/// What the stick should boot: media-check entries gone, Linux entries'
/// arguments rewritten, everything else as on the ISO.
fn expected_entries(menu: &BootMenu, p: &RenderParams) -> Vec<MenuEntry> {
    menu.entries
        .iter()
        .filter(|e| e.purpose != EntryPurpose::MediaCheck)
        .map(|e| {
            let mut e = e.clone();
            if e.is_linux_boot() {
                e.args = rewrite_for_stick(&e.args, &p.stick);
            }
            e
        })
        .collect()
}

#[test]
fn fedora_isolinux_model() {
    let m = parse_isolinux(FEDORA_ISOLINUX, "/isolinux").expect("parses");
    assert_eq!(m.source, MenuSource::Isolinux);
    assert_eq!(m.title.as_deref(), Some("Fedora-Workstation-Live 40"));
    assert_eq!(m.timeout_secs, Some(60));
    assert_eq!(m.default_index, 1);
    assert_eq!(m.entries.len(), 5);
    let rescue = &m.entries[3];
    assert_eq!(rescue.purpose, EntryPurpose::Rescue);
    assert_eq!(
        rescue.initrds,
        ["/isolinux/initrd.img", "/isolinux/extra.img"]
    );
    assert_eq!(rescue.args.get("vendor.note"), Some("a b"));
    assert_eq!(
        live_root_label(&rescue.args),
        Some(LiveRoot::CdLabel("Fedora-WS-Live-40-1-14".into()))
    );
    assert_eq!(
        m.serial_console(),
        Some(SerialConsole {
            unit: 0,
            speed: 115200
        })
    );
}

#[test]
fn fedora_grub_models() {
    let m = parse_grub(FEDORA_EFI_GRUB).expect("parses");
    assert_eq!(m.source, MenuSource::Grub);
    assert_eq!(m.default_index, 1);
    assert_eq!(m.timeout_secs, Some(60));
    let purposes: Vec<_> = m.entries.iter().map(|e| e.purpose).collect();
    assert_eq!(
        purposes,
        [
            EntryPurpose::Live,
            EntryPurpose::MediaCheck,
            EntryPurpose::BasicGraphics
        ]
    );

    let f = parse_grub(F42_GRUB).expect("parses");
    assert_eq!(f.entries.len(), 4);
    assert_eq!(f.entries[3].purpose, EntryPurpose::BasicGraphics);
    assert_eq!(f.timeout_secs, Some(5));
    assert_eq!(f.entries[0].kernel, "/boot/x86_64/loader/linux");
    assert_eq!(
        f.entries[0].initrds,
        [
            "/boot/x86_64/loader/initrd",
            "/boot/x86_64/loader/microcode.img"
        ]
    );
    assert_eq!(
        f.entries[0].args.get("systemd.setenv"),
        Some("GREETING=hello world")
    );
    assert_eq!(
        f.entries[2].title,
        "Start in \"safe\" graphics -- it's slow"
    );
    assert!(f.warnings.is_empty(), "{:?}", f.warnings);
}

#[test]
fn rendered_syslinux_parses_back_to_the_same_entries() {
    for (name, menu) in sources() {
        for p in all_params() {
            let cfg = render_syslinux(&menu, &p).expect("renders");
            let back = parse_isolinux(&cfg, "/syslinux").expect("rendered config parses");
            assert_eq!(back.entries, expected_entries(&menu, &p), "{name}\n{cfg}");
            assert_eq!(back.title.as_deref(), Some("Fedora Live on a stick"));
            assert_eq!(back.timeout_secs, Some(10));
            // Every source has the check entry as default or the live one:
            // either way the stick defaults to the first live entry.
            assert_eq!(back.default_index, 0, "{name}");
            assert_eq!(
                back.serial_console().is_some(),
                menu.serial_console().is_some(),
                "{name}: serial console kept"
            );
            assert!(back.warnings.is_empty(), "{name}: {:?}", back.warnings);
        }
    }
}

#[test]
fn rendered_grub_parses_back_to_the_same_entries() {
    for (name, menu) in sources() {
        for p in all_params() {
            let cfg = render_grub(&menu, &p).expect("renders");
            let back = parse_grub(&cfg).expect("rendered config parses");
            assert_eq!(back.entries, expected_entries(&menu, &p), "{name}\n{cfg}");
            assert_eq!(back.timeout_secs, Some(10));
            assert_eq!(back.default_index, 0, "{name}");
            assert_eq!(back.serial_console(), menu.serial_console(), "{name}");
            assert!(back.warnings.is_empty(), "{name}: {:?}", back.warnings);
            assert!(cfg.contains("search --no-floppy --fs-uuid --set=root 1A2B-3C4D\n"));
            assert!(cfg.contains("insmod part_msdos\ninsmod part_gpt\ninsmod fat\n"));
            assert!(!cfg.contains("linuxefi") && !cfg.contains("initrdefi"));
        }
    }
}

#[test]
fn rendering_is_a_fixpoint() {
    // Rendering what was rendered (in either syntax) changes nothing: a stick
    // that is re-provisioned from its own configs stays the same.
    for (name, menu) in sources() {
        let p = params(OverlayBoot::OverlayFs, DracutNames::Renamed, "LiveOS");
        let sys = render_syslinux(&menu, &p).expect("renders");
        let sys_menu = parse_isolinux(&sys, "/syslinux").expect("parses");
        assert_eq!(render_syslinux(&sys_menu, &p).as_ref(), Ok(&sys), "{name}");
        let grub = render_grub(&menu, &p).expect("renders");
        let grub_menu = parse_grub(&grub).expect("parses");
        assert_eq!(render_grub(&grub_menu, &p).as_ref(), Ok(&grub), "{name}");
        // Across syntaxes the entries survive too.
        let cross = render_grub(&sys_menu, &p).expect("renders");
        assert_eq!(
            parse_grub(&cross).expect("parses").entries,
            grub_menu.entries,
            "{name}"
        );
    }
}

#[test]
fn stick_arguments_in_rendered_configs() {
    let menu = parse_isolinux(FEDORA_ISOLINUX, "/isolinux").expect("parses");
    let p = params(OverlayBoot::DmSnapshot, DracutNames::Classic, "LiveOS");
    let cfg = render_syslinux(&menu, &p).expect("renders");
    let back = parse_isolinux(&cfg, "/").expect("parses");
    for e in back.entries.iter().filter(|e| e.is_linux_boot()) {
        assert_eq!(
            live_root_label(&e.args),
            Some(LiveRoot::Uuid("1A2B-3C4D".into()))
        );
        assert_eq!(e.args.get("rd.live.overlay"), Some("UUID=1A2B-3C4D"));
        assert!(e.args.contains("rw"));
        assert!(!e.args.contains("rd.live.dir"));
        assert!(!e.args.contains("rd.live.check"));
        assert_eq!(
            e.args.get_all("quiet").len(),
            1,
            "extra replaces, no duplicate"
        );
        assert_eq!(e.args.get("rd.live.ram"), Some("0"));
    }
    assert!(cfg.contains("UI menu.c32\n"));
    assert!(!cfg.to_lowercase().contains("test this media"));
    // Memtest keeps its empty command line.
    assert_eq!(back.entries[3].title, "Run a memory test");
    assert!(back.entries[3].args.is_empty());
}

#[test]
fn grub_only_iso_gets_a_bios_config() {
    // Fedora ≥ 37 ships no isolinux: the syslinux.cfg comes from grub.cfg.
    let menu = parse_grub(F42_GRUB).expect("parses");
    let mut p = params(OverlayBoot::None, DracutNames::Classic, "LiveOS");
    p.timeout_secs = WAIT_FOREVER;
    let cfg = render_syslinux(&menu, &p).expect("renders");
    assert!(cfg.contains("\nTIMEOUT 0\n"), "{cfg}");
    // The failsafe entry's repeated nomodeset is written once.
    assert!(
        cfg.contains("rd.live.image nomodeset ide=nodma apm=off noresume edd=off 3 rd.live.ram=0"),
        "{cfg}"
    );
    assert!(cfg.contains(
        "  LINUX /boot/x86_64/loader/linux\n  APPEND initrd=/boot/x86_64/loader/initrd,/boot/x86_64/loader/microcode.img root=live:UUID=1A2B-3C4D rd.live.image rhgb systemd.setenv=\"GREETING=hello world\" rd.live.ram=0 quiet\n"
    ), "{cfg}");
}
