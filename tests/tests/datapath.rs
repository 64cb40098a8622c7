//! The datapath as a table of BPF_PROG_TEST_RUN cases, for each attach mode. Each row: a name,
//! the input frame, the expected verdict, the expected output (addresses, ports, MACs, with
//! checksums verified from scratch), the expected drop reason and conntrack change. Rows that
//! follow a connection (SYN, SYN-ACK, ACK, data, FIN, RST) run in order; each forward row has
//! its reply row.

use std::net::{Ipv4Addr, SocketAddrV4};

use gateway::datapath::{AttachMode, Datapath};
use gateway_common::{
    DropReason, GlobalStat,
    maps::{
        CT_ESTABLISHED, CT_FIN_FORWARD, CT_FIN_REVERSE, CT_RST, CT_SYN_ACK_SEEN, CT_SYN_SEEN,
        DIR_FORWARD, DIR_REVERSE, FlowKey4,
    },
};
use gateway_tests::{
    datapath::{APP, BACKEND_PORT, Fixture, SNAT_PORTS, Verdict},
    netns::Topology,
    packet::{Frame, Parsed, flags, parse_checked},
    require_root,
};

const GW_CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

fn gw_backend_mac(i: usize) -> [u8; 6] {
    [0x02, 0, 0, 0, 0x10 + i as u8, 0x01]
}
fn backend_mac(i: usize) -> [u8; 6] {
    [0x02, 0, 0, 0, 0x10 + i as u8, 0x02]
}
fn backend_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, 4 * i as u8 + 2)
}
fn backend_index(ip: Ipv4Addr) -> usize {
    (ip.octets()[3] as usize - 2) / 4
}
fn client(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Topology::CLIENT_IP, port)
}

/// What the output frame must be.
enum Out {
    /// Identical to the input.
    Same,
    /// Translated: source (None: the SNAT address with a port of the range), destination and
    /// MACs (source, destination).
    Nat {
        src: Option<SocketAddrV4>,
        dst: SocketAddrV4,
        macs: ([u8; 6], [u8; 6]),
    },
    /// Not checked (drops).
    Any,
}

struct Row {
    name: String,
    frame: Vec<u8>,
    verdict: Verdict,
    out: Out,
    drop: Option<DropReason>,
    /// Conntrack entries added by this packet (negative: removed).
    entries: i64,
}

struct Table {
    fx: Fixture,
    rows: usize,
}

impl Table {
    /// Runs one row and checks everything it says; returns the parsed output of a translation.
    #[track_caller]
    fn row(&mut self, row: Row) -> Option<Parsed> {
        let name = format!("[{}] {}", self.fx.mode, row.name);
        let before = self.fx.dp.global_stats().unwrap();
        let entries_before = self.fx.dp.flows().unwrap().len() as i64;
        let (verdict, out) = self.fx.run(&row.frame);
        assert_eq!(verdict, row.verdict, "{name}: verdict");
        let after = self.fx.dp.global_stats().unwrap();
        for reason in DropReason::ALL {
            let d = after.drops(*reason) - before.drops(*reason);
            let want = u64::from(row.drop == Some(*reason));
            assert_eq!(d, want, "{name}: drops for {}", reason.label());
        }
        let entries = self.fx.dp.flows().unwrap().len() as i64 - entries_before;
        assert_eq!(entries, row.entries, "{name}: conntrack entries added");
        self.rows += 1;
        match row.out {
            Out::Any => None,
            Out::Same => {
                assert_eq!(out, row.frame, "{name}: the frame must pass unchanged");
                None
            }
            Out::Nat { src, dst, macs } => {
                let p = parse_checked(&out);
                let input = parse_checked(&row.frame);
                match src {
                    Some(src) => assert_eq!(p.src, src, "{name}: source"),
                    None => {
                        assert_eq!(*p.src.ip(), Topology::SNAT_IP, "{name}: SNAT address");
                        assert!(SNAT_PORTS.contains(&p.src.port()), "{name}: SNAT port");
                    }
                }
                assert_eq!(p.dst, dst, "{name}: destination");
                assert_eq!((p.src_mac, p.dst_mac), macs, "{name}: MACs");
                assert_eq!(p.payload, input.payload, "{name}: payload");
                assert_eq!(p.tcp_flags, input.tcp_flags, "{name}: flags");
                Some(p)
            }
        }
    }

