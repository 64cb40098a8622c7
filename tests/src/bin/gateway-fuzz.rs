//! The differential fuzzer's long run (`cargo xtask fuzz`): the datapath through
//! BPF_PROG_TEST_RUN and the reference model side by side, in both attach modes (see
//! `gateway_tests::fuzz`). Needs root.
//!
//! ```text
//! gateway-fuzz [--packets N] [--seed S] [--mode xdp|tc|both] [--legacy]
//! ```
//!
//! `--packets`: per mode (default 1,000,000); `--seed`: decimal or 0x-hex (default: from the
//! clock, printed); `--legacy`: the model follows today's rules (a datapath without spec 14).
//! Exits 1 on a divergence, after printing it (seed, step, minimal sequence, both views).

use std::process::ExitCode;

use gateway::datapath::AttachMode;
use gateway_tests::{
    fuzz::{self, Options, parse_seed},
    model::Rules,
};

fn usage(msg: &str) -> ExitCode {
    eprintln!(
        "gateway-fuzz: {msg}\nusage: gateway-fuzz [--packets N] [--seed S] [--mode xdp|tc|both] [--legacy]"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut packets = 1_000_000u64;
    let mut seed = None;
    let mut modes = AttachMode::ALL.to_vec();
    let mut rules = fuzz::rules_from_env();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--packets" => match args.next().and_then(|v| v.replace('_', "").parse().ok()) {
                Some(n) => packets = n,
                None => return usage("--packets takes a number"),
            },
            "--seed" => match args.next().as_deref().and_then(parse_seed) {
                Some(s) => seed = Some(s),
                None => return usage("--seed takes a number (decimal or 0x-hex)"),
            },
            "--mode" => {
                modes = match args.next().as_deref() {
                    Some("xdp") => vec![AttachMode::Xdp],
                    Some("tc") => vec![AttachMode::Tc],
                    Some("both") => AttachMode::ALL.to_vec(),
                    _ => return usage("--mode takes xdp, tc or both"),
                }
            }
            "--legacy" => rules = Rules::Legacy,
            "-h" | "--help" => return usage("the datapath and its reference model side by side"),
            other => return usage(&format!("unknown argument {other}")),
        }
    }
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    println!("gateway-fuzz: seed {seed:#x}, {packets} packets per mode, {rules:?} rules");
    let mut diverged = false;
    for mode in modes {
        let options = Options {
            rules,
            ..Options::new(mode, seed, packets)
        };
        let report = fuzz::run(&options);
        println!("{}", report.summary());
        println!("  covered: {}", report.coverage_line());
        if let Some(d) = &report.divergence {
            println!("{d}");
            diverged = true;
            break;
        }
    }
    if diverged {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
