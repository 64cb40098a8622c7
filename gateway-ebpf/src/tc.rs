//! TC (tcx ingress): translate with `bpf_l4_csum_replace` and the pseudo-header flag, so
//! CHECKSUM_PARTIAL and GSO packets stay correct, then redirect to the cached next hop, or
//! through `bpf_redirect_neigh` when the neighbour is not known yet or a flow's aged hop is
//! revalidated (see `nexthop`). A segment without a flow is turned into its RST, and a SYN the
//! SYN proxy answers into its SYN-ACK, sent back out of the device it came in on.

use aya_ebpf::{
    bindings::{
        __sk_buff, BPF_CSUM_LEVEL_QUERY, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
        bpf_redir_neigh,
    },
    cty::c_void,
    helpers::{
        bpf_check_mtu, bpf_csum_level, bpf_l4_csum_replace, bpf_redirect, bpf_redirect_neigh,
        bpf_skb_change_tail, bpf_skb_load_bytes, bpf_skb_store_bytes,
    },
    programs::TcContext,
};
use gateway_common::{DropReason, GlobalStat};

use crate::{
    answer::{self, Answer},
    icmp, mss, nat,
    nexthop::{How, NextHop},
    parse::{Bounds, ETH_LEN, IPV4_MIN_LEN, LoadBytes, OPTIONS_MAX, TcpPacket},
    pipeline::{self, Context, Verdict},
    stats,
    toa::{self, Headers},
};

/// Enough linear bytes for Ethernet, IPv4 with options and a TCP header: what the program reads
/// directly of every packet. (A SYN whose checksum is computed is made linear whole, then:
/// [`Context::linearize`].)
const HEADERS_MAX: u32 = (ETH_LEN + 60 + 20) as u32;
const AF_INET: u32 = 2;

/// The packet as the program sees it now (after any helper that may move it).
#[inline(always)]
fn bounds(ctx: &TcContext) -> Bounds {
    Bounds {
        data: ctx.data(),
        data_end: ctx.data_end(),
        len: ctx.len() as usize,
    }
}

/// The skb, as the pipeline needs it.
struct Skb<'a>(&'a TcContext);

impl LoadBytes for Skb<'_> {
    #[inline(always)]
    fn load_bytes(&self, offset: usize, buf: &mut [u8; OPTIONS_MAX], len: usize) -> bool {
        // SAFETY: a helper writing at most `buf.len()` bytes into `buf` (the caller bounds
        // `len`).
        unsafe {
            bpf_skb_load_bytes(
                self.0.skb.skb as *const c_void,
                offset as u32,
                buf.as_mut_ptr().cast(),
                len as u32,
            ) == 0
        }
    }
}

impl Context for Skb<'_> {
    const NEIGH_OUTPUT: bool = true;

    /// CHECKSUM_UNNECESSARY (a NIC verified it) is asked of `bpf_csum_level`. CHECKSUM_PARTIAL
    /// (a sender on this host, e.g. a veth peer with tx offload, left the field holding the
    /// pseudo-header's sum) cannot be read by a TC program; it is found by its effect: a
    /// checksum change that is not about the pseudo-header is ignored for such a packet (see
    /// `inet_proto_csum_replace_by_diff`), so a +1 probe leaves the field as it was. Any other
    /// packet has its field changed, then changed back.
    #[inline(always)]
    fn tcp_trusted(&self, b: &mut Bounds, pkt: &TcpPacket) -> bool {
        let skb = self.0.skb.skb;
        // SAFETY: a helper on this program's skb; the query changes nothing.
        if unsafe { bpf_csum_level(skb, u64::from(BPF_CSUM_LEVEL_QUERY)) } >= 0 {
            return true;
        }
        let at = pkt.l4_off() + 16;
        let field = |b: &Bounds| {
            // SAFETY: bounds-checked and aligned (see `Bounds::words`).
            b.words::<1>(at).map(|w| unsafe { (*w)[0] })
        };
        let Some(before) = field(b) else {
            return false;
        };
        // SAFETY: helper calls on this program's skb; they validate the offset. Packet
        // pointers are stale after each: the bounds are read again.
        let probed = unsafe { bpf_l4_csum_replace(skb, at as u32, 0, 1, 0) } == 0;
        *b = bounds(self.0);
        if !probed {
            return false;
        }
        if field(b) == Some(before) {
            return true;
        }
        // SAFETY: as above; adds -1 (one's complement) back.
        unsafe { bpf_l4_csum_replace(skb, at as u32, 0, u64::from(!1u32), 0) };
        *b = bounds(self.0);
        false
    }

    /// `bpf_skb_pull_data`, when the linear part is shorter: it moves the packet, so the bounds
    /// are read again. If it fails, they stay short, and what reads past them fails.
    #[inline(always)]
    fn linearize(&self, b: &mut Bounds, len: usize) {
        if b.data_end - b.data < len {
            let _ = self.0.pull_data(len as u32);
            *b = bounds(self.0);
        }
    }

    /// A GSO skb's segments (`gso_segs`: a GRO'd burst is one skb), at least 1.
    #[inline(always)]
    fn segments(&self) -> u32 {
        // SAFETY: the context pointer the kernel gave this program.
        let segs = unsafe { (*self.0.skb.skb).gso_segs };
        if segs == 0 { 1 } else { segs }
    }
}

