//! Datapath scenarios as data, and the one runner that plays them through BPF_PROG_TEST_RUN.
//!
//! A [`Scenario`] is a list of steps: [`Row`]s (a name, the input frame, the expected verdict,
//! the expected output, the drop reason counted, the conntrack entries added, counter deltas
//! and named [`Check`]s on the state after it), changes to the fixture between rows
//! ([`Scenario::set`]), checks ([`Scenario::check`]) and waits ([`Scenario::wait`]). A row is
//! one expression: [`Row::redirected`], [`Row::passed`] or [`Row::dropped`] with a frame, then
//! `.entries(2)`, `.counter(stat, 1..=1)`, `.check("name", |cx| assert!(..))`, `.only(mode)`,
//! `.through(mode)` (the other program of the fixture) as needed; its fields are public for
//! anything else (e.g. `out: Out::Bytes(expected)`).
//!
//! [`run`] plays one scenario in one attach mode on a topology and fixture of its own (so a
//! scenario run alone behaves as in the whole suite). It does not stop at the first failure:
//! every row runs, every failed expectation is collected, and the test fails once at the end
//! with all of them, each named by scenario, mode and row (a failed check with the place it
//! failed; the panics it catches print nothing else). [`scenario_tests!`](crate::scenario_tests)
//! makes one test per scenario and mode, `<scenario>::xdp` and `<scenario>::tc`, so the test
//! name filter selects them: `cargo test -p gateway-tests --test datapath -- <scenario>` runs
//! one scenario in both modes, `-- --exact <scenario>::tc` one mode.
//!
//! What exists only once the datapath has run (the SNAT port it drew at random, the backend of
//! a flow) is read when the row runs, through a [`Ctx`]: [`Input::with`], [`Out::with`], and
//! the frames and expectations of a [`Conn`] do so. A row's input and expected output are
//! resolved before its packet runs; its checks after.
//!
//! The addresses and MACs are [`Topology`](crate::netns::Topology)'s (its constants and
//! functions, which build the topology too): the client on [`Link::Client`], backend `i` at
//! [`backend_ip`]`(i)` on [`Link::Backend`]`(i)`.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    ops::RangeInclusive,
    time::Duration,
};

pub use gateway::datapath::AttachMode;
use gateway::maglev;
use gateway_common::{
    DropReason, GlobalStat,
    maps::{AppConfig, Flow, FlowKey4},
};

use crate::{
    datapath::{Fixture, Verdict},
    model::wire::show_key,
    packet::{Frame, Parsed, parse_checked, rst_answer},
};

mod conn;
mod runner;

pub use conn::{
    BACKEND_ISN, CLIENT_ISN, Conn, Link, Rewrite, backend, backend_index, backend_ip, client,
    from_backend, from_client,
};
pub use runner::run;

/// One test per scenario and attach mode: for each `name`, a module `name` with the tests
/// `xdp` and `tc`, each running `name()` (a `fn() -> Scenario` in scope) through [`run`].
#[macro_export]
macro_rules! scenario_tests {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[test]
            fn xdp() {
                $crate::scenario::run(
                    stringify!($name),
                    super::$name,
                    $crate::scenario::AttachMode::Xdp,
                );
            }

            #[test]
            fn tc() {
                $crate::scenario::run(
                    stringify!($name),
                    super::$name,
                    $crate::scenario::AttachMode::Tc,
                );
            }
        }
    )+};
}

// ---------------------------------------------------------------------------------------------
// Scenarios and rows.

/// A sequence of rows and set-up steps, played in order on one fresh fixture.
pub struct Scenario {
    /// Backends of the topology (and of app 1, in the default fixture). Default 3.
    pub backends: usize,
    /// Makes the fixture from the attach mode and the backends' addresses, inside the gateway's
    /// namespace. Default: [`Fixture::new`] with a conntrack of 65,536 entries.
    pub fixture: fn(AttachMode, &[Ipv4Addr]) -> Fixture,
    pub steps: Vec<Step>,
}

/// One step of a scenario.
pub enum Step {
    Row(Row),
    /// Changes the fixture between rows (drains a backend, reconfigures SNAT); named for the
    /// report, may assert.
    Set(String, Box<dyn FnOnce(&mut Ctx) + Send>),
    /// Checks the state between rows.
    Check(Check),
    /// Lets time pass (a cache age, an idle timeout).
    Wait(Duration),
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            backends: 3,
            fixture: |mode, backend_ips| Fixture::new(mode, backend_ips, 1 << 16),
            steps: Vec::new(),
        }
    }
}

impl Scenario {
    pub fn new() -> Self {
        Self::default()
    }

    /// A topology of `n` backends.
    pub fn backends(mut self, n: usize) -> Self {
        self.backends = n;
        self
    }

    /// The fixture made by `make` instead of the default one.
    pub fn fixture(mut self, make: fn(AttachMode, &[Ipv4Addr]) -> Fixture) -> Self {
        self.fixture = make;
        self
    }

    pub fn row(mut self, row: Row) -> Self {
        self.steps.push(Step::Row(row));
        self
    }

