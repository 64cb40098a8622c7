//! The command line as clap reads it: `gateway [--api-socket PATH] COMMAND ...`. Every
//! command's and flag's help text is here; what the commands do is in the sibling modules.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::{
    config::{self, DaemonArgs, Dur},
    state::{ClientAddress, RateLimit, StateError},
};

/// An eBPF full-NAT TCP load balancer.
#[derive(Debug, Parser)]
#[command(name = "gateway", version, about)]
pub struct Args {
    /// The daemon's API socket.
    #[arg(
        long,
        global = true,
        env = "GATEWAY_API_SOCKET",
        default_value = config::DEFAULT_API_SOCKET,
        value_name = "PATH"
    )]
    pub api_socket: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

/// `gateway daemon`, or one of the operator's commands (shown side by side in `--help`).
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: attach the datapath and serve the API.
    Daemon(Box<DaemonArgs>),
    /// On a container host: show apps the client address the gateway's TOA option carries
    /// (`gateway agent --cgroup PATH --trusted IP`; `status`, `down`).
    Agent(crate::agent::AgentArgs),
    #[command(flatten)]
    Cli(CliCommand),
}

/// The operator's commands: [`super::run`] runs them.
#[derive(Debug, Subcommand)]
pub enum CliCommand {
    /// Apps: public endpoints `tcp://HOST:PORT`.
    #[command(subcommand)]
    App(AppCommand),
    /// An app's backends (containers).
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Replace an app's backends: the new ones join once healthy, in one switch, and the
    /// others drain.
    Deploy(DeployArgs),
    /// Apps, ports, backends with their state, open connections, rates.
    Status(StatusArgs),
    /// Live connections: client, public port, backend, SNAT port, state, age, bytes. With
    /// `--backend IP:PORT`, the SNAT port a container sees tells which client is behind it.
    Flows(FlowsArgs),
    /// Detach the datapath and remove its pins (drops every connection); stops the daemon if
    /// one is running.
    Down(DownArgs),
    /// Load the datapath into the kernel and report what it holds, without attaching it.
    Check,
    /// The cluster of nodes sharing apps through etcd (`gateway daemon --cluster`).
    #[command(subcommand)]
    Cluster(ClusterCommand),
}

/// `gateway cluster ...`.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// The live nodes and the apps each serves (asks this node's daemon).
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Write a single node's state file's apps (ports, backends, settings) into etcd; an app
    /// whose name or port is taken there is refused, the others are imported.
    Import {
        /// The cluster: `etcd=http://HOST:2379[,...]`.
        #[arg(long, value_name = "etcd=URL[,URL...]")]
        cluster: String,
        #[arg(long, value_name = "PREFIX", default_value = crate::cluster::DEFAULT_PREFIX)]
        cluster_prefix: String,
        /// The state file [default: /var/lib/gateway/state.json].
        #[arg(long, value_name = "FILE")]
        state: Option<PathBuf>,
    },
}

/// `gateway app ...`.
#[derive(Debug, Subcommand)]
pub enum AppCommand {
    /// Create an app; prints its TCP_URL.
    Create {
        name: String,
        /// This public port instead of the lowest free one.
        #[arg(long)]
        port: Option<u16>,
        /// Health checks: time between two [default: the daemon's].
        #[arg(long, value_name = "DURATION")]
        check_interval: Option<Dur>,
        /// Health checks: handshake timeout [default: the daemon's].
        #[arg(long, value_name = "DURATION")]
        check_timeout: Option<Dur>,
        /// Health checks: passes in a row to become healthy [default: the daemon's].
        #[arg(long, value_name = "N")]
        check_rise: Option<u32>,
        /// Health checks: failures in a row to become unhealthy [default: the daemon's].
        #[arg(long, value_name = "N")]
        check_fall: Option<u32>,
        /// Clamp the MSS: a larger MSS option of the app's SYNs (client to backend) and
        /// SYN-ACKs (backend to client) is lowered to BYTES, 536 to 65495 (e.g. a tunnel's MTU
        /// less 40) [default: none].
        #[arg(long, value_name = "BYTES")]
        mss: Option<u32>,
        /// Tell the app's backends each connection's client address and port: `toa`, in a TCP
        /// option (see docs/client-address.md), or `none` [default: none].
        #[arg(long, value_name = "toa|none", value_parser = client_address)]
        client_address: Option<ClientAddress>,
        /// Limit the packets to and from each of the app's backends, each direction
        /// separately: `1000pps` or `1000pps,burst=200` (1 to 10000000 pps; the burst, 1 to 10
        /// times the pps, defaults to three tenths of it: 300 ms) [default: no limit].
        #[arg(long, value_name = "RATE", value_parser = rate_limit)]
        rate_limit: Option<RateLimit>,
        /// The rate limit of plan NAME of the daemon's config file (`[plans]`).
        #[arg(long, value_name = "NAME", conflicts_with = "rate_limit")]
        plan: Option<String>,
        /// Cluster mode: the nodes that serve the app, comma-separated [default: all].
        #[arg(long, value_name = "NODE,...", value_delimiter = ',')]
        nodes: Option<Vec<String>>,
    },
    /// Change an app's settings, live (its connections go on).
    Set {
        name: String,
        #[command(flatten)]
        settings: AppSettings,
    },
    /// List the apps.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one app.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete an app: frees its port; its connections end.
    Delete { name: String },
}

