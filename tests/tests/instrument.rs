//! `#[memscope::instrument]` end to end: fixtures whose report is known by
//! construction, run through the real `cargo memscope run`, asserted in report.json.

use memscope_e2e::Fixture;
use serde_json::{json, Value};

fn report(fixture: &'static str, args: &[&str]) -> Value {
    let fixture = Fixture::shared(fixture);
    let out = tempfile::tempdir().unwrap();
    let mut command = vec![
        "run",
        "-q",
        "--output-dir",
        out.path().to_str().unwrap(),
        "--",
    ];
    command.extend_from_slice(args);
    let output = fixture.memscope(&command).run();
    assert_eq!(output.code, Some(0), "{output:#?}");
    let json = std::fs::read_to_string(out.path().join("report.json")).expect("report.json");
    serde_json::from_str(&json).expect("valid JSON")
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
    let names: Vec<&Value> = leak["variables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| &v["name"])
        .collect();
    assert_eq!(names, ["shared", "other"]);
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
fn tokio_current_thread_tasks_have_their_allocations_and_the_pending_one_is_a_zombie_candidate() {
    assert_tasks(&report("instrument-tasks", &["current"]));
}

#[test]
fn tokio_multi_thread_tasks_have_their_allocations_whichever_worker_polls_them() {
    assert_tasks(&report("instrument-tasks", &["multi"]));
}
