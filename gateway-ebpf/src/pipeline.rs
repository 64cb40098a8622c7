//! The per-packet decisions shared by both attach modes: is the packet ours, which flow is it,
//! does a SYN create one, and where does it go next. The attach-mode code (`xdp`, `tc`) then
//! rewrites the headers (`nat::write_headers`), finishes the TCP checksum its own way and
//! forwards, or sends the RST that answers a segment without a flow (`reset`).
//!
//! The order of checks for a packet of ours (docs/datapath.md, "What the gateway looks at"):
//! conntrack lookup; flags (netfilter's valid combinations); TTL; then the flow's sequence
//! tracking (`conntrack::track`), or for a SYN to a service its checksums, then a new flow.

use aya_ebpf::cty::c_void;
use gateway_common::{
    DropReason, GlobalStat,
    maps::{
        ADDR_PUBLIC, ADDR_SNAT, CT_ESTABLISHED, CT_SYN_ACK_SEEN, DIR_FORWARD, Flow, ServiceKey4,
        TOA_PENDING, TRACK_LIBERAL, TRACK_PROXIED, is_closed,
    },
    net::{
        port_from_net,
        tcp_flags::{self, ACK, FIN, RST, SYN},
    },
};

use crate::{
    answer::Answer,
    clock::Now,
    conntrack::{self, Claim},
    csum, lb,
    maps::{CONFIG, SCRATCH, SERVICES},
    nat,
    nexthop::{self, NextHop},
    parse::{self, Bounds, ETH_LEN, IPV4_MIN_LEN, LoadBytes, Parsed, TcpPacket, parse},
    ratelimit, reset, stats, synproxy, toa,
};

/// What the attach mode's context gives the pipeline: packet bytes through its helper, and
/// what the kernel knows of a packet's checksum that its bytes do not say.
pub trait Context: LoadBytes {
    /// Whether this attach mode sends packets through the kernel's neighbour output itself
    /// (TC: `bpf_redirect_neigh`); XDP hands them to the kernel instead (see `nexthop`).
    const NEIGH_OUTPUT: bool;

    /// Whether the kernel vouches for the TCP checksum of `pkt` (a NIC verified it, or a
    /// sender on this host left it for the NIC to compute: CHECKSUM_UNNECESSARY or
    /// CHECKSUM_PARTIAL), so it need not be computed. Finding out may call helpers that move
    /// the packet: `b` is refreshed then.
    fn tcp_trusted(&self, b: &mut Bounds, pkt: &TcpPacket) -> bool;

    /// Makes the packet's first `len` bytes directly accessible, for what reads a whole
    /// segment (a SYN's checksum) rather than its headers; `b` is refreshed if the packet moved.
    /// Only asked where it is needed: it may copy the packet.
    fn linearize(&self, b: &mut Bounds, len: usize);

    /// The packets this one stands for on the wire (≥ 1): a GSO skb's segments (TC), 1 (XDP
    /// sees each frame). What a rate limit counts.
    fn segments(&self) -> u32;
}

/// A packet of a flow of ours, with where it goes next.
pub struct Translation<'a> {
    /// Whether the packet first becomes the segment written in `prepare`'s `answer` (a SYN
    /// cookie's ACK, or a proxied flow's client segment, becomes the SYN to the backend).
    pub pre: bool,
    pub pkt: TcpPacket,
    /// Its conntrack entry (state, counters and next hop already updated), or for a new flow
    /// the copy that was inserted.
    pub flow: &'a Flow,
    pub hop: NextHop,
}

/// What the attach mode does with a packet.
pub enum Verdict<'a> {
    /// Hand it to the kernel unchanged (counted as passed).
    Pass,
    /// Translate it and send it on.
    Translate(Translation<'a>),
    /// An ICMP error to a gateway address: `icmp::prepare` decides again, in a function of
    /// the attach mode's own (a BPF-to-BPF call). Verifier workaround: decided here, its
    /// states joined the TCP path's and went past the verifier's million instructions.
    Icmp,
    /// Write the segment `prepare` put in its `answer` over it and send it back where it came
    /// from (see `answer`): the RST answering a segment without a flow (`reset`), the SYN
    /// proxy's SYN-ACK with a cookie or ACK to the backend (`synproxy`).
    Answer,
}

