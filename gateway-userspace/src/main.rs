//! `gateway`: the daemon (`gateway daemon`), the operator's CLI that talks to it over its
//! API socket ([`gateway::cli`]), and the container hosts' agent (`gateway agent`). This is the binary's edge: a failure becomes one line on
//! stderr, `gateway: ` and the error's chain, and exit code 1.

use std::process::ExitCode;

use clap::Parser as _;
use gateway::{
    cli::{self, Args, Command},
    config::{DaemonArgs, Settings},
};

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.command {
        Command::Daemon(daemon_args) => daemon(*daemon_args),
        Command::Agent(agent_args) => agent(agent_args),
        Command::Cli(command) => cli::run(&args.api_socket, command).map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("gateway: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `gateway agent ...`: logs to stderr as the daemon does.
fn agent(args: gateway::agent::AgentArgs) -> anyhow::Result<()> {
    init_logs();
    gateway::agent::main(args)?;
    Ok(())
}

/// Logs to stderr, filtered by `GATEWAY_LOG` (`info` by default).
fn init_logs() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("GATEWAY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// `gateway daemon`: logs to stderr (filtered by `GATEWAY_LOG`, `info` by default), then runs
/// the daemon until it exits.
fn daemon(args: DaemonArgs) -> anyhow::Result<()> {
    init_logs();
    let settings = Settings::resolve(args)?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(gateway::daemon::run(settings))?;
    Ok(())
}
