//! livestick: write Fedora-style live ISOs to USB sticks (or image files) with
//! persistence, and maintain those sticks, entirely in user space.
//!
//! The shape of every write command is `inspect → plan → apply → verify → report`
//! (see `docs/design.md`). Every on-disk format lives in its own module and works on
//! `Read + Write + Seek`, so most of it is tested without devices or root.

pub mod apply;
pub mod batch;
pub mod boot;
pub mod bytes;
pub mod cli;
pub mod commands;
pub mod disk;
pub mod error;
pub mod io;
pub mod layout;
pub mod live_source;
pub mod manifest;
pub mod persist;
pub mod plan;
pub mod prepare;
pub mod progress;
pub mod raw_inspect;
pub mod raw_write;
pub mod restore;
pub mod size;
pub mod source;
pub mod squash;
pub mod squash_dir;
pub mod tools;
pub mod write_facts;
pub mod write_report;
