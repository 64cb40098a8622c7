//! Resetting both ends of a connection the gateway ends itself (`app delete`,
//! `backend remove --now`, a drain deadline): before the connection's conntrack pair goes, each
//! end gets an RST it accepts at once, from the address and port it talks to, so that its next
//! read or write fails with ECONNRESET instead of retransmitting into silence for minutes.
//!
//! An end accepts an RST whose sequence number is exactly the one it expects next (RFC 5961
//! §3.2; anything else in its window only draws a challenge ACK). The conntrack knows it: the
//! highest acknowledgement that end sent itself ([`Flow::ack_max`] of its own entry), or failing
//! that, the end of what the other end sent ([`Flow::seq_end`] of the other entry).
//! [`Reset::ending`] picks; [`Reset::packet`] builds the segment (pure, tested);
//! [`ResetSocket`] sends it.

use std::{
    io,
    net::SocketAddrV4,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

use gateway_common::{
    maps::{Flow, TRACK_ACK_SEEN},
    net::{self, IPPROTO_TCP, ip_to_net, tcp_flags},
};

use crate::datapath::Connection;

/// Bytes of an RST packet: an IPv4 header and a TCP header, neither with options, no payload.
const RST_PACKET_LEN: usize = 40;

/// The IPv4 TTL of the RSTs the gateway sends (a host's default, as the datapath's own RSTs).
pub const RST_TTL: u8 = 64;

/// One RST to send: from `from` to `to`, with sequence number `seq` (host order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reset {
    pub from: SocketAddrV4,
    pub to: SocketAddrV4,
    pub seq: u32,
}

impl Reset {
    /// The two RSTs that end `conn`: to the client (from the public address and port it
    /// talks to), then to the backend (from the SNAT address and port it talks to). Each
    /// carries the sequence number its receiver expects next: the highest acknowledgement the
    /// receiver sent if the conntrack saw one (its entry's `ack_max`, with `TRACK_ACK_SEEN`),
    /// else the end of what the other end sent (the other entry's `seq_end`). An entry
    /// that is missing, or holds no tracking (a handshake without a SYN-ACK, an entry carried
    /// over from an older table and not learned yet), counts as zeros: the best guess there is.
    pub fn ending(conn: &Connection) -> [Reset; 2] {
        let none = Flow::default();
        let forward = conn.forward.as_ref().unwrap_or(&none);
        let reverse = conn.reverse.as_ref().unwrap_or(&none);
        // What `receiver` expects next: what it acknowledged, else what `sender` sent up to.
        let expected = |receiver: &Flow, sender: &Flow| {
            if receiver.track & TRACK_ACK_SEEN != 0 {
                receiver.ack_max
            } else {
                sender.seq_end
            }
        };
        [
            Reset {
                from: conn.forward_key.dst(),
                to: conn.forward_key.src(),
                seq: expected(forward, reverse),
            },
            Reset {
                from: conn.reverse_key.dst(),
                to: conn.reverse_key.src(),
                seq: expected(reverse, forward),
            },
        ]
    }

