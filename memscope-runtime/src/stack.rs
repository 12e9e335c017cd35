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
//! The walk computes the stack's hash (`format::stack_hash`) as it goes, so that each
//! thread can write each distinct stack once.

use crate::format::{stack_finish, stack_mix, MAX_FRAMES};

/// Walks the frame-pointer chain of the calling thread, whose stack ends (grows down
/// from) `stack_top`, writing return addresses (innermost first) to `out`, which must
/// have room for `MAX_FRAMES` (it may be uninitialised). Returns how many were written
/// and the stack's hash; 0 frames means no usable chain.
///
/// # Safety
/// `out` must be valid for writes of `MAX_FRAMES` `u64`s.
#[inline(always)]
pub unsafe fn capture(stack_top: usize, out: *mut u64) -> (usize, u64) {
    let (mut fp, lo) = registers();
    let mut n = 0;
    let mut h = 0u64;
    // Locals only: the loop is a chain of dependent loads, keep it free of spills.
    while n < MAX_FRAMES {
        if fp < lo || fp % 8 != 0 || fp.saturating_add(16) > stack_top {
            break;
        }
        // SAFETY: `fp` and `fp + 8` lie within `[sp, stack_top)`, the live part of this
        // thread's stack, which is mapped and readable; both reads are aligned.
        let (next, ret) = unsafe { (*(fp as *const usize), *((fp + 8) as *const usize)) };
        if ret == 0 {
            break;
        }
        // SAFETY: `n < MAX_FRAMES` and the caller gives room for MAX_FRAMES.
        unsafe { out.add(n).write(ret as u64) };
        h = stack_mix(h, ret as u64);
        n += 1;
        if next <= fp {
            break;
        }
        fp = next;
    }
    (n, stack_finish(h, n))
}

#[inline(always)]
fn registers() -> (usize, usize) {
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

    #[inline(never)]
    fn nested(depth: u32, top: usize, out: &mut [u64; MAX_FRAMES]) -> (usize, u64) {
        if depth == 0 {
            // SAFETY: `out` has room for MAX_FRAMES.
            unsafe { capture(top, out.as_mut_ptr()) }
        } else {
            std::hint::black_box(nested(depth - 1, top, out))
        }
    }

    #[test]
    fn a_walk_never_leaves_the_stack_and_sees_nested_calls() {
        let top = crate::sys::stack_top();
        let mut out = [0; MAX_FRAMES];
        let (len, h) = nested(5, top, &mut out);
        // Tests are built with frame pointers only when RUSTFLAGS asks for them; the
        // walk must be safe either way and, when it works, see the nested calls.
        assert!(len <= MAX_FRAMES);
        if len > 0 {
            assert!(out[..len].iter().all(|&a| a != 0));
            assert_eq!(h, crate::format::stack_hash(&out[..len]));
        }
    }

    #[test]
    fn a_garbage_stack_top_stops_the_walk_at_once() {
        // SAFETY: the array has room for MAX_FRAMES.
        assert_eq!(unsafe { capture(0, [0; MAX_FRAMES].as_mut_ptr()) }.0, 0);
    }
}
