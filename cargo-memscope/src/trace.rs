//! Reading one trace file: validation, a chunk index, and the merged event stream.
//!
//! [`Trace::open`] checks the file header and builds an index of chunk headers by
//! seeking from chunk to chunk. Payloads are read once through a reusable buffer to
//! verify their checksums and are not kept: the index holds only offsets. The first
//! chunk with a bad header, a short payload or a bad checksum ends the readable part of
//! the file (a killed process leaves such a tail); the trace is then incomplete, as it
//! is when its meta stream has no `End` record.
//!
//! [`Trace::events`] is a streaming k-way merge (a binary heap holding the head event
//! of each thread's stream) of the per-thread streams by timestamp. Each stream is
//! already ordered and holds one chunk in memory at a time, so memory grows with the
//! number of threads, never with the number of events. A `Realloc` record becomes two
//! events: [`EventKind::ReallocFree`] at `ts_before`, when the old address stops being
//! live, and [`EventKind::ReallocAlloc`] at `ts_after`, when the new block appears; an
//! address freed on one thread and reused on another is therefore always seen free
//! first. On equal timestamps frees go before allocations.

use std::cmp::Reverse;
use std::collections::binary_heap::PeekMut;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use memscope::format::{
    self, Brief, ChunkHeader, FileHeader, FormatError, Reach, Record, ScanSummary, StreamDecoder,
    CHUNK_HEADER_LEN, FILE_HEADER_LEN, META_THREAD,
};
use rustc_hash::FxHashMap;

/// Why a trace file cannot be read at all. (A file that is merely cut short is read up
/// to its last complete chunk instead.)
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{}: cannot read the trace: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: {source}", path.display())]
    Format { path: PathBuf, source: FormatError },
}

/// One allocation event of the merged stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// Raw clock ticks; see [`crate::replay::Clock`].
    pub ts: u64,
    /// The stream (thread) that recorded the event.
    pub thread: u32,
    /// Caused by memscope itself (frees carry no flag: they follow their block).
    pub internal: bool,
    pub kind: EventKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Alloc {
        addr: u64,
        size: u64,
        zeroed: bool,
        stack: u64,
    },
    /// A free; its size is the size of the block it frees.
    Free { addr: u64 },
    /// First half of a `Realloc`: `addr` (the old block) stops being live.
    ReallocFree { addr: u64 },
    /// Second half of a `Realloc`: the block now lives at `addr` with `size` bytes.
    ReallocAlloc {
        old_addr: u64,
        addr: u64,
        size: u64,
        stack: u64,
    },
    /// An instrumentation event, in the thread's order among its allocations (see
    /// `crate::instrument`); not an allocation event.
    Mark(Mark),
}

/// Instrumentation events; the names they refer to are in [`Tables::names`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    Enter {
        id: u64,
    },
    Exit {
        id: u64,
    },
    /// One block of an `OWNS` record.
    Owns {
        var: u64,
        block: memscope::format::OwnedBlock,
    },
    TaskStart {
        id: u64,
        site: u64,
    },
    TaskEnd {
        id: u64,
        state: u8,
    },
}

/// The order in which the merge hands out the streams' head events: by stamp, frees
/// before allocations with the same stamp, then by stream (`i`). One integer, so that
/// the heap compares keys without branching on each part.
fn merge_key(e: &Event, i: usize) -> u128 {
    (u128::from(e.ts) << 64) | (u128::from(e.kind.rank()) << 32) | i as u128
}

impl EventKind {
    /// Frees sort before allocations stamped with the same tick.
    pub(crate) fn rank(&self) -> u8 {
        match self {
            EventKind::Free { .. } | EventKind::ReallocFree { .. } => 0,
            EventKind::Alloc { .. } | EventKind::ReallocAlloc { .. } | EventKind::Mark(_) => 1,
        }
    }
}

/// A `Clock` record: the same instant on the tick clock and two nanosecond clocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockSample {
    pub ts: u64,
    pub monotonic_ns: u64,
    pub unix_ns: u64,
}

/// A `Module` record: a loaded object and where it sits in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    pub path: String,
    pub bias: u64,
    pub start: u64,
    pub end: u64,
}

/// The `End` record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct End {
    pub reason: u8,
    pub ts: u64,
    pub dropped: u64,
}

/// The process-wide records of the meta stream.
#[derive(Clone, Debug, Default)]
pub struct Meta {
    pub clocks: Vec<ClockSample>,
    pub modules: Vec<Module>,
    pub end: Option<End>,
    /// What the exit-time scan read, if it ran.
    pub scan: Option<ScanSummary>,
    /// What the exit-time scan found, by block address.
    pub reach: FxHashMap<u64, Reach>,
}

