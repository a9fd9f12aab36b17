//! Targets (image files and block devices), partition tables and filesystems.
pub mod devices;
pub mod devices_text;
pub mod e2undo;
pub mod ext4;
pub mod ext4_fs;
pub mod ext4_live;
pub mod extent_file;
pub mod fat;
pub mod fat_alloc;
pub mod fat_raw;
pub mod identity;
pub mod opened;
pub mod partition;
pub mod sparse;
pub mod stick;
pub mod target;
pub mod wipe;
