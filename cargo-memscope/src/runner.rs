//! The runner cargo calls for each test executable under `cargo memscope test`
//! (`target.'cfg(all())'.runner`): it gives the executable a trace directory of its
//! own, passes its stdout through while keeping a copy (the harness's result lines
//! say which tests ran and how they ended), and records how it ended in `run.json`.
//! Everything else (environment, working directory, order, fail-fast) is cargo's.

use std::ffi::OsString;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
}

/// `cargo-memscope __runner <executable> [args…]`.
pub fn run(command: &[OsString]) -> anyhow::Result<u8> {
    let Some(root) = std::env::var_os(DIR_ENV) else {
        bail!("`__runner` runs test executables for `cargo memscope test` only");
    };
    let Some((executable, args)) = command.split_first() else {
        bail!("`__runner` needs an executable to run");
    };
    let dir = fresh_dir(Path::new(&root))?;
    let mut child = Command::new(executable)
        .args(args)
        .env("MEMSCOPE_OUT", &dir)
        .env_remove(DIR_ENV)
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to start {}", executable.to_string_lossy()))?;
    let pid = child.id();
    let _signals = crate::run::signals::Relay::install(pid);
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    let mut out = std::io::stdout();
    loop {
        match stdout.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let _ = out.write_all(&buf[..n]);
                let _ = out.flush();
                kept.extend_from_slice(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let status = child
        .wait()
        .context("failed to wait for the test executable")?;
    let record = BinaryRun {
        executable: PathBuf::from(executable),
        args: args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect(),
        pid,
        exit_code: status.code(),
        stdout: String::from_utf8_lossy(&kept).into_owned(),
    };
    let json = serde_json::to_vec(&record).expect("plain data serializes");
    fs::write(dir.join("run.json"), json)
        .with_context(|| format!("failed to write {}", dir.join("run.json").display()))?;
    Ok(crate::run::exit_code(status))
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
            let run = fs::read(dir.join("run.json"))
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok());
            (dir, run)
        })
        .collect())
}