impl Meta {
    /// Keeps what the records of one chunk of the meta stream say, decoding them with
    /// the stream's `decoder`.
    pub(crate) fn read_chunk(
        &mut self,
        decoder: &mut StreamDecoder,
        payload: &[u8],
    ) -> Result<(), FormatError> {
        let mut pos = 0;
        while pos < payload.len() {
            let (record, next) = decoder.decode(payload, pos)?;
            pos = next;
            if let Some(record) = record {
                self.take(record);
            }
        }
        Ok(())
    }

    /// Keeps what a record of the meta stream says.
    fn take(&mut self, record: Record) {
        match record {
            Record::Clock {
                ts,
                monotonic_ns,
                unix_ns,
            } => self.clocks.push(ClockSample {
                ts,
                monotonic_ns,
                unix_ns,
            }),
            Record::Module {
                bias,
                start,
                end,
                path,
            } => self.modules.push(Module {
                path,
                bias,
                start,
                end,
            }),
            Record::End {
                reason,
                ts,
                dropped,
            } => {
                self.end = Some(End {
                    reason,
                    ts,
                    dropped,
                })
            }
            Record::Scan(scan) => self.scan = Some(scan),
            Record::Reach { reach, addrs } => {
                self.reach.extend(addrs.into_iter().map(|a| (a, reach)))
            }
            _ => {}
        }
    }
}

/// What a thread said about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ThreadInfo {
    pub name: Option<String>,
    pub os_tid: Option<u64>,
}

/// Records that describe events rather than being events: filled in while streaming.
#[derive(Debug, Default)]
pub struct Tables {
    /// Stack hash → return addresses, innermost first.
    pub stacks: FxHashMap<u64, Box<[u64]>>,
    pub threads: FxHashMap<u32, ThreadInfo>,
    /// Names from instrumentation records.
    pub names: crate::instrument::Names,
}

/// Where a chunk's payload is.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ChunkRef {
    pub offset: u64,
    pub len: u32,
}

/// An opened, indexed trace file.
#[derive(Debug)]
pub struct Trace {
    path: PathBuf,
    file: File,
    pub header: FileHeader,
    /// Size of the file in bytes.
    pub file_len: u64,
    /// Per thread (not the meta stream): its chunks in order, up to the first gap.
    streams: Vec<(u32, Vec<ChunkRef>)>,
    pub meta: Meta,
    /// Why the trace is not whole, one sentence each; empty for a whole trace.
    pub damage: Vec<String>,
}

impl Trace {
    /// Opens a trace, checks its header, indexes its chunks and reads its meta stream.
    pub fn open(path: &Path) -> Result<Trace, TraceError> {
        let io_err = |source| TraceError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let file_len = file.metadata().map_err(io_err)?.len();
        let mut head = [0u8; FILE_HEADER_LEN];
        let got = read_at_most(&file, 0, &mut head).map_err(io_err)?;
        let header = FileHeader::decode(&head[..got]).map_err(|source| TraceError::Format {
            path: path.to_owned(),
            source,
        })?;
        let mut trace = Trace {
            path: path.to_owned(),
            file,
            header,
            file_len,
            streams: Vec::new(),
            meta: Meta::default(),
            damage: Vec::new(),
        };
        trace.index().map_err(io_err)?;
        trace.read_meta().map_err(io_err)?;
        if trace.meta.end.is_none() {
            trace
                .damage
                .push("the trace has no end record: the process did not finish writing it".into());
        }
        Ok(trace)
    }

