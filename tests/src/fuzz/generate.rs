//! The seeded generator of operations: connections of a pool of client tuples played by two
//! simulated hosts (mostly right numbers, sometimes retransmitted, reordered, duplicated, at
//! the window's edges as the model's entries put them, or random), every flag byte, options,
//! and the frames' spoilers (TTL, truncation, IP options, fragments, checksums, partial ones
//! as a sender with tx offload leaves them, lengths);
//! strays to other ports and addresses and to SNAT ports without flows; health changes and
//! aged flows. Issue 15's SYN proxy: a small cap of half-open flows that changes and that scans
//! correct, so that an app goes in and out of SYN cookies; clients that answer the cookie's
//! SYN-ACK the model expected with its ACK (or a forged, shifted, stale, older or other port's
//! one), backends that answer the proxy's SYN (again, or with another ISN), then data, FINs and
//! RSTs on proxied flows, whose backend numbers and window edges are in the client's view. The
//! same seed gives the same operations against the same model states, cookies apart: they are
//! the fixture's random key's and the clock's.

use std::{collections::VecDeque, net::SocketAddrV4};

use gateway::datapath::monotonic_ns;
use gateway_common::{
    maps::{
        CT_SYN_ACK_SEEN, DIR_FORWARD, FlowKey4, TRACK_ACK_SEEN, TRACK_PROXIED, is_closed,
        max_window,
    },
    net::{
        ip_to_net,
        tcp_flags::{ACK, FIN, PSH, RST, SYN, URG},
    },
    syncookie::{self, Handshake},
};

use super::ops::{Client, Op};
use crate::{
    datapath::{BACKEND_PORT, Fixture, SERVICE_PORT},
    model::{
        Model, Rules,
        wire::{self, Parse, Segment},
    },
    netns::Topology,
    scenario::{Link, backend, backend_index, backend_ip},
};

/// SplitMix64: small, fast, and the same everywhere.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn u32(&mut self) -> u32 {
        self.u64() as u32
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.u64() % n
    }

    /// True with probability `per_mille` / 1000.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }

    pub fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len() as u64) as usize]
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + self.below(u64::from(hi - lo) + 1) as u32
    }
}

/// Where a connection is, as its two hosts see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Idle,
    SynSent,
    SynAcked,
    Established,
    /// The gateway answered the client's SYN with a cookie (issue 15): its ACK is due.
    Cookie,
    /// The cookie's ACK made a proxied flow and the gateway sent the backend its SYN: the
    /// backend's SYN-ACK is due.
    Proxied,
}

/// One client tuple's connection, as the client and the backend send it.
#[derive(Clone, Debug)]
struct Sim {
    client: Client,
    phase: Phase,
    /// Next sequence number each side sends, and its initial one (each in its own numbers).
    c_isn: u32,
    c_nxt: u32,
    b_isn: u32,
    b_nxt: u32,
    syn_payload: u16,
    /// The cookie the gateway gave the client as the backend's ISN (issue 15).
    cookie: u32,
    /// A proxied flow's backend numbers less the client's view of them (the flow's
    /// `seq_delta`; 0 otherwise).
    delta: u32,
}

impl Sim {
    /// The backend's next sequence number as the client sees it.
    fn b_view(&self) -> u32 {
        self.b_nxt.wrapping_sub(self.delta)
    }
}

/// The generator.
pub struct Gen {
    rng: Rng,
    sims: Vec<Sim>,
    /// Recent packet operations, for duplicates and reorderings.
    history: VecDeque<Op>,
    backends: usize,
    rules: Rules,
    snat_ports: (u16, u16),
    /// Whether app 1 was at its cap of half-open flows (or all apps at theirs) when the
    /// operation was chosen: its SYNs get cookies (issue 15).
    at_cap: bool,
}

use crate::model::tcp::VALID_FLAGS;

impl Gen {
    pub fn new(seed: u64, backends: usize, rules: Rules, snat_ports: (u16, u16)) -> Self {
        let mut rng = Rng::new(seed);
        let mut sims = Vec::new();
        let hosts = (0..10)
            .map(|_| Link::Client)
            .chain((0..backends.min(2)).map(Link::Backend));
        for link in hosts {
            let port = rng.range(1024, 65_535) as u16;
            sims.push(Sim {
                client: Client { link, port },
                phase: Phase::Idle,
                c_isn: 0,
                c_nxt: 0,
                b_isn: 0,
                b_nxt: 0,
                syn_payload: 0,
                cookie: 0,
                delta: 0,
            });
        }
        Gen {
            rng,
            sims,
            history: VecDeque::new(),
            backends,
            rules,
            snat_ports,
            at_cap: false,
        }
    }

