//! Map names, sizes, keys and values. At most 15 bytes per name (the kernel truncates), with a
//! version suffix that changes whenever a layout does. IPv4 maps carry a `4` in their name;
//! IPv6 ones will sit beside them (as Cilium's `lb4`/`lb6` do).
//!
//! Byte order: fields documented "network order" hold the bytes as they are on the wire,
//! read into an integer without swapping (`u32::from_ne_bytes(wire)`); everything else is
//! host order.

use bytemuck::{Pod, Zeroable};

/// Per-CPU array of `u64`: [`crate::GlobalStat`] slots then [`crate::DropReason`] slots.
pub const GLOBAL_STATS: &str = "gw_global_v2";
/// Number of slots in [`GLOBAL_STATS`].
pub const GLOBAL_STATS_LEN: u32 = crate::GlobalStat::COUNT + crate::DropReason::COUNT;

/// Array with one [`Config`] at index 0 (its lookups are inlined by the verifier).
pub const CONFIG: &str = "gw_config_v2";
/// Hash [`ServiceKey4`] → [`Service`]: `(public_ip, port)` → app.
pub const SERVICES4: &str = "gw_svc4_v1";
/// Hash `u32` app id → [`MaglevTable`]: the app's backend choice, computed in userspace.
pub const MAGLEV: &str = "gw_maglev_v1";
/// Array `u32` backend id → [`Backend4`]. Id 0 is never used ("no backend").
pub const BACKENDS4: &str = "gw_be4_v1";
/// LRU hash [`FlowKey4`] → [`Flow`]: conntrack, forward and reverse entries. Global, not
/// per-CPU: with full NAT, replies come back through us on any CPU.
pub const CONNTRACK4: &str = "gw_ct4_v1";
/// Per-CPU array `u32` app id → [`TrafficStats`].
pub const APP_STATS: &str = "gw_app_stats_v1";
/// Per-CPU array `u32` backend id → [`TrafficStats`].
pub const BACKEND_STATS: &str = "gw_be_stats_v1";
/// Per-CPU array of [`NEXTHOP_SLOTS`] [`NextHopCache`] slots, indexed by a hash of the
/// destination: FIB results shared by the new flows to one destination.
pub const NEXTHOPS: &str = "gw_hops_v1";
/// Slots of [`NEXTHOPS`] (a power of two).
pub const NEXTHOP_SLOTS: u32 = 4096;
/// Per-CPU array with one [`ClockCache`]: the datapath's clock, read once per tick per CPU.
pub const CLOCK: &str = "gw_clock_v1";

/// Every map name, for checks.
pub const ALL: &[&str] = &[
    GLOBAL_STATS,
    CONFIG,
    SERVICES4,
    MAGLEV,
    BACKENDS4,
    CONNTRACK4,
    APP_STATS,
    BACKEND_STATS,
    CLOCK,
    NEXTHOPS,
];

/// How many apps the maps hold (app ids are `1..MAX_APPS`).
pub const MAX_APPS: u32 = 16_384;
/// How many backends the maps hold (backend ids are `1..MAX_BACKENDS`).
pub const MAX_BACKENDS: u32 = 65_536;
/// How many services (public ip, port) the maps hold.
pub const MAX_SERVICES: u32 = 16_384;
/// How many gateway addresses (public and SNAT) the configuration holds. A front node has a
/// handful; a short array in the config entry is cheaper per packet than a hash lookup.
pub const MAX_ADDRS: usize = 8;
/// App id of the entries the datapath benchmark's floor program (`bench_ct_pair_xdp`) inserts
/// into the conntrack table: never a real app (those are below [`MAX_APPS`]).
pub const BENCH_FLOOR_APP: u32 = u32::MAX;
/// Default conntrack capacity (entries; a connection takes two). Settable at load time.
pub const CONNTRACK_DEFAULT: u32 = 1 << 20;

/// Entries in an app's Maglev table: a prime, so every backend's permutation covers it. With
/// up to ~10 backends per app it stays above 100 entries per backend (imbalance ≤ ~1%, per the
/// Maglev paper) while an app costs 4 KiB, so thousands of apps stay small.
pub const MAGLEV_SIZE: u32 = 1021;

/// [`AddrKind`] bit: a public address (services listen there).
pub const ADDR_PUBLIC: u32 = 1;
/// [`AddrKind`] bit: a SNAT address (replies from backends come back there).
pub const ADDR_SNAT: u32 = 2;

