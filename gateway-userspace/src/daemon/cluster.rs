//! Cluster mode (`gateway daemon --cluster etcd=URL --node NAME`, issue 19): etcd holds each
//! app's operator intent ([`AppIntent`], in [`AppSpec::settings`]); this node watches it and
//! reconciles its own local state toward it ([`Core::reconcile_app`]), with the same operations
//! as the operator's requests of a single node: an app created, changed or deleted; a backend of
//! the spec missing here is added (pending until *this node's* checks pass); a local backend the
//! spec no longer has drains; a new deploy generation runs a local deploy (new backends held
//! until healthy here, then switched, the old ones drained). So every rotation decision is this
//! node's, from its own checks.
//!
//! The API's write requests go to etcd (`Store`) instead of the local state, then wait (at
//! most [`APPLY_WAIT`]) until this node has applied the revision they wrote, so that they
//! answer as on a single node. With etcd unreachable they are refused (503) and the datapath
//! keeps forwarding with the last known state; the watch catches up when etcd is back.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddrV4,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{Core, Daemon, DaemonError, now_ms, resets::Whose, rotation::Rollout};
use crate::{
    api::{
        AddBackend, AppView, BackendView, ClusterNodeView, ClusterView, CreateApp, Deploy,
        RemoveBackend, UpdateApp,
    },
    cluster::{AppSpec, NodeInfo, NodeRegistration, Store, StoreError, WatchEvent},
    config::ClusterSettings,
    datapath::ConnectionCounts,
    state::{
        self, BackendState, ClientAddress, HealthConfig, HealthOverrides, PortRange, RateLimit,
        StateError, WEIGHT_DEFAULT,
    },
};

/// How long a write request waits for this node to apply what it wrote.
pub const APPLY_WAIT: Duration = Duration::from_secs(5);
/// Every etcd request's bound.
pub const STORE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the whole cached spec is reconciled again (drains that ended, deploys that
/// finished, an aborted deploy's backends).
const RESYNC_TICK: Duration = Duration::from_secs(1);
/// How often this node's backend states are compared with what it published.
const STATUS_TICK: Duration = Duration::from_millis(200);

/// One backend of an app's intent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendIntent {
    pub address: SocketAddrV4,
    pub weight: u32,
}

/// The latest deploy asked for: each node runs it once (its generation), locally.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployIntent {
    pub generation: u64,
    pub weight: u32,
    #[serde(default)]
    pub quorum: Option<usize>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub drain_timeout_ms: Option<u64>,
}

/// An app's operator intent, as [`AppSpec::settings`] holds it (the port is the spec's own).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppIntent {
    #[serde(default)]
    pub backends: Vec<BackendIntent>,
    #[serde(default)]
    pub health: HealthOverrides,
    #[serde(default)]
    pub mss_clamp: Option<u16>,
    #[serde(default)]
    pub client_address: ClientAddress,
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    #[serde(default)]
    pub plan: Option<String>,
    /// The nodes that serve the app; `None`: all of them.
    #[serde(default)]
    pub nodes: Option<Vec<String>>,
    #[serde(default)]
    pub deploy: Option<DeployIntent>,
    /// How backends removed from `backends` go, where it is not each node's default drain
    /// (`backend remove --now` or `--drain-timeout`); an entry leaves when its address is
    /// added again. At most [`REMOVED_KEPT`], the newest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<RemovedBackend>,
}

/// How many [`AppIntent::removed`] entries an app keeps.
const REMOVED_KEPT: usize = 64;

/// A backend removed with `--now` or `--drain-timeout` (see [`AppIntent::removed`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedBackend {
    pub address: SocketAddrV4,
    /// Gone at once on every node, its connections ended (reset), as `backend remove --now`.
    #[serde(default)]
    pub now: bool,
    /// Its drain deadline from when each node applies the removal (ms); `None`: the node's
    /// `--drain-timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_timeout_ms: Option<u64>,
}

impl AppIntent {
    pub fn of(spec: &AppSpec) -> Result<Self, String> {
        serde_json::from_value(spec.settings.clone())
            .map_err(|e| format!("app {:?} in etcd: unreadable settings: {e}", spec.name))
    }

    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("an AppIntent serializes")
    }

    /// Whether `node` serves the app.
    pub fn serves(&self, node: &str) -> bool {
        self.nodes
            .as_ref()
            .is_none_or(|n| n.is_empty() || n.iter().any(|x| x == node))
    }

    /// The intent of a single node's app (`gateway cluster import`): its backends but those
    /// draining, and its settings.
    pub fn of_app(app: &state::App) -> Self {
        AppIntent {
            backends: app
                .backends
                .iter()
                .filter(|b| b.state != BackendState::Draining && !b.held)
                .map(|b| BackendIntent {
                    address: b.addr,
                    weight: b.weight,
                })
                .collect(),
            health: app.health,
            mss_clamp: app.mss_clamp,
            client_address: app.client_address,
            rate_limit: app.rate_limit,
            plan: app.plan.clone(),
            nodes: None,
            deploy: None,
            removed: Vec::new(),
        }
    }
}

