//! Running cargo: reading the workspace (`cargo metadata`), choosing the binary the
//! way `cargo run` does, and building it in the scratch copy (`cargo build`, whose
//! JSON messages name the executable).

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use cargo_metadata::{DependencyKind, Message, MetadataCommand, TargetKind};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::CargoArgs;
use crate::lockfile::LockCheck;

/// The user's workspace as `cargo metadata` describes it (paths in the user's tree).
#[derive(Debug)]
pub struct Workspace {
    pub root: PathBuf,
    pub target_dir: PathBuf,
    /// The manifest cargo picks from `--manifest-path` or the current directory.
    pub manifest: PathBuf,
    pub members: Vec<Member>,
    default_members: Vec<usize>,
}

#[derive(Debug)]
pub struct Member {
    pub name: String,
    pub manifest: PathBuf,
    pub default_run: Option<String>,
    /// The root file of the package's library, unless it is a proc-macro.
    pub lib_root: Option<PathBuf>,
    /// The crate name of the package's library (`-` replaced by `_`).
    pub lib_name: Option<String>,
    pub bins: Vec<(String, PathBuf)>,
    pub examples: Vec<(String, PathBuf)>,
    /// Integration tests and benches (`cargo memscope test` tracks them).
    pub tests: Vec<(String, PathBuf)>,
    pub benches: Vec<(String, PathBuf)>,
    pub path_deps: Vec<PathDep>,
}

impl Member {
    pub fn dir(&self) -> &Path {
        self.manifest.parent().expect("a manifest has a directory")
    }

    /// The crate name of the target whose root file is `root` (`-` replaced by `_`).
    pub fn crate_name(&self, root: &Path) -> Option<String> {
        if self.lib_root.as_deref() == Some(root) {
            return self.lib_name.clone();
        }
        let targets = [&self.bins, &self.examples, &self.tests, &self.benches];
        targets
            .into_iter()
            .flatten()
            .find(|(_, path)| path == root)
            .map(|(name, _)| name.replace('-', "_"))
    }
}

/// A dependency on a package by path (a workspace library, usually).
#[derive(Debug)]
pub struct PathDep {
    pub dir: PathBuf,
    pub kind: DepKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DepKind {
    Normal,
    Dev,
    Build,
}

/// The executable target that `cargo memscope run` builds and runs.
#[derive(Debug, Clone)]
pub struct Program {
    pub package: String,
    /// The package's manifest, in the user's tree.
    pub manifest: PathBuf,
    pub name: String,
    pub kind: ProgramKind,
    /// The crate root file, in the user's tree.
    pub root: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgramKind {
    Bin,
    Example,
}

impl ProgramKind {
    fn flag(self) -> &'static str {
        match self {
            ProgramKind::Bin => "--bin",
            ProgramKind::Example => "--example",
        }
    }
}

/// The cargo that invoked us (`$CARGO`), or the one on `PATH`.
pub fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// Locates the manifest like cargo does and reads the workspace it belongs to. Uses
/// `--no-deps`, so nothing is resolved and the user's `Cargo.lock` is never written;
/// `--locked` is checked by [`crate::lockfile`].
pub fn load_workspace(args: &CargoArgs) -> anyhow::Result<Workspace> {
    Ok(read_workspace(args)?.wait()?.0)
}

/// `cargo metadata` running in the background, and the workspace it described the
/// last time the same command ran in the same place, when memscope remembers it.
///
/// Reading the workspace is a cargo start of its own (20–40 ms) before anything else
/// can begin. With the remembered workspace, `cargo memscope test` prepares the
/// scratch copy and starts its build while `cargo metadata` runs; no test runs before
/// [`wait`](Self::wait) has found what cargo says now identical, byte for byte, to what
/// it said then (see `runner::GATE_ENV`), and any difference means starting over with
/// what cargo says now.
pub struct WorkspaceRead {
    manifest: PathBuf,
    output: std::thread::JoinHandle<std::io::Result<std::process::Output>>,
    /// Names this invocation's file among the remembered ones.
    key: String,
    /// The remembered `cargo metadata` output, and the workspace it describes until
    /// [`take_remembered`](Self::take_remembered).
    remembered: Option<Vec<u8>>,
    remembered_ws: Option<Workspace>,
}

/// Starts `cargo metadata --no-deps` for the manifest cargo would pick, and looks for
/// the workspace the same invocation read last time.
pub fn read_workspace(args: &CargoArgs) -> anyhow::Result<WorkspaceRead> {
    let cwd = std::env::current_dir().context("failed to read the current directory")?;
    let manifest = locate_manifest(&cwd, args.manifest_path.as_deref())?;
    let mut options = Vec::new();
    for value in &args.config {
        options.extend(["--config".to_owned(), value.clone()]);
    }
    let mut command = MetadataCommand::new()
        .cargo_path(cargo())
        .manifest_path(&manifest)
        .current_dir(&cwd)
        .no_deps()
        .other_options(options)
        .cargo_command();
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("failed to run `cargo metadata`; is cargo installed and on PATH?")?;
    // Read as it is written: a large workspace's description fills the pipe.
    let output = std::thread::spawn(move || child.wait_with_output());
    let mut key = Vec::new();
    for part in [cwd.as_os_str(), manifest.as_os_str(), &cargo()] {
        key.extend(part.as_encoded_bytes());
        key.push(0);
    }
    for value in &args.config {
        key.extend(value.as_bytes());
        key.push(0);
    }
    let key = format!("{:016x}", crate::run::fnv1a(&key));
    let found = remembered_dirs(&cwd, &manifest).find_map(|target| {
        let json = fs::read(remembered_path(&target, &key)).ok()?;
        let ws = workspace_from(&json, &manifest).ok()?;
        // Found where that workspace's own target directory keeps it, or not at all.
        (ws.target_dir == target).then_some((json, ws))
    });
    let (remembered, remembered_ws) = found.unzip();
    Ok(WorkspaceRead {
        manifest,
        output,
        key,
        remembered,
        remembered_ws,
    })
}

impl WorkspaceRead {
    /// The workspace as the same invocation read it last time, if remembered.
    pub fn take_remembered(&mut self) -> Option<Workspace> {
        self.remembered_ws.take()
    }

