//! The `gateway` object: the two programs the gateway attaches, as thin wrappers. Each returns
//! what its `try_*` function gives, and counts every drop by its reason. The datapath itself is
//! this crate's library (`lib.rs`, with the panic handler and license of every object).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, xdp_action::XDP_DROP},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use gateway_ebpf::{stats, tc, xdp};

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
