//! Per-test attribution: which threads of a test binary's processes were which
//! test's (from what the harness reported, see [`crate::libtest`]), and the
//! `tests[]` / `test_binaries[]` model.
//!
//! libtest runs each test on a thread named after it (also with `--test-threads=1`,
//! checked on Rust 1.95). Linux keeps at most 15 bytes of a thread's name, and a new
//! thread inherits its creator's name unless it is given one. So, for each thread of
//! the binary's process (other than `main`, the harness):
//!
//! 1. A name equal to a test's full name is that test's thread (`observed`). A
//!    truncated name that is the prefix of exactly one test's name is that test's
//!    (`inferred`: "unique 15-byte prefix"). Among several threads with the name, the
//!    one with the lowest stream id (the first to allocate) is the test's own thread;
//!    the others inherited its name, so the test (or a thread of its) spawned them
//!    (`inferred`).
//! 2. A prefix shared by k tests is resolved only when exactly k threads carry it:
//!    the harness prints results in completion order, and each thread's last heap
//!    event comes as it ends, so the two orders pair them (`inferred`). Otherwise the
//!    threads are reported as ambiguous, and those tests get no figures.
//! 3. Any other thread whose first heap event falls while exactly one test thread was
//!    alive is attributed to that test (`inferred`: "started while only that test
//!    ran"), unless it carries a test's name (then it is one of those tests', left as
//!    step 2 left it); else it stays unattributed, with the harness's main thread.
//!
//! Under nextest each process runs one test (`--exact NAME`): every thread of it but
//! `main` is that test's (`observed`), the first named after it being its own.
//!
//! A test's figures sum its threads, except `peak_bytes`: the most bytes live at once
//! among blocks its own thread allocated (spawned threads list their own peaks). They
//! leave out what libtest's harness and std's bookkeeping allocated on those threads
//! (the test's output capture, the channel block that reports its result, the thread's
//! name for the stack-overflow handler): see `report::Thread::without_harness`. That
//! share is listed apart, as `harness`.

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::libtest::Outcome;
use crate::report::{Basis, Location, Report, Thread, ThreadFigures};

/// One test binary that ran, with what its harness said and what no test accounts for.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TestBinary {
    /// The target's root file relative to the workspace (`tests/leaks.rs`).
    pub binary: String,
    pub package: String,
    /// `lib`, `bin`, `test`, `bench` or `example`.
    pub kind: String,
    pub target: String,
    pub executable: String,
    /// Its process, when it ran in one (`None` under nextest: see `tests[].pid`).
    pub pid: Option<u32>,
    /// How many processes ran it (one per test under nextest).
    pub processes: u64,
    /// The harness's exit code (`None` when a signal ended it); with several
    /// processes, the first that was not 0.
    pub exit_code: Option<i32>,
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    /// Threads no test could be attributed to (the harness's `main` among them).
    pub unattributed: Figures,
    /// How attribution went, in sentences (e.g. ambiguous thread names).
    pub notes: Vec<String>,
}

/// Heap figures of a set of threads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Figures {
    pub allocations: u64,
    pub reallocations: u64,
    pub bytes_allocated: u64,
    pub leaked_blocks: u64,
    pub leaked_bytes: u64,
}

/// Allocations on a test's threads that were not the test's own.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HarnessShare {
    pub allocations: u64,
    pub reallocations: u64,
    pub bytes_allocated: u64,
}

