//! memscope's runtime, compiled into the program being tracked.
//!
//! [`Alloc`] is a global allocator that wraps another one (the system allocator by
//! default) and records every allocation, zeroed allocation, reallocation and free —
//! address, size, alignment, thread, time and call stack — into a trace file, one per
//! process, in the directory named by `MEMSCOPE_OUT` (the current directory if unset).
//! `cargo memscope` installs it for you; by hand:
//!
//! ```no_run
//! #[global_allocator]
//! static ALLOC: memscope::Alloc = memscope::Alloc::system();
//! # fn main() {}
//! ```
//!
//! Environment: `MEMSCOPE_OUT` (trace directory), `MEMSCOPE_STACKS=0` (no call
//! stacks: cheaper, but reports can't say where memory was allocated).
//!
//! The trace format is described in [`format`]; `cargo memscope report` reads it.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod alloc;
mod buffer;
mod clock;
pub mod format;
mod recorder;
mod stack;
mod sys;
mod writer;

pub use alloc::{Alloc, ByRef};