    /// A trace that was followed to its end while it was written (see `follow.rs`):
    /// whole, its events already read.
    pub(crate) fn followed(
        path: PathBuf,
        file: File,
        header: FileHeader,
        file_len: u64,
        meta: Meta,
    ) -> Trace {
        Trace {
            path,
            file,
            header,
            file_len,
            streams: Vec::new(),
            meta,
            damage: Vec::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Walks the chunk headers, keeping the longest valid copy of each chunk.
    fn index(&mut self) -> io::Result<()> {
        let mut copies: FxHashMap<(u32, u32), ChunkRef> = FxHashMap::default();
        let mut window = Window::default();
        let mut pos = FILE_HEADER_LEN as u64;
        while pos < self.file_len {
            let (header, chunk) = match window.chunk(&self.file, pos, self.file_len)? {
                ChunkAt::Whole(header, chunk) => (header, chunk),
                ChunkAt::EndsInHeader => {
                    self.damage
                        .push(format!("the file ends inside a chunk header at byte {pos}"));
                    break;
                }
                ChunkAt::Corrupt => {
                    self.damage.push(format!(
                        "corrupt chunk header at byte {pos}; the rest of the file is ignored"
                    ));
                    break;
                }
                ChunkAt::EndsInChunk => {
                    self.damage
                        .push(format!("the file ends inside the chunk at byte {pos}"));
                    break;
                }
                ChunkAt::BadChecksum => {
                    self.damage.push(format!(
                        "checksum mismatch in the chunk at byte {pos}; the rest of the file is ignored"
                    ));
                    break;
                }
            };
            let slot = copies.entry((header.thread, header.index)).or_insert(chunk);
            if chunk.len >= slot.len {
                *slot = chunk;
            }
            pos = chunk.offset + u64::from(chunk.len);
        }

        let mut by_thread: FxHashMap<u32, Vec<(u32, ChunkRef)>> = FxHashMap::default();
        for ((thread, index), chunk) in copies {
            by_thread.entry(thread).or_default().push((index, chunk));
        }
        let mut threads: Vec<_> = by_thread.into_iter().collect();
        threads.sort_unstable_by_key(|(thread, _)| *thread);
        for (thread, mut chunks) in threads {
            chunks.sort_unstable_by_key(|(index, _)| *index);
            let contiguous = chunks
                .iter()
                .enumerate()
                .take_while(|(i, (index, _))| *i as u32 == *index)
                .count();
            if contiguous < chunks.len() {
                self.damage.push(format!(
                    "thread {thread}: chunk {contiguous} is missing; its later chunks are ignored"
                ));
            }
            let chunks = chunks
                .into_iter()
                .take(contiguous)
                .map(|(_, c)| c)
                .collect();
            self.streams.push((thread, chunks));
        }
        Ok(())
    }

    /// Reads the whole meta stream (clocks, modules, end): it is small.
    fn read_meta(&mut self) -> io::Result<()> {
        let Some(at) = self.streams.iter().position(|(t, _)| *t == META_THREAD) else {
            return Ok(());
        };
        let (_, chunks) = self.streams.remove(at);
        let mut payload = Vec::new();
        let mut decoder = StreamDecoder::new(self.header.version);
        for chunk in chunks {
            payload.resize(chunk.len as usize, 0);
            read_exact_at(&self.file, chunk.offset, &mut payload)?;
            if let Err(e) = self.meta.read_chunk(&mut decoder, &payload) {
                self.damage
                    .push(format!("meta stream: {e}; its later records are ignored"));
                return Ok(());
            }
        }
        Ok(())
    }

    /// Total payload bytes of the thread streams: the unit of [`Events`] progress.
    pub fn event_bytes(&self) -> u64 {
        self.streams
            .iter()
            .flat_map(|(_, c)| c)
            .map(|c| u64::from(c.len))
            .sum()
    }

    /// The merged stream of allocation events. Can be called again for another pass.
    pub fn events(&self) -> Events<'_> {
        let mut events = Events {
            trace: self,
            streams: self
                .streams
                .iter()
                .map(|(thread, chunks)| Stream {
                    thread: *thread,
                    chunks,
                    next_chunk: 0,
                    buf: Vec::new(),
                    pos: 0,
                    decoder: StreamDecoder::new(self.header.version),
                    ahead: Vec::with_capacity(AHEAD),
                    next: 0,
                })
                .collect(),
            heap: BinaryHeap::new(),
            tables: Tables::default(),
            damage: Vec::new(),
            bytes_read: 0,
            progress: None,
        };
        for i in 0..events.streams.len() {
            events.refill(i);
        }
        events
    }
}

/// A merged event stream in time order, and the tables its records fill in.
pub trait EventSource: Iterator<Item = Event> {
    /// The tables so far: they hold every stack that the events handed out refer to.
    fn tables(&self) -> &Tables;
}

impl EventSource for Events<'_> {
    fn tables(&self) -> &Tables {
        &self.tables
    }
}

/// The merged event stream of one trace; an iterator of [`Event`]s in time order.
pub struct Events<'t> {
    trace: &'t Trace,
    streams: Vec<Stream<'t>>,
    /// The [`merge_key`] of each stream's head event.
    heap: BinaryHeap<Reverse<u128>>,
    tables: Tables,
    damage: Vec<String>,
    bytes_read: u64,
    progress: Option<Box<dyn FnMut(u64) + 't>>,
}

struct Stream<'t> {
    thread: u32,
    chunks: &'t [ChunkRef],
    next_chunk: usize,
    buf: Vec<u8>,
    pos: usize,
    decoder: StreamDecoder,
    /// The stream's next events, decoded ahead: `ahead[next]` is its head.
    ahead: Vec<Event>,
    next: usize,
}

/// How many events a stream decodes at a time: a tight loop per stream instead of a
/// call through the merge per event, and a bounded amount of memory per thread.
pub(crate) const AHEAD: usize = 256;

impl<'t> Events<'t> {
    /// Calls `f` with the number of payload bytes read so far, once per chunk.
    pub fn on_progress(mut self, f: impl FnMut(u64) + 't) -> Self {
        self.progress = Some(Box::new(f));
        self
    }

    /// Ends the stream: the tables and what went wrong while decoding.
    pub fn finish(self) -> (Tables, Vec<String>) {
        (self.tables, self.damage)
    }