/// One test.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TestResult {
    /// [`TestBinary::binary`] of the binary it is in.
    pub binary: String,
    /// The full test name, as the harness prints it.
    pub name: String,
    /// `passed`, `failed`, `ignored` or `bench`.
    pub outcome: String,
    /// The process it ran in (`None` when it did not run).
    pub pid: Option<u32>,
    /// The figures are `null` when no thread could be attributed to the test.
    pub allocations: Option<u64>,
    pub reallocations: Option<u64>,
    pub bytes_allocated: Option<u64>,
    pub peak_bytes: Option<u64>,
    pub leaked_blocks: Option<u64>,
    pub leaked_bytes: Option<u64>,
    /// What libtest's harness and std's bookkeeping allocated on the test's threads,
    /// left out of the figures above (`null` without call stacks to tell them apart).
    pub harness: Option<HarnessShare>,
    /// Blocks live at exit that the test's threads allocated, by site (std's own
    /// bookkeeping excepted, as in `leaks`).
    pub leaks: Vec<TestLeak>,
    pub threads: Vec<TestThread>,
    /// How the test's thread was identified.
    pub basis: Basis,
    pub evidence: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TestLeak {
    /// Index into `leaks[].site` / `sites[].id`.
    pub site: usize,
    pub location: Option<Location>,
    /// As in `leaks[].kind` (what the exit-time scan found).
    pub kind: String,
    pub blocks: u64,
    pub bytes: u64,
    pub basis: Basis,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TestThread {
    pub pid: u32,
    pub thread: u32,
    pub name: Option<String>,
    /// `test` (the test's own thread) or `spawned`.
    pub role: String,
    pub allocations: u64,
    pub bytes_allocated: u64,
    pub peak_bytes: u64,
    pub basis: Basis,
    pub evidence: String,
}

/// What memscope knows of a test binary before attribution.
#[derive(Clone, Debug)]
pub struct BinaryInfo {
    pub binary: String,
    pub package: String,
    pub kind: String,
    pub target: String,
    pub executable: String,
    /// One process for `cargo test`; one per test under nextest.
    pub processes: Vec<ProcessInfo>,
    /// Tests the harness listed as `#[ignore]`d; those no process reported are added
    /// as `ignored` (nextest lists them and does not run them).
    pub ignored: Vec<String>,
}

/// One process of a test binary and the tests its harness reported in it.
#[derive(Clone, Debug)]
pub struct ProcessInfo {
    pub pid: u32,
    pub exit_code: Option<i32>,
    pub outcomes: Vec<Outcome>,
    /// The process ran one test alone (nextest's `--exact NAME`): every thread but the
    /// harness's `main` is that test's.
    pub alone: bool,
    /// `outcomes` are in the order the tests ended (pretty output), not list order
    /// (terse output).
    pub completion_order: bool,
}

/// Attributes the threads of each binary's processes to its tests.
pub fn attribute(report: &Report, binaries: &[BinaryInfo]) -> (Vec<TestBinary>, Vec<TestResult>) {
    let mut out_binaries = Vec::new();
    let mut out_tests = Vec::new();
    for info in binaries {
        let (binary, tests) = attribute_binary(report, info);
        out_binaries.push(binary);
        out_tests.extend(tests);
    }
    (out_binaries, out_tests)
}

/// Which test a thread is, and on what grounds.
#[derive(Clone, Debug)]
struct Claim {
    test: usize,
    role: &'static str,
    basis: Basis,
    evidence: String,
}

/// Linux keeps this many bytes of a thread name.
const OS_NAME_BYTES: usize = 15;

fn name_matches(test: &str, thread: &str) -> bool {
    let thread = thread.trim_end_matches('\u{fffd}');
    thread.len() + 3 >= OS_NAME_BYTES && test.len() > thread.len() && test.starts_with(thread)
}

/// Whether a thread carries `test`'s name, whole or as its truncated prefix.
fn named_after(test: &str, thread: &Thread) -> bool {
    thread
        .name
        .as_deref()
        .is_some_and(|n| n == test || name_matches(test, n))
}

fn attribute_binary(report: &Report, info: &BinaryInfo) -> (TestBinary, Vec<TestResult>) {
    let mut notes = Vec::new();
    let mut unattributed = Figures::default();
    let mut results: Vec<TestResult> = Vec::new();
    let mut runs: FxHashMap<String, u64> = FxHashMap::default();
    for process in &info.processes {
        let threads: Vec<&Thread> = report
            .threads
            .iter()
            .filter(|t| t.pid == process.pid)
            .collect();
        let claims = if process.alone {
            claims_alone(&threads, process)
        } else {
            claims_by_name(&threads, process, &mut notes)
        };
        let leaked = leaked_by_thread(report, process.pid);
        for t in &threads {
            if !claims.contains_key(&t.thread) {
                unattributed.add_thread(t, &leaked);
            }
        }
        for result in results_of(
            &info.binary,
            process,
            &threads,
            &claims,
            &leaked,
            &mut notes,
        ) {
            *runs.entry(result.name.clone()).or_default() += 1;
            match results.iter_mut().find(|r| r.name == result.name) {
                Some(earlier) => *earlier = result,
                None => results.push(result),
            }
        }
    }
    for name in &info.ignored {
        if !results.iter().any(|r| &r.name == name) {
            results.push(TestResult::without_figures(
                &info.binary,
                Outcome {
                    name: name.clone(),
                    outcome: "ignored".into(),
                },
                None,
                "ignored: not run",
            ));
        }
    }
    let mut retried: Vec<(&String, &u64)> = runs.iter().filter(|(_, &n)| n > 1).collect();
    retried.sort();
    for (name, n) in retried {
        notes.push(format!(
            "`{name}` ran {n} times (retries): its figures are the last run's"
        ));
    }

    let count = |o: &str| results.iter().filter(|t| t.outcome == o).count() as u64;
    let exit_code = match &info.processes[..] {
        [one] => one.exit_code,
        all => all
            .iter()
            .map(|p| p.exit_code)
            .find(|c| *c != Some(0))
            .unwrap_or(Some(0)),
    };
    let binary = TestBinary {
        binary: info.binary.clone(),
        package: info.package.clone(),
        kind: info.kind.clone(),
        target: info.target.clone(),
        executable: info.executable.clone(),
        pid: match &info.processes[..] {
            [one] => Some(one.pid),
            _ => None,
        },
        processes: info.processes.len() as u64,
        exit_code,
        passed: count("passed"),
        failed: count("failed"),
        ignored: count("ignored"),
        unattributed,
        notes,
    };
    (binary, results)
}

/// Leaked blocks and bytes per thread of process `pid`, by site.
/// Per thread: the site, location, kind, blocks and bytes of its leaks.
type Leaked<'r> = FxHashMap<u32, Vec<(usize, Option<&'r Location>, &'r str, u64, u64)>>;

fn leaked_by_thread(report: &Report, pid: u32) -> Leaked<'_> {
    let mut leaked: Leaked = FxHashMap::default();
    for leak in &report.leaks {
        for t in leak.threads.iter().filter(|t| t.pid == pid) {
            leaked.entry(t.thread).or_default().push((
                leak.site,
                leak.location.as_ref(),
                &leak.kind,
                t.blocks,
                t.bytes,
            ));
        }
    }
    leaked
}

