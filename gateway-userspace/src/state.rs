//! What the operator asked for: apps, their public ports and their backends. Validation and
//! allocation live here, pure (no kernel, no I/O), so that every rule has a unit test; the
//! daemon applies a validated [`State`] to the datapath. [`StateFile`] persists it as one JSON
//! file, written atomically.

use std::{
    collections::BTreeMap,
    fmt,
    fs::{self, File},
    io::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    str::FromStr,
};

use gateway_common::maps::{MAX_APPS, MAX_BACKENDS};
use serde::{Deserialize, Serialize};

/// The longest app name (a DNS label).
pub const NAME_MAX: usize = 63;
/// Backend weights are 1..=WEIGHT_MAX (HAProxy's range, zero excluded: a backend that must not
/// get new connections is removed).
pub const WEIGHT_MAX: u32 = 256;
/// The weight of a backend added without one.
pub const WEIGHT_DEFAULT: u32 = 1;
/// The version of the state file's format.
pub const STATE_FORMAT: u32 = 1;

/// An inclusive port range `LOW-HIGH` (1 ≤ LOW ≤ HIGH).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortRange {
    pub low: u16,
    pub high: u16,
}

impl PortRange {
    pub const fn new(low: u16, high: u16) -> Self {
        PortRange { low, high }
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.low..=self.high).contains(&port)
    }

    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.low <= other.high && other.low <= self.high
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.low, self.high)
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad =
            || format!("bad port range {s:?}: expected LOW-HIGH with 1 <= LOW <= HIGH <= 65535");
        let (low, high) = s.split_once('-').ok_or_else(bad)?;
        let low: u16 = low.trim().parse().map_err(|_| bad())?;
        let high: u16 = high.trim().parse().map_err(|_| bad())?;
        if low == 0 || low > high {
            return Err(bad());
        }
        Ok(PortRange { low, high })
    }
}

impl TryFrom<String> for PortRange {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<PortRange> for String {
    fn from(r: PortRange) -> String {
        r.to_string()
    }
}

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
            | EmptyDeploy
            | Quorum { .. } => ErrorKind::Invalid,
            DeployTimeout { .. } => ErrorKind::Timeout,
        }
    }
}

/// Checks an app name: a DNS label (1..=63 of `a-z 0-9 -`, not starting or ending with `-`), so
/// it can be a host name, a file name and a metric label as it is.
pub fn check_name(name: &str) -> Result<(), StateError> {
    let ok = !name.is_empty()
        && name.len() <= NAME_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(StateError::BadName(name.to_owned()))
    }
}

/// Parses a backend `IPv4:PORT`: a unicast address (not 0.0.0.0/8, loopback, multicast,
/// reserved 240.0.0.0/4 or broadcast) and a port other than 0.
pub fn parse_backend(s: &str) -> Result<SocketAddrV4, StateError> {
    let addr: SocketAddrV4 = s
        .trim()
        .parse()
        .map_err(|_| StateError::BadAddress(s.to_owned()))?;
    let ip = *addr.ip();
    if ip.octets()[0] == 0 || ip.is_loopback() || ip.is_multicast() || ip.octets()[0] >= 240 {
        return Err(StateError::NotUnicast(ip));
    }
    if addr.port() == 0 {
        return Err(StateError::PortZero);
    }
    Ok(addr)
}

/// Checks a backend weight.
pub fn check_weight(weight: u32) -> Result<(), StateError> {
    if (1..=WEIGHT_MAX).contains(&weight) {
        Ok(())
    } else {
        Err(StateError::Weight(weight))
    }
}

/// Where a backend is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// Added, not yet healthy: no new connections.
    Pending,
    /// Healthy: in the app's table, gets new connections.
    #[default]
    Active,
    /// Failed its health checks: no new connections; its open ones go on.
    Unhealthy,
    /// Removed or replaced: no new connections; open ones go on until they close or the drain
    /// ends, then its flows are dropped and it disappears.
    Draining,
}

