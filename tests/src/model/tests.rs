//! The model on its own (no kernel): issue 14's inputs through spec 14's rules.

use std::net::SocketAddrV4;

use gateway::datapath::AttachMode;
use gateway_common::{
    DropReason, GlobalStat,
    maps::{
        ADDR_PUBLIC, ADDR_SNAT, BACKEND_ACCEPTING, Backend4, CT_ESTABLISHED, CT_RST,
        CT_SYN_ACK_SEEN, FlowKey4, MAGLEV_SIZE, ServiceKey4, TRACK_ACK_SEEN, TRACK_PROXIED,
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
        ..Observed::default()
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

/// Issue 15: what a TCP output says beyond `parse_checked` (IPv4 without options): `seq`,
/// `ack`, window and options.
fn numbers(out: &[u8]) -> (u32, u32, u16, Vec<u8>) {
    let t = &out[14 + 20..];
    let word = |i: usize| u32::from_be_bytes(t[i..i + 4].try_into().unwrap());
    let doff = usize::from(t[12] >> 4) * 4;
    (
        word(4),
        word(8),
        u16::from_be_bytes([t[14], t[15]]),
        t[20..doff].to_vec(),
    )
}

/// Issue 15: the SYN proxy, through the model alone: at the cap a cookie, its ACK a proxied
/// flow and the SYN to the backend, the backend's SYN-ACK answered, then the backend's numbers
/// translated both ways.
#[test]
fn at_the_cap_a_cookie_then_a_proxied_handshake() {
    use crate::packet::parse_checked;
    use gateway_common::syncookie::{self, Handshake};
    let mut m = model();
    m.snat_ports = (40_000, 40_001);
    m.half_open_max = 1;
    m.cookie_key = [0x1111, 0x2222];
    step(&mut m, from_client(SYN, 1000, 0), Some(40_000));
    assert_eq!(m.half_open(1), 1);
    // Another client port at the cap: a cookie, nothing kept.
    let c2 = addr("192.0.2.2:40001");
    let mut syn = from_client(SYN, 7000, 0);
    syn.src = c2;
    syn.tcp_options = vec![2, 4, 0x05, 0x78]; // MSS 1400: the cookie carries 1300
    let x = step(&mut m, syn.clone(), None);
    assert_eq!(x.verdict, Verdict::Tx);
    assert_eq!(x.stat_delta(GlobalStat::SynCookiesSent), 1..=1);
    let out = x.out.unwrap();
    let p = parse_checked(&out);
    assert_eq!((p.src, p.dst, p.tcp_flags), (addr(SVC), c2, SYN | ACK));
    let (cookie, ack, window, options) = numbers(&out);
    assert_eq!((ack, window, options), (7001, 0, vec![2, 4, 0x05, 0x14]));
    let hs = Handshake {
        src_ip: ip_to_net(*c2.ip()),
        dst_ip: ip_to_net(*addr(SVC).ip()),
        src_port: c2.port().to_be(),
        dst_port: addr(SVC).port().to_be(),
        isn: 7000,
    };
    let counter = syncookie::counter(CLOCK.lo);
    assert_eq!(
        syncookie::check(&m.cookie_key, &hs, cookie, counter),
        Some(1300)
    );
    assert_eq!(m.ct.len(), 2);
    // A SYN with IPv4 options cannot have one.
    let mut opts = syn.clone();
    opts.ip_options = vec![1, 1, 1, 0];
    assert_eq!(
        step(&mut m, opts, None).drop,
        Some(DropReason::HalfOpenFull)
    );
    // A forged ACK: answered as any ACK without a flow.
    let mut forged = from_client(ACK, 7001, cookie.wrapping_add(2));
    forged.src = c2;
    let x = step(&mut m, forged, None);
    assert_eq!(
        (x.verdict, x.stat_delta(GlobalStat::RstNoFlow)),
        (Verdict::Tx, 1..=1)
    );
    // The right ACK: a proxied flow, and the SYN to the backend.
    let mut ack = from_client(ACK, 7001, cookie.wrapping_add(1));
    ack.src = c2;
    ack.window = 29_200;
    let x = step(&mut m, ack, Some(40_001));
    assert_eq!(x.verdict, Verdict::Redirect);
    assert_eq!(x.stat_delta(GlobalStat::SynCookiesAccepted), 1..=1);
    let out = x.out.unwrap();
    let p = parse_checked(&out);
    assert_eq!(
        (p.src, p.dst, p.tcp_flags, p.ttl),
        (addr("198.51.100.253:40001"), addr(BACKEND), SYN, 63)
    );
    assert_eq!(numbers(&out), (7000, 0, 29_200, vec![2, 4, 0x05, 0x14]));
    assert_eq!(m.half_open(1), 1, "a proxied flow is not half-open");
    let key = FlowKey4::from_addrs(c2, addr(SVC));
    let f = m.ct[&key];
    assert_eq!(f.track, TRACK_ACK_SEEN | TRACK_PROXIED);
    assert_eq!((f.seq_end, f.ack_max), (7001, cookie.wrapping_add(1)));
    // The backend's SYN-ACK: answered with the handshake's ACK.
    let snat = addr("198.51.100.253:40001");
    let mut sa = from_backend(SYN | ACK, 9000, 7001);
    sa.dst = snat;
    let x = step(&mut m, sa.clone(), None);
    assert_eq!(x.verdict, Verdict::Tx);
    assert_eq!(x.stat_delta(GlobalStat::SynProxyEstablished), 1..=1);
    let out = x.out.unwrap();
    let p = parse_checked(&out);
    assert_eq!((p.src, p.dst, p.tcp_flags), (snat, addr(BACKEND), ACK));
    assert_eq!(numbers(&out), (7001, 9001, 29_200, vec![]));
    let delta = 9000u32.wrapping_sub(cookie);
    for k in [key, m.ct[&key].peer_key()] {
        assert_eq!(m.ct[&k].seq_delta, delta);
        assert_eq!(m.ct[&k].state & CT_ESTABLISHED, CT_ESTABLISHED);
    }
    // Retransmitted: answered again; another ISN: not.
    assert_eq!(step(&mut m, sa.clone(), None).verdict, Verdict::Tx);
    sa.seq ^= 0x8000;
    assert_eq!(step(&mut m, sa, None).drop, Some(DropReason::OutOfWindow));
    // Data both ways, translated.
    let mut data = from_client(ACK | PSH, 7001, cookie.wrapping_add(1));
    data.src = c2;
    data.payload_len = 5;
    let x = step(&mut m, data, None);
    assert_eq!(x.verdict, Verdict::Redirect);
    let out = x.out.unwrap();
    parse_checked(&out);
    assert_eq!(numbers(&out).1, 9001);
    let mut back = from_backend(ACK | PSH, 9001, 7006);
    back.dst = snat;
    back.payload_len = 3;
    let x = step(&mut m, back, None);
    assert_eq!(x.verdict, Verdict::Redirect);
    let out = x.out.unwrap();
    parse_checked(&out);
    assert_eq!(numbers(&out).0, cookie.wrapping_add(1));
    // Tracked in the client's view.
    assert_eq!(m.ct[&m.ct[&key].peer_key()].seq_end, cookie.wrapping_add(4));
}

/// Issue 15: a handshake completed from a SYN takes its flow off the half-open count; a scan
/// sets the count to the table's.
#[test]
fn the_half_open_count_follows_handshakes_and_scans() {
    let mut m = model();
    step(&mut m, from_client(SYN, 1000, 0), Some(40_000));
    assert_eq!((m.half_open(1), m.half_open_exact(1)), (1, 1));
    step(&mut m, from_backend(SYN | ACK, 5000, 1001), None);
    step(&mut m, from_client(ACK, 1001, 5001), None);
    assert_eq!((m.half_open(1), m.half_open_exact(1)), (0, 0));
    assert_eq!((m.half_open(0), m.half_open_exact(0)), (0, 0));
    // Reset before it completes: one less too (dc1e317), in slot 0 as well.
    let mut m = model();
    step(&mut m, from_client(SYN, 1000, 0), Some(40_000));
    assert_eq!(m.half_open(0), 1);
    step(&mut m, from_client(RST, 1001, 0), None);
    assert_eq!((m.half_open(1), m.half_open_exact(1)), (0, 0));
    assert_eq!(m.half_open(0), 0);
    // Started over before it completes (another ISN): one less, one more.
    let mut m = model();
    step(&mut m, from_client(SYN, 1000, 0), Some(40_000));
    let x = step(&mut m, from_client(SYN, 90_000, 0), Some(40_000));
    assert_eq!(x.stat_delta(GlobalStat::SynRebalanced), 1..=1);
    assert_eq!((m.half_open(1), m.half_open(0)), (1, 1));
}

/// Issue 15 (dc1e317): all apps' half-open flows together are capped too (slot 0); at the cap
/// a SYN that starts a closed flow over removes its old pair before its cookie is sent.
#[test]
fn the_global_cap_gives_cookies_and_a_closed_flow_goes_first() {
    let mut m = model();
    m.snat_ports = (40_000, 40_001);
    m.half_open_max = 100;
    m.half_open_global_max = 1;
    step(&mut m, from_client(SYN, 1000, 0), Some(40_000));
    step(&mut m, from_client(FIN, 1001, 0), None); // dropped: no SYN-ACK yet
    // Closed by an RST: one less; then a new SYN starts it over.
    step(&mut m, from_client(RST, 1001, 0), None);
    assert_eq!(m.half_open(0), 0);
    let c2 = addr("192.0.2.2:40001");
    let mut other = from_client(SYN, 3000, 0);
    other.src = c2;
    step(&mut m, other, Some(40_001));
    assert!(m.half_open_full(1), "all apps at the global cap");
    let x = step(&mut m, from_client(SYN, 50_000, 0), None);
    assert_eq!(x.stat_delta(GlobalStat::SynCookiesSent), 1..=1);
    assert_eq!(
        x.entries.get(&fwd_key()),
        Some(&None),
        "the old pair removed"
    );
    assert!(!m.ct.contains_key(&fwd_key()));
    // With IPv4 options at the cap: dropped, nothing removed.
    let mut m2 = m.clone();
    step(&mut m2, from_client(SYN, 1000, 0), None);
    let mut opts = from_client(SYN, 60_000, 0);
    opts.ip_options = vec![1, 1, 1, 0];
    let x = step(&mut m2, opts, None);
    assert_eq!(x.drop, Some(DropReason::HalfOpenFull));
    assert!(x.entries.is_empty());
}

/// Issue 15: when the run's clock straddles a cookie counter step, the model takes the counter
/// the datapath's answer shows: the low bits heading the cookie it sent, or (for a cookie valid
/// in one of the two counters only) whether it answered the ACK with an RST.
#[test]
fn a_clock_straddling_a_counter_step_takes_the_datapaths_counter() {
    use gateway_common::syncookie::{self, Handshake};
    let step_ns = 1u64 << 36;
    let k = 1000u64;
    let clock = Clock {
        lo: k * step_ns - 5_000_000,
        hi: k * step_ns + 5_000_000,
    };
    let mut m = model();
    m.snat_ports = (40_000, 40_001);
    m.half_open_max = 1;
    m.cookie_key = [3, 4];
    let seen = |out_seg| Observed {
        out_seg,
        ..Observed::default()
    };
    m.step(
        &from_client(SYN, 1000, 0).build(),
        AttachMode::Tc,
        clock,
        Observed {
            snat_port: Some(40_000),
            ..Observed::default()
        },
    );
    let c2 = addr("192.0.2.2:40001");
    let hs = Handshake {
        src_ip: ip_to_net(*c2.ip()),
        dst_ip: ip_to_net(*addr(SVC).ip()),
        src_port: c2.port().to_be(),
        dst_port: addr(SVC).port().to_be(),
        isn: 7000,
    };
    let mut syn = from_client(SYN, 7000, 0);
    syn.src = c2;
    // The later first: the app last gave cookies in the earlier counter (`gw_cookies_v1`), so
    // that ACKs are checked in both.
    for counter in [k, k - 1] {
        let cookie = syncookie::make(&m.cookie_key, &hs, counter, 0);
        let x = m.step(
            &syn.build(),
            AttachMode::Tc,
            clock,
            seen(Some((SYN | ACK, cookie))),
        );
        assert_eq!(
            numbers(&x.out.unwrap()).0,
            cookie,
            "made in counter {counter}"
        );
    }
    // A cookie made two counters before the later one: valid in the earlier counter only.
    let old = syncookie::make(&m.cookie_key, &hs, k - 2, 0);
    let mut ack = from_client(ACK, 7001, old.wrapping_add(1));
    ack.src = c2;
    let x = m.clone().step(
        &ack.build(),
        AttachMode::Tc,
        clock,
        seen(Some((RST, old.wrapping_add(1)))),
    );
    assert_eq!(
        x.stat_delta(GlobalStat::RstNoFlow),
        1..=1,
        "read the later counter"
    );
    let x = m.step(
        &ack.build(),
        AttachMode::Tc,
        clock,
        Observed {
            snat_port: Some(40_001),
            out_seg: Some((SYN, 7000)),
            ..Observed::default()
        },
    );
    assert_eq!(
        x.stat_delta(GlobalStat::SynCookiesAccepted),
        1..=1,
        "read the earlier counter"
    );
}

/// Issue 15 (dc1e317): ACKs are checked for cookies only while the app gives them; a lost
/// cookie ACK: the client's zero-window probe (`seq` its ISN) is taken as it; a lost SYN to the
/// backend: the client's bare ACK carries it again, untracked; the backend's refusal reaches
/// the client at the cookie + 1.
#[test]
fn a_lost_cookie_ack_and_a_lost_proxy_syn_recover() {
    use crate::packet::parse_checked;
    use gateway_common::syncookie::{self, Handshake};
    let mut m = model();
    m.snat_ports = (40_000, 40_001);
    m.half_open_max = 1;
    m.cookie_key = [5, 6];
    step(&mut m, from_client(SYN, 1000, 0), Some(40_000));
    let c2 = addr("192.0.2.2:40001");
    let hs = Handshake {
        src_ip: ip_to_net(*c2.ip()),
        dst_ip: ip_to_net(*addr(SVC).ip()),
        src_port: c2.port().to_be(),
        dst_port: addr(SVC).port().to_be(),
        isn: 7000,
    };
    let cookie = syncookie::make(&m.cookie_key, &hs, syncookie::counter(CLOCK.lo), 0);
    // The app gave no cookie yet: even a valid one is not checked.
    let mut ack = from_client(ACK, 7001, cookie.wrapping_add(1));
    ack.src = c2;
    let x = step(&mut m.clone(), ack, Some(40_001));
    assert_eq!(x.stat_delta(GlobalStat::RstNoFlow), 1..=1);
    let mut syn = from_client(SYN, 7000, 0);
    syn.src = c2;
    let x = step(&mut m, syn, None);
    assert_eq!(numbers(&x.out.unwrap()).0, cookie);
    // The zero-window probe at the ISN: the cookie's ACK.
    let mut probe = from_client(ACK, 7000, cookie.wrapping_add(1));
    probe.src = c2;
    probe.window = 1000;
    let x = step(&mut m, probe.clone(), Some(40_001));
    assert_eq!(x.stat_delta(GlobalStat::SynCookiesAccepted), 1..=1);
    let out = x.out.unwrap();
    assert_eq!(parse_checked(&out).tcp_flags, SYN);
    assert_eq!(numbers(&out), (7000, 0, 1000, vec![2, 4, 0x02, 0x18]));
    let key = FlowKey4::from_addrs(c2, addr(SVC));
    let f = m.ct[&key];
    assert_eq!((f.seq_end, f.proxy_mss, f.packets), (7001, 536, 1));
    // Again: the SYN again, nothing tracked.
    let x = step(&mut m, probe, None);
    assert_eq!(x.verdict, Verdict::Redirect);
    assert_eq!(x.stat_delta(GlobalStat::SynCookiesAccepted), 0..=0);
    let out = x.out.unwrap();
    assert_eq!(parse_checked(&out).tcp_flags, SYN);
    assert_eq!(numbers(&out).0, 7000);
    assert_eq!(m.ct[&key].packets, 1);
    // The backend refuses the SYN: its RST reaches the client at the cookie + 1.
    let mut rst = from_backend(RST | ACK, 0, 7001);
    rst.dst = addr("198.51.100.253:40001");
    let x = step(&mut m, rst, None);
    assert_eq!(x.verdict, Verdict::Redirect);
    assert_eq!(numbers(&x.out.unwrap()).0, cookie.wrapping_add(1));
    assert_eq!(m.ct[&key].state & CT_RST, CT_RST);
}
