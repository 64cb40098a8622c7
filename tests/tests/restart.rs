//! With maps and links pinned, the loader can go away and come back (a daemon restart) while
//! connections keep flowing: links never detach, and the reloaded datapath reuses the conntrack
//! and every setting.

//!
//! An upgrade from an earlier release carries every connection over into this build's table:
//! from the previous one (`gw_ct4_v2`, an LRU hash of the same values) or the one before
//! (`gw_ct4_v1`, 80-byte values).

use std::{
    net::{SocketAddr, SocketAddrV4},
    path::Path,
    time::Duration,
};

use aya::maps::{HashMap, Map, MapData};
use gateway::datapath::{AttachMode, Datapath, FlowV1, FlowV2, LoadOptions};
use gateway_common::maps::{self, Flow, FlowKey4};
use gateway_tests::{
    daemon::Daemon,
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

/// `bpftool map create PATH type TYPE key K value V entries N name NAME`.
#[track_caller]
fn bpftool_create(path: &Path, kind: &str, key: usize, value: usize, entries: u32, name: &str) {
    let out = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(path)
        .args([
            "type",
            kind,
            "key",
            &key.to_string(),
            "value",
            &value.to_string(),
        ])
        .args(["entries", &entries.to_string(), "name", name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bpftool map create {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The conntrack table pinned at `path`, with values of `V`.
#[track_caller]
fn pinned_table<V: aya::Pod>(path: &Path) -> HashMap<MapData, FlowKey4, V> {
    let map = MapData::from_pin(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    HashMap::try_from(Map::from_map_data(map).expect("a map type"))
        .expect("a conntrack table's layout")
}

/// An earlier release's conntrack layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Release {
    /// `gw_ct4_v2`: an LRU hash of this build's values; its counters `gw_global_v3`.
    V2,
    /// `gw_ct4_v1`: 80-byte values; its counters `gw_global_v2`.
    V1,
}

impl Release {
    fn conntrack(self) -> &'static str {
        match self {
            Release::V2 => maps::CONNTRACK4_V2,
            Release::V1 => maps::CONNTRACK4_V1,
        }
    }

    fn counters(self) -> &'static str {
        match self {
            Release::V2 => "gw_global_v3",
            Release::V1 => "gw_global_v2",
        }
    }
}

/// What `release` would have pinned in `dir`: its conntrack table holding `entries` (as its
/// values hold them) and its global counters.
#[track_caller]
fn pin_release(dir: &Path, release: Release, entries: &[(FlowKey4, Flow)]) {
    if release == Release::V1 {
        return pin_previous_release(dir, entries);
    }
    let path = dir.join(release.conntrack());
    bpftool_create(
        &path,
        "lru_hash",
        16,
        maps::FLOW_V2_SIZE,
        1024,
        release.conntrack(),
    );
    let mut table = pinned_table::<FlowV2>(&path);
    for (key, flow) in entries {
        let v2: FlowV2 = flow_bytes(flow)[..maps::FLOW_V2_SIZE].try_into().unwrap();
        table.insert(key, v2, 0).expect("fill gw_ct4_v2");
    }
    bpftool_create(
        &dir.join(release.counters()),
        "percpu_array",
        4,
        8,
        16,
        release.counters(),
    );
}

/// What the release before the previous one would have pinned in `dir`: a `gw_ct4_v1` table
/// (80-byte values) holding `entries` truncated to their first 80 bytes, and its global counters
/// (`gw_global_v2`).
#[track_caller]
fn pin_previous_release(dir: &Path, entries: &[(FlowKey4, Flow)]) {
    let v1 = dir.join(maps::CONNTRACK4_V1);
    bpftool_create(
        &v1,
        "lru_hash",
        16,
        maps::FLOW_V1_SIZE,
        1024,
        maps::CONNTRACK4_V1,
    );
    let mut table = pinned_table::<FlowV1>(&v1);
    for (key, flow) in entries {
        table
            .insert(key, v1_value(flow), 0)
            .expect("fill gw_ct4_v1");
    }
    bpftool_create(
        &dir.join("gw_global_v2"),
        "percpu_array",
        4,
        8,
        16,
        "gw_global_v2",
    );
}

/// The bytes of `flow` as the maps hold them.
fn flow_bytes(flow: &Flow) -> [u8; 104] {
    let mut bytes = [0u8; 104];
    // SAFETY: `Flow` is `#[repr(C)]` plain old data of 104 bytes without padding (gateway-common
    // derives bytemuck's `Pod` for it, which checks that at compile time).
    bytes.copy_from_slice(unsafe {
        std::slice::from_raw_parts((flow as *const Flow).cast::<u8>(), size_of::<Flow>())
    });
    bytes
}

/// The previous release's value of `flow`: its first 80 bytes.
fn v1_value(flow: &Flow) -> FlowV1 {
    flow_bytes(flow)[..maps::FLOW_V1_SIZE].try_into().unwrap()
}

/// The forward key of the connection from `client` to the public endpoint.
fn forward_key(client: SocketAddr, public: SocketAddr) -> FlowKey4 {
    let v4 = |a: SocketAddr| match a {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(a) => panic!("not IPv4: {a}"),
    };
    FlowKey4::from_addrs(v4(client), v4(public))
}

#[test]
fn an_old_conntrack_table_is_carried_over_at_load_and_its_pins_removed() {
    require_root();
    let topo = Topology::new(0);
    let dir = topo.bpffs.path().to_owned();
    let key = FlowKey4::from_addrs(
        "192.0.2.2:40000".parse().unwrap(),
        "203.0.113.10:20000".parse().unwrap(),
    );
    let flow = Flow {
        nat_src_ip: u32::from_ne_bytes([198, 51, 100, 253]),
        nat_dst_ip: u32::from_ne_bytes([198, 51, 100, 2]),
        nat_src_port: 41_000u16.to_be(),
        nat_dst_port: 8080u16.to_be(),
        app_id: 1,
        backend_id: 2,
        state: maps::CT_SYN_SEEN | maps::CT_SYN_ACK_SEEN | maps::CT_ESTABLISHED,
        last_seen_ns: 123,
        nexthop_smac: [2, 0, 0, 0, 0, 1],
        packets: 5,
        bytes: 600,
        ..Flow::default()
    };
    let reverse_key = flow.peer_key();
    let reverse = Flow {
        direction: maps::DIR_REVERSE,
        ..flow
    };
    pin_previous_release(&dir, &[(key, flow), (reverse_key, reverse)]);

    let mut dp = Datapath::load_with(&LoadOptions {
        pin_dir: Some(dir.clone()),
        ..LoadOptions::default()
    })
    .expect("load beside the previous release's pins");
    assert!(
        !dp.reused_maps().contains(&maps::CONNTRACK4),
        "a new conntrack table"
    );
    for (k, old) in [(key, flow), (reverse_key, reverse)] {
        let new = dp.flow(&k).unwrap().expect("carried over at load");
        assert_eq!(
            flow_bytes(&new)[..maps::FLOW_V1_SIZE],
            v1_value(&old),
            "the previous release's 80 bytes, kept"
        );
        assert_eq!(
            (new.track, new.wscale, new.peer_wscale),
            (
                maps::TRACK_LIBERAL,
                maps::TCP_MAX_WSCALE,
                maps::TCP_MAX_WSCALE
            )
        );
        assert_eq!(
            (new.seq_end, new.ack_max, new.win_max, new.toa),
            (0, 0, 0, 0)
        );
    }

    // An entry the old programs create before the swap is copied after it; one of the new
    // table's own is left as it is (BPF_NOEXIST).
    let late = FlowKey4::from_addrs(
        "192.0.2.2:40001".parse().unwrap(),
        "203.0.113.10:20000".parse().unwrap(),
    );
    let mut v1 = pinned_table::<FlowV1>(&dir.join(maps::CONNTRACK4_V1));
    v1.insert(late, v1_value(&flow), 0).unwrap();
    v1.insert(
        key,
        v1_value(&Flow {
            packets: 99,
            ..flow
        }),
        0,
    )
    .unwrap();
    drop(v1);
    let upgrade = dp.finish_upgrade().unwrap();
    assert_eq!((upgrade.carried_over, upgrade.after_swap), (3, 1));
    let mut removed = upgrade.removed.clone();
    removed.sort();
    assert_eq!(removed, ["gw_ct4_v1", "gw_global_v2"]);
    assert_eq!(
        dp.flow(&late).unwrap().map(|f| f.track),
        Some(maps::TRACK_LIBERAL)
    );
    assert_eq!(
        dp.flow(&key).unwrap().map(|f| f.packets),
        Some(5),
        "an entry the new table has is not overwritten"
    );
    assert!(!dir.join(maps::CONNTRACK4_V1).exists() && !dir.join("gw_global_v2").exists());
    assert_eq!(dp.finish_upgrade().unwrap(), Default::default(), "once");
}

/// A connection exchanging data through the daemon of this build, whose pins are made to look
/// like an earlier `release`'s while it is stopped: started again, the daemon carries the
/// connection over, and it goes on byte-exact.
fn upgrade_keeps_connections(mode: AttachMode, release: Release) {
    require_root();
    let topo = Topology::new(1);
    if mode == AttachMode::Xdp {
        topo.xdp_offloads();
    }
    let _servers = topo.echo_servers(8080, Duration::from_secs(120));
    let mut daemon = Daemon::start(&topo, Some(mode), &[]);
    let backend = SocketAddrV4::new(topo.backends[0].ip, 8080).to_string();
    daemon.app_with_backends("web", &[backend]);
    let public = sock(Topology::PUBLIC_IP, 20_000);
    let mut conn = EchoClient::connect(&topo.client, public).unwrap();
    conn.echo(&payload(100_000, 1)).unwrap();
    assert!(
        daemon.terminate().is_some_and(|s| s.success()),
        "{}",
        daemon.log()
    );
    conn.echo(&payload(10_000, 2))
        .expect("the datapath goes on while no daemon runs");

    // The earlier release's pins: its conntrack holds the connection (v1: without sequence
    // tracking), this build's is not pinned (the running programs keep it alive until the
    // swap), its global counters are pinned under their old name.
    let dir = daemon.bpffs.clone();
    let current = dir.join(maps::CONNTRACK4);
    let forward = forward_key(conn.local_addr(), public);
    let (entries, before) = {
        let table = pinned_table::<Flow>(&current);
        let f = table
            .get(&forward, 0)
            .expect("the connection's forward entry");
        let r = table.get(&f.peer_key(), 0).expect("its reverse entry");
        (vec![(forward, f), (f.peer_key(), r)], f)
    };
    pin_release(&dir, release, &entries);
    std::fs::remove_file(&current).unwrap();

    daemon.restart();
    for i in 0..3 {
        conn.echo(&payload(100_000, 10 + i))
            .unwrap_or_else(|e| panic!("{mode}: the connection after the upgrade: {e}"));
    }
    let log = daemon.log();
    assert!(
        log.contains("conntrack carried over") && log.contains("2 entries"),
        "{mode}: {log}"
    );
    assert!(
        !dir.join(release.conntrack()).exists(),
        "{mode}: no {} left",
        release.conntrack()
    );
    assert!(
        !dir.join(release.counters()).exists(),
        "{mode}: no {} left",
        release.counters()
    );
    let after = pinned_table::<Flow>(&current)
        .get(&forward, 0)
        .expect("the connection is in the new table");
    assert_eq!(
        (
            after.nat_dst(),
            after.nat_src(),
            after.backend_id,
            after.created_ns
        ),
        (
            before.nat_dst(),
            before.nat_src(),
            before.backend_id,
            before.created_ns
        ),
        "{mode}: the same flow, carried over"
    );
    assert!(
        after.packets > before.packets,
        "{mode}: its packets went through the new table"
    );
    let mut fresh = EchoClient::connect(&topo.client, public).unwrap();
    fresh.echo(b"new after the upgrade").unwrap();
}

#[test]
fn tc_upgrade_from_the_previous_conntrack_keeps_connections() {
    upgrade_keeps_connections(AttachMode::Tc, Release::V2);
}

#[test]
fn xdp_upgrade_from_the_previous_conntrack_keeps_connections() {
    upgrade_keeps_connections(AttachMode::Xdp, Release::V2);
}

#[test]
fn tc_upgrade_from_the_release_before_keeps_connections() {
    upgrade_keeps_connections(AttachMode::Tc, Release::V1);
}
