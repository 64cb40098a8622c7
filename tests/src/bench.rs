//! Benchmarks (`cargo xtask bench ...`). Figures and ratios from one run; nothing here asserts
//! a time.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Instant,
};

use gateway::datapath::{AttachMode, BenchObject, monotonic_ns};
use gateway_common::maps::{
    self, CT_ESTABLISHED, CT_SYN_ACK_SEEN, CT_SYN_SEEN, DIR_FORWARD, DIR_REVERSE, Flow, FlowKey4,
};
use gateway_common::{GlobalStat, bench::BENCH_FLOOR_APP, net::ip_to_net};

use crate::{
    datapath::{APP, Fixture, Program, test_run},
    netns::Topology,
    packet::{Frame, flags},
};

const REPEAT: u32 = 2_000_000;

const SYNS: u16 = 20_000;
/// The client address of the SYN rows (none of the filler flows uses it).
const SYN_CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 3);
/// A service whose one backend is itself: a SYN to it from the SNAT address is rewritten into
/// a SYN to it from a new SNAT port, so with `repeat` every iteration creates a new flow.
const CHAIN: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 20), 7000);
const CHAIN_APP: u32 = 2;
const CHAIN_BACKEND: u32 = 10;
/// New flows per chained test_run call, and calls (the chain's flows are removed after each,
/// so every call starts at the same SNAT port occupancy and ends at ~5%).
const CHAIN_REPEAT: u32 = 1_000;
const CHAIN_CALLS: u16 = 10;

pub fn run(args: &[&str]) {
    crate::require_root();
    match args {
        [] => {
            compare(crate::compare::Plan::FULL);
            datapath(&[1_000, 100_000, 1_000_000]);
        }
        ["--quick"] => {
            compare(crate::compare::Plan::QUICK);
            datapath(&[1_000]);
        }
        ["compare"] => compare(crate::compare::Plan::FULL),
        ["compare", "--quick"] => compare(crate::compare::Plan::QUICK),
        ["datapath"] => datapath(&[1_000, 100_000, 1_000_000]),
        ["datapath", "--quick"] => datapath(&[1_000]),
        ["cluster"] => cluster(1_000),
        ["cluster", "--quick"] => cluster(200),
        ["observability"] => observability(&[100_000, 1_000_000], &[100, 1_000, 3_000]),
        ["observability", "--quick"] => observability(&[10_000], &[100]),
        other => {
            eprintln!(
                "unknown benchmark {other:?}: expected `[--quick]` (all), `compare [--quick]`, `datapath [--quick]`, `cluster [--quick]` or `observability [--quick]`"
            );
            std::process::exit(2);
        }
    }
}

/// Issue 19's target: a change made on one node is programmed in every node's datapath within
/// 100 ms at the median. Three nodes and one etcd (`crate::cluster`), `changes` backend changes
/// on node 1 (`Cluster::propagation`); prints the quantiles and whether the median is within
/// the target.
fn cluster(changes: usize) {
    let c = crate::cluster::Cluster::new(3, 1);
    let took = c.propagation(changes);
    let mut sorted = took.clone();
    sorted.sort();
    let median = sorted[(sorted.len() - 1) / 2];
    println!("\ncluster propagation (3 nodes, TC, one etcd over veth)");
    println!("{}", crate::cluster::quantiles(&took));
    println!(
        "target: median ≤ 100 ms: {}",
        if median <= std::time::Duration::from_millis(100) {
            "met"
        } else {
            "missed"
        }
    );
}

