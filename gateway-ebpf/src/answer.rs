//! Writing a TCP segment of the gateway's own over the packet in hand: an RST answering a
//! segment without a flow (`reset`), and the SYN proxy's segments (`synproxy`): the SYN-ACK
//! with a cookie, the ACK that completes a backend's handshake, and the SYN a cookie's ACK
//! becomes. The segment has an IPv4 header without options (TTL 64, DF) and a TCP header with
//! at most an MSS option, no payload. The caller sizes the frame first ([`Answer::frame_len`]),
//! then has it written, then writes the TCP checksum its own way from the [`Sums`] (XDP as is,
//! TC through the helper, so a CHECKSUM_PARTIAL skb stays consistent).

use gateway_common::{
    DropReason,
    net::{IPPROTO_TCP, pseudo_header},
};

use crate::{
    csum,
    parse::{Bounds, ETH_LEN, IPV4_MIN_LEN, TCP_MIN_LEN, join},
};

/// Bytes of a frame without TCP options: Ethernet, IPv4, TCP.
pub const FRAME_LEN: usize = ETH_LEN + IPV4_MIN_LEN + TCP_MIN_LEN;
/// Bytes of a frame with an MSS option (4 bytes).
pub const FRAME_LEN_MSS: usize = FRAME_LEN + 4;
/// The TTL of the gateway's own segments (a host's default).
const TTL: u16 = 64;
/// TCP option kind of the MSS (RFC 9293 §3.2), and its length.
const OPT_MSS: u16 = 2;

/// The segment to write. Addresses and ports are the packet's: kept (`back` false: the segment
/// goes on the packet's way, e.g. a SYN toward the backend) or swapped (`back`: it goes back to
/// the sender, as do the MACs).
#[derive(Clone, Copy)]
pub struct Answer {
    pub back: bool,
    /// Sequence and acknowledgement numbers (host order).
    pub seq: u32,
    pub ack: u32,
    /// TCP flags (`gateway_common::net::tcp_flags`).
    pub flags: u8,
    /// Window (host order, unscaled).
    pub window: u16,
    /// The MSS option's value; 0: no option.
    pub mss: u16,
    /// The app of a SYN-ACK with an MSS option (the SYN proxy's cookie), for its MSS clamp
    /// (`mss::mark`); 0 otherwise.
    pub app_id: u32,
}

impl Answer {
    /// No segment yet: what the attach mode gives the pipeline to fill (every field set, so
    /// nothing of it is undefined to LLVM: see `pipeline::prepare`).
    pub const EMPTY: Answer = Answer {
        back: false,
        seq: 0,
        ack: 0,
        flags: 0,
        window: 0,
        mss: 0,
        app_id: 0,
    };

    /// The frame's length: [`FRAME_LEN`], or [`FRAME_LEN_MSS`] with an MSS option.
    #[inline(always)]
    pub const fn frame_len(&self) -> usize {
        if self.mss != 0 {
            FRAME_LEN_MSS
        } else {
            FRAME_LEN
        }
    }
}

/// The sums the attach mode needs to write the segment's TCP checksum its own way: the
/// pseudo-header's and the TCP header's (checksum field zero), unfolded.
pub struct Sums {
    pub pseudo: u32,
    pub header: u32,
}

impl Sums {
    /// The TCP checksum, for a packet whose checksum is written as is (XDP).
    #[inline(always)]
    pub fn checksum(&self) -> u16 {
        !csum::fold(self.pseudo + self.header)
    }
}

