//! Answering a segment the gateway has no flow for as a host without the socket does
//! (RFC 9293 §3.10.7.1): with an RST whose sequence number is the segment's acknowledgement
//! number, so the sender's TCP takes it and the connection ends at once (ECONNRESET) instead
//! of retransmitting for minutes. The RST is written over the segment itself and sent back
//! out of the interface it came in on (a redirect to the ingress device, in both modes).
//!
//! Only segments with ACK and without RST are answered (an RST is never answered), and only
//! when their IPv4 header has no options, so the TCP header stays where it is (a TC packet
//! may carry CHECKSUM_PARTIAL offsets that point at it).

use gateway_common::{
    DropReason,
    net::{
        IPPROTO_TCP,
        tcp_flags::{ACK, RST},
    },
};

use crate::{
    csum,
    parse::{Bounds, ETH_LEN, IPV4_MIN_LEN, TCP_MIN_LEN, TcpPacket, join},
};

/// Bytes of the RST frame: Ethernet, IPv4 without options, TCP without options.
pub const FRAME_LEN: usize = ETH_LEN + IPV4_MIN_LEN + TCP_MIN_LEN;
/// The RST's TTL.
const TTL: u16 = 64;

/// Whether `pkt`, without a flow, is answered with an RST (else it is dropped).
#[inline(always)]
pub fn answers(pkt: &TcpPacket) -> bool {
    pkt.flags & (ACK | RST) == ACK && pkt.ihl() == IPV4_MIN_LEN
}

/// The sums the attach mode needs to write the RST's TCP checksum its own way: the
/// pseudo-header's and the TCP header's (checksum field zero), unfolded.
pub struct Sums {
    pub pseudo: u32,
    pub header: u32,
}

/// Writes the RST answering the segment in `b` over its first [`FRAME_LEN`] bytes: MACs, addresses and
/// ports swapped, `seq` = the segment's acknowledgement, flags RST, TTL 64, DF, no options,
/// the IPv4 checksum; the TCP checksum field is left zero for the caller (see [`Sums`]), and
/// so is trimming the frame to [`FRAME_LEN`].
///
/// # Safety
/// `b` must describe a packet for which [`answers`] holds, unchanged since it was parsed.
#[inline(always)]
pub unsafe fn write(b: &Bounds) -> Result<Sums, DropReason> {
    // One check for the whole frame, kept (see `words_checked`).
    let frame = b
        .words_checked::<{ FRAME_LEN / 2 }>(0)
        .ok_or(DropReason::Truncated)?;
    // SAFETY: bounds-checked and aligned (see `Bounds::words`); every value is read before
    // its place is written.
    let w = unsafe { &mut *frame };
    const IP: usize = ETH_LEN / 2;
    const TCP: usize = (ETH_LEN + IPV4_MIN_LEN) / 2;
    // Ethernet: the MACs swapped.
    let (d0, d1, d2) = (w[0], w[1], w[2]);
    w[0] = w[3];
    w[1] = w[4];
    w[2] = w[5];
    w[3] = d0;
    w[4] = d1;
    w[5] = d2;
    // IPv4. Words as read from the wire: the first byte is the low half.
    let (src0, src1, dst0, dst1) = (w[IP + 6], w[IP + 7], w[IP + 8], w[IP + 9]);
    w[IP] = 0x45; // version 4, ihl 5; TOS 0
    w[IP + 1] = (IPV4_MIN_LEN as u16 + TCP_MIN_LEN as u16).to_be();
    w[IP + 2] = 0; // id
    w[IP + 3] = 0x4000u16.to_be(); // DF
    w[IP + 4] = TTL | (u16::from(IPPROTO_TCP) << 8);
    w[IP + 5] = 0;
    w[IP + 6] = dst0;
    w[IP + 7] = dst1;
    w[IP + 8] = src0;
    w[IP + 9] = src1;
    let sum: u32 = w[IP..TCP].iter().map(|&x| u32::from(x)).sum();
    w[IP + 5] = !csum::fold(sum);
    // TCP.
    let (sport, dport, ack0, ack1) = (w[TCP], w[TCP + 1], w[TCP + 4], w[TCP + 5]);
    w[TCP] = dport;
    w[TCP + 1] = sport;
    w[TCP + 2] = ack0; // seq = the segment's ack
    w[TCP + 3] = ack1;
    w[TCP + 4] = 0; // ack
    w[TCP + 5] = 0;
    w[TCP + 6] = 0x50 | (u16::from(RST) << 8); // doff 5, flags RST
    w[TCP + 7] = 0; // window
    w[TCP + 8] = 0; // checksum: the caller's
    w[TCP + 9] = 0; // urgent pointer
    let header: u32 = w[TCP..].iter().map(|&x| u32::from(x)).sum();
    Ok(Sums {
        pseudo: csum::pseudo_header(join(dst0, dst1), join(src0, src1), TCP_MIN_LEN as u16),
        header,
    })
}

/// The RST's TCP checksum for a packet whose checksum is written as is (XDP).
#[inline(always)]
pub fn checksum(sums: &Sums) -> u16 {
    !csum::fold(sums.pseudo + sums.header)
}