/// A flow whose rewrite reproduces the packet that hit it (but for its TTL), so with `repeat`
/// every iteration takes the established path again, with all of its work (lookup, state,
/// sequence tracking, counters, rewrite, checksums, redirect to the cached next hop). Its
/// sequence numbers are learned from the first packet, as an entry carried over from an older
/// table learns them (`TRACK_LIBERAL`); every later one goes through the window checks.
fn identity_flow(src: SocketAddrV4, dst: SocketAddrV4, direction: u8) -> (FlowKey4, Flow) {
    let k = FlowKey4::from_addrs(src, dst);
    let now = monotonic_ns();
    let flow = Flow {
        nat_src_ip: k.src_ip,
        nat_dst_ip: k.dst_ip,
        nat_src_port: k.src_port,
        nat_dst_port: k.dst_port,
        app_id: crate::datapath::APP,
        backend_id: 1,
        direction,
        state: CT_SYN_SEEN | CT_SYN_ACK_SEEN | CT_ESTABLISHED,
        created_ns: now,
        last_seen_ns: now,
        nexthop_ns: now,
        nexthop_ifindex: 1,
        nexthop_smac: [2, 0, 0, 0, 0, 1],
        nexthop_dmac: [2, 0, 0, 0, 0, 2],
        track: maps::TRACK_LIBERAL,
        wscale: maps::TCP_MAX_WSCALE,
        peer_wscale: maps::TCP_MAX_WSCALE,
        ..Flow::default()
    };
    (k, flow)
}

/// Fills the conntrack table up to `flows` connections (two entries each) of unrelated tuples.
fn fill(fx: &mut Fixture, from: u32, to: u32) {
    for i in from..to {
        let client = SocketAddrV4::new(Ipv4Addr::from(0x0a00_0000 + i), 1024 + (i % 50_000) as u16);
        let (k, f) = identity_flow(client, Fixture::service(), DIR_FORWARD);
        fx.dp.insert_flow(k, f).expect("fill");
        let backend = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 2), 8080);
        let snat = SocketAddrV4::new(Topology::SNAT_IP, (i % 60_000) as u16);
        let (k, f) = identity_flow(backend, snat, DIR_REVERSE);
        let k = FlowKey4 {
            src_ip: k.src_ip ^ (i << 8),
            ..k
        };
        fx.dp.insert_flow(k, f).expect("fill");
    }
}

/// A program of the benchmark's object (its baselines and floors), which shares the fixture's
/// maps.
fn extra<'a>(bench: &'a mut BenchObject, mode: AttachMode, name: &'static str) -> Program<'a> {
    match mode {
        AttachMode::Xdp => Program::Xdp(bench.program(name).expect(name)),
        AttachMode::Tc => Program::Tc(bench.program(name).expect(name)),
    }
}

/// ns per run of `mode`'s program that only returns: the floor of test_run itself.
fn empty(bench: &mut BenchObject, mode: AttachMode, frame: &[u8], repeat: u32) -> f64 {
    let name = match mode {
        AttachMode::Xdp => "bench_empty_xdp",
        AttachMode::Tc => "bench_empty_tc",
    };
    test_run(extra(bench, mode, name), frame, repeat).2
}

/// The production program of `mode` with its hop undone (`gateway-bench`'s `bench_hop_*`):
/// each translation takes one from the TTL, so replaying a translated packet in place with
/// `repeat` would end in TTL drops after 254 runs; these put the TTL back after the program.
fn hop(bench: &mut BenchObject, mode: AttachMode) -> Program<'_> {
    let name = match mode {
        AttachMode::Xdp => "bench_hop_xdp",
        AttachMode::Tc => "bench_hop_tc",
    };
    extra(bench, mode, name)
}

/// ns per run of `mode`'s established path on `frame` (`repeat` runs); panics unless every run
/// was translated and none dropped (a row that measured another path would be worthless).
fn established(
    fx: &Fixture,
    bench: &mut BenchObject,
    mode: AttachMode,
    frame: &[u8],
    repeat: u32,
) -> f64 {
    let before = fx.dp.global_stats().expect("stats");
    let ns = test_run(hop(bench, mode), frame, repeat).2;
    let after = fx.dp.global_stats().expect("stats");
    let translated = (after.get(GlobalStat::Forwarded) + after.get(GlobalStat::Reversed))
        - (before.get(GlobalStat::Forwarded) + before.get(GlobalStat::Reversed));
    let moved: Vec<String> = GlobalStat::ALL
        .iter()
        .map(|g| (g.label(), after.get(*g) - before.get(*g)))
        .chain(
            gateway_common::DropReason::ALL
                .iter()
                .map(|r| (r.label(), after.drops(*r) - before.drops(*r))),
        )
        .filter(|(_, n)| *n != 0)
        .map(|(l, n)| format!("{l} {n}"))
        .collect();
    assert_eq!(
        translated,
        u64::from(repeat),
        "every run was translated: {}",
        moved.join(", ")
    );
    for r in gateway_common::DropReason::ALL {
        assert_eq!(
            after.drops(*r),
            before.drops(*r),
            "no run dropped ({})",
            r.label()
        );
    }
    ns
}

