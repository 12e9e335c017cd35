//! The rewrite of the scratch copy that links memscope into the user's program.
//!
//! Two edits, always computed from the user's pristine files and written into the
//! scratch copy only when the copy differs from the result (so a rerun with nothing
//! changed touches nothing and cargo's build stays fresh):
//!
//! - manifests (toml_edit): the program's package depends on the embedded runtime as
//!   `memscope = { package = "memscope-runtime", path = … }`; any existing dependency
//!   on `memscope-runtime` anywhere in the workspace is repointed there (one runtime
//!   per process); relative `path`s that leave the workspace are made absolute; the
//!   root manifest gets a `[workspace]` table if it has none, so the copy never joins
//!   a workspace around it.
//! - sources (syn): a `#[global_allocator]` static in the program's crate or in a
//!   workspace library it depends on is wrapped, not replaced: its attribute is blanked
//!   and `__MEMSCOPE_ALLOC`, an `Alloc<ByRef<T>>` forwarding to it, is added on the
//!   same line, so line numbers (and the reports' source locations) are unchanged.
//!   Without one, the crate root gets a module (a file beside the runtime, so that no
//!   code of memscope's appears at a line of the user's file) holding an
//!   `Alloc::system()` allocator (`__private::SystemAlloc`: the same, compiled with the
//!   runtime's optimization).
//! - with `--instrument`, `#[::memscope::instrument]` in front of the functions that
//!   [`crate::annotate`] selects, on their own lines.
//!
//! Files rewritten by an earlier run but not by this one are restored, which a state
//! file next to the scratch copy records. A rerun on a workspace where nothing changed
//! since (no file, crate, option, runtime or memscope build) finds the copy rewritten
//! already, which a second record says, and reads no source at all.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use quote::ToTokens;
use toml_edit::{DocumentMut, InlineTable, Item, Table, TableLike, Value};

use crate::annotate::{self, Pattern};
use crate::cargo::{DepKind, Program, ProgramKind, Workspace};
use crate::embedded::write_if_changed;
use crate::modules::{self, normalize, LineColumn, SourceFile};
use crate::scratch::{self, SyncStats};

/// The runtime's package name (its profile is set apart in `cargo::profile_config`).
pub const RUNTIME_PACKAGE: &str = "memscope-runtime";
/// The runtime's library name, which is the crate name of an unrenamed dependency.
const RUNTIME_LIB: &str = "memscope";
const ALLOCATOR_STATIC: &str = "__MEMSCOPE_ALLOC";

/// What the rewrite did.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Rewrite {
    /// Files of the user's own that declare a `#[global_allocator]`, now wrapped.
    pub wrapped: Vec<PathBuf>,
    /// Files with functions instrumented by `--instrument`, and how many.
    pub instrumented: BTreeMap<PathBuf, usize>,
}

impl Rewrite {
    /// Says what the rewrite did (`-v`).
    pub fn describe(&self) {
        for file in &self.wrapped {
            eprintln!(
                "memscope: wrapping the #[global_allocator] declared in {}",
                file.display()
            );
        }
        for (file, functions) in &self.instrumented {
            eprintln!(
                "memscope: instrumenting {} in {}",
                crate::summary::plural(*functions as u64, "function"),
                file.display()
            );
        }
    }
}

/// A crate that gets memscope's allocator.
#[derive(Debug, Clone)]
pub struct CrateRoot {
    /// The manifest of its package, in the user's tree.
    pub manifest: PathBuf,
    /// Its root source file, in the user's tree.
    pub root: PathBuf,
    /// Whether the package's dev-dependencies are linked into it.
    pub with_dev: bool,
    /// Install the allocator under `#[cfg(test)]` only: a library or binary whose unit
    /// tests are tracked, which other crates also link or run untested.
    pub cfg_test: bool,
}

/// Rewrites the scratch copy of `ws` (at `scratch`, which `synced` says how the sync
/// just before left) so that `program` is built with the runtime at `runtime` as its
/// global allocator, and the functions `instrument` selects are instrumented.
pub fn apply(
    ws: &Workspace,
    program: &Program,
    instrument: &[Pattern],
    scratch: &Path,
    synced: &SyncStats,
    runtime: &Path,
) -> anyhow::Result<Rewrite> {
    let krate = CrateRoot {
        manifest: program.manifest.clone(),
        root: program.root.clone(),
        with_dev: program.kind == ProgramKind::Example,
        cfg_test: false,
    };
    apply_crates(ws, &[krate], instrument, scratch, synced, runtime)
}

