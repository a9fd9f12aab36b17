//! A batch: one read of the ISO, fanned out to many targets, and the
//! orchestration of writing them side by side ([`Batch`]).
//!
//! A broadcaster thread reads each ISO file the plans copy, in plan order,
//! in large chunks, and hands every chunk (shared, not copied) to each
//! target's bounded channel. A target that fails drops its receiver; the
//! broadcaster notices on the next send and carries on with the others.

use std::collections::VecDeque;
use std::fmt::Display;
use std::io::{self, BufRead, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use thiserror::Error;

use crate::apply::{ApplyError, ApplyReport, IsoSource};
use crate::boot::syslinux::SyslinuxFiles;
use crate::disk::devices::DeviceError;
use crate::disk::target::TargetProbe;
use crate::error::{Classify, ErrorKind, PartialBatchFailure};
use crate::plan::{CopySource, Plan};
use crate::progress::{Progress, ProgressMode};
use crate::source::live::LiveImage;

const CHUNK: usize = 4 << 20;
/// Chunks buffered per target: enough to ride out a slow moment of one
/// stick without holding much memory (4 × 4 MiB, shared by every target).
const DEPTH: usize = 4;
/// Chunks buffered for a lone target: it has no other stick to wait for, and a
/// single write stays small (peak RSS under 64 MiB).
const DEPTH_ALONE: usize = 2;

/// Bytes of a chunk buffer that every target reads, shared, not copied.
#[derive(Clone)]
struct Lent {
    buffer: Arc<crate::io::PooledBuffer>,
    range: std::ops::Range<usize>,
}

impl std::ops::Deref for Lent {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buffer[self.range.clone()]
    }
}

enum Chunk {
    Data(Lent),
    /// The file's end, with the sha256 of its bytes: hashed once here rather than
    /// once per target (on a CPU without SHA instructions, such as QEMU's TCG, four
    /// targets hashing the same bytes made a batch CPU-bound).
    End([u8; 32]),
    Failed(String),
}

/// Runs `write` with a reader of the ISO files `plan` copies that is a broadcast to
/// one target: the reads past the page cache and the bytes lent in place, as in a
/// batch. The reader stops once `write` returns (a write that failed leaves files
/// unread) and is waited for.
pub fn with_reader_of_one<T, E>(
    source: Box<dyn IsoSource + Send>,
    plan: &Plan,
    write: impl FnOnce(&mut dyn IsoSource) -> Result<T, E>,
) -> Result<T, E> {
    let (handle, mut sources) = broadcast(source, iso_files_of(plan), 1);
    // `broadcast` makes one source per target asked for.
    let written = write(&mut sources[0]);
    drop(sources);
    let _ = handle.join();
    written
}

/// The receiving side for one target.
pub struct BroadcastSource {
    rx: Receiver<Chunk>,
    expected: VecDeque<String>,
    /// The sha256 of the file last read to its end.
    last_digest: Option<[u8; 32]>,
}

/// Starts reading `files` (ISO paths, in the order every target will ask
/// for them) from the ISO and returns one source per target.
pub fn broadcast(
    mut source: Box<dyn IsoSource + Send>,
    files: Vec<(String, u64)>,
    targets: usize,
) -> (JoinHandle<()>, Vec<BroadcastSource>) {
    let mut senders: Vec<Option<SyncSender<Chunk>>> = Vec::new();
    let mut sources = Vec::new();
    for _ in 0..targets {
        let (tx, rx) = sync_channel(if targets == 1 { DEPTH_ALONE } else { DEPTH });
        senders.push(Some(tx));
        sources.push(BroadcastSource {
            rx,
            expected: files.iter().map(|(p, _)| p.clone()).collect(),
            last_digest: None,
        });
    }
    let handle = std::thread::spawn(move || {
        let send_all = |senders: &mut Vec<Option<SyncSender<Chunk>>>, make: &dyn Fn() -> Chunk| {
            for slot in senders.iter_mut() {
                if let Some(tx) = slot
                    && tx.send(make()).is_err()
                {
                    // That target stopped (failed or finished early): drop it.
                    *slot = None;
                }
            }
        };
        // Used again once every target is done with them: each new one would be
        // fresh pages, faulted in and zeroed.
        let buffers = crate::io::BufferPool::new(CHUNK_ROOM, IDLE_CHUNKS);
        for (path, size) in files {
            let mut digest = crate::io::Sha256Hash::default();
            let mut reader = match FileChunks::open(source.as_mut(), &path, size) {
                Ok(r) => r,
                Err(e) => {
                    let msg = e.to_string();
                    send_all(&mut senders, &|| Chunk::Failed(msg.clone()));
                    return;
                }
            };
            loop {
                let lent = match reader.next(&buffers) {
                    Ok(Some(lent)) => lent,
                    Ok(None) => break,
                    Err(e) => {
                        let msg = format!("reading {path}: {e}");
                        drop(reader);
                        send_all(&mut senders, &|| Chunk::Failed(msg.clone()));
                        return;
                    }
                };
                send_all(&mut senders, &|| Chunk::Data(lent.clone()));
                if senders.iter().all(Option::is_none) {
                    return;
                }
                // While the targets write this chunk.
                crate::io::StreamHash::update(&mut digest, &lent);
            }
            let digest = crate::io::StreamHash::finish(digest);
            send_all(&mut senders, &|| Chunk::End(digest));
        }
    });
    (handle, sources)
}