    /// What `cargo metadata` says now, and whether it is what was remembered (byte for
    /// byte). Remembers it for the next run.
    pub fn wait(self) -> anyhow::Result<(Workspace, bool)> {
        let output = self
            .output
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            .context("failed to read the output of `cargo metadata`")?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(anyhow::anyhow!(cargo_error_line(&stderr)))
                .context("failed to read the workspace with `cargo metadata`");
        }
        // cargo prints the JSON on its first line.
        let json = output
            .stdout
            .split(|&b| b == b'\n')
            .next()
            .unwrap_or_default();
        let ws = workspace_from(json, &self.manifest)
            .context("failed to read the workspace with `cargo metadata`")?;
        let same = self.remembered.as_deref() == Some(json);
        if !same {
            let path = remembered_path(&ws.target_dir, &self.key);
            // Only a cache: a run that cannot write it just waits for cargo next time.
            let _ = path.parent().map(fs::create_dir_all);
            let _ = crate::embedded::write_if_changed(&path, json);
        }
        Ok((ws, same))
    }
}

/// How a command that may have started from the remembered workspace ended.
pub enum Ran<T> {
    Done(T),
    /// Before the command did anything the user sees: the workspace is no longer the
    /// remembered one, but this.
    Changed(Workspace),
}

/// Runs `command` on the workspace: first on the remembered one (see
/// [`WorkspaceRead`]) while `cargo metadata` reads it again, then, if that found it
/// changed, on what cargo says now. `command` takes the check (`Option::take`) and
/// waits for it before it does anything the user sees; when it fails before it took
/// the check, it runs again if the workspace changed, and its error stands if not.
pub fn on_workspace<T>(
    args: &CargoArgs,
    mut command: impl FnMut(Workspace, &mut Option<WorkspaceRead>) -> anyhow::Result<Ran<T>>,
) -> anyhow::Result<T> {
    let mut read = read_workspace(args)?;
    let ws = match read.take_remembered() {
        Some(remembered) => {
            let mut check = Some(read);
            match command(remembered, &mut check) {
                Ok(Ran::Done(done)) => return Ok(done),
                Ok(Ran::Changed(ws)) => ws,
                Err(err) => match check.map(WorkspaceRead::wait) {
                    Some(Ok((ws, false))) => ws,
                    _ => return Err(err),
                },
            }
        }
        None => read.wait()?.0,
    };
    match command(ws, &mut None)? {
        Ran::Done(done) => Ok(done),
        Ran::Changed(_) => unreachable!("only a remembered workspace is found changed"),
    }
}

/// Where the remembered output of a `cargo metadata` invocation (`key`) is kept.
fn remembered_path(target_dir: &Path, key: &str) -> PathBuf {
    target_dir
        .join("memscope")
        .join("workspaces")
        .join(format!("{key}.json"))
}

