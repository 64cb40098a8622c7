//! The conntrack table seen from userspace: read in batches, expired and counted in one pass,
//! and shareable, so that the daemon's periodic scan reads it without holding its lock.

use std::{os::fd::AsFd as _, time::Duration};

use aya::maps::{HashMap, IterableMap as _, Map, MapData, MapError};
use gateway_common::maps::{self, Flow, FlowKey4};

use super::{DatapathError, batch, elem};

/// The conntrack map ([`maps::CONNTRACK4`]).
pub struct Conntrack {
    map: HashMap<MapData, FlowKey4, Flow>,
}

impl Conntrack {
    pub(crate) fn new(map: HashMap<MapData, FlowKey4, Flow>) -> Self {
        Conntrack { map }
    }

    /// Another handle on the same table (a duplicated descriptor).
    pub fn try_clone(&self) -> Result<Conntrack, DatapathError> {
        let fd = self
            .map
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(walk_err)?;
        let data = MapData::from_fd(fd).map_err(map_err)?;
        let map = HashMap::try_from(Map::HashMap(data)).map_err(map_err)?;
        Ok(Conntrack { map })
    }

    /// The table's capacity (entries).
    pub fn capacity(&self) -> Option<u32> {
        self.map.map().info().ok().map(|i| i.max_entries())
    }

    /// Calls `each` on every entry, reading the table in batches (see [`batch`]).
    pub fn walk(&self, each: impl FnMut(&FlowKey4, &Flow)) -> Result<(), DatapathError> {
        batch::for_each(self.map.map().fd(), each).map_err(walk_err)
    }

    /// Every entry.
    pub fn entries(&self) -> Result<Vec<(FlowKey4, Flow)>, DatapathError> {
        let mut flows = Vec::new();
        self.walk(|k, f| flows.push((*k, *f)))?;
        Ok(flows)
    }

    /// Open connections (not closed; forward entries) per app id and per backend id, and the
    /// number of entries in use. Walks the table.
    pub fn counts(&self) -> Result<ConnectionCounts, DatapathError> {
        let mut counts = ConnectionCounts::default();
        self.walk(|_, flow| counts.add(flow))?;
        Ok(counts)
    }

    /// Inserts an entry as it is (tests and benchmarks fill the table this way).
    #[cfg(feature = "testing")]
    pub fn insert(&mut self, key: FlowKey4, flow: Flow) -> Result<(), DatapathError> {
        self.map.insert(key, flow, 0).map_err(map_err)
    }

