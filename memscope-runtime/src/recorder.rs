//! Per-thread recording: the allocator hook's hot path.
//!
//! Each thread owns a [`ThreadRecord`] found through a const thread-local pointer
//! (no destructor, so it stays readable while the thread's other thread-locals are
//! being destroyed). An event is a word or two appended to the thread's current
//! buffer; nothing is locked, allocated or asked of the kernel. When the buffer is
//! full it is handed to the writer (see `writer.rs`) and a fresh one taken from the
//! pool: that, and whatever else needs more than an append, is the slow path.
//!
//! Before it appends, the hot path checks one thing: that the record is *open*, that
//! is, that `end` (where the buffer's room ends) is set. The record is closed (`end`
//! null) while memscope itself is at work on the thread, while a
//! [`measure`](crate::measure) is open there (its counters are kept on the slow
//! path), and once the thread has exited. So a free is: find the record, mark it as
//! appending, stamp, check the room, store one word, open it again.
//!
//! A re-entrancy flag (`busy`) makes allocations done by memscope itself, while it is
//! at work, pass straight through unrecorded. The slow paths set and clear it, so it
//! resets itself. The hot path calls nothing that allocates, but a signal handler
//! that allocates can interrupt it: while it appends, `end` is [`APPENDING`], so such
//! an event takes the slow path, which drops it instead of writing over the record
//! being appended (as memscope's own allocations are dropped).
//!
//! Handing a buffer over is guarded by a sequence counter (`gen`, a seqlock: odd
//! while the buffer is being swapped, `gen / 2` = index of the chunk in the current
//! buffer), so that another thread can copy the committed prefix of a running
//! thread's buffer at process exit without stopping it.
//!
//! When the thread ends, a thread-local guard's destructor hands the last buffer over
//! and marks the record exited. Events after that (allocations in later thread-local
//! destructors) are each written as a chunk of their own.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ptr::{self, NonNull};
use std::sync::atomic::{fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};

use crate::buffer::{Buffer, PAYLOAD_BYTES, PAYLOAD_WORDS};
use crate::format::{
    alloc_near, head, size_word, MAX_DELTA, MAX_FRAMES, STACK_SLOTS, TAG_ALLOC, TAG_EXTENDED,
    TAG_FREE, TAG_REALLOC, TAG_REALLOC_WIDE, TAG_SCOPE, TAG_STACK, TAG_STAMP, TAG_THREAD,
};
use crate::{clock, measure, stack, sys, writer};

/// Entries of the per-thread cache of stacks already written: one per stack slot.
const STACK_CACHE: usize = STACK_SLOTS;
/// `CURRENT` while the thread's record is being created: events pass through.
const INITIALIZING: usize = 1;
/// `CURRENT` of a thread that is never recorded (memscope's writer, or tracking off).
const DISABLED: usize = 2;
/// The most words an allocation event takes (`REALLOC_WIDE`).
const MAX_EVENT_WORDS: usize = 5;

thread_local! {
    static CURRENT: Cell<*const ThreadRecord> = const { Cell::new(ptr::null()) };
    static EXIT: ExitGuard = const { ExitGuard };
}

/// Head of the list of every thread record of the process (never shrinks).
static RECORDS: AtomicPtr<ThreadRecord> = AtomicPtr::new(ptr::null_mut());
/// Thread ids handed out so far; 0 is the meta stream.
static NEXT_TID: AtomicU32 = AtomicU32::new(1);

/// What one thread records into.
#[repr(C)]
pub struct ThreadRecord {
    // The hot path's fields first, together in one cache line.
    /// Where the next record goes in the current buffer (null while there is none).
    /// Stored with Release after each record: a snapshot that reads it sees the
    /// records before it.
    cursor: AtomicPtr<u64>,
    /// Where the current buffer's room ends while the record is open; null while it
    /// is closed (see the module documentation and [`reopen`](Self::reopen)).
    end: Cell<*mut u64>,
    /// The thread's last stamp (see `clock.rs`), which is also its stream's clock:
    /// every stamped record moves the stream clock to its stamp (see `format.rs`).
    clock: Cell<u64>,
    /// The near address of `ALLOC_NEAR` records: that of the last full `ALLOC` of
    /// the current chunk, 0 at its start.
    near: Cell<u64>,
    stack_cache: Cell<*mut u64>,
    /// The thread's previous stack walk (see `stack.rs`); null if it could not be
    /// allocated.
    last_walk: Cell<*mut stack::LastWalk>,
    busy: Cell<bool>,
    pub tid: u32,
    /// Seqlock counter; see the module documentation.
    gen: AtomicU32,
    /// Current buffer; null once the thread has exited.
    buf: AtomicPtr<Buffer>,
    /// False once the thread flushed its last buffer at exit.
    alive: AtomicBool,
    next: AtomicPtr<ThreadRecord>,
    /// `(chunk index << 32) | length` of the last snapshot written (writer and exit
    /// flush only, which hold the file lock).
    snapshotted: AtomicU64,
    /// The thread's stack, `[stack_low, stack_top)` (0 when unknown): set before the
    /// record is published, never changed; read by the exit-time scan (`reach.rs`).
    stack_low: usize,
    stack_top: usize,
    // Touched only by the owning thread:
    name: Cell<[u8; 16]>,
    /// The thread's id in the OS, and whether it is the process's main thread: read
    /// once (and again in a fork child), not at every name check.
    os_tid: Cell<u64>,
    is_main: Cell<bool>,
    /// Hand-overs so far: the name is checked at some of them (see `push_slow`).
    hand_overs: Cell<u32>,
    /// The length in bytes of the chunk handed over last (0 if it was empty): the
    /// `STAMP` that opens the next chunk carries it (see `format.rs`).
    last_len: Cell<u32>,
    /// The walks before `last_walk` from other places, the most recent first (see
    /// `record_stack`); null where one could not be allocated.
    other_walks: [Cell<*mut stack::LastWalk>; OTHER_WALKS],
}

