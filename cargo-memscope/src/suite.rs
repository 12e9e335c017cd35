//! `cargo memscope test` end to end: install the tracking allocator in every test
//! crate of the scratch copy, build the tests (`cargo test --no-run`), run them with
//! `cargo test` (or `cargo nextest run`, one process per test) through
//! [`crate::runner`] (one trace directory per process), then one report with a section
//! per binary and per test, the gates, and CI output.
//!
//! Doc tests are not tracked: rustdoc compiles them without memscope's allocator, so
//! they are not run (`--doc` is refused with that reason).

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::cargo::{self, Ran, TestExecutable, Workspace};
use crate::cli::TestArgs;
use crate::libtest;
use crate::lockfile::LockCheck;
use crate::pertest::{self, BinaryInfo, ProcessInfo};
use crate::report::{self, Report, ReportOptions};
use crate::rewrite::{self, CrateRoot};
use crate::run::{self, Layout};
use crate::runner::{self, BinaryRun};
use crate::summary::{bytes_short as bytes, plural};
use crate::{gate, scratch};

/// `cargo memscope test`: returns the exit code to end with.
pub fn test(args: &TestArgs) -> anyhow::Result<u8> {
    if args.selection.doc {
        bail!(
            "doc tests are not tracked: rustdoc builds them without memscope's allocator; run them with `cargo test --doc`"
        );
    }
    if args.nextest {
        cargo::require_nextest()?;
    }
    cargo::on_workspace(&args.cargo, |ws, check| suite(args, ws, check))
}

/// The suite run on `ws`. With a `check`, `ws` is the remembered workspace: the build
/// starts while `cargo metadata` runs, and no test runs unless it finds the workspace
/// unchanged (see `cargo::WorkspaceRead`). The check is taken when the build starts.
fn suite(
    args: &TestArgs,
    ws: Workspace,
    check: &mut Option<cargo::WorkspaceRead>,
) -> anyhow::Result<Ran<u8>> {
    let gates = gate::Gates::load(&args.gate)?;
    let layout = Layout::new(&ws);
    let runtime = layout.runtime_to_link(&ws)?;
    let synced = scratch::sync(
        &ws.root,
        &layout.scratch,
        std::slice::from_ref(&ws.target_dir),
    )
    .context("failed to update the scratch copy of the workspace")?;
    let crates = crate_roots(&ws);
    let rewrite = rewrite::apply_crates(
        &ws,
        &crates,
        &args.instrument,
        &layout.scratch,
        &synced,
        &runtime,
    )?;
    if args.cargo.verbose > 0 {
        rewrite.describe();
    }
    let lock = LockCheck::run(&ws, &args.cargo, &layout.scratch, &runtime)?;
    let options = ReportOptions {
        tests: true,
        ..layout.report_options(&ws, &args.output)
    };
    let flags = test_flags(args);
    let build = cargo::TestBuild {
        ws: &ws,
        args: &args.cargo,
        test_flags: &flags,
        lock: &lock,
        scratch: &layout.scratch,
        build_dir: &layout.build(),
        color: options.color,
        progress: options.progress && !args.cargo.quiet,
    };
    let trace_dir = layout.new_trace_dir()?;
    let mut command = if args.nextest {
        build.nextest_command()?
    } else {
        build.command()?
    };
    let me = std::env::current_exe().context("failed to locate cargo-memscope itself")?;
    let runner = format!(
        "target.'cfg(all())'.runner=[{}, \"__runner\"]",
        serde_json::to_string(&me.to_string_lossy()).expect("strings serialize")
    );
    command
        .args(["--config", &runner])
        .env(runner::DIR_ENV, &trace_dir);
    if args.no_stacks {
        command.env("MEMSCOPE_STACKS", "0");
    }
    let color = options.color;
    let check = check.take().map(|read| {
        let gate = runner::Gate::close(&trace_dir, &mut command);
        let path = gate.path().to_path_buf();
        let waiting = std::thread::spawn(move || {
            let read = read.wait();
            if let Err(err) = gate.open(read.as_ref().is_ok_and(|(_, same)| *same)) {
                // The runners wait at the gate as long as this process lives, and cargo
                // waits for them: ending it is what lets them go.
                crate::print_error(&err, color);
                std::process::exit(crate::EXIT_MEMSCOPE_ERROR.into());
            }
            read
        });
        (waiting, path)
    });
    // Each binary's trace is analysed while the binary runs, or else as soon as it has
    // ended, while the next ones run.
    let watched = runner::Watched {
        root: trace_dir.clone(),
        finished: runner::Finished::default(),
    };
    let ahead = report::Ahead::start(&options, watched);
    let ran = if args.nextest {
        // nextest builds first (`--no-run`), then takes the name filter itself and
        // emulates harness arguments.
        build.build().and_then(|executables| {
            command
                .args(&args.filter)
                .arg("--")
                .args(&args.harness_args);
            let status = command
                .status()
                .context("failed to run `cargo nextest run`")?;
            Ok((executables, status))
        })
    } else {
        let harness: Vec<OsString> = (args.filter.iter().map(OsString::from))
            .chain(args.harness_args.iter().cloned())
            .collect();
        build.build_and_run(command, &harness)
    };
    if let Some((waiting, gate)) = check {
        let read = waiting
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        let _ = std::fs::remove_file(gate);
        match read {
            Ok((_, true)) => {}
            changed => {
                ahead.abandon();
                let _ = std::fs::remove_dir_all(&trace_dir);
                return Ok(Ran::Changed(changed?.0));
            }
        }
    }
    lock.built(ran.is_ok());
    let ahead = ahead.finish();
    let (executables, status) = ran.inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&trace_dir);
    })?;
    let code = run::exit_code(status);

    let outcome = report_tests(&trace_dir, &layout, &executables, &options, args, ahead);
    match outcome {
        Ok(report) => {
            let verdict = gates.verdict(code, &report, &ws.root, options.color);
            report.leave();
            verdict.map(Ran::Done)
        }
        Err(err) if code != 0 => {
            crate::print_error(&err, options.color);
            Ok(Ran::Done(code))
        }
        Err(err) => Err(err),
    }
}

