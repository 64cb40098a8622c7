//! Side-by-side benchmark (`cargo xtask bench compare`): the gateway against the direct path,
//! nftables full NAT and HAProxy, one after another on the same namespace topology, each
//! contender forwarding `public_ip:port` to the backends. Every load loop is bounded in time
//! and stops on its own; nothing leaves the namespaces.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use gateway::datapath::AttachMode;
use serde_json::json;

use crate::{
    daemon::Daemon,
    netns::{ChildGuard, Netns, RunDir, SysctlGuard, Topology, unique_prefix},
};

/// Port of the request/response servers on each backend.
const RR_PORT: u16 = 8080;
/// Port of the iperf3 server on backend 0.
const BULK_PORT: u16 = 5201;
/// Public ports of the two services every contender offers.
const PUBLIC_RR: u16 = 20000;
const PUBLIC_BULK: u16 = 20001;
/// Request and response size of the request/response tests.
const MESSAGE: usize = 64;
/// Extra client addresses, so that short connections do not run out of source ports.
const CLIENT_ADDRS: u8 = 16;
/// Concurrent clients of the connection-rate test.
const RR_THREADS: usize = 4;

/// One contender.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contender {
    Direct,
    Gateway(AttachMode),
    Nftables,
    Haproxy,
}

impl Contender {
    pub const ALL: [Contender; 5] = [
        Contender::Direct,
        Contender::Gateway(AttachMode::Tc),
        Contender::Gateway(AttachMode::Xdp),
        Contender::Nftables,
        Contender::Haproxy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Contender::Direct => "direct",
            Contender::Gateway(AttachMode::Tc) => "gateway (tc)",
            Contender::Gateway(AttachMode::Xdp) => "gateway (xdp)",
            Contender::Nftables => "nftables full NAT",
            Contender::Haproxy => "HAProxy (mode tcp)",
        }
    }

    /// Where the client connects for request/response (direct: every backend in turn, so
    /// that it meets as many servers as the balancers spread over) and for bulk transfers.
    fn targets(self, topo: &Topology) -> (Vec<SocketAddr>, SocketAddr) {
        match self {
            Contender::Direct => (
                topo.backends
                    .iter()
                    .map(|b| SocketAddrV4::new(b.ip, RR_PORT).into())
                    .collect(),
                SocketAddrV4::new(topo.backends[0].ip, BULK_PORT).into(),
            ),
            _ => (
                vec![SocketAddrV4::new(Topology::PUBLIC_IP, PUBLIC_RR).into()],
                SocketAddrV4::new(Topology::PUBLIC_IP, PUBLIC_BULK).into(),
            ),
        }
    }
}

/// A contender set up in the topology; torn down on drop.
enum Running {
    Direct,
    Gateway(Daemon),
    Nftables(String),
    Haproxy { _child: ChildGuard, _dir: RunDir },
}

impl Drop for Running {
    fn drop(&mut self) {
        match self {
            Running::Direct | Running::Haproxy { .. } => {}
            Running::Gateway(daemon) => {
                // Detach: the next contender meets a gateway namespace without programs.
                let _ = daemon.cli(&["down"]);
            }
            Running::Nftables(ns) => {
                let _ = crate::netns::netns_command(ns, "nft")
                    .args(["delete", "table", "ip", "gwbench"])
                    .status();
            }
        }
    }
}

fn backend_rr(topo: &Topology, i: usize) -> String {
    SocketAddrV4::new(topo.backends[i].ip, RR_PORT).to_string()
}

