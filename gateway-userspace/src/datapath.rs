//! One owner for the datapath: it loads the embedded eBPF object, attaches its programs to
//! interfaces in XDP or TC (tcx) mode, and reads its maps. Everything else asks it.

use std::{
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
};

use aya::{
    Ebpf, EbpfError,
    maps::{MapError, PerCpuArray},
    pin::PinError,
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::TcAttachOptions,
    },
};
use gateway_common::{DropReason, GlobalStat, maps};

/// Name of the XDP program in the eBPF object.
pub const XDP_PROGRAM: &str = "gateway_xdp";
/// Name of the TC program in the eBPF object.
pub const TC_PROGRAM: &str = "gateway_tc";

/// How the datapath is attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// The loaded datapath.
pub struct Datapath {
    ebpf: Ebpf,
    attachments: Vec<Attachment>,
}

impl Datapath {
    /// Loads the embedded eBPF object and both of its programs into the kernel.
    pub fn load() -> Result<Self, DatapathError> {
        let mut ebpf = Ebpf::load(crate::EBPF_OBJECT).map_err(DatapathError::Load)?;
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
        Ok(Self {
            ebpf,
            attachments: Vec::new(),
        })
    }

    /// Attaches the program of `mode` to `iface` (in the calling thread's network namespace).
    /// XDP is attached in native (driver) mode; TC at ingress through tcx. With `pin_dir` (a
    /// directory on a bpffs), the link is pinned there and outlives this process: it is
    /// detached by removing its pin.
    pub fn attach(
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
        let link = match pin_dir {
            None => Link::Owned(link),
            Some(dir) => {
                let path = dir.join(format!("link_{mode}_{iface}"));
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

    /// The current attachments.
    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// The XDP program (for attaching, or for BPF_PROG_TEST_RUN).
    pub fn xdp(&mut self) -> Result<&mut Xdp, DatapathError> {
        let name = XDP_PROGRAM;
        let program = self
            .ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram { name })?;
        program
            .try_into()
            .map_err(|source| DatapathError::ProgramLoad { name, source })
    }

    /// The TC program (for attaching, or for BPF_PROG_TEST_RUN).
    pub fn tc(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        let name = TC_PROGRAM;
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
        let name = maps::GLOBAL_STATS;
        let map = self
            .ebpf
            .map(name)
            .ok_or(DatapathError::MissingMap { name })?;
        let array = PerCpuArray::<_, u64>::try_from(map)
            .map_err(|source| DatapathError::Map { name, source })?;
        let mut slots = vec![0u64; maps::GLOBAL_STATS_LEN as usize];
        for (i, slot) in slots.iter_mut().enumerate() {
            let per_cpu = array
                .get(&(i as u32), 0)
                .map_err(|source| DatapathError::Map { name, source })?;
            *slot = per_cpu.iter().sum();
        }
        Ok(GlobalStats { slots })
    }
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
