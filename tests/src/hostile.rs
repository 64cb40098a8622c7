//! What the hostile-traffic tests (`tests/tests/hostile_*.rs`, issue 14) share: a sandbox
//! with the real daemon in one attach mode and app `web` on its backends, a way to read the
//! datapath's counters by their label, and the checks for "this end was reset".
//!
//! Counters: drop reasons are read from the scrape (`gateway_drops_total{reason=...}`), the
//! datapath's other global counters from the pinned map by their label ([`Daemon::counter`]),
//! so that a counter this build does not have reads as 0 and the assertion on it fails.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpStream},
    thread,
    time::{Duration, Instant},
};

use gateway::datapath::AttachMode;

use crate::{
    daemon::Daemon,
    datapath::Fixture,
    netns::Topology,
    traffic::{Acceptor, EchoServer, Pair},
    wait_for,
};

/// The backends' port.
pub const PORT: u16 = 8080;
/// How long servers serve.
pub const LIFETIME: Duration = Duration::from_secs(120);
/// Daemon flags for a SNAT range of one port: a flow that holds it shows at once, as a
/// connection that cannot be made.
pub const ONE_SNAT_PORT: [&str; 2] = ["--snat-ports", "5000-5000"];
/// A connect that must succeed "at once": before the client's first SYN retransmission (1 s),
/// so its first SYN got through.
pub const AT_ONCE: Duration = Duration::from_millis(900);
/// A SNAT port of a closed connection is taken over once it has been idle for 1 s; waiting
/// this long after a connection closed frees the one port of [`ONE_SNAT_PORT`].
pub const PORT_REUSE: Duration = Duration::from_millis(1500);

/// App `web`'s public endpoint.
pub fn web() -> SocketAddr {
    SocketAddr::V4(web4())
}

/// App `web`'s public endpoint, IPv4: the daemon gives its first app the first port of its
/// default range, the fixture's [`SERVICE_PORT`](crate::datapath::SERVICE_PORT).
pub fn web4() -> SocketAddrV4 {
    Fixture::service()
}

/// A topology, the daemon in one attach mode and app `web` with every backend active. Fields
/// drop in order: the daemon, the servers, then the namespaces.
pub struct Sandbox {
    pub daemon: Daemon,
    /// The held server of [`Sandbox::held`].
    pub acceptor: Option<Acceptor>,
    pub servers: Vec<EchoServer>,
    pub topo: Topology,
    pub mode: AttachMode,
}

impl Sandbox {
    /// `backends` echo servers (named `b<i>`), the daemon with `extra` flags.
    #[track_caller]
    pub fn echo(mode: AttachMode, backends: usize, extra: &[&str]) -> Self {
        let topo = Self::topology(mode, backends);
        let servers = topo.echo_servers(PORT, LIFETIME);
        Self::finish(topo, None, servers, mode, extra)
    }

    /// One backend whose connections the test holds (an [`Acceptor`]), the daemon with
    /// `extra` flags.
    #[track_caller]
    pub fn held(mode: AttachMode, extra: &[&str]) -> Self {
        let topo = Self::topology(mode, 1);
        let b = &topo.backends[0];
        let acceptor = Acceptor::start(
            b,
            SocketAddrV4::new(b.ip, PORT),
            Topology::SNAT_IP,
            LIFETIME,
        );
        Self::finish(topo, Some(acceptor), Vec::new(), mode, extra)
    }

    fn topology(mode: AttachMode, backends: usize) -> Topology {
        crate::require_root();
        let topo = Topology::new(backends);
        if mode == AttachMode::Xdp {
            topo.xdp_offloads();
        }
        topo
    }

    fn finish(
        topo: Topology,
        acceptor: Option<Acceptor>,
        servers: Vec<EchoServer>,
        mode: AttachMode,
        extra: &[&str],
    ) -> Self {
        let daemon = Daemon::start(&topo, Some(mode), extra);
        let all: Vec<String> = (0..topo.backends.len())
            .map(|i| backend(&topo, i))
            .collect();
        daemon.app_with_backends("web", &all);
        Sandbox {
            daemon,
            acceptor,
            servers,
            topo,
            mode,
        }
    }

    /// Backend `i`'s address, `IP:PORT`.
    pub fn backend(&self, i: usize) -> String {
        backend(&self.topo, i)
    }

