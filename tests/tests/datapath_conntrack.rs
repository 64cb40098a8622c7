//! The conntrack against hostile and unlucky traffic (docs/datapath.md, "Sequence tracking"),
//! through BPF_PROG_TEST_RUN in both attach modes, as scenarios (see `tests/datapath.rs` and
//! `gateway_tests::scenario`). Each scenario is one kind of fault of issue 14 with its
//! neighbours: spoofed and inexact RSTs, FINs and segments outside the window, illegal flag
//! combinations, bad checksums on what would create a flow, TTL, SYN retransmissions to a
//! backend that stopped accepting, the handshake's own checks, and window scaling.
//!
//! Frames of a connection are numbered as well-behaved ends number them when the row runs
//! (`Conn::send` / `Conn::reply`); a row that attacks shifts those numbers.

use gateway_common::{
    DropReason, GlobalStat,
    maps::{
        CT_ESTABLISHED, CT_FIN_FORWARD, CT_FIN_REVERSE, CT_RST, CT_SYN_ACK_SEEN, TRACK_ACK_SEEN,
    },
};
use gateway_tests::{
    packet::{Frame, flags, wscale_option},
    scenario::{Conn, Ctx, Input, Out, Row, Scenario},
    scenario_tests,
};

scenario_tests! {
    spoofed_resets,
    fins_outside_the_window,
    segments_outside_the_window,
    illegal_flags,
    bad_checksums,
    ttl,
    syn_retransmissions,
    handshake,
    window_scaling,
}

/// 2^30: far outside any window without scaling, and still outside one scaled by 14.
const FAR: u32 = 1 << 30;

/// `input` with its sequence number moved by `by`.
fn shifted(input: Input, by: u32) -> Input {
    input.map(move |f| Frame {
        seq: f.seq.wrapping_add(by),
        ..f
    })
}

/// `input` with its acknowledgement number moved by `by`.
fn ack_shifted(input: Input, by: u32) -> Input {
    input.map(move |f| Frame {
        ack: f.ack.wrapping_add(by),
        ..f
    })
}

/// A connection opened: SYN, SYN-ACK, ACK, and a little data each way (so each side has
/// acknowledged the other's).
fn open(c: Conn) -> Vec<Row> {
    let mut rows = c.handshake();
    rows.extend([
        Row::redirected(
            "data to the backend",
            c.send(flags::ACK | flags::PSH)
                .map(|f| f.payload(b"request")),
            c.to_its_backend(),
        ),
        Row::redirected(
            "data to the client",
            c.reply(flags::ACK | flags::PSH)
                .map(|f| f.payload(b"response!")),
            c.to_client(),
        ),
    ]);
    rows
}

/// The state bits of both entries of `c`, which must agree.
fn states(cx: &Ctx, c: Conn) -> u8 {
    let (fwd, rev) = (cx.state(c.key()), cx.state(c.reverse_key(cx)));
    assert_eq!(fwd, rev, "both entries carry the same state");
    fwd
}

/// RFC 5961 §3.2: an RST closes only at the exact sequence number; inside the window it is
/// forwarded (the receiver answers with a challenge ACK) and the flow kept; outside, dropped.
fn spoofed_resets() -> Scenario {
    let c = Conn::new(46_000);
    let alive = move |cx: &Ctx| {
        assert_eq!(states(cx, c) & CT_RST, 0, "the flow is not reset");
    };
    Scenario::new()
        .rows(open(c))
        .row(
            Row::dropped(
                "an RST from the client's side 2^30 past the window",
                shifted(c.send(flags::RST), FAR),
                DropReason::OutOfWindow,
            )
            .check("still alive", alive),
        )
        .row(
            Row::dropped(
                "an RST from the backend's side 2^30 past the window",
                shifted(c.reply(flags::RST), FAR),
                DropReason::OutOfWindow,
            )
            .check("still alive", alive),
        )
        .row(
            Row::dropped(
                "an RST just before the window",
                shifted(c.send(flags::RST), 0u32.wrapping_sub(1)),
                DropReason::OutOfWindow,
            )
            .check("still alive", alive),
        )
        .row(
            Row::redirected(
                "an RST+ACK in the window, not exact, is forwarded to the backend",
                shifted(c.send(flags::RST | flags::ACK), 1000),
                c.to_its_backend(),
            )
            .counter(GlobalStat::RstInWindow, 1..=1)
            .check("still alive", alive),
        )
        .row(
            Row::redirected(
                "an RST+ACK in the window from the backend's side is forwarded to the client",
                shifted(c.reply(flags::RST | flags::ACK), 1),
                c.to_client(),
            )
            .counter(GlobalStat::RstInWindow, 1..=1)
            .check("still alive", alive),
        )
        .row(Row::redirected(
            "the connection still carries data",
            c.send(flags::ACK | flags::PSH).map(|f| f.payload(b"more")),
            c.to_its_backend(),
        ))
        .row(
            Row::redirected(
                "the exact RST closes both entries",
                c.reply(flags::RST),
                c.to_client(),
            )
            .counter(GlobalStat::RstInWindow, 0..=0)
            .check("reset", move |cx| {
                assert_eq!(states(cx, c) & CT_RST, CT_RST)
            }),
        )
}

