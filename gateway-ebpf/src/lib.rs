//! The gateway's datapath, shared by the programs of this crate's binaries: `main.rs` (the
//! `gateway` object: the XDP and TC programs) and `bin/bench.rs` (the `gateway-bench` object:
//! the benchmark's baselines and floors, on the same maps).
//!
//! A packet goes: `xdp` or `tc` (the attach modes) → `pipeline`: `parse` (is it TCP to a
//! gateway address?), `conntrack` (lookup, reply direction first, timed by `clock`; a SYN to a
//! service creates a flow through `nat` and `lb`), `nexthop` (cached FIB result) → `nat`'s
//! header rewrite (`csum`, `mac`) → redirect (`xdp` or `tc`); a segment without a flow is
//! answered by `reset`; the SYN proxy is `synproxy` (its segments written by `answer`); `stats`
//! counts; `maps` declares every map. An ICMP error to a gateway address goes to `icmp`
//! (translated for the flow it quotes), and a translated SYN or SYN-ACK of an app with an MSS
//! clamp to `mss`, and a client's segment while its backend has not seen the client's address
//! (TOA) to `toa`, each in a function of its own beside the packet's (`xdp::run`, `tc::run`).
//! `agent` is `gateway agent`'s: a sock_ops and getpeername programs for a container host's
//! cgroup, which read the TOA option the datapath adds, with maps of their own.
#![no_std]
// `core::intrinsics::atomic_xadd`: the BPF target has no atomic types (see `synproxy`).
#![allow(internal_features)]
#![feature(core_intrinsics)]

pub mod agent;
mod answer;
mod clock;
mod conntrack;
pub mod csum;
mod icmp;
mod lb;
mod mac;
pub mod maps;
mod mss;
mod nat;
mod nexthop;
pub mod parse;
mod pipeline;
mod ratelimit;
mod reset;
pub mod stats;
mod synproxy;
pub mod tc;
mod toa;
pub mod xdp;

// Every object of this crate (each binary) links this library: its panic handler and license
// are said once, here.

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
