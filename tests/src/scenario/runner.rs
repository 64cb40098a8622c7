//! The runner: plays a scenario's steps in order on a fresh topology and fixture, collects
//! every failure, and fails once at the end.

use std::{
    any::Any,
    cell::{Cell, RefCell},
    fmt::Debug,
    net::Ipv4Addr,
    panic::{AssertUnwindSafe, catch_unwind},
    sync::Once,
};

use gateway_common::DropReason;

use super::{AttachMode, Ctx, Out, Row, Scenario, Step};
use crate::{
    datapath::SNAT_PORTS,
    netns::{Topology, mac_str},
    packet::{first_difference, parse_checked, parse_unchecked},
    require_root,
};

/// Plays scenario `name` (made by `build`) in `mode`, on a topology and fixture of its own;
/// panics once at the end, listing every failure, if any row, set-up step or check failed.
pub fn run(name: &'static str, build: fn() -> Scenario, mode: AttachMode) {
    require_root();
    let scenario = build();
    let topo = Topology::new(scenario.backends);
    let backend_ips: Vec<Ipv4Addr> = topo.backends.iter().map(|b| b.ip).collect();
    let (rows, failures) = topo.gateway.run(move || play(scenario, mode, &backend_ips));
    drop(topo);
    assert!(
        rows > 0,
        "scenario {name} [{mode}] has no row for this mode"
    );
    if !failures.is_empty() {
        panic!(
            "scenario {name} [{mode}]: {} failure(s) over {rows} rows:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    eprintln!("scenario {name} [{mode}]: {rows} rows passed");
}

/// Every step in order; returns how many rows ran and what failed.
fn play(scenario: Scenario, mode: AttachMode, backend_ips: &[Ipv4Addr]) -> (usize, Vec<String>) {
    let mut cx = Ctx {
        fx: (scenario.fixture)(mode, backend_ips),
        input: Vec::new(),
        output: Vec::new(),
    };
    let mut failures = Vec::new();
    let mut rows = 0;
    for step in scenario.steps {
        match step {
            Step::Row(row) if !row.modes.contains(&mode) => {}
            Step::Row(row) => {
                rows += 1;
                let name = row.name.clone();
                let problems = catching(|| run_row(&mut cx, row)).unwrap_or_else(|e| vec![e]);
                if !problems.is_empty() {
                    failures.push(format!(
                        "  row {rows} \"{name}\":\n    - {}",
                        indent(&problems.join("\n- "), "    ")
                    ));
                }
            }
            Step::Set(what, change) => {
                if let Err(e) = catching(|| change(&mut cx)) {
                    failures.push(format!(
                        "  set-up \"{what}\" (after row {rows}): {}",
                        indent(&e, "    ")
                    ));
                }
            }
            Step::Check(check) => {
                if let Err(e) = catching(|| (check.f)(&cx)) {
                    failures.push(format!(
                        "  check \"{}\" (after row {rows}): {}",
                        check.name,
                        indent(&e, "    ")
                    ));
                }
            }
            Step::Wait(time) => std::thread::sleep(time),
        }
    }
    (rows, failures)
}

/// Runs one row: every expectation it fails (empty: it passed).
fn run_row(cx: &mut Ctx, row: Row) -> Vec<String> {
    let frame = match catching(|| row.frame.bytes(cx)) {
        Ok(frame) => frame,
        Err(e) => return vec![format!("building the input frame: {e}")],
    };
    let mut out = row.out;
    while let Out::With(f) = out {
        out = match catching(|| f(cx)) {
            Ok(out) => out,
            Err(e) => return vec![format!("computing the expected output: {e}")],
        };
    }
    let mut problems = Vec::new();
    let before = cx.fx.dp.global_stats().expect("global stats");
    let entries_before = cx.fx.dp.flows().expect("conntrack").len() as i64;
    // Through another program of the fixture for this row only, whatever happens in it.
    let mode = cx.fx.mode;
    cx.fx.mode = row.program.unwrap_or(mode);
    let run = catching(|| cx.fx.run(&frame));
    cx.fx.mode = mode;
    let (verdict, output) = match run {
        Ok(run) => run,
        Err(e) => return vec![format!("running the program: {e}")],
    };
    let after = cx.fx.dp.global_stats().expect("global stats");
    let entries = cx.fx.dp.flows().expect("conntrack").len() as i64 - entries_before;
    cx.input = frame;
    cx.output = output;

    if !row.expect.admits(verdict) {
        problems.push(format!("verdict: {verdict:?}, expected {:?}", row.expect));
    }
    for reason in DropReason::ALL {
        let counted = after.drops(*reason) - before.drops(*reason);
        let want = u64::from(row.drop == Some(*reason));
        expect_eq(
            &mut problems,
            &format!("drops for {}", reason.label()),
            counted,
            want,
        );
    }
    expect_eq(
        &mut problems,
        "conntrack entries added",
        entries,
        row.entries,
    );
    for (stat, delta) in &row.counters {
        let d = after.get(*stat) - before.get(*stat);
        if !delta.contains(&d) {
            problems.push(format!(
                "counter {} went up by {d}, expected {delta:?}",
                stat.label()
            ));
        }
    }
    match out {
        Out::Any | Out::With(_) => {}
        Out::Same => {
            if cx.output != cx.input {
                problems.push(format!(
                    "the frame must pass unchanged: {}",
                    first_difference(&cx.output, &cx.input)
                ));
            }
        }
        Out::Bytes(want) => {
            if cx.output != want {
                problems.push(format!(
                    "output bytes: {}",
                    first_difference(&cx.output, &want)
                ));
            }
        }
        Out::Nat { src, dst, macs } => match catching(|| parse_checked(&cx.output)) {
            Err(e) => problems.push(format!("output: {e}")),
            Ok(p) => {
                // Its checksums are the output's business (a partial one in is whole out).
                let input = parse_unchecked(&cx.input);
                match src {
                    Some(src) => expect_eq(&mut problems, "source", p.src, src),
                    None => {
                        if *p.src.ip() != Topology::SNAT_IP || !SNAT_PORTS.contains(&p.src.port()) {
                            problems.push(format!(
                                "source {}, expected the SNAT address {} with a port in {SNAT_PORTS:?}",
                                p.src,
                                Topology::SNAT_IP
                            ));
                        }
                    }
                }
                expect_eq(&mut problems, "destination", p.dst, dst);
                expect_eq(
                    &mut problems,
                    "MACs (source, destination)",
                    (mac_str(p.src_mac), mac_str(p.dst_mac)),
                    (mac_str(macs.0), mac_str(macs.1)),
                );
                if p.payload != input.payload {
                    problems.push("the payload changed".into());
                }
                expect_eq(&mut problems, "TCP flags", p.tcp_flags, input.tcp_flags);
                // A router's hop (RFC 791): one less, the header checksum right (verified).
                expect_eq(&mut problems, "TTL", p.ttl, input.ttl.wrapping_sub(1));
            }
        },
    }
    for check in row.checks {
        if let Err(e) = catching(|| (check.f)(cx)) {
            problems.push(format!("check \"{}\": {e}", check.name));
        }
    }
    problems
}

/// `text` with every line after the first indented by `by`.
fn indent(text: &str, by: &str) -> String {
    text.replace('\n', &format!("\n{by}"))
}

fn expect_eq<T: PartialEq + Debug>(problems: &mut Vec<String>, what: &str, got: T, want: T) {
    if got != want {
        problems.push(format!("{what}: {got:?}, expected {want:?}"));
    }
}

thread_local! {
    /// Whether this thread is inside [`catching`]: its panics are then reported by the runner,
    /// not printed (with a backtrace each) by the panic hook.
    static CATCHING: Cell<bool> = const { Cell::new(false) };
    /// Where the last panic caught on this thread happened.
    static PANICKED_AT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// `f`'s result, or the message it panicked with (a failed assertion of a check) and where.
fn catching<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        // Every other panic, of this process's other threads too, goes to the usual hook.
        let usual = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CATCHING.get() {
                PANICKED_AT.set(info.location().map(|l| l.to_string()));
            } else {
                usual(info);
            }
        }));
    });
    let outer = CATCHING.replace(true);
    let result = catch_unwind(AssertUnwindSafe(f));
    CATCHING.set(outer);
    result.map_err(|payload| match PANICKED_AT.take() {
        Some(at) => format!("{} (at {at})", panic_message(&*payload)),
        None => panic_message(&*payload),
    })
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else {
        "a panic without a message".to_owned()
    }
}