/// Rewrites the scratch copy so that every crate of `crates` is built with the
/// runtime as its global allocator: a `#[global_allocator]` it links from the
/// workspace is wrapped, otherwise one is installed in its root. The functions that
/// `instrument` selects in those crates and the workspace libraries they link get
/// `#[memscope::instrument]`.
pub fn apply_crates(
    ws: &Workspace,
    crates: &[CrateRoot],
    instrument: &[Pattern],
    scratch: &Path,
    synced: &SyncStats,
    runtime: &Path,
) -> anyhow::Result<Rewrite> {
    let inputs = Inputs::describe(ws, crates, instrument, scratch, runtime)?;
    if synced.untouched() {
        if let Some(rewrite) = Done::read(scratch, &inputs) {
            return Ok(rewrite);
        }
    }
    Done::forget(scratch)?;

    // The files of every workspace crate linked into one of `crates`, parsed once.
    let mut sources: BTreeMap<PathBuf, Vec<SourceFile>> = BTreeMap::new();
    let linked: Vec<Vec<PathBuf>> = crates.iter().map(|k| linked_roots(ws, k)).collect();
    let parse = if instrument.is_empty() {
        modules::Parse::Containing("global_allocator")
    } else {
        modules::Parse::Every
    };
    for root in linked.iter().flatten() {
        if !sources.contains_key(root) {
            sources.insert(root.clone(), modules::crate_files(root, parse));
        }
    }

    let mut allocators: Vec<FoundAllocator> = Vec::new();
    // memscope's own allocator goes in where the program's can be absent: always
    // when it declares none, under the negation of their `cfg`s when all are gated.
    let mut install: Vec<(&CrateRoot, String)> = Vec::new();
    for (krate, roots) in crates.iter().zip(&linked) {
        let found = find_allocators(ws, roots.iter().flat_map(|root| &sources[root]))?;
        let test_only = if krate.cfg_test { "#[cfg(test)]\n" } else { "" };
        if found.is_empty() {
            install.push((krate, test_only.to_owned()));
        } else if found.iter().all(|a| a.cfg.is_some()) {
            let any: Vec<&str> = found.iter().filter_map(|a| a.cfg.as_deref()).collect();
            install.push((
                krate,
                format!("{test_only}#[cfg(not(any({})))]\n", any.join(", ")),
            ));
        }
        for f in found {
            if !allocators
                .iter()
                .any(|a| a.file == f.file && a.attribute == f.attribute)
            {
                allocators.push(f);
            }
        }
    }
    let mut runtime_users: BTreeSet<PathBuf> = BTreeSet::new();
    for krate in crates {
        runtime_users.insert(krate.manifest.clone());
    }
    for found in &allocators {
        runtime_users.insert(owning_manifest(ws, &found.file)?);
    }
    let insertions = if instrument.is_empty() {
        annotate::Insertions::new()
    } else {
        let cwd = std::env::current_dir().context("failed to read the current directory")?;
        let named: Vec<annotate::Crate> = sources
            .iter()
            .map(|(root, files)| annotate::Crate {
                name: crate_name(ws, root),
                files,
            })
            .collect();
        annotate::plan(instrument, &named, &ws.root, &cwd)?
    };
    for file in insertions.keys() {
        runtime_users.insert(owning_manifest(ws, file)?);
    }

    let mut planned: BTreeMap<PathBuf, String> = BTreeMap::new();
    let mut crate_names: BTreeMap<PathBuf, String> = BTreeMap::new();
    let root_manifest = ws.root.join("Cargo.toml");
    let mut manifests: BTreeSet<PathBuf> = ws.members.iter().map(|m| m.manifest.clone()).collect();
    manifests.insert(root_manifest.clone());
    for manifest in &manifests {
        let Ok(text) = fs::read_to_string(manifest) else {
            continue; // a virtual root is always readable; a member may not be
        };
        let edit = ManifestEdit {
            workspace_root: &ws.root,
            runtime,
            is_root: *manifest == root_manifest,
            is_runtime: ws.runtime_member().is_some_and(|m| m.manifest == *manifest),
            needs_runtime: runtime_users.contains(manifest),
        };
        let (rewritten, crate_name) = edit
            .apply(manifest, &text)
            .with_context(|| format!("failed to rewrite {}", manifest.display()))?;
        if let Some(name) = crate_name {
            crate_names.insert(manifest.clone(), name);
        }
        planned.insert(manifest.clone(), rewritten);
    }

    let crate_of = |file: &Path| -> anyhow::Result<String> {
        let manifest = owning_manifest(ws, file)?;
        Ok(crate_names
            .get(&manifest)
            .cloned()
            .unwrap_or_else(|| RUNTIME_LIB.to_owned()))
    };
    let mut edits: BTreeMap<&Path, Vec<Edit>> = BTreeMap::new();
    for found in &allocators {
        let krate = crate_of(&found.file)?;
        edits
            .entry(&found.file)
            .or_default()
            .extend(allocator_edits(&read_source(&found.file)?, found, &krate));
    }
    for (file, positions) in &insertions {
        let krate = crate_of(file)?;
        if krate != RUNTIME_LIB {
            bail!(
                "--instrument: the package of {} reaches memscope's runtime as `{krate}`, but instrumented code names it `{RUNTIME_LIB}`; rename that dependency to `{RUNTIME_LIB}`",
                file.display()
            );
        }
        edits
            .entry(file)
            .or_default()
            .extend(positions.iter().map(|&at| Edit {
                from: at,
                to: at,
                text: annotate::ATTRIBUTE.to_owned(),
            }));
    }
    for (file, edits) in edits {
        let text = read_source(file)?;
        planned.insert(file.to_path_buf(), apply_edits(&text, edits));
    }
    let mut installed = Vec::new();
    for (krate, cfg) in install {
        let root = &krate.root;
        let in_runtime_lib = ws
            .runtime_member()
            .is_some_and(|m| m.lib_root.as_ref() == Some(root));
        let path = if in_runtime_lib {
            "crate".to_owned()
        } else {
            format!("::{}", crate_of(root)?)
        };
        let module = install_system_allocator(runtime, &path)?;
        installed.push(PathBuf::from(&module));
        let text = match planned.get(root) {
            Some(wrapped) => wrapped.clone(),
            None => read_source(root)?,
        };
        let separator = if text.ends_with('\n') || text.is_empty() {
            ""
        } else {
            "\n"
        };
        planned.insert(
            root.clone(),
            format!("{text}{separator}{cfg}#[path = {module:?}]\nmod __memscope_allocator;\n"),
        );
    }

    write_plan(ws, scratch, planned)?;
    let rewrite = Rewrite {
        wrapped: allocators.into_iter().map(|found| found.file).collect(),
        instrumented: insertions
            .into_iter()
            .map(|(file, positions)| (file, positions.len()))
            .collect(),
    };
    // A file outside the workspace (`#[path]`) is not synced: a change to it would go
    // unseen.
    let all_synced = sources
        .values()
        .flatten()
        .all(|f| f.path.starts_with(&ws.root) && !f.path.starts_with(&ws.target_dir));
    if !all_synced {
        return Ok(rewrite);
    }
    Done {
        inputs,
        installed,
        rewrite,
    }
    .record(scratch)
}

