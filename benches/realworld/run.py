#!/usr/bin/env python3
"""Runs popular crates' own test suites plainly, under `cargo memscope test` and under
valgrind, and prints one table: tests passed (plain / tracked), memscope's leaked
blocks and bytes, valgrind's definitely + indirectly lost, and the time of the
already-built test executables run plainly and through memscope's runner (median of
several repetitions; build time excluded) with their ratio.

Run by hand, not by CI (it fetches crates and takes a while):

    python3 benches/realworld/run.py [--reps N] [--no-valgrind] [--work DIR] [CRATE...]

Each crate's packaged source (the `.crate` file cargo downloads) is fetched with cargo
itself, through a throwaway project's `cargo fetch`, and unpacked under the work
directory (default `memscope-realworld/` in the system's temporary directory:
outside this workspace, which cargo would otherwise take the crates to belong to);
nothing is committed. Its own `Cargo.lock`
is used (`--locked`) when it ships one. The environment is passed through as it is:
with `RUST_BACKTRACE` set, panicking tests make std cache debug information, which
memscope counts as std's and valgrind as still reachable.

Columns:
- `tests plain` / `tests tracked`: passed/failed/ignored from `cargo test --tests` and
  from memscope's report (`test_binaries[]`); they must be equal.
- `memscope leaked`: the report's `summary.leaked_blocks` / `leaked_bytes` (live at
  exit minus std's bookkeeping).
- `valgrind lost`: definitely + indirectly lost, summed over the plain test
  executables run under `valgrind --leak-check=full --show-leak-kinds=all`;
  `valgrind reachable`: possibly lost + still reachable. Differences per binary are
  printed below the table.
- `plain s` / `tracked s`: median over `--reps` of the summed wall time of all test
  executables, run as `cargo test` runs them (cwd = package root), plainly and
  through `cargo-memscope __runner` (what `cargo memscope test` runs each executable
  with: trace written, stdout kept); traces are written to the work directory.
- `cargo test s` / `cargo memscope test s`: median wall time of the whole commands
  with everything already built: cargo's own start-up on both sides, and on
  memscope's the scratch copy's sync and the analysis and reports as well. memscope
  keeps what it found in each executable's debug information between runs
  (`target/memscope/symbols/`), so this is a rerun with nothing rebuilt; `cold s` is
  the same command with that cache emptied first, as after a rebuild.
- `nextest s` / `memscope nextest s`: the same for `cargo nextest run` and
  `cargo memscope nextest` (one process per test), when cargo-nextest is installed.
"""

import argparse
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CRATES = [
    ("semver", "1.0.28"),
    ("smallvec", "1.15.1"),
    ("bytes", "1.12.1"),
    ("indexmap", "2.14.2"),
    ("regex-syntax", "0.8.11"),
    ("serde_json", "1.0.154"),
]

REPO = Path(__file__).resolve().parents[2]


def log(msg):
    print(f"realworld: {msg}", file=sys.stderr, flush=True)


def run(cmd, cwd=None, env=None, check=True, capture=True):
    res = subprocess.run(
        cmd,
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE if capture else None,
    )
    if check and res.returncode != 0:
        out = (res.stdout or "") + (res.stderr or "")
        sys.exit(f"realworld: `{' '.join(map(str, cmd))}` failed ({res.returncode}):\n{out[-4000:]}")
    return res


def cargo_home():
    return Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo"))


def fetch(name, version, work):
    """The crate's packaged source, unpacked under work/src/: a throwaway project that
    depends on exactly this version, `cargo fetch`, then the `.crate` from cargo's
    download cache."""
    dest = work / "src" / f"{name}-{version}"
    if (dest / "Cargo.toml").is_file():
        return dest
    shim = work / "fetch" / f"{name}-{version}"
    (shim / "src").mkdir(parents=True, exist_ok=True)
    (shim / "src" / "lib.rs").write_text("")
    (shim / "Cargo.toml").write_text(
        f'[package]\nname = "fetch-shim"\nversion = "0.0.0"\nedition = "2021"\n'
        f'[dependencies]\n{name} = "={version}"\n[workspace]\n'
    )
    run(["cargo", "fetch", "--manifest-path", str(shim / "Cargo.toml")])
    found = glob.glob(str(cargo_home() / "registry" / "cache" / "*" / f"{name}-{version}.crate"))
    if not found:
        sys.exit(f"realworld: cargo fetched {name} {version} but its .crate is not in {cargo_home()}/registry/cache")
    (work / "src").mkdir(parents=True, exist_ok=True)
    run(["tar", "xzf", found[0], "-C", str(work / "src")])
    return dest


