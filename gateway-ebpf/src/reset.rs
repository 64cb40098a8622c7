//! Answering a segment the gateway has no flow for as a host without the socket does
//! (RFC 9293 §3.10.7.1): with an RST whose sequence number is the segment's acknowledgement
//! number, so the sender's TCP takes it and the connection ends at once (ECONNRESET) instead
//! of retransmitting for minutes. The RST is written over the segment itself and sent back
//! out of the interface it came in on (a redirect to the ingress device, in both modes).
//!
//! Only segments with ACK and without RST are answered (an RST is never answered), and only
//! when their IPv4 header has no options, so the TCP header stays where it is (a TC packet
//! may carry CHECKSUM_PARTIAL offsets that point at it).

use gateway_common::net::tcp_flags::{ACK, RST};

use crate::{
    answer::{Answer, OPTION_NONE},
    parse::{IPV4_MIN_LEN, TcpPacket},
};

/// Whether `pkt`, without a flow, is answered with an RST (else it is dropped).
#[inline(always)]
pub fn answers(pkt: &TcpPacket) -> bool {
    pkt.flags & (ACK | RST) == ACK && pkt.ihl() == IPV4_MIN_LEN
}

/// The RST answering `pkt` (for which [`answers`] holds): back to its sender, `seq` = the
/// segment's acknowledgement, no ACK, window 0, no options.
#[inline(always)]
pub fn answer(pkt: &TcpPacket) -> Answer {
    Answer {
        back: true,
        seq: pkt.ack,
        ack: 0,
        flags: RST,
        window: 0,
        option: OPTION_NONE,
        value: 0,
        arg: 0,
    }
}