    /// Decodes stream `i`'s next events (see [`AHEAD`]) and pushes its head onto
    /// the heap; the stream leaves the heap when it has none.
    fn refill(&mut self, i: usize) {
        self.decode_ahead(i);
        if let Some(e) = self.streams[i].ahead.first() {
            self.heap.push(Reverse(merge_key(e, i)));
        }
    }

    /// Replaces stream `i`'s events decoded ahead with its next ones (none at its end).
    fn decode_ahead(&mut self, i: usize) {
        let stream = &mut self.streams[i];
        stream.ahead.clear();
        stream.next = 0;
        while stream.ahead.len() < AHEAD {
            if stream.pos >= stream.buf.len() {
                let Some(&chunk) = stream.chunks.get(stream.next_chunk) else {
                    break;
                };
                stream.next_chunk += 1;
                stream.buf.resize(chunk.len as usize, 0);
                stream.pos = 0;
                if let Err(e) = read_exact_at(&self.trace.file, chunk.offset, &mut stream.buf) {
                    self.damage.push(format!("thread {}: {e}", stream.thread));
                    stream.next_chunk = stream.chunks.len();
                    stream.buf.clear();
                    break;
                }
                self.bytes_read += u64::from(chunk.len);
                if let Some(progress) = &mut self.progress {
                    progress(self.bytes_read);
                }
                continue;
            }
            match decode_record(
                &mut stream.decoder,
                &stream.buf,
                stream.pos,
                stream.thread,
                &mut self.tables,
                &mut stream.ahead,
            ) {
                Ok(next) => stream.pos = next,
                Err(e) => {
                    self.damage.push(format!(
                        "thread {}: {e}; its later records are ignored",
                        stream.thread
                    ));
                    stream.next_chunk = stream.chunks.len();
                    stream.buf.clear();
                    stream.pos = 0;
                    break;
                }
            }
        }
    }
}

/// Decodes the record at `pos` of one of `thread`'s chunks, `buf`: its events go to
/// `out`, what it describes to `tables`. Returns where the next record starts.
#[inline]
pub(crate) fn decode_record(
    decoder: &mut StreamDecoder,
    buf: &[u8],
    pos: usize,
    thread: u32,
    tables: &mut Tables,
    out: &mut Vec<Event>,
) -> Result<usize, FormatError> {
    // Most records are one-word allocations and frees: no `Record` for them.
    if let Some((brief, next)) = decoder.decode_brief(buf, pos) {
        let (ts, kind) = match brief {
            Brief::Alloc {
                ts,
                addr,
                size,
                stack,
                ..
            } => (
                ts,
                EventKind::Alloc {
                    addr,
                    size,
                    zeroed: false,
                    stack,
                },
            ),
            Brief::Free { ts, addr } => (ts, EventKind::Free { addr }),
        };
        out.push(Event {
            ts,
            thread,
            internal: false,
            kind,
        });
        return Ok(next);
    }
    let (record, next) = match decoder.decode(buf, pos)? {
        (Some(record), next) => (record, next),
        (None, next) => return Ok(next),
    };
    let event = |ts, internal, kind| Event {
        ts,
        thread,
        internal,
        kind,
    };
    match record {
        Record::Alloc {
            internal,
            zeroed,
            ts,
            addr,
            size,
            stack,
            ..
        } => out.push(event(
            ts,
            internal,
            EventKind::Alloc {
                addr,
                size,
                zeroed,
                stack,
            },
        )),
        Record::Free { ts, addr } => out.push(event(ts, false, EventKind::Free { addr })),
        Record::Realloc {
            internal,
            ts_before,
            ts_after,
            old_addr,
            new_addr,
            new_size,
            stack,
            ..
        } => {
            out.push(event(
                ts_before,
                internal,
                EventKind::ReallocFree { addr: old_addr },
            ));
            out.push(event(
                ts_after,
                internal,
                EventKind::ReallocAlloc {
                    old_addr,
                    addr: new_addr,
                    size: new_size,
                    stack,
                },
            ));
        }
        Record::Stack { hash, frames } => {
            tables
                .stacks
                .entry(hash)
                .or_insert_with(|| frames.into_boxed_slice());
        }
        Record::Thread { os_tid, name } => {
            let info = tables.threads.entry(thread).or_default();
            info.name = Some(name);
            info.os_tid = Some(os_tid);
        }
        // Meta records belong to thread 0; elsewhere they carry nothing we use.
        Record::Clock { .. }
        | Record::Module { .. }
        | Record::End { .. }
        | Record::Scan(_)
        | Record::Reach { .. } => {}
        Record::Instrumented { .. } | Record::Def { .. } => {
            tables.names.take(&record);
        }
        Record::Enter { ts, id } => out.push(event(ts, false, EventKind::Mark(Mark::Enter { id }))),
        Record::Exit { ts, id } => out.push(event(ts, false, EventKind::Mark(Mark::Exit { id }))),
        Record::Owns { ts, var, blocks } => out.extend(
            blocks
                .into_iter()
                .map(|block| event(ts, false, EventKind::Mark(Mark::Owns { var, block }))),
        ),
        Record::Task { ts, id, site, .. } => {
            tables.names.take(&record);
            out.push(event(
                ts,
                false,
                EventKind::Mark(Mark::TaskStart { id, site }),
            ));
        }
        Record::TaskEnd { ts, id, state } => out.push(event(
            ts,
            false,
            EventKind::Mark(Mark::TaskEnd { id, state }),
        )),
    }
    Ok(next)
}

