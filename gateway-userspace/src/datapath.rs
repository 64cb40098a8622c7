//! One owner for the datapath: it loads the embedded eBPF object, attaches its programs to
//! interfaces in XDP or TC (tcx) mode, and reads its maps. Everything else asks it.

use std::{
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuValues},
    pin::PinError,
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::TcAttachOptions,
    },
};
use gateway_common::{
    DropReason, GlobalStat,
    maps::{
        self, ADDR_PUBLIC, ADDR_SNAT, BACKEND_ACCEPTING, Backend4, Config, Flow, FlowKey4,
        MAGLEV_SIZE, MaglevTable, Service, ServiceKey4, TrafficStats,
    },
    net::ip_to_net,
};

pub use crate::conntrack::{ConnectionCounts, Conntrack, Scan, Timeouts};
use crate::maglev;

/// Name of the XDP program in the eBPF object.
pub const XDP_PROGRAM: &str = "gateway_xdp";
/// Name of the TC program in the eBPF object.
pub const TC_PROGRAM: &str = "gateway_tc";

/// How the datapath is attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Native XDP (driver mode): for physical NICs.
    Xdp,
    /// TC ingress through tcx: robust on veth and virtual NICs.
    Tc,
}

impl AttachMode {
    /// Both modes, for tests that run the same case in each.
    pub const ALL: [AttachMode; 2] = [AttachMode::Xdp, AttachMode::Tc];

    /// The name of this mode's program in the eBPF object.
    pub const fn program_name(self) -> &'static str {
        match self {
            AttachMode::Xdp => XDP_PROGRAM,
            AttachMode::Tc => TC_PROGRAM,
        }
    }
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachMode::Xdp => "xdp",
            AttachMode::Tc => "tc",
        })
    }
}

impl FromStr for AttachMode {
    type Err = UnknownAttachMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "xdp" => Ok(AttachMode::Xdp),
            "tc" => Ok(AttachMode::Tc),
            other => Err(UnknownAttachMode(other.to_owned())),
        }
    }
}

/// An attach mode that is neither `xdp` nor `tc`.
#[derive(Debug, thiserror::Error)]
#[error("unknown attach mode {0:?}: expected `xdp` or `tc`")]
pub struct UnknownAttachMode(pub String);

/// Errors of the datapath owner.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object failed")]
    Load(#[source] EbpfError),
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("map {name} has an unexpected type or layout")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("reading map {name} failed")]
    Walk {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("program {name} could not be loaded into the kernel")]
    ProgramLoad {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching in {mode} mode to interface {iface} failed")]
    Attach {
        mode: AttachMode,
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("pinning the {mode} link of {iface} at {path} failed")]
    Pin {
        mode: AttachMode,
        iface: String,
        path: PathBuf,
        #[source]
        source: PinError,
    },
    #[error("reading the link of {iface} failed")]
    LinkInfo {
        iface: String,
        #[source]
        source: LinkError,
    },
    #[error("the {mode} link of {iface} cannot be pinned (not a bpf_link)")]
    NotPinnable { mode: AttachMode, iface: String },
    #[error("{what} {id} is out of range (1..{max})")]
    IdOutOfRange {
        what: &'static str,
        id: u32,
        max: u32,
    },
    #[error(
        "the map pinned at {path} has another layout (key, value sizes {found:?}, this build expects {expected:?}): it was left as it is; removing that pin starts afresh, and drops its state"
    )]
    PinnedLayout {
        name: &'static str,
        path: PathBuf,
        expected: (usize, usize),
        found: (usize, usize),
    },
    #[error("the gateway answers for at most {max} addresses (public and SNAT)")]
    TooManyAddresses { max: usize },
    #[error("counting the possible CPUs failed")]
    Cpus(#[source] std::io::Error),
    #[error("the SNAT port range {min}-{max} is empty")]
    EmptyPortRange { min: u16, max: u16 },
}

