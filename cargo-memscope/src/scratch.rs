//! The scratch copy of the user's workspace, where memscope's rewrite happens.
//!
//! The copy is kept between runs and synced incrementally, so cargo's incremental
//! builds keep working: a file is copied only when its size or modification time
//! differs from what was copied last time (recorded in `<scratch>.sync.json`),
//! and the copy gets the source's modification time so that cargo's fingerprints see
//! the file as old as the original. Files that disappeared from the workspace are
//! deleted from the copy. `.git/`, the workspace's `target/` and any other cargo
//! target directory (one with a `CACHEDIR.TAG`) are skipped. The user's files are
//! only ever read.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;

/// What was copied last time: relative path → (size, modification time in ns). Keys
/// are lossy UTF-8 (JSON): a file with a non-UTF-8 name is just copied every time.
type State = BTreeMap<String, (u64, u128)>;

/// What a sync did, for `-v` output and tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncStats {
    pub copied: usize,
    pub deleted: usize,
    pub unchanged: usize,
}

impl SyncStats {
    /// Whether the sync left the scratch copy as it was: nothing copied, nothing deleted.
    pub fn untouched(&self) -> bool {
        self.copied == 0 && self.deleted == 0
    }
}

/// The record of what the last sync found in the workspace (each file's size and
/// modification time), as written: equal records mean an unchanged workspace.
pub fn recorded_state(scratch: &Path) -> Option<Vec<u8>> {
    fs::read(state_path(scratch)).ok()
}

fn state_path(scratch: &Path) -> PathBuf {
    beside(scratch, ".sync.json")
}

/// A file of memscope's about the scratch copy at `scratch`, beside it: its path with
/// `suffix` appended.
pub fn beside(scratch: &Path, suffix: &str) -> PathBuf {
    let mut path = scratch.as_os_str().to_owned();
    path.push(suffix);
    PathBuf::from(path)
}

/// Brings `scratch` up to date with `source` (the workspace root), never descending
/// into any of `skip` (absolute paths; the user's target directory).
pub fn sync(source: &Path, scratch: &Path, skip: &[PathBuf]) -> anyhow::Result<SyncStats> {
    fs::create_dir_all(scratch)
        .with_context(|| format!("failed to create scratch copy {}", scratch.display()))?;
    let state_path = state_path(scratch);
    let previous = read_state(&state_path);

    let mut files = Vec::new();
    list_files(source, source, skip, &mut Vec::new(), &mut files)
        .with_context(|| format!("failed to read workspace {}", source.display()))?;

    let mut stats = SyncStats::default();
    let mut current = State::new();
    for relative in files {
        let from = source.join(&relative);
        let Ok(metadata) = fs::metadata(&from) else {
            continue; // vanished while we looked, or a dangling link
        };
        let stamp = (metadata.len(), mtime_ns(metadata.modified().ok()));
        let to = scratch.join(&relative);
        let key = relative.to_string_lossy().into_owned();
        if previous.get(&key) == Some(&stamp) && to.exists() {
            stats.unchanged += 1;
        } else {
            copy_with_mtime(&from, &to, metadata.modified().ok()).with_context(|| {
                format!("failed to copy {} to the scratch copy", from.display())
            })?;
            stats.copied += 1;
        }
        current.insert(key, stamp);
    }
    for relative in previous.keys().filter(|path| !current.contains_key(*path)) {
        match fs::remove_file(scratch.join(relative)) {
            Ok(()) => stats.deleted += 1,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err).context("failed to delete a file from the scratch copy"),
        }
    }
    let json = serde_json::to_vec(&current).context("failed to record the scratch copy's state")?;
    fs::write(&state_path, json)
        .with_context(|| format!("failed to write {}", state_path.display()))?;
    Ok(stats)
}

/// Collects the paths (relative to `root`) of all files under `dir` worth copying.
/// Symbolic links to directories are followed, except back into a directory on the
/// way down (`visiting`, canonical paths), which would never end.
fn list_files(
    root: &Path,
    dir: &Path,
    skip: &[PathBuf],
    visiting: &mut Vec<PathBuf>,
    out: &mut Vec<PathBuf>,
) -> io::Result<()> {
    let canonical = dir.canonicalize()?;
    if visiting.contains(&canonical) {
        return Ok(());
    }
    visiting.push(canonical);
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<io::Result<_>>()?;
    entries.sort_by_key(|entry| entry.file_name());
    for entry in entries {
        let path = entry.path();
        let is_dir = fs::metadata(&path).is_ok_and(|m| m.is_dir()); // follows links
        if is_dir {
            if !is_skipped_dir(root, &path, skip) {
                list_files(root, &path, skip, visiting, out)?;
            }
        } else {
            out.push(path.strip_prefix(root).expect("under root").to_path_buf());
        }
    }
    visiting.pop();
    Ok(())
}

