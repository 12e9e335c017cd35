//! `#[memscope::instrument]` end to end: fixtures whose report is known by
//! construction, run through the real `cargo memscope run`, asserted in report.json;
//! and `--instrument PATTERN` on a fixture without annotations.

use memscope_e2e::Fixture;
use serde_json::{json, Value};

fn report(fixture: &'static str, args: &[&str]) -> Value {
    run_report(&Fixture::shared(fixture), &["run", "-q"], args)
}

/// `cargo memscope <memscope_args> --output-dir … -- <args>`, which must succeed.
fn run_report(fixture: &Fixture, memscope_args: &[&str], args: &[&str]) -> Value {
    run_report_and_summary(fixture, memscope_args, args).0
}

/// The report and the terminal summary (stderr) of a run that must succeed.
fn run_report_and_summary(
    fixture: &Fixture,
    memscope_args: &[&str],
    args: &[&str],
) -> (Value, String) {
    let out = tempfile::tempdir().unwrap();
    let mut command = memscope_args.to_vec();
    command.extend(["--output-dir", out.path().to_str().unwrap(), "--"]);
    command.extend_from_slice(args);
    let output = fixture.memscope(&command).run();
    assert_eq!(output.code, Some(0), "{output:#?}");
    let json = std::fs::read_to_string(out.path().join("report.json")).expect("report.json");
    (
        serde_json::from_str(&json).expect("valid JSON"),
        output.stderr,
    )
}

fn by_name<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no {name:?} in {list:#}"))
}

/// The leak group whose variables include `name`.
fn leak_named<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| {
            l["variables"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["name"] == name)
        })
        .unwrap_or_else(|| panic!("no leak named {name:?} in {:#}", report["leaks"]))
}

