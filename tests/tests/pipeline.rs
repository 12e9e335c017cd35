//! The build-and-run pipeline of `cargo memscope run` and `cargo memscope report`, on
//! the real binary: errors, pass-through of stdio, arguments and exit codes, the
//! scratch copy and incremental builds, wrapping a program's own allocator.
//!
//! These tests assert what the pipeline guarantees (exit codes, trace files written,
//! user files untouched), not the contents of reports.

use memscope_e2e::{memscope_command, Fixture, Output};
use serde_json::Value;

const EXIT_MEMSCOPE_ERROR: i32 = 2;

/// memscope failed with exit code 2 and said why on its last line of stderr; when
/// `alone`, that line is all it printed.
fn assert_error(output: &Output, needle: &str, alone: bool) {
    assert_eq!(output.code, Some(EXIT_MEMSCOPE_ERROR), "{output:#?}");
    let last = output.last_stderr_line();
    assert!(
        last.starts_with("error: ") && last.contains(needle),
        "expected {needle:?} in {output:#?}"
    );
    assert!(!output.stderr.contains("panicked"), "{output:#?}");
    if alone {
        assert_eq!(output.stderr.lines().count(), 1, "{output:#?}");
    }
}

fn assert_one_line_error(output: &Output, needle: &str) {
    assert_error(output, needle, true);
}

#[test]
fn running_outside_a_cargo_package_is_a_one_line_error() {
    let empty = tempfile::tempdir().unwrap();
    let output = memscope_command(empty.path(), &["run"]).run();
    assert_one_line_error(&output, "could not find Cargo.toml");
}

#[test]
fn manifest_path_without_a_cargo_toml_is_a_one_line_error() {
    let empty = tempfile::tempdir().unwrap();
    let missing = empty.path().join("Cargo.toml");
    let output = memscope_command(
        empty.path(),
        &["run", "--manifest-path", missing.to_str().unwrap()],
    )
    .run();
    assert_one_line_error(&output, "no Cargo.toml at");
}

#[test]
fn unknown_flag_is_rejected_with_exit_code_2() {
    let empty = tempfile::tempdir().unwrap();
    let output = memscope_command(empty.path(), &["run", "--no-such-flag"]).run();
    assert_eq!(output.code, Some(EXIT_MEMSCOPE_ERROR), "{output:#?}");
    let first = output.stderr.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("error: ") && first.contains("--no-such-flag"),
        "{output:#?}"
    );
}

#[test]
fn report_of_a_trace_that_does_not_exist_is_a_one_line_error() {
    let empty = tempfile::tempdir().unwrap();
    let output = memscope_command(empty.path(), &["report", "missing.mstrace"]).run();
    assert_one_line_error(&output, "missing.mstrace does not exist");
}

#[test]
fn help_documents_the_exit_codes() {
    let empty = tempfile::tempdir().unwrap();
    let output = memscope_command(empty.path(), &["run", "--help"]).run();
    assert_eq!(output.code, Some(0));
    assert!(output.stdout.contains("Exit status:"), "{output:#?}");
    assert!(output.stdout.contains("128+N"), "{output:#?}");
    assert!(
        output.stdout.contains("2  memscope itself failed"),
        "{output:#?}"
    );
}

#[test]
fn package_without_a_binary_is_a_one_line_error() {
    let lib = Fixture::from_files(
        "lib-only",
        &[
            ("Cargo.toml", "[package]\nname = \"lib-only\"\nversion = \"0.1.0\"\nedition = \"2021\"\n[workspace]\n"),
            ("src/lib.rs", "pub fn f() {}\n"),
        ],
    );
    let output = lib.memscope(&["run"]).run();
    assert_one_line_error(&output, "a bin target must be available");
}

#[test]
fn several_binaries_without_bin_flag_is_an_error_naming_them() {
    let bins = Fixture::from_files(
        "two-bins",
        &[
            ("Cargo.toml", "[package]\nname = \"two-bins\"\nversion = \"0.1.0\"\nedition = \"2021\"\n[workspace]\n"),
            ("src/bin/first.rs", "fn main() {}\n"),
            ("src/bin/second.rs", "fn main() {}\n"),
        ],
    );
    let output = bins.memscope(&["run"]).run();
    assert_one_line_error(&output, "available: first, second");

    let output = bins.memscope(&["run", "--bin", "third"]).run();
    assert_one_line_error(&output, "no bin target named `third`");
}

