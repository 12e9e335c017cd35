//! The report model, built from traces, and its JSON form (`report.json`, described in
//! `docs/report-json.md`). The terminal summary and the HTML report read this same
//! model.
//!
//! [`generate`] analyses each trace (one per process) on its own: stream the events
//! through [`replay`], symbolize the stacks of the sites that allocated, classify the
//! blocks live at exit. Then it merges the processes: sites with the same symbolized
//! stack become one site, and the top-level summary sums the processes' summaries.

use std::cell::RefCell;
use std::collections::hash_map::Entry;
use std::collections::BTreeMap;
use std::fs;
use std::hash::Hash;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use memscope::format::Reach;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::follow::Following;
use crate::replay::{self, Clock, ProblemKind, Snapshot};
use crate::symbols::{self, Frame, ModuleStatus, SiteOrigin, Symbolizer};
use crate::trace::{EventKind, EventSource, Tables, Trace};

/// The version of the JSON schema; bumped on any incompatible change.
pub const SCHEMA_VERSION: u32 = 4;

/// How to turn traces into reports.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    /// Where `report.json` and `report.html` are written; created if missing.
    pub output_dir: PathBuf,
    /// Source path prefixes as compiled → as the user knows them (scratch copy → the
    /// user's workspace), applied to every file name shown in a report.
    pub path_map: Vec<(PathBuf, PathBuf)>,
    /// Directories (after `path_map`) whose files are the user's own code; the first
    /// frame of a stack inside one of them is the allocation's "site".
    pub user_roots: Vec<PathBuf>,
    /// Colour in the terminal summary.
    pub color: bool,
    /// Show progress bars (only when stderr is a terminal).
    pub progress: bool,
    /// The traces are of test executables: also work out each thread's figures
    /// without the blocks of libtest's harness (`Thread::without_harness`).
    pub tests: bool,
    /// Where what addresses of object files were found to be is kept between runs
    /// (`symcache.rs`); `None`: not kept.
    pub symbol_cache: Option<PathBuf>,
}

/// Reads the traces, analyses them, writes the reports and prints the terminal summary.
#[cfg(test)]
pub fn generate(traces: &[PathBuf], options: &ReportOptions) -> anyhow::Result<Report> {
    let report = build(traces, options)?;
    write(&report, options)?;
    Ok(report)
}

/// Reads the traces and analyses them into the report model.
#[cfg(test)]
pub fn build(traces: &[PathBuf], options: &ReportOptions) -> anyhow::Result<Report> {
    build_with(traces, options, &mut AnalysedAhead::default())
}

/// [`build`], taking the traces [`Ahead`] analyses as they are handed over.
///
/// Processes are merged in the traces' order, each as soon as it and those before it
/// are analysed: a suite's earlier binaries are merged while its last one, which
/// ended with the run, is still being analysed ahead.
pub fn build_with(
    traces: &[PathBuf],
    options: &ReportOptions,
    ahead: &mut AnalysedAhead,
) -> anyhow::Result<Report> {
    anyhow::ensure!(!traces.is_empty(), "no trace to analyse");
    let mut merger = Merger::new();
    // Analysed ahead, but after a trace that was not: merged once that one is.
    let mut held: Vec<(usize, Analysed)> = Vec::new();
    let mut missing = Vec::new();
    for (i, path) in traces.iter().enumerate() {
        match ahead.take(path) {
            Some(analysed) if missing.is_empty() => merger.add(analysed),
            Some(analysed) => held.push((i, analysed)),
            None => missing.push(i),
        }
    }
    ahead.settled();
    let mut opened = Vec::new();
    for i in missing {
        opened.push((i, Trace::open(&traces[i])?));
    }
    let progress = Progress::new(
        options.progress && !opened.is_empty(),
        opened.iter().map(|(_, trace)| trace.event_bytes()).sum(),
    );
    // Traces are analysed side by side, one per core (a test suite writes one per
    // test binary, or per test under nextest), and merged in the traces' order as each
    // is handed over.
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(opened.len());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut order: Vec<usize> = held.iter().map(|&(i, _)| i).collect();
    order.extend(opened.iter().map(|&(i, _)| i));
    order.sort_unstable();
    let (hand_over, handed) = std::sync::mpsc::channel();
    let mut handed = Handed::from(handed);
    handed.received.extend(held);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..workers)
            .map(|_| {
                let hand_over = hand_over.clone();
                let (next, opened, progress) = (&next, &opened, &progress);
                scope.spawn(move || {
                    let loaders = symbols::Loaders::cached(options.symbol_cache.clone());
                    while let Some((i, trace)) =
                        opened.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                    {
                        let analysed = analyse(trace, options, &loaders, progress);
                        if hand_over.send((*i, analysed)).is_err() {
                            break;
                        }
                    }
                    // The debug information read is freed while the report is merged.
                    drop(hand_over);
                    drop(loaders);
                })
            })
            .collect();
        drop(hand_over);
        for i in order {
            // A worker that panicked hands nothing more: its panic is raised below.
            let Some(analysed) = handed.take(&i) else {
                break;
            };
            merger.add(analysed);
        }
        for worker in workers {
            worker
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        }
    });
    progress.finish();
    Ok(merger.finish())
}

/// Analyses the traces of processes that have ended while the rest of a run goes on
/// (a suite's test binaries run one after another), on one thread per core (up to
/// [`AHEAD_WORKERS`]) at low priority (nice 10), so that the traced program keeps the
/// CPU it wants: [`build_with`] then analyses only what could not be analysed ahead (a
/// trace not yet whole).
pub struct Ahead {
    shared: std::sync::Arc<AheadShared>,
    workers: Vec<std::thread::JoinHandle<()>>,
    analysed: std::sync::mpsc::Receiver<(PathBuf, Analysed)>,
}

/// What [`Ahead`]'s workers share: where ended traces come from, those not yet taken,
/// and what they are to do.
struct AheadShared {
    pending: std::sync::Mutex<AheadPending>,
    /// Shown once the run is over and the analysis is what is left to wait for.
    progress: Progress,
    /// One of `AHEAD_RUN`, `AHEAD_DRAIN`, `AHEAD_STOP`.
    mode: std::sync::atomic::AtomicU8,
}

struct AheadPending {
    runs: Box<dyn Runs + Send>,
    queue: std::collections::VecDeque<PathBuf>,
    /// Traces taken while their process ran, to be analysed as they are written.
    followed: rustc_hash::FxHashSet<PathBuf>,
}

/// Where [`Ahead`] learns of a run's processes and their traces.
pub trait Runs {
    /// The traces of the processes that ended since the last call, in the order the
    /// processes started.
    fn ended(&mut self) -> Vec<PathBuf>;
    /// The traces of the processes still running, in the order they started, each
    /// with the file whose appearance says that its process has ended (`None`: only
    /// the end of the run says so).
    fn running(&mut self) -> Vec<(PathBuf, Option<PathBuf>)>;
}

/// How long a process runs before its trace is followed: the follower hands out
/// nothing of the first two clock samples' time (about 200 ms), so a shorter process
/// gains nothing from it, and its trace is left to the workers once it has ended.
const FOLLOW_AFTER: std::time::Duration = std::time::Duration::from_millis(150);

/// The most threads [`Ahead`] analyses traces on.
const AHEAD_WORKERS: usize = 4;

/// Analyse traces as they end.
const AHEAD_RUN: u8 = 0;
/// The run is over: analyse every trace that ended, then stop.
const AHEAD_DRAIN: u8 = 1;
/// Stop after the traces being analysed.
const AHEAD_STOP: u8 = 2;

/// The traces [`Ahead`] analyses once the run is over, handed over as each is done
/// ([`build_with`] takes them). Dropping it waits for the workers to end.
#[derive(Default)]
pub struct AnalysedAhead {
    shared: Option<std::sync::Arc<AheadShared>>,
    workers: Vec<std::thread::JoinHandle<()>>,
    analysed: Handed<PathBuf>,
}

/// Analysed traces that threads send as each is done, in whatever order, taken by
/// key (a trace's path, or its index in the report).
struct Handed<K> {
    /// `None` once every sender has gone.
    from: Option<std::sync::mpsc::Receiver<(K, Analysed)>>,
    received: FxHashMap<K, Analysed>,
}

impl<K> Default for Handed<K> {
    fn default() -> Handed<K> {
        Handed {
            from: None,
            received: FxHashMap::default(),
        }
    }
}

impl<K: std::hash::Hash + Eq> Handed<K> {
    fn from(from: std::sync::mpsc::Receiver<(K, Analysed)>) -> Handed<K> {
        Handed {
            from: Some(from),
            ..Handed::default()
        }
    }

    /// The one of `key`: waits for it while it may still be sent. `None` once every
    /// sender has gone without it.
    fn take<Q>(&mut self, key: &Q) -> Option<Analysed>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        loop {
            if let Some(analysed) = self.received.remove(key) {
                return Some(analysed);
            }
            match self.from.as_ref()?.recv() {
                Ok((done, analysed)) => {
                    self.received.insert(done, analysed);
                }
                Err(_) => self.from = None,
            }
        }
    }
}

