//! Per-test attribution for libtest harnesses: which threads of a test binary's process
//! were which test's, read from the harness's own output and the report model.
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
//!    ran"); else it stays unattributed, with the harness's main thread.
//!
//! A test's figures sum its threads, except `peak_bytes`: the most bytes live at once
//! among blocks its own thread allocated (spawned threads list their own peaks).

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::report::{Basis, Location, Report, Thread};

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
    pub pid: Option<u32>,
    /// The harness's exit code (`None` when a signal ended it).
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

/// One test.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TestResult {
    /// [`TestBinary::binary`] of the binary it is in.
    pub binary: String,
    /// The full test name, as the harness prints it.
    pub name: String,
    /// `passed`, `failed`, `ignored` or `bench`.
    pub outcome: String,
    /// The figures are `null` when no thread could be attributed to the test.
    pub allocations: Option<u64>,
    pub reallocations: Option<u64>,
    pub bytes_allocated: Option<u64>,
    pub peak_bytes: Option<u64>,
    pub leaked_blocks: Option<u64>,
    pub leaked_bytes: Option<u64>,
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

/// A test result line of the harness: name and outcome, in completion order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub name: String,
    pub outcome: String,
}

/// Reads libtest's pretty output (`test a::b ... ok`), also when a test's own output
/// (`--nocapture`) splits the line. ANSI colour codes are ignored.
pub fn parse_harness(stdout: &str) -> Vec<Outcome> {
    let clean = strip_ansi(stdout);
    let mut out = Vec::new();
    let mut pending: Vec<String> = Vec::new();
    for line in clean.lines() {
        let line = line.trim_end();
        if let Some(rest) = line.strip_prefix("test ") {
            if let Some((name, result)) = rest.split_once(" ... ") {
                let name = name.trim_end_matches(" - should panic").to_owned();
                match outcome_word(result) {
                    Some(outcome) => out.push(Outcome { name, outcome }),
                    None => pending.push(name),
                }
                continue;
            }
            if let Some(name) = rest.strip_suffix(" ...") {
                pending.push(name.trim_end_matches(" - should panic").to_owned());
                continue;
            }
        }
        if !pending.is_empty() {
            let word = line.rsplit(' ').next().unwrap_or("");
            if let Some(outcome) = outcome_word(line.trim()).or_else(|| outcome_word(word)) {
                let name = pending.remove(0);
                out.push(Outcome { name, outcome });
            }
        }
    }
    out
}