    /// A connection from the client through the gateway to the held backend, panicking if it
    /// cannot be made within `timeout`.
    #[track_caller]
    pub fn pair(&self, timeout: Duration) -> Pair {
        let acceptor = self
            .acceptor
            .as_ref()
            .expect("a sandbox with a held backend");
        Pair::open(&self.topo.client, web(), acceptor, timeout)
            .unwrap_or_else(|e| panic!("{}: a connection through the gateway: {e}", self.mode))
    }

    /// The datapath's global counter `label` (0 when this build has none of that label).
    pub fn counter(&self, label: &str) -> u64 {
        self.daemon.counter(label).unwrap_or(0)
    }

    /// Waits up to 2 s until drop reason `reason` has counted at least `n` packets more than
    /// `before` (in the scrape); panics with the numbers if it has not.
    #[track_caller]
    pub fn expect_drops(&self, reason: &str, before: f64, n: u32) {
        let mut now = before;
        let counted = wait_for(Duration::from_secs(2), || {
            now = self.daemon.drops(reason);
            now >= before + f64::from(n)
        });
        assert!(
            counted.is_some(),
            "{}: gateway_drops_total{{reason=\"{reason}\"}} went {before} -> {now}, not up by {n}",
            self.mode
        );
    }

    /// Waits up to 2 s until global counter `label` has counted at least `n` more than
    /// `before`; panics with the numbers if it has not.
    #[track_caller]
    pub fn expect_counted(&self, label: &str, before: u64, n: u64) {
        let mut now = before;
        let counted = wait_for(Duration::from_secs(2), || {
            now = self.counter(label);
            now >= before + n
        });
        let exists = self.daemon.counter(label).is_some();
        assert!(
            counted.is_some(),
            "{}: counter {label} went {before} -> {now}, not up by {n}{}",
            self.mode,
            if exists {
                ""
            } else {
                " (this build has no counter of that label)"
            }
        );
    }

    /// The state `gateway flows` shows for the connection of client `client`, if it has one.
    #[track_caller]
    pub fn flow_state(&self, client: SocketAddrV4) -> Option<String> {
        let client = client.to_string();
        self.daemon
            .flows()
            .flows
            .into_iter()
            .find(|f| f.client == client)
            .map(|f| f.state)
    }
}

fn backend(topo: &Topology, i: usize) -> String {
    SocketAddrV4::new(topo.backends[i].ip, PORT).to_string()
}

/// How a read that was waiting ended, and when.
pub type ReadEnd = (std::io::Result<usize>, Instant);

/// A thread blocked in `read()` on (a clone of) `stream` for at most `limit`.
pub fn blocked_read(stream: &TcpStream, limit: Duration) -> thread::JoinHandle<ReadEnd> {
    let mut s = stream.try_clone().expect("clone a socket");
    s.set_read_timeout(Some(limit)).expect("read timeout");
    thread::spawn(move || {
        let mut buf = [0u8; 64];
        let r = s.read(&mut buf);
        (r, Instant::now())
    })
}

/// Panics unless `end` is an `ECONNRESET` no later than `deadline`.
#[track_caller]
pub fn assert_reset(what: &str, end: &ReadEnd, deadline: Instant) {
    let (r, when) = end;
    match r {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {
            let late = when.saturating_duration_since(deadline);
            assert!(late.is_zero(), "{what}: ECONNRESET, but {late:?} late");
        }
        Err(e) => panic!("{what}: {e} ({:?}), not ECONNRESET", e.kind()),
        Ok(0) => panic!("{what}: end of stream (a FIN), not ECONNRESET"),
        Ok(n) => panic!("{what}: read {n} bytes, not ECONNRESET"),
    }
}

/// Writes a few bytes on `stream`, then reads: panics unless that ends in `ECONNRESET`
/// within `within` (a write refused with it counts).
#[track_caller]
pub fn assert_write_reset(what: &str, stream: &TcpStream, within: Duration) {
    let start = Instant::now();
    let mut s = stream.try_clone().expect("clone a socket");
    s.set_read_timeout(Some(within)).expect("read timeout");
    let end = match s.write_all(b"anyone there?") {
        Err(e) => (Err(e), Instant::now()),
        Ok(()) => {
            let mut buf = [0u8; 64];
            let r = s.read(&mut buf);
            (r, Instant::now())
        }
    };
    assert_reset(what, &end, start + within);
}
