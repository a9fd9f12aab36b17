//! Every integration test in one binary (the layout ripgrep's `tests/tests.rs` uses):
//! one link instead of one per file, and one process, so a fixture ISO is built once
//! and every file shares the one `support` module.
//!
//! One process also means the files' tests run beside each other, which separate
//! binaries never did: whatever is machine-wide (loop devices, `/dev`, the fixture
//! cache in `fixtures/out/`) is coordinated in `support`, and nothing here may change
//! process-wide state (`std::env::set_var`, the current directory); a child's
//! environment and directory are set on its `Command`.
//!
//! Run a file's tests by module path: `cargo test --test integration write::`.
//! The QEMU boot tests (`boot::`, about 6 minutes) are skipped with
//! `-- --skip boot::` and run on their own with `cargo test --test integration boot::`.

mod support;

mod batch;
mod batch_digest;
mod boot;
mod boot_config;
mod captured_sysfs;
mod cli;
mod compat;
mod compressed;
mod devices;
mod download;
mod erofs_xattr;
mod ext4_live;
mod ext4_maint;
mod ext4_sparse;
mod fat16_stick;
mod fat_damage;
mod faults;
mod fixture_iso;
mod fuzz_corpus;
mod help_examples;
mod home_cli;
mod home_image;
mod iso_reader;
mod json_maint;
mod json_write;
mod luks_cryptsetup;
mod opened_once;
mod output_voice;
mod overlap_verify;
mod overlay_cli;
mod overlay_merge;
mod overlay_ovl;
mod overlay_ovl_maint;
mod overlay_stick;
mod ovl_grow_stale;
mod packaging;
mod persistence;
mod progress_tty;
mod raw_image;
mod replace_leftovers;
mod restore_cmd;
mod rewrite;
mod safety;
mod signed_checksum;
mod snapshot_proptest;
mod snapshot_vectors;
mod stale_content;
mod swap_mkswap;
mod tar_stream;
mod vendor_menu;
mod verify_cmd;
mod wipe;
mod write;
