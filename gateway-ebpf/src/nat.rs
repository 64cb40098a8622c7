//! The translation. New flows: pick the backend, allocate a SNAT port collision-free, insert
//! the conntrack pair. Every packet of a flow: the header rewrite (addresses, ports, checksums,
//! MACs).

use gateway_common::{
    DropReason, GlobalStat,
    maps::{
        CT_BACKEND_CLOSED_FIRST, CT_SYN_SEEN, Config, DIR_FORWARD, DIR_REVERSE, Flow, FlowKey4,
        LAST_SEEN_GRANULARITY_NS, TIME_WAIT_NS, TRACK_PROXIED, is_closed,
    },
    net::{port_to_net, tcp_flags::ACK},
};

use crate::{
    conntrack::{self, Claim},
    csum::{self, diff16, diff32},
    lb,
    mac::mac_words,
    parse::{Bounds, IPV4_MIN_LEN, TcpPacket},
    ratelimit, stats, toa,
};

/// SNAT port probes before giving up (each a random port of the range).
const SNAT_PROBES: u32 = 32;

/// A port held by a closed connection (RST, or FIN both ways) idle for this long is taken
/// over by a new one when no probe finds a free port (for [`TIME_WAIT_NS`] if the backend closed
/// first), as kernel conntrack reopens a TIME_WAIT entry on a new SYN: without it,
/// closed flows would hold their ports for the whole closed timeout and cap the sustained
/// connection rate at (ports per backend) / (closed timeout). A closing packet sets both
/// entries' `last_seen_ns` exactly (`conntrack::track`), so this is real idleness, long enough
/// for a lost final ACK's retransmissions.
const SNAT_REUSE_IDLE_NS: u64 = LAST_SEEN_GRANULARITY_NS;

/// Starts the flow of a SYN (or of a SYN cookie's ACK) to the service of `app_id`: chooses the
/// backend, allocates a SNAT port by inserting the reverse entry (with `track` bits: a proxied
/// flow's; and its app's `toa` bits, `toa::flow_bits`), and leaves the forward entry in `entry` (its translation, state, times and `track`;
/// its tracking is the caller's: `conntrack::syn` or `conntrack::proxied`), not inserted yet
/// (see [`commit`]); returns the claim of the pair. The SYN (standing for `segments()`
/// packets) is within the backend's rate limit first, if it has one (`ratelimit::admit_new`).
#[inline(always)]
pub fn create(
    key: &FlowKey4,
    app_id: u32,
    cfg: &Config,
    now: u64,
    track: u8,
    entry: &mut Flow,
    segments: impl FnOnce() -> u32,
) -> Result<Claim, DropReason> {
    if cfg.snat_ip == 0 || cfg.snat_port_max < cfg.snat_port_min {
        return Err(DropReason::NotConfigured);
    }
    let (backend_id, backend) = lb::choose(app_id, key)?;
    // Within its backend's rate limit (issue 18), before a port is claimed.
    ratelimit::admit_new(backend_id, now, segments)?;
    // Built in the caller's slot (a `Flow` is too large to be copied around the BPF stack).
    *entry = Flow {
        // Reverse entry first: backend → SNAT becomes public → client.
        nat_src_ip: key.dst_ip,
        nat_dst_ip: key.src_ip,
        nat_src_port: key.dst_port,
        nat_dst_port: key.src_port,
        app_id,
        backend_id,
        direction: DIR_REVERSE,
        state: CT_SYN_SEEN,
        created_ns: now,
        last_seen_ns: now,
        track,
        toa: toa::flow_bits(app_id),
        ..Flow::default()
    };
    let mut reverse_key = FlowKey4::new(backend.ip, cfg.snat_ip, backend.port, 0);
    let range = u32::from(cfg.snat_port_max - cfg.snat_port_min) + 1;
    // A port held by a closed connection that may be taken over, if no probe finds a free one:
    // free ports first, so that a backend's closed connections keep their 4-tuples as long as
    // the range allows.
    let mut reusable = 0u16;
    for _ in 0..SNAT_PROBES {
        // SAFETY: helper without arguments.
        let r = unsafe { aya_ebpf::helpers::bpf_get_prandom_u32() };
        reverse_key.dst_port = port_to_net(cfg.snat_port_min + (r % range) as u16);
        // A lookup first: an insert into a full table fails anyway, and a failed insert of a
        // taken key costs more.
        match conntrack::lookup(&reverse_key) {
            // BPF_NOEXIST still decides: another CPU may have taken the port meanwhile.
            None => {
                if let Some(claim) = Claim::reverse(&reverse_key, entry)? {
                    return Ok(complete_forward(claim, entry, cfg, &reverse_key));
                }
            }
            Some(old) => {
                // SAFETY: a pointer to a live map value, read here.
                if reusable == 0 && takeover(unsafe { &*old }, now) {
                    reusable = reverse_key.dst_port;
                }
            }
        }
        stats::global(GlobalStat::SnatCollisions);
    }
    if reusable != 0 {
        reverse_key.dst_port = reusable;
        // Looked up again (another CPU may have taken it over meanwhile).
        if let Some(old) = conntrack::lookup(&reverse_key) {
            // SAFETY: a pointer to a live map value, copied (the pair is removed below).
            let old = unsafe { *old };
            if takeover(&old, now) {
                conntrack::remove_pair(&reverse_key, &old);
                stats::global(GlobalStat::SnatReused);
                if let Some(claim) = Claim::reverse(&reverse_key, entry)? {
                    return Ok(complete_forward(claim, entry, cfg, &reverse_key));
                }
            }
        }
    }
    Err(DropReason::SnatExhausted)
}

