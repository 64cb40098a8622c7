//! What a segment of an existing flow does to its conntrack pair: spec-14 §4 (with §12's
//! carried-over entries), and today's rules (`Rules::Legacy`: state bits only, no sequence
//! checks). Pure functions of the entries and the segment; `super` applies the decision.

use gateway_common::{
    DropReason, GlobalStat,
    maps::{
        CT_ESTABLISHED, CT_FIN_FORWARD, CT_FIN_REVERSE, CT_RST, CT_SYN_ACK_SEEN, CT_SYN_SEEN,
        DIR_FORWARD, Flow, TRACK_ACK_SEEN, TRACK_LIBERAL, TRACK_WSCALE_OFFERED, is_closed,
        max_window, seq_after, seq_before,
    },
    net::tcp_flags::{ACK, CWR, ECE, FIN, PSH, RST, SYN, URG},
};

use super::wire::Seg;

/// netfilter's `tcp_valid_flags` (spec §3.2): with PSH, ECE and CWR masked out, the flag
/// combinations a valid segment can carry. (The model keeps its own list rather than the
/// datapath's table: it is an implementation of the rules apart from the datapath's.)
pub const VALID_FLAGS: [u8; 9] = [
    SYN,
    SYN | URG,
    SYN | ACK,
    RST,
    RST | ACK,
    FIN | ACK,
    FIN | ACK | URG,
    ACK,
    ACK | URG,
];

/// Whether a segment with `flags` can be valid ([`VALID_FLAGS`]).
pub fn valid_flags(flags: u8) -> bool {
    VALID_FLAGS.contains(&(flags & !(PSH | ECE | CWR)))
}

/// What to do with a segment of an existing flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Translate and send it on.
    Forward,
    Drop(DropReason),
    /// Remove the pair and handle the SYN as a new flow (`rebalanced`: counted as
    /// `syn_rebalanced`).
    NewFlow {
        rebalanced: bool,
    },
}

/// A decision on a segment of an existing flow: the entries' tracking after it (state bits
/// apart, in `set`).
#[derive(Clone, Copy, Debug)]
pub struct Decision {
    pub action: Action,
    /// The sender's entry, tracking fields updated.
    pub es: Flow,
    /// The peer's entry, when the segment changes its tracking fields (a first SYN-ACK).
    pub er: Option<Flow>,
    /// `CT_*` bits set on both entries.
    pub set: u8,
    /// A counter this decision counts (`rst_in_window`).
    pub stat: Option<GlobalStat>,
}

impl Decision {
    fn new(es: &Flow, action: Action) -> Self {
        Decision {
            action,
            es: *es,
            er: None,
            set: 0,
            stat: None,
        }
    }
}

fn fin_bit(forward: bool) -> u8 {
    if forward {
        CT_FIN_FORWARD
    } else {
        CT_FIN_REVERSE
    }
}

/// The larger of two sequence numbers (modulo 2^32).
fn seq_max(a: u32, b: u32) -> u32 {
    if seq_after(b, a) { b } else { a }
}

/// Today's rules: the state bits a segment sets (gateway-ebpf's `conntrack::track` before
/// spec 14), and a SYN on a closed forward entry starts afresh.
pub fn legacy(es: &Flow, flags: u8) -> Decision {
    let forward = es.direction == DIR_FORWARD;
    if flags & (SYN | ACK) == SYN && forward && is_closed(es.state) {
        return Decision::new(es, Action::NewFlow { rebalanced: false });
    }
    let mut d = Decision::new(es, Action::Forward);
    d.set = legacy_bits(es, flags);
    d
}

/// The state bits today's `track` sets for `flags` on `es`.
pub fn legacy_bits(es: &Flow, flags: u8) -> u8 {
    let forward = es.direction == DIR_FORWARD;
    let mut set = 0;
    if flags & RST != 0 {
        set |= CT_RST;
    }
    if flags & FIN != 0 {
        set |= fin_bit(forward);
    }
    if !forward && flags & (SYN | ACK) == SYN | ACK {
        set |= CT_SYN_ACK_SEEN;
    }
    if forward && flags & (SYN | ACK) == ACK && es.state & CT_SYN_ACK_SEEN != 0 {
        set |= CT_ESTABLISHED;
    }
    if forward && flags & SYN != 0 {
        set |= CT_SYN_SEEN;
    }
    set
}

