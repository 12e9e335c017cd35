//! Reading a trace while its process still writes it.
//!
//! [`Following`] hands out the same merged event stream that [`Trace::events`] gives
//! once the file is whole, as far as the file holds it yet, so that a test binary's
//! trace is analysed while the binary runs instead of after it ends.
//!
//! The file grows by whole chunks, and a chunk may be written again, longer (the
//! writer copies every running thread's buffer every 100 ms). A thread's stream goes
//! on to its next chunk only once it has read as much of the current one as the next
//! one's opening `STAMP` says the current one holds (see the runtime's `format.rs`).
//!
//! Events are handed out in the order of their stamps, and an event that would come
//! before one already handed out must never turn up later. Two things keep that so:
//! - What may be handed out: events stamped before the clock sample written two
//!   samples before the latest (about 100–200 ms ago). Every event stamped earlier
//!   was in a thread's buffer when the writer last copied it, unless the thread was
//!   stalled in the allocator hook between stamping an event and storing it.
//! - What is checked: every event read is compared with the last one handed out.
//!   One that comes before it (that stall), a chunk that grows after it was read
//!   past, damage of any kind, a process that ended without the trace's end, or
//!   modules loaded after the start: the follower stops and says why, and the trace
//!   is read whole instead. It never guesses.

use std::cmp::Reverse;
use std::collections::binary_heap::PeekMut;
use std::collections::BinaryHeap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use memscope::format::{FileHeader, StreamDecoder, FILE_HEADER_LEN, META_THREAD, TAG_STAMP};
use rustc_hash::FxHashMap;

use crate::trace::{
    decode_record, read_at_most, read_exact_at, ChunkAt, ChunkRef, Event, EventSource, Meta,
    Module, Tables, Trace, Window, AHEAD,
};

/// How long to wait for the file to grow before looking again.
const POLL: Duration = Duration::from_millis(3);

/// A trace file followed as it is written; an iterator of [`Event`]s in time order.
pub struct Following<'e> {
    path: PathBuf,
    file: File,
    header: FileHeader,
    /// Whether the process has ended (then the file will not grow any more).
    ended: Box<dyn FnMut() -> bool + 'e>,
    /// Where the next chunk header is expected.
    indexed: u64,
    window: Window,
    /// The longest copy so far of each chunk of the thread streams.
    copies: FxHashMap<(u32, u32), ChunkRef>,
    /// Meta chunks not decoded yet, by index; the next one to decode.
    meta_chunks: FxHashMap<u32, ChunkRef>,
    meta_next: u32,
    meta_decoder: StreamDecoder,
    meta: Meta,
    /// The modules the first meta chunk listed: those loaded at start.
    start_modules: Vec<Module>,
    /// By thread id.
    streams: Vec<Live>,
    /// The slot in `streams` of each thread id.
    slot_of: Vec<u32>,
    /// The [`order_key`] of each stream's head event, for streams that have one.
    heap: BinaryHeap<Reverse<u128>>,
    tables: Tables,
    /// The key of the last event handed out.
    last: u128,
    /// Events stamped before this may be handed out.
    bound: u64,
    /// The trace's end record was read: everything is in the file.
    whole: bool,
    /// Why the file cannot be followed any further.
    failed: Option<String>,
    found: u64,
    read: u64,
    progress: Option<Box<dyn FnMut(u64, u64) + 'e>>,
}

/// One thread's stream.
struct Live {
    thread: u32,
    /// The chunk being read, and as much of it as has been read.
    chunk: u32,
    buf: Vec<u8>,
    pos: usize,
    decoder: StreamDecoder,
    /// Events decoded and not handed out yet: `ahead[next..]`.
    ahead: Vec<Event>,
    next: usize,
    in_heap: bool,
    /// Waiting for a longer copy of its chunk, which the next chunk says there is.
    stuck: bool,
    last_ts: u64,
}

/// The merge order of `Trace::events` (whose streams are in thread order): by stamp,
/// frees first, then by thread.
fn order_key(e: &Event) -> u128 {
    (u128::from(e.ts) << 64) | (u128::from(e.kind.rank()) << 32) | u128::from(e.thread)
}

