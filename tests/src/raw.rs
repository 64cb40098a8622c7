//! Hand-made traffic for the hostile-traffic tests: segments no well-behaved TCP stack sends
//! (spoofed RSTs, illegal flag combinations, bad checksums, stray ACKs), sent from inside a
//! namespace, and a sniffer that tells a test what really went over a link (to learn a live
//! connection's sequence numbers, or to see the RST a gateway answered with).
//!
//! Segments are built with [`crate::packet::Frame`] (correct checksums) and spoiled on
//! purpose where a test says so.

use std::{
    io,
    mem::{size_of, zeroed},
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use crate::{
    model::wire::{self, Parse},
    netns::{Netns, ifindex},
    packet::{ETH_LEN, Frame, IPV4_LEN},
};

/// `ETH_P_ALL` in network order, as `socket(2)` and `sockaddr_ll` want it.
const ETH_P_ALL_BE: u16 = (libc::ETH_P_ALL as u16).to_be();

/// Sends IPv4 packets from inside `ns` through a raw socket (`IPPROTO_RAW`, which implies
/// `IP_HDRINCL`), routed by their destination address. Each packet starts at its IPv4 header
/// (`Frame::build()[ETH_LEN..]`); the kernel fills in the IPv4 total length and header
/// checksum and leaves the rest as given: source address (spoofed or not), TTL, the TCP
/// header and its checksum (right or wrong). Such packets leave without checksum offload
/// (`CHECKSUM_NONE`). Panics if a send fails.
#[track_caller]
pub fn send_ipv4(ns: &Netns, packets: Vec<Vec<u8>>) {
    ns.run(move || {
        let raw = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
        )
        .expect("raw IPv4 socket");
        for p in packets {
            assert!(p.len() >= IPV4_LEN && p[0] >> 4 == 4, "an IPv4 packet");
            let dst = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
            let to = socket2::SockAddr::from(SocketAddrV4::new(dst, 0));
            raw.send_to(&p, &to).expect("send a crafted packet");
        }
    });
}

