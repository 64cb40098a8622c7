//! The client's address for the backend (issue 17: `gateway app create --client-address toa`),
//! through BPF_PROG_TEST_RUN in both attach modes, as scenarios (see `gateway_tests::scenario`):
//! while the backend has sent nothing but its SYN-ACK, each client segment of such an app
//! reaches the backend with one TOA option (kind 254, length 8, the client's port and IPv4
//! address) after its own options, its checksums right (verified from scratch by `Out::Nat`),
//! its payload as it was; a lost handshake ACK is made up for by the next segment; the MSS the
//! client learns from the SYN-ACK is 8 bytes lower; a TOA option a client sent itself never
//! reaches a backend, in any app; a header without room, or a segment the option would make
//! too large for the egress link, goes on without it; apps without the setting are untouched.

use std::net::SocketAddrV4;

use gateway_common::{
    GlobalStat,
    maps::{APP_CLIENT_ADDRESS_TOA, AppConfig, TOA_ADD, TOA_PENDING},
    net::{ip_to_net, port_to_net, toa},
};
use gateway_tests::{
    packet::{
        ETH_LEN, Frame, flags, mss_of, mss_option, parse_checked, tcp_options, wscale_option,
    },
    scenario::{Conn, Ctx, Input, Out, Row, Scenario, app_config},
    scenario_tests,
};

scenario_tests! {
    the_segments_that_may_make_the_backends_end_carry_the_client_address,
    a_lost_handshake_ack_is_made_up_for_by_the_next_segment,
    a_clients_own_toa_options_never_reach_a_backend,
    an_app_without_the_setting_is_told_nothing,
    without_room_in_the_header_or_on_the_link_the_segment_goes_on_without_it,
    a_frag_needed_about_a_grown_segment_tells_the_client_8_bytes_less,
    a_backend_still_in_syn_recv_acknowledging_only_the_syn_has_not_made_its_end,
}

/// App 1 with `--client-address toa` (`on`) or without.
fn client_address(on: bool) -> impl FnOnce(&mut Ctx) + Send + 'static {
    app_config(AppConfig {
        flags: if on { APP_CLIENT_ADDRESS_TOA } else { 0 },
        ..AppConfig::default()
    })
}

/// The TOA option telling `c`'s client address.
fn toa_of(c: Conn) -> Vec<u8> {
    toa::option(ip_to_net(*c.client.ip()), port_to_net(c.client.port())).to_vec()
}

/// A forged TOA option: a client claiming to be `addr`.
fn forged(addr: SocketAddrV4) -> Vec<u8> {
    toa::option(ip_to_net(*addr.ip()), port_to_net(addr.port())).to_vec()
}

/// A timestamps option as Linux lays it out (NOP, NOP, kind 8 length 10).
fn timestamps() -> Vec<u8> {
    vec![1, 1, 8, 10, 0, 0, 0x12, 0x34, 0, 0, 0x56, 0x78]
}

/// NOPs.
fn nops(n: usize) -> Vec<u8> {
    vec![1; n]
}

/// The row's output has exactly these TCP options.
fn leaves_with(row: Row, options: Vec<u8>) -> Row {
    row.check("the options out", move |cx| {
        assert_eq!(tcp_options(&cx.output), options, "TCP options out")
    })
}

/// `c`'s segment `flags` with `options` (and `payload`).
fn send(c: Conn, tcp_flags: u8, options: Vec<u8>, payload: &'static [u8]) -> Input {
    c.send(tcp_flags).map(move |f| Frame {
        tcp_options: options,
        ..f.payload(payload)
    })
}

/// `c`'s SYN offering MSS 1460 and window scaling, and its backend's SYN-ACK offering 1460:
/// the flow, pending; the SYN-ACK's MSS out is `syn_ack_mss`.
fn opened(c: Conn, syn_ack_mss: u16) -> Vec<Row> {
    vec![
        Row::redirected(
            "SYN (MSS 1460): to the backend as it came",
            Frame {
                tcp_options: [mss_option(1460), wscale_option(7)].concat(),
                ..c.syn()
            },
            c.to_maglev_backend(),
        )
        .entries(2)
        .counter(GlobalStat::ToaAdded, 0..=0)
        .check("MSS 1460 to the backend", |cx| {
            assert_eq!(mss_of(&cx.output), Some(1460))
        }),
        Row::redirected(
            "SYN-ACK (MSS 1460)",
            c.reply(flags::SYN | flags::ACK).map(|mut f| {
                f.tcp_options = [mss_option(1460), wscale_option(7)].concat();
                f
            }),
            c.to_client(),
        )
        .check("the MSS the client learns", move |cx| {
            assert_eq!(mss_of(&cx.output), Some(syn_ack_mss))
        }),
    ]
}

