//! `livestick devices`: the sticks (and with `--all`, every disk) this machine
//! has, what is on them, and whether livestick would write to them.

use crate::cli::devices::DevicesArgs;
use crate::disk::devices::{self, DeviceError, Host, Listing};
use crate::disk::devices_text::DevicesText;
use crate::persist::snapshot;

pub fn run(args: &DevicesArgs, json: bool) -> anyhow::Result<()> {
    let listing = list(&Host::live(), args.all)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&listing.to_document()?)?);
        return Ok(());
    }
    for note in &listing.notes {
        eprintln!("note: {note}");
    }
    print!(
        "{}",
        DevicesText {
            listing: &listing,
            all: args.all,
        }
    );
    Ok(())
}

/// What `livestick devices` lists: `disk::devices`'s listing with each
/// dm-snapshot overlay described by `persist::snapshot`, which `disk/` may not
/// import.
pub fn list(host: &Host, all: bool) -> Result<Listing, DeviceError> {
    devices::list_with(host, all, &snapshot::DevicesProbe)
}
