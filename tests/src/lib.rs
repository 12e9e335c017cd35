//! Helpers for the end-to-end tests: the real `cargo-memscope` binary, fixture crates
//! copied to temporary directories, and runs with a clean environment.
//!
//! Each fixture is copied once per test process and shared (behind a mutex) by the
//! tests that use it, with its own persistent target directory under
//! `target/<profile>/memscope-e2e/`, so dependencies are built once across test runs
//! and a fixture's second run is an incremental build.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};

/// The memscope repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_path_buf()
}

/// The directory of this test binary's profile (`target/debug`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary has a path");
    let deps = exe.parent().expect("test binaries live in deps/");
    deps.parent()
        .expect("deps/ is inside the profile directory")
        .to_path_buf()
}

/// The real `cargo-memscope` binary, built (once per test process) by cargo in the
/// profile this test binary was built in; cargo leaves it alone when it is fresh.
pub fn cargo_memscope() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let profile_dir = profile_dir();
        let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        command
            .args([
                "build",
                "--quiet",
                "-p",
                "cargo-memscope",
                "--manifest-path",
            ])
            .arg(repo_root().join("Cargo.toml"));
        match profile_dir.file_name().and_then(OsStr::to_str) {
            Some("debug") => {}
            Some("release") => {
                command.arg("--release");
            }
            Some(other) => {
                command.args(["--profile", other]);
            }
            None => {}
        }
        let output = command.output().expect("cargo runs");
        assert!(
            output.status.success(),
            "building cargo-memscope failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let binary = profile_dir.join(format!("cargo-memscope{}", std::env::consts::EXE_SUFFIX));
        assert!(binary.is_file(), "no binary at {}", binary.display());
        binary
    })
}

/// The root of the tests' persistent target directories.
pub fn e2e_target_root() -> PathBuf {
    profile_dir().join("memscope-e2e")
}

/// A fixture crate copied into a temporary directory.
pub struct Fixture {
    dir: tempfile::TempDir,
    /// `CARGO_TARGET_DIR` for runs on it, or `None` for the default (`./target`).
    target_dir: Option<PathBuf>,
}

