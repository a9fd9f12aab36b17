//! Reading the source live ISO.
pub mod bmap;
pub mod checksum;
pub mod compressed;
pub mod initrd;
pub mod iso;
pub mod live;
pub mod raw;