/// Buffers no target holds any more, kept for the next chunks; more than a
/// couple would only hold memory.
const IDLE_CHUNKS: usize = 2;
/// A chunk buffer's room: a chunk, and where it is read past the page cache,
/// the aligned blocks around it.
const CHUNK_ROOM: usize = CHUNK + 3 * crate::io::DIRECT_ALIGN;

/// One ISO file's bytes in chunks: from the host file past the page cache where the
/// source says where they lie (each page read through the cache is allocated, zeroed
/// and copied once more), through the source's reader otherwise.
enum FileChunks<'a> {
    Extents {
        /// Past the page cache, until a read refuses it (then `None`: through it).
        direct: Option<std::fs::File>,
        file: std::fs::File,
        extents: VecDeque<(u64, u64)>,
    },
    Reader(Box<dyn Read + 'a>),
}

impl<'a> FileChunks<'a> {
    fn open(
        source: &'a mut (dyn IsoSource + Send),
        path: &str,
        size: u64,
    ) -> Result<FileChunks<'a>, crate::apply::ApplyError> {
        if let Some(found) = source.file_extents(path)
            && found.extents.iter().map(|e| e.1).sum::<u64>() == size
        {
            return Ok(FileChunks::Extents {
                direct: crate::io::reopen_direct(&found.file, crate::io::Access::Read),
                file: found.file,
                extents: found.extents.into_iter().filter(|e| e.1 > 0).collect(),
            });
        }
        Ok(FileChunks::Reader(source.open(path, size)?))
    }

    /// The next chunk, `None` at the file's end.
    fn next(&mut self, buffers: &Arc<crate::io::BufferPool>) -> io::Result<Option<Lent>> {
        let mut buffer = buffers.take();
        if buffer.len() < CHUNK_ROOM {
            // Only a new buffer: one used before keeps its length.
            buffer.resize(CHUNK_ROOM, 0);
        }
        match self {
            FileChunks::Reader(reader) => {
                let filled = crate::io::read_full(reader, &mut buffer[..CHUNK])?;
                Ok((filled > 0).then(|| Lent {
                    buffer: Arc::new(buffer),
                    range: 0..filled,
                }))
            }
            FileChunks::Extents {
                direct,
                file,
                extents,
            } => {
                let Some((at, left)) = extents.front_mut() else {
                    return Ok(None);
                };
                let n = (*left).min(CHUNK as u64) as usize;
                let align = crate::io::DIRECT_ALIGN;
                let base = buffer.as_ptr().align_offset(align);
                let window = &mut buffer[base..];
                let read = |f: &std::fs::File, window: &mut [u8]| {
                    crate::io::read_aligned_at(f, window, *at, n)
                };
                let skip = match direct.as_ref().map(|d| read(d, window)) {
                    Some(Ok(skip)) => skip,
                    // A device or file system that takes no O_DIRECT read here.
                    Some(Err(e)) if e.raw_os_error() == Some(libc::EINVAL) => {
                        *direct = None;
                        read(file, window)?
                    }
                    Some(Err(e)) => return Err(e),
                    None => read(file, window)?,
                };
                *at += n as u64;
                *left -= n as u64;
                if *left == 0 {
                    extents.pop_front();
                }
                let start = base + skip;
                Ok(Some(Lent {
                    buffer: Arc::new(buffer),
                    range: start..start + n,
                }))
            }
        }
    }
}

struct ChannelReader<'a> {
    rx: &'a Receiver<Chunk>,
    digest: &'a mut Option<[u8; 32]>,
    current: Option<Lent>,
    offset: usize,
    done: bool,
}

impl ChannelReader<'_> {
    /// Waits for the next chunk unless bytes of the current one are left; false at
    /// the file's end.
    fn refill(&mut self) -> io::Result<bool> {
        loop {
            if self.done {
                return Ok(false);
            }
            if self.current.as_ref().is_some_and(|c| self.offset < c.len()) {
                return Ok(true);
            }
            match self.rx.recv() {
                Ok(Chunk::Data(d)) => {
                    self.current = Some(d);
                    self.offset = 0;
                }
                Ok(Chunk::End(digest)) => {
                    *self.digest = Some(digest);
                    self.done = true;
                    self.current = None;
                }
                Ok(Chunk::Failed(msg)) => return Err(io::Error::other(msg)),
                Err(_) => {
                    return Err(io::Error::other(
                        "the ISO reader stopped before this file was complete",
                    ));
                }
            }
        }
    }
}

impl Read for ChannelReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let lent = self.fill_buf()?;
        let n = buf.len().min(lent.len());
        buf[..n].copy_from_slice(&lent[..n]);
        self.consume(n);
        Ok(n)
    }
}

