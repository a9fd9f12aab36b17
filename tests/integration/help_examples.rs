//! Every example line of every help text works as printed: each one is parsed
//! with the parser the binary uses (clap, or the livecd-iso-to-disk parser for
//! `iso-to-disk`), and the ones that only read or plan (`inspect`, `write`
//! and `iso-to-disk` with `--dry-run` added, `doctor`, `devices`,
//! `completions`, `man`) are run on the fixture ISOs, their `| jq FILTER`
//! through jq, so a filter naming a key that does not exist fails here.
//! `overlay` and `home` examples name sticks that do not exist, so they are
//! parsed only.

use std::ffi::OsString;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::support::*;
use livestick::cli::{self, compat};

/// One `livestick …` line from a help text, split as a shell would.
#[derive(Debug)]
struct Example {
    /// Which help printed it (`write`, `overlay merge`, …), for messages.
    help: String,
    line: String,
    words: Vec<String>,
    /// The filter of a `| jq FILTER` tail.
    jq: Option<String>,
    /// Any other program the output is piped into (`man -l -`).
    pipe: Option<Vec<String>>,
}

/// Every subcommand path that has a help page of its own.
fn help_paths(cmd: &clap::Command, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    for sub in cmd
        .get_subcommands()
        .filter(|s| s.get_name() != "help" && !s.is_hide_set())
    {
        let mut p = prefix.clone();
        p.push(sub.get_name().to_string());
        out.push(p.clone());
        help_paths(sub, p, out);
    }
}

/// The lines under "Examples:" in a help text.
fn example_lines(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim() != "Examples:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
        .collect()
}

/// Splits a shell line into words (single and double quotes, no expansion).
fn shell_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in text.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    assert!(quote.is_none(), "unclosed quote in {text:?}");
    if in_word {
        words.push(word);
    }
    words
}

/// The example without its comment, redirection and pipe; the pipe's jq filter.
fn parse_example(help: &str, line: &str) -> Example {
    let mut text = line;
    if let Some(i) = text.find(" #") {
        text = &text[..i];
    }
    let (command, pipe) = match text.split_once(" | ") {
        Some((c, p)) => (c, Some(p.trim())),
        None => (text, None),
    };
    let command = command.split_once(" > ").map_or(command, |(c, _)| c);
    let pipe = pipe.map(shell_words);
    let jq = match pipe.as_deref() {
        Some([jq, filter]) if jq == "jq" => Some(filter.clone()),
        Some([jq, ..]) if jq == "jq" => panic!("one jq filter expected: {line}"),
        _ => None,
    };
    Example {
        help: help.to_string(),
        line: line.to_string(),
        words: shell_words(command),
        pipe: pipe.filter(|_| jq.is_none()),
        jq,
    }
}

/// Every example of every help page, read from the binary's own output.
fn all_examples() -> Vec<Example> {
    let mut paths = vec![Vec::new()];
    help_paths(&cli::command(), Vec::new(), &mut paths);
    let mut examples = Vec::new();
    for path in paths {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let help = ok(&livestick(&args));
        let name = if path.is_empty() {
            "livestick".to_string()
        } else {
            path.join(" ")
        };
        let lines = example_lines(&help);
        assert!(
            !lines.is_empty(),
            "`livestick {name} --help` has no examples"
        );
        examples.extend(
            lines
                .iter()
                // Shell set-up lines (`ln -s …`) are not livestick commands.
                .filter(|l| l.starts_with("livestick "))
                .map(|l| parse_example(&name, l)),
        );
    }
    examples
}

#[test]
fn every_help_example_parses() {
    let examples = all_examples();
    assert!(
        examples.len() >= 20,
        "too few examples found: {examples:#?}"
    );
    for ex in &examples {
        if ex.words.get(1).map(String::as_str) == Some("iso-to-disk") {
            let argv: Vec<OsString> = ex.words[2..].iter().map(OsString::from).collect();
            match compat::parse(&argv) {
                Ok(compat::Parsed::Run(_)) => {}
                Ok(compat::Parsed::Help) => panic!("`{}` only asks for help", ex.line),
                Err(e) => panic!(
                    "`{}` (from `{}` help) does not parse: {e}",
                    ex.line, ex.help
                ),
            }
        } else if let Err(e) = cli::parse_from(&ex.words) {
            panic!(
                "`{}` (from `{} --help`) does not parse:\n{e}",
                ex.line, ex.help
            );
        }
    }
}

