//! The terminal summary: a short reading of the report model, printed after a run.
//! Every figure is one of the report's own (exact byte counts, human units beside).

use std::fmt::Write;
use std::path::{Path, PathBuf};

use crate::instrument::{Scope, Task};
use crate::report::{Basis, Location, Report, ReportOptions};

/// Sites, leaks, scopes and tasks shown at most.
const TOP: usize = 5;
/// Variable names shown per leak at most.
const NAMES: usize = 3;

/// The summary text, ending with the report paths (`report: <path>`).
pub fn render(report: &Report, paths: &[&Path], options: &ReportOptions) -> String {
    let paint = Paint(options.color);
    let roots = &options.user_roots;
    let s = &report.summary;
    let mut out = String::new();
    let w = &mut out;

    let _ = writeln!(
        w,
        "{} {} allocations ({} zeroed), {} reallocations, {} frees; {} allocated",
        paint.bold("memscope:"),
        count(s.allocations),
        count(s.zeroed_allocations),
        count(s.reallocations),
        count(s.frees),
        bytes(s.bytes_allocated),
    );
    let when = match s.peak_time_ns {
        Some(ns) => format!(" at {}", duration(ns)),
        None => String::new(),
    };
    let _ = writeln!(
        w,
        "  peak: {} live in {}{when}",
        bytes(s.peak_bytes),
        plural(s.peak_blocks, "block")
    );
    // A trace cut short (killed process) has no exit: its end is where it stops.
    let at_exit = if s.complete {
        "at exit"
    } else {
        "when the trace ends"
    };
    let leaked = format!(
        "{} leaked in {}",
        bytes(s.leaked_bytes),
        plural(s.leaked_blocks, "block")
    );
    let leaked = if s.leaked_blocks > 0 {
        paint.red(&leaked)
    } else {
        leaked
    };
    let _ = writeln!(
        w,
        "  {at_exit}: {} live in {}: {leaked}, {} in {} kept by the Rust runtime",
        bytes(s.live_bytes_at_exit),
        plural(s.live_blocks_at_exit, "block"),
        bytes(s.runtime_internal_bytes),
        plural(s.runtime_internal_blocks, "block"),
    );
    if s.leak_scan.is_some() && s.leaked_blocks > 0 {
        let kinds: Vec<String> = crate::report::LEAK_KINDS
            .iter()
            .filter_map(|kind| {
                let a = s.leak_kinds.get(*kind).filter(|a| a.blocks > 0)?;
                Some(format!(
                    "{} {} in {}",
                    bytes(a.bytes),
                    kind_text(kind),
                    plural(a.blocks, "block")
                ))
            })
            .collect();
        let _ = writeln!(
            w,
            "  leaked, by what a scan for pointers at exit found [inferred]: {}",
            kinds.join(", ")
        );
    }
    if report.processes.len() > 1 {
        let _ = writeln!(
            w,
            "  {} processes; figures are their sums",
            report.processes.len()
        );
    }

    if !report.sites.is_empty() {
        let _ = writeln!(
            w,
            "{}",
            paint.bold("top allocation sites (by bytes allocated):")
        );
        for site in report.sites.iter().take(TOP) {
            let _ = writeln!(
                w,
                "  {:>12} in {:>15}, {:>3.0}% of peak  {}",
                bytes_short(site.bytes_allocated),
                plural(site.allocations + site.reallocations, "allocation"),
                site.peak_share * 100.0,
                place(site.location.as_ref(), roots),
            );
        }
    }

    if !report.leaks.is_empty() {
        let _ = writeln!(
            w,
            "{}",
            paint.red(&paint.bold(&format!("leaks (blocks live {at_exit}):")))
        );
        for leak in report.leaks.iter().take(TOP) {
            let names: Vec<String> = leak
                .threads
                .iter()
                .map(|t| t.name.clone().unwrap_or_else(|| format!("#{}", t.thread)))
                .collect();
            let kind = if leak.kind == "live_at_exit" {
                String::new()
            } else {
                format!("  {}{}", kind_text(&leak.kind), tag(leak.basis))
            };
            let _ = writeln!(
                w,
                "  {:>12} in {:>10}  {}{kind}  [thread {}]",
                bytes_short(leak.bytes),
                plural(leak.blocks, "block"),
                place(leak.location.as_ref(), roots),
                names.join(", "),
            );
            for v in leak.variables.iter().take(NAMES) {
                let _ = writeln!(
                    w,
                    "  {:>12} in {:>10}  named `{}`: {} at {}:{}:{}{}",
                    bytes_short(v.bytes),
                    plural(v.blocks, "block"),
                    v.name,
                    v.r#type,
                    v.file,
                    v.line,
                    v.column,
                    tag(v.basis),
                );
            }
        }
        if report.leaks.len() > TOP {
            let _ = writeln!(w, "  … and {} more", report.leaks.len() - TOP);
        }
    }

    scopes(w, report, at_exit, paint);
    tasks(w, report, at_exit, paint);

    if s.problems > 0 {
        let _ = writeln!(
            w,
            "{}",
            paint.red(&paint.bold(&format!("problems ({}):", count(s.problems))))
        );
        for p in report.problems.iter().take(TOP) {
            let _ = writeln!(
                w,
                "  {} of {}: {}",
                p.kind.replace('_', " "),
                p.address,
                p.evidence
            );
        }
    }

    if s.events_dropped > 0 {
        let line = format!(
            "warning: {} events were dropped while tracing: figures are not exact",
            count(s.events_dropped)
        );
        let _ = writeln!(w, "{}", paint.yellow(&line));
    }
    for p in report.processes.iter().filter(|p| !p.complete) {
        let reason = p
            .damage
            .first()
            .map(String::as_str)
            .unwrap_or("it ended early");
        let line = format!(
            "warning: the trace of process {} is incomplete ({reason}): figures cover what it recorded",
            p.pid
        );
        let _ = writeln!(w, "{}", paint.yellow(&line));
    }
    // The executable without line tables, or any object file gone: say so once.
    let mut noted = Vec::new();
    for m in report.processes.iter().flat_map(|p| &p.symbols) {
        let missing = m.status == "unreadable" || (m.executable && m.status != "symbolized");
        if missing && !noted.contains(&&m.path) {
            noted.push(&m.path);
            let detail = m.detail.as_deref().unwrap_or(&m.status);
            let line = format!(
                "note: {}: {detail}: its frames have no source locations",
                m.path
            );
            let _ = writeln!(w, "{}", paint.yellow(&line));
        }
    }

    for path in paths {
        let _ = writeln!(w, "report: {}", path.display());
    }
    out
}

