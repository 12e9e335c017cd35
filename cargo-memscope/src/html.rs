//! The HTML report (`report.html`): one self-contained file, with its styles, script
//! and data inline, rendered from the same [`Report`] as `report.json` and the
//! terminal summary, so it shows the same numbers. The only user of minijinja, and of
//! the system's "open this file" command.
//!
//! Safety: every string of the tracked program (thread, type, function, file and
//! variable names) reaches the page either through the template, whose HTML
//! auto-escaping is on for every value, or as JSON inside a
//! `<script type="application/json">` element with `<`, `>` and `&` written as `\u00XX`
//! escapes ([`ScriptJson`]), which the page's script parses and inserts with
//! `textContent` only.
//!
//! Size: the page holds at most [`SITES_PER_RANKING`] sites per ranking the sites table
//! sorts on, [`LEAKS_SHOWN`] leak groups, and so on; whatever is left out is said on the
//! page, and is in `report.json`. Each view is shown only when the report has it, so a
//! section that a later model adds slots in as one field of [`Page`] and one block of
//! the template.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use minijinja::{AutoEscape, Environment, UndefinedBehavior, Value};
use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::instrument::{Scope, Task, VarRef, Variable};
use crate::pertest::{TestBinary, TestResult};
use crate::report::{
    Basis, FrameEntry, InternalGroup, Leak, Location, Problem, Process, Report, Site, Summary,
    Thread, Timeline,
};
use crate::summary;
use crate::symbols::{ModuleStatus, SiteOrigin};

const TEMPLATE: &str = include_str!("html/report.html");
const STYLE: &str = include_str!("html/report.css");
const SCRIPT: &str = include_str!("html/report.js");

/// Sites in the page: the top this many by bytes allocated, by allocation count, by
/// bytes live at the peak and by bytes live at exit (the orders the table sorts on).
pub const SITES_PER_RANKING: usize = 500;
/// Leak groups listed (largest first).
pub const LEAKS_SHOWN: usize = 500;
/// Runtime-internal groups listed (largest first).
pub const INTERNAL_SHOWN: usize = 200;
/// Threads listed (most bytes allocated first).
pub const THREADS_SHOWN: usize = 1000;
/// Problems listed (in the report's order).
pub const PROBLEMS_SHOWN: usize = 1000;
/// Tests, scopes, variables and tasks listed (each).
pub const ROWS_SHOWN: usize = 2000;
/// Processes with a timeline chart (highest peak first).
pub const CHARTS_SHOWN: usize = 8;
/// Frames of one stack shown, innermost first.
pub const FRAMES_SHOWN: usize = 128;

/// Renders the report and writes it to `path`.
pub fn write(report: &Report, user_roots: &[PathBuf], path: &Path) -> anyhow::Result<()> {
    let write = || -> anyhow::Result<()> {
        let mut out = io::BufWriter::new(fs::File::create(path)?);
        render_to(&mut out, report, user_roots)?;
        Ok(out.flush()?)
    };
    write().with_context(|| format!("failed to write {}", path.display()))
}