#[test]
fn build_failure_is_a_one_line_error_after_the_compiler_messages() {
    let broken = Fixture::from_files(
        "broken",
        &[
            ("Cargo.toml", "[package]\nname = \"broken\"\nversion = \"0.1.0\"\nedition = \"2021\"\n[workspace]\n"),
            ("src/main.rs", "fn main() {\n    let x: u32 = \"not a number\";\n}\n"),
        ],
    )
    .with_target_dir(memscope_e2e::e2e_target_root().join("broken"));
    let output = broken.memscope(&["run"]).run();
    assert_error(&output, "the build of `broken` failed", false);
    assert!(
        output.stderr.contains("mismatched types"),
        "rustc's message reaches the user: {output:#?}"
    );

    let output = broken.memscope(&["test"]).run();
    assert_error(&output, "the build of the tests failed", false);
    assert_eq!(
        output.stderr.matches("mismatched types").count(),
        1,
        "rustc's message reaches the user once: {output:#?}"
    );
    assert!(
        output.stdout.is_empty(),
        "no build message on stdout: {output:#?}"
    );
}

#[test]
fn program_stdin_stdout_and_exit_code_pass_through() {
    let fixture = Fixture::shared("pipeline-exit-code");
    let output = fixture
        .memscope(&["run"])
        .stdin("hello through memscope\n")
        .run();
    assert_eq!(output.stdout, "hello through memscope\n", "{output:#?}");
    assert_eq!(output.code, Some(3), "{output:#?}");
    assert_eq!(fixture.latest_traces().len(), 1, "one trace per process");
}

#[test]
fn arguments_after_double_dash_reach_the_program() {
    let fixture = Fixture::shared("pipeline-exit-code");
    let output = fixture
        .memscope(&["run", "--", "--release", "two words"])
        .stdin("x\n")
        .run();
    assert_eq!(
        output.stdout, "x\nargs: --release two words\n",
        "{output:#?}"
    );
    assert_eq!(output.code, Some(3), "{output:#?}");
}

#[test]
fn program_killed_by_a_signal_exits_with_128_plus_the_signal() {
    let fixture = Fixture::shared("pipeline-exit-code");
    let output = fixture.memscope(&["run", "--", "--abort"]).run();
    assert_eq!(output.code, Some(128 + 6), "SIGABRT is 6: {output:#?}");
}

#[test]
fn program_killed_with_sigkill_still_reports_what_it_allocated_as_incomplete() {
    use std::io::{BufRead, BufReader};
    let fixture = Fixture::shared("pipeline-exit-code");
    let out = tempfile::tempdir().unwrap();
    let mut child = fixture
        .memscope(&[
            "run",
            "-q",
            "--output-dir",
            out.path().to_str().unwrap(),
            "--",
            "--leak-and-hang",
        ])
        .spawn();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let pid: u32 = line
        .strip_prefix("ready ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("the program did not start: {line:?}"));
    // The writer copies running threads' events every 100 ms.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let kill = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + 9), "SIGKILL is 9");

    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("report.json")).unwrap())
            .unwrap();
    assert_eq!(
        report["summary"]["complete"], false,
        "{}",
        report["summary"]
    );
    let leak = report["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["bytes"] == 12_345)
        .unwrap_or_else(|| panic!("no 12,345-byte block live at the end: {}", report["leaks"]));
    assert_eq!(leak["blocks"], 1);
    assert!(
        leak["location"]["file"]
            .as_str()
            .unwrap()
            .ends_with("src/main.rs"),
        "{leak}"
    );
}

#[test]
fn first_run_writes_a_trace_under_target_memscope_and_leaves_user_files_untouched() {
    let fixture = Fixture::copy("hello-leak");
    let before = fixture.files();

    let output = fixture.memscope(&["run"]).run();

    assert!(
        output.stdout.contains("hello from hello-leak"),
        "{output:#?}"
    );
    assert_eq!(fixture.latest_traces().len(), 1, "{output:#?}");
    assert!(fixture.path().join("target/memscope/scratch").is_dir());
    assert!(
        !fixture.path().join("target/debug").exists(),
        "the user's build cache is untouched"
    );
    assert_eq!(
        fixture.files(),
        before,
        "user files are byte-identical after a run"
    );
}

