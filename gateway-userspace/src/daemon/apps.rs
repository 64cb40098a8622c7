//! The operator's requests about apps and backends: status, create, show, change settings,
//! delete, add a backend. Each checks the request against the desired state's rules and
//! commits the change (datapath, then file) or refuses it with nothing changed. Removing a
//! backend and deploys are rotation (`rotation.rs`).

use gateway_common::DropReason;
use tracing::info;

use super::{Daemon, DaemonError, now_ms, resets::Whose};
use crate::{
    api::{AddBackend, AppView, BackendView, CreateApp, Refusals, Status, UpdateApp},
    datapath::ConnectionCounts,
    state::{self, BackendState, WEIGHT_DEFAULT},
};

impl Daemon {
    /// The whole gateway: addresses, attachments, apps, conntrack use and refusals, health-check
    /// counts.
    pub async fn status(&self) -> Result<Status, DaemonError> {
        self.with(|c| {
            let counts = c.counts();
            let global = c.datapath.global_stats()?;
            Ok(Status {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                public_ip: c.settings.public_ip.to_string(),
                snat_ip: c.settings.snat_ip.to_string(),
                port_range: c.settings.port_range.to_string(),
                attachments: c.attachments.clone(),
                apps: c.app_views(),
                conntrack_entries: counts.entries,
                health_checks: c.checks_run,
                health_checks_failed: c.checks_failed,
                conntrack_capacity: u64::from(c.datapath.conntrack_capacity()),
                conntrack_connections: counts.phases,
                refused: Refusals {
                    conntrack_full: global.drops(DropReason::ConntrackFull),
                    snat_exhausted: global.drops(DropReason::SnatExhausted),
                },
                scanned_at_ms: c.scan.started_ms,
            })
        })
        .await
    }

    /// Every app (in cluster mode, those this node does not serve too: `Daemon::cluster_apps`).
    pub async fn apps(&self) -> Result<Vec<AppView>, DaemonError> {
        let local = self.with(|c| Ok(c.app_views())).await?;
        if self.cluster.is_some() {
            return self.cluster_apps(local).await;
        }
        Ok(local)
    }

    /// Creates an app on its port (or the lowest free one).
    pub async fn create_app(&self, req: CreateApp) -> Result<AppView, DaemonError> {
        if self.cluster.is_some() {
            return self.cluster_create_app(req).await;
        }
        if req.nodes.is_some() {
            return Err(DaemonError::NotClustered);
        }
        self.with(move |c| {
            let mut next = c.state.clone();
            next.create_app_with(&req.name, req.port, c.settings.port_range, req.health)?;
            if let Some(mss) = req.mss_clamp {
                next.set_mss_clamp(&req.name, Some(mss))?;
            }
            if let Some(client_address) = req.client_address {
                next.set_client_address(&req.name, client_address)?;
            }
            if req.rate_limit.is_some() || req.plan.is_some() {
                let (limit, plan) = c.rate_limit_of(req.rate_limit, req.plan)?;
                next.set_rate_limit(&req.name, limit, plan)?;
            }
            let app = next.app(&req.name)?.clone();
            c.commit(&req.name, next)?;
            info!(
                app = req.name,
                port = app.port,
                mss_clamp = app.mss_clamp,
                %app.client_address,
                rate_limit = app.rate_limit.map(|l| l.to_string()),
                plan = app.plan,
                "app created"
            );
            Ok(c.app_view(&req.name, &app, &ConnectionCounts::default()))
        })
        .await
    }

    /// App `name` (in cluster mode, one this node does not serve too, from its spec).
    pub async fn app(&self, name: String) -> Result<AppView, DaemonError> {
        match self.local_app(name.clone()).await {
            Err(DaemonError::Refused(state::StateError::UnknownApp(_)))
                if self.cluster.is_some() =>
            {
                self.cluster_app(name).await
            }
            other => other,
        }
    }

    /// App `name` as this node serves it.
    pub(super) async fn local_app(&self, name: String) -> Result<AppView, DaemonError> {
        self.with(move |c| {
            let app = c.state.app(&name)?.clone();
            let counts = c.counts();
            Ok(c.app_view(&name, &app, &counts))
        })
        .await
    }

