//! `gateway-sandbox`: the demo, the benchmarks and the leftover sweep, each in namespaces it
//! creates and tears down on every path (Ctrl-C included). Run through `cargo xtask`.

use std::{net::SocketAddrV4, process::ExitCode, time::Duration};

use gateway::datapath::{AttachMode, Datapath};
use gateway_common::GlobalStat;
use gateway_tests::{
    bench,
    netns::{self, Topology},
    traffic::{EchoClient, EchoServer, payload, sock},
};

fn main() -> ExitCode {
    netns::teardown_on_signals();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["sweep"] => {
            let removed = netns::sweep_stale();
            if removed.is_empty() {
                println!("no leftovers");
            } else {
                println!("removed leftovers: {}", removed.join(" "));
            }
        }
        ["demo"] => demo(),
        ["bench", rest @ ..] => bench::run(rest),
        _ => {
            eprintln!("usage: gateway-sandbox sweep | demo | bench [datapath]");
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}

fn demo() {
    gateway_tests::require_root();
    println!("building a sandbox: client -- gateway -- 3 backends, in network namespaces");
    let topo = Topology::new(3);
    let ifaces = topo.gateway_ifaces();
    let pin_dir = topo.bpffs.path().to_owned();
    let datapath = topo.gateway.run(move || {
        let mut d = Datapath::load().expect("load the datapath");
        for iface in &ifaces {
            d.attach(iface, AttachMode::Tc, Some(&pin_dir))
                .expect("attach");
        }
        d
    });
    println!(
        "datapath loaded and attached (tc) on {} in namespace {}",
        topo.gateway_ifaces().join(", "),
        topo.gateway.name()
    );
    let servers: Vec<_> = topo
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            EchoServer::start(
                b,
                SocketAddrV4::new(b.ip, 5000),
                &format!("backend-{i}"),
                Duration::from_secs(30),
            )
        })
        .collect();
    for b in &topo.backends {
        let mut c = EchoClient::connect(&topo.client, sock(b.ip, 5000)).expect("connect");
        c.echo(&payload(64 * 1024, 7)).expect("echo");
        println!(
            "client -> {}:5000 answered by {}: 64 KiB echoed byte-exact",
            b.ip, c.server
        );
    }
    let stats = datapath.global_stats().expect("stats");
    println!(
        "the tc program saw {} packets; load balancing comes with the datapath and control plane",
        stats.get(GlobalStat::TcPackets)
    );
    drop(servers);
    drop(datapath);
    drop(topo);
    println!("sandbox torn down");
}
