//! Rotation, the product's headline: a deploy holds the new backends until a quorum of them is
//! healthy, switches the app's table to them in one map update and drains the others; a
//! removed backend drains too. A drain ends when its backend has no open connection left, or
//! at its deadline, when the remaining connections are ended.

use std::{net::SocketAddrV4, time::Duration};

use tracing::{info, warn};

use super::{Core, Daemon, DaemonError, now_ms, resets::Whose};
use crate::{
    api::{AppView, BackendView, Deploy, RemoveBackend},
    state::{self, BackendState, StateError, WEIGHT_DEFAULT},
};

/// How often draining backends are looked at (their open connections counted).
const DRAIN_TICK: Duration = Duration::from_millis(250);
/// How often a deploy looks at its new backends' health.
const DEPLOY_TICK: Duration = Duration::from_millis(50);

impl Core {
    /// Ends the drains that are over: a draining backend goes once it has no open connection,
    /// or at its deadline, when its remaining connections are ended.
    fn drain_tick(&mut self) -> Result<(), DaemonError> {
        let draining: Vec<(String, u32, SocketAddrV4, u64, Option<u64>)> = self
            .state
            .apps
            .iter()
            .flat_map(|(name, app)| {
                app.backends
                    .iter()
                    .filter(|b| b.state == BackendState::Draining)
                    .map(|b| (name.clone(), b.id, b.addr, b.since_ms, b.drain_until_ms))
            })
            .collect();
        let now = now_ms();
        for (name, id, addr, since, until) in draining {
            // Only a scan begun after the drain began can tell it has no connection left.
            let open = self.scan.counts.backends.get(&id).copied().unwrap_or(0);
            let drained = self.scan.started_ms > since && open == 0;
            let expired = until.is_some_and(|u| now >= u);
            if !drained && !expired {
                continue;
            }
            let mut next = self.state.clone();
            next.remove_backend(&name, addr)?;
            self.commit(&name, next)?;
            if drained {
                info!(app = name, backend = %addr, "backend drained: no connection left; it is gone");
            } else {
                // A failure to end them must not stop the other drains: the backend is gone.
                match self.end_committed(Whose::Backend(id)) {
                    Some(ended) => {
                        warn!(app = name, backend = %addr, connections = ended.connections, resets = ended.resets, "drain timeout: the backend's remaining connections were ended ({} RSTs sent); it is gone", ended.resets)
                    }
                    None => {
                        warn!(app = name, backend = %addr, "drain timeout: the backend is gone; its remaining connections expire on their own")
                    }
                }
            }
        }
        Ok(())
    }
}

impl Daemon {
    /// Looks at the drains every [`DRAIN_TICK`] until aborted.
    pub(super) async fn drain_loop(self) {
        let mut tick = tokio::time::interval(DRAIN_TICK);
        loop {
            tick.tick().await;
            if let Err(e) = self.with(|c| c.drain_tick()).await {
                warn!(error = e.chain(), "ending drains failed");
            }
        }
    }

    /// Removes backend `address` of app `name`: it drains (no new connections; open ones go on
    /// until they close or the drain timeout), or with `q.now` goes at once and its connections
    /// end. Answers the backend as it was; with `q.now`, with the connections just ended.
    pub async fn remove_backend(
        &self,
        name: String,
        address: String,
        q: RemoveBackend,
    ) -> Result<BackendView, DaemonError> {
        if self.cluster.is_some() {
            return self.cluster_remove_backend(name, address, q).await;
        }
        self.with(move |c| {
            c.state.app(&name)?;
            let addr = state::parse_backend(&address)?;
            let mut next = c.state.clone();
            let counts = c.counts();
            if q.now {
                let backend = next.remove_backend(&name, addr)?;
                c.commit(&name, next)?;
                let mut view = c.backend_view(&backend, &counts);
                // Committed: the request succeeded even if its connections could not be ended.
                match c.end_committed(Whose::Backend(backend.id)) {
                    Some(ended) => {
                        info!(app = name, backend = %addr, connections = ended.connections, resets = ended.resets, "backend removed now; its connections were ended ({} RSTs sent)", ended.resets);
                        // The connections this removal ended, not those of the last scan.
                        view.connections = ended.connections as u64;
                    }
                    None => {
                        warn!(app = name, backend = %addr, "backend removed now; its connections expire on their own")
                    }
                }
                return Ok(view);
            }
            let timeout = q
                .drain_timeout_ms
                .unwrap_or(c.settings.drain_timeout.as_millis() as u64);
            let now = now_ms();
            let backend = next.drain_backend(&name, addr, now, now + timeout)?;
            c.commit(&name, next)?;
            info!(app = name, backend = %addr, drain_timeout_ms = timeout, "backend draining: no new connections; open ones go on");
            Ok(c.backend_view(&backend, &counts))
        })
        .await
    }