    /// Changes app `name`'s settings live (each present field of `req`; see [`UpdateApp`]).
    /// Answers the app as changed.
    pub async fn update_app(&self, name: String, req: UpdateApp) -> Result<AppView, DaemonError> {
        if self.cluster.is_some() {
            return self.cluster_update_app(name, req).await;
        }
        self.with(move |c| {
            let mut next = c.state.clone();
            // The app first, so that an unknown app is named as such whatever the settings.
            next.app(&name)?;
            let UpdateApp {
                mss_clamp,
                client_address,
                rate_limit,
                plan,
                nodes,
            } = req;
            if nodes.is_some() {
                return Err(DaemonError::NotClustered);
            }
            if let Some(mss) = mss_clamp {
                next.set_mss_clamp(&name, mss)?;
            }
            if let Some(client_address) = client_address {
                // `null` removes the setting: none.
                next.set_client_address(&name, client_address.unwrap_or_default())?;
            }
            if let Some((limit, plan)) = c.rate_limit_change(rate_limit, plan)? {
                next.set_rate_limit(&name, limit, plan)?;
            }
            if next != c.state {
                c.commit(&name, next)?;
                let app = c.state.app(&name)?;
                info!(
                    app = name,
                    mss_clamp = app.mss_clamp,
                    %app.client_address,
                    rate_limit = app.rate_limit.map(|l| l.to_string()),
                    plan = app.plan,
                    "app settings changed"
                );
            }
            let app = c.state.app(&name)?.clone();
            let counts = c.counts();
            Ok(c.app_view(&name, &app, &counts))
        })
        .await
    }

    /// Deletes app `name`: its port is free, its connections end. Answers the app as it was.
    pub async fn delete_app(&self, name: String) -> Result<AppView, DaemonError> {
        if self.cluster.is_some() {
            return self.cluster_delete_app(name).await;
        }
        self.with(move |c| {
            let mut next = c.state.clone();
            let app = next.delete_app(&name)?;
            let view = c.app_view(&name, &app, &ConnectionCounts::default());
            c.commit(&name, next)?;
            c.latency.remove(&name);
            info!(app = name, port = app.port, "app deleted, port freed");
            // After the commit: a change refused must leave every connection as it was.
            if let Some(ended) = c.end_committed(Whose::App(app.id)) {
                info!(
                    app = name,
                    connections = ended.connections,
                    resets = ended.resets,
                    "ended the app's connections ({} RSTs sent)",
                    ended.resets
                );
            }
            Ok(view)
        })
        .await
    }

    /// App `name`'s backends.
    pub async fn backends(&self, name: String) -> Result<Vec<BackendView>, DaemonError> {
        let n = name.clone();
        let mut views = match self.local_backends(n).await {
            Err(DaemonError::Refused(state::StateError::UnknownApp(_)))
                if self.cluster.is_some() =>
            {
                return self.cluster_backends(name).await;
            }
            other => other?,
        };
        if self.cluster.is_some() {
            self.add_node_states(&name, &mut views).await;
        }
        Ok(views)
    }

    async fn local_backends(&self, name: String) -> Result<Vec<BackendView>, DaemonError> {
        self.with(move |c| {
            let app = c.state.app(&name)?.clone();
            let counts = c.counts();
            Ok(app
                .backends
                .iter()
                .map(|b| c.backend_view_of(b, app.rate_limit, &counts))
                .collect())
        })
        .await
    }

    /// Adds a backend to app `name`, pending until its health checks pass.
    pub async fn add_backend(
        &self,
        name: String,
        req: AddBackend,
    ) -> Result<BackendView, DaemonError> {
        if self.cluster.is_some() {
            return self.cluster_add_backend(name, req).await;
        }
        self.with(move |c| {
            // The app first, so that an unknown app is named as such whatever the address.
            c.state.app(&name)?;
            let addr = state::parse_backend(&req.address)?;
            let mut next = c.state.clone();
            let weight = req.weight.unwrap_or(WEIGHT_DEFAULT);
            let backend =
                next.add_backend_as(&name, addr, weight, BackendState::Pending, now_ms())?;
            c.commit(&name, next)?;
            info!(app = name, backend = %addr, weight, "backend added: pending until its health checks pass");
            Ok(c.backend_view(&backend, &ConnectionCounts::default()))
        })
        .await
    }
}
