//! `livestick doctor`: which external programs each feature needs, whether
//! they are here (path and version), and which Debian and Fedora package
//! provides each. livestick itself is user space only; these programs are the
//! reference implementations of formats it does not own (docs/design.md). The
//! checks are `tools::report`; this module only prints them (`tools::Report`'s JSON or its `Display`).

use crate::cli::DoctorArgs;
use crate::tools;

pub fn run(_args: &DoctorArgs, json: bool) -> anyhow::Result<()> {
    let report = tools::report();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    print!("{report}");
    Ok(())
}