/// Thread ids are handed out in order from 1; more than this is not a trace to follow.
const MAX_THREAD: u32 = 1 << 20;

impl<'e> Following<'e> {
    /// Starts following the trace at `path`, once its header and its first meta chunk
    /// (the modules loaded at start) are written. `ended` says whether the process
    /// has ended. `None` if that does not happen before the process ends, or the file
    /// is not a trace.
    pub fn open(path: &Path, mut ended: impl FnMut() -> bool + 'e) -> Option<Following<'e>> {
        let file = File::open(path).ok()?;
        let mut head = [0u8; FILE_HEADER_LEN];
        let mut header_written =
            || Some(read_at_most(&file, 0, &mut head).ok()? == FILE_HEADER_LEN);
        while !header_written()? {
            // Whether the process had ended before the last look.
            let over = ended();
            if !header_written()? {
                if over {
                    return None;
                }
                std::thread::sleep(POLL);
            }
        }
        let header = FileHeader::decode(&head).ok()?;
        let mut following = Following {
            path: path.to_owned(),
            file,
            header,
            ended: Box::new(ended),
            indexed: FILE_HEADER_LEN as u64,
            window: Window::default(),
            copies: FxHashMap::default(),
            meta_chunks: FxHashMap::default(),
            meta_next: 0,
            meta_decoder: StreamDecoder::new(header.version),
            meta: Meta::default(),
            start_modules: Vec::new(),
            streams: Vec::new(),
            slot_of: Vec::new(),
            heap: BinaryHeap::new(),
            tables: Tables::default(),
            last: 0,
            bound: 0,
            whole: false,
            failed: None,
            found: 0,
            read: 0,
            progress: None,
        };
        following.poll();
        while following.meta_next == 0 && following.failed.is_none() {
            let over = (following.ended)();
            following.poll();
            if following.meta_next == 0 {
                if over {
                    return None;
                }
                std::thread::sleep(POLL);
            }
        }
        following.failed.is_none().then_some(following)
    }

    /// The modules loaded when the process started.
    pub fn modules(&self) -> &[Module] {
        &self.start_modules
    }

    /// Calls `f` with the payload bytes found in the file so far and those read.
    pub fn on_progress(mut self, f: impl FnMut(u64, u64) + 'e) -> Self {
        self.progress = Some(Box::new(f));
        self
    }

    /// Ends the stream: the whole trace and its tables, or why it could not be
    /// followed to its end (then it is to be read whole).
    pub fn finish(mut self) -> Result<(Trace, Tables), String> {
        if let Some(why) = self.failed.take() {
            return Err(why);
        }
        if !self.whole {
            return Err("the stream was left before the trace's end".into());
        }
        // What `Trace::open` would call damage: a chunk missing or never read.
        let mut last_chunk: FxHashMap<u32, u32> = FxHashMap::default();
        for &(thread, index) in self.copies.keys() {
            let last = last_chunk.entry(thread).or_default();
            *last = (*last).max(index);
        }
        for stream in &self.streams {
            let read_all = self
                .copies
                .get(&(stream.thread, stream.chunk))
                .is_none_or(|c| c.len as usize == stream.buf.len());
            let beyond = last_chunk[&stream.thread] > stream.chunk;
            if !read_all || beyond || stream.ahead.len() > stream.next {
                return Err(format!("thread {}: not read to its end", stream.thread));
            }
        }
        if !self.meta_chunks.is_empty() {
            return Err("the meta stream has a gap".into());
        }
        if self
            .meta
            .modules
            .iter()
            .any(|m| !self.start_modules.contains(m))
        {
            return Err("modules were loaded after the start".into());
        }
        let file_len = self.indexed;
        let trace = Trace::followed(self.path, self.file, self.header, file_len, self.meta);
        Ok((trace, self.tables))
    }

    fn fail(&mut self, why: String) {
        if self.failed.is_none() {
            self.failed = Some(why);
        }
    }

    /// Reads what the file gained: new chunks, the meta stream, the streams that
    /// were waiting. False if it gained no whole chunk.
    fn poll(&mut self) -> bool {
        let Ok(len) = self.file.metadata().map(|m| m.len()) else {
            self.fail("the trace file cannot be read".into());
            return false;
        };
        let before = self.indexed;
        if len > before {
            self.index(len);
        }
        if self.indexed == before {
            return false;
        }
        self.read_meta();
        self.bound = if self.whole {
            u64::MAX
        } else {
            let clocks = &self.meta.clocks;
            clocks.len().checked_sub(3).map_or(0, |at| clocks[at].ts)
        };
        for i in 0..self.streams.len() {
            if !self.streams[i].in_heap {
                self.fill(i);
                if let Some(e) = self.streams[i].ahead.first() {
                    self.heap.push(Reverse(order_key(e)));
                    self.streams[i].in_heap = true;
                }
            }
            // (Once the file is whole, nothing is missing: every stream reads on.)
            if self.streams[i].stuck && !self.whole {
                self.bound = self.bound.min(self.streams[i].last_ts + 1);
            }
        }
        if let Some(progress) = &mut self.progress {
            progress(self.found, self.read);
        }
        true
    }

    /// Indexes the whole chunks between `self.indexed` and `len`.
    fn index(&mut self, len: u64) {
        while self.indexed < len && self.failed.is_none() {
            let pos = self.indexed;
            let (header, chunk) = match self.window.chunk(&self.file, pos, len) {
                Ok(ChunkAt::Whole(header, chunk)) => (header, chunk),
                // Still being written.
                Ok(ChunkAt::EndsInHeader | ChunkAt::EndsInChunk) => return,
                Ok(ChunkAt::Corrupt) => {
                    return self.fail(format!("corrupt chunk header at byte {pos}"))
                }
                Ok(ChunkAt::BadChecksum) => {
                    return self.fail(format!("checksum mismatch in the chunk at byte {pos}"))
                }
                Err(_) => return self.fail("the trace file cannot be read".into()),
            };
            self.indexed = chunk.offset + u64::from(chunk.len);
            if header.thread == META_THREAD {
                self.meta_chunks.insert(header.index, chunk);
                continue;
            }
            self.found += u64::from(header.len);
            let key = (header.thread, header.index);
            let longer = self.copies.get(&key).is_none_or(|c| chunk.len > c.len);
            if !longer {
                continue;
            }
            self.copies.insert(key, chunk);
            match self.slot(header.thread) {
                Some(i) if self.streams[i].chunk > header.index => {
                    return self.fail(format!(
                        "thread {}: chunk {} grew after it was read",
                        header.thread, header.index
                    ));
                }
                Some(_) => {}
                None => self.add_stream(header.thread),
            }
        }
    }

    fn slot(&self, thread: u32) -> Option<usize> {
        match self.slot_of.get(thread as usize) {
            Some(&slot) if slot != u32::MAX => Some(slot as usize),
            _ => None,
        }
    }

    /// A stream for a thread seen for the first time; streams stay in thread order.
    fn add_stream(&mut self, thread: u32) {
        if thread >= MAX_THREAD {
            return self.fail(format!("thread id {thread} is out of range"));
        }
        let at = self.streams.partition_point(|s| s.thread < thread);
        self.streams.insert(
            at,
            Live {
                thread,
                chunk: 0,
                buf: Vec::new(),
                pos: 0,
                decoder: StreamDecoder::new(self.header.version),
                ahead: Vec::with_capacity(AHEAD),
                next: 0,
                in_heap: false,
                stuck: false,
                last_ts: 0,
            },
        );
        if self.slot_of.len() <= thread as usize {
            self.slot_of.resize(thread as usize + 1, u32::MAX);
        }
        for (i, s) in self.streams.iter().enumerate().skip(at) {
            self.slot_of[s.thread as usize] = i as u32;
        }
    }

    /// Decodes the meta chunks that follow those decoded, in order.
    fn read_meta(&mut self) {
        let mut payload = Vec::new();
        while let Some(chunk) = self.meta_chunks.remove(&self.meta_next) {
            payload.resize(chunk.len as usize, 0);
            if read_exact_at(&self.file, chunk.offset, &mut payload).is_err() {
                return self.fail("the trace file cannot be read".into());
            }
            if let Err(e) = self.meta.read_chunk(&mut self.meta_decoder, &payload) {
                return self.fail(format!("meta stream: {e}"));
            }
            if self.meta_next == 0 {
                self.start_modules = self.meta.modules.clone();
            }
            self.meta_next += 1;
            if self.meta.end.is_some() {
                self.whole = true;
            }
        }
    }

    /// Decodes stream `i`'s next events, as far as the file holds them.
    fn fill(&mut self, i: usize) {
        let whole = self.whole;
        let stream = &mut self.streams[i];
        stream.ahead.clear();
        stream.next = 0;
        stream.stuck = false;
        while stream.ahead.len() < AHEAD {
            if stream.pos >= stream.buf.len() {
                let key = (stream.thread, stream.chunk);
                let have = stream.buf.len();
                if let Some(copy) = self.copies.get(&key).filter(|c| c.len as usize > have) {
                    stream.buf.resize(copy.len as usize, 0);
                    let at = copy.offset + have as u64;
                    if read_exact_at(&self.file, at, &mut stream.buf[have..]).is_err() {
                        self.failed = Some("the trace file cannot be read".into());
                        return;
                    }
                    self.read += u64::from(copy.len) - have as u64;
                    continue;
                }
                if !self.copies.contains_key(&key) {
                    break; // its first chunk is not there yet (or, in a whole file, lost)
                }
                let Some(next) = self.copies.get(&(stream.thread, stream.chunk + 1)) else {
                    break; // waiting for more
                };
                // The next chunk's opening STAMP says how long this one is.
                let mut opening = [0u8; 8];
                if read_exact_at(&self.file, next.offset, &mut opening).is_err() {
                    self.failed = Some("the trace file cannot be read".into());
                    return;
                }
                let word = u64::from_le_bytes(opening);
                let said = if word & 0xf == TAG_STAMP {
                    word >> 16
                } else {
                    0
                };
                if !whole && said != have as u64 {
                    if said > have as u64 {
                        stream.stuck = true;
                        break;
                    }
                    self.failed = Some(format!(
                        "thread {}: chunk {} does not say how long chunk {} is",
                        stream.thread,
                        stream.chunk + 1,
                        stream.chunk
                    ));
                    return;
                }
                stream.chunk += 1;
                stream.buf.clear();
                stream.pos = 0;
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
                    self.failed = Some(format!("thread {}: {e}", stream.thread));
                    return;
                }
            }
        }
        if let Some(first) = stream.ahead.first() {
            if order_key(first) < self.last {
                self.failed = Some(format!(
                    "thread {}: an event stamped {} turned up after later ones were read",
                    stream.thread, first.ts
                ));
                return;
            }
        }
        if let Some(last) = stream.ahead.last() {
            stream.last_ts = last.ts;
        }
        if stream.stuck {
            // Its chunk's missing part comes later, stamped after what was read of it.
            self.bound = self.bound.min(stream.last_ts + 1);
        }
    }
}