def locked(src):
    return ["--locked"] if (src / "Cargo.lock").is_file() else []


def test_executables(src):
    """`cargo test --tests --no-run`: the executables `cargo test --tests` runs."""
    res = run(["cargo", "test", "--tests", "--no-run", "--message-format=json", *locked(src)], cwd=src)
    exes = []
    for line in res.stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") == "compiler-artifact" and msg.get("executable") and msg["profile"]["test"]:
            exes.append(msg["executable"])
    return exes


RESULT = re.compile(r"^test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored", re.M)


def counts(stdout):
    total = [0, 0, 0]
    for m in RESULT.finditer(stdout):
        for i in range(3):
            total[i] += int(m.group(i + 1))
    return tuple(total)


def plain_tests(src):
    res = run(["cargo", "test", "--tests", *locked(src)], cwd=src, check=False)
    return counts(res.stdout), res.returncode


def tracked_tests(src, memscope, out_dir):
    res = run(
        [memscope, "memscope", "test", *locked(src), "--output-dir", str(out_dir)],
        cwd=src,
        check=False,
    )
    report_path = out_dir / "report.json"
    if not report_path.is_file():
        sys.exit(f"realworld: no report from cargo memscope test in {src}:\n{res.stderr[-4000:]}")
    report = json.loads(report_path.read_text())
    bins = report["test_binaries"]
    passed = tuple(sum(b[k] for b in bins) for k in ("passed", "failed", "ignored"))
    by_pid = {p["pid"]: p["summary"] for p in report["processes"]}
    per_binary = {}
    for b in bins:
        s = by_pid.get(b["pid"], {})
        per_binary[b["binary"]] = (s.get("leaked_blocks", 0), s.get("leaked_bytes", 0), b["executable"])
    return {
        "counts": passed,
        "code": res.returncode,
        "leaked": (report["summary"]["leaked_blocks"], report["summary"]["leaked_bytes"]),
        "internal": (report["summary"]["runtime_internal_blocks"], report["summary"]["runtime_internal_bytes"]),
        "per_binary": per_binary,
        "leaks": report["leaks"],
    }


LEAK = re.compile(r"(definitely lost|indirectly lost|possibly lost|still reachable): ([\d,]+) bytes in ([\d,]+) blocks")


def valgrind(exe, src):
    """Leak figures of one test executable under memcheck: kind -> (blocks, bytes)."""
    with tempfile.NamedTemporaryFile("r", suffix=".vg") as log_file:
        run(
            [
                "valgrind",
                "--leak-check=full",
                "--show-leak-kinds=all",
                f"--log-file={log_file.name}",
                exe,
                "--test-threads=1",
                "-q",
            ],
            cwd=src,
            env={**os.environ, "CARGO_MANIFEST_DIR": str(src)},
            check=False,
        )
        text = Path(log_file.name).read_text()
    found = {k: (0, 0) for k in ("definitely lost", "indirectly lost", "possibly lost", "still reachable")}
    for kind, nbytes, blocks in LEAK.findall(text):
        found[kind] = (int(blocks.replace(",", "")), int(nbytes.replace(",", "")))
    if "ERROR SUMMARY" not in text:
        log(f"valgrind did not finish on {exe}:\n{text[-2000:]}")
    return found