/// What `gateway app set` changes: at least one setting; those not given are left as they are.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = true)]
pub struct AppSettings {
    /// Clamp the MSS of the app's SYNs and SYN-ACKs to BYTES, 536 to 65495 (see `app create`);
    /// new handshakes get it.
    #[arg(long, value_name = "BYTES")]
    pub mss: Option<u32>,
    /// Remove the app's MSS clamp.
    #[arg(long, conflicts_with = "mss")]
    pub no_mss: bool,
    /// Tell the app's backends each connection's client address (`toa`) or not (`none`), see
    /// `app create`; new connections get it.
    #[arg(long, value_name = "toa|none", value_parser = client_address)]
    pub client_address: Option<ClientAddress>,
    /// Limit the packets to and from each of the app's backends (see `app create`):
    /// `1000pps` or `1000pps,burst=200`.
    #[arg(long, value_name = "RATE", value_parser = rate_limit)]
    pub rate_limit: Option<RateLimit>,
    /// Remove the app's rate limit.
    #[arg(long, conflicts_with_all = ["rate_limit", "plan"])]
    pub no_rate_limit: bool,
    /// The rate limit of plan NAME of the daemon's config file (`[plans]`).
    #[arg(long, value_name = "NAME", conflicts_with = "rate_limit")]
    pub plan: Option<String>,
    /// Cluster mode: the nodes that serve the app, comma-separated (`all`: every node).
    #[arg(long, value_name = "NODE,...", value_delimiter = ',')]
    pub nodes: Option<Vec<String>>,
}

/// `--rate-limit`'s value.
fn rate_limit(s: &str) -> Result<RateLimit, StateError> {
    s.parse()
}

/// `--client-address`'s value: the daemon's own words for a bad one (clap's value enum would
/// list the values instead).
fn client_address(s: &str) -> Result<ClientAddress, StateError> {
    s.parse()
}

/// `gateway backend ...`.
#[derive(Debug, Subcommand)]
pub enum BackendCommand {
    /// Add a backend `IP:PORT` to an app.
    Add {
        app: String,
        address: String,
        /// Relative weight, 1 to 256.
        #[arg(long)]
        weight: Option<u32>,
    },
    /// Remove a backend: it drains (no new connections; open ones go on until they close or
    /// the drain timeout), then goes.
    Remove {
        app: String,
        address: String,
        /// Remove it at once and end its connections.
        #[arg(long)]
        now: bool,
        /// How long it drains [default: the daemon's --drain-timeout].
        #[arg(long, value_name = "DURATION", conflicts_with = "now")]
        drain_timeout: Option<Dur>,
    },
    /// List an app's backends.
    List {
        app: String,
        #[arg(long)]
        json: bool,
    },
}

/// `gateway deploy APP IP:PORT...`.
#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    pub app: String,
    /// The new backends, `IP:PORT` each.
    #[arg(required = true, value_name = "IP:PORT")]
    pub backends: Vec<String>,
    /// Weight of the new backends, 1 to 256.
    #[arg(long)]
    pub weight: Option<u32>,
    /// How many new backends must be healthy to switch [default: all].
    #[arg(long)]
    pub quorum: Option<usize>,
    /// Abort (keeping the old backends) if they are not healthy by then [default: the
    /// daemon's --deploy-timeout].
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<Dur>,
    /// How long the replaced backends drain [default: the daemon's --drain-timeout].
    #[arg(long, value_name = "DURATION")]
    pub drain_timeout: Option<Dur>,
    /// After the switch, wait until the replaced backends are gone (no connection left,
    /// or the drain timeout): then they can be stopped.
    #[arg(long)]
    pub wait: bool,
}

/// `gateway status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[arg(long)]
    pub json: bool,
}

/// `gateway flows`.
#[derive(Debug, clap::Args)]
pub struct FlowsArgs {
    /// Only this app's.
    #[arg(long)]
    pub app: Option<String>,
    /// Only those to this backend.
    #[arg(long, value_name = "IP:PORT")]
    pub backend: Option<String>,
    /// At most this many (the oldest first).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    #[arg(long)]
    pub json: bool,
}

/// `gateway down`.
#[derive(Debug, clap::Args)]
pub struct DownArgs {
    /// Where the pins are, when no daemon answers.
    #[arg(long, value_name = "DIR", default_value = config::DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}