/// Lends the broadcast chunk itself: every target writes from the one copy the
/// broadcaster read.
impl BufRead for ChannelReader<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if !self.refill()? {
            return Ok(&[]);
        }
        Ok(self
            .current
            .as_deref()
            .map_or(&[][..], |chunk| &chunk[self.offset..]))
    }

    fn consume(&mut self, amount: usize) {
        self.offset += amount;
    }
}

impl BroadcastSource {
    fn reader(&mut self, path: &str) -> Result<ChannelReader<'_>, ApplyError> {
        match self.expected.pop_front() {
            Some(p) if p == path => {
                self.last_digest = None;
                Ok(ChannelReader {
                    rx: &self.rx,
                    digest: &mut self.last_digest,
                    current: None,
                    offset: 0,
                    done: false,
                })
            }
            other => Err(ApplyError::Source {
                path: path.to_string(),
                reason: format!(
                    "batch reader out of step (expected {})",
                    other.unwrap_or_else(|| "no more files".into())
                ),
            }),
        }
    }
}

impl IsoSource for BroadcastSource {
    fn open(&mut self, path: &str, _size: u64) -> Result<Box<dyn Read + '_>, ApplyError> {
        Ok(Box::new(self.reader(path)?))
    }

    fn open_buffered(
        &mut self,
        path: &str,
        _size: u64,
    ) -> Result<Box<dyn io::BufRead + '_>, ApplyError> {
        Ok(Box::new(self.reader(path)?))
    }

    fn hashes_files(&self) -> bool {
        true
    }

    fn digest_of_last(&mut self) -> Option<[u8; 32]> {
        self.last_digest.take()
    }
}

/// The schema version of the NDJSON events `write --json` prints for a batch
/// (docs/ndjson-events.md).
pub const EVENTS_SCHEMA: u32 = 3;

/// The NDJSON events of a batch, one builder each, so that the live and the raw
/// batch print one shape (schemas/batch-event.schema.json). Every event carries
/// `schema`; a field that does not apply to this event is `null`, never absent.
pub mod events {
    use std::path::Path;

    use serde_json::{Value, json};

    use super::EVENTS_SCHEMA;

    /// The first line: what is read, and the targets named or how many are awaited.
    /// `kind` is `live-iso` or `raw-image`.
    pub fn start(
        source: &Path,
        kind: &str,
        targets: Option<&[std::path::PathBuf]>,
        wait_for: Option<usize>,
    ) -> Value {
        json!({"event": "start", "schema": EVENTS_SCHEMA, "source": source, "kind": kind,
            "targets": targets, "wait_for": wait_for})
    }

    /// `--wait-for`: a new stick appeared.
    pub fn plugged(target: &Path) -> Value {
        json!({"event": "plugged", "schema": EVENTS_SCHEMA, "target": target})
    }

    /// A target was dropped: `phase` is `plan` (nothing written) or `write`.
    pub fn failed(target: &Path, phase: &str, error: &str) -> Value {
        json!({"event": "failed", "schema": EVENTS_SCHEMA, "target": target, "phase": phase,
            "error": error})
    }

    /// A target is written: the single-target report's fields (`report`, a JSON
    /// object with its own `target`) with the event's `event` and `schema`.
    pub fn done(report: Value) -> Value {
        let mut value = report;
        if let Some(object) = value.as_object_mut() {
            object.insert("event".into(), "done".into());
            object.insert("schema".into(), EVENTS_SCHEMA.into());
        }
        value
    }

    /// One row of the closing `report` event. Written targets have `label` and
    /// `fs_uuid` (live) or `image_sha256` (raw) and `verified`; a failed one `error`.
    #[derive(Default, Clone, Copy)]
    pub struct Row<'a> {
        pub ok: bool,
        pub dry_run: bool,
        pub label: Option<&'a str>,
        pub fs_uuid: Option<&'a str>,
        pub image_sha256: Option<&'a str>,
        pub verified: Option<bool>,
        pub error: Option<&'a str>,
    }

    pub fn row(target: &Path, row: Row<'_>) -> Value {
        json!({"target": target, "ok": row.ok, "dry_run": row.dry_run, "label": row.label,
            "fs_uuid": row.fs_uuid, "image_sha256": row.image_sha256, "verified": row.verified,
            "error": row.error})
    }

    /// The last event of a batch that ran: one row per target.
    pub fn report(rows: Vec<Value>) -> Value {
        json!({"event": "report", "schema": EVENTS_SCHEMA, "targets": rows})
    }
}

/// One target of a batch, planned and checked, waiting to be written.
pub struct PlannedTarget {
    pub target: PathBuf,
    pub plan: Plan,
    pub probe: TargetProbe,
    pub syslinux: Option<SyslinuxFiles>,
}

enum Outcome {
    Done(Box<ApplyReport>),
    Failed(Failure),
}

/// Why one target of a batch was not written, and the kind of that failure (which
/// decides the exit code when every target failed alike).
#[derive(Debug, Clone)]
pub struct Failure {
    pub text: String,
    pub kind: ErrorKind,
}

impl Failure {
    pub fn new(text: impl Into<String>, kind: ErrorKind) -> Failure {
        Failure {
            text: text.into(),
            kind,
        }
    }
}

