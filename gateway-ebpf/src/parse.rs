//! Header parsing with one bounds-checked accessor. Offsets come from the headers themselves
//! (`ihl`, `doff`), never from constants.

use gateway_common::{DropReason, maps::FlowKey4, net::IPPROTO_TCP};

pub const ETH_LEN: usize = 14;
pub const IPV4_MIN_LEN: usize = 20;
pub const TCP_MIN_LEN: usize = 20;
const ETH_P_IPV4: u16 = 0x0800;

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

    /// The `N` 16-bit words at `offset`, if they lie inside the packet. `offset` must be even:
    /// packet data always starts at an even address (XDP's headroom, the skb's reserved
    /// space), so the words are 2-byte aligned and are read and written with 16-bit loads and
    /// stores; `read_unaligned` would split each into byte accesses (the BPF target has no
    /// misaligned access). Words hold the bytes as on the wire (little-endian target): the
    /// first byte is the low half.
    #[inline(always)]
    pub fn words<const N: usize>(&self, offset: usize) -> Option<*mut [u16; N]> {
        self.ptr_at::<[u16; N]>(offset)
    }
}

/// The wire bytes `[w0 low, w0 high, w1 low, w1 high]` as a `u32` of the same memory layout
/// (an IPv4 address in "network order" as the maps hold it).
#[inline(always)]
pub fn join(w0: u16, w1: u16) -> u32 {
    u32::from(w0) | (u32::from(w1) << 16)
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
    /// TCP flags byte (`gateway_common::net::tcp_flags` bits).
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
    let Some(eth) = b.words::<7>(0) else {
        return Ok(Parsed::NotOurs);
    };
    // SAFETY (every dereference of `eth`, `ip` and `tcp` below): bounds-checked by `words`.
    if u16::from_be(unsafe { (*eth)[6] }) != ETH_P_IPV4 {
        return Ok(Parsed::NotOurs);
    }
    let l3_off = ETH_LEN;
    let ip = b
        .words::<{ IPV4_MIN_LEN / 2 }>(l3_off)
        .ok_or(DropReason::Truncated)?;
    let ip = unsafe { &*ip };
    let version_ihl = ip[0] as u8;
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || ihl < IPV4_MIN_LEN {
        return Err(DropReason::BadHeader);
    }
    let dst_ip = join(ip[8], ip[9]);
    let kind = addr_kind(dst_ip);
    if kind == 0 {
        return Ok(Parsed::NotOurs);
    }
    // The options, if any, must be there too.
    if b.data + l3_off + ihl > b.data_end {
        return Err(DropReason::Truncated);
    }
    // Fragments: more-fragments set or a non-zero offset. Policy: not reassembled, dropped.
    let frag = u16::from_be(ip[3]);
    if frag & 0x3fff != 0 {
        return Err(DropReason::Fragment);
    }
    // Byte 9 of the header: the high half of word 4.
    if (ip[4] >> 8) as u8 != IPPROTO_TCP {
        return Ok(Parsed::NotOurs);
    }
    let l4_off = l3_off + ihl;
    let tcp = b
        .words::<{ TCP_MIN_LEN / 2 }>(l4_off)
        .ok_or(DropReason::Truncated)?;
    let tcp = unsafe { &*tcp };
    // Bytes 12 (data offset) and 13 (flags): word 6.
    let doff = usize::from((tcp[6] as u8) >> 4) * 4;
    let flags = (tcp[6] >> 8) as u8;
    let l3_len = u16::from_be(ip[1]);
    if doff < TCP_MIN_LEN
        || usize::from(l3_len) < ihl + doff
        || usize::from(l3_len) > b.len - l3_off
    {
        return Err(DropReason::BadHeader);
    }
    Ok(Parsed::Tcp(TcpPacket {
        l3_off,
        l4_off,
        key: FlowKey4::new(join(ip[6], ip[7]), dst_ip, tcp[0], tcp[1]),
        flags,
        l3_len,
        addr_kind: kind,
    }))
}
