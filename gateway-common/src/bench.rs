//! What the datapath benchmark's programs (gateway-ebpf's `gateway-bench` object) and the
//! benchmark that loads them share. Nothing of the `gateway` object uses this.

/// App id of the entries the floor program `bench_ct_pair_xdp` inserts into the conntrack
/// table: never a real app (those are below [`crate::maps::MAX_APPS`]).
pub const BENCH_FLOOR_APP: u32 = u32::MAX;
