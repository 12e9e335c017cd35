//! Gates: thresholds that turn a report's findings into exit code 3
//! (`--fail-on-leaks`, `--max-leaked-bytes`, `--max-peak`, for the whole run or
//! `--per-test`), sizes like `64MiB`, and suppression files.
//!
//! The standard library's own bookkeeping never reaches a gate: the analysis already
//! classifies it as runtime-internal (`report.runtime_internal`), apart from
//! `report.leaks`. A suppression file removes further leak sites:
//!
//! ```text
//! # comment
//! function  my_crate::cache::*      # a frame's function name (glob, `*` any text)
//! crate     once_cell               # a frame's crate (first path segment of its function)
//! file      src/global.rs           # a frame's file: relative to the workspace, or a suffix
//! ```
//!
//! A leak site is suppressed when any frame of its stack matches any rule.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::cli::{GateArgs, LeakKinds};
use crate::report::{FrameEntry, Leak, Report, LEAK_KINDS};

/// Parses `--leak-kinds`: `all`, `lost`, or kinds separated by commas.
pub fn parse_leak_kinds(text: &str) -> Result<LeakKinds, String> {
    match text {
        "all" => return Ok(LeakKinds(LEAK_KINDS.to_vec())),
        "lost" => {
            return Ok(LeakKinds(vec![
                "definitely_lost",
                "indirectly_lost",
                "reference_cycle",
                "live_at_exit",
            ]))
        }
        _ => {}
    }
    text.split(',')
        .map(|kind| {
            LEAK_KINDS
                .iter()
                .copied()
                .find(|k| *k == kind.trim())
                .ok_or_else(|| {
                    format!(
                        "unknown leak kind `{}`: expected all, lost, or kinds among {}",
                        kind.trim(),
                        LEAK_KINDS.join(", ")
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(LeakKinds)
}

/// Parses `4096`, `64KiB`, `1.5MB`, `2g`: decimal units (KB, MB, GB) are powers of
/// 1000, binary ones (KiB, MiB, GiB) powers of 1024; `K`, `M`, `G` alone are binary.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "invalid size `{text}`: expected bytes with an optional unit, like 4096, 512KB, 64MiB or 1GiB"
        )
    };
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number = number.replace('_', "");
    let value: f64 = number.parse().map_err(|_| bad())?;
    let unit = unit.trim().to_ascii_lowercase();
    let scale: u64 = match unit.as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    let bytes = value * scale as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 || bytes.fract() != 0.0 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// What a suppression rule matches in a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleKind {
    Function,
    Crate,
    File,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub kind: RuleKind,
    pub pattern: String,
    /// Line in the file (1-based).
    pub line: usize,
}

/// The rules of a suppression file.
#[derive(Clone, Debug, Default)]
pub struct Suppressions {
    pub path: Option<PathBuf>,
    pub rules: Vec<Rule>,
}

impl Suppressions {
    pub fn load(path: &Path) -> anyhow::Result<Suppressions> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("failed to read the suppressions file {}", path.display()))?;
        let rules = parse_rules(&text).map_err(|(line, why)| {
            anyhow::anyhow!("suppressions file {}, line {line}: {why}", path.display())
        })?;
        Ok(Suppressions {
            path: Some(path.to_path_buf()),
            rules,
        })
    }

    /// The first rule that matches a frame of `stack`.
    pub fn matching<'f>(
        &self,
        stack: impl IntoIterator<Item = &'f FrameEntry> + Clone,
        workspace: &Path,
    ) -> Option<&Rule> {
        self.rules.iter().find(|rule| {
            stack
                .clone()
                .into_iter()
                .any(|frame| rule.matches(frame, workspace))
        })
    }
}

/// Parses a suppression file; an error names the line.
pub fn parse_rules(text: &str) -> Result<Vec<Rule>, (usize, String)> {
    let mut rules = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let content = match raw.find(" #").or_else(|| raw.find("\t#")) {
            Some(at) => &raw[..at],
            None => raw,
        }
        .trim();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let (kind, pattern) = content
            .split_once(char::is_whitespace)
            .map(|(k, p)| (k, p.trim()))
            .unwrap_or((content, ""));
        let kind = match kind {
            "function" | "fun" => RuleKind::Function,
            "crate" => RuleKind::Crate,
            "file" => RuleKind::File,
            other => {
                return Err((
                    line,
                    format!("unknown rule `{other}` (expected `function`, `crate` or `file`, then a pattern)"),
                ))
            }
        };
        if pattern.is_empty() {
            return Err((line, "a rule needs a pattern after its kind".to_owned()));
        }
        rules.push(Rule {
            kind,
            pattern: pattern.to_owned(),
            line,
        });
    }
    Ok(rules)
}