/// How a batch ended when not every target was written.
#[derive(Debug, Error)]
pub enum BatchError {
    #[error("every target failed: {details}")]
    EveryTargetFailed { details: String, kind: ErrorKind },
    #[error(transparent)]
    Partial(PartialBatchFailure),
    /// `--wait-timeout` passed before any stick was plugged in.
    #[error(transparent)]
    NothingPlugged(DeviceError),
}

impl Classify for BatchError {
    fn kind(&self) -> ErrorKind {
        match self {
            BatchError::EveryTargetFailed { kind, .. } => *kind,
            BatchError::Partial(e) => e.kind(),
            BatchError::NothingPlugged(e) => e.kind(),
        }
    }

    fn hint(&self) -> &'static str {
        match self {
            BatchError::EveryTargetFailed { .. } => self.kind().hint(),
            BatchError::Partial(e) => e.hint(),
            BatchError::NothingPlugged(e) => e.hint(),
        }
    }
}

/// Several targets written from one inspection of the ISO: what became of
/// each target (in the order the user named them, or plugged them in), and
/// the NDJSON events a script follows with `--json`. The caller plans each
/// target and writes one; the batch fans the ISO out, runs the writers side by
/// side and reports.
pub struct Batch {
    json: bool,
    outcomes: Vec<(PathBuf, Option<Outcome>)>,
    planned: Vec<PlannedTarget>,
    /// `--wait-for` gave up (`--wait-timeout`) before every stick was plugged in.
    timed_out: Option<DeviceError>,
}

impl Batch {
    /// A batch of the `targets` named on the command line.
    pub fn start(json: bool, iso: &Path, targets: &[PathBuf]) -> Batch {
        let batch = Batch::empty(json);
        batch.emit(events::start(iso, "live-iso", Some(targets), None));
        batch
    }

    fn empty(json: bool) -> Batch {
        Batch {
            json,
            outcomes: Vec::new(),
            planned: Vec::new(),
            timed_out: None,
        }
    }

    fn emit(&self, value: serde_json::Value) {
        emit(self.json, value);
    }

    /// How many targets are planned so far.
    pub fn planned_count(&self) -> usize {
        self.planned.len()
    }

    pub fn planned(&mut self, target: PlannedTarget) {
        self.outcomes.push((target.target.clone(), None));
        self.planned.push(target);
    }

    /// A target that could not be planned is reported and left out.
    pub fn plan_failed(&mut self, target: &Path, error: impl Display, kind: ErrorKind) {
        let msg = format!("{error:#}");
        self.emit(events::failed(target, "plan", &msg));
        self.outcomes.push((
            target.to_path_buf(),
            Some(Outcome::Failed(Failure::new(msg, kind))),
        ));
    }

    /// The targets that could not be planned, with why (a dry run lists them).
    pub fn failures(&self) -> Vec<(&Path, &str)> {
        self.outcomes
            .iter()
            .filter_map(|(target, outcome)| match outcome {
                Some(Outcome::Failed(e)) => Some((target.as_path(), e.text.as_str())),
                _ => None,
            })
            .collect()
    }

    pub fn planned_targets(&self) -> &[PlannedTarget] {
        &self.planned
    }

