//! The runner cargo (or nextest) calls for each test executable under
//! `cargo memscope test` (`target.'cfg(all())'.runner`): it gives the executable a
//! trace directory of its own, passes its stdout through while keeping a copy (the
//! harness's result lines say which tests ran and how they ended), and records how it
//! ended in `run.json`. `--list` runs (nextest lists each binary's tests first) are
//! recorded too, their traces dropped. After libtest's terse output (`-q`), which names
//! only failures, it lists the selected tests itself. Everything else (environment,
//! working directory, order, fail-fast, nextest's process per test) is the caller's.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// Names the directory that collects one `cargo memscope test` run's binaries.
pub const DIR_ENV: &str = "MEMSCOPE_TEST_RUN";

/// What one test executable did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BinaryRun {
    pub executable: PathBuf,
    pub args: Vec<String>,
    pub pid: u32,
    /// `None` when a signal ended it.
    pub exit_code: Option<i32>,
    pub stdout: String,
    /// A `--list` run (nextest's, or memscope's own after terse output): it ran no
    /// test, and its trace was dropped.
    #[serde(default)]
    pub listing: bool,
}

/// Names the gate a runner waits at before it runs anything, as `<pid>:<path>`: the
/// file `path`, which the process `pid` writes (see [`Gate`]).
pub const GATE_ENV: &str = "MEMSCOPE_GATE";

/// `cargo-memscope __runner <executable> [args…]`.
pub fn run(command: &[OsString]) -> anyhow::Result<u8> {
    let Some(root) = std::env::var_os(DIR_ENV) else {
        bail!("`__runner` runs test executables for `cargo memscope test` only");
    };
    let Some((executable, args)) = command.split_first() else {
        bail!("`__runner` needs an executable to run");
    };
    if !Gate::pass()? {
        // The run starts over: this one records nothing.
        return Ok(0);
    }
    let root = Path::new(&root);
    let args: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let (run, status) = run_child(root, Path::new(executable), &args, true)?;
    if !run.listing && crate::libtest::is_terse(&run.stdout) {
        list_tests(root, &run)?;
    }
    Ok(crate::run::exit_code(status))
}

/// Holds the runners back until `cargo memscope test` knows that the scratch copy it
/// started building was prepared from the workspace as it is now (see
/// `cargo::WorkspaceRead`): a file that says `go`, or `stop` (run nothing; the run
/// starts over). A runner that finds no file waits for it, as long as the process that
/// will write it is alive.
pub struct Gate {
    path: PathBuf,
    opened: bool,
}

impl Gate {
    /// A closed gate beside the trace directory `dir`, named to the runners that
    /// `command` starts.
    pub fn close(dir: &Path, command: &mut Command) -> Gate {
        let path = dir.with_extension("gate");
        let _ = fs::remove_file(&path);
        let mut named = OsString::from(format!("{}:", std::process::id()));
        named.push(&path);
        command.env(GATE_ENV, named);
        Gate {
            path,
            opened: false,
        }
    }

    /// Lets the runners run their executables (`run`), or has them end at once.
    pub fn open(mut self, run: bool) -> anyhow::Result<()> {
        self.write(run)
    }

    fn write(&mut self, run: bool) -> anyhow::Result<()> {
        self.opened = true;
        // Written whole, then renamed: a runner never reads half of it.
        let part = self.path.with_extension("gate-part");
        fs::write(&part, if run { "go" } else { "stop" })
            .and_then(|()| fs::rename(&part, &self.path))
            .with_context(|| format!("failed to write {}", self.path.display()))
    }

