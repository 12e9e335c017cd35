//! Output for CI systems: GitHub Actions workflow commands (`::error file=…,line=…::`,
//! one per leak site, at its first frame in the user's code) and SARIF 2.1.0 for code
//! scanning. Both name files relative to the workspace root.

use std::path::Path;

use anyhow::Context;
use serde_json::json;

use crate::report::{Leak, Report};
use crate::summary::{bytes_short as bytes, plural};

/// The leaks of one site (a site's blocks of different kinds are separate `leaks`).
struct SiteLeaks<'r> {
    /// The site's largest entry: its site, location.
    leak: &'r Leak,
    blocks: u64,
    bytes: u64,
    /// `(kind, blocks)`, largest entry first.
    kinds: Vec<(&'r str, u64)>,
}

/// `leaks` (largest first) gathered by site, in the order of each site's largest.
fn by_site<'r>(leaks: &[&'r Leak]) -> Vec<SiteLeaks<'r>> {
    let mut sites: Vec<SiteLeaks> = Vec::new();
    for &leak in leaks {
        match sites.iter_mut().find(|s| s.leak.site == leak.site) {
            Some(s) => {
                s.blocks += leak.blocks;
                s.bytes += leak.bytes;
                s.kinds.push((&leak.kind, leak.blocks));
            }
            None => sites.push(SiteLeaks {
                leak,
                blocks: leak.blocks,
                bytes: leak.bytes,
                kinds: vec![(&leak.kind, leak.blocks)],
            }),
        }
    }
    sites
}

/// One `::error` line per leak site.
pub fn annotations(report: &Report, leaks: &[&Leak], workspace: &Path) -> String {
    let mut out = String::new();
    for site in by_site(leaks) {
        let leak = site.leak;
        let message = escape_data(&message(report, &site));
        match place(leak, workspace) {
            Some((file, Some(line))) => out.push_str(&format!(
                "::error file={},line={line},title=memscope leak::{message}\n",
                escape_property(&file)
            )),
            Some((file, None)) => out.push_str(&format!(
                "::error file={},title=memscope leak::{message}\n",
                escape_property(&file)
            )),
            None => out.push_str(&format!("::error title=memscope leak::{message}\n")),
        }
    }
    out
}

/// The leak's site as a workspace-relative file and line, when it is in the user's code.
fn place(leak: &Leak, workspace: &Path) -> Option<(String, Option<u32>)> {
    let location = leak.location.as_ref()?;
    let file = location.file.as_deref()?;
    let relative = Path::new(file).strip_prefix(workspace).ok()?;
    Some((relative.to_string_lossy().into_owned(), location.line))
}

fn message(report: &Report, site: &SiteLeaks) -> String {
    let leak = site.leak;
    let function = leak
        .location
        .as_ref()
        .and_then(|l| l.function.as_deref())
        .unwrap_or("an unknown function");
    let tests: Vec<&str> = report
        .tests
        .iter()
        .filter(|t| t.leaks.iter().any(|l| l.site == leak.site))
        .map(|t| t.name.as_str())
        .collect();
    let by = if tests.is_empty() {
        String::new()
    } else {
        format!(" (test {})", tests.join(", "))
    };
    // The kinds the exit-time scan inferred: `[definitely lost]`, or with counts
    // when the site's blocks are of several kinds.
    let kinds: Vec<String> = site
        .kinds
        .iter()
        .filter(|(kind, _)| *kind != "live_at_exit")
        .map(|(kind, blocks)| match site.kinds.len() {
            1 => kind.replace('_', " "),
            _ => format!("{blocks} {}", kind.replace('_', " ")),
        })
        .collect();
    let kinds = if kinds.is_empty() {
        String::new()
    } else {
        format!(" [{}]", kinds.join(", "))
    };
    format!(
        "{} ({}) allocated in {function} still live at exit{kinds}{by}",
        plural(site.blocks, "block"),
        bytes(site.bytes)
    )
}

/// Workflow-command data escaping: `%`, CR and LF.
fn escape_data(s: &str) -> String {
    s.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// Workflow-command property escaping: also `:` and `,`.
fn escape_property(s: &str) -> String {
    escape_data(s).replace(':', "%3A").replace(',', "%2C")
}

/// Writes the leaks as a SARIF 2.1.0 log with one result per leak site.
pub fn write_sarif(
    path: &Path,
    report: &Report,
    leaks: &[&Leak],
    workspace: &Path,
) -> anyhow::Result<()> {
    let results: Vec<serde_json::Value> = by_site(leaks)
        .iter()
        .map(|site| {
            let leak = site.leak;
            let kinds: serde_json::Map<String, serde_json::Value> = site
                .kinds
                .iter()
                .map(|(kind, blocks)| (kind.to_string(), json!(blocks)))
                .collect();
            let mut result = json!({
                "ruleId": "memscope/leak",
                "level": "error",
                "message": { "text": message(report, site) },
                "properties": {
                    "blocks": site.blocks,
                    "bytes": site.bytes,
                    "site": leak.site,
                    "kinds": kinds,
                },
            });
            if let Some((file, line)) = place(leak, workspace) {
                let mut region = json!({});
                if let Some(line) = line {
                    region = json!({ "startLine": line });
                }
                result["locations"] = json!([{
                    "physicalLocation": {
                        "artifactLocation": { "uri": file, "uriBaseId": "%SRCROOT%" },
                        "region": region,
                    }
                }]);
            }
            result
        })
        .collect();
    let log = json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": { "driver": {
                "name": "memscope",
                "version": env!("CARGO_PKG_VERSION"),
                "informationUri": "https://github.com/memscope/memscope",
                "rules": [{
                    "id": "memscope/leak",
                    "name": "HeapBlockLiveAtExit",
                    "shortDescription": { "text": "Heap memory allocated by the program is still live at exit" },
                    "defaultConfiguration": { "level": "error" },
                }],
            }},
            "results": results,
        }],
    });
    let text = serde_json::to_string_pretty(&log).expect("json values serialize");
    std::fs::write(path, text + "\n")
        .with_context(|| format!("failed to write the SARIF log {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workflow_command_values_are_escaped() {
        assert_eq!(escape_data("50% a\nb"), "50%25 a%0Ab");
        assert_eq!(escape_property("a:b,c"), "a%3Ab%2Cc");
    }
}
