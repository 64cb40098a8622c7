//! `gateway agent ...` as clap reads it. `gateway agent --cgroup PATH --trusted IP` runs the
//! agent (as `gateway agent run ...` does); `status` and `down` read or remove what it pinned.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Args, Subcommand};

/// Where the agent pins its programs' links and its maps unless told otherwise: under /run,
/// not /sys/fs/bpf, which `ip netns exec` remounts.
pub const DEFAULT_PIN_DIR: &str = "/run/gateway-agent";

/// `gateway agent`: runs the agent, or with a subcommand shows or removes it.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct AgentArgs {
    #[command(subcommand)]
    pub command: Option<AgentCommand>,
    /// Without a subcommand: `run`'s flags.
    #[command(flatten)]
    pub run: RunArgs,
}

/// `gateway agent status|down|run`.
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Attach to a cgroup and serve metrics until SIGINT or SIGTERM (the same as `gateway
    /// agent --cgroup ...`). The programs stay attached after it stops.
    Run(RunArgs),
    /// What the agent attached (cgroup, programs), its trusted sources, counters and the
    /// connections it maps now, read from its pins.
    Status(StatusArgs),
    /// Detach the agent's programs and remove its pins (mapped connections show the
    /// gateway's address again).
    Down(DownArgs),
}

/// How the agent runs.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// The cgroup v2 directory whose sockets the agent serves (a container's, or a slice of
    /// them), e.g. /sys/fs/cgroup/system.slice/docker-<id>.scope. Not the root cgroup.
    #[arg(long, value_name = "PATH", required = true)]
    pub cgroup: Option<PathBuf>,
    /// The gateway SNAT addresses whose TOA options are believed (IPv4, comma-separated or
    /// repeated). A TOA option from any other source is ignored.
    #[arg(
        long,
        value_name = "IP[,IP...]",
        value_delimiter = ',',
        required = true
    )]
    pub trusted: Vec<String>,
    /// A directory on a bpffs (mounted there if it is not) for the links and maps.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Serve Prometheus metrics on GET http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Connections mapped at most (the least recently used mapping goes beyond). A reused
    /// pinned map keeps its own size.
    #[arg(long, value_name = "N", default_value_t = gateway_common::maps::AGENT_SOCKETS_DEFAULT)]
    pub max_connections: u32,
}

/// `gateway agent status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    #[arg(long)]
    pub json: bool,
}

/// `gateway agent down`.
#[derive(Debug, Args)]
pub struct DownArgs {
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Top,
    }

    #[derive(Debug, Subcommand)]
    enum Top {
        Agent(AgentArgs),
    }

    fn parse(line: &str) -> Result<AgentArgs, clap::Error> {
        let argv = std::iter::once("gateway").chain(line.split_whitespace());
        Cli::try_parse_from(argv).map(|c| match c.command {
            Top::Agent(a) => a,
        })
    }

    #[test]
    fn the_issue_s_command_lines_parse() {
        let a =
            parse("agent --cgroup /sys/fs/cgroup/x --trusted 198.51.100.253,192.0.2.9").unwrap();
        assert!(a.command.is_none());
        let run = a.run;
        assert_eq!(run.cgroup.unwrap(), PathBuf::from("/sys/fs/cgroup/x"));
        assert_eq!(run.trusted, ["198.51.100.253", "192.0.2.9"]);
        assert_eq!(run.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
        assert_eq!(run.max_connections, 65_536);

        let a = parse("agent status").unwrap();
        assert!(matches!(a.command, Some(AgentCommand::Status(_))));
        let a = parse("agent down --pin-dir /run/x").unwrap();
        match a.command {
            Some(AgentCommand::Down(d)) => assert_eq!(d.pin_dir, PathBuf::from("/run/x")),
            other => panic!("{other:?}"),
        }
        let a = parse(
            "agent run --cgroup /c --trusted 1.2.3.4 --trusted 5.6.7.8 --metrics 127.0.0.1:9100",
        )
        .unwrap();
        match a.command {
            Some(AgentCommand::Run(r)) => {
                assert_eq!(r.trusted, ["1.2.3.4", "5.6.7.8"]);
                assert_eq!(r.metrics, Some("127.0.0.1:9100".parse().unwrap()));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn running_needs_a_cgroup_and_trusted_sources() {
        assert!(parse("agent").is_err());
        assert!(parse("agent --cgroup /c").is_err());
        assert!(parse("agent --trusted 1.2.3.4").is_err());
        assert!(parse("agent run --cgroup /c").is_err());
        // A subcommand with the run's flags is refused, not silently ignored.
        assert!(parse("agent --cgroup /c --trusted 1.2.3.4 status").is_err());
    }
}
