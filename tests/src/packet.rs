//! Building and checking Ethernet/IPv4/TCP frames for BPF_PROG_TEST_RUN. Checksums are computed
//! from scratch here (RFC 1071), never incrementally, so the datapath's incremental updates are
//! checked against an independent implementation.

use std::net::{Ipv4Addr, SocketAddrV4};

use gateway_common::net::IPPROTO_TCP;

/// An Ethernet header's length.
pub const ETH_LEN: usize = 14;
/// An IPv4 header's length without options (the least it can be).
pub const IPV4_LEN: usize = 20;
/// A TCP header's length without options (the least it can be).
pub const TCP_LEN: usize = 20;
/// The IPv4 ethertype.
pub const ETH_P_IPV4: u16 = 0x0800;

/// TCP flags (the datapath's own).
pub use gateway_common::net::tcp_flags as flags;

/// A frame to build.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    /// IP protocol ([`IPPROTO_TCP`] or another).
    pub proto: u8,
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub ttl: u8,
    /// IPv4 options (a multiple of 4 bytes).
    pub ip_options: Vec<u8>,
    /// The IPv4 flags and fragment offset field (host order).
    pub frag: u16,
    /// The IPv4 identification.
    pub ip_id: u16,
    /// The TCP window field.
    pub window: u16,
    /// TCP options (a multiple of 4 bytes; see [`wscale_option`]).
    pub tcp_options: Vec<u8>,
    pub payload: Vec<u8>,
    /// Leave the TCP checksum as a sender with tx checksum offload hands it to a veth (the
    /// pseudo-header's sum only: [`partial_checksum`]) rather than whole.
    pub partial_checksum: bool,
}

impl Frame {
    /// A TCP segment from `src` to `dst` with `tcp_flags`.
    pub fn tcp(src: SocketAddrV4, dst: SocketAddrV4, tcp_flags: u8) -> Self {
        Frame {
            src_mac: [0x02, 0, 0, 0, 0, 0x02],
            dst_mac: [0x02, 0, 0, 0, 0, 0x01],
            src,
            dst,
            proto: IPPROTO_TCP,
            tcp_flags,
            seq: 0x1000_0000,
            ack: if tcp_flags & flags::ACK != 0 {
                0x2000_0000
            } else {
                0
            },
            ttl: 64,
            ip_options: Vec::new(),
            frag: 0x4000, // DF
            ip_id: 0x1234,
            window: 64240,
            tcp_options: Vec::new(),
            payload: Vec::new(),
            partial_checksum: false,
        }
    }

    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    /// The same frame with a partial TCP checksum (see [`Frame::partial_checksum`]).
    pub fn partial(mut self) -> Self {
        self.partial_checksum = true;
        self
    }

    pub fn macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Self {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    /// The frame's bytes, with correct IPv4 and TCP checksums (the TCP one partial if asked).
    pub fn build(&self) -> Vec<u8> {
        assert!(self.ip_options.len().is_multiple_of(4) && self.ip_options.len() <= 40);
        let ihl = (IPV4_LEN + self.ip_options.len()) / 4;
        let l4: Vec<u8> = if self.proto == IPPROTO_TCP {
            assert!(self.tcp_options.len().is_multiple_of(4) && self.tcp_options.len() <= 40);
            let tcp_len = TCP_LEN + self.tcp_options.len();
            let mut tcp = vec![0u8; TCP_LEN];
            tcp[0..2].copy_from_slice(&self.src.port().to_be_bytes());
            tcp[2..4].copy_from_slice(&self.dst.port().to_be_bytes());
            tcp[4..8].copy_from_slice(&self.seq.to_be_bytes());
            tcp[8..12].copy_from_slice(&self.ack.to_be_bytes());
            tcp[12] = ((tcp_len / 4) as u8) << 4;
            tcp[13] = self.tcp_flags;
            tcp[14..16].copy_from_slice(&self.window.to_be_bytes());
            tcp.extend_from_slice(&self.tcp_options);
            tcp.extend_from_slice(&self.payload);
            let sum = if self.partial_checksum {
                partial_checksum(*self.src.ip(), *self.dst.ip(), tcp.len())
            } else {
                l4_checksum(*self.src.ip(), *self.dst.ip(), IPPROTO_TCP, &tcp)
            };
            tcp[16..18].copy_from_slice(&sum.to_be_bytes());
            tcp
        } else {
            self.payload.clone()
        };
        let total = ihl * 4 + l4.len();
        let mut out = Vec::with_capacity(ETH_LEN + total);
        out.extend_from_slice(&self.dst_mac);
        out.extend_from_slice(&self.src_mac);
        out.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
        let ip_start = out.len();
        out.push(0x40 | ihl as u8);
        out.push(0);
        out.extend_from_slice(&(total as u16).to_be_bytes());
        out.extend_from_slice(&self.ip_id.to_be_bytes());
        out.extend_from_slice(&self.frag.to_be_bytes());
        out.push(self.ttl);
        out.push(self.proto);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.src.ip().octets());
        out.extend_from_slice(&self.dst.ip().octets());
        out.extend_from_slice(&self.ip_options);
        let sum = checksum(&out[ip_start..]);
        out[ip_start + 10..ip_start + 12].copy_from_slice(&sum.to_be_bytes());
        out.extend_from_slice(&l4);
        out
    }
}

