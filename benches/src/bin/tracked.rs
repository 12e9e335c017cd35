//! The workloads tracked by memscope (set `MEMSCOPE_STACKS=0` for no stacks).
#[global_allocator]
static ALLOC: memscope::Alloc = memscope::Alloc::system();

fn main() {
    memscope_bench::run_from_args();
}
