//! The registration API behind `#[memscope::instrument]`, `memscope::scope` and
//! `memscope::track!`: interned call sites, scope enter/exit and variable bindings,
//! written as extended records (see [`crate::format`]) into the calling thread's
//! stream.
//!
//! **Off switch.** Every entry point first asks [`enabled`]: one relaxed load of a
//! process-wide state and a branch. In an ordinary build (memscope's allocator not
//! installed and no `MEMSCOPE_OUT` in the environment) the first call settles the
//! state to OFF and annotated code does nothing else. Under memscope the first call
//! writes an `INSTRUMENTED` record, which starts tracking if no allocation did yet.
//!
//! **Interning.** Each call site or declaration is a `static` [`Site`] holding an id
//! (0 until first used while enabled). The first use takes a fresh id from a process
//! counter, publishes it with a compare-and-swap (a thread that loses the race uses
//! the winner's id) and writes one `DEF` record with the site's strings; later events
//! carry only the id. Sites that only exist at run time (`memscope::scope("name")`,
//! `fut.memscope_task(..)`, whose caller location comes from `#[track_caller]`) are
//! interned in a fixed lock-free open-addressing table keyed by name and location.
//!
//! Nothing here allocates: records are built on the stack, so instrumentation never
//! changes the figures it reports.

use std::panic::Location;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};

use crate::format::{
    def_lengths, def_word, DefClass, EXT_DEF, EXT_ENTER, EXT_INSTRUMENTED, EXT_OWNS,
};
use crate::trackable::Blocks;
use crate::{recorder, sys, writer};

/// Version of the registration API, written in `INSTRUMENTED`.
pub const API_VERSION: u64 = 1;
/// Largest extended payload `recorder::emit` takes, in words.
const MAX_PAYLOAD: usize = 256;

const UNKNOWN: u8 = 0;
const ON: u8 = 1;
const OFF: u8 = 2;

/// Whether instrumentation records anything; see the module documentation.
static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);
/// Ids of sites and tasks; 0 means "none".
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Whether annotated code should record: memscope is tracking this process.
#[inline(always)]
pub fn enabled() -> bool {
    // Relaxed: the state only ever goes from UNKNOWN to ON or OFF, and a thread that
    // still sees UNKNOWN just probes again.
    match STATE.load(Ordering::Relaxed) {
        ON => true,
        OFF => false,
        _ => probe(),
    }
}

#[cold]
#[inline(never)]
fn probe() -> bool {
    // `writer::pool()` exists once memscope's allocator saw an allocation (tracking is
    // then set up, or failed to be). Before that, `MEMSCOPE_OUT` says we run under
    // memscope; without either this is an ordinary build.
    if writer::pool().is_none() && sys::getenv(c"MEMSCOPE_OUT").is_none() {
        STATE.store(OFF, Ordering::Relaxed);
        return false;
    }
    let on = recorder::emit(EXT_INSTRUMENTED, &[API_VERSION]);
    STATE.store(if on { ON } else { OFF }, Ordering::Relaxed);
    on
}

/// A fresh id for a site or a task.
pub(crate) fn fresh_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Writes one extended record; false if nothing was recorded.
#[inline]
pub(crate) fn emit(kind: u64, payload: &[u64]) -> bool {
    recorder::emit(kind, payload)
}

/// Where a name comes from: a function, a variable, a scope or a task site. Generated
/// code keeps one in a `static` per call site or declaration.
pub struct Site {
    id: AtomicU64,
    class: DefClass,
    /// The name, or a function returning it (a path known only at run time).
    name: Name,
    detail: &'static str,
    file: &'static str,
    line: u32,
    column: u32,
}

