//! The datapath through BPF_PROG_TEST_RUN, in both attach modes.
//!
//! Most of it is scenarios: tables of rows played by one runner (`gateway_tests::scenario`,
//! whose doc says what a row holds). Each scenario runs on a topology and fixture of its own,
//! once per mode, as its own test `<scenario>::xdp` / `<scenario>::tc`; a failing test lists
//! every failed row, named by scenario, mode and row. Run one scenario alone through the test
//! name filter:
//!
//! ```sh
//! cargo test -p gateway-tests --test datapath -- hairpin              # both modes
//! cargo test -p gateway-tests --test datapath -- --exact hairpin::tc   # one mode
//! ```
//!
//! Rows that follow a connection (SYN, SYN-ACK, ACK, data, FIN, RST) run in order, and each
//! forward row has its reply row. SNAT exhaustion and next-hop ageing are scenarios too: their
//! steps between rows (a one-port SNAT range, a closed flow aged, a wait past the next-hop age)
//! read as set-up steps, their counters as row counter deltas. Four tests stay plain functions,
//! where a table of packets would not read better: the object's map names (a load), the
//! batched conntrack walk and the expiry scan (conntrack entries in, no packet), and the clock
//! test, which runs XDP, TC and XDP again on one fixture (one clock across programs).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use gateway::datapath::{AttachMode, Datapath};
use gateway_common::{
    DropReason, GlobalStat,
    maps::{
        CT_BACKEND_CLOSED_FIRST, CT_ESTABLISHED, CT_FIN_FORWARD, CT_FIN_REVERSE, CT_RST,
        CT_SYN_ACK_SEEN, CT_SYN_SEEN, DIR_FORWARD, DIR_REVERSE, FlowKey4,
    },
};
use gateway_tests::{
    datapath::{APP, BACKEND_PORT, Fixture, SNAT_PORTS, Verdict, pin_to_cpu_0},
    netns::Topology,
    packet::{Frame, flags},
    require_root,
    scenario::{
        Conn, Ctx, Input, Link, Out, Row, Scenario, backend, backend_ip, client, from_backend,
        from_client,
    },
    scenario_tests,
};

scenario_tests! {
    connection_closed_by_fins,
    connection_closed_by_rst,
    maglev_matches_userspace,
    packets_without_a_flow,
    packets_for_the_kernel,
    ipv4_header_length,
    fragments,
    truncated_headers,
    hairpin,
    draining_backend,
    no_backend_accepts,
    snat_exhaustion,
    not_configured,
    next_hop_ageing,
}

/// A whole connection up to its data: SYN, SYN-ACK, ACK, data both ways.
fn connection(c: Conn) -> Vec<Row> {
    let port = c.client.port();
    vec![
        Row::redirected(
            format!("SYN from :{port} creates both entries, goes to the Maglev backend"),
            c.syn(),
            c.to_maglev_backend(),
        )
        .entries(2)
        // Through the FIB, or the next-hop cache of an earlier flow to that backend (see
        // `next_hop_ageing`).
        .counter(GlobalStat::FibLookups, 0..=1)
        .check("the forward entry: app 1, its Maglev backend", move |cx| {
            let f = cx.flow(c.key());
            assert_eq!(
                (f.direction, f.backend_id, f.app_id),
                (DIR_FORWARD, cx.maglev(c).id, APP)
            );
        })
        // Later rows of the flow read its SNAT address and backend from the forward entry.
        .check("the forward entry rewrites as the SYN was", move |cx| {
            let (r, out) = (c.rewrite(cx), cx.parsed());
            assert_eq!((r.snat, r.backend), (out.src, out.dst));
        })
        .check(
            "the reverse entry: backend → the output's source",
            move |cx| {
                let rev = FlowKey4::from_addrs(cx.maglev(c).addr, cx.parsed().src);
                assert_eq!(cx.flow(rev).direction, DIR_REVERSE);
            },
        )
        .check("state: SYN", move |cx| {
            assert_eq!(cx.state(c.key()), CT_SYN_SEEN)
        })
        .check("the SYN resolves its next hop", move |cx| {
            assert!(cx.flow(c.key()).nexthop_ns != 0);
        }),
        Row::redirected(
            "SYN-ACK from the backend is reverse-translated",
            c.reply(flags::SYN | flags::ACK),
            c.to_client(),
        )
        .check("forward entry knows the SYN-ACK", move |cx| {
            assert_eq!(cx.state(c.key()) & CT_SYN_ACK_SEEN, CT_SYN_ACK_SEEN);
        }),
        Row::redirected(
            "ACK completes the handshake",
            c.send(flags::ACK),
            c.to_its_backend(),
        )
        // An established packet uses the cached next hop.
        .counter(GlobalStat::FibLookups, 0..=0)
        .check("reverse entry established", move |cx| {
            let state = cx.state(c.reverse_key(cx));
            assert_eq!(state & CT_ESTABLISHED, CT_ESTABLISHED);
        }),
        Row::redirected(
            "established data client → backend",
            c.send(flags::ACK | flags::PSH)
                .map(|f| f.payload(b"hello, backend: odd length!")),
            c.to_its_backend(),
        ),
        Row::redirected(
            "established data backend → client",
            c.reply(flags::ACK | flags::PSH)
                .map(|f| f.payload(&[0xff; 1400])),
            c.to_client(),
        ),
    ]
}