impl BackendState {
    /// Every state.
    pub const ALL: [BackendState; 4] = [
        BackendState::Pending,
        BackendState::Active,
        BackendState::Unhealthy,
        BackendState::Draining,
    ];

    /// Whether new connections may go to it.
    pub fn accepting(self) -> bool {
        self == BackendState::Active
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Pending => "pending",
            BackendState::Active => "active",
            BackendState::Unhealthy => "unhealthy",
            BackendState::Draining => "draining",
        }
    }
}

/// One backend (a container) of an app.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// The datapath's id for it (unique among all apps' backends).
    pub id: u32,
    pub addr: SocketAddrV4,
    pub weight: u32,
    #[serde(default)]
    pub state: BackendState,
    /// When the state last changed (Unix time, ms).
    #[serde(default)]
    pub since_ms: u64,
    /// Draining: when its remaining connections are ended (Unix time, ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_until_ms: Option<u64>,
    /// Added by a deploy that has not switched yet: held out of rotation even when healthy.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
}

/// Health-check settings an app overrides (each falls back to the daemon's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rise: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fall: Option<u32>,
}

/// Effective health-check settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthConfig {
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub rise: u32,
    pub fall: u32,
}

impl Default for HealthConfig {
    /// As suits containers: a handshake every second, 1 s to answer, two in a row to change.
    fn default() -> Self {
        HealthConfig {
            interval_ms: 1000,
            timeout_ms: 1000,
            rise: 2,
            fall: 2,
        }
    }
}

impl HealthConfig {
    /// These settings with `o`'s overrides.
    pub fn with(self, o: &HealthOverrides) -> Self {
        HealthConfig {
            interval_ms: o.interval_ms.unwrap_or(self.interval_ms),
            timeout_ms: o.timeout_ms.unwrap_or(self.timeout_ms),
            rise: o.rise.unwrap_or(self.rise),
            fall: o.fall.unwrap_or(self.fall),
        }
    }

    /// Checks the ranges: interval and timeout 10 ms to 1 h, rise and fall 1 to 100.
    pub fn check(o: &HealthOverrides) -> Result<(), StateError> {
        let ms = |v: Option<u64>| v.is_none_or(|v| (10..=3_600_000).contains(&v));
        let n = |v: Option<u32>| v.is_none_or(|v| (1..=100).contains(&v));
        if ms(o.interval_ms) && ms(o.timeout_ms) && n(o.rise) && n(o.fall) {
            Ok(())
        } else {
            Err(StateError::Health)
        }
    }
}

/// One app: its public port and its backends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct App {
    /// The datapath's id for it.
    pub id: u32,
    /// Its public port.
    pub port: u16,
    pub backends: Vec<Backend>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub health: HealthOverrides,
}

fn is_default<T: Default + PartialEq>(t: &T) -> bool {
    *t == T::default()
}

impl App {
    /// Whether a deploy of this app is waiting for its new backends.
    pub fn deploying(&self) -> bool {
        self.backends.iter().any(|b| b.held)
    }

    /// The Maglev entries of the backends that take new connections.
    pub fn maglev_entries(&self) -> Vec<crate::maglev::Entry> {
        self.backends
            .iter()
            .filter(|b| b.state.accepting())
            .map(|b| crate::maglev::Entry {
                id: b.id,
                addr: b.addr,
                weight: b.weight,
            })
            .collect()
    }
}

/// Everything the operator configured, as persisted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    pub format: u32,
    pub apps: BTreeMap<String, App>,
    /// Where the search for a free backend id starts: ids are handed out in turn rather than
    /// reused at once, so a removed backend's flows are not counted as a new one's.
    pub next_backend_id: u32,
}

impl Default for State {
    fn default() -> Self {
        State {
            format: STATE_FORMAT,
            apps: BTreeMap::new(),
            next_backend_id: 1,
        }
    }
}

