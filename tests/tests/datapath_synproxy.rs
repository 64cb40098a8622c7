//! The SYN proxy (issue 15, input 2), through BPF_PROG_TEST_RUN in both attach modes, as
//! scenarios (see `gateway_tests::scenario`): an app at its cap of half-open flows has its SYNs
//! answered with SYN cookies and keeps no state for them; a client's ACK with a valid cookie
//! makes a proxied flow and becomes the SYN to the backend; the backend's SYN-ACK is answered
//! with the handshake's ACK; then every segment's numbers are translated both ways. Forged,
//! stale or corrupted cookie ACKs make nothing.

use std::{
    net::SocketAddrV4,
    sync::{Arc, Mutex},
    time::Duration,
};

use gateway::datapath::monotonic_ns;
use gateway_common::{
    DropReason, GlobalStat,
    maps::{
        APP_CLIENT_ADDRESS_TOA, AppConfig, CT_ESTABLISHED, CT_RST, CT_SYN_ACK_SEEN, CT_SYN_SEEN,
        TOA_ADD, TOA_PENDING, TRACK_PROXIED,
    },
    net::{fold, ip_to_net, port_to_net, pseudo_header, toa},
    syncookie::{self, Handshake},
};
use gateway_tests::{
    datapath::{APP, Fixture},
    netns::Topology,
    packet::{Frame, flags, mss_option, parse_checked},
    scenario::{
        AttachMode, BACKEND_ISN, CLIENT_ISN, Conn, Ctx, Input, Out, Row, Scenario, app_config,
        from_backend, from_client,
    },
    scenario_tests,
};

scenario_tests! {
    a_flooded_app_answers_with_cookies_and_proxies_the_handshake,
    forged_or_corrupted_cookie_acks_make_nothing,
    a_completed_handshake_frees_its_half_open_slot,
    a_backend_refusing_the_proxys_syn_resets_the_client,
    a_flow_started_over_at_the_cap_completes_through_the_proxy,
    a_backends_refusal_reaches_the_client_in_its_numbers,
    a_corrupted_syn_ack_fixes_no_proxied_flow,
    a_refusal_dropped_for_its_ttl_changes_no_numbers,
    a_lost_cookie_ack_is_not_answered_with_a_reset_at_the_clients_zero_window_probe,
    a_lost_syn_to_the_backend_is_sent_again,
    a_backend_syn_ack_after_the_clients_rst_is_not_acknowledged,
    a_whole_checksum_equal_to_the_pseudo_headers_sum_is_not_counted_partial,
    a_flood_that_exhausts_snat_ports_below_the_cap_still_gets_cookies,
    a_flood_to_every_app_at_its_cap_leaves_room_for_another_apps_connections,
    icmp_errors_about_a_proxied_flow_quote_each_ends_own_numbers,
    an_apps_mss_clamp_holds_for_the_proxys_syn_to_the_backend,
    the_proxys_ack_tells_the_backend_the_client_address,
}

/// The client's window in its ACKs (unscaled: a proxied connection has no window scaling).
const CLIENT_WINDOW: u16 = 29_200;

/// What a test reads of a TCP frame beyond `parse_checked`: numbers, window, options (the
/// frames here have IPv4 headers without options).
struct Tcp {
    seq: u32,
    ack: u32,
    window: u16,
    options: Vec<u8>,
}

fn tcp_of(frame: &[u8]) -> Tcp {
    let at = 14 + 20;
    let doff = usize::from(frame[at + 12] >> 4) * 4;
    let word = |i: usize| u32::from_be_bytes(frame[at + i..at + i + 4].try_into().unwrap());
    Tcp {
        seq: word(4),
        ack: word(8),
        window: u16::from_be_bytes([frame[at + 14], frame[at + 15]]),
        options: frame[at + 20..at + doff].to_vec(),
    }
}

/// `c`'s SYN announcing MSS 1400 (the cookie carries 1300, the table's entry below it).
fn syn_with_mss(c: Conn) -> Frame {
    Frame {
        tcp_options: mss_option(1400),
        ..c.syn()
    }
}

/// The apps' cap of half-open flows set to `n`.
fn cap(n: u32) -> impl FnOnce(&mut Ctx) + Send + 'static {
    move |cx| cx.fx.dp.set_half_open_max(n).expect("half-open max")
}

