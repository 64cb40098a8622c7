//! SYN cookies: the initial sequence number of a SYN-ACK that answers a SYN without keeping any
//! state, so that the client's ACK alone proves the handshake (D. J. Bernstein's design, as
//! Linux's `net/ipv4/syncookies.c` lays it out). The datapath answers SYNs with them when an
//! app's half-open flows reach their cap, and makes the flow from the ACK (a SYN proxy toward
//! the backend, as netfilter's SYNPROXY does). The datapath and userspace share these pure
//! functions; the key is the daemon's ([`crate::maps::Config::cookie_key`]).
//!
//! A cookie (32 bits, host order) is:
//! - bits 31..30: the low two bits of the time counter ([`counter`], 2^36 ns, ~68.7 s per step);
//! - bits 29..28: the MSS index in [`MSS_TABLE`] (the largest entry not above the SYN's MSS);
//! - bits 27..0: SipHash-2-4 (128-bit key) of the connection's addresses and ports, the client's
//!   ISN, the full counter and the MSS index, truncated.
//!
//! It is valid for the counter it was made in and the next one (~69 to ~137 s), for those
//! addresses, ports and ISN only: a forger must guess 28 bits per attempt (Linux: 24).
//! What a cookie cannot carry (window scaling, SACK, timestamps) the proxied connection does
//! without, as with Linux's cookies when the client sends no timestamps.

/// The MSS values a cookie can carry (Linux's `msstab` for IPv4): the largest entry not above
/// the SYN's MSS option (536 without one, RFC 9293 §3.7.1) is the MSS the backend is told.
pub const MSS_TABLE: [u16; 4] = [536, 1300, 1440, 1460];

/// The time counter a cookie is made in: the coarse monotonic clock (ns) in steps of 2^36 ns
/// (~68.7 s).
#[inline(always)]
pub const fn counter(now_ns: u64) -> u64 {
    now_ns >> 36
}

/// The index in [`MSS_TABLE`] of the largest MSS not above `mss` (0 when `mss` is below 536).
#[inline(always)]
pub const fn mss_index(mss: u16) -> u32 {
    if mss >= MSS_TABLE[3] {
        3
    } else if mss >= MSS_TABLE[2] {
        2
    } else if mss >= MSS_TABLE[1] {
        1
    } else {
        0
    }
}

/// The connection a cookie is for: addresses and ports as the client's SYN carries them
/// (network order, as [`crate::maps::FlowKey4`] holds them) and the client's ISN (host order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handshake {
    pub src_ip: u32,
    pub dst_ip: u32,
    pub src_port: u16,
    pub dst_port: u16,
    /// The client's initial sequence number: its SYN's `seq`, its ACK's `seq - 1`.
    pub isn: u32,
}

/// The cookie for `hs` with `key`, made at time counter `counter` (see [`counter`]) with MSS
/// index `mss_index` (0..=3).
#[inline(always)]
pub const fn make(key: &[u64; 2], hs: &Handshake, counter: u64, mss_index: u32) -> u32 {
    let h = hash(key, hs, counter, mss_index);
    ((counter as u32 & 3) << 30) | ((mss_index & 3) << 28) | (h & 0x0fff_ffff)
}

/// The MSS `cookie` carries if it is one [`make`] gave for `hs` with `key` in counter
/// `now_counter` or the one before; `None` otherwise.
#[inline(always)]
pub const fn check(key: &[u64; 2], hs: &Handshake, cookie: u32, now_counter: u64) -> Option<u16> {
    // The counter it was made in: now's, or the one before (its low two bits say which).
    let made = if (now_counter as u32 & 3) == cookie >> 30 {
        now_counter
    } else if (now_counter.wrapping_sub(1) as u32 & 3) == cookie >> 30 {
        now_counter.wrapping_sub(1)
    } else {
        return None;
    };
    let index = (cookie >> 28) & 3;
    if make(key, hs, made, index) == cookie {
        Some(MSS_TABLE[index as usize])
    } else {
        None
    }
}

