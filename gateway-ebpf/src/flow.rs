//! The per-packet work shared by both attach modes: is the packet ours, which flow is it,
//! does a SYN create one, where does it go next, and the header rewrite. The attach-mode code
//! then finishes the TCP checksum its own way and forwards.

use core::mem::MaybeUninit;

use aya_ebpf::cty::c_void;
use gateway_common::{
    DropReason, GlobalStat,
    maps::{ADDR_PUBLIC, ADDR_SNAT, Flow, FlowKey4, ServiceKey4},
    net::{port_from_net, tcp_flags},
};

use crate::{
    clock, conntrack,
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

impl Translation<'_> {
    /// Writes the new addresses, ports, IPv4 checksum and the cached MACs into the packet, and
    /// returns the rewrite, whose differences the caller applies to the TCP checksum.
    ///
    /// # Safety
    /// `b` must describe the packet this translation was prepared from, unchanged since.
    #[inline(always)]
    pub unsafe fn write_headers(&self, b: &Bounds) -> Result<Rewrite, DropReason> {
        let rw = Rewrite::new(&self.pkt, self.flow);
        // SAFETY: the caller's promise.
        unsafe {
            rw.write_headers(
                b,
                &self.pkt,
                mac_words(&self.flow.nexthop_smac),
                mac_words(&self.flow.nexthop_dmac),
            )?
        };
        Ok(rw)
    }
}

// Every MAC field the datapath copies sits at an even offset of a struct aligned to at least 2:
// see `mac_words`.
const _: () = {
    use aya_ebpf::bindings::bpf_fib_lookup;
    use core::mem::{align_of, offset_of};
    use gateway_common::maps::NextHopCache;
    assert!(
        offset_of!(Flow, nexthop_smac) % 2 == 0
            && offset_of!(Flow, nexthop_dmac) % 2 == 0
            && align_of::<Flow>() >= 2
            && offset_of!(NextHopCache, smac) % 2 == 0
            && offset_of!(NextHopCache, dmac) % 2 == 0
            && align_of::<NextHopCache>() >= 2
            && offset_of!(bpf_fib_lookup, smac) % 2 == 0
            && offset_of!(bpf_fib_lookup, dmac) % 2 == 0
            && align_of::<bpf_fib_lookup>() >= 2
    )
};

/// A MAC address field of a `Flow`, a `NextHopCache` or a `bpf_fib_lookup` as three 16-bit
/// words (copied with 16-bit loads; a `[u8; 6]` copy compiles to a call of `memmove`).
#[inline(always)]
fn mac_words(mac: &[u8; 6]) -> &[u16; 3] {
    // SAFETY: same size; 2-byte aligned for the fields it is used on (asserted above).
    unsafe { &*(mac as *const [u8; 6]).cast::<[u16; 3]>() }
}

/// Copies the MAC field `src` into the MAC field `dst` (fields as for [`mac_words`]).
#[inline(always)]
pub fn copy_mac(dst: &mut [u8; 6], src: &[u8; 6]) {
    // SAFETY: as for `mac_words`.
    let dst = unsafe { &mut *(dst as *mut [u8; 6]).cast::<[u16; 3]>() };
    let src = mac_words(src);
    dst[0] = src[0];
    dst[1] = src[1];
    dst[2] = src[2];
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
            reverse_key,
            now,
        } => {
            // The whole forward entry (state, counters, next hop) is built before it is
            // inserted: no lookup of it afterwards, no update in the map.
            let flow = new.write(forward);
            let hop = nexthop::resolve(ctx, ingress_ifindex, flow, now);
            nat::commit(&pkt.key, flow, &reverse_key)?;
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
    /// A SYN of a new flow: its reverse entry is in the table (keyed `reverse_key`), its
    /// forward entry is `forward`, to insert once complete.
    New {
        pkt: TcpPacket,
        forward: Flow,
        reverse_key: FlowKey4,
        now: Now,
    },
}

/// The time of the decision, and how long a cached next hop may be trusted (ns).
#[derive(Clone, Copy)]
pub struct Now {
    pub ns: u64,
    pub nexthop_max_age: u64,
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
    let now = Now {
        ns: clock::now_ns(),
        nexthop_max_age: cfg.nexthop_max_age(),
    };
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
            let (mut forward, reverse_key) = nat::create(&pkt.key, app_id, cfg, now.ns)?;
            conntrack::track(&mut forward, &pkt, now.ns);
            return Ok(Action::New {
                pkt,
                forward,
                reverse_key,
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

/// The new addresses and ports of a translated packet, and the checksum differences they make.
pub struct Rewrite {
    pub src_ip: u32,
    pub dst_ip: u32,
    pub src_port: u16,
    pub dst_port: u16,
    /// Difference of the addresses (IPv4 header and TCP pseudo-header).
    pub addr_diff: u32,
    /// Difference of the ports (TCP header only).
    pub port_diff: u32,
}

impl Rewrite {
    #[inline(always)]
    fn new(pkt: &TcpPacket, flow: &Flow) -> Self {
        use crate::csum::{diff16, diff32};
        let k = &pkt.key;
        Rewrite {
            src_ip: flow.nat_src_ip,
            dst_ip: flow.nat_dst_ip,
            src_port: flow.nat_src_port,
            dst_port: flow.nat_dst_port,
            addr_diff: diff32(
                diff32(0, k.src_ip, flow.nat_src_ip),
                k.dst_ip,
                flow.nat_dst_ip,
            ),
            port_diff: diff16(
                diff16(0, k.src_port, flow.nat_src_port),
                k.dst_port,
                flow.nat_dst_port,
            ),
        }
    }

    /// Writes addresses, ports, the IPv4 checksum and the MACs into the packet. The TCP
    /// checksum is left to the caller (it differs between XDP and TC).
    ///
    /// # Safety
    /// `b` must describe the current packet, whose headers were parsed at `pkt`'s offsets.
    #[inline(always)]
    unsafe fn write_headers(
        &self,
        b: &Bounds,
        pkt: &TcpPacket,
        smac: &[u16; 3],
        dmac: &[u16; 3],
    ) -> Result<(), DropReason> {
        let eth = b.words::<6>(0).ok_or(DropReason::Truncated)?;
        let ip = b
            .words::<{ crate::parse::IPV4_MIN_LEN / 2 }>(pkt.l3_off)
            .ok_or(DropReason::Truncated)?;
        let tcp = b.words::<2>(pkt.l4_off).ok_or(DropReason::Truncated)?;
        // SAFETY: the pointers were bounds-checked above, 2-byte aligned (see `words`).
        unsafe {
            let eth = &mut *eth;
            eth[..3].copy_from_slice(dmac);
            eth[3..].copy_from_slice(smac);
            let ip = &mut *ip;
            ip[5] = crate::csum::apply(ip[5], self.addr_diff);
            ip[6] = self.src_ip as u16;
            ip[7] = (self.src_ip >> 16) as u16;
            ip[8] = self.dst_ip as u16;
            ip[9] = (self.dst_ip >> 16) as u16;
            let tcp = &mut *tcp;
            tcp[0] = self.src_port;
            tcp[1] = self.dst_port;
        }
        Ok(())
    }
}
