//! The HTML report (`report.html`): one self-contained file, with its styles, script
//! and data inline, rendered from the same [`Report`] as `report.json` and the
//! terminal summary, so it shows the same numbers. The only user of minijinja, and of
//! the system's "open this file" command.
//!
//! Safety: every string of the tracked program (thread, type, function, file and
//! variable names) reaches the page either through the template, whose HTML
//! auto-escaping is on for every value, or as JSON inside a
//! `<script type="application/json">` element with `<`, `>` and `&` written as `\u00XX`
//! escapes ([`script_json`]), which the page's script parses and inserts with
//! `textContent` only.
//!
//! Size: the page holds at most [`SITES_PER_RANKING`] sites per ranking the sites table
//! sorts on, [`LEAKS_SHOWN`] leak groups, and so on; whatever is left out is said on the
//! page, and is in `report.json`. Each view is shown only when the report has it, so a
//! section that a later model adds slots in as one field of [`Page`] and one block of
//! the template.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use minijinja::{AutoEscape, Environment, UndefinedBehavior, Value};
use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::report::{
    InternalGroup, Leak, Problem, Process, Report, Site, Summary, Thread, Timeline,
};
use crate::summary;
use crate::symbols::{Frame, ModuleStatus};

const TEMPLATE: &str = include_str!("html/report.html");
const STYLE: &str = include_str!("html/report.css");
const SCRIPT: &str = include_str!("html/report.js");

/// Sites in the page: the top this many by bytes allocated, by allocation count, by
/// bytes live at the peak and by bytes live at exit (the orders the table sorts on).
pub const SITES_PER_RANKING: usize = 1000;
/// Leak groups listed (largest first).
pub const LEAKS_SHOWN: usize = 1000;
/// Runtime-internal groups listed (largest first).
pub const INTERNAL_SHOWN: usize = 200;
/// Threads listed (most bytes allocated first).
pub const THREADS_SHOWN: usize = 1000;
/// Problems listed (in the report's order).
pub const PROBLEMS_SHOWN: usize = 1000;
/// Processes with a timeline chart (highest peak first).
pub const CHARTS_SHOWN: usize = 8;
/// Frames of one stack shown, innermost first.
pub const FRAMES_SHOWN: usize = 128;

/// Renders the report and writes it to `path`.
pub fn write(report: &Report, user_roots: &[PathBuf], path: &Path) -> anyhow::Result<()> {
    let html = render(report, user_roots)?;
    fs::write(path, html).with_context(|| format!("failed to write {}", path.display()))
}

/// The whole page. `user_roots` are the workspace directories that file names are
/// shown relative to, as in the terminal summary.
pub fn render(report: &Report, user_roots: &[PathBuf]) -> anyhow::Result<String> {
    let page = Page::new(report);
    let mut env = Environment::new();
    env.set_auto_escape_callback(|_| AutoEscape::Html);
    env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
    env.add_filter("num", summary::count);
    env.add_filter("bytes", summary::bytes);
    env.add_filter("bytes_short", summary::bytes_short);
    env.add_filter("duration", |ns: Option<u64>| ns.map(summary::duration));
    env.add_filter("percent", percent);
    let roots = user_roots.to_vec();
    env.add_filter("path", move |file: String| display_path(&file, &roots));
    env.add_template("report.html", TEMPLATE)
        .context("the HTML report template does not parse")?;
    let template = env.get_template("report.html")?;
    let data = script_json(&page.sites_data(user_roots));
    // The only values not escaped: our own style and script, and JSON escaped for a
    // script element.
    let html = template
        .render(minijinja::context! {
            page => Value::from(minijinja::value::Serde(&page)),
            style => Value::from_safe_string(STYLE.into()),
            script => Value::from_safe_string(SCRIPT.into()),
            data => Value::from_safe_string(data),
        })
        .context("failed to render the HTML report")?;
    Ok(html)
}

/// Opens the page with the desktop's opener (`xdg-open`, `open`), or says how to open
/// it. Never fails: a run's result does not depend on a browser.
pub fn open(path: &Path) {
    let url = file_url(path);
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else {
        "xdg-open"
    };
    let started = Command::new(opener)
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let opened = match started {
        // An opener that cannot open anything says so at once; one that launched a
        // browser may stay until the browser closes, and is not waited for.
        Ok(mut child) => {
            std::thread::sleep(Duration::from_millis(300));
            !matches!(child.try_wait(), Ok(Some(status)) if !status.success())
        }
        Err(_) => false,
    };
    if opened {
        eprintln!("memscope: opening {url} with {opener}");
    } else {
        eprintln!("memscope: could not run {opener}; to view the report, open {url} in a browser");
    }
}