#[test]
fn second_run_does_not_recompile_the_program() {
    let fixture = Fixture::shared("hello-leak");
    let before = fixture.files();
    let first = fixture.memscope(&["run"]).run();
    assert!(first.stdout.contains("hello from hello-leak"), "{first:#?}");

    let second = fixture.memscope(&["run"]).run();

    assert!(
        second.stdout.contains("hello from hello-leak"),
        "{second:#?}"
    );
    assert!(
        !second.stderr.contains("Compiling"),
        "nothing is rebuilt: {second:#?}"
    );
    assert_eq!(fixture.latest_traces().len(), 1, "{second:#?}");
    assert_eq!(fixture.files(), before);
}

#[test]
fn a_second_run_of_an_unchanged_program_symbolizes_it_the_same_from_the_symbol_cache() {
    let fixture = Fixture::shared("hello-leak");
    let cache = fixture.target_dir().join("memscope/symbols");
    let _ = std::fs::remove_dir_all(&cache);
    let report = || {
        let out = tempfile::tempdir().unwrap();
        let output = fixture
            .memscope(&["run", "-q", "--output-dir", out.path().to_str().unwrap()])
            .run();
        assert_eq!(output.code, Some(0), "{output:#?}");
        let json = std::fs::read_to_string(out.path().join("report.json")).unwrap();
        serde_json::from_str::<Value>(&json).unwrap()
    };
    let cold = report();
    let cached = std::fs::read_dir(&cache)
        .map(|files| files.count())
        .unwrap_or(0);
    assert!(cached > 0, "nothing was cached in {}", cache.display());
    let warm = report();
    // Sites, their stacks and the frames they index are the same, and so are the
    // leaks.
    assert_eq!(warm["frames"], cold["frames"]);
    let placed = |r: &Value| {
        r["sites"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["location"].clone(), s["stack"].clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(placed(&warm), placed(&cold));
    assert_eq!(warm["leaks"][0]["location"], cold["leaks"][0]["location"]);
    assert_eq!(
        warm["processes"][0]["symbols"],
        cold["processes"][0]["symbols"]
    );
}

#[test]
fn program_with_its_own_allocator_is_wrapped_not_replaced() {
    let fixture = Fixture::shared("pipeline-own-allocator");
    let output = fixture.memscope(&["run", "-v"]).run();

    let counted: u64 = output
        .stdout
        .strip_prefix("allocations counted by the program's own allocator: ")
        .and_then(|rest| rest.trim().parse().ok())
        .unwrap_or_else(|| panic!("the program prints its counter: {output:#?}"));
    assert!(
        counted > 0,
        "the program's allocator still sees every allocation"
    );
    assert!(
        output.stderr.contains("wrapping the #[global_allocator]"),
        "{output:#?}"
    );
    assert_eq!(
        fixture.latest_traces().len(),
        1,
        "memscope still records: {output:#?}"
    );
}

#[test]
fn workspace_binary_runs_from_the_root_and_from_its_member_directory() {
    let fixture = Fixture::shared("pipeline-workspace");
    let from_root = fixture.memscope(&["run", "--", "a", "b"]).run();
    assert!(
        from_root
            .stdout
            .contains("sum of squares: 385\nargs: a b\n"),
        "{from_root:#?}"
    );
    assert_eq!(fixture.latest_traces().len(), 1, "{from_root:#?}");

    let from_member = fixture
        .memscope_in(&fixture.path().join("app"), &["run", "-p", "app"])
        .run();
    assert!(
        from_member.stdout.contains("sum of squares: 385"),
        "{from_member:#?}"
    );
    assert!(
        !from_member.stderr.contains("Compiling app"),
        "same scratch copy, same build: {from_member:#?}"
    );
}

#[test]
fn allocator_declared_outside_the_workspace_is_a_one_line_error() {
    let fixture = Fixture::from_files(
        "foreign-allocator",
        &[
            (
                "app/Cargo.toml",
                "[package]\nname = \"app\"\nversion = \"0.1.0\"\nedition = \"2021\"\n[workspace]\n\
                 [dependencies]\nforeign = { path = \"../foreign\" }\n",
            ),
            ("app/src/main.rs", "extern crate foreign;\nfn main() {}\n"),
            (
                "foreign/Cargo.toml",
                "[package]\nname = \"foreign\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
            ),
            (
                "foreign/src/lib.rs",
                "#[global_allocator]\nstatic A: std::alloc::System = std::alloc::System;\n",
            ),
        ],
    )
    .with_target_dir(memscope_e2e::e2e_target_root().join("foreign-allocator"));
    let output = fixture
        .memscope_in(&fixture.path().join("app"), &["run"])
        .run();
    assert_error(
        &output,
        "`foreign` (a dependency outside the workspace) declares its own #[global_allocator]",
        false,
    );

    let output = fixture
        .memscope_in(&fixture.path().join("app"), &["test"])
        .run();
    assert_error(
        &output,
        "`foreign` (a dependency outside the workspace) declares its own #[global_allocator], which memscope cannot wrap; build without it (e.g. behind a cargo feature) to track these tests",
        false,
    );
}

#[test]
fn edited_source_is_rebuilt_on_the_next_run() {
    let main = |word: &str| format!("fn main() {{ println!(\"{word}\"); }}\n");
    let fixture = Fixture::from_files(
        "edited",
        &[
            ("Cargo.toml", "[package]\nname = \"edited\"\nversion = \"0.1.0\"\nedition = \"2021\"\n[workspace]\n"),
            ("src/main.rs", &main("one")),
        ],
    )
    .with_target_dir(memscope_e2e::e2e_target_root().join("edited"));
    let first = fixture.memscope(&["run"]).run();
    assert_eq!(first.stdout, "one\n", "{first:#?}");

    std::fs::write(fixture.path().join("src/main.rs"), main("two")).unwrap();
    let second = fixture.memscope(&["run"]).run();

    assert_eq!(second.stdout, "two\n", "{second:#?}");
    assert_eq!(fixture.latest_traces().len(), 1, "{second:#?}");
}

#[test]
fn a_scratch_file_removed_by_hand_is_rewritten_again_on_the_next_run() {
    let fixture = Fixture::from_files(
        "rescratched",
        &[
            ("Cargo.toml", "[package]\nname = \"rescratched\"\nversion = \"0.1.0\"\nedition = \"2021\"\n[workspace]\n"),
            ("src/main.rs", "fn main() { println!(\"kept\"); }\n"),
        ],
    )
    .with_target_dir(memscope_e2e::e2e_target_root().join("rescratched"));
    // The copy of this fixture's workspace only (the target directory outlives it).
    let scratch = fixture.target_dir().join("memscope/scratch");
    let _ = std::fs::remove_dir_all(&scratch);
    let first = fixture.memscope(&["run"]).run();
    assert_eq!(first.stdout, "kept\n", "{first:#?}");
    let copy = std::fs::read_dir(&scratch)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir())
        .unwrap()
        .join("src/main.rs");
    let rewritten = std::fs::read_to_string(&copy).unwrap();
    assert!(
        rewritten.contains("mod __memscope_allocator;"),
        "{rewritten}"
    );

    // Copied back from the workspace, without memscope's allocator: a rerun that took
    // the copy for rewritten already would leave it so.
    std::fs::remove_file(&copy).unwrap();
    let second = fixture.memscope(&["run"]).run();

    assert_eq!(second.stdout, "kept\n", "{second:#?}");
    assert_eq!(std::fs::read_to_string(&copy).unwrap(), rewritten);
}

/// The lock file of a package `name` 0.1.0 without dependencies.
fn lock_file_of(name: &str) -> String {
    format!(
        "# This file is automatically @generated by Cargo.\n# It is not intended for manual editing.\n\
         version = 4\n\n[[package]]\nname = \"{name}\"\nversion = \"0.1.0\"\n"
    )
}

#[test]
fn locked_run_keeps_the_user_lock_file_and_still_links_the_runtime() {
    let lock = lock_file_of("locked");
    let lock = lock.as_str();
    let fixture = Fixture::from_files(
        "locked",
        &[
            ("Cargo.toml", "[package]\nname = \"locked\"\nversion = \"0.1.0\"\nedition = \"2021\"\n[workspace]\n"),
            ("Cargo.lock", lock),
            ("src/main.rs", "fn main() { println!(\"locked\"); }\n"),
        ],
    )
    .with_target_dir(memscope_e2e::e2e_target_root().join("locked"));
    let output = fixture.memscope(&["run", "--locked"]).run();
    assert_eq!(output.stdout, "locked\n", "{output:#?}");
    assert_eq!(fixture.latest_traces().len(), 1, "{output:#?}");
    assert_eq!(
        std::fs::read_to_string(fixture.path().join("Cargo.lock")).unwrap(),
        lock
    );
}

#[test]
fn a_locked_run_checks_the_lock_file_again_once_a_manifest_changed_since_the_last_one() {
    let fixture = Fixture::from_files(
        "relocked",
        &[
            (
                "Cargo.toml",
                "[package]\nname = \"relocked\"\nversion = \"0.1.0\"\nedition = \"2021\"\n[workspace]\n",
            ),
            ("Cargo.lock", lock_file_of("relocked").as_str()),
            ("src/main.rs", "fn main() { println!(\"relocked\"); }\n"),
            (
                "helper/Cargo.toml",
                "[package]\nname = \"helper\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
            ),
            ("helper/src/lib.rs", "pub fn help() {}\n"),
        ],
    );
    // The second run relies on what the first one checked.
    for _ in 0..2 {
        let output = fixture.memscope(&["run", "--locked"]).run();
        assert_eq!(output.stdout, "relocked\n", "{output:#?}");
    }
    // A dependency the lock file lacks: cargo would have to add it.
    std::fs::write(
        fixture.path().join("Cargo.toml"),
        "[package]\nname = \"relocked\"\nversion = \"0.1.0\"\nedition = \"2021\"\n[workspace]\n\
         [dependencies]\nhelper = { path = \"helper\" }\n",
    )
    .unwrap();
    let before = fixture.files();
    for command in ["run", "test"] {
        let output = fixture.memscope(&[command, "--locked"]).run();
        assert_one_line_error(&output, "--locked");
        assert_eq!(fixture.files(), before, "{command}");
    }
}

#[test]
fn a_locked_run_whose_lock_file_is_out_of_date_is_a_one_line_error_and_changes_nothing() {
    // The lock file lacks the path dependency `helper`: cargo would have to add it.
    let lock = lock_file_of("stale");
    let lock = lock.as_str();
    let fixture = Fixture::from_files(
        "stale-lock",
        &[
            (
                "Cargo.toml",
                "[package]\nname = \"stale\"\nversion = \"0.1.0\"\nedition = \"2021\"\n[workspace]\n\
                 [dependencies]\nhelper = { path = \"helper\" }\n",
            ),
            ("Cargo.lock", lock),
            ("src/main.rs", "fn main() { helper::help(); }\n"),
            (
                "helper/Cargo.toml",
                "[package]\nname = \"helper\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
            ),
            ("helper/src/lib.rs", "pub fn help() {}\n"),
        ],
    );
    let before = fixture.files();
    for command in ["run", "test"] {
        let output = fixture.memscope(&[command, "--locked"]).run();
        assert_one_line_error(&output, "--locked");
        assert_eq!(fixture.files(), before, "{command}");
    }
}

#[test]
fn a_workspace_with_memscopes_own_runtime_is_tracked_with_that_runtime() {
    // memscope's own workspace: its runtime and macros are members, and a second,
    // embedded copy of them would collide with them in the lock file.
    let mut files: Vec<(String, String)> = Vec::new();
    for package in ["memscope-runtime", "memscope-macros"] {
        let dir = memscope_e2e::repo_root().join(package);
        let mut pending = vec![dir.join("src")];
        files.push((
            format!("{package}/Cargo.toml"),
            std::fs::read_to_string(dir.join("Cargo.toml")).unwrap(),
        ));
        while let Some(at) = pending.pop() {
            for entry in std::fs::read_dir(&at).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    pending.push(path);
                } else {
                    let relative = path.strip_prefix(&dir).unwrap().display().to_string();
                    let text = std::fs::read_to_string(&path).unwrap();
                    files.push((format!("{package}/{relative}"), text));
                }
            }
        }
    }
    files.push((
        "Cargo.toml".into(),
        "[workspace]\nresolver = \"2\"\nmembers = [\"app\", \"memscope-runtime\", \"memscope-macros\"]\n".into(),
    ));
    files.push((
        "app/Cargo.toml".into(),
        "[package]\nname = \"app\"\nversion = \"0.1.0\"\nedition = \"2021\"\n".into(),
    ));
    files.push((
        "app/src/main.rs".into(),
        "fn main() {\n    std::mem::forget(vec![0u8; 4096]);\n    println!(\"ran\");\n}\n\n\
         #[test]\nfn leaks() {\n    std::mem::forget(vec![0u8; 2048]);\n}\n"
            .into(),
    ));
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(p, t)| (p.as_str(), t.as_str()))
        .collect();
    let fixture = Fixture::from_files("own-runtime", &files);

    let output = fixture.memscope(&["run", "-p", "app"]).run();

    assert_eq!(output.code, Some(0), "{output:#?}");
    assert_eq!(output.stdout, "ran\n", "{output:#?}");
    assert_eq!(fixture.latest_traces().len(), 1, "{output:#?}");
    assert!(
        output.stderr.contains("4.0 KiB in    1 block"),
        "{output:#?}"
    );

    // Every member's crates get the allocator under `test`, the runtime's own library
    // included: it must not be made to depend on itself.
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().to_str().unwrap();
    let output = fixture
        .memscope(&["test", "-p", "app", "--output-dir", dir])
        .run();
    assert_eq!(output.code, Some(0), "{output:#?}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("report.json")).unwrap())
            .unwrap();
    let test = &report["tests"][0];
    assert_eq!(test["name"], "leaks", "{report:#}");
    assert_eq!(test["leaked_bytes"], 2048, "{report:#}");
}

