//! [`Trackable`]: which heap blocks a value owns, so that memscope can name them after
//! the variable that holds the value.
//!
//! Generated code asks every `let` binding for its blocks without adding a trait
//! bound to user code, by autoref specialization (dtolnay, "Autoref-based stable
//! specialization", 2019): `(&Probe(&value)).__memscope_blocks(out)` resolves to
//! [`ViaTrackable`] when the value's type implements [`Trackable`] and to
//! [`ViaNothing`] (no blocks) otherwise. In generic code the choice is made where the
//! type is still a parameter, so such values report no blocks.
//!
//! Addresses are exact block starts where the standard library's types expose them
//! (`Vec`, `String`, `Box`, `Rc`/`Arc` from their documented `repr(C)` layout) and
//! interior pointers otherwise (hash tables, B-trees, a `VecDeque` that does not wrap),
//! which the analysis resolves to the block that contains them.

use std::cell::{OnceCell, RefCell};
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};
use std::ffi::CString;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use crate::format::OwnedBlock;
use crate::instrument::Site;

/// At most this many blocks are registered per binding.
pub const MAX_BLOCKS: usize = 32;

/// A value that owns heap blocks. Implemented for the standard library's owning types;
/// `#[derive(memscope::Trackable)]` implements it for structs and enums field by field.
#[diagnostic::on_unimplemented(
    message = "memscope could not tell the type of this `let` binding where it is bound \
               (`{Self}` is decided later)",
    label = "give this binding a type annotation",
    note = "or use `#[memscope::instrument(skip_vars)]` on the function"
)]
pub trait Trackable {
    /// Adds the heap blocks this value owns to `out`.
    fn memscope_blocks(&self, out: &mut Blocks);
}

/// The blocks of one binding, collected on the stack (no allocation).
pub struct Blocks {
    /// `[variable id, count, 3 words per block…]`: an `OWNS` payload.
    words: [u64; 2 + 3 * MAX_BLOCKS],
    len: usize,
}

impl Default for Blocks {
    fn default() -> Self {
        Blocks::new()
    }
}

impl Blocks {
    pub fn new() -> Blocks {
        Blocks {
            words: [0; 2 + 3 * MAX_BLOCKS],
            len: 0,
        }
    }

    fn push(&mut self, block: OwnedBlock) {
        if self.len < MAX_BLOCKS && block.addr != 0 {
            let at = 2 + 3 * self.len;
            self.words[at..at + 3].copy_from_slice(&block.words());
            self.len += 1;
        }
    }

    /// A block of `size` bytes that starts at `ptr`.
    pub fn block<T: ?Sized>(&mut self, ptr: *const T, size: usize) {
        if size > 0 {
            self.push(OwnedBlock {
                addr: ptr as *const u8 as u64,
                size: size as u64,
                interior: false,
                counts: None,
            });
        }
    }

    /// A block that contains `ptr`, of `size` bytes if known (0 otherwise).
    pub fn interior<T: ?Sized>(&mut self, ptr: *const T, size: usize) {
        self.push(OwnedBlock {
            addr: ptr as *const u8 as u64,
            size: size as u64,
            interior: true,
            counts: None,
        });
    }

    /// A reference-counted block with its counts.
    pub fn refcounted<T: ?Sized>(
        &mut self,
        ptr: *const T,
        size: usize,
        strong: usize,
        weak: usize,
    ) {
        self.push(OwnedBlock {
            addr: ptr as *const u8 as u64,
            size: size as u64,
            interior: false,
            counts: Some((strong as u32, weak as u32)),
        });
    }

    /// Adds what `value` owns, if its type is [`Trackable`].
    pub fn add<T: Trackable + ?Sized>(&mut self, value: &T) {
        value.memscope_blocks(self);
    }

    /// Number of blocks collected.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `OWNS` payload for variable `var`, or `None` when there is no block.
    pub(crate) fn payload(&mut self, var: u64) -> Option<&[u64]> {
        if self.len == 0 {
            return None;
        }
        self.words[0] = var;
        self.words[1] = self.len as u64;
        Some(&self.words[..2 + 3 * self.len])
    }

    /// The blocks collected so far (for tests).
    pub fn blocks(&self) -> impl Iterator<Item = (u64, u64, bool)> + '_ {
        (0..self.len).map(|i| {
            let at = 2 + 3 * i;
            (
                self.words[at] & ((1 << 48) - 1),
                self.words[at + 1],
                (self.words[at] >> 56) & 1 == 1,
            )
        })
    }
}

