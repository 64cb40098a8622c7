//! With maps and links pinned, the loader can go away and come back (a daemon restart) while
//! connections keep flowing: links never detach, and the reloaded datapath reuses the conntrack
//! and every setting.

use std::{net::SocketAddrV4, time::Duration};

use gateway::datapath::{AttachMode, Datapath, LoadOptions};
use gateway_common::maps;
use gateway_tests::{
    netns::Topology,
    require_root,
    traffic::{EchoClient, payload, sock},
};

fn load(topo: &Topology, mode: AttachMode, configure: bool) -> Datapath {
    let ifaces = topo.gateway_ifaces();
    let dir = topo.bpffs.path().to_owned();
    let backends = topo.backend_entries(8080);
    topo.gateway.run(move || {
        let mut dp = Datapath::load_with(&LoadOptions {
            pin_dir: Some(dir.clone()),
            ..LoadOptions::default()
        })
        .expect("load");
        if configure {
            dp.configure(Topology::SNAT_IP, 40_000..=59_999, Duration::from_secs(1))
                .unwrap();
            for b in &backends {
                dp.set_backend(b.id, b.addr, true).unwrap();
            }
            dp.set_app_backends(1, &backends).unwrap();
            dp.set_service(SocketAddrV4::new(Topology::PUBLIC_IP, 20_000), 1)
                .unwrap();
        }
        for iface in &ifaces {
            dp.attach(iface, mode, Some(&dir)).expect("attach");
        }
        dp
    })
}

fn restart(mode: AttachMode) {
    require_root();
    let topo = Topology::new(3);
    if mode == AttachMode::Xdp {
        topo.xdp_offloads();
    }
    let _servers = topo.echo_servers(8080, Duration::from_secs(60));
    let public = sock(Topology::PUBLIC_IP, 20_000);

    let first = load(&topo, mode, true);
    assert!(first.reused_maps().is_empty(), "nothing was pinned before");
    let mut conns: Vec<EchoClient> = EchoClient::connect_many(&topo.client, public, 20).unwrap();
    for (i, c) in conns.iter_mut().enumerate() {
        c.echo(&payload(10_000, i as u32)).unwrap();
    }
    let links: Vec<u32> = first.attachments().iter().map(|a| a.link_id).collect();
    let flows = first.flows().unwrap().len();
    drop(first); // the "daemon" exits

    // Nothing of this process holds the datapath now: only the pins.
    for (i, c) in conns.iter_mut().enumerate() {
        c.echo(&payload(10_000, 100 + i as u32))
            .expect("flows keep going while no loader runs");
    }

    let second = load(&topo, mode, false);
    assert_eq!(
        second.reused_maps().len(),
        maps::ALL.len(),
        "every map reused"
    );
    assert!(
        second.flows().unwrap().len() >= flows,
        "the conntrack survived"
    );
    let relinked: Vec<u32> = second.attachments().iter().map(|a| a.link_id).collect();
    assert_eq!(
        relinked, links,
        "the same links, with the new program in them"
    );
    for (i, c) in conns.iter_mut().enumerate() {
        c.echo(&payload(100_000, 200 + i as u32))
            .expect("every connection survives the restart");
    }
    let mut fresh = EchoClient::connect_many(&topo.client, public, 10).unwrap();
    for c in &mut fresh {
        c.echo(b"new after restart").unwrap();
    }
    assert!(
        second.app_stats(1).unwrap().new_flows >= 30,
        "counters survived too"
    );
}

#[test]
fn tc_restart_keeps_connections() {
    restart(AttachMode::Tc);
}

#[test]
fn xdp_restart_keeps_connections() {
    restart(AttachMode::Xdp);
}

#[test]
fn a_pinned_map_of_another_layout_is_refused_and_left_alone() {
    require_root();
    let topo = Topology::new(0);
    let path = topo.bpffs.path().join(maps::CONNTRACK4);
    // An "older version" of the conntrack: same name, other value size.
    let out = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&path)
        .args([
            "type",
            "lru_hash",
            "key",
            "16",
            "value",
            "8",
            "entries",
            "64",
            "name",
            "gw_ct4_v1",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = Datapath::load_with(&LoadOptions {
        pin_dir: Some(topo.bpffs.path().to_owned()),
        ..LoadOptions::default()
    })
    .err()
    .expect("a map of another layout must not be used");
    let msg = format!("{err}");
    assert!(
        msg.contains(maps::CONNTRACK4) && msg.contains("another layout"),
        "{msg}"
    );
    assert!(
        path.exists(),
        "the old pin is left for the operator to decide"
    );
}