/// A FIN changes state only inside the receiver's window.
fn fins_outside_the_window() -> Scenario {
    let c = Conn::new(46_100);
    let no_fin = move |cx: &Ctx| {
        assert_eq!(states(cx, c) & (CT_FIN_FORWARD | CT_FIN_REVERSE), 0);
    };
    Scenario::new()
        .rows(open(c))
        .row(
            Row::dropped(
                "a FIN from the client's side 2^30 past the window",
                shifted(c.send(flags::FIN | flags::ACK), FAR),
                DropReason::OutOfWindow,
            )
            .check("no FIN recorded", no_fin),
        )
        .row(
            Row::dropped(
                "a FIN from the backend's side 2^30 before the window",
                shifted(c.reply(flags::FIN | flags::ACK), FAR.wrapping_neg()),
                DropReason::OutOfWindow,
            )
            .check("no FIN recorded", no_fin),
        )
        .row(
            Row::dropped(
                "a stale FIN from the client's side, 1000 before the backend's next expected",
                shifted(c.send(flags::FIN | flags::ACK), 1000u32.wrapping_neg()),
                DropReason::OutOfWindow,
            )
            .check("no FIN recorded", no_fin),
        )
        .row(
            Row::dropped(
                "a FIN past the backend's advertised window (64,240), inside 65,535",
                shifted(c.send(flags::FIN | flags::ACK), 65_000),
                DropReason::OutOfWindow,
            )
            .check("no FIN recorded", no_fin),
        )
        .row(
            Row::redirected(
                "the client's real FIN",
                c.send(flags::FIN | flags::ACK),
                c.to_its_backend(),
            )
            .check("recorded on both entries", move |cx| {
                assert_eq!(states(cx, c) & CT_FIN_FORWARD, CT_FIN_FORWARD);
            }),
        )
        .row(
            Row::redirected(
                "the backend's real FIN",
                c.reply(flags::FIN | flags::ACK),
                c.to_client(),
            )
            .check("closed", move |cx| {
                let s = states(cx, c);
                assert_eq!(s & CT_FIN_REVERSE, CT_FIN_REVERSE);
            }),
        )
}

/// Every segment must lie within the widest window its receiver can advertise.
fn segments_outside_the_window() -> Scenario {
    let c = Conn::new(46_200);
    Scenario::new()
        .rows(open(c))
        .row(Row::dropped(
            "data 2^30 past the window",
            shifted(
                c.send(flags::ACK | flags::PSH).map(|f| f.payload(b"x")),
                FAR,
            ),
            DropReason::OutOfWindow,
        ))
        .row(Row::dropped(
            "an ACK of data the backend never sent",
            ack_shifted(c.send(flags::ACK), FAR),
            DropReason::OutOfWindow,
        ))
        .row(Row::dropped(
            "a backend segment 2^30 before the window",
            shifted(c.reply(flags::ACK), FAR.wrapping_neg()),
            DropReason::OutOfWindow,
        ))
        .row(
            Row::redirected(
                "a retransmission of old data is forwarded",
                shifted(
                    c.send(flags::ACK | flags::PSH)
                        .map(|f| f.payload(b"request")),
                    7u32.wrapping_neg(),
                ),
                c.to_its_backend(),
            )
            .check("and moves nothing back", move |cx| {
                let f = cx.flow(c.key());
                assert_eq!(f.track & TRACK_ACK_SEEN, TRACK_ACK_SEEN);
            }),
        )
        .row(
            Row::redirected(
                "a partial retransmission with an older ack is forwarded",
                ack_shifted(
                    shifted(
                        c.send(flags::ACK | flags::PSH).map(|f| f.payload(b"req")),
                        7u32.wrapping_neg(),
                    ),
                    100u32.wrapping_neg(),
                ),
                c.to_its_backend(),
            )
            .check("and moves neither seq_end nor ack_max back", move |cx| {
                // The input's numbers (bytes 38..42 and 42..46 of an option-less frame).
                let seq = u32::from_be_bytes(cx.input[38..42].try_into().unwrap());
                let ack = u32::from_be_bytes(cx.input[42..46].try_into().unwrap());
                let f = cx.flow(c.key());
                assert_eq!(
                    (f.seq_end, f.ack_max),
                    (seq.wrapping_add(7), ack.wrapping_add(100))
                );
            }),
        )
        .row(
            Row::redirected(
                "in-window data moves the tracking",
                c.send(flags::ACK | flags::PSH)
                    .map(|f| f.payload(b"0123456789")),
                c.to_its_backend(),
            )
            .check("seq_end is the segment's end", move |cx| {
                // The input's sequence number (bytes 38..42 of an option-less frame) + 10.
                let seq = u32::from_be_bytes(cx.input[38..42].try_into().unwrap());
                assert_eq!(cx.flow(c.key()).seq_end, seq + 10);
            }),
        )
}