    fn stat(&self, s: GlobalStat) -> u64 {
        self.fx.dp.global_stats().unwrap().get(s)
    }

    fn state_of(&self, key: FlowKey4) -> u8 {
        self.fx.dp.flow(&key).unwrap().expect("entry exists").state
    }
}

fn from_client(src: SocketAddrV4, dst: SocketAddrV4, f: u8) -> Frame {
    Frame::tcp(src, dst, f).macs(CLIENT_MAC, GW_CLIENT_MAC)
}

fn from_backend(i: usize, src: SocketAddrV4, dst: SocketAddrV4, f: u8) -> Frame {
    Frame::tcp(src, dst, f).macs(backend_mac(i), gw_backend_mac(i))
}

fn nat_to_backend(i: usize, dst_port: u16) -> Out {
    Out::Nat {
        src: None,
        dst: SocketAddrV4::new(backend_ip(i), dst_port),
        macs: (gw_backend_mac(i), backend_mac(i)),
    }
}

fn translated(name: &str, frame: Vec<u8>, out: Out, entries: i64) -> Row {
    Row {
        name: name.into(),
        frame,
        verdict: Verdict::Redirect,
        out,
        drop: None,
        entries,
    }
}

fn passed(name: &str, frame: Vec<u8>) -> Row {
    Row {
        name: name.into(),
        frame,
        verdict: Verdict::Pass,
        out: Out::Same,
        drop: None,
        entries: 0,
    }
}

fn dropped(name: &str, frame: Vec<u8>, reason: DropReason) -> Row {
    Row {
        name: name.into(),
        frame,
        verdict: Verdict::Drop,
        out: Out::Any,
        drop: Some(reason),
        entries: 0,
    }
}

/// A whole connection: SYN, SYN-ACK, ACK, data both ways, FIN both ways. Returns the client
/// tuple, backend index and SNAT port.
fn connection(t: &mut Table, cport: u16) -> (SocketAddrV4, usize, u16) {
    let svc = Fixture::service();
    let c = client(cport);
    let expected = t.fx.expected_backend(c, svc);
    let bi = backend_index(*expected.addr.ip());
    let fib_before = t.stat(GlobalStat::FibLookups);
    let out = t
        .row(translated(
            &format!("SYN from :{cport} creates both entries, goes to the Maglev backend"),
            from_client(c, svc, flags::SYN).build(),
            nat_to_backend(bi, BACKEND_PORT),
            2,
        ))
        .unwrap();
    let snat = out.src;
    let fwd = FlowKey4::from_addrs(c, svc);
    let rev = FlowKey4::from_addrs(expected.addr, snat);
    let f = t.fx.dp.flow(&fwd).unwrap().expect("forward entry");
    assert_eq!(
        (f.direction, f.backend_id, f.app_id),
        (DIR_FORWARD, expected.id, APP)
    );
    assert_eq!(
        t.fx.dp
            .flow(&rev)
            .unwrap()
            .expect("reverse entry")
            .direction,
        DIR_REVERSE
    );
    assert_eq!(t.state_of(fwd), CT_SYN_SEEN);
    // Through the FIB, or the next-hop cache of an earlier flow to that backend (see
    // `new_flows_share_a_next_hop_until_it_ages_out`).
    assert!(f.nexthop_ns != 0, "the SYN resolves its next hop");
    assert!(t.stat(GlobalStat::FibLookups) <= fib_before + 1);

    t.row(translated(
        "SYN-ACK from the backend is reverse-translated",
        from_backend(bi, expected.addr, snat, flags::SYN | flags::ACK).build(),
        Out::Nat {
            src: Some(svc),
            dst: c,
            macs: (GW_CLIENT_MAC, CLIENT_MAC),
        },
        0,
    ));
    assert_eq!(
        t.state_of(fwd) & CT_SYN_ACK_SEEN,
        CT_SYN_ACK_SEEN,
        "forward entry knows the SYN-ACK"
    );
    let fib_before = t.stat(GlobalStat::FibLookups);
    t.row(translated(
        "ACK completes the handshake",
        from_client(c, svc, flags::ACK).build(),
        Out::Nat {
            src: Some(snat),
            dst: expected.addr,
            macs: (gw_backend_mac(bi), backend_mac(bi)),
        },
        0,
    ));
    assert_eq!(
        t.stat(GlobalStat::FibLookups),
        fib_before,
        "an established packet uses the cached next hop"
    );
    assert_eq!(t.state_of(rev) & CT_ESTABLISHED, CT_ESTABLISHED);
    t.row(translated(
        "established data client → backend",
        from_client(c, svc, flags::ACK | flags::PSH)
            .payload(b"hello, backend: odd length!")
            .build(),
        Out::Nat {
            src: Some(snat),
            dst: expected.addr,
            macs: (gw_backend_mac(bi), backend_mac(bi)),
        },
        0,
    ));
    t.row(translated(
        "established data backend → client",
        from_backend(bi, expected.addr, snat, flags::ACK | flags::PSH)
            .payload(&[0xff; 1400])
            .build(),
        Out::Nat {
            src: Some(svc),
            dst: c,
            macs: (GW_CLIENT_MAC, CLIENT_MAC),
        },
        0,
    ));
    (c, bi, snat.port())
}

