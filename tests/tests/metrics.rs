//! Observability end to end: `/metrics` against known traffic (counted independently by nft
//! in the backends' namespaces), drops under their reason, the active-connection gauges,
//! promtool's check, the Grafana dashboard's queries, `gateway flows` and the rates of
//! `gateway status`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{SocketAddr, SocketAddrV4},
    time::Duration,
};

use gateway::datapath::AttachMode;
use gateway_tests::{
    daemon::Daemon,
    metrics::Scrape,
    netns::{Host, Topology},
    packet::{ETH_LEN, Frame, flags},
    require_root,
    traffic::{Connecting, EchoClient, IO_TIMEOUT, payload, sock},
    wait_for,
};

const LIFETIME: Duration = Duration::from_secs(120);
const PORT: u16 = 8080;

fn backend(topo: &Topology, i: usize) -> String {
    SocketAddrV4::new(topo.backends[i].ip, PORT).to_string()
}

fn web() -> SocketAddr {
    sock(Topology::PUBLIC_IP, 20000)
}

/// A daemon in a topology of `backends` echo servers, with app `web` on all of them, active.
/// Fields drop in order: the daemon, the servers, then the namespaces.
struct Sandbox {
    daemon: Daemon,
    _servers: Vec<gateway_tests::traffic::EchoServer>,
    topo: Topology,
}

fn sandbox(backends: usize) -> Sandbox {
    require_root();
    let topo = Topology::new(backends);
    let servers = topo.echo_servers(PORT, LIFETIME);
    let daemon = Daemon::start(&topo, None, &[]);
    let all: Vec<String> = (0..backends).map(|i| backend(&topo, i)).collect();
    daemon.app_with_backends("web", &all);
    Sandbox {
        daemon,
        _servers: servers,
        topo,
    }
}

/// nft counters in a backend's namespace for the gateway's translated traffic only (from and
/// to the SNAT address and port range; health checks come from another address).
struct NftCounters<'a>(&'a Host);

impl<'a> NftCounters<'a> {
    fn install(host: &'a Host) -> Self {
        let snat = Topology::SNAT_IP;
        let rules = format!(
            "table ip gwtest {{
               counter in_ {{
               }}
               counter out_ {{
               }}
               chain input {{
                 type filter hook input priority 0;
                 ip saddr {snat} tcp sport 1024-19999 tcp dport {PORT} counter name in_
               }}
               chain output {{
                 type filter hook output priority 0;
                 ip daddr {snat} tcp dport 1024-19999 tcp sport {PORT} counter name out_
               }}
             }}\n"
        );
        host.nft(&rules);
        NftCounters(host)
    }

    /// (packets, bytes) of counter `name`.
    fn read(&self, name: &str) -> (u64, u64) {
        self.0.nft_counter("gwtest", name)
    }
}

/// (packets, bytes) of a backend's traffic in `direction` as the scrape counts it.
fn scraped(s: &Scrape, backend: &str, direction: &str) -> (u64, u64) {
    let labels = [("backend", backend), ("direction", direction)];
    (
        s.value("gateway_backend_packets_total", &labels) as u64,
        s.value("gateway_backend_bytes_total", &labels) as u64,
    )
}

