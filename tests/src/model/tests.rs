//! The model on its own (no kernel): issue 14's inputs through spec 14's rules.

use std::net::SocketAddrV4;

use gateway::datapath::AttachMode;
use gateway_common::{
    DropReason, GlobalStat,
    maps::{
        ADDR_PUBLIC, ADDR_SNAT, BACKEND_ACCEPTING, Backend4, CT_ESTABLISHED, CT_RST,
        CT_SYN_ACK_SEEN, FlowKey4, MAGLEV_SIZE, ServiceKey4, TRACK_ACK_SEEN,
    },
    net::{
        ip_to_net,
        tcp_flags::{ACK, FIN, PSH, RST, SYN},
    },
};

use super::{Clock, Expect, Model, Observed, Rules, Verdict, wire::Segment};

fn addr(s: &str) -> SocketAddrV4 {
    s.parse().unwrap()
}

const SVC: &str = "203.0.113.10:20000";
const CLIENT: &str = "192.0.2.2:40000";
const BACKEND: &str = "198.51.100.2:8080";

fn model() -> Model {
    let mut m = Model::new(Rules::Spec14);
    m.snat_ip = ip_to_net("198.51.100.253".parse().unwrap());
    m.snat_ports = (40_000, 40_000);
    m.addrs = vec![
        (ip_to_net(*addr(SVC).ip()), ADDR_PUBLIC),
        (m.snat_ip, ADDR_SNAT),
    ];
    m.services.insert(ServiceKey4::from_addr(addr(SVC)), 1);
    m.tables.insert(1, vec![1; MAGLEV_SIZE as usize]);
    m.backends
        .insert(1, Backend4::new(addr(BACKEND), BACKEND_ACCEPTING));
    m
}

const CLOCK: Clock = Clock {
    lo: 1_000_000_000_000,
    hi: 1_000_010_000_000,
};

fn step(m: &mut Model, s: Segment, port: Option<u16>) -> Expect {
    step_in(m, AttachMode::Xdp, s, port)
}

fn step_in(m: &mut Model, mode: AttachMode, s: Segment, port: Option<u16>) -> Expect {
    let seen = Observed {
        snat_port: port,
        passed: false,
    };
    m.step(&s.build(), mode, CLOCK, seen)
}

fn from_client(flags: u8, seq: u32, ack: u32) -> Segment {
    let mut s = Segment::new(addr(CLIENT), addr(SVC), flags);
    (s.seq, s.ack) = (seq, ack);
    s
}

fn from_backend(flags: u8, seq: u32, ack: u32) -> Segment {
    let mut s = Segment::new(addr(BACKEND), addr("198.51.100.253:40000"), flags);
    (s.seq, s.ack) = (seq, ack);
    s
}

fn fwd_key() -> FlowKey4 {
    FlowKey4::from_addrs(addr(CLIENT), addr(SVC))
}

/// SYN (ISN 1000, window scale 7), SYN-ACK (ISN 5000, scale 2), ACK.
fn established(m: &mut Model) {
    let mut syn = from_client(SYN, 1000, 0);
    syn.tcp_options = vec![3, 3, 7];
    assert_eq!(step(m, syn, Some(40_000)).verdict, Verdict::Redirect);
    let mut sa = from_backend(SYN | ACK, 5000, 1001);
    sa.tcp_options = vec![1, 3, 3, 2];
    assert_eq!(step(m, sa, None).verdict, Verdict::Redirect);
    let x = step(m, from_client(ACK, 1001, 5001), None);
    assert_eq!(x.verdict, Verdict::Redirect);
    let f = m.ct[&fwd_key()];
    assert_eq!(f.state & CT_ESTABLISHED, CT_ESTABLISHED);
    assert_eq!(
        (f.wscale, f.peer_wscale, f.seq_end, f.ack_max),
        (7, 2, 1001, 5001)
    );
    assert_eq!(f.track & TRACK_ACK_SEEN, TRACK_ACK_SEEN);
}

#[test]
fn a_handshake_tracks_both_sides_and_their_window_scales() {
    let mut m = model();
    established(&mut m);
    let r = m.ct[&m.ct[&fwd_key()].peer_key()];
    assert_eq!(
        (r.wscale, r.peer_wscale, r.seq_end, r.ack_max),
        (2, 7, 5001, 1001)
    );
}

#[test]
fn only_an_exact_rst_closes() {
    let mut m = model();
    established(&mut m);
    // 2^30 past the next expected: out of window, nothing changes.
    let x = step(&mut m, from_client(RST, 1001 + (1 << 30), 0), None);
    assert_eq!(
        (x.verdict, x.drop),
        (Verdict::Drop, Some(DropReason::OutOfWindow))
    );
    // In the client's window, not exact: forwarded, the flow kept.
    let x = step(&mut m, from_backend(RST | ACK, 5001 + 100, 0), None);
    assert_eq!(x.verdict, Verdict::Redirect);
    assert_eq!(x.stat_delta(GlobalStat::RstInWindow), 1..=1);
    assert_eq!(m.ct[&fwd_key()].state & CT_RST, 0);
    let x = step(&mut m, from_client(RST, 1001, 0), None);
    assert_eq!(x.verdict, Verdict::Redirect);
    assert_eq!(m.ct[&fwd_key()].state & CT_RST, CT_RST);
}

#[test]
fn illegal_flags_create_nothing() {
    let mut m = model();
    for flags in [SYN | FIN, SYN | RST, 0, FIN, PSH] {
        let x = step(&mut m, from_client(flags, 1, 0), Some(40_000));
        assert_eq!(x.drop, Some(DropReason::BadFlags), "{flags:#x}");
    }
    assert!(m.ct.is_empty());
}

