//! Per-container rate limits end to end (issue 18), in both attach modes: the real daemon, an
//! app of two containers limited to 1,000 packets/s each (`--rate-limit 1000pps,burst=100`),
//! another app without a limit. A sender of the test's own (a raw TCP client's bare ACKs, which
//! every conntrack rule lets through as duplicates) pushes, together for 10 s, 5,000 packets/s
//! through one limited container, 800/s through the other, and 1,000/s through the other app's:
//! an nft counter in each backend's namespace says what arrived, each second for the first.
//! Then the limit is changed live, and a bulk transfer goes through a limited container
//! byte-exact.

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

/// Per-second samples of `ns`'s counter while `busy` runs: the counts of each second after the
/// first (which holds the burst), as packets per second of the time between reads.
fn per_second(ns: &Netns, secs: u32, busy: impl FnOnce() + Send) -> Vec<f64> {
    thread::scope(|s| {
        s.spawn(busy);
        let mut samples = Vec::new();
        let start = Instant::now();
        for i in 0..=secs {
            if let Some(wait) =
                (start + Duration::from_secs(u64::from(i))).checked_duration_since(Instant::now())
            {
                thread::sleep(wait);
            }
            samples.push((ns.nft_counter("rl", "got").0, Instant::now()));
        }
        samples
            .windows(2)
            .skip(1)
            .map(|w| (w[1].0 - w[0].0) as f64 / (w[1].1 - w[0].1).as_secs_f64())
            .collect()
    })
}

/// A raw connection from the client to `public` that app's Maglev puts on the backend whose
/// namespace counts it (each backend's counter of [`count_acks`]): one for each of
/// `backends`, in their order, found by trying client ports from `first_port`.
fn one_on_each(
    topo: &Topology,
    backends: &[&Netns],
    public: SocketAddrV4,
    first_port: u16,
) -> Vec<RawTcpClient> {
    let mut found: Vec<Option<RawTcpClient>> = backends.iter().map(|_| None).collect();
    for port in first_port..first_port + 64 {
        let src = SocketAddrV4::new(Topology::CLIENT_IP, port);
        let counts = || -> Vec<u64> {
            backends
                .iter()
                .map(|b| b.nft_counter("rl", "got").0)
                .collect()
        };
        let before = counts();
        let c = RawTcpClient::handshake(&topo.client, src, public).expect("connect");
        c.ack(&[]).expect("the handshake's ACK");
        let deadline = Instant::now() + Duration::from_secs(2);
        let on = loop {
            let after = counts();
            if let Some(i) = (0..backends.len()).find(|&i| after[i] > before[i]) {
                break i;
            }
            assert!(
                Instant::now() < deadline,
                "the ACK from {src} reached no backend"
            );
            thread::sleep(Duration::from_millis(20));
        };
        if found[on].is_none() {
            found[on] = Some(c);
        }
        if found.iter().all(Option::is_some) {
            return found.into_iter().flatten().collect();
        }
    }
    panic!("64 client ports did not reach every backend of {public}");
}

