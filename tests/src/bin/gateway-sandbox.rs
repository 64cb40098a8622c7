//! `gateway-sandbox`: the demo, the benchmarks and the leftover sweep, each in namespaces it
//! creates and tears down on every path (Ctrl-C included). Run through `cargo xtask`.

use std::{net::SocketAddrV4, process::ExitCode, time::Duration};

use gateway::datapath::{AttachMode, Datapath};
use gateway_tests::{
    bench,
    netns::{self, Topology},
    traffic::{EchoClient, payload, sock},
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
    println!(
        "sandbox: client -- gateway -- backends b0, b1, b2, each in its own network namespace"
    );
    let topo = Topology::new(3);
    let ifaces = topo.gateway_ifaces();
    let pin_dir = topo.bpffs.path().to_owned();
    let public = SocketAddrV4::new(Topology::PUBLIC_IP, 20_000);
    let backends = topo.backend_entries(8080);
    let servers = topo.echo_servers(8080, Duration::from_secs(120));
    let bs = backends.clone();
    let mut datapath = topo.gateway.run(move || {
        let mut d = Datapath::load().expect("load the datapath");
        d.configure(Topology::SNAT_IP, 40_000..=59_999, Duration::from_secs(1))
            .expect("configure");
        for b in &bs {
            d.set_backend(b.id, b.addr, true).expect("backend");
        }
        d.set_app_backends(1, &bs).expect("table");
        d.set_service(public, 1).expect("service");
        for iface in &ifaces {
            d.attach(iface, AttachMode::Tc, Some(&pin_dir))
                .expect("attach");
        }
        d
    });
    println!(
        "gateway: datapath attached (tc) on {}; app 1 is tcp://{public}, SNAT {} ports 40000-59999",
        topo.gateway_ifaces().join(", "),
        Topology::SNAT_IP
    );
    let to = sock(*public.ip(), public.port());
    let show = |title: &str, conns: &[EchoClient]| {
        let mut by: std::collections::BTreeMap<&str, usize> = Default::default();
        for c in conns {
            *by.entry(c.server.as_str()).or_default() += 1;
        }
        println!("{title}");
        for (name, n) in by {
            println!("  {name} {n:>4}  {}", "#".repeat(n / 5));
        }
    };
    let mut conns = EchoClient::connect_many(&topo.client, to, 300).expect("connect");
    for (i, c) in conns.iter_mut().enumerate() {
        c.echo(&payload(1024, i as u32)).expect("echo");
    }
    show(
        "300 connections from the client, each echoed 1 KiB through the gateway:",
        &conns,
    );
    drop(conns);

    let mut open = EchoClient::connect(&topo.client, to).expect("connect");
    open.echo(b"hello").expect("echo");
    let gone = backends
        .iter()
        .find(|b| open.server == format!("b{}", b.id - 1))
        .copied()
        .expect("its backend");
    let rest: Vec<_> = backends
        .iter()
        .copied()
        .filter(|b| b.id != gone.id)
        .collect();
    datapath.set_app_backends(1, &rest).expect("table");
    println!(
        "\nremoved {} ({}) from the app while a connection to it is open",
        open.server, gone.addr
    );
    let conns = EchoClient::connect_many(&topo.client, to, 100).expect("connect");
    show("100 new connections:", &conns);
    open.echo(&payload(1 << 20, 3))
        .expect("the open connection still works");
    println!(
        "the open connection to {} still echoes (1 MiB, byte-exact)",
        open.server
    );
    let stats = datapath.app_stats(1).expect("stats");
    println!(
        "\napp 1 counters: {} flows, {} packets in, {} packets out",
        stats.new_flows, stats.packets_in, stats.packets_out
    );
    drop((conns, open, servers, datapath, topo));
    println!("sandbox torn down");
}
