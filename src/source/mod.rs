//! Reading the source live ISO.
pub mod acquire;
pub mod bmap;
pub mod checksum;
pub mod compressed;
pub mod download;
pub mod initrd;
pub mod iso;
pub mod live;
pub mod live_text;
pub mod raw;
pub mod releases;
pub mod signed_checksum;
