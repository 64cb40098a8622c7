//! `gateway daemon`: loads the datapath (reusing what an earlier run pinned), restores the
//! persisted state into it, attaches, and serves the API until SIGTERM/SIGINT or
//! `POST /v1/down`. On a signal it leaves the datapath running, so established connections
//! live through a restart; on `down` (or with `--detach-on-exit`) it removes programs and pins.

use std::{
    collections::HashMap,
    net::SocketAddrV4,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path as UrlPath, Query, State as Axum},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{delete, get, post},
};
use gateway_common::maps::{ADDR_PUBLIC, ADDR_SNAT};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::{
    api::{
        AddBackend, AppView, AttachmentView, BackendView, CreateApp, Deploy, ErrorBody, FlowList,
        FlowQuery, Rates, RemoveBackend, Status, status_of,
    },
    config::Settings,
    datapath::{
        self, AttachMode, ConnectionCounts, Conntrack, Datapath, DatapathError, LoadOptions, Scan,
        Timeouts,
    },
    flows,
    health::{self, Report, Track},
    metrics::{self, DaemonFigures, HealthLatency, Snapshot},
    state::{self, App, BackendState, HealthConfig, State, StateError, StateFile, WEIGHT_DEFAULT},
};

/// How often draining backends are looked at (their open connections counted).
const DRAIN_TICK: Duration = Duration::from_millis(250);
/// How often a deploy looks at its new backends' health.
const DEPLOY_TICK: Duration = Duration::from_millis(50);

/// The wall clock, in ms since the Unix epoch (what the state records).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How often a cached next hop is resolved again.
const NEXTHOP_MAX_AGE: Duration =
    Duration::from_nanos(gateway_common::maps::NEXTHOP_MAX_AGE_DEFAULT_NS);
/// bpffs's magic number (statfs f_type).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// How the daemon ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Exit {
    Running,
    /// Leave the datapath in the kernel (flows go on; the next start takes over).
    Keep,
    /// Detach the programs and remove the pins.
    Detach,
}

/// The default attach mode of `iface`: XDP on a physical NIC (it has a device), TC elsewhere
/// (veth, bridges, tunnels and other virtual interfaces, where native XDP is unreliable).
pub fn default_mode(iface: &str) -> AttachMode {
    default_mode_in(Path::new("/sys/class/net"), iface)
}

/// [`default_mode`] with the interfaces listed under `sys_class_net`.
fn default_mode_in(sys_class_net: &Path, iface: &str) -> AttachMode {
    if sys_class_net.join(iface).join("device").exists() {
        AttachMode::Xdp
    } else {
        AttachMode::Tc
    }
}

fn on_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Makes `dir` a directory on a bpffs: as it is when it already is one; under its parent when
/// the parent is a bpffs (mounting one on /sys/fs/bpf first when that is where it goes and
/// nothing is mounted there, as under `ip netns exec`); else a bpffs mounted on `dir` itself.
pub fn ensure_bpffs(dir: &Path) -> anyhow::Result<()> {
    let mount = |at: &Path| {
        nix::mount::mount(
            Some("bpf"),
            at,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mounting a bpffs on {}", at.display()))?;
        info!(path = %at.display(), "mounted a bpffs");
        anyhow::Ok(())
    };
    if dir.is_dir() && on_bpffs(dir) {
        return Ok(());
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    match parent {
        Some(p) if p.is_dir() && on_bpffs(p) => {}
        Some(p) if p == Path::new("/sys/fs/bpf") && p.is_dir() => mount(p)?,
        _ => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            return mount(dir);
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// `gateway down` when no daemon answers: removes the pins in `dir` (detaching the programs,
/// dropping every flow), then the directory, unmounting it if it is a bpffs of its own.
pub fn remove_datapath(dir: &Path) -> anyhow::Result<Vec<String>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let removed = datapath::remove_pins(dir)
        .with_context(|| format!("removing pins in {}", dir.display()))?;
    let own_mount = dir.parent().is_some_and(|p| !on_bpffs(p)) && on_bpffs(dir);
    if own_mount {
        nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH)
            .with_context(|| format!("unmounting {}", dir.display()))?;
    }
    // Left in place if something else is in it.
    let _ = std::fs::remove_dir(dir);
    Ok(removed)
}

/// A refused or failed API call.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn internal(err: &(dyn std::error::Error + 'static)) -> Self {
        let mut message = err.to_string();
        let mut source = err.source();
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message,
        }
    }
}