    /// Writes every planned target, each on its own thread. Every plan copies the
    /// same ISO files in the same order (same ISO, same options), which lets one
    /// reader feed them all; a target that fails is recorded and the others go on.
    pub fn write_all<E: Display>(
        &mut self,
        live: &LiveImage,
        mode: ProgressMode,
        workdir: &Path,
        md5: Option<&str>,
        write: impl Fn(&PlannedTarget, &mut dyn IsoSource, &Path, &Progress) -> Result<ApplyReport, E>
        + Sync,
        kind_of: impl Fn(&E) -> ErrorKind + Sync,
    ) -> Result<(), ApplyError> {
        let iso_files: Vec<(String, u64)> = self
            .planned
            .first()
            .map(|p| iso_files_of(&p.plan))
            .unwrap_or_default();
        let same = self
            .planned
            .iter()
            .all(|p| iso_files_of(&p.plan) == iso_files);
        let (reader, mut sources): (Option<JoinHandle<()>>, Vec<Box<dyn IsoSource + Send>>) =
            if same {
                let (handle, sources) = broadcast(
                    crate::apply::open_source(live)?,
                    iso_files,
                    self.planned.len(),
                );
                (
                    Some(handle),
                    sources
                        .into_iter()
                        .map(|s| Box::new(s) as Box<dyn IsoSource + Send>)
                        .collect(),
                )
            } else {
                let mut v: Vec<Box<dyn IsoSource + Send>> = Vec::new();
                for _ in &self.planned {
                    v.push(crate::apply::open_source(live)?);
                }
                (None, v)
            };

        let multi = indicatif::MultiProgress::new();
        let write = &write;
        let kind_of = &kind_of;
        let results: Vec<(PathBuf, Outcome)> = std::thread::scope(|scope| {
            let mut handles = Vec::new();
            for (i, planned) in self.planned.iter().enumerate() {
                let source = sources.remove(0);
                let progress =
                    Progress::in_multi(mode, &multi, planned.target.display().to_string());
                let workdir = workdir.join(format!("target-{i}"));
                handles.push(scope.spawn(move || {
                    let mut source = source;
                    let result = write(planned, source.as_mut(), &workdir, &progress);
                    // Dropping the source lets the reader skip this target.
                    drop(source);
                    progress.finish();
                    let outcome = match result {
                        Ok(mut r) => {
                            r.iso_md5 = md5.map(str::to_string);
                            Outcome::Done(Box::new(r))
                        }
                        Err(e) => Outcome::Failed(Failure::new(format!("{e:#}"), kind_of(&e))),
                    };
                    (planned.target.clone(), outcome)
                }));
            }
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        (
                            PathBuf::from("?"),
                            Outcome::Failed(Failure::new("writer thread panicked", ErrorKind::Io)),
                        )
                    })
                })
                .collect()
        });
        if let Some(handle) = reader {
            let _ = handle.join();
        }
        for (target, outcome) in results {
            match &outcome {
                Outcome::Done(r) => self.emit(done_event(r)),
                Outcome::Failed(e) => self.emit(events::failed(&target, "write", &e.text)),
            }
            if let Some(slot) = self
                .outcomes
                .iter_mut()
                .find(|(t, o)| t == &target && o.is_none())
            {
                slot.1 = Some(outcome);
            }
        }
        Ok(())
    }

    /// `--wait-for N`: writes each stick as it is plugged in, with `write`
    /// (which also plans it). The sticks arrive at different times, so each
    /// reads the ISO itself (from the page cache after the first) instead of
    /// sharing one broadcast. With `include_fixed`, fixed disks (and loop
    /// devices) that appear count too.
    #[allow(clippy::too_many_arguments)]
    pub fn wait_for<E: Display>(
        json: bool,
        quiet: bool,
        mode: ProgressMode,
        iso: &Path,
        n: usize,
        timeout: Option<std::time::Duration>,
        include_fixed: bool,
        workdir: &Path,
        md5: Option<&str>,
        write: impl Fn(&Path, &Path, &Progress) -> Result<ApplyReport, E> + Sync,
        kind_of: impl Fn(&E) -> ErrorKind + Sync,
    ) -> Result<Batch, DeviceError> {
        emit(json, events::start(iso, "live-iso", None, Some(n)));
        if !json && !quiet {
            say_waiting(n, timeout);
        }
        let multi = indicatif::MultiProgress::new();
        let outcomes = std::sync::Mutex::new(Vec::<(PathBuf, Option<Outcome>)>::new());
        let write = &write;
        let kind_of = &kind_of;
        let wait_result = std::thread::scope(|scope| {
            let mut index = 0usize;
            crate::disk::devices::wait_for_new_devices(n, timeout, include_fixed, |device| {
                index += 1;
                let workdir = workdir.join(format!("target-{index}"));
                let progress = Progress::in_multi(mode, &multi, device.display().to_string());
                let outcomes = &outcomes;
                emit(json, events::plugged(&device));
                scope.spawn(move || {
                    let result = write(&device, &workdir, &progress);
                    progress.finish();
                    let outcome = match result {
                        Ok(mut r) => {
                            r.iso_md5 = md5.map(str::to_string);
                            emit(json, done_event(&r));
                            Outcome::Done(Box::new(r))
                        }
                        Err(e) => {
                            let msg = format!("{e:#}");
                            emit(json, events::failed(&device, "write", &msg));
                            Outcome::Failed(Failure::new(msg, kind_of(&e)))
                        }
                    };
                    if let Ok(mut all) = outcomes.lock() {
                        all.push((device, Some(outcome)));
                    }
                });
            })
        });
        let mut batch = Batch::empty(json);
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
    pub fn finish(self, quiet: bool) -> Result<(), BatchError> {
        let outcomes = self.outcomes;
        let json = self.json;
        let timed_out = self.timed_out;
        let total = outcomes.len();
        let ends = outcomes.iter().map(|(target, outcome)| {
            let end = match outcome {
                Some(Outcome::Done(r)) => TargetEnd::Done {
                    row: events::Row {
                        ok: true,
                        label: Some(&r.label),
                        fs_uuid: Some(&r.fs_uuid),
                        verified: Some(r.verified),
                        ..Default::default()
                    },
                    detail: format!(
                        "{} UUID {} {}",
                        r.label,
                        r.fs_uuid,
                        verified_word(r.verified)
                    ),
                },
                Some(Outcome::Failed(e)) => TargetEnd::Failed(e),
                None => TargetEnd::Planned,
            };
            (target.as_path(), end)
        });
        let details = report_ends(json, quiet, ends.collect());
        verdict_after_wait(details, total, timed_out)
    }
}

/// What `--wait-for` says on stderr while it waits (live and raw batches alike).
pub fn say_waiting(n: usize, timeout: Option<std::time::Duration>) {
    match timeout {
        Some(limit) => eprintln!(
            "Waiting up to {} s for {n} stick(s) to be plugged in…",
            limit.as_secs()
        ),
        None => eprintln!(
            "Waiting for {n} stick(s) to be plugged in (no time limit: --wait-timeout sets one)…"
        ),
    }
}

