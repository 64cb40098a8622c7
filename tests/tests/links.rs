//! What the links around the gateway do to real connections (issue 15, inputs 5 and 6), in
//! network namespaces with real sockets: a client or a backend whose address moves to another
//! MAC while the gateway's neighbour entry for it is stale (both attach modes), and XDP mode
//! with the senders' tx checksum offload left on (the real daemon, which must say which
//! interfaces). The datapath's rows for both are `tests/datapath_links.rs`.

use std::{net::SocketAddrV4, time::Duration};

use gateway::datapath::{AttachMode, Datapath, LoadOptions};
use gateway_common::GlobalStat;
use gateway_tests::{
    daemon::Daemon,
    datapath::{APP, BACKEND_PORT, Fixture, SNAT_PORTS},
    netns::{Host, Netns, Topology, mac_str},
    require_root,
    traffic::{EchoClient, EchoServer, payload, sock},
    wait_for,
};

/// The next-hop age the daemon configures (`NEXTHOP_MAX_AGE_DEFAULT_NS`).
const NEXTHOP_AGE: Duration = Duration::from_secs(1);

/// How long a moved host may take to be reached again: the kernel's own recovery for a
/// forwarded flow is DELAY (5 s), three unicast probes a second apart, then a broadcast
/// request: about 9 s after the first packet that meets the stale entry, 12 s with TCP's
/// retransmissions; the deadline leaves room on a loaded machine. It bounds the wait, it
/// measures nothing.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(30);

/// The datapath attached in `mode` to every gateway interface of a one-backend topology
/// (app 1 on the fixture's public endpoint, next hops aging as the daemon has them), with an
/// echo server on the backend.
struct Gateway {
    topo: Topology,
    dp: Datapath,
    _server: EchoServer,
}

impl Gateway {
    fn start(mode: AttachMode) -> Self {
        require_root();
        let topo = Topology::new(1);
        if mode == AttachMode::Xdp {
            // Input 6 apart: `xdp_partial_checksums_are_completed...` leaves them on.
            topo.xdp_offloads();
        }
        let b = &topo.backends[0];
        let server = EchoServer::start(
            b,
            SocketAddrV4::new(b.ip, BACKEND_PORT),
            "b0",
            Duration::from_secs(120),
        );
        let ifaces = topo.gateway_ifaces();
        let pin = topo.bpffs.path().to_owned();
        let backends = topo.backend_entries(BACKEND_PORT);
        let dp = topo.gateway.run(move || {
            let mut dp = Datapath::load_with(&LoadOptions::default()).expect("load");
            dp.configure(Topology::SNAT_IP, SNAT_PORTS, NEXTHOP_AGE)
                .expect("configure");
            for b in &backends {
                dp.set_backend(b.id, b.addr, true).expect("backend");
            }
            dp.set_app_backends(APP, &backends).expect("table");
            dp.set_service(Fixture::service(), APP).expect("service");
            for iface in &ifaces {
                dp.attach(iface, mode, Some(&pin)).expect("attach");
            }
            dp
        });
        Gateway {
            topo,
            dp,
            _server: server,
        }
    }

    /// One connection to the app, a little data echoed, within a few seconds: whether it
    /// worked.
    fn connects(&self) -> bool {
        let public = sock(*Fixture::service().ip(), Fixture::service().port());
        EchoClient::connect_within(&self.topo.client, public, Duration::from_secs(2))
            .and_then(|mut c| {
                c.set_timeout(Duration::from_secs(2))?;
                c.echo(&payload(3000, 15))
            })
            .is_ok()
    }

    fn stat(&self, s: GlobalStat) -> u64 {
        self.dp.global_stats().expect("stats").get(s)
    }
}

/// The gateway's neighbour entry for `host` (`ip neigh show`), e.g.
/// `192.0.2.2 lladdr 02:00:00:00:00:22 REACHABLE`.
fn neighbour(gateway: &Netns, host: &Host) -> String {
    gateway
        .ip(&format!("neigh show {} dev {}", host.ip, host.gw_iface))
        .trim()
        .to_owned()
}

/// Which host moves.
#[derive(Clone, Copy, Debug)]
enum Who {
    Client,
    Backend,
}