    /// Where the gate is: to remove once the runners are done.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// In a runner: waits at the gate named in the environment, if any; whether to
    /// run the executable.
    fn pass() -> anyhow::Result<bool> {
        let Some(named) = std::env::var_os(GATE_ENV) else {
            return Ok(true);
        };
        let bytes = named.as_bytes();
        let parsed = bytes.iter().position(|&b| b == b':').and_then(|colon| {
            let pid = std::str::from_utf8(&bytes[..colon]).ok()?.parse().ok()?;
            Some((pid, Path::new(OsStr::from_bytes(&bytes[colon + 1..]))))
        });
        let Some((pid, path)) = parsed else {
            bail!("{GATE_ENV} must be `<pid>:<path>`, not {named:?}");
        };
        loop {
            if let Ok(word) = fs::read(path) {
                return Ok(word == b"go");
            }
            if process_gone(pid) {
                bail!("cargo memscope ended before it let the tests run");
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

/// Whether no process `pid` exists any more.
pub fn process_gone(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 sends nothing; it only asks whether `pid` exists.
    let refused = unsafe { libc::kill(pid, 0) } != 0;
    refused && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

impl Drop for Gate {
    /// A gate never opened (the check failed, or panicked) sends the runners away.
    fn drop(&mut self) {
        if !self.opened {
            let _ = self.write(false);
        }
    }
}

/// Runs the executable with its own trace directory (dropped for a `--list` run),
/// passes its stdout through when `pass_through` while keeping a copy, and records the
/// run in `run.json`.
fn run_child(
    root: &Path,
    executable: &Path,
    args: &[String],
    pass_through: bool,
) -> anyhow::Result<(BinaryRun, ExitStatus)> {
    let dir = fresh_dir(root)?;
    let listing = args.iter().any(|a| a == "--list");
    let traces = if listing {
        dir.join("dropped")
    } else {
        dir.clone()
    };
    fs::create_dir_all(&traces)
        .with_context(|| format!("failed to create {}", traces.display()))?;
    let mut child = Command::new(executable)
        .args(args)
        .env("MEMSCOPE_OUT", &traces)
        .env_remove(DIR_ENV)
        .stdout(Stdio::piped())
        .stderr(if pass_through {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .with_context(|| format!("failed to start {}", executable.display()))?;
    let pid = child.id();
    let _signals = crate::run::signals::Relay::install(pid);
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut kept = Vec::new();
    relay_stdout(&mut stdout, pass_through, Some(&mut kept));
    let status = child
        .wait()
        .context("failed to wait for the test executable")?;
    if listing {
        let _ = fs::remove_dir_all(&traces);
    }
    let record = BinaryRun {
        executable: executable.to_path_buf(),
        args: args.to_vec(),
        pid,
        exit_code: status.code(),
        stdout: String::from_utf8_lossy(&kept).into_owned(),
        listing,
    };
    let json = serde_json::to_vec(&record).expect("plain data serializes");
    fs::write(dir.join("run.json"), json)
        .with_context(|| format!("failed to write {}", dir.join("run.json").display()))?;
    Ok((record, status))
}

/// Reads `from` to its end, writing what comes to stdout as it comes when
/// `pass_through` (flushed at once: a test's progress shows before its line ends), and
/// keeping a copy in `kept`.
pub(crate) fn relay_stdout(
    from: &mut impl Read,
    pass_through: bool,
    mut kept: Option<&mut Vec<u8>>,
) {
    let mut buf = [0u8; 8192];
    let mut out = std::io::stdout();
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if pass_through {
                    let _ = out.write_all(&buf[..n]);
                    let _ = out.flush();
                }
                if let Some(kept) = kept.as_deref_mut() {
                    kept.extend_from_slice(&buf[..n]);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

/// After terse output (`-q`), which names only failed tests: asks the harness, with the
/// same arguments, which tests they select (`--list`) and which of those are ignored
/// (`--list --ignored`), so that every test still gets its row.
fn list_tests(root: &Path, run: &BinaryRun) -> anyhow::Result<()> {
    let has = |flag: &str| run.args.iter().any(|a| a == flag);
    let mut all = run.args.clone();
    all.push("--list".into());
    run_child(root, &run.executable, &all, false)?;
    if !has("--ignored") && !has("--include-ignored") {
        all.push("--ignored".into());
        run_child(root, &run.executable, &all, false)?;
    }
    Ok(())
}

/// A new numbered directory under `root` (binaries run one at a time, but a
/// process-per-test runner may start several at once).
fn fresh_dir(root: &Path) -> anyhow::Result<PathBuf> {
    let mut n = fs::read_dir(root).map(|d| d.count()).unwrap_or(0);
    loop {
        let dir = root.join(format!("{n:05}"));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => n += 1,
            Err(e) => return Err(e).with_context(|| format!("failed to create {}", dir.display())),
        }
    }
}

/// Watches a run's directory while the run goes on: which test executables have
/// ended (their `run.json` is written last), for analysis to start on their traces.
#[derive(Default)]
pub struct Finished {
    /// Directories whose run has been seen to end.
    ended: rustc_hash::FxHashSet<PathBuf>,
}

impl Finished {
    /// The traces of the runs under `root` that ended since the last call (none of a
    /// `--list` run), in the order the runs started.
    pub fn poll(&mut self, root: &Path) -> Vec<PathBuf> {
        let Ok(entries) = fs::read_dir(root) else {
            return Vec::new();
        };
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| !self.ended.contains(p))
            .collect();
        dirs.sort();
        let mut traces = Vec::new();
        for dir in dirs {
            // Not there yet, or read while being written: the run has not ended.
            let Some(run) = read_run(&dir) else {
                continue;
            };
            if !run.listing {
                traces.extend(crate::run::trace_files(&dir).unwrap_or_default());
            }
            self.ended.insert(dir);
        }
        traces
    }
}

/// A run's directory watched while the run goes on (see [`Finished`]).
pub struct Watched {
    pub root: PathBuf,
    pub finished: Finished,
}

impl crate::report::Runs for Watched {
    fn ended(&mut self) -> Vec<PathBuf> {
        self.finished.poll(&self.root)
    }

    fn running(&mut self) -> Vec<(PathBuf, Option<PathBuf>)> {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| !self.finished.ended.contains(p))
            .collect();
        dirs.sort();
        let mut traces = Vec::new();
        for dir in dirs {
            let ended = dir.join("run.json");
            if !ended.exists() {
                traces.extend(
                    crate::run::trace_files(&dir)
                        .unwrap_or_default()
                        .into_iter()
                        .map(|trace| (trace, Some(ended.clone()))),
                );
            }
        }
        traces
    }
}

/// The runs recorded under `root`, in the order they started.
pub fn collect(root: &Path) -> anyhow::Result<Vec<(PathBuf, Option<BinaryRun>)>> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(root)
        .with_context(|| format!("failed to read {}", root.display()))?
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    Ok(dirs
        .into_iter()
        .map(|dir| {
            let run = read_run(&dir);
            (dir, run)
        })
        .collect())
}

/// What `run.json` in `dir` says, if it is there and whole.
fn read_run(dir: &Path) -> Option<BinaryRun> {
    let bytes = fs::read(dir.join("run.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}
