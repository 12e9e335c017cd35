//! Reading libtest's output: the result lines of its pretty output (`test a::b ...
//! ok`), its terse output (`-q`: dots, and the names of failed tests only), and its
//! `--list` output (`a::b: test`), which, with terse output, names the tests that ran.

/// A test result line of the harness: name and outcome, in completion order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub name: String,
    pub outcome: String,
}

/// Reads libtest's pretty output (`test a::b ... ok`), also when a test's own output
/// (`--nocapture`) splits the line. ANSI colour codes are ignored.
pub fn parse_harness(stdout: &str) -> Vec<Outcome> {
    let clean = strip_ansi(stdout);
    let mut out = Vec::new();
    let mut pending: Vec<String> = Vec::new();
    for line in clean.lines() {
        let line = line.trim_end();
        if let Some(rest) = line.strip_prefix("test ") {
            if let Some((name, result)) = rest.split_once(" ... ") {
                let name = name.trim_end_matches(" - should panic").to_owned();
                match outcome_word(result) {
                    Some(outcome) => out.push(Outcome { name, outcome }),
                    None => pending.push(name),
                }
                continue;
            }
            if let Some(name) = rest.strip_suffix(" ...") {
                pending.push(name.trim_end_matches(" - should panic").to_owned());
                continue;
            }
        }
        if !pending.is_empty() {
            let word = line.rsplit(' ').next().unwrap_or("");
            if let Some(outcome) = outcome_word(line.trim()).or_else(|| outcome_word(word)) {
                let name = pending.remove(0);
                out.push(Outcome { name, outcome });
            }
        }
    }
    out
}

/// Whether libtest printed its terse output (`-q`, `--format terse`): a `running N
/// tests` header, then dots, with no `test NAME ... ok` line to name them.
pub fn is_terse(stdout: &str) -> bool {
    let clean = strip_ansi(stdout);
    let ran = clean.lines().any(|line| {
        line.strip_prefix("running ")
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n > 0)
    });
    ran && parse_harness(&clean).is_empty()
}

/// The names `--list` printed (`NAME: test`, `NAME: bench`), in its order.
pub fn parse_list(stdout: &str) -> Vec<String> {
    strip_ansi(stdout)
        .lines()
        .filter_map(|line| {
            let line = line.trim_end();
            line.strip_suffix(": test")
                .or_else(|| line.strip_suffix(": bench"))
                .map(str::to_owned)
        })
        .collect()
}

/// What a harness's `--list` runs said: the tests the arguments select, and which of
/// them are `#[ignore]`d.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    pub tests: Vec<String>,
    pub ignored: Vec<String>,
}

/// Outcomes from libtest's terse output, which names only failed tests: those are
/// `failed`, the listed ignored ones `ignored`, and the rest `passed` when the
/// `test result:` counts agree (a harness that died part-way says nothing of the
/// others, so they are left out). In list order: terse output gives no completion order.
pub fn parse_terse(stdout: &str, listing: &Listing) -> Vec<Outcome> {
    let clean = strip_ansi(stdout);
    let mut failed: Vec<&str> = Vec::new();
    let mut in_failures = false;
    let mut counts = None;
    for line in clean.lines() {
        let line = line.trim_end();
        if let Some(name) = line.strip_suffix(" --- FAILED") {
            failed.push(name.trim());
        } else if line == "failures:" {
            in_failures = true;
        } else if in_failures {
            match line.strip_prefix("    ") {
                Some(name) if !name.starts_with(' ') => failed.push(name),
                _ => in_failures = false,
            }
        }
        if let Some(rest) = line.strip_prefix("test result: ") {
            counts = Some(result_counts(rest));
        }
    }
    let is_failed = |name: &str| failed.contains(&name);
    let is_ignored = |name: &str| listing.ignored.iter().any(|i| i == name);
    let passed = listing
        .tests
        .iter()
        .filter(|t| !is_failed(t) && !is_ignored(t))
        .count() as u64;
    let complete = counts.is_some_and(|(p, _, _)| p == passed);
    listing
        .tests
        .iter()
        .filter_map(|name| {
            let outcome = if is_failed(name) {
                "failed"
            } else if is_ignored(name) {
                "ignored"
            } else if complete {
                "passed"
            } else {
                return None;
            };
            Some(Outcome {
                name: name.clone(),
                outcome: outcome.to_owned(),
            })
        })
        .collect()
}

/// `N passed; M failed; K ignored` from a `test result:` line.
fn result_counts(text: &str) -> (u64, u64, u64) {
    let count = |word: &str| {
        text.split(';')
            .find_map(|part| {
                part.trim()
                    .strip_suffix(word)?
                    .trim()
                    .rsplit(' ')
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    };
    (count("passed"), count("failed"), count("ignored"))
}

fn outcome_word(result: &str) -> Option<String> {
    let result = result.trim();
    let word = result.split([' ', ',']).next().unwrap_or("");
    match word {
        "ok" => Some("passed".into()),
        "FAILED" => Some("failed".into()),
        "ignored" => Some("ignored".into()),
        "bench:" => Some("bench".into()),
        _ => None,
    }
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harness_lines_give_names_and_outcomes_in_completion_order() {
        let out = "\nrunning 4 tests\n\x1b[32mtest a::b ... ok\x1b[0m\ntest c ... FAILED\n\
                   test d ... ignored, slow\ntest e - should panic ... ok\n\nfailures:\n\n---- c stdout ----\n";
        let got = parse_harness(out);
        let pairs: Vec<(&str, &str)> = got
            .iter()
            .map(|o| (o.name.as_str(), o.outcome.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("a::b", "passed"),
                ("c", "failed"),
                ("d", "ignored"),
                ("e", "passed")
            ]
        );
    }

    #[test]
    fn a_result_split_by_the_tests_own_output_still_pairs() {
        let out = "test slow ... hello from the test\nok\ntest next ... ok\n";
        let got = parse_harness(out);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].name, "slow");
        assert_eq!(got[0].outcome, "passed");
    }

    #[test]
    fn terse_output_with_a_listing_gives_every_test_its_outcome() {
        let listing = Listing {
            tests: parse_list("a::one: test\na::two: test\na::slow: test\nb::bench: bench\n\n4 tests, 0 benchmarks\n"),
            ignored: parse_list("a::slow: test\n"),
        };
        assert_eq!(listing.tests.len(), 4);
        let out = "\nrunning 4 tests\n.i. 2/4\na::two --- FAILED\n.\nfailures:\n\n---- a::two stdout ----\n    not a name\n\nfailures:\n    a::two\n\ntest result: FAILED. 2 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out\n";
        assert!(is_terse(out));
        let got: Vec<(String, String)> = parse_terse(out, &listing)
            .into_iter()
            .map(|o| (o.name, o.outcome))
            .collect();
        let want = [
            ("a::one", "passed"),
            ("a::two", "failed"),
            ("a::slow", "ignored"),
            ("b::bench", "passed"),
        ];
        assert_eq!(got, want.map(|(n, o)| (n.to_owned(), o.to_owned())));
    }

    #[test]
    fn terse_output_of_a_harness_that_died_claims_no_passes() {
        let listing = Listing {
            tests: vec!["a".into(), "b".into()],
            ignored: Vec::new(),
        };
        let out = "\nrunning 2 tests\n.";
        let got = parse_terse(out, &listing);
        assert!(got.is_empty(), "{got:?}");
        assert!(!is_terse("\nrunning 1 test\ntest a ... ok\n"));
    }
}
