//! The client's address through the gateway, end to end (issue 17): the real daemon in each
//! attach mode, an app with `--client-address toa`, and on the backend host `gateway agent`
//! attached to a test cgroup in which unmodified servers run (redis, and a Python server that
//! answers with what `accept()` and `getpeername()` gave it). Real TCP from the client
//! namespace, from ports the test chooses, so that the backend must see exactly them.
//!
//! - redis `CLIENT LIST` and the Python server show the client namespace's address and port;
//!   a dual-stack socket too (`::ffff:…`);
//! - an app without the setting, or the setting turned off live, shows the gateway's SNAT
//!   address (the real TCP peer);
//! - a client that sends its own TOA option with a forged address is not believed: an app with
//!   the setting sees the client, one without sees the gateway;
//! - a connection to the container that does not come from the SNAT address (from the gateway
//!   host's own address) is seen as what it is, forged option or not;
//! - the handshake's ACK dropped once (an nft rule on the backend host): the client's first data
//!   makes the backend's end, and still carries the address.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    time::Duration,
};

use gateway::datapath::AttachMode;
use gateway_common::net::{ip_to_net, port_to_net, toa};
use gateway_tests::{
    agent::{Agent, ask, in_cgroup, peer_server, seen_as},
    cgroup::CgroupGuard,
    daemon::Daemon,
    netns::{Bpffs, ChildGuard, RunDir, Topology, unique_prefix},
    rawtcp::RawTcpClient,
    require_root,
};
use socket2::{Domain, Socket, Type};

/// The Python server's IPv4 and dual-stack ports on the backend, and redis's.
const PY: u16 = 7000;
const PY6: u16 = 7001;
const REDIS: u16 = 6379;
/// The apps' public ports: the Python server with the setting, its dual-stack socket with it,
/// the same server without it, redis with it.
const APP_PY: u16 = 20_001;
const APP_PY6: u16 = 20_002;
const APP_PLAIN: u16 = 20_003;
const APP_REDIS: u16 = 20_004;
/// The agent's metrics address (in the backend's namespace).
const METRICS: &str = "127.0.0.1:9719";
/// What a forging client claims to be.
const LIAR: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 66), 4242);

/// The client namespace's address at `port`.
fn client(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Topology::CLIENT_IP, port)
}