/// The cookie a SYN-ACK the gateway sent (`cx.output`) carries, checked: back to `c`'s client
/// from the service, the client's ISN + 1 acknowledged, a zero window, the cookie's MSS (1300),
/// a cookie valid for `c` with the fixture's key.
fn cookie_of(cx: &Ctx, c: Conn) -> u32 {
    let p = parse_checked(&cx.output);
    let t = tcp_of(&cx.output);
    assert_eq!(p.tcp_flags, flags::SYN | flags::ACK, "a SYN-ACK");
    assert_eq!((p.src, p.dst), (c.service, c.client), "back to the client");
    assert_eq!((p.src_mac, p.dst_mac), (c.link.gw_mac(), c.link.host_mac()));
    assert_eq!(t.ack, CLIENT_ISN.wrapping_add(1));
    assert_eq!(
        t.window, 0,
        "a zero window until the backend's handshake is done"
    );
    assert_eq!(t.options, mss_option(1300));
    let key = cx.fx.dp.cookie_key().unwrap();
    let hs = Handshake {
        src_ip: u32::from_ne_bytes(c.client.ip().octets()),
        dst_ip: u32::from_ne_bytes(c.service.ip().octets()),
        src_port: c.client.port().to_be(),
        dst_port: c.service.port().to_be(),
        isn: CLIENT_ISN,
    };
    assert_eq!(
        syncookie::check(&key, &hs, t.seq, syncookie::counter(monotonic_ns())),
        Some(1300),
        "a valid cookie for this client"
    );
    t.seq
}

/// The client's ACK of `cookie` (changed by `change`).
fn cookie_ack(
    c: Conn,
    cookie: &Arc<Mutex<u32>>,
    change: impl FnOnce(&mut Frame) + Send + 'static,
) -> Input {
    let cookie = cookie.clone();
    Input::with(move |_| {
        let mut f = from_client(c.client, c.service, flags::ACK);
        f.seq = CLIENT_ISN.wrapping_add(1);
        f.ack = cookie.lock().unwrap().wrapping_add(1);
        f.window = CLIENT_WINDOW;
        change(&mut f);
        f
    })
}

/// `c`'s client acknowledging the cookie with sequence number `seq` and flags `tcp_flags`.
fn client_ack(c: Conn, cookie: &Arc<Mutex<u32>>, seq: u32, tcp_flags: u8) -> Input {
    cookie_ack(c, cookie, move |f| {
        f.seq = seq;
        f.tcp_flags = tcp_flags;
    })
}

/// `c`'s backend's SYN-ACK to the proxy's SYN (ISN [`BACKEND_ISN`], acknowledging the
/// client's ISN, which the proxy's SYN carries).
fn backend_syn_ack(c: Conn) -> Input {
    Input::with(move |cx| {
        let r = c.rewrite(cx);
        let mut f = from_backend(r.backend_index, r.backend, r.snat, flags::SYN | flags::ACK);
        f.seq = BACKEND_ISN;
        f.ack = CLIENT_ISN.wrapping_add(1);
        f
    })
}

/// The half-open flows the datapath counts for app 1.
fn half_open(cx: &Ctx) -> i64 {
    cx.fx.dp.half_open(APP).unwrap()
}

