//! The API between the daemon and its clients: HTTP/1.1 with JSON bodies over a Unix socket,
//! under `/v1`. The types here are its bodies; [`client::Client`] is the CLI's side.
//!
//! | method and path                          | body            | answer              |
//! |------------------------------------------|-----------------|---------------------|
//! | `GET /v1/status`                         |                 | [`Status`]          |
//! | `GET /v1/apps`                           |                 | `[`[`AppView`]`]`   |
//! | `POST /v1/apps`                          | [`CreateApp`]   | [`AppView`] (201)   |
//! | `GET /v1/apps/{name}`                    |                 | [`AppView`]         |
//! | `PATCH /v1/apps/{name}`                  | [`UpdateApp`]   | [`AppView`]         |
//! | `DELETE /v1/apps/{name}`                 |                 | [`AppView`]         |
//! | `GET /v1/apps/{name}/backends`           |                 | `[`[`BackendView`]`]` |
//! | `POST /v1/apps/{name}/backends`          | [`AddBackend`]  | [`BackendView`] (201) |
//! | `DELETE /v1/apps/{name}/backends/{addr}[?now=true&drain_timeout_ms=N]` | | [`BackendView`] |
//! | `POST /v1/apps/{name}/deploy`            | [`Deploy`]      | [`AppView`] once switched; 504 when aborted |
//! | `GET /v1/flows[?app=NAME&backend=IP:PORT&limit=N]` |       | [`FlowList`]        |
//! | `POST /v1/down`                          |                 | 202; the daemon detaches and exits |
//!
//! Errors are `{"error": "one line"}` with a 4xx/5xx status.

use serde::{Deserialize, Deserializer, Serialize};

use crate::{
    datapath::{AttachMode, Phases},
    state::{ClientAddress, RateLimit},
};

pub mod client;
pub mod server;

pub use client::{Client, ClientError};

/// `POST /v1/apps`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateApp {
    pub name: String,
    /// A specific public port; the lowest free one of the range when absent.
    #[serde(default)]
    pub port: Option<u16>,
    /// Health-check settings of its own (each falls back to the daemon's).
    #[serde(default)]
    pub health: crate::state::HealthOverrides,
    /// An MSS clamp (bytes, 536 to 65495): a larger MSS option of the app's SYNs and SYN-ACKs
    /// is lowered to it. None when absent. Left out when `None`, so that a daemon of the release
    /// before clamps still takes the body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mss_clamp: Option<u32>,
    /// Whether its backends are told each connection's client address: `"toa"` or `"none"`.
    /// `none` when absent (or `null`). Left out when `None`, as `mss_clamp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_address: Option<ClientAddress>,
    /// A packet rate limit for each of its backends, each direction: `{"pps": 1000, "burst":
    /// 100}`. None when absent (or `null`). Left out when `None`, as `mss_clamp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Instead of `rate_limit`: the name of a plan of the daemon's config file (`[plans]`),
    /// whose limit the daemon sets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// Cluster mode: the nodes that serve the app (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<Vec<String>>,
}

/// `PATCH /v1/apps/{name}`: changes settings of an existing app, live. Each field reads as in a
/// JSON merge patch (RFC 7396): absent, the setting is left as it is; `null`, it is removed; a
/// value, it is set. `{}` changes nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateApp {
    /// The MSS clamp (bytes, 536 to 65495), or `null` for none.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub mss_clamp: Option<Option<u32>>,
    /// Whether its backends are told each connection's client address: `"toa"`, or `"none"`
    /// (also `null`).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub client_address: Option<Option<ClientAddress>>,
    /// The packet rate limit (`{"pps": 1000, "burst": 100}`), or `null` for none.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub rate_limit: Option<Option<RateLimit>>,
    /// Instead of `rate_limit`: the name of a plan of the daemon's config file, whose limit
    /// the daemon sets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// Cluster mode: the nodes that serve the app (`all`: every node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<Vec<String>>,
}

/// A field that is present, as `Some` of its value (also of `null`: `Some(None)`); with
/// `#[serde(default)]`, an absent one is `None`.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// `POST /v1/apps/{name}/deploy`: replace the app's backends with these.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deploy {
    /// `IPv4:PORT` each.
    pub backends: Vec<String>,
    /// Weight of the new backends (default 1).
    #[serde(default)]
    pub weight: Option<u32>,
    /// How many new backends must be healthy to switch (default: all).
    #[serde(default)]
    pub quorum: Option<usize>,
    /// How long to wait for them before aborting (default: the daemon's `--deploy-timeout`).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// How long the replaced backends drain (default: the daemon's `--drain-timeout`).
    #[serde(default)]
    pub drain_timeout_ms: Option<u64>,
}

/// Query of `DELETE /v1/apps/{name}/backends/{addr}`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveBackend {
    /// Remove at once and end its connections, instead of draining.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub now: bool,
    /// How long it drains (default: the daemon's `--drain-timeout`).
    #[serde(default)]
    pub drain_timeout_ms: Option<u64>,
}

/// `POST /v1/apps/{name}/backends`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddBackend {
    /// `IPv4:PORT`.
    pub address: String,
    #[serde(default)]
    pub weight: Option<u32>,
}