    pub fn rows(mut self, rows: impl IntoIterator<Item = Row>) -> Self {
        self.steps.extend(rows.into_iter().map(Step::Row));
        self
    }

    /// Changes the fixture (`what` names the change in the report).
    pub fn set(
        mut self,
        what: impl Into<String>,
        change: impl FnOnce(&mut Ctx) + Send + 'static,
    ) -> Self {
        self.steps.push(Step::Set(what.into(), Box::new(change)));
        self
    }

    /// Checks the state between rows (`name` names the check in the report).
    pub fn check(mut self, name: impl Into<String>, f: impl FnOnce(&Ctx) + Send + 'static) -> Self {
        self.steps.push(Step::Check(Check::new(name, f)));
        self
    }

    pub fn wait(mut self, time: Duration) -> Self {
        self.steps.push(Step::Wait(time));
        self
    }
}

/// One packet through the program and what must follow from it.
pub struct Row {
    pub name: String,
    pub frame: Input,
    /// The program's verdict.
    pub expect: Verdict,
    pub out: Out,
    /// The drop reason this packet counts (exactly one), or none (no drop counted at all).
    pub drop: Option<DropReason>,
    /// Conntrack entries this packet adds (negative: removes).
    pub entries: i64,
    /// Global counters and the range their increase must fall in (`n..=n`: exactly `n`).
    pub counters: Vec<(GlobalStat, RangeInclusive<u64>)>,
    /// Checks on the state after the packet.
    pub checks: Vec<Check>,
    /// The attach modes this row runs in (default both).
    pub modes: &'static [AttachMode],
    /// The program the row's packet goes through, if not the scenario's mode's: in XDP mode
    /// the TC program is attached alongside and gets what XDP hands to the kernel.
    pub program: Option<AttachMode>,
}

impl Row {
    fn new(name: impl Into<String>, frame: impl Into<Input>, expect: Verdict, out: Out) -> Self {
        Row {
            name: name.into(),
            frame: frame.into(),
            expect,
            out,
            drop: None,
            entries: 0,
            counters: Vec::new(),
            checks: Vec::new(),
            modes: &AttachMode::ALL,
            program: None,
        }
    }

    /// Redirected (translated) as `out` says.
    pub fn redirected(name: impl Into<String>, frame: impl Into<Input>, out: Out) -> Self {
        Self::new(name, frame, Verdict::Redirect, out)
    }

    /// Answered like a host without the socket: the RST of [`rst_answer`] sent back, counted
    /// `rst_no_flow`, nothing dropped.
    pub fn answered(name: impl Into<String>, frame: Frame) -> Self {
        let rst = rst_answer(&frame);
        Self::new(name, frame, Verdict::Tx, Out::Bytes(rst)).counter(GlobalStat::RstNoFlow, 1..=1)
    }

    /// Answered with a segment of the gateway's own sent back out of the interface it came in
    /// on (the SYN proxy's SYN-ACK, or ACK to a backend), which `out` describes; nothing dropped.
    pub fn sent_back(name: impl Into<String>, frame: impl Into<Input>, out: Out) -> Self {
        Self::new(name, frame, Verdict::Tx, out)
    }

    /// Handed to the kernel unchanged.
    pub fn passed(name: impl Into<String>, frame: impl Into<Input>) -> Self {
        Self::new(name, frame, Verdict::Pass, Out::Same)
    }

    /// Dropped and counted under `reason`.
    pub fn dropped(name: impl Into<String>, frame: impl Into<Input>, reason: DropReason) -> Self {
        Row {
            drop: Some(reason),
            ..Self::new(name, frame, Verdict::Drop, Out::Any)
        }
    }

    /// Adds `n` conntrack entries (negative: removes).
    pub fn entries(mut self, n: i64) -> Self {
        self.entries = n;
        self
    }

    /// Increases counter `stat` by an amount within `delta`.
    pub fn counter(mut self, stat: GlobalStat, delta: RangeInclusive<u64>) -> Self {
        self.counters.push((stat, delta));
        self
    }

    /// Checks the state after the packet (`name` names the check in the report).
    pub fn check(mut self, name: impl Into<String>, f: impl FnOnce(&Ctx) + Send + 'static) -> Self {
        self.checks.push(Check::new(name, f));
        self
    }

    /// Goes through `mode`'s program of the fixture instead of the scenario's (its verdict read
    /// as that program's).
    pub fn through(mut self, mode: AttachMode) -> Self {
        self.program = Some(mode);
        self
    }

    /// Runs in `mode` only.
    pub fn only(mut self, mode: AttachMode) -> Self {
        self.modes = match mode {
            AttachMode::Xdp => &[AttachMode::Xdp],
            AttachMode::Tc => &[AttachMode::Tc],
        };
        self
    }
}

/// A named check: it holds unless it panics (plain `assert!`s).
pub struct Check {
    pub name: String,
    pub f: Box<dyn FnOnce(&Ctx) + Send>,
}

impl Check {
    pub fn new(name: impl Into<String>, f: impl FnOnce(&Ctx) + Send + 'static) -> Self {
        Check {
            name: name.into(),
            f: Box::new(f),
        }
    }
}

