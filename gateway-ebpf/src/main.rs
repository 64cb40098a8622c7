//! The `gateway` object: the two programs the gateway attaches, as thin wrappers. Each returns
//! what its `try_*` function gives, and counts every drop by its reason. The datapath itself is
//! this crate's library (`lib.rs`).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, xdp_action::XDP_DROP},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use gateway_common::maps::{BENCH_FLOOR_APP, Flow, FlowKey4};
use gateway_ebpf::{maps::CONNTRACK, parse, stats, tc, xdp};

#[xdp]
pub fn gateway_xdp(ctx: XdpContext) -> u32 {
    match xdp::try_gateway_xdp(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            stats::drop(reason);
            XDP_DROP
        }
    }
}

#[classifier]
pub fn gateway_tc(ctx: TcContext) -> i32 {
    match tc::try_gateway_tc(&ctx) {
        Ok(action) => action,
        Err(reason) => {
            stats::drop(reason);
            TC_ACT_SHOT
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// Benchmark baseline only (never attached): the cost of running any XDP program.
#[xdp]
pub fn bench_empty_xdp(_ctx: XdpContext) -> u32 {
    aya_ebpf::bindings::xdp_action::XDP_PASS
}

/// Benchmark baseline only (never attached): the cost of running any TC program.
#[classifier]
pub fn bench_empty_tc(_ctx: TcContext) -> i32 {
    aya_ebpf::bindings::TC_ACT_OK
}

/// Benchmark floor only (never attached): what the kernel's LRU table alone costs a new flow,
/// the two inserts of its entries (new random keys, marked [`BENCH_FLOOR_APP`]) into the
/// conntrack table, without anything of ours around them.
#[xdp]
pub fn bench_ct_pair_xdp(_ctx: XdpContext) -> u32 {
    let flow = Flow {
        app_id: BENCH_FLOOR_APP,
        ..Flow::default()
    };
    for _ in 0..2 {
        // SAFETY: helper without arguments.
        let (a, b) = unsafe {
            (
                aya_ebpf::helpers::bpf_get_prandom_u32(),
                aya_ebpf::helpers::bpf_get_prandom_u32(),
            )
        };
        let key = FlowKey4::new(a, b, (a >> 16) as u16, b as u16);
        let _ = CONNTRACK.insert(key, flow, u64::from(aya_ebpf::bindings::BPF_NOEXIST));
    }
    aya_ebpf::bindings::xdp_action::XDP_PASS
}

/// Benchmark floor only (never attached): the two checksum helper calls of a translated TC
/// packet (`tc.rs`), with nothing changed, on a frame whose TCP checksum is at the offset of
/// an option-less IPv4 header.
#[classifier]
pub fn bench_csum_tc(ctx: TcContext) -> i32 {
    const CHECK_OFF: u32 = (parse::ETH_LEN + parse::IPV4_MIN_LEN + 16) as u32;
    let skb = ctx.skb.skb;
    // SAFETY: helper calls on this program's skb; they validate the offset.
    unsafe {
        aya_ebpf::helpers::bpf_l4_csum_replace(
            skb,
            CHECK_OFF,
            0,
            0,
            u64::from(aya_ebpf::bindings::BPF_F_PSEUDO_HDR),
        );
        aya_ebpf::helpers::bpf_l4_csum_replace(skb, CHECK_OFF, 0, 0, 0);
    }
    aya_ebpf::bindings::TC_ACT_OK
}
