//! The two subcommands end to end: `run` (sync, rewrite, build, run the program with
//! a fresh trace directory, report) and `report` (report existing traces).
//!
//! Everything memscope writes lives under `<target-dir>/memscope/` ([`Layout`]).

use std::ffi::OsString;
use std::fs;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};

use crate::cargo::{self, Ran, Workspace};
use crate::cli::{OutputArgs, ReportArgs, RunArgs};
use crate::lockfile::LockCheck;
use crate::report::{self, ReportOptions};
use crate::{embedded, gate, rewrite, scratch};

/// How the embedded runtime's source files are named in reports.
const RUNTIME_DISPLAY_PATH: &str = "<memscope-runtime>";

/// How many earlier runs' trace directories are kept.
const KEPT_TRACE_DIRS: usize = 10;

/// Where memscope keeps its files for one workspace.
pub(crate) struct Layout {
    /// `<target-dir>/memscope`
    pub(crate) root: PathBuf,
    /// The scratch copy: one per workspace, so a target directory shared by several
    /// workspaces (`CARGO_TARGET_DIR`) keeps each one's copy incremental.
    pub(crate) scratch: PathBuf,
}

impl Layout {
    pub(crate) fn new(ws: &Workspace) -> Layout {
        let root = ws.target_dir.join("memscope");
        let name = ws.root.file_name().unwrap_or_default().to_string_lossy();
        let scratch = root.join("scratch").join(format!(
            "{name}-{:016x}",
            fnv1a(ws.root.as_os_str().as_encoded_bytes())
        ));
        Layout { root, scratch }
    }

    pub(crate) fn runtime(&self) -> PathBuf {
        self.root.join("runtime").join("memscope-runtime")
    }

    /// The runtime the scratch copy links: the workspace's own `memscope-runtime` when
    /// it has one (memscope's own workspace, where a second copy's macros crate would
    /// collide with the member in the lock file), otherwise memscope's embedded
    /// sources, written out here.
    pub(crate) fn runtime_to_link(&self, ws: &Workspace) -> anyhow::Result<PathBuf> {
        let member = ws
            .runtime_member()
            .and_then(|m| m.dir().strip_prefix(&ws.root).ok());
        match member {
            Some(relative) => Ok(self.scratch.join(relative)),
            None => embedded::write_runtime(&self.runtime())
                .context("failed to write memscope's runtime"),
        }
    }

    pub(crate) fn build(&self) -> PathBuf {
        self.root.join("build")
    }

    fn default_report(&self) -> PathBuf {
        self.root.join("report")
    }

    /// Where each run's traces go, a directory per run.
    fn traces(&self) -> PathBuf {
        self.root.join("traces")
    }

    /// A fresh directory for this run's traces; the oldest runs' are removed meanwhile
    /// (see [`prune_traces`](Self::prune_traces)).
    pub(crate) fn new_trace_dir(&self) -> anyhow::Result<PathBuf> {
        let traces = self.traces();
        // Detached: whatever it has not removed when memscope ends, the next run will.
        drop(self.prune_traces());
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let dir = traces.join(format!("{millis:015}-{}", std::process::id()));
        fs::create_dir_all(&dir)
            .with_context(|| format!("failed to create trace directory {}", dir.display()))?;
        Ok(dir)
    }

    /// Removes the gates of runs that are gone, and starts removing the oldest runs'
    /// trace directories but the newest `KEPT_TRACE_DIRS - 1` on a thread of low
    /// priority: deleting a large trace that is still in the page cache takes tens of
    /// milliseconds (regex-syntax's 70 MB one, about 60), which the new run does not
    /// wait for.
    fn prune_traces(&self) -> Option<std::thread::JoinHandle<()>> {
        let entries = fs::read_dir(self.traces()).ok()?;
        let (mut old, gates): (Vec<PathBuf>, Vec<PathBuf>) = entries
            .filter_map(|e| Some(e.ok()?.path()))
            .partition(|p| p.is_dir());
        // A run's gate (see `runner::Gate`) outlives it only if the run was killed:
        // removed once the process named in it is gone.
        for gate in gates {
            let pid = (gate.file_stem().and_then(|n| n.to_str()))
                .and_then(|n| n.rsplit_once('-')?.1.parse::<libc::pid_t>().ok());
            if pid.is_some_and(crate::runner::process_gone) {
                let _ = fs::remove_file(gate);
            }
        }
        old.sort();
        let excess = (old.len() + 1).saturating_sub(KEPT_TRACE_DIRS);
        old.truncate(excess);
        if old.is_empty() {
            return None;
        }
        std::thread::Builder::new()
            .name("memscope-prune".into())
            .spawn(move || {
                crate::report::lower_priority();
                for dir in old {
                    let _ = fs::remove_dir_all(dir);
                }
            })
            .ok()
    }