/// The instrumented scopes that allocated most (scope tree nodes by total bytes).
fn scopes(w: &mut String, report: &Report, at_exit: &str, paint: Paint) {
    if report.scopes.is_empty() {
        return;
    }
    let mut top: Vec<&Scope> = report
        .scopes
        .iter()
        .filter(|s| s.total.bytes_allocated > 0)
        .collect();
    top.sort_by_key(|s| std::cmp::Reverse(s.total.bytes_allocated));
    let _ = writeln!(
        w,
        "{}",
        paint.bold(&format!(
            "scopes ({} instrumented), top by total bytes allocated (self: while innermost):",
            count(report.scopes.len() as u64)
        ))
    );
    if top.is_empty() {
        let _ = writeln!(w, "  none allocated");
    }
    for scope in top.into_iter().take(TOP) {
        let parent = scope
            .parent
            .and_then(|p| {
                report
                    .scopes
                    .iter()
                    .find(|s| s.pid == scope.pid && s.id == p)
            })
            .map_or(String::new(), |p| format!(" (in {})", p.name));
        let kind = if scope.kind == "function" {
            String::new()
        } else {
            format!(" [{}]", scope.kind)
        };
        // A task site without a name is named by its location already.
        let at = declared_at(scope.location.as_ref());
        let at = if at.trim_start() == scope.name {
            ""
        } else {
            &at
        };
        let _ = writeln!(
            w,
            "  {:>12} total, {:>12} self, {:>12} live {at_exit}  {}{kind}{parent}{at}",
            bytes_short(scope.total.bytes_allocated),
            bytes_short(scope.own.bytes_allocated),
            bytes_short(scope.total.live_bytes_at_exit),
            scope.name,
        );
    }
}

/// How many tasks, how many were pending at exit, and the pending ones.
fn tasks(w: &mut String, report: &Report, at_exit: &str, paint: Paint) {
    if report.tasks.is_empty() {
        return;
    }
    let pending: Vec<&Task> = report
        .tasks
        .iter()
        .filter(|t| t.zombie_candidate.is_some())
        .collect();
    let heading = format!(
        "tasks: {}, {} pending {at_exit}",
        count(report.tasks.len() as u64),
        count(pending.len() as u64)
    );
    if pending.is_empty() {
        let _ = writeln!(w, "{}", paint.bold(&heading));
        return;
    }
    let _ = writeln!(
        w,
        "{}",
        paint.yellow(&paint.bold(&format!(
            "{heading} (zombie candidates, inferred: neither completed nor dropped):"
        )))
    );
    for t in pending.iter().take(TOP) {
        let _ = writeln!(
            w,
            "  {:>12} live in {:>10}, {}  {}{}",
            bytes_short(t.figures.live_bytes_at_exit),
            plural(t.figures.live_blocks_at_exit, "block"),
            plural(t.polls, "poll"),
            t.name,
            declared_at(t.location.as_ref()),
        );
    }
    if pending.len() > TOP {
        let _ = writeln!(w, "  … and {} more", pending.len() - TOP);
    }
}