/// Target directories a remembered workspace may be in: the one the environment
/// names, then `target` beside the manifest and in each directory above it (cargo's
/// default for a package and for the workspace it belongs to).
fn remembered_dirs<'a>(cwd: &'a Path, manifest: &'a Path) -> impl Iterator<Item = PathBuf> + 'a {
    let from_env = ["CARGO_TARGET_DIR", "CARGO_BUILD_TARGET_DIR"]
        .into_iter()
        .filter_map(std::env::var_os)
        .map(|dir| cwd.join(dir));
    let beside = manifest.ancestors().skip(1).map(|dir| dir.join("target"));
    from_env.chain(beside)
}

/// The workspace that `cargo metadata`'s JSON describes; `manifest` is the one cargo
/// picked.
fn workspace_from(json: &[u8], manifest: &Path) -> anyhow::Result<Workspace> {
    let text =
        std::str::from_utf8(json).context("cargo metadata printed text that is not UTF-8")?;
    let metadata =
        MetadataCommand::parse(text).context("cargo metadata printed what it does not document")?;
    let manifest = manifest.to_path_buf();

    let members: Vec<Member> = metadata
        .workspace_packages()
        .into_iter()
        .map(|package| {
            let root = |kind: TargetKind| -> Vec<(String, PathBuf)> {
                package
                    .targets
                    .iter()
                    .filter(|t| t.is_kind(kind.clone()))
                    .map(|t| (t.name.clone(), t.src_path.clone().into()))
                    .collect()
            };
            let lib = package
                .targets
                .iter()
                .find(|t| t.is_lib() || t.is_rlib() || t.is_dylib());
            Member {
                name: package.name.to_string(),
                manifest: package.manifest_path.clone().into(),
                default_run: package.default_run.clone(),
                lib_root: lib.map(|t| t.src_path.clone().into()),
                lib_name: lib.map(|t| t.name.replace('-', "_")),
                bins: root(TargetKind::Bin),
                examples: root(TargetKind::Example),
                tests: root(TargetKind::Test),
                benches: root(TargetKind::Bench),
                path_deps: package
                    .dependencies
                    .iter()
                    .filter_map(|dep| {
                        let kind = match dep.kind {
                            DependencyKind::Development => DepKind::Dev,
                            DependencyKind::Build => DepKind::Build,
                            _ => DepKind::Normal,
                        };
                        Some(PathDep {
                            dir: dep.path.clone()?.into(),
                            kind,
                        })
                    })
                    .collect(),
            }
        })
        .collect();
    let default_members = metadata
        .workspace_default_packages()
        .iter()
        .filter_map(|package| {
            members
                .iter()
                .position(|m| m.manifest == package.manifest_path)
        })
        .collect();
    Ok(Workspace {
        root: metadata.workspace_root.into(),
        target_dir: metadata.target_directory.into(),
        manifest,
        members,
        default_members,
    })
}

fn locate_manifest(cwd: &Path, explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        let path = cwd.join(path);
        if path.file_name() != Some(OsStr::new("Cargo.toml")) {
            bail!(
                "--manifest-path must point to a Cargo.toml file, not {}",
                path.display()
            );
        }
        if !path.is_file() {
            bail!("no Cargo.toml at {}; check --manifest-path", path.display());
        }
        return Ok(path);
    }
    cwd.ancestors()
        .map(|dir| dir.join("Cargo.toml"))
        .find(|candidate| candidate.is_file())
        .with_context(|| {
            format!(
                "could not find Cargo.toml in {} or any parent directory; run inside a Cargo package or pass --manifest-path",
                cwd.display()
            )
        })
}

/// A failed `cargo metadata`, with cargo's error output reduced to one line.
pub fn metadata_error(err: cargo_metadata::Error) -> anyhow::Error {
    match err {
        cargo_metadata::Error::CargoMetadata { stderr } => {
            anyhow::anyhow!(cargo_error_line(&stderr))
        }
        other => anyhow::Error::new(other),
    }
}

/// Cargo's error output reduced to one line: the first `error:` and its first cause.
fn cargo_error_line(stderr: &str) -> String {
    let mut lines = stderr.lines().map(str::trim).filter(|l| !l.is_empty());
    let Some(first) = lines.by_ref().find(|l| l.starts_with("error")) else {
        return stderr.trim().replace('\n', "; ");
    };
    let first = first.trim_start_matches("error:").trim();
    match lines.skip_while(|l| *l != "Caused by:").nth(1) {
        Some(cause) => format!("{first}: {cause}"),
        None => first.to_owned(),
    }
}

