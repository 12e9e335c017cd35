//! `cargo memscope test` on the real binary, with libtest's harness: per-test figures
//! on `fixtures/test-basic` (known by construction: see its `src/lib.rs`), gates and
//! their exit codes, suppressions, GitHub annotations, SARIF, terse harness output.
//!
//! The fixture is built once (the first run); every later run is incremental and only
//! runs the tests again. The plain run is shared by the tests that read its report.

use std::sync::OnceLock;

use memscope_e2e::{figures, test_run, Fixture, TestRun};
use serde_json::Value;

const FIXTURE: &str = "test-basic";
const EXIT_GATE_FAILED: i32 = 3;
const EXIT_MEMSCOPE_ERROR: i32 = 2;
const EXIT_TEST_FAILED: i32 = 101;

/// Every leak of the fixture, in bytes (its `src/lib.rs` and `tests/own_allocator.rs`).
const LEAKED_BYTES: u64 = 4096 + 2 * 64 + 1000 + 777 + 111 + 222 + 512;

/// `cargo memscope test` on the fixture with no gate, under GitHub Actions, with SARIF.
fn plain() -> &'static TestRun {
    static RUN: OnceLock<TestRun> = OnceLock::new();
    RUN.get_or_init(|| {
        let run = test_run(
            FIXTURE,
            &["test", "--sarif", "{out}/leaks.sarif"],
            &[("GITHUB_ACTIONS", "true")],
        );
        assert_eq!(run.output.code, Some(0), "{:#?}", run.output);
        run
    })
}

fn test<'a>(run: &'a TestRun, name: &str) -> &'a Value {
    run.test(name)
}

/// What the run's tests leaked, added up.
fn tests_leaked_bytes(run: &TestRun) -> u64 {
    run.report["tests"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["leaked_bytes"].as_u64())
        .sum()
}

#[test]
fn a_clean_test_counts_its_one_2048_byte_buffer_and_leaks_nothing() {
    let t = test(plain(), "tests::clean");
    assert_eq!(t["outcome"], "passed");
    assert_eq!(figures(t), [1, 0, 2048, 2048, 0, 0]);
    // `tests::clean` fits in a Linux thread name: its thread is known, not inferred.
    assert_eq!(t["basis"], "observed");
    assert_eq!(t["binary"], "src/lib.rs");
}

#[test]
fn a_forgotten_vec_is_the_tests_one_leak_of_4096_bytes_at_its_line() {
    let t = test(plain(), "tests::forgets_4096_bytes");
    assert_eq!(figures(t), [1, 0, 4096, 4096, 1, 4096]);
    // The name is truncated to 15 bytes on the thread: a unique prefix, so inferred.
    assert_eq!(t["basis"], "inferred");
    assert!(t["evidence"]
        .as_str()
        .unwrap()
        .contains("unique 15-byte prefix"));
    let leaks = t["leaks"].as_array().unwrap();
    assert_eq!(leaks.len(), 1, "{t:#}");
    assert_eq!(
        (leaks[0]["blocks"].as_u64(), leaks[0]["bytes"].as_u64()),
        (Some(1), Some(4096))
    );
    assert_eq!(
        leaks[0]["location"]["line"],
        line_of("src/lib.rs", "vec![0; n]")
    );
}

#[test]
fn two_leaked_boxes_are_two_64_byte_blocks_at_their_own_lines() {
    let t = test(plain(), "tests::leaks_two_boxes");
    assert_eq!(figures(t), [2, 0, 128, 128, 2, 128]);
    let mut lines: Vec<u64> = t["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            assert_eq!(
                (l["blocks"].as_u64(), l["bytes"].as_u64()),
                (Some(1), Some(64))
            );
            l["location"]["line"].as_u64().unwrap()
        })
        .collect();
    lines.sort_unstable();
    assert_eq!(
        lines,
        [
            line_of("src/lib.rs", "Box::new([1u64; 8])"),
            line_of("src/lib.rs", "Box::new([2u64; 8])")
        ]
    );
}