fn limits(mode: AttachMode) {
    require_root();
    let topo = Topology::new(3);
    if mode == AttachMode::Xdp {
        topo.xdp_offloads();
    }
    let daemon = Daemon::start(&topo, Some(mode), &[]);
    let (b0, b1, b2) = (&topo.backends[0], &topo.backends[1], &topo.backends[2]);
    let lifetime = Duration::from_secs(120);
    let _echo: Vec<EchoServer> = [(b0, "b0"), (b1, "b1"), (b2, "b2")]
        .into_iter()
        .map(|(b, name)| EchoServer::start(b, SocketAddrV4::new(b.ip, ECHO), name, lifetime))
        .collect();
    let _bulk = BulkServer::start(b0, SocketAddrV4::new(b0.ip, BULK), lifetime);
    for (app, port, backends, limit) in [
        (
            "limited",
            LIMITED,
            vec![format!("{}:{ECHO}", b0.ip), format!("{}:{ECHO}", b1.ip)],
            Some("1000pps,burst=100"),
        ),
        ("free", FREE, vec![format!("{}:{ECHO}", b2.ip)], None),
        (
            "bulky",
            BULKY,
            vec![format!("{}:{BULK}", b0.ip)],
            Some("1000pps"),
        ),
    ] {
        let port = port.to_string();
        let mut args = vec!["app", "create", app, "--port", &port];
        if let Some(limit) = limit {
            args.extend(["--rate-limit", limit]);
        }
        daemon.ok(&args);
        for backend in &backends {
            daemon.ok(&["backend", "add", app, backend]);
        }
        daemon.wait_active(app, backends.len());
    }
    for b in [b0, b1, b2] {
        count_acks(b, ECHO);
    }
    let public = |port| SocketAddrV4::new(Topology::PUBLIC_IP, port);
    let [limited, second]: [RawTcpClient; 2] =
        one_on_each(&topo, &[b0, b1], public(LIMITED), 42_001)
            .try_into()
            .unwrap_or_else(|_| unreachable!());
    let [free]: [RawTcpClient; 1] = one_on_each(&topo, &[b2], public(FREE), 42_101)
        .try_into()
        .unwrap_or_else(|_| unreachable!());
    let got = |b: &Netns| b.nft_counter("rl", "got").0;
    let dropped = || {
        daemon.scrape().sum(
            "gateway_backend_ratelimit_dropped_packets_total",
            &[("app", "limited"), ("direction", "to_backend")],
        ) as u64
    };
    let health = || {
        let m = daemon.scrape();
        (
            m.value("gateway_health_checks_total", &[]) as u64,
            m.value("gateway_health_check_failures_total", &[]) as u64,
        )
    };
    let before = [got(b0), got(b1), got(b2), dropped()];
    let health_before = health();

    // Together for 10 s: 5,000 packets/s to one container of the limited app, 800/s (within
    // its plan) to its other container, 1,000/s to the other app's container.
    let rates = per_second(b0, 10, || {
        thread::scope(|s| {
            s.spawn(|| flood(&limited, 5_000, 10));
            s.spawn(|| flood(&second, 800, 10));
            s.spawn(|| flood(&free, 1_000, 10));
        })
    });
    let delta = [
        got(b0) - before[0],
        got(b1) - before[1],
        got(b2) - before[2],
        dropped() - before[3],
    ];
    let health_after = health();
    eprintln!(
        "{mode}: the limited container, packets/s in seconds 2-10: {rates:.0?}; \
         got (limited, its sibling, the other app's), drops: {delta:?}"
    );
    // 1,000 a second and the burst of 100.
    assert!(
        within(delta[0], 10_100, 5),
        "the limited container got {}",
        delta[0]
    );
    for (i, rate) in rates.iter().enumerate() {
        assert!(
            within(*rate as u64, 1_000, 5),
            "the limited container got {rate:.0} packets/s in second {} ({rates:.0?})",
            i + 2
        );
    }
    assert_eq!(
        delta[1], 8_000,
        "the app's other container, within its own plan, got {} of 8,000",
        delta[1]
    );
    assert_eq!(
        delta[2], 10_000,
        "the other app's container got {} of 10,000",
        delta[2]
    );
    assert!(
        within(delta[3], 50_000 - delta[0], 5),
        "drops {}, got {}",
        delta[3],
        delta[0]
    );
    // Health checks are not limited: the flooded container passed every one meanwhile.
    assert!(
        health_after.0 >= health_before.0 + 40 && health_after.1 == health_before.1,
        "health checks (done, failed): {health_before:?} before the flood, {health_after:?} after"
    );

    // A new limit applies within a second.
    daemon.ok(&["app", "set", "limited", "--rate-limit", "2000pps,burst=200"]);
    thread::sleep(Duration::from_secs(1));
    let before = got(b0);
    flood(&limited, 5_000, 3);
    let got = got(b0) - before;
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
