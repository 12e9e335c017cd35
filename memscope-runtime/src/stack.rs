//! Call stacks by walking frame pointers.
//!
//! Every frame built with frame pointers starts with the caller's frame pointer
//! followed by the return address (`[fp] = caller fp`, `[fp + 8] = return address`,
//! on x86_64 and aarch64 alike). The walk follows that chain upwards and stops at the
//! first link that is not strictly increasing, not 8-aligned, or outside the live
//! part of this thread's stack, `[current stack pointer, stack top)`. Everything in
//! that range is mapped, so a broken chain (a frame compiled without frame pointers)
//! ends the walk early instead of faulting.
//!
//! Following the chain is a series of dependent loads, a few cycles each, and most of
//! it is the same from one allocation to the next: the frames of `main`, of the
//! thread's entry, of the loop that allocates. So each thread keeps its previous walk
//! ([`LastWalk`]), outermost frame first. When the walk first reaches a frame
//! address the previous walk also passed through, it checks, with independent loads
//! that run in parallel, which of the words the previous walk read from there up are
//! still the same. The walk is a function of exactly those words: from any frame below
//! which nothing changed, it would find the same frames, so they are taken from the
//! previous walk instead of being followed one by one. (Where the same function was
//! called from another place, the walk goes on past that frame and joins the previous
//! one further out.)
//!
//! The stack's hash (`format::stack_hash`) folds the frames from the outermost in, so
//! the hash of the reused part is kept with it and only the new frames are mixed in.
//!
//! Most often the walk would start at the very frame the previous one started at (the
//! same place allocating again) and nothing it read has changed: then it *is* the
//! previous walk ([`again`]), found with one accumulated comparison of all its words
//! (one 16-byte load, XOR and OR per level) and no walking at all.

use crate::format::{stack_finish, stack_mix, MAX_FRAMES};

/// The thread's latest walk, indexed by level from the outermost frame (level 0).
pub struct LastWalk {
    /// Levels held.
    len: usize,
    /// False when the walk was cut at `MAX_FRAMES`: its outer frames are unknown.
    reusable: bool,
    /// Frame address at each level.
    fp: [usize; MAX_FRAMES],
    /// The two words the walk read at each level's frame address, `[fp]` (the saved
    /// frame pointer: the next level out's `fp`) and `[fp + 8]` (the return address),
    /// as one 128-bit value, so that checking a level is one load and one compare.
    words: [u128; MAX_FRAMES],
    /// Hash state after folding the return addresses of levels `0..=level`.
    hash: [u64; MAX_FRAMES],
    /// The walk stopped because the frame at level 0's saved frame pointer has return
    /// address 0.
    top_ret_zero: bool,
    /// The finished hash of the whole walk (`stack_finish` over all levels).
    whole: u64,
}

/// `[fp]` and `[fp + 8]` as one value.
#[inline(always)]
fn pair(next: usize, ret: u64) -> u128 {
    next as u128 | (ret as u128) << 64
}

impl LastWalk {
    /// A walk with nothing to reuse (all zeroes, as `alloc_zeroed` also makes it).
    pub const EMPTY: LastWalk = LastWalk {
        len: 0,
        reusable: false,
        fp: [0; MAX_FRAMES],
        words: [0; MAX_FRAMES],
        hash: [0; MAX_FRAMES],
        top_ret_zero: false,
        whole: 0,
    };

    /// The return address of frame `i`, innermost first.
    pub fn frame(&self, i: usize) -> u64 {
        (self.words[self.len - 1 - i] >> 64) as u64
    }

