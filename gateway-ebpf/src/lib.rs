//! The gateway's datapath, shared by the programs of this crate's binaries: `main.rs` (the
//! `gateway` object: the XDP and TC programs) and `bin/bench.rs` (the benchmarks' baselines and
//! floors, on the same maps).
//!
//! A packet goes: `parse` (is it TCP to a gateway address?) → `flow` (conntrack lookup, reply
//! direction first, timed by `clock`; a SYN to a service creates a flow through `nat` and `lb`)
//! → `nexthop` (cached FIB result) → rewrite with `csum` → redirect (`xdp` or `tc`); `stats`
//! counts; `maps` declares every map.
#![no_std]

mod clock;
mod conntrack;
mod csum;
mod flow;
mod lb;
pub mod maps;
mod nat;
mod nexthop;
pub mod parse;
pub mod stats;
pub mod tc;
pub mod xdp;
