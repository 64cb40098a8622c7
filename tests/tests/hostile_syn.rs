//! Issue 14, inputs 2, 3, 4 and 6, end to end in both attach modes: what may create a flow
//! (only a well-formed SYN with good checksums), where a SYN retransmission goes when its
//! backend has died, and TTL.
//!
//! With ONE SNAT port, a bogus segment that creates a flow holds that port: the next
//! legitimate client cannot connect at once. Bogus segments come from a raw socket (or an
//! AF_PACKET one, for a bad IPv4 header checksum) in the client's namespace, each from a
//! source port of its own, so that `gateway flows` tells whether it made a flow.

use std::{
    net::{SocketAddrV4, TcpStream},
    thread,
    time::{Duration, Instant},
};

use gateway::{datapath::AttachMode, state::BackendState};
use gateway_tests::{
    hostile::{AT_ONCE, ONE_SNAT_PORT, PORT, PORT_REUSE, Sandbox, web, web4},
    netns::{Netns, Topology},
    packet::{Frame, flags},
    raw,
    traffic::EchoClient,
    wait_for,
};

/// The TCP URG flag (`packet::flags` has the others).
const URG: u8 = 0x20;

/// How a bogus segment is sent.
enum Bogus {
    /// IPv4 through a raw socket (the kernel sets the IPv4 header checksum).
    Ipv4(Vec<u8>),
    /// A whole frame through an AF_PACKET socket (nothing is fixed).
    Frame(Vec<u8>),
}

/// Sends `bogus` from the client, then: a legitimate client connects at once and echoes,
/// `gateway flows` shows no flow from `from`, and drop reason `reason` counted it. Then waits
/// until the legitimate connection's SNAT port is free again.
#[track_caller]
fn assert_creates_nothing(
    sb: &Sandbox,
    what: &str,
    from: SocketAddrV4,
    bogus: Bogus,
    reason: &str,
) {
    let mode = sb.mode;
    let client = &sb.topo.client;
    let before = sb.daemon.drops(reason);
    match bogus {
        Bogus::Ipv4(p) => raw::send_ipv4(client, vec![p]),
        Bogus::Frame(f) => raw::send_frames(client, client.iface, vec![f]),
    }
    thread::sleep(Duration::from_millis(100));
    let mut legit = EchoClient::connect_within(client, web(), AT_ONCE).unwrap_or_else(|e| {
        panic!(
            "{mode}: after {what}, a legitimate client cannot connect at once: {e}\n{:?}",
            sb.daemon.flows()
        )
    });
    legit
        .echo(b"legitimate")
        .unwrap_or_else(|e| panic!("{mode}: after {what}: {e}"));
    assert_eq!(sb.flow_state(from), None, "{mode}: {what} created a flow");
    sb.expect_drops(reason, before, 1);
    drop(legit);
    thread::sleep(PORT_REUSE);
}

fn illegal_flags(mode: AttachMode) {
    let sb = Sandbox::echo(mode, 1, &ONE_SNAT_PORT);
    let cases = [
        ("SYN+FIN", flags::SYN | flags::FIN),
        ("SYN+RST", flags::SYN | flags::RST),
        ("no flags", 0),
        ("FIN alone", flags::FIN),
        ("PSH alone", flags::PSH),
        ("URG alone", URG),
    ];
    for (i, (what, tcp_flags)) in cases.into_iter().enumerate() {
        let from = SocketAddrV4::new(Topology::CLIENT_IP, 41000 + i as u16);
        let segment = raw::ipv4(&Frame::tcp(from, web4(), tcp_flags));
        assert_creates_nothing(&sb, what, from, Bogus::Ipv4(segment), "bad_flags");
    }
    // The control: a SYN with flags that may go with it (PSH, URG), sent the same way, makes
    // a flow that `gateway flows` shows, and no bad_flags drop. Without it, "created no flow"
    // above could hold because such a segment shows no flow whatever its flags.
    let from = SocketAddrV4::new(Topology::CLIENT_IP, 41100);
    let before = sb.daemon.drops("bad_flags");
    let syn = raw::ipv4(&Frame::tcp(from, web4(), flags::SYN | flags::PSH | URG));
    raw::send_ipv4(&sb.topo.client, vec![syn]);
    let shown = wait_for(Duration::from_secs(2), || sb.flow_state(from).is_some());
    assert!(
        shown.is_some(),
        "{mode}: a SYN+PSH+URG created no flow: {:?}",
        sb.daemon.flows()
    );
    assert_eq!(
        sb.daemon.drops("bad_flags"),
        before,
        "{mode}: a SYN+PSH+URG was counted as bad_flags"
    );
}

#[test]
fn illegal_flag_combinations_create_no_flow_xdp() {
    illegal_flags(AttachMode::Xdp);
}

