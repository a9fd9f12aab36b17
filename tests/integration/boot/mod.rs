//! Boot tests (`cargo test --test integration boot::`): sticks written by `livestick write`,
//! booted in QEMU under SeaBIOS and OVMF with the real kernel and dracut.
//! They skip with a message when QEMU/OVMF/root are missing, and fail
//! instead when `CI=true`.

mod current_fedora;
mod ext4_live;
pub mod harness;
mod maintenance;
mod multi;
mod ovl_merge;
pub(crate) mod scenarios;
