//! What the operator asked for: apps, their public ports and their backends. Validation and
//! allocation live here, pure (no kernel, no I/O), so that every rule has a unit test; the
//! daemon applies a validated [`State`] to the datapath. `rotation` holds the state's side of
//! deploys and drains, `file` persists it as one JSON file, written atomically, `error` says
//! what a refusal is.

mod error;
mod file;
mod rotation;

use std::{collections::BTreeMap, fmt, net::SocketAddrV4, str::FromStr};

use gateway_common::maps::{APP_CLIENT_ADDRESS_TOA, MAX_APPS, MAX_BACKENDS, MSS_CLAMP_MIN};
use serde::{Deserialize, Serialize};

pub use self::{
    error::{ErrorKind, StateError},
    file::{StateFile, StateFileError},
};

/// The longest app name (a DNS label).
pub const NAME_MAX: usize = 63;
/// Backend weights are 1..=WEIGHT_MAX (HAProxy's range, zero excluded: a backend that must not
/// get new connections is removed).
pub const WEIGHT_MAX: u32 = 256;
/// The weight of a backend added without one.
pub const WEIGHT_DEFAULT: u32 = 1;
/// The largest MSS clamp an app may have: the largest MSS an IPv4 segment can carry (65535
/// bytes less 20 of IPv4 header and 20 of TCP header). The smallest is
/// [`MSS_CLAMP_MIN`], what a peer assumes without the option.
pub const MSS_CLAMP_MAX: u16 = 65495;
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

/// Checks an app's MSS clamp (bytes): [`MSS_CLAMP_MIN`] to [`MSS_CLAMP_MAX`].
pub fn check_mss_clamp(mss: u32) -> Result<u16, StateError> {
    match u16::try_from(mss) {
        Ok(mss) if (MSS_CLAMP_MIN..=MSS_CLAMP_MAX).contains(&mss) => Ok(mss),
        _ => Err(StateError::MssClamp(mss)),
    }
}

/// Whether an app's backends are told each connection's client address, and how
/// (`--client-address`, `client_address` in the API and the state file).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum ClientAddress {
    /// Not told: a backend sees the gateway's SNAT address (the default).
    #[default]
    None,
    /// In a TOA option (TCP option 254) the datapath adds to what the client sends, until the
    /// backend has certainly seen it: see docs/client-address.md. Taken by a connection at its
    /// SYN, so that a change applies to new connections.
    Toa,
}

impl ClientAddress {
    /// The app flags ([`gateway_common::maps::AppConfig::flags`]) of this setting.
    pub const fn flags(self) -> u32 {
        match self {
            ClientAddress::None => 0,
            ClientAddress::Toa => APP_CLIENT_ADDRESS_TOA,
        }
    }
}

impl fmt::Display for ClientAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClientAddress::None => "none",
            ClientAddress::Toa => "toa",
        })
    }
}

impl FromStr for ClientAddress {
    type Err = StateError;

    /// `toa` or `none`, as the CLI, the API and the state file spell it.
    fn from_str(s: &str) -> Result<Self, StateError> {
        <Self as clap::ValueEnum>::from_str(s, false)
            .map_err(|_| StateError::ClientAddress(s.to_owned()))
    }
}

impl TryFrom<String> for ClientAddress {
    type Error = StateError;

    fn try_from(s: String) -> Result<Self, StateError> {
        s.parse()
    }
}

/// The largest rate limit, packets per second.
pub const RATE_PPS_MAX: u32 = 10_000_000;
/// A burst is at most this many seconds of the rate.
pub const RATE_BURST_FACTOR: u32 = 10;

/// An app's packet rate limit, applied to each of its backends separately and to each
/// direction separately (to the backend, from the backend), the same numbers for both:
/// `pps` packets per second, `burst` packets at once above the rate. `--rate-limit
/// 1000pps[,burst=200]` (also `1000`); `rate_limit: {"pps": 1000, "burst": 200}` in the API
/// and the state file.
/// Checked when read (the API's bodies, the state file), as `--rate-limit` is: a file with a
/// limit this build refuses does not load (the datapath would have made 0 pps one a second).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RateLimitFields")]
pub struct RateLimit {
    pub pps: u32,
    pub burst: u32,
}

/// [`RateLimit`]'s fields as they are read, before [`RateLimit::check`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitFields {
    pps: u32,
    burst: u32,
}

impl TryFrom<RateLimitFields> for RateLimit {
    type Error = StateError;

