//! XDP: translate in place with incremental checksums (RFC 1624) and redirect to the cached
//! next hop. When the next hop's neighbour is unknown, or a flow's aged hop is to be
//! revalidated (see `nexthop`), the packet is passed untouched to the kernel, where the TC
//! program (attached alongside in XDP mode) translates it and lets `bpf_redirect_neigh` resolve
//! or revalidate the neighbour: a connection never hangs on a missing or moved entry. A segment
//! whose checksum a sender on this host left partial (`csum::partial`) gets its whole checksum
//! first. A segment without a flow is turned into its RST, and a SYN the SYN proxy answers into
//! its SYN-ACK, sent back out of the interface it came in on.

use aya_ebpf::{
    bindings::{
        xdp_action::{XDP_DROP, XDP_PASS, XDP_REDIRECT},
        xdp_md,
    },
    cty::c_void,
    helpers::{
        bpf_check_mtu, bpf_redirect, bpf_xdp_adjust_head, bpf_xdp_adjust_tail, bpf_xdp_load_bytes,
        bpf_xdp_store_bytes,
    },
    programs::XdpContext,
};
use gateway_common::{DropReason, GlobalStat};

use crate::{
    answer::{self, Answer},
    csum, icmp, mss, nat,
    nexthop::How,
    parse::{Bounds, ETH_LEN, IPV4_MIN_LEN, LoadBytes, OPTIONS_MAX, TcpPacket},
    pipeline::{self, Context, Verdict},
    stats,
    toa::{self, Headers},
};

/// The XDP context, as the pipeline needs it.
struct Xdp<'a>(&'a XdpContext);

impl LoadBytes for Xdp<'_> {
    #[inline(always)]
    fn load_bytes(&self, offset: usize, buf: &mut [u8; OPTIONS_MAX], len: usize) -> bool {
        // SAFETY: a helper writing at most `buf.len()` bytes into `buf` (the caller bounds
        // `len`).
        unsafe {
            bpf_xdp_load_bytes(
                self.0.ctx,
                offset as u32,
                buf.as_mut_ptr().cast(),
                len as u32,
            ) == 0
        }
    }
}

impl Context for Xdp<'_> {
    const NEIGH_OUTPUT: bool = false;

    /// XDP sees frames before the kernel looked at them: nothing vouches for a checksum, but a
    /// partial one (`csum::partial`) is computed whole before the segment is translated, and is
    /// right by construction then, as the NIC's would be.
    #[inline(always)]
    fn tcp_trusted(&self, b: &mut Bounds, pkt: &TcpPacket) -> bool {
        csum::partial(b, pkt)
    }

    /// A frame is linear whole (the program is not loaded for multi-buffer frames).
    #[inline(always)]
    fn linearize(&self, _b: &mut Bounds, _len: usize) {}

    /// One frame, one packet.
    #[inline(always)]
    fn segments(&self) -> u32 {
        1
    }
}

/// What [`try_gateway_xdp`] returns for an ICMP error to a gateway address (`Verdict::Icmp`):
/// not an XDP action; [`run`] hands the packet to [`icmp_error`] then. (It returns a translated
/// segment's action marked for the MSS clamp: `mss::mark`.)
const ICMP_ERROR: u32 = u32::MAX;

/// The XDP program: returns its action, a drop counted by its reason. Functions of their own in
/// the object (BPF-to-BPF calls), siblings under this one: [`packet`] (every packet first),
/// [`icmp_error`] (an ICMP error to a gateway address) and [`mss_clamp`] (a translated SYN or
/// SYN-ACK), then [`client_address`] (a client's segment while its backend has not seen the
/// client's address: `toa`). Verifier workaround: the
/// stack of a program's frames together is at most 512 bytes, and each of these two takes
/// more than half of it.
#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    match packet(ctx.ctx) {
        ICMP_ERROR => icmp_error(ctx.ctx),
        marked => {
            let action = mss::action(marked);
            if action == XDP_REDIRECT {
                if marked & mss::CLAMP != 0 {
                    mss_clamp(ctx.ctx, mss::app(marked));
                }
                if marked & toa::MARK != 0 {
                    return client_address(ctx.ctx);
                }
            }
            action
        }
    }
}