    pub(crate) fn report_options(&self, ws: &Workspace, output: &OutputArgs) -> ReportOptions {
        ReportOptions {
            output_dir: output
                .output_dir
                .clone()
                .unwrap_or_else(|| self.default_report()),
            // The runtime lives under the target directory, usually inside the
            // workspace: name it apart so its frames are never taken for user code.
            path_map: vec![
                (self.runtime(), PathBuf::from(RUNTIME_DISPLAY_PATH)),
                (self.scratch.clone(), ws.root.clone()),
            ],
            user_roots: vec![ws.root.clone()],
            color: output.color.enabled(),
            progress: std::io::stderr().is_terminal(),
            tests: false,
            symbol_cache: Some(self.root.join("symbols")),
        }
    }
}

/// FNV-1a, 64-bit: a hash that stays the same across Rust versions.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `cargo memscope run`: returns the exit code to end with.
pub fn run(args: &RunArgs) -> anyhow::Result<u8> {
    cargo::on_workspace(&args.cargo, |ws, check| run_on(args, ws, check))
}

/// `cargo memscope run` on `ws`; with a `check`, `ws` is the remembered workspace, and
/// the program runs only once `cargo metadata` found it unchanged (see
/// `cargo::WorkspaceRead`).
fn run_on(
    args: &RunArgs,
    ws: Workspace,
    check: &mut Option<cargo::WorkspaceRead>,
) -> anyhow::Result<Ran<u8>> {
    let program = ws.select_program(&args.cargo)?;
    let gates = gate::Gates::load(&args.gate)?;
    let layout = Layout::new(&ws);
    let runtime = layout.runtime_to_link(&ws)?;
    let synced = scratch::sync(
        &ws.root,
        &layout.scratch,
        std::slice::from_ref(&ws.target_dir),
    )
    .context("failed to update the scratch copy of the workspace")?;
    // Its errors say what failed (an `--instrument` pattern's are the user's to fix).
    let rewrite = rewrite::apply(
        &ws,
        &program,
        &args.instrument,
        &layout.scratch,
        &synced,
        &runtime,
    )?;
    if args.cargo.verbose > 0 {
        rewrite.describe();
    }
    let lock = LockCheck::run(&ws, &args.cargo, &layout.scratch, &runtime)?;
    let options = layout.report_options(&ws, &args.output);
    let executable = cargo::Build {
        ws: &ws,
        program: &program,
        args: &args.cargo,
        lock: &lock,
        scratch: &layout.scratch,
        build_dir: &layout.build(),
        color: options.color,
        progress: options.progress && !args.cargo.quiet,
    }
    .run();
    if executable.is_err() {
        lock.built(false);
    }
    let executable = executable?;
    if let Some(read) = check.take() {
        let (now, same) = read.wait()?;
        if !same {
            return Ok(Ran::Changed(now));
        }
    }
    lock.built(true);

    let trace_dir = layout.new_trace_dir()?;
    // The program's trace is analysed while it runs.
    let ahead = report::Ahead::start(
        &options,
        Program {
            trace_dir: trace_dir.clone(),
        },
    );
    let status = match run_program(&executable, &args.program_args, &trace_dir, args.no_stacks) {
        Ok(status) => status,
        Err(err) => {
            ahead.abandon();
            return Err(err);
        }
    };
    let code = exit_code(status);
    // The program's own failure is what the caller needs to see first: when it failed,
    // its exit code is kept even if reporting fails too.
    match report_run(&trace_dir, &options, args.output.open, ahead.finish()) {
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

/// The program `cargo memscope run` runs, as [`report::Ahead`] sees it: its traces
/// are followed while it runs; what was not, is analysed once it has ended.
struct Program {
    trace_dir: PathBuf,
}

impl report::Runs for Program {
    fn ended(&mut self) -> Vec<PathBuf> {
        Vec::new()
    }

    fn running(&mut self) -> Vec<(PathBuf, Option<PathBuf>)> {
        let traces = trace_files(&self.trace_dir).unwrap_or_default();
        traces.into_iter().map(|trace| (trace, None)).collect()
    }
}

fn report_run(
    trace_dir: &Path,
    options: &ReportOptions,
    open: bool,
    mut ahead: report::AnalysedAhead,
) -> anyhow::Result<report::Report> {
    let traces = trace_files(trace_dir)?;
    if traces.is_empty() {
        bail!(
            "the program wrote no trace to {} (was it built with the tracking allocator, or did it exec another program?)",
            trace_dir.display()
        );
    }
    generate(&traces, options, open, &mut ahead)
}

/// Builds and writes the reports (`report::write` prints the summary and where they
/// are); with `open`, opens the HTML report in a browser. `ahead` hands over the
/// traces analysed while the program ran.
pub(crate) fn generate(
    traces: &[PathBuf],
    options: &ReportOptions,
    open: bool,
    ahead: &mut report::AnalysedAhead,
) -> anyhow::Result<report::Report> {
    let report =
        report::build_with(traces, options, ahead).context("failed to build the report")?;
    let html = report::write(&report, options).context("failed to write the report")?;
    if open {
        crate::html::open(&html);
    }
    Ok(report)
}

/// `cargo memscope report`.
pub fn report(args: &ReportArgs) -> anyhow::Result<()> {
    let mut traces = Vec::new();
    for path in &args.traces {
        if path.is_dir() {
            let found = trace_files(path)?;
            if found.is_empty() {
                match latest_run(path) {
                    Some(latest) => bail!(
                        "no trace files (*.mstrace) in {}; its subdirectories hold one run each: pass one of them (latest: {})",
                        path.display(),
                        latest.display()
                    ),
                    None => bail!("no trace files (*.mstrace) in {}", path.display()),
                }
            }
            traces.extend(found);
        } else if path.is_file() {
            traces.push(path.clone());
        } else {
            bail!("trace {} does not exist", path.display());
        }
    }
    // Inside a cargo project, reports go where `run` puts them and source paths of
    // its scratch copy map back to the workspace.
    // The traces may be of test executables: per-test figures are worked out too.
    let options = match cargo::load_workspace(&Default::default()) {
        Ok(ws) => ReportOptions {
            tests: true,
            ..Layout::new(&ws).report_options(&ws, &args.output)
        },
        Err(_) => ReportOptions {
            output_dir: args
                .output
                .output_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from("memscope-report")),
            path_map: Vec::new(),
            user_roots: Vec::new(),
            color: args.output.color.enabled(),
            progress: std::io::stderr().is_terminal(),
            tests: true,
            symbol_cache: None,
        },
    };
    let mut ahead = report::AnalysedAhead::default();
    generate(&traces, &options, args.output.open, &mut ahead).map(report::Report::leave)
}

/// The `*.mstrace` files directly in `dir`, sorted.
pub(crate) fn trace_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let entries = fs::read_dir(dir)
        .with_context(|| format!("failed to read trace directory {}", dir.display()))?;
    let mut traces: Vec<PathBuf> = entries
        .filter_map(|entry| Some(entry.ok()?.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "mstrace") && path.is_file())
        .collect();
    traces.sort();
    Ok(traces)
}