impl Rule {
    fn matches(&self, frame: &FrameEntry, workspace: &Path) -> bool {
        match self.kind {
            RuleKind::Function => frame
                .function
                .as_deref()
                .is_some_and(|f| glob(&self.pattern, f)),
            RuleKind::Crate => frame
                .function
                .as_deref()
                .is_some_and(|f| crate_of(f).is_some_and(|c| c == self.pattern.replace('-', "_"))),
            RuleKind::File => frame.file.as_deref().is_some_and(|file| {
                let relative = Path::new(file)
                    .strip_prefix(workspace)
                    .map(|p| p.to_string_lossy().into_owned());
                glob(&self.pattern, file)
                    || relative.is_ok_and(|r| glob(&self.pattern, &r))
                    || file.ends_with(&format!("/{}", self.pattern))
            }),
        }
    }
}

/// The crate a demangled function belongs to: its first path segment, looking inside
/// `<T as Trait>` to `T`.
fn crate_of(function: &str) -> Option<&str> {
    let f = function.trim_start_matches(['<', '&', '*']);
    let f = f.strip_prefix("mut ").unwrap_or(f);
    let f = f.strip_prefix("dyn ").unwrap_or(f);
    let end = f.find("::")?;
    Some(&f[..end])
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters.
pub fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// The gates of one run, ready to judge its report.
#[derive(Debug, Default)]
pub struct Gates {
    args: GateArgs,
    suppressions: Suppressions,
}

impl Gates {
    /// Reads the suppression file now, so that a bad one fails before any build.
    pub fn load(args: &GateArgs) -> anyhow::Result<Gates> {
        let suppressions = match &args.suppressions {
            Some(path) => Suppressions::load(path)?,
            None => Suppressions::default(),
        };
        Ok(Gates {
            args: args.clone(),
            suppressions,
        })
    }

    fn has_limits(&self) -> bool {
        let a = &self.args;
        a.fail_on_leaks || a.max_leaked_bytes.is_some() || a.max_peak.is_some()
    }

    /// Whether leaks of `kind` count (`--leak-kinds`).
    fn counts(&self, kind: &str) -> bool {
        self.args
            .leak_kinds
            .as_ref()
            .is_none_or(|kinds| kinds.0.contains(&kind))
    }

    /// Whether a suppression rule matches `leak`.
    fn suppressed(&self, report: &Report, leak: &Leak, workspace: &Path) -> bool {
        self.suppressions
            .matching(report.frames_of(&leak.stack), workspace)
            .is_some()
    }

    /// The leaks that count: of the kinds asked for, and no suppression rule matches.
    pub fn kept_leaks<'r>(&self, report: &'r Report, workspace: &Path) -> Vec<&'r Leak> {
        report
            .leaks
            .iter()
            .filter(|leak| self.counts(&leak.kind) && !self.suppressed(report, leak, workspace))
            .collect()
    }

    /// Emits CI output (GitHub annotations, SARIF) and returns the exit code: the
    /// program's or tests' own failure `code` when non-zero, else 3 when a gate failed.
    pub fn verdict(
        &self,
        code: u8,
        report: &Report,
        workspace: &Path,
        color: bool,
    ) -> anyhow::Result<u8> {
        let kept = self.kept_leaks(report, workspace);
        let suppressed = report
            .leaks
            .iter()
            .filter(|leak| self.suppressed(report, leak, workspace))
            .map(|leak| leak.site)
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        if std::env::var_os("GITHUB_ACTIONS").is_some_and(|v| v == "true") {
            print!("{}", crate::ci::annotations(report, &kept, workspace));
        }
        if let Some(path) = &self.args.sarif {
            crate::ci::write_sarif(path, report, &kept, workspace)?;
        }
        if suppressed > 0 {
            if let Some(path) = &self.suppressions.path {
                eprintln!(
                    "memscope: {suppressed} leak site{} suppressed by {}",
                    if suppressed == 1 { "" } else { "s" },
                    path.display()
                );
            }
        }
        if !self.has_limits() {
            return Ok(code);
        }
        let failures = self.failures(report, &kept, workspace);
        let label = if color {
            "\x1b[1;31mgate failed\x1b[0m"
        } else {
            "gate failed"
        };
        for failure in &failures {
            eprintln!("memscope: {label}: {failure}");
        }
        if code != 0 {
            return Ok(code);
        }
        if failures.is_empty() {
            eprintln!("memscope: gates passed");
            Ok(crate::EXIT_SUCCESS)
        } else {
            Ok(crate::EXIT_GATE_FAILED)
        }
    }

    /// One sentence per limit exceeded.
    fn failures(&self, report: &Report, kept: &[&Leak], workspace: &Path) -> Vec<String> {
        let mut out = Vec::new();
        if self.args.per_test {
            for test in &report.tests {
                let (mut blocks, mut bytes) = (0, 0);
                for leak in &test.leaks {
                    let counted = self.counts(&leak.kind)
                        && report
                            .leaks
                            .iter()
                            .find(|l| l.site == leak.site)
                            .is_none_or(|l| !self.suppressed(report, l, workspace));
                    if counted {
                        blocks += leak.blocks;
                        bytes += leak.bytes;
                    }
                }
                let who = format!("test `{}` ({})", test.name, test.binary);
                self.check(&mut out, &who, blocks, bytes, test.peak_bytes);
            }
        } else {
            let blocks = kept.iter().map(|l| l.blocks).sum();
            let bytes = kept.iter().map(|l| l.bytes).sum();
            // Test binaries run one after another: the run's peak is the largest.
            let peak = if report.test_binaries.is_empty() {
                report.summary.peak_bytes
            } else {
                report
                    .processes
                    .iter()
                    .map(|p| p.summary.peak_bytes)
                    .max()
                    .unwrap_or(0)
            };
            self.check(&mut out, "the run", blocks, bytes, Some(peak));
        }
        out
    }

    fn check(&self, out: &mut Vec<String>, who: &str, blocks: u64, bytes: u64, peak: Option<u64>) {
        let a = &self.args;
        if a.fail_on_leaks && blocks > 0 {
            out.push(format!(
                "{who} leaked {blocks} block{} ({bytes} bytes) (--fail-on-leaks)",
                if blocks == 1 { "" } else { "s" }
            ));
        }
        if let Some(max) = a.max_leaked_bytes {
            if bytes > max {
                out.push(format!(
                    "{who} leaked {bytes} bytes, more than --max-leaked-bytes {max}"
                ));
            }
        }
        if let (Some(max), Some(peak)) = (a.max_peak, peak) {
            if peak > max {
                let mut s = String::new();
                let _ = write!(
                    s,
                    "{who} peaked at {peak} live bytes, more than --max-peak {max}"
                );
                out.push(s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: &str, file: &str) -> FrameEntry {
        FrameEntry {
            function: Some(function.into()),
            file: Some(file.into()),
            line: Some(1),
            inlined: false,
            place: None,
        }
    }

    #[test]
    fn sizes_accept_plain_bytes_and_decimal_and_binary_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("64mib"), Ok(64 << 20));
        assert_eq!(parse_size("512KB"), Ok(512_000));
        assert_eq!(parse_size("1.5KiB"), Ok(1536));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1_000"), Ok(1000));
        for bad in ["", "MiB", "12XB", "-1", "0.5B", "1e3"] {
            let err = parse_size(bad).unwrap_err();
            assert!(err.starts_with("invalid size"), "{bad}: {err}");
            assert!(!err.contains('\n'));
        }
    }

    #[test]
    fn globs_match_whole_strings_with_stars_anywhere() {
        assert!(glob("a::*", "a::b::c"));
        assert!(glob("*::leak", "x::y::leak"));
        assert!(glob("a*c*e", "abcde"));
        assert!(!glob("a*c*e", "abde"));
        assert!(glob("exact", "exact"));
        assert!(!glob("exact", "exactly"));
        assert!(!glob("ab*ba", "aba"));
    }

    #[test]
    fn rules_match_function_crate_and_file_in_any_frame() {
        let rules = parse_rules(
            "# leaks we accept\n\nfunction leaky::tests::*\ncrate once-cell  # lazy statics\nfile src/cache.rs\n",
        )
        .unwrap();
        assert_eq!(rules.len(), 3);
        assert_eq!(rules[1].pattern, "once-cell");
        let s = Suppressions { path: None, rules };
        let ws = Path::new("/ws");
        let stack = |f: &str, file: &str| {
            vec![
                frame("alloc::vec::Vec<T>::push", "/rustc/x.rs"),
                frame(f, file),
            ]
        };
        assert_eq!(
            s.matching(&stack("leaky::tests::forgets", "/ws/src/lib.rs"), ws)
                .map(|r| r.line),
            Some(3)
        );
        assert_eq!(
            s.matching(
                &stack(
                    "<once_cell::sync::Lazy<T> as core::ops::Deref>::deref",
                    "/c/x.rs"
                ),
                ws
            )
            .map(|r| r.line),
            Some(4)
        );
        assert_eq!(
            s.matching(&stack("app::cache::fill", "/ws/src/cache.rs"), ws)
                .map(|r| r.line),
            Some(5)
        );
        assert!(s
            .matching(&stack("app::other", "/ws/src/other.rs"), ws)
            .is_none());
    }

    #[test]
    fn a_bad_rule_is_an_error_naming_its_line() {
        assert_eq!(parse_rules("function a\nleak b\n").unwrap_err().0, 2);
        let (line, why) = parse_rules("\n\ncrate\n").unwrap_err();
        assert_eq!(line, 3);
        assert!(why.contains("pattern"));
    }
}
