//! The real `gateway` binary in a topology: the daemon in the gateway namespace, the CLI from
//! the test (the API socket is a path, reachable from any namespace).

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use gateway::datapath::AttachMode;

use crate::netns::{ChildGuard, RunDir, Topology, netns_command, unique_prefix};

/// How long the daemon may take to serve its API after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The `gateway` binary: `$GATEWAY_BIN`, else the workspace's debug build (which
/// `cargo xtask test` builds before the tests).
pub fn gateway_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("GATEWAY_BIN") {
        return path.into();
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/gateway");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p gateway-userspace` first (`cargo xtask test` does), or set GATEWAY_BIN",
        path.display()
    );
    path
}

/// `gateway daemon` running in a topology's gateway namespace with its own state directory,
/// API socket and pin directory (on the topology's bpffs). Killed on drop.
pub struct Daemon {
    child: Option<ChildGuard>,
    /// State, socket and log live here.
    pub dir: RunDir,
    pub socket: PathBuf,
    pub bpffs: PathBuf,
    gateway_ns: String,
    args: Vec<String>,
    starts: u32,
}

impl Daemon {
    /// The daemon arguments for `topo`: every gateway interface, the topology's public and
    /// SNAT addresses, and `extra`.
    pub fn args(topo: &Topology, mode: Option<AttachMode>, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--public-ip".into(),
            Topology::PUBLIC_IP.to_string(),
            "--snat-ip".into(),
            Topology::SNAT_IP.to_string(),
            // Health checks 5x faster than the default, and conntrack scans (connection counts)
            // 20x, so that tests wait less.
            "--check-interval".into(),
            "200ms".into(),
            "--scan-interval".into(),
            "100ms".into(),
        ];
        for iface in topo.gateway_ifaces() {
            args.extend(["--iface".into(), iface]);
        }
        if let Some(mode) = mode {
            args.extend(["--attach".into(), mode.to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Starts the daemon in `topo`'s gateway namespace (in `mode`, or the default for veth)
    /// and waits until its API answers.
    #[track_caller]
    pub fn start(topo: &Topology, mode: Option<AttachMode>, extra: &[&str]) -> Self {
        Self::start_with_args(topo, Self::args(topo, mode, extra))
    }

    /// Starts it with the daemon's own defaults for checks and scans (not the tests' faster
    /// ones): what benchmarks measure.
    #[track_caller]
    pub fn start_as_deployed(topo: &Topology, mode: AttachMode) -> Self {
        let args = Self::args(topo, Some(mode), &[]);
        let args = Self::without(args, &["--check-interval", "--scan-interval"]);
        Self::start_with_args(topo, args)
    }

    /// `args` without the flags `flags` and their values (to give one a value of its own).
    pub fn without(mut args: Vec<String>, flags: &[&str]) -> Vec<String> {
        for flag in flags {
            if let Some(i) = args.iter().position(|a| a == flag) {
                args.drain(i..i + 2);
            }
        }
        args
    }

    /// Starts it with exactly `args` (plus its own directories).
    #[track_caller]
    pub fn start_with_args(topo: &Topology, args: Vec<String>) -> Self {
        let dir = RunDir::new(&format!("{}-daemon", unique_prefix()));
        let mut daemon = Daemon {
            child: None,
            socket: dir.path().join("api.sock"),
            bpffs: topo.bpffs.path().join("gateway"),
            dir,
            gateway_ns: topo.gateway.name().to_owned(),
            args,
            starts: 0,
        };
        daemon.spawn();
        daemon
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("daemon-{}.log", self.starts))
    }

    /// What the daemon logged in its latest run.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The full command line (`ip netns exec GW gateway daemon ...`), for a process the caller
    /// runs itself.
    pub fn command(&self, args: &[String]) -> Command {
        let mut c = netns_command(&self.gateway_ns, gateway_bin());
        c.arg("daemon").args(args).env("GATEWAY_LOG", "info");
        c
    }

    /// The arguments it runs with, its own directories included.
    pub fn own_args(&self) -> Vec<String> {
        let mut args = self.args.clone();
        args.extend([
            "--state-dir".into(),
            self.dir.path().join("state").display().to_string(),
            "--api-socket".into(),
            self.socket.display().to_string(),
            "--bpffs".into(),
            self.bpffs.display().to_string(),
        ]);
        args
    }

    #[track_caller]
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "the daemon is running");
        self.starts += 1;
        let log = std::fs::File::create(self.log_path()).expect("log file");
        let mut command = self.command(&self.own_args());
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let child = command.spawn().expect("spawn the daemon");
        let mut guard = ChildGuard::from(child);
        let serving = crate::wait_for(START_TIMEOUT, || {
            if let Some(status) = guard.exited() {
                panic!("the daemon exited ({status}) at start:\n{}", self.log());
            }
            std::os::unix::net::UnixStream::connect(&self.socket).is_ok()
        });
        assert!(
            serving.is_some(),
            "the daemon did not serve its API within {START_TIMEOUT:?}:\n{}",
            self.log()
        );
        self.child = Some(guard);
    }

