//! What only tests and benchmarks use, behind the `testing` feature (the `tests` crate enables
//! it; the `gateway` binary is built without): filling the conntrack table as is, predicting
//! the datapath's backend choice, and the benchmark's second eBPF object.

use std::net::SocketAddrV4;

use aya::{
    Ebpf, EbpfLoader,
    maps::MapError,
    programs::{Program, ProgramError},
};
use gateway_common::maps::{self, BACKEND_ACCEPTING, Flow, FlowKey4};

use super::{Datapath, DatapathError, map_err, program};
use crate::maglev;

/// The programs of the benchmark's object: the cost of running any XDP or TC program, the kernel's
/// cost of a conntrack pair's two inserts (`bench_ct_pair_xdp`, entries of app
/// `gateway_common::bench::BENCH_FLOOR_APP`) and of TC's two checksum helper calls.
pub const BENCH_PROGRAMS: [&str; 6] = [
    "bench_empty_xdp",
    "bench_empty_tc",
    "bench_ct_pair_xdp",
    "bench_csum_tc",
    "bench_hop_xdp",
    "bench_hop_tc",
];

/// The `gateway-bench` object built from `gateway-ebpf` (`src/bin/bench.rs`) by `build.rs`:
/// the benchmark's baselines and floors.
static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway-bench"));

impl Datapath {
    /// The SYN cookies' key ([`gateway_common::maps::Config::cookie_key`]).
    pub fn cookie_key(&self) -> Result<[u64; 2], DatapathError> {
        Ok(self.config()?.cookie_key)
    }

    /// The conntrack table, to change it (tests and benchmarks empty it between runs).
    pub fn conntrack_mut(&mut self) -> &mut super::Conntrack {
        &mut self.maps.conntrack
    }

    /// Inserts a conntrack entry as it is (tests and benchmarks fill the table this way).
    pub fn insert_flow(&mut self, key: FlowKey4, flow: Flow) -> Result<(), DatapathError> {
        self.maps.conntrack.insert(key, flow)
    }

    /// The backend id the datapath would give a new flow `client → public` of app `app_id`:
    /// the app's current table walked from the flow's slot as the datapath walks it
    /// ([`maglev::choose`], with the backends' accepting flags from the backends map). `None`
    /// if the app has no table or no backend the datapath would choose.
    pub fn predict_backend(
        &self,
        app_id: u32,
        client: SocketAddrV4,
        public: SocketAddrV4,
    ) -> Result<Option<u32>, DatapathError> {
        let Some(table) = self.app_table(app_id)? else {
            return Ok(None);
        };
        let start = FlowKey4::from_addrs(client, public).maglev_slot();
        maglev::choose(&table, start, |id| match self.maps.backends.get(&id, 0) {
            Ok(backend) => Ok(backend.flags & BACKEND_ACCEPTING != 0),
            // The datapath skips an id the map does not hold.
            Err(MapError::OutOfBounds { .. }) => Ok(false),
            Err(e) => Err(map_err(maps::BACKENDS4)(e)),
        })
    }

    /// Loads the benchmark's object and all of its programs ([`BENCH_PROGRAMS`]) on this
    /// datapath's maps: it takes them from their pins (aya shares maps between objects only
    /// so), so this datapath must have been loaded with [`super::LoadOptions::pin_dir`]
    /// ([`DatapathError::NotPinned`] otherwise).
    pub fn load_bench(&self) -> Result<BenchObject, DatapathError> {
        let dir = self.pin_dir.as_ref().ok_or(DatapathError::NotPinned)?;
        let mut loader = EbpfLoader::new();
        for &name in maps::ALL {
            loader.map_pin_path(name, dir.join(name));
        }
        let mut ebpf = loader.load(BENCH_OBJECT).map_err(DatapathError::Load)?;
        for name in BENCH_PROGRAMS {
            let program = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram { name })?;
            let loaded = match program {
                Program::Xdp(p) => super::retry_eagain(|| p.load()),
                Program::SchedClassifier(p) => super::retry_eagain(|| p.load()),
                _ => Ok(()),
            };
            loaded.map_err(|source| DatapathError::ProgramLoad { name, source })?;
        }
        Ok(BenchObject { ebpf })
    }
}

/// The benchmark's object, loaded on a datapath's maps (see [`Datapath::load_bench`]).
pub struct BenchObject {
    ebpf: Ebpf,
}

impl BenchObject {
    /// Program `name` of the object, loaded, as a `P` (`Xdp` or `SchedClassifier`).
    pub fn program<'a, P>(&'a mut self, name: &'static str) -> Result<&'a mut P, DatapathError>
    where
        &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
    {
        program(&mut self.ebpf, name)
    }
}