enum Name {
    Text(&'static str),
    /// `std::any::type_name` of a function item nested in the function being named,
    /// whose last path segment is dropped: the function's full path.
    Path(fn() -> &'static str),
}

impl Site {
    /// An instrumented function, named by the path its `here` returns (see
    /// [`Name::Path`]), or by `name` when it is not empty.
    pub const fn function(
        name: &'static str,
        here: fn() -> &'static str,
        module: &'static str,
        file: &'static str,
        line: u32,
        column: u32,
    ) -> Site {
        Site::with(DefClass::Function, name, here, module, file, line, column)
    }

    /// An instrumented `async fn`: a place where tasks are created.
    pub const fn task(
        name: &'static str,
        here: fn() -> &'static str,
        module: &'static str,
        file: &'static str,
        line: u32,
        column: u32,
    ) -> Site {
        Site::with(DefClass::Task, name, here, module, file, line, column)
    }

    const fn with(
        class: DefClass,
        name: &'static str,
        here: fn() -> &'static str,
        module: &'static str,
        file: &'static str,
        line: u32,
        column: u32,
    ) -> Site {
        Site {
            id: AtomicU64::new(0),
            class,
            name: if name.is_empty() {
                Name::Path(here)
            } else {
                Name::Text(name)
            },
            detail: module,
            file,
            line,
            column,
        }
    }

    /// A variable declaration; its type is given at its first binding.
    pub const fn variable(name: &'static str, file: &'static str, line: u32, column: u32) -> Site {
        Site {
            id: AtomicU64::new(0),
            class: DefClass::Variable,
            name: Name::Text(name),
            detail: "",
            file,
            line,
            column,
        }
    }

    /// The site's id, interning it on first use.
    #[inline]
    pub fn id(&self) -> u64 {
        self.id_with(self.detail)
    }

    #[inline]
    fn id_with(&self, detail: &str) -> u64 {
        // Relaxed: the id is an opaque number; the DEF record it names is found by the
        // reader wherever it is in the trace.
        match self.id.load(Ordering::Relaxed) {
            0 => self.intern(detail),
            id => id,
        }
    }

    #[cold]
    #[inline(never)]
    fn intern(&self, detail: &str) -> u64 {
        let fresh = fresh_id();
        match self
            .id
            .compare_exchange(0, fresh, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => {
                let name = match self.name {
                    Name::Text(name) => name,
                    Name::Path(here) => function_path(here()),
                };
                def(
                    fresh,
                    self.class,
                    name,
                    detail,
                    self.file,
                    self.line,
                    self.column,
                );
                fresh
            }
            Err(winner) => winner,
        }
    }
}

/// `a::b::f::__memscope_here` → `a::b::f`; closures' `{{closure}}` segments are
/// dropped too.
fn function_path(here: &'static str) -> &'static str {
    let mut path = here.strip_suffix("::__memscope_here").unwrap_or(here);
    while let Some(p) = path.strip_suffix("::{{closure}}") {
        path = p;
    }
    path
}

/// Writes a `DEF` record; strings that do not fit one record are cut.
fn def(id: u64, class: DefClass, name: &str, detail: &str, file: &str, line: u32, column: u32) {
    let mut words = [0u64; MAX_PAYLOAD];
    let room = (MAX_PAYLOAD - 3) * 8;
    let name = cut(name, room);
    let detail = cut(detail, room - name.len());
    let file = cut(file, room - name.len() - detail.len());
    words[0] = id;
    words[1] = def_word(class, line, column);
    words[2] = def_lengths(name.len(), detail.len(), file.len());
    let n = 3 + pack(&mut words[3..], &[name, detail, file]);
    emit(EXT_DEF, &words[..n]);
}

/// Copies `parts` back to back into `words` as little-endian bytes; returns the
/// number of words used.
pub(crate) fn pack(words: &mut [u64], parts: &[&str]) -> usize {
    let mut at = 0usize;
    for part in parts {
        for &b in part.as_bytes() {
            if at / 8 >= words.len() {
                return words.len();
            }
            words[at / 8] |= u64::from(b) << (8 * (at % 8));
            at += 1;
        }
    }
    at.div_ceil(8)
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
pub(crate) fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Sites that exist only at run time, keyed by `(name, caller location)`: a fixed
/// open-addressing table whose slots are claimed with a compare-and-swap.
const DYNAMIC_SLOTS: usize = 1024;
#[allow(clippy::declare_interior_mutable_const)] // used only to initialise the arrays
const EMPTY: AtomicUsize = AtomicUsize::new(0);
#[allow(clippy::declare_interior_mutable_const)]
const NO_ID: AtomicU64 = AtomicU64::new(0);
static DYNAMIC_KEYS: [AtomicUsize; DYNAMIC_SLOTS] = [EMPTY; DYNAMIC_SLOTS];
static DYNAMIC_IDS: [AtomicU64; DYNAMIC_SLOTS] = [NO_ID; DYNAMIC_SLOTS];

/// The id of the run-time site `(class, name, location)`; 0 if the table is full.
pub(crate) fn dynamic_site(class: DefClass, name: &'static str, at: &'static Location) -> u64 {
    let key = (name.as_ptr() as usize ^ (name.len() << 48) ^ (at as *const Location as usize))
        .wrapping_mul(0x9e37_79b9_7f4a_7c15_u64 as usize)
        | 1;
    let mut slot = key % DYNAMIC_SLOTS;
    for _ in 0..DYNAMIC_SLOTS {
        // Acquire pairs with the Release store of the id below, so a key that is seen
        // is followed by its id (0 while its owner is still writing the DEF record).
        match DYNAMIC_KEYS[slot].load(Ordering::Acquire) {
            k if k == key => loop {
                let id = DYNAMIC_IDS[slot].load(Ordering::Acquire);
                if id != 0 {
                    return id;
                }
                std::hint::spin_loop();
            },
            0 => {
                if DYNAMIC_KEYS[slot]
                    .compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    let id = fresh_id();
                    def(id, class, name, "", at.file(), at.line(), at.column());
                    DYNAMIC_IDS[slot].store(id, Ordering::Release);
                    return id;
                }
                continue; // someone claimed it first: look again
            }
            _ => slot = (slot + 1) % DYNAMIC_SLOTS,
        }
    }
    0
}

/// Leaves a scope (or a task poll) when dropped; does nothing if entering recorded
/// nothing.
#[must_use = "the scope ends when this guard is dropped"]
pub struct ScopeGuard {
    id: u64,
}

impl ScopeGuard {
    pub(crate) const NONE: ScopeGuard = ScopeGuard { id: 0 };

    /// Whether the scope was entered: memscope is tracking this thread.
    #[doc(hidden)]
    #[inline(always)]
    pub fn entered(&self) -> bool {
        self.id != 0
    }

    /// Enters `id` on this thread.
    pub(crate) fn enter_id(id: u64) -> ScopeGuard {
        if id != 0 && recorder::scope_event(id, false) {
            ScopeGuard { id }
        } else {
            ScopeGuard::NONE
        }
    }

    /// Enters task `id` on this thread, stamped after its creation and its earlier
    /// polls on other threads (see `recorder::emit_after`).
    pub(crate) fn enter_task(id: u64) -> ScopeGuard {
        if id != 0 && recorder::emit_after(EXT_ENTER, &[id], id) {
            ScopeGuard { id }
        } else {
            ScopeGuard::NONE
        }
    }
}

impl Drop for ScopeGuard {
    #[inline]
    fn drop(&mut self) {
        if self.id != 0 {
            exit_id(self.id);
        }
    }
}

/// Leaves `id` on this thread. Apart from the guard's (inlined) drop, so that the
/// record is written with constant words, as in `enter_id`.
#[inline(never)]
fn exit_id(id: u64) {
    recorder::scope_event(id, true);
}

/// Enters the scope of an instrumented function.
#[inline(always)]
pub fn enter(site: &'static Site) -> ScopeGuard {
    if !enabled() {
        return ScopeGuard::NONE;
    }
    ScopeGuard::enter_id(site.id())
}

/// A scope guard: allocations on this thread until it is dropped are attributed to
/// the scope `name` (nested in the instrumented scopes around it).
///
/// ```
/// let _g = memscope::scope("load config");
/// let config = vec![0u8; 100];
/// # drop(config);
/// ```
#[track_caller]
#[inline]
pub fn scope(name: &'static str) -> ScopeGuard {
    if !enabled() {
        return ScopeGuard::NONE;
    }
    ScopeGuard::enter_id(dynamic_site(DefClass::Scope, name, Location::caller()))
}

/// Registers the blocks `blocks` owned by the variable declared at `site`, of type
/// `type_name`. Called by generated code once the blocks were collected.
#[inline]
pub fn bind(site: &'static Site, type_name: &'static str, blocks: &mut Blocks) {
    let id = site.id_with(type_name);
    if let Some(payload) = blocks.payload(id) {
        emit(EXT_OWNS, payload);
    }
}

/// Interns the variable declared at `site`, of type `type_name`, owning nothing.
#[inline(always)]
pub fn declare(site: &'static Site, type_name: &'static str) {
    site.id_with(type_name);
}

/// `std::any::type_name` of a value's type.
#[inline(always)]
pub fn type_name_of<T: ?Sized>(_: &T) -> &'static str {
    std::any::type_name::<T>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_memscope_instrumentation_is_off_and_scopes_record_nothing() {
        // No memscope allocator in unit tests, and no MEMSCOPE_OUT.
        if std::env::var_os("MEMSCOPE_OUT").is_none() {
            assert!(!enabled());
            let guard = scope("nothing");
            assert_eq!(guard.id, 0);
        }
    }

    #[test]
    fn strings_pack_little_endian_and_cut_on_char_boundaries() {
        let mut words = [0u64; 4];
        assert_eq!(pack(&mut words, &["ab", "c"]), 1);
        assert_eq!(words[0], u64::from_le_bytes(*b"abc\0\0\0\0\0"));
        assert_eq!(cut("héllo", 2), "h");
        assert_eq!(
            function_path("a::b::f::{{closure}}::__memscope_here"),
            "a::b::f"
        );
    }
}
