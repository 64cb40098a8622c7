//! What the links around the gateway do to the datapath (issue 15, inputs 5 and 6), through
//! BPF_PROG_TEST_RUN in both attach modes, as scenarios (see `tests/datapath.rs` and
//! `gateway_tests::scenario`): neighbours that must be revalidated because a host may move to
//! another MAC (docs/datapath.md, "Next hop"), and senders on this host that leave TCP
//! checksums partial, for a NIC that XDP stands in front of (docs/datapath.md, "Checksums").
//! The namespace tests with real sockets are `tests/links.rs`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use gateway::datapath::AttachMode::{Tc, Xdp};
use gateway_common::{DropReason, GlobalStat};
use gateway_tests::{
    datapath::{Fixture, pin_to_cpu_0},
    netns::Topology,
    packet::{Frame, flags, partial_checksum},
    scenario::{Conn, Ctx, Input, Row, Scenario},
    scenario_tests,
};

scenario_tests! {
    next_hop_revalidation,
    partial_checksums,
}

/// How long next hops are trusted in these scenarios.
const AGE: Duration = Duration::from_millis(500);

/// Pins the calling thread to CPU 0 (the next-hop cache is per CPU) and sets the next-hop age.
fn one_cpu_and_age(cx: &mut Ctx) {
    pin_to_cpu_0();
    cx.fx
        .dp
        .configure(Topology::SNAT_IP, gateway_tests::datapath::SNAT_PORTS, AGE)
        .expect("configure");
}

/// `row` asked neither the FIB nor the kernel's neighbour output.
fn no_lookup(row: Row) -> Row {
    row.counter(GlobalStat::FibLookups, 0..=0)
        .counter(GlobalStat::NeighRevalidations, 0..=0)
}

/// Data from the client of `c`.
fn data(c: Conn, payload: &'static [u8]) -> Input {
    c.send(flags::ACK | flags::PSH)
        .map(move |f| f.payload(payload))
}

/// The next hop of `c`'s forward entry was resolved before `AGE` ago: still aged.
fn aged(cx: &Ctx, c: Conn) -> bool {
    let age = gateway::datapath::monotonic_ns() - cx.flow(c.key()).nexthop_ns;
    age > AGE.as_nanos() as u64
}