/// The datapath's configuration (one entry of [`CONFIG`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Config {
    /// The SNAT source address toward backends (network order). 0: not configured, so no
    /// new flow can be created.
    pub snat_ip: u32,
    /// First SNAT source port (host order).
    pub snat_port_min: u16,
    /// Last SNAT source port, inclusive (host order).
    pub snat_port_max: u16,
    /// How long a cached next hop is trusted before it is looked up again (ns).
    pub nexthop_max_age_ns: u64,
    /// The addresses the gateway answers for (network order; 0: free slot). A packet to any
    /// other address is not looked at further.
    pub addrs: [u32; MAX_ADDRS],
    /// What each address of `addrs` is: [`ADDR_PUBLIC`] and/or [`ADDR_SNAT`] bits.
    pub addr_kinds: [u32; MAX_ADDRS],
}

impl Config {
    /// The kind bits of `ip` (network order), 0 when it is not a gateway address.
    #[inline(always)]
    pub fn addr_kind(&self, ip: u32) -> u32 {
        let mut i = 0;
        while i < MAX_ADDRS {
            if self.addrs[i] == ip && ip != 0 {
                return self.addr_kinds[i];
            }
            i += 1;
        }
        0
    }
}

/// Key of [`SERVICES4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ServiceKey4 {
    /// Public address (network order).
    pub ip: u32,
    /// Public port (network order).
    pub port: u16,
    /// IP protocol (6: TCP).
    pub proto: u8,
    pub _pad: u8,
}

/// Value of [`SERVICES4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Service {
    /// The app behind this service: key of [`MAGLEV`] and index of [`APP_STATS`].
    pub app_id: u32,
}

/// Value of [`MAGLEV`]: backend ids (0: none) indexed by `flow_hash % MAGLEV_SIZE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct MaglevTable {
    pub slots: [u32; MAGLEV_SIZE as usize],
}

/// [`Backend4::flags`] bit: the backend may be chosen for new flows (active). Without it
/// (pending, unhealthy, draining) it only keeps its existing flows.
pub const BACKEND_ACCEPTING: u32 = 1;

/// Value of [`BACKENDS4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Backend4 {
    /// Address (network order).
    pub ip: u32,
    /// Port (network order).
    pub port: u16,
    pub _pad: u16,
    /// [`BACKEND_ACCEPTING`] and future bits.
    pub flags: u32,
}

/// Key of [`CONNTRACK4`]: a TCP 5-tuple as it arrives at the gateway.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKey4 {
    /// Source address (network order).
    pub src_ip: u32,
    /// Destination address (network order).
    pub dst_ip: u32,
    /// Source port (network order).
    pub src_port: u16,
    /// Destination port (network order).
    pub dst_port: u16,
    /// IP protocol (6: TCP).
    pub proto: u8,
    /// Padding, zero. Two fields rather than `[u8; 3]`: the datapath builds a key per packet,
    /// and zeroing an unaligned 3-byte array compiles to a call of `memset` in BPF, a 1-byte
    /// and an aligned 2-byte field to two stores.
    pub _pad0: u8,
    pub _pad1: u16,
}

/// [`Flow::direction`]: client → backend entry (key: client → public).
pub const DIR_FORWARD: u8 = 0;
/// [`Flow::direction`]: backend → client entry (key: backend → SNAT).
pub const DIR_REVERSE: u8 = 1;

/// [`Flow::state`] bit: the client's SYN was seen.
pub const TCP_SYN: u8 = 1;
/// [`Flow::state`] bit: the backend's SYN-ACK was seen.
pub const TCP_SYN_ACK: u8 = 2;
/// [`Flow::state`] bit: the client acknowledged the SYN-ACK (established).
pub const TCP_ESTABLISHED: u8 = 4;
/// [`Flow::state`] bit: the client sent FIN.
pub const TCP_FIN_FORWARD: u8 = 8;
/// [`Flow::state`] bit: the backend sent FIN.
pub const TCP_FIN_REVERSE: u8 = 16;
/// [`Flow::state`] bit: either side sent RST.
pub const TCP_RST: u8 = 32;

