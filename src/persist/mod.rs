//! Persistence on the stick: the dm-snapshot overlay store, its maintenance, home.img.
pub mod erofs;
pub mod home;
pub mod home_report;
pub mod home_stick;
pub mod host_xattr;
pub mod luks;
pub mod merge;
pub mod overlay;
pub mod ovl_maint;
pub mod snapshot;
pub mod swap;
pub mod tar_stream;
pub mod workdir;