    /// SIGKILL: the daemon gets no chance to clean anything up.
    pub fn kill9(&mut self) {
        drop(self.child.take());
    }

    /// SIGTERM, and the exit status (None if it had to be killed after 10 s).
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        self.child.take()?.terminate(Duration::from_secs(10))
    }

    /// Starts it again after [`Daemon::kill9`] or [`Daemon::terminate`].
    #[track_caller]
    pub fn restart(&mut self) {
        self.spawn();
    }

    /// Runs the CLI (`gateway --api-socket SOCKET ARGS`).
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(gateway_bin())
            .arg("--api-socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run the gateway CLI")
    }

    /// Runs the CLI, which must succeed; its stdout.
    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "gateway {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// Runs the CLI, which must fail with one line on stderr and nothing on stdout; that line.
    #[track_caller]
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        let stderr = String::from_utf8(out.stderr).expect("utf-8");
        assert!(
            !out.status.success(),
            "gateway {} succeeded: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(out.stdout.is_empty(), "stdout: {:?}", out.stdout);
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        stderr
    }

    /// App `app`'s backends (`gateway backend list APP --json`).
    #[track_caller]
    pub fn backends(&self, app: &str) -> Vec<gateway::api::BackendView> {
        serde_json::from_str(&self.ok(&["backend", "list", app, "--json"])).expect("backends JSON")
    }

    /// Waits (up to 10 s) until app `app` has `n` active backends (added backends are pending
    /// until their health checks pass).
    #[track_caller]
    pub fn wait_active(&self, app: &str, n: usize) {
        let active = || {
            self.backends(app)
                .iter()
                .filter(|b| b.state == gateway::state::BackendState::Active)
                .count()
        };
        let done = crate::wait_for(Duration::from_secs(10), || active() == n);
        assert!(
            done.is_some(),
            "app {app}: {} active backends, not {n}: {:?}\n{}",
            active(),
            self.backends(app),
            self.log()
        );
    }

    /// Creates app `app` with `backends` (`IP:PORT` each) and waits until they are all active.
    #[track_caller]
    pub fn app_with_backends(&self, app: &str, backends: &[String]) {
        self.ok(&["app", "create", app]);
        for b in backends {
            self.ok(&["backend", "add", app, b]);
        }
        self.wait_active(app, backends.len());
    }

    /// `GET /metrics` on the daemon's default metrics address, from inside its namespace, as
    /// Prometheus asks for it (OpenMetrics): the body, parsed.
    #[track_caller]
    pub fn scrape(&self) -> crate::metrics::Scrape {
        crate::metrics::Scrape::parse(&self.scrape_text(true))
    }

    /// `GET /metrics`: the body as it is, in OpenMetrics (as Prometheus asks) or in the
    /// Prometheus text format (what a request without `Accept` gets).
    #[track_caller]
    pub fn scrape_text(&self, openmetrics: bool) -> String {
        let accept = if openmetrics {
            "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n"
        } else {
            ""
        };
        let request = format!("GET /metrics HTTP/1.0\r\nHost: gateway\r\n{accept}\r\n");
        let (head, body) = crate::netns::thread_in(&self.gateway_ns, move || {
            crate::traffic::http_exchange(
                "127.0.0.1:9717".parse().unwrap(),
                &request,
                Duration::from_secs(10),
            )
        })
        .join()
        .expect("scrape thread")
        .expect("scrape the metrics endpoint");
        let head = head.to_ascii_lowercase();
        assert!(
            head.starts_with("http/1.0 200") || head.starts_with("http/1.1 200"),
            "{head}"
        );
        let kind = if openmetrics {
            "content-type: application/openmetrics-text"
        } else {
            "content-type: text/plain; version=0.0.4"
        };
        assert!(head.contains(kind), "{head}");
        body.to_owned()
    }

    /// `gateway flows --json` (every flow), parsed.
    #[track_caller]
    pub fn flows(&self) -> gateway::api::FlowList {
        serde_json::from_str(&self.ok(&["flows", "--json"])).expect("flows JSON")
    }

    /// `gateway_drops_total{reason="REASON"}` in a fresh scrape (0 when there is no such
    /// series: a reason this build does not have).
    #[track_caller]
    pub fn drops(&self, reason: &str) -> f64 {
        // `+ 0.0`: an empty sum is -0.0, which prints as "-0".
        self.scrape()
            .sum("gateway_drops_total", &[("reason", reason)])
            + 0.0
    }

    /// The datapath's global counter labelled `label` (a [`gateway_common::GlobalStat`] or
    /// [`gateway_common::DropReason`] label, as in metrics and logs), summed over the CPUs,
    /// read from the pinned map; `None` when this build has no counter of that label.
    #[track_caller]
    pub fn counter(&self, label: &str) -> Option<u64> {
        use gateway_common::{DropReason, GlobalStat, maps};
        let slot = GlobalStat::ALL
            .iter()
            .find(|s| s.label() == label)
            .map(|s| s.index())
            .or_else(|| {
                DropReason::ALL
                    .iter()
                    .find(|r| r.label() == label)
                    .map(|r| r.slot())
            })?;
        let map = aya::maps::MapData::from_pin(self.bpffs.join(maps::GLOBAL_STATS))
            .expect("the pinned global counters");
        let global: aya::maps::PerCpuArray<_, u64> =
            aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(map))
                .expect("a per-CPU array of u64");
        Some(global.get(&slot, 0).expect("a counter slot").iter().sum())
    }

    /// The app id the datapath routes public port `port` to, read from the pinned services
    /// map; `None` when nothing is routed there.
    #[track_caller]
    pub fn app_id(&self, port: u16) -> Option<u32> {
        use gateway_common::maps::{self, Service, ServiceKey4};
        let map = aya::maps::MapData::from_pin(self.bpffs.join(maps::SERVICES4))
            .expect("the pinned services");
        let services: aya::maps::HashMap<_, ServiceKey4, Service> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(map))
                .expect("the services' layout");
        let key = ServiceKey4::from_addr(std::net::SocketAddrV4::new(Topology::PUBLIC_IP, port));
        match services.get(&key, 0) {
            Ok(service) => Some(service.app_id),
            Err(aya::maps::MapError::KeyNotFound) => None,
            Err(e) => panic!("reading the service of port {port}: {e}"),
        }
    }

    /// The pinned map of the apps' datapath settings ([`gateway_common::maps::APP_CONFIG`]),
    /// which the datapath reads: to read, or to write as a stale map would hold.
    #[track_caller]
    pub fn app_configs(
        &self,
    ) -> aya::maps::Array<aya::maps::MapData, gateway_common::maps::AppConfig> {
        let map = aya::maps::MapData::from_pin(self.bpffs.join(gateway_common::maps::APP_CONFIG))
            .expect("the pinned app settings");
        aya::maps::Array::try_from(aya::maps::Map::Array(map)).expect("the app settings' layout")
    }

    /// One request to the API as any HTTP client sends it (not through the CLI's types, so that
    /// it may be one they cannot write): `METHOD PATH` with JSON `body` (none when empty). The
    /// answer's status and body.
    #[track_caller]
    pub fn api(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        use std::io::{Read as _, Write as _};
        let mut stream = std::os::unix::net::UnixStream::connect(&self.socket)
            .unwrap_or_else(|e| panic!("{}: {e}", self.socket.display()));
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("{method} {path}: no HTTP answer: {answer:?}"));
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{method} {path}: no status: {head:?}"));
        (status, body.to_owned())
    }

    /// The pinned map of the backends' rate limits ([`gateway_common::maps::RATE_LIMITS`], slot
    /// [`gateway_common::maps::rate_slot`]): to read, or to write as a stale map would hold.
    #[track_caller]
    pub fn rate_limits(
        &self,
    ) -> aya::maps::Array<aya::maps::MapData, gateway_common::maps::RateLimit> {
        let map = aya::maps::MapData::from_pin(self.bpffs.join(gateway_common::maps::RATE_LIMITS))
            .expect("the pinned rate limits");
        aya::maps::Array::try_from(aya::maps::Map::Array(map)).expect("the rate limits' layout")
    }

    /// The backend ids of app `app` as the state file holds them, by address.
    #[track_caller]
    pub fn backend_ids(&self, app: &str) -> std::collections::BTreeMap<String, u32> {
        let path = self.dir.path().join("state/state.json");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let state: serde_json::Value = serde_json::from_str(&text).expect("the state file");
        state["apps"][app]["backends"]
            .as_array()
            .unwrap_or_else(|| panic!("no app {app} in {text}"))
            .iter()
            .map(|b| {
                (
                    b["addr"].as_str().expect("an address").to_owned(),
                    b["id"].as_u64().expect("an id") as u32,
                )
            })
            .collect()
    }

    /// App `app_id`'s MSS clamp as the datapath reads it (0: none).
    #[track_caller]
    pub fn mss_clamp(&self, app_id: u32) -> u16 {
        self.app_configs()
            .get(&app_id, 0)
            .unwrap_or_else(|e| panic!("the settings of app id {app_id}: {e}"))
            .mss_clamp
    }

    /// `gateway app show APP --json`, parsed.
    #[track_caller]
    pub fn app(&self, app: &str) -> gateway::api::AppView {
        serde_json::from_str(&self.ok(&["app", "show", app, "--json"])).expect("app JSON")
    }

    /// `gateway status --json`, parsed.
    #[track_caller]
    pub fn status(&self) -> gateway::api::Status {
        serde_json::from_str(&self.ok(&["status", "--json"])).expect("status JSON")
    }

    /// `gateway status --json` once a conntrack scan begun after this call has counted the
    /// connections (counts are as of the last scan).
    #[track_caller]
    pub fn fresh_status(&self) -> gateway::api::Status {
        let asked = gateway::daemon::now_ms();
        let mut status = self.status();
        let fresh = crate::wait_for(Duration::from_secs(10), || {
            status = self.status();
            status.scanned_at_ms > asked
        });
        assert!(
            fresh.is_some(),
            "no conntrack scan within 10 s:\n{}",
            self.log()
        );
        status
    }
}