/// Writes `a` over the frame in `b`, which must be [`Answer::frame_len`] bytes or more (the
/// caller sized it): Ethernet (MACs swapped if `a.back`), IPv4 without options (the IPv4
/// checksum included), TCP with the TCP checksum field zero (see [`Sums`]).
///
/// # Safety
/// `b` must describe a packet whose IPv4 header had no options (the TCP header stays where it
/// was: a TC packet's CHECKSUM_PARTIAL offsets may point at it), unchanged since it was parsed
/// but for its length.
#[inline(always)]
pub unsafe fn write(b: &Bounds, a: &Answer) -> Result<Sums, DropReason> {
    if a.mss != 0 {
        // SAFETY: the caller's promise.
        unsafe { write_words::<{ FRAME_LEN_MSS / 2 }>(b, a) }
    } else {
        // SAFETY: the caller's promise.
        unsafe { write_words::<{ FRAME_LEN / 2 }>(b, a) }
    }
}

/// [`write`] over a frame of `W` 16-bit words.
#[inline(always)]
unsafe fn write_words<const W: usize>(b: &Bounds, a: &Answer) -> Result<Sums, DropReason> {
    // One check for the whole frame, kept (see `words_checked`).
    let frame = b.words_checked::<W>(0).ok_or(DropReason::Truncated)?;
    // SAFETY: bounds-checked and aligned (see `Bounds::words`); every value is read before
    // its place is written.
    let w = unsafe { &mut *frame };
    const IP: usize = ETH_LEN / 2;
    const TCP: usize = (ETH_LEN + IPV4_MIN_LEN) / 2;
    let tcp_len = (W * 2 - ETH_LEN - IPV4_MIN_LEN) as u16;
    if a.back {
        let (d0, d1, d2) = (w[0], w[1], w[2]);
        w[0] = w[3];
        w[1] = w[4];
        w[2] = w[5];
        w[3] = d0;
        w[4] = d1;
        w[5] = d2;
    }
    // IPv4. Words as read from the wire: the first byte is the low half.
    let (mut src0, mut src1, mut dst0, mut dst1) = (w[IP + 6], w[IP + 7], w[IP + 8], w[IP + 9]);
    let (mut sport, mut dport) = (w[TCP], w[TCP + 1]);
    if a.back {
        (src0, src1, dst0, dst1) = (dst0, dst1, src0, src1);
        (sport, dport) = (dport, sport);
    }
    w[IP] = 0x45; // version 4, ihl 5; TOS 0
    w[IP + 1] = (IPV4_MIN_LEN as u16 + tcp_len).to_be();
    w[IP + 2] = 0; // id
    w[IP + 3] = 0x4000u16.to_be(); // DF
    w[IP + 4] = TTL | (u16::from(IPPROTO_TCP) << 8);
    w[IP + 5] = 0;
    w[IP + 6] = src0;
    w[IP + 7] = src1;
    w[IP + 8] = dst0;
    w[IP + 9] = dst1;
    let sum: u32 = w[IP..TCP].iter().map(|&x| u32::from(x)).sum();
    w[IP + 5] = !csum::fold(sum);
    // TCP.
    w[TCP] = sport;
    w[TCP + 1] = dport;
    let (seq, ack) = (a.seq.to_be(), a.ack.to_be());
    w[TCP + 2] = seq as u16;
    w[TCP + 3] = (seq >> 16) as u16;
    w[TCP + 4] = ack as u16;
    w[TCP + 5] = (ack >> 16) as u16;
    // Data offset (header words) in the high nibble of the first byte, flags the second.
    w[TCP + 6] = ((tcp_len / 4) << 4) | (u16::from(a.flags) << 8);
    w[TCP + 7] = a.window.to_be();
    w[TCP + 8] = 0; // checksum: the caller's
    w[TCP + 9] = 0; // urgent pointer
    if let Some(opt) = w.get_mut(TCP + 10) {
        // Kind, then length: the first byte is the low half.
        *opt = OPT_MSS | (4 << 8);
    }
    if let Some(mss) = w.get_mut(TCP + 11) {
        *mss = a.mss.to_be();
    }
    let header: u32 = w[TCP..].iter().map(|&x| u32::from(x)).sum();
    Ok(Sums {
        pseudo: pseudo_header(join(src0, src1), join(dst0, dst1), tcp_len),
        header,
    })
}
