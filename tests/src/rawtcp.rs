//! A TCP client made of raw sockets, for segments a kernel's TCP does not send: TCP options of
//! the test's choosing on the handshake's ACK (a TOA option, say) or on a later segment. It
//! plays one connection from inside a namespace: SYN (MSS 1460, nothing else) → the server's
//! SYN-ACK → ACK with the given options → data, acknowledging what the server sends.
//!
//! Segments go out through an `IPPROTO_RAW` socket (`IP_HDRINCL`; the kernel fills in the IPv4
//! length and checksum) and come back through a raw `IPPROTO_TCP` socket, which sees every TCP
//! segment the namespace receives. The namespace's own TCP sees the server's segments too and,
//! having no socket for them, answers with RSTs: an nftables table of the client's own
//! (`rawtcp_<port>`, removed on drop) drops the namespace's RSTs from the client's port, except
//! those of this client (marked with [`MARK`]).
//!
//! No retransmission, no window, no reordering: for the short exchanges of tests on a veth.

use std::{
    io,
    mem::MaybeUninit,
    net::{Ipv4Addr, SocketAddrV4},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::{
    netns::Netns,
    packet::{ETH_LEN, Frame, flags, mss_option},
};

/// The mark of this client's own segments (`SO_MARK`), which its RST filter lets through.
pub const MARK: u32 = 0x7261_7774;

/// One TCP connection played from raw sockets.
pub struct RawTcpClient {
    ns: String,
    send: Socket,
    recv: Socket,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    /// The next sequence number this client sends.
    snd_nxt: u32,
    /// The next sequence number it expects from the server.
    rcv_nxt: u32,
    /// Whether the server sent its FIN.
    pub peer_fin: bool,
    /// Whether the server reset the connection.
    pub peer_rst: bool,
    done: bool,
}

/// A segment from the server, parsed.
#[derive(Debug, Clone)]
pub struct Segment {
    pub flags: u8,
    pub seq: u32,
    pub ack: u32,
    pub payload: Vec<u8>,
}

impl RawTcpClient {
    /// Opens a connection from `src` (an address of namespace `ns`; nothing else may use its
    /// port there) to `dst`, sending `options_on_ack` (padded with end-of-list bytes to a
    /// multiple of 4, at most 40 bytes) on the ACK that completes the handshake. Fails if no
    /// SYN-ACK comes within 3 s.
    pub fn connect(
        ns: &Netns,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        options_on_ack: &[u8],
    ) -> io::Result<Self> {
        let client = Self::handshake(ns, src, dst)?;
        client.ack(options_on_ack)?;
        Ok(client)
    }

    /// The handshake's first two segments (SYN, the server's SYN-ACK), as [`Self::connect`]
    /// plays them, without the ACK that completes it (see [`Self::ack`]): the server's end
    /// is still in SYN-RECV.
    pub fn handshake(ns: &Netns, src: SocketAddrV4, dst: SocketAddrV4) -> io::Result<Self> {
        ns.nft(&format!(
            "table ip {table} {{\n\
             \tchain out {{\n\
             \t\ttype filter hook output priority 0;\n\
             \t\tmeta mark != {MARK} tcp sport {port} tcp flags & rst == rst drop\n\
             \t}}\n\
             }}\n",
            table = table_name(src),
            port = src.port(),
        ));
        let (send, recv) = ns.run(|| -> io::Result<(Socket, Socket)> {
            let send = Socket::new(
                Domain::IPV4,
                Type::RAW,
                Some(Protocol::from(libc::IPPROTO_RAW)),
            )?;
            send.set_mark(MARK)?;
            let recv = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP))?;
            Ok((send, recv))
        })?;
        let isn = initial_sequence();
        let mut client = RawTcpClient {
            ns: ns.name().to_owned(),
            send,
            recv,
            src,
            dst,
            snd_nxt: isn,
            rcv_nxt: 0,
            peer_fin: false,
            peer_rst: false,
            done: false,
        };
        client.segment(flags::SYN, &mss_option(1460), &[])?;
        client.snd_nxt = isn.wrapping_add(1);
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let s = client.next_segment(deadline)?.ok_or_else(|| {
                io::Error::new(io::ErrorKind::TimedOut, format!("no SYN-ACK from {dst}"))
            })?;
            if s.flags & flags::RST != 0 {
                client.done = true;
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("{dst} refused the connection"),
                ));
            }
            if s.flags & (flags::SYN | flags::ACK) == flags::SYN | flags::ACK
                && s.ack == client.snd_nxt
            {
                client.rcv_nxt = s.seq.wrapping_add(1);
                break;
            }
        }
        Ok(client)
    }

    /// An ACK at the current numbers carrying TCP `options` (padded as in [`Self::connect`]):
    /// the handshake's, after [`Self::handshake`].
    pub fn ack(&self, options: &[u8]) -> io::Result<()> {
        self.segment(flags::ACK, options, &[])
    }

    /// A bare ACK one sequence number behind the current one (an old duplicate): outside a
    /// receiver's window, which a server in SYN-RECV answers with an ACK (`tcp_check_req`).
    pub fn stale_ack(&self) -> io::Result<()> {
        let mut frame = Frame::tcp(self.src, self.dst, flags::ACK);
        frame.seq = self.snd_nxt.wrapping_sub(1);
        frame.ack = self.rcv_nxt;
        let packet = &frame.build()[ETH_LEN..];
        let to = SockAddr::from(SocketAddrV4::new(*self.dst.ip(), 0));
        self.send.send_to(packet, &to).map(drop)
    }

    /// The server's next segment within `timeout`, as it came (nothing acknowledged).
    pub fn next(&self, timeout: Duration) -> io::Result<Option<Segment>> {
        self.next_segment(Instant::now() + timeout)
    }

    /// Sends `data` in one segment (PSH, ACK).
    pub fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.send_with_options(data, &[])
    }

    /// Sends `data` in one segment carrying TCP `options` (padded as in [`Self::connect`]).
    pub fn send_with_options(&mut self, data: &[u8], options: &[u8]) -> io::Result<()> {
        self.segment(flags::PSH | flags::ACK, options, data)?;
        self.snd_nxt = self.snd_nxt.wrapping_add(data.len() as u32);
        Ok(())
    }

    /// The data the server sends next: the payload of its next in-order segments with data
    /// (each acknowledged), gathered until one has PSH or `timeout` has passed. Empty if the
    /// server sent none (or closed: see [`Self::peer_fin`], [`Self::peer_rst`]).
    pub fn recv(&mut self, timeout: Duration) -> io::Result<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut data = Vec::new();
        while let Some(s) = self.next_segment(deadline)? {
            if s.flags & flags::RST != 0 {
                self.peer_rst = true;
                break;
            }
            if s.seq != self.rcv_nxt {
                // A retransmission or a gap: acknowledge what this client has.
                self.segment(flags::ACK, &[], &[])?;
                continue;
            }
            self.rcv_nxt = self.rcv_nxt.wrapping_add(s.payload.len() as u32);
            data.extend_from_slice(&s.payload);
            if s.flags & flags::FIN != 0 {
                self.rcv_nxt = self.rcv_nxt.wrapping_add(1);
                self.peer_fin = true;
            }
            if !s.payload.is_empty() || self.peer_fin {
                self.segment(flags::ACK, &[], &[])?;
            }
            if self.peer_fin || (!data.is_empty() && s.flags & flags::PSH != 0) {
                break;
            }
        }
        Ok(data)
    }

    /// Resets the connection (RST, the server's socket closes at once).
    pub fn reset(mut self) -> io::Result<()> {
        self.done = true;
        self.segment(flags::RST | flags::ACK, &[], &[])
    }

    /// Closes the connection with a FIN and waits up to `timeout` for the server's FIN (which
    /// it sends once its app closes), then acknowledges it.
    pub fn close(mut self, timeout: Duration) -> io::Result<()> {
        self.done = true;
        self.segment(flags::FIN | flags::ACK, &[], &[])?;
        self.snd_nxt = self.snd_nxt.wrapping_add(1);
        let deadline = Instant::now() + timeout;
        while !self.peer_fin && !self.peer_rst && Instant::now() < deadline {
            self.recv(deadline.saturating_duration_since(Instant::now()))?;
        }
        if self.peer_fin {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no FIN from {}", self.dst),
            ))
        }
    }

    /// Sends one segment with `tcp_flags`, `options` and `payload` at the current sequence
    /// numbers.
    fn segment(&self, tcp_flags: u8, options: &[u8], payload: &[u8]) -> io::Result<()> {
        assert!(options.len() <= 40, "at most 40 bytes of TCP options");
        let mut options = options.to_vec();
        options.resize(options.len().div_ceil(4) * 4, 0);
        let mut frame = Frame::tcp(self.src, self.dst, tcp_flags).payload(payload);
        frame.seq = self.snd_nxt;
        frame.ack = if tcp_flags & flags::ACK != 0 {
            self.rcv_nxt
        } else {
            0
        };
        frame.tcp_options = options;
        let packet = &frame.build()[ETH_LEN..];
        let to = SockAddr::from(SocketAddrV4::new(*self.dst.ip(), 0));
        self.send.send_to(packet, &to).map(drop)
    }

    /// The server's next segment to this client, or `None` at `deadline`.
    fn next_segment(&self, deadline: Instant) -> io::Result<Option<Segment>> {
        let mut buf = [MaybeUninit::<u8>::uninit(); 65_536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.recv.set_read_timeout(Some(left))?;
            let n = match self.recv.recv(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None);
                }
                Err(e) => return Err(e),
            };
            // SAFETY: the kernel wrote the first `n` bytes.
            let packet: Vec<u8> = buf[..n]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .collect();
            if let Some(s) = self.parse(&packet) {
                return Ok(Some(s));
            }
        }
    }

    /// `packet` (an IPv4 packet) as a segment of this connection from the server, if it is one.
    fn parse(&self, packet: &[u8]) -> Option<Segment> {
        let ihl = usize::from(*packet.first()? & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([*packet.get(2)?, *packet.get(3)?]));
        let tcp = packet.get(ihl..total.min(packet.len()))?;
        let src_ip = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
        let dst_ip = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
        if tcp.len() < 20 || packet[9] != libc::IPPROTO_TCP as u8 {
            return None;
        }
        let port = |at: usize| u16::from_be_bytes([tcp[at], tcp[at + 1]]);
        let from = SocketAddrV4::new(src_ip, port(0));
        let to = SocketAddrV4::new(dst_ip, port(2));
        if from != self.dst || to != self.src {
            return None;
        }
        let word = |at: usize| u32::from_be_bytes([tcp[at], tcp[at + 1], tcp[at + 2], tcp[at + 3]]);
        let doff = usize::from(tcp[12] >> 4) * 4;
        Some(Segment {
            flags: tcp[13],
            seq: word(4),
            ack: word(8),
            payload: tcp.get(doff..)?.to_vec(),
        })
    }
}

impl Drop for RawTcpClient {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.segment(flags::RST | flags::ACK, &[], &[]);
        }
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.ns, "nft", "delete", "table", "ip"])
            .arg(table_name(self.src))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The nftables table of the client at `src`.
fn table_name(src: SocketAddrV4) -> String {
    format!("rawtcp_{}", src.port())
}

/// An initial sequence number that differs from run to run.
fn initial_sequence() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    nanos.wrapping_mul(2_654_435_761)
}
