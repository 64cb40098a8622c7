//! TCP health checks, as keepalived's TCP_CHECK and HAProxy's `check`: a handshake to the
//! backend every interval, within a timeout; `rise` successes in a row make it healthy, `fall`
//! failures in a row unhealthy. The checks run from the daemon's own addresses, never from the
//! SNAT port range, so the datapath passes their replies to the kernel untouched.

use std::{net::SocketAddrV4, time::Duration};

use tokio::{net::TcpStream, sync::mpsc, time};

use crate::state::{BackendState, HealthConfig};

/// The outcome of one check.
#[derive(Clone, Copy, Debug)]
pub struct Report {
    pub backend_id: u32,
    pub ok: bool,
    pub latency: Duration,
}

/// Consecutive results of one backend's checks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Track {
    pub successes: u32,
    pub failures: u32,
}

impl Track {
    pub fn record(&mut self, ok: bool) {
        if ok {
            self.successes = self.successes.saturating_add(1);
            self.failures = 0;
        } else {
            self.failures = self.failures.saturating_add(1);
            self.successes = 0;
        }
    }

    /// Whether `rise` checks in a row passed.
    pub fn risen(&self, cfg: &HealthConfig) -> bool {
        self.successes >= cfg.rise
    }

    /// The state a backend in `state` moves to after this track, if it moves. A backend held
    /// by a deploy does not move: the deploy decides.
    pub fn transition(
        &self,
        state: BackendState,
        held: bool,
        cfg: &HealthConfig,
    ) -> Option<BackendState> {
        use BackendState::*;
        match state {
            Pending if !held && self.risen(cfg) => Some(Active),
            Active if self.failures >= cfg.fall => Some(Unhealthy),
            Unhealthy if self.risen(cfg) => Some(Active),
            _ => None,
        }
    }
}

/// Checks `addr` every `cfg.interval_ms` (the first at once) until aborted, sending each
/// outcome to `reports`; stops when nobody receives them any more.
pub async fn check_loop(
    backend_id: u32,
    addr: SocketAddrV4,
    cfg: HealthConfig,
    reports: mpsc::UnboundedSender<Report>,
) {
    let mut tick = time::interval(Duration::from_millis(cfg.interval_ms));
    tick.set_missed_tick_behavior(time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let start = time::Instant::now();
        let timeout = Duration::from_millis(cfg.timeout_ms);
        // The handshake is the check; the connection is closed at once.
        let ok = matches!(
            time::timeout(timeout, TcpStream::connect(addr)).await,
            Ok(Ok(_))
        );
        let report = Report {
            backend_id,
            ok,
            latency: start.elapsed(),
        };
        if reports.send(report).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use BackendState::*;

    #[test]
    fn rise_and_fall_count_results_in_a_row() {
        let cfg = HealthConfig {
            rise: 2,
            fall: 3,
            ..HealthConfig::default()
        };
        let mut t = Track::default();
        t.record(true);
        assert_eq!(t.transition(Pending, false, &cfg), None);
        t.record(true);
        assert_eq!(t.transition(Pending, false, &cfg), Some(Active));
        assert_eq!(t.transition(Pending, true, &cfg), None, "held by a deploy");
        assert!(t.risen(&cfg));
        for _ in 0..2 {
            t.record(false);
            assert_eq!(t.transition(Active, false, &cfg), None);
        }
        t.record(true); // a success resets the failures
        t.record(false);
        t.record(false);
        assert_eq!(t.transition(Active, false, &cfg), None);
        t.record(false);
        assert_eq!(t.transition(Active, false, &cfg), Some(Unhealthy));
        t.record(true);
        assert_eq!(t.transition(Unhealthy, false, &cfg), None);
        t.record(true);
        assert_eq!(t.transition(Unhealthy, false, &cfg), Some(Active));
        assert_eq!(
            t.transition(Draining, false, &cfg),
            None,
            "a draining backend stays"
        );
    }
}
