//! The client's address for the backend (`gateway app create --client-address toa`,
//! docs/client-address.md): while a flow's backend has not shown its end of the connection
//! established (`TOA_PENDING`), each segment of the client's is given a TOA option
//! (`gateway_common::net::toa`: kind 254, length 8, the client's port and IPv4 address) if its
//! app asked for it (`TOA_ADD`), and loses every TOA option the client put there itself, in
//! every app: a client never chooses the address an app is told (the backend host's agent, or
//! its toa module, believes the option from a gateway's SNAT address). The backend's first
//! segment that shows its end established ends that (`shows_established`, `backend_seen`):
//! data, a FIN, or an acknowledgement beyond the SYN, none of which a socket in SYN-RECV sends
//! (it sends SYN-ACKs, and bare ACKs of the SYN to segments outside its window), so its end
//! was made by a segment that carried the option, whichever one it was (the handshake's ACK, or
//! the next segment if that ACK was lost).
//!
//! Done by the attach mode after the segment is translated, in a function of its own ([`MARK`],
//! [`apply`]), on a copy of its headers: the client's TOA options become NOPs (or the first
//! becomes the gateway's), an End of Option List and what follows it, or a malformed option's
//! bytes, become NOPs too (an endpoint's parser stops there, RFC 9293 §3.2: an option appended
//! after would not be read, and one hidden there would be by a laxer parser), and the
//! gateway's is appended after the last option. Appending grows the segment by 8 bytes: only
//! if its header has room (60 bytes at most, RFC 9293 §3.1) and the segment then still fits the
//! egress MTU (`bpf_check_mtu`), else it goes on without (`toa_skipped`). The MSS the client
//! learns from the SYN-ACK is lowered by 8 for such an app (`mss`), so its full-sized segments
//! fit with the option. XDP grows the frame at its head and moves the headers; TC grows the skb
//! at its tail and moves the payload, so that a CHECKSUM_PARTIAL skb's checksum offsets (from
//! the head) still point at the TCP header. The TCP checksum is updated by the difference of
//! what changed: the option bytes, the data offset, the pseudo-header's length (RFC 1624).

use aya_ebpf::cty::c_void;
use gateway_common::{
    DropReason, GlobalStat,
    maps::{APP_CLIENT_ADDRESS_TOA, Flow, FlowKey4, TOA_ADD, TOA_PENDING, seq_after},
    net::{
        tcp_flags::{ACK, FIN, RST, SYN},
        toa,
    },
};

use crate::{
    conntrack,
    csum::{self, diff16},
    maps::APP_CONFIG,
    parse::{Bounds, ETH_LEN, OPTIONS_MAX, TCP_MIN_LEN, TcpPacket, join},
    stats,
};

/// What an attach mode's packet function or's into a translated segment's marked action
/// ([`mark`], beside `mss::mark`'s bits): a segment of a client ([`gateway_common::maps::DIR_FORWARD`])
/// whose flow is [`TOA_PENDING`]; its `run` then hands the redirected segment to [`apply`] in
/// a function of its own. The actions marked are never 0 (a redirect, or a drop on a bad
/// ifindex), so no marked value is TC's ICMP sentinel (`i32::MIN`).
pub const MARK: u32 = 1 << 31;

/// `marked` (a translated segment's action, `mss::mark`ed) with [`MARK`] when the segment is a
/// client's (the forward entry `flow`) and its flow is [`TOA_PENDING`]. Arithmetic on values
/// live there anyway, no branch (see `mss::CLAMP`).
#[inline(always)]
pub fn mark(marked: u32, flow: &Flow) -> u32 {
    // `DIR_FORWARD` is 0, `DIR_REVERSE` 1; `TOA_PENDING` is bit 0.
    marked | ((u32::from(flow.toa & TOA_PENDING) & u32::from(!flow.direction & 1)) << 31)
}

/// The `Flow::toa` bits of a new flow of app `app_id`: [`TOA_PENDING`], and [`TOA_ADD`] if the
/// app has [`APP_CLIENT_ADDRESS_TOA`] now.
#[inline(always)]
pub fn flow_bits(app_id: u32) -> u8 {
    match APP_CONFIG.get(app_id) {
        Some(c) if c.flags & APP_CLIENT_ADDRESS_TOA != 0 => TOA_PENDING | TOA_ADD,
        _ => TOA_PENDING,
    }
}

