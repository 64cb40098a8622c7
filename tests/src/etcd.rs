//! A real single-member etcd for the cluster store's tests, in a network namespace of its own
//! (`gwt<pid>x<n>-etcd`): it listens on the namespace's loopback at the standard ports, so that
//! parallel tests never collide, and clients reach it from a tokio runtime whose threads joined
//! that namespace ([`Etcd::runtime`]). Its data directory is a [`RunDir`]
//! (`/run/gateway-tests/gwt<pid>x<n>-etcd`), so it survives [`Etcd::stop`] and
//! [`Etcd::start`] (outage tests). Dropping it — a panic included — kills etcd and deletes the
//! namespace and the directory; a test process killed before that leaves them to
//! [`sweep_stale`], as every namespace of the harness.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, setns};

use crate::netns::{ChildGuard, Netns, RunDir, sweep_stale, unique_prefix};

/// How long etcd may take to answer after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running (or stopped) single-member etcd.
pub struct Etcd {
    // Drop order: the process, then its namespace, then its data.
    child: Option<ChildGuard>,
    ns: Netns,
    dir: RunDir,
    name: String,
    starts: u32,
}

impl Etcd {
    /// Where clients reach it, from inside its namespace.
    pub const ENDPOINT: &str = "http://127.0.0.1:2379";
    const PEER: &str = "http://127.0.0.1:2380";

    /// Starts etcd in a new namespace with an empty data directory and waits until it answers.
    #[track_caller]
    pub fn new() -> Self {
        assert!(
            which_etcd().is_some(),
            "etcd is missing: run `cargo xtask setup` (Debian package etcd-server)"
        );
        sweep_stale();
        let prefix = unique_prefix();
        let name = format!("{prefix}-etcd");
        let dir = RunDir::new(&name);
        let ns = Netns::new(&name);
        let mut etcd = Etcd {
            child: None,
            ns,
            dir,
            name,
            starts: 0,
        };
        etcd.start();
        etcd
    }

    /// Links etcd's namespace to namespace `ns` by a veth pair (`e<i>` on etcd's side,
    /// `etcd0` in `ns`) with the /30 number `i` of 203.0.113.128/25: etcd's side
    /// 203.0.113.(129+4i), `ns`'s 203.0.113.(130+4i). Returns the endpoint `ns` reaches etcd
    /// at. The pair goes with either namespace.
    #[track_caller]
    pub fn link(&self, ns: &Netns, i: usize) -> String {
        assert!(i < 32, "at most 32 links");
        let (etcd_ip, peer_ip) = (129 + 4 * i, 130 + 4 * i);
        crate::netns::ip(&format!(
            "-n {} link add e{i} type veth peer name etcd0 netns {}",
            self.ns.name(),
            ns.name()
        ));
        self.ns
            .ip(&format!("addr add 203.0.113.{etcd_ip}/30 dev e{i}"));
        self.ns.ip(&format!("link set e{i} up"));
        ns.ip(&format!("addr add 203.0.113.{peer_ip}/30 dev etcd0"));
        ns.ip("link set etcd0 up");
        format!("http://203.0.113.{etcd_ip}:2379")
    }

    /// The namespace etcd runs in.
    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("etcd-{}.log", self.starts))
    }

    /// What etcd logged in its latest run.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Whether etcd is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts etcd again on the same data directory (after [`Etcd::stop`]) and waits until it
    /// answers. Returns how long that took.
    #[track_caller]
    pub fn start(&mut self) -> Duration {
        assert!(self.child.is_none(), "etcd is already running");
        self.starts += 1;
        let log = fs::File::create(self.log_path()).expect("etcd's log file");
        let mut cmd = self.ns.command(which_etcd().expect("etcd"));
        cmd.args(["--name", &self.name])
            .arg("--data-dir")
            .arg(self.data_dir())
            // Every address of its own namespace: its loopback, and the links to gateway
            // namespaces ([`Etcd::link`]) added at any time.
            .args(["--listen-client-urls", "http://0.0.0.0:2379"])
            .args(["--advertise-client-urls", Self::ENDPOINT])
            .args(["--listen-peer-urls", Self::PEER])
            .args(["--initial-advertise-peer-urls", Self::PEER])
            .args([
                "--initial-cluster",
                &format!("{}={}", self.name, Self::PEER),
            ])
            .args(["--initial-cluster-token", &self.name])
            // A single member elects itself after one election timeout: a short one starts it
            // (and restarts it) faster.
            .args(["--heartbeat-interval", "25", "--election-timeout", "150"])
            .args([
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
                "--log-level",
                "warn",
            ])
            .env_remove("ETCD_DATA_DIR")
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let started = Instant::now();
        let mut child = self.ns.spawn(cmd);
        let ready = crate::wait_for(START_TIMEOUT, || {
            if let Some(status) = child.exited() {
                panic!("etcd exited ({status}) while starting:\n{}", self.log());
            }
            self.healthy()
        });
        assert!(
            ready.is_some(),
            "etcd did not answer within {START_TIMEOUT:?}:\n{}",
            self.log()
        );
        self.child = Some(child);
        started.elapsed()
    }

    /// Stops etcd (SIGTERM, then SIGKILL after 5 s); its data stays for [`Etcd::start`].
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            child.terminate(Duration::from_secs(5));
        }
    }

    /// Kills etcd at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        self.child.take();
    }

    /// Freezes etcd (SIGSTOP): its connections stay open and nothing answers, as with a
    /// partition — what only a timeout can bound. [`Etcd::resume`] thaws it.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Thaws etcd after [`Etcd::pause`].
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().expect("etcd is running").id();
        // SAFETY: kill(2) with our child's pid (`ip netns exec` execs etcd: the pid is etcd's).
        unsafe { libc::kill(pid as i32, sig) };
    }

    /// etcd's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(ChildGuard::id)
    }

    /// The data directory's parent (the run directory, with the logs).
    pub fn run_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether `GET /health` on the client port answers `"health":"true"`.
    pub fn healthy(&self) -> bool {
        self.ns.run(|| {
            crate::traffic::http_exchange(
                "127.0.0.1:2379".parse().unwrap(),
                "GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n",
                Duration::from_millis(500),
            )
            .is_ok_and(|(_, body)| body.contains("\"health\":\"true\""))
        })
    }

    /// A multi-threaded tokio runtime whose threads (workers and blocking ones) joined etcd's
    /// namespace, so that every socket a client opens there reaches this etcd. Run futures with
    /// [`Etcd::block_on`], which keeps the test's own thread (outside) from opening any.
    pub fn runtime(&self) -> tokio::runtime::Runtime {
        let path = Path::new("/run/netns").join(self.ns.name());
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .on_thread_start(move || {
                let file =
                    fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                setns(&file, CloneFlags::CLONE_NEWNET).expect("setns into etcd's namespace");
            })
            .build()
            .expect("a tokio runtime")
    }

    /// Runs `future` on a worker of `rt` (from [`Etcd::runtime`]) and waits for it; a panic
    /// inside is resumed here.
    pub fn block_on<T: Send + 'static>(
        rt: &tokio::runtime::Runtime,
        future: impl Future<Output = T> + Send + 'static,
    ) -> T {
        let task = rt.spawn(future);
        match rt.block_on(task) {
            Ok(v) => v,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("the test's task did not finish: {e}"),
        }
    }
}

impl Default for Etcd {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // The child guard kills etcd (SIGKILL ends a paused one too); the namespace and
        // directory guards follow.
        self.child.take();
    }
}

fn which_etcd() -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join("etcd"))
        .find(|p| p.exists())
}