fn table(mode: AttachMode) {
    require_root();
    let topo = Topology::new(3);
    topo.gateway.run(move || {
        let backend_ips: Vec<Ipv4Addr> = (0..3).map(backend_ip).collect();
        let mut t = Table {
            fx: Fixture::new(mode, &backend_ips, 1 << 16),
            rows: 0,
        };
        let svc = Fixture::service();

        // A connection, then its FINs.
        let (c, bi, snat_port) = connection(&mut t, 40_001);
        let backend = SocketAddrV4::new(backend_ip(bi), BACKEND_PORT);
        let snat = SocketAddrV4::new(Topology::SNAT_IP, snat_port);
        t.row(translated(
            "FIN from the client",
            from_client(c, svc, flags::FIN | flags::ACK).build(),
            nat_to_backend(bi, BACKEND_PORT),
            0,
        ));
        assert_eq!(
            t.state_of(FlowKey4::from_addrs(backend, snat)) & CT_FIN_FORWARD,
            CT_FIN_FORWARD
        );
        t.row(translated(
            "FIN from the backend",
            from_backend(bi, backend, snat, flags::FIN | flags::ACK).build(),
            Out::Nat {
                src: Some(svc),
                dst: c,
                macs: (GW_CLIENT_MAC, CLIENT_MAC),
            },
            0,
        ));
        assert_eq!(
            t.state_of(FlowKey4::from_addrs(c, svc)) & CT_FIN_REVERSE,
            CT_FIN_REVERSE
        );
        t.row(translated(
            "a new SYN on a closed tuple starts a new flow",
            from_client(c, svc, flags::SYN).build(),
            Out::Nat {
                src: None,
                dst: backend,
                macs: (gw_backend_mac(bi), backend_mac(bi)),
            },
            0, // the old pair is replaced by a new one
        ));
        assert_eq!(
            t.state_of(FlowKey4::from_addrs(c, svc)),
            CT_SYN_SEEN,
            "fresh state"
        );

        // RST.
        let (c2, bi2, snat_port2) = connection(&mut t, 40_002);
        let backend2 = SocketAddrV4::new(backend_ip(bi2), BACKEND_PORT);
        t.row(translated(
            "RST from the backend is translated and closes both entries",
            from_backend(
                bi2,
                backend2,
                SocketAddrV4::new(Topology::SNAT_IP, snat_port2),
                flags::RST,
            )
            .build(),
            Out::Nat {
                src: Some(svc),
                dst: c2,
                macs: (GW_CLIENT_MAC, CLIENT_MAC),
            },
            0,
        ));
        assert_eq!(t.state_of(FlowKey4::from_addrs(c2, svc)) & CT_RST, CT_RST);

        // Maglev: the datapath's choice is userspace's, over many tuples.
        for port in 41_000..41_024 {
            let c = client(port);
            let b = t.fx.expected_backend(c, svc);
            t.row(translated(
                &format!("Maglev choice for :{port} matches userspace's table"),
                from_client(c, svc, flags::SYN).build(),
                nat_to_backend(backend_index(*b.addr.ip()), BACKEND_PORT),
                2,
            ));
        }

        // Packets that are not for a flow of ours.
        t.row(dropped(
            "a non-SYN for a service without a flow",
            from_client(client(42_000), svc, flags::ACK).build(),
            DropReason::NoFlow,
        ));
        t.row(dropped(
            "a SYN-ACK for a service without a flow",
            from_client(client(42_001), svc, flags::SYN | flags::ACK).build(),
            DropReason::NoFlow,
        ));
        t.row(dropped(
            "a reply to a SNAT port without a flow",
            from_backend(
                0,
                SocketAddrV4::new(backend_ip(0), BACKEND_PORT),
                SocketAddrV4::new(Topology::SNAT_IP, 45_000),
                flags::ACK,
            )
            .build(),
            DropReason::NoReplyFlow,
        ));
        t.row(passed(
            "the SNAT address outside the SNAT port range goes to the kernel",
            from_backend(
                0,
                SocketAddrV4::new(backend_ip(0), BACKEND_PORT),
                SocketAddrV4::new(Topology::SNAT_IP, 22),
                flags::SYN,
            )
            .build(),
        ));
        t.row(passed(
            "an unknown port of the public address goes to the kernel",
            from_client(
                client(42_002),
                SocketAddrV4::new(Topology::PUBLIC_IP, 22),
                flags::SYN,
            )
            .build(),
        ));
        t.row(passed(
            "another destination address goes to the kernel",
            from_client(
                client(42_003),
                SocketAddrV4::new(backend_ip(1), 8080),
                flags::SYN,
            )
            .build(),
        ));
        let mut udp = from_client(client(42_004), svc, 0);
        udp.proto = 17;
        udp.payload = vec![0, 0, 0, 0, 0, 8, 0, 0];
        t.row(passed(
            "UDP to a service address and port goes to the kernel",
            udp.build(),
        ));
        let mut icmp = from_client(client(0), SocketAddrV4::new(Topology::PUBLIC_IP, 0), 0);
        icmp.proto = 1;
        icmp.payload = vec![8, 0, 0xf7, 0xff, 0, 0, 0, 0];
        t.row(passed(
            "ICMP echo to the public address goes to the kernel",
            icmp.build(),
        ));
        let mut arp = from_client(client(1), svc, 0).build();
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        t.row(passed("a non-IPv4 frame goes to the kernel", arp));

        // IPv4 options: the TCP header is found through ihl and left intact.
        let mut opts = from_client(client(42_005), svc, flags::SYN);
        opts.ip_options = vec![0x94, 0x04, 0, 0, 1, 1, 1, 0]; // router alert, NOPs, EOL
        let b = t.fx.expected_backend(client(42_005), svc);
        t.row(translated(
            "a SYN with IPv4 options",
            opts.build(),
            nat_to_backend(backend_index(*b.addr.ip()), BACKEND_PORT),
            2,
        ));
        let mut bad = from_client(client(42_006), svc, flags::SYN).build();
        bad[14] = 0x44; // ihl 4
        t.row(dropped(
            "an IPv4 header with ihl < 5",
            bad,
            DropReason::BadHeader,
        ));

        // Fragments.
        let mut frag = from_client(client(42_007), svc, flags::SYN);
        frag.frag = 0x2000; // more fragments
        t.row(dropped(
            "a first fragment to a service",
            frag.build(),
            DropReason::Fragment,
        ));
        let mut frag = from_client(client(42_008), svc, flags::ACK);
        frag.frag = 0x0010; // offset 128
        t.row(dropped(
            "a later fragment to a service",
            frag.build(),
            DropReason::Fragment,
        ));
        let mut frag = from_client(client(42_009), SocketAddrV4::new(backend_ip(0), 80), 0);
        frag.frag = 0x2000;
        t.row(passed(
            "a fragment to another address goes to the kernel",
            frag.build(),
        ));

        // Every truncation point of the Ethernet, IPv4 (with options) and TCP headers.
        let mut full = from_client(client(42_010), svc, flags::SYN);
        full.ip_options = vec![1, 1, 1, 1];
        let full = full.build();
        let headers = 14 + 24 + 20;
        // The kernel's test_run refuses shorter frames: XDP's under an Ethernet header (drivers
        // drop such runts), TC's (skb) under a whole IPv4 header. The parser is the same code
        // in both modes, so XDP's rows cover the IPv4 cuts for both.
        let first = if mode == AttachMode::Tc { 14 + 20 } else { 14 };
        for cut in first..headers {
            t.row(dropped(
                &format!("a frame cut at {cut} bytes (in the IPv4/TCP headers)"),
                full[..cut].to_vec(),
                DropReason::Truncated,
            ));
        }

        // Hairpin: a backend connects to the public endpoint (its own app).
        let hp = SocketAddrV4::new(backend_ip(0), 50_000);
        let b = t.fx.expected_backend(hp, svc);
        let bi = backend_index(*b.addr.ip());
        let mut f = Frame::tcp(hp, svc, flags::SYN).macs(backend_mac(0), gw_backend_mac(0));
        f.seq = 7;
        let out = t
            .row(translated(
                "hairpin SYN from backend 0",
                f.build(),
                nat_to_backend(bi, BACKEND_PORT),
                2,
            ))
            .unwrap();
        t.row(translated(
            "hairpin SYN-ACK goes back to backend 0",
            from_backend(bi, b.addr, out.src, flags::SYN | flags::ACK).build(),
            Out::Nat {
                src: Some(svc),
                dst: hp,
                macs: (gw_backend_mac(0), backend_mac(0)),
            },
            0,
        ));

        // A backend that stopped accepting is never chosen for a new flow.
        let c = client(43_000);
        let first_choice = t.fx.expected_backend(c, svc);
        t.fx.dp
            .set_backend(first_choice.id, first_choice.addr, false)
            .unwrap();
        t.row(translated(
            "a SYN whose Maglev slot holds a draining backend",
            from_client(c, svc, flags::SYN).build(),
            Out::Any,
            2,
        ));
        let f =
            t.fx.dp
                .flow(&FlowKey4::from_addrs(c, svc))
                .unwrap()
                .unwrap();
        assert_ne!(
            f.backend_id, first_choice.id,
            "the draining backend was chosen"
        );
        // Its existing flows keep going: one of the flows the Maglev rows made goes to it.
        let (drain_c, drain_bi) = (41_000..41_024)
            .map(client)
            .find_map(|c| {
                let b = t.fx.flow_backend(c, svc)?;
                (b.id == first_choice.id).then(|| (c, backend_index(*b.addr.ip())))
            })
            .expect("a flow of the draining backend");
        t.row(translated(
            "an existing flow of the draining backend still flows",
            from_client(drain_c, svc, flags::ACK).build(),
            nat_to_backend(drain_bi, BACKEND_PORT),
            0,
        ));
        for b in t.fx.backends.clone() {
            t.fx.dp.set_backend(b.id, b.addr, false).unwrap();
        }
        t.row(dropped(
            "a SYN when no backend accepts",
            from_client(client(43_001), svc, flags::SYN).build(),
            DropReason::NoBackend,
        ));
        for b in t.fx.backends.clone() {
            t.fx.dp.set_backend(b.id, b.addr, true).unwrap();
        }
        t.fx.dp.set_app_backends(2, &[]).unwrap();
        t.fx.dp
            .set_service(SocketAddrV4::new(Topology::PUBLIC_IP, 20_002), 2)
            .unwrap();
        t.row(dropped(
            "a SYN for an app with an empty backend set",
            from_client(
                client(43_002),
                SocketAddrV4::new(Topology::PUBLIC_IP, 20_002),
                flags::SYN,
            )
            .build(),
            DropReason::NoBackend,
        ));

        // SNAT port exhaustion: a one-port range toward a one-backend app.
        let one = t.fx.backends[0];
        t.fx.dp.set_app_backends(3, &[one]).unwrap();
        let svc3 = SocketAddrV4::new(Topology::PUBLIC_IP, 20_003);
        t.fx.dp.set_service(svc3, 3).unwrap();
        t.fx.dp
            .configure(
                Topology::SNAT_IP,
                39_000..=39_000,
                std::time::Duration::from_secs(60),
            )
            .unwrap();
        t.row(translated(
            "the only SNAT port is taken by a first flow",
            from_client(client(44_000), svc3, flags::SYN).build(),
            Out::Nat {
                src: Some(SocketAddrV4::new(Topology::SNAT_IP, 39_000)),
                dst: one.addr,
                macs: (gw_backend_mac(0), backend_mac(0)),
            },
            2,
        ));
        let collisions = t.stat(GlobalStat::SnatCollisions);
        t.row(dropped(
            "a second flow finds no SNAT port",
            from_client(client(44_001), svc3, flags::SYN).build(),
            DropReason::SnatExhausted,
        ));
        assert_eq!(
            t.stat(GlobalStat::SnatCollisions),
            collisions + 32,
            "bounded probes"
        );
        // The first flow closes (RST): its port is taken over only once it has been idle 2 s.
        let first = FlowKey4::from_addrs(client(44_000), svc3);
        let close = |t: &mut Table, idle_ns: u64| {
            let f = t.fx.dp.flow(&first).unwrap().expect("the first flow");
            let last_seen_ns = gateway::datapath::monotonic_ns() - idle_ns;
            for (k, dir) in [(first, DIR_FORWARD), (f.peer_key(), DIR_REVERSE)] {
                let e = t.fx.dp.flow(&k).unwrap().expect("both entries");
                assert_eq!(e.direction, dir);
                let e = gateway_common::maps::Flow {
                    state: e.state | CT_RST,
                    last_seen_ns,
                    ..e
                };
                t.fx.dp.insert_flow(k, e).unwrap();
            }
        };
        close(&mut t, 0);
        t.row(dropped(
            "a port closed a moment ago is not taken over",
            from_client(client(44_001), svc3, flags::SYN).build(),
            DropReason::SnatExhausted,
        ));
        close(&mut t, 1_500_000_000);
        let reused = t.stat(GlobalStat::SnatReused);
        t.row(translated(
            "a port closed and idle 1 s is taken over by a new flow",
            from_client(client(44_001), svc3, flags::SYN).build(),
            Out::Nat {
                src: Some(SocketAddrV4::new(Topology::SNAT_IP, 39_000)),
                dst: one.addr,
                macs: (gw_backend_mac(0), backend_mac(0)),
            },
            0,
        ));
        assert_eq!(t.stat(GlobalStat::SnatReused), reused + 1);
        assert!(
            t.fx.dp.flow(&first).unwrap().is_none(),
            "the closed flow's forward entry went with its port"
        );
        t.fx.dp
            .configure(
                Topology::SNAT_IP,
                SNAT_PORTS,
                std::time::Duration::from_secs(60),
            )
            .unwrap();

        // Per-app and per-backend counters saw the traffic.
        let app = t.fx.dp.app_stats(APP).unwrap();
        assert!(
            app.new_flows >= 28 && app.packets_in > 0 && app.packets_out > 0,
            "{app:?}"
        );

        // Not configured: no SNAT address, no new flow.
        let mut bare = Datapath::load().unwrap();
        bare.set_service(svc, APP).unwrap();
        let mut fx = Fixture {
            dp: bare,
            mode,
            backends: t.fx.backends.clone(),
        };
        let (v, _) = fx.run(&from_client(client(45_000), svc, flags::SYN).build());
        assert_eq!(v, Verdict::Drop);
        assert_eq!(
            fx.dp
                .global_stats()
                .unwrap()
                .drops(DropReason::NotConfigured),
            1
        );
        t.rows += 1;

        assert!(t.rows >= 25, "only {} rows", t.rows);
        eprintln!("[{mode}] {} rows passed", t.rows);
    });
    drop(topo);
}

