//! The SYN proxy: what keeps a SYN flood from holding an app's state (docs/datapath.md, "SYN
//! floods"). Each app's half-open flows are counted (`HALF_OPEN`); at its cap
//! (`Config::half_open_max`) the app's SYNs are answered with a SYN cookie
//! (`gateway_common::syncookie`) and nothing is kept. A client's ACK that carries a valid
//! cookie proves the handshake: it makes the flow and becomes the SYN to the backend, whose
//! SYN-ACK the gateway answers with the handshake's last ACK (netfilter's SYNPROXY does the
//! same). The backend's sequence numbers then differ from the cookie the client was given by
//! `Flow::seq_delta`, translated on every segment (`nat`).
//!
//! The cookie's SYN-ACK offers a zero window (as SYNPROXY's): the client sends nothing until the
//! backend's first segment, or its zero-window probe, opens it, so nothing it sends is lost
//! while the backend's handshake is under way. It carries only an MSS option: window scaling,
//! SACK and timestamps are off for a proxied connection.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use gateway_common::{
    maps::{CT_SYN_ACK_SEEN, Config, DIR_FORWARD, Flow, TOA_ADD, TRACK_PROXIED, is_closed},
    net::tcp_flags::{ACK, FIN, RST, SYN},
    syncookie::{self, Handshake, MSS_TABLE},
};

use crate::{
    answer::{Answer, OPTION_MSS, OPTION_TOA},
    maps::{COOKIES, HALF_OPEN},
    parse::{IPV4_MIN_LEN, TcpPacket},
};

/// Whether the app `app_id` has its cap of half-open flows, or all apps together theirs: its
/// SYNs get cookies.
#[inline(always)]
pub fn half_open_full(app_id: u32, cfg: &Config) -> bool {
    let count = |slot: u32| HALF_OPEN.get(slot).copied().unwrap_or(0);
    cfg.half_open_full(count(app_id), count(0))
}

/// Adds `n` to the half-open flows of `app_id`, and of all apps (slot 0); atomically: every
/// CPU counts into the same slots.
#[inline(always)]
pub fn half_open_add(app_id: u32, n: i64) {
    for slot in [app_id, 0] {
        if let Some(slot) = HALF_OPEN.get_ptr_mut(slot) {
            // SAFETY: a map value of 8 bytes, 8-aligned, that lives as long as the map; others
            // touch it only atomically (the daemon's scan writes it whole, a race it
            // tolerates). The BPF target has no `AtomicI64`: the intrinsic is its `lock xadd`
            // (the result unused).
            unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(slot, n) };
        }
    }
}

/// Notes that `app_id` gives cookies in counter step `counter` (written only when it moves).
#[inline(always)]
fn gave_cookies(app_id: u32, counter: u64) {
    if let Some(at) = COOKIES.get_ptr_mut(app_id) {
        // SAFETY: a map value; a plain store (any CPU's value of the same step will do).
        unsafe {
            if *at != counter {
                *at = counter;
            }
        }
    }
}

/// Whether `app_id` gave cookies in counter step `counter` or the one before: only then can an
/// ACK carry one of its valid cookies.
#[inline(always)]
pub fn gives_cookies(app_id: u32, counter: u64) -> bool {
    COOKIES
        .get(app_id)
        .is_some_and(|at| *at != 0 && counter.wrapping_sub(*at) <= 1)
}

/// [`syncookie::check`] as a function of its own in the object (a BPF-to-BPF call). Verifier
/// workaround: SipHash's few hundred straight instructions, inlined at each of the three places
/// a cookie is made or checked, were verified again on every path to each: the programs went
/// past the verifier's million instructions.
#[inline(never)]
fn check(key: &[u64; 2], hs: &Handshake, cookie: u32, counter: u64) -> u32 {
    match syncookie::check(key, hs, cookie, counter) {
        Some(mss) => u32::from(mss),
        None => 0,
    }
}

/// [`syncookie::make`] as a function of its own (see [`check`]).
#[inline(never)]
fn make(key: &[u64; 2], hs: &Handshake, counter: u64, mss_index: u32) -> u32 {
    syncookie::make(key, hs, counter, mss_index)
}

/// The handshake of `pkt` (a SYN, or its ACK: `isn` given) as the cookie sees it.
#[inline(always)]
fn handshake(pkt: &TcpPacket, isn: u32) -> Handshake {
    Handshake {
        src_ip: pkt.key.src_ip,
        dst_ip: pkt.key.dst_ip,
        src_port: pkt.key.src_port,
        dst_port: pkt.key.dst_port,
        isn,
    }
}

