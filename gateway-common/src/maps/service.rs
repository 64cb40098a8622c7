//! Services, Maglev tables and backends: where a new flow goes ([`super::SERVICES4`],
//! [`super::MAGLEV`], [`super::BACKENDS4`]).

use core::net::SocketAddrV4;

use bytemuck::{Pod, Zeroable};

use super::MAGLEV_SIZE;
use crate::net::{IPPROTO_TCP, ip_to_net, port_to_net, socket_from_net};

/// Key of [`super::SERVICES4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ServiceKey4 {
    /// Public address (network order).
    pub ip: u32,
    /// Public port (network order).
    pub port: u16,
    /// IP protocol ([`IPPROTO_TCP`]).
    pub proto: u8,
    pub _pad: u8,
}

impl ServiceKey4 {
    /// The key of TCP service `ip:port` (network order), the padding zeroed. Every key is
    /// built here.
    #[inline(always)]
    pub const fn new(ip: u32, port: u16) -> Self {
        ServiceKey4 {
            ip,
            port,
            proto: IPPROTO_TCP,
            _pad: 0,
        }
    }

    /// The key of TCP service `public`.
    pub const fn from_addr(public: SocketAddrV4) -> Self {
        ServiceKey4::new(ip_to_net(*public.ip()), port_to_net(public.port()))
    }

    /// The service's public address.
    pub const fn addr(&self) -> SocketAddrV4 {
        socket_from_net(self.ip, self.port)
    }
}

/// Value of [`super::SERVICES4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Service {
    /// The app behind this service: key of [`super::MAGLEV`] and index of
    /// [`super::APP_STATS`].
    pub app_id: u32,
}

/// Value of [`super::APP_CONFIG`]: an app's datapath settings (all zero: none, the default).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct AppConfig {
    /// The largest MSS (bytes, host order) the app's SYNs (client → backend) and SYN-ACKs
    /// (backend → client) may announce: a larger MSS option is lowered to it, with the TCP
    /// checksum updated (as netfilter's `TCPMSS --set-mss`). 0: no clamp. A segment without an
    /// MSS option is left as it is (its receiver assumes 536, RFC 9293 §3.7.1, below any
    /// clamp the control plane accepts: [`MSS_CLAMP_MIN`]).
    pub mss_clamp: u16,
    pub _pad: u16,
    /// `APP_*` bits: [`APP_CLIENT_ADDRESS_TOA`]; 0: none.
    pub flags: u32,
}

/// [`AppConfig::flags`] bit: the app's backends are told each connection's client address in a
/// TOA option (`crate::net::toa`, `gateway app create --client-address toa`), added by the
/// datapath to what the client sends until the backend has certainly seen it. Taken by a flow at
/// its SYN (a change applies to new connections).
pub const APP_CLIENT_ADDRESS_TOA: u32 = 1;

/// The smallest MSS clamp an app may have: IPv4's default MSS (RFC 9293 §3.7.1), what a peer
/// assumes without the option.
pub const MSS_CLAMP_MIN: u16 = 536;

/// Value of [`super::MAGLEV`]: backend ids (0: none) indexed by `flow_hash % MAGLEV_SIZE`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct MaglevTable {
    pub slots: [u32; MAGLEV_SIZE as usize],
}

/// [`Backend4::flags`] bit: the backend may be chosen for new flows (active). Without it
/// (pending, unhealthy, draining) it only keeps its existing flows.
pub const BACKEND_ACCEPTING: u32 = 1;

/// Value of [`super::BACKENDS4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Backend4 {
    /// Address (network order).
    pub ip: u32,
    /// Port (network order).
    pub port: u16,
    pub _pad: u16,
    /// [`BACKEND_ACCEPTING`] and future bits.
    pub flags: u32,
}

impl Backend4 {
    /// Backend `addr` with `flags` ([`BACKEND_ACCEPTING`]...), the padding zeroed.
    pub const fn new(addr: SocketAddrV4, flags: u32) -> Self {
        Backend4 {
            ip: ip_to_net(*addr.ip()),
            port: port_to_net(addr.port()),
            _pad: 0,
            flags,
        }
    }

    /// The backend's address.
    pub const fn addr(&self) -> SocketAddrV4 {
        socket_from_net(self.ip, self.port)
    }
}
