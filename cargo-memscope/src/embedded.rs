//! The runtime's sources, embedded in this binary so that a user's program can be
//! built against exactly the runtime this `cargo-memscope` reads traces of.
//!
//! [`write_runtime`] lays them out as a standalone package next to the scratch copy,
//! with the proc-macro crate it depends on (`memscope-macros`) beside it; unit tests
//! keep [`RUNTIME_FILES`] and [`MACRO_FILES`] in step with the two crates.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;

macro_rules! runtime_files {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_str!(concat!("../../memscope-runtime/", $path)))),*]
    };
}

macro_rules! macro_files {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_str!(concat!("../../memscope-macros/", $path)))),*]
    };
}

/// Every file of `memscope-macros/` that its build needs; written to the directory
/// `../memscope-macros` beside the runtime, where the runtime's manifest finds it.
pub const MACRO_FILES: &[(&str, &str)] = macro_files![
    "Cargo.toml",
    "src/lib.rs",
    "src/args.rs",
    "src/expand.rs",
    "src/fallback.rs",
    "src/model.rs",
    "src/trackable.rs",
    "src/validate.rs",
];

/// Every file of `memscope-runtime/` that its build needs: path relative to the
/// package root, and contents.
pub const RUNTIME_FILES: &[(&str, &str)] = runtime_files![
    "Cargo.toml",
    "src/lib.rs",
    "src/alloc.rs",
    "src/buffer.rs",
    "src/clock.rs",
    "src/format.rs",
    "src/instrument.rs",
    "src/measure.rs",
    "src/reach.rs",
    "src/recorder.rs",
    "src/stack.rs",
    "src/sys.rs",
    "src/task.rs",
    "src/trackable.rs",
    "src/writer.rs",
];

/// Writes the runtime package into `dir` (`<dir>/Cargo.toml`, `<dir>/src/…`) and
/// returns `dir`. Files whose contents already match are left alone so that cargo's
/// fingerprints stay fresh; `.rs` files that are not part of this runtime are removed.
pub fn write_runtime(dir: &Path) -> anyhow::Result<PathBuf> {
    for (relative, contents) in RUNTIME_FILES {
        write_if_changed(&dir.join(relative), contents.as_bytes())?;
    }
    remove_stale_sources(&dir.join("src"), dir, RUNTIME_FILES)?;
    let macros = macros_dir(dir);
    for (relative, contents) in MACRO_FILES {
        write_if_changed(&macros.join(relative), contents.as_bytes())?;
    }
    remove_stale_sources(&macros.join("src"), &macros, MACRO_FILES)?;
    Ok(dir.to_path_buf())
}

/// Where the macros crate goes for a runtime written to `runtime`: its sibling, as in
/// this repository.
fn macros_dir(runtime: &Path) -> PathBuf {
    runtime.parent().unwrap_or(runtime).join("memscope-macros")
}

/// Writes `contents` to `path` unless it already holds them; the write goes through a
/// temporary file and a rename, so concurrent runs never see half a file.
pub fn write_if_changed(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    if fs::read(path).is_ok_and(|current| current == contents) {
        return Ok(());
    }
    let parent = path.parent().expect("a file path has a parent");
    fs::create_dir_all(parent)
        .with_context(|| format!("failed to create directory {}", parent.display()))?;
    let temporary = parent.join(format!(
        ".{}.{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    fs::write(&temporary, contents)
        .and_then(|()| fs::rename(&temporary, path))
        .with_context(|| format!("failed to write {}", path.display()))
}

fn remove_stale_sources(src: &Path, root: &Path, files: &[(&str, &str)]) -> anyhow::Result<()> {
    let Ok(entries) = fs::read_dir(src) else {
        return Ok(());
    };
    for entry in entries {
        let path = entry?.path();
        if path.is_dir() {
            remove_stale_sources(&path, root, files)?;
            continue;
        }
        let relative = path.strip_prefix(root).unwrap_or(&path);
        let known = files.iter().any(|(file, _)| Path::new(file) == relative);
        if !known && path.extension().is_some_and(|ext| ext == "rs") {
            fs::remove_file(&path)
                .with_context(|| format!("failed to remove {}", path.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime_sources(dir: &Path, root: &Path, found: &mut Vec<String>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                runtime_sources(&path, root, found);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                let relative = path.strip_prefix(root).unwrap();
                found.push(relative.to_str().unwrap().replace('\\', "/"));
            }
        }
    }

    #[test]
    fn every_runtime_source_file_is_embedded() {
        for (krate, files, list) in [
            ("memscope-runtime", RUNTIME_FILES, "RUNTIME_FILES"),
            ("memscope-macros", MACRO_FILES, "MACRO_FILES"),
        ] {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(krate);
            let mut found = Vec::new();
            runtime_sources(&root.join("src"), &root, &mut found);
            let missing: Vec<&String> = found
                .iter()
                .filter(|file| !files.iter().any(|(path, _)| path == file))
                .collect();
            assert!(
                missing.is_empty(),
                "add these {krate} files to {list} in embedded.rs: {missing:?}"
            );
        }
    }

    #[test]
    fn written_runtime_matches_the_embedded_files_and_drops_stale_ones() {
        let dir = tempfile::tempdir().unwrap();
        let runtime = dir.path().join("memscope-runtime");
        let stale = runtime.join("src/old.rs");
        fs::create_dir_all(stale.parent().unwrap()).unwrap();
        fs::write(&stale, "").unwrap();

        write_runtime(&runtime).unwrap();

        for (relative, contents) in RUNTIME_FILES {
            assert_eq!(
                fs::read_to_string(runtime.join(relative)).unwrap(),
                *contents
            );
        }
        for (relative, contents) in MACRO_FILES {
            let path = dir.path().join("memscope-macros").join(relative);
            assert_eq!(fs::read_to_string(path).unwrap(), *contents);
        }
        assert!(!stale.exists());
    }
}