    /// How many of the levels `0..=level` still hold what the walk read there: `k`
    /// when the words at levels `0..k` are unchanged and those at level `k` are not
    /// (`level + 1`: all of them). A walk reaching `fp[j]`, `j < k`, would find the
    /// same frames above it and stop the same way. The loads are independent of each
    /// other, unlike the walk's.
    ///
    /// # Safety
    /// `fp[level]` must be at or above the current frame, inside the thread's stack,
    /// so that every `fp[k]`, `k <= level`, lies in its live part.
    #[inline(always)]
    unsafe fn holding(&self, level: usize) -> usize {
        // SAFETY: as the caller guarantees.
        if !unsafe { self.top_still_ends() } {
            return 0;
        }
        let mut first_changed = level + 1;
        for k in (0..=level).rev() {
            // SAFETY: `fp[k] >= fp[level]`, which the caller guarantees is in the live
            // stack, and `fp[k] + 16 <= stack top` (checked when it was walked; the
            // thread's stack top never changes). The read needs no alignment.
            let now = unsafe { (self.fp[k] as *const u128).read_unaligned() };
            if now != self.words[k] {
                first_changed = k;
            }
        }
        first_changed
    }
    /// Whether a walk that stopped at a return address of 0 above level 0 still would.
    ///
    /// # Safety
    /// As for [`holding`](Self::holding).
    #[inline(always)]
    unsafe fn top_still_ends(&self) -> bool {
        if !self.top_ret_zero {
            return true;
        }
        let top_next = self.words[0] as usize;
        // SAFETY: the walk read this word: level 0's saved frame pointer passed the
        // bounds checks then, above `fp[0]`, inside the stack.
        unsafe { *((top_next + 8) as *const u64) == 0 }
    }

    /// Whether every word the walk read is unchanged: [`holding`](Self::holding) of the
    /// innermost level, answered with one accumulated comparison instead of one per
    /// level (the common case: the same place allocating again).
    ///
    /// # Safety
    /// The walk's innermost frame, `fp[len - 1]`, must be at or above the current
    /// frame, inside the thread's stack.
    #[inline(always)]
    unsafe fn all_hold(&self) -> bool {
        let len = self.len.min(MAX_FRAMES);
        #[cfg(target_arch = "x86_64")]
        let same = {
            use core::arch::x86_64::{
                __m128i, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_setzero_si128,
                _mm_xor_si128,
            };
            // SSE2, which every x86_64 CPU has: one 16-byte load, one XOR and one OR
            // per level (two of each as 64-bit halves otherwise).
            // SAFETY: SSE2 is part of x86_64. Each `fp[k] >= fp[len - 1]` lies in the
            // live stack, as the caller guarantees, with `fp[k] + 16 <= stack top`
            // (see `holding`); `words` has `MAX_FRAMES >= len` entries. Unaligned loads.
            unsafe {
                let mut diff = _mm_setzero_si128();
                for k in 0..len {
                    let now = _mm_loadu_si128(self.fp[k] as *const __m128i);
                    let then = _mm_loadu_si128(self.words.as_ptr().add(k) as *const __m128i);
                    diff = _mm_or_si128(diff, _mm_xor_si128(now, then));
                }
                _mm_movemask_epi8(core::arch::x86_64::_mm_cmpeq_epi8(
                    diff,
                    _mm_setzero_si128(),
                )) == 0xffff
            }
        };
        #[cfg(not(target_arch = "x86_64"))]
        let same = {
            let mut diff = 0u128;
            for k in 0..len {
                // SAFETY: as above.
                let now = unsafe { (self.fp[k] as *const u128).read_unaligned() };
                diff |= now ^ self.words[k];
            }
            diff == 0
        };
        // SAFETY: as the caller guarantees.
        same && unsafe { self.top_still_ends() }
    }
}