    /// Takes in what the model expected of packet operation `op` (`out`, its output; none for a
    /// drop): the hosts follow the gateway's answers. A client whose SYN got a cookie holds it;
    /// one whose cookie's ACK became the SYN to the backend waits for its SYN-ACK; a backend
    /// whose SYN-ACK the gateway answered is established.
    pub fn observe(&mut self, op: &Op, out: Option<&[u8]>) {
        let (Some(client), Some(out)) = (op.client(), out) else {
            return;
        };
        let Some(i) = self.sims.iter().position(|s| s.client == client) else {
            return;
        };
        let Parse::Tcp(o) = wire::parse(out, |_| 1) else {
            return;
        };
        let from_public = o.key.src_ip == ip_to_net(Topology::PUBLIC_IP);
        let from_snat = o.key.src_ip == ip_to_net(Topology::SNAT_IP);
        let core = |f: u8| f & (SYN | ACK | RST | FIN);
        let s = &mut self.sims[i];
        match op {
            Op::Client { seg, .. } if core(seg.flags) == SYN => {
                if from_public && core(o.flags) == SYN | ACK {
                    // A cookie: the SYN's data not taken.
                    (s.c_isn, s.c_nxt, s.syn_payload) = (seg.seq, seg.seq.wrapping_add(1), 0);
                    s.cookie = o.seq;
                    s.phase = Phase::Cookie;
                } else if from_snat && s.phase == Phase::Cookie {
                    // Its retransmission made a flow after all (no longer at the cap).
                    s.phase = Phase::SynSent;
                }
            }
            // The cookie's ACK (or the client's zero-window probe: `seq` its ISN) became the
            // SYN to the backend, at the client's ISN.
            Op::Client { seg, .. }
                if core(seg.flags) == ACK && from_snat && core(o.flags) == SYN =>
            {
                (s.c_isn, s.c_nxt) = (o.seq, o.seq.wrapping_add(1));
                s.cookie = seg.ack.wrapping_sub(1);
                s.phase = Phase::Proxied;
            }
            // The backend's SYN-ACK was answered: its numbers are fixed.
            Op::Backend { seg, .. }
                if core(seg.flags) == SYN | ACK
                    && from_snat
                    && core(o.flags) == ACK
                    && s.phase == Phase::Proxied =>
            {
                (s.b_isn, s.b_nxt) = (seg.seq, seg.seq.wrapping_add(1));
                s.delta = seg.seq.wrapping_sub(s.cookie);
                s.phase = Phase::Established;
            }
            _ => {}
        }
    }

    /// The next operation, given the model's state (what it holds decides which numbers are at
    /// a window's edge, and whether a tuple's flow is gone).
    pub fn next(&mut self, model: &Model) -> Op {
        let op = self.choose(model);
        if op.is_packet() {
            self.history.push_back(op.clone());
            if self.history.len() > 16 {
                self.history.pop_front();
            }
        }
        op
    }

