//! Conntrack ([`super::CONNTRACK4`]): a key per direction of a connection and the entry that
//! says how to rewrite its packets.

use core::net::SocketAddrV4;

use bytemuck::{Pod, Zeroable};

use crate::net::{IPPROTO_TCP, ip_to_net, port_to_net, socket_from_net};

/// Key of [`super::CONNTRACK4`]: a TCP 5-tuple as it arrives at the gateway.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKey4 {
    /// Source address (network order).
    pub src_ip: u32,
    /// Destination address (network order).
    pub dst_ip: u32,
    /// Source port (network order).
    pub src_port: u16,
    /// Destination port (network order).
    pub dst_port: u16,
    /// IP protocol ([`IPPROTO_TCP`]).
    pub proto: u8,
    /// Padding, zero. Two fields rather than `[u8; 3]`: the datapath builds a key per packet,
    /// and zeroing an unaligned 3-byte array compiles to a call of `memset` in BPF, a 1-byte
    /// and an aligned 2-byte field to two stores.
    pub _pad0: u8,
    pub _pad1: u16,
}

impl FlowKey4 {
    /// The key of a TCP packet `src_ip:src_port → dst_ip:dst_port`, every field in network
    /// order (as parsed from the wire), the padding zeroed. Every key is built here.
    #[inline(always)]
    pub const fn new(src_ip: u32, dst_ip: u32, src_port: u16, dst_port: u16) -> Self {
        FlowKey4 {
            src_ip,
            dst_ip,
            src_port,
            dst_port,
            proto: IPPROTO_TCP,
            _pad0: 0,
            _pad1: 0,
        }
    }

    /// The key of a TCP packet `src → dst` (addresses and ports in host terms).
    pub const fn from_addrs(src: SocketAddrV4, dst: SocketAddrV4) -> Self {
        FlowKey4::new(
            ip_to_net(*src.ip()),
            ip_to_net(*dst.ip()),
            port_to_net(src.port()),
            port_to_net(dst.port()),
        )
    }

    /// The slot of an app's Maglev table a new flow of this key tries first: the shared flow
    /// hash ([`crate::flow_hash4`]) modulo [`super::MAGLEV_SIZE`]. The next
    /// [`super::MAGLEV_PROBES`]` - 1` slots follow, wrapping, when its backend does not accept.
    #[inline(always)]
    pub const fn maglev_slot(&self) -> u32 {
        crate::flow_hash4(self.src_ip, self.dst_ip, self.src_port, self.dst_port)
            % super::MAGLEV_SIZE
    }

    /// The packet's source.
    pub const fn src(&self) -> SocketAddrV4 {
        socket_from_net(self.src_ip, self.src_port)
    }

    /// The packet's destination.
    pub const fn dst(&self) -> SocketAddrV4 {
        socket_from_net(self.dst_ip, self.dst_port)
    }
}

/// [`Flow::direction`]: client → backend entry (key: client → public).
pub const DIR_FORWARD: u8 = 0;
/// [`Flow::direction`]: backend → client entry (key: backend → SNAT).
pub const DIR_REVERSE: u8 = 1;

// Conntrack state bits ([`Flow::state`]): what the connection has been through. Not the TCP
// header's flags, which are `crate::net::tcp_flags`.

/// [`Flow::state`] bit: the client's SYN was seen.
pub const CT_SYN_SEEN: u8 = 1;
/// [`Flow::state`] bit: the backend's SYN-ACK was seen.
pub const CT_SYN_ACK_SEEN: u8 = 2;
/// [`Flow::state`] bit: the client acknowledged the SYN-ACK (established).
pub const CT_ESTABLISHED: u8 = 4;
/// [`Flow::state`] bit: the client sent FIN.
pub const CT_FIN_FORWARD: u8 = 8;
/// [`Flow::state`] bit: the backend sent FIN.
pub const CT_FIN_REVERSE: u8 = 16;
/// [`Flow::state`] bit: either side sent RST.
pub const CT_RST: u8 = 32;
/// [`Flow::state`] bit: the backend sent its FIN before the client's (set with
/// [`CT_FIN_REVERSE`]). The backend's TCP then closes actively and keeps the connection's
/// 4-tuple on its side (its address and port, the SNAT address and port) in TIME_WAIT for
/// [`TIME_WAIT_NS`] (RFC 9293 §3.6.1): a new connection on that SNAT port toward it before then
/// would meet the old one (a bare ACK for its SYN, or nothing with `tcp_rfc1337`).
pub const CT_BACKEND_CLOSED_FIRST: u8 = 64;

/// How long a backend that closed first holds the 4-tuple in TIME_WAIT: Linux's
/// `TCP_TIMEWAIT_LEN` (60 s; RFC 9293 allows 2·MSL, up to 4 min). A SNAT port is not reused
/// toward it before then ([`CT_BACKEND_CLOSED_FIRST`]).
pub const TIME_WAIT_NS: u64 = 60_000_000_000;

