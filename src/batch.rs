//! One read of the ISO, fanned out to many targets.
//!
//! A broadcaster thread reads each ISO file the plans copy, in plan order,
//! in large chunks, and hands every chunk (shared, not copied) to each
//! target's bounded channel. A target that fails drops its receiver; the
//! broadcaster notices on the next send and carries on with the others.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use crate::apply::{ApplyError, IsoSource};

const CHUNK: usize = 4 << 20;
/// Chunks buffered per target: enough to ride out a slow moment of one
/// stick without holding much memory (8 × 4 MiB per target).
const DEPTH: usize = 8;

enum Chunk {
    Data(Arc<Vec<u8>>),
    End,
    Failed(String),
}

/// The receiving side for one target.
pub struct BroadcastSource {
    rx: Receiver<Chunk>,
    expected: VecDeque<String>,
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
        let (tx, rx) = sync_channel(DEPTH);
        senders.push(Some(tx));
        sources.push(BroadcastSource {
            rx,
            expected: files.iter().map(|(p, _)| p.clone()).collect(),
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
        for (path, size) in files {
            let mut reader = match source.open(&path, size) {
                Ok(r) => r,
                Err(e) => {
                    let msg = e.to_string();
                    send_all(&mut senders, &|| Chunk::Failed(msg.clone()));
                    return;
                }
            };
            loop {
                let mut buf = vec![0u8; CHUNK];
                let mut filled = 0;
                while filled < CHUNK {
                    match reader.read(&mut buf[filled..]) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            let msg = format!("reading {path} from the ISO: {e}");
                            drop(reader);
                            send_all(&mut senders, &|| Chunk::Failed(msg.clone()));
                            return;
                        }
                    }
                }
                if filled == 0 {
                    break;
                }
                buf.truncate(filled);
                let data = Arc::new(buf);
                send_all(&mut senders, &|| Chunk::Data(Arc::clone(&data)));
                if senders.iter().all(Option::is_none) {
                    return;
                }
            }
            send_all(&mut senders, &|| Chunk::End);
        }
    });
    (handle, sources)
}

struct ChannelReader<'a> {
    rx: &'a Receiver<Chunk>,
    current: Option<Arc<Vec<u8>>>,
    offset: usize,
    done: bool,
}

impl Read for ChannelReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.done {
                return Ok(0);
            }
            if let Some(chunk) = &self.current
                && self.offset < chunk.len()
            {
                let n = buf.len().min(chunk.len() - self.offset);
                buf[..n].copy_from_slice(&chunk[self.offset..self.offset + n]);
                self.offset += n;
                return Ok(n);
            }
            match self.rx.recv() {
                Ok(Chunk::Data(d)) => {
                    self.current = Some(d);
                    self.offset = 0;
                }
                Ok(Chunk::End) => self.done = true,
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

impl IsoSource for BroadcastSource {
    fn open(&mut self, path: &str, _size: u64) -> Result<Box<dyn Read + '_>, ApplyError> {
        match self.expected.pop_front() {
            Some(p) if p == path => Ok(Box::new(ChannelReader {
                rx: &self.rx,
                current: None,
                offset: 0,
                done: false,
            })),
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
