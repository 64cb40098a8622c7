//! Conntrack: one global table holding, per connection, a forward entry (client → public,
//! keyed as it arrives) and a reverse entry (backend → SNAT). Look up the reply direction
//! first (it is the only kind of entry keyed by a SNAT address), then the forward one.

use aya_ebpf::bindings::BPF_NOEXIST;
use gateway_common::{
    DropReason, GlobalStat,
    maps::{
        CT_BACKEND_CLOSED_FIRST, CT_ESTABLISHED, CT_FIN_FORWARD, CT_FIN_REVERSE, CT_RST,
        CT_SYN_ACK_SEEN, DIR_FORWARD, DIR_REVERSE, Flow, FlowKey4, LAST_SEEN_GRANULARITY_NS,
        TCP_MAX_WSCALE, TRACK_ACK_SEEN, TRACK_LIBERAL, TRACK_PROXIED, TRACK_WSCALE_OFFERED,
        is_closed, max_window, seq_after, seq_before,
    },
    net::tcp_flags::{ACK, FIN, RST, SYN},
};

use crate::{csum, maps::CONNTRACK, parse::TcpPacket, ratelimit, stats, synproxy};

/// The most data a SYN that creates a flow carries: its checksum is verified over at most
/// [`csum::SEGMENT_MAX`] bytes of TCP segment, a header included (so in fact a little less).
pub const SYN_DATA_MAX: u32 = csum::SEGMENT_MAX as u32;

/// The entry of `key`, if any.
#[inline(always)]
pub fn lookup(key: &FlowKey4) -> Option<*mut Flow> {
    CONNTRACK.get_ptr_mut(key)
}

/// Removes both entries of the connection `flow` belongs to (`key` is `flow`'s own key).
#[inline(always)]
pub fn remove_pair(key: &FlowKey4, flow: &Flow) {
    let _ = CONNTRACK.remove(flow.peer_key());
    let _ = CONNTRACK.remove(key);
}

/// A connection's pair of entries being inserted, both with `BPF_NOEXIST`; this type owns the
/// pair's insert and its rollback. [`Claim::reverse`] inserts the reverse entry first: its
/// failure with EEXIST means "this SNAT port is taken", which the caller retries with another
/// port. The forward entry is then completed on the caller's stack (state, counters, next
/// hop) and inserted by [`Claim::commit`], which removes the reverse entry if that fails.
/// Every path from a claim commits it (a claim dropped uncommitted would leave its reverse
/// entry to expire).
#[must_use = "a claimed pair is committed, or its reverse entry is left behind"]
pub struct Claim {
    reverse_key: FlowKey4,
}

impl Claim {
    /// Inserts `reverse` at `reverse_key`: the claim of its SNAT port. `None`: the key is
    /// taken.
    #[inline(always)]
    pub fn reverse(reverse_key: &FlowKey4, reverse: &Flow) -> Result<Option<Claim>, DropReason> {
        match CONNTRACK.insert(reverse_key, reverse, u64::from(BPF_NOEXIST)) {
            Ok(()) => Ok(Some(Claim {
                reverse_key: *reverse_key,
            })),
            Err(e) if e == -EEXIST => Ok(None),
            Err(e) => Err(insert_error(e)),
        }
    }

    /// Inserts the completed `forward` entry at `key`, making the pair; if that fails, removes
    /// the reverse entry.
    #[inline(always)]
    pub fn commit(self, key: &FlowKey4, forward: &Flow) -> Result<(), DropReason> {
        if let Err(e) = CONNTRACK.insert(key, forward, u64::from(BPF_NOEXIST)) {
            let _ = CONNTRACK.remove(self.reverse_key);
            return Err(insert_error(e));
        }
        Ok(())
    }
}

/// Why an insert failed: the table is full (`E2BIG`: a preallocated hash map has no free
/// element; nothing is evicted for a new flow), or anything else.
#[inline(always)]
fn insert_error(e: i32) -> DropReason {
    if e == -E2BIG {
        DropReason::ConntrackFull
    } else {
        DropReason::ConntrackInsert
    }
}

const E2BIG: i32 = 7;
const EEXIST: i32 = 17;