/// The example's words with the placeholder ISO, sticks and directories
/// replaced by the fixture and files in `dir`.
fn on_fixtures(ex: &Example, iso: &Path, dir: &Path) -> Vec<String> {
    let stick = dir.join("stick.img");
    let words: Vec<String> = ex
        .words
        .iter()
        .skip(1)
        .map(|w| {
            if w.ends_with(".iso") {
                iso.display().to_string()
            } else if w.starts_with("/dev/sd") || w == "stick.img" {
                stick.display().to_string()
            } else if w.starts_with("/usr/local/share/man") {
                dir.join("man").display().to_string()
            } else {
                w.clone()
            }
        })
        .collect();
    words
}

#[test]
fn every_reading_or_planning_help_example_runs_on_the_fixtures() {
    let iso = synthetic_iso("fedora-classic");
    let have_jq = need("jq");
    // Examples such as `--reset-overlay` work on a stick livestick wrote, so
    // /dev/sdb is played by a copy of one (8 GiB, sparse: room for the
    // largest persistence an example asks for).
    let written = tmp();
    let template = written.path().join("stick.img");
    ok(&livestick(&[
        "write",
        iso.to_str().unwrap(),
        template.to_str().unwrap(),
        "--size",
        "8G",
        "--overlay-size-mb",
        "64",
        "--yes",
        "--quiet",
    ]));
    let mut ran = 0;
    for ex in all_examples() {
        let command = ex.words.get(1).map(String::as_str).unwrap_or_default();
        if !matches!(
            command,
            "inspect" | "write" | "iso-to-disk" | "doctor" | "devices" | "completions" | "man"
        ) {
            continue;
        }
        let dir = tmp();
        run(
            "cp",
            &[
                "--sparse=always",
                template.to_str().unwrap(),
                dir.path().join("stick.img").to_str().unwrap(),
            ],
        );
        let mut args = on_fixtures(&ex, &iso, dir.path());
        if matches!(command, "write" | "iso-to-disk") && !args.iter().any(|a| a == "--dry-run") {
            args.push("--dry-run".into());
        }
        let out = output_of(
            Command::new(bin())
                .args(&args)
                .stdin(Stdio::null())
                .current_dir(dir.path()),
        );
        assert!(
            out.status.success(),
            "`{}` (from `{} --help`), run as `livestick {}`, failed ({}):\n{}{}",
            ex.line,
            ex.help,
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if let Some(filter) = &ex.jq
            && have_jq
        {
            let mut jq = Command::new("jq")
                .args(["-e", filter])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("jq runs");
            std::io::Write::write_all(&mut jq.stdin.take().unwrap(), &out.stdout).unwrap();
            let result = jq.wait_with_output().unwrap();
            // -e: exit 0 only when the last output is neither null nor false,
            // and 5 on an error (such as iterating over a missing key). An
            // empty result (no program is missing) is exit 4 with no output:
            // the filter itself worked.
            let code = result.status.code();
            assert!(
                code == Some(0) || (code == Some(4) && result.stdout.is_empty()),
                "`{}`: jq {filter} on its output failed ({:?}): {}\n{}",
                ex.line,
                code,
                String::from_utf8_lossy(&result.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
            let shown = String::from_utf8_lossy(&result.stdout);
            assert!(
                !shown.trim().lines().any(|l| l == "null"),
                "`{}`: jq {filter} finds nothing (null): the key does not exist",
                ex.line
            );
        }
        if let Some(pipe) = &ex.pipe {
            assert_eq!(
                pipe.iter().map(String::as_str).collect::<Vec<_>>(),
                ["man", "-l", "-"],
                "`{}`: a pipe this test does not know how to run",
                ex.line
            );
            if need("man") {
                let mut man = Command::new("man")
                    .args(["-l", "-"])
                    .env("MANPAGER", "cat")
                    .env("MANWIDTH", "80")
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("man runs");
                std::io::Write::write_all(&mut man.stdin.take().unwrap(), &out.stdout).unwrap();
                let shown = man.wait_with_output().unwrap();
                let text = String::from_utf8_lossy(&shown.stdout);
                assert!(
                    shown.status.success() && text.contains("livestick"),
                    "`{}`: man -l - failed: {}",
                    ex.line,
                    String::from_utf8_lossy(&shown.stderr)
                );
            }
        }
        ran += 1;
    }
    assert!(ran >= 12, "only {ran} examples ran");
}

#[test]
fn the_doctor_jq_example_used_to_name_a_key_doctor_does_not_print() {
    // The control for the jq check above: the old example's filter fails on
    // doctor's JSON, so the check can tell a wrong key from a right one.
    if !need("jq") {
        return;
    }
    let json = ok(&livestick(&["doctor", "--json"]));
    let run_jq = |filter: &str| {
        let mut jq = Command::new("jq")
            .args(["-e", filter])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("jq runs");
        std::io::Write::write_all(&mut jq.stdin.take().unwrap(), json.as_bytes()).unwrap();
        jq.wait().unwrap().code()
    };
    assert_eq!(run_jq(".programs[] | select(.found == false)"), Some(5));
    assert_ne!(run_jq(".checks[] | select(.found == false)"), Some(5));
}

#[test]
fn completions_and_the_man_page_offer_only_what_a_user_may_type() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let script = ok(&livestick(&["completions", shell]));
        assert!(
            !script.contains("internal-fakeroot-step"),
            "{shell} completions offer the internal fakeroot step"
        );
    }
    let page = ok(&livestick(&["man"]));
    assert!(!page.contains("internal-fakeroot-step"));
    // The man and completions sections offer no --json/--quiet; write's does.
    let section = |name: &str| -> String {
        let start = page
            .find(&format!(".SH \"LIVESTICK {name}\""))
            .unwrap_or_else(|| panic!("no section for {name}"));
        let rest = &page[start + 4..];
        rest[..rest.find(".SH \"").unwrap_or(rest.len())].to_string()
    };
    for name in ["MAN", "COMPLETIONS"] {
        let text = section(name);
        assert!(
            !text.contains("json") && !text.contains("quiet"),
            "{name}: {text}"
        );
    }
    assert!(section("WRITE").contains("json"));
    for args in [
        &["completions", "bash", "--json"][..],
        &["--quiet", "man"][..],
        &["man", "-q"][..],
    ] {
        let out = livestick(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("does not apply"), "{args:?}: {err}");
    }
    // The hidden step still runs for the merge that starts it: without its
    // job file it fails as a step of its own, not as an unknown command.
    let out = livestick(&["internal-fakeroot-step"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("job file"));
}

#[test]
fn live_dir_is_one_option_with_the_old_spelling_as_alias_everywhere() {
    for path in [
        &["write"][..],
        &["overlay", "status"][..],
        &["overlay", "merge"][..],
        &["overlay", "reset"][..],
        &["overlay", "recover"][..],
        &["overlay", "grow"][..],
        &["home", "info"][..],
        &["home", "resize"][..],
    ] {
        let mut args = path.to_vec();
        args.push("--help");
        // Joined so that a wrapped line still matches.
        let help = ok(&livestick(&args))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            help.contains("--live-dir <DIR>") && help.contains("[alias: --livedir]"),
            "{path:?}:\n{help}"
        );
    }
    // Both spellings parse to the same thing.
    for spelling in ["--live-dir", "--livedir"] {
        let cli = cli::parse_from(["livestick", "write", "a.iso", "b.img", spelling, "X"]).unwrap();
        let cli::Command::Write(w) = cli.command else {
            panic!("not write")
        };
        assert_eq!(w.livedir, "X");
        cli::parse_from(["livestick", "home", "info", "s.img", spelling, "X"]).unwrap();
        cli::parse_from(["livestick", "overlay", "status", "s.img", spelling, "X"]).unwrap();
    }
    // The two verifications explain each other.
    let help = ok(&livestick(&["write", "--help"]));
    let noverify = help.find("--noverify ").unwrap();
    let verify_write = help.find("--no-verify-write ").unwrap();
    assert!(help[noverify..verify_write].contains("implanted in it"));
    assert!(help[verify_write..].contains("read the stick back"));
    let headings: Vec<&str> = help
        .lines()
        .filter(|l| !l.starts_with(' ') && l.ends_with(':'))
        .collect();
    assert_eq!(
        headings,
        [
            "Options:",
            "Source:",
            "Target & layout:",
            "Persistence:",
            "Boot:",
            "Verification:",
            "Output:",
            "Safety:",
            "Examples:"
        ]
    );
}
