//! The datapath's maps. Their names, keys and values are `gateway_common::maps`'s (the
//! `#[map]` attribute takes a literal; userspace loads every map by its gateway-common name,
//! so a name that drifts fails its tests). Every module takes its maps from here.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap},
};
use gateway_common::maps::{
    AppConfig, Backend4, CONNTRACK_DEFAULT, ClockCache, Config, Flow, FlowKey4, GLOBAL_STATS_LEN,
    ICMP_BUCKET_SLOTS, IcmpBucket, MAX_APPS, MAX_BACKENDS, MAX_SERVICES, MaglevTable,
    NEXTHOP_SLOTS, NextHopCache, PARTIAL_CSUM_IFACES, RATE_SLOTS, RateLimit, Service, ServiceKey4,
    TrafficStats,
};

/// `GLOBAL_STATS`: global counters, then drop reasons (per CPU).
#[map(name = "gw_global_v8")]
pub static GLOBAL: PerCpuArray<u64> = PerCpuArray::with_max_entries(GLOBAL_STATS_LEN, 0);

/// `CONFIG`: the configuration, at index 0.
#[map(name = "gw_config_v4")]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// `HALF_OPEN`: app → its half-open flows (`i64`, atomic adds; see `synproxy`).
#[map(name = "gw_half_open_v1")]
pub static HALF_OPEN: Array<i64> = Array::with_max_entries(MAX_APPS, 0);

/// `COOKIES`: app → the cookie counter when it last gave a cookie (see `synproxy`).
#[map(name = "gw_cookies_v1")]
pub static COOKIES: Array<u64> = Array::with_max_entries(MAX_APPS, 0);

/// `SERVICES4`: `(public ip, port)` → app.
#[map(name = "gw_svc4_v1")]
pub static SERVICES: HashMap<ServiceKey4, Service> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// `APP_CONFIG`: app → its datapath settings (MSS clamp).
#[map(name = "gw_app_cfg_v1")]
pub static APP_CONFIG: Array<AppConfig> = Array::with_max_entries(MAX_APPS, 0);

/// `ICMP_BUCKETS`: the token buckets of translated ICMP errors, one per slot of the quoted
/// tuple's hash (per CPU).
#[map(name = "gw_icmp_rl_v1")]
pub static ICMP_BUCKETS: PerCpuArray<IcmpBucket> =
    PerCpuArray::with_max_entries(ICMP_BUCKET_SLOTS, 0);

/// `MAGLEV`: app → its Maglev table.
#[map(name = "gw_maglev_v1")]
pub static MAGLEV: HashMap<u32, MaglevTable> =
    HashMap::with_max_entries(MAX_APPS, BPF_F_NO_PREALLOC);

/// `BACKENDS4`: backend id → address and flags.
#[map(name = "gw_be4_v1")]
pub static BACKENDS: Array<Backend4> = Array::with_max_entries(MAX_BACKENDS, 0);

/// `CONNTRACK4`: both entries of every connection (global, preallocated, never evicting; its
/// size is set at load).
#[map(name = "gw_ct4_v3")]
pub static CONNTRACK: HashMap<FlowKey4, Flow> = HashMap::with_max_entries(CONNTRACK_DEFAULT, 0);

/// `APP_STATS`: traffic per app (per CPU).
#[map(name = "gw_app_stats_v1")]
pub static APP_STATS: PerCpuArray<TrafficStats> = PerCpuArray::with_max_entries(MAX_APPS, 0);

/// `BACKEND_STATS`: traffic per backend (per CPU).
#[map(name = "gw_be_stats_v1")]
pub static BACKEND_STATS: PerCpuArray<TrafficStats> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// `RATE_LIMITS`: the per-container rate limits, by `rate_slot` (shared by every CPU).
#[map(name = "gw_rl_v1")]
pub static RATE_LIMITS: Array<RateLimit> = Array::with_max_entries(RATE_SLOTS, 0);

/// `RATE_DROPS`: packets dropped over each backend's limit, by `rate_slot` (per CPU).
#[map(name = "gw_rl_drops_v1")]
pub static RATE_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(RATE_SLOTS, 0);

/// `NEXTHOPS`: FIB answers shared by new flows (per CPU).
#[map(name = "gw_hops_v1")]
pub static NEXTHOPS: PerCpuArray<NextHopCache> = PerCpuArray::with_max_entries(NEXTHOP_SLOTS, 0);

/// `SCRATCH`: where a new flow's forward entry is built (per CPU).
#[map(name = "gw_scratch_v1")]
pub static SCRATCH: PerCpuArray<Flow> = PerCpuArray::with_max_entries(1, 0);

/// `CLOCK`: the clock cache (per CPU).
#[map(name = "gw_clock_v1")]
pub static CLOCK: PerCpuArray<ClockCache> = PerCpuArray::with_max_entries(1, 0);

/// `PARTIAL_CSUM`: segments with a partial checksum seen by XDP, by ingress interface (per
/// CPU).
#[map(name = "gw_partial_v1")]
pub static PARTIAL_CSUM: PerCpuHashMap<u32, u64> =
    PerCpuHashMap::with_max_entries(PARTIAL_CSUM_IFACES, 0);
