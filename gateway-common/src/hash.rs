//! The flow hash that picks a slot of an app's Maglev table. The datapath and userspace use
//! this one function, so userspace can predict the datapath's choice.

/// Hashes a client 4-tuple (addresses and ports in network order, as stored in
/// [`crate::maps::FlowKey4`]). Murmur3's 32-bit finalizer over a simple combination: cheap,
/// branch-free, and well mixed in its low bits (which `% MAGLEV_SIZE` keeps).
#[inline(always)]
pub const fn flow_hash4(src_ip: u32, dst_ip: u32, src_port: u16, dst_port: u16) -> u32 {
    let mut h = src_ip ^ dst_ip.rotate_left(16) ^ ((src_port as u32) << 16 | dst_port as u32);
    h = h.wrapping_add(0x9e37_79b9);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_ports_spread_over_the_table() {
        let size = crate::maps::MAGLEV_SIZE;
        let mut hit = [0u32; 3];
        for port in 30_000u16..33_000 {
            let h = flow_hash4(0x0200_00c0, 0x0a71_00cb, port.to_be(), 20_000u16.to_be());
            hit[((h % size) % 3) as usize] += 1;
        }
        for n in hit {
            assert!((800..1200).contains(&n), "{hit:?}");
        }
    }
}