/// App 1's counters: at least `new_flows` new flows, and packets both ways if `both_ways`.
fn app_counters(new_flows: u64, both_ways: bool) -> impl FnOnce(&Ctx) + Send {
    move |cx| {
        let app = cx.fx.dp.app_stats(APP).unwrap();
        assert!(
            app.new_flows >= new_flows && app.packets_in > 0 && (!both_ways || app.packets_out > 0),
            "{app:?}"
        );
    }
}

fn connection_closed_by_fins() -> Scenario {
    let c = Conn::new(40_001);
    Scenario::new()
        .rows(connection(c))
        .row(
            Row::redirected(
                "FIN from the client",
                c.send(flags::FIN | flags::ACK),
                c.to_its_backend(),
            )
            .check("reverse entry knows the client's FIN", move |cx| {
                let state = cx.state(c.reverse_key(cx));
                assert_eq!(state & CT_FIN_FORWARD, CT_FIN_FORWARD);
            }),
        )
        .row(
            Row::redirected(
                "FIN from the backend",
                c.reply(flags::FIN | flags::ACK),
                c.to_client(),
            )
            .check("forward entry knows the backend's FIN", move |cx| {
                assert_eq!(cx.state(c.key()) & CT_FIN_REVERSE, CT_FIN_REVERSE);
            }),
        )
        .row(
            Row::redirected(
                "a new SYN on a closed tuple starts a new flow",
                c.syn(),
                c.to_maglev_backend(),
            )
            .entries(0) // the old pair is replaced by a new one
            .check("fresh state", move |cx| {
                assert_eq!(cx.state(c.key()), CT_SYN_SEEN)
            }),
        )
        .check("per-app counters saw the traffic", app_counters(2, true))
}

fn connection_closed_by_rst() -> Scenario {
    let c = Conn::new(40_002);
    Scenario::new().rows(connection(c)).row(
        Row::redirected(
            "RST from the backend is translated and closes both entries",
            c.reply(flags::RST),
            c.to_client(),
        )
        .check("forward entry knows the RST", move |cx| {
            assert_eq!(cx.state(c.key()) & CT_RST, CT_RST);
        }),
    )
}

/// The datapath's choice is userspace's, over many tuples.
fn maglev_matches_userspace() -> Scenario {
    Scenario::new()
        .rows((41_000..41_024).map(|port| {
            let c = Conn::new(port);
            Row::redirected(
                format!("Maglev choice for :{port} matches userspace's table"),
                c.syn(),
                c.to_maglev_backend(),
            )
            .entries(2)
        }))
        .check("per-app counters saw the flows", app_counters(24, false))
}