    /// The RST as an IPv4 packet: header of 20 bytes (no options, TOS 0, id 0, DF, TTL
    /// [`RST_TTL`]), TCP header of 20 bytes (flags RST only, ack 0, window 0, urgent 0), no
    /// payload; both checksums computed. Every multi-byte field in network order.
    pub fn packet(&self) -> [u8; RST_PACKET_LEN] {
        let mut p = [0u8; RST_PACKET_LEN];
        let (src, dst) = (self.from.ip().octets(), self.to.ip().octets());
        // IPv4 header.
        p[0] = 0x45; // version 4, 5 words
        p[2..4].copy_from_slice(&(RST_PACKET_LEN as u16).to_be_bytes());
        p[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // DF, offset 0
        p[8] = RST_TTL;
        p[9] = IPPROTO_TCP;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        let ip_sum = checksum(&[&p[..20]]);
        p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
        // TCP header.
        let t = &mut p[20..];
        t[0..2].copy_from_slice(&self.from.port().to_be_bytes());
        t[2..4].copy_from_slice(&self.to.port().to_be_bytes());
        t[4..8].copy_from_slice(&self.seq.to_be_bytes());
        t[12] = 5 << 4; // data offset: 5 words
        t[13] = tcp_flags::RST;
        let pseudo = net::pseudo_header(ip_to_net(*self.from.ip()), ip_to_net(*self.to.ip()), 20);
        let tcp_sum = checksum_after(pseudo, &[&p[20..]]);
        p[36..38].copy_from_slice(&tcp_sum.to_be_bytes());
        p
    }
}

/// The Internet checksum (RFC 1071) of `parts` laid end to end (each of even length), host
/// order: the one's complement of the one's complement sum of its 16-bit words.
fn checksum(parts: &[&[u8]]) -> u16 {
    checksum_after(0, parts)
}

/// [`checksum`] of `parts` after `sum`, a sum of words read as `gateway_common::net` reads
/// them (a pseudo-header's, [`net::pseudo_header`]).
fn checksum_after(sum: u32, parts: &[&[u8]]) -> u16 {
    let sum = parts.iter().fold(u64::from(sum), |acc, part| {
        acc + u64::from(net::sum_words(part))
    });
    // Summed from words read without swapping: the field's bytes are the result's own.
    u16::from_be_bytes((!net::fold64(sum)).to_ne_bytes())
}

/// How long sending one RST may block (a full socket buffer). The daemon tries no more of a
/// batch once a send timed out, so ending many connections waits this long at most once.
const SEND_TIMEOUT: Duration = Duration::from_millis(100);

/// A raw IPv4 socket (`socket(AF_INET, SOCK_RAW, IPPROTO_RAW)`, which implies `IP_HDRINCL`:
/// the packets given carry their own IPv4 header) in the namespace of the process that opened
/// it: the kernel routes what it sends, out of the interface toward each destination. Needs
/// `CAP_NET_RAW`.
#[derive(Debug)]
pub struct ResetSocket {
    fd: OwnedFd,
}

impl ResetSocket {
    /// Opens the socket.
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain syscall; the descriptor it returns is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_RAW,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a descriptor this process just opened and nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: SEND_TIMEOUT.as_micros() as libc::suseconds_t,
        };
        // SAFETY: `timeout` is a valid `timeval` of the size given.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ResetSocket { fd })
    }

    /// Sends `reset` ([`Reset::packet`]).
    pub fn send(&self, reset: &Reset) -> io::Result<()> {
        let packet = reset.packet();
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: ip_to_net(*reset.to.ip()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: `packet` and `to` are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&to as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        match sent {
            n if n == packet.len() as isize => Ok(()),
            n if n < 0 => Err(io::Error::last_os_error()),
            n => Err(io::Error::other(format!(
                "sent {n} of the RST's {} bytes",
                packet.len()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use gateway_common::maps::{CT_ESTABLISHED, DIR_FORWARD, DIR_REVERSE, FlowKey4};

    use super::*;

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    /// Whether the one's complement sum of `parts` (checksum field included) is all ones.
    fn sums_to_ones(parts: &[&[u8]]) -> bool {
        checksum(parts) == 0
    }

    #[test]
    fn an_rst_packet_is_40_bytes_of_headers_with_valid_checksums() {
        let reset = Reset {
            from: addr("203.0.113.10:20000"),
            to: addr("192.0.2.2:40000"),
            seq: 0xdead_beef,
        };
        let p = reset.packet();
        #[rustfmt::skip]
        let expected_ip = [
            0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, /* checksum */ 0, 0,
            203, 0, 113, 10, 192, 0, 2, 2,
        ];
        let mut ip = p[..20].to_vec();
        ip[10..12].fill(0);
        assert_eq!(ip, expected_ip);
        #[rustfmt::skip]
        let expected_tcp = [
            0x4e, 0x20, 0x9c, 0x40, 0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0,
            0x50, 0x04, 0, 0, /* checksum */ 0, 0, 0, 0,
        ];
        let mut tcp = p[20..].to_vec();
        tcp[16..18].fill(0);
        assert_eq!(tcp, expected_tcp);

        // Both checksums verified from scratch: the header, and the pseudo-header with the
        // segment, each sum to all ones with its checksum in place.
        assert!(sums_to_ones(&[&p[..20]]), "IPv4 header checksum");
        let pseudo = [
            &[203, 0, 113, 10, 192, 0, 2, 2, 0, 6][..],
            &20u16.to_be_bytes(),
            &p[20..],
        ];
        assert!(sums_to_ones(&pseudo), "TCP checksum");
        assert_ne!(u16::from_be_bytes([p[36], p[37]]), 0);
        // Another sequence number, another checksum.
        let other = Reset { seq: 1, ..reset }.packet();
        assert_ne!(other[36..38], p[36..38]);
        assert!(sums_to_ones(&[&other[..20]]));
    }

    #[test]
    fn the_checksum_is_rfc_1071s() {
        // RFC 1071 §3's example words sum to 0xddf2 (with the carries folded in).
        let words = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&[&words]), !0xddf2);
        assert_eq!(checksum(&[&words[..4], &words[4..]]), !0xddf2);
    }

    /// A connection client 192.0.2.2:40000 → public 203.0.113.10:20000, to backend
    /// 198.51.100.2:8080 from SNAT 198.51.100.253:41000.
    fn connection(forward: Flow, reverse: Flow) -> Connection {
        let forward_key = FlowKey4::from_addrs(addr("192.0.2.2:40000"), addr("203.0.113.10:20000"));
        let reverse_key =
            FlowKey4::from_addrs(addr("198.51.100.2:8080"), addr("198.51.100.253:41000"));
        Connection {
            forward_key,
            forward: Some(Flow {
                direction: DIR_FORWARD,
                state: CT_ESTABLISHED,
                ..forward
            }),
            reverse_key,
            reverse: Some(Flow {
                direction: DIR_REVERSE,
                state: CT_ESTABLISHED,
                ..reverse
            }),
        }
    }

    #[test]
    fn each_end_gets_the_sequence_number_it_acknowledged_from_the_address_it_talks_to() {
        let conn = connection(
            Flow {
                seq_end: 1_000,
                ack_max: 5_000,
                track: TRACK_ACK_SEEN,
                ..Flow::default()
            },
            Flow {
                seq_end: 5_500,
                ack_max: 900,
                track: TRACK_ACK_SEEN,
                ..Flow::default()
            },
        );
        let [client, backend] = Reset::ending(&conn);
        assert_eq!(
            client,
            Reset {
                from: addr("203.0.113.10:20000"),
                to: addr("192.0.2.2:40000"),
                seq: 5_000,
            },
            "the client acknowledged up to 5000 (the backend sent more, unacknowledged)"
        );
        assert_eq!(
            backend,
            Reset {
                from: addr("198.51.100.253:41000"),
                to: addr("198.51.100.2:8080"),
                seq: 900,
            }
        );
    }

    #[test]
    fn without_an_acknowledgement_seen_the_other_sides_end_is_the_guess() {
        // A handshake whose SYN-ACK never came: the client's entry has its SYN's end, the
        // backend's nothing.
        let conn = connection(
            Flow {
                seq_end: 1_001,
                ..Flow::default()
            },
            Flow::default(),
        );
        let [client, backend] = Reset::ending(&conn);
        assert_eq!((client.seq, backend.seq), (0, 1_001));

        // An entry missing (evicted): its numbers count as zeros, its addresses come from the
        // connection's keys.
        let orphan = Connection {
            reverse: None,
            ..connection(
                Flow {
                    seq_end: 7,
                    ack_max: 3,
                    track: TRACK_ACK_SEEN,
                    ..Flow::default()
                },
                Flow::default(),
            )
        };
        let [client, backend] = Reset::ending(&orphan);
        assert_eq!((client.seq, backend.seq), (3, 7));
        assert_eq!(backend.to, addr("198.51.100.2:8080"));
    }
}