/// Sends `frame`s (whole Ethernet frames) out of interface `iface` of `ns` through an
/// AF_PACKET socket: nothing is filled in or fixed, so a bad IPv4 header checksum stays bad.
#[track_caller]
pub fn send_frames(ns: &Netns, iface: &str, frames: Vec<Vec<u8>>) {
    let iface = iface.to_owned();
    ns.run(move || {
        let fd = packet_socket(&iface).expect("AF_PACKET socket");
        for f in frames {
            // SAFETY: a valid descriptor and a buffer of `f.len()` bytes.
            let sent = unsafe { libc::send(fd.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
            assert_eq!(
                sent,
                f.len() as isize,
                "send a frame: {}",
                io::Error::last_os_error()
            );
        }
    });
}

/// Sends `frames` (whole Ethernet frames of TCP over IPv4 without options) out of interface
/// `iface` of the calling thread's namespace, round and round, as fast as one thread can, until
/// `duration` has passed or `max` frames went; returns how many went. Each round moves every
/// frame's source port on by one (its TCP checksum fixed incrementally, RFC 1624), so a flood
/// of a few thousand frames is millions of connections. Bounded in time and count; a send that
/// fails (a full queue) is not counted.
pub fn flood(iface: &str, frames: &mut [Vec<u8>], duration: Duration, max: u64) -> io::Result<u64> {
    const SPORT: usize = ETH_LEN + IPV4_LEN;
    const CHECK: usize = ETH_LEN + IPV4_LEN + 16;
    let fd = packet_socket(iface)?;
    // The socket only sends: nothing queues up on its receive side (ETH_P_ALL would have it
    // receive every frame of the link).
    // SAFETY: a valid descriptor; SO_RCVBUF of the smallest size.
    unsafe {
        let small: libc::c_int = 0;
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const small).cast(),
            size_of::<libc::c_int>() as u32,
        );
    }
    let end = Instant::now() + duration;
    let (mut sent, mut tried) = (0u64, 0u64);
    'outer: loop {
        for f in frames.iter_mut() {
            // SAFETY: a valid descriptor and a buffer of `f.len()` bytes.
            let n = unsafe { libc::send(fd.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
            sent += u64::from(n == f.len() as isize);
            tried += 1;
            if sent >= max || tried % 1024 == 0 && Instant::now() >= end {
                break 'outer;
            }
            // The next round's source port, and the checksum that goes with it.
            let old = u16::from_be_bytes([f[SPORT], f[SPORT + 1]]);
            let new = old.wrapping_add(1).max(1024);
            let check = u16::from_be_bytes([f[CHECK], f[CHECK + 1]]);
            let sum = u32::from(!check) + u32::from(!old) + u32::from(new);
            let sum = (sum & 0xffff) + (sum >> 16);
            let check = !((sum & 0xffff) + (sum >> 16)) as u16;
            f[SPORT..SPORT + 2].copy_from_slice(&new.to_be_bytes());
            f[CHECK..CHECK + 2].copy_from_slice(&check.to_be_bytes());
        }
    }
    Ok(sent)
}

/// The IPv4 packet of `frame` (without its Ethernet header), for [`send_ipv4`].
pub fn ipv4(frame: &Frame) -> Vec<u8> {
    frame.build()[ETH_LEN..].to_vec()
}

/// `frame` built, then with its TCP checksum wrong (every bit of it flipped).
pub fn with_bad_tcp_checksum(frame: &Frame) -> Vec<u8> {
    let mut bytes = frame.build();
    let at = ETH_LEN + IPV4_LEN + frame.ip_options.len() + 16;
    bytes[at] ^= 0xff;
    bytes[at + 1] ^= 0xff;
    bytes
}

/// `frame` built, then with its IPv4 header checksum wrong (every bit of it flipped).
pub fn with_bad_ipv4_checksum(frame: &Frame) -> Vec<u8> {
    let mut bytes = frame.build();
    bytes[ETH_LEN + 10] ^= 0xff;
    bytes[ETH_LEN + 11] ^= 0xff;
    bytes
}

/// An AF_PACKET socket bound to interface `iface` of the calling thread's namespace, receiving
/// every protocol.
fn packet_socket(iface: &str) -> io::Result<OwnedFd> {
    let ifindex = ifindex(iface)?;
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ALL_BE),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor we just created and own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set below.
    let mut addr: libc::sockaddr_ll = unsafe { zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_ALL_BE;
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: `addr` is a sockaddr_ll of the size given.
    let bound = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if bound != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// A TCP segment as it went over a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    /// Sequence and acknowledgement numbers (host order).
    pub seq: u32,
    pub ack: u32,
    /// The TCP flags byte (`packet::flags`).
    pub flags: u8,
    /// The window field as sent (unscaled).
    pub window: u16,
    pub ttl: u8,
    /// TCP payload bytes.
    pub payload_len: u32,
    /// The whole frame's length as captured (Ethernet header included), bytes.
    pub frame_len: usize,
}

impl Segment {
    /// The sequence number after this segment: `seq` + payload + 1 for SYN + 1 for FIN.
    pub fn end(&self) -> u32 {
        let syn_fin = u32::from(self.flags & crate::packet::flags::SYN != 0)
            + u32::from(self.flags & crate::packet::flags::FIN != 0);
        self.seq
            .wrapping_add(self.payload_len)
            .wrapping_add(syn_fin)
    }

    /// Parses an Ethernet/IPv4/TCP frame as the datapath does ([`wire::parse`], whatever its
    /// destination), without judging its checksums (frames a host sends may carry partial
    /// ones, left to offload). `None` for anything else (fragments included).
    pub fn parse(frame: &[u8]) -> Option<Segment> {
        let Parse::Tcp(seg) = wire::parse(frame, |_| 1) else {
            return None;
        };
        Some(Segment {
            src: seg.key.src(),
            dst: seg.key.dst(),
            seq: seg.seq,
            ack: seg.ack,
            flags: seg.flags,
            window: seg.window,
            ttl: seg.ttl,
            payload_len: seg.payload,
            frame_len: frame.len(),
        })
    }
}

/// Captures every frame in and out of one interface of a namespace (AF_PACKET), from the
/// moment it opens. Closed on drop.
pub struct Sniffer {
    fd: OwnedFd,
}

impl Sniffer {
    /// Starts capturing on `iface` of `ns`.
    #[track_caller]
    pub fn open(ns: &Netns, iface: &str) -> Self {
        let name = iface.to_owned();
        let fd = ns
            .run(move || packet_socket(&name))
            .unwrap_or_else(|e| panic!("AF_PACKET socket on {iface} in {}: {e}", ns.name()));
        Sniffer { fd }
    }

    /// Forgets every frame captured so far.
    pub fn clear(&self) {
        let mut buf = [0u8; 2048];
        while self.recv(&mut buf, libc::MSG_DONTWAIT).is_some() {}
    }

    /// The next captured TCP segment that `filter` accepts, waiting at most `timeout`;
    /// segments it rejects are consumed.
    pub fn next(&self, timeout: Duration, filter: impl Fn(&Segment) -> bool) -> Option<Segment> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65_536 + ETH_LEN];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) };
            if ready <= 0 {
                continue;
            }
            let Some(n) = self.recv(&mut buf, libc::MSG_DONTWAIT) else {
                continue;
            };
            if let Some(s) = Segment::parse(&buf[..n]).filter(|s| filter(s)) {
                return Some(s);
            }
        }
    }

    fn recv(&self, buf: &mut [u8], flags: i32) -> Option<usize> {
        // SAFETY: a valid descriptor and a writable buffer of `buf.len()` bytes.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                flags,
            )
        };
        (n >= 0).then_some(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::flags;

    #[test]
    fn segments_parse_back_from_built_frames() {
        let src = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 2), 40000);
        let dst = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 10), 20000);
        let frame = Frame {
            seq: 7,
            ack: 9,
            ..Frame::tcp(src, dst, flags::FIN | flags::ACK).payload(b"abc")
        };
        let s = Segment::parse(&frame.build()).expect("a TCP segment");
        assert_eq!((s.src, s.dst, s.seq, s.ack), (src, dst, 7, 9));
        assert_eq!(
            (s.flags, s.payload_len, s.ttl),
            (flags::FIN | flags::ACK, 3, 64)
        );
        assert_eq!(s.end(), 7 + 3 + 1);
        assert_eq!(s.frame_len, ETH_LEN + IPV4_LEN + 20 + 3);
    }

    #[test]
    fn spoiled_checksums_fail_the_check() {
        let src = SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 2), 40000);
        let dst = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 10), 20000);
        let frame = Frame::tcp(src, dst, flags::SYN);
        for bad in [
            with_bad_tcp_checksum(&frame),
            with_bad_ipv4_checksum(&frame),
        ] {
            assert!(std::panic::catch_unwind(|| crate::packet::parse_checked(&bad)).is_err());
            assert!(Segment::parse(&bad).is_some(), "still a segment");
        }
    }
}