/// What [`try_gateway_tc`] returns for an ICMP error to a gateway address (`Verdict::Icmp`):
/// not a TC action; [`run`] hands the packet to [`icmp_error`] then. (It returns a translated
/// segment's action marked for the MSS clamp: `mss::mark`.)
const ICMP_ERROR: i32 = i32::MIN;

/// The TC program: returns its action, a drop counted by its reason. Functions of their own in
/// the object (BPF-to-BPF calls), siblings under this one: [`packet`] (every packet first),
/// [`icmp_error`] (an ICMP error to a gateway address) and [`mss_clamp`] (a translated SYN or
/// SYN-ACK), then [`client_address`] (a client's segment while its backend has not seen the
/// client's address: `toa`). Verifier workaround: the
/// stack of a program's frames together is at most 512 bytes, and each of these two takes
/// more than half of it.
#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    match packet(ctx.skb.skb) {
        ICMP_ERROR => icmp_error(ctx.skb.skb),
        marked => {
            let action = mss::action(marked as u32);
            if action as i32 == TC_ACT_REDIRECT {
                if marked as u32 & mss::CLAMP != 0 {
                    mss_clamp(ctx.skb.skb, mss::app(marked as u32));
                }
                if marked as u32 & toa::MARK != 0 {
                    return client_address(ctx.skb.skb);
                }
            }
            action as i32
        }
    }
}

/// [`try_gateway_tc`] on the raw context, a drop counted.
#[inline(never)]
fn packet(skb: *mut __sk_buff) -> i32 {
    stats::or_drop(try_gateway_tc(&TcContext::new(skb)), TC_ACT_SHOT)
}

/// Every packet's handling but an ICMP error's ([`ICMP_ERROR`]).
#[inline(always)]
pub fn try_gateway_tc(ctx: &TcContext) -> Result<i32, DropReason> {
    stats::global(GlobalStat::TcPackets);
    // Direct packet access needs the headers in the linear part of the skb.
    let linear = (ctx.data_end() - ctx.data()) as u32;
    let len = ctx.len();
    if linear < HEADERS_MAX && linear < len {
        let _ = ctx.pull_data(len.min(HEADERS_MAX));
    }
    let mut b = bounds(ctx);
    let skb = ctx.skb.skb;
    // At TC ingress, the skb's device is the one it arrived on.
    // SAFETY: the context pointer the kernel gave this program.
    let ingress = unsafe { (*skb).ifindex };
    let mut answer = Answer::EMPTY;
    let t = match pipeline::prepare(&mut b, &Skb(ctx), skb as *mut c_void, ingress, &mut answer)? {
        Verdict::Pass => return Ok(TC_ACT_OK),
        Verdict::Answer => {
            rewrite(ctx, &mut b, &answer)?;
            // SAFETY: plain helper call: out of the device the segment came in on.
            let action = unsafe { bpf_redirect(ingress, 0) } as u32;
            // The SYN proxy's SYN-ACK is clamped by `run` (`answer.arg`: its app's).
            return Ok(mss::mark_answer(action, answer.flags, answer.arg) as i32);
        }
        Verdict::Icmp => return Ok(ICMP_ERROR),
        Verdict::Translate(t) => t,
    };
    if t.pre {
        rewrite(ctx, &mut b, &answer)?;
    }
    // SAFETY: `b` is the packet `t` was prepared from, unchanged since.
    let rw = unsafe { nat::write_headers(&b, &t.pkt, t.flow)? };
    let pkt = &t.pkt;
    let check_off = (pkt.l4_off() + 16) as u32;
    // SAFETY: helper calls on this program's skb; they re-validate the offset.
    let ok = unsafe {
        bpf_l4_csum_replace(
            skb,
            check_off,
            0,
            u64::from(rw.addr_diff),
            u64::from(BPF_F_PSEUDO_HDR),
        ) == 0
            && bpf_l4_csum_replace(skb, check_off, 0, u64::from(rw.port_diff), 0) == 0
    };
    if !ok {
        return Err(DropReason::Truncated);
    }
    stats::traffic(t.flow, u64::from(pkt.l3_len));
    if matches!(t.hop.how, How::Kernel | How::Unreachable) {
        // Only XDP is handed `Kernel` (`Context::NEIGH_OUTPUT`).
        return Err(DropReason::NoRoute);
    }
    // A segment of a handshake (the flow not established: SYN, SYN-ACK, the SYN the proxy
    // wrote over the client's segment) goes by `run`'s MSS clamp, if its app has one; a
    // client's segment before its backend's end is established, by its TOA step.
    Ok(toa::mark(
        mss::mark(send(t.hop) as u32, t.flow.state, t.flow.app_id),
        t.flow,
    ) as i32)
}