/// [`verdict`] for `--wait-for`, whose wait may have timed out (`timed_out`): no
/// stick at all is its own error; fewer than wanted make the batch partial, the
/// sticks not plugged in counting as failed.
pub fn verdict_after_wait(
    mut details: Vec<(String, ErrorKind)>,
    total: usize,
    timed_out: Option<DeviceError>,
) -> Result<(), BatchError> {
    let Some(e) = timed_out else {
        return verdict(details, total);
    };
    let DeviceError::WaitTimedOut { wanted, found, .. } = &e else {
        return Err(BatchError::NothingPlugged(e));
    };
    if found.is_empty() {
        return Err(BatchError::NothingPlugged(e));
    }
    let failed = details.len() + wanted.saturating_sub(found.len());
    let total = total.max(*wanted);
    details.push((e.to_string(), e.kind()));
    Err(BatchError::Partial(PartialBatchFailure {
        failed,
        total,
        details: details.into_iter().map(|(line, _)| line).collect(),
    }))
}

/// How one target of a batch (live or raw) ended, as its report shows it.
pub enum TargetEnd<'a> {
    /// Written: its row of the `report` event and its table line's detail.
    Done {
        row: events::Row<'a>,
        detail: String,
    },
    Failed(&'a Failure),
    /// Planned by a dry run.
    Planned,
}

/// "verified" or "not verified", as a batch table says it.
pub fn verified_word(verified: bool) -> &'static str {
    if verified { "verified" } else { "not verified" }
}

