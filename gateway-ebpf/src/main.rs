//! The `gateway` object: the two programs the gateway attaches, as thin wrappers of their
//! attach mode's `run` (which counts every drop by its reason), and the three of `gateway agent`
//! (`agent`), which the daemon never loads. The datapath itself is this crate's library
//! (`lib.rs`, with the panic handler and license of every object).
#![no_std]
#![no_main]

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier, sock_ops, xdp},
    programs::{SockAddrContext, SockOpsContext, TcContext, XdpContext},
};
use gateway_ebpf::{agent, tc, xdp};

#[xdp]
pub fn gateway_xdp(ctx: XdpContext) -> u32 {
    xdp::run(&ctx)
}

#[classifier]
pub fn gateway_tc(ctx: TcContext) -> i32 {
    tc::run(&ctx)
}

#[sock_ops]
pub fn gateway_agent_sockops(ctx: SockOpsContext) -> u32 {
    agent::sock_ops(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn gateway_agent_getpeername4(ctx: SockAddrContext) -> i32 {
    agent::getpeername4(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn gateway_agent_getpeername6(ctx: SockAddrContext) -> i32 {
    agent::getpeername6(&ctx)
}
