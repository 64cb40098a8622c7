//! One owner for the datapath: it loads the embedded eBPF object, attaches its programs to
//! interfaces in XDP or TC (tcx) mode, and reads its maps. Everything else asks it.
//!
//! This file: loading, the configuration, services, Maglev tables and backends. Beside it:
//! `attach` (attach modes, links, pins), `conntrack` (the table, read in batches by `batch`),
//! `upgrade` (carrying the table over from the previous release's layout), `stats` (the
//! counters), `error`, and behind the `testing` feature `testing` (what only tests and
//! benchmarks use).

mod attach;
mod batch;
mod conntrack;
mod elem;
mod error;
mod stats;
#[cfg(feature = "testing")]
mod testing;
mod upgrade;

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap},
    programs::{Program, ProgramError, SchedClassifier, Xdp},
};
use gateway_common::{
    maps::{
        self, ADDR_PUBLIC, ADDR_SNAT, AppConfig, BACKEND_ACCEPTING, Backend4, Config, Flow,
        FlowKey4, MAGLEV_SIZE, MaglevTable, Service, ServiceKey4, TrafficStats,
    },
    net::ip_to_net,
};

pub use attach::{AttachMode, Attachment, UnknownAttachMode, prune_links, remove_pins};
pub use conntrack::{
    Connection, ConnectionCounts, Conntrack, Expired, Phase, Phases, Scan, Timeouts,
};
pub use error::DatapathError;
pub use stats::GlobalStats;
#[cfg(feature = "testing")]
pub use testing::{BENCH_PROGRAMS, BenchObject};
pub use upgrade::{FlowV1, FlowV2, Upgrade};

use crate::maglev;

/// Name of the XDP program in the eBPF object.
pub const XDP_PROGRAM: &str = "gateway_xdp";
/// Name of the TC program in the eBPF object.
pub const TC_PROGRAM: &str = "gateway_tc";

/// Options for loading the datapath.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Conntrack entries (a connection takes two). A reused pinned table keeps its own size.
    pub conntrack_capacity: u32,
    /// A directory on a bpffs where every map is pinned under its name. Maps already pinned
    /// there are reused (a restart keeps the conntrack and every setting); a pinned map whose
    /// layout differs from this build's is refused with [`DatapathError::PinnedLayout`], never
    /// silently replaced. Map names carry a version that changes with their layout. The
    /// previous release's conntrack, pinned there, is carried over into this build's
    /// (`upgrade`; finished by [`Datapath::finish_upgrade`]).
    pub pin_dir: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            conntrack_capacity: maps::CONNTRACK_DEFAULT,
            pin_dir: None,
        }
    }
}