impl From<StateError> for ApiError {
    fn from(e: StateError) -> Self {
        ApiError {
            status: status_of(e.kind()),
            message: e.to_string(),
        }
    }
}

impl From<DatapathError> for ApiError {
    fn from(e: DatapathError) -> Self {
        ApiError::internal(&e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response()
    }
}

/// One backend's running health check.
struct Check {
    addr: SocketAddrV4,
    cfg: HealthConfig,
    task: tokio::task::AbortHandle,
}

/// The daemon's state: settings, desired state and its file, the datapath, health checks.
struct Core {
    settings: Settings,
    state: State,
    file: StateFile,
    datapath: Datapath,
    attachments: Vec<AttachmentView>,
    /// Consecutive check results per backend id.
    tracks: HashMap<u32, Track>,
    checks: HashMap<u32, Check>,
    /// State changes made by health checks per backend id, since the daemon started.
    health_changes: HashMap<u32, u64>,
    /// Health checks run, and failed, since the daemon started.
    checks_run: u64,
    checks_failed: u64,
    reports: mpsc::UnboundedSender<Report>,
    runtime: tokio::runtime::Handle,
    /// Health-check latency per app (a histogram the metrics show).
    latency: HealthLatency,
    /// What the last conntrack scan found.
    scan: ScanState,
}

/// The periodic conntrack scan's findings: open connections (status, metrics and drains read
/// these instead of walking the table) and per-app rates between two scans.
#[derive(Default)]
struct ScanState {
    /// When the last scan began (Unix ms): a drain trusts only a scan begun after it.
    started_ms: u64,
    /// When it ended (Unix ms); 0 before the first.
    ended_ms: u64,
    took: Duration,
    counts: ConnectionCounts,
    scans: u64,
    /// Entries expired since the daemon started.
    expired: u64,
    /// Per-app traffic at the last scan, and when it was read, for the rates.
    traffic: HashMap<u32, gateway_common::maps::TrafficStats>,
    traffic_at: Option<Instant>,
    rates: HashMap<u32, Rates>,
}

impl Core {
    fn public(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.settings.public_ip, port)
    }

    /// Programs the datapath from `old` to `new` for one app. `fresh`: ids new to the
    /// datapath get zeroed counters (not on a restore, which keeps them).
    fn program(
        &mut self,
        old: Option<&App>,
        new: Option<&App>,
        fresh: bool,
    ) -> Result<(), DatapathError> {
        let d = &mut self.datapath;
        if let Some(new) = new {
            let known = |id| old.is_some_and(|o: &App| o.backends.iter().any(|b| b.id == id));
            if fresh && old.is_none() {
                d.reset_app_stats(new.id)?;
            }
            for b in &new.backends {
                if fresh && !known(b.id) {
                    d.reset_backend_stats(b.id)?;
                }
            }
            // Backends joining first, then the table in one update, then those leaving: a
            // SYN never meets a table whose backends all refuse it.
            for b in new.backends.iter().filter(|b| b.state.accepting()) {
                d.set_backend(b.id, b.addr, true)?;
            }
            // The table before the service, so that the first SYN finds it.
            d.set_app_backends(new.id, &new.maglev_entries())?;
            if old.is_none_or(|o| o.port != new.port) {
                d.set_service(SocketAddrV4::new(self.settings.public_ip, new.port), new.id)?;
            }
            for b in new.backends.iter().filter(|b| !b.state.accepting()) {
                d.set_backend(b.id, b.addr, false)?;
            }
        }
        if let Some(old) = old {
            let kept = |id| new.is_some_and(|n: &App| n.backends.iter().any(|b| b.id == id));
            if new.is_none() {
                d.remove_service(SocketAddrV4::new(self.settings.public_ip, old.port))?;
                d.remove_app_table(old.id)?;
                let removed = d.remove_app_flows(old.id)?;
                info!(
                    app.id = old.id,
                    flows = removed / 2,
                    "ended the app's connections"
                );
            }
            for b in old.backends.iter().filter(|b| !kept(b.id)) {
                // Out of the table already; its established flows go on.
                d.set_backend(b.id, b.addr, false)?;
            }
        }
        Ok(())
    }

