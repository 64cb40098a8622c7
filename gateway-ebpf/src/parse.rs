//! Header parsing with one bounds-checked accessor. Offsets come from the headers themselves
//! (`ihl`, `doff`), never from constants.

use aya_ebpf::cty::c_void;
use gateway_common::{
    DropReason,
    maps::{FlowKey4, TCP_MAX_WSCALE},
    net::{
        IPPROTO_ICMP, IPPROTO_TCP, icmp,
        tcp_flags::{FIN, SYN},
    },
};

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

    /// [`Bounds::ptr_at`] with a check LLVM cannot drop or detach from the access. Verifier
    /// workaround: when an earlier check already implies this one (a header length checked at
    /// parse time, a loop's bound), LLVM removes it, or checks one register and reads through
    /// another it computes again from a different base; the verifier cannot relate either to
    /// the access and refuses it. Volatile loads of the end and of the pointer itself keep the
    /// check, on the very value that is returned.
    /// The offset goes through a volatile load too: LLVM would otherwise fold a constant of
    /// it (`len - 1`) into the pointer, and the verifier refuses negative constant offsets.
    #[inline(always)]
    pub fn ptr_at_checked<T>(&self, offset: usize) -> Option<*mut T> {
        // SAFETY: reading a local.
        let start = self.data + unsafe { core::ptr::read_volatile(&offset) };
        // SAFETY: reading a field of `self` and a local.
        let (start, data_end) = unsafe {
            (
                core::ptr::read_volatile(&start),
                core::ptr::read_volatile(&self.data_end),
            )
        };
        if start + core::mem::size_of::<T>() > data_end {
            return None;
        }
        Some(start as *mut T)
    }

    /// [`Bounds::words`] with a check LLVM cannot drop (see [`Bounds::ptr_at_checked`]).
    #[inline(always)]
    pub fn words_checked<const N: usize>(&self, offset: usize) -> Option<*mut [u16; N]> {
        self.ptr_at_checked::<[u16; N]>(offset)
    }
}

/// The wire bytes `[w0 low, w0 high, w1 low, w1 high]` as a `u32` of the same memory layout
/// (an IPv4 address in "network order" as the maps hold it).
#[inline(always)]
pub fn join(w0: u16, w1: u16) -> u32 {
    u32::from(w0) | (u32::from(w1) << 16)
}

/// A TCP/IPv4 packet addressed to one of the gateway's addresses. Its IPv4 header starts at
/// [`ETH_LEN`] (no VLAN tag is looked at).
#[derive(Clone, Copy)]
pub struct TcpPacket {
    /// IPv4 header length (`ihl * 4`, bytes: 20..=60). Read through [`TcpPacket::ihl`].
    ihl: u8,
    /// The 5-tuple as it arrived (network order).
    pub key: FlowKey4,
    /// TCP flags byte (`gateway_common::net::tcp_flags` bits).
    pub flags: u8,
    /// IPv4 TTL.
    pub ttl: u8,
    /// IPv4 total length (host order): the L3 bytes counted in statistics.
    pub l3_len: u16,
    /// What the destination address is: `ADDR_PUBLIC` / `ADDR_SNAT` bits.
    pub addr_kind: u32,
    /// Sequence number (host order).
    pub seq: u32,
    /// Acknowledgement number (host order; meaningful with ACK).
    pub ack: u32,
    /// Window field as sent (host order, not scaled).
    pub window: u16,
    /// TCP header length (`doff * 4`, bytes).
    pub tcp_len: u16,
}

impl TcpPacket {
    /// Bytes of payload.
    #[inline(always)]
    pub fn payload_len(&self) -> u32 {
        u32::from(self.l3_len) - self.ihl() as u32 - u32::from(self.tcp_len)
    }

    /// The sequence number after this segment: `seq` + payload, plus one for a SYN and one
    /// for a FIN (each takes a sequence number).
    #[inline(always)]
    pub fn end(&self) -> u32 {
        self.seq
            .wrapping_add(self.payload_len())
            .wrapping_add(u32::from(self.flags & SYN != 0))
            .wrapping_add(u32::from(self.flags & FIN != 0))
    }

