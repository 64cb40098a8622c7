//! Why a change of the desired state was refused: one variant per rule, each with the words
//! the operator reads, and a kind the API maps to a status.

use std::net::{Ipv4Addr, SocketAddrV4};

use gateway_common::maps::{MAX_APPS, MAX_BACKENDS, MSS_CLAMP_MIN};

use super::{MSS_CLAMP_MAX, PortRange, WEIGHT_MAX};

/// What kind of failure a [`StateError`] is (the API maps it to an HTTP status).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Malformed input.
    Invalid,
    /// Something named does not exist.
    NotFound,
    /// Conflicts with what exists.
    Conflict,
    /// A limit is reached.
    Exhausted,
    /// Waited too long (a deploy whose backends did not become healthy).
    Timeout,
    /// A service the change needs is unreachable (the cluster's etcd): try again later.
    Unavailable,
}

/// A rejected change. The state is left exactly as it was.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("no app named {0:?}")]
    UnknownApp(String),
    #[error("app {0:?} already exists")]
    DuplicateApp(String),
    #[error(
        "bad app name {0:?}: a name is 1 to 63 characters among a-z, 0-9 and '-', starting and ending with a letter or digit"
    )]
    BadName(String),
    #[error("port {port} is outside the public port range {range}")]
    PortOutOfRange { port: u16, range: PortRange },
    #[error("port {port} is already used by app {app:?}")]
    PortTaken { port: u16, app: String },
    #[error("port 0 is not a usable port")]
    PortZero,
    #[error("every public port in {0} is taken")]
    RangeExhausted(PortRange),
    #[error("bad backend address {0:?}: expected IPv4:PORT, e.g. 198.51.100.2:8080")]
    BadAddress(String),
    #[error("backend address {0} is not a unicast address")]
    NotUnicast(Ipv4Addr),
    #[error("app {app:?} already has backend {addr}")]
    DuplicateBackend { app: String, addr: SocketAddrV4 },
    #[error("app {app:?} has no backend {addr}")]
    UnknownBackend { app: String, addr: SocketAddrV4 },
    #[error("weight {0} is out of range: a weight is 1 to {WEIGHT_MAX}")]
    Weight(u32),
    #[error("the gateway holds at most {} apps", MAX_APPS - 1)]
    TooManyApps,
    #[error("the gateway holds at most {} backends", MAX_BACKENDS - 1)]
    TooManyBackends,
    #[error(
        "bad health-check setting: interval and timeout are 10ms to 1h, rise and fall 1 to 100"
    )]
    Health,
    #[error(
        "MSS clamp {0} is out of range: an MSS clamp is {MSS_CLAMP_MIN} to {MSS_CLAMP_MAX} bytes"
    )]
    MssClamp(u32),
    #[error("client address must be toa or none, not {0:?}")]
    ClientAddress(String),
    #[error(
        "rate limit must look like 1000pps or 1000pps,burst=200 (1 to 10000000 pps, a burst of 1 to 10 times the pps), not {0:?}"
    )]
    RateLimit(String),
    #[error("no plan named {0:?} in the daemon's config file")]
    UnknownPlan(String),
    #[error("give a rate limit or a plan, not both")]
    RateLimitAndPlan,
    #[error("a deploy of app {0:?} is in progress")]
    DeployInProgress(String),
    #[error("a deploy needs at least one backend")]
    EmptyDeploy,
    #[error("quorum {quorum} is out of range: the deploy adds {new} new backends")]
    Quorum { quorum: usize, new: usize },
    #[error(
        "deploy of app {app:?} aborted: {healthy} of {new} new backends healthy after {waited_ms} ms, {quorum} needed; the old backends keep serving"
    )]
    DeployTimeout {
        app: String,
        healthy: usize,
        new: usize,
        quorum: usize,
        waited_ms: u64,
    },
    #[error(
        "backend {addr} of app {app:?} is draining: wait for it to go, or remove it with --now"
    )]
    Draining { app: String, addr: SocketAddrV4 },
}

impl StateError {
    pub fn kind(&self) -> ErrorKind {
        use StateError::*;
        match self {
            UnknownApp(_) | UnknownBackend { .. } => ErrorKind::NotFound,
            DuplicateApp(_)
            | PortTaken { .. }
            | DuplicateBackend { .. }
            | DeployInProgress(_)
            | Draining { .. } => ErrorKind::Conflict,
            RangeExhausted(_) | TooManyApps | TooManyBackends => ErrorKind::Exhausted,
            BadName(_)
            | PortOutOfRange { .. }
            | PortZero
            | BadAddress(_)
            | NotUnicast(_)
            | Weight(_)
            | Health
            | MssClamp(_)
            | ClientAddress(_)
            | RateLimit(_)
            | UnknownPlan(_)
            | RateLimitAndPlan
            | EmptyDeploy
            | Quorum { .. } => ErrorKind::Invalid,
            DeployTimeout { .. } => ErrorKind::Timeout,
        }
    }
}