/// `file:///…`, with the characters a URL cannot hold percent-encoded.
fn file_url(path: &Path) -> String {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut url = String::from("file://");
    for byte in absolute.as_os_str().as_encoded_bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' | b'~' => {
                url.push(*byte as char)
            }
            _ => url.push_str(&format!("%{byte:02X}")),
        }
    }
    url
}

/// JSON for a `<script type="application/json">` element: `<`, `>` and `&` (the only
/// characters that can end the element or start markup) as `\u00XX` escapes, which
/// `JSON.parse` reads back as the same characters.
fn script_json<T: Serialize>(value: &T) -> String {
    let json = serde_json::to_string(value).expect("report data serializes");
    let mut out = String::with_capacity(json.len() + json.len() / 16);
    for c in json.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            c => out.push(c),
        }
    }
    out
}

/// A token for the page's Content-Security-Policy: unguessable by the program whose
/// strings the page shows (it is made after the program ran), which is all it needs.
fn nonce() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    format!("{:016x}", hasher.finish())
}

/// `12.3%`.
fn percent(share: f64) -> String {
    format!("{:.1}%", share * 100.0)
}

/// A file name as the terminal summary shows it: relative to the user's root it is
/// under, and the standard library's without the compiler's commit hash.
fn display_path(file: &str, roots: &[PathBuf]) -> String {
    if let Some((_, rest)) = file.strip_prefix("/rustc/").and_then(|r| r.split_once('/')) {
        return rest.to_string();
    }
    let path = Path::new(file);
    roots
        .iter()
        .find_map(|r| path.strip_prefix(r).ok())
        .map_or_else(|| file.to_string(), |p| p.display().to_string())
}

// ---------------------------------------------------------------------------------
// What the template sees: the report's own values, some lists cut to a size a browser
// takes in at once, with the full lengths beside them.

/// The template's context.
#[derive(Serialize)]
struct Page<'a> {
    version: &'a str,
    summary: &'a Summary,
    /// Why figures may be partial, one sentence each (as in the terminal summary).
    warnings: Vec<String>,
    processes: &'a [Process],
    charts: Part<Chart>,
    sites: Part<&'a Site>,
    leaks: Part<&'a Leak>,
    runtime_internal: Part<&'a InternalGroup>,
    threads: Part<&'a Thread>,
    problems: Part<&'a Problem>,
    /// The views the report has, in order: `(id, title, count)`.
    views: Vec<(&'static str, &'static str, Option<usize>)>,
    frames_shown: usize,
    /// A random token that lets the page's own script run (Content-Security-Policy).
    nonce: String,
}

/// The first items of a list, and the list's length.
#[derive(Serialize)]
struct Part<T> {
    items: Vec<T>,
    total: usize,
}

impl<T> Part<T> {
    fn of(items: impl IntoIterator<Item = T>, limit: usize) -> Part<T> {
        let mut rest = items.into_iter();
        let items: Vec<T> = rest.by_ref().take(limit).collect();
        let total = items.len() + rest.count();
        Part { items, total }
    }
}

impl<'a> Page<'a> {
    fn new(report: &'a Report) -> Page<'a> {
        let mut threads: Vec<&Thread> = report.threads.iter().collect();
        if threads.len() > THREADS_SHOWN {
            threads.sort_by_key(|t| std::cmp::Reverse(t.bytes_allocated));
        }
        let mut page = Page {
            version: &report.memscope_version,
            summary: &report.summary,
            warnings: warnings(report),
            processes: &report.processes,
            charts: charts(report),
            sites: Part {
                items: shown_sites(&report.sites),
                total: report.sites.len(),
            },
            leaks: Part::of(&report.leaks, LEAKS_SHOWN),
            runtime_internal: Part::of(&report.runtime_internal, INTERNAL_SHOWN),
            threads: Part::of(threads, THREADS_SHOWN),
            problems: Part::of(&report.problems, PROBLEMS_SHOWN),
            views: Vec::new(),
            frames_shown: FRAMES_SHOWN,
            nonce: nonce(),
        };
        page.views = page.views();
        page
    }

    fn views(&self) -> Vec<(&'static str, &'static str, Option<usize>)> {
        let mut views = vec![("overview", "Overview", None)];
        let mut add = |id, title, total: usize| {
            if total > 0 {
                views.push((id, title, Some(total)));
            }
        };
        add("sites", "Allocation sites", self.sites.total);
        add("leaks", "Leaks", self.leaks.total);
        add(
            "internal",
            "Kept by the runtime",
            self.runtime_internal.total,
        );
        add("threads", "Threads", self.threads.total);
        add("problems", "Problems", self.problems.total);
        add("processes", "Processes", self.processes.len());
        views
    }

    /// The sites table's data, for the script: the shown sites, with their stacks as
    /// indexes into one table of distinct frames.
    fn sites_data(&self, user_roots: &[PathBuf]) -> SitesData<'a> {
        let mut frames = Vec::new();
        let mut index: FxHashMap<&Frame, usize> = FxHashMap::default();
        let sites = self
            .sites
            .items
            .iter()
            .map(|site| SiteData {
                site,
                stack: site
                    .stack
                    .iter()
                    .take(FRAMES_SHOWN)
                    .map(|f| {
                        *index.entry(f).or_insert_with(|| {
                            frames.push(FrameData::new(f, user_roots));
                            frames.len() - 1
                        })
                    })
                    .collect(),
                file: site
                    .location
                    .as_ref()
                    .and_then(|l| l.file.as_deref())
                    .map(|f| display_path(f, user_roots)),
            })
            .collect();
        SitesData {
            total: self.sites.total,
            frames_shown: FRAMES_SHOWN,
            sites,
            frames,
        }
    }
}