#[test]
fn a_leak_on_a_thread_the_test_spawned_is_the_tests_as_an_inference() {
    let t = test(plain(), "tests::spawns_a_thread_that_leaks");
    let [.., leaked_blocks, leaked_bytes] = figures(t);
    assert_eq!((leaked_blocks, leaked_bytes), (1, 1000));
    let threads = t["threads"].as_array().unwrap();
    assert_eq!(threads.len(), 2, "{t:#}");
    let spawned = threads.iter().find(|th| th["role"] == "spawned").unwrap();
    assert_eq!(
        (
            spawned["allocations"].as_u64(),
            spawned["bytes_allocated"].as_u64(),
            spawned["peak_bytes"].as_u64()
        ),
        (Some(1), Some(1000), Some(1000))
    );
    assert_eq!(spawned["basis"], "inferred");
    assert!(spawned["evidence"]
        .as_str()
        .unwrap()
        .contains("inherits its creator's name"));
    assert_eq!(t["leaks"][0]["basis"], "inferred");
    // The test's figures are its threads' sums; its peak is its own thread's.
    let own = threads.iter().find(|th| th["role"] == "test").unwrap();
    let sum = |f: &str| own[f].as_u64().unwrap() + spawned[f].as_u64().unwrap();
    assert_eq!(t["bytes_allocated"].as_u64(), Some(sum("bytes_allocated")));
    assert_eq!(t["peak_bytes"], own["peak_bytes"]);
}

#[test]
fn tests_whose_thread_names_linux_truncates_alike_are_paired_by_completion_order() {
    let run = plain();
    let alpha = test(run, "tests::shared_prefix_alpha");
    let beta = test(run, "tests::shared_prefix_beta");
    assert_eq!(figures(alpha), [1, 0, 111, 111, 1, 111]);
    assert_eq!(figures(beta), [1, 0, 222, 222, 1, 222]);
    for t in [alpha, beta] {
        assert_eq!(t["basis"], "inferred");
        assert!(t["evidence"].as_str().unwrap().contains("order"), "{t:#}");
    }
    assert!(run.binary("src/lib.rs")["notes"][0]
        .as_str()
        .unwrap()
        .contains("2 tests share the thread name `tests::shared_p`"));
}

#[test]
fn a_long_unique_name_gets_its_777_byte_leak() {
    let t = test(plain(), "tests::a_test_with_a_long_unique_name");
    assert_eq!(figures(t), [1, 0, 777, 777, 1, 777]);
}

#[test]
fn a_test_binary_with_its_own_global_allocator_reports_its_512_byte_leak() {
    let t = test(plain(), "own_allocator_still_counts_and_leaks_512_bytes");
    assert_eq!(t["outcome"], "passed");
    assert_eq!(t["binary"], "tests/own_allocator.rs");
    assert_eq!(figures(t), [1, 0, 512, 512, 1, 512]);
    assert_eq!(
        t["leaks"][0]["location"]["file"]
            .as_str()
            .map(|f| f.ends_with("tests/own_allocator.rs")),
        Some(true)
    );
}

#[test]
fn an_integration_test_that_frees_everything_peaks_at_its_largest_buffer() {
    let t = test(plain(), "allocates_and_frees");
    assert_eq!(t["binary"], "tests/clean.rs");
    assert_eq!(figures(t), [3, 0, 1110, 1000, 0, 0]);
    assert!(t["leaks"].as_array().unwrap().is_empty());
}

#[test]
fn an_ignored_test_is_listed_without_figures() {
    let t = test(plain(), "tests::ignored");
    assert_eq!(t["outcome"], "ignored");
    assert!(t["allocations"].is_null() && t["peak_bytes"].is_null() && t["pid"].is_null());
}