impl Figures {
    /// Adds a thread's figures as a whole (the harness's own figures included).
    fn add_thread(&mut self, t: &Thread, leaked: &Leaked) {
        self.allocations += t.allocations;
        self.reallocations += t.reallocations;
        self.bytes_allocated += t.bytes_allocated;
        self.add_leaks(t, leaked);
    }

    fn add_leaks(&mut self, t: &Thread, leaked: &Leaked) {
        for &(_, _, _, blocks, bytes) in leaked.get(&t.thread).into_iter().flatten() {
            self.leaked_blocks += blocks;
            self.leaked_bytes += bytes;
        }
    }
}

/// A thread's figures as a test's: without the harness's blocks when the report could
/// tell them apart.
fn test_figures(t: &Thread) -> ThreadFigures {
    t.without_harness.clone().unwrap_or(ThreadFigures {
        allocations: t.allocations,
        reallocations: t.reallocations,
        bytes_allocated: t.bytes_allocated,
        peak_bytes: t.peak_bytes,
        live_blocks_at_exit: t.live_blocks_at_exit,
        live_bytes_at_exit: t.live_bytes_at_exit,
    })
}

/// A process that ran one test: its thread (the first named after it) and every other
/// thread but `main` are the test's, as observed facts.
fn claims_alone(threads: &[&Thread], process: &ProcessInfo) -> FxHashMap<u32, Claim> {
    let mut claims = FxHashMap::default();
    let Some(test) = process.outcomes.first() else {
        return claims;
    };
    let own = threads
        .iter()
        .filter(|t| named_after(&test.name, t))
        .map(|t| t.thread)
        .min();
    for t in threads {
        if t.name.as_deref() == Some("main") {
            continue;
        }
        let (role, evidence) = if Some(t.thread) == own {
            (
                "test",
                format!(
                    "ran alone in process {} (one process per test), on a thread named after it",
                    process.pid
                ),
            )
        } else {
            (
                "spawned",
                format!(
                    "a thread of process {}, in which only this test ran",
                    process.pid
                ),
            )
        };
        claims.insert(
            t.thread,
            Claim {
                test: 0,
                role,
                basis: Basis::Observed,
                evidence,
            },
        );
    }
    claims
}

