//! BPF_PROG_TEST_RUN fixture: the datapath loaded and configured as on a gateway, run on
//! crafted frames from a thread inside the gateway's namespace (so `bpf_fib_lookup` sees its
//! routes and neighbours).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
};

use aya::programs::{ProgramError, SchedClassifier, TestRun as _, TestRunOptions, Xdp};
use gateway::{
    datapath::{AttachMode, Datapath, LoadOptions},
    maglev,
};
use gateway_common::maps::FlowKey4;

use crate::{
    netns::Topology,
    packet::{ETH_LEN, ETH_P_IPV4, IPV4_LEN},
};

/// A loaded program of either attach mode.
pub enum Program<'a> {
    Xdp(&'a mut Xdp),
    Tc(&'a mut SchedClassifier),
}

/// BPF_PROG_TEST_RUN of `program` on `frame`, `repeat` times: its return value, the output
/// frame (of the last run) and the average ns per run. Panics if the kernel refuses the run.
pub fn test_run(program: Program<'_>, frame: &[u8], repeat: u32) -> (u32, Vec<u8>, f64) {
    try_test_run(program, frame, repeat)
        .unwrap_or_else(|e| panic!("test_run on a {}-byte frame: {e:?}", frame.len()))
}

/// [`test_run`], or the kernel's refusal to run (see [`refuses`]).
pub fn try_test_run(
    program: Program<'_>,
    frame: &[u8],
    repeat: u32,
) -> Result<(u32, Vec<u8>, f64), ProgramError> {
    let mut out = vec![0u8; frame.len() + 512];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat,
        ..TestRunOptions::new()
    };
    let result = match program {
        Program::Xdp(p) => p.test_run(opts),
        Program::Tc(p) => p.test_run(opts),
    }?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out, result.duration.as_nanos() as f64))
}

/// The longest frame TC's test_run takes: a page less the skb's headroom and shared info.
pub const TC_TEST_RUN_MAX: usize = 3712;

/// Whether the kernel refuses to run `mode`'s program on `frame`: BPF_PROG_TEST_RUN's own
/// limits, as measured on Linux 6.18 (nothing the datapath decides). In both modes a frame
/// shorter than an Ethernet header; in TC (an skb) also an IPv4 frame shorter than a minimal
/// IPv4 header after it (34 bytes), an IPv6 one shorter than an IPv6 header (54), and one
/// over [`TC_TEST_RUN_MAX`] bytes.
pub fn refuses(mode: AttachMode, frame: &[u8]) -> bool {
    const ETH_P_IPV6: u16 = 0x86dd;
    const IPV6_LEN: usize = 40;
    if frame.len() < ETH_LEN {
        return true;
    }
    match mode {
        AttachMode::Xdp => false,
        AttachMode::Tc => {
            let network = match u16::from_be_bytes([frame[12], frame[13]]) {
                ETH_P_IPV4 => IPV4_LEN,
                ETH_P_IPV6 => IPV6_LEN,
                _ => 0,
            };
            frame.len() < ETH_LEN + network || frame.len() > TC_TEST_RUN_MAX
        }
    }
}

/// What the program decided, whatever the attach mode: read from a run's return code
/// ([`Verdict::of`]), or expected by a test or the model (its code: [`Verdict::code`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// To the kernel, unchanged.
    Pass,
    Drop,
    /// Translated and redirected to a next hop.
    Redirect,
    /// Sent back out of the interface it came in on (spec §7's RST): a redirect to the ingress
    /// interface in both modes (not XDP_TX), so its code is a redirect's and only the output
    /// frame tells it from a translation; [`Verdict::of`] never gives it.
    Tx,
    /// Any other return code (XDP_TX, XDP_ABORTED, ...): never what the datapath should do.
    Other(u32),
}

impl Verdict {
    /// The verdict a run of `mode`'s program returned `ret` for.
    pub fn of(mode: AttachMode, ret: u32) -> Self {
        match (mode, ret) {
            (AttachMode::Xdp, 2) | (AttachMode::Tc, 0) => Verdict::Pass,
            (AttachMode::Xdp, 1) | (AttachMode::Tc, 2) => Verdict::Drop,
            (AttachMode::Xdp, 4) | (AttachMode::Tc, 7) => Verdict::Redirect,
            (_, other) => Verdict::Other(other),
        }
    }

    /// The program's return value for this verdict in `mode`.
    pub fn code(self, mode: AttachMode) -> u32 {
        match (mode, self) {
            (AttachMode::Xdp, Verdict::Pass) => 2,
            (AttachMode::Xdp, Verdict::Drop) => 1,
            (AttachMode::Xdp, Verdict::Redirect | Verdict::Tx) => 4,
            (AttachMode::Tc, Verdict::Pass) => 0,
            (AttachMode::Tc, Verdict::Drop) => 2,
            (AttachMode::Tc, Verdict::Redirect | Verdict::Tx) => 7,
            (_, Verdict::Other(code)) => code,
        }
    }

    /// Whether `self`, as expected, admits the verdict `got` of a run: the same return code
    /// (for [`Verdict::Tx`], a redirect's).
    pub fn admits(self, got: Verdict) -> bool {
        self == got || (self == Verdict::Tx && got == Verdict::Redirect)
    }
}

/// Pins the calling thread (a scenario's, or a test's) to CPU 0, for what the datapath keeps per
/// CPU (the next-hop cache, the ICMP token buckets): every row then meets the same CPU's.
pub fn pin_to_cpu_0() {
    // SAFETY: a zeroed cpu_set_t with CPU 0 set, for this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
}