    /// Replaces app `name`'s backends: the new ones are added pending; once `quorum` of them
    /// are healthy the table switches to them in one update and the others drain. Answers once
    /// switched, or with [`StateError::DeployTimeout`] once the deploy timed out and was rolled
    /// back. The wait runs as a task of its own: a client that goes away (a CLI killed
    /// mid-deploy) does not leave the deploy half done; it still switches or aborts.
    pub async fn deploy(&self, name: String, req: Deploy) -> Result<AppView, DaemonError> {
        if self.cluster.is_some() {
            return self.cluster_deploy(name, req).await;
        }
        let addrs = req
            .backends
            .iter()
            .map(|a| state::parse_backend(a))
            .collect::<Result<Vec<_>, _>>()?;
        let weight = req.weight.unwrap_or(WEIGHT_DEFAULT);
        state::check_weight(weight)?;
        let rollout = self
            .with(move |c| {
                c.start_rollout(
                    &name,
                    addrs,
                    weight,
                    req.quorum,
                    req.timeout_ms,
                    req.drain_timeout_ms,
                )
            })
            .await?;
        self.run_rollout(rollout).await
    }

    /// Waits for `rollout` (started by [`Core::start_rollout`]) to switch or abort, in a task
    /// of its own (a caller that goes away does not leave it half done).
    pub(super) async fn run_rollout(&self, rollout: Rollout) -> Result<AppView, DaemonError> {
        let start = tokio::time::Instant::now();
        let daemon = self.clone();
        let rollout = std::sync::Arc::new(rollout);
        let wait = tokio::spawn(async move {
            loop {
                let r = rollout.clone();
                let done = daemon
                    .with(move |c| c.deploy_step(&r, start.elapsed()))
                    .await?;
                if let Some(view) = done {
                    return Ok(view);
                }
                tokio::time::sleep(DEPLOY_TICK).await;
            }
        });
        wait.await?
    }
}

impl Core {
    /// Starts a deploy of app `n` to `addrs`: the new ones are added pending and held.
    pub(super) fn start_rollout(
        &mut self,
        n: &str,
        addrs: Vec<SocketAddrV4>,
        weight: u32,
        quorum: Option<usize>,
        timeout_ms: Option<u64>,
        drain_timeout_ms: Option<u64>,
    ) -> Result<Rollout, DaemonError> {
        self.state.app(n)?;
        let mut next = self.state.clone();
        let held: Vec<u32> = next
            .begin_deploy(n, &addrs, weight, now_ms())?
            .iter()
            .map(|b| b.id)
            .collect();
        let quorum = quorum.unwrap_or(held.len());
        if quorum > held.len() || (quorum == 0 && !held.is_empty()) {
            return Err(StateError::Quorum {
                quorum,
                new: held.len(),
            }
            .into());
        }
        self.commit(n, next)?;
        let rollout = Rollout {
            timeout: timeout_ms.map_or(self.settings.deploy_timeout, Duration::from_millis),
            drain_ms: drain_timeout_ms.unwrap_or(self.settings.drain_timeout.as_millis() as u64),
            name: n.to_owned(),
            addrs,
            held,
            quorum,
        };
        info!(
            app = rollout.name,
            new = rollout.held.len(),
            quorum,
            "deploy started: new backends pending"
        );
        Ok(rollout)
    }
}

/// A deploy between its start and its switch or abort.
pub(super) struct Rollout {
    /// The app.
    name: String,
    /// Its backends once switched.
    addrs: Vec<SocketAddrV4>,
    /// The ids of the new backends, held out of rotation until the switch.
    held: Vec<u32>,
    /// How many of `held` must be healthy to switch.
    quorum: usize,
    /// How long to wait for them before aborting.
    timeout: Duration,
    /// How long the replaced backends drain (ms).
    drain_ms: u64,
}

impl Core {
    /// One look at deploy `r` after `waited`: switches once a quorum of its new backends is
    /// healthy (answering the app), aborts once `waited` reaches its timeout, else answers
    /// `None`.
    fn deploy_step(
        &mut self,
        r: &Rollout,
        waited: Duration,
    ) -> Result<Option<AppView>, DaemonError> {
        let n = r.name.as_str();
        let cfg = self.health_of(self.state.app(n)?);
        let healthy: Vec<u32> = r
            .held
            .iter()
            .copied()
            .filter(|id| self.tracks.get(id).is_some_and(|t| t.risen(&cfg)))
            .collect();
        if healthy.len() >= r.quorum {
            let mut next = self.state.clone();
            let now = now_ms();
            next.switch_deploy(n, &r.addrs, &healthy, now, now + r.drain_ms)?;
            self.commit(n, next)?;
            info!(
                app = n,
                healthy = healthy.len(),
                waited_ms = waited.as_millis() as u64,
                "deploy switched: new connections go to the new backends, the old ones drain"
            );
            let app = self.state.app(n)?.clone();
            let counts = self.counts();
            return Ok(Some(self.app_view(n, &app, &counts)));
        }
        if waited >= r.timeout {
            let mut next = self.state.clone();
            next.abort_deploy(n)?;
            self.commit(n, next)?;
            // Cluster mode: the generation this node ran is aborted, in the same step as the
            // abort itself (a writer waiting for it never sees the one without the other).
            if let Some(g) = self.deploy_generations.get(n).copied() {
                self.aborted_deploys.insert(n.to_owned(), g);
            }
            let err = StateError::DeployTimeout {
                app: n.to_owned(),
                healthy: healthy.len(),
                new: r.held.len(),
                quorum: r.quorum,
                waited_ms: waited.as_millis() as u64,
            };
            warn!("{err}");
            return Err(err.into());
        }
        Ok(None)
    }
}