/// Packets for the gateway that belong to no flow of ours.
fn packets_without_a_flow() -> Scenario {
    let svc = Fixture::service();
    let snat_port = SocketAddrV4::new(Topology::SNAT_IP, 45_000);
    let stray = |port: u16, f: u8| Frame {
        ack: 0x2345_6789,
        ..from_client(client(port), svc, f)
    };
    let stray_reply = |f: u8| Frame {
        ack: 0x3456_789a,
        ..from_backend(0, backend(0), snat_port, f)
    };
    Scenario::new()
        .row(Row::answered(
            "a non-SYN for a service without a flow is answered with an RST (seq = its ack)",
            stray(42_000, flags::ACK),
        ))
        .row(Row::answered(
            "a SYN-ACK for a service without a flow too",
            stray(42_001, flags::SYN | flags::ACK),
        ))
        .row(Row::answered(
            "data and a FIN too, the RST trimmed to 54 bytes",
            Frame {
                payload: vec![0x5a; 1400],
                ..stray(42_002, flags::FIN | flags::ACK | flags::PSH)
            },
        ))
        .row(Row::answered(
            "a segment with TCP options (timestamps) and data, as a real socket sends it",
            Frame {
                tcp_options: vec![1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 7],
                payload: b"anyone there?".to_vec(),
                ..stray(42_005, flags::ACK | flags::PSH)
            },
        ))
        .row(Row::answered(
            "a reply to a SNAT port without a flow is answered toward the backend",
            stray_reply(flags::ACK),
        ))
        .row(Row::dropped(
            "an RST without a flow is never answered",
            stray(42_003, flags::RST | flags::ACK),
            DropReason::NoFlow,
        ))
        .row(Row::dropped(
            "nor an RST to a SNAT port",
            stray_reply(flags::RST),
            DropReason::NoReplyFlow,
        ))
        .row(Row::dropped(
            "a segment with IPv4 options is not answered",
            Frame {
                ip_options: vec![1, 1, 1, 0],
                ..stray(42_004, flags::ACK)
            },
            DropReason::NoFlow,
        ))
        .row(Row::dropped(
            "a SYN to a SNAT port without a flow is not answered (the kernel's port range rule)",
            stray_reply(flags::SYN),
            DropReason::NoReplyFlow,
        ))
}

/// Packets that are not the gateway's go to the kernel unchanged.
fn packets_for_the_kernel() -> Scenario {
    let svc = Fixture::service();
    let udp = Frame {
        proto: 17,
        payload: vec![0, 0, 0, 0, 0, 8, 0, 0],
        ..from_client(client(42_004), svc, 0)
    };
    let icmp = Frame {
        proto: 1,
        payload: vec![8, 0, 0xf7, 0xff, 0, 0, 0, 0],
        ..from_client(client(0), SocketAddrV4::new(Topology::PUBLIC_IP, 0), 0)
    };
    let mut arp = from_client(client(1), svc, 0).build();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    Scenario::new()
        .row(Row::passed(
            "the SNAT address outside the SNAT port range goes to the kernel",
            from_backend(
                0,
                backend(0),
                SocketAddrV4::new(Topology::SNAT_IP, 22),
                flags::SYN,
            ),
        ))
        .row(Row::passed(
            "an unknown port of the public address goes to the kernel",
            from_client(
                client(42_002),
                SocketAddrV4::new(Topology::PUBLIC_IP, 22),
                flags::SYN,
            ),
        ))
        .row(Row::passed(
            "another destination address goes to the kernel",
            from_client(
                client(42_003),
                SocketAddrV4::new(backend_ip(1), 8080),
                flags::SYN,
            ),
        ))
        .row(Row::passed(
            "UDP to a service address and port goes to the kernel",
            udp,
        ))
        .row(Row::passed(
            "ICMP echo to the public address goes to the kernel",
            icmp,
        ))
        .row(Row::passed("a non-IPv4 frame goes to the kernel", arp))
}

/// IPv4 options: the TCP header is found through ihl and left intact.
fn ipv4_header_length() -> Scenario {
    let c = Conn::new(42_005);
    let opts = Frame {
        ip_options: vec![0x94, 0x04, 0, 0, 1, 1, 1, 0], // router alert, NOPs, EOL
        ..c.syn()
    };
    let mut bad = Conn::new(42_006).syn().build();
    bad[14] = 0x44; // ihl 4
    Scenario::new()
        .row(Row::redirected("a SYN with IPv4 options", opts, c.to_maglev_backend()).entries(2))
        .row(Row::dropped(
            "an IPv4 header with ihl < 5",
            bad,
            DropReason::BadHeader,
        ))
}

fn fragments() -> Scenario {
    let svc = Fixture::service();
    Scenario::new()
        .row(Row::dropped(
            "a first fragment to a service",
            Frame {
                frag: 0x2000, // more fragments
                ..from_client(client(42_007), svc, flags::SYN)
            },
            DropReason::Fragment,
        ))
        .row(Row::dropped(
            "a later fragment to a service",
            Frame {
                frag: 0x0010, // offset 128
                ..from_client(client(42_008), svc, flags::ACK)
            },
            DropReason::Fragment,
        ))
        .row(Row::passed(
            "a fragment to another address goes to the kernel",
            Frame {
                frag: 0x2000,
                ..from_client(client(42_009), SocketAddrV4::new(backend_ip(0), 80), 0)
            },
        ))
}