fn outcome_word(result: &str) -> Option<String> {
    let result = result.trim();
    let word = result.split([' ', ',']).next().unwrap_or("");
    match word {
        "ok" => Some("passed".into()),
        "FAILED" => Some("failed".into()),
        "ignored" => Some("ignored".into()),
        "bench:" => Some("bench".into()),
        _ => None,
    }
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// What memscope knows of a test binary before attribution.
#[derive(Clone, Debug)]
pub struct BinaryInfo {
    pub binary: String,
    pub package: String,
    pub kind: String,
    pub target: String,
    pub executable: String,
    pub pid: Option<u32>,
    pub exit_code: Option<i32>,
    pub outcomes: Vec<Outcome>,
}

/// Attributes the threads of each binary's process to its tests.
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

fn attribute_binary(report: &Report, info: &BinaryInfo) -> (TestBinary, Vec<TestResult>) {
    let threads: Vec<&Thread> = match info.pid {
        Some(pid) => report.threads.iter().filter(|t| t.pid == pid).collect(),
        None => Vec::new(),
    };
    let tests = &info.outcomes;
    let mut notes = Vec::new();
    let mut claims: FxHashMap<u32, Claim> = FxHashMap::default();

    // 1 and 2: threads named after tests.
    let mut by_name: FxHashMap<&str, Vec<&Thread>> = FxHashMap::default();
    for t in &threads {
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
            k if group.len() == k => {
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
                notes.push(format!(
                    "{} threads named `{name}` could belong to any of {k} tests ({}): left unattributed",
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
    for t in &threads {
        if claims.contains_key(&t.thread) || t.name.as_deref() == Some("main") {
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

    let any_test_thread = claims.values().any(|c| c.role == "test");
    let ran = tests
        .iter()
        .any(|t| t.outcome == "passed" || t.outcome == "failed");
    if ran && !any_test_thread && !threads.is_empty() {
        notes.push(
            "no thread is named after a test (tests ran on the main thread?): per-test figures are unavailable"
                .to_owned(),
        );
    }

    // Leaked blocks and bytes per (thread, site).
    let mut leaked: FxHashMap<u32, Vec<(usize, Option<&Location>, u64, u64)>> =
        FxHashMap::default();
    for leak in &report.leaks {
        for t in &leak.threads {
            if Some(t.pid) == info.pid {
                leaked.entry(t.thread).or_default().push((
                    leak.site,
                    leak.location.as_ref(),
                    t.blocks,
                    t.bytes,
                ));
            }
        }
    }

    let mut unattributed = Figures::default();
    for t in &threads {
        if !claims.contains_key(&t.thread) {
            unattributed.allocations += t.allocations;
            unattributed.reallocations += t.reallocations;
            unattributed.bytes_allocated += t.bytes_allocated;
            for &(_, _, blocks, bytes) in leaked.get(&t.thread).into_iter().flatten() {
                unattributed.leaked_blocks += blocks;
                unattributed.leaked_bytes += bytes;
            }
        }
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
        let mut result = TestResult {
            binary: info.binary.clone(),
            name: test.name.clone(),
            outcome: test.outcome.clone(),
            allocations: None,
            reallocations: None,
            bytes_allocated: None,
            peak_bytes: None,
            leaked_blocks: None,
            leaked_bytes: None,
            leaks: Vec::new(),
            threads: Vec::new(),
            basis: Basis::Inferred,
            evidence: String::new(),
        };
        match own {
            Some((own_thread, own_claim)) => {
                result.basis = own_claim.basis;
                result.evidence = own_claim.evidence.clone();
                result.peak_bytes = Some(own_thread.peak_bytes);
                let mut figures = Figures::default();
                let mut sites: Vec<TestLeak> = Vec::new();
                for (t, c) in &mine {
                    figures.allocations += t.allocations;
                    figures.reallocations += t.reallocations;
                    figures.bytes_allocated += t.bytes_allocated;
                    for &(site, location, blocks, bytes) in
                        leaked.get(&t.thread).into_iter().flatten()
                    {
                        figures.leaked_blocks += blocks;
                        figures.leaked_bytes += bytes;
                        let basis = if c.basis == Basis::Observed && c.role == "test" {
                            Basis::Observed
                        } else {
                            Basis::Inferred
                        };
                        match sites.iter_mut().find(|s| s.site == site) {
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
                                blocks,
                                bytes,
                                basis,
                            }),
                        }
                    }
                    result.threads.push(TestThread {
                        pid: t.pid,
                        thread: t.thread,
                        name: t.name.clone(),
                        role: c.role.to_owned(),
                        allocations: t.allocations + t.reallocations,
                        bytes_allocated: t.bytes_allocated,
                        peak_bytes: t.peak_bytes,
                        basis: c.basis,
                        evidence: c.evidence.clone(),
                    });
                }
                sites.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.site.cmp(&b.site)));
                result.allocations = Some(figures.allocations);
                result.reallocations = Some(figures.reallocations);
                result.bytes_allocated = Some(figures.bytes_allocated);
                result.leaked_blocks = Some(figures.leaked_blocks);
                result.leaked_bytes = Some(figures.leaked_bytes);
                result.leaks = sites;
            }
            None if test.outcome == "ignored" => {
                result.evidence = "ignored: not run".to_owned();
            }
            None if any_test_thread
                && !threads.iter().any(|t| {
                    t.name
                        .as_deref()
                        .is_some_and(|n| name_matches(&test.name, n))
                }) =>
            {
                // Other tests' threads are there, and none could be this one's: its
                // thread never allocated, so it left no trace.
                result.evidence =
                    "no heap event on a thread named after this test: its thread allocated nothing"
                        .to_owned();
                result.allocations = Some(0);
                result.reallocations = Some(0);
                result.bytes_allocated = Some(0);
                result.peak_bytes = Some(0);
                result.leaked_blocks = Some(0);
                result.leaked_bytes = Some(0);
            }
            None => {
                result.evidence =
                    "no thread could be attributed to this test (see the binary's notes)"
                        .to_owned();
            }
        }
        results.push(result);
    }

    let count = |o: &str| tests.iter().filter(|t| t.outcome == o).count() as u64;
    let binary = TestBinary {
        binary: info.binary.clone(),
        package: info.package.clone(),
        kind: info.kind.clone(),
        target: info.target.clone(),
        executable: info.executable.clone(),
        pid: info.pid,
        exit_code: info.exit_code,
        passed: count("passed"),
        failed: count("failed"),
        ignored: count("ignored"),
        unattributed,
        notes,
    };
    (binary, results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harness_lines_give_names_and_outcomes_in_completion_order() {
        let out = "\nrunning 4 tests\n\x1b[32mtest a::b ... ok\x1b[0m\ntest c ... FAILED\n\
                   test d ... ignored, slow\ntest e - should panic ... ok\n\nfailures:\n\n---- c stdout ----\n";
        let got = parse_harness(out);
        let pairs: Vec<(&str, &str)> = got
            .iter()
            .map(|o| (o.name.as_str(), o.outcome.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("a::b", "passed"),
                ("c", "failed"),
                ("d", "ignored"),
                ("e", "passed")
            ]
        );
    }

    #[test]
    fn a_result_split_by_the_tests_own_output_still_pairs() {
        let out = "test slow ... hello from the test\nok\ntest next ... ok\n";
        let got = parse_harness(out);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].name, "slow");
        assert_eq!(got[0].outcome, "passed");
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
