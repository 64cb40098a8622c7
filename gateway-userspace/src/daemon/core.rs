//! The daemon's core: its settings, the desired state and its file, the datapath, the health
//! checks and the last conntrack scan, behind one lock. Every change of the desired state goes
//! through [`Core::commit`]: the datapath first, then the file, all or nothing.

use std::{collections::HashMap, net::SocketAddrV4};

use gateway_common::maps;
use tokio::sync::mpsc;
use tracing::warn;

use super::{DaemonError, health::Check, resets::Resets, scan::ScanState};
use crate::{
    api::{AppView, AttachmentView, BackendView},
    config::Settings,
    datapath::{ConnectionCounts, Datapath},
    health::{Report, Track},
    metrics::HealthLatency,
    state::{self, App, HealthConfig, RateLimit, State, StateError, StateFile},
};

/// An app's rate limit (`None`: none) and the plan of the config file it came from.
pub(super) type LimitAndPlan = (Option<RateLimit>, Option<String>);

/// The daemon's state: settings, desired state and its file, the datapath, health checks.
pub(super) struct Core {
    pub settings: Settings,
    pub state: State,
    pub file: StateFile,
    pub datapath: Datapath,
    pub attachments: Vec<AttachmentView>,
    /// Consecutive check results per backend id.
    pub tracks: HashMap<u32, Track>,
    pub checks: HashMap<u32, Check>,
    /// State changes made by health checks per backend id, since the daemon started.
    pub health_changes: HashMap<u32, u64>,
    /// Health checks run, and failed, since the daemon started.
    pub checks_run: u64,
    pub checks_failed: u64,
    pub reports: mpsc::UnboundedSender<Report>,
    pub runtime: tokio::runtime::Handle,
    /// Health-check latency per app (a histogram the metrics show).
    pub latency: HealthLatency,
    /// What the last conntrack scan found.
    pub scan: ScanState,
    /// The RSTs sent to the ends of the connections the daemon ends.
    pub resets: Resets,
    /// Cluster mode: the deploy generation of each app this node has acted on.
    pub deploy_generations: HashMap<String, u64>,
    /// Cluster mode: the deploy generation of each app whose local deploy aborted.
    pub aborted_deploys: HashMap<String, u64>,
    /// Cluster mode: the apps not served here because their port is one of this node's SNAT
    /// ports on its public address (warned once).
    pub snat_port_apps: std::collections::HashSet<String>,
}

impl Core {
    /// A core over `state` (persisted in `file`) and `datapath`; health reports go to
    /// `reports`. Opens the raw socket for RSTs in the calling thread's network namespace.
    pub fn new(
        settings: Settings,
        state: State,
        file: StateFile,
        datapath: Datapath,
        reports: mpsc::UnboundedSender<Report>,
    ) -> Self {
        Core {
            settings,
            state,
            file,
            datapath,
            attachments: Vec::new(),
            tracks: HashMap::new(),
            checks: HashMap::new(),
            health_changes: HashMap::new(),
            checks_run: 0,
            checks_failed: 0,
            reports,
            runtime: tokio::runtime::Handle::current(),
            latency: HealthLatency::default(),
            scan: ScanState::default(),
            resets: Resets::open(),
            deploy_generations: HashMap::new(),
            aborted_deploys: HashMap::new(),
            snat_port_apps: Default::default(),
        }
    }

