//! What the client-address tests share (issue 17): a `gateway agent` process on a test cgroup,
//! and processes started inside that cgroup in a namespace, among them a Python server that
//! answers each message with the peer addresses `accept()` and `getpeername()` gave it.

use std::{
    fmt::Display,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use crate::{
    cgroup::CgroupGuard, daemon::gateway_bin, netns::ChildGuard, rawtcp::RawTcpClient, wait_for,
};

/// Answers each message of each connection with `accept=IP:PORT peer=IP:PORT`: the address
/// `accept()` gave and what `getpeername()` gives now; on an IPv4 socket at `argv[1]:argv[2]`
/// and a dual-stack IPv6 one at `[::]:argv[3]`. Exits after 60 s whatever happens.
pub const PEER_SERVER: &str = r#"
import signal, socket, sys, threading, time
signal.alarm(60)
def serve(c, a):
    with c:
        while True:
            try:
                d = c.recv(4096)
            except OSError:
                return
            if not d:
                return
            p = c.getpeername()
            c.sendall(f"accept={a[0]}:{a[1]} peer={p[0]}:{p[1]}\n".encode())
def accept(s):
    while True:
        c, a = s.accept()
        threading.Thread(target=serve, args=(c, a), daemon=True).start()
def listen(family, ip, port):
    s = socket.socket(family)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind((ip, port))
    s.listen(16)
    threading.Thread(target=accept, args=(s,), daemon=True).start()
listen(socket.AF_INET, sys.argv[1], int(sys.argv[2]))
listen(socket.AF_INET6, "::", int(sys.argv[3]))
print("listening", flush=True)
while True:
    time.sleep(1)
"#;

/// Starts `argv` in `cgroup` (joined before it execs, so every socket it makes is the cgroup's)
/// and in the network namespace `ns`, its output in `log`; waits until the log holds `ready`.
pub fn in_cgroup(
    cgroup: &CgroupGuard,
    ns: &str,
    argv: &[&str],
    log: &Path,
    ready: &str,
) -> ChildGuard {
    let shell = format!(
        "echo $$ > {}/cgroup.procs && exec ip netns exec {ns} \"$@\"",
        cgroup.path().display()
    );
    let file = std::fs::File::create(log).expect("a log");
    let child = Command::new("sh")
        .args(["-c", &shell, "sh"])
        .args(argv)
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .spawn()
        .expect("spawn in the cgroup");
    let mut guard = ChildGuard::from(child);
    let read = || std::fs::read_to_string(log).unwrap_or_default();
    let up = wait_for(Duration::from_secs(10), || {
        if let Some(status) = guard.exited() {
            panic!("{argv:?} exited ({status}): {}", read());
        }
        read().contains(ready)
    });
    assert!(
        up.is_some(),
        "{argv:?} was not ready within 10 s: {}",
        read()
    );
    assert!(
        cgroup.pids().contains(&(guard.id() as i32)),
        "{argv:?} is not in the cgroup"
    );
    guard
}

/// [`PEER_SERVER`] in `cgroup` and namespace `ns`, on `ip:port` and `[::]:port6` (dual-stack),
/// its script and log in `dir`.
pub fn peer_server(
    cgroup: &CgroupGuard,
    ns: &str,
    dir: &Path,
    ip: Ipv4Addr,
    port: u16,
    port6: u16,
) -> ChildGuard {
    let script = dir.join("server.py");
    std::fs::write(&script, PEER_SERVER).expect("write the server");
    let (ip, port, port6) = (ip.to_string(), port.to_string(), port6.to_string());
    let argv = [
        "python3",
        script.to_str().expect("utf-8"),
        &ip,
        &port,
        &port6,
    ];
    in_cgroup(cgroup, ns, &argv, &dir.join("server.log"), "listening")
}

/// What [`PEER_SERVER`] answers for a connection `accept()` saw from `accept` whose peer is
/// `peer` now.
pub fn seen_as(accept: impl Display, peer: impl Display) -> String {
    format!("accept={accept} peer={peer}")
}

/// Sends a message on `client` and returns the server's answer: `accept=... peer=...`.
#[track_caller]
pub fn ask(client: &mut RawTcpClient) -> String {
    client.send(b"who am i?\n").expect("send");
    let answer = client.recv(Duration::from_secs(3)).expect("recv");
    String::from_utf8(answer).expect("utf-8").trim().to_owned()
}

/// A running `gateway agent`.
pub struct Agent {
    child: Option<ChildGuard>,
    log: PathBuf,
}

impl Agent {
    /// `gateway agent --cgroup CG --trusted TRUSTED --pin-dir PINS --metrics METRICS` in the
    /// network namespace `ns` (for its metrics address), started and attached, its output in
    /// `log`. Through `nsenter`, which joins the network namespace only: `ip netns exec` mounts
    /// a sysfs of its own on /sys, without the cgroup2 mount under it.
    pub fn start(
        ns: &str,
        cgroup: &Path,
        trusted: &str,
        metrics: &str,
        pins: &Path,
        log: PathBuf,
    ) -> Agent {
        let file = std::fs::File::create(&log).expect("agent log");
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg(gateway_bin())
            .arg("agent")
            .arg("--cgroup")
            .arg(cgroup)
            .args(["--trusted", trusted, "--metrics", metrics])
            .arg("--pin-dir")
            .arg(pins)
            .env("GATEWAY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("spawn the agent");
        let mut child = ChildGuard::from(child);
        let read = || std::fs::read_to_string(&log).unwrap_or_default();
        let attached = wait_for(Duration::from_secs(20), || {
            if let Some(status) = child.exited() {
                panic!("the agent exited ({status}) at start:\n{}", read());
            }
            read().contains("serving metrics")
        });
        assert!(attached.is_some(), "the agent did not start:\n{}", read());
        Agent {
            child: Some(child),
            log,
        }
    }

    /// SIGTERM: the agent exits and leaves its programs attached.
    #[track_caller]
    pub fn stop(&mut self) {
        let status = self
            .child
            .take()
            .expect("running")
            .terminate(Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "the agent did not exit cleanly ({status:?}):\n{}",
            self.log()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