/// App 1 with `--client-address toa`.
fn with_address() -> Scenario {
    Scenario::new().set(
        "app 1 tells its backends the client's address",
        client_address(true),
    )
}

/// `c`'s handshake's ACK (row `name`), to its backend with the client's address.
fn acked(c: Conn, name: &str) -> Row {
    leaves_with(
        Row::redirected(name, c.send(flags::ACK), c.to_its_backend()),
        toa_of(c),
    )
}

/// Both entries of `c`'s flow have these `toa` bits.
fn toa_bits(c: Conn, bits: u8) -> impl FnOnce(&Ctx) + Send + 'static {
    move |cx| {
        assert_eq!(cx.flow(c.key()).toa, bits, "forward entry's toa bits");
        assert_eq!(
            cx.flow(c.reverse_key(cx)).toa,
            bits,
            "reverse entry's toa bits"
        );
    }
}

fn the_segments_that_may_make_the_backends_end_carry_the_client_address() -> Scenario {
    let a = Conn::new(46_001);
    with_address()
        .rows(opened(a, 1452))
        .check("pending, adding", toa_bits(a, TOA_PENDING | TOA_ADD))
        .row(
            acked(a, "the handshake's ACK")
                .counter(GlobalStat::ToaAdded, 1..=1)
                .counter(GlobalStat::ToaStripped, 0..=0),
        )
        .row(leaves_with(
            Row::redirected(
                "a request with timestamps, before the backend said anything",
                send(
                    a,
                    flags::ACK | flags::PSH,
                    timestamps(),
                    b"GET / HTTP/1.0\r\n\r\n",
                ),
                a.to_its_backend(),
            )
            .counter(GlobalStat::ToaAdded, 1..=1),
            [timestamps(), toa_of(a)].concat(),
        ))
        .row(
            Row::redirected(
                "the backend acknowledges the request: its end is made",
                a.reply(flags::ACK),
                a.to_client(),
            )
            .check("done with it", toa_bits(a, 0)),
        )
        .row(leaves_with(
            Row::redirected(
                "the client's next segment goes on as it came",
                send(a, flags::ACK | flags::PSH, timestamps(), b"more"),
                a.to_its_backend(),
            )
            .counter(GlobalStat::ToaAdded, 0..=0),
            timestamps(),
        ))
}

fn a_lost_handshake_ack_is_made_up_for_by_the_next_segment() -> Scenario {
    let a = Conn::new(46_011);
    with_address()
        .rows(opened(a, 1452))
        .row(acked(a, "the handshake's ACK (lost after the gateway)"))
        .row(
            Row::redirected(
                "the backend, in SYN-RECV, sends its SYN-ACK again",
                a.reply(flags::SYN | flags::ACK),
                a.to_client(),
            )
            .check("still pending", toa_bits(a, TOA_PENDING | TOA_ADD)),
        )
        .row(acked(a, "the client's ACK of it").counter(GlobalStat::ToaAdded, 1..=1))
        .row(leaves_with(
            Row::redirected(
                "its request, with data",
                send(a, flags::ACK | flags::PSH, Vec::new(), b"PING\r\n"),
                a.to_its_backend(),
            )
            .counter(GlobalStat::ToaAdded, 1..=1),
            toa_of(a),
        ))
        .row(leaves_with(
            Row::redirected(
                "a FIN before any answer",
                send(a, flags::ACK | flags::FIN, Vec::new(), b""),
                a.to_its_backend(),
            ),
            toa_of(a),
        ))
}

