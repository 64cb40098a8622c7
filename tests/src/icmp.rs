//! ICMP error frames (RFC 792) for the datapath's ICMP translation, built and checked from
//! scratch: every checksum computed over the bytes (`packet::checksum`), never incrementally.

use std::net::{Ipv4Addr, SocketAddrV4};

pub use gateway_common::net::{IPPROTO_ICMP, icmp};

use crate::{
    packet::{ETH_LEN, Frame, checksum, set_ipv4_checksum},
    scenario::{Conn, Ctx, Input, Link, Out},
};

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
    q[8] = seen[8];
    set_ipv4_checksum(&mut q);
    q
}

/// A router on the client's side of the gateway, and one on the backends' side.
pub const CLIENT_ROUTER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 77);
pub const BACKEND_ROUTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 250);
/// What a frag-needed announces: a tunnel's MTU.
pub const MTU: u16 = 1280;
/// The quote RFC 792 asks for: the IPv4 header and 8 bytes of TCP (ports, sequence number).
pub const RFC792: usize = 8;
/// The quote RFC 1812 §4.3.2.3 asks for, and Linux sends: as much as fits in a 576-byte error
/// (bytes of TCP after a 20-byte quoted IPv4 header).
pub const RFC1812: usize = 576 - 20 - icmp::HEADER_LEN - 20;
/// A quote of everything there is (of a segment short enough for the whole of it to fit).
pub const WHOLE: usize = RFC1812;

/// Which end of `c` an error comes from, or goes to.
#[derive(Clone, Copy)]
pub enum Side {
    Client,
    Backend,
}

impl Side {
    /// The link of this side's end of `c` (the backend's from its flow).
    pub fn link(self, cx: &Ctx, c: Conn) -> Link {
        match self {
            Side::Client => c.link,
            Side::Backend => Link::Backend(c.rewrite(cx).backend_index),
        }
    }
}

/// An ICMP error `kind`/`code` (`rest`: bytes 4..8) from `from`, on the `side` of `c`, about
/// the packet the last row made (its output): quoting it cut at `tcp_bytes` bytes of TCP, sent
/// where the quote came from (its source), as a router sends it.
pub fn error_about_last(
    c: Conn,
    side: Side,
    from: Ipv4Addr,
    (kind, code, rest): (u8, u8, [u8; 4]),
    tcp_bytes: usize,
) -> Input {
    Input::with(move |cx| {
        let q = quote(&cx.output, tcp_bytes);
        let to = Ipv4Addr::new(q[12], q[13], q[14], q[15]);
        let link = side.link(cx, c);
        frame(link.in_macs(), from, to, message(kind, code, rest, &q))
    })
}

/// That error translated: to the end of `c` on `to` (the one that sent the last row's input),
/// from the gateway's address `via`, quoting the last row's input as that end sent it, the TTL
/// one less.
pub fn translated(
    c: Conn,
    to: Side,
    via: Ipv4Addr,
    (kind, code, rest): (u8, u8, [u8; 4]),
    tcp_bytes: usize,
) -> Out {
    Out::with(move |cx| {
        let seen = quote(&cx.output, tcp_bytes);
        let q = quote_as_sent(&cx.input, &seen);
        let sender = Ipv4Addr::new(q[12], q[13], q[14], q[15]);
        let link = to.link(cx, c);
        let mut f = frame(link.out_macs(), via, sender, message(kind, code, rest, &q));
        f.ttl -= 1;
        Out::Bytes(f.build())
    })
}

/// A "fragmentation needed" announcing [`MTU`].
pub fn frag_needed() -> (u8, u8, [u8; 4]) {
    (icmp::DEST_UNREACH, icmp::FRAG_NEEDED, mtu(MTU))
}
