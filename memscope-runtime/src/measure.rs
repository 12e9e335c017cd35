//! In-process heap measurement of a closure on the current thread, for assertions in
//! tests: `memscope::measure(|| work())`.
//!
//! While a measurement is open on a thread, the allocator hook adds each event of that
//! thread to the measurement's counters (one thread-local pointer; null otherwise), on
//! its slow path: an open measurement closes the thread's record to the hot path
//! (see `recorder.rs`).
//! Measurements nest: an inner one's figures count towards the outer one too. It works
//! whenever [`crate::Alloc`] is the global allocator, with or without a trace being
//! written, and says so when it is not installed.

use std::cell::Cell;
use std::fmt;

/// What a closure did with the heap, on the thread that ran it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapStats {
    /// Allocations (zeroed ones included), not counting reallocations.
    pub allocations: u64,
    pub reallocations: u64,
    pub frees: u64,
    /// Bytes of all allocations plus the new sizes of reallocations (as dhat-rs counts).
    pub bytes_allocated: u64,
    /// The most bytes the closure had live at once (net of what it freed).
    pub peak_bytes: u64,
    /// Blocks the closure allocated minus blocks it freed: what it left live.
    pub live_blocks: i64,
    /// Bytes the closure allocated minus bytes it freed.
    pub live_bytes: i64,
}

/// `measure` was called in a program whose global allocator is not memscope's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotTracking;

impl fmt::Display for NotTracking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "memscope::measure needs memscope's allocator: run under `cargo memscope test` or \
             `cargo memscope run`, or declare `#[global_allocator] static A: memscope::Alloc = \
             memscope::Alloc::system();`",
        )
    }
}

impl std::error::Error for NotTracking {}

#[derive(Default)]
struct Counters {
    stats: HeapStats,
}

thread_local! {
    static OPEN: Cell<*mut Counters> = const { Cell::new(std::ptr::null_mut()) };
}

/// Runs `f` on this thread and returns what it did with the heap, or [`NotTracking`]
/// if memscope's allocator is not installed (`f` still runs, once).
pub fn measure<R>(f: impl FnOnce() -> R) -> Result<HeapStats, NotTracking> {
    measure_value(f).1
}

/// Like [`measure`], also returning the closure's value.
pub fn measure_value<R>(f: impl FnOnce() -> R) -> (R, Result<HeapStats, NotTracking>) {
    let mut counters = Counters::default();
    let outer = OPEN.with(|o| o.replace(&mut counters));
    crate::recorder::reopen_current();
    let installed = probe(&counters);
    counters.stats = HeapStats::default();
    let value = f();
    OPEN.with(|o| o.set(outer));
    crate::recorder::reopen_current();
    let stats = counters.stats;
    if !outer.is_null() {
        // SAFETY: `outer` is the counters of an enclosing `measure_value` on this
        // thread, still alive on its stack frame below ours.
        let outer = unsafe { &mut *outer };
        let o = &mut outer.stats;
        let base = o.live_bytes;
        o.allocations += stats.allocations;
        o.reallocations += stats.reallocations;
        o.frees += stats.frees;
        o.bytes_allocated += stats.bytes_allocated;
        o.live_blocks += stats.live_blocks;
        o.live_bytes += stats.live_bytes;
        o.peak_bytes = o
            .peak_bytes
            .max((base + stats.peak_bytes as i64).max(0) as u64);
    }
    (
        value,
        if installed {
            Ok(stats)
        } else {
            Err(NotTracking)
        },
    )
}

/// Whether allocations on this thread reach memscope's hook: allocate and free one
/// byte and see whether `counters` noticed.
fn probe(counters: &Counters) -> bool {
    let layout = std::alloc::Layout::new::<u8>();
    // SAFETY: a non-zero-size layout; the block is freed right away with the same one.
    unsafe {
        // Escapes through `black_box`: the runtime is built optimized, and an
        // allocation nothing reads may otherwise be removed altogether.
        let p = std::hint::black_box(std::alloc::alloc(layout));
        if !p.is_null() {
            std::alloc::dealloc(p, layout);
        }
    }
    // The counters are written through the thread-local pointer by the hook.
    std::hint::black_box(counters).stats.allocations > 0
}

/// Whether a measurement is open on this thread.
#[inline]
pub(crate) fn is_open() -> bool {
    OPEN.with(|o| !o.get().is_null())
}

#[inline(always)]
fn with_open(f: impl FnOnce(&mut HeapStats)) {
    let open = OPEN.with(|o| o.get());
    if !open.is_null() {
        // SAFETY: a non-null pointer in OPEN is the counters of a `measure_value` that
        // is running on this thread (it resets the pointer before returning).
        f(unsafe { &mut (*open).stats });
    }
}

#[inline(always)]
pub(crate) fn on_alloc(size: usize) {
    with_open(|s| {
        s.allocations += 1;
        s.bytes_allocated += size as u64;
        s.live_blocks += 1;
        s.live_bytes += size as i64;
        s.peak_bytes = s.peak_bytes.max(s.live_bytes.max(0) as u64);
    });
}

#[inline(always)]
pub(crate) fn on_free(size: usize) {
    with_open(|s| {
        s.frees += 1;
        s.live_blocks -= 1;
        s.live_bytes -= size as i64;
    });
}

#[inline(always)]
pub(crate) fn on_realloc(old_size: usize, new_size: usize) {
    with_open(|s| {
        s.reallocations += 1;
        s.bytes_allocated += new_size as u64;
        s.live_bytes += new_size as i64 - old_size as i64;
        s.peak_bytes = s.peak_bytes.max(s.live_bytes.max(0) as u64);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_memscopes_allocator_measure_says_so_and_still_runs_the_closure() {
        let mut ran = 0;
        let result = measure(|| ran += 1);
        assert_eq!(result, Err(NotTracking));
        assert_eq!(ran, 1);
        assert!(NotTracking.to_string().contains("cargo memscope test"));
    }
}