impl EventSource for Following<'_> {
    fn tables(&self) -> &Tables {
        &self.tables
    }
}

impl Iterator for Following<'_> {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        loop {
            if self.failed.is_some() {
                return None;
            }
            if let Some(&Reverse(key)) = self.heap.peek() {
                if self.whole || ((key >> 64) as u64) < self.bound {
                    let i = self.slot(key as u32)?;
                    let stream = &mut self.streams[i];
                    let event = stream.ahead[stream.next];
                    stream.next += 1;
                    if stream.next == stream.ahead.len() {
                        self.fill(i);
                    }
                    let stream = &mut self.streams[i];
                    match (stream.ahead.get(stream.next), self.heap.peek_mut()) {
                        (Some(e), Some(mut top)) => *top = Reverse(order_key(e)),
                        (None, Some(top)) => {
                            PeekMut::pop(top);
                            stream.in_heap = false;
                        }
                        (_, None) => {}
                    }
                    self.last = key;
                    return Some(event);
                }
            } else if self.whole {
                return None;
            }
            // The file must grow before anything more can be handed out.
            if self.poll() {
                continue;
            }
            // Whether the process had ended before the last look.
            let over = (self.ended)();
            if !self.poll() && !self.whole {
                if over {
                    self.fail("the process ended without ending its trace".into());
                    return None;
                }
                std::thread::sleep(POLL);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::testing::TraceBytes;
    use crate::trace::testing::{alloc, clock, free, payload, payload_after, stack, thread};
    use memscope::format::Record;

    /// A trace file written piece by piece, as a process writes it.
    struct Written {
        trace: TraceBytes,
        /// Where each piece ends.
        cuts: Vec<usize>,
    }

    impl Written {
        fn new(first: TraceBytes) -> Written {
            let cuts = vec![first.bytes.len()];
            Written { trace: first, cuts }
        }

        /// Appends what `f` adds to the trace as the next piece.
        fn then(mut self, f: impl FnOnce(TraceBytes) -> TraceBytes) -> Written {
            self.trace = f(self.trace);
            self.cuts.push(self.trace.bytes.len());
            self
        }

        /// Follows the file while it is written: each time the follower looks for more,
        /// the next half piece is appended (a write may end inside a chunk); once all
        /// are, the process has ended.
        fn follow(&self, dir: &Path) -> (Vec<Event>, Result<(Trace, Tables), String>) {
            let path = dir.join("followed.mstrace");
            std::fs::write(&path, &self.trace.bytes[..self.cuts[0]]).unwrap();
            let cuts: Vec<usize> = (self.cuts.windows(2))
                .flat_map(|w| [(w[0] + w[1]) / 2, w[1]])
                .collect();
            let cuts = [&self.cuts[..1], &cuts[..]].concat();
            let (bytes, file) = (self.trace.bytes.clone(), path.clone());
            let mut written = 1;
            let ended = move || {
                let Some(&end) = cuts.get(written) else {
                    return true;
                };
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&file)
                    .unwrap();
                std::io::Write::write_all(&mut f, &bytes[cuts[written - 1]..end]).unwrap();
                written += 1;
                false
            };
            let mut following = Following::open(&path, ended).expect("a trace to follow");
            let events: Vec<Event> = following.by_ref().collect();
            (events, following.finish())
        }

        /// The events of the whole file, read at once.
        fn whole(&self, dir: &Path) -> Vec<Event> {
            let path = self.trace.write(dir, "whole.mstrace");
            Trace::open(&path).unwrap().events().collect()
        }
    }

    fn end(ts: u64) -> Record {
        Record::End {
            reason: 0,
            ts,
            dropped: 0,
        }
    }

    /// Thread 1's first chunk as it grows: a copy taken while it ran, then the
    /// chunk it handed over.
    fn early_and_handed_over() -> (Vec<Record>, Vec<Record>, u64) {
        let (walk, at) = stack(&[0x1111, 0x2222]);
        let early = vec![thread("main"), walk.clone(), alloc(10, 0xa0, 8, at)];
        let handed = vec![
            thread("main"),
            walk,
            alloc(10, 0xa0, 8, at),
            free(20, 0xa0),
            alloc(1_500_000, 0xc0, 32, at),
        ];
        (early, handed, at)
    }

    #[test]
    fn a_trace_followed_while_it_is_written_gives_the_events_of_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let (early, handed, _) = early_and_handed_over();
        let handed_len = payload(&handed).len();
        let written = Written::new(TraceBytes::new().meta(0, None))
            .then(|t| {
                t.chunk(1, 0, &early)
                    .chunk(2, 0, &[thread("worker"), alloc(15, 0xb0, 16, 0)])
                    .chunk(0, 1, &[clock(2_000_000)])
            })
            .then(|t| {
                // The next chunk's copy comes before the longer copy of the first,
                // which it says is `handed_len` bytes long: thread 1 waits for it.
                t.raw_chunk(1, 1, &payload_after(handed_len, &[free(2_500_000, 0xc0)]))
                    .chunk(0, 2, &[clock(3_000_000)])
            })
            .then(|t| t.chunk(1, 0, &handed).chunk(0, 3, &[clock(4_000_000)]))
            .then(|t| {
                t.chunk(
                    2,
                    0,
                    &[
                        thread("worker"),
                        alloc(15, 0xb0, 16, 0),
                        free(3_500_000, 0xb0),
                    ],
                )
                .chunk(0, 4, &[clock(5_000_000), end(5_000_000)])
            });
        let (events, finished) = written.follow(dir.path());
        let (trace, tables) = finished.expect("followed to its end");
        assert_eq!(events, written.whole(dir.path()));
        assert_eq!(events.len(), 6);
        assert!(trace.damage.is_empty());
        assert_eq!(trace.meta.end.map(|e| e.ts), Some(5_000_000));
        assert_eq!(tables.stacks.len(), 1);
        assert_eq!(tables.threads[&2].name.as_deref(), Some("worker"));
    }

    #[test]
    fn a_thread_waiting_for_the_rest_of_its_chunk_when_the_trace_ends_is_read_to_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let first = [alloc(10, 0xa0, 8, 0)];
        let whole_first = [alloc(10, 0xa0, 8, 0), alloc(20, 0xb0, 8, 0)];
        let next = payload_after(payload(&whole_first).len(), &[free(30, 0xa0)]);
        // Before any clock sample lets an event out, thread 1's next chunk says its
        // first is longer than the copy there; the rest comes with the trace's end.
        let written = Written::new(TraceBytes::new().meta(0, None))
            .then(|t| t.chunk(1, 0, &first).raw_chunk(1, 1, &next))
            .then(|t| t.chunk(1, 0, &whole_first).chunk(0, 1, &[end(40)]));
        let (events, finished) = written.follow(dir.path());
        finished.expect("followed to its end");
        assert_eq!(events, written.whole(dir.path()));
        assert_eq!(events.len(), 3);
    }

    #[test]
    fn an_event_that_turns_up_after_later_ones_were_handed_out_stops_the_following() {
        let dir = tempfile::tempdir().unwrap();
        let written = Written::new(TraceBytes::new().meta(0, None))
            .then(|t| {
                t.chunk(1, 0, &[alloc(100, 0xa0, 8, 0), alloc(200, 0xb0, 8, 0)])
                    .chunk(0, 1, &[clock(2_000_000)])
                    .chunk(0, 2, &[clock(3_000_000)])
            })
            // Stamped before both, written after they could be handed out (a thread
            // stalled in the allocator hook).
            .then(|t| {
                t.chunk(2, 0, &[alloc(50, 0xc0, 8, 0)]).chunk(
                    0,
                    3,
                    &[clock(4_000_000), end(4_000_000)],
                )
            });
        let (events, finished) = written.follow(dir.path());
        let ts: Vec<u64> = events.iter().map(|e| e.ts).collect();
        assert_eq!(ts, [100, 200]);
        let why = finished.expect_err("not followed");
        assert!(why.contains("stamped 50"), "{why}");
    }

    #[test]
    fn a_chunk_that_grows_after_it_was_read_stops_the_following() {
        let dir = tempfile::tempdir().unwrap();
        let (early, handed, _) = early_and_handed_over();
        // A next chunk that (wrongly) says the first was whole when it was not.
        let early_len = payload(&early).len();
        let written = Written::new(TraceBytes::new().meta(0, None))
            .then(|t| {
                t.chunk(1, 0, &early)
                    .raw_chunk(1, 1, &payload_after(early_len, &[free(2_500_000, 0xa0)]))
                    .chunk(0, 1, &[clock(3_000_000)])
                    .chunk(0, 2, &[clock(4_000_000)])
            })
            .then(|t| {
                t.chunk(1, 0, &handed)
                    .chunk(0, 3, &[clock(5_000_000), end(5_000_000)])
            });
        let why = written.follow(dir.path()).1.expect_err("not followed");
        assert!(why.contains("grew after it was read"), "{why}");
    }

    #[test]
    fn a_process_that_ends_without_ending_its_trace_is_not_followed_to_an_end() {
        let dir = tempfile::tempdir().unwrap();
        let written = Written::new(TraceBytes::new().meta(0, None))
            .then(|t| t.chunk(1, 0, &[alloc(10, 0xa0, 8, 0)]));
        let (events, finished) = written.follow(dir.path());
        assert!(
            events.is_empty(),
            "nothing is handed out before the clock says so"
        );
        let why = finished.expect_err("not followed");
        assert!(why.contains("ended without"), "{why}");
    }
}
