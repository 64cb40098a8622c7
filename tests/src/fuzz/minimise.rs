//! Shrinking a diverging sequence: replays subsequences on the reset fixture until no step can
//! be left out (delta debugging, bounded in time), the last step always the one that diverges.

use std::time::{Duration, Instant};

use super::{
    harness::{Divergence, Harness},
    ops::Op,
};

/// Plays `ops` from a reset state, the whole table compared after every step: the index of
/// the first step that diverges, and how.
pub fn replay(h: &mut Harness, ops: &[Op]) -> Option<(usize, Box<Divergence>)> {
    h.reset();
    let every = h.full_every;
    h.full_every = 1;
    let mut found = None;
    for (i, op) in ops.iter().enumerate() {
        if let Err(d) = h.exec(op) {
            found = Some((i, d));
            break;
        }
    }
    h.full_every = every;
    found
}

/// Whether `ops` diverges at its last step (and not before).
fn fails(h: &mut Harness, ops: &[Op]) -> bool {
    matches!(replay(h, ops), Some((i, _)) if i + 1 == ops.len())
}

/// The shortest sequence found within `budget` that still diverges at its last step, from
/// `ops` (which diverged at its last step in the run). `None`: the divergence did not come back
/// on replay (it depended on something outside the sequence, such as time).
pub fn minimise(h: &mut Harness, ops: &[Op], budget: Duration) -> Option<Vec<Op>> {
    let start = Instant::now();
    // On replay every step is compared with the whole table, which may show the divergence
    // earlier than the run's periodic comparison did.
    let (first, _) = replay(h, ops)?;
    let mut cur: Vec<Op> = ops[..=first].to_vec();
    // A quick first cut: the last step's connection and the health changes only.
    let last = cur.last().unwrap().clone();
    let focus: Vec<Op> = cur
        .iter()
        .filter(|op| {
            matches!(op, Op::Health { .. })
                || (last.client().is_some() && op.client() == last.client())
        })
        .cloned()
        .collect();
    if focus.len() < cur.len() && fails(h, &focus) {
        cur = focus;
    }
    let mut n = 2usize;
    while cur.len() > 1 && start.elapsed() < budget {
        let body = cur.len() - 1;
        let chunk = body.div_ceil(n);
        let mut reduced = None;
        for c in 0..n {
            let (lo, hi) = (c * chunk, ((c + 1) * chunk).min(body));
            if lo >= hi {
                continue;
            }
            let trial: Vec<Op> = cur[..lo].iter().chain(&cur[hi..]).cloned().collect();
            if fails(h, &trial) {
                reduced = Some(trial);
                break;
            }
            if start.elapsed() >= budget {
                break;
            }
        }
        if let Some(trial) = reduced {
            cur = trial;
            n = (n - 1).max(2);
        } else {
            if n >= body {
                break;
            }
            n = (n * 2).min(body);
        }
    }
    Some(cur)
}