def timed(cmd, cwd, env):
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def timing(src, plain_exes, tracked_exes, scratch_pkg, memscope, work, reps):
    """Medians over `reps`, alternating so that both sides see the same machine:
    the summed wall time of all test executables, plainly and through memscope's
    runner; the whole commands, `cargo test --tests` and `cargo memscope test`, with
    everything already built (the latter includes the analysis and reports); and, when
    cargo-nextest is installed, `cargo nextest run` and `cargo memscope nextest`."""
    plain, tracked, cargo_plain, cargo_tracked, cargo_cold = [], [], [], [], []
    nextest_plain, nextest_tracked = [], []
    nextest = subprocess.run(["cargo", "nextest", "--version"], capture_output=True).returncode == 0
    out = work / "timing-report"
    if nextest:
        # Once untimed, so that whatever nextest builds beyond `cargo test` is built.
        timed(["cargo", "nextest", "run", *locked(src)], src, os.environ)
        timed([memscope, "memscope", "nextest", *locked(src), "--output-dir", str(out)], src, os.environ)
    runs_dir = work / "timing-runs"
    env = {**os.environ, "CARGO_MANIFEST_DIR": str(src)}
    for _ in range(reps):
        plain.append(sum(timed([exe], src, env) for exe in plain_exes))
        shutil.rmtree(runs_dir, ignore_errors=True)
        runs_dir.mkdir(parents=True)
        tenv = {**os.environ, "CARGO_MANIFEST_DIR": str(scratch_pkg), "MEMSCOPE_TEST_RUN": str(runs_dir)}
        tracked.append(sum(timed([memscope, "__runner", exe], scratch_pkg, tenv) for exe in tracked_exes))
        shutil.rmtree(runs_dir, ignore_errors=True)
        cargo_plain.append(timed(["cargo", "test", "--tests", *locked(src)], src, os.environ))
        # Cold: with the symbolization cache emptied, as after the executables were
        # rebuilt; then warm, as on a rerun with nothing rebuilt.
        shutil.rmtree(src / "target" / "memscope" / "symbols", ignore_errors=True)
        cargo_cold.append(
            timed([memscope, "memscope", "test", *locked(src), "--output-dir", str(out)], src, os.environ)
        )
        cargo_tracked.append(
            timed([memscope, "memscope", "test", *locked(src), "--output-dir", str(out)], src, os.environ)
        )
        if nextest:
            nextest_plain.append(timed(["cargo", "nextest", "run", *locked(src)], src, os.environ))
            nextest_tracked.append(
                timed([memscope, "memscope", "nextest", *locked(src), "--output-dir", str(out)], src, os.environ)
            )
        # Each `cargo memscope test` keeps its traces: only the latest run is needed.
        for old in sorted(glob.glob(str(src / "target" / "memscope" / "traces" / "*")))[:-1]:
            shutil.rmtree(old, ignore_errors=True)
    series = (plain, tracked, cargo_plain, cargo_tracked, cargo_cold, nextest_plain, nextest_tracked)
    return tuple(statistics.median(t) if t else 0.0 for t in series)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-valgrind", action="store_true")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "memscope-realworld")
    parser.add_argument("crates", nargs="*", help="names from the built-in list (default: all)")
    args = parser.parse_args()
    crates = [c for c in CRATES if not args.crates or c[0] in args.crates]
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)

    log("building cargo-memscope (release)")
    run(["cargo", "build", "--release", "-p", "cargo-memscope", "--manifest-path", str(REPO / "Cargo.toml")])
    memscope = str(REPO / "target" / "release" / "cargo-memscope")

    rows, notes = [], []
    for name, version in crates:
        log(f"{name} {version}: fetching")
        src = fetch(name, version, work)
        log(f"{name} {version}: building and running its tests plainly")
        plain_exes = test_executables(src)
        plain_counts, plain_code = plain_tests(src)
        log(f"{name} {version}: cargo memscope test")
        tracked = tracked_tests(src, memscope, work / "reports" / f"{name}-{version}")
        scratch_pkgs = glob.glob(str(src / "target" / "memscope" / "scratch" / "*"))
        scratch_pkg = Path(scratch_pkgs[0]) if len(scratch_pkgs) == 1 else src
        vg_lost = vg_reach = None
        if not args.no_valgrind:
            vg_lost, vg_reach = [0, 0], [0, 0]
            tracked_by_exe = {}
            for binary, (blocks, nbytes, exe) in tracked["per_binary"].items():
                # Plain and tracked executables of a target share their file name's stem.
                stem = Path(exe).name.rsplit("-", 1)[0]
                tracked_by_exe.setdefault(stem, []).append((binary, blocks, nbytes))
            for exe in plain_exes:
                log(f"{name} {version}: valgrind {Path(exe).name}")
                found = valgrind(exe, src)
                lost = [sum(found[k][i] for k in ("definitely lost", "indirectly lost")) for i in (0, 1)]
                reach = [sum(found[k][i] for k in ("possibly lost", "still reachable")) for i in (0, 1)]
                for i in (0, 1):
                    vg_lost[i] += lost[i]
                    vg_reach[i] += reach[i]
                stem = Path(exe).name.rsplit("-", 1)[0]
                for binary, blocks, nbytes in tracked_by_exe.get(stem, []):
                    if (blocks, nbytes) != tuple(lost):
                        notes.append(
                            f"{name} {binary}: memscope leaked {blocks} blocks / {nbytes} B; "
                            f"valgrind lost {lost[0]} / {lost[1]} B, possibly lost {found['possibly lost'][0]} / "
                            f"{found['possibly lost'][1]} B, still reachable {found['still reachable'][0]} / "
                            f"{found['still reachable'][1]} B"
                        )
        log(f"{name} {version}: timing ({args.reps} repetitions)")
        tracked_exes = [exe for (_, _, exe) in tracked["per_binary"].values()]
        times = timing(src, plain_exes, tracked_exes, scratch_pkg, memscope, work, args.reps)
        rows.append((name, version, plain_counts, plain_code, tracked, vg_lost, vg_reach, times))
        for leak in tracked["leaks"][:5]:
            loc = leak.get("location") or {}
            notes.append(
                f"{name}: memscope leak {leak['blocks']} blocks / {leak['bytes']} B at "
                f"{loc.get('file')}:{loc.get('line')} ({loc.get('function')}) on "
                + ", ".join(t.get("name") or "?" for t in leak["threads"])
            )

    def pf(c):
        return f"{c[0]}/{c[1]}/{c[2]}"

    def ratio(a, b):
        return f"{b / a:.2f}x" if a > 0 else "-"

    header = ("crate", "tests plain p/f/i", "tests tracked p/f/i", "memscope leaked", "valgrind lost",
              "valgrind reachable", "plain s", "tracked s", "ratio", "cargo test s", "cargo memscope test s",
              "ratio", "cold s", "ratio", "nextest s", "memscope nextest s", "ratio")
    table = [header]
    for name, version, pc, pcode, tr, lost, reach, (tp, tt, cp, ct, cc, np, nt) in rows:
        table.append((
            f"{name} {version}",
            pf(pc) + ("" if pcode == 0 else f" (exit {pcode})"),
            pf(tr["counts"]) + ("" if tr["code"] == 0 else f" (exit {tr['code']})"),
            f"{tr['leaked'][0]} / {tr['leaked'][1]} B",
            "-" if lost is None else f"{lost[0]} / {lost[1]} B",
            "-" if reach is None else f"{reach[0]} / {reach[1]} B",
            f"{tp:.2f}",
            f"{tt:.2f}",
            ratio(tp, tt),
            f"{cp:.2f}",
            f"{ct:.2f}",
            ratio(cp, ct),
            f"{cc:.2f}",
            ratio(cp, cc),
            f"{np:.2f}" if np else "-",
            f"{nt:.2f}" if nt else "-",
            ratio(np, nt),
        ))
    widths = [max(len(str(r[i])) for r in table) for i in range(len(header))]
    print()
    for i, r in enumerate(table):
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if notes:
        print("\nnotes:")
        for n in notes:
            print(f"  {n}")
    mismatched = [r[0] for r in rows if r[2] != r[4]["counts"]]
    if mismatched:
        print(f"\ntest counts differ for: {', '.join(mismatched)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