/// What both attach modes do first: decide, and for a packet of ours resolve its next hop.
/// `ctx` is the program's context, `ingress_ifindex` the interface the packet came in on; a
/// new flow is built in this CPU's `SCRATCH` slot and inserted from there. `b` may be
/// refreshed (see [`Context`]). A segment of the gateway's own (an answer, or what the packet
/// becomes before it is translated) is written to `answer`, the caller's. Verifier workaround:
/// carried in the enums instead, its narrow fields were packed into registers with the
/// undefined rest of the other variants, which the verifier refuses to read (`!read_ok`).
#[inline(always)]
pub fn prepare<C: Context>(
    b: &mut Bounds,
    checks: &C,
    ctx: *mut c_void,
    ingress_ifindex: u32,
    answer: &mut Answer,
) -> Result<Verdict<'static>, DropReason> {
    match decide(b, checks, answer)? {
        Action::Pass => {
            stats::global(GlobalStat::Passed);
            Ok(Verdict::Pass)
        }
        Action::Reset => {
            stats::global(GlobalStat::RstNoFlow);
            Ok(Verdict::Answer)
        }
        Action::Answer => Ok(Verdict::Answer),
        Action::Icmp => Ok(Verdict::Icmp),
        Action::Existing { pkt, flow, now } => {
            // SAFETY: a conntrack value pointer; this CPU updates it in place.
            let flow = unsafe { &mut *flow };
            // A proxied flow whose backend has not answered: the client's segment becomes the
            // SYN to it again (`decide` let it through untracked). Verifier workaround: asked
            // again here (its first test, one bit of the flow, fails for every other flow)
            // rather than carried from `decide` in the action: a flag carried there doubled the
            // states of everything after and went past the verifier's million instructions.
            let pre = synproxy::resends_syn(flow, &pkt);
            if pre {
                *answer = synproxy::backend_syn(&pkt, flow.seq_end.wrapping_sub(1), flow.proxy_mss);
            }
            let hop = nexthop::resolve(ctx, ingress_ifindex, flow, now, C::NEIGH_OUTPUT);
            Ok(Verdict::Translate(Translation {
                pre,
                pkt,
                flow,
                hop,
            }))
        }
        Action::New {
            pkt,
            flow,
            claim,
            now,
            syn,
        } => {
            // The whole forward entry (state, counters, next hop) is built before it is
            // inserted: no lookup of it afterwards, no update in the map.
            let hop = nexthop::resolve(ctx, ingress_ifindex, flow, now, C::NEIGH_OUTPUT);
            nat::commit(claim, &pkt.key, flow)?;
            if !syn {
                // A flow made from a SYN is half-open until its handshake completes.
                synproxy::half_open_add(flow.app_id, 1);
            }
            Ok(Verdict::Translate(Translation {
                pre: syn,
                pkt,
                flow,
                hop,
            }))
        }
    }
}

/// What to do with a packet.
enum Action<'a> {
    /// Hand it to the kernel unchanged.
    Pass,
    /// Answer it with the RST written to the answer (counted `rst_no_flow`).
    Reset,
    /// Answer it with the segment of the SYN proxy's written to the answer.
    Answer,
    /// An ICMP error to a gateway address (see [`Verdict::Icmp`]).
    Icmp,
    /// Translate it with this conntrack entry (state and counters already updated); `now` is
    /// the time the decision was made (ns).
    Existing {
        pkt: TcpPacket,
        flow: *mut Flow,
        now: Now,
    },
    /// A SYN of a new flow, or a SYN cookie's ACK (then `syn`: the SYN it becomes is written to
    /// the answer): its
    /// reverse entry is in the table (`claim`), its forward entry is `flow` (this CPU's scratch
    /// slot), to insert once complete.
    New {
        pkt: TcpPacket,
        flow: &'a mut Flow,
        claim: Claim,
        now: Now,
        syn: bool,
    },
}

