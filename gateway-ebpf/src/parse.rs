//! Header parsing with one bounds-checked accessor. Offsets come from the headers themselves
//! (`ihl`, `doff`), never from constants.

use gateway_common::{DropReason, maps::FlowKey4};

pub const ETH_LEN: usize = 14;
pub const IPV4_MIN_LEN: usize = 20;
pub const TCP_MIN_LEN: usize = 20;
const ETH_P_IPV4: u16 = 0x0800;
pub const IPPROTO_TCP: u8 = 6;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// The packet's directly accessible bytes, `data..data_end`, and its whole length (larger
/// for an skb whose payload sits in pages).
#[derive(Clone, Copy)]
pub struct Bounds {
    pub data: usize,
    pub data_end: usize,
    pub len: usize,
}

impl Bounds {
    /// A pointer to a `T` at `offset`, if the whole `T` lies inside the packet.
    #[inline(always)]
    pub fn ptr_at<T>(&self, offset: usize) -> Option<*mut T> {
        let start = self.data + offset;
        if start + core::mem::size_of::<T>() > self.data_end {
            return None;
        }
        Some(start as *mut T)
    }

    /// Reads a `T` at `offset` (unaligned), if it lies inside the packet.
    #[inline(always)]
    pub fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        // SAFETY: `ptr_at` checked that the whole `T` is inside the packet.
        self.ptr_at::<T>(offset)
            .map(|p| unsafe { core::ptr::read_unaligned(p) })
    }
}

/// A TCP/IPv4 packet addressed to one of the gateway's addresses.
#[derive(Clone, Copy)]
pub struct TcpPacket {
    /// Offset of the IPv4 header.
    pub l3_off: usize,
    /// Offset of the TCP header (`l3_off + ihl * 4`).
    pub l4_off: usize,
    /// The 5-tuple as it arrived (network order).
    pub key: FlowKey4,
    /// TCP flags byte.
    pub flags: u8,
    /// IPv4 total length (host order): the L3 bytes counted in statistics.
    pub l3_len: u16,
    /// What the destination address is: `ADDR_PUBLIC` / `ADDR_SNAT` bits.
    pub addr_kind: u32,
}

/// What the parser found.
pub enum Parsed {
    /// Not IPv4, or not to a gateway address, or not TCP: hand to the kernel unchanged.
    NotOurs,
    /// TCP to a gateway address.
    Tcp(TcpPacket),
}

/// Parses Ethernet/IPv4/TCP. `addr_kind` tells whether an IPv4 destination is one of the
/// gateway's addresses (0: no).
#[inline(always)]
pub fn parse(b: &Bounds, addr_kind: impl FnOnce(u32) -> u32) -> Result<Parsed, DropReason> {
    // A frame too short for Ethernet claims nothing: the kernel drops it.
    let Some(ether_type) = b.read::<[u8; 2]>(12) else {
        return Ok(Parsed::NotOurs);
    };
    if u16::from_be_bytes(ether_type) != ETH_P_IPV4 {
        return Ok(Parsed::NotOurs);
    }
    let l3_off = ETH_LEN;
    let ip: [u8; IPV4_MIN_LEN] = b.read(l3_off).ok_or(DropReason::Truncated)?;
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < IPV4_MIN_LEN {
        return Err(DropReason::BadHeader);
    }
    let dst_ip = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
    let kind = addr_kind(dst_ip);
    if kind == 0 {
        return Ok(Parsed::NotOurs);
    }
    // The options, if any, must be there too.
    if b.data + l3_off + ihl > b.data_end {
        return Err(DropReason::Truncated);
    }
    // Fragments: more-fragments set or a non-zero offset. Policy: not reassembled, dropped.
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    if frag & 0x3fff != 0 {
        return Err(DropReason::Fragment);
    }
    if ip[9] != IPPROTO_TCP {
        return Ok(Parsed::NotOurs);
    }
    let l4_off = l3_off + ihl;
    let tcp: [u8; TCP_MIN_LEN] = b.read(l4_off).ok_or(DropReason::Truncated)?;
    let doff = usize::from(tcp[12] >> 4) * 4;
    let l3_len = u16::from_be_bytes([ip[2], ip[3]]);
    if doff < TCP_MIN_LEN
        || usize::from(l3_len) < ihl + doff
        || usize::from(l3_len) > b.len - l3_off
    {
        return Err(DropReason::BadHeader);
    }
    Ok(Parsed::Tcp(TcpPacket {
        l3_off,
        l4_off,
        key: FlowKey4 {
            src_ip: u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
            dst_ip,
            src_port: u16::from_ne_bytes([tcp[0], tcp[1]]),
            dst_port: u16::from_ne_bytes([tcp[2], tcp[3]]),
            proto: IPPROTO_TCP,
            _pad: [0; 3],
        },
        flags: tcp[13],
        l3_len,
        addr_kind: kind,
    }))
}
