//! The reconciler: programs the datapath from the desired state, one app at a time as it
//! changes ([`Core::program`]), and all of it at start ([`Core::restore`]), removing what the
//! state no longer has.

use std::{collections::HashSet, net::SocketAddrV4};

use gateway_common::maps::{AppConfig, MAX_APPS, MAX_BACKENDS, RATE_FROM_BACKEND, RATE_TO_BACKEND};
use tracing::{info, warn};

use super::{Core, DaemonError, resets::Whose};
use crate::{
    datapath::{Datapath, DatapathError},
    state::{App, RateLimit},
};

/// Sets backend `id`'s rate limit, both directions (the same numbers), or removes it.
fn set_rate_limit(
    d: &mut Datapath,
    id: u32,
    limit: Option<RateLimit>,
) -> Result<(), DatapathError> {
    let limit = limit.map(RateLimit::datapath);
    d.set_rate_limit(id, RATE_TO_BACKEND, limit)?;
    d.set_rate_limit(id, RATE_FROM_BACKEND, limit)
}

/// `app`'s datapath settings ([`gateway_common::maps::APP_CONFIG`]): all of them, written
/// together, so that a change of one keeps the others.
fn app_config(app: &App) -> AppConfig {
    AppConfig {
        mss_clamp: app.mss_clamp.unwrap_or(0),
        flags: app.client_address.flags(),
        ..AppConfig::default()
    }
}

impl Core {
    /// Programs the datapath from `old` to `new` for one app. `fresh`: ids new to the
    /// datapath get zeroed counters (not on a restore, which keeps them).
    pub(super) fn program(
        &mut self,
        old: Option<&App>,
        new: Option<&App>,
        fresh: bool,
    ) -> Result<(), DatapathError> {
        let public_ip = self.settings.public_ip;
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
            // Its settings before the service, so that the first SYN finds them. Always for an
            // app new to the datapath: its id may hold a deleted app's.
            if old.is_none_or(|o| app_config(o) != app_config(new)) {
                d.set_app_config(new.id, app_config(new))?;
            }
            // Each backend's rate limit before it takes packets: always for a backend new to
            // the datapath (its id may hold a removed backend's), every one when it changed.
            let limit_changed = old.is_none_or(|o| o.rate_limit != new.rate_limit);
            for b in &new.backends {
                if limit_changed || !known(b.id) {
                    set_rate_limit(d, b.id, new.rate_limit)?;
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
                d.set_service(SocketAddrV4::new(public_ip, new.port), new.id)?;
            }
            for b in new.backends.iter().filter(|b| !b.state.accepting()) {
                d.set_backend(b.id, b.addr, false)?;
            }
        }
        if let Some(old) = old {
            let kept = |id| new.is_some_and(|n: &App| n.backends.iter().any(|b| b.id == id));
            if new.is_none() {
                // Its connections are ended by the caller once the change is committed (an
                // undo must find them untouched).
                let d = &mut self.datapath;
                d.remove_service(SocketAddrV4::new(public_ip, old.port))?;
                d.remove_app_table(old.id)?;
                d.set_app_config(old.id, AppConfig::default())?;
            }
            for b in old.backends.iter().filter(|b| !kept(b.id)) {
                // Out of the table already; its established flows go on.
                self.datapath.set_backend(b.id, b.addr, false)?;
                // Its id may be given to another backend: no limit left behind.
                if old.rate_limit.is_some() {
                    set_rate_limit(&mut self.datapath, b.id, None)?;
                }
            }
        }
        Ok(())
    }

    /// Brings the datapath in line with the persisted state at start: a deploy the restart
    /// interrupted is aborted, every app programmed, services, tables and settings of apps
    /// that no longer exist removed.
    pub(super) fn restore(&mut self) -> Result<(), DaemonError> {
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
                let ended = self.end_connections(Whose::App(id))?;
                info!(
                    app.id = id,
                    connections = ended.connections,
                    resets = ended.resets,
                    "ended the connections of an app the state does not have ({} RSTs sent)",
                    ended.resets
                );
            }
        }
        // An array has no keys to list: every slot is read (MAX_APPS lookups, at start only).
        let ids: HashSet<u32> = apps.iter().map(|a| a.id).collect();
        for id in 1..MAX_APPS {
            if !ids.contains(&id) && self.datapath.app_config(id)? != AppConfig::default() {
                self.datapath.set_app_config(id, AppConfig::default())?;
                info!(
                    app.id = id,
                    "cleared the settings of an app the state does not have"
                );
            }
        }
        // The same for backends' rate limits (2 × MAX_BACKENDS lookups, at start only).
        let backends: HashSet<u32> = apps
            .iter()
            .flat_map(|a| a.backends.iter().map(|b| b.id))
            .collect();
        let mut cleared = 0;
        for id in 1..MAX_BACKENDS {
            if backends.contains(&id) {
                continue;
            }
            let set = |d: &Datapath, dir| d.rate_limit(id, dir).map(|l| l.interval_ns != 0);
            if set(&self.datapath, RATE_TO_BACKEND)? || set(&self.datapath, RATE_FROM_BACKEND)? {
                set_rate_limit(&mut self.datapath, id, None)?;
                cleared += 1;
            }
        }
        if cleared > 0 {
            info!(
                backends = cleared,
                "cleared the rate limits of backends the state does not have"
            );
        }
        Ok(())
    }
}