/// Threads of a process that ran several tests, by name and start time (module docs).
fn claims_by_name(
    threads: &[&Thread],
    process: &ProcessInfo,
    notes: &mut Vec<String>,
) -> FxHashMap<u32, Claim> {
    let tests = &process.outcomes;
    let mut claims: FxHashMap<u32, Claim> = FxHashMap::default();
    // 1 and 2: threads named after tests.
    let mut by_name: FxHashMap<&str, Vec<&Thread>> = FxHashMap::default();
    for t in threads {
        if let Some(name) = t.name.as_deref().filter(|n| *n != "main") {
            by_name.entry(name).or_default().push(t);
        }
    }
    let mut names: Vec<&str> = by_name.keys().copied().collect();
    names.sort_unstable();
    for name in names {
        let mut group = by_name[name].clone();
        group.sort_by_key(|t| t.thread);
        let exact: Vec<usize> = (0..tests.len())
            .filter(|&i| tests[i].name == name)
            .collect();
        let candidates: Vec<usize> = if exact.is_empty() {
            (0..tests.len())
                .filter(|&i| tests[i].outcome != "ignored" && name_matches(&tests[i].name, name))
                .collect()
        } else {
            exact.clone()
        };
        match candidates.len() {
            0 => {}
            1 => {
                let test = candidates[0];
                let (basis, evidence) = if exact.is_empty() {
                    (
                        Basis::Inferred,
                        format!("thread name `{name}` is the unique 15-byte prefix of this test's name (Linux truncates thread names)"),
                    )
                } else {
                    (
                        Basis::Observed,
                        "libtest ran the test on a thread named after it".to_owned(),
                    )
                };
                for (i, t) in group.iter().enumerate() {
                    let claim = if i == 0 {
                        Claim {
                            test,
                            role: "test",
                            basis,
                            evidence: evidence.clone(),
                        }
                    } else {
                        Claim {
                            test,
                            role: "spawned",
                            basis: Basis::Inferred,
                            evidence: format!(
                                "carries the test thread's name `{name}` but started after it: an unnamed thread inherits its creator's name on Linux"
                            ),
                        }
                    };
                    claims.insert(t.thread, claim);
                }
            }
            k if group.len() == k && process.completion_order => {
                // Pair completion order (harness output) with the threads' last events.
                let mut by_end = group.clone();
                by_end.sort_by_key(|t| (t.last_event_ns, t.thread));
                let mut ordered = candidates.clone();
                ordered.sort(); // outcomes are in completion order already
                let listed: Vec<&str> = ordered.iter().map(|&i| tests[i].name.as_str()).collect();
                for (t, &test) in by_end.iter().zip(&ordered) {
                    claims.insert(
                        t.thread,
                        Claim {
                            test,
                            role: "test",
                            basis: Basis::Inferred,
                            evidence: format!(
                                "thread name `{name}` is the 15-byte prefix of {k} tests ({}); paired by the order the harness reported them and the order their threads ended",
                                listed.join(", ")
                            ),
                        },
                    );
                }
                notes.push(format!(
                    "{k} tests share the thread name `{name}`: matched by completion order (inferred)"
                ));
            }
            k => {
                let listed: Vec<&str> =
                    candidates.iter().map(|&i| tests[i].name.as_str()).collect();
                let why = if process.completion_order {
                    ""
                } else {
                    " (terse output gives no completion order to pair them by)"
                };
                notes.push(format!(
                    "{} threads named `{name}` could belong to any of {k} tests ({}): left unattributed{why}",
                    group.len(),
                    listed.join(", ")
                ));
            }
        }
    }

    // 3: other threads, by when they started.
    let spans: Vec<(usize, u64, u64)> = threads
        .iter()
        .filter_map(|t| {
            let c = claims.get(&t.thread)?;
            (c.role == "test").then_some((c.test, t.first_event_ns?, t.last_event_ns?))
        })
        .collect();
    for t in threads {
        if claims.contains_key(&t.thread) || t.name.as_deref() == Some("main") {
            continue;
        }
        // A thread named after tests is one of theirs (or their spawn), whatever ran
        // when it started: left as step 2 left it.
        if tests.iter().any(|test| named_after(&test.name, t)) {
            continue;
        }
        let Some(start) = t.first_event_ns else {
            continue;
        };
        let alive: Vec<usize> = spans
            .iter()
            .filter(|(_, first, last)| *first <= start && start <= *last)
            .map(|(test, _, _)| *test)
            .collect();
        if let [test] = alive[..] {
            claims.insert(
                t.thread,
                Claim {
                    test,
                    role: "spawned",
                    basis: Basis::Inferred,
                    evidence: "started while this test's thread was the only test thread alive"
                        .to_owned(),
                },
            );
        }
    }

    claims
}