fn a_flooded_app_answers_with_cookies_and_proxies_the_handshake() -> Scenario {
    let (first, c) = (Conn::new(48_000), Conn::new(48_001));
    let cookie = Arc::new(Mutex::new(0u32));
    let (got, delta_cookie) = (cookie.clone(), cookie.clone());
    Scenario::new()
        .backends(1)
        .set("at most 1 half-open flow per app", cap(1))
        .row(
            Row::redirected(
                "a first SYN makes a flow",
                first.syn(),
                first.to_maglev_backend(),
            )
            .entries(2)
            .check("one half-open flow", |cx| assert_eq!(half_open(cx), 1)),
        )
        .row(
            Row::sent_back(
                "the next SYN is answered with a cookie",
                syn_with_mss(c),
                Out::Any,
            )
            .entries(0)
            .counter(GlobalStat::SynCookiesSent, 1..=1)
            .counter(GlobalStat::FlowsCreated, 0..=0)
            .check("a valid cookie, no state", move |cx| {
                *got.lock().unwrap() = cookie_of(cx, c);
                assert_eq!(half_open(cx), 1);
            }),
        )
        .row(
            Row::redirected("its retransmission too", syn_with_mss(c), Out::Any)
                .entries(0)
                .counter(GlobalStat::SynCookiesSent, 1..=1),
        )
        .row(
            Row::redirected(
                "the client's ACK of the cookie becomes the SYN to the backend",
                cookie_ack(c, &cookie, |_| {}),
                Out::Any,
            )
            .entries(2)
            .counter(GlobalStat::SynCookiesAccepted, 1..=1)
            .counter(GlobalStat::FlowsCreated, 1..=1)
            .check(
                "a SYN to the backend from a SNAT port, the client's ISN and MSS",
                move |cx| {
                    let r = c.rewrite(cx);
                    let p = parse_checked(&cx.output);
                    let t = tcp_of(&cx.output);
                    assert_eq!(p.tcp_flags, flags::SYN);
                    assert_eq!((p.src, p.dst), (r.snat, r.backend));
                    assert_eq!((t.seq, t.ack), (CLIENT_ISN, 0));
                    assert_eq!(t.window, CLIENT_WINDOW);
                    assert_eq!(t.options, mss_option(1300));
                    assert!(p.payload.is_empty());
                    let (fwd, rev) = (cx.flow(c.key()), cx.flow(c.reverse_key(cx)));
                    for e in [fwd, rev] {
                        assert_eq!(e.track & TRACK_PROXIED, TRACK_PROXIED, "proxied");
                        assert_eq!(e.state, CT_SYN_SEEN);
                    }
                    assert_eq!(half_open(cx), 1, "a proxied flow is not half-open");
                },
            ),
        )
        .row(
            Row::sent_back(
                "the backend's SYN-ACK is answered with the handshake's ACK",
                backend_syn_ack(c).map(|mut f| {
                    f.tcp_options = mss_option(1460);
                    f
                }),
                Out::Any,
            )
            .counter(GlobalStat::SynProxyEstablished, 1..=1)
            .check("an ACK back to the backend; established", move |cx| {
                let r = c.rewrite(cx);
                let p = parse_checked(&cx.output);
                let t = tcp_of(&cx.output);
                assert_eq!(p.tcp_flags, flags::ACK);
                assert_eq!((p.src, p.dst), (r.snat, r.backend));
                assert_eq!(
                    (t.seq, t.ack),
                    (CLIENT_ISN.wrapping_add(1), BACKEND_ISN.wrapping_add(1))
                );
                assert_eq!(t.window, CLIENT_WINDOW);
                let cookie = *delta_cookie.lock().unwrap();
                for e in [cx.flow(c.key()), cx.flow(c.reverse_key(cx))] {
                    assert_eq!(
                        e.state & (CT_SYN_ACK_SEEN | CT_ESTABLISHED),
                        CT_SYN_ACK_SEEN | CT_ESTABLISHED
                    );
                    assert_eq!(e.seq_delta, BACKEND_ISN.wrapping_sub(cookie));
                }
            }),
        )
        .row(
            Row::sent_back(
                "a retransmitted SYN-ACK is answered again",
                backend_syn_ack(c),
                Out::Any,
            )
            .counter(GlobalStat::SynProxyEstablished, 0..=0),
        )
        .row(Row::dropped(
            "a SYN-ACK with another ISN is not",
            backend_syn_ack(c).map(|mut f| {
                f.seq = BACKEND_ISN ^ 0x8000;
                f
            }),
            DropReason::OutOfWindow,
        ))
        .row(
            Row::redirected(
                "the client's data: its ack translated to the backend's numbers",
                cookie_ack(c, &cookie, |f| {
                    f.tcp_flags = flags::ACK | flags::PSH;
                    f.payload = b"request".to_vec();
                }),
                c.to_its_backend(),
            )
            .check("ack = the backend's ISN + 1", |cx| {
                assert_eq!(tcp_of(&cx.output).ack, BACKEND_ISN.wrapping_add(1))
            }),
        )
        .row({
            let cookie = cookie.clone();
            Row::redirected(
                "the backend's data: its seq translated to the cookie's numbers",
                Input::with(move |cx| {
                    let r = c.rewrite(cx);
                    let mut f =
                        from_backend(r.backend_index, r.backend, r.snat, flags::ACK | flags::PSH);
                    f.seq = BACKEND_ISN.wrapping_add(1);
                    f.ack = CLIENT_ISN.wrapping_add(1 + 7);
                    f.window = 500;
                    f.payload = b"response".to_vec();
                    f
                }),
                c.to_client(),
            )
            .check("seq = the cookie + 1", move |cx| {
                assert_eq!(
                    tcp_of(&cx.output).seq,
                    cookie.lock().unwrap().wrapping_add(1)
                )
            })
        })
}

