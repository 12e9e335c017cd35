//! The trace file: process-wide set-up, the writer thread, and the exit and fork paths.
//!
//! Threads hand full buffers to a lock-free queue (crossbeam `ArrayQueue`); a writer
//! thread, started with the trace at the process's first event, writes each as one
//! chunk with one `write` and returns the buffer to the pool. If the queue is full or no writer thread could
//! be started, the handing thread writes the chunk itself. File writes are serialised
//! by a spin lock (not a mutex: after `fork` the child resets it, whoever held it).
//!
//! At process exit (`atexit`) the exiting thread drains the queue, copies the
//! complete part of every running thread's buffer, and ends the file with the
//! modules, a clock sample and an `End` record; nothing is written after that. A
//! process killed before that leaves every chunk written so far, which is what a
//! reader can use.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Once, OnceLock};
use std::time::Duration;

use crossbeam_queue::ArrayQueue;

use crate::buffer::{Buffer, Full, Pool};
use crate::format::{
    Encoder, EndReason, FileHeader, Record, FLAG_FORKED, FLAG_STACKS, META_THREAD, VERSION,
};
use crate::{clock, reach, recorder, sys};

/// Buffers that may wait for the writer at once (64 MiB).
const QUEUE_CAPACITY: usize = 4096;

struct Shared {
    pool: Pool,
    full: ArrayQueue<Full>,
}

static INIT: Once = Once::new();
static ENABLED: AtomicBool = AtomicBool::new(false);
static STACKS: AtomicBool = AtomicBool::new(true);
/// Whether blocks live at exit are scanned for pointers (`MEMSCOPE_LEAK_SCAN=0` turns
/// it off); never in a fork child, whose trace lacks the blocks it inherited.
static SCAN: AtomicBool = AtomicBool::new(true);
static SHARED: OnceLock<Shared> = OnceLock::new();
/// The trace file's descriptor, or -1 before it is opened.
static FD: AtomicI32 = AtomicI32::new(-1);
/// Serialises writes to `FD`.
static FILE_LOCK: AtomicBool = AtomicBool::new(false);
/// Set once the exit flush has written the end of the trace.
static FINISHED: AtomicBool = AtomicBool::new(false);
static WRITER_STARTED: AtomicBool = AtomicBool::new(false);
/// Set when the exit flush begins: no writer thread is started any more.
static EXITING: AtomicBool = AtomicBool::new(false);
static DROPPED: AtomicU64 = AtomicU64::new(0);
static META_INDEX: AtomicU32 = AtomicU32::new(0);

/// Whether call stacks are recorded (`MEMSCOPE_STACKS=0` turns them off).
#[inline(always)]
pub fn stacks_enabled() -> bool {
    STACKS.load(Ordering::Relaxed)
}

/// The buffer pool; `None` only before [`start`] ran.
pub fn pool() -> Option<&'static Pool> {
    SHARED.get().map(|shared| &shared.pool)
}

/// Counts events that could not be recorded (out of memory, failed writes).
pub fn dropped(n: u64) {
    DROPPED.fetch_add(n, Ordering::Relaxed);
}

/// Sets up tracking for the process once; false if it is off (no trace file).
pub fn start() -> bool {
    INIT.call_once(|| {
        clock::tick();
        if let Some(v) = sys::getenv(c"MEMSCOPE_STACKS") {
            STACKS.store(v != b"0", Ordering::Relaxed);
        }
        if let Some(v) = sys::getenv(c"MEMSCOPE_LEAK_SCAN") {
            SCAN.store(v != b"0", Ordering::Relaxed);
        }
        let _ = SHARED.set(Shared {
            pool: Pool::new(),
            full: ArrayQueue::new(QUEUE_CAPACITY),
        });
        if open_trace_file(false) {
            // SAFETY: registering plain `extern "C"` functions with no captured state.
            unsafe {
                libc::atexit(exit_flush);
                libc::pthread_atfork(None, None, Some(after_fork_in_child));
            }
            ENABLED.store(true, Ordering::Release);
            start_writer();
        }
    });
    ENABLED.load(Ordering::Acquire)
}

