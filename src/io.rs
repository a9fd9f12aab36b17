//! I/O adapters shared by the formats.
//!
//! [`PartitionWindow`] is how every filesystem on the stick is reached: a
//! `Read + Write + Seek` view of one partition of a whole device or image file,
//! so no partition device node (`/dev/sdb1`, `/dev/loop0p1`) is ever needed.
//! It also makes `fatfs` fast: `fatfs` allocates clusters one at a time and
//! updates both FAT copies with 4-byte writes, and writes file data one cluster
//! per call. Holding the FAT region in memory and coalescing sequential data
//! writes turns that into a few large writes.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Granularity of the cached metadata's dirty tracking.
const META_PAGE: usize = 4096;
/// Data writes are gathered up to this size before they reach the device. A stick's
/// writer holds up to four of these at once (this buffer, the copy on its way, the
/// one queued, the one being written): 8 MiB made a single write pass 64 MiB of
/// memory; the kernel builds its own large requests from the page cache anyway.
const WRITE_COALESCE: usize = 2 << 20;
/// Sequential reads are served from a read-ahead buffer of this size.
const READ_AHEAD: usize = 1 << 20;
/// A read that starts nowhere near the last one (a directory cluster, as fatfs reads
/// each directory 32 bytes at a time) fills this much: a MiB there would read file
/// data no one asked for, from the stick when it has left the page cache.
const READ_AROUND: usize = 64 << 10;
/// Read buffers a window keeps (fatfs moves between a few directories while it
/// creates files: each keeps its buffer instead of reading it again every time).
const READ_BUFFERS: usize = 8;

/// An I/O error and the file or device it happened on. Each module's error
/// type converts it into its own `Io { path, source }` variant with `From`
/// (keeping its own wording, and the `io::Error` as the next link of the
/// chain, which `cli::error_kind` and `--json`'s `causes` read), so one helper
/// serves every module instead of a private `io_err` in each.
#[derive(Debug, Error)]
#[error("{path}: {source}")]
pub struct IoAt {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// For `map_err(io_at(path))?`: `?` then turns the [`IoAt`] into the caller's
/// error type through its `From<IoAt>`.
pub fn io_at(path: &Path) -> impl FnOnce(io::Error) -> IoAt + '_ {
    move |source| IoAt {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads until `buf` is full or the end of the input; returns the count (short only
/// at the end). Unlike `read_exact`, a short tail is a result, not an error.
pub fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// A reader that must give exactly the `len` bytes a plan counted on: space on
/// the stick, the manifest's sizes and the read-back all rest on that count.
/// A source that changed since it was planned (an ISO rewritten, an
/// `--updates` file edited during the write) would otherwise go through as
/// a truncated file or one that overruns the space set aside for it, and the
/// manifest would record a size that was never written. An early end and a
/// byte past the end are both errors that say what happened.
pub struct Exactly<R> {
    inner: R,
    len: u64,
    left: u64,
}

impl<R> Exactly<R> {
    pub fn new(inner: R, len: u64) -> Self {
        Exactly {
            inner,
            len,
            left: len,
        }
    }

    /// `n`, or fewer: what is left of the plan.
    fn within_plan(left: u64, n: usize) -> usize {
        n.min(usize::try_from(left).unwrap_or(usize::MAX))
    }

    fn ended_early(len: u64, left: u64) -> io::Error {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "the source ended after {} of the {} bytes planned for it (it changed after \
                 the write was planned); write again from a source that does not change",
                len - left,
                len
            ),
        )
    }

    fn longer(len: u64) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the source holds more than the {} bytes planned for it (it changed after the \
                 write was planned, or its size is not known in advance); write again from a \
                 plain file that does not change",
                len
            ),
        )
    }
}

impl<R: Read> Read for Exactly<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            // The planned end: it must be the source's end too.
            let mut probe = [0u8; 1];
            return match read_full(&mut self.inner, &mut probe)? {
                0 => Ok(0),
                _ => Err(Self::longer(self.len)),
            };
        }
        let want = Self::within_plan(self.left, buf.len());
        match self.inner.read(&mut buf[..want])? {
            0 => Err(Self::ended_early(self.len, self.left)),
            n => {
                self.left -= n as u64;
                Ok(n)
            }
        }
    }
}

impl<R: io::BufRead> io::BufRead for Exactly<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        let (len, left) = (self.len, self.left);
        let chunk = self.inner.fill_buf()?;
        match (chunk.len(), left) {
            (0, 0) => Ok(chunk),
            (0, _) => Err(Self::ended_early(len, left)),
            (_, 0) => Err(Self::longer(len)),
            (n, left) => Ok(&chunk[..Self::within_plan(left, n)]),
        }
    }

    fn consume(&mut self, amount: usize) {
        let amount = Self::within_plan(self.left, amount);
        self.left -= amount as u64;
        self.inner.consume(amount);
    }
}

/// `Read + Seek` as one trait, for readers passed as trait objects.
pub trait ReadSeek: Read + Seek {}

impl<T: Read + Seek + ?Sized> ReadSeek for T {}

/// Reads up to `len` bytes at `offset`: fewer only where the input ends, so a
/// structure cut off by the end of a disk is seen as short, not as an error.
pub fn read_at<R: Read + Seek + ?Sized>(r: &mut R, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    r.seek(SeekFrom::Start(offset))?;
    let got = read_full(r, &mut buf)?;
    buf.truncate(got);
    Ok(buf)
}

/// Implemented by everything an overlay or origin can live in, so that data reaches the
/// medium before the metadata that points at it (the kernel uses FLUSH+FUA for this).
pub trait SyncData {
    fn sync_data(&mut self) -> io::Result<()>;
}

/// A device in memory that records each write (offset, length) and where the syncs
/// fall among them: for tests of the order in which changes reach a stick.
#[cfg(test)]
pub(crate) struct SyncRecorder {
    pub(crate) inner: io::Cursor<Vec<u8>>,
    pub(crate) writes: Vec<(u64, usize)>,
    /// How many writes came before each sync.
    pub(crate) syncs: Vec<usize>,
}

#[cfg(test)]
impl SyncRecorder {
    pub(crate) fn new(bytes: Vec<u8>) -> Self {
        SyncRecorder {
            inner: io::Cursor::new(bytes),
            writes: Vec::new(),
            syncs: Vec::new(),
        }
    }
}

#[cfg(test)]
impl Read for SyncRecorder {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        self.inner.read(b)
    }
}

#[cfg(test)]
impl Write for SyncRecorder {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.writes.push((self.inner.position(), b.len()));
        self.inner.write(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
impl Seek for SyncRecorder {
    fn seek(&mut self, p: SeekFrom) -> io::Result<u64> {
        self.inner.seek(p)
    }
}

#[cfg(test)]
impl SyncData for SyncRecorder {
    fn sync_data(&mut self) -> io::Result<()> {
        self.syncs.push(self.writes.len());
        Ok(())
    }
}

impl SyncData for std::fs::File {
    fn sync_data(&mut self) -> io::Result<()> {
        std::fs::File::sync_data(self)
    }
}

impl<T> SyncData for io::Cursor<T> {
    fn sync_data(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<T: SyncData + ?Sized> SyncData for &mut T {
    fn sync_data(&mut self) -> io::Result<()> {
        (**self).sync_data()
    }
}

/// Where a seek lands in a stream `len` bytes long that is at `pos`.
pub fn seek_position(pos: u64, len: u64, to: SeekFrom) -> io::Result<u64> {
    match to {
        SeekFrom::Start(p) => Some(p),
        SeekFrom::Current(d) => pos.checked_add_signed(d),
        SeekFrom::End(d) => len.checked_add_signed(d),
    }
    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))
}

/// A device of `len` bytes held in memory where written (zeros elsewhere): a
/// filesystem is formatted into it, then copied onto the stick in large writes.
#[derive(Debug, Default)]
pub struct MemDevice {
    len: u64,
    pos: u64,
    /// Written 64 KiB blocks by index; `None`: written, zeros only (a format writes
    /// a whole FAT of zeros, which need not take memory).
    blocks: std::collections::BTreeMap<u64, Option<Vec<u8>>>,
}

const MEM_BLOCK: u64 = 64 * 1024;
static ZERO_BLOCK: [u8; MEM_BLOCK as usize] = [0; MEM_BLOCK as usize];

/// Whether `bytes` are all zeros. Compared as slices (one `memcmp` per block):
/// a format writes whole FATs of zeros, 32 MiB for a 16 GiB stick, and a byte
/// loop over them is slow on a slow CPU.
fn is_zeros(bytes: &[u8]) -> bool {
    bytes
        .chunks(ZERO_BLOCK.len())
        .all(|chunk| chunk == &ZERO_BLOCK[..chunk.len()])
}

impl MemDevice {
    pub fn new(len: u64) -> Self {
        MemDevice {
            len,
            ..Self::default()
        }
    }

    /// At the current position: the block, the offset in it, and how many of `want`
    /// bytes fit before the block or the device ends.
    fn span(&self, want: usize) -> (u64, usize, usize) {
        let within = (self.pos % MEM_BLOCK) as usize;
        let n = want
            .min(MEM_BLOCK as usize - within)
            .min((self.len - self.pos) as usize);
        (self.pos / MEM_BLOCK, within, n)
    }

    /// The written blocks as (offset, bytes), in order.
    pub fn written(&self) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        self.blocks.iter().map(|(i, b)| {
            let b = b.as_deref().unwrap_or(&ZERO_BLOCK);
            (
                i * MEM_BLOCK,
                &b[..(self.len - i * MEM_BLOCK).min(MEM_BLOCK) as usize],
            )
        })
    }
}

impl Read for MemDevice {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.len || buf.is_empty() {
            return Ok(0);
        }
        let (block, within, n) = self.span(buf.len());
        match self.blocks.get(&block) {
            Some(Some(b)) => buf[..n].copy_from_slice(&b[within..within + n]),
            _ => buf[..n].fill(0),
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for MemDevice {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.pos >= self.len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "write past the end of the in-memory device",
            ));
        }
        let (block, within, n) = self.span(buf.len());
        let slot = self.blocks.entry(block).or_insert(None);
        match slot {
            Some(b) => b[within..within + n].copy_from_slice(&buf[..n]),
            None if is_zeros(&buf[..n]) => {}
            None => {
                let mut b = vec![0u8; MEM_BLOCK as usize];
                b[within..within + n].copy_from_slice(&buf[..n]);
                *slot = Some(b);
            }
        }
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Seek for MemDevice {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = seek_position(self.pos, self.len, to)?;
        Ok(self.pos)
    }
}

/// Bytes held by [`META_PAGE`] pages where only pages with a non-zero byte take
/// memory. The FAT of a 16 GiB stick is 16 MiB, mostly free clusters (zeros): held
/// whole, one write passed 64 MiB and a batch held one such copy per stick.
#[derive(Debug, Default)]
struct SparsePages {
    len: usize,
    pages: std::collections::HashMap<usize, Box<[u8]>>,
}

