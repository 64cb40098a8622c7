//! Map names, sizes, keys and values. At most 15 bytes per name (the kernel truncates), with a
//! version suffix that changes whenever a layout does. IPv4 maps carry a `4` in their name;
//! IPv6 ones will sit beside them (as Cilium's `lb4`/`lb6` do).
//!
//! The names and sizes are here; the keys and values live in a module per topic
//! ([`config`], [`service`] for services, Maglev tables and backends, [`conntrack`],
//! [`cache`] for the datapath's per-CPU caches) and are re-exported here.
//!
//! Byte order: fields documented "network order" hold the bytes as they are on the wire,
//! read into an integer without swapping (`u32::from_ne_bytes(wire)`); everything else is
//! host order.

pub mod cache;
pub mod config;
pub mod conntrack;
pub mod ratelimit;
pub mod service;

pub use cache::{ClockCache, IcmpBucket, NextHopCache};
pub use config::{
    ADDR_PUBLIC, ADDR_SNAT, Config, HALF_OPEN_MAX_DEFAULT, NEXTHOP_MAX_AGE_DEFAULT_NS,
};
pub use conntrack::{
    CT_BACKEND_CLOSED_FIRST, CT_ESTABLISHED, CT_FIN_FORWARD, CT_FIN_REVERSE, CT_RST,
    CT_SYN_ACK_SEEN, CT_SYN_SEEN, DIR_FORWARD, DIR_REVERSE, Flow, FlowKey4,
    LAST_SEEN_GRANULARITY_NS, TCP_MAX_WSCALE, TIME_WAIT_NS, TOA_ADD, TOA_PENDING, TRACK_ACK_SEEN,
    TRACK_LIBERAL, TRACK_PROXIED, TRACK_WSCALE_OFFERED, is_closed, max_window, seq_after,
    seq_before,
};
pub use ratelimit::{RATE_FROM_BACKEND, RATE_TO_BACKEND, RateLimit, rate_slot};
pub use service::{
    APP_CLIENT_ADDRESS_TOA, AppConfig, BACKEND_ACCEPTING, Backend4, MSS_CLAMP_MIN, MaglevTable,
    Service, ServiceKey4,
};

pub use crate::stats::TrafficStats;

/// Per-CPU array of `u64`: [`crate::GlobalStat`] slots then [`crate::DropReason`] slots.
pub const GLOBAL_STATS: &str = "gw_global_v8";
/// Number of slots in [`GLOBAL_STATS`].
pub const GLOBAL_STATS_LEN: u32 = crate::GlobalStat::COUNT + crate::DropReason::COUNT;

