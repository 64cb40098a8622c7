//! `gateway agent`: the container host's side of the client address (docs/client-address.md).
//! The gateway adds a TOA option (the client's address and port) to the segment that completes
//! each handshake toward a backend; the agent's programs (gateway-ebpf's `agent`), attached to
//! a cgroup v2 of the container host, remember it per socket when the segment comes from a
//! trusted gateway address, and answer `getpeername()` and `accept()` with it, so that apps see
//! the client without a change.
//!
//! | what                                              | module    |
//! |---------------------------------------------------|-----------|
//! | the command line                                  | [`args`]  |
//! | the cgroup (checks, its path from its id)         | `cgroup`  |
//! | loading, attaching, pins, maps                    | `kernel`  |
//! | `gateway agent status`                            | `status`  |
//! | `/metrics`                                        | `metrics` |
//!
//! The programs stay attached when the agent stops (their links are pinned, like the
//! daemon's): a restart reuses the pinned maps (mapped connections keep their address) and puts
//! its programs into the pinned links; `gateway agent down` detaches them.

pub mod args;
mod cgroup;
mod kernel;
mod metrics;
mod status;

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use gateway_common::maps::{self, AGENT_TRUSTED_MAX};
use tracing::{info, warn};

pub use args::{AgentArgs, AgentCommand, DEFAULT_PIN_DIR, DownArgs, RunArgs, StatusArgs};
pub use cgroup::Cgroup;
pub use kernel::{GETPEERNAME4_PROGRAM, GETPEERNAME6_PROGRAM, SOCKOPS_PROGRAM};
pub use status::AgentStatus;

/// Why an agent command failed: one line for the operator, its causes as sources.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot attach to {path}: {reason}")]
    BadCgroup { path: PathBuf, reason: &'static str },
    #[error("no --cgroup given")]
    NoCgroup,
    #[error("no trusted source given (--trusted IP[,IP...]: the gateway's SNAT addresses)")]
    NoTrusted,
    #[error("trusted source {0:?} is not an IPv4 address (the agent handles IPv4 only)")]
    BadTrusted(String),
    #[error("{given} trusted sources given, at most {AGENT_TRUSTED_MAX}")]
    TooManyTrusted { given: usize },
    #[error("--max-connections must be at least 1")]
    NoCapacity,
    #[error(
        "--max-connections {0} is more than {MAX_CONNECTIONS} (the socket map is allocated whole when it is created, ~100 bytes per connection)"
    )]
    TooManyConnections(u32),
    #[error(
        "the links pinned in {} are attached to another cgroup (id {cgroup_id}) than {}: run `gateway agent down --pin-dir {}` first, or use another --pin-dir",
        pin.parent().unwrap_or(pin).display(), wanted.display(), pin.parent().unwrap_or(pin).display()
    )]
    AttachedElsewhere {
        pin: PathBuf,
        cgroup_id: u64,
        wanted: PathBuf,
    },
    #[error("nothing of the agent is pinned in {pin_dir}: no agent attached")]
    NotAttached { pin_dir: PathBuf },
    #[error("an agent is running with the pins in {path}: stop it first (SIGTERM)")]
    PinsInUse { path: PathBuf },
    #[error(
        "the map pinned at {path} has key and value sizes {found:?}, this build's are {expected:?}"
    )]
    PinnedLayout {
        path: PathBuf,
        expected: (u32, u32),
        found: (u32, u32),
    },
    #[error("loading the eBPF object (are you root, on Linux >= 5.10 with BTF?)")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("the eBPF object has no map {name}")]
    MissingMap { name: &'static str },
    #[error("the eBPF object has no program {name}")]
    MissingProgram { name: &'static str },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("loading program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching {program} to {cgroup}")]
    Attach {
        program: &'static str,
        cgroup: PathBuf,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(
        "the link of {program} is not a bpf link (Linux >= 5.7 attaches cgroup programs with one)"
    )]
    NotPinnable {
        program: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("pinning a link at {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the bpffs at {path}")]
    Bpffs {
        path: PathBuf,
        #[source]
        source: Box<crate::daemon::DaemonError>,
    },
    #[error("binding the metrics address {addr}")]
    MetricsBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent's async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("writing JSON")]
    Json(#[source] serde_json::Error),
}

impl AgentError {
    /// [`AgentError::Io`] for doing `what` to `path`.
    pub fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_owned();
        move |source| AgentError::Io { what, path, source }
    }
}

/// Parses `--trusted`'s values: IPv4 addresses, at least one, at most [`AGENT_TRUSTED_MAX`].
pub fn parse_trusted(values: &[String]) -> Result<Vec<Ipv4Addr>, AgentError> {
    let mut ips = Vec::new();
    for v in values.iter().map(|v| v.trim()).filter(|v| !v.is_empty()) {
        let ip: Ipv4Addr = v
            .parse()
            .map_err(|_| AgentError::BadTrusted(v.to_owned()))?;
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    if ips.is_empty() {
        return Err(AgentError::NoTrusted);
    }
    if ips.len() > AGENT_TRUSTED_MAX as usize {
        return Err(AgentError::TooManyTrusted { given: ips.len() });
    }
    Ok(ips)
}

/// Runs `gateway agent ...`.
pub fn main(args: AgentArgs) -> Result<(), AgentError> {
    match args.command {
        None => run(args.run),
        Some(AgentCommand::Run(run_args)) => run(run_args),
        Some(AgentCommand::Status(s)) => {
            let status = AgentStatus::read(&s.pin_dir)?;
            if s.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).map_err(AgentError::Json)?
                );
            } else {
                print!("{}", status.render());
            }
            Ok(())
        }
        Some(AgentCommand::Down(d)) => {
            let removed = down(&d.pin_dir)?;
            if removed.is_empty() {
                println!("nothing to remove in {}", d.pin_dir.display());
            } else {
                println!(
                    "removed {} pins from {} (agent detached)",
                    removed.len(),
                    d.pin_dir.display()
                );
            }
            Ok(())
        }
    }
}