impl SparsePages {
    fn zeros(len: usize) -> Self {
        SparsePages {
            len,
            pages: std::collections::HashMap::new(),
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    /// Copies `out.len()` bytes at `at` (within `len`) into `out`.
    fn read(&self, at: usize, out: &mut [u8]) {
        let mut done = 0;
        while done < out.len() {
            let pos = at + done;
            let (page, within) = (pos / META_PAGE, pos % META_PAGE);
            let n = (META_PAGE - within).min(out.len() - done);
            match self.pages.get(&page) {
                Some(p) => out[done..done + n].copy_from_slice(&p[within..within + n]),
                None => out[done..done + n].fill(0),
            }
            done += n;
        }
    }

    /// Stores `data` at `at` (within `len`); zeros written over a missing page keep it
    /// missing.
    fn write(&mut self, at: usize, data: &[u8]) {
        let mut done = 0;
        while done < data.len() {
            let pos = at + done;
            let (page, within) = (pos / META_PAGE, pos % META_PAGE);
            let n = (META_PAGE - within).min(data.len() - done);
            let part = &data[done..done + n];
            match self.pages.get_mut(&page) {
                Some(p) => p[within..within + n].copy_from_slice(part),
                None if is_zeros(part) => {}
                None => {
                    let mut p = vec![0u8; META_PAGE].into_boxed_slice();
                    p[within..within + n].copy_from_slice(part);
                    self.pages.insert(page, p);
                }
            }
            done += n;
        }
    }
}

/// A bounded window `[start, start + len)` onto `inner`.
pub struct PartitionWindow<F> {
    inner: F,
    start: u64,
    len: u64,
    pos: u64,
    meta: SparsePages,
    /// The 4 KiB pages of `meta` changed since the last flush: only those are written,
    /// so a FAT entry changed in each copy costs two pages, not the span between them.
    meta_dirty: std::collections::BTreeSet<usize>,
    wbuf: Vec<u8>,
    wbuf_at: u64,
    /// Bytes read past the prefix, kept equal to what the window wrote over them:
    /// a device behind a writer thread (`BoundedDirty`) is read only once every
    /// queued write has landed, so each read of the device stalls the pipeline.
    reads: ReadBuffers,
    /// Whether [`Write::flush`] also flushes `inner` (see
    /// [`PartitionWindow::hold_device_flush`]).
    flush_device: bool,
    /// Whether [`Write::flush`] keeps the cached prefix's changed pages (see
    /// [`PartitionWindow::hold_metadata`]).
    hold_meta: bool,
}

/// Up to [`READ_BUFFERS`] runs of bytes read from the device, least recently used
/// first out. Writes through the window patch every run they touch, so a run
/// never holds bytes older than the device's.
#[derive(Default)]
struct ReadBuffers {
    runs: Vec<ReadRun>,
    clock: u64,
}

struct ReadRun {
    at: u64,
    bytes: Vec<u8>,
    used: u64,
}

impl ReadRun {
    fn end(&self) -> u64 {
        self.at + self.bytes.len() as u64
    }
}

impl ReadBuffers {
    fn clear(&mut self) {
        self.runs.clear();
    }

    /// Copies into `out` what a run holds from `pos` on; the count, 0 when none does.
    fn read(&mut self, pos: u64, out: &mut [u8]) -> usize {
        self.clock += 1;
        let clock = self.clock;
        let Some(run) = self
            .runs
            .iter_mut()
            .find(|r| (r.at..r.end()).contains(&pos))
        else {
            return 0;
        };
        run.used = clock;
        let off = (pos - run.at) as usize;
        let n = out.len().min(run.bytes.len() - off);
        out[..n].copy_from_slice(&run.bytes[off..off + n]);
        n
    }

    /// Whether a read at `pos` continues a run (a stream).
    fn continues(&self, pos: u64) -> bool {
        self.runs.iter().any(|r| r.end() == pos)
    }

    /// Keeps `bytes` read at `at`; a run it continues (a stream) is replaced,
    /// otherwise the least recently used run when all are taken.
    fn insert(&mut self, at: u64, bytes: Vec<u8>) {
        self.clock += 1;
        let run = ReadRun {
            at,
            bytes,
            used: self.clock,
        };
        if let Some(i) = self.runs.iter().position(|r| r.end() == at) {
            self.runs[i] = run;
        } else if self.runs.len() < READ_BUFFERS {
            self.runs.push(run);
        } else if let Some(oldest) = self.runs.iter_mut().min_by_key(|r| r.used) {
            *oldest = run;
        }
    }

    /// Writes `data` at `pos` into every run it overlaps.
    fn patch(&mut self, pos: u64, data: &[u8]) {
        let end = pos + data.len() as u64;
        for run in &mut self.runs {
            let lo = pos.max(run.at);
            let hi = end.min(run.end());
            if lo < hi {
                run.bytes[(lo - run.at) as usize..(hi - run.at) as usize]
                    .copy_from_slice(&data[(lo - pos) as usize..(hi - pos) as usize]);
            }
        }
    }
}

impl<F: Read + Write + Seek> PartitionWindow<F> {
    pub fn new(inner: F, start: u64, len: u64) -> Self {
        PartitionWindow {
            inner,
            start,
            len,
            pos: 0,
            meta: SparsePages::default(),
            meta_dirty: std::collections::BTreeSet::new(),
            wbuf: Vec::new(),
            wbuf_at: 0,
            reads: ReadBuffers::default(),
            flush_device: true,
            hold_meta: false,
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn start(&self) -> u64 {
        self.start
    }

    /// Holds bytes `[0, bytes)` of the window in memory until [`Write::flush`].
    /// Used for the FAT region, which `fatfs` touches with tiny scattered writes.
    pub fn cache_prefix(&mut self, bytes: u64) -> io::Result<()> {
        let bytes = bytes.min(self.len);
        if self.meta.len() as u64 == bytes && bytes > 0 {
            // Already held (see `preload_prefix`): the memory copy is the newer one.
            return Ok(());
        }
        self.flush_before_replacing_prefix()?;
        let len = bytes as usize;
        let mut meta = SparsePages::zeros(len);
        self.inner.seek(SeekFrom::Start(self.start))?;
        let mut buf = vec![0u8; READ_AHEAD.min(len)];
        let mut at = 0;
        while at < len {
            let n = buf.len().min(len - at);
            self.inner.read_exact(&mut buf[..n])?;
            meta.write(at, &buf[..n]);
            at += n;
        }
        self.meta = meta;
        self.meta_dirty.clear();
        self.reads.clear();
        Ok(())
    }

    /// Moves `len` bytes at `from` to `to` (the two may overlap), straight between
    /// the device's bytes in large pieces: through the window's reads and gathered
    /// writes a move would read around every piece and copy it twice more. Not
    /// for bytes in a cached prefix.
    pub fn copy_within(&mut self, from: u64, len: u64, to: u64) -> io::Result<()> {
        if from.max(to) + len > self.len {
            return Err(self.out_of_window("move", from.max(to), len as usize));
        }
        if from.min(to) < self.meta_len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a move within the window's cached prefix",
            ));
        }
        self.flush_writes()?;
        let mut piece = vec![0u8; (len as usize).min(WRITE_COALESCE)];
        // Overlapping forward, the end goes first; backward, the start.
        let mut done = 0;
        while done < len {
            let n = (len - done).min(piece.len() as u64);
            let at = if to > from { len - done - n } else { done };
            let buf = &mut piece[..n as usize];
            self.inner.seek(SeekFrom::Start(self.start + from + at))?;
            self.inner.read_exact(buf)?;
            self.inner.seek(SeekFrom::Start(self.start + to + at))?;
            self.inner.write_all(buf)?;
            done += n;
        }
        self.reads.clear();
        Ok(())
    }

    /// Holds `bytes` as the window's first bytes, all of them to be written at the next
    /// flush, without reading the device: for a filesystem made in memory, whose
    /// metadata then reaches the stick once instead of being written, read back into
    /// the cache and written again.
    pub fn preload_prefix(&mut self, bytes: Vec<u8>) -> io::Result<()> {
        self.flush_before_replacing_prefix()?;
        let n = bytes.len();
        if n as u64 > self.len {
            return Err(self.out_of_window("preload", 0, n));
        }
        let mut meta = SparsePages::zeros(n);
        meta.write(0, &bytes);
        drop(bytes);
        self.meta = meta;
        self.meta_dirty = (0..n.div_ceil(META_PAGE)).collect();
        self.reads.clear();
        Ok(())
    }

    /// [`PartitionWindow::preload_prefix`] with the first `len` bytes of `src`, read in
    /// pieces (a whole FAT in one buffer would double its memory for a moment).
    pub fn preload_prefix_from<R: Read>(&mut self, src: &mut R, len: u64) -> io::Result<()> {
        self.flush_before_replacing_prefix()?;
        let n = usize::try_from(len)
            .ok()
            .filter(|&n| n as u64 <= self.len)
            .ok_or_else(|| self.out_of_window("preload", 0, len as usize))?;
        let mut meta = SparsePages::zeros(n);
        let mut buf = vec![0u8; READ_AHEAD.min(n)];
        let mut at = 0;
        while at < n {
            let k = buf.len().min(n - at);
            src.read_exact(&mut buf[..k])?;
            meta.write(at, &buf[..k]);
            at += k;
        }
        self.meta = meta;
        self.meta_dirty = (0..n.div_ceil(META_PAGE)).collect();
        self.reads.clear();
        Ok(())
    }

    /// A flush that writes held prefix pages too: the prefix they belong to is about
    /// to be replaced, and a held page left behind would be lost with it.
    fn flush_before_replacing_prefix(&mut self) -> io::Result<()> {
        let held = std::mem::replace(&mut self.hold_meta, false);
        let flushed = self.flush();
        self.hold_meta = held;
        flushed
    }

    /// While held, [`Write::flush`] hands everything the window holds to `inner`
    /// but does not flush `inner`. fatfs flushes after every file it writes; a
    /// stick's writer (`BoundedDirty`) answers a flush only once its queue is
    /// empty, which left the bus idle while the next file was opened and read.
    /// The writes stay in order either way; the caller flushes once it lets go.
    pub fn hold_device_flush(&mut self, hold: bool) {
        self.flush_device = !hold;
    }

    /// While held, [`Write::flush`] keeps the changed pages of the cached prefix
    /// (reserved sectors and FATs) here instead of writing them: each page then
    /// reaches the device once, at the first flush after it is let go, however
    /// often fatfs and the cluster allocator change it before. For a new FAT,
    /// which nothing reads from the device until the write is done: writing its
    /// pages each time (zeros first, every file's chain later) wrote a 16 GiB
    /// stick's FAT pages twice over for its persistence files alone.
    pub fn hold_metadata(&mut self, hold: bool) {
        self.hold_meta = hold;
    }

    /// Flushes and returns the underlying device or file.
    pub fn into_inner(mut self) -> io::Result<F> {
        self.flush_device = true;
        self.hold_meta = false;
        self.flush()?;
        Ok(self.inner)
    }

    pub fn get_mut(&mut self) -> &mut F {
        &mut self.inner
    }

    fn meta_len(&self) -> u64 {
        self.meta.len() as u64
    }

    /// Copies into `bytes`, read from the device at `at`, what the gathered
    /// writes (not yet on the device) hold over them.
    fn overlay_gathered(&self, at: u64, bytes: &mut [u8]) {
        let lo = at.max(self.wbuf_at);
        let hi = (at + bytes.len() as u64).min(self.wbuf_at + self.wbuf.len() as u64);
        if lo < hi {
            let (to, from) = ((lo - at) as usize, (lo - self.wbuf_at) as usize);
            let n = (hi - lo) as usize;
            bytes[to..to + n].copy_from_slice(&self.wbuf[from..from + n]);
        }
    }

    fn flush_writes(&mut self) -> io::Result<()> {
        if !self.wbuf.is_empty() {
            self.inner
                .seek(SeekFrom::Start(self.start + self.wbuf_at))?;
            self.inner.write_all(&self.wbuf)?;
            self.wbuf.clear();
        }
        Ok(())
    }

    fn out_of_window(&self, what: &str, at: u64, n: usize) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{what} of {n} bytes at offset {at} would cross the end of the partition \
                 ({} bytes); the filesystem on it is larger than its partition",
                self.len
            ),
        )
    }
}

impl<F: Read + Write + Seek> Read for PartitionWindow<F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.len || buf.is_empty() {
            return Ok(0);
        }
        let want = buf.len().min((self.len - self.pos) as usize);
        let pos = self.pos;
        let n = if pos < self.meta_len() {
            let n = want.min((self.meta_len() - pos) as usize);
            self.meta.read(pos as usize, &mut buf[..n]);
            n
        } else {
            let end = pos + want as u64;
            if !self.wbuf.is_empty()
                && pos < self.wbuf_at + self.wbuf.len() as u64
                && end > self.wbuf_at
            {
                self.flush_writes()?;
            }
            let held = self.reads.read(pos, &mut buf[..want]);
            if held > 0 {
                held
            } else if want >= READ_AHEAD {
                self.inner.seek(SeekFrom::Start(self.start + pos))?;
                self.inner.read(&mut buf[..want])?
            } else {
                // A stream reads on in large pieces; anything else reads around the
                // block it needs.
                let (from, fill) = if self.reads.continues(pos) {
                    (pos, READ_AHEAD)
                } else {
                    (pos - pos % META_PAGE as u64, READ_AROUND)
                };
                let fill = fill.min((self.len - from) as usize);
                let mut run = vec![0u8; fill];
                self.inner.seek(SeekFrom::Start(self.start + from))?;
                let got = read_full(&mut self.inner, &mut run)?;
                run.truncate(got);
                // The run reaches past the bytes asked for: where it meets writes
                // still gathered here, those are newer than the device's bytes.
                self.overlay_gathered(from, &mut run);
                let skip = (pos - from) as usize;
                let n = want.min(got.saturating_sub(skip));
                buf[..n].copy_from_slice(&run[skip..skip + n]);
                if got > skip {
                    self.reads.insert(from, run);
                }
                n
            }
        };
        self.pos += n as u64;
        Ok(n)
    }
}

impl<F: Read + Write + Seek> Write for PartitionWindow<F> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let pos = self.pos;
        if pos + buf.len() as u64 > self.len {
            return Err(self.out_of_window("write", pos, buf.len()));
        }
        let n = if pos < self.meta_len() {
            let n = buf.len().min((self.meta_len() - pos) as usize);
            let at = pos as usize;
            self.meta.write(at, &buf[..n]);
            self.meta_dirty
                .extend(at / META_PAGE..(at + n).div_ceil(META_PAGE));
            n
        } else {
            self.reads.patch(pos, buf);
            let appends = !self.wbuf.is_empty() && pos == self.wbuf_at + self.wbuf.len() as u64;
            if !appends || self.wbuf.len() + buf.len() > WRITE_COALESCE {
                self.flush_writes()?;
            }
            if self.wbuf.is_empty() {
                if buf.len() >= WRITE_COALESCE {
                    self.inner.seek(SeekFrom::Start(self.start + pos))?;
                    self.inner.write_all(buf)?;
                    self.pos += buf.len() as u64;
                    return Ok(buf.len());
                }
                self.wbuf_at = pos;
            }
            self.wbuf.extend_from_slice(buf);
            buf.len()
        };
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_writes()?;
        let pages = if self.hold_meta {
            Default::default()
        } else {
            std::mem::take(&mut self.meta_dirty)
        };
        let mut pages = pages.into_iter().peekable();
        while let Some(first) = pages.next() {
            // Consecutive pages go out as one write.
            let mut last = first;
            while pages.peek() == Some(&(last + 1)) {
                last += 1;
                pages.next();
            }
            let lo = first * META_PAGE;
            let hi = ((last + 1) * META_PAGE).min(self.meta.len());
            self.inner.seek(SeekFrom::Start(self.start + lo as u64))?;
            // In pieces: a freshly formatted FAT is one dirty run of its whole size.
            let mut piece = vec![0u8; (hi - lo).min(READ_AHEAD)];
            let mut at = lo;
            while at < hi {
                let n = piece.len().min(hi - at);
                self.meta.read(at, &mut piece[..n]);
                self.inner.write_all(&piece[..n])?;
                at += n;
            }
        }
        if self.flush_device {
            self.inner.flush()
        } else {
            Ok(())
        }
    }
}

impl<F: Read + Write + Seek> Seek for PartitionWindow<F> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
        };
        match target {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the partition",
            )),
        }
    }
}

/// A target file that pushes its dirty data to the device every `limit` bytes
/// written. On a USB stick the kernel would otherwise buffer gigabytes, the progress
/// bar would reach 100 % long before the data is on the stick, and the final sync
/// would take minutes with no sign of life.
///
/// With a limit, the writes and syncs run on a thread of their own: while the stick
/// takes one batch, the caller reads, hashes and prepares the next, so the bus is not
/// left idle during every sync. Reads wait for the queued writes first, so they see
/// what was written. Without a limit (image files: the page cache is the point) every
/// call goes straight to the file.
pub struct BoundedDirty<'a> {
    file: &'a mut std::fs::File,
    pos: u64,
    writer: Option<DirtyWriter>,
    /// The step the writer was last told about (see [`StepTags`]).
    step_sent: Option<std::sync::Arc<str>>,
}

