// Headless Chromium for the HTML report's tests: load a page and read its DOM after its
// scripts ran, with everything it wrote to the console; take screenshots.
//
// Shared by `tests/tests/html.rs` and the unit tests of `cargo-memscope/src/html.rs`,
// which include this file by path (so: no inner attributes or doc comments here).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Flags for a headless run as root on a machine with no network: no sandbox (root),
/// no GPU, and nothing that phones home.
const FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--enable-logging=stderr",
    "--v=0",
];

/// How long one browser run may take before the test fails.
const TIMEOUT: Duration = Duration::from_secs(120);

/// The browser. Panics, saying how to install it, when there is none: these tests are
/// never skipped silently.
pub fn browser() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "Chromium is not installed, and the HTML report's browser tests need it: \
         run `.ci/run` (which installs it) or `apt-get install chromium`"
    );
}

/// A page as the browser left it.
#[derive(Debug)]
pub struct Loaded {
    /// The DOM after the page's scripts ran, serialized.
    pub dom: String,
    /// Every console message (errors, uncaught exceptions, CSP violations, logs).
    pub console: Vec<String>,
    /// How long the browser took, start to exit.
    pub elapsed: Duration,
}

impl Loaded {
    /// `data-<name>` of the `<html>` element, set by the page's script.
    pub fn root_data(&self, name: &str) -> Option<String> {
        let root = &self.dom[self.dom.find("<html")?..];
        let root = &root[..root.find('>')?];
        let key = format!("data-{name}=\"");
        let start = root.find(&key)? + key.len();
        Some(root[start..][..root[start..].find('"')?].to_string())
    }
}

/// `file://` URL of a path, with a fragment when given.
pub fn file_url(path: &Path, fragment: &str) -> String {
    let mut url = String::from("file://");
    for byte in path.as_os_str().as_encoded_bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' | b'~' => {
                url.push(*byte as char)
            }
            _ => url.push_str(&format!("%{byte:02X}")),
        }
    }
    if !fragment.is_empty() {
        url.push('#');
        url.push_str(fragment);
    }
    url
}

/// Loads the page at `path` and returns its DOM once loaded.
pub fn load(path: &Path) -> Loaded {
    load_view(path, "")
}

/// Loads the page at `path#fragment` and returns its DOM once loaded.
pub fn load_view(path: &Path, fragment: &str) -> Loaded {
    let (stdout, stderr, elapsed) = run(&["--dump-dom".to_string(), file_url(path, fragment)]);
    let console = stderr
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .map(str::to_string)
        .collect();
    Loaded {
        dom: stdout,
        console,
        elapsed,
    }
}

/// Takes a screenshot of the page at `path` (and `#fragment`) into `png`.
pub fn screenshot(path: &Path, fragment: &str, png: &Path, width: u32, height: u32) {
    run(&[
        format!("--screenshot={}", png.display()),
        format!("--window-size={width},{height}"),
        "--hide-scrollbars".to_string(),
        file_url(path, fragment),
    ]);
    assert!(
        png.is_file(),
        "Chromium wrote no screenshot at {}",
        png.display()
    );
}

fn run(args: &[String]) -> (String, String, Duration) {
    let profile = tempfile::tempdir().expect("a temporary directory");
    let out = tempfile::NamedTempFile::new().expect("a temporary file");
    let err = tempfile::NamedTempFile::new().expect("a temporary file");
    let started = Instant::now();
    let mut child = Command::new(browser())
        .args(FLAGS)
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.reopen().unwrap())
        .stderr(err.reopen().unwrap())
        .spawn()
        .expect("Chromium starts");
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("Chromium did not finish within {TIMEOUT:?}: {args:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = started.elapsed();
    let stdout = std::fs::read_to_string(out.path()).unwrap();
    let stderr = std::fs::read_to_string(err.path()).unwrap();
    assert!(
        status.success(),
        "Chromium failed ({status}): {args:?}\n{stderr}"
    );
    (stdout, stderr, elapsed)
}