/// The current time on the datapath's clock (`bpf_ktime_get_coarse_ns`:
/// CLOCK_MONOTONIC_COARSE), in ns.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// How far the datapath's clock (CLOCK_MONOTONIC_COARSE) moves at once: a tick (ns).
pub fn clock_tick_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_getres writes the timespec it is given.
    if unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut ts) } != 0 {
        // The longest tick Linux has (HZ=100).
        return 10_000_000;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Every map's name with the key and value sizes this build gives it.
const LAYOUTS: &[(&str, usize, usize); 18] = &[
    (maps::GLOBAL_STATS, 4, size_of::<u64>()),
    (maps::CONFIG, 4, size_of::<Config>()),
    (
        maps::SERVICES4,
        size_of::<ServiceKey4>(),
        size_of::<Service>(),
    ),
    (maps::APP_CONFIG, 4, size_of::<AppConfig>()),
    (maps::MAGLEV, 4, size_of::<MaglevTable>()),
    (maps::BACKENDS4, 4, size_of::<Backend4>()),
    (maps::CONNTRACK4, size_of::<FlowKey4>(), size_of::<Flow>()),
    (maps::APP_STATS, 4, size_of::<TrafficStats>()),
    (maps::BACKEND_STATS, 4, size_of::<TrafficStats>()),
    (maps::HALF_OPEN, 4, 8),
    (maps::COOKIES, 4, 8),
    (maps::CLOCK, 4, size_of::<maps::ClockCache>()),
    (maps::NEXTHOPS, 4, size_of::<maps::NextHopCache>()),
    (maps::SCRATCH, 4, size_of::<Flow>()),
    (maps::PARTIAL_CSUM, 4, size_of::<u64>()),
    (maps::ICMP_BUCKETS, 4, size_of::<maps::IcmpBucket>()),
    (maps::RATE_LIMITS, 4, size_of::<maps::RateLimit>()),
    (maps::RATE_DROPS, 4, 8),
];

/// The typed maps.
struct Maps {
    global: PerCpuArray<MapData, u64>,
    config: Array<MapData, Config>,
    services: HashMap<MapData, ServiceKey4, Service>,
    app_config: Array<MapData, AppConfig>,
    maglev: HashMap<MapData, u32, MaglevTable>,
    backends: Array<MapData, Backend4>,
    conntrack: Conntrack,
    app_stats: PerCpuArray<MapData, TrafficStats>,
    backend_stats: PerCpuArray<MapData, TrafficStats>,
    half_open: Array<MapData, i64>,
    partial_csum: PerCpuHashMap<MapData, u32, u64>,
    rate_limits: Array<MapData, maps::RateLimit>,
    rate_drops: PerCpuArray<MapData, u64>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DatapathError::MissingMap { name })?;
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

/// Checks that map `name` pinned at `path` has this build's layout, `expected` key and value
/// sizes: one of another layout is refused ([`DatapathError::PinnedLayout`]) and left as it is.
fn check_pinned_layout(
    name: &'static str,
    path: &Path,
    expected: (usize, usize),
) -> Result<(), DatapathError> {
    let info = aya::maps::MapInfo::from_pin(path).map_err(map_err(name))?;
    let found = (info.key_size() as usize, info.value_size() as usize);
    if found != expected {
        return Err(DatapathError::PinnedLayout {
            name,
            path: path.to_owned(),
            expected,
            found,
        });
    }
    Ok(())
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}

/// The loaded datapath: its programs, attachments and maps. The one owner of the maps:
/// everything else asks it.
pub struct Datapath {
    ebpf: Ebpf,
    conntrack_capacity: u32,
    maps: Maps,
    attachments: Vec<Attachment>,
    reused: Vec<&'static str>,
    /// Where the maps are pinned, if they are (the benchmark object shares them from there).
    pin_dir: Option<PathBuf>,
    /// The previous release's conntrack, until [`Datapath::finish_upgrade`].
    old_table: Option<upgrade::OldTable>,
    /// Entries carried over from it at load.
    carried_at_load: usize,
}

impl Datapath {
    /// Loads the embedded eBPF object and both of its programs into the kernel.
    pub fn load() -> Result<Self, DatapathError> {
        Self::load_with(&LoadOptions::default())
    }

    /// Loads with `options`.
    pub fn load_with(options: &LoadOptions) -> Result<Self, DatapathError> {
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(maps::CONNTRACK4, options.conntrack_capacity);
        let mut reused = Vec::new();
        let old_table = match &options.pin_dir {
            Some(dir) => upgrade::OldTable::find(dir)?,
            None => None,
        };
        if let Some(dir) = &options.pin_dir {
            for &(name, key_size, value_size) in LAYOUTS {
                let path = dir.join(name);
                if path.exists() {
                    check_pinned_layout(name, &path, (key_size, value_size))?;
                    reused.push(name);
                }
                loader.map_pin_path(name, path);
            }
        }
        let mut ebpf = loader
            .load(crate::EBPF_OBJECT)
            .map_err(DatapathError::Load)?;
        let mut maps = Maps {
            global: take(&mut ebpf, maps::GLOBAL_STATS)?,
            config: take(&mut ebpf, maps::CONFIG)?,
            services: take(&mut ebpf, maps::SERVICES4)?,
            app_config: take(&mut ebpf, maps::APP_CONFIG)?,
            maglev: take(&mut ebpf, maps::MAGLEV)?,
            backends: take(&mut ebpf, maps::BACKENDS4)?,
            conntrack: Conntrack::new(take(&mut ebpf, maps::CONNTRACK4)?),
            app_stats: take(&mut ebpf, maps::APP_STATS)?,
            backend_stats: take(&mut ebpf, maps::BACKEND_STATS)?,
            half_open: take(&mut ebpf, maps::HALF_OPEN)?,
            partial_csum: take(&mut ebpf, maps::PARTIAL_CSUM)?,
            rate_limits: take(&mut ebpf, maps::RATE_LIMITS)?,
            rate_drops: take(&mut ebpf, maps::RATE_DROPS)?,
        };
        // Programs after maps: a reused map of the wrong layout is reported by its name above,
        // rather than as a verifier error here.
        for mode in AttachMode::ALL {
            let name = mode.program_name();
            let program = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram { name })?;
            let loaded = match mode {
                AttachMode::Xdp => {
                    <&mut Xdp>::try_from(program).and_then(|p| retry_eagain(|| p.load()))
                }
                AttachMode::Tc => <&mut SchedClassifier>::try_from(program)
                    .and_then(|p| retry_eagain(|| p.load())),
            };
            loaded.map_err(|source| DatapathError::ProgramLoad { name, source })?;
        }
        // Carried over after the programs' verification (the slow part of a load), as close
        // to the swap as loading gets: what the old programs change in copied entries until
        // the swap is lost (the copy after it adds only missing entries).
        let carried_at_load = match &old_table {
            Some(old) => old.copy_into(&mut maps.conntrack)?,
            None => 0,
        };
        let conntrack_capacity = maps
            .conntrack
            .capacity()
            .unwrap_or(options.conntrack_capacity);
        Ok(Self {
            ebpf,
            conntrack_capacity,
            maps,
            attachments: Vec::new(),
            reused,
            pin_dir: options.pin_dir.clone(),
            old_table,
            carried_at_load,
        })
    }

    /// The instructions the verifier processed for each program (`verified_insns`, Linux
    /// ≥ 5.16; `None` on older kernels): what a change to the datapath costs at load, and how
    /// close each program is to the verifier's limit of one million.
    pub fn verified_instructions(&self) -> Result<Vec<(&'static str, Option<u32>)>, DatapathError> {
        [XDP_PROGRAM, TC_PROGRAM]
            .into_iter()
            .map(|name| {
                let program = self
                    .ebpf
                    .program(name)
                    .ok_or(DatapathError::MissingProgram { name })?;
                let info = program
                    .info()
                    .map_err(|source| DatapathError::ProgramLoad { name, source })?;
                Ok((name, info.verified_instruction_count()))
            })
            .collect()
    }

    /// The maps that were found pinned and reused at load.
    pub fn reused_maps(&self) -> &[&'static str] {
        &self.reused
    }

    /// The XDP program (for attaching, or for BPF_PROG_TEST_RUN).
    pub fn xdp(&mut self) -> Result<&mut Xdp, DatapathError> {
        self.program(XDP_PROGRAM)
    }

    /// The TC program (for attaching, or for BPF_PROG_TEST_RUN).
    pub fn tc(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        self.program(TC_PROGRAM)
    }

    fn program<'a, P>(&'a mut self, name: &'static str) -> Result<&'a mut P, DatapathError>
    where
        &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
    {
        program(&mut self.ebpf, name)
    }

    /// Sets the SNAT address and source port range for new flows.
    pub fn configure(
        &mut self,
        snat_ip: Ipv4Addr,
        ports: std::ops::RangeInclusive<u16>,
        nexthop_max_age: Duration,
    ) -> Result<(), DatapathError> {
        let (min, max) = (*ports.start(), *ports.end());
        if min > max || min == 0 {
            return Err(DatapathError::EmptyPortRange { min, max });
        }
        let mut config = self.config()?;
        config.snat_ip = ip_to_net(snat_ip);
        config.snat_port_min = min;
        config.snat_port_max = max;
        config.nexthop_max_age_ns = nexthop_max_age.as_nanos() as u64;
        // All apps' half-open flows together: at most a quarter of the table and half the
        // SNAT range (toward one backend, the ports a flood to one app can take), so that
        // neither fills before the SYN cookies start.
        let ports = u32::from(max - min) + 1;
        config.half_open_global_max = (self.conntrack_capacity / 4).min(ports / 2).max(1);
        if config.cookie_key == [0; 2] {
            // Once per table: a reused configuration keeps its key, and the cookies it gave.
            config.cookie_key = random_key()?;
        }
        self.write_config(config)?;
        self.add_address(snat_ip, ADDR_SNAT)
    }

    /// Sets how many half-open flows an app may have before its SYNs get SYN cookies
    /// (`Config::half_open_max`; 0: the default, [`maps::HALF_OPEN_MAX_DEFAULT`]).
    pub fn set_half_open_max(&mut self, max: u32) -> Result<(), DatapathError> {
        let mut config = self.config()?;
        config.half_open_max = max;
        self.write_config(config)
    }

    /// Sets how many half-open flows all apps together may have before every app's SYNs get
    /// SYN cookies (`Config::half_open_global_max`; 0: no such cap). [`Datapath::configure`]
    /// sets a quarter of the table and half the SNAT range.
    pub fn set_half_open_global_max(&mut self, max: u32) -> Result<(), DatapathError> {
        let mut config = self.config()?;
        config.half_open_global_max = max;
        self.write_config(config)
    }

    /// The half-open flows of app `app_id` as the datapath counts them ([`maps::HALF_OPEN`]);
    /// app 0: all apps together.
    pub fn half_open(&self, app_id: u32) -> Result<i64, DatapathError> {
        if app_id != 0 {
            check_id("app", app_id, maps::MAX_APPS)?;
        }
        self.maps
            .half_open
            .get(&app_id, 0)
            .map_err(map_err(maps::HALF_OPEN))
    }

    /// Sets the half-open flows of app `app_id` to `n` (the exact count a scan found; the
    /// datapath counts on from there); app 0: all apps together.
    pub fn set_half_open(&mut self, app_id: u32, n: i64) -> Result<(), DatapathError> {
        if app_id != 0 {
            check_id("app", app_id, maps::MAX_APPS)?;
        }
        self.maps
            .half_open
            .set(app_id, n, 0)
            .map_err(map_err(maps::HALF_OPEN))
    }

    /// Sets how many ICMP errors about one connection (and direction) the datapath translates
    /// per second and CPU, at most (`Config::icmp_rate`). 0: ICMP errors are not translated
    /// (handed to the kernel unchanged).
    pub fn set_icmp_rate(&mut self, per_second: u32) -> Result<(), DatapathError> {
        let mut config = self.config()?;
        config.icmp_rate = per_second;
        self.write_config(config)
    }

    /// Sets app `app_id`'s datapath settings ([`maps::APP_CONFIG`]; all zero: none).
    pub fn set_app_config(&mut self, app_id: u32, config: AppConfig) -> Result<(), DatapathError> {
        check_id("app", app_id, maps::MAX_APPS)?;
        self.maps
            .app_config
            .set(app_id, config, 0)
            .map_err(map_err(maps::APP_CONFIG))
    }

    /// Backend `backend_id`'s packet rate limit in `direction` (`maps::RATE_TO_BACKEND`,
    /// `RATE_FROM_BACKEND`): `pps` packets per second in bursts of `burst`, or none (issue 18).
    /// A new limit starts with a whole burst. Its tolerance is at least a tick of the
    /// datapath's clock (`RateLimit::with_tick`).
    pub fn set_rate_limit(
        &mut self,
        backend_id: u32,
        direction: u32,
        limit: Option<(u32, u32)>,
    ) -> Result<(), DatapathError> {
        check_id("backend", backend_id, maps::MAX_BACKENDS)?;
        let value = limit.map_or(maps::RateLimit::default(), |(pps, burst)| {
            maps::RateLimit::new(pps, burst).with_tick(clock_tick_ns())
        });
        self.maps
            .rate_limits
            .set(maps::rate_slot(backend_id, direction), value, 0)
            .map_err(map_err(maps::RATE_LIMITS))
    }

    /// Backend `backend_id`'s limit in `direction` as the datapath holds it.
    pub fn rate_limit(
        &self,
        backend_id: u32,
        direction: u32,
    ) -> Result<maps::RateLimit, DatapathError> {
        check_id("backend", backend_id, maps::MAX_BACKENDS)?;
        self.maps
            .rate_limits
            .get(&maps::rate_slot(backend_id, direction), 0)
            .map_err(map_err(maps::RATE_LIMITS))
    }

    /// Packets of backend `backend_id` dropped over its limit in `direction` (all CPUs).
    pub fn rate_drops(&self, backend_id: u32, direction: u32) -> Result<u64, DatapathError> {
        check_id("backend", backend_id, maps::MAX_BACKENDS)?;
        let values = self
            .maps
            .rate_drops
            .get(&maps::rate_slot(backend_id, direction), 0)
            .map_err(map_err(maps::RATE_DROPS))?;
        Ok(values.iter().sum())
    }

    /// App `app_id`'s datapath settings.
    pub fn app_config(&self, app_id: u32) -> Result<AppConfig, DatapathError> {
        check_id("app", app_id, maps::MAX_APPS)?;
        self.maps
            .app_config
            .get(&app_id, 0)
            .map_err(map_err(maps::APP_CONFIG))
    }

    fn config(&self) -> Result<Config, DatapathError> {
        self.maps.config.get(&0, 0).map_err(map_err(maps::CONFIG))
    }

    fn write_config(&mut self, config: Config) -> Result<(), DatapathError> {
        self.maps
            .config
            .set(0, config, 0)
            .map_err(map_err(maps::CONFIG))
    }

    /// Declares `ip` as one of the gateway's addresses (`ADDR_PUBLIC` and/or `ADDR_SNAT` bits,
    /// added to what it already is). At most `MAX_ADDRS` addresses.
    pub fn add_address(&mut self, ip: Ipv4Addr, kind: u32) -> Result<(), DatapathError> {
        let mut config = self.config()?;
        put_address(&mut config, ip, kind)?;
        self.write_config(config)
    }

    /// Sets backend `id` (1..MAX_BACKENDS) to `addr`; `accepting` says whether new flows may
    /// choose it.
    pub fn set_backend(
        &mut self,
        id: u32,
        addr: SocketAddrV4,
        accepting: bool,
    ) -> Result<(), DatapathError> {
        check_id("backend", id, maps::MAX_BACKENDS)?;
        let value = Backend4::new(addr, if accepting { BACKEND_ACCEPTING } else { 0 });
        self.maps
            .backends
            .set(id, value, 0)
            .map_err(map_err(maps::BACKENDS4))
    }

    /// Writes app `app_id`'s Maglev table over `backends` (the ones that accept new flows) in
    /// one map update. An empty list makes every new flow of the app fail with `no_backend`.
    pub fn set_app_backends(
        &mut self,
        app_id: u32,
        backends: &[maglev::Entry],
    ) -> Result<(), DatapathError> {
        check_id("app", app_id, maps::MAX_APPS)?;
        let slots = maglev::table(backends);
        let mut table = MaglevTable {
            slots: [0; MAGLEV_SIZE as usize],
        };
        table.slots.copy_from_slice(&slots);
        self.maps
            .maglev
            .insert(app_id, table, 0)
            .map_err(map_err(maps::MAGLEV))
    }

    /// App `app_id`'s Maglev table, if it has one.
    pub fn app_table(&self, app_id: u32) -> Result<Option<Vec<u32>>, DatapathError> {
        match self.maps.maglev.get(&app_id, 0) {
            Ok(t) => Ok(Some(t.slots.to_vec())),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(maps::MAGLEV)(e)),
        }
    }

    /// Routes TCP to `public` to app `app_id` (and declares the address public).
    pub fn set_service(&mut self, public: SocketAddrV4, app_id: u32) -> Result<(), DatapathError> {
        check_id("app", app_id, maps::MAX_APPS)?;
        self.add_address(*public.ip(), ADDR_PUBLIC)?;
        self.maps
            .services
            .insert(ServiceKey4::from_addr(public), Service { app_id }, 0)
            .map_err(map_err(maps::SERVICES4))
    }

    /// Stops routing `public` (its flows are left to end or expire).
    pub fn remove_service(&mut self, public: SocketAddrV4) -> Result<(), DatapathError> {
        match self.maps.services.remove(&ServiceKey4::from_addr(public)) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(maps::SERVICES4)(e)),
        }
    }

    /// Replaces the gateway's address list (public and SNAT bits) in one map update, so
    /// that no packet sees an address missing while it changes.
    pub fn set_addresses(&mut self, addrs: &[(Ipv4Addr, u32)]) -> Result<(), DatapathError> {
        let mut config = self.config()?;
        config.addrs = [0; maps::MAX_ADDRS];
        config.addr_kinds = [0; maps::MAX_ADDRS];
        for &(ip, kind) in addrs {
            put_address(&mut config, ip, kind)?;
        }
        self.write_config(config)
    }

    /// Every service: public address and app id.
    pub fn services(&self) -> Result<Vec<(SocketAddrV4, u32)>, DatapathError> {
        self.maps
            .services
            .iter()
            .map(|r| r.map(|(k, v)| (k.addr(), v.app_id)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(maps::SERVICES4))
    }

    /// The apps that have a Maglev table.
    pub fn app_ids(&self) -> Result<Vec<u32>, DatapathError> {
        self.maps
            .maglev
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(maps::MAGLEV))
    }

    /// Removes app `app_id`'s Maglev table.
    pub fn remove_app_table(&mut self, app_id: u32) -> Result<(), DatapathError> {
        match self.maps.maglev.remove(&app_id) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(maps::MAGLEV)(e)),
        }
    }

    /// Ends every connection whose flow matches `which` (both entries of a connection carry
    /// the same app and backend): calls `before` on each (to reset its ends), then removes both
    /// of its entries. Returns how many connections were ended.
    pub fn end_connections(
        &mut self,
        which: impl Fn(&Flow) -> bool,
        before: impl FnMut(&Connection),
    ) -> Result<usize, DatapathError> {
        self.maps.conntrack.end_where(which, before)
    }

    /// The conntrack table.
    pub fn conntrack(&self) -> &Conntrack {
        &self.maps.conntrack
    }

    /// The conntrack table's capacity (entries).
    pub fn conntrack_capacity(&self) -> u32 {
        self.conntrack_capacity
    }

    /// Every conntrack entry.
    pub fn flows(&self) -> Result<Vec<(FlowKey4, Flow)>, DatapathError> {
        self.maps.conntrack.entries()
    }

    /// The entry of `key`, if any.
    pub fn flow(&self, key: &FlowKey4) -> Result<Option<Flow>, DatapathError> {
        self.maps.conntrack.get(key)
    }

    /// Expires idle flows and counts the rest (see [`Conntrack::scan`]).
    pub fn scan(&mut self, now_ns: u64, timeouts: &Timeouts) -> Result<Scan, DatapathError> {
        self.maps.conntrack.scan(now_ns, timeouts)
    }
}

