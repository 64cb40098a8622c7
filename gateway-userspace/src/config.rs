//! The daemon's settings: a TOML file (`--config`) whose keys are the flags' names, overridden
//! by the flags themselves, then checked once into [`Settings`].

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{
    datapath::AttachMode,
    state::{HealthConfig, HealthOverrides, PortRange, RateLimit},
};

/// How long backends removed or replaced drain before their connections are ended.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a deploy waits for its new backends before it aborts.
pub const DEFAULT_DEPLOY_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_SCAN_INTERVAL: Duration = Duration::from_secs(2);
/// ICMP errors about one connection the datapath translates per second, at most
/// (`--icmp-rate`): a connection meeting a narrow link gets one frag-needed per segment in
/// flight, a few dozen at once; no one gets more than this.
pub const DEFAULT_ICMP_RATE: u32 = 100;

/// A duration written as humans do: `500ms`, `2s`, `5m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Dur(pub Duration);

impl std::str::FromStr for Dur {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s)
            .map(Dur)
            .map_err(|e| format!("bad duration {s:?} ({e}): e.g. 500ms, 2s, 5m"))
    }
}

impl TryFrom<String> for Dur {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl Dur {
    pub fn ms(self) -> u64 {
        self.0.as_millis().min(u128::from(u64::MAX)) as u64
    }
}

/// Public ports handed to apps when the configuration names none.
pub const DEFAULT_PORT_RANGE: PortRange = PortRange::new(20000, 29999);
/// Source ports the datapath allocates on the SNAT address: below Linux's ephemeral range
/// (32768-60999), so they never collide with the node's own outgoing connections from that
/// address, and outside the default public range.
pub const DEFAULT_SNAT_PORTS: PortRange = PortRange::new(1024, 19999);
pub const DEFAULT_STATE_DIR: &str = "/var/lib/gateway";
pub const DEFAULT_API_SOCKET: &str = "/run/gateway/api.sock";
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9717";
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/gateway";

/// `gateway daemon`'s flags. Each overrides the config file's key of the same name.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct DaemonArgs {
    /// A TOML file whose keys are these flags' names (e.g. `public-ip = "203.0.113.10"`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// An interface to attach to (repeat for several).
    #[arg(long = "iface", value_name = "NAME")]
    pub iface: Vec<String>,
    /// Attach mode: `tc` (tcx) or `xdp` (native); default: tc on virtual interfaces, xdp on
    /// physical NICs.
    #[arg(long, value_name = "xdp|tc")]
    pub attach: Option<AttachMode>,
    /// The address clients connect to.
    #[arg(long, value_name = "IP")]
    pub public_ip: Option<Ipv4Addr>,
    /// Host part of the apps' TCP_URL [default: the public IP].
    #[arg(long, value_name = "NAME")]
    pub public_host: Option<String>,
    /// Source address of connections toward backends [default: the public IP].
    #[arg(long, value_name = "IP")]
    pub snat_ip: Option<Ipv4Addr>,
    /// Public ports for apps [default: 20000-29999].
    #[arg(long, value_name = "LOW-HIGH")]
    pub port_range: Option<PortRange>,
    /// Source ports on the SNAT address toward backends [default: 1024-19999].
    #[arg(long, value_name = "LOW-HIGH")]
    pub snat_ports: Option<PortRange>,
    /// Where the state is persisted [default: /var/lib/gateway].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// The API's Unix socket [default: /run/gateway/api.sock].
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Prometheus endpoint [default: 127.0.0.1:9717].
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// bpffs directory for the pinned maps and links; mounted if it is not on a bpffs
    /// [default: /sys/fs/bpf/gateway].
    #[arg(long, value_name = "DIR")]
    pub bpffs: Option<PathBuf>,
    /// Conntrack entries (two per connection) [default: 1048576]. A reused table keeps its size.
    #[arg(long, value_name = "N")]
    pub conntrack_size: Option<u32>,
    /// Half-open flows (handshake not completed) an app may have before its SYNs are answered
    /// with SYN cookies, no state kept (a SYN flood's defence) [default: 1024].
    #[arg(long, value_name = "N")]
    pub half_open_max: Option<u32>,
    /// ICMP errors about one connection (fragmentation needed, unreachable, time exceeded)
    /// translated and relayed per second, at most (per direction and CPU); 0 turns the
    /// translation off (such errors then reach no one, and path MTU discovery through the
    /// gateway fails) [default: 100].
    #[arg(long, value_name = "N")]
    pub icmp_rate: Option<u32>,
    /// On exit, detach the programs and remove the pins (dropping every flow) instead of
    /// leaving the datapath running for the next start [default: false].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub detach_on_exit: Option<bool>,
    /// Time between two health checks of a backend [default: 1s].
    #[arg(long, value_name = "DURATION")]
    pub check_interval: Option<Dur>,
    /// How long a health check's handshake may take [default: 1s].
    #[arg(long, value_name = "DURATION")]
    pub check_timeout: Option<Dur>,
    /// Passed checks in a row that make a backend healthy [default: 2].
    #[arg(long, value_name = "N")]
    pub check_rise: Option<u32>,
    /// Failed checks in a row that make a backend unhealthy [default: 2].
    #[arg(long, value_name = "N")]
    pub check_fall: Option<u32>,
    /// How long removed or replaced backends keep their connections [default: 5m].
    #[arg(long, value_name = "DURATION")]
    pub drain_timeout: Option<Dur>,
    /// How long a deploy waits for its new backends before it aborts [default: 1m].
    #[arg(long, value_name = "DURATION")]
    pub deploy_timeout: Option<Dur>,
    /// Time between two conntrack scans, which expire idle flows and count open connections
    /// for status and metrics; stretched to 10× a scan's duration on huge tables [default: 2s].
    #[arg(long, value_name = "DURATION")]
    pub scan_interval: Option<Dur>,
    /// Join a cluster of nodes sharing apps, ports and backends through etcd:
    /// `etcd=http://HOST:2379[,http://HOST2:2379...]` (see docs/cluster.md). Without it the
    /// node keeps its own state file only.
    #[arg(long, value_name = "etcd=URL[,URL...]")]
    pub cluster: Option<String>,
    /// This node's name in the cluster (e.g. `tcp-1`); required with --cluster.
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// The key prefix of the cluster in etcd [default: /gateway/].
    #[arg(long, value_name = "PREFIX")]
    pub cluster_prefix: Option<String>,
    /// The TTL of the node's lease in etcd: a node that stops renewing it is shown gone after
    /// this long [default: 10s].
    #[arg(long, value_name = "DURATION")]
    pub cluster_lease: Option<Dur>,
}