/// How many walks from other places a thread keeps besides its latest: a loop that
/// allocates in a few places in turn (a `Box`, a `Vec` that grows, another `Vec`)
/// finds each place's walk again.
const OTHER_WALKS: usize = 3;

// SAFETY: the `Cell` fields are read and written only by the thread that owns the
// record (the one whose `CURRENT` points to it); other threads touch only the atomics.
unsafe impl Sync for ThreadRecord {}

/// `end` of a record the hot path is appending to: closed, and not to be held by a
/// slow path (which drops its event instead; see the module documentation).
const APPENDING: *mut u64 = ptr::without_provenance_mut(1);

/// The calling thread's record, if it is open for the hot path (see the module
/// documentation), and where its room ends.
#[inline(always)]
fn open_record() -> Option<(&'static ThreadRecord, *mut u64)> {
    let rec = CURRENT.with(|c| c.get());
    if (rec as usize) <= DISABLED {
        return None;
    }
    // SAFETY: a pointer above DISABLED in CURRENT is a record created by
    // `start_thread`, which is never freed.
    let rec = unsafe { &*rec };
    let end = rec.end.get();
    ((end as usize) > APPENDING as usize).then_some((rec, end))
}

/// The calling thread's open record, marked as appending until [`Hot::done`] or a
/// fallback opens it again.
#[inline(always)]
fn hot_record() -> Option<Hot> {
    let (rec, end) = open_record()?;
    rec.end.set(APPENDING);
    Some(Hot { rec, end })
}

/// A record the hot path is appending to, and where its buffer's room ends.
struct Hot {
    rec: &'static ThreadRecord,
    end: *mut u64,
}

impl Hot {
    /// Appends the event `event(delta)` stamped `ts`: the hot path's append. Falls
    /// back to [`ThreadRecord::append_slow`] when the buffer is full or the stamp's
    /// delta does not fit.
    #[inline(always)]
    fn append<const N: usize>(self, ts: u64, event: impl FnOnce(u64) -> [u64; N]) {
        let delta = ts - self.rec.clock.get();
        let cur = self.rec.cursor.load(Ordering::Relaxed);
        if delta <= MAX_DELTA && self.has_room(cur, N) {
            self.store(cur, event(delta), ts);
        } else {
            self.done();
            self.rec.append_slow(ts, event(0), None);
        }
    }

    /// Appends the record `words` (deltas relative to the stream clock) stamped `ts`,
    /// on the hot path, falling back to a held [`ThreadRecord::push`].
    #[inline(always)]
    fn append_words(self, ts: u64, words: &[u64]) {
        let cur = self.rec.cursor.load(Ordering::Relaxed);
        if self.has_room(cur, words.len()) {
            // SAFETY: as in `store`.
            unsafe {
                for (i, &word) in words.iter().enumerate() {
                    cur.add(i).write_volatile(word);
                }
            }
            self.commit(cur, words.len(), ts);
        } else {
            self.done();
            self.rec.push_held(words, ts, None);
        }
    }

    /// [`append_alloc`](Self::append_alloc) with the allocation's stack: out of line,
    /// so that the path without stacks keeps a small frame.
    #[inline(never)]
    fn alloc_with_stack<const ZEROED: bool>(self, addr: u64, layout: Layout) {
        let slot = self.rec.walk_stack();
        self.append_alloc(addr, layout, ZEROED, slot);
    }

    /// Appends an allocation: one `ALLOC_NEAR` word where it fits, else an `ALLOC`.
    #[inline(always)]
    fn append_alloc(self, addr: u64, layout: Layout, zeroed: bool, slot: u64) {
        let rec = self.rec;
        let (size, align) = (layout.size() as u64, align_log2(layout));
        let last = rec.clock.get();
        let ts = clock::stamp(last, addr as usize);
        let delta = ts - last;
        let cur = rec.cursor.load(Ordering::Relaxed);
        if self.has_room(cur, 2) {
            // A zeroed allocation does not fit either: as if its alignment were too large.
            let near_align = align | u64::from(zeroed) << 3;
            if let Some(word) = alloc_near(delta, addr, rec.near.get(), size, near_align, slot) {
                return self.store(cur, [word], ts);
            }
            if delta <= MAX_DELTA {
                let sw = size_word(size, align, slot, zeroed, false);
                rec.near.set(addr);
                return self.store(cur, [head(TAG_ALLOC, delta, addr), sw], ts);
            }
        }
        self.done();
        let sw = size_word(size, align, slot, zeroed, false);
        rec.append_slow(ts, [head(TAG_ALLOC, 0, addr), sw], Some(addr))
    }

    /// Whether `words` more words fit behind `cur` in the record's buffer.
    #[inline(always)]
    fn has_room(&self, cur: *mut u64, words: usize) -> bool {
        (cur as usize) + words * 8 <= self.end as usize
    }

    /// Stores the record `words` at `cur`, which [`has_room`](Self::has_room) for
    /// them, moves the cursor and the clock (to `ts`) past it, and opens the record
    /// again.
    ///
    /// The words are stored one by one: left to itself, the compiler spills them to
    /// the stack and copies them with one 16-byte load, which store forwarding cannot
    /// serve from two 8-byte stores: a stall of a dozen cycles on every event. The
    /// volatile stores keep them apart.
    #[inline(always)]
    fn store<const N: usize>(self, cur: *mut u64, words: [u64; N], ts: u64) {
        // SAFETY: `cur` is this thread's cursor in its own buffer, and `has_room`
        // found room for N words behind it (`end` is that buffer's).
        unsafe {
            for (i, word) in words.into_iter().enumerate() {
                cur.add(i).write_volatile(word);
            }
        }
        self.commit(cur, N, ts);
    }

    /// Moves the cursor past the `words` words just stored at `cur` and the clock to
    /// their stamp `ts`, and opens the record again.
    #[inline(always)]
    fn commit(self, cur: *mut u64, words: usize, ts: u64) {
        // Release: a snapshot that reads the new cursor also sees the words.
        self.rec
            .cursor
            .store(cur.wrapping_add(words), Ordering::Release);
        self.rec.clock.set(ts);
        self.done();
    }