/// Value of [`super::CONNTRACK4`]: how to rewrite a packet of this flow and where to send it.
/// Both entries of a connection carry the same `state` bits (a FIN or RST updates both).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Flow {
    /// New source address (network order): SNAT address (forward) or public address (reverse).
    pub nat_src_ip: u32,
    /// New destination address (network order): backend (forward) or client (reverse).
    pub nat_dst_ip: u32,
    /// New source port (network order).
    pub nat_src_port: u16,
    /// New destination port (network order).
    pub nat_dst_port: u16,
    /// The app (index of [`super::APP_STATS`]).
    pub app_id: u32,
    /// The backend (index of [`super::BACKENDS4`] and [`super::BACKEND_STATS`]).
    pub backend_id: u32,
    /// [`DIR_FORWARD`] or [`DIR_REVERSE`].
    pub direction: u8,
    /// `CT_*` bits.
    pub state: u8,
    pub _pad: [u8; 2],
    /// When the flow was created (`bpf_ktime_get_coarse_ns`, CLOCK_MONOTONIC_COARSE ns).
    pub created_ns: u64,
    /// When a packet last went through this entry (ns, refreshed at most every
    /// [`LAST_SEEN_GRANULARITY_NS`]).
    pub last_seen_ns: u64,
    /// When the next hop below was resolved (ns); 0: not resolved.
    pub nexthop_ns: u64,
    /// Egress interface index of the next hop.
    pub nexthop_ifindex: u32,
    /// Source MAC toward the next hop.
    pub nexthop_smac: [u8; 6],
    /// Destination MAC of the next hop.
    pub nexthop_dmac: [u8; 6],
    /// Packets through this entry (approximate under concurrent updates).
    pub packets: u64,
    /// Bytes (L3) through this entry (approximate under concurrent updates).
    pub bytes: u64,
    // Sequence tracking of the sender of this entry's packets (the client for a forward entry,
    // the backend for a reverse one), as netfilter's `tcp_in_window` keeps it per direction
    // (`td_end`, `td_maxack`, `td_maxwin`). Host order; sequence arithmetic is modulo 2^32.
    /// The highest `seq + len` this side has sent (`len`: payload bytes, plus one for a SYN
    /// and one for a FIN).
    pub seq_end: u32,
    /// The highest acknowledgement number this side has sent (valid with [`TRACK_ACK_SEEN`]).
    pub ack_max: u32,
    /// The largest window this side has advertised, in bytes: scaled by `wscale`, except the
    /// windows of SYN and SYN-ACK segments, which are never scaled (RFC 7323).
    pub win_max: u32,
    /// This side's window scale shift, 0..=[`TCP_MAX_WSCALE`]; 0 unless both the SYN and the
    /// SYN-ACK offered scaling (until the SYN-ACK, a forward entry keeps its SYN's offer here,
    /// with [`TRACK_WSCALE_OFFERED`]).
    pub wscale: u8,
    /// The other side's shift, by the same rule: it bounds how far this side's sequence
    /// numbers may move ([`max_window`]).
    pub peer_wscale: u8,
    /// `TRACK_*` bits.
    pub track: u8,
    /// `TOA_*` bits (both entries): what the datapath does to the client's segments while the
    /// backend has not shown its end of the connection established (the client's address,
    /// `crate::net::toa`). 0 in entries made before it existed (the field was padding).
    pub toa: u8,
    /// A proxied flow ([`TRACK_PROXIED`]): the backend's ISN less the cookie the gateway gave
    /// the client as its own (host order, modulo 2^32). The backend's sequence numbers are the
    /// client's view plus this: its segments' `seq` lose it on the way to the client, the
    /// client's `ack` gain it on the way to the backend. Both entries hold it; 0 otherwise.
    pub seq_delta: u32,
    /// A proxied flow's MSS, the cookie's (host order): its SYN to the backend carries it, and
    /// carries it again if the backend has not answered when the client's next segment comes.
    /// 0 otherwise.
    pub proxy_mss: u16,
    pub _pad2: u16,
}

/// [`Flow::track`] bit: `ack_max` holds an acknowledgement this side sent.
pub const TRACK_ACK_SEEN: u8 = 1;
/// [`Flow::track`] bit: this side's SYN (or SYN-ACK) carried a window scale option.
pub const TRACK_WSCALE_OFFERED: u8 = 2;
/// [`Flow::track`] bit: the entry was carried over from a table without sequence tracking (an
/// upgrade): its fields are learned from its next packet, and its bounds are the widest
/// (both shifts taken as [`TCP_MAX_WSCALE`]).
pub const TRACK_LIBERAL: u8 = 4;
/// [`Flow::track`] bit (both entries): the flow was made from a SYN cookie's ACK, the gateway
/// doing the handshake with the backend itself (a SYN proxy, `crate::syncookie`). The backend's
/// numbers are translated by [`Flow::seq_delta`] once its SYN-ACK came; the sequence tracking
/// of both entries is kept in the client's view.
pub const TRACK_PROXIED: u8 = 8;