impl Ahead {
    /// Starts analysing the traces `ended` hands out, each once (it is asked again
    /// whenever there is nothing left to take).
    pub fn start(options: &ReportOptions, runs: impl Runs + Send + 'static) -> Ahead {
        let shared = std::sync::Arc::new(AheadShared {
            pending: std::sync::Mutex::new(AheadPending {
                runs: Box::new(runs),
                queue: std::collections::VecDeque::new(),
                followed: rustc_hash::FxHashSet::default(),
            }),
            mode: std::sync::atomic::AtomicU8::new(AHEAD_RUN),
            progress: Progress::hidden(options.progress),
        });
        let (hand_over, analysed) = std::sync::mpsc::channel();
        // Each worker keeps the debug information it read (its own symbol loaders),
        // which a large executable makes hundreds of megabytes: a few workers, not
        // one per core of a large machine.
        let workers =
            std::thread::available_parallelism().map_or(1, |n| n.get().min(AHEAD_WORKERS));
        let options = ReportOptions {
            progress: false,
            ..options.clone()
        };
        let follower = {
            let (shared, hand_over, options) = (shared.clone(), hand_over.clone(), options.clone());
            std::thread::spawn(move || shared.follow(&options, hand_over))
        };
        let workers = (0..workers)
            .map(|_| {
                let (shared, hand_over, options) =
                    (shared.clone(), hand_over.clone(), options.clone());
                std::thread::spawn(move || shared.work(&options, hand_over))
            })
            .chain([follower])
            .collect();
        Ahead {
            shared,
            workers,
            analysed,
        }
    }

    /// The run is over: analyses what is left of the traces that ended, handing each
    /// over as soon as it is done.
    pub fn finish(self) -> AnalysedAhead {
        self.tell(AHEAD_DRAIN);
        self.shared.progress.show();
        AnalysedAhead {
            shared: Some(self.shared),
            workers: self.workers,
            analysed: Handed::from(self.analysed),
        }
    }

    /// Stops after the traces being analysed: their results are not wanted.
    pub fn abandon(self) {
        self.tell(AHEAD_STOP);
        for worker in self.workers {
            let _ = worker.join();
        }
    }

    fn tell(&self, mode: u8) {
        self.shared
            .mode
            .store(mode, std::sync::atomic::Ordering::Release);
        for worker in &self.workers {
            // Woken early from waiting for a trace to end.
            worker.thread().unpark();
        }
    }
}

impl AnalysedAhead {
    /// The trace at `path`, analysed: waits for it while the workers may still hand
    /// it over. `None` when they did not analyse it (a panic there is raised again
    /// where `build_with` analyses the same trace).
    fn take(&mut self, path: &Path) -> Option<Analysed> {
        self.analysed.take(path)
    }

    /// Everything wanted was taken: the progress bar goes.
    fn settled(&self) {
        if let Some(shared) = &self.shared {
            shared.progress.finish();
        }
    }
}

impl Drop for AnalysedAhead {
    /// Waits for the workers, which save what they found for the next run and free
    /// what they read once they have handed everything over.
    fn drop(&mut self) {
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

impl AheadShared {
    /// One worker: takes the next ended trace, analyses it and hands it over, until
    /// told to stop.
    fn work(
        &self,
        options: &ReportOptions,
        hand_over: std::sync::mpsc::Sender<(PathBuf, Analysed)>,
    ) {
        lower_priority();
        let loaders = symbols::Loaders::cached(options.symbol_cache.clone());
        loop {
            let mode = self.mode.load(std::sync::atomic::Ordering::Acquire);
            if mode == AHEAD_STOP {
                break;
            }
            let next = {
                let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                let ended = pending.runs.ended();
                let pending = &mut *pending;
                let followed = &pending.followed;
                pending
                    .queue
                    .extend(ended.into_iter().filter(|t| !followed.contains(t)));
                pending.queue.pop_front()
            };
            let Some(path) = next else {
                if mode == AHEAD_DRAIN {
                    break;
                }
                std::thread::park_timeout(std::time::Duration::from_millis(5));
                continue;
            };
            if let Some(analysed) = self.analyse_whole(&path, options, &loaders) {
                // Not wanted any more if `build_with` has finished.
                let _ = hand_over.send((path, analysed));
            }
        }
        // The last one to go ends `take`'s wait; the debug information read is freed
        // after that (3.8–5.2 ms for serde_json's suite), while the report is merged.
        drop(hand_over);
        drop(loaders);
    }

    /// The trace at `path`, read whole and analysed, if it is complete. A trace that
    /// cannot be read, or not yet in full (a process it forked may still write), is
    /// left to `build_with`, which says what is wrong.
    fn analyse_whole(
        &self,
        path: &Path,
        options: &ReportOptions,
        loaders: &symbols::Loaders,
    ) -> Option<Analysed> {
        let trace = Trace::open(path).ok()?;
        self.progress.grow(trace.event_bytes());
        Some(analyse(&trace, options, loaders, &self.progress)).filter(|a| a.process.complete)
    }

    /// The follower: takes the trace of the earliest process still running and
    /// analyses it as it is written (see `follow.rs`), handing it over when its
    /// process ends; one at a time, while the run goes on. A trace it cannot follow
    /// to its end, it analyses whole once its process has ended.
    fn follow(
        &self,
        options: &ReportOptions,
        hand_over: std::sync::mpsc::Sender<(PathBuf, Analysed)>,
    ) {
        lower_priority();
        let loaders = symbols::Loaders::cached(options.symbol_cache.clone());
        // When each trace was first seen running.
        let mut seen: FxHashMap<PathBuf, std::time::Instant> = FxHashMap::default();
        while self.mode.load(std::sync::atomic::Ordering::Acquire) == AHEAD_RUN {
            let next = {
                let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                let running = pending.runs.running();
                let next = running.into_iter().find(|(trace, _)| {
                    let since = *seen
                        .entry(trace.clone())
                        .or_insert_with(std::time::Instant::now);
                    !pending.followed.contains(trace) && since.elapsed() >= FOLLOW_AFTER
                });
                if let Some((trace, _)) = &next {
                    pending.followed.insert(trace.clone());
                }
                next
            };
            let Some((path, ended)) = next else {
                std::thread::park_timeout(std::time::Duration::from_millis(5));
                continue;
            };
            // Once the run is over, every process of it has ended, whether or not its
            // runner said so.
            let has_ended = || {
                ended.as_ref().is_some_and(|e| e.exists())
                    || self.mode.load(std::sync::atomic::Ordering::Acquire) != AHEAD_RUN
            };
            let analysed = analyse_following(&path, has_ended, options, &loaders, &self.progress)
                .or_else(|| {
                    while !has_ended() {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    self.analyse_whole(&path, options, &loaders)
                });
            if let Some(analysed) = analysed.filter(|a| a.process.complete) {
                let _ = hand_over.send((path, analysed));
            }
        }
        drop(hand_over);
        drop(loaders);
    }
}

/// Lowers the calling thread's scheduling priority (and that of the threads it
/// starts), where the system has per-thread priorities.
pub(crate) fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority only changes the scheduling priority of the calling thread
    // (on Linux, `who` 0 names the calling thread); it touches no memory of ours.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 10);
    }
}

/// Writes the reports of `report` and prints the terminal summary; returns the path of
/// `report.html` (for `--open`).
pub fn write(report: &Report, options: &ReportOptions) -> anyhow::Result<PathBuf> {
    fs::create_dir_all(&options.output_dir).with_context(|| {
        format!(
            "failed to create the report directory {}",
            options.output_dir.display()
        )
    })?;
    // The two files side by side: each is a good part of what follows the analysis.
    let json_path = options.output_dir.join("report.json");
    let html_path = options.output_dir.join("report.html");
    std::thread::scope(|scope| {
        let json = scope.spawn(|| {
            write_json(report, &json_path)
                .with_context(|| format!("failed to write {}", json_path.display()))
        });
        let html = crate::html::write(report, &options.user_roots, &html_path);
        json.join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            .and(html)
    })?;

    let text = crate::summary::render(report, &[&json_path, &html_path], options);
    eprint!("{text}");

    Ok(html_path)
}

fn write_json(report: &Report, path: &Path) -> anyhow::Result<()> {
    let mut out = BufWriter::new(fs::File::create(path)?);
    crate::json_layout::write_report(&mut out, report)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

// ---------------------------------------------------------------------------------
// The model. Every field is documented in docs/report-json.md.

/// A whole report: one or more processes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub schema_version: u32,
    pub memscope_version: String,
    pub summary: Summary,
    pub processes: Vec<Process>,
    #[serde(serialize_with = "crate::json_layout::sites_unless_laid_out_apart")]
    pub sites: Vec<Site>,
    pub leaks: Vec<Leak>,
    pub runtime_internal: Vec<InternalGroup>,
    pub threads: Vec<Thread>,
    pub timeline: Vec<Timeline>,
    pub problems: Vec<Problem>,
    /// `cargo memscope test` only: one entry per test binary run, and per test.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub test_binaries: Vec<crate::pertest::TestBinary>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tests: Vec<crate::pertest::TestResult>,
    /// Instrumentation (`#[memscope::instrument]`): the scope tree, variables, tasks.
    #[serde(default)]
    pub scopes: Vec<crate::instrument::Scope>,
    #[serde(default)]
    pub variables: Vec<crate::instrument::Variable>,
    #[serde(default)]
    pub tasks: Vec<crate::instrument::Task>,
    /// Every distinct frame of the stacks above, once: a [`Stack`] holds indexes into
    /// it (a real test suite has tens of thousands of sites, most of whose frames are
    /// shared, within a process and between the processes of a suite).
    pub frames: Vec<FrameEntry>,
}

/// A call stack, innermost frame first, as indexes into [`Report::frames`].
pub type Stack = Vec<usize>;

/// An entry of [`Report::frames`]: a frame as every process that has it shows it. Its
/// return address is not part of it: ASLR puts it elsewhere in each process.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FrameEntry {
    /// Demangled function name, without hash suffix.
    pub function: Option<symbols::Name>,
    /// Source file, after the report's path map.
    pub file: Option<symbols::Name>,
    pub line: Option<u32>,
    /// This call was inlined into the next frame.
    pub inlined: bool,
    /// For a frame without a function name only: where its return address lies, as
    /// `object-file+0x…`, or the address itself when no object file holds it.
    pub place: Option<String>,
}