impl Workspace {
    /// memscope's runtime package, when it is a member (memscope's own workspace).
    pub fn runtime_member(&self) -> Option<&Member> {
        let runtime = crate::rewrite::RUNTIME_PACKAGE;
        self.members.iter().find(|m| m.name == runtime)
    }

    /// Chooses the binary like `cargo run`: `--bin`/`--example`, else the only binary
    /// of the selected package(s), else `default-run`.
    pub fn select_program(&self, args: &CargoArgs) -> anyhow::Result<Program> {
        let candidates: Vec<&Member> = if let Some(spec) = &args.package {
            let name = spec.split('@').next().unwrap_or(spec);
            let member = self
                .members
                .iter()
                .find(|m| m.name == name)
                .with_context(|| {
                    format!(
                        "package `{spec}` is not a member of the workspace at {}",
                        self.root.display()
                    )
                })?;
            vec![member]
        } else if let Some(current) = self
            .members
            .iter()
            .find(|m| same_file(&m.manifest, &self.manifest))
        {
            vec![current]
        } else {
            self.default_members
                .iter()
                .map(|&i| &self.members[i])
                .collect()
        };

        let (kind, wanted) = match (&args.bin, &args.example) {
            (Some(bin), _) => (ProgramKind::Bin, Some(bin)),
            (None, Some(example)) => (ProgramKind::Example, Some(example)),
            (None, None) => (ProgramKind::Bin, None),
        };
        let targets = |member: &'_ Member| match kind {
            ProgramKind::Bin => member.bins.clone(),
            ProgramKind::Example => member.examples.clone(),
        };
        let mut available: Vec<(&Member, String, PathBuf)> = candidates
            .iter()
            .flat_map(|member| {
                targets(member)
                    .into_iter()
                    .map(move |(name, root)| (*member, name, root))
            })
            .collect();
        let kind_name = match kind {
            ProgramKind::Bin => "bin",
            ProgramKind::Example => "example",
        };
        let names = |available: &[(&Member, String, PathBuf)]| {
            available
                .iter()
                .map(|(_, name, _)| name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if let Some(wanted) = wanted {
            available.retain(|(_, name, _)| name == wanted);
            if available.is_empty() {
                let all: Vec<_> = candidates
                    .iter()
                    .flat_map(|m| targets(m))
                    .map(|(n, _)| n)
                    .collect();
                bail!(
                    "no {kind_name} target named `{wanted}`; available {kind_name} targets: {}",
                    if all.is_empty() {
                        "none".to_owned()
                    } else {
                        all.join(", ")
                    }
                );
            }
        } else if available.len() > 1 {
            let default = match candidates.as_slice() {
                [only] => only.default_run.as_deref(),
                _ => None,
            };
            match default {
                Some(default) => available.retain(|(_, name, _)| name == default),
                None => bail!(
                    "could not determine which binary to run (available: {}); use --bin NAME or set `default-run` in Cargo.toml",
                    names(&available)
                ),
            }
        }
        let Some((member, name, root)) = available.into_iter().next() else {
            bail!(
                "no binary to run in {}: a bin target must be available for `cargo memscope run`",
                self.manifest.display()
            );
        };
        Ok(Program {
            package: member.name.clone(),
            manifest: member.manifest.clone(),
            name,
            kind,
            root,
        })
    }

    /// `path` in the user's workspace, relocated into the scratch copy at `scratch`.
    pub fn in_scratch(&self, scratch: &Path, path: &Path) -> Option<PathBuf> {
        path.strip_prefix(&self.root)
            .ok()
            .map(|relative| scratch.join(relative))
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b)
}

/// How to build the program in the scratch copy.
pub struct Build<'a> {
    pub ws: &'a Workspace,
    pub program: &'a Program,
    pub args: &'a CargoArgs,
    /// Adds `--locked` when the scratch copy's lock file is vouched for.
    pub lock: &'a LockCheck,
    pub scratch: &'a Path,
    /// `CARGO_TARGET_DIR` for the build, apart from the user's own.
    pub build_dir: &'a Path,
    pub color: bool,
    pub progress: bool,
}

