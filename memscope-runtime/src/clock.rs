//! Event timestamps: a hybrid logical clock, cheap enough for every event and exact
//! about the order that matters.
//!
//! Reading the CPU's time-stamp counter costs 11 ns on the machines memscope is
//! benchmarked on (21 ns with the fence that ordering across threads would need), more
//! than a whole small allocation. So events are stamped with a hybrid logical clock
//! (Kulkarni et al., "Logical Physical Clocks", 2014), in time-stamp-counter units:
//!
//! ```text
//! stamp = max(this thread's last stamp + 1, the address stripe's last stamp + 1, TICK)
//! ```
//!
//! - `TICK` is a coarse physical clock: the trace's start and then the writer thread
//!   store the time-stamp counter into it, the writer about every millisecond. So
//!   stamps stay within about a millisecond of real time.
//! - Each address maps to one of [`STRIPES`] counters. The stamp is written back to
//!   the stripe if it raises it. A free is stamped *before* the inner allocator gets
//!   the block and an allocation *after* the inner allocator returned it; the
//!   allocator's own synchronisation makes the first stamp happen-before the second,
//!   which therefore reads a stripe value at least as large and stamps after it. So
//!   for any one address, stamps order its allocations and frees as they happened,
//!   across threads.
//! - Within a thread, stamps strictly increase.
//!
//! The stripe is raised with a plain load and store, not a compare-and-swap: a locked
//! instruction per event costs more than the whole rest of the hook here (it waits
//! for the trace buffer's stores to drain). The price is one race: if two threads
//! raise the *same* stripe (for different addresses that share it) within the few
//! nanoseconds between load and store, the smaller value can win. An allocation that
//! reuses one of those addresses on a third thread within the same millisecond could
//! then be stamped before the free it follows (or a free before the allocation it
//! follows). The reader (`replay.rs` in cargo-memscope) holds such an impossible event
//! back until the one it must follow arrives, and puts the two in order.
//!
//! A reader that merges the per-thread streams by `(stamp, thread)` therefore never
//! pairs a free with the wrong allocation; `Clock` records in the trace map stamps to
//! nanoseconds.

use std::sync::atomic::{AtomicU64, Ordering};

/// Number of address stripes (a power of two): 512 KiB of counters, touched sparsely.
/// See [`stripe_of`] for which addresses share one.
const STRIPES: usize = 1 << 16;

#[allow(clippy::declare_interior_mutable_const)] // used only to initialise the array
const STRIPE: AtomicU64 = AtomicU64::new(0);
static STRIPE_CLOCKS: [AtomicU64; STRIPES] = [STRIPE; STRIPES];

/// Where the stripes lie, `[start, end)`: stamps, not pointers, for the exit-time scan
/// to leave out.
pub fn stripes_range() -> (usize, usize) {
    let start = STRIPE_CLOCKS.as_ptr() as usize;
    (start, start + std::mem::size_of_val(&STRIPE_CLOCKS))
}

#[repr(align(64))]
struct Tick(AtomicU64);

/// The coarse physical clock, in counter units; 0 until the trace starts.
static TICK: Tick = Tick(AtomicU64::new(0));

/// The stamp of an event on `addr` for a thread whose last stamp is `last` (which
/// the caller then sets to it).
#[inline(always)]
pub fn stamp(last: u64, addr: usize) -> u64 {
    let base = TICK.0.load(Ordering::Relaxed).max(last + 1);
    let stripe = &STRIPE_CLOCKS[stripe_of(addr)];
    let stamp = base.max(stripe.load(Ordering::Relaxed) + 1);
    stripe.store(stamp, Ordering::Relaxed);
    stamp
}

/// The stripe of `addr`: its 64-byte granule modulo [`STRIPES`], XORed with a hash of
/// its 64 MiB region.
///
/// Neighbouring blocks share cache lines of counters, so a thread's working set
/// touches few lines. The region hash keeps threads apart: malloc gives each thread an
/// arena of its own, aligned to 64 MiB, and the same workload on two threads places
/// its blocks at the same offsets in each arena. Without the hash those blocks would
/// share stripes, and every event would move a cache line between cores. (XOR with a
/// per-region constant maps each aligned group of 8 stripes, one cache line, onto
/// another, so neighbours stay together. The constant must move the high bits of the
/// index too: arenas are usually 64 MiB apart, and XOR with their plain region numbers
/// only shuffles lines within a thread's own range, which another thread's overlaps.)
#[inline(always)]
fn stripe_of(addr: usize) -> usize {
    let region = ((addr >> 26) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 48;
    ((addr >> 6) ^ region as usize) & (STRIPES - 1)
}

/// The stamp of a thread-local event (no address): later than the thread's last
/// stamp, `last`.
#[inline(always)]
pub fn stamp_thread(last: u64) -> u64 {
    TICK.0.load(Ordering::Relaxed).max(last + 1)
}

/// Advances the coarse clock: when the trace starts, then from the writer thread (and
/// at buffer hand-overs, for a process whose writer thread could not start).
pub fn tick() {
    TICK.0.fetch_max(counter(), Ordering::Relaxed);
}

/// The raw physical clock in counter units: the time-stamp counter on x86_64,
/// monotonic nanoseconds elsewhere.
#[inline]
pub fn counter() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC is available on every x86_64 CPU and has no memory effects.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        monotonic_ns()
    }
}

/// Nanoseconds of `CLOCK_MONOTONIC`.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// Nanoseconds since the Unix epoch.
pub fn unix_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime writes only to it.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_on_one_thread_strictly_increase() {
        let a = stamp(0, 0x1000);
        let b = stamp(a, 0x2000);
        let c = stamp(b, 0x1000);
        let d = stamp_thread(c);
        assert!(a < b && b < c && c < d);
    }

    #[test]
    fn the_same_offset_in_two_thread_arenas_falls_in_different_cache_lines_of_stripes() {
        let a = 0x7f38_1400_0ca0usize;
        let b = 0x7f38_0c00_0ca0usize;
        assert_ne!(stripe_of(a) / 8, stripe_of(b) / 8);
        // Neighbours within one arena still share a line.
        assert_eq!(stripe_of(a) / 8, stripe_of(a + 16) / 8);
    }

    #[test]
    fn a_later_event_on_the_same_address_gets_a_larger_stamp_on_any_thread() {
        let freed = stamp(0, 0xdead_0000);
        // A thread whose own clock is far behind still stamps after the free.
        let reused = std::thread::spawn(|| stamp(0, 0xdead_0000)).join().unwrap();
        assert!(reused > freed);
    }
}
