//! `cargo xtask test`: every check, one summary. Steps that need root (BPF, namespaces) are
//! skipped with a clear line when run without it; the others still run.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::Instant,
};

use crate::{env_cargo, is_root};

#[derive(Default)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
    /// The captured output of each failed test (cargo test's `---- NAME stdout ----` blocks),
    /// repeated after the summary so that the end of a long log says why.
    failures: Vec<Vec<String>>,
    /// Inside such a block.
    in_failure: bool,
}

impl Counts {
    /// Takes in one line of cargo test's output: a `test result:` line's counts, and the
    /// lines of each failed test's captured output.
    fn read(&mut self, line: &str) {
        if line.starts_with("---- ") && line.ends_with(" ----") {
            self.in_failure = true;
            self.failures.push(vec![line.to_owned()]);
        } else if line == "failures:" {
            self.in_failure = false;
        } else if let Some(rest) = line.strip_prefix("test result: ") {
            self.in_failure = false;
            for part in rest.split(['.', ';']) {
                let mut words = part.split_whitespace();
                let (Some(n), Some(what)) = (words.next(), words.next()) else {
                    continue;
                };
                let Ok(n) = n.parse::<u64>() else { continue };
                match what {
                    "passed" => self.passed += n,
                    "failed" => self.failed += n,
                    "ignored" => self.ignored += n,
                    _ => {}
                }
            }
        } else if self.in_failure
            && let Some(block) = self.failures.last_mut()
            && block.len() <= FAILURE_LINES
        {
            block.push(line.to_owned());
        }
    }
}

/// Lines of a failed test's captured output repeated after the summary (its first ones: the
/// panic message comes first).
const FAILURE_LINES: usize = 40;

enum Outcome {
    Ok,
    Failed,
    Skipped(&'static str),
}

struct Step {
    name: &'static str,
    outcome: Outcome,
    counts: Option<Counts>,
    secs: f64,
}

/// Runs a command, streaming its output, and counts cargo test's `test result:` lines.
fn run(cmd: &mut Command, count_tests: bool) -> (bool, Option<Counts>) {
    eprintln!("\nxtask test: {cmd:?}");
    let mut child = match cmd.stdout(Stdio::piped()).spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("xtask test: cannot run {cmd:?}: {e}");
            return (false, None);
        }
    };
    let mut counts = Counts::default();
    for line in BufReader::new(child.stdout.take().expect("stdout")).lines() {
        let Ok(line) = line else { break };
        println!("{line}");
        counts.read(&line);
    }
    let ok = child.wait().is_ok_and(|s| s.success());
    (ok, count_tests.then_some(counts))
}

fn cargo(args: &[&str]) -> Command {
    let mut c = Command::new(env_cargo());
    c.args(args);
    c
}

/// The integration test targets of the `tests` crate, split into datapath ones
/// (`tests/tests/datapath*.rs`, BPF_PROG_TEST_RUN) and end-to-end ones (the rest).
fn root_test_targets() -> (Vec<String>, Vec<String>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/tests");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.strip_suffix(".rs").map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.into_iter().partition(|n| n.starts_with("datapath"))
}

fn with_targets(base: &[&str], targets: &[String]) -> Command {
    let mut c = cargo(base);
    for t in targets {
        c.args(["--test", t]);
    }
    c
}

