//! Progress reporting: indicatif bars for people on a terminal, one line per
//! phase when stderr is not a terminal (a log or a pipe), NDJSON events for
//! scripts, or nothing.

use std::fmt;
use std::io::{self, IsTerminal, Write};
use std::time::Duration;

use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// A bar on a terminal; one line per phase when stderr is not one.
    Bar,
    /// One line per phase and note on stderr, no bar.
    Lines,
    Quiet,
    /// One JSON object per phase on stderr (stdout stays the final report).
    Json,
}

pub struct Progress {
    mode: ProgressMode,
    /// The current phase's bar: one bar per phase, each built with its total
    /// before it is shown, so no frame mixes two phases.
    bar: Mutex<Option<ProgressBar>>,
    /// Set for a line of a batch: bars are drawn by the batch's `MultiProgress`.
    multi: Option<MultiProgress>,
    device: String,
    /// The phases are about the source (download, unpack, implanted MD5), not a
    /// target: JSON events say `"target": null`.
    about_source: bool,
    /// JSON mode: (phase, total, done, bytes at the last tick event).
    ticks: Mutex<(String, u64, u64, u64)>,
}

/// The version of the stderr progress events' shape
/// (schemas/progress-event.schema.json).
pub const EVENT_SCHEMA: u32 = 1;

/// JSON progress ticks come every this many bytes (and at the end of a phase).
const TICK_BYTES: u64 = 64 << 20;

const SINGLE_TEMPLATE: &str =
    "{prefix:>8} [{bar:32}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}";
/// In a batch the message column names the device.
const BATCH_TEMPLATE: &str =
    "{msg:<20} {prefix:>6} [{bar:24}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}";

impl Progress {
    pub fn new(mode: ProgressMode, device: impl Into<String>) -> Self {
        Progress {
            mode: mode.for_stderr(),
            bar: Mutex::new(None),
            multi: None,
            device: device.into(),
            about_source: false,
            ticks: Mutex::new((String::new(), 0, 0, 0)),
        }
    }

    /// Progress of work on the source, which a log line names `name` (`iso`,
    /// `source`) and a JSON event gives no target.
    pub fn for_source(mode: ProgressMode, name: impl Into<String>) -> Self {
        Progress {
            about_source: true,
            ..Progress::new(mode, name)
        }
    }

    /// The `target` of this progress's JSON events.
    fn event_target(&self) -> Option<&str> {
        (!self.about_source).then_some(self.device.as_str())
    }

    /// A bar inside a batch's `MultiProgress` (one line per device).
    pub fn in_multi(mode: ProgressMode, multi: &MultiProgress, device: impl Into<String>) -> Self {
        let mut progress = Progress::new(mode, device);
        if progress.mode == ProgressMode::Bar {
            progress.multi = Some(multi.clone());
        }
        progress
    }

    pub fn hidden() -> Self {
        Progress::new(ProgressMode::Quiet, "")
    }

