//! Issue 15, inputs 1 and 4, end to end in both attach modes with real sockets and the real
//! daemon: a full conntrack table refuses new connections and leaves every old one whole; a
//! SNAT port is not reused toward a backend that holds it in TIME_WAIT.
//!
//! The backend is an [`Acceptor`]: the test holds both ends of every connection, so it checks
//! each one both ways and sees each backend socket's peer (the SNAT address and port).

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::{SocketAddrV4, TcpStream},
    thread,
    time::Duration,
};

use gateway::datapath::AttachMode;
use gateway_tests::{
    hostile::{AT_ONCE, PORT_REUSE, Sandbox, web},
    netns::Topology,
    traffic::{Connecting, IO_TIMEOUT, Pair, TCP_SYN_SENT, tcp_state},
    wait_for,
};

/// `--conntrack-size`: the smallest the daemon takes, 512 connections.
const TABLE: usize = 1024;
/// Connections opened first and left idle: 800 entries.
const OLD: usize = 400;
/// Connects attempted once they are: only `TABLE / 2 - OLD` fit.
const MORE: usize = 200;
/// SNAT ports: twice the connections the table holds, so that the table runs out first (each
/// new flow's 32 random probes find a free port at once), not the ports.
const SNAT_PORTS: &str = "40000-41023";

/// Input 1: `OLD` connections fill most of the table and stay idle; `MORE` connects follow.
/// The table takes as many as it has room for and refuses the others (`conntrack_full`), which
/// never connect; every old connection still works both ways; the backend accepted one socket
/// per connected client, each from its own SNAT port. An LRU table evicted old entries for
/// the new flows instead: old connections broke (reset, or silent), and new SYNs were given
/// SNAT ports of live connections.
fn a_full_table_refuses_new_connections(mode: AttachMode) {
    let size = TABLE.to_string();
    let sb = Sandbox::held(
        mode,
        &["--conntrack-size", &size, "--snat-ports", SNAT_PORTS],
    );
    let acceptor = sb.acceptor.as_ref().expect("a held backend");

    let mut old: Vec<Pair> = (0..OLD).map(|_| sb.pair(IO_TIMEOUT)).collect();
    let status = sb.daemon.fresh_status();
    assert_eq!(
        (status.conntrack_entries, status.conntrack_capacity),
        ((2 * OLD) as u64, TABLE as u64),
        "{mode}: entries and capacity before the new connects"
    );
    let room = TABLE / 2 - OLD;

    let full_before = sb.daemon.drops("conntrack_full");
    let snat_before = sb.daemon.drops("snat_exhausted");
    let attempts = Connecting::start(&sb.topo.client, web(), MORE).expect("start the connects");
    // Settled: each attempt connected, or its SYN was refused (a refused client retransmits
    // its SYN after 1 s and is refused again, so the count can only catch up). Checked after
    // the old connections: those matter most.
    let mut seen = (0, 0.0);
    let settled = wait_for(Duration::from_secs(15), || {
        seen = (
            attempts.connected(),
            sb.daemon.drops("conntrack_full") - full_before,
        );
        seen.0 as f64 + seen.1 >= MORE as f64
    });

    // Every old connection still works, both ways.
    for (i, pair) in old.iter_mut().enumerate() {
        pair.exchange(i as u32).unwrap_or_else(|e| {
            panic!("{mode}: old connection {i} of {OLD} broke once the table was full: {e}")
        });
    }

    let (connected, refused) = attempts.split().expect("split the connects");
    assert_eq!(
        connected.len(),
        room,
        "{mode}: {} of {MORE} new connects made it into a table with room for {room} more connections: a full table must refuse, not evict",
        connected.len()
    );
    assert!(
        settled.is_some(),
        "{mode}: of {MORE} connects, {} connected and {} SYNs refused conntrack_full within 15 s",
        seen.0,
        seen.1
    );
    let refused_syns = sb.daemon.drops("conntrack_full") - full_before;
    assert!(
        refused_syns >= refused.len() as f64,
        "{mode}: {} connects refused, {refused_syns} SYNs counted conntrack_full",
        refused.len()
    );
    assert_eq!(
        sb.daemon.drops("snat_exhausted"),
        snat_before,
        "{mode}: the table ran out, not the SNAT ports"
    );

    // Every new one too: the backend accepted one socket per connected client, and a tag
    // each way tells which is which.
    let backends: Vec<TcpStream> = (0..connected.len())
        .map(|i| {
            acceptor.next(IO_TIMEOUT).unwrap_or_else(|| {
                panic!(
                    "{mode}: the backend accepted {i} of the {} new connections",
                    connected.len()
                )
            })
        })
        .collect();
    pair_up(mode, &connected, &backends);

    // No two connections share a 4-tuple toward the backend: every socket it holds has a peer
    // (SNAT address and port) of its own.
    let peers: BTreeSet<SocketAddrV4> = old
        .iter()
        .map(Pair::snat_addr)
        .chain(backends.iter().map(|b| match b.peer_addr() {
            Ok(std::net::SocketAddr::V4(a)) => a,
            other => panic!("{mode}: a backend socket's peer: {other:?}"),
        }))
        .collect();
    assert_eq!(peers.len(), OLD + room, "{mode}: distinct SNAT peers");
    assert!(
        peers.iter().all(|p| *p.ip() == Topology::SNAT_IP),
        "{mode}: {peers:?}"
    );

    // The refused ones never connected (their SYN retransmissions were refused too) and never
    // failed either: nothing answered them.
    let states: BTreeMap<Option<u8>, usize> = refused.iter().fold(BTreeMap::new(), |mut m, s| {
        *m.entry(tcp_state(s)).or_default() += 1;
        m
    });
    assert_eq!(
        states,
        BTreeMap::from([(Some(TCP_SYN_SENT), refused.len())]),
        "{mode}: the TCP states of the refused connects"
    );

    // What the operator sees: the table full of established connections, none half-open.
    let status = sb.daemon.fresh_status();
    assert_eq!(status.conntrack_entries, TABLE as u64, "{mode}");
    assert_eq!(
        status.conntrack_connections.established,
        (TABLE / 2) as u64,
        "{mode}: {:?}",
        status.conntrack_connections
    );
    assert_eq!(status.conntrack_connections.total(), (TABLE / 2) as u64);
    assert!(status.refused.conntrack_full >= refused.len() as u64);
    let text = sb.daemon.ok(&["status"]);
    assert!(
        text.contains("1024 of 1024 entries in use (100.0%)"),
        "{text}"
    );
}