/// A backend as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendView {
    pub address: String,
    pub weight: u32,
    /// `pending`, `active` (the only one that gets new connections), `unhealthy`, `draining`.
    pub state: crate::state::BackendState,
    /// When the state last changed (Unix time, ms).
    pub since_ms: u64,
    /// Draining: when its remaining connections are ended (Unix time, ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_until_ms: Option<u64>,
    /// Held by a deploy that has not switched yet.
    #[serde(default)]
    pub held: bool,
    /// Open connections (handshaking or established) to it.
    pub connections: u64,
    /// State changes its health checks made since the daemon started.
    #[serde(default)]
    pub health_changes: u64,
    /// Its app's packet rate limit (each direction), if it has one.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// Packets to it dropped over the limit, since its id was last given.
    #[serde(default)]
    pub rate_dropped_to_backend: u64,
    /// Packets from it dropped over the limit, since its id was last given.
    #[serde(default)]
    pub rate_dropped_from_backend: u64,
    /// With a limit: packets per second to it and from it (that passed), between the last two
    /// conntrack scans.
    #[serde(default)]
    pub pps_to_backend: f64,
    #[serde(default)]
    pub pps_from_backend: f64,
    /// Cluster mode: each live node's state of this backend (as the node published it), by
    /// node name.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub nodes: std::collections::BTreeMap<String, String>,
}

/// An app as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AppView {
    pub name: String,
    pub port: u16,
    /// `tcp://HOST:PORT`.
    pub url: String,
    /// Its MSS clamp (bytes), if it has one.
    #[serde(default)]
    pub mss_clamp: Option<u16>,
    /// Whether its backends are told each connection's client address (`toa`), or not
    /// (`none`).
    #[serde(default)]
    pub client_address: ClientAddress,
    /// Its packet rate limit (for each backend, each direction), if it has one.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// The plan of the daemon's config file the limit came from, if any.
    #[serde(default)]
    pub plan: Option<String>,
    pub backends: Vec<BackendView>,
    /// Open connections to the app (as of the last conntrack scan).
    pub connections: u64,
    /// Those of them whose handshake has not completed (a SYN flood toward the app shows here).
    #[serde(default)]
    pub half_open: u64,
    /// Its traffic between the last two conntrack scans.
    #[serde(default)]
    pub rates: Rates,
    /// In cluster mode, an app of the cluster this node does not serve (outside its
    /// `--nodes` set): shown from its spec in etcd, without backends or traffic.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub not_served_here: bool,
}

/// Per-second rates between two samples.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    /// New connections.
    pub connections: f64,
    /// Packets, both directions.
    pub packets: f64,
    /// IPv4 bytes, both directions.
    pub bytes: f64,
}

/// Query of `GET /v1/flows`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowQuery {
    /// Only this app's flows.
    #[serde(default)]
    pub app: Option<String>,
    /// Only flows to this backend (`IPv4:PORT`), also one already removed.
    #[serde(default)]
    pub backend: Option<String>,
    /// At most this many flows (the oldest first).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// One connection through the gateway, both of its conntrack entries joined.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowView {
    /// The app (empty when it no longer exists).
    pub app: String,
    /// The client's real address and port.
    pub client: String,
    /// The public address and port it connected to.
    pub public: String,
    /// The backend it goes to.
    pub backend: String,
    /// The source address and port the backend sees (the gateway's SNAT address).
    pub snat: String,
    /// `handshake`, `established`, `fin_client`, `fin_backend`, `closed` or `reset`.
    pub state: String,
    /// Since its SYN (ms).
    pub age_ms: u64,
    /// Since its last packet (ms, to about a second).
    pub idle_ms: u64,
    /// Client to backend.
    pub packets_in: u64,
    pub bytes_in: u64,
    /// Backend to client.
    pub packets_out: u64,
    pub bytes_out: u64,
}

/// `GET /v1/flows`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowList {
    /// Flows that matched (more than `flows` holds when a limit cut the list).
    pub matched: usize,
    pub flows: Vec<FlowView>,
}

/// One attachment of the datapath.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentView {
    pub iface: String,
    pub mode: AttachMode,
}

/// `GET /v1/status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub public_ip: String,
    pub snat_ip: String,
    pub port_range: String,
    pub attachments: Vec<AttachmentView>,
    pub apps: Vec<AppView>,
    /// Conntrack entries in use (two per connection) and the table's capacity: a full table
    /// refuses new connections (it never evicts one).
    pub conntrack_entries: u64,
    pub conntrack_capacity: u64,
    /// The connections in the table by phase (as of the last conntrack scan).
    #[serde(default)]
    pub conntrack_connections: Phases,
    /// New connections refused for want of room, since the datapath's counters were created.
    #[serde(default)]
    pub refused: Refusals,
    /// Health checks run, and failed, since the daemon started.
    #[serde(default)]
    pub health_checks: u64,
    #[serde(default)]
    pub health_checks_failed: u64,
    /// When the conntrack scan that counted the connections (and ended the rates) began (Unix
    /// time, ms).
    #[serde(default)]
    pub scanned_at_ms: u64,
}

/// New connections the datapath refused for want of room: SYNs dropped under these reasons
/// (`gateway_drops_total{reason="..."}`; a client's SYN retransmissions count again).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusals {
    /// The conntrack table was full (`conntrack_full`).
    pub conntrack_full: u64,
    /// No free SNAT port toward the chosen backend (`snat_exhausted`).
    pub snat_exhausted: u64,
}

/// An error body.
/// `GET /v1/cluster`: the cluster as this node sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    /// This node's name.
    pub node: String,
    pub endpoints: String,
    /// The etcd revision this node has applied.
    pub applied_revision: i64,
    /// The live nodes (their lease not expired), by name.
    pub nodes: Vec<ClusterNodeView>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterNodeView {
    pub node: String,
    pub version: String,
    pub started_ms: u64,
    #[serde(default)]
    pub api: Option<String>,
    /// The apps the node published a status of (those it serves).
    pub apps: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}
