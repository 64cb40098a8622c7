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
    let datapath = gateway::datapath::Datapath::load()
        .context("loading the datapath (are you root, on Linux >= 5.x with BTF?)")?;
    let stats = datapath.global_stats()?;
    println!(
        "datapath loaded: programs {} and {}, {} global counters",
        gateway::datapath::XDP_PROGRAM,
        gateway::datapath::TC_PROGRAM,
        gateway_common::GlobalStat::COUNT + gateway_common::DropReason::COUNT,
    );
    drop(stats);
    Ok(())
}
