//! The agent's Prometheus metrics (`GET /metrics` on `--metrics`), read from its maps at each
//! scrape: a counter `gateway_agent_<label>_total` per [`AgentStat`], and gauges of the
//! sockets mapped now, the socket map's size, the trusted sources and the attached programs.
//! OpenMetrics or the Prometheus text format by the request's `Accept`, as the daemon's.

use std::{
    fmt,
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode, header::CONTENT_TYPE},
    response::{IntoResponse, Response},
    routing::get,
};
use gateway_common::agent::AgentStat;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _, text},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge, info::Info},
    registry::Registry,
};

use super::kernel::AgentMaps;
use crate::metrics::{
    CONTENT_TYPE as OPENMETRICS, CONTENT_TYPE_TEXT, to_prometheus_text, wants_openmetrics,
};

/// The figures of one scrape.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub counters: Vec<(AgentStat, u64)>,
    pub mapped: u64,
    pub capacity: u64,
    pub trusted: u64,
    pub programs: u64,
}

impl Snapshot {
    /// Reads `maps`; `programs` is how many programs the agent attached.
    pub fn read(maps: &AgentMaps, programs: usize) -> Result<Self, super::AgentError> {
        Ok(Snapshot {
            counters: maps.counters()?,
            mapped: maps.mapped() as u64,
            capacity: u64::from(maps.capacity),
            trusted: maps.trusted()?.len() as u64,
            programs: programs as u64,
        })
    }
}

/// The help text of each counter.
fn help(stat: AgentStat) -> &'static str {
    match stat {
        AgentStat::Established => {
            "Accepted IPv4 connections (of IPv4 or dual-stack sockets) the agent saw become established"
        }
        AgentStat::Trusted => {
            "Of those, connections from a trusted source (a gateway SNAT address)"
        }
        AgentStat::Mapped => "Connections mapped to the client address of their TOA option",
        AgentStat::TrustedWithoutOption => {
            "Connections from a trusted source without a TOA option (left as they are)"
        }
        AgentStat::UntrustedOption => {
            "Connections from an untrusted source with a TOA option (ignored)"
        }
        AgentStat::GetpeernameRewritten => {
            "getpeername() and accept() answers rewritten to a client address"
        }
        AgentStat::Closed => "Mapped connections that closed (their mapping removed)",
        AgentStat::InsertFailed => "Connections whose mapping could not be stored",
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        for &(stat, n) in &self.counters {
            let name = format!("gateway_agent_{}", stat.label());
            let m = enc.encode_descriptor(&name, help(stat), None, MetricType::Counter)?;
            ConstCounter::new(n).encode(m)?;
        }
        let gauges = [
            (
                "gateway_agent_connections_mapped",
                "Sockets mapped to a client address now",
                self.mapped,
            ),
            (
                "gateway_agent_connections_capacity",
                "Sockets the agent maps at most (the least recently used mapping goes beyond)",
                self.capacity,
            ),
            (
                "gateway_agent_trusted_sources",
                "Sources whose TOA options the agent believes",
                self.trusted,
            ),
            (
                "gateway_agent_programs_attached",
                "The agent's programs attached to its cgroup",
                self.programs,
            ),
        ];
        for (name, help, v) in gauges {
            let m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(v as i64).encode(m)?;
        }
        Ok(())
    }
}

/// Encodes `snapshot` and the build info as OpenMetrics text.
pub fn render(snapshot: Snapshot) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    registry.register(
        "gateway_agent_build",
        "The agent's version",
        Info::new([("version", env!("CARGO_PKG_VERSION"))]),
    );
    registry.register_collector(Box::new(snapshot));
    let mut out = String::new();
    text::encode(&mut out, &registry)?;
    Ok(out)
}

/// What the metrics endpoint reads.
#[derive(Clone)]
pub struct Source {
    pub maps: Arc<Mutex<AgentMaps>>,
    pub programs: usize,
}

async fn get_metrics(State(source): State<Source>, headers: HeaderMap) -> Response {
    let rendered = tokio::task::spawn_blocking(move || {
        let maps = source.maps.lock().unwrap_or_else(|p| p.into_inner());
        let snapshot = Snapshot::read(&maps, source.programs).map_err(|e| format!("{e:#}"))?;
        render(snapshot).map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    match rendered {
        Ok(text) => {
            let accept = headers.get("accept").and_then(|v| v.to_str().ok());
            if wants_openmetrics(accept) {
                ([(CONTENT_TYPE, OPENMETRICS)], text).into_response()
            } else {
                (
                    [(CONTENT_TYPE, CONTENT_TYPE_TEXT)],
                    to_prometheus_text(&text),
                )
                    .into_response()
            }
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e).into_response(),
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, source: Source) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(get_metrics))
        .with_state(source);
    axum::serve(listener, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_gauges_have_the_documented_names() {
        let snapshot = Snapshot {
            counters: AgentStat::ALL.iter().map(|&s| (s, 2)).collect(),
            mapped: 1,
            capacity: 65_536,
            trusted: 1,
            programs: 2,
        };
        let text = to_prometheus_text(&render(snapshot).unwrap());
        for line in [
            "gateway_agent_established_total 2",
            "gateway_agent_mapped_total 2",
            "gateway_agent_untrusted_options_total 2",
            "gateway_agent_getpeername_rewritten_total 2",
            "gateway_agent_closed_total 2",
            "gateway_agent_connections_mapped 1",
            "gateway_agent_connections_capacity 65536",
            "# TYPE gateway_agent_mapped_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