impl Iterator for Events<'_> {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        let Reverse(key) = *self.heap.peek()?;
        let i = key as u32 as usize;
        let stream = &mut self.streams[i];
        let event = stream.ahead[stream.next];
        stream.next += 1;
        if stream.next == stream.ahead.len() {
            self.decode_ahead(i);
        }
        let stream = &self.streams[i];
        // The stream's next event takes its place at the top and sinks to where it
        // belongs: one sift instead of a pop and a push (keys are unique: the stream
        // index is part of them, so the order is the same).
        match (stream.ahead.get(stream.next), self.heap.peek_mut()) {
            (Some(e), Some(mut top)) => *top = Reverse(merge_key(e, i)),
            (None, Some(top)) => {
                PeekMut::pop(top);
            }
            (_, None) => {}
        }
        Some(event)
    }
}

/// A part of the file read into memory, for walking it from start to end with few
/// reads (a read per chunk header and payload cost regex-syntax's 70 MB trace 8,600
/// system calls).
#[derive(Default)]
pub(crate) struct Window {
    buf: Vec<u8>,
    /// How much of `buf` holds the file from `start` on.
    filled: usize,
    /// Where `buf` starts in the file.
    start: u64,
}

/// What a file holds at the start of a chunk.
pub(crate) enum ChunkAt {
    /// A chunk whose payload is all there and matches its checksum.
    Whole(ChunkHeader, ChunkRef),
    /// The file ends inside the chunk's header, or inside its payload.
    EndsInHeader,
    EndsInChunk,
    /// A header that is not one.
    Corrupt,
    BadChecksum,
}

impl Window {
    /// Bytes read ahead at once.
    const SIZE: usize = 1 << 20;

    /// The chunk at `pos` of `file`, whose first `file_len` bytes are read.
    pub fn chunk(&mut self, file: &File, pos: u64, file_len: u64) -> io::Result<ChunkAt> {
        let raw = self.at(file, pos, CHUNK_HEADER_LEN)?;
        let got = raw.len();
        let header = match ChunkHeader::decode(raw) {
            Ok(h) => h,
            Err(_) if got < CHUNK_HEADER_LEN => return Ok(ChunkAt::EndsInHeader),
            Err(_) => return Ok(ChunkAt::Corrupt),
        };
        let start = pos + CHUNK_HEADER_LEN as u64;
        if start + u64::from(header.len) > file_len {
            return Ok(ChunkAt::EndsInChunk);
        }
        let payload = self.at(file, start, header.len as usize)?;
        if payload.len() < header.len as usize {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the trace file shrank while being read",
            ));
        }
        if format::checksum(payload) != header.checksum {
            return Ok(ChunkAt::BadChecksum);
        }
        let chunk = ChunkRef {
            offset: start,
            len: header.len,
        };
        Ok(ChunkAt::Whole(header, chunk))
    }

    /// The `len` bytes at `offset`, or fewer where the file ends first.
    pub fn at(&mut self, file: &File, offset: u64, len: usize) -> io::Result<&[u8]> {
        let end = self.start + self.filled as u64;
        if offset < self.start || offset + len as u64 > end {
            if self.buf.len() < len.max(Self::SIZE) {
                // Zeroed by the allocator, not written: reading a short file touches
                // only the pages it fills.
                self.buf = vec![0; len.max(Self::SIZE)];
            }
            self.filled = read_at_most(file, offset, &mut self.buf)?;
            self.start = offset;
        }
        let from = (offset - self.start) as usize;
        let to = (from + len).min(self.filled);
        Ok(&self.buf[from..to])
    }
}

/// Reads as many bytes as the file has at `offset`, up to `buf.len()`.
pub(crate) fn read_at_most(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match read_at(file, offset + got as u64, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

pub(crate) fn read_exact_at(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    if read_at_most(file, offset, buf)? < buf.len() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the trace file shrank while being read",
        ));
    }
    Ok(())
}

#[cfg(unix)]
fn read_at(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(file, buf, offset)
}

#[cfg(windows)]
fn read_at(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
    std::os::windows::fs::FileExt::seek_read(file, buf, offset)
}

/// Synthetic traces for tests, written with the format's own encoder.
#[cfg(test)]
pub(crate) mod testing {
    use memscope::format::{
        head, stack_hash, ChunkHeader, Encoder, FileHeader, Record, FLAG_STACKS, TAG_STAMP, VERSION,
    };

