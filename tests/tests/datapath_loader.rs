//! The loader's test support, through BPF_PROG_TEST_RUN: the benchmark's second object shares
//! the datapath's maps.

use gateway::datapath::{Datapath, LoadOptions};
use gateway_common::bench::BENCH_FLOOR_APP;
use gateway_tests::{
    datapath::{Program, test_run},
    netns::{Bpffs, unique_prefix},
    packet::{Frame, flags},
    require_root,
};

#[test]
fn the_bench_object_runs_on_the_datapaths_own_maps() {
    require_root();
    let bpffs = Bpffs::new(&format!("{}-bench", unique_prefix()));
    let dp = Datapath::load_with(&LoadOptions {
        conntrack_capacity: 1024,
        pin_dir: Some(bpffs.path().to_owned()),
    })
    .expect("load the datapath");
    let mut bench = dp.load_bench().expect("the benchmark's object");
    let frame = Frame::tcp(
        "192.0.2.2:40000".parse().unwrap(),
        "198.51.100.2:80".parse().unwrap(),
        flags::ACK,
    )
    .build();
    let floor = Program::Xdp(bench.program("bench_ct_pair_xdp").unwrap());
    assert_eq!(test_run(floor, &frame, 1).0, 2, "XDP_PASS");
    let floor_entries = |dp: &Datapath| {
        dp.flows()
            .unwrap()
            .iter()
            .filter(|(_, f)| f.app_id == BENCH_FLOOR_APP)
            .count()
    };
    assert_eq!(
        floor_entries(&dp),
        2,
        "the floor's pair is in the datapath's table"
    );
    let baseline = Program::Xdp(bench.program("bench_empty_xdp").unwrap());
    assert_eq!(test_run(baseline, &frame, 1).0, 2, "XDP_PASS");
    let baseline = Program::Tc(bench.program("bench_empty_tc").unwrap());
    assert_eq!(test_run(baseline, &frame, 1).0, 0, "TC_ACT_OK");
    let floor = Program::Tc(bench.program("bench_csum_tc").unwrap());
    assert_eq!(test_run(floor, &frame, 1).0, 0, "TC_ACT_OK");
}