impl Report {
    /// Lets the report go without freeing it, when the command ends next: freeing a
    /// large report block by block is a part of the command's time one can see
    /// (regex-syntax's 27,600 sites and their stacks: 50–80 ms).
    pub fn leave(self) {
        std::mem::forget(self);
    }

    /// The frames of `stack`, a stack of this report, innermost first.
    pub fn frames_of<'r>(
        &'r self,
        stack: &'r [usize],
    ) -> impl Iterator<Item = &'r FrameEntry> + Clone + 'r {
        stack.iter().map(|&i| &self.frames[i])
    }
}

/// What a finding rests on (SPEC §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    Observed,
    Declared,
    Inferred,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub complete: bool,
    pub allocations: u64,
    pub zeroed_allocations: u64,
    pub reallocations: u64,
    pub frees: u64,
    pub bytes_allocated: u64,
    pub peak_bytes: u64,
    pub peak_blocks: u64,
    pub peak_time_ns: Option<u64>,
    pub live_blocks_at_exit: u64,
    pub live_bytes_at_exit: u64,
    pub leaked_blocks: u64,
    pub leaked_bytes: u64,
    pub runtime_internal_blocks: u64,
    pub runtime_internal_bytes: u64,
    /// The leaked blocks and bytes of each leak `kind` (every kind of [`LEAK_KINDS`]).
    #[serde(default)]
    pub leak_kinds: BTreeMap<String, Amount>,
    /// What the exit-time scans read, summed over the processes that ran one.
    #[serde(default)]
    pub leak_scan: Option<LeakScan>,
    pub problems: u64,
    pub events_dropped: u64,
}

/// A number of blocks and their bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Amount {
    pub blocks: u64,
    pub bytes: u64,
}

/// What the exit-time scans for pointers read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeakScan {
    /// Processes whose blocks live at exit were scanned.
    pub processes: u64,
    pub static_bytes: u64,
    pub stack_bytes: u64,
    pub stacks: u64,
    /// Bytes that could not be read (unmapped by a thread still running).
    pub unreadable_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Process {
    pub pid: u32,
    pub ppid: u32,
    /// A `fork` child, traced from the fork on.
    pub forked: bool,
    /// Frees (and reallocations) in a fork child of blocks allocated before the fork.
    pub frees_of_inherited_blocks: u64,
    pub trace: String,
    pub complete: bool,
    pub damage: Vec<String>,
    pub duration_ns: Option<u64>,
    pub summary: Summary,
    pub memscope: MemscopeOwn,
    pub symbols: Vec<ModuleStatus>,
}

/// memscope's own allocations in a process, kept out of every other figure.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct MemscopeOwn {
    pub allocations: u64,
    pub bytes_allocated: u64,
    pub live_blocks_at_exit: u64,
    pub live_bytes_at_exit: u64,
}

/// A source location.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Site {
    pub id: usize,
    pub location: Option<Location>,
    pub origin: SiteOrigin,
    pub allocations: u64,
    pub reallocations: u64,
    pub bytes_allocated: u64,
    pub bytes_at_peak: u64,
    pub peak_share: f64,
    pub live_blocks_at_exit: u64,
    pub live_bytes_at_exit: u64,
    pub pids: Vec<u32>,
    pub basis: Basis,
    pub stack: Stack,
    /// Variables whose blocks this site allocated (instrumentation).
    #[serde(default)]
    pub variables: Vec<crate::instrument::VarRef>,
}

/// Blocks live at exit that the program allocated at one site.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Leak {
    pub site: usize,
    pub location: Option<Location>,
    pub kind: String,
    pub blocks: u64,
    pub bytes: u64,
    pub largest_block: u64,
    pub threads: Vec<ThreadRef>,
    pub basis: Basis,
    /// Why `kind` holds, where it is an inference.
    #[serde(default)]
    pub evidence: Option<String>,
    pub stack: Stack,
    /// Variables that named these blocks (instrumentation).
    #[serde(default)]
    pub variables: Vec<crate::instrument::VarRef>,
}

/// A thread of a process, by id, with its name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadRef {
    pub pid: u32,
    pub thread: u32,
    pub name: Option<String>,
    pub blocks: u64,
    /// Bytes of those blocks (0 where `blocks` is 0).
    #[serde(default)]
    pub bytes: u64,
}

/// Blocks live at exit that are not the program's doing.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InternalGroup {
    /// `"std"` (the standard library's bookkeeping) or `"memscope"`.
    pub origin: String,
    pub site: Option<usize>,
    pub location: Option<Location>,
    pub blocks: u64,
    pub bytes: u64,
    pub basis: Basis,
    pub evidence: String,
    pub stack: Stack,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Thread {
    pub pid: u32,
    pub thread: u32,
    pub os_tid: Option<u64>,
    pub name: Option<String>,
    pub allocations: u64,
    pub reallocations: u64,
    pub frees: u64,
    pub bytes_allocated: u64,
    pub peak_bytes: u64,
    pub live_blocks_at_exit: u64,
    pub live_bytes_at_exit: u64,
    /// When the thread's first and last heap events happened (ns since process start).
    #[serde(default)]
    pub first_event_ns: Option<u64>,
    #[serde(default)]
    pub last_event_ns: Option<u64>,
    /// In a test binary: the figures without the blocks that libtest's harness and
    /// std's bookkeeping allocated on this thread (`tests[]` are made of these);
    /// `null` in other programs.
    #[serde(default)]
    pub without_harness: Option<ThreadFigures>,
}