/// Sets `c` up; `bulk`: the bulk service too (an iperf3 server runs on backend 0).
fn start(c: Contender, topo: &Topology, bulk_too: bool) -> Running {
    let backends: Vec<String> = (0..topo.backends.len())
        .map(|i| backend_rr(topo, i))
        .collect();
    let bulk = SocketAddrV4::new(topo.backends[0].ip, BULK_PORT).to_string();
    match c {
        Contender::Direct => Running::Direct,
        Contender::Gateway(mode) => {
            let daemon = Daemon::start_as_deployed(topo, mode);
            daemon.app_with_backends("rr", &backends);
            if !bulk_too {
                return Running::Gateway(daemon);
            }
            // iperf3 serves one client at a time: one check, then none for an hour.
            daemon.ok(&[
                "app",
                "create",
                "bulk",
                "--check-rise",
                "1",
                "--check-interval",
                "1h",
            ]);
            daemon.ok(&["backend", "add", "bulk", &bulk]);
            daemon.wait_active("bulk", 1);
            Running::Gateway(daemon)
        }
        Contender::Nftables => {
            let map: Vec<String> = topo
                .backends
                .iter()
                .enumerate()
                .map(|(i, b)| format!("{i} : {}", b.ip))
                .collect();
            let rules = format!(
                "table ip gwbench {{
                   chain prerouting {{
                     type nat hook prerouting priority dstnat;
                     ip daddr {public} tcp dport {PUBLIC_RR} dnat to numgen random mod {n} map {{ {map} }} : {RR_PORT}
                     ip daddr {public} tcp dport {PUBLIC_BULK} dnat to {bulk}
                   }}
                   chain postrouting {{
                     type nat hook postrouting priority srcnat;
                     ct status dnat snat to {snat}
                   }}
                 }}\n",
                public = Topology::PUBLIC_IP,
                n = topo.backends.len(),
                map = map.join(", "),
                snat = Topology::SNAT_IP,
            );
            topo.gateway.nft(&rules);
            Running::Nftables(topo.gateway.name().to_owned())
        }
        Contender::Haproxy => {
            let servers: Vec<String> = backends
                .iter()
                .enumerate()
                .map(|(i, b)| format!("  server b{i} {b}"))
                .collect();
            let cfg = format!(
                "global\n  maxconn 8000\n  nbthread 2\n\
                 defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
                 frontend rr\n  bind {public}:{PUBLIC_RR}\n  default_backend rr\n\
                 backend rr\n  balance roundrobin\n  source {snat}\n{servers}\n\
                 frontend bulk\n  bind {public}:{PUBLIC_BULK}\n  default_backend bulk\n\
                 backend bulk\n  source {snat}\n  server b0 {bulk}\n",
                public = Topology::PUBLIC_IP,
                snat = Topology::SNAT_IP,
                servers = servers.join("\n"),
            );
            let dir = RunDir::new(&format!("{}-haproxy", unique_prefix()));
            let path = dir.path().join("haproxy.cfg");
            std::fs::write(&path, cfg).unwrap();
            let mut cmd = topo.gateway.command("haproxy");
            cmd.args(["-f", path.to_str().unwrap(), "-db"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            let child = topo.gateway.spawn(cmd);
            let to: SocketAddr = SocketAddrV4::new(Topology::PUBLIC_IP, PUBLIC_RR).into();
            let up = crate::wait_for(Duration::from_secs(10), || {
                topo.client
                    .run(move || TcpStream::connect_timeout(&to, Duration::from_millis(200)))
                    .is_ok()
            });
            assert!(up.is_some(), "haproxy did not listen within 10 s");
            Running::Haproxy {
                _child: child,
                _dir: dir,
            }
        }
    }
}

