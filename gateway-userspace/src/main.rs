//! `gateway`: the daemon and the CLI that talks to it.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// An eBPF full-NAT TCP load balancer.
#[derive(Debug, Parser)]
#[command(name = "gateway", version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load the datapath into the kernel and report what it holds, without attaching it.
    Check,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Command::Check => check(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("gateway: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn check() -> anyhow::Result<()> {
    use anyhow::Context as _;
    use gateway::datapath::{Datapath, TC_PROGRAM, XDP_PROGRAM};
    let datapath = Datapath::load()
        .context("loading the datapath (are you root, on Linux >= 6.6 with BTF?)")?;
    // Reading the counters proves the maps are usable, not only created.
    datapath.global_stats()?;
    println!(
        "datapath loaded and verified: programs {XDP_PROGRAM} and {TC_PROGRAM}, maps {}",
        gateway_common::maps::ALL.join(", ")
    );
    Ok(())
}