fn forged_or_corrupted_cookie_acks_make_nothing() -> Scenario {
    let (first, c, other) = (Conn::new(48_100), Conn::new(48_101), Conn::new(48_102));
    let cookie = Arc::new(Mutex::new(0u32));
    let got = cookie.clone();
    let with_ip_options = |c: Conn| Frame {
        ip_options: vec![1, 1, 1, 0],
        ..syn_with_mss(c)
    };
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
            Row::sent_back("a cookie", syn_with_mss(c), Out::Any).check("kept", move |cx| {
                *got.lock().unwrap() = cookie_of(cx, c);
            }),
        )
        .row(
            Row::dropped(
                "a SYN with IPv4 options cannot have a cookie",
                with_ip_options(other),
                DropReason::HalfOpenFull,
            )
            .entries(0),
        )
        .rows(
            [
                (
                    "an ACK of the cookie + 1",
                    cookie_ack(c, &cookie, |f| f.ack = f.ack.wrapping_add(1)),
                ),
                (
                    "an ACK of the cookie with another ISN",
                    cookie_ack(c, &cookie, |f| f.seq = f.seq.wrapping_add(1)),
                ),
                (
                    "the cookie from another client port",
                    cookie_ack(c, &cookie, |f| f.src.set_port(f.src.port() + 1)),
                ),
                (
                    "the cookie with another MSS index",
                    cookie_ack(c, &cookie, |f| f.ack ^= 1 << 28),
                ),
            ]
            .into_iter()
            .map(|(name, input)| {
                Row::redirected(name, input, Out::Any)
                    .entries(0)
                    .counter(GlobalStat::SynCookiesAccepted, 0..=0)
                    .counter(GlobalStat::RstNoFlow, 1..=1)
                    .check("answered with an RST, as an ACK without a flow", |cx| {
                        assert_eq!(parse_checked(&cx.output).tcp_flags, flags::RST)
                    })
            }),
        )
        .row(
            Row::dropped(
                "the right cookie with a wrong TCP checksum",
                cookie_ack(c, &cookie, |_| {}).spoiled(|bytes| {
                    let n = bytes.len();
                    bytes[n - 1] ^= 0xff; // urgent pointer's low byte: the checksum no longer holds
                }),
                DropReason::BadChecksum,
            )
            .entries(0)
            .counter(GlobalStat::SynCookiesAccepted, 0..=0),
        )
        .row(
            Row::redirected(
                "the right cookie makes the flow",
                cookie_ack(c, &cookie, |_| {}),
                Out::Any,
            )
            .entries(2)
            .counter(GlobalStat::SynCookiesAccepted, 1..=1),
        )
}

fn a_completed_handshake_frees_its_half_open_slot() -> Scenario {
    let (a, b) = (Conn::new(48_200), Conn::new(48_201));
    Scenario::new()
        .backends(1)
        .set("at most 1 half-open flow per app", cap(1))
        .row(Row::redirected("SYN", a.syn(), a.to_maglev_backend()).entries(2))
        .row(Row::redirected(
            "SYN-ACK",
            a.reply(flags::SYN | flags::ACK),
            a.to_client(),
        ))
        .row(
            Row::redirected("ACK", a.send(flags::ACK), a.to_its_backend())
                .check("no half-open flow left", |cx| assert_eq!(half_open(cx), 0)),
        )
        .row(
            Row::redirected(
                "another SYN makes a flow, no cookie",
                b.syn(),
                b.to_maglev_backend(),
            )
            .entries(2)
            .counter(GlobalStat::SynCookiesSent, 0..=0),
        )
}

/// A backend that refuses the proxy's SYN (its port closed): the client, established since its
/// cookie's ACK, gets the reset at the cookie + 1 (where it expects it: ECONNRESET), not at the
/// backend's 0 (which it would ignore, and hang); the flow is closed.
fn a_backend_refusing_the_proxys_syn_resets_the_client() -> Scenario {
    let (first, c) = (Conn::new(48_300), Conn::new(48_301));
    let cookie = Arc::new(Mutex::new(0u32));
    let (got, want) = (cookie.clone(), cookie.clone());
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
            Row::sent_back("a cookie", syn_with_mss(c), Out::Any).check("kept", move |cx| {
                *got.lock().unwrap() = cookie_of(cx, c);
            }),
        )
        .row(
            Row::redirected(
                "the cookie's ACK: the SYN to the backend",
                cookie_ack(c, &cookie, |_| {}),
                Out::Any,
            )
            .entries(2),
        )
        .row(
            Row::redirected(
                "the backend's RST+ACK refusing it",
                Input::with(move |cx| {
                    let r = c.rewrite(cx);
                    let mut f =
                        from_backend(r.backend_index, r.backend, r.snat, flags::RST | flags::ACK);
                    f.seq = 0;
                    f.ack = CLIENT_ISN.wrapping_add(1);
                    f
                }),
                c.to_client(),
            )
            .check("at the cookie + 1; the flow closed", move |cx| {
                assert_eq!(tcp_of(&cx.output).seq, want.lock().unwrap().wrapping_add(1));
                assert_eq!(cx.flow(c.key()).state & CT_RST, CT_RST);
            }),
        )
}