#[test]
fn libtests_own_allocations_on_a_test_thread_are_listed_apart_and_add_up() {
    let run = plain();
    let t = test(run, "tests::clean");
    let harness = &t["harness"];
    assert!(harness["allocations"].as_u64().unwrap() > 0, "{t:#}");
    // The test thread's figures in `threads[]` are the test's plus the harness's.
    let id = t["threads"][0]["thread"].clone();
    let thread = run.report["threads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|th| th["pid"] == t["pid"] && th["thread"] == id)
        .unwrap();
    for f in ["allocations", "bytes_allocated"] {
        assert_eq!(
            thread[f].as_u64(),
            Some(t[f].as_u64().unwrap() + harness[f].as_u64().unwrap()),
            "{f}"
        );
    }
    assert_eq!(thread["without_harness"]["peak_bytes"], 2048);
}

#[test]
fn test_binaries_count_their_outcomes() {
    let run = plain();
    let lib = run.binary("src/lib.rs");
    assert_eq!(
        (
            lib["passed"].as_u64(),
            lib["failed"].as_u64(),
            lib["ignored"].as_u64()
        ),
        (Some(8), Some(0), Some(1))
    );
    assert_eq!(
        (lib["kind"].as_str(), lib["exit_code"].as_i64()),
        (Some("lib"), Some(0))
    );
    assert_eq!(lib["processes"], 1);
    assert_eq!(lib["pid"], test(run, "tests::clean")["pid"]);
    assert_eq!(run.binary("tests/clean.rs")["kind"], "test");
    assert_eq!(run.report["test_binaries"].as_array().unwrap().len(), 3);
    assert_eq!(run.report["tests"].as_array().unwrap().len(), 11);
}

#[test]
fn the_run_leaks_exactly_what_its_tests_leak() {
    let run = plain();
    assert_eq!(tests_leaked_bytes(run), LEAKED_BYTES);
    assert_eq!(run.report["summary"]["leaked_bytes"], LEAKED_BYTES);
    assert_eq!(run.report["summary"]["leaked_blocks"], 8);
    assert!(
        run.output.stderr.contains("Leaking tests:"),
        "{}",
        run.output.stderr
    );
}

#[test]
fn under_github_actions_each_leak_site_is_an_error_annotation_at_its_line() {
    let run = plain();
    let annotations: Vec<&str> = run
        .output
        .stdout
        .lines()
        .filter(|l| l.starts_with("::error "))
        .collect();
    assert_eq!(annotations.len(), 8, "one per leak site: {annotations:#?}");
    let buffer_line = line_of("src/lib.rs", "vec![0; n]");
    let forgets = format!(
        "::error file=src/lib.rs,line={buffer_line},title=memscope leak::1 block (4.0 KiB) allocated in test_basic::buffer still live at exit [definitely lost] (test tests::forgets_4096_bytes)"
    );
    assert!(annotations.contains(&forgets.as_str()), "{annotations:#?}");
    let own = format!(
        "::error file=tests/own_allocator.rs,line={},",
        line_of("tests/own_allocator.rs", "with_capacity(512)")
    );
    assert!(
        annotations.iter().any(|a| a.starts_with(&own)),
        "{annotations:#?}"
    );
}

#[test]
fn sarif_output_is_a_sarif_2_1_0_log_with_one_result_per_leak_site() {
    let run = plain();
    let text = std::fs::read_to_string(run.out.path().join("leaks.sarif")).expect("the SARIF file");
    let sarif: Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(sarif["version"], "2.1.0");
    assert!(sarif["$schema"].as_str().unwrap().contains("sarif-2.1.0"));
    let sarif_run = &sarif["runs"][0];
    assert_eq!(sarif_run["tool"]["driver"]["name"], "memscope");
    let rule = &sarif_run["tool"]["driver"]["rules"][0]["id"];
    let results = sarif_run["results"].as_array().unwrap();
    assert_eq!(results.len(), 8);
    let mut bytes = 0;
    for r in results {
        assert_eq!(&r["ruleId"], rule);
        assert_eq!(r["level"], "error");
        assert!(r["message"]["text"]
            .as_str()
            .unwrap()
            .contains("still live at exit"));
        let location = &r["locations"][0]["physicalLocation"];
        assert_eq!(location["artifactLocation"]["uriBaseId"], "%SRCROOT%");
        let uri = location["artifactLocation"]["uri"].as_str().unwrap();
        assert!(
            uri == "src/lib.rs" || uri == "tests/own_allocator.rs",
            "{uri}"
        );
        assert!(location["region"]["startLine"].as_u64().unwrap() > 0);
        bytes += r["properties"]["bytes"].as_u64().unwrap();
    }
    assert_eq!(bytes, LEAKED_BYTES);
}

#[test]
fn fail_on_leaks_fails_a_leaky_run_with_exit_code_3() {
    let run = test_run(FIXTURE, &["test", "--fail-on-leaks"], &[]);
    assert_eq!(run.output.code, Some(EXIT_GATE_FAILED), "{:#?}", run.output);
    assert!(
        run.output.stderr.contains(&format!(
            "gate failed: the run leaked 8 blocks ({LEAKED_BYTES} bytes) (--fail-on-leaks)"
        )),
        "{}",
        run.output.stderr
    );
}

#[test]
fn suppressing_the_leaky_tests_makes_fail_on_leaks_pass() {
    let rules = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        rules.path(),
        "# The fixture's tests leak on purpose.\n\
         function test_basic::tests::*\n\
         file tests/own_allocator.rs   # the binary with its own allocator\n",
    )
    .unwrap();
    let path = rules.path().to_str().unwrap();
    let run = test_run(
        FIXTURE,
        &["test", "--fail-on-leaks", "--suppressions", path],
        &[],
    );
    assert_eq!(run.output.code, Some(0), "{:#?}", run.output);
    assert!(
        run.output
            .stderr
            .contains("memscope: 8 leak sites suppressed by"),
        "{}",
        run.output.stderr
    );
    assert!(
        run.output.stderr.contains("memscope: gates passed"),
        "{}",
        run.output.stderr
    );
}