#[test]
fn allocator_in_a_workspace_library_is_wrapped_where_it_is_declared() {
    let fixture = Fixture::from_files(
        "library-allocator",
        &[
            ("Cargo.toml", "[workspace]\nresolver = \"2\"\nmembers = [\"app\", \"counting\"]\n"),
            (
                "app/Cargo.toml",
                "[package]\nname = \"app\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\
                 [dependencies]\ncounting = { path = \"../counting\" }\n",
            ),
            (
                "app/src/main.rs",
                "fn main() {\n    let v = vec![1u8; 100];\n    println!(\"counted {}\", counting::count() > 0);\n    drop(v);\n}\n",
            ),
            (
                "counting/Cargo.toml",
                "[package]\nname = \"counting\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
            ),
            (
                "counting/src/lib.rs",
                "use std::alloc::{GlobalAlloc, Layout, System};\n\
                 use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};\n\
                 pub struct Counting(AtomicUsize);\n\
                 unsafe impl GlobalAlloc for Counting {\n\
                 \x20   unsafe fn alloc(&self, l: Layout) -> *mut u8 { self.0.fetch_add(1, Relaxed); unsafe { System.alloc(l) } }\n\
                 \x20   unsafe fn dealloc(&self, p: *mut u8, l: Layout) { unsafe { System.dealloc(p, l) } }\n\
                 }\n\
                 mod global {\n\
                 \x20   #[global_allocator]\n\
                 \x20   pub static GLOBAL: super::Counting = super::Counting(std::sync::atomic::AtomicUsize::new(0));\n\
                 }\n\
                 pub fn count() -> usize { global::GLOBAL.0.load(Relaxed) }\n",
            ),
        ],
    )
    .with_target_dir(memscope_e2e::e2e_target_root().join("library-allocator"));
    let output = fixture.memscope(&["run"]).run();
    assert_eq!(output.stdout, "counted true\n", "{output:#?}");
    assert_eq!(output.code, Some(0), "{output:#?}");
    assert_eq!(fixture.latest_traces().len(), 1, "{output:#?}");
}

/// memscope builds from the workspace as the last run read it, while `cargo
/// metadata` reads it again; the program runs only once the two agree. A second
/// binary added in between makes the choice of binary ambiguous: the run says so
/// instead of running the binary it chose last time.
#[test]
fn a_binary_added_since_the_last_run_is_seen_before_anything_runs() {
    let fixture = Fixture::copy("hello-leak")
        .with_target_dir(memscope_e2e::e2e_target_root().join("hello-leak-added"));
    let first = fixture.memscope(&["run"]).run();
    assert!(first.stdout.contains("hello from hello-leak"), "{first:#?}");
    std::fs::create_dir_all(fixture.path().join("src/bin")).unwrap();
    std::fs::write(
        fixture.path().join("src/bin/second.rs"),
        "fn main() {\n    println!(\"hello from the second binary\");\n}\n",
    )
    .unwrap();

    let second = fixture.memscope(&["run"]).run();

    assert_eq!(second.code, Some(2), "{second:#?}");
    assert!(!second.stdout.contains("hello from"), "{second:#?}");
    assert!(
        second
            .last_stderr_line()
            .contains("could not determine which binary to run (available: hello-leak, second)"),
        "{second:#?}"
    );
}
