//! Return addresses → functions, files and lines, and what frames' names tell.
//!
//! The only module that uses `addr2line` and `rustc-demangle`. Each `Module` record of
//! a trace says where an object file was mapped; a return address `r` inside it is
//! looked up at `r - 1 - bias` (the call instruction, in the file's own addresses) in
//! its DWARF line tables, inlined frames expanded innermost first, and falls back to
//! the symbol table when there is no DWARF. Rust names are demangled without their
//! hash suffix. Results are cached per address, per address in its object file for
//! the other processes an analysing thread reads, and between runs for object files
//! with a build id (`symcache.rs`); object files are loaded on first need.
//!
//! On top of that, decisions made by frame name: which frames are the allocator's
//! plumbing (trimmed from the top of every stack), which frame is an allocation's
//! *site*, and which stacks are the standard library's own bookkeeping.

use std::cell::{OnceCell, RefCell};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::symcache::{ObjectCache, RawFrame};
use crate::trace::Module;

/// A string of a frame, shared: the frames at many return addresses name the same
/// function or file.
pub type Name = std::sync::Arc<str>;

/// One frame of a symbolized stack; inlined calls are frames of their own.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Frame {
    /// The return address, as `0x…` (the same for all frames inlined at it).
    pub address: Name,
    /// Demangled function name, without hash suffix.
    pub function: Option<Name>,
    /// Source file, after the report's path map.
    pub file: Option<Name>,
    pub line: Option<u32>,
    /// This call was inlined into the next frame.
    pub inlined: bool,
}

impl AsRef<Frame> for Frame {
    fn as_ref(&self) -> &Frame {
        self
    }
}

/// Whether an object file could be symbolized, for the report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleStatus {
    pub path: String,
    /// The program's executable (the first module the trace lists).
    pub executable: bool,
    /// `"symbolized"`, `"no_debug_info"` (function names only, from the symbol
    /// table), or `"unreadable"` (the file is gone or is not an object file).
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The object files opened for symbolization, kept across the traces that one thread
/// analyses: a test suite's processes load the same few files (under nextest, one
/// process per test), and reading an object's debug information is most of the cost.
/// With a cache directory, what was found is also kept between runs (`symcache.rs`),
/// and an object file is only opened for addresses no earlier run looked up.
#[derive(Default)]
pub struct Loaders {
    loaded: RefCell<FxHashMap<String, Rc<Loaded>>>,
    cache_dir: Option<PathBuf>,
    /// The [`Facts`] of each function and file seen, for the report's user roots: a
    /// suite's binaries share std's and libtest's functions, at other addresses.
    facts: RefCell<FxHashMap<FunctionAndFile, Facts>>,
}

/// A frame's function and file, what its [`Facts`] depend on.
type FunctionAndFile = (Option<Name>, Option<Name>);

/// An object file: its loader (opened on first need) and whether it has DWARF line
/// tables, or why it could not be opened; and the frames found so far, by address in
/// the file (every process that loads the file shares them, wherever it was mapped).
struct Loaded {
    path: String,
    loader: OnceCell<Result<addr2line::Loader, String>>,
    /// What earlier runs found in this very file, and what this one adds.
    cache: RefCell<Option<ObjectCache>>,
    frames: RefCell<FxHashMap<u64, Rc<[Frame]>>>,
    /// The frames' [`Facts`] by address in the file, for the report's user roots (the
    /// same for every process of one report).
    facts: RefCell<FxHashMap<u64, Rc<[Facts]>>>,
}

impl Loaders {
    /// Loaders that keep what they find in `cache_dir` between runs.
    pub fn cached(cache_dir: Option<PathBuf>) -> Loaders {
        Loaders {
            loaded: RefCell::default(),
            cache_dir,
            facts: RefCell::default(),
        }
    }

    /// [`Facts::of`] `frame`, found once per function and file.
    fn facts_of(&self, frame: &Frame, user_roots: &[PathBuf]) -> Facts {
        let key = (frame.function.clone(), frame.file.clone());
        *self
            .facts
            .borrow_mut()
            .entry(key)
            .or_insert_with(|| Facts::of(frame, user_roots))
    }

    fn get(&self, path: &str) -> Rc<Loaded> {
        if let Some(loaded) = self.loaded.borrow().get(path) {
            return loaded.clone();
        }
        let cache = self
            .cache_dir
            .as_deref()
            .and_then(|dir| ObjectCache::open(dir, Path::new(path)));
        let loaded = Rc::new(Loaded {
            path: path.to_owned(),
            loader: OnceCell::new(),
            cache: RefCell::new(cache),
            frames: RefCell::default(),
            facts: RefCell::default(),
        });
        self.loaded
            .borrow_mut()
            .insert(path.to_owned(), loaded.clone());
        loaded
    }
}

impl Drop for Loaders {
    /// Keeps what this thread found for the next run.
    fn drop(&mut self) {
        for loaded in self.loaded.borrow().values() {
            if let Some(cache) = loaded.cache.borrow().as_ref() {
                cache.save();
            }
        }
    }
}

fn has_line_tables(loader: &addr2line::Loader) -> bool {
    loader.get_section_range(b".debug_line").is_some()
}

impl Loaded {
    fn loader(&self) -> &Result<addr2line::Loader, String> {
        self.loader.get_or_init(|| {
            let loader = addr2line::Loader::new(&self.path).map_err(|e| e.to_string());
            if let (Ok(l), Some(cache)) = (&loader, self.cache.borrow_mut().as_mut()) {
                cache.set_has_dwarf(has_line_tables(l));
            }
            loader
        })
    }

    /// Whether the file has DWARF line tables, or why it could not be opened: from an
    /// earlier run when it knows, else from the file.
    fn status(&self) -> Result<bool, String> {
        if self.loader.get().is_none() {
            if let Some(known) = self
                .cache
                .borrow()
                .as_ref()
                .and_then(ObjectCache::has_dwarf)
            {
                return Ok(known);
            }
        }
        match self.loader() {
            Ok(l) => Ok(has_line_tables(l)),
            Err(e) => Err(e.clone()),
        }
    }

    /// The frames at `probe` as the file names them: from the cache, or looked up (and
    /// then cached); `None` when the file cannot be opened.
    fn raw_frames(&self, probe: u64) -> Option<Rc<[RawFrame]>> {
        if let Some(known) = self.cache.borrow().as_ref().and_then(|c| c.get(probe)) {
            return Some(known);
        }
        let Ok(loader) = self.loader() else {
            return None;
        };
        let mut out = Vec::new();
        if let Ok(mut iter) = loader.find_frames(probe) {
            while let Ok(Some(frame)) = iter.next() {
                let function = frame
                    .function
                    .as_ref()
                    .and_then(|f| f.raw_name().ok())
                    .map(|n| Name::from(demangle(&n)));
                let (file, line) = match &frame.location {
                    Some(loc) => (loc.file.map(Name::from), loc.line),
                    None => (None, None),
                };
                out.push(RawFrame {
                    function,
                    file,
                    line,
                    inlined: true,
                });
            }
        }
        // DWARF may name functions by their short name only (`on_alloc`); the
        // symbol table has the full path of the outermost one.
        let symbol = loader.find_symbol(probe).map(|n| Name::from(demangle(n)));
        match out.last_mut() {
            Some(outer) => {
                outer.inlined = false;
                if symbol.is_some() {
                    outer.function = symbol;
                }
            }
            None => out.push(RawFrame {
                function: symbol,
                file: None,
                line: None,
                inlined: false,
            }),
        }
        let out: Rc<[RawFrame]> = out.into();
        if let Some(cache) = self.cache.borrow_mut().as_mut() {
            cache.insert(probe, out.clone());
        }
        Some(out)
    }
}