/// Writes the whole page to `out`: the template's output, with the script's data
/// (megabytes of JSON, for a test suite) serialized straight into its place rather
/// than through the template. `user_roots` are the workspace directories that file
/// names are shown relative to, as in the terminal summary.
fn render_to(
    out: &mut impl io::Write,
    report: &Report,
    user_roots: &[PathBuf],
) -> anyhow::Result<()> {
    let page = Page::new(report);
    let mut env = Environment::new();
    env.set_auto_escape_callback(|_| AutoEscape::Html);
    env.set_undefined_behavior(UndefinedBehavior::SemiStrict);
    env.add_filter("num", summary::count);
    env.add_filter("bytes", summary::bytes);
    env.add_filter("plural", |n: u64, noun: String| summary::plural(n, &noun));
    env.add_filter("bytes_short", summary::bytes_short);
    env.add_filter("duration", |ns: Option<u64>| ns.map(summary::duration));
    env.add_filter("percent", percent);
    let roots = user_roots.to_vec();
    env.add_filter("path", move |file: String| display_path(&file, &roots));
    env.add_template("report.html", TEMPLATE)
        .context("the HTML report template does not parse")?;
    let template = env.get_template("report.html")?;
    // Where the data goes: a mark no string of the program's can hold, since it is made
    // of the nonce, which is made after the program ran.
    let mark = format!("memscope-data-{}", page.nonce);
    // The only values not escaped: our own style and script, and the mark.
    let html = template
        .render(minijinja::context! {
            page => Value::from(minijinja::value::Serde(&page)),
            style => Value::from_safe_string(STYLE.into()),
            script => Value::from_safe_string(SCRIPT.into()),
            data => Value::from_safe_string(mark.clone()),
        })
        .context("failed to render the HTML report")?;
    let (before, after) = html
        .split_once(&mark)
        .expect("the template places the data once");
    out.write_all(before.as_bytes())?;
    // serde_json writes a token at a time: buffered, the escaper sees large pieces.
    let mut data = io::BufWriter::with_capacity(1 << 16, ScriptJson(&mut *out));
    serde_json::to_writer(&mut data, &page.script_data(user_roots))?;
    data.flush()?;
    drop(data);
    out.write_all(after.as_bytes())?;
    Ok(())
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

/// JSON for a `<script type="application/json">` element, written through: `<`, `>`
/// and `&` (the only characters that can end the element or start markup, and which
/// JSON has only inside strings) as `\u00XX` escapes, which `JSON.parse` reads back as
/// the same characters.
struct ScriptJson<W>(W);

impl<W: io::Write> io::Write for ScriptJson<W> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let mut copied = 0;
        // Copied in runs between the three characters: they are few.
        for i in memchr::memchr3_iter(b'<', b'>', b'&', bytes) {
            self.0.write_all(&bytes[copied..i])?;
            self.0.write_all(match bytes[i] {
                b'<' => b"\\u003c",
                b'>' => b"\\u003e",
                _ => b"\\u0026",
            })?;
            copied = i + 1;
        }
        self.0.write_all(&bytes[copied..])?;
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
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
    /// How many sites the page holds, of all: the script draws their table, from
    /// [`shown_sites`](Self::shown_sites).
    sites: Count,
    #[serde(skip)]
    shown_sites: Vec<&'a Site>,
    leaks: Part<&'a Leak>,
    runtime_internal: Part<WithFrames<'a, InternalGroup>>,
    threads: Part<&'a Thread>,
    problems: Part<&'a Problem>,
    tests: Part<&'a TestResult>,
    test_binaries: &'a [TestBinary],
    /// The scope tree, depth first, largest first among siblings.
    scopes: Part<Indented<'a, Scope>>,
    variables: Part<&'a Variable>,
    tasks: Part<&'a Task>,
    /// The views the report has, in order: `(id, title, count)`.
    views: Vec<(&'static str, &'static str, Option<usize>)>,
    frames_shown: usize,
    sites_per_ranking: usize,
    /// The report's frame table, which the stacks above index.
    #[serde(skip)]
    frames: &'a [FrameEntry],
    /// A random token that lets the page's own script run (Content-Security-Policy).
    nonce: String,
}

/// An item whose stack the template draws itself, with the stack's frames.
#[derive(Serialize)]
struct WithFrames<'a, T> {
    #[serde(flatten)]
    item: &'a T,
    frames: Vec<&'a FrameEntry>,
}

/// An item of a tree, with its depth.
#[derive(Serialize)]
struct Indented<'a, T> {
    depth: usize,
    item: &'a T,
}

/// How many items of a list the page holds, and the list's length.
#[derive(Serialize)]
struct Count {
    shown: usize,
    total: usize,
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
        let shown = shown_sites(&report.sites);
        let mut page = Page {
            version: &report.memscope_version,
            summary: &report.summary,
            warnings: warnings(report),
            processes: &report.processes,
            charts: charts(report),
            sites: Count {
                shown: shown.len(),
                total: report.sites.len(),
            },
            shown_sites: shown,
            leaks: Part::of(&report.leaks, LEAKS_SHOWN),
            // A group of a site has its stack drawn by the script, from the page's
            // one table of frames: std's groups share most of their frames, and
            // drawn in full, each of them, they were most of the page.
            runtime_internal: Part::of(
                report.runtime_internal.iter().map(|g| WithFrames {
                    item: g,
                    frames: match g.site {
                        Some(_) => Vec::new(),
                        None => report.frames_of(&g.stack).collect(),
                    },
                }),
                INTERNAL_SHOWN,
            ),
            threads: Part::of(threads, THREADS_SHOWN),
            problems: Part::of(&report.problems, PROBLEMS_SHOWN),
            tests: Part::of(&report.tests, ROWS_SHOWN),
            test_binaries: &report.test_binaries,
            scopes: Part::of(scope_tree(&report.scopes), ROWS_SHOWN),
            variables: Part::of(&report.variables, ROWS_SHOWN),
            tasks: Part::of(&report.tasks, ROWS_SHOWN),
            views: Vec::new(),
            frames_shown: FRAMES_SHOWN,
            sites_per_ranking: SITES_PER_RANKING,
            frames: &report.frames,
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
        add("tests", "Tests", self.tests.total);
        add("sites", "Allocation sites", self.sites.total);
        add("leaks", "Leaks", self.leaks.total);
        add(
            "internal",
            "Kept by the runtime",
            self.runtime_internal.total,
        );
        add("scopes", "Scopes", self.scopes.total);
        add("variables", "Variables", self.variables.total);
        add("tasks", "Tasks", self.tasks.total);
        add("threads", "Threads", self.threads.total);
        add("problems", "Problems", self.problems.total);
        add("processes", "Processes", self.processes.len());
        views
    }

