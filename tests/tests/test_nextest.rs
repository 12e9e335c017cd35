//! `cargo memscope nextest` (= `test --nextest`) on the real binary: cargo-nextest runs
//! each test of `fixtures/test-basic` in a process of its own, and each test's figures
//! come from its own process, as observed facts. The figures are those of the libtest
//! run (tests/tests/test_command.rs), known by construction (the fixture's `src/lib.rs`).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::OnceLock;

use memscope_e2e::{figures, test_run, Fixture, TestRun};

const FIXTURE: &str = "test-basic";
/// cargo-nextest's exit code when a test failed.
const NEXTEST_TEST_FAILED: i32 = 100;

fn nextest() -> &'static TestRun {
    static RUN: OnceLock<TestRun> = OnceLock::new();
    RUN.get_or_init(|| {
        let run = test_run(FIXTURE, &["nextest"], &[]);
        assert_eq!(run.output.code, Some(0), "{:#?}", run.output);
        run
    })
}

#[test]
fn each_test_gets_the_exact_figures_of_its_own_process() {
    let run = nextest();
    for (name, expected) in [
        ("tests::clean", [1, 0, 2048, 2048, 0, 0]),
        ("tests::forgets_4096_bytes", [1, 0, 4096, 4096, 1, 4096]),
        ("tests::leaks_two_boxes", [2, 0, 128, 128, 2, 128]),
        (
            "tests::a_test_with_a_long_unique_name",
            [1, 0, 777, 777, 1, 777],
        ),
        ("tests::shared_prefix_alpha", [1, 0, 111, 111, 1, 111]),
        ("tests::shared_prefix_beta", [1, 0, 222, 222, 1, 222]),
        ("allocates_and_frees", [3, 0, 1110, 1000, 0, 0]),
        (
            "own_allocator_still_counts_and_leaks_512_bytes",
            [1, 0, 512, 512, 1, 512],
        ),
    ] {
        let t = run.test(name);
        assert_eq!(figures(t), expected, "{name}: {t:#}");
        assert_eq!(t["outcome"], "passed", "{name}");
        // Alone in its process, a test's threads are known, not inferred.
        assert_eq!(t["basis"], "observed", "{name}");
    }
}

#[test]
fn every_test_that_ran_had_a_process_of_its_own() {
    let run = nextest();
    let tests = run.report["tests"].as_array().unwrap();
    let ran: Vec<_> = tests.iter().filter(|t| t["outcome"] != "ignored").collect();
    assert_eq!(ran.len(), 10);
    let pids: BTreeSet<u64> = ran.iter().map(|t| t["pid"].as_u64().unwrap()).collect();
    assert_eq!(pids.len(), 10, "one process per test");
    let lib = run.binary("src/lib.rs");
    assert_eq!(lib["processes"], 8);
    assert!(lib["pid"].is_null());
    assert_eq!(
        (lib["passed"].as_u64(), lib["ignored"].as_u64()),
        (Some(8), Some(1))
    );
    // nextest lists ignored tests and skips them.
    let ignored = run.test("tests::ignored");
    assert_eq!(ignored["outcome"], "ignored");
    assert!(ignored["pid"].is_null() && ignored["allocations"].is_null());
}

#[test]
fn a_thread_the_test_spawned_is_its_own_as_an_observed_fact() {
    let t = nextest().test("tests::spawns_a_thread_that_leaks");
    assert_eq!(
        (t["leaked_blocks"].as_u64(), t["leaked_bytes"].as_u64()),
        (Some(1), Some(1000))
    );
    let spawned = t["threads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|th| th["role"] == "spawned")
        .expect("the spawned thread");
    assert_eq!(
        (
            spawned["allocations"].as_u64(),
            spawned["bytes_allocated"].as_u64()
        ),
        (Some(1), Some(1000))
    );
    assert_eq!(spawned["basis"], "observed");
    assert_eq!(t["leaks"][0]["basis"], "observed");
}

#[test]
fn a_failing_test_keeps_nextests_exit_code_and_its_outcome() {
    let run = test_run(
        FIXTURE,
        &["nextest", "--fail-on-leaks"],
        &[("FIXTURE_FAIL", "1")],
    );
    assert_eq!(
        run.output.code,
        Some(NEXTEST_TEST_FAILED),
        "{:#?}",
        run.output
    );
    assert_eq!(run.test("tests::fails_when_asked")["outcome"], "failed");
    assert_eq!(run.test("tests::clean")["outcome"], "passed");
    assert_eq!(run.binary("src/lib.rs")["exit_code"], 101);
}

#[test]
fn per_test_gates_judge_each_tests_own_process() {
    let run = test_run(
        FIXTURE,
        &["test", "--nextest", "--per-test", "--max-peak", "2KiB"],
        &[],
    );
    assert_eq!(run.output.code, Some(3), "{:#?}", run.output);
    assert_eq!(
        run.gate_failures(),
        ["memscope: gate failed: test `tests::forgets_4096_bytes` (src/lib.rs) peaked at 4096 live bytes, more than --max-peak 2048"]
    );
}

#[test]
fn without_cargo_nextest_the_command_says_so_in_one_line() {
    let fixture = Fixture::shared(FIXTURE);
    let (bin, path) = path_without_nextest();
    let cargo_home = tempfile::tempdir().unwrap();
    let output = fixture
        .memscope(&["nextest"])
        .env("PATH", &path)
        .env("CARGO_HOME", cargo_home.path())
        .run();
    drop(bin);
    assert_eq!(output.code, Some(2), "{output:#?}");
    assert_eq!(output.stderr.lines().count(), 1, "{output:#?}");
    assert!(
        output
            .stderr
            .starts_with("error: cargo-nextest is not installed"),
        "{output:#?}"
    );
    assert!(
        output.stderr.contains("cargo install cargo-nextest"),
        "{output:#?}"
    );
}

/// A PATH on which `cargo` is found and `cargo-nextest` is not: the PATH without the
/// directories holding `cargo-nextest`, plus a directory with a link to `cargo`
/// (returned, to keep it alive).
fn path_without_nextest() -> (tempfile::TempDir, std::ffi::OsString) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    let cargo = dirs
        .iter()
        .map(|d| d.join("cargo"))
        .find(|c| c.is_file())
        .expect("cargo on PATH");
    let bin = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&cargo, bin.path().join("cargo")).unwrap();
    let kept = dirs
        .into_iter()
        .filter(|d| !d.join("cargo-nextest").exists());
    let path = std::env::join_paths(std::iter::once(bin.path().to_path_buf()).chain(kept)).unwrap();
    (bin, path)
}

#[test]
fn the_same_stack_in_many_processes_is_one_site() {
    // Each test's process loads the binary and libc at other addresses (ASLR); a site
    // is its stack as symbolized, unnamed frames known by their place in their file.
    let run = nextest();
    let mut stacks = BTreeSet::new();
    let table = &run.report["frames"];
    for site in run.report["sites"].as_array().unwrap() {
        let frames: Vec<&serde_json::Value> = site["stack"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| &table[i.as_u64().unwrap() as usize])
            .collect();
        let stack: Vec<String> = frames
            .iter()
            .map(|f| format!("{} {} {}", f["function"], f["file"], f["line"]))
            .collect();
        let named = frames.iter().all(|f| f["function"].is_string());
        assert!(
            !named || stacks.insert(stack),
            "two sites with one stack: {site:#}"
        );
    }
    let harness_main = run.report["sites"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["pids"].as_array().unwrap().len() == 8)
        .count();
    assert!(
        harness_main > 0,
        "sites shared by the 8 processes of src/lib.rs"
    );
}
