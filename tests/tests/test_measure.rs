//! `memscope::measure` in tests (`fixtures/test-measure`): exact heap assertions that
//! hold while libtest runs tests in parallel under `cargo memscope test`, and a clear
//! message under a plain `cargo test`, where memscope's allocator is not installed.

use std::process::Command;

use memscope_e2e::{clean_env, repo_root, Fixture};

const FIXTURE: &str = "test-measure";

/// The shared copy, its runtime dependency made absolute (the fixture names it by a
/// path relative to the repository).
fn fixture() -> std::sync::MutexGuard<'static, Fixture> {
    let fixture = Fixture::shared(FIXTURE);
    let manifest = fixture.path().join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let runtime = repo_root().join("memscope-runtime");
    let text = text.replace(
        "\"../../memscope-runtime\"",
        &format!("{:?}", runtime.display().to_string()),
    );
    std::fs::write(&manifest, text).unwrap();
    fixture
}

#[test]
fn measure_gives_exact_figures_under_cargo_memscope_test() {
    let fixture = fixture();
    let out = tempfile::tempdir().unwrap();
    let output = fixture
        .memscope(&["test", "--output-dir", out.path().to_str().unwrap()])
        .run();
    // The fixture's own assertions are the exact figures (tests/heap.rs).
    assert_eq!(output.code, Some(0), "{output:#?}");
    assert!(
        output
            .stdout
            .contains("test a_vec_and_a_forgotten_box_give_exact_figures ... ok"),
        "{output:#?}"
    );
    assert!(
        output
            .stdout
            .contains("test growing_a_vec_counts_reallocations ... ok"),
        "{output:#?}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("report.json")).unwrap())
            .unwrap();
    let tests = report["tests"].as_array().unwrap();
    assert_eq!(tests.len(), 2);
    // The forgotten `Box<u32>`: the run's and the test's one leak of 4 bytes.
    let boxed = tests
        .iter()
        .find(|t| t["name"] == "a_vec_and_a_forgotten_box_give_exact_figures")
        .unwrap();
    assert_eq!(
        (
            boxed["leaked_blocks"].as_u64(),
            boxed["leaked_bytes"].as_u64()
        ),
        (Some(1), Some(4))
    );
}

#[test]
fn measure_says_memscope_is_not_installed_under_plain_cargo_test() {
    let fixture = fixture();
    let mut command = Command::new("cargo");
    command
        .args(["test", "--quiet", "--test", "heap"])
        .current_dir(fixture.path());
    clean_env(&mut command);
    command.env("CARGO_TARGET_DIR", fixture.target_dir());
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(101),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let message = "memscope::measure needs memscope's allocator: run under `cargo memscope test` or `cargo memscope run`";
    assert_eq!(
        stdout.matches(message).count(),
        2,
        "both tests say why: {stdout}"
    );
}