/// Checks a `--nodes` list: `None` and `all` mean every node.
fn nodes_of(nodes: Option<Vec<String>>) -> Result<Option<Vec<String>>, StoreError> {
    let Some(nodes) = nodes else { return Ok(None) };
    let nodes: Vec<String> = nodes
        .into_iter()
        .map(|n| n.trim().to_owned())
        .filter(|n| !n.is_empty())
        .collect();
    if nodes.is_empty() || nodes.iter().any(|n| n == "all") {
        return Ok(None);
    }
    if let Some(bad) = nodes.iter().find(|n| {
        !n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    }) {
        return Err(StoreError::Invalid(format!(
            "bad node name {bad:?} in --nodes"
        )));
    }
    Ok(Some(nodes))
}

/// Refuses a node set naming a node that is not live (a typo would leave the app served by no
/// node): "no live node named ...", with the live ones.
async fn live_nodes(
    store: &Store,
    nodes: Option<Vec<String>>,
) -> Result<Option<Vec<String>>, StoreError> {
    let Some(set) = nodes_of(nodes)? else {
        return Ok(None);
    };
    let live: Vec<String> = store.nodes().await?.into_iter().map(|n| n.node).collect();
    if let Some(unknown) = set.iter().find(|n| !live.contains(n)) {
        return Err(StoreError::Invalid(format!(
            "no live node named {unknown:?} in --nodes (live: {})",
            live.join(", ")
        )));
    }
    Ok(Some(set))
}

/// This node's link to the cluster.
pub struct ClusterLink {
    pub settings: ClusterSettings,
    pub store: Store,
    /// The etcd revision this node has applied (its state reconciled up to it).
    applied: watch::Sender<i64>,
    /// The specs as of `applied`.
    specs: Mutex<BTreeMap<String, AppSpec>>,
    /// The apps whose value in etcd this node cannot read: left as they are here.
    unreadable: Mutex<BTreeSet<String>>,
    registration: tokio::sync::Mutex<Option<NodeRegistration>>,
    started_ms: u64,
}

impl ClusterLink {
    /// Connects to etcd (without waiting for it: calls fail until it answers).
    pub async fn connect(settings: ClusterSettings) -> Result<Self, StoreError> {
        let store = Store::connect(&settings.endpoints, &settings.prefix, STORE_TIMEOUT).await?;
        Ok(ClusterLink {
            settings,
            store,
            applied: watch::channel(0).0,
            specs: Mutex::new(BTreeMap::new()),
            unreadable: Mutex::new(BTreeSet::new()),
            registration: tokio::sync::Mutex::new(None),
            started_ms: now_ms(),
        })
    }