/// The config file: the same keys as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub iface: Option<Vec<String>>,
    pub attach: Option<AttachMode>,
    pub public_ip: Option<Ipv4Addr>,
    pub public_host: Option<String>,
    pub snat_ip: Option<Ipv4Addr>,
    pub port_range: Option<PortRange>,
    pub snat_ports: Option<PortRange>,
    pub state_dir: Option<PathBuf>,
    pub api_socket: Option<PathBuf>,
    pub metrics_addr: Option<SocketAddr>,
    pub bpffs: Option<PathBuf>,
    pub conntrack_size: Option<u32>,
    pub half_open_max: Option<u32>,
    pub icmp_rate: Option<u32>,
    pub detach_on_exit: Option<bool>,
    pub check_interval: Option<Dur>,
    pub check_timeout: Option<Dur>,
    pub check_rise: Option<u32>,
    pub check_fall: Option<u32>,
    pub drain_timeout: Option<Dur>,
    pub deploy_timeout: Option<Dur>,
    pub scan_interval: Option<Dur>,
    pub cluster: Option<String>,
    pub node: Option<String>,
    pub cluster_prefix: Option<String>,
    pub cluster_lease: Option<Dur>,
    /// Named rate limits (`[plans]`, `small = "1000pps,burst=100"`) that `gateway app create
    /// --plan NAME` and `app set --plan NAME` refer to.
    #[serde(default)]
    pub plans: BTreeMap<String, String>,
}

