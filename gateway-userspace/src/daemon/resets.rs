//! Ending connections (`app delete`, `backend remove --now`, a drain deadline): each one's
//! ends get an RST they accept (see [`crate::reset`]), then its conntrack pair goes. A failed
//! send is counted and logged, never fatal: the flows are removed anyway.

use std::io;

use tracing::{info, warn};

use super::{Core, DaemonError};
use crate::{
    datapath::{Connection, DatapathError},
    reset::{Reset, ResetSocket},
};

/// The daemon's raw socket for RSTs and what it sent since the daemon started.
#[derive(Debug)]
pub(super) struct Resets {
    /// `None` when it could not be opened at start (then every RST counts as failed).
    socket: Option<ResetSocket>,
    /// RSTs sent.
    pub sent: u64,
    /// RSTs that could not be sent.
    pub failed: u64,
}

impl Resets {
    /// Opens the raw socket in the daemon's network namespace (where the datapath runs: the
    /// kernel routes the RSTs toward both ends from there).
    pub fn open() -> Self {
        let socket = ResetSocket::open()
            .inspect_err(|e| {
                warn!(error = %e, "opening a raw socket failed: the connections the gateway ends will not be reset");
            })
            .ok();
        if socket.is_some() {
            info!("raw socket open: the connections the gateway ends get an RST at each end");
        }
        Resets {
            socket,
            sent: 0,
            failed: 0,
        }
    }
}

/// Whose connections to end.
#[derive(Clone, Copy, Debug)]
pub(super) enum Whose {
    App(u32),
    Backend(u32),
}

/// What ending connections did.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Ended {
    /// Connections whose conntrack pair was removed.
    pub connections: usize,
    /// RSTs sent (two per connection when all went out).
    pub resets: u64,
}

impl Core {
    /// Ends every connection of `whose`: two RSTs each, then its conntrack pair. Failed sends
    /// are counted and logged (one line for the lot) and do not stop the removal.
    pub(super) fn end_connections(&mut self, whose: Whose) -> Result<Ended, DatapathError> {
        let socket = self.resets.socket.as_ref();
        let (mut sent, mut failed, mut error) = (0u64, 0u64, None::<io::Error>);
        let mut reset = |c: &Connection| {
            for rst in Reset::ending(c) {
                let result = match socket {
                    Some(s) => s.send(&rst),
                    None => Err(io::Error::other(
                        "the raw socket could not be opened at start",
                    )),
                };
                match result {
                    Ok(()) => sent += 1,
                    Err(e) => {
                        failed += 1;
                        error.get_or_insert(e);
                    }
                }
            }
        };
        let connections = match whose {
            Whose::App(id) => self.datapath.end_app_connections(id, &mut reset)?,
            Whose::Backend(id) => self.datapath.end_backend_connections(id, &mut reset)?,
        };
        self.resets.sent += sent;
        self.resets.failed += failed;
        if let Some(e) = error {
            warn!(?whose, failed, error = %e, "sending RSTs to the ends of connections failed; the connections were ended anyway");
        }
        Ok(Ended {
            connections,
            resets: sent,
        })
    }

    /// Ends the connections of `whose` once a change that leaves them without a service or a
    /// backend is committed. A failure is logged, not returned: the change stands, and the
    /// connections it could not end expire on their own.
    pub(super) fn end_committed(&mut self, whose: Whose) -> Option<Ended> {
        match self.end_connections(whose) {
            Ok(ended) => Some(ended),
            Err(e) => {
                let error = DaemonError::from(e).chain();
                warn!(
                    ?whose,
                    error, "ending the connections failed; they expire on their own"
                );
                None
            }
        }
    }
}