/// Request/response servers: each connection gets its messages echoed until it closes.
/// Worker threads block in `accept` (with a timeout, to see the stop flag). Not the tests'
/// `EchoServer`: that one greets each connection with its name, polls `accept` every 2 ms and
/// spawns a thread per connection, which would be what a connection-rate test measures.
pub struct RrServer {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl RrServer {
    pub fn start(ns: &Netns, addr: SocketAddrV4, workers: usize) -> Self {
        let listener = ns
            .run(move || -> std::io::Result<TcpListener> {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                s.set_reuse_address(true)?;
                s.bind(&SocketAddr::from(addr).into())?;
                s.listen(4096)?;
                s.set_read_timeout(Some(Duration::from_millis(100)))?;
                Ok(s.into())
            })
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..workers)
            .map(|_| {
                let (listener, stop) = (listener.clone(), stop.clone());
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let Ok((mut conn, _)) = listener.accept() else {
                            continue;
                        };
                        let _ = conn.set_nodelay(true);
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                        let mut buf = [0u8; 64 * 1024];
                        while !stop.load(Ordering::Relaxed) {
                            match conn.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if conn.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        RrServer { stop, threads }
    }
}

impl Drop for RrServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One request/response exchange on `conn`.
fn exchange(conn: &mut TcpStream, msg: &[u8; MESSAGE]) -> std::io::Result<()> {
    conn.write_all(msg)?;
    let mut back = [0u8; MESSAGE];
    conn.read_exact(&mut back)?;
    if &back != msg {
        return Err(std::io::Error::other("the echo differs"));
    }
    Ok(())
}

/// Short connections (connect, one exchange, close) from `RR_THREADS` clients for `dur`, to
/// each of `targets` in turn: (completed, failed).
pub fn connection_rate(client: &Netns, targets: &[SocketAddr], dur: Duration) -> (u64, u64) {
    let deadline = Instant::now() + dur;
    let threads: Vec<_> = (0..RR_THREADS)
        .map(|t| {
            let targets = targets.to_vec();
            client.spawn_thread(move || {
                let (mut ok, mut failed) = (0u64, 0u64);
                let msg = [t as u8; MESSAGE];
                let mut i = t;
                while Instant::now() < deadline {
                    // Source addresses in turn: each has its own ephemeral ports.
                    let src = Ipv4Addr::new(192, 0, 2, 10 + (i % usize::from(CLIENT_ADDRS)) as u8);
                    let to = targets[i % targets.len()];
                    i += 1;
                    let done = (|| -> std::io::Result<()> {
                        let s = socket2::Socket::new(
                            socket2::Domain::IPV4,
                            socket2::Type::STREAM,
                            None,
                        )?;
                        s.bind(&SocketAddr::from(SocketAddrV4::new(src, 0)).into())?;
                        s.connect_timeout(&to.into(), Duration::from_secs(1))?;
                        let mut conn: TcpStream = s.into();
                        conn.set_nodelay(true)?;
                        conn.set_read_timeout(Some(Duration::from_secs(1)))?;
                        exchange(&mut conn, &msg)
                    })();
                    match done {
                        Ok(()) => ok += 1,
                        Err(_) => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("client thread"))
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

/// Round-trip times of exchanges on one persistent connection for `dur`.
pub fn round_trips(client: &Netns, to: SocketAddr, dur: Duration) -> Vec<Duration> {
    client.run(move || {
        let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(2)).expect("connect");
        conn.set_nodelay(true).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let msg = [7u8; MESSAGE];
        let mut rtts = Vec::new();
        let deadline = Instant::now() + dur;
        while Instant::now() < deadline && rtts.len() < 2_000_000 {
            let t = Instant::now();
            exchange(&mut conn, &msg).expect("exchange");
            rtts.push(t.elapsed());
        }
        rtts
    })
}

/// iperf3 throughput (Gbit/s, received) with `streams` streams for `secs` seconds.
fn iperf(client: &Netns, to: SocketAddr, streams: u32, secs: u32) -> f64 {
    let out = client
        .command("iperf3")
        .args([
            "-c",
            &to.ip().to_string(),
            "-p",
            &to.port().to_string(),
            "-t",
            &secs.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ])
        .output()
        .expect("iperf3 (Debian package iperf3)");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let bps = json["end"]["sum_received"]["bits_per_second"].as_f64();
    bps.unwrap_or_else(|| {
        panic!(
            "iperf3 to {to} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }) / 1e9
}

/// CPU time used by the whole machine (all cores, seconds) since boot, from /proc/stat.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or_default();
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: busy is all but idle and iowait.
    let busy: u64 = fields
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .map(|(_, v)| v)
        .sum();
    busy as f64 / 100.0
}

/// One contender's figures in one repetition.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    pub gbps_1: f64,
    pub gbps_4: f64,
    pub conn_per_s: f64,
    pub failed: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// Machine CPU per 1,000 short connections (ms, all cores).
    pub cpu_ms_per_kconn: f64,
    /// The gateway's programs only (`kernel.bpf_stats_enabled`), over the connection-rate
    /// and latency tests: run time per packet (ns) and per 1,000 connections (ms).
    pub bpf_ns_per_packet: f64,
    pub bpf_ms_per_kconn: f64,
    /// The gateway's program runs per MB of the 4-stream transfer: one per packet or per
    /// GSO batch, depending on what the program sees.
    pub bpf_runs_per_mb: f64,
}

/// `kernel.bpf_stats_enabled` on while it lives (the kernel then times every program run);
/// the previous value is put back on drop, or on Ctrl-C (see [`SysctlGuard`]).
struct BpfStats {
    _on: Option<SysctlGuard>,
}

impl BpfStats {
    fn enable() -> Self {
        BpfStats {
            _on: SysctlGuard::set("kernel.bpf_stats_enabled", "1").ok(),
        }
    }

    /// (run time in ns, runs) summed over the loaded programs named `names`.
    fn read(names: &[&str]) -> (u64, u64) {
        let out = std::process::Command::new("bpftool")
            .args(["prog", "show", "--json"])
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default();
        let progs: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
        progs
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| names.iter().any(|n| p["name"] == *n))
            .fold((0, 0), |(t, c), p| {
                (
                    t + p["run_time_ns"].as_u64().unwrap_or(0),
                    c + p["run_cnt"].as_u64().unwrap_or(0),
                )
            })
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1e6
}

/// How long each measurement runs.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub reps: usize,
    pub rr: Duration,
    pub latency: Duration,
    /// iperf3 seconds; 0: no throughput test.
    pub iperf_secs: u32,
}

impl Plan {
    pub const FULL: Plan = Plan {
        reps: 3,
        rr: Duration::from_secs(3),
        latency: Duration::from_secs(2),
        iperf_secs: 3,
    };
    pub const QUICK: Plan = Plan {
        reps: 1,
        rr: Duration::from_secs(2),
        latency: Duration::from_secs(1),
        iperf_secs: 2,
    };
    /// What `cargo xtask test` runs: only that each contender forwards.
    pub const SMOKE: Plan = Plan {
        reps: 1,
        rr: Duration::from_millis(300),
        latency: Duration::from_millis(200),
        iperf_secs: 0,
    };
}

fn measure(c: Contender, topo: &Topology, plan: Plan) -> Figures {
    let (rr, bulk) = c.targets(topo);
    let _running = start(c, topo, plan.iperf_secs > 0);
    let mut f = Figures::default();
    let stats = matches!(c, Contender::Gateway(_)).then(BpfStats::enable);
    let programs = [
        gateway::datapath::XDP_PROGRAM,
        gateway::datapath::TC_PROGRAM,
    ];
    if plan.iperf_secs > 0 {
        f.gbps_1 = iperf(&topo.client, bulk, 1, plan.iperf_secs);
        let before = BpfStats::read(&programs);
        f.gbps_4 = iperf(&topo.client, bulk, 4, plan.iperf_secs);
        let runs = BpfStats::read(&programs).1 - before.1;
        let mb = f.gbps_4 * 1e3 / 8.0 * f64::from(plan.iperf_secs);
        f.bpf_runs_per_mb = runs as f64 / mb.max(1e-9);
    }
    let bpf = BpfStats::read(&programs);
    let cpu = cpu_seconds();
    let t = Instant::now();
    let (ok, failed) = connection_rate(&topo.client, &rr, plan.rr);
    let secs = t.elapsed().as_secs_f64();
    f.conn_per_s = ok as f64 / secs;
    f.failed = failed;
    f.cpu_ms_per_kconn = (cpu_seconds() - cpu) * 1e3 / (ok.max(1) as f64 / 1e3);
    let mut rtts = round_trips(&topo.client, rr[0], plan.latency);
    rtts.sort();
    f.p50_us = percentile(&rtts, 0.5);
    f.p99_us = percentile(&rtts, 0.99);
    f.p999_us = percentile(&rtts, 0.999);
    if stats.is_some() {
        let (time, runs) = BpfStats::read(&programs);
        let (time, runs) = (time - bpf.0, runs - bpf.1);
        f.bpf_ns_per_packet = time as f64 / runs.max(1) as f64;
        f.bpf_ms_per_kconn = time as f64 / 1e6 / (ok.max(1) as f64 / 1e3);
    }
    f
}

/// The topology and the servers every contender shares.
pub struct Bench {
    pub topo: Topology,
    _rr: Vec<RrServer>,
    _iperf: Option<ChildGuard>,
}

impl Bench {
    pub fn new(with_iperf: bool) -> Self {
        crate::require_root();
        let topo = Topology::new(2);
        // Native XDP on veth needs these; every contender runs with them, so that all meet
        // the same links.
        topo.xdp_offloads();
        for i in 0..CLIENT_ADDRS {
            topo.client
                .ip(&format!("addr add 192.0.2.{}/24 dev eth0", 10 + i));
        }
        let rr = topo
            .backends
            .iter()
            .map(|b| RrServer::start(b, SocketAddrV4::new(b.ip, RR_PORT), 16))
            .collect();
        let iperf = with_iperf.then(|| {
            let b0 = &topo.backends[0];
            let mut cmd = b0.command("iperf3");
            cmd.args(["-s", "-p", &BULK_PORT.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            let child = b0.spawn(cmd);
            thread::sleep(Duration::from_millis(300));
            child
        });
        Bench {
            topo,
            _rr: rr,
            _iperf: iperf,
        }
    }

    /// Every contender `plan.reps` times, alternating, so that machine noise hits all of them:
    /// the figures of each repetition.
    pub fn run(&self, plan: Plan) -> Vec<(Contender, Vec<Figures>)> {
        let mut all: Vec<(Contender, Vec<Figures>)> =
            Contender::ALL.iter().map(|c| (*c, Vec::new())).collect();
        for rep in 0..plan.reps {
            for (c, figures) in all.iter_mut() {
                eprintln!("bench: repetition {}/{}: {}", rep + 1, plan.reps, c.name());
                figures.push(measure(*c, &self.topo, plan));
            }
        }
        all
    }
}

/// The median of `values` (0 when there are none).
pub fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The median of each figure over the repetitions.
pub fn medians(runs: &[Figures]) -> Figures {
    let m = |f: fn(&Figures) -> f64| median(runs.iter().map(f));
    Figures {
        gbps_1: m(|f| f.gbps_1),
        gbps_4: m(|f| f.gbps_4),
        conn_per_s: m(|f| f.conn_per_s),
        failed: runs.iter().map(|f| f.failed).sum(),
        p50_us: m(|f| f.p50_us),
        p99_us: m(|f| f.p99_us),
        p999_us: m(|f| f.p999_us),
        cpu_ms_per_kconn: m(|f| f.cpu_ms_per_kconn),
        bpf_ns_per_packet: m(|f| f.bpf_ns_per_packet),
        bpf_ms_per_kconn: m(|f| f.bpf_ms_per_kconn),
        bpf_runs_per_mb: m(|f| f.bpf_runs_per_mb),
    }
}

/// A figure a report shows.
pub struct Column {
    pub name: &'static str,
    pub unit: &'static str,
    pub get: fn(&Figures) -> f64,
}

const fn column(name: &'static str, unit: &'static str, get: fn(&Figures) -> f64) -> Column {
    Column { name, unit, get }
}

/// Throughput and conn/s: higher is better; latency and CPU: lower is.
pub const COLUMNS: [Column; 7] = [
    column("1-stream", "Gbit/s", |f| f.gbps_1),
    column("4-stream", "Gbit/s", |f| f.gbps_4),
    column("new conn/s", "conn/s", |f| f.conn_per_s),
    column("p50", "µs", |f| f.p50_us),
    column("p99", "µs", |f| f.p99_us),
    column("p999", "µs", |f| f.p999_us),
    column("CPU per 1k conn", "ms", |f| f.cpu_ms_per_kconn),
];

/// The markdown report: each contender's medians, then its ratios to direct and to the
/// gateway in TC mode.
pub fn markdown(results: &[(Contender, Figures)], plan: Plan) -> String {
    let get = |c: Contender| results.iter().find(|r| r.0 == c).map(|r| &r.1);
    let direct = get(Contender::Direct);
    let tc = get(Contender::Gateway(AttachMode::Tc));
    let mut out = format!(
        "Medians of {} repetition(s); connection rate over {:?} with {RR_THREADS} clients, latency over {:?} on one connection ({MESSAGE}-byte messages), iperf3 for {} s.\n\n",
        plan.reps, plan.rr, plan.latency, plan.iperf_secs
    );
    out += "| contender |";
    for c in &COLUMNS {
        out += &format!(" {} ({}) |", c.name, c.unit);
    }
    out += " failed |\n|---|";
    out += &"---:|".repeat(COLUMNS.len() + 1);
    out += "\n";
    for (c, f) in results {
        out += &format!("| {} |", c.name());
        for col in &COLUMNS {
            out += &format!(" {:.2} |", (col.get)(f));
        }
        out += &format!(" {} |\n", f.failed);
    }
    out += "\nThe gateway's own programs (`kernel.bpf_stats_enabled`; both programs, XDP mode attaches TC too): run time over the connection-rate and latency tests, and runs per MB of the 4-stream transfer:\n\n| contender | ns per program run | ms per 1k connections | runs per MB (4-stream) |\n|---|---:|---:|---:|\n";
    for (c, f) in results
        .iter()
        .filter(|r| matches!(r.0, Contender::Gateway(_)))
    {
        out += &format!(
            "| {} | {:.0} | {:.2} | {:.0} |\n",
            c.name(),
            f.bpf_ns_per_packet,
            f.bpf_ms_per_kconn,
            f.bpf_runs_per_mb
        );
    }
    for (base_name, base) in [("direct", direct), ("gateway (tc)", tc)] {
        let Some(base) = base else { continue };
        out += &format!(
            "\nRatio to **{base_name}** (higher is better for throughput and conn/s, lower for latency and CPU):\n\n| contender |"
        );
        for col in &COLUMNS {
            out += &format!(" {} |", col.name);
        }
        out += "\n|---|";
        out += &"---:|".repeat(COLUMNS.len());
        out += "\n";
        for (c, f) in results {
            out += &format!("| {} |", c.name());
            for col in &COLUMNS {
                let b = (col.get)(base);
                let r = if b > 0.0 { (col.get)(f) / b } else { 0.0 };
                out += &format!(" {r:.2}× |");
            }
            out += "\n";
        }
    }
    out
}

/// The same as JSON.
pub fn to_json(results: &[(Contender, Figures)], plan: Plan) -> serde_json::Value {
    json!({
        "plan": {
            "repetitions": plan.reps,
            "connection_rate_seconds": plan.rr.as_secs_f64(),
            "latency_seconds": plan.latency.as_secs_f64(),
            "iperf_seconds": plan.iperf_secs,
            "clients": RR_THREADS,
            "message_bytes": MESSAGE,
        },
        "contenders": results.iter().map(|(c, f)| json!({
            "name": c.name(),
            "throughput_1_stream_gbps": f.gbps_1,
            "throughput_4_streams_gbps": f.gbps_4,
            "connections_per_second": f.conn_per_s,
            "failed_connections": f.failed,
            "latency_p50_us": f.p50_us,
            "latency_p99_us": f.p99_us,
            "latency_p999_us": f.p999_us,
            "cpu_ms_per_1k_connections": f.cpu_ms_per_kconn,
            "datapath_ns_per_program_run": f.bpf_ns_per_packet,
            "datapath_ms_per_1k_connections": f.bpf_ms_per_kconn,
            "datapath_runs_per_mb_4_streams": f.bpf_runs_per_mb,
        })).collect::<Vec<_>>(),
    })
}

/// A bar chart of each contender's ratio to direct, per figure, as a PNG at `path`. Needs a
/// TrueType font (Debian's fonts-dejavu-core); without one, says so and draws nothing.
pub fn chart(results: &[(Contender, Figures)], path: &std::path::Path) -> Result<(), String> {
    use plotters::prelude::*;
    const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
    let font = std::fs::read(FONT).map_err(|e| format!("{FONT}: {e}"))?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| "the font does not load".to_owned())?;
    let Some(direct) = results
        .iter()
        .find(|r| r.0 == Contender::Direct)
        .map(|r| &r.1)
    else {
        return Err("no direct figures".into());
    };
    let columns: Vec<&Column> = COLUMNS.iter().filter(|c| (c.get)(direct) > 0.0).collect();
    let ratio = |f: &Figures, c: &&Column| (c.get)(f) / (c.get)(direct);
    let top = results
        .iter()
        .flat_map(|(_, f)| columns.iter().map(move |c| ratio(f, c)))
        .fold(1.0f64, f64::max)
        * 1.15;
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let root = BitMapBackend::new(path, (1200, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "ratio to direct (throughput and conn/s: higher is better; latency and CPU: lower)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..columns.len() as f64, 0f64..top)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(columns.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.01 && i < columns.len() {
                columns[i].name.to_owned()
            } else {
                String::new()
            }
        })
        .y_desc("× direct")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    let colors = [
        RGBColor(120, 120, 120),
        BLUE,
        RGBColor(0, 150, 200),
        RED,
        RGBColor(230, 150, 0),
    ];
    let width = 0.8 / results.len() as f64;
    for (k, (c, f)) in results.iter().enumerate() {
        let color = colors[k % colors.len()];
        chart
            .draw_series(columns.iter().enumerate().map(|(i, col)| {
                let x0 = i as f64 + 0.1 + k as f64 * width;
                Rectangle::new(
                    [(x0, 0.0), (x0 + width * 0.9, ratio(f, col))],
                    color.filled(),
                )
            }))
            .map_err(|e| err(&e))?
            .label(c.name())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(0.0, 1.0), (columns.len() as f64, 1.0)],
            BLACK.stroke_width(1),
        )))
        .map_err(|e| err(&e))?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
