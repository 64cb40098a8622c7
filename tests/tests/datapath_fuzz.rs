//! The differential fuzzer's short run (`gateway_tests::fuzz`): 20,000 packets per attach mode
//! through BPF_PROG_TEST_RUN and the reference model side by side, from a fixed seed (set
//! `GATEWAY_FUZZ_SEED` for another, `GATEWAY_FUZZ_PACKETS` for more). The long run is
//! `cargo xtask fuzz`.

use gateway::datapath::AttachMode;
use gateway_tests::fuzz::{self, Options};

/// The short run's seed unless `GATEWAY_FUZZ_SEED` says otherwise.
const SEED: u64 = 0x5eed_0014;

fn short_run(mode: AttachMode) {
    let packets = std::env::var("GATEWAY_FUZZ_PACKETS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let report = fuzz::run(&Options::new(mode, fuzz::seed_from_env(SEED), packets));
    eprintln!(
        "{}\n  covered: {}",
        report.summary(),
        report.coverage_line()
    );
    if let Some(d) = &report.divergence {
        panic!("{}\n{d}", report.summary());
    }
}

#[test]
fn xdp() {
    short_run(AttachMode::Xdp);
}

#[test]
fn tc() {
    short_run(AttachMode::Tc);
}
