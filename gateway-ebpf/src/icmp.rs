//! ICMP errors about flows: destination unreachable (fragmentation needed: path MTU discovery,
//! RFC 1191; port, host, network unreachable...), time exceeded and parameter problem
//! (RFC 792). Such an error quotes the packet it is about, which the gateway translated: the
//! quoted headers carry the gateway's addresses and ports, and neither the sender nor its
//! kernel would recognize them. An error about a flow is translated as netfilter's NAT does
//! (`nf_nat_icmp_reply_translation`): the quoted packet back to what the flow's end sent, the
//! outer header to that end, through the gateway's own address facing it, and forwarded as the
//! flow's packets are. An error about anything else goes to the gateway's kernel, as before.
//!
//! With the quoted packet `S → D` (what the gateway sent), the entry keyed `D → S` is the flow's
//! other direction, `E`: it translates packets from the error's side to the quoted sender's
//! side. So the error is translated as a packet of `E` (outer `E.nat_src → E.nat_dst`, E's next
//! hop), and the quoted packet as the inverse of `E`: `E.nat_dst:port → E.nat_src:port`.
//!
//! Bounds:
//! - The quoted packet may stop after 8 bytes of TCP (RFC 792: ports and sequence number) or
//!   carry more (RFC 1812 §4.3.2.3: as much as fits in 576 bytes). The ports and sequence
//!   number are always translated; the acknowledgement number when the quote has it and its
//!   flags byte (a SYN proxy's flow, see `Flow::seq_delta`); the TCP checksum when the quote has
//!   it (incrementally: the quoted segment is incomplete, as netfilter's `tcp_manip_pkt` does).
//! - Both IPv4 headers may carry options (their lengths come from `ihl`).
//! - The error's ICMP checksum is verified over the whole message (at most
//!   `csum::SEGMENT_MAX` bytes: a router quotes at most 576); the quoted IPv4 header's, the
//!   quoted TCP checksum and the ICMP checksum are updated incrementally (RFC 1624).
//! - The quoted packet's source must be the error's destination (where the error was sent).
//! - A "fragmentation needed" to a client whose segments get the gateway's TOA option (`toa`)
//!   says 8 bytes less than the next hop's MTU: the option's, which the client does not send.
//! - At most `Config::icmp_rate` errors per second about one connection and direction are
//!   translated, per CPU (a token bucket per slot of the quoted tuple's hash, `ICMP_BUCKETS`);
//!   the excess is dropped (`icmp_rate_limited`) before its flow's next hop is resolved: one
//!   error in, at most one out. `icmp_rate` 0: nothing is translated.

use gateway_common::{
    DropReason, GlobalStat, flow_hash4,
    maps::{
        Config, DIR_FORWARD, Flow, FlowKey4, ICMP_BUCKET_SLOTS, IcmpBucket, TOA_ADD, TOA_PENDING,
        TRACK_PROXIED,
    },
    net::{IPPROTO_TCP, icmp, tcp_flags::ACK, toa},
};

use aya_ebpf::cty::c_void;

use crate::{
    clock::{self, Now},
    conntrack, csum,
    csum::{diff16, diff32},
    mac::mac_words,
    maps::{CONFIG, ICMP_BUCKETS},
    nexthop::{self, NextHop},
    parse::{Bounds, ETH_LEN, IPV4_MIN_LEN, IcmpPacket, Parsed, join, parse},
    pipeline::Context,
    stats,
};

/// The most bytes of the error read directly before it is known to be about a flow: Ethernet,
/// both IPv4 headers at their longest, the ICMP header, a TCP header.
pub const HEADERS_MAX: usize = ETH_LEN + 60 + icmp::HEADER_LEN + 60 + 20;
/// Credit of a full token bucket (ns): one second's worth of errors.
const BUCKET_NS: u64 = 1_000_000_000;

