//! Per-CPU counters.

use aya_ebpf::maps::PerCpuArray;

/// Adds one to slot `index` of a per-CPU counter array.
#[inline(always)]
pub fn count(map: &PerCpuArray<u64>, index: u32) {
    if let Some(slot) = map.get_ptr_mut(index) {
        // SAFETY: the pointer comes from the map and is this CPU's own slot.
        unsafe { *slot += 1 };
    }
}
