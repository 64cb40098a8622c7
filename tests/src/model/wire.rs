//! The model's view of the wire: the datapath's parse (what is ours, what is cut short or
//! malformed), checksums from scratch, the frames the datapath must send (a translation, or the
//! RST of spec §7), and a segment builder with every field the fuzzer varies. Nothing here
//! updates a checksum incrementally: a translated frame's checksums are computed from scratch,
//! carrying the input's error (a segment of an existing flow is not verified, so a wrong
//! checksum in must stay exactly as wrong out, as RFC 1624's update keeps it). Checksums and
//! the RST answer are [`crate::packet`]'s.

use std::net::{Ipv4Addr, SocketAddrV4};

use gateway_common::{
    DropReason,
    maps::{FlowKey4, TCP_MAX_WSCALE},
    net::{IPPROTO_ICMP, IPPROTO_TCP, icmp, ip_from_net},
};

use crate::packet::{self, Frame, checksum, l4_checksum};
pub use crate::packet::{ETH_LEN, ETH_P_IPV4, IPV4_LEN as IPV4_MIN_LEN, TCP_LEN as TCP_MIN_LEN};

/// A TCP/IPv4 segment to one of the gateway's addresses, as the datapath parses it.
#[derive(Clone, Copy, Debug)]
pub struct Seg {
    /// IPv4 header length (bytes).
    pub ihl: usize,
    /// TCP header length (bytes).
    pub doff: usize,
    /// IPv4 total length (host order): the L3 bytes counted.
    pub l3_len: u16,
    pub ttl: u8,
    /// The 5-tuple as it arrived (network order).
    pub key: FlowKey4,
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    /// The window field, unscaled.
    pub window: u16,
    /// Payload bytes (`l3_len - ihl - doff`).
    pub payload: u32,
    /// `ADDR_PUBLIC` / `ADDR_SNAT` bits of the destination.
    pub addr_kind: u32,
}

impl Seg {
    /// Offset of the TCP header in the frame.
    pub fn l4_off(&self) -> usize {
        ETH_LEN + self.ihl
    }
}

/// What the parse found.
#[derive(Clone, Copy, Debug)]
pub enum Parse {
    /// Not for the gateway: handed to the kernel unchanged.
    NotOurs,
    Drop(DropReason),
    Tcp(Seg),
    /// An ICMP error (destination unreachable, time exceeded, parameter problem) to a gateway
    /// address: the datapath looks for the flow its quote names (`gateway-ebpf/src/icmp.rs`).
    IcmpError,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses `frame` as gateway-ebpf's `parse` does (docs/datapath.md's table): `addr_kind` says