/// The results of the tests a process reported, from the threads claimed for them.
fn results_of(
    binary: &str,
    process: &ProcessInfo,
    threads: &[&Thread],
    claims: &FxHashMap<u32, Claim>,
    leaked: &Leaked,
    notes: &mut Vec<String>,
) -> Vec<TestResult> {
    let tests = &process.outcomes;
    let any_test_thread = claims.values().any(|c| c.role == "test");
    let ran = tests
        .iter()
        .any(|t| t.outcome == "passed" || t.outcome == "failed");
    if ran && !any_test_thread && !process.alone && !threads.is_empty() {
        notes.push(
            "no thread is named after a test (tests ran on the main thread?): per-test figures are unavailable"
                .to_owned(),
        );
    }
    let mut results = Vec::new();
    for (i, test) in tests.iter().enumerate() {
        let mine: Vec<(&Thread, &Claim)> = threads
            .iter()
            .filter_map(|t| {
                claims
                    .get(&t.thread)
                    .filter(|c| c.test == i)
                    .map(|c| (*t, c))
            })
            .collect();
        let own = mine.iter().find(|(_, c)| c.role == "test");
        let pid = Some(process.pid);
        let result = match own {
            Some((own_thread, own_claim)) => {
                let peak = test_figures(own_thread).peak_bytes;
                with_figures(binary, test.clone(), pid, &mine, leaked, own_claim, peak)
            }
            None if process.alone => {
                // Its own thread never allocated; threads it spawned may have.
                let claim = Claim {
                    test: i,
                    role: "test",
                    basis: Basis::Observed,
                    evidence: format!(
                        "ran alone in process {}; no heap event on a thread named after it",
                        process.pid
                    ),
                };
                with_figures(binary, test.clone(), pid, &mine, leaked, &claim, 0)
            }
            None if test.outcome == "ignored" => {
                TestResult::without_figures(binary, test.clone(), None, "ignored: not run")
            }
            None if any_test_thread && !threads.iter().any(|t| named_after(&test.name, t)) => {
                // Other tests' threads are there, and none could be this one's: its
                // thread never allocated, so it left no trace.
                let claim = Claim {
                    test: i,
                    role: "test",
                    basis: Basis::Inferred,
                    evidence: "no heap event on a thread named after this test: its thread allocated nothing"
                        .to_owned(),
                };
                with_figures(binary, test.clone(), pid, &[], leaked, &claim, 0)
            }
            None => TestResult::without_figures(
                binary,
                test.clone(),
                pid,
                "no thread could be attributed to this test (see the binary's notes)",
            ),
        };
        results.push(result);
    }
    results
}

impl TestResult {
    fn without_figures(
        binary: &str,
        test: Outcome,
        pid: Option<u32>,
        evidence: &str,
    ) -> TestResult {
        TestResult {
            binary: binary.to_owned(),
            name: test.name,
            outcome: test.outcome,
            pid,
            allocations: None,
            reallocations: None,
            bytes_allocated: None,
            peak_bytes: None,
            leaked_blocks: None,
            leaked_bytes: None,
            harness: None,
            leaks: Vec::new(),
            threads: Vec::new(),
            basis: Basis::Inferred,
            evidence: evidence.to_owned(),
        }
    }
}

/// What the harness allocated on these threads, when the report tells it apart.
fn harness_share(mine: &[(&Thread, &Claim)]) -> Option<HarnessShare> {
    let mut share = HarnessShare::default();
    for (t, _) in mine {
        let own = t.without_harness.as_ref()?;
        share.allocations += t.allocations.saturating_sub(own.allocations);
        share.reallocations += t.reallocations.saturating_sub(own.reallocations);
        share.bytes_allocated += t.bytes_allocated.saturating_sub(own.bytes_allocated);
    }
    Some(share)
}

