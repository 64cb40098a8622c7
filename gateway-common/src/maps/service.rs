//! Services, Maglev tables and backends: where a new flow goes ([`super::SERVICES4`],
//! [`super::MAGLEV`], [`super::BACKENDS4`]).

use bytemuck::{Pod, Zeroable};

use super::MAGLEV_SIZE;

/// Key of [`super::SERVICES4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ServiceKey4 {
    /// Public address (network order).
    pub ip: u32,
    /// Public port (network order).
    pub port: u16,
    /// IP protocol (6: TCP).
    pub proto: u8,
    pub _pad: u8,
}

/// Value of [`super::SERVICES4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Service {
    /// The app behind this service: key of [`super::MAGLEV`] and index of
    /// [`super::APP_STATS`].
    pub app_id: u32,
}

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
