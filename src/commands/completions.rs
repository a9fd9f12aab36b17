//! `livestick completions SHELL`: a completion script on stdout.

use crate::cli::CompletionsArgs;

pub fn run(args: &CompletionsArgs) -> anyhow::Result<()> {
    let mut cmd = crate::cli::command();
    clap_complete::generate(args.shell, &mut cmd, "livestick", &mut std::io::stdout());
    Ok(())
}