/// Spec-14 §4 (and §12) for segment `seg` found under `es`, whose peer entry is `er`.
/// `wscale` is the segment's window scale offer (parsed on SYNs only), `accepting` whether
/// `es`'s backend accepts new flows.
pub fn spec14(
    es: &Flow,
    er: Option<&Flow>,
    seg: &Seg,
    wscale: Option<u8>,
    accepting: bool,
) -> Decision {
    let f = seg.flags;
    let (syn, ack, rst, fin) = (f & SYN != 0, f & ACK != 0, f & RST != 0, f & FIN != 0);
    let forward = es.direction == DIR_FORWARD;
    let len = seg.payload + u32::from(syn) + u32::from(fin);
    let end = seg.seq.wrapping_add(len);
    let mut d = Decision::new(es, Action::Forward);

    // §4.1 (and, before tracking as now, §12): a SYN on a closed connection starts afresh.
    if syn && !ack && forward && is_closed(es.state) {
        d.action = Action::NewFlow { rebalanced: false };
        return d;
    }
    // §12: a carried-over entry learns from its next segment, unchecked.
    if es.track & TRACK_LIBERAL != 0 {
        d.es.seq_end = end;
        if ack {
            d.es.ack_max = seg.ack;
            d.es.track |= TRACK_ACK_SEEN;
        }
        d.es.win_max = u32::from(seg.window) << 14;
        d.es.track &= !TRACK_LIBERAL;
        if rst {
            d.set |= CT_RST;
        } else if fin {
            d.set |= fin_bit(forward);
        }
        return d;
    }
    // §4.1: a SYN on a forward entry.
    if syn && !ack && forward {
        // The flow's ISN: `seq` within what its first SYN covered (1 + at most 1535 bytes).
        let covered = es.seq_end.wrapping_sub(seg.seq);
        if es.state & CT_ESTABLISHED == 0 && (!accepting || !(1..=1536).contains(&covered)) {
            d.action = Action::NewFlow { rebalanced: true };
        }
        return d;
    }
    // §4.2: the first SYN-ACK.
    if syn && ack && !forward && es.state & CT_SYN_ACK_SEEN == 0 {
        let Some(er) = er else {
            d.action = Action::Drop(DropReason::OutOfWindow);
            return d;
        };
        // §12: a handshake carried over untracked: the SYN-ACK's numbers are learned.
        if er.track & TRACK_LIBERAL != 0 {
            d.es.seq_end = end;
            d.es.ack_max = seg.ack;
            d.es.track |= TRACK_ACK_SEEN;
            d.es.win_max = u32::from(seg.window) << 14;
            d.set = CT_SYN_ACK_SEEN;
            return d;
        }
        // It acknowledges the SYN with all, some or none of its data (RFC 7413 §4.2.2: a TFO
        // server that does not take the data acknowledges the ISN + 1): at most 1535 bytes (the
        // most a SYN that created a flow carries) before the client's end.
        if er.seq_end.wrapping_sub(seg.ack) > 1535 {
            d.action = Action::Drop(DropReason::OutOfWindow);
            return d;
        }
        d.es.seq_end = seg.seq.wrapping_add(1).wrapping_add(seg.payload);
        d.es.ack_max = seg.ack;
        d.es.track |= TRACK_ACK_SEEN;
        // §1: the bit says this side's SYN (or SYN-ACK) carried the option.
        if wscale.is_some() {
            d.es.track |= TRACK_WSCALE_OFFERED;
        }
        d.es.win_max = u32::from(seg.window);
        let mut r = *er;
        let client = (er.track & TRACK_WSCALE_OFFERED != 0).then_some(er.wscale);
        match (client, wscale) {
            (Some(c), Some(s)) => {
                (d.es.wscale, d.es.peer_wscale) = (s, c);
                (r.wscale, r.peer_wscale) = (c, s);
            }
            _ => {
                (d.es.wscale, d.es.peer_wscale) = (0, 0);
                (r.wscale, r.peer_wscale) = (0, 0);
            }
        }
        d.er = Some(r);
        d.set = CT_SYN_ACK_SEEN;
        return d;
    }
    let peer_liberal = er.is_some_and(|r| r.track & TRACK_LIBERAL != 0);
    // The receiver's next expected sequence number and window (§4.3).
    let (rcv_nxt, rcv_wnd) = match er {
        Some(r) if r.track & TRACK_ACK_SEEN != 0 => (r.ack_max, r.win_max.max(1)),
        Some(r) => (es.seq_end, r.win_max.max(1)),
        None => (es.seq_end, 1),
    };
    // §4.3: RSTs.
    if rst {
        // §12: the peer's numbers are not known yet: no check needs them.
        if peer_liberal {
            d.set = CT_RST;
        } else if !forward && es.state & CT_SYN_ACK_SEEN == 0 {
            if ack && er.is_some_and(|r| seg.ack == r.seq_end) {
                d.set = CT_RST;
            } else {
                d.action = Action::Drop(DropReason::OutOfWindow);
            }
        } else if seg.seq == rcv_nxt || seg.seq == es.seq_end {
            d.set = CT_RST;
        } else if !seq_before(seg.seq, rcv_nxt)
            && seq_before(seg.seq, rcv_nxt.wrapping_add(rcv_wnd))
        {
            d.stat = Some(GlobalStat::RstInWindow);
        } else {
            d.action = Action::Drop(DropReason::OutOfWindow);
        }
        return d;
    }
    // §4.4: every other segment.
    if es.state & CT_SYN_ACK_SEEN == 0 {
        d.action = Action::Drop(DropReason::OutOfWindow);
        return d;
    }
    let b_r = max_window(es.peer_wscale);
    let b_s = max_window(es.wscale);
    let seq_ok = !seq_before(end, es.seq_end.wrapping_sub(b_r))
        && !seq_after(seg.seq, es.seq_end.wrapping_add(b_r));
    let ack_ok = !ack
        || es.track & TRACK_ACK_SEEN == 0
        || (!seq_after(seg.ack, es.ack_max.wrapping_add(b_s))
            && !seq_before(seg.ack, es.ack_max.wrapping_sub(b_s)));
    let fin_ok = !fin
        || peer_liberal
        || (!seq_after(seg.seq, rcv_nxt.wrapping_add(rcv_wnd)) && !seq_before(end, rcv_nxt));
    if !(seq_ok && ack_ok && fin_ok) {
        d.action = Action::Drop(DropReason::OutOfWindow);
        return d;
    }
    d.es.seq_end = seq_max(es.seq_end, end);
    if ack {
        d.es.ack_max = if es.track & TRACK_ACK_SEEN != 0 {
            seq_max(es.ack_max, seg.ack)
        } else {
            seg.ack
        };
        d.es.track |= TRACK_ACK_SEEN;
    }
    // The windows of SYN and SYN-ACK segments are never scaled (§1).
    let shift = if syn { 0 } else { es.wscale };
    d.es.win_max = es.win_max.max(u32::from(seg.window) << shift);
    // A SYN on a reverse entry, or a SYN-ACK on a forward one, changes no state (§4.2).
    if !syn {
        if fin {
            d.set |= fin_bit(forward);
        }
        if forward
            && ack
            && es.state & CT_SYN_ACK_SEEN != 0
            && es.state & CT_ESTABLISHED == 0
            && er.is_some_and(|r| seg.ack == r.seq_end)
        {
            d.set |= CT_ESTABLISHED;
        }
    }
    d
}

