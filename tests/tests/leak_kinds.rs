//! Leak kinds from the exit-time scan (`fixtures/leak-kinds`), checked two ways: the
//! blocks of each kind the fixture makes by construction, and valgrind's leak check
//! of the same program, untracked, as an independent oracle.

use std::collections::BTreeMap;
use std::process::Command;

use memscope_e2e::Fixture;
use serde_json::Value;

/// `cargo memscope run` on the fixture, with `env`, the program given `args`; its
/// report.
fn report(fixture: &Fixture, env: &[(&str, &str)], args: &[&str]) -> Value {
    let out = fixture.path().join("report-out").join(args.join("-"));
    let mut run = vec!["run", "-q", "--output-dir", out.to_str().unwrap(), "--"];
    run.extend(args);
    let mut command = fixture.memscope(&run);
    for (key, value) in env {
        command = command.env(key, value);
    }
    let output = command.run();
    assert_eq!(output.code, Some(0), "{args:?}: {output:#?}");
    let json = std::fs::read_to_string(out.join("report.json")).expect("report.json");
    serde_json::from_str(&json).expect("valid JSON")
}

/// `summary.leak_kinds` as `kind → (blocks, bytes)`.
fn kinds(report: &Value) -> BTreeMap<String, (u64, u64)> {
    report["summary"]["leak_kinds"]
        .as_object()
        .expect("summary.leak_kinds")
        .iter()
        .map(|(kind, a)| {
            let n = |f: &str| a[f].as_u64().unwrap();
            (kind.clone(), (n("blocks"), n("bytes")))
        })
        .collect()
}

/// `summary.leak_kinds` is `expected`, kind by kind.
fn assert_kinds(report: &Value, expected: &[(&str, (u64, u64))]) {
    let expected: BTreeMap<String, (u64, u64)> =
        expected.iter().map(|&(k, v)| (k.to_string(), v)).collect();
    assert_eq!(kinds(report), expected);
}