/// TCP options offering window scale `shift` as Linux sends them with a SYN: MSS 1460,
/// SACK permitted, a timestamp, a NOP, then the window scale (RFC 7323 §2.2).
pub fn wscale_option(shift: u8) -> Vec<u8> {
    vec![
        2, 4, 0x05, 0xb4, // MSS 1460
        4, 2, // SACK permitted
        8, 10, 0, 0, 0, 1, 0, 0, 0, 0, // timestamp
        1, // NOP
        3, 3, shift, // window scale
    ]
}

/// The TCP options of a frame's segment (IPv4 options allowed).
pub fn tcp_options(frame: &[u8]) -> Vec<u8> {
    let ip = &frame[ETH_LEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let tcp = &ip[ihl..];
    let doff = usize::from(tcp[12] >> 4) * 4;
    tcp[TCP_LEN..doff].to_vec()
}

/// The value of the first MSS option in a frame's TCP options, options read up to an End of
/// Option List; `None` without one.
pub fn mss_of(frame: &[u8]) -> Option<u16> {
    let options = tcp_options(frame);
    let mut at = 0;
    while at < options.len() {
        match options[at] {
            0 => return None,
            1 => at += 1,
            2 => return Some(u16::from_be_bytes([options[at + 2], options[at + 3]])),
            _ => at += usize::from(options[at + 1].max(2)),
        }
    }
    None
}

/// The MSS option announcing `mss` (kind 2, length 4; RFC 9293 §3.7.1).
pub fn mss_option(mss: u16) -> Vec<u8> {
    let [hi, lo] = mss.to_be_bytes();
    vec![2, 4, hi, lo]
}

/// Computes again the checksum of the IPv4 header at the start of `ip` (its `ihl` bytes), as
/// after changing a field of it.
pub fn set_ipv4_checksum(ip: &mut [u8]) {
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    ip[10..12].copy_from_slice(&[0, 0]);
    let sum = checksum(&ip[..ihl]);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// The frame a host without a socket answers `segment` with (RFC 9293 §3.10.7.1, for a
/// segment with ACK): an RST from its destination to its source with `seq` = its `ack`, as the
/// gateway builds it (MACs swapped, TTL 64, DF, id 0, no options, window 0, no payload).
/// Built here from scratch, apart from the datapath's code.
pub fn rst_answer(segment: &Frame) -> Vec<u8> {
    Frame {
        src_mac: segment.dst_mac,
        dst_mac: segment.src_mac,
        src: segment.dst,
        dst: segment.src,
        proto: IPPROTO_TCP,
        tcp_flags: flags::RST,
        seq: segment.ack,
        ack: 0,
        ttl: 64,
        ip_options: Vec::new(),
        frag: 0x4000,
        ip_id: 0,
        window: 0,
        tcp_options: Vec::new(),
        payload: Vec::new(),
        partial_checksum: false,
    }
    .build()
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum16(data, 0))
}

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The TCP/UDP checksum of `segment` (its checksum field zeroed or not: pass it zeroed to
/// compute, or as is to verify: a correct segment gives 0).
pub fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, segment: &[u8]) -> u16 {
    let mut acc = sum16(&src.octets(), 0);
    acc = sum16(&dst.octets(), acc);
    acc += u32::from(proto);
    acc += segment.len() as u32;
    !fold(sum16(segment, acc))
}

/// What a sender with tx checksum offload leaves in the TCP checksum field of a segment of
/// `tcp_len` bytes from `src` to `dst` for the NIC to finish (CHECKSUM_PARTIAL, as Linux's
/// `tcp_v4_send_check` writes it): the pseudo-header's sum, folded, not complemented.
pub fn partial_checksum(src: Ipv4Addr, dst: Ipv4Addr, tcp_len: usize) -> u16 {
    let mut acc = sum16(&src.octets(), 0);
    acc = sum16(&dst.octets(), acc);
    acc += u32::from(IPPROTO_TCP);
    acc += tcp_len as u32;
    fold(acc)
}

/// Where the frame `got` first differs from `want`, for messages: the first differing byte
/// and both lengths, or the lengths alone when one is a prefix of the other.
pub fn first_difference(got: &[u8], want: &[u8]) -> String {
    match got.iter().zip(want).position(|(a, b)| a != b) {
        Some(i) => format!(
            "byte {i} is {:#04x}, expected {:#04x} ({} bytes, expected {})",
            got[i],
            want[i],
            got.len(),
            want.len()
        ),
        None => format!("{} bytes, expected {}", got.len(), want.len()),
    }
}

/// A parsed Ethernet/IPv4/TCP frame, for checking the datapath's output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub tcp_flags: u8,
    pub ttl: u8,
    pub payload: Vec<u8>,
}