/// [`capture_from`] for a thread that keeps its latest walks from different places,
/// `latest` (which is not [`again`] here) and older ones such as `other`, so that a
/// loop allocating in a few places (a `Box` and then a `Vec`, say) finds each
/// place's walk again instead of walking one from the other every time. The walk
/// goes into `other`, which the caller then takes for the latest: `other` again if
/// it is; otherwise a walk starting from a copy of `latest` (the outer frames it can
/// reuse), which stays as it is for the next allocation from its place.
///
/// # Safety
/// As for [`capture_from`], with `latest` and `other` holding only the calling
/// thread's walks.
#[inline(always)]
pub unsafe fn capture_beside(
    start: (usize, usize),
    stack_top: usize,
    latest: &LastWalk,
    other: &mut LastWalk,
) -> (usize, u64) {
    // SAFETY: as the caller guarantees.
    if let Some(same) = unsafe { again(other, start.0) } {
        return same;
    }
    other.copy_from(latest);
    // SAFETY: as the caller guarantees; `other` now holds a walk of this thread.
    unsafe { capture_from(start, stack_top, other) }
}

impl LastWalk {
    /// Makes this a copy of `from` (only its levels: the rest is never read).
    fn copy_from(&mut self, from: &LastWalk) {
        let len = from.len.min(MAX_FRAMES);
        self.len = from.len;
        self.reusable = from.reusable;
        self.top_ret_zero = from.top_ret_zero;
        self.whole = from.whole;
        self.fp[..len].copy_from_slice(&from.fp[..len]);
        self.words[..len].copy_from_slice(&from.words[..len]);
        self.hash[..len].copy_from_slice(&from.hash[..len]);
    }
}

/// Walks the frame-pointer chain of the calling thread, whose stack ends (grows down
/// from) `stack_top`, into `last` (which must hold only this thread's walks): reuses
/// the outer part of the previous walk where it still holds, then stores this one.
/// Returns the number of frames (read them with [`LastWalk::frame`]) and the stack's
/// hash; 0 frames means no usable chain.
///
/// # Safety
/// `last` must have been filled only by walks of the calling thread.
#[cfg(test)]
#[inline(always)]
unsafe fn capture(stack_top: usize, last: &mut LastWalk) -> (usize, u64) {
    // SAFETY: the current frame and stack pointer; as the caller guarantees.
    unsafe { capture_from(registers(), stack_top, last) }
}

/// The previous walk again, when a walk from frame `fp` would be the same: it started
/// there too and nothing it read changed. Its frame count and hash, or `None`.
///
/// # Safety
/// `last` must have been filled only by walks of the calling thread, and `fp` must be
/// the frame pointer of a live frame of that thread's (the caller's, or one above it).
#[inline(always)]
pub unsafe fn again(last: &LastWalk, fp: usize) -> Option<(usize, u64)> {
    // SAFETY: `fp` is live, and the previous walk's innermost frame.
    (last.reusable && last.len > 0 && last.fp[last.len - 1] == fp && unsafe { last.all_hold() })
        .then_some((last.len, last.whole))
}

