//! The `livestick` binary: parse arguments, run one command, map errors to
//! exit codes (docs/exit-codes.md). Invoked as `livecd-iso-to-disk` (a
//! symlink), it reads that tool's command line instead.

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

use livestick::cli::{self, Command, compat};
use livestick::commands;
use livestick::error::ErrorKind;

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let program = argv
        .first()
        .and_then(|a| Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("livestick");
    if argv.get(1).is_some_and(|a| a == cli::FAKEROOT_STEP) {
        let result = match argv.get(2) {
            Some(job) => {
                livestick::persist::merge::overlayfs::fakeroot::run_fakeroot_job(Path::new(job))
                    .map_err(anyhow::Error::from)
            }
            None => Err(anyhow::anyhow!(
                "{} needs the job file its parent wrote",
                cli::FAKEROOT_STEP
            )),
        };
        return ExitCode::from(finish(result, "livestick", cli::FAKEROOT_STEP, false));
    }
    if program == compat::PROGRAM {
        return ExitCode::from(run_compat(&argv[1..], compat::PROGRAM, false, false));
    }
    let (cli, step) = match cli::parse_with_step(&argv) {
        Ok(parsed) => parsed,
        Err(e) => return ExitCode::from(usage_error(e, wants_json(&argv))),
    };
    let (json, quiet) = (cli.json, cli.quiet);
    if cli.command.changes_nothing() {
        stop_at_once_on_closed_stdout();
    }
    let result = match cli.command {
        Command::Inspect(args) => commands::inspect::run(&args, json),
        Command::Write(args) => commands::write::run(&args, json, quiet),
        Command::Overlay { command } => commands::overlay::run(command, json),
        Command::Home { command } => commands::home::run(command, json),
        Command::Devices(args) => commands::devices::run(&args, json),
        Command::Verify(args) => commands::verify::run(&args, json, quiet),
        Command::Restore(args) => commands::restore::run(&args, json, quiet),
        Command::IsoToDisk(args) => {
            return ExitCode::from(run_compat(&args.args, "livestick iso-to-disk", json, quiet));
        }
        Command::Doctor(args) => commands::doctor::run(&args, json),
        Command::Completions(args) => commands::completions::run(&args),
        Command::Man(args) => commands::man::run(&args),
    };
    ExitCode::from(finish(result, "livestick", &step, json))
}

/// Lets SIGPIPE end the process, as it ends `cat` and `ls`, when the reader of
/// stdout goes away (`livestick devices | head -1`): Rust ignores SIGPIPE, and a
/// closed pipe then makes every `println!` panic. Only for commands that change
/// nothing (docs/exit-codes.md): a signal must never stop a write half way.
fn stop_at_once_on_closed_stdout() {
    // SAFETY: no other thread runs yet, and SIG_DFL is a valid disposition
    // for SIGPIPE; the previous handler is not needed.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// The livecd-iso-to-disk front end: its own parser, then the native write.
fn run_compat(args: &[OsString], program: &str, json: bool, quiet: bool) -> u8 {
    // Decided before parsing so that a usage error can be JSON too.
    let json = json || wants_json(args);
    let result = compat::prepare(args, program).map_err(anyhow::Error::from);
    match result {
        Ok(None) => 0,
        Ok(Some((write, j, q))) => finish(
            commands::write::run(&write, json || j, quiet || q),
            program,
            "iso-to-disk",
            json || j,
        ),
        Err(e) => finish(Err(e), program, "iso-to-disk", json),
    }
}

/// `--json` anywhere before a `--` asks for a JSON error object too.
fn wants_json(argv: &[OsString]) -> bool {
    argv.iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "--json")
}

/// The version of the error document's shape (docs/json.md,
/// schemas/error.schema.json).
const ERROR_SCHEMA: u32 = 1;

fn usage_error(e: clap::Error, json: bool) -> u8 {
    use clap::error::ErrorKind as K;
    // --help and --version are "errors" to clap but successes to the user.
    if matches!(
        e.kind(),
        K::DisplayHelp | K::DisplayVersion | K::DisplayHelpOnMissingArgumentOrSubcommand
    ) && !e.use_stderr()
    {
        let _ = e.print();
        return 0;
    }
    let code = ErrorKind::Usage.exit_code();
    if json {
        let rendered = e.to_string();
        let first = rendered.lines().next().unwrap_or_default();
        let message = first.strip_prefix("error: ").unwrap_or(first).to_string();
        // clap's full text (usage, tips) goes to stderr below; the document keeps
        // the one fact, in the shape of every other error.
        let value = serde_json::json!({
            "schema": ERROR_SCHEMA,
            "error": message,
            "step": "parsing the command line",
            "kind": ErrorKind::Usage,
            "causes": [],
            "hint": ErrorKind::Usage.hint(),
            "exit_code": code,
        });
        println!("{value}");
    }
    let _ = e.print();
    code
}

/// Prints an error (the failing step, its causes, a hint; one JSON object on
/// stdout with --json) and returns the exit code. `program` is the name the
/// user typed (`livestick`, `livestick iso-to-disk`, `livecd-iso-to-disk`), so
/// the message reads as coming from the command they ran.
fn finish(result: anyhow::Result<()>, program: &str, step: &str, json: bool) -> u8 {
    let Err(err) = result else { return 0 };
    let verdict = cli::error_verdict(&err);
    let (kind, hint) = (verdict.kind, verdict.hint);
    let code = kind.exit_code();
    let causes: Vec<String> = err.chain().skip(1).map(|c| c.to_string()).collect();
    // `verify` printed its whole report as the one JSON object already.
    let reported = err
        .downcast_ref::<livestick::manifest::NotIntact>()
        .is_some();
    if json && !reported {
        let value = serde_json::json!({
            "schema": ERROR_SCHEMA,
            "error": err.to_string(),
            "step": step,
            "kind": kind,
            "causes": causes,
            "hint": hint,
            "exit_code": code,
        });
        println!("{value}");
    }
    if program == "livestick" {
        eprintln!("livestick {step}: error: {err}");
    } else {
        eprintln!("{program}: error: {err}");
    }
    // Most layers quote their cause in their own message: a cause the line
    // above already holds would only repeat it (`--json` keeps every link).
    let mut above = err.to_string();
    for cause in &causes {
        if above.contains(cause.as_str()) {
            continue;
        }
        eprintln!("  caused by: {cause}");
        above.clone_from(cause);
    }
    eprintln!("  hint: {hint}");
    code
}