/// Every truncation point of the Ethernet, IPv4 (with options) and TCP headers.
fn truncated_headers() -> Scenario {
    let full = Frame {
        ip_options: vec![1, 1, 1, 1],
        ..Conn::new(42_010).syn()
    }
    .build();
    let headers = 14 + 24 + 20;
    Scenario::new().rows((14..headers).map(|cut| {
        let row = Row::dropped(
            format!("a frame cut at {cut} bytes (in the IPv4/TCP headers)"),
            full[..cut].to_vec(),
            DropReason::Truncated,
        );
        // The kernel's test_run refuses shorter frames: XDP's under an Ethernet header
        // (drivers drop such runts), TC's (skb) under a whole IPv4 header. The parser is the
        // same code in both modes, so XDP's rows cover the IPv4 cuts for both.
        if cut < 14 + 20 {
            row.only(AttachMode::Xdp)
        } else {
            row
        }
    }))
}

/// A backend connects to the public endpoint (its own app).
fn hairpin() -> Scenario {
    let c = Conn::on(Link::Backend(0), 50_000);
    Scenario::new()
        .row(
            Row::redirected(
                "hairpin SYN from backend 0",
                Frame { seq: 7, ..c.syn() },
                c.to_maglev_backend(),
            )
            .entries(2),
        )
        .row(Row::redirected(
            "hairpin SYN-ACK goes back to backend 0",
            c.reply(flags::SYN | flags::ACK),
            c.to_client(),
        ))
}

/// A backend that stopped accepting is never chosen for a new flow; its flows keep going.
fn draining_backend() -> Scenario {
    let old = Conn::new(41_000);
    // A new client whose Maglev slot holds the backend of `old`'s flow.
    let new = move |cx: &Ctx| {
        // The slot's backend, not the prediction (which skips a backend that stopped accepting).
        let drained = cx.fx.slot_backend(old.client, old.service).id;
        (43_000..43_100)
            .map(Conn::new)
            .find(|c| cx.fx.slot_backend(c.client, c.service).id == drained)
            .expect("a tuple in the draining backend's slots")
    };
    Scenario::new()
        .row(
            Row::redirected(
                "SYN from :41000 makes a flow to its Maglev backend",
                old.syn(),
                old.to_maglev_backend(),
            )
            .entries(2),
        )
        .row(Row::redirected(
            "its SYN-ACK",
            old.reply(flags::SYN | flags::ACK),
            old.to_client(),
        ))
        .set("the backend of :41000's flow stops accepting", move |cx| {
            let b = cx.maglev(old);
            cx.fx.dp.set_backend(b.id, b.addr, false).unwrap();
        })
        .row(
            Row::redirected(
                "a SYN whose Maglev slot holds a draining backend",
                Input::with(move |cx| new(cx).syn()),
                Out::Any,
            )
            .entries(2)
            .check("the draining backend was not chosen", move |cx| {
                let f = cx.flow(new(cx).key());
                assert_ne!(f.backend_id, cx.fx.slot_backend(old.client, old.service).id);
            }),
        )
        .row(Row::redirected(
            "an existing flow of the draining backend still flows",
            old.send(flags::ACK),
            old.to_its_backend(),
        ))
}

fn no_backend_accepts() -> Scenario {
    let app2 = SocketAddrV4::new(Topology::PUBLIC_IP, 20_002);
    Scenario::new()
        .set("every backend stops accepting", |cx| {
            for b in cx.fx.backends.clone() {
                cx.fx.dp.set_backend(b.id, b.addr, false).unwrap();
            }
        })
        .row(Row::dropped(
            "a SYN when no backend accepts",
            Conn::new(43_001).syn(),
            DropReason::NoBackend,
        ))
        .set(
            "every backend accepts again; app 2 has none, on :20002",
            move |cx| {
                for b in cx.fx.backends.clone() {
                    cx.fx.dp.set_backend(b.id, b.addr, true).unwrap();
                }
                cx.fx.dp.set_app_backends(2, &[]).unwrap();
                cx.fx.dp.set_service(app2, 2).unwrap();
            },
        )
        .row(Row::dropped(
            "a SYN for an app with an empty backend set",
            Conn::new(43_002).to(app2).syn(),
            DropReason::NoBackend,
        ))
}

