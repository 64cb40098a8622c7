//! The gateway's datapath. This file holds only the maps and thin program wrappers; each
//! wrapper returns what its `try_*` function gives.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action},
    macros::{classifier, map, xdp},
    maps::PerCpuArray,
    programs::{TcContext, XdpContext},
};
use gateway_common::{GlobalStat, maps::GLOBAL_STATS_LEN};

mod stats;

/// Global per-CPU counters and drop reasons (`gateway_common::maps::GLOBAL_STATS`).
#[map(name = "gw_global_v1")]
static GLOBAL: PerCpuArray<u64> = PerCpuArray::with_max_entries(GLOBAL_STATS_LEN, 0);

#[xdp]
pub fn gateway_xdp(_ctx: XdpContext) -> u32 {
    stats::count(&GLOBAL, GlobalStat::XdpPackets.index());
    stats::count(&GLOBAL, GlobalStat::Passed.index());
    xdp_action::XDP_PASS
}

#[classifier]
pub fn gateway_tc(_ctx: TcContext) -> i32 {
    stats::count(&GLOBAL, GlobalStat::TcPackets.index());
    stats::count(&GLOBAL, GlobalStat::Passed.index());
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
