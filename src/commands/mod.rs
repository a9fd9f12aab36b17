//! One module per subcommand: glue from arguments to library calls and a report.
pub mod completions;
pub mod devices;
pub mod doctor;
pub mod home;
pub mod inspect;
pub mod man;
pub mod overlay;
pub mod restore;
pub mod verify;
pub mod write;
pub mod write_raw;

use std::io::{BufRead, IsTerminal, Write};

use crate::error::NoConfirmation;

/// Asks a yes/no question on the terminal; `assume_yes` answers it. Without a
/// terminal and without `--yes` the answer is no: scripts must opt in.
pub fn confirm(question: &str, assume_yes: bool) -> anyhow::Result<bool> {
    if assume_yes {
        return Ok(true);
    }
    if !std::io::stdin().is_terminal() {
        return Err(NoConfirmation {
            question: question.to_string(),
        }
        .into());
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}