impl State {
    pub fn app(&self, name: &str) -> Result<&App, StateError> {
        self.apps
            .get(name)
            .ok_or_else(|| StateError::UnknownApp(name.to_owned()))
    }

    fn app_mut(&mut self, name: &str) -> Result<&mut App, StateError> {
        self.apps
            .get_mut(name)
            .ok_or_else(|| StateError::UnknownApp(name.to_owned()))
    }

    /// The app using public port `port`.
    pub fn app_on_port(&self, port: u16) -> Option<(&str, &App)> {
        self.apps
            .iter()
            .find(|(_, a)| a.port == port)
            .map(|(n, a)| (n.as_str(), a))
    }

    /// Creates app `name` on `port`, or on the lowest free port of `range`.
    pub fn create_app(
        &mut self,
        name: &str,
        port: Option<u16>,
        range: PortRange,
    ) -> Result<&App, StateError> {
        self.create_app_with(name, port, range, HealthOverrides::default())
    }

    /// [`State::create_app`] with health-check settings of its own.
    pub fn create_app_with(
        &mut self,
        name: &str,
        port: Option<u16>,
        range: PortRange,
        health: HealthOverrides,
    ) -> Result<&App, StateError> {
        check_name(name)?;
        HealthConfig::check(&health)?;
        if self.apps.contains_key(name) {
            return Err(StateError::DuplicateApp(name.to_owned()));
        }
        let port = match port {
            Some(0) => return Err(StateError::PortZero),
            Some(port) if !range.contains(port) => {
                return Err(StateError::PortOutOfRange { port, range });
            }
            Some(port) => {
                if let Some((app, _)) = self.app_on_port(port) {
                    return Err(StateError::PortTaken {
                        port,
                        app: app.to_owned(),
                    });
                }
                port
            }
            None => {
                let used: std::collections::HashSet<u16> =
                    self.apps.values().map(|a| a.port).collect();
                (range.low..=range.high)
                    .find(|p| !used.contains(p))
                    .ok_or(StateError::RangeExhausted(range))?
            }
        };
        let used: std::collections::HashSet<u32> = self.apps.values().map(|a| a.id).collect();
        let id = (1..MAX_APPS)
            .find(|id| !used.contains(id))
            .ok_or(StateError::TooManyApps)?;
        let app = App {
            id,
            port,
            backends: Vec::new(),
            health,
        };
        Ok(self.apps.entry(name.to_owned()).or_insert(app))
    }

    /// Deletes app `name` and returns it.
    pub fn delete_app(&mut self, name: &str) -> Result<App, StateError> {
        self.apps
            .remove(name)
            .ok_or_else(|| StateError::UnknownApp(name.to_owned()))
    }

    /// Adds backend `addr` with `weight` to app `name`, active (see [`State::add_backend_as`]).
    pub fn add_backend(
        &mut self,
        name: &str,
        addr: SocketAddrV4,
        weight: u32,
    ) -> Result<Backend, StateError> {
        self.add_backend_as(name, addr, weight, BackendState::Active, 0)
    }

    /// Adds backend `addr` with `weight` to app `name` in `state` (the daemon adds them
    /// pending, until their health checks pass), at `now_ms`.
    pub fn add_backend_as(
        &mut self,
        name: &str,
        addr: SocketAddrV4,
        weight: u32,
        state: BackendState,
        now_ms: u64,
    ) -> Result<Backend, StateError> {
        check_weight(weight)?;
        parse_backend(&addr.to_string())?;
        let app = self.app(name)?;
        if app.backends.iter().any(|b| b.addr == addr) {
            return Err(StateError::DuplicateBackend {
                app: name.to_owned(),
                addr,
            });
        }
        let used: std::collections::HashSet<u32> = self
            .apps
            .values()
            .flat_map(|a| a.backends.iter().map(|b| b.id))
            .collect();
        // Ids 1..MAX_BACKENDS, searched from next_backend_id around.
        let span = MAX_BACKENDS - 1;
        let start = self.next_backend_id.clamp(1, span);
        let id = (0..span)
            .map(|i| (start - 1 + i) % span + 1)
            .find(|id| !used.contains(id))
            .ok_or(StateError::TooManyBackends)?;
        let backend = Backend {
            id,
            addr,
            weight,
            state,
            since_ms: now_ms,
            drain_until_ms: None,
            held: false,
        };
        self.next_backend_id = id % span + 1;
        self.app_mut(name)?.backends.push(backend.clone());
        Ok(backend)
    }