#[test]
fn illegal_flag_combinations_create_no_flow_tc() {
    illegal_flags(AttachMode::Tc);
}

fn bad_checksums(mode: AttachMode) {
    let sb = Sandbox::echo(mode, 1, &ONE_SNAT_PORT);
    let from = SocketAddrV4::new(Topology::CLIENT_IP, 42000);
    let syn = Frame::tcp(from, web4(), flags::SYN);
    let tcp = raw::with_bad_tcp_checksum(&syn)[gateway_tests::packet::ETH_LEN..].to_vec();
    assert_creates_nothing(
        &sb,
        "a SYN with a bad TCP checksum",
        from,
        Bogus::Ipv4(tcp),
        "bad_checksum",
    );
    let from = SocketAddrV4::new(Topology::CLIENT_IP, 42001);
    let host = &sb.topo.client;
    let syn = Frame::tcp(from, web4(), flags::SYN).macs(host.mac, host.gw_mac);
    assert_creates_nothing(
        &sb,
        "a SYN with a bad IPv4 header checksum",
        from,
        Bogus::Frame(raw::with_bad_ipv4_checksum(&syn)),
        "bad_checksum",
    );
}

#[test]
fn a_syn_with_a_bad_checksum_creates_no_flow_xdp() {
    bad_checksums(AttachMode::Xdp);
}

#[test]
fn a_syn_with_a_bad_checksum_creates_no_flow_tc() {
    bad_checksums(AttachMode::Tc);
}

/// nftables in a backend's namespace counting the SYNs the gateway sends it (from the SNAT
/// address; health checks come from another one).
fn count_syns(ns: &Netns) {
    let snat = Topology::SNAT_IP;
    ns.nft(&format!(
        "table ip gwsyn {{
           counter syns {{
           }}
           chain input {{
             type filter hook input priority -10;
             ip saddr {snat} tcp dport {PORT} tcp flags & (syn | ack) == syn counter name syns
           }}
         }}\n"
    ));
}

fn syns(ns: &Netns) -> u64 {
    ns.nft_counter("gwsyn", "syns").0
}

fn dead_backend(mode: AttachMode) {
    let extra = ["--check-timeout", "300ms", "--check-fall", "2"];
    let sb = Sandbox::echo(mode, 2, &extra);
    let (client, backends) = (&sb.topo.client, &sb.topo.backends);
    backends.iter().for_each(|b| count_syns(b));

    // Control (passes today): while both backends are healthy, a handshake whose first
    // SYN-ACK is lost completes on the backend its first SYN went to: the client's
    // retransmitted SYN is not balanced afresh.
    let port = 45000;
    client.nft(&format!(
        "table ip gwlose {{
           counter lost {{
           }}
           chain input {{
             type filter hook input priority 0;
             ip saddr {} tcp sport 20000 tcp dport {port} tcp flags & (syn | ack) == syn | ack quota until 100 bytes counter name lost drop
           }}
         }}\n",
        Topology::PUBLIC_IP
    ));
    let rebalanced = sb.counter("syn_rebalanced");
    let from = gateway_tests::traffic::sock(Topology::CLIENT_IP, port);
    let mut c = EchoClient::connect_from(client, from, web())
        .unwrap_or_else(|e| panic!("{mode}: a handshake that lost its SYN-ACK: {e}"));
    c.echo(b"after a lost SYN-ACK").unwrap();
    assert_eq!(
        client.nft_counter("gwlose", "lost").0,
        1,
        "{mode}: one SYN-ACK lost"
    );
    let seen: Vec<u64> = backends.iter().map(|b| syns(b)).collect();
    let chosen: usize = c.server[1..].parse().unwrap();
    assert!(
        seen[chosen] >= 1 && seen[1 - chosen] == 0,
        "{mode}: SYNs per backend {seen:?}, the connection on b{chosen}"
    );
    assert_eq!(sb.counter("syn_rebalanced"), rebalanced, "{mode}");
    drop(c);

    // Backend 1's port starts dropping everything, silently; clients keep connecting.
    let dead_syns = syns(&backends[1]);
    backends[1].nft(&format!(
        "table ip gwdead {{
           chain input {{
             type filter hook input priority 0;
             tcp dport {PORT} drop
           }}
         }}\n"
    ));
    let dropping = Instant::now();
    let to = web();
    let connects: Vec<_> = (0..16)
        .map(|_| {
            client.spawn_thread(move || {
                let r = TcpStream::connect_timeout(&to, Duration::from_secs(8))
                    .and_then(EchoClient::from_stream)
                    .map(|c| c.server);
                (r, Instant::now())
            })
        })
        .collect();
    let b1 = sb.backend(1);
    let state = || {
        sb.daemon
            .backends("web")
            .into_iter()
            .find(|b| b.address == b1)
            .map(|b| b.state)
    };
    wait_for(Duration::from_secs(5), || {
        state() == Some(BackendState::Unhealthy)
    })
    .unwrap_or_else(|| panic!("{mode}: b1 is {:?}\n{}", state(), sb.daemon.log()));
    let unhealthy = Instant::now();
    // Each connect's outcome, and when it came (s after the port began dropping).
    let results: Vec<(Result<String, String>, f64)> = connects
        .into_iter()
        .map(|t| {
            let (r, done) = t.join().expect("connect thread");
            let at = done.duration_since(dropping).as_secs_f64();
            (r.map_err(|e| e.to_string()), at)
        })
        .collect();
    let left = unhealthy.duration_since(dropping).as_secs_f64();
    assert!(
        syns(&backends[1]) > dead_syns,
        "{mode}: no connect went to the dying backend first: the test proves nothing"
    );
    for (i, (r, at)) in results.iter().enumerate() {
        let context =
            format!("b1 left rotation at {left:.2} s; connects (outcome, s): {results:?}");
        match r {
            Ok(server) => assert_eq!(server, "b0", "{mode}: connect {i}; {context}"),
            Err(e) => panic!(
                "{mode}: connect {i} failed ({e}): its SYN retransmissions stuck to the dead backend; {context}"
            ),
        }
        assert!(
            at - left <= 3.0,
            "{mode}: connect {i} succeeded more than 3 s after the backend left rotation; {context}"
        );
    }
    sb.expect_counted("syn_rebalanced", rebalanced, 1);
}

