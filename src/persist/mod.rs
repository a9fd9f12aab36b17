//! Persistence on the stick: the dm-snapshot overlay store, its maintenance, home.img.
pub mod snapshot;
pub mod luks;
pub mod swap;
pub mod merge;
pub mod home;
pub mod overlay_extent;
pub mod ovl_merge;
pub mod erofs;
pub mod home_stick;