/// Symbolizes addresses of one process.
pub struct Symbolizer<'a> {
    modules: Vec<Object>,
    loaders: &'a Loaders,
    path_map: Vec<(PathBuf, PathBuf)>,
    /// Each compiled file name through `path_map`, once: frames share the result.
    mapped: FxHashMap<Name, Name>,
    /// Every frame symbolized so far, each return address's frames once, innermost
    /// first: stacks are ids into it ([`stack_ids`](Self::stack_ids)).
    table: Vec<Frame>,
    /// Return address → where its frames are in `table` (start, count).
    at: FxHashMap<u64, (u32, u32)>,
    /// The [`Facts`] of the frames at each return address asked of [`stack_facts`](Self::stack_facts).
    facts: FxHashMap<u64, Rc<[Facts]>>,
}

struct Object {
    module: Module,
    /// `None` until first used.
    loaded: Option<Rc<Loaded>>,
}

impl<'a> Symbolizer<'a> {
    pub fn new(
        modules: &[Module],
        path_map: &[(PathBuf, PathBuf)],
        loaders: &'a Loaders,
    ) -> Symbolizer<'a> {
        let mut objects: Vec<Object> = Vec::new();
        for m in modules {
            // The meta stream lists the modules at start and again at exit.
            if !objects.iter().any(|o| o.module == *m) {
                objects.push(Object {
                    module: m.clone(),
                    loaded: None,
                });
            }
        }
        Symbolizer {
            modules: objects,
            loaders,
            path_map: path_map.to_vec(),
            mapped: FxHashMap::default(),
            table: Vec::new(),
            at: FxHashMap::default(),
            facts: FxHashMap::default(),
        }
    }

    /// Symbolizes a stack of return addresses (innermost first) and trims the
    /// allocator's plumbing from its top: the frames as ids into the symbolizer's table
    /// of frames ([`frame`](Self::frame), [`take_table`](Self::take_table)). No frame is
    /// copied: a process's sites share the frames of their return addresses (the
    /// stacks of regex-syntax's 24,600 sites in its report are 1.4 million frames, 6,800
    /// of them distinct).
    pub fn stack_ids(&mut self, addrs: &[u64]) -> Vec<u32> {
        let mut ids = Vec::new();
        for &addr in addrs {
            let (start, count) = self.locate_frames(addr);
            ids.extend(start..start + count);
        }
        let cut = plumbing_len(ids.len(), |i| &self.table[ids[i] as usize]);
        ids.drain(..cut);
        ids
    }

    /// The frame with id `id` (from [`stack_ids`](Self::stack_ids)).
    pub fn frame(&self, id: u32) -> &Frame {
        &self.table[id as usize]
    }

    /// Every frame symbolized, by id; the symbolizer keeps none of them.
    pub fn take_table(&mut self) -> Vec<Frame> {
        self.at.clear();
        std::mem::take(&mut self.table)
    }

    /// [`stack_ids`](Self::stack_ids) as frames.
    #[cfg(test)]
    pub fn stack(&mut self, addrs: &[u64]) -> Vec<Frame> {
        let ids = self.stack_ids(addrs);
        ids.iter().map(|&i| self.frame(i).clone()).collect()
    }

    /// The [`Facts`] of the frames of [`stack_ids`](Self::stack_ids)`(addrs)`, into `out`:
    /// what classifying a stack needs, without building it.
    pub fn stack_facts(&mut self, addrs: &[u64], user_roots: &[PathBuf], out: &mut Vec<Facts>) {
        out.clear();
        for &addr in addrs {
            if let Some(facts) = self.facts.get(&addr) {
                out.extend_from_slice(facts);
                continue;
            }
            // Another process that loaded the same object file may have asked already.
            let place = self.locate(addr);
            let known = place
                .as_ref()
                .and_then(|(loaded, probe)| loaded.facts.borrow().get(probe).cloned());
            if let Some(facts) = known {
                out.extend_from_slice(&facts);
                self.facts.insert(addr, facts);
                continue;
            }
            let (start, count) = self.locate_frames(addr);
            let frames = &self.table[start as usize..(start + count) as usize];
            // A frame inlined into plumbing is plumbing too (see `plumbing_len`).
            let outer = frames.iter().find(|f| !f.inlined);
            let inlined_into_plumbing = outer.is_some_and(is_plumbing_frame);
            let facts: Rc<[Facts]> = frames
                .iter()
                .map(|f| {
                    let mut facts = self.loaders.facts_of(f, user_roots);
                    if inlined_into_plumbing {
                        facts.0 |= Facts::PLUMBING;
                    }
                    facts
                })
                .collect();
            out.extend_from_slice(&facts);
            if let Some((loaded, probe)) = place {
                loaded.facts.borrow_mut().insert(probe, facts.clone());
            }
            self.facts.insert(addr, facts);
        }
        let cut = leading_plumbing(
            out.iter()
                .map(|f| (f.has(Facts::PLUMBING), f.has(Facts::FUNCTION))),
        );
        out.drain(..cut);
    }

    /// Where the frames at one return address are in the table (start, count),
    /// innermost (most inlined) first; looked up the first time.
    fn locate_frames(&mut self, addr: u64) -> (u32, u32) {
        if let Some(&at) = self.at.get(&addr) {
            return at;
        }
        let frames = self.lookup(addr);
        let at = (self.table.len() as u32, frames.len() as u32);
        self.table.extend(frames);
        self.at.insert(addr, at);
        at
    }

    fn lookup(&mut self, addr: u64) -> Vec<Frame> {
        let address: Name = format!("{addr:#x}").into();
        let bare = || {
            vec![Frame {
                address: address.clone(),
                function: None,
                file: None,
                line: None,
                inlined: false,
            }]
        };
        let Some((loaded, probe)) = self.locate(addr) else {
            return bare();
        };
        if let Some(known) = loaded.frames.borrow().get(&probe) {
            let at = |f: &Frame| Frame {
                address: address.clone(),
                ..f.clone()
            };
            return known.iter().map(at).collect();
        }
        let Some(raw) = loaded.raw_frames(probe) else {
            return bare();
        };
        let (path_map, mapped) = (&self.path_map, &mut self.mapped);
        let out: Vec<Frame> = raw
            .iter()
            .map(|f| Frame {
                address: address.clone(),
                function: f.function.clone(),
                file: f.file.as_ref().map(|file| {
                    mapped
                        .entry(file.clone())
                        .or_insert_with(|| map_path(path_map, file).into())
                        .clone()
                }),
                line: f.line,
                inlined: f.inlined,
            })
            .collect();
        loaded
            .frames
            .borrow_mut()
            .insert(probe, out.as_slice().into());
        out
    }

    /// The object file a return address is in, loaded, and the address to look up in
    /// it (the call instruction's, in the file's own addresses).
    fn locate(&mut self, addr: u64) -> Option<(Rc<Loaded>, u64)> {
        let pc = addr.saturating_sub(1);
        let object = self
            .modules
            .iter_mut()
            .find(|o| o.module.start <= pc && pc < o.module.end)?;
        let probe = pc.wrapping_sub(object.module.bias);
        let loaded = object
            .loaded
            .get_or_insert_with(|| self.loaders.get(&object.module.path))
            .clone();
        Some((loaded, probe))
    }

    /// Where a return address is in its object file (`path+0xoffset`): the same in
    /// every process that loaded the file, wherever ASLR put it; `None` outside every
    /// module.
    pub fn file_offset(&self, addr: u64) -> Option<String> {
        let pc = addr.saturating_sub(1);
        let object = self
            .modules
            .iter()
            .find(|o| o.module.start <= pc && pc < o.module.end)?;
        Some(format!(
            "{}+{:#x}",
            object.module.path,
            addr.wrapping_sub(object.module.bias)
        ))
    }

    /// What could be symbolized, per object file that was needed.
    pub fn status(&self) -> Vec<ModuleStatus> {
        self.modules
            .iter()
            .enumerate()
            .filter_map(|(i, o)| {
                let loaded = o.loaded.as_ref()?;
                let (status, detail) = match loaded.status() {
                    Ok(true) => ("symbolized", None),
                    Ok(false) => (
                        "no_debug_info",
                        Some("no DWARF line tables: function names only".into()),
                    ),
                    Err(e) => ("unreadable", Some(e)),
                };
                Some(ModuleStatus {
                    path: o.module.path.clone(),
                    executable: i == 0,
                    status: status.into(),
                    detail,
                })
            })
            .collect()
    }
}