/// ns/packet through BPF_PROG_TEST_RUN, for each attach mode and conntrack size.
fn datapath(sizes: &[u32]) {
    let topo = Topology::new(3);
    // The chained SYNs' rewritten destination: routed out of b0 to a known neighbour, so that
    // the FIB lookup of each new flow succeeds as it does for a real backend.
    let chain_ip = CHAIN.ip();
    topo.gateway.ip(&format!(
        "route add {chain_ip}/32 dev {}",
        topo.backends[0].gw_iface
    ));
    topo.gateway.ip(&format!(
        "neigh replace {chain_ip} lladdr 02:00:00:00:00:99 dev {} nud permanent",
        topo.backends[0].gw_iface
    ));
    let sizes = sizes.to_vec();
    // The datapath's maps are pinned there, so that the benchmark's object shares them.
    let pins = topo.bpffs.path().join("datapath-bench");
    std::fs::create_dir(&pins).expect("a pin directory");
    let rows = topo.gateway.run(move || {
        let backend_ips: Vec<Ipv4Addr> = (0..3)
            .map(|i| Ipv4Addr::new(198, 51, 100, 4 * i + 2))
            .collect();
        let capacity = 2 * sizes.iter().max().unwrap() + 2 * u32::from(SYNS) * 2 + 1024;
        let mut fx = Fixture::pinned(AttachMode::Xdp, &backend_ips, capacity, &pins);
        let mut bench = fx.dp.load_bench().expect("the benchmark's object");
        // The daemon's default SNAT ports (~19k per backend): the SYNs of one row end at
        // ~35% occupancy of each backend's ports, and the collisions are reported.
        let ports = gateway::config::DEFAULT_SNAT_PORTS;
        fx.dp
            .configure(
                Topology::SNAT_IP,
                ports.low..=ports.high,
                std::time::Duration::from_secs(60),
            )
            .expect("configure");
        fx.dp
            .set_backend(CHAIN_BACKEND, CHAIN, true)
            .expect("backend");
        fx.dp
            .set_app_backends(
                CHAIN_APP,
                &[gateway::maglev::Entry {
                    id: CHAIN_BACKEND,
                    addr: CHAIN,
                    weight: 1,
                }],
            )
            .expect("maglev");
        fx.dp.set_service(CHAIN, CHAIN_APP).expect("service");
        // The rows' own SYNs never meet the SYN proxy (nothing here corrects the half-open
        // counts as the daemon's scan does): only the flood row sets a cap.
        fx.dp.set_half_open_max(u32::MAX).expect("half-open max");
        fx.dp
            .set_half_open_global_max(0)
            .expect("no cap of all apps together");
        let svc = Fixture::service();
        let client = SocketAddrV4::new(Topology::CLIENT_IP, 33_333);
        let (kf, ff) = identity_flow(client, svc, DIR_FORWARD);
        fx.dp.insert_flow(kf, ff).unwrap();
        let backend = SocketAddrV4::new(backend_ips[0], 8080);
        let snat = SocketAddrV4::new(Topology::SNAT_IP, 44_444);
        let (kr, fr) = identity_flow(backend, snat, DIR_REVERSE);
        fx.dp.insert_flow(kr, fr).unwrap();
        let forward = Frame::tcp(client, svc, flags::ACK)
            .payload(&[7; 64])
            .build();
        let reverse = Frame::tcp(backend, snat, flags::ACK)
            .payload(&[7; 64])
            .build();
        let other = Frame::tcp(client, SocketAddrV4::new(backend_ips[1], 80), flags::ACK)
            .payload(&[7; 64])
            .build();

        let mut rows: Vec<(String, AttachMode, u32, f64)> = Vec::new();
        let mut filled = 0;
        let mut syn_port = 1u16;
        for &size in &sizes {
            let start = Instant::now();
            fill(&mut fx, filled, size);
            filled = size;
            eprintln!(
                "conntrack filled to {size} flows in {:.1} s",
                start.elapsed().as_secs_f64()
            );
            for mode in AttachMode::ALL {
                fx.mode = mode;
                rows.push((
                    "empty program".into(),
                    mode,
                    size,
                    empty(&mut bench, mode, &other, REPEAT),
                ));
                rows.push((
                    "not for the gateway".into(),
                    mode,
                    size,
                    fx.time(&other, REPEAT),
                ));
                rows.push((
                    "established, client → backend".into(),
                    mode,
                    size,
                    established(&fx, &mut bench, mode, &forward, REPEAT),
                ));
                rows.push((
                    "established, backend → client".into(),
                    mode,
                    size,
                    established(&fx, &mut bench, mode, &reverse, REPEAT),
                ));
                // Issue 18: the same packet, its backend under a packet rate limit it never
                // reaches (10^9 packets/s in bursts of 10^9: each run takes the limit's
                // compare-and-swap and passes).
                fx.dp
                    .set_rate_limit(
                        ff.backend_id,
                        maps::RATE_TO_BACKEND,
                        Some((1_000_000_000, 1_000_000_000)),
                    )
                    .expect("limit");
                rows.push((
                    "established, client → backend, its backend rate-limited".into(),
                    mode,
                    size,
                    established(&fx, &mut bench, mode, &forward, REPEAT),
                ));
                fx.dp
                    .set_rate_limit(ff.backend_id, maps::RATE_TO_BACKEND, None)
                    .expect("no limit");
                // Issue 17: a client segment before its backend's first one (the handshake's
                // ACK, the first request), one run per call (a repeated run would grow the
                // packet it grew): with the client's address added, with only the check for a
                // client's own TOA, and, for the same method, once the backend answered (the
                // established path every later segment takes).
                for (case, toa) in [
                    (
                        "client segment before the backend's first, address added (median)",
                        maps::TOA_PENDING | maps::TOA_ADD,
                    ),
                    (
                        "client segment before the backend's first, no setting (median)",
                        maps::TOA_PENDING,
                    ),
                    (
                        "established, client → backend, one run per call (median)",
                        0,
                    ),
                ] {
                    let client = SocketAddrV4::new(Topology::CLIENT_IP, 33_334);
                    let (kf, ff) = identity_flow(client, svc, DIR_FORWARD);
                    // The reverse entry the TOA step finds: the translated (identical) segment's
                    // tuple reversed. Both entries are written afresh for each case.
                    let (kr, fr) = identity_flow(svc, client, DIR_REVERSE);
                    fx.dp.insert_flow(kf, Flow { toa, ..ff }).unwrap();
                    fx.dp.insert_flow(kr, Flow { toa, ..fr }).unwrap();
                    let segment = Frame {
                        tcp_options: vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2],
                        ..Frame::tcp(client, svc, flags::ACK | flags::PSH)
                    }
                    .payload(&[7; 64])
                    .build();
                    let before = fx.dp.global_stats().expect("stats");
                    let ns = crate::compare::median((0..SYNS).map(|_| fx.time(&segment, 1)));
                    let after = fx.dp.global_stats().expect("stats");
                    let added = after.get(GlobalStat::ToaAdded) - before.get(GlobalStat::ToaAdded);
                    assert_eq!(
                        added,
                        if toa & maps::TOA_ADD != 0 {
                            u64::from(SYNS)
                        } else {
                            0
                        },
                        "{case}: the option added to every run, or to none"
                    );
                    rows.push((case.into(), mode, size, ns));
                }
                // SYNs: one call per new tuple (repeat would find the flow the first made).
                let before = fx.dp.global_stats().expect("stats");
                let mut times = Vec::with_capacity(usize::from(SYNS));
                let mut empty_total = 0.0;
                for _ in 0..SYNS {
                    let c = SocketAddrV4::new(SYN_CLIENT, syn_port);
                    syn_port = syn_port.wrapping_add(1).max(1);
                    let syn = Frame::tcp(c, svc, flags::SYN).build();
                    times.push(fx.time(&syn, 1));
                    empty_total += empty(&mut bench, mode, &syn, 1);
                }
                let after = fx.dp.global_stats().expect("stats");
                let stat = |s: GlobalStat| after.get(s) - before.get(s);
                assert_eq!(
                    stat(GlobalStat::FlowsCreated),
                    u64::from(SYNS),
                    "every SYN made a flow"
                );
                eprintln!(
                    "{mode}, {} flows: {SYNS} SYNs, {} SNAT port collisions",
                    human(size),
                    stat(GlobalStat::SnatCollisions)
                );
                let mean = times.iter().sum::<f64>() / f64::from(SYNS);
                rows.push((
                    "SYN, new flow (median)".into(),
                    mode,
                    size,
                    crate::compare::median(times.iter().copied()),
                ));
                rows.push(("SYN, new flow (mean)".into(), mode, size, mean));
                rows.push((
                    "empty program, one run per call".into(),
                    mode,
                    size,
                    empty_total / f64::from(SYNS),
                ));
                // SYNs in a chain: each iteration's output is the next new flow's SYN, so
                // the figure is of a warm datapath, as the established rows are. The first
                // source port is outside the SNAT range, so no SYN of the chain meets a flow.
                let before = fx.dp.global_stats().expect("stats");
                let mut chain = Vec::new();
                for call in 0..CHAIN_CALLS {
                    let first = SocketAddrV4::new(Topology::SNAT_IP, 60_000 + call);
                    let syn = Frame::tcp(first, CHAIN, flags::SYN).build();
                    chain.push(test_run(hop(&mut bench, mode), &syn, CHAIN_REPEAT).2);
                    fx.dp
                        .conntrack_mut()
                        .remove_where(|f| f.app_id == CHAIN_APP)
                        .expect("remove the chain's flows");
                }
                let after = fx.dp.global_stats().expect("stats");
                let stat = |s: GlobalStat| after.get(s) - before.get(s);
                assert_eq!(
                    stat(GlobalStat::FlowsCreated),
                    u64::from(CHAIN_REPEAT) * u64::from(CHAIN_CALLS),
                    "every iteration of the chain made a flow"
                );
                rows.push((
                    "SYN, new flow (chained, warm)".into(),
                    mode,
                    size,
                    crate::compare::median(chain.into_iter()),
                ));
                // A SYN flood's SYN: its app at its cap of half-open flows, answered with a
                // cookie and nothing kept. One run per call, as the new-flow SYNs (a repeated
                // run would get the SYN-ACK it wrote): compare with the one-run empty program.
                fx.dp.set_half_open_max(1).expect("half-open max");
                fx.dp.set_half_open(APP, 1).expect("half-open");
                let before = fx.dp.global_stats().expect("stats");
                let flood = Frame {
                    tcp_options: vec![2, 4, 0x05, 0xb4],
                    ..Frame::tcp(SocketAddrV4::new(Topology::CLIENT_IP, 7), svc, flags::SYN)
                }
                .build();
                let cookie = crate::compare::median((0..SYNS).map(|_| fx.time(&flood, 1)));
                let after = fx.dp.global_stats().expect("stats");
                assert_eq!(
                    after.get(GlobalStat::SynCookiesSent) - before.get(GlobalStat::SynCookiesSent),
                    u64::from(SYNS),
                    "every SYN answered with a cookie"
                );
                fx.dp.set_half_open_max(u32::MAX).expect("half-open max");
                rows.push((
                    "SYN flood: cookie SYN-ACK (median)".into(),
                    mode,
                    size,
                    cookie,
                ));
                // Floors: what no code of ours could go below.
                match mode {
                    AttachMode::Xdp => {
                        // The kernel's own cost of a new flow's two conntrack inserts, warm
                        // as the chain is, on the same table.
                        let mut pairs = Vec::new();
                        for _ in 0..CHAIN_CALLS {
                            let program = extra(&mut bench, mode, "bench_ct_pair_xdp");
                            pairs.push(test_run(program, &other, CHAIN_REPEAT).2);
                            fx.dp
                                .conntrack_mut()
                                .remove_where(|f| f.app_id == BENCH_FLOOR_APP)
                                .expect("remove the floor's entries");
                        }
                        rows.push((
                            "floor: the conntrack pair's two inserts alone".into(),
                            mode,
                            size,
                            crate::compare::median(pairs.into_iter()),
                        ));
                    }
                    AttachMode::Tc => {
                        let program = extra(&mut bench, mode, "bench_csum_tc");
                        rows.push((
                            "floor: the two checksum helper calls alone".into(),
                            mode,
                            size,
                            test_run(program, &forward, REPEAT).2,
                        ));
                    }
                }
                // Each mode and size starts from the same SNAT port occupancy: the table's
                // filler flows only.
                let client = ip_to_net(SYN_CLIENT);
                let snat = ip_to_net(Topology::SNAT_IP);
                fx.dp
                    .conntrack_mut()
                    .remove_where(|f| f.nat_dst_ip == client || f.nat_src_ip == snat)
                    .expect("remove the SYNs' flows");
            }
        }
        rows
    });
    print_table(&rows);
}