/// A configuration that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading the config file {path} failed: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// toml's message names the line and column.
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "no interface to attach to: give --iface NAME (or `iface = [\"NAME\"]` in the config file)"
    )]
    NoInterface,
    #[error("bad interface name {0:?}")]
    BadInterface(String),
    #[error("no public address: give --public-ip IP (or `public-ip = \"IP\"` in the config file)")]
    NoPublicIp,
    #[error("the {what} address {ip} is not a unicast address")]
    NotUnicast { what: &'static str, ip: Ipv4Addr },
    #[error(
        "the SNAT ports {snat_ports} overlap the public port range {port_range} on the same address {ip}: make them disjoint or use another --snat-ip"
    )]
    PortsOverlap {
        snat_ports: PortRange,
        port_range: PortRange,
        ip: Ipv4Addr,
    },
    #[error("bad public host name {0:?}")]
    BadPublicHost(String),
    #[error("conntrack size {0} is too small (at least 1024)")]
    ConntrackTooSmall(u32),
    #[error("half-open-max 0 would answer every SYN with a cookie (at least 1)")]
    HalfOpenMaxZero,
    /// The daemon-wide health-check settings break the same rule as an app's.
    #[error(transparent)]
    Health(crate::state::StateError),
    #[error("plan {name:?}: {error}")]
    Plan {
        name: String,
        error: crate::state::StateError,
    },
    #[error("scan-interval {} is too short: give at least 10ms", humantime::format_duration(*.0))]
    ScanIntervalTooShort(Duration),
    #[error("bad --cluster {0:?}: give etcd=http://HOST:PORT[,http://HOST:PORT...]")]
    BadCluster(String),
    #[error("--cluster needs --node NAME (this node's name in the cluster, e.g. tcp-1)")]
    NoNode,
    #[error(
        "bad node name {0:?} (letters, digits, '-', '_' and '.'; not 'all', which --nodes takes for every node)"
    )]
    BadNode(String),
    #[error("--node, --cluster-prefix and --cluster-lease only mean something with --cluster")]
    NodeWithoutCluster,
    #[error("--cluster {0:?}: this build talks to etcd over plain http:// only (no TLS)")]
    ClusterTls(String),
    #[error("--cluster-lease {} is too short: give at least 1s (etcd's leases are whole seconds)", humantime::format_duration(*.0))]
    ClusterLeaseTooShort(Duration),
}

impl FileConfig {
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e: toml::de::Error| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })
    }

    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }
}

/// The daemon's checked settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub ifaces: Vec<String>,
    /// `None`: chosen per interface.
    pub attach: Option<AttachMode>,
    pub public_ip: Ipv4Addr,
    pub public_host: String,
    pub snat_ip: Ipv4Addr,
    pub port_range: PortRange,
    pub snat_ports: PortRange,
    pub state_dir: PathBuf,
    pub api_socket: PathBuf,
    pub metrics_addr: SocketAddr,
    pub bpffs: PathBuf,
    pub conntrack_size: u32,
    /// Half-open flows per app before SYN cookies.
    pub half_open_max: u32,
    /// ICMP errors about one connection translated per second (0: off).
    pub icmp_rate: u32,
    pub detach_on_exit: bool,
    /// Health checks of apps that do not set their own.
    pub health: HealthConfig,
    pub drain_timeout: Duration,
    pub deploy_timeout: Duration,
    pub scan_interval: Duration,
    /// The rate limits of the config file's `[plans]`, by name.
    pub plans: BTreeMap<String, RateLimit>,
    /// The cluster this node belongs to (`--cluster`), if any.
    pub cluster: Option<ClusterSettings>,
}

