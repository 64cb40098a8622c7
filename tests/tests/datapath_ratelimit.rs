//! Per-container rate limits (issue 18, work in progress: the datapath's part), through
//! BPF_PROG_TEST_RUN in both attach modes: a backend limited to `pps` in bursts of `burst`
//! passes a burst of `burst` segments and drops the next (counted per backend and direction),
//! an RST passes an empty bucket, the other direction is not limited, the bucket refills at the
//! rate; a backend without a limit never has its bucket written. And what a review found: a
//! coarse clock's tick does not cut the rate of a small burst, new connections' SYNs count, only
//! the RST that ends a flow passes an empty bucket.

use std::time::Duration;

use gateway_common::{
    DropReason, GlobalStat,
    maps::{CT_FIN_FORWARD, RATE_FROM_BACKEND, RATE_TO_BACKEND, is_closed},
};
use gateway_tests::{
    datapath::Verdict,
    packet::{Frame, flags},
    scenario::{Conn, Ctx, Row, Scenario},
    scenario_tests,
};

scenario_tests! {
    a_limited_backend_passes_its_burst_then_its_rate,
    a_backend_without_a_limit_is_never_written,
    packets_within_the_rate_pass_whatever_the_clock_tick,
    syns_of_new_connections_are_within_the_limit,
    only_the_rst_that_closes_a_flow_passes_an_empty_bucket,
    a_segment_over_the_limit_leaves_its_flow_as_it_was,
}

/// `c`'s backend.
fn backend(cx: &Ctx, c: Conn) -> u32 {
    cx.flow(c.key()).backend_id
}

/// `c`'s handshake, then its backend limited toward it to `pps` packets/s in bursts of
/// `burst` (`why`: what the scenario needs of those numbers).
fn limited(c: Conn, pps: u32, burst: u32, why: &'static str) -> Scenario {
    Scenario::new().rows(c.handshake()).set(why, move |cx| {
        let b = backend(cx, c);
        cx.fx
            .dp
            .set_rate_limit(b, RATE_TO_BACKEND, Some((pps, burst)))
            .expect("limit")
    })
}

fn data(c: Conn, n: usize) -> Row {
    Row::redirected(
        format!("data {n}"),
        c.send(flags::ACK | flags::PSH).map(|f| f.payload(b"x")),
        c.to_its_backend(),
    )
    .counter(GlobalStat::Forwarded, 1..=1)
}

fn a_limited_backend_passes_its_burst_then_its_rate() -> Scenario {
    let c = Conn::new(47_001);
    let mut s = limited(
        c,
        1,
        5,
        "its backend limited to 1 packet/s toward it, bursts of 5 (slow enough for rows to be instants)",
    );
    for n in 1..=5 {
        s = s.row(data(c, n));
    }
    s.row(
        Row::dropped(
            "the sixth at once: over the limit",
            c.send(flags::ACK | flags::PSH).map(|f| f.payload(b"x")),
            DropReason::RateLimited,
        )
        .check("counted for its backend, toward it", move |cx| {
            let b = backend(cx, c);
            assert_eq!(cx.fx.dp.rate_drops(b, RATE_TO_BACKEND).unwrap(), 1);
            assert_eq!(cx.fx.dp.rate_drops(b, RATE_FROM_BACKEND).unwrap(), 0);
        }),
    )
    .row(Row::redirected(
        "the backend's answer: the other direction is not limited",
        c.reply(flags::ACK | flags::PSH).map(|f| f.payload(b"y")),
        c.to_client(),
    ))
    .wait(Duration::from_millis(1_100))
    .row(data(c, 6))
    .row(Row::dropped(
        "one second later, one more passed: the next is over again",
        c.send(flags::ACK | flags::PSH).map(|f| f.payload(b"x")),
        DropReason::RateLimited,
    ))
    .row(Row::redirected(
        "an RST passes the empty bucket",
        c.send(flags::RST | flags::ACK),
        c.to_its_backend(),
    ))
}

fn a_backend_without_a_limit_is_never_written() -> Scenario {
    let c = Conn::new(47_011);
    let untouched = move |cx: &Ctx| {
        let b = backend(cx, c);
        for dir in [RATE_TO_BACKEND, RATE_FROM_BACKEND] {
            let limit = cx.fx.dp.rate_limit(b, dir).unwrap();
            assert_eq!(limit, Default::default(), "direction {dir}");
        }
    };
    let mut s = Scenario::new().rows(c.handshake());
    for n in 1..=10 {
        s = s.row(data(c, n));
    }
    s.check("no limit, no state", untouched)
        // The control: with a limit it never reaches, the same packets move its state.
        .set("a limit of 1,000,000 packets/s toward it", move |cx| {
            let b = backend(cx, c);
            cx.fx
                .dp
                .set_rate_limit(b, RATE_TO_BACKEND, Some((1_000_000, 1_000)))
                .expect("limit")
        })
        .row(data(c, 11))
        .check("a limit, its state moved", move |cx| {
            let b = backend(cx, c);
            assert_ne!(cx.fx.dp.rate_limit(b, RATE_TO_BACKEND).unwrap().tat_ns, 0);
        })
}

