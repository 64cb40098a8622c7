//! Maglev lookup tables (Eisenbud et al., NSDI'16), weighted as Katran does: each backend has a
//! permutation of the table's slots derived from its address, and backends take turns claiming
//! their next free preferred slot, a backend of weight `w` taking `w` turns per round. Adding or
//! removing a backend moves only about its share of slots.
//!
//! [`choose`] walks a table as the datapath does at a SYN, so that userspace can predict the
//! datapath's choice.

use std::net::SocketAddrV4;

use gateway_common::maps::MAGLEV_SIZE;

/// A backend as the table sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The id written into the table.
    pub id: u32,
    /// Where it is: its permutation derives from this, so it is stable across restarts.
    pub addr: SocketAddrV4,
    /// Relative weight (≥ 1).
    pub weight: u32,
}

/// Builds the table for `backends` (ids of the slots; 0 everywhere when there is none).
pub fn table(backends: &[Entry]) -> Vec<u32> {
    let m = MAGLEV_SIZE as u64;
    let mut slots = vec![0u32; MAGLEV_SIZE as usize];
    // Sorted by address so the result does not depend on the caller's order.
    let mut backends: Vec<Entry> = backends.iter().copied().filter(|b| b.weight > 0).collect();
    if backends.is_empty() {
        return slots;
    }
    backends.sort_by_key(|b| (u32::from(*b.addr.ip()), b.addr.port()));
    let perms: Vec<(u64, u64)> = backends
        .iter()
        .map(|b| {
            let key = (u64::from(u32::from(*b.addr.ip())) << 16) | u64::from(b.addr.port());
            let offset = fnv1a(key, 0xcbf2_9ce4_8422_2325) % m;
            let skip = fnv1a(key, 0x8422_2325_cbf2_9ce4) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; backends.len()];
    let mut filled = 0usize;
    'fill: loop {
        for (i, b) in backends.iter().enumerate() {
            for _ in 0..b.weight {
                let (offset, skip) = perms[i];
                let mut c = (offset + next[i] * skip) % m;
                while slots[c as usize] != 0 {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m;
                }
                slots[c as usize] = b.id;
                next[i] += 1;
                filled += 1;
                if filled == slots.len() {
                    break 'fill;
                }
            }
        }
    }
    slots
}

/// The backend the datapath gives a new flow whose first slot of `slots` (an app's table) is
/// `start` (`FlowKey4::maglev_slot`), as gateway-ebpf's `lb::choose` walks it: up to
/// [`MAGLEV_PROBES`](gateway_common::maps::MAGLEV_PROBES) consecutive slots, wrapping at the end, the first whose backend is
/// `accepting` (read from the backends map: a backend not there does not accept); an empty
/// slot (id 0) ends the walk with none. `accepting`'s error is returned as is. Tests predict
/// the datapath's choice with it.
#[cfg(any(test, feature = "testing"))]
pub fn choose<E>(
    slots: &[u32],
    start: u32,
    mut accepting: impl FnMut(u32) -> Result<bool, E>,
) -> Result<Option<u32>, E> {
    for i in 0..gateway_common::maps::MAGLEV_PROBES {
        let Some(&id) = slots.get(((start + i) % MAGLEV_SIZE) as usize) else {
            break;
        };
        if id == 0 {
            break;
        }
        if accepting(id)? {
            return Ok(Some(id));
        }
    }
    Ok(None)
}

fn fnv1a(value: u64, seed: u64) -> u64 {
    let mut h = seed;
    for byte in value.to_le_bytes() {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Finalize so nearby addresses do not give nearby offsets.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn backends(n: u32) -> Vec<Entry> {
        (1..=n)
            .map(|i| Entry {
                id: i,
                addr: SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, i as u8 * 4 + 2), 8080),
                weight: 1,
            })
            .collect()
    }

    fn share(t: &[u32], id: u32) -> f64 {
        t.iter().filter(|&&s| s == id).count() as f64 / t.len() as f64
    }

    #[test]
    fn every_slot_is_filled_and_shares_are_even() {
        let b = backends(5);
        let t = table(&b);
        assert!(t.iter().all(|&s| s != 0));
        for e in &b {
            let s = share(&t, e.id);
            assert!((0.19..=0.21).contains(&s), "backend {} has {s}", e.id);
        }
    }

    #[test]
    fn no_backend_gives_an_empty_table() {
        assert!(table(&[]).iter().all(|&s| s == 0));
    }

    #[test]
    fn weights_are_respected() {
        let mut b = backends(2);
        b[0].weight = 3;
        let t = table(&b);
        let s = share(&t, 1);
        assert!((0.73..=0.77).contains(&s), "{s}");
    }

    #[test]
    fn removing_a_backend_moves_only_its_slots_and_a_few_more() {
        let b = backends(5);
        let before = table(&b);
        let after = table(&b[..4]);
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(x, y)| x != y && **x != 5)
            .count();
        // Slots of the removed backend must move; others should mostly stay.
        assert!(
            moved * 100 / before.len() < 5,
            "{moved} slots of remaining backends moved"
        );
    }

    #[test]
    fn choose_probes_past_backends_that_do_not_accept() {
        let mut t = vec![0u32; MAGLEV_SIZE as usize];
        t[10..17].copy_from_slice(&[1, 2, 3, 4, 5, 0, 6]);
        let only = |ok: &'static [u32]| move |id: u32| Ok::<_, ()>(ok.contains(&id));
        // The hashed slot's backend accepts: it is the choice.
        assert_eq!(choose(&t, 10, only(&[1, 2, 3, 4])), Ok(Some(1)));
        // It does not (draining, before its table is rebuilt): the next slots are tried. A
        // prediction that read the hashed slot only would say 1 here.
        assert_eq!(choose(&t, 10, only(&[3])), Ok(Some(3)));
        // At most MAGLEV_PROBES slots.
        assert_eq!(choose(&t, 10, only(&[4])), Ok(Some(4)));
        assert_eq!(choose(&t, 10, only(&[5])), Ok(None));
        // An empty slot ends the walk (6 is within reach of slot 13 otherwise).
        assert_eq!(choose(&t, 13, only(&[6])), Ok(None));
        // The walk wraps at the end of the table.
        let last = MAGLEV_SIZE as usize - 1;
        t[last] = 5;
        t[0] = 6;
        assert_eq!(choose(&t, last as u32, only(&[6])), Ok(Some(6)));
        // The backends map's errors come back.
        assert_eq!(choose(&t, 10, |_| Err::<bool, _>("read")), Err("read"));
    }

    #[test]
    fn order_of_input_does_not_matter() {
        let b = backends(4);
        let mut r = b.clone();
        r.reverse();
        assert_eq!(table(&b), table(&r));
    }
}
