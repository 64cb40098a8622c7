//! The wire's vocabulary: the IP protocol number of TCP, the TCP header's flag bits
//! ([`tcp_flags`]), and the
//! conversions between `core::net` addresses and the maps' network-order integers.
//!
//! "Network order" (as the maps' field docs say) means the bytes as they are on the wire, read
//! into an integer without swapping: `u32::from_ne_bytes(octets)` for an address and
//! `port.to_be()` for a port. The datapath copies such fields to and from packets as they are.

use core::net::{Ipv4Addr, SocketAddrV4};

/// IP protocol number of TCP (the `proto` field of keys, byte 9 of an IPv4 header).
pub const IPPROTO_TCP: u8 = 6;

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
}