    /// The IPv4 header length (bytes).
    #[inline(always)]
    pub fn ihl(&self) -> usize {
        // Verifier workaround: LLVM keeps this packet's small fields packed in one register
        // and takes them out with shifts, which leaves the verifier without a bound on the
        // offset it then adds to a packet pointer. A volatile one-byte load keeps it 0..=255.
        // SAFETY: reading a field of `self`.
        usize::from(unsafe { core::ptr::read_volatile(&self.ihl) })
    }

    /// Offset of the TCP header.
    #[inline(always)]
    pub fn l4_off(&self) -> usize {
        ETH_LEN + self.ihl()
    }
}

/// An ICMP error (`gateway_common::net::icmp::is_error`) to one of the gateway's addresses,
/// its IPv4 header at [`ETH_LEN`]; what it quotes is read by `icmp`.
#[derive(Clone, Copy)]
pub struct IcmpPacket {
    /// IPv4 header length (bytes: 20..=60). Read through [`IcmpPacket::ihl`].
    ihl: u8,
    /// ICMP type and code.
    pub kind: u8,
    pub code: u8,
    /// IPv4 TTL.
    pub ttl: u8,
    /// IPv4 total length (host order).
    pub l3_len: u16,
    /// Source and destination addresses (network order).
    pub src_ip: u32,
    pub dst_ip: u32,
}

impl IcmpPacket {
    /// The IPv4 header length (bytes); see [`TcpPacket::ihl`] for why it is read so.
    #[inline(always)]
    pub fn ihl(&self) -> usize {
        // SAFETY: reading a field of `self`.
        usize::from(unsafe { core::ptr::read_volatile(&self.ihl) })
    }

    /// Offset of the ICMP header.
    #[inline(always)]
    pub fn l4_off(&self) -> usize {
        ETH_LEN + self.ihl()
    }
}

/// What the parser found.
pub enum Parsed {
    /// Not IPv4, or not to a gateway address, or neither TCP nor an ICMP error: hand to the
    /// kernel unchanged.
    NotOurs,
    /// TCP to a gateway address.
    Tcp(TcpPacket),
    /// An ICMP error to a gateway address.
    Icmp(IcmpPacket),
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
    let l4_off = l3_off + ihl;
    let l3_len = u16::from_be(ip[1]);
    // Byte 9 of the header: the high half of word 4.
    let proto = (ip[4] >> 8) as u8;
    if proto == IPPROTO_ICMP {
        // An error's header and the quoted IPv4 header's first bytes at least, or not an error
        // the gateway relays (the kernel has it, as it has every other ICMP message).
        let Some(head) = b.words::<1>(l4_off) else {
            return Ok(Parsed::NotOurs);
        };
        // SAFETY: bounds-checked by `words`.
        let head = unsafe { (*head)[0] };
        let (kind, code) = (head as u8, (head >> 8) as u8);
        if !icmp::is_error(kind)
            || usize::from(l3_len) < ihl + icmp::HEADER_LEN
            || usize::from(l3_len) > b.len - l3_off
        {
            return Ok(Parsed::NotOurs);
        }
        return Ok(Parsed::Icmp(IcmpPacket {
            ihl: ihl as u8,
            kind,
            code,
            ttl: ip[4] as u8,
            l3_len,
            src_ip: join(ip[6], ip[7]),
            dst_ip,
        }));
    }
    if proto != IPPROTO_TCP {
        return Ok(Parsed::NotOurs);
    }
    let tcp = b
        .words::<{ TCP_MIN_LEN / 2 }>(l4_off)
        .ok_or(DropReason::Truncated)?;
    let tcp = unsafe { &*tcp };
    // Bytes 12 (data offset) and 13 (flags): word 6.
    let doff = usize::from((tcp[6] as u8) >> 4) * 4;
    let flags = (tcp[6] >> 8) as u8;
    if doff < TCP_MIN_LEN
        || usize::from(l3_len) < ihl + doff
        || usize::from(l3_len) > b.len - l3_off
    {
        return Err(DropReason::BadHeader);
    }
    Ok(Parsed::Tcp(TcpPacket {
        ihl: ihl as u8,
        key: FlowKey4::new(join(ip[6], ip[7]), dst_ip, tcp[0], tcp[1]),
        flags,
        // Byte 8 of the header: the low half of word 4.
        ttl: ip[4] as u8,
        l3_len,
        addr_kind: kind,
        seq: u32::from_be(join(tcp[2], tcp[3])),
        ack: u32::from_be(join(tcp[4], tcp[5])),
        window: u16::from_be(tcp[7]),
        tcp_len: doff as u16,
    }))
}

