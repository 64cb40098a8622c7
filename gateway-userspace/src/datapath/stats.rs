//! The datapath's counters, summed over CPUs: global ones and drop reasons, traffic per app
//! and per backend.

use aya::maps::{MapData, PerCpuArray, PerCpuValues};
use gateway_common::{
    DropReason, GlobalStat,
    maps::{self, TrafficStats},
};

use super::{Datapath, DatapathError, map_err};

impl Datapath {
    /// The global counters, summed over CPUs.
    pub fn global_stats(&self) -> Result<GlobalStats, DatapathError> {
        let err = map_err(maps::GLOBAL_STATS);
        let mut slots = vec![0u64; maps::GLOBAL_STATS_LEN as usize];
        for (i, slot) in slots.iter_mut().enumerate() {
            *slot = self
                .maps
                .global
                .get(&(i as u32), 0)
                .map_err(&err)?
                .iter()
                .sum();
        }
        Ok(GlobalStats { slots })
    }

    /// Traffic of app `app_id`, summed over CPUs.
    pub fn app_stats(&self, app_id: u32) -> Result<TrafficStats, DatapathError> {
        sum_stats(&self.maps.app_stats, app_id, maps::APP_STATS)
    }

    /// Traffic of backend `id`, summed over CPUs.
    pub fn backend_stats(&self, id: u32) -> Result<TrafficStats, DatapathError> {
        sum_stats(&self.maps.backend_stats, id, maps::BACKEND_STATS)
    }

    /// The interfaces (ifindex, in the datapath's namespace) on which the XDP program met
    /// segments with a partial checksum (`partial_checksums`), with how many, summed over CPUs.
    pub fn partial_checksum_ifaces(&self) -> Result<Vec<(u32, u64)>, DatapathError> {
        let err = map_err(maps::PARTIAL_CSUM);
        self.maps
            .partial_csum
            .iter()
            .map(|r| {
                r.map(|(ifindex, n)| (ifindex, n.iter().sum()))
                    .map_err(&err)
            })
            .collect()
    }

    /// Zeroes app `app_id`'s counters (an id handed to a new app).
    pub fn reset_app_stats(&mut self, app_id: u32) -> Result<(), DatapathError> {
        reset_stats(&mut self.maps.app_stats, app_id, maps::APP_STATS)
    }

    /// Zeroes backend `id`'s counters (an id handed to a new backend).
    /// Zeroes backend `id`'s counters: its traffic, and its packets dropped over a rate limit
    /// (both directions), so that a reused id does not start with a removed backend's.
    pub fn reset_backend_stats(&mut self, id: u32) -> Result<(), DatapathError> {
        reset_stats(&mut self.maps.backend_stats, id, maps::BACKEND_STATS)?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Cpus(e))?;
        for direction in [maps::RATE_TO_BACKEND, maps::RATE_FROM_BACKEND] {
            let zeros = PerCpuValues::try_from(vec![0u64; cpus]).map_err(DatapathError::Cpus)?;
            self.maps
                .rate_drops
                .set(maps::rate_slot(id, direction), zeros, 0)
                .map_err(map_err(maps::RATE_DROPS))?;
        }
        Ok(())
    }
}

fn sum_stats(
    map: &PerCpuArray<MapData, TrafficStats>,
    index: u32,
    name: &'static str,
) -> Result<TrafficStats, DatapathError> {
    let values: PerCpuValues<TrafficStats> = map.get(&index, 0).map_err(map_err(name))?;
    let mut total = TrafficStats::default();
    for v in values.iter() {
        total.add(v);
    }
    Ok(total)
}

fn reset_stats(
    map: &mut PerCpuArray<MapData, TrafficStats>,
    index: u32,
    name: &'static str,
) -> Result<(), DatapathError> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Cpus(e))?;
    let zeros =
        PerCpuValues::try_from(vec![TrafficStats::default(); cpus]).map_err(DatapathError::Cpus)?;
    map.set(index, zeros, 0).map_err(map_err(name))
}

/// The global counters, summed over CPUs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GlobalStats {
    slots: Vec<u64>,
}

impl GlobalStats {
    /// The value of a global counter.
    pub fn get(&self, stat: GlobalStat) -> u64 {
        self.slots[stat.index() as usize]
    }

    /// How many packets were dropped for `reason`.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.slots[reason.slot() as usize]
    }

    /// Every counter zero but the drops of `drops` (unit tests of what reads them).
    #[cfg(test)]
    pub(crate) fn with_drops(drops: &[(DropReason, u64)]) -> Self {
        let mut slots = vec![0; maps::GLOBAL_STATS_LEN as usize];
        for (reason, n) in drops {
            slots[reason.slot() as usize] = *n;
        }
        GlobalStats { slots }
    }

    /// Every counter zero but those of `counters` (unit tests of what reads them).
    #[cfg(test)]
    pub(crate) fn with_counters(counters: &[(GlobalStat, u64)]) -> Self {
        let mut slots = vec![0; maps::GLOBAL_STATS_LEN as usize];
        for (stat, n) in counters {
            slots[stat.index() as usize] = *n;
        }
        GlobalStats { slots }
    }
}