/// A real TCP connection from the client namespace's `port` to the app at `app_port`: sends
/// `message`, reads until the answer is `complete`, closes.
fn exchange(
    topo: &Topology,
    port: u16,
    app_port: u16,
    message: &'static [u8],
    complete: fn(&[u8]) -> bool,
) -> String {
    topo.client.run(move || {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
        s.set_reuse_address(true).expect("SO_REUSEADDR");
        s.bind(&client(port).into())
            .expect("bind the client's port");
        s.connect_timeout(
            &SocketAddrV4::new(Topology::PUBLIC_IP, app_port).into(),
            Duration::from_secs(5),
        )
        .unwrap_or_else(|e| panic!("connect from {port} to {app_port}: {e}"));
        let mut s: TcpStream = s.into();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(message).expect("send");
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !complete(&answer) {
            let n = s
                .read(&mut buf)
                .unwrap_or_else(|e| panic!("read from {app_port}: {e}"));
            assert!(n > 0, "closed before a whole answer: {answer:?}");
            answer.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(answer).expect("utf-8").trim().to_owned()
    })
}

/// What the Python server says of a connection from the client's `port` to `app_port`.
fn peer_seen(topo: &Topology, port: u16, app_port: u16) -> String {
    exchange(topo, port, app_port, b"who am i?\n", |a| a.ends_with(b"\n"))
}

/// Redis's `CLIENT LIST` on a connection from the client's `port` (a bulk string: `$LEN`, then
/// the list).
fn redis_clients(topo: &Topology, port: u16) -> String {
    exchange(topo, port, APP_REDIS, b"CLIENT LIST\r\n", |a| {
        let text = String::from_utf8_lossy(a);
        let Some((len, rest)) = text.strip_prefix('$').and_then(|t| t.split_once("\r\n")) else {
            return false;
        };
        len.parse::<usize>().is_ok_and(|n| rest.len() >= n + 2)
    })
}

/// A forged TOA option claiming [`LIAR`].
fn forged() -> [u8; 8] {
    toa::option(ip_to_net(*LIAR.ip()), port_to_net(LIAR.port()))
}

/// The backend host (backend 0 of a topology) as the tests set it up: the agent on a test
/// cgroup trusting the gateway's SNAT address, the Python server and redis in the cgroup.
struct BackendHost {
    _servers: Vec<ChildGuard>,
    agent: Agent,
    pins: Bpffs,
    _cgroup: CgroupGuard,
    _dir: RunDir,
}

impl BackendHost {
    fn new(topo: &Topology) -> Self {
        let prefix = unique_prefix();
        let dir = RunDir::new(&format!("{prefix}-toa"));
        let pins = Bpffs::new(&format!("{prefix}-toa-pins"));
        let cgroup = CgroupGuard::new("toa");
        let backend = &topo.backends[0];
        let agent = Agent::start(
            backend.name(),
            cgroup.path(),
            &Topology::SNAT_IP.to_string(),
            METRICS,
            pins.path(),
            dir.path().join("agent.log"),
        );
        let py = peer_server(&cgroup, backend.name(), dir.path(), backend.ip, PY, PY6);
        let redis = in_cgroup(
            &cgroup,
            backend.name(),
            &[
                "redis-server",
                "--port",
                &REDIS.to_string(),
                "--bind",
                &backend.ip.to_string(),
                "--protected-mode",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            &dir.path().join("redis.log"),
            "Ready to accept connections",
        );
        BackendHost {
            _servers: vec![py, redis],
            agent,
            pins,
            _cgroup: cgroup,
            _dir: dir,
        }
    }

    /// `gateway agent status --json`'s counter `label`.
    fn counter(&self, label: &str) -> u64 {
        let out = std::process::Command::new(gateway_tests::daemon::gateway_bin())
            .args(["agent", "status", "--json", "--pin-dir"])
            .arg(self.pins.path())
            .output()
            .expect("gateway agent status");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        status["counters"]
            .as_array()
            .and_then(|c| c.iter().find(|p| p[0] == label))
            .and_then(|p| p[1].as_u64())
            .unwrap_or_else(|| panic!("no counter {label} in {status}"))
    }
}

/// The topology (one backend) in `mode`, the backend host with its agent and servers, and the
/// daemon with `apps`: (name, public port, backend port, `--client-address`), each active.
fn gateway(mode: AttachMode, apps: &[(&str, u16, u16, &str)]) -> (Topology, BackendHost, Daemon) {
    require_root();
    let topo = Topology::new(1);
    if mode == AttachMode::Xdp {
        topo.xdp_offloads();
    }
    let host = BackendHost::new(&topo);
    let daemon = Daemon::start(&topo, Some(mode), &[]);
    let backend = topo.backends[0].ip;
    for (app, port, server, setting) in apps {
        let port = port.to_string();
        daemon.ok(&[
            "app",
            "create",
            app,
            "--port",
            &port,
            "--client-address",
            setting,
        ]);
        daemon.ok(&["backend", "add", app, &format!("{backend}:{server}")]);
    }
    for (app, ..) in apps {
        daemon.wait_active(app, 1);
    }
    (topo, host, daemon)
}

fn the_app_sees_the_client(mode: AttachMode) {
    let (topo, host, daemon) = gateway(
        mode,
        &[
            ("py", APP_PY, PY, "toa"),
            ("py6", APP_PY6, PY6, "toa"),
            ("plain", APP_PLAIN, PY, "none"),
            ("redis", APP_REDIS, REDIS, "toa"),
        ],
    );
    let backend = topo.backends[0].ip;
    let snat = format!("{}:", Topology::SNAT_IP);

    // The client, as it is, in accept(), getpeername() and redis.
    assert_eq!(
        peer_seen(&topo, 41_001, APP_PY),
        seen_as(client(41_001), client(41_001))
    );
    let mapped = format!("::ffff:{}", client(41_002));
    assert_eq!(peer_seen(&topo, 41_002, APP_PY6), seen_as(&mapped, &mapped));
    let clients = redis_clients(&topo, 41_003);
    assert!(
        clients.contains(&format!(" addr={} ", client(41_003))),
        "redis CLIENT LIST: {clients}"
    );

    // Without the setting: the gateway.
    let plain = peer_seen(&topo, 41_004, APP_PLAIN);
    assert!(plain.starts_with(&format!("accept={snat}")), "{plain}");
    // Turned off on the live app, then on again: new connections follow.
    daemon.ok(&["app", "set", "py", "--client-address", "none"]);
    let off = peer_seen(&topo, 41_005, APP_PY);
    assert!(off.starts_with(&format!("accept={snat}")), "{off}");
    daemon.ok(&["app", "set", "py", "--client-address", "toa"]);
    assert_eq!(
        peer_seen(&topo, 41_006, APP_PY),
        seen_as(client(41_006), client(41_006))
    );

    // A client's own TOA option is not believed: with the setting the app sees the client,
    // without it the gateway.
    let public = |port| SocketAddrV4::new(Topology::PUBLIC_IP, port);
    let mut liar = RawTcpClient::connect(&topo.client, client(41_007), public(APP_PY), &forged())
        .expect("connect through the gateway");
    assert_eq!(ask(&mut liar), seen_as(client(41_007), client(41_007)));
    let _ = liar.reset();
    let mut liar =
        RawTcpClient::connect(&topo.client, client(41_008), public(APP_PLAIN), &forged())
            .expect("connect through the gateway");
    let seen = ask(&mut liar);
    assert!(seen.starts_with(&format!("accept={snat}")), "{seen}");
    let _ = liar.reset();

    // Not from the SNAT address: the gateway host's own address straight to the container,
    // with a forged option: seen as what it is.
    let direct = SocketAddrV4::new(topo.backends[0].gw_ip, 41_009);
    let mut other = RawTcpClient::connect(
        &topo.gateway,
        direct,
        SocketAddrV4::new(backend, PY),
        &forged(),
    )
    .expect("connect straight to the container");
    assert_eq!(ask(&mut other), seen_as(direct, direct));
    let _ = other.reset();
    assert!(host.counter("untrusted_options") >= 1);

    // The handshake's ACK lost once, after the gateway: the client's request (PSH) makes the
    // backend's end, with the address.
    topo.backends[0].nft(&format!(
        "table ip toa_lost {{\n\
         \tcounter dropped {{}}\n\
         \tset seen {{ type inet_service; flags dynamic; }}\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority -10;\n\
         \t\tip saddr {} tcp dport {PY} tcp flags == ack tcp sport != @seen add @seen {{ tcp sport }} counter name dropped drop\n\
         \t}}\n\
         }}\n",
        Topology::SNAT_IP
    ));
    assert_eq!(
        peer_seen(&topo, 41_010, APP_PY),
        seen_as(client(41_010), client(41_010))
    );
    assert_eq!(
        topo.backends[0].nft_counter("toa_lost", "dropped").0,
        1,
        "the handshake's ACK was dropped once"
    );

    // What the agent and the gateway counted.
    assert!(host.counter("mapped") >= 6, "{}", host.agent.log());
    let scrape = daemon.scrape();
    assert!(scrape.value("gateway_toa_total", &[("what", "added")]) >= 6.0);
    assert!(scrape.value("gateway_toa_total", &[("what", "stripped")]) >= 2.0);
}

#[test]
fn the_app_sees_the_client_through_xdp() {
    the_app_sees_the_client(AttachMode::Xdp);
}

#[test]
fn the_app_sees_the_client_through_tc() {
    the_app_sees_the_client(AttachMode::Tc);
}

/// Review of issue 17: a client provokes its backend, still in SYN-RECV, into a segment
/// without SYN (a bare ACK, Linux's answer to a segment outside the request's window), then
/// sends its own TOA option on the ACK that makes the backend's end: the app must still see the
/// client, not what it claims.
fn a_backend_in_syn_recv_provoked_into_an_ack_still_hears_the_truth(mode: AttachMode) {
    let (topo, host, _daemon) = gateway(mode, &[("py", APP_PY, PY, "toa")]);

    let public = SocketAddrV4::new(Topology::PUBLIC_IP, APP_PY);
    let mut liar = RawTcpClient::handshake(&topo.client, client(41_101), public)
        .expect("SYN, SYN-ACK through the gateway");
    liar.stale_ack().expect("an old ACK");
    let answer = liar
        .next(Duration::from_secs(3))
        .expect("recv")
        .expect("the backend in SYN-RECV answers an old ACK with an ACK");
    assert_eq!(answer.flags & 0x12, 0x10, "a bare ACK: {answer:?}");
    liar.ack(&forged())
        .expect("the handshake's ACK, with a forged option");
    assert_eq!(
        ask(&mut liar),
        seen_as(client(41_101), client(41_101)),
        "agent: {}",
        host.agent.log()
    );
    let _ = liar.reset();
}

#[test]
fn a_backend_in_syn_recv_provoked_into_an_ack_still_hears_the_truth_through_xdp() {
    a_backend_in_syn_recv_provoked_into_an_ack_still_hears_the_truth(AttachMode::Xdp);
}

#[test]
fn a_backend_in_syn_recv_provoked_into_an_ack_still_hears_the_truth_through_tc() {
    a_backend_in_syn_recv_provoked_into_an_ack_still_hears_the_truth(AttachMode::Tc);
}
