//! Per-container rate limits end to end (issue 18, work in progress), in both attach modes:
//! the real daemon, an app limited to 1,000 packets/s per container (`--rate-limit
//! 1000pps,burst=100`), another without a limit. A sender of the test's own (a raw TCP client's
//! bare ACKs, which every conntrack rule lets through as duplicates) pushes 5,000 packets/s for
//! 10 s through the limited container and 1,000 packets/s through the other: an nft counter in
//! each backend's namespace says what arrived. Then the limit is changed live, and a bulk
//! transfer goes through a limited container byte-exact.

use std::{
    net::{SocketAddr, SocketAddrV4},
    thread,
    time::{Duration, Instant},
};

use gateway::datapath::AttachMode;
use gateway_tests::{
    bulk::{self, BulkServer, Direction},
    daemon::Daemon,
    netns::{Netns, Topology},
    rawtcp::RawTcpClient,
    require_root,
    traffic::EchoServer,
};

const ECHO: u16 = 7000;
const BULK: u16 = 7001;
const LIMITED: u16 = 20_011;
const FREE: u16 = 20_012;
const BULKY: u16 = 20_013;

/// Counts the bare ACKs from the gateway's SNAT address to `port` in the backend's namespace.
fn count_acks(ns: &Netns, port: u16) {
    ns.nft(&format!(
        "table ip rl {{\n\
         \tcounter got {{}}\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority -10;\n\
         \t\tip saddr {} tcp dport {port} tcp flags == ack counter name got\n\
         \t}}\n\
         }}\n",
        Topology::SNAT_IP
    ));
}

/// Sends `pps` bare ACKs a second for `secs` seconds on `client`, in batches every 10 ms.
fn flood(client: &RawTcpClient, pps: u32, secs: u32) {
    let start = Instant::now();
    let per_tick = pps / 100;
    for tick in 0..secs * 100 {
        for _ in 0..per_tick {
            client.ack(&[]).expect("send an ACK");
        }
        let next = start + Duration::from_millis(u64::from(tick + 1) * 10);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
}

fn within(got: u64, want: u64, pct: u64) -> bool {
    got * 100 >= want * (100 - pct) && got * 100 <= want * (100 + pct)
}

fn limits(mode: AttachMode) {
    require_root();
    let topo = Topology::new(2);
    if mode == AttachMode::Xdp {
        topo.xdp_offloads();
    }
    let daemon = Daemon::start(&topo, Some(mode), &[]);
    let (b0, b1) = (&topo.backends[0], &topo.backends[1]);
    let lifetime = Duration::from_secs(120);
    let _e0 = EchoServer::start(b0, SocketAddrV4::new(b0.ip, ECHO), "b0", lifetime);
    let _e1 = EchoServer::start(b1, SocketAddrV4::new(b1.ip, ECHO), "b1", lifetime);
    let _bulk = BulkServer::start(b0, SocketAddrV4::new(b0.ip, BULK), lifetime);
    for (app, port, backend, limit) in [
        (
            "limited",
            LIMITED,
            format!("{}:{ECHO}", b0.ip),
            Some("1000pps,burst=100"),
        ),
        ("free", FREE, format!("{}:{ECHO}", b1.ip), None),
        ("bulky", BULKY, format!("{}:{BULK}", b0.ip), Some("1000pps")),
    ] {
        let port = port.to_string();
        let mut args = vec!["app", "create", app, "--port", &port];
        if let Some(limit) = limit {
            args.extend(["--rate-limit", limit]);
        }
        daemon.ok(&args);
        daemon.ok(&["backend", "add", app, &backend]);
    }
    for app in ["limited", "free", "bulky"] {
        daemon.wait_active(app, 1);
    }
    count_acks(b0, ECHO);
    count_acks(b1, ECHO);
    let public = |port| SocketAddrV4::new(Topology::PUBLIC_IP, port);
    let client = |port| SocketAddrV4::new(Topology::CLIENT_IP, port);
    let limited = RawTcpClient::handshake(&topo.client, client(42_001), public(LIMITED))
        .expect("connect to the limited app");
    let free = RawTcpClient::handshake(&topo.client, client(42_002), public(FREE))
        .expect("connect to the free app");

    // 5,000 packets/s for 10 s to the limited container, 1,000/s to the other, together.
    thread::scope(|s| {
        s.spawn(|| flood(&limited, 5_000, 10));
        s.spawn(|| flood(&free, 1_000, 10));
    });
    let got = b0.nft_counter("rl", "got").0;
    // 1,000 a second, the burst of 100, the handshake's ACK.
    assert!(within(got, 10_101, 5), "the limited container got {got}");
    let other = b1.nft_counter("rl", "got").0;
    assert!(
        other >= 10_000,
        "the other app's container got {other} of 10,001"
    );
    let drops = daemon.scrape().value(
        "gateway_backend_ratelimit_dropped_packets_total",
        &[("app", "limited"), ("direction", "to_backend")],
    );
    assert!(
        within(drops as u64, 50_000 - got + 1, 5),
        "drops {drops}, got {got}"
    );

    // A new limit applies within a second.
    daemon.ok(&["app", "set", "limited", "--rate-limit", "2000pps,burst=200"]);
    thread::sleep(Duration::from_secs(1));
    let before = b0.nft_counter("rl", "got").0;
    flood(&limited, 5_000, 3);
    let got = b0.nft_counter("rl", "got").0 - before;
    assert!(within(got, 6_200, 6), "after the change, 3 s gave {got}");

    // A bulk download through a limited container: byte-exact, at least 70% of 1.5 MB/s.
    let len = 3 << 20;
    let t = bulk::transfer(
        &topo.client,
        SocketAddr::V4(public(BULKY)),
        Direction::Download,
        len,
        7,
        Duration::from_secs(20),
    );
    assert!(t.error.is_none(), "the download: {:?}", t.error);
    let rate = len as f64 / t.took.as_secs_f64();
    assert!(rate >= 0.7 * 1.5e6, "{rate:.0} B/s in {:?}", t.took);
}

#[test]
fn a_container_gets_its_plan_through_xdp() {
    limits(AttachMode::Xdp);
}

#[test]
fn a_container_gets_its_plan_through_tc() {
    limits(AttachMode::Tc);
}