/// An ICMP error about a flow: the error, and where its quoted packet is.
#[derive(Clone, Copy)]
pub struct IcmpError {
    pub pkt: IcmpPacket,
    /// The quoted IPv4 header's length (bytes: 20..=60). Read through [`IcmpError::quoted_ihl`].
    quoted_ihl: u8,
    /// Bytes of the quoted TCP header the error carries (8 or more).
    pub tcp_len: u16,
    /// The quoted packet's 5-tuple (network order): what the gateway sent.
    pub quoted: FlowKey4,
}

impl IcmpError {
    /// The quoted IPv4 header's length (see `TcpPacket::ihl` for why it is read so).
    #[inline(always)]
    fn quoted_ihl(&self) -> usize {
        // SAFETY: reading a field of `self`.
        usize::from(unsafe { core::ptr::read_volatile(&self.quoted_ihl) })
    }

    /// Offset of the quoted IPv4 header.
    #[inline(always)]
    fn quoted_ip_off(&self) -> usize {
        self.pkt.l4_off() + icmp::HEADER_LEN
    }

    /// Offset of the quoted TCP header.
    #[inline(always)]
    fn quoted_tcp_off(&self) -> usize {
        self.quoted_ip_off() + self.quoted_ihl()
    }

    /// Its connection's slot of `ICMP_BUCKETS`: the quoted tuple's hash.
    #[inline(always)]
    fn slot(&self) -> u32 {
        let q = &self.quoted;
        flow_hash4(q.src_ip, q.dst_ip, q.src_port, q.dst_port) & (ICMP_BUCKET_SLOTS - 1)
    }

    /// Counts the translated error by its type (and code 4 of type 3, fragmentation needed).
    #[inline(always)]
    pub fn count(&self) {
        stats::global(match self.pkt.kind {
            icmp::DEST_UNREACH if self.pkt.code == icmp::FRAG_NEEDED => GlobalStat::IcmpFragNeeded,
            icmp::DEST_UNREACH => GlobalStat::IcmpUnreachable,
            icmp::TIME_EXCEEDED => GlobalStat::IcmpTimeExceeded,
            _ => GlobalStat::IcmpParamProblem,
        });
    }
}

/// An ICMP error about a flow, with where it goes next.
pub struct IcmpTranslation<'a> {
    pub err: IcmpError,
    /// The flow's entry of the direction the error goes (`E`), next hop updated.
    pub flow: &'a Flow,
    pub hop: NextHop,
}

/// What the attach mode's ICMP function does first, after `pipeline::prepare` said the packet
/// is an ICMP error to a gateway address (`Verdict::Icmp`): parse it again, find its flow
/// ([`decide`]) and resolve the next hop. `None`: hand it to the kernel (counted `passed`).
#[inline(always)]
pub fn prepare<C: Context>(
    b: &mut Bounds,
    checks: &C,
    ctx: *mut c_void,
    ingress_ifindex: u32,
) -> Result<Option<IcmpTranslation<'static>>, DropReason> {
    let Some(cfg) = CONFIG.get(0) else {
        return Ok(None);
    };
    let Parsed::Icmp(pkt) = parse(b, |dst| cfg.addr_kind(dst))? else {
        return Ok(None);
    };
    let Some((err, flow)) = decide(b, checks, cfg, pkt)? else {
        stats::global(GlobalStat::Passed);
        return Ok(None);
    };
    // Over the rate, before the hop is resolved: an aged hop's resolution is written into the
    // flow and the per-CPU cache (as revalidated), and stands for a whole age only if its
    // packet goes through the kernel's neighbour output; a dropped error's would not have.
    // (Asked again, and charged, where the error is sent: `admit`.)
    if !has_credit(&err) {
        return Err(DropReason::IcmpRateLimited);
    }
    // SAFETY: a conntrack value pointer; this CPU updates its next hop in place.
    let flow = unsafe { &mut *flow };
    let hop = nexthop::resolve(ctx, ingress_ifindex, flow, Now::read(cfg), C::NEIGH_OUTPUT);
    Ok(Some(IcmpTranslation { err, flow, hop }))
}

