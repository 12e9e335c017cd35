//! The command line: `cargo memscope run`, `cargo memscope test` and
//! `cargo memscope report`.
//!
//! Cargo runs a subcommand as `cargo-memscope memscope <args>`; [`parse`] drops that
//! extra word so `cargo-memscope <args>` works the same.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::annotate::Pattern;

/// `--instrument`'s help (the grammar is in `annotate.rs`).
const INSTRUMENT_HELP: &str = "\
Apply #[memscope::instrument] to the functions PATTERN names, in memscope's copy of \
the workspace only (repeatable): a module, type or function path (`book`, \
`crate::book::OrderBook`, `mylib::cache`) or a file or directory (`src/book.rs`, \
`src/engine/`); `*` matches any text";

/// The exit status section of `--help`; the codes are the constants in `main.rs`.
const EXIT_STATUS_HELP: &str = "\
Exit status:
  `run` exits with the program's own exit code (128+N when the program is killed
  by signal N); `test` with cargo test's (101 when a test failed), `nextest` with
  cargo-nextest's (100). Otherwise:
    0  success, and no gate failed
    2  memscope itself failed: bad arguments, no Cargo.toml, no binary to run, a
       build failure, a missing or unreadable trace, a program that wrote no trace
       (when the program failed too, its own exit code is kept instead)
    3  a gate failed: --fail-on-leaks, --max-leaked-bytes or --max-peak (checked
       only when the program or every test succeeded)";

#[derive(Debug, Parser)]
#[command(
    name = "cargo-memscope",
    bin_name = "cargo memscope",
    version,
    about = "Track every heap allocation of a Rust program and report leaks, peak and sites",
    after_help = EXIT_STATUS_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once; boxing would only add noise