/// Array with one [`Config`] at index 0 (its lookups are inlined by the verifier).
pub const CONFIG: &str = "gw_config_v4";
/// Hash [`ServiceKey4`] → [`Service`]: `(public_ip, port)` → app.
pub const SERVICES4: &str = "gw_svc4_v1";
/// Array `u32` app id → [`AppConfig`]: an app's datapath settings (its MSS clamp), looked up
/// only by a SYN or SYN-ACK.
pub const APP_CONFIG: &str = "gw_app_cfg_v1";
/// Per-CPU array of [`ICMP_BUCKET_SLOTS`] [`IcmpBucket`]s: the token buckets of translated ICMP
/// errors, one per slot of the quoted tuple's hash (a connection and direction; two share a
/// slot once in 4096).
pub const ICMP_BUCKETS: &str = "gw_icmp_rl_v1";
/// Slots of [`ICMP_BUCKETS`] (a power of two).
pub const ICMP_BUCKET_SLOTS: u32 = 4096;
/// Hash `u32` app id → [`MaglevTable`]: the app's backend choice, computed in userspace.
pub const MAGLEV: &str = "gw_maglev_v1";
/// Array `u32` backend id → [`Backend4`]. Id 0 is never used ("no backend").
pub const BACKENDS4: &str = "gw_be4_v1";
/// Hash [`FlowKey4`] → [`Flow`] (preallocated, never evicting: a full table refuses new flows,
/// `conntrack_full`): conntrack, forward and reverse entries. Global, not per-CPU: with full
/// NAT, replies come back through us on any CPU.
pub const CONNTRACK4: &str = "gw_ct4_v3";
/// Per-CPU array `u32` app id → [`TrafficStats`].
pub const APP_STATS: &str = "gw_app_stats_v1";
/// Array `u32` app id → `i64`: the app's half-open flows (handshake not completed), counted
/// by the datapath (one more per flow a SYN makes, one less when its handshake completes) and
/// set to the exact count by each conntrack scan; slot 0 (no app) holds all apps' together.
/// At [`Config::half_open_max`] (or [`Config::half_open_global_max`] for slot 0) the app's
/// SYNs are answered with SYN cookies instead of making flows (`crate::syncookie`). Not per
/// CPU: one atomic add per SYN.
pub const HALF_OPEN: &str = "gw_half_open_v1";
/// Array `u32` app id → `u64`: the cookie counter (`crate::syncookie::counter`) when the app
/// last answered a SYN with a cookie. An ACK without a flow is checked for a cookie only if
/// its app gave cookies in this counter step or the last (a cookie's lifetime): no SipHash
/// per stray ACK, no window for forging, while there is no flood.
pub const COOKIES: &str = "gw_cookies_v1";
/// Per-CPU array `u32` backend id → [`TrafficStats`].
pub const BACKEND_STATS: &str = "gw_be_stats_v1";
/// Array of [`RATE_SLOTS`] [`RateLimit`]s, by [`rate_slot`] (backend and direction): the
/// per-container packet rate limits (issue 18), shared by every CPU (a compare-and-swap per
/// packet of a limited backend). All zero: no limit.
pub const RATE_LIMITS: &str = "gw_rl_v1";
/// Per-CPU array of [`RATE_SLOTS`] `u64`: packets dropped over each backend's limit, by
/// [`rate_slot`].
pub const RATE_DROPS: &str = "gw_rl_drops_v1";
/// Slots of [`RATE_LIMITS`] and [`RATE_DROPS`]: two per backend.
pub const RATE_SLOTS: u32 = 2 * MAX_BACKENDS;
/// Per-CPU array of [`NEXTHOP_SLOTS`] [`NextHopCache`] slots, indexed by a hash of the
/// destination: FIB results shared by the new flows to one destination.
pub const NEXTHOPS: &str = "gw_hops_v1";
/// Slots of [`NEXTHOPS`] (a power of two).
pub const NEXTHOP_SLOTS: u32 = 4096;
/// Per-CPU hash `u32` ifindex → `u64`: TCP segments that reached the XDP program on that
/// interface with a partial checksum (`GlobalStat::PartialChecksums`, by interface), so that the
/// daemon can name the interfaces whose senders keep tx checksum offload on.
pub const PARTIAL_CSUM: &str = "gw_partial_v1";
/// Interfaces [`PARTIAL_CSUM`] holds (a front node has a handful; more are not counted there).
pub const PARTIAL_CSUM_IFACES: u32 = 256;
/// Per-CPU array with one [`ClockCache`]: the datapath's clock, read once per tick per CPU.
pub const CLOCK: &str = "gw_clock_v1";
/// Per-CPU array with one [`Flow`]: where the datapath builds a new flow's forward entry before
/// inserting it (the BPF stack has no room for one beside the rest of the SYN path). Scratch:
/// nothing reads it between packets.
pub const SCRATCH: &str = "gw_scratch_v1";

/// Every map name, for checks.
pub const ALL: &[&str] = &[
    GLOBAL_STATS,
    CONFIG,
    SERVICES4,
    APP_CONFIG,
    MAGLEV,
    BACKENDS4,
    CONNTRACK4,
    APP_STATS,
    BACKEND_STATS,
    HALF_OPEN,
    COOKIES,
    CLOCK,
    NEXTHOPS,
    SCRATCH,
    PARTIAL_CSUM,
    ICMP_BUCKETS,
    RATE_LIMITS,
    RATE_DROPS,
];

/// `gateway agent`'s maps (docs/client-address.md), pinned in its own directory: not the
/// daemon's, which never pins, upgrades nor removes them (they are not in [`ALL`]). They are in
/// the same object as the datapath's; the daemon creates them unpinned at its load, the socket
/// map at one entry (the object's size, which the agent sets at its own load).
///
/// Hash `u32` IPv4 address (network order) → `u32` (1): the sources whose TOA options the
/// agent believes (gateway SNAT addresses, `--trusted`).
pub const AGENT_TRUSTED: &str = "gw_agt_trust_v1";
/// Entries of [`AGENT_TRUSTED`].
pub const AGENT_TRUSTED_MAX: u32 = 64;
/// LRU hash `u64` socket cookie → [`crate::agent::PeerAddr4`]: the client address of each accepted socket
/// whose establishing segment carried a trusted TOA option, removed when the socket closes.
pub const AGENT_SOCKETS: &str = "gw_agt_sock_v1";
/// The agent's default capacity of [`AGENT_SOCKETS`] (`--max-connections`): the least
/// recently used entry goes when it is full.
pub const AGENT_SOCKETS_DEFAULT: u32 = 65_536;
/// Per-CPU array of `u64`: the agent's counters, one slot per [`crate::agent::AgentStat`].
pub const AGENT_STATS: &str = "gw_agt_stats_v1";
/// Slots of [`AGENT_STATS`].
pub const AGENT_STATS_LEN: u32 = crate::agent::AgentStat::COUNT;

