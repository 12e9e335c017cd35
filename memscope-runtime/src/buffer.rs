//! Event buffers: fixed-size blocks, each holding one chunk of one thread's stream
//! with room for its chunk header in front, so a chunk is written with one `write`.
//!
//! Buffers come from a lock-free pool (crossbeam `ArrayQueue`) and go back to it
//! after use; they are obtained from `System` directly, never through the global
//! allocator, so taking one records no event. Buffers are never freed while the
//! process runs: a snapshot at exit may still be reading one that a thread just gave
//! up (see `recorder.rs`). So the number ever allocated is bounded by the most that
//! were in use at once; past the pool's capacity, idle ones are simply kept.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr::NonNull;

use crossbeam_queue::ArrayQueue;

use crate::format::{ChunkHeader, CHUNK_HEADER_LEN};

/// Payload capacity of one buffer, in 64-bit words (16 KiB: a thread's own buffer
/// stays in its core's cache).
pub const PAYLOAD_WORDS: usize = 2048;
/// Payload capacity in bytes.
pub const PAYLOAD_BYTES: usize = PAYLOAD_WORDS * 8;
/// How many idle buffers the pool holds.
const POOL_CAPACITY: usize = 4096;

/// A chunk header followed by its payload, contiguous in memory.
#[repr(C, align(64))]
pub struct Buffer {
    header: [u8; CHUNK_HEADER_LEN],
    pub words: [u64; PAYLOAD_WORDS],
}

/// A buffer in flight between a thread and the writer.
pub struct Full {
    pub buf: NonNull<Buffer>,
    pub thread: u32,
    pub index: u32,
    pub len: usize,
}

// SAFETY: a `Full` is owned by exactly one party at a time (the queue hands it over);
// the buffer it points to is not touched by the thread that submitted it.
unsafe impl Send for Full {}

/// A pooled buffer pointer.
struct Idle(NonNull<Buffer>);

// SAFETY: an idle buffer in the pool is owned by the pool alone.
unsafe impl Send for Idle {}

pub struct Pool {
    idle: ArrayQueue<Idle>,
}

impl Pool {
    pub fn new() -> Pool {
        Pool {
            idle: ArrayQueue::new(POOL_CAPACITY),
        }
    }

    /// A buffer from the pool, or a new one; `None` only if memory is exhausted.
    pub fn take(&self) -> Option<NonNull<Buffer>> {
        if let Some(Idle(buf)) = self.idle.pop() {
            return Some(buf);
        }
        // SAFETY: the layout has non-zero size. The memory is used only as a
        // `Buffer`, whose fields are plain integers, so uninitialised words are never
        // read: only the prefix a thread has written is.
        NonNull::new(unsafe { System.alloc(Layout::new::<Buffer>()) } as *mut Buffer)
    }

    /// Returns a buffer to the pool. When the pool is full the buffer is kept
    /// allocated but unused (see the module documentation).
    pub fn give_back(&self, buf: NonNull<Buffer>) {
        let _ = self.idle.push(Idle(buf));
    }
}

impl Full {
    /// The bytes to write: chunk header then `len` payload bytes. Fills the header.
    pub fn bytes(&mut self) -> &[u8] {
        let len = self.len.min(PAYLOAD_BYTES);
        // SAFETY: the submitter handed the buffer over; we own it until it goes back
        // to the pool, and its first `len` payload bytes were written by the thread.
        let buffer = unsafe { self.buf.as_mut() };
        // SAFETY: `words` has PAYLOAD_BYTES bytes and `len <= PAYLOAD_BYTES`.
        let payload =
            unsafe { std::slice::from_raw_parts(buffer.words.as_ptr() as *const u8, len) };
        let header = ChunkHeader {
            thread: self.thread,
            index: self.index,
            len: len as u32,
            checksum: crate::format::checksum(payload),
        };
        buffer.header = header.encode();
        // SAFETY: `Buffer` is repr(C) with `words` right after the header (asserted
        // below), so the header and the first `len` payload bytes are one initialised
        // range inside the buffer.
        unsafe {
            std::slice::from_raw_parts(buffer as *const Buffer as *const u8, CHUNK_HEADER_LEN + len)
        }
    }
}

// The header must sit directly before the payload for `Full::bytes` to be one slice.
const _: () = assert!(std::mem::offset_of!(Buffer, words) == CHUNK_HEADER_LEN);