/// SipHash-2-4 of the handshake's three 64-bit words (Aumasson and Bernstein, 2012).
#[inline(always)]
const fn hash(key: &[u64; 2], hs: &Handshake, counter: u64, mss_index: u32) -> u32 {
    let m0 = ((hs.src_ip as u64) << 32) | hs.dst_ip as u64;
    let m1 = ((hs.src_port as u64) << 48) | ((hs.dst_port as u64) << 32) | hs.isn as u64;
    let m2 = (counter << 2) | (mss_index as u64 & 3);
    let mut v = [
        key[0] ^ 0x736f_6d65_7073_6575,
        key[1] ^ 0x646f_7261_6e64_6f6d,
        key[0] ^ 0x6c79_6765_6e65_7261,
        key[1] ^ 0x7465_6462_7974_6573,
    ];
    v = compress(v, m0);
    v = compress(v, m1);
    v = compress(v, m2);
    // The last block: the message length in bytes (24) in its top byte.
    v = compress(v, 24u64 << 56);
    v[2] ^= 0xff;
    v = round(round(round(round(v))));
    let h = v[0] ^ v[1] ^ v[2] ^ v[3];
    (h ^ (h >> 32)) as u32
}

#[inline(always)]
const fn compress(mut v: [u64; 4], m: u64) -> [u64; 4] {
    v[3] ^= m;
    v = round(round(v));
    v[0] ^= m;
    v
}

#[inline(always)]
const fn round(mut v: [u64; 4]) -> [u64; 4] {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13);
    v[1] ^= v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16);
    v[3] ^= v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21);
    v[3] ^= v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17);
    v[1] ^= v[2];
    v[2] = v[2].rotate_left(32);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u64; 2] = [0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908];
    const HS: Handshake = Handshake {
        src_ip: 0x0200_00c0,
        dst_ip: 0x0a71_00cb,
        src_port: 40_000u16.to_be(),
        dst_port: 20_000u16.to_be(),
        isn: 0x1234_5678,
    };

    /// The reference vector of the SipHash paper (Appendix A): key 00..0f, message 00..0e.
    #[test]
    fn siphash_rounds_match_the_papers_vector() {
        // The paper hashes 15 bytes; its two full words and last block, run through the same
        // compression and finalisation as `hash`.
        let mut v = [
            KEY[0] ^ 0x736f_6d65_7073_6575,
            KEY[1] ^ 0x646f_7261_6e64_6f6d,
            KEY[0] ^ 0x6c79_6765_6e65_7261,
            KEY[1] ^ 0x7465_6462_7974_6573,
        ];
        v = compress(v, 0x0706_0504_0302_0100);
        v = compress(
            v,
            0x0f0e_0d0c_0b0a_0908 & 0x00ff_ffff_ffff_ffff | (15u64 << 56),
        );
        v[2] ^= 0xff;
        v = round(round(round(round(v))));
        assert_eq!(v[0] ^ v[1] ^ v[2] ^ v[3], 0xa129_ca61_49be_45e5);
    }

    #[test]
    fn a_cookie_checks_in_its_counter_and_the_next_only() {
        for index in 0..4 {
            let c = make(&KEY, &HS, 1000, index);
            assert_eq!(c >> 30, 1000 & 3);
            assert_eq!(check(&KEY, &HS, c, 1000), Some(MSS_TABLE[index as usize]));
            assert_eq!(check(&KEY, &HS, c, 1001), Some(MSS_TABLE[index as usize]));
            assert_eq!(check(&KEY, &HS, c, 1002), None);
            assert_eq!(check(&KEY, &HS, c, 999), None);
        }
    }

    #[test]
    fn a_cookie_is_bound_to_its_connection_and_key() {
        let c = make(&KEY, &HS, 7, 3);
        let other = |f: fn(&mut Handshake)| {
            let mut hs = HS;
            f(&mut hs);
            check(&KEY, &hs, c, 7)
        };
        assert_eq!(other(|h| h.src_ip ^= 1), None);
        assert_eq!(other(|h| h.dst_ip ^= 1 << 24), None);
        assert_eq!(other(|h| h.src_port ^= 1), None);
        assert_eq!(other(|h| h.dst_port ^= 1), None);
        assert_eq!(other(|h| h.isn = h.isn.wrapping_add(1)), None);
        assert_eq!(check(&[KEY[0], KEY[1] ^ 1], &HS, c, 7), None);
        // Another MSS index in the same cookie.
        assert_eq!(check(&KEY, &HS, c ^ (1 << 28), 7), None);
        assert_eq!(check(&KEY, &HS, c ^ 1, 7), None);
    }

    #[test]
    fn the_mss_index_is_the_largest_entry_not_above() {
        assert_eq!(
            [0, 535, 536, 1299, 1300, 1439, 1440, 1459, 1460, 9000].map(mss_index),
            [0, 0, 0, 0, 1, 1, 2, 2, 3, 3]
        );
    }
}