#[test]
fn counters_equal_the_traffic_per_app_and_backend() {
    let Sandbox { daemon, topo, .. } = &sandbox(2);
    let nft: Vec<NftCounters> = topo.backends.iter().map(NftCounters::install).collect();

    // N connections, each echoing M bytes, all closed.
    const N: usize = 24;
    const M: usize = 3000;
    let mut conns = EchoClient::connect_many(&topo.client, web(), N).unwrap();
    let mut by: BTreeMap<String, u64> = BTreeMap::new();
    for (i, c) in conns.iter_mut().enumerate() {
        c.echo(&payload(M, i as u32)).unwrap();
        *by.entry(c.server.clone()).or_default() += 1;
    }
    drop(conns);

    // Once the FIN exchanges are over, the datapath's counters equal what each backend's
    // own firewall counted, packet for packet and byte for byte, both ways.
    let mut s = daemon.scrape();
    let settled = wait_for(Duration::from_secs(10), || {
        s = daemon.scrape();
        (0..2).all(|i| {
            let b = backend(topo, i);
            scraped(&s, &b, "in") == nft[i].read("in_")
                && scraped(&s, &b, "out") == nft[i].read("out_")
        })
    });
    let report: Vec<_> = (0..2)
        .map(|i| {
            let b = backend(topo, i);
            (
                scraped(&s, &b, "in"),
                nft[i].read("in_"),
                scraped(&s, &b, "out"),
                nft[i].read("out_"),
            )
        })
        .collect();
    assert!(settled.is_some(), "scrape vs nft per backend: {report:?}");

    let app = [("app", "web")];
    assert_eq!(s.value("gateway_app_connections_total", &app), N as f64);
    let mut bytes_in = 0;
    for i in 0..2 {
        let b = backend(topo, i);
        let labels = [("backend", b.as_str())];
        let conns = by.get(&format!("b{i}")).copied().unwrap_or(0);
        assert_eq!(
            s.value("gateway_backend_connections_total", &labels),
            conns as f64
        );
        let (packets, bytes) = scraped(&s, &b, "in");
        // Every packet carries at least 40 bytes of headers besides its payload.
        assert!(
            bytes >= conns * M as u64 + 40 * packets,
            "{b}: {bytes} bytes"
        );
        bytes_in += bytes;
    }
    assert!(by.values().all(|&n| n > 0), "both backends served: {by:?}");
    // The app's counters are its backends' sums.
    for (what, dir) in [
        ("packets", "in"),
        ("packets", "out"),
        ("bytes", "in"),
        ("bytes", "out"),
    ] {
        let name = format!("gateway_app_{what}_total");
        let per_backend = s.sum(
            &format!("gateway_backend_{what}_total"),
            &[("direction", dir)],
        );
        assert_eq!(
            s.value(&name, &[("app", "web"), ("direction", dir)]),
            per_backend
        );
    }
    assert_eq!(
        s.value(
            "gateway_app_bytes_total",
            &[("app", "web"), ("direction", "in")]
        ),
        bytes_in as f64
    );
    assert_eq!(s.value("gateway_flows_created_total", &[]), N as f64);
    assert_eq!(s.value("gateway_build_info", &[]), 1.0);
    assert!(s.value("gateway_health_check_duration_seconds_count", &app) > 0.0);
}

#[test]
fn a_taken_metrics_address_is_refused_before_the_datapath_is_touched() {
    let Sandbox { daemon, topo, .. } = &sandbox(1);
    // A second daemon in the same namespace with directories of its own: it would take over
    // the same interfaces; the metrics address it cannot bind stops it first.
    let dir = gateway_tests::netns::RunDir::new(&format!(
        "{}-second",
        gateway_tests::netns::unique_prefix()
    ));
    let pins = topo.bpffs.path().join("second");
    let mut args = Daemon::args(topo, None, &[]);
    for (flag, path) in [
        ("--state-dir", dir.path().join("state")),
        ("--api-socket", dir.path().join("api.sock")),
        ("--bpffs", pins.clone()),
    ] {
        args.extend([flag.to_owned(), path.display().to_string()]);
    }
    let out = daemon.command(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("binding the metrics address 127.0.0.1:9717"),
        "{stderr}"
    );
    let pinned = std::fs::read_dir(&pins).map(|d| d.count()).unwrap_or(0);
    assert_eq!(pinned, 0, "nothing pinned by the refused daemon");
    // The first one still serves, and its app still carries traffic.
    let mut c = EchoClient::connect(&topo.client, web()).unwrap();
    c.echo(b"still here").unwrap();
    assert_eq!(
        daemon
            .scrape()
            .value("gateway_app_connections_total", &[("app", "web")]),
        1.0
    );
}