/// The newest subdirectory of `dir` that holds traces (run directories are named by
/// their start time).
fn latest_run(dir: &Path) -> Option<PathBuf> {
    let mut runs: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .filter_map(|entry| Some(entry.ok()?.path()))
        .filter(|path| trace_files(path).is_ok_and(|traces| !traces.is_empty()))
        .collect();
    runs.sort();
    runs.pop()
}

/// Runs the program in the current directory with inherited stdio, tracing into
/// `trace_dir`.
fn run_program(
    executable: &Path,
    args: &[OsString],
    trace_dir: &Path,
    no_stacks: bool,
) -> anyhow::Result<ExitStatus> {
    let mut command = Command::new(executable);
    command.args(args).env("MEMSCOPE_OUT", trace_dir);
    if no_stacks {
        command.env("MEMSCOPE_STACKS", "0");
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("failed to start {}", executable.display()))?;
    let _signals = signals::Relay::install(child.id());
    child
        .wait()
        .with_context(|| format!("failed to wait for {}", executable.display()))
}

/// The program's exit code; 128+N when signal N killed it, as a shell reports it.
pub(crate) fn exit_code(status: ExitStatus) -> u8 {
    if let Some(code) = status.code() {
        return code as u8;
    }
    #[cfg(unix)]
    if let Some(signal) = std::os::unix::process::ExitStatusExt::signal(&status) {
        return 128u8.wrapping_add(signal as u8);
    }
    crate::EXIT_MEMSCOPE_ERROR
}

#[cfg(unix)]
pub(crate) mod signals {
    //! While the program runs, memscope must outlive it to write the report. Ctrl-C
    //! and Ctrl-\ reach the whole foreground process group, so the program gets them
    //! itself and memscope only ignores them; SIGTERM and SIGHUP are sent to memscope
    //! alone, so they are forwarded. The handlers (not `SIG_IGN`, which the program
    //! would inherit) are reset to the defaults when the program ends.

    use std::sync::atomic::{AtomicI32, Ordering};