fn demangle(raw: &str) -> String {
    format!("{:#}", rustc_demangle::demangle(raw))
}

/// Rewrites a compiled path through the first matching prefix of `path_map`.
pub fn map_path(path_map: &[(PathBuf, PathBuf)], file: &str) -> String {
    let path = Path::new(file);
    for (from, to) in path_map {
        if let Ok(rest) = path.strip_prefix(from) {
            return to.join(rest).to_string_lossy().into_owned();
        }
    }
    file.to_owned()
}

/// Frames of the allocator's plumbing: memscope's hook, the `#[global_allocator]`
/// shims and `alloc::alloc`'s wrappers around them.
fn is_plumbing(function: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "memscope::",
        "<memscope::",
        "__rust_alloc",
        "__rust_dealloc",
        "__rust_realloc",
        "__rustc::__rust_",
        "__rdl_",
        "__rg_",
        "alloc::alloc::",
        "<alloc::alloc::Global",
        "std::alloc::",
        "<std::alloc::System",
    ];
    PREFIXES.iter().any(|p| function.starts_with(p))
}

/// A file of memscope's runtime: inlined into the allocator shim, its frames carry
/// short DWARF names (`on_alloc`, `with_record<…>`), so they are told by their file:
/// the embedded copy `cargo memscope` maps to `<memscope-runtime>`, a path checkout,
/// or a registry copy (`memscope-runtime-0.1.0/src/…`).
fn is_runtime_source(file: &str) -> bool {
    file.starts_with("<memscope-runtime>")
        || file.contains("/memscope-runtime/src/")
        || (file.contains("/memscope-runtime-") && file.contains("/src/"))
}

/// A function's path without generic arguments: `<a::B<c::D>>::f::<E>` → `a::B::f::`.
/// The type of a qualified path (`<a::B as T>::f`) is kept, its generics are not.
#[cfg(test)]
fn function_path(function: &str) -> String {
    path_chars(function).collect()
}

/// Whether `function_path(function)` starts with `prefix`, without building the path
/// (every frame of every site is asked several times).
fn path_starts_with(function: &str, prefix: &str) -> bool {
    let mut path = path_chars(function);
    prefix.chars().all(|c| path.next() == Some(c))
}

/// Whether `function_path(function)` is `path`, up to the `::` its generic arguments
/// leave at its end.
fn path_is(function: &str, path: &str) -> bool {
    let mut chars = path_chars(function);
    path.chars().all(|c| chars.next() == Some(c)) && chars.all(|c| c == ':')
}

/// The characters of [`function_path`], as they are found.
fn path_chars(function: &str) -> impl Iterator<Item = char> + '_ {
    let keep = usize::from(function.starts_with('<'));
    let mut depth = 0usize;
    let mut prev = ' ';
    function.chars().filter_map(move |c| {
        let kept = match c {
            '<' => {
                depth += 1;
                None
            }
            '>' if prev != '-' => {
                depth = depth.saturating_sub(1);
                None
            }
            _ if depth <= keep => Some(c),
            _ => None,
        };
        prev = c;
        kept
    })
}

/// How many frames at the top of a stack are plumbing: up to the last plumbing frame
/// of the leading run of plumbing and unknown frames. A frame inlined into a plumbing
/// function is plumbing too (its DWARF name may be too short to tell).
/// `frame(i)` is the stack's frame `i`, for `i < len`.
fn plumbing_len<'f>(len: usize, at: impl Fn(usize) -> &'f Frame) -> usize {
    leading_plumbing((0..len).map(|i| {
        let frame = at(i);
        let outer = (i..len)
            .map(&at)
            .find(|f| !f.inlined && f.address == frame.address);
        let plumbing = is_plumbing_frame(frame) || outer.is_some_and(is_plumbing_frame);
        (plumbing, frame.function.is_some())
    }))
}

/// [`plumbing_len`] of frames given as `(plumbing or inlined into plumbing, named)`.
fn leading_plumbing(frames: impl Iterator<Item = (bool, bool)>) -> usize {
    let mut cut = 0;
    for (i, (plumbing, named)) in frames.enumerate() {
        if plumbing {
            cut = i + 1;
        } else if named {
            break;
        }
    }
    cut
}

/// A frame of the allocator's plumbing, by its function or by its file.
fn is_plumbing_frame(frame: &Frame) -> bool {
    frame.function.as_deref().is_some_and(is_plumbing)
        || frame.file.as_deref().is_some_and(|file| {
            file.ends_with("/library/alloc/src/alloc.rs")
                || file.ends_with("/library/std/src/alloc.rs")
                || is_runtime_source(file)
        })
}

/// Functions of Rust's standard library, of memscope, and the C runtime's entry points.
pub fn is_std(frame: &Frame) -> bool {
    const C_RUNTIME: &[&str] = &["main", "_start", "start_thread", "clone", "clone3"];
    if frame
        .function
        .as_deref()
        .is_some_and(|f| C_RUNTIME.contains(&f) || f.starts_with("__libc_start"))
    {
        return true;
    }
    const PREFIXES: &[&str] = &[
        "std::",
        "core::",
        "alloc::",
        "<std::",
        "<core::",
        "<alloc::",
        "memscope::",
        "<memscope::",
    ];
    match (&frame.function, &frame.file) {
        // The standard library's sources, and the crates it vendors (hashbrown, …).
        (_, Some(file)) if file.starts_with("/rustc/") || file.starts_with("/rust/deps/") => true,
        (Some(f), _) => PREFIXES.iter().any(|p| f.starts_with(p)) || f.starts_with("__"),
        (None, _) => false,
    }
}

/// Whether a frame is in the user's own files. memscope's runtime is built from under
/// the workspace's target directory: its frames are never the user's.
fn in_user_root(frame: &Frame, user_roots: &[PathBuf]) -> bool {
    !is_std(frame)
        && frame.file.as_deref().is_some_and(|file| {
            user_roots.iter().any(|r| under(file, r)) && !file.contains("/target/memscope/")
        })
}