/// Classifies the packet in `b` and finds (or starts) its flow.
#[inline(always)]
fn decide<C: Context>(
    b: &mut Bounds,
    checks: &C,
    answer: &mut Answer,
) -> Result<Action<'static>, DropReason> {
    let Some(cfg) = CONFIG.get(0) else {
        return Ok(Action::Pass);
    };
    let mut pkt = match parse(b, |dst| cfg.addr_kind(dst))? {
        Parsed::Tcp(pkt) => pkt,
        Parsed::Icmp(_) => return Ok(Action::Icmp),
        Parsed::NotOurs => return Ok(Action::Pass),
    };
    // Only packets of ours read the clock, and the coarse one (CLOCK_MONOTONIC_COARSE, a few
    // ms of resolution, cached per tick): it serves idle times and next-hop ages.
    let now = Now::read(cfg);
    // A SYN that may open a connection: no ACK, FIN or RST (URG, PSH, ECE and CWR allowed).
    let syn = pkt.flags & (SYN | ACK | FIN | RST) == SYN;
    // Replies first: only reverse entries are keyed by a SNAT address.
    if let Some(flow) = conntrack::lookup(&pkt.key) {
        // SAFETY: a conntrack value pointer; this CPU updates it in place.
        let f = unsafe { &mut *flow };
        check_flags(&pkt)?;
        if synproxy::resends_syn(f, &pkt) {
            // The backend has not answered the proxy's SYN (lost, or slow): the client's next
            // segment (its zero-window probe, or its ACK again) carries the SYN again (in
            // `prepare`), as a client's own SYN retransmission would. Not tracked: nothing of
            // the flow moves.
            check_ttl(&pkt)?;
            ratelimit::admit(f, pkt.flags, now.ns, || checks.segments())?;
            return Ok(Action::Existing { pkt, flow, now });
        }
        if f.track & TRACK_PROXIED != 0 && f.direction != DIR_FORWARD {
            if pkt.flags & (SYN | ACK | RST | FIN) == SYN | ACK {
                // The backend's SYN-ACK to the proxy's SYN: answered with the handshake's ACK.
                if pkt.ihl() != IPV4_MIN_LEN {
                    return Err(DropReason::BadHeader);
                }
                // It fixes the flow's numbers for good: verified as a SYN is.
                if !(csum::ipv4_ok(b, &pkt)
                    && (checks.tcp_trusted(b, &pkt) || tcp_sum_ok(b, checks, &pkt)))
                {
                    return Err(DropReason::BadChecksum);
                }
                let (seq, window) = conntrack::proxy_syn_ack(f, &pkt, now.ns)?;
                *answer = synproxy::backend_ack(&pkt, seq, window, f);
                return Ok(Action::Answer);
            }
            if pkt.flags & RST != 0 && f.state & CT_SYN_ACK_SEEN == 0 {
                // The backend refuses the proxy's SYN: the client, established since its
                // cookie's ACK, gets the reset at the number it expects. Only an RST that goes
                // on (its TTL checked first) changes the flow's numbers.
                check_ttl(&pkt)?;
                conntrack::proxy_refused(f, &pkt);
            }
            // The backend's numbers in the client's view, tracked and sent so.
            pkt.seq = pkt.seq.wrapping_sub(f.seq_delta);
        }
        if !(syn && f.direction == DIR_FORWARD && starts_over(f, &pkt)) {
            check_ttl(&pkt)?;
            // Within its container's rate limit (issue 18), if its app has one, before the
            // flow's tracking takes it: a segment dropped here never reached the container (a
            // FIN taken, then dropped, closed the flow for the gateway alone). An RST is judged
            // by the tracking (`ratelimit::admit_rst`).
            ratelimit::admit(f, pkt.flags, now.ns, || checks.segments())?;
            // A SYN-ACK's window scale (only the first SYN-ACK of a flow uses it).
            let wscale = if pkt.flags & (SYN | ACK) == SYN | ACK && f.state & CT_SYN_ACK_SEEN == 0 {
                parse::window_scale(checks, &pkt)
            } else {
                None
            };
            // What the backend acknowledged before this segment (its SYN-ACK: the SYN).
            let acked = f.ack_max;
            conntrack::track(f, &pkt, wscale, now.ns)?;
            if f.toa & TOA_PENDING != 0
                && f.direction != DIR_FORWARD
                && toa::shows_established(&pkt, acked)
            {
                // The backend's end is established: the client's segments go on untouched.
                toa::backend_seen(f);
            }
            // A SYN that starts its connection over goes on below as a SYN without a flow (its
            // old pair is removed there, once it is known to make a new one).
            return Ok(Action::Existing { pkt, flow, now });
        }
    }
    if pkt.addr_kind & ADDR_PUBLIC != 0 {
        let svc = ServiceKey4::new(pkt.key.dst_ip, pkt.key.dst_port);
        if let Some(service) = SERVICES.get_ptr(svc) {
            check_flags(&pkt)?;
            // SAFETY: a value of the map, read once.
            let app_id = unsafe { (*service).app_id };
            if !syn {
                // An ACK alone may complete a handshake the SYN proxy answered with a cookie.
                let cookie =
                    if pkt.flags & (SYN | ACK | RST | FIN) == ACK && pkt.ihl() == IPV4_MIN_LEN {
                        synproxy::cookie_mss(cfg, app_id, &pkt, now.ns)
                    } else {
                        0
                    };
                if cookie == 0 {
                    return no_flow(pkt, DropReason::NoFlow, answer);
                }
                let (mss, isn) = ((cookie >> 32) as u16, cookie as u32);
                check_ttl(&pkt)?;
                // It makes a flow: verified as a SYN is.
                if !(csum::ipv4_ok(b, &pkt)
                    && (checks.tcp_trusted(b, &pkt) || tcp_sum_ok(b, checks, &pkt)))
                {
                    return Err(DropReason::BadChecksum);
                }
                stats::global(GlobalStat::SynCookiesAccepted);
                let slot = SCRATCH.get_ptr_mut(0).ok_or(DropReason::ConntrackInsert)?;
                // SAFETY: this CPU's own slot of a per-CPU array; nothing else uses it meanwhile.
                let forward = unsafe { &mut *slot };
                let claim = nat::create(
                    &pkt.key,
                    app_id,
                    cfg,
                    now.ns,
                    TRACK_PROXIED,
                    forward,
                    || checks.segments(),
                )?;
                conntrack::proxied(forward, &pkt, isn, mss);
                *answer = synproxy::backend_syn(&pkt, isn, mss);
                return Ok(Action::New {
                    pkt,
                    flow: forward,
                    claim,
                    now,
                    syn: true,
                });
            }
            check_ttl(&pkt)?;
            // A SYN claims a SNAT port for the handshake's timeout: verify it first.
            if !(csum::ipv4_ok(b, &pkt)
                && (checks.tcp_trusted(b, &pkt) || tcp_sum_ok(b, checks, &pkt)))
            {
                return Err(DropReason::BadChecksum);
            }
            // A flood, or a very busy app: a cookie instead of a flow (below).
            let full = synproxy::half_open_full(app_id, cfg);
            if full && pkt.ihl() != IPV4_MIN_LEN {
                return Err(DropReason::HalfOpenFull);
            }
            // The flow this SYN starts over, if any, goes now that the SYN passed every check,
            // not before; with a cookie too (its ACK would meet the old flow). Verifier
            // workaround: it is looked up again (a bucket the lookup above just read) rather
            // than remembered from there: a pointer or none carried across the checks made two
            // states of each, and verification took 45% longer.
            if let Some(old) = conntrack::lookup(&pkt.key) {
                // SAFETY: a conntrack value pointer, read here.
                let old = unsafe { &*old };
                // Unless another CPU made this very flow meanwhile (then its insert wins).
                if old.direction == DIR_FORWARD && starts_over(old, &pkt) {
                    // A connection that was not over is balanced afresh.
                    if !is_closed(old.state) {
                        stats::global(GlobalStat::SynRebalanced);
                        if old.track & TRACK_PROXIED == 0 {
                            // A handshake made from a SYN, not completed: one half-open less.
                            synproxy::half_open_add(old.app_id, -1);
                        }
                    }
                    conntrack::remove_pair(&pkt.key, old);
                }
            }
            if full {
                stats::global(GlobalStat::SynCookiesSent);
                let mss = parse::mss(checks, &pkt);
                *answer = synproxy::cookie_syn_ack(cfg, app_id, &pkt, mss, now.ns);
                return Ok(Action::Answer);
            }
            let wscale = parse::window_scale(checks, &pkt);
            // The forward entry is built in this CPU's scratch slot: a `Flow` does not fit the
            // BPF stack beside the rest of this path.
            let slot = SCRATCH.get_ptr_mut(0).ok_or(DropReason::ConntrackInsert)?;
            // SAFETY: this CPU's own slot of a per-CPU array; nothing else uses it meanwhile.
            let forward = unsafe { &mut *slot };
            let claim = nat::create(&pkt.key, app_id, cfg, now.ns, 0, forward, || {
                checks.segments()
            })?;
            conntrack::syn(forward, &pkt, wscale);
            return Ok(Action::New {
                pkt,
                flow: forward,
                claim,
                now,
                syn: false,
            });
        }
    }
    if pkt.addr_kind & ADDR_SNAT != 0 {
        let port = port_from_net(pkt.key.dst_port);
        if (cfg.snat_port_min..=cfg.snat_port_max).contains(&port) {
            check_flags(&pkt)?;
            return no_flow(pkt, DropReason::NoReplyFlow, answer);
        }
    }
    Ok(Action::Pass)
}