/// Every map name of the agent.
pub const AGENT: &[&str] = &[AGENT_TRUSTED, AGENT_SOCKETS, AGENT_STATS];

/// Names this build no longer uses, from earlier layouts: an upgrade carries the conntrack
/// table over from [`CONNTRACK4_V2`] (an LRU of values of [`FLOW_V2_SIZE`] bytes) or [`CONNTRACK4_V1`] (its
/// entries are the first 80 bytes of a [`Flow`]) and removes these pins, as `gateway down` does.
pub const RETIRED: &[&str] = &[
    CONNTRACK4_V2,
    CONNTRACK4_V1,
    "gw_global_v7",
    "gw_global_v6",
    "gw_global_v5",
    "gw_global_v4",
    "gw_global_v3",
    "gw_global_v2",
    "gw_config_v3",
    "gw_config_v2",
];
/// The conntrack table with sequence tracking, as an LRU hash (it evicted live flows when full).
pub const CONNTRACK4_V2: &str = "gw_ct4_v2";
/// The conntrack table before sequence tracking (values of 80 bytes).
pub const CONNTRACK4_V1: &str = "gw_ct4_v1";
/// Bytes of a [`CONNTRACK4_V1`] value: a [`Flow`] up to its sequence tracking.
pub const FLOW_V1_SIZE: usize = 80;
/// Bytes of a [`CONNTRACK4_V2`] value: a [`Flow`] up to its SYN proxy's `seq_delta`.
pub const FLOW_V2_SIZE: usize = 96;

/// How many apps the maps hold (app ids are `1..MAX_APPS`).
pub const MAX_APPS: u32 = 16_384;
/// How many backends the maps hold (backend ids are `1..MAX_BACKENDS`).
pub const MAX_BACKENDS: u32 = 65_536;
/// How many services (public ip, port) the maps hold.
pub const MAX_SERVICES: u32 = 16_384;
/// How many gateway addresses (public and SNAT) the configuration holds. A front node has a
/// handful; a short array in the config entry is cheaper per packet than a hash lookup.
pub const MAX_ADDRS: usize = 8;
/// Default conntrack capacity (entries; a connection takes two). Settable at load time.
pub const CONNTRACK_DEFAULT: u32 = 1 << 20;

/// Entries in an app's Maglev table: a prime, so every backend's permutation covers it. With
/// up to ~10 backends per app it stays above 100 entries per backend (imbalance ≤ ~1%, per the
/// Maglev paper) while an app costs 4 KiB, so thousands of apps stay small.
pub const MAGLEV_SIZE: u32 = 1021;
/// How many consecutive slots of an app's Maglev table a new flow tries, from its hashed one,
/// when a slot's backend stopped accepting (draining or unhealthy) before userspace rebuilt
/// the table without it. The datapath chooses so (gateway-ebpf's `lb::choose`), and userspace
/// predicts its choice so (gateway-userspace's `maglev::choose`).
pub const MAGLEV_PROBES: u32 = 4;

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: every type here is `#[repr(C)]`, integers only, with explicit padding (bytemuck's
    // `Pod` derive checks it at compile time).
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for ServiceKey4 {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for AppConfig {}
    unsafe impl aya::Pod for RateLimit {}
    unsafe impl aya::Pod for IcmpBucket {}
    unsafe impl aya::Pod for MaglevTable {}
    unsafe impl aya::Pod for Backend4 {}
    unsafe impl aya::Pod for FlowKey4 {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for TrafficStats {}
    unsafe impl aya::Pod for crate::agent::PeerAddr4 {}
}

#[cfg(test)]
mod tests {
    #[test]
    fn map_names_fit_the_kernel_limit() {
        for name in super::ALL.iter().chain(super::AGENT) {
            assert!(name.len() <= 15, "{name} is longer than 15 bytes");
        }
    }

    #[test]
    fn layouts_are_what_the_datapath_expects() {
        assert_eq!(size_of::<super::FlowKey4>(), 16);
        assert_eq!(size_of::<super::Flow>(), 104);
        assert_eq!(
            core::mem::offset_of!(super::Flow, seq_end),
            super::FLOW_V1_SIZE,
            "a v1 entry is a prefix of a v3 one"
        );
        assert_eq!(
            core::mem::offset_of!(super::Flow, seq_delta),
            super::FLOW_V2_SIZE,
            "a v2 entry is a prefix of a v3 one"
        );
        assert_eq!(
            size_of::<super::MaglevTable>(),
            4 * super::MAGLEV_SIZE as usize
        );
        assert_eq!(size_of::<super::NextHopCache>(), 40);
        assert!(super::NEXTHOP_SLOTS.is_power_of_two());
    }
}