    /// The script's data: the shown sites, and the stacks of those sites, of the shown
    /// leaks and of the shown runtime-internal groups of a site, as indexes into one
    /// table of distinct frames.
    fn script_data(&self, user_roots: &[PathBuf]) -> ScriptData<'a> {
        let mut data = ScriptData {
            total: self.sites.total,
            frames_shown: FRAMES_SHOWN,
            sites: Vec::with_capacity(self.shown_sites.len()),
            stacks: BTreeMap::new(),
            site_frames: BTreeMap::new(),
            frames: Vec::new(),
        };
        // The page's frame of each frame of the report's table (whose frames are
        // distinct), by index in that table.
        let mut index: FxHashMap<usize, usize> = FxHashMap::default();
        let table = self.frames;
        let mut add_stack =
            |data: &mut ScriptData<'a>, id: usize, stack: &'a [usize], at: Option<&Location>| {
                if let Some(i) = at.and_then(|at| stack.iter().position(|&f| names(&table[f], at)))
                {
                    data.site_frames.entry(id).or_insert(i);
                }
                data.stacks.entry(id).or_insert_with(|| {
                    let shown = &stack[..stack.len().min(FRAMES_SHOWN)];
                    shown
                        .iter()
                        .map(|&f| {
                            *index.entry(f).or_insert_with(|| {
                                data.frames.push(FrameData::new(&table[f], user_roots));
                                data.frames.len() - 1
                            })
                        })
                        .collect()
                });
            };
        for site in &self.shown_sites {
            add_stack(&mut data, site.id, &site.stack, site.location.as_ref());
            data.sites.push(SiteData {
                id: site.id,
                location: site.location.as_ref(),
                file: site
                    .location
                    .as_ref()
                    .and_then(|l| l.file.as_deref())
                    .map(|f| display_path(f, user_roots)),
                origin: site.origin,
                allocations: site.allocations,
                reallocations: site.reallocations,
                bytes_allocated: site.bytes_allocated,
                bytes_at_peak: site.bytes_at_peak,
                peak_share: site.peak_share,
                live_blocks_at_exit: site.live_blocks_at_exit,
                live_bytes_at_exit: site.live_bytes_at_exit,
                pids: &site.pids,
                basis: site.basis,
                depth: site.stack.len(),
                variables: &site.variables,
            });
        }
        for leak in &self.leaks.items {
            add_stack(&mut data, leak.site, &leak.stack, leak.location.as_ref());
        }
        for group in &self.runtime_internal.items {
            if let Some(site) = group.item.site {
                add_stack(
                    &mut data,
                    site,
                    &group.item.stack,
                    group.item.location.as_ref(),
                );
            }
        }
        data
    }
}

/// The scopes in tree order: each after its parent, siblings by total bytes allocated.
fn scope_tree(scopes: &[Scope]) -> Vec<Indented<'_, Scope>> {
    let mut children: FxHashMap<Option<usize>, Vec<&Scope>> = FxHashMap::default();
    for scope in scopes {
        // A parent that is not in the list makes its children roots.
        let parent = scope.parent.filter(|&p| p < scopes.len() && p != scope.id);
        children.entry(parent).or_default().push(scope);
    }
    for list in children.values_mut() {
        list.sort_by_key(|s| (std::cmp::Reverse(s.total.bytes_allocated), s.id));
    }
    let mut out = Vec::with_capacity(scopes.len());
    let mut todo: Vec<(usize, &Scope)> = children
        .get(&None)
        .map(|roots| roots.iter().rev().map(|s| (0, *s)).collect())
        .unwrap_or_default();
    let mut seen = FxHashMap::default();
    while let Some((depth, scope)) = todo.pop() {
        if seen.insert(scope.id, ()).is_some() {
            continue;
        }
        out.push(Indented { depth, item: scope });
        if let Some(kids) = children.get(&Some(scope.id)) {
            todo.extend(kids.iter().rev().map(|s| (depth + 1, *s)));
        }
    }
    out
}

/// Whether `frame` is the one a site's location was taken from.
fn names(frame: &FrameEntry, at: &Location) -> bool {
    frame.function.as_deref() == at.function.as_deref()
        && frame.file.as_deref() == at.file.as_deref()
        && frame.line == at.line
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

/// What the page's script reads (see `report.js`).
#[derive(Serialize)]
struct ScriptData<'a> {
    /// Sites in the report (the page holds `sites`).
    total: usize,
    frames_shown: usize,
    sites: Vec<SiteData<'a>>,
    /// Site id → its stack's first [`FRAMES_SHOWN`] frames, innermost first.
    stacks: BTreeMap<usize, Vec<usize>>,
    /// Site id → the position in its stack of the frame that names the site.
    site_frames: BTreeMap<usize, usize>,
    frames: Vec<FrameData<'a>>,
}

