//! Test support for the gateway: the namespace harness, real TCP traffic and (for the datapath
//! tests) packet building. The tests themselves live in `tests/tests/`; they need root.

pub mod agent;
pub mod bench;
pub mod bulk;
pub mod cgroup;
pub mod cluster;
pub mod compare;
pub mod daemon;
pub mod datapath;
pub mod etcd;
pub mod fuzz;
pub mod hostile;
pub mod icmp;
pub mod metrics;
pub mod model;
pub mod netns;
pub mod packet;
pub mod raw;
pub mod rawtcp;
pub mod routed;
pub mod scenario;
pub mod traffic;

/// Polls `ready` every 10 ms until it holds or `limit` has passed: how long that took, or
/// `None` if it never held. Every wait of the tests goes through here, bounded.
pub fn wait_for(
    limit: std::time::Duration,
    mut ready: impl FnMut() -> bool,
) -> Option<std::time::Duration> {
    let start = std::time::Instant::now();
    loop {
        if ready() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Panics with a clear message unless running as root (the tests of this crate need it).
#[track_caller]
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "these tests need root (network namespaces, BPF): run `cargo xtask test` as root"
    );
}
