//! An ISO whose only boot menu is a distribution's own `EFI/<vendor>/grub.cfg`
//! (no isolinux, no EFI/BOOT/grub.cfg, no boot/grub2/grub.cfg): the menu a signed
//! GRUB reads is enough to make a stick, and it is rendered for the stick.

use std::path::{Path, PathBuf};

use crate::support::*;

fn vendor_only_iso(dir: &Path) -> PathBuf {
    let tree = dir.join("root");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/os-release"), "ID=vendor\n").unwrap();
    let iso = dir.join("iso");
    for d in ["LiveOS", "EFI/BOOT", "EFI/vendor", "images/pxeboot"] {
        std::fs::create_dir_all(iso.join(d)).unwrap();
    }
    sh(
        "mksquashfs",
        &[
            tree.to_str().unwrap(),
            iso.join("LiveOS/squashfs.img").to_str().unwrap(),
            "-comp",
            "gzip",
            "-noappend",
            "-quiet",
        ],
    );
    std::fs::write(iso.join("EFI/BOOT/BOOTX64.EFI"), "shim").unwrap();
    std::fs::write(iso.join("EFI/vendor/grubx64.efi"), "grub").unwrap();
    std::fs::write(iso.join("images/pxeboot/vmlinuz"), "kernel").unwrap();
    std::fs::write(iso.join("images/pxeboot/initrd.img"), "initrd").unwrap();
    std::fs::write(
        iso.join("EFI/vendor/grub.cfg"),
        "set default=0\nmenuentry 'Start Vendor Live' {\n  linux /images/pxeboot/vmlinuz root=live:CDLABEL=VENDOR-LIVE rd.live.image quiet\n  initrd /images/pxeboot/initrd.img\n}\n",
    )
    .unwrap();
    let out = dir.join("vendor.iso");
    iso_of_tree(&iso, "VENDOR-LIVE", &out);
    out
}

#[test]
fn a_vendor_grub_menu_alone_makes_a_stick() {
    let dir = tmp();
    let iso = vendor_only_iso(dir.path());
    let inspected = livestick(&["--json", "inspect", iso.to_str().unwrap()]);
    let text = ok(&inspected);
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(
        json.to_string().contains("/EFI/vendor/grub.cfg"),
        "the vendor menu is not listed: {json}"
    );

    let image = dir.path().join("stick.img");
    let out = livestick(&[
        "--json",
        "write",
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
        "--size",
        "128M",
        "--yes",
    ]);
    ok(&out);
    let start = part_start(&image);
    let cfg = String::from_utf8(fat_read(&image, start, "/EFI/vendor/grub.cfg")).unwrap();
    assert!(
        cfg.contains("root=live:UUID=") && !cfg.contains("CDLABEL=VENDOR-LIVE"),
        "the vendor menu was not rendered for the stick:\n{cfg}"
    );
    assert!(cfg.contains("/images/pxeboot/vmlinuz"), "{cfg}");
}

/// The error for an ISO with no menu at all names every place looked at.
#[test]
fn an_iso_without_any_menu_names_where_it_looked() {
    let dir = tmp();
    let iso = vendor_only_iso(dir.path());
    let tree = dir.path().join("iso");
    std::fs::remove_file(tree.join("EFI/vendor/grub.cfg")).unwrap();
    let bare = dir.path().join("bare.iso");
    iso_of_tree(&tree, "BARE", &bare);
    drop(iso);
    let out = livestick(&["inspect", bare.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("no boot menu") && stderr.contains("EFI/<vendor>/grub.cfg"),
        "{stderr}"
    );
}

/// A stick written from such an ISO, used in turn as a source (issue 15): its
/// vendor menu is read from the stick's FAT as from the ISO, listed by `inspect`,
/// and rendered again for the new stick with the new stick's UUID.
#[test]
fn a_stick_with_only_a_vendor_grub_menu_is_a_source() {
    let dir = tmp();
    let iso = vendor_only_iso(dir.path());
    let first = dir.path().join("first.img");
    ok(&livestick(&[
        "write",
        iso.to_str().unwrap(),
        first.to_str().unwrap(),
        "--size",
        "128M",
        "--yes",
        "--quiet",
    ]));
    // As another tool leaves it: the vendor's menu is the stick's only one.
    let first_start = part_start(&first);
    for (dir, menu) in [("/EFI/BOOT", "grub.cfg"), ("/boot/grub2", "grub.cfg")] {
        if fat_ls(&first, first_start, dir)
            .to_lowercase()
            .contains(menu)
        {
            fat_delete(&first, first_start, &format!("{dir}/{menu}"));
        }
    }
    let listing = fat_ls(&first, first_start, "/EFI/BOOT").to_lowercase();
    assert!(!listing.contains("grub.cfg"), "{listing}");

    let inspected = livestick(&["--json", "inspect", first.to_str().unwrap()]);
    let json: serde_json::Value = serde_json::from_str(&ok(&inspected)).unwrap();
    assert!(
        json.to_string().contains("/EFI/vendor/grub.cfg"),
        "the stick's vendor menu is not listed: {json}"
    );

    let second = dir.path().join("second.img");
    ok(&livestick(&[
        "write",
        first.to_str().unwrap(),
        second.to_str().unwrap(),
        "--size",
        "128M",
        "--yes",
        "--quiet",
    ]));
    let start = part_start(&second);
    let cfg = String::from_utf8(fat_read(&second, start, "/EFI/vendor/grub.cfg")).unwrap();
    let uuid = blkid_value(&second, start, "UUID");
    assert!(
        cfg.contains(&format!("root=live:UUID={uuid}")),
        "the vendor menu was not rendered for the second stick ({uuid}):\n{cfg}"
    );
    assert!(cfg.contains("/images/pxeboot/vmlinuz"), "{cfg}");
    assert_eq!(
        fat_read(&second, start, "/images/pxeboot/vmlinuz"),
        b"kernel",
        "the kernel the menu names was copied"
    );
}