/// A site as the script needs it: the report's figures and the location's file as
/// shown.
#[derive(Serialize)]
struct SiteData<'a> {
    id: usize,
    location: Option<&'a Location>,
    /// The location's file as shown (relative to the user's root).
    file: Option<String>,
    origin: SiteOrigin,
    allocations: u64,
    reallocations: u64,
    bytes_allocated: u64,
    bytes_at_peak: u64,
    peak_share: f64,
    live_blocks_at_exit: u64,
    live_bytes_at_exit: u64,
    pids: &'a [u32],
    basis: Basis,
    /// Frames in the whole stack.
    depth: usize,
    /// Variables that named the site's blocks (when instrumented).
    variables: &'a [VarRef],
}

/// A frame, as an array to keep the page small: `[function, file as shown, line,
/// inlined, place]`, the place (`object-file+0x…`) only for frames without a function
/// name.
#[derive(Serialize)]
struct FrameData<'a>(
    Option<&'a str>,
    Option<String>,
    Option<u32>,
    bool,
    Option<&'a str>,
);

impl<'a> FrameData<'a> {
    fn new(f: &'a FrameEntry, user_roots: &[PathBuf]) -> FrameData<'a> {
        FrameData(
            f.function.as_deref(),
            f.file.as_deref().map(|p| display_path(p, user_roots)),
            f.line,
            f.inlined,
            f.place.as_deref(),
        )
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

    // Live bytes hold until the next point: a step line, from nothing live at the
    // start.
    let mut line = format!("M{:.1} {:.1}", x(0), y(0));
    for p in points {
        line.push_str(&format!(" H{:.1} V{:.1}", x(p.t), y(p.bytes)));
    }
    let area = format!("{line} V{bottom:.1} Z");

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
        line,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{MemscopeOwn, Point, ThreadRef};

    #[allow(dead_code)]
    mod chromium {
        include!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/tests/html_support/chromium.rs"
        ));
    }

    /// Markup that runs a script if it is ever parsed as HTML.
    const EVIL: &str = r#"<img src=x onerror="document.title='pwned'">"#;
    /// Text that ends a script element if it is ever written into one unescaped.
    const BREAKOUT: &str = "</script><script>document.title='pwned'</script>";

    fn frame(function: &str, file: &str, line: u32) -> FrameEntry {
        FrameEntry {
            function: Some(function.into()),
            file: Some(file.into()),
            line: Some(line),
            inlined: false,
            place: None,
        }
    }

    thread_local! {
        /// The frame table of the report the running test is building: `site` adds to
        /// it, `report` takes it (each test runs on a thread of its own).
        static FRAMES: std::cell::RefCell<(Vec<FrameEntry>, FxHashMap<FrameEntry, usize>)> =
            std::cell::RefCell::default();
    }

    /// `stack` as indexes into the test's frame table.
    fn stack_of(stack: Vec<FrameEntry>) -> Vec<usize> {
        FRAMES.with_borrow_mut(|(table, index)| {
            stack
                .into_iter()
                .map(|f| {
                    *index.entry(f).or_insert_with_key(|f| {
                        table.push(f.clone());
                        table.len() - 1
                    })
                })
                .collect()
        })
    }

    fn site(id: usize, stack: Vec<FrameEntry>, bytes: u64, live: u64) -> Site {
        let top = stack[0].clone();
        Site {
            id,
            location: Some(Location {
                function: top.function.as_deref().map(str::to_owned),
                file: top.file.as_deref().map(str::to_owned),
                line: top.line,
            }),
            origin: SiteOrigin::User,
            allocations: 1 + bytes / 100,
            reallocations: 0,
            bytes_allocated: bytes,
            bytes_at_peak: bytes / 2,
            peak_share: 0.5,
            live_blocks_at_exit: u64::from(live > 0),
            live_bytes_at_exit: live,
            pids: vec![7],
            basis: Basis::Observed,
            stack: stack_of(stack),
            variables: Vec::new(),
        }
    }

    fn summary() -> Summary {
        Summary {
            complete: true,
            allocations: 1234,
            zeroed_allocations: 5,
            reallocations: 67,
            frees: 1200,
            bytes_allocated: 1_234_567,
            peak_bytes: 45_678,
            peak_blocks: 89,
            peak_time_ns: Some(1_500_000),
            live_blocks_at_exit: 3,
            live_bytes_at_exit: 4640,
            leaked_blocks: 2,
            leaked_bytes: 4096,
            runtime_internal_blocks: 1,
            runtime_internal_bytes: 544,
            leak_kinds: Default::default(),
            leak_scan: None,
            problems: 1,
            events_dropped: 0,
        }
    }

