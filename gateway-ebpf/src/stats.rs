//! Per-CPU counters: global ones, drop reasons, and traffic per app and per backend.

use aya_ebpf::bindings::BPF_NOEXIST;
use gateway_common::{
    DropReason, GlobalStat,
    maps::{DIR_FORWARD, Flow, TrafficStats},
};

use crate::maps::{APP_STATS, BACKEND_STATS, GLOBAL, PARTIAL_CSUM};

#[inline(always)]
fn add(index: u32, n: u64) {
    if let Some(slot) = GLOBAL.get_ptr_mut(index) {
        // SAFETY: this CPU's own slot of a per-CPU array.
        unsafe { *slot += n };
    }
}

/// Counts one event of `stat`.
#[inline(always)]
pub fn global(stat: GlobalStat) {
    add(stat.index(), 1);
}

/// Counts `n` events of `stat`.
#[inline(always)]
pub fn global_n(stat: GlobalStat, n: u64) {
    add(stat.index(), n);
}

/// Counts a drop for `reason`.
#[inline(always)]
pub fn drop(reason: DropReason) {
    add(reason.slot(), 1);
}

/// A program's action from what its handling gave: the action, or `drop` (its attach mode's
/// drop action) with the reason counted.
#[inline(always)]
pub fn or_drop<A>(handled: Result<A, DropReason>, drop_action: A) -> A {
    match handled {
        Ok(action) => action,
        Err(reason) => {
            drop(reason);
            drop_action
        }
    }
}

/// Counts a segment with a partial checksum (`partial_checksums`) that came in on `ifindex`,
/// there too (`PARTIAL_CSUM`, for the daemon to name the interface).
#[inline(always)]
pub fn partial_checksum(ifindex: u32) {
    global(GlobalStat::PartialChecksums);
    match PARTIAL_CSUM.get_ptr_mut(ifindex) {
        // SAFETY: this CPU's own value of a per-CPU hash.
        Some(n) => unsafe { *n += 1 },
        None => {
            // Another CPU may have inserted it meanwhile (then this one count is lost); a full
            // map counts nothing more by interface.
            let _ = PARTIAL_CSUM.insert(ifindex, 1, u64::from(BPF_NOEXIST));
        }
    }
}

/// Counts a translated packet of `flow` (`bytes` of L3) for its app and backend.
#[inline(always)]
pub fn traffic(flow: &Flow, bytes: u64) {
    let forward = flow.direction == DIR_FORWARD;
    global(if forward {
        GlobalStat::Forwarded
    } else {
        GlobalStat::Reversed
    });
    if let Some(s) = APP_STATS.get_ptr_mut(flow.app_id) {
        // SAFETY: this CPU's own slot of a per-CPU array.
        count_packet(unsafe { &mut *s }, forward, bytes);
    }
    if let Some(s) = BACKEND_STATS.get_ptr_mut(flow.backend_id) {
        // SAFETY: this CPU's own slot of a per-CPU array.
        count_packet(unsafe { &mut *s }, forward, bytes);
    }
}

#[inline(always)]
fn count_packet(s: &mut TrafficStats, forward: bool, bytes: u64) {
    if forward {
        s.packets_in += 1;
        s.bytes_in += bytes;
    } else {
        s.packets_out += 1;
        s.bytes_out += bytes;
    }
}

/// Counts a new flow for its app and backend.
#[inline(always)]
pub fn new_flow(app_id: u32, backend_id: u32) {
    if let Some(s) = APP_STATS.get_ptr_mut(app_id) {
        // SAFETY: this CPU's own slot of a per-CPU array.
        unsafe { (*s).new_flows += 1 };
    }
    if let Some(s) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: this CPU's own slot of a per-CPU array.
        unsafe { (*s).new_flows += 1 };
    }
}