/// [`capture`] from the frame `fp`, with `lo` the stack pointer of a live frame at or
/// below it: what [`registers`] read in the caller, or in a function that is waiting
/// for the caller to return.
///
/// # Safety
/// As for [`again`], and `lo` must be a stack pointer of that thread, at or below `fp`,
/// whose frame is live.
#[inline(always)]
pub unsafe fn capture_from(
    (mut fp, lo): (usize, usize),
    stack_top: usize,
    last: &mut LastWalk,
) -> (usize, u64) {
    // SAFETY: as the caller guarantees.
    if let Some(same) = unsafe { again(last, fp) } {
        return same;
    }
    // What this walk reads itself, innermost first: frame addresses and their words.
    let mut fps = [std::mem::MaybeUninit::<usize>::uninit(); MAX_FRAMES];
    let mut words = [std::mem::MaybeUninit::<u128>::uninit(); MAX_FRAMES];
    let mut n = 0;
    // Levels of the previous walk not yet passed: `last.fp[cursor - 1]` is the lowest.
    let mut cursor = if last.reusable { last.len } else { 0 };
    // The previous walk's levels `..holding` are known to hold; the check is made
    // once, where the walk first meets the previous one.
    let mut holding = 0;
    let mut checked = false;
    let mut top_ret_zero = false;
    let mut reused = None;
    // Locals only: the loop is a chain of dependent loads, keep it free of spills.
    while n < MAX_FRAMES {
        if fp < lo || fp % 8 != 0 || fp.saturating_add(16) > stack_top {
            break;
        }
        while cursor > 0 && last.fp[cursor - 1] < fp {
            cursor -= 1;
        }
        if cursor > 0 && last.fp[cursor - 1] == fp && n + cursor <= MAX_FRAMES {
            let level = cursor - 1;
            if !checked {
                checked = true;
                // SAFETY: `fp` passed the bounds checks just above.
                holding = unsafe { last.holding(level) };
            }
            // Where the stack changed above the first meeting point (a call from
            // another site of the same function), the walk goes on past the change
            // and joins the previous one further out.
            if level < holding {
                reused = Some(level);
                break;
            }
        }
        // SAFETY: `fp` and `fp + 8` lie within `[sp, stack_top)`, the live part of this
        // thread's stack, which is mapped and readable; both reads are aligned.
        let (next, ret) = unsafe { (*(fp as *const usize), *((fp + 8) as *const u64)) };
        if ret == 0 {
            top_ret_zero = true;
            break;
        }
        fps[n].write(fp);
        words[n].write(pair(next, ret));
        n += 1;
        if next <= fp {
            break;
        }
        fp = next;
    }

    // Levels above the frames walked here, and the hash state there.
    let (above, mut h) = match reused {
        Some(level) => (level + 1, last.hash[level]),
        None => {
            last.reusable = n < MAX_FRAMES;
            last.top_ret_zero = top_ret_zero;
            (0, 0)
        }
    };
    for i in (0..n).rev() {
        let level = above + (n - 1 - i);
        // SAFETY: `fps[..n]` and `words[..n]` were written above.
        let (fp, word) = unsafe { (fps[i].assume_init(), words[i].assume_init()) };
        h = stack_mix(h, (word >> 64) as u64);
        last.fp[level] = fp;
        last.words[level] = word;
        last.hash[level] = h;
    }
    last.len = above + n;
    last.whole = stack_finish(h, last.len);
    (last.len, last.whole)
}

/// Where the live frames of whoever called `exit` begin, seen from the `atexit`
/// handler's frame: `(frame pointer, stack pointer)` (the stack ends at `top`); `None`
/// after a return from `main`.
///
/// The C library's `exit` keeps no frame pointer, so the chain breaks there, but it
/// saves the one it was called with among its registers, on the stack between the
/// handler's frame and its caller's. So the first word above the handler's frame that
/// starts a chain of at least two frames whose return addresses lie in the loaded
/// objects is taken for the caller's frame: after `process::exit`, the frame of std's
/// `exit`, with the program's frames above it. After a return from `main` the C
/// library's start-up code calls `exit` with no frame pointer of a live frame, and
/// `exit`'s frames hold whatever the returned frames left, which must not count.
pub fn caller_of_exit(
    (frame, sp): (usize, usize),
    top: usize,
    modules: &[crate::sys::Module],
) -> Option<usize> {
    // Without frame pointers (the runtime built without them) the register holds
    // anything: it must be in the live stack, `[sp, top)`, to be read from.
    if frame < sp || !frame.is_multiple_of(8) || frame >= top {
        return None;
    }
    let in_module = |ret: u64| modules.iter().any(|m| m.start <= ret && ret < m.end);
    let readable = |at: usize| {
        at.is_multiple_of(8) && at > frame && at.checked_add(16).is_some_and(|end| end <= top)
    };
    let chain_from = |start: usize| -> Option<usize> {
        let mut fp = start;
        let mut links = 0;
        loop {
            if !readable(fp) {
                return None;
            }
            // SAFETY: `fp` lies in `(frame, top - 16]`, the live part of this thread's
            // stack above the handler's frame, and is 8-aligned.
            let (next, ret) = unsafe { (*(fp as *const usize), *((fp + 8) as *const u64)) };
            if ret == 0 || !in_module(ret) {
                return (links >= 2).then_some(start);
            }
            links += 1;
            if next <= fp || links >= MAX_FRAMES {
                return (links >= 2).then_some(start);
            }
            fp = next;
        }
    };
    // The handler's own saved frame pointer first (a C library that keeps frame
    // pointers), then the words above its frame, up to a few pages.
    let end = top.min(frame.saturating_add(16 * 1024));
    (frame..end).step_by(8).find_map(|slot| {
        // SAFETY: `slot` is 8-aligned (`frame` is, checked above) and in `[frame, top)`,
        // the live part of this thread's stack from the handler's frame up.
        let word = unsafe { *(slot as *const usize) };
        (word > slot).then(|| chain_from(word)).flatten()
    })
}

