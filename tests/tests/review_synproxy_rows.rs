//! Review of issue 15 (the SYN proxy, XDP's partial checksums) as datapath rows. Each scenario
//! here fails on the reviewed code (36adf0b): the row named in its doc comment is the one.

use std::{
    net::SocketAddrV4,
    sync::{Arc, Mutex},
    time::Duration,
};

use gateway::datapath::monotonic_ns;
use gateway_common::{
    DropReason, GlobalStat,
    net::{fold, pseudo_header},
    syncookie::{self, Handshake},
};
use gateway_tests::{
    datapath::Fixture,
    netns::Topology,
    packet::{Frame, flags, parse_checked},
    scenario::{
        AttachMode, BACKEND_ISN, CLIENT_ISN, Conn, Ctx, Input, Out, Row, Scenario, from_backend,
        from_client,
    },
    scenario_tests,
};

scenario_tests! {
    a_lost_cookie_ack_is_not_answered_with_a_reset_at_the_clients_zero_window_probe,
    a_lost_syn_to_the_backend_is_sent_again,
    a_backend_syn_ack_after_the_clients_rst_is_not_acknowledged,
    a_whole_checksum_equal_to_the_pseudo_headers_sum_is_not_counted_partial,
    a_flood_that_exhausts_snat_ports_below_the_cap_still_gets_cookies,
    a_flood_to_every_app_at_its_cap_leaves_room_for_another_apps_connections,
}

const CLIENT_WINDOW: u16 = 29_200;

fn cap(n: u32) -> impl FnOnce(&mut Ctx) + Send + 'static {
    move |cx| cx.fx.dp.set_half_open_max(n).expect("half-open max")
}

fn syn_with_mss(c: Conn) -> Frame {
    Frame {
        tcp_options: vec![2, 4, 0x05, 0x78],
        ..c.syn()
    }
}

/// The cookie of the SYN-ACK the last row sent, checked valid for `c`.
fn cookie_of(cx: &Ctx, c: Conn) -> u32 {
    let p = parse_checked(&cx.output);
    assert_eq!(p.tcp_flags, flags::SYN | flags::ACK, "a SYN-ACK");
    let at = 14 + 20;
    let seq = u32::from_be_bytes(cx.output[at + 4..at + 8].try_into().unwrap());
    let key = cx.fx.dp.cookie_key().unwrap();
    let hs = Handshake {
        src_ip: u32::from_ne_bytes(c.client.ip().octets()),
        dst_ip: u32::from_ne_bytes(c.service.ip().octets()),
        src_port: c.client.port().to_be(),
        dst_port: c.service.port().to_be(),
        isn: CLIENT_ISN,
    };
    assert!(syncookie::check(&key, &hs, seq, syncookie::counter(monotonic_ns())).is_some());
    seq
}

/// A segment from `c`'s client acknowledging the cookie, `seq` as given.
fn client_ack(c: Conn, cookie: &Arc<Mutex<u32>>, seq: u32, fl: u8) -> Input {
    let cookie = cookie.clone();
    Input::with(move |_| {
        let mut f = from_client(c.client, c.service, fl);
        f.seq = seq;
        f.ack = cookie.lock().unwrap().wrapping_add(1);
        f.window = CLIENT_WINDOW;
        f
    })
}

/// The start every scenario shares: app 1 at its cap of one half-open flow, `c` given a
/// cookie (kept in `cookie`).
fn at_cap(first: Conn, c: Conn, cookie: &Arc<Mutex<u32>>) -> Scenario {
    let got = cookie.clone();
    Scenario::new()
        .backends(1)
        .set("at most 1 half-open flow per app", cap(1))
        .row(
            Row::redirected(
                "a first SYN makes a flow",
                first.syn(),
                first.to_maglev_backend(),
            )
            .entries(2),
        )
        .row(
            Row::sent_back("a cookie", syn_with_mss(c), Out::Any)
                .check("kept", move |cx| *got.lock().unwrap() = cookie_of(cx, c)),
        )
}