/// The report's leaks as `(line, kind, blocks, bytes)`, sorted.
fn leaks(report: &Value) -> Vec<(u64, String, u64, u64)> {
    let mut out: Vec<_> = report["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["location"]["line"].as_u64().unwrap(),
                l["kind"].as_str().unwrap().to_string(),
                l["blocks"].as_u64().unwrap(),
                l["bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn each_leaked_block_is_classified_by_who_points_at_it() {
    let fixture = Fixture::shared("leak-kinds");
    let report = report(&fixture, &[], &[]);

    assert_kinds(
        &report,
        &[
            ("definitely_lost", (2, 2016)),
            ("indirectly_lost", (2, 600)),
            ("reference_cycle", (2, 96)),
            ("reachable_from_static", (3, 1524)),
            ("reachable_from_stack", (0, 0)),
            ("live_at_exit", (0, 0)),
        ],
    );
    let s = |k: &str| k.to_string();
    assert_eq!(
        leaks(&report),
        vec![
            (33, s("reachable_from_static"), 1, 1000),
            (34, s("reachable_from_static"), 1, 24),
            (34, s("reachable_from_static"), 1, 500),
            (39, s("definitely_lost"), 1, 2000),
            (40, s("definitely_lost"), 1, 16),
            (40, s("indirectly_lost"), 2, 600),
            (42, s("reference_cycle"), 1, 48),
            (46, s("reference_cycle"), 1, 48),
        ]
    );
    for leak in report["leaks"].as_array().unwrap() {
        assert_eq!(leak["basis"], "inferred", "{leak}");
        assert!(
            leak["evidence"].as_str().is_some_and(|e| !e.is_empty()),
            "{leak}"
        );
    }
    // The kinds split the leaked figures, which stay what they were.
    assert_eq!(report["summary"]["leaked_blocks"], 9);
    assert_eq!(report["summary"]["leaked_bytes"], 4236);
    let scan = &report["summary"]["leak_scan"];
    assert_eq!(scan["processes"], 1);
    assert!(scan["static_bytes"].as_u64().unwrap() > 0, "{scan}");
}

/// Builds `fixture` plainly (no memscope) into its own target directory; the path of
/// its executable `name`.
fn plain_build(fixture: &Fixture, name: &str) -> std::path::PathBuf {
    let target = fixture.target_dir().join("plain");
    let status = Command::new(env!("CARGO"))
        .args(["build", "-q", "--target-dir"])
        .arg(&target)
        .current_dir(fixture.path())
        .env_remove("RUSTFLAGS")
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the fixture plainly failed");
    target.join("debug").join(name)
}

/// valgrind's leak summary of `program args`: bytes definitely + indirectly lost,
/// possibly lost, and still reachable.
fn valgrind(program: &std::path::Path, args: &[&str]) -> (u64, u64, u64) {
    let out = Command::new("valgrind")
        .args(["--leak-check=full", "--show-leak-kinds=all"])
        .arg(program)
        .args(args)
        .output()
        .expect("valgrind runs (.ci/run installs it)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let bytes = |what: &str| -> u64 {
        let Some(line) = stderr
            .lines()
            .find_map(|l| l.split_once(&format!("{what}: ")).map(|(_, rest)| rest))
        else {
            // valgrind leaves the summary out when nothing is left.
            assert!(stderr.contains("All heap blocks were freed"), "{stderr}");
            return 0;
        };
        line.split(" bytes")
            .next()
            .unwrap()
            .replace(',', "")
            .trim()
            .parse()
            .unwrap()
    };
    (
        bytes("definitely lost") + bytes("indirectly lost"),
        bytes("possibly lost"),
        bytes("still reachable"),
    )
}

/// memscope's report in valgrind's terms: bytes lost (definitely, indirectly, in
/// cycles: valgrind counts one block of a cycle as definitely lost and the others as
/// indirectly), and bytes still reachable (from a static or a stack, and std's own).
fn as_valgrind_says(report: &Value) -> (u64, u64) {
    let ours = kinds(report);
    let internal = report["summary"]["runtime_internal_bytes"]
        .as_u64()
        .unwrap();
    (
        ours["definitely_lost"].1 + ours["indirectly_lost"].1 + ours["reference_cycle"].1,
        ours["reachable_from_static"].1 + ours["reachable_from_stack"].1 + internal,
    )
}

#[test]
fn valgrind_finds_as_much_lost_and_still_reachable_as_the_scan() {
    let fixture = Fixture::shared("leak-kinds");
    let report = report(&fixture, &[], &[]);
    let (lost, possibly, reachable) = valgrind(&plain_build(&fixture, "leak-kinds"), &[]);

    assert_eq!(possibly, 0);
    assert_eq!(as_valgrind_says(&report), (lost, reachable));
}

#[test]
fn megabytes_of_live_blocks_read_on_two_threads_are_classified_as_valgrind_does() {
    let fixture = Fixture::shared("leak-kinds");
    let report = report(&fixture, &[], &["large"]);

    assert_kinds(
        &report,
        &[
            ("definitely_lost", (3, 2016 + 8192)),
            ("indirectly_lost", (2 + 1024, 600 + 1024 * 2048)),
            ("reference_cycle", (2, 96)),
            (
                "reachable_from_static",
                (3 + 1 + 4096, 1524 + 32768 + 4096 * 2048),
            ),
            ("reachable_from_stack", (0, 0)),
            ("live_at_exit", (0, 0)),
        ],
    );
    let (lost, possibly, reachable) = valgrind(&plain_build(&fixture, "leak-kinds"), &["large"]);
    assert_eq!(possibly, 0);
    assert_eq!(as_valgrind_says(&report), (lost, reachable));
}

#[test]
fn on_the_exact_scenarios_valgrind_and_the_scan_agree_on_lost_and_reachable_bytes() {
    let fixture = Fixture::shared("exact");
    let program = plain_build(&fixture, "exact");
    // The scenarios that leave blocks at exit, in every way but a panic's (std sizes
    // its backtrace cache after the build's debug information, which differs between
    // the two builds): forgotten on the main thread before `main` returns, live in
    // `main`'s frame when `process::exit` is called, on other threads, from a
    // thread-local destructor.
    for scenario in [
        "forgotten-vec",
        "process-exit",
        "named-thread-leak",
        "over-aligned",
        "cross-thread-reuse",
        "tls-destructor-alloc",
    ] {
        let report = report(&fixture, &[], &[scenario]);
        let (lost, possibly, reachable) = valgrind(&program, &[scenario]);

        assert_eq!(possibly, 0, "{scenario}");
        assert_eq!(as_valgrind_says(&report), (lost, reachable), "{scenario}");
    }
}

#[test]
fn with_the_scan_off_leaks_are_only_observed_live_at_exit() {
    let fixture = Fixture::shared("leak-kinds");
    let report = report(&fixture, &[("MEMSCOPE_LEAK_SCAN", "0")], &[]);

    assert_eq!(kinds(&report)["live_at_exit"], (9, 4236));
    assert!(report["summary"]["leak_scan"].is_null());
    for leak in report["leaks"].as_array().unwrap() {
        assert_eq!(leak["kind"], "live_at_exit", "{leak}");
        assert_eq!(leak["basis"], "observed", "{leak}");
    }
}

#[test]
fn a_static_cache_fails_fail_on_leaks_unless_only_lost_kinds_count() {
    let fixture = Fixture::shared("leak-kinds");
    let code = |args: &[&str]| {
        let mut all = vec!["run", "-q", "--fail-on-leaks"];
        all.extend_from_slice(args);
        let output = fixture.memscope(&all).run();
        (output.code, output.stderr)
    };

    let (every_kind, stderr) = code(&["--", "static-only"]);
    assert_eq!(every_kind, Some(3), "{stderr}");
    let (lost_only, stderr) = code(&["--leak-kinds", "lost", "--", "static-only"]);
    assert_eq!(lost_only, Some(0), "{stderr}");
    assert!(stderr.contains("gates passed"), "{stderr}");
    // With lost blocks too, `lost` still fails, on those alone: 6 blocks of 2712 bytes.
    let (with_lost, stderr) = code(&["--leak-kinds", "lost"]);
    assert_eq!(with_lost, Some(3), "{stderr}");
    assert!(stderr.contains("leaked 6 blocks (2712 bytes)"), "{stderr}");
    let (unknown, stderr) = code(&["--leak-kinds", "lots"]);
    assert_eq!(unknown, Some(2), "{stderr}");
    assert!(stderr.contains("unknown leak kind `lots`"), "{stderr}");
}