/// Which step each write to a target belongs to, and the first write the target
/// failed. A stick reports a failed write at the next sync, often while a later step
/// is writing; the step that wrote the failing bytes is the one to name (a sync does
/// not say which of its writes failed, so all the steps with writes since the last
/// sync are kept). Cheap to clone: the writer thread and the caller share one.
#[derive(Clone, Debug, Default)]
pub struct StepTags(std::sync::Arc<std::sync::Mutex<StepTagState>>);

#[derive(Debug, Default)]
struct StepTagState {
    current: Option<std::sync::Arc<str>>,
    failure: Option<WriteFailure>,
}

/// A write the target failed, named by the steps that wrote the bytes it may be in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteFailure {
    /// The step of a write the target refused at once; for a failed sync, every step
    /// with a write since the sync before it, in the order written.
    pub steps: Vec<String>,
    /// Found by a sync (or the end of a read-back batch), not by the write itself.
    pub found_when_syncing: bool,
    /// What the target said.
    pub error: String,
}

impl StepTags {
    /// Every write from now on belongs to `step` ("writing /LiveOS/squashfs.img").
    pub fn set(&self, step: impl Into<String>) {
        if let Ok(mut state) = self.0.lock() {
            state.current = Some(std::sync::Arc::from(step.into()));
        }
    }

    fn current(&self) -> Option<std::sync::Arc<str>> {
        self.0.lock().ok().and_then(|state| state.current.clone())
    }

    /// Keeps the first failure: every later error is its consequence.
    fn fail(&self, steps: &[std::sync::Arc<str>], found_when_syncing: bool, error: &io::Error) {
        if let Ok(mut state) = self.0.lock()
            && state.failure.is_none()
        {
            state.failure = Some(WriteFailure {
                steps: steps.iter().map(|s| s.to_string()).collect(),
                found_when_syncing,
                error: error.to_string(),
            });
        }
    }

    /// The first write the target failed, if any.
    pub fn failure(&self) -> Option<WriteFailure> {
        self.0.lock().ok().and_then(|state| state.failure.clone())
    }
}

enum DirtyMessage {
    Write(u64, WriteBytes),
    /// The writes that follow belong to this step (see [`StepTags`]).
    Step(std::sync::Arc<str>),
    Tags(StepTags),
    Barrier(std::sync::mpsc::SyncSender<()>),
    /// Ends the read-back batch, waits until every batch is read back, then answers.
    Finish(std::sync::mpsc::SyncSender<()>),
    /// Test hook (`LIVESTICK_FAILPOINT`): see [`Corrupter`].
    Corrupt(CorruptRule),
}

/// Which writes [`Corrupter`] corrupts.
struct CorruptRule {
    within: Range<u64>,
    min_len: u64,
    /// Every such write from now on, not only the next.
    every: bool,
    /// Instead of a flipped byte, the next sync fails with an I/O error (see
    /// [`Corrupter::fail_writes`]).
    fail: bool,
}

struct DirtyWriter {
    queue: std::sync::mpsc::SyncSender<DirtyMessage>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The first error the writer met; every later call reports it.
    failed: std::sync::Arc<std::sync::Mutex<Option<io::Error>>>,
    /// Shared with the read-back thread, when there is one.
    read_back: Option<std::sync::Arc<ReadBackShared>>,
    /// Where the caller names the current step (see [`BoundedDirty::tag_steps`]).
    tags: Option<StepTags>,
    /// The large write buffers the writer and read-back are done with.
    buffers: std::sync::Arc<BufferPool>,
}

impl<'a> BoundedDirty<'a> {
    /// `limit` 0 never syncs early and uses no thread.
    pub fn new(file: &'a mut std::fs::File, limit: u64) -> Self {
        let pos = file.stream_position().unwrap_or(0);
        let writer = (limit > 0)
            .then(|| file.try_clone().ok())
            .flatten()
            .map(|clone| DirtyWriter::start(clone, limit, None));
        BoundedDirty {
            file,
            pos,
            writer,
            step_sent: None,
        }
    }

    /// Like [`BoundedDirty::new`], and every write is read back while the next ones are
    /// written: each batch, once synced (every `limit` bytes; with `limit` 0, an image
    /// file, every [`READ_BACK_BATCH`] bytes without syncing), is read back on a third
    /// thread (from a stick past the page cache, from an image file after dropping its
    /// pages) and compared byte for byte with what was written, kept until then. The
    /// writer never writes a byte that is still being read back, so what is read
    /// is exactly what that batch left. [`BoundedDirty::finish_read_back`] says what was
    /// verified and the first mismatch.
    pub fn verifying(file: &'a mut std::fs::File, limit: u64) -> io::Result<Self> {
        let pos = file.stream_position()?;
        let writer_file = file.try_clone()?;
        // A stick is read back past the page cache; an image file (no limit) has only
        // the cache to read, and often a file system without O_DIRECT.
        let reader = match (limit > 0)
            .then(|| reopen_direct(file, Access::Read))
            .flatten()
        {
            Some(direct) => Reader {
                file: direct,
                direct: true,
            },
            None => Reader {
                file: file.try_clone()?,
                direct: false,
            },
        };
        let writer = DirtyWriter::start(writer_file, limit, Some(reader));
        Ok(BoundedDirty {
            file,
            pos,
            writer: Some(writer),
            step_sent: None,
        })
    }

    /// Tags every write with the current step of `tags`, and records there the first
    /// write the target fails. Without a writer thread a failed write fails the call
    /// that made it, in its own step: nothing to record.
    pub fn tag_steps(&mut self, tags: StepTags) -> io::Result<()> {
        match &self.writer {
            Some(writer) => writer.send(DirtyMessage::Tags(tags.clone())),
            None => Ok(()),
        }?;
        if let Some(writer) = &mut self.writer {
            writer.tags = Some(tags);
        }
        Ok(())
    }

    /// Syncs and reads back the last batch, waits for every read-back, and returns
    /// what was read back and matched (each byte in its final content: a range
    /// written again after its read-back counts only once read back again) and the
    /// first mismatch. `None` when this writer does not verify.
    pub fn finish_read_back(&mut self) -> io::Result<Option<ReadBack>> {
        let Some(writer) = &self.writer else {
            return Ok(None);
        };
        let Some(shared) = writer.read_back.clone() else {
            return Ok(None);
        };
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        writer.send(DirtyMessage::Finish(done))?;
        wait.recv()
            .map_err(|_| io::Error::other("the writer thread stopped"))?;
        writer.error()?;
        let state = shared.lock()?;
        if let Some(e) = &state.failed {
            return Err(io::Error::new(e.kind(), format!("reading back: {e}")));
        }
        Ok(Some(ReadBack {
            verified: state.verified.clone(),
            mismatch: state.mismatch.clone(),
        }))
    }

    /// A handle that corrupts a write after it was made (for tests of the read-back).
    pub fn corrupter(&self) -> Option<Corrupter> {
        self.writer.as_ref().map(|w| Corrupter {
            queue: w.queue.clone(),
        })
    }

    /// Waits until every queued write reached the file; reports a writer error.
    fn drain(&mut self) -> io::Result<()> {
        match &self.writer {
            Some(w) => w.drain(),
            None => Ok(()),
        }
    }
}

impl DirtyWriter {
    fn start(file: std::fs::File, limit: u64, reader: Option<Reader>) -> DirtyWriter {
        // One batch queued while the writer works on another: enough to keep the
        // stick busy, little enough to keep memory small.
        let (queue, rx) = std::sync::mpsc::sync_channel::<DirtyMessage>(1);
        let failed = std::sync::Arc::new(std::sync::Mutex::new(None::<io::Error>));
        let seen = failed.clone();
        let read_back = reader.map(ReadBacker::start);
        let shared = read_back.as_ref().map(|r| r.shared.clone());
        let thread = std::thread::spawn(move || {
            // A stick takes whole blocks past the page cache (see `WriterLoop::direct`).
            let direct = (limit > 0)
                .then(|| reopen_direct(&file, Access::Write))
                .flatten();
            let mut worker = WriterLoop {
                direct,
                file,
                limit,
                since_sync: 0,
                read_back,
                corrupt: None,
                tags: None,
                step: None,
                unsynced: Vec::new(),
                lost_write: false,
            };
            let fail = |e: io::Error| {
                if let Ok(mut slot) = seen.lock()
                    && slot.is_none()
                {
                    *slot = Some(e);
                }
            };
            for message in rx {
                let result = match message {
                    DirtyMessage::Write(at, bytes) => worker.write(at, bytes),
                    DirtyMessage::Barrier(done) => {
                        let _ = done.send(());
                        Ok(())
                    }
                    DirtyMessage::Finish(done) => {
                        // Recorded before the answer: the caller asks for the error
                        // as soon as it has it, and must not find the slot still empty.
                        if let Err(e) = worker.finish() {
                            fail(e);
                        }
                        let _ = done.send(());
                        Ok(())
                    }
                    DirtyMessage::Corrupt(rule) => {
                        worker.corrupt = Some(rule);
                        Ok(())
                    }
                    DirtyMessage::Step(step) => {
                        worker.step = Some(step);
                        Ok(())
                    }
                    DirtyMessage::Tags(tags) => {
                        worker.tags = Some(tags);
                        Ok(())
                    }
                };
                if let Err(e) = result {
                    fail(e);
                }
            }
            // Closing the read-back queue ends that thread once it has read everything.
            if let Some(read_back) = worker.read_back.take() {
                read_back.stop();
            }
        });
        DirtyWriter {
            queue,
            thread: Some(thread),
            failed,
            read_back: shared,
            tags: None,
            buffers: BufferPool::new(POOLED_CAPACITY, POOL_KEEP),
        }
    }

    fn error(&self) -> io::Result<()> {
        match self.failed.lock() {
            Ok(slot) => match slot.as_ref() {
                Some(e) => Err(io::Error::new(e.kind(), e.to_string())),
                None => Ok(()),
            },
            Err(_) => Err(io::Error::other("the writer thread failed")),
        }
    }

    fn send(&self, message: DirtyMessage) -> io::Result<()> {
        self.queue
            .send(message)
            .map_err(|_| io::Error::other("the writer thread stopped"))
    }

    fn drain(&self) -> io::Result<()> {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        self.send(DirtyMessage::Barrier(done))?;
        wait.recv()
            .map_err(|_| io::Error::other("the writer thread stopped"))?;
        self.error()
    }
}

impl Drop for DirtyWriter {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has written everything queued.
        let (closed, _) = std::sync::mpsc::sync_channel(1);
        drop(std::mem::replace(&mut self.queue, closed));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Read for BoundedDirty<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        if self.writer.is_none() {
            return self.file.read(buf);
        }
        self.drain()?;
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for BoundedDirty<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        if self.writer.is_none() {
            return self.file.seek(pos);
        }
        self.pos = match pos {
            SeekFrom::Start(p) => p,
            SeekFrom::Current(d) => self.pos.checked_add_signed(d).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "seek before the start")
            })?,
            // The end is the file's (or device's) size, which queued writes do not
            // change for a block device; wait for them for a file anyway.
            SeekFrom::End(_) => {
                self.drain()?;
                self.file.seek(pos)?
            }
        };
        Ok(self.pos)
    }
}

impl Write for BoundedDirty<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(writer) = &self.writer else {
            return self.file.write(buf);
        };
        writer.error()?;
        if let Some(step) = writer.tags.as_ref().and_then(StepTags::current)
            && self.step_sent.as_ref() != Some(&step)
        {
            writer.send(DirtyMessage::Step(step.clone()))?;
            self.step_sent = Some(step);
        }
        writer.send(DirtyMessage::Write(
            self.pos,
            WriteBytes::copy_of(buf, self.pos, &writer.buffers),
        ))?;
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.drain()?;
        self.file.flush()
    }
}

impl Drop for BoundedDirty<'_> {
    fn drop(&mut self) {
        // Queued writes finish before the file is used directly again.
        let _ = self.drain();
    }
}

/// Bytes of one read-back batch where nothing syncs (an image file).
pub const READ_BACK_BATCH: u64 = 8 << 20;
/// The page cache works in pages: a read-back drops and reads whole pages.
const CACHE_PAGE: u64 = 4096;
/// Read-back request size.
const READ_BACK_CHUNK: usize = 2 << 20;
/// Offsets, lengths and buffers of reads past the page cache (O_DIRECT) are multiples
/// of this: the logical block size of any stick (512 or 4096).
pub(crate) const DIRECT_ALIGN: usize = 4096;

/// What the read-back reads with.
struct Reader {
    file: std::fs::File,
    /// Opened with O_DIRECT: reads come from the device, never from the page cache,
    /// which the writer keeps filling; nothing needs dropping from it first.
    direct: bool,
}

impl Reader {
    /// Reads through the page cache from now on (O_DIRECT cleared on the open file).
    fn read_through_cache(&mut self) -> io::Result<()> {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        use std::os::fd::AsRawFd;
        let fd = self.file.as_raw_fd();
        let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
        fcntl(fd, FcntlArg::F_SETFL(flags - OFlag::O_DIRECT))?;
        self.direct = false;
        Ok(())
    }
}

/// What a second open file description of a target is for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    Read,
    Write,
}

/// A second open file description of `file` that reads or writes past the page cache. Through
/// `/proc/self/fd`, so it is the inode already opened, not whatever the target's path
/// names now. `None` where O_DIRECT is not supported.
pub(crate) fn reopen_direct(file: &std::fs::File, access: Access) -> Option<std::fs::File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(access == Access::Read)
        .write(access == Access::Write)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .ok()
}

