//! The desired state's side of rotation: a deploy holds its new backends, then switches to
//! them (the others drain) or aborts; a removed backend drains. The daemon decides when
//! (`daemon::rotation`); these only change the state, all or nothing.

use std::net::SocketAddrV4;

use super::{Backend, BackendState, State, StateError};

impl State {
    /// Starts draining backend `addr` of app `name` until `until_ms`.
    pub fn drain_backend(
        &mut self,
        name: &str,
        addr: SocketAddrV4,
        now_ms: u64,
        until_ms: u64,
    ) -> Result<Backend, StateError> {
        let app = self.app_mut(name)?;
        let b = app
            .backends
            .iter_mut()
            .find(|b| b.addr == addr)
            .ok_or_else(|| StateError::UnknownBackend {
                app: name.to_owned(),
                addr,
            })?;
        if b.state != BackendState::Draining {
            b.state = BackendState::Draining;
            b.since_ms = now_ms;
            b.drain_until_ms = Some(until_ms);
            b.held = false;
        }
        Ok(b.clone())
    }

    /// Starts a deploy of app `name` to the backends `addrs`: those it lacks are added
    /// pending and held; the ones it has stay as they are. Returns the held ones.
    pub fn begin_deploy(
        &mut self,
        name: &str,
        addrs: &[SocketAddrV4],
        weight: u32,
        now_ms: u64,
    ) -> Result<Vec<Backend>, StateError> {
        let app = self.app(name)?;
        if app.deploying() {
            return Err(StateError::DeployInProgress(name.to_owned()));
        }
        if addrs.is_empty() {
            return Err(StateError::EmptyDeploy);
        }
        for (i, a) in addrs.iter().enumerate() {
            if addrs[..i].contains(a) {
                return Err(StateError::DuplicateBackend {
                    app: name.to_owned(),
                    addr: *a,
                });
            }
            if let Some(b) = app.backends.iter().find(|b| b.addr == *a)
                && b.state == BackendState::Draining
            {
                return Err(StateError::Draining {
                    app: name.to_owned(),
                    addr: *a,
                });
            }
        }
        let existing: Vec<SocketAddrV4> = app.backends.iter().map(|b| b.addr).collect();
        let mut held = Vec::new();
        for a in addrs.iter().filter(|a| !existing.contains(a)) {
            self.add_backend_as(name, *a, weight, BackendState::Pending, now_ms)?;
            let b = self.app_mut(name)?.backends.last_mut().expect("just added");
            b.held = true;
            held.push(b.clone());
        }
        Ok(held)
    }

    /// Switches app `name` to `addrs` (a deploy whose new backends are ready): the held ones in
    /// `healthy` become active, the others stop being held (their checks go on: they rise
    /// later), and every backend not in `addrs` starts draining until `drain_until_ms`.
    pub fn switch_deploy(
        &mut self,
        name: &str,
        addrs: &[SocketAddrV4],
        healthy: &[u32],
        now_ms: u64,
        drain_until_ms: u64,
    ) -> Result<(), StateError> {
        let app = self.app_mut(name)?;
        for b in &mut app.backends {
            if b.held {
                b.held = false;
                if healthy.contains(&b.id) {
                    b.state = BackendState::Active;
                    b.since_ms = now_ms;
                }
            } else if !addrs.contains(&b.addr) && b.state != BackendState::Draining {
                b.state = BackendState::Draining;
                b.since_ms = now_ms;
                b.drain_until_ms = Some(drain_until_ms);
            }
        }
        Ok(())
    }

    /// Abandons app `name`'s deploy: its held backends go; the old set is untouched.
    pub fn abort_deploy(&mut self, name: &str) -> Result<Vec<Backend>, StateError> {
        let app = self.app_mut(name)?;
        let (held, kept) = app.backends.drain(..).partition(|b| b.held);
        app.backends = kept;
        Ok(held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::{RANGE, addr};

    #[test]
    fn a_deploy_holds_new_backends_then_switches_or_aborts() {
        let mut s = State::default();
        s.create_app("a", None, RANGE).unwrap();
        for b in ["198.51.100.2:80", "198.51.100.6:80"] {
            s.add_backend("a", addr(b), 1).unwrap();
        }
        let new = [
            addr("198.51.100.6:80"),
            addr("198.51.100.10:80"),
            addr("198.51.100.14:80"),
        ];
        let before = s.clone();
        let dup = [addr("198.51.100.10:80"), addr("198.51.100.10:80")];
        assert!(matches!(
            s.begin_deploy("a", &dup, 1, 5),
            Err(StateError::DuplicateBackend { .. })
        ));
        assert_eq!(s.begin_deploy("a", &[], 1, 5), Err(StateError::EmptyDeploy));
        assert_eq!(s, before);

        // The backend it has stays as it is; the two it lacks are held, pending.
        let held = s.begin_deploy("a", &new, 1, 5).unwrap();
        assert_eq!(held.iter().map(|b| b.addr).collect::<Vec<_>>(), new[1..]);
        assert!(
            held.iter()
                .all(|b| b.held && b.state == BackendState::Pending)
        );
        assert_eq!(
            s.app("a").unwrap().maglev_entries().len(),
            2,
            "the old set still serves"
        );
        assert_eq!(
            s.begin_deploy("a", &new, 1, 6),
            Err(StateError::DeployInProgress("a".into()))
        );
        let mut aborted = s.clone();
        assert_eq!(aborted.abort_deploy("a").unwrap().len(), 2);
        // (Ids handed out are not handed out again at once: only the apps compare.)
        assert_eq!(
            aborted.apps, before.apps,
            "an abort leaves the old set as it was"
        );

        // A quorum of one: the healthy one joins, the other stops being held and stays
        // pending; the backend left out drains.
        s.switch_deploy("a", &new, &[held[0].id], 7, 100).unwrap();
        let state = |a: &str| {
            s.app("a")
                .unwrap()
                .backends
                .iter()
                .find(|b| b.addr == addr(a))
                .cloned()
                .unwrap()
        };
        assert_eq!(state("198.51.100.10:80").state, BackendState::Active);
        assert_eq!(state("198.51.100.14:80").state, BackendState::Pending);
        assert!(!state("198.51.100.14:80").held);
        assert_eq!(state("198.51.100.6:80").state, BackendState::Active);
        let old = state("198.51.100.2:80");
        assert_eq!(
            (old.state, old.drain_until_ms),
            (BackendState::Draining, Some(100))
        );
        assert!(!s.app("a").unwrap().deploying());
        // A draining address cannot join the next deploy until it is gone.
        assert!(matches!(
            s.begin_deploy("a", &[addr("198.51.100.2:80")], 1, 8),
            Err(StateError::Draining { .. })
        ));
    }
}