/// Everything a rewrite is computed from besides the scratch copy's files: the
/// workspace as `cargo metadata` describes it, what the sync found in it (each file's
/// size and modification time), the crates, the patterns, the runtime, and memscope's
/// own build.
#[derive(PartialEq, serde::Serialize, serde::Deserialize)]
struct Inputs(Vec<String>);

/// A rewrite, the allocator modules it wrote beside the runtime, and the inputs it was
/// computed from.
#[derive(serde::Serialize, serde::Deserialize)]
struct Done {
    inputs: Inputs,
    installed: Vec<PathBuf>,
    rewrite: Rewrite,
}

impl Done {
    /// The rewrite recorded for `inputs`, if the allocator modules it wrote are still
    /// there.
    fn read(scratch: &Path, inputs: &Inputs) -> Option<Rewrite> {
        let done: Done = serde_json::from_slice(&fs::read(done_file(scratch)).ok()?).ok()?;
        (done.inputs == *inputs && done.installed.iter().all(|m| m.is_file()))
            .then_some(done.rewrite)
    }

    fn record(self, scratch: &Path) -> anyhow::Result<Rewrite> {
        // A path that is not UTF-8 has no JSON string: no record, a rewrite next time.
        if let Ok(json) = serde_json::to_vec(&self) {
            let path = done_file(scratch);
            fs::write(&path, json)
                .with_context(|| format!("failed to write {}", path.display()))?;
        }
        Ok(self.rewrite)
    }

    /// Removes the record: done before the copy changes, so that a run that stops
    /// halfway leaves none.
    fn forget(scratch: &Path) -> anyhow::Result<()> {
        let path = done_file(scratch);
        match fs::remove_file(&path) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                Err(err).with_context(|| format!("failed to remove {}", path.display()))
            }
            _ => Ok(()),
        }
    }
}

