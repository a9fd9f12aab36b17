//! A raw image written to the targets of one command: each target planned
//! from its probe, a batch of targets fed by one read (and one decompression)
//! of the image, or `--wait-for`'s sticks each reading it as they come; the
//! NDJSON events and the report of what became of each target.
//!
//! The live write's [`crate::batch::Batch`] does the same for a live ISO;
//! the events follow the same schema ([`crate::batch::EVENTS_SCHEMA`]).

use std::error::Error as StdError;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::{RawPlan, RawReport, RawSource, RawWriteError, StreamSource};
use crate::apply::{ApplyError, IsoSource};
use crate::batch::{BatchError, Failure, TargetEnd, emit, events, report_ends, verified_word};
use crate::disk::devices::{self, DeviceError};
use crate::disk::identity::{self, IdentityError};
use crate::disk::target::{self, TargetError, TargetProbe};
use crate::error::{BadInput, Classify, ErrorKind, PartialBatchFailure};
use crate::progress::{Progress, ProgressMode};
use crate::size::{human, parse_size};

/// Why planning or writing a raw target failed: the typed error of the step
/// that failed, shown and classified as that error.
#[derive(Debug, Error)]
pub enum RawRunError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    BadInput(#[from] BadInput),
    #[error(transparent)]
    Write(#[from] RawWriteError),
    #[error(transparent)]
    Source(#[from] ApplyError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error(transparent)]
    Partial(#[from] PartialBatchFailure),
    /// The image was found bad while it streamed to every target.
    #[error(
        "{0}; no target was made bootable: a target that was there before has its first MiB zeroed (it boots nothing until it is written again), a new image file was removed"
    )]
    BadImage(String),
}

impl RawRunError {
    /// The error a transparent variant wraps; `None` for one with its own words.
    fn wrapped(&self) -> Option<&dyn Classify> {
        Some(match self {
            RawRunError::BadImage(_) => return None,
            RawRunError::Target(e) => e,
            RawRunError::BadInput(e) => e,
            RawRunError::Write(e) => e,
            RawRunError::Source(e) => e,
            RawRunError::Identity(e) => e,
            RawRunError::Device(e) => e,
            RawRunError::Batch(e) => e,
            RawRunError::Partial(e) => e,
        })
    }
}

impl Classify for RawRunError {
    // Every variant but one is transparent, which hides the wrapped error from
    // the chain walk: answer with its kind and hint.
    fn kind(&self) -> ErrorKind {
        self.wrapped().map_or(ErrorKind::BadInput, |e| e.kind())
    }

    fn hint(&self) -> &'static str {
        self.wrapped().map_or(
            "fix or replace the image, then write the targets again",
            |e| e.hint(),
        )
    }
}

/// What the command line asked of every target.
#[derive(Debug, Clone, Copy)]
pub struct RawOptions<'a> {
    /// The image as the user named it.
    pub image: &'a Path,
    /// `--size`, as given: parsed for each target so that a bad one fails
    /// each target's plan, as a live batch does.
    pub size: Option<&'a str>,
    pub force: bool,
    pub verify: bool,
}

/// Probes `target_path` and plans the raw write of `source` to it.
pub fn plan_target(
    source: &RawSource,
    options: &RawOptions<'_>,
    target_path: &Path,
) -> Result<(RawPlan, TargetProbe), RawRunError> {
    let probe = target::probe(target_path)?;
    let requested = match options.size {
        Some(text) => Some(parse_size(text).map_err(|e| BadInput(format!("--size: {e}")))?),
        None => None,
    };
    let plan = super::plan_raw(source, options.image, &probe, requested, options.force)?;
    Ok((plan, probe))
}

/// The error and its causes on one line, as a report row and an event show it.
fn with_causes(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        // A message that quotes its cause already (`writing … failed at byte N:
        // No space left on device`) does not get it twice.
        let words = e.to_string();
        if !text.contains(&words) {
            text.push_str(&format!(": {words}"));
        }
        cause = e.source();
    }
    text
}

/// A written target's `done` event: the raw report's fields.
fn done_event(report: &RawReport) -> serde_json::Value {
    events::done(
        serde_json::to_value(report)
            .unwrap_or_else(|_| serde_json::json!({"target": report.target})),
    )
}

type Outcome = Option<Result<RawReport, Failure>>;