/// Every crate `cargo test` may build for a test, in every member: libraries and
/// binaries get the allocator under `#[cfg(test)]` (other crates link or run them
/// untested), integration tests, benches and examples always.
fn crate_roots(ws: &Workspace) -> Vec<CrateRoot> {
    let mut crates = Vec::new();
    for member in &ws.members {
        let krate = |root: &PathBuf, cfg_test: bool| CrateRoot {
            manifest: member.manifest.clone(),
            root: root.clone(),
            with_dev: true,
            cfg_test,
        };
        crates.extend(member.lib_root.iter().map(|root| krate(root, true)));
        crates.extend(member.bins.iter().map(|(_, root)| krate(root, true)));
        for (_, root) in member
            .tests
            .iter()
            .chain(&member.benches)
            .chain(&member.examples)
        {
            if !crates.iter().any(|c: &CrateRoot| &c.root == root) {
                crates.push(krate(root, false));
            }
        }
    }
    crates
}

/// `cargo test`'s own flags: selection passes through; without any target selection,
/// `--tests` (what `cargo test` runs, doc tests excepted).
fn test_flags(args: &TestArgs) -> Vec<OsString> {
    let s = &args.selection;
    let mut flags: Vec<OsString> = Vec::new();
    let mut push = |flag: &str, value: Option<&str>| {
        flags.push(flag.into());
        if let Some(value) = value {
            flags.push(value.into());
        }
    };
    if let Some(package) = &args.cargo.package {
        push("--package", Some(package));
    }
    if s.workspace {
        push("--workspace", None);
    }
    for spec in &s.exclude {
        push("--exclude", Some(spec));
    }
    let mut selected = false;
    for (on, flag) in [
        (s.lib, "--lib"),
        (s.bins, "--bins"),
        (s.tests, "--tests"),
        (s.benches, "--benches"),
        (s.examples, "--examples"),
        (s.all_targets, "--all-targets"),
    ] {
        if on {
            push(flag, None);
            selected = true;
        }
    }
    for (names, flag) in [(&s.test, "--test"), (&s.bench, "--bench")] {
        for name in names {
            push(flag, Some(name));
            selected = true;
        }
    }
    if let Some(bin) = &args.cargo.bin {
        push("--bin", Some(bin));
        selected = true;
    }
    if let Some(example) = &args.cargo.example {
        push("--example", Some(example));
        selected = true;
    }
    if !selected {
        push("--tests", None);
    }
    if s.no_fail_fast {
        push("--no-fail-fast", None);
    }
    flags
}