    /// Opens the record again.
    #[inline(always)]
    fn done(&self) {
        self.rec.end.set(self.end);
    }
}

/// Runs `f` with the calling thread's record held (closed to the hot path, `busy`
/// set), unless the thread is not recorded or memscope is already at work on it
/// (re-entrant allocation). For the slow paths.
fn with_record(f: impl FnOnce(&ThreadRecord)) {
    let mut rec = CURRENT.with(|c| c.get());
    if (rec as usize) <= DISABLED {
        if !rec.is_null() {
            return;
        }
        rec = start_thread();
        if rec.is_null() {
            return;
        }
    }
    // SAFETY: a pointer above DISABLED in CURRENT is a record created by
    // `start_thread`, which is never freed.
    let rec = unsafe { &*rec };
    if rec.hold() {
        f(rec);
        rec.release();
    }
}

/// Records an allocation (`ZEROED`: a zeroed one) that the inner allocator just
/// returned.
#[inline(always)]
pub fn on_alloc<const ZEROED: bool>(addr: *mut u8, layout: Layout) {
    // Every path ends in a return or a tail call, so the hot one saves few registers.
    let Some(hot) = hot_record() else {
        return alloc_slow(addr as u64, layout, ZEROED);
    };
    if writer::stacks_enabled() {
        hot.alloc_with_stack::<ZEROED>(addr as u64, layout)
    } else {
        hot.append_alloc(addr as u64, layout, ZEROED, 0)
    }
}

/// Records a free of a block of `size` bytes that is about to be passed to the inner
/// allocator.
#[inline(always)]
pub fn on_free(addr: *mut u8, size: usize) {
    let Some(hot) = hot_record() else {
        return free_slow(addr as u64, size);
    };
    let ts = clock::stamp(hot.rec.clock.get(), addr as usize);
    hot.append(ts, |d| [head(TAG_FREE, d, addr as u64)]);
}

/// Stamps the free half of a reallocation, before the inner allocator is called;
/// 0 when the thread is not recorded. (The thread's clock moves to the stamps when
/// [`on_realloc`] records both halves.)
#[inline(always)]
pub fn before_realloc(old: *mut u8) -> u64 {
    match open_record() {
        Some((rec, _)) => clock::stamp(rec.clock.get(), old as usize),
        None => before_realloc_slow(old as usize),
    }
}

/// Records a reallocation whose free half was stamped `ts_before`.
#[inline(always)]
pub fn on_realloc(old: *mut u8, new: *mut u8, layout: Layout, new_size: usize, ts_before: u64) {
    let event = Realloc {
        old: old as u64,
        new: new as u64,
        old_size: layout.size(),
        new_size,
        align_log2: align_log2(layout),
        ts_before,
    };
    match hot_record() {
        Some(hot) if ts_before != 0 => {
            let slot = hot.rec.stack_slot();
            let (ts, words, n) = hot.rec.realloc_record(&event, slot);
            hot.append_words(ts, &words[..n]);
        }
        Some(hot) => {
            hot.done();
            realloc_slow(&event)
        }
        None => realloc_slow(&event),
    }
}

/// A reallocation's figures, from the hook to its record.
struct Realloc {
    old: u64,
    new: u64,
    old_size: usize,
    new_size: usize,
    align_log2: u64,
    ts_before: u64,
}

// The slow paths of the events: the thread is not recorded yet (or never), memscope
// is at work on it, a measurement is open, or it has exited.

#[cold]
#[inline(never)]
fn alloc_slow(addr: u64, layout: Layout, zeroed: bool) {
    measure::on_alloc(layout.size());
    with_record(|rec| {
        let slot = rec.stack_slot();
        let ts = clock::stamp(rec.clock.get(), addr as usize);
        let sw = size_word(
            layout.size() as u64,
            align_log2(layout),
            slot,
            zeroed,
            false,
        );
        rec.push_event(ts, |d| [head(TAG_ALLOC, d, addr), sw]);
        rec.near.set(addr);
    });
}

#[cold]
#[inline(never)]
fn free_slow(addr: u64, size: usize) {
    measure::on_free(size);
    with_record(|rec| {
        let ts = clock::stamp(rec.clock.get(), addr as usize);
        rec.push_event(ts, |d| [head(TAG_FREE, d, addr)]);
    });
}

#[cold]
#[inline(never)]
fn before_realloc_slow(old: usize) -> u64 {
    let mut ts = 0;
    with_record(|rec| ts = clock::stamp(rec.clock.get(), old));
    ts
}

#[cold]
#[inline(never)]
fn realloc_slow(event: &Realloc) {
    measure::on_realloc(event.old_size, event.new_size);
    if event.ts_before == 0 {
        return;
    }
    with_record(|rec| {
        let slot = rec.stack_slot();
        let (ts, words, n) = rec.realloc_record(event, slot);
        rec.push(&words[..n]);
        rec.clock.set(ts);
    });
}

/// Records that this thread entered (or, with `exit`, left) scope `id`: one `SCOPE`
/// word, stamped within the thread; false if the thread is not recorded. Ids must be
/// below 2^47 (they count up from 1 in each process).
#[inline(always)]
pub fn scope_event(id: u64, exit: bool) -> bool {
    let word = |d| [head(TAG_SCOPE, d, id << 1 | u64::from(exit))];
    match hot_record() {
        Some(hot) => {
            let ts = clock::stamp_thread(hot.rec.clock.get());
            hot.append(ts, word);
            true
        }
        None => {
            let mut done = false;
            with_record(|rec| {
                rec.push_event(clock::stamp_thread(rec.clock.get()), word);
                done = true;
            });
            done
        }
    }
}

/// Largest payload of an extended record that [`emit`] takes, in words.
const MAX_EXTENDED: usize = 256;

/// Appends an extended record `[head(EXTENDED, kind, 1 + n), stamp, payload…]`;
/// false if the thread is not recorded. Payloads are limited to 256 words. The stamp
/// orders the record among this thread's events only.
pub fn emit(kind: u64, payload: &[u64]) -> bool {
    emit_with(kind, payload, |rec| clock::stamp_thread(rec.clock.get()))
}