/// Whether the file `file` is under `root`, as [`Path::starts_with`] says: by its text
/// where both are written plainly (no `//`, no `.` component), which is most of what
/// the analysis asks, a frame at a time.
fn under(file: &str, root: &Path) -> bool {
    let plain = |p: &str| !p.contains("//") && !p.contains("/./") && !p.ends_with("/.");
    match root.to_str() {
        Some(root) if plain(file) && plain(root) && !file.starts_with("./") => {
            let root = root.strip_suffix('/').unwrap_or(root);
            file.strip_prefix(root)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
        }
        _ => Path::new(file).starts_with(root),
    }
}

/// Where a site frame was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SiteOrigin {
    /// In a file under one of the user's roots.
    User,
    /// The first frame outside the standard library (a dependency, usually).
    Library,
    /// Only frames of the Rust distribution: the innermost function of libtest
    /// (`test::`), else of `std::`.
    Std,
    /// No frame has a name.
    Unknown,
}

/// The frame that names an allocation's site: the innermost frame in the user's own
/// files, or else the innermost frame outside the standard library (neither of them
/// the `main` rustc generates for a test binary).
pub fn site_frame<F: AsRef<Frame>>(
    frames: &[F],
    user_roots: &[PathBuf],
) -> (Option<usize>, SiteOrigin) {
    let at = |i: usize| frames[i].as_ref();
    if let Some(i) = (0..frames.len())
        .find(|&i| in_user_root(at(i), user_roots) && !generated_test_main(frames, i))
    {
        return (Some(i), SiteOrigin::User);
    }
    if let Some(i) = (0..frames.len())
        .find(|&i| at(i).function.is_some() && !is_std(at(i)) && !generated_test_main(frames, i))
    {
        return (Some(i), SiteOrigin::Library);
    }
    // libtest's frames say more of what its own allocations are for than the std
    // collections it calls.
    let in_crate = |krate: &'static str| {
        move |f: &F| {
            f.as_ref().function.as_deref().is_some_and(|n| {
                n.strip_prefix('<')
                    .unwrap_or(n)
                    .strip_prefix(krate)
                    .is_some_and(|rest| rest.starts_with("::"))
            })
        }
    };
    match (frames.iter().position(in_crate("test")))
        .or_else(|| frames.iter().position(in_crate("std")))
    {
        Some(i) => (Some(i), SiteOrigin::Std),
        None => (None, SiteOrigin::Unknown),
    }
}

/// Whether `frames[i]` is the `main` rustc generates for a test binary: it sits in the
/// crate's root file (line 1), so among the user's files, but all it does is call
/// libtest, whose own allocations are not the user's code's.
fn generated_test_main<F: AsRef<Frame>>(frames: &[F], i: usize) -> bool {
    let named = |f: &F, p: fn(&str) -> bool| f.as_ref().function.as_deref().is_some_and(p);
    i > 0
        && named(&frames[i], |f| {
            f.ends_with("::main") && f.matches("::").count() == 1
        })
        && named(&frames[i - 1], |f| f.starts_with("test::test_main_static"))
}

/// If a stack is the standard library keeping memory for itself until exit, the
/// evidence for that: the frame that shows it. Decided by function path (generic
/// arguments removed, so that a user's `BufReader<StdinLock>` is not std's), in this
/// order (see [`bookkeeping_rule`]):
/// - the debug information std caches the first time it symbolizes a backtrace (a
///   panic with `RUST_BACKTRACE` set, `Backtrace::force_capture`): the allocation
///   comes from `std::backtrace_rs::symbolize` itself, with between it and that frame
///   only the symbolizer's code, the crates std vendors for it (gimli, addr2line,
///   object, …), `core` and `alloc` (see [`symbolizer_plumbing`]), so that what a
///   caller's callback allocates while symbols are resolved (the names kept in a
///   `std::backtrace::Backtrace`, say) is not taken for the cache;
/// - a spawned thread's start-up state, while the thread runs: see
///   [`spawned_thread_state`];
/// - std's own handles and lists, named in [`named_bookkeeping`];
/// - libtest's own state (see [`libtest_own`]), which it does not free when it
///   ends the process with `process::exit` after a failed test: its arguments;
/// - anything std allocates while starting or shutting down the process: under
///   `std::rt::lang_start_internal` but not under the user's `main` (which runs inside
///   `__rust_begin_short_backtrace`).
pub fn std_bookkeeping<F: AsRef<Frame>>(frames: &[F], user_roots: &[PathBuf]) -> Option<String> {
    let facts: Vec<Facts> = frames
        .iter()
        .map(|f| Facts::of(f.as_ref(), user_roots))
        .collect();
    let (at, rule) = bookkeeping_rule(&facts)?;
    let f = frames[at].as_ref().function.as_deref().unwrap_or_default();
    Some(match rule {
        Bookkeeping::BacktraceCache => format!(
            "allocated under `{f}`: std's cache of debug information for symbolizing backtraces, kept until exit"
        ),
        Bookkeeping::SpawnedThread => {
            format!("allocated by `{f}`: {}", spawned_thread_state(f).unwrap_or_default())
        }
        Bookkeeping::Named => {
            format!("allocated under `{f}`: {}", named_bookkeeping(f).unwrap_or_default())
        }
        Bookkeeping::Libtest => format!(
            "allocated by libtest's harness under `{f}`, not by a test: libtest's own state (its arguments, its list of tests), kept when it ends the process with `process::exit` after a failed test"
        ),
        Bookkeeping::RuntimeSetup => {
            let by = match site_frame(frames, user_roots) {
                (Some(i), _) => frames[i]
                    .as_ref()
                    .function
                    .as_deref()
                    .map(|f| format!(" by `{f}`")),
                (None, _) => None,
            };
            let by = by.unwrap_or_default();
            format!("allocated{by} under `{f}`, outside the program's `main`: std's runtime set-up")
        }
    })
}

/// [`libtest_own`] of a stack's frames.
#[cfg(test)]
fn libtest_harness(frames: &[Frame]) -> bool {
    let facts: Vec<Facts> = frames.iter().map(|f| Facts::of(f, &[])).collect();
    libtest_own(&facts).is_some()
}

/// Whether a stack is libtest's harness at work ([`libtest_own`]) and whether
/// [`std_bookkeeping`] finds evidence (libtest's own work is one of its rules), for a
/// stack given as the [`Facts`] of its frames ([`Symbolizer::stack_facts`]).
pub fn harness_and_bookkeeping(facts: &[Facts]) -> (bool, bool) {
    (
        libtest_own(facts).is_some(),
        bookkeeping_rule(facts).is_some(),
    )
}

/// What the rules of [`std_bookkeeping`] and [`libtest_own`] ask of one frame,
/// answered once per frame: a suite's stacks share most of their frames, and every
/// stack a test allocates with is classified ([`Symbolizer::stack_facts`] keeps them
/// per return address).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Facts(u16);