/// `gateway agent [run]`: checks the input, attaches (or takes over an earlier run's pins),
/// The most connections `--max-connections` may ask the agent to map (2^22: ~400 MB of kernel
/// memory, allocated when the socket map is created).
pub const MAX_CONNECTIONS: u32 = 1 << 22;

/// serves metrics until SIGINT or SIGTERM, and leaves the programs attached.
pub fn run(args: RunArgs) -> Result<(), AgentError> {
    // Every check before anything is loaded or attached.
    let cgroup_path = args.cgroup.as_deref().ok_or(AgentError::NoCgroup)?;
    let trusted = parse_trusted(&args.trusted)?;
    if args.max_connections == 0 {
        return Err(AgentError::NoCapacity);
    }
    if args.max_connections > MAX_CONNECTIONS {
        return Err(AgentError::TooManyConnections(args.max_connections));
    }
    let cgroup = Cgroup::open(cgroup_path)?;
    // The metrics address is bound before anything is mounted, loaded or attached: one in use
    // (or not of this host) is refused like any other bad input, leaving the state as it was.
    let metrics = args
        .metrics
        .map(|addr| {
            std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| (addr, l)))
                .map_err(|source| AgentError::MetricsBind { addr, source })
        })
        .transpose()?;
    let pin_dir = &args.pin_dir;
    crate::daemon::ensure_bpffs(pin_dir).map_err(|source| AgentError::Bpffs {
        path: pin_dir.clone(),
        source: Box::new(source),
    })?;
    let _lock = lock(pin_dir)?;
    kernel::check_pinned_cgroup(pin_dir, &cgroup)?;

    let mut loaded = kernel::Loaded::load(pin_dir, args.max_connections)?;
    // The trusted set before the programs are attached: they read it from the first segment.
    loaded.maps.set_trusted(&trusted)?;
    let attached = loaded.attach(&cgroup, pin_dir)?;
    let counts: Vec<String> = loaded
        .verified_instructions()
        .into_iter()
        .filter_map(|(name, n)| n.map(|n| format!("{name} {n}")))
        .collect();
    for a in &attached {
        info!(
            program = a.program,
            program_id = a.program_id,
            link_id = a.link_id,
            pin = %a.pin.display(),
            replaced = a.replaced,
            "attached"
        );
    }
    info!(
        cgroup = %cgroup.path.display(),
        cgroup_id = cgroup.id,
        trusted = ?trusted,
        reused_maps = ?loaded.reused,
        capacity = loaded.maps.capacity,
        verified_instructions = %counts.join(", "),
        "agent attached"
    );

    let programs = attached.len();
    let maps = Arc::new(Mutex::new(loaded.maps));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    runtime.block_on(async {
        let server = match metrics {
            Some((addr, listener)) => {
                let listener = tokio::net::TcpListener::from_std(listener)
                    .map_err(|source| AgentError::MetricsBind { addr, source })?;
                info!(%addr, "serving metrics on /metrics");
                let source = metrics::Source { maps, programs };
                Some(tokio::spawn(async move {
                    if let Err(e) = metrics::serve(listener, source).await {
                        warn!(error = %e, "the metrics endpoint stopped");
                    }
                }))
            }
            None => None,
        };
        wait_for_signal().await.map_err(AgentError::Runtime)?;
        if let Some(server) = server {
            server.abort();
        }
        Ok::<(), AgentError>(())
    })?;
    info!(
        pin_dir = %pin_dir.display(),
        "agent stopped; its programs stay attached (`gateway agent down` detaches them)"
    );
    Ok(())
}