/// Finds the flow an ICMP error to a gateway address is about. `None`: translation is off
/// (`icmp_rate` 0), or the quote is not a TCP packet the gateway sent on a flow it has (counted
/// `icmp_no_flow`): hand the error to the kernel. `Some`: the error and the flow's entry of the
/// other direction (`E`, see the module), its checksum and TTL checked. The packet may be made
/// linear (`Context::linearize`; `b` refreshed).
#[inline(always)]
pub fn decide<C: Context>(
    b: &mut Bounds,
    checks: &C,
    cfg: &Config,
    pkt: IcmpPacket,
) -> Result<Option<(IcmpError, *mut Flow)>, DropReason> {
    if cfg.icmp_rate == 0 {
        return Ok(None);
    }
    let end = ETH_LEN + usize::from(pkt.l3_len);
    checks.linearize(b, if end < HEADERS_MAX { end } else { HEADERS_MAX });
    let Some(err) = quoted(b, pkt) else {
        stats::global(GlobalStat::IcmpNoFlow);
        return Ok(None);
    };
    let q = &err.quoted;
    let other = FlowKey4::new(q.dst_ip, q.src_ip, q.dst_port, q.src_port);
    let Some(flow) = conntrack::lookup(&other) else {
        stats::global(GlobalStat::IcmpNoFlow);
        return Ok(None);
    };
    if pkt.ttl <= 1 {
        return Err(DropReason::TtlExceeded);
    }
    // The whole message's checksum: a forged or damaged error goes no further.
    let len = usize::from(pkt.l3_len) - pkt.ihl();
    if len > csum::SEGMENT_MAX {
        return Err(DropReason::BadIcmp);
    }
    checks.linearize(b, end);
    if csum::sum_bytes(b, pkt.l4_off(), len) != Some(0xffff) {
        return Err(DropReason::BadIcmp);
    }
    Ok(Some((err, flow)))
}

/// The quoted packet of `pkt`, if it is the start of a TCP segment the gateway sent: an IPv4
/// header (options allowed, not a later fragment) of TCP from the error's destination, and at
/// least 8 bytes of its TCP header, all within the error.
#[inline(always)]
fn quoted(b: &Bounds, pkt: IcmpPacket) -> Option<IcmpError> {
    let ip_off = pkt.l4_off() + icmp::HEADER_LEN;
    let ip = b.words::<{ IPV4_MIN_LEN / 2 }>(ip_off)?;
    // SAFETY: bounds-checked by `words`.
    let ip = unsafe { &*ip };
    let version_ihl = ip[0] as u8;
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    let frag = u16::from_be(ip[3]);
    if version_ihl >> 4 != 4
        || ihl < IPV4_MIN_LEN
        || (ip[4] >> 8) as u8 != IPPROTO_TCP
        || frag & 0x1fff != 0
    {
        return None;
    }
    let src_ip = join(ip[6], ip[7]);
    if src_ip != pkt.dst_ip {
        return None;
    }
    let tcp_len = usize::from(pkt.l3_len)
        .checked_sub(pkt.ihl() + icmp::HEADER_LEN + ihl)
        .filter(|&n| n >= 8)?;
    let tcp = b.words::<2>(ip_off + ihl)?;
    // SAFETY: bounds-checked by `words`.
    let tcp = unsafe { &*tcp };
    Some(IcmpError {
        pkt,
        quoted_ihl: ihl as u8,
        tcp_len: if tcp_len > 60 { 60 } else { tcp_len as u16 },
        quoted: FlowKey4::new(src_ip, join(ip[8], ip[9]), tcp[0], tcp[1]),
    })
}

