//! The workloads with the system allocator, untracked.
fn main() {
    memscope_bench::run_from_args();
}
