//! The symbolization cache: what addresses of an object file were found to be, kept
//! between runs in `<target>/memscope/symbols/`, one file per object file named by its
//! GNU build id.
//!
//! Reading an object file's DWARF is most of the analysis of a small test binary's
//! trace (about 15–20 ms each), and a suite's binaries that were not rebuilt since the
//! last run hold the same code at the same addresses: the linker's build id is a hash
//! of the linked contents, so what an address of one build was found to be holds for
//! every file with that id. Object files without a build id are not cached. The only
//! user of `object`, `memmap2` and `postcard` (the files' encoding: a test binary's
//! cache is a few hundred kilobytes, about 5 ms of `perf` samples to decode as JSON); a cache file
//! that cannot be read, or was written for another file, is ignored (and rewritten),
//! never an error.

use std::fs;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::symbols::Name;

/// Version of the cache files' layout; files of another version are ignored.
const VERSION: u32 = 3;
/// The cache files' extension (version 2's were JSON, `.json`).
const EXTENSION: &str = "bin";
/// Cache files kept: the least recently written beyond this are removed.
const KEPT_FILES: usize = 256;

/// One frame found at an address, as the object file names it (its source path before
/// a report's path map); inlined calls are frames of their own, innermost first.
/// Names are shared between the frames that repeat them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawFrame {
    pub function: Option<Name>,
    pub file: Option<Name>,
    pub line: Option<u32>,
    pub inlined: bool,
}

/// What the cache knows of one object file, as stored: each distinct function name
/// and file once, in `strings`; a frame is `[function, file, line, inlined]` with 0
/// for none and `i + 1` for `strings[i]` or for line `i`.
#[derive(Default, Serialize, Deserialize)]
struct Stored {
    version: u32,
    build_id: String,
    size: u64,
    /// Whether the file has DWARF line tables (otherwise only function names).
    has_dwarf: Option<bool>,
    strings: Vec<Name>,
    /// Frames by address in the file.
    frames: Vec<(u64, Vec<StoredFrame>)>,
}

/// `[function, file, line, inlined]`, numbered as [`Stored`] says.
type StoredFrame = (u32, u32, u32, bool);

impl Stored {
    fn frames(&self) -> impl Iterator<Item = (u64, Rc<[RawFrame]>)> + '_ {
        let string = |i: u32| match i {
            0 => None,
            i => self.strings.get(i as usize - 1).cloned(),
        };
        self.frames.iter().map(move |(probe, frames)| {
            let frames = frames
                .iter()
                .map(|&(function, file, line, inlined)| RawFrame {
                    function: string(function),
                    file: string(file),
                    line: line.checked_sub(1),
                    inlined,
                })
                .collect();
            (*probe, frames)
        })
    }
}

/// The cache of one object file, read on first use and written back when it learnt
/// something.
pub struct ObjectCache {
    path: PathBuf,
    build_id: String,
    size: u64,
    has_dwarf: Option<bool>,
    frames: FxHashMap<u64, Rc<[RawFrame]>>,
    /// Addresses found since the file was read.
    learnt: bool,
}

impl ObjectCache {
    /// The cache of `object` in `dir`, with whatever an earlier run stored; `None` when
    /// the object file has no build id or cannot be read.
    pub fn open(dir: &Path, object: &Path) -> Option<ObjectCache> {
        let (build_id, size) = identify(object)?;
        let path = dir.join(format!("{build_id}.{EXTENSION}"));
        let stored = read(&path, &build_id, size).unwrap_or_default();
        Some(ObjectCache {
            path,
            build_id,
            size,
            has_dwarf: stored.has_dwarf,
            frames: stored.frames().collect(),
            learnt: false,
        })
    }

    /// The frames at `probe`, if an earlier lookup stored them.
    pub fn get(&self, probe: u64) -> Option<Rc<[RawFrame]>> {
        self.frames.get(&probe).cloned()
    }

