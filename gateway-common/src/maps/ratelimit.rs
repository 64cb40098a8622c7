//! Per-container rate limits (issue 18): one [`RateLimit`] per backend and direction in
//! [`super::RATE_LIMITS`], kept as GCRA (the generic cell rate algorithm of ITU-T I.371, a
//! token bucket held as one time: the theoretical arrival time of the next packet), so that a
//! single compare-and-swap updates it from any CPU.

use bytemuck::{Pod, Zeroable};

/// [`rate_slot`] direction: packets to the container (a flow's forward entry).
pub const RATE_TO_BACKEND: u32 = 0;
/// [`rate_slot`] direction: packets from the container (a flow's reverse entry).
pub const RATE_FROM_BACKEND: u32 = 1;

/// The slot of [`super::RATE_LIMITS`] (and [`super::RATE_DROPS`]) of backend `backend_id` in
/// `direction` ([`RATE_TO_BACKEND`], [`RATE_FROM_BACKEND`]: a flow entry's `direction`).
#[inline(always)]
pub const fn rate_slot(backend_id: u32, direction: u32) -> u32 {
    backend_id.wrapping_mul(2).wrapping_add(direction & 1)
}

/// Value of [`super::RATE_LIMITS`]: a backend's packet rate limit in one direction (all zero:
/// none). The daemon writes `interval_ns` and `tolerance_ns`; the datapath moves `tat_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RateLimit {
    /// Nanoseconds between two packets at the rate (10^9 / packets per second); 0: no limit.
    pub interval_ns: u64,
    /// How far ahead of now the theoretical arrival time may be and a packet still pass: (burst
    /// − 1) × `interval_ns`, so that `burst` packets pass at once after a quiet period (ns).
    pub tolerance_ns: u64,
    /// The theoretical arrival time of the next packet (the datapath's coarse clock, ns;
    /// compare-and-swapped by every CPU).
    pub tat_ns: u64,
}

impl RateLimit {
    /// A limit of `pps` packets per second (≥ 1) with bursts of `burst` packets (≥ 1).
    pub const fn new(pps: u32, burst: u32) -> Self {
        let pps = if pps == 0 { 1 } else { pps };
        let burst = if burst == 0 { 1 } else { burst };
        let interval_ns = 1_000_000_000 / pps as u64;
        RateLimit {
            interval_ns,
            tolerance_ns: (burst as u64 - 1) * interval_ns,
            tat_ns: 0,
        }
    }

    /// The same limit read against a clock that moves by `tick_ns` at once (the datapath's
    /// coarse clock: a tick, 4 ms at HZ=250): its tolerance is at least a tick. Packets within
    /// one tick all arrive at the same time for the datapath; with less, a limit would pass only
    /// its burst per tick (1,000 packets/s in bursts of 1 would pass 250/s at HZ=250), whatever
    /// its rate. So the burst is in effect at least the rate's packets of a tick.
    pub const fn with_tick(self, tick_ns: u64) -> Self {
        RateLimit {
            tolerance_ns: if self.tolerance_ns < tick_ns {
                tick_ns
            } else {
                self.tolerance_ns
            },
            ..self
        }
    }

    /// GCRA's decision for a packet at `now` (ns) standing for `segments` packets on the wire
    /// (a GSO skb's; ≥ 1) with the theoretical arrival time `tat`: the new theoretical arrival
    /// time if it passes (later by an interval per segment), `None` if it is over the limit.
    #[inline(always)]
    pub const fn admit(&self, tat: u64, now: u64, segments: u32) -> Option<u64> {
        let base = if tat > now { tat } else { now };
        if base - now > self.tolerance_ns {
            None
        } else {
            Some(base + self.interval_ns * segments as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays `times` (ns) through one limit; how many passed.
    fn passed(limit: RateLimit, times: impl IntoIterator<Item = u64>) -> usize {
        let mut tat = 0;
        times
            .into_iter()
            .filter(|&now| match limit.admit(tat, now, 1) {
                Some(next) => {
                    tat = next;
                    true
                }
                None => false,
            })
            .count()
    }

    #[test]
    fn a_burst_passes_whole_then_the_rate() {
        let limit = RateLimit::new(1_000, 200);
        assert_eq!(limit.interval_ns, 1_000_000);
        // 250 packets at one instant: the burst passes, the rest does not.
        assert_eq!(passed(limit, core::iter::repeat_n(5_000_000_000, 250)), 200);
        // 5,000 packets/s for 10 s: the burst and then 1,000 a second.
        let flood = (0..50_000u64).map(|i| 1_000_000_000 + i * 200_000);
        let n = passed(limit, flood);
        assert!((10_150..=10_201).contains(&n), "{n}");
    }

    #[test]
    fn a_limit_of_one_packet_bursts_one() {
        let limit = RateLimit::new(10, 1);
        assert_eq!(limit.tolerance_ns, 0);
        assert_eq!(
            passed(limit, [0, 1, 50_000_000, 100_000_000, 100_000_001]),
            2
        );
    }

    #[test]
    fn a_coarse_clock_does_not_cut_the_rate() {
        // 1,000 packets/s in bursts of 1, one packet every 2 ms, read on a clock of 4 ms ticks.
        let times = (0..1_000u64).map(|i| 1_000_000_000 + (i * 2_000_000) / 4_000_000 * 4_000_000);
        let limit = RateLimit::new(1_000, 1);
        assert_eq!(
            passed(limit, times.clone()),
            500,
            "only one a tick without it"
        );
        assert_eq!(passed(limit.with_tick(4_000_000), times), 1_000);
        // A tolerance above the tick is kept.
        let big = RateLimit::new(1_000, 100);
        assert_eq!(big.with_tick(4_000_000), big);
    }

    #[test]
    fn a_gso_packet_takes_a_token_per_segment() {
        let limit = RateLimit::new(1_000, 50);
        // A 45-segment GSO packet passes on a full bucket, and leaves it 5 tokens.
        let tat = limit.admit(0, 1_000_000_000, 45).unwrap();
        assert_eq!(tat, 1_000_000_000 + 45 * 1_000_000);
        let mut tat = tat;
        let mut n = 0;
        while let Some(next) = limit.admit(tat, 1_000_000_000, 1) {
            tat = next;
            n += 1;
        }
        assert_eq!(n, 5);
    }

    #[test]
    fn slots_are_per_backend_and_direction() {
        assert_eq!(rate_slot(0, RATE_TO_BACKEND), 0);
        assert_eq!(rate_slot(7, RATE_FROM_BACKEND), 15);
        assert_eq!(rate_slot(7, 3), 15, "only the direction's bit counts");
    }
}
