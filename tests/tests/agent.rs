//! `gateway agent` (issue 17, part 2): a real agent process attached to a test cgroup, a Python
//! server in that cgroup inside a namespace, and a raw-socket client (`rawtcp`) in another
//! namespace that plays the gateway's side: its ACK carries a TOA option or not, from a trusted
//! address or not. The server answers each message with what `accept()` and `getpeername()`
//! gave it.
//!
//! | what | address |
//! |---|---|
//! | the container host (`host` namespace, `eth0`) | 192.0.2.1/24 |
//! | the "gateway" (`client` namespace, `eth0`): trusted | 192.0.2.2/24 |
//! | another source there: not trusted | 192.0.2.3/24 |
//! | the client address the TOA option carries | 203.0.113.77:4242 |

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use gateway_common::net::{ip_to_net, port_to_net, toa};
use gateway_tests::{
    agent::{Agent, ask, peer_server, seen_as},
    cgroup::{CgroupGuard, cgroup2_root},
    daemon::gateway_bin,
    netns::{Bpffs, ChildGuard, Netns, RunDir, sweep_stale, unique_prefix},
    rawtcp::RawTcpClient,
    require_root, wait_for,
};

const HOST_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const TRUSTED_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const OTHER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 3);
const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 77), 4242);
const PORT: u16 = 8080;
/// The server's dual-stack socket's port.
const PORT6: u16 = 8081;
const METRICS: &str = "127.0.0.1:9718";

/// The TOA option for [`CLIENT`].
fn toa_option() -> [u8; 8] {
    toa::option(ip_to_net(*CLIENT.ip()), port_to_net(CLIENT.port()))
}

/// The two namespaces, the cgroup, the pin directory and a directory for logs.
struct Sandbox {
    host: Netns,
    client: Netns,
    cgroup: CgroupGuard,
    pins: Bpffs,
    dir: RunDir,
}

impl Sandbox {
    fn new() -> Self {
        sweep_stale();
        let prefix = unique_prefix();
        let dir = RunDir::new(&format!("{prefix}-agent"));
        let pins = Bpffs::new(&format!("{prefix}-agent-pins"));
        let cgroup = CgroupGuard::new("agent");
        let host = Netns::new(&format!("{prefix}-host"));
        let client = Netns::new(&format!("{prefix}-client"));
        host.ip(&format!(
            "link add eth0 type veth peer name eth0 netns {}",
            client.name()
        ));
        host.ip(&format!("addr add {HOST_IP}/24 dev eth0"));
        host.ip("link set eth0 up");
        client.ip(&format!("addr add {TRUSTED_IP}/24 dev eth0"));
        client.ip(&format!("addr add {OTHER_IP}/24 dev eth0"));
        client.ip("link set eth0 up");
        Sandbox {
            host,
            client,
            cgroup,
            pins,
            dir,
        }
    }

    fn pin_dir(&self) -> &Path {
        self.pins.path()
    }

    /// The Python server ([`PEER_SERVER`]) in the cgroup and the host namespace.
    fn server(&self) -> ChildGuard {
        peer_server(
            &self.cgroup,
            self.host.name(),
            self.dir.path(),
            HOST_IP,
            PORT,
            PORT6,
        )
    }

    /// The agent, in the host namespace (for its metrics address), started and attached.
    fn agent(&self, trusted: &str, run: u32) -> Agent {
        Agent::start(
            self.host.name(),
            self.cgroup.path(),
            trusted,
            METRICS,
            self.pin_dir(),
            self.dir.path().join(format!("agent-{run}.log")),
        )
    }

    /// A connection from `src` to the server's IPv4 socket whose handshake's ACK carries
    /// `options`.
    #[track_caller]
    fn connect(&self, src: SocketAddrV4, options: &[u8]) -> RawTcpClient {
        self.connect_to(src, PORT, options)
    }

    /// The same to the server's socket on `port`.
    #[track_caller]
    fn connect_to(&self, src: SocketAddrV4, port: u16, options: &[u8]) -> RawTcpClient {
        RawTcpClient::connect(&self.client, src, SocketAddrV4::new(HOST_IP, port), options)
            .unwrap_or_else(|e| panic!("connect from {src}: {e}"))
    }

