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
//! Stacks are identified by a 64-bit hash (FxHash-style mixing with a MurmurHash3
//! finaliser) so that each thread writes each distinct stack once.

use crate::format::MAX_FRAMES;

/// Return addresses of the current call stack, innermost first.
pub struct Frames {
    pub addrs: [u64; MAX_FRAMES],
    pub len: usize,
}

/// Walks the frame-pointer chain of the calling thread, whose stack ends (grows down
/// from) `stack_top`.
#[inline(always)]
pub fn capture(stack_top: usize) -> Frames {
    let mut frames = Frames {
        addrs: [0; MAX_FRAMES],
        len: 0,
    };
    let (mut fp, sp) = registers();
    let lo = sp;
    while frames.len < MAX_FRAMES {
        if fp < lo || fp % 8 != 0 || fp.saturating_add(16) > stack_top {
            break;
        }
        // SAFETY: `fp` and `fp + 8` lie within `[sp, stack_top)`, the live part of this
        // thread's stack, which is mapped and readable; both reads are aligned.
        let (next, ret) = unsafe { (*(fp as *const usize), *((fp + 8) as *const usize)) };
        if ret == 0 {
            break;
        }
        frames.addrs[frames.len] = ret as u64;
        frames.len += 1;
        if next <= fp {
            break;
        }
        fp = next;
    }
    frames
}

/// The hash that names a stack; never 0 (0 means "no stack").
#[inline(always)]
pub fn hash(frames: &[u64]) -> u64 {
    let mut h: u64 = frames.len() as u64;
    for &f in frames {
        h = (h.rotate_left(5) ^ f).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h | (h == 0) as u64
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
    fn nested(depth: u32, top: usize) -> Frames {
        if depth == 0 {
            capture(top)
        } else {
            let f = nested(depth - 1, top);
            std::hint::black_box(f)
        }
    }

    #[test]
    fn a_walk_never_leaves_the_stack_and_sees_nested_calls() {
        let top = crate::sys::stack_top();
        let frames = nested(5, top);
        // Tests are built with frame pointers only when RUSTFLAGS asks for them; the
        // walk must be safe either way and, when it works, see the nested calls.
        assert!(frames.len <= MAX_FRAMES);
        if cfg!(target_arch = "x86_64") && frames.len > 0 {
            assert!(frames.addrs[..frames.len].iter().all(|&a| a != 0));
        }
    }

    #[test]
    fn a_garbage_stack_top_stops_the_walk_at_once() {
        assert_eq!(capture(0).len, 0);
    }

    #[test]
    fn hashes_differ_for_different_stacks_and_are_never_zero() {
        assert_ne!(hash(&[1, 2, 3]), hash(&[1, 2, 4]));
        assert_ne!(hash(&[]), 0);
        assert_eq!(hash(&[7, 8]), hash(&[7, 8]));
    }
}