pub enum Command {
    /// Build a binary with the tracking allocator, run it, and report its memory use
    #[command(after_help = EXIT_STATUS_HELP)]
    Run(RunArgs),
    /// Build the tests with the tracking allocator, run them, and report memory per test
    #[command(after_help = EXIT_STATUS_HELP)]
    Test(TestArgs),
    /// `test --nextest`: run the tests with cargo-nextest, each in its own process
    #[command(after_help = EXIT_STATUS_HELP)]
    Nextest(TestArgs),
    /// Render reports from existing trace files (`*.mstrace`) or directories of them
    #[command(after_help = EXIT_STATUS_HELP)]
    Report(ReportArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    // Declared before the flattened groups, which set the help heading of what follows.
    /// Record allocations without call stacks (faster; reports lose allocation sites)
    #[arg(long)]
    pub no_stacks: bool,

    #[arg(long, value_name = "PATTERN", value_parser = Pattern::parse, help = INSTRUMENT_HELP)]
    pub instrument: Vec<Pattern>,

    /// Arguments for the program (after `--`)
    #[arg(last = true, value_name = "ARGS")]
    pub program_args: Vec<OsString>,

    #[command(flatten)]
    pub gate: GateArgs,

    #[command(flatten)]
    pub cargo: CargoArgs,

    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct TestArgs {
    /// Record allocations without call stacks (faster; reports lose allocation sites)
    #[arg(long)]
    pub no_stacks: bool,

    #[arg(long, value_name = "PATTERN", value_parser = Pattern::parse, help = INSTRUMENT_HELP)]
    pub instrument: Vec<Pattern>,

    /// Run the tests with cargo-nextest (`cargo nextest run`), each in its own process:
    /// per-test figures come from each test's own process
    #[arg(long)]
    pub nextest: bool,

    /// Run only the tests whose names contain this string (passed to the harness, or
    /// to nextest as a filter)
    #[arg(value_name = "TESTNAME")]
    pub filter: Option<String>,

    /// Arguments for the test harness (after `--`), e.g. `--test-threads=1`; with
    /// `--nextest`, nextest's emulated harness arguments (`--ignored`, `--exact`, …)
    #[arg(last = true, value_name = "ARGS")]
    pub harness_args: Vec<OsString>,

    #[command(flatten)]
    pub gate: GateArgs,

    #[command(flatten)]
    pub selection: TestSelection,

    #[command(flatten)]
    pub cargo: CargoArgs,

    #[command(flatten)]
    pub output: OutputArgs,
}

/// `cargo test`'s target selection, passed through. Doc tests are not tracked.
#[derive(Debug, Args, Default)]
#[command(next_help_heading = "Test selection (as for `cargo test`; doc tests are not tracked)")]
pub struct TestSelection {
    /// Test only this package's library
    #[arg(long)]
    pub lib: bool,
    /// Test all binaries
    #[arg(long)]
    pub bins: bool,
    /// Test only the named integration test
    #[arg(long = "test", value_name = "NAME")]
    pub test: Vec<String>,
    /// Test all targets that have `test = true` (the default)
    #[arg(long)]
    pub tests: bool,
    /// Test only the named bench target
    #[arg(long = "bench", value_name = "NAME")]
    pub bench: Vec<String>,
    /// Test all benches
    #[arg(long)]
    pub benches: bool,
    /// Test all examples
    #[arg(long)]
    pub examples: bool,
    /// Test all targets (doc tests excepted)
    #[arg(long)]
    pub all_targets: bool,
    /// Refused: doc tests are compiled by rustdoc without memscope's allocator
    #[arg(long)]
    pub doc: bool,
    /// Test all packages in the workspace
    #[arg(long, alias = "all")]
    pub workspace: bool,
    /// Exclude packages from the test (with --workspace)
    #[arg(long, value_name = "SPEC")]
    pub exclude: Vec<String>,
    /// Run all test binaries regardless of failure
    #[arg(long)]
    pub no_fail_fast: bool,
}

/// The leak kinds that count (`--leak-kinds`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeakKinds(pub Vec<&'static str>);

/// Thresholds that turn findings into exit code 3 (for `run` and `test`).
#[derive(Debug, Args, Default, Clone)]
#[command(next_help_heading = "Gates (exit code 3 when one fails)")]
pub struct GateArgs {
    /// Fail if any block the program allocated is live at exit (std's own bookkeeping
    /// and suppressed leaks excepted)
    #[arg(long)]
    pub fail_on_leaks: bool,

    /// Which leak kinds the gates, annotations and SARIF count: `all` (the default),
    /// `lost` (definitely_lost, indirectly_lost, reference_cycle and unclassified
    /// live_at_exit: not what a static or a stack still reaches), or a comma-separated
    /// list of kinds
    #[arg(long, value_name = "KINDS", value_parser = crate::gate::parse_leak_kinds)]
    pub leak_kinds: Option<LeakKinds>,

    /// Fail if more than N bytes leak (sizes like 4096, 64KiB, 1MB)
    #[arg(long, value_name = "N", value_parser = crate::gate::parse_size)]
    pub max_leaked_bytes: Option<u64>,

    /// Fail if live heap bytes ever exceed SIZE (sizes like 64MiB, 512KB, 1000)
    #[arg(long, value_name = "SIZE", value_parser = crate::gate::parse_size)]
    pub max_peak: Option<u64>,

    /// `test`: apply the limits to each test on its own instead of the whole run
    #[arg(long)]
    pub per_test: bool,

    /// Leaks to ignore, one rule per line: `function|crate|file PATTERN` (`*` globs)
    #[arg(long, value_name = "FILE")]
    pub suppressions: Option<PathBuf>,

    /// Also write the leaks found as SARIF 2.1.0 (for GitHub code scanning) to PATH
    #[arg(long, value_name = "PATH")]
    pub sarif: Option<PathBuf>,
}

/// Cargo's own selection, feature and profile flags, passed through to `cargo build`.
#[derive(Debug, Args, Clone, Default)]
#[command(next_help_heading = "Cargo options (as for `cargo run`)")]
pub struct CargoArgs {
    /// Path to Cargo.toml
    #[arg(long, value_name = "PATH")]
    pub manifest_path: Option<PathBuf>,

    /// Package with the binary to run
    #[arg(short = 'p', long = "package", value_name = "SPEC")]
    pub package: Option<String>,

    /// Name of the bin target to run
    #[arg(long, value_name = "NAME", conflicts_with = "example")]
    pub bin: Option<String>,

    /// Name of the example target to run
    #[arg(long, value_name = "NAME")]
    pub example: Option<String>,

    /// Build in release mode
    #[arg(short = 'r', long, conflicts_with = "profile")]
    pub release: bool,

    /// Build with the given profile
    #[arg(long, value_name = "PROFILE-NAME")]
    pub profile: Option<String>,

    /// Space or comma separated list of features to activate
    #[arg(short = 'F', long, value_name = "FEATURES")]
    pub features: Vec<String>,

    /// Activate all available features
    #[arg(long)]
    pub all_features: bool,

    /// Do not activate the `default` feature
    #[arg(long)]
    pub no_default_features: bool,

    /// Build for the target triple
    #[arg(long, value_name = "TRIPLE")]
    pub target: Option<String>,

    /// Number of parallel jobs
    #[arg(short = 'j', long, value_name = "N")]
    pub jobs: Option<String>,

    /// Override a configuration value
    #[arg(long, value_name = "KEY=VALUE")]
    pub config: Vec<String>,

    /// Assert that `Cargo.lock` will remain unchanged
    #[arg(long)]
    pub locked: bool,

    /// Run without accessing the network
    #[arg(long)]
    pub offline: bool,

    /// Equivalent to specifying both --locked and --offline
    #[arg(long)]
    pub frozen: bool,

    /// Use verbose output (-vv very verbose)
    #[arg(short = 'v', long, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Do not print cargo log messages
    #[arg(short = 'q', long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    #[command(flatten)]
    pub output: OutputArgs,

    /// Trace files, or directories whose `*.mstrace` files are read
    #[arg(required = true, value_name = "TRACE")]
    pub traces: Vec<PathBuf>,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Report options")]
pub struct OutputArgs {
    /// Where to write the reports [default: <target-dir>/memscope/report]
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,

    /// Coloring of memscope's and cargo's output (honors NO_COLOR)
    #[arg(long, value_enum, value_name = "WHEN", default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,

    /// Open report.html in a browser when it is written
    #[arg(long)]
    pub open: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

impl Cli {
    /// Whether memscope's own messages (errors included) get colour.
    pub fn color_enabled(&self) -> bool {
        match &self.command {
            Command::Run(args) => args.output.color.enabled(),
            Command::Test(args) | Command::Nextest(args) => args.output.color.enabled(),
            Command::Report(args) => args.output.color.enabled(),
        }
    }
}

impl ColorChoice {
    /// Whether output to stderr gets colour: `always`/`never` win; `auto` means a
    /// terminal and no (non-empty) `NO_COLOR`.
    pub fn enabled(self) -> bool {
        match self {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
                !no_color && std::io::stderr().is_terminal()
            }
        }
    }
}

impl CargoArgs {
    /// The profile cargo will build with: `dev`, `release` or the `--profile` name.
    pub fn profile_name(&self) -> &str {
        match (&self.profile, self.release) {
            (Some(profile), _) => profile,
            (None, true) => "release",
            (None, false) => "dev",
        }
    }

    /// Whether cargo must not touch the lock file.
    pub fn is_locked(&self) -> bool {
        self.locked || self.frozen
    }

    /// The flags that pass through unchanged to `cargo metadata` on the user's
    /// workspace (feature selection and lock/network policy).
    pub fn resolution_flags(&self) -> Vec<OsString> {
        self.resolution([self.locked, self.offline, self.frozen])
    }

    /// The resolution flags for cargo in the scratch copy, whose lock file must gain
    /// memscope's runtime: `--locked` is left out and `--frozen` becomes `--offline`
    /// (`lockfile.rs` checks the user's own lock file, and adds `--locked` back when it can).
    fn scratch_resolution_flags(&self) -> Vec<OsString> {
        self.resolution([false, self.offline || self.frozen, false])
    }

    fn resolution(&self, [locked, offline, frozen]: [bool; 3]) -> Vec<OsString> {
        let mut flags: Vec<OsString> = Vec::new();
        for features in &self.features {
            flags.push("--features".into());
            flags.push(features.into());
        }
        if self.all_features {
            flags.push("--all-features".into());
        }
        if self.no_default_features {
            flags.push("--no-default-features".into());
        }
        for (set, flag) in [
            (locked, "--locked"),
            (offline, "--offline"),
            (frozen, "--frozen"),
        ] {
            if set {
                flags.push(flag.into());
            }
        }
        for config in &self.config {
            flags.push("--config".into());
            flags.push(config.into());
        }
        flags
    }

    /// The flags that pass through to `cargo build` in the scratch copy; the selection
    /// (`--manifest-path`, `-p`, `--bin`, `--example`) is resolved by memscope.
    pub fn build_flags(&self) -> Vec<OsString> {
        self.spelled(["--profile", "--jobs", "--verbose", "--quiet"])
    }

    /// The build flags in `cargo nextest run`'s spelling, where `--profile`, `-j`, `-v`
    /// and `-q` mean nextest's own settings.
    pub fn nextest_flags(&self) -> Vec<OsString> {
        self.spelled([
            "--cargo-profile",
            "--build-jobs",
            "--cargo-verbose",
            "--cargo-quiet",
        ])
    }

    /// The build flags, `--profile`, `--jobs`, `--verbose` and `--quiet` spelled as
    /// given.
    fn spelled(
        &self,
        [profile_flag, jobs_flag, verbose_flag, quiet_flag]: [&str; 4],
    ) -> Vec<OsString> {
        let mut flags = self.scratch_resolution_flags();
        if self.release {
            flags.push("--release".into());
        }
        if let Some(profile) = &self.profile {
            flags.extend([profile_flag.into(), profile.into()]);
        }
        if let Some(target) = &self.target {
            flags.extend(["--target".into(), target.into()]);
        }
        if let Some(jobs) = &self.jobs {
            flags.extend([jobs_flag.into(), jobs.into()]);
        }
        for _ in 0..self.verbose {
            flags.push(verbose_flag.into());
        }
        if self.quiet {
            flags.push(quiet_flag.into());
        }
        flags
    }
}

/// Parses the command line, accepting both `cargo-memscope memscope …` (as cargo runs
/// it) and `cargo-memscope …`. Exits on `--help`, `--version` and usage errors
/// (status 2, clap's message).
pub fn parse() -> Cli {
    parse_from(std::env::args_os())
}

fn parse_from(args: impl IntoIterator<Item = OsString>) -> Cli {
    let mut args: Vec<OsString> = args.into_iter().collect();
    if args.get(1).is_some_and(|arg| arg == "memscope") {
        args.remove(1);
    }
    Cli::parse_from(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        parse_from(args.iter().map(OsString::from))
    }

    #[test]
    fn cargo_style_invocation_drops_the_subcommand_word() {
        let cli = parse(&["cargo-memscope", "memscope", "run", "--release"]);
        let Command::Run(run) = cli.command else {
            panic!("expected run")
        };
        assert!(run.cargo.release);
    }

    #[test]
    fn arguments_after_double_dash_go_to_the_program() {
        let cli = parse(&[
            "cargo-memscope",
            "run",
            "--bin",
            "x",
            "--",
            "--release",
            "a",
        ]);
        let Command::Run(run) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(run.cargo.bin.as_deref(), Some("x"));
        assert!(!run.cargo.release);
        assert_eq!(run.program_args, ["--release", "a"]);
    }

    #[test]
    fn cargo_flags_pass_through_to_the_build_and_locked_only_to_the_workspace_check() {
        let cli = parse(&[
            "cargo-memscope",
            "run",
            "-F",
            "a,b",
            "--no-default-features",
            "--profile",
            "bench",
            "--locked",
            "-vv",
        ]);
        let Command::Run(run) = cli.command else {
            panic!("expected run")
        };
        let flags: Vec<String> = run
            .cargo
            .build_flags()
            .into_iter()
            .map(|f| f.into_string().unwrap())
            .collect();
        assert_eq!(
            flags,
            [
                "--features",
                "a,b",
                "--no-default-features",
                "--profile",
                "bench",
                "--verbose",
                "--verbose"
            ]
        );
        assert_eq!(run.cargo.profile_name(), "bench");
        let resolution = run.cargo.resolution_flags();
        assert_eq!(
            resolution,
            ["--features", "a,b", "--no-default-features", "--locked"]
        );
    }

    #[test]
    fn nextest_gets_cargo_flags_in_its_own_spelling() {
        let cli = parse(&[
            "cargo-memscope",
            "nextest",
            "--profile",
            "ci",
            "-j",
            "2",
            "-v",
            "-q",
        ]);
        let Command::Nextest(test) = cli.command else {
            panic!("expected nextest")
        };
        let flags: Vec<String> = test
            .cargo
            .nextest_flags()
            .into_iter()
            .map(|f| f.into_string().unwrap())
            .collect();
        assert_eq!(
            flags,
            [
                "--cargo-profile",
                "ci",
                "--build-jobs",
                "2",
                "--cargo-verbose",
                "--cargo-quiet"
            ]
        );
    }

    #[test]
    fn the_readme_documents_every_flag_of_memscope_s_own() {
        use clap::CommandFactory;
        let readme = include_str!("../../README.md");
        let mut missing = Vec::new();
        for sub in Cli::command().get_subcommands() {
            for arg in sub.get_arguments().filter(|a| !a.is_hide_set()) {
                let heading = arg.get_help_heading().unwrap_or("");
                // cargo's own flags, passed through, are cargo's to document.
                if heading.starts_with("Cargo options") || heading.starts_with("Test selection") {
                    continue;
                }
                if let Some(long) = arg.get_long() {
                    if !readme.contains(&format!("--{long}")) {
                        missing.push(format!("{} --{long}", sub.get_name()));
                    }
                }
            }
        }
        assert!(missing.is_empty(), "not in README.md: {missing:?}");
    }

    #[test]
    fn command_line_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