/// As [`emit`], stamped after every earlier record emitted with the same `key` on any
/// thread (through the address stripes of `clock.rs`): a task's creation, its polls
/// and its end, which executors move between threads.
pub fn emit_after(kind: u64, payload: &[u64], key: u64) -> bool {
    emit_with(kind, payload, |rec| {
        clock::stamp(rec.clock.get(), (key as usize) << 4)
    })
}

#[inline(always)]
fn emit_with(kind: u64, payload: &[u64], stamp: impl FnOnce(&ThreadRecord) -> u64) -> bool {
    if payload.len() > MAX_EXTENDED || kind == 0 || kind > 0xfff {
        return false;
    }
    let mut done = false;
    with_record(|rec| {
        let head = head(TAG_EXTENDED, kind, 1 + payload.len() as u64);
        let ts = stamp(rec);
        rec.push_extended(head, ts, payload);
        rec.clock.set(ts);
        done = true;
    });
    done
}

/// The stack slot of a stack hash: its top 12 bits (slot 0 means "no stack"; slot 1
/// takes its share).
#[inline(always)]
fn slot_of(hash: u64) -> u64 {
    (hash >> 52).max(1)
}

#[inline(always)]
fn align_log2(layout: Layout) -> u64 {
    layout.align().trailing_zeros() as u64
}

/// Where the payload of `buf` ends.
#[inline(always)]
fn payload_end(buf: *mut Buffer) -> *mut u64 {
    // SAFETY: `buf` points to a live `Buffer`; one past the end of its `words` array
    // is in bounds of the same allocation.
    unsafe { (*buf).words.as_mut_ptr().add(PAYLOAD_WORDS) }
}

/// Where the payload of `buf` starts.
#[inline(always)]
fn payload_start(buf: *mut Buffer) -> *mut u64 {
    // SAFETY: `buf` points to a live `Buffer`.
    unsafe { (*buf).words.as_mut_ptr() }
}

/// Marks the calling thread as never recorded from now on (the exiting thread, once
/// the trace is ending).
pub fn disable_current_thread() {
    CURRENT.with(|c| c.set(DISABLED as *const ThreadRecord));
}

/// Opens or closes the calling thread's record for the hot path after a
/// [`measure`](crate::measure) opened or closed on it.
pub fn reopen_current() {
    let rec = CURRENT.with(|c| c.get());
    if (rec as usize) > DISABLED {
        // SAFETY: see `with_record`.
        let rec = unsafe { &*rec };
        if rec.end.get() != APPENDING {
            rec.reopen();
        }
    }
}

/// First event of a thread: creates and registers its record.
#[cold]
#[inline(never)]
fn start_thread() -> *const ThreadRecord {
    CURRENT.with(|c| c.set(INITIALIZING as *const ThreadRecord));
    let rec = if writer::start() {
        ThreadRecord::create()
    } else {
        ptr::null()
    };
    if rec.is_null() {
        CURRENT.with(|c| c.set(DISABLED as *const ThreadRecord));
        return ptr::null();
    }
    CURRENT.with(|c| c.set(rec));
    // SAFETY: `rec` was just created and is never freed.
    let r = unsafe { &*rec };
    // Registering the guard's destructor may allocate; holding the record lets that
    // through. `try_with` fails only when the thread-locals are already being
    // destroyed, and then there is no later point to hand the buffer over: the
    // process-exit flush copies it instead.
    if r.hold() {
        let _ = EXIT.try_with(|_| ());
        r.release();
    }
    rec
}

/// Hands the thread's last buffer over when its thread-locals are destroyed.
struct ExitGuard;

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let rec = CURRENT.with(|c| c.get());
        if (rec as usize) <= DISABLED {
            return;
        }
        // SAFETY: see `with_record`.
        let rec = unsafe { &*rec };
        let held = rec.hold();
        rec.finish();
        if held {
            rec.release();
        }
    }
}

/// A new, empty stack walk from `System` (null if that fails, which the walks allow).
fn empty_walk() -> *mut stack::LastWalk {
    // SAFETY: non-zero-size layout; all zeroes is an empty `LastWalk` (plain integers
    // and bools).
    unsafe { System.alloc_zeroed(Layout::new::<stack::LastWalk>()) as *mut stack::LastWalk }
}

impl ThreadRecord {
    fn create() -> *const ThreadRecord {
        let Some(pool) = writer::pool() else {
            return ptr::null();
        };
        let Some(buf) = pool.take() else {
            return ptr::null();
        };
        // SAFETY: non-zero-size layout; the result is checked for null below.
        let cache = unsafe { System.alloc_zeroed(Layout::new::<[u64; STACK_CACHE]>()) } as *mut u64;
        let (stack_low, stack_top) = sys::stack_bounds();
        let record = ThreadRecord {
            cursor: AtomicPtr::new(payload_start(buf.as_ptr())),
            end: Cell::new(ptr::null_mut()),
            clock: Cell::new(0),
            near: Cell::new(0),
            stack_cache: Cell::new(cache),
            last_walk: Cell::new(empty_walk()),
            busy: Cell::new(false),
            tid: NEXT_TID.fetch_add(1, Ordering::Relaxed),
            gen: AtomicU32::new(0),
            buf: AtomicPtr::new(buf.as_ptr()),
            alive: AtomicBool::new(true),
            next: AtomicPtr::new(ptr::null_mut()),
            snapshotted: AtomicU64::new(0),
            stack_top,
            stack_low,
            name: Cell::new([0; 16]),
            os_tid: Cell::new(0),
            is_main: Cell::new(false),
            hand_overs: Cell::new(0),
            last_len: Cell::new(0),
            other_walks: std::array::from_fn(|_| Cell::new(empty_walk())),
        };
        // SAFETY: non-zero-size layout.
        let rec = unsafe { System.alloc(Layout::new::<ThreadRecord>()) } as *mut ThreadRecord;
        if rec.is_null() {
            pool.give_back(buf);
            return ptr::null();
        }
        // SAFETY: `rec` is freshly allocated with the layout of a ThreadRecord.
        unsafe { rec.write(record) };
        // SAFETY: just initialised; records are never freed.
        let r = unsafe { &*rec };
        r.note_os_thread();
        r.note_name();

        // Publish in the process-wide list (Treiber-stack push).
        let mut head = RECORDS.load(Ordering::Relaxed);
        loop {
            r.next.store(head, Ordering::Relaxed);
            match RECORDS.compare_exchange_weak(head, rec, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => break,
                Err(h) => head = h,
            }
        }
        rec
    }

