//! ICMP errors and path MTU discovery through the gateway (issue 16), end to end in network
//! namespaces with real sockets.
//!
//! Path MTU: the client or the backend sits behind two routers joined by a 1280-byte link
//! (`gateway_tests::routed`, whose module doc says why two routers, and gives the addresses,
//! MTUs and routes). A 5 MiB download from the backend and a 5 MiB upload, at once on two
//! connections, must arrive byte-exact through the real daemon in both attach modes. One of
//! the two directions crosses the gateway before the narrow link: its router's "fragmentation
//! needed" goes to a gateway address, and only the gateway's translation brings it to the
//! sender (the backend for a download to a routed client, the client for an upload to a routed
//! backend). With translation off (the daemon's `--icmp-rate 0`) that direction stalls until
//! the deadline with its sender unaware of the narrow MTU, while the other one, whose router
//! answers its sender directly, still completes: the failure is the lost error, nothing else
//! (both topologies, both modes).
//! The same topologies without the gateway's programs (plain forwarding to the backend's own
//! address) show the routers' errors at work, both ways.
//!
//! Port unreachable: a backend that rejects the SYN with ICMP port unreachable (nftables) makes
//! the client's `connect()` through the gateway fail at once with `ECONNREFUSED` (Linux's
//! answer to that error for a socket in SYN_SENT); untranslated, it times out. The datapath is
//! loaded directly there and each mode's test turns its switch, `Datapath::set_icmp_rate` (0 in
//! a freshly loaded one), from off to on between two connects on the same gateway.

use std::{
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    thread,
    time::{Duration, Instant},
};

use gateway::datapath::AttachMode;
use gateway_common::GlobalStat;
use gateway_tests::{
    bulk::{BulkServer, Direction, Transfer, transfer},
    daemon::Daemon,
    datapath::{BACKEND_PORT, Fixture},
    netns::{Netns, Topology, netns_exists},
    require_root,
    routed::{NARROW_MTU, Narrow, Routed, dest_unreachs_sent, learnt_mtu},
    traffic::sock,
};

/// Each transfer's length.
const LEN: usize = 5 << 20;
/// How long a transfer may take. A completed one takes well under a second here; one whose
/// full-size segments are lost for good makes no progress at all (TCP retransmits the same
/// segment with its timer doubling, 0.2, 0.6, 1.4, 3, 6.2 s...): the deadline bounds the wait.
const DEADLINE: Duration = Duration::from_secs(10);
/// How long the servers serve.
const SERVER_LIFETIME: Duration = Duration::from_secs(60);
/// The connect timeout of the port-unreachable cases: a refusal comes within milliseconds,
/// a SYN without an answer is retransmitted after 1 s, and again after 3 s.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A download and an upload of [`LEN`] bytes between `client` and the server at `to`, at once
/// on two connections.
fn both_ways(client: &Netns, to: SocketAddr) -> (Transfer, Transfer) {
    thread::scope(|s| {
        let down = s.spawn(|| transfer(client, to, Direction::Download, LEN, 1, DEADLINE));
        let up = s.spawn(|| transfer(client, to, Direction::Upload, LEN, 2, DEADLINE));
        (
            down.join().expect("the download's thread"),
            up.join().expect("the upload's thread"),
        )
    })
}

/// The routers send "fragmentation needed" to the endpoints themselves: with no programs
/// attached and the client connecting to the backend's own address (the gateway's kernel
/// forwarding), both transfers complete, both routers sent errors, and both endpoints learnt
/// the narrow MTU toward each other. What the cases through the gateway stand on; also that the
/// topology goes away whole.
fn routers_answer_the_senders(narrow: Narrow) {
    require_root();
    let routed = Routed::new(narrow);
    let names = routed.netns_names();
    let b = &routed.topo.backends[0];
    let server = BulkServer::start(b, SocketAddrV4::new(b.ip, BACKEND_PORT), SERVER_LIFETIME);
    let (down, up) = both_ways(&routed.topo.client, sock(b.ip, BACKEND_PORT));
    let client = &routed.topo.client;
    let report = format!(
        "{narrow}, no programs: {down}; {up}; errors sent by r1 {}, r2 {}; learnt MTU: the \
         client's {:?}, the backend's {:?}",
        dest_unreachs_sent(&routed.routers[0]),
        dest_unreachs_sent(&routed.routers[1]),
        learnt_mtu(client, b.ip),
        learnt_mtu(b, client.ip),
    );
    eprintln!("{report}");
    assert!(down.completed() && up.completed(), "{report}");
    for r in &routed.routers {
        assert!(dest_unreachs_sent(r) > 0, "{}: {report}", r.name());
    }
    assert_eq!(learnt_mtu(client, b.ip), Some(NARROW_MTU), "{report}");
    assert_eq!(learnt_mtu(b, client.ip), Some(NARROW_MTU), "{report}");
    drop(server);
    drop(routed);
    let left: Vec<_> = names.iter().filter(|n| netns_exists(n)).collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
}

