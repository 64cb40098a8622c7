//! A reference model of the datapath: its decision on one frame as plain userspace Rust, built
//! from spec 14 (/work/briefs/spec-14.md, issue 14) and docs/datapath.md, not from
//! gateway-ebpf's code. Given its state (configuration, services, Maglev tables, backends with
//! their accepting flag, the conntrack table) and one input frame, [`Model::step`] returns what
//! the datapath must do ([`Expect`]: verdict, exact output bytes, drop reason, counter deltas,
//! the conntrack entries it changes) and applies the conntrack changes to its own table.
//!
//! What the datapath chooses at random or reads from a clock is not predicted but checked:
//! the SNAT port of a new flow is the one the datapath chose (its output's source port), if
//! it is legal (in the range, free toward that backend or reusable by today's rule); SNAT
//! collisions are bounded; times must lie within the bounds of the clock read around the run
//! ([`Clock`]), and the model then takes the datapath's values ([`Model::adopt_times`]). What
//! the datapath observed is passed in as [`Observed`].
//!
//! Beyond spec 14, issue 15's rules (docs/datapath.md, "Next hop" and "Checksums"): a flow whose
//! next hop aged is revalidated through the kernel's neighbour output (TC: counted
//! `neigh_revalidations`, or served by another flow's revalidated answer; XDP: the packet is
//! handed to the kernel untouched, its tracking done), and in XDP a TCP checksum field holding
//! only its pseudo-header's sum (CHECKSUM_PARTIAL) is trusted and completed before translation
//! (`partial_checksums`; a segment longer than 1535 bytes is handed to the kernel instead).
//! The fuzzer runs one attach mode per fixture: the XDP program alone never finds a revalidated
//! answer in the per-CPU cache (only TC writes them), so an aged hop is always handed over.
//!
//! Beyond spec 14, issue 15's SYN flood defence (docs/datapath.md, "SYN floods"; gateway-ebpf's
//! `synproxy`): each app's half-open flows are counted ([`Model::half_open`]); at the cap an
//! app's SYNs are answered with a SYN cookie (`gateway_common::syncookie`, the fixture's key)
//! and nothing is kept; an ACK without a flow that carries a valid cookie makes a proxied flow
//! ([`TRACK_PROXIED`]) and becomes the SYN to the backend; the backend's SYN-ACK is answered
//! with the handshake's ACK and fixes the flow's `seq_delta`, by which the backend's numbers are
//! translated from then on, both entries tracking in the client's view. Which cookie counter
//! the datapath's clock read is checked, not predicted, when the run's clock straddles a step
//! ([`Observed::out_seg`]).
//!
//! The SYN proxy after review (dc1e317, 87468b6): all apps' half-open flows are capped too
//! (slot 0 of the count, [`Model::half_open_global_max`]); the count also goes down when a
//! handshake made from a SYN closes or is started over; at the cap a SYN that starts a flow
//! over removes its old pair before its cookie is sent; an ACK is checked for a cookie only
//! while its app gives them ([`Model::cookies`]), and a bare one for the ISN `seq` too (the
//! client's zero-window probe after its cookie ACK was lost); a proxied flow whose backend has
//! not answered sends it the SYN again on the client's bare ACK; a backend's RST refusing the
//! proxy's SYN reaches the client at the cookie + 1; XDP counts a partial checksum only if it
//! completes to something else.
//!
//! [`Rules::Legacy`] is today's datapath (before spec 14: no flag, TTL, checksum or sequence
//! checks, no RST answers, nor issue 15's rules), to run the fuzzer against a datapath without
//! spec 14.

pub mod expect;
pub mod tcp;
#[cfg(test)]
mod tests;
pub mod wire;

use std::collections::HashMap;

use gateway::datapath::AttachMode;
use gateway_common::{
    DropReason, GlobalStat,
    maps::{
        ADDR_PUBLIC, ADDR_SNAT, BACKEND_ACCEPTING, Backend4, CT_BACKEND_CLOSED_FIRST,
        CT_ESTABLISHED, CT_FIN_FORWARD, CT_FIN_REVERSE, CT_RST, CT_SYN_ACK_SEEN, CT_SYN_SEEN,
        DIR_FORWARD, DIR_REVERSE, Flow, FlowKey4, HALF_OPEN_MAX_DEFAULT, LAST_SEEN_GRANULARITY_NS,
        MAGLEV_PROBES, MAGLEV_SIZE, ServiceKey4, TIME_WAIT_NS, TOA_ADD, TOA_PENDING,
        TRACK_ACK_SEEN, TRACK_PROXIED, is_closed,
    },
    net::{
        port_from_net, port_to_net,
        tcp_flags::{ACK, FIN, RST, SYN},
        toa,
    },
    syncookie::{self, Handshake, MSS_TABLE},
};

pub use expect::{EntryExp, Expect, Time, Verdict, diff_flows, show_flow};
use tcp::{Action, Decision};
use wire::{Own, Parse, Seg, Translation};

/// Which rules the model follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rules {
    /// Today's datapath, before spec 14.
    Legacy,
    /// Spec 14.
    Spec14,
}

/// Where the datapath sends packets to a destination: the egress interface and MACs its FIB
/// lookup gives (the fixture's topology).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hop {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// What the datapath did with a frame that the model takes as given where its rules leave the
/// choice to the datapath.
#[derive(Clone, Copy, Debug, Default)]
pub struct Observed {
    /// The source port of its output when it translated to the SNAT address (its choice for a
    /// new flow).
    pub snat_port: Option<u16>,
    /// Whether it handed the frame to the kernel: which side of the next-hop age its clock read
    /// fell on, when the run's clock bounds straddle it (XDP hands an aged hop over).
    pub passed: bool,
    /// The flags and sequence number of the segment it sent (translated, or its own), if it
    /// sent one: which SYN cookie time counter its clock read, when the run's clock bounds
    /// straddle a step (a cookie it sent starts with the counter's low bits; it answers an ACK
    /// with an RST only when the ACK's cookie is not valid at its counter).
    pub out_seg: Option<(u8, u32)>,
}

/// The bounds of the datapath's clock during a run (CLOCK_MONOTONIC_COARSE ns, read before and
/// after, widened by a tick: the datapath's per-CPU cache holds the value of the current tick).
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    pub lo: u64,
    pub hi: u64,
}

impl Clock {
    /// A tick at HZ ≥ 100.
    pub const TICK_NS: u64 = 10_000_000;

    pub fn around(before: u64, after: u64) -> Self {
        Clock {
            lo: before.saturating_sub(Self::TICK_NS),
            hi: after + Self::TICK_NS,
        }
    }

    /// Whether `now - since > limit` (the datapath's wrapping comparison) holds for every
    /// `now` in the bounds (`Some(true)`), none (`Some(false)`), or depends (`None`).
    fn elapsed_over(&self, since: u64, limit: u64) -> Option<bool> {
        let over = |now: u64| now.wrapping_sub(since) > limit;
        match (over(self.lo), over(self.hi)) {
            (true, true) if since <= self.lo => Some(true),
            (false, false) if since <= self.lo => Some(false),
            _ => None,
        }
    }
}

