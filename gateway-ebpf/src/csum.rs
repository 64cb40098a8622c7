//! Internet checksum arithmetic (RFC 1071, incremental updates per RFC 1624). Values are
//! processed as raw 16-bit words of network-order bytes: one's complement sums do not care
//! about byte order as long as reading and writing agree.

/// Adds to `acc` the difference between two 32-bit fields (`new - old`).
#[inline(always)]
pub fn diff32(acc: u32, old: u32, new: u32) -> u32 {
    acc + (!old & 0xffff) + (!(old >> 16) & 0xffff) + (new & 0xffff) + (new >> 16)
}

/// Adds to `acc` the difference between two 16-bit fields (`new - old`).
#[inline(always)]
pub fn diff16(acc: u32, old: u16, new: u16) -> u32 {
    acc + u32::from(!old) + u32::from(new)
}

/// Folds a 32-bit one's complement sum to 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum field after applying `diff` (RFC 1624: HC' = ~(~HC + m' - m)).
#[inline(always)]
pub fn apply(check: u16, diff: u32) -> u16 {
    !fold(u32::from(!check) + diff)
}