#[test]
fn syn_retransmissions_to_a_dead_backend_are_balanced_afresh_xdp() {
    dead_backend(AttachMode::Xdp);
}

#[test]
fn syn_retransmissions_to_a_dead_backend_are_balanced_afresh_tc() {
    dead_backend(AttachMode::Tc);
}

/// nftables counters of the gateway's translated traffic arriving in `ns` (`match_`: an
/// nft match for it) with TTL 63 (`decremented`) and with any other TTL (`other`).
fn count_ttls(ns: &Netns, match_: &str) {
    ns.nft(&format!(
        "table ip gwttl {{
           counter decremented {{
           }}
           counter other {{
           }}
           chain input {{
             type filter hook input priority 0;
             {match_} ip ttl 63 counter name decremented
             {match_} ip ttl != 63 counter name other
           }}
         }}\n"
    ));
}

fn ttls(ns: &Netns) -> (u64, u64) {
    (
        ns.nft_counter("gwttl", "decremented").0,
        ns.nft_counter("gwttl", "other").0,
    )
}

fn ttl(mode: AttachMode) {
    let sb = Sandbox::echo(mode, 1, &[]);
    let (client, backend) = (&sb.topo.client, &sb.topo.backends[0]);
    // Both ends send with TTL 64 (the namespaces' default).
    count_ttls(
        backend,
        &format!("ip saddr {} tcp dport {PORT}", Topology::SNAT_IP),
    );
    count_ttls(
        client,
        &format!("ip saddr {} tcp sport 20000", Topology::PUBLIC_IP),
    );
    count_syns(backend);
    let mut c = EchoClient::connect(client, web()).unwrap();
    c.echo(&gateway_tests::traffic::payload(3000, 1)).unwrap();
    drop(c);
    thread::sleep(Duration::from_millis(200));
    let (at_backend, at_client) = (ttls(backend), ttls(client));
    assert!(
        at_backend.0 > 0 && at_backend.1 == 0,
        "{mode}: the client's packets at the backend (TTL 63, other): {at_backend:?}"
    );
    assert!(
        at_client.0 > 0 && at_client.1 == 0,
        "{mode}: the backend's packets at the client (TTL 63, other): {at_client:?}"
    );

    // A SYN sent with TTL 1 would leave the gateway with TTL 0: it goes no further.
    let exceeded = sb.counter("ttl_exceeded");
    let syns_before = syns(backend);
    let to = web();
    let connected = client.run(move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.set_ttl_v4(1)?;
        s.connect_timeout(&to.into(), Duration::from_millis(1500))
    });
    assert!(
        connected.is_err(),
        "{mode}: a connection whose SYN had TTL 1 was made through the gateway"
    );
    assert_eq!(
        syns(backend),
        syns_before,
        "{mode}: a SYN with TTL 1 reached the backend"
    );
    sb.expect_counted("ttl_exceeded", exceeded, 1);
}

#[test]
fn ttl_is_decremented_and_a_syn_with_ttl_1_goes_no_further_xdp() {
    ttl(AttachMode::Xdp);
}

#[test]
fn ttl_is_decremented_and_a_syn_with_ttl_1_goes_no_further_tc() {
    ttl(AttachMode::Tc);
}
