//! MAC addresses as the datapath copies them: as three 16-bit words, never as `[u8; 6]` (whose
//! copy compiles to a call of `memmove` in BPF).

use gateway_common::maps::Flow;

// Every MAC field the datapath copies sits at an even offset of a struct aligned to at least 2:
// see `mac_words`.
const _: () = {
    use aya_ebpf::bindings::bpf_fib_lookup;
    use core::mem::{align_of, offset_of};
    use gateway_common::maps::NextHopCache;
    assert!(
        offset_of!(Flow, nexthop_smac) % 2 == 0
            && offset_of!(Flow, nexthop_dmac) % 2 == 0
            && align_of::<Flow>() >= 2
            && offset_of!(NextHopCache, smac) % 2 == 0
            && offset_of!(NextHopCache, dmac) % 2 == 0
            && align_of::<NextHopCache>() >= 2
            && offset_of!(bpf_fib_lookup, smac) % 2 == 0
            && offset_of!(bpf_fib_lookup, dmac) % 2 == 0
            && align_of::<bpf_fib_lookup>() >= 2
    )
};

/// A MAC address field of a `Flow`, a `NextHopCache` or a `bpf_fib_lookup` as three 16-bit
/// words (copied with 16-bit loads; a `[u8; 6]` copy compiles to a call of `memmove`).
#[inline(always)]
pub fn mac_words(mac: &[u8; 6]) -> &[u16; 3] {
    // SAFETY: same size; 2-byte aligned for the fields it is used on (asserted above).
    unsafe { &*(mac as *const [u8; 6]).cast::<[u16; 3]>() }
}

/// Copies the MAC field `src` into the MAC field `dst` (fields as for [`mac_words`]).
#[inline(always)]
pub fn copy_mac(dst: &mut [u8; 6], src: &[u8; 6]) {
    // SAFETY: as for `mac_words`.
    let dst = unsafe { &mut *(dst as *mut [u8; 6]).cast::<[u16; 3]>() };
    let src = mac_words(src);
    dst[0] = src[0];
    dst[1] = src[1];
    dst[2] = src[2];
}