    /// The backend with datapath id `id`, and its app's name.
    pub fn backend_by_id(&self, id: u32) -> Option<(&str, &Backend)> {
        self.apps.iter().find_map(|(name, app)| {
            app.backends
                .iter()
                .find(|b| b.id == id)
                .map(|b| (name.as_str(), b))
        })
    }

    /// Puts backend `id` in `state` at `now_ms`; false if there is no such backend or it is
    /// in that state already.
    pub fn set_backend_state(&mut self, id: u32, state: BackendState, now_ms: u64) -> bool {
        for app in self.apps.values_mut() {
            if let Some(b) = app.backends.iter_mut().find(|b| b.id == id) {
                if b.state == state {
                    return false;
                }
                b.state = state;
                b.since_ms = now_ms;
                b.drain_until_ms = None;
                return true;
            }
        }
        false
    }

    /// Starts draining backend `addr` of app `name` until `until_ms`.
    pub fn drain_backend(
        &mut self,
        name: &str,
        addr: SocketAddrV4,
        now_ms: u64,
        until_ms: u64,
    ) -> Result<Backend, StateError> {
        let app = self.app_mut(name)?;
        let b = app
            .backends
            .iter_mut()
            .find(|b| b.addr == addr)
            .ok_or_else(|| StateError::UnknownBackend {
                app: name.to_owned(),
                addr,
            })?;
        if b.state != BackendState::Draining {
            b.state = BackendState::Draining;
            b.since_ms = now_ms;
            b.drain_until_ms = Some(until_ms);
            b.held = false;
        }
        Ok(b.clone())
    }

    /// Starts a deploy of app `name` to the backends `addrs`: those it lacks are added
    /// pending and held; the ones it has stay as they are. Returns the held ones.
    pub fn begin_deploy(
        &mut self,
        name: &str,
        addrs: &[SocketAddrV4],
        weight: u32,
        now_ms: u64,
    ) -> Result<Vec<Backend>, StateError> {
        let app = self.app(name)?;
        if app.deploying() {
            return Err(StateError::DeployInProgress(name.to_owned()));
        }
        if addrs.is_empty() {
            return Err(StateError::EmptyDeploy);
        }
        for (i, a) in addrs.iter().enumerate() {
            if addrs[..i].contains(a) {
                return Err(StateError::DuplicateBackend {
                    app: name.to_owned(),
                    addr: *a,
                });
            }
            if let Some(b) = app.backends.iter().find(|b| b.addr == *a)
                && b.state == BackendState::Draining
            {
                return Err(StateError::Draining {
                    app: name.to_owned(),
                    addr: *a,
                });
            }
        }
        let existing: Vec<SocketAddrV4> = app.backends.iter().map(|b| b.addr).collect();
        let mut held = Vec::new();
        for a in addrs.iter().filter(|a| !existing.contains(a)) {
            self.add_backend_as(name, *a, weight, BackendState::Pending, now_ms)?;
            let b = self.app_mut(name)?.backends.last_mut().expect("just added");
            b.held = true;
            held.push(b.clone());
        }
        Ok(held)
    }