/// An ICMP error to a gateway address (`Verdict::Icmp`) on the raw context (see [`run`]): the
/// program's action, a drop counted.
#[inline(never)]
fn icmp_error(skb: *mut __sk_buff) -> i32 {
    stats::or_drop(send_icmp(&TcContext::new(skb)), TC_ACT_SHOT)
}

/// Translates an ICMP error about a flow and sends it to the flow's next hop; one about no
/// flow goes to the kernel.
#[inline(always)]
fn send_icmp(ctx: &TcContext) -> Result<i32, DropReason> {
    let skb = ctx.skb.skb;
    let mut b = bounds(ctx);
    // SAFETY: the context pointer the kernel gave this program.
    let ingress = unsafe { (*skb).ifindex };
    let Some(t) = icmp::prepare(&mut b, &Skb(ctx), skb as *mut c_void, ingress)? else {
        return Ok(TC_ACT_OK);
    };
    if matches!(t.hop.how, How::Kernel | How::Unreachable) {
        return Err(DropReason::NoRoute);
    }
    icmp::admit(&t.err)?;
    // SAFETY: `b` is the packet `t` was prepared from, unchanged since.
    unsafe { icmp::write(&b, &t.err, t.flow)? };
    t.err.count();
    Ok(send(t.hop) as i32)
}

/// Clamps the MSS of the translated (redirected) SYN or SYN-ACK of app `app_id` in `skb`
/// (`mss::CLAMP`), its TCP checksum updated through the helper (a CHECKSUM_PARTIAL skb's field
/// left alone); in a function of its own in the object (a BPF-to-BPF call, see `mss::CLAMP`).
#[inline(never)]
fn mss_clamp(skb: *mut __sk_buff, app_id: u32) {
    let ctx = TcContext::new(skb);
    let mut b = bounds(&ctx);
    let Ok((diff, l4_off)) = mss::clamp(&mut b, &Skb(&ctx), app_id) else {
        return;
    };
    if diff != 0 {
        // SAFETY: a helper on this program's skb; it validates the offset.
        unsafe { bpf_l4_csum_replace(skb, (l4_off + 16) as u32, 0, u64::from(diff), 0) };
    }
}

/// The TOA step of a translated (redirected) client segment in `skb` (`toa::MARK`): the
/// program's action (the redirect, or a drop counted); in a function of its own in the object
/// (a BPF-to-BPF call, see `mss::CLAMP`).
#[inline(never)]
fn client_address(skb: *mut __sk_buff) -> i32 {
    let ctx = TcContext::new(skb);
    stats::or_drop(
        toa::apply(&Skb(&ctx)).map(|()| TC_ACT_REDIRECT),
        TC_ACT_SHOT,
    )
}