fn report_tests(
    trace_dir: &Path,
    layout: &Layout,
    executables: &[TestExecutable],
    options: &report::ReportOptions,
    args: &TestArgs,
    mut ahead: report::AnalysedAhead,
) -> anyhow::Result<Report> {
    let runs = runner::collect(trace_dir)?;
    let mut traces = Vec::new();
    for (dir, run) in &runs {
        if !run.as_ref().is_some_and(|r| r.listing) {
            traces.extend(run::trace_files(dir)?);
        }
    }
    if traces.is_empty() {
        bail!(
            "no test binary wrote a trace to {} (did any test binary run?)",
            trace_dir.display()
        );
    }
    let runs: Vec<&BinaryRun> = runs.iter().filter_map(|(_, run)| run.as_ref()).collect();
    let filtered = args.filter.is_some() || !args.harness_args.is_empty();
    let infos = binaries(&runs, layout, executables, args.nextest, filtered);
    let mut report =
        report::build_with(&traces, options, &mut ahead).context("failed to build the report")?;
    let (binaries, tests) = pertest::attribute(&report, &infos);
    report.test_binaries = binaries;
    report.tests = tests;
    let html = report::write(&report, options).context("failed to write the report")?;
    eprint!("{}", render(&report, options.color));
    if args.output.open {
        crate::html::open(&html);
    }
    Ok(report)
}

/// The test binaries that ran, each with its processes (one, or one per test under
/// nextest) and the tests each reported, in the order they started.
fn binaries(
    runs: &[&BinaryRun],
    layout: &Layout,
    executables: &[TestExecutable],
    nextest: bool,
    filtered: bool,
) -> Vec<BinaryInfo> {
    let mut infos: Vec<BinaryInfo> = Vec::new();
    for run in runs.iter().filter(|r| !r.listing) {
        let listing = listing_of(runs, &run.executable);
        let mut outcomes = libtest::parse_harness(&run.stdout);
        let terse = outcomes.is_empty() && libtest::is_terse(&run.stdout);
        if terse {
            outcomes = libtest::parse_terse(&run.stdout, &listing);
        }
        if nextest && outcomes.is_empty() {
            // The harness died before reporting its one test (`--exact NAME`).
            if let Some(name) = exact_name(&run.args) {
                outcomes.push(libtest::Outcome {
                    name,
                    outcome: if run.exit_code == Some(0) {
                        "passed"
                    } else {
                        "failed"
                    }
                    .into(),
                });
            }
        }
        let process = ProcessInfo {
            pid: run.pid,
            exit_code: run.exit_code,
            outcomes,
            alone: nextest,
            completion_order: !terse,
        };
        let executable = run.executable.display().to_string();
        if let Some(info) = infos.iter_mut().find(|i| i.executable == executable) {
            info.processes.push(process);
            continue;
        }
        let built = executables.iter().find(|e| e.executable == run.executable);
        let binary = built
            .map(|e| {
                e.src_path
                    .strip_prefix(&layout.scratch)
                    .unwrap_or(&e.src_path)
                    .display()
                    .to_string()
            })
            .unwrap_or_else(|| executable.clone());
        infos.push(BinaryInfo {
            binary,
            package: built.map(|e| e.package.clone()).unwrap_or_default(),
            kind: built.map(|e| e.kind.clone()).unwrap_or_default(),
            target: built.map(|e| e.target.clone()).unwrap_or_default(),
            executable,
            processes: vec![process],
            // nextest skips ignored tests after listing them; with a filter, some of
            // them were not selected at all, so none is claimed.
            ignored: if nextest && !filtered {
                listing.ignored
            } else {
                Vec::new()
            },
        });
    }
    infos
}

