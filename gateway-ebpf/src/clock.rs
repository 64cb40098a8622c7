//! The datapath's clock: CLOCK_MONOTONIC_COARSE (what userspace's expiry compares with), read
//! through a helper call once per tick per CPU and otherwise taken from a per-CPU cache keyed
//! by `jiffies`, whose read the verifier inlines. The coarse clock only moves at a tick, so the
//! cached value is what the helper would return, give or take the tick being handled.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};
use gateway_common::maps::Config;

use crate::maps::CLOCK;

/// Now, in CLOCK_MONOTONIC_COARSE ns.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helpers without arguments.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(cache) = CLOCK.get_ptr_mut(0) else {
        // SAFETY: as above.
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: this CPU's own slot of a per-CPU array.
    unsafe {
        if (*cache).jiffies != jiffies || (*cache).coarse_ns == 0 {
            (*cache).jiffies = jiffies;
            (*cache).coarse_ns = bpf_ktime_get_coarse_ns();
        }
        (*cache).coarse_ns
    }
}

/// The time of a packet's decision, and how long a cached next hop may be trusted then (ns).
#[derive(Clone, Copy)]
pub struct Now {
    pub ns: u64,
    pub nexthop_max_age: u64,
}

impl Now {
    /// Now, with the next-hop age `cfg` gives.
    #[inline(always)]
    pub fn read(cfg: &Config) -> Now {
        Now {
            ns: now_ns(),
            nexthop_max_age: cfg.nexthop_max_age(),
        }
    }
}