/// Program `name` of `ebpf`, as a `P`.
fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, DatapathError>
where
    &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram { name })?;
    program
        .try_into()
        .map_err(|source| DatapathError::ProgramLoad { name, source })
}

/// Adds `kind` to `ip`'s slot in `config` (taking a free slot for a new address).
fn put_address(config: &mut Config, ip: Ipv4Addr, kind: u32) -> Result<(), DatapathError> {
    let key = ip_to_net(ip);
    let slot = config
        .addrs
        .iter()
        .position(|&a| a == key)
        .or_else(|| config.addrs.iter().position(|&a| a == 0))
        .ok_or(DatapathError::TooManyAddresses {
            max: maps::MAX_ADDRS,
        })?;
    config.addrs[slot] = key;
    config.addr_kinds[slot] |= kind;
    Ok(())
}

/// A key for the SYN cookies' SipHash, from the kernel's random source (`getrandom(2)`).
fn random_key() -> Result<[u64; 2], DatapathError> {
    let mut key = [0u64; 2];
    // SAFETY: writes at most 16 bytes into `key`.
    let n = unsafe { libc::getrandom(key.as_mut_ptr().cast(), 16, 0) };
    if n != 16 {
        return Err(DatapathError::Random(std::io::Error::last_os_error()));
    }
    Ok(key)
}