/// The client's ACK of the cookie is lost (a flood is when links drop). The client is
/// established with a zero window: all it sends is its zero-window probe, which Linux numbers
/// `snd_una - 1` = its ISN (`tcp_xmit_probe_skb`), ack the cookie + 1. The cookie check takes
/// the ISN as `seq - 1` and fails, so the probe is answered as a segment without a flow: an RST
/// at the cookie + 1, exactly what the client expects, and its connection is reset (~200 ms
/// after connect() returned). Linux's own cookies never meet this (their SYN-ACK opens the
/// window: the client's data carries `seq` = ISN + 1 and validates); netfilter's SYNPROXY drops
/// the probe (the client hangs instead). A careful proxy also checks the cookie against `seq`
/// for a bare ACK (the probe's shape), and proxies it as the lost ACK.
///
/// Fails at row "the client's zero-window probe ...": verdict Tx (an RST), not a redirect.
fn a_lost_cookie_ack_is_not_answered_with_a_reset_at_the_clients_zero_window_probe() -> Scenario {
    let (first, c) = (Conn::new(49_000), Conn::new(49_001));
    let cookie = Arc::new(Mutex::new(0u32));
    at_cap(first, c, &cookie).row(
        Row::redirected(
            "the client's zero-window probe (seq = its ISN) after its cookie ACK was lost: the \
             SYN to the backend, not an RST that resets the client",
            client_ack(c, &cookie, CLIENT_ISN, flags::ACK),
            Out::Any,
        )
        .counter(GlobalStat::SynCookiesAccepted, 1..=1)
        .counter(GlobalStat::RstNoFlow, 0..=0)
        .entries(2)
        .check("not an RST", |cx| {
            assert_ne!(parse_checked(&cx.output).tcp_flags & flags::RST, flags::RST)
        }),
    )
}

/// The SYN the cookie's ACK became is lost on the backend's link. Nothing sends it again: the
/// gateway keeps no timer, the client (established, zero window) only probes, and its probes
/// are dropped `out_of_window` (no segment but the handshake's before the SYN-ACK). The flow
/// holds its SNAT port for the handshake's 30 s, then expires, and the client's next probe is
/// answered with an RST: one lost packet costs the connection after 30 s. For a flow made from a
/// SYN, the client's own SYN retransmission (1 s) recovers. A careful proxy turns a client
/// segment of a proxied flow whose backend has not answered into the SYN again (the `pre` path).
///
/// Fails at row "the client's zero-window probe ...": dropped out_of_window.
fn a_lost_syn_to_the_backend_is_sent_again() -> Scenario {
    let (first, c) = (Conn::new(49_100), Conn::new(49_101));
    let cookie = Arc::new(Mutex::new(0u32));
    at_cap(first, c, &cookie)
        .row(
            Row::redirected(
                "the cookie's ACK: the SYN to the backend (lost on the way)",
                client_ack(c, &cookie, CLIENT_ISN.wrapping_add(1), flags::ACK),
                Out::Any,
            )
            .entries(2),
        )
        .row(
            Row::redirected(
                "the client's zero-window probe, the backend silent: the SYN to it again",
                client_ack(c, &cookie, CLIENT_ISN, flags::ACK),
                Out::Any,
            )
            .check("a SYN to the backend", |cx| {
                assert_eq!(parse_checked(&cx.output).tcp_flags, flags::SYN)
            }),
        )
}

