//! `--locked` and `--frozen`: checking that the user's `Cargo.lock` is up to date, as
//! the user's own `cargo run --locked` would, although the scratch copy's lock file
//! must change (it gains memscope's runtime).
//!
//! The check is `cargo metadata --locked` on the user's workspace: it resolves the
//! dependencies, which is most of what `cargo metadata` costs (about 40 ms of 60 on
//! a small crate). After it passed and a scratch build resolved the scratch copy's lock
//! file (the user's plus the runtime), a record next to the scratch copy keeps a hash
//! of everything that check and that resolution read: both lock files, the scratch
//! copy's manifests (the user's, rewritten), the runtime's, the manifests of path
//! dependencies outside the workspace, the `--config` values and the cargo binary.
//! While the record matches, the scratch build gets `--locked` itself instead: its
//! lock file is the user's unchanged one plus the runtime, held to the same manifests,
//! so cargo refuses it exactly when the user's would be refused. Anything else that
//! changed means the check runs again.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use cargo_metadata::MetadataCommand;

use crate::cargo::{self, Workspace};
use crate::cli::CargoArgs;

/// The lock-file policy of one run in the scratch copy.
pub struct LockCheck {
    /// Where the record is kept; `None` without `--locked`/`--frozen`.
    record: Option<PathBuf>,
    /// The record matched: the scratch build runs with `--locked`.
    vouched: bool,
    inputs: Inputs,
}

/// What the record's hash covers.
struct Inputs {
    files: Vec<PathBuf>,
    config: Vec<String>,
}

impl LockCheck {
    /// Checks the user's lock file, unless the record vouches for it. Call after the
    /// scratch copy was synced and rewritten, and the runtime written to `runtime`.
    pub fn run(
        ws: &Workspace,
        args: &CargoArgs,
        scratch: &Path,
        runtime: &Path,
    ) -> anyhow::Result<LockCheck> {
        let inputs = Inputs::of(ws, args, scratch, runtime);
        if !args.is_locked() {
            return Ok(LockCheck {
                record: None,
                vouched: false,
                inputs,
            });
        }
        let record = record_path(scratch);
        let vouched = fs::read_to_string(&record).is_ok_and(|r| r.trim() == inputs.hash());
        if !vouched {
            check(ws, args)?;
        }
        Ok(LockCheck {
            record: Some(record),
            vouched,
            inputs,
        })
    }

    /// The flags the scratch build adds: `--locked` when the record vouched.
    pub fn scratch_flags(&self) -> Vec<OsString> {
        if self.vouched {
            vec!["--locked".into()]
        } else {
            Vec::new()
        }
    }

    /// After the scratch build: a build that succeeded after a full check is recorded
    /// (with the lock file it resolved); a vouched build that failed drops the record,
    /// so that the next run checks again and says what is wrong.
    pub fn built(&self, succeeded: bool) {
        let Some(record) = &self.record else { return };
        if succeeded && !self.vouched {
            let _ = crate::embedded::write_if_changed(record, self.inputs.hash().as_bytes());
        } else if !succeeded && self.vouched {
            let _ = fs::remove_file(record);
        }
    }
}

impl Inputs {
    fn of(ws: &Workspace, args: &CargoArgs, scratch: &Path, runtime: &Path) -> Inputs {
        let mut files = vec![ws.root.join("Cargo.lock"), scratch.join("Cargo.lock")];
        files.extend(ws.in_scratch(scratch, &ws.root.join("Cargo.toml")));
        for member in &ws.members {
            files.extend(ws.in_scratch(scratch, &member.manifest));
            files.extend(
                (member.path_deps.iter())
                    .filter(|dep| !dep.dir.starts_with(&ws.root))
                    .map(|dep| dep.dir.join("Cargo.toml")),
            );
        }
        files.push(runtime.join("Cargo.toml"));
        files.extend(
            runtime
                .parent()
                .map(|p| p.join("memscope-macros/Cargo.toml")),
        );
        files.push(PathBuf::from(cargo::cargo()));
        Inputs {
            files,
            config: args.config.clone(),
        }
    }

    /// The hash of the files' contents (the cargo binary's size and time instead) and
    /// the `--config` values, in hex.
    fn hash(&self) -> String {
        let mut bytes = Vec::new();
        for file in &self.files {
            bytes.extend(file.as_os_str().as_encoded_bytes());
            bytes.push(0);
            if file.extension().is_some_and(|e| e == "toml" || e == "lock") {
                bytes.extend(fs::read(file).unwrap_or_default());
            } else if let Ok(meta) = fs::metadata(file) {
                bytes.extend(format!("{} {:?}", meta.len(), meta.modified().ok()).as_bytes());
            }
            bytes.push(0);
        }
        for value in &self.config {
            bytes.extend(value.as_bytes());
            bytes.push(0);
        }
        format!("{:016x}", crate::run::fnv1a(&bytes))
    }
}

fn record_path(scratch: &Path) -> PathBuf {
    let name = scratch.file_name().unwrap_or_default().to_string_lossy();
    scratch.with_file_name(format!("{name}.lock-check"))
}

/// `cargo metadata --locked` (or `--frozen`) on the user's workspace: an error when
/// `Cargo.lock` does not match the manifests.
fn check(ws: &Workspace, args: &CargoArgs) -> anyhow::Result<()> {
    let options: Vec<String> = args
        .resolution_flags()
        .into_iter()
        .map(|flag| flag.to_string_lossy().into_owned())
        .collect();
    let cwd = std::env::current_dir().context("failed to read the current directory")?;
    MetadataCommand::new()
        .cargo_path(cargo::cargo())
        .manifest_path(&ws.manifest)
        .current_dir(cwd)
        .other_options(options)
        .exec()
        .map_err(cargo::metadata_error)
        .context("the check of the workspace's Cargo.lock failed (--locked)")?;
    Ok(())
}