    /// Switches app `name` to `addrs` (a deploy whose new backends are ready): the held ones in
    /// `healthy` become active, the others stop being held (their checks go on: they rise
    /// later), and every backend not in `addrs` starts draining until `drain_until_ms`.
    pub fn switch_deploy(
        &mut self,
        name: &str,
        addrs: &[SocketAddrV4],
        healthy: &[u32],
        now_ms: u64,
        drain_until_ms: u64,
    ) -> Result<(), StateError> {
        let app = self.app_mut(name)?;
        for b in &mut app.backends {
            if b.held {
                b.held = false;
                if healthy.contains(&b.id) {
                    b.state = BackendState::Active;
                    b.since_ms = now_ms;
                }
            } else if !addrs.contains(&b.addr) && b.state != BackendState::Draining {
                b.state = BackendState::Draining;
                b.since_ms = now_ms;
                b.drain_until_ms = Some(drain_until_ms);
            }
        }
        Ok(())
    }

    /// Abandons app `name`'s deploy: its held backends go; the old set is untouched.
    pub fn abort_deploy(&mut self, name: &str) -> Result<Vec<Backend>, StateError> {
        let app = self.app_mut(name)?;
        let (held, kept) = app.backends.drain(..).partition(|b| b.held);
        app.backends = kept;
        Ok(held)
    }

    /// Removes backend `addr` from app `name` and returns it.
    pub fn remove_backend(
        &mut self,
        name: &str,
        addr: SocketAddrV4,
    ) -> Result<Backend, StateError> {
        let app = self.app_mut(name)?;
        let i = app
            .backends
            .iter()
            .position(|b| b.addr == addr)
            .ok_or_else(|| StateError::UnknownBackend {
                app: name.to_owned(),
                addr,
            })?;
        Ok(app.backends.remove(i))
    }
}

/// Errors reading or writing the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error(
        "the state file {path} is corrupt ({source}); it was left as it is: repair it, or move it away to start with no apps"
    )]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "the state file {path} has format {found}, this build reads format {STATE_FORMAT}; it was left as it is"
    )]
    Format { path: PathBuf, found: u32 },
    #[error("{what} {path} failed")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another daemon holds {path}")]
    Locked { path: PathBuf },
}

/// The state file `DIR/state.json`, locked by this process while it lives (one daemon per
/// state directory).
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    _lock: File,
}

