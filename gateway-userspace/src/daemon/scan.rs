//! Conntrack scans and what they feed: the periodic walk of the table that expires idle flows
//! and counts open connections (status, metrics and drains read those counts instead of walking
//! the table), per-app rates between two scans, the flow listing and the metrics snapshot.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use gateway_common::maps::TrafficStats;

use super::{Core, Daemon, DaemonError, now_ms};
use crate::{
    api::{FlowList, FlowQuery, Rates},
    datapath::{self, ConnectionCounts, Scan, Timeouts},
    flows,
    metrics::{self, DaemonFigures, Snapshot},
    state,
};

/// The periodic conntrack scan's findings: open connections (status, metrics and drains read
/// these instead of walking the table) and per-app rates between two scans.
#[derive(Default)]
pub(super) struct ScanState {
    /// When the last scan began (Unix ms): a drain trusts only a scan begun after it.
    pub started_ms: u64,
    /// When it ended (Unix ms); 0 before the first.
    pub ended_ms: u64,
    pub took: Duration,
    pub counts: ConnectionCounts,
    pub scans: u64,
    /// Entries expired since the daemon started.
    pub expired: u64,
    /// Per-app traffic at the last scan, and when it was read, for the rates.
    traffic: HashMap<u32, TrafficStats>,
    traffic_at: Option<Instant>,
    pub rates: HashMap<u32, Rates>,
    /// The same per backend, of the apps with a rate limit only (the others cost nothing
    /// more): packets per second to the backend and from it, between the last two scans.
    backend_traffic: HashMap<u32, TrafficStats>,
    pub backend_pps: HashMap<u32, (f64, f64)>,
}

impl Core {
    /// Takes in a scan begun at `started_ms` that took `took`, and samples every app's
    /// traffic for the rates.
    fn scanned(&mut self, started_ms: u64, took: Duration, scan: Scan) -> Result<(), DaemonError> {
        let s = &mut self.scan;
        s.started_ms = started_ms;
        s.ended_ms = now_ms();
        s.took = took;
        s.counts = scan.counts;
        s.scans += 1;
        s.expired += scan.removed as u64;
        // The datapath's half-open counts, set to what the walk found (it counts on from there;
        // this corrects what it cannot see: flows that expired, closed or started over), and
        // all apps' together in slot 0.
        let half_open = &self.scan.counts.half_open;
        for app in self.state.apps.values() {
            let n = half_open.get(&app.id).copied().unwrap_or(0);
            self.datapath.set_half_open(app.id, n as i64)?;
        }
        let all: u64 = half_open.values().sum();
        self.datapath.set_half_open(0, all as i64)?;
        let now = Instant::now();
        let mut traffic = HashMap::new();
        let mut backend_traffic = HashMap::new();
        for app in self.state.apps.values() {
            traffic.insert(app.id, self.datapath.app_stats(app.id)?);
            if app.rate_limit.is_some() {
                for b in &app.backends {
                    backend_traffic.insert(b.id, self.datapath.backend_stats(b.id)?);
                }
            }
        }
        let s = &mut self.scan;
        if let Some(at) = s.traffic_at {
            let secs = now.duration_since(at).as_secs_f64().max(1e-3);
            s.rates = traffic
                .iter()
                .map(|(id, t)| {
                    let p = s.traffic.get(id).copied().unwrap_or_default();
                    let per = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
                    let rates = Rates {
                        connections: per(t.new_flows, p.new_flows),
                        packets: per(t.packets_in + t.packets_out, p.packets_in + p.packets_out),
                        bytes: per(t.bytes_in + t.bytes_out, p.bytes_in + p.bytes_out),
                    };
                    (*id, rates)
                })
                .collect();
            // Only backends sampled at the last scan too: one of an app that has just got a
            // limit has counters since it was added, not since then (0 until the next scan).
            s.backend_pps = backend_traffic
                .iter()
                .filter_map(|(id, t)| {
                    let p = s.backend_traffic.get(id)?;
                    let per = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
                    Some((
                        *id,
                        (
                            per(t.packets_in, p.packets_in),
                            per(t.packets_out, p.packets_out),
                        ),
                    ))
                })
                .collect();
        }
        s.backend_traffic = backend_traffic;
        s.traffic = traffic;
        s.traffic_at = Some(now);
        Ok(())
    }