/// The service every fixture has: app 1 on `PUBLIC:20000`, backends 1..=3 (`b0..b2:8080`).
pub const APP: u32 = 1;
/// App 1's port: also the one the daemon gives its first app (the first of its default
/// range, 20000-29999), so that the end-to-end tests' app is at [`Fixture::service`] too.
pub const SERVICE_PORT: u16 = 20_000;
pub const BACKEND_PORT: u16 = 8080;
pub const SNAT_PORTS: std::ops::RangeInclusive<u16> = 40_000..=49_999;
/// ICMP errors the fixture translates per second (the daemon's default).
pub const ICMP_RATE: u32 = gateway::config::DEFAULT_ICMP_RATE;

/// A loaded datapath with app 1 configured over the topology's backends.
pub struct Fixture {
    pub dp: Datapath,
    pub mode: AttachMode,
    pub backends: Vec<maglev::Entry>,
}

impl Fixture {
    /// Loads the datapath (conntrack of `capacity` entries) and configures app 1 with the
    /// topology's backends. Call from a thread inside the gateway namespace.
    pub fn new(mode: AttachMode, backend_ips: &[Ipv4Addr], capacity: u32) -> Self {
        Self::load(mode, backend_ips, capacity, None)
    }

    /// As [`Fixture::new`], with every map pinned in `pin_dir` (a directory on a bpffs of the
    /// caller's, such as a [`crate::netns::Topology`]'s), so that other objects can share them
    /// (the benchmark's: `Datapath::load_bench`).
    pub fn pinned(
        mode: AttachMode,
        backend_ips: &[Ipv4Addr],
        capacity: u32,
        pin_dir: &Path,
    ) -> Self {
        Self::load(mode, backend_ips, capacity, Some(pin_dir.to_owned()))
    }

    fn load(
        mode: AttachMode,
        backend_ips: &[Ipv4Addr],
        capacity: u32,
        pin_dir: Option<PathBuf>,
    ) -> Self {
        let mut dp = Datapath::load_with(&LoadOptions {
            conntrack_capacity: capacity,
            pin_dir,
        })
        .expect("load the datapath");
        dp.configure(
            Topology::SNAT_IP,
            SNAT_PORTS,
            std::time::Duration::from_secs(60),
        )
        .expect("configure");
        // ICMP errors translated, as the daemon has them.
        dp.set_icmp_rate(ICMP_RATE).expect("icmp rate");
        let backends: Vec<maglev::Entry> = backend_ips
            .iter()
            .enumerate()
            .map(|(i, ip)| maglev::Entry {
                id: i as u32 + 1,
                addr: SocketAddrV4::new(*ip, BACKEND_PORT),
                weight: 1,
            })
            .collect();
        for b in &backends {
            dp.set_backend(b.id, b.addr, true).expect("backend");
        }
        dp.set_app_backends(APP, &backends).expect("maglev");
        dp.set_service(Self::service(), APP).expect("service");
        Fixture { dp, mode, backends }
    }

    /// The public endpoint of app 1.
    pub fn service() -> SocketAddrV4 {
        SocketAddrV4::new(Topology::PUBLIC_IP, SERVICE_PORT)
    }

    /// Runs the program of this fixture's mode once on `frame`. Panics if the kernel refuses
    /// the run.
    pub fn run(&mut self, frame: &[u8]) -> (Verdict, Vec<u8>) {
        let (ret, out) = self
            .try_run(frame)
            .unwrap_or_else(|e| panic!("test_run on a {}-byte frame: {e:?}", frame.len()));
        (Verdict::of(self.mode, ret), out)
    }

    /// Runs the program of this fixture's mode once on `frame`: its return value and output,
    /// or the kernel's refusal to run (see [`refuses`]).
    pub fn try_run(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>), ProgramError> {
        let (ret, out, _) = try_test_run(self.program(), frame, 1)?;
        Ok((ret, out))
    }

    /// Average ns per run over `repeat` runs of `frame`.
    pub fn time(&mut self, frame: &[u8], repeat: u32) -> f64 {
        test_run(self.program(), frame, repeat).2
    }

    fn program(&mut self) -> Program<'_> {
        match self.mode {
            AttachMode::Xdp => Program::Xdp(self.dp.xdp().expect("xdp")),
            AttachMode::Tc => Program::Tc(self.dp.tc().expect("tc")),
        }
    }

    /// The backend userspace expects app 1 to give a new flow `client → public`, as the
    /// datapath would choose it now (`Datapath::predict_backend`).
    pub fn expected_backend(&self, client: SocketAddrV4, public: SocketAddrV4) -> maglev::Entry {
        let id = self
            .dp
            .predict_backend(APP, client, public)
            .expect("table")
            .expect("app 1 has backends");
        *self
            .backends
            .iter()
            .find(|b| b.id == id)
            .expect("a known backend")
    }

    /// The backend in the first Maglev slot of a new flow `client → public` of app 1 (its
    /// hashed slot), whether or not it accepts new flows: the datapath's choice while it does
    /// (see [`Fixture::expected_backend`] for the choice itself).
    pub fn slot_backend(&self, client: SocketAddrV4, public: SocketAddrV4) -> maglev::Entry {
        let table = self
            .dp
            .app_table(APP)
            .expect("table")
            .expect("app 1 has a table");
        let id = table[FlowKey4::from_addrs(client, public).maglev_slot() as usize];
        *self
            .backends
            .iter()
            .find(|b| b.id == id)
            .expect("a known backend")
    }
}