/// Input 5. A redirected packet never passes through the kernel's neighbour code, and the FIB
/// answers from a STALE entry too: without help, a neighbour the datapath uses is never
/// revalidated, and a host that moved to another MAC gets its packets at the old one for good.
/// So the packet that finds its flow's hop aged goes through the kernel's neighbour output,
/// which moves a STALE entry to DELAY and probes it: in TC by `bpf_redirect_neigh`
/// (`neigh_revalidations`); in XDP, handed to the kernel untouched for the TC program attached
/// alongside. One packet per destination, CPU and age: a fresh hop costs nothing more, other
/// aged flows to the destination take the revalidated answer (the cache is per CPU: the
/// scenario keeps to one), and a new flow's answer, which went out directly, serves no aged
/// flow.
fn next_hop_revalidation() -> Scenario {
    let (a, b, c) = (Conn::new(43_001), Conn::new(43_002), Conn::new(43_003));
    let a_hop = Arc::new(AtomicU64::new(0));
    let (noted, a_hop_now) = (a_hop.clone(), a_hop.clone());
    Scenario::new()
        .backends(1)
        .fixture(|mode, backend_ips| Fixture::new(mode, backend_ips, 1 << 12))
        .set(
            "this thread on CPU 0; next hops age after 500 ms",
            one_cpu_and_age,
        )
        .rows(a.handshake())
        .rows(b.handshake())
        .row(no_lookup(Row::redirected(
            "data on a fresh hop: no lookup, no neighbour output",
            data(a, b"fresh"),
            a.to_its_backend(),
        )))
        .set("a's hop noted", move |cx| {
            noted.store(cx.flow(a.key()).nexthop_ns, Ordering::Relaxed)
        })
        .wait(AGE + Duration::from_millis(100))
        .row(
            Row::redirected(
                "a new flow after the age asks the FIB and goes out directly",
                c.syn(),
                c.to_maglev_backend(),
            )
            .entries(2)
            .counter(GlobalStat::FibLookups, 1..=1)
            .counter(GlobalStat::NeighRevalidations, 0..=0),
        )
        .row(
            Row::redirected(
                "an aged hop is asked again and its packet sent through the neighbour output \
                 (the new flow's fresh answer, sent directly, does not serve it)",
                data(a, b"aged"),
                a.to_its_backend(),
            )
            .counter(GlobalStat::FibLookups, 1..=1)
            .counter(GlobalStat::NeighRevalidations, 1..=1)
            .check("its hop is fresh again", move |cx| {
                assert!(cx.flow(a.key()).nexthop_ns > a_hop.load(Ordering::Relaxed))
            })
            .only(Tc),
        )
        .row(
            no_lookup(Row::passed(
                "an aged hop: the packet is handed to the kernel as it came \
                 (the new flow's fresh answer, sent directly, does not serve it)",
                data(a, b"aged"),
            ))
            .counter(GlobalStat::Forwarded, 0..=0)
            .counter(GlobalStat::Passed, 0..=0)
            .check("tracked, its hop left aged for TC", move |cx| {
                let f = cx.flow(a.key());
                assert_eq!(f.nexthop_ns, a_hop_now.load(Ordering::Relaxed));
                assert_eq!(f.packets, 4, "SYN, ACK, 2 data segments");
            })
            .only(Xdp),
        )
        .row(
            Row::redirected(
                "the TC program attached alongside gets it: asked again, sent through the \
                 neighbour output",
                Input::Last,
                a.to_its_backend(),
            )
            .counter(GlobalStat::FibLookups, 1..=1)
            .counter(GlobalStat::NeighRevalidations, 1..=1)
            .check("its hop is fresh again", move |cx| assert!(!aged(cx, a)))
            .through(Tc)
            .only(Xdp),
        )
        .row(
            no_lookup(Row::redirected(
                "another aged flow to that backend takes the revalidated answer",
                data(b, b"aged too"),
                b.to_its_backend(),
            ))
            .check("as old as the answer it took", move |cx| {
                assert_eq!(cx.flow(b.key()).nexthop_ns, cx.flow(a.key()).nexthop_ns)
            }),
        )
        .row(no_lookup(Row::redirected(
            "the revalidated flow's next packet: a fresh hop again",
            data(a, b"fresh again"),
            a.to_its_backend(),
        )))
}

/// A SYN of `c` whose whole TCP checksum happens to equal the partial one of its pseudo-header
/// (one segment in 65,536): two payload bytes chosen for it.
fn syn_whole_equal_to_partial(c: Conn) -> Frame {
    const TCP_CHECKSUM: usize = 14 + 20 + 16;
    let fold = |mut s: u32| {
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    };
    let base = c.syn().payload(&[0, 0]);
    let bytes = base.build();
    let whole = u16::from_be_bytes([bytes[TCP_CHECKSUM], bytes[TCP_CHECKSUM + 1]]);
    let partial = partial_checksum(*c.client.ip(), *c.service.ip(), 22);
    // One's complement: the word that takes the segment's sum from `!whole` to `!partial`.
    let word = fold(u32::from(!partial) + u32::from(whole));
    let frame = base.payload(&word.to_be_bytes());
    let bytes = frame.build();
    assert_eq!(
        u16::from_be_bytes([bytes[TCP_CHECKSUM], bytes[TCP_CHECKSUM + 1]]),
        partial
    );
    frame
}