/// Pairs each of `clients` with its socket among `backends` (same length, any order) by a tag
/// each way: client `i` sends `c<i>`, its backend socket reads it and answers `b<i>`, which
/// client `i` reads. Panics on a connection that does not carry its tag both ways.
#[track_caller]
fn pair_up(mode: AttachMode, clients: &[TcpStream], backends: &[TcpStream]) {
    let tag = |side: char, i: usize| format!("{side}{i:07}").into_bytes();
    for (i, mut c) in clients.iter().enumerate() {
        c.write_all(&tag('c', i))
            .unwrap_or_else(|e| panic!("{mode}: new connection {i}: client write: {e}"));
    }
    let mut answered = BTreeMap::new();
    for (j, mut b) in backends.iter().enumerate() {
        b.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut got = [0u8; 8];
        b.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("{mode}: backend socket {j}: read: {e}"));
        let i: usize = std::str::from_utf8(&got[1..])
            .ok()
            .and_then(|n| n.parse().ok())
            .filter(|_| got[0] == b'c')
            .unwrap_or_else(|| panic!("{mode}: backend socket {j} read {got:?}"));
        assert!(
            answered.insert(i, j).is_none(),
            "{mode}: two backend sockets read client {i}'s tag"
        );
        b.write_all(&tag('b', i))
            .unwrap_or_else(|e| panic!("{mode}: backend socket {j}: write: {e}"));
    }
    for (i, mut c) in clients.iter().enumerate() {
        let mut got = [0u8; 8];
        c.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("{mode}: new connection {i}: client read: {e}"));
        assert_eq!(got.to_vec(), tag('b', i), "{mode}: new connection {i}");
    }
}