/// A SNAT port's standing toward one backend when a new flow looks for one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PortState {
    Free,
    /// Held by a closed connection idle 1 s or more (60 s if its backend closed first): taken
    /// over when no probe finds a free port.
    Reusable,
    /// Held by a closed connection at the edge of that idle time: either.
    MaybeReusable,
    Taken,
}

/// The datapath's state as the model holds it.
#[derive(Clone, Debug)]
pub struct Model {
    pub rules: Rules,
    /// SNAT address (network order); 0: not configured.
    pub snat_ip: u32,
    pub snat_ports: (u16, u16),
    pub nexthop_max_age_ns: u64,
    /// The gateway's addresses (network order) and their `ADDR_*` kinds.
    pub addrs: Vec<(u32, u32)>,
    pub services: HashMap<ServiceKey4, u32>,
    /// Maglev tables by app.
    pub tables: HashMap<u32, Vec<u32>>,
    pub backends: HashMap<u32, Backend4>,
    /// Next hops by destination address (network order).
    pub hops: HashMap<u32, Hop>,
    pub ct: HashMap<FlowKey4, Flow>,
    /// Half-open flows an app may have before SYN cookies (`Config::half_open_max`; 0: the
    /// default), and the cookies' key (`Config::cookie_key`).
    pub half_open_max: u32,
    pub cookie_key: [u64; 2],
    /// Half-open flows of all apps together before every app's SYNs get cookies
    /// (`Config::half_open_global_max`; 0: no such cap).
    pub half_open_global_max: u32,
    /// Each app's half-open flows as the datapath counts them (its `HALF_OPEN` map), slot 0 all
    /// apps' together: one more for each flow a SYN makes, one less when a handshake's last ACK
    /// establishes a flow, when a handshake made from a SYN closes (RST, FIN both ways) or is
    /// started over before it completes; set whole by a conntrack scan (to
    /// [`Model::half_open_exact`]). Flows that expire are not taken off: the count drifts up
    /// until the next scan, as the datapath's does.
    pub half_open: HashMap<u32, i64>,
    /// The cookie counter when each app last answered a SYN with a cookie (the datapath's
    /// `gw_cookies_v1`): an ACK is checked for a cookie only within one step of it.
    pub cookies: HashMap<u32, u64>,
    /// The apps with `--client-address toa` (issue 17: `APP_CLIENT_ADDRESS_TOA`).
    pub client_address: std::collections::HashSet<u32>,
}

impl Model {
    pub fn new(rules: Rules) -> Self {
        Model {
            rules,
            snat_ip: 0,
            snat_ports: (0, 0),
            nexthop_max_age_ns: gateway_common::maps::NEXTHOP_MAX_AGE_DEFAULT_NS,
            addrs: Vec::new(),
            services: HashMap::new(),
            tables: HashMap::new(),
            backends: HashMap::new(),
            hops: HashMap::new(),
            ct: HashMap::new(),
            half_open_max: 0,
            cookie_key: [0; 2],
            half_open_global_max: 0,
            half_open: HashMap::new(),
            cookies: HashMap::new(),
            client_address: std::collections::HashSet::new(),
        }
    }

    /// The `Flow::toa` bits of a new flow of `app` (`toa::flow_bits`).
    fn toa_bits(&self, app: u32) -> u8 {
        if self.client_address.contains(&app) {
            TOA_PENDING | TOA_ADD
        } else {
            TOA_PENDING
        }
    }

    fn addr_kind(&self, ip: u32) -> u32 {
        self.addrs
            .iter()
            .filter(|(a, _)| *a == ip && ip != 0)
            .map(|(_, k)| *k)
            .next()
            .unwrap_or(0)
    }

    /// Runs `frame` through the model in `mode`: what the datapath must do, the model's table
    /// updated. `clock` bounds the datapath's time; `seen` is what the datapath chose where the
    /// rules let it.
    pub fn step(&mut self, frame: &[u8], mode: AttachMode, clock: Clock, seen: Observed) -> Expect {
        let mut x = Expect::new(mode);
        match wire::parse(frame, |ip| self.addr_kind(ip)) {
            Parse::NotOurs => x.pass(frame),
            Parse::Drop(reason) => x.drop(reason),
            // The fuzzer's ICMP packets are TCP segments with another protocol number: their
            // "quote" names no flow, and the error goes to the kernel (the translation of real
            // quotes is the rows' business: `tests/datapath_icmp.rs`).
            Parse::IcmpError => {
                x.pass(frame);
                x.stat(GlobalStat::IcmpNoFlow, 1);
            }
            Parse::Tcp(seg) => {
                let mut s = Step {
                    m: self,
                    frame,
                    seg,
                    mode,
                    clock,
                    seen,
                    x: &mut x,
                };
                match s.m.rules {
                    Rules::Legacy => s.legacy(),
                    Rules::Spec14 => s.spec14(),
                }
            }
        }
        x
    }

    /// The half-open flows of `app` as the datapath counts them.
    pub fn half_open(&self, app: u32) -> i64 {
        self.half_open.get(&app).copied().unwrap_or(0)
    }

    /// The half-open flows of `app` a conntrack scan finds (what it sets the count to): its
    /// connections neither established, closing nor closed, made from a SYN (a proxied flow's
    /// client proved its address: it is not what a flood fills the table with).
    /// App 0: all apps' together (what the scan sets slot 0 to).
    pub fn half_open_exact(&self, app: u32) -> i64 {
        let past = CT_ESTABLISHED | CT_FIN_FORWARD | CT_FIN_REVERSE | CT_RST;
        self.ct
            .values()
            .filter(|f| {
                f.direction == DIR_FORWARD
                    && (app == 0 || f.app_id == app)
                    && f.state & past == 0
                    && f.track & TRACK_PROXIED == 0
            })
            .count() as i64
    }

    /// Adds `n` to the half-open flows of `app` and of all apps (slot 0), as the datapath's
    /// `synproxy::half_open_add`.
    fn half_open_add(&mut self, app: u32, n: i64) {
        for slot in [app, 0] {
            *self.half_open.entry(slot).or_default() += n;
        }
    }

    /// Whether `app` has its cap of half-open flows, or all apps together theirs
    /// (`Config::half_open_full`): its SYNs get cookies.
    pub fn half_open_full(&self, app: u32) -> bool {
        let max = match self.half_open_max {
            0 => HALF_OPEN_MAX_DEFAULT,
            n => n,
        };
        self.half_open(app) >= i64::from(max)
            || (self.half_open_global_max != 0
                && self.half_open(0) >= i64::from(self.half_open_global_max))
    }

    /// Takes the datapath's time fields for `key` once [`Expect::check_entry`] found them
    /// plausible.
    pub fn adopt_times(&mut self, key: &FlowKey4, dp: &Flow) {
        if let Some(f) = self.ct.get_mut(key) {
            f.created_ns = dp.created_ns;
            f.last_seen_ns = dp.last_seen_ns;
            f.nexthop_ns = dp.nexthop_ns;
        }
    }

    /// Removes both entries of the connection `key` (whose entry is `flow`) belongs to.
    fn remove_pair(&mut self, key: &FlowKey4, flow: &Flow, x: &mut Expect) {
        let peer = flow.peer_key();
        self.ct.remove(&peer);
        self.ct.remove(key);
        x.entries.insert(peer, None);
        x.entries.insert(*key, None);
    }