/// [`try_gateway_xdp`] on the raw context, a drop counted.
#[inline(never)]
fn packet(ctx: *mut xdp_md) -> u32 {
    stats::or_drop(try_gateway_xdp(&XdpContext::new(ctx)), XDP_DROP)
}

/// Every packet's handling but an ICMP error's ([`ICMP_ERROR`]).
#[inline(always)]
pub fn try_gateway_xdp(ctx: &XdpContext) -> Result<u32, DropReason> {
    stats::global(GlobalStat::XdpPackets);
    let mut b = bounds(ctx);
    let mut answer = Answer::EMPTY;
    let t = match pipeline::prepare(
        &mut b,
        &Xdp(ctx),
        ctx.ctx as *mut c_void,
        ctx.ingress_ifindex() as u32,
        &mut answer,
    )? {
        Verdict::Pass => return Ok(XDP_PASS),
        Verdict::Answer => {
            let action = send_answer(ctx, &mut b, &answer, ctx.ingress_ifindex() as u32)?;
            // The SYN proxy's SYN-ACK is clamped by `run` (`answer.arg`: its app's).
            return Ok(mss::mark_answer(action, answer.flags, answer.arg));
        }
        Verdict::Icmp => return Ok(ICMP_ERROR),
        Verdict::Translate(t) => t,
    };
    if t.pre {
        // Before the hop is looked at: a packet passed to the kernel below goes on as this
        // segment (the TC program finds its flow and translates it).
        rewrite(ctx, &mut b, &answer)?;
    }
    let ifindex = match t.hop.how {
        How::Ready => t.hop.ifindex,
        How::NoNeigh => {
            stats::global(GlobalStat::NeighFallbacks);
            return Ok(XDP_PASS);
        }
        // Counted by TC, which sends it (`neigh_revalidations`).
        How::Kernel | How::Revalidate => return Ok(XDP_PASS),
        How::Unreachable => return Err(DropReason::NoRoute),
    };
    let pkt = &t.pkt;
    // The TCP checksum: word 8 of the header.
    let check = b
        .words::<1>(pkt.l4_off() + 16)
        .ok_or(DropReason::Truncated)?;
    // SAFETY: bounds-checked and aligned (see `Bounds::words`).
    let mut field = unsafe { (*check)[0] };
    // (A segment the SYN proxy wrote, `pre`, has its whole checksum: `pkt` no longer
    // describes its lengths.)
    if !t.pre && csum::partial(&b, pkt) {
        // Completed here, before any byte changes: the redirected frame reaches its receiver
        // without the skb that would have said CHECKSUM_PARTIAL. One too long for the datapath
        // goes to the kernel as it came, where the skb still says it (TC translates it).
        match csum::complete_partial(&b, pkt) {
            Some(whole) => {
                // A whole checksum equal to the pseudo-header's sum (one in 65,536) completes to
                // itself: not a partial one, not counted (the daemon warns of what is).
                if whole != field {
                    stats::partial_checksum(ctx.ingress_ifindex() as u32);
                }
                field = whole;
            }
            None => {
                // Too long to tell here: to the kernel as it came (counted: a whole checksum
                // equal to its pseudo-header's sum, 1 in 65,536, is rarer than a sender's
                // partial one).
                stats::partial_checksum(ctx.ingress_ifindex() as u32);
                return Ok(XDP_PASS);
            }
        }
    }
    // SAFETY: `b` is the packet `t` was prepared from, unchanged since.
    let rw = unsafe { nat::write_headers(&b, &t.pkt, t.flow)? };
    // SAFETY: as above (the headers' rewrite moved nothing).
    unsafe {
        (*check)[0] = csum::apply(field, rw.addr_diff + rw.port_diff);
    }
    stats::traffic(t.flow, u64::from(pkt.l3_len));
    // SAFETY: plain helper call; it returns XDP_REDIRECT, or XDP_ABORTED on a bad ifindex.
    let action = unsafe { bpf_redirect(ifindex, 0) } as u32;
    // A segment of a handshake (the flow not established: SYN, SYN-ACK, the SYN the proxy
    // wrote over the client's segment) goes by `run`'s MSS clamp, if its app has one; a
    // client's segment before its backend's end is established, by its TOA step.
    Ok(toa::mark(
        mss::mark(action, t.flow.state, t.flow.app_id),
        t.flow,
    ))
}

