//! `cargo memscope`: build a package with memscope's tracking allocator, run it, and
//! report what it did with memory. See DESIGN.md for what each module owns.

mod annotate;
mod cargo;
mod ci;
mod cli;
mod embedded;
mod follow;
mod gate;
mod html;
mod instrument;
mod json_layout;
mod libtest;
mod lockfile;
mod modules;
mod pertest;
mod replay;
mod report;
mod rewrite;
mod run;
mod runner;
mod scratch;
mod suite;
mod summary;
mod symbols;
mod symcache;
mod trace;

use std::process::ExitCode;

use cli::Command;

/// Exit codes besides the program's own (documented in `--help`, see `cli.rs`).
pub const EXIT_SUCCESS: u8 = 0;
/// memscope itself failed: bad arguments (clap uses 2 too), no Cargo.toml, no binary,
/// a build failure, a missing or unreadable trace, a program that wrote no trace.
pub const EXIT_MEMSCOPE_ERROR: u8 = 2;
/// A threshold gate failed (`--fail-on-leaks`, `--max-leaked-bytes`, `--max-peak`)
/// while the program or every test succeeded.
pub const EXIT_GATE_FAILED: u8 = 3;

fn main() -> ExitCode {
    // `__runner` (cargo's runner for `cargo memscope test`, see `runner.rs`) is not
    // part of the CLI: it starts once per test executable, and building the CLI
    // costs about as much as the rest of its start-up.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let (result, color) = if args.get(1).is_some_and(|a| a == "__runner") {
        (runner::run(&args[2..]), false)
    } else {
        let cli = cli::parse();
        let color = cli.color_enabled();
        (try_main(cli), color)
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            print_error(&err, color);
            ExitCode::from(EXIT_MEMSCOPE_ERROR)
        }
    }
}

fn try_main(cli: cli::Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Run(args) => run::run(&args),
        Command::Test(args) => suite::test(&args),
        Command::Nextest(args) => suite::test(&cli::TestArgs {
            nextest: true,
            ..args
        }),
        Command::Report(args) => run::report(&args).map(|()| EXIT_SUCCESS),
    }
}

/// Prints an error and its causes on one line: `error: <what failed>: <why>`.
pub fn print_error(err: &anyhow::Error, color: bool) {
    let label = if color {
        "\x1b[1;31merror\x1b[0m"
    } else {
        "error"
    };
    eprintln!("{label}: {err:#}");
}