/// The client resets its connection (closes it, gives up) before the backend answered the
/// proxy's SYN: the RST is exact and closes the flow. The backend's SYN-ACK that follows is
/// still answered with the handshake's ACK (`proxy_syn_ack` does not look at `CT_RST`):
/// `syn_proxy_established` counts it, both entries get `CT_ESTABLISHED` beside `CT_RST`, and
/// the backend gets an established connection nobody owns. Netfilter's SYNPROXY answers the
/// server's SYN-ACK only in SYN_SENT.
///
/// Fails at row "the backend's SYN-ACK after it": sent back (an ACK), counted established.
fn a_backend_syn_ack_after_the_clients_rst_is_not_acknowledged() -> Scenario {
    let (first, c) = (Conn::new(49_200), Conn::new(49_201));
    let cookie = Arc::new(Mutex::new(0u32));
    at_cap(first, c, &cookie)
        .row(
            Row::redirected(
                "the cookie's ACK: the SYN to the backend",
                client_ack(c, &cookie, CLIENT_ISN.wrapping_add(1), flags::ACK),
                Out::Any,
            )
            .entries(2),
        )
        .row(Row::redirected(
            "the client's RST (exact): the flow closed",
            client_ack(c, &cookie, CLIENT_ISN.wrapping_add(1), flags::RST),
            Out::Any,
        ))
        .row(
            Row::dropped(
                "the backend's SYN-ACK after it: not acknowledged",
                Input::with(move |cx| {
                    let r = c.rewrite(cx);
                    let mut f =
                        from_backend(r.backend_index, r.backend, r.snat, flags::SYN | flags::ACK);
                    f.seq = BACKEND_ISN;
                    f.ack = CLIENT_ISN.wrapping_add(1);
                    f
                }),
                DropReason::OutOfWindow,
            )
            .counter(GlobalStat::SynProxyEstablished, 0..=0),
        )
}

/// `f` with a 64-byte payload whose first word is chosen so that its whole, right TCP checksum
/// equals the sum of its pseudo-header, folded: what one segment in 65,536 carries.
fn whole_checksum_equal_to_pseudo(mut f: Frame) -> Frame {
    let src = u32::from_ne_bytes(f.src.ip().octets());
    let dst = u32::from_ne_bytes(f.dst.ip().octets());
    for w in 0..=u16::MAX {
        let mut payload = vec![0x5au8; 64];
        payload[..2].copy_from_slice(&w.to_be_bytes());
        f.payload = payload;
        let bytes = f.build();
        let ihl = usize::from(bytes[14] & 0xf) * 4;
        let tcp_len = (bytes.len() - 14 - ihl) as u16;
        let at = 14 + ihl + 16;
        let field = u16::from_ne_bytes([bytes[at], bytes[at + 1]]);
        if field == fold(pseudo_header(src, dst, tcp_len)) {
            return f;
        }
    }
    panic!("no payload gives that checksum");
}

/// XDP takes a checksum field equal to the pseudo-header's sum as partial. A right checksum
/// has that value once in 65,536 segments: on a physical NIC (where nothing is ever partial)
/// `partial_checksums` then counts ~15/s at 1 Mpp/s, and the daemon's warning fires within
/// seconds of the first traffic, telling the operator to turn tx offload off at senders that
/// do not exist (any remote host can trigger it on purpose with one segment, too). The
/// recomputation itself is harmless (same value). A careful fix counts a segment as partial
/// only when its completed checksum differs from the field, or warns only past a rate.
///
/// Fails at row "a data segment ...": partial_checksums +1.
fn a_whole_checksum_equal_to_the_pseudo_headers_sum_is_not_counted_partial() -> Scenario {
    let c = Conn::new(49_300);
    Scenario::new()
        .backends(1)
        .row(Row::redirected("SYN", c.syn(), c.to_maglev_backend()).entries(2))
        .row(Row::redirected(
            "SYN-ACK",
            c.reply(flags::SYN | flags::ACK),
            c.to_client(),
        ))
        .row(Row::redirected(
            "ACK",
            c.send(flags::ACK),
            c.to_its_backend(),
        ))
        .row(
            Row::redirected(
                "a data segment whose right checksum equals its pseudo-header's sum",
                c.send(flags::ACK | flags::PSH)
                    .map(whole_checksum_equal_to_pseudo),
                c.to_its_backend(),
            )
            .counter(GlobalStat::PartialChecksums, 0..=0)
            .only(AttachMode::Xdp),
        )
}