impl Build<'_> {
    /// Builds the program and returns its executable. Cargo's and rustc's messages go
    /// to stderr; a failed build is an error after them.
    pub fn run(&self) -> anyhow::Result<PathBuf> {
        let manifest = self
            .ws
            .in_scratch(self.scratch, &self.program.manifest)
            .context("the package is outside its workspace")?;
        let mut command = Command::new(cargo());
        command
            .arg("build")
            .arg("--manifest-path")
            .arg(&manifest)
            .args([self.program.kind.flag(), &self.program.name])
            .arg("--message-format")
            .arg(if self.color {
                "json-diagnostic-rendered-ansi"
            } else {
                "json"
            })
            .args(["--color", if self.color { "always" } else { "never" }])
            .args(self.args.build_flags())
            .args(self.lock.scratch_flags())
            .args(self.profile_config())
            .current_dir(self.working_dir())
            .env("CARGO_TARGET_DIR", self.build_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        add_frame_pointers(&mut command);

        let kind = match self.program.kind {
            ProgramKind::Bin => TargetKind::Bin,
            ProgramKind::Example => TargetKind::Example,
        };
        let mut executable = None;
        let (status, foreign_allocator) = stream_build(command, self.progress, |artifact| {
            if artifact.target.name == self.program.name && artifact.target.is_kind(kind.clone()) {
                executable = artifact
                    .executable
                    .clone()
                    .map(PathBuf::from)
                    .or(executable.take());
            }
        })?;

        if let Some(crates) = foreign_allocator {
            bail!(
                "`{crates}` (a dependency outside the workspace) declares its own #[global_allocator], \
                 which memscope cannot wrap; build without it (e.g. behind a cargo feature) to track this program"
            );
        }
        if !status.success() {
            bail!(
                "the build of `{}` failed; cargo's messages above say why",
                self.program.package
            );
        }
        executable.with_context(|| {
            format!(
                "cargo built `{}` but reported no executable for it",
                self.program.name
            )
        })
    }

    /// Where cargo runs: the copy of the user's current directory, so that the same
    /// `.cargo/config.toml` files apply.
    fn working_dir(&self) -> PathBuf {
        working_dir(self.ws, self.scratch)
    }

    /// Line tables and symbols for the chosen profile, so stacks resolve to source.
    fn profile_config(&self) -> Vec<String> {
        profile_config(self.ws, self.args)
    }
}

/// Where cargo runs: the copy of the user's current directory, so that the same
/// `.cargo/config.toml` files apply.
fn working_dir(ws: &Workspace, scratch: &Path) -> PathBuf {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| ws.in_scratch(scratch, &cwd))
        .filter(|dir| dir.is_dir())
        .unwrap_or_else(|| scratch.to_path_buf())
}

/// Line tables and symbols for the chosen profile, so stacks resolve to source; and
/// memscope's runtime optimized, without debug assertions, whatever the profile: the
/// allocator hook runs on every allocation, and unoptimized (as in `cargo test`'s
/// default profile) it made a test suite several times slower than untracked.
fn profile_config(ws: &Workspace, args: &CargoArgs) -> Vec<String> {
    let manifest = std::fs::read_to_string(ws.root.join("Cargo.toml")).unwrap_or_default();
    profile_settings(&manifest, args.profile_name())
}

/// [`profile_config`]'s `--config` arguments for `profile` given the root manifest.
fn profile_settings(manifest: &str, profile: &str) -> Vec<String> {
    let mut config = vec![
        "--config".to_owned(),
        format!("profile.{profile}.strip=false"),
    ];
    for setting in [
        "opt-level=3",
        "debug-assertions=false",
        "overflow-checks=false",
    ] {
        config.extend([
            "--config".to_owned(),
            format!(
                "profile.{profile}.package.{}.{setting}",
                crate::rewrite::RUNTIME_PACKAGE
            ),
        ]);
    }
    if debug_level(manifest, profile) < LINE_TABLES_ONLY {
        config.extend([
            "--config".to_owned(),
            format!("profile.{profile}.debug=\"line-tables-only\""),
        ]);
    }
    config
}

