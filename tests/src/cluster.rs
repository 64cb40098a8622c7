//! Several gateways sharing one etcd (issue 19), for the cluster's tests and benchmark: a real
//! etcd in a namespace of its own, linked by a veth pair to each node's gateway namespace
//! (203.0.113.128/25, one /30 per node, not on the interfaces the daemons attach to), one
//! daemon per node in TC mode (`--cluster`, nodes `tcp-1`.., `--public-host tcp-N.example.com`,
//! a lease of 2 s), each with its own client and backends at the same addresses (the "same"
//! containers as far as the control plane is concerned).

use std::time::{Duration, Instant};

use gateway::datapath::AttachMode;

use crate::{daemon::Daemon, etcd::Etcd, netns::Topology, traffic::EchoServer, wait_for};

/// How long the nodes' echo servers (port 8080 on every backend) live.
const LIFETIME: Duration = Duration::from_secs(120);

/// One node: its daemon, its echo servers, its topology (dropped in that order).
pub struct Node {
    pub daemon: Daemon,
    _servers: Vec<EchoServer>,
    pub topo: Topology,
}

/// The nodes and their etcd (the daemons go first).
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub etcd: Etcd,
}

impl Cluster {
    /// `nodes` nodes of `backends` backends each, their daemons started.
    #[track_caller]
    pub fn new(nodes: usize, backends: usize) -> Self {
        Self::new_with(nodes, backends, |_, args| args)
    }

    /// [`Cluster::new`], node `i`'s daemon arguments changed by `args(i, them)`.
    #[track_caller]
    pub fn new_with(
        nodes: usize,
        backends: usize,
        args: impl Fn(usize, Vec<String>) -> Vec<String>,
    ) -> Self {
        let etcd = Etcd::new();
        let nodes = (0..nodes)
            .map(|i| {
                let topo = Topology::new(backends);
                let endpoint = etcd.link(&topo.gateway, i);
                let servers = topo.echo_servers(8080, LIFETIME);
                let cluster = format!("etcd={endpoint}");
                let node = format!("tcp-{}", i + 1);
                let host = format!("{node}.example.com");
                let daemon = Daemon::start_with_args(
                    &topo,
                    args(
                        i,
                        Daemon::args(
                            &topo,
                            Some(AttachMode::Tc),
                            &[
                                "--cluster",
                                &cluster,
                                "--node",
                                &node,
                                "--cluster-lease",
                                "2s",
                                "--public-host",
                                &host,
                            ],
                        ),
                    ),
                );
                Node {
                    daemon,
                    _servers: servers,
                    topo,
                }
            })
            .collect();
        Cluster { nodes, etcd }
    }

    pub fn daemon(&self, i: usize) -> &Daemon {
        &self.nodes[i].daemon
    }

    /// Issue 19's measure: `changes` changes on node 1 through its API, alternately a backend
    /// added to app `web` (created here) and removed (drained), each timed from the request
    /// until every other node shows it in its API (a node's state is committed after its
    /// datapath is programmed; polled every 10 ms). Panics if a change is not on every node
    /// within 5 s. The times, in the changes' order.
    #[track_caller]
    pub fn propagation(&self, changes: usize) -> Vec<Duration> {
        self.daemon(0).ok(&["app", "create", "web"]);
        let state_on = |i: usize, address: &str| -> Option<String> {
            let (status, body) = self.daemon(i).api("GET", "/v1/apps/web/backends", "");
            assert_eq!(status, 200, "{body}");
            let list: Vec<gateway::api::BackendView> = serde_json::from_str(&body).unwrap();
            list.into_iter()
                .find(|b| b.address == address)
                .map(|b| b.state.as_str().to_owned())
        };
        let mut took = Vec::with_capacity(changes);
        for k in 0..changes {
            let address = format!("198.51.100.200:{}", 10000 + k / 2);
            let start = Instant::now();
            let done: fn(Option<String>) -> bool = if k % 2 == 0 {
                let (status, body) = self.daemon(0).api(
                    "POST",
                    "/v1/apps/web/backends",
                    &format!(r#"{{"address": "{address}"}}"#),
                );
                assert_eq!(status, 201, "{body}");
                |s| s.is_some()
            } else {
                let (status, body) =
                    self.daemon(0)
                        .api("DELETE", &format!("/v1/apps/web/backends/{address}"), "");
                assert_eq!(status, 200, "{body}");
                |s| s.is_none_or(|s| s == "draining")
            };
            wait_for(Duration::from_secs(5), || {
                (1..self.nodes.len()).all(|i| done(state_on(i, &address)))
            })
            .unwrap_or_else(|| panic!("change {k} ({address}) not on every node after 5 s"));
            took.push(start.elapsed());
        }
        took
    }
}

/// `took`'s median, p90, p99 and maximum, as one line.
pub fn quantiles(took: &[Duration]) -> String {
    let mut sorted = took.to_vec();
    sorted.sort();
    let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q) as usize];
    format!(
        "{} changes on node 1 seen on every other node: median {:?}, p90 {:?}, p99 {:?}, max {:?}",
        sorted.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        sorted.last().copied().unwrap_or_default()
    )
}