/// The credit of `bucket` at `now` (ns), and what one error costs at `cfg`'s rate.
#[inline(always)]
fn credit(cfg: &Config, bucket: &IcmpBucket, now: u64) -> (u64, u64) {
    let cost = BUCKET_NS / u64::from(cfg.icmp_rate.max(1));
    let credit = if bucket.last_ns == 0 {
        BUCKET_NS
    } else {
        let earned = bucket.credit_ns + now.saturating_sub(bucket.last_ns);
        if earned > BUCKET_NS {
            BUCKET_NS
        } else {
            earned
        }
    };
    (credit, cost)
}

/// Whether this CPU's token bucket of `err`'s connection has room for one more error now,
/// taking nothing: what [`prepare`] asks before anything of the flow changes.
#[inline(always)]
fn has_credit(err: &IcmpError) -> bool {
    let (Some(cfg), Some(bucket)) = (CONFIG.get(0), ICMP_BUCKETS.get(err.slot())) else {
        return false;
    };
    let (credit, cost) = credit(cfg, bucket, clock::now_ns());
    credit >= cost
}

/// Whether this CPU's token bucket of `err`'s connection lets one more error through now;
/// asked only of an error that is sent on (one a program hands to the kernel is asked there).
/// `Err(IcmpRateLimited)` when it does not.
#[inline(always)]
pub fn admit(err: &IcmpError) -> Result<(), DropReason> {
    let (Some(cfg), Some(bucket)) = (CONFIG.get(0), ICMP_BUCKETS.get_ptr_mut(err.slot())) else {
        return Err(DropReason::IcmpRateLimited);
    };
    let now = clock::now_ns();
    // SAFETY: this CPU's own slot of a per-CPU array.
    let bucket = unsafe { &mut *bucket };
    let (credit, cost) = credit(cfg, bucket, now);
    bucket.last_ns = now;
    if credit >= cost {
        bucket.credit_ns = credit - cost;
        Ok(())
    } else {
        bucket.credit_ns = credit;
        Err(DropReason::IcmpRateLimited)
    }
}

