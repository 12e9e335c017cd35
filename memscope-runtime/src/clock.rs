//! Event timestamps: raw CPU ticks, cheap enough for every event and ordered across
//! threads.
//!
//! On x86_64 the clock is the time-stamp counter, which the kernel only uses as its
//! clocksource when it is invariant and synchronised across cores. Ordering argument
//! for an address freed on thread A and reused on thread B:
//! - A reads the counter *before* calling the inner `dealloc` ([`before`]). RDTSC
//!   reads the counter when it executes, which is before it retires, and the stores
//!   of the following `dealloc` become visible to other cores only after they retire,
//!   in order, after RDTSC. So A's stamp precedes the moment the address is free.
//! - B reads the counter *after* the inner `alloc` returned the address ([`after`]),
//!   behind an LFENCE, which (Intel SDM, RDTSC) makes RDTSC wait until every earlier
//!   instruction, including the loads that observed A's release, has completed.
//!
//! So the free's stamp is always smaller than the reuse's, and a reader that merges
//! per-thread streams by timestamp pairs frees with the right allocations. Elsewhere
//! the monotonic clock (vDSO, no system call) in nanoseconds is used instead.

/// Timestamp for an event that happens before the inner allocator is called (free).
#[inline(always)]
pub fn before() -> u64 {
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

/// Timestamp for an event that happens after the inner allocator returned (alloc).
#[inline(always)]
pub fn after() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: LFENCE (SSE2, part of the x86_64 baseline) and RDTSC only order
        // instructions and read the counter; neither touches memory.
        unsafe {
            core::arch::x86_64::_mm_lfence();
            core::arch::x86_64::_rdtsc()
        }
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