    /// Process start, as Unix nanoseconds, of every synthetic trace.
    pub const START_UNIX_NS: u64 = 1_700_000_000_000_000_000;

    /// Builds a trace file chunk by chunk.
    pub struct TraceBytes {
        pub bytes: Vec<u8>,
    }

    /// Encodes records as one chunk's payload that decodes on its own: it starts by
    /// setting the stream clock, as the runtime's chunks do. Stacks must be bound in
    /// the same chunk as the events that use them.
    pub fn payload(records: &[Record]) -> Vec<u8> {
        payload_after(0, records)
    }

    /// [`payload`] for a chunk after a thread's first: its opening `STAMP` says how
    /// long the previous chunk, `previous` bytes, is.
    pub fn payload_after(previous: usize, records: &[Record]) -> Vec<u8> {
        let mut enc = Encoder::default();
        enc.word(head(TAG_STAMP, 0, previous as u64)).word(0);
        for r in records {
            enc.record(r);
        }
        enc.bytes
    }

    impl TraceBytes {
        pub fn new() -> Self {
            let header = FileHeader {
                version: VERSION,
                flags: FLAG_STACKS,
                pid: 4242,
                ppid: 1,
                start_unix_ns: START_UNIX_NS,
            };
            TraceBytes {
                bytes: header.encode().to_vec(),
            }
        }

        /// Appends one chunk of `thread`'s stream.
        pub fn chunk(self, thread: u32, index: u32, records: &[Record]) -> Self {
            self.raw_chunk(thread, index, &payload(records))
        }

        /// Appends one chunk with the given payload.
        pub fn raw_chunk(mut self, thread: u32, index: u32, payload: &[u8]) -> Self {
            let header = ChunkHeader {
                thread,
                index,
                len: payload.len() as u32,
                checksum: memscope::format::checksum(payload),
            };
            self.bytes.extend_from_slice(&header.encode());
            self.bytes.extend_from_slice(payload);
            self
        }

        /// Appends the meta stream: a clock where one tick is one nanosecond and (if
        /// `end` is given) an end record at that tick.
        pub fn meta(self, index: u32, end: Option<u64>) -> Self {
            let mut records = vec![clock(0), clock(1_000_000)];
            if let Some(ts) = end {
                records.push(Record::End {
                    reason: 0,
                    ts,
                    dropped: 0,
                });
            }
            self.chunk(0, index, &records)
        }

        pub fn write(&self, dir: &std::path::Path, name: &str) -> std::path::PathBuf {
            let path = dir.join(name);
            std::fs::write(&path, &self.bytes).unwrap();
            path
        }
    }

    pub fn clock(ts: u64) -> Record {
        Record::Clock {
            ts,
            monotonic_ns: 5_000 + ts,
            unix_ns: START_UNIX_NS + ts,
        }
    }

    pub fn alloc(ts: u64, addr: u64, size: u64, stack: u64) -> Record {
        Record::Alloc {
            internal: false,
            zeroed: false,
            ts,
            addr,
            size,
            align: 8,
            stack,
        }
    }

    pub fn internal_alloc(ts: u64, addr: u64, size: u64) -> Record {
        Record::Alloc {
            internal: true,
            zeroed: false,
            ts,
            addr,
            size,
            align: 8,
            stack: 0,
        }
    }

    pub fn free(ts: u64, addr: u64) -> Record {
        Record::Free { ts, addr }
    }

    pub fn realloc(
        ts_before: u64,
        ts_after: u64,
        old_addr: u64,
        new_addr: u64,
        new_size: u64,
    ) -> Record {
        Record::Realloc {
            internal: false,
            ts_before,
            ts_after,
            old_addr,
            new_addr,
            new_size,
            align: 8,
            stack: 0,
        }
    }

    /// A stack record and the hash that names it in events.
    pub fn stack(frames: &[u64]) -> (Record, u64) {
        let hash = stack_hash(frames);
        (
            Record::Stack {
                hash,
                frames: frames.to_vec(),
            },
            hash,
        )
    }