#[test]
fn a_syn_with_a_bad_checksum_or_ttl_1_creates_nothing() {
    let mut m = model();
    let mut s = from_client(SYN, 1, 0);
    s.tcp_csum_delta = 1;
    assert_eq!(
        step(&mut m, s, Some(40_000)).drop,
        Some(DropReason::BadChecksum)
    );
    let mut s = from_client(SYN, 1, 0);
    s.ttl = 1;
    assert_eq!(
        step(&mut m, s, Some(40_000)).drop,
        Some(DropReason::TtlExceeded)
    );
    // The other representation of zero is a right checksum.
    let mut s = from_client(SYN, 1, 0);
    s.negative_zero = true;
    assert_eq!(step(&mut m, s, Some(40_000)).verdict, Verdict::Redirect);
}

#[test]
fn a_segment_without_a_flow_is_answered_with_an_rst() {
    let mut m = model();
    let x = step(&mut m, from_client(ACK, 7, 0x1234_5678), None);
    assert_eq!(x.verdict, Verdict::Tx);
    let out = x.out.unwrap();
    assert_eq!(out.len(), 54);
    assert_eq!(
        &out[14 + 20 + 4..14 + 20 + 8],
        &0x1234_5678u32.to_be_bytes()
    );
    for rst in [RST, RST | ACK] {
        let x = step(&mut m, from_client(rst, 7, 0), None);
        assert_eq!(x.drop, Some(DropReason::NoFlow), "an RST is never answered");
    }
}

#[test]
fn syn_retransmissions_stay_unless_the_backend_left_or_the_isn_changed() {
    let mut m = model();
    step(&mut m, from_client(SYN, 1000, 0), Some(40_000));
    let x = step(&mut m, from_client(SYN, 1000, 0), None);
    assert_eq!(
        (x.verdict, x.stat_delta(GlobalStat::SynRebalanced)),
        (Verdict::Redirect, 0..=0)
    );
    m.backends.get_mut(&1).unwrap().flags = 0;
    let x = step(&mut m, from_client(SYN, 1000, 0), None);
    assert_eq!(x.stat_delta(GlobalStat::SynRebalanced), 1..=1);
    assert_eq!(x.drop, Some(DropReason::NoBackend));
    assert!(m.ct.is_empty());
}

#[test]
fn the_first_syn_ack_must_acknowledge_the_syn() {
    let mut m = model();
    step(&mut m, from_client(SYN, 1000, 0), Some(40_000));
    let x = step(&mut m, from_backend(SYN | ACK, 5000, 1002), None);
    assert_eq!(x.drop, Some(DropReason::OutOfWindow));
    assert_eq!(m.ct[&fwd_key()].state & CT_SYN_ACK_SEEN, 0);
}

#[test]
fn an_aged_next_hop_is_revalidated_through_the_kernel() {
    for mode in AttachMode::ALL {
        let mut m = model();
        established(&mut m);
        let f = m.ct.get_mut(&fwd_key()).unwrap();
        f.nexthop_ns = CLOCK.lo - 2 * m.nexthop_max_age_ns;
        let (was, data) = (*f, from_client(ACK | PSH, 1001, 5001));
        let frame = data.build();
        let x = step_in(&mut m, mode, data, None);
        let now = m.ct[&fwd_key()];
        assert_eq!(now.packets, was.packets + 1, "{mode}: tracked either way");
        match mode {
            // Handed to the kernel as it came, for TC to send through the neighbour output.
            AttachMode::Xdp => {
                assert_eq!(
                    (x.verdict, x.out.as_deref()),
                    (Verdict::Pass, Some(&frame[..]))
                );
                assert_eq!(x.stat_delta(GlobalStat::Forwarded), 0..=0);
                assert_eq!(x.stat_delta(GlobalStat::Passed), 0..=0);
                assert_eq!(now.nexthop_ns, was.nexthop_ns);
            }
            AttachMode::Tc => {
                assert_eq!(x.verdict, Verdict::Redirect);
                assert_eq!(x.stat_delta(GlobalStat::NeighRevalidations), 0..=1);
                assert_eq!(x.stat_delta(GlobalStat::Forwarded), 1..=1);
            }
        }
    }
}

#[test]
fn xdp_completes_a_partial_checksum_and_tc_trusts_only_its_skb() {
    let partial = |mut s: Segment| {
        s.partial_csum = true;
        s
    };
    // XDP: a SYN with a partial checksum makes a flow, and leaves with a whole checksum.
    let mut m = model();
    let x = step(&mut m, partial(from_client(SYN, 1000, 0)), Some(40_000));
    assert_eq!(x.verdict, Verdict::Redirect);
    assert_eq!(x.stat_delta(GlobalStat::PartialChecksums), 1..=1);
    crate::packet::parse_checked(x.out.as_deref().unwrap());
    // TC on a bare frame (no skb saying CHECKSUM_PARTIAL): a wrong checksum.
    let mut m = model();
    let x = step_in(
        &mut m,
        AttachMode::Tc,
        partial(from_client(SYN, 1000, 0)),
        Some(40_000),
    );
    assert_eq!(x.drop, Some(DropReason::BadChecksum));
    // XDP: a segment longer than the datapath sums goes to the kernel as it came.
    let mut m = model();
    established(&mut m);
    let mut long = partial(from_client(ACK | PSH, 1001, 5001));
    long.payload_len = 1600;
    let frame = long.build();
    let x = step(&mut m, long, None);
    assert_eq!(
        (x.verdict, x.out.as_deref()),
        (Verdict::Pass, Some(&frame[..]))
    );
    assert_eq!(x.stat_delta(GlobalStat::PartialChecksums), 1..=1);
}
