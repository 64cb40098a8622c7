//! Ending connections (`app delete`, `backend remove --now`, a drain deadline): each one's
//! ends get an RST they accept (see [`crate::reset`]), then its conntrack pair goes. A failed
//! send is counted and logged, never fatal: the flows are removed anyway.

use std::io;

use gateway_common::maps::Flow;
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

impl Whose {
    /// Whether `flow` is one of theirs.
    fn matches(self, flow: &Flow) -> bool {
        match self {
            Whose::App(id) => flow.app_id == id,
            Whose::Backend(id) => flow.backend_id == id,
        }
    }
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
        let mut batch = Batch::new(|rst: &Reset| match socket {
            Some(s) => s.send(rst),
            None => Err(io::Error::other(
                "the raw socket could not be opened at start",
            )),
        });
        let mut reset = |c: &Connection| {
            for rst in Reset::ending(c) {
                batch.send(&rst);
            }
        };
        let connections = self
            .datapath
            .end_connections(|f| whose.matches(f), &mut reset)?;
        let Batch {
            sent,
            failed,
            error,
            stalled,
            ..
        } = batch;
        self.resets.sent += sent;
        self.resets.failed += failed;
        if let Some(e) = error {
            warn!(?whose, failed, stalled, error = %e, "sending RSTs to the ends of connections failed; the connections were ended anyway");
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

/// One batch of RSTs, sent through `send` (the raw socket): counts what went and what did not.
/// Once a send timed out on a full queue (`WouldBlock`), the rest of the batch counts as failed
/// without being tried: each would wait as long, under the daemon's lock. So a batch waits for
/// the socket at most once.
struct Batch<S> {
    send: S,
    sent: u64,
    failed: u64,
    /// The first error.
    error: Option<io::Error>,
    /// A send would have blocked: the queue is stalled.
    stalled: bool,
}

impl<S: FnMut(&Reset) -> io::Result<()>> Batch<S> {
    fn new(send: S) -> Self {
        Batch {
            send,
            sent: 0,
            failed: 0,
            error: None,
            stalled: false,
        }
    }

    /// Sends `rst`, unless the queue stalled earlier in the batch.
    fn send(&mut self, rst: &Reset) {
        if self.stalled {
            self.failed += 1;
            return;
        }
        match (self.send)(rst) {
            Ok(()) => self.sent += 1,
            Err(e) => {
                self.stalled = e.kind() == io::ErrorKind::WouldBlock;
                self.failed += 1;
                self.error.get_or_insert(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rst() -> Reset {
        Reset {
            from: "203.0.113.10:20000".parse().unwrap(),
            to: "192.0.2.2:40000".parse().unwrap(),
            seq: 1,
        }
    }

    #[test]
    fn a_stalled_queue_is_tried_once_per_batch() {
        let mut tries = 0;
        let mut batch = Batch::new(|_: &Reset| {
            tries += 1;
            match tries {
                1 => Ok(()),
                _ => Err(io::Error::from(io::ErrorKind::WouldBlock)),
            }
        });
        for _ in 0..5 {
            batch.send(&rst());
        }
        let (sent, failed, stalled) = (batch.sent, batch.failed, batch.stalled);
        let kind = batch.error.as_ref().map(io::Error::kind);
        assert_eq!((sent, failed, stalled), (1, 4, true));
        assert_eq!(kind, Some(io::ErrorKind::WouldBlock));
        assert_eq!(
            tries, 2,
            "the sends after the one that would block are not tried"
        );
    }

    #[test]
    fn other_errors_do_not_stop_the_batch() {
        let mut tries = 0;
        let mut batch = Batch::new(|_: &Reset| {
            tries += 1;
            match tries {
                1 => Err(io::Error::from(io::ErrorKind::HostUnreachable)),
                _ => Ok(()),
            }
        });
        for _ in 0..3 {
            batch.send(&rst());
        }
        assert_eq!((batch.sent, batch.failed, batch.stalled), (2, 1, false));
        assert_eq!(tries, 3);
    }
}