/// Follows one segment of the connection `flow` belongs to (`flow` is the entry it was found
/// under: its sender's) through the connection's state and sequence space, as the
/// specification in `docs/datapath.md` ("Sequence tracking") says, after netfilter's
/// `tcp_in_window` and RFC 5961:
/// - an RST closes only at the exact sequence number; inside the receiver's window it is
///   forwarded without closing (counted `rst_in_window`), outside it is refused;
/// - a FIN changes state only inside the receiver's window; the SYN-ACK only when it
///   acknowledges the client's SYN (with or without the SYN's data); the handshake's last ACK
///   only when it acknowledges the SYN-ACK;
/// - every other segment must lie within the widest window its receiver can advertise of what
///   its sender has sent (and acknowledged), checked on `flow` alone: no peer lookup.
///
/// Refused: `Err(OutOfWindow)`, and nothing changed. Accepted: the sender's tracking advances;
/// a state change (SYN-ACK, established, FIN, RST) is written to both entries, with the time.
/// `wscale`: the window scale a SYN-ACK offers (the caller parses it for a flow's first one).
#[inline(always)]
pub fn track(
    flow: &mut Flow,
    pkt: &TcpPacket,
    wscale: Option<u8>,
    now: u64,
) -> Result<(), DropReason> {
    let f = pkt.flags;
    let forward = flow.direction == DIR_FORWARD;
    let end = pkt.end();
    // State bits to set on both entries, and the peer entry once looked up.
    let mut set = 0u8;
    let mut peer: Option<*mut Flow> = None;
    if flow.track & TRACK_LIBERAL != 0 {
        // Carried over from a table without tracking: learn, and close as before tracking.
        learn(flow, pkt, end);
        set = closing_bits(flow, f);
    } else if f & RST != 0 {
        let p = lookup(&flow.peer_key());
        peer = p;
        // SAFETY: a conntrack value pointer, read here.
        match rst_verdict(flow, p.map(|p| unsafe { &*p }), pkt) {
            Rst::Exact => {
                // The RST that ends the connection passes an empty bucket (a rate limit must
                // never strand state); the same again, as any packet (issue 18).
                if flow.state & CT_RST != 0 {
                    ratelimit::admit_rst(flow, now)?;
                }
                set = CT_RST;
            }
            Rst::InWindow => {
                // Not the end of anything (the receiver answers it with a challenge ACK): within
                // the rate limit, or RSTs would carry a client past it.
                ratelimit::admit_rst(flow, now)?;
                stats::global(GlobalStat::RstInWindow);
            }
            Rst::Outside => return Err(DropReason::OutOfWindow),
        }
    } else if f & SYN != 0 {
        if !forward && f & ACK != 0 && flow.state & CT_SYN_ACK_SEEN == 0 {
            // The backend's SYN-ACK: it must acknowledge the client's SYN.
            let p = lookup(&flow.peer_key()).ok_or(DropReason::OutOfWindow)?;
            // SAFETY: a conntrack value pointer; both entries of this connection are updated.
            let client = unsafe { &mut *p };
            if client.track & TRACK_LIBERAL != 0 {
                // A handshake carried over untracked: its numbers are learned, not checked.
                learn(flow, pkt, end);
            } else if client.seq_end.wrapping_sub(pkt.ack) > SYN_DATA_MAX {
                // It acknowledges the SYN with all, some or none of its data (a TFO server that
                // does not take the data acknowledges the ISN + 1 only: RFC 7413 §4.2.2), and
                // nothing beyond it.
                return Err(DropReason::OutOfWindow);
            } else {
                syn_ack(flow, client, pkt, wscale, end);
            }
            peer = Some(p);
            set = CT_SYN_ACK_SEEN;
        } else if forward && f & ACK == 0 {
            // A SYN the pipeline kept on this flow: a retransmission of a handshake in
            // progress, or a SYN on an established connection (the backend answers it with a
            // challenge ACK). Neither moves the tracking.
        } else {
            if flow.state & CT_SYN_ACK_SEEN == 0 {
                return Err(DropReason::OutOfWindow);
            }
            in_bounds(flow, pkt, end)?;
            advance(flow, pkt, end);
        }
    } else {
        // No segment but the handshake's is valid before the SYN-ACK.
        if flow.state & CT_SYN_ACK_SEEN == 0 {
            return Err(DropReason::OutOfWindow);
        }
        in_bounds(flow, pkt, end)?;
        if f & FIN != 0 {
            let p = lookup(&flow.peer_key());
            peer = p;
            // SAFETY: as above, read here.
            if !fin_in_window(flow, p.map(|p| unsafe { &*p }), pkt, end) {
                return Err(DropReason::OutOfWindow);
            }
            set = fin_bit(flow);
        }
        if forward
            && f & ACK != 0
            && flow.state & (CT_SYN_ACK_SEEN | CT_ESTABLISHED) == CT_SYN_ACK_SEEN
        {
            // The handshake's last ACK: established once it acknowledges the SYN-ACK.
            if peer.is_none() {
                peer = lookup(&flow.peer_key());
            }
            if let Some(p) = peer
                // SAFETY: as above, read here.
                && pkt.ack == unsafe { (*p).seq_end }
            {
                set |= CT_ESTABLISHED;
                // A handshake made from a SYN completed: one half-open flow less.
                synproxy::half_open_add(flow.app_id, -1);
            }
        }
        advance(flow, pkt, end);
    }
    if set & CT_FIN_REVERSE != 0 && flow.state & CT_FIN_FORWARD == 0 {
        // The backend closes first: it will hold the 4-tuple in TIME_WAIT (see `nat::create`).
        set |= CT_BACKEND_CLOSED_FIRST;
    }
    let new = flow.state | set;
    if is_closed(new)
        && !is_closed(flow.state)
        && new & CT_ESTABLISHED == 0
        && flow.track & TRACK_PROXIED == 0
    {
        // A handshake made from a SYN closed (RST, or FIN both ways) before it completed: one
        // half-open flow less.
        synproxy::half_open_add(flow.app_id, -1);
    }
    // A state change writes the entry anyway: its time is exact then, which the SNAT port
    // reuse of closed connections relies on (see `nat::SNAT_REUSE_IDLE_NS`).
    let exact = new != flow.state;
    if exact {
        flow.state = new;
        if peer.is_none() {
            peer = lookup(&flow.peer_key());
        }
        if let Some(p) = peer {
            // SAFETY: a conntrack value pointer from the map; state bits are or-ed in and
            // the time set, both plain stores of this connection's own entry.
            unsafe {
                (*p).state |= set;
                (*p).last_seen_ns = now;
            }
        }
    }
    if exact || now.wrapping_sub(flow.last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
        flow.last_seen_ns = now;
    }
    flow.packets += 1;
    flow.bytes += u64::from(pkt.l3_len);
    Ok(())
}

