//! Prometheus metrics (`GET /metrics` on `--metrics-addr`), in the OpenMetrics text format that
//! Prometheus scrapes. Counters come from the datapath's per-CPU maps, summed at scrape time;
//! connection gauges and conntrack occupancy come from the daemon's periodic conntrack scan
//! (never from a walk per scrape); health-check latency is a histogram the checks feed.
//!
//! Each scrape copies what it reports into a [`Snapshot`] under the daemon's lock, then
//! encodes it without the lock.

use std::fmt;

use gateway_common::maps::{self, TrafficStats};
use gateway_common::{DropReason, GlobalStat};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabel, EncodeMetric as _, text},
    metrics::{
        MetricType,
        counter::ConstCounter,
        family::Family,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
        info::Info,
    },
    registry::Registry,
};

use std::collections::HashMap;

use crate::{
    datapath::{ConnectionCounts, Datapath, DatapathError, GlobalStats, Phase, Phases},
    state::{BackendState, State},
};

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of [`to_prometheus_text`]'s output.
pub const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether a request's `Accept` header takes OpenMetrics (Prometheus asks for it first);
/// anything else (curl, promtool, older scrapers) gets the Prometheus text format.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.contains("application/openmetrics-text"))
}

/// Rewrites OpenMetrics text as the Prometheus text format 0.0.4: a counter family is named
/// with its `_total` suffix, an info family becomes a gauge named `_info`, and the `# EOF`
/// and `# UNIT` lines go. Samples are the same in both.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut renamed = std::collections::HashMap::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            match rest.split_once(' ') {
                Some((name, "counter")) => {
                    renamed.insert(name, (format!("{name}_total"), "counter"))
                }
                Some((name, "info")) => renamed.insert(name, (format!("{name}_info"), "gauge")),
                _ => None,
            };
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta.and_then(|(p, rest)| {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            renamed.get(name).map(|(new, kind)| (p, new, kind, tail))
        }) {
            Some(("# TYPE ", new, kind, _)) => out.push_str(&format!("# TYPE {new} {kind}")),
            Some((p, new, _, tail)) => out.push_str(&format!("{p}{new} {tail}")),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

type AppLabel = [(&'static str, String); 1];

/// Health-check latency per app: a histogram from 0.1 ms to ~1.6 s.
#[derive(Clone, Debug)]
pub struct HealthLatency(Family<AppLabel, Histogram, fn() -> Histogram>);

impl Default for HealthLatency {
    fn default() -> Self {
        fn buckets() -> Histogram {
            Histogram::new(exponential_buckets(0.0001, 2.0, 15))
        }
        HealthLatency(Family::new_with_constructor(buckets as fn() -> Histogram))
    }
}

impl HealthLatency {
    /// Records one check of a backend of `app` that took `seconds`.
    pub fn observe(&self, app: &str, seconds: f64) {
        self.0
            .get_or_create(&[("app", app.to_owned())])
            .observe(seconds);
    }

    /// Forgets `app` (deleted).
    pub fn remove(&self, app: &str) {
        self.0.remove(&[("app", app.to_owned())]);
    }
}

/// One app's figures.
#[derive(Debug)]
pub struct AppRow {
    pub name: String,
    pub traffic: TrafficStats,
    pub active: u64,
    /// Those of its open connections whose handshake has not completed.
    pub half_open: u64,
}

/// One backend's figures.
#[derive(Debug)]
pub struct BackendRow {
    pub app: String,
    pub address: String,
    pub state: BackendState,
    pub weight: u32,
    pub traffic: TrafficStats,
    pub active: u64,
    pub state_changes: u64,
    /// Its app's rate limit (each direction): packets per second and burst, 0 for none.
    pub rate_limit_pps: u64,
    pub rate_limit_burst: u64,
    /// Packets dropped over the limit: to the backend, from it.
    pub rate_dropped: [u64; 2],
}

/// Everything a scrape reports but the health histogram, copied out of the daemon.
#[derive(Debug)]
pub struct Snapshot {
    pub apps: Vec<AppRow>,
    pub backends: Vec<BackendRow>,
    pub global: GlobalStats,
    pub conntrack_entries: u64,
    pub conntrack_capacity: u64,
    /// The connections in the table by phase.
    pub conntrack_connections: Phases,
    pub daemon: DaemonFigures,
}

/// The daemon's own figures in a scrape.
#[derive(Clone, Debug, Default)]
pub struct DaemonFigures {
    pub conntrack_expired: u64,
    /// RSTs sent to the ends of connections the daemon ended, and those that failed.
    pub resets_sent: u64,
    pub reset_failures: u64,
    pub scans: u64,
    pub scan_seconds: f64,
    /// When the last scan ended (Unix seconds); 0 before the first.
    pub scan_timestamp: f64,
    pub health_checks: u64,
    pub health_checks_failed: u64,
    /// Health state changes per backend id.
    pub state_changes: HashMap<u32, u64>,
}

impl Snapshot {
    /// Reads the counters of every app and backend of `state` from `datapath` (one per-CPU
    /// lookup each), with open connections from `counts` (the last scan).
    pub fn read(
        state: &State,
        datapath: &Datapath,
        counts: &ConnectionCounts,
        daemon: DaemonFigures,
    ) -> Result<Snapshot, DatapathError> {
        let mut apps = Vec::with_capacity(state.apps.len());
        let mut backends = Vec::new();
        for (name, app) in &state.apps {
            apps.push(AppRow {
                name: name.clone(),
                traffic: datapath.app_stats(app.id)?,
                active: counts.apps.get(&app.id).copied().unwrap_or(0),
                half_open: counts.half_open.get(&app.id).copied().unwrap_or(0),
            });
            for b in &app.backends {
                backends.push(BackendRow {
                    app: name.clone(),
                    address: b.addr.to_string(),
                    state: b.state,
                    weight: b.weight,
                    traffic: datapath.backend_stats(b.id)?,
                    active: counts.backends.get(&b.id).copied().unwrap_or(0),
                    state_changes: daemon.state_changes.get(&b.id).copied().unwrap_or(0),
                    rate_limit_pps: app.rate_limit.map_or(0, |l| u64::from(l.pps)),
                    rate_limit_burst: app.rate_limit.map_or(0, |l| u64::from(l.burst)),
                    rate_dropped: [
                        datapath.rate_drops(b.id, maps::RATE_TO_BACKEND)?,
                        datapath.rate_drops(b.id, maps::RATE_FROM_BACKEND)?,
                    ],
                });
            }
        }
        Ok(Snapshot {
            apps,
            backends,
            global: datapath.global_stats()?,
            conntrack_entries: counts.entries,
            conntrack_capacity: u64::from(datapath.conntrack_capacity()),
            conntrack_connections: counts.phases,
            daemon,
        })
    }
}

/// Encodes `snapshot`, the health histogram and the build info.
pub fn render(snapshot: Snapshot, latency: &HealthLatency) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    registry.register(
        "gateway_build",
        "The daemon's version",
        Info::new([("version", env!("CARGO_PKG_VERSION"))]),
    );
    registry.register(
        "gateway_health_check_duration_seconds",
        "How long a health check took (TCP handshake, or the timeout), per app",
        latency.0.clone(),
    );
    registry.register_collector(Box::new(snapshot));
    let mut out = String::new();
    text::encode(&mut out, &registry)?;
    Ok(out)
}

/// Writes one metric family of constant values.
fn family<L: EncodeLabel>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: impl IntoIterator<Item = (Vec<L>, u64)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in rows {
        let e = m.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(v).encode(e)?,
            _ => ConstGauge::new(v as i64).encode(e)?,
        }
    }
    Ok(())
}

