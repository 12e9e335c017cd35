//! Regressions found by running popular crates' own test suites under
//! `cargo memscope test` (`benches/realworld/run.py`), each reduced to a fixture.

use memscope_e2e::Fixture;
use serde_json::Value;

fn report(fixture: &Fixture) -> Value {
    let path = fixture.target_dir().join("memscope/report/report.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("report.json is JSON")
}

/// With `RUST_BACKTRACE=1` (as many CI setups have it), the first panic symbolizes a
/// backtrace and std keeps the parsed debug information in a static: smallvec's and
/// bytes's suites showed tens of megabytes "leaked" by their first `should_panic` test.
/// serde_json's leaves a server thread running, whose start-up state std and libtest
/// keep until it ends.
#[test]
fn stds_own_state_at_exit_is_not_a_tests_leak() {
    let fixture = Fixture::shared("test-std-state");
    let out = fixture.memscope(&["test"]).env("RUST_BACKTRACE", "1").run();
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let report = report(&fixture);
    let binaries = report["test_binaries"].as_array().unwrap();
    assert_eq!(binaries.len(), 1, "{binaries:?}");
    assert_eq!(binaries[0]["passed"], 3);
    assert_eq!(report["summary"]["leaked_blocks"], 0, "{}", report["leaks"]);
    for test in report["tests"].as_array().unwrap() {
        assert_eq!(test["leaked_blocks"], 0, "{test}");
    }
    let internal = report["runtime_internal"].as_array().unwrap();
    for why in [
        "symbolizing backtraces",
        "state for a spawned thread",
        "captured output",
    ] {
        let found: Vec<&Value> = internal
            .iter()
            .filter(|g| g["evidence"].as_str().is_some_and(|e| e.contains(why)))
            .collect();
        assert!(!found.is_empty(), "no '{why}' in {internal:?}");
        assert!(found.iter().all(|g| g["origin"] == "std"));
    }
}