/// A one-port SNAT range toward a one-backend app.
fn snat_exhaustion() -> Scenario {
    let svc3 = SocketAddrV4::new(Topology::PUBLIC_IP, 20_003);
    let (first, second) = (Conn::new(44_000).to(svc3), Conn::new(44_001).to(svc3));
    // The one port, to the one backend.
    let only_port = || Out::Nat {
        src: Some(SocketAddrV4::new(Topology::SNAT_IP, 39_000)),
        dst: backend(0),
        macs: Link::Backend(0).out_macs(),
    };
    // Marks the first flow closed (RST) and idle for `idle`.
    let close = move |cx: &mut Ctx, idle: Duration| {
        let f = cx.flow(first.key());
        let last_seen_ns = gateway::datapath::monotonic_ns() - idle.as_nanos() as u64;
        for (k, dir) in [(first.key(), DIR_FORWARD), (f.peer_key(), DIR_REVERSE)] {
            let e = cx.flow(k);
            assert_eq!(e.direction, dir);
            let e = gateway_common::maps::Flow {
                state: e.state | CT_RST,
                last_seen_ns,
                ..e
            };
            cx.fx.dp.insert_flow(k, e).unwrap();
        }
    };
    Scenario::new()
        .set(
            "app 3 on :20003 with backend 0 only; SNAT port 39000 only; no cap on half-open \
             flows (else half the one port's range, 1, sends the next SYN a cookie)",
            move |cx| {
                let one = cx.fx.backends[0];
                cx.fx.dp.set_app_backends(3, &[one]).unwrap();
                cx.fx.dp.set_service(svc3, 3).unwrap();
                cx.fx
                    .dp
                    .configure(Topology::SNAT_IP, 39_000..=39_000, Duration::from_secs(60))
                    .unwrap();
                cx.fx.dp.set_half_open_global_max(0).unwrap();
            },
        )
        .row(
            Row::redirected(
                "the only SNAT port is taken by a first flow",
                first.syn(),
                only_port(),
            )
            .entries(2),
        )
        .row(
            Row::dropped(
                "a second flow finds no SNAT port",
                second.syn(),
                DropReason::SnatExhausted,
            )
            .counter(GlobalStat::SnatCollisions, 32..=32), // bounded probes
        )
        // The first flow closes (RST): its port is taken over only once it has been idle 1 s.
        .set("the first flow closes (RST)", move |cx| {
            close(cx, Duration::ZERO)
        })
        .row(Row::dropped(
            "a port closed a moment ago is not taken over",
            second.syn(),
            DropReason::SnatExhausted,
        ))
        .set("the first flow has been idle 1.5 s", move |cx| {
            close(cx, Duration::from_millis(1500))
        })
        .row(
            Row::redirected(
                "a port closed and idle 1 s is taken over by a new flow",
                second.syn(),
                only_port(),
            )
            .counter(GlobalStat::SnatReused, 1..=1)
            .check(
                "the closed flow's forward entry went with its port",
                move |cx| assert!(cx.fx.dp.flow(&first.key()).unwrap().is_none()),
            ),
        )
}

/// Not configured: no SNAT address, no new flow.
fn not_configured() -> Scenario {
    Scenario::new()
        .fixture(|mode, _| {
            let mut dp = Datapath::load().unwrap();
            dp.set_service(Fixture::service(), APP).unwrap();
            Fixture {
                dp,
                mode,
                backends: Vec::new(),
            }
        })
        .row(Row::dropped(
            "a SYN before any configuration",
            Conn::new(45_000).syn(),
            DropReason::NotConfigured,
        ))
}