/// Value of [`CONNTRACK4`]: how to rewrite a packet of this flow and where to send it.
/// Both entries of a connection carry the same `state` bits (a FIN or RST updates both).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Flow {
    /// New source address (network order): SNAT address (forward) or public address (reverse).
    pub nat_src_ip: u32,
    /// New destination address (network order): backend (forward) or client (reverse).
    pub nat_dst_ip: u32,
    /// New source port (network order).
    pub nat_src_port: u16,
    /// New destination port (network order).
    pub nat_dst_port: u16,
    /// The app (index of [`APP_STATS`]).
    pub app_id: u32,
    /// The backend (index of [`BACKENDS4`] and [`BACKEND_STATS`]).
    pub backend_id: u32,
    /// [`DIR_FORWARD`] or [`DIR_REVERSE`].
    pub direction: u8,
    /// `TCP_*` bits.
    pub state: u8,
    pub _pad: [u8; 2],
    /// When the flow was created (`bpf_ktime_get_coarse_ns`, CLOCK_MONOTONIC_COARSE ns).
    pub created_ns: u64,
    /// When a packet last went through this entry (ns, refreshed at most every
    /// [`LAST_SEEN_GRANULARITY_NS`]).
    pub last_seen_ns: u64,
    /// When the next hop below was resolved (ns); 0: not resolved.
    pub nexthop_ns: u64,
    /// Egress interface index of the next hop.
    pub nexthop_ifindex: u32,
    /// Source MAC toward the next hop.
    pub nexthop_smac: [u8; 6],
    /// Destination MAC of the next hop.
    pub nexthop_dmac: [u8; 6],
    /// Packets through this entry (approximate under concurrent updates).
    pub packets: u64,
    /// Bytes (L3) through this entry (approximate under concurrent updates).
    pub bytes: u64,
}

impl Flow {
    /// The key of the other entry of this connection: the rewritten tuple, reversed. The same
    /// formula serves both directions because each entry stores the rewritten addresses.
    #[inline(always)]
    pub const fn peer_key(&self) -> FlowKey4 {
        FlowKey4 {
            src_ip: self.nat_dst_ip,
            dst_ip: self.nat_src_ip,
            src_port: self.nat_dst_port,
            dst_port: self.nat_src_port,
            proto: 6,
            _pad0: 0,
            _pad1: 0,
        }
    }
}

/// Whether a connection with `state` bits is over (RST, or FIN both ways).
#[inline(always)]
pub const fn is_closed(state: u8) -> bool {
    let fins = TCP_FIN_FORWARD | TCP_FIN_REVERSE;
    state & TCP_RST != 0 || state & fins == fins
}

/// `last_seen_ns` is refreshed at most this often, to keep established packets from writing
/// the entry's cache line every time.
pub const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

/// Value of [`CLOCK`] (per CPU): `bpf_ktime_get_coarse_ns` as read at `jiffies`. The coarse
/// clock only moves at a tick, when `jiffies` does too; `jiffies` is an inlined load while the
/// clock is a helper call (~12 ns per packet in the datapath benchmark).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ClockCache {
    pub jiffies: u64,
    /// CLOCK_MONOTONIC_COARSE (ns); 0: not read yet.
    pub coarse_ns: u64,
}

/// Value of [`NEXTHOPS`] (per CPU): what `bpf_fib_lookup` answered for `src_ip → dst_ip`
/// arriving on `ingress_ifindex`, and when.
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
    pub _pad: [u8; 4],
}

/// Value of [`APP_STATS`] and [`BACKEND_STATS`] (per CPU). "In" is client → backend, "out" is
/// backend → client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TrafficStats {
    pub packets_in: u64,
    /// L3 bytes.
    pub bytes_in: u64,
    pub packets_out: u64,
    /// L3 bytes.
    pub bytes_out: u64,
    /// Flows created.
    pub new_flows: u64,
}

impl TrafficStats {
    /// Adds `other` into `self` (summing per-CPU values).
    pub fn add(&mut self, other: &TrafficStats) {
        self.packets_in += other.packets_in;
        self.bytes_in += other.bytes_in;
        self.packets_out += other.packets_out;
        self.bytes_out += other.bytes_out;
        self.new_flows += other.new_flows;
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: every type here is `#[repr(C)]`, integers only, with explicit padding (bytemuck's
    // `Pod` derive checks it at compile time).
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for ServiceKey4 {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for MaglevTable {}
    unsafe impl aya::Pod for Backend4 {}
    unsafe impl aya::Pod for FlowKey4 {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for TrafficStats {}
}

#[cfg(test)]
mod tests {
    #[test]
    fn map_names_fit_the_kernel_limit() {
        for name in super::ALL {
            assert!(name.len() <= 15, "{name} is longer than 15 bytes");
        }
    }

    #[test]
    fn layouts_are_what_the_datapath_expects() {
        assert_eq!(size_of::<super::FlowKey4>(), 16);
        assert_eq!(size_of::<super::Flow>(), 80);
        assert_eq!(
            size_of::<super::MaglevTable>(),
            4 * super::MAGLEV_SIZE as usize
        );
        assert_eq!(size_of::<super::NextHopCache>(), 40);
        assert!(super::NEXTHOP_SLOTS.is_power_of_two());
    }
}
