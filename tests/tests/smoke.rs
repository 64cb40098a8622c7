//! The datapath loads on the gateway namespace's interfaces in both attach modes, every packet
//! of the connection goes through it, and TCP between the client and a backend still flows.

use std::{net::SocketAddrV4, time::Duration};

use gateway::datapath::{AttachMode, Datapath};
use gateway_common::GlobalStat;
use gateway_tests::{
    netns::Topology,
    require_root,
    traffic::{EchoClient, EchoServer, payload, sock},
};

fn smoke(mode: AttachMode) {
    require_root();
    let topo = Topology::new(1);
    if mode == AttachMode::Xdp {
        topo.xdp_offloads();
    }
    let pin_dir = topo.bpffs.path().to_owned();
    let ifaces = topo.gateway_ifaces();
    let datapath = topo.gateway.run(move || {
        let mut datapath = Datapath::load().expect("load the datapath");
        for iface in &ifaces {
            datapath
                .attach(iface, mode, Some(&pin_dir))
                .unwrap_or_else(|e| panic!("attach {mode} to {iface}: {e:?}"));
        }
        datapath
    });
    for attachment in datapath.attachments() {
        let pin = attachment.pin_path().expect("pinned");
        assert!(pin.exists(), "{} is not pinned", pin.display());
    }

    let backend = &topo.backends[0];
    let _server = EchoServer::start(
        backend,
        SocketAddrV4::new(backend.ip, 5000),
        "b0",
        Duration::from_secs(30),
    );
    let before = datapath.global_stats().expect("stats");
    let mut client = EchoClient::connect(&topo.client, sock(backend.ip, 5000)).expect("connect");
    assert_eq!(client.server, "b0");
    client.echo(&payload(1 << 20, 1)).expect("1 MiB echoed");
    drop(client);

    let after = datapath.global_stats().expect("stats");
    let stat = match mode {
        AttachMode::Xdp => GlobalStat::XdpPackets,
        AttachMode::Tc => GlobalStat::TcPackets,
    };
    // Handshake, data each way (GRO may merge segments into 64 KiB ones), acks and FINs, on
    // both of the gateway's interfaces: at least a few dozen packets.
    let seen = after.get(stat) - before.get(stat);
    assert!(seen >= 20, "the {mode} program saw only {seen} packets");
}

#[test]
fn tcp_flows_through_the_xdp_program() {
    smoke(AttachMode::Xdp);
}

#[test]
fn tcp_flows_through_the_tc_program() {
    smoke(AttachMode::Tc);
}