#[test]
fn routers_answer_the_senders_narrow_client_side() {
    routers_answer_the_senders(Narrow::Client);
}

#[test]
fn routers_answer_the_senders_narrow_backend_side() {
    routers_answer_the_senders(Narrow::Backend);
}

/// A routed topology with a bulk server on its backend, and the real daemon in `mode`, started
/// with `daemon_args`, serving app `web` (created with `create_args`) on that backend. Fields
/// drop in declaration order: the daemon, the server, then the namespaces.
struct Gateway {
    daemon: Daemon,
    _server: BulkServer,
    routed: Routed,
}

impl Gateway {
    fn start(narrow: Narrow, mode: AttachMode, daemon_args: &[&str], create_args: &[&str]) -> Self {
        require_root();
        let routed = Routed::new(narrow);
        if mode == AttachMode::Xdp {
            routed.xdp_offloads();
        }
        let b = &routed.topo.backends[0];
        let server = BulkServer::start(b, SocketAddrV4::new(b.ip, BACKEND_PORT), SERVER_LIFETIME);
        let daemon = Daemon::start(&routed.topo, Some(mode), daemon_args);
        let create: Vec<&str> = ["app", "create", "web"]
            .into_iter()
            .chain(create_args.iter().copied())
            .collect();
        daemon.ok(&create);
        daemon.ok(&["backend", "add", "web", &format!("{}:{BACKEND_PORT}", b.ip)]);
        daemon.wait_active("web", 1);
        Gateway {
            daemon,
            _server: server,
            routed,
        }
    }

    /// A download and an upload through the app's public endpoint (see [`both_ways`]).
    fn both_ways(&self) -> (Transfer, Transfer) {
        let public = sock(*Fixture::service().ip(), Fixture::service().port());
        both_ways(&self.routed.topo.client, public)
    }

    /// The end whose errors the gateway must translate (the one across the gateway from the
    /// narrow link) and the gateway address it sends to.
    fn far_sender(&self, narrow: Narrow) -> (&Netns, Ipv4Addr) {
        let topo = &self.routed.topo;
        match narrow {
            Narrow::Client => (&topo.backends[0].ns, Topology::SNAT_IP),
            Narrow::Backend => (&topo.client.ns, Topology::PUBLIC_IP),
        }
    }
}

/// Both transfers through the real daemon in `mode`, its ICMP translation on (the default) or
/// off (`--icmp-rate 0`): see the module's doc for what each must do.
fn path_mtu(narrow: Narrow, mode: AttachMode, translate: bool) {
    let extra: &[&str] = if translate {
        &[]
    } else {
        &["--icmp-rate", "0"]
    };
    let gw = Gateway::start(narrow, mode, extra, &[]);
    let (routed, daemon) = (&gw.routed, &gw.daemon);
    let (down, up) = gw.both_ways();
    // The direction whose errors the gateway must translate, its sender and the address that
    // sender sends to; the direction whose router answers its sender directly.
    let (translated, direct) = match narrow {
        Narrow::Client => (&down, &up),
        Narrow::Backend => (&up, &down),
    };
    let (sender, peer) = gw.far_sender(narrow);
    let errors = dest_unreachs_sent(routed.router_near_gateway());
    let counter = |label| daemon.counter(label).expect("a counter of this build");
    let frag_needed = counter("icmp_frag_needed");
    let learnt = learnt_mtu(sender, peer);
    let on = if translate { "on" } else { "off" };
    let report = format!(
        "{narrow}, {mode}, translation {on}: {down}; {up}; errors sent by the router near the \
         gateway {errors}, near the endpoint {}; the gateway's icmp_frag_needed {frag_needed}, \
         icmp_no_flow {}, icmp_rate_limited {}, bad_icmp {}; MTU learnt by the sender of the \
         translated direction ({}) toward {peer}: {learnt:?}",
        dest_unreachs_sent(routed.router_near_endpoint()),
        counter("icmp_no_flow"),
        counter("icmp_rate_limited"),
        counter("bad_icmp"),
        sender.name(),
    );
    eprintln!("{report}");
    assert!(
        direct.completed(),
        "the direction whose router answers its sender directly works whatever the gateway \
         does: {report}"
    );
    assert!(
        errors > 0,
        "the router near the gateway sent no error: {report}"
    );
    if translate {
        assert!(translated.completed(), "{report}");
        assert!(frag_needed > 0, "{report}");
        let scraped = daemon.scrape().value(
            "gateway_icmp_errors_translated_total",
            &[("type", "frag_needed")],
        );
        assert_eq!(scraped, frag_needed as f64, "the metric: {report}");
        assert_eq!(learnt, Some(NARROW_MTU), "{report}");
    } else {
        assert!(
            !translated.completed(),
            "completed without translation: the test tests nothing: {report}"
        );
        assert!(translated.stalled(), "{report}");
        assert_eq!(learnt, None, "{report}");
        assert_eq!(frag_needed, 0, "{report}");
    }
}