    pub fn insert(&mut self, probe: u64, frames: Rc<[RawFrame]>) {
        self.frames.insert(probe, frames);
        self.learnt = true;
    }

    /// Whether the object file has DWARF line tables, if known.
    pub fn has_dwarf(&self) -> Option<bool> {
        self.has_dwarf
    }

    pub fn set_has_dwarf(&mut self, has_dwarf: bool) {
        if self.has_dwarf != Some(has_dwarf) {
            self.has_dwarf = Some(has_dwarf);
            self.learnt = true;
        }
    }

    /// Writes what was learnt, together with what another analysing thread or process
    /// may have written meanwhile. Failures are ignored: it is a cache.
    pub fn save(&self) {
        if !self.learnt {
            return;
        }
        let mut frames: FxHashMap<u64, Rc<[RawFrame]>> =
            read(&self.path, &self.build_id, self.size)
                .map(|s| s.frames().collect())
                .unwrap_or_default();
        for (probe, found) in &self.frames {
            frames.entry(*probe).or_insert_with(|| found.clone());
        }
        let mut frames: Vec<(u64, Rc<[RawFrame]>)> = frames.into_iter().collect();
        frames.sort_by_key(|(probe, _)| *probe);
        let mut strings: Vec<Name> = Vec::new();
        let mut index: FxHashMap<Name, u32> = FxHashMap::default();
        let mut number = |name: &Option<Name>| match name {
            None => 0,
            Some(name) => *index.entry(name.clone()).or_insert_with(|| {
                strings.push(name.clone());
                strings.len() as u32
            }),
        };
        let frames = frames
            .iter()
            .map(|(probe, found)| {
                let found = found
                    .iter()
                    .map(|f| {
                        let line = f.line.map_or(0, |l| l.saturating_add(1));
                        (number(&f.function), number(&f.file), line, f.inlined)
                    })
                    .collect();
                (*probe, found)
            })
            .collect();
        let stored = Stored {
            version: VERSION,
            build_id: self.build_id.clone(),
            size: self.size,
            has_dwarf: self.has_dwarf,
            strings,
            frames,
        };
        let Some(dir) = self.path.parent() else {
            return;
        };
        if fs::create_dir_all(dir).is_err() {
            return;
        }
        // Written aside, then renamed over: a reader sees the old file or the new one.
        let temp = dir.join(format!(
            ".{}.{}-{:?}.tmp",
            self.build_id,
            std::process::id(),
            std::thread::current().id()
        ));
        let Ok(bytes) = postcard::to_stdvec(&stored) else {
            return;
        };
        if fs::write(&temp, bytes).is_err() || fs::rename(&temp, &self.path).is_err() {
            let _ = fs::remove_file(&temp);
            return;
        }
        // What an older memscope wrote for the same file.
        let _ = fs::remove_file(self.path.with_extension("json"));
        prune(dir);
    }
}

/// The object file's build id (hex) and size; `None` without one.
fn identify(object: &Path) -> Option<(String, u64)> {
    let file = fs::File::open(object).ok()?;
    let size = file.metadata().ok()?.len();
    // SAFETY: the mapping is only read, while `file` stays open, by the object parser,
    // which checks every offset against the mapping's length. An executable rewritten
    // while it is mapped could change what is read, but not make the read unsound for
    // plain bytes; the build id read would then belong to the new file.
    let map = unsafe { memmap2::Mmap::map(&file) }.ok()?;
    let parsed = object::File::parse(&*map).ok()?;
    let id = object::Object::build_id(&parsed).ok()??;
    if id.is_empty() {
        return None;
    }
    Some((id.iter().map(|b| format!("{b:02x}")).collect(), size))
}

/// The stored cache at `path`, if it is of this layout and of this object file.
fn read(path: &Path, build_id: &str, size: u64) -> Option<Stored> {
    let bytes = fs::read(path).ok()?;
    let stored: Stored = postcard::from_bytes(&bytes).ok()?;
    (stored.version == VERSION && stored.build_id == build_id && stored.size == size)
        .then_some(stored)
}