/// The SNAT ports toward a backend are fewer than the app's cap of half-open flows (the
/// issue's own reproduction used 512 ports, 40000-40511, against a cap of 1024; or several apps
/// share a backend and their caps add up): a flood takes every port with half-open flows before
/// the count reaches the cap, so no SYN ever gets a cookie; every SYN, the legitimate clients'
/// included, is dropped `snat_exhausted` for the handshake's 30 s, as before issue 15. Nothing
/// in the configuration refuses or warns of it. A careful fix answers a SYN with a cookie when
/// no SNAT port is free (the proxied flow is made only for a proven client), or checks the cap
/// against the range at start.
///
/// Fails at row "a third SYN ...": dropped snat_exhausted.
fn a_flood_that_exhausts_snat_ports_below_the_cap_still_gets_cookies() -> Scenario {
    let (a, b, c) = (Conn::new(49_400), Conn::new(49_401), Conn::new(49_402));
    Scenario::new()
        .backends(1)
        .set("at most 4 half-open flows per app", cap(4))
        .set("2 SNAT ports", |cx| {
            cx.fx
                .dp
                .configure(Topology::SNAT_IP, 40_000..=40_001, Duration::from_secs(60))
                .expect("configure")
        })
        .row(Row::redirected("a spoofed SYN", a.syn(), a.to_maglev_backend()).entries(2))
        .row(
            Row::sent_back(
                "another: half the 2 ports are held half-open (the cap of all apps together), \
                 below the app's cap of 4: a cookie",
                b.syn(),
                Out::Any,
            )
            .entries(0)
            .counter(GlobalStat::SynCookiesSent, 1..=1),
        )
        .row(
            Row::sent_back("a third SYN: a cookie", c.syn(), Out::Any)
                .entries(0)
                .counter(GlobalStat::SynCookiesSent, 1..=1),
        )
}

/// The per-app caps do not bound the table: apps x cap x 2 entries of half-open flows fit in
/// the table only while apps < table / (2 x cap): 512 apps with the defaults (1,048,576 entries,
/// cap 1024), 32 apps with `--conntrack-size 65536` (the input 2). A spoofed flood to
/// every app's port fills the table with half-open flows, each app below or at its cap, and
/// then every app's new connections are refused `conntrack_full` for the handshake's 30 s,
/// the proxied ones too (a cookie's ACK needs two entries): "other apps are unaffected" does
/// not hold. Here, to scale: a table of 8 entries, a cap of 2, three apps. A careful fix caps
/// the half-open flows of the whole table too (cookies for every app past it), as Linux's
/// `tcp_max_syn_backlog` is per listener but the kernel's SYN queue memory is bounded
/// globally, or answers a SYN with a cookie when the table is full.
///
/// Fails at row "app 3's SYN ...": dropped conntrack_full.
fn a_flood_to_every_app_at_its_cap_leaves_room_for_another_apps_connections() -> Scenario {
    let svc = |port| SocketAddrV4::new(Topology::PUBLIC_IP, port);
    let app2 = |p| Conn::new(p).to(svc(20_001));
    let app3 = Conn::new(49_520).to(svc(20_002));
    Scenario::new()
        .backends(1)
        .fixture(|mode, ips| Fixture::new(mode, ips, 8))
        .set(
            "a cap of 2 half-open flows per app; apps 2 and 3",
            move |cx| {
                cx.fx.dp.set_half_open_max(2).expect("cap");
                let backends = cx.fx.backends.clone();
                for (app, port) in [(2, 20_001), (3, 20_002)] {
                    cx.fx.dp.set_app_backends(app, &backends).expect("maglev");
                    cx.fx.dp.set_service(svc(port), app).expect("service");
                }
            },
        )
        .rows([
            Row::redirected("flood: app 1", Conn::new(49_500).syn(), Out::Any).entries(2),
            Row::redirected("flood: app 1", Conn::new(49_501).syn(), Out::Any).entries(2),
            // A quarter of the table (2 entries: 2 flows) is half-open: every app's SYNs get
            // cookies from here.
            Row::redirected("flood: app 2, a cookie", app2(49_510).syn(), Out::Any)
                .counter(GlobalStat::SynCookiesSent, 1..=1),
            Row::redirected("flood: app 2, a cookie", app2(49_511).syn(), Out::Any)
                .counter(GlobalStat::SynCookiesSent, 1..=1),
        ])
        .row(
            Row::redirected(
                "app 3's SYN (no half-open flow of its own): a flow, or at least a cookie",
                app3.syn(),
                Out::Any,
            )
            .counter(GlobalStat::FlowsCreated, 0..=1),
        )
}