/// The SYN-ACK with a cookie answering the SYN `pkt` of app `app_id` (whose MSS option is
/// `mss`) at `now_ns`: back to the client, `ack` its ISN + 1 (any data of the SYN is not taken),
/// a zero window, the cookie's MSS.
#[inline(always)]
pub fn cookie_syn_ack(
    cfg: &Config,
    app_id: u32,
    pkt: &TcpPacket,
    mss: Option<u16>,
    now_ns: u64,
) -> Answer {
    // Without an MSS option, 536 (RFC 9293 §3.7.1).
    let index = syncookie::mss_index(mss.unwrap_or(MSS_TABLE[0]));
    let counter = syncookie::counter(now_ns);
    gave_cookies(app_id, counter);
    let cookie = make(&cfg.cookie_key, &handshake(pkt, pkt.seq), counter, index);
    Answer {
        back: true,
        seq: cookie,
        ack: pkt.seq.wrapping_add(1),
        flags: SYN | ACK,
        window: 0,
        option: OPTION_MSS,
        value: MSS_TABLE[(index & 3) as usize],
        arg: app_id,
    }
}

/// A valid cookie in the ACK `pkt` of app `app_id` (its `ack` less one), if it is one: the MSS
/// it carries in the high 32 bits, the client's ISN in the low ones; 0 if not. (A plain `u64`:
/// an `Option` of a pair left registers the verifier saw read uninitialised.) Only while the
/// app gives cookies ([`gives_cookies`]). The ISN is `seq - 1` for the handshake's ACK, or
/// `seq` for a bare ACK that is the client's zero-window probe (Linux numbers it
/// `snd_una - 1`: its ACK of the cookie was lost, and the cookie's zero window leaves it
/// nothing else to send).
#[inline(always)]
pub fn cookie_mss(cfg: &Config, app_id: u32, pkt: &TcpPacket, now_ns: u64) -> u64 {
    let counter = syncookie::counter(now_ns);
    if !gives_cookies(app_id, counter) {
        return 0;
    }
    let cookie = pkt.ack.wrapping_sub(1);
    let isn = pkt.seq.wrapping_sub(1);
    let mss = check(&cfg.cookie_key, &handshake(pkt, isn), cookie, counter);
    if mss != 0 {
        return (u64::from(mss) << 32) | u64::from(isn);
    }
    if pkt.payload_len() != 0 {
        return 0;
    }
    let mss = check(&cfg.cookie_key, &handshake(pkt, pkt.seq), cookie, counter);
    if mss != 0 {
        (u64::from(mss) << 32) | u64::from(pkt.seq)
    } else {
        0
    }
}

/// Whether the client's segment `pkt` on the proxied flow `flow` (its forward entry) carries the
/// SYN to the backend again: the backend has not answered (no SYN-ACK seen, not closed), and it
/// is an ACK of the cookie (no SYN, FIN or RST; any data it carries is not taken) at the
/// client's ISN + 1 or its ISN (a zero-window probe), in an IPv4 header without options.
#[inline(always)]
pub fn resends_syn(flow: &Flow, pkt: &TcpPacket) -> bool {
    flow.track & TRACK_PROXIED != 0
        && flow.direction == DIR_FORWARD
        && flow.state & CT_SYN_ACK_SEEN == 0
        && !is_closed(flow.state)
        && pkt.flags & (SYN | ACK | RST | FIN) == ACK
        && pkt.ack == flow.ack_max
        && flow.seq_end.wrapping_sub(pkt.seq) <= 1
        && pkt.ihl() == IPV4_MIN_LEN
}

/// The SYN to the backend of a proxied flow, written over a segment of its client: the client's
/// ISN `isn`, its window, the cookie's MSS; the segment's data, if any, is not taken (the
/// client sends it again).
#[inline(always)]
pub fn backend_syn(pkt: &TcpPacket, isn: u32, mss: u16) -> Answer {
    Answer {
        back: false,
        seq: isn,
        ack: 0,
        flags: SYN,
        window: pkt.window,
        option: OPTION_MSS,
        value: mss,
        arg: 0,
    }
}

/// The ACK that completes the backend's handshake, answering its SYN-ACK `pkt` on the flow of
/// the reverse entry `flow`: back to the backend, `seq` the client's next (`client_seq`), `ack`
/// the backend's ISN + 1, the client's window; with the client's address (the entry's
/// destination) in a TOA option if the flow adds it (`TOA_ADD`, see `toa`): the segment that
/// makes the backend's end of the connection.
#[inline(always)]
pub fn backend_ack(pkt: &TcpPacket, client_seq: u32, window: u16, flow: &Flow) -> Answer {
    // `OPTION_TOA` with `TOA_ADD` (bit 1), else `OPTION_NONE` (0). Verifier workaround:
    // arithmetic, no branch (one around these fields left the answer's other fields undefined
    // to the verifier on a path that joins it: `!read_ok`).
    let with = 0u32.wrapping_sub(u32::from(flow.toa & TOA_ADD) >> 1);
    Answer {
        back: true,
        seq: client_seq,
        ack: pkt.seq.wrapping_add(1),
        flags: ACK,
        window,
        option: OPTION_TOA & with as u8,
        value: flow.nat_dst_port & with as u16,
        arg: flow.nat_dst_ip & with,
    }
}