    const IGNORED: [libc::c_int; 2] = [libc::SIGINT, libc::SIGQUIT];
    const FORWARDED: [libc::c_int; 2] = [libc::SIGTERM, libc::SIGHUP];

    /// The program's process id, for the forwarding handler; 0 when none runs.
    static CHILD: AtomicI32 = AtomicI32::new(0);

    pub struct Relay;

    impl Relay {
        pub fn install(child: u32) -> Relay {
            // Relaxed suffices: the store happens before `sigaction` installs the
            // handler that loads it, and `sigaction` is a system call (a barrier).
            CHILD.store(child as i32, Ordering::Relaxed);
            for signal in IGNORED {
                set_handler(
                    signal,
                    ignore as extern "C" fn(libc::c_int) as libc::sighandler_t,
                );
            }
            for signal in FORWARDED {
                set_handler(
                    signal,
                    forward as extern "C" fn(libc::c_int) as libc::sighandler_t,
                );
            }
            Relay
        }
    }

    impl Drop for Relay {
        fn drop(&mut self) {
            for signal in IGNORED.into_iter().chain(FORWARDED) {
                set_handler(signal, libc::SIG_DFL);
            }
            CHILD.store(0, Ordering::Relaxed);
        }
    }

    extern "C" fn ignore(_: libc::c_int) {}

    extern "C" fn forward(signal: libc::c_int) {
        let child = CHILD.load(Ordering::Relaxed);
        if child > 0 {
            // SAFETY: kill(2) is async-signal-safe; `child` is our own child's pid,
            // which stays reserved until we reap it after this handler is removed.
            unsafe { libc::kill(child, signal) };
        }
    }

    fn set_handler(signal: libc::c_int, handler: libc::sighandler_t) {
        // SAFETY: a zeroed `sigaction` is a valid value (empty mask, no flags); the
        // handler is either SIG_DFL or an `extern "C" fn(c_int)` that only does
        // async-signal-safe work.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

#[cfg(not(unix))]
pub(crate) mod signals {
    pub struct Relay;

    impl Relay {
        pub fn install(_child: u32) -> Relay {
            Relay
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_dirs_of_different_workspaces_differ_and_are_stable() {
        assert_eq!(fnv1a(b"/a/ws"), fnv1a(b"/a/ws"));
        assert_ne!(fnv1a(b"/a/ws"), fnv1a(b"/b/ws"));
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
    }

    #[test]
    fn a_gate_left_by_a_run_that_is_gone_is_removed_and_a_live_runs_gate_kept() {
        let root = tempfile::tempdir().unwrap();
        let traces = root.path().join("traces");
        fs::create_dir_all(&traces).unwrap();
        let mut ended = Command::new("true").spawn().unwrap();
        ended.wait().unwrap();
        let dead = traces.join(format!("000000000000001-{}.gate", ended.id()));
        let live = traces.join(format!("000000000000002-{}.gate", std::process::id()));
        fs::write(&dead, "go").unwrap();
        fs::write(&live, "go").unwrap();
        let layout = Layout {
            root: root.path().to_path_buf(),
            scratch: root.path().join("scratch"),
        };

        let dir = layout.new_trace_dir().unwrap();

        assert!(dir.is_dir());
        assert!(!dead.exists(), "the gate of a process that is gone");
        assert!(live.exists(), "the gate of a run still going");
    }

    #[test]
    fn a_new_run_keeps_the_nine_latest_runs_traces_and_removes_the_older_ones() {
        let root = tempfile::tempdir().unwrap();
        let traces = root.path().join("traces");
        let runs: Vec<PathBuf> = (1..=12)
            .map(|i| traces.join(format!("{i:015}-1")))
            .collect();
        for run in &runs {
            fs::create_dir_all(run).unwrap();
            fs::write(run.join("memscope-1-1.mstrace"), "trace").unwrap();
        }
        let layout = Layout {
            root: root.path().to_path_buf(),
            scratch: root.path().join("scratch"),
        };

        layout.prune_traces().unwrap().join().unwrap();

        let kept: Vec<bool> = runs.iter().map(|run| run.exists()).collect();
        assert_eq!(kept, [&[false; 3][..], &[true; 9]].concat());
        assert!(layout.prune_traces().is_none(), "nothing left to remove");
    }

    #[cfg(unix)]
    #[test]
    fn killed_program_exits_with_128_plus_the_signal() {
        let status = Command::new("sh")
            .args(["-c", "kill -9 $$"])
            .status()
            .unwrap();
        assert_eq!(exit_code(status), 137);
        let status = Command::new("sh").args(["-c", "exit 3"]).status().unwrap();
        assert_eq!(exit_code(status), 3);
    }
}