    fn port_state(&self, key: &FlowKey4, clock: &Clock) -> PortState {
        let Some(old) = self.ct.get(key) else {
            return PortState::Free;
        };
        if !is_closed(old.state) {
            return PortState::Taken;
        }
        // Reusable once `now - last_seen >= 1 s`, i.e. `> 1 s - 1 ns`; once the backend's
        // TIME_WAIT is over (60 s) if the backend closed first.
        let idle = if old.state & CT_BACKEND_CLOSED_FIRST != 0 {
            TIME_WAIT_NS
        } else {
            LAST_SEEN_GRANULARITY_NS
        };
        match clock.elapsed_over(old.last_seen_ns, idle - 1) {
            Some(true) => PortState::Reusable,
            Some(false) => PortState::Taken,
            None => PortState::MaybeReusable,
        }
    }
}

/// The flow a SYN starts over (§4.1): the entry it was found under, and whether it is
/// re-balanced (counted `syn_rebalanced`: the connection was not over).
#[derive(Clone, Copy, Debug)]
struct Stale {
    flow: Flow,
    rebalanced: bool,
}

/// One frame through the model.
struct Step<'a> {
    m: &'a mut Model,
    frame: &'a [u8],
    seg: Seg,
    mode: AttachMode,
    clock: Clock,
    seen: Observed,
    x: &'a mut Expect,
}

/// How a packet of a flow leaves, as far as its next hop decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Out {
    /// Translated and redirected; the entry's `nexthop_ns` follows this rule.
    Redirect(Time),
    /// Handed to the kernel untouched (XDP, an aged hop to revalidate): nothing of the hop
    /// changes.
    Kernel,
}