fn a_clients_own_toa_options_never_reach_a_backend() -> Scenario {
    let (a, b, c, d, e, f) = (
        Conn::new(46_021),
        Conn::new(46_022),
        Conn::new(46_023),
        Conn::new(46_024),
        Conn::new(46_025),
        Conn::new(46_026),
    );
    let liar: SocketAddrV4 = "203.0.113.66:4242".parse().unwrap();
    with_address()
        .rows(opened(a, 1452))
        .row(leaves_with(
            Row::redirected(
                "an ACK claiming another address: the gateway's takes its place",
                send(a, flags::ACK, forged(liar), b""),
                a.to_its_backend(),
            )
            .counter(GlobalStat::ToaStripped, 1..=1)
            .counter(GlobalStat::ToaAdded, 1..=1),
            toa_of(a),
        ))
        .rows(opened(b, 1452))
        .row(leaves_with(
            Row::redirected(
                "two claims after timestamps: the first replaced, the second NOPs",
                send(
                    b,
                    flags::ACK,
                    [timestamps(), forged(liar), forged(liar)].concat(),
                    b"data",
                ),
                b.to_its_backend(),
            )
            .counter(GlobalStat::ToaStripped, 2..=2),
            [timestamps(), toa_of(b), nops(8)].concat(),
        ))
        .rows(opened(c, 1452))
        .row(leaves_with(
            Row::redirected(
                "a claim behind an End of Option List: NOPs, then the gateway's",
                send(
                    c,
                    flags::ACK,
                    [vec![1, 1, 1, 0], forged(liar)].concat(),
                    b"",
                ),
                c.to_its_backend(),
            ),
            [nops(12), toa_of(c)].concat(),
        ))
        .rows(opened(d, 1452))
        .row(leaves_with(
            Row::redirected(
                "a claim behind a malformed option (length 1): NOPs, then the gateway's",
                send(
                    d,
                    flags::ACK,
                    [vec![30, 1, 1, 1], forged(liar)].concat(),
                    b"",
                ),
                d.to_its_backend(),
            ),
            [nops(12), toa_of(d)].concat(),
        ))
        .row(
            Row::redirected(
                "d's backend answers (data)",
                d.reply(flags::ACK | flags::PSH)
                    .map(|f| f.payload(b"+OK\r\n")),
                d.to_client(),
            )
            .check("done with it", toa_bits(d, 0)),
        )
        .row(leaves_with(
            Row::redirected(
                "a claim once the backend's end is made: no one reads it then, left",
                send(d, flags::ACK, forged(liar), b""),
                d.to_its_backend(),
            )
            .counter(GlobalStat::ToaStripped, 0..=0),
            forged(liar),
        ))
        .row(leaves_with(
            Row::redirected(
                "a SYN claiming another address: NOPs, and no option of the gateway's",
                Frame {
                    tcp_options: [mss_option(1460), forged(liar)].concat(),
                    ..f.syn()
                },
                f.to_maglev_backend(),
            )
            .entries(2)
            .counter(GlobalStat::ToaStripped, 1..=1)
            .counter(GlobalStat::ToaAdded, 0..=0),
            [mss_option(1460), nops(8)].concat(),
        ))
        .set("app 1 without the setting", client_address(false))
        .rows(opened(e, 1460))
        .check("pending, not adding", toa_bits(e, TOA_PENDING))
        .row(leaves_with(
            Row::redirected(
                "an app without the setting: the claim becomes NOPs",
                send(e, flags::ACK, [timestamps(), forged(liar)].concat(), b""),
                e.to_its_backend(),
            )
            .counter(GlobalStat::ToaStripped, 1..=1)
            .counter(GlobalStat::ToaAdded, 0..=0),
            [timestamps(), nops(8)].concat(),
        ))
}

fn an_app_without_the_setting_is_told_nothing() -> Scenario {
    let (a, z) = (Conn::new(46_031), Conn::new(46_032));
    with_address()
        .rows(opened(z, 1452))
        .row(acked(
            z,
            "the control: with the setting, the ACK carries it",
        ))
        .set(
            "app 1 without the setting (on a live app)",
            client_address(false),
        )
        .rows(opened(a, 1460))
        .check("pending, not adding", toa_bits(a, TOA_PENDING))
        .row(leaves_with(
            Row::redirected(
                "the handshake's ACK",
                a.send(flags::ACK),
                a.to_its_backend(),
            )
            .counter(GlobalStat::ToaAdded, 0..=0),
            Vec::new(),
        ))
        .row(leaves_with(
            Row::redirected(
                "a request with timestamps",
                send(a, flags::ACK | flags::PSH, timestamps(), b"GET /"),
                a.to_its_backend(),
            )
            .counter(GlobalStat::ToaAdded, 0..=0)
            .counter(GlobalStat::ToaStripped, 0..=0),
            timestamps(),
        ))
        .row(leaves_with(
            Row::redirected(
                "a flow opened before the change keeps what it took at its SYN",
                send(z, flags::ACK | flags::PSH, Vec::new(), b"GET /"),
                z.to_its_backend(),
            )
            .counter(GlobalStat::ToaAdded, 1..=1),
            toa_of(z),
        ))
}

