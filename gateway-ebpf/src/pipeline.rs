//! The per-packet decisions shared by both attach modes: is the packet ours, which flow is it,
//! does a SYN create one, and where does it go next. The attach-mode code (`xdp`, `tc`) then
//! rewrites the headers (`nat::write_headers`), finishes the TCP checksum its own way and
//! forwards.

use core::mem::MaybeUninit;

use aya_ebpf::cty::c_void;
use gateway_common::{
    DropReason, GlobalStat,
    maps::{ADDR_PUBLIC, ADDR_SNAT, Flow, ServiceKey4},
    net::{port_from_net, tcp_flags},
};

use crate::{
    clock::Now,
    conntrack::{self, Claim},
    maps::{CONFIG, SERVICES},
    nat,
    nexthop::{self, NextHop},
    parse::{Bounds, Parsed, TcpPacket, parse},
    stats,
};

/// A packet of a flow of ours, with where it goes next.
pub struct Translation<'a> {
    pub pkt: TcpPacket,
    /// Its conntrack entry (state, counters and next hop already updated), or for a new flow
    /// the copy that was inserted.
    pub flow: &'a Flow,
    pub hop: NextHop,
}

/// What both attach modes do first: decide, and for a packet of ours resolve its next hop.
/// `None`: hand the packet to the kernel unchanged (counted as passed). `ctx` is the program's
/// context, `ingress_ifindex` the interface the packet came in on; a new flow is built in
/// `new` (the caller's stack) and inserted from there.
#[inline(always)]
pub fn prepare<'a>(
    b: &Bounds,
    ctx: *mut c_void,
    ingress_ifindex: u32,
    new: &'a mut MaybeUninit<Flow>,
) -> Result<Option<Translation<'a>>, DropReason> {
    match decide(b)? {
        Action::Pass => {
            stats::global(GlobalStat::Passed);
            Ok(None)
        }
        Action::Existing { pkt, flow, now } => {
            // SAFETY: a conntrack value pointer; this CPU updates it in place.
            let flow = unsafe { &mut *flow };
            let hop = nexthop::resolve(ctx, ingress_ifindex, flow, now);
            Ok(Some(Translation { pkt, flow, hop }))
        }
        Action::New {
            pkt,
            forward,
            claim,
            now,
        } => {
            // The whole forward entry (state, counters, next hop) is built before it is
            // inserted: no lookup of it afterwards, no update in the map.
            let flow = new.write(forward);
            let hop = nexthop::resolve(ctx, ingress_ifindex, flow, now);
            nat::commit(claim, &pkt.key, flow)?;
            Ok(Some(Translation { pkt, flow, hop }))
        }
    }
}

/// What to do with a packet.
enum Action {
    /// Hand it to the kernel unchanged.
    Pass,
    /// Translate it with this conntrack entry (state and counters already updated); `now` is
    /// the time the decision was made (ns).
    Existing {
        pkt: TcpPacket,
        flow: *mut Flow,
        now: Now,
    },
    /// A SYN of a new flow: its reverse entry is in the table (`claim`), its forward entry is
    /// `forward`, to insert once complete.
    New {
        pkt: TcpPacket,
        forward: Flow,
        claim: Claim,
        now: Now,
    },
}

/// Classifies the packet in `b` and finds (or starts) its flow.
#[inline(always)]
fn decide(b: &Bounds) -> Result<Action, DropReason> {
    let Some(cfg) = CONFIG.get(0) else {
        return Ok(Action::Pass);
    };
    let parsed = parse(b, |dst| cfg.addr_kind(dst))?;
    let Parsed::Tcp(pkt) = parsed else {
        return Ok(Action::Pass);
    };
    // Only packets of ours read the clock, and the coarse one (CLOCK_MONOTONIC_COARSE, a few
    // ms of resolution, cached per tick): it serves idle times and next-hop ages.
    let now = Now::read(cfg);
    let syn_only = pkt.flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN;
    // Replies first: only reverse entries are keyed by a SNAT address.
    if let Some(flow) = conntrack::lookup(&pkt.key) {
        // SAFETY: a conntrack value pointer; this CPU updates it in place.
        let f = unsafe { &mut *flow };
        if !(syn_only
            && f.direction == gateway_common::maps::DIR_FORWARD
            && gateway_common::maps::is_closed(f.state))
        {
            conntrack::track(f, &pkt, now.ns);
            return Ok(Action::Existing { pkt, flow, now });
        }
        // The tuple of a finished connection is reused by a new SYN: start afresh.
        conntrack::remove_pair(&pkt.key, f);
    }
    if pkt.addr_kind & ADDR_PUBLIC != 0 {
        let svc = ServiceKey4::new(pkt.key.dst_ip, pkt.key.dst_port);
        if let Some(service) = SERVICES.get_ptr(svc) {
            if !syn_only {
                return Err(DropReason::NoFlow);
            }
            // SAFETY: a value of the map, read once.
            let app_id = unsafe { (*service).app_id };
            let (mut forward, claim) = nat::create(&pkt.key, app_id, cfg, now.ns)?;
            conntrack::track(&mut forward, &pkt, now.ns);
            return Ok(Action::New {
                pkt,
                forward,
                claim,
                now,
            });
        }
    }
    if pkt.addr_kind & ADDR_SNAT != 0 {
        let port = port_from_net(pkt.key.dst_port);
        if (cfg.snat_port_min..=cfg.snat_port_max).contains(&port) {
            return Err(DropReason::NoReplyFlow);
        }
    }
    Ok(Action::Pass)
}
