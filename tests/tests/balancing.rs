//! The datapath end to end, with real TCP in namespaces (client, gateway, 3 backends), in both
//! attach modes: TC with the veths' default offloads, XDP with what native XDP on veth needs.

use std::{
    collections::HashMap,
    net::SocketAddrV4,
    sync::{Arc, Mutex},
    time::Duration,
};

use gateway::{
    datapath::{AttachMode, Datapath, LoadOptions},
    maglev,
};
use gateway_common::GlobalStat;
use gateway_tests::{
    netns::Topology,
    require_root,
    traffic::{EchoClient, EchoServer, payload, sock},
};

const APP: u32 = 1;
const PORT: u16 = 20_000;
const BACKEND_PORT: u16 = 8080;
/// Source ports the test binds itself: above the ephemeral range (32768-60999), so no socket
/// the kernel gave a port to can hold one of them.
const CHOSEN_PORTS: std::ops::Range<u16> = 61_000..63_000;

struct Gateway {
    topo: Topology,
    dp: Arc<Mutex<Datapath>>,
    backends: Vec<maglev::Entry>,
    _servers: Vec<EchoServer>,
}

impl Gateway {
    fn public() -> SocketAddrV4 {
        SocketAddrV4::new(Topology::PUBLIC_IP, PORT)
    }

    fn start(mode: AttachMode) -> Self {
        require_root();
        let topo = Topology::new(3);
        if mode == AttachMode::Xdp {
            topo.xdp_offloads();
        }
        let ifaces = topo.gateway_ifaces();
        let pin = topo.bpffs.path().to_owned();
        let backends = topo.backend_entries(BACKEND_PORT);
        let servers = topo.echo_servers(BACKEND_PORT, Duration::from_secs(120));
        let bs = backends.clone();
        let dp = topo.gateway.run(move || {
            let mut dp = Datapath::load_with(&LoadOptions::default()).expect("load");
            dp.configure(Topology::SNAT_IP, 40_000..=59_999, Duration::from_secs(1))
                .expect("configure");
            for b in &bs {
                dp.set_backend(b.id, b.addr, true).expect("backend");
            }
            dp.set_app_backends(APP, &bs).expect("table");
            dp.set_service(Self::public(), APP).expect("service");
            for iface in &ifaces {
                dp.attach(iface, mode, Some(&pin)).expect("attach");
            }
            dp
        });
        Gateway {
            topo,
            dp: Arc::new(Mutex::new(dp)),
            backends,
            _servers: servers,
        }
    }

    fn stat(&self, s: GlobalStat) -> u64 {
        self.dp.lock().unwrap().global_stats().unwrap().get(s)
    }
}

fn spread(conns: &[EchoClient]) -> HashMap<String, usize> {
    let mut by = HashMap::new();
    for c in conns {
        *by.entry(c.server.clone()).or_default() += 1;
    }
    by
}

fn balancing(mode: AttachMode) {
    let gw = Gateway::start(mode);
    let public = sock(Topology::PUBLIC_IP, PORT);

    // 300 concurrent connections, each exchanging data with its backend.
    let mut conns = EchoClient::connect_many(&gw.topo.client, public, 300).expect("300 connects");
    for (i, c) in conns.iter_mut().enumerate() {
        c.echo(&payload(2000, i as u32)).expect("echo");
    }
    let by = spread(&conns);
    assert_eq!(by.values().sum::<usize>(), 300);
    for name in ["b0", "b1", "b2"] {
        let n = by.get(name).copied().unwrap_or(0);
        assert!((60..=150).contains(&n), "{name} got {n} of 300: {by:?}");
    }
    drop(conns);
    assert!(gw.stat(GlobalStat::Forwarded) > 0 && gw.stat(GlobalStat::Reversed) > 0);

    // 20 MiB both ways, byte-exact.
    let mut big = EchoClient::connect(&gw.topo.client, public).expect("connect");
    big.echo(&payload(20 << 20, 99))
        .expect("20 MiB echoed byte-exact");

    // Hairpin: backend 0 reaches the public endpoint, landing on itself and on another backend.
    let b0 = &gw.topo.backends[0];
    for want_self in [true, false] {
        let port = (CHOSEN_PORTS.start..CHOSEN_PORTS.start + 1000)
            .find(|&p| {
                let id = gw
                    .dp
                    .lock()
                    .unwrap()
                    .predict_backend(APP, SocketAddrV4::new(b0.ip, p), Gateway::public())
                    .unwrap()
                    .unwrap();
                (id == gw.backends[0].id) == want_self
            })
            .expect("a source port for this case");
        let mut c = EchoClient::connect_from(b0, sock(b0.ip, port), public).expect("hairpin");
        assert_eq!(
            c.server == "b0",
            want_self,
            "hairpin landed on {}",
            c.server
        );
        c.echo(&payload(64 << 10, port.into()))
            .expect("hairpin echo");
    }

    // A connection stays on its backend when that backend leaves the set; new ones avoid it.
    let mut long = EchoClient::connect(&gw.topo.client, public).expect("connect");
    long.echo(b"before").unwrap();
    let gone = gw
        .backends
        .iter()
        .find(|b| format!("b{}", b.id - 1) == long.server)
        .copied()
        .unwrap();
    let rest: Vec<_> = gw
        .backends
        .iter()
        .copied()
        .filter(|b| b.id != gone.id)
        .collect();
    gw.dp.lock().unwrap().set_app_backends(APP, &rest).unwrap();
    let fresh = EchoClient::connect_many(&gw.topo.client, public, 60).expect("60 connects");
    let by = spread(&fresh);
    assert!(
        !by.contains_key(&long.server),
        "new connections reached {}: {by:?}",
        long.server
    );
    long.echo(&payload(256 << 10, 5))
        .expect("the open connection to the removed backend still works");
    drop(fresh);

    // A missing neighbour entry does not hang a connection.
    gw.dp
        .lock()
        .unwrap()
        .set_app_backends(APP, &gw.backends)
        .unwrap();
    let b2 = &gw.topo.backends[2];
    gw.topo
        .gateway
        .ip(&format!("neigh del {} dev {}", b2.ip, b2.gw_iface));
    std::thread::sleep(Duration::from_millis(1100)); // cached next hops age out (1 s)
    let fallbacks = gw.stat(GlobalStat::NeighFallbacks);
    let port = (CHOSEN_PORTS.start + 1000..CHOSEN_PORTS.end)
        .find(|&p| {
            gw.dp
                .lock()
                .unwrap()
                .predict_backend(
                    APP,
                    SocketAddrV4::new(Topology::CLIENT_IP, p),
                    Gateway::public(),
                )
                .unwrap()
                == Some(3)
        })
        .unwrap();
    let mut c = EchoClient::connect_from(&gw.topo.client, sock(Topology::CLIENT_IP, port), public)
        .expect("connect through a missing neighbour");
    assert_eq!(c.server, "b2");
    c.echo(b"neighbour resolved").unwrap();
    assert!(gw.stat(GlobalStat::NeighFallbacks) > fallbacks);
}

#[test]
fn tc_balances_real_tcp() {
    balancing(AttachMode::Tc);
}

#[test]
fn xdp_balances_real_tcp() {
    balancing(AttachMode::Xdp);
}
