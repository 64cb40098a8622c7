//! ICMP error frames (RFC 792) for the datapath's ICMP translation, built and checked from
//! scratch: every checksum computed over the bytes (`packet::checksum`), never incrementally.

use std::net::{Ipv4Addr, SocketAddrV4};

pub use gateway_common::net::{IPPROTO_ICMP, icmp};

use crate::packet::{ETH_LEN, Frame, checksum};

/// The ICMP message `kind`/`code` with `rest` (bytes 4..8: unused, or a frag-needed's next-hop
/// MTU in bytes 6..8) quoting `quoted` (an IPv4 packet's first bytes), its checksum computed.
pub fn message(kind: u8, code: u8, rest: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(quoted);
    let sum = checksum(&m);
    m[2..4].copy_from_slice(&sum.to_be_bytes());
    m
}

/// The `rest` of a "fragmentation needed" error announcing the next hop's `mtu` (RFC 1191).
pub fn mtu(mtu: u16) -> [u8; 4] {
    let [hi, lo] = mtu.to_be_bytes();
    [0, 0, hi, lo]
}

/// A frame carrying the ICMP `message` from `src` to `dst` with `macs` (source, destination),
/// TTL 64, no DF (as Linux sends its errors).
pub fn frame(macs: ([u8; 6], [u8; 6]), src: Ipv4Addr, dst: Ipv4Addr, message: Vec<u8>) -> Frame {
    let mut f = Frame::tcp(SocketAddrV4::new(src, 0), SocketAddrV4::new(dst, 0), 0);
    f.src_mac = macs.0;
    f.dst_mac = macs.1;
    f.proto = IPPROTO_ICMP;
    f.payload = message;
    f.frag = 0;
    f.ip_id = 0x4321;
    f
}

/// What a router quotes of the IPv4 packet in `frame`: its header and the first `tcp_bytes`
/// bytes after it (all of them if there are fewer).
pub fn quote(frame: &[u8], tcp_bytes: usize) -> Vec<u8> {
    let ip = &frame[ETH_LEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    ip[..(ihl + tcp_bytes).min(ip.len())].to_vec()
}

/// The quote of `frame` as its sender sent it, where the quote `seen` was taken of the packet
/// the gateway made of it: `frame`'s own bytes, cut as `seen` is, with the TTL the quote has
/// (the gateway's and routers' hops are not undone) and the IPv4 header checksum computed for
/// it.
pub fn quote_as_sent(frame: &[u8], seen: &[u8]) -> Vec<u8> {
    let mut q = frame[ETH_LEN..ETH_LEN + seen.len()].to_vec();
    let ihl = usize::from(q[0] & 0x0f) * 4;
    q[8] = seen[8];
    q[10..12].copy_from_slice(&[0, 0]);
    let sum = checksum(&q[..ihl]);
    q[10..12].copy_from_slice(&sum.to_be_bytes());
    q
}