/// Autoref specialization: see the module documentation.
pub struct Probe<'a, T: ?Sized>(pub &'a T);

/// Chosen when the value's type is [`Trackable`].
pub trait ViaTrackable {
    fn __memscope_blocks(&self, out: &mut Blocks);
    /// Registers the value as the variable declared at `site`.
    fn __memscope_bind(&self, site: &'static Site);
}

impl<T: Trackable + ?Sized> ViaTrackable for Probe<'_, T> {
    #[inline]
    fn __memscope_blocks(&self, out: &mut Blocks) {
        self.0.memscope_blocks(out);
    }

    #[inline(never)]
    fn __memscope_bind(&self, site: &'static Site) {
        let mut blocks = Blocks::new();
        self.0.memscope_blocks(&mut blocks);
        crate::instrument::bind(site, std::any::type_name::<T>(), &mut blocks);
    }
}

/// Chosen otherwise: no blocks.
pub trait ViaNothing {
    fn __memscope_blocks(&self, out: &mut Blocks);
    fn __memscope_bind(&self, site: &'static Site);
}

impl<T: ?Sized> ViaNothing for &Probe<'_, T> {
    #[inline(always)]
    fn __memscope_blocks(&self, _out: &mut Blocks) {}

    /// Declares the variable (name, type, location) once; nothing per binding.
    #[inline(always)]
    fn __memscope_bind(&self, site: &'static Site) {
        crate::instrument::declare(site, std::any::type_name::<T>());
    }
}

// ---------------------------------------------------------------------------------
// The standard library's owning types.

impl<T> Trackable for Vec<T> {
    fn memscope_blocks(&self, out: &mut Blocks) {
        out.block(self.as_ptr(), self.capacity() * size_of::<T>());
    }
}

impl Trackable for String {
    fn memscope_blocks(&self, out: &mut Blocks) {
        out.block(self.as_ptr(), self.capacity());
    }
}

impl<T: ?Sized> Trackable for Box<T> {
    fn memscope_blocks(&self, out: &mut Blocks) {
        out.block(&**self as *const T, size_of_val::<T>(self));
    }
}

/// Start and size of the allocation behind an `Rc`/`Arc` whose value is at `value`:
/// both put two `usize` counts before the value in a `repr(C)` struct.
fn counted_block<T: ?Sized>(value: &T) -> (*const u8, usize) {
    let align = align_of_val(value).max(align_of::<usize>());
    let header = (2 * size_of::<usize>()).next_multiple_of(align);
    let size = (header + size_of_val(value)).next_multiple_of(align);
    let start = (value as *const T as *const u8).wrapping_sub(header);
    (start, size)
}

impl<T: ?Sized> Trackable for Rc<T> {
    fn memscope_blocks(&self, out: &mut Blocks) {
        let (start, size) = counted_block::<T>(self);
        out.refcounted(start, size, Rc::strong_count(self), Rc::weak_count(self));
    }
}

impl<T: ?Sized> Trackable for Arc<T> {
    fn memscope_blocks(&self, out: &mut Blocks) {
        let (start, size) = counted_block::<T>(self);
        out.refcounted(start, size, Arc::strong_count(self), Arc::weak_count(self));
    }
}

impl<T> Trackable for VecDeque<T> {
    fn memscope_blocks(&self, out: &mut Blocks) {
        let size = self.capacity() * size_of::<T>();
        if size == 0 {
            return;
        }
        match self.as_slices() {
            // Wrapped: the second part starts the buffer.
            (_, back) if !back.is_empty() => out.block(back.as_ptr(), size),
            (front, _) if !front.is_empty() => out.interior(front.as_ptr(), size),
            _ => {}
        }
    }
}

impl<T> Trackable for BinaryHeap<T> {
    fn memscope_blocks(&self, out: &mut Blocks) {
        out.block(self.as_slice().as_ptr(), self.capacity() * size_of::<T>());
    }
}

impl<K, V, S> Trackable for HashMap<K, V, S> {
    fn memscope_blocks(&self, out: &mut Blocks) {
        if size_of::<(K, V)>() > 0 {
            if let Some((k, _)) = self.iter().next() {
                out.interior(k as *const K, 0);
            }
        }
    }
}

impl<T, S> Trackable for HashSet<T, S> {
    fn memscope_blocks(&self, out: &mut Blocks) {
        if size_of::<T>() > 0 {
            if let Some(v) = self.iter().next() {
                out.interior(v as *const T, 0);
            }
        }
    }
}