    /// Inserts `flow` under `key` unless the table has an entry for `key` already
    /// (`BPF_NOEXIST`); returns whether it did.
    pub fn insert_new(&mut self, key: FlowKey4, flow: Flow) -> Result<bool, DatapathError> {
        /// `BPF_NOEXIST` (linux/bpf.h): create a new element only.
        const BPF_NOEXIST: u64 = 1;
        match self.map.insert(key, flow, BPF_NOEXIST) {
            Ok(()) => Ok(true),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                Ok(false)
            }
            Err(e) => Err(map_err(e)),
        }
    }

    /// The entry of `key`, if any.
    pub fn get(&self, key: &FlowKey4) -> Result<Option<Flow>, DatapathError> {
        match self.map.get(key, 0) {
            Ok(f) => Ok(Some(f)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(e)),
        }
    }

    /// Removes every entry whose flow matches `which` (both entries of a connection carry the
    /// same app and backend); returns how many went (tests and benchmarks empty the table so).
    #[cfg(feature = "testing")]
    pub fn remove_where(&mut self, which: impl Fn(&Flow) -> bool) -> Result<usize, DatapathError> {
        let mut keys = Vec::new();
        self.walk(|key, flow| {
            if which(flow) {
                keys.push(*key);
            }
        })?;
        Ok(self.remove(&keys))
    }

    /// Ends every connection whose flow matches `which` (both entries of a connection carry
    /// the same app and backend): calls `before` on each connection, then removes its two
    /// entries, one connection after the other. Returns how many connections were ended.
    pub fn end_where(
        &mut self,
        which: impl Fn(&Flow) -> bool,
        mut before: impl FnMut(&Connection),
    ) -> Result<usize, DatapathError> {
        let connections = self.connections(|_, flow| which(flow))?;
        for c in &connections {
            before(c);
            self.remove(&[c.forward_key, c.reverse_key]);
        }
        Ok(connections.len())
    }

    /// The connections of the entries `which` selects: each forward entry with its peer if that
    /// is selected too, then each reverse entry left without one, alone. Walks the table.
    pub fn connections(
        &self,
        which: impl Fn(&FlowKey4, &Flow) -> bool,
    ) -> Result<Vec<Connection>, DatapathError> {
        let mut entries = Vec::new();
        self.walk(|key, flow| {
            if which(key, flow) {
                entries.push((*key, *flow));
            }
        })?;
        Ok(Connection::pair(entries))
    }

    /// Removes the entries of `keys` that are still there; returns how many went.
    fn remove(&mut self, keys: &[FlowKey4]) -> usize {
        keys.iter().filter(|k| self.map.remove(k).is_ok()).count()
    }

    /// One pass over the table: removes flows idle for longer than their state's timeout (both
    /// entries of each) and counts the connections that remain. The walk ([`Conntrack::expired`])
    /// and the removal ([`Conntrack::remove_expired`]) are the two halves.
    pub fn scan(&mut self, now_ns: u64, timeouts: &Timeouts) -> Result<Scan, DatapathError> {
        let expired = self.expired(now_ns, timeouts)?;
        self.remove_expired(expired, now_ns, timeouts)
    }

    /// The first half of a scan: walks the table, lists the entries expired at `now_ns` and
    /// counts the connections of the others.
    pub fn expired(&self, now_ns: u64, timeouts: &Timeouts) -> Result<Expired, DatapathError> {
        let mut counts = ConnectionCounts::default();
        let mut entries = Vec::new();
        self.walk(|key, flow| {
            if timeouts.expired(flow, now_ns) {
                entries.push((*key, *flow));
            } else {
                counts.add(flow);
            }
        })?;
        Ok(Expired { entries, counts })
    }

    /// The second half of a scan: removes each entry `expired` listed, and its peer, only if the
    /// table still holds that very flow, expired at `now_ns`. The datapath may have reused the
    /// key meanwhile (a SYN starting a closed connection over, a SNAT port taken over): that new
    /// flow is kept. An entry is taken atomically and put back (`BPF_NOEXIST`) if what was
    /// taken is not what was checked, so only a reuse within that one syscall costs the new
    /// flow a packet, never its entry.
    pub fn remove_expired(
        &mut self,
        expired: Expired,
        now_ns: u64,
        timeouts: &Timeouts,
    ) -> Result<Scan, DatapathError> {
        let mut removed = 0;
        for (key, flow) in &expired.entries {
            // The flow's own entry: the same flow (its creation time), still expired.
            let own = |f: &Flow| f.created_ns == flow.created_ns && timeouts.expired(f, now_ns);
            // Its peer: an entry of the same connection (both are made at once).
            let peer_key = flow.peer_key();
            let peer = |f: &Flow| f.created_ns == flow.created_ns && f.peer_key() == *key;
            // Each expired pair may be listed twice (once from each entry): removed once.
            removed += usize::from(self.remove_if(key, own)?);
            removed += usize::from(self.remove_if(&peer_key, peer)?);
        }
        Ok(Scan {
            counts: expired.counts,
            removed,
        })
    }

    /// Removes the entry of `key` if it is there and `still` holds for it; returns whether it
    /// went. Checked before the removal and on the value removed, which is put back if `still`
    /// no longer holds for it (unless the datapath inserted another meanwhile).
    fn remove_if(
        &mut self,
        key: &FlowKey4,
        still: impl Fn(&Flow) -> bool,
    ) -> Result<bool, DatapathError> {
        match self.get(key)? {
            Some(f) if still(&f) => {}
            _ => return Ok(false),
        }
        let taken: Option<Flow> = elem::take(self.map.map().fd(), key).map_err(walk_err)?;
        match taken {
            None => Ok(false),
            Some(f) if still(&f) => Ok(true),
            Some(f) => {
                self.insert_new(*key, f)?;
                Ok(false)
            }
        }
    }
}