#[test]
fn path_mtu_narrow_client_side_xdp() {
    path_mtu(Narrow::Client, AttachMode::Xdp, true);
}

#[test]
fn path_mtu_narrow_client_side_tc() {
    path_mtu(Narrow::Client, AttachMode::Tc, true);
}

#[test]
fn path_mtu_narrow_backend_side_xdp() {
    path_mtu(Narrow::Backend, AttachMode::Xdp, true);
}

#[test]
fn path_mtu_narrow_backend_side_tc() {
    path_mtu(Narrow::Backend, AttachMode::Tc, true);
}

// Translation off: both topologies in both attach modes (what the issue asks: the same test
// fails with the translation off).

#[test]
fn path_mtu_narrow_client_side_stalls_with_icmp_rate_0_xdp() {
    path_mtu(Narrow::Client, AttachMode::Xdp, false);
}

#[test]
fn path_mtu_narrow_client_side_stalls_with_icmp_rate_0_tc() {
    path_mtu(Narrow::Client, AttachMode::Tc, false);
}

#[test]
fn path_mtu_narrow_backend_side_stalls_with_icmp_rate_0_xdp() {
    path_mtu(Narrow::Backend, AttachMode::Xdp, false);
}

#[test]
fn path_mtu_narrow_backend_side_stalls_with_icmp_rate_0_tc() {
    path_mtu(Narrow::Backend, AttachMode::Tc, false);
}

/// The backend's nftables ruleset: every SYN to the backend port refused with ICMP port
/// unreachable, counted.
const REJECT: &str = "table ip pmtu {
    counter rejected {}
    chain input {
        type filter hook input priority 0; policy accept;
        tcp dport 8080 counter name rejected reject with icmp type port-unreachable
    }
}";

/// One connect to the app through the gateway, bounded by [`CONNECT_TIMEOUT`].
struct Attempt {
    /// How it failed (`None`: it connected).
    error: Option<ErrorKind>,
    took: Duration,
    /// SYNs the backend refused meanwhile.
    rejected: u64,
    /// Destination-unreachable errors the gateway translated meanwhile.
    translated: u64,
}

impl std::fmt::Display for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} after {:.2} s, {} SYNs refused by the backend, {} errors translated",
            self.error
                .map_or("connected".to_owned(), |k| format!("{k:?}")),
            self.took.as_secs_f64(),
            self.rejected,
            self.translated
        )
    }
}

fn attempt(topo: &Topology, fx: &Fixture) -> Attempt {
    let counts = || {
        let stats = fx.dp.global_stats().expect("the global counters");
        let (rejected, _) = topo.backends[0].nft_counter("pmtu", "rejected");
        (rejected, stats.get(GlobalStat::IcmpUnreachable))
    };
    let public = sock(*Fixture::service().ip(), Fixture::service().port());
    let (rejected, translated) = counts();
    let started = Instant::now();
    let connect = topo
        .client
        .run(move || TcpStream::connect_timeout(&public, CONNECT_TIMEOUT));
    let took = started.elapsed();
    let (rejected_after, translated_after) = counts();
    Attempt {
        error: connect.err().map(|e| e.kind()),
        took,
        rejected: rejected_after - rejected,
        translated: translated_after - translated,
    }
}