/// The sites shown: the union of the top [`SITES_PER_RANKING`] of each ranking, in the
/// report's order (by bytes allocated).
fn shown_sites(sites: &[Site]) -> Vec<&Site> {
    if sites.len() <= SITES_PER_RANKING {
        return sites.iter().collect();
    }
    let mut keep = vec![false; sites.len()];
    let rankings: [fn(&Site) -> u64; 4] = [
        |s| s.bytes_allocated,
        |s| s.allocations + s.reallocations,
        |s| s.bytes_at_peak,
        |s| s.live_bytes_at_exit,
    ];
    let mut order: Vec<usize> = (0..sites.len()).collect();
    for key in rankings {
        order.sort_by_key(|&i| (std::cmp::Reverse(key(&sites[i])), i));
        for &i in order.iter().take(SITES_PER_RANKING) {
            keep[i] = true;
        }
    }
    sites
        .iter()
        .zip(keep)
        .filter_map(|(s, k)| k.then_some(s))
        .collect()
}

#[derive(Serialize)]
struct SitesData<'a> {
    total: usize,
    frames_shown: usize,
    sites: Vec<SiteData<'a>>,
    frames: Vec<FrameData<'a>>,
}

/// A site with its stack as frame indexes (the other fields are the report's).
#[derive(Serialize)]
struct SiteData<'a> {
    #[serde(flatten)]
    site: &'a Site,
    /// The location's file as shown (relative to the user's root).
    file: Option<String>,
    #[serde(rename = "stack")]
    stack: Vec<usize>,
}

#[derive(Serialize)]
struct FrameData<'a> {
    function: Option<&'a str>,
    /// As shown (relative to the user's root).
    file: Option<String>,
    line: Option<u32>,
    inlined: bool,
    address: &'a str,
}