/// What the `--list` runs of an executable said.
fn listing_of(runs: &[&BinaryRun], executable: &Path) -> libtest::Listing {
    let mut listing = libtest::Listing::default();
    for run in runs
        .iter()
        .filter(|r| r.listing && r.executable == executable)
    {
        let names = libtest::parse_list(&run.stdout);
        if run.args.iter().any(|a| a == "--ignored") {
            listing.ignored = names;
        } else {
            listing.tests = names;
        }
    }
    listing
}

/// The test name of `--exact NAME` (how nextest runs one test).
fn exact_name(args: &[String]) -> Option<String> {
    if !args.iter().any(|a| a == "--exact") {
        return None;
    }
    let mut names = args.iter().filter(|a| !a.starts_with('-'));
    let name = names.next()?;
    names.next().is_none().then(|| name.clone())
}

/// The per-test part of the terminal summary: every test that leaked, the largest
/// peaks, and what could not be attributed.
pub fn render(report: &Report, color: bool) -> String {
    let bold = |s: &str| {
        if color {
            format!("\x1b[1m{s}\x1b[0m")
        } else {
            s.to_owned()
        }
    };
    let mut out = String::new();
    let (passed, failed, ignored) = report.test_binaries.iter().fold((0, 0, 0), |acc, b| {
        (acc.0 + b.passed, acc.1 + b.failed, acc.2 + b.ignored)
    });
    let _ = writeln!(
        out,
        "\n{} {} in {}: {passed} passed, {failed} failed, {ignored} ignored (doc tests are not tracked)",
        bold("Tests:"),
        plural(report.tests.len() as u64, "test"),
        match report.test_binaries.len() {
            1 => "1 binary".to_owned(),
            n => format!("{n} binaries"),
        },
    );
    let mut leaky: Vec<_> = report
        .tests
        .iter()
        .filter(|t| t.leaked_blocks.unwrap_or(0) > 0)
        .collect();
    leaky.sort_by_key(|t| std::cmp::Reverse(t.leaked_bytes));
    if leaky.is_empty() {
        let _ = writeln!(out, "  no test leaked");
    } else {
        let _ = writeln!(out, "  {}", bold("Leaking tests:"));
        for t in leaky {
            let _ = writeln!(
                out,
                "    {} ({}): {} ({}){}",
                t.name,
                t.binary,
                plural(t.leaked_blocks.unwrap_or(0), "block"),
                bytes(t.leaked_bytes.unwrap_or(0)),
                if t.basis == report::Basis::Inferred {
                    " [inferred]"
                } else {
                    ""
                }
            );
            for leak in t.leaks.iter().take(3) {
                let at = leak
                    .location
                    .as_ref()
                    .map(report::location_text)
                    .unwrap_or_else(|| format!("site #{}", leak.site));
                let _ = writeln!(
                    out,
                    "      {} ({}) at {at}",
                    plural(leak.blocks, "block"),
                    bytes(leak.bytes)
                );
            }
        }
    }
    let mut peaks: Vec<_> = report
        .tests
        .iter()
        .filter(|t| t.peak_bytes.is_some())
        .collect();
    peaks.sort_by_key(|t| std::cmp::Reverse(t.peak_bytes));
    if !peaks.is_empty() {
        let _ = writeln!(out, "  {}", bold("Largest peaks:"));
        for t in peaks.iter().take(5) {
            let _ = writeln!(
                out,
                "    {:>10}  {} ({})",
                bytes(t.peak_bytes.unwrap_or(0)),
                t.name,
                t.binary
            );
        }
    }
    for b in &report.test_binaries {
        if b.unattributed.leaked_blocks > 0 {
            let _ = writeln!(
                out,
                "  {}: {} ({}) leaked on threads no test could be attributed to",
                b.binary,
                plural(b.unattributed.leaked_blocks, "block"),
                bytes(b.unattributed.leaked_bytes)
            );
        }
        for note in &b.notes {
            let _ = writeln!(out, "  {}: {note}", b.binary);
        }
    }
    out
}