/// [`Flow::toa`] bit: the backend has not yet sent a segment that shows its end of the
/// connection made (data, a FIN, or an acknowledgement of more than the SYN), so that end may
/// still be made by any segment of the client's (the handshake's ACK, or a later one if that
/// was lost): every one of them loses the TOA options it carries (`crate::net::toa`: a client
/// never chooses the address an app is told), and gets the gateway's with [`TOA_ADD`]. Set on
/// both entries of a new flow; cleared on both by the first such segment of the backend's (a
/// socket in SYN-RECV sends none: only SYN-ACKs, and bare ACKs of the SYN; `toa` in the
/// datapath).
pub const TOA_PENDING: u8 = 1;
/// [`Flow::toa`] bit: the flow's app had [`super::APP_CLIENT_ADDRESS_TOA`] at its SYN: the
/// client's segments get a TOA option with its address while [`TOA_PENDING`].
pub const TOA_ADD: u8 = 2;

/// The largest window scale shift (RFC 7323 §2.3).
pub const TCP_MAX_WSCALE: u8 = 14;

/// The largest window a side with scale `shift` can advertise, in bytes: `65535 << shift`.
#[inline(always)]
pub const fn max_window(shift: u8) -> u32 {
    let shift = if shift > TCP_MAX_WSCALE {
        TCP_MAX_WSCALE
    } else {
        shift
    };
    65_535 << shift
}

/// `a` comes before `b` in sequence space (RFC 9293 §3.4: modulo 2^32).
#[inline(always)]
pub const fn seq_before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// `a` comes after `b` in sequence space.
#[inline(always)]
pub const fn seq_after(a: u32, b: u32) -> bool {
    seq_before(b, a)
}

impl Flow {
    /// The key of the other entry of this connection: the rewritten tuple, reversed. The same
    /// formula serves both directions because each entry stores the rewritten addresses.
    #[inline(always)]
    pub const fn peer_key(&self) -> FlowKey4 {
        FlowKey4::new(
            self.nat_dst_ip,
            self.nat_src_ip,
            self.nat_dst_port,
            self.nat_src_port,
        )
    }

    /// The new source of this entry's packets.
    pub const fn nat_src(&self) -> SocketAddrV4 {
        socket_from_net(self.nat_src_ip, self.nat_src_port)
    }

    /// The new destination of this entry's packets.
    pub const fn nat_dst(&self) -> SocketAddrV4 {
        socket_from_net(self.nat_dst_ip, self.nat_dst_port)
    }
}

/// Whether a connection with `state` bits is over (RST, or FIN both ways).
#[inline(always)]
pub const fn is_closed(state: u8) -> bool {
    let fins = CT_FIN_FORWARD | CT_FIN_REVERSE;
    state & CT_RST != 0 || state & fins == fins
}

/// `last_seen_ns` is refreshed at most this often, to keep established packets from writing
/// the entry's cache line every time.
pub const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_from_addresses_holds_wire_bytes_and_zero_padding() {
        let key = FlowKey4::from_addrs(
            "192.0.2.2:40000".parse().unwrap(),
            "203.0.113.10:20000".parse().unwrap(),
        );
        let bytes: [u8; 16] = bytemuck::cast(key);
        assert_eq!(
            bytes,
            [
                192, 0, 2, 2, 203, 0, 113, 10, 0x9c, 0x40, 0x4e, 0x20, 6, 0, 0, 0
            ]
        );
        assert_eq!(key.src(), "192.0.2.2:40000".parse().unwrap());
        assert_eq!(key.dst(), "203.0.113.10:20000".parse().unwrap());
    }

    #[test]
    fn sequence_numbers_compare_modulo_two_to_the_32() {
        assert!(seq_before(1, 2) && seq_after(2, 1));
        assert!(seq_before(u32::MAX, 0) && seq_after(0, u32::MAX));
        assert!(!seq_before(5, 5) && !seq_after(5, 5));
        assert!(seq_before(0, 0x7fff_ffff) && seq_after(0, 0x8000_0001));
        assert_eq!(max_window(0), 65_535);
        assert_eq!(max_window(14), 65_535 << 14);
        assert_eq!(max_window(15), 65_535 << 14, "shifts above 14 count as 14");
    }

    #[test]
    fn the_peer_key_is_the_rewritten_tuple_reversed() {
        let forward = Flow {
            nat_src_ip: ip_to_net(core::net::Ipv4Addr::new(198, 51, 100, 253)),
            nat_dst_ip: ip_to_net(core::net::Ipv4Addr::new(198, 51, 100, 2)),
            nat_src_port: port_to_net(40_000),
            nat_dst_port: port_to_net(8080),
            ..Flow::default()
        };
        assert_eq!(
            forward.peer_key(),
            FlowKey4::from_addrs(forward.nat_dst(), forward.nat_src())
        );
        assert_eq!(forward.nat_dst(), "198.51.100.2:8080".parse().unwrap());
    }
}
