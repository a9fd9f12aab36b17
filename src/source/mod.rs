//! Reading the source live ISO.
pub mod checksum;
pub mod iso;
pub mod live;