/// `--cluster`, `--node`, `--cluster-prefix`, `--cluster-lease`.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterSettings {
    pub endpoints: Vec<String>,
    pub node: String,
    pub prefix: String,
    pub lease: Duration,
}

/// How long a node's lease lives without renewal by default.
pub const DEFAULT_CLUSTER_LEASE: Duration = Duration::from_secs(10);

/// Parses `etcd=URL[,URL...]`.
pub fn parse_cluster(text: &str) -> Result<Vec<String>, ConfigError> {
    let bad = || ConfigError::BadCluster(text.to_owned());
    let list = text.strip_prefix("etcd=").ok_or_else(bad)?;
    let endpoints: Vec<String> = list.split(',').map(|e| e.trim().to_owned()).collect();
    if endpoints.iter().any(|e| e.starts_with("https://")) {
        return Err(ConfigError::ClusterTls(text.to_owned()));
    }
    // `http://HOST[:PORT][/]`, as the etcd client takes it (a malformed one would be
    // refused only after the datapath is attached).
    let valid = |e: &str| {
        e.parse::<axum::http::Uri>().is_ok_and(|u| {
            u.scheme_str() == Some("http")
                && u.host().is_some_and(|h| !h.is_empty())
                && matches!(u.path(), "" | "/")
                && u.query().is_none()
        })
    };
    if !endpoints.iter().all(|e| valid(e)) {
        return Err(bad());
    }
    Ok(endpoints)
}

impl ClusterSettings {
    fn resolve(
        cluster: Option<String>,
        node: Option<String>,
        prefix: Option<String>,
        lease: Option<Dur>,
    ) -> Result<Option<Self>, ConfigError> {
        let Some(cluster) = cluster else {
            if node.is_some() || prefix.is_some() || lease.is_some() {
                return Err(ConfigError::NodeWithoutCluster);
            }
            return Ok(None);
        };
        let endpoints = parse_cluster(&cluster)?;
        let node = node.ok_or(ConfigError::NoNode)?;
        if node.is_empty()
            || node == "all"
            || node.len() > 63
            || !node
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(ConfigError::BadNode(node));
        }
        if let Some(Dur(d)) = lease
            && d < Duration::from_secs(1)
        {
            return Err(ConfigError::ClusterLeaseTooShort(d));
        }
        Ok(Some(ClusterSettings {
            endpoints,
            node,
            prefix: prefix.unwrap_or_else(|| crate::cluster::DEFAULT_PREFIX.to_owned()),
            lease: lease.map_or(DEFAULT_CLUSTER_LEASE, |d| d.0),
        }))
    }
}

fn unicast(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast())
}