/// A test's figures: the sums over its threads, its own thread's peak.
fn with_figures(
    binary: &str,
    test: Outcome,
    pid: Option<u32>,
    mine: &[(&Thread, &Claim)],
    leaked: &Leaked,
    claim: &Claim,
    peak_bytes: u64,
) -> TestResult {
    let mut figures = Figures::default();
    let harness = harness_share(mine);
    let mut sites: Vec<TestLeak> = Vec::new();
    let mut threads = Vec::new();
    for (t, c) in mine {
        let own = test_figures(t);
        figures.allocations += own.allocations;
        figures.reallocations += own.reallocations;
        figures.bytes_allocated += own.bytes_allocated;
        figures.add_leaks(t, leaked);
        for &(site, location, kind, blocks, bytes) in leaked.get(&t.thread).into_iter().flatten() {
            let basis = if c.basis == Basis::Observed {
                Basis::Observed
            } else {
                Basis::Inferred
            };
            match sites.iter_mut().find(|s| s.site == site && s.kind == kind) {
                Some(s) => {
                    s.blocks += blocks;
                    s.bytes += bytes;
                    if basis == Basis::Inferred {
                        s.basis = Basis::Inferred;
                    }
                }
                None => sites.push(TestLeak {
                    site,
                    location: location.cloned(),
                    kind: kind.to_owned(),
                    blocks,
                    bytes,
                    basis,
                }),
            }
        }
        threads.push(TestThread {
            pid: t.pid,
            thread: t.thread,
            name: t.name.clone(),
            role: c.role.to_owned(),
            allocations: own.allocations + own.reallocations,
            bytes_allocated: own.bytes_allocated,
            peak_bytes: own.peak_bytes,
            basis: c.basis,
            evidence: c.evidence.clone(),
        });
    }
    sites.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.site.cmp(&b.site)));
    TestResult {
        binary: binary.to_owned(),
        name: test.name,
        outcome: test.outcome,
        pid,
        allocations: Some(figures.allocations),
        reallocations: Some(figures.reallocations),
        bytes_allocated: Some(figures.bytes_allocated),
        peak_bytes: Some(peak_bytes),
        leaked_blocks: Some(figures.leaked_blocks),
        leaked_bytes: Some(figures.leaked_bytes),
        harness,
        leaks: sites,
        threads,
        basis: claim.basis,
        evidence: claim.evidence.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread(thread: u32, name: &str, first: u64, last: u64) -> Thread {
        Thread {
            pid: 1,
            thread,
            os_tid: None,
            name: Some(name.into()),
            allocations: 1,
            reallocations: 0,
            frees: 0,
            bytes_allocated: 8,
            peak_bytes: 8,
            live_blocks_at_exit: 0,
            live_bytes_at_exit: 0,
            first_event_ns: Some(first),
            last_event_ns: Some(last),
            without_harness: None,
        }
    }

    #[test]
    fn threads_named_after_tests_that_cannot_be_paired_are_not_taken_for_spawned_ones() {
        let outcome = |name: &str| Outcome {
            name: name.into(),
            outcome: "passed".into(),
        };
        let process = ProcessInfo {
            pid: 1,
            exit_code: Some(0),
            outcomes: vec![
                outcome("tests::slow_one"),
                outcome("tests::shared_prefix_alpha"),
                outcome("tests::shared_prefix_beta"),
            ],
            alone: false,
            completion_order: false,
        };
        // The shared-prefix threads start while only `slow_one`'s thread is alive; an
        // unnamed thread started then is `slow_one`'s.
        let all = [
            thread(1, "tests::slow_one", 0, 100),
            thread(2, "tests::shared_p", 10, 20),
            thread(3, "tests::shared_p", 30, 40),
            thread(4, "worker", 50, 60),
        ];
        let threads: Vec<&Thread> = all.iter().collect();
        let mut notes = Vec::new();
        let claims = claims_by_name(&threads, &process, &mut notes);
        let claimed: Vec<(u32, usize, &str)> = {
            let mut c: Vec<_> = claims.iter().map(|(t, c)| (*t, c.test, c.role)).collect();
            c.sort();
            c
        };
        assert_eq!(claimed, [(1, 0, "test"), (4, 0, "spawned")]);
        assert!(notes[0].contains("left unattributed"), "{notes:?}");
    }

    #[test]
    fn truncated_names_match_only_as_15_byte_prefixes() {
        assert!(name_matches(
            "tests::a_test_with_a_long_name",
            "tests::a_test_w"
        ));
        assert!(!name_matches("tests::a_test_with_a_long_name", "tests::a"));
        assert!(!name_matches("tests::a_test_w", "tests::a_test_w"));
    }
}