/// A thread's figures for part of its blocks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThreadFigures {
    pub allocations: u64,
    pub reallocations: u64,
    pub bytes_allocated: u64,
    pub peak_bytes: u64,
    pub live_blocks_at_exit: u64,
    pub live_bytes_at_exit: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Timeline {
    pub pid: u32,
    /// `"ns"` (since process start) or `"ticks"` (raw clock, when uncalibrated).
    pub unit: String,
    pub points: Vec<Point>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Point {
    pub t: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Problem {
    pub kind: String,
    pub pid: u32,
    pub thread: ThreadRef,
    pub time_ns: Option<u64>,
    pub address: String,
    pub site: Option<usize>,
    pub basis: Basis,
    pub evidence: String,
}

// ---------------------------------------------------------------------------------
// One process.

/// A process's findings before the merge: sites carry per-process keys.
struct Analysed {
    process: Process,
    sites: Vec<SiteDraft>,
    /// The frames the sites' stacks are ids into, and for each one without a function
    /// name, where it lies in its object file (see [`FrameEntry::of`]).
    frames: Vec<Frame>,
    places: Vec<Option<String>>,
    threads: Vec<Thread>,
    timeline: Timeline,
    problems: Vec<(Problem, Option<usize>)>,
    instrumented: crate::instrument::Sections,
}

/// A site of one process; `leak` and `internal` describe its blocks live at exit.
struct SiteDraft {
    /// The symbolized stack, as ids into its process's frames (`Analysed::frames`);
    /// `site.stack` stays empty until the frames of all processes are put in one table
    /// (`merge`).
    frames: Vec<u32>,
    site: Site,
    /// Its blocks live at exit, by what the exit-time scan found about them.
    leaked: Vec<LeakDraft>,
    /// Runtime-internal: origin and evidence.
    internal: Option<(&'static str, Basis, String)>,
    /// Allocated by memscope itself: never shown among the sites.
    memscope: bool,
    /// Variables naming the site's blocks live at exit.
    leak_variables: Vec<crate::instrument::VarRef>,
}

/// Blocks live at exit of one site that the exit-time scan found the same about.
#[derive(Clone, Debug)]
struct LeakDraft {
    reach: Option<Reach>,
    blocks: u64,
    bytes: u64,
    largest: u64,
    threads: Vec<ThreadRef>,
}

/// The `kind` of leaked blocks the exit-time scan found `reach` about (`None`: it did
/// not run), and the evidence for it.
fn leak_kind(reach: Option<Reach>) -> (&'static str, Basis, Option<&'static str>) {
    let (kind, evidence) = match reach {
        None => return ("live_at_exit", Basis::Observed, None),
        Some(Reach::FromStatic) => (
            "reachable_from_static",
            "the exit-time scan found a pointer to these blocks (or to a block that leads \
             to them) in a loaded object's static data",
        ),
        Some(Reach::FromStack) => (
            "reachable_from_stack",
            "the exit-time scan found a pointer to these blocks (or to a block that leads \
             to them) on a thread's stack, and none in static data",
        ),
        Some(Reach::DefinitelyLost) => (
            "definitely_lost",
            "the exit-time scan found no pointer to these blocks in static data, on the \
             thread stacks it read or in any other block live at exit",
        ),
        Some(Reach::IndirectlyLost) => (
            "indirectly_lost",
            "the exit-time scan found pointers to these blocks only in lost blocks, and \
             they can be reached from a definitely lost one",
        ),
        Some(Reach::Cycle) => (
            "reference_cycle",
            "the exit-time scan found pointers to these blocks only in lost blocks that \
             lead back to them, such as Rc values that hold each other (or they are \
             reachable only from such a cycle)",
        ),
    };
    (kind, Basis::Inferred, Some(evidence))
}

/// Every `kind` a leak can have, in the order reports list them.
pub const LEAK_KINDS: [&str; 6] = [
    "definitely_lost",
    "indirectly_lost",
    "reference_cycle",
    "reachable_from_static",
    "reachable_from_stack",
    "live_at_exit",
];

impl FrameEntry {
    /// `frame` of one process, `place` being where it lies when it has no function
    /// name: what makes two frames of different processes the same, not its address,
    /// which ASLR changes from one process to the next.
    fn of(frame: &Frame, place: Option<&String>) -> FrameEntry {
        FrameEntry {
            function: frame.function.clone(),
            file: frame.file.clone(),
            line: frame.line,
            inlined: frame.inlined,
            place: place.cloned(),
        }
    }
}

/// Where a frame without a function name lies in its object file (`file+0x…`), or its
/// address when that is unknown.
fn unnamed_place(f: &Frame, symbolizer: &Symbolizer) -> String {
    u64::from_str_radix(f.address.trim_start_matches("0x"), 16)
        .ok()
        .and_then(|addr| symbolizer.file_offset(addr))
        .unwrap_or_else(|| f.address.to_string())
}

fn analyse(
    trace: &Trace,
    options: &ReportOptions,
    loaders: &symbols::Loaders,
    progress: &Progress,
) -> Analysed {
    let mut counted = 0;
    let mut events = trace.events().on_progress(|read| {
        progress.advance(read.saturating_sub(counted));
        counted = read;
    });
    let mut symbolizer = Symbolizer::new(&trace.meta.modules, &options.path_map, loaders);
    let replayed = replay_events(&mut events, &mut symbolizer, options);
    let (tables, damage) = events.finish();
    analysed(trace, replayed, tables, damage, symbolizer, options)
}

/// Analyses the trace at `path` while its process still writes it (see
/// `follow.rs`); `ended` says whether the process has ended. `None` if the trace could
/// not be followed to its end: then it is to be analysed whole, with [`analyse`].
fn analyse_following(
    path: &Path,
    ended: impl FnMut() -> bool,
    options: &ReportOptions,
    loaders: &symbols::Loaders,
    progress: &Progress,
) -> Option<Analysed> {
    let (mut found, mut counted) = (0, 0);
    let mut events = Following::open(path, ended)?.on_progress(|f, read| {
        progress.grow(f.saturating_sub(found));
        progress.advance(read.saturating_sub(counted));
        (found, counted) = (f, read);
    });
    let mut symbolizer = Symbolizer::new(events.modules(), &options.path_map, loaders);
    let replayed = replay_events(&mut events, &mut symbolizer, options);
    let (trace, tables) = events.finish().ok()?;
    Some(analysed(
        &trace,
        replayed,
        tables,
        Vec::new(),
        symbolizer,
        options,
    ))
}

/// What the replay of one trace's events found, before the report's figures are
/// made from it.
struct Replayed {
    snap: Snapshot,
    collector: crate::instrument::Collector,
    /// The process ran libtest's harness.
    libtest: bool,
}

/// Replays a trace's events, classifying each stack on its first allocation.
fn replay_events<S: EventSource>(
    events: &mut S,
    symbolizer: &mut Symbolizer,
    options: &ReportOptions,
) -> Replayed {
    let mut collector = crate::instrument::Collector::default();
    // Per-test figures leave out the blocks of libtest's harness and of std's
    // bookkeeping: each stack is classified when a block is first allocated with it.
    let mut harness = HarnessStacks::default();
    // Decoding, merging and classifying (here) overlap with the replay (on a thread of
    // its own), which gets the events in batches with the stacks classified meanwhile.
    let (batches, received) = std::sync::mpsc::sync_channel::<Batch>(4);
    // Emptied batches come back to be filled again: their memory stays mapped.
    let (spare, emptied) = std::sync::mpsc::channel::<Vec<crate::trace::Event>>();
    let tests = options.tests;
    let snap = std::thread::scope(|scope| {
        let replayer = scope.spawn(move || {
            let drops: RefCell<FxHashMap<u64, bool>> = RefCell::default();
            let stream = Received {
                batches: received,
                spare,
                events: Vec::new(),
                next: 0,
                drops: &drops,
            };
            if tests {
                let drop = |stack| drops.borrow().get(&stack).copied().unwrap_or(false);
                replay::replay_without(stream, drop)
            } else {
                replay::replay(stream)
            }
        });
        let mut batch = Batch::new(Vec::with_capacity(Batch::EVENTS));
        while let Some(e) = events.next() {
            collector.observe(&e);
            if tests {
                if let EventKind::Alloc { stack, .. } | EventKind::ReallocAlloc { stack, .. } =
                    e.kind
                {
                    let tables = events.tables();
                    if let Some(drop) = harness.classify(stack, tables, symbolizer, options) {
                        batch.classified.push((stack, drop));
                    }
                }
            }
            batch.events.push(e);
            if batch.events.len() == Batch::EVENTS {
                let next = emptied
                    .try_recv()
                    .unwrap_or_else(|_| Vec::with_capacity(Batch::EVENTS));
                if batches
                    .send(std::mem::replace(&mut batch, Batch::new(next)))
                    .is_err()
                {
                    break; // the replay panicked: its panic is raised below
                }
            }
        }
        let _ = batches.send(batch);
        drop(batches);
        replayer
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    });
    Replayed {
        snap,
        collector,
        libtest: harness.libtest,
    }
}

/// The figures of one process, from its trace and what its replay found.
fn analysed(
    trace: &Trace,
    replayed: Replayed,
    tables: Tables,
    mut damage: Vec<String>,
    mut symbolizer: Symbolizer,
    options: &ReportOptions,
) -> Analysed {
    let Replayed {
        mut snap,
        collector,
        libtest,
    } = replayed;
    let tests = options.tests;
    // A fork child's trace starts at the fork: its frees of blocks it inherited from
    // its parent pair with no recorded allocation, and are not problems.
    let forked = trace.header.flags & memscope::format::FLAG_FORKED != 0;
    let mut inherited_frees = 0;
    if forked {
        let inherited =
            |k: &ProblemKind| matches!(k, ProblemKind::UnknownFree | ProblemKind::UnknownRealloc);
        snap.problems.retain(|p| !inherited(&p.kind));
        snap.problem_counts.retain(|k, n| {
            if inherited(k) {
                inherited_frees += *n;
            }
            !inherited(k)
        });
    }
    damage.splice(0..0, trace.damage.iter().cloned());
    // With part of a trace missing, a free whose allocation is in that part looks like
    // a free of an unknown pointer: such problems are not facts, so they are only
    // counted, as damage.
    let mut problems_found: u64 = snap.problem_counts.values().sum();
    let mut shown_problems = &snap.problems[..];
    if !damage.is_empty() && problems_found > 0 {
        damage.push(format!(
            "{problems_found} frees or reallocations did not pair with a recorded allocation; \
             with part of the trace missing they are not reported as problems"
        ));
        problems_found = 0;
        shown_problems = &[];
    }

    let pid = trace.header.pid;
    let clock = Clock::fit(&trace.meta.clocks, trace.header.start_unix_ns);
    let ns = |ts: u64| clock.map(|c| c.ns(ts));
    let thread_ref = |thread: u32, blocks: u64| ThreadRef {
        pid,
        thread,
        name: tables.threads.get(&thread).and_then(|t| t.name.clone()),
        blocks,
        bytes: 0,
    };

    let mut sites = site_drafts(&snap, &tables, &mut symbolizer, options, pid);
    let frames = symbolizer.take_table();
    let places = frames
        .iter()
        .map(|f| f.function.is_none().then(|| unnamed_place(f, &symbolizer)))
        .collect();
    for group in replay::leaks(&snap, &trace.meta.reach) {
        sites[group.site as usize].leaked.push(LeakDraft {
            reach: group.reach,
            blocks: group.blocks,
            bytes: group.bytes,
            largest: group.largest,
            threads: group
                .threads
                .iter()
                .map(|&(t, n, bytes)| ThreadRef {
                    bytes,
                    ..thread_ref(t, n)
                })
                .collect(),
        });
    }

    let peak_time = ns(snap.totals.peak_ts);
    let summary = process_summary(&snap, &sites, &damage, trace, peak_time, problems_found);
    let threads = threads(&snap, tests && libtest, &tables, pid, ns);
    let timeline = Timeline {
        pid,
        unit: if clock.is_some() { "ns" } else { "ticks" }.into(),
        points: snap
            .timeline
            .iter()
            .map(|&(ts, bytes)| Point {
                t: ns(ts).unwrap_or(ts.saturating_sub(snap.first_ts.unwrap_or(0))),
                bytes,
            })
            .collect(),
    };
    let problems = shown_problems
        .iter()
        .map(|p| {
            let site = p.site.map(|s| s as usize);
            let where_ = site
                .and_then(|s| sites[s].site.location.as_ref())
                .map(location_text)
                .unwrap_or_default();
            let evidence = problem_evidence(p, &where_, |t| thread_ref(t, 0).name, ns);
            let problem = Problem {
                kind: problem_kind(p.kind).into(),
                pid,
                thread: thread_ref(p.thread, 0),
                time_ns: ns(p.ts),
                address: format!("{:#x}", p.addr),
                site: None,
                basis: Basis::Observed,
                evidence,
            };
            (problem, site)
        })
        .collect();

    let end_ts = trace.meta.end.map(|e| e.ts).or(snap.last_ts);
    let process = Process {
        pid,
        ppid: trace.header.ppid,
        forked,
        frees_of_inherited_blocks: inherited_frees,
        trace: trace.path().display().to_string(),
        complete: damage.is_empty(),
        damage,
        duration_ns: end_ts.and_then(ns),
        summary,
        memscope: MemscopeOwn {
            allocations: snap.internal.allocations + snap.internal.reallocations,
            bytes_allocated: snap.internal.bytes_allocated,
            live_blocks_at_exit: snap.internal.live_blocks,
            live_bytes_at_exit: snap.internal.live_bytes,
        },
        symbols: symbolizer.status(),
    };
    let mut instrumented = collector.finish(&snap, &tables.names, pid);
    for (site, refs) in std::mem::take(&mut instrumented.site_variables) {
        sites[site as usize].site.variables = refs;
    }
    for (site, refs) in std::mem::take(&mut instrumented.leak_variables) {
        sites[site as usize].leak_variables = refs;
    }
    drop_aside((snap, tables));
    Analysed {
        process,
        sites,
        frames,
        places,
        threads,
        timeline,
        problems,
        instrumented,
    }
}

/// Frees `value` on a thread of its own: a large trace's replay state and tables are
/// many blocks, freed meanwhile instead of before the report can be merged. (Where
/// no thread can be started, `spawn` drops it here.)
fn drop_aside<T: Send + 'static>(value: T) {
    let _ = std::thread::Builder::new().spawn(move || drop(value));
}

fn site_drafts(
    snap: &Snapshot,
    tables: &Tables,
    symbolizer: &mut Symbolizer,
    options: &ReportOptions,
    pid: u32,
) -> Vec<SiteDraft> {
    let peak = snap.totals.peak_bytes;
    snap.sites
        .iter()
        .map(|s| {
            let addrs = tables.stacks.get(&s.stack).map(|f| &f[..]).unwrap_or(&[]);
            let ids = symbolizer.stack_ids(addrs);
            let stack: Vec<&Frame> = ids.iter().map(|&i| symbolizer.frame(i)).collect();
            let (at, origin) = symbols::site_frame(&stack, &options.user_roots);
            let location = at.map(|i| &stack[i]).map(|f| Location {
                function: f.function.as_deref().map(str::to_owned),
                file: f.file.as_deref().map(str::to_owned),
                line: f.line,
            });
            let internal = if s.internal {
                let evidence =
                    "flagged INTERNAL in the trace: allocated by memscope's runtime itself";
                Some(("memscope", Basis::Observed, evidence.to_string()))
            } else if s.live_blocks > 0 {
                symbols::std_bookkeeping(&stack, &options.user_roots)
                    .map(|e| ("std", Basis::Inferred, e))
            } else {
                None
            };
            SiteDraft {
                frames: ids,
                site: Site {
                    id: 0,
                    location,
                    origin,
                    allocations: s.allocations,
                    reallocations: s.reallocations,
                    bytes_allocated: s.bytes_allocated,
                    bytes_at_peak: if s.internal { 0 } else { s.peak_bytes },
                    peak_share: share(s.peak_bytes, peak),
                    live_blocks_at_exit: s.live_blocks,
                    live_bytes_at_exit: s.live_bytes,
                    pids: vec![pid],
                    basis: Basis::Observed,
                    stack: Stack::new(),
                    variables: Vec::new(),
                },
                leaked: Vec::new(),
                internal,
                memscope: s.internal,
                leak_variables: Vec::new(),
            }
        })
        .collect()
}

fn process_summary(
    snap: &Snapshot,
    sites: &[SiteDraft],
    damage: &[String],
    trace: &Trace,
    peak_time_ns: Option<u64>,
    problems: u64,
) -> Summary {
    let t = &snap.totals;
    let std_internal = sites.iter().filter(|d| !d.memscope && d.internal.is_some());
    let (internal_blocks, internal_bytes) = std_internal.fold((0, 0), |(n, b), d| {
        (
            n + d.site.live_blocks_at_exit,
            b + d.site.live_bytes_at_exit,
        )
    });
    Summary {
        complete: damage.is_empty(),
        allocations: t.allocations,
        zeroed_allocations: t.zeroed_allocations,
        reallocations: t.reallocations,
        frees: t.frees,
        bytes_allocated: t.bytes_allocated,
        peak_bytes: t.peak_bytes,
        peak_blocks: t.peak_blocks,
        peak_time_ns: if t.peak_bytes > 0 { peak_time_ns } else { None },
        live_blocks_at_exit: t.live_blocks,
        live_bytes_at_exit: t.live_bytes,
        leaked_blocks: t.live_blocks - internal_blocks,
        leaked_bytes: t.live_bytes - internal_bytes,
        runtime_internal_blocks: internal_blocks,
        runtime_internal_bytes: internal_bytes,
        leak_kinds: leak_kinds(sites),
        leak_scan: trace.meta.scan.map(|s| LeakScan {
            processes: 1,
            static_bytes: s.static_bytes,
            stack_bytes: s.stack_bytes,
            stacks: s.stacks,
            unreadable_bytes: s.unreadable_bytes,
        }),
        problems,
        events_dropped: trace.meta.end.map_or(0, |e| e.dropped),
    }
}

/// The leaked blocks and bytes of `sites` by leak kind, every kind listed.
fn leak_kinds(sites: &[SiteDraft]) -> BTreeMap<String, Amount> {
    let mut kinds: BTreeMap<String, Amount> = LEAK_KINDS
        .iter()
        .map(|k| (k.to_string(), Amount::default()))
        .collect();
    for d in sites.iter().filter(|d| !d.memscope && d.internal.is_none()) {
        for l in &d.leaked {
            let amount = kinds.entry(leak_kind(l.reach).0.into()).or_default();
            amount.blocks += l.blocks;
            amount.bytes += l.bytes;
        }
    }
    kinds
}

/// Which stacks allocate blocks of libtest's harness or of std's bookkeeping, decided
/// once per stack; and whether the process is a test binary (libtest's harness
/// allocated in it).
#[derive(Default)]
struct HarnessStacks {
    /// Stacks classified so far (the replay keeps what was decided).
    seen: rustc_hash::FxHashSet<u64>,
    /// Stacks classified lately, by their low bits (stack ids are hashes): most
    /// allocations repeat one of them, and this is checked before `seen`.
    recent: Vec<u64>,
    libtest: bool,
    /// The frames' facts of the stack being classified (one buffer, reused).
    facts: Vec<symbols::Facts>,
}

impl HarnessStacks {
    const RECENT: usize = 1024;

    /// Classifies `stack` the first time it is seen: whether its blocks are dropped
    /// from per-test figures; `None` when it was classified before (or is no stack).
    fn classify(
        &mut self,
        stack: u64,
        tables: &Tables,
        symbolizer: &mut Symbolizer,
        options: &ReportOptions,
    ) -> Option<bool> {
        if self.recent.is_empty() {
            self.recent = vec![0; Self::RECENT];
        }
        let recent = &mut self.recent[stack as usize % Self::RECENT];
        if stack == 0 || *recent == stack {
            return None;
        }
        *recent = stack;
        if !self.seen.insert(stack) {
            return None;
        }
        let addrs = tables.stacks.get(&stack).map_or(&[][..], |f| &f[..]);
        symbolizer.stack_facts(addrs, &options.user_roots, &mut self.facts);
        let (libtest, bookkeeping) = symbols::harness_and_bookkeeping(&self.facts);
        self.libtest |= libtest;
        Some(bookkeeping)
    }
}

/// Events on their way from the decoding thread to the replay, with the stacks
/// classified while they were decoded (see [`HarnessStacks`]).
struct Batch {
    events: Vec<crate::trace::Event>,
    classified: Vec<(u64, bool)>,
}

impl Batch {
    const EVENTS: usize = 4096;

    fn new(events: Vec<crate::trace::Event>) -> Batch {
        Batch {
            events,
            classified: Vec::new(),
        }
    }
}

/// The replay's side of the batches: their events one by one, with what was
/// classified meanwhile put into `drops` first; each emptied batch goes back.
struct Received<'a> {
    batches: std::sync::mpsc::Receiver<Batch>,
    spare: std::sync::mpsc::Sender<Vec<crate::trace::Event>>,
    events: Vec<crate::trace::Event>,
    next: usize,
    drops: &'a RefCell<FxHashMap<u64, bool>>,
}

impl Iterator for Received<'_> {
    type Item = crate::trace::Event;

    fn next(&mut self) -> Option<crate::trace::Event> {
        loop {
            if let Some(&e) = self.events.get(self.next) {
                self.next += 1;
                return Some(e);
            }
            let batch = self.batches.recv().ok()?;
            self.drops.borrow_mut().extend(batch.classified);
            let mut used = std::mem::replace(&mut self.events, batch.events);
            self.next = 0;
            if used.capacity() >= Batch::EVENTS {
                used.clear();
                let _ = self.spare.send(used);
            }
        }
    }
}