impl Fixture {
    /// A fresh copy of `fixtures/<name>` that builds into its own `./target`.
    pub fn copy(name: &str) -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir()
            .expect("a temporary directory");
        copy_dir(&repo_root().join("fixtures").join(name), dir.path());
        Fixture {
            dir,
            target_dir: None,
        }
    }

    /// A crate written on the spot: `files` are (relative path, contents).
    pub fn from_files(name: &str, files: &[(&str, &str)]) -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}-"))
            .tempdir()
            .expect("a temporary directory");
        for (path, contents) in files {
            let path = dir.path().join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, contents).unwrap();
        }
        Fixture {
            dir,
            target_dir: None,
        }
    }

    /// The copy of `fixtures/<name>` shared by this process's tests, with a target
    /// directory kept between test runs. Holding the guard serializes its users.
    pub fn shared(name: &'static str) -> MutexGuard<'static, Fixture> {
        static SHARED: Mutex<BTreeMap<&'static str, &'static Mutex<Fixture>>> =
            Mutex::new(BTreeMap::new());
        let fixture: &'static Mutex<Fixture> =
            SHARED.lock().unwrap().entry(name).or_insert_with(|| {
                let target_dir = e2e_target_root().join(name);
                // Earlier test runs' copies lived elsewhere: drop their scratch copies and
                // traces, keep the dependency builds.
                let _ = fs::remove_dir_all(target_dir.join("memscope/scratch"));
                let _ = fs::remove_dir_all(target_dir.join("memscope/traces"));
                Box::leak(Box::new(Mutex::new(
                    Fixture::copy(name).with_target_dir(target_dir),
                )))
            });
        fixture
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Builds into `target_dir` (as `CARGO_TARGET_DIR`) instead of `./target`.
    pub fn with_target_dir(mut self, target_dir: PathBuf) -> Fixture {
        self.target_dir = Some(target_dir);
        self
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The target directory cargo uses for this copy.
    pub fn target_dir(&self) -> PathBuf {
        self.target_dir
            .clone()
            .unwrap_or_else(|| self.path().join("target"))
    }

    /// `cargo memscope <args>` in the copy's directory, with a clean environment.
    pub fn memscope(&self, args: &[&str]) -> MemscopeCommand {
        self.memscope_in(self.path(), args)
    }

    /// `cargo memscope <args>` run in `dir`, with a clean environment.
    pub fn memscope_in(&self, dir: &Path, args: &[&str]) -> MemscopeCommand {
        let mut command = memscope_command(dir, args);
        if let Some(target_dir) = &self.target_dir {
            command.0.env("CARGO_TARGET_DIR", target_dir);
        }
        command
    }

    /// Every file outside the target directory, with its contents.
    pub fn files(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut files = BTreeMap::new();
        snapshot(self.path(), self.path(), &mut files);
        files
    }

    /// The trace files of the latest run on this copy.
    pub fn latest_traces(&self) -> Vec<PathBuf> {
        let traces = self.target_dir().join("memscope/traces");
        let Some(latest) = fs::read_dir(&traces)
            .map(|entries| entries.filter_map(|e| Some(e.ok()?.path())).max())
            .ok()
            .flatten()
        else {
            return Vec::new();
        };
        let mut files: Vec<PathBuf> = fs::read_dir(latest)
            .unwrap()
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| p.extension().is_some_and(|ext| ext == "mstrace"))
            .collect();
        files.sort();
        files
    }
}

fn snapshot(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if path != root.join("target") {
                snapshot(root, &path, out);
            }
        } else {
            let relative = path.strip_prefix(root).unwrap().to_path_buf();
            out.insert(relative, fs::read(&path).unwrap());
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap_or_else(|e| panic!("{}: {e}", from.display())) {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == "target" || name == "Cargo.lock" {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            copy_dir(&path, &to.join(&name));
        } else {
            fs::copy(&path, to.join(&name)).unwrap();
        }
    }
}

/// `cargo memscope <args>` run in `dir` with only the environment a build needs.
pub fn memscope_command(dir: &Path, args: &[&str]) -> MemscopeCommand {
    let mut command = Command::new(cargo_memscope());
    command.arg("memscope").args(args).current_dir(dir);
    clean_env(&mut command);
    MemscopeCommand(command, None)
}

/// Clears `command`'s environment but for what a build needs (PATH, HOME, cargo's and
/// rustup's homes, the toolchain, TMPDIR, USER).
pub fn clean_env(command: &mut Command) {
    command.env_clear();
    for key in [
        "PATH",
        "HOME",
        "CARGO_HOME",
        "RUSTUP_HOME",
        "RUSTUP_TOOLCHAIN",
        "TMPDIR",
        "USER",
    ] {
        if let Some(value) = std::env::var_os(key) {
            command.env(key, value);
        }
    }
}

/// A `cargo memscope` command about to run.
pub struct MemscopeCommand(Command, Option<Vec<u8>>);

impl MemscopeCommand {
    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Self {
        self.0.env(key, value);
        self
    }

    /// Feeds `input` to the program's standard input.
    pub fn stdin(mut self, input: &str) -> Self {
        self.1 = Some(input.as_bytes().to_vec());
        self
    }

    /// Starts the command with stdout and stderr piped, for a test that acts while
    /// it runs.
    pub fn spawn(mut self) -> std::process::Child {
        self.0
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        self.0.spawn().expect("cargo-memscope starts")
    }

    pub fn run(mut self) -> Output {
        self.0.stdout(Stdio::piped()).stderr(Stdio::piped());
        self.0.stdin(if self.1.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let mut child = self.0.spawn().expect("cargo-memscope starts");
        if let Some(input) = self.1 {
            child.stdin.take().unwrap().write_all(&input).unwrap();
        }
        let output = child.wait_with_output().expect("cargo-memscope finishes");
        Output {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

/// What a `cargo memscope` run printed and how it ended.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// The last line of stderr.
    pub fn last_stderr_line(&self) -> &str {
        self.stderr.lines().last().unwrap_or("")
    }
}

/// A `cargo memscope test` (or `nextest`) run on a shared fixture, with its report.
pub struct TestRun {
    pub output: Output,
    /// `report.json`, or `null` when the run wrote none.
    pub report: serde_json::Value,
    /// The report directory (`--output-dir`), kept as long as the run.
    pub out: tempfile::TempDir,
}

/// Runs `cargo memscope <args> --output-dir OUT` on the shared copy of `fixture`, with
/// `{out}` in `args` replaced by OUT, and `env` added to the clean environment.
pub fn test_run(fixture: &'static str, args: &[&str], env: &[(&str, &str)]) -> TestRun {
    let fixture = Fixture::shared(fixture);
    let out = tempfile::tempdir().expect("a temporary directory");
    let dir = out.path().to_str().expect("a UTF-8 temporary path");
    let mut args: Vec<String> = args.iter().map(|a| a.replace("{out}", dir)).collect();
    let at = args.iter().position(|a| a == "--").unwrap_or(args.len());
    args.splice(at..at, ["--output-dir".to_owned(), dir.to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut command = fixture.memscope(&args);
    for (key, value) in env {
        command = command.env(key, value);
    }
    let output = command.run();
    let report = fs::read_to_string(out.path().join("report.json"))
        .map(|json| serde_json::from_str(&json).expect("report.json is valid JSON"))
        .unwrap_or(serde_json::Value::Null);
    TestRun {
        output,
        report,
        out,
    }
}

impl TestRun {
    /// The entry of `tests[]` named `name`.
    pub fn test(&self, name: &str) -> &serde_json::Value {
        self.entry("tests", "name", name)
    }

    /// The entry of `test_binaries[]` whose `binary` is `binary`.
    pub fn binary(&self, binary: &str) -> &serde_json::Value {
        self.entry("test_binaries", "binary", binary)
    }

    /// The gate failures memscope printed, one line each.
    pub fn gate_failures(&self) -> Vec<&str> {
        self.output
            .stderr
            .lines()
            .filter(|l| l.contains("gate failed"))
            .collect()
    }

    fn entry(&self, list: &str, key: &str, value: &str) -> &serde_json::Value {
        let found: Vec<&serde_json::Value> = self.report[list]
            .as_array()
            .unwrap_or_else(|| panic!("no {list}[] in the report: {:#?}", self.output))
            .iter()
            .filter(|e| e[key] == value)
            .collect();
        match found[..] {
            [one] => one,
            _ => panic!(
                "{} entries of {list}[] with {key} {value:?}: {:#}",
                found.len(),
                self.report[list]
            ),
        }
    }
}

/// A `tests[]` entry's `[allocations, reallocations, bytes_allocated, peak_bytes,
/// leaked_blocks, leaked_bytes]`.
pub fn figures(test: &serde_json::Value) -> [u64; 6] {
    [
        "allocations",
        "reallocations",
        "bytes_allocated",
        "peak_bytes",
        "leaked_blocks",
        "leaked_bytes",
    ]
    .map(|f| {
        test[f]
            .as_u64()
            .unwrap_or_else(|| panic!("no {f} in {test:#}"))
    })
}