    pub fn thread(name: &str) -> Record {
        Record::Thread {
            os_tid: 77,
            name: name.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    fn kinds(trace: &Trace) -> Vec<(u64, u32, EventKind)> {
        trace.events().map(|e| (e.ts, e.thread, e.kind)).collect()
    }

    #[test]
    fn an_address_freed_on_one_thread_is_reused_on_another_in_time_order() {
        let dir = tempfile::tempdir().unwrap();
        // Thread 2's chunk comes first in the file, but its allocation is later.
        let path = TraceBytes::new()
            .chunk(2, 0, &[alloc(11, 0x1000, 32, 0)])
            .chunk(1, 0, &[alloc(5, 0x1000, 16, 0), free(10, 0x1000)])
            .meta(0, Some(20))
            .write(dir.path(), "t.mstrace");
        let trace = Trace::open(&path).unwrap();
        assert_eq!(
            kinds(&trace),
            vec![
                (
                    5,
                    1,
                    EventKind::Alloc {
                        addr: 0x1000,
                        size: 16,
                        zeroed: false,
                        stack: 0
                    }
                ),
                (10, 1, EventKind::Free { addr: 0x1000 }),
                (
                    11,
                    2,
                    EventKind::Alloc {
                        addr: 0x1000,
                        size: 32,
                        zeroed: false,
                        stack: 0
                    }
                ),
            ]
        );
        assert!(trace.damage.is_empty());
    }

    #[test]
    fn on_equal_ticks_a_free_goes_before_an_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let path = TraceBytes::new()
            .chunk(1, 0, &[alloc(7, 0x2000, 8, 0)])
            .chunk(2, 0, &[free(7, 0x2000)])
            .meta(0, Some(9))
            .write(dir.path(), "t.mstrace");
        let trace = Trace::open(&path).unwrap();
        let order: Vec<u32> = trace.events().map(|e| e.thread).collect();
        assert_eq!(order, vec![2, 1]);
    }

    #[test]
    fn a_realloc_is_split_into_its_free_half_and_its_alloc_half() {
        let dir = tempfile::tempdir().unwrap();
        let path = TraceBytes::new()
            .chunk(1, 0, &[alloc(1, 0xa0, 8, 0), realloc(4, 8, 0xa0, 0xb0, 64)])
            .chunk(2, 0, &[alloc(6, 0xa0, 16, 0)])
            .meta(0, Some(9))
            .write(dir.path(), "t.mstrace");
        let trace = Trace::open(&path).unwrap();
        assert_eq!(
            kinds(&trace),
            vec![
                (
                    1,
                    1,
                    EventKind::Alloc {
                        addr: 0xa0,
                        size: 8,
                        zeroed: false,
                        stack: 0
                    }
                ),
                (4, 1, EventKind::ReallocFree { addr: 0xa0 }),
                (
                    6,
                    2,
                    EventKind::Alloc {
                        addr: 0xa0,
                        size: 16,
                        zeroed: false,
                        stack: 0
                    }
                ),
                (
                    8,
                    1,
                    EventKind::ReallocAlloc {
                        old_addr: 0xa0,
                        addr: 0xb0,
                        size: 64,
                        stack: 0
                    }
                ),
            ]
        );
    }

    #[test]
    fn the_longest_copy_of_a_growing_chunk_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = [alloc(1, 0x10, 8, 0)];
        let grown = [
            alloc(1, 0x10, 8, 0),
            alloc(2, 0x20, 8, 0),
            alloc(3, 0x30, 8, 0),
        ];
        let path = TraceBytes::new()
            .chunk(1, 0, &first)
            .chunk(1, 0, &grown)
            .chunk(1, 0, &first)
            .chunk(1, 1, &[free(4, 0x10)])
            .meta(0, Some(5))
            .write(dir.path(), "t.mstrace");
        let trace = Trace::open(&path).unwrap();
        let ts: Vec<u64> = trace.events().map(|e| e.ts).collect();
        assert_eq!(ts, vec![1, 2, 3, 4]);
        assert!(trace.damage.is_empty());
    }

