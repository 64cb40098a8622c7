//! The `gateway` object: the two programs the gateway attaches, as thin wrappers of their
//! attach mode's `run` (which counts every drop by its reason). The datapath itself is
//! this crate's library (`lib.rs`, with the panic handler and license of every object).
#![no_std]
#![no_main]

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use gateway_ebpf::{tc, xdp};

#[xdp]
pub fn gateway_xdp(ctx: XdpContext) -> u32 {
    xdp::run(&ctx)
}

#[classifier]
pub fn gateway_tc(ctx: TcContext) -> i32 {
    tc::run(&ctx)
}