    /// Makes `next` the state, for the one app `name` it changed: the datapath first, then
    /// the file; if either fails, the datapath is put back and nothing changed.
    fn commit(&mut self, name: &str, next: State) -> Result<(), ApiError> {
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
            return Err(ApiError::internal(&e));
        }
        self.state = next;
        self.sync_checks();
        Ok(())
    }

    /// The health-check settings of `app`.
    fn health_of(&self, app: &App) -> HealthConfig {
        self.settings.health.with(&app.health)
    }

    /// Runs one check task per backend that is not draining, with its app's settings.
    fn sync_checks(&mut self) {
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

    /// Records one check's result and moves the backend's state when rise or fall is reached.
    fn health_report(&mut self, r: Report) {
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
                warn!(app = name, backend = %addr, error = e.message, "backend state change failed")
            }
        }
    }

    /// Ends the drains that are over: a draining backend goes once it has no open connection,
    /// or at its deadline, when its remaining connections are ended.
    fn drain_tick(&mut self) -> Result<(), ApiError> {
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
                let ended = self.datapath.remove_backend_flows(id)? / 2;
                warn!(app = name, backend = %addr, connections = ended, "drain timeout: the backend's remaining connections were ended; it is gone");
            }
        }
        Ok(())
    }

    /// Brings the datapath in line with the persisted state at start: every app programmed,
    /// services and tables of apps that no longer exist removed.
    fn restore(&mut self) -> anyhow::Result<()> {
        let interrupted: Vec<String> = self
            .state
            .apps
            .iter()
            .filter(|(_, a)| a.deploying())
            .map(|(n, _)| n.clone())
            .collect();
        for name in interrupted {
            let held = self.state.abort_deploy(&name)?;
            self.file.save(&self.state)?;
            warn!(
                app = name,
                backends = held.len(),
                "a deploy was interrupted by the restart: aborted, the old backends keep serving"
            );
        }
        let apps: Vec<App> = self.state.apps.values().cloned().collect();
        for app in &apps {
            self.program(None, Some(app), false)?;
        }
        for (public, id) in self.datapath.services()? {
            let wanted = apps
                .iter()
                .any(|a| a.id == id && self.public(a.port) == public);
            if !wanted {
                self.datapath.remove_service(public)?;
                info!(service = %public, "removed a service the state does not have");
            }
        }
        for id in self.datapath.app_ids()? {
            if !apps.iter().any(|a| a.id == id) {
                self.datapath.remove_app_table(id)?;
                self.datapath.remove_app_flows(id)?;
            }
        }
        Ok(())
    }

    fn app_view(&self, name: &str, app: &App, counts: &ConnectionCounts) -> AppView {
        AppView {
            name: name.to_owned(),
            port: app.port,
            url: self.settings.url(app.port),
            backends: app
                .backends
                .iter()
                .map(|b| self.backend_view(b, counts))
                .collect(),
            connections: counts.apps.get(&app.id).copied().unwrap_or(0),
            rates: self.scan.rates.get(&app.id).copied().unwrap_or_default(),
        }
    }

    fn backend_view(&self, b: &state::Backend, counts: &ConnectionCounts) -> BackendView {
        BackendView {
            address: b.addr.to_string(),
            weight: b.weight,
            state: b.state,
            since_ms: b.since_ms,
            drain_until_ms: b.drain_until_ms,
            held: b.held,
            connections: counts.backends.get(&b.id).copied().unwrap_or(0),
            health_changes: self.health_changes.get(&b.id).copied().unwrap_or(0),
        }
    }

    /// Open connections as of the last conntrack scan.
    fn counts(&self) -> ConnectionCounts {
        self.scan.counts.clone()
    }

    /// Takes in a scan begun at `started_ms` that took `took`, and samples every app's
    /// traffic for the rates.
    fn scanned(&mut self, started_ms: u64, took: Duration, scan: Scan) -> Result<(), ApiError> {
        let s = &mut self.scan;
        s.started_ms = started_ms;
        s.ended_ms = now_ms();
        s.took = took;
        s.counts = scan.counts;
        s.scans += 1;
        s.expired += scan.removed as u64;
        let now = Instant::now();
        let mut traffic = HashMap::new();
        for app in self.state.apps.values() {
            traffic.insert(app.id, self.datapath.app_stats(app.id)?);
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
        }
        s.traffic = traffic;
        s.traffic_at = Some(now);
        Ok(())
    }

    /// What a metrics scrape reports.
    fn snapshot(&self) -> Result<Snapshot, ApiError> {
        let daemon = DaemonFigures {
            conntrack_expired: self.scan.expired,
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

#[derive(Clone)]
struct Shared {
    core: Arc<Mutex<Core>>,
    /// A handle on the conntrack table of its own: scans and flow listings walk it without
    /// holding the core's lock.
    conntrack: Arc<Mutex<Conntrack>>,
    exit: watch::Sender<Exit>,
}

impl Shared {
    /// Runs `f` on the core on a blocking thread (map walks are syscalls).
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Core) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let core = self.core.clone();
        tokio::task::spawn_blocking(move || {
            let mut core = core.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut core)
        })
        .await
        .map_err(|e| ApiError::internal(&e))?
    }
}

fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError {
        status: StatusCode::BAD_REQUEST,
        message: format!("bad request body: {e}"),
    })
}

async fn get_status(Axum(s): Axum<Shared>) -> Result<Json<Status>, ApiError> {
    s.with(|c| {
        let counts = c.counts();
        Ok(Json(Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            public_ip: c.settings.public_ip.to_string(),
            snat_ip: c.settings.snat_ip.to_string(),
            port_range: c.settings.port_range.to_string(),
            attachments: c.attachments.clone(),
            apps: c
                .state
                .apps
                .iter()
                .map(|(n, a)| c.app_view(n, a, &counts))
                .collect(),
            conntrack_entries: counts.entries,
            health_checks: c.checks_run,
            health_checks_failed: c.checks_failed,
            conntrack_capacity: u64::from(c.datapath.conntrack_capacity()),
            scanned_at_ms: c.scan.started_ms,
        }))
    })
    .await
}

async fn list_apps(Axum(s): Axum<Shared>) -> Result<Json<Vec<AppView>>, ApiError> {
    s.with(|c| {
        let counts = c.counts();
        Ok(Json(
            c.state
                .apps
                .iter()
                .map(|(n, a)| c.app_view(n, a, &counts))
                .collect(),
        ))
    })
    .await
}

async fn create_app(
    Axum(s): Axum<Shared>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<AppView>), ApiError> {
    let req: CreateApp = body(&bytes)?;
    s.with(move |c| {
        let mut next = c.state.clone();
        let app = next
            .create_app_with(&req.name, req.port, c.settings.port_range, req.health)?
            .clone();
        c.commit(&req.name, next)?;
        info!(app = req.name, port = app.port, "app created");
        let view = c.app_view(&req.name, &app, &ConnectionCounts::default());
        Ok((StatusCode::CREATED, Json(view)))
    })
    .await
}