    fn choose(&mut self, model: &Model) -> Op {
        self.at_cap = self.rules == Rules::Spec14 && model.half_open_full(1);
        let r = self.rng.below(1000);
        if r < 8 {
            let id = self.rng.range(1, self.backends as u32);
            return Op::Health {
                id,
                accepting: self.rng.chance(650),
            };
        }
        if self.rules == Rules::Spec14 {
            // Issue 15: the count of half-open flows drifts up over abandoned handshakes until
            // a scan corrects it; the cap moves now and then, mostly small.
            let r = self.rng.below(1000);
            if r < 6 {
                return Op::Scan;
            }
            if r < 8 {
                let max = self.rng.pick(&[1, 2, 3, 4, 6, 8, 0, u32::MAX]);
                return Op::Cap { max };
            }
            if r < 9 {
                // All apps' cap (the fixture's one app shares it): configure's, or another.
                let max = self.rng.pick(&[0, 1, 3, 8, 100]);
                return Op::GlobalCap { max };
            }
        }
        // Closed flows aged past the SNAT reuse idle time, so that new flows take their ports
        // over: the more there are, the more often.
        let mut closed: Vec<FlowKey4> = model
            .ct
            .iter()
            .filter(|(_, f)| f.direction == DIR_FORWARD && is_closed(f.state))
            .map(|(k, _)| *k)
            .collect();
        if self.rng.below(1000) < (closed.len() as u64 * 4).min(300) {
            closed.sort_by_key(|k| (k.src_ip, k.src_port));
            {
                let k = self.rng.pick(&closed);
                let ip = *k.src().ip();
                let link = if ip == Topology::CLIENT_IP {
                    Link::Client
                } else {
                    Link::Backend(backend_index(ip))
                };
                return Op::Age {
                    client: Client {
                        link,
                        port: k.src().port(),
                    },
                    by_ms: self.rng.pick(&[700, 1100, 2000]),
                    nexthop: false,
                };
            }
        }
        let i = self.rng.below(self.sims.len() as u64) as usize;
        let client = self.sims[i].client;
        let fwd = model.ct.get(&client.key()).copied();
        if r < 26 && fwd.is_some() {
            let closed = fwd.is_some_and(|f| is_closed(f.state));
            return Op::Age {
                client,
                by_ms: self.rng.pick(if closed {
                    &[500, 1100, 1500, 3000][..]
                } else {
                    &[300, 1500, 2500, 61_000][..]
                }),
                nexthop: self.rng.chance(250),
            };
        }
        // An upgrade carries over only flows of a table without tracking: never a proxied one.
        if r < 29
            && self.rules == Rules::Spec14
            && fwd.is_some_and(|f| f.track & TRACK_PROXIED == 0)
        {
            return Op::Liberal { client };
        }
        if r < 70 && !self.history.is_empty() {
            let back = self.rng.below(self.history.len().min(6) as u64) as usize;
            return self.history[self.history.len() - 1 - back].clone();
        }
        if r < 150 {
            return self.stray();
        }
        let op = self.conn(i, model);
        self.spoil(op)
    }

    /// A segment of sim `i`'s connection.
    fn conn(&mut self, i: usize, model: &Model) -> Op {
        let client = self.sims[i].client;
        let fwd = model.ct.get(&client.key()).copied();
        // A proxied flow's backend numbers differ from the client's view by what the gateway
        // fixed (0 before the backend's SYN-ACK).
        self.sims[i].delta = match fwd {
            Some(f) if f.track & TRACK_PROXIED != 0 => f.seq_delta,
            _ => 0,
        };
        // The hosts start over when the gateway has no open flow for them (gone, or closed).
        // A client holding a cookie has none, and rarely gives up on it; but as often as the
        // others when the gateway kept a flow its SYN would have started over, which its
        // cookie's ACK then meets (since dc1e317 the datapath removes a flow its SYN starts
        // over before the cookie: the flow there is one the SYN did not start over).
        let (lost, give_up) = match (self.sims[i].phase, fwd) {
            (Phase::Idle, _) => (false, 0),
            (Phase::Cookie, None) => (true, 20),
            (Phase::Cookie, Some(_)) => (true, 300),
            (_, f) => (f.is_none_or(|f| is_closed(f.state)), 300),
        };
        if lost && self.rng.chance(give_up) {
            self.sims[i].phase = Phase::Idle;
        }
        let s = self.sims[i].clone();
        let r = self.rng.below(100);
        if r < 12 {
            return self.edge(client, model);
        }
        if r < 22 {
            return self.random_segment(client, &s);
        }
        match s.phase {
            Phase::Idle => {
                // At the cap, a SYN mostly starts its closed flow over (its old pair goes before
                // the cookie is sent).
                let keep = self.at_cap && fwd.is_some();
                if fwd.is_none_or(|f| is_closed(f.state)) && !keep && self.rng.chance(300) {
                    self.sims[i].client.port = self.rng.range(1024, 65_535) as u16;
                }
                self.syn(i, true)
            }
            Phase::SynSent => match self.rng.below(10) {
                0..=3 => {
                    let mut seg = self.seg(
                        SYN | ACK,
                        s.b_isn,
                        s.c_isn
                            .wrapping_add(1)
                            .wrapping_add(u32::from(s.syn_payload)),
                    );
                    if self.rng.chance(100) {
                        seg.ack = seg
                            .ack
                            .wrapping_add(self.rng.pick(&[1, u32::MAX, 0x4000_0000]));
                    } else {
                        self.sims[i].phase = Phase::SynAcked;
                    }
                    seg.tcp_options = self.syn_options();
                    Op::Backend { client, seg }
                }
                4 | 5 => self.syn(i, false),
                6 => self.syn(i, true),
                7 => {
                    let ack = s
                        .c_isn
                        .wrapping_add(1)
                        .wrapping_add(u32::from(s.syn_payload));
                    let ack = if self.rng.chance(700) {
                        ack
                    } else {
                        self.rng.u32()
                    };
                    Op::Backend {
                        client,
                        seg: self.seg(RST | ACK, 0, ack),
                    }
                }
                _ => self.random_segment(client, &s),
            },
            Phase::SynAcked => match self.rng.below(10) {
                0..=4 => {
                    self.sims[i].phase = Phase::Established;
                    Op::Client {
                        client,
                        seg: self.seg(ACK, s.c_nxt, s.b_view()),
                    }
                }
                5 => {
                    let ack = s
                        .b_view()
                        .wrapping_add(self.rng.pick(&[1, u32::MAX, 2, 1000]));
                    Op::Client {
                        client,
                        seg: self.seg(ACK, s.c_nxt, ack),
                    }
                }
                6 => {
                    let mut seg = self.seg(SYN | ACK, s.b_isn, s.c_nxt);
                    seg.tcp_options = self.syn_options();
                    Op::Backend { client, seg }
                }
                7 => self.syn(i, false),
                _ => self.data(i, true),
            },
            Phase::Cookie => self.cookie_ack(i, model),
            Phase::Proxied => self.proxied(i),
            Phase::Established => match self.rng.below(21) {
                0..=6 => self.data(i, true),
                7..=12 => self.data(i, false),
                13 | 14 => {
                    let from_client = self.rng.chance(500);
                    self.fin(i, from_client)
                }
                15 => {
                    // An exact RST from either end.
                    self.sims[i].phase = Phase::Idle;
                    if self.rng.chance(500) {
                        Op::Client {
                            client,
                            seg: self.seg(RST | ACK, s.c_nxt, s.b_view()),
                        }
                    } else {
                        Op::Backend {
                            client,
                            seg: self.seg(RST, s.b_nxt, 0),
                        }
                    }
                }
                16 => {
                    let new = self.rng.chance(500);
                    self.syn(i, new)
                }
                // A proxied flow's backend retransmits its SYN-ACK (its ACK lost), or sends one
                // with another ISN.
                20 if fwd.is_some_and(|f| f.track & TRACK_PROXIED != 0) => {
                    let isn = if self.rng.chance(700) {
                        s.b_isn
                    } else {
                        s.b_isn.wrapping_add(self.rng.pick(&[1, u32::MAX, 0x8000]))
                    };
                    let mut seg = self.seg(SYN | ACK, isn, s.c_isn.wrapping_add(1));
                    seg.tcp_options = self.syn_options();
                    Op::Backend { client, seg }
                }
                _ => {
                    // An old segment: a retransmission from before.
                    let back = self.rng.pick(&[1, 100, 1400, 70_000]);
                    let from_client = self.rng.chance(500);
                    let (seq, ack) = if from_client {
                        (s.c_nxt, s.b_view())
                    } else {
                        (s.b_nxt, s.c_nxt)
                    };
                    let mut seg = self.seg(ACK | PSH, seq.wrapping_sub(back), ack);
                    seg.payload_len = self.rng.range(0, 200) as u16;
                    self.dir(client, from_client, seg)
                }
            },
        }
    }