#[test]
fn max_leaked_bytes_passes_at_the_exact_total_and_fails_one_byte_below() {
    let at = LEAKED_BYTES.to_string();
    let run = test_run(
        FIXTURE,
        &["test", "--max-leaked-bytes", &at, "--max-peak", "64MiB"],
        &[],
    );
    assert_eq!(run.output.code, Some(0), "{:#?}", run.output);

    let below = (LEAKED_BYTES - 1).to_string();
    let run = test_run(FIXTURE, &["test", "--max-leaked-bytes", &below], &[]);
    assert_eq!(run.output.code, Some(EXIT_GATE_FAILED), "{:#?}", run.output);
    assert!(
        run.output.stderr.contains(&format!(
            "the run leaked {LEAKED_BYTES} bytes, more than --max-leaked-bytes {below}"
        )),
        "{}",
        run.output.stderr
    );
}

#[test]
fn per_test_max_peak_names_only_the_tests_above_it() {
    // Peaks by construction: 4096 (forgets_4096_bytes) is the only one above 2 KiB;
    // clean peaks at exactly 2048.
    let run = test_run(FIXTURE, &["test", "--per-test", "--max-peak", "2KiB"], &[]);
    assert_eq!(run.output.code, Some(EXIT_GATE_FAILED), "{:#?}", run.output);
    assert_eq!(
        run.gate_failures(),
        ["memscope: gate failed: test `tests::forgets_4096_bytes` (src/lib.rs) peaked at 4096 live bytes, more than --max-peak 2048"]
    );
}

/// The run with `--fail-on-leaks` in which `tests::fails_when_asked` fails.
fn failing() -> &'static TestRun {
    static RUN: OnceLock<TestRun> = OnceLock::new();
    RUN.get_or_init(|| {
        test_run(
            FIXTURE,
            &["test", "--fail-on-leaks"],
            &[("FIXTURE_FAIL", "1")],
        )
    })
}

#[test]
fn a_failing_test_keeps_cargo_tests_exit_code_over_a_failed_gate() {
    let run = failing();
    assert_eq!(run.output.code, Some(EXIT_TEST_FAILED), "{:#?}", run.output);
    assert_eq!(run.test("tests::fails_when_asked")["outcome"], "failed");
    assert!(
        run.output.stderr.contains("gate failed"),
        "the gate still reports"
    );
}

// After a failed test libtest ends the process with `process::exit`, so what its
// `main` holds (its arguments) is live at exit: libtest's, not a leak of the run.
#[test]
fn after_a_failed_test_the_run_still_leaks_exactly_what_its_tests_leak() {
    let run = failing();
    let summed = tests_leaked_bytes(run);
    assert!(summed > 0);
    assert_eq!(run.report["summary"]["leaked_bytes"], summed);
    let libtests = run.report["runtime_internal"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r["evidence"]
                .as_str()
                .is_some_and(|e| e.contains("under `test::test_main_static`"))
        })
        .count();
    assert!(libtests > 0, "{:#}", run.report["runtime_internal"]);
}

#[test]
fn quiet_harness_output_still_gives_every_test_its_row() {
    let run = test_run(FIXTURE, &["test", "--", "-q"], &[]);
    assert_eq!(run.output.code, Some(0), "{:#?}", run.output);
    assert!(
        !run.output.stdout.contains("test tests::clean ... ok"),
        "the harness was terse"
    );
    assert_eq!(run.report["tests"].as_array().unwrap().len(), 11);
    assert_eq!(figures(run.test("tests::clean")), [1, 0, 2048, 2048, 0, 0]);
    assert_eq!(
        figures(run.test("tests::forgets_4096_bytes")),
        [1, 0, 4096, 4096, 1, 4096]
    );
    assert_eq!(run.test("tests::ignored")["outcome"], "ignored");
    // Terse output has no completion order: tests sharing a thread name stay apart.
    assert!(run.test("tests::shared_prefix_alpha")["allocations"].is_null());
    let notes = run.binary("src/lib.rs")["notes"].to_string();
    assert!(
        notes.contains("terse output gives no completion order"),
        "{notes}"
    );
}