/// Prints a batch's report: the `report` event with `--json`, else a table unless
/// `quiet`. Returns one line per failed target, for [`verdict`].
pub fn report_ends(
    json: bool,
    quiet: bool,
    ends: Vec<(&Path, TargetEnd<'_>)>,
) -> Vec<(String, ErrorKind)> {
    let mut details = Vec::new();
    let mut rows = Vec::new();
    for (target, end) in &ends {
        let row = match end {
            TargetEnd::Done { row, .. } => *row,
            TargetEnd::Failed(e) => {
                details.push((format!("{}: {}", target.display(), e.text), e.kind));
                events::Row {
                    error: Some(&e.text),
                    ..Default::default()
                }
            }
            TargetEnd::Planned => events::Row {
                ok: true,
                dry_run: true,
                ..Default::default()
            },
        };
        rows.push(events::row(target, row));
    }
    emit(json, events::report(rows));
    if !json && !quiet {
        crate::outln!("{:<32} {:<8} DETAIL", "TARGET", "RESULT");
        for (target, end) in &ends {
            let (result, detail) = match end {
                TargetEnd::Done { detail, .. } => ("ok", detail.as_str()),
                TargetEnd::Failed(e) => ("FAILED", e.text.lines().next().unwrap_or("")),
                TargetEnd::Planned => ("planned", ""),
            };
            crate::outln!("{:<32} {:<8} {}", target.display(), result, detail);
        }
    }
    details
}

/// How a batch of `total` targets ended, from one line per failed target: all
/// written, some (partial, 5) or every one failed: then with the failures' own
/// kind when they share one (every target too small is bad input, 2), else I/O
/// (4). Live and raw batches alike.
pub fn verdict(details: Vec<(String, ErrorKind)>, total: usize) -> Result<(), BatchError> {
    let failed = details.len();
    if failed == 0 {
        Ok(())
    } else if failed == total {
        let kind = match details.first() {
            Some((_, first)) if details.iter().all(|(_, k)| k == first) => *first,
            _ => ErrorKind::Io,
        };
        Err(BatchError::EveryTargetFailed {
            details: details
                .into_iter()
                .map(|(line, _)| line)
                .collect::<Vec<_>>()
                .join("; "),
            kind,
        })
    } else {
        Err(BatchError::Partial(PartialBatchFailure {
            failed,
            total,
            details: details.into_iter().map(|(line, _)| line).collect(),
        }))
    }
}

/// The version of a batch dry run's document (schemas/write-plans.schema.json).
pub const PLANS_SCHEMA: u32 = 1;

/// What `write --dry-run --json` prints for several targets: one document with
/// every plan (each as the single-target dry run prints it) and the targets that
/// could not be planned, instead of the events of a batch that does not run.
pub fn plans_document(
    plans: Vec<serde_json::Value>,
    failed: &[(&Path, &str)],
) -> serde_json::Value {
    let failed: Vec<serde_json::Value> = failed
        .iter()
        .map(|(target, error)| serde_json::json!({"target": target, "error": error}))
        .collect();
    serde_json::json!({"schema": PLANS_SCHEMA, "plans": plans, "failed": failed})
}

/// A written target's `done` event; a report that cannot be put in JSON (it
/// always can: plain data) still says the target is done.
fn done_event(report: &ApplyReport) -> serde_json::Value {
    events::done(
        serde_json::to_value(report)
            .unwrap_or_else(|_| serde_json::json!({"target": report.target})),
    )
}

/// One NDJSON line on stdout, with `--json` only.
pub fn emit(json: bool, value: serde_json::Value) {
    if json {
        crate::outln!("{value}");
    }
}

/// The ISO files a plan copies, in its order: what a broadcast reads.
pub fn iso_files_of(plan: &Plan) -> Vec<(String, u64)> {
    // The ext4 live partition's copies are read after the FAT's, in plan order.
    let ext4_copies = plan.ext4_live.iter().flat_map(|e| e.copies.iter());
    plan.copies
        .iter()
        .chain(ext4_copies)
        .filter_map(|c| match &c.source {
            CopySource::Iso { path } => Some((path.clone(), c.size)),
            CopySource::Host { .. } => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch_of(outcomes: Vec<Option<&str>>) -> Batch {
        let mut batch = Batch::empty(false);
        for (i, o) in outcomes.into_iter().enumerate() {
            batch.outcomes.push((
                PathBuf::from(format!("/dev/sd{i}")),
                o.map(|e| Outcome::Failed(Failure::new(e, ErrorKind::Io))),
            ));
        }
        batch
    }

    #[test]
    fn a_batch_with_some_failures_is_partial_naming_each_failed_target() {
        let err = batch_of(vec![Some("full"), None, Some("unplugged")])
            .finish(true)
            .expect_err("two of three failed");
        assert_eq!(err.kind(), ErrorKind::PartialBatch);
        match err {
            BatchError::Partial(p) => {
                assert_eq!((p.failed, p.total), (2, 3));
                assert_eq!(p.details, ["/dev/sd0: full", "/dev/sd2: unplugged"]);
            }
            other => panic!("expected a partial failure, got {other:?}"),
        }
    }

    #[test]
    fn every_target_failing_alike_exits_with_that_failures_kind() {
        let line = |t: &str, kind| (format!("{t}: too small"), kind);
        let all_small = verdict(
            vec![
                line("/dev/sda", ErrorKind::BadInput),
                line("/dev/sdb", ErrorKind::BadInput),
            ],
            2,
        )
        .expect_err("all failed");
        assert_eq!(all_small.kind(), ErrorKind::BadInput);
        assert_eq!(
            all_small.to_string(),
            "every target failed: /dev/sda: too small; /dev/sdb: too small"
        );
        let refused = verdict(vec![line("/dev/sda", ErrorKind::Refused)], 1).unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::Refused);
        // Different kinds: no one of them speaks for the batch.
        let mixed = verdict(
            vec![
                line("/dev/sda", ErrorKind::BadInput),
                line("/dev/sdb", ErrorKind::Refused),
            ],
            2,
        )
        .unwrap_err();
        assert_eq!(mixed.kind(), ErrorKind::Io);
    }

    #[test]
    fn a_batch_where_every_target_failed_is_an_io_failure() {
        let err = batch_of(vec![Some("full"), Some("gone")])
            .finish(true)
            .expect_err("all failed");
        assert_eq!(err.kind(), ErrorKind::Io);
        assert_eq!(
            err.to_string(),
            "every target failed: /dev/sd0: full; /dev/sd1: gone"
        );
    }

    /// An ISO source of in-memory files.
    struct MemorySource(Vec<(String, Vec<u8>)>);

    impl IsoSource for MemorySource {
        fn open(&mut self, path: &str, _size: u64) -> Result<Box<dyn Read + '_>, ApplyError> {
            let (_, bytes) =
                self.0
                    .iter()
                    .find(|(p, _)| p == path)
                    .ok_or_else(|| ApplyError::Source {
                        path: path.to_string(),
                        reason: "no such file".into(),
                    })?;
            Ok(Box::new(&bytes[..]))
        }
    }

    #[test]
    fn every_target_gets_each_file_whole_with_its_sha256_lent_or_copied() {
        // Larger than a chunk, and not a multiple of it; an empty file; a small one.
        let big: Vec<u8> = (0..CHUNK * 2 + 12345)
            .map(|i| (i * 31 % 253) as u8)
            .collect();
        let files = vec![
            ("/LiveOS/squashfs.img".to_string(), big),
            ("/empty".to_string(), Vec::new()),
            (
                "/isolinux/isolinux.cfg".to_string(),
                b"default linux\n".to_vec(),
            ),
        ];
        let list = files
            .iter()
            .map(|(p, b)| (p.clone(), b.len() as u64))
            .collect();
        let (reader, mut targets) = broadcast(Box::new(MemorySource(files.clone())), list, 2);
        each_target_reads_all(&mut targets, &files, |t, target, path, len| {
            let mut got = Vec::new();
            if t == 0 {
                let mut lent = target.open_buffered(path, len).unwrap();
                loop {
                    let chunk = lent.fill_buf().unwrap();
                    if chunk.is_empty() {
                        break;
                    }
                    // Taken in uneven bites, as a writer may.
                    let n = chunk.len().min(100_003);
                    got.extend_from_slice(&chunk[..n]);
                    lent.consume(n);
                }
            } else {
                target
                    .open(path, len)
                    .unwrap()
                    .read_to_end(&mut got)
                    .unwrap();
            }
            got
        });
        reader.join().unwrap();
    }

    /// Each target, on a thread of its own, reads every file in turn with `read`
    /// (which gets the target's index), and must get its bytes and their sha256.
    fn each_target_reads_all(
        targets: &mut [BroadcastSource],
        files: &[(String, Vec<u8>)],
        read: impl Fn(usize, &mut BroadcastSource, &str, u64) -> Vec<u8> + Sync,
    ) {
        use sha2::Digest;
        std::thread::scope(|s| {
            for (t, target) in targets.iter_mut().enumerate() {
                let read = &read;
                s.spawn(move || {
                    for (path, bytes) in files {
                        let got = read(t, target, path, bytes.len() as u64);
                        assert!(got == *bytes, "{path} differs for target {t}");
                        let want: [u8; 32] = sha2::Sha256::digest(bytes).into();
                        assert_eq!(target.digest_of_last(), Some(want), "{path}");
                    }
                });
            }
        });
    }

    /// Files as extents of one host file, as an ISO's are.
    struct ExtentSource {
        host: std::path::PathBuf,
        files: Vec<(String, Vec<(u64, u64)>)>,
    }

    impl IsoSource for ExtentSource {
        fn open(&mut self, path: &str, _size: u64) -> Result<Box<dyn Read + '_>, ApplyError> {
            Err(ApplyError::Source {
                path: path.to_string(),
                reason: "read through file_extents only".into(),
            })
        }

        fn file_extents(&mut self, path: &str) -> Option<crate::apply::FileExtents> {
            let (_, extents) = self.files.iter().find(|(p, _)| p == path)?;
            Some(crate::apply::FileExtents {
                file: std::fs::File::open(&self.host).ok()?,
                extents: extents.clone(),
            })
        }
    }

    #[test]
    fn files_read_by_their_extents_reach_every_target_whole() {
        // Beside the sources: a disk file system with O_DIRECT (a tmpfs /tmp may not).
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let host = dir.path().join("iso");
        // Ends on a 2 KiB sector, not on a 4 KiB block: the last aligned read is short.
        let bytes: Vec<u8> = (0..(26 << 20) + 2048)
            .map(|i| (i * 13 % 251) as u8)
            .collect();
        std::fs::write(&host, &bytes).unwrap();
        let files = vec![
            // More than a chunk, from an odd sector.
            ("/a".to_string(), vec![(2048, (5 << 20) + 100)]),
            // Two extents, the second to the end of the host file.
            (
                "/b".to_string(),
                vec![((10 << 20) + 2048, 3000), (20 << 20, (6 << 20) + 2048)],
            ),
            ("/empty".to_string(), vec![]),
        ];
        let expected: Vec<(String, Vec<u8>)> = files
            .iter()
            .map(|(path, extents)| {
                let content = extents
                    .iter()
                    .flat_map(|&(at, len)| bytes[at as usize..(at + len) as usize].to_vec())
                    .collect();
                (path.clone(), content)
            })
            .collect();
        let list = expected
            .iter()
            .map(|(p, e)| (p.clone(), e.len() as u64))
            .collect();
        let source = ExtentSource { host, files };
        let (reader, mut targets) = broadcast(Box::new(source), list, 3);
        each_target_reads_all(&mut targets, &expected, |_, target, path, len| {
            let mut got = Vec::new();
            target
                .open_buffered(path, len)
                .unwrap()
                .read_to_end(&mut got)
                .unwrap();
            got
        });
        reader.join().unwrap();
    }

    #[test]
    fn an_extent_past_the_end_of_the_iso_fails_every_target() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let host = dir.path().join("iso");
        std::fs::write(&host, vec![1u8; 1 << 20]).unwrap();
        let files = vec![("/cut".to_string(), vec![(4096, 2 << 20)])];
        let list = vec![("/cut".to_string(), 2 << 20)];
        let source = ExtentSource { host, files };
        let (reader, mut targets) = broadcast(Box::new(source), list, 2);
        for target in &mut targets {
            let err = target
                .open_buffered("/cut", 2 << 20)
                .unwrap()
                .read_to_end(&mut Vec::new())
                .unwrap_err();
            assert!(err.to_string().contains("ends at byte"), "{err}");
        }
        reader.join().unwrap();
    }

    #[test]
    fn a_target_asking_for_a_file_out_of_order_is_refused() {
        let files = vec![
            ("/a".to_string(), vec![1u8; 10]),
            ("/b".to_string(), vec![2u8; 10]),
        ];
        let list = files
            .iter()
            .map(|(p, b)| (p.clone(), b.len() as u64))
            .collect();
        let (_reader, mut targets) = broadcast(Box::new(MemorySource(files)), list, 1);
        let err = targets[0].open_buffered("/b", 10).err().unwrap();
        assert!(err.to_string().contains("expected /a"), "{err}");
    }

    #[test]
    fn a_batch_without_failures_succeeds() {
        assert!(batch_of(vec![None, None]).finish(true).is_ok());
    }
}