impl Inputs {
    fn describe(
        ws: &Workspace,
        crates: &[CrateRoot],
        instrument: &[Pattern],
        scratch: &Path,
        runtime: &Path,
    ) -> anyhow::Result<Inputs> {
        let exe = std::env::current_exe().context("failed to locate memscope's executable")?;
        let built = fs::metadata(&exe)
            .and_then(|meta| Ok((meta.len(), meta.modified()?)))
            .with_context(|| format!("failed to read {}", exe.display()))?;
        let cwd = std::env::current_dir().context("failed to read the current directory")?;
        let synced = scratch::recorded_state(scratch).unwrap_or_default();
        Ok(Inputs(vec![
            format!("{} {built:?}", exe.display()),
            format!("{ws:?}"),
            format!("{crates:?}"),
            format!("{instrument:?}"),
            runtime.display().to_string(),
            cwd.display().to_string(),
            String::from_utf8_lossy(&synced).into_owned(),
        ]))
    }
}

fn done_file(scratch: &Path) -> PathBuf {
    scratch::beside(scratch, ".rewrite-done.json")
}

/// The crate name of the workspace crate whose root file is `root`.
fn crate_name(ws: &Workspace, root: &Path) -> String {
    ws.members
        .iter()
        .find_map(|m| m.crate_name(root))
        .unwrap_or_else(|| {
            let stem = root.file_stem().unwrap_or_default().to_string_lossy();
            stem.replace('-', "_")
        })
}

/// Writes the module that declares memscope's allocator over `System`, for a crate
/// that reaches the runtime by the path `runtime_path` (`::memscope`, or `crate`
/// inside the runtime itself); returns its path.
fn install_system_allocator(runtime: &Path, runtime_path: &str) -> anyhow::Result<String> {
    let file = runtime_path.trim_start_matches("::");
    let module = runtime.join("install").join(format!("{file}.rs"));
    let text = format!(
        "//! Added to the crate root by cargo-memscope: the tracking allocator over `System`.\n\n\
         #[global_allocator]\nstatic {ALLOCATOR_STATIC}: {runtime_path}::__private::SystemAlloc = {runtime_path}::__private::SystemAlloc;\n"
    );
    write_if_changed(&module, text.as_bytes())?;
    module
        .into_os_string()
        .into_string()
        .map_err(|_| anyhow::anyhow!("the target directory's path is not UTF-8"))
}

fn read_source(path: &Path) -> anyhow::Result<String> {
    fs::read_to_string(path).with_context(|| format!("failed to read {}", path.display()))
}

/// The manifest of the workspace member whose directory holds `file`.
fn owning_manifest(ws: &Workspace, file: &Path) -> anyhow::Result<PathBuf> {
    ws.members
        .iter()
        .filter(|member| file.starts_with(member.dir()))
        .max_by_key(|member| member.dir().components().count())
        .map(|member| member.manifest.clone())
        .with_context(|| format!("{} is not inside a workspace member", file.display()))
}

/// Writes each planned file (path in the user's workspace → contents) into the scratch
/// copy, restores files that an earlier run rewrote, and records what is rewritten now.
fn write_plan(
    ws: &Workspace,
    scratch: &Path,
    mut planned: BTreeMap<PathBuf, String>,
) -> anyhow::Result<()> {
    let state_path = state_file(scratch);
    let previous: Vec<String> = fs::read(&state_path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    let mut rewritten = Vec::new();
    for relative in previous {
        let original = ws.root.join(&relative);
        if let Entry::Vacant(slot) = planned.entry(original) {
            if let Ok(text) = fs::read_to_string(slot.key()) {
                slot.insert(text);
            }
        }
    }
    for (original, contents) in &planned {
        let relative = original.strip_prefix(&ws.root).with_context(|| {
            format!(
                "{} is outside the workspace at {}, so memscope cannot rewrite it",
                original.display(),
                ws.root.display()
            )
        })?;
        if fs::read_to_string(original).ok().as_deref() != Some(contents.as_str()) {
            rewritten.push(relative.to_string_lossy().into_owned());
        }
        write_if_changed(&scratch.join(relative), contents.as_bytes())?;
    }
    let json = serde_json::to_vec(&rewritten).expect("strings serialize");
    fs::write(&state_path, json)
        .with_context(|| format!("failed to write {}", state_path.display()))
}

fn state_file(scratch: &Path) -> PathBuf {
    scratch::beside(scratch, ".rewrite.json")
}

// ---------------------------------------------------------------------------------
// Manifests

struct ManifestEdit<'a> {
    workspace_root: &'a Path,
    runtime: &'a Path,
    is_root: bool,
    /// The runtime's own package (memscope's workspace).
    is_runtime: bool,
    /// Whether this package's code names the runtime (the program's package, or one
    /// whose allocator is wrapped).
    needs_runtime: bool,
}