fn without_room_in_the_header_or_on_the_link_the_segment_goes_on_without_it() -> Scenario {
    let (a, b, c, d, e) = (
        Conn::new(46_041),
        Conn::new(46_042),
        Conn::new(46_043),
        Conn::new(46_044),
        Conn::new(46_045),
    );
    // A full-sized segment for the links' 1500-byte MTU: the option would make it 1508.
    static FULL: [u8; 1460] = [0x5a; 1460];
    static FITS: [u8; 1452] = [0x5a; 1452];
    with_address()
        .rows(opened(a, 1452))
        .row(leaves_with(
            Row::redirected(
                "36 bytes of options: no room for 8 more",
                send(a, flags::ACK, [timestamps(), nops(24)].concat(), b""),
                a.to_its_backend(),
            )
            .counter(GlobalStat::ToaSkipped, 1..=1)
            .counter(GlobalStat::ToaAdded, 0..=0),
            [timestamps(), nops(24)].concat(),
        ))
        .rows(opened(b, 1452))
        .row(leaves_with(
            Row::redirected(
                "32 bytes of options: the header's last 8",
                send(b, flags::ACK, [timestamps(), nops(20)].concat(), b""),
                b.to_its_backend(),
            )
            .counter(GlobalStat::ToaAdded, 1..=1),
            [timestamps(), nops(20), toa_of(b)].concat(),
        ))
        .rows(opened(c, 1452))
        .row(leaves_with(
            Row::redirected(
                "a 1500-byte segment (a client that ignored the MSS): too large with it",
                send(c, flags::ACK, Vec::new(), &FULL),
                c.to_its_backend(),
            )
            .counter(GlobalStat::ToaSkipped, 1..=1),
            Vec::new(),
        ))
        .row(leaves_with(
            Row::redirected(
                "1492 bytes: 1500 with it",
                send(c, flags::ACK, Vec::new(), &FITS),
                c.to_its_backend(),
            )
            .counter(GlobalStat::ToaAdded, 1..=1),
            toa_of(c),
        ))
        .rows(opened(e, 1452))
        .row(
            Row::redirected(
                "a bare ACK padded to Ethernet's 60 bytes (a NIC's padding after the IPv4 packet)",
                e.send(flags::ACK)
                    .spoiled(|bytes| bytes.extend_from_slice(&[0; 6])),
                Out::Any,
            )
            .counter(GlobalStat::ToaAdded, 1..=1)
            .check("grown before the padding, which still trails", move |cx| {
                assert_eq!(cx.output.len(), cx.input.len() + 8, "8 bytes more");
                let ip_len = usize::from(u16::from_be_bytes([cx.output[16], cx.output[17]]));
                let packet = &cx.output[..ETH_LEN + ip_len];
                assert_eq!(&cx.output[ETH_LEN + ip_len..], &[0; 6], "the padding");
                let p = parse_checked(packet);
                assert_eq!(p.tcp_flags, flags::ACK);
                assert!(p.payload.is_empty(), "no payload");
                assert_eq!(tcp_options(packet), toa_of(e));
            }),
        )
        .rows(opened(d, 1452))
        .row(leaves_with(
            Row::redirected(
                "an IPv4 header with options",
                send(d, flags::ACK, timestamps(), b"x").map(|f| Frame {
                    ip_options: vec![1, 1, 1, 0],
                    ..f
                }),
                d.to_its_backend(),
            )
            .counter(GlobalStat::ToaAdded, 1..=1),
            [timestamps(), toa_of(d)].concat(),
        ))
}

