//! Boot configuration: parsing the ISO's menus, rewriting kernel arguments,
//! rendering the stick's syslinux and GRUB configs, installing boot code.
pub mod cmdline;
pub mod menu;
pub mod render;
pub mod syslinux;
