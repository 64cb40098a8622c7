//! The differential fuzzer: seeded sequences of operations ([`generate`]) played on the datapath
//! through BPF_PROG_TEST_RUN and on the reference model ([`crate::model`]) side by side
//! ([`harness`]), every verdict, output byte, counter delta and conntrack change compared. On
//! the first divergence it stops, shrinks the sequence ([`minimise`]) and reports the seed, the
//! packet index, the minimal sequence (as builder calls and frames) and both sides' views.
//!
//! `cargo xtask test` runs a short version (`tests/tests/datapath_fuzz.rs`), `cargo xtask fuzz`
//! the long one (`src/bin/gateway-fuzz.rs`).

pub mod generate;
pub mod harness;
pub mod minimise;
pub mod ops;

use std::{
    fmt::Write as _,
    ops::RangeInclusive,
    time::{Duration, Instant},
};

use gateway::datapath::AttachMode;
use gateway_common::{DropReason, GlobalStat, maps::is_closed};

use crate::{model::Rules, netns::Topology, require_root};
use generate::Gen;
use harness::Harness;
use ops::{Op, hex};

/// A fuzz run.
#[derive(Clone, Debug)]
pub struct Options {
    pub mode: AttachMode,
    pub seed: u64,
    /// Packets to play (other operations come on top).
    pub packets: u64,
    pub rules: Rules,
    /// Backends of the topology and app 1.
    pub backends: usize,
    /// A short SNAT range, so that ports collide, run out and are taken over.
    pub snat_ports: RangeInclusive<u16>,
    /// App 1's cap of half-open flows at the start (issue 15's SYN cookies; the run changes
    /// it): small, so that cookies come often.
    pub half_open_max: u32,
    /// How long the minimiser may take.
    pub minimise_for: Duration,
    /// App 1 has `--client-address toa` (issue 17): the seed's bit 2 says (so that the suite's
    /// short run has it, and random seeds try both).
    pub client_address: bool,
}

impl Options {
    pub fn new(mode: AttachMode, seed: u64, packets: u64) -> Self {
        Options {
            mode,
            seed,
            packets,
            rules: rules_from_env(),
            backends: 3,
            snat_ports: 40_000..=40_015,
            half_open_max: 1 + (seed % 8) as u32,
            minimise_for: Duration::from_secs(120),
            client_address: seed & 4 != 0,
        }
    }
}

/// The rules the model follows: spec 14, or today's datapath with `GATEWAY_FUZZ_RULES=legacy`
/// (to run the fuzzer against a datapath without spec 14).
pub fn rules_from_env() -> Rules {
    match std::env::var("GATEWAY_FUZZ_RULES").as_deref() {
        Ok("legacy") => Rules::Legacy,
        _ => Rules::Spec14,
    }
}

/// What a run did.
#[derive(Debug)]
pub struct Report {
    pub options: Options,
    /// Packets played (and compared), other operations, packets the kernel refused to run.
    pub packets: u64,
    pub ops: u64,
    pub refused: u64,
    pub elapsed: Duration,
    /// The divergence, described for a person, if there was one (or why the run stopped
    /// before playing every packet).
    pub divergence: Option<String>,
    /// What the run exercised: verdicts, drop reasons and counters, with their counts.
    pub coverage: std::collections::BTreeMap<String, u64>,
}

