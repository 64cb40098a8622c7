//! Health orchestration: one check task per backend that is not draining (the checks
//! themselves are `crate::health`), their reports turned into backend state changes when rise
//! or fall is reached, each committed like any other change.

use std::{collections::HashMap, net::SocketAddrV4};

use tracing::{info, warn};

use super::{Core, now_ms};
use crate::{
    health::{self, Report},
    state::{BackendState, HealthConfig},
};

/// One backend's running health check.
pub(super) struct Check {
    addr: SocketAddrV4,
    cfg: HealthConfig,
    task: tokio::task::AbortHandle,
}

impl Core {
    /// Runs one check task per backend that is not draining, with its app's settings.
    pub(super) fn sync_checks(&mut self) {
        let mut want: HashMap<u32, (SocketAddrV4, HealthConfig)> = HashMap::new();
        for app in self.state.apps.values() {
            let cfg = self.health_of(app);
            for b in &app.backends {
                if b.state != BackendState::Draining {
                    want.insert(b.id, (b.addr, cfg));
                }
            }
        }
        self.checks.retain(|id, c| {
            let keep = want.get(id) == Some(&(c.addr, c.cfg));
            if !keep {
                c.task.abort();
            }
            keep
        });
        self.tracks.retain(|id, _| want.contains_key(id));
        // Counts of backends that are gone (draining ones keep theirs until they go).
        let state = &self.state;
        self.health_changes
            .retain(|id, _| state.backend_by_id(*id).is_some());
        for (id, (addr, cfg)) in want {
            if !self.checks.contains_key(&id) {
                let task = self
                    .runtime
                    .spawn(health::check_loop(id, addr, cfg, self.reports.clone()))
                    .abort_handle();
                self.checks.insert(id, Check { addr, cfg, task });
            }
        }
    }

    /// Stops every check (the daemon is exiting).
    pub(super) fn stop_checks(&mut self) {
        for check in self.checks.values() {
            check.task.abort();
        }
        self.checks.clear();
    }

    /// Records one check's result and moves the backend's state when rise or fall is reached.
    pub(super) fn health_report(&mut self, r: Report) {
        let Some((name, b)) = self.state.backend_by_id(r.backend_id) else {
            return;
        };
        let (name, from, held, addr) = (name.to_owned(), b.state, b.held, b.addr);
        let Ok(app) = self.state.app(&name) else {
            return;
        };
        let cfg = self.health_of(app);
        self.latency.observe(&name, r.latency.as_secs_f64());
        self.checks_run += 1;
        self.checks_failed += u64::from(!r.ok);
        let track = self.tracks.entry(r.backend_id).or_default();
        track.record(r.ok);
        let Some(to) = track.transition(from, held, &cfg) else {
            return;
        };
        let mut next = self.state.clone();
        next.set_backend_state(r.backend_id, to, now_ms());
        *self.health_changes.entry(r.backend_id).or_default() += 1;
        match self.commit(&name, next) {
            Ok(()) if to == BackendState::Active => {
                info!(app = name, backend = %addr, from = from.as_str(), to = to.as_str(), latency_ms = r.latency.as_millis() as u64, "backend healthy: it gets new connections");
            }
            Ok(()) => {
                warn!(app = name, backend = %addr, from = from.as_str(), to = to.as_str(), failures = cfg.fall, "backend failed its health checks: no new connections");
            }
            Err(e) => {
                warn!(app = name, backend = %addr, error = e.chain(), "backend state change failed")
            }
        }
    }
}