/// The FIN bit of `flow`'s direction.
#[inline(always)]
fn fin_bit(flow: &Flow) -> u8 {
    if flow.direction == DIR_FORWARD {
        CT_FIN_FORWARD
    } else {
        CT_FIN_REVERSE
    }
}

/// The state bits an RST or FIN sets without any check (entries carried over untracked).
#[inline(always)]
fn closing_bits(flow: &Flow, flags: u8) -> u8 {
    let mut set = 0;
    if flags & RST != 0 {
        set |= CT_RST;
    }
    if flags & FIN != 0 {
        set |= fin_bit(flow);
    }
    set
}

/// An entry carried over untracked learns its sender's numbers from its first segment.
#[inline(always)]
fn learn(flow: &mut Flow, pkt: &TcpPacket, end: u32) {
    flow.seq_end = end;
    if pkt.flags & ACK != 0 {
        flow.ack_max = pkt.ack;
        flow.track |= TRACK_ACK_SEEN;
    }
    flow.win_max = u32::from(pkt.window) << TCP_MAX_WSCALE;
    flow.track &= !TRACK_LIBERAL;
}

/// A new flow's forward entry (`flow`, as `nat::create` left it) takes the client's SYN `pkt`
/// (`offered`: its window scale): the client's numbers start (the window of a SYN is never
/// scaled), the offer is kept until the SYN-ACK decides, and the SYN is counted. Its peer's
/// tracking fields stay zero until the SYN-ACK ([`syn_ack`]).
#[inline(always)]
pub fn syn(flow: &mut Flow, pkt: &TcpPacket, offered: Option<u8>) {
    flow.seq_end = pkt.end();
    flow.win_max = u32::from(pkt.window);
    if let Some(shift) = offered {
        flow.wscale = shift;
        flow.track = TRACK_WSCALE_OFFERED;
    }
    flow.packets += 1;
    flow.bytes += u64::from(pkt.l3_len);
}

/// A proxied flow's forward entry (`flow`, as `nat::create` left it) takes the client's ACK
/// `pkt` that carried a valid SYN cookie (of MSS `mss`, for the client's ISN `isn`): the
/// client's numbers start at its ISN + 1 (the ACK's data, if any, is not taken), its
/// acknowledgement the cookie + 1, its window unscaled (the cookie's SYN-ACK offered no
/// scaling); the ACK is counted.
#[inline(always)]
pub fn proxied(flow: &mut Flow, pkt: &TcpPacket, isn: u32, mss: u16) {
    flow.seq_end = isn.wrapping_add(1);
    flow.proxy_mss = mss;
    flow.ack_max = pkt.ack;
    flow.win_max = u32::from(pkt.window);
    flow.track = TRACK_ACK_SEEN | TRACK_PROXIED;
    flow.packets += 1;
    flow.bytes += u64::from(pkt.l3_len);
}