impl Facts {
    const FUNCTION: u16 = 1;
    /// Allocator plumbing (see [`is_plumbing_frame`]), or inlined into it.
    const PLUMBING: u16 = 1 << 1;
    const SYMBOLIZER: u16 = 1 << 2;
    const SYMBOLIZER_PLUMBING: u16 = 1 << 3;
    const CORE_OR_ALLOC: u16 = 1 << 4;
    const SPAWNED_THREAD: u16 = 1 << 5;
    const NAMED: u16 = 1 << 6;
    const LIBTEST: u16 = 1 << 7;
    const RUNS_A_TEST: u16 = 1 << 8;
    const LANG_START: u16 = 1 << 9;
    const IN_MAIN: u16 = 1 << 10;
    const USER: u16 = 1 << 11;

    fn of(frame: &Frame, user_roots: &[PathBuf]) -> Facts {
        let mut bits = 0;
        let mut set = |bit: u16, on: bool| {
            if on {
                bits |= bit;
            }
        };
        set(Facts::PLUMBING, is_plumbing_frame(frame));
        set(Facts::SYMBOLIZER_PLUMBING, symbolizer_plumbing(frame));
        set(Facts::CORE_OR_ALLOC, core_or_alloc(frame));
        set(Facts::USER, in_user_root(frame, user_roots));
        if let Some(f) = frame.function.as_deref() {
            set(Facts::FUNCTION, true);
            set(
                Facts::SYMBOLIZER,
                path_starts_with(f, "std::backtrace_rs::symbolize::"),
            );
            set(Facts::SPAWNED_THREAD, spawned_thread_state(f).is_some());
            set(Facts::NAMED, named_bookkeeping(f).is_some());
            set(Facts::LIBTEST, path_starts_with(f, "test::"));
            set(
                Facts::RUNS_A_TEST,
                path_starts_with(f, "test::__rust_begin_short_backtrace"),
            );
            set(
                Facts::LANG_START,
                f.starts_with("std::rt::lang_start_internal"),
            );
            set(Facts::IN_MAIN, f.contains("__rust_begin_short_backtrace"));
        }
        Facts(bits)
    }

    fn has(self, bit: u16) -> bool {
        self.0 & bit != 0
    }
}

/// Which rule of [`std_bookkeeping`] a stack meets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bookkeeping {
    BacktraceCache,
    SpawnedThread,
    Named,
    Libtest,
    RuntimeSetup,
}

/// The first rule of [`std_bookkeeping`] that a stack meets, and the frame that
/// shows it.
fn bookkeeping_rule(facts: &[Facts]) -> Option<(usize, Bookkeeping)> {
    // The backtrace cache: the first named frame that is either the symbolizer or
    // not its plumbing decides.
    let named = |i: &usize| facts[*i].has(Facts::FUNCTION);
    let mut functions = (0..facts.len()).filter(named);
    let cache = functions
        .find(|&i| facts[i].has(Facts::SYMBOLIZER) || !facts[i].has(Facts::SYMBOLIZER_PLUMBING))
        .filter(|&i| facts[i].has(Facts::SYMBOLIZER));
    if let Some(i) = cache {
        return Some((i, Bookkeeping::BacktraceCache));
    }
    let spawned = facts
        .iter()
        .position(|f| !f.has(Facts::CORE_OR_ALLOC))
        .filter(|&i| facts[i].has(Facts::SPAWNED_THREAD));
    if let Some(i) = spawned {
        return Some((i, Bookkeeping::SpawnedThread));
    }
    if let Some(i) = facts.iter().position(|f| f.has(Facts::NAMED)) {
        return Some((i, Bookkeeping::Named));
    }
    if let Some(i) = libtest_own(facts) {
        return Some((i, Bookkeeping::Libtest));
    }
    let in_main = facts
        .iter()
        .any(|f| f.has(Facts::IN_MAIN) || f.has(Facts::USER));
    match facts.iter().position(|f| f.has(Facts::LANG_START)) {
        Some(i) if !in_main => Some((i, Bookkeeping::RuntimeSetup)),
        _ => None,
    }
}

/// Whether a stack is libtest's harness at work rather than a test, and its innermost
/// libtest frame: the innermost frame of libtest (the crate `test`) is one of its own
/// functions, not `test::__rust_begin_short_backtrace`, which calls the test function.
/// So the block that captures a test's output and the blocks of the channel that
/// reports its result are the harness's, even on the test's own thread.
fn libtest_own(facts: &[Facts]) -> Option<usize> {
    facts
        .iter()
        .position(|f| f.has(Facts::LIBTEST))
        .filter(|&i| !facts[i].has(Facts::RUNS_A_TEST))
}

/// Where std keeps memory for itself until exit, by function path: what it is.
/// - the lazily created standard I/O handles (stdin's buffer, stdout's line buffer):
///   inside `std::io::stdio::{stdin,stdout,stderr}`;
/// - the list of thread-local destructors: `std::sys::thread_local::destructors`,
///   `std::sys::thread_local::guard`, or a `register_dtor` function;
/// - the current thread's handle and name: `std::thread::current`;
/// - the stack-overflow handler's per-thread information:
///   `std::sys::pal::unix::stack_overflow`;
/// - thread spawn hooks (`std::thread::spawnhook`), which libtest's harness adds.
fn named_bookkeeping(function: &str) -> Option<&'static str> {
    const PREFIXES: &[(&str, &str)] = &[
        (
            "std::io::stdio::stdin::",
            "std's stdin buffer, kept until exit",
        ),
        (
            "std::io::stdio::stdout::",
            "std's stdout buffer, kept until exit",
        ),
        (
            "std::io::stdio::stderr::",
            "std's stderr handle, kept until exit",
        ),
        (
            "std::sys::thread_local::destructors::",
            "std's list of thread-local destructors",
        ),
        (
            "std::sys::thread_local::guard::",
            "std's thread-local destructor guard",
        ),
        (
            "std::thread::current::",
            "std's handle for the current thread",
        ),
        (
            "std::sys::pal::unix::stack_overflow::",
            "std's stack-overflow handler information",
        ),
        (
            // libtest's `test_main` registers one (to capture spawned threads' output)
            // in the main thread's thread-local list, which is never dropped.
            "std::thread::spawnhook::",
            "a thread spawn hook, kept in the main thread's list until exit",
        ),
    ];
    let found = PREFIXES
        .iter()
        .find(|(prefix, _)| path_starts_with(function, prefix));
    match found {
        Some((_, what)) => Some(what),
        None if function.contains("register_dtor") => {
            Some("std's list of thread-local destructors")
        }
        None => None,
    }
}

/// A spawned thread's start-up state, which the spawning thread allocates and the
/// thread keeps until it ends: std's result packet and boxed main closure (allocated
/// directly by `spawn_unchecked`), and libtest's buffer for a test's captured output,
/// shared with every thread the test spawns (allocated directly by
/// `run_test_in_process`). Live at exit, the thread was still running (serde_json's
/// suite leaves a server thread blocked in `accept`): what valgrind calls reachable
/// from that thread. Decided by the innermost frame outside `core` and `alloc`, so
/// that what the thread itself allocates (under `spawn_unchecked`'s closures) is not.
fn spawned_thread_state(function: &str) -> Option<&'static str> {
    let is = |path| path_is(function, path);
    if is("std::thread::lifecycle::spawn_unchecked") || is("std::thread::Builder::spawn_unchecked_")
    {
        Some("std's state for a spawned thread (result packet, closure), kept until the thread ends; live at exit while the thread still runs")
    } else if is("test::run_test_in_process") {
        Some("libtest's buffer for a test's captured output, kept until the threads the test spawned end; live at exit while one still runs")
    } else {
        None
    }
}

