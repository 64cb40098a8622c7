//! The gateway's datapath. This file holds only the maps and the thin program wrappers; each
//! wrapper returns what its `try_*` function gives, and counts every drop by its reason.
//!
//! A packet goes: `parse` (is it TCP to a gateway address?) → `flow` (conntrack lookup, reply
//! direction first, timed by `clock`; a SYN to a service creates a flow through `nat` and `lb`)
//! → `nexthop`
//! (cached FIB result) → rewrite with `csum` → redirect (`xdp` or `tc`); `stats` counts.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, TC_ACT_SHOT, xdp_action::XDP_DROP},
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use gateway_common::maps::{
    BENCH_FLOOR_APP, Backend4, CONNTRACK_DEFAULT, ClockCache, Config, Flow, FlowKey4,
    GLOBAL_STATS_LEN, MAX_APPS, MAX_BACKENDS, MAX_SERVICES, MaglevTable, NEXTHOP_SLOTS,
    NextHopCache, Service, ServiceKey4, TrafficStats,
};

mod clock;
mod conntrack;
mod csum;
mod flow;
mod lb;
mod nat;
mod nexthop;
mod parse;
mod stats;
mod tc;
mod xdp;

// Names: `gateway_common::maps` (checked against this object by the userspace tests).

#[map(name = "gw_global_v2")]
static GLOBAL: PerCpuArray<u64> = PerCpuArray::with_max_entries(GLOBAL_STATS_LEN, 0);

#[map(name = "gw_config_v2")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "gw_svc4_v1")]
static SERVICES: HashMap<ServiceKey4, Service> = HashMap::with_max_entries(MAX_SERVICES, 0);

#[map(name = "gw_maglev_v1")]
static MAGLEV: HashMap<u32, MaglevTable> = HashMap::with_max_entries(MAX_APPS, BPF_F_NO_PREALLOC);

#[map(name = "gw_be4_v1")]
static BACKENDS: Array<Backend4> = Array::with_max_entries(MAX_BACKENDS, 0);

#[map(name = "gw_ct4_v1")]
static CONNTRACK: LruHashMap<FlowKey4, Flow> = LruHashMap::with_max_entries(CONNTRACK_DEFAULT, 0);

#[map(name = "gw_app_stats_v1")]
static APP_STATS: PerCpuArray<TrafficStats> = PerCpuArray::with_max_entries(MAX_APPS, 0);

#[map(name = "gw_be_stats_v1")]
static BACKEND_STATS: PerCpuArray<TrafficStats> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

#[map(name = "gw_hops_v1")]
static NEXTHOPS: PerCpuArray<NextHopCache> = PerCpuArray::with_max_entries(NEXTHOP_SLOTS, 0);

#[map(name = "gw_clock_v1")]
static CLOCK: PerCpuArray<ClockCache> = PerCpuArray::with_max_entries(1, 0);

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
