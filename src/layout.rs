//! The names of a live stick's files: one home for each, so a rename is one edit.
//! A leaf module: it imports nothing from the crate.

/// The live system's root image in the live directory.
pub const SQUASHFS: &str = "squashfs.img";
/// The persistent /home image.
pub const HOME: &str = "home.img";
/// The swap image.
pub const SWAP: &str = "swap.img";
/// livestick's record of the root image it wrote into the live directory, which
/// lets a rewrite of the same image keep the overlay (`live_source::compare_root`).
pub const ROOT_RECORD: &str = ".livestick";
/// livestick's manifest of a stick (`manifest`): what was written, for `verify`.
/// Never a live file to copy from a stick, never a stale one to delete.
pub const MANIFEST: &str = "livestick.json";
/// Every overlay's name starts with this; dracut looks for `overlay-<LABEL>-<UUID>`.
pub const OVERLAY_PREFIX: &str = "overlay-";
/// Where a nested root image sits inside squashfs.img (current name first).
pub const ROOT_IMAGES: [&str; 2] = ["LiveOS/rootfs.img", "LiveOS/ext3fs.img"];

/// The overlay file dracut's `rd.live.overlay=` finds for a FAT label and volume UUID.
pub fn overlay_name(label: &str, fs_uuid: &str) -> String {
    format!("{OVERLAY_PREFIX}{label}-{fs_uuid}")
}

/// `/<dir>/overlay-<LABEL>-<UUID>`, the path on the stick.
pub fn overlay_path(live_dir: &str, label: &str, fs_uuid: &str) -> String {
    format!(
        "/{}/{}",
        live_dir.trim_matches('/'),
        overlay_name(label, fs_uuid)
    )
}

/// Whether a file name in a live directory is a root image's: `squashfs.img`, or an
/// older ISO's `rootfs.img`/`ext3fs.img` (any case, as FAT names compare).
pub fn is_root_image_name(name: &str) -> bool {
    name.eq_ignore_ascii_case(SQUASHFS)
        || ROOT_IMAGES.iter().any(|r| {
            r.rsplit('/')
                .next()
                .is_some_and(|n| n.eq_ignore_ascii_case(name))
        })
}

/// Whether a file name in the live directory is an overlay (any label, any case).
pub fn is_overlay_name(name: &str) -> bool {
    name.to_ascii_lowercase().starts_with(OVERLAY_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_names_as_dracut_spells_them() {
        assert_eq!(overlay_name("LIVE", "B494-8509"), "overlay-LIVE-B494-8509");
        assert_eq!(
            overlay_path("LiveOS", "LIVE", "B494-8509"),
            "/LiveOS/overlay-LIVE-B494-8509"
        );
        assert_eq!(overlay_path("/LiveOS/", "x", "1"), "/LiveOS/overlay-x-1");
        assert!(is_overlay_name("OVERLAY-LIVE-1"));
        assert!(!is_overlay_name("home.img"));
    }
}