    fn try_from(f: RateLimitFields) -> Result<Self, StateError> {
        RateLimit {
            pps: f.pps,
            burst: f.burst,
        }
        .check()
    }
}

impl RateLimit {
    /// A limit of `pps`, with `burst` or the default one (300 ms of the rate, at least 1: with
    /// 100 ms, a bulk TCP transfer through a 1,000 pps limit got 0.70–0.81 MB/s of its 1.45, with
    /// 300 ms above 1.05; policing makes TCP lose more than shaping, and a burst absorbs it),
    /// checked by [`RateLimit::check`].
    pub fn new(pps: u32, burst: Option<u32>) -> Result<Self, StateError> {
        let burst = burst.unwrap_or((pps.saturating_mul(3) / 10).max(1));
        RateLimit { pps, burst }.check()
    }

    /// Checks the ranges: pps 1 to [`RATE_PPS_MAX`], burst 1 to [`RATE_BURST_FACTOR`] times
    /// pps.
    pub fn check(self) -> Result<Self, StateError> {
        let burst_max = u64::from(self.pps) * u64::from(RATE_BURST_FACTOR);
        if (1..=RATE_PPS_MAX).contains(&self.pps)
            && self.burst >= 1
            && u64::from(self.burst) <= burst_max
        {
            Ok(self)
        } else {
            Err(StateError::RateLimit(self.to_string()))
        }
    }

    /// The datapath's numbers ([`crate::datapath::Datapath::set_rate_limit`]).
    pub const fn datapath(self) -> (u32, u32) {
        (self.pps, self.burst)
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}pps,burst={}", self.pps, self.burst)
    }
}

impl FromStr for RateLimit {
    type Err = StateError;