pub fn test() -> anyhow::Result<()> {
    let root = is_root();
    let mut steps = Vec::new();
    let mut step = |name: &'static str, needs_root: bool, cmd: Option<Command>, count: bool| {
        let start = Instant::now();
        let (outcome, counts) = match cmd {
            _ if needs_root && !root => (Outcome::Skipped("needs root"), None),
            None => (Outcome::Skipped("nothing to run"), None),
            Some(mut cmd) => {
                let (ok, counts) = run(&mut cmd, count);
                (if ok { Outcome::Ok } else { Outcome::Failed }, counts)
            }
        };
        steps.push(Step {
            name,
            outcome,
            counts,
            secs: start.elapsed().as_secs_f64(),
        });
    };

    step(
        "format",
        false,
        Some(cargo(&["fmt", "--all", "--", "--check"])),
        false,
    );
    step(
        "clippy",
        false,
        Some(cargo(&[
            "clippy",
            "--workspace",
            "--exclude",
            "gateway-ebpf",
            "--all-targets",
            "--",
            "--deny",
            "warnings",
        ])),
        false,
    );
    step(
        "clippy (eBPF)",
        false,
        Some({
            let mut c = Command::new("cargo");
            c.args([
                "+nightly",
                "clippy",
                "--package",
                "gateway-ebpf",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "--deny",
                "warnings",
            ])
            // A target directory of its own: the bpf target's build-std does not mix with the
            // host's artifacts.
            .env(
                "CARGO_TARGET_DIR",
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/ebpf-clippy"),
            )
            .env_remove("RUSTC")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .env_remove("CARGO");
            c
        }),
        false,
    );
    step(
        "unit tests",
        false,
        Some(cargo(&[
            "test",
            "--no-fail-fast",
            "--workspace",
            "--exclude",
            "gateway-ebpf",
            "--exclude",
            "gateway-tests",
        ])),
        true,
    );
    // The end-to-end tests run the real binary.
    step(
        "build gateway",
        false,
        Some(crate::build_gateway_command(false)),
        false,
    );
    let (datapath, e2e) = root_test_targets();
    // Every test binary runs even when one fails: the summary counts the whole suite.
    let tests_base = ["test", "--no-fail-fast", "--package", "gateway-tests"];
    step(
        "datapath tests",
        true,
        (!datapath.is_empty()).then(|| with_targets(&tests_base, &datapath)),
        true,
    );
    step(
        "end-to-end tests",
        true,
        (!e2e.is_empty()).then(|| {
            let mut c = with_targets(&tests_base, &e2e);
            c.arg("--lib"); // the harness's own unit tests
            c.env("GATEWAY_BIN", crate::gateway_bin(false));
            c
        }),
        true,
    );
    step(
        "leftovers swept",
        true,
        Some(cargo(&[
            "run",
            "--quiet",
            "--package",
            "gateway-tests",
            "--bin",
            "gateway-sandbox",
            "--",
            "sweep",
        ])),
        false,
    );

    println!("\nxtask test summary");
    let mut total = Counts::default();
    let mut failed_steps = 0;
    for s in &steps {
        let status = match &s.outcome {
            Outcome::Ok => "ok".to_owned(),
            Outcome::Failed => {
                failed_steps += 1;
                "FAILED".to_owned()
            }
            Outcome::Skipped(why) => format!("skipped ({why})"),
        };
        let counts = s
            .counts
            .as_ref()
            .map(|c| {
                total.passed += c.passed;
                total.failed += c.failed;
                total.ignored += c.ignored;
                format!("{} passed, {} failed", c.passed, c.failed)
            })
            .unwrap_or_default();
        println!(
            "  {:<18} {:<24} {:>7.1} s  {counts}",
            s.name, status, s.secs
        );
    }
    if !root {
        println!(
            "  note: the datapath and end-to-end tests need root (BPF, network namespaces) and were skipped: run `cargo xtask test` as root to run them"
        );
    }
    println!(
        "tests: {} passed, {} failed, {} skipped",
        total.passed, total.failed, total.ignored
    );
    for block in steps
        .iter()
        .filter_map(|s| s.counts.as_ref())
        .flat_map(|c| &c.failures)
    {
        println!();
        for line in block.iter().take(FAILURE_LINES) {
            println!("  {line}");
        }
        if block.len() > FAILURE_LINES {
            println!("  ... (the rest above)");
        }
    }
    anyhow::ensure!(failed_steps == 0, "{failed_steps} step(s) failed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Counts;

    #[test]
    fn counts_and_failure_blocks_are_read_from_cargo_tests_output() {
        let mut c = Counts::default();
        for line in "running 3 tests\ntest a ... ok\ntest b ... FAILED\n\nfailures:\n\n---- b stdout ----\nthread 'b' panicked at x.rs:1:1:\nrow 1 \"SYN\": verdict: Drop\n\nfailures:\n    b\n\ntest result: FAILED. 1 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.1s\ntest c ... ok".lines() {
            c.read(line);
        }
        assert_eq!((c.passed, c.failed, c.ignored), (1, 1, 1));
        assert_eq!(
            c.failures,
            vec![vec![
                "---- b stdout ----".to_owned(),
                "thread 'b' panicked at x.rs:1:1:".to_owned(),
                "row 1 \"SYN\": verdict: Drop".to_owned(),
                String::new(),
            ]]
        );
    }
}