/// Reads the `n` bytes at `at` of `file` as whole [`DIRECT_ALIGN`] blocks, as a file
/// opened with O_DIRECT must be read, into `buf`, which starts on such a boundary
/// and holds `n` bytes plus a block either side. Returns where in `buf` the bytes
/// asked for start. The last block of a device or file whose size is no multiple of
/// the alignment reads short: enough once it covers the bytes asked for.
pub(crate) fn read_aligned_at(
    file: &std::fs::File,
    buf: &mut [u8],
    at: u64,
    n: usize,
) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let align = DIRECT_ALIGN as u64;
    let from = at / align * align;
    let want = ((at + n as u64).div_ceil(align) * align - from) as usize;
    let skip = (at - from) as usize;
    let mut got = 0;
    while got < skip + n {
        match file.read_at(&mut buf[got..want], from + got as u64) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "it ends at byte {}, before the {n} bytes asked for at {at}",
                        from + got as u64
                    ),
                ));
            }
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(skip)
}

/// A read-back buffer: [`READ_BACK_CHUNK`] bytes plus a block either side, aligned
/// for O_DIRECT.
struct ReadBuffer {
    raw: Vec<u8>,
    start: usize,
}

impl ReadBuffer {
    fn new() -> Self {
        let raw = vec![0u8; READ_BACK_CHUNK + 3 * DIRECT_ALIGN];
        let start = raw.as_ptr().align_offset(DIRECT_ALIGN);
        ReadBuffer { raw, start }
    }

    /// The `n` bytes (at most [`READ_BACK_CHUNK`]) at `at` of the reader's file. A
    /// direct reader reads the aligned blocks that hold them.
    fn read(&mut self, reader: &Reader, at: u64, n: usize) -> io::Result<&[u8]> {
        use std::os::unix::fs::FileExt;
        let buf = &mut self.raw[self.start..self.start + READ_BACK_CHUNK + 2 * DIRECT_ALIGN];
        if !reader.direct {
            reader.file.read_exact_at(&mut buf[..n], at)?;
            return Ok(&buf[..n]);
        }
        let skip = read_aligned_at(&reader.file, buf, at, n)?;
        Ok(&buf[skip..skip + n])
    }
}

/// What was read back while writing (see [`BoundedDirty::verifying`]).
#[derive(Debug, Clone)]
pub struct ReadBack {
    /// Device bytes read back and matching what was last written there.
    pub verified: RangeSet,
    pub mismatch: Option<ReadBackMismatch>,
}

/// A write whose bytes read back differently: its device range and the check values
/// ([`CheckHash`]) of what was written and what was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadBackMismatch {
    pub range: Range<u64>,
    pub expected: u64,
    pub actual: u64,
}

/// Test hook for the read-back: corrupts one byte on the target after a write has
/// been made, before it is read back, as a stick that corrupts data would.
pub struct Corrupter {
    queue: std::sync::mpsc::SyncSender<DirtyMessage>,
}

impl Corrupter {
    /// The next write at least `min_len` bytes long that touches `within` gets the
    /// middle byte of that overlap flipped on the target, right after it is written.
    pub fn corrupt_next_write(&self, within: Range<u64>, min_len: u64) -> io::Result<()> {
        self.send(CorruptRule {
            within,
            min_len,
            every: false,
            fail: false,
        })
    }

    /// The same for every such write from now on: for bytes written several times
    /// (the FAT), whose last write is the one that must be caught.
    pub fn corrupt_every_write(&self, within: Range<u64>, min_len: u64) -> io::Result<()> {
        self.send(CorruptRule {
            within,
            min_len,
            every: true,
            fail: false,
        })
    }

    /// Every write that touches `within` from now on is reported lost by the next
    /// sync (on an image file, which is not synced, at the end of its read-back
    /// batch), as a stick under QEMU's blkdebug does: an I/O error found later,
    /// usually while another step writes.
    pub fn fail_writes(&self, within: Range<u64>) -> io::Result<()> {
        self.send(CorruptRule {
            within,
            min_len: 1,
            every: true,
            fail: true,
        })
    }

    fn send(&self, rule: CorruptRule) -> io::Result<()> {
        self.queue
            .send(DirtyMessage::Corrupt(rule))
            .map_err(|_| io::Error::other("the writer thread stopped"))
    }
}

/// A write of the batch: the bytes the target should hold there, kept until read
/// back. Comparing costs less than hashing on both sides, most of all under an
/// emulated CPU; the batch is small (a few times [`READ_BACK_BATCH`] in flight).
struct Entry {
    at: u64,
    bytes: WriteBytes,
}

impl Entry {
    fn range(&self) -> Range<u64> {
        self.at..self.at + self.bytes.len() as u64
    }
}

struct Batch {
    id: u64,
    entries: Vec<Entry>,
}

#[derive(Default)]
struct ReadBackState {
    verified: RangeSet,
    /// Batches handed to the read-back thread and not yet read, by id, with their bytes.
    outstanding: Vec<(u64, RangeSet)>,
    mismatch: Option<ReadBackMismatch>,
    failed: Option<io::Error>,
}

#[derive(Default)]
struct ReadBackShared {
    state: std::sync::Mutex<ReadBackState>,
    changed: std::sync::Condvar,
}

impl ReadBackShared {
    fn lock(&self) -> io::Result<std::sync::MutexGuard<'_, ReadBackState>> {
        self.state
            .lock()
            .map_err(|_| io::Error::other("the read-back thread failed"))
    }
}

/// The whole pages that hold `range`.
fn pages_of(range: &Range<u64>) -> Range<u64> {
    range.start / CACHE_PAGE * CACHE_PAGE..range.end.div_ceil(CACHE_PAGE) * CACHE_PAGE
}

fn drop_cached(file: &std::fs::File, range: &Range<u64>) {
    use std::os::fd::AsRawFd;
    let (Ok(at), Ok(len)) = (
        i64::try_from(range.start),
        i64::try_from(range.end - range.start),
    ) else {
        return;
    };
    // Advice only: on a file system that ignores it the read-back reads the cache.
    let _ = nix::fcntl::posix_fadvise(
        file.as_raw_fd(),
        at,
        len,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
}

/// The bytes of one write on their way to the writer thread (and kept for the
/// read-back), placed so that the bytes bound for each 4 KiB block of the device
/// start on a 4 KiB boundary in memory: a stick's whole blocks go to O_DIRECT from
/// here, with no second copy.
struct WriteBytes {
    raw: PooledBuffer,
    start: usize,
}

/// Writes from this size up to [`POOLED_CAPACITY`] take their buffer from a
/// [`BufferPool`]; smaller ones are left to the allocator, which keeps small blocks.
const POOLED_MIN: usize = 256 << 10;
/// Every pooled write buffer holds the largest write the partition window
/// gathers, with room to align it.
const POOLED_CAPACITY: usize = WRITE_COALESCE + 2 * DIRECT_ALIGN;
/// Write buffers a pool keeps: past that, they go back to the allocator.
const POOL_KEEP: usize = 6;

/// Large buffers used again instead of freed. Each fresh large allocation comes
/// from the kernel as new pages: a fault and a zeroed page for every 4 KiB filled,
/// a tenth of a batch's CPU time under an emulated CPU (perf in the VM bench).
/// A buffer goes back when its last holder drops it, from whichever thread that
/// is (the writer's, the read-back's, the last stick's of a batch).
pub(crate) struct BufferPool {
    free: std::sync::Mutex<Vec<Vec<u8>>>,
    /// The room of every buffer handed out.
    capacity: usize,
    /// Idle buffers kept: past that, they go back to the allocator.
    keep: usize,
}

impl BufferPool {
    pub(crate) fn new(capacity: usize, keep: usize) -> std::sync::Arc<BufferPool> {
        std::sync::Arc::new(BufferPool {
            free: std::sync::Mutex::default(),
            capacity,
            keep,
        })
    }

    /// A buffer with room for the pool's capacity. Its length and bytes are what
    /// its last user left: set them before reading (filling a buffer that is long
    /// enough already costs nothing, zeroing it again would).
    pub(crate) fn take(self: &std::sync::Arc<Self>) -> PooledBuffer {
        let reused = self.free.lock().ok().and_then(|mut free| free.pop());
        PooledBuffer {
            bytes: reused.unwrap_or_else(|| Vec::with_capacity(self.capacity)),
            home: Some(std::sync::Arc::clone(self)),
        }
    }

    fn give_back(&self, buffer: Vec<u8>) {
        if buffer.capacity() < self.capacity {
            return;
        }
        if let Ok(mut free) = self.free.lock()
            && free.len() < self.keep
        {
            free.push(buffer);
        }
    }
}

/// A buffer from a [`BufferPool`], back there when dropped; or one of the
/// allocator's, for sizes the pool does not serve.
pub(crate) struct PooledBuffer {
    bytes: Vec<u8>,
    home: Option<std::sync::Arc<BufferPool>>,
}

impl PooledBuffer {
    fn unpooled(capacity: usize) -> PooledBuffer {
        PooledBuffer {
            bytes: Vec::with_capacity(capacity),
            home: None,
        }
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let Some(home) = self.home.take() {
            home.give_back(std::mem::take(&mut self.bytes));
        }
    }
}

impl std::ops::Deref for PooledBuffer {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.bytes
    }
}

impl std::ops::DerefMut for PooledBuffer {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.bytes
    }
}

impl WriteBytes {
    /// A copy of `data`, to be written at device offset `at`; large writes take a
    /// buffer from `pool`.
    fn copy_of(data: &[u8], at: u64, pool: &std::sync::Arc<BufferPool>) -> WriteBytes {
        let needed = data.len() + 2 * DIRECT_ALIGN;
        let mut raw = if (POOLED_MIN..=pool.capacity).contains(&needed) {
            pool.take()
        } else {
            PooledBuffer::unpooled(needed)
        };
        raw.clear();
        let misaligned = raw.as_ptr() as usize % DIRECT_ALIGN;
        let start =
            (DIRECT_ALIGN - misaligned) % DIRECT_ALIGN + (at % DIRECT_ALIGN as u64) as usize;
        raw.resize(start, 0);
        raw.extend_from_slice(data);
        WriteBytes { raw, start }
    }
}

impl std::ops::Deref for WriteBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.raw[self.start..]
    }
}

impl std::ops::DerefMut for WriteBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..]
    }
}

/// The writer thread's state: the current read-back batch grows with each write and
/// goes to the read-back thread once synced.
struct WriterLoop {
    file: std::fs::File,
    /// Where the whole 4 KiB blocks of each write go on a stick: past the page cache
    /// (O_DIRECT), straight from the write's [`WriteBytes`]. Through the page cache
    /// every page written to a stick is allocated (and zeroed, on kernels that zero
    /// every allocation), copied into, written back and dropped again: under an
    /// emulated CPU a quarter of a write's CPU time, and the bus waited for it. The
    /// read-back reads past the cache anyway.
    direct: Option<std::fs::File>,
    limit: u64,
    since_sync: u64,
    read_back: Option<ReadBacker>,
    corrupt: Option<CorruptRule>,
    /// Where a failure is recorded by step (see [`StepTags`]).
    tags: Option<StepTags>,
    /// The step of the writes that come next.
    step: Option<std::sync::Arc<str>>,
    /// The writes since the last sync by step, in the order written (contiguous
    /// writes of one step as one range).
    unsynced: Vec<(Range<u64>, std::sync::Arc<str>)>,
    /// Test hook: a write [`Corrupter::fail_writes`] made lost; the next sync fails.
    lost_write: bool,
}

impl WriterLoop {
    /// Records a failure by the steps of the writes it may be in.
    fn failed(&self, e: io::Error, steps: &[std::sync::Arc<str>], syncing: bool) -> io::Error {
        if let Some(tags) = &self.tags {
            tags.fail(steps, syncing, &e);
        }
        e
    }

    fn write(&mut self, at: u64, bytes: WriteBytes) -> io::Result<()> {
        let range = at..at + bytes.len() as u64;
        if let Some(rb) = &mut self.read_back {
            rb.before_write(&range)?;
        }
        if self.loses(&range) {
            // As a stick under blkdebug: the write never reaches the medium, and only
            // the next sync says so.
            self.lost_write = true;
        } else if let Err(e) = self.write_at(&bytes, at) {
            let step: Vec<_> = self.step.iter().cloned().collect();
            return Err(self.failed(e, &step, false));
        }
        if let Some(step) = &self.step {
            match self.unsynced.last_mut() {
                Some((last, s)) if std::sync::Arc::ptr_eq(s, step) && last.end == range.start => {
                    last.end = range.end;
                }
                _ => self.unsynced.push((range.clone(), step.clone())),
            }
        }
        self.corrupt_if_asked(&range, &bytes)?;
        self.since_sync += bytes.len() as u64;
        let batch_full = match &mut self.read_back {
            Some(rb) => {
                rb.add(at, bytes);
                self.limit == 0 && rb.batch_bytes >= READ_BACK_BATCH
            }
            None => false,
        };
        if self.limit > 0 && self.since_sync >= self.limit || batch_full {
            self.end_batch()?;
        }
        Ok(())
    }