#[test]
fn xdp_table() {
    table(AttachMode::Xdp);
}

#[test]
fn tc_table() {
    table(AttachMode::Tc);
}

#[test]
fn every_map_of_the_object_is_named_in_gateway_common() {
    require_root();
    // Loading takes every map by its gateway-common name: a missing or renamed map fails here.
    let dp = Datapath::load().expect("every map of gateway_common::maps exists in the object");
    drop(dp);
}

#[test]
fn the_batched_walk_sees_every_entry_once_across_batches() {
    use gateway_common::maps::Flow;
    require_root();
    let mut dp = Datapath::load_with(&gateway::datapath::LoadOptions {
        conntrack_capacity: 32_768,
        ..Default::default()
    })
    .unwrap();
    // More entries than one batch call returns (4096), so the walk has to go on from the
    // position the kernel handed back.
    const N: u32 = 10_000;
    for i in 0..N {
        let c = SocketAddrV4::new(Ipv4Addr::from(0x0a00_0000 + i), 40_000);
        dp.insert_flow(FlowKey4::from_addrs(c, Fixture::service()), Flow::default())
            .unwrap();
    }
    let mut seen = std::collections::HashSet::new();
    let mut calls = 0;
    dp.conntrack()
        .walk(|k, _| {
            calls += 1;
            seen.insert(*k);
        })
        .unwrap();
    assert_eq!((calls, seen.len()), (N as usize, N as usize));
}

