//! The agent's kernel side: loading its three programs from the embedded object (with the
//! agent's maps pinned, reused when they are there), attaching them to a cgroup through pinned
//! bpf links (or putting the new programs into the links an earlier run pinned), and reading
//! its maps, from the loaded object or from the pins alone (`status`).

use std::{
    ffi::CString,
    net::Ipv4Addr,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, IterableMap as _, Map, MapData, MapError, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSockAddr, SockOps, links::FdLink},
};
use gateway_common::{
    agent::{AgentStat, PeerAddr4},
    maps::{self, AGENT_SOCKETS, AGENT_STATS, AGENT_TRUSTED},
    net::{ip_from_net, ip_to_net},
};

use super::{AgentError, cgroup::Cgroup};

/// The sock_ops program's name in the object.
pub const SOCKOPS_PROGRAM: &str = "gateway_agent_sockops";
/// The getpeername4 program's name in the object.
pub const GETPEERNAME4_PROGRAM: &str = "gateway_agent_getpeername4";
/// The getpeername6 program's name in the object (IPv4 clients of dual-stack sockets).
pub const GETPEERNAME6_PROGRAM: &str = "gateway_agent_getpeername6";

/// The agent's programs, each with the file name of its link's pin.
pub const PROGRAMS: [(&str, &str); 3] = [
    (SOCKOPS_PROGRAM, "link_sockops"),
    (GETPEERNAME4_PROGRAM, "link_getpeername4"),
    (GETPEERNAME6_PROGRAM, "link_getpeername6"),
];

/// Every agent map with the key and value sizes this build gives it.
const LAYOUTS: [(&str, u32, u32); 3] = [
    (AGENT_TRUSTED, 4, 4),
    (AGENT_SOCKETS, 8, size_of::<PeerAddr4>() as u32),
    (AGENT_STATS, 4, 8),
];

/// The agent's maps.
pub struct AgentMaps {
    trusted: HashMap<MapData, u32, u32>,
    sockets: HashMap<MapData, u64, PeerAddr4>,
    stats: PerCpuArray<MapData, u64>,
    /// The socket map's size.
    pub capacity: u32,
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> AgentError {
    move |source| AgentError::Map { name, source }
}

impl AgentMaps {
    fn take(ebpf: &mut Ebpf) -> Result<Self, AgentError> {
        fn one<T: TryFrom<Map, Error = MapError>>(
            ebpf: &mut Ebpf,
            name: &'static str,
        ) -> Result<T, AgentError> {
            let map = ebpf.take_map(name).ok_or(AgentError::MissingMap { name })?;
            T::try_from(map).map_err(map_err(name))
        }
        Self::new(
            one(ebpf, AGENT_TRUSTED)?,
            one(ebpf, AGENT_SOCKETS)?,
            one(ebpf, AGENT_STATS)?,
        )
    }

    /// The maps pinned in `dir`, without loading anything.
    pub fn from_pins(dir: &Path) -> Result<Self, AgentError> {
        fn one<T: TryFrom<Map, Error = MapError>>(
            dir: &Path,
            name: &'static str,
        ) -> Result<T, AgentError> {
            let data = MapData::from_pin(dir.join(name)).map_err(map_err(name))?;
            let map = Map::from_map_data(data).map_err(map_err(name))?;
            T::try_from(map).map_err(map_err(name))
        }
        Self::new(
            one(dir, AGENT_TRUSTED)?,
            one(dir, AGENT_SOCKETS)?,
            one(dir, AGENT_STATS)?,
        )
    }

    fn new(
        trusted: HashMap<MapData, u32, u32>,
        sockets: HashMap<MapData, u64, PeerAddr4>,
        stats: PerCpuArray<MapData, u64>,
    ) -> Result<Self, AgentError> {
        let capacity = sockets
            .map()
            .info()
            .map_err(map_err(AGENT_SOCKETS))?
            .max_entries();
        Ok(AgentMaps {
            trusted,
            sockets,
            stats,
            capacity,
        })
    }

    /// Makes the trusted sources exactly `sources`.
    pub fn set_trusted(&mut self, sources: &[Ipv4Addr]) -> Result<(), AgentError> {
        let want: Vec<u32> = sources.iter().map(|ip| ip_to_net(*ip)).collect();
        let have = self
            .trusted
            .keys()
            .collect::<Result<Vec<u32>, _>>()
            .map_err(map_err(AGENT_TRUSTED))?;
        for key in have.iter().filter(|k| !want.contains(k)) {
            self.trusted.remove(key).map_err(map_err(AGENT_TRUSTED))?;
        }
        for key in &want {
            self.trusted
                .insert(key, 1, 0)
                .map_err(map_err(AGENT_TRUSTED))?;
        }
        Ok(())
    }

    /// The trusted sources.
    pub fn trusted(&self) -> Result<Vec<Ipv4Addr>, AgentError> {
        let mut ips = self
            .trusted
            .keys()
            .map(|k| k.map(ip_from_net))
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(AGENT_TRUSTED))?;
        ips.sort();
        Ok(ips)
    }