    /// `gateway agent ARGS` (with this sandbox's pin directory when `pins`).
    fn cli(&self, args: &[&str], pins: bool) -> Output {
        let mut c = Command::new(gateway_bin());
        c.arg("agent").args(args);
        if pins {
            c.arg("--pin-dir").arg(self.pin_dir());
        }
        c.stdin(Stdio::null()).output().expect("run gateway agent")
    }

    /// `gateway agent status --json`, parsed.
    #[track_caller]
    fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"], true);
        assert!(
            out.status.success(),
            "agent status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// GET /metrics from the agent, in the Prometheus text format.
    fn scrape(&self) -> gateway_tests::metrics::Scrape {
        let (head, body) = self
            .host
            .run(|| {
                gateway_tests::traffic::http_exchange(
                    METRICS.parse().unwrap(),
                    "GET /metrics HTTP/1.0\r\nHost: agent\r\n\r\n",
                    Duration::from_secs(10),
                )
            })
            .expect("scrape the agent");
        assert!(head.contains(" 200 "), "{head}");
        gateway_tests::metrics::Scrape::parse(&body)
    }
}

fn counter(status: &serde_json::Value, label: &str) -> u64 {
    status["counters"]
        .as_array()
        .and_then(|c| c.iter().find(|p| p[0] == label))
        .and_then(|p| p[1].as_u64())
        .unwrap_or_else(|| panic!("no counter {label} in {status}"))
}

#[test]
fn the_app_sees_the_client_of_a_trusted_toa_option_and_nothing_else() {
    require_root();
    let sandbox = Sandbox::new();
    let mut agent = sandbox.agent(&TRUSTED_IP.to_string(), 1);
    let _server = sandbox.server();

    // From the trusted source with the option on the handshake's ACK: the client, for both.
    let src_a = SocketAddrV4::new(TRUSTED_IP, 40_001);
    let mut a = sandbox.connect(src_a, &toa_option());
    assert_eq!(ask(&mut a), seen_as(CLIENT, CLIENT));

    // The same to a dual-stack socket: the client, IPv4-mapped (getpeername6).
    let src_g = SocketAddrV4::new(TRUSTED_IP, 40_007);
    let mut g = sandbox.connect_to(src_g, PORT6, &toa_option());
    let mapped = format!("::ffff:{}:{}", CLIENT.ip(), CLIENT.port());
    assert_eq!(ask(&mut g), seen_as(&mapped, &mapped));

    // From another source with the option: as it is.
    let src_b = SocketAddrV4::new(OTHER_IP, 40_002);
    let mut b = sandbox.connect(src_b, &toa_option());
    assert_eq!(ask(&mut b), seen_as(src_b, src_b));

    // From the trusted source without the option: as it is.
    let src_c = SocketAddrV4::new(TRUSTED_IP, 40_003);
    let mut c = sandbox.connect(src_c, &[]);
    assert_eq!(ask(&mut c), seen_as(src_c, src_c));

    // The option on a later segment only, not on the one that established the connection.
    let src_d = SocketAddrV4::new(TRUSTED_IP, 40_004);
    let mut d = sandbox.connect(src_d, &[]);
    d.send_with_options(b"who am i?\n", &toa_option())
        .expect("send");
    let answer = String::from_utf8(d.recv(Duration::from_secs(3)).expect("recv")).unwrap();
    assert_eq!(answer.trim(), seen_as(src_d, src_d));

    // What the agent says: its cgroup, two connections mapped (a, g), each case counted.
    let status = sandbox.status();
    let cgroup = sandbox.cgroup.path().canonicalize().unwrap();
    assert_eq!(status["cgroup"], cgroup.display().to_string(), "{status}");
    assert_eq!(status["connections_mapped"], 2, "{status}");
    assert_eq!(
        status["trusted"],
        serde_json::json!([TRUSTED_IP]),
        "{status}"
    );
    assert_eq!(status["programs"].as_array().unwrap().len(), 3, "{status}");
    assert_eq!(counter(&status, "established"), 5, "{status}");
    assert_eq!(counter(&status, "trusted"), 4, "{status}");
    assert_eq!(counter(&status, "mapped"), 2, "{status}");
    assert_eq!(counter(&status, "trusted_without_option"), 2, "{status}");
    assert_eq!(counter(&status, "untrusted_options"), 1, "{status}");
    // accept() and getpeername() of connections a and g.
    assert_eq!(counter(&status, "getpeername_rewritten"), 4, "{status}");
    let text = sandbox.cli(&["status"], true);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&cgroup.display().to_string()), "{text}");
    assert!(text.contains("connections mapped:  2"), "{text}");
    let metrics = sandbox.scrape();
    assert_eq!(metrics.value("gateway_agent_mapped_total", &[]), 2.0);
    assert_eq!(
        metrics.value("gateway_agent_untrusted_options_total", &[]),
        1.0
    );
    assert_eq!(metrics.value("gateway_agent_connections_mapped", &[]), 2.0);
    for client in [b, c, d, g] {
        client.reset().expect("reset");
    }

    // Stopped, the agent leaves its programs attached: a's mapping holds.
    agent.stop();
    assert!(sandbox.pin_dir().join("link_sockops").exists());
    assert_eq!(ask(&mut a), seen_as(CLIENT, CLIENT));

    // Started again (trusting the other source too): the pinned links get the new programs,
    // the pinned maps (a's mapping, the counters) are reused, the trusted set is the new one.
    let mut agent = sandbox.agent(&format!("{TRUSTED_IP},{OTHER_IP}"), 2);
    let log = agent.log();
    assert!(log.contains("replaced=true"), "{log}");
    assert_eq!(ask(&mut a), seen_as(CLIENT, CLIENT));
    let src_e = SocketAddrV4::new(OTHER_IP, 40_005);
    let mut e = sandbox.connect(src_e, &toa_option());
    assert_eq!(ask(&mut e), seen_as(CLIENT, CLIENT));
    // g's mapping went when it closed (reset above); a's and e's are there.
    let mapped = |n: u64, closed: u64| {
        wait_for(Duration::from_secs(3), || {
            let s = sandbox.status();
            s["connections_mapped"] == n && counter(&s, "closed") == closed
        })
        .is_some()
    };
    assert!(mapped(2, 1), "{}", sandbox.status());
    let status = sandbox.status();
    assert_eq!(counter(&status, "mapped"), 3, "{status}");
    assert_eq!(status["trusted"], serde_json::json!([TRUSTED_IP, OTHER_IP]));

    // A mapped connection that closes loses its mapping.
    a.reset().expect("reset");
    let closed = mapped(1, 2);
    assert!(closed, "{}", sandbox.status());

    // `agent down` is refused while the agent runs, then detaches.
    let refused = sandbox.cli(&["down"], true);
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && why.contains("an agent is running"),
        "{why}"
    );
    assert!(sandbox.pin_dir().join("link_sockops").exists());
    agent.stop();
    let down = sandbox.cli(&["down"], true);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(!sandbox.pin_dir().join("link_sockops").exists());
    assert!(!sandbox.cli(&["status"], true).status.success());
    assert_eq!(
        ask(&mut e),
        seen_as(CLIENT, src_e),
        "detached: getpeername as it is"
    );
    let src_f = SocketAddrV4::new(TRUSTED_IP, 40_006);
    let mut f = sandbox.connect(src_f, &toa_option());
    assert_eq!(ask(&mut f), seen_as(src_f, src_f));
}