#[test]
fn a_full_table_refuses_new_connections_tc() {
    a_full_table_refuses_new_connections(AttachMode::Tc);
}

#[test]
fn a_full_table_refuses_new_connections_xdp() {
    a_full_table_refuses_new_connections(AttachMode::Xdp);
}

/// Input 4, with one SNAT port: a connection the client closed first frees the port (taken
/// over 1 s later, as before); one the backend closed first leaves the backend in TIME_WAIT
/// for that 4-tuple, and the next connect is refused by the gateway (`snat_exhausted`) instead
/// of meeting it: no SYN reaches the backend. Before, the port was taken over after 1 s either
/// way and the new SYN landed on the backend's TIME_WAIT: Linux reuses it for a SYN whose
/// timestamp or sequence number is newer (what happens here, the one client's timestamps
/// growing), and answers any other with a bare ACK (the client resets, the connect needs a
/// retry).
fn a_backend_in_time_wait_keeps_its_snat_port(mode: AttachMode) {
    let sb = Sandbox::held(mode, &["--snat-ports", "5000-5000"]);
    let client = &sb.topo.client;
    let backend = &sb.topo.backends[0];
    let snat = SocketAddrV4::new(Topology::SNAT_IP, 5000);

    // The client closes first: the backend holds nothing, the port is taken over.
    let mut first = sb.pair(IO_TIMEOUT);
    first.exchange(0).unwrap();
    first.close(false).unwrap_or_else(|e| panic!("{mode}: {e}"));
    thread::sleep(PORT_REUSE);
    let mut second = sb.pair(AT_ONCE);
    assert_eq!(second.snat_addr(), snat);
    second.exchange(1).unwrap();

    // The backend closes first: it holds the 4-tuple in TIME_WAIT.
    second.close(true).unwrap_or_else(|e| panic!("{mode}: {e}"));
    let time_wait = wait_for(Duration::from_secs(5), || {
        backend
            .exec_ok(&["ss", "-Htn", "state", "time-wait"])
            .contains(&snat.to_string())
    });
    assert!(
        time_wait.is_some(),
        "{mode}: the backend holds no TIME_WAIT toward {snat}"
    );
    // Idle for longer than a closed connection's port needs before it is taken over.
    thread::sleep(PORT_REUSE);
    let status = sb.daemon.fresh_status();
    assert_eq!(
        status.conntrack_connections.time_wait, 1,
        "{mode}: {:?}",
        status.conntrack_connections
    );

    // SYNs from the SNAT address the backend receives from here on.
    backend.nft(&format!(
        "table ip gwsyn {{
           counter syns {{
           }}
           chain input {{
             type filter hook input priority 0;
             ip saddr {} tcp flags & (syn | ack) == syn counter name syns
           }}
         }}\n",
        Topology::SNAT_IP
    ));
    let before = sb.daemon.drops("snat_exhausted");
    let attempt = Connecting::start(client, web(), 1).expect("start a connect");
    let mut now = before;
    let refused = wait_for(Duration::from_secs(5), || {
        now = sb.daemon.drops("snat_exhausted");
        now > before || attempt.connected() > 0
    });
    let (syns, _) = backend.nft_counter("gwsyn", "syns");
    assert!(
        refused.is_some() && now > before,
        "{mode}: a connect while the backend holds TIME_WAIT on the one SNAT port was not refused: snat_exhausted {before} -> {now}, connected {}, {syns} SYNs reached the backend",
        attempt.connected()
    );
    assert_eq!(attempt.connected(), 0, "{mode}");
    assert_eq!(
        attempt.trying(),
        1,
        "{mode}: the connect failed: nothing answers it"
    );
    assert_eq!(syns, 0, "{mode}: SYNs reached the backend's TIME_WAIT");
    assert!(sb.daemon.status().refused.snat_exhausted > before as u64);
}

#[test]
fn a_backend_in_time_wait_keeps_its_snat_port_tc() {
    a_backend_in_time_wait_keeps_its_snat_port(AttachMode::Tc);
}

#[test]
fn a_backend_in_time_wait_keeps_its_snat_port_xdp() {
    a_backend_in_time_wait_keeps_its_snat_port(AttachMode::Xdp);
}