    /// Each counter, summed over the CPUs.
    pub fn counters(&self) -> Result<Vec<(AgentStat, u64)>, AgentError> {
        AgentStat::ALL
            .iter()
            .map(|&stat| {
                let values = self
                    .stats
                    .get(&stat.index(), 0)
                    .map_err(map_err(AGENT_STATS))?;
                Ok((stat, values.iter().sum()))
            })
            .collect()
    }

    /// The sockets mapped now (walked key by key: entries may come and go meanwhile, so the
    /// walk stops at the map's size).
    pub fn mapped(&self) -> usize {
        self.sockets
            .keys()
            .take(self.capacity as usize)
            .filter(Result::is_ok)
            .count()
    }
}

/// The agent's programs, loaded.
pub struct Loaded {
    ebpf: Ebpf,
    pub maps: AgentMaps,
    /// The agent maps found pinned and reused.
    pub reused: Vec<&'static str>,
}

/// One program attached to the cgroup through a pinned link.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Attached {
    pub program: &'static str,
    pub link_id: u32,
    pub program_id: u32,
    pub cgroup_id: u64,
    pub pin: PathBuf,
    /// Whether the link was there before (an earlier run's) and now runs this run's program.
    pub replaced: bool,
}

/// Checks that each agent map pinned in `dir` has this build's layout.
fn check_layouts(dir: &Path) -> Result<Vec<&'static str>, AgentError> {
    let mut reused = Vec::new();
    for (name, key, value) in LAYOUTS {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path).map_err(map_err(name))?;
        let found = (info.key_size(), info.value_size());
        if found != (key, value) {
            return Err(AgentError::PinnedLayout {
                path,
                expected: (key, value),
                found,
            });
        }
        reused.push(name);
    }
    Ok(reused)
}

/// The links an earlier run pinned in `dir`, each with what the kernel says of it.
pub fn pinned_links(dir: &Path) -> Result<Vec<(&'static str, PathBuf, LinkInfo)>, AgentError> {
    let mut links = Vec::new();
    for (program, pin) in PROGRAMS {
        let path = dir.join(pin);
        if path.exists() {
            let fd = obj_get(&path).map_err(AgentError::io("opening the pinned link", &path))?;
            let info =
                link_info(fd.as_fd()).map_err(AgentError::io("reading the pinned link", &path))?;
            links.push((program, path, info));
        }
    }
    Ok(links)
}

impl Loaded {
    /// Loads the agent's programs from the embedded object, its maps pinned in `pin_dir` (a
    /// bpffs directory; maps already there are reused, a map of another layout is refused),
    /// the socket map sized `max_connections` when it is created. The datapath's maps, which
    /// the object holds too, are created with one entry each and never used.
    pub fn load(pin_dir: &Path, max_connections: u32) -> Result<Self, AgentError> {
        let reused = check_layouts(pin_dir)?;
        let mut loader = EbpfLoader::new();
        for name in maps::ALL {
            loader.map_max_entries(name, 1);
        }
        loader.map_max_entries(AGENT_SOCKETS, max_connections.max(1));
        for (name, _, _) in LAYOUTS {
            loader.map_pin_path(name, pin_dir.join(name));
        }
        let mut ebpf = loader
            .load(crate::EBPF_OBJECT)
            .map_err(|e| AgentError::Load(Box::new(e)))?;
        let maps = AgentMaps::take(&mut ebpf)?;
        let program_err = |name: &'static str| move |source| AgentError::Program { name, source };
        let sockops: &mut SockOps = ebpf
            .program_mut(SOCKOPS_PROGRAM)
            .ok_or(AgentError::MissingProgram {
                name: SOCKOPS_PROGRAM,
            })?
            .try_into()
            .map_err(program_err(SOCKOPS_PROGRAM))?;
        sockops.load().map_err(program_err(SOCKOPS_PROGRAM))?;
        for name in [GETPEERNAME4_PROGRAM, GETPEERNAME6_PROGRAM] {
            let getpeername: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(AgentError::MissingProgram { name })?
                .try_into()
                .map_err(program_err(name))?;
            getpeername.load().map_err(program_err(name))?;
        }
        Ok(Loaded { ebpf, maps, reused })
    }

    /// The instructions the verifier processed for each of the agent's programs.
    pub fn verified_instructions(&self) -> Vec<(&'static str, Option<u32>)> {
        PROGRAMS
            .iter()
            .map(|(name, _)| {
                let count = self
                    .ebpf
                    .program(name)
                    .and_then(|p| p.info().ok())
                    .and_then(|i| i.verified_instruction_count());
                (*name, count)
            })
            .collect()
    }

