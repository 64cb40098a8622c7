//! The datapath (through BPF_PROG_TEST_RUN on a [`Fixture`]) and the model side by side: each
//! operation is played on both, and every verdict, output byte, drop and counter delta and
//! conntrack change compared.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use gateway::datapath::{AttachMode, GlobalStats, monotonic_ns};
use gateway_common::{
    DropReason, GlobalStat,
    maps::{
        ADDR_PUBLIC, ADDR_SNAT, APP_CLIENT_ADDRESS_TOA, AppConfig, BACKEND_ACCEPTING, Backend4,
        DIR_FORWARD, Flow, FlowKey4, ServiceKey4, TRACK_LIBERAL, TRACK_PROXIED, TrafficStats,
    },
    net::{ip_to_net, port_from_net},
    syncookie,
};

use super::ops::{Client, Op, hex};
use crate::{
    datapath::{APP, Fixture, refuses},
    model::{
        Clock, EntryExp, Hop, Model, Observed, Rules, Verdict, diff_flows,
        expect::check_time,
        show_flow,
        wire::{self, Parse},
    },
    netns::{Topology, ifindex},
    packet::first_difference,
    scenario::{Link, backend_index},
};

/// What went differently, with both sides' views.
#[derive(Debug)]
pub struct Divergence {
    /// Each difference, one line.
    pub problems: Vec<String>,
    /// The frame played, the datapath's output and the model's (if it expects one).
    pub frame: Vec<u8>,
    pub got: Vec<u8>,
    pub want: Option<Vec<u8>>,
    /// The entries involved, as each side holds them after the run.
    pub entries: Vec<String>,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        if !self.frame.is_empty() {
            writeln!(f, "  frame in:        {}", hex(&self.frame))?;
            writeln!(f, "  datapath's out:  {}", hex(&self.got))?;
            if let Some(w) = &self.want {
                writeln!(f, "  model's out:     {}", hex(w))?;
            }
        }
        for e in &self.entries {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

/// A fixture and a model in step.
pub struct Harness {
    pub fx: Fixture,
    pub model: Model,
    initial: Model,
    stats: GlobalStats,
    traffic: HashMap<(bool, u32), TrafficStats>,
    /// The last flow each client tuple had: (backend, SNAT address and port).
    last_flow: HashMap<Client, (SocketAddrV4, SocketAddrV4)>,
    /// Compare the whole table every this many packets (1: every packet).
    pub full_every: u64,
    /// Packets played, and those the kernel refused to run (test_run's own limits,
    /// [`refuses`]; a refusal of any other frame is a divergence).
    pub packets: u64,
    pub refused: u64,
    /// How often each verdict, drop reason and counter came up (what the run exercised).
    pub coverage: std::collections::BTreeMap<String, u64>,
    /// The output the model expected of the last packet played (not for a drop): what the
    /// generator's hosts answer (a cookie's SYN-ACK, the SYN proxy's segments).
    pub last_out: Option<Vec<u8>>,
}

impl Harness {
    /// A fixture in `mode` over `backend_ips` (call inside the topology's gateway namespace),
    /// SNAT ports `snat_ports`, at most `half_open_max` half-open flows per app before SYN
    /// cookies, and the model of it following `rules`.
    pub fn new(
        mode: AttachMode,
        rules: Rules,
        backend_ips: &[Ipv4Addr],
        snat_ports: std::ops::RangeInclusive<u16>,
        half_open_max: u32,
        client_address: bool,
    ) -> Self {
        let mut fx = Fixture::new(mode, backend_ips, 1 << 14);
        let max_age = Duration::from_secs(60);
        fx.dp
            .configure(Topology::SNAT_IP, snat_ports.clone(), max_age)
            .expect("configure");
        fx.dp
            .set_half_open_max(half_open_max)
            .expect("half-open max");
        let mut m = Model::new(rules);
        m.half_open_max = half_open_max;
        if client_address && rules == Rules::Spec14 {
            fx.dp
                .set_app_config(
                    APP,
                    AppConfig {
                        flags: APP_CLIENT_ADDRESS_TOA,
                        ..AppConfig::default()
                    },
                )
                .expect("app config");
            m.client_address.insert(APP);
        }
        // What `Datapath::configure` set: a quarter of the table, half the SNAT range.
        let ports = u32::from(snat_ports.end() - snat_ports.start()) + 1;
        m.half_open_global_max = (fx.dp.conntrack_capacity() / 4).min(ports / 2).max(1);
        m.cookie_key = fx.dp.cookie_key().expect("cookie key");
        m.snat_ip = ip_to_net(Topology::SNAT_IP);
        m.snat_ports = (*snat_ports.start(), *snat_ports.end());
        m.nexthop_max_age_ns = max_age.as_nanos() as u64;
        m.addrs = vec![
            (ip_to_net(Topology::PUBLIC_IP), ADDR_PUBLIC),
            (ip_to_net(Topology::SNAT_IP), ADDR_SNAT),
        ];
        m.services
            .insert(ServiceKey4::from_addr(Fixture::service()), APP);
        let table = fx.dp.app_table(APP).expect("table").expect("app 1's table");
        m.tables.insert(APP, table);
        for b in &fx.backends {
            m.backends
                .insert(b.id, Backend4::new(b.addr, BACKEND_ACCEPTING));
        }
        let links = std::iter::once((Link::Client, "client0".to_owned()))
            .chain((0..backend_ips.len()).map(|i| (Link::Backend(i), format!("b{i}"))));
        for (link, name) in links {
            let (smac, dmac) = link.out_macs();
            m.hops.insert(
                ip_to_net(link.ip()),
                Hop {
                    ifindex: ifindex(&name).unwrap_or_else(|e| {
                        panic!("no interface {name} in the gateway namespace: {e}")
                    }),
                    smac,
                    dmac,
                },
            );
        }
        let stats = fx.dp.global_stats().expect("stats");
        let mut h = Harness {
            fx,
            initial: m.clone(),
            model: m,
            stats,
            traffic: HashMap::new(),
            last_flow: HashMap::new(),
            full_every: 128,
            packets: 0,
            refused: 0,
            coverage: Default::default(),
            last_out: None,
        };
        h.traffic = h.read_traffic();
        h
    }

    /// Back to the state after [`Harness::new`]: no flows, every backend accepting.
    pub fn reset(&mut self) {
        self.fx
            .dp
            .conntrack_mut()
            .remove_where(|_| true)
            .expect("clear conntrack");
        for b in self.fx.backends.clone() {
            self.fx.dp.set_backend(b.id, b.addr, true).expect("backend");
        }
        for slot in [APP, 0] {
            self.fx.dp.set_half_open(slot, 0).expect("half-open count");
        }
        self.fx
            .dp
            .set_half_open_max(self.initial.half_open_max)
            .expect("half-open max");
        self.fx
            .dp
            .set_half_open_global_max(self.initial.half_open_global_max)
            .expect("global half-open max");
        // The datapath's `gw_cookies_v1` is not cleared: the model keeps its own copy.
        let cookies = std::mem::take(&mut self.model.cookies);
        self.model = self.initial.clone();
        self.model.cookies = cookies;
        self.last_flow.clear();
        self.stats = self.fx.dp.global_stats().expect("stats");
        self.traffic = self.read_traffic();
    }

    fn read_traffic(&self) -> HashMap<(bool, u32), TrafficStats> {
        let mut t = HashMap::new();
        t.insert((true, APP), self.fx.dp.app_stats(APP).expect("app stats"));
        for b in &self.fx.backends {
            t.insert(
                (false, b.id),
                self.fx.dp.backend_stats(b.id).expect("backend stats"),
            );
        }
        t
    }

    /// The bytes of a packet operation, addresses resolved.
    pub fn frame(&mut self, op: &Op) -> Option<Vec<u8>> {
        let (seg, link) = match op {
            Op::Client { client, seg } => {
                let mut s = seg.clone();
                s.src = client.addr();
                s.dst = Fixture::service();
                (s, client.link)
            }
            Op::Backend { client, seg } => {
                let (backend, snat) = self.flow_ends(*client);
                let mut s = seg.clone();
                s.src = backend;
                s.dst = snat;
                (s, Link::Backend(backend_index(*backend.ip())))
            }
            Op::Raw { link, seg } => (seg.clone(), *link),
            Op::Bytes(b) => return Some(b.clone()),
            _ => return None,
        };
        let mut s = seg;
        (s.src_mac, s.dst_mac) = (link.host_mac(), link.gw_mac());
        Some(s.build())
    }

    /// The backend and SNAT address of `client`'s flow (or of its last one).
    fn flow_ends(&mut self, client: Client) -> (SocketAddrV4, SocketAddrV4) {
        if let Some(f) = self.model.ct.get(&client.key()) {
            let ends = (f.nat_dst(), f.nat_src());
            self.last_flow.insert(client, ends);
            return ends;
        }
        self.last_flow.get(&client).copied().unwrap_or((
            SocketAddrV4::new(
                crate::scenario::backend_ip(0),
                crate::datapath::BACKEND_PORT,
            ),
            SocketAddrV4::new(Topology::SNAT_IP, self.model.snat_ports.0),
        ))
    }

    /// Plays `op` on both sides and compares.
    pub fn exec(&mut self, op: &Op) -> Result<(), Box<Divergence>> {
        self.last_out = None;
        if let Some(c) = op.client()
            && let Some(f) = self.model.ct.get(&c.key())
        {
            self.last_flow.insert(c, (f.nat_dst(), f.nat_src()));
        }
        match op {
            Op::Health { id, accepting } => {
                let addr = self.model.backends[id].addr();
                self.fx
                    .dp
                    .set_backend(*id, addr, *accepting)
                    .expect("backend");
                self.model.backends.get_mut(id).unwrap().flags =
                    if *accepting { BACKEND_ACCEPTING } else { 0 };
                Ok(())
            }
            Op::Age {
                client,
                by_ms,
                nexthop,
            } => {
                let by = u64::from(*by_ms) * 1_000_000;
                self.edit_pair(*client, |f| {
                    f.last_seen_ns = f.last_seen_ns.saturating_sub(by);
                    if *nexthop && f.nexthop_ns != 0 {
                        f.nexthop_ns = f.nexthop_ns.saturating_sub(by).max(1);
                    }
                });
                Ok(())
            }
            Op::Liberal { client } => {
                self.edit_pair(*client, |f| {
                    f.track = TRACK_LIBERAL;
                    (f.wscale, f.peer_wscale) = (14, 14);
                    (f.seq_end, f.ack_max, f.win_max) = (0, 0, 0);
                });
                Ok(())
            }
            Op::Scan => self.scan(),
            Op::Cap { max } => {
                self.fx.dp.set_half_open_max(*max).expect("half-open max");
                self.model.half_open_max = *max;
                Ok(())
            }
            Op::GlobalCap { max } => {
                self.fx
                    .dp
                    .set_half_open_global_max(*max)
                    .expect("global half-open max");
                self.model.half_open_global_max = *max;
                Ok(())
            }
            _ => {
                let frame = self.frame(op).expect("a packet");
                self.packet(&frame)
            }
        }
    }

    /// What the daemon's conntrack scan does to the half-open count: app 1's set to what a walk
    /// of the datapath's table finds (the daemon's own count), and the model's to what its rule
    /// finds in its table; the two must agree.
    fn scan(&mut self) -> Result<(), Box<Divergence>> {
        let counts = self.fx.dp.conntrack().counts().expect("conntrack counts");
        let dp = counts.half_open.get(&APP).copied().unwrap_or(0) as i64;
        let m = self.model.half_open_exact(APP);
        self.fx.dp.set_half_open(APP, dp).expect("half-open count");
        self.model.half_open.insert(APP, m);
        // Slot 0: all apps' together (the daemon's sum).
        let all = counts.half_open.values().sum::<u64>() as i64;
        self.fx.dp.set_half_open(0, all).expect("half-open count");
        self.model
            .half_open
            .insert(0, self.model.half_open_exact(0));
        if dp == m {
            return Ok(());
        }
        Err(Box::new(Divergence {
            problems: vec![format!(
                "scan: the daemon counts {dp} half-open flows of app {APP} in the datapath's table, the model {m} in its own"
            )],
            frame: Vec::new(),
            got: Vec::new(),
            want: None,
            entries: Vec::new(),
        }))
    }

    /// Changes both entries of `client`'s flow alike on both sides (if both sides have them).
    fn edit_pair(&mut self, client: Client, edit: impl Fn(&mut Flow)) {
        let key = client.key();
        let Some(fwd) = self.model.ct.get(&key).copied() else {
            return;
        };
        for k in [key, fwd.peer_key()] {
            let (Some(m), Ok(Some(mut d))) = (self.model.ct.get_mut(&k), self.fx.dp.flow(&k))
            else {
                continue;
            };
            edit(m);
            edit(&mut d);
            self.fx.dp.insert_flow(k, d).expect("edit an entry");
        }
    }

    fn packet(&mut self, frame: &[u8]) -> Result<(), Box<Divergence>> {
        let mode = self.fx.mode;
        let before = monotonic_ns();
        let run = self.fx.try_run(frame);
        let after = monotonic_ns();
        let (ret, out) = match run {
            Ok(run) => run,
            Err(_) if refuses(mode, frame) => {
                self.refused += 1;
                return Ok(());
            }
            Err(e) => {
                return Err(Box::new(Divergence {
                    problems: vec![format!(
                        "test_run refused a {}-byte frame that is within its limits: {e:?}",
                        frame.len()
                    )],
                    frame: frame.to_vec(),
                    got: Vec::new(),
                    want: None,
                    entries: Vec::new(),
                }));
            }
        };
        self.packets += 1;
        let clock = Clock::around(before, after);
        let snat_port = match wire::parse(&out, |_| 1) {
            Parse::Tcp(s) if s.key.src_ip == self.model.snat_ip => {
                Some(port_from_net(s.key.src_port))
            }
            _ => None,
        };
        // The keys to compare: the packet's, and its peer on either side.
        let key = match wire::parse(frame, |_| 1) {
            Parse::Tcp(s) => Some(s.key),
            _ => None,
        };
        let out_seg = match wire::parse(&out, |_| 1) {
            Parse::Tcp(s) if ret == Verdict::Redirect.code(mode) => Some((s.flags, s.seq)),
            _ => None,
        };
        let seen = Observed {
            snat_port,
            passed: ret == Verdict::Pass.code(mode),
            out_seg,
        };
        let x = self.model.step(frame, mode, clock, seen);
        let stats = self.fx.dp.global_stats().expect("stats");
        let traffic = self.read_traffic();
        let mut problems = x.notes.clone();
        if ret != x.verdict.code(mode) {
            problems.push(format!(
                "verdict: datapath {ret}, model {:?} ({})",
                x.verdict,
                x.verdict.code(mode)
            ));
        }
        if let Some(want) = &x.out
            && *want != out
        {
            problems.push(format!(
                "output (the datapath's, expected the model's): {}",
                first_difference(&out, want)
            ));
        }
        for r in DropReason::ALL {
            let d = stats.drops(*r) - self.stats.drops(*r);
            let want = u64::from(x.drop == Some(*r));
            if d != want {
                problems.push(format!(
                    "drops for {}: datapath +{d}, model +{want}",
                    r.label()
                ));
            }
        }
        for s in GlobalStat::ALL {
            let d = stats.get(*s) - self.stats.get(*s);
            let want = x.stat_delta(*s);
            if !want.contains(&d) {
                problems.push(format!(
                    "counter {}: datapath +{d}, model +{want:?}",
                    s.label()
                ));
            }
        }
        for (k, now) in &traffic {
            let was = self.traffic[k];
            let d = TrafficStats {
                packets_in: now.packets_in - was.packets_in,
                bytes_in: now.bytes_in - was.bytes_in,
                packets_out: now.packets_out - was.packets_out,
                bytes_out: now.bytes_out - was.bytes_out,
                new_flows: now.new_flows - was.new_flows,
            };
            let want = x.traffic.get(k).copied().unwrap_or_default();
            if d != want {
                let who = if k.0 { "app" } else { "backend" };
                problems.push(format!(
                    "{who} {} traffic: datapath +{d:?}, model +{want:?}",
                    k.1
                ));
            }
        }
        if self.model.rules == Rules::Spec14 {
            for slot in [APP, 0] {
                let (dp, m) = (
                    self.fx.dp.half_open(slot).expect("half-open count"),
                    self.model.half_open(slot),
                );
                if dp != m {
                    problems.push(format!(
                        "half-open flows of app {slot} (0: all): datapath {dp}, model {m}"
                    ));
                }
            }
        }
        self.cover(format!("verdict {:?}", x.verdict));
        for p in &x.paths {
            self.cover((*p).to_owned());
        }
        if x.verdict == Verdict::Pass && x.stat_delta(GlobalStat::Passed) == (0..=0) {
            // A packet of ours handed to the kernel for its TC program (XDP).
            self.cover(HANDED_OVER.to_owned());
        }
        if x.verdict == Verdict::Redirect
            && let Some(k) = key
            && self
                .model
                .ct
                .get(&k)
                .is_some_and(|f| f.track & TRACK_PROXIED != 0 && f.seq_delta != 0)
        {
            self.cover(PROXIED_TRANSLATED.to_owned());
        }
        if syncookie::counter(clock.lo) != syncookie::counter(clock.hi)
            && [GlobalStat::SynCookiesSent, GlobalStat::SynCookiesAccepted]
                .iter()
                .any(|st| *x.stat_delta(*st).end() > 0)
        {
            // Issue 15: a cookie made or checked when either counter was the datapath's.
            self.cover("cookie at a counter step".to_owned());
        }
        self.last_out = (x.verdict != Verdict::Drop)
            .then(|| x.out.clone())
            .flatten();
        if let Some(r) = x.drop {
            self.cover(drop_key(r));
        }
        for st in GlobalStat::ALL {
            if stats.get(*st) > self.stats.get(*st) {
                self.cover(counter_key(*st));
            }
        }
        self.stats = stats;
        self.traffic = traffic;
        let mut keys: Vec<FlowKey4> = x.entries.keys().copied().collect();
        if let Some(k) = key {
            keys.push(k);
        }
        let mut entries = Vec::new();
        let mut peers = Vec::new();
        for k in &keys {
            if let Some(f) = self.model.ct.get(k) {
                peers.push(f.peer_key());
            }
            if let Ok(Some(f)) = self.fx.dp.flow(k) {
                peers.push(f.peer_key());
            }
        }
        keys.extend(peers);
        keys.sort_by_key(|k| (k.src_ip, k.dst_ip, k.src_port, k.dst_port));
        keys.dedup();
        for k in &keys {
            let exp = x
                .entries
                .get(k)
                .copied()
                .flatten()
                .unwrap_or(EntryExp::same());
            self.compare_entry(k, &exp, &clock, &mut problems, &mut entries);
        }
        if self.packets.is_multiple_of(self.full_every) {
            self.compare_all(&mut problems);
        }
        if problems.is_empty() {
            return Ok(());
        }
        Err(Box::new(Divergence {
            problems,
            frame: frame.to_vec(),
            got: out,
            want: x.out.clone(),
            entries,
        }))
    }

    fn cover(&mut self, what: String) {
        *self.coverage.entry(what).or_default() += 1;
    }

    /// Compares the entry `k` on both sides after a run; the model, whose entries keep their
    /// times from before it, takes the datapath's if they are plausible.
    fn compare_entry(
        &mut self,
        k: &FlowKey4,
        exp: &EntryExp,
        clock: &Clock,
        problems: &mut Vec<String>,
        entries: &mut Vec<String>,
    ) {
        let dp = self.fx.dp.flow(k).expect("conntrack lookup");
        let m = self.model.ct.get(k).copied();
        let name = wire::show_key(k);
        let show = |f: Option<Flow>| f.as_ref().map_or("none".to_owned(), show_flow);
        entries.push(format!(
            "entry {name}:\n    model:    {}\n    datapath: {}",
            show(m),
            show(dp)
        ));
        match (m, dp) {
            (None, None) => {}
            (Some(_), None) => problems.push(format!("entry {name}: the datapath has none")),
            (None, Some(_)) => problems.push(format!("entry {name}: the model has none")),
            (Some(m), Some(d)) => {
                for diff in diff_flows(&m, &d) {
                    problems.push(format!("entry {name}: {diff}"));
                }
                let o = m;
                let age = self.model.nexthop_max_age_ns;
                for r in [
                    check_time(
                        "created_ns",
                        exp.created,
                        o.created_ns,
                        d.created_ns,
                        clock,
                        age,
                    ),
                    check_time(
                        "last_seen_ns",
                        exp.last_seen,
                        o.last_seen_ns,
                        d.last_seen_ns,
                        clock,
                        age,
                    ),
                    check_time(
                        "nexthop_ns",
                        exp.nexthop,
                        o.nexthop_ns,
                        d.nexthop_ns,
                        clock,
                        age,
                    ),
                ] {
                    if let Err(e) = r {
                        problems.push(format!("entry {name}: {e}"));
                    }
                }
                self.model.adopt_times(k, &d);
            }
        }
    }

    /// Compares the whole table, times included (the model took the datapath's).
    pub fn compare_all(&mut self, problems: &mut Vec<String>) {
        let dp: HashMap<FlowKey4, Flow> =
            self.fx.dp.flows().expect("conntrack").into_iter().collect();
        for (k, m) in &self.model.ct {
            match dp.get(k) {
                None => problems.push(format!(
                    "table: the datapath has no entry {}",
                    wire::show_key(k)
                )),
                Some(d) if d != m => problems.push(format!(
                    "table: entry {} differs: {:?} (times: model {:?}, datapath {:?})",
                    wire::show_key(k),
                    diff_flows(m, d),
                    (m.created_ns, m.last_seen_ns, m.nexthop_ns),
                    (d.created_ns, d.last_seen_ns, d.nexthop_ns)
                )),
                Some(_) => {}
            }
        }
        for (k, d) in &dp {
            if !self.model.ct.contains_key(k) {
                problems.push(format!(
                    "table: the model has no entry {} ({})",
                    wire::show_key(k),
                    if d.direction == DIR_FORWARD {
                        "forward"
                    } else {
                        "reverse"
                    }
                ));
            }
        }
    }
}

/// The coverage key of the packets of ours the model expected handed to the kernel untouched
/// (XDP: an aged next hop to revalidate, a partial checksum too long to complete).
pub const HANDED_OVER: &str = "handed to the kernel";
/// The coverage key of the packets translated on a proxied flow whose backend's numbers differ
/// from the client's view (issue 15).
pub const PROXIED_TRANSLATED: &str = "translated with a proxied flow's numbers";

/// The coverage key of the packets the model expected drop reason `r` of.
pub fn drop_key(r: DropReason) -> String {
    format!("drop {}", r.label())
}

/// The coverage key of the packets after which global counter `s` had gone up.
pub fn counter_key(s: GlobalStat) -> String {
    format!("counter {}", s.label())
}