/// The SYN-ACK with a cookie in `cx.output`, for `c`'s SYN with ISN `isn`: its cookie.
fn cookie_for(cx: &Ctx, c: Conn, isn: u32) -> u32 {
    let p = parse_checked(&cx.output);
    let t = tcp_of(&cx.output);
    assert_eq!(p.tcp_flags, flags::SYN | flags::ACK, "a SYN-ACK");
    assert_eq!((p.src, p.dst), (c.service, c.client), "back to the client");
    assert_eq!((t.ack, t.window), (isn.wrapping_add(1), 0));
    t.seq
}

/// A cookie's proxied flow for `c`, in rows: `first`'s SYN takes app 1's only half-open slot,
/// `c`'s SYN gets a cookie (kept in the returned cell), its ACK makes the flow and becomes the
/// SYN to the backend.
fn proxied_flow(first: Conn, c: Conn) -> (Scenario, Arc<Mutex<u32>>) {
    let (s, cookie) = at_cap(first, c);
    let s = s.row(
        Row::redirected(
            "its ACK: the SYN to the backend",
            cookie_ack(c, &cookie, |_| {}),
            Out::Any,
        )
        .entries(2),
    );
    (s, cookie)
}

/// App 1 at its cap of one half-open flow (`first`'s), and `c` given a cookie (kept in the
/// returned cell).
fn at_cap(first: Conn, c: Conn) -> (Scenario, Arc<Mutex<u32>>) {
    let cookie = Arc::new(Mutex::new(0u32));
    let got = cookie.clone();
    let s = Scenario::new()
        .backends(1)
        .set("at most 1 half-open flow per app", cap(1))
        .row(Row::redirected("a first SYN", first.syn(), first.to_maglev_backend()).entries(2))
        .row(
            Row::sent_back("a cookie", syn_with_mss(c), Out::Any)
                .check("kept", move |cx| *got.lock().unwrap() = cookie_of(cx, c)),
        );
    (s, cookie)
}

/// A client's new connection from the port of its closed one, while its app is at the cap:
/// the SYN starts the closed flow over (as it would below the cap), so the cookie's ACK makes
/// the new flow (the closed pair goes with the cookie's SYN-ACK). Before the fix the closed
/// pair stayed, and the cookie's ACK was taken for a segment of the closed flow: dropped
/// out_of_window. A client whose ephemeral port comes round within the closed timeout (10 s; 60
/// s when the backend closed first, as HTTP servers do) could not connect during a flood.
fn a_flow_started_over_at_the_cap_completes_through_the_proxy() -> Scenario {
    const ISN: u32 = CLIENT_ISN ^ 0x4000_0000;
    let (c, other) = (Conn::new(48_300), Conn::new(48_310));
    let cookie = Arc::new(Mutex::new(0u32));
    let got = cookie.clone();
    Scenario::new()
        .backends(1)
        .set("at most 1 half-open flow per app", cap(1))
        .row(Row::redirected("SYN", c.syn(), c.to_maglev_backend()).entries(2))
        .row(
            Row::redirected(
                "refused by the backend: the flow is closed (and no longer half-open)",
                c.reply(flags::RST | flags::ACK),
                c.to_client(),
            )
            .check("closed", move |cx| {
                assert_ne!(cx.state(c.key()) & CT_RST, 0)
            }),
        )
        .row(
            Row::redirected(
                "another client's SYN takes the app's one half-open slot",
                other.syn(),
                other.to_maglev_backend(),
            )
            .entries(2),
        )
        .row(
            Row::sent_back(
                "a new connection from the same port: a cookie",
                Frame {
                    seq: ISN,
                    ..c.syn()
                },
                Out::Any,
            )
            .entries(-2)
            .check("kept", move |cx| {
                *got.lock().unwrap() = cookie_for(cx, c, ISN)
            }),
        )
        .row(
            Row::redirected(
                "its ACK makes the new flow and becomes the SYN to the backend",
                Input::with(move |_| {
                    let mut f = from_client(c.client, c.service, flags::ACK);
                    f.seq = ISN.wrapping_add(1);
                    f.ack = cookie.lock().unwrap().wrapping_add(1);
                    f
                }),
                Out::Any,
            )
            .entries(2)
            .counter(GlobalStat::SynCookiesAccepted, 1..=1)
            .check("a SYN with the new ISN", |cx| {
                let p = parse_checked(&cx.output);
                assert_eq!(p.tcp_flags, flags::SYN);
                assert_eq!(tcp_of(&cx.output).seq, ISN);
            }),
        )
}