/// Bytes of payload [`move_step`] moves per step.
const MOVE_CHUNK: u32 = 64;
/// The most bytes an skb may have for the TOA step to grow it (a non-GSO packet is at most
/// its device's MTU, and 256 steps of [`MOVE_CHUNK`] move this much).
const MOVE_MAX: u32 = 256 * MOVE_CHUNK;

impl toa::Packet for Skb<'_> {
    /// Through the helper (see `toa::Packet::CHECKSUM_IN_HEADERS`).
    const CHECKSUM_IN_HEADERS: bool = false;

    #[inline(always)]
    fn bounds(&self) -> Bounds {
        bounds(self.0)
    }

    #[inline(always)]
    fn load(&self, h: &mut Headers, len: u32) -> bool {
        // SAFETY: a helper writing `len` bytes into `h`, which holds them.
        unsafe {
            bpf_skb_load_bytes(
                self.0.skb.skb as *const c_void,
                0,
                h.as_mut_ptr().cast(),
                len,
            ) == 0
        }
    }

    #[inline(always)]
    fn store(&self, h: &Headers, len: u32) -> bool {
        // SAFETY: a helper reading `len` bytes of `h`.
        unsafe { bpf_skb_store_bytes(self.0.skb.skb, 0, h.as_ptr().cast(), len, 0) == 0 }
    }

    /// Not a GSO packet (growing its tail would make it one packet too long for the device),
    /// short enough to move its payload, and within the device's MTU with 8 bytes more.
    #[inline(always)]
    fn can_grow(&self, ifindex: u32) -> bool {
        let skb = self.0.skb.skb;
        let mut mtu = 0u32;
        // SAFETY: the context pointer the kernel gave this program; a helper on it, which
        // writes `mtu`.
        unsafe {
            (*skb).gso_size == 0
                && (*skb).len <= MOVE_MAX
                && bpf_check_mtu(skb.cast(), ifindex, &mut mtu, 8, 0) == 0
        }
    }

    /// At the skb's tail, its payload moved 8 bytes on: the TCP header stays where it is, and
    /// with it a CHECKSUM_PARTIAL skb's checksum start (counted from the head), which growing
    /// at the head would have left pointing 8 bytes into the header.
    #[inline(always)]
    fn grow(&self, hdr_end: usize) -> Result<bool, DropReason> {
        let skb = self.0.skb.skb;
        // SAFETY: the context pointer the kernel gave this program.
        let len = unsafe { (*skb).len };
        // SAFETY: a helper on this program's skb; it validates the length.
        if len < hdr_end as u32 || unsafe { bpf_skb_change_tail(skb, len + 8, 0) } != 0 {
            return Ok(false);
        }
        let mut m = Move {
            skb,
            start: hdr_end as u32,
            left: len - hdr_end as u32,
            failed: 0,
            buf: [0; MOVE_CHUNK as usize],
        };
        // SAFETY: the helper calls `move_step` at most 256 times with `m`, which outlives the
        // call; each step moves a chunk of at most 64 bytes, of at most `MOVE_MAX`.
        unsafe {
            aya_ebpf::helpers::bpf_loop(
                MOVE_MAX / MOVE_CHUNK,
                move_step as *mut c_void,
                (&mut m as *mut Move).cast(),
                0,
            )
        };
        if m.failed != 0 || m.left != 0 {
            return Err(DropReason::Truncated);
        }
        Ok(true)
    }

    #[inline(always)]
    fn tcp_checksum(&self, at: usize, header: u32, pseudo: u32) -> bool {
        let skb = self.0.skb.skb;
        // SAFETY: helper calls on this program's skb; they validate the offset.
        unsafe {
            bpf_l4_csum_replace(skb, at as u32, 0, u64::from(header), 0) == 0
                && bpf_l4_csum_replace(
                    skb,
                    at as u32,
                    0,
                    u64::from(pseudo),
                    u64::from(BPF_F_PSEUDO_HDR),
                ) == 0
        }
    }
}

/// The state of [`toa::Packet::grow`]'s payload move, shared with each [`move_step`].
#[repr(C)]
struct Move {
    skb: *mut __sk_buff,
    /// Where the payload starts (it moves to 8 bytes further).
    start: u32,
    /// Payload bytes not moved yet, from the start (the move goes from the end backward, so
    /// that no byte is overwritten before it is moved).
    left: u32,
    failed: u32,
    buf: [u8; MOVE_CHUNK as usize],
}