impl ManifestEdit<'_> {
    /// Returns the rewritten manifest and, when the package needs the runtime, the
    /// crate name under which its code reaches it.
    fn apply(&self, manifest: &Path, text: &str) -> anyhow::Result<(String, Option<String>)> {
        let mut doc: DocumentMut = text.parse().context("invalid TOML")?;
        let dir = manifest.parent().expect("a manifest has a directory");
        let runtime = self
            .runtime
            .to_str()
            .context("the target directory's path is not UTF-8")?;

        for table in dependency_tables(&mut doc) {
            for (key, entry) in table.iter_mut() {
                let Some(entry_table) = entry_as_table_like(&mut *entry) else {
                    if is_runtime_entry(key.get(), None) {
                        *entry = Item::Value(Value::InlineTable(path_table(runtime)));
                    }
                    continue;
                };
                let package = entry_table
                    .get("package")
                    .and_then(|p| p.as_str())
                    .map(str::to_owned);
                let inherited =
                    entry_table.get("workspace").and_then(|w| w.as_bool()) == Some(true);
                if is_runtime_entry(key.get(), package.as_deref()) && !inherited {
                    for stale in [
                        "version",
                        "git",
                        "branch",
                        "tag",
                        "rev",
                        "registry",
                        "registry-index",
                    ] {
                        entry_table.remove(stale);
                    }
                    entry_table.insert("path", toml_edit::value(runtime));
                } else if let Some(path) = entry_table.get("path").and_then(|p| p.as_str()) {
                    if let Some(absolute) = self.escaping_path(dir, path) {
                        entry_table.insert("path", toml_edit::value(absolute));
                    }
                }
            }
        }

        let crate_name = if !self.needs_runtime {
            None
        } else if self.is_runtime {
            // The runtime's own package (memscope's workspace): its tests and
            // binaries reach its library by name, without a dependency on itself.
            Some(RUNTIME_LIB.to_owned())
        } else {
            Some(ensure_runtime_dependency(&mut doc, runtime)?)
        };
        if self.is_root && !doc.contains_key("workspace") {
            doc.insert("workspace", Item::Table(Table::new()));
        }
        Ok((doc.to_string(), crate_name))
    }

    /// `path` (relative to `dir`) made absolute when it points outside the workspace,
    /// which the scratch copy does not contain.
    fn escaping_path(&self, dir: &Path, path: &str) -> Option<String> {
        if Path::new(path).is_absolute() {
            return None;
        }
        let joined = normalize(&dir.join(path));
        (!joined.starts_with(self.workspace_root)).then(|| joined.to_string_lossy().into_owned())
    }
}

fn is_runtime_entry(key: &str, package: Option<&str>) -> bool {
    package.unwrap_or(key) == RUNTIME_PACKAGE
}

fn path_table(runtime: &str) -> InlineTable {
    let mut table = InlineTable::new();
    table.insert("path", runtime.into());
    table
}

fn entry_as_table_like(item: &mut Item) -> Option<&mut dyn TableLike> {
    match item {
        Item::Table(table) => Some(table),
        Item::Value(Value::InlineTable(table)) => Some(table),
        _ => None,
    }
}

/// Every table of dependency entries in a manifest, including target-specific ones,
/// `[workspace.dependencies]` and `[patch.*]`/`[replace]`.
fn dependency_tables(doc: &mut DocumentMut) -> Vec<&mut dyn TableLike> {
    const KINDS: [&str; 5] = [
        "dependencies",
        "dev-dependencies",
        "build-dependencies",
        "dev_dependencies",
        "build_dependencies",
    ];
    let mut tables: Vec<&mut dyn TableLike> = Vec::new();
    for (key, item) in doc.as_table_mut().iter_mut() {
        let Some(table) = item.as_table_like_mut() else {
            continue;
        };
        match key.get() {
            kind if KINDS.contains(&kind) => tables.push(table),
            "replace" => tables.push(table),
            "target" => {
                for (_, platform) in table.iter_mut() {
                    if let Some(platform) = platform.as_table_like_mut() {
                        for (kind, deps) in platform.iter_mut() {
                            if KINDS.contains(&kind.get()) {
                                tables.extend(deps.as_table_like_mut());
                            }
                        }
                    }
                }
            }
            "patch" => {
                for (_, registry) in table.iter_mut() {
                    tables.extend(registry.as_table_like_mut());
                }
            }
            "workspace" => {
                if let Some(deps) = table.get_mut("dependencies") {
                    tables.extend(deps.as_table_like_mut());
                }
            }
            _ => {}
        }
    }
    tables
}