/// what an IPv4 destination (network order) is to the gateway (0: not its own).
pub fn parse(frame: &[u8], addr_kind: impl Fn(u32) -> u32) -> Parse {
    let len = frame.len();
    if len < ETH_LEN || be16(frame, 12) != ETH_P_IPV4 {
        return Parse::NotOurs;
    }
    if len < ETH_LEN + IPV4_MIN_LEN {
        return Parse::Drop(DropReason::Truncated);
    }
    let ip = &frame[ETH_LEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < IPV4_MIN_LEN {
        return Parse::Drop(DropReason::BadHeader);
    }
    let dst_ip = u32::from_ne_bytes(ip[16..20].try_into().unwrap());
    let kind = addr_kind(dst_ip);
    if kind == 0 {
        return Parse::NotOurs;
    }
    if ETH_LEN + ihl > len {
        return Parse::Drop(DropReason::Truncated);
    }
    if be16(ip, 6) & 0x3fff != 0 {
        return Parse::Drop(DropReason::Fragment);
    }
    if ip[9] == IPPROTO_ICMP {
        let l3_len = usize::from(be16(ip, 2));
        let error = ETH_LEN + ihl + 2 <= len
            && icmp::is_error(ip[ihl])
            && l3_len >= ihl + icmp::HEADER_LEN
            && l3_len <= len - ETH_LEN;
        return if error {
            Parse::IcmpError
        } else {
            Parse::NotOurs
        };
    }
    if ip[9] != IPPROTO_TCP {
        return Parse::NotOurs;
    }
    if ETH_LEN + ihl + TCP_MIN_LEN > len {
        return Parse::Drop(DropReason::Truncated);
    }
    let tcp = &ip[ihl..];
    let doff = usize::from(tcp[12] >> 4) * 4;
    let l3_len = be16(ip, 2);
    if doff < TCP_MIN_LEN || usize::from(l3_len) < ihl + doff || usize::from(l3_len) > len - ETH_LEN
    {
        return Parse::Drop(DropReason::BadHeader);
    }
    let src_ip = u32::from_ne_bytes(ip[12..16].try_into().unwrap());
    let src_port = u16::from_ne_bytes([tcp[0], tcp[1]]);
    let dst_port = u16::from_ne_bytes([tcp[2], tcp[3]]);
    Parse::Tcp(Seg {
        ihl,
        doff,
        l3_len,
        ttl: ip[8],
        key: FlowKey4::new(src_ip, dst_ip, src_port, dst_port),
        flags: tcp[13],
        seq: be32(tcp, 4),
        ack: be32(tcp, 8),
        window: be16(tcp, 14),
        payload: (usize::from(l3_len) - ihl - doff) as u32,
        addr_kind: kind,
    })
}

/// The window scale shift a SYN or SYN-ACK offers (spec §5), as the endpoints' TCP reads it
/// (Linux's `tcp_parse_options`; see [`option`]): kind 3 with length 3, the shift capped at 14.
pub fn wscale_option(frame: &[u8], seg: &Seg) -> Option<u8> {
    option(frame, seg, 3, 3).map(|o| o[2].min(TCP_MAX_WSCALE))
}

/// The MSS a SYN announces (RFC 9293 §3.7.1): kind 2 with length 4 (see [`option`]).
pub fn mss_option(frame: &[u8], seg: &Seg) -> Option<u16> {
    option(frame, seg, 2, 4).map(|o| u16::from_be_bytes([o[2], o[3]]))
}

/// The first TCP option of `kind` with length `len` (its bytes), options walked as the
/// endpoints' TCP walks them (Linux's `tcp_parse_options`): from the end of the fixed header
/// to `doff`, kinds 0 (end) and 1 (NOP) alone, others by their length byte. The first one
/// counts (Linux takes the last: a deliberate difference, docs/datapath.md). A malformed option
/// (a length below 2, or past the header) ends the walk; what was read before it stands.
fn option<'a>(frame: &'a [u8], seg: &Seg, kind: u8, len: usize) -> Option<&'a [u8]> {
    let start = seg.l4_off() + TCP_MIN_LEN;
    let end = seg.l4_off() + seg.doff;
    let opts = &frame[start..end];
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            0 => break,
            1 => i += 1,
            k => {
                let n = usize::from(*opts.get(i + 1)?);
                if n < 2 || i + n > opts.len() {
                    break;
                }
                if k == kind && n == len {
                    return Some(&opts[i..i + n]);
                }
                i += n;
            }
        }
    }
    None
}

/// The IPv4 header's sum with its checksum field: 0xffff when the checksum is right.
pub fn ip_residual(frame: &[u8], ihl: usize) -> u16 {
    !checksum(&frame[ETH_LEN..ETH_LEN + ihl])
}

/// The TCP segment's sum (pseudo-header, header with its checksum field, payload up to the
/// IPv4 total length): 0xffff when the checksum is right.
pub fn tcp_residual(frame: &[u8], seg: &Seg) -> u16 {
    let ip = &frame[ETH_LEN..];
    let tcp = &ip[seg.ihl..usize::from(seg.l3_len)];
    !l4_checksum(addr(&ip[12..16]), addr(&ip[16..20]), IPPROTO_TCP, tcp)
}

/// The longest TCP segment (header and payload) whose checksum the datapath computes
/// (gateway-ebpf's `csum::SEGMENT_MAX`, docs/datapath.md).
pub const SEGMENT_MAX: usize = 1535;

/// Whether the TCP checksum field of `seg` holds what a sender with tx checksum offload leaves
/// there ([`packet::partial_checksum`] of its own pseudo-header): CHECKSUM_PARTIAL.
pub fn partial_checksum(frame: &[u8], seg: &Seg) -> bool {
    let ip = &frame[ETH_LEN..];
    let at = seg.l4_off() + 16;
    be16(frame, at)
        == packet::partial_checksum(
            addr(&ip[12..16]),
            addr(&ip[16..20]),
            usize::from(seg.l3_len) - seg.ihl,
        )
}