/// TCP option kinds (RFC 9293 §3.1, RFC 7323 §2.2).
const OPT_END: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_MSS: u8 = 2;
const OPT_WSCALE: u8 = 3;
/// The most option bytes a TCP header holds.
pub const OPTIONS_MAX: usize = 40;

/// Loads packet bytes into a buffer: what the attach mode's helper does
/// (`bpf_xdp_load_bytes`, `bpf_skb_load_bytes`).
pub trait LoadBytes {
    /// Copies `len` bytes (1..=`buf.len()`) at `offset` of the packet into `buf`; false if
    /// the packet is shorter.
    fn load_bytes(&self, offset: usize, buf: &mut [u8; OPTIONS_MAX], len: usize) -> bool;
}

/// The window scale shift a SYN or SYN-ACK offers (option kind 3, length 3), capped at 14 as
/// RFC 7323 §2.3 says; `None` without one (see [`find_option`] for how options are read).
#[inline(always)]
pub fn window_scale(load: &impl LoadBytes, pkt: &TcpPacket) -> Option<u8> {
    let (options, len) = options(load, pkt)?;
    let at = find_option(&options, len, OPT_WSCALE, 3)?;
    let shift = *options.get(at + 2)?;
    Some(if shift > TCP_MAX_WSCALE {
        TCP_MAX_WSCALE
    } else {
        shift
    })
}

/// The MSS a SYN announces (option kind 2, length 4; RFC 9293 §3.7.1); `None` without one.
#[inline(always)]
pub fn mss(load: &impl LoadBytes, pkt: &TcpPacket) -> Option<u16> {
    mss_field(load, pkt.l4_off(), usize::from(pkt.tcp_len)).map(|(_, mss)| mss)
}

/// The MSS option of the TCP header of `tcp_len` bytes at `l4_off` (see [`mss`]): the offset
/// of its value in the packet, and the value (host order). For what rewrites it (the MSS
/// clamp, `mss`).
#[inline(always)]
pub fn mss_field(load: &impl LoadBytes, l4_off: usize, tcp_len: usize) -> Option<(usize, u16)> {
    let (options, len) = options_at(load, l4_off, tcp_len)?;
    let at = find_option(&options, len, OPT_MSS, 4)?;
    let value = u16::from_be_bytes([*options.get(at + 2)?, *options.get(at + 3)?]);
    Some((l4_off + TCP_MIN_LEN + at + 2, value))
}

/// The TCP options of `pkt` and their length (1..=40) (see [`options_at`]).
#[inline(always)]
fn options(load: &impl LoadBytes, pkt: &TcpPacket) -> Option<([u8; OPTIONS_MAX], usize)> {
    options_at(load, pkt.l4_off(), usize::from(pkt.tcp_len))
}