/// Review of issue 17: a socket in SYN-RECV does not send only SYN-ACKs. Linux's
/// `tcp_check_req` answers a segment outside the request's window (an old sequence number, or
/// a PAWS failure) with a bare ACK (`tcp_v4_reqsk_send_ack`: seq ISN + 1, ack the client's
/// ISN + 1, no data) and stays in SYN-RECV. A client that sends such a segment first makes the
/// backend send a non-SYN segment before its end exists; if that ends the flow's TOA treatment,
/// the client's next ACK, which does make the backend's end, goes on with the client's own
/// forged TOA option, and the agent (the source is the trusted SNAT address) believes it.
/// What proves the backend's end made: data, a FIN, or an acknowledgement of more than the SYN.
fn a_backend_still_in_syn_recv_acknowledging_only_the_syn_has_not_made_its_end() -> Scenario {
    let a = Conn::new(46_051);
    let liar: SocketAddrV4 = "203.0.113.66:4242".parse().unwrap();
    with_address()
        .rows(opened(a, 1452))
        .row(Row::redirected(
            "an ACK at the ISN (outside the backend's window: it answers with an ACK)",
            a.send(flags::ACK).map(|f| Frame {
                seq: f.seq.wrapping_sub(1),
                ..f
            }),
            a.to_its_backend(),
        ))
        .row(
            Row::redirected(
                "the backend in SYN-RECV: a bare ACK of the SYN only",
                a.reply(flags::ACK),
                a.to_client(),
            )
            .check("still pending", toa_bits(a, TOA_PENDING | TOA_ADD)),
        )
        .row(
            Row::redirected(
                "its listener's RST to an ACK of a wrong number (in the window, not exact)",
                a.reply(flags::RST).map(|f| Frame {
                    seq: f.seq.wrapping_add(1),
                    ..f
                }),
                a.to_client(),
            )
            .counter(GlobalStat::RstInWindow, 1..=1)
            .check("still pending", toa_bits(a, TOA_PENDING | TOA_ADD)),
        )
        .row(leaves_with(
            Row::redirected(
                "the ACK that makes the backend's end, claiming another address",
                send(a, flags::ACK, forged(liar), b""),
                a.to_its_backend(),
            )
            .counter(GlobalStat::ToaStripped, 1..=1)
            .counter(GlobalStat::ToaAdded, 1..=1),
            toa_of(a),
        ))
        .row(
            Row::redirected(
                "the backend's first data (a banner)",
                a.reply(flags::ACK | flags::PSH)
                    .map(|f| f.payload(b"220 hello\r\n")),
                a.to_client(),
            )
            .check("done with it", toa_bits(a, 0)),
        )
}

/// A router on the backend's side that cannot forward a grown segment (a tunnel) says so with
/// the next hop's MTU; the client, which sent 8 bytes less, is told 8 bytes less, so that its
/// smaller segments fit with the option. Once the backend's end is made (no more option), the
/// MTU goes on as it came.
fn a_frag_needed_about_a_grown_segment_tells_the_client_8_bytes_less() -> Scenario {
    use gateway_tests::icmp::{BACKEND_ROUTER, MTU, RFC792, Side, error_about_last, frag_needed};
    let a = Conn::new(46_061);
    // The error's MTU field and checksum, and that it goes to the client.
    let says = move |mtu: u16| {
        move |cx: &Ctx| {
            let ip = &cx.output[ETH_LEN..];
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            assert_eq!(&ip[16..20], &a.client.ip().octets(), "to the client");
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let message = &ip[ihl..total];
            assert_eq!((message[0], message[1]), (3, 4), "fragmentation needed");
            assert_eq!(u16::from_be_bytes([message[6], message[7]]), mtu, "the MTU");
            assert_eq!(
                gateway_tests::packet::checksum(message),
                0,
                "the ICMP checksum"
            );
        }
    };
    with_address()
        .rows(opened(a, 1452))
        .row(acked(a, "the handshake's ACK"))
        .row(leaves_with(
            Row::redirected(
                "a request, grown",
                send(a, flags::ACK | flags::PSH, Vec::new(), b"GET /"),
                a.to_its_backend(),
            ),
            toa_of(a),
        ))
        .row(
            Row::redirected(
                "frag needed about it: to the client, 8 bytes less",
                error_about_last(a, Side::Backend, BACKEND_ROUTER, frag_needed(), RFC792),
                Out::Any,
            )
            .counter(GlobalStat::IcmpFragNeeded, 1..=1)
            .check("MTU less 8", says(MTU - 8)),
        )
        .row(Row::redirected(
            "the backend answers: its end is made",
            a.reply(flags::ACK | flags::PSH)
                .map(|f| f.payload(b"HTTP/1.0 200")),
            a.to_client(),
        ))
        .row(leaves_with(
            Row::redirected(
                "the next request goes on as it came",
                send(a, flags::ACK | flags::PSH, Vec::new(), b"GET /2"),
                a.to_its_backend(),
            ),
            Vec::new(),
        ))
        .row(
            Row::redirected(
                "frag needed about it: the MTU as it came",
                error_about_last(a, Side::Backend, BACKEND_ROUTER, frag_needed(), RFC792),
                Out::Any,
            )
            .counter(GlobalStat::IcmpFragNeeded, 1..=1)
            .check("the MTU", says(MTU)),
        )
}