/// Writes the whole TCP checksum of `seg` into `frame` (computed from scratch over its
/// pseudo-header and segment).
pub fn complete_checksum(frame: &mut [u8], seg: &Seg) {
    let at = seg.l4_off() + 16;
    frame[at..at + 2].copy_from_slice(&[0, 0]);
    let ip = &frame[ETH_LEN..];
    let tcp = &ip[seg.ihl..usize::from(seg.l3_len)];
    let sum = l4_checksum(addr(&ip[12..16]), addr(&ip[16..20]), IPPROTO_TCP, tcp);
    frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
}

/// The IPv4 address in these 4 bytes.
fn addr(b: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

/// The checksum field that gives bytes whose right checksum is `correct` the residual
/// `residual` (0xffff: right). RFC 1624's update keeps a segment's residual and never writes
/// 0xffff, so this is the one value both attach modes' updates can give.
fn field_for(correct: u16, residual: u16) -> u16 {
    ((u32::from(residual) % 0xffff + u32::from(correct)) % 0xffff) as u16
}

/// Where a translated packet goes: its new addresses and ports (network order, as the
/// conntrack entry holds them) and the next hop's MACs.
#[derive(Clone, Copy, Debug)]
pub struct Translation {
    pub src_ip: u32,
    pub dst_ip: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// Decrement the TTL (spec-14 §3).
    pub ttl_dec: bool,
}

/// `frame` (the parsed `seg`) translated: MACs, addresses, ports, TTL, and both checksums
/// computed from scratch with the input's residuals carried. Every other byte as it came.
pub fn translate(frame: &[u8], seg: &Seg, t: &Translation) -> Vec<u8> {
    let ip_res = ip_residual(frame, seg.ihl);
    let tcp_res = tcp_residual(frame, seg);
    let mut out = frame.to_vec();
    out[0..6].copy_from_slice(&t.dmac);
    out[6..12].copy_from_slice(&t.smac);
    let ip = ETH_LEN;
    out[ip + 12..ip + 16].copy_from_slice(&t.src_ip.to_ne_bytes());
    out[ip + 16..ip + 20].copy_from_slice(&t.dst_ip.to_ne_bytes());
    if t.ttl_dec {
        out[ip + 8] = out[ip + 8].wrapping_sub(1);
    }
    out[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
    let correct = checksum(&out[ip..ip + seg.ihl]);
    out[ip + 10..ip + 12].copy_from_slice(&field_for(correct, ip_res).to_be_bytes());
    let l4 = seg.l4_off();
    out[l4..l4 + 2].copy_from_slice(&t.src_port.to_ne_bytes());
    out[l4 + 2..l4 + 4].copy_from_slice(&t.dst_port.to_ne_bytes());
    out[l4 + 16..l4 + 18].copy_from_slice(&[0, 0]);
    let end = ETH_LEN + usize::from(seg.l3_len);
    let correct = l4_checksum(
        ip_from_net(t.src_ip),
        ip_from_net(t.dst_ip),
        IPPROTO_TCP,
        &out[l4..end],
    );
    out[l4 + 16..l4 + 18].copy_from_slice(&field_for(correct, tcp_res).to_be_bytes());
    out
}

/// The egress links' MTU (the harness's veths): a segment the TOA option would make larger is
/// not grown (`bpf_check_mtu`).
pub const LINK_MTU: usize = 1500;
/// The most bytes a TC packet may have for the datapath to grow it (`tc::MOVE_MAX`).
pub const TC_GROW_MAX: usize = 16_384;

/// What [`toa`] did.
#[derive(Clone, Copy, Debug, Default)]
pub struct ToaDone {
    /// The client's own TOA options met (removed, or the first replaced by `ours`).
    pub found: u64,
    /// The gateway's option went in (in place of the client's first, or appended).
    pub added: bool,
    /// It should have, but there was no room (or the segment would be too large).
    pub skipped: bool,
}

/// Issue 17's treatment of a translated client segment `out` (parsed as `seg`: the same
/// offsets) before its backend made its end (`toa::apply`), in place: options walked as
/// [`option`] walks them; each TOA option (kind 254, length 8) becomes 8 NOPs, or the first
/// becomes `ours`; an End of Option List or a malformed option, and every byte after it in the
/// header, become NOPs; then, if `ours` took no client option's place and `can_grow`, it is
/// appended after the options (the header 8 bytes longer, the IPv4 total length too, what
/// followed the header moved on). Both checksums carry the residuals they had.
pub fn toa(out: &mut Vec<u8>, seg: &Seg, ours: Option<[u8; 8]>, can_grow: bool) -> ToaDone {
    let residual = tcp_residual(out, seg);
    let ip_residual = ip_residual(out, seg.ihl);
    let start = seg.l4_off() + TCP_MIN_LEN;
    let end = seg.l4_off() + seg.doff;
    let mut done = ToaDone::default();
    let mut placed = false;
    let mut i = start;
    while i < end {
        match out[i] {
            1 => i += 1,
            kind => {
                let len = if kind == 0 || i + 1 >= end {
                    0
                } else {
                    usize::from(out[i + 1])
                };
                if len < 2 || i + len > end {
                    out[i..end].fill(1);
                    break;
                }
                if kind == 254 && len == 8 {
                    done.found += 1;
                    match ours {
                        Some(o) if !placed => {
                            out[i..i + 8].copy_from_slice(&o);
                            placed = true;
                        }
                        _ => out[i..i + 8].fill(1),
                    }
                }
                i += len;
            }
        }
    }
    let mut grown = *seg;
    match ours {
        Some(o) if !placed && can_grow && seg.doff + 8 <= 60 => {
            out.splice(end..end, o);
            out[seg.l4_off() + 12] += 0x20;
            let ip = ETH_LEN;
            let total = be16(out, ip + 2) + 8;
            out[ip + 2..ip + 4].copy_from_slice(&total.to_be_bytes());
            out[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
            let correct = checksum(&out[ip..ip + seg.ihl]);
            out[ip + 10..ip + 12].copy_from_slice(&field_for(correct, ip_residual).to_be_bytes());
            grown.doff += 8;
            grown.l3_len += 8;
            done.added = true;
        }
        Some(_) if !placed => done.skipped = true,
        Some(_) => done.added = true,
        None => {}
    }
    let l4 = seg.l4_off();
    out[l4 + 16..l4 + 18].copy_from_slice(&[0, 0]);
    let correct = !tcp_residual(out, &grown);
    out[l4 + 16..l4 + 18].copy_from_slice(&field_for(correct, residual).to_be_bytes());
    done
}

/// Lowers the first MSS option of `out` (parsed as `seg`) by `by` (saturating), as the MSS
/// clamp rewrites it (`mss::clamp`), the TCP checksum carrying its residual; whether it changed.
pub fn lower_mss(out: &mut [u8], seg: &Seg, by: u16) -> bool {
    let Some(mss) = mss_option(out, seg) else {
        return false;
    };
    let new = mss.saturating_sub(by);
    if mss <= new {
        return false;
    }
    let residual = tcp_residual(out, seg);
    let start = seg.l4_off() + TCP_MIN_LEN;
    let end = seg.l4_off() + seg.doff;
    let mut i = start;
    while i < end {
        match out[i] {
            0 => break,
            1 => i += 1,
            k => {
                let n = usize::from(out[i + 1]);
                if k == 2 && n == 4 {
                    out[i + 2..i + 4].copy_from_slice(&new.to_be_bytes());
                    break;
                }
                i += n;
            }
        }
    }
    let l4 = seg.l4_off();
    out[l4 + 16..l4 + 18].copy_from_slice(&[0, 0]);
    let correct = !tcp_residual(out, seg);
    out[l4 + 16..l4 + 18].copy_from_slice(&field_for(correct, residual).to_be_bytes());
    true
}

/// Spec §7's answer to a segment with ACK and without a flow: [`packet::rst_answer`] (a
/// 54-byte RST back to its sender, `seq` = the segment's ACK) to the parsed `seg` of `frame`.
pub fn rst_answer(frame: &[u8], seg: &Seg) -> Vec<u8> {
    packet::rst_answer(&Frame {
        src_mac: frame[6..12].try_into().unwrap(),
        dst_mac: frame[0..6].try_into().unwrap(),
        seq: seg.seq,
        ack: seg.ack,
        ..Frame::tcp(seg.key.src(), seg.key.dst(), seg.flags)
    })
}

/// A segment the gateway writes itself over the frame of `seg` (the SYN proxy's: its SYN-ACK
/// with a cookie, its ACK to a backend, the SYN a cookie's ACK becomes): Ethernet, IPv4
/// without options (TTL 64, DF, identification 0), TCP with at most an MSS option, no payload,
/// right checksums. Addresses, ports and MACs are the frame's, swapped if `back` (it goes back
/// to the sender).
#[derive(Clone, Copy, Debug)]
pub struct Own {
    pub back: bool,
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub window: u16,
    pub mss: Option<u16>,
    /// A TOA option (issue 17: the SYN proxy's ACK to the backend of an app with the client's
    /// address), with no MSS option.
    pub toa: Option<[u8; 8]>,
}

impl Own {
    /// The frame's bytes, written over `frame`.
    pub fn build(&self, frame: &[u8], seg: &Seg) -> Vec<u8> {
        let (mut src_mac, mut dst_mac): ([u8; 6], [u8; 6]) = (
            frame[6..12].try_into().unwrap(),
            frame[0..6].try_into().unwrap(),
        );
        let (mut src, mut dst) = (seg.key.src(), seg.key.dst());
        if self.back {
            (src_mac, dst_mac) = (dst_mac, src_mac);
            (src, dst) = (dst, src);
        }
        Frame {
            src_mac,
            dst_mac,
            seq: self.seq,
            ack: self.ack,
            ttl: 64,
            frag: 0x4000,
            ip_id: 0,
            window: self.window,
            tcp_options: match (self.mss, self.toa) {
                (Some(m), _) => {
                    let [hi, lo] = m.to_be_bytes();
                    vec![2, 4, hi, lo]
                }
                (None, Some(toa)) => toa.to_vec(),
                (None, None) => Vec::new(),
            },
            ..Frame::tcp(src, dst, self.flags)
        }
        .build()
    }
}

/// Writes a proxied flow's translated numbers into the translated frame `out`: `seq` and/or
/// `ack` (host order), its TCP checksum computed from scratch with the residual it had (the
/// datapath adds their difference to its incremental update, so an error in stays as wrong).
pub fn renumber(out: &mut [u8], seq: Option<u32>, ack: Option<u32>) {
    let Parse::Tcp(seg) = parse(out, |_| 1) else {
        return;
    };
    let residual = tcp_residual(out, &seg);
    let l4 = seg.l4_off();
    if let Some(seq) = seq {
        out[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
    }
    if let Some(ack) = ack {
        out[l4 + 8..l4 + 12].copy_from_slice(&ack.to_be_bytes());
    }
    out[l4 + 16..l4 + 18].copy_from_slice(&[0, 0]);
    let ip = &out[ETH_LEN..];
    let correct = l4_checksum(
        addr(&ip[12..16]),
        addr(&ip[16..20]),
        IPPROTO_TCP,
        &ip[seg.ihl..usize::from(seg.l3_len)],
    );
    out[l4 + 16..l4 + 18].copy_from_slice(&field_for(correct, residual).to_be_bytes());
}

/// The flow key's ends, for messages.
pub fn show_key(k: &FlowKey4) -> String {
    format!("{} → {}", k.src(), k.dst())
}

/// A TCP/IPv4 segment with every field the fuzzer varies, and the ways to spoil it. Checksums
/// are computed from scratch (RFC 1071), then spoiled if asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub window: u16,
    /// TCP options (padded with EOL bytes to a multiple of 4).
    pub tcp_options: Vec<u8>,
    pub payload_len: u16,
    pub ttl: u8,
    /// IPv4 options (padded to a multiple of 4).
    pub ip_options: Vec<u8>,
    /// Flags and fragment offset (host order); 0x4000 is DF.
    pub frag: u16,
    /// IP protocol (6 unless spoiled).
    pub proto: u8,
    /// Added to the right IPv4 checksum (0: right).
    pub ip_csum_delta: u16,
    /// Added to the right TCP checksum (0: right).
    pub tcp_csum_delta: u16,
    /// Make both right checksums 0x0000 (through the urgent pointer and the identification)
    /// and write the other representation of zero, 0xffff: still right by RFC 1071's sum.
    pub negative_zero: bool,
    /// Leave the TCP checksum as a sender with tx checksum offload does (the pseudo-header's
    /// sum only: [`packet::partial_checksum`]), instead of the right one.
    pub partial_csum: bool,
    /// Bytes after the IPv4 packet (an Ethernet pad).
    pub trailer: u8,
    /// Overrides of the first IPv4 byte (version and ihl) and of the TCP data offset nibble.
    pub version_ihl: Option<u8>,
    pub doff: Option<u8>,
    /// Overrides the IPv4 total length.
    pub total_len: Option<u16>,
    /// Cut the frame to this many bytes.
    pub cut: Option<u16>,
}

impl Segment {
    pub fn new(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Self {
        Segment {
            src_mac: [0x02, 0, 0, 0, 0, 0x02],
            dst_mac: [0x02, 0, 0, 0, 0, 0x01],
            src,
            dst,
            flags,
            seq: 0,
            ack: 0,
            window: 64_240,
            tcp_options: Vec::new(),
            payload_len: 0,
            ttl: 64,
            ip_options: Vec::new(),
            frag: 0x4000,
            proto: IPPROTO_TCP,
            ip_csum_delta: 0,
            tcp_csum_delta: 0,
            negative_zero: false,
            partial_csum: false,
            trailer: 0,
            version_ihl: None,
            doff: None,
            total_len: None,
            cut: None,
        }
    }

    /// The frame's bytes.
    pub fn build(&self) -> Vec<u8> {
        let pad4 = |v: &[u8]| {
            let mut v = v.to_vec();
            while !v.len().is_multiple_of(4) {
                v.push(0);
            }
            v
        };
        let ip_opts = pad4(&self.ip_options);
        let tcp_opts = pad4(&self.tcp_options);
        let ihl = IPV4_MIN_LEN + ip_opts.len();
        let doff = TCP_MIN_LEN + tcp_opts.len();
        let mut tcp = Vec::with_capacity(doff + usize::from(self.payload_len));
        tcp.extend_from_slice(&self.src.port().to_be_bytes());
        tcp.extend_from_slice(&self.dst.port().to_be_bytes());
        tcp.extend_from_slice(&self.seq.to_be_bytes());
        tcp.extend_from_slice(&self.ack.to_be_bytes());
        tcp.push(self.doff.unwrap_or((doff / 4) as u8) << 4);
        tcp.push(self.flags);
        tcp.extend_from_slice(&self.window.to_be_bytes());
        tcp.extend_from_slice(&[0, 0, 0, 0]);
        tcp.extend_from_slice(&tcp_opts);
        tcp.extend((0..self.payload_len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(7)));
        let (src, dst) = (*self.src.ip(), *self.dst.ip());
        if self.negative_zero {
            // The urgent pointer chosen so that the right checksum is 0x0000: the checksum
            // of the segment with it 0.
            let s = l4_checksum(src, dst, IPPROTO_TCP, &tcp);
            tcp[18..20].copy_from_slice(&s.to_be_bytes());
        }
        let sum = if self.partial_csum {
            packet::partial_checksum(src, dst, tcp.len())
        } else {
            self.spoil(
                l4_checksum(src, dst, IPPROTO_TCP, &tcp),
                self.tcp_csum_delta,
            )
        };
        tcp[16..18].copy_from_slice(&sum.to_be_bytes());
        let total = self.total_len.unwrap_or((ihl + tcp.len()) as u16);
        let mut ip = Vec::with_capacity(ihl);
        ip.push(self.version_ihl.unwrap_or(0x40 | (ihl / 4) as u8));
        ip.push(0);
        ip.extend_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&0x1234u16.to_be_bytes());
        ip.extend_from_slice(&self.frag.to_be_bytes());
        ip.push(self.ttl);
        ip.push(self.proto);
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        ip.extend_from_slice(&ip_opts);
        if self.negative_zero {
            // The identification chosen so that the right checksum is 0x0000: the checksum
            // of the header with it 0.
            ip[4..6].copy_from_slice(&[0, 0]);
            let s = checksum(&ip);
            ip[4..6].copy_from_slice(&s.to_be_bytes());
        }
        let sum = self.spoil(checksum(&ip), self.ip_csum_delta);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        let mut out = Vec::with_capacity(ETH_LEN + ip.len() + tcp.len());
        out.extend_from_slice(&self.dst_mac);
        out.extend_from_slice(&self.src_mac);
        out.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
        out.extend_from_slice(&ip);
        out.extend_from_slice(&tcp);
        out.extend(std::iter::repeat_n(0u8, usize::from(self.trailer)));
        if let Some(cut) = self.cut {
            out.truncate(usize::from(cut));
        }
        out
    }

    fn spoil(&self, sum: u16, delta: u16) -> u16 {
        let sum = sum.wrapping_add(delta);
        match sum {
            0 if self.negative_zero => 0xffff,
            0xffff if self.negative_zero => 0,
            s => s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::{Frame, flags, parse_checked};

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn a_built_segment_verifies_and_parses_as_the_datapath_would() {
        let mut s = Segment::new(addr("192.0.2.2:40000"), addr("203.0.113.10:20000"), 0x02);
        s.tcp_options = vec![2, 4, 5, 0xb4, 1, 3, 3, 9];
        s.ip_options = vec![1, 1, 1, 0];
        s.payload_len = 5;
        s.seq = 77;
        let f = s.build();
        parse_checked(&f);
        let Parse::Tcp(seg) = parse(&f, |_| 1) else {
            panic!("not parsed")
        };
        assert_eq!((seg.ihl, seg.doff, seg.payload, seg.seq), (24, 28, 5, 77));
        assert_eq!(ip_residual(&f, seg.ihl), 0xffff);
        assert_eq!(tcp_residual(&f, &seg), 0xffff);
        assert_eq!(wscale_option(&f, &seg), Some(9));
    }

    #[test]
    fn a_translation_carries_a_checksum_error_and_fixes_nothing_else() {
        let frame = Frame::tcp(
            addr("192.0.2.2:40000"),
            addr("203.0.113.10:20000"),
            flags::ACK,
        )
        .payload(b"abc")
        .build();
        let Parse::Tcp(seg) = parse(&frame, |_| 1) else {
            panic!()
        };
        let t = Translation {
            src_ip: u32::from_ne_bytes([198, 51, 100, 253]),
            dst_ip: u32::from_ne_bytes([198, 51, 100, 2]),
            src_port: 40_001u16.to_be(),
            dst_port: 8080u16.to_be(),
            smac: [1; 6],
            dmac: [2; 6],
            ttl_dec: true,
        };
        let out = translate(&frame, &seg, &t);
        let p = parse_checked(&out);
        assert_eq!(
            (p.src, p.dst, p.ttl),
            (addr("198.51.100.253:40001"), addr("198.51.100.2:8080"), 63)
        );
        let mut bad = frame.clone();
        bad[14 + 20 + 16] ^= 0x10;
        let out = translate(&bad, &seg, &t);
        let Parse::Tcp(o) = parse(&out, |_| 1) else {
            panic!()
        };
        assert_eq!(tcp_residual(&out, &o), tcp_residual(&bad, &seg));
        assert_ne!(tcp_residual(&out, &o), 0xffff);
    }

    #[test]
    fn the_rst_answer_is_54_bytes_and_verifies() {
        let frame = Frame::tcp(
            addr("192.0.2.2:40000"),
            addr("203.0.113.10:20000"),
            flags::ACK,
        )
        .payload(b"abc")
        .build();
        let Parse::Tcp(seg) = parse(&frame, |_| 1) else {
            panic!()
        };
        let out = rst_answer(&frame, &seg);
        assert_eq!(out.len(), 54);
        let p = parse_checked(&out);
        assert_eq!(
            (p.src, p.dst, p.tcp_flags, p.ttl),
            (
                addr("203.0.113.10:20000"),
                addr("192.0.2.2:40000"),
                0x04,
                64
            )
        );
    }

    #[test]
    fn malformed_option_lists_offer_no_window_scale() {
        for (opts, want) in [
            (vec![3, 3, 20], Some(14)),
            (vec![0, 3, 3, 7], None),
            (vec![1, 1, 3, 3, 7], Some(7)),
            (vec![2, 1, 3, 3, 7], None),
            (vec![8, 10, 0, 0, 0, 0, 0, 0, 0, 0, 3, 3, 2], Some(2)),
            (vec![3, 4, 7, 0], None),
            (vec![1, 1, 1, 3], None),
        ] {
            let mut s = Segment::new(addr("192.0.2.2:1"), addr("203.0.113.10:2"), 0x02);
            s.tcp_options = opts.clone();
            let f = s.build();
            let Parse::Tcp(seg) = parse(&f, |_| 1) else {
                panic!()
            };
            assert_eq!(wscale_option(&f, &seg), want, "{opts:?}");
        }
    }
}
