//! An upgrade that keeps every connection: carrying the conntrack over from an earlier
//! release's table into this build's ([`maps::CONNTRACK4`]), as Cilium does when its CT layout
//! changes: [`maps::CONNTRACK4_V2`] (an LRU hash of values of [`maps::FLOW_V2_SIZE`] bytes:
//! everything but the SYN proxy's `seq_delta`, which is 0 for them) or [`maps::CONNTRACK4_V1`]
//! (values of [`maps::FLOW_V1_SIZE`] bytes, no sequence tracking).
//!
//! The old programs keep running on the old table, in the pinned links, until this build's are
//! swapped in. So the entries are copied twice: all of them into the new table at load, and
//! after the swap those the new table still lacks (`BPF_NOEXIST`: connections the old programs
//! opened meanwhile). Once the old programs are gone nothing writes the old table: its pin, and
//! those of the other [`maps::RETIRED`] maps, are removed. A start that finds the old table beside
//! a reused new one (an upgrade interrupted between those steps) finishes it the same way.

use std::path::Path;

use aya::maps::MapData;
use gateway_common::maps::{
    self, FLOW_V1_SIZE, FLOW_V2_SIZE, Flow, FlowKey4, TCP_MAX_WSCALE, TRACK_LIBERAL,
};

use super::{Conntrack, Datapath, DatapathError, batch, check_pinned_layout, map_err};

/// A value of the previous release's conntrack table: the first [`FLOW_V1_SIZE`] bytes of a
/// [`Flow`] (everything up to its sequence tracking).
pub type FlowV1 = [u8; FLOW_V1_SIZE];

/// The entry of this build's table for the old table's value `v1`: its bytes kept, sequence
/// tracking not known yet ([`TRACK_LIBERAL`]: the datapath learns it from the entry's next
/// packet, within the widest bounds, both window scales [`TCP_MAX_WSCALE`]), the other tracking
/// fields zero.
fn carried_over(v1: &FlowV1) -> Flow {
    let mut bytes = [0u8; size_of::<Flow>()];
    bytes[..FLOW_V1_SIZE].copy_from_slice(v1);
    let mut flow: Flow = bytemuck::cast(bytes);
    flow.track = TRACK_LIBERAL;
    flow.wscale = TCP_MAX_WSCALE;
    flow.peer_wscale = TCP_MAX_WSCALE;
    flow
}

/// A value of the previous release's conntrack table: the first [`FLOW_V2_SIZE`] bytes of a
/// [`Flow`].
pub type FlowV2 = [u8; FLOW_V2_SIZE];

/// The entry of this build's table for the v2 value `v2`: its bytes kept, the rest zero (a
/// flow of that release was never proxied).
fn carried_over_v2(v2: &FlowV2) -> Flow {
    let mut bytes = [0u8; size_of::<Flow>()];
    bytes[..FLOW_V2_SIZE].copy_from_slice(v2);
    bytemuck::cast(bytes)
}

/// The earlier layouts a conntrack table is carried over from, newest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OldLayout {
    /// [`maps::CONNTRACK4_V2`]: [`FlowV2`] values, in an LRU hash.
    V2,
    /// [`maps::CONNTRACK4_V1`]: [`FlowV1`] values.
    V1,
}

impl OldLayout {
    fn name(self) -> &'static str {
        match self {
            OldLayout::V2 => maps::CONNTRACK4_V2,
            OldLayout::V1 => maps::CONNTRACK4_V1,
        }
    }

    fn value_size(self) -> usize {
        match self {
            OldLayout::V2 => FLOW_V2_SIZE,
            OldLayout::V1 => FLOW_V1_SIZE,
        }
    }
}

/// An earlier release's conntrack table, pinned in the pin directory.
pub(super) struct OldTable {
    map: MapData,
    layout: OldLayout,
}

impl OldTable {
    /// The old table pinned in `dir`, if there is one (the newest layout first). One of another
    /// layout than its name says is refused ([`DatapathError::PinnedLayout`]) and left as it is.
    pub fn find(dir: &Path) -> Result<Option<OldTable>, DatapathError> {
        for layout in [OldLayout::V2, OldLayout::V1] {
            let name = layout.name();
            let path = dir.join(name);
            if !path.exists() {
                continue;
            }
            check_pinned_layout(name, &path, (size_of::<FlowKey4>(), layout.value_size()))?;
            let map = MapData::from_pin(&path).map_err(map_err(name))?;
            return Ok(Some(OldTable { map, layout }));
        }
        Ok(None)
    }

