//! The gateway's userspace: the loader that owns the datapath's programs and maps
//! ([`datapath`]), the desired state ([`state`]), the daemon ([`daemon`]) and its API
//! ([`api`]), and the operator's CLI ([`cli`]) that the `gateway` binary runs; [`agent`] is
//! `gateway agent`, which runs on container hosts rather than on the gateway.

pub mod agent;
pub mod api;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod flows;
pub mod health;
pub mod maglev;
pub mod metrics;
pub mod reset;
pub mod state;

/// The eBPF object built from `gateway-ebpf` by `build.rs`, embedded in the binary.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway"));