async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM"),
        _ = int.recv() => info!("SIGINT"),
    }
    Ok(())
}

/// Locks `dir` (flock) for the life of the returned file: one agent per pin directory.
fn lock(dir: &Path) -> Result<std::fs::File, AgentError> {
    let file = std::fs::File::open(dir).map_err(AgentError::io("opening", dir))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(AgentError::PinsInUse {
            path: dir.to_owned(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(AgentError::io("locking", dir)(e)),
    }
}

/// bpffs's magic number (statfs `f_type`).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn on_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// `gateway agent down`: removes the link pins (which detaches the programs), then the map
/// pins, then the directory (unmounted if it is a bpffs of its own). Refused while an agent
/// runs on it. Returns the names removed.
pub fn down(dir: &Path) -> Result<Vec<String>, AgentError> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let _lock = lock(dir)?;
    let mut removed = Vec::new();
    let names = kernel::PROGRAMS
        .iter()
        .map(|(_, pin)| *pin)
        .chain(maps::AGENT.iter().copied());
    for name in names {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(name.to_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(AgentError::io("removing", &path)(e)),
        }
    }
    drop(_lock);
    let own_mount = dir.parent().is_some_and(|p| !on_bpffs(p)) && on_bpffs(dir);
    if own_mount {
        nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH).map_err(|e| {
            AgentError::io("unmounting", dir)(std::io::Error::from_raw_os_error(e as i32))
        })?;
    }
    // Left in place if something else is in it.
    let _ = std::fs::remove_dir(dir);
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn trusted_sources_are_ipv4_and_at_least_one() {
        assert_eq!(
            parse_trusted(&strings(&[
                "198.51.100.253",
                " 192.0.2.9",
                "198.51.100.253"
            ]))
            .unwrap(),
            [
                Ipv4Addr::new(198, 51, 100, 253),
                Ipv4Addr::new(192, 0, 2, 9)
            ]
        );
        assert!(matches!(parse_trusted(&[]), Err(AgentError::NoTrusted)));
        assert!(matches!(
            parse_trusted(&strings(&["", " "])),
            Err(AgentError::NoTrusted)
        ));
        let err = parse_trusted(&strings(&["2001:db8::1"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "trusted source \"2001:db8::1\" is not an IPv4 address (the agent handles IPv4 only)"
        );
        assert!(matches!(
            parse_trusted(&strings(&["192.0.2.0/24"])),
            Err(AgentError::BadTrusted(_))
        ));
        let many: Vec<String> = (0..65).map(|i| format!("10.0.0.{i}")).collect();
        assert!(matches!(
            parse_trusted(&many),
            Err(AgentError::TooManyTrusted { given: 65 })
        ));
    }
}
