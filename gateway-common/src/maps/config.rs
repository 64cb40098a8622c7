//! The datapath's configuration: one entry of [`super::CONFIG`].

use bytemuck::{Pod, Zeroable};

use super::MAX_ADDRS;

/// [`Config::addr_kinds`] bit: a public address (services listen there).
pub const ADDR_PUBLIC: u32 = 1;
/// [`Config::addr_kinds`] bit: a SNAT address (replies from backends come back there).
pub const ADDR_SNAT: u32 = 2;

/// How long a cached next hop is trusted when [`Config::nexthop_max_age_ns`] is 0 (ns: 1 s).
/// The daemon configures this value too.
pub const NEXTHOP_MAX_AGE_DEFAULT_NS: u64 = 1_000_000_000;

/// Half-open flows per app before SYN cookies, when [`Config::half_open_max`] is 0. A busy app
/// opening a thousand connections per round trip still makes flows; a flood reaches it at once.
pub const HALF_OPEN_MAX_DEFAULT: u32 = 1024;

/// The datapath's configuration (one entry of [`super::CONFIG`]).
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
    /// How long a cached next hop is trusted before it is looked up again (ns); 0:
    /// [`NEXTHOP_MAX_AGE_DEFAULT_NS`].
    pub nexthop_max_age_ns: u64,
    /// The addresses the gateway answers for (network order; 0: free slot). A packet to any
    /// other address is not looked at further.
    pub addrs: [u32; MAX_ADDRS],
    /// What each address of `addrs` is: [`ADDR_PUBLIC`] and/or [`ADDR_SNAT`] bits.
    pub addr_kinds: [u32; MAX_ADDRS],
    /// Half-open flows an app may have (`super::HALF_OPEN`) before its SYNs are answered with
    /// SYN cookies; 0: [`HALF_OPEN_MAX_DEFAULT`].
    pub half_open_max: u32,
    /// Half-open flows of all apps together before every app's SYNs get cookies (slot 0 of
    /// `super::HALF_OPEN`): the per-app caps alone do not bound the table or a backend's SNAT
    /// ports. The daemon sets a quarter of the table and half the SNAT range; 0: none.
    pub half_open_global_max: u32,
    /// The SYN cookies' SipHash key (`crate::syncookie`): random, the daemon's.
    pub cookie_key: [u64; 2],
    /// ICMP errors about one connection (and direction: the quoted tuple) each CPU translates
    /// per second, at most (a token bucket per CPU and slot of `super::ICMP_BUCKETS`, chosen by
    /// the quoted tuple's hash, holding one second's worth); the excess is dropped
    /// (`icmp_rate_limited`). Per connection, so that no one's errors starve another
    /// connection's path MTU discovery. 0: ICMP errors are not translated at all, but handed to
    /// the kernel unchanged (what earlier builds did: path MTU discovery through the gateway
    /// fails).
    pub icmp_rate: u32,
    pub _pad: u32,
}

impl Config {
    /// How long a cached next hop is trusted (ns): [`Config::nexthop_max_age_ns`], or
    /// [`NEXTHOP_MAX_AGE_DEFAULT_NS`] when that is 0.
    #[inline(always)]
    pub const fn nexthop_max_age(&self) -> u64 {
        match self.nexthop_max_age_ns {
            0 => NEXTHOP_MAX_AGE_DEFAULT_NS,
            age => age,
        }
    }

    /// Half-open flows an app may have before SYN cookies: [`Config::half_open_max`], or
    /// [`HALF_OPEN_MAX_DEFAULT`] when that is 0.
    #[inline(always)]
    pub const fn half_open_max(&self) -> u32 {
        match self.half_open_max {
            0 => HALF_OPEN_MAX_DEFAULT,
            max => max,
        }
    }

    /// Whether the app with `app` half-open flows, of `all` in all, is at a cap: its SYNs get
    /// SYN cookies.
    #[inline(always)]
    pub const fn half_open_full(&self, app: i64, all: i64) -> bool {
        app >= self.half_open_max() as i64
            || (self.half_open_global_max != 0 && all >= self.half_open_global_max as i64)
    }

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