/// A backend that refuses the proxy's SYN (its port closed): its RST|ACK (`seq` 0, `ack` the
/// client's ISN + 1, as Linux sends it) must reach the client at the sequence number the
/// client expects, the cookie + 1, or the client's TCP drops it as out of its window and waits
/// on its zero window (its probes are then dropped: the flow is closed) instead of failing
/// with ECONNREFUSED. netfilter's SYNPROXY moves such an RST to the cookie + 1 (`seqadj` in
/// `ipv4_synproxy_hook`). Before the fix it went out with `seq` 0.
fn a_backends_refusal_reaches_the_client_in_its_numbers() -> Scenario {
    let (first, c) = (Conn::new(48_400), Conn::new(48_401));
    let (s, cookie) = proxied_flow(first, c);
    s.row(
        Row::redirected(
            "the backend's RST reaches the client",
            Input::with(move |cx| {
                let r = c.rewrite(cx);
                let mut f =
                    from_backend(r.backend_index, r.backend, r.snat, flags::RST | flags::ACK);
                f.seq = 0;
                f.ack = CLIENT_ISN.wrapping_add(1);
                f.window = 0;
                f
            }),
            c.to_client(),
        )
        .check("at the cookie + 1", move |cx| {
            assert_eq!(
                tcp_of(&cx.output).seq,
                cookie.lock().unwrap().wrapping_add(1)
            )
        }),
    )
}

/// The backend's SYN-ACK to the proxy's SYN is not forwarded but answered, and the first one
/// fixes `seq_delta` for good: one with a wrong TCP checksum (its ISN may be what is wrong)
/// must be dropped as a SYN with one is, not answered. Before the fix it was answered and fixed the
/// delta; the backend then takes the gateway's ACK for a wrong one and resets.
fn a_corrupted_syn_ack_fixes_no_proxied_flow() -> Scenario {
    let (first, c) = (Conn::new(48_500), Conn::new(48_501));
    let (s, _) = proxied_flow(first, c);
    s.row(
        Row::dropped(
            "a SYN-ACK with a wrong checksum",
            backend_syn_ack(c).spoiled(|bytes| {
                let n = bytes.len();
                bytes[n - 1] ^= 0xff; // urgent pointer's low byte: the checksum no longer holds
            }),
            DropReason::BadChecksum,
        )
        .counter(GlobalStat::SynProxyEstablished, 0..=0)
        .check("nothing fixed", move |cx| {
            assert_eq!(cx.flow(c.key()).state & CT_ESTABLISHED, 0)
        }),
    )
}

/// A backend RST refusing the proxy's SYN that expires on the way (TTL 1) is dropped, and
/// changes nothing: the SYN the client's next ACK carries again goes out with `ack` 0. Found by
/// the fuzzer: the refusal's `seq_delta` was set before the TTL check, and the SYN sent again
/// had its `ack` field "translated" by it.
fn a_refusal_dropped_for_its_ttl_changes_no_numbers() -> Scenario {
    let (first, c) = (Conn::new(48_600), Conn::new(48_601));
    let (s, cookie) = proxied_flow(first, c);
    s.row(
        Row::dropped(
            "the backend's RST+ACK with TTL 1",
            Input::with(move |cx| {
                let r = c.rewrite(cx);
                let mut f =
                    from_backend(r.backend_index, r.backend, r.snat, flags::RST | flags::ACK);
                f.seq = 0x57e6_36a0;
                f.ack = CLIENT_ISN.wrapping_add(1);
                f.ttl = 1;
                f
            }),
            DropReason::TtlExceeded,
        )
        .check("no numbers changed", move |cx| {
            assert_eq!(cx.flow(c.key()).seq_delta, 0)
        }),
    )
    .row(
        Row::redirected(
            "the client's ACK again: the SYN to the backend, ack 0",
            cookie_ack(c, &cookie, |_| {}),
            Out::Any,
        )
        .check("a SYN with ack 0", |cx| {
            assert_eq!(parse_checked(&cx.output).tcp_flags, flags::SYN);
            assert_eq!(tcp_of(&cx.output).ack, 0);
        }),
    )
}

