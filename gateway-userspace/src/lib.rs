//! The gateway's userspace: the loader that owns the datapath's programs and maps. The daemon,
//! API and CLI build on it.

pub mod datapath;
pub mod maglev;

/// The eBPF object built from `gateway-ebpf` by `build.rs`, embedded in the binary.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway"));
