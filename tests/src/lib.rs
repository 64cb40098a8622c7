//! Test support for the gateway: the namespace harness, real TCP traffic and (for the datapath
//! tests) packet building. The tests themselves live in `tests/tests/`; they need root.

pub mod bench;
pub mod daemon;
pub mod datapath;
pub mod netns;
pub mod packet;
pub mod traffic;

/// Panics with a clear message unless running as root (the tests of this crate need it).
#[track_caller]
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "these tests need root (network namespaces, BPF): run `cargo xtask test` as root"
    );
}