impl Report {
    pub fn packets_per_sec(&self) -> f64 {
        self.packets as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// What the run exercised, one `name: count` after another.
    pub fn coverage_line(&self) -> String {
        let v: Vec<String> = self
            .coverage
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect();
        v.join(", ")
    }

    /// How many packets the model expected drop reason `r` of (in the coverage).
    pub fn drops(&self, r: DropReason) -> u64 {
        self.coverage
            .get(&harness::drop_key(r))
            .copied()
            .unwrap_or(0)
    }

    /// After how many packets global counter `s` had gone up (in the coverage).
    pub fn counted(&self, s: GlobalStat) -> u64 {
        self.coverage
            .get(&harness::counter_key(s))
            .copied()
            .unwrap_or(0)
    }

    /// How many packets of ours the model expected handed to the kernel untouched (in the
    /// coverage).
    pub fn handed_over(&self) -> u64 {
        self.coverage
            .get(harness::HANDED_OVER)
            .copied()
            .unwrap_or(0)
    }

    /// How many packets were translated with a proxied flow's numbers (issue 15; in the
    /// coverage).
    pub fn proxied_translated(&self) -> u64 {
        self.coverage
            .get(harness::PROXIED_TRANSLATED)
            .copied()
            .unwrap_or(0)
    }

    /// How many packets took the model's path `what` (one of `crate::model`'s `PATH_*`; in
    /// the coverage).
    pub fn took(&self, what: &str) -> u64 {
        self.coverage.get(what).copied().unwrap_or(0)
    }

    /// One line: mode, seed, packets, rate.
    pub fn summary(&self) -> String {
        format!(
            "fuzz [{}] seed {:#x} ({:?} rules): {} packets ({} refused by test_run) and {} other steps in {:.1} s, {:.0} packets/s, {}",
            self.options.mode,
            self.options.seed,
            self.options.rules,
            self.packets,
            self.refused,
            self.ops - self.packets - self.refused,
            self.elapsed.as_secs_f64(),
            self.packets_per_sec(),
            if self.divergence.is_some() {
                "DIVERGED"
            } else {
                "no divergence"
            }
        )
    }
}

/// Runs the fuzzer as `options` say, on a topology of its own (needs root).
pub fn run(options: &Options) -> Report {
    require_root();
    let topo = Topology::new(options.backends);
    let ips: Vec<_> = topo.backends.iter().map(|b| b.ip).collect();
    let o = options.clone();
    let report = topo.gateway.run(move || play(o, &ips));
    drop(topo);
    report
}

fn play(options: Options, ips: &[std::net::Ipv4Addr]) -> Report {
    let mut h = Harness::new(
        options.mode,
        options.rules,
        ips,
        options.snat_ports.clone(),
        options.half_open_max,
        options.client_address,
    );
    let ports = (*options.snat_ports.start(), *options.snat_ports.end());
    let mut g = Gen::new(options.seed, options.backends, options.rules, ports);
    let mut ops: Vec<Op> = Vec::new();
    let start = Instant::now();
    let mut diverged = None;
    // Steps are mostly packets the kernel runs; a run that plays far more steps than packets
    // (every frame refused, or no packets generated) stops rather than spin.
    let max_steps = options.packets.saturating_mul(4).saturating_add(1000);
    let mut stalled = None;
    while h.packets < options.packets {
        if ops.len() as u64 >= max_steps {
            stalled = Some(format!(
                "STALLED [{}] seed {:#x}: {} steps played only {} of {} packets ({} refused by test_run)",
                options.mode,
                options.seed,
                ops.len(),
                h.packets,
                options.packets,
                h.refused
            ));
            break;
        }
        let op = g.next(&h.model);
        ops.push(op.clone());
        if let Err(d) = h.exec(&op) {
            diverged = Some(d);
            break;
        }
        g.observe(&op, h.last_out.as_deref());
    }
    if diverged.is_none() {
        let mut problems = Vec::new();
        h.compare_all(&mut problems);
        if !problems.is_empty() {
            diverged = Some(Box::new(harness::Divergence {
                problems,
                frame: Vec::new(),
                got: Vec::new(),
                want: None,
                entries: Vec::new(),
            }));
        }
    }
    let elapsed = start.elapsed();
    let (packets, refused) = (h.packets, h.refused);
    let mut coverage = h.coverage.clone();
    let open = h.model.ct.values().filter(|f| !is_closed(f.state)).count();
    coverage.insert("entries at the end (open)".into(), open as u64);
    coverage.insert("entries at the end (all)".into(), h.model.ct.len() as u64);
    let divergence = diverged
        .map(|d| describe(&mut h, &options, &ops, &d))
        .or(stalled);
    Report {
        packets,
        ops: ops.len() as u64,
        refused,
        elapsed,
        divergence,
        coverage,
        options,
    }
}

/// The report of a divergence at the last step of `ops`: seed, index, the minimal sequence with
/// its frames, both sides' views.
fn describe(h: &mut Harness, options: &Options, ops: &[Op], d: &harness::Divergence) -> String {
    let index = ops.len() - 1;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "DIVERGENCE [{}] seed {:#x} ({:?} rules), step {index} (packet {}): {}\n{d}",
        options.mode, options.seed, options.rules, h.packets, ops[index]
    );
    match minimise::minimise(h, ops, options.minimise_for) {
        None => {
            let _ = writeln!(
                s,
                "It did not come back when the {} steps were replayed from scratch.",
                index + 1
            );
        }
        Some(min) => {
            let _ = writeln!(
                s,
                "Minimal sequence ({} of {} steps):",
                min.len(),
                index + 1
            );
            // Replayed once more to show each step's frame and the divergence it ends in.
            h.reset();
            h.full_every = 1;
            for (i, op) in min.iter().enumerate() {
                let frame = h.frame(op);
                let _ = writeln!(s, "  [{i}] {op}");
                if let Some(f) = frame {
                    let _ = writeln!(s, "       frame {}", hex(&f));
                }
                if let Err(d) = h.exec(op) {
                    let _ = writeln!(s, "  diverges at [{i}]:\n{d}");
                    break;
                }
            }
        }
    }
    s
}

/// The fuzzer's seed from `GATEWAY_FUZZ_SEED` (decimal or 0x-hex), else `default`.
pub fn seed_from_env(default: u64) -> u64 {
    std::env::var("GATEWAY_FUZZ_SEED")
        .ok()
        .and_then(|s| parse_seed(&s))
        .unwrap_or(default)
}

/// A seed written in decimal or as 0x-hex.
pub fn parse_seed(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}