/// A SYN-ACK from the backend of a proxied flow (`flow` its reverse entry), which answers the
/// SYN the gateway sent: it must acknowledge the client's ISN + 1. The first one fixes
/// `seq_delta` (its ISN less the client's cookie) in both entries, starts the backend's numbers
/// in the client's view and establishes the flow; a retransmission must carry the same ISN.
/// Returns the client's next sequence number and window, for the ACK that answers it
/// (`synproxy::backend_ack`).
#[inline(always)]
pub fn proxy_syn_ack(flow: &mut Flow, pkt: &TcpPacket, now: u64) -> Result<(u32, u16), DropReason> {
    if is_closed(flow.state) {
        // The client reset (or closed) before the backend answered: nobody to connect.
        return Err(DropReason::OutOfWindow);
    }
    let p = lookup(&flow.peer_key()).ok_or(DropReason::OutOfWindow)?;
    // SAFETY: a conntrack value pointer; both entries of this connection are updated.
    let client = unsafe { &mut *p };
    if pkt.ack != client.seq_end {
        return Err(DropReason::OutOfWindow);
    }
    let cookie = client.ack_max.wrapping_sub(1);
    if flow.state & CT_SYN_ACK_SEEN == 0 {
        let delta = pkt.seq.wrapping_sub(cookie);
        flow.seq_delta = delta;
        client.seq_delta = delta;
        flow.seq_end = cookie.wrapping_add(1);
        flow.ack_max = pkt.ack;
        flow.win_max = u32::from(pkt.window);
        flow.track = TRACK_ACK_SEEN | TRACK_PROXIED;
        let set = CT_SYN_ACK_SEEN | CT_ESTABLISHED;
        flow.state |= set;
        client.state |= set;
        flow.last_seen_ns = now;
        client.last_seen_ns = now;
        stats::global(GlobalStat::SynProxyEstablished);
    } else if pkt.seq.wrapping_sub(flow.seq_delta) != cookie {
        return Err(DropReason::OutOfWindow);
    }
    flow.packets += 1;
    flow.bytes += u64::from(pkt.l3_len);
    let window = if client.win_max > u32::from(u16::MAX) {
        u16::MAX
    } else {
        client.win_max as u16
    };
    Ok((client.seq_end, window))
}

/// An RST from the backend of a proxied flow (`flow` its reverse entry) before its SYN-ACK: if
/// it refuses the gateway's SYN (acknowledges the client's ISN + 1), `seq_delta` is set in both
/// entries so that the RST reaches the client at the cookie + 1, the sequence number the client
/// expects (it has been established since its cookie's ACK), rather than at the backend's 0.
/// The RST is then checked and forwarded as any backend's refusal (`track`).
#[inline(always)]
pub fn proxy_refused(flow: &mut Flow, pkt: &TcpPacket) {
    let Some(p) = lookup(&flow.peer_key()) else {
        return;
    };
    // SAFETY: a conntrack value pointer; both entries of this connection are updated.
    let client = unsafe { &mut *p };
    if pkt.flags & ACK != 0 && pkt.ack == client.seq_end {
        let delta = pkt.seq.wrapping_sub(client.ack_max);
        flow.seq_delta = delta;
        client.seq_delta = delta;
    }
}

/// The first SYN-ACK (from the backend, `flow` its entry; `offered` its window scale)
/// acknowledged the client's SYN (`client` its entry): the backend's numbers start, and window
/// scaling is on when both offered it (RFC 7323 §2.2), else off for both.
#[inline(always)]
fn syn_ack(flow: &mut Flow, client: &mut Flow, pkt: &TcpPacket, offered: Option<u8>, end: u32) {
    flow.seq_end = end;
    flow.ack_max = pkt.ack;
    flow.win_max = u32::from(pkt.window);
    flow.track = TRACK_ACK_SEEN;
    if offered.is_some() {
        flow.track |= TRACK_WSCALE_OFFERED;
    }
    match offered {
        Some(shift) if client.track & TRACK_WSCALE_OFFERED != 0 => {
            flow.wscale = shift;
            flow.peer_wscale = client.wscale;
            client.peer_wscale = shift;
        }
        _ => {
            flow.wscale = 0;
            flow.peer_wscale = 0;
            client.wscale = 0;
            client.peer_wscale = 0;
        }
    }
}

