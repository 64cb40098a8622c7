//! The `gateway-bench` object: programs only the datapath benchmark loads, never attached and
//! never in the `gateway` object. Its maps are the datapath's (`gateway_ebpf::maps`): the
//! benchmark loads this object with the pins of the datapath under test, so the floor's
//! inserts land in the datapath's own conntrack table.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_OK, TC_ACT_REDIRECT,
        xdp_action::{XDP_PASS, XDP_REDIRECT},
    },
    helpers::{bpf_get_prandom_u32, bpf_l4_csum_replace},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use gateway_common::{
    bench::BENCH_FLOOR_APP,
    maps::{Flow, FlowKey4},
};
use gateway_ebpf::{
    csum,
    maps::CONNTRACK,
    parse::{ETH_LEN, IPV4_MIN_LEN},
};

/// Baseline: the cost of running any XDP program.
#[xdp]
pub fn bench_empty_xdp(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// Baseline: the cost of running any TC program.
#[classifier]
pub fn bench_empty_tc(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

/// Floor: what the kernel's LRU table alone costs a new flow, the two inserts of its entries
/// (new random keys, marked [`BENCH_FLOOR_APP`]) into the conntrack table, without anything of
/// ours around them.
#[xdp]
pub fn bench_ct_pair_xdp(_ctx: XdpContext) -> u32 {
    let flow = Flow {
        app_id: BENCH_FLOOR_APP,
        ..Flow::default()
    };
    for _ in 0..2 {
        // SAFETY: helper without arguments.
        let (a, b) = unsafe { (bpf_get_prandom_u32(), bpf_get_prandom_u32()) };
        let key = FlowKey4::new(a, b, (a >> 16) as u16, b as u16);
        let _ = CONNTRACK.insert(key, flow, u64::from(BPF_NOEXIST));
    }
    XDP_PASS
}

/// Floor: the two checksum helper calls of a translated TC packet (`tc.rs`), with nothing
/// changed, on a frame whose TCP checksum is at the offset of an option-less IPv4 header.
#[classifier]
pub fn bench_csum_tc(ctx: TcContext) -> i32 {
    const CHECK_OFF: u32 = (ETH_LEN + IPV4_MIN_LEN + 16) as u32;
    let skb = ctx.skb.skb;
    // SAFETY: helper calls on this program's skb; they validate the offset.
    unsafe {
        bpf_l4_csum_replace(skb, CHECK_OFF, 0, 0, u64::from(BPF_F_PSEUDO_HDR));
        bpf_l4_csum_replace(skb, CHECK_OFF, 0, 0, 0);
    }
    TC_ACT_OK
}

/// The production XDP program with its hop undone: after a translation (a redirect), the
/// IPv4 TTL it took one from is put back, with the header checksum. BPF_PROG_TEST_RUN with
/// `repeat` replays the packet it rewrote, so the established path (or a chain of new flows)
/// can be replayed indefinitely; without this, the TTL would end it after 254 runs. The undoing
/// is a load, two stores and a fold: well under a nanosecond of the row.
#[xdp]
pub fn bench_hop_xdp(ctx: XdpContext) -> u32 {
    let action = gateway_ebpf::xdp::run(&ctx);
    if action == XDP_REDIRECT {
        undo_hop(ctx.data(), ctx.data_end());
    }
    action
}

/// [`bench_hop_xdp`] for the TC program.
#[classifier]
pub fn bench_hop_tc(ctx: TcContext) -> i32 {
    let action = gateway_ebpf::tc::run(&ctx);
    if action == TC_ACT_REDIRECT {
        // After the helpers: the packet's bounds are read again.
        undo_hop(ctx.data(), ctx.data_end());
    }
    action
}

/// Adds one to the TTL of the option-less IPv4 header at `data + ETH_LEN` and updates its
/// checksum (RFC 1624).
#[inline(always)]
fn undo_hop(data: usize, data_end: usize) {
    // Word 4 of the header: the TTL (low byte) and the protocol; word 5: the checksum.
    let at = data + ETH_LEN + 8;
    if at + 4 > data_end {
        return;
    }
    let w = at as *mut [u16; 2];
    // SAFETY: bounds-checked above; 2-byte aligned (packet data starts at an even address).
    unsafe {
        let old = (*w)[0];
        let new = old + 1;
        (*w)[0] = new;
        (*w)[1] = csum::apply((*w)[1], csum::diff16(0, old, new));
    }
}