// Found by the review of issue 15 (each failed on 36adf0b).

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
    let (s, cookie) = at_cap(first, c);
    s.row(
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
    let (s, cookie) = at_cap(first, c);
    s.row(
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
    let (s, cookie) = at_cap(first, c);
    s.row(
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
            backend_syn_ack(c),
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

/// ICMP errors about a proxied flow's packets (issue 16): the quoted numbers go back to what
/// the quoted packet's sender sent. The backend's segment lost `seq_delta` on its way to the
/// client: a frag-needed quoting it reaches the backend with the backend's own `seq` (its TCP
/// ignores an error whose `seq` is outside what it has in flight, RFC 5927 §4.1: without this,
/// path MTU discovery fails on every connection made during a flood). The client's segment's
/// `ack` gained the delta: an error quoting it reaches the client with the client's `ack`.
fn icmp_errors_about_a_proxied_flow_quote_each_ends_own_numbers() -> Scenario {
    use gateway_tests::icmp::{
        BACKEND_ROUTER, CLIENT_ROUTER, RFC792, RFC1812, Side, error_about_last, frag_needed,
        translated,
    };
    const FULL: [u8; 1460] = [0x5a; 1460];
    let (first, c) = (Conn::new(48_900), Conn::new(48_901));
    let (s, cookie) = proxied_flow(first, c);
    s.row(Row::sent_back(
        "the backend's SYN-ACK",
        backend_syn_ack(c),
        Out::Any,
    ))
    .row(Row::redirected(
        "the client's full-sized segment: its ack gains the delta",
        cookie_ack(c, &cookie, |f| {
            f.tcp_flags = flags::ACK | flags::PSH;
            f.payload = FULL.to_vec();
        }),
        c.to_its_backend(),
    ))
    .row(
        Row::redirected(
            "frag needed quoting 576 bytes of it: to the client, with the client's ack",
            error_about_last(c, Side::Backend, BACKEND_ROUTER, frag_needed(), RFC1812),
            translated(c, Side::Client, *c.service.ip(), frag_needed(), RFC1812),
        )
        .counter(GlobalStat::IcmpFragNeeded, 1..=1),
    )
    .row(Row::redirected(
        "the backend's full-sized segment: its seq loses the delta",
        Input::with(move |cx| {
            let r = c.rewrite(cx);
            let mut f = from_backend(r.backend_index, r.backend, r.snat, flags::ACK | flags::PSH);
            f.seq = BACKEND_ISN.wrapping_add(1);
            f.ack = CLIENT_ISN.wrapping_add(1 + FULL.len() as u32);
            f.payload = FULL.to_vec();
            f
        }),
        c.to_client(),
    ))
    .row(
        Row::redirected(
            "frag needed quoting 8 bytes of it: to the backend, with the backend's seq",
            error_about_last(c, Side::Client, CLIENT_ROUTER, frag_needed(), RFC792),
            translated(c, Side::Backend, Topology::SNAT_IP, frag_needed(), RFC792),
        )
        .counter(GlobalStat::IcmpFragNeeded, 1..=1),
    )
}

/// An app with an MSS clamp at its cap of half-open flows (issue 16): the client's MSS (1460)
/// goes into the cookie, and comes back out of it as the MSS of the proxy's SYN to the backend.
/// The cookie's SYN-ACK is clamped as it leaves; the SYN to the backend must be too (first
/// sent, and sent again at the client's zero-window probe), or the backend sends the client
/// segments of 1460 bytes through the path the clamp is there for.
///
/// Failed before the fix at rows "the cookie's ACK: ..." and "the client's zero-window probe:
/// ...": the SYN to the backend carried MSS 1460 (the packet function marked the segment for
/// the clamp by the flags of the client's ACK it was written over, not of the SYN it became).
fn an_apps_mss_clamp_holds_for_the_proxys_syn_to_the_backend() -> Scenario {
    const CLAMP: u16 = 1360;
    let (first, c) = (Conn::new(49_600), Conn::new(49_601));
    let cookie = Arc::new(Mutex::new(0u32));
    let got = cookie.clone();
    let syn_1460 = Frame {
        tcp_options: mss_option(1460),
        ..c.syn()
    };
    let a_clamped_syn = |cx: &Ctx| {
        assert_eq!(parse_checked(&cx.output).tcp_flags, flags::SYN, "a SYN");
        assert_eq!(
            tcp_of(&cx.output).options,
            mss_option(CLAMP),
            "its MSS option"
        );
    };
    Scenario::new()
        .backends(1)
        .set("at most 1 half-open flow per app", cap(1))
        .set(
            "app 1 clamps the MSS to 1360",
            app_config(AppConfig {
                mss_clamp: CLAMP,
                ..AppConfig::default()
            }),
        )
        .row(Row::redirected("a first SYN", first.syn(), first.to_maglev_backend()).entries(2))
        .row(
            Row::sent_back("a SYN offering 1460 gets a cookie", syn_1460, Out::Any)
                .counter(GlobalStat::MssClamped, 1..=1)
                .check("its SYN-ACK clamped", move |cx| {
                    *got.lock().unwrap() = cookie_for(cx, c, CLIENT_ISN);
                    assert_eq!(tcp_of(&cx.output).options, mss_option(CLAMP));
                }),
        )
        .row(
            Row::redirected(
                "the cookie's ACK: the SYN to the backend, clamped",
                client_ack(c, &cookie, CLIENT_ISN.wrapping_add(1), flags::ACK),
                Out::Any,
            )
            .entries(2)
            .counter(GlobalStat::MssClamped, 1..=1)
            .check("MSS 1360", a_clamped_syn),
        )
        .row(
            Row::redirected(
                "the client's zero-window probe: the SYN again, clamped",
                client_ack(c, &cookie, CLIENT_ISN, flags::ACK),
                Out::Any,
            )
            .counter(GlobalStat::MssClamped, 1..=1)
            .check("MSS 1360", a_clamped_syn),
        )
}

/// An app whose backends are told the client's address (issue 17), at its cap: the cookie's
/// SYN-ACK announces the cookie's MSS less the option's 8 bytes, and the ACK that answers the
/// backend's SYN-ACK (the segment that makes the backend's end) carries the client's address;
/// the client's segments carry it too until a segment of the backend's shows its end made.
fn the_proxys_ack_tells_the_backend_the_client_address() -> Scenario {
    let (first, c) = (Conn::new(48_400), Conn::new(48_401));
    let cookie = Arc::new(Mutex::new(0u32));
    let got = cookie.clone();
    let client = toa::option(ip_to_net(*c.client.ip()), port_to_net(c.client.port())).to_vec();
    let ours = client.clone();
    let again = client.clone();
    Scenario::new()
        .backends(1)
        .set(
            "app 1 tells its backends the client's address",
            app_config(AppConfig {
                flags: APP_CLIENT_ADDRESS_TOA,
                ..AppConfig::default()
            }),
        )
        .set("at most 1 half-open flow per app", cap(1))
        .row(Row::redirected("a first SYN", first.syn(), first.to_maglev_backend()).entries(2))
        .row(Row::sent_back("a cookie", syn_with_mss(c), Out::Any).check(
            "its MSS 8 bytes below the cookie's 1300",
            move |cx| {
                let t = tcp_of(&cx.output);
                assert_eq!(t.options, mss_option(1292));
                *got.lock().unwrap() = t.seq;
            },
        ))
        .row(
            Row::redirected(
                "its ACK: the SYN to the backend, without the option",
                cookie_ack(c, &cookie, |_| {}),
                Out::Any,
            )
            .entries(2)
            .counter(GlobalStat::ToaAdded, 0..=0)
            .check("a SYN with the cookie's MSS", |cx| {
                assert_eq!(tcp_of(&cx.output).options, mss_option(1300))
            }),
        )
        .row(
            Row::sent_back(
                "the backend's SYN-ACK: answered with the ACK that carries the address",
                backend_syn_ack(c),
                Out::Any,
            )
            .counter(GlobalStat::ToaAdded, 1..=1)
            .check("the ACK, with the client's address", move |cx| {
                let p = parse_checked(&cx.output);
                assert_eq!(p.tcp_flags, flags::ACK);
                assert_eq!(tcp_of(&cx.output).options, ours);
                assert_eq!(cx.flow(c.key()).toa, TOA_PENDING | TOA_ADD);
            }),
        )
        .row(
            Row::redirected(
                "the client's request before the backend's first segment",
                c.send(flags::ACK | flags::PSH).map(|f| f.payload(b"GET /")),
                c.to_its_backend(),
            )
            .counter(GlobalStat::ToaAdded, 1..=1)
            .check("with it", move |cx| {
                assert_eq!(tcp_of(&cx.output).options, again)
            }),
        )
}
