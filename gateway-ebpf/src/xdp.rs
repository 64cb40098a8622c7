//! XDP: translate in place with incremental checksums (RFC 1624) and redirect to the cached
//! next hop. When the next hop's neighbour is unknown, the packet is passed untouched to the
//! kernel, where the TC program (attached alongside in XDP mode) translates it and lets
//! `bpf_redirect_neigh` resolve the neighbour: a connection never hangs on a missing entry.

use aya_ebpf::{
    bindings::xdp_action::XDP_PASS, cty::c_void, helpers::bpf_redirect, programs::XdpContext,
};
use gateway_common::{DropReason, GlobalStat};

use crate::{
    csum,
    flow::{self, Action, Rewrite},
    nexthop::{self, NextHop},
    parse::Bounds,
    stats,
};

#[inline(always)]
pub fn try_gateway_xdp(ctx: &XdpContext) -> Result<u32, DropReason> {
    stats::global(GlobalStat::XdpPackets);
    let b = Bounds {
        data: ctx.data(),
        data_end: ctx.data_end(),
        len: ctx.data_end() - ctx.data(),
    };
    let Action::Translate {
        pkt,
        flow,
        now,
        nexthop_max_age,
    } = flow::decide(&b)?
    else {
        stats::global(GlobalStat::Passed);
        return Ok(XDP_PASS);
    };
    // SAFETY: a conntrack value pointer; this CPU updates it in place.
    let flow = unsafe { &mut *flow };
    let ifindex = match nexthop::resolve(
        ctx.ctx as *mut c_void,
        ctx.ingress_ifindex() as u32,
        flow,
        now,
        nexthop_max_age,
    ) {
        NextHop::Ready { ifindex } => ifindex,
        NextHop::NoNeigh { .. } => {
            stats::global(GlobalStat::NeighFallbacks);
            return Ok(XDP_PASS);
        }
        NextHop::Unreachable => return Err(DropReason::NoRoute),
    };
    let rw = Rewrite::new(&pkt, flow);
    // SAFETY: `b` is the current packet, parsed at `pkt`'s offsets, and unchanged since.
    unsafe { rw.write_headers(&b, &pkt, &flow.nexthop_smac, &flow.nexthop_dmac)? };
    let check = b
        .ptr_at::<[u8; 2]>(pkt.l4_off + 16)
        .ok_or(DropReason::Truncated)?;
    // SAFETY: bounds-checked above.
    unsafe {
        let old = u16::from_ne_bytes(*check);
        *check = csum::apply(old, rw.addr_diff + rw.port_diff).to_ne_bytes();
    }
    stats::traffic(flow, u64::from(pkt.l3_len));
    // SAFETY: plain helper call; it returns XDP_REDIRECT, or XDP_ABORTED on a bad ifindex.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as u32)
}