/// A family without labels.
fn single(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    v: u64,
) -> fmt::Result {
    let m = enc.encode_descriptor(name, help, None, kind)?;
    match kind {
        MetricType::Counter => ConstCounter::new(v).encode(m),
        _ => ConstGauge::new(v as i64).encode(m),
    }
}

const IN: &str = "in";
const OUT: &str = "out";

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// An app's or a backend's labels and figures.
struct Row<'a> {
    labels: Labels<'a>,
    traffic: &'a TrafficStats,
    active: u64,
}

/// A value of each row.
fn each<'a>(
    rows: &'a [Row<'a>],
    f: impl Fn(&Row) -> u64 + 'a,
) -> impl Iterator<Item = (Labels<'a>, u64)> + 'a {
    rows.iter().map(move |r| (r.labels.clone(), f(r)))
}

/// Two values of each row, labelled `direction="in"` and `"out"`.
fn both_ways<'a>(
    rows: &'a [Row<'a>],
    fin: fn(&TrafficStats) -> u64,
    fout: fn(&TrafficStats) -> u64,
) -> impl Iterator<Item = (Labels<'a>, u64)> + 'a {
    rows.iter().flat_map(move |r| {
        [(IN, fin(r.traffic)), (OUT, fout(r.traffic))].map(|(d, v)| {
            let mut l = r.labels.clone();
            l.push(("direction", d));
            (l, v)
        })
    })
}

fn backend_labels(b: &BackendRow) -> Labels<'_> {
    vec![("app", b.app.as_str()), ("backend", b.address.as_str())]
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        use MetricType::{Counter, Gauge};
        let e = &mut enc;
        let direction = "direction \"in\" is client to backend, \"out\" backend to client";

        let apps: Vec<Row> = self
            .apps
            .iter()
            .map(|a| Row {
                labels: vec![("app", a.name.as_str())],
                traffic: &a.traffic,
                active: a.active,
            })
            .collect();
        let backends: Vec<Row> = self
            .backends
            .iter()
            .map(|b| Row {
                labels: backend_labels(b),
                traffic: &b.traffic,
                active: b.active,
            })
            .collect();
        for (kind, rows) in [("app", &apps), ("backend", &backends)] {
            let whose = format!("the {kind}'s connections");
            family(
                e,
                &format!("gateway_{kind}_packets"),
                &format!("Packets of {whose}; {direction}"),
                Counter,
                both_ways(rows, |t| t.packets_in, |t| t.packets_out),
            )?;
            family(
                e,
                &format!("gateway_{kind}_bytes"),
                &format!("IPv4 bytes (headers included) of {whose}; {direction}"),
                Counter,
                both_ways(rows, |t| t.bytes_in, |t| t.bytes_out),
            )?;
            family(
                e,
                &format!("gateway_{kind}_connections"),
                &format!("New connections to the {kind} (SYNs given a backend)"),
                Counter,
                each(rows, |r| r.traffic.new_flows),
            )?;
            family(
                e,
                &format!("gateway_{kind}_active_connections"),
                &format!("Open connections to the {kind}, as of the last conntrack scan"),
                Gauge,
                each(rows, |r| r.active),
            )?;
        }
        family(
            e,
            "gateway_app_half_open_connections",
            "Open connections to the app whose handshake has not completed, as of the last conntrack scan (a SYN flood toward the app shows here)",
            Gauge,
            self.apps
                .iter()
                .map(|a| (vec![("app", a.name.as_str())], a.half_open)),
        )?;
        let backend = |f: fn(&BackendRow) -> u64| {
            self.backends.iter().map(move |b| (backend_labels(b), f(b)))
        };
        family(
            e,
            "gateway_backend_weight",
            "The backend's weight in its app's Maglev table",
            Gauge,
            backend(|b| u64::from(b.weight)),
        )?;
        family(
            e,
            "gateway_backend_state_changes",
            "Health state changes of the backend since the daemon started",
            Counter,
            backend(|b| b.state_changes),
        )?;
        family(
            e,
            "gateway_backend_ratelimit_pps",
            "The packets per second its app's rate limit allows the backend, each direction (0: no limit)",
            Gauge,
            backend(|b| b.rate_limit_pps),
        )?;
        family(
            e,
            "gateway_backend_ratelimit_burst",
            "The burst (packets) its app's rate limit allows the backend, each direction (0: no limit)",
            Gauge,
            backend(|b| b.rate_limit_burst),
        )?;
        family(
            e,
            "gateway_backend_ratelimit_dropped_packets",
            "Packets to (to_backend) or from (from_backend) the backend dropped over its app's rate limit",
            Counter,
            self.backends.iter().flat_map(|b| {
                ["to_backend", "from_backend"]
                    .into_iter()
                    .zip(b.rate_dropped)
                    .map(move |(direction, dropped)| {
                        let mut l = backend_labels(b);
                        l.push(("direction", direction));
                        (l, dropped)
                    })
            }),
        )?;
        family(
            e,
            "gateway_backend_state",
            "The backend's state: 1 for the current one (pending, active, unhealthy, draining)",
            Gauge,
            self.backends.iter().flat_map(|b| {
                BackendState::ALL.iter().map(move |s| {
                    let mut l = backend_labels(b);
                    l.push(("state", s.as_str()));
                    (l, u64::from(b.state == *s))
                })
            }),
        )?;

        family(
            e,
            "gateway_drops",
            "Packets the datapath dropped, by reason",
            Counter,
            DropReason::ALL
                .iter()
                .map(|r| (vec![("reason", r.label())], self.global.drops(*r))),
        )?;
        single(
            e,
            "gateway_snat_port_allocation_failures",
            "New connections refused for want of a free SNAT port (also in gateway_drops_total{reason=\"snat_exhausted\"})",
            Counter,
            self.global.drops(DropReason::SnatExhausted),
        )?;
        single(
            e,
            "gateway_snat_port_collisions",
            "SNAT port probes that found the port in use and tried another",
            Counter,
            self.global.get(GlobalStat::SnatCollisions),
        )?;
        single(
            e,
            "gateway_snat_port_reuses",
            "SNAT ports taken over from closed connections when no free port was found (idle 1 s, or 60 s when the backend closed first and holds TIME_WAIT)",
            Counter,
            self.global.get(GlobalStat::SnatReused),
        )?;
        family(
            e,
            "gateway_datapath_packets",
            "Packets each datapath program saw",
            Counter,
            [
                ("xdp", GlobalStat::XdpPackets),
                ("tc", GlobalStat::TcPackets),
            ]
            .map(|(p, s)| (vec![("program", p)], self.global.get(s))),
        )?;
        family(
            e,
            "gateway_translated_packets",
            &format!("Packets translated; {direction}"),
            Counter,
            [(IN, GlobalStat::Forwarded), (OUT, GlobalStat::Reversed)]
                .map(|(d, s)| (vec![("direction", d)], self.global.get(s))),
        )?;
        single(
            e,
            "gateway_passed_packets",
            "Packets not for the gateway, handed to the kernel unchanged",
            Counter,
            self.global.get(GlobalStat::Passed),
        )?;
        single(
            e,
            "gateway_flows_created",
            "Connections created by the datapath, all apps",
            Counter,
            self.global.get(GlobalStat::FlowsCreated),
        )?;
        single(
            e,
            "gateway_fib_lookups",
            "Next-hop lookups the datapath made",
            Counter,
            self.global.get(GlobalStat::FibLookups),
        )?;
        single(
            e,
            "gateway_neighbour_fallbacks",
            "Packets sent through the kernel's neighbour resolution",
            Counter,
            self.global.get(GlobalStat::NeighFallbacks),
        )?;
        single(
            e,
            "gateway_neighbour_revalidations",
            "Packets of flows whose next hop aged, sent through the kernel's neighbour output so that it revalidates the neighbour (a host that moved to another MAC is found again)",
            Counter,
            self.global.get(GlobalStat::NeighRevalidations),
        )?;
        single(
            e,
            "gateway_partial_checksums",
            "TCP segments XDP met with a partial checksum (a sender on this host with tx checksum offload on) and completed; the daemon's log names the interfaces",
            Counter,
            self.global.get(GlobalStat::PartialChecksums),
        )?;
        single(
            e,
            "gateway_no_flow_resets",
            "RSTs the datapath answered segments without a flow with (a connection it no longer has)",
            Counter,
            self.global.get(GlobalStat::RstNoFlow),
        )?;
        single(
            e,
            "gateway_in_window_resets",
            "RSTs inside the window but not exact: forwarded for a challenge ACK, the flow kept",
            Counter,
            self.global.get(GlobalStat::RstInWindow),
        )?;
        single(
            e,
            "gateway_rebalanced_syns",
            "SYNs of unfinished handshakes balanced afresh (backend stopped accepting, or a new ISN)",
            Counter,
            self.global.get(GlobalStat::SynRebalanced),
        )?;
        single(
            e,
            "gateway_syn_cookies_sent",
            "SYNs answered with a SYN cookie, no state kept: their app had its cap of half-open connections (a SYN flood)",
            Counter,
            self.global.get(GlobalStat::SynCookiesSent),
        )?;
        single(
            e,
            "gateway_syn_cookies_accepted",
            "ACKs that carried a valid SYN cookie: each made a connection through the SYN proxy",
            Counter,
            self.global.get(GlobalStat::SynCookiesAccepted),
        )?;
        single(
            e,
            "gateway_syn_proxy_established",
            "Connections through the SYN proxy whose backend answered: established",
            Counter,
            self.global.get(GlobalStat::SynProxyEstablished),
        )?;
        family(
            e,
            "gateway_icmp_errors_translated",
            "ICMP errors about connections translated and relayed to the connection's other end, by type: frag_needed (path MTU discovery), unreachable (other destination-unreachable codes), time_exceeded, param_problem",
            Counter,
            [
                ("frag_needed", GlobalStat::IcmpFragNeeded),
                ("unreachable", GlobalStat::IcmpUnreachable),
                ("time_exceeded", GlobalStat::IcmpTimeExceeded),
                ("param_problem", GlobalStat::IcmpParamProblem),
            ]
            .map(|(t, s)| (vec![("type", t)], self.global.get(s))),
        )?;
        single(
            e,
            "gateway_icmp_errors_no_flow",
            "ICMP errors to a gateway address quoting no connection the gateway has: handed to its kernel",
            Counter,
            self.global.get(GlobalStat::IcmpNoFlow),
        )?;
        single(
            e,
            "gateway_mss_clamped",
            "SYNs and SYN-ACKs whose MSS option was lowered to their app's MSS clamp",
            Counter,
            self.global.get(GlobalStat::MssClamped),
        )?;
        family(
            e,
            "gateway_toa",
            "The client's address for backends (TOA options, docs/client-address.md), by what happened: added (a client segment given the gateway's option, apps with --client-address toa), stripped (an option a client sent itself, removed: every app), skipped (a segment that went on without it: no room in its header, too large for the egress MTU with it, or a TC GSO packet)",
            Counter,
            [
                ("added", GlobalStat::ToaAdded),
                ("stripped", GlobalStat::ToaStripped),
                ("skipped", GlobalStat::ToaSkipped),
            ]
            .map(|(what, s)| (vec![("what", what)], self.global.get(s))),
        )?;

        single(
            e,
            "gateway_conntrack_entries",
            "Conntrack entries in use (two per connection), as of the last scan",
            Gauge,
            self.conntrack_entries,
        )?;
        single(
            e,
            "gateway_conntrack_capacity",
            "Conntrack entries the table holds; when full, new connections are refused (gateway_drops_total{reason=\"conntrack_full\"}), none is evicted",
            Gauge,
            self.conntrack_capacity,
        )?;
        family(
            e,
            "gateway_conntrack_connections",
            "Connections in the conntrack table (two entries each) by state, as of the last scan: half_open (handshake not completed), established, closing (a FIN one way), closed (RST or FIN both ways), time_wait (closed, the backend closed first: its SNAT port is kept 60 s)",
            Gauge,
            Phase::ALL.map(|p| {
                (
                    vec![("state", p.label())],
                    self.conntrack_connections.get(p),
                )
            }),
        )?;
        single(
            e,
            "gateway_conntrack_expired_entries",
            "Conntrack entries removed for being idle",
            Counter,
            self.daemon.conntrack_expired,
        )?;
        single(
            e,
            "gateway_conntrack_resets_sent",
            "RSTs sent to either end of the connections the daemon ended (app delete, backend remove --now, a drain deadline)",
            Counter,
            self.daemon.resets_sent,
        )?;
        single(
            e,
            "gateway_conntrack_reset_failures",
            "RSTs to the ends of ended connections that could not be sent",
            Counter,
            self.daemon.reset_failures,
        )?;
        single(
            e,
            "gateway_conntrack_scans",
            "Conntrack scans done",
            Counter,
            self.daemon.scans,
        )?;
        let m = e.encode_descriptor(
            "gateway_conntrack_scan_duration_seconds",
            "How long the last conntrack scan took",
            None,
            Gauge,
        )?;
        ConstGauge::new(self.daemon.scan_seconds).encode(m)?;
        let m = e.encode_descriptor(
            "gateway_conntrack_scan_timestamp_seconds",
            "When the last conntrack scan ended (Unix time)",
            None,
            Gauge,
        )?;
        ConstGauge::new(self.daemon.scan_timestamp).encode(m)?;

        single(
            e,
            "gateway_health_checks",
            "Health checks run",
            Counter,
            self.daemon.health_checks,
        )?;
        single(
            e,
            "gateway_health_check_failures",
            "Health checks failed",
            Counter,
            self.daemon.health_checks_failed,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_becomes_prometheus_text() {
        let om = "# HELP a_build The version.\n# TYPE a_build info\na_build_info{version=\"1\"} 1\n\
                  # HELP a_drops Drops.\n# TYPE a_drops counter\na_drops_total{reason=\"x\"} 3\n\
                  # HELP a_open Open.\n# TYPE a_open gauge\na_open 2\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP a_build_info The version.\n# TYPE a_build_info gauge\na_build_info{version=\"1\"} 1\n\
             # HELP a_drops_total Drops.\n# TYPE a_drops_total counter\na_drops_total{reason=\"x\"} 3\n\
             # HELP a_open Open.\n# TYPE a_open gauge\na_open 2\n"
        );
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
        )));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(None));
    }

    #[test]
    fn table_pressure_series() {
        let snapshot = Snapshot {
            apps: vec![AppRow {
                name: "web".to_owned(),
                traffic: TrafficStats::default(),
                active: 9,
                half_open: 4,
            }],
            backends: Vec::new(),
            global: GlobalStats::with_drops(&[
                (DropReason::ConntrackFull, 7),
                (DropReason::SnatExhausted, 2),
            ]),
            conntrack_entries: 24,
            conntrack_capacity: 1024,
            conntrack_connections: Phases {
                half_open: 4,
                established: 3,
                closing: 2,
                closed: 2,
                time_wait: 1,
            },
            daemon: DaemonFigures::default(),
        };
        let text = to_prometheus_text(&render(snapshot, &HealthLatency::default()).unwrap());
        for line in [
            "gateway_app_half_open_connections{app=\"web\"} 4",
            "gateway_app_active_connections{app=\"web\"} 9",
            "gateway_conntrack_connections{state=\"half_open\"} 4",
            "gateway_conntrack_connections{state=\"established\"} 3",
            "gateway_conntrack_connections{state=\"closing\"} 2",
            "gateway_conntrack_connections{state=\"closed\"} 2",
            "gateway_conntrack_connections{state=\"time_wait\"} 1",
            "gateway_conntrack_entries 24",
            "gateway_conntrack_capacity 1024",
            "gateway_drops_total{reason=\"conntrack_full\"} 7",
            "gateway_drops_total{reason=\"snat_exhausted\"} 2",
            "gateway_snat_port_allocation_failures_total 2",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
    }

    #[test]
    fn backend_rate_limit_series() {
        let row = |address: &str, pps, burst, rate_dropped| BackendRow {
            app: "web".to_owned(),
            address: address.to_owned(),
            state: BackendState::Active,
            weight: 1,
            traffic: TrafficStats::default(),
            active: 0,
            state_changes: 0,
            rate_limit_pps: pps,
            rate_limit_burst: burst,
            rate_dropped,
        };
        let snapshot = Snapshot {
            apps: Vec::new(),
            backends: vec![
                row("10.0.0.2:8080", 1000, 100, [17, 4]),
                row("10.0.0.3:8080", 0, 0, [0, 0]),
            ],
            global: GlobalStats::with_drops(&[]),
            conntrack_entries: 0,
            conntrack_capacity: 0,
            conntrack_connections: Phases::default(),
            daemon: DaemonFigures::default(),
        };
        let text = to_prometheus_text(&render(snapshot, &HealthLatency::default()).unwrap());
        let b = |addr: &str| format!("app=\"web\",backend=\"{addr}\"");
        for line in [
            format!(
                "gateway_backend_ratelimit_pps{{{}}} 1000",
                b("10.0.0.2:8080")
            ),
            format!(
                "gateway_backend_ratelimit_burst{{{}}} 100",
                b("10.0.0.2:8080")
            ),
            format!("gateway_backend_ratelimit_pps{{{}}} 0", b("10.0.0.3:8080")),
            format!(
                "gateway_backend_ratelimit_dropped_packets_total{{{},direction=\"to_backend\"}} 17",
                b("10.0.0.2:8080")
            ),
            format!(
                "gateway_backend_ratelimit_dropped_packets_total{{{},direction=\"from_backend\"}} 4",
                b("10.0.0.2:8080")
            ),
            format!(
                "gateway_backend_ratelimit_dropped_packets_total{{{},direction=\"to_backend\"}} 0",
                b("10.0.0.3:8080")
            ),
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
    }

    #[test]
    fn every_datapath_counter_has_a_series() {
        let value = |i: usize| 7_000_001 + i as u64;
        let counters: Vec<(GlobalStat, u64)> = GlobalStat::ALL
            .iter()
            .enumerate()
            .map(|(i, s)| (*s, value(i)))
            .collect();
        let snapshot = Snapshot {
            apps: Vec::new(),
            backends: Vec::new(),
            global: GlobalStats::with_counters(&counters),
            conntrack_entries: 0,
            conntrack_capacity: 0,
            conntrack_connections: Phases::default(),
            daemon: DaemonFigures::default(),
        };
        let text = to_prometheus_text(&render(snapshot, &HealthLatency::default()).unwrap());
        let missing: Vec<&str> = counters
            .iter()
            .filter(|(_, v)| {
                !text
                    .lines()
                    .any(|l| !l.starts_with('#') && l.ends_with(&format!(" {v}")))
            })
            .map(|(s, _)| s.label())
            .collect();
        assert!(missing.is_empty(), "counters without a series: {missing:?}");
    }
}
