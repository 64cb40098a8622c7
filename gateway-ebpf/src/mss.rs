//! The per-app MSS clamp (`AppConfig::mss_clamp`, `gateway app create --mss`): the MSS option
//! of the app's SYNs (client → backend) and SYN-ACKs (backend → client) is lowered to the clamp
//! when it is larger, as netfilter's `TCPMSS --set-mss` does, for platforms that know a path
//! MTU smaller than their links' (tunnels): each end then sends segments that fit, and path
//! MTU discovery is not needed at all. A segment without the option is left as it is: its peer
//! assumes 536 (RFC 9293 §3.7.1), below any clamp (`MSS_CLAMP_MIN`). The SYN proxy's own SYN-ACK
//! (its cookie's MSS) and SYN to the backend are clamped the same way as they leave.
//!
//! An app whose backends are told the client's address (`toa`) has its SYN-ACKs' MSS (the
//! backend's, or the SYN proxy's cookie's: what the client's segments are sized by) lowered by
//! the option's 8 bytes below the clamp, or below what they announce without one: the client's
//! full-sized segments then still fit the path once the option is added (as LVS FULLNAT
//! lowers the MSS for its TOA). The backend's segments do not grow: its SYN's MSS is not
//! lowered for it.
//!
//! The clamp is applied by the attach mode once the segment is translated and its checksum
//! whole ([`CLAMP`], [`clamp`]): the option's value is rewritten in place and the TCP checksum
//! updated by its difference (XDP in the field; TC through `bpf_l4_csum_replace`, which leaves
//! a CHECKSUM_PARTIAL skb's field alone, as it must).

use gateway_common::{
    DropReason, GlobalStat,
    maps::{APP_CLIENT_ADDRESS_TOA, CT_ESTABLISHED},
    net::{
        tcp_flags::{ACK, SYN},
        toa,
    },
};

use crate::{
    csum::diff16,
    maps::APP_CONFIG,
    parse::{self, Bounds, ETH_LEN},
    pipeline::Context,
    stats,
};

/// What an attach mode's packet function or's into its action for a translated segment
/// ([`mark`]): the app id, and [`CLAMP`] for a segment of a handshake; its `run` then clamps
/// that segment if it is a SYN or SYN-ACK ([`clamp`], in a function of its own) and returns the
/// action alone ([`action`]). Verifier workaround: clamped where it is translated, or even asked
/// there whether to clamp, every state of the translation went through the test, past the
/// verifier's million instructions; the marks are arithmetic on values live there anyway, no
/// branch. Actions are below 2^16 and non-negative; app ids below `MAX_APPS` (2^14).
pub const CLAMP: u32 = 1 << 30;
const APP_SHIFT: u32 = 16;
const APP_MASK: u32 = (1 << 14) - 1;

/// `action` (of a translated segment of a flow in conntrack state `state`, of app `app_id`)
/// with its marks: [`CLAMP`] while the flow is not established (its SYN, SYN-ACK, the SYN
/// proxy's SYN to the backend; an established flow's segments are never clamped).
#[inline(always)]
pub fn mark(action: u32, state: u8, app_id: u32) -> u32 {
    action
        | (u32::from((state & CT_ESTABLISHED) ^ CT_ESTABLISHED) << 28)
        | ((app_id & APP_MASK) << APP_SHIFT)
}

/// `action` of a segment the gateway answers with (`answer`), of flags `flags` (an app's: the SYN
/// proxy's SYN-ACK), with its marks: [`CLAMP`] for a SYN-ACK.
#[inline(always)]
pub fn mark_answer(action: u32, flags: u8, app_id: u32) -> u32 {
    action | (u32::from(flags & SYN) << 29) | ((app_id & APP_MASK) << APP_SHIFT)
}

/// The action of a marked return value.
#[inline(always)]
pub const fn action(marked: u32) -> u32 {
    marked & ((1 << APP_SHIFT) - 1)
}

/// The app of a marked return value that has [`CLAMP`].
#[inline(always)]
pub const fn app(marked: u32) -> u32 {
    (marked >> APP_SHIFT) & APP_MASK
}

/// Lowers the MSS option of the translated IPv4/TCP segment in `b`, if it is a SYN or SYN-ACK,
/// to app `app_id`'s clamp, if the option is larger: writes the new value and returns the TCP
/// checksum's difference (0: nothing changed), and the TCP header's offset. The segment is made linear up to its options
/// first (`b` refreshed). Counted `mss_clamped`.
#[inline(always)]
pub fn clamp<C: Context>(
    b: &mut Bounds,
    checks: &C,
    app_id: u32,
) -> Result<(u32, usize), DropReason> {
    let (clamp, adds) = APP_CONFIG.get(app_id).map_or((0, false), |c| {
        (c.mss_clamp, c.flags & APP_CLIENT_ADDRESS_TOA != 0)
    });
    let ip = b.words::<1>(ETH_LEN).ok_or(DropReason::Truncated)?;
    // SAFETY: bounds-checked by `words`.
    let ihl = usize::from(unsafe { (*ip)[0] } as u8 & 0x0f) * 4;
    let l4_off = ETH_LEN + ihl;
    let tcp = b.words::<7>(l4_off).ok_or(DropReason::Truncated)?;
    // Bytes 12 (data offset) and 13 (flags): word 6.
    // SAFETY: bounds-checked by `words`.
    let word = unsafe { (*tcp)[6] };
    let tcp_len = usize::from((word as u8) >> 4) * 4;
    let flags = (word >> 8) as u8;
    // A SYN-ACK goes to the client: with the client's address added (`toa`), its segments grow
    // by the option, so the MSS it may send is 8 bytes less. (A client's own SYN-ACK, in a
    // simultaneous open, is lowered too: 8 bytes lost for nothing, and not worth a test.)
    let room = if adds && flags & ACK != 0 {
        u16::from(toa::LEN)
    } else {
        0
    };
    if (clamp == 0 && room == 0) || flags & SYN == 0 {
        return Ok((0, l4_off));
    }
    let Some((value, mss)) = parse::mss_field(checks, l4_off, tcp_len) else {
        return Ok((0, l4_off));
    };
    let limit = if clamp == 0 || mss < clamp {
        mss
    } else {
        clamp
    };
    let clamp = limit.saturating_sub(room);
    if mss <= clamp {
        return Ok((0, l4_off));
    }
    let [hi, lo] = mss.to_be_bytes();
    checks.linearize(b, value + 2);
    let field = b
        .ptr_at_checked::<[u8; 2]>(value)
        .ok_or(DropReason::Truncated)?;
    let new = clamp.to_be_bytes();
    // SAFETY: bounds-checked by `ptr_at_checked`; bytes have no alignment.
    unsafe { *field = new };
    stats::global(GlobalStat::MssClamped);
    // The checksum sums 16-bit words from the header's start (an even offset): the value's
    // bytes are one word's high and low halves at an even offset, or straddle two words (the
    // low half of one, the high half of the next) at an odd one, where it counts byte-swapped.
    let (old, new) = if (value - l4_off).is_multiple_of(2) {
        (u16::from_ne_bytes([hi, lo]), u16::from_ne_bytes(new))
    } else {
        (
            u16::from_ne_bytes([lo, hi]),
            u16::from_ne_bytes([new[1], new[0]]),
        )
    };
    Ok((diff16(0, old, new), l4_off))
}