    /// A report with every view, and `name` as every string the program supplies.
    fn report(name: &str, sites: Vec<Site>) -> Report {
        let thread = ThreadRef {
            pid: 7,
            thread: 2,
            name: Some(name.into()),
            blocks: 1,
            bytes: 4096,
        };
        let leaks = sites
            .iter()
            .filter(|s| s.live_bytes_at_exit > 0)
            .map(|s| Leak {
                site: s.id,
                location: s.location.clone(),
                kind: "live_at_exit".into(),
                blocks: s.live_blocks_at_exit,
                bytes: s.live_bytes_at_exit,
                largest_block: s.live_bytes_at_exit,
                threads: vec![thread.clone()],
                basis: Basis::Observed,
                evidence: None,
                stack: s.stack.clone(),
                variables: Vec::new(),
            })
            .collect();
        let std_stack = vec![frame(
            "std::rt::lang_start_internal",
            "/rustc/0123abcd/library/std/src/rt.rs",
            118,
        )];
        Report {
            schema_version: 1,
            memscope_version: "0.1.0".into(),
            summary: summary(),
            processes: vec![Process {
                pid: 7,
                ppid: 1,
                forked: false,
                frees_of_inherited_blocks: 0,
                trace: format!("/tmp/{name}.mstrace"),
                complete: true,
                damage: vec![],
                duration_ns: Some(2_000_000),
                summary: summary(),
                memscope: MemscopeOwn::default(),
                symbols: vec![ModuleStatus {
                    path: format!("/bin/{name}"),
                    executable: true,
                    status: "symbolized".into(),
                    detail: None,
                }],
            }],
            leaks,
            runtime_internal: vec![InternalGroup {
                origin: "std".into(),
                site: None,
                location: None,
                blocks: 1,
                bytes: 544,
                basis: Basis::Inferred,
                evidence: format!("allocated by `{name}` outside the program's `main`"),
                stack: stack_of(std_stack),
            }],
            threads: vec![Thread {
                pid: 7,
                thread: 2,
                os_tid: Some(4242),
                name: Some(name.into()),
                allocations: 10,
                reallocations: 0,
                frees: 9,
                bytes_allocated: 5000,
                peak_bytes: 4096,
                live_blocks_at_exit: 1,
                live_bytes_at_exit: 4096,
                first_event_ns: Some(10),
                last_event_ns: Some(2_000_000),
                without_harness: None,
            }],
            timeline: vec![Timeline {
                pid: 7,
                unit: "ns".into(),
                points: vec![
                    Point { t: 10, bytes: 100 },
                    Point {
                        t: 1_500_000,
                        bytes: 45_678,
                    },
                    Point {
                        t: 2_000_000,
                        bytes: 4640,
                    },
                ],
            }],
            problems: vec![Problem {
                kind: "double_free".into(),
                pid: 7,
                thread,
                time_ns: Some(1_000),
                address: "0xdead".into(),
                site: Some(0),
                basis: Basis::Observed,
                evidence: format!("freed by thread {name} twice"),
            }],
            sites,
            test_binaries: Vec::new(),
            tests: Vec::new(),
            scopes: Vec::new(),
            variables: Vec::new(),
            tasks: Vec::new(),
            frames: FRAMES.with_borrow(|(table, _)| table.clone()),
        }
    }

