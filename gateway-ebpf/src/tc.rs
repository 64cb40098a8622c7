//! TC (tcx ingress): translate with `bpf_l4_csum_replace` and the pseudo-header flag, so
//! CHECKSUM_PARTIAL and GSO packets stay correct, then redirect to the cached next hop, or
//! through `bpf_redirect_neigh` when the neighbour is not known yet.

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{BPF_F_PSEUDO_HDR, TC_ACT_OK, bpf_redir_neigh},
    cty::c_void,
    helpers::{bpf_l4_csum_replace, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use gateway_common::{DropReason, GlobalStat};

use crate::{
    nat,
    nexthop::NextHop,
    parse::{Bounds, ETH_LEN},
    pipeline, stats,
};

/// Enough linear bytes for Ethernet, IPv4 with options and a TCP header.
const HEADERS_MAX: u32 = (ETH_LEN + 60 + 20) as u32;
const AF_INET: u32 = 2;

#[inline(always)]
pub fn try_gateway_tc(ctx: &TcContext) -> Result<i32, DropReason> {
    stats::global(GlobalStat::TcPackets);
    // Direct packet access needs the headers in the linear part of the skb.
    let linear = (ctx.data_end() - ctx.data()) as u32;
    let len = ctx.len();
    if linear < HEADERS_MAX && linear < len {
        let _ = ctx.pull_data(if len < HEADERS_MAX { len } else { HEADERS_MAX });
    }
    let b = Bounds {
        data: ctx.data(),
        data_end: ctx.data_end(),
        len: len as usize,
    };
    let skb = ctx.skb.skb;
    // At TC ingress, the skb's device is the one it arrived on.
    // SAFETY: the context pointer the kernel gave this program.
    let ingress = unsafe { (*skb).ifindex };
    let mut new = MaybeUninit::uninit();
    let Some(t) = pipeline::prepare(&b, skb as *mut c_void, ingress, &mut new)? else {
        return Ok(TC_ACT_OK);
    };
    // SAFETY: `b` is the packet `t` was prepared from, unchanged since.
    let rw = unsafe { nat::write_headers(&b, &t.pkt, t.flow)? };
    let pkt = &t.pkt;
    let check_off = (pkt.l4_off + 16) as u32;
    // SAFETY: helper calls on this program's skb; they re-validate the offset.
    let ok = unsafe {
        bpf_l4_csum_replace(
            skb,
            check_off,
            0,
            u64::from(rw.addr_diff),
            u64::from(BPF_F_PSEUDO_HDR),
        ) == 0
            && bpf_l4_csum_replace(skb, check_off, 0, u64::from(rw.port_diff), 0) == 0
    };
    if !ok {
        return Err(DropReason::Truncated);
    }
    stats::traffic(t.flow, u64::from(pkt.l3_len));
    // SAFETY: plain helper calls.
    let ret = match t.hop {
        NextHop::Ready { ifindex } => unsafe { bpf_redirect(ifindex, 0) },
        NextHop::NoNeigh { ifindex, nexthop } => {
            stats::global(GlobalStat::NeighFallbacks);
            // SAFETY: plain-old-data of the kernel's ABI.
            let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
            nh.nh_family = AF_INET;
            nh.__bindgen_anon_1.ipv4_nh = nexthop;
            unsafe {
                bpf_redirect_neigh(
                    ifindex,
                    &mut nh,
                    core::mem::size_of::<bpf_redir_neigh>() as i32,
                    0,
                )
            }
        }
        NextHop::Unreachable => return Err(DropReason::NoRoute),
    };
    Ok(ret as i32)
}