/// Only netfilter's valid flag combinations pass; nothing else creates or changes a flow.
fn illegal_flags() -> Scenario {
    let f = flags::FIN;
    let s = flags::SYN;
    let r = flags::RST;
    let p = flags::PSH;
    let a = flags::ACK;
    let u = flags::URG;
    let bad: [(u8, &str); 8] = [
        (s | f, "SYN+FIN"),
        (s | r, "SYN+RST"),
        (0, "no flags"),
        (f, "FIN alone"),
        (p, "PSH alone"),
        (u, "URG alone"),
        (f | u, "FIN+URG without ACK"),
        (r | f | a, "RST+FIN+ACK"),
    ];
    let c = Conn::new(46_300);
    Scenario::new()
        .rows(bad.iter().enumerate().map(|(i, &(flags, name))| {
            Row::dropped(
                format!("{name} to a service creates nothing"),
                Conn::new(46_310 + i as u16).send(flags),
                DropReason::BadFlags,
            )
        }))
        .row(
            Row::redirected(
                "a SYN with ECE and CWR (ECN set-up) opens a flow",
                Frame {
                    tcp_flags: s | flags::ECE | flags::CWR,
                    ..Conn::new(46_320).syn()
                },
                Conn::new(46_320).to_maglev_backend(),
            )
            .entries(2),
        )
        .rows(open(c))
        .row(
            Row::dropped(
                "SYN+FIN on a live flow changes nothing",
                c.send(s | f),
                DropReason::BadFlags,
            )
            .check("still established, no FIN", move |cx| {
                let st = states(cx, c);
                assert_eq!(st & (CT_FIN_FORWARD | CT_RST), 0);
                assert_eq!(st & CT_ESTABLISHED, CT_ESTABLISHED);
            }),
        )
        .row(Row::dropped(
            "FIN without ACK from the backend's side",
            c.reply(f),
            DropReason::BadFlags,
        ))
}

/// `frame` built, then `spoil` applied to its bytes.
fn spoiled(frame: Frame, spoil: impl FnOnce(&mut Vec<u8>)) -> Input {
    let mut bytes = frame.build();
    spoil(&mut bytes);
    Input::Bytes(bytes)
}

/// Offsets in an option-less frame.
const IP_CHECKSUM: usize = 14 + 10;
const TCP_CHECKSUM: usize = 14 + 20 + 16;

/// What would create a flow is verified first (its neighbours with right checksums pass).
fn bad_checksums() -> Scenario {
    Scenario::new()
        .row(Row::dropped(
            "a SYN with a wrong TCP checksum creates nothing",
            spoiled(Conn::new(46_401).syn(), |b| b[TCP_CHECKSUM] ^= 0x01),
            DropReason::BadChecksum,
        ))
        .row(Row::dropped(
            "a SYN with a wrong IPv4 header checksum creates nothing",
            spoiled(Conn::new(46_402).syn(), |b| b[IP_CHECKSUM] ^= 0x80),
            DropReason::BadChecksum,
        ))
        .row(Row::dropped(
            "a SYN whose payload was changed in flight",
            spoiled(Conn::new(46_403).syn().payload(&[0x11; 601]), |b| {
                *b.last_mut().unwrap() ^= 0x40
            }),
            DropReason::BadChecksum,
        ))
        .row(
            Row::redirected(
                "a SYN carrying an odd-length payload (TFO) with its right checksum",
                Conn::new(46_404).syn().payload(b"GET"),
                Conn::new(46_404).to_maglev_backend(),
            )
            .entries(2),
        )
        .row(
            Row::redirected(
                "a SYN carrying 601 bytes (several 64-byte chunks and a tail)",
                Conn::new(46_405).syn().payload(&[0x11; 601]),
                Conn::new(46_405).to_maglev_backend(),
            )
            .entries(2),
        )
        .row(
            Row::redirected(
                "a SYN with window scale and other options",
                Frame {
                    tcp_options: wscale_option(7),
                    ..Conn::new(46_406).syn()
                },
                Conn::new(46_406).to_maglev_backend(),
            )
            .entries(2),
        )
}

