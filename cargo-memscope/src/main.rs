//! `cargo memscope`: build a package with memscope's tracking allocator, run it, and
//! report what it did with memory. See DESIGN.md for what each module owns.

fn main() {}