/// `  file:line` of a declaration, or nothing.
fn declared_at(location: Option<&Location>) -> String {
    match location.and_then(|l| Some((l.file.as_deref()?, l.line))) {
        Some((file, Some(line))) => format!("  {file}:{line}"),
        Some((file, None)) => format!("  {file}"),
        None => String::new(),
    }
}

/// ` [inferred]` for a name the analysis deduced.
/// A leak kind as words: `definitely_lost` → `definitely lost`.
fn kind_text(kind: &str) -> String {
    match kind {
        "reference_cycle" => "in a reference cycle".into(),
        other => other.replace('_', " "),
    }
}

fn tag(basis: Basis) -> &'static str {
    if basis == Basis::Inferred {
        " [inferred]"
    } else {
        ""
    }
}

/// `file:line function`, with the file relative to the user's root it is under.
fn place(location: Option<&Location>, roots: &[PathBuf]) -> String {
    let Some(l) = location else {
        return "(unknown location)".into();
    };
    let function = l.function.as_deref().unwrap_or("?");
    let file = l.file.as_deref().map(|f| {
        let path = Path::new(f);
        if let Some(rest) = f.strip_prefix("/rustc/").and_then(|r| r.split_once('/')) {
            // The standard library's sources, named by the compiler's commit hash.
            return rest.1.to_string();
        }
        roots
            .iter()
            .find_map(|r| path.strip_prefix(r).ok())
            .map_or_else(|| f.to_string(), |p| p.display().to_string())
    });
    match (file, l.line) {
        (Some(file), Some(line)) => format!("{file}:{line}  {function}"),
        (Some(file), None) => format!("{file}  {function}"),
        (None, _) => function.to_string(),
    }
}

/// `1,234,567`.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `1 block`, `1,024 blocks`.
pub fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{} {noun}s", count(n))
    }
}

/// `1,234,567 bytes (1.2 MiB)`.
pub fn bytes(n: u64) -> String {
    if n < 1024 {
        format!("{} bytes", count(n))
    } else {
        format!("{} bytes ({})", count(n), bytes_short(n))
    }
}

/// `1.2 MiB`.
pub fn bytes_short(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `12.3 ms`.
pub fn duration(ns: u64) -> String {
    match ns {
        0..1_000 => format!("{ns} ns"),
        1_000..1_000_000 => format!("{:.1} µs", ns as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} ms", ns as f64 / 1e6),
        _ => format!("{:.2} s", ns as f64 / 1e9),
    }
}

/// ANSI styling, or none.
#[derive(Clone, Copy)]
struct Paint(bool);

impl Paint {
    fn wrap(self, code: &str, text: &str) -> String {
        if self.0 {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }
    fn bold(self, text: &str) -> String {
        self.wrap("1", text)
    }
    fn red(self, text: &str) -> String {
        self.wrap("31", text)
    }
    fn yellow(self, text: &str) -> String {
        self.wrap("33", text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_get_thousands_separators_and_sizes_human_units() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(bytes(4096), "4,096 bytes (4.0 KiB)");
        assert_eq!(bytes(12), "12 bytes");
        assert_eq!(bytes_short(3 * 1024 * 1024 / 2), "1.5 MiB");
        assert_eq!(duration(12_300_000), "12.3 ms");
    }

    #[test]
    fn user_files_are_shown_relative_to_their_root() {
        let l = Location {
            function: Some("app::main".into()),
            file: Some("/ws/src/main.rs".into()),
            line: Some(7),
        };
        assert_eq!(
            place(Some(&l), &[PathBuf::from("/ws")]),
            "src/main.rs:7  app::main"
        );
        assert_eq!(place(None, &[]), "(unknown location)");
        let std = Location {
            function: Some("std::rt::init".into()),
            file: Some("/rustc/0123abcd/library/std/src/rt.rs".into()),
            line: Some(118),
        };
        assert_eq!(
            place(Some(&std), &[]),
            "library/std/src/rt.rs:118  std::rt::init"
        );
    }
}