fn threads(
    snap: &Snapshot,
    without_harness: bool,
    tables: &Tables,
    pid: u32,
    ns: impl Fn(u64) -> Option<u64>,
) -> Vec<Thread> {
    let mut ids: Vec<u32> = snap
        .threads
        .keys()
        .chain(tables.threads.keys())
        .copied()
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids.into_iter()
        .map(|id| {
            let s = snap.threads.get(&id).cloned().unwrap_or_default();
            let info = tables.threads.get(&id).cloned().unwrap_or_default();
            Thread {
                pid,
                thread: id,
                os_tid: info.os_tid,
                name: info.name,
                allocations: s.allocations,
                reallocations: s.reallocations,
                frees: s.frees,
                bytes_allocated: s.bytes_allocated,
                peak_bytes: s.peak_bytes,
                live_blocks_at_exit: s.live_blocks,
                live_bytes_at_exit: s.live_bytes,
                first_event_ns: s.first_ts.and_then(&ns),
                last_event_ns: s.first_ts.and_then(|_| ns(s.last_ts)),
                without_harness: without_harness.then_some(ThreadFigures {
                    allocations: s.kept.allocations,
                    reallocations: s.kept.reallocations,
                    bytes_allocated: s.kept.bytes_allocated,
                    peak_bytes: s.kept.peak_bytes,
                    live_blocks_at_exit: s.kept.live_blocks,
                    live_bytes_at_exit: s.kept.live_bytes,
                }),
            }
        })
        .collect()
}