    /// Closes the record while memscope works on this thread (see the module
    /// documentation); false if it already is at work (a re-entrant allocation) or
    /// the hot path is appending (the stack walk's slow part, or an allocation in a
    /// signal handler that interrupted it).
    fn hold(&self) -> bool {
        if self.busy.get() || self.end.get() == APPENDING {
            return false;
        }
        self.busy.set(true);
        self.end.set(ptr::null_mut());
        true
    }

    /// Ends a [`hold`](Self::hold).
    fn release(&self) {
        self.busy.set(false);
        self.reopen();
    }

    /// Opens the record to the hot path, unless memscope is at work on the thread, a
    /// measurement is open on it, or it has no buffer (it exited).
    fn reopen(&self) {
        let buf = self.buf.load(Ordering::Relaxed);
        let open = !self.busy.get() && !buf.is_null() && !measure::is_open();
        self.end.set(if open {
            payload_end(buf)
        } else {
            ptr::null_mut()
        });
    }

    /// The hot path's event when it does not fit the buffer or its stamp is too far
    /// from the clock: `words` (stamp delta 0) behind a `STAMP` of `ts`; `near` is the
    /// address of a full `ALLOC`. (The words are taken by value, so that the hot path
    /// can jump here.)
    #[cold]
    #[inline(never)]
    fn append_slow<const N: usize>(&self, ts: u64, words: [u64; N], near: Option<u64>) {
        let mut record = [0u64; 2 + MAX_EVENT_WORDS];
        record[0] = head(TAG_STAMP, 0, 0);
        record[1] = ts;
        record[2..2 + N].copy_from_slice(&words);
        self.push_held(&record[..2 + N], ts, near);
    }

    /// Pushes `words`, moves the clock to `ts` and, for a full `ALLOC`, the near
    /// address to `near`, holding the record meanwhile (the hot path's fallback). All
    /// of it before the release: a signal handler may append as soon as the record is
    /// open again, and its own `ALLOC` moves the near address.
    #[cold]
    #[inline(never)]
    fn push_held(&self, words: &[u64], ts: u64, near: Option<u64>) {
        let held = self.hold();
        self.push(words);
        self.clock.set(ts);
        if let Some(addr) = near {
            self.near.set(addr);
        }
        if held {
            self.release();
        }
    }

    /// Appends the event `event(delta)` stamped `ts` on a slow path (the record held):
    /// behind a `STAMP` when the delta does not fit.
    fn push_event<const N: usize>(&self, ts: u64, event: impl FnOnce(u64) -> [u64; N]) {
        let delta = ts - self.clock.get();
        if delta <= MAX_DELTA {
            self.push(&event(delta));
        } else {
            self.push(&[head(TAG_STAMP, 0, 0), ts]);
            self.clock.set(ts);
            self.push(&event(0));
        }
        self.clock.set(ts);
    }

    /// The record of a reallocation whose alloc half has stack `slot`: its stamp
    /// (the alloc half's), its words and how many there are.
    #[inline(always)]
    fn realloc_record(&self, r: &Realloc, slot: u64) -> (u64, [u64; MAX_EVENT_WORDS], usize) {
        let ts_after = clock::stamp(r.ts_before, r.new as usize);
        let sw = size_word(r.new_size as u64, r.align_log2, slot, false, false);
        let base = self.clock.get();
        let before = r.ts_before.wrapping_sub(base);
        let after = ts_after - r.ts_before;
        if r.ts_before >= base && before <= MAX_DELTA && after <= MAX_DELTA {
            let words = [
                head(TAG_REALLOC, before, r.old),
                head(0, after, r.new),
                sw,
                0,
                0,
            ];
            (ts_after, words, 3)
        } else {
            let words = [
                head(TAG_REALLOC_WIDE, 0, r.old),
                r.new,
                sw,
                r.ts_before,
                ts_after,
            ];
            (ts_after, words, 5)
        }
    }

    /// Appends one record whose stamp deltas are relative to the stream clock, on a
    /// slow path (the record held). The words must fit an empty buffer.
    fn push(&self, words: &[u64]) {
        let buf = self.buf.load(Ordering::Relaxed);
        let cur = self.cursor.load(Ordering::Relaxed);
        if buf.is_null() || (cur as usize) + words.len() * 8 > payload_end(buf) as usize {
            return self.push_slow(words);
        }
        // SAFETY: `cur` is this thread's cursor in its own buffer `buf`, with room for
        // the record behind it (checked above).
        unsafe { ptr::copy_nonoverlapping(words.as_ptr(), cur, words.len()) };
        // Release: a snapshot that reads the new cursor also sees the words.
        self.cursor
            .store(cur.wrapping_add(words.len()), Ordering::Release);
    }

    /// Appends the extended record `[head, stamp, payload…]` (see [`emit`]) straight
    /// into the buffer, as [`push`](Self::push) would after staging it: one store per
    /// word for the one-word payloads of scope entries and exits (a call to `memcpy`
    /// and a staging copy cost more than the rest of the event).
    #[inline(always)]
    fn push_extended(&self, head: u64, stamp: u64, payload: &[u64]) {
        let words = 2 + payload.len();
        let buf = self.buf.load(Ordering::Relaxed);
        let cur = self.cursor.load(Ordering::Relaxed);
        if buf.is_null() || (cur as usize) + words * 8 > payload_end(buf) as usize {
            return self.push_extended_slow(head, stamp, payload);
        }
        // SAFETY: as in `push`: `cur` is this thread's cursor in its own buffer, and
        // the record's `words` words fit behind it (checked above).
        unsafe {
            cur.write(head);
            cur.add(1).write(stamp);
            match payload {
                [word] => cur.add(2).write(*word),
                _ => ptr::copy_nonoverlapping(payload.as_ptr(), cur.add(2), payload.len()),
            }
        }
        // Release: a snapshot that reads the new cursor also sees the words.
        self.cursor
            .store(cur.wrapping_add(words), Ordering::Release);
    }

