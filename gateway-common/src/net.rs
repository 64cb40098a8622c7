//! The wire's vocabulary: the IP protocol number of TCP, the TCP header's flag bits
//! ([`tcp_flags`]), the conversions between `core::net` addresses and the maps'
//! network-order integers, and the Internet checksum's pure arithmetic ([`sum_words`],
//! [`pseudo_header`], [`fold`], [`fold64`]).
//!
//! "Network order" (as the maps' field docs say) means the bytes as they are on the wire, read
//! into an integer without swapping: `u32::from_ne_bytes(octets)` for an address and
//! `port.to_be()` for a port. The datapath copies such fields to and from packets as they are.
//!
//! Checksums (RFC 1071) are summed the same way: 16-bit words of network-order bytes read
//! without swapping. A one's complement sum does not care about byte order as long as reading
//! and writing agree, so a checksum computed so is written back with `to_ne_bytes`.

use core::net::{Ipv4Addr, SocketAddrV4};

/// IP protocol number of TCP (the `proto` field of keys, byte 9 of an IPv4 header).
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol number of ICMP (RFC 792).
pub const IPPROTO_ICMP: u8 = 1;

/// ICMP types the gateway translates (RFC 792, RFC 1191, RFC 1812): errors that quote the
/// packet they are about. Echo, redirect, source quench and the rest are not errors about a
/// flow the gateway relays: they go to its kernel.
pub mod icmp {
    /// Destination unreachable (type 3).
    pub const DEST_UNREACH: u8 = 3;
    /// Destination unreachable's code 4: fragmentation needed and DF set; bytes 6..8 of the
    /// ICMP header hold the next hop's MTU (RFC 1191).
    pub const FRAG_NEEDED: u8 = 4;
    /// Time exceeded (type 11).
    pub const TIME_EXCEEDED: u8 = 11;
    /// Parameter problem (type 12).
    pub const PARAM_PROBLEM: u8 = 12;
    /// Bytes of the ICMP header before the quoted packet.
    pub const HEADER_LEN: usize = 8;

    /// Whether an ICMP message of `kind` is an error the gateway translates.
    #[inline(always)]
    pub const fn is_error(kind: u8) -> bool {
        matches!(kind, DEST_UNREACH | TIME_EXCEEDED | PARAM_PROBLEM)
    }
}

/// TOA ("TCP option address"), the option through which LVS FULLNAT and DPVS tell a backend the
/// client's address, in their format (no RFC; kind 254 is RFC 6994's shared experimental kind,
/// used without its experiment identifier): kind 254, length 8, the client's port (2 bytes), then
/// its IPv4 address (4 bytes), both in network order. The gateway adds it to what a client sends
/// a backend of an app with `--client-address toa` until that backend has certainly seen it,
/// and removes any a client sent itself; `gateway agent` (or a backend's toa kernel module)
/// reads it. docs/client-address.md.
pub mod toa {
    /// The option's kind.
    pub const KIND: u8 = 254;
    /// The option's length (bytes, kind and length included).
    pub const LEN: u8 = 8;

    /// The option's 8 bytes for a client at `ip:port` (both network order, as parsed from the
    /// wire).
    #[inline(always)]
    pub const fn option(ip: u32, port: u16) -> [u8; 8] {
        let [p0, p1] = port.to_ne_bytes();
        let [a0, a1, a2, a3] = ip.to_ne_bytes();
        [KIND, LEN, p0, p1, a0, a1, a2, a3]
    }

    /// The client's address and port (network order) in an option's 8 bytes, if they are a TOA
    /// option.
    #[inline(always)]
    pub const fn parse(bytes: [u8; 8]) -> Option<(u32, u16)> {
        if bytes[0] != KIND || bytes[1] != LEN {
            return None;
        }
        Some((
            u32::from_ne_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            u16::from_ne_bytes([bytes[2], bytes[3]]),
        ))
    }
}

/// The flag bits of a TCP header's byte 13, as on the wire (RFC 9293, RFC 3168). The
/// conntrack's state bits are another thing: `maps::conntrack::CT_*`.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    pub const URG: u8 = 0x20;
    pub const ECE: u8 = 0x40;
    pub const CWR: u8 = 0x80;

    /// The combinations a valid segment can have, by `flags & (FIN|SYN|RST|ACK|URG)` (PSH, ECE
    /// and CWR ignored), one bit each: netfilter's `tcp_valid_flags`
    /// (`nf_conntrack_proto_tcp.c`): SYN, SYN|URG, SYN|ACK, RST, RST|ACK, FIN|ACK,
    /// FIN|ACK|URG, ACK, ACK|URG.
    const VALID: u64 = 1 << SYN
        | 1 << (SYN | URG)
        | 1 << (SYN | ACK)
        | 1 << RST
        | 1 << (RST | ACK)
        | 1 << (FIN | ACK)
        | 1 << (FIN | ACK | URG)
        | 1 << ACK
        | 1 << (ACK | URG);

    /// Whether a segment with the flags byte `flags` can be valid TCP (see `VALID`): SYN+FIN,
    /// SYN+RST, no flags, FIN or PSH or URG without ACK and the like cannot.
    #[inline(always)]
    pub const fn valid(flags: u8) -> bool {
        (VALID >> (flags & (FIN | SYN | RST | ACK | URG))) & 1 != 0
    }
}