    /// Writes `bytes` at `at`: whole blocks past the page cache when the stick
    /// takes them so, the partial blocks at either end through it. `bytes` is laid
    /// out by [`WriteBytes::copy_of`], so the whole blocks start page-aligned.
    fn write_at(&mut self, bytes: &[u8], at: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let end = at + bytes.len() as u64;
        let block = DIRECT_ALIGN as u64;
        let (lo, hi) = match &self.direct {
            Some(_) => {
                let lo = at.next_multiple_of(block).min(end);
                (lo, (end / block * block).max(lo))
            }
            None => (end, end),
        };
        let part = |r: Range<u64>| &bytes[(r.start - at) as usize..(r.end - at) as usize];
        self.write_cached(part(at..lo), at)?;
        self.write_cached(part(hi..end), hi)?;
        if let (true, Some(direct)) = (lo < hi, &self.direct) {
            match direct.write_all_at(part(lo..hi), lo) {
                Ok(()) => {}
                // A stick whose blocks are larger than a page: through the cache.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.direct = None;
                    self.write_cached(part(lo..hi), lo)?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes `bytes` at `at` through the page cache; on a stick, starts their
    /// writeback (DONTNEED, without waiting for it: the stick works while this
    /// thread goes on).
    fn write_cached(&self, bytes: &[u8], at: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        if bytes.is_empty() {
            return Ok(());
        }
        self.file.write_all_at(bytes, at)?;
        if self.limit > 0 {
            drop_cached(&self.file, &(at..at + bytes.len() as u64));
        }
        Ok(())
    }

    /// Whether the test hook [`Corrupter::fail_writes`] makes this write lost.
    fn loses(&self, range: &Range<u64>) -> bool {
        self.corrupt.as_ref().is_some_and(|rule| {
            rule.fail && range.start < rule.within.end && rule.within.start < range.end
        })
    }

    fn corrupt_if_asked(&mut self, range: &Range<u64>, bytes: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let Some(rule) = &self.corrupt else {
            return Ok(());
        };
        let lo = range.start.max(rule.within.start);
        let hi = range.end.min(rule.within.end);
        if rule.fail || lo >= hi || range.end - range.start < rule.min_len {
            return Ok(());
        }
        let at = lo + (hi - lo) / 2;
        let flipped = bytes[(at - range.start) as usize] ^ 0xff;
        self.file.write_all_at(&[flipped], at)?;
        if !rule.every {
            self.corrupt = None;
        }
        Ok(())
    }

    /// Syncs what was written (on a stick) and hands the batch to the read-back.
    fn end_batch(&mut self) -> io::Result<()> {
        let mut synced = Ok(());
        if self.limit > 0 {
            self.since_sync = 0;
            synced = self.file.sync_data();
        }
        if std::mem::take(&mut self.lost_write) && synced.is_ok() {
            synced = Err(io::Error::from_raw_os_error(libc::EIO));
        }
        if let Err(e) = synced {
            let unsynced = std::mem::take(&mut self.unsynced);
            // A sync does not say which write failed; reading the batch back does,
            // where the device still reads: the range that holds old bytes.
            let lost = match &mut self.read_back {
                Some(rb) => rb.first_lost(&self.file),
                None => None,
            };
            let steps = steps_of(&unsynced, lost);
            return Err(self.failed(e, &steps, true));
        }
        self.unsynced.clear();
        match &mut self.read_back {
            Some(rb) => rb.send_batch(),
            None => Ok(()),
        }
    }

    fn finish(&mut self) -> io::Result<()> {
        self.end_batch()?;
        match &self.read_back {
            Some(rb) => rb.wait_idle(),
            None => Ok(()),
        }
    }
}

/// The step that last wrote where `lost` is; without that, every step written to.
fn steps_of(
    unsynced: &[(Range<u64>, std::sync::Arc<str>)],
    lost: Option<Range<u64>>,
) -> Vec<std::sync::Arc<str>> {
    let hit = lost.and_then(|lost| {
        unsynced
            .iter()
            .rev()
            .find(|(r, _)| r.start < lost.end && lost.start < r.end)
    });
    if let Some((_, step)) = hit {
        return vec![step.clone()];
    }
    let mut steps: Vec<std::sync::Arc<str>> = Vec::new();
    for (_, step) in unsynced {
        if !steps.contains(step) {
            steps.push(step.clone());
        }
    }
    steps
}

/// The writer's side of the read-back: the batch being written and the queue to the
/// thread that reads batches back.
struct ReadBacker {
    shared: std::sync::Arc<ReadBackShared>,
    queue: Option<std::sync::mpsc::SyncSender<Batch>>,
    thread: Option<std::thread::JoinHandle<()>>,
    batch: Vec<Entry>,
    batch_bytes: u64,
    next_id: u64,
}

impl ReadBacker {
    fn start(reader: Reader) -> ReadBacker {
        let shared = std::sync::Arc::new(ReadBackShared::default());
        // One batch waiting while another is read: reading is faster than writing.
        let (queue, rx) = std::sync::mpsc::sync_channel::<Batch>(1);
        let theirs = shared.clone();
        let thread = std::thread::spawn(move || {
            let mut reader = reader;
            let mut buf = ReadBuffer::new();
            for batch in rx {
                let result = match read_back_batch(&reader, &batch, &mut buf) {
                    // A stick that refuses direct reads of 4 KiB blocks (larger
                    // logical blocks, an odd bridge): read through the page cache,
                    // its pages dropped first, as from an image file.
                    Err(e) if reader.direct && e.raw_os_error() == Some(libc::EINVAL) => reader
                        .read_through_cache()
                        .and_then(|()| read_back_batch(&reader, &batch, &mut buf)),
                    other => other,
                };
                // A panic elsewhere with the lock held must not leave the writer
                // waiting for this batch for ever.
                let mut state = theirs
                    .state
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                match result {
                    Ok(None) => {
                        for e in &batch.entries {
                            state.verified.insert(e.range());
                        }
                    }
                    Ok(Some(mismatch)) => {
                        if state.mismatch.is_none() {
                            state.mismatch = Some(mismatch);
                        }
                    }
                    Err(e) => {
                        if state.failed.is_none() {
                            state.failed = Some(e);
                        }
                    }
                }
                state.outstanding.retain(|(id, _)| *id != batch.id);
                drop(state);
                theirs.changed.notify_all();
            }
        });
        ReadBacker {
            shared,
            queue: Some(queue),
            thread: Some(thread),
            batch: Vec::new(),
            batch_bytes: 0,
            next_id: 0,
        }
    }

    /// The first write of the batch being written that the target does not hold, read
    /// back now (after a failed sync); `None` when all match or the reads fail too.
    fn first_lost(&mut self, file: &std::fs::File) -> Option<Range<u64>> {
        let reader = Reader {
            file: file.try_clone().ok()?,
            direct: false,
        };
        let batch = Batch {
            id: u64::MAX,
            entries: std::mem::take(&mut self.batch),
        };
        let lost = read_back_batch(&reader, &batch, &mut ReadBuffer::new())
            .ok()
            .flatten()
            .map(|m| m.range);
        self.batch = batch.entries;
        lost
    }

    /// Waits until no byte of `range` is being read back, then forgets that it was
    /// verified: its new content is read back with this batch. Bytes, not pages: a
    /// FAT32 data area is seldom page-aligned, so consecutive batches of one file share
    /// a page, and waiting for it would serialise writing and reading back.
    fn before_write(&mut self, range: &Range<u64>) -> io::Result<()> {
        let mut state = self.shared.lock()?;
        while state
            .outstanding
            .iter()
            .any(|(_, busy)| busy.overlaps(range))
        {
            state = self
                .shared
                .changed
                .wait(state)
                .map_err(|_| io::Error::other("the read-back thread failed"))?;
        }
        state.verified.remove(range.clone());
        Ok(())
    }

    fn add(&mut self, at: u64, bytes: WriteBytes) {
        let range = at..at + bytes.len() as u64;
        // Earlier writes of this batch take the new content where it overlaps them,
        // so each entry describes what the target holds at the end.
        for e in &mut self.batch {
            let lo = range.start.max(e.at);
            let hi = range.end.min(e.range().end);
            if lo < hi {
                e.bytes[(lo - e.at) as usize..(hi - e.at) as usize]
                    .copy_from_slice(&bytes[(lo - at) as usize..(hi - at) as usize]);
            }
        }
        self.batch_bytes += bytes.len() as u64;
        self.batch.push(Entry { at, bytes });
    }

    fn send_batch(&mut self) -> io::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let entries = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let id = self.next_id;
        self.next_id += 1;
        let bytes: RangeSet = entries.iter().map(|e| e.range()).collect();
        self.shared.lock()?.outstanding.push((id, bytes));
        let Some(queue) = &self.queue else {
            return Err(io::Error::other("the read-back thread stopped"));
        };
        queue
            .send(Batch { id, entries })
            .map_err(|_| io::Error::other("the read-back thread stopped"))
    }

    fn wait_idle(&self) -> io::Result<()> {
        let mut state = self.shared.lock()?;
        while !state.outstanding.is_empty() {
            state = self
                .shared
                .changed
                .wait(state)
                .map_err(|_| io::Error::other("the read-back thread failed"))?;
        }
        Ok(())
    }

    fn stop(mut self) {
        self.queue = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads every entry of the batch back: `None` when all match, else the first that
/// does not. A direct reader reads from the stick itself. Otherwise the batch's pages
/// are dropped from the cache first; a page the next batch has dirtied again (it
/// shares a page with this one) stays there, so the few bytes of this batch in it are
/// read from the cache, not from the stick.
fn read_back_batch(
    reader: &Reader,
    batch: &Batch,
    buf: &mut ReadBuffer,
) -> io::Result<Option<ReadBackMismatch>> {
    if !reader.direct {
        let pages: RangeSet = batch.entries.iter().map(|e| pages_of(&e.range())).collect();
        for r in pages.iter() {
            drop_cached(&reader.file, &r);
        }
    }
    for e in &batch.entries {
        for (at, n) in read_back_chunks(e.range()) {
            let from = (at - e.at) as usize;
            if buf.read(reader, at, n)? != &e.bytes[from..from + n] {
                return Ok(Some(mismatch_of(reader, e, buf)?));
            }
        }
    }
    Ok(None)
}

/// `range` as (offset, length) requests of at most [`READ_BACK_CHUNK`] bytes.
fn read_back_chunks(range: Range<u64>) -> impl Iterator<Item = (u64, usize)> {
    range
        .clone()
        .step_by(READ_BACK_CHUNK)
        .map(move |at| (at, (range.end - at).min(READ_BACK_CHUNK as u64) as usize))
}

/// The check values of what `e` should hold and of what the target holds, for the
/// report of a mismatch.
fn mismatch_of(reader: &Reader, e: &Entry, buf: &mut ReadBuffer) -> io::Result<ReadBackMismatch> {
    let mut expected = CheckHash::default();
    expected.update(&e.bytes);
    let mut actual = CheckHash::default();
    for (at, n) in read_back_chunks(e.range()) {
        actual.update(buf.read(reader, at, n)?);
    }
    Ok(ReadBackMismatch {
        range: e.range(),
        expected: expected.finish(),
        actual: actual.finish(),
    })
}

/// Byte ranges, kept sorted and merged: what a write touched, what a check covered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start -> end (exclusive); no two ranges overlap or touch.
    ranges: std::collections::BTreeMap<u64, u64>,
}

impl RangeSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, range: Range<u64>) {
        if range.start >= range.end {
            return;
        }
        let (mut start, mut end) = (range.start, range.end);
        // Every range that overlaps or touches [start, end) is absorbed.
        let absorbed: Vec<(u64, u64)> = self
            .ranges
            .range(..=end)
            .rev()
            .take_while(|(_, e)| **e >= start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in absorbed {
            self.ranges.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.ranges.insert(start, end);
    }

    /// Takes `range` out of the set.
    pub fn remove(&mut self, range: Range<u64>) {
        if range.start >= range.end {
            return;
        }
        let cut: Vec<(u64, u64)> = self
            .ranges
            .range(..range.end)
            .rev()
            .take_while(|(_, e)| **e > range.start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in cut {
            self.ranges.remove(&s);
            if s < range.start {
                self.ranges.insert(s, range.start);
            }
            if e > range.end {
                self.ranges.insert(range.end, e);
            }
        }
    }

    /// Whether any byte of `range` is in the set.
    pub fn overlaps(&self, range: &Range<u64>) -> bool {
        range.start < range.end
            && self
                .ranges
                .range(..range.end)
                .next_back()
                .is_some_and(|(_, e)| *e > range.start)
    }

    pub fn extend(&mut self, other: &RangeSet) {
        for r in other.iter() {
            self.insert(r);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.ranges.iter().map(|(s, e)| *s..*e)
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Bytes covered.
    pub fn total(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }

    /// The parts of `self` that `other` does not cover.
    pub fn difference(&self, other: &RangeSet) -> RangeSet {
        let mut out = RangeSet::new();
        for r in self.iter() {
            let mut at = r.start;
            let overlapping = other
                .ranges
                .range(..r.end)
                .rev()
                .take_while(|(_, e)| **e > r.start)
                .map(|(s, e)| (*s, *e))
                .collect::<Vec<_>>();
            for (s, e) in overlapping.into_iter().rev() {
                if s > at {
                    out.insert(at..s);
                }
                at = at.max(e);
            }
            if at < r.end {
                out.insert(at..r.end);
            }
        }
        out
    }

    /// The parts of `self` that `other` covers too.
    pub fn intersection(&self, other: &RangeSet) -> RangeSet {
        self.difference(&self.difference(other))
    }

    /// The same ranges moved by `delta` bytes.
    pub fn shifted(&self, delta: u64) -> RangeSet {
        let mut out = RangeSet::new();
        for r in self.iter() {
            out.insert(r.start + delta..r.end + delta);
        }
        out
    }
}

impl FromIterator<Range<u64>> for RangeSet {
    fn from_iter<I: IntoIterator<Item = Range<u64>>>(iter: I) -> Self {
        let mut set = RangeSet::new();
        for r in iter {
            set.insert(r);
        }
        set
    }
}

/// Passes reads, writes and seeks through to `inner` and remembers every byte range
/// written: read-back verification checks exactly those bytes, and the report
/// counts them.
#[derive(Debug)]
pub struct WriteRecorder<W> {
    inner: W,
    pos: u64,
    written: RangeSet,
}

impl<W: Seek> WriteRecorder<W> {
    pub fn new(mut inner: W) -> io::Result<Self> {
        let pos = inner.stream_position()?;
        Ok(WriteRecorder {
            inner,
            pos,
            written: RangeSet::new(),
        })
    }

    pub fn written(&self) -> &RangeSet {
        &self.written
    }

    pub fn into_written(self) -> RangeSet {
        self.written
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

impl<W: Read> Read for WriteRecorder<W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<W: Write> Write for WriteRecorder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written.insert(self.pos..self.pos + n as u64);
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Seek> Seek for WriteRecorder<W> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = self.inner.seek(to)?;
        Ok(self.pos)
    }
}

impl<W: SyncData> SyncData for WriteRecorder<W> {
    fn sync_data(&mut self) -> io::Result<()> {
        self.inner.sync_data()
    }
}

/// `len` zero bytes that can be read anywhere: the content of a new dm-snapshot
/// store, of a swap image past its header, of a stale-signature wipe.
#[derive(Debug, Clone)]
pub struct Zeros {
    /// Bytes that come first (a header); zeros follow up to `len`.
    prefix: Vec<u8>,
    len: u64,
    pos: u64,
}

impl Zeros {
    pub fn new(len: u64) -> Self {
        Zeros::with_prefix(Vec::new(), len)
    }

    /// `prefix`, then zeros up to `len` bytes in all.
    pub fn with_prefix(prefix: Vec<u8>, len: u64) -> Self {
        Zeros {
            prefix,
            len,
            pos: 0,
        }
    }
}

impl Read for Zeros {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.len.saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        let from_prefix = (self.prefix.len() as u64)
            .saturating_sub(self.pos)
            .min(n as u64) as usize;
        if from_prefix > 0 {
            let at = self.pos as usize;
            buf[..from_prefix].copy_from_slice(&self.prefix[at..at + from_prefix]);
        }
        buf[from_prefix..n].fill(0);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Zeros {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.pos = seek_position(self.pos, self.len, to)?;
        Ok(self.pos)
    }
}

/// Writes zeros over `ranges` of `dev` in large requests.
pub fn zero_ranges<W: Write + Seek>(
    dev: &mut W,
    ranges: impl IntoIterator<Item = Range<u64>>,
) -> io::Result<()> {
    let zeros = vec![0u8; 1 << 20];
    for r in ranges {
        dev.seek(SeekFrom::Start(r.start))?;
        let mut left = r.end - r.start;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            dev.write_all(&zeros[..n])?;
            left -= n as u64;
        }
    }
    dev.flush()
}

/// Bytes per step of [`hash_while`]: large requests keep a USB bus busy.
const HASH_CHUNK: usize = 2 << 20;

/// A digest computed over a stream on a second thread (see [`hash_while`]).
pub trait StreamHash: Send {
    type Out;
    fn update(&mut self, bytes: &[u8]);
    fn finish(self) -> Self::Out;
}

/// sha256: what the report gives for every file written.
#[derive(Default)]
pub struct Sha256Hash(sha2::Sha256);

impl StreamHash for Sha256Hash {
    type Out = [u8; 32];
    fn update(&mut self, bytes: &[u8]) {
        sha2::Digest::update(&mut self.0, bytes);
    }
    fn finish(self) -> [u8; 32] {
        sha2::Digest::finalize(self.0).into()
    }
}

/// xxh3-64: the check value a read-back reports for a range that differs, and what a
/// read-back of ranges no longer in memory compares ([`check_ranges`]). It detects
/// any corruption a bus or a stick produces (it is not meant against an adversary, who
/// would need to control the stick anyway) and costs a fraction of sha256 on CPUs
/// without SHA instructions.
pub struct CheckHash(xxhash_rust::xxh3::Xxh3);

impl Default for CheckHash {
    fn default() -> Self {
        CheckHash(xxhash_rust::xxh3::Xxh3::new())
    }
}

impl StreamHash for CheckHash {
    type Out = u64;
    fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    fn finish(self) -> u64 {
        self.0.digest()
    }
}

/// What the report gives for each file written: its sha256. (The read-back compares
/// each write with what the target holds, in [`BoundedDirty::verifying`], so no
/// second digest of the file is needed for it.)
#[derive(Default)]
pub struct WrittenHash(Sha256Hash);

/// The digest of bytes written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrittenDigest {
    pub sha256: [u8; 32],
}

impl StreamHash for WrittenHash {
    type Out = WrittenDigest;
    fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    fn finish(self) -> WrittenDigest {
        WrittenDigest {
            sha256: self.0.finish(),
        }
    }
}

/// A digest of a stream with the hashing on a second thread, overlapping the I/O:
/// while one chunk is hashed, `consume` gets it (to write it somewhere) and `fill`
/// reads the next. On a slow CPU (a VM, a small board) hashing would otherwise idle
/// the bus for as long as it takes. `fill` fills the buffer as far as it can and
/// returns the count, 0 at the end. `size_hint` (the stream's expected length)
/// keeps the buffers of a small stream small. Returns the digest and the byte count.
pub fn hash_while<H: StreamHash>(
    mut hasher: H,
    size_hint: u64,
    mut fill: impl FnMut(&mut [u8]) -> io::Result<usize>,
    mut consume: impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<(H::Out, u64)> {
    let len = size_hint.clamp(64 << 10, HASH_CHUNK as u64) as usize;
    let mut current = vec![0u8; len];
    let mut next = vec![0u8; len];
    let mut total = 0u64;
    let mut n = fill(&mut current)?;
    while n > 0 {
        let chunk = &current[..n];
        let hasher_ref = &mut hasher;
        let following = std::thread::scope(|s| {
            let hashing = s.spawn(move || hasher_ref.update(chunk));
            let result = consume(chunk).and_then(|()| fill(&mut next));
            match hashing.join() {
                Ok(()) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })?;
        total += n as u64;
        std::mem::swap(&mut current, &mut next);
        n = following;
    }
    Ok((hasher.finish(), total))
}

/// The read-back check value ([`CheckHash`]) of the bytes of `ranges` in `dev`.
pub fn check_ranges<D: Read + Seek>(
    dev: &mut D,
    ranges: impl IntoIterator<Item = Range<u64>>,
    progress: impl FnMut(u64),
) -> io::Result<u64> {
    hash_ranges(CheckHash::default(), dev, ranges, progress)
}

/// A digest of the bytes of `ranges` in `dev`, read in large requests while the
/// previous one is hashed.
pub fn hash_ranges<H: StreamHash, D: Read + Seek>(
    hasher: H,
    dev: &mut D,
    ranges: impl IntoIterator<Item = Range<u64>>,
    mut progress: impl FnMut(u64),
) -> io::Result<H::Out> {
    let mut ranges = ranges.into_iter().filter(|r| r.start < r.end).peekable();
    let mut at: Option<u64> = None;
    let (digest, _) = hash_while(
        hasher,
        u64::MAX,
        |buf| {
            let mut got = 0;
            while got < buf.len() {
                let Some(r) = ranges.peek() else { break };
                let pos = at.unwrap_or(r.start).max(r.start);
                if at != Some(pos) {
                    dev.seek(SeekFrom::Start(pos))?;
                }
                let n = ((r.end - pos) as usize).min(buf.len() - got);
                dev.read_exact(&mut buf[got..got + n])?;
                got += n;
                let end = pos + n as u64;
                at = Some(end);
                if end == r.end {
                    ranges.next();
                }
            }
            Ok(got)
        },
        |chunk| {
            progress(chunk.len() as u64);
            Ok(())
        },
    )?;
    Ok(digest)
}

/// Copies everything from `reader` into `writer` with large buffers, calling
/// `progress` with the running total. Returns the number of bytes copied.
pub fn copy_with_progress<R: Read + ?Sized, W: Write + ?Sized>(
    reader: &mut R,
    writer: &mut W,
    mut progress: impl FnMut(u64),
) -> io::Result<u64> {
    let mut buf = vec![0u8; 4 << 20];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        writer.write_all(&buf[..n])?;
        total += n as u64;
        progress(total);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A source of exactly the planned size goes through whole, read by `read` or
    /// borrowed by `fill_buf`; one that ends early or goes on past the plan is
    /// an error saying which, never a shorter or longer file.
    #[test]
    fn a_source_must_hold_exactly_the_planned_bytes() {
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
        let mut whole = Vec::new();
        Exactly::new(&bytes[..], 10_000)
            .read_to_end(&mut whole)
            .unwrap();
        assert_eq!(whole, bytes);

        // Borrowed through a small buffer: every chunk within the plan.
        let mut borrowed = Vec::new();
        let mut reader = Exactly::new(io::BufReader::with_capacity(3000, &bytes[..]), 10_000);
        loop {
            let chunk = io::BufRead::fill_buf(&mut reader).unwrap();
            if chunk.is_empty() {
                break;
            }
            let n = chunk.len();
            borrowed.extend_from_slice(chunk);
            io::BufRead::consume(&mut reader, n);
        }
        assert_eq!(borrowed, bytes);

        let short = Exactly::new(&bytes[..9_000], 10_000)
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert_eq!(short.kind(), io::ErrorKind::UnexpectedEof);
        assert!(
            short.to_string().contains("after 9000 of the 10000 bytes"),
            "{short}"
        );
        let long = Exactly::new(&bytes[..], 9_999)
            .read_to_end(&mut Vec::new())
            .unwrap_err();
        assert_eq!(long.kind(), io::ErrorKind::InvalidData);
        assert!(
            long.to_string().contains("more than the 9999 bytes"),
            "{long}"
        );

        // The same through fill_buf: the planned bytes are lent, then the error.
        let mut reader = Exactly::new(&bytes[..], 9_999);
        assert_eq!(io::BufRead::fill_buf(&mut reader).unwrap().len(), 9_999);
        io::BufRead::consume(&mut reader, 9_999);
        let long = io::BufRead::fill_buf(&mut reader).unwrap_err();
        assert_eq!(long.kind(), io::ErrorKind::InvalidData);
        let mut reader = Exactly::new(&bytes[..5], 6);
        io::BufRead::consume(&mut reader, 5);
        let short = io::BufRead::fill_buf(&mut reader).unwrap_err();
        assert_eq!(short.kind(), io::ErrorKind::UnexpectedEof);
        // An empty file planned empty is fine.
        assert_eq!(Exactly::new(&[][..], 0).read(&mut [0u8; 4]).unwrap(), 0);
    }

    /// A reader a stick refuses direct reads from goes on through the page cache:
    /// the same open file, O_DIRECT cleared, reads any offset and length.
    #[test]
    fn a_direct_reader_can_go_on_through_the_cache() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("device");
        let bytes: Vec<u8> = (0..3 * DIRECT_ALIGN).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let mut reader = Reader {
            file: reopen_direct(&file, Access::Read)
                .expect("O_DIRECT on the build directory's file system"),
            direct: true,
        };
        let mut odd = [0u8; 10];
        let refused = reader.file.read_exact_at(&mut odd, 3).unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::EINVAL), "{refused}");
        reader.read_through_cache().unwrap();
        assert!(!reader.direct);
        reader.file.read_exact_at(&mut odd, 3).unwrap();
        assert_eq!(odd, bytes[3..13]);
        let mut buf = ReadBuffer::new();
        assert_eq!(buf.read(&reader, 5, 100).unwrap(), &bytes[5..105]);
    }

    /// A direct reader reads the aligned blocks that hold the bytes asked for, whatever
    /// their offset and length, up to a file end that is no multiple of the alignment.
    #[test]
    fn a_direct_read_returns_exactly_the_bytes_asked_for() {
        // Beside the sources: a disk file system with O_DIRECT (a tmpfs /tmp may not).
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("device");
        let len = 3 * DIRECT_ALIGN + 1000;
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let direct = reopen_direct(&file, Access::Read)
            .expect("O_DIRECT on the build directory's file system");
        let reader = Reader {
            file: direct,
            direct: true,
        };
        let mut buf = ReadBuffer::new();
        for (at, n) in [
            (0, len),
            (1, 10),
            (DIRECT_ALIGN - 3, 6),
            (DIRECT_ALIGN, DIRECT_ALIGN),
            (2 * DIRECT_ALIGN + 17, DIRECT_ALIGN + 983),
            (len - 1, 1),
        ] {
            let read = buf.read(&reader, at as u64, n).unwrap();
            assert_eq!(read, &bytes[at..at + n], "{at}+{n}");
        }
        assert!(buf.read(&reader, len as u64 - 1, 2).is_err());
    }

    #[test]
    fn window_reads_and_writes_only_inside() {
        let mut disk = Cursor::new(vec![0u8; 4096]);
        {
            let mut w = PartitionWindow::new(&mut disk, 1024, 2048);
            w.write_all(&[7u8; 2048]).unwrap();
            assert!(w.write_all(&[1u8]).is_err());
            w.flush().unwrap();
        }
        let bytes = disk.into_inner();
        assert!(bytes[..1024].iter().all(|&b| b == 0));
        assert!(bytes[1024..3072].iter().all(|&b| b == 7));
        assert!(bytes[3072..].iter().all(|&b| b == 0));
    }

    #[test]
    fn cached_prefix_and_coalesced_writes_round_trip() {
        let mut disk = Cursor::new(vec![0u8; 64 * 1024]);
        let mut w = PartitionWindow::new(&mut disk, 512, 60 * 1024);
        w.cache_prefix(4096).unwrap();
        w.seek(SeekFrom::Start(100)).unwrap();
        w.write_all(b"fat entry").unwrap();
        w.seek(SeekFrom::Start(8192)).unwrap();
        for i in 0..100u8 {
            w.write_all(&[i; 100]).unwrap();
        }
        // Reads see pending writes before they are flushed.
        let mut back = [0u8; 9];
        w.seek(SeekFrom::Start(100)).unwrap();
        w.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"fat entry");
        let mut data = vec![0u8; 10_000];
        w.seek(SeekFrom::Start(8192)).unwrap();
        w.read_exact(&mut data).unwrap();
        assert_eq!(data[9_999], 99);
        w.flush().unwrap();
        drop(w);
        let bytes = disk.into_inner();
        assert_eq!(&bytes[612..621], b"fat entry");
        assert_eq!(bytes[512 + 8192 + 150], 1);
    }

    /// A device that counts the reads it serves.
    struct CountedReads<'a> {
        inner: Cursor<&'a mut Vec<u8>>,
        reads: usize,
        bytes: usize,
        flushes: usize,
    }

    impl<'a> CountedReads<'a> {
        fn new(bytes: &'a mut Vec<u8>) -> Self {
            CountedReads {
                inner: Cursor::new(bytes),
                reads: 0,
                bytes: 0,
                flushes: 0,
            }
        }
    }

    impl Read for CountedReads<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.reads += 1;
            self.bytes += n;
            Ok(n)
        }
    }

    impl Write for CountedReads<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.inner.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.flushes += 1;
            Ok(())
        }
    }

    impl Seek for CountedReads<'_> {
        fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
            self.inner.seek(to)
        }
    }

    /// A move within the window, onto a range it overlaps in either direction and
    /// longer than one piece, leaves the bytes exactly as a memmove would, and a read
    /// buffered before it never serves the old bytes.
    #[test]
    fn a_move_within_the_window_is_a_memmove() {
        let bytes: Vec<u8> = (0..(6u32 << 20)).map(|i| (i * 31 % 251) as u8).collect();
        for (from, len, to) in [
            (4096u64, (3 << 20) + 5, 4096 + 33 * 512),
            (1 << 20, (2 << 20) + 17, 1000),
            (0, 100, 5 << 20),
        ] {
            let mut device = Cursor::new(bytes.clone());
            let mut window = PartitionWindow::new(&mut device, 512, (6 << 20) - 512);
            let mut before = [0u8; 16];
            window.seek(SeekFrom::Start(to)).unwrap();
            window.read_exact(&mut before).unwrap();
            window.copy_within(from, len, to).unwrap();
            let mut after = [0u8; 16];
            window.seek(SeekFrom::Start(to)).unwrap();
            window.read_exact(&mut after).unwrap();
            let mut expected = bytes.clone();
            let (f, t) = ((512 + from) as usize, (512 + to) as usize);
            expected.copy_within(f..f + len as usize, t);
            assert_eq!(after[..], expected[t..t + 16]);
            drop(window);
            assert!(device.get_ref() == &expected, "{from} {len} {to}");
        }
    }

    /// Held, the cached prefix's changed pages stay in the window through every
    /// flush (reads see them) and reach the device once, when let go; data past the
    /// prefix goes out as always.
    #[test]
    fn held_metadata_reaches_the_device_once_when_let_go() {
        let mut device = Cursor::new(vec![0x11u8; 64 << 10]);
        let mut window = PartitionWindow::new(&mut device, 0, 64 << 10);
        window.preload_prefix(vec![0u8; 16 << 10]).unwrap();
        window.flush().unwrap();
        window.hold_metadata(true);
        for value in [1u8, 2, 3] {
            window.seek(SeekFrom::Start(4096)).unwrap();
            window.write_all(&[value; 8]).unwrap();
            window.seek(SeekFrom::Start(32 << 10)).unwrap();
            window.write_all(&[value; 8]).unwrap();
            window.flush().unwrap();
            let mut back = [0u8; 8];
            window.seek(SeekFrom::Start(4096)).unwrap();
            window.read_exact(&mut back).unwrap();
            assert_eq!(back, [value; 8]);
        }
        let device_now = |w: &mut PartitionWindow<&mut Cursor<Vec<u8>>>, at: usize| {
            w.get_mut().get_ref()[at..at + 8].to_vec()
        };
        assert_eq!(
            device_now(&mut window, 4096),
            [0u8; 8],
            "written while held"
        );
        assert_eq!(device_now(&mut window, 32 << 10), [3u8; 8]);
        window.hold_metadata(false);
        window.flush().unwrap();
        assert_eq!(device_now(&mut window, 4096), [3u8; 8]);
        // Dropped by into_inner while held: still written.
        window.hold_metadata(true);
        window.seek(SeekFrom::Start(8192)).unwrap();
        window.write_all(&[9u8; 8]).unwrap();
        let device = window.into_inner().unwrap();
        assert_eq!(device.get_ref()[8192..8200], [9u8; 8]);
    }

    /// Held prefix pages are written, not dropped, when the prefix is replaced
    /// (another length cached, or a new one preloaded).
    #[test]
    fn held_metadata_is_written_before_its_prefix_is_replaced() {
        type Window<'a> = PartitionWindow<&'a mut Cursor<Vec<u8>>>;
        let replacements: [fn(&mut Window<'_>); 3] = [
            |w| w.cache_prefix(32 << 10).unwrap(),
            |w| w.preload_prefix(vec![0u8; 8 << 10]).unwrap(),
            |w| {
                w.preload_prefix_from(&mut &[0u8; 8 << 10][..], 8 << 10)
                    .unwrap()
            },
        ];
        for replace in replacements {
            let mut device = Cursor::new(vec![0x11u8; 64 << 10]);
            let mut window = PartitionWindow::new(&mut device, 0, 64 << 10);
            window.preload_prefix(vec![0u8; 16 << 10]).unwrap();
            window.hold_metadata(true);
            window.seek(SeekFrom::Start(4096)).unwrap();
            window.write_all(&[7u8; 8]).unwrap();
            replace(&mut window);
            let on_device = window.get_mut().get_ref()[4096..4104].to_vec();
            assert_eq!(on_device, [7u8; 8]);
        }
    }

    /// A read fills a run around the bytes it asks for; where that run meets bytes
    /// written through the window and still gathered (not yet on the device), it
    /// holds the written bytes, so a later read served from it is never older than
    /// the write.
    #[test]
    fn a_read_around_a_gathered_write_sees_the_write() {
        let mut device = Cursor::new(vec![0x11u8; 256 << 10]);
        let mut window = PartitionWindow::new(&mut device, 0, 256 << 10);
        window.seek(SeekFrom::Start(3086)).unwrap();
        window.write_all(&[0xAB, 0xCD]).unwrap();
        // Away from the write: the window reads 64 KiB around it from the device.
        let mut first = [0u8; 512];
        window.seek(SeekFrom::Start(0)).unwrap();
        window.read_exact(&mut first).unwrap();
        assert!(first.iter().all(|&b| b == 0x11));
        let mut later = [0u8; 4];
        window.seek(SeekFrom::Start(3085)).unwrap();
        window.read_exact(&mut later).unwrap();
        assert_eq!(later, [0x11, 0xAB, 0xCD, 0x11]);
        window.flush().unwrap();
        drop(window);
        assert_eq!(&device.get_ref()[3085..3089], &[0x11, 0xAB, 0xCD, 0x11]);
    }

    /// A buffer shared by several holders (a batch's targets) goes back to its pool
    /// when the last one lets go, on whatever thread, as it was: the next user
    /// need not fill it again to have the length it needs.
    #[test]
    fn a_shared_buffer_comes_back_from_its_last_holder_as_it_was() {
        let pool = BufferPool::new(1 << 20, 2);
        let mut buffer = pool.take();
        buffer.resize(1 << 20, 7);
        let address = buffer.as_ptr();
        let shared = std::sync::Arc::new(buffer);
        let holders: Vec<_> = (0..3).map(|_| std::sync::Arc::clone(&shared)).collect();
        drop(shared);
        let threads: Vec<_> = holders
            .into_iter()
            .map(|h| std::thread::spawn(move || drop(h)))
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let again = pool.take();
        assert_eq!(again.as_ptr(), address);
        assert_eq!(again.len(), 1 << 20);
        assert!(again.iter().all(|&b| b == 7));
        // New buffers have the room asked for; the pool keeps two idle at most.
        let taken: Vec<_> = (0..4).map(|_| pool.take()).collect();
        assert!(taken.iter().all(|b| b.capacity() >= 1 << 20));
        drop((again, taken));
        assert_eq!(pool.free.lock().unwrap().len(), 2);
    }

    #[test]
    fn pooled_write_buffers_are_used_again_aligned_and_hold_only_the_new_bytes() {
        let pool = BufferPool::new(POOLED_CAPACITY, POOL_KEEP);
        let first = vec![0xeeu8; WRITE_COALESCE];
        let at = 3 * 4096 + 512;
        let bytes = WriteBytes::copy_of(&first, at, &pool);
        let address = bytes.raw.as_ptr();
        drop(bytes);
        // A shorter write at another offset gets the same buffer back, laid out anew.
        let second: Vec<u8> = (0..(300 << 10)).map(|i| (i % 249) as u8).collect();
        let at = 7 * 4096 + 100;
        let bytes = WriteBytes::copy_of(&second, at, &pool);
        assert_eq!(bytes.raw.as_ptr(), address);
        assert!(*bytes == second[..]);
        let block = bytes.as_ptr() as usize + (4096 - 100);
        assert_eq!(block % DIRECT_ALIGN, 0, "device blocks start page-aligned");
        // Small and oversized writes are the allocator's: they never enter the pool.
        drop(WriteBytes::copy_of(&[1u8; 4096], 0, &pool));
        drop(WriteBytes::copy_of(&vec![2u8; POOLED_CAPACITY], 0, &pool));
        drop(bytes);
        assert_eq!(pool.free.lock().unwrap().len(), 1);
        // The pool keeps a few; the rest are freed.
        let many: Vec<_> = (0..POOL_KEEP + 3)
            .map(|_| WriteBytes::copy_of(&second, 0, &pool))
            .collect();
        drop(many);
        assert_eq!(pool.free.lock().unwrap().len(), POOL_KEEP);
    }

    #[test]
    fn directories_read_between_writes_are_read_from_the_device_once() {
        let mut bytes: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 253) as u8).collect();
        let original = bytes.clone();
        let mut dev = CountedReads::new(&mut bytes);
        let dirs = [40_960u64, 1 << 20, 5 << 20];
        {
            let mut w = PartitionWindow::new(&mut dev, 4096, (8 << 20) - 4096);
            for round in 0..20u8 {
                for (i, &dir) in dirs.iter().enumerate() {
                    // fatfs looks through the directory entry by entry ...
                    let mut entry = [0u8; 32];
                    for k in 0..=u64::from(round) {
                        w.seek(SeekFrom::Start(dir + 32 * k)).unwrap();
                        w.read_exact(&mut entry).unwrap();
                    }
                    // ... adds one, then writes a file's data elsewhere.
                    w.seek(SeekFrom::Start(dir + 32 * u64::from(round)))
                        .unwrap();
                    w.write_all(&[round; 32]).unwrap();
                    w.seek(SeekFrom::Start(
                        (6 << 20) + u64::from(round) * 3 * 4096 + i as u64 * 4096,
                    ))
                    .unwrap();
                    w.write_all(&[0xee; 4096]).unwrap();
                    // What was written is what is read, before and after a flush.
                    w.seek(SeekFrom::Start(dir + 32 * u64::from(round)))
                        .unwrap();
                    w.read_exact(&mut entry).unwrap();
                    assert_eq!(entry, [round; 32]);
                }
                if round % 5 == 4 {
                    w.flush().unwrap();
                }
            }
            w.flush().unwrap();
        }
        // One read around each directory, not one per visit.
        assert_eq!(dev.reads, dirs.len(), "{} bytes", dev.bytes);
        assert_eq!(dev.bytes, dirs.len() * READ_AROUND);
        for (i, &dir) in dirs.iter().enumerate() {
            let at = (4096 + dir) as usize;
            for round in 0..20usize {
                assert!(
                    bytes[at + 32 * round..at + 32 * round + 32]
                        .iter()
                        .all(|&b| b == round as u8)
                );
            }
            let data = 4096 + (6 << 20) + i * 4096;
            assert!(bytes[data..data + 4096].iter().all(|&b| b == 0xee));
        }
        assert_eq!(bytes[..4096], original[..4096]);
    }

    #[test]
    fn a_held_flush_writes_everything_but_leaves_the_device_unflushed() {
        let mut bytes = vec![0u8; 1 << 20];
        let mut dev = CountedReads::new(&mut bytes);
        {
            let mut w = PartitionWindow::new(&mut dev, 4096, (1 << 20) - 4096);
            w.hold_device_flush(true);
            w.cache_prefix(8192).unwrap();
            w.write_all(b"fat").unwrap();
            w.seek(SeekFrom::Start(65536)).unwrap();
            w.write_all(b"file").unwrap();
            w.flush().unwrap();
            assert_eq!(w.get_mut().flushes, 0);
            assert_eq!(&w.get_mut().inner.get_ref()[4096..4099], b"fat");
            assert_eq!(
                &w.get_mut().inner.get_ref()[4096 + 65536..4096 + 65540],
                b"file"
            );
            w.hold_device_flush(false);
            w.flush().unwrap();
            assert_eq!(w.get_mut().flushes, 1);
            w.hold_device_flush(true);
            w.into_inner().unwrap();
        }
        assert_eq!(dev.flushes, 2);
    }

    #[test]
    fn a_stream_of_small_reads_reads_ahead_in_large_pieces() {
        let mut bytes: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
        let expect = bytes[512..].to_vec();
        let mut dev = CountedReads::new(&mut bytes);
        let mut w = PartitionWindow::new(&mut dev, 512, (8 << 20) - 512);
        let mut all = Vec::new();
        let mut cluster = vec![0u8; 32 << 10];
        loop {
            let n = w.read(&mut cluster).unwrap();
            if n == 0 {
                break;
            }
            all.extend_from_slice(&cluster[..n]);
        }
        assert_eq!(all, expect);
        drop(w);
        // The first read reads around its block; the stream goes on a MiB at a time.
        assert!(
            dev.reads <= 2 + (8 << 20) / READ_AHEAD,
            "{} reads",
            dev.reads
        );
    }

    #[test]
    fn range_set_merges_and_subtracts() {
        let mut set: RangeSet = [10..20, 30..40, 20..25].into_iter().collect();
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![10..25, 30..40]);
        set.insert(5..31);
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![5..40]);
        assert_eq!(set.total(), 35);
        let holes: RangeSet = [0..6, 10..12, 39..50].into_iter().collect();
        let left = set.difference(&holes);
        assert_eq!(left.iter().collect::<Vec<_>>(), vec![6..10, 12..39]);
        assert_eq!(set.intersection(&holes).total(), 1 + 2 + 1);
        assert!(RangeSet::new().difference(&holes).is_empty());
    }

    #[test]
    fn recorder_remembers_what_was_written() {
        let mut disk = Cursor::new(vec![0u8; 1000]);
        let mut rec = WriteRecorder::new(&mut disk).unwrap();
        rec.seek(SeekFrom::Start(100)).unwrap();
        rec.write_all(&[1; 50]).unwrap();
        let mut b = [0u8; 10];
        rec.read_exact(&mut b).unwrap();
        rec.write_all(&[2; 5]).unwrap();
        rec.seek(SeekFrom::Start(150)).unwrap();
        rec.write_all(&[3; 10]).unwrap();
        assert_eq!(rec.written().iter().collect::<Vec<_>>(), vec![100..165]);
        assert_eq!(rec.written().total(), 65);
    }

    #[test]
    fn overlapped_hashing_matches_a_plain_sha256() {
        use sha2::{Digest, Sha256};
        let data: Vec<u8> = (0..(9 << 20) + 123).map(|i| (i * 7 % 251) as u8).collect();
        let mut src = &data[..];
        let mut copy = Vec::new();
        let (digest, n) = hash_while(
            Sha256Hash::default(),
            // A hint far below the length: the stream is read whole all the same.
            1000,
            |buf| read_full(&mut src, buf),
            |chunk| {
                copy.extend_from_slice(chunk);
                Ok(())
            },
        )
        .unwrap();
        let want: [u8; 32] = Sha256::digest(&data).into();
        assert_eq!((digest, n), (want, data.len() as u64));
        assert!(copy == data);
        // Ranges: pieces of the same data, across chunk boundaries.
        let ranges = [10..(5 << 20), (5 << 20)..(6 << 20), (7 << 20)..(9 << 20)];
        let mut cursor = Cursor::new(&data);
        let got = hash_ranges(Sha256Hash::default(), &mut cursor, ranges.clone(), |_| {}).unwrap();
        let mut h = Sha256::new();
        let mut x = xxhash_rust::xxh3::Xxh3::new();
        for r in ranges.clone() {
            h.update(&data[r.start as usize..r.end as usize]);
            x.update(&data[r.start as usize..r.end as usize]);
        }
        assert_eq!(got, <[u8; 32]>::from(h.finalize()));
        assert_eq!(
            check_ranges(&mut cursor, ranges, |_| {}).unwrap(),
            x.digest()
        );
    }

    fn verifying_write(limit: u64, corrupt: Option<(Range<u64>, u64)>) -> (ReadBack, Vec<u8>) {
        let mut file = tempfile::tempfile().unwrap();
        // Stale bytes that differ from everything written below.
        file.write_all(&vec![0xa5u8; 40 << 20]).unwrap();
        file.seek(SeekFrom::Start(0)).unwrap();
        let read_back = {
            let mut dirty = BoundedDirty::verifying(&mut file, limit).unwrap();
            if let Some((within, min_len)) = corrupt {
                dirty
                    .corrupter()
                    .unwrap()
                    .corrupt_next_write(within, min_len)
                    .unwrap();
            }
            // Large data writes, several batches of them.
            for i in 0..24u8 {
                dirty.seek(SeekFrom::Start(u64::from(i) << 20)).unwrap();
                dirty.write_all(&vec![i; 1 << 20]).unwrap();
            }
            // Small metadata writes rewritten within a batch and across batches.
            for round in 0..3u8 {
                for page in 0..8u64 {
                    dirty
                        .seek(SeekFrom::Start((30 << 20) + page * 4096 + 7))
                        .unwrap();
                    dirty.write_all(&[round + 100; 300]).unwrap();
                }
            }
            // A large write rewritten before its batch was read back.
            dirty.seek(SeekFrom::Start(32 << 20)).unwrap();
            dirty.write_all(&vec![1u8; 2 << 20]).unwrap();
            dirty.seek(SeekFrom::Start((32 << 20) + 4096)).unwrap();
            dirty.write_all(&[2u8; 100]).unwrap();
            // And one rewritten after several batches.
            dirty.seek(SeekFrom::Start(5 << 20)).unwrap();
            dirty.write_all(&vec![9u8; 70_000]).unwrap();
            // A last small write, kept as bytes.
            dirty.seek(SeekFrom::Start(36 << 20)).unwrap();
            dirty.write_all(&[77u8; 500]).unwrap();
            dirty.finish_read_back().unwrap().unwrap()
        };
        let mut all = Vec::new();
        file.seek(SeekFrom::Start(0)).unwrap();
        file.read_to_end(&mut all).unwrap();
        (read_back, all)
    }

    /// A stick's writes (a limit) on a file system with O_DIRECT: whole blocks go
    /// past the page cache, partial ones through it, and the file and the read-back
    /// see every byte in its last content.
    #[test]
    fn a_stick_write_mixes_direct_and_cached_writes() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("stick");
        std::fs::write(&path, vec![0xa5u8; 12 << 20]).unwrap();
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        assert!(
            reopen_direct(&file, Access::Write).is_some(),
            "O_DIRECT on the build directory"
        );
        let mut expect = vec![0xa5u8; 12 << 20];
        let writes: Vec<(u64, Vec<u8>)> = vec![
            (0, vec![1; 3 << 20]),
            (4096 * 3 + 100, vec![2; 50_000]),
            ((4 << 20) + 17, vec![3; (2 << 20) + 5000]),
            (8 << 20, vec![4; 4096]),
            ((8 << 20) + 4096 * 2, vec![5; 100]),
            ((8 << 20) + 4096 * 2 + 50, vec![6; 8192]),
            ((1 << 20) + 5, vec![7; 10]),
            ((10 << 20) - 3, vec![8; 6]),
        ];
        let read_back = {
            let mut dirty = BoundedDirty::verifying(&mut file, 1 << 20).unwrap();
            for (at, bytes) in &writes {
                dirty.seek(SeekFrom::Start(*at)).unwrap();
                dirty.write_all(bytes).unwrap();
                expect[*at as usize..*at as usize + bytes.len()].copy_from_slice(bytes);
            }
            dirty.finish_read_back().unwrap().unwrap()
        };
        assert!(read_back.mismatch.is_none(), "{:?}", read_back.mismatch);
        let written: RangeSet = writes
            .iter()
            .map(|(at, b)| *at..*at + b.len() as u64)
            .collect();
        assert_eq!(read_back.verified.total(), written.total());
        assert!(
            std::fs::read(&path).unwrap() == expect,
            "the file holds the last writes"
        );
    }

    fn written_ranges() -> RangeSet {
        let mut set: RangeSet = [
            0..24 << 20,
            (32 << 20)..(34 << 20),
            (36 << 20)..(36 << 20) + 500,
        ]
        .into_iter()
        .collect();
        for page in 0..8u64 {
            set.insert((30 << 20) + page * 4096 + 7..(30 << 20) + page * 4096 + 307);
        }
        set
    }

    #[test]
    fn a_cached_prefix_holds_only_its_non_zero_pages() {
        let mut dev = MemDevice::new(32 << 20);
        dev.seek(SeekFrom::Start(4096 + 100)).unwrap();
        dev.write_all(b"old FAT entry").unwrap();
        let mut w = PartitionWindow::new(&mut dev, 4096, 24 << 20);
        w.cache_prefix(16 << 20).unwrap();
        assert_eq!(w.meta.pages.len(), 1, "one page holds a byte");
        w.seek(SeekFrom::Start((8 << 20) + 4090)).unwrap();
        w.write_all(&[0xAB; 12]).unwrap();
        w.seek(SeekFrom::Start(9 << 20)).unwrap();
        w.write_all(&[0; 4096]).unwrap();
        assert_eq!(w.meta.pages.len(), 3, "zeros over zeros take no page");
        let mut back = vec![0u8; 20];
        w.seek(SeekFrom::Start((8 << 20) + 4086)).unwrap();
        w.read_exact(&mut back).unwrap();
        assert_eq!(back[..4], [0; 4]);
        assert_eq!(back[4..16], [0xAB; 12]);
        w.seek(SeekFrom::Start(100)).unwrap();
        let mut old = [0u8; 13];
        w.read_exact(&mut old).unwrap();
        assert_eq!(&old, b"old FAT entry");
        w.flush().unwrap();
        drop(w);
        let mut on_dev = vec![0u8; 12];
        dev.seek(SeekFrom::Start(4096 + (8 << 20) + 4090)).unwrap();
        dev.read_exact(&mut on_dev).unwrap();
        assert_eq!(on_dev, [0xAB; 12]);

        // A preloaded (formatted) prefix is written whole, zeros included, at the
        // first flush, from the few pages it holds.
        let mut dev = MemDevice::new(8 << 20);
        dev.write_all(&vec![0x55; 8 << 20]).unwrap();
        let mut w = PartitionWindow::new(&mut dev, 0, 8 << 20);
        let mut fat = vec![0u8; 4 << 20];
        fat[8..12].copy_from_slice(&[0xF8, 0xFF, 0xFF, 0x0F]);
        w.preload_prefix(fat.clone()).unwrap();
        assert_eq!(w.meta.pages.len(), 1);
        w.flush().unwrap();
        drop(w);
        let mut on_dev = vec![0u8; 4 << 20];
        dev.seek(SeekFrom::Start(0)).unwrap();
        dev.read_exact(&mut on_dev).unwrap();
        assert!(on_dev == fat, "stale bytes under the FAT are overwritten");
    }

    #[test]
    fn verifying_writer_reads_back_every_byte_in_its_final_content() {
        for limit in [0, 3 << 20] {
            let (read_back, all) = verifying_write(limit, None);
            assert_eq!(read_back.mismatch, None, "limit {limit}");
            assert_eq!(read_back.verified, written_ranges(), "limit {limit}");
            assert!(all[(5 << 20)..(5 << 20) + 70_000].iter().all(|&b| b == 9));
            assert_eq!(all[(6 << 20) - 1], 5);
            assert_eq!(all[(30 << 20) + 7], 102);
            assert_eq!(all[(32 << 20) + 4096], 2);
            assert_eq!(all[(24 << 20) + 5], 0xa5);
        }
    }

    #[test]
    fn verifying_writer_reports_a_byte_corrupted_after_its_write() {
        for limit in [0, 3 << 20] {
            // A large data write and a small one.
            for (within, min_len, value) in [
                ((10 << 20) + 5..(11 << 20), 1 << 20, 10u8),
                ((36 << 20)..(36 << 20) + 8, 1, 77),
            ] {
                let (read_back, all) = verifying_write(limit, Some((within.clone(), min_len)));
                let bad = read_back.mismatch.expect("the corruption is found");
                assert!(
                    bad.range.start < within.end && within.start < bad.range.end,
                    "{bad:?} {within:?}"
                );
                assert_ne!(bad.expected, bad.actual);
                assert!(!read_back.verified.overlaps(&bad.range));
                let lo = within.start.max(bad.range.start);
                let hi = within.end.min(bad.range.end);
                assert_eq!(all[(lo + (hi - lo) / 2) as usize], value ^ 0xff);
            }
        }
    }

    #[test]
    fn range_set_removes_and_finds_overlaps() {
        let mut set: RangeSet = [10..20, 30..40].into_iter().collect();
        assert!(set.overlaps(&(19..25)));
        assert!(!set.overlaps(&(20..30)));
        set.remove(15..35);
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![10..15, 35..40]);
        set.remove(0..100);
        assert!(set.is_empty());
    }

    #[test]
    fn bounded_dirty_writes_through_its_thread_and_reads_them_back() {
        let mut file = tempfile::tempfile().unwrap();
        file.set_len(32 << 20).unwrap();
        {
            let mut dirty = BoundedDirty::new(&mut file, 1 << 20);
            for i in 0..20u8 {
                dirty.seek(SeekFrom::Start(u64::from(i) << 20)).unwrap();
                dirty.write_all(&vec![i; 1 << 20]).unwrap();
            }
            // A read sees the writes still queued.
            let mut back = vec![0u8; 4096];
            dirty.seek(SeekFrom::Start((19 << 20) + 5)).unwrap();
            dirty.read_exact(&mut back).unwrap();
            assert!(back.iter().all(|&b| b == 19));
            assert_eq!(dirty.stream_position().unwrap(), (19 << 20) + 5 + 4096);
            dirty.flush().unwrap();
        }
        let mut all = Vec::new();
        file.seek(SeekFrom::Start(0)).unwrap();
        file.read_to_end(&mut all).unwrap();
        for i in 0..20usize {
            assert!(all[i << 20..(i + 1) << 20].iter().all(|&b| b == i as u8));
        }
    }

    /// A write lost on the target is found by the next sync, after later steps wrote;
    /// the failure names the step that wrote the lost range (found by reading the
    /// batch back), and without a read-back every step since the last sync.
    #[test]
    fn a_failure_found_at_a_sync_is_named_after_the_step_that_wrote_there() {
        for verifying in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.path().join("target"))
                .unwrap();
            file.set_len(4 << 20).unwrap();
            let mut dirty = if verifying {
                BoundedDirty::verifying(&mut file, 8 << 20).unwrap()
            } else {
                BoundedDirty::new(&mut file, 8 << 20)
            };
            let tags = StepTags::default();
            dirty.tag_steps(tags.clone()).unwrap();
            dirty
                .corrupter()
                .unwrap()
                .fail_writes(70_000..70_001)
                .unwrap();
            for (step, at) in [("writing A", 0u64), ("writing B", 1 << 20)] {
                tags.set(step);
                dirty.seek(SeekFrom::Start(at)).unwrap();
                dirty.write_all(&[7u8; 100_000]).unwrap();
            }
            tags.set("writing C");
            assert!(dirty.flush().is_ok(), "nothing synced yet");
            assert!(tags.failure().is_none());
            // The sync that ends the batch finds it, after B was written.
            let err = if verifying {
                dirty.finish_read_back().unwrap_err()
            } else {
                dirty.write_all(&[1u8; 8 << 20]).unwrap();
                dirty.flush().unwrap_err()
            };
            assert!(err.to_string().contains("Input/output error"), "{err}");
            let failure = tags.failure().expect("the failure is recorded");
            assert!(failure.found_when_syncing);
            let expected: &[&str] = if verifying {
                &["writing A"]
            } else {
                &["writing A", "writing B", "writing C"]
            };
            assert_eq!(failure.steps, expected, "{failure:?}");
        }
    }
}