impl Settings {
    /// Flags over the file over the defaults.
    pub fn resolve(args: DaemonArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => FileConfig::read(path)?,
            None => FileConfig::default(),
        };
        Self::merge(args, file)
    }

    pub fn merge(args: DaemonArgs, file: FileConfig) -> Result<Self, ConfigError> {
        let ifaces = if args.iface.is_empty() {
            file.iface.unwrap_or_default()
        } else {
            args.iface
        };
        if ifaces.is_empty() {
            return Err(ConfigError::NoInterface);
        }
        if let Some(bad) = ifaces
            .iter()
            .find(|i| i.is_empty() || i.len() > 15 || i.contains('/'))
        {
            return Err(ConfigError::BadInterface(bad.clone()));
        }
        let Some(public_ip) = args.public_ip.or(file.public_ip) else {
            return Err(ConfigError::NoPublicIp);
        };
        if !unicast(public_ip) {
            return Err(ConfigError::NotUnicast {
                what: "public",
                ip: public_ip,
            });
        }
        let snat_ip = args.snat_ip.or(file.snat_ip).unwrap_or(public_ip);
        if !unicast(snat_ip) {
            return Err(ConfigError::NotUnicast {
                what: "SNAT",
                ip: snat_ip,
            });
        }
        let port_range = args
            .port_range
            .or(file.port_range)
            .unwrap_or(DEFAULT_PORT_RANGE);
        let snat_ports = args
            .snat_ports
            .or(file.snat_ports)
            .unwrap_or(DEFAULT_SNAT_PORTS);
        if snat_ip == public_ip && snat_ports.overlaps(&port_range) {
            return Err(ConfigError::PortsOverlap {
                snat_ports,
                port_range,
                ip: public_ip,
            });
        }
        let public_host = args
            .public_host
            .or(file.public_host)
            .unwrap_or_else(|| public_ip.to_string());
        if public_host.is_empty() || public_host.contains(['/', ':', ' ']) {
            return Err(ConfigError::BadPublicHost(public_host));
        }
        let conntrack_size = args
            .conntrack_size
            .or(file.conntrack_size)
            .unwrap_or(gateway_common::maps::CONNTRACK_DEFAULT);
        if conntrack_size < 1024 {
            return Err(ConfigError::ConntrackTooSmall(conntrack_size));
        }
        let half_open_max = args
            .half_open_max
            .or(file.half_open_max)
            .unwrap_or(gateway_common::maps::HALF_OPEN_MAX_DEFAULT);
        if half_open_max == 0 {
            return Err(ConfigError::HalfOpenMaxZero);
        }
        let overrides = HealthOverrides {
            interval_ms: args.check_interval.or(file.check_interval).map(Dur::ms),
            timeout_ms: args.check_timeout.or(file.check_timeout).map(Dur::ms),
            rise: args.check_rise.or(file.check_rise),
            fall: args.check_fall.or(file.check_fall),
        };
        HealthConfig::check(&overrides).map_err(ConfigError::Health)?;
        let scan_interval = args
            .scan_interval
            .or(file.scan_interval)
            .map_or(DEFAULT_SCAN_INTERVAL, |d| d.0);
        if scan_interval < Duration::from_millis(10) {
            return Err(ConfigError::ScanIntervalTooShort(scan_interval));
        }
        let mut plans = BTreeMap::new();
        for (name, text) in file.plans {
            match text.parse::<RateLimit>() {
                Ok(limit) => {
                    plans.insert(name, limit);
                }
                Err(error) => return Err(ConfigError::Plan { name, error }),
            }
        }
        let cluster = ClusterSettings::resolve(
            args.cluster.or(file.cluster),
            args.node.or(file.node),
            args.cluster_prefix.or(file.cluster_prefix),
            args.cluster_lease.or(file.cluster_lease),
        )?;
        Ok(Settings {
            cluster,
            plans,
            health: HealthConfig::default().with(&overrides),
            drain_timeout: args
                .drain_timeout
                .or(file.drain_timeout)
                .map_or(DEFAULT_DRAIN_TIMEOUT, |d| d.0),
            deploy_timeout: args
                .deploy_timeout
                .or(file.deploy_timeout)
                .map_or(DEFAULT_DEPLOY_TIMEOUT, |d| d.0),
            scan_interval,
            ifaces,
            attach: args.attach.or(file.attach),
            public_ip,
            public_host,
            snat_ip,
            port_range,
            snat_ports,
            state_dir: args
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            api_socket: args
                .api_socket
                .or(file.api_socket)
                .unwrap_or_else(|| DEFAULT_API_SOCKET.into()),
            metrics_addr: args
                .metrics_addr
                .or(file.metrics_addr)
                .unwrap_or_else(|| DEFAULT_METRICS_ADDR.parse().expect("default address")),
            bpffs: args
                .bpffs
                .or(file.bpffs)
                .unwrap_or_else(|| DEFAULT_BPFFS.into()),
            conntrack_size,
            half_open_max,
            icmp_rate: args
                .icmp_rate
                .or(file.icmp_rate)
                .unwrap_or(DEFAULT_ICMP_RATE),
            detach_on_exit: args.detach_on_exit.or(file.detach_on_exit).unwrap_or(false),
        })
    }

    /// The TCP_URL of an app on `port`.
    pub fn url(&self, port: u16) -> String {
        url_of(&self.public_host, port)
    }
}