/// A connect through the gateway (the datapath loaded directly in `mode`) to a backend that
/// answers SYNs with ICMP port unreachable: with translation off (as a freshly loaded datapath
/// has it) the connect times out; switched on (`set_icmp_rate(100)`, the daemon's default) on
/// the same gateway, the next one is refused at once. Off first, so that both are reported
/// whichever fails.
fn port_unreachable(mode: AttachMode) {
    require_root();
    let topo = Topology::new(1);
    if mode == AttachMode::Xdp {
        topo.xdp_offloads();
    }
    let b = &topo.backends[0];
    assert_eq!(BACKEND_PORT, 8080, "the port REJECT names");
    b.nft(REJECT);
    let (ips, ifaces, pin) = (
        vec![b.ip],
        topo.gateway_ifaces(),
        topo.bpffs.path().to_owned(),
    );
    let mut fx = topo.gateway.run(move || {
        let mut fx = Fixture::new(mode, &ips, 1 << 12);
        fx.dp.set_icmp_rate(0).expect("the ICMP rate");
        for iface in &ifaces {
            fx.dp.attach(iface, mode, Some(&pin)).expect("attach");
        }
        fx
    });
    let off = attempt(&topo, &fx);
    fx.dp
        .set_icmp_rate(gateway::config::DEFAULT_ICMP_RATE)
        .expect("the ICMP rate");
    let on = attempt(&topo, &fx);
    let report = format!("{mode}: translation off: {off}; on: {on}");
    eprintln!("{report}");
    assert_eq!(off.error, Some(ErrorKind::TimedOut), "{report}");
    assert!(
        off.rejected > 0,
        "the SYNs never reached the backend: {report}"
    );
    assert_eq!(off.translated, 0, "{report}");
    assert_eq!(on.error, Some(ErrorKind::ConnectionRefused), "{report}");
    assert!(on.took < Duration::from_secs(1), "{report}");
    assert!(on.translated > 0, "{report}");
}

#[test]
fn port_unreachable_refuses_the_connect_xdp() {
    port_unreachable(AttachMode::Xdp);
}

#[test]
fn port_unreachable_refuses_the_connect_tc() {
    port_unreachable(AttachMode::Tc);
}

/// The platform that knows its path MTU: the app's MSS clamp (`app create --mss 1240`, the
/// narrow link's 1280 less 40) makes both ends send segments that fit from the start, so both
/// transfers complete even with the ICMP translation off, no sender ever needing path MTU
/// discovery through the gateway (the backend learns no MTU) and the gateway counting the
/// SYN and SYN-ACK it clamped. One topology per attach mode.
fn mss_clamp(narrow: Narrow, mode: AttachMode) {
    let mss = (NARROW_MTU - 40).to_string();
    let gw = Gateway::start(narrow, mode, &["--icmp-rate", "0"], &["--mss", &mss]);
    let daemon = &gw.daemon;
    let (down, up) = gw.both_ways();
    let (sender, peer) = gw.far_sender(narrow);
    let clamped = daemon
        .counter("mss_clamped")
        .expect("a counter of this build");
    let report = format!(
        "{narrow}, {mode}, translation off, MSS clamp {mss}: {down}; {up}; mss_clamped \
         {clamped}; MTU learnt by {} toward {peer}: {:?}",
        sender.name(),
        learnt_mtu(sender, peer),
    );
    eprintln!("{report}");
    assert!(down.completed() && up.completed(), "{report}");
    // Each connection's SYN and SYN-ACK (Linux offers 1460 on a 1500-byte link).
    assert!(clamped >= 4, "{report}");
    assert_eq!(
        daemon.scrape().value("gateway_mss_clamped_total", &[]),
        clamped as f64,
        "the metric: {report}"
    );
    assert_eq!(learnt_mtu(sender, peer), None, "{report}");
}

#[test]
fn mss_clamp_needs_no_path_mtu_discovery_narrow_client_side_xdp() {
    mss_clamp(Narrow::Client, AttachMode::Xdp);
}

#[test]
fn mss_clamp_needs_no_path_mtu_discovery_narrow_backend_side_tc() {
    mss_clamp(Narrow::Backend, AttachMode::Tc);
}