    /// [`push_extended`](Self::push_extended) when the record does not fit: staged, then
    /// pushed after the hand-over.
    #[cold]
    #[inline(never)]
    fn push_extended_slow(&self, head: u64, stamp: u64, payload: &[u64]) {
        // Not zero-filled: only the words written below are read.
        let mut words = [std::mem::MaybeUninit::<u64>::uninit(); MAX_EXTENDED + 2];
        words[0].write(head);
        words[1].write(stamp);
        for (slot, &word) in words[2..].iter_mut().zip(payload) {
            slot.write(word);
        }
        // SAFETY: the first `2 + payload.len()` words were written just above
        // (`emit` checked that the payload fits).
        let record = unsafe {
            &*(&words[..2 + payload.len()] as *const [std::mem::MaybeUninit<u64>] as *const [u64])
        };
        self.push(record);
    }

    /// The buffer is full (or gone): hand it over and start the next chunk with the
    /// stream clock, so that every chunk decodes on its own.
    #[cold]
    #[inline(never)]
    fn push_slow(&self, words: &[u64]) {
        let held = self.hold();
        let base = self.clock.get();
        if self.alive.load(Ordering::Relaxed) {
            self.hand_over(true);
            // The next chunk opens with the stream clock and the length of the chunk
            // just handed over, which tells a reader following the file as it grows
            // that it has that chunk whole.
            self.push(&[head(TAG_STAMP, 0, u64::from(self.last_len.get())), base]);
            // The name is asked of the kernel (a system call) at the first hand-overs,
            // when a new thread is usually named, then at every 16th; the thread's end
            // and the process's always ask. The last name is the thread's.
            let n = self.hand_overs.get().wrapping_add(1);
            self.hand_overs.set(n);
            if n.is_power_of_two() || n.is_multiple_of(16) {
                self.note_name();
            }
            self.push(words);
        } else {
            // After the thread's exit flush: one chunk per event.
            match writer::pool().and_then(|p| p.take()) {
                Some(buf) => {
                    let gen = self.gen.fetch_add(2, Ordering::Relaxed);
                    let stamp = [head(TAG_STAMP, 0, u64::from(self.last_len.get())), base];
                    // SAFETY: the buffer was just taken from the pool and is ours; the
                    // two records fit easily.
                    unsafe {
                        let dst = payload_start(buf.as_ptr());
                        ptr::copy_nonoverlapping(stamp.as_ptr(), dst, 2);
                        ptr::copy_nonoverlapping(words.as_ptr(), dst.add(2), words.len());
                    }
                    let len = (2 + words.len()) * 8;
                    self.last_len.set(len as u32);
                    writer::submit(buf, self.tid, gen / 2, len);
                }
                None => writer::dropped(1),
            }
        }
        if held {
            self.release();
        }
    }

    /// Bytes of records in the current buffer.
    fn len(&self) -> usize {
        let buf = self.buf.load(Ordering::Relaxed);
        if buf.is_null() {
            return 0;
        }
        let cur = self.cursor.load(Ordering::Relaxed);
        (cur as usize).wrapping_sub(payload_start(buf) as usize)
    }

    /// Copies the buffer's records into a pool buffer for the writer and empties it;
    /// unless `keep`, also gives the buffer up (the thread is ending).
    ///
    /// The thread's own buffer never leaves it: its cache lines stay in this core's
    /// cache, so appending an event is a store that hits. The bulk copy is cheap next
    /// to storing every event into memory that another core read last.
    fn hand_over(&self, keep: bool) {
        let Some(pool) = writer::pool() else { return };
        let len = self.len();
        if keep && len == 0 {
            return;
        }
        let gen = self.gen.load(Ordering::Relaxed);
        self.gen.store(gen + 1, Ordering::Relaxed);
        fence(Ordering::Release);
        let own = self.buf.load(Ordering::Relaxed);
        self.last_len.set(0);
        if let Some(own) = NonNull::new(own).filter(|_| len > 0) {
            match pool.take() {
                Some(out) => {
                    // SAFETY: `own` is this thread's buffer with `len` bytes written;
                    // `out` was just taken from the pool and is ours; both hold
                    // PAYLOAD_BYTES >= len.
                    unsafe {
                        ptr::copy_nonoverlapping(
                            (*own.as_ptr()).words.as_ptr(),
                            (*out.as_ptr()).words.as_mut_ptr(),
                            len / 8,
                        )
                    };
                    self.last_len.set(len as u32);
                    writer::submit(out, self.tid, gen / 2, len);
                }
                None => writer::dropped(1),
            }
        }
        if keep {
            self.cursor.store(payload_start(own), Ordering::Relaxed);
        } else {
            self.buf.store(ptr::null_mut(), Ordering::Relaxed);
            self.cursor.store(ptr::null_mut(), Ordering::Relaxed);
            if let Some(own) = NonNull::new(own) {
                pool.give_back(own);
            }
        }
        // The next chunk's `ALLOC_NEAR` records are relative to its own `ALLOC`s.
        self.near.set(0);
        self.gen.store(gen + 2, Ordering::Release);
    }

