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
    maps::Config,
    net::tcp_flags::{ACK, SYN},
    syncookie::{self, Handshake, MSS_TABLE},
};

use crate::{answer::Answer, maps::HALF_OPEN, parse::TcpPacket};

/// Whether the app `app_id` has its cap of half-open flows: its SYNs get cookies.
#[inline(always)]
pub fn half_open_full(app_id: u32, cfg: &Config) -> bool {
    HALF_OPEN
        .get(app_id)
        .is_some_and(|n| *n >= i64::from(cfg.half_open_max()))
}

/// Adds `n` to the half-open flows of `app_id` (atomically: every CPU counts into one slot).
#[inline(always)]
pub fn half_open_add(app_id: u32, n: i64) {
    if let Some(slot) = HALF_OPEN.get_ptr_mut(app_id) {
        // SAFETY: a map value of 8 bytes, 8-aligned, that lives as long as the map; others
        // touch it only atomically (the daemon's scan writes it whole, a race it tolerates).
        // The BPF target has no `AtomicI64`: the intrinsic is its `lock xadd` (the result unused).
        unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(slot, n) };
    }
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

/// The SYN-ACK with a cookie answering the SYN `pkt` (whose MSS option is `mss`) at `now_ns`:
/// back to the client, `ack` its ISN + 1 (any data of the SYN is not taken), a zero window, the
/// cookie's MSS.
#[inline(always)]
pub fn cookie_syn_ack(cfg: &Config, pkt: &TcpPacket, mss: Option<u16>, now_ns: u64) -> Answer {
    // Without an MSS option, 536 (RFC 9293 §3.7.1).
    let index = syncookie::mss_index(mss.unwrap_or(MSS_TABLE[0]));
    let cookie = syncookie::make(
        &cfg.cookie_key,
        &handshake(pkt, pkt.seq),
        syncookie::counter(now_ns),
        index,
    );
    Answer {
        back: true,
        seq: cookie,
        ack: pkt.seq.wrapping_add(1),
        flags: SYN | ACK,
        window: 0,
        mss: MSS_TABLE[(index & 3) as usize],
    }
}

/// The MSS a valid cookie in the ACK `pkt` carries (its `ack` less one), if it is one.
#[inline(always)]
pub fn cookie_mss(cfg: &Config, pkt: &TcpPacket, now_ns: u64) -> Option<u16> {
    syncookie::check(
        &cfg.cookie_key,
        &handshake(pkt, pkt.seq.wrapping_sub(1)),
        pkt.ack.wrapping_sub(1),
        syncookie::counter(now_ns),
    )
}

/// The SYN the cookie's ACK `pkt` becomes, on its way (translated afterwards): the client's
/// ISN, its window, the cookie's MSS; the ACK's data, if any, is not taken (the client sends
/// it again).
#[inline(always)]
pub fn backend_syn(pkt: &TcpPacket, mss: u16) -> Answer {
    Answer {
        back: false,
        seq: pkt.seq.wrapping_sub(1),
        ack: 0,
        flags: SYN,
        window: pkt.window,
        mss,
    }
}

/// The ACK that completes the backend's handshake, answering its SYN-ACK `pkt`: back to the
/// backend, `seq` the client's next (`client_seq`), `ack` the backend's ISN + 1, the client's
/// window.
#[inline(always)]
pub fn backend_ack(pkt: &TcpPacket, client_seq: u32, window: u16) -> Answer {
    Answer {
        back: true,
        seq: client_seq,
        ack: pkt.seq.wrapping_add(1),
        flags: ACK,
        window,
        mss: 0,
    }
}