/// The gateway is a hop: TTL goes down by one both ways (the runner checks every translated
/// row), and what would leave with TTL 0 is dropped.
fn ttl() -> Scenario {
    let c = Conn::new(46_500);
    Scenario::new()
        .row(Row::dropped(
            "a SYN with TTL 1 creates nothing",
            Frame {
                ttl: 1,
                ..Conn::new(46_501).syn()
            },
            DropReason::TtlExceeded,
        ))
        .row(Row::dropped(
            "a SYN with TTL 0",
            Frame {
                ttl: 0,
                ..Conn::new(46_502).syn()
            },
            DropReason::TtlExceeded,
        ))
        .row(
            Row::redirected(
                "a SYN with TTL 2 leaves with TTL 1",
                Frame {
                    ttl: 2,
                    ..Conn::new(46_503).syn()
                },
                Conn::new(46_503).to_maglev_backend(),
            )
            .entries(2),
        )
        .rows(open(c))
        .row(
            Row::dropped(
                "a FIN with TTL 1 on a live flow changes nothing",
                c.send(flags::FIN | flags::ACK)
                    .map(|f| Frame { ttl: 1, ..f }),
                DropReason::TtlExceeded,
            )
            .check("no FIN recorded", move |cx| {
                assert_eq!(states(cx, c) & CT_FIN_FORWARD, 0);
            }),
        )
        .row(Row::redirected(
            "a reply with TTL 2",
            c.reply(flags::ACK).map(|f| Frame { ttl: 2, ..f }),
            c.to_client(),
        ))
}

/// A SYN on a handshake in progress stays on its flow while its backend accepts (a lost
/// SYN-ACK must not split the handshake); it is balanced afresh when the backend stopped
/// accepting, or when the client starts over with another ISN. A SYN on an established flow
/// goes to its backend unchanged (which answers with a challenge ACK).
fn syn_retransmissions() -> Scenario {
    use std::sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    };
    let c = Conn::new(46_600);
    let stopped = Arc::new(AtomicU32::new(0));
    let stopped_check = stopped.clone();
    let d = Conn::new(46_610);
    let e = Conn::new(46_620);
    let g = Conn::new(46_630);
    Scenario::new()
        .row(Row::redirected("SYN", c.syn(), c.to_maglev_backend()).entries(2))
        .row(
            Row::redirected(
                "its retransmission stays on the flow",
                c.syn(),
                c.to_its_backend(),
            )
            .counter(GlobalStat::SynRebalanced, 0..=0)
            .counter(GlobalStat::FlowsCreated, 0..=0),
        )
        .set("its backend stops accepting", move |cx| {
            let f = cx.flow(c.key());
            let b = cx
                .fx
                .backends
                .iter()
                .find(|b| b.id == f.backend_id)
                .copied()
                .unwrap();
            cx.fx.dp.set_backend(b.id, b.addr, false).unwrap();
            stopped.store(b.id, Ordering::Relaxed);
        })
        .row(
            Row::redirected(
                "the next retransmission is balanced afresh",
                c.syn(),
                Out::Any,
            )
            .counter(GlobalStat::SynRebalanced, 1..=1)
            .counter(GlobalStat::FlowsCreated, 1..=1)
            .check("to another backend", move |cx| {
                let stopped = stopped_check.load(Ordering::Relaxed);
                assert!(stopped != 0);
                assert_ne!(cx.flow(c.key()).backend_id, stopped);
            }),
        )
        .row(
            Row::dropped(
                "a SYN with TTL 1 that would start over (a new ISN) changes nothing",
                Frame {
                    ttl: 1,
                    seq: 0x4242_0000,
                    ..c.syn()
                },
                DropReason::TtlExceeded,
            )
            .counter(GlobalStat::SynRebalanced, 0..=0)
            .entries(0),
        )
        .row(Row::redirected("another client's SYN", d.syn(), d.to_maglev_backend()).entries(2))
        .row(
            Row::redirected(
                "the same client starting over with another ISN is balanced afresh",
                Frame {
                    seq: 0x7777_0000,
                    ..d.syn()
                },
                Out::Any,
            )
            .counter(GlobalStat::SynRebalanced, 1..=1)
            .check("tracked from the new ISN", move |cx| {
                assert_eq!(cx.flow(d.key()).seq_end, 0x7777_0001);
            }),
        )
        .row(Row::redirected("a third client's SYN", g.syn(), g.to_maglev_backend()).entries(2))
        .row(
            Row::dropped(
                "a SYN with another ISN and a wrong TCP checksum changes nothing",
                spoiled(
                    Frame {
                        seq: 0x4242_0000,
                        ..g.syn()
                    },
                    |b| b[TCP_CHECKSUM] ^= 0x01,
                ),
                DropReason::BadChecksum,
            )
            .counter(GlobalStat::SynRebalanced, 0..=0)
            .entries(0)
            .check("the handshake in progress keeps its pair", move |cx| {
                let fwd = cx.flow(g.key());
                assert_eq!(fwd.seq_end, g.syn().seq + 1, "{fwd:?}");
                cx.flow(fwd.peer_key());
            }),
        )
        .rows(open(e))
        .row(
            Row::redirected(
                "a SYN on an established flow goes to its backend unchanged",
                e.syn(),
                e.to_its_backend(),
            )
            .counter(GlobalStat::SynRebalanced, 0..=0)
            .check("still established", move |cx| {
                assert_eq!(states(cx, e) & CT_ESTABLISHED, CT_ESTABLISHED);
            }),
        )
}