/// Removes the least recently written cache files beyond [`KEPT_FILES`].
fn prune(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            let path = e.path();
            let extension = path.extension()?;
            (extension == EXTENSION || extension == "json").then_some(())?;
            Some((e.metadata().ok()?.modified().ok()?, path))
        })
        .collect();
    if files.len() <= KEPT_FILES {
        return;
    }
    files.sort();
    for (_, path) in &files[..files.len() - KEPT_FILES] {
        let _ = fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: &str, line: u32) -> RawFrame {
        RawFrame {
            function: Some(function.into()),
            file: Some("/src/lib.rs".into()),
            line: Some(line),
            inlined: false,
        }
    }

    #[test]
    fn frames_keep_every_field_through_the_file_and_share_repeated_names() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::env::current_exe().unwrap();
        let Some(mut cache) = ObjectCache::open(dir.path(), &me) else {
            return;
        };
        let bare = RawFrame {
            function: None,
            file: None,
            line: None,
            inlined: true,
        };
        cache.insert(1, vec![frame("f", 0), bare.clone(), frame("f", 9)].into());
        cache.insert(2, vec![frame("f", 3)].into());
        cache.save();
        let read = ObjectCache::open(dir.path(), &me).unwrap();
        let one = read.get(1).unwrap();
        assert_eq!(&one[..], &[frame("f", 0), bare, frame("f", 9)][..]);
        let two = read.get(2).unwrap();
        let (a, b) = (one[0].function.as_ref(), two[0].function.as_ref());
        assert!(std::sync::Arc::ptr_eq(a.unwrap(), b.unwrap()));
    }

    #[test]
    fn what_one_run_found_at_an_address_the_next_run_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::env::current_exe().unwrap();
        let Some(mut first) = ObjectCache::open(dir.path(), &me) else {
            return; // linked without a build id: nothing is cached
        };
        assert_eq!(first.get(0x1234), None);
        first.insert(0x1234, vec![frame("f", 7)].into());
        first.set_has_dwarf(true);
        first.save();

        let second = ObjectCache::open(dir.path(), &me).unwrap();
        assert_eq!(second.get(0x1234).as_deref(), Some(&[frame("f", 7)][..]));
        assert_eq!(second.has_dwarf(), Some(true));
    }

    #[test]
    fn two_savers_of_one_object_file_keep_both_their_addresses() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::env::current_exe().unwrap();
        let (Some(mut a), Some(mut b)) = (
            ObjectCache::open(dir.path(), &me),
            ObjectCache::open(dir.path(), &me),
        ) else {
            return;
        };
        a.insert(1, vec![frame("a", 1)].into());
        b.insert(2, vec![frame("b", 2)].into());
        a.save();
        b.save();
        let read = ObjectCache::open(dir.path(), &me).unwrap();
        assert!(read.get(1).is_some() && read.get(2).is_some());
    }

    #[test]
    fn a_cache_file_of_another_object_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::env::current_exe().unwrap();
        let Some((id, size)) = identify(&me) else {
            return;
        };
        let other = Stored {
            version: VERSION,
            build_id: id.clone(),
            size: size + 1,
            has_dwarf: Some(true),
            strings: vec!["stale".into()],
            frames: vec![(1, vec![(1, 0, 2, false)])],
        };
        fs::write(
            dir.path().join(format!("{id}.{EXTENSION}")),
            postcard::to_stdvec(&other).unwrap(),
        )
        .unwrap();
        let cache = ObjectCache::open(dir.path(), &me).unwrap();
        assert_eq!(cache.get(1), None);
        assert_eq!(cache.has_dwarf(), None);
    }

    #[test]
    fn a_file_without_a_build_id_is_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("not-an-object");
        fs::write(&text, b"plain text").unwrap();
        assert!(ObjectCache::open(dir.path(), &text).is_none());
    }
}