    /// `1000pps`, `1000pps,burst=200` or `1000`.
    fn from_str(s: &str) -> Result<Self, StateError> {
        let bad = || StateError::RateLimit(s.to_owned());
        let number = |t: &str| -> Result<u32, StateError> {
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            t.parse().map_err(|_| bad())
        };
        let (rate, burst) = match s.split_once(',') {
            Some((rate, burst)) => {
                let burst = burst.trim().strip_prefix("burst=").ok_or_else(bad)?;
                (rate, Some(number(burst.trim())?))
            }
            None => (s, None),
        };
        let rate = rate.trim();
        let pps = number(rate.strip_suffix("pps").unwrap_or(rate))?;
        RateLimit::new(pps, burst).map_err(|_| bad())
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
    /// The largest MSS (bytes) its SYNs and SYN-ACKs may announce: a larger MSS option is
    /// lowered to it by the datapath. `None`: no clamp. Absent from the files of releases
    /// before it (and left out when `None`, so that those releases still read the file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mss_clamp: Option<u16>,
    /// Whether its backends are told each connection's client address (a TOA option). Absent
    /// from the files of releases before it, and left out when `none`, as `mss_clamp`.
    #[serde(default, skip_serializing_if = "is_default")]
    pub client_address: ClientAddress,
    /// Its packet rate limit, for each of its backends and each direction. `None`: no limit.
    /// Absent from the files of releases before it, and left out when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// The plan of the daemon's config file `rate_limit` came from (for display: the
    /// numbers are what applies, whatever the config file says now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
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
            mss_clamp: None,
            client_address: ClientAddress::None,
            rate_limit: None,
            plan: None,
        };
        Ok(self.apps.entry(name.to_owned()).or_insert(app))
    }

    /// Deletes app `name` and returns it.
    pub fn delete_app(&mut self, name: &str) -> Result<App, StateError> {
        self.apps
            .remove(name)
            .ok_or_else(|| StateError::UnknownApp(name.to_owned()))
    }

    /// Sets app `name`'s MSS clamp to `mss` bytes (checked by [`check_mss_clamp`]), or removes
    /// it (`None`).
    pub fn set_mss_clamp(&mut self, name: &str, mss: Option<u32>) -> Result<&App, StateError> {
        self.app(name)?;
        let mss = mss.map(check_mss_clamp).transpose()?;
        let app = self.app_mut(name)?;
        app.mss_clamp = mss;
        Ok(app)
    }

    /// Sets app `name`'s client address setting (`none` removes it). Its other settings are
    /// left as they are.
    pub fn set_client_address(
        &mut self,
        name: &str,
        client_address: ClientAddress,
    ) -> Result<&App, StateError> {
        let app = self.app_mut(name)?;
        app.client_address = client_address;
        Ok(app)
    }

    /// Sets app `name`'s rate limit (checked by [`RateLimit::check`]), or removes it (`None`),
    /// with the name of the plan it came from, if any. Its other settings are left as they are.
    pub fn set_rate_limit(
        &mut self,
        name: &str,
        limit: Option<RateLimit>,
        plan: Option<String>,
    ) -> Result<&App, StateError> {
        self.app(name)?;
        let limit = limit.map(RateLimit::check).transpose()?;
        let app = self.app_mut(name)?;
        app.plan = limit.and(plan);
        app.rate_limit = limit;
        Ok(app)
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small public port range for the state's tests.
    pub(crate) const RANGE: PortRange = PortRange::new(20000, 20002);

    /// An address from its text.
    pub(crate) fn addr(s: &str) -> SocketAddrV4 {
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
    fn rate_limits_parse_are_checked_set_and_removed() {
        let rl = |pps, burst| RateLimit { pps, burst };
        for (text, want) in [
            ("1000pps", rl(1000, 300)),
            ("1000pps,burst=200", rl(1000, 200)),
            ("1000", rl(1000, 300)),
            ("1000, burst=1", rl(1000, 1)),
            ("1pps", rl(1, 1)),
            ("3pps", rl(3, 1)),
            ("9pps", rl(9, 2)),
            ("10000000pps", rl(10_000_000, 3_000_000)),
            ("10pps,burst=100", rl(10, 100)),
        ] {
            assert_eq!(text.parse::<RateLimit>(), Ok(want), "{text}");
        }
        for bad in [
            "",
            "pps",
            "0pps",
            "0",
            "-5pps",
            "10000001pps",
            "1000pps,burst=0",
            "10pps,burst=101",
            "1000pps,burst=",
            "1000pps,200",
            "1000 pps",
            "1000bps",
            "1kpps",
            "99999999999999pps",
            "1000pps,burst=200,x",
        ] {
            assert_eq!(
                bad.parse::<RateLimit>(),
                Err(StateError::RateLimit(bad.to_owned())),
                "{bad:?}"
            );
        }
        assert_eq!(
            StateError::RateLimit("fast".into()).to_string(),
            "rate limit must look like 1000pps or 1000pps,burst=200 (1 to 10000000 pps, a burst of 1 to 10 times the pps), not \"fast\""
        );
        assert_eq!(StateError::RateLimit("x".into()).kind(), ErrorKind::Invalid);
        assert_eq!(
            StateError::UnknownPlan("x".into()).kind(),
            ErrorKind::Invalid
        );
        assert_eq!(rl(1000, 200).to_string(), "1000pps,burst=200");
        assert_eq!(rl(1000, 200).datapath(), (1000, 200));
        // The API's numbers are checked the same.
        let json: RateLimit =
            serde_json::from_value(serde_json::json!({"pps": 5, "burst": 2})).unwrap();
        assert_eq!(json, rl(5, 2));
        assert!(serde_json::from_value::<RateLimit>(serde_json::json!({"pps": 5})).is_err());
        assert!(
            serde_json::from_value::<RateLimit>(serde_json::json!({"pps": 5, "burst": 1, "x": 1}))
                .is_err()
        );
        for bad in [
            serde_json::json!({"pps": 0, "burst": 1}),
            serde_json::json!({"pps": 10, "burst": 0}),
            serde_json::json!({"pps": 10, "burst": 101}),
            serde_json::json!({"pps": 10_000_001, "burst": 1}),
        ] {
            let err = serde_json::from_value::<RateLimit>(bad.clone()).unwrap_err();
            assert!(
                err.to_string().contains("rate limit must look like"),
                "{bad}: {err}"
            );
        }

        let mut s = State::default();
        let a = s.create_app("a", None, RANGE).unwrap();
        assert_eq!((a.rate_limit, a.plan.clone()), (None, None));
        s.set_mss_clamp("a", Some(1360)).unwrap();
        let a = s
            .set_rate_limit("a", Some(rl(1000, 100)), Some("small".into()))
            .unwrap();
        assert_eq!(
            (a.rate_limit, a.plan.as_deref(), a.mss_clamp),
            (Some(rl(1000, 100)), Some("small"), Some(1360))
        );
        let before = s.clone();
        for (limit, err) in [
            (rl(0, 1), StateError::RateLimit("0pps,burst=1".into())),
            (rl(10, 0), StateError::RateLimit("10pps,burst=0".into())),
            (rl(10, 101), StateError::RateLimit("10pps,burst=101".into())),
            (
                rl(10_000_001, 1),
                StateError::RateLimit("10000001pps,burst=1".into()),
            ),
        ] {
            assert_eq!(s.set_rate_limit("a", Some(limit), None).unwrap_err(), err);
            assert_eq!(s, before, "{limit:?}");
        }
        assert_eq!(
            s.set_rate_limit("x", Some(rl(1, 1)), None).unwrap_err(),
            StateError::UnknownApp("x".into())
        );
        // Numbers without a plan forget the plan; none forgets both.
        let a = s.set_rate_limit("a", Some(rl(5, 5)), None).unwrap();
        assert_eq!((a.rate_limit, a.plan.clone()), (Some(rl(5, 5)), None));
        let a = s.set_rate_limit("a", None, Some("small".into())).unwrap();
        assert_eq!(
            (a.rate_limit, a.plan.clone(), a.mss_clamp),
            (None, None, Some(1360))
        );
    }

    #[test]
    fn mss_clamps_are_checked_set_and_removed() {
        for ok in [536, 1360, 1460, 65495] {
            assert_eq!(check_mss_clamp(ok), Ok(ok as u16), "{ok}");
        }
        for bad in [0, 1, 535, 65496, 65535, 65536, u32::MAX] {
            assert_eq!(
                check_mss_clamp(bad),
                Err(StateError::MssClamp(bad)),
                "{bad}"
            );
        }
        let mut s = State::default();
        assert_eq!(s.create_app("a", None, RANGE).unwrap().mss_clamp, None);
        assert_eq!(
            s.set_mss_clamp("a", Some(1360)).unwrap().mss_clamp,
            Some(1360)
        );
        let before = s.clone();
        for (name, mss, err) in [
            ("a", Some(535), StateError::MssClamp(535)),
            ("a", Some(65496), StateError::MssClamp(65496)),
            ("x", Some(1360), StateError::UnknownApp("x".into())),
            ("x", None, StateError::UnknownApp("x".into())),
        ] {
            assert_eq!(s.set_mss_clamp(name, mss).unwrap_err(), err);
            assert_eq!(s, before, "a refused change leaves the state as it was");
        }
        assert_eq!(s.set_mss_clamp("a", None).unwrap().mss_clamp, None);
    }

    #[test]
    fn client_addresses_are_read_written_and_set_apart_from_the_mss_clamp() {
        for (text, ca, flags) in [
            ("none", ClientAddress::None, 0),
            ("toa", ClientAddress::Toa, APP_CLIENT_ADDRESS_TOA),
        ] {
            assert_eq!(text.parse(), Ok(ca));
            assert_eq!(ca.to_string(), text);
            assert_eq!(ca.flags(), flags);
            assert_eq!(serde_json::to_value(ca).unwrap(), text);
            assert_eq!(
                serde_json::from_value::<ClientAddress>(text.into()).unwrap(),
                ca
            );
        }
        for bad in ["", "TOA", "Toa", " toa", "proxy", "foo"] {
            assert_eq!(
                bad.parse::<ClientAddress>(),
                Err(StateError::ClientAddress(bad.to_owned()))
            );
            let err = serde_json::from_value::<ClientAddress>(bad.into()).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with("client address must be toa or none, not"),
                "{err}"
            );
        }
        assert_eq!(
            StateError::ClientAddress("foo".into()).to_string(),
            "client address must be toa or none, not \"foo\""
        );
        assert_eq!(
            StateError::ClientAddress("foo".into()).kind(),
            ErrorKind::Invalid
        );

        let mut s = State::default();
        let a = s.create_app("a", None, RANGE).unwrap();
        assert_eq!(a.client_address, ClientAddress::None);
        s.set_mss_clamp("a", Some(1360)).unwrap();
        let a = s.set_client_address("a", ClientAddress::Toa).unwrap();
        assert_eq!(
            (a.client_address, a.mss_clamp),
            (ClientAddress::Toa, Some(1360))
        );
        let a = s.set_mss_clamp("a", None).unwrap();
        assert_eq!((a.client_address, a.mss_clamp), (ClientAddress::Toa, None));
        let before = s.clone();
        assert_eq!(
            s.set_client_address("x", ClientAddress::Toa).unwrap_err(),
            StateError::UnknownApp("x".into())
        );
        assert_eq!(s, before);
        let a = s.set_client_address("a", ClientAddress::None).unwrap();
        assert_eq!(a.client_address, ClientAddress::None);
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
}