/// The TCP_URL of an app on `port` of the node whose `--public-host` is `host`.
pub fn url_of(host: &str, port: u16) -> String {
    format!("tcp://{host}:{port}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FileConfig, ConfigError> {
        FileConfig::parse(Path::new("gateway.toml"), text)
    }

    fn args() -> DaemonArgs {
        DaemonArgs {
            iface: vec!["eth0".into()],
            public_ip: Some("203.0.113.10".parse().unwrap()),
            ..Default::default()
        }
    }

    #[test]
    fn cluster_settings() {
        let merged = |a: DaemonArgs, f: &str| Settings::merge(a, parse(f).unwrap());
        assert_eq!(merged(args(), "").unwrap().cluster, None);
        let s = merged(
            DaemonArgs {
                cluster: Some("etcd=http://203.0.113.129:2379,http://203.0.113.133:2379".into()),
                node: Some("tcp-1".into()),
                cluster_lease: Some("2s".parse().unwrap()),
                ..args()
            },
            "",
        )
        .unwrap();
        assert_eq!(
            s.cluster,
            Some(ClusterSettings {
                endpoints: vec![
                    "http://203.0.113.129:2379".into(),
                    "http://203.0.113.133:2379".into()
                ],
                node: "tcp-1".into(),
                prefix: "/gateway/".into(),
                lease: Duration::from_secs(2),
            })
        );
        // The same keys in the file.
        let s = merged(
            args(),
            "cluster = \"etcd=http://198.51.100.9:2379\"\nnode = \"tcp-2\"\ncluster-prefix = \"/gw2/\"\n",
        )
        .unwrap()
        .cluster
        .unwrap();
        assert_eq!((s.node.as_str(), s.prefix.as_str()), ("tcp-2", "/gw2/"));
        assert_eq!(s.lease, DEFAULT_CLUSTER_LEASE);
        for (cluster, node, want) in [
            (Some("http://x:2379"), Some("tcp-1"), "bad --cluster"),
            (Some("etcd=x:2379"), Some("tcp-1"), "bad --cluster"),
            (Some("etcd=http://x y:2379"), Some("tcp-1"), "bad --cluster"),
            (Some("etcd=http://:2379"), Some("tcp-1"), "bad --cluster"),
            (
                Some("etcd=http://x:2379/v3?a=b"),
                Some("tcp-1"),
                "bad --cluster",
            ),
            (Some("etcd=http://x:2379,"), Some("tcp-1"), "bad --cluster"),
            (Some("etcd=http://x:2379"), None, "needs --node"),
            (Some("etcd=http://x:2379"), Some("a/b"), "bad node name"),
            (None, Some("tcp-1"), "only mean something with --cluster"),
            (
                Some("etcd=https://x:2379"),
                Some("tcp-1"),
                "plain http:// only",
            ),
            (Some("etcd=http://x:2379"), Some("all"), "bad node name"),
        ] {
            let e = merged(
                DaemonArgs {
                    cluster: cluster.map(Into::into),
                    node: node.map(Into::into),
                    ..args()
                },
                "",
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains(want), "{cluster:?} {node:?}: {e}");
        }
        // A lease under a second (etcd's TTLs are whole seconds: 0 became 1 s silently), and
        // one without --cluster (ignored silently).
        for (cluster, lease, want) in [
            (Some("etcd=http://x:2379"), "0s", "too short"),
            (Some("etcd=http://x:2379"), "500ms", "too short"),
            (None, "2s", "only mean something with --cluster"),
        ] {
            let e = merged(
                DaemonArgs {
                    cluster: cluster.map(Into::into),
                    node: cluster.map(|_| "tcp-1".into()),
                    cluster_lease: Some(lease.parse().unwrap()),
                    ..args()
                },
                "",
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains(want), "{lease}: {e}");
        }
    }

    #[test]
    fn a_full_file_parses() {
        let file = parse(
            r#"
            iface = ["eth0", "eth1"]
            attach = "xdp"
            public-ip = "203.0.113.10"
            public-host = "tcp-1.example.com"
            snat-ip = "198.51.100.253"
            port-range = "30000-30999"
            snat-ports = "2000-9999"
            state-dir = "/tmp/s"
            api-socket = "/tmp/a.sock"
            metrics-addr = "127.0.0.1:9999"
            bpffs = "/run/gw-bpf"
            conntrack-size = 4096
            detach-on-exit = true
            check-interval = "500ms"
            check-fall = 3
            drain-timeout = "30s"
            "#,
        )
        .unwrap();
        let s = Settings::merge(DaemonArgs::default(), file).unwrap();
        assert_eq!(s.ifaces, ["eth0", "eth1"]);
        assert_eq!(s.attach, Some(AttachMode::Xdp));
        assert_eq!(s.port_range, PortRange::new(30000, 30999));
        assert_eq!(s.snat_ports, PortRange::new(2000, 9999));
        assert_eq!(s.url(30000), "tcp://tcp-1.example.com:30000");
        assert_eq!(s.conntrack_size, 4096);
        assert!(s.detach_on_exit);
        let health = HealthConfig {
            interval_ms: 500,
            fall: 3,
            ..HealthConfig::default()
        };
        assert_eq!(s.health, health);
        assert_eq!(s.drain_timeout, Duration::from_secs(30));
        assert_eq!(s.deploy_timeout, DEFAULT_DEPLOY_TIMEOUT);
    }

    #[test]
    fn errors_name_line_and_column() {
        for (text, wants) in [
            ("public-ip = \"203.0.113.300\"", "line 1, column 13"),
            ("\n\nbogus = 1", "line 3, column 1"),
            ("attach = \"ebpf\"", "line 1"),
            ("port-range = \"10-1\"", "line 1"),
            ("iface = [", "line 1"),
            ("\ncheck-interval = \"soon\"", "line 2"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(
                err.contains(wants) && err.contains("gateway.toml"),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn flags_override_the_file_and_defaults_fill_the_rest() {
        let file = parse("public-ip = \"203.0.113.99\"\nport-range = \"30000-30010\"").unwrap();
        let s = Settings::merge(args(), file).unwrap();
        assert_eq!(s.public_ip, "203.0.113.10".parse::<Ipv4Addr>().unwrap());
        assert_eq!(s.snat_ip, s.public_ip);
        assert_eq!(s.public_host, "203.0.113.10");
        assert_eq!(s.port_range, PortRange::new(30000, 30010));
        assert_eq!(s.snat_ports, DEFAULT_SNAT_PORTS);
        assert_eq!(s.api_socket, Path::new(DEFAULT_API_SOCKET));
        assert_eq!(s.bpffs, Path::new(DEFAULT_BPFFS));
        assert_eq!(s.attach, None);
        assert_eq!(s.half_open_max, 1024);
        assert!(!s.detach_on_exit);
    }

    #[test]
    fn the_example_config_in_deploy_is_valid_and_complete() {
        let text = include_str!("../../deploy/gateway.toml");
        let file = parse(text).unwrap();
        let s = Settings::merge(DaemonArgs::default(), file).unwrap();
        assert_eq!(s.ifaces, ["eth0"]);
        assert_eq!(s.scan_interval, DEFAULT_SCAN_INTERVAL);
        // Every key the file format has appears in the example (commented or not).
        for key in [
            "iface",
            "attach",
            "public-ip",
            "public-host",
            "snat-ip",
            "port-range",
            "snat-ports",
            "state-dir",
            "api-socket",
            "metrics-addr",
            "bpffs",
            "detach-on-exit",
            "conntrack-size",
            "half-open-max",
            "scan-interval",
            "check-interval",
            "check-timeout",
            "check-rise",
            "check-fall",
            "drain-timeout",
            "deploy-timeout",
        ] {
            assert!(text.contains(&format!("{key} = ")), "{key} missing");
        }
        assert!(text.contains("\n[plans]\n"), "[plans] missing");
        assert_eq!(
            s.plans.get("small"),
            Some(&RateLimit {
                pps: 1000,
                burst: 100
            })
        );
    }

    #[test]
    fn plans_are_read_and_checked() {
        let file = parse("[plans]\nsmall = \"1000pps,burst=100\"\nlarge = \"50000\"\n").unwrap();
        let s = Settings::merge(args(), file).unwrap();
        assert_eq!(
            s.plans.into_iter().collect::<Vec<_>>(),
            [
                (
                    "large".to_owned(),
                    RateLimit {
                        pps: 50000,
                        burst: 15000
                    }
                ),
                (
                    "small".to_owned(),
                    RateLimit {
                        pps: 1000,
                        burst: 100
                    }
                ),
            ]
        );
        assert!(
            Settings::merge(args(), parse("").unwrap())
                .unwrap()
                .plans
                .is_empty()
        );
        let file = parse("[plans]\nbad = \"fast\"\n").unwrap();
        let err = Settings::merge(args(), file).unwrap_err().to_string();
        assert_eq!(
            err,
            "plan \"bad\": rate limit must look like 1000pps or 1000pps,burst=200 (1 to 10000000 pps, a burst of 1 to 10 times the pps), not \"fast\""
        );
        // A number is not a limit's text.
        assert!(parse("[plans]\nsmall = 1000\n").is_err());
    }

    #[test]
    fn unusable_settings_are_refused() {
        let cases: [(DaemonArgs, &str); 11] = [
            (
                DaemonArgs {
                    check_rise: Some(0),
                    ..args()
                },
                "bad health-check setting",
            ),
            (
                DaemonArgs {
                    iface: vec![],
                    ..args()
                },
                "no interface",
            ),
            (
                DaemonArgs {
                    public_ip: None,
                    ..args()
                },
                "no public address",
            ),
            (
                DaemonArgs {
                    public_ip: Some(Ipv4Addr::UNSPECIFIED),
                    ..args()
                },
                "not a unicast",
            ),
            (
                DaemonArgs {
                    snat_ports: Some(PortRange::new(20000, 20001)),
                    ..args()
                },
                "overlap",
            ),
            (
                DaemonArgs {
                    conntrack_size: Some(10),
                    ..args()
                },
                "too small",
            ),
            (
                DaemonArgs {
                    half_open_max: Some(0),
                    ..args()
                },
                "half-open-max 0",
            ),
            (
                DaemonArgs {
                    scan_interval: Some(Dur(Duration::ZERO)),
                    ..args()
                },
                "scan-interval 0s is too short",
            ),
            (
                DaemonArgs {
                    iface: vec!["a/b".into()],
                    ..args()
                },
                "bad interface name \"a/b\"",
            ),
            (
                DaemonArgs {
                    snat_ip: Some(Ipv4Addr::new(224, 0, 0, 1)),
                    ..args()
                },
                "the SNAT address 224.0.0.1 is not a unicast address",
            ),
            (
                DaemonArgs {
                    public_host: Some("tcp 1".into()),
                    ..args()
                },
                "bad public host name \"tcp 1\"",
            ),
        ];
        for (a, wants) in cases {
            let err = Settings::merge(a, FileConfig::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(wants), "{err}");
        }
    }
}
