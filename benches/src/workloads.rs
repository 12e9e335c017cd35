//! The benchmark's workloads. Each variant binary (untracked, tracked, dhat) runs the
//! same code; only its `#[global_allocator]` differs. A workload prints the
//! nanoseconds it took, measured inside the process, so process start-up and trace
//! finalisation are reported separately by the driver.

use std::hint::black_box;
use std::time::Instant;

/// Names of the workloads, in the order the driver runs them.
pub const WORKLOADS: &[&str] = &[
    "churn",
    "churn-4-threads",
    "million-live",
    "vec-growth",
    "calls",
    "calls-instrumented",
];

/// Operations per thread in the churn workloads.
const CHURN_OPS: usize = 2_000_000;

/// Runs the workload named by the first argument as many times as the second says
/// (default 1) and prints `elapsed_ns cpu_ns` of the fastest run: its wall time, and
/// the CPU time all of the process's threads used meanwhile (memscope's writer thread
/// included). The fastest of several runs in one process is the least disturbed by
/// whatever else the machine does.
pub fn run_from_args() {
    let name = std::env::args().nth(1).unwrap_or_default();
    let repeat: u32 = std::env::args()
        .nth(2)
        .and_then(|r| r.parse().ok())
        .unwrap_or(1);
    let mut best = (u128::MAX, 0);
    for _ in 0..repeat.max(1) {
        let cpu_start = process_cpu_ns();
        let start = Instant::now();
        run_workload(&name);
        let elapsed = start.elapsed().as_nanos();
        let cpu = process_cpu_ns() - cpu_start;
        if elapsed < best.0 {
            best = (elapsed, cpu);
        }
    }
    println!("{} {}", best.0, best.1);
}

fn run_workload(name: &str) {
    match name {
        "churn" => churn(CHURN_OPS, 1),
        "churn-4-threads" => churn(CHURN_OPS, 4),
        "million-live" => million_live(),
        "vec-growth" => vec_growth(),
        "calls" => calls(false),
        "calls-instrumented" => calls(true),
        other => {
            eprintln!("unknown workload {other:?}; expected one of {WORKLOADS:?}");
            std::process::exit(2);
        }
    }
}

/// Small-object churn: each thread keeps 64 live boxes of 8–256 bytes and replaces
/// one per operation (one allocation and one free per operation).
fn churn(ops: usize, threads: usize) {
    let work = move |seed: u64| {
        let mut slots: Vec<Box<[u8]>> = (0..64).map(|_| vec![1u8; 8].into_boxed_slice()).collect();
        let mut x = seed;
        for i in 0..ops {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let size = 8 + (x >> 33) as usize % 249;
            slots[i % 64] = vec![i as u8; size].into_boxed_slice();
        }
        black_box(&slots);
    };
    if threads == 1 {
        work(1);
    } else {
        let handles: Vec<_> = (0..threads as u64)
            .map(|t| std::thread::spawn(move || work(t + 1)))
            .collect();
        for h in handles {
            h.join().expect("churn thread panicked");
        }
    }
}

/// A million live blocks at once, then all freed.
fn million_live() {
    let blocks: Vec<Box<u64>> = (0..1_000_000u64).map(Box::new).collect();
    black_box(&blocks);
    drop(blocks);
}

/// Vectors growing by push: mostly reallocations.
fn vec_growth() {
    for round in 0..20_000u32 {
        let mut v = Vec::new();
        for i in 0..1000u32 {
            v.push(i ^ round);
        }
        black_box(&v);
    }
}

/// Calls of a small function in the call-heavy workloads.
const CALLS: u64 = 10_000_000;

/// Ten million calls of a small function that does not allocate, plain or under
/// `#[memscope::instrument]` (a scope per call and one `let` binding registered): the
/// cost of instrumentation itself. Untracked, `calls-instrumented` is an ordinary
/// build of annotated code.
fn calls(instrumented: bool) {
    let mut acc = 0u64;
    for i in 0..CALLS {
        acc = if instrumented {
            instrumented_step(black_box(acc ^ i))
        } else {
            plain_step(black_box(acc ^ i))
        };
    }
    black_box(acc);
}

#[inline(never)]
fn plain_step(x: u64) -> u64 {
    let y = x.wrapping_mul(0x9e37_79b9) ^ 7;
    y.rotate_left(3)
}

#[memscope::instrument]
#[inline(never)]
fn instrumented_step(x: u64) -> u64 {
    let y = x.wrapping_mul(0x9e37_79b9) ^ 7;
    y.rotate_left(3)
}

/// CPU time used so far by all of this process's threads.
fn process_cpu_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime writes only to it.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}