/// Whether a segment `pkt` (ending at `end`) lies within what `flow`'s sender can send and
/// acknowledge: its sequence numbers no more than the receiver's widest possible window from
/// `seq_end`, its acknowledgement no more than the sender's own widest window from `ack_max`.
#[inline(always)]
fn in_bounds(flow: &Flow, pkt: &TcpPacket, end: u32) -> Result<(), DropReason> {
    let rcv = max_window(flow.peer_wscale);
    if seq_before(end, flow.seq_end.wrapping_sub(rcv))
        || seq_after(pkt.seq, flow.seq_end.wrapping_add(rcv))
    {
        return Err(DropReason::OutOfWindow);
    }
    if pkt.flags & ACK != 0 && flow.track & TRACK_ACK_SEEN != 0 {
        let snd = max_window(flow.wscale);
        if seq_after(pkt.ack, flow.ack_max.wrapping_add(snd))
            || seq_before(pkt.ack, flow.ack_max.wrapping_sub(snd))
        {
            return Err(DropReason::OutOfWindow);
        }
    }
    Ok(())
}

/// Moves `flow`'s sender tracking over an accepted segment.
#[inline(always)]
fn advance(flow: &mut Flow, pkt: &TcpPacket, end: u32) {
    if seq_after(end, flow.seq_end) {
        flow.seq_end = end;
    }
    if pkt.flags & ACK != 0
        && (flow.track & TRACK_ACK_SEEN == 0 || seq_after(pkt.ack, flow.ack_max))
    {
        flow.ack_max = pkt.ack;
        flow.track |= TRACK_ACK_SEEN;
    }
    // Windows of SYN segments are never scaled.
    let shift = if pkt.flags & SYN != 0 { 0 } else { flow.wscale };
    let window = u32::from(pkt.window) << shift;
    if window > flow.win_max {
        flow.win_max = window;
    }
}

/// What an RST is worth.
enum Rst {
    /// At the receiver's next expected sequence number: it closes the connection.
    Exact,
    /// In the receiver's window, not exact: forwarded, the receiver sends a challenge ACK.
    InWindow,
    /// Outside: refused.
    Outside,
}

/// The receiver's next expected sequence number and its window, as `flow`'s sender sees them:
/// the receiver's highest acknowledgement and largest window (`peer`, its entry), or before it
/// acknowledged anything what the sender has sent.
#[inline(always)]
fn receiver_window(flow: &Flow, peer: Option<&Flow>) -> (u32, u32) {
    match peer {
        Some(p) => {
            let nxt = if p.track & TRACK_ACK_SEEN != 0 {
                p.ack_max
            } else {
                flow.seq_end
            };
            (nxt, if p.win_max == 0 { 1 } else { p.win_max })
        }
        None => (flow.seq_end, 1),
    }
}

/// Judges an RST from `flow`'s sender (RFC 5961 §3.2, netfilter's `tcp_packet` RST rules).
#[inline(always)]
fn rst_verdict(flow: &Flow, peer: Option<&Flow>, pkt: &TcpPacket) -> Rst {
    if let Some(p) = peer
        && p.track & TRACK_LIBERAL != 0
    {
        return Rst::Exact;
    }
    if flow.direction == DIR_REVERSE && flow.state & CT_SYN_ACK_SEEN == 0 {
        // The backend refuses the SYN: valid when it acknowledges it (RFC 9293 §3.10.7.3).
        return match peer {
            Some(p) if pkt.flags & ACK != 0 && pkt.ack == p.seq_end => Rst::Exact,
            _ => Rst::Outside,
        };
    }
    let (nxt, wnd) = receiver_window(flow, peer);
    if pkt.seq == nxt || pkt.seq == flow.seq_end {
        Rst::Exact
    } else if !seq_before(pkt.seq, nxt) && seq_before(pkt.seq, nxt.wrapping_add(wnd)) {
        Rst::InWindow
    } else {
        Rst::Outside
    }
}

/// Whether a FIN from `flow`'s sender (its segment `pkt`, ending at `end`) overlaps the
/// receiver's window.
#[inline(always)]
fn fin_in_window(flow: &Flow, peer: Option<&Flow>, pkt: &TcpPacket, end: u32) -> bool {
    match peer {
        None => true,
        Some(p) if p.track & TRACK_LIBERAL != 0 => true,
        Some(_) => {
            let (nxt, wnd) = receiver_window(flow, peer);
            !seq_after(pkt.seq, nxt.wrapping_add(wnd)) && !seq_before(end, nxt)
        }
    }
}