    /// The thread is ending: write out what it recorded.
    fn finish(&self) {
        if !self.alive.load(Ordering::Relaxed) {
            return;
        }
        self.note_name();
        self.alive.store(false, Ordering::Release);
        self.hand_over(false);
        let cache = self.stack_cache.replace(ptr::null_mut());
        if !cache.is_null() {
            // SAFETY: allocated in `create` with this layout; no longer referenced.
            unsafe { System.dealloc(cache as *mut u8, Layout::new::<[u64; STACK_CACHE]>()) };
        }
        for walk in std::iter::once(&self.last_walk).chain(&self.other_walks) {
            let walk = walk.replace(ptr::null_mut());
            if !walk.is_null() {
                // SAFETY: allocated by `empty_walk` with this layout; no longer referenced.
                unsafe { System.dealloc(walk as *mut u8, Layout::new::<stack::LastWalk>()) };
            }
        }
    }

    /// Reads the calling thread's OS id and whether it is the main thread.
    fn note_os_thread(&self) {
        let os_tid = sys::os_tid();
        self.os_tid.set(os_tid);
        self.is_main.set(os_tid == u64::from(std::process::id()));
    }

    /// Writes a Thread record if the OS name changed since the last one.
    fn note_name(&self) {
        let mut name = [0u8; 16];
        let mut len = sys::thread_name(&mut name);
        let os_tid = self.os_tid.get();
        if self.is_main.get() {
            name = *b"main\0\0\0\0\0\0\0\0\0\0\0\0";
            len = 4;
        }
        if name == self.name.get() {
            return;
        }
        self.name.set(name);
        let mut words = [0u64; 4];
        words[0] = head(TAG_THREAD, len as u64, 0);
        words[1] = os_tid;
        words[2] = u64::from_le_bytes(name[0..8].try_into().unwrap_or_default());
        words[3] = u64::from_le_bytes(name[8..16].try_into().unwrap_or_default());
        self.push(&words[..2 + len.div_ceil(8)]);
    }

    /// The slot of the current call stack in this thread's stream, writing the stack
    /// first if the slot does not hold it yet; 0 when stacks are off.
    #[inline(always)]
    fn stack_slot(&self) -> u64 {
        if !writer::stacks_enabled() {
            return 0;
        }
        self.walk_stack()
    }

    /// [`stack_slot`](Self::stack_slot) with stacks on, inlined into its caller (the
    /// walk starts at the caller's frame): the common case, the thread's previous
    /// stack again and already written, needs a few registers; the rest
    /// ([`record_stack`](Self::record_stack)) a large frame, out of line.
    #[inline(always)]
    fn walk_stack(&self) -> u64 {
        let start = stack::registers();
        if let Some(last) = NonNull::new(self.last_walk.get()) {
            // SAFETY: allocated in `create` for this thread, used only by it; `start`
            // is the frame of the function this is inlined into.
            if let Some((_, hash)) = unsafe { stack::again(last.as_ref(), start.0) } {
                let slot = slot_of(hash);
                let cache = self.stack_cache.get();
                // SAFETY: `cache` has STACK_CACHE entries and `slot < STACK_CACHE`.
                if !cache.is_null() && unsafe { *cache.add(slot as usize) } == hash {
                    return slot;
                }
            }
        }
        self.record_stack(start)
    }

    /// Walks the stack from the frame `start` of the function
    /// [`walk_stack`](Self::walk_stack) is inlined into, which is waiting for this to
    /// return; writes it if its slot does not hold it yet.
    #[inline(never)]
    fn record_stack(&self, start: (usize, usize)) -> u64 {
        let mut spare;
        let others = &self.other_walks;
        // SAFETY (all the walks): `start` is the frame and stack pointer of
        // `walk_stack`'s caller, which waits for us to return; or, if it jumped here (a
        // tail call), of the frame this function then built in its place, at the same
        // address with the same saved frame pointer and return address. Either way both
        // lie in the live part of this thread's stack. The thread's walks hold only its
        // own; they were allocated in `create` for it, are used only by it, and are
        // distinct (so a reference to one never aliases another).
        let all_kept = others.iter().all(|w| !w.get().is_null());
        let (len, hash, last) = match NonNull::new(self.last_walk.get()) {
            Some(mut latest) if all_kept => {
                // SAFETY: see above.
                let latest = unsafe { latest.as_mut() };
                // The latest walk again (its stack's slot in the cache was taken).
                // SAFETY: see above.
                match unsafe { stack::again(latest, start.0) } {
                    Some((len, hash)) => (len, hash, &*latest),
                    None => {
                        // Another kept walk again, or a walk into the oldest one.
                        let again = |j: usize| {
                            // SAFETY: see above.
                            unsafe { stack::again(&*others[j].get(), start.0) }.map(|w| (j, w))
                        };
                        let (j, (len, hash)) =
                            (0..OTHER_WALKS - 1).find_map(again).unwrap_or_else(|| {
                                let oldest = OTHER_WALKS - 1;
                                // SAFETY: see above.
                                let into = unsafe { &mut *others[oldest].get() };
                                // SAFETY: see above.
                                (oldest, unsafe {
                                    stack::capture_beside(start, self.stack_top, latest, into)
                                })
                            });
                        // That walk becomes the latest; the ones before it move down.
                        let walk = others[j].get();
                        for k in (1..=j).rev() {
                            others[k].set(others[k - 1].get());
                        }
                        others[0].set(self.last_walk.replace(walk));
                        // SAFETY: see above.
                        (len, hash, unsafe { &*walk })
                    }
                }
            }
            Some(mut latest) => {
                // SAFETY: see above.
                let latest = unsafe { latest.as_mut() };
                // SAFETY: see above.
                let (len, hash) = unsafe { stack::capture_from(start, self.stack_top, latest) };
                (len, hash, &*latest)
            }
            None => {
                spare = stack::LastWalk::EMPTY;
                // SAFETY: see above.
                let (len, hash) = unsafe { stack::capture_from(start, self.stack_top, &mut spare) };
                (len, hash, &spare)
            }
        };
        if len == 0 {
            return 0;
        }
        let slot = slot_of(hash);
        let cache = self.stack_cache.get();
        if !cache.is_null() {
            // SAFETY: `cache` has STACK_CACHE entries and `slot < STACK_CACHE`.
            let cached = unsafe { &mut *cache.add(slot as usize) };
            if *cached == hash {
                return slot;
            }
            *cached = hash;
        }
        let mut words = [0u64; MAX_FRAMES + 1];
        words[0] = head(TAG_STACK, len as u64, slot);
        for (i, word) in words[1..=len].iter_mut().enumerate() {
            *word = last.frame(i);
        }
        self.push(&words[..=len]);
        slot
    }

