//! Observability end to end: `/metrics` against known traffic, drops under their reason, the
//! active-connection gauges, promtool's check, the Grafana dashboard's queries, `gateway flows`
//! and the rates of `gateway status`.

use std::{net::SocketAddrV4, time::Duration};

use gateway_tests::{
    daemon::Daemon,
    netns::Topology,
    require_root,
    traffic::{EchoClient, payload, sock},
};

const LIFETIME: Duration = Duration::from_secs(120);

fn backend(topo: &Topology, i: usize) -> String {
    SocketAddrV4::new(topo.backends[i].ip, 8080).to_string()
}

#[test]
fn scrape_passes_promtool() {
    require_root();
    let topo = Topology::new(2);
    let _servers = topo.echo_servers(8080, LIFETIME);
    let daemon = Daemon::start(&topo, None, &[]);
    daemon.app_with_backends("web", &[backend(&topo, 0), backend(&topo, 1)]);
    let mut c = EchoClient::connect(&topo.client, sock(Topology::PUBLIC_IP, 20000)).unwrap();
    c.echo(&payload(1000, 1)).unwrap();
    let text = daemon.scrape_text(false);
    let path = daemon.dir.path().join("scrape.txt");
    std::fs::write(&path, &text).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&path).unwrap())
        .output()
        .unwrap();
    println!(
        "{}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