fn core_or_alloc(frame: &Frame) -> bool {
    match (frame.file.as_deref(), frame.function.as_deref()) {
        (Some(file), _) => {
            file.starts_with("/rustc/")
                && (file.contains("/library/core/") || file.contains("/library/alloc/"))
        }
        (None, Some(f)) => path_starts_with(f, "core::") || path_starts_with(f, "alloc::"),
        (None, None) => false,
    }
}

/// A frame of `core`, `alloc`, std's vendored backtrace code or the crates vendored
/// with it: by file where the frame has one, else by function path.
fn symbolizer_plumbing(frame: &Frame) -> bool {
    if let Some(file) = frame.file.as_deref() {
        let library = |part: &str| file.starts_with("/rustc/") && file.contains(part);
        return library("/library/core/")
            || library("/library/alloc/")
            || library("/../../backtrace/src/")
            || file.starts_with("/rust/deps/");
    }
    const CRATES: &[&str] = &[
        "alloc::",
        "core::",
        "gimli::",
        "addr2line::",
        "object::",
        "miniz_oxide::",
        "rustc_demangle::",
        "memchr::",
        "hashbrown::",
    ];
    let function = frame.function.as_deref().unwrap_or_default();
    CRATES.iter().any(|c| path_starts_with(function, c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: &str, file: &str) -> Frame {
        Frame {
            address: "0x1".into(),
            function: Some(function.into()),
            file: Some(file.into()),
            line: Some(1),
            inlined: false,
        }
    }

    #[test]
    fn a_file_is_under_a_root_by_its_text_exactly_when_it_is_by_its_components() {
        let roots = ["/ws", "/ws/", "/w", "/", "ws", ".", "/ws/./a", "/ws//a"];
        let files = [
            "/ws/src/lib.rs",
            "/ws",
            "/wsx/src/lib.rs",
            "/w/s.rs",
            "/ws//src/lib.rs",
            "/ws/./src/lib.rs",
            "/ws/a/b.rs",
            "ws/src/lib.rs",
            "./ws/src/lib.rs",
            "src/lib.rs",
            "/ws/src/.",
        ];
        for root in roots {
            for file in files {
                assert_eq!(
                    under(file, Path::new(root)),
                    Path::new(file).starts_with(root),
                    "{file} under {root}"
                );
            }
        }
    }

    #[test]
    fn rust_names_are_demangled_without_their_hash() {
        assert_eq!(
            demangle("_ZN4core3ptr13drop_in_place17h1234567890abcdefE"),
            "core::ptr::drop_in_place"
        );
        assert_eq!(demangle("main"), "main");
    }

    #[test]
    fn allocator_plumbing_is_trimmed_from_the_top_only() {
        let frames = [
            frame("memscope::recorder::record", "/r/memscope/src/recorder.rs"),
            Frame {
                function: None,
                ..frame("", "")
            },
            frame(
                "<memscope::alloc::Alloc<A> as core::alloc::global::GlobalAlloc>::alloc",
                "/r/alloc.rs",
            ),
            frame("__rustc::__rust_alloc", "/r/x.rs"),
            frame(
                "alloc::alloc::exchange_malloc",
                "/rustc/abc/library/alloc/src/alloc.rs",
            ),
            frame("app::make", "/home/u/app/src/main.rs"),
            frame("memscope::__private::scope", "/r/memscope/src/lib.rs"),
            frame("app::main", "/home/u/app/src/main.rs"),
        ];
        assert_eq!(plumbing_len(frames.len(), |i| &frames[i]), 5);
    }

    #[test]
    fn runtime_frames_inlined_into_user_code_are_plumbing_by_their_file() {
        // Release builds inline the whole hook into the allocating function: every
        // frame shares one address and the runtime's carry short DWARF names.
        let inlined = |function: &str, file: &str| Frame {
            inlined: true,
            ..frame(function, file)
        };
        let frames = [
            inlined(
                "with_record<memscope::recorder::on_alloc::{closure_env#0}>",
                "/w/memscope-runtime/src/recorder.rs",
            ),
            inlined("on_alloc", "<memscope-runtime>/src/recorder.rs"),
            inlined(
                "alloc<std::alloc::System>",
                "/reg/memscope-runtime-0.1.0/src/alloc.rs",
            ),
            inlined("__rust_alloc", "/home/u/app/src/main.rs"),
            inlined("alloc", "/rustc/abc/library/alloc/src/alloc.rs"),
            frame("app::main", "/home/u/app/src/main.rs"),
        ];
        assert_eq!(plumbing_len(frames.len(), |i| &frames[i]), 5);
    }

    #[test]
    fn short_named_frames_inlined_into_the_allocator_hook_are_plumbing() {
        let at = |address: &str, function: &str, inlined: bool| Frame {
            address: address.into(),
            inlined,
            ..frame(function, "/x.rs")
        };
        let frames = [
            at("0x10", "on_alloc", true),
            at("0x10", "<memscope::alloc::Alloc<std::alloc::System> as core::alloc::global::GlobalAlloc>::alloc", false),
            at("0x20", "__rustc::__rust_alloc", false),
            at("0x30", "try_allocate_in", true),
            at("0x30", "app::make", false),
        ];
        assert_eq!(plumbing_len(frames.len(), |i| &frames[i]), 3);
    }

    #[test]
    fn the_site_is_the_first_frame_in_the_users_files_else_outside_std() {
        let roots = vec![PathBuf::from("/home/u/app")];
        let frames = vec![
            frame(
                "alloc::raw_vec::finish_grow",
                "/rustc/abc/library/alloc/src/raw_vec.rs",
            ),
            frame(
                "serde_json::de::parse",
                "/home/u/.cargo/registry/src/serde_json/de.rs",
            ),
            frame("app::load", "/home/u/app/src/lib.rs"),
        ];
        assert_eq!(site_frame(&frames, &roots), (Some(2), SiteOrigin::User));
        assert_eq!(site_frame(&frames, &[]), (Some(1), SiteOrigin::Library));
        assert_eq!(
            site_frame(&frames[..1], &roots),
            (None, SiteOrigin::Unknown)
        );
        let init = frame("std::rt::init", "/rustc/abc/library/std/src/rt.rs");
        let c_main = Frame {
            file: None,
            ..frame("main", "")
        };
        let std_only = [frames[0].clone(), init, c_main];
        assert_eq!(site_frame(&std_only, &roots), (Some(1), SiteOrigin::Std));
    }

    #[test]
    fn the_main_rustc_generates_for_tests_and_std_s_vendored_crates_are_not_sites() {
        let roots = vec![PathBuf::from("/home/u/app")];
        let harness = vec![
            frame(
                "hashbrown::raw::alloc::inner::do_alloc",
                "/rust/deps/hashbrown-0.16.1/src/raw/alloc.rs",
            ),
            frame(
                "test::console::run_tests_console",
                "/rustc/abc/library/test/src/console.rs",
            ),
            frame(
                "std::collections::hash::map::HashMap::insert",
                "/rustc/abc/library/std/src/collections/hash/map.rs",
            ),
            frame(
                "test::test_main_static",
                "/rustc/abc/library/test/src/lib.rs",
            ),
            frame("app::main", "/home/u/app/src/lib.rs"),
        ];
        assert_eq!(site_frame(&harness, &roots), (Some(1), SiteOrigin::Std));

        // A user's `main` that calls something else is the user's.
        let mut own = harness.clone();
        own[3] = frame("app::run", "/home/u/app/src/lib.rs");
        assert_eq!(site_frame(&own, &roots), (Some(3), SiteOrigin::User));
    }

    #[test]
    fn paths_are_mapped_through_the_first_matching_prefix() {
        let map = vec![(PathBuf::from("/scratch/ws"), PathBuf::from("/home/u/ws"))];
        assert_eq!(
            map_path(&map, "/scratch/ws/src/main.rs"),
            "/home/u/ws/src/main.rs"
        );
        assert_eq!(map_path(&map, "/rustc/x/lib.rs"), "/rustc/x/lib.rs");
    }

    #[test]
    fn std_runtime_blocks_are_recognised_by_their_stack_and_user_blocks_are_not() {
        let rt = frame(
            "std::rt::lang_start_internal",
            "/rustc/abc/library/std/src/rt.rs",
        );
        let begin = frame(
            "std::sys::backtrace::__rust_begin_short_backtrace",
            "/rustc/abc/library/std/src/sys/backtrace.rs",
        );
        let user = frame("app::main", "/home/u/app/src/main.rs");
        let roots = vec![PathBuf::from("/home/u/app")];
        assert!(std_bookkeeping(std::slice::from_ref(&rt), &roots)
            .unwrap()
            .contains("lang_start_internal"));
        assert_eq!(
            std_bookkeeping(&[user.clone(), begin.clone(), rt.clone()], &roots),
            None
        );
        let stdout = frame(
            "std::io::stdio::stdout::{closure#0}",
            "/rustc/abc/library/std/src/io/stdio.rs",
        );
        assert!(std_bookkeeping(&[stdout, user, begin, rt], &roots)
            .unwrap()
            .contains("stdout buffer"));
    }

    #[test]
    fn a_users_own_reader_of_stdin_is_not_stds_bookkeeping() {
        let roots = vec![PathBuf::from("/home/u/app")];
        let user = frame("app::main", "/home/u/app/src/main.rs");
        let begin = frame(
            "std::sys::backtrace::__rust_begin_short_backtrace",
            "/rustc/abc/library/std/src/sys/backtrace.rs",
        );
        let reader = frame(
            "<std::io::buffered::bufreader::BufReader<std::io::stdio::StdinLock>>::with_capacity",
            "/rustc/abc/library/std/src/io/buffered/bufreader.rs",
        );
        let read_line = frame(
            "<std::io::stdio::Stdin>::read_line",
            "/rustc/abc/library/std/src/io/stdio.rs",
        );
        let users = [reader.clone(), read_line, user.clone(), begin.clone()];
        assert_eq!(std_bookkeeping(&users, &roots), None);
        let init = frame(
            "std::io::stdio::stdin::{closure#0}",
            "/rustc/abc/library/std/src/io/stdio.rs",
        );
        let stds = [reader, init, user, begin];
        assert!(std_bookkeeping(&stds, &roots)
            .unwrap()
            .contains("stdin buffer"));
    }

    #[test]
    fn libtests_own_work_is_told_from_the_test_it_runs() {
        let f = |name: &str| frame(name, "/rustc/x/library/test/src/lib.rs");
        let send = f("<std::sync::mpsc::Sender<test::event::CompletedTest>>::send");
        let harness = f("test::run_test_in_process");
        let begin = f("test::__rust_begin_short_backtrace::<core::result::Result<(), alloc::string::String>, fn() -> core::result::Result<(), alloc::string::String>>");
        let user = frame("my_crate::tests::leaks", "/ws/src/lib.rs");
        let body = [user.clone(), begin.clone(), harness.clone()];
        assert!(!libtest_harness(&body));
        assert!(libtest_harness(&[send, harness.clone(), begin.clone()]));
        // A test that runs libtest's code itself is still the test.
        assert!(!libtest_harness(&[
            frame("alloc::vec::Vec<T>::push", "/rustc/x.rs"),
            user,
            begin
        ]));
        assert!(!libtest_harness(&[frame(
            "my_crate::main",
            "/ws/src/main.rs"
        )]));
    }

    #[test]
    fn libtests_arguments_kept_by_its_exit_after_a_failed_test_are_its_own_not_a_leak() {
        let roots = vec![PathBuf::from("/ws")];
        let libtest = |name: &str| frame(name, "/rustc/x/library/test/src/lib.rs");
        let collect = frame(
            "<std::env::Args as core::iter::traits::iterator::Iterator>::collect::<alloc::vec::Vec<alloc::string::String>>",
            "/rustc/x/library/core/src/iter/traits/iterator.rs",
        );
        let begin = frame(
            "std::sys::backtrace::__rust_begin_short_backtrace",
            "/rustc/x/library/std/src/sys/backtrace.rs",
        );
        let args = [
            collect.clone(),
            libtest("test::test_main_static"),
            begin.clone(),
        ];
        assert!(std_bookkeeping(&args, &roots)
            .unwrap()
            .contains("`test::test_main_static`"));
        // What a test allocates, under libtest's call of it, stays the test's.
        let user = frame("my_crate::tests::leaks", "/ws/src/lib.rs");
        let test = [
            collect,
            user,
            libtest("test::__rust_begin_short_backtrace::<fn()>"),
            libtest("test::run_test_in_process"),
            libtest("test::test_main_static"),
            begin,
        ];
        assert_eq!(std_bookkeeping(&test, &roots), None);
    }

    #[test]
    fn stds_backtrace_cache_is_bookkeeping_but_a_users_backtrace_is_not() {
        let roots = vec![PathBuf::from("/home/u/app")];
        let rs = |f: &str| {
            frame(
                f,
                "/rustc/abc/library/std/src/../../backtrace/src/symbolize/gimli.rs",
            )
        };
        let dep = |f: &str| frame(f, "/rust/deps/gimli-0.32.3/src/read/abbrev.rs");
        let grow = frame(
            "<alloc::raw_vec::RawVecInner>::finish_grow",
            "/rustc/abc/library/alloc/src/raw_vec/mod.rs",
        );
        let mapping = rs("<std::backtrace_rs::symbolize::gimli::Cache>::mapping_for_lib");
        let resolve = rs("std::backtrace_rs::symbolize::gimli::resolve::{closure#1}");
        let test = frame("app::tests::panics", "/home/u/app/src/lib.rs");
        let from_elem = frame(
            "<u8 as alloc::vec::spec_from_elem::SpecFromElem>::from_elem::<alloc::alloc::Global>",
            "/rustc/abc/library/alloc/src/vec/spec_from_elem.rs",
        );
        let no_file = Frame {
            file: None,
            ..frame("<gimli::read::abbrev::Attributes>::push", "")
        };
        let cache = [
            grow.clone(),
            from_elem,
            no_file,
            dep("<gimli::read::abbrev::Attributes>::push"),
            dep("<addr2line::Context<gimli::read::endian_slice::EndianSlice<gimli::endianity::LittleEndian>>>::from_dwarf"),
            rs("<&mut <std::backtrace_rs::symbolize::gimli::Context>::new::{closure#0} as core::ops::function::FnOnce<(gimli::common::SectionId,)>>::call_once"),
            rs("<std::backtrace_rs::symbolize::gimli::Context>::new"),
            mapping.clone(),
            resolve.clone(),
            test.clone(),
        ];
        assert!(std_bookkeeping(&cache, &roots)
            .unwrap()
            .contains("symbolizing backtraces"));
        // The name a captured `Backtrace` keeps is allocated by its own callback, under
        // the symbolizer's frames: the capture's, not the cache's.
        let named = [
            grow,
            frame(
                "<std::backtrace::Capture>::resolve::{closure#0}",
                "/rustc/abc/library/std/src/backtrace.rs",
            ),
            resolve,
            mapping,
            test,
        ];
        assert_eq!(std_bookkeeping(&named, &roots), None);
    }

    #[test]
    fn a_running_threads_start_up_state_is_bookkeeping_but_what_it_allocates_is_not() {
        let roots = vec![PathBuf::from("/home/u/app")];
        let lib = |f: &str, file: &str| frame(f, &format!("/rustc/abc/library/{file}"));
        let arc = lib("<alloc::sync::Arc<T>>::new", "alloc/src/sync.rs");
        let spawn = lib(
            "std::thread::lifecycle::spawn_unchecked::<app::serve::{closure#0}, ()>",
            "std/src/thread/lifecycle.rs",
        );
        let spawn_fn = lib(
            "std::thread::functions::spawn",
            "std/src/thread/functions.rs",
        );
        let user = frame("app::serve", "/home/u/app/src/lib.rs");
        let packet = [arc.clone(), spawn.clone(), spawn_fn, user.clone()];
        assert!(std_bookkeeping(&packet, &roots)
            .unwrap()
            .contains("spawned thread"));
        let capture = [
            arc.clone(),
            lib("test::run_test_in_process", "test/src/lib.rs"),
            lib("test::run_test::{closure#0}", "test/src/lib.rs"),
        ];
        assert!(std_bookkeeping(&capture, &roots)
            .unwrap()
            .contains("captured output"));
        // The thread's own allocations run under `spawn_unchecked`'s closures.
        let inside = lib(
            "std::thread::lifecycle::spawn_unchecked::<app::serve::{closure#0}, ()>::{closure#1}::{closure#0}",
            "std/src/thread/lifecycle.rs",
        );
        let in_thread = [arc.clone(), user.clone(), inside.clone()];
        assert_eq!(std_bookkeeping(&in_thread, &roots), None);
        let vec = lib(
            "<alloc::vec::Vec<u8>>::with_capacity",
            "alloc/src/vec/mod.rs",
        );
        assert_eq!(std_bookkeeping(&[vec, inside], &roots), None);
    }

    #[test]
    fn function_paths_lose_their_generic_arguments() {
        assert_eq!(
            function_path("<std::io::BufReader<std::io::stdio::StdinRaw>>::with_capacity"),
            "std::io::BufReader::with_capacity"
        );
        assert_eq!(
            function_path("<fn() -> u8 as a::T>::f"),
            "fn() -> u8 as a::T::f"
        );
        assert_eq!(function_path("a::b::<c::D>"), "a::b::");
    }

    #[test]
    fn an_address_outside_every_module_stays_unsymbolized() {
        let loaders = Loaders::default();
        let mut s = Symbolizer::new(&[], &[], &loaders);
        let frames = s.stack(&[0x1234]);
        assert_eq!(frames.len(), 1);
        assert_eq!(&*frames[0].address, "0x1234");
        assert_eq!(frames[0].function, None);
    }

    /// A module mapped at 0x1000..0x2000 whose file does not exist.
    fn missing_binary() -> Module {
        Module {
            path: "/nonexistent/bin".into(),
            bias: 0,
            start: 0x1000,
            end: 0x2000,
        }
    }

    #[test]
    fn processes_analysed_on_one_thread_open_each_object_file_once() {
        let module = missing_binary();
        let loaders = Loaders::default();
        let mut first = Symbolizer::new(std::slice::from_ref(&module), &[], &loaders);
        let mut second = Symbolizer::new(&[module], &[], &loaders);
        first.stack(&[0x1500]);
        second.stack(&[0x1600]);
        assert_eq!(loaders.loaded.borrow().len(), 1);
        let loaded = |s: &Symbolizer| s.modules[0].loaded.clone().unwrap();
        assert!(Rc::ptr_eq(&loaded(&first), &loaded(&second)));
    }

    #[test]
    fn a_missing_binary_is_reported_not_fatal() {
        let module = missing_binary();
        let loaders = Loaders::default();
        let mut s = Symbolizer::new(&[module], &[], &loaders);
        assert_eq!(s.stack(&[0x1500])[0].function, None);
        assert_eq!(s.status()[0].status, "unreadable");
    }

    /// This test binary as a module of a trace, and a return address inside one of
    /// its functions (named `here`); `None` when its mappings cannot be read.
    fn this_binary_and_an_address_in_it() -> Option<(Module, u64)> {
        #[inline(never)]
        fn here() -> u64 {
            // A return address inside this function: the address after a call.
            let f: fn() -> u64 = here;
            std::hint::black_box(f as usize as u64 + 1)
        }
        let exe = std::env::current_exe().unwrap();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        let addr = here();
        // The executable's mappings: the one at file offset 0 is the load bias (for a
        // position-independent executable whose first segment has address 0).
        let mut bias = None;
        let mut end = 0;
        for line in maps.lines() {
            let parts: Vec<&str> = line.split_whitespace().collect();
            if parts.len() < 6 || Path::new(parts[5]) != exe {
                continue;
            }
            let Some((lo, hi)) = parts[0].split_once('-') else {
                continue;
            };
            let (lo, hi) = (
                u64::from_str_radix(lo, 16).unwrap(),
                u64::from_str_radix(hi, 16).unwrap(),
            );
            if parts[2].trim_start_matches('0').is_empty() {
                bias.get_or_insert(lo);
            }
            end = end.max(hi);
        }
        let module = Module {
            path: exe.to_string_lossy().into(),
            bias: bias?,
            start: bias?,
            end,
        };
        Some((module, addr))
    }

    #[test]
    fn this_test_binary_symbolizes_its_own_function() {
        let Some((m, addr)) = this_binary_and_an_address_in_it() else {
            return;
        };
        let loaders = Loaders::default();
        let mut s = Symbolizer::new(&[m], &[], &loaders);
        let frames = s.stack(&[addr]);
        let name = frames
            .last()
            .and_then(|f| f.function.clone())
            .unwrap_or_default();
        assert!(name.contains("here"), "{frames:?}");
    }

    #[test]
    fn a_later_run_takes_an_unchanged_executables_frames_from_the_cache_without_opening_it() {
        let Some((m, addr)) = this_binary_and_an_address_in_it() else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let loaders = Loaders::cached(Some(dir.path().into()));
            let mut s = Symbolizer::new(std::slice::from_ref(&m), &[], &loaders);
            s.stack(&[addr])
        };
        let loaders = Loaders::cached(Some(dir.path().into()));
        let mut s = Symbolizer::new(std::slice::from_ref(&m), &[], &loaders);
        assert_eq!(s.stack(&[addr]), first);
        let loaded = s.modules[0].loaded.clone().unwrap();
        // Linked with a build id (the default here): cached.
        if loaded.cache.borrow().is_some() {
            assert!(
                loaded.loader.get().is_none(),
                "the executable was opened again"
            );
            assert_eq!(s.status()[0].status, "symbolized");
        }
    }
}