fn print_table(rows: &[(String, AttachMode, u32, f64)]) {
    let mut sizes: Vec<u32> = rows.iter().map(|r| r.2).collect();
    sizes.dedup();
    let mut header = "| case | mode |".to_owned();
    let mut rule = "|---|---|".to_owned();
    for s in &sizes {
        header += &format!(" {} flows |", human(*s));
        rule += "---:|";
    }
    println!("ns/packet (BPF_PROG_TEST_RUN), by conntrack size\n\n{header}\n{rule}");
    let mut keys: Vec<(String, AttachMode)> = Vec::new();
    for r in rows {
        if !keys.iter().any(|k| k.0 == r.0 && k.1 == r.1) {
            keys.push((r.0.clone(), r.1));
        }
    }
    for (case, mode) in keys {
        let mut line = format!("| {case} | {mode} |");
        for s in &sizes {
            let v = rows
                .iter()
                .find(|r| r.0 == case && r.1 == mode && r.2 == *s)
                .map(|r| format!(" {:.0} |", r.3))
                .unwrap_or_else(|| " |".into());
            line += &v;
        }
        println!("{line}");
    }
}

fn human(n: u32) -> String {
    match n {
        n if n >= 1_000_000 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

/// Milliseconds of the median of `runs` runs of `f`.
fn median_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    crate::compare::median((0..runs).map(|_| {
        let start = Instant::now();
        f();
        start.elapsed().as_secs_f64() * 1e3
    }))
}

/// What observability costs the daemon: walking the conntrack table (per entry with aya's
/// iterator, in batches, and a whole scan) by table size, and one metrics scrape by number of
/// apps (5 backends each).
fn observability(flows: &[u32], apps: &[u32]) {
    use gateway::{
        datapath::{Datapath, LoadOptions, Timeouts},
        metrics::{self, DaemonFigures, HealthLatency, Snapshot},
        state::{BackendState, PortRange, State},
    };
    let bpffs = crate::netns::Bpffs::new(&format!("{}-bench", crate::netns::unique_prefix()));
    let capacity = 2 * flows.iter().max().unwrap() + 1024;
    let mut dp = Datapath::load_with(&LoadOptions {
        conntrack_capacity: capacity,
        pin_dir: Some(bpffs.path().to_owned()),
    })
    .expect("load the datapath");
    println!("conntrack walk (ms, median of 3)\n");
    println!("| entries | aya iter (2 syscalls/entry) | batched walk | scan (expire + count) |");
    println!("|---:|---:|---:|---:|");
    let mut filled = 0;
    for &n in flows {
        for i in filled..n {
            let client =
                SocketAddrV4::new(Ipv4Addr::from(0x0a00_0000 + i), 1024 + (i % 50_000) as u16);
            let (k, f) = identity_flow(client, crate::datapath::Fixture::service(), DIR_FORWARD);
            dp.insert_flow(k, f).expect("fill");
        }
        filled = n;
        let pinned = aya::maps::MapData::from_pin(bpffs.path().join(maps::CONNTRACK4)).unwrap();
        let map: aya::maps::HashMap<_, FlowKey4, Flow> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(pinned)).unwrap();
        let iter = median_ms(3, || assert_eq!(map.iter().count(), n as usize));
        let walk = median_ms(3, || {
            let mut count = 0;
            dp.conntrack().walk(|_, _| count += 1).unwrap();
            assert_eq!(count, n);
        });
        let scan = median_ms(3, || {
            let s = dp.scan(monotonic_ns(), &Timeouts::default()).unwrap();
            assert_eq!(s.counts.entries, u64::from(n));
        });
        println!("| {} | {iter:.1} | {walk:.1} | {scan:.1} |", human(n));
    }

    println!("\nmetrics scrape (ms, median of 5; 5 backends per app)\n");
    println!("| apps | backends | read counters | encode | bytes |");
    println!("|---:|---:|---:|---:|---:|");
    let counts = dp.conntrack().counts().unwrap();
    for &n in apps {
        let mut state = State::default();
        let range = PortRange::new(10_000, 60_000);
        for a in 0..n {
            let name = format!("app-{a}");
            state.create_app(&name, None, range).unwrap();
            for b in 0..5u32 {
                let ip = Ipv4Addr::from(0x0a40_0000 + a * 8 + b);
                state
                    .add_backend_as(
                        &name,
                        SocketAddrV4::new(ip, 8080),
                        1,
                        BackendState::Active,
                        0,
                    )
                    .unwrap();
            }
        }
        let latency = HealthLatency::default();
        let read = || Snapshot::read(&state, &dp, &counts, DaemonFigures::default()).unwrap();
        let read_ms = median_ms(5, || drop(read()));
        let mut bytes = 0;
        let encode_ms = median_ms(5, || {
            bytes = metrics::render(read(), &latency).unwrap().len()
        }) - read_ms;
        println!(
            "| {n} | {} | {read_ms:.1} | {encode_ms:.1} | {} |",
            5 * n,
            bytes
        );
    }
    drop(dp);
}

/// The side-by-side benchmark: runs every contender, prints the markdown report and writes it
/// with its JSON and chart under `docs/bench/`.
fn compare(plan: crate::compare::Plan) {
    use crate::compare::{Bench, chart, markdown, medians, to_json};
    let bench = Bench::new(plan.iperf_secs > 0);
    let runs = bench.run(plan);
    drop(bench);
    let results: Vec<_> = runs.iter().map(|(c, f)| (*c, medians(f))).collect();
    let report = markdown(&results, plan);
    println!("\n{report}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/bench");
    std::fs::create_dir_all(&dir).expect("docs/bench");
    std::fs::write(dir.join("latest.md"), &report).expect("write latest.md");
    let json = serde_json::to_string_pretty(&to_json(&results, plan)).unwrap();
    std::fs::write(dir.join("latest.json"), json + "\n").expect("write latest.json");
    match chart(&results, &dir.join("latest.png")) {
        Ok(()) => eprintln!("wrote docs/bench/latest.md, latest.json and latest.png"),
        Err(e) => eprintln!("wrote docs/bench/latest.md and latest.json; no chart: {e}"),
    }
}
