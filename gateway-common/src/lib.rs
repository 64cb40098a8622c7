//! Types shared by the gateway's eBPF datapath and its userspace.
//!
//! Every map key and value here is `#[repr(C)]`, made of integers only, with explicit padding,
//! and derives bytemuck's `Pod`, which refuses hidden padding at compile time. Each field's doc
//! says its byte order. Map names are defined once, here, with a version suffix that changes
//! whenever a layout does.
#![no_std]

pub mod agent;
pub mod bench;
pub mod hash;
pub mod maps;
pub mod net;
pub mod stats;
pub mod syncookie;

pub use hash::flow_hash4;
pub use stats::{DropReason, GlobalStat};