#[test]
fn scan_reclaims_closed_and_idle_pairs_and_counts_live_ones() {
    use gateway::datapath::{Timeouts, monotonic_ns};
    use gateway_common::maps::Flow;
    require_root();
    let mut dp = Datapath::load_with(&gateway::datapath::LoadOptions {
        conntrack_capacity: 1024,
        ..Default::default()
    })
    .unwrap();
    let sec = 1_000_000_000u64;
    // A "now" far enough from boot for every idle time below.
    let now = monotonic_ns() + 10_000 * sec;
    // (client port, state, idle seconds, expected to survive)
    let cases = [
        (1, CT_SYN_SEEN | CT_SYN_ACK_SEEN | CT_ESTABLISHED, 60, true),
        (
            2,
            CT_SYN_SEEN | CT_SYN_ACK_SEEN | CT_ESTABLISHED,
            1000,
            false,
        ),
        (3, CT_SYN_SEEN | CT_RST, 11, false),
        (4, CT_SYN_SEEN | CT_FIN_FORWARD | CT_FIN_REVERSE, 11, false),
        (5, CT_SYN_SEEN | CT_FIN_FORWARD, 11, true),
        (6, CT_SYN_SEEN, 31, false),
        (7, CT_SYN_SEEN, 5, true),
    ];
    let svc = Fixture::service();
    let backend = SocketAddrV4::new(backend_ip(0), BACKEND_PORT);
    for (p, state, idle, _) in cases {
        let c = client(p);
        let snat = SocketAddrV4::new(Topology::SNAT_IP, 40_000 + p);
        let fwd = FlowKey4::from_addrs(c, svc);
        let rev = FlowKey4::from_addrs(backend, snat);
        let base = Flow {
            state,
            last_seen_ns: now - idle * sec,
            ..Flow::default()
        };
        let to = |k: FlowKey4, dir| Flow {
            nat_src_ip: k.dst_ip,
            nat_dst_ip: k.src_ip,
            nat_src_port: k.dst_port,
            nat_dst_port: k.src_port,
            direction: dir,
            ..base
        };
        // Each entry rewrites to the reverse of the other's key.
        dp.insert_flow(fwd, to(rev, DIR_FORWARD)).unwrap();
        dp.insert_flow(rev, to(fwd, DIR_REVERSE)).unwrap();
    }
    let scan = dp.scan(now, &Timeouts::default()).unwrap();
    assert_eq!(scan.removed, 8, "4 pairs reclaimed");
    // What is left: 3 pairs, all open (a FIN one way is not closed yet), all of app 0.
    assert_eq!(scan.counts.entries, 6);
    assert_eq!(scan.counts.apps.get(&0), Some(&3));
    for (p, _, _, survives) in cases {
        let fwd = FlowKey4::from_addrs(client(p), svc);
        let rev = FlowKey4::from_addrs(backend, SocketAddrV4::new(Topology::SNAT_IP, 40_000 + p));
        for k in [fwd, rev] {
            assert_eq!(dp.flow(&k).unwrap().is_some(), survives, "client port {p}");
        }
    }
}

