//! `gateway daemon`: loads the datapath (reusing what an earlier run pinned), restores the
//! persisted state into it, attaches, and serves the API until SIGTERM/SIGINT or
//! `POST /v1/down`. On a signal it leaves the datapath running, so established connections
//! live through a restart; on `down` (or with `--detach-on-exit`) it removes programs and pins.
//!
//! By role: [`run`] below (start, serve, stop), `core` (the state behind the lock and its
//! commit), `reconcile` (desired state → datapath), `apps` (the operator's requests),
//! `rotation` (deploy and drain), `resets` (ending connections: an RST to each end),
//! `health` (check tasks and their reports), `scan` (conntrack scans, rates, flows, metrics),
//! `offloads` (naming the interfaces whose senders leave checksums partial), `bpffs` (pins),
//! `error` ([`DaemonError`]). The HTTP side is `crate::api::server`.

mod apps;
mod bpffs;
mod cluster;
mod core;
mod error;
mod health;
mod offloads;
mod reconcile;
mod resets;
mod rotation;
mod scan;

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use gateway_common::maps::{self, ADDR_PUBLIC, ADDR_SNAT};
use tokio::sync::{mpsc, watch};
use tracing::info;

pub use self::cluster::STORE_TIMEOUT as CLUSTER_STORE_TIMEOUT;
use self::core::Core;
pub use self::{
    bpffs::{ensure_bpffs, remove_datapath},
    error::DaemonError,
};
use crate::{
    api::{self, AttachmentView},
    config::Settings,
    datapath::{self, AttachMode, Conntrack, Datapath, LoadOptions},
    health::Report,
    state::{State, StateFile},
};

/// A single node's app as a cluster's intent (JSON of `AppSpec.settings`), for
/// `gateway cluster import`.
pub fn cluster_intent_of(app: &crate::state::App) -> serde_json::Value {
    cluster::AppIntent::of_app(app).to_value()
}

/// The wall clock, in ms since the Unix epoch (what the state records).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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

/// How the daemon ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Exit {
    Running,
    /// Leave the datapath in the kernel (flows go on; the next start takes over).
    Keep,
    /// Detach the programs and remove the pins.
    Detach,
}

/// A handle on the running daemon: what the API's handlers and the daemon's own tasks call.
/// Cloning it is cheap.
#[derive(Clone)]
pub struct Daemon {
    core: Arc<Mutex<Core>>,
    /// A handle on the conntrack table of its own: scans and flow listings walk it without
    /// holding the core's lock.
    conntrack: Arc<Mutex<Conntrack>>,
    exit: watch::Sender<Exit>,
    /// Cluster mode (`--cluster`): etcd and what this node applied of it.
    cluster: Option<Arc<cluster::ClusterLink>>,
}

impl Daemon {
    fn new(core: Core, cluster: Option<cluster::ClusterLink>) -> Result<Self, DaemonError> {
        let conntrack = core.datapath.conntrack().try_clone()?;
        Ok(Daemon {
            core: Arc::new(Mutex::new(core)),
            conntrack: Arc::new(Mutex::new(conntrack)),
            exit: watch::channel(Exit::Running).0,
            cluster: cluster.map(Arc::new),
        })
    }

    /// Runs `f` on the core on a blocking thread (map walks are syscalls).
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Core) -> Result<T, DaemonError> + Send + 'static,
    ) -> Result<T, DaemonError> {
        let core = self.core.clone();
        tokio::task::spawn_blocking(move || {
            let mut core = core.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut core)
        })
        .await?
    }

    /// Asks the daemon to detach the datapath, remove its pins and exit (`gateway down`).
    pub fn down(&self) {
        info!("asked to detach and exit");
        self.exit.send_replace(Exit::Detach);
    }

    /// Resolves once the daemon was asked to exit, one way or the other.
    pub async fn exiting(&self) {
        let mut rx = self.exit.subscribe();
        let _ = rx.wait_for(|e| *e != Exit::Running).await;
    }

    /// Asks the daemon to exit leaving the datapath running, unless it is exiting already.
    fn keep_and_exit(&self) {
        self.exit.send_if_modified(|e| {
            if *e == Exit::Running {
                *e = Exit::Keep;
                true
            } else {
                false
            }
        });
    }

    /// Records each health report in the core until the checks' channel closes.
    async fn health_loop(self, mut reports: mpsc::UnboundedReceiver<Report>) {
        while let Some(report) = reports.recv().await {
            let _ = self
                .with(move |c| {
                    c.health_report(report);
                    Ok(())
                })
                .await;
        }
    }

    /// Waits for SIGTERM or SIGINT, then asks the daemon to exit keeping the datapath.
    async fn signal_loop(self) {
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
        self.keep_and_exit();
    }
}