/// Makes sure `[dependencies]` has the runtime; returns the crate name it goes by.
fn ensure_runtime_dependency(doc: &mut DocumentMut, runtime: &str) -> anyhow::Result<String> {
    let deps = doc
        .entry("dependencies")
        .or_insert_with(|| Item::Table(Table::new()))
        .as_table_like_mut()
        .context("`dependencies` is not a table")?;
    for (key, entry) in deps.iter() {
        let package = entry
            .as_table_like()
            .and_then(|t| t.get("package"))
            .and_then(|p| p.as_str());
        if is_runtime_entry(key, package) {
            // Already repointed above (or inherited from the repointed workspace entry).
            let name = if package.is_some() { key } else { RUNTIME_LIB };
            return Ok(name.replace('-', "_"));
        }
    }
    let key = if deps.contains_key(RUNTIME_LIB) {
        "__memscope_runtime"
    } else {
        RUNTIME_LIB
    };
    let mut entry = path_table(runtime);
    entry.insert("package", RUNTIME_PACKAGE.into());
    entry.fmt();
    deps.insert(key, Item::Value(Value::InlineTable(entry)));
    Ok(key.to_owned())
}

// ---------------------------------------------------------------------------------
// Sources

/// A `#[global_allocator]` static in the user's code, located by line and column.
#[derive(Debug)]
struct FoundAllocator {
    file: PathBuf,
    name: String,
    ty: String,
    /// Start and end of the `#[global_allocator]` attribute.
    attribute: (LineColumn, LineColumn),
    /// End of the static item (after its `;`).
    item_end: LineColumn,
    /// The item's `#[cfg(…)]` predicates joined with `all(…)`, if it has any: the
    /// wrapper carries them, and memscope's own allocator is installed under their
    /// negation (a `#[cfg(feature = "dhat")]` allocator is only there with the feature).
    cfg: Option<String>,
}

/// The root files of the crates that make up `krate`: its own, its package's library
/// and the workspace libraries it depends on.
fn linked_roots(ws: &Workspace, krate: &CrateRoot) -> Vec<PathBuf> {
    let mut roots = vec![krate.root.clone()];
    let mut seen: BTreeSet<PathBuf> = BTreeSet::new();
    let mut queue = vec![(krate.manifest.clone(), krate.with_dev)];
    while let Some((manifest, with_dev)) = queue.pop() {
        if !seen.insert(manifest.clone()) {
            continue;
        }
        let Some(member) = ws.members.iter().find(|m| m.manifest == manifest) else {
            continue;
        };
        if let Some(lib) = &member.lib_root {
            if !roots.contains(lib) {
                roots.push(lib.clone());
            }
        }
        for dep in &member.path_deps {
            if dep.kind == DepKind::Normal || (with_dev && dep.kind == DepKind::Dev) {
                queue.push((normalize(&dep.dir.join("Cargo.toml")), false));
            }
        }
    }
    roots
}

/// The global allocators declared in `files`.
fn find_allocators<'a>(
    ws: &Workspace,
    files: impl Iterator<Item = &'a SourceFile>,
) -> anyhow::Result<Vec<FoundAllocator>> {
    let mut found = Vec::new();
    for file in files {
        let mut visitor = AllocatorVisitor {
            file: &file.path,
            found: &mut found,
        };
        syn::visit::Visit::visit_file(&mut visitor, &file.syntax);
    }
    let outside: Vec<_> = found
        .iter()
        .filter(|f| !f.file.starts_with(&ws.root))
        .collect();
    if let Some(first) = outside.first() {
        bail!(
            "the global allocator in {} is outside the workspace, so memscope cannot wrap it",
            first.file.display()
        );
    }
    Ok(found)
}

/// Finds allocator statics in one file.
struct AllocatorVisitor<'a> {
    file: &'a Path,
    found: &'a mut Vec<FoundAllocator>,
}

impl<'ast> syn::visit::Visit<'ast> for AllocatorVisitor<'_> {
    fn visit_item_static(&mut self, item: &'ast syn::ItemStatic) {
        let Some(attr) = item
            .attrs
            .iter()
            .find(|a| a.path().is_ident("global_allocator"))
        else {
            return;
        };
        let start = attr.pound_token.span.start();
        let end = attr.bracket_token.span.close().end();
        let cfgs: Vec<String> = item
            .attrs
            .iter()
            .filter(|a| a.path().is_ident("cfg"))
            .filter_map(|a| a.meta.require_list().ok())
            .map(|list| list.tokens.to_string())
            .collect();
        self.found.push(FoundAllocator {
            cfg: (!cfgs.is_empty()).then(|| format!("all({})", cfgs.join(", "))),
            file: self.file.to_path_buf(),
            name: item.ident.to_string(),
            ty: item.ty.to_token_stream().to_string(),
            attribute: ((start.line, start.column), (end.line, end.column)),
            item_end: {
                let end = item.semi_token.span.end();
                (end.line, end.column)
            },
        });
    }
}

/// Replaces the text between two positions of a source file.
struct Edit {
    from: LineColumn,
    to: LineColumn,
    text: String,
}