/// Opens `$MEMSCOPE_OUT/memscope-<pid>-<ns>.mstrace` and writes the file header and
/// the first meta records; `forked` in a fork child.
fn open_trace_file(forked: bool) -> bool {
    let dir = sys::getenv(c"MEMSCOPE_OUT").unwrap_or(b".");
    let dir = String::from_utf8_lossy(dir);
    let start = clock::unix_ns();
    let path = format!("{dir}/memscope-{}-{start}.mstrace", std::process::id());
    let Ok(cpath) = std::ffi::CString::new(path.clone()) else {
        return false;
    };
    // SAFETY: `cpath` is NUL-terminated; the flags and mode are plain integers.
    let fd = unsafe {
        libc::open(
            cpath.as_ptr(),
            // Read as well: the exit-time scan reads the trace back (see `reach.rs`).
            libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
            0o644,
        )
    };
    if fd < 0 {
        warn(&format!(
            "cannot create the trace file {path}: {}",
            std::io::Error::last_os_error()
        ));
        return false;
    }
    FD.store(fd, Ordering::Release);
    let header = FileHeader {
        version: VERSION,
        flags: if stacks_enabled() { FLAG_STACKS } else { 0 }
            | if forked { FLAG_FORKED } else { 0 },
        pid: std::process::id(),
        // SAFETY: getppid cannot fail.
        ppid: unsafe { libc::getppid() } as u32,
        start_unix_ns: start,
    };
    let meta = meta_chunk(Meta::Modules);
    with_file(|fd| {
        write_all(fd, &header.encode());
        write_all(fd, &meta);
    });
    true
}

/// What goes into the meta stream now and then.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Meta {
    /// A clock sample (every 100 ms).
    Clock,
    /// A clock sample and the loaded modules (at start).
    Modules,
    /// A clock sample, the modules and the end of the trace (at exit).
    End,
}

/// A meta chunk (header and payload), built before taking the file lock: building
/// it allocates, and an allocation must never wait for the lock it might need.
fn meta_chunk(what: Meta) -> Vec<u8> {
    let mut enc = Encoder::default();
    let ts = clock::counter();
    enc.record(&Record::Clock {
        ts,
        monotonic_ns: clock::monotonic_ns(),
        unix_ns: clock::unix_ns(),
    });
    if what != Meta::Clock {
        for m in sys::modules() {
            enc.record(&Record::Module {
                bias: m.bias,
                start: m.start,
                end: m.end,
                path: m.path,
            });
        }
    }
    if what == Meta::End {
        let dropped = DROPPED.load(Ordering::Relaxed);
        enc.record(&Record::End {
            reason: EndReason::Exit as u8,
            ts,
            dropped,
        });
    }
    as_meta_chunk(enc)
}

/// The next chunk of the meta stream, with the records in `enc`.
fn as_meta_chunk(enc: Encoder) -> Vec<u8> {
    let header = crate::format::ChunkHeader {
        thread: META_THREAD,
        index: META_INDEX.fetch_add(1, Ordering::Relaxed),
        len: enc.bytes.len() as u32,
        checksum: crate::format::checksum(&enc.bytes),
    };
    let mut chunk = header.encode().to_vec();
    chunk.extend_from_slice(&enc.bytes);
    chunk
}

/// Hands a full buffer to the writer (or writes it now if the writer can't take it).
pub fn submit(buf: NonNull<Buffer>, thread: u32, index: u32, len: usize) {
    let Some(shared) = SHARED.get() else { return };
    let full = Full {
        buf,
        thread,
        index,
        len,
    };
    if !WRITER_STARTED.load(Ordering::Relaxed) {
        start_writer();
    }
    if WRITER_STARTED.load(Ordering::Acquire) {
        match shared.full.push(full) {
            Ok(()) => {}
            Err(full) => write_full(shared, full),
        }
    } else {
        // No writer thread to advance the coarse clock: the hand-overs do.
        clock::tick();
        write_full(shared, full);
    }
}

fn write_full(shared: &Shared, mut full: Full) {
    with_file(|fd| write_all(fd, full.bytes()));
    shared.pool.give_back(full.buf);
}

