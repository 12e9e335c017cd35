//! The HTML report on the real binary: written beside `report.json`, opened in headless
//! Chromium with no console message, the overview's figures equal to `report.json`'s,
//! thread and file names that are HTML markup shown as text with nothing run, and
//! `--open`.
//!
//! Chromium must be installed (`.ci/run` installs it): without it these tests fail
//! saying so, they are never skipped.

#[path = "html_support/chromium.rs"]
#[allow(dead_code)]
mod chromium;

use std::fs;
use std::path::{Path, PathBuf};

use memscope_e2e::{e2e_target_root, Fixture, Output};

/// Runs `cargo memscope run` on the fixture and returns the report directory.
fn run(fixture: &Fixture) -> PathBuf {
    let output = fixture.memscope(&["run"]).run();
    assert_eq!(output.code, Some(0), "{output:#?}");
    let dir = fixture.target_dir().join("memscope/report");
    let html = dir.join("report.html");
    assert!(
        output
            .stderr
            .lines()
            .any(|l| l == format!("report: {}", html.display())),
        "the summary names report.html: {output:#?}"
    );
    dir
}

/// The top-level `summary` of a `report.json`: `(field, value)` pairs as written.
fn json_summary(json: &str) -> Vec<(String, String)> {
    let report: serde_json::Value = serde_json::from_str(json).expect("valid JSON");
    report["summary"]
        .as_object()
        .expect("a summary")
        .iter()
        .filter(|(_, value)| !value.is_object())
        .map(|(key, value)| (key.clone(), value.to_string()))
        .collect()
}

/// Every `"name": "…"` string value of a `report.json`, unescaped.
fn json_names(json: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = json;
    while let Some(at) = rest.find("\"name\": \"") {
        rest = &rest[at + "\"name\": \"".len()..];
        let mut name = String::new();
        let mut chars = rest.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    rest = &rest[i..];
                    break;
                }
                '\\' => match chars.next().map(|(_, c)| c) {
                    Some('u') => {
                        let hex: String = (0..4)
                            .filter_map(|_| chars.next())
                            .map(|(_, c)| c)
                            .collect();
                        name.extend(char::from_u32(u32::from_str_radix(&hex, 16).unwrap()));
                    }
                    Some('n') => name.push('\n'),
                    Some('t') => name.push('\t'),
                    Some(other) => name.push(other),
                    None => {}
                },
                c => name.push(c),
            }
        }
        names.push(name);
    }
    names
}

