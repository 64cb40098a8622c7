//! The harness tears everything down on every path, a panic included, and stale leftovers of a
//! killed test process are swept.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use gateway::datapath::{AttachMode, Datapath};
use gateway_tests::{
    netns::{self, Topology, netns_exists},
    require_root,
};

/// The two tests of this file run one at a time: the other one's topology sweeps stale
/// namespaces, and would sweep the fake stale one while `ip netns add` is still creating it.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn bpffs_mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .expect("mounts")
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(path.to_str().unwrap()))
}

fn alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

struct Seen {
    netns: Vec<String>,
    bpffs: PathBuf,
    pin: PathBuf,
    pid: u32,
    link_id: u32,
}

#[test]
fn a_panic_inside_the_harness_tears_everything_down() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let topo = Topology::new(2);
        let pin_dir = topo.bpffs.path().to_owned();
        let iface = topo.client.gw_iface.clone();
        let datapath = topo.gateway.run(move || {
            let mut d = Datapath::load().expect("load");
            d.attach(&iface, AttachMode::Tc, Some(&pin_dir))
                .expect("attach");
            d
        });
        let pin = datapath.attachments()[0].pin_path().unwrap().to_owned();
        let link_id = datapath.attachments()[0].link_id;
        assert!(link_exists(link_id));
        let mut sleeper = topo.client.command("sleep");
        sleeper.arg("300");
        let child = topo.client.spawn(sleeper);
        // Let go of the process's own link fd: only the pin keeps the attachment now.
        drop(datapath);
        tx.send(Seen {
            netns: topo.netns_names(),
            bpffs: topo.bpffs.path().to_owned(),
            pin,
            pid: child.id(),
            link_id,
        })
        .unwrap();
        assert!(bpffs_mounted(topo.bpffs.path()));
        std::mem::forget(child); // only the namespace teardown may end it
        panic!("on purpose, with a topology, a pinned link and a process alive");
    }));
    assert!(result.is_err(), "the closure was meant to panic");
    let seen = rx.recv().unwrap();
    assert_eq!(seen.netns.len(), 4);
    for name in &seen.netns {
        assert!(!netns_exists(name), "namespace {name} survived the panic");
    }
    assert!(!bpffs_mounted(&seen.bpffs), "bpffs survived the panic");
    assert!(!seen.bpffs.exists(), "bpffs directory survived the panic");
    assert!(!seen.pin.exists());
    // The process inside the namespace is gone (it may take a moment to be reaped).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while alive(seen.pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(seen.pid), "process {} survived the panic", seen.pid);
    // The pinned link went with the bpffs and the interface.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while link_exists(seen.link_id) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !link_exists(seen.link_id),
        "link {} survived the panic",
        seen.link_id
    );
}

/// Whether the kernel still has the bpf_link `id`.
fn link_exists(id: u32) -> bool {
    Command::new("bpftool")
        .args(["link", "show", "id", &id.to_string()])
        .output()
        .expect("bpftool")
        .status
        .success()
}

#[test]
fn stale_namespaces_of_a_dead_process_are_swept() {
    require_root();
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // A pid that cannot be alive: above the kernel's pid_max.
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let name = format!("{}{}x0-client", netns::PREFIX, pid_max + 1);
    netns::ip(&format!("netns add {name}"));
    let guard = netns::Netns::adopt(&name);
    let removed = netns::sweep_stale();
    assert!(removed.contains(&name), "{removed:?}");
    assert!(!netns_exists(&name));
    drop(guard);
}