/// The entries a scan's walk found expired, and the connections of the others
/// ([`Conntrack::expired`]).
#[derive(Clone, Debug, Default)]
pub struct Expired {
    /// Each expired entry, as the walk read it.
    pub entries: Vec<(FlowKey4, Flow)>,
    pub counts: ConnectionCounts,
}

fn map_err(source: MapError) -> DatapathError {
    DatapathError::Map {
        name: maps::CONNTRACK4,
        source,
    }
}

fn walk_err(source: std::io::Error) -> DatapathError {
    DatapathError::Walk {
        name: maps::CONNTRACK4,
        source,
    }
}

/// Both entries of one connection, as the table held them when it was ended. Either entry
/// may be missing (evicted, or removed by an earlier pass); its key is the other's rewritten
/// tuple reversed ([`Flow::peer_key`]), so both keys are always known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connection {
    /// The forward entry's key: client → public address and port.
    pub forward_key: FlowKey4,
    pub forward: Option<Flow>,
    /// The reverse entry's key: backend → SNAT address and port.
    pub reverse_key: FlowKey4,
    pub reverse: Option<Flow>,
}

impl Connection {
    /// Groups `entries` into connections: each forward entry with its peer when the peer is
    /// there, then each reverse entry left, alone.
    fn pair(entries: impl IntoIterator<Item = (FlowKey4, Flow)>) -> Vec<Connection> {
        let mut forward = Vec::new();
        let mut reverse = std::collections::HashMap::new();
        for (key, flow) in entries {
            if flow.direction == maps::DIR_FORWARD {
                forward.push((key, flow));
            } else {
                reverse.insert(key, flow);
            }
        }
        let mut connections: Vec<Connection> = forward
            .into_iter()
            .map(|(key, flow)| {
                let reverse_key = flow.peer_key();
                Connection {
                    forward_key: key,
                    forward: Some(flow),
                    reverse_key,
                    reverse: reverse.remove(&reverse_key),
                }
            })
            .collect();
        connections.extend(reverse.into_iter().map(|(key, flow)| Connection {
            forward_key: flow.peer_key(),
            forward: None,
            reverse_key: key,
            reverse: Some(flow),
        }));
        connections
    }
}

/// What [`Conntrack::scan`] found.
#[derive(Clone, Debug, Default)]
pub struct Scan {
    /// The connections left after the expired ones went.
    pub counts: ConnectionCounts,
    /// Entries removed (two per connection).
    pub removed: usize,
}

/// Idle timeouts for conntrack garbage collection.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// A flow whose handshake did not complete.
    pub handshake: Duration,
    /// An established flow.
    pub established: Duration,
    /// A flow after RST, or FIN both ways: short, so SNAT ports recycle.
    pub closed: Duration,
    /// A closed flow whose backend closed first ([`maps::CT_BACKEND_CLOSED_FIRST`]), at least:
    /// the backend's TIME_WAIT, during which its SNAT port is not reused toward that backend.
    pub time_wait: Duration,
}

impl Timeouts {
    /// Whether `flow` has been idle for longer than its state allows at `now_ns`.
    pub fn expired(&self, flow: &Flow, now_ns: u64) -> bool {
        let idle = Duration::from_nanos(now_ns.saturating_sub(flow.last_seen_ns));
        let limit = if maps::is_closed(flow.state) {
            if flow.state & maps::CT_BACKEND_CLOSED_FIRST != 0 {
                self.closed.max(self.time_wait)
            } else {
                self.closed
            }
        } else if flow.state & maps::CT_ESTABLISHED != 0 {
            self.established
        } else {
            self.handshake
        };
        idle > limit
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake: Duration::from_secs(30),
            // As IPVS: long enough for idle SSH-like sessions.
            established: Duration::from_secs(900),
            closed: Duration::from_secs(10),
            time_wait: Duration::from_nanos(maps::TIME_WAIT_NS),
        }
    }
}