/// The datapath's clock (cached per CPU and tick) is CLOCK_MONOTONIC_COARSE, the one userspace
/// expires flows by: a flow's creation time lies within a tick of what userspace read around
/// its SYN, and it moves on between two SYNs 50 ms apart (a cache that never refreshed fails).
#[test]
fn flows_are_timed_by_the_coarse_monotonic_clock_across_ticks() {
    use gateway::datapath::monotonic_ns;
    require_root();
    let topo = Topology::new(1);
    topo.gateway.run(|| {
        let mut fx = Fixture::new(AttachMode::Xdp, &[backend_ip(0)], 1 << 12);
        // A tick is at most 10 ms (HZ >= 100).
        const TICK: u64 = 10_000_000;
        let mut created = Vec::new();
        for (i, mode) in [AttachMode::Xdp, AttachMode::Tc, AttachMode::Xdp]
            .into_iter()
            .enumerate()
        {
            fx.mode = mode;
            let c = client(41_000 + i as u16);
            let before = monotonic_ns();
            let (verdict, _) = fx.run(&from_client(c, Fixture::service(), flags::SYN).build());
            let after = monotonic_ns();
            assert_eq!(verdict, Verdict::Redirect, "{mode}");
            let flow = fx
                .dp
                .flow(&FlowKey4::from_addrs(c, Fixture::service()))
                .unwrap()
                .expect("the SYN made a flow");
            assert!(
                before.saturating_sub(TICK) <= flow.created_ns && flow.created_ns <= after + TICK,
                "{mode}: created at {} outside [{before}, {after}] ± a tick",
                flow.created_ns
            );
            created.push(flow.created_ns);
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        for pair in created.windows(2) {
            assert!(
                pair[1] >= pair[0] + 40_000_000,
                "the clock moved on: {created:?}"
            );
        }
    });
}

/// New flows to one backend share its FIB answer (a per-CPU cache, so the test keeps to one
/// CPU) for as long as a flow keeps its own: the next-hop age. After that, the FIB again.
#[test]
fn new_flows_share_a_next_hop_until_it_ages_out() {
    require_root();
    let topo = Topology::new(1);
    topo.gateway.run(|| {
        // SAFETY: a zeroed cpu_set_t with CPU 0 set, for this thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(0, &mut set);
            assert_eq!(
                libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
                0
            );
        }
        const AGE: std::time::Duration = std::time::Duration::from_millis(300);
        for mode in AttachMode::ALL {
            let mut fx = Fixture::new(mode, &[backend_ip(0)], 1 << 12);
            fx.dp
                .configure(Topology::SNAT_IP, SNAT_PORTS, AGE)
                .expect("configure");
            let fib = |fx: &Fixture| fx.dp.global_stats().unwrap().get(GlobalStat::FibLookups);
            let syn = |fx: &mut Fixture, port: u16| {
                let c = client(port);
                let (verdict, out) =
                    fx.run(&from_client(c, Fixture::service(), flags::SYN).build());
                assert_eq!(verdict, Verdict::Redirect, "{mode}");
                assert_eq!(
                    parse_checked(&out).dst_mac,
                    backend_mac(0),
                    "{mode}: the backend's MAC"
                );
                fx.dp
                    .flow(&FlowKey4::from_addrs(c, Fixture::service()))
                    .unwrap()
                    .unwrap()
                    .nexthop_ns
            };
            let before = fib(&fx);
            let first = syn(&mut fx, 42_001);
            assert_eq!(fib(&fx), before + 1, "{mode}: the first flow asks the FIB");
            let second = syn(&mut fx, 42_002);
            assert_eq!(
                fib(&fx),
                before + 1,
                "{mode}: the second takes the cached hop"
            );
            assert_eq!(second, first, "{mode}: as old as the answer it took");
            std::thread::sleep(AGE + std::time::Duration::from_millis(50));
            let third = syn(&mut fx, 42_003);
            assert_eq!(
                fib(&fx),
                before + 2,
                "{mode}: an aged answer is asked again"
            );
            assert!(third > first, "{mode}");
        }
    });
}