/// A batch error's words (with its causes) and kind.
fn failure_of(e: &RawRunError) -> Failure {
    Failure::new(with_causes(e), e.kind())
}

/// Several targets of one raw image: what became of each (in the order the
/// user named them, or plugged them in) and the events a script follows.
pub struct RawBatch<'a> {
    json: bool,
    source: &'a RawSource,
    options: RawOptions<'a>,
    outcomes: Vec<(PathBuf, Outcome)>,
    planned: Vec<(RawPlan, TargetProbe)>,
    /// The image itself was bad, and every target stopped because of it.
    bad_image: Option<String>,
    /// `--wait-for`'s `--wait-timeout` passed before every stick came.
    timed_out: Option<DeviceError>,
}

impl<'a> RawBatch<'a> {
    /// Announces the batch of `targets` and plans each; a target that cannot
    /// be planned is reported and left out.
    pub fn start(
        json: bool,
        source: &'a RawSource,
        options: RawOptions<'a>,
        targets: &[PathBuf],
    ) -> RawBatch<'a> {
        emit(
            json,
            events::start(options.image, "raw-image", Some(targets), None),
        );
        let mut batch = RawBatch::empty(json, source, options);
        for target_path in targets {
            match plan_target(source, &options, target_path) {
                Ok(p) => {
                    batch.planned.push(p);
                    batch.outcomes.push((target_path.clone(), None));
                }
                Err(e) => {
                    let msg = failure_of(&e);
                    emit(json, events::failed(target_path, "plan", &msg.text));
                    batch.outcomes.push((target_path.clone(), Some(Err(msg))));
                }
            }
        }
        batch
    }

    fn empty(json: bool, source: &'a RawSource, options: RawOptions<'a>) -> RawBatch<'a> {
        RawBatch {
            json,
            source,
            options,
            outcomes: Vec::new(),
            planned: Vec::new(),
            bad_image: None,
            timed_out: None,
        }
    }

    /// The targets planned, in order.
    /// The targets that could not be planned, with why (a dry run lists them).
    pub fn failures(&self) -> Vec<(&Path, &str)> {
        self.outcomes
            .iter()
            .filter_map(|(target, outcome)| match outcome {
                Some(Err(e)) => Some((target.as_path(), e.text.as_str())),
                _ => None,
            })
            .collect()
    }

    pub fn planned(&self) -> &[(RawPlan, TargetProbe)] {
        &self.planned
    }

    /// Writes every planned target, each on its own thread, from one read of
    /// the image; a target that fails is recorded and the others go on.
    pub fn write_all(&mut self, mode: ProgressMode) -> Result<(), RawRunError> {
        let json = self.json;
        let options = self.options;
        let stream = self.source.stream()?;
        let digest = stream.digest();
        let failure = stream.failure();
        let name = options.image.display().to_string();
        let (reader, readers) = crate::batch::broadcast(
            Box::new(StreamSource(Some(stream))),
            vec![(name.clone(), self.source.known_size().0)],
            self.planned.len(),
        );
        let multi = indicatif::MultiProgress::new();
        // The k-th planned target is the k-th target still without an outcome: its
        // result goes there, under the path the user gave (a symlink such as
        // /dev/disk/by-id/… stays that, though its probe names the device).
        let slots: Vec<usize> = self
            .outcomes
            .iter()
            .enumerate()
            .filter(|(_, (_, o))| o.is_none())
            .map(|(i, _)| i)
            .collect();
        let results: Vec<Result<RawReport, Failure>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .planned
                .iter()
                .zip(readers)
                .map(|((plan, probe), mut from)| {
                    let progress =
                        Progress::in_multi(mode, &multi, probe.path.display().to_string());
                    let digest = &digest;
                    let name = &name;
                    scope.spawn(move || {
                        let result = (|| -> Result<RawReport, RawRunError> {
                            let mut stream = from.open(name, 0)?;
                            Ok(super::write_target(
                                plan,
                                probe,
                                &mut stream,
                                digest,
                                options.verify,
                                &progress,
                            )?)
                        })();
                        // Dropping the receiver lets the reader go on without this target.
                        drop(from);
                        progress.finish();
                        result.map_err(|e| failure_of(&e))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Failure::new("its writer thread panicked", ErrorKind::Io))
                    })
                })
                .collect()
        });
        let _ = reader.join();
        for (k, result) in results.into_iter().enumerate() {
            let Some((target_path, slot)) = slots.get(k).and_then(|&i| self.outcomes.get_mut(i))
            else {
                continue;
            };
            let result = result.map(|mut report| {
                report.target = target_path.clone();
                report
            });
            match &result {
                Ok(r) => emit(json, done_event(r)),
                Err(e) => emit(json, events::failed(target_path, "write", &e.text)),
            }
            *slot = Some(result);
        }
        // A planned target without a result was not written as far as anyone knows.
        for (target_path, slot) in self.outcomes.iter_mut().filter(|(_, o)| o.is_none()) {
            let e = Failure::new(
                "no result came back from its writer: treat it as not written",
                ErrorKind::Io,
            );
            emit(json, events::failed(target_path, "write", &e.text));
            *slot = Some(Err(e));
        }
        let bad_image = failure.lock().ok().and_then(|f| f.clone());
        if let Some(f) = bad_image.filter(|f| f.kind == ErrorKind::BadInput)
            && self.outcomes.iter().all(|(_, o)| matches!(o, Some(Err(_))))
        {
            self.bad_image = Some(f.message);
        }
        Ok(())
    }

    /// `--wait-for N`: each stick, as it is plugged in, is planned and reads
    /// the image itself (the sticks come at different times).
    pub fn wait_for(
        json: bool,
        quiet: bool,
        mode: ProgressMode,
        source: &'a RawSource,
        options: RawOptions<'a>,
        n: usize,
        timeout: Option<std::time::Duration>,
    ) -> Result<RawBatch<'a>, RawRunError> {
        emit(
            json,
            events::start(options.image, "raw-image", None, Some(n)),
        );
        if !json && !quiet {
            crate::batch::say_waiting(n, timeout);
        }
        let multi = indicatif::MultiProgress::new();
        let outcomes = std::sync::Mutex::new(Vec::new());
        let wait_result = std::thread::scope(|scope| {
            devices::wait_for_new_devices(n, timeout, options.force, |device| {
                let progress = Progress::in_multi(mode, &multi, device.display().to_string());
                let outcomes = &outcomes;
                emit(json, events::plugged(&device));
                scope.spawn(move || {
                    let result = (|| -> Result<RawReport, RawRunError> {
                        identity::check_distinct(options.image, std::slice::from_ref(&device))?;
                        let (plan, probe) = plan_target(source, &options, &device)?;
                        let mut stream = source.stream()?;
                        let digest = stream.digest();
                        Ok(super::write_target(
                            &plan,
                            &probe,
                            &mut stream,
                            &digest,
                            options.verify,
                            &progress,
                        )?)
                    })();
                    progress.finish();
                    let result = result.map_err(|e| failure_of(&e));
                    match &result {
                        Ok(r) => emit(json, done_event(r)),
                        Err(e) => emit(json, events::failed(&device, "write", &e.text)),
                    }
                    if let Ok(mut all) = outcomes.lock() {
                        all.push((device, Some(result)));
                    }
                });
            })
        });
        let mut batch = RawBatch::empty(json, source, options);
        batch.outcomes = outcomes.into_inner().unwrap_or_default();
        match wait_result {
            // The sticks that did come were written: they are reported, and the
            // shortfall makes the batch partial.
            Err(e @ DeviceError::WaitTimedOut { .. }) => batch.timed_out = Some(e),
            other => {
                other?;
            }
        }
        Ok(batch)
    }

    /// Prints the report (the `report` event, or a table unless `quiet`) and
    /// says whether every target was written.
    pub fn finish(self, quiet: bool) -> Result<(), RawRunError> {
        let json = self.json;
        let outcomes = self.outcomes;
        let total = outcomes.len();
        let ends = outcomes.iter().map(|(target_path, outcome)| {
            let end = match outcome {
                Some(Ok(r)) => TargetEnd::Done {
                    row: events::Row {
                        ok: true,
                        image_sha256: r.image_sha256.as_deref(),
                        verified: Some(r.verified),
                        ..Default::default()
                    },
                    detail: format!(
                        "raw image, {} written, {}",
                        human(r.bytes_written),
                        verified_word(r.verified)
                    ),
                },
                Some(Err(e)) => TargetEnd::Failed(e),
                None => TargetEnd::Planned,
            };
            (target_path.as_path(), end)
        });
        let details = report_ends(json, quiet, ends.collect());
        if let Some(message) = self.bad_image {
            // Every target stopped because the image is bad: that is the error
            // (bad input), not an I/O failure of each stick.
            return Err(RawRunError::BadImage(message));
        }
        crate::batch::verdict_after_wait(details, total, self.timed_out).map_err(|e| match e {
            BatchError::Partial(p) => RawRunError::Partial(p),
            other => other.into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::compressed::StatedSize;
    use crate::source::raw::RawImage;

    fn source() -> RawSource {
        RawSource {
            image: RawImage {
                path: PathBuf::from("disk.raw"),
                compression: None,
                size: StatedSize::Exact(4 << 20),
                file_len: 4 << 20,
            },
            why: "test".into(),
            bmap: None,
            range_checksums_skipped: false,
        }
    }

    fn options() -> RawOptions<'static> {
        RawOptions {
            image: Path::new("disk.raw"),
            size: None,
            force: false,
            verify: true,
        }
    }

    fn finished(
        source: &RawSource,
        outcomes: Vec<Option<&str>>,
        bad_image: Option<&str>,
    ) -> Result<(), RawRunError> {
        let mut batch = RawBatch::empty(false, source, options());
        for (i, o) in outcomes.into_iter().enumerate() {
            batch.outcomes.push((
                PathBuf::from(format!("/dev/sd{i}")),
                o.map(|e| Err(Failure::new(e, ErrorKind::Io))),
            ));
        }
        batch.bad_image = bad_image.map(str::to_string);
        batch.finish(true)
    }

    #[test]
    fn a_raw_batch_with_some_failures_is_partial_naming_each_failed_target() {
        let src = source();
        let err = finished(&src, vec![Some("full"), None, Some("unplugged")], None)
            .expect_err("two of three failed");
        assert_eq!(err.kind(), ErrorKind::PartialBatch);
        match err {
            RawRunError::Partial(p) => {
                assert_eq!((p.failed, p.total), (2, 3));
                assert_eq!(p.details, ["/dev/sd0: full", "/dev/sd2: unplugged"]);
            }
            other => panic!("expected a partial failure, got {other:?}"),
        }
    }

    #[test]
    fn a_raw_batch_where_every_target_failed_is_an_io_failure_unless_the_image_was_bad() {
        let src = source();
        let err = finished(&src, vec![Some("full"), Some("gone")], None).expect_err("all failed");
        assert_eq!(err.kind(), ErrorKind::Io);
        assert_eq!(
            err.to_string(),
            "every target failed: /dev/sd0: full; /dev/sd1: gone"
        );
        let err = finished(
            &src,
            vec![Some("bad"), Some("bad")],
            Some("the xz stream is corrupt"),
        )
        .expect_err("bad image");
        assert_eq!(err.kind(), ErrorKind::BadInput);
        assert_eq!(
            err.to_string(),
            "the xz stream is corrupt; no target was made bootable: a target that was there before has its first MiB zeroed (it boots nothing until it is written again), a new image file was removed"
        );
        assert!(
            !err.hint().contains("nothing was written"),
            "{}",
            err.hint()
        );
        assert!(finished(&src, vec![None, None], None).is_ok());
    }

    #[test]
    fn a_cause_the_message_quotes_is_not_repeated() {
        let full = RawRunError::Write(RawWriteError::Write {
            target: PathBuf::from("/dev/sdz"),
            at: 4096,
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        });
        let text = with_causes(&full);
        assert_eq!(text.matches("No space left on device").count(), 1, "{text}");
        assert!(
            text.starts_with("writing /dev/sdz failed at byte 4096"),
            "{text}"
        );
    }

    #[test]
    fn a_bad_size_fails_the_target_plan_as_bad_input() {
        let dir = tempfile::tempdir().expect("temp dir");
        let src = source();
        let mut opts = options();
        opts.size = Some("12 parsecs");
        let err = plan_target(&src, &opts, &dir.path().join("new.img")).expect_err("bad size");
        assert_eq!(err.kind(), ErrorKind::BadInput);
        assert!(err.to_string().starts_with("--size: "), "{err}");
        opts.size = Some("8M");
        let (plan, _) = plan_target(&src, &opts, &dir.path().join("new.img")).expect("planned");
        assert_eq!(plan.target.size, 8 << 20);
    }
}