/// Whether the backend's segment `pkt` (tracked, in its window; `acked`: the most it had
/// acknowledged before, its SYN-ACK's acknowledgement of the SYN at first) shows its end of the
/// connection established: data, a FIN, or an acknowledgement of more than it had. Not any
/// segment without SYN: a socket in SYN-RECV answers a segment outside its window (an old
/// sequence number, a PAWS failure) with a bare ACK of the SYN (Linux's `tcp_check_req`,
/// `tcp_v4_reqsk_send_ack`), and its listener answers a wrong acknowledgement with an RST,
/// both without leaving SYN-RECV: a client could make either happen, then send its own TOA
/// option on the ACK that does make the backend's end. An RST never shows it.
#[inline(always)]
pub fn shows_established(pkt: &TcpPacket, acked: u32) -> bool {
    pkt.flags & (SYN | RST) == 0
        && (pkt.flags & FIN != 0
            || pkt.payload_len() != 0
            || (pkt.flags & ACK != 0 && seq_after(pkt.ack, acked)))
}

/// The backend sent a segment that shows its end established ([`shows_established`]) on the
/// flow of the reverse entry `f`: its end is established; the client's segments go on untouched from now on (both
/// entries lose their `toa` bits).
#[inline(always)]
pub fn backend_seen(f: &mut Flow) {
    f.toa = 0;
    if let Some(peer) = conntrack::lookup(&f.peer_key()) {
        // SAFETY: a conntrack value pointer; a byte store (any CPU's will do).
        unsafe { (*peer).toa = 0 };
    }
}

/// The most bytes of headers [`apply`] copies out: Ethernet, IPv4 and TCP with the most options.
const HEADERS_MAX: usize = ETH_LEN + 60 + 60;
/// The copy of a segment's headers, with room for the option appended.
pub type Headers = [u8; HEADERS_MAX + 10];

/// What [`apply`] needs of the attach mode.
pub trait Packet {
    /// Whether the TCP checksum is written in the headers' copy (XDP: it is whole in the
    /// frame); else [`Packet::tcp_checksum`] updates it once the copy is stored (TC, through
    /// `bpf_l4_csum_replace`, which leaves a CHECKSUM_PARTIAL skb's field as its offload
    /// expects).
    const CHECKSUM_IN_HEADERS: bool;

    /// The packet's bounds now.
    fn bounds(&self) -> Bounds;
    /// Copies the packet's first `len` bytes into `h` (`len` from [`copy_len`]).
    fn load(&self, h: &mut Headers, len: u32) -> bool;
    /// Writes the first `len` bytes of `h` over the packet's (`len` from [`copy_len`]).
    fn store(&self, h: &Headers, len: u32) -> bool;
    /// Whether the packet can grow by 8 bytes toward `ifindex`: it then fits the device's MTU
    /// (and for TC, it is not GSO).
    fn can_grow(&self, ifindex: u32) -> bool;
    /// Makes the packet 8 bytes longer, with its bytes from `hdr_end` on 8 bytes further, and
    /// its first `hdr_end + 8` bytes undefined (the caller stores them). False if it could
    /// not, the packet unchanged; an error if it is left broken.
    fn grow(&self, hdr_end: usize) -> Result<bool, DropReason>;
    /// Adds `header` (a difference of TCP header bytes) and `pseudo` (of the pseudo-header's
    /// length) to the TCP checksum at `at`.
    fn tcp_checksum(&self, at: usize, header: u32, pseudo: u32) -> bool;
}