/// Runs `gateway agent ARGS` (which must fail at once) and returns its one line of error.
#[track_caller]
fn refused(args: &[&str], pins: &Path) -> String {
    let out = Command::new(gateway_bin())
        .arg("agent")
        .args(args)
        .arg("--pin-dir")
        .arg(pins)
        .stdin(Stdio::null())
        .output()
        .expect("run gateway agent");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "gateway agent {args:?} succeeded");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(!pins.exists(), "{args:?} created {}", pins.display());
    stderr
}

#[test]
fn bad_input_is_one_clear_error_and_attaches_nothing() {
    require_root();
    let cgroup = CgroupGuard::new("agent-bad");
    let cg = cgroup.path().to_str().unwrap();
    let pins = PathBuf::from(format!("/run/gateway-tests/{}-agent-pins", unique_prefix()));
    let pins = pins.as_path();
    let missing = format!("{cg}/missing");
    let err = refused(&["--cgroup", &missing, "--trusted", "192.0.2.2"], pins);
    assert!(err.contains("no such directory"), "{err}");
    let root = cgroup2_root();
    let err = refused(
        &["--cgroup", root.to_str().unwrap(), "--trusted", "192.0.2.2"],
        pins,
    );
    assert!(err.contains("the root cgroup"), "{err}");
    if Path::new("/sys/fs/cgroup/cpu/cgroup.procs").exists() {
        let err = refused(
            &["--cgroup", "/sys/fs/cgroup/cpu", "--trusted", "192.0.2.2"],
            pins,
        );
        assert!(err.contains("not a cgroup v2"), "{err}");
    }
    let err = refused(&["--cgroup", cg, "--trusted", "2001:db8::1"], pins);
    assert!(err.contains("not an IPv4 address"), "{err}");
    let err = refused(&["--cgroup", cg, "--trusted", ""], pins);
    assert!(err.contains("no trusted source"), "{err}");
    let err = refused(&["run", "--cgroup", cg, "--trusted", ","], pins);
    assert!(err.contains("no trusted source"), "{err}");
    let err = refused(
        &[
            "--cgroup",
            cg,
            "--trusted",
            "192.0.2.2",
            "--max-connections",
            "100000000",
        ],
        pins,
    );
    assert!(err.contains("more than 4194304"), "{err}");
    // A pin directory that is not on a bpffs and holds files is not mounted over (its files
    // would be hidden).
    let dir = RunDir::new(&format!("{}-agent-full", unique_prefix()));
    let kept = dir.path().join("kept");
    std::fs::write(&kept, "mine").expect("a file");
    let out = Command::new(gateway_bin())
        .args([
            "agent",
            "--cgroup",
            cg,
            "--trusted",
            "192.0.2.2",
            "--pin-dir",
        ])
        .arg(dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("run gateway agent");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the agent ran: {stderr}");
    assert!(stderr.contains("is not empty"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&kept).ok().as_deref(),
        Some("mine"),
        "the file is still there"
    );
}

/// A `--metrics` address the agent cannot bind (in use in its namespace) is a bad input like
/// the others: one line of error, and nothing attached to the cgroup nor pinned (it used to
/// attach and pin its three programs, then fail on the address, leaving them attached).
#[test]
fn a_metrics_address_in_use_is_refused_before_anything_is_attached() {
    require_root();
    sweep_stale();
    let prefix = unique_prefix();
    let cgroup = CgroupGuard::new("agent-metrics");
    let pins = Bpffs::new(&format!("{prefix}-agent-metrics-pins"));
    let ns = Netns::new(&format!("{prefix}-metrics"));
    ns.ip("link set lo up");
    let held = ns
        .run(|| std::net::TcpListener::bind("127.0.0.1:0"))
        .expect("a listener in the namespace");
    let addr = held.local_addr().expect("its address").to_string();
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name()))
        .arg(gateway_bin())
        .arg("agent")
        .arg("--cgroup")
        .arg(cgroup.path())
        .args(["--trusted", "192.0.2.2", "--metrics", &addr, "--pin-dir"])
        .arg(pins.path())
        .stdin(Stdio::null())
        .output()
        .expect("run gateway agent");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the agent ran: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("binding the metrics address {addr}")),
        "{stderr}"
    );
    let pinned: Vec<String> = std::fs::read_dir(pins.path())
        .expect("the pin directory")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("link_") || n.starts_with("gw_agt_"))
        .collect();
    assert!(pinned.is_empty(), "pinned: {pinned:?}");
    let attached = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup.path())
        .output()
        .expect("bpftool cgroup show");
    let attached = String::from_utf8_lossy(&attached.stdout);
    assert!(
        !attached.contains("gateway_agent"),
        "attached to the cgroup:\n{attached}"
    );
    drop(held);
}