/// Text as Chromium serializes a text node: `&`, `<`, `>` escaped.
fn as_dom_text(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The `<dd class="figure">` text of the overview card for `field`, and its value.
fn card(dom: &str, field: &str) -> (String, String) {
    let key = format!("data-field=\"{field}\" data-value=\"");
    let at = dom
        .find(&key)
        .unwrap_or_else(|| panic!("no card for {field}"))
        + key.len();
    let value = dom[at..][..dom[at..].find('"').unwrap()].to_string();
    let figure = &dom[at..];
    let figure = &figure[figure.find("<dd class=\"figure\">").unwrap() + 19..];
    let text = figure[..figure.find("</dd>").unwrap()].to_string();
    (value, text)
}

fn assert_no_console_messages(page: &chromium::Loaded) {
    assert!(
        page.console.is_empty(),
        "the page wrote to the console: {:#?}",
        page.console
    );
}

#[test]
fn report_html_shows_the_figures_of_report_json_and_logs_nothing() {
    let fixture = Fixture::shared("hello-leak");
    let dir = run(&fixture);
    let json = fs::read_to_string(dir.join("report.json")).unwrap();
    let page = chromium::load(&dir.join("report.html"));
    assert_no_console_messages(&page);
    assert!(
        page.root_data("ready-ms").is_some(),
        "the page's script ran to its end"
    );

    let summary = json_summary(&json);
    let field = |name: &str| {
        summary
            .iter()
            .find(|(k, _)| k == name)
            .unwrap_or_else(|| panic!("no {name} in {summary:?}"))
            .1
            .clone()
    };
    for (name, unit) in [
        ("allocations", ""),
        ("reallocations", ""),
        ("frees", ""),
        ("bytes_allocated", " bytes"),
        ("peak_bytes", " bytes"),
        ("live_bytes_at_exit", " bytes"),
        ("leaked_bytes", " bytes"),
        ("runtime_internal_bytes", " bytes"),
        ("problems", ""),
    ] {
        let (value, text) = card(&page.dom, name);
        assert_eq!(value, field(name), "{name}");
        assert_eq!(
            text.replace(',', ""),
            format!("{}{unit}", field(name)),
            "{name}"
        );
    }
    // The figures this fixture is known for: one forgotten 4096-byte Vec.
    assert_eq!(field("leaked_bytes"), "4096");
    assert_eq!(field("leaked_blocks"), "1");
    let leaks = &page.dom[page
        .dom
        .find("<section id=\"view-leaks\"")
        .expect("a leaks view")..];
    assert!(leaks.contains("<td class=\"num\" data-value=\"4096\">4,096</td>"));
    assert!(leaks.contains("src/main.rs:5"), "the leak's source line");
    // The sites table, drawn by the script, has the leaking site first.
    let sites = &page.dom[page
        .dom
        .find("<tbody><tr class=\"site\"")
        .expect("site rows")..];
    assert!(sites.starts_with("<tbody><tr class=\"site\" data-site=\"0\""));

    // A leak's link to its site opens the site's full stack.
    assert!(leaks.contains("<a class=\"site-link\" href=\"#sites/0\">#0</a>"));
    let page = chromium::load_view(&dir.join("report.html"), "sites/0");
    assert_no_console_messages(&page);
    let stack = &page.dom[page
        .dom
        .find("<tr class=\"stack-row\"")
        .expect("an open stack")..];
    let stack = &stack[..stack.find("</tr>").unwrap()];
    assert!(
        stack.contains("<li class=\"site-frame\"><span class=\"fn\">hello_leak::main</span><span class=\"file\">src/main.rs:5</span></li>"),
        "{stack}"
    );
}

#[test]
fn thread_and_file_names_that_are_markup_are_shown_as_text_and_run_nothing() {
    let fixture = Fixture::shared("html-hostile-names");
    let dir = run(&fixture);
    let json = fs::read_to_string(dir.join("report.json")).unwrap();
    let names = json_names(&json);
    // What the OS kept of each name (15 bytes at most), as the report holds it.
    let img = names
        .iter()
        .find(|n| n.starts_with("<img src=x"))
        .unwrap_or_else(|| panic!("the <img> thread in {names:?}"));
    let bold = names
        .iter()
        .find(|n| n.starts_with("<b>"))
        .unwrap_or_else(|| panic!("the <b> thread in {names:?}"));
    assert_eq!(bold, "<b>x</b>&\"'");

    let page = chromium::load(&dir.join("report.html"));
    assert_no_console_messages(&page);
    assert!(page.dom.contains("<title>memscope report</title>"));
    let body = &page.dom[page.dom.find("<body").unwrap()..];
    assert!(!body.contains("<img"), "an <img> element was made");
    assert!(!body.contains("<b>"), "a <b> element was made");
    assert_eq!(
        body.matches("<script").count(),
        2,
        "only the page's own scripts"
    );
    for name in [img, bold] {
        let text = as_dom_text(name);
        let leaks = &body[body.find("<section id=\"view-leaks\"").unwrap()..];
        assert!(leaks.contains(&text), "{text} among the leak's threads");
        let threads = &body[body.find("<section id=\"view-threads\"").unwrap()..];
        assert!(threads.contains(&text), "{text} among the threads");
    }
    // The source file's name, in the leaks (from the template) and in the sites table
    // (from the script).
    let file = as_dom_text("src/<img src=x onerror=alert(1)>.rs:3");
    let leaks = &body[body.find("<section id=\"view-leaks\"").unwrap()..];
    assert!(leaks.contains(&file), "{file} in the leaks");
    let sites = &body[body.find("<tr class=\"site\"").expect("site rows")..];
    assert!(sites.contains(&file), "{file} in the sites table");
}

#[test]
fn screenshots_of_the_overview_and_sites_views_are_drawn() {
    let fixture = Fixture::shared("hello-leak");
    let dir = run(&fixture);
    let shots = e2e_target_root().join("html-screenshots");
    fs::create_dir_all(&shots).unwrap();
    for (view, fragment) in [("overview", ""), ("sites", "sites")] {
        let png = shots.join(format!("{view}.png"));
        let _ = fs::remove_file(&png);
        chromium::screenshot(&dir.join("report.html"), fragment, &png, 1400, 1000);
        let size = fs::metadata(&png).unwrap().len();
        // A blank page is a few kilobytes; a drawn report is tens of them.
        assert!(
            size > 20_000,
            "{view}: only {size} bytes in {}",
            png.display()
        );
    }
}

/// A directory holding only an `xdg-open` (and `open`) that runs `script`.
fn fake_opener(script: &str) -> tempfile::TempDir {
    let bin = tempfile::tempdir().unwrap();
    for name in ["xdg-open", "open"] {
        let path = bin.path().join(name);
        fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    bin
}

/// `cargo memscope report --open` on the traces of a hello-leak run, with `path` as
/// the whole `PATH`.
fn report_with_open(path: &Path) -> (Output, PathBuf) {
    let fixture = Fixture::shared("hello-leak");
    if fixture.latest_traces().is_empty() {
        run(&fixture);
    }
    let traces = fixture.latest_traces();
    let out = tempfile::tempdir().unwrap().keep();
    let mut args = vec!["report", "--open", "--output-dir", out.to_str().unwrap()];
    args.extend(traces.iter().map(|t| t.to_str().unwrap()));
    let output = memscope_e2e::memscope_command(&out, &args)
        .env("PATH", path)
        .run();
    (output, out.join("report.html"))
}

#[test]
fn open_runs_the_desktop_opener_on_report_html() {
    // `PATH` holds only the opener: the script uses shell built-ins only.
    let bin = fake_opener("echo \"$1\" > \"${0%/*}/opened\"");
    let (output, html) = report_with_open(bin.path());
    assert_eq!(output.code, Some(0), "{output:#?}");
    let opened = fs::read_to_string(bin.path().join("opened")).expect("the opener ran");
    assert_eq!(opened.trim(), html.display().to_string());
    assert!(
        output.stderr.contains("memscope: opening file://"),
        "{output:#?}"
    );
}

#[test]
fn open_without_a_working_opener_says_how_to_open_the_report_and_still_succeeds() {
    let empty = tempfile::tempdir().unwrap();
    let (output, html) = report_with_open(empty.path());
    assert_eq!(output.code, Some(0), "{output:#?}");
    assert!(html.is_file());
    let line = output.last_stderr_line();
    assert!(
        line.contains("to view the report, open file://") && line.ends_with("in a browser"),
        "{output:#?}"
    );

    let failing = fake_opener("exit 3");
    let (output, _) = report_with_open(failing.path());
    assert_eq!(output.code, Some(0), "{output:#?}");
    assert!(output
        .last_stderr_line()
        .contains("to view the report, open file://"));
}
