//! The loader's test support, through BPF_PROG_TEST_RUN: the benchmark's second object shares
//! the datapath's maps, and userspace predicts the datapath's backend choice.

use std::net::SocketAddrV4;

use gateway::datapath::{AttachMode, Datapath, LoadOptions};
use gateway_common::{bench::BENCH_FLOOR_APP, maps::FlowKey4};
use gateway_tests::{
    datapath::{APP, Fixture, Program, test_run},
    netns::{Bpffs, Topology, unique_prefix},
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

#[test]
fn userspace_predicts_the_backend_the_datapath_probes_to() {
    require_root();
    let topo = Topology::new(3);
    let backend_ips: Vec<_> = topo.backends.iter().map(|b| b.ip).collect();
    topo.gateway.run(move || {
        for mode in AttachMode::ALL {
            let mut fx = Fixture::new(mode, &backend_ips, 1 << 12);
            // A backend stops accepting before its app's table is rebuilt without it (as a
            // drain begins): the flows hashed to its slots go on to the next ones.
            let stopped = fx.backends[0];
            fx.dp.set_backend(stopped.id, stopped.addr, false).unwrap();
            let svc = Fixture::service();
            let mut probed = 0;
            for port in 40_000..40_300 {
                let client = SocketAddrV4::new(Topology::CLIENT_IP, port);
                let key = FlowKey4::from_addrs(client, svc);
                let predicted = fx.dp.predict_backend(APP, client, svc).unwrap();
                fx.run(&Frame::tcp(client, svc, flags::SYN).build());
                let chosen = fx.dp.flow(&key).unwrap().map(|f| f.backend_id);
                assert_eq!(predicted, chosen, "[{mode}] client port {port}");
                assert_ne!(chosen, Some(stopped.id), "[{mode}] client port {port}");
                if fx.slot_backend(client, svc).id == stopped.id {
                    probed += 1;
                }
            }
            assert!(
                probed > 50,
                "[{mode}] {probed} flows hashed to the stopped backend"
            );
        }
    });
    drop(topo);
}
