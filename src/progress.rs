//! Progress reporting: indicatif bars for people, NDJSON events for scripts,
//! or nothing. Bars hide themselves when stderr is not a terminal.

use std::fmt;
use std::io::{self, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    Bar,
    Quiet,
    /// One JSON object per phase on stderr (stdout stays the final report).
    Json,
}

pub struct Progress {
    mode: ProgressMode,
    bar: Option<ProgressBar>,
    device: String,
    /// JSON mode: (phase, total, done, bytes at the last tick event).
    ticks: std::sync::Mutex<(String, u64, u64, u64)>,
}

/// JSON progress ticks come every this many bytes (and at the end of a phase).
const TICK_BYTES: u64 = 64 << 20;

impl Progress {
    pub fn new(mode: ProgressMode, device: impl Into<String>) -> Self {
        let bar = (mode == ProgressMode::Bar).then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>8} [{bar:32}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        });
        Progress {
            mode,
            bar,
            device: device.into(),
            ticks: std::sync::Mutex::new((String::new(), 0, 0, 0)),
        }
    }

    /// A bar inside a batch's `MultiProgress` (one line per device).
    pub fn in_multi(
        mode: ProgressMode,
        multi: &indicatif::MultiProgress,
        device: impl Into<String>,
    ) -> Self {
        let device = device.into();
        let mut progress = Progress::new(
            if mode == ProgressMode::Bar {
                ProgressMode::Quiet
            } else {
                mode
            },
            device.clone(),
        );
        if mode == ProgressMode::Bar {
            let bar = multi.add(ProgressBar::new(0));
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg:<20} {prefix:>6} [{bar:24}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(device);
            progress.bar = Some(bar);
            progress.mode = ProgressMode::Bar;
        }
        progress
    }

    pub fn hidden() -> Self {
        Progress::new(ProgressMode::Quiet, "")
    }

    /// Starts a phase of `total` bytes (`copy`, `verify`, `md5`).
    pub fn phase(&self, name: &str, total: u64) {
        match self.mode {
            ProgressMode::Bar => {
                if let Some(bar) = &self.bar {
                    bar.set_prefix(name.to_string());
                    bar.set_length(total);
                    bar.set_position(0);
                    bar.reset_eta();
                }
            }
            ProgressMode::Json => {
                let event = serde_json::json!({
                    "event": "phase", "device": self.device, "phase": name, "total": total,
                });
                event_line(&event);
                if let Ok(mut t) = self.ticks.lock() {
                    *t = (name.to_string(), total, 0, 0);
                }
            }
            ProgressMode::Quiet => {}
        }
    }

    pub fn inc(&self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
        if self.mode == ProgressMode::Json
            && let Ok(mut t) = self.ticks.lock()
        {
            t.2 += bytes;
            let (done, total, last) = (t.2, t.1, t.3);
            if done - last >= TICK_BYTES || (done >= total && last < total) {
                t.3 = done;
                let event = serde_json::json!({
                    "event": "progress", "device": self.device, "phase": t.0,
                    "done": done, "total": total,
                });
                event_line(&event);
            }
        }
    }

    /// A line of text that should not tear the bar.
    pub fn note(&self, text: &str) {
        match (&self.bar, self.mode) {
            (Some(bar), _) => bar.set_message(text.to_string()),
            (None, ProgressMode::Json) => {
                let event =
                    serde_json::json!({"event": "note", "device": self.device, "text": text});
                event_line(&event);
            }
            _ => {}
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
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