    #[test]
    fn a_truncated_file_is_read_up_to_its_last_complete_chunk_and_marked_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        let whole = TraceBytes::new()
            .meta(0, None)
            .chunk(1, 0, &[alloc(1, 0x10, 8, 0), alloc(2, 0x20, 8, 0)])
            .chunk(1, 1, &[alloc(3, 0x30, 8, 0)]);
        let mut cut = whole.bytes.clone();
        cut.truncate(cut.len() - 8);
        let path = dir.path().join("cut.mstrace");
        std::fs::write(&path, &cut).unwrap();
        let trace = Trace::open(&path).unwrap();
        assert!(!trace.damage.is_empty());
        assert!(
            trace
                .damage
                .iter()
                .any(|d| d.contains("ends inside the chunk")),
            "{:?}",
            trace.damage
        );
        let ts: Vec<u64> = trace.events().map(|e| e.ts).collect();
        assert_eq!(ts, vec![1, 2]);
    }

    #[test]
    fn a_trace_without_an_end_record_is_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        let path = TraceBytes::new()
            .meta(0, None)
            .chunk(1, 0, &[alloc(1, 0x10, 8, 0)])
            .write(dir.path(), "t.mstrace");
        let trace = Trace::open(&path).unwrap();
        assert!(!trace.damage.is_empty());
        assert_eq!(trace.events().count(), 1);
    }

    #[test]
    fn a_bad_checksum_ends_the_readable_part_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = TraceBytes::new()
            .meta(0, Some(9))
            .chunk(1, 0, &[alloc(1, 0x10, 8, 0)]);
        let flip = t.bytes.len() - 3;
        t.bytes[flip] ^= 0x40;
        let t = t.chunk(2, 0, &[alloc(2, 0x20, 8, 0)]);
        let trace = Trace::open(&t.write(dir.path(), "t.mstrace")).unwrap();
        assert!(!trace.damage.is_empty());
        assert_eq!(trace.events().count(), 0);
    }

    #[test]
    fn a_missing_chunk_ends_its_threads_stream() {
        let dir = tempfile::tempdir().unwrap();
        let path = TraceBytes::new()
            .meta(0, Some(9))
            .chunk(1, 0, &[alloc(1, 0x10, 8, 0)])
            .chunk(1, 2, &[alloc(3, 0x30, 8, 0)])
            .write(dir.path(), "t.mstrace");
        let trace = Trace::open(&path).unwrap();
        assert!(!trace.damage.is_empty());
        assert_eq!(trace.events().count(), 1);
    }

    #[test]
    fn stack_and_thread_records_fill_the_tables_last_name_winning() {
        let dir = tempfile::tempdir().unwrap();
        let (frames, hash) = stack(&[0x401000, 0x402000]);
        let path = TraceBytes::new()
            .meta(0, Some(9))
            .chunk(
                1,
                0,
                &[
                    thread("first"),
                    frames,
                    alloc(1, 0x10, 8, hash),
                    thread("main"),
                ],
            )
            .write(dir.path(), "t.mstrace");
        let trace = Trace::open(&path).unwrap();
        let mut events = trace.events();
        let stacks: Vec<u64> = events
            .by_ref()
            .map(|e| match e.kind {
                EventKind::Alloc { stack, .. } => stack,
                _ => 0,
            })
            .collect();
        assert_eq!(stacks, vec![hash]);
        let (tables, damage) = events.finish();
        assert!(damage.is_empty());
        assert_eq!(&*tables.stacks[&hash], &[0x401000, 0x402000]);
        assert_eq!(tables.threads[&1].name.as_deref(), Some("main"));
        assert_eq!(tables.threads[&1].os_tid, Some(77));
        assert_eq!(trace.meta.clocks.len(), 2);
        assert_eq!(trace.meta.end.map(|e| e.ts), Some(9));
    }

    #[test]
    fn files_that_are_not_traces_give_one_line_errors() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        let err = Trace::open(&empty).unwrap_err().to_string();
        assert!(err.contains("not a memscope trace"), "{err}");
        assert!(!err.contains('\n'));

        let mut newer = TraceBytes::new().bytes;
        newer[8] = 9;
        let newer_path = dir.path().join("newer");
        std::fs::write(&newer_path, &newer).unwrap();
        let err = Trace::open(&newer_path).unwrap_err().to_string();
        assert!(err.contains("version 9 is not supported"), "{err}");

        let err = Trace::open(&dir.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read the trace"), "{err}");
    }

    #[test]
    fn truncated_or_garbled_bytes_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let whole = TraceBytes::new()
            .meta(0, Some(50))
            .chunk(
                1,
                0,
                &[
                    thread("w"),
                    stack(&[1, 2, 3]).0,
                    alloc(1, 0x10, 8, stack(&[1, 2, 3]).1),
                    realloc(2, 3, 0x10, 0x20, 64),
                ],
            )
            .chunk(2, 0, &[alloc(4, 0x30, 8, 0), free(5, 0x30), free(6, 0x30)])
            .chunk(1, 1, &[free(7, 0x20)])
            .bytes;
        let path = dir.path().join("t.mstrace");
        let check = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            if let Ok(trace) = Trace::open(&path) {
                let mut events = trace.events();
                let _ = crate::replay::replay(events.by_ref());
                let _ = events.finish();
            }
        };
        for len in 0..whole.len() {
            check(&whole[..len]);
        }
        // Flip bits all over, re-sealing chunk checksums sometimes so that garbage
        // reaches the record decoder too.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..600 {
            let mut bytes = whole.clone();
            for _ in 0..1 + round % 4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let at = (seed % bytes.len() as u64) as usize;
                bytes[at] ^= 1 << ((seed >> 60) % 8);
            }
            if round % 2 == 0 {
                reseal(&mut bytes);
            }
            check(&bytes);
        }
    }

    /// Recomputes every chunk checksum it can find.
    fn reseal(bytes: &mut [u8]) {
        let mut pos = FILE_HEADER_LEN;
        while pos + CHUNK_HEADER_LEN <= bytes.len() {
            let Ok(h) = ChunkHeader::decode(&bytes[pos..pos + CHUNK_HEADER_LEN]) else {
                return;
            };
            let start = pos + CHUNK_HEADER_LEN;
            let Some(end) = start
                .checked_add(h.len as usize)
                .filter(|&e| e <= bytes.len())
            else {
                return;
            };
            let sum = format::checksum(&bytes[start..end]);
            bytes[pos + 16..pos + 24].copy_from_slice(&sum.to_le_bytes());
            pos = end;
        }
    }
}
