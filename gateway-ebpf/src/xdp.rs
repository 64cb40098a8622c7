//! XDP: translate in place with incremental checksums (RFC 1624) and redirect to the cached
//! next hop. When the next hop's neighbour is unknown, the packet is passed untouched to the
//! kernel, where the TC program (attached alongside in XDP mode) translates it and lets
//! `bpf_redirect_neigh` resolve the neighbour: a connection never hangs on a missing entry.

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::xdp_action::XDP_PASS, cty::c_void, helpers::bpf_redirect, programs::XdpContext,
};
use gateway_common::{DropReason, GlobalStat};

use crate::{csum, nat, nexthop::NextHop, parse::Bounds, pipeline, stats};

#[inline(always)]
pub fn try_gateway_xdp(ctx: &XdpContext) -> Result<u32, DropReason> {
    stats::global(GlobalStat::XdpPackets);
    let b = Bounds {
        data: ctx.data(),
        data_end: ctx.data_end(),
        len: ctx.data_end() - ctx.data(),
    };
    let mut new = MaybeUninit::uninit();
    let Some(t) = pipeline::prepare(
        &b,
        ctx.ctx as *mut c_void,
        ctx.ingress_ifindex() as u32,
        &mut new,
    )?
    else {
        return Ok(XDP_PASS);
    };
    let ifindex = match t.hop {
        NextHop::Ready { ifindex } => ifindex,
        NextHop::NoNeigh { .. } => {
            stats::global(GlobalStat::NeighFallbacks);
            return Ok(XDP_PASS);
        }
        NextHop::Unreachable => return Err(DropReason::NoRoute),
    };
    // SAFETY: `b` is the packet `t` was prepared from, unchanged since.
    let rw = unsafe { nat::write_headers(&b, &t.pkt, t.flow)? };
    let pkt = &t.pkt;
    // The TCP checksum: word 8 of the header.
    let check = b.words::<1>(pkt.l4_off + 16).ok_or(DropReason::Truncated)?;
    // SAFETY: bounds-checked and aligned (see `Bounds::words`).
    unsafe {
        (*check)[0] = csum::apply((*check)[0], rw.addr_diff + rw.port_diff);
    }
    stats::traffic(t.flow, u64::from(pkt.l3_len));
    // SAFETY: plain helper call; it returns XDP_REDIRECT, or XDP_ABORTED on a bad ifindex.
    Ok(unsafe { bpf_redirect(ifindex, 0) } as u32)
}