impl Step<'_> {
    fn service(&self) -> Option<u32> {
        if self.seg.addr_kind & ADDR_PUBLIC == 0 {
            return None;
        }
        let k = ServiceKey4::new(self.seg.key.dst_ip, self.seg.key.dst_port);
        self.m.services.get(&k).copied()
    }

    fn snat_range(&self) -> bool {
        let port = port_from_net(self.seg.key.dst_port);
        self.seg.addr_kind & ADDR_SNAT != 0
            && (self.m.snat_ports.0..=self.m.snat_ports.1).contains(&port)
    }

    fn accepting(&self, backend_id: u32) -> bool {
        self.m
            .backends
            .get(&backend_id)
            .is_some_and(|b| b.flags & BACKEND_ACCEPTING != 0)
    }

    /// Today's datapath.
    fn legacy(&mut self) {
        let key = self.seg.key;
        let syn_only = self.seg.flags & (SYN | ACK) == SYN;
        if let Some(es) = self.m.ct.get(&key).copied() {
            let d = tcp::legacy(&es, self.seg.flags);
            if d.action == Action::Forward {
                return self.forward(d);
            }
            self.m.remove_pair(&key, &es, self.x);
        }
        match self.service() {
            Some(app) if syn_only => self.new_flow(app, None),
            Some(_) => self.x.drop(DropReason::NoFlow),
            None if self.snat_range() => self.x.drop(DropReason::NoReplyFlow),
            None => self.x.pass(self.frame),
        }
    }

    /// Spec 14 §3-§7.
    fn spec14(&mut self) {
        let key = self.seg.key;
        let es = self.m.ct.get(&key).copied();
        let service = self.service();
        let snat = self.snat_range();
        if es.is_none() && service.is_none() && !snat {
            return self.x.pass(self.frame);
        }
        let flags = self.seg.flags;
        if !tcp::valid_flags(flags) {
            return self.x.drop(DropReason::BadFlags);
        }
        let syn_only = flags & (SYN | ACK | FIN | RST) == SYN;
        let mut stale = None;
        if let Some(mut es) = es {
            // Issue 15: a proxied flow whose backend has not answered: the client's bare ACK of
            // the cookie (again, or its zero-window probe) carries the SYN to it again,
            // untracked (`synproxy::resends_syn`).
            if resends_syn(&es, &self.seg) {
                if self.seg.ttl <= 1 {
                    return self.x.drop(DropReason::TtlExceeded);
                }
                return self.resend_syn(es);
            }
            // Issue 15: a proxied flow's backend. Its SYN-ACK is the SYN proxy's to answer; any
            // other segment is tracked (and sent on) in the client's view, which is its own
            // until that SYN-ACK fixes `seq_delta`, or an RST refusing the proxy's SYN does
            // (`conntrack::proxy_refused`: it reaches the client at the cookie + 1).
            if es.track & TRACK_PROXIED != 0 && es.direction != DIR_FORWARD {
                if flags & (SYN | ACK | RST | FIN) == SYN | ACK {
                    return self.proxy_syn_ack(es);
                }
                if flags & RST != 0 && es.state & CT_SYN_ACK_SEEN == 0 {
                    // Only an RST that goes on changes the numbers: its TTL first.
                    if self.seg.ttl <= 1 {
                        return self.x.drop(DropReason::TtlExceeded);
                    }
                    self.proxy_refused(&mut es);
                }
                self.seg.seq = self.seg.seq.wrapping_sub(es.seq_delta);
            }
            let er = self.m.ct.get(&es.peer_key()).copied();
            let wscale = (flags & SYN != 0)
                .then(|| wire::wscale_option(self.frame, &self.seg))
                .flatten();
            let d = tcp::spec14(
                &es,
                er.as_ref(),
                &self.seg,
                wscale,
                self.accepting(es.backend_id),
            );
            match d.action {
                // §4.1: the SYN goes on as one without a flow; its old pair is removed only
                // once it passed the checks of §5 (a SYN that fails them changes nothing).
                Action::NewFlow { rebalanced } => {
                    stale = Some(Stale {
                        flow: es,
                        rebalanced,
                    })
                }
                // §3: the TTL of what the flow would forward.
                _ if self.seg.ttl <= 1 => return self.x.drop(DropReason::TtlExceeded),
                Action::Forward => return self.forward(d),
                Action::Drop(reason) => return self.x.drop(reason),
            }
        }
        // §3: the TTL of what would create a flow.
        if service.is_some() && syn_only && self.seg.ttl <= 1 {
            return self.x.drop(DropReason::TtlExceeded);
        }
        // §7: a segment with ACK is answered with an RST, but an RST never is, nor a segment
        // with IPv4 options (the RST would move the TCP header).
        let has_ack = flags & ACK != 0 && flags & RST == 0 && self.seg.ihl == wire::IPV4_MIN_LEN;
        // Issue 15: an ACK may complete a handshake the SYN proxy answered with a cookie.
        if let Some(app) = service
            && let Some((mss, isn)) = self.cookie_ack(app)
        {
            return self.cookie_flow(app, mss, isn);
        }
        match service {
            Some(app) if syn_only => self.new_flow(app, stale),
            Some(_) if has_ack => self.rst_answer(),
            Some(_) => self.x.drop(DropReason::NoFlow),
            // A SYN starting over to a port whose service is gone.
            None if !snat => self.x.pass(self.frame),
            None if has_ack => self.rst_answer(),
            None => self.x.drop(DropReason::NoReplyFlow),
        }
    }

    /// Spec §7: an RST back out of the interface the segment came in on.
    fn rst_answer(&mut self) {
        self.x.verdict = Verdict::Tx;
        self.x.out = Some(wire::rst_answer(self.frame, &self.seg));
        self.x.stat(GlobalStat::RstNoFlow, 1);
    }

    /// A segment of an existing flow, sent on: `d` says how its entries change.
    fn forward(&mut self, d: Decision) {
        let key = self.seg.key;
        let mut es = d.es;
        if let Some(stat) = d.stat {
            self.x.stat(stat, 1);
        }
        let mut set = d.set;
        // The backend's FIN before the client's: it keeps the 4-tuple in TIME_WAIT.
        if set & CT_FIN_REVERSE != 0 && es.state & CT_FIN_FORWARD == 0 {
            set |= CT_BACKEND_CLOSED_FIRST;
        }
        if set & CT_ESTABLISHED != 0 && es.state & CT_ESTABLISHED == 0 {
            // Issue 15: a handshake made from a SYN completed (a proxied flow is established
            // by its backend's SYN-ACK, never here): one half-open flow less.
            self.m.half_open_add(es.app_id, -1);
        }
        let new = es.state | set;
        if self.m.rules == Rules::Spec14
            && is_closed(new)
            && !is_closed(es.state)
            && new & CT_ESTABLISHED == 0
            && es.track & TRACK_PROXIED == 0
        {
            // A handshake made from a SYN closed (RST, or FIN both ways) before it completed:
            // one half-open flow less (`conntrack::track`).
            self.m.half_open_add(es.app_id, -1);
        }
        let changed = es.state | set != es.state;
        let mut exp = EntryExp::same();
        if changed {
            es.state |= set;
            exp.last_seen = Time::Now;
            let peer = es.peer_key();
            if let Some(p) = self.m.ct.get_mut(&peer) {
                if let Some(er) = d.er {
                    *p = Flow {
                        state: p.state,
                        last_seen_ns: p.last_seen_ns,
                        ..er
                    };
                }
                p.state |= set;
                let mut peer_exp = EntryExp::same();
                peer_exp.last_seen = Time::Now;
                self.x.entries.insert(peer, Some(peer_exp));
            }
        } else {
            exp.last_seen = match self
                .clock
                .elapsed_over(es.last_seen_ns, LAST_SEEN_GRANULARITY_NS)
            {
                Some(true) => Time::Now,
                Some(false) => Time::Same,
                None => Time::SameOrNow,
            };
        }
        // Issue 17: the backend's first segment that shows its end is made (data, a FIN, or an
        // acknowledgement beyond what it had acknowledged; no SYN, no RST: a socket in SYN-RECV
        // sends bare ACKs of the SYN, and its listener RSTs): the flow's client segments go on
        // untouched from now on (both entries; `toa::shows_established`, `toa::backend_seen`).
        let acked = self.m.ct.get(&key).map_or(es.ack_max, |e| e.ack_max);
        let flags = self.seg.flags;
        if self.m.rules == Rules::Spec14
            && es.direction != DIR_FORWARD
            && es.toa & TOA_PENDING != 0
            && flags & (SYN | RST) == 0
            && (flags & FIN != 0
                || self.seg.payload != 0
                || (flags & ACK != 0 && gateway_common::maps::seq_after(self.seg.ack, acked)))
        {
            es.toa = 0;
            if let Some(p) = self.m.ct.get_mut(&es.peer_key()) {
                p.toa = 0;
            }
        }
        es.packets += 1;
        es.bytes += u64::from(self.seg.l3_len);
        let out = self.resolve(&mut es);
        if let Out::Redirect(t) = out {
            exp.nexthop = t;
        }
        self.m.ct.insert(key, es);
        self.x.entries.insert(key, Some(exp));
        match out {
            Out::Redirect(_) => {
                self.translated(&es);
                self.renumber(&es);
            }
            Out::Kernel => self.handed_over(),
        }
    }

    /// Handed to the kernel untouched, for its TC program to finish (XDP): no counter of a
    /// translation, and not `passed` either (the packet is ours).
    fn handed_over(&mut self) {
        self.x.verdict = Verdict::Pass;
        self.x.out = Some(self.frame.to_vec());
    }

    /// A new flow's pair in the table, with the expectations it makes: the forward entry
    /// `forward` (its next hop resolved here, which it returns) under `key`, the reverse one
    /// `reverse` toward `backend` from SNAT port `port`; a flow created for its app and backend.
    fn insert_pair(
        &mut self,
        key: FlowKey4,
        forward: &mut Flow,
        reverse: Flow,
        backend: Backend4,
        port: u16,
    ) -> Time {
        let Out::Redirect(nexthop) = self.resolve(forward) else {
            unreachable!("a new flow has no hop to revalidate");
        };
        let reverse_key =
            FlowKey4::new(backend.ip, self.m.snat_ip, backend.port, port_to_net(port));
        let new = EntryExp {
            created: Time::Now,
            last_seen: Time::Now,
            nexthop: Time::Same,
        };
        self.m.ct.insert(reverse_key, reverse);
        self.x.entries.insert(reverse_key, Some(new));
        self.m.ct.insert(key, *forward);
        self.x
            .entries
            .insert(key, Some(EntryExp { nexthop, ..new }));
        self.x.stat(GlobalStat::FlowsCreated, 1);
        self.x
            .traffic(forward.app_id, forward.backend_id, |s| s.new_flows += 1);
        nexthop
    }

    /// The next hop of `flow`: kept while fresh, else resolved again (through the FIB or the
    /// per-CPU cache of another flow's answer: at most one FIB lookup). A flow's own aged hop
    /// is revalidated: in TC its packet goes through the kernel's neighbour output
    /// (`neigh_revalidations`, unless another flow's revalidated answer serves it), in XDP the
    /// packet is handed to the kernel.
    fn resolve(&mut self, flow: &mut Flow) -> Out {
        let hop = self.m.hops.get(&flow.nat_dst_ip).copied();
        let age = self
            .clock
            .elapsed_over(flow.nexthop_ns, self.m.nexthop_max_age_ns - 1);
        if flow.nexthop_ns != 0 && age == Some(false) {
            return Out::Redirect(Time::Same);
        }
        let aged = flow.nexthop_ns != 0 && self.m.rules == Rules::Spec14;
        if aged && self.mode == AttachMode::Xdp {
            // Aged for every instant the run may have read, or the datapath says it was at
            // the instant it read (it handed the packet over); else it was still fresh.
            return if age == Some(true) || self.seen.passed {
                Out::Kernel
            } else {
                Out::Redirect(Time::Same)
            };
        }
        self.x.stat_range(GlobalStat::FibLookups, 0..=1);
        if aged {
            self.x.stat_range(GlobalStat::NeighRevalidations, 0..=1);
        }
        if let Some(hop) = hop {
            flow.nexthop_ifindex = hop.ifindex;
            flow.nexthop_smac = hop.smac;
            flow.nexthop_dmac = hop.dmac;
        }
        // Stale for every instant the run may have read: resolved again, certainly.
        Out::Redirect(if flow.nexthop_ns == 0 || age == Some(true) {
            Time::Resolved
        } else {
            Time::SameOrResolved
        })
    }

    /// The translated output of this segment through `flow`, and its counters. In XDP, a
    /// partial TCP checksum is completed first (or the segment, too long for that, handed to
    /// the kernel).
    fn translated(&mut self, flow: &Flow) {
        let mut frame = self.frame.to_vec();
        if self.partial() {
            if self.seg.l3_len as usize - self.seg.ihl > wire::SEGMENT_MAX {
                self.x.stat(GlobalStat::PartialChecksums, 1);
                return self.handed_over();
            }
            wire::complete_checksum(&mut frame, &self.seg);
            // A whole checksum equal to its pseudo-header's sum completes to itself: not
            // counted (xdp.rs).
            if frame != self.frame {
                self.x.stat(GlobalStat::PartialChecksums, 1);
            }
        }
        let t = Translation {
            src_ip: flow.nat_src_ip,
            dst_ip: flow.nat_dst_ip,
            src_port: flow.nat_src_port,
            dst_port: flow.nat_dst_port,
            smac: flow.nexthop_smac,
            dmac: flow.nexthop_dmac,
            ttl_dec: self.m.rules == Rules::Spec14,
        };
        self.x.verdict = Verdict::Redirect;
        let mut out = wire::translate(&frame, &self.seg, &t);
        // Issue 17: a client segment (its SYN too; not an RST) before its backend made its end loses
        // the TOA options it carries, and what an End of Option List or a malformed option ends
        // becomes NOPs (`toa::apply`).
        let flags = self.seg.flags;
        if flow.direction == DIR_FORWARD
            && flow.toa & TOA_PENDING != 0
            && flags & RST == 0
            && flags & (SYN | ACK) != SYN | ACK
        {
            // ...and gets the gateway's with `TOA_ADD` (not a SYN), in place of the client's
            // first or appended if the segment then fits the link (`toa::apply`).
            let key = self.seg.key;
            let ours = (flow.toa & TOA_ADD != 0 && flags & SYN == 0)
                .then(|| toa::option(key.src_ip, key.src_port));
            let can_grow = out.len() + 8 <= wire::LINK_MTU + wire::ETH_LEN
                && (self.mode == AttachMode::Xdp || out.len() <= wire::TC_GROW_MAX);
            let done = wire::toa(&mut out, &self.seg, ours, can_grow);
            if done.found != 0 {
                self.x.stat(GlobalStat::ToaStripped, done.found);
            }
            if done.added {
                self.x.stat(GlobalStat::ToaAdded, 1);
            }
            if done.skipped {
                self.x.stat(GlobalStat::ToaSkipped, 1);
            }
        }
        // Issue 17: a SYN-ACK of an app with the client's address, its flow not established,
        // announces an MSS 8 bytes lower (`mss::clamp`; the backend's, to the client, or a
        // client's own in a simultaneous open, which loses 8 bytes for nothing).
        if flags & (SYN | ACK) == SYN | ACK
            && flow.state & CT_ESTABLISHED == 0
            && self.m.client_address.contains(&flow.app_id)
            && wire::lower_mss(&mut out, &self.seg, u16::from(toa::LEN))
        {
            self.x.stat(GlobalStat::MssClamped, 1);
        }
        self.x.out = Some(out);
        let bytes = u64::from(self.seg.l3_len);
        if flow.direction == DIR_FORWARD {
            self.x.stat(GlobalStat::Forwarded, 1);
            self.x.traffic(flow.app_id, flow.backend_id, |s| {
                s.packets_in += 1;
                s.bytes_in += bytes;
            });
        } else {
            self.x.stat(GlobalStat::Reversed, 1);
            self.x.traffic(flow.app_id, flow.backend_id, |s| {
                s.packets_out += 1;
                s.bytes_out += bytes;
            });
        }
    }

    /// Whether this is XDP meeting a partial TCP checksum (issue 15): trusted, and completed
    /// before the segment is translated.
    fn partial(&self) -> bool {
        self.mode == AttachMode::Xdp
            && self.m.rules == Rules::Spec14
            && wire::partial_checksum(self.frame, &self.seg)
    }

    /// A SYN to the service of `app` without a flow, or starting its flow `stale` over: spec §5
    /// (today: the same without checksums and tracking).
    fn new_flow(&mut self, app: u32, stale: Option<Stale>) {
        let spec = self.m.rules == Rules::Spec14;
        if spec
            && (wire::ip_residual(self.frame, self.seg.ihl) != 0xffff
                || (wire::tcp_residual(self.frame, &self.seg) != 0xffff && !self.partial()))
        {
            return self.x.drop(DropReason::BadChecksum);
        }
        // Issue 15: at the app's cap (or all apps'), a cookie instead of a flow; one with IPv4
        // options cannot have one (the answer would move the TCP header): dropped, nothing
        // removed. The flow it starts over goes first either way (the cookie's ACK would meet
        // it).
        let full = spec && self.m.half_open_full(app);
        if full && self.seg.ihl != wire::IPV4_MIN_LEN {
            return self.x.drop(DropReason::HalfOpenFull);
        }
        if let Some(old) = stale {
            self.m.remove_pair(&self.seg.key, &old.flow, self.x);
            if spec && !is_closed(old.flow.state) {
                self.x.stat(GlobalStat::SynRebalanced, 1);
                if old.flow.track & TRACK_PROXIED == 0 {
                    // A handshake made from a SYN, not completed: one half-open less.
                    self.m.half_open_add(old.flow.app_id, -1);
                }
            } else if old.rebalanced {
                self.x.stat(GlobalStat::SynRebalanced, 1);
            }
        }
        if full {
            if stale.is_some() {
                self.x.paths.push(PATH_COOKIE_OVER);
            }
            return self.cookie_syn_ack(app);
        }
        if self.m.snat_ip == 0 || self.m.snat_ports.1 < self.m.snat_ports.0 {
            return self.x.drop(DropReason::NotConfigured);
        }
        let Some((backend_id, backend)) = self.choose(app) else {
            return self.x.drop(DropReason::NoBackend);
        };
        let Some(port) = self.snat_port(&backend) else {
            return self.x.drop(DropReason::SnatExhausted);
        };
        let key = self.seg.key;
        let mut reverse = Flow {
            nat_src_ip: key.dst_ip,
            nat_dst_ip: key.src_ip,
            nat_src_port: key.dst_port,
            nat_dst_port: key.src_port,
            app_id: app,
            backend_id,
            direction: DIR_REVERSE,
            state: CT_SYN_SEEN,
            ..Flow::default()
        };
        let mut forward = Flow {
            nat_src_ip: self.m.snat_ip,
            nat_dst_ip: backend.ip,
            nat_src_port: port_to_net(port),
            nat_dst_port: backend.port,
            direction: DIR_FORWARD,
            ..reverse
        };
        if spec {
            // Issue 17: the backend has made nothing yet.
            reverse.toa = self.m.toa_bits(app);
            forward.toa = reverse.toa;
            let wscale = wire::wscale_option(self.frame, &self.seg);
            tcp::new_flow_tracking(&mut forward, &self.seg, wscale);
        } else {
            let set = tcp::legacy_bits(&forward, self.seg.flags);
            forward.state |= set;
            reverse.state |= set;
        }
        forward.packets = 1;
        forward.bytes = u64::from(self.seg.l3_len);
        self.insert_pair(key, &mut forward, reverse, backend, port);
        if spec {
            // Issue 15: half-open until its handshake completes.
            self.m.half_open_add(app, 1);
        }
        self.translated(&forward);
    }

    /// Issue 15: a proxied flow's translated numbers in its output (the translation of a
    /// segment through `flow`): toward the backend the client's `ack` gains `seq_delta`, toward
    /// the client the backend's `seq` is the client's view (`self.seg.seq`, already less it).
    /// Nothing before the backend's SYN-ACK fixed it (while `seq_delta` is 0).
    fn renumber(&mut self, flow: &Flow) {
        if flow.track & TRACK_PROXIED == 0
            || flow.seq_delta == 0
            || self.x.verdict != Verdict::Redirect
        {
            return;
        }
        let Some(out) = self.x.out.as_mut() else {
            return;
        };
        if flow.direction == DIR_FORWARD {
            if self.seg.flags & ACK != 0 {
                wire::renumber(out, None, Some(self.seg.ack.wrapping_add(flow.seq_delta)));
            }
        } else {
            wire::renumber(out, Some(self.seg.seq), None);
        }
    }

    /// The cookie time counters the datapath's clock may have read in this run: one, or the
    /// two on either side of a step.
    fn cookie_counters(&self) -> (u64, u64) {
        (
            syncookie::counter(self.clock.lo),
            syncookie::counter(self.clock.hi),
        )
    }

    /// The connection this segment's cookie is for, `isn` the client's initial sequence number.
    fn handshake(&self, isn: u32) -> Handshake {
        let k = &self.seg.key;
        Handshake {
            src_ip: k.src_ip,
            dst_ip: k.dst_ip,
            src_port: k.src_port,
            dst_port: k.dst_port,
            isn,
        }
    }

    /// A SYN to an app at its cap of half-open flows (its checksums verified): answered with a
    /// SYN-ACK carrying a cookie back out of the interface it came in on (`syn_cookies_sent`),
    /// nothing kept: `ack` its ISN + 1 (its data, if any, not taken), a zero window, only an MSS
    /// option (the cookie's: the table's largest not above the SYN's, 536 without one). A SYN
    /// with IPv4 options cannot have one (the answer would move the TCP header): dropped.
    fn cookie_syn_ack(&mut self, app: u32) {
        let mss = wire::mss_option(self.frame, &self.seg).unwrap_or(MSS_TABLE[0]);
        let index = syncookie::mss_index(mss);
        // Its clock's counter: the one whose low bits head the cookie it sent, if the run's
        // clock straddles a step.
        let (lo, hi) = self.cookie_counters();
        let counter = match self.seen.out_seg {
            Some((_, seq)) if lo != hi && u64::from(seq >> 30) == hi & 3 => hi,
            _ => lo,
        };
        let hs = self.handshake(self.seg.seq);
        let cookie = syncookie::make(&self.m.cookie_key, &hs, counter, index);
        // The app gives cookies (`synproxy::gave_cookies`).
        self.m.cookies.insert(app, counter);
        self.x.stat(GlobalStat::SynCookiesSent, 1);
        // Issue 17: an app with the client's address announces 8 bytes less (`mss::clamp`).
        let mut mss_out = MSS_TABLE[index as usize];
        if self.m.client_address.contains(&app) {
            mss_out -= u16::from(toa::LEN);
            self.x.stat(GlobalStat::MssClamped, 1);
        }
        self.x.verdict = Verdict::Tx;
        self.x.out = Some(
            Own {
                back: true,
                flags: SYN | ACK,
                seq: cookie,
                ack: self.seg.seq.wrapping_add(1),
                window: 0,
                mss: Some(mss_out),
                toa: None,
            }
            .build(self.frame, &self.seg),
        );
    }

    /// The MSS of the cookie this segment (without a flow) carries and the client's ISN, if it
    /// is the ACK of a cookie's SYN-ACK (`synproxy::cookie_mss`): flags ACK alone (PSH
    /// allowed), no IPv4 options, its app `app` gave cookies in the clock's counter step or the
    /// one before (`gw_cookies_v1`), `ack - 1` a cookie valid for its addresses, ports and ISN
    /// `seq - 1` in the clock's counter or the one before; or, for a bare ACK (the client's
    /// zero-window probe), for ISN `seq`. When the run's clock straddles a step and the two
    /// counters disagree, the datapath's answer says which it read: an RST if the cookie was
    /// not valid there.
    fn cookie_ack(&mut self, app: u32) -> Option<(u16, u32)> {
        if self.seg.flags & (SYN | ACK | RST | FIN) != ACK || self.seg.ihl != wire::IPV4_MIN_LEN {
            return None;
        }
        let cookie = self.seg.ack.wrapping_sub(1);
        let at = self.m.cookies.get(&app).copied().unwrap_or(0);
        let check = |counter: u64| {
            if at == 0 || counter.wrapping_sub(at) > 1 {
                return None;
            }
            let isn = self.seg.seq.wrapping_sub(1);
            let hs = self.handshake(isn);
            if let Some(mss) = syncookie::check(&self.m.cookie_key, &hs, cookie, counter) {
                return Some((mss, isn));
            }
            if self.seg.payload != 0 {
                return None;
            }
            let isn = self.seg.seq;
            let hs = self.handshake(isn);
            syncookie::check(&self.m.cookie_key, &hs, cookie, counter).map(|mss| (mss, isn))
        };
        let (lo, hi) = self.cookie_counters();
        let (at_lo, at_hi) = (check(lo), check(hi));
        let found = if at_lo == at_hi {
            at_lo
        } else {
            let refused = self.seen.out_seg.is_some_and(|(f, _)| f & RST != 0);
            if refused { None } else { at_lo.or(at_hi) }
        };
        if found.is_some_and(|(_, isn)| isn == self.seg.seq) {
            self.x.paths.push(PATH_PROBE_COOKIE);
        }
        found
    }

    /// An ACK without a flow carrying a valid cookie (of MSS `mss`) to the service of `app`:
    /// TTL and checksums checked as a SYN's (`syn_cookies_accepted` once they pass), a proxied
    /// flow made as a SYN's would be (backend, SNAT port), without counting a half-open flow,
    /// and the ACK becomes the SYN to the backend, translated: the client's ISN, its window, the
    /// cookie's MSS, no data (the ACK's is not taken). The forward entry starts the client's
    /// numbers at ISN + 1, its acknowledgement at the cookie + 1; the reverse entry's wait for
    /// the backend's SYN-ACK.
    fn cookie_flow(&mut self, app: u32, mss: u16, isn: u32) {
        if self.seg.ttl <= 1 {
            return self.x.drop(DropReason::TtlExceeded);
        }
        if wire::ip_residual(self.frame, self.seg.ihl) != 0xffff
            || (wire::tcp_residual(self.frame, &self.seg) != 0xffff && !self.partial())
        {
            return self.x.drop(DropReason::BadChecksum);
        }
        self.x.stat(GlobalStat::SynCookiesAccepted, 1);
        if self.m.snat_ip == 0 || self.m.snat_ports.1 < self.m.snat_ports.0 {
            return self.x.drop(DropReason::NotConfigured);
        }
        let Some((backend_id, backend)) = self.choose(app) else {
            return self.x.drop(DropReason::NoBackend);
        };
        let Some(port) = self.snat_port(&backend) else {
            return self.x.drop(DropReason::SnatExhausted);
        };
        let (key, seg) = (self.seg.key, self.seg);
        let reverse = Flow {
            nat_src_ip: key.dst_ip,
            nat_dst_ip: key.src_ip,
            nat_src_port: key.dst_port,
            nat_dst_port: key.src_port,
            app_id: app,
            backend_id,
            direction: DIR_REVERSE,
            state: CT_SYN_SEEN,
            track: TRACK_PROXIED,
            toa: self.m.toa_bits(app),
            ..Flow::default()
        };
        let mut forward = Flow {
            nat_src_ip: self.m.snat_ip,
            nat_dst_ip: backend.ip,
            nat_src_port: port_to_net(port),
            nat_dst_port: backend.port,
            direction: DIR_FORWARD,
            seq_end: isn.wrapping_add(1),
            proxy_mss: mss,
            ack_max: seg.ack,
            win_max: u32::from(seg.window),
            track: TRACK_ACK_SEEN | TRACK_PROXIED,
            packets: 1,
            bytes: u64::from(seg.l3_len),
            ..reverse
        };
        let nexthop = self.insert_pair(key, &mut forward, reverse, backend, port);
        self.proxy_syn(&forward, isn, mss, Out::Redirect(nexthop));
    }

    /// The SYN to the backend of the proxied flow `forward` (its forward entry), written over
    /// this segment of its client (`synproxy::backend_syn`: the client's ISN `isn`, its window,
    /// the cookie's MSS `mss`, no data), then translated as the flow's packets are, or (XDP, an
    /// aged hop: `out`) handed to the kernel as it was written; the counters count the segment
    /// that came in.
    fn proxy_syn(&mut self, forward: &Flow, isn: u32, mss: u16, out: Out) {
        let seg = self.seg;
        let syn = Own {
            back: false,
            flags: SYN,
            seq: isn,
            ack: 0,
            window: seg.window,
            mss: Some(mss),
            toa: None,
        }
        .build(self.frame, &seg);
        if out == Out::Kernel {
            self.x.verdict = Verdict::Pass;
            self.x.out = Some(syn);
            return;
        }
        let Parse::Tcp(syn_seg) = wire::parse(&syn, |_| 1) else {
            unreachable!("the model's own SYN parses");
        };
        let t = Translation {
            src_ip: forward.nat_src_ip,
            dst_ip: forward.nat_dst_ip,
            src_port: forward.nat_src_port,
            dst_port: forward.nat_dst_port,
            smac: forward.nexthop_smac,
            dmac: forward.nexthop_dmac,
            ttl_dec: true,
        };
        self.x.verdict = Verdict::Redirect;
        self.x.out = Some(wire::translate(&syn, &syn_seg, &t));
        self.x.stat(GlobalStat::Forwarded, 1);
        let bytes = u64::from(seg.l3_len);
        self.x.traffic(forward.app_id, forward.backend_id, |s| {
            s.packets_in += 1;
            s.bytes_in += bytes;
        });
    }

    /// A client's segment on the proxied flow `es` (its forward entry) whose backend has not
    /// answered ([`resends_syn`]): not tracked (the entry's counters and times stay), its next
    /// hop resolved, and it becomes the SYN to the backend again (ISN `seq_end - 1`, the
    /// flow's `proxy_mss`).
    fn resend_syn(&mut self, es: Flow) {
        let key = self.seg.key;
        let mut es = es;
        let out = self.resolve(&mut es);
        let mut exp = EntryExp::same();
        if let Out::Redirect(t) = out {
            exp.nexthop = t;
        }
        self.m.ct.insert(key, es);
        self.x.entries.insert(key, Some(exp));
        self.x.paths.push(PATH_SYN_AGAIN);
        self.proxy_syn(&es, es.seq_end.wrapping_sub(1), es.proxy_mss, out);
    }

    /// A backend's RST on a proxied flow (`es` its reverse entry) before its SYN-ACK
    /// (`conntrack::proxy_refused`): if it acknowledges the client's ISN + 1, `seq_delta` in
    /// both entries becomes its `seq` less the client's `ack_max`, so that it reaches the client
    /// at the cookie + 1; kept whatever becomes of the RST.
    fn proxy_refused(&mut self, es: &mut Flow) {
        let peer = es.peer_key();
        let Some(client) = self.m.ct.get_mut(&peer) else {
            return;
        };
        if self.seg.flags & ACK != 0 && self.seg.ack == client.seq_end {
            let delta = self.seg.seq.wrapping_sub(client.ack_max);
            client.seq_delta = delta;
            es.seq_delta = delta;
            self.x.paths.push(PATH_REFUSED);
            let key = self.seg.key;
            let mut mine = self.m.ct[&key];
            mine.seq_delta = delta;
            self.m.ct.insert(key, mine);
            self.x.entries.insert(peer, Some(EntryExp::same()));
            self.x.entries.insert(key, Some(EntryExp::same()));
        }
    }

    /// The backend's SYN-ACK on a proxied flow (`es` its reverse entry), which answers the
    /// SYN proxy's SYN: answered with the handshake's last ACK back out of the interface it came
    /// in on (the client's next `seq` and largest window, `ack` the backend's ISN + 1). It must
    /// acknowledge the client's ISN + 1 (IPv4 options: a bad header). The first fixes
    /// `seq_delta` (its ISN less the cookie the client was given, the forward entry's
    /// `ack_max - 1`) in both entries, starts the backend's tracking in the client's view and
    /// establishes the flow (`syn_proxy_established`); a retransmission must carry the same
    /// ISN. Its checksums are verified first, as a SYN's (87468b6); a flow the client closed
    /// (or reset) meanwhile refuses it (out_of_window). No TTL check.
    fn proxy_syn_ack(&mut self, es: Flow) {
        if self.seg.ihl != wire::IPV4_MIN_LEN {
            return self.x.drop(DropReason::BadHeader);
        }
        // It fixes the flow's numbers for good: verified as a SYN is.
        if wire::ip_residual(self.frame, self.seg.ihl) != 0xffff
            || (wire::tcp_residual(self.frame, &self.seg) != 0xffff && !self.partial())
        {
            return self.x.drop(DropReason::BadChecksum);
        }
        // The client reset (or closed) before the backend answered: nobody to connect.
        if is_closed(es.state) {
            return self.x.drop(DropReason::OutOfWindow);
        }
        let (key, seg) = (self.seg.key, self.seg);
        let peer = es.peer_key();
        let Some(mut client) = self.m.ct.get(&peer).copied() else {
            return self.x.drop(DropReason::OutOfWindow);
        };
        if seg.ack != client.seq_end {
            return self.x.drop(DropReason::OutOfWindow);
        }
        let cookie = client.ack_max.wrapping_sub(1);
        let mut es = es;
        let mut exp = EntryExp::same();
        if es.state & CT_SYN_ACK_SEEN == 0 {
            let delta = seg.seq.wrapping_sub(cookie);
            es.seq_delta = delta;
            client.seq_delta = delta;
            es.seq_end = cookie.wrapping_add(1);
            es.ack_max = seg.ack;
            es.win_max = u32::from(seg.window);
            es.track = TRACK_ACK_SEEN | TRACK_PROXIED;
            es.state |= CT_SYN_ACK_SEEN | CT_ESTABLISHED;
            client.state |= CT_SYN_ACK_SEEN | CT_ESTABLISHED;
            exp.last_seen = Time::Now;
            self.m.ct.insert(peer, client);
            self.x.entries.insert(
                peer,
                Some(EntryExp {
                    last_seen: Time::Now,
                    ..EntryExp::same()
                }),
            );
            self.x.stat(GlobalStat::SynProxyEstablished, 1);
        } else if seg.seq.wrapping_sub(es.seq_delta) != cookie {
            return self.x.drop(DropReason::OutOfWindow);
        }
        es.packets += 1;
        es.bytes += u64::from(seg.l3_len);
        self.m.ct.insert(key, es);
        self.x.entries.insert(key, Some(exp));
        // Issue 17: the ACK that makes the backend's end carries the client's address
        // (`synproxy::backend_ack`; the reverse entry's destination).
        let toa_ack = (es.toa & TOA_ADD != 0).then(|| toa::option(es.nat_dst_ip, es.nat_dst_port));
        if toa_ack.is_some() {
            self.x.stat(GlobalStat::ToaAdded, 1);
        }
        self.x.verdict = Verdict::Tx;
        self.x.out = Some(
            Own {
                back: true,
                flags: ACK,
                seq: client.seq_end,
                ack: seg.seq.wrapping_add(1),
                window: client.win_max.min(u32::from(u16::MAX)) as u16,
                mss: None,
                toa: toa_ack,
            }
            .build(self.frame, &seg),
        );
    }

    /// The backend app `app`'s Maglev table gives this flow: up to `MAGLEV_PROBES` slots from
    /// its hashed one, the first whose backend accepts; an empty slot ends the walk.
    fn choose(&self, app: u32) -> Option<(u32, Backend4)> {
        let table = self.m.tables.get(&app)?;
        let start = self.seg.key.maglev_slot();
        for i in 0..MAGLEV_PROBES {
            let id = *table.get(((start + i) % MAGLEV_SIZE) as usize)?;
            if id == 0 {
                return None;
            }
            if self.accepting(id) {
                return Some((id, self.m.backends[&id]));
            }
        }
        None
    }

    /// The SNAT port of a new flow toward `backend`: the datapath's choice if it made one
    /// (checked: in the range, free or reusable), else exhaustion if it is possible. Sets the
    /// expected collision and reuse counts.
    fn snat_port(&mut self, backend: &Backend4) -> Option<u16> {
        let (min, max) = self.m.snat_ports;
        let rkey =
            |port: u16| FlowKey4::new(backend.ip, self.m.snat_ip, backend.port, port_to_net(port));
        let states: Vec<PortState> = (min..=max)
            .map(|p| self.m.port_state(&rkey(p), &self.clock))
            .collect();
        let blocking = states
            .iter()
            .filter(|s| matches!(s, PortState::Taken | PortState::MaybeReusable))
            .count();
        let chosen = match self.seen.snat_port {
            Some(p) if (min..=max).contains(&p) => Some(p),
            Some(p) => {
                self.x.note(format!(
                    "the datapath chose SNAT port {p}, outside {min}..={max}"
                ));
                None
            }
            None => None,
        };
        let Some(port) = chosen.or_else(|| {
            // The datapath made no new flow: exhaustion, if 32 probes can all collide.
            if blocking > 0 {
                return None;
            }
            (min..=max).find(|p| {
                matches!(
                    states[usize::from(p - min)],
                    PortState::Free | PortState::Reusable
                )
            })
        }) else {
            let p = (blocking as f64 / states.len() as f64).powi(32);
            if p < 1e-9 {
                self.x.note(format!(
                    "SNAT exhaustion with {blocking} of {} ports held: probability {p:.1e}",
                    states.len()
                ));
            }
            self.x.stat(GlobalStat::SnatCollisions, 32);
            return None;
        };
        let state = states[usize::from(port - min)];
        let free = states.iter().filter(|s| **s == PortState::Free).count();
        match state {
            PortState::Free => self.x.stat_range(
                GlobalStat::SnatCollisions,
                0..=if free < states.len() { 31 } else { 0 },
            ),
            PortState::Reusable | PortState::MaybeReusable => {
                // Taken over only when all 32 probes missed every free port.
                let p = ((states.len() - free) as f64 / states.len() as f64).powi(32);
                if p < 1e-9 {
                    self.x.note(format!(
                        "the datapath took over SNAT port {port} with {free} of {} ports free: probability {p:.1e}",
                        states.len()
                    ));
                }
                let k = rkey(port);
                let old = self.m.ct[&k];
                self.m.remove_pair(&k, &old, self.x);
                self.x.stat(GlobalStat::SnatReused, 1);
                self.x.stat(GlobalStat::SnatCollisions, 32);
            }
            PortState::Taken => self.x.note(format!(
                "the datapath chose SNAT port {port}, held by an open or recently closed flow toward {}",
                backend.addr()
            )),
        }
        Some(port)
    }
}

