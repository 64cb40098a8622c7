//! `gateway-sandbox`: the demo, the benchmarks and the leftover sweep, each in namespaces it
//! creates and tears down on every path (Ctrl-C included). Run through `cargo xtask`.

use std::{process::ExitCode, time::Duration};

use gateway_tests::{
    bench,
    daemon::Daemon,
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
    let servers = topo.echo_servers(8080, Duration::from_secs(300));
    println!(
        "backends: a TCP server on {} that says its name (b0, b1, b2), then echoes",
        servers
            .iter()
            .map(|s| s.addr.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let daemon = Daemon::start(&topo, None, &[]);
    println!(
        "gateway: `gateway daemon` runs in the gateway namespace (public {}, SNAT {}), API on {}",
        Topology::PUBLIC_IP,
        Topology::SNAT_IP,
        daemon.socket.display()
    );
    let cli = |args: &[&str]| {
        println!("\n$ gateway {}", args.join(" "));
        let out = daemon.ok(args);
        print!("{out}");
        out
    };
    let url = cli(&["app", "create", "web"]);
    let port: u16 = url
        .trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a TCP_URL");
    for b in &topo.backends {
        cli(&["backend", "add", "web", &format!("{}:8080", b.ip)]);
    }
    daemon.wait_active("web", topo.backends.len());
    println!("\n(the backends are active once their health checks pass)");
    let to = sock(Topology::PUBLIC_IP, port);
    let show = |title: &str, conns: &[EchoClient]| {
        let mut by: std::collections::BTreeMap<&str, usize> = Default::default();
        for c in conns {
            *by.entry(c.server.as_str()).or_default() += 1;
        }
        println!("\n{title}");
        for (name, n) in by {
            println!("  {name} {n:>4}  {}", "#".repeat(n / 5));
        }
    };
    let mut conns = EchoClient::connect_many(&topo.client, to, 300).expect("connect");
    for (i, c) in conns.iter_mut().enumerate() {
        c.echo(&payload(1024, i as u32)).expect("echo");
    }
    show(
        &format!(
            "300 connections from the client to {}, each echoed 1 KiB:",
            url.trim()
        ),
        &conns,
    );
    // Connection counts are as of the daemon's last conntrack scan.
    daemon.fresh_status();
    cli(&["status"]);
    cli(&["flows", "--limit", "5"]);
    println!("\n$ curl http://127.0.0.1:9717/metrics   (in the gateway namespace; excerpt)");
    for line in daemon
        .scrape_text(false)
        .lines()
        .filter(|l| l.starts_with("gateway_app_") || l.starts_with("gateway_backend_connections"))
    {
        println!("{line}");
    }
    drop(conns);

    let mut open = EchoClient::connect(&topo.client, to).expect("connect");
    open.echo(b"hello").expect("echo");
    let gone = topo
        .backends
        .iter()
        .enumerate()
        .find(|(i, _)| open.server == format!("b{i}"))
        .map(|(_, b)| format!("{}:8080", b.ip))
        .expect("its backend");
    println!(
        "\na connection to {} ({gone}) is open; removing that backend live:",
        open.server
    );
    daemon.fresh_status();
    cli(&["backend", "remove", "web", &gone]);
    let conns = EchoClient::connect_many(&topo.client, to, 100).expect("connect");
    show("100 new connections:", &conns);
    open.echo(&payload(1 << 20, 3))
        .expect("the open connection still works");
    println!(
        "the open connection to {} still echoes (1 MiB, byte-exact)",
        open.server
    );
    daemon.fresh_status();
    cli(&["backend", "list", "web"]);
    drop((conns, open));
    drop((daemon, servers, topo));
    println!("\nsandbox torn down");
}