impl<'a> FrameData<'a> {
    fn new(f: &'a Frame, user_roots: &[PathBuf]) -> FrameData<'a> {
        FrameData {
            function: f.function.as_deref(),
            file: f.file.as_deref().map(|p| display_path(p, user_roots)),
            line: f.line,
            inlined: f.inlined,
            address: &f.address,
        }
    }
}

/// The terminal summary's warnings, as sentences.
fn warnings(report: &Report) -> Vec<String> {
    let mut out = Vec::new();
    let s = &report.summary;
    if s.events_dropped > 0 {
        out.push(format!(
            "{} events were dropped while tracing: figures are not exact.",
            summary::count(s.events_dropped)
        ));
    }
    for p in report.processes.iter().filter(|p| !p.complete) {
        let reason = p
            .damage
            .first()
            .map(String::as_str)
            .unwrap_or("it ended early");
        out.push(format!(
            "The trace of process {} is incomplete ({reason}): figures cover what it recorded, \
             and \"at exit\" means when the trace ends.",
            p.pid
        ));
    }
    let mut noted: Vec<&ModuleStatus> = Vec::new();
    for m in report.processes.iter().flat_map(|p| &p.symbols) {
        let missing = m.status == "unreadable" || (m.executable && m.status != "symbolized");
        if missing && !noted.iter().any(|n| n.path == m.path) {
            noted.push(m);
            let detail = m.detail.as_deref().unwrap_or(&m.status);
            out.push(format!(
                "{}: {detail}: its frames have no source locations.",
                m.path
            ));
        }
    }
    out
}

// ---------------------------------------------------------------------------------
// The timeline chart: live bytes over time as an SVG polyline, drawn here.

/// The drawing area of a chart, in SVG user units.
const CHART_W: f64 = 1000.0;
const CHART_H: f64 = 220.0;
/// Room for the axes' labels: left and bottom.
const CHART_LEFT: f64 = 78.0;
const CHART_BOTTOM: f64 = 26.0;
const CHART_TOP: f64 = 12.0;
const CHART_RIGHT: f64 = 16.0;

/// One process's timeline, ready to draw: coordinates in the SVG's user units.
#[derive(Serialize)]
struct Chart {
    pid: u32,
    width: f64,
    height: f64,
    /// The plot area: left, top, right, bottom.
    plot: [f64; 4],
    /// The line's `d` attribute, and the area under it.
    line: String,
    area: String,
    x_ticks: Vec<Tick>,
    y_ticks: Vec<Tick>,
    x_label: &'static str,
    peak: Option<Peak>,
    points: usize,
}

#[derive(Serialize)]
struct Tick {
    at: f64,
    label: String,
}

#[derive(Serialize)]
struct Peak {
    x: f64,
    y: f64,
    bytes: u64,
    label: String,
    /// Anchor the label on the left of the marker when it is near the right edge.
    label_left: bool,
}

fn charts(report: &Report) -> Part<Chart> {
    let mut timelines: Vec<(&Timeline, Option<&Process>)> = report
        .timeline
        .iter()
        .filter(|t| !t.points.is_empty())
        .map(|t| (t, report.processes.iter().find(|p| p.pid == t.pid)))
        .collect();
    if timelines.len() > CHARTS_SHOWN {
        timelines.sort_by_key(|(_, p)| std::cmp::Reverse(p.map_or(0, |p| p.summary.peak_bytes)));
    }
    Part::of(
        timelines.into_iter().map(|(t, p)| chart(t, p)),
        CHARTS_SHOWN,
    )
}

fn chart(timeline: &Timeline, process: Option<&Process>) -> Chart {
    let points = &timeline.points;
    let (left, top) = (CHART_LEFT, CHART_TOP);
    let (right, bottom) = (CHART_W - CHART_RIGHT, CHART_H - CHART_BOTTOM);
    let t_max = points.iter().map(|p| p.t).max().unwrap_or(0).max(1);
    let b_max = points.iter().map(|p| p.bytes).max().unwrap_or(0).max(1);
    let x = |t: u64| left + (right - left) * t as f64 / t_max as f64;
    let y = |b: u64| bottom - (bottom - top) * b as f64 / b_max as f64;

    let mut line = String::new();
    for (i, p) in points.iter().enumerate() {
        let cmd = if i == 0 { 'M' } else { 'L' };
        line.push_str(&format!("{cmd}{:.1} {:.1} ", x(p.t), y(p.bytes)));
    }
    let first = points.first().map_or(0, |p| p.t);
    let last = points.last().map_or(0, |p| p.t);
    let area = format!(
        "M{:.1} {bottom:.1} {}L{:.1} {bottom:.1} Z",
        x(first),
        line.replacen('M', "L", 1),
        x(last)
    );

    let ns = timeline.unit == "ns";
    let time_label = |t: u64| {
        if ns {
            summary::duration(t)
        } else {
            summary::count(t)
        }
    };
    let x_ticks = (0..=4)
        .map(|i| {
            let t = t_max * i / 4;
            Tick {
                at: x(t),
                label: time_label(t),
            }
        })
        .collect();
    let y_ticks = (0..=4)
        .map(|i| {
            let b = b_max * i / 4;
            Tick {
                at: y(b),
                label: summary::bytes_short(b),
            }
        })
        .collect();

    // The peak is the process's own figure; the timeline holds it as a point (the
    // latest one that reaches it).
    let peak_bytes = process.map_or(b_max, |p| p.summary.peak_bytes);
    let peak = points
        .iter()
        .rev()
        .find(|p| p.bytes == peak_bytes && p.bytes > 0)
        .map(|p| {
            let when = match process.and_then(|p| p.summary.peak_time_ns) {
                Some(t) => format!(" at {}", summary::duration(t)),
                None if !ns => format!(" at tick {}", summary::count(p.t)),
                None => String::new(),
            };
            Peak {
                x: x(p.t),
                y: y(p.bytes),
                bytes: p.bytes,
                label: format!("peak {}{when}", summary::bytes_short(p.bytes)),
                label_left: x(p.t) > (left + right) / 2.0,
            }
        });
    Chart {
        pid: timeline.pid,
        width: CHART_W,
        height: CHART_H,
        plot: [left, top, right, bottom],
        line: line.trim_end().to_string(),
        area,
        x_ticks,
        y_ticks,
        x_label: if ns {
            "time since the process started"
        } else {
            "clock ticks since the first event (the clock was not calibrated)"
        },
        peak,
        points: points.len(),
    }
}