/// Parses a frame and verifies its IPv4 header checksum and TCP checksum from scratch.
/// Panics with a clear message if the frame is not a well-formed IPv4/TCP frame.
#[track_caller]
pub fn parse_checked(frame: &[u8]) -> Parsed {
    parse_frame(frame, true)
}

/// [`parse_checked`] without the checksums (a frame sent with a partial one, say).
#[track_caller]
pub fn parse_unchecked(frame: &[u8]) -> Parsed {
    parse_frame(frame, false)
}

#[track_caller]
fn parse_frame(frame: &[u8], verify: bool) -> Parsed {
    assert!(
        frame.len() >= ETH_LEN + IPV4_LEN + TCP_LEN,
        "frame too short: {} bytes",
        frame.len()
    );
    assert_eq!(&frame[12..14], &ETH_P_IPV4.to_be_bytes(), "not IPv4");
    let ip = &frame[ETH_LEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    assert_eq!(
        total,
        ip.len(),
        "IPv4 total length does not match the frame"
    );
    assert!(
        !verify || checksum(&ip[..ihl]) == 0,
        "bad IPv4 header checksum"
    );
    assert_eq!(ip[9], IPPROTO_TCP, "not TCP");
    let src_ip = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst_ip = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let tcp = &ip[ihl..total];
    assert!(
        !verify || l4_checksum(src_ip, dst_ip, IPPROTO_TCP, tcp) == 0,
        "bad TCP checksum"
    );
    let doff = usize::from(tcp[12] >> 4) * 4;
    Parsed {
        dst_mac: frame[0..6].try_into().unwrap(),
        src_mac: frame[6..12].try_into().unwrap(),
        src: SocketAddrV4::new(src_ip, u16::from_be_bytes([tcp[0], tcp[1]])),
        dst: SocketAddrV4::new(dst_ip, u16::from_be_bytes([tcp[2], tcp[3]])),
        tcp_flags: tcp[13],
        ttl: ip[8],
        payload: tcp[doff..].to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_verify_and_parse_back() {
        let src = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 2), 40000);
        let dst = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 10), 20000);
        let mut f = Frame::tcp(src, dst, flags::SYN).payload(b"hello");
        f.ip_options = vec![1, 1, 1, 0]; // NOP NOP NOP EOL
        let bytes = f.build();
        let p = parse_checked(&bytes);
        assert_eq!((p.src, p.dst, p.tcp_flags), (src, dst, flags::SYN));
        assert_eq!(p.payload, b"hello");
    }

    #[test]
    fn a_flipped_bit_fails_the_check() {
        let src = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 2), 40000);
        let dst = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 10), 20000);
        let mut bytes = Frame::tcp(src, dst, flags::ACK).payload(b"x").build();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(std::panic::catch_unwind(|| parse_checked(&bytes)).is_err());
    }

    #[test]
    fn a_partial_checksum_completed_over_the_segment_is_the_whole_one() {
        // The NIC's part: the complement of the segment's sum, its field holding the
        // pseudo-header's.
        let src = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 2), 40000);
        let dst = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 10), 20000);
        let frame = Frame::tcp(src, dst, flags::ACK).payload(b"odd!!");
        let whole = frame.build();
        let partial = frame.partial().build();
        assert_ne!(partial, whole);
        let tcp = &partial[ETH_LEN + IPV4_LEN..];
        assert_eq!(
            (!fold(sum16(tcp, 0))).to_be_bytes(),
            whole[ETH_LEN + IPV4_LEN + 16..ETH_LEN + IPV4_LEN + 18]
        );
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3's example bytes sum to 0xddf2; the checksum is its complement.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&data), !0xddf2);
    }
}
