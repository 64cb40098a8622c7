//! The datapath owner's errors.

use std::path::PathBuf;

use aya::{
    EbpfError,
    maps::MapError,
    pin::PinError,
    programs::{ProgramError, links::LinkError},
};

use super::AttachMode;

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
    #[error("removing the pin {path} failed")]
    RemovePin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the gateway answers for at most {max} addresses (public and SNAT)")]
    TooManyAddresses { max: usize },
    #[error("counting the possible CPUs failed")]
    Cpus(#[source] std::io::Error),
    #[error("the SNAT port range {min}-{max} is empty")]
    EmptyPortRange { min: u16, max: u16 },
    #[error("reading the kernel's random source for the SYN cookies' key failed")]
    Random(#[source] std::io::Error),
    /// The benchmark object shares the datapath's maps through their pins.
    #[cfg(feature = "testing")]
    #[error("the datapath's maps are not pinned: load it with a pin directory")]
    NotPinned,
}