/// An ICMP error to a gateway address (`Verdict::Icmp`) on the raw context (see [`run`]): the
/// program's action, a drop counted.
#[inline(never)]
fn icmp_error(ctx: *mut xdp_md) -> u32 {
    stats::or_drop(send_icmp(&XdpContext::new(ctx)), XDP_DROP)
}

/// Translates an ICMP error about a flow and redirects it to the flow's next hop; one whose
/// hop the kernel must resolve or revalidate goes to it untouched (the TC program translates
/// it, and counts it then), as does one about no flow.
#[inline(always)]
fn send_icmp(ctx: &XdpContext) -> Result<u32, DropReason> {
    let mut b = bounds(ctx);
    let Some(t) = icmp::prepare(
        &mut b,
        &Xdp(ctx),
        ctx.ctx as *mut c_void,
        ctx.ingress_ifindex() as u32,
    )?
    else {
        return Ok(XDP_PASS);
    };
    match t.hop.how {
        How::Ready => {}
        How::NoNeigh => {
            stats::global(GlobalStat::NeighFallbacks);
            return Ok(XDP_PASS);
        }
        How::Kernel | How::Revalidate => return Ok(XDP_PASS),
        How::Unreachable => return Err(DropReason::NoRoute),
    }
    icmp::admit(&t.err)?;
    // SAFETY: `b` is the packet `t` was prepared from, unchanged since.
    unsafe { icmp::write(&b, &t.err, t.flow)? };
    t.err.count();
    // SAFETY: plain helper call; it returns XDP_REDIRECT, or XDP_ABORTED on a bad ifindex.
    Ok(unsafe { bpf_redirect(t.hop.ifindex, 0) } as u32)
}

/// Clamps the MSS of the translated (redirected) SYN or SYN-ACK of app `app_id` in `ctx`
/// (`mss::CLAMP`), its whole TCP checksum updated; in a function of its own in the object (a
/// BPF-to-BPF call, see `mss::CLAMP`).
#[inline(never)]
fn mss_clamp(ctx: *mut xdp_md, app_id: u32) {
    let ctx = XdpContext::new(ctx);
    let mut b = bounds(&ctx);
    let Ok((diff, l4_off)) = mss::clamp(&mut b, &Xdp(&ctx), app_id) else {
        return;
    };
    if diff == 0 {
        return;
    }
    if let Some(check) = b.words::<1>(l4_off + 16) {
        // SAFETY: bounds-checked and aligned (see `Bounds::words`).
        unsafe { (*check)[0] = csum::apply((*check)[0], diff) };
    }
}

/// The TOA step of a translated (redirected) client segment in `ctx` (`toa::MARK`): the
/// program's action (the redirect, or a drop counted); in a function of its own in the object
/// (a BPF-to-BPF call, see `mss::CLAMP`).
#[inline(never)]
fn client_address(ctx: *mut xdp_md) -> u32 {
    let ctx = XdpContext::new(ctx);
    stats::or_drop(toa::apply(&Xdp(&ctx)).map(|()| XDP_REDIRECT), XDP_DROP)
}

