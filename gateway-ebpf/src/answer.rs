//! Writing a TCP segment of the gateway's own over the packet in hand: an RST answering a
//! segment without a flow (`reset`), and the SYN proxy's segments (`synproxy`): the SYN-ACK
//! with a cookie, the ACK that completes a backend's handshake, and the SYN a cookie's ACK
//! becomes. The segment has an IPv4 header without options (TTL 64, DF) and a TCP header with
//! at most an MSS option or a TOA option (the ACK to the backend, `toa`), no payload. The caller sizes the frame first ([`Answer::frame_len`]),
//! then has it written, then writes the TCP checksum its own way from the [`Sums`] (XDP as is,
//! TC through the helper, so a CHECKSUM_PARTIAL skb stays consistent).

use gateway_common::{
    DropReason, GlobalStat,
    net::{IPPROTO_TCP, pseudo_header, toa},
};

use crate::{
    csum,
    parse::{Bounds, ETH_LEN, IPV4_MIN_LEN, TCP_MIN_LEN, join},
    stats,
};

/// Bytes of a frame without TCP options: Ethernet, IPv4, TCP.
pub const FRAME_LEN: usize = ETH_LEN + IPV4_MIN_LEN + TCP_MIN_LEN;
/// Bytes of a frame with an MSS option (4 bytes).
pub const FRAME_LEN_MSS: usize = FRAME_LEN + 4;
/// Bytes of a frame with a TOA option (8 bytes: `gateway_common::net::toa`).
pub const FRAME_LEN_TOA: usize = FRAME_LEN + 8;
/// The TTL of the gateway's own segments (a host's default).
const TTL: u16 = 64;
/// TCP option kind of the MSS (RFC 9293 §3.2).
const OPT_MSS: u16 = OPTION_MSS as u16;

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
    /// The TCP option, by its kind: [`OPTION_NONE`], [`OPTION_MSS`] or [`OPTION_TOA`]. One
    /// option with two values, rather than a field per value of each: the answer lives on the
    /// packet function's stack, which has no 8 bytes to spare (its frames share 512).
    pub option: u8,
    /// [`OPTION_MSS`]: the MSS (host order). [`OPTION_TOA`]: the client's port (network order).
    pub value: u16,
    /// [`OPTION_MSS`]: the app, for its MSS clamp (a SYN-ACK: the SYN proxy's cookie;
    /// `mss::mark_answer`). [`OPTION_TOA`]: the client's IPv4 address (network order).
    pub arg: u32,
}

/// [`Answer::option`]: none.
pub const OPTION_NONE: u8 = 0;
/// [`Answer::option`]: an MSS option (its kind, RFC 9293 §3.2).
pub const OPTION_MSS: u8 = 2;
/// [`Answer::option`]: a TOA option (its kind, `gateway_common::net::toa`): the SYN proxy's ACK
/// to the backend of an app that is told the client's address (`toa`).
pub const OPTION_TOA: u8 = toa::KIND;

impl Answer {
    /// No segment yet: what the attach mode gives the pipeline to fill (every field set, so
    /// nothing of it is undefined to LLVM: see `pipeline::prepare`).
    pub const EMPTY: Answer = Answer {
        back: false,
        seq: 0,
        ack: 0,
        flags: 0,
        window: 0,
        option: OPTION_NONE,
        value: 0,
        arg: 0,
    };

    /// The frame's length: [`FRAME_LEN`], [`FRAME_LEN_MSS`] with an MSS option, or
    /// [`FRAME_LEN_TOA`] with a TOA option.
    #[inline(always)]
    pub const fn frame_len(&self) -> usize {
        if self.option == OPTION_MSS {
            FRAME_LEN_MSS
        } else if self.option == OPTION_TOA {
            FRAME_LEN_TOA
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
    if a.option == OPTION_MSS {
        // SAFETY: the caller's promise.
        unsafe { write_words::<{ FRAME_LEN_MSS / 2 }>(b, a) }
    } else if a.option == OPTION_TOA {
        // SAFETY: the caller's promise.
        unsafe { write_words::<{ FRAME_LEN_TOA / 2 }>(b, a) }
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
    if W * 2 == FRAME_LEN_MSS {
        // Kind, then length: the first byte is the low half.
        w[TCP + 10] = OPT_MSS | (4 << 8);
        w[TCP + 11] = a.value.to_be();
    }
    if W * 2 == FRAME_LEN_TOA {
        stats::global(GlobalStat::ToaAdded);
        let option = toa::option(a.arg, a.value);
        for (i, pair) in option.chunks_exact(2).enumerate() {
            w[TCP + 10 + i] = u16::from_ne_bytes([pair[0], pair[1]]);
        }
    }
    let header: u32 = w[TCP..].iter().map(|&x| u32::from(x)).sum();
    Ok(Sums {
        pseudo: pseudo_header(join(src0, src1), join(dst0, dst1), tcp_len),
        header,
    })
}
