//! What the model expects of one run: [`Expect`], and the checks of a datapath's entry against
//! it (fields exactly, times for plausibility).

use std::{collections::HashMap, ops::RangeInclusive};

use gateway::datapath::AttachMode;
use gateway_common::{
    DropReason, GlobalStat,
    maps::{Flow, FlowKey4, TrafficStats},
};

use super::Clock;

/// What the program does with the frame: the fixture's verdict (the model expects its exact
/// return code, [`Verdict::code`]).
pub use crate::datapath::Verdict;

/// What a time field of an entry must be after the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Time {
    /// Unchanged.
    Same,
    /// The datapath's now: within the run's clock bounds.
    Now,
    /// Unchanged or now (a refresh at the edge of its granularity).
    SameOrNow,
    /// A next hop resolved: fresh at the run's time (a cached FIB answer may be older), and not
    /// the entry's old one.
    Resolved,
    /// Unchanged or resolved.
    SameOrResolved,
}

/// The time fields of an entry the run leaves in the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryExp {
    pub created: Time,
    pub last_seen: Time,
    pub nexthop: Time,
}

impl EntryExp {
    pub fn same() -> Self {
        EntryExp {
            created: Time::Same,
            last_seen: Time::Same,
            nexthop: Time::Same,
        }
    }
}

/// What the datapath must do with one frame.
#[derive(Clone, Debug)]
pub struct Expect {
    pub verdict: Verdict,
    /// The output frame, exactly; `None` for a drop (not looked at).
    pub out: Option<Vec<u8>>,
    /// The drop reason counted (exactly one), or none at all.
    pub drop: Option<DropReason>,
    /// Global counter increases (by `GlobalStat::index`); a counter not listed stays.
    pub stats: HashMap<u32, RangeInclusive<u64>>,
    /// Traffic counter increases of apps and backends (`(true, app)`, `(false, backend)`).
    pub traffic: HashMap<(bool, u32), TrafficStats>,
    /// The entries this run changes: present with these time rules, or removed (`None`).
    pub entries: HashMap<FlowKey4, Option<EntryExp>>,
    /// What the model found wrong with the datapath's own choices (a SNAT port it may not
    /// take): each a divergence.
    pub notes: Vec<String>,
    /// The model's paths this frame took that the fuzzer's coverage counts (issue 15's
    /// rarer SYN proxy rules).
    pub paths: Vec<&'static str>,
}

impl Expect {
    pub fn new(mode: AttachMode) -> Self {
        let mut x = Expect {
            verdict: Verdict::Drop,
            out: None,
            drop: None,
            stats: HashMap::new(),
            traffic: HashMap::new(),
            entries: HashMap::new(),
            notes: Vec::new(),
            paths: Vec::new(),
        };
        x.stat(
            match mode {
                AttachMode::Xdp => GlobalStat::XdpPackets,
                AttachMode::Tc => GlobalStat::TcPackets,
            },
            1,
        );
        x
    }

    pub fn pass(&mut self, frame: &[u8]) {
        self.verdict = Verdict::Pass;
        self.out = Some(frame.to_vec());
        self.stat(GlobalStat::Passed, 1);
    }

    pub fn drop(&mut self, reason: DropReason) {
        self.verdict = Verdict::Drop;
        self.out = None;
        self.drop = Some(reason);
    }

    /// Counter `stat` goes up by `n` (more).
    pub fn stat(&mut self, stat: GlobalStat, n: u64) {
        self.stat_range(stat, n..=n);
    }

    /// Counter `stat` goes up by an amount within `range` (more).
    pub fn stat_range(&mut self, stat: GlobalStat, range: RangeInclusive<u64>) {
        let r = self.stats.entry(stat.index()).or_insert(0..=0);
        *r = r.start() + range.start()..=r.end() + range.end();
    }

    pub fn traffic(&mut self, app: u32, backend: u32, f: impl Fn(&mut TrafficStats)) {
        f(self.traffic.entry((true, app)).or_default());
        f(self.traffic.entry((false, backend)).or_default());
    }

    pub fn note(&mut self, what: String) {
        self.notes.push(what);
    }

    /// The increase of global counter `stat` the model expects.
    pub fn stat_delta(&self, stat: GlobalStat) -> RangeInclusive<u64> {
        self.stats.get(&stat.index()).cloned().unwrap_or(0..=0)
    }
}

/// Checks a time field of the datapath's entry (`got`) against `rule`, the model's value
/// before the run being `old`.
pub fn check_time(
    what: &str,
    rule: Time,
    old: u64,
    got: u64,
    clock: &Clock,
    max_age: u64,
) -> Result<(), String> {
    let now = |t: u64| (clock.lo..=clock.hi).contains(&t);
    let resolved = |t: u64| t != 0 && (clock.lo.saturating_sub(max_age)..=clock.hi).contains(&t);
    let ok = match rule {
        Time::Same => got == old,
        Time::Now => now(got),
        Time::SameOrNow => got == old || now(got),
        // A stale hop is never kept: a cached answer in use is fresh, so never the old one.
        Time::Resolved => resolved(got) && got != old,
        Time::SameOrResolved => got == old || resolved(got),
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} = {got}, expected {rule:?} (was {old}; the run's clock within [{}, {}])",
            clock.lo, clock.hi
        ))
    }
}

/// The fields (times apart) in which two entries differ, each as `field: model, datapath`.
pub fn diff_flows(model: &Flow, dp: &Flow) -> Vec<String> {
    let mut out = Vec::new();
    macro_rules! cmp {
        ($($f:ident),+) => {$(
            if model.$f != dp.$f {
                out.push(format!(
                    "{}: model {:?}, datapath {:?}",
                    stringify!($f),
                    model.$f,
                    dp.$f
                ));
            }
        )+};
    }
    cmp!(
        nat_src_ip,
        nat_dst_ip,
        nat_src_port,
        nat_dst_port,
        app_id,
        backend_id,
        direction,
        state,
        _pad,
        nexthop_ifindex,
        nexthop_smac,
        nexthop_dmac,
        packets,
        bytes,
        seq_end,
        ack_max,
        win_max,
        wscale,
        peer_wscale,
        track,
        toa,
        seq_delta,
        _pad2
    );
    out
}

/// An entry for a person: direction, rewrite, ids, state and tracking, counters, times.
pub fn show_flow(f: &Flow) -> String {
    format!(
        "{} → rewrite {} → {}, app {} backend {}, state {:#04x}, seq_end {:#x} ack_max {:#x} win_max {} wscale {}/{} track {:#x} seq_delta {:#x}, {} packets {} bytes, created {} last_seen {} nexthop {} (if {} {:02x?} → {:02x?})",
        if f.direction == gateway_common::maps::DIR_FORWARD {
            "forward"
        } else {
            "reverse"
        },
        f.nat_src(),
        f.nat_dst(),
        f.app_id,
        f.backend_id,
        f.state,
        f.seq_end,
        f.ack_max,
        f.win_max,
        f.wscale,
        f.peer_wscale,
        f.track,
        f.seq_delta,
        f.packets,
        f.bytes,
        f.created_ns,
        f.last_seen_ns,
        f.nexthop_ns,
        f.nexthop_ifindex,
        f.nexthop_smac,
        f.nexthop_dmac,
    )
}
