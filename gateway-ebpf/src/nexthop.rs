//! Where a translated packet goes: resolved with `bpf_fib_lookup` when a flow first needs it
//! and cached in the flow, so established packets do not pay a FIB lookup; re-resolved after
//! the configured age so route and neighbour changes are picked up.
//!
//! Neighbours: the FIB answers from any valid neighbour entry, STALE included, and a redirected
//! packet never passes through the kernel's neighbour code, so nothing would ever revalidate an
//! entry the datapath uses: a host that moved to another MAC would get its packets at the old
//! one for good. So the packet that re-resolves an aged hop goes through the kernel's neighbour
//! output (`neigh_output`, by `bpf_redirect_neigh` in TC), as every forwarded packet does:
//! a STALE entry goes to DELAY, is probed, and is confirmed (REACHABLE) or fails; a failed
//! entry makes the FIB answer NO_NEIGH, and the kernel resolves it afresh by broadcast. That is
//! the kernel's own recovery for a forwarded flow, at one packet per destination, CPU and age.

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    cty::c_void,
    helpers::bpf_fib_lookup as fib_lookup,
};
use gateway_common::{
    GlobalStat,
    maps::{Flow, NEXTHOP_SLOTS, NextHopCache},
    net::IPPROTO_TCP,
};

use crate::{clock::Now, mac::copy_mac, maps::NEXTHOPS, stats};

const AF_INET: u8 = 2;

/// How a packet goes to its next hop ([`NextHop::how`]).
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum How {
    /// Send out of `ifindex` with the MACs cached in the flow.
    Ready,
    /// The flow's hop had aged; the FIB answered again (`ifindex`, the next hop's address
    /// `nexthop` in network order, the MACs now in the flow): send through the kernel's
    /// neighbour output (`bpf_redirect_neigh`) so that the neighbour is revalidated. Only for
    /// a program that can (`neigh_output`).
    Revalidate,
    /// The flow's hop had aged, in a program that cannot reach the kernel's neighbour output
    /// (XDP): hand the packet to the kernel untouched; the TC program attached alongside
    /// resolves it again (`Revalidate`). Nothing of the flow's hop changed.
    Kernel,
    /// The route is known but the neighbour is not: `ifindex` and the next hop's address
    /// `nexthop` (network order) for `bpf_redirect_neigh`, or the kernel, to resolve.
    NoNeigh,
    /// No route.
    Unreachable,
}

/// The outcome of resolving a flow's next hop: how, and where (fields a `How` does not use are
/// 0). A struct rather than an enum with fields. Verifier workaround: the fields an enum
/// variant leaves out are undefined to LLVM, which copies them with the rest and reads
/// registers the verifier refuses (`!read_ok`).
#[derive(Clone, Copy)]
pub struct NextHop {
    pub how: How,
    pub ifindex: u32,
    pub nexthop: u32,
}

impl NextHop {
    #[inline(always)]
    const fn new(how: How, ifindex: u32, nexthop: u32) -> Self {
        NextHop {
            how,
            ifindex,
            nexthop,
        }
    }
}