#[test]
fn a_bad_size_is_a_one_line_error_with_exit_code_2() {
    let fixture = Fixture::shared(FIXTURE);
    let output = fixture.memscope(&["test", "--max-peak", "64XB"]).run();
    assert_eq!(output.code, Some(EXIT_MEMSCOPE_ERROR), "{output:#?}");
    assert!(
        output
            .stderr
            .lines()
            .next()
            .unwrap_or("")
            .contains("invalid size `64XB`"),
        "{output:#?}"
    );
}

#[test]
fn a_bad_suppressions_file_is_a_one_line_error_naming_its_line() {
    let rules = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(rules.path(), "function a::*\nleak b\n").unwrap();
    let fixture = Fixture::shared(FIXTURE);
    let output = fixture
        .memscope(&["test", "--suppressions", rules.path().to_str().unwrap()])
        .run();
    assert_eq!(output.code, Some(EXIT_MEMSCOPE_ERROR), "{output:#?}");
    assert_eq!(output.stderr.lines().count(), 1, "{output:#?}");
    assert!(
        output.stderr.starts_with("error: suppressions file "),
        "{output:#?}"
    );
    assert!(
        output.stderr.contains("line 2: unknown rule `leak`"),
        "{output:#?}"
    );

    let output = fixture
        .memscope(&["test", "--suppressions", "no-such-file"])
        .run();
    assert_eq!(output.code, Some(EXIT_MEMSCOPE_ERROR), "{output:#?}");
    assert_eq!(output.stderr.lines().count(), 1, "{output:#?}");
    assert!(
        output
            .stderr
            .contains("failed to read the suppressions file no-such-file"),
        "{output:#?}"
    );
}

/// The 1-based line of the fixture's `file` that contains `text`.
fn line_of(file: &str, text: &str) -> u64 {
    let path = memscope_e2e::repo_root()
        .join("fixtures")
        .join(FIXTURE)
        .join(file);
    let source = std::fs::read_to_string(&path).unwrap();
    let found: Vec<usize> = source
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(text))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(found.len(), 1, "{text:?} in {}", path.display());
    found[0] as u64
}

#[test]
fn the_readme_and_test_help_document_the_same_exit_codes() {
    // (cli.rs tests that the README names every flag of memscope's own.)
    let dir = tempfile::tempdir().unwrap();
    let help = memscope_e2e::memscope_command(dir.path(), &["test", "--help"]).run();
    assert_eq!(help.code, Some(0), "{help:#?}");
    let readme = std::fs::read_to_string(memscope_e2e::repo_root().join("README.md")).unwrap();
    for (code, meaning) in [("2", "memscope itself failed"), ("3", "a gate failed")] {
        assert!(
            help.stdout.contains(&format!("{code}  {meaning}")),
            "{}",
            help.stdout
        );
        assert!(
            readme.contains(&format!("| `{code}` | {meaning}")),
            "README: {code}"
        );
    }
    for code in ["101", "100"] {
        assert!(
            help.stdout.contains(code) && readme.contains(code),
            "{code}"
        );
    }
}

/// memscope starts the build with the workspace as the last run read it, while
/// `cargo metadata` reads it again; a test file added in between is a new target, so
/// the run starts over with it before any test runs.
#[test]
fn a_test_file_added_since_the_last_run_is_tracked_and_run_once() {
    let fixture = Fixture::copy(FIXTURE)
        .with_target_dir(memscope_e2e::e2e_target_root().join("test-basic-added"));
    let out = tempfile::tempdir().expect("a temporary directory");
    let dir = out.path().to_str().expect("a UTF-8 temporary path");
    let first = fixture.memscope(&["test", "--output-dir", dir]).run();
    assert_eq!(first.code, Some(0), "{first:#?}");
    std::fs::write(
        fixture.path().join("tests/added.rs"),
        "#[test]\nfn added_test_leaks_40_bytes() {\n    std::mem::forget(vec![0u8; 40]);\n}\n",
    )
    .unwrap();

    let second = fixture.memscope(&["test", "--output-dir", dir]).run();

    assert_eq!(second.code, Some(0), "{second:#?}");
    let ran = "test added_test_leaks_40_bytes ... ok";
    assert_eq!(second.stdout.matches(ran).count(), 1, "{second:#?}");
    let json = std::fs::read_to_string(out.path().join("report.json")).unwrap();
    let report: Value = serde_json::from_str(&json).unwrap();
    let added: Vec<&Value> = (report["tests"].as_array().unwrap().iter())
        .filter(|t| t["name"] == "added_test_leaks_40_bytes")
        .collect();
    assert_eq!(added.len(), 1, "{:#}", report["tests"]);
    assert_eq!(
        [&added[0]["leaked_blocks"], &added[0]["leaked_bytes"]],
        [1, 40]
    );
}