/// Coverage ([`Expect::paths`]): a SYN started a flow over at the cap (its old pair removed,
/// then a cookie).
pub const PATH_COOKIE_OVER: &str = "a flow started over at the cap, then a cookie";
/// Coverage: a cookie's ISN found at `seq` (the client's zero-window probe).
pub const PATH_PROBE_COOKIE: &str = "a zero-window probe took as the cookie's ACK";
/// Coverage: a client's segment carried the SYN to the backend again.
pub const PATH_SYN_AGAIN: &str = "the SYN to a proxied flow's backend sent again";
/// Coverage: a backend's RST refused the proxy's SYN (`seq_delta` set from it).
pub const PATH_REFUSED: &str = "a backend refused the proxy's SYN";

/// Whether the client's segment `seg` on the proxied flow `f` (its forward entry) carries the
/// SYN to the backend again (`synproxy::resends_syn`): the backend has not answered (no
/// SYN-ACK seen, not closed), and it is a bare ACK of the cookie at the client's ISN + 1 or its
/// ISN (a zero-window probe), flags ACK alone (PSH, URG, ECE, CWR allowed), in an IPv4 header
/// without options.
fn resends_syn(f: &Flow, seg: &Seg) -> bool {
    f.track & TRACK_PROXIED != 0
        && f.direction == DIR_FORWARD
        && f.state & CT_SYN_ACK_SEEN == 0
        && !is_closed(f.state)
        && seg.flags & (SYN | ACK | RST | FIN) == ACK
        && seg.ack == f.ack_max
        && f.seq_end.wrapping_sub(seg.seq) <= 1
        && seg.ihl == wire::IPV4_MIN_LEN
}