/// The TCP options of the header of `tcp_len` bytes at `l4_off` and their length (1..=40),
/// copied out of the packet (`load`): walking them in place with their variable strides was
/// more than the verifier follows once inlined into the SYN path. `None` without options.
#[inline(always)]
fn options_at(
    load: &impl LoadBytes,
    l4_off: usize,
    tcp_len: usize,
) -> Option<([u8; OPTIONS_MAX], usize)> {
    let len = tcp_len.saturating_sub(TCP_MIN_LEN);
    // Verifier workaround: the helper needs a length the verifier knows is 1..=40; LLVM
    // otherwise drops this check (the parse already bounds `tcp_len`) on the way there.
    // SAFETY: reading a local.
    let len = unsafe { core::ptr::read_volatile(&len) };
    if len == 0 || len > OPTIONS_MAX {
        return None;
    }
    let mut options = [0u8; OPTIONS_MAX];
    if !load.load_bytes(l4_off + TCP_MIN_LEN, &mut options, len) {
        return None;
    }
    Some((options, len))
}

/// Where the first option of `kind` with length `size` starts in the first `len` bytes of
/// `options`, read as the endpoints' TCP reads them (Linux's `tcp_parse_options`): a malformed
/// option (a length below 2, or past the header) ends the walk, and an option read before it
/// stands. One difference: of two options of a kind the first counts here, the last in Linux
/// (kept from when the walk was inlined and walking on was more than the verifier followed; as
/// a `bpf_loop` callback it could walk on); only a client that sends two hurts, its own
/// connection.
#[inline(always)]
pub fn find_option(
    options: &[u8; OPTIONS_MAX],
    len: usize,
    kind: u8,
    size: usize,
) -> Option<usize> {
    let mut walk = OptionWalk {
        options: options as *const [u8; OPTIONS_MAX],
        len: len as u32,
        kind: u32::from(kind),
        size: size as u32,
        at: 0,
        found: NO_OPTION,
    };
    // SAFETY: the helper calls `option_step` at most `OPTIONS_MAX` times with `walk`, which
    // outlives the call; every step consumes at least one byte, so that many steps suffice.
    unsafe {
        aya_ebpf::helpers::bpf_loop(
            OPTIONS_MAX as u32,
            option_step as *mut c_void,
            (&mut walk as *mut OptionWalk).cast(),
            0,
        )
    };
    match walk.found {
        NO_OPTION => None,
        at => Some(at as usize),
    }
}

/// What [`option_step`] leaves in [`OptionWalk::found`] when there is no such option.
const NO_OPTION: u32 = u32::MAX;

/// The state of [`find_option`]'s walk, shared with each step.
#[repr(C)]
struct OptionWalk {
    options: *const [u8; OPTIONS_MAX],
    len: u32,
    kind: u32,
    size: u32,
    /// Where the next option starts.
    at: u32,
    /// Where the option found starts, or [`NO_OPTION`].
    found: u32,
}

/// One step of [`find_option`]'s walk, called by `bpf_loop` (0: go on; 1: stop). Verifier
/// workaround: a loop of up to 40 steps inlined in the SYN path was walked by the verifier for
/// every state that reached it (about 14% of the programs' million-instruction budget for the
/// MSS clamp's walk alone); a `bpf_loop` callback is verified once, and the kernel inlines the
/// loop since Linux 6.0.
#[inline(never)]
fn option_step(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `find_option`'s walk, for the duration of the helper's call.
    let walk = unsafe { &mut *ctx.cast::<OptionWalk>() };
    // SAFETY: as above; the buffer outlives the walk.
    let options = unsafe { &*walk.options };
    let at = walk.at as usize;
    let len = walk.len as usize;
    if at >= len {
        return 1;
    }
    let Some(&k) = options.get(at) else {
        return 1;
    };
    if k == OPT_END {
        return 1;
    }
    if k == OPT_NOP {
        walk.at += 1;
        return 0;
    }
    let Some(&n) = options.get(at + 1) else {
        return 1;
    };
    let n = usize::from(n);
    if n < 2 || at + n > len {
        return 1;
    }
    if u32::from(k) == walk.kind && n as u32 == walk.size {
        walk.found = at as u32;
        return 1;
    }
    walk.at += n as u32;
    0
}