/// The tracking fields of a new flow's forward entry (spec §5): the client's SYN. The reverse
/// entry's stay zero until the SYN-ACK (§4.2 sets both entries' shifts then; the client's
/// offer, kept in the forward entry, is all it needs).
pub fn new_flow_tracking(forward: &mut Flow, seg: &Seg, wscale: Option<u8>) {
    forward.seq_end = seg.seq.wrapping_add(1).wrapping_add(seg.payload);
    forward.ack_max = 0;
    forward.win_max = u32::from(seg.window);
    forward.wscale = wscale.unwrap_or(0);
    forward.peer_wscale = 0;
    forward.track = if wscale.is_some() {
        TRACK_WSCALE_OFFERED
    } else {
        0
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_valid_flag_combinations_are_netfilters() {
        let valid: Vec<u8> = (0..=255u8)
            .filter(|f| valid_flags(*f) && f & (PSH | ECE | CWR) == 0)
            .collect();
        assert_eq!(
            valid,
            vec![0x02, 0x04, 0x10, 0x11, 0x12, 0x14, 0x22, 0x30, 0x31]
        );
        assert!(valid_flags(SYN | ECE | CWR) && valid_flags(ACK | PSH));
        assert!(
            !valid_flags(SYN | FIN) && !valid_flags(0) && !valid_flags(PSH) && !valid_flags(FIN)
        );
    }
}