fn check_id(what: &'static str, id: u32, max: u32) -> Result<(), DatapathError> {
    if id == 0 || id >= max {
        return Err(DatapathError::IdOutOfRange { what, id, max });
    }
    Ok(())
}

/// Loads a program, again while the kernel answers EAGAIN: the verifier gives up when a
/// signal is pending during a long verification (`do_check`), as libbpf's
/// `sys_bpf_prog_load` knows and retries (5 attempts).
pub(crate) fn retry_eagain(
    mut load: impl FnMut() -> Result<(), ProgramError>,
) -> Result<(), ProgramError> {
    let mut attempt = 1;
    loop {
        match load() {
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.kind() == std::io::ErrorKind::WouldBlock && attempt < 5 =>
            {
                attempt += 1;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_map_has_a_checked_layout() {
        let names: Vec<&str> = LAYOUTS.iter().map(|l| l.0).collect();
        assert_eq!(names, maps::ALL);
    }

    #[test]
    fn the_gateway_object_holds_its_two_programs_and_no_benchmark_one() {
        // Program names are symbols of the ELF object: the benchmark's are `bench_*`, in an
        // object of their own (`gateway-bench`).
        let has = |name: &str| {
            crate::EBPF_OBJECT
                .windows(name.len())
                .any(|w| w == name.as_bytes())
        };
        assert!(has(XDP_PROGRAM) && has(TC_PROGRAM));
        assert!(
            !has("bench_"),
            "a benchmark program is in the gateway object"
        );
    }
}