/// What builds an [`Input::Built`].
pub type BuildBytes = dyn FnOnce(&Ctx) -> Vec<u8> + Send;

/// A row's input frame.
pub enum Input {
    /// These bytes (for what [`Frame`] does not build: cuts, a bad `ihl`, another ethertype).
    Bytes(Vec<u8>),
    /// A frame built when the row runs (it may read the fixture, e.g. a flow's SNAT port).
    Frame(Box<dyn FnOnce(&Ctx) -> Frame + Send>),
    /// Bytes built when the row runs (a frame built then spoiled: [`Input::spoiled`]).
    Built(Box<BuildBytes>),
    /// The frame the last row sent, byte for byte (the same packet through another program:
    /// [`Row::through`]).
    Last,
}

impl From<Vec<u8>> for Input {
    fn from(bytes: Vec<u8>) -> Self {
        Input::Bytes(bytes)
    }
}

impl From<Frame> for Input {
    fn from(frame: Frame) -> Self {
        Input::Frame(Box::new(move |_| frame))
    }
}

impl Input {
    /// A frame built from the context when the row runs.
    pub fn with(build: impl FnOnce(&Ctx) -> Frame + Send + 'static) -> Self {
        Input::Frame(Box::new(build))
    }

    /// The same frame, changed by `change` (e.g. a payload, a sequence number).
    pub fn map(self, change: impl FnOnce(Frame) -> Frame + Send + 'static) -> Self {
        match self {
            Input::Frame(build) => Input::Frame(Box::new(move |cx| change(build(cx)))),
            Input::Bytes(_) | Input::Built(_) | Input::Last => {
                panic!("Input::map: bytes are not a Frame; change them directly")
            }
        }
    }

    /// The frame's bytes, changed by `spoil` once built (checksums and all).
    pub fn spoiled(self, spoil: impl FnOnce(&mut Vec<u8>) + Send + 'static) -> Self {
        Input::Built(Box::new(move |cx| {
            let mut bytes = self.bytes(cx);
            spoil(&mut bytes);
            bytes
        }))
    }

    fn bytes(self, cx: &Ctx) -> Vec<u8> {
        match self {
            Input::Bytes(bytes) => bytes,
            Input::Frame(build) => build(cx).build(),
            Input::Built(build) => build(cx),
            Input::Last => cx.input.clone(),
        }
    }
}

/// What the output frame must be.
pub enum Out {
    /// Identical to the input.
    Same,
    /// Not looked at (drops).
    Any,
    /// Translated, with IPv4 and TCP checksums right (computed from scratch), payload and
    /// flags as the input's, the TTL one less: this source (`None`: the SNAT address, a port of
    /// [`SNAT_PORTS`](crate::datapath::SNAT_PORTS)), destination and (source, destination) MACs.
    Nat {
        src: Option<SocketAddrV4>,
        dst: SocketAddrV4,
        macs: ([u8; 6], [u8; 6]),
    },
    /// Exactly these bytes.
    Bytes(Vec<u8>),
    /// Computed from the context before the row's packet runs.
    With(Box<dyn FnOnce(&Ctx) -> Out + Send>),
}

impl Out {
    pub fn with(f: impl FnOnce(&Ctx) -> Out + Send + 'static) -> Self {
        Out::With(Box::new(f))
    }
}

// ---------------------------------------------------------------------------------------------
// What rows see.

/// The fixture of a running scenario and the last row's frames.
pub struct Ctx {
    pub fx: Fixture,
    /// The frame the last row sent (empty before the first row).
    pub input: Vec<u8>,
    /// The frame the program gave back for it.
    pub output: Vec<u8>,
}

impl Ctx {
    pub fn mode(&self) -> AttachMode {
        self.fx.mode
    }

    /// A global counter's value.
    pub fn stat(&self, stat: GlobalStat) -> u64 {
        self.fx.dp.global_stats().expect("global stats").get(stat)
    }

    /// The conntrack entry under `key`; panics if there is none.
    #[track_caller]
    pub fn flow(&self, key: FlowKey4) -> Flow {
        self.fx
            .dp
            .flow(&key)
            .expect("conntrack lookup")
            .unwrap_or_else(|| panic!("no conntrack entry {}", show_key(&key)))
    }

    /// The state bits of the entry under `key`.
    #[track_caller]
    pub fn state(&self, key: FlowKey4) -> u8 {
        self.flow(key).state
    }

    /// The last row's output, parsed, its checksums verified (panics unless IPv4/TCP).
    #[track_caller]
    pub fn parsed(&self) -> Parsed {
        parse_checked(&self.output)
    }

    /// The backend userspace's Maglev table gives `conn`'s tuple (of app 1).
    pub fn maglev(&self, conn: Conn) -> maglev::Entry {
        self.fx.expected_backend(conn.client, conn.service)
    }
}

/// A step that sets app 1's datapath settings (`gw_app_cfg_v1`) to `config`.
pub fn app_config(config: AppConfig) -> impl FnOnce(&mut Ctx) + Send + 'static {
    move |cx| {
        cx.fx
            .dp
            .set_app_config(crate::datapath::APP, config)
            .expect("app config")
    }
}