#[test]
fn crafted_bad_packets_are_counted_under_their_reason() {
    let Sandbox { daemon, topo, .. } = &sandbox(1);
    let client = SocketAddrV4::new(Topology::CLIENT_IP, 40000);
    let public = SocketAddrV4::new(Topology::PUBLIC_IP, 20000);
    let snat = SocketAddrV4::new(Topology::SNAT_IP, 5000);
    let ip = |f: Frame| f.build()[ETH_LEN..].to_vec();
    let fragment = Frame {
        frag: 0x2000, // more fragments
        ..Frame::tcp(client, public, flags::SYN)
    };
    let rst = |dst| ip(Frame::tcp(client, dst, flags::RST | flags::ACK));
    let bad_checksum = {
        let mut p = ip(Frame::tcp(client, public, flags::SYN));
        p[20 + 16] ^= 1; // the TCP checksum
        p
    };
    // (reason, packets): 3 of each, one reason at a time. (An ACK without a flow is not a drop:
    // it is answered with an RST, see `segments_without_a_flow_are_answered`.)
    let cases: [(&str, Vec<Vec<u8>>); 6] = [
        ("no_flow", vec![rst(public); 3]),
        ("no_reply_flow", vec![rst(snat); 3]),
        ("fragment", vec![ip(fragment); 3]),
        (
            "bad_flags",
            vec![ip(Frame::tcp(client, public, flags::SYN | flags::FIN)); 3],
        ),
        ("bad_checksum", vec![bad_checksum; 3]),
        (
            "ttl_exceeded",
            vec![
                ip(Frame {
                    ttl: 1,
                    ..Frame::tcp(client, public, flags::SYN)
                });
                3
            ],
        ),
    ];
    let drops = |s: &Scrape| -> BTreeMap<String, f64> {
        s.samples
            .iter()
            .filter(|x| x.name == "gateway_drops_total")
            .map(|x| (x.labels[0].1.clone(), x.value))
            .collect()
    };
    for (reason, packets) in cases {
        let before = drops(&daemon.scrape());
        gateway_tests::raw::send_ipv4(&topo.client, packets);
        let mut after = before.clone();
        let counted = wait_for(Duration::from_secs(5), || {
            after = drops(&daemon.scrape());
            after[reason] == before[reason] + 3.0
        });
        assert!(counted.is_some(), "{reason}: {before:?} -> {after:?}");
        for (r, v) in &after {
            if r != reason {
                assert_eq!(*v, before[r], "{reason} sent, {r} moved: {after:?}");
            }
        }
    }
}

#[test]
fn active_connection_gauges_follow_real_connections() {
    let Sandbox { daemon, topo, .. } = &sandbox(2);
    let gauges = || {
        let s = daemon.scrape();
        (
            s.value("gateway_app_active_connections", &[("app", "web")]),
            s.sum("gateway_backend_active_connections", &[("app", "web")]),
        )
    };
    let wait = |n: f64| {
        let mut seen = (0.0, 0.0);
        let ok = wait_for(Duration::from_secs(5), || {
            seen = gauges();
            seen == (n, n)
        });
        assert!(
            ok.is_some(),
            "gauges (app, sum of backends) {seen:?}, not {n}"
        );
    };
    assert_eq!(gauges(), (0.0, 0.0));
    let mut conns = EchoClient::connect_many(&topo.client, web(), 10).unwrap();
    wait(10.0);
    // Closing: the client's FIN, the server's FIN after it; closed connections do not count.
    for c in conns.drain(..4) {
        drop(c);
    }
    wait(6.0);
    let s = daemon.scrape();
    assert!(s.value("gateway_conntrack_entries", &[]) >= 12.0);
    assert!(s.value("gateway_conntrack_capacity", &[]) >= 1024.0);
    drop(conns);
    wait(0.0);
}