/// One step of the payload move, called by `bpf_loop` (0: go on; 1: stop): the last chunk of
/// what is left goes 8 bytes further. A callback for the verifier's sake (see
/// `parse::option_step`).
#[inline(never)]
fn move_step(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `grow`'s move, for the duration of the helper's call.
    let m = unsafe { &mut *ctx.cast::<Move>() };
    let left = m.left;
    if left == 0 {
        return 1;
    }
    let n = if left > MOVE_CHUNK { MOVE_CHUNK } else { left };
    let from = m.start + left - n;
    // SAFETY: helpers on the program's skb, reading and writing `n` (1..=64) bytes of `buf`.
    let moved = unsafe {
        bpf_skb_load_bytes(m.skb as *const c_void, from, m.buf.as_mut_ptr().cast(), n) == 0
            && bpf_skb_store_bytes(m.skb, from + 8, m.buf.as_ptr().cast(), n, 0) == 0
    };
    if !moved {
        m.failed = 1;
        return 1;
    }
    m.left = left - n;
    0
}

/// Redirects the packet to `hop` (neither `Kernel` nor `Unreachable`): directly, or through
/// the kernel's neighbour output to resolve or revalidate the neighbour.
#[inline(always)]
fn send(hop: NextHop) -> i64 {
    match hop.how {
        How::NoNeigh => {
            stats::global(GlobalStat::NeighFallbacks);
            redirect_neigh(hop.ifindex, hop.nexthop)
        }
        How::Revalidate => {
            stats::global(GlobalStat::NeighRevalidations);
            redirect_neigh(hop.ifindex, hop.nexthop)
        }
        // SAFETY: plain helper call.
        _ => unsafe { bpf_redirect(hop.ifindex, 0) },
    }
}

/// `bpf_redirect_neigh` out of `ifindex` to the IPv4 next hop `nexthop` (network order): the
/// kernel's neighbour output (`neigh_output`) fills the MACs in, resolving or revalidating the
/// neighbour as for a forwarded packet.
#[inline(always)]
fn redirect_neigh(ifindex: u32, nexthop: u32) -> i64 {
    // SAFETY: plain-old-data of the kernel's ABI.
    let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
    nh.nh_family = AF_INET;
    nh.__bindgen_anon_1.ipv4_nh = nexthop;
    // SAFETY: a helper reading `nh`, of the size given.
    unsafe {
        bpf_redirect_neigh(
            ifindex,
            &mut nh,
            core::mem::size_of::<bpf_redir_neigh>() as i32,
            0,
        )
    }
}

/// Writes `a` (an RST, or the SYN proxy's segment) over the skb, sized to it first. The TCP
/// checksum goes through the helper, from a zero field: the pseudo-header's sum with
/// `BPF_F_PSEUDO_HDR`, the header's without, so a CHECKSUM_PARTIAL skb ends up with the
/// pseudo-header sum its offload expects and any other with the whole checksum.
#[inline(always)]
fn rewrite(ctx: &TcContext, b: &mut Bounds, a: &Answer) -> Result<(), DropReason> {
    let skb = ctx.skb.skb;
    let len = a.frame_len();
    // SAFETY: helper calls on this program's skb; they validate lengths.
    if b.len != len && unsafe { bpf_skb_change_tail(skb, len as u32, 0) } != 0 {
        return Err(DropReason::Truncated);
    }
    if ctx.data_end() - ctx.data() < len {
        let _ = ctx.pull_data(len as u32);
    }
    *b = bounds(ctx);
    // SAFETY: `b` is the packet the pipeline decided on, its IPv4 header without options
    // (`answer`'s callers check), only its length changed.
    let sums = unsafe { answer::write(b, a)? };
    let check_off = (ETH_LEN + IPV4_MIN_LEN + 16) as u32;
    // SAFETY: helper calls on this program's skb; they validate offsets. The bounds are read
    // again after them (they may move the packet).
    let ok = unsafe {
        bpf_l4_csum_replace(
            skb,
            check_off,
            0,
            u64::from(sums.pseudo),
            u64::from(BPF_F_PSEUDO_HDR),
        ) == 0
            && bpf_l4_csum_replace(skb, check_off, 0, u64::from(sums.header), 0) == 0
    };
    *b = bounds(ctx);
    if ok {
        Ok(())
    } else {
        Err(DropReason::Truncated)
    }
}