    fn specs(&self) -> BTreeMap<String, AppSpec> {
        self.specs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn unreadable(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.unreadable.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Core {
    /// Reconciles app `name` toward `spec` (`None`: not in the cluster). Answers a deploy to run
    /// (started here, its wait the caller's) and its generation.
    pub(super) fn reconcile_app(
        &mut self,
        name: &str,
        spec: Option<&AppSpec>,
        node: &str,
    ) -> Result<Option<(Rollout, u64)>, DaemonError> {
        let wanted = match spec.map(|s| (s, AppIntent::of(s))) {
            Some((_, Err(e))) => {
                warn!("{e}: left as it is on this node");
                return Ok(None);
            }
            Some((s, Ok(i))) if i.serves(node) => Some((s, i)),
            _ => None,
        };
        let mut local = self.state.apps.get(name).cloned();
        let port_moved = matches!((&local, &wanted), (Some(l), Some((s, _))) if l.port != s.port);
        if let Some(app) = &local
            && (wanted.is_none() || port_moved)
        {
            self.remove_local(name, app.id)?;
            local = None;
        }
        let Some((spec, intent)) = wanted else {
            return Ok(None);
        };
        // The cluster's port, whatever this node's range (the range is for allocation), but
        // never one of this node's SNAT ports on its public address: its backends' answers to
        // the gateway's own connections would be taken for clients of the app.
        let (public_ip, snat_ip, snat_ports) = (
            self.settings.public_ip,
            self.settings.snat_ip,
            self.settings.snat_ports,
        );
        if snat_ip == public_ip && snat_ports.contains(spec.port) {
            if let Some(app) = &local {
                self.remove_local(name, app.id)?;
            }
            if self.snat_port_apps.insert(name.to_owned()) {
                warn!(
                    app = name,
                    port = spec.port,
                    snat_ports = %snat_ports,
                    "cluster: the app's port is one of this node's SNAT ports on its public address; not served here (give the nodes disjoint --snat-ports and --port-range)"
                );
            }
            return Ok(None);
        }
        self.snat_port_apps.remove(name);
        let mut next = self.state.clone();
        if local.is_none() {
            // The cluster's port, whatever this node's range (the range is for allocation).
            next.create_app_with(
                name,
                Some(spec.port),
                PortRange::new(1, 65535),
                intent.health,
            )?;
        }
        next.apps.get_mut(name).expect("created").health = intent.health;
        next.set_mss_clamp(name, intent.mss_clamp.map(u32::from))?;
        next.set_client_address(name, intent.client_address)?;
        next.set_rate_limit(name, intent.rate_limit, intent.plan.clone())?;
        let app = next.app(name)?.clone();
        let generation = intent.deploy.as_ref().map_or(0, |d| d.generation);
        let known = self.deploy_generations.get(name).copied();
        let mut rollout = None;
        // A node that (re)starts after a deploy it missed: the new backends are held until
        // healthy here before the old ones drain (its own deploy), not added and drained at once.
        let adds = intent
            .backends
            .iter()
            .any(|b| !app.backends.iter().any(|x| x.addr == b.address));
        let drains = app.backends.iter().any(|b| {
            b.state != BackendState::Draining
                && !intent.backends.iter().any(|x| x.address == b.addr)
        });
        let missed = known.is_none() && generation > 0 && adds && drains;
        let mut ended_now: Vec<u32> = Vec::new();
        if app.deploying() {
            // A local deploy is under way: it finishes first (the resync looks again).
        } else if local.is_some()
            && (known.is_some_and(|k| generation > k) || missed)
            && !intent.backends.is_empty()
        {
            rollout = intent.deploy.clone();
            self.deploy_generations.insert(name.to_owned(), generation);
        } else if generation > 0 && self.aborted_deploys.get(name) == Some(&generation) {
            // This node's deploy of that generation aborted: its old backends keep serving.
        } else {
            self.deploy_generations.insert(name.to_owned(), generation);
            let now = now_ms();
            for b in &intent.backends {
                if !app.backends.iter().any(|x| x.addr == b.address) {
                    next.add_backend_as(name, b.address, b.weight, BackendState::Pending, now)?;
                    info!(app = name, backend = %b.address, "cluster: backend added, pending until its health checks pass on this node");
                }
            }
            let drain_ms = self.settings.drain_timeout.as_millis() as u64;
            for b in app
                .backends
                .iter()
                .filter(|b| !intent.backends.iter().any(|x| x.address == b.addr))
            {
                let how = intent.removed.iter().find(|r| r.address == b.addr);
                if how.is_some_and(|r| r.now) {
                    next.remove_backend(name, b.addr)?;
                    ended_now.push(b.id);
                    info!(app = name, backend = %b.addr, "cluster: backend removed now, its connections ended");
                } else if b.state != BackendState::Draining {
                    let ms = how.and_then(|r| r.drain_timeout_ms).unwrap_or(drain_ms);
                    next.drain_backend(name, b.addr, now, now + ms)?;
                    info!(app = name, backend = %b.addr, drain_timeout_ms = ms, "cluster: backend removed, draining");
                }
            }
        }
        if next != self.state {
            self.commit(name, next)?;
            for id in ended_now {
                // Committed: its connections end now (RSTs to both ends), as on a single node.
                if self.end_committed(Whose::Backend(id)).is_none() {
                    warn!(
                        app = name,
                        "cluster: a backend removed now; its connections expire on their own"
                    );
                }
            }
            if local.is_none() {
                info!(
                    app = name,
                    port = spec.port,
                    "cluster: app programmed on this node"
                );
            }
        }
        if let Some(d) = rollout {
            let addrs = intent.backends.iter().map(|b| b.address).collect();
            match self.start_rollout(
                name,
                addrs,
                d.weight,
                d.quorum,
                d.timeout_ms,
                d.drain_timeout_ms,
            ) {
                Ok(r) => return Ok(Some((r, generation))),
                // A deploy this node cannot start (its quorum above the backends new here, one
                // draining here): aborted here, so that the old backends keep serving rather
                // than the next reconciliation adding the new ones and draining the old at once.
                Err(e) => {
                    warn!(
                        app = name,
                        generation,
                        error = e.chain(),
                        "cluster: deploy refused on this node; the old backends keep serving"
                    );
                    self.aborted_deploys.insert(name.to_owned(), generation);
                }
            }
        }
        Ok(None)
    }

    /// Deletes app `name` (id `id`) here, ending its connections, as `app delete` does.
    fn remove_local(&mut self, name: &str, id: u32) -> Result<(), DaemonError> {
        let mut next = self.state.clone();
        let app = next.delete_app(name)?;
        self.commit(name, next)?;
        self.latency.remove(name);
        self.deploy_generations.remove(name);
        self.aborted_deploys.remove(name);
        info!(
            app = name,
            port = app.port,
            "cluster: app no longer served by this node"
        );
        self.end_committed(Whose::App(id));
        Ok(())
    }

    /// Reconciles every app toward `specs`: those gone first (their ports free), then the rest.
    /// The apps of `unreadable` (their value in etcd unreadable) are left as they are.
    fn reconcile_all(
        &mut self,
        specs: &BTreeMap<String, AppSpec>,
        unreadable: &BTreeSet<String>,
        node: &str,
    ) -> Vec<(String, Rollout, u64)> {
        let gone: Vec<String> = self
            .state
            .apps
            .keys()
            .filter(|n| !specs.contains_key(*n) && !unreadable.contains(*n))
            .cloned()
            .collect();
        let mut rollouts = Vec::new();
        for name in gone {
            if let Err(e) = self.reconcile_app(&name, None, node) {
                warn!(app = name, error = e.chain(), "cluster: reconciling failed");
            }
        }
        for (name, spec) in specs {
            match self.reconcile_app(name, Some(spec), node) {
                Ok(Some((r, g))) => rollouts.push((name.clone(), r, g)),
                Ok(None) => {}
                Err(e) => warn!(app = name, error = e.chain(), "cluster: reconciling failed"),
            }
        }
        rollouts
    }

    /// This node's view of each app's backends, as published in `status/<node>/<app>`.
    fn local_statuses(&self) -> BTreeMap<String, serde_json::Value> {
        self.state
            .apps
            .iter()
            .map(|(name, app)| {
                let backends: Vec<serde_json::Value> = app
                    .backends
                    .iter()
                    .map(|b| {
                        serde_json::json!({
                            "address": b.addr.to_string(),
                            "state": if b.held { "pending*" } else { b.state.as_str() },
                        })
                    })
                    .collect();
                (
                    name.clone(),
                    serde_json::json!({"serving": true, "port": app.port, "backends": backends}),
                )
            })
            .collect()
    }
}

impl Daemon {
    fn link(&self) -> &Arc<ClusterLink> {
        self.cluster.as_ref().expect("cluster mode")
    }

    /// Runs the deploys a reconciliation started, each in a task of its own; an aborted one is
    /// remembered so that the next reconciliation keeps the old backends.
    fn spawn_rollouts(&self, rollouts: Vec<(String, Rollout, u64)>) {
        for (name, rollout, generation) in rollouts {
            let daemon = self.clone();
            tokio::spawn(async move {
                if let Err(e) = daemon.run_rollout(rollout).await {
                    warn!(
                        app = name,
                        generation,
                        error = e.chain(),
                        "cluster: deploy aborted on this node"
                    );
                    let _ = daemon
                        .with(move |c| {
                            c.aborted_deploys.insert(name, generation);
                            Ok(())
                        })
                        .await;
                }
            });
        }
    }

    /// Loads every spec from etcd and reconciles toward them; the revision loaded.
    pub(super) async fn cluster_sync(&self) -> Result<i64, StoreError> {
        let link = self.link().clone();
        let snapshot = link.store.load().await?;
        let node = link.settings.node.clone();
        for (app, cause) in &snapshot.unreadable {
            warn!(
                app,
                cause, "cluster: app unreadable in etcd; left as it is on this node"
            );
        }
        let unreadable: BTreeSet<String> = snapshot.unreadable.keys().cloned().collect();
        *link.unreadable() = unreadable.clone();
        *link.specs.lock().unwrap_or_else(|p| p.into_inner()) = snapshot.apps.clone();
        let rollouts = self
            .with(move |c| Ok(c.reconcile_all(&snapshot.apps, &unreadable, &node)))
            .await
            .unwrap_or_default();
        self.spawn_rollouts(rollouts);
        link.applied.send_replace(snapshot.revision);
        Ok(snapshot.revision)
    }

    async fn reconcile_cached(&self, name: Option<String>) {
        let link = self.link().clone();
        let node = link.settings.node.clone();
        let specs = link.specs();
        let unreadable = link.unreadable().clone();
        let rollouts = self
            .with(move |c| {
                Ok(match name {
                    None => c.reconcile_all(&specs, &unreadable, &node),
                    Some(name) => match c.reconcile_app(&name, specs.get(&name), &node) {
                        Ok(Some((r, g))) => vec![(name, r, g)],
                        Ok(None) => vec![],
                        Err(e) => {
                            warn!(app = name, error = e.chain(), "cluster: reconciling failed");
                            vec![]
                        }
                    },
                })
            })
            .await
            .unwrap_or_default();
        self.spawn_rollouts(rollouts);
    }

    /// Registers the node under its lease if it is not yet.
    async fn register(&self) {
        let link = self.link();
        let mut registration = link.registration.lock().await;
        if registration.is_some() {
            return;
        }
        let settings = self.with(|c| Ok(c.settings.clone())).await;
        let Ok(settings) = settings else { return };
        let info = NodeInfo {
            started_ms: link.started_ms,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            api: Some("v1".to_owned()),
            public_host: Some(settings.public_host.clone()),
        };
        match link
            .store
            .register_node(&link.settings.node, &info, link.settings.lease)
            .await
        {
            Ok(r) => {
                info!(
                    node = link.settings.node,
                    lease = r.lease_id(),
                    "registered in the cluster"
                );
                *registration = Some(r);
            }
            Err(e) => warn!(error = %e, "cannot register the node in the cluster yet"),
        }
    }

    /// Follows etcd: a full load and reconciliation, then the watch's events, a resync when it
    /// resumes or history was compacted; while etcd is unreachable the node keeps its state.
    pub(super) async fn cluster_loop(self) {
        let link = self.link().clone();
        let mut warned = false;
        loop {
            self.register().await;
            let revision = match self.cluster_sync().await {
                Ok(r) => r,
                Err(e) => {
                    if !warned {
                        warn!(error = %e, "cluster: cannot load the apps from etcd; serving the last known state until it answers");
                        warned = true;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            if warned {
                info!(
                    revision,
                    "cluster: etcd answers again; state reloaded and reconciled"
                );
                warned = false;
            }
            let mut watch = link.store.watch(revision + 1);
            let mut tick = tokio::time::interval(RESYNC_TICK);
            loop {
                tokio::select! {
                    event = watch.next() => match event {
                        Ok(WatchEvent::AppPut { spec, revision }) => {
                            let name = spec.name.clone();
                            link.unreadable().remove(&name);
                            link.specs.lock().unwrap_or_else(|p| p.into_inner()).insert(name.clone(), spec);
                            self.reconcile_cached(Some(name)).await;
                            link.applied.send_replace(revision);
                        }
                        Ok(WatchEvent::AppDeleted { name, revision }) => {
                            link.unreadable().remove(&name);
                            link.specs.lock().unwrap_or_else(|p| p.into_inner()).remove(&name);
                            self.reconcile_cached(Some(name)).await;
                            link.applied.send_replace(revision);
                        }
                        Ok(WatchEvent::Disconnected { cause }) => {
                            warn!(cause, "cluster: etcd unreachable; forwarding with the last known state");
                        }
                        Ok(WatchEvent::Resumed { revision }) => {
                            info!(revision, "cluster: watch resumed; resyncing");
                            break;
                        }
                        Err(e) => {
                            warn!(error = %e, "cluster: the watch ended; resyncing");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            break;
                        }
                    },
                    _ = tick.tick() => self.reconcile_cached(None).await,
                }
            }
        }
    }

    /// Publishes this node's backend states (`status/<node>/<app>`) whenever they change.
    pub(super) async fn status_loop(self) {
        let link = self.link().clone();
        let mut published: BTreeMap<String, serde_json::Value> = BTreeMap::new();
        let mut lease = 0;
        let mut tick = tokio::time::interval(STATUS_TICK);
        loop {
            tick.tick().await;
            let Ok(mut now) = self.with(|c| Ok(c.local_statuses())).await else {
                continue;
            };
            for gone in published.keys() {
                if !now.contains_key(gone) {
                    now.insert(gone.clone(), serde_json::json!({"serving": false}));
                }
            }
            let registration = link.registration.lock().await;
            let Some(r) = registration.as_ref() else {
                continue;
            };
            if r.lease_id() != lease {
                published.clear();
                lease = r.lease_id();
            }
            for (app, status) in now {
                if published.get(&app) == Some(&status) {
                    continue;
                }
                if r.put_status(&app, &status).await.is_err() {
                    break;
                }
                if status["serving"] == false {
                    published.remove(&app);
                } else {
                    published.insert(app, status);
                }
            }
        }
    }

    /// Waits until this node applied `revision` (0: nothing was written).
    async fn applied(&self, revision: i64) -> Result<(), DaemonError> {
        if revision == 0 {
            return Ok(());
        }
        let mut rx = self.link().applied.subscribe();
        match tokio::time::timeout(APPLY_WAIT, rx.wait_for(|r| *r >= revision)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(DaemonError::NotApplied {
                revision,
                waited: APPLY_WAIT,
            }),
        }
    }

    /// App `name` as this node shows it, or from its spec when this node does not serve it.
    async fn view_of(&self, spec: AppSpec) -> Result<AppView, DaemonError> {
        match self.local_app(spec.name.clone()).await {
            Ok(view) => Ok(view),
            Err(_) => self.spec_view(spec).await,
        }
    }

    /// App `name` from etcd, for a node that does not serve it (`app show` there).
    pub(super) async fn cluster_app(&self, name: String) -> Result<AppView, DaemonError> {
        match self.link().store.app(&name).await? {
            Some(spec) => self.spec_view(spec).await,
            None => Err(StateError::UnknownApp(name).into()),
        }
    }

    /// `local` (the apps this node serves) and, from etcd, the others (`app list`); only
    /// `local` while etcd is unreachable.
    pub(super) async fn cluster_apps(
        &self,
        mut local: Vec<AppView>,
    ) -> Result<Vec<AppView>, DaemonError> {
        let Ok(snapshot) = self.link().store.load().await else {
            return Ok(local);
        };
        for (name, spec) in snapshot.apps {
            if !local.iter().any(|a| a.name == name) {
                local.push(self.spec_view(spec).await?);
            }
        }
        local.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(local)
    }

    /// App `name`'s backends from etcd, for a node that does not serve it (`backend list`
    /// there): the nodes' columns as they published them, and as the state the first of
    /// them (none yet: pending).
    pub(super) async fn cluster_backends(
        &self,
        name: String,
    ) -> Result<Vec<BackendView>, DaemonError> {
        let Some(spec) = self.link().store.app(&name).await? else {
            return Err(StateError::UnknownApp(name).into());
        };
        let intent = AppIntent::of(&spec).unwrap_or_default();
        let mut views: Vec<BackendView> = intent
            .backends
            .iter()
            .map(|b| BackendView {
                address: b.address.to_string(),
                weight: b.weight,
                state: BackendState::Pending,
                since_ms: 0,
                drain_until_ms: None,
                held: false,
                connections: 0,
                health_changes: 0,
                rate_limit: intent.rate_limit,
                rate_dropped_to_backend: 0,
                rate_dropped_from_backend: 0,
                pps_to_backend: 0.0,
                pps_from_backend: 0.0,
                nodes: BTreeMap::new(),
            })
            .collect();
        self.published_states(&name, &mut views).await;
        for v in &mut views {
            let first = v.nodes.values().next().map(|s| s.trim_end_matches('*'));
            if let Some(state) = first.and_then(|s| serde_json::from_value(s.into()).ok()) {
                v.state = state;
            }
        }
        Ok(views)
    }

    /// App `spec` as its spec says, for a node that does not serve it: no backends, its
    /// TCP_URL a serving node's.
    async fn spec_view(&self, spec: AppSpec) -> Result<AppView, DaemonError> {
        let intent = AppIntent::of(&spec).unwrap_or_default();
        // Not served here: its TCP_URL names the first live node of its set (by name), or
        // this node's host when none is known.
        let host = match &intent.nodes {
            Some(set) => self.link().store.nodes().await.ok().and_then(|live| {
                let mut serving: Vec<_> = live
                    .into_iter()
                    .filter(|n| set.contains(&n.node))
                    .filter_map(|n| Some((n.node, n.info.public_host?)))
                    .collect();
                serving.sort();
                serving.into_iter().next().map(|(_, host)| host)
            }),
            None => None,
        };
        self.with(move |c| {
            Ok(AppView {
                name: spec.name.clone(),
                port: spec.port,
                url: host.map_or_else(
                    || c.settings.url(spec.port),
                    |h| crate::config::url_of(&h, spec.port),
                ),
                mss_clamp: intent.mss_clamp,
                client_address: intent.client_address,
                rate_limit: intent.rate_limit,
                plan: intent.plan,
                backends: vec![],
                connections: 0,
                half_open: 0,
                rates: Default::default(),
                not_served_here: true,
            })
        })
        .await
    }

    pub(super) async fn cluster_create_app(&self, req: CreateApp) -> Result<AppView, DaemonError> {
        state::check_name(&req.name)?;
        HealthConfig::check(&req.health)?;
        let mss_clamp = req.mss_clamp.map(state::check_mss_clamp).transpose()?;
        let (limit, plan, range) = {
            let (rl, p) = (req.rate_limit, req.plan.clone());
            self.with(move |c| {
                let (l, p) = c.rate_limit_of(rl, p)?;
                Ok((l, p, c.settings.port_range))
            })
            .await?
        };
        if let Some(l) = limit {
            l.check()?;
        }
        let ports: Vec<u16> = match req.port {
            Some(0) => return Err(StateError::PortZero.into()),
            Some(p) if !range.contains(p) => {
                return Err(StateError::PortOutOfRange { port: p, range }.into());
            }
            Some(p) => vec![p],
            None => (range.low..=range.high).collect(),
        };
        let intent = AppIntent {
            health: req.health,
            mss_clamp,
            client_address: req.client_address.unwrap_or_default(),
            rate_limit: limit,
            plan,
            nodes: live_nodes(&self.link().store, req.nodes).await?,
            ..AppIntent::default()
        };
        let link = self.link();
        let (port, revision) = link
            .store
            .create_app_at(&req.name, intent.to_value(), ports)
            .await?;
        info!(
            app = req.name,
            port, revision, "cluster: app created in etcd"
        );
        self.applied(revision).await?;
        self.view_of(AppSpec {
            name: req.name,
            port,
            settings: intent.to_value(),
        })
        .await
    }

    /// Changes app `name`'s intent with `change` (its refusals are the request's, with the
    /// status a single node answers them with); waits until applied here.
    async fn change(
        &self,
        name: &str,
        mut change: impl FnMut(&mut AppIntent) -> Result<(), DaemonError> + Send,
    ) -> Result<AppSpec, DaemonError> {
        let mut refusal = None;
        let written = self
            .link()
            .store
            .update_app_at(name, |spec| {
                let mut intent = AppIntent::of(spec)?;
                if let Err(e) = change(&mut intent) {
                    let text = e.to_string();
                    refusal = Some(e);
                    return Err(text);
                }
                spec.settings = intent.to_value();
                Ok(())
            })
            .await;
        let (spec, revision) = match (written, refusal) {
            (Err(StoreError::Rejected(_)), Some(e)) => return Err(e),
            (written, _) => written?,
        };
        self.applied(revision).await?;
        Ok(spec)
    }

    pub(super) async fn cluster_update_app(
        &self,
        name: String,
        req: UpdateApp,
    ) -> Result<AppView, DaemonError> {
        let UpdateApp {
            mss_clamp,
            client_address,
            rate_limit,
            plan,
            nodes,
        } = req;
        let mss = match mss_clamp {
            Some(Some(m)) => Some(Some(state::check_mss_clamp(m)?)),
            Some(None) => Some(None),
            None => None,
        };
        let limit = self
            .with(move |c| Ok(c.rate_limit_change(rate_limit, plan)?))
            .await?;
        let nodes = match nodes {
            Some(n) => Some(live_nodes(&self.link().store, Some(n)).await?),
            None => None,
        };
        let spec = self
            .change(&name, |i| {
                if let Some(m) = mss {
                    i.mss_clamp = m;
                }
                if let Some(c) = client_address {
                    i.client_address = c.unwrap_or_default();
                }
                if let Some((l, p)) = &limit {
                    i.rate_limit = *l;
                    i.plan = p.clone();
                }
                if let Some(n) = &nodes {
                    i.nodes = n.clone();
                }
                Ok(())
            })
            .await?;
        self.view_of(spec).await
    }

    pub(super) async fn cluster_delete_app(&self, name: String) -> Result<AppView, DaemonError> {
        let view = self.local_app(name.clone()).await.ok();
        let (spec, revision) = self.link().store.delete_app_at(&name).await?;
        info!(app = name, revision, "cluster: app deleted in etcd");
        self.applied(revision).await?;
        match view {
            Some(v) => Ok(v),
            None => self.view_of(spec).await,
        }
    }

    /// Backend `addr` of app `name` as this node shows it, or as `state` when it has none.
    async fn backend_view_of(
        &self,
        name: String,
        addr: SocketAddrV4,
        weight: u32,
        state: BackendState,
    ) -> Result<BackendView, DaemonError> {
        self.with(move |c| {
            let counts = c.counts();
            let local = c
                .state
                .apps
                .get(&name)
                .and_then(|a| a.backends.iter().find(|b| b.addr == addr).cloned());
            Ok(match local {
                Some(b) => c.backend_view(&b, &counts),
                None => c.backend_view(
                    &state::Backend {
                        id: 0,
                        addr,
                        weight,
                        state,
                        since_ms: now_ms(),
                        drain_until_ms: None,
                        held: false,
                    },
                    &ConnectionCounts::default(),
                ),
            })
        })
        .await
    }

    pub(super) async fn cluster_add_backend(
        &self,
        name: String,
        req: AddBackend,
    ) -> Result<BackendView, DaemonError> {
        let addr = state::parse_backend(&req.address)?;
        let weight = req.weight.unwrap_or(WEIGHT_DEFAULT);
        state::check_weight(weight)?;
        self.change(&name, |i| {
            if i.backends.iter().any(|b| b.address == addr) {
                return Err(StateError::DuplicateBackend {
                    app: name.clone(),
                    addr,
                }
                .into());
            }
            i.backends.push(BackendIntent {
                address: addr,
                weight,
            });
            i.removed.retain(|r| r.address != addr);
            Ok(())
        })
        .await?;
        info!(app = name, backend = %addr, "cluster: backend added in etcd");
        self.backend_view_of(name, addr, weight, BackendState::Pending)
            .await
    }

    pub(super) async fn cluster_remove_backend(
        &self,
        name: String,
        address: String,
        q: RemoveBackend,
    ) -> Result<BackendView, DaemonError> {
        let addr = state::parse_backend(&address)?;
        let mut weight = WEIGHT_DEFAULT;
        self.change(&name, |i| {
            let Some(at) = i.backends.iter().position(|b| b.address == addr) else {
                return Err(StateError::UnknownBackend {
                    app: name.clone(),
                    addr,
                }
                .into());
            };
            weight = i.backends.remove(at).weight;
            i.removed.retain(|r| r.address != addr);
            if q.now || q.drain_timeout_ms.is_some() {
                i.removed.push(RemovedBackend {
                    address: addr,
                    now: q.now,
                    drain_timeout_ms: q.drain_timeout_ms,
                });
                let excess = i.removed.len().saturating_sub(REMOVED_KEPT);
                i.removed.drain(..excess);
            }
            Ok(())
        })
        .await?;
        info!(app = name, backend = %addr, now = q.now, "cluster: backend removed in etcd");
        self.backend_view_of(name, addr, weight, BackendState::Draining)
            .await
    }

    /// A deploy: the new backend set and a new generation in etcd; every serving node runs it
    /// locally. Answers once this node switched (or with the abort, as on a single node).
    pub(super) async fn cluster_deploy(
        &self,
        name: String,
        req: Deploy,
    ) -> Result<AppView, DaemonError> {
        let addrs = req
            .backends
            .iter()
            .map(|a| state::parse_backend(a))
            .collect::<Result<Vec<_>, _>>()?;
        if addrs.is_empty() {
            return Err(StoreError::Invalid("a deploy needs at least one backend".into()).into());
        }
        let weight = req.weight.unwrap_or(WEIGHT_DEFAULT);
        state::check_weight(weight)?;
        // The refusals of a single node's deploy, by this node's state when it serves the app
        // (a deploy in progress here, a backend twice or draining here, a quorum above the
        // backends new here): a deploy that no node could start must not be written.
        let (n, a, quorum) = (name.clone(), addrs.clone(), req.quorum);
        self.with(move |c| {
            for (k, addr) in a.iter().enumerate() {
                if a[..k].contains(addr) {
                    return Err(StateError::DuplicateBackend {
                        app: n,
                        addr: *addr,
                    }
                    .into());
                }
            }
            if c.state.apps.contains_key(&n) {
                let new = c.state.clone().begin_deploy(&n, &a, weight, 0)?.len();
                let q = quorum.unwrap_or(new);
                if q > new || (q == 0 && new > 0) {
                    return Err(StateError::Quorum { quorum: q, new }.into());
                }
            }
            Ok(())
        })
        .await?;
        let mut generation = 0;
        let spec = self
            .change(&name, |i| {
                // The same rule against the intent (this node may not serve the app).
                let new = addrs
                    .iter()
                    .filter(|a| !i.backends.iter().any(|b| b.address == **a))
                    .count();
                let q = req.quorum.unwrap_or(new);
                if q > new || (q == 0 && new > 0) {
                    return Err(StateError::Quorum { quorum: q, new }.into());
                }
                generation = i.deploy.as_ref().map_or(0, |d| d.generation) + 1;
                i.backends = addrs
                    .iter()
                    .map(|a| BackendIntent {
                        address: *a,
                        weight,
                    })
                    .collect();
                i.removed.retain(|r| !addrs.contains(&r.address));
                i.deploy = Some(DeployIntent {
                    generation,
                    weight,
                    quorum: req.quorum,
                    timeout_ms: req.timeout_ms,
                    drain_timeout_ms: req.drain_timeout_ms,
                });
                Ok(())
            })
            .await?;
        info!(app = name, generation, "cluster: deploy written to etcd");
        let deploy_timeout = self.with(|c| Ok(c.settings.deploy_timeout)).await?;
        let limit = req.timeout_ms.map_or(deploy_timeout, Duration::from_millis) + APPLY_WAIT;
        let started = tokio::time::Instant::now();
        loop {
            let n = name.clone();
            let (deploying, aborted, served, taken) = self
                .with(move |c| {
                    Ok((
                        c.state.apps.get(&n).is_some_and(|a| a.deploying()),
                        c.aborted_deploys.get(&n).copied(),
                        c.state.apps.contains_key(&n),
                        c.deploy_generations
                            .get(&n)
                            .is_some_and(|g| *g >= generation),
                    ))
                })
                .await?;
            if aborted == Some(generation) {
                return Err(DaemonError::DeployAborted {
                    app: name,
                    generation,
                });
            }
            // Done once this node took this generation (not an earlier deploy still running).
            if !served || (taken && !deploying) {
                break;
            }
            if started.elapsed() > limit {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.view_of(spec).await
    }

    /// Each live node's state of app `name`'s backends, into `views`.
    pub(super) async fn add_node_states(&self, name: &str, views: &mut [BackendView]) {
        self.published_states(name, views).await;
        // This node's own column is always its present state.
        let node = &self.link().settings.node;
        for v in views.iter_mut() {
            let state = if v.held { "pending*" } else { v.state.as_str() };
            v.nodes.insert(node.clone(), state.to_owned());
        }
    }

    /// Each node's published state of the backends of app `name`, into `views`' columns.
    async fn published_states(&self, name: &str, views: &mut [BackendView]) {
        let link = self.link();
        let Ok(statuses) = link.store.statuses().await else {
            return;
        };
        for s in statuses.iter().filter(|s| s.app == name) {
            let Some(backends) = s.status["backends"].as_array() else {
                continue;
            };
            for b in backends {
                let (Some(address), Some(state)) = (b["address"].as_str(), b["state"].as_str())
                else {
                    continue;
                };
                if let Some(v) = views.iter_mut().find(|v| v.address == address) {
                    v.nodes.insert(s.node.clone(), state.to_owned());
                }
            }
        }
    }

    /// `GET /v1/cluster`.
    pub async fn cluster_view(&self) -> Result<ClusterView, DaemonError> {
        let Some(link) = self.cluster.as_ref() else {
            return Err(DaemonError::NotClustered);
        };
        let nodes = link.store.nodes().await?;
        let statuses = link.store.statuses().await?;
        let mut apps: HashMap<String, Vec<String>> = HashMap::new();
        for s in statuses {
            if s.status["serving"] == true {
                apps.entry(s.node).or_default().push(s.app);
            }
        }
        Ok(ClusterView {
            node: link.settings.node.clone(),
            endpoints: link.store.endpoints().to_owned(),
            applied_revision: *link.applied.borrow(),
            nodes: nodes
                .into_iter()
                .map(|n| ClusterNodeView {
                    apps: apps.remove(&n.node).unwrap_or_default(),
                    node: n.node,
                    version: n.info.version,
                    started_ms: n.info.started_ms,
                    api: n.info.api,
                })
                .collect(),
        })
    }
}
