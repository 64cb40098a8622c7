//! Per-container rate limits (issue 18, `gateway_common::maps::ratelimit`): after its flow is
//! found, a packet of a backend whose app has a limit passes only within it (GCRA: one
//! compare-and-swap of the theoretical arrival time, shared by every CPU, so that one flow on
//! one CPU gets its whole plan), and so does a new flow's SYN, before its SNAT port is
//! claimed (`nat::create`); the RST that ends a connection always passes (a limit must never
//! strand state), one that ends nothing is limited (`conntrack::track`). A
//! backend without a limit costs one array lookup and one load; its limit is never written.

use core::intrinsics::{AtomicOrdering, atomic_cxchg};

use gateway_common::{
    DropReason,
    maps::{Flow, RATE_TO_BACKEND, rate_slot},
    net::tcp_flags::RST,
};

use crate::maps::{RATE_DROPS, RATE_LIMITS};

/// Compare-and-swap attempts before a packet that keeps losing the race to other CPUs is taken
/// as over the limit (each loss means another packet of the same backend passed meanwhile).
const ATTEMPTS: usize = 4;

/// Whether the packet of `flow` with TCP flags `flags`, standing for `segments()` packets on the
/// wire (a TC GSO skb's; asked only of a limited backend's packet), passes its backend's limit
/// in its direction at `now` (the coarse clock, ns); `Err(RateLimited)`, counted per backend and
/// direction, when it does not.
#[inline(always)]
pub fn admit(
    flow: &Flow,
    flags: u8,
    now: u64,
    segments: impl FnOnce() -> u32,
) -> Result<(), DropReason> {
    admit_slot(
        rate_slot(flow.backend_id, u32::from(flow.direction)),
        flags,
        now,
        segments,
    )
}

/// The same for the SYN (or the SYN a cookie's ACK becomes) of a new flow to backend
/// `backend_id`, before its SNAT port is claimed: a packet to the container like any other (a
/// client opening connection after connection would go past the limit otherwise).
#[inline(always)]
pub fn admit_new(
    backend_id: u32,
    now: u64,
    segments: impl FnOnce() -> u32,
) -> Result<(), DropReason> {
    admit_slot(rate_slot(backend_id, RATE_TO_BACKEND), 0, now, segments)
}

/// The same for an RST of `flow` that ends nothing (`conntrack::track`: one in the window but
/// not at the exact number, or one again on a flow already reset); [`admit`] lets every RST
/// pass, for the RST that ends a connection must.
#[inline(always)]
pub fn admit_rst(flow: &Flow, now: u64) -> Result<(), DropReason> {
    admit_slot(
        rate_slot(flow.backend_id, u32::from(flow.direction)),
        0,
        now,
        || 1,
    )
}

#[inline(always)]
fn admit_slot(
    slot: u32,
    flags: u8,
    now: u64,
    segments: impl FnOnce() -> u32,
) -> Result<(), DropReason> {
    let Some(limit) = RATE_LIMITS.get_ptr_mut(slot) else {
        return Ok(());
    };
    // SAFETY: a map value of this array; its config fields are the daemon's, read whole.
    let limit = unsafe { &mut *limit };
    if limit.interval_ns == 0 || flags & RST != 0 {
        return Ok(());
    }
    let segments = segments();
    let tat = &raw mut limit.tat_ns;
    for _ in 0..ATTEMPTS {
        // SAFETY: an aligned u64 of a map value; other CPUs change it only atomically.
        let seen = unsafe { core::ptr::read_volatile(tat) };
        let Some(next) = limit.admit(seen, now, segments) else {
            break;
        };
        // SAFETY: as above; BPF_CMPXCHG (Linux ≥ 5.12).
        let (_, won) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                tat, seen, next,
            )
        };
        if won {
            return Ok(());
        }
    }
    if let Some(drops) = RATE_DROPS.get_ptr_mut(slot) {
        // SAFETY: this CPU's own slot of a per-CPU array.
        unsafe { *drops += u64::from(segments) };
    }
    Err(DropReason::RateLimited)
}
