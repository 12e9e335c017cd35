//! `cargo run --release -p memscope-bench`: runs each workload untracked, tracked by
//! memscope (with and without call stacks) and under dhat-rs, alternating variants,
//! and prints each variant's median time and its ratio to the untracked run. The
//! untracked binary is an ordinary build: `calls-instrumented` against `calls` there
//! is the cost of `#[memscope::instrument]` when memscope is not tracking.
//!
//! The variants are built here with frame pointers on (as `cargo memscope` builds
//! programs) into `target/bench`, so the comparison is like for like. Arguments
//! (`--help`): `--runs N` (default 5), `--repeat K` (default 3: each run does the
//! workload K times in one process and keeps the fastest, the least disturbed by the
//! rest of the machine), `--no-dhat`, and workload names to run only those.

use std::path::{Path, PathBuf};
use std::process::Command;

use memscope_bench::WORKLOADS;

struct Variant {
    name: &'static str,
    binary: &'static str,
    stacks: bool,
}

const VARIANTS: &[Variant] = &[
    Variant {
        name: "untracked",
        binary: "bench-untracked",
        stacks: true,
    },
    Variant {
        name: "memscope",
        binary: "bench-tracked",
        stacks: true,
    },
    Variant {
        name: "memscope, no stacks",
        binary: "bench-tracked",
        stacks: false,
    },
    Variant {
        name: "dhat-rs",
        binary: "bench-dhat",
        stacks: true,
    },
];

/// The overhead benchmark: each workload untracked, tracked by memscope (with and
/// without call stacks) and under dhat-rs, with the ratios to the untracked run.
#[derive(clap::Parser)]
#[command(name = "memscope-bench")]
struct Args {
    /// Runs of each variant (the median is shown).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Times each run does the workload in one process; the fastest counts.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// Skip the dhat-rs variant (the slowest by far).
    #[arg(long)]
    no_dhat: bool,
    /// Workloads to run (default: all).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(WORKLOADS))]
    workloads: Vec<String>,
}

fn main() {
    let args = <Args as clap::Parser>::parse();
    let runs = args.runs as usize;
    let with_dhat = !args.no_dhat;
    let workloads: Vec<&str> = WORKLOADS
        .iter()
        .copied()
        .filter(|w| args.workloads.is_empty() || args.workloads.iter().any(|a| a == w))
        .collect();

    let bin_dir = build_variants();
    let trace_dir = std::env::temp_dir().join(format!("memscope-bench-{}", std::process::id()));
    println!(
        "runs per variant: {runs} (median shown), each the fastest of {} in one process; ratios are to the untracked run",
        args.repeat
    );
    println!("wall: elapsed time; cpu: CPU time of all the process's threads (memscope's writer included)\n");
    println!(
        "{:<18} {:<22} {:>12} {:>8} {:>12} {:>8}",
        "workload", "variant", "wall ms", "ratio", "cpu ms", "ratio"
    );
    for workload in workloads {
        let variants: Vec<&Variant> = VARIANTS
            .iter()
            .filter(|v| with_dhat || v.binary != "bench-dhat")
            .collect();
        let mut walls: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
        let mut cpus: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
        for _ in 0..runs {
            for (i, v) in variants.iter().enumerate() {
                let (wall, cpu) = run_once(&bin_dir, v, workload, args.repeat, &trace_dir);
                walls[i].push(wall);
                cpus[i].push(cpu);
            }
        }
        let wall: Vec<f64> = walls.iter_mut().map(|t| median(t)).collect();
        let cpu: Vec<f64> = cpus.iter_mut().map(|t| median(t)).collect();
        for (i, v) in variants.iter().enumerate() {
            println!(
                "{:<18} {:<22} {:>12.1} {:>7.2}x {:>12.1} {:>7.2}x",
                workload,
                v.name,
                wall[i] / 1e6,
                wall[i] / wall[0],
                cpu[i] / 1e6,
                cpu[i] / cpu[0]
            );
        }
        println!();
    }
    let _ = std::fs::remove_dir_all(&trace_dir);
}

fn build_variants() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf();
    let target = root.join("target").join("bench");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "-q",
            "-p",
            "memscope-bench",
            "--bins",
            "--target-dir",
        ])
        .arg(&target)
        .env("RUSTFLAGS", "-C force-frame-pointers=yes")
        .status()
        .expect("failed to run cargo");
    assert!(status.success(), "building the benchmark variants failed");
    target.join("release")
}

/// One run of a variant (the fastest of `repeat` in one process): its wall and CPU
/// nanoseconds.
fn run_once(
    bin_dir: &Path,
    variant: &Variant,
    workload: &str,
    repeat: u32,
    trace_dir: &Path,
) -> (f64, f64) {
    let _ = std::fs::remove_dir_all(trace_dir);
    std::fs::create_dir_all(trace_dir).expect("failed to create the trace directory");
    let mut command = Command::new(bin_dir.join(variant.binary));
    command.arg(workload).arg(repeat.to_string());
    // Only the tracked variant runs as under `cargo memscope`: the untracked one is an
    // ordinary build (instrumented code there must see no memscope at all).
    if variant.binary == "bench-tracked" {
        command
            .env("MEMSCOPE_OUT", trace_dir)
            .env("MEMSCOPE_STACKS", if variant.stacks { "1" } else { "0" });
    }
    let out = command.output().expect("failed to run a benchmark variant");
    assert!(
        out.status.success(),
        "{} {workload} failed: {}",
        variant.name,
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut times = stdout
        .split_whitespace()
        .map(|t| t.parse::<f64>().expect("a variant printed no times"));
    let wall = times.next().expect("a variant printed no wall time");
    let cpu = times.next().expect("a variant printed no CPU time");
    (wall, cpu)
}

fn median(times: &mut [f64]) -> f64 {
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}