fn problem_kind(kind: ProblemKind) -> &'static str {
    match kind {
        ProblemKind::DoubleFree => "double_free",
        ProblemKind::UnknownFree => "unknown_free",
        ProblemKind::UnknownRealloc => "unknown_realloc",
        ProblemKind::AddressStillLive => "address_still_live",
    }
}

fn problem_evidence(
    p: &replay::Problem,
    site: &str,
    name: impl Fn(u32) -> Option<String>,
    ns: impl Fn(u64) -> Option<u64>,
) -> String {
    let who = |thread: u32, ts: u64| {
        let name = name(thread).unwrap_or_else(|| format!("#{thread}"));
        match ns(ts) {
            Some(t) => format!("thread {name} at {}", crate::summary::duration(t)),
            None => format!("thread {name}"),
        }
    };
    let allocated = if site.is_empty() {
        String::new()
    } else {
        format!("; the block was allocated at {site}")
    };
    match p.kind {
        ProblemKind::DoubleFree => {
            let (ts, thread) = p.first_free.unwrap_or((p.ts, p.thread));
            format!(
                "freed by {}, after it was already freed by {}{allocated}",
                who(p.thread, p.ts),
                who(thread, ts)
            )
        }
        ProblemKind::UnknownFree => {
            format!(
                "freed by {}, but no recorded allocation returned this address",
                who(p.thread, p.ts)
            )
        }
        ProblemKind::UnknownRealloc => {
            format!(
                "reallocated by {}, but no recorded allocation returned this address",
                who(p.thread, p.ts)
            )
        }
        ProblemKind::AddressStillLive => format!(
            "an allocation by {} returned this address while an earlier block there was live: \
             that block's free was not recorded{allocated}",
            who(p.thread, p.ts)
        ),
    }
}

/// `file:line (function)`, for evidence sentences.
pub fn location_text(l: &Location) -> String {
    let function = l.function.as_deref().unwrap_or("?");
    match (&l.file, l.line) {
        (Some(file), Some(line)) => format!("{file}:{line} ({function})"),
        (Some(file), None) => format!("{file} ({function})"),
        _ => function.to_string(),
    }
}

fn share(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

// ---------------------------------------------------------------------------------
// All processes.

/// Merges processes, added in the traces' order, into one report.
///
/// Frames that are the same in every process get one key, their index in one table of
/// frames: a process's frame id → its key, found once per frame, not once per site it
/// is in. (The keys come in the order the merged sites first use them: a site that
/// joins an earlier one has the same keys.) Sites with the same stack of keys are one
/// site, whichever process; a merged site keeps the frames of the first process that
/// has it.
#[derive(Default)]
struct Merger {
    summary: Summary,
    keys: FxHashMap<FrameEntry, u32>,
    frames: Vec<FrameEntry>,
    /// Each process's frame ids → their keys (`u32::MAX`: not used by a site).
    key_of: Vec<Vec<u32>>,
    index: FxHashMap<(bool, Box<[u32]>), usize>,
    merged: Vec<SiteDraft>,
    /// The process each merged site keeps the frames of.
    merged_from: Vec<usize>,
    processes: Vec<Process>,
    threads: Vec<Thread>,
    timeline: Vec<Timeline>,
    problems: Vec<Problem>,
    scopes: Vec<crate::instrument::Scope>,
    variables: Vec<crate::instrument::Variable>,
    tasks: Vec<crate::instrument::Task>,
}

impl Merger {
    fn new() -> Merger {
        Merger {
            // Each process's completeness is and-ed in.
            summary: Summary {
                complete: true,
                ..Summary::default()
            },
            ..Merger::default()
        }
    }

    fn add(&mut self, a: Analysed) {
        let p = self.processes.len();
        add_summary(&mut self.summary, &a.process.summary);
        let offset = self.scopes.len();
        self.scopes
            .extend(a.instrumented.scopes.into_iter().map(|mut s| {
                s.id += offset;
                s.parent = s.parent.map(|p| p + offset);
                s
            }));
        self.variables.extend(a.instrumented.variables);
        self.tasks.extend(a.instrumented.tasks);
        let (table, places) = (a.frames, a.places);
        let mut key_of = vec![u32::MAX; table.len()];
        let mut map = Vec::with_capacity(a.sites.len());
        self.index.reserve(a.sites.len());
        for mut draft in a.sites {
            let key: Box<[u32]> = draft
                .frames
                .iter()
                .map(|&f| {
                    let key = &mut key_of[f as usize];
                    if *key == u32::MAX {
                        let frame = FrameEntry::of(&table[f as usize], places[f as usize].as_ref());
                        *key = match self.keys.entry(frame) {
                            Entry::Occupied(known) => *known.get(),
                            Entry::Vacant(new) => {
                                self.frames.push(new.key().clone());
                                *new.insert(self.frames.len() as u32 - 1)
                            }
                        };
                    }
                    *key
                })
                .collect();
            let at = match self.index.entry((draft.memscope, key)) {
                Entry::Occupied(at) => *at.get(),
                Entry::Vacant(slot) => {
                    self.merged.push(draft.take_empty());
                    self.merged_from.push(p);
                    *slot.insert(self.merged.len() - 1)
                }
            };
            absorb(&mut self.merged[at], draft);
            map.push(at);
        }
        self.key_of.push(key_of);
        self.problems
            .extend(a.problems.into_iter().map(|(mut p, site)| {
                p.site = site.map(|s| map[s]);
                p
            }));
        self.processes.push(a.process);
        self.threads.extend(a.threads);
        self.timeline.push(a.timeline);
    }

    fn finish(self) -> Report {
        let Merger {
            mut summary,
            frames,
            key_of,
            mut merged,
            merged_from,
            processes,
            threads,
            timeline,
            mut problems,
            scopes,
            variables,
            tasks,
            ..
        } = self;
        if let [only] = &processes[..] {
            summary.peak_time_ns = only.summary.peak_time_ns;
        }

        // Rank the program's sites by bytes, then count; ids are ranks.
        let mut order: Vec<usize> = (0..merged.len()).filter(|&i| !merged[i].memscope).collect();
        order.sort_by(|&a, &b| {
            let (a, b) = (&merged[a].site, &merged[b].site);
            (b.bytes_allocated, b.allocations + b.reallocations)
                .cmp(&(a.bytes_allocated, a.allocations + a.reallocations))
        });
        let mut rank = vec![None; merged.len()];
        for (r, &i) in order.iter().enumerate() {
            rank[i] = Some(r);
        }
        for p in &mut problems {
            p.site = p.site.and_then(|s| rank[s]);
        }

        // Stacks become indexes into the table of frames: their keys.
        let stacks: Vec<Stack> = merged
            .iter_mut()
            .zip(&merged_from)
            .map(|(d, &p)| {
                std::mem::take(&mut d.frames)
                    .into_iter()
                    .map(|f| key_of[p][f as usize] as usize)
                    .collect()
            })
            .collect();

        let mut leaks = Vec::new();
        let mut runtime_internal = Vec::new();
        for (i, d) in merged.iter().enumerate() {
            if d.site.live_blocks_at_exit == 0 {
                continue;
            }
            let location = d.site.location.clone();
            match &d.internal {
                Some((origin, basis, evidence)) => runtime_internal.push(InternalGroup {
                    origin: origin.to_string(),
                    site: rank[i],
                    location,
                    blocks: d.site.live_blocks_at_exit,
                    bytes: d.site.live_bytes_at_exit,
                    basis: *basis,
                    evidence: evidence.clone(),
                    stack: stacks[i].clone(),
                }),
                None => {
                    for l in &d.leaked {
                        let (kind, basis, evidence) = leak_kind(l.reach);
                        leaks.push(Leak {
                            site: rank[i].expect("program sites are ranked"),
                            location: location.clone(),
                            kind: kind.into(),
                            blocks: l.blocks,
                            bytes: l.bytes,
                            largest_block: l.largest,
                            threads: l.threads.clone(),
                            basis,
                            evidence: evidence.map(String::from),
                            stack: stacks[i].clone(),
                            variables: d.leak_variables.clone(),
                        });
                    }
                }
            }
        }
        leaks.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.site.cmp(&b.site)));
        runtime_internal.sort_by_key(|g| std::cmp::Reverse(g.bytes));

        let peak = summary.peak_bytes;
        let mut stacks = stacks;
        let mut drafts: Vec<Option<SiteDraft>> = merged.into_iter().map(Some).collect();
        let mut sites: Vec<Site> = order
            .iter()
            .filter_map(|&i| {
                let draft = drafts[i].take()?;
                Some(Site {
                    stack: std::mem::take(&mut stacks[i]),
                    ..draft.site
                })
            })
            .collect();
        for (r, s) in sites.iter_mut().enumerate() {
            s.id = r;
            s.peak_share = share(s.bytes_at_peak, peak);
        }

        Report {
            schema_version: SCHEMA_VERSION,
            memscope_version: env!("CARGO_PKG_VERSION").into(),
            summary,
            processes,
            sites,
            leaks,
            runtime_internal,
            threads,
            timeline,
            problems,
            test_binaries: Vec::new(),
            tests: Vec::new(),
            scopes,
            variables,
            tasks,
            frames,
        }
    }
}

impl SiteDraft {
    /// The same site with no figures, to add processes' figures to; takes the frames,
    /// the location and what makes it runtime-internal, which [`absorb`] does not read.
    fn take_empty(&mut self) -> SiteDraft {
        let s = &mut self.site;
        SiteDraft {
            frames: std::mem::take(&mut self.frames),
            site: Site {
                id: 0,
                location: s.location.take(),
                origin: s.origin,
                allocations: 0,
                reallocations: 0,
                bytes_allocated: 0,
                bytes_at_peak: 0,
                peak_share: 0.0,
                live_blocks_at_exit: 0,
                live_bytes_at_exit: 0,
                pids: Vec::new(),
                basis: s.basis,
                stack: Stack::new(),
                variables: Vec::new(),
            },
            leaked: Vec::new(),
            internal: self.internal.take(),
            memscope: self.memscope,
            leak_variables: Vec::new(),
        }
    }
}