/// The frame pointer and stack pointer of the calling function.
#[inline(always)]
pub(crate) fn registers() -> (usize, usize) {
    let fp: usize;
    let sp: usize;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: reads two registers into outputs; no memory access, no stack change.
    unsafe {
        core::arch::asm!("mov {fp}, rbp", "mov {sp}, rsp", fp = out(reg) fp, sp = out(reg) sp,
            options(nomem, nostack, preserves_flags));
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: reads two registers into outputs; no memory access, no stack change.
    unsafe {
        core::arch::asm!("mov {fp}, x29", "mov {sp}, sp", fp = out(reg) fp, sp = out(reg) sp,
            options(nomem, nostack, preserves_flags));
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        // No frame-pointer walk on this architecture: an empty chain.
        fp = 0;
        sp = 1;
    }
    (fp, sp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh() -> Box<LastWalk> {
        Box::new(LastWalk::EMPTY)
    }

    /// Whether walks can work here: tests are built with frame pointers only when
    /// RUSTFLAGS asks for them (the end-to-end suite does, and sets
    /// `MEMSCOPE_EXPECT_FRAME_POINTERS` so that a missing chain fails instead).
    fn walked(len: usize) -> bool {
        chain_reaches(len >= 2, "a second frame")
    }

    /// `reached`, the frame-pointer chain went up to `what`; see [`walked`].
    fn chain_reaches(reached: bool, what: &str) -> bool {
        assert!(
            reached || std::env::var_os("MEMSCOPE_EXPECT_FRAME_POINTERS").is_none(),
            "the frame-pointer chain ends below {what}"
        );
        reached
    }

    #[inline(never)]
    fn nested(
        depth: u32,
        top: usize,
        last: &mut LastWalk,
        out: &mut [u64; MAX_FRAMES],
    ) -> (usize, u64) {
        if depth == 0 {
            // SAFETY: `last` holds only this thread's walks.
            let (len, hash) = unsafe { capture(top, last) };
            for (i, frame) in out[..len].iter_mut().enumerate() {
                *frame = last.frame(i);
            }
            (len, hash)
        } else {
            std::hint::black_box(nested(depth - 1, top, last, out))
        }
    }

    #[test]
    fn a_walk_never_leaves_the_stack_and_sees_nested_calls() {
        let top = crate::sys::stack_bounds().1;
        let mut out = [0; MAX_FRAMES];
        let (len, h) = nested(5, top, &mut fresh(), &mut out);
        // The walk must be safe either way and, when it works, see the nested calls.
        assert!(len <= MAX_FRAMES);
        if walked(len) {
            // Return addresses into nested(1) … nested(5), at least.
            assert!(len >= 5, "{len} frames");
            assert!(out[..len].iter().all(|&a| a != 0));
            assert_eq!(h, crate::format::stack_hash(&out[..len]));
        }
    }

    #[test]
    fn a_walk_that_reuses_the_previous_one_finds_what_a_fresh_walk_finds() {
        let top = crate::sys::stack_bounds().1;
        let mut last = fresh();
        // Every walk goes through the same call below, so that the stacks differ only
        // by their depth: (depth, whether the walk may reuse the previous one).
        let steps = [
            (7, true),
            (7, true),
            (7, false),
            (4, true),
            (4, false),
            (9, true),
            (9, false),
            (9, true),
        ];
        let mut walks = Vec::new();
        // One call site for every walk (a loop the compiler unrolls would make the
        // return addresses differ from one walk to the next).
        for &(depth, reuse) in std::hint::black_box(&steps[..]) {
            let mut out = [0; MAX_FRAMES];
            let mut empty = fresh();
            let state = if reuse { &mut last } else { &mut empty };
            let walk = nested(depth, top, state, &mut out);
            walked(walk.0);
            assert_eq!(walk.1, crate::format::stack_hash(&out[..walk.0]));
            walks.push((depth, walk, out[..walk.0].to_vec()));
        }
        for pair in walks.windows(2).filter(|w| w[0].0 == w[1].0) {
            assert_eq!(pair[0].1, pair[1].1, "depth {}", pair[0].0);
            assert_eq!(pair[0].2, pair[1].2, "depth {}", pair[0].0);
        }
    }

    #[test]
    fn a_second_walk_takes_the_unchanged_outer_frames_from_the_first_and_checks_them() {
        let top = crate::sys::stack_bounds().1;
        let mut last = fresh();
        let mut out = [0; MAX_FRAMES];
        // One call site for every round (see above).
        for round in 0..std::hint::black_box(3) {
            let (len, hash) = nested(3, top, &mut last, &mut out);
            if !walked(len) {
                return; // built without frame pointers: nothing to reuse
            }
            match round {
                0 => {
                    // Marks the kept hash states (and the whole walk's hash, which
                    // the same walk again returns): a walk that reuses them shows it.
                    last.hash.iter_mut().for_each(|h| *h ^= 1);
                    last.whole ^= 1;
                }
                1 => {
                    assert_ne!(
                        hash,
                        crate::format::stack_hash(&out[..len]),
                        "nothing was reused"
                    );
                    // A frame that no longer matches the stack is never reused.
                    last.words[0] ^= 1 << 64;
                }
                _ => assert_eq!(hash, crate::format::stack_hash(&out[..len])),
            }
        }
    }

    #[inline(never)]
    fn via_a(top: usize, last: &mut LastWalk, out: &mut [u64; MAX_FRAMES]) -> (usize, u64) {
        std::hint::black_box(nested(2, top, last, out))
    }

    #[inline(never)]
    fn via_b(top: usize, last: &mut LastWalk, out: &mut [u64; MAX_FRAMES]) -> (usize, u64) {
        std::hint::black_box(nested(3, top, last, out))
    }

    /// A walk through `via_a` or `via_b` (one call deeper): the same frames above.
    #[inline(never)]
    fn via(b: bool, top: usize, last: &mut LastWalk, out: &mut [u64; MAX_FRAMES]) -> (usize, u64) {
        let walk = if std::hint::black_box(b) {
            via_b(top, last, out)
        } else {
            via_a(top, last, out)
        };
        std::hint::black_box(walk)
    }

    #[test]
    fn a_walk_through_another_caller_joins_the_previous_walk_above_the_change() {
        let top = crate::sys::stack_bounds().1;
        let mut last = fresh();
        // (through via_b, reusing `last`): via_a, then via_b reusing, then via_b fresh.
        let steps = [(false, true), (true, true), (true, false)];
        let mut walks = Vec::new();
        for (i, &(b, reuse)) in std::hint::black_box(&steps[..]).iter().enumerate() {
            let mut out = [0; MAX_FRAMES];
            let mut empty = fresh();
            let state = if reuse { &mut last } else { &mut empty };
            let (len, hash) = via(b, top, state, &mut out);
            if !walked(len) {
                return; // built without frame pointers: nothing to reuse
            }
            if i == 0 {
                // Marks the kept hash states: a walk that reuses them shows it.
                last.hash.iter_mut().for_each(|h| *h ^= 1);
            }
            walks.push((len, hash, out[..len].to_vec()));
        }
        let (reusing, fresh_walk) = (&walks[1], &walks[2]);
        if !chain_reaches(walks[0].2 != reusing.2, "`via_a` and `via_b`") {
            return;
        }
        assert_eq!(reusing.2, fresh_walk.2, "the same frames as a fresh walk");
        assert_eq!(fresh_walk.1, crate::format::stack_hash(&fresh_walk.2));
        assert_ne!(reusing.1, fresh_walk.1, "the outer frames were not reused");
    }

    /// Two of a thread's latest walks, the latest first (the recorder keeps four; two
    /// show finding one again).
    type Pair = (Box<LastWalk>, Box<LastWalk>);

    #[inline(never)]
    fn walk_into(top: usize, (latest, other): &mut Pair) -> (usize, u64) {
        let start = registers();
        // SAFETY: both hold only this thread's walks; the current frame.
        let walk = match unsafe { again(latest, start.0) } {
            Some(same) => same,
            None => {
                // SAFETY: as above.
                let walk = unsafe { capture_beside(start, top, latest, other) };
                std::mem::swap(latest, other);
                walk
            }
        };
        std::hint::black_box(walk)
    }

    #[inline(never)]
    fn place_a(top: usize, walks: &mut Pair) -> (usize, u64) {
        std::hint::black_box(walk_into(top, walks))
    }

    /// One call deeper than [`place_a`].
    #[inline(never)]
    fn place_b(top: usize, walks: &mut Pair) -> (usize, u64) {
        std::hint::black_box(place_a(top, walks))
    }

    /// A walk from one of two places, as a loop allocating a `Box` and then a `Vec`.
    #[inline(never)]
    fn place(b: bool, top: usize, walks: &mut Pair) -> (usize, u64) {
        let walk = if std::hint::black_box(b) {
            place_b(top, walks)
        } else {
            place_a(top, walks)
        };
        std::hint::black_box(walk)
    }

    #[test]
    fn walks_from_two_alternating_places_are_each_found_again_without_walking() {
        let top = crate::sys::stack_bounds().1;
        let mut walks = (fresh(), fresh());
        let mut seen: Vec<(u64, Vec<u64>)> = Vec::new();
        // The compiler may peel the loop's first round off, which calls `place` from
        // another site: so each round is checked against the round two before it.
        let places = [false, true, false, true, false, true];
        for &b in std::hint::black_box(&places[..]) {
            let (len, hash) = place(b, top, &mut walks);
            if !walked(len) {
                return; // built without frame pointers: nothing to find again
            }
            seen.push((hash, (0..len).map(|i| walks.0.frame(i)).collect()));
            // Marks the walk with its round (a walk found again returns the mark of
            // the round that walked it) instead of its hash.
            walks.0.whole = seen.len() as u64;
        }
        if !chain_reaches(seen[2].1 != seen[3].1, "`place`") {
            return;
        }
        let mut found_again = 0;
        for (round, (hash, frames)) in seen.iter().enumerate() {
            let same_place = round >= 2 && seen[round - 2].1 == *frames;
            if same_place {
                assert_eq!(*hash, round as u64 - 1, "round {round} walked again");
                found_again += 1;
            } else {
                assert_eq!(*hash, crate::format::stack_hash(frames), "round {round}");
            }
        }
        assert!(found_again >= 2, "{found_again} rounds found again");
    }

    #[test]
    fn a_garbage_stack_top_stops_the_walk_at_once() {
        // SAFETY: a fresh walk state.
        assert_eq!(unsafe { capture(0, &mut fresh()) }.0, 0);
    }
}
