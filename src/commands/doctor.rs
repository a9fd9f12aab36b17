//! `livestick doctor`: which external programs each feature needs, whether
//! they are here (path and version), and which Debian and Fedora package
//! provides each. livestick itself is user space only; these programs are the
//! reference implementations of formats it does not own (docs/design.md). The
//! checks are `tools::report`; this module only prints them.

use crate::cli::DoctorArgs;
use crate::tools;

pub fn run(_args: &DoctorArgs, json: bool) -> anyhow::Result<()> {
    let report = tools::report();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let mut feature = "";
    for c in &report.checks {
        if c.feature != feature {
            feature = c.feature;
            println!("{feature}");
        }
        let mark = if c.found {
            "ok  "
        } else if c.required {
            "MISSING"
        } else {
            "--  "
        };
        let detail = match (&c.path, &c.version) {
            (Some(p), Some(v)) => format!("{}  ({v})", p.display()),
            (Some(p), None) => p.display().to_string(),
            (None, _) => format!(
                "not found — Debian/Ubuntu: apt install {}; Fedora: dnf install {}",
                c.debian, c.fedora
            ),
        };
        println!("  {mark:<7} {:<20} {detail}", c.name);
        if let Some(note) = &c.note {
            println!("          {note}");
        }
    }
    println!();
    if report.ok {
        println!(
            "livestick write can run; features marked -- are unavailable until their package is installed."
        );
    } else {
        println!("livestick write cannot run until the MISSING items are installed.");
    }
    Ok(())
}