/// Gives the translated, redirected client segment in `p` its flow's TOA treatment (see the
/// module's docs): its client's TOA options out, the gateway's in with [`TOA_ADD`] (not in a
/// SYN, which only loses the client's). An RST, or a segment whose flow is no longer
/// [`TOA_PENDING`], is left as it is. An error
/// leaves the packet broken (it is dropped).
#[inline(always)]
pub fn apply<P: Packet>(p: &P) -> Result<(), DropReason> {
    let b = p.bounds();
    let ip = b.words::<10>(ETH_LEN).ok_or(DropReason::Truncated)?;
    // SAFETY: bounds-checked and aligned (see `Bounds::words`).
    let ip = unsafe { *ip };
    let ihl = usize::from(ip[0] as u8 & 0x0f) * 4;
    let l4_off = ETH_LEN + ihl;
    let tcp = b.words::<7>(l4_off).ok_or(DropReason::Truncated)?;
    // SAFETY: as above.
    let tcp = unsafe { *tcp };
    // Bytes 12 (data offset) and 13 (flags): word 6.
    let tcp_len = usize::from((tcp[6] as u8) >> 4) * 4;
    let flags = (tcp[6] >> 8) as u8;
    // A SYN-ACK is not a client's; an RST makes no connection. A SYN loses the client's TOA
    // options but gets none (nor does LVS or DPVS add it to a SYN): a backend with TCP Fast
    // Open makes its end of the connection from the SYN, and its agent believes no SYN's.
    if flags & RST != 0 || flags & (SYN | ACK) == SYN | ACK || tcp_len < TCP_MIN_LEN {
        return Ok(());
    }
    // Translated: SNAT → backend, the reverse entry's key reversed.
    let key = FlowKey4::new(join(ip[8], ip[9]), join(ip[6], ip[7]), tcp[1], tcp[0]);
    let Some(reverse) = conntrack::lookup(&key) else {
        return Ok(());
    };
    // SAFETY: a conntrack value pointer, read here.
    let reverse = unsafe { &*reverse };
    if reverse.toa & TOA_PENDING == 0 {
        return Ok(());
    }
    let add = reverse.toa & TOA_ADD != 0 && flags & SYN == 0;
    let hdr_end = l4_off + tcp_len;
    // Room for 8 more bytes in the header, and on the way out (the forward entry's hop).
    let can_grow = add
        && tcp_len + 8 <= 60
        && conntrack::lookup(&reverse.peer_key())
            // SAFETY: a conntrack value pointer, read here.
            .is_some_and(|f| p.can_grow(unsafe { (*f).nexthop_ifindex }));
    // The copy lives in the walk's state: a pointer to it there would reach the callback as a
    // number, not a pointer the verifier lets it use.
    let mut walk = Walk {
        headers: [0; HEADERS_MAX + 10],
        start: (l4_off + TCP_MIN_LEN) as u32,
        len: (tcp_len - TCP_MIN_LEN) as u32,
        at: 0,
        diff: 0,
        found: 0,
        placed: 0,
        add: u32::from(add),
        fill: 1,
        option: toa::option(reverse.nat_dst_ip, reverse.nat_dst_port),
    };
    if !p.load(&mut walk.headers, copy_len(hdr_end)?) {
        return Err(DropReason::Truncated);
    }
    if tcp_len > TCP_MIN_LEN {
        // SAFETY: the helper calls `step` at most `OPTIONS_MAX` times with `walk`, which
        // outlives the call; every step consumes at least one byte of at most 40.
        unsafe {
            aya_ebpf::helpers::bpf_loop(
                OPTIONS_MAX as u32,
                step as *mut c_void,
                (&mut walk as *mut Walk).cast(),
                0,
            )
        };
    }
    let append = add && walk.placed == 0 && can_grow;
    if add && walk.placed == 0 && !can_grow {
        stats::global(GlobalStat::ToaSkipped);
    }
    if !append && walk.found == 0 && walk.diff == 0 {
        return Ok(());
    }
    let h = &mut walk.headers;
    let mut header = walk.diff;
    let mut pseudo = 0;
    if append {
        let option = walk.option;
        for (i, byte) in option.iter().enumerate() {
            *h.get_mut(hdr_end + i).ok_or(DropReason::Truncated)? = *byte;
        }
        // At an even offset of the TCP header (a multiple of 4): whole words.
        for pair in option.chunks_exact(2) {
            header += u32::from(u16::from_ne_bytes([pair[0], pair[1]]));
        }
        // The data offset (byte 12: the low half of its word) gains two 32-bit words.
        let doff = h.get_mut(l4_off + 12).ok_or(DropReason::Truncated)?;
        let old = *doff;
        *doff = old + (2 << 4);
        header = diff16(header, u16::from(old), u16::from(old + (2 << 4)));
        // IPv4 total length (bytes 2..4) and header checksum (bytes 10..12).
        let total = u16::from_be_bytes([h[ETH_LEN + 2], h[ETH_LEN + 3]]);
        let [t0, t1] = (total + 8).to_be_bytes();
        let ip_diff = diff16(
            0,
            u16::from_ne_bytes([h[ETH_LEN + 2], h[ETH_LEN + 3]]),
            u16::from_ne_bytes([t0, t1]),
        );
        h[ETH_LEN + 2] = t0;
        h[ETH_LEN + 3] = t1;
        let ip_check = csum::apply(
            u16::from_ne_bytes([h[ETH_LEN + 10], h[ETH_LEN + 11]]),
            ip_diff,
        );
        [h[ETH_LEN + 10], h[ETH_LEN + 11]] = ip_check.to_ne_bytes();
        // The pseudo-header's TCP length.
        let l4_len = total - ihl as u16;
        pseudo = diff16(0, l4_len.to_be(), (l4_len + 8).to_be());
    }
    let check = l4_off + 16;
    if P::CHECKSUM_IN_HEADERS {
        let field = u16::from_ne_bytes([
            *h.get(check).ok_or(DropReason::Truncated)?,
            *h.get(check + 1).ok_or(DropReason::Truncated)?,
        ]);
        let [c0, c1] = csum::apply(field, header + pseudo).to_ne_bytes();
        *h.get_mut(check).ok_or(DropReason::Truncated)? = c0;
        *h.get_mut(check + 1).ok_or(DropReason::Truncated)? = c1;
    }
    let len = if append {
        if !p.grow(hdr_end)? {
            // Nothing changed yet, and there was no client's option to remove (it would have
            // been replaced: `placed`).
            stats::global(GlobalStat::ToaSkipped);
            return Ok(());
        }
        hdr_end + 8
    } else {
        hdr_end
    };
    if !p.store(h, copy_len(len)?) {
        return Err(DropReason::Truncated);
    }
    if !P::CHECKSUM_IN_HEADERS && !p.tcp_checksum(check, header, pseudo) {
        return Err(DropReason::Truncated);
    }
    if walk.found != 0 {
        stats::global_n(GlobalStat::ToaStripped, u64::from(walk.found));
    }
    if append || walk.placed != 0 {
        stats::global(GlobalStat::ToaAdded);
    }
    Ok(())
}