    /// Attaches the programs to `cgroup` through links pinned in `pin_dir`. A link pinned
    /// there by an earlier run (on this cgroup: [`check_pinned_cgroup`]) gets this run's
    /// program in one step (`BPF_LINK_UPDATE`), so the cgroup is never without one.
    pub fn attach(&mut self, cgroup: &Cgroup, pin_dir: &Path) -> Result<Vec<Attached>, AgentError> {
        let mut attached = Vec::new();
        for (program, pin) in PROGRAMS {
            let path = pin_dir.join(pin);
            let attach_err = |source| AgentError::Attach {
                program,
                cgroup: cgroup.path.clone(),
                source,
            };
            let not_pinnable = |source| AgentError::NotPinnable { program, source };
            let replaced = path.exists();
            if replaced {
                let link =
                    obj_get(&path).map_err(AgentError::io("opening the pinned link", &path))?;
                let prog_fd = self.program_fd(program)?;
                link_update(link.as_fd(), prog_fd.as_fd())
                    .map_err(AgentError::io("updating the pinned link", &path))?;
            } else {
                let fd_link: FdLink = match program {
                    SOCKOPS_PROGRAM => {
                        let p: &mut SockOps = self.program(program)?;
                        let id = p
                            .attach(&cgroup.file, CgroupAttachMode::Single)
                            .map_err(attach_err)?;
                        let link = p.take_link(id).map_err(attach_err)?;
                        FdLink::try_from(link).map_err(not_pinnable)?
                    }
                    _ => {
                        let p: &mut CgroupSockAddr = self.program(program)?;
                        let id = p
                            .attach(&cgroup.file, CgroupAttachMode::Single)
                            .map_err(attach_err)?;
                        let link = p.take_link(id).map_err(attach_err)?;
                        FdLink::try_from(link).map_err(not_pinnable)?
                    }
                };
                fd_link.pin(&path).map_err(|source| AgentError::Pin {
                    path: path.clone(),
                    source,
                })?;
            }
            let link = obj_get(&path).map_err(AgentError::io("opening the pinned link", &path))?;
            let info =
                link_info(link.as_fd()).map_err(AgentError::io("reading the link", &path))?;
            attached.push(Attached {
                program,
                link_id: info.id,
                program_id: info.program_id,
                cgroup_id: info.cgroup_id,
                pin: path,
                replaced,
            });
        }
        Ok(attached)
    }

    fn program<'a, P>(&'a mut self, name: &'static str) -> Result<&'a mut P, AgentError>
    where
        &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    {
        self.ebpf
            .program_mut(name)
            .ok_or(AgentError::MissingProgram { name })?
            .try_into()
            .map_err(|source| AgentError::Program { name, source })
    }

    fn program_fd(&self, name: &'static str) -> Result<OwnedFd, AgentError> {
        let program = self
            .ebpf
            .program(name)
            .ok_or(AgentError::MissingProgram { name })?;
        let fd = program
            .fd()
            .map_err(|source| AgentError::Program { name, source })?;
        fd.as_fd().try_clone_to_owned().map_err(AgentError::io(
            "duplicating the program's fd of",
            Path::new(name),
        ))
    }
}

/// Refuses to go on when links pinned in `dir` are attached to another cgroup than `cgroup`
/// (the agent serves one cgroup per pin directory), before anything is loaded.
pub fn check_pinned_cgroup(dir: &Path, cgroup: &Cgroup) -> Result<(), AgentError> {
    for (_, path, info) in pinned_links(dir)? {
        if info.cgroup_id != cgroup.id {
            return Err(AgentError::AttachedElsewhere {
                pin: path,
                cgroup_id: info.cgroup_id,
                wanted: cgroup.path.clone(),
            });
        }
    }
    Ok(())
}

/// What the kernel says of a bpf link (`struct bpf_link_info`, its cgroup part).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    pub id: u32,
    pub program_id: u32,
    /// The cgroup's id for a cgroup link (`BPF_LINK_TYPE_CGROUP`), else 0.
    pub cgroup_id: u64,
}

// The bpf(2) commands aya 0.14 does not offer for cgroup links (include/uapi/linux/bpf.h).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_TYPE_CGROUP: u32 = 3;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is the command's attribute struct, zeroed beyond what is set, and lives
    // through the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `BPF_OBJ_GET`: an fd of the object pinned at `path`.
fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut attr = Attr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_OBJ_GET_INFO_BY_FD` on a link.
fn link_info(fd: BorrowedFd<'_>) -> std::io::Result<LinkInfo> {
    // `struct bpf_link_info`: type, id, prog_id, then (8-aligned, at byte 16) a union whose
    // cgroup member starts with the cgroup's id.
    let mut info = [0u64; 16];
    #[repr(C)]
    struct Attr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = Attr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let (kind, id) = (info[0] as u32, (info[0] >> 32) as u32);
    Ok(LinkInfo {
        id,
        program_id: info[1] as u32,
        cgroup_id: if kind == BPF_LINK_TYPE_CGROUP {
            info[2]
        } else {
            0
        },
    })
}

/// `BPF_LINK_UPDATE`: the link runs `program` from now on.
fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> std::io::Result<()> {
    #[repr(C)]
    struct Attr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = Attr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}
