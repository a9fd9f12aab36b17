//! `livestick inspect ISO`

use std::io::IsTerminal;

use crate::cli::InspectArgs;
use crate::live_source;
use crate::progress::ProgressMode;
use crate::source::compressed;
use crate::source::live_text::LiveImageText;

pub fn run(args: &InspectArgs, json: bool) -> anyhow::Result<()> {
    let mode = if json || !std::io::stderr().is_terminal() {
        ProgressMode::Quiet
    } else {
        ProgressMode::Bar
    };
    // A disk image `write` would write as it is: described as one.
    if let Some(why) = crate::raw_write::detect(&args.iso, false)?
        && !crate::raw_write::is_ext4_live_stick(&args.iso)
    {
        let description = crate::raw_inspect::describe(&args.iso, why)?;
        if json {
            crate::outln!("{}", serde_json::to_string_pretty(&description)?);
        } else {
            crate::out!("{description}");
        }
        return Ok(());
    }
    let unpacked = compressed::open(&args.iso, mode)?;
    let mut image = live_source::inspect(unpacked.path())?;
    // A compressed ISO is read from its unpacked copy; the user named the original.
    image.path = args.iso.clone();
    if json {
        println!("{}", serde_json::to_string_pretty(&image.to_document()?)?);
    } else {
        print!("{}", LiveImageText(&image));
    }
    Ok(())
}