/// The handshake's own checks: nothing but the SYN-ACK (acknowledging the SYN) or an RST is
/// valid before the SYN-ACK; a backend refusing the SYN closes the flow; a SYN-ACK may leave a
/// TFO SYN's data unacknowledged.
fn handshake() -> Scenario {
    let c = Conn::new(46_700);
    let d = Conn::new(46_710);
    let e = Conn::new(46_720);
    // The data of a TFO SYN.
    const DATA: [u8; 100] = [0x22; 100];
    Scenario::new()
        .row(Row::redirected("SYN", c.syn(), c.to_maglev_backend()).entries(2))
        .row(Row::dropped(
            "the client's ACK before any SYN-ACK",
            c.send(flags::ACK),
            DropReason::OutOfWindow,
        ))
        .row(Row::dropped(
            "a SYN-ACK that does not acknowledge the SYN",
            ack_shifted(c.reply(flags::SYN | flags::ACK), 1),
            DropReason::OutOfWindow,
        ))
        .row(Row::dropped(
            "a backend RST without ACK before the SYN-ACK",
            c.reply(flags::RST),
            DropReason::OutOfWindow,
        ))
        .row(
            Row::redirected(
                "the right SYN-ACK",
                c.reply(flags::SYN | flags::ACK),
                c.to_client(),
            )
            .check("not established yet", move |cx| {
                assert_eq!(states(cx, c) & CT_ESTABLISHED, 0);
            }),
        )
        .row(
            Row::redirected(
                "an ACK that does not acknowledge the SYN-ACK is forwarded, not establishing",
                ack_shifted(c.send(flags::ACK), 0u32.wrapping_sub(1)),
                c.to_its_backend(),
            )
            .check("not established", move |cx| {
                assert_eq!(states(cx, c) & CT_ESTABLISHED, 0);
            }),
        )
        .row(
            Row::redirected(
                "the right ACK establishes",
                c.send(flags::ACK),
                c.to_its_backend(),
            )
            .check("established", move |cx| {
                assert_eq!(states(cx, c) & CT_ESTABLISHED, CT_ESTABLISHED);
            }),
        )
        .row(Row::redirected("another SYN", d.syn(), d.to_maglev_backend()).entries(2))
        .row(
            Row::dropped(
                "an RST+ACK that does not acknowledge the SYN (a spoofed refusal)",
                ack_shifted(d.reply(flags::RST | flags::ACK), 1).map(|f| Frame { seq: 0, ..f }),
                DropReason::OutOfWindow,
            )
            .check("not reset", move |cx| assert_eq!(states(cx, d) & CT_RST, 0)),
        )
        .row(
            Row::redirected(
                "the backend refuses it (RST+ACK acknowledging the SYN)",
                d.reply(flags::RST | flags::ACK)
                    .map(|f| Frame { seq: 0, ..f }),
                d.to_client(),
            )
            .check("reset", move |cx| {
                assert_eq!(states(cx, d) & CT_RST, CT_RST)
            }),
        )
        .row(
            Row::redirected(
                "a SYN carrying 100 bytes (TFO)",
                e.syn().payload(&DATA),
                e.to_maglev_backend(),
            )
            .entries(2),
        )
        .row(
            Row::redirected(
                "a SYN-ACK acknowledging the SYN but not its data (RFC 7413 §4.2.2)",
                ack_shifted(e.reply(flags::SYN | flags::ACK), 100u32.wrapping_neg()),
                e.to_client(),
            )
            .check("the SYN-ACK is seen", move |cx| {
                assert_eq!(states(cx, e) & CT_SYN_ACK_SEEN, CT_SYN_ACK_SEEN);
            }),
        )
        .row(
            Row::redirected(
                "the client sends the data again with its ACK, which establishes",
                shifted(
                    e.send(flags::ACK | flags::PSH).map(|f| f.payload(&DATA)),
                    100u32.wrapping_neg(),
                ),
                e.to_its_backend(),
            )
            .check("established", move |cx| {
                assert_eq!(states(cx, e) & CT_ESTABLISHED, CT_ESTABLISHED);
            }),
        )
}