/// Whether the SNAT port of the reverse entry `old` may be taken over by a new flow at `now`:
/// its connection is closed and idle for [`SNAT_REUSE_IDLE_NS`], and for [`TIME_WAIT_NS`] if its
/// backend closed first (it holds the 4-tuple in TIME_WAIT until then).
#[inline(always)]
fn takeover(old: &Flow, now: u64) -> bool {
    let idle = now.saturating_sub(old.last_seen_ns);
    is_closed(old.state)
        && idle >= SNAT_REUSE_IDLE_NS
        && (old.state & CT_BACKEND_CLOSED_FIRST == 0 || idle >= TIME_WAIT_NS)
}

/// The forward entry (client → public becomes SNAT → backend) of the pair `claim` made with the
/// reverse key `reverse_key`, completed in `entry`.
#[inline(always)]
fn complete_forward(claim: Claim, entry: &mut Flow, cfg: &Config, reverse_key: &FlowKey4) -> Claim {
    entry.nat_src_ip = cfg.snat_ip;
    entry.nat_dst_ip = reverse_key.src_ip;
    entry.nat_src_port = reverse_key.dst_port;
    entry.nat_dst_port = reverse_key.src_port;
    entry.direction = DIR_FORWARD;
    claim
}

/// Completes the pair [`create`] claimed with the forward entry `forward` (key `key`; see
/// [`Claim::commit`]) and counts the new flow.
#[inline(always)]
pub fn commit(claim: Claim, key: &FlowKey4, forward: &Flow) -> Result<(), DropReason> {
    claim.commit(key, forward)?;
    stats::global(GlobalStat::FlowsCreated);
    stats::new_flow(forward.app_id, forward.backend_id);
    Ok(())
}

/// Writes the translation of `flow` into `pkt`: the new addresses, ports, the TTL decremented
/// (the caller checked it is above 1), the IPv4 checksum and the next hop's MACs cached in
/// `flow`. Returns the rewrite, whose checksum differences the
/// caller applies to the TCP checksum (XDP and TC do it each their own way).
///
/// # Safety
/// `b` must describe the packet `pkt` was parsed from, unchanged since.
#[inline(always)]
pub unsafe fn write_headers(
    b: &Bounds,
    pkt: &TcpPacket,
    flow: &Flow,
) -> Result<Rewrite, DropReason> {
    let rw = Rewrite::new(pkt, flow);
    // SAFETY: the caller's promise.
    unsafe {
        rw.write_headers(
            b,
            pkt,
            mac_words(&flow.nexthop_smac),
            mac_words(&flow.nexthop_dmac),
        )?
    };
    Ok(rw)
}