    fn dir(&self, client: Client, from_client: bool, seg: Segment) -> Op {
        if from_client {
            Op::Client { client, seg }
        } else {
            Op::Backend { client, seg }
        }
    }

    /// A segment with placeholder addresses (the harness fills them in).
    fn seg(&mut self, flags: u8, seq: u32, ack: u32) -> Segment {
        let any = SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 0);
        let mut s = Segment::new(any, any, flags);
        s.seq = seq;
        s.ack = ack;
        s.window = match self.rng.below(10) {
            0 => self.rng.u32() as u16,
            1 => 0,
            2 => u16::MAX,
            3..=5 => 502,
            _ => 64_240,
        };
        s
    }

    /// The client's SYN: a new connection (new ISN) or a retransmission of the last.
    fn syn(&mut self, i: usize, new: bool) -> Op {
        if new || self.sims[i].phase == Phase::Idle {
            let isn = if self.rng.chance(100) {
                u32::MAX - self.rng.range(0, 3000)
            } else {
                self.rng.u32()
            };
            let s = &mut self.sims[i];
            s.c_isn = isn;
            s.b_isn = 0;
            s.syn_payload = 0;
            s.delta = 0;
            s.phase = Phase::SynSent;
        }
        if self.rng.chance(30) {
            self.sims[i].syn_payload = self.rng.range(1, 100) as u16;
        }
        let isn = self.sims[i].c_isn;
        let payload = self.sims[i].syn_payload;
        let b_isn = self.rng.u32();
        let s = &mut self.sims[i];
        if s.b_isn == 0 {
            s.b_isn = b_isn;
        }
        s.c_nxt = isn.wrapping_add(1).wrapping_add(u32::from(payload));
        s.b_nxt = s.b_isn.wrapping_add(1);
        let client = s.client;
        let flags = if self.rng.chance(100) { SYN | URG } else { SYN };
        let mut seg = self.seg(flags, isn, 0);
        seg.payload_len = payload;
        seg.tcp_options = self.syn_options();
        if self.rng.chance(if self.at_cap { 80 } else { 20 }) {
            // A SYN with IPv4 options (a record-route, say) makes a flow, but cannot have a
            // cookie (issue 15).
            seg.ip_options = vec![1, 1, 1, 0];
        }
        Op::Client { client, seg }
    }

    /// Data (or a bare ACK) from one end at its next sequence number.
    fn data(&mut self, i: usize, from_client: bool) -> Op {
        let len = match self.rng.below(10) {
            0..=3 => 0,
            4..=7 => self.rng.range(1, 200),
            _ => self.rng.range(200, 1400),
        } as u16;
        let s = &mut self.sims[i];
        let (seq, ack) = if from_client {
            let seq = s.c_nxt;
            s.c_nxt = seq.wrapping_add(u32::from(len));
            (seq, s.b_view())
        } else {
            let seq = s.b_nxt;
            s.b_nxt = seq.wrapping_add(u32::from(len));
            (seq, s.c_nxt)
        };
        let client = s.client;
        let mut seg = self.seg(if len > 0 { ACK | PSH } else { ACK }, seq, ack);
        seg.payload_len = len;
        self.dir(client, from_client, seg)
    }

    fn fin(&mut self, i: usize, from_client: bool) -> Op {
        let s = &mut self.sims[i];
        let (seq, ack) = if from_client {
            let seq = s.c_nxt;
            s.c_nxt = seq.wrapping_add(1);
            (seq, s.b_view())
        } else {
            let seq = s.b_nxt;
            s.b_nxt = seq.wrapping_add(1);
            (seq, s.c_nxt)
        };
        let client = s.client;
        let seg = self.seg(FIN | ACK, seq, ack);
        self.dir(client, from_client, seg)
    }

    /// Any flag byte, numbers near the hosts' or anywhere.
    fn random_segment(&mut self, client: Client, s: &Sim) -> Op {
        let from_client = self.rng.chance(500);
        let flags = if self.rng.chance(500) {
            self.rng.u32() as u8
        } else {
            self.rng.pick(&VALID_FLAGS) | if self.rng.chance(200) { PSH } else { 0 }
        };
        let (seq, ack) = if from_client {
            (s.c_nxt, s.b_view())
        } else {
            (s.b_nxt, s.c_nxt)
        };
        let seq = match self.rng.below(4) {
            0 => self.rng.u32(),
            1 => seq.wrapping_add(self.rng.range(0, 70_000)),
            _ => seq,
        };
        let ack = match self.rng.below(4) {
            0 => self.rng.u32(),
            _ => ack,
        };
        let mut seg = self.seg(flags, seq, ack);
        seg.payload_len = if self.rng.chance(300) {
            self.rng.range(1, 300) as u16
        } else {
            0
        };
        if flags & SYN != 0 {
            seg.tcp_options = self.syn_options();
        }
        self.dir(client, from_client, seg)
    }

    /// A segment at an edge of the window checks, from the model's entries (spec §4.3-§4.4).
    fn edge(&mut self, client: Client, model: &Model) -> Op {
        let key = client.key();
        let from_client = self.rng.chance(500);
        let fwd = model.ct.get(&key).copied();
        let es_key = if from_client {
            Some(key)
        } else {
            fwd.map(|f| f.peer_key())
        };
        let (Some(es), Some(er)) = (
            es_key.and_then(|k| model.ct.get(&k).copied()),
            es_key
                .and_then(|k| model.ct.get(&k))
                .and_then(|e| model.ct.get(&e.peer_key()).copied()),
        ) else {
            let s = self
                .sims
                .iter()
                .find(|s| s.client == client)
                .unwrap()
                .clone();
            return self.random_segment(client, &s);
        };
        let d = |rng: &mut Rng| rng.pick(&[u32::MAX, 0, 1]);
        let rcv_nxt = if er.track & TRACK_ACK_SEEN != 0 {
            er.ack_max
        } else {
            es.seq_end
        };
        let rcv_wnd = er.win_max.max(1);
        let b_r = max_window(es.peer_wscale);
        let b_s = max_window(es.wscale);
        let len = if self.rng.chance(500) {
            0
        } else {
            self.rng.range(1, 100)
        };
        let ack = if es.track & TRACK_ACK_SEEN != 0 {
            es.ack_max
        } else {
            er.seq_end
        };
        let (flags, seq, ack) = match self.rng.below(8) {
            0 => (
                ACK,
                es.seq_end
                    .wrapping_sub(b_r)
                    .wrapping_sub(len)
                    .wrapping_add(d(&mut self.rng)),
                ack,
            ),
            1 => (
                ACK,
                es.seq_end.wrapping_add(b_r).wrapping_add(d(&mut self.rng)),
                ack,
            ),
            2 => (
                ACK,
                es.seq_end,
                es.ack_max.wrapping_add(b_s).wrapping_add(d(&mut self.rng)),
            ),
            3 => (
                ACK,
                es.seq_end,
                es.ack_max.wrapping_sub(b_s).wrapping_add(d(&mut self.rng)),
            ),
            4 => {
                let seq = match self.rng.below(5) {
                    0 => rcv_nxt.wrapping_add(d(&mut self.rng)),
                    1 => rcv_nxt.wrapping_add(rcv_wnd).wrapping_add(d(&mut self.rng)),
                    2 => es.seq_end,
                    3 => rcv_nxt.wrapping_add(self.rng.below(u64::from(rcv_wnd)) as u32),
                    _ => rcv_nxt.wrapping_add(1 << 30),
                };
                (self.rng.pick(&[RST, RST | ACK]), seq, ack)
            }
            5 => {
                let seq = match self.rng.below(3) {
                    0 => rcv_nxt.wrapping_add(rcv_wnd).wrapping_add(d(&mut self.rng)),
                    1 => rcv_nxt.wrapping_sub(len + 1).wrapping_add(d(&mut self.rng)),
                    _ => es.seq_end,
                };
                (FIN | ACK, seq, ack)
            }
            6 => (ACK, es.seq_end, er.seq_end.wrapping_add(d(&mut self.rng))),
            _ => (
                SYN | ACK,
                es.seq_end.wrapping_sub(1),
                er.seq_end.wrapping_add(d(&mut self.rng)),
            ),
        };
        // A proxied flow's entries are in the client's view: its backend sends its own numbers.
        let seq = if from_client || es.track & TRACK_PROXIED == 0 {
            seq
        } else {
            seq.wrapping_add(es.seq_delta)
        };
        let mut seg = self.seg(flags, seq, ack);
        seg.payload_len = len as u16;
        if es.state & CT_SYN_ACK_SEEN == 0 && flags & SYN != 0 {
            seg.tcp_options = self.syn_options();
        }
        self.dir(client, from_client, seg)
    }

    /// Issue 15: a client holding a cookie (sim `i`, phase [`Phase::Cookie`]): mostly the ACK
    /// that completes its handshake, sometimes with data (not taken); or a forged one (another
    /// number, another MSS index, another ISN), a stale one (made two counters ago: its low bits
    /// name no counter it is checked in), an older one still valid (the counter before), the
    /// cookie's ACK from another port, its SYN again, anything.
    fn cookie_ack(&mut self, i: usize, model: &Model) -> Op {
        let s = self.sims[i].clone();
        let client = s.client;
        let (seq, ack) = (s.c_isn.wrapping_add(1), s.cookie.wrapping_add(1));
        // A cookie for this handshake made at `counter` with the cookie's MSS index.
        let remade = |counter: u64| {
            let hs = Handshake {
                src_ip: ip_to_net(*client.addr().ip()),
                dst_ip: ip_to_net(*Fixture::service().ip()),
                src_port: client.port.to_be(),
                dst_port: SERVICE_PORT.to_be(),
                isn: s.c_isn,
            };
            syncookie::make(&model.cookie_key, &hs, counter, (s.cookie >> 28) & 3)
        };
        let now = syncookie::counter(monotonic_ns());
        let (seq, ack, payload, port) = match self.rng.below(20) {
            0..=8 => (seq, ack, 0, client.port),
            // Its ACK was lost: the client's zero-window probe (Linux's `snd_una - 1`: its
            // ISN), which the gateway takes as the cookie's ACK.
            9 | 10 => (s.c_isn, ack, 0, client.port),
            11 => (seq, ack, self.rng.range(1, 300), client.port),
            12 => {
                let d = self
                    .rng
                    .pick(&[1, u32::MAX, 1 << 28, 1 << 30, 3 << 30, 0x0800_0000]);
                (seq, ack.wrapping_add(d), 0, client.port)
            }
            13 => (
                seq.wrapping_add(self.rng.pick(&[1, u32::MAX])),
                ack,
                0,
                client.port,
            ),
            14 => (
                seq,
                remade(now.wrapping_sub(2)).wrapping_add(1),
                0,
                client.port,
            ),
            15 => (
                seq,
                remade(now.wrapping_sub(1)).wrapping_add(1),
                0,
                client.port,
            ),
            16 => (seq, ack, 0, client.port.wrapping_add(1).max(1024)),
            17 => return self.syn(i, false),
            _ => return self.random_segment(client, &s),
        };
        let mut seg = self.seg(if payload > 0 { ACK | PSH } else { ACK }, seq, ack);
        seg.payload_len = payload as u16;
        Op::Client {
            client: Client { port, ..client },
            seg,
        }
    }

    /// Issue 15: a proxied flow whose backend has the gateway's SYN (sim `i`, phase
    /// [`Phase::Proxied`]): mostly the backend's SYN-ACK (sometimes acknowledging something
    /// else), or its refusal (an RST acknowledging the SYN), the client's zero-window probe or
    /// data before the backend's handshake is done, the client's ACK or SYN again, anything.
    fn proxied(&mut self, i: usize) -> Op {
        let s = self.sims[i].clone();
        let client = s.client;
        let syn_end = s.c_isn.wrapping_add(1);
        match self.rng.below(12) {
            0..=5 => {
                let ack = if self.rng.chance(900) {
                    syn_end
                } else {
                    syn_end.wrapping_add(self.rng.pick(&[1, u32::MAX, 0x4000_0000]))
                };
                let mut seg = self.seg(SYN | ACK, s.b_isn, ack);
                seg.tcp_options = self.syn_options();
                Op::Backend { client, seg }
            }
            6 => {
                self.sims[i].phase = Phase::Idle;
                Op::Backend {
                    client,
                    seg: self.seg(RST | ACK, 0, syn_end),
                }
            }
            7 => {
                let probe = self.rng.chance(500);
                let mut seg = self.seg(
                    ACK,
                    if probe {
                        s.c_nxt.wrapping_sub(1)
                    } else {
                        s.c_nxt
                    },
                    s.cookie.wrapping_add(1),
                );
                seg.payload_len = if probe {
                    0
                } else {
                    self.rng.range(1, 100) as u16
                };
                Op::Client { client, seg }
            }
            8 => Op::Client {
                client,
                seg: self.seg(ACK, syn_end, s.cookie.wrapping_add(1)),
            },
            9 => self.syn(i, false),
            _ => self.random_segment(client, &s),
        }
    }

    /// TCP options of a SYN or SYN-ACK: often a window scale offer among others, sometimes a
    /// malformed list.
    fn syn_options(&mut self) -> Vec<u8> {
        let mut o = Vec::new();
        if self.rng.chance(700) {
            o.extend_from_slice(&[2, 4, 0x05, 0xb4]);
        }
        if self.rng.chance(400) {
            o.extend_from_slice(&[4, 2]);
        }
        if self.rng.chance(400) {
            o.extend_from_slice(&[8, 10, 1, 2, 3, 4, 0, 0, 0, 0]);
        }
        if self.rng.chance(300) {
            o.push(1);
        }
        if self.rng.chance(650) {
            let shift = if self.rng.chance(900) {
                self.rng.range(0, 14) as u8
            } else {
                self.rng.pick(&[15, 16, 255])
            };
            o.extend_from_slice(&[3, 3, shift]);
        }
        match self.rng.below(40) {
            0 => o.extend_from_slice(&[5, 1]),
            1 => o.extend_from_slice(&[9, 0]),
            2 => o.insert(0, 0),
            3 => o.extend_from_slice(&[3, 4, 7, 0]),
            4 => o.push(3),
            _ => {}
        }
        o.truncate(40);
        o
    }

    /// A packet for no connection of the pool.
    fn stray(&mut self) -> Op {
        let svc = Fixture::service();
        let link = Link::Client;
        let port = self.rng.range(1024, 65_535) as u16;
        let src = SocketAddrV4::new(link.ip(), port);
        let mut flags = if self.rng.chance(600) {
            self.rng.pick(&VALID_FLAGS)
        } else {
            self.rng.u32() as u8
        };
        // No new flows from here: they would hold SNAT ports for good.
        if flags & (SYN | ACK | FIN | RST) == SYN {
            flags = ACK;
        }
        let (link, src, dst) = match self.rng.below(10) {
            0..=3 => (link, src, svc),
            4..=6 => {
                let b = self.rng.below(self.backends as u64) as usize;
                let (lo, hi) = self.snat_ports;
                let snat = SocketAddrV4::new(
                    Topology::SNAT_IP,
                    self.rng.range(u32::from(lo), u32::from(hi)) as u16,
                );
                let from = if self.rng.chance(800) {
                    backend(b)
                } else {
                    SocketAddrV4::new(backend_ip(b), port)
                };
                (Link::Backend(b), from, snat)
            }
            7 => (
                link,
                src,
                SocketAddrV4::new(
                    Topology::SNAT_IP,
                    self.rng.pick(&[22, 80, self.snat_ports.1 + 1]),
                ),
            ),
            8 => (
                link,
                src,
                SocketAddrV4::new(
                    Topology::PUBLIC_IP,
                    self.rng.pick(&[22, SERVICE_PORT + 1, BACKEND_PORT]),
                ),
            ),
            _ => {
                if self.rng.chance(500) {
                    let mut b = vec![0u8; self.rng.range(0, 60) as usize];
                    let n = b.len().min(12);
                    b[..n].fill(2);
                    if b.len() >= 14 {
                        b[12..14].copy_from_slice(
                            &self.rng.pick(&[0x0806u16, 0x86dd, 0x0800]).to_be_bytes(),
                        );
                    }
                    return Op::Bytes(b);
                }
                (link, src, SocketAddrV4::new(backend_ip(0), BACKEND_PORT))
            }
        };
        let (seq, ack) = (self.rng.u32(), self.rng.u32());
        let mut seg = self.seg(flags, seq, ack);
        (seg.src, seg.dst) = (src, dst);
        if self.rng.chance(100) {
            seg.proto = self.rng.pick(&[1, 17]);
        }
        seg.payload_len = if self.rng.chance(300) {
            self.rng.range(1, 100) as u16
        } else {
            0
        };
        self.spoil(Op::Raw { link, seg })
    }

    /// Sometimes spoils a packet: TTL, IP options, a cut, fragment bits, checksums (partial
    /// ones too), lengths.
    fn spoil(&mut self, mut op: Op) -> Op {
        let seg = match &mut op {
            Op::Client { seg, .. } | Op::Backend { seg, .. } | Op::Raw { seg, .. } => seg,
            _ => return op,
        };
        if !self.rng.chance(180) {
            return op;
        }
        let rng = &mut self.rng;
        match rng.below(16) {
            0 | 1 => seg.ttl = rng.pick(&[0, 1, 2, 255, 64]),
            2 => {
                let n = rng.range(1, 10) as usize * 4;
                seg.ip_options = if rng.chance(500) {
                    vec![1; n]
                } else {
                    (0..n).map(|_| rng.u32() as u8).collect()
                };
            }
            3 => seg.cut = Some(rng.range(14, 80) as u16),
            4 => seg.frag = rng.pick(&[0x2000, 0x0001, 0x3fff, 0x8000, 0x6000]),
            5 => seg.ip_csum_delta = rng.range(1, 0xffff) as u16,
            6 => seg.tcp_csum_delta = rng.range(1, 0xffff) as u16,
            7 => seg.negative_zero = true,
            8 => seg.trailer = rng.range(1, 30) as u8,
            9 => seg.version_ihl = Some(rng.pick(&[0x44, 0x46, 0x4f, 0x65, 0x35, 0x00])),
            10 => seg.doff = Some(rng.range(0, 15) as u8),
            11 => seg.total_len = Some(rng.pick(&[0, 19, 40, 41, 1500, 65_535])),
            12 => {
                seg.tcp_options = (0..rng.range(1, 40)).map(|_| rng.u32() as u8).collect();
            }
            // What a sender with tx checksum offload hands a veth (CHECKSUM_PARTIAL).
            13 => seg.partial_csum = true,
            // A client claiming an address in a TOA option (issue 17), among other options,
            // maybe twice, maybe behind an End of Option List.
            14 => {
                let claim = [254, 8, 0x10, 0x92, 203, 0, 113, rng.u32() as u8];
                let mut o = Vec::new();
                if rng.chance(500) {
                    o.extend_from_slice(&[1, 1, 8, 10, 1, 2, 3, 4, 0, 0, 0, 0]);
                }
                match rng.below(4) {
                    0 => o.push(0),
                    1 => o.extend_from_slice(&[30, 1]),
                    _ => {}
                }
                o.extend_from_slice(&claim);
                if rng.chance(300) {
                    o.extend_from_slice(&claim);
                }
                seg.tcp_options = o;
            }
            _ => seg.ttl = 1,
        }
        op
    }
}