fn is_skipped_dir(root: &Path, dir: &Path, skip: &[PathBuf]) -> bool {
    let name = dir.file_name().unwrap_or_default();
    name == ".git"
        || (name == "target" && dir.parent() == Some(root))
        || dir.join("CACHEDIR.TAG").exists()
        || skip.iter().any(|skipped| same_dir(skipped, dir))
}

fn same_dir(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b)
}

fn copy_with_mtime(from: &Path, to: &Path, mtime: Option<SystemTime>) -> io::Result<()> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    // Replace rather than overwrite in place: a rewritten copy may be read-only
    // or hard-linked by a tool; a fresh inode is always safe.
    let _ = fs::remove_file(to);
    fs::copy(from, to)?;
    if let Some(mtime) = mtime {
        File::options().write(true).open(to)?.set_modified(mtime)?;
    }
    Ok(())
}

fn mtime_ns(time: Option<SystemTime>) -> u128 {
    time.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos())
}

fn read_state(path: &Path) -> State {
    fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A scratch directory inside a temporary one, so its state file is cleaned up too.
    struct Scratch(PathBuf);

    impl Scratch {
        fn path(&self) -> &Path {
            &self.0
        }
    }

    fn write(path: &Path, contents: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, contents).unwrap();
    }

    #[test]
    fn copies_sources_with_their_mtime_and_skips_build_and_vcs_dirs() {
        let source = tempfile::tempdir().unwrap();
        let scratch_parent = tempfile::tempdir().unwrap();
        let scratch = Scratch(scratch_parent.path().join("copy"));
        let root = source.path();
        write(&root.join("Cargo.toml"), "[package]");
        write(&root.join("src/main.rs"), "fn main() {}");
        write(&root.join("target/debug/big"), "x");
        write(&root.join(".git/HEAD"), "ref");
        write(&root.join("other-target/CACHEDIR.TAG"), "tag");
        write(&root.join("src/target/mod.rs"), "// a module named target");

        let stats = sync(root, scratch.path(), &[]).unwrap();

        assert_eq!(stats.copied, 3);
        assert!(scratch.path().join("src/target/mod.rs").exists());
        assert!(!scratch.path().join("target").exists());
        assert!(!scratch.path().join(".git").exists());
        assert!(!scratch.path().join("other-target").exists());
        let source_mtime = fs::metadata(root.join("src/main.rs"))
            .unwrap()
            .modified()
            .unwrap();
        let copy_mtime = fs::metadata(scratch.path().join("src/main.rs"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(source_mtime, copy_mtime);
    }

    #[test]
    fn second_sync_copies_only_changed_files_and_deletes_removed_ones() {
        let source = tempfile::tempdir().unwrap();
        let scratch_parent = tempfile::tempdir().unwrap();
        let scratch = Scratch(scratch_parent.path().join("copy"));
        let root = source.path();
        write(&root.join("a.rs"), "a");
        write(&root.join("b.rs"), "b");
        write(&root.join("gone.rs"), "c");
        sync(root, scratch.path(), &[]).unwrap();

        // A change the rewrite made to the copy is kept while the source is unchanged.
        fs::write(scratch.path().join("a.rs"), "rewritten").unwrap();
        write(&root.join("b.rs"), "bb");
        let later = SystemTime::now() + Duration::from_secs(5);
        File::options()
            .write(true)
            .open(root.join("b.rs"))
            .unwrap()
            .set_modified(later)
            .unwrap();
        fs::remove_file(root.join("gone.rs")).unwrap();

        let stats = sync(root, scratch.path(), &[]).unwrap();

        assert_eq!(
            stats,
            SyncStats {
                copied: 1,
                deleted: 1,
                unchanged: 1
            }
        );
        assert_eq!(
            fs::read_to_string(scratch.path().join("a.rs")).unwrap(),
            "rewritten"
        );
        assert_eq!(
            fs::read_to_string(scratch.path().join("b.rs")).unwrap(),
            "bb"
        );
        assert!(!scratch.path().join("gone.rs").exists());
    }

    #[cfg(unix)]
    #[test]
    fn symbolic_link_loops_are_not_followed_forever() {
        let source = tempfile::tempdir().unwrap();
        let scratch_parent = tempfile::tempdir().unwrap();
        let scratch = Scratch(scratch_parent.path().join("copy"));
        let root = source.path();
        write(&root.join("src/main.rs"), "fn main() {}");
        std::os::unix::fs::symlink(root, root.join("src/loop")).unwrap();

        sync(root, scratch.path(), &[]).unwrap();

        assert!(scratch.path().join("src/main.rs").exists());
    }

    #[test]
    fn explicitly_skipped_target_dir_is_not_copied() {
        let source = tempfile::tempdir().unwrap();
        let scratch_parent = tempfile::tempdir().unwrap();
        let scratch = Scratch(scratch_parent.path().join("copy"));
        let root = source.path();
        write(&root.join("build-out/x"), "x");
        write(&root.join("src/lib.rs"), "");
        sync(root, scratch.path(), &[root.join("build-out")]).unwrap();
        assert!(!scratch.path().join("build-out").exists());
        assert!(scratch.path().join("src/lib.rs").exists());
    }
}