    /// Copies the complete part of this (possibly running) thread's current buffer
    /// into `out`; returns the chunk index and length, or `None` if there is nothing.
    fn snapshot(&self, out: &mut Buffer) -> Option<(u32, usize)> {
        for _ in 0..1000 {
            let g1 = self.gen.load(Ordering::Acquire);
            if g1 % 2 == 1 {
                std::thread::yield_now();
                continue;
            }
            let buf = self.buf.load(Ordering::Relaxed);
            let cur = self.cursor.load(Ordering::Acquire);
            if buf.is_null() || cur.is_null() {
                return None;
            }
            // The cursor lies in `buf` unless a hand-over is under way; then `gen`
            // tells, below, and the length only has to stay in bounds.
            let len = (cur as usize)
                .wrapping_sub(payload_start(buf) as usize)
                .min(PAYLOAD_BYTES)
                & !7;
            if len == 0 {
                return None;
            }
            // SAFETY: buffers are never freed while the process runs (they return to
            // the pool), so `buf` is readable. Its first `len` bytes are complete and
            // the owner only appends behind them until it hands the buffer over; a
            // hand-over during the copy changes `gen`, and the copy is then discarded
            // (seqlock read). Volatile reads keep the compiler from assuming more.
            unsafe {
                let src = (*buf).words.as_ptr();
                for i in 0..len / 8 {
                    out.words[i] = ptr::read_volatile(src.add(i));
                }
            }
            fence(Ordering::Acquire);
            if self.gen.load(Ordering::Relaxed) == g1 {
                return Some((g1 / 2, len));
            }
        }
        None
    }
}

/// The calling thread's record, if it is recorded (compare with [`running_stacks`]).
pub fn current() -> *const ThreadRecord {
    let rec = CURRENT.with(|c| c.get());
    if (rec as usize) <= DISABLED {
        ptr::null()
    } else {
        rec
    }
}

/// The stacks, `[low, high)`, of the recorded threads still running, but `me`'s; and
/// `me`'s stack top (0 if unknown). For the exit-time scan.
pub fn running_stacks(me: *const ThreadRecord) -> (Vec<(usize, usize)>, usize) {
    let mut stacks = Vec::new();
    let mut my_top = 0;
    for_each_record(|r| {
        if ptr::eq(r, me) {
            my_top = r.stack_top;
        } else if r.alive.load(Ordering::Acquire) && r.stack_low < r.stack_top {
            stacks.push((r.stack_low, r.stack_top));
        }
    });
    (stacks, my_top)
}

/// Calls `f` for every record of the process.
fn for_each_record(mut f: impl FnMut(&ThreadRecord)) {
    let mut rec = RECORDS.load(Ordering::Acquire);
    while !rec.is_null() {
        // SAFETY: records in the list are initialised before being published (Release
        // in `create`, Acquire above) and never freed.
        let r = unsafe { &*rec };
        f(r);
        rec = r.next.load(Ordering::Relaxed);
    }
}

/// At process exit: hands over the calling thread's buffer, then snapshots the
/// others (see [`snapshot_running`]).
pub fn flush_all(scratch: NonNull<Buffer>, write: impl FnMut(u32, u32, usize)) {
    let me = CURRENT.with(|c| c.get());
    if (me as usize) > DISABLED {
        // SAFETY: see `with_record`.
        let me = unsafe { &*me };
        let held = me.hold();
        me.note_name();
        me.hand_over(true);
        if held {
            me.release();
        }
    }
    snapshot_running(scratch, write);
}

/// Copies the complete part of every other running thread's buffer into `scratch`
/// and passes it to `write` as chunk `(thread, index, len)`, unless it did not grow
/// since the last snapshot. Used every 100 ms by the writer, so that a process that
/// is killed loses little, and at exit.
pub fn snapshot_running(scratch: NonNull<Buffer>, mut write: impl FnMut(u32, u32, usize)) {
    let me = CURRENT.with(|c| c.get());
    for_each_record(|r| {
        if ptr::eq(r, me) || !r.alive.load(Ordering::Acquire) {
            return;
        }
        // SAFETY: `scratch` belongs to the caller, who lends it to us exclusively.
        if let Some((index, len)) = r.snapshot(unsafe { &mut *scratch.as_ptr() }) {
            let mark = (u64::from(index) << 32) | len as u64;
            if r.snapshotted.swap(mark, Ordering::Relaxed) != mark {
                write(r.tid, index, len);
            }
        }
    });
}

/// In a child process right after `fork`: only the forking thread exists, and what
/// the parent recorded is the parent's to write. Drops the inherited events.
pub fn reset_after_fork() {
    let me = CURRENT.with(|c| c.get());
    for_each_record(|r| {
        if !ptr::eq(r, me) {
            r.alive.store(false, Ordering::Relaxed);
            r.buf.store(ptr::null_mut(), Ordering::Relaxed);
        }
    });
    if (me as usize) > DISABLED {
        // SAFETY: see `with_record`; this thread owns `me`.
        let me = unsafe { &*me };
        let buf = me.buf.load(Ordering::Relaxed);
        if !buf.is_null() {
            me.cursor.store(payload_start(buf), Ordering::Relaxed);
        }
        me.gen.store(0, Ordering::Relaxed);
        me.clock.set(0);
        me.near.set(0);
        me.name.set([0; 16]);
        me.note_os_thread();
        let cache = me.stack_cache.get();
        if !cache.is_null() {
            // SAFETY: `cache` has STACK_CACHE entries: forget which stacks were written
            // (they went to the parent's trace).
            unsafe { ptr::write_bytes(cache, 0, STACK_CACHE) };
        }
        if me.hold() {
            me.note_name();
            me.release();
        }
    }
}
