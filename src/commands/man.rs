//! `livestick man`: the roff manual page, generated from the clap definitions
//! so it never disagrees with `--help`.
//!
//! One page holds everything (what `man livestick` should show); each
//! subcommand gets a section with its synopsis, description, options and
//! examples. `--dir` writes one page per command instead, for packagers who
//! prefer `man livestick-write`.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use clap_mangen::Man;

use crate::cli::ManArgs;

pub fn run(args: &ManArgs) -> anyhow::Result<()> {
    let cmd = crate::cli::command();
    match &args.dir {
        Some(dir) => write_pages(cmd, dir),
        None => {
            let mut out = Vec::new();
            render(cmd, &mut out)?;
            std::io::stdout().write_all(&out)?;
            Ok(())
        }
    }
}

/// The whole manual as one roff page.
pub fn render(cmd: clap::Command, out: &mut Vec<u8>) -> anyhow::Result<()> {
    let mut cmd = cmd;
    cmd.build();
    let man = Man::new(cmd.clone());
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;
    man.render_subcommands_section(out)?;
    if let Some(after) = cmd.get_after_long_help().or(cmd.get_after_help()) {
        out.extend_from_slice(b".SH EXAMPLES\n");
        push_text(out, &after.to_string());
    }
    for sub in cmd
        .get_subcommands()
        .filter(|s| s.get_name() != "help" && !s.is_hide_set())
    {
        render_subcommand(sub, &format!("{} {}", cmd.get_name(), sub.get_name()), out)?;
    }
    man.render_version_section(out)?;
    out.extend_from_slice(
        b".SH \"EXIT STATUS\"\n0 success; 1 usage error; 2 bad input; 3 target refused for safety; \
4 I/O failure; 5 some targets of a batch failed. See docs/exit-codes.md.\n",
    );
    out.extend_from_slice(
        b".SH \"SEE ALSO\"\n\\fBlivecd-iso-to-disk\\fR(8) \\(em livestick accepts its command line \
when invoked under that name or as \\fBlivestick iso-to-disk\\fR.\n",
    );
    Ok(())
}

/// A subcommand's section: its sub-page's sections, demoted to subsections
/// so the one page has one NAME, one SYNOPSIS, and so on.
fn render_subcommand(sub: &clap::Command, path: &str, out: &mut Vec<u8>) -> anyhow::Result<()> {
    let man = Man::new(sub.clone().bin_name(path));
    let mut part = Vec::new();
    man.render_synopsis_section(&mut part)?;
    man.render_description_section(&mut part)?;
    man.render_options_section(&mut part)?;
    if sub.has_subcommands() {
        man.render_subcommands_section(&mut part)?;
    }
    let part = String::from_utf8_lossy(&part).replace(".SH ", ".SS ");
    out.extend_from_slice(format!(".SH \"{}\"\n", path.to_uppercase()).as_bytes());
    out.extend_from_slice(part.as_bytes());
    if let Some(after) = sub.get_after_long_help().or(sub.get_after_help()) {
        out.extend_from_slice(b".SS EXAMPLES\n");
        push_text(out, &after.to_string());
    }
    for child in sub
        .get_subcommands()
        .filter(|s| s.get_name() != "help" && !s.is_hide_set())
    {
        render_subcommand(child, &format!("{path} {}", child.get_name()), out)?;
    }
    Ok(())
}

/// Literal text (examples) in a no-fill block, with roff's special leading
/// characters and backslashes escaped.
fn push_text(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(b".nf\n");
    for line in text.lines() {
        if line.trim_start().starts_with("Examples:") {
            continue;
        }
        let escaped = line.replace('\\', "\\e");
        let escaped = if escaped.starts_with('.') || escaped.starts_with('\'') {
            format!("\\&{escaped}")
        } else {
            escaped
        };
        out.extend_from_slice(escaped.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(b".fi\n");
}

/// One page per command: livestick.1, livestick-write.1, livestick-overlay-merge.1, …
fn write_pages(cmd: clap::Command, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(cmd, dir)
        .with_context(|| format!("writing manual pages into {}", dir.display()))?;
    Ok(())
}
