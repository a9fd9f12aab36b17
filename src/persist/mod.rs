//! Persistence on the stick: the dm-snapshot overlay store, its maintenance, home.img.
pub mod erofs;
pub mod home;
pub mod home_stick;
pub mod host_xattr;
pub mod luks;
pub mod merge;
pub mod ovl_maint;
pub mod ovl_merge;
pub mod snapshot;
pub mod swap;
pub mod tar_stream;

/// The EROFS xattr reader at its old path (`persist::erofs_xattr`).
pub use erofs::xattr as erofs_xattr;
/// The flat-squashfs stream merge at its old path (`persist::ovl_tar`).
pub use merge::overlayfs::flat as ovl_tar;