    /// The public endpoint of `port`.
    pub fn public(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.settings.public_ip, port)
    }

    /// Makes `next` the state, for the one app `name` it changed: the datapath first, then
    /// the file; if either fails, the datapath is put back and nothing changed.
    pub fn commit(&mut self, name: &str, next: State) -> Result<(), DaemonError> {
        let old = self.state.apps.get(name).cloned();
        let new = next.apps.get(name).cloned();
        let undo = |core: &mut Core| {
            if let Err(e) = core.program(new.as_ref(), old.as_ref(), false) {
                warn!(error = %e, app = name, "putting the datapath back failed");
            }
        };
        if let Err(e) = self.program(old.as_ref(), new.as_ref(), true) {
            undo(self);
            return Err(e.into());
        }
        if let Err(e) = self.file.save(&next) {
            undo(self);
            return Err(e.into());
        }
        self.state = next;
        self.sync_checks();
        Ok(())
    }

    /// The rate limit a request asks for: `limit`, or the limit of plan `plan` of the config
    /// file (refused when unknown, or given with a limit), with the plan's name.
    pub fn rate_limit_of(
        &self,
        limit: Option<RateLimit>,
        plan: Option<String>,
    ) -> Result<LimitAndPlan, StateError> {
        match (limit, plan) {
            (Some(_), Some(_)) => Err(StateError::RateLimitAndPlan),
            (limit, None) => Ok((limit, None)),
            (None, Some(plan)) => match self.settings.plans.get(&plan) {
                Some(limit) => Ok((Some(*limit), Some(plan))),
                None => Err(StateError::UnknownPlan(plan)),
            },
        }
    }

    /// What an app update's `rate_limit` and `plan` fields ask for (`PATCH /v1/apps/{name}`):
    /// `None` to leave the limit as it is, else the limit and the plan it came from (see
    /// [`Core::rate_limit_of`]; `rate_limit: null` removes it).
    pub fn rate_limit_change(
        &self,
        rate_limit: Option<Option<RateLimit>>,
        plan: Option<String>,
    ) -> Result<Option<LimitAndPlan>, StateError> {
        match (rate_limit, plan) {
            (None, None) => Ok(None),
            (Some(Some(_)), Some(_)) => Err(StateError::RateLimitAndPlan),
            (None | Some(None), Some(plan)) => self.rate_limit_of(None, Some(plan)).map(Some),
            (Some(limit), None) => {
                limit.map(RateLimit::check).transpose()?;
                Ok(Some((limit, None)))
            }
        }
    }

    /// The health-check settings of `app`.
    pub fn health_of(&self, app: &App) -> HealthConfig {
        self.settings.health.with(&app.health)
    }

    /// Open connections as of the last conntrack scan.
    pub fn counts(&self) -> ConnectionCounts {
        self.scan.counts.clone()
    }

    /// App `name` as the API shows it, with the connections of `counts`.
    pub fn app_view(&self, name: &str, app: &App, counts: &ConnectionCounts) -> AppView {
        AppView {
            name: name.to_owned(),
            port: app.port,
            url: self.settings.url(app.port),
            mss_clamp: app.mss_clamp,
            client_address: app.client_address,
            rate_limit: app.rate_limit,
            plan: app.plan.clone(),
            backends: app
                .backends
                .iter()
                .map(|b| self.backend_view_of(b, app.rate_limit, counts))
                .collect(),
            connections: counts.apps.get(&app.id).copied().unwrap_or(0),
            half_open: counts.half_open.get(&app.id).copied().unwrap_or(0),
            rates: self.scan.rates.get(&app.id).copied().unwrap_or_default(),
            not_served_here: false,
        }
    }

    /// Every app as the API shows it, as of the last scan.
    pub fn app_views(&self) -> Vec<AppView> {
        let counts = self.counts();
        self.state
            .apps
            .iter()
            .map(|(n, a)| self.app_view(n, a, &counts))
            .collect()
    }

    /// Backend `b` as the API shows it, with the connections of `counts`, and the limit of the
    /// app that has it now (none once removed). For one backend: it looks for its app (the
    /// views of many take the app's limit, [`Core::backend_view_of`]).
    pub fn backend_view(&self, b: &state::Backend, counts: &ConnectionCounts) -> BackendView {
        let rate_limit = self
            .state
            .apps
            .values()
            .find(|a| a.backends.iter().any(|x| x.id == b.id))
            .and_then(|a| a.rate_limit);
        self.backend_view_of(b, rate_limit, counts)
    }

    /// Backend `b` of an app whose limit is `rate_limit` as the API shows it (a status of
    /// 65,536 backends looked for each one's app among all: ~2·10⁹ comparisons).
    pub fn backend_view_of(
        &self,
        b: &state::Backend,
        rate_limit: Option<RateLimit>,
        counts: &ConnectionCounts,
    ) -> BackendView {
        BackendView {
            address: b.addr.to_string(),
            weight: b.weight,
            state: b.state,
            since_ms: b.since_ms,
            drain_until_ms: b.drain_until_ms,
            held: b.held,
            connections: counts.backends.get(&b.id).copied().unwrap_or(0),
            health_changes: self.health_changes.get(&b.id).copied().unwrap_or(0),
            rate_limit,
            rate_dropped_to_backend: self.rate_drops(b.id, maps::RATE_TO_BACKEND),
            rate_dropped_from_backend: self.rate_drops(b.id, maps::RATE_FROM_BACKEND),
            pps_to_backend: self.scan.backend_pps.get(&b.id).map_or(0.0, |p| p.0),
            pps_from_backend: self.scan.backend_pps.get(&b.id).map_or(0.0, |p| p.1),
            nodes: Default::default(),
        }
    }

    /// Backend `id`'s packets dropped over its limit in `direction` (0 when unreadable: a view
    /// does not fail for a counter).
    pub fn rate_drops(&self, id: u32, direction: u32) -> u64 {
        self.datapath.rate_drops(id, direction).unwrap_or(0)
    }
}