/// Where a connection is in its life, by the state bits its entries carry ([`Flow::state`]):
/// the kinds the table's pressure is shown in (`gateway status`, metrics). Every connection is
/// in exactly one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// The handshake has not completed (no [`maps::CT_ESTABLISHED`]), nor has the flow closed:
    /// what a SYN flood fills the table with.
    HalfOpen,
    /// Established, no FIN yet.
    Established,
    /// A FIN one way (either side), not yet the other.
    Closing,
    /// Over (RST, or FIN both ways), kept for the closed timeout.
    Closed,
    /// Over, the backend closed first ([`maps::CT_BACKEND_CLOSED_FIRST`]): kept, with its SNAT
    /// port, for the backend's TIME_WAIT ([`maps::TIME_WAIT_NS`]).
    TimeWait,
}

impl Phase {
    /// Every phase, in a connection's order.
    pub const ALL: [Phase; 5] = [
        Phase::HalfOpen,
        Phase::Established,
        Phase::Closing,
        Phase::Closed,
        Phase::TimeWait,
    ];

    /// The phase of a connection whose entries carry `state` bits.
    pub const fn of(state: u8) -> Phase {
        if maps::is_closed(state) {
            if state & maps::CT_BACKEND_CLOSED_FIRST != 0 {
                Phase::TimeWait
            } else {
                Phase::Closed
            }
        } else if state & (maps::CT_FIN_FORWARD | maps::CT_FIN_REVERSE) != 0 {
            Phase::Closing
        } else if state & maps::CT_ESTABLISHED != 0 {
            Phase::Established
        } else {
            Phase::HalfOpen
        }
    }

    /// Its label in metrics (`state="half_open"`) and the API's field name.
    pub const fn label(self) -> &'static str {
        match self {
            Phase::HalfOpen => "half_open",
            Phase::Established => "established",
            Phase::Closing => "closing",
            Phase::Closed => "closed",
            Phase::TimeWait => "time_wait",
        }
    }

    /// Whether a connection in this phase is open (counted in the open connections of its app
    /// and backend): not closed.
    pub const fn is_open(self) -> bool {
        matches!(self, Phase::HalfOpen | Phase::Established | Phase::Closing)
    }
}

/// Connections in the conntrack table by [`Phase`], each counted once (by its forward entry).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Phases {
    pub half_open: u64,
    pub established: u64,
    pub closing: u64,
    pub closed: u64,
    pub time_wait: u64,
}

impl Phases {
    /// The count of `phase`.
    pub fn get(&self, phase: Phase) -> u64 {
        match phase {
            Phase::HalfOpen => self.half_open,
            Phase::Established => self.established,
            Phase::Closing => self.closing,
            Phase::Closed => self.closed,
            Phase::TimeWait => self.time_wait,
        }
    }

    fn slot(&mut self, phase: Phase) -> &mut u64 {
        match phase {
            Phase::HalfOpen => &mut self.half_open,
            Phase::Established => &mut self.established,
            Phase::Closing => &mut self.closing,
            Phase::Closed => &mut self.closed,
            Phase::TimeWait => &mut self.time_wait,
        }
    }

    /// Every connection, whatever its phase.
    pub fn total(&self) -> u64 {
        Phase::ALL.iter().map(|p| self.get(*p)).sum()
    }
}

/// What a walk of the conntrack table counts: open connections per app and backend id, the
/// half-open ones per app, every connection by phase, and the entries in use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectionCounts {
    /// Open connections ([`Phase::is_open`]) per app id.
    pub apps: std::collections::HashMap<u32, u64>,
    /// Open connections per backend id.
    pub backends: std::collections::HashMap<u32, u64>,
    /// Half-open connections per app id (a SYN flood toward one app shows here): those a SYN
    /// made ([`Phase::HalfOpen`], not proxied), as the datapath counts them for its SYN cookies
    /// ([`maps::HALF_OPEN`]; the scan sets its count to this).
    pub half_open: std::collections::HashMap<u32, u64>,
    /// Every connection in the table (forward entries) by phase.
    pub phases: Phases,
    /// Conntrack entries in use (two per connection).
    pub entries: u64,
}