/// Resolves (or reuses) the next hop of `flow`, whose rewritten destination is
/// `flow.nat_dst_ip`. `ctx` is the program's context, `ingress_ifindex` where the packet came in;
/// `neigh_output`: whether the program sends through the kernel's neighbour output itself (TC),
/// or hands such packets to the kernel (XDP).
///
/// A fresh hop of the flow's own is used as it is: that is every packet but one per age. A new
/// flow takes a fresh answer of the per-CPU cache, else asks the FIB, and goes out directly. A
/// flow whose hop aged takes a fresh cache answer only if that one was revalidated (asked by an
/// aged flow and sent through the neighbour output); else it asks the FIB and its packet is
/// sent through the neighbour output ([`How::Revalidate`]; XDP: [`How::Kernel`], with
/// no FIB lookup and nothing written, so that TC finds the hop aged too).
#[inline(always)]
pub fn resolve(
    ctx: *mut c_void,
    ingress_ifindex: u32,
    flow: &mut Flow,
    now: Now,
    neigh_output: bool,
) -> NextHop {
    let fresh = |resolved_ns: u64| {
        resolved_ns != 0 && now.ns.wrapping_sub(resolved_ns) < now.nexthop_max_age
    };
    if fresh(flow.nexthop_ns) {
        return NextHop::new(How::Ready, flow.nexthop_ifindex, 0);
    }
    let aged = flow.nexthop_ns != 0;
    // The new flows to one destination (from one source, through one ingress interface: what
    // the FIB is asked) share its FIB answer through a small per-CPU cache, as old as the
    // answer it holds: a flow taking it re-resolves when the answer would have aged out
    // anyway. (Under ECMP, the flows of one destination then share a path until it ages out;
    // the FIB would hash each flow's ports.) Aged flows share revalidated answers only, so
    // that while flows to a destination go on, one packet per age and CPU revalidates it.
    let dst = flow.nat_dst_ip;
    let slot = dst.wrapping_mul(0x9e37_79b1) >> (32 - NEXTHOP_SLOTS.trailing_zeros());
    let cache = NEXTHOPS.get_ptr_mut(slot);
    if let Some(c) = cache {
        // SAFETY: this CPU's own slot of a per-CPU array.
        let c = unsafe { &*c };
        if c.dst_ip == dst
            && c.src_ip == flow.nat_src_ip
            && c.ingress_ifindex == ingress_ifindex
            && fresh(c.resolved_ns)
            && (!aged || c.revalidated != 0)
        {
            flow.nexthop_ifindex = c.ifindex;
            copy_mac(&mut flow.nexthop_smac, &c.smac);
            copy_mac(&mut flow.nexthop_dmac, &c.dmac);
            flow.nexthop_ns = c.resolved_ns;
            return NextHop::new(How::Ready, c.ifindex, 0);
        }
    }
    if aged && !neigh_output {
        return NextHop::new(How::Kernel, 0, 0);
    }
    stats::global(GlobalStat::FibLookups);
    // SAFETY: a plain-old-data struct of the kernel's ABI; all zeroes is valid.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = IPPROTO_TCP;
    params.sport = flow.nat_src_port;
    params.dport = flow.nat_dst_port;
    // tot_len stays 0: no MTU check here (it would fail on GSO packets).
    params.ifindex = ingress_ifindex;
    params.__bindgen_anon_3.ipv4_src = flow.nat_src_ip;
    params.__bindgen_anon_4.ipv4_dst = flow.nat_dst_ip;
    // SAFETY: `params` is a valid bpf_fib_lookup of the size given.
    let ret = unsafe {
        fib_lookup(
            ctx,
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if ret == i64::from(BPF_FIB_LKUP_RET_SUCCESS) {
        flow.nexthop_ifindex = params.ifindex;
        copy_mac(&mut flow.nexthop_smac, &params.smac);
        copy_mac(&mut flow.nexthop_dmac, &params.dmac);
        flow.nexthop_ns = now.ns;
        if let Some(c) = cache {
            // SAFETY: as above.
            unsafe {
                *c = NextHopCache {
                    dst_ip: dst,
                    src_ip: flow.nat_src_ip,
                    ingress_ifindex,
                    resolved_ns: now.ns,
                    ifindex: params.ifindex,
                    smac: params.smac,
                    dmac: params.dmac,
                    revalidated: u8::from(aged),
                    _pad: [0; 3],
                }
            };
        }
        if aged {
            // SAFETY: the kernel filled the IPv4 next hop (the gateway of the route, or the
            // destination itself when on-link).
            let nexthop = unsafe { params.__bindgen_anon_4.ipv4_dst };
            NextHop::new(How::Revalidate, params.ifindex, nexthop)
        } else {
            NextHop::new(How::Ready, params.ifindex, 0)
        }
    } else if ret == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) {
        // SAFETY: as above.
        let nexthop = unsafe { params.__bindgen_anon_4.ipv4_dst };
        NextHop::new(How::NoNeigh, params.ifindex, nexthop)
    } else {
        NextHop::new(How::Unreachable, 0, 0)
    }
}