/// Writes the translation of `err` with `flow` (its entry `E`) into the packet: MACs of E's
/// next hop, the outer header (`E.nat_src → E.nat_dst`, TTL less one, its checksum), the quoted
/// headers (addresses, ports, a proxied flow's sequence or acknowledgement number, both
/// checksums) and the ICMP checksum.
///
/// # Safety
/// `b` must describe the packet `err` was read from (made linear up to its quoted TCP header
/// by [`decide`]), unchanged since.
#[inline(always)]
pub unsafe fn write(b: &Bounds, err: &IcmpError, flow: &Flow) -> Result<(), DropReason> {
    let q = &err.quoted;
    // The quoted packet as the flow's end sent it.
    let (src_ip, dst_ip) = (flow.nat_dst_ip, flow.nat_src_ip);
    let (src_port, dst_port) = (flow.nat_dst_port, flow.nat_src_port);
    let addrs = diff32(diff32(0, q.src_ip, src_ip), q.dst_ip, dst_ip);
    let mut tcp_diff = diff16(diff16(0, q.src_port, src_port), q.dst_port, dst_port);
    let eth = b.words::<6>(0).ok_or(DropReason::Truncated)?;
    let outer = b
        .words::<{ IPV4_MIN_LEN / 2 }>(ETH_LEN)
        .ok_or(DropReason::Truncated)?;
    let head = b
        .words::<{ icmp::HEADER_LEN / 2 }>(err.pkt.l4_off())
        .ok_or(DropReason::Truncated)?;
    let ip = b
        .words::<{ IPV4_MIN_LEN / 2 }>(err.quoted_ip_off())
        .ok_or(DropReason::Truncated)?;
    let tcp_off = err.quoted_tcp_off();
    let tcp = b.words::<4>(tcp_off).ok_or(DropReason::Truncated)?;
    // SAFETY: every pointer above was bounds-checked, 2-byte aligned (see `Bounds::words`).
    unsafe {
        let tcp = &mut *tcp;
        // A proxied flow's numbers (`Flow::seq_delta`) back in the sender's view.
        if flow.track & TRACK_PROXIED != 0 && flow.seq_delta != 0 {
            if flow.direction == DIR_FORWARD {
                // The quote is the backend's segment to the client: its `seq` lost the delta.
                let old = join(tcp[2], tcp[3]);
                let new = u32::from_be(old).wrapping_add(flow.seq_delta).to_be();
                tcp_diff = diff32(tcp_diff, old, new);
                tcp[2] = new as u16;
                tcp[3] = (new >> 16) as u16;
            } else if err.tcp_len >= 14 {
                // The quote is the client's segment to the backend: an ACK's `ack` gained it.
                let rest = b.words::<3>(tcp_off + 8).ok_or(DropReason::Truncated)?;
                let rest = &mut *rest;
                if (rest[2] >> 8) as u8 & ACK != 0 {
                    let old = join(rest[0], rest[1]);
                    let new = u32::from_be(old).wrapping_sub(flow.seq_delta).to_be();
                    tcp_diff = diff32(tcp_diff, old, new);
                    rest[0] = new as u16;
                    rest[1] = (new >> 16) as u16;
                }
            }
        }
        tcp[0] = src_port;
        tcp[1] = dst_port;
        // The ICMP checksum covers every quoted byte that changes.
        let mut icmp_diff = addrs + tcp_diff;
        if err.tcp_len >= 18 {
            let check = b.words::<1>(tcp_off + 16).ok_or(DropReason::Truncated)?;
            let old = (*check)[0];
            // The pseudo-header's addresses and the header's words.
            let new = csum::apply(old, addrs + tcp_diff);
            (*check)[0] = new;
            icmp_diff = diff16(icmp_diff, old, new);
        }
        let ip = &mut *ip;
        let old = ip[5];
        let new = csum::apply(old, addrs);
        ip[5] = new;
        icmp_diff = diff16(icmp_diff, old, new);
        ip[6] = src_ip as u16;
        ip[7] = (src_ip >> 16) as u16;
        ip[8] = dst_ip as u16;
        ip[9] = (dst_ip >> 16) as u16;
        let head = &mut *head;
        // A "fragmentation needed" to a client whose segments the gateway grows by a TOA option
        // (`toa`: `TOA_ADD`, the backend's end not made yet): the next hop's MTU less the
        // option's 8 bytes, so that the client's smaller segments fit with it. Not below 68
        // (RFC 791's least MTU), nor a zero (an RFC 792 router that does not say).
        let grown = TOA_ADD | TOA_PENDING;
        if err.pkt.kind == icmp::DEST_UNREACH
            && err.pkt.code == icmp::FRAG_NEEDED
            && flow.direction != DIR_FORWARD
            && flow.toa & grown == grown
        {
            let old = head[3];
            let mtu = u16::from_be(old);
            if mtu >= 68 + u16::from(toa::LEN) {
                let new = (mtu - u16::from(toa::LEN)).to_be();
                head[3] = new;
                icmp_diff = diff16(icmp_diff, old, new);
            }
        }
        head[1] = csum::apply(head[1], icmp_diff);
        // The error itself goes to the flow's end, from the gateway's address facing it.
        let outer = &mut *outer;
        let (from, to) = (flow.nat_src_ip, flow.nat_dst_ip);
        let ttl = outer[4];
        // TTL > 1 (`decide`): no borrow.
        outer[4] = ttl - 1;
        let diff = diff32(
            diff32(diff16(0, ttl, ttl - 1), join(outer[6], outer[7]), from),
            join(outer[8], outer[9]),
            to,
        );
        outer[5] = csum::apply(outer[5], diff);
        outer[6] = from as u16;
        outer[7] = (from >> 16) as u16;
        outer[8] = to as u16;
        outer[9] = (to >> 16) as u16;
        let eth = &mut *eth;
        eth[..3].copy_from_slice(mac_words(&flow.nexthop_dmac));
        eth[3..].copy_from_slice(mac_words(&flow.nexthop_smac));
    }
    Ok(())
}