fn absorb(into: &mut SiteDraft, from: SiteDraft) {
    let (a, b) = (&mut into.site, from.site);
    a.allocations += b.allocations;
    a.reallocations += b.reallocations;
    a.bytes_allocated += b.bytes_allocated;
    a.bytes_at_peak += b.bytes_at_peak;
    a.live_blocks_at_exit += b.live_blocks_at_exit;
    a.live_bytes_at_exit += b.live_bytes_at_exit;
    for pid in b.pids {
        if !a.pids.contains(&pid) {
            a.pids.push(pid);
        }
    }
    for leak in from.leaked {
        match into.leaked.iter_mut().find(|l| l.reach == leak.reach) {
            Some(l) => {
                l.blocks += leak.blocks;
                l.bytes += leak.bytes;
                l.largest = l.largest.max(leak.largest);
                for t in leak.threads {
                    match l
                        .threads
                        .iter_mut()
                        .find(|u| u.pid == t.pid && u.thread == t.thread)
                    {
                        Some(u) => {
                            u.blocks += t.blocks;
                            u.bytes += t.bytes;
                        }
                        None => l.threads.push(t),
                    }
                }
                l.threads
                    .sort_by(|a, b| b.blocks.cmp(&a.blocks).then(a.thread.cmp(&b.thread)));
            }
            None => into.leaked.push(leak),
        }
    }
    crate::instrument::merge_refs(&mut into.site.variables, b.variables);
    crate::instrument::merge_refs(&mut into.leak_variables, from.leak_variables);
    if into.internal.is_none() {
        into.internal = from.internal;
    }
}

fn add_summary(into: &mut Summary, s: &Summary) {
    into.complete &= s.complete;
    into.allocations += s.allocations;
    into.zeroed_allocations += s.zeroed_allocations;
    into.reallocations += s.reallocations;
    into.frees += s.frees;
    into.bytes_allocated += s.bytes_allocated;
    into.peak_bytes += s.peak_bytes;
    into.peak_blocks += s.peak_blocks;
    into.live_blocks_at_exit += s.live_blocks_at_exit;
    into.live_bytes_at_exit += s.live_bytes_at_exit;
    into.leaked_blocks += s.leaked_blocks;
    into.leaked_bytes += s.leaked_bytes;
    into.runtime_internal_blocks += s.runtime_internal_blocks;
    into.runtime_internal_bytes += s.runtime_internal_bytes;
    for (kind, amount) in &s.leak_kinds {
        let sum = into.leak_kinds.entry(kind.clone()).or_default();
        sum.blocks += amount.blocks;
        sum.bytes += amount.bytes;
    }
    if let Some(scan) = s.leak_scan {
        let sum = into.leak_scan.get_or_insert_with(LeakScan::default);
        sum.processes += scan.processes;
        sum.static_bytes += scan.static_bytes;
        sum.stack_bytes += scan.stack_bytes;
        sum.stacks += scan.stacks;
        sum.unreadable_bytes += scan.unreadable_bytes;
    }
    into.problems += s.problems;
    into.events_dropped += s.events_dropped;
}

// ---------------------------------------------------------------------------------
// Progress (the only user of indicatif).

/// A progress bar over the trace bytes, drawn only when asked for.
struct Progress(Option<indicatif::ProgressBar>);