    /// Every string the program supplies is `EVIL` or `BREAKOUT`, in every view,
    /// instrumented and test ones included.
    fn hostile_report() -> Report {
        use crate::instrument::{Figures, RcCounts, Zombie};
        use crate::pertest::{TestLeak, TestThread};
        let stack = vec![
            frame(BREAKOUT, EVIL, 3),
            frame("app::main", "/ws/src/main.rs", 9),
        ];
        let var = VarRef {
            name: EVIL.into(),
            r#type: BREAKOUT.into(),
            file: EVIL.into(),
            line: 4,
            column: 9,
            blocks: 1,
            bytes: 4096,
            basis: Basis::Declared,
        };
        let mut site = site(0, stack, 4096, 4096);
        site.variables = vec![var.clone()];
        let mut report = report(EVIL, vec![site]);
        report.leaks[0].variables = vec![var];
        let location = report.sites[0].location.clone();
        let figures = Figures {
            allocations: 3,
            reallocations: 0,
            bytes_allocated: 4096,
            live_blocks_at_exit: 1,
            live_bytes_at_exit: 4096,
        };
        let scope = |id, parent| Scope {
            id,
            pid: 7,
            parent,
            name: EVIL.into(),
            kind: "function".into(),
            location: location.clone(),
            entries: 2,
            own: figures,
            total: figures,
            basis: Basis::Declared,
        };
        report.scopes = vec![scope(0, None), scope(1, Some(0))];
        report.variables = vec![Variable {
            pid: 7,
            name: EVIL.into(),
            r#type: BREAKOUT.into(),
            location: location.clone().unwrap(),
            column: 9,
            blocks: 1,
            bytes: 4096,
            live_blocks_at_exit: 1,
            live_bytes_at_exit: 4096,
            rc: Some(RcCounts { strong: 2, weak: 1 }),
            basis: Basis::Declared,
        }];
        report.tasks = vec![Task {
            pid: 7,
            id: 3,
            name: EVIL.into(),
            location: location.clone(),
            polls: 5,
            figures,
            state: "pending_at_exit".into(),
            zombie_candidate: Some(Zombie {
                basis: Basis::Inferred,
                evidence: format!("{EVIL} was never polled again"),
            }),
            basis: Basis::Declared,
        }];
        report.tests = vec![TestResult {
            binary: EVIL.into(),
            name: EVIL.into(),
            outcome: "failed".into(),
            pid: Some(7),
            allocations: Some(3),
            reallocations: Some(0),
            bytes_allocated: Some(4096),
            peak_bytes: Some(4096),
            leaked_blocks: Some(1),
            leaked_bytes: Some(4096),
            harness: None,
            leaks: vec![TestLeak {
                kind: "definitely_lost".into(),
                site: 0,
                location,
                blocks: 1,
                bytes: 4096,
                basis: Basis::Observed,
            }],
            threads: vec![TestThread {
                pid: 7,
                thread: 2,
                name: Some(EVIL.into()),
                role: "test".into(),
                allocations: 3,
                bytes_allocated: 4096,
                peak_bytes: 4096,
                basis: Basis::Observed,
                evidence: EVIL.into(),
            }],
            basis: Basis::Inferred,
            evidence: format!("the thread is named {EVIL}"),
        }];
        report
    }

    /// The page's elements whose text or attributes could hold a program's strings.
    fn assert_no_injected_markup(html: &str) {
        assert_eq!(html.matches("<script").count(), 3, "only our own scripts");
        assert!(!html.contains("<img"), "an <img> element was injected");
    }

    fn render(report: &Report, user_roots: &[PathBuf]) -> anyhow::Result<String> {
        let mut out = Vec::new();
        render_to(&mut out, report, user_roots)?;
        Ok(String::from_utf8(out).unwrap())
    }

