//! The datapath's per-CPU caches: its clock ([`super::CLOCK`]), the FIB answers shared by
//! new flows ([`super::NEXTHOPS`]) and the ICMP errors' token buckets ([`super::ICMP_BUCKETS`]).

use bytemuck::{Pod, Zeroable};

/// Value of [`super::CLOCK`] (per CPU): `bpf_ktime_get_coarse_ns` as read at `jiffies`. The
/// coarse clock only moves at a tick, when `jiffies` does too; `jiffies` is an inlined load
/// while the clock is a helper call (~12 ns per packet in the datapath benchmark).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ClockCache {
    pub jiffies: u64,
    /// CLOCK_MONOTONIC_COARSE (ns); 0: not read yet.
    pub coarse_ns: u64,
}

/// Value of [`super::NEXTHOPS`] (per CPU): what `bpf_fib_lookup` answered for
/// `src_ip → dst_ip` arriving on `ingress_ifindex`, and when; and whether the packet that asked
/// went through the kernel's neighbour output (`revalidated`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NextHopCache {
    /// When it was resolved (ns, the datapath's clock); 0: empty.
    pub resolved_ns: u64,
    /// Destination (network order).
    pub dst_ip: u32,
    /// Source (network order): the SNAT or public address.
    pub src_ip: u32,
    pub ingress_ifindex: u32,
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// 1: the answer of a flow whose own hop had aged, sent through the kernel's neighbour
    /// output (which revalidates the neighbour); only such an answer serves other aged flows.
    /// 0: a new flow's answer (new flows take either). Earlier builds left this byte 0 (it was
    /// padding), which reads as "not revalidated": the layout and its name stay.
    pub revalidated: u8,
    pub _pad: [u8; 3],
}

/// Value of [`super::ICMP_BUCKETS`] (per CPU and slot): a token bucket of translated ICMP
/// errors about the connections whose quoted tuple hashes to its slot, kept in nanoseconds of
/// credit. Each error costs `1e9 / Config::icmp_rate` ns; credit accrues with the
/// datapath's clock and is capped at one second (`1e9` ns: a burst of `icmp_rate` errors).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct IcmpBucket {
    /// Credit (ns), at most one second.
    pub credit_ns: u64,
    /// When credit was last added (ns, the datapath's clock); 0: never (a full bucket).
    pub last_ns: u64,
}