impl Progress {
    fn new(enabled: bool, total: u64) -> Progress {
        if !enabled {
            return Progress(None);
        }
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(total),
            indicatif::ProgressDrawTarget::stderr(),
        );
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "memscope: analysing {bar:30} {binary_bytes}/{binary_total_bytes} ({eta})",
        ) {
            bar.set_style(style);
        }
        Progress(Some(bar))
    }

    /// A bar not drawn until [`show`](Self::show), whose total grows with each trace
    /// taken ([`grow`](Self::grow)).
    fn hidden(enabled: bool) -> Progress {
        let progress = Progress::new(enabled, 0);
        if let Some(bar) = &progress.0 {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        progress
    }

    fn show(&self) {
        if let Some(bar) = &self.0 {
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
    }

    fn grow(&self, bytes: u64) {
        if let Some(bar) = &self.0 {
            bar.inc_length(bytes);
        }
    }

    fn advance(&self, bytes: u64) {
        if let Some(bar) = &self.0 {
            bar.inc(bytes);
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::testing::*;
    use memscope::format::Record;

    fn options(dir: &Path) -> ReportOptions {
        ReportOptions {
            output_dir: dir.join("out"),
            path_map: Vec::new(),
            user_roots: Vec::new(),
            color: false,
            progress: false,
            tests: true,
            symbol_cache: None,
        }
    }

    fn read_json(dir: &Path) -> serde_json::Value {
        let json = fs::read_to_string(options(dir).output_dir.join("report.json")).unwrap();
        serde_json::from_str(&json).unwrap()
    }

    fn program(end: Option<u64>) -> TraceBytes {
        program_events(TraceBytes::new()).meta(0, end)
    }

    /// [`program`]'s thread chunk, appended to `trace`.
    fn program_events(trace: TraceBytes) -> TraceBytes {
        let (big, big_stack) = stack(&[0x1111]);
        let (small, small_stack) = stack(&[0x2222]);
        trace.chunk(
            1,
            0,
            &[
                thread("main"),
                big,
                small,
                alloc(10, 0xa0, 4096, big_stack),
                alloc(20, 0xb0, 100, small_stack),
                Record::Realloc {
                    internal: false,
                    ts_before: 30,
                    ts_after: 31,
                    old_addr: 0xb0,
                    new_addr: 0xc0,
                    new_size: 300,
                    align: 8,
                    stack: small_stack,
                },
                internal_alloc(35, 0xd0, 64),
                free(40, 0xc0),
                free(50, 0xc0),
            ],
        )
    }

    #[test]
    fn report_json_has_the_schema_version_and_exact_figures() {
        let dir = tempfile::tempdir().unwrap();
        let trace = program(Some(60)).write(dir.path(), "p.mstrace");
        let report = generate(&[trace], &options(dir.path())).unwrap();
        let json = read_json(dir.path());
        assert_eq!(json["schema_version"], 4);
        let s = &json["summary"];
        let field = |name: &str| s[name].as_u64().unwrap();
        assert_eq!(field("allocations"), 2);
        assert_eq!(field("reallocations"), 1);
        assert_eq!(field("frees"), 1);
        assert_eq!(field("bytes_allocated"), 4096 + 100 + 300);
        assert_eq!(field("peak_bytes"), 4396);
        assert_eq!(field("peak_time_ns"), 31);
        assert_eq!(
            (field("live_blocks_at_exit"), field("live_bytes_at_exit")),
            (1, 4096)
        );
        assert_eq!((field("leaked_blocks"), field("leaked_bytes")), (1, 4096));
        assert_eq!(field("problems"), 1);
        assert_eq!(s["complete"], true);
        let totals = &report.summary;
        assert_eq!(
            (totals.leaked_blocks, totals.leaked_bytes, totals.peak_bytes),
            (1, 4096, 4396)
        );

        assert_eq!(json["sites"][0]["bytes_allocated"], 4096);
        let top = json["sites"][0]["stack"][0].as_u64().unwrap() as usize;
        // No object file holds the address: it is the place.
        assert_eq!(json["frames"][top]["place"], "0x1111");
        assert_eq!(json["frames"][top].get("address"), None);
        assert_eq!(json["leaks"][0]["bytes"], 4096);
        assert_eq!(json["leaks"][0]["basis"], "observed");
        assert_eq!(json["leaks"][0]["threads"][0]["name"], "main");
        assert_eq!(json["problems"][0]["kind"], "double_free");
        assert_eq!(json["problems"][0]["site"], 1);
        assert_eq!(json["runtime_internal"][0]["origin"], "memscope");
        assert_eq!(json["runtime_internal"][0]["bytes"], 64);
        assert_eq!(json["processes"][0]["memscope"]["live_bytes_at_exit"], 64);
        assert_eq!(json["threads"][0]["name"], "main");
        assert_eq!(json["timeline"][0]["unit"], "ns");
    }

    #[test]
    fn the_summary_sums_processes_and_equal_stacks_are_one_site() {
        let dir = tempfile::tempdir().unwrap();
        let a = program(Some(60)).write(dir.path(), "a.mstrace");
        let b = program(Some(60)).write(dir.path(), "b.mstrace");
        generate(&[a, b], &options(dir.path())).unwrap();
        let json = read_json(dir.path());
        assert_eq!(json["summary"]["allocations"], 4);
        assert_eq!(json["summary"]["peak_bytes"], 2 * 4396);
        assert_eq!(json["summary"]["peak_time_ns"], serde_json::Value::Null);
        assert_eq!(json["processes"].as_array().unwrap().len(), 2);
        assert_eq!(json["sites"].as_array().unwrap().len(), 2);
        assert_eq!(json["sites"][0]["bytes_allocated"], 2 * 4096);
        assert_eq!(json["sites"][0]["peak_share"], 4096.0 / 4396.0);
        assert_eq!(json["leaks"][0]["blocks"], 2);
    }

    /// A process whose one allocation's stack is two return addresses in an object
    /// file without symbols, the inner one at `offset` in it, the file mapped at
    /// `bias` (as ASLR maps it anew in each process).
    fn unnamed_frames_at(bias: u64, offset: u64) -> TraceBytes {
        let (bind, stack_id) = stack(&[bias + offset, bias + 0x200]);
        TraceBytes::new()
            .chunk(1, 0, &[thread("main"), bind, alloc(10, 0xa0, 64, stack_id)])
            .chunk(
                0,
                0,
                &[
                    clock(0),
                    Record::Module {
                        bias,
                        start: bias,
                        end: bias + 0x1000,
                        path: "/nonexistent/lib.so".into(),
                    },
                    Record::End {
                        reason: 0,
                        ts: 20,
                        dropped: 0,
                    },
                ],
            )
    }

    #[test]
    fn a_report_with_many_sites_is_written_byte_for_byte_as_one_pass_writes_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut records = vec![thread("main")];
        for i in 0..1500u64 {
            let (bind, id) = stack(&[0x10_0000 + i * 16, 0x20_0000]);
            records.push(bind);
            records.push(alloc(10 + i, 0xa000 + i * 64, 8 + i, id));
        }
        let trace = TraceBytes::new()
            .chunk(1, 0, &records)
            .meta(0, Some(5000))
            .write(dir.path(), "many.mstrace");
        let report = build(&[trace], &options(dir.path())).unwrap();
        // Enough sites for `write_report` to lay them out apart.
        assert_eq!(report.sites.len(), 1500);

        let mut one_pass = Vec::new();
        crate::json_layout::write(&mut one_pass, &report).unwrap();
        let mut apart = Vec::new();
        crate::json_layout::write_report(&mut apart, &report).unwrap();

        let first_difference = one_pass.iter().zip(&apart).position(|(a, b)| a != b);
        assert_eq!(first_difference, None);
        assert_eq!(apart.len(), one_pass.len());
    }

    #[test]
    fn frames_without_names_are_the_same_site_and_frame_in_processes_that_mapped_them_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let a = unnamed_frames_at(0x10_0000, 0x100).write(dir.path(), "a.mstrace");
        let b = unnamed_frames_at(0x70_0000, 0x100).write(dir.path(), "b.mstrace");
        let c = unnamed_frames_at(0x10_0000, 0x100).write(dir.path(), "c.mstrace");
        let elsewhere = unnamed_frames_at(0x70_0000, 0x180).write(dir.path(), "d.mstrace");
        generate(&[a, b, c, elsewhere], &options(dir.path())).unwrap();
        let json = read_json(dir.path());
        let sites = json["sites"].as_array().unwrap();
        assert_eq!(sites.len(), 2, "{sites:#?}");
        assert_eq!(sites[0]["allocations"], 3);
        assert_eq!(sites[1]["allocations"], 1);
        // Each frame once in the table, known by its place, whichever process: the
        // two sites share their outer frame.
        let places = |site: &serde_json::Value| -> Vec<serde_json::Value> {
            let stack = site["stack"].as_array().unwrap();
            let frame = |i: &serde_json::Value| i.as_u64().unwrap() as usize;
            stack
                .iter()
                .map(|i| json["frames"][frame(i)]["place"].clone())
                .collect()
        };
        let lib = "/nonexistent/lib.so";
        assert_eq!(
            places(&sites[0]),
            [format!("{lib}+0x100"), format!("{lib}+0x200")]
        );
        assert_eq!(
            places(&sites[1]),
            [format!("{lib}+0x180"), format!("{lib}+0x200")]
        );
        assert_eq!(json["frames"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn a_trace_followed_to_its_end_gives_the_report_of_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        // As the runtime writes it: the modules' meta chunk first, the end last.
        let end = Record::End {
            reason: 0,
            ts: 90,
            dropped: 0,
        };
        let path = program_events(TraceBytes::new().meta(0, None))
            .chunk(0, 1, &[clock(2_000_000), end])
            .write(dir.path(), "p.mstrace");
        let options = options(dir.path());
        let loaders = symbols::Loaders::cached(None);
        let progress = Progress::hidden(false);
        let report = |analysed: Analysed| {
            let mut merger = Merger::new();
            merger.add(analysed);
            serde_json::to_value(merger.finish()).unwrap()
        };
        let followed = analyse_following(&path, || true, &options, &loaders, &progress)
            .expect("followed to its end");
        let read_whole = analyse(&Trace::open(&path).unwrap(), &options, &loaders, &progress);
        assert!(followed.process.complete);
        assert_eq!(report(followed), report(read_whole));
    }

    #[test]
    fn the_trace_of_a_running_process_is_analysed_and_handed_over_before_the_run_ends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.mstrace");
        let start = program_events(TraceBytes::new().meta(0, None));
        std::fs::write(&path, &start.bytes).unwrap();
        let options = options(dir.path());
        // Never written: only the trace's own end can end the following.
        let ended = dir.path().join("run.json");
        let ahead = Ahead::start(&options, Running(path.clone(), ended));
        std::thread::sleep(std::time::Duration::from_millis(50));
        let end = Record::End {
            reason: 0,
            ts: 90,
            dropped: 0,
        };
        let written = start.bytes.len();
        let whole = start.chunk(0, 1, &[clock(2_000_000), end]);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut file, &whole.bytes[written..]).unwrap();
        // A trace not followed would wait for its process's end, which never comes.
        let (handed, analysed) = (ahead.analysed)
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("handed over while the run goes on");
        ahead.abandon();
        assert_eq!(handed, path);
        let loaders = symbols::Loaders::cached(None);
        let read_whole = analyse(
            &Trace::open(&path).unwrap(),
            &options,
            &loaders,
            &Progress::hidden(false),
        );
        let report = |analysed: Analysed| {
            let mut merger = Merger::new();
            merger.add(analysed);
            serde_json::to_value(merger.finish()).unwrap()
        };
        assert_eq!(report(analysed), report(read_whole));
    }

    /// One process, running until its trace ends.
    struct Running(PathBuf, PathBuf);

    impl Runs for Running {
        fn ended(&mut self) -> Vec<PathBuf> {
            Vec::new()
        }

        fn running(&mut self) -> Vec<(PathBuf, Option<PathBuf>)> {
            vec![(self.0.clone(), Some(self.1.clone()))]
        }
    }

    /// Hands out the traces once, as ended; none runs.
    struct Handing(Vec<PathBuf>);

    impl Runs for Handing {
        fn ended(&mut self) -> Vec<PathBuf> {
            std::mem::take(&mut self.0)
        }

        fn running(&mut self) -> Vec<(PathBuf, Option<PathBuf>)> {
            Vec::new()
        }
    }

    #[test]
    fn traces_analysed_ahead_give_the_same_report_and_incomplete_ones_are_left_for_later() {
        let dir = tempfile::tempdir().unwrap();
        let first = program(Some(30)).write(dir.path(), "a.mstrace");
        let running = program(Some(60)).write(dir.path(), "b.mstrace");
        let unfinished = program(None).write(dir.path(), "c.mstrace");
        let ended = program(Some(90)).write(dir.path(), "d.mstrace");
        // Merged as it comes, merged after `running` and `unfinished`, analysed at the end.
        let traces = [first.clone(), running, unfinished.clone(), ended.clone()];
        let options = options(dir.path());

        // Handed out once, at any time: `finish` analyses what was not yet.
        let handed = vec![ended.clone(), unfinished.clone(), first];
        let ahead = Ahead::start(&options, Handing(handed));
        let mut ahead = ahead.finish();
        let analysed = ahead.take(&ended).expect("analysed ahead");
        assert!(ahead.take(&unfinished).is_none(), "read again at the end");
        ahead.analysed.received.insert(ended, analysed);

        let with = build_with(&traces, &options, &mut ahead).unwrap();
        let without = build(&traces, &options).unwrap();
        assert_eq!(
            serde_json::to_value(&with).unwrap(),
            serde_json::to_value(&without).unwrap()
        );
        assert_eq!(with.processes.len(), 4);
    }

    #[test]
    fn a_trace_without_its_end_gives_an_incomplete_report_of_what_was_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let trace = program(None).write(dir.path(), "p.mstrace");
        let report = generate(&[trace], &options(dir.path())).unwrap();
        assert!(!report.summary.complete);
        let json = read_json(dir.path());
        assert_eq!(json["summary"]["complete"], false);
        assert_eq!(json["summary"]["allocations"], 2);
        assert_eq!(json["summary"]["problems"], 0);
        assert_eq!(json["problems"].as_array().unwrap().len(), 0);
        assert!(json["processes"][0]["damage"][1]
            .as_str()
            .unwrap()
            .contains("1 frees or reallocations did not pair"));
        assert!(json["processes"][0]["damage"][0]
            .as_str()
            .unwrap()
            .contains("no end record"));
    }

    #[test]
    fn stamps_that_go_back_in_a_trace_without_clock_samples_still_give_a_timeline() {
        // Without clock samples the timeline is in ticks from the first event; a
        // stream whose stamps go back (a trace from a misbehaving writer) must not
        // make that negative.
        let dir = tempfile::tempdir().unwrap();
        let trace = TraceBytes::new()
            .chunk(
                1,
                0,
                &[thread("main"), alloc(100, 0xa0, 8, 0), free(50, 0xa0)],
            )
            .write(dir.path(), "p.mstrace");
        generate(&[trace], &options(dir.path())).unwrap();
        let json = read_json(dir.path());
        assert_eq!(json["timeline"][0]["unit"], "ticks");
        let points = json["timeline"][0]["points"].as_array().unwrap();
        assert!(
            points.iter().all(|p| p["t"].as_u64().is_some()),
            "{points:?}"
        );
    }

    #[test]
    fn a_file_that_is_not_a_trace_is_a_one_line_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.mstrace");
        fs::write(&path, b"definitely not a trace").unwrap();
        let err = generate(&[path], &options(dir.path())).unwrap_err();
        assert!(format!("{err:#}").contains("not a memscope trace"));
    }
}