/// Fails with a one-line error when `cargo nextest` is not installed.
pub fn require_nextest() -> anyhow::Result<()> {
    let found = Command::new(cargo())
        .args(["nextest", "--version"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !found {
        bail!(
            "cargo-nextest is not installed (`cargo nextest --version` failed): install it with `cargo install cargo-nextest --locked`, or run `cargo memscope test` without --nextest"
        );
    }
    Ok(())
}

/// A test executable that `cargo test --no-run` built.
#[derive(Debug, Clone)]
pub struct TestExecutable {
    pub package: String,
    pub target: String,
    /// `lib`, `bin`, `test`, `bench` or `example`.
    pub kind: String,
    /// The target's root file, in the scratch copy.
    pub src_path: PathBuf,
    pub executable: PathBuf,
}

/// How to build and run the tests in the scratch copy (`cargo test`).
pub struct TestBuild<'a> {
    pub ws: &'a Workspace,
    pub args: &'a CargoArgs,
    /// `cargo test`'s own flags: package and target selection, `--no-fail-fast`.
    pub test_flags: &'a [OsString],
    /// Adds `--locked` when the scratch copy's lock file is vouched for.
    pub lock: &'a LockCheck,
    pub scratch: &'a Path,
    pub build_dir: &'a Path,
    pub color: bool,
    pub progress: bool,
}

impl TestBuild<'_> {
    /// `cargo test` in the scratch copy, with the flags of the build; the caller adds
    /// the mode (`--no-run`, or a runner and harness arguments).
    pub fn command(&self) -> anyhow::Result<Command> {
        self.cargo(&["test"], self.args.build_flags())
    }

    /// `cargo nextest run` with the same selection and build (cargo's flags in
    /// nextest's spelling); the caller adds the runner and nextest's arguments.
    pub fn nextest_command(&self) -> anyhow::Result<Command> {
        self.cargo(&["nextest", "run"], self.args.nextest_flags())
    }

    fn cargo(&self, subcommand: &[&str], build_flags: Vec<OsString>) -> anyhow::Result<Command> {
        let manifest = self
            .ws
            .in_scratch(self.scratch, &self.ws.manifest)
            .context("the manifest is outside its workspace")?;
        let mut command = Command::new(cargo());
        command
            .args(subcommand)
            .arg("--manifest-path")
            .arg(&manifest)
            .args(self.test_flags)
            .args(["--color", if self.color { "always" } else { "never" }])
            .args(build_flags)
            .args(self.lock.scratch_flags())
            .args(profile_config(self.ws, self.args))
            .current_dir(working_dir(self.ws, self.scratch))
            .env("CARGO_TARGET_DIR", self.build_dir);
        add_frame_pointers(&mut command);
        Ok(command)
    }

    /// Builds the test executables (`cargo test --no-run`) and returns them in the
    /// order cargo reported them.
    pub fn build(&self) -> anyhow::Result<Vec<TestExecutable>> {
        let mut command = self.command()?;
        command
            .arg("--no-run")
            .arg("--message-format")
            .arg(if self.color {
                "json-diagnostic-rendered-ansi"
            } else {
                "json"
            })
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        let mut executables = Vec::new();
        let (status, foreign_allocator) = stream_build(command, self.progress, |artifact| {
            executables.extend(self.executable(artifact));
        })?;
        if let Some(crates) = foreign_allocator {
            bail!(foreign_allocator_error(&crates));
        }
        if !status.success() {
            bail!("the build of the tests failed; cargo's messages above say why");
        }
        Ok(executables)
    }

    /// Runs `command` (this build's `cargo test`, with a runner added) with
    /// `harness_args` after `--`: cargo builds the tests, showing its own progress and
    /// messages, then runs them, their output passed through as it comes. One cargo
    /// invocation instead of a build and a run: cargo's start and its check that
    /// everything is fresh happen once. Returns the executables built and cargo's
    /// status; a build failure is an error, as in [`build`](Self::build).
    pub fn build_and_run(
        &self,
        mut command: Command,
        harness_args: &[OsString],
    ) -> anyhow::Result<(Vec<TestExecutable>, std::process::ExitStatus)> {
        command
            .arg("--message-format")
            .arg(if self.color {
                "json-diagnostic-rendered-ansi"
            } else {
                "json"
            })
            // The compiler's messages are printed here, between cargo's own lines:
            // a progress bar would be drawn over them.
            .args(["--config", "term.progress.when=\"never\"", "--"])
            .args(harness_args)
            .stdout(Stdio::piped());
        let mut child = command.spawn().context("failed to run cargo")?;
        let mut reader = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let mut executables = Vec::new();
        let outcome = read_build_messages(&mut reader, None, |artifact| {
            executables.extend(self.executable(artifact));
        })?;
        // What follows the build is the tests' own output.
        crate::runner::relay_stdout(&mut reader, true, None);
        let status = child.wait().context("failed to wait for cargo")?;
        if let Some(crates) = outcome.foreign_allocator {
            bail!(foreign_allocator_error(&crates));
        }
        if outcome.built != Some(true) {
            bail!("the build of the tests failed; cargo's messages above say why");
        }
        Ok((executables, status))
    }

    /// The test executable an artifact of this build is, if it is one.
    fn executable(&self, artifact: &cargo_metadata::Artifact) -> Option<TestExecutable> {
        let executable = artifact
            .executable
            .as_ref()
            .filter(|_| artifact.profile.test)?;
        let manifest = artifact.manifest_path.as_std_path();
        let package = self
            .ws
            .members
            .iter()
            .find(|m| {
                m.manifest.strip_prefix(&self.ws.root).ok()
                    == manifest.strip_prefix(self.scratch).ok()
            })
            .map_or_else(|| artifact.target.name.clone(), |m| m.name.clone());
        Some(TestExecutable {
            package,
            target: artifact.target.name.clone(),
            kind: artifact
                .target
                .kind
                .first()
                .map(|k| k.to_string())
                .unwrap_or_default(),
            src_path: artifact.target.src_path.clone().into(),
            executable: executable.clone().into(),
        })
    }
}