/// New flows to one backend share its FIB answer (a per-CPU cache, so the scenario keeps to
/// one CPU) for as long as a flow keeps its own: the next-hop age. After that, the FIB again.
fn next_hop_ageing() -> Scenario {
    const AGE: Duration = Duration::from_millis(300);
    let (first, second, third) = (Conn::new(42_001), Conn::new(42_002), Conn::new(42_003));
    let syn = |name: &str, c: Conn, fib: u64| {
        Row::redirected(name, c.syn(), c.to_maglev_backend())
            .entries(2)
            .counter(GlobalStat::FibLookups, fib..=fib)
    };
    Scenario::new()
        .backends(1)
        .fixture(|mode, backend_ips| Fixture::new(mode, backend_ips, 1 << 12))
        .set("this thread on CPU 0; next hops age after 300 ms", |cx| {
            pin_to_cpu_0();
            cx.fx
                .dp
                .configure(Topology::SNAT_IP, SNAT_PORTS, AGE)
                .expect("configure");
        })
        .row(syn("the first flow asks the FIB", first, 1))
        .row(syn("the second takes the cached hop", second, 0).check(
            "as old as the answer it took",
            move |cx| {
                assert_eq!(
                    cx.flow(second.key()).nexthop_ns,
                    cx.flow(first.key()).nexthop_ns
                )
            },
        ))
        .wait(AGE + Duration::from_millis(50))
        .row(
            syn("an aged answer is asked again", third, 1).check("a newer answer", move |cx| {
                assert!(cx.flow(third.key()).nexthop_ns > cx.flow(first.key()).nexthop_ns)
            }),
        )
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
        // The backend closed first: its TIME_WAIT (60 s) holds the pair, and the SNAT port.
        (
            8,
            CT_SYN_SEEN | CT_FIN_FORWARD | CT_FIN_REVERSE | CT_BACKEND_CLOSED_FIRST,
            11,
            true,
        ),
        (
            9,
            CT_SYN_SEEN | CT_FIN_FORWARD | CT_FIN_REVERSE | CT_BACKEND_CLOSED_FIRST,
            61,
            false,
        ),
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
    assert_eq!(scan.removed, 10, "5 pairs reclaimed");
    // What is left: 4 pairs, 3 open (a FIN one way is not closed yet), all of app 0.
    assert_eq!(scan.counts.entries, 8);
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

// ---------------------------------------------------------------------------------------------
// Divergences the differential fuzzer found (`gateway_tests::fuzz`), each a table case: the
// model and the datapath disagreed, and spec 14 (issue 14) says which is right. One backend and
// a one-port SNAT range make every frame known in advance.

scenario_tests! {
    fuzz_malformed_options_after_a_window_scale,
    fuzz_syn_ack_window_scale_offer,
    fuzz_ttl_before_a_syn_rebalance,
    fuzz_rst_answer_despite_ip_options,
    fuzz_syn_retransmission_with_data,
    fuzz_tfo_syn_retransmitted_without_data,
    fuzz_rst_of_a_carried_over_handshake,
}

mod found {
    use std::net::SocketAddrV4;

    use gateway_tests::{
        model::wire::Segment,
        netns::Topology,
        scenario::{Link, Out, Scenario, backend, client},
    };

    /// The one SNAT port.
    pub const PORT: u16 = 39_000;

    pub fn snat() -> SocketAddrV4 {
        SocketAddrV4::new(Topology::SNAT_IP, PORT)
    }

    /// One backend (0), SNAT port 39000 only.
    pub fn scenario() -> Scenario {
        Scenario::new()
            .backends(1)
            .set("SNAT port 39000 only", |cx| {
                cx.fx
                    .dp
                    .configure(
                        Topology::SNAT_IP,
                        PORT..=PORT,
                        std::time::Duration::from_secs(60),
                    )
                    .unwrap()
            })
    }

    /// A segment from the client's `port` to app 1's service.
    pub fn from_client(port: u16, flags: u8, seq: u32, ack: u32) -> Segment {
        let mut s = Segment::new(
            client(port),
            gateway_tests::datapath::Fixture::service(),
            flags,
        );
        (s.src_mac, s.dst_mac) = (Link::Client.host_mac(), Link::Client.gw_mac());
        (s.seq, s.ack) = (seq, ack);
        s
    }

    /// A segment from backend 0 to the SNAT port.
    pub fn from_backend(flags: u8, seq: u32, ack: u32) -> Segment {
        let mut s = Segment::new(backend(0), snat(), flags);
        (s.src_mac, s.dst_mac) = (Link::Backend(0).host_mac(), Link::Backend(0).gw_mac());
        (s.seq, s.ack) = (seq, ack);
        s
    }

    /// A client segment's translation.
    pub fn to_backend() -> Out {
        Out::Nat {
            src: Some(snat()),
            dst: backend(0),
            macs: Link::Backend(0).out_macs(),
        }
    }

    /// A backend segment's translation to the client's `port`.
    pub fn to_client(port: u16) -> Out {
        Out::Nat {
            src: Some(gateway_tests::datapath::Fixture::service()),
            dst: client(port),
            macs: Link::Client.out_macs(),
        }
    }
}

/// §5: options are read as the endpoints' TCP reads them (Linux's `tcp_parse_options`): a
/// window scale offered before a malformed option (here a length of 1) stands, as it does for
/// the backend that receives the SYN. (The model had it the other way.)
fn fuzz_malformed_options_after_a_window_scale() -> Scenario {
    use gateway_common::maps::TRACK_WSCALE_OFFERED;
    let mut syn = found::from_client(46_001, flags::SYN, 1000, 0);
    syn.tcp_options = vec![3, 3, 7, 5, 1];
    found::scenario().row(
        Row::redirected(
            "a SYN: wscale 7, then SACK of length 1",
            syn.build(),
            found::to_backend(),
        )
        .entries(2)
        .check("window scale 7 offered", |cx| {
            let f = cx.flow(FlowKey4::from_addrs(client(46_001), Fixture::service()));
            assert_eq!(
                (f.track & TRACK_WSCALE_OFFERED, f.wscale),
                (TRACK_WSCALE_OFFERED, 7),
                "{f:?}"
            );
        }),
    )
}

/// §1: `TRACK_WSCALE_OFFERED` says this side's SYN or SYN-ACK carried a window scale option:
/// the backend's SYN-ACK sets it on the reverse entry. (The model had it wrong.)
fn fuzz_syn_ack_window_scale_offer() -> Scenario {
    use gateway_common::maps::{TRACK_ACK_SEEN, TRACK_WSCALE_OFFERED};
    let mut syn = found::from_client(46_002, flags::SYN, 1000, 0);
    syn.tcp_options = vec![3, 3, 7];
    let mut syn_ack = found::from_backend(flags::SYN | flags::ACK, 5000, 1001);
    syn_ack.tcp_options = vec![1, 3, 3, 2];
    found::scenario()
        .row(Row::redirected("SYN, wscale 7", syn.build(), found::to_backend()).entries(2))
        .row(
            Row::redirected(
                "SYN-ACK, wscale 2",
                syn_ack.build(),
                found::to_client(46_002),
            )
            .check("the reverse entry knows its offer and both shifts", |cx| {
                let r = cx.flow(FlowKey4::from_addrs(backend(0), found::snat()));
                assert_eq!(
                    (r.track, r.wscale, r.peer_wscale, r.seq_end, r.ack_max),
                    (TRACK_ACK_SEEN | TRACK_WSCALE_OFFERED, 2, 7, 5001, 1001),
                    "{r:?}"
                );
            }),
        )
}

/// §3: the TTL is checked (step 3) before a SYN is handled on its flow (§4.1): a SYN with a new
/// ISN and TTL 1 during the handshake is dropped and changes nothing. (The datapath in progress
/// removed the pair and counted `syn_rebalanced` first.)
fn fuzz_ttl_before_a_syn_rebalance() -> Scenario {
    let mut again = found::from_client(46_003, flags::SYN, 7_000_000, 0);
    again.ttl = 1;
    found::scenario()
        .row(
            Row::redirected(
                "SYN, ISN 1000",
                found::from_client(46_003, flags::SYN, 1000, 0).build(),
                found::to_backend(),
            )
            .entries(2),
        )
        .row(
            Row::dropped(
                "a SYN with a new ISN and TTL 1",
                again.build(),
                DropReason::TtlExceeded,
            )
            .counter(GlobalStat::SynRebalanced, 0..=0)
            .check("the flow is the first SYN's", |cx| {
                let f = cx.flow(FlowKey4::from_addrs(client(46_003), Fixture::service()));
                assert_eq!((f.seq_end, f.packets), (1001, 1), "{f:?}");
            }),
        )
}

/// §7: a segment with IPv4 options and no flow is not answered (the RST would move the TCP
/// header, which a CHECKSUM_PARTIAL skb's offsets point at): dropped `no_flow`, as before.
/// (The model answered it.)
fn fuzz_rst_answer_despite_ip_options() -> Scenario {
    let mut ack = found::from_client(46_004, flags::ACK, 77, 0x1234_5678);
    ack.ip_options = vec![1, 1, 1, 0];
    found::scenario().row(
        Row::dropped(
            "an ACK with IP options, no flow",
            ack.build(),
            DropReason::NoFlow,
        )
        .counter(GlobalStat::RstNoFlow, 0..=0),
    )
}

/// §4.1: a SYN with the flow's ISN is a retransmission and stays on its flow, whether it
/// carries data this time or not: its `seq` lies within what the first SYN covered (at most
/// 1536 before `seq_end`). (The datapath in progress compared its end, which re-balanced a
/// SYN retransmitted with data; `seq + 1` alone would re-balance a TFO SYN retransmitted
/// without its data.)
fn fuzz_syn_retransmission_with_data() -> Scenario {
    let mut again = found::from_client(46_005, flags::SYN, 1000, 0);
    again.payload_len = 10;
    found::scenario()
        .row(
            Row::redirected(
                "SYN, ISN 1000",
                found::from_client(46_005, flags::SYN, 1000, 0).build(),
                found::to_backend(),
            )
            .entries(2),
        )
        .row(
            Row::redirected(
                "the same SYN with 10 bytes of data",
                again.build(),
                found::to_backend(),
            )
            .counter(GlobalStat::SynRebalanced, 0..=0)
            .counter(GlobalStat::FlowsCreated, 0..=0)
            .check("the same flow, its tracking unchanged", |cx| {
                let f = cx.flow(FlowKey4::from_addrs(client(46_005), Fixture::service()));
                assert_eq!((f.seq_end, f.packets), (1001, 2), "{f:?}");
            }),
        )
}

/// §4.1, the other way: a TFO SYN (with data) retransmitted without its data stays too.
fn fuzz_tfo_syn_retransmitted_without_data() -> Scenario {
    let mut tfo = found::from_client(46_006, flags::SYN, 2000, 0);
    tfo.payload_len = 100;
    found::scenario()
        .row(
            Row::redirected(
                "a TFO SYN, ISN 2000, 100 bytes",
                tfo.build(),
                found::to_backend(),
            )
            .entries(2),
        )
        .row(
            Row::redirected(
                "retransmitted without its data",
                found::from_client(46_006, flags::SYN, 2000, 0).build(),
                found::to_backend(),
            )
            .counter(GlobalStat::SynRebalanced, 0..=0)
            .counter(GlobalStat::FlowsCreated, 0..=0)
            .check("the same flow", |cx| {
                let f = cx.flow(FlowKey4::from_addrs(client(46_006), Fixture::service()));
                assert_eq!((f.seq_end, f.packets), (2101, 2), "{f:?}");
            }),
        )
}

/// §12: an RST whose peer entry is still carried over (`TRACK_LIBERAL`) closes without any
/// check on the peer's numbers, during the handshake too. (The model had it wrong.)
fn fuzz_rst_of_a_carried_over_handshake() -> Scenario {
    use gateway_common::maps::TRACK_LIBERAL;
    let fwd = FlowKey4::from_addrs(client(46_006), Fixture::service());
    found::scenario()
        .row(
            Row::redirected(
                "SYN",
                found::from_client(46_006, flags::SYN, 1000, 0).build(),
                found::to_backend(),
            )
            .entries(2),
        )
        .set("both entries carried over from a v1 table", move |cx| {
            let rev = cx.flow(fwd).peer_key();
            for k in [fwd, rev] {
                let f = cx.flow(k);
                let f = gateway_common::maps::Flow {
                    track: TRACK_LIBERAL,
                    wscale: 14,
                    peer_wscale: 14,
                    seq_end: 0,
                    ack_max: 0,
                    win_max: 0,
                    ..f
                };
                cx.fx.dp.insert_flow(k, f).unwrap();
            }
        })
        .row(Row::redirected(
            "the backend's ACK: its entry learns",
            found::from_backend(flags::ACK, 5000, 1001).build(),
            found::to_client(46_006),
        ))
        .row(
            Row::redirected(
                "the backend's RST|ACK, any ack: closes",
                found::from_backend(flags::RST | flags::ACK, 5000, 0xdead).build(),
                found::to_client(46_006),
            )
            .check("closed", move |cx| {
                assert_eq!(cx.state(fwd) & CT_RST, CT_RST)
            }),
        )
}
