//! The `livestick` binary: parse arguments, run one command, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;
use livestick::cli::{Cli, Command};
use livestick::commands;

/// Exit codes (docs/exit-codes.md).
mod exit {
    pub const USAGE: u8 = 1;
    pub const BAD_INPUT: u8 = 2;
    pub const REFUSED: u8 = 3;
    pub const IO: u8 = 4;
}

fn exit_code(err: &anyhow::Error) -> u8 {
    use livestick::disk::target::TargetError;
    for cause in err.chain() {
        if let Some(t) = cause.downcast_ref::<TargetError>() {
            return match t {
                TargetError::Busy { .. } | TargetError::NotRemovable(_) => exit::REFUSED,
                TargetError::Io { .. } => exit::IO,
                _ => exit::BAD_INPUT,
            };
        }
        if cause.is::<commands::write::BadInput>()
            || cause.is::<livestick::plan::PlanError>()
            || cause.is::<livestick::source::live::LiveError>()
            || cause.is::<livestick::size::SizeError>()
        {
            return exit::BAD_INPUT;
        }
    }
    exit::IO
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { exit::USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let result = match &cli.command {
        Command::Inspect(args) => commands::inspect::run(args, cli.json),
        Command::Write(args) => commands::write::run(args, cli.json, cli.quiet),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let code = exit_code(&err);
            if cli.json {
                let causes: Vec<String> = err.chain().skip(1).map(|c| c.to_string()).collect();
                let value = serde_json::json!({"error": err.to_string(), "causes": causes, "exit_code": code});
                println!("{value}");
            }
            eprintln!("livestick: error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::from(code)
        }
    }
}
