//! `livestick devices` arguments.

#[derive(Debug, Clone, clap::Args)]
pub struct DevicesArgs {
    /// Also list fixed disks (marked "fixed"), attached loop devices, and
    /// device-mapper/RAID devices
    #[arg(long)]
    pub all: bool,
}