    fn new_bar(&self, name: &str, total: u64) -> ProgressBar {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
        let template = if self.multi.is_some() {
            BATCH_TEMPLATE
        } else {
            SINGLE_TEMPLATE
        };
        bar.set_style(
            ProgressStyle::with_template(template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(name.to_string());
        if self.multi.is_some() {
            bar.set_message(self.device.clone());
        }
        bar
    }

    /// Starts a phase of `total` bytes (`copy`, `verify`, `md5`).
    pub fn phase(&self, name: &str, total: u64) {
        match self.mode {
            // A phase with nothing to count (a read-back that the writing already did)
            // gets no bar: one with a total of 0 would show a meaningless 100 %.
            ProgressMode::Bar if total == 0 => self.finish(),
            ProgressMode::Bar => {
                let bar = self.new_bar(name, total);
                let Ok(mut current) = self.bar.lock() else {
                    return;
                };
                let old = current.take();
                let bar = match (&self.multi, &old) {
                    (Some(multi), Some(old)) => multi.insert_after(old, bar),
                    (Some(multi), None) => multi.add(bar),
                    (None, _) => {
                        if let Some(old) = &old {
                            old.finish_and_clear();
                        }
                        bar.set_draw_target(ProgressDrawTarget::stderr());
                        bar.enable_steady_tick(Duration::from_millis(250));
                        bar
                    }
                };
                if let (Some(multi), Some(old)) = (&self.multi, old) {
                    old.finish_and_clear();
                    multi.remove(&old);
                }
                *current = Some(bar);
            }
            ProgressMode::Lines => {
                line(&format!(
                    "{}: {} ({})",
                    self.device,
                    describe(name),
                    crate::size::human(total)
                ));
            }
            ProgressMode::Json => {
                let event = serde_json::json!({
                    "event": "phase", "schema": EVENT_SCHEMA, "target": self.event_target(),
                    "phase": name, "total_bytes": total,
                });
                event_line(&event);
                if let Ok(mut t) = self.ticks.lock() {
                    *t = (name.to_string(), total, 0, 0);
                }
            }
            ProgressMode::Quiet => {}
        }
    }

    fn with_bar(&self, f: impl FnOnce(&ProgressBar)) {
        if let Ok(current) = self.bar.lock()
            && let Some(bar) = current.as_ref()
        {
            f(bar);
        }
    }

    pub fn inc(&self, bytes: u64) {
        if self.mode == ProgressMode::Bar {
            self.with_bar(|bar| bar.inc(bytes));
        }
        if self.mode == ProgressMode::Json
            && let Ok(mut t) = self.ticks.lock()
        {
            t.2 += bytes;
            let (done, total, last) = (t.2, t.1, t.3);
            if done - last >= TICK_BYTES || (done >= total && last < total) {
                t.3 = done;
                let event = serde_json::json!({
                    "event": "progress", "schema": EVENT_SCHEMA, "target": self.event_target(),
                    "phase": t.0, "done_bytes": done, "total_bytes": total,
                });
                event_line(&event);
            }
        }
    }

    /// Adds `bytes` to the current phase's total: work that became known during it.
    pub fn grow(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        match self.mode {
            ProgressMode::Bar => self.with_bar(|bar| bar.inc_length(bytes)),
            ProgressMode::Json => {
                if let Ok(mut t) = self.ticks.lock() {
                    t.1 += bytes;
                }
            }
            ProgressMode::Lines | ProgressMode::Quiet => {}
        }
    }

    /// A line of text that should not tear the bar: shown beside the current
    /// phase's bar (in a batch, beside the device's name), gone with the phase.
    pub fn note(&self, text: &str) {
        match self.mode {
            ProgressMode::Bar if self.multi.is_some() => {
                self.with_bar(|bar| bar.set_message(format!("{} {text}", self.device)))
            }
            ProgressMode::Bar => self.with_bar(|bar| bar.set_message(text.to_string())),
            ProgressMode::Json => {
                let event = serde_json::json!({"event": "note", "schema": EVENT_SCHEMA,
                    "target": self.event_target(), "text": text});
                event_line(&event);
            }
            ProgressMode::Lines => line(&format!("{}: {text}", self.device)),
            ProgressMode::Quiet => {}
        }
    }

    pub fn finish(&self) {
        if let Ok(mut current) = self.bar.lock()
            && let Some(bar) = current.take()
        {
            bar.finish_and_clear();
            if let Some(multi) = &self.multi {
                multi.remove(&bar);
            }
        }
    }
}

impl ProgressMode {
    /// What `--json`/`--quiet` ask for, before looking at stderr.
    pub fn from_flags(json: bool, quiet: bool) -> ProgressMode {
        if json {
            ProgressMode::Json
        } else if quiet {
            ProgressMode::Quiet
        } else {
            ProgressMode::Bar
        }
    }

    /// A bar only where someone watches a terminal; a log gets lines.
    fn for_stderr(self) -> ProgressMode {
        if self == ProgressMode::Bar && !io::stderr().is_terminal() {
            ProgressMode::Lines
        } else {
            self
        }
    }
}

/// A phase's name as a log line says it.
fn describe(phase: &str) -> &str {
    match phase {
        "md5" => "checking the ISO's implanted MD5",
        "unpack" => "unpacking the compressed image",
        "write" => "writing",
        "verify" => "reading back what was written",
        other => other,
    }
}

/// A progress line for a log; like events, never fatal when stderr is gone.
fn line(text: &str) {
    let _ = writeln!(io::stderr(), "{text}");
}

/// One JSON progress event on stderr. A closed stderr loses the events and
/// never stops the write they report on (`eprintln!` would panic).
fn event_line(event: &serde_json::Value) {
    let _ = writeln!(io::stderr(), "{event}");
}

/// Writes part of a report to stdout. Commands that change something ignore
/// SIGPIPE (a signal must never stop a write half way), so a reader that went
/// away (`livestick write … | head -1`) shows up here as `EPIPE`, where
/// `print!` would panic: the rest of the report is dropped quietly and the
/// command finishes its work and exits with the code that work earned. Any
/// other failure to print is said once on stderr, for the same reason.
pub fn print_out(args: fmt::Arguments<'_>) {
    let mut stdout = io::stdout().lock();
    let result = stdout.write_fmt(args).and_then(|()| stdout.flush());
    match result {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
        Err(e) => {
            let _ = writeln!(io::stderr(), "livestick: cannot print the report: {e}");
        }
    }
}

/// `print!` that never panics on a closed stdout: see [`print_out`].
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::progress::print_out(format_args!($($arg)*))
    };
}

/// `println!` that never panics on a closed stdout: see [`print_out`].
#[macro_export]
macro_rules! outln {
    () => {
        $crate::progress::print_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::progress::print_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}