/// Input 5: `who`'s address moves to another MAC (a replaced host: no gratuitous ARP) while
/// the gateway's neighbour entry for it is STALE with the old one. The FIB answers from a
/// STALE entry and redirected packets never pass through the kernel's neighbour code: without
/// revalidation, replies (or SYNs) go to the old MAC for good. With it, the first packet that
/// re-resolves an aged hop goes through the kernel's neighbour output, which probes the entry,
/// fails it, and asks by broadcast: a new connection works again, as it would through the
/// kernel's own forwarding.
fn a_moved_host_is_found_again(mode: AttachMode, who: Who) {
    let gw = Gateway::start(mode);
    assert!(gw.connects(), "the first connection, before any move");
    let (host, new_mac) = match who {
        Who::Client => (&gw.topo.client, [0x02, 0, 0, 0, 0, 0x22]),
        Who::Backend => (&gw.topo.backends[0], [0x02, 0, 0, 0, 0x10, 0x22]),
    };
    // The entry as the kernel leaves one unused for a while: STALE, with the MAC it had.
    gw.topo.gateway.ip(&format!(
        "neigh replace {} lladdr {} dev {} nud stale",
        host.ip,
        mac_str(host.mac),
        host.gw_iface
    ));
    // The host replaced: same address, another MAC, nothing announced (arp_notify is off).
    // The kernel flushes the host's own neighbour entries when its MAC changes, permanent ones
    // too; its entry for the gateway is put back, as the new host would have it known: else its
    // first packet would ARP for the gateway, which teaches the gateway the new MAC at once.
    host.ip(&format!(
        "link set dev {} address {}",
        host.iface,
        mac_str(new_mac)
    ));
    host.ip(&format!(
        "neigh replace {} lladdr {} dev {} nud permanent",
        host.gw_ip,
        mac_str(host.gw_mac),
        host.iface
    ));
    let before = neighbour(&gw.topo.gateway, host);
    assert!(
        before.contains(&mac_str(host.mac)) && before.contains("STALE"),
        "{before}"
    );
    let took = wait_for(RECOVERY_DEADLINE, || gw.connects());
    let after = neighbour(&gw.topo.gateway, host);
    assert!(
        took.is_some(),
        "{mode}, {who:?} moved to {}: no connection within {RECOVERY_DEADLINE:?}; the gateway's \
         entry: {after}; neigh_revalidations {}",
        mac_str(new_mac),
        gw.stat(GlobalStat::NeighRevalidations)
    );
    assert!(
        after.contains(&mac_str(new_mac)),
        "the gateway learnt the new MAC: {after}"
    );
    assert!(gw.stat(GlobalStat::NeighRevalidations) > 0);
    eprintln!(
        "{mode}, {who:?} moved: connections again after {:.1} s ({after})",
        took.unwrap().as_secs_f64()
    );
}

#[test]
fn a_client_that_moved_to_another_mac_is_found_again_xdp() {
    a_moved_host_is_found_again(AttachMode::Xdp, Who::Client);
}

#[test]
fn a_client_that_moved_to_another_mac_is_found_again_tc() {
    a_moved_host_is_found_again(AttachMode::Tc, Who::Client);
}

#[test]
fn a_backend_that_moved_to_another_mac_is_found_again_xdp() {
    a_moved_host_is_found_again(AttachMode::Xdp, Who::Backend);
}

#[test]
fn a_backend_that_moved_to_another_mac_is_found_again_tc() {
    a_moved_host_is_found_again(AttachMode::Tc, Who::Backend);
}

/// The warnings of the daemon's log about partial checksums on `iface`.
fn partial_warnings(log: &str, iface: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("partial checksums") && l.contains(&format!("{iface}:")))
        .count()
}

/// Input 6: XDP mode forced on veths whose peers keep the default tx checksum offload: their
/// segments reach XDP with partial checksums (CHECKSUM_PARTIAL, the pseudo-header's sum only).
/// Real TCP must flow both ways, byte-exact (before: every SYN dropped `bad_checksum`, the
/// connections timed out, and nothing said why), and the daemon names each interface once,
/// with the fix.
#[test]
fn xdp_with_the_senders_checksum_offload_on_carries_tcp_and_says_where() {
    require_root();
    let topo = Topology::new(1);
    // Not `xdp_offloads()`: every sender keeps its tx checksum offload. GRO on the receiving
    // sides, which native XDP redirect into a veth needs whatever the checksums.
    topo.xdp_napi();
    let b = &topo.backends[0];
    let _server = EchoServer::start(
        b,
        SocketAddrV4::new(b.ip, BACKEND_PORT),
        "b0",
        Duration::from_secs(120),
    );
    let daemon = Daemon::start(&topo, Some(AttachMode::Xdp), &[]);
    daemon.app_with_backends("web", &[format!("{}:{BACKEND_PORT}", b.ip)]);
    let public = sock(*Fixture::service().ip(), Fixture::service().port());
    let mut client = EchoClient::connect_within(&topo.client, public, Duration::from_secs(5))
        .unwrap_or_else(|e| {
            panic!(
                "connect through XDP with tx offload on: {e}; bad_checksum drops: {}\n{}",
                daemon.drops("bad_checksum"),
                daemon.log()
            )
        });
    assert_eq!(client.server, "b0");
    client
        .echo(&payload(4 << 20, 6))
        .expect("4 MiB echoed byte-exact both ways");
    drop(client);
    let partial = daemon
        .counter("partial_checksums")
        .expect("a counter of this build");
    assert!(
        partial > 0,
        "no partial checksum met: the test tests nothing"
    );
    for reason in gateway_common::DropReason::ALL {
        assert_eq!(
            daemon.drops(reason.label()),
            0.0,
            "{} drops",
            reason.label()
        );
    }
    eprintln!(
        "partial checksums completed: {partial}; translated {} in, {} out; XDP saw {}, TC {}",
        daemon.counter("forwarded").unwrap_or(0),
        daemon.counter("reversed").unwrap_or(0),
        daemon.counter("xdp_packets").unwrap_or(0),
        daemon.counter("tc_packets").unwrap_or(0)
    );
    let named = wait_for(Duration::from_secs(10), || {
        let log = daemon.log();
        partial_warnings(&log, "client0") > 0 && partial_warnings(&log, "b0") > 0
    });
    let log = daemon.log();
    assert!(named.is_some(), "no warning naming client0 and b0:\n{log}");
    for iface in ["client0", "b0"] {
        assert_eq!(
            partial_warnings(&log, iface),
            1,
            "once per interface:\n{log}"
        );
    }
    assert!(
        log.contains("ethtool -K") && log.contains("--attach tc"),
        "the warning says the fix:\n{log}"
    );
}