/// Refuses a flag combination no valid segment has.
#[inline(always)]
fn check_flags(pkt: &TcpPacket) -> Result<(), DropReason> {
    if tcp_flags::valid(pkt.flags) {
        Ok(())
    } else {
        Err(DropReason::BadFlags)
    }
}

/// Refuses a segment that would leave with a TTL of 0 (it is decremented when translated).
#[inline(always)]
fn check_ttl(pkt: &TcpPacket) -> Result<(), DropReason> {
    if pkt.ttl > 1 {
        Ok(())
    } else {
        Err(DropReason::TtlExceeded)
    }
}

/// Whether the TCP checksum of `pkt` is right, computed over its segment, which is made
/// directly accessible first; a segment longer than [`csum::SEGMENT_MAX`] is not (it fails).
#[inline(always)]
fn tcp_sum_ok<C: Context>(b: &mut Bounds, checks: &C, pkt: &TcpPacket) -> bool {
    if usize::from(pkt.l3_len) - pkt.ihl() > csum::SEGMENT_MAX {
        return false;
    }
    checks.linearize(b, ETH_LEN + usize::from(pkt.l3_len));
    csum::tcp_ok(b, pkt)
}

/// A segment without a flow: answered with an RST when it can be (`reset::answers`), else
/// dropped for `reason`.
#[inline(always)]
fn no_flow(
    pkt: TcpPacket,
    reason: DropReason,
    answer: &mut Answer,
) -> Result<Action<'static>, DropReason> {
    if reset::answers(&pkt) {
        *answer = reset::answer(&pkt);
        Ok(Action::Reset)
    } else {
        Err(reason)
    }
}

/// Whether a SYN on the forward entry `f` starts the connection over (it is handled as a SYN
/// without a flow, and the old pair removed only if it makes a new one): the connection is
/// closed; or its handshake has not completed and either its backend stopped accepting or the
/// SYN is not a retransmission (another initial sequence number: its `seq` is not within what
/// the flow's first SYN covered), and it is balanced afresh (`syn_rebalanced`). A retransmitted
/// SYN to a backend still accepting, or a SYN on an established connection, stays on the flow.
#[inline(always)]
fn starts_over(f: &Flow, pkt: &TcpPacket) -> bool {
    if is_closed(f.state) {
        return true;
    }
    if f.state & CT_ESTABLISHED != 0 || f.track & TRACK_LIBERAL != 0 {
        return false;
    }
    // The flow's ISN: the SYN's `seq` lies within what its first SYN covered (one, plus at
    // most `SYN_DATA_MAX` bytes of data), with data this time or not (a TFO SYN is retransmitted
    // without its data). Another ISN lands there once in ~3 million.
    let covered = f.seq_end.wrapping_sub(pkt.seq);
    !((1..=conntrack::SYN_DATA_MAX + 1).contains(&covered) && lb::accepting(f.backend_id))
}