/// Table pressure: connections by state (as the conntrack scan counts them), half-open ones
/// per app, and the refusals' drop reasons, in the scrape and in `gateway status`, against
/// connections the test holds both ends of, put in each state on purpose.
#[test]
fn table_pressure_shows_connections_by_state() {
    let sb = gateway_tests::hostile::Sandbox::held(AttachMode::Tc, &["--conntrack-size", "1024"]);
    let backend = &sb.topo.backends[0];
    let pair = || sb.pair(IO_TIMEOUT);
    let mut established = pair();
    established.exchange(0).unwrap();
    // Closing: a FIN one way, the client's or the backend's.
    let client_fin = pair();
    client_fin.fin(false).unwrap();
    let backend_fin = pair();
    backend_fin.fin(true).unwrap();
    // Closed: FINs both ways, the client's first; TIME_WAIT: the backend's first.
    pair().close(false).unwrap();
    pair().close(true).unwrap();
    // Half-open: the backend never sees these SYNs (dropped in its namespace; the health
    // checks come from another address), so no SYN-ACK completes them.
    backend.nft(&format!(
        "table ip gwhalf {{
           chain input {{
             type filter hook input priority 0;
             ip saddr {} tcp flags & (syn | ack) == syn drop
           }}
         }}\n",
        Topology::SNAT_IP
    ));
    let half_open = Connecting::start(&sb.topo.client, web(), 3).unwrap();

    // (half_open, established, closing, closed, time_wait) as the scrape shows them.
    let states = ["half_open", "established", "closing", "closed", "time_wait"];
    let by_state = |s: &Scrape| {
        states.map(|state| s.value("gateway_conntrack_connections", &[("state", state)]))
    };
    let want = [3.0, 1.0, 2.0, 1.0, 1.0];
    let mut s = sb.daemon.scrape();
    let seen = wait_for(Duration::from_secs(5), || {
        s = sb.daemon.scrape();
        by_state(&s) == want
    });
    assert!(
        seen.is_some(),
        "connections by state {states:?}: {:?}, not {want:?}",
        by_state(&s)
    );
    let app = [("app", "web")];
    assert_eq!(s.value("gateway_app_half_open_connections", &app), 3.0);
    // Open: half-open, established and closing.
    assert_eq!(s.value("gateway_app_active_connections", &app), 6.0);
    assert_eq!(s.value("gateway_conntrack_entries", &[]), 16.0);
    // The refusals of a table or a SNAT range with no room are series of their own, there
    // before the first refusal.
    for reason in ["conntrack_full", "snat_exhausted"] {
        assert_eq!(
            s.value("gateway_drops_total", &[("reason", reason)]),
            0.0,
            "{reason}"
        );
    }

    let status = sb.daemon.fresh_status();
    let c = status.conntrack_connections;
    assert_eq!(
        [c.half_open, c.established, c.closing, c.closed, c.time_wait],
        [3, 1, 2, 1, 1],
        "{c:?}"
    );
    assert_eq!(status.apps[0].half_open, 3);
    assert_eq!(status.refused, gateway::api::Refusals::default());
    let text = sb.daemon.ok(&["status"]);
    for part in [
        "16 of 1024 entries in use (1.6%)",
        "connections: 3 half-open, 1 established, 2 closing, 1 closed, 1 in TIME_WAIT",
        "SYNs refused: 0 conntrack_full, 0 snat_exhausted",
        "6 open connections (3 half-open)",
    ] {
        assert!(text.contains(part), "no {part:?} in:\n{text}");
    }
    assert_eq!(half_open.connected(), 0);
}

#[test]
fn flows_show_the_client_behind_a_snat_port() {
    let Sandbox { daemon, topo, .. } = &sandbox(2);
    let mut conns = EchoClient::connect_many(&topo.client, web(), 12).unwrap();
    for (i, c) in conns.iter_mut().enumerate() {
        c.echo(&payload(500, i as u32)).unwrap();
    }
    let b0 = backend(topo, 0);
    // What backend 0 sees: its peers are the SNAT address and a port each.
    let ss =
        topo.backends[0].exec_ok(&["ss", "-Htn", "state", "established", "sport", "=", ":8080"]);
    let peers: BTreeSet<String> = ss
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .map(str::to_owned)
        .collect();
    let mine: BTreeSet<String> = conns
        .iter()
        .filter(|c| c.server == "b0")
        .map(|c| c.local_addr().to_string())
        .collect();
    assert!(!mine.is_empty());
    assert_eq!(peers.len(), mine.len(), "{ss}");

    let list: gateway::api::FlowList =
        serde_json::from_str(&daemon.ok(&["flows", "--backend", &b0, "--json"])).unwrap();
    assert_eq!(list.matched, mine.len());
    // Each SNAT port the backend sees leads to one client connection of ours.
    let clients: BTreeSet<String> = peers
        .iter()
        .map(|peer| {
            let f = list
                .flows
                .iter()
                .find(|f| &f.snat == peer)
                .unwrap_or_else(|| panic!("no flow with SNAT {peer}: {:?}", list.flows));
            assert_eq!(f.app, "web");
            assert_eq!(f.backend, b0);
            assert_eq!(f.public, web().to_string());
            assert_eq!(f.state, "established");
            assert!(f.bytes_in > 500 && f.bytes_out > 500, "{f:?}");
            f.client.clone()
        })
        .collect();
    assert_eq!(clients, mine);

    // Filters: all flows of the app; an unknown app and a bad address are refused.
    let all: gateway::api::FlowList =
        serde_json::from_str(&daemon.ok(&["flows", "--app", "web", "--json"])).unwrap();
    assert_eq!(all.matched, 12);
    let limited: gateway::api::FlowList =
        serde_json::from_str(&daemon.ok(&["flows", "--limit", "5", "--json"])).unwrap();
    assert_eq!((limited.matched, limited.flows.len()), (12, 5));
    assert!(
        daemon
            .fails(&["flows", "--app", "nope"])
            .contains("no app named \"nope\"")
    );
    assert!(
        daemon
            .fails(&["flows", "--backend", "300.1.2.3:80"])
            .contains("300.1.2.3:80")
    );
    let table = daemon.ok(&["flows", "--backend", &b0]);
    assert_eq!(table.lines().count(), 1 + mine.len(), "{table}");
}