/// The edits that wrap one allocator in `text`: its attribute blanked (line breaks
/// kept) and a forwarding `__MEMSCOPE_ALLOC` added after the item on the same line.
fn allocator_edits(text: &str, allocator: &FoundAllocator, krate: &str) -> [Edit; 2] {
    let (from, to) = allocator.attribute;
    let blank: String = text[offset(text, from)..offset(text, to)]
        .chars()
        .map(|c| if c == '\n' { c } else { ' ' })
        .collect();
    let cfg = allocator
        .cfg
        .as_ref()
        .map_or(String::new(), |cfg| format!(" #[cfg({cfg})]"));
    let wrapper = format!(
        "{cfg} #[global_allocator] static {ALLOCATOR_STATIC}: ::{krate}::Alloc<::{krate}::ByRef<{ty}>> = \
         ::{krate}::Alloc::new(::{krate}::ByRef(&{name}));",
        ty = allocator.ty,
        name = allocator.name
    );
    [
        Edit {
            from,
            to,
            text: blank,
        },
        Edit {
            from: allocator.item_end,
            to: allocator.item_end,
            text: wrapper,
        },
    ]
}

/// `text` with `edits` (which do not overlap) applied.
fn apply_edits(text: &str, mut edits: Vec<Edit>) -> String {
    // From the end backwards, so that earlier positions stay valid.
    edits.sort_by_key(|e| std::cmp::Reverse(e.from));
    let mut out = text.to_owned();
    for edit in edits {
        out.replace_range(offset(text, edit.from)..offset(text, edit.to), &edit.text);
    }
    out
}

/// The byte offset of a line and column in `text`.
fn offset(text: &str, (line, column): LineColumn) -> usize {
    let start = line_starts(text)[line - 1];
    start
        + text[start..]
            .char_indices()
            .nth(column)
            .map_or(text.len() - start, |(i, _)| i)
}

