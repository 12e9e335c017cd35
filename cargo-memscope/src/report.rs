//! The report model and its JSON form. (Interface fixed first so the build pipeline
//! and the analysis can be written side by side; the analysis half fills it in.)

use std::path::{Path, PathBuf};

/// How to turn traces into reports.
#[derive(Debug, Clone)]
pub struct ReportOptions {
    /// Where `report.json` (and later `report.html`) are written; created if missing.
    pub output_dir: PathBuf,
    /// Source path prefixes as compiled → as the user knows them (scratch copy → the
    /// user's workspace), applied to every file name shown in a report.
    pub path_map: Vec<(PathBuf, PathBuf)>,
    /// Directories (after `path_map`) whose files are the user's own code; the first
    /// frame of a stack inside one of them is the allocation's "site".
    pub user_roots: Vec<PathBuf>,
    /// Colour in the terminal summary.
    pub color: bool,
    /// Show progress bars (only when stderr is a terminal).
    pub progress: bool,
}

/// What the caller needs back: where the reports are and the figures gates look at.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub json_path: PathBuf,
    pub leaked_blocks: u64,
    pub leaked_bytes: u64,
    pub peak_bytes: u64,
    /// False when a trace ended early (killed process, truncated file).
    pub complete: bool,
}

/// Reads the traces, analyses them, writes the reports and prints the terminal summary.
pub fn generate(traces: &[PathBuf], options: &ReportOptions) -> anyhow::Result<Outcome> {
    let _ = (traces, options, Path::new(""));
    anyhow::bail!("analysis is not written yet")
}
