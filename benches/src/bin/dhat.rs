//! The workloads under dhat-rs's heap profiler, for reference.
#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

fn main() {
    let _profiler = dhat::Profiler::builder().file_name("/dev/null").build();
    memscope_bench::run_from_args();
}
