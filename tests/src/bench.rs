//! Benchmarks (`cargo xtask bench ...`). Results are ratios and figures from one run; nothing
//! here asserts a time.

use aya::programs::{TestRun as _, TestRunOptions};
use gateway::datapath::{AttachMode, Datapath};

use crate::packet::{Frame, flags};

const REPEAT: u32 = 1_000_000;

pub fn run(args: &[&str]) {
    crate::require_root();
    match args {
        [] | ["datapath"] => datapath(),
        other => {
            eprintln!("unknown benchmark {other:?}: expected `datapath`");
            std::process::exit(2);
        }
    }
}

/// ns/packet through BPF_PROG_TEST_RUN.
fn datapath() {
    let mut datapath = Datapath::load().expect("load");
    let frame = Frame::tcp(
        "192.0.2.2:40000".parse().unwrap(),
        "198.51.100.2:80".parse().unwrap(),
        flags::ACK,
    )
    .build();
    println!("| program | case | ns/packet |\n|---|---|---|");
    for mode in AttachMode::ALL {
        let ns = run_ns(&mut datapath, mode, &frame, REPEAT);
        println!("| {mode} | not for the gateway | {ns:.1} |");
    }
}

/// Average ns per run of the program of `mode` on `frame`, `repeat` times.
pub fn run_ns(datapath: &mut Datapath, mode: AttachMode, frame: &[u8], repeat: u32) -> f64 {
    let mut out = vec![0u8; frame.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat,
        ..TestRunOptions::new()
    };
    let result = match mode {
        AttachMode::Xdp => datapath.xdp().expect("xdp").test_run(opts),
        AttachMode::Tc => datapath.tc().expect("tc").test_run(opts),
    }
    .expect("test_run");
    result.duration.as_nanos() as f64
}