/// The datapath's clock is the coarse one (a tick: 4 ms at HZ=250): packets 2 ms apart,
/// within a limit of 1,000 packets/s (one every 1 ms) in bursts of 1, all pass; a limit that
/// allowed only its burst within one tick of the clock would pass one packet a tick (250/s).
fn packets_within_the_rate_pass_whatever_the_clock_tick() -> Scenario {
    let c = Conn::new(47_021);
    let mut s = limited(
        c,
        1_000,
        1,
        "its backend limited to 1,000 packets/s toward it, bursts of 1",
    );
    for n in 1..=30 {
        s = s.row(data(c, n)).wait(Duration::from_millis(2));
    }
    s.check("none dropped", move |cx| {
        let b = backend(cx, c);
        assert_eq!(cx.fx.dp.rate_drops(b, RATE_TO_BACKEND).unwrap(), 0);
    })
}

/// A SYN that opens a connection is a packet to its container too: a client opening
/// connection after connection (a SYN flood from its own addresses, each from another port)
/// gets no more of them through than the limit allows: with every backend limited to 1
/// packet/s in bursts of 1, at most one SYN a backend of 20 sent at once.
fn syns_of_new_connections_are_within_the_limit() -> Scenario {
    Scenario::new().rows(Conn::new(47_099).handshake()).set(
        "every backend limited to 1 packet/s toward it, bursts of 1; 20 SYNs from 20 ports",
        |cx| {
            for id in 1..=3 {
                cx.fx
                    .dp
                    .set_rate_limit(id, RATE_TO_BACKEND, Some((1, 1)))
                    .expect("limit");
            }
            let passed = (0..20)
                .filter(|i| {
                    let (verdict, _) = cx.fx.run(&Conn::new(47_100 + i).syn().build());
                    verdict == Verdict::Redirect
                })
                .count();
            let dropped: u64 = (1..=3)
                .map(|id| cx.fx.dp.rate_drops(id, RATE_TO_BACKEND).unwrap())
                .sum();
            assert!(
                passed <= 3 && dropped as usize == 20 - passed,
                "{passed} of 20 SYNs reached their backend, {dropped} counted dropped"
            );
        },
    )
}

/// An RST passes an empty bucket when it ends its flow (a limit must never strand state), not
/// otherwise: an RST in the window but not at the exact number (which the backend answers with
/// a challenge ACK) and an RST again on a flow already reset are packets like any other, or a
/// client could send RSTs (with data, at any rate) past its container's limit.
fn only_the_rst_that_closes_a_flow_passes_an_empty_bucket() -> Scenario {
    let c = Conn::new(47_031);
    let in_window = move || {
        c.send(flags::RST | flags::ACK).map(|f| {
            Frame {
                seq: f.seq.wrapping_add(100),
                ..f
            }
            .payload(&[0u8; 1000])
        })
    };
    let mut s = limited(
        c,
        1,
        1,
        "its backend limited to 1 packet/s toward it, bursts of 1",
    )
    .row(data(c, 1))
    .row(Row::dropped(
        "the bucket is empty",
        c.send(flags::ACK | flags::PSH).map(|f| f.payload(b"x")),
        DropReason::RateLimited,
    ));
    for n in 1..=5 {
        s = s.row(Row::dropped(
            format!("an RST in the window, not exact, with 1,000 bytes ({n})"),
            in_window(),
            DropReason::RateLimited,
        ));
    }
    s = s.row(Row::redirected(
        "the RST at the exact number: it ends the flow, and passes",
        c.send(flags::RST | flags::ACK),
        c.to_its_backend(),
    ));
    for n in 1..=5 {
        s = s.row(Row::dropped(
            format!("the same RST again on the reset flow ({n})"),
            c.send(flags::RST | flags::ACK),
            DropReason::RateLimited,
        ));
    }
    s
}

/// A segment dropped over the limit never reached the container: the flow's tracking does not
/// take it either. A FIN dropped so, then the backend's: the flow is not closed (the client
/// sends its FIN again), or its SNAT port could be taken over 1 s later while the container
/// still waits for that FIN.
fn a_segment_over_the_limit_leaves_its_flow_as_it_was() -> Scenario {
    let c = Conn::new(47_041);
    limited(
        c,
        1,
        1,
        "its backend limited to 1 packet/s toward it, bursts of 1",
    )
    .row(data(c, 1))
    .row(
        Row::dropped(
            "the client's FIN, over the limit",
            c.send(flags::FIN | flags::ACK),
            DropReason::RateLimited,
        )
        .check("not taken by the flow", move |cx| {
            assert_eq!(cx.state(c.key()) & CT_FIN_FORWARD, 0);
        }),
    )
    .row(Row::redirected(
        "the backend's FIN",
        c.reply(flags::FIN | flags::ACK),
        c.to_client(),
    ))
    .check("the flow is not closed", move |cx| {
        assert!(!is_closed(cx.state(c.key())));
    })
}