impl<K, V> Trackable for BTreeMap<K, V> {
    fn memscope_blocks(&self, out: &mut Blocks) {
        // The first leaf; the other nodes are not reachable through the API.
        if let Some((k, _)) = self.iter().next() {
            out.interior(k as *const K, 0);
        }
    }
}

impl<T> Trackable for BTreeSet<T> {
    fn memscope_blocks(&self, out: &mut Blocks) {
        if let Some(v) = self.iter().next() {
            out.interior(v as *const T, 0);
        }
    }
}

impl Trackable for PathBuf {
    fn memscope_blocks(&self, out: &mut Blocks) {
        out.block(
            self.as_os_str().as_encoded_bytes().as_ptr(),
            self.capacity(),
        );
    }
}

impl Trackable for CString {
    fn memscope_blocks(&self, out: &mut Blocks) {
        let bytes = self.as_bytes_with_nul();
        out.block(bytes.as_ptr(), bytes.len());
    }
}

impl<T: Trackable> Trackable for Option<T> {
    fn memscope_blocks(&self, out: &mut Blocks) {
        if let Some(v) = self {
            v.memscope_blocks(out);
        }
    }
}

impl<T: Trackable + ?Sized> Trackable for RefCell<T> {
    fn memscope_blocks(&self, out: &mut Blocks) {
        // A value mutably borrowed elsewhere is not looked at.
        if let Ok(v) = self.try_borrow() {
            v.memscope_blocks(out);
        }
    }
}

impl<T: Trackable> Trackable for OnceCell<T> {
    fn memscope_blocks(&self, out: &mut Blocks) {
        if let Some(v) = self.get() {
            v.memscope_blocks(out);
        }
    }
}

impl<T: Trackable + ?Sized> Trackable for Mutex<T> {
    fn memscope_blocks(&self, out: &mut Blocks) {
        // Never blocks: a value locked elsewhere is not looked at.
        match self.try_lock() {
            Ok(v) => v.memscope_blocks(out),
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().memscope_blocks(out),
            Err(std::sync::TryLockError::WouldBlock) => {}
        }
    }
}

impl<T: Trackable + ?Sized> Trackable for RwLock<T> {
    fn memscope_blocks(&self, out: &mut Blocks) {
        match self.try_read() {
            Ok(v) => v.memscope_blocks(out),
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().memscope_blocks(out),
            Err(std::sync::TryLockError::WouldBlock) => {}
        }
    }
}

impl<T: Trackable> Trackable for OnceLock<T> {
    fn memscope_blocks(&self, out: &mut Blocks) {
        if let Some(v) = self.get() {
            v.memscope_blocks(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks_of<T: Trackable>(v: &T) -> Vec<(u64, u64, bool)> {
        let mut out = Blocks::new();
        out.add(v);
        out.blocks().collect()
    }

    #[test]
    fn vec_and_string_own_their_buffer_and_empty_ones_own_nothing() {
        let v: Vec<u32> = Vec::with_capacity(10);
        assert_eq!(blocks_of(&v), vec![(v.as_ptr() as u64, 40, false)]);
        assert_eq!(blocks_of(&Vec::<u8>::new()), vec![]);
        let s = String::from("hello");
        assert_eq!(blocks_of(&s)[0].1, s.capacity() as u64);
    }

    #[test]
    fn rc_block_starts_two_words_before_its_value() {
        let rc = Rc::new(7u64);
        let (addr, size, _) = blocks_of(&rc)[0];
        assert_eq!(addr + 16, Rc::as_ptr(&rc) as u64);
        assert_eq!(size, 24);
        let big = Arc::new([0u8; 3]);
        assert_eq!(blocks_of(&big)[0].1, 24);
    }

    #[test]
    // The explicit `&` is what the attribute's expansion writes: method lookup on
    // `&Probe` is what picks `ViaTrackable` over `ViaNothing`.
    #[allow(clippy::needless_borrow)]
    fn a_type_that_is_not_trackable_reports_nothing_through_the_probe() {
        struct Plain;
        #[allow(unused_imports)]
        use super::{ViaNothing as _, ViaTrackable as _};
        let mut out = Blocks::new();
        (&Probe(&Plain)).__memscope_blocks(&mut out);
        (&Probe(&vec![1u8])).__memscope_blocks(&mut out);
        assert_eq!(out.len(), 1);
    }
}