impl toa::Packet for Xdp<'_> {
    /// A redirected frame's checksum is whole (a partial one was completed first).
    const CHECKSUM_IN_HEADERS: bool = true;

    #[inline(always)]
    fn bounds(&self) -> Bounds {
        bounds(self.0)
    }

    #[inline(always)]
    fn load(&self, h: &mut Headers, len: u32) -> bool {
        // SAFETY: a helper writing `len` bytes into `h`, which holds them.
        unsafe { bpf_xdp_load_bytes(self.0.ctx, 0, h.as_mut_ptr().cast(), len) == 0 }
    }

    #[inline(always)]
    fn store(&self, h: &Headers, len: u32) -> bool {
        // SAFETY: a helper reading `len` bytes of `h`.
        unsafe { bpf_xdp_store_bytes(self.0.ctx, 0, h.as_ptr() as *mut c_void, len) == 0 }
    }

    #[inline(always)]
    fn can_grow(&self, ifindex: u32) -> bool {
        let mut mtu = 0u32;
        // SAFETY: a helper on this program's context; it writes `mtu`.
        unsafe { bpf_check_mtu(self.0.ctx.cast(), ifindex, &mut mtu, 8, 0) == 0 }
    }

    /// At the frame's head (its headroom): the headers are stored again 8 bytes earlier.
    #[inline(always)]
    fn grow(&self, _hdr_end: usize) -> Result<bool, DropReason> {
        // SAFETY: a helper on this program's context; it only moves the frame's start.
        Ok(unsafe { bpf_xdp_adjust_head(self.0.ctx, -8) } == 0)
    }

    #[inline(always)]
    fn tcp_checksum(&self, _at: usize, _header: u32, _pseudo: u32) -> bool {
        true
    }
}

/// Writes `a` over the frame (sized to it first), with its checksums (see `answer`); `b` is
/// read again after.
#[inline(always)]
fn rewrite(ctx: &XdpContext, b: &mut Bounds, a: &Answer) -> Result<(), DropReason> {
    let written = write_answer(ctx.ctx, a);
    *b = bounds(ctx);
    if written {
        Ok(())
    } else {
        Err(DropReason::Truncated)
    }
}

/// [`rewrite`]'s work, a function of its own in the object (a BPF-to-BPF call) on the raw
/// context; whether it was written. Verifier workaround: inlined where the SYN proxy rewrites a
/// packet before translating it and where the datapath answers one, each way out of the
/// frame's two sizes carried its own state into the rest of the program, which went past the
/// verifier's million instructions.
#[inline(never)]
fn write_answer(ctx: *mut xdp_md, a: &Answer) -> bool {
    let ctx = XdpContext::new(ctx);
    let b = bounds(&ctx);
    let delta = a.frame_len() as i32 - (b.data_end - b.data) as i32;
    // SAFETY: a helper on this program's context; it only moves the end of the frame.
    if delta != 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return false;
    }
    let b = bounds(&ctx);
    // SAFETY: `b` is the packet the pipeline decided on, its IPv4 header without options
    // (`answer`'s callers check), only its length changed.
    let Ok(sums) = (unsafe { answer::write(&b, a) }) else {
        return false;
    };
    let Some(check) = b.words::<1>(ETH_LEN + IPV4_MIN_LEN + 16) else {
        return false;
    };
    // SAFETY: bounds-checked and aligned (see `Bounds::words`).
    unsafe { (*check)[0] = sums.checksum() };
    true
}

/// Writes `a` (an RST, or the SYN proxy's segment) over the frame and sends it back out of
/// `ingress`. Through a redirect to the ingress device rather than XDP_TX: on veth, XDP_TX
/// wakes the peer's receive side only when the peer has an XDP program of its own
/// (`veth_xdp_flush`), so a frame sent back to a host without one waits for its next packet;
/// a redirect goes through `ndo_xdp_xmit`, which always does. (Both work on a NIC.)
#[inline(always)]
fn send_answer(
    ctx: &XdpContext,
    b: &mut Bounds,
    a: &Answer,
    ingress: u32,
) -> Result<u32, DropReason> {
    rewrite(ctx, b, a)?;
    // SAFETY: plain helper call; it returns XDP_REDIRECT, or XDP_ABORTED on a bad ifindex.
    Ok(unsafe { bpf_redirect(ingress, 0) } as u32)
}

/// The bounds of the frame in `ctx`.
#[inline(always)]
fn bounds(ctx: &XdpContext) -> Bounds {
    Bounds {
        data: ctx.data(),
        data_end: ctx.data_end(),
        len: ctx.data_end() - ctx.data(),
    }
}
