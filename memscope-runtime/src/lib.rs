//! memscope's runtime: placeholder while the allocator is written.
pub mod format;