/// Window scaling (RFC 7323): on when both SYN and SYN-ACK offer it; the bounds follow it.
fn window_scaling() -> Scenario {
    let c = Conn::new(46_800);
    let d = Conn::new(46_810);
    // 100 kB ahead: beyond an unscaled window (64 KiB), inside one scaled by 7 (8 MiB).
    const AHEAD: u32 = 100_000;
    Scenario::new()
        .row(
            Row::redirected(
                "SYN offering scale 7",
                Frame {
                    tcp_options: wscale_option(7),
                    ..c.syn()
                },
                c.to_maglev_backend(),
            )
            .entries(2),
        )
        .row(
            Row::redirected(
                "SYN-ACK offering scale 5",
                c.reply(flags::SYN | flags::ACK).map(|f| Frame {
                    tcp_options: wscale_option(5),
                    ..f
                }),
                c.to_client(),
            )
            .check("both sides' scales recorded", move |cx| {
                let (fwd, rev) = (cx.flow(c.key()), cx.flow(c.reverse_key(cx)));
                assert_eq!((fwd.wscale, fwd.peer_wscale), (7, 5));
                assert_eq!((rev.wscale, rev.peer_wscale), (5, 7));
            }),
        )
        .row(Row::redirected(
            "ACK",
            c.send(flags::ACK),
            c.to_its_backend(),
        ))
        .row(Row::redirected(
            "client data 100 kB ahead fits the backend's scaled window",
            shifted(
                c.send(flags::ACK | flags::PSH).map(|f| f.payload(b"x")),
                AHEAD,
            ),
            c.to_its_backend(),
        ))
        .row(
            Row::redirected(
                "SYN offering scale 7, to a backend that does not scale",
                Frame {
                    tcp_options: wscale_option(7),
                    ..d.syn()
                },
                d.to_maglev_backend(),
            )
            .entries(2),
        )
        .row(
            Row::redirected(
                "SYN-ACK without the option",
                d.reply(flags::SYN | flags::ACK),
                d.to_client(),
            )
            .check("scaling off both ways", move |cx| {
                let (fwd, rev) = (cx.flow(d.key()), cx.flow(d.reverse_key(cx)));
                assert_eq!(
                    (fwd.wscale, fwd.peer_wscale, rev.wscale, rev.peer_wscale),
                    (0, 0, 0, 0)
                );
            }),
        )
        .row(Row::redirected(
            "ACK",
            d.send(flags::ACK),
            d.to_its_backend(),
        ))
        .row(Row::dropped(
            "client data 100 kB ahead does not fit an unscaled window",
            shifted(
                d.send(flags::ACK | flags::PSH).map(|f| f.payload(b"x")),
                AHEAD,
            ),
            DropReason::OutOfWindow,
        ))
        .row(Row::redirected(
            "client data at the window's edge does",
            shifted(
                d.send(flags::ACK | flags::PSH).map(|f| f.payload(b"x")),
                65_535,
            ),
            d.to_its_backend(),
        ))
}