fn line_starts(text: &str) -> Vec<usize> {
    std::iter::once(0)
        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edit(text: &str, needs_runtime: bool) -> (String, Option<String>) {
        let edit = ManifestEdit {
            workspace_root: Path::new("/ws"),
            runtime: Path::new("/t/memscope/runtime/memscope-runtime"),
            is_root: true,
            is_runtime: false,
            needs_runtime,
        };
        edit.apply(Path::new("/ws/app/Cargo.toml"), text).unwrap()
    }

    #[test]
    fn program_package_gets_the_runtime_dependency_and_a_workspace_table() {
        let (text, name) = edit(
            "[package]\nname = \"app\"\n\n[dependencies]\nserde = \"1\"\n",
            true,
        );
        assert_eq!(name.as_deref(), Some("memscope"));
        let doc: DocumentMut = text.parse().unwrap();
        let dep = &doc["dependencies"]["memscope"];
        assert_eq!(dep["package"].as_str(), Some("memscope-runtime"));
        assert_eq!(
            dep["path"].as_str(),
            Some("/t/memscope/runtime/memscope-runtime")
        );
        assert_eq!(doc["dependencies"]["serde"].as_str(), Some("1"));
        assert!(doc.contains_key("workspace"));
        assert!(text.starts_with("[package]\nname = \"app\"\n\n[dependencies]\nserde = \"1\"\n"));
    }

    #[test]
    fn existing_runtime_dependency_is_repointed_and_keeps_its_name() {
        let (text, name) = edit(
            "[workspace]\n[dependencies]\nms = { package = \"memscope-runtime\", version = \"0.1\", features = [\"x\"] }\n\
             [dev-dependencies]\nmemscope-runtime = \"0.1\"\n",
            true,
        );
        assert_eq!(name.as_deref(), Some("ms"));
        let doc: DocumentMut = text.parse().unwrap();
        let dep = &doc["dependencies"]["ms"];
        assert_eq!(
            dep["path"].as_str(),
            Some("/t/memscope/runtime/memscope-runtime")
        );
        assert!(dep.get("version").is_none());
        assert_eq!(dep["features"].as_array().map(|a| a.len()), Some(1));
        assert_eq!(
            doc["dev-dependencies"]["memscope-runtime"]["path"].as_str(),
            Some("/t/memscope/runtime/memscope-runtime")
        );
        assert!(doc.get("memscope").is_none());
    }

    #[test]
    fn path_dependencies_leaving_the_workspace_become_absolute() {
        let (text, _) = edit(
            "[workspace]\n[dependencies]\ninner = { path = \"../lib\" }\nouter = { path = \"../../elsewhere/x\" }\n",
            false,
        );
        let doc: DocumentMut = text.parse().unwrap();
        assert_eq!(
            doc["dependencies"]["inner"]["path"].as_str(),
            Some("../lib")
        );
        assert_eq!(
            doc["dependencies"]["outer"]["path"].as_str(),
            Some("/elsewhere/x")
        );
    }

    #[test]
    fn a_recorded_rewrite_is_found_again_only_for_the_same_inputs_and_with_its_modules() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = dir.path().join("copy");
        let module = dir.path().join("install/memscope.rs");
        fs::create_dir_all(module.parent().unwrap()).unwrap();
        fs::write(&module, "").unwrap();
        let inputs = |files: &str| Inputs(vec!["workspace".into(), files.into()]);
        let recorded = Done {
            inputs: inputs("a.rs 10"),
            installed: vec![module.clone()],
            rewrite: Rewrite {
                wrapped: vec![PathBuf::from("/ws/src/main.rs")],
                instrumented: BTreeMap::from([(PathBuf::from("/ws/src/lib.rs"), 2)]),
            },
        }
        .record(&scratch)
        .unwrap();

        let found = Done::read(&scratch, &inputs("a.rs 10")).unwrap();
        assert_eq!(
            (found.wrapped, found.instrumented),
            (recorded.wrapped, recorded.instrumented)
        );
        assert!(Done::read(&scratch, &inputs("a.rs 11")).is_none());
        fs::remove_file(&module).unwrap();
        assert!(Done::read(&scratch, &inputs("a.rs 10")).is_none());
        fs::write(&module, "").unwrap();
        Done::forget(&scratch).unwrap();
        assert!(Done::read(&scratch, &inputs("a.rs 10")).is_none());
        Done::forget(&scratch).unwrap();
    }

    pub(super) fn allocators_in(text: &str) -> Vec<FoundAllocator> {
        let mut found = Vec::new();
        let mut visitor = AllocatorVisitor {
            file: Path::new("/ws/src/main.rs"),
            found: &mut found,
        };
        syn::visit::Visit::visit_file(&mut visitor, &syn::parse_file(text).unwrap());
        found
    }

    #[test]
    fn allocator_wrapping_and_instrumentation_share_a_file_and_keep_its_lines() {
        let text =
            "#[global_allocator] static A: System = System; fn main() {\n    let v = vec![1];\n}\n";
        let found = allocators_in(text);
        let mut edits: Vec<Edit> = allocator_edits(text, &found[0], "memscope").into();
        edits.push(Edit {
            from: (1, 47),
            to: (1, 47),
            text: annotate::ATTRIBUTE.to_owned(),
        });

        let out = apply_edits(text, edits);

        assert_eq!(out.lines().count(), 3);
        assert!(out.starts_with("                    static A: System = System; #[global_allocator] static __MEMSCOPE_ALLOC"), "{out}");
        assert!(out.ends_with("::memscope::Alloc::new(::memscope::ByRef(&A)); #[::memscope::instrument] fn main() {\n    let v = vec![1];\n}\n"), "{out}");
        syn::parse_file(&out).unwrap();
    }

    #[test]
    fn allocator_is_wrapped_on_the_same_lines() {
        let text = "use std::alloc::System;\n\n#[global_allocator]\nstatic GLOBAL: Counting<System> = Counting::new(System);\n\nfn main() {}\n";
        let found = allocators_in(text);
        assert_eq!(found.len(), 1);

        let wrapped = apply_edits(text, allocator_edits(text, &found[0], "memscope").into());

        assert_eq!(
            wrapped,
            "use std::alloc::System;\n\n                   \nstatic GLOBAL: Counting<System> = Counting::new(System); \
             #[global_allocator] static __MEMSCOPE_ALLOC: ::memscope::Alloc<::memscope::ByRef<Counting < System >>> = \
             ::memscope::Alloc::new(::memscope::ByRef(&GLOBAL));\n\nfn main() {}\n"
        );
        syn::parse_file(&wrapped).unwrap();
    }
}

#[cfg(test)]
mod cfg_tests {
    use super::tests::allocators_in;
    use super::*;

    #[test]
    fn a_cfg_gated_allocator_is_wrapped_under_the_same_cfg() {
        let text = "#[cfg(feature = \"dhat\")]\n#[global_allocator]\nstatic ALLOC: dhat::Alloc = dhat::Alloc;\nfn main() {}\n";
        let found = allocators_in(text);
        assert_eq!(found[0].cfg.as_deref(), Some("all(feature = \"dhat\")"));
        let wrapped = apply_edits(text, allocator_edits(text, &found[0], "memscope").into());
        assert!(
            wrapped.contains(
                " #[cfg(all(feature = \"dhat\"))] #[global_allocator] static __MEMSCOPE_ALLOC"
            ),
            "{wrapped}"
        );
        syn::parse_file(&wrapped).unwrap();
    }
}