    /// What a metrics scrape reports.
    fn snapshot(&self) -> Result<Snapshot, DaemonError> {
        let daemon = DaemonFigures {
            conntrack_expired: self.scan.expired,
            resets_sent: self.resets.sent,
            reset_failures: self.resets.failed,
            scans: self.scan.scans,
            scan_seconds: self.scan.took.as_secs_f64(),
            scan_timestamp: self.scan.ended_ms as f64 / 1000.0,
            health_checks: self.checks_run,
            health_checks_failed: self.checks_failed,
            state_changes: self.health_changes.clone(),
        };
        Ok(Snapshot::read(
            &self.state,
            &self.datapath,
            &self.scan.counts,
            daemon,
        )?)
    }
}

impl Daemon {
    /// One conntrack scan: expires idle flows and counts the rest, walking the table on a
    /// blocking thread without the core's lock, then hands the result to the core. Returns how
    /// long the walk took.
    pub(super) async fn scan_once(&self) -> Result<Duration, DaemonError> {
        let started_ms = now_ms();
        let t0 = Instant::now();
        let ct = self.conntrack.clone();
        let scan = tokio::task::spawn_blocking(move || {
            let mut ct = ct.lock().unwrap_or_else(|p| p.into_inner());
            ct.scan(datapath::monotonic_ns(), &Timeouts::default())
        })
        .await??;
        let took = t0.elapsed();
        let removed = scan.removed;
        self.with(move |c| c.scanned(started_ms, took, scan))
            .await?;
        if removed > 0 {
            tracing::debug!(entries = removed, "expired flows collected");
        }
        Ok(took)
    }

    /// Scans every `interval`, stretched to 10× a scan's duration so that a huge table costs
    /// at most a tenth of a core. Runs until aborted.
    pub(super) async fn scan_loop(self, interval: Duration) {
        let mut wait = interval;
        loop {
            tokio::time::sleep(wait).await;
            wait = match self.scan_once().await {
                Ok(took) => interval.max(took * 10),
                Err(e) => {
                    tracing::warn!(error = e.chain(), "conntrack scan failed");
                    interval
                }
            };
        }
    }

    /// The live connections that match `q` (`GET /v1/flows`), read from the table itself.
    pub async fn flows(&self, q: FlowQuery) -> Result<FlowList, DaemonError> {
        let backend = q.backend.as_deref().map(state::parse_backend).transpose()?;
        let app = q.app;
        let (names, app_id) = self
            .with(move |c| {
                let app_id = match &app {
                    Some(name) => Some(c.state.app(name)?.id),
                    None => None,
                };
                let names: HashMap<u32, String> = c
                    .state
                    .apps
                    .iter()
                    .map(|(n, a)| (a.id, n.clone()))
                    .collect();
                Ok((names, app_id))
            })
            .await?;
        let filter = flows::Filter {
            app_id,
            backend,
            limit: q.limit,
        };
        let ct = self.conntrack.clone();
        Ok(tokio::task::spawn_blocking(move || {
            let ct = ct.lock().unwrap_or_else(|p| p.into_inner());
            flows::list(&ct, filter, &names, datapath::monotonic_ns())
        })
        .await??)
    }

    /// The metrics exposition (OpenMetrics text), as of the last scan and the live counters.
    pub async fn metrics(&self) -> Result<String, DaemonError> {
        let (snapshot, latency) = self
            .with(|c| Ok((c.snapshot()?, c.latency.clone())))
            .await?;
        metrics::render(snapshot, &latency).map_err(DaemonError::Metrics)
    }
}