/// Starts the writer thread if it is not running: when the trace opens (the process's
/// first event, during std's start-up), so that its snapshots keep the events of a
/// program killed before it filled a buffer; again at a hand-over if that failed.
/// It is a raw pthread, which std does not know about: its start changes nothing std
/// allocates (the exactness test compares every scenario with dhat-rs).
fn start_writer() {
    if EXITING.load(Ordering::Relaxed) || WRITER_STARTED.swap(true, Ordering::AcqRel) {
        return;
    }
    extern "C" fn run(_: *mut libc::c_void) -> *mut libc::c_void {
        writer_loop();
        std::ptr::null_mut()
    }
    // A raw pthread, not a std thread: std's thread start-up allocates (the thread's
    // name, its stack-overflow bookkeeping in a map shared with the program's threads),
    // which would change what the program's own threads allocate. All signals are
    // blocked in it, so the program's signal handlers never run on memscope's thread.
    // SAFETY: plain libc calls with valid pointers to locals; `run` matches the start
    // routine's type and uses no argument. The thread is detached: nobody joins it.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let mut thread: libc::pthread_t = std::mem::zeroed();
        let rc = libc::pthread_create(&mut thread, std::ptr::null(), run, std::ptr::null_mut());
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        if rc == 0 {
            libc::pthread_setname_np(thread, c"memscope-writer".as_ptr());
            libc::pthread_detach(thread);
        } else {
            WRITER_STARTED.store(false, Ordering::Release);
        }
    }
}

/// How often the writer snapshots running threads and samples the clock.
const SNAPSHOT_EVERY: Duration = Duration::from_millis(100);

