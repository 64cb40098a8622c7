//! The side-by-side benchmark's smoke version: one very short repetition per contender
//! (direct, gateway tc and xdp, nftables full NAT, HAProxy), checking only that each forwards.
//! The benchmark itself is `cargo xtask bench`.

use gateway_tests::compare::{Bench, Contender, Plan};

#[test]
fn every_contender_forwards() {
    let bench = Bench::new(false);
    let runs = bench.run(Plan::SMOKE);
    assert_eq!(runs.len(), Contender::ALL.len());
    for (c, figures) in &runs {
        let f = &figures[0];
        assert!(
            f.conn_per_s > 0.0 && f.failed == 0 && f.p50_us > 0.0,
            "{}: {f:?}",
            c.name()
        );
    }
}