#[test]
fn status_shows_rates_while_traffic_flows() {
    let Sandbox { daemon, topo, .. } = &sandbox(1);
    let rates = || daemon.fresh_status().apps[0].rates;
    // New connections for at least 1 s and 40 connections (however loaded the machine is:
    // bounded at 15 s), while status is read.
    let mut seen = gateway::api::Rates::default();
    let start = std::time::Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_secs(1) || n < 40 {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{n} connections in 15 s"
        );
        let mut c = EchoClient::connect(&topo.client, web()).unwrap();
        c.echo(b"ping").unwrap();
        n += 1;
        if n % 20 == 0 {
            let r = rates();
            if r.connections > seen.connections {
                seen = r;
            }
        }
    }
    assert!(
        seen.connections > 0.0 && seen.packets > seen.connections && seen.bytes > seen.packets,
        "{seen:?}"
    );
    // No traffic: the rates fall to zero by the second scan.
    rates();
    assert_eq!(rates(), gateway::api::Rates::default());
    let text = daemon.ok(&["status"]);
    assert!(text.contains("conn/s") && text.contains("pkt/s"), "{text}");
}

/// The `gateway_*` metric names a text (a dashboard, alert rules) queries.
fn queried_metrics(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("gateway_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // Not a word that merely ends in "gateway_".
        let before = rest[..at].chars().last();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// Every `expr` of a Grafana dashboard (panels, nested rows) and every templating query.
fn dashboard_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(q)) => out.push(q.clone()),
                    _ => dashboard_queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

fn repo_file(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

fn promtool(args: &[&str], stdin: Option<&std::path::Path>) -> std::process::Output {
    let mut c = std::process::Command::new("promtool");
    c.args(args);
    if let Some(path) = stdin {
        c.stdin(std::fs::File::open(path).unwrap());
    }
    c.output()
        .expect("promtool (Debian package prometheus; `cargo xtask setup` installs it)")
}

#[test]
fn scrape_passes_promtool_and_has_every_metric_the_dashboard_and_alerts_query() {
    let Sandbox { daemon, topo, .. } = &sandbox(2);
    let mut c = EchoClient::connect(&topo.client, web()).unwrap();
    c.echo(&payload(1000, 1)).unwrap();

    // The Prometheus text format (what promtool reads) passes its check and lint.
    let text = daemon.scrape_text(false);
    let path = daemon.dir.path().join("scrape.txt");
    std::fs::write(&path, &text).unwrap();
    let out = promtool(&["check", "metrics"], Some(&path));
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // OpenMetrics (what Prometheus asks for) holds the same samples.
    let om = daemon.scrape_text(true);
    assert!(om.ends_with("# EOF\n"));
    let scrape = Scrape::parse(&om);
    let names = |s: &Scrape| {
        s.samples
            .iter()
            .map(|x| x.name.clone())
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(names(&scrape), names(&Scrape::parse(&text)));

    // The dashboard is a dashboard, and each metric it queries is in a real scrape.
    let file = repo_file("deploy/grafana/gateway.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).expect("valid JSON");
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());
    let panels = dashboard["panels"].as_array().expect("panels");
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert!(
            p["targets"].as_array().is_some_and(|t| !t.is_empty()),
            "{}",
            p["title"]
        );
    }
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    let queried = queried_metrics(&queries.join("\n"));
    assert!(queried.len() >= 15, "{queried:?}");
    let have = names(&scrape);
    let missing: Vec<_> = queried.difference(&have).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries {missing:?}, not in {have:?}"
    );

    // The example alert rules and scrape config pass promtool, and query real metrics.
    let rules = repo_file("deploy/prometheus/alerts.yml");
    let out = promtool(&["check", "rules", rules.to_str().unwrap()], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let config = repo_file("deploy/prometheus/prometheus.yml");
    let out = promtool(&["check", "config", config.to_str().unwrap()], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let queried = queried_metrics(&std::fs::read_to_string(&rules).unwrap());
    let missing: Vec<_> = queried.difference(&have).collect();
    assert!(missing.is_empty(), "the alerts query {missing:?}");
}