/// The names of the variables a leak group carries, in order.
fn variable_names(leak: &Value) -> Vec<&Value> {
    leak["variables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| &v["name"])
        .collect()
}

#[test]
fn a_forgotten_cache_is_reported_with_its_variable_name_type_and_line() {
    let r = report("instrument-basic", &[]);
    let leak = leak_named(&r, "cache");
    assert_eq!(
        (leak["blocks"].as_u64(), leak["bytes"].as_u64()),
        (Some(1), Some(4096))
    );
    assert_eq!(
        leak["variables"],
        json!([{"name": "cache", "type": "alloc::vec::Vec<u8>", "file": "src/main.rs",
                "line": 9, "column": 9, "blocks": 1, "bytes": 4096, "basis": "declared"}])
    );
    let cache = by_name(&r["variables"], "cache");
    assert_eq!(cache["live_bytes_at_exit"], 4096);
    assert_eq!(cache["basis"], "declared");
}

#[test]
fn a_reallocated_vec_keeps_its_name_as_an_inference() {
    let r = report("instrument-basic", &[]);
    // Capacity 4 u64s grown by push to 128: five reallocations, 1024 bytes left.
    let leak = leak_named(&r, "log");
    assert_eq!(leak["bytes"], 1024);
    let var = &leak["variables"][0];
    assert_eq!(
        (var["line"].as_u64(), var["bytes"].as_u64()),
        (Some(15), Some(1024))
    );
    assert_eq!(var["basis"], "inferred");
    let log = by_name(&r["variables"], "log");
    assert_eq!(
        (log["bytes"].as_u64(), log["live_bytes_at_exit"].as_u64()),
        (Some(32), Some(1024))
    );
    let scope = by_name(&r["scopes"], "instrument_basic::grow_log");
    assert_eq!(scope["self"]["reallocations"], 5);
    assert_eq!(
        scope["self"]["bytes_allocated"],
        32 + 64 + 128 + 256 + 512 + 1024
    );
}

#[test]
fn scopes_form_a_tree_with_self_and_total_bytes() {
    let r = report("instrument-basic", &[]);
    let root = by_name(&r["scopes"], "main work");
    assert_eq!(root["kind"], "scope");
    assert_eq!(root["parent"], Value::Null);
    assert_eq!(root["self"]["bytes_allocated"], 0);
    let outer = by_name(&r["scopes"], "instrument_basic::outer");
    let inner = by_name(&r["scopes"], "instrument_basic::inner");
    assert_eq!(outer["parent"], root["id"]);
    assert_eq!(inner["parent"], outer["id"]);
    assert_eq!(
        (
            outer["self"]["bytes_allocated"].as_u64(),
            outer["total"]["bytes_allocated"].as_u64()
        ),
        (Some(1000), Some(1300))
    );
    assert_eq!(inner["total"]["bytes_allocated"], 300);
    assert_eq!(outer["total"]["live_bytes_at_exit"], 0);
    assert_eq!(
        (
            outer["entries"].as_u64(),
            outer["location"]["line"].as_u64()
        ),
        (Some(1), Some(23))
    );
    // Everything the instrumented functions allocated is under the manual scope.
    assert_eq!(
        root["total"]["bytes_allocated"],
        4096 + 2016 + 1300 + 48 + 24
    );
    assert_eq!(
        by_name(&r["scopes"], "sharing")["self"]["live_bytes_at_exit"],
        72
    );
}

#[test]
fn rc_and_arc_are_named_with_their_counts() {
    let r = report("instrument-basic", &[]);
    let other = by_name(&r["variables"], "other");
    assert_eq!(other["type"], "alloc::rc::Rc<[u64; 4]>");
    assert_eq!(other["rc"], json!({"strong": 2, "weak": 0}));
    assert_eq!(
        by_name(&r["variables"], "shared")["rc"],
        json!({"strong": 1, "weak": 0})
    );
    assert_eq!(
        by_name(&r["variables"], "again")["rc"],
        json!({"strong": 2, "weak": 1})
    );
    // Two names on the Rc's one block of 16 + 32 bytes.
    let leak = leak_named(&r, "shared");
    assert_eq!(leak["bytes"], 48);
    assert_eq!(variable_names(leak), ["shared", "other"]);
}

#[test]
fn a_moved_value_keeps_its_name_and_a_dropped_ones_name_ends_with_its_block() {
    let r = report("instrument-basic", &["moves"]);
    // `let kept = draft;` moves the Vec: one block, both names.
    let leak = leak_named(&r, "draft");
    assert_eq!(leak["bytes"], 512);
    assert_eq!(variable_names(leak), ["draft", "kept"]);
    assert_eq!(leak["variables"][0]["basis"], "declared");
    // `scratch` was dropped: nothing of it is live, and the leak allocated after it
    // (same size, usually the same address) carries no name.
    let scratch = by_name(&r["variables"], "scratch");
    assert_eq!(
        (
            scratch["bytes"].as_u64(),
            scratch["live_bytes_at_exit"].as_u64()
        ),
        (Some(256), Some(0))
    );
    let unnamed: Vec<&Value> = r["leaks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["location"]["line"] == 73)
        .collect();
    assert_eq!(unnamed.len(), 1, "{:#}", r["leaks"]);
    assert_eq!(unnamed[0]["bytes"], 256);
    assert_eq!(unnamed[0]["variables"], json!([]), "{:#}", unnamed[0]);
}

fn assert_tasks(r: &Value) {
    let tasks = &r["tasks"];
    assert_eq!(tasks.as_array().unwrap().len(), 2, "{tasks:#}");
    let fill = by_name(tasks, "instrument_tasks::fill");
    assert_eq!(
        (
            fill["allocations"].as_u64(),
            fill["bytes_allocated"].as_u64(),
            fill["live_bytes_at_exit"].as_u64()
        ),
        (Some(1), Some(1000), Some(1000))
    );
    assert_eq!(
        (fill["state"].as_str(), fill["polls"].as_u64()),
        (Some("completed"), Some(1))
    );
    assert_eq!(fill["zombie_candidate"], Value::Null);
    let waiter = by_name(tasks, "waiter");
    assert_eq!(
        (
            waiter["allocations"].as_u64(),
            waiter["bytes_allocated"].as_u64(),
            waiter["live_bytes_at_exit"].as_u64()
        ),
        (Some(1), Some(2000), Some(2000))
    );
    assert_eq!(waiter["state"], "pending_at_exit");
    assert_eq!(waiter["zombie_candidate"]["basis"], "inferred");
    assert_eq!(waiter["location"]["line"], 37);
}

#[test]
fn the_terminal_summary_shows_named_leaks_scopes_and_tasks_with_the_reports_figures() {
    let (r, summary) =
        run_report_and_summary(&Fixture::shared("instrument-basic"), &["run", "-q"], &[]);
    let lines: Vec<&str> = summary.lines().collect();
    let has = |line: &str| assert!(lines.contains(&line), "no {line:?} in\n{summary}");
    // Named leaks, under their site's line, with the figures of `leaks[].variables`.
    let cache = &leak_named(&r, "cache")["variables"][0];
    assert_eq!((&cache["bytes"], &cache["line"]), (&json!(4096), &json!(9)));
    has("       4.0 KiB in    1 block  named `cache`: alloc::vec::Vec<u8> at src/main.rs:9:9");
    let log = &leak_named(&r, "log")["variables"][0];
    assert_eq!(
        (&log["bytes"], &log["basis"]),
        (&json!(1024), &json!("inferred"))
    );
    has("       1.0 KiB in    1 block  named `log`: alloc::vec::Vec<u64> at src/main.rs:15:13 [inferred]");
    // Scopes by total bytes: "main work" first (7,484 bytes, 5,192 live at exit).
    let root = by_name(&r["scopes"], "main work");
    assert_eq!(
        (
            &root["total"]["bytes_allocated"],
            &root["total"]["live_bytes_at_exit"]
        ),
        (&json!(7484), &json!(4096 + 1024 + 48 + 24))
    );
    let heading = lines
        .iter()
        .position(|l| l.starts_with("scopes (6 instrumented), top by total bytes"))
        .unwrap_or_else(|| panic!("no scopes heading in\n{summary}"));
    assert_eq!(
        lines[heading + 1],
        "       7.3 KiB total,          0 B self,      5.1 KiB live at exit  main work [scope]  src/main.rs:48"
    );
    assert_eq!(
        lines[heading + 5],
        "         300 B total,        300 B self,          0 B live at exit  instrument_basic::inner (in instrument_basic::outer)  src/main.rs:30"
    );

    let (r, summary) = run_report_and_summary(
        &Fixture::shared("instrument-tasks"),
        &["run", "-q"],
        &["current"],
    );
    let waiter = by_name(&r["tasks"], "waiter");
    assert_eq!(
        (&waiter["polls"], &waiter["live_bytes_at_exit"]),
        (&json!(1), &json!(2000))
    );
    let lines: Vec<&str> = summary.lines().collect();
    let heading = lines
        .iter()
        .position(|l| l.starts_with("tasks: 2, 1 pending at exit (zombie candidates"))
        .unwrap_or_else(|| panic!("no tasks heading in\n{summary}"));
    assert_eq!(
        lines[heading + 1],
        "       2.0 KiB live in    1 block, 1 poll  waiter  src/main.rs:37"
    );
}

#[test]
fn tokio_current_thread_tasks_have_their_allocations_and_the_pending_one_is_a_zombie_candidate() {
    assert_tasks(&report("instrument-tasks", &["current"]));
}

#[test]
fn tokio_multi_thread_tasks_have_their_allocations_whichever_worker_polls_them() {
    assert_tasks(&report("instrument-tasks", &["multi"]));
}

// --------------------------------------------------------------------------------
// `--instrument PATTERN` on fixtures/instrument-pattern, which has no annotations.

const BOOK: &str = "instrument_pattern::book::OrderBook";

fn scope_names(r: &Value) -> Vec<String> {
    r["scopes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect()
}

fn instrumented(patterns: &[&str]) -> Value {
    let fixture = Fixture::shared("instrument-pattern");
    let mut args = vec!["run", "-q"];
    for p in patterns {
        args.extend(["--instrument", p]);
    }
    run_report(&fixture, &args, &[])
}

#[test]
fn instrument_flag_names_the_scopes_and_variables_of_unannotated_modules_and_files() {
    let r = instrumented(&["book", "src/engine.rs"]);
    // Not `util` (not selected), `main`, the const fn or the function a macro wrote.
    assert_eq!(
        scope_names(&r),
        [
            format!("{BOOK}::new"),
            format!("{BOOK}::add"),
            format!("{BOOK}::match_orders"),
            "instrument_pattern::book::Describe::describe".into(),
            "instrument_pattern::engine::run".into(),
        ]
    );
    let figures = |name: &str| {
        let s = by_name(&r["scopes"], name);
        (
            s["entries"].as_u64().unwrap(),
            s["self"]["bytes_allocated"].as_u64().unwrap(),
            s["location"]["line"].as_u64().unwrap(),
        )
    };
    assert_eq!(figures(&format!("{BOOK}::new")), (1, 4 * 16, 15));
    assert_eq!(figures(&format!("{BOOK}::add")), (4, 0, 20));
    assert_eq!(figures(&format!("{BOOK}::match_orders")), (1, 4 * 8, 25));
    assert_eq!(
        figures("instrument_pattern::book::Describe::describe"),
        (1, 27, 61)
    );
    assert_eq!(figures("instrument_pattern::engine::run"), (1, 1000, 3));

    let leak = leak_named(&r, "pending");
    assert_eq!(
        leak["variables"],
        json!([{"name": "pending", "type": "alloc::vec::Vec<u64>", "file": "src/book.rs",
                "line": 26, "column": 17, "blocks": 1, "bytes": 32, "basis": "declared"}])
    );
    let orders = by_name(&r["variables"], "orders");
    assert_eq!(
        (
            orders["type"].as_str(),
            orders["location"]["line"].as_u64(),
            orders["bytes"].as_u64()
        ),
        (
            Some("alloc::vec::Vec<instrument_pattern::book::Order>"),
            Some(16),
            Some(64)
        )
    );
    assert_eq!(by_name(&r["variables"], "scratch")["bytes"], 1000);
}

#[test]
fn the_scratch_copy_follows_the_patterns_and_is_plain_again_without_the_flag() {
    let fixture = Fixture::shared("instrument-pattern");
    let before = fixture.files();
    let scratch_book = || {
        let scratch = fixture.target_dir().join("memscope/scratch");
        let copy = std::fs::read_dir(scratch).unwrap().find_map(|e| {
            let path = e.unwrap().path();
            path.is_dir().then_some(path)
        });
        std::fs::read(copy.unwrap().join("src/book.rs")).unwrap()
    };
    let run = |patterns: &[&str]| {
        let mut args = vec!["run", "-q"];
        for p in patterns {
            args.extend(["--instrument", p]);
        }
        run_report(&fixture, &args, &[])
    };

    let r = run(&["book::OrderBook::match_orders"]);
    assert_eq!(scope_names(&r), [format!("{BOOK}::match_orders")]);
    let r = run(&["src/engine.rs"]);
    assert_eq!(scope_names(&r), ["instrument_pattern::engine::run"]);
    assert_eq!(scratch_book(), before[std::path::Path::new("src/book.rs")]);

    // Plain again: nothing instrumented, nothing declared.
    let r = run(&[]);
    assert_eq!(
        (&r["scopes"], &r["variables"], &r["tasks"]),
        (&json!([]), &json!([]), &json!([]))
    );
    let leak = &r["leaks"].as_array().unwrap()[0];
    assert_eq!(
        (&leak["bytes"], &leak["variables"]),
        (&json!(32), &json!([]))
    );
    assert_eq!(
        fixture.files(),
        before,
        "the user's files are never touched"
    );
}

#[test]
fn a_pattern_that_selects_nothing_is_a_one_line_error_that_says_what_is_there() {
    let fixture = Fixture::shared("instrument-pattern");
    let error = |pattern: &str| {
        let output = fixture
            .memscope(&["run", "-q", "--instrument", pattern])
            .run();
        assert_eq!(output.code, Some(2), "{output:#?}");
        output.stderr
    };
    assert_eq!(
        error("bok"),
        "error: --instrument bok: no module of the crates built (instrument_pattern) matches it; \
         modules there: book, engine, tests, util\n"
    );
    assert_eq!(
        error("src/bok.rs"),
        "error: --instrument src/bok.rs: no file of the crates built (instrument_pattern) matches it; \
         files there: src/book.rs, src/engine.rs, src/main.rs, src/util.rs\n"
    );
    assert_eq!(
        error("book::capacity"),
        "error: --instrument book::capacity: selects only const fns, which cannot be instrumented \
         (they may run at compile time)\n"
    );
    assert!(error("a b").starts_with(
        "error: invalid value 'a b' for '--instrument <PATTERN>': `a b` is neither a path"
    ));
}

#[test]
fn cargo_memscope_test_with_instrument_names_what_a_test_leaked() {
    let fixture = Fixture::shared("instrument-pattern");
    let r = run_report(&fixture, &["test", "--instrument", "book"], &[]);
    assert_eq!(
        scope_names(&r),
        [
            format!("{BOOK}::new"),
            format!("{BOOK}::add"),
            format!("{BOOK}::match_orders"),
        ]
    );
    let test = by_name(&r["tests"], "tests::matching_leaks_the_pending_ids");
    assert_eq!(
        (
            test["leaked_blocks"].as_u64(),
            test["leaked_bytes"].as_u64()
        ),
        (Some(1), Some(8))
    );
    let leak = leak_named(&r, "pending");
    assert_eq!(
        (&leak["bytes"], &leak["variables"][0]["line"]),
        (&json!(8), &json!(26))
    );
}

#[test]
fn instrumenting_an_annotated_crate_adds_only_what_was_not_annotated() {
    let r = run_report(
        &Fixture::shared("instrument-basic"),
        &["run", "-q", "--instrument", "crate"],
        &[],
    );
    let main = by_name(&r["scopes"], "instrument_basic::main");
    assert_eq!(main["parent"], Value::Null);
    let root = by_name(&r["scopes"], "main work");
    assert_eq!(root["parent"], main["id"]);
    // Each annotated function once, where it was, with its own figures.
    for name in ["instrument_basic::outer", "instrument_basic::inner"] {
        let count = scope_names(&r).iter().filter(|n| *n == name).count();
        assert_eq!(count, 1, "{name}");
    }
    let outer = by_name(&r["scopes"], "instrument_basic::outer");
    assert_eq!(outer["parent"], root["id"]);
    assert_eq!(
        (
            outer["self"]["bytes_allocated"].as_u64(),
            outer["total"]["bytes_allocated"].as_u64()
        ),
        (Some(1000), Some(1300))
    );
}