/// `addr` as the maps hold it (network order).
#[inline(always)]
pub const fn ip_to_net(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// The address held in a network-order map field.
#[inline(always)]
pub const fn ip_from_net(ip: u32) -> Ipv4Addr {
    let [a, b, c, d] = ip.to_ne_bytes();
    Ipv4Addr::new(a, b, c, d)
}

/// `port` (host order) as the maps hold it (network order).
#[inline(always)]
pub const fn port_to_net(port: u16) -> u16 {
    port.to_be()
}

/// The port (host order) held in a network-order map field.
#[inline(always)]
pub const fn port_from_net(port: u16) -> u16 {
    u16::from_be(port)
}

/// The socket address held in a network-order address and port pair of map fields.
#[inline(always)]
pub const fn socket_from_net(ip: u32, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip_from_net(ip), port_from_net(port))
}

/// Folds a 32-bit one's complement sum to 16 bits.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Folds a 64-bit one's complement sum to 16 bits.
#[inline(always)]
pub const fn fold64(sum: u64) -> u16 {
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    fold((sum & 0xffff) as u32 + (sum >> 16) as u32)
}

/// The one's complement sum, folded, of `bytes` as 16-bit words read without swapping; an odd
/// last byte counts as a word with a zero second byte (RFC 1071).
pub fn sum_words(bytes: &[u8]) -> u16 {
    let mut sum = 0u64;
    let mut words = bytes.chunks_exact(2);
    for w in &mut words {
        sum += u64::from(u16::from_ne_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(u16::from_ne_bytes([*last, 0]));
    }
    fold64(sum)
}

/// The sum of a TCP pseudo-header (RFC 9293 §3.1): addresses `src_ip` and `dst_ip` (network
/// order), protocol, TCP length `tcp_len` (host order), as words read without swapping. Not
/// folded: at most six words.
#[inline(always)]
pub const fn pseudo_header(src_ip: u32, dst_ip: u32, tcp_len: u16) -> u32 {
    (src_ip & 0xffff)
        + (src_ip >> 16)
        + (dst_ip & 0xffff)
        + (dst_ip >> 16)
        + (IPPROTO_TCP as u16).to_be() as u32
        + tcp_len.to_be() as u32
}

#[cfg(test)]
mod tests {
    #[test]
    fn valid_flag_combinations_are_netfilters() {
        use super::tcp_flags::*;
        let list: [u8; 9] = [
            SYN,
            SYN | URG,
            SYN | ACK,
            RST,
            RST | ACK,
            FIN | ACK,
            FIN | ACK | URG,
            ACK,
            ACK | URG,
        ];
        for flags in 0..=255u8 {
            let core = flags & !(PSH | ECE | CWR);
            assert_eq!(valid(flags), list.contains(&core), "{flags:#04x}");
        }
        for bad in [
            0,
            SYN | FIN,
            SYN | RST,
            FIN,
            PSH,
            URG,
            RST | FIN,
            FIN | URG,
            SYN | ACK | FIN,
        ] {
            assert!(!valid(bad), "{bad:#04x}");
        }
        assert!(valid(ACK | PSH) && valid(SYN | ECE | CWR));
    }

    use super::*;

    #[test]
    fn conversions_keep_the_wire_bytes() {
        let addr = Ipv4Addr::new(203, 0, 113, 10);
        assert_eq!(ip_to_net(addr).to_ne_bytes(), [203, 0, 113, 10]);
        assert_eq!(ip_from_net(ip_to_net(addr)), addr);
        assert_eq!(port_to_net(20_000).to_ne_bytes(), 20_000u16.to_be_bytes());
        assert_eq!(port_from_net(port_to_net(20_000)), 20_000);
        assert_eq!(
            socket_from_net(ip_to_net(addr), port_to_net(20_000)),
            "203.0.113.10:20000".parse().unwrap()
        );
    }
    #[test]
    fn sums_are_rfc_1071s_whatever_the_byte_order() {
        // RFC 1071 §3's example words sum to 0xddf2 (with the carries folded in).
        let words = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(sum_words(&words).to_ne_bytes(), [0xdd, 0xf2]);
        // An odd last byte is the first of a word.
        assert_eq!(sum_words(&[0x12]).to_ne_bytes(), [0x12, 0]);
        assert_eq!(fold(0x1_fffe), 0xffff);
        assert_eq!(fold(0xffff_ffff), 0xffff);
    }

    #[test]
    fn a_toa_option_is_kind_length_port_then_address_in_network_order() {
        let (ip, port) = (ip_to_net(Ipv4Addr::new(192, 0, 2, 2)), port_to_net(40_000));
        let bytes = toa::option(ip, port);
        assert_eq!(bytes, [254, 8, 0x9c, 0x40, 192, 0, 2, 2]);
        assert_eq!(toa::parse(bytes), Some((ip, port)));
        assert_eq!(toa::parse([254, 10, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(toa::parse([253, 8, 0, 0, 0, 0, 0, 0]), None);
    }

    #[test]
    fn a_pseudo_header_sums_as_its_12_bytes() {
        let (src, dst) = (Ipv4Addr::new(203, 0, 113, 10), Ipv4Addr::new(192, 0, 2, 2));
        let bytes = [203, 0, 113, 10, 192, 0, 2, 2, 0, IPPROTO_TCP, 0x05, 0xdc];
        assert_eq!(
            fold(pseudo_header(ip_to_net(src), ip_to_net(dst), 1500)),
            sum_words(&bytes)
        );
    }
}
