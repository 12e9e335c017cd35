//! Output for CI systems: GitHub Actions workflow commands (`::error file=…,line=…::`,
//! one per leak site, at its first frame in the user's code) and SARIF 2.1.0 for code
//! scanning. Both name files relative to the workspace root.

use std::path::Path;

use anyhow::Context;
use serde_json::json;

use crate::report::{Leak, Report};
use crate::summary::{bytes_short as bytes, plural};

/// One `::error` line per leak site.
pub fn annotations(report: &Report, leaks: &[&Leak], workspace: &Path) -> String {
    let mut out = String::new();
    for leak in leaks {
        let message = escape_data(&message(report, leak));
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

fn message(report: &Report, leak: &Leak) -> String {
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
    format!(
        "{} ({}) allocated in {function} still live at exit{by}",
        plural(leak.blocks, "block"),
        bytes(leak.bytes)
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
    let results: Vec<serde_json::Value> = leaks
        .iter()
        .map(|leak| {
            let mut result = json!({
                "ruleId": "memscope/leak",
                "level": "error",
                "message": { "text": message(report, leak) },
                "properties": { "blocks": leak.blocks, "bytes": leak.bytes, "site": leak.site },
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