/// The daemon's background tasks, aborted together when it stops.
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Tasks {
    fn spawn(
        daemon: &Daemon,
        settings: &Settings,
        metrics: tokio::net::TcpListener,
        reports: mpsc::UnboundedReceiver<Report>,
    ) -> Self {
        info!(addr = %settings.metrics_addr, "serving metrics on /metrics");
        let mut tasks = Vec::new();
        if daemon.cluster.is_some() {
            tasks.push(tokio::spawn(daemon.clone().cluster_loop()));
            tasks.push(tokio::spawn(daemon.clone().status_loop()));
        }
        tasks.extend([
            tokio::spawn(api::server::serve_metrics(metrics, daemon.clone())),
            tokio::spawn(daemon.clone().scan_loop(settings.scan_interval)),
            tokio::spawn(daemon.clone().offloads_loop(settings.scan_interval)),
            tokio::spawn(daemon.clone().health_loop(reports)),
            tokio::spawn(daemon.clone().drain_loop()),
            tokio::spawn(daemon.clone().signal_loop()),
        ]);
        Tasks(tasks)
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Runs the daemon until it is told to stop.
pub async fn run(settings: Settings) -> Result<(), DaemonError> {
    info!(
        version = env!("CARGO_PKG_VERSION"),
        "gateway daemon starting"
    );
    let (file, state) = open_state(&settings)?;
    // Everything that can tell another daemon is running, before touching the datapath (the
    // state directory's lock above, the socket, the pin directory's lock).
    api::server::refuse_live_socket(&settings.api_socket)?;
    // Bound (not yet served) before the datapath is touched: a taken address changes nothing.
    let metrics = tokio::net::TcpListener::bind(settings.metrics_addr)
        .await
        .map_err(|source| DaemonError::MetricsBind {
            addr: settings.metrics_addr,
            source,
        })?;
    ensure_bpffs(&settings.bpffs)?;
    let _bpffs_lock = bpffs::lock(&settings.bpffs)?;
    let datapath = load_datapath(&settings)?;
    let (reports, reports_rx) = mpsc::unbounded_channel();
    let mut core = Core::new(settings.clone(), state, file, datapath, reports);
    core.restore()?;
    attach(&mut core, &settings)?;
    finish_upgrade(&mut core.datapath)?;
    let cluster = match &settings.cluster {
        Some(c) => Some(cluster::ClusterLink::connect(c.clone()).await?),
        None => None,
    };
    let daemon = Daemon::new(core, cluster)?;
    if let Some(c) = &settings.cluster {
        // A restarted node serves what etcd says from its first answer; with etcd unreachable
        // it starts from its state file and catches up when etcd answers.
        match daemon.cluster_sync().await {
            Ok(revision) => {
                info!(node = c.node, endpoints = ?c.endpoints, revision, "cluster: apps loaded from etcd and reconciled")
            }
            Err(e) => {
                tracing::warn!(node = c.node, error = %e, "cluster: etcd unreachable at start; serving the state file's apps until it answers")
            }
        }
    }
    // A first scan before serving: connection counts are right from the first call.
    daemon.scan_once().await?;
    // Bound last: a client that can connect finds everything ready.
    let (api, _socket_file) = api::server::bind(&settings.api_socket)?;
    info!(
        socket = %settings.api_socket.display(),
        public_ip = %settings.public_ip,
        snat_ip = %settings.snat_ip,
        ports = %settings.port_range,
        "serving the API"
    );
    let tasks = Tasks::spawn(&daemon, &settings, metrics, reports_rx);
    api::server::serve(api, daemon.clone()).await?;
    drop(tasks);
    stop(daemon, &settings)
    // The API socket's file goes last (`_socket_file`): `gateway down` waits for it.
}

/// Opens (locking) the state directory and loads the state.
fn open_state(settings: &Settings) -> Result<(StateFile, State), DaemonError> {
    let file = StateFile::open(&settings.state_dir)?;
    let state = file.load()?;
    info!(path = %file.path().display(), apps = state.apps.len(), "state loaded");
    Ok((file, state))
}

/// Loads the datapath with its maps pinned under `--bpffs` (reusing those an earlier run
/// left) and configures its addresses and SNAT ports.
fn load_datapath(settings: &Settings) -> Result<Datapath, DaemonError> {
    let mut datapath = Datapath::load_with(&LoadOptions {
        conntrack_capacity: settings.conntrack_size,
        pin_dir: Some(settings.bpffs.clone()),
    })?;
    if datapath.reused_maps().is_empty() {
        info!(bpffs = %settings.bpffs.display(), "datapath loaded, maps pinned");
    } else {
        info!(
            bpffs = %settings.bpffs.display(),
            maps = datapath.reused_maps().len(),
            "datapath loaded, pinned maps reused (connections and counters kept)"
        );
    }
    datapath.configure(
        settings.snat_ip,
        settings.snat_ports.low..=settings.snat_ports.high,
        std::time::Duration::from_nanos(gateway_common::maps::NEXTHOP_MAX_AGE_DEFAULT_NS),
    )?;
    datapath.set_half_open_max(settings.half_open_max)?;
    datapath.set_icmp_rate(settings.icmp_rate)?;
    datapath.set_addresses(&[
        (settings.public_ip, ADDR_PUBLIC),
        (settings.snat_ip, ADDR_SNAT),
    ])?;
    Ok(datapath)
}

/// Attaches to every configured interface (swapping the programs into links an earlier run
/// pinned) and detaches those no longer configured.
fn attach(core: &mut Core, settings: &Settings) -> Result<(), DaemonError> {
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
    let pruned = datapath::prune_links(&settings.bpffs, &wanted)
        .map_err(DaemonError::io("removing old links in", &settings.bpffs))?;
    for name in pruned {
        info!(link = name, "removed a link no longer configured");
    }
    for (iface, mode) in &wanted {
        core.datapath.attach(iface, *mode, Some(&settings.bpffs))?;
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
    Ok(())
}

/// Once this build's programs are in the pinned links: the connections of the previous
/// release's conntrack table are all carried over, and the pins of retired maps removed.
fn finish_upgrade(datapath: &mut Datapath) -> Result<(), DaemonError> {
    let upgrade = datapath.finish_upgrade()?;
    if let Some(from) = upgrade.from {
        info!(
            entries = upgrade.carried_over,
            after_swap = upgrade.after_swap,
            from,
            to = maps::CONNTRACK4,
            "conntrack carried over from the previous release's table: {} entries (connections kept{})",
            upgrade.carried_over,
            if from == maps::CONNTRACK4_V1 {
                ", their sequence tracking learned from their next packets"
            } else {
                ""
            }
        );
    }
    if !upgrade.removed.is_empty() {
        info!(pins = ?upgrade.removed, "removed the pins of retired maps");
    }
    Ok(())
}

/// After serving: stops the checks, then leaves the datapath running, or on `down` (or with
/// `--detach-on-exit`) detaches it and removes the pins.
fn stop(daemon: Daemon, settings: &Settings) -> Result<(), DaemonError> {
    let how = *daemon.exit.borrow();
    let core = daemon.core.clone();
    drop(daemon);
    let mut core = core.lock().unwrap_or_else(|p| p.into_inner());
    core.stop_checks();
    if how == Exit::Detach || settings.detach_on_exit {
        // Other holders of the core (tasks being aborted) may outlive this function: the links
        // are let go of here, so that nothing answers by the time the socket is gone.
        let removed = remove_datapath(&settings.bpffs)?;
        core.datapath.release_attachments();
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