/// Options for loading the datapath.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Conntrack entries (a connection takes two). A reused pinned table keeps its own size.
    pub conntrack_capacity: u32,
    /// A directory on a bpffs where every map is pinned under its name. Maps already pinned
    /// there are reused (a restart keeps the conntrack and every setting); a pinned map whose
    /// layout differs from this build's is refused with [`DatapathError::Map`], never
    /// silently replaced. Map names carry a version that changes with their layout.
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

/// One attachment: the interface, the mode and the link (pinned or owned by this process).
#[derive(Debug)]
pub struct Attachment {
    pub iface: String,
    pub mode: AttachMode,
    /// The kernel's id of the bpf_link (as `bpftool link show` lists it).
    pub link_id: u32,
    link: Link,
}

#[derive(Debug)]
enum Link {
    /// Detached when this process drops it.
    Owned(#[allow(dead_code, reason = "held to keep the attachment")] FdLink),
    /// Detached when its pin is removed.
    Pinned {
        #[allow(dead_code, reason = "held to keep the pin's path and fd together")]
        link: PinnedLink,
        path: PathBuf,
    },
}

impl Attachment {
    /// Where the link is pinned, if it is.
    pub fn pin_path(&self) -> Option<&Path> {
        match &self.link {
            Link::Owned(_) => None,
            Link::Pinned { path, .. } => Some(path),
        }
    }
}

/// Every map's name with the key and value sizes this build gives it.
const LAYOUTS: &[(&str, usize, usize); 10] = &[
    (maps::GLOBAL_STATS, 4, size_of::<u64>()),
    (maps::CONFIG, 4, size_of::<Config>()),
    (
        maps::SERVICES4,
        size_of::<ServiceKey4>(),
        size_of::<Service>(),
    ),
    (maps::MAGLEV, 4, size_of::<MaglevTable>()),
    (maps::BACKENDS4, 4, size_of::<Backend4>()),
    (maps::CONNTRACK4, size_of::<FlowKey4>(), size_of::<Flow>()),
    (maps::APP_STATS, 4, size_of::<TrafficStats>()),
    (maps::BACKEND_STATS, 4, size_of::<TrafficStats>()),
    (maps::CLOCK, 4, size_of::<maps::ClockCache>()),
    (maps::NEXTHOPS, 4, size_of::<maps::NextHopCache>()),
];

/// The typed maps.
struct Maps {
    global: PerCpuArray<MapData, u64>,
    config: Array<MapData, Config>,
    services: HashMap<MapData, ServiceKey4, Service>,
    maglev: HashMap<MapData, u32, MaglevTable>,
    backends: Array<MapData, Backend4>,
    conntrack: Conntrack,
    app_stats: PerCpuArray<MapData, TrafficStats>,
    backend_stats: PerCpuArray<MapData, TrafficStats>,
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
        if let Some(dir) = &options.pin_dir {
            for &(name, key_size, value_size) in LAYOUTS {
                let path = dir.join(name);
                if path.exists() {
                    let info = aya::maps::MapInfo::from_pin(&path)
                        .map_err(|source| DatapathError::Map { name, source })?;
                    let found = (info.key_size() as usize, info.value_size() as usize);
                    if found != (key_size, value_size) {
                        return Err(DatapathError::PinnedLayout {
                            name,
                            path,
                            expected: (key_size, value_size),
                            found,
                        });
                    }
                    reused.push(name);
                }
                loader.map_pin_path(name, path);
            }
        }
        let mut ebpf = loader
            .load(crate::EBPF_OBJECT)
            .map_err(DatapathError::Load)?;
        let maps = Maps {
            global: take(&mut ebpf, maps::GLOBAL_STATS)?,
            config: take(&mut ebpf, maps::CONFIG)?,
            services: take(&mut ebpf, maps::SERVICES4)?,
            maglev: take(&mut ebpf, maps::MAGLEV)?,
            backends: take(&mut ebpf, maps::BACKENDS4)?,
            conntrack: Conntrack::new(take(&mut ebpf, maps::CONNTRACK4)?),
            app_stats: take(&mut ebpf, maps::APP_STATS)?,
            backend_stats: take(&mut ebpf, maps::BACKEND_STATS)?,
        };
        // Programs after maps: a reused map of the wrong layout is reported by its name above,
        // rather than as a verifier error here.
        for mode in AttachMode::ALL {
            let name = mode.program_name();
            let program = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram { name })?;
            let loaded = match mode {
                AttachMode::Xdp => <&mut Xdp>::try_from(program).and_then(|p| p.load()),
                AttachMode::Tc => <&mut SchedClassifier>::try_from(program).and_then(|p| p.load()),
            };
            loaded.map_err(|source| DatapathError::ProgramLoad { name, source })?;
        }
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
        })
    }

    /// The maps that were found pinned and reused at load.
    pub fn reused_maps(&self) -> &[&'static str] {
        &self.reused
    }

    /// Attaches the datapath to `iface` (in the calling thread's network namespace) in `mode`.
    /// TC attaches at ingress through tcx. XDP attaches in native (driver) mode *and* attaches
    /// the TC program too: XDP hands it what it cannot finish (a next hop whose neighbour is
    /// not resolved yet), and TC's `bpf_redirect_neigh` resolves it. With `pin_dir` (a
    /// directory on a bpffs), links are pinned there and outlive this process: each is
    /// detached by removing its pin.
    pub fn attach(
        &mut self,
        iface: &str,
        mode: AttachMode,
        pin_dir: Option<&Path>,
    ) -> Result<(), DatapathError> {
        if mode == AttachMode::Xdp {
            self.attach_one(iface, AttachMode::Xdp, pin_dir)?;
        }
        self.attach_one(iface, AttachMode::Tc, pin_dir)
    }

    fn attach_one(
        &mut self,
        iface: &str,
        mode: AttachMode,
        pin_dir: Option<&Path>,
    ) -> Result<(), DatapathError> {
        let attach_err = |source| DatapathError::Attach {
            mode,
            iface: iface.to_owned(),
            source,
        };
        let not_pinnable = || DatapathError::NotPinnable {
            mode,
            iface: iface.to_owned(),
        };
        let pin_path = pin_dir.map(|dir| dir.join(link_pin_name(iface, mode)));
        if let Some(path) = pin_path.as_ref().filter(|p| p.exists()) {
            return self.replace_pinned(iface, mode, path);
        }
        let link: FdLink = match mode {
            AttachMode::Xdp => {
                let program = self.xdp()?;
                let id = program.attach(iface, XdpMode::Driver).map_err(attach_err)?;
                let link = program.take_link(id).map_err(attach_err)?;
                FdLink::try_from(link).map_err(|_| not_pinnable())?
            }
            AttachMode::Tc => {
                let program = self.tc()?;
                let id = program
                    .attach_with_options(
                        iface,
                        TcAttachType::Ingress,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .map_err(attach_err)?;
                let link = program.take_link(id).map_err(attach_err)?;
                FdLink::try_from(link).map_err(|_| not_pinnable())?
            }
        };
        let link_id = link
            .info()
            .map_err(|source| DatapathError::LinkInfo {
                iface: iface.to_owned(),
                source,
            })?
            .id();
        let link = match pin_path {
            None => Link::Owned(link),
            Some(path) => {
                let pinned = link.pin(&path).map_err(|source| DatapathError::Pin {
                    mode,
                    iface: iface.to_owned(),
                    path: path.clone(),
                    source,
                })?;
                Link::Pinned { link: pinned, path }
            }
        };
        self.attachments.push(Attachment {
            iface: iface.to_owned(),
            mode,
            link_id,
            link,
        });
        Ok(())
    }

    /// Puts this datapath's program of `mode` into the link pinned at `path` (left by an
    /// earlier run): the kernel swaps programs atomically, so the interface is never without
    /// one and no flow is dropped.
    fn replace_pinned(
        &mut self,
        iface: &str,
        mode: AttachMode,
        path: &Path,
    ) -> Result<(), DatapathError> {
        let attach_err = |source| DatapathError::Attach {
            mode,
            iface: iface.to_owned(),
            source,
        };
        let link_err = |source| DatapathError::LinkInfo {
            iface: iface.to_owned(),
            source,
        };
        let pinned = PinnedLink::from_pin(path).map_err(link_err)?;
        let fd_link = FdLink::from(pinned);
        let link_id = fd_link.info().map_err(link_err)?.id();
        match mode {
            AttachMode::Xdp => {
                let link = aya::programs::xdp::XdpLink::try_from(fd_link).map_err(link_err)?;
                let program = self.xdp()?;
                let id = program.attach_to_link(link).map_err(attach_err)?;
                // The pin keeps the link; this process's fd may go.
                drop(program.take_link(id).map_err(attach_err)?);
            }
            AttachMode::Tc => {
                let link =
                    aya::programs::tc::SchedClassifierLink::try_from(fd_link).map_err(link_err)?;
                let program = self.tc()?;
                let id = program.attach_to_link(link).map_err(attach_err)?;
                drop(program.take_link(id).map_err(attach_err)?);
            }
        }
        let link = PinnedLink::from_pin(path).map_err(link_err)?;
        self.attachments.push(Attachment {
            iface: iface.to_owned(),
            mode,
            link_id,
            link: Link::Pinned {
                link,
                path: path.to_owned(),
            },
        });
        Ok(())
    }

    /// The current attachments.
    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// Lets go of every attachment. An owned link is detached now; a pinned one is detached
    /// once its pin is gone too (remove the pins first, see [`remove_pins`]), without waiting
    /// for this process to exit.
    pub fn release_attachments(&mut self) {
        self.attachments.clear();
    }

    /// The XDP program (for attaching, or for BPF_PROG_TEST_RUN).
    pub fn xdp(&mut self) -> Result<&mut Xdp, DatapathError> {
        self.program(XDP_PROGRAM)
    }

    /// The TC program (for attaching, or for BPF_PROG_TEST_RUN).
    pub fn tc(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        self.program(TC_PROGRAM)
    }

    /// A program of the object by name and type, sharing this datapath's maps (the two above,
    /// or the benchmark's baselines and floors).
    pub fn program<'a, P>(&'a mut self, name: &'static str) -> Result<&'a mut P, DatapathError>
    where
        &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    {
        let program = self
            .ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram { name })?;
        program
            .try_into()
            .map_err(|source| DatapathError::ProgramLoad { name, source })
    }

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
        self.write_config(config)?;
        self.add_address(snat_ip, ADDR_SNAT)
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

    /// The backend id the datapath would give a new flow `client → public` of app `app_id`
    /// (the shared flow hash over the app's current table), if the app has a table.
    pub fn predict_backend(
        &self,
        app_id: u32,
        client: SocketAddrV4,
        public: SocketAddrV4,
    ) -> Result<Option<u32>, DatapathError> {
        let Some(table) = self.app_table(app_id)? else {
            return Ok(None);
        };
        let k = FlowKey4::from_addrs(client, public);
        let h = gateway_common::flow_hash4(k.src_ip, k.dst_ip, k.src_port, k.dst_port);
        Ok(Some(table[(h % MAGLEV_SIZE) as usize]).filter(|&id| id != 0))
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

    /// Zeroes app `app_id`'s counters (an id handed to a new app).
    pub fn reset_app_stats(&mut self, app_id: u32) -> Result<(), DatapathError> {
        reset_stats(&mut self.maps.app_stats, app_id, maps::APP_STATS)
    }

    /// Zeroes backend `id`'s counters (an id handed to a new backend).
    pub fn reset_backend_stats(&mut self, id: u32) -> Result<(), DatapathError> {
        reset_stats(&mut self.maps.backend_stats, id, maps::BACKEND_STATS)
    }

    /// Removes both entries of every flow of app `app_id`; returns how many entries went.
    pub fn remove_app_flows(&mut self, app_id: u32) -> Result<usize, DatapathError> {
        self.remove_flows(|f| f.app_id == app_id)
    }

    /// Removes both entries of every flow to backend `id`; returns how many entries went.
    pub fn remove_backend_flows(&mut self, id: u32) -> Result<usize, DatapathError> {
        self.remove_flows(|f| f.backend_id == id)
    }

    fn remove_flows(&mut self, which: impl Fn(&Flow) -> bool) -> Result<usize, DatapathError> {
        self.maps.conntrack.remove_where(which)
    }

    /// The conntrack table.
    pub fn conntrack(&self) -> &Conntrack {
        &self.maps.conntrack
    }

    /// The conntrack table, to change it.
    pub fn conntrack_mut(&mut self) -> &mut Conntrack {
        &mut self.maps.conntrack
    }

    /// The conntrack table's capacity (entries).
    pub fn conntrack_capacity(&self) -> u32 {
        self.conntrack_capacity
    }

    /// Traffic of app `app_id`, summed over CPUs.
    pub fn app_stats(&self, app_id: u32) -> Result<TrafficStats, DatapathError> {
        sum_stats(&self.maps.app_stats, app_id, maps::APP_STATS)
    }

    /// Traffic of backend `id`, summed over CPUs.
    pub fn backend_stats(&self, id: u32) -> Result<TrafficStats, DatapathError> {
        sum_stats(&self.maps.backend_stats, id, maps::BACKEND_STATS)
    }

    /// Every conntrack entry.
    pub fn flows(&self) -> Result<Vec<(FlowKey4, Flow)>, DatapathError> {
        self.maps.conntrack.entries()
    }

    /// Inserts a conntrack entry as it is (tests and benchmarks fill the table this way).
    pub fn insert_flow(&mut self, key: FlowKey4, flow: Flow) -> Result<(), DatapathError> {
        self.maps.conntrack.insert(key, flow)
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

/// The file name of the link pinned for `iface` in `mode`.
fn link_pin_name(iface: &str, mode: AttachMode) -> String {
    format!("link_{mode}_{iface}")
}

/// Removes the pinned links in `dir` other than those of `keep` (interfaces no longer
/// configured, or attached in another mode now): each detaches when its pin goes.
pub fn prune_links(dir: &Path, keep: &[(String, AttachMode)]) -> std::io::Result<Vec<String>> {
    let keep: Vec<String> = keep
        .iter()
        .flat_map(|(iface, mode)| {
            // XDP mode also attaches TC (see `Datapath::attach`).
            let mut names = vec![link_pin_name(iface, AttachMode::Tc)];
            if *mode == AttachMode::Xdp {
                names.push(link_pin_name(iface, AttachMode::Xdp));
            }
            names
        })
        .collect();
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with("link_") && !keep.contains(&name) {
            std::fs::remove_file(dir.join(&name))?;
            removed.push(name);
        }
    }
    Ok(removed)
}

/// Removes everything this datapath pinned in `dir`: the links first (which detaches the
/// programs), then the maps (which drops every flow). Returns the names removed.
pub fn remove_pins(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut removed = prune_links(dir, &[])?;
    for name in maps::ALL {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => removed.push((*name).to_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
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

fn check_id(what: &'static str, id: u32, max: u32) -> Result<(), DatapathError> {
    if id == 0 || id >= max {
        return Err(DatapathError::IdOutOfRange { what, id, max });
    }
    Ok(())
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
    fn attach_modes_parse_and_print() {
        for mode in AttachMode::ALL {
            assert_eq!(mode.to_string().parse::<AttachMode>().unwrap(), mode);
        }
        assert!("bpf".parse::<AttachMode>().is_err());
    }
}
