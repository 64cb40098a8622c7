//! Conntrack: one global LRU table holding, per connection, a forward entry (client → public,
//! keyed as it arrives) and a reverse entry (backend → SNAT). Look up the reply direction
//! first (it is the only kind of entry keyed by a SNAT address), then the forward one.

use aya_ebpf::bindings::BPF_NOEXIST;
use gateway_common::{
    DropReason,
    maps::{
        CT_ESTABLISHED, CT_FIN_FORWARD, CT_FIN_REVERSE, CT_RST, CT_SYN_ACK_SEEN, CT_SYN_SEEN,
        DIR_FORWARD, DIR_REVERSE, Flow, FlowKey4, LAST_SEEN_GRANULARITY_NS,
    },
    net::tcp_flags::{ACK, FIN, RST, SYN},
};

use crate::{maps::CONNTRACK, parse::TcpPacket};

/// The entry of `key`, if any.
#[inline(always)]
pub fn lookup(key: &FlowKey4) -> Option<*mut Flow> {
    CONNTRACK.get_ptr_mut(key)
}

/// Removes both entries of the connection `flow` belongs to (`key` is `flow`'s own key).
#[inline(always)]
pub fn remove_pair(key: &FlowKey4, flow: &Flow) {
    let _ = CONNTRACK.remove(flow.peer_key());
    let _ = CONNTRACK.remove(key);
}

/// A connection's pair of entries being inserted, both with `BPF_NOEXIST`; this type owns the
/// pair's insert and its rollback. [`Claim::reverse`] inserts the reverse entry first: its
/// failure with EEXIST means "this SNAT port is taken", which the caller retries with another
/// port. The forward entry is then completed on the caller's stack (state, counters, next
/// hop) and inserted by [`Claim::commit`], which removes the reverse entry if that fails.
/// Every path from a claim commits it (a claim dropped uncommitted would leave its reverse
/// entry to expire).
#[must_use = "a claimed pair is committed, or its reverse entry is left behind"]
pub struct Claim {
    reverse_key: FlowKey4,
}

impl Claim {
    /// Inserts `reverse` at `reverse_key`: the claim of its SNAT port. `None`: the key is
    /// taken.
    #[inline(always)]
    pub fn reverse(reverse_key: &FlowKey4, reverse: &Flow) -> Result<Option<Claim>, DropReason> {
        match CONNTRACK.insert(reverse_key, reverse, u64::from(BPF_NOEXIST)) {
            Ok(()) => Ok(Some(Claim {
                reverse_key: *reverse_key,
            })),
            Err(e) if e == -EEXIST => Ok(None),
            Err(_) => Err(DropReason::ConntrackInsert),
        }
    }

    /// Inserts the completed `forward` entry at `key`, making the pair; if that fails, removes
    /// the reverse entry.
    #[inline(always)]
    pub fn commit(self, key: &FlowKey4, forward: &Flow) -> Result<(), DropReason> {
        if CONNTRACK
            .insert(key, forward, u64::from(BPF_NOEXIST))
            .is_err()
        {
            let _ = CONNTRACK.remove(self.reverse_key);
            return Err(DropReason::ConntrackInsert);
        }
        Ok(())
    }
}

const EEXIST: i32 = 17;

/// Updates the conntrack state bits and last-seen time of `flow` for a packet with TCP `flags`; a state
/// change that the other direction must know (SYN-ACK, established, FIN, RST) is written to the
/// peer entry too. Only changes are written.
#[inline(always)]
pub fn track(flow: &mut Flow, pkt: &TcpPacket, now: u64) {
    let f = pkt.flags;
    let mut set = 0u8;
    if f & RST != 0 {
        set |= CT_RST;
    }
    if f & FIN != 0 {
        set |= if flow.direction == DIR_FORWARD {
            CT_FIN_FORWARD
        } else {
            CT_FIN_REVERSE
        };
    }
    if flow.direction == DIR_REVERSE && f & (SYN | ACK) == (SYN | ACK) {
        set |= CT_SYN_ACK_SEEN;
    }
    if flow.direction == DIR_FORWARD && f & (SYN | ACK) == ACK && flow.state & CT_SYN_ACK_SEEN != 0
    {
        set |= CT_ESTABLISHED;
    }
    if f & SYN != 0 && flow.direction == DIR_FORWARD {
        set |= CT_SYN_SEEN;
    }
    let new = flow.state | set;
    // A state change writes the entry anyway: its time is exact then, which the SNAT port
    // reuse of closed connections relies on (see `nat::SNAT_REUSE_IDLE_NS`).
    let exact = new != flow.state;
    if exact {
        flow.state = new;
        if let Some(peer) = lookup(&flow.peer_key()) {
            // SAFETY: a conntrack value pointer from the map; state bits are or-ed in and
            // the time set, both plain stores of this connection's own entry.
            unsafe {
                (*peer).state |= set;
                (*peer).last_seen_ns = now;
            }
        }
    }
    if exact || now.wrapping_sub(flow.last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
        flow.last_seen_ns = now;
    }
    flow.packets += 1;
    flow.bytes += u64::from(pkt.l3_len);
}