fn writer_loop() {
    // What this thread allocates (meta records) is memscope's, and freed on the spot.
    recorder::disable_current_thread();
    let Some(shared) = SHARED.get() else { return };
    let Some(scratch) = shared.pool.take() else {
        return;
    };
    let mut last_snapshot = std::time::Instant::now();
    loop {
        // At exit: a share of the scan of the blocks still live, if it is large.
        crate::reach::HELP.take_part();
        clock::tick();
        let mut wrote = 0;
        let due = last_snapshot.elapsed() >= SNAPSHOT_EVERY && !EXITING.load(Ordering::Acquire);
        let clock_chunk = due.then(|| meta_chunk(Meta::Clock));
        with_file(|fd| {
            // Up to BATCH chunks in one `writev`: the kernel's cost per call is a good
            // part of the writer's own.
            let mut batch: [Option<Full>; BATCH] = [const { None }; BATCH];
            let mut slices = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; BATCH];
            while wrote < BATCH {
                let Some(full) = shared.full.pop() else { break };
                let full = batch[wrote].insert(full);
                let bytes = full.bytes();
                slices[wrote] = libc::iovec {
                    iov_base: bytes.as_ptr() as *mut libc::c_void,
                    iov_len: bytes.len(),
                };
                wrote += 1;
            }
            write_all_vectored(fd, &mut slices[..wrote]);
            for full in batch.iter_mut().take(wrote).filter_map(Option::take) {
                shared.pool.give_back(full.buf);
            }
            clock::tick();
            if let Some(chunk) = &clock_chunk {
                last_snapshot = std::time::Instant::now();
                write_all(fd, chunk);
                recorder::snapshot_running(scratch, |thread, index, len| {
                    write_all(
                        fd,
                        Full {
                            buf: scratch,
                            thread,
                            index,
                            len,
                        }
                        .bytes(),
                    );
                });
            }
        });
        if wrote < BATCH {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Runs `f` with the trace file's descriptor under the file lock; does nothing once
/// the trace has ended or if the file is not open.
fn with_file(f: impl FnOnce(i32)) {
    while FILE_LOCK.swap(true, Ordering::Acquire) {
        std::thread::yield_now();
    }
    let fd = FD.load(Ordering::Relaxed);
    if fd >= 0 && !FINISHED.load(Ordering::Relaxed) {
        f(fd);
    }
    FILE_LOCK.store(false, Ordering::Release);
}

/// Chunks the writer writes with one system call, at most.
const BATCH: usize = 64;

/// Writes the byte ranges `slices` point to, in order, however many calls it takes.
fn write_all_vectored(fd: i32, slices: &mut [libc::iovec]) {
    let mut start = 0;
    while start < slices.len() {
        let rest = &slices[start..];
        // SAFETY: each iovec describes a readable range that outlives this call:
        // a slice the caller borrows, or a chunk in a buffer the writer gives back to
        // the pool only after this returns.
        let n = unsafe { libc::writev(fd, rest.as_ptr(), rest.len() as libc::c_int) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            warn(&format!(
                "writing the trace failed ({err}); the report will be incomplete"
            ));
            FD.store(-1, Ordering::Relaxed);
            return;
        }
        if n == 0 && slices[start..].iter().any(|s| s.iov_len > 0) {
            warn("writing the trace failed (nothing written); the report will be incomplete");
            FD.store(-1, Ordering::Relaxed);
            return;
        }
        // Skip what was written: whole slices, then part of the next one.
        let mut n = n as usize;
        while start < slices.len() && n >= slices[start].iov_len {
            n -= slices[start].iov_len;
            start += 1;
        }
        if n > 0 {
            let part = &mut slices[start];
            part.iov_base = (part.iov_base as *mut u8).wrapping_add(n) as *mut libc::c_void;
            part.iov_len -= n;
        }
    }
}

fn write_all(fd: i32, bytes: &[u8]) {
    write_all_vectored(
        fd,
        &mut [libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        }],
    );
}

/// `atexit` handler: the end of the trace.
extern "C" fn exit_flush() {
    let frame = crate::stack::registers();
    let Some(shared) = SHARED.get() else { return };
    EXITING.store(true, Ordering::Release);
    let Some(scratch) = shared.pool.take() else {
        return;
    };
    recorder::flush_all(scratch, |thread, index, len| {
        let mut full = Full {
            buf: scratch,
            thread,
            index,
            len,
        };
        with_file(|fd| write_all(fd, full.bytes()));
    });
    let me = recorder::current();
    // Our own allocations from here on are memscope's, not the program's.
    recorder::disable_current_thread();
    while let Some(full) = shared.full.pop() {
        write_full(shared, full);
    }
    if SCAN.load(Ordering::Relaxed) {
        let scan = scan_live_blocks(me, frame);
        with_file(|fd| write_all(fd, &scan));
    }
    let meta = meta_chunk(Meta::End);
    with_file(|fd| write_all(fd, &meta));
    FINISHED.store(true, Ordering::Release);
    shared.pool.give_back(scratch);
    let fd = FD.swap(-1, Ordering::AcqRel);
    if fd >= 0 {
        // SAFETY: `fd` is the trace file, opened by us and closed only here.
        unsafe { libc::close(fd) };
    }
}

/// The exit-time scan of the blocks still live (see `reach.rs`) as a meta chunk, or
/// nothing if the trace cannot be read back. `me` is the exiting thread's record, and
/// `frame` the frame and stack pointers of the `atexit` handler.
#[inline(never)]
fn scan_live_blocks(me: *const recorder::ThreadRecord, frame: (usize, usize)) -> Vec<u8> {
    let (mut stacks, mut top) = recorder::running_stacks(me);
    if top == 0 {
        top = sys::stack_bounds().1;
    }
    if let Some(caller) = crate::stack::caller_of_exit(frame, top, &sys::modules()) {
        stacks.push((caller, top));
    }
    let roots = reach::Roots {
        statics: sys::static_data(),
        stacks,
        skip: vec![clock::stripes_range()],
    };
    // What is in the file now is whole (writes happen under the file lock); the scan
    // reads that much without holding the lock, which the writer thread would wait
    // for, spinning, all along.
    let mut file = None;
    with_file(|fd| {
        // SAFETY: `stat` is plain data that fstat fills in.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is the open trace file; `stat` is writable.
        if unsafe { libc::fstat(fd, &mut stat) } == 0 {
            file = Some((fd, stat.st_size as u64));
        }
    });
    let Some(records) = file.and_then(|(fd, len)| reach::scan(fd, len, &roots)) else {
        return Vec::new();
    };
    let mut enc = Encoder::default();
    for record in &records {
        enc.record(record);
    }
    as_meta_chunk(enc)
}

/// `pthread_atfork` child handler: a new process gets a new trace file.
extern "C" fn after_fork_in_child() {
    // Whoever held the lock or ran the writer is not in this process.
    FILE_LOCK.store(false, Ordering::Release);
    WRITER_STARTED.store(false, Ordering::Release);
    META_INDEX.store(0, Ordering::Relaxed);
    SCAN.store(false, Ordering::Relaxed);
    crate::reach::HELP.forget();
    let fd = FD.swap(-1, Ordering::AcqRel);
    if fd >= 0 {
        // SAFETY: the inherited descriptor of the parent's trace; the child must not
        // write to it.
        unsafe { libc::close(fd) };
    }
    if let Some(shared) = SHARED.get() {
        // Queued buffers hold the parent's events: the parent writes them.
        while let Some(full) = shared.full.pop() {
            shared.pool.give_back(full.buf);
        }
    }
    if !FINISHED.load(Ordering::Relaxed) && open_trace_file(true) {
        recorder::reset_after_fork();
    }
}

fn warn(message: &str) {
    let line = format!("memscope: {message}\n");
    // SAFETY: writes a valid byte slice to stderr; the result is deliberately ignored.
    unsafe { libc::write(2, line.as_ptr() as *const libc::c_void, line.len()) };
}
