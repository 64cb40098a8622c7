//! The conntrack table seen from userspace: read in batches, expired and counted in one pass,
//! and shareable, so that the daemon's periodic scan reads it without holding its lock.

use std::{os::fd::AsFd as _, time::Duration};

use aya::maps::{HashMap, IterableMap as _, Map, MapData, MapError};
use gateway_common::maps::{self, Flow, FlowKey4};

use super::{DatapathError, batch};

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
        let map = HashMap::try_from(Map::LruHashMap(data)).map_err(map_err)?;
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

    /// The entry of `key`, if any.
    pub fn get(&self, key: &FlowKey4) -> Result<Option<Flow>, DatapathError> {
        match self.map.get(key, 0) {
            Ok(f) => Ok(Some(f)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(e)),
        }
    }

    /// Removes every entry whose flow matches `which` (both entries of a connection carry the
    /// same app and backend); returns how many went.
    pub fn remove_where(&mut self, which: impl Fn(&Flow) -> bool) -> Result<usize, DatapathError> {
        let mut keys = Vec::new();
        self.walk(|key, flow| {
            if which(flow) {
                keys.push(*key);
            }
        })?;
        Ok(self.remove(&keys))
    }

    /// Removes the entries of `keys` that are still there; returns how many went.
    fn remove(&mut self, keys: &[FlowKey4]) -> usize {
        keys.iter().filter(|k| self.map.remove(k).is_ok()).count()
    }

    /// One pass over the table: removes flows idle for longer than their state's timeout (both
    /// entries of each) and counts the connections that remain.
    pub fn scan(&mut self, now_ns: u64, timeouts: &Timeouts) -> Result<Scan, DatapathError> {
        let mut counts = ConnectionCounts::default();
        let mut expired = Vec::new();
        self.walk(|key, flow| {
            if timeouts.expired(flow, now_ns) {
                expired.extend([*key, flow.peer_key()]);
            } else {
                counts.add(flow);
            }
        })?;
        // Each expired pair is listed twice (once from each entry): removed once.
        let removed = self.remove(&expired);
        Ok(Scan { counts, removed })
    }
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
}

impl Timeouts {
    /// Whether `flow` has been idle for longer than its state allows at `now_ns`.
    pub fn expired(&self, flow: &Flow, now_ns: u64) -> bool {
        let idle = Duration::from_nanos(now_ns.saturating_sub(flow.last_seen_ns));
        let limit = if maps::is_closed(flow.state) {
            self.closed
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
        }
    }
}

/// Open connections per app and backend id, from a walk of the conntrack table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectionCounts {
    pub apps: std::collections::HashMap<u32, u64>,
    pub backends: std::collections::HashMap<u32, u64>,
    /// Conntrack entries in use (two per connection).
    pub entries: u64,
}

impl ConnectionCounts {
    /// Counts one conntrack entry.
    fn add(&mut self, flow: &Flow) {
        self.entries += 1;
        if flow.direction == maps::DIR_FORWARD && !maps::is_closed(flow.state) {
            *self.apps.entry(flow.app_id).or_default() += 1;
            *self.backends.entry(flow.backend_id).or_default() += 1;
        }
    }
}