async fn show_app(
    Axum(s): Axum<Shared>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<AppView>, ApiError> {
    s.with(move |c| {
        let app = c.state.app(&name)?.clone();
        let counts = c.counts();
        Ok(Json(c.app_view(&name, &app, &counts)))
    })
    .await
}

async fn delete_app(
    Axum(s): Axum<Shared>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<AppView>, ApiError> {
    s.with(move |c| {
        let mut next = c.state.clone();
        let app = next.delete_app(&name)?;
        let view = c.app_view(&name, &app, &ConnectionCounts::default());
        c.commit(&name, next)?;
        c.latency.remove(&name);
        info!(app = name, port = app.port, "app deleted, port freed");
        Ok(Json(view))
    })
    .await
}

async fn list_backends(
    Axum(s): Axum<Shared>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Vec<BackendView>>, ApiError> {
    s.with(move |c| {
        let app = c.state.app(&name)?.clone();
        let counts = c.counts();
        Ok(Json(
            app.backends
                .iter()
                .map(|b| c.backend_view(b, &counts))
                .collect(),
        ))
    })
    .await
}

async fn add_backend(
    Axum(s): Axum<Shared>,
    UrlPath(name): UrlPath<String>,
    bytes: Bytes,
) -> Result<(StatusCode, Json<BackendView>), ApiError> {
    let req: AddBackend = body(&bytes)?;
    s.with(move |c| {
        // The app first, so that an unknown app is named as such whatever the address.
        c.state.app(&name)?;
        let addr = state::parse_backend(&req.address)?;
        let mut next = c.state.clone();
        let weight = req.weight.unwrap_or(WEIGHT_DEFAULT);
        let backend = next.add_backend_as(&name, addr, weight, BackendState::Pending, now_ms())?;
        c.commit(&name, next)?;
        info!(app = name, backend = %addr, weight, "backend added: pending until its health checks pass");
        Ok((
            StatusCode::CREATED,
            Json(c.backend_view(&backend, &ConnectionCounts::default())),
        ))
    })
    .await
}

async fn remove_backend(
    Axum(s): Axum<Shared>,
    UrlPath((name, address)): UrlPath<(String, String)>,
    Query(q): Query<RemoveBackend>,
) -> Result<Json<BackendView>, ApiError> {
    s.with(move |c| {
        c.state.app(&name)?;
        let addr = state::parse_backend(&address)?;
        let mut next = c.state.clone();
        let counts = c.counts();
        if q.now {
            let backend = next.remove_backend(&name, addr)?;
            c.commit(&name, next)?;
            let ended = c.datapath.remove_backend_flows(backend.id)? / 2;
            info!(app = name, backend = %addr, connections = ended, "backend removed now; its connections were ended");
            return Ok(Json(c.backend_view(&backend, &counts)));
        }
        let timeout = q.drain_timeout_ms.unwrap_or(c.settings.drain_timeout.as_millis() as u64);
        let now = now_ms();
        let backend = next.drain_backend(&name, addr, now, now + timeout)?;
        c.commit(&name, next)?;
        info!(app = name, backend = %addr, drain_timeout_ms = timeout, "backend draining: no new connections; open ones go on");
        Ok(Json(c.backend_view(&backend, &counts)))
    })
    .await
}

/// Replaces an app's backends: the new ones are added pending; once `quorum` of them are
/// healthy the table switches to them in one update and the others drain. Answers once
/// switched, or with 504 once the deploy timed out and was rolled back.
async fn deploy(
    Axum(s): Axum<Shared>,
    UrlPath(name): UrlPath<String>,
    bytes: Bytes,
) -> Result<Json<AppView>, ApiError> {
    let req: Deploy = body(&bytes)?;
    let addrs = req
        .backends
        .iter()
        .map(|a| state::parse_backend(a))
        .collect::<Result<Vec<_>, _>>()?;
    let weight = req.weight.unwrap_or(WEIGHT_DEFAULT);
    state::check_weight(weight)?;
    let (n, a) = (name.clone(), addrs.clone());
    let (held, quorum, timeout, drain_ms) = s
        .with(move |c| {
            c.state.app(&n)?;
            let mut next = c.state.clone();
            let held: Vec<u32> = next
                .begin_deploy(&n, &a, weight, now_ms())?
                .iter()
                .map(|b| b.id)
                .collect();
            let quorum = req.quorum.unwrap_or(held.len());
            if quorum > held.len() || (quorum == 0 && !held.is_empty()) {
                return Err(StateError::Quorum {
                    quorum,
                    new: held.len(),
                }
                .into());
            }
            c.commit(&n, next)?;
            let timeout = req
                .timeout_ms
                .map_or(c.settings.deploy_timeout, Duration::from_millis);
            let drain_ms = req
                .drain_timeout_ms
                .unwrap_or(c.settings.drain_timeout.as_millis() as u64);
            info!(
                app = n,
                new = held.len(),
                quorum,
                "deploy started: new backends pending"
            );
            Ok((held, quorum, timeout, drain_ms))
        })
        .await?;
    // The wait runs as a task of its own: a client that goes away (a CLI killed mid-deploy)
    // does not leave the deploy half done; it still switches or aborts.
    let start = tokio::time::Instant::now();
    let wait = tokio::spawn(async move {
        loop {
            let (n, a, h) = (name.clone(), addrs.clone(), held.clone());
            let done = s
                .with(move |c| {
                    let cfg = c.health_of(c.state.app(&n)?);
                    let healthy: Vec<u32> = h
                        .iter()
                        .copied()
                        .filter(|id| c.tracks.get(id).is_some_and(|t| t.risen(&cfg)))
                        .collect();
                    let waited = start.elapsed();
                    if healthy.len() >= quorum {
                        let mut next = c.state.clone();
                        let now = now_ms();
                        next.switch_deploy(&n, &a, &healthy, now, now + drain_ms)?;
                        c.commit(&n, next)?;
                        info!(app = n, healthy = healthy.len(), waited_ms = waited.as_millis() as u64, "deploy switched: new connections go to the new backends, the old ones drain");
                        let app = c.state.app(&n)?.clone();
                        let counts = c.counts();
                        return Ok(Some(c.app_view(&n, &app, &counts)));
                    }
                    if waited >= timeout {
                        let mut next = c.state.clone();
                        next.abort_deploy(&n)?;
                        c.commit(&n, next)?;
                        let err = StateError::DeployTimeout {
                            app: n.clone(),
                            healthy: healthy.len(),
                            new: h.len(),
                            quorum,
                            waited_ms: waited.as_millis() as u64,
                        };
                        warn!("{err}");
                        return Err(err.into());
                    }
                    Ok(None)
                })
                .await?;
            if let Some(view) = done {
                return Ok(Json(view));
            }
            tokio::time::sleep(DEPLOY_TICK).await;
        }
    });
    wait.await.map_err(|e| ApiError::internal(&e))?
}

async fn list_flows(
    Axum(s): Axum<Shared>,
    Query(q): Query<FlowQuery>,
) -> Result<Json<FlowList>, ApiError> {
    let backend = q.backend.as_deref().map(state::parse_backend).transpose()?;
    let (names, app_id) = s
        .with(move |c| {
            let app_id = match &q.app {
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
    let ct = s.conntrack.clone();
    tokio::task::spawn_blocking(move || {
        let ct = ct.lock().unwrap_or_else(|p| p.into_inner());
        Ok(Json(flows::list(
            &ct,
            filter,
            &names,
            datapath::monotonic_ns(),
        )?))
    })
    .await
    .map_err(|e| ApiError::internal(&e))?
}

/// `GET /metrics` (on `--metrics-addr`).
async fn get_metrics(
    Axum(s): Axum<Shared>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    use axum::http::header::{ACCEPT, CONTENT_TYPE};
    let (snapshot, latency) = s.with(|c| Ok((c.snapshot()?, c.latency.clone()))).await?;
    let text = metrics::render(snapshot, &latency).map_err(|e| ApiError::internal(&e))?;
    let accept = headers.get(ACCEPT).and_then(|v| v.to_str().ok());
    Ok(if metrics::wants_openmetrics(accept) {
        ([(CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
    } else {
        let text = metrics::to_prometheus_text(&text);
        ([(CONTENT_TYPE, metrics::CONTENT_TYPE_TEXT)], text).into_response()
    })
}

/// One conntrack scan: expires idle flows and counts the rest, walking the table on a blocking
/// thread without the core's lock, then hands the result to the core.
async fn scan_once(s: &Shared) -> Result<Duration, ApiError> {
    let started_ms = now_ms();
    let t0 = Instant::now();
    let ct = s.conntrack.clone();
    let scan = tokio::task::spawn_blocking(move || {
        let mut ct = ct.lock().unwrap_or_else(|p| p.into_inner());
        ct.scan(datapath::monotonic_ns(), &Timeouts::default())
    })
    .await
    .map_err(|e| ApiError::internal(&e))??;
    let took = t0.elapsed();
    let removed = scan.removed;
    s.with(move |c| c.scanned(started_ms, took, scan)).await?;
    if removed > 0 {
        tracing::debug!(entries = removed, "expired flows collected");
    }
    Ok(took)
}

async fn down(Axum(s): Axum<Shared>) -> StatusCode {
    info!("asked to detach and exit");
    s.exit.send_replace(Exit::Detach);
    StatusCode::ACCEPTED
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such API path (this daemon serves /v1/...)".to_owned(),
    }
}

fn router(shared: Shared) -> Router {
    Router::new()
        .route("/v1/status", get(get_status))
        .route("/v1/apps", get(list_apps).post(create_app))
        .route("/v1/apps/{name}", get(show_app).delete(delete_app))
        .route(
            "/v1/apps/{name}/backends",
            get(list_backends).post(add_backend),
        )
        .route("/v1/apps/{name}/backends/{addr}", delete(remove_backend))
        .route("/v1/apps/{name}/deploy", post(deploy))
        .route("/v1/flows", get(list_flows))
        .route("/v1/down", post(down))
        .fallback(not_found)
        .with_state(shared)
}

/// Binds the API socket, root-only (0600). A socket left by a dead daemon is replaced; one a
/// live daemon answers on is not.
fn bind_api(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    refuse_live_socket(path)?;
    if path.exists() {
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    }
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = tokio::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    listener.with_context(|| format!("binding the API socket {}", path.display()))
}

fn refuse_live_socket(path: &Path) -> anyhow::Result<()> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        anyhow::bail!("another gateway daemon is serving on {}", path.display());
    }
    Ok(())
}

/// Locks `dir` (flock on the directory) for this process's life: one daemon per pin directory.
fn lock_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    let file = std::fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            anyhow::bail!("another gateway daemon uses the pins in {}", dir.display())
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", dir.display()))
        }
    }
}

/// Removes the socket file if it is still ours.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs the daemon until it is told to stop.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    info!(
        version = env!("CARGO_PKG_VERSION"),
        "gateway daemon starting"
    );
    let file = StateFile::open(&settings.state_dir)?;
    let state = file.load()?;
    info!(path = %file.path().display(), apps = state.apps.len(), "state loaded");

    // Everything that can tell another daemon is running, before touching the datapath (the
    // state directory's lock above, the socket, the pin directory's lock).
    refuse_live_socket(&settings.api_socket)?;
    // Bound (not yet served) before the datapath is touched: a taken address changes nothing.
    let metrics_listener = tokio::net::TcpListener::bind(settings.metrics_addr)
        .await
        .with_context(|| format!("binding the metrics address {}", settings.metrics_addr))?;
    ensure_bpffs(&settings.bpffs)?;
    let _bpffs_lock = lock_dir(&settings.bpffs)?;
    let mut datapath = Datapath::load_with(&LoadOptions {
        conntrack_capacity: settings.conntrack_size,
        pin_dir: Some(settings.bpffs.clone()),
    })
    .context("loading the datapath")?;
    if datapath.reused_maps().is_empty() {
        info!(bpffs = %settings.bpffs.display(), "datapath loaded, maps pinned");
    } else {
        info!(
            bpffs = %settings.bpffs.display(),
            maps = datapath.reused_maps().len(),
            "datapath loaded, pinned maps reused (connections and counters kept)"
        );
    }
    datapath
        .configure(
            settings.snat_ip,
            settings.snat_ports.low..=settings.snat_ports.high,
            NEXTHOP_MAX_AGE,
        )
        .context("configuring the datapath")?;
    datapath
        .set_addresses(&[
            (settings.public_ip, ADDR_PUBLIC),
            (settings.snat_ip, ADDR_SNAT),
        ])
        .context("configuring the datapath")?;

    let (reports, mut report_rx) = mpsc::unbounded_channel();
    let mut core = Core {
        settings: settings.clone(),
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
    };
    core.restore()
        .context("restoring the state into the datapath")?;

    let wanted: Vec<(String, AttachMode)> = settings
        .ifaces
        .iter()
        .map(|i| {
            (
                i.clone(),
                settings.attach.unwrap_or_else(|| default_mode(i)),
            )
        })
        .collect();
    for name in datapath::prune_links(&settings.bpffs, &wanted)? {
        info!(link = name, "removed a link no longer configured");
    }
    for (iface, mode) in &wanted {
        core.datapath
            .attach(iface, *mode, Some(&settings.bpffs))
            .with_context(|| format!("attaching to {iface}"))?;
        let how = if settings.attach.is_some() {
            "as configured"
        } else {
            "default for this interface"
        };
        info!(iface, %mode, how, "attached");
        core.attachments.push(AttachmentView {
            iface: iface.clone(),
            mode: *mode,
        });
    }

    let conntrack = core.datapath.conntrack().try_clone()?;
    let (exit, mut exit_rx) = watch::channel(Exit::Running);
    let shared = Shared {
        core: Arc::new(Mutex::new(core)),
        conntrack: Arc::new(Mutex::new(conntrack)),
        exit,
    };
    // A first scan before serving: connection counts are right from the first call.
    scan_once(&shared)
        .await
        .map_err(|e| anyhow::anyhow!("scanning the conntrack table: {}", e.message))?;

    // Bound last: a client that can connect finds everything ready.
    let listener = bind_api(&settings.api_socket)?;
    let _socket = SocketFile(settings.api_socket.clone());
    info!(
        socket = %settings.api_socket.display(),
        public_ip = %settings.public_ip,
        snat_ip = %settings.snat_ip,
        ports = %settings.port_range,
        "serving the API"
    );

    info!(addr = %settings.metrics_addr, "serving metrics on /metrics");
    let metrics_server = {
        let router = Router::new()
            .route("/metrics", get(get_metrics))
            .with_state(shared.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(metrics_listener, router).await {
                warn!(error = %e, "the metrics endpoint stopped");
            }
        })
    };
    // Scans every --scan-interval, stretched to 10× a scan's duration so that a huge table
    // costs at most a tenth of a core.
    let scans = {
        let shared = shared.clone();
        let interval = settings.scan_interval;
        tokio::spawn(async move {
            let mut wait = interval;
            loop {
                tokio::time::sleep(wait).await;
                wait = match scan_once(&shared).await {
                    Ok(took) => interval.max(took * 10),
                    Err(e) => {
                        warn!(error = e.message, "conntrack scan failed");
                        interval
                    }
                };
            }
        })
    };

    let health = {
        let shared = shared.clone();
        tokio::spawn(async move {
            while let Some(report) = report_rx.recv().await {
                let _ = shared
                    .with(move |c| {
                        c.health_report(report);
                        Ok(())
                    })
                    .await;
            }
        })
    };
    let drains = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(DRAIN_TICK);
            loop {
                tick.tick().await;
                if let Err(e) = shared.with(|c| c.drain_tick()).await {
                    warn!(error = e.message, "ending drains failed");
                }
            }
        })
    };

    let signals = {
        let exit = shared.exit.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => info!("SIGTERM"),
                _ = int.recv() => info!("SIGINT"),
            }
            exit.send_if_modified(|e| {
                if *e == Exit::Running {
                    *e = Exit::Keep;
                    true
                } else {
                    false
                }
            });
        })
    };

    let server = axum::serve(listener, router(shared.clone())).with_graceful_shutdown({
        let mut rx = exit_rx.clone();
        async move {
            let _ = rx.wait_for(|e| *e != Exit::Running).await;
        }
    });
    server.await.context("serving the API")?;
    scans.abort();
    metrics_server.abort();
    signals.abort();
    health.abort();
    drains.abort();
    {
        let mut core = shared.core.lock().unwrap_or_else(|p| p.into_inner());
        for check in core.checks.values() {
            check.task.abort();
        }
        core.checks.clear();
    }
    let how = *exit_rx.borrow_and_update();
    let detach = how == Exit::Detach || settings.detach_on_exit;
    let core = shared.core.clone();
    drop(shared);
    if detach {
        // Other holders of `core` (tasks being aborted) may outlive this function: the links
        // are let go of here, so that nothing answers by the time the socket is gone.
        let removed = {
            let mut core = core.lock().unwrap_or_else(|p| p.into_inner());
            let removed = remove_datapath(&settings.bpffs)?;
            core.datapath.release_attachments();
            removed
        };
        drop(core);
        info!(
            pins = removed.len(),
            "datapath detached and pins removed; exiting"
        );
    } else {
        info!("exiting; the datapath stays attached and established connections go on");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn physical_nics_default_to_xdp_and_virtual_interfaces_to_tc() {
        let sys = std::env::temp_dir().join(format!("gateway-sysfs-{}", std::process::id()));
        std::fs::create_dir_all(sys.join("eth0/device")).unwrap();
        std::fs::create_dir_all(sys.join("veth0")).unwrap();
        assert_eq!(default_mode_in(&sys, "eth0"), AttachMode::Xdp);
        assert_eq!(default_mode_in(&sys, "veth0"), AttachMode::Tc);
        assert_eq!(default_mode_in(&sys, "missing"), AttachMode::Tc);
        std::fs::remove_dir_all(&sys).unwrap();
    }
}