    /// The old table's pin name.
    pub fn name(&self) -> &'static str {
        self.layout.name()
    }

    /// Copies every entry `into` does not have (see [`carried_over_v2`] and [`carried_over`]);
    /// returns how many.
    pub fn copy_into(&self, into: &mut Conntrack) -> Result<usize, DatapathError> {
        let mut entries = Vec::new();
        let walk_err = |source| DatapathError::Walk {
            name: self.layout.name(),
            source,
        };
        match self.layout {
            OldLayout::V2 => batch::for_each(self.map.fd(), |key: &FlowKey4, value: &FlowV2| {
                entries.push((*key, carried_over_v2(value)));
            }),
            OldLayout::V1 => batch::for_each(self.map.fd(), |key: &FlowKey4, value: &FlowV1| {
                entries.push((*key, carried_over(value)));
            }),
        }
        .map_err(walk_err)?;
        let mut copied = 0;
        for (key, flow) in entries {
            copied += usize::from(into.insert_new(key, flow)?);
        }
        Ok(copied)
    }
}

/// What finishing an upgrade did ([`Datapath::finish_upgrade`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Upgrade {
    /// Conntrack entries carried over from the old table (two per connection): at load and
    /// after the swap together.
    pub carried_over: usize,
    /// Of those, the entries copied after the swap (opened by the old programs meanwhile).
    pub after_swap: usize,
    /// The pins of retired maps removed (the old table's among them).
    pub removed: Vec<String>,
    /// The old table's pin name, if there was one.
    pub from: Option<&'static str>,
}

impl Datapath {
    /// Finishes carrying the conntrack over from the previous release's table, once this
    /// build's programs are in the pinned links (after [`Datapath::attach`]): copies the old
    /// table's entries that the new one lacks, then removes the pins of [`maps::RETIRED`]
    /// maps. Without a pin directory, or with nothing retired pinned there, does nothing.
    pub fn finish_upgrade(&mut self) -> Result<Upgrade, DatapathError> {
        let mut upgrade = Upgrade::default();
        if let Some(old) = &self.old_table {
            upgrade.from = Some(old.name());
            upgrade.after_swap = old.copy_into(&mut self.maps.conntrack)?;
            upgrade.carried_over = self.carried_at_load + upgrade.after_swap;
            // Only once copied: after a failed copy, another call copies again, and the old
            // table's pin stays until then.
            self.old_table = None;
        }
        let Some(dir) = &self.pin_dir else {
            return Ok(upgrade);
        };
        for name in maps::RETIRED {
            let path = dir.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => upgrade.removed.push((*name).to_owned()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(DatapathError::RemovePin { path, source }),
            }
        }
        Ok(upgrade)
    }
}

#[cfg(test)]
mod tests {
    use gateway_common::maps::{CT_ESTABLISHED, DIR_REVERSE, TRACK_ACK_SEEN};

    use super::*;

    #[test]
    fn a_carried_over_entry_keeps_its_80_bytes_and_tracks_liberally() {
        let old = Flow {
            nat_src_ip: u32::from_ne_bytes([203, 0, 113, 10]),
            nat_dst_ip: u32::from_ne_bytes([192, 0, 2, 2]),
            nat_src_port: 20_000u16.to_be(),
            nat_dst_port: 40_000u16.to_be(),
            app_id: 7,
            backend_id: 3,
            direction: DIR_REVERSE,
            state: CT_ESTABLISHED,
            created_ns: 1,
            last_seen_ns: 2,
            nexthop_ns: 3,
            nexthop_ifindex: 4,
            nexthop_smac: [1, 2, 3, 4, 5, 6],
            nexthop_dmac: [7, 8, 9, 10, 11, 12],
            packets: 13,
            bytes: 14,
            // What a v1 value cannot hold: dropped by the truncation below.
            seq_end: 99,
            ack_max: 98,
            win_max: 97,
            wscale: 3,
            peer_wscale: 4,
            track: TRACK_ACK_SEEN,
            toa: 0,
            ..Flow::default()
        };
        let bytes: [u8; 104] = bytemuck::cast(old);
        let v1: FlowV1 = bytes[..FLOW_V1_SIZE].try_into().unwrap();

        let new = carried_over(&v1);
        let new_bytes: [u8; 104] = bytemuck::cast(new);
        assert_eq!(
            new_bytes[..FLOW_V1_SIZE],
            v1,
            "the v1 bytes are kept as they are"
        );
        assert_eq!(
            Flow {
                seq_end: 99,
                ack_max: 98,
                win_max: 97,
                wscale: 3,
                peer_wscale: 4,
                track: TRACK_ACK_SEEN,
                ..new
            },
            old,
            "the same flow but for the tracking"
        );
        assert_eq!(
            (new.seq_end, new.ack_max, new.win_max, new.toa),
            (0, 0, 0, 0)
        );
        assert_eq!(new.track, TRACK_LIBERAL);
        assert_eq!((new.wscale, new.peer_wscale), (14, 14));
    }
}