/// Input 6. A sender on this host with tx checksum offload (a veth peer, by default) hands over
/// segments whose TCP checksum field holds only the pseudo-header's sum, for the NIC to finish
/// (CHECKSUM_PARTIAL). XDP sees the bytes without the skb that says so, and a redirected frame
/// reaches its receiver without it: XDP completes such a checksum before the segment is
/// validated or translated (`partial_checksums`), and hands one longer than it computes to the
/// kernel, whose skb still says it (the TC program translates it then, as any CHECKSUM_PARTIAL
/// skb). TC reads the skb instead (`tcp_trusted`): a bare frame, as BPF_PROG_TEST_RUN gives it
/// (CHECKSUM_NONE), with a partial checksum is a wrong checksum there. A whole checksum that
/// equals the partial value (1 in 65,536) comes out the same either way.
fn partial_checksums() -> Scenario {
    let (c, d) = (Conn::new(44_001), Conn::new(44_002));
    let partial = |input: Input| input.map(Frame::partial);
    Scenario::new()
        .row(
            Row::redirected(
                "a SYN with a partial checksum is trusted, completed, and makes a flow",
                c.syn().partial(),
                c.to_maglev_backend(),
            )
            .entries(2)
            .counter(GlobalStat::PartialChecksums, 1..=1)
            .only(Xdp),
        )
        .row(
            Row::dropped(
                "a bare frame's partial checksum is a wrong one (no skb vouches for it)",
                c.syn().partial(),
                DropReason::BadChecksum,
            )
            .only(Tc),
        )
        .row(
            Row::redirected(
                "the SYN with its whole checksum",
                c.syn(),
                c.to_maglev_backend(),
            )
            .entries(2)
            .only(Tc),
        )
        .row(
            Row::redirected(
                "a SYN-ACK with a partial checksum is completed",
                partial(c.reply(flags::SYN | flags::ACK)),
                c.to_client(),
            )
            .counter(GlobalStat::PartialChecksums, 1..=1)
            .only(Xdp),
        )
        .row(
            Row::redirected(
                "the SYN-ACK with its whole checksum",
                c.reply(flags::SYN | flags::ACK),
                c.to_client(),
            )
            .only(Tc),
        )
        .row(Row::redirected(
            "ACK",
            c.send(flags::ACK),
            c.to_its_backend(),
        ))
        .row(
            Row::redirected(
                "data of odd length with a partial checksum, to the backend",
                partial(data(c, b"partial, and odd")),
                c.to_its_backend(),
            )
            .counter(GlobalStat::PartialChecksums, 1..=1)
            .only(Xdp),
        )
        .row(
            Row::redirected(
                "1400 bytes with a partial checksum, to the client",
                partial(
                    c.reply(flags::ACK | flags::PSH)
                        .map(|f| f.payload(&[0x5a; 1400])),
                ),
                c.to_client(),
            )
            .counter(GlobalStat::PartialChecksums, 1..=1)
            .only(Xdp),
        )
        .row(
            Row::passed(
                "a segment longer than the datapath sums (1600 bytes) goes to the kernel as it \
                 came",
                partial(data(c, &[0x33; 1600])),
            )
            .counter(GlobalStat::PartialChecksums, 1..=1)
            .counter(GlobalStat::Forwarded, 0..=0)
            .only(Xdp),
        )
        .row(
            Row::redirected(
                "a whole checksum that equals the partial value: XDP computes it again, the \
                 same, and does not count it partial (no warning of a sender that is not)",
                syn_whole_equal_to_partial(d),
                d.to_maglev_backend(),
            )
            .entries(2)
            .counter(GlobalStat::PartialChecksums, 0..=0)
            .only(Xdp),
        )
        .row(
            Row::redirected(
                "a whole checksum that equals the partial value: verified as any other",
                syn_whole_equal_to_partial(d),
                d.to_maglev_backend(),
            )
            .entries(2)
            .counter(GlobalStat::PartialChecksums, 0..=0)
            .only(Tc),
        )
}