/// `len` as the length of a copy to or from [`Headers`] (1..=its length), or `Truncated`.
/// Verifier workaround: the helpers need a length the verifier knows is within the buffer; a
/// volatile read keeps LLVM from dropping the check as implied by the parse's (see
/// `parse::options_at`).
#[inline(always)]
fn copy_len(len: usize) -> Result<u32, DropReason> {
    // SAFETY: reading a local.
    let len = unsafe { core::ptr::read_volatile(&len) };
    if len == 0 || len > core::mem::size_of::<Headers>() {
        return Err(DropReason::Truncated);
    }
    Ok(len as u32)
}

/// TCP option kinds (RFC 9293 §3.1).
const OPT_END: u8 = 0;
const OPT_NOP: u8 = 1;

/// The state of [`apply`]'s walk over the options in its copy of the headers, shared with each
/// [`step`].
#[repr(C)]
struct Walk {
    /// The copy of the headers.
    headers: Headers,
    /// Where the options start in the copy, and their length.
    start: u32,
    len: u32,
    /// Where the next option starts (from `start`).
    at: u32,
    /// The TCP checksum's difference of what the walk changed (RFC 1624, unfolded).
    diff: u32,
    /// The client's TOA options met.
    found: u32,
    /// 1 once the gateway's option took the place of the first of them.
    placed: u32,
    /// 1: the gateway's option goes in (`TOA_ADD`).
    add: u32,
    /// 1: an End of Option List or a malformed option and what follows become NOPs (always:
    /// an option appended after them would not be read, and a TOA option hidden behind them
    /// is not left for a parser that reads on); 2: doing so.
    fill: u32,
    /// The gateway's option.
    option: [u8; 8],
}

/// Writes `new` at `pos` of the headers' copy (`rel` bytes after the options' start: an even
/// offset of the TCP header, so its parity is the byte's in its 16-bit word) and adds the
/// change to the walk's checksum difference.
#[inline(always)]
fn set(walk: &mut Walk, pos: usize, rel: usize, new: u8) {
    let Some(byte) = walk.headers.get_mut(pos) else {
        return;
    };
    let old = *byte;
    if old == new {
        return;
    }
    *byte = new;
    // Words are read as on the wire: the first byte is the low half (see `Bounds::words`).
    let shift = (rel & 1) * 8;
    walk.diff = diff16(walk.diff, u16::from(old) << shift, u16::from(new) << shift);
}

/// One step of [`apply`]'s walk, called by `bpf_loop` (0: go on; 1: stop), read as Linux's
/// `tcp_parse_options` reads options: a NOP is one byte; an End of Option List, or an option
/// with a length below 2 or past the header, ends them. A TOA option becomes the gateway's
/// (the first, with `add`) or NOPs; what ends the options becomes NOPs to the header's end.
/// A callback for the verifier's sake (see `parse::option_step`).
#[inline(never)]
fn step(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `apply`'s walk, for the duration of the helper's call.
    let walk = unsafe { &mut *ctx.cast::<Walk>() };
    let at = walk.at as usize;
    let len = walk.len as usize;
    if at >= len {
        return 1;
    }
    let pos = walk.start as usize + at;
    if walk.fill != 2 {
        let Some(&kind) = walk.headers.get(pos) else {
            return 1;
        };
        if kind == OPT_NOP {
            walk.at += 1;
            return 0;
        }
        let size = match walk.headers.get(pos + 1) {
            Some(&n) if kind != OPT_END => usize::from(n),
            _ => 0,
        };
        if size >= 2 && at + size <= len {
            if kind == toa::KIND && size == usize::from(toa::LEN) {
                walk.found += 1;
                let ours = walk.add != 0 && walk.placed == 0;
                let option = walk.option;
                for (i, byte) in option.iter().enumerate() {
                    set(walk, pos + i, at + i, if ours { *byte } else { OPT_NOP });
                }
                if ours {
                    walk.placed = 1;
                }
            }
            walk.at += size as u32;
            return 0;
        }
        // The end of the options as an endpoint reads them.
        if walk.fill == 0 {
            return 1;
        }
        walk.fill = 2;
    }
    set(walk, pos, at, OPT_NOP);
    walk.at += 1;
    0
}
