//! The differential fuzzer's short run (`gateway_tests::fuzz`): 20,000 packets per attach mode
//! through BPF_PROG_TEST_RUN and the reference model side by side (issue 15's SYN proxy among
//! them: the seed's cap of half-open flows is small), from a fixed seed (set
//! `GATEWAY_FUZZ_SEED` for another, `GATEWAY_FUZZ_PACKETS` for more). The long run is
//! `cargo xtask fuzz`.

use gateway::datapath::AttachMode;
use gateway_common::{DropReason, GlobalStat};
use gateway_tests::{
    fuzz::{self, Options},
    model,
};

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
    // Without divergence the run proves something only if it played what it was asked to,
    // and reached the checks of issues 14 and 15 it is there for (the SYN proxy among them).
    let s = report.summary();
    assert_eq!(report.packets, packets, "{s}: packets played and compared");
    assert!(
        report.refused * 50 <= report.packets,
        "{s}: more than 2% of the packets refused by test_run"
    );
    for reason in [
        DropReason::OutOfWindow,
        DropReason::BadFlags,
        DropReason::HalfOpenFull,
    ] {
        assert!(
            report.drops(reason) > 0,
            "{s}: no packet dropped as {}",
            reason.label()
        );
    }
    for stat in [
        GlobalStat::RstInWindow,
        GlobalStat::SynRebalanced,
        GlobalStat::RstNoFlow,
        GlobalStat::SynCookiesSent,
        GlobalStat::SynCookiesAccepted,
        GlobalStat::SynProxyEstablished,
    ] {
        assert!(
            report.counted(stat) > 0,
            "{s}: counter {} never went up",
            stat.label()
        );
    }
    // Issue 15: aged next hops revalidated (TC sends them through the neighbour output, XDP
    // hands them over), partial checksums completed by XDP.
    match mode {
        AttachMode::Tc => assert!(
            report.counted(GlobalStat::NeighRevalidations) > 0,
            "{s}: no aged next hop revalidated"
        ),
        AttachMode::Xdp => {
            assert!(
                report.handed_over() > 0,
                "{s}: nothing handed to the kernel"
            );
            assert!(
                report.counted(GlobalStat::PartialChecksums) > 0,
                "{s}: no partial checksum completed"
            );
        }
    }
    // Issue 15: proxied flows carried traffic with their backend's numbers translated.
    assert!(
        report.proxied_translated() > 0,
        "{s}: nothing translated with a proxied flow's numbers"
    );
    // Issue 15, after review (dc1e317): the SYN proxy's recoveries and the cap's start-overs.
    for path in [
        model::PATH_COOKIE_OVER,
        model::PATH_PROBE_COOKIE,
        model::PATH_SYN_AGAIN,
        model::PATH_REFUSED,
    ] {
        assert!(report.took(path) > 0, "{s}: never {path}");
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