    fn script_json<T: Serialize>(value: &T) -> String {
        let mut out = Vec::new();
        serde_json::to_writer(ScriptJson(&mut out), value).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn json_for_a_script_element_cannot_close_it() {
        let json = script_json(&BREAKOUT);
        assert!(!json.contains('<') && !json.contains('>') && !json.contains('&'));
        assert_eq!(
            json,
            r#""\u003c/script\u003e\u003cscript\u003edocument.title='pwned'\u003c/script\u003e""#
        );
        assert_eq!(serde_json::from_str::<String>(&json).unwrap(), BREAKOUT);
        assert_eq!(script_json(&"a&b"), r#""a\u0026b""#);
    }

    #[test]
    fn the_page_s_own_script_and_style_cannot_end_their_elements() {
        assert!(!SCRIPT.to_lowercase().contains("</script"));
        assert!(!STYLE.to_lowercase().contains("</style"));
    }

    #[test]
    fn program_strings_are_escaped_in_every_view() {
        let html = render(&hostile_report(), &[]).unwrap();
        assert_no_injected_markup(&html);
        assert!(!html.contains("onerror=\""), "an attribute was injected");
        let escaped = "&lt;img src=x onerror=&quot;document.title=&#x27;pwned&#x27;&quot;&gt;";
        // Threads, leaks' threads and variables, problems, evidence, processes' modules,
        // tests, scopes, variables, tasks.
        assert!(html.matches(escaped).count() >= 15, "{html}");
        assert!(html.contains("&lt;&#x2f;script&gt;&lt;script&gt;"));
        // The sites table's data, as JSON for the script.
        assert!(
            html.contains(r#""file":"\u003cimg src=x onerror=\"document.title='pwned'\"\u003e""#)
        );
    }

    #[test]
    fn the_overview_shows_the_report_s_own_figures() {
        let report = hostile_report();
        let html = render(&report, &[]).unwrap();
        let s = &report.summary;
        for (field, value, text) in [
            ("allocations", s.allocations, "1,234"),
            ("reallocations", s.reallocations, "67"),
            ("frees", s.frees, "1,200"),
            ("bytes_allocated", s.bytes_allocated, "1,234,567 bytes"),
            ("peak_bytes", s.peak_bytes, "45,678 bytes"),
            ("live_bytes_at_exit", s.live_bytes_at_exit, "4,640 bytes"),
            ("leaked_bytes", s.leaked_bytes, "4,096 bytes"),
            (
                "runtime_internal_bytes",
                s.runtime_internal_bytes,
                "544 bytes",
            ),
            ("problems", s.problems, "1"),
        ] {
            let card = format!("data-field=\"{field}\" data-value=\"{value}\">");
            let at = html.find(&card).unwrap_or_else(|| panic!("no card {card}"));
            let figure = &html[at..][..html[at..].find("</dd>").unwrap()];
            assert!(figure.ends_with(&format!(">{text}")), "{field}: {figure}");
        }
        assert!(html.contains("44.6 KiB in 89 blocks at 1.5 ms"));
    }

    #[test]
    fn views_the_report_does_not_have_are_not_shown() {
        let mut report = report("main", vec![]);
        report.leaks.clear();
        report.problems.clear();
        report.runtime_internal.clear();
        let html = render(&report, &[]).unwrap();
        for absent in [
            "sites",
            "leaks",
            "problems",
            "internal",
            "tests",
            "scopes",
            "variables",
            "tasks",
        ] {
            assert!(
                !html.contains(&format!("<section id=\"view-{absent}\"")),
                "{absent}"
            );
            assert!(!html.contains(&format!("href=\"#{absent}\"")), "{absent}");
        }
        for present in ["overview", "threads", "processes"] {
            assert!(
                html.contains(&format!("<section id=\"view-{present}\"")),
                "{present}"
            );
        }
        let full = render(&hostile_report(), &[]).unwrap();
        for present in [
            "sites",
            "leaks",
            "problems",
            "internal",
            "tests",
            "scopes",
            "variables",
            "tasks",
        ] {
            assert!(
                full.contains(&format!("<section id=\"view-{present}\"")),
                "{present}"
            );
        }
    }

    #[test]
    fn a_runtime_group_of_a_site_has_its_stack_drawn_from_the_page_s_frame_table() {
        let std_frames = vec![
            frame(
                "std::sys::backtrace::lock",
                "/rustc/std/src/sys/backtrace.rs",
                41,
            ),
            frame(
                "std::panicking::default_hook",
                "/rustc/std/src/panicking.rs",
                298,
            ),
        ];
        let stack = stack_of(std_frames);
        let mut report = report("main", vec![]);
        let without_site = report.runtime_internal[0].clone();
        report.runtime_internal.insert(
            0,
            InternalGroup {
                site: Some(3),
                stack: stack.clone(),
                ..without_site
            },
        );

        let html = render(&report, &[]).unwrap();

        let view = &html[html.find("<section id=\"view-internal\"").unwrap()..];
        let view = &view[..view.find("</section>").unwrap()];
        assert!(view.contains(
            "<details class=\"stack\" data-site=\"3\" data-depth=\"2\"><summary>stack (2 frames)"
        ));
        assert!(
            !view.contains("std::panicking::default_hook"),
            "drawn by the script"
        );
        // The group without a site keeps its frames in the page.
        assert!(view.contains("std::rt::lang_start_internal"));
        let data = &html[html.find("id=\"memscope-data\">").unwrap()..];
        let data: serde_json::Value = serde_json::from_str(
            &data[data.find('>').unwrap() + 1..data.find("</script>").unwrap()],
        )
        .unwrap();
        let drawn: Vec<&str> = data["stacks"]["3"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                data["frames"][i.as_u64().unwrap() as usize][0]
                    .as_str()
                    .unwrap()
            })
            .collect();
        assert_eq!(
            drawn,
            ["std::sys::backtrace::lock", "std::panicking::default_hook"]
        );
    }

    #[test]
    fn an_incomplete_trace_is_said_at_the_top() {
        let mut report = hostile_report();
        report.summary.complete = false;
        report.processes[0].complete = false;
        report.processes[0].damage = vec!["no end record".into()];
        let html = render(&report, &[]).unwrap();
        assert!(html.contains("The trace of process 7 is incomplete (no end record)"));
        assert!(html.contains("Live when the trace ends"));
    }

    #[test]
    fn file_names_are_shown_relative_to_the_workspace_and_std_without_its_hash() {
        let roots = [PathBuf::from("/ws")];
        assert_eq!(display_path("/ws/src/main.rs", &roots), "src/main.rs");
        assert_eq!(
            display_path("/rustc/0123abcd/library/std/src/rt.rs", &roots),
            "library/std/src/rt.rs"
        );
        assert_eq!(display_path("/elsewhere/x.rs", &roots), "/elsewhere/x.rs");
    }

    #[test]
    fn the_timeline_is_a_step_line_with_the_peak_marked() {
        let report = hostile_report();
        let c = chart(&report.timeline[0], Some(&report.processes[0]));
        let peak = c.peak.expect("a peak");
        assert_eq!(peak.bytes, 45_678);
        assert_eq!(peak.label, "peak 44.6 KiB at 1.5 ms");
        assert!((peak.y - CHART_TOP).abs() < 1e-9, "the peak is the top");
        assert!(c
            .line
            .starts_with(&format!("M{CHART_LEFT:.1} {:.1}", CHART_H - CHART_BOTTOM)));
        assert_eq!(c.line.matches(" H").count(), 3);
    }

    #[test]
    fn file_urls_percent_encode_what_a_url_cannot_hold() {
        assert_eq!(
            file_url(Path::new("/tmp/a b/<x>.html")),
            "file:///tmp/a%20b/%3Cx%3E.html"
        );
    }

    /// 100,000 sites, each with its own 16-frame stack, every tenth leaking, ranked
    /// differently by each figure so that the page holds close to the most sites.
    fn big_report() -> Report {
        let sites = (0..100_000usize)
            .map(|i| {
                let stack = (0..16)
                    .map(|d| {
                        let function = format!("app::module_{i}::function_{d}");
                        frame(&function, &format!("/ws/src/m{i}.rs"), d as u32 + 1)
                    })
                    .collect();
                let n = i as u64;
                let live = if i % 10 == 0 { 64 + (n * 31) % 1000 } else { 0 };
                let mut site = site(i, stack, 10_000_000 - 37 * n, live);
                site.allocations = 1 + n;
                site.bytes_at_peak = (n * 7919) % 100_000;
                site
            })
            .collect();
        report("main", sites)
    }

    #[test]
    fn shown_sites_are_the_top_of_every_ranking_the_table_sorts_on() {
        let mut sites: Vec<Site> = (0..5000)
            .map(|i| site(i, vec![frame("f", "/ws/f.rs", 1)], 1_000_000 - i as u64, 0))
            .collect();
        // A site low by bytes but first by bytes live at exit.
        sites[4999].live_bytes_at_exit = 1 << 40;
        let shown = shown_sites(&sites);
        assert!(shown.len() <= 4 * SITES_PER_RANKING);
        assert!(shown.iter().any(|s| s.id == 4999));
        assert!((0..SITES_PER_RANKING).all(|i| shown.iter().any(|s| s.id == i)));
    }

    #[test]
    fn a_report_of_100000_sites_stays_small_says_what_it_left_out_and_opens_fast() {
        let report = big_report();
        let started = std::time::Instant::now();
        let html = render(&report, &[PathBuf::from("/ws")]).unwrap();
        eprintln!("rendered {} bytes in {:?}", html.len(), started.elapsed());
        assert!(html.len() < 20 << 20, "{} bytes", html.len());
        let shown = shown_sites(&report.sites).len();
        assert!(
            shown > 3 * SITES_PER_RANKING,
            "{shown} sites: the rankings differ"
        );
        assert!(html.contains(&format!(
            "Showing {} of 100,000 sites: the top 500 by bytes allocated",
            summary::count(shown as u64)
        )));
        assert!(html
            .contains("Showing the largest 500 of 10,000 leaking sites; all are in report.json"));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.html");
        fs::write(&path, &html).unwrap();
        for view in ["overview", "sites", "leaks"] {
            let page = chromium::load_view(&path, view);
            assert_eq!(page.console, Vec::<String>::new());
            let ready: u64 = page
                .root_data("ready-ms")
                .expect("the script ran")
                .parse()
                .unwrap();
            eprintln!(
                "{view}: usable after {ready} ms; the browser ran for {:?}",
                page.elapsed
            );
            assert!(
                ready < 2000,
                "{view}: the page took {ready} ms to become usable"
            );
            if view == "sites" {
                assert_eq!(
                    page.dom.matches("<tr class=\"site\"").count(),
                    100,
                    "a page of rows"
                );
            }
        }
    }

    #[test]
    fn hostile_strings_run_no_script_in_a_browser() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.html");
        write(&hostile_report(), &[], &path).unwrap();
        let page = chromium::load(&path);
        assert_eq!(page.console, Vec::<String>::new());
        assert!(
            page.dom.contains("<title>memscope report</title>"),
            "the title was changed"
        );
        assert_no_injected_markup(&page.dom);
        // The sites table, drawn by the script from the JSON data, shows the names as
        // text (the serialized DOM escapes `<` and `>` in text).
        let row = &page.dom[page.dom.find("<tr class=\"site\"").expect("a site row")..];
        assert!(
            row.contains(r#"&lt;/script&gt;&lt;script&gt;document.title='pwned'&lt;/script&gt;"#)
        );
        assert!(row.contains(r#"&lt;img src=x onerror="document.title='pwned'"&gt;:3"#));
    }
}