/// The crates rustc names in a global-allocator conflict, if `message` is one.
fn allocator_conflict(message: &str) -> Option<String> {
    let crates = message
        .split("conflicts with global allocator in: ")
        .nth(1)?;
    Some(crates.trim().to_owned())
}

fn foreign_allocator_error(crates: &str) -> String {
    format!(
        "`{crates}` (a dependency outside the workspace) declares its own #[global_allocator], \
         which memscope cannot wrap; build without it (e.g. behind a cargo feature) to track these tests"
    )
}

/// Runs a cargo build command whose stdout is JSON messages: prints the compiler's
/// messages (above a spinner when `progress`), passes each artifact to `on_artifact`,
/// and returns cargo's status and the crates named by a global-allocator conflict.
fn stream_build(
    mut command: Command,
    progress: bool,
    on_artifact: impl FnMut(&cargo_metadata::Artifact),
) -> anyhow::Result<(std::process::ExitStatus, Option<String>)> {
    let spinner = progress.then(spinner);
    command.stderr(if spinner.is_some() {
        Stdio::piped()
    } else {
        Stdio::inherit()
    });
    let mut child = command.spawn().context("failed to run cargo")?;
    let stderr_relay = child.stderr.take().map(|stderr| {
        let spinner = spinner.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                print_above(spinner.as_ref(), &line);
            }
        })
    });

    let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
    let outcome = read_build_messages(&mut stdout, spinner.as_ref(), on_artifact)?;
    // Nothing is expected after `build-finished`; whatever comes is not left to fill
    // the pipe while cargo is waited for.
    let _ = std::io::copy(&mut stdout, &mut std::io::sink());
    let status = child.wait().context("failed to wait for cargo")?;
    if let Some(relay) = stderr_relay {
        let _ = relay.join();
    }
    if let Some(spinner) = spinner {
        spinner.finish_and_clear();
    }
    Ok((status, outcome.foreign_allocator))
}

/// What a build's JSON messages said.
struct BuildOutcome {
    /// The crates named by a global-allocator conflict.
    foreign_allocator: Option<String>,
    /// `build-finished`: whether the build succeeded; `None` if cargo ended first.
    built: Option<bool>,
}

/// Reads cargo's JSON messages up to `build-finished` (or the end): prints the
/// compiler's messages (above `spinner`), passes each artifact to `on_artifact`.
fn read_build_messages(
    reader: &mut impl BufRead,
    spinner: Option<&ProgressBar>,
    mut on_artifact: impl FnMut(&cargo_metadata::Artifact),
) -> anyhow::Result<BuildOutcome> {
    let mut outcome = BuildOutcome {
        foreign_allocator: None,
        built: None,
    };
    let mut line = String::new();
    while outcome.built.is_none() {
        line.clear();
        let read = reader
            .read_line(&mut line)
            .context("failed to read cargo's build messages")?;
        if read == 0 {
            break;
        }
        let line = line.trim_end();
        match serde_json::from_str::<Message>(line) {
            Ok(Message::CompilerArtifact(artifact)) => {
                if let (Some(spinner), false) = (spinner, artifact.fresh) {
                    spinner.set_message(artifact.target.name.clone());
                }
                on_artifact(&artifact);
            }
            Ok(Message::CompilerMessage(message)) => {
                if let Some(crates) = allocator_conflict(&message.message.message) {
                    outcome.foreign_allocator = Some(crates);
                }
                if let Some(rendered) = &message.message.rendered {
                    print_above(spinner, rendered.trim_end());
                }
            }
            Ok(Message::BuildFinished(finished)) => outcome.built = Some(finished.success),
            Ok(_) => {}
            Err(_) => print_above(spinner, line),
        }
    }
    Ok(outcome)
}

