//! The global allocator wrapper: forwards to the inner allocator and records.

use std::alloc::{GlobalAlloc, Layout, System};

use crate::recorder;

/// A global allocator that records every event of the allocator `A` it wraps.
///
/// ```no_run
/// #[global_allocator]
/// static ALLOC: memscope::Alloc = memscope::Alloc::system();
/// # fn main() {}
/// ```
///
/// To keep a program's own allocator: `memscope::Alloc::new(MyAlloc)`, or, when the
/// allocator must stay reachable under its own name, `memscope::Alloc::new(
/// memscope::ByRef(&MY_ALLOC))`.
pub struct Alloc<A: GlobalAlloc = System> {
    inner: A,
}

impl Alloc<System> {
    /// Tracks the system allocator.
    pub const fn system() -> Self {
        Alloc { inner: System }
    }
}

impl<A: GlobalAlloc> Alloc<A> {
    /// Tracks `inner`.
    pub const fn new(inner: A) -> Self {
        Alloc { inner }
    }
}

// SAFETY: every method forwards to `inner` with the caller's arguments unchanged and
// returns its result unchanged, so `Alloc` upholds exactly the contract `A` upholds;
// recording only reads the arguments and results.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Alloc<A> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract for `layout`.
        let ptr = unsafe { self.inner.alloc(layout) };
        if !ptr.is_null() {
            after_alloc(ptr, layout);
        }
        ptr
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc_zeroed`'s contract.
        let ptr = unsafe { self.inner.alloc_zeroed(layout) };
        if !ptr.is_null() {
            after_alloc_zeroed(ptr, layout);
        }
        ptr
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // Recorded first: once the inner allocator has it, the address may be reused.
        before_free(ptr, layout);
        // SAFETY: the caller upholds `GlobalAlloc::dealloc`'s contract.
        unsafe { self.inner.dealloc(ptr, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let ts_before = before_realloc(ptr);
        // SAFETY: the caller upholds `GlobalAlloc::realloc`'s contract.
        let new = unsafe { self.inner.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            after_realloc(ptr, new, layout, new_size, ts_before);
        }
        new
    }
}

/// `Alloc::system()` with its methods compiled here, with the runtime's optimization:
/// the allocator `cargo memscope` installs in a program that has none.
///
/// `Alloc<A>`'s methods are generic, so they and `System`'s (which are `#[inline]`)
/// are compiled in the crate that declares the `#[global_allocator]`, unoptimized
/// under `cargo test`'s default profile: three calls with their stack spills per
/// event. These are not generic and never inlined, so the `#[global_allocator]`
/// shim makes one call into optimized code.
#[doc(hidden)]
pub struct SystemAlloc;

const SYSTEM: Alloc<System> = Alloc::system();

// SAFETY: every method forwards to `Alloc<System>`, which upholds the contract.
unsafe impl GlobalAlloc for SystemAlloc {
    #[inline(never)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { SYSTEM.alloc(layout) }
    }

    #[inline(never)]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { SYSTEM.alloc_zeroed(layout) }
    }

    #[inline(never)]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { SYSTEM.dealloc(ptr, layout) }
    }

    #[inline(never)]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { SYSTEM.realloc(ptr, layout, new_size) }
    }
}

// The hooks proper. `Alloc`'s methods are generic, so they are compiled in the crate
// that declares the `#[global_allocator]`, with that crate's optimization level (none
// under `cargo test`'s default profile); these are not generic and never inlined, so
// they are compiled once, here, with the runtime's (which `cargo memscope` always
// optimizes). Inlined into an unoptimized test crate they made regex-syntax's test
// suite about 3x slower than untracked; out of line, about 1.5x.

#[inline(never)]
fn after_alloc(ptr: *mut u8, layout: Layout) {
    recorder::on_alloc::<false>(ptr, layout);
}

#[inline(never)]
fn after_alloc_zeroed(ptr: *mut u8, layout: Layout) {
    recorder::on_alloc::<true>(ptr, layout);
}

#[inline(never)]
fn before_free(ptr: *mut u8, layout: Layout) {
    recorder::on_free(ptr, layout.size());
}

#[inline(never)]
fn before_realloc(ptr: *mut u8) -> u64 {
    recorder::before_realloc(ptr)
}

#[inline(never)]
fn after_realloc(ptr: *mut u8, new: *mut u8, layout: Layout, new_size: usize, ts_before: u64) {
    recorder::on_realloc(ptr, new, layout, new_size, ts_before);
}

/// Forwards to an allocator that lives in a `static` of its own, so that a program
/// whose allocator is also read by name (a counting allocator, say) keeps working
/// when memscope wraps it.
pub struct ByRef<A: 'static>(pub &'static A);

// SAFETY: pure forwarding to `A`, which upholds the contract.
unsafe impl<A: GlobalAlloc + 'static> GlobalAlloc for ByRef<A> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { self.0.alloc(layout) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { self.0.alloc_zeroed(layout) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { self.0.dealloc(ptr, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { self.0.realloc(ptr, layout, new_size) }
    }
}