impl ConnectionCounts {
    /// Counts one conntrack entry: every entry in [`ConnectionCounts::entries`], a connection
    /// by its forward entry (both carry the same state).
    fn add(&mut self, flow: &Flow) {
        self.entries += 1;
        if flow.direction != maps::DIR_FORWARD {
            return;
        }
        let phase = Phase::of(flow.state);
        *self.phases.slot(phase) += 1;
        if phase.is_open() {
            *self.apps.entry(flow.app_id).or_default() += 1;
            *self.backends.entry(flow.backend_id).or_default() += 1;
        }
        if phase == Phase::HalfOpen && flow.track & maps::TRACK_PROXIED == 0 {
            *self.half_open.entry(flow.app_id).or_default() += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use gateway_common::maps::{
        CT_BACKEND_CLOSED_FIRST, CT_ESTABLISHED, CT_FIN_FORWARD, CT_FIN_REVERSE, CT_RST,
        CT_SYN_ACK_SEEN, CT_SYN_SEEN, DIR_FORWARD, DIR_REVERSE,
    };

    use super::*;

    /// The two entries of the connection of `client` (to 203.0.113.10:20000), through SNAT
    /// port `snat_port` to 198.51.100.2:8080.
    fn pair(client: &str, snat_port: u16) -> [(FlowKey4, Flow); 2] {
        let (client, public) = (
            client.parse().unwrap(),
            "203.0.113.10:20000".parse().unwrap(),
        );
        let backend = "198.51.100.2:8080".parse().unwrap();
        let snat = std::net::SocketAddrV4::new("198.51.100.253".parse().unwrap(), snat_port);
        let at = |src, dst, direction| Flow {
            nat_src_ip: gateway_common::net::ip_to_net(*std::net::SocketAddrV4::ip(&src)),
            nat_dst_ip: gateway_common::net::ip_to_net(*std::net::SocketAddrV4::ip(&dst)),
            nat_src_port: src.port().to_be(),
            nat_dst_port: dst.port().to_be(),
            direction,
            backend_id: 3,
            ..Flow::default()
        };
        [
            (
                FlowKey4::from_addrs(client, public),
                at(snat, backend, DIR_FORWARD),
            ),
            (
                FlowKey4::from_addrs(backend, snat),
                at(public, client, DIR_REVERSE),
            ),
        ]
    }

    #[test]
    fn entries_are_paired_into_connections_an_orphan_alone() {
        let [f1, r1] = pair("192.0.2.2:40000", 41_000);
        let [f2, _] = pair("192.0.2.3:40000", 41_001);
        let [_, r3] = pair("192.0.2.4:40000", 41_002);
        let entries: HashMap<FlowKey4, Flow> = [f1, r1, f2, r3].into_iter().collect();
        let mut connections = Connection::pair(entries);
        connections.sort_by_key(|c| c.forward_key.src_ip);
        assert_eq!(
            connections,
            vec![
                Connection {
                    forward_key: f1.0,
                    forward: Some(f1.1),
                    reverse_key: r1.0,
                    reverse: Some(r1.1),
                },
                Connection {
                    forward_key: f2.0,
                    forward: Some(f2.1),
                    reverse_key: pair("192.0.2.3:40000", 41_001)[1].0,
                    reverse: None,
                },
                Connection {
                    forward_key: pair("192.0.2.4:40000", 41_002)[0].0,
                    forward: None,
                    reverse_key: r3.0,
                    reverse: Some(r3.1),
                },
            ]
        );
    }

    #[test]
    fn a_connection_is_in_the_phase_its_state_bits_say() {
        let est = CT_SYN_SEEN | CT_SYN_ACK_SEEN | CT_ESTABLISHED;
        let cases = [
            (CT_SYN_SEEN, Phase::HalfOpen),
            (CT_SYN_SEEN | CT_SYN_ACK_SEEN, Phase::HalfOpen),
            (est, Phase::Established),
            (est | CT_FIN_FORWARD, Phase::Closing),
            // The backend's FIN first: closing until the client's, then TIME_WAIT.
            (
                est | CT_FIN_REVERSE | CT_BACKEND_CLOSED_FIRST,
                Phase::Closing,
            ),
            (est | CT_FIN_FORWARD | CT_FIN_REVERSE, Phase::Closed),
            (
                est | CT_FIN_FORWARD | CT_FIN_REVERSE | CT_BACKEND_CLOSED_FIRST,
                Phase::TimeWait,
            ),
            (CT_SYN_SEEN | CT_RST, Phase::Closed),
            (est | CT_RST, Phase::Closed),
            (
                est | CT_FIN_REVERSE | CT_BACKEND_CLOSED_FIRST | CT_RST,
                Phase::TimeWait,
            ),
            // A FIN before the handshake completed: closing, not half-open.
            (
                CT_SYN_SEEN | CT_SYN_ACK_SEEN | CT_FIN_FORWARD,
                Phase::Closing,
            ),
        ];
        for (state, phase) in cases {
            assert_eq!(Phase::of(state), phase, "state {state:#04x}");
        }
        // Open means not closed, for every combination of bits.
        for state in 0..=u8::MAX {
            assert_eq!(
                Phase::of(state).is_open(),
                !maps::is_closed(state),
                "state {state:#04x}"
            );
        }
        let labels: std::collections::HashSet<_> = Phase::ALL.iter().map(|p| p.label()).collect();
        assert_eq!(labels.len(), Phase::ALL.len());
    }

    #[test]
    fn counts_give_each_connection_one_phase_and_half_open_ones_per_app() {
        let est = CT_SYN_SEEN | CT_SYN_ACK_SEEN | CT_ESTABLISHED;
        // (client, app, backend, state) of each connection, both entries in the table.
        let connections = [
            ("192.0.2.2:40000", 1, 10, CT_SYN_SEEN),
            ("192.0.2.2:40001", 1, 10, CT_SYN_SEEN | CT_SYN_ACK_SEEN),
            ("192.0.2.2:40002", 2, 20, CT_SYN_SEEN),
            ("192.0.2.2:40003", 1, 11, est),
            ("192.0.2.2:40004", 2, 20, est | CT_FIN_FORWARD),
            (
                "192.0.2.2:40005",
                2,
                20,
                est | CT_FIN_FORWARD | CT_FIN_REVERSE,
            ),
            (
                "192.0.2.2:40006",
                1,
                10,
                est | CT_FIN_FORWARD | CT_FIN_REVERSE | CT_BACKEND_CLOSED_FIRST,
            ),
            ("192.0.2.2:40007", 1, 11, est | CT_RST),
        ];
        let mut counts = ConnectionCounts::default();
        for (i, (client, app, backend, state)) in connections.into_iter().enumerate() {
            for (_, mut flow) in pair(client, 41_000 + i as u16) {
                (flow.app_id, flow.backend_id, flow.state) = (app, backend, state);
                counts.add(&flow);
            }
        }
        // An orphan reverse entry: an entry in use, no connection.
        let [_, (_, orphan)] = pair("192.0.2.3:40000", 42_000);
        counts.add(&Flow {
            app_id: 1,
            state: CT_SYN_SEEN,
            ..orphan
        });

        assert_eq!(counts.entries, 17);
        assert_eq!(
            counts.phases,
            Phases {
                half_open: 3,
                established: 1,
                closing: 1,
                closed: 2,
                time_wait: 1,
            }
        );
        assert_eq!(counts.phases.total(), 8);
        assert_eq!(counts.half_open, HashMap::from([(1, 2), (2, 1)]));
        // Open: half-open, established and closing.
        assert_eq!(counts.apps, HashMap::from([(1, 3), (2, 2)]));
        assert_eq!(counts.backends, HashMap::from([(10, 2), (11, 1), (20, 2)]));
    }
}