/// Frame pointers make call stacks cheap to record. `RUSTFLAGS` (or its encoded form)
/// replaces config-file rustflags, so extend it when set; otherwise add to
/// `build.rustflags` with `--config`, which merges with config files.
fn add_frame_pointers(command: &mut Command) {
    const FLAG: &str = "force-frame-pointers=yes";
    if let Some(encoded) = std::env::var_os("CARGO_ENCODED_RUSTFLAGS") {
        let mut flags = encoded;
        if !flags.is_empty() {
            flags.push("\x1f");
        }
        flags.push(format!("-C\x1f{FLAG}"));
        command.env("CARGO_ENCODED_RUSTFLAGS", flags);
    } else if let Some(mut flags) = std::env::var_os("RUSTFLAGS") {
        flags.push(format!(" -C {FLAG}"));
        command.env("RUSTFLAGS", flags);
    } else {
        command.args(["--config", &format!("build.rustflags=[\"-C\", \"{FLAG}\"]")]);
    }
}

/// Debug-info levels ordered as cargo orders them, times ten.
const LINE_TABLES_ONLY: u8 = 7;

/// The debug-info level `profile` has in the workspace's root manifest (following
/// `inherits`, with cargo's defaults for the built-in profiles).
fn debug_level(manifest: &str, profile: &str) -> u8 {
    let doc: toml_edit::DocumentMut = manifest.parse().unwrap_or_default();
    let mut name = profile.to_owned();
    for _ in 0..8 {
        let table = doc.get("profile").and_then(|p| p.get(&name));
        if let Some(debug) = table.and_then(|t| t.get("debug")) {
            return match (debug.as_bool(), debug.as_integer(), debug.as_str()) {
                (Some(true), _, _) | (_, Some(2), _) | (_, _, Some("full")) => 20,
                (_, Some(1), _) | (_, _, Some("limited")) => 10,
                (_, _, Some("line-tables-only")) => LINE_TABLES_ONLY,
                (_, _, Some("line-directives-only")) => 5,
                _ => 0,
            };
        }
        name = match (
            name.as_str(),
            table
                .and_then(|t| t.get("inherits"))
                .and_then(|i| i.as_str()),
        ) {
            ("dev" | "test", _) => return 20,
            ("release" | "bench", _) => return 0,
            (_, Some(parent)) => parent.to_owned(),
            (_, None) => return 0,
        };
    }
    0
}

fn spinner() -> ProgressBar {
    let spinner = ProgressBar::new_spinner();
    spinner.set_style(
        ProgressStyle::with_template(
            "{spinner} memscope: building with the tracking allocator {msg}",
        )
        .expect("the template is valid"),
    );
    spinner.enable_steady_tick(Duration::from_millis(100));
    spinner
}

fn print_above(spinner: Option<&ProgressBar>, line: &str) {
    match spinner {
        Some(spinner) => spinner.suspend(|| eprintln!("{line}")),
        None => eprintln!("{line}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_level_follows_profiles_and_defaults() {
        let manifest = "[profile.release]\ndebug = \"line-tables-only\"\n[profile.fast]\ninherits = \"release\"\n\
                        [profile.slim]\ninherits = \"dev\"\ndebug = false\n";
        assert_eq!(debug_level(manifest, "dev"), 20);
        assert_eq!(debug_level(manifest, "release"), LINE_TABLES_ONLY);
        assert_eq!(debug_level(manifest, "fast"), LINE_TABLES_ONLY);
        assert_eq!(debug_level(manifest, "slim"), 0);
        assert_eq!(debug_level("", "release"), 0);
        assert_eq!(debug_level("", "bench"), 0);
    }

    #[test]
    fn the_runtime_is_optimized_whatever_the_profile() {
        for profile in ["dev", "release", "custom"] {
            let config = profile_settings("", profile);
            for setting in [
                "opt-level=3",
                "debug-assertions=false",
                "overflow-checks=false",
            ] {
                let want = format!("profile.{profile}.package.memscope-runtime.{setting}");
                assert!(config.contains(&want), "{want} missing from {config:?}");
            }
        }
    }

    #[test]
    fn cargo_errors_shrink_to_one_line() {
        let stderr = "error: failed to parse manifest at `/x/Cargo.toml`\n\nCaused by:\n  missing field `name`\n";
        assert_eq!(
            cargo_error_line(stderr),
            "failed to parse manifest at `/x/Cargo.toml`: missing field `name`"
        );
    }
}
