//! `cargo xtask`: runs things. `setup` installs what is missing; `run`, `demo`, `test`, `bench`
//! and `fuzz` call it first, so each works as the first command on a fresh machine. The eBPF object
//! is not built here: `gateway-userspace/build.rs` builds it with aya-build.

mod setup;
mod test;

use std::process::{Command, ExitCode};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    about = "Set up, run, demo, test, benchmark and fuzz the gateway"
)]
struct Args {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install every missing prerequisite (skips what is present).
    Setup,
    /// Build and run `gateway daemon ARGS` as root (e.g. `cargo xtask run -- --iface eth0
    /// --public-ip 203.0.113.10`).
    Run {
        /// Arguments for `gateway daemon`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the gateway in a namespace sandbox with real backends and show it balancing.
    Demo,
    /// Formatting, clippy, unit, datapath and end-to-end tests, with one summary.
    Test,
    /// Benchmarks (`cargo xtask bench datapath`, ...).
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The datapath and its reference model side by side on generated packet sequences, in
    /// both attach modes (needs root); stops at the first divergence and shows it minimised.
    Fuzz {
        /// Arguments for `gateway-fuzz`: `[--packets N] [--seed S] [--mode xdp|tc|both]
        /// [--legacy]` (1,000,000 packets per mode, a seed from the clock, both modes).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Task::Setup => setup::setup(),
        Task::Run { args } => setup::setup().and_then(|()| {
            let mut full = vec!["daemon".to_owned()];
            full.extend(args);
            cargo_run_as_root("gateway-userspace", "gateway", false, &full)
        }),
        Task::Demo => setup::setup().and_then(|()| {
            // The demo runs the real daemon and CLI.
            let status = build_gateway_command(false).status()?;
            anyhow::ensure!(status.success(), "building gateway failed ({status})");
            cargo_run_as_root("gateway-tests", "gateway-sandbox", false, &["demo".into()])
        }),
        Task::Test => setup::setup().and_then(|()| test::test()),
        Task::Bench { args } => setup::setup().and_then(|()| {
            // The contenders run the daemon as deployed: an optimized build.
            let status = build_gateway_command(true).status()?;
            anyhow::ensure!(status.success(), "building gateway failed ({status})");
            let mut full = vec!["bench".to_owned()];
            full.extend(args);
            cargo_run_as_root("gateway-tests", "gateway-sandbox", true, &full)
        }),
        Task::Fuzz { args } => setup::setup().and_then(|()| {
            // Optimized: the model and the comparisons are the fuzzer's own cost.
            cargo_run_as_root("gateway-tests", "gateway-fuzz", true, &args)
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `cargo run -p PACKAGE --bin BIN -- ARGS`, through `sudo -E` when not root.
fn cargo_run_as_root(
    package: &str,
    bin: &str,
    release: bool,
    args: &[String],
) -> anyhow::Result<()> {
    let mut cmd = Command::new(env_cargo());
    cmd.args(["run", "--quiet", "--package", package, "--bin", bin]);
    if release {
        cmd.arg("--release");
    }
    if !is_root() {
        eprintln!("xtask: {bin} needs root (network namespaces, BPF): running it through sudo");
        cmd.args(["--config", "target.'cfg(all())'.runner='sudo -E'"]);
    }
    // The sandbox runs the real binary (see `Task::Demo`).
    cmd.env("GATEWAY_BIN", gateway_bin(release));
    cmd.arg("--").args(args);
    let status = cmd.status()?;
    anyhow::ensure!(
        status.success(),
        "{bin} {} failed ({status})",
        args.join(" ")
    );
    Ok(())
}

/// `cargo build` of the `gateway` binary, which the end-to-end tests and the demo run (debug)
/// and the benchmarks (release).
pub fn build_gateway_command(release: bool) -> Command {
    let mut c = Command::new(env_cargo());
    c.args([
        "build",
        "--package",
        "gateway-userspace",
        "--bin",
        "gateway",
    ]);
    if release {
        c.arg("--release");
    }
    c
}

/// Where [`build_gateway_command`] puts the binary.
pub fn gateway_bin(release: bool) -> std::path::PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target
        .join(if release { "release" } else { "debug" })
        .join("gateway")
}

/// The cargo that runs us.
pub fn env_cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fuzz_args(line: &[&str]) -> Vec<String> {
        let args = Args::try_parse_from(["xtask", "fuzz"].iter().chain(line))
            .unwrap_or_else(|e| panic!("{line:?}: {e}"));
        match args.command {
            Task::Fuzz { args } => args,
            other => panic!("{line:?}: {other:?}"),
        }
    }

    #[test]
    fn fuzz_passes_its_arguments_to_gateway_fuzz_as_they_are() {
        let line = [
            "--packets",
            "1000",
            "--seed",
            "0x2a",
            "--mode",
            "tc",
            "--legacy",
        ];
        assert_eq!(fuzz_args(&line), line);
        assert_eq!(fuzz_args(&["--legacy"]), ["--legacy"]);
        assert!(fuzz_args(&[]).is_empty());
    }
}