/// The new addresses and ports of a translated packet, and the checksum differences they make.
pub struct Rewrite {
    pub src_ip: u32,
    pub dst_ip: u32,
    pub src_port: u16,
    pub dst_port: u16,
    /// Difference of the addresses (IPv4 header and TCP pseudo-header).
    pub addr_diff: u32,
    /// Difference of the ports, and of a proxied flow's sequence or acknowledgement number
    /// (TCP header only).
    pub port_diff: u32,
    /// A proxied flow's new sequence number (backend → client) or acknowledgement number
    /// (client → backend), host order (see `Flow::seq_delta`).
    pub seq: Option<u32>,
    pub ack: Option<u32>,
}

impl Rewrite {
    #[inline(always)]
    fn new(pkt: &TcpPacket, flow: &Flow) -> Self {
        let k = &pkt.key;
        let (mut seq, mut ack) = (None, None);
        let mut numbers = 0;
        if flow.track & TRACK_PROXIED != 0 && flow.seq_delta != 0 {
            if flow.direction == DIR_FORWARD {
                if pkt.flags & ACK != 0 {
                    let new = pkt.ack.wrapping_add(flow.seq_delta);
                    numbers = diff32(0, pkt.ack.to_be(), new.to_be());
                    ack = Some(new);
                }
            } else {
                // The pipeline put the client's view in `pkt.seq`; the wire has the backend's.
                let wire = pkt.seq.wrapping_add(flow.seq_delta);
                numbers = diff32(0, wire.to_be(), pkt.seq.to_be());
                seq = Some(pkt.seq);
            }
        }
        Rewrite {
            seq,
            ack,
            src_ip: flow.nat_src_ip,
            dst_ip: flow.nat_dst_ip,
            src_port: flow.nat_src_port,
            dst_port: flow.nat_dst_port,
            addr_diff: diff32(
                diff32(0, k.src_ip, flow.nat_src_ip),
                k.dst_ip,
                flow.nat_dst_ip,
            ),
            port_diff: diff16(
                diff16(numbers, k.src_port, flow.nat_src_port),
                k.dst_port,
                flow.nat_dst_port,
            ),
        }
    }

    /// Writes addresses, ports, the TTL less one, the IPv4 checksum and the MACs into the
    /// packet. The TCP checksum is left to the caller (it differs between XDP and TC).
    ///
    /// # Safety
    /// `b` must describe the current packet, whose headers were parsed at `pkt`'s offsets.
    #[inline(always)]
    unsafe fn write_headers(
        &self,
        b: &Bounds,
        pkt: &TcpPacket,
        smac: &[u16; 3],
        dmac: &[u16; 3],
    ) -> Result<(), DropReason> {
        let eth = b.words::<6>(0).ok_or(DropReason::Truncated)?;
        let ip = b
            .words::<{ IPV4_MIN_LEN / 2 }>(crate::parse::ETH_LEN)
            .ok_or(DropReason::Truncated)?;
        let tcp = b.words::<6>(pkt.l4_off()).ok_or(DropReason::Truncated)?;
        // SAFETY: the pointers were bounds-checked above, 2-byte aligned (see `words`).
        unsafe {
            let eth = &mut *eth;
            eth[..3].copy_from_slice(dmac);
            eth[3..].copy_from_slice(smac);
            let ip = &mut *ip;
            // Word 4: the TTL (its low byte) and the protocol. TTL > 1 here: no borrow.
            let ttl = ip[4];
            ip[4] = ttl - 1;
            ip[5] = csum::apply(ip[5], diff16(self.addr_diff, ttl, ttl - 1));
            ip[6] = self.src_ip as u16;
            ip[7] = (self.src_ip >> 16) as u16;
            ip[8] = self.dst_ip as u16;
            ip[9] = (self.dst_ip >> 16) as u16;
            let tcp = &mut *tcp;
            tcp[0] = self.src_port;
            tcp[1] = self.dst_port;
            if let Some(seq) = self.seq {
                let v = seq.to_be();
                tcp[2] = v as u16;
                tcp[3] = (v >> 16) as u16;
            }
            if let Some(ack) = self.ack {
                let v = ack.to_be();
                tcp[4] = v as u16;
                tcp[5] = (v >> 16) as u16;
            }
        }
        Ok(())
    }
}