impl StateFile {
    /// Opens (creating) directory `dir` and locks it.
    pub fn open(dir: &Path) -> Result<Self, StateFileError> {
        let io = |what, path: &Path| {
            let path = path.to_owned();
            move |source| StateFileError::Io { what, path, source }
        };
        fs::create_dir_all(dir).map_err(io("creating the state directory", dir))?;
        let lock_path = dir.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io("opening", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(StateFileError::Locked { path: lock_path });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io("locking", &lock_path)(e)),
        }
        Ok(StateFile {
            path: dir.join("state.json"),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved state; an empty one when there is no file yet.
    pub fn load(&self) -> Result<State, StateFileError> {
        let text = match fs::read(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
            Err(source) => {
                return Err(StateFileError::Io {
                    what: "reading",
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let corrupt = |source| StateFileError::Corrupt {
            path: self.path.clone(),
            source,
        };
        // The format first, so that a newer file is named as such rather than as corrupt.
        #[derive(Deserialize)]
        struct Format {
            format: u32,
        }
        let Format { format } = serde_json::from_slice(&text).map_err(corrupt)?;
        if format != STATE_FORMAT {
            return Err(StateFileError::Format {
                path: self.path.clone(),
                found: format,
            });
        }
        serde_json::from_slice(&text).map_err(corrupt)
    }

    /// Saves `state`: written to a temporary file, synced, renamed over the old one, and the
    /// directory synced, so a crash leaves either the old or the new state, never a mix.
    pub fn save(&self, state: &State) -> Result<(), StateFileError> {
        let tmp = self.path.with_extension("json.tmp");
        let io = |what, path: &Path| {
            let path = path.to_owned();
            move |source| StateFileError::Io { what, path, source }
        };
        let mut text = serde_json::to_vec_pretty(state).expect("the state serializes");
        text.push(b'\n');
        let mut file = File::create(&tmp).map_err(io("creating", &tmp))?;
        file.write_all(&text).map_err(io("writing", &tmp))?;
        file.sync_all().map_err(io("syncing", &tmp))?;
        drop(file);
        fs::rename(&tmp, &self.path).map_err(io("renaming over", &self.path))?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("syncing", dir))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RANGE: PortRange = PortRange::new(20000, 20002);

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn names() {
        for ok in ["a", "web", "my-app-2", "0", &"a".repeat(63)] {
            assert_eq!(check_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "Web",
            "a_b",
            "a.b",
            "a b",
            "é",
            &"a".repeat(64),
        ] {
            assert!(
                matches!(check_name(bad), Err(StateError::BadName(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn port_ranges_parse() {
        assert_eq!("20000-29999".parse(), Ok(PortRange::new(20000, 29999)));
        assert_eq!("7-7".parse(), Ok(PortRange::new(7, 7)));
        for bad in ["", "1", "0-10", "10-9", "1-65536", "a-b", "1-2-3"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
        assert!(PortRange::new(1, 5).overlaps(&PortRange::new(5, 9)));
        assert!(!PortRange::new(1, 5).overlaps(&PortRange::new(6, 9)));
    }

    #[test]
    fn port_allocator_takes_the_lowest_free_port_and_reuses_freed_ones() {
        let mut s = State::default();
        assert_eq!(s.create_app("a", None, RANGE).unwrap().port, 20000);
        assert_eq!(s.create_app("b", Some(20002), RANGE).unwrap().port, 20002);
        assert_eq!(s.create_app("c", None, RANGE).unwrap().port, 20001);
        let before = s.clone();
        assert_eq!(
            s.create_app("d", None, RANGE).unwrap_err(),
            StateError::RangeExhausted(RANGE)
        );
        assert_eq!(s, before, "a refused change leaves the state as it was");
        s.delete_app("a").unwrap();
        assert_eq!(s.create_app("d", None, RANGE).unwrap().port, 20000);
    }

    #[test]
    fn app_creation_is_validated() {
        let mut s = State::default();
        s.create_app("a", Some(20001), RANGE).unwrap();
        let before = s.clone();
        let cases = [
            ("a", None, StateError::DuplicateApp("a".into())),
            ("A", None, StateError::BadName("A".into())),
            ("b", Some(0), StateError::PortZero),
            (
                "b",
                Some(19999),
                StateError::PortOutOfRange {
                    port: 19999,
                    range: RANGE,
                },
            ),
            (
                "b",
                Some(20001),
                StateError::PortTaken {
                    port: 20001,
                    app: "a".into(),
                },
            ),
        ];
        for (name, port, err) in cases {
            assert_eq!(s.create_app(name, port, RANGE).unwrap_err(), err);
            assert_eq!(s, before);
        }
        assert_eq!(
            s.delete_app("x").unwrap_err(),
            StateError::UnknownApp("x".into())
        );
    }

    #[test]
    fn app_ids_are_distinct_and_reused_after_delete() {
        let mut s = State::default();
        let wide = PortRange::new(1, 100);
        let a = s.create_app("a", None, wide).unwrap().id;
        let b = s.create_app("b", None, wide).unwrap().id;
        assert_ne!(a, b);
        s.delete_app("a").unwrap();
        assert_eq!(s.create_app("c", None, wide).unwrap().id, a);
    }

    #[test]
    fn backend_addresses() {
        assert_eq!(
            parse_backend("198.51.100.2:8080"),
            Ok(addr("198.51.100.2:8080"))
        );
        for bad in [
            "198.51.100.2",
            "198.51.100.2:",
            "x:80",
            "198.51.100.2:65536",
            "[2001:db8::1]:80",
            "",
        ] {
            assert!(
                matches!(parse_backend(bad), Err(StateError::BadAddress(_))),
                "{bad}"
            );
        }
        for bad in [
            "0.0.0.0:80",
            "127.0.0.1:80",
            "224.0.0.1:80",
            "255.255.255.255:80",
            "240.0.0.1:80",
        ] {
            assert!(
                matches!(parse_backend(bad), Err(StateError::NotUnicast(_))),
                "{bad}"
            );
        }
        assert_eq!(parse_backend("198.51.100.2:0"), Err(StateError::PortZero));
    }

    #[test]
    fn backends_are_validated_and_get_fresh_ids() {
        let mut s = State::default();
        s.create_app("a", None, RANGE).unwrap();
        s.create_app("b", None, RANGE).unwrap();
        let b1 = s.add_backend("a", addr("198.51.100.2:80"), 1).unwrap();
        // The same address in another app is another backend.
        let b2 = s.add_backend("b", addr("198.51.100.2:80"), 256).unwrap();
        assert_ne!(b1.id, b2.id);
        let before = s.clone();
        let cases = [
            (
                "a",
                "198.51.100.2:80",
                1,
                StateError::DuplicateBackend {
                    app: "a".into(),
                    addr: addr("198.51.100.2:80"),
                },
            ),
            (
                "x",
                "198.51.100.3:80",
                1,
                StateError::UnknownApp("x".into()),
            ),
            ("a", "198.51.100.3:80", 0, StateError::Weight(0)),
            ("a", "198.51.100.3:80", 257, StateError::Weight(257)),
        ];
        for (app, a, w, err) in cases {
            assert_eq!(s.add_backend(app, addr(a), w).unwrap_err(), err);
            assert_eq!(s, before);
        }
        assert_eq!(
            s.remove_backend("a", addr("198.51.100.9:80")).unwrap_err(),
            StateError::UnknownBackend {
                app: "a".into(),
                addr: addr("198.51.100.9:80")
            }
        );
        // A removed backend's id is not handed out again at once.
        s.remove_backend("a", addr("198.51.100.2:80")).unwrap();
        let b3 = s.add_backend("a", addr("198.51.100.2:80"), 1).unwrap();
        assert!(b3.id != b1.id && b3.id != b2.id);
    }

    #[test]
    fn backend_ids_wrap_around_skipping_used_ones() {
        let mut s = State::default();
        s.create_app("a", None, RANGE).unwrap();
        let first = s.add_backend("a", addr("198.51.100.2:80"), 1).unwrap().id;
        s.next_backend_id = MAX_BACKENDS - 1;
        assert_eq!(
            s.add_backend("a", addr("198.51.100.3:80"), 1).unwrap().id,
            MAX_BACKENDS - 1
        );
        let next = s.add_backend("a", addr("198.51.100.4:80"), 1).unwrap().id;
        assert!(next != first && (1..MAX_BACKENDS).contains(&next), "{next}");
    }

    #[test]
    fn a_deploy_holds_new_backends_then_switches_or_aborts() {
        let mut s = State::default();
        s.create_app("a", None, RANGE).unwrap();
        for b in ["198.51.100.2:80", "198.51.100.6:80"] {
            s.add_backend("a", addr(b), 1).unwrap();
        }
        let new = [
            addr("198.51.100.6:80"),
            addr("198.51.100.10:80"),
            addr("198.51.100.14:80"),
        ];
        let before = s.clone();
        let dup = [addr("198.51.100.10:80"), addr("198.51.100.10:80")];
        assert!(matches!(
            s.begin_deploy("a", &dup, 1, 5),
            Err(StateError::DuplicateBackend { .. })
        ));
        assert_eq!(s.begin_deploy("a", &[], 1, 5), Err(StateError::EmptyDeploy));
        assert_eq!(s, before);

        // The backend it has stays as it is; the two it lacks are held, pending.
        let held = s.begin_deploy("a", &new, 1, 5).unwrap();
        assert_eq!(held.iter().map(|b| b.addr).collect::<Vec<_>>(), new[1..]);
        assert!(
            held.iter()
                .all(|b| b.held && b.state == BackendState::Pending)
        );
        assert_eq!(
            s.app("a").unwrap().maglev_entries().len(),
            2,
            "the old set still serves"
        );
        assert_eq!(
            s.begin_deploy("a", &new, 1, 6),
            Err(StateError::DeployInProgress("a".into()))
        );
        let mut aborted = s.clone();
        assert_eq!(aborted.abort_deploy("a").unwrap().len(), 2);
        // (Ids handed out are not handed out again at once: only the apps compare.)
        assert_eq!(
            aborted.apps, before.apps,
            "an abort leaves the old set as it was"
        );

        // A quorum of one: the healthy one joins, the other stops being held and stays
        // pending; the backend left out drains.
        s.switch_deploy("a", &new, &[held[0].id], 7, 100).unwrap();
        let state = |a: &str| {
            s.app("a")
                .unwrap()
                .backends
                .iter()
                .find(|b| b.addr == addr(a))
                .cloned()
                .unwrap()
        };
        assert_eq!(state("198.51.100.10:80").state, BackendState::Active);
        assert_eq!(state("198.51.100.14:80").state, BackendState::Pending);
        assert!(!state("198.51.100.14:80").held);
        assert_eq!(state("198.51.100.6:80").state, BackendState::Active);
        let old = state("198.51.100.2:80");
        assert_eq!(
            (old.state, old.drain_until_ms),
            (BackendState::Draining, Some(100))
        );
        assert!(!s.app("a").unwrap().deploying());
        // A draining address cannot join the next deploy until it is gone.
        assert!(matches!(
            s.begin_deploy("a", &[addr("198.51.100.2:80")], 1, 8),
            Err(StateError::Draining { .. })
        ));
    }

    #[test]
    fn app_health_settings_override_the_daemons_one_by_one() {
        let o = HealthOverrides {
            interval_ms: Some(300),
            fall: Some(5),
            ..Default::default()
        };
        let cfg = HealthConfig::default().with(&o);
        assert_eq!(
            cfg,
            HealthConfig {
                interval_ms: 300,
                timeout_ms: 1000,
                rise: 2,
                fall: 5
            }
        );
        let mut s = State::default();
        let bad = HealthOverrides {
            rise: Some(0),
            ..Default::default()
        };
        assert_eq!(
            s.create_app_with("a", None, RANGE, bad),
            Err(StateError::Health)
        );
        assert_eq!(s.create_app_with("a", None, RANGE, o).unwrap().health, o);
    }

    #[test]
    fn the_state_file_round_trips_and_a_corrupt_one_is_refused_and_kept() {
        let dir = std::env::temp_dir().join(format!("gateway-state-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let file = StateFile::open(&dir).unwrap();
        assert!(matches!(
            StateFile::open(&dir),
            Err(StateFileError::Locked { .. })
        ));
        assert_eq!(file.load().unwrap(), State::default());
        let mut s = State::default();
        s.create_app("a", None, RANGE).unwrap();
        s.add_backend("a", addr("198.51.100.2:80"), 3).unwrap();
        file.save(&s).unwrap();
        assert_eq!(file.load().unwrap(), s);
        assert!(!dir.join("state.json.tmp").exists());

        fs::write(file.path(), b"{\"format\": 1, \"apps\": {").unwrap();
        let err = file.load().unwrap_err().to_string();
        assert!(err.contains("corrupt") && err.contains("line 1"), "{err}");
        assert_eq!(
            fs::read(file.path()).unwrap(),
            b"{\"format\": 1, \"apps\": {"
        );
        fs::write(file.path(), b"{\"format\": 2}").unwrap();
        assert!(matches!(
            file.load(),
            Err(StateFileError::Format { found: 2, .. })
        ));
        drop(file);
        fs::remove_dir_all(&dir).unwrap();
    }
}
