//! Namespace test harness: hosts in network namespaces joined by veth pairs, with documentation
//! addresses, routes, forwarding and neighbour entries, helpers to run code and processes inside
//! a namespace, and RAII teardown on every path (a panic included). Used by the end-to-end
//! tests, the demo and the benchmarks.
//!
//! Names are `gwt<pid>x<n>-<role>`, unique per process and per topology, so tests run in
//! parallel. A process killed before its guards ran (SIGKILL, Ctrl-C of `cargo test`) leaves
//! namespaces behind: [`sweep_stale`] removes those whose pid is gone, and every new topology
//! calls it first.

use std::{
    ffi::OsStr,
    fs,
    net::Ipv4Addr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{CloneFlags, setns},
    sys::signal::{SigSet, Signal},
};

/// The prefix of every namespace this harness creates.
pub const PREFIX: &str = "gwt";
/// Where per-topology bpffs directories are mounted.
pub const RUN_DIR: &str = "/run/gateway-tests";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// What this process created and has not torn down yet, for [`teardown_on_signals`].
static LIVE: Mutex<Vec<Resource>> = Mutex::new(Vec::new());

#[derive(Clone, Debug, PartialEq, Eq)]
enum Resource {
    Netns(String),
    /// A directory under RUN_DIR (a bpffs mount or plain).
    Dir(PathBuf),
    /// A host-wide sysctl (a file under /proc/sys) to put back to its value.
    Sysctl(PathBuf, String),
}

/// A host-wide sysctl set for this guard's life (only what the benchmarks need, such as
/// `kernel.bpf_stats_enabled`); its value is put back on drop, and by [`teardown_on_signals`].
pub struct SysctlGuard(Resource);

impl SysctlGuard {
    pub fn set(key: &str, value: &str) -> std::io::Result<Self> {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        let was = fs::read_to_string(&path)?.trim().to_owned();
        let r = Resource::Sysctl(path.clone(), was);
        register(r.clone());
        fs::write(&path, value)?;
        Ok(SysctlGuard(r))
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        restore(&self.0);
        unregister(&self.0);
    }
}

fn restore(r: &Resource) {
    if let Resource::Sysctl(path, value) = r {
        let _ = fs::write(path, value);
    }
}

fn register(r: Resource) {
    LIVE.lock().unwrap_or_else(|p| p.into_inner()).push(r);
}

fn unregister(r: &Resource) {
    LIVE.lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|x| x != r);
}

/// Makes SIGINT, SIGTERM and SIGHUP tear down everything this process created (namespaces with
/// their processes, bpffs mounts) and exit with 130. Call it first in `main`, before any thread
/// starts: it blocks those signals in the calling thread (threads and children inherit the
/// mask; [`Netns::command`] unblocks them for children) and waits for them on a thread of its
/// own.
pub fn teardown_on_signals() {
    let mut set = SigSet::empty();
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(sig);
    }
    set.thread_block().expect("block signals");
    thread::spawn(move || {
        let sig = set.wait().expect("sigwait");
        eprintln!("\n{sig}: tearing the sandbox down");
        teardown_all();
        std::process::exit(130);
    });
}

/// Deletes every namespace and bpffs this process created and still holds.
pub fn teardown_all() {
    let live = std::mem::take(&mut *LIVE.lock().unwrap_or_else(|p| p.into_inner()));
    // Namespaces first (their processes and links), then the bpffs mounts (the pins).
    for r in &live {
        if let Resource::Netns(name) = r {
            delete_netns(name);
        }
    }
    for r in &live {
        if let Resource::Dir(path) = r {
            remove_bpffs(path);
        }
        restore(r);
    }
}

/// Runs a command to completion and panics with its output if it fails.
#[track_caller]
pub fn cmd<I, S>(program: &str, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let output = Command::new(program)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {:?} failed ({}): {}{}",
        args,
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `ip ARGS`, panicking on failure.
#[track_caller]
pub fn ip(args: &str) -> String {
    cmd("ip", args.split_whitespace())
}

/// A network namespace, deleted (with every process still inside it) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `name` with its loopback up.
    #[track_caller]
    pub fn new(name: &str) -> Self {
        ip(&format!("netns add {name}"));
        let ns = Netns::adopt(name);
        ns.ip("link set lo up");
        ns
    }

    /// Takes ownership of an existing namespace (deleted on drop).
    pub fn adopt(name: &str) -> Self {
        register(Resource::Netns(name.to_owned()));
        Netns {
            name: name.to_owned(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS`.
    #[track_caller]
    pub fn ip(&self, args: &str) -> String {
        ip(&format!("-n {} {args}", self.name))
    }

    /// Sets a sysctl inside the namespace (`net.ipv4.ip_forward`, ...).
    #[track_caller]
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        let value = value.to_owned();
        let written = self
            .run(move || fs::write(&path, value).map_err(|e| format!("{}: {e}", path.display())));
        written.unwrap_or_else(|e| panic!("sysctl in {}: {e}", self.name));
    }

    /// Runs a command inside the namespace to completion, panicking if it fails.
    #[track_caller]
    pub fn exec_ok(&self, argv: &[&str]) -> String {
        cmd("ip", ["netns", "exec", &self.name].iter().chain(argv))
    }

    /// Loads an nftables ruleset into the namespace (`nft -f -`), panicking if nft refuses it.
    #[track_caller]
    pub fn nft(&self, rules: &str) {
        use std::io::Write as _;
        let mut child = self
            .command("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nft (Debian package nftables)");
        let mut stdin = child.stdin.take().expect("nft's stdin");
        stdin
            .write_all(rules.as_bytes())
            .expect("write the ruleset");
        drop(stdin);
        let out = child.wait_with_output().expect("nft");
        assert!(
            out.status.success(),
            "nft in {}: {}\n{rules}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// (packets, bytes) of the named nftables counter `name` of `table` (family `ip`), as
    /// [`Netns::nft`] loaded it.
    #[track_caller]
    pub fn nft_counter(&self, table: &str, name: &str) -> (u64, u64) {
        let out = self.exec_ok(&["nft", "-j", "list", "counter", "ip", table, name]);
        let json: serde_json::Value = serde_json::from_str(&out).expect("nft's JSON");
        let c = json["nftables"]
            .as_array()
            .and_then(|objects| objects.iter().find_map(|o| o.get("counter")))
            .unwrap_or_else(|| panic!("no counter {table} {name} in {}: {out}", self.name));
        let n = |k: &str| c[k].as_u64().unwrap_or_else(|| panic!("{k} of {c}"));
        (n("packets"), n("bytes"))
    }

    /// A command that runs inside the namespace (`ip netns exec NAME program`), with every
    /// signal unblocked (see [`teardown_on_signals`]).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        netns_command(&self.name, program)
    }

    /// Starts a process inside the namespace; it is killed when the guard drops (and, if the
    /// guard leaks, when the namespace is deleted).
    #[track_caller]
    pub fn spawn(&self, mut command: Command) -> ChildGuard {
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {command:?} in {}: {e}", self.name));
        ChildGuard { child: Some(child) }
    }

    /// Runs `f` on a thread that has joined this namespace and returns its result. Sockets
    /// created there stay in this namespace whatever thread uses them afterwards.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn_thread(f)
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    /// Starts a thread that has joined this namespace.
    pub fn spawn_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> thread::JoinHandle<T> {
        thread_in(&self.name, f)
    }
}

/// Starts a thread that has joined namespace `name` (one this process does not own).
pub fn thread_in<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let path = Path::new("/run/netns").join(name);
    let file = fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    thread::spawn(move || {
        setns(&file, CloneFlags::CLONE_NEWNET).expect("setns");
        drop(file);
        f()
    })
}

/// A command that runs inside namespace `name` (`ip netns exec NAME program`), with every
/// signal unblocked (see [`teardown_on_signals`]).
pub fn netns_command(name: &str, program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", name]).arg(program);
    // SAFETY: only async-signal-safe calls (sigprocmask) between fork and exec.
    unsafe {
        c.pre_exec(|| {
            SigSet::all()
                .thread_unblock()
                .map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    c
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete_netns(&self.name);
        unregister(&Resource::Netns(self.name.clone()));
    }
}

fn ns_pids(name: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", name])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Kills every process inside namespace `name`, then deletes it. Never panics (it runs in
/// `Drop`, possibly while unwinding).
pub fn delete_netns(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = ns_pids(name);
        if pids.is_empty() || Instant::now() > deadline {
            break;
        }
        for pid in pids {
            // SAFETY: kill(2) with a plain pid and signal.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stderr(Stdio::null())
        .status();
}

/// A child process killed and reaped on drop.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
}

impl From<Child> for ChildGuard {
    fn from(child: Child) -> Self {
        ChildGuard { child: Some(child) }
    }
}

impl ChildGuard {
    pub fn id(&self) -> u32 {
        self.child.as_ref().expect("child").id()
    }

    /// Whether the process has exited (reaping it if so).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit (then SIGKILL).
    pub fn terminate(mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: kill(2) with our child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // `ip netns exec` execs the program: the pid is the program's own.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A private bpffs mounted on a directory of its own, unmounted and removed on drop (which
/// frees everything pinned in it).
#[derive(Debug)]
pub struct Bpffs {
    path: PathBuf,
}

impl Bpffs {
    #[track_caller]
    pub fn new(name: &str) -> Self {
        let path = Path::new(RUN_DIR).join(name);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        mount(
            Some("bpf"),
            &path,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("mount -t bpf {}: {e}", path.display()));
        register(Resource::Dir(path.clone()));
        Bpffs { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        remove_bpffs(&self.path);
        unregister(&Resource::Dir(self.path.clone()));
    }
}

/// Unmounts `path` if it is a mount point, then removes it with what is left in it.
fn remove_bpffs(path: &Path) {
    let _ = umount2(path, MntFlags::MNT_DETACH);
    let _ = fs::remove_dir_all(path);
}

/// A plain directory under [`RUN_DIR`] (state, sockets, logs), removed with its content on drop
/// and by [`sweep_stale`] once its owner is gone.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    #[track_caller]
    pub fn new(name: &str) -> Self {
        let path = Path::new(RUN_DIR).join(name);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        register(Resource::Dir(path.clone()));
        RunDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
        unregister(&Resource::Dir(self.path.clone()));
    }
}

fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// The pid embedded in a harness name `gwt<pid>x...`.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('x').next()?.parse().ok()
}

/// Removes namespaces and bpffs directories left by harness users whose process is gone.
/// Returns what it removed.
pub fn sweep_stale() -> Vec<String> {
    let mut removed = Vec::new();
    let listing = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for name in listing.lines().filter_map(|l| l.split_whitespace().next()) {
        if owner_pid(name).is_some_and(|pid| !pid_alive(pid)) {
            delete_netns(name);
            removed.push(name.to_owned());
        }
    }
    if let Ok(entries) = fs::read_dir(RUN_DIR) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if owner_pid(&name).is_some_and(|pid| !pid_alive(pid)) {
                remove_bpffs(&entry.path());
                removed.push(entry.path().display().to_string());
            }
        }
    }
    removed
}

/// A unique name prefix for one topology of this process: `gwt<pid>x<n>`.
pub fn unique_prefix() -> String {
    format!(
        "{PREFIX}{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A host of a topology: its namespace and its one interface's addresses.
#[derive(Debug)]
pub struct Host {
    pub ns: Netns,
    /// The host's interface toward the gateway (`eth0`).
    pub iface: &'static str,
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    /// The gateway's side of the link: interface name (in the gateway namespace), address, MAC.
    pub gw_iface: String,
    pub gw_ip: Ipv4Addr,
    pub gw_mac: [u8; 6],
}

impl std::ops::Deref for Host {
    type Target = Netns;
    fn deref(&self) -> &Netns {
        &self.ns
    }
}

/// client ── gateway ── backend i (one veth pair per backend).
///
/// | what | address |
/// |---|---|
/// | client `eth0` / gateway `client0` | 192.0.2.2/24 / 192.0.2.1/24 |
/// | public address (gateway `lo`) | 203.0.113.10/32 |
/// | SNAT address (gateway `lo`) | 198.51.100.253/32 |
/// | backend i `eth0` / gateway `b<i>` | 198.51.100.(4i+2)/30 / 198.51.100.(4i+1)/30 |
///
/// Client and backends route everything through the gateway, which forwards; there is no route
/// out of the namespaces. Neighbour entries are permanent on both sides of every link. Fields
/// drop in declaration order: the bpffs goes first, then the hosts, then the gateway.
#[derive(Debug)]
pub struct Topology {
    pub bpffs: Bpffs,
    pub client: Host,
    pub backends: Vec<Host>,
    pub gateway: Netns,
}

impl Topology {
    /// The public address clients connect to.
    pub const PUBLIC_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
    /// The gateway's source address toward backends.
    pub const SNAT_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 253);
    /// The client's address.
    pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
    /// The gateway's address on the client's link.
    pub const CLIENT_GW_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    /// The client's MAC.
    pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
    /// The gateway's MAC on the client's link.
    pub const CLIENT_GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

    /// Backend `i`'s address: 198.51.100.(4i+2).
    pub const fn backend_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 51, 100, 4 * i as u8 + 2)
    }

    /// Which backend has address `ip` (of [`Topology::backend_ip`]).
    pub const fn backend_index(ip: Ipv4Addr) -> usize {
        (ip.octets()[3] as usize - 2) / 4
    }

    /// The gateway's address on backend `i`'s link: 198.51.100.(4i+1).
    pub const fn backend_gw_ip(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 51, 100, 4 * i as u8 + 1)
    }

    /// Backend `i`'s MAC.
    pub const fn backend_mac(i: usize) -> [u8; 6] {
        [0x02, 0, 0, 0, 0x10 + i as u8, 0x02]
    }

    /// The gateway's MAC on backend `i`'s link.
    pub const fn backend_gw_mac(i: usize) -> [u8; 6] {
        [0x02, 0, 0, 0, 0x10 + i as u8, 0x01]
    }

    /// Builds a topology with `backends` backends (at most 60).
    #[track_caller]
    pub fn new(backends: usize) -> Self {
        assert!(backends <= 60, "at most 60 backends");
        sweep_stale();
        let prefix = unique_prefix();
        // Created first so that a failure below tears it down too.
        let bpffs = Bpffs::new(&prefix);
        let gateway = Netns::new(&format!("{prefix}-gw"));
        let client_ns = Netns::new(&format!("{prefix}-client"));
        let client = link(
            &gateway,
            client_ns,
            "client0",
            (Self::CLIENT_GW_IP, 24),
            Self::CLIENT_IP,
            Self::CLIENT_GW_MAC,
            Self::CLIENT_MAC,
        );
        let backends = (0..backends)
            .map(|i| {
                let ns = Netns::new(&format!("{prefix}-b{i}"));
                link(
                    &gateway,
                    ns,
                    &format!("b{i}"),
                    (Self::backend_gw_ip(i), 30),
                    Self::backend_ip(i),
                    Self::backend_gw_mac(i),
                    Self::backend_mac(i),
                )
            })
            .collect();
        gateway.ip(&format!("addr add {}/32 dev lo", Self::PUBLIC_IP));
        gateway.ip(&format!("addr add {}/32 dev lo", Self::SNAT_IP));
        gateway.sysctl("net.ipv4.ip_forward", "1");
        Topology {
            bpffs,
            client,
            backends,
            gateway,
        }
    }

    /// The backends as Maglev entries (ids 1.., weight 1), listening on `port`.
    pub fn backend_entries(&self, port: u16) -> Vec<gateway::maglev::Entry> {
        self.backends
            .iter()
            .enumerate()
            .map(|(i, b)| gateway::maglev::Entry {
                id: i as u32 + 1,
                addr: std::net::SocketAddrV4::new(b.ip, port),
                weight: 1,
            })
            .collect()
    }

    /// An echo server on every backend at `port`, named `b<i>`, for at most `lifetime`.
    pub fn echo_servers(&self, port: u16, lifetime: Duration) -> Vec<crate::traffic::EchoServer> {
        self.backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                crate::traffic::EchoServer::start(
                    b,
                    std::net::SocketAddrV4::new(b.ip, port),
                    &format!("b{i}"),
                    lifetime,
                )
            })
            .collect()
    }

    /// The gateway's interfaces (toward the client, then toward each backend).
    pub fn gateway_ifaces(&self) -> Vec<String> {
        std::iter::once(&self.client)
            .chain(&self.backends)
            .map(|h| h.gw_iface.clone())
            .collect()
    }

    /// Every namespace name of this topology.
    pub fn netns_names(&self) -> Vec<String> {
        std::iter::once(self.gateway.name())
            .chain(std::iter::once(self.client.name()))
            .chain(self.backends.iter().map(|b| b.name()))
            .map(str::to_owned)
            .collect()
    }

    /// Native XDP redirect between veths at its cheapest: checksum offload off on every sending
    /// side (the datapath completes CHECKSUM_PARTIAL checksums itself otherwise, at a cost per
    /// packet) and GRO on (NAPI) on every receiving side ([`Topology::xdp_napi`]).
    #[track_caller]
    pub fn xdp_offloads(&self) {
        self.ethtool_all(&["tx", "off", "gro", "on"]);
    }

    /// What native XDP redirect into a veth needs whatever the checksums: GRO on (NAPI) on
    /// every receiving side, without which `ndo_xdp_xmit` drops every redirected frame (counted
    /// only in the veth's `rx_queue_0_drops`). Tx checksum offload stays as it is (on).
    #[track_caller]
    pub fn xdp_napi(&self) {
        self.ethtool_all(&["gro", "on"]);
    }

    /// `ethtool -K DEV FEATURES` on both sides of every link.
    #[track_caller]
    fn ethtool_all(&self, features: &[&str]) {
        for host in std::iter::once(&self.client).chain(&self.backends) {
            for (ns, dev) in [
                (&host.ns, host.iface),
                (&self.gateway, host.gw_iface.as_str()),
            ] {
                let argv: Vec<&str> = ["ethtool", "-K", dev]
                    .into_iter()
                    .chain(features.iter().copied())
                    .collect();
                ns.exec_ok(&argv);
            }
        }
    }
}

/// A MAC as `ip` writes it (`02:00:00:00:00:01`).
pub fn mac_str(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// Joins `host_ns` (interface `eth0`) to the gateway (interface `gw_iface`) with a veth pair,
/// addresses, a default route on the host via the gateway and permanent neighbour entries.
#[track_caller]
pub(crate) fn link(
    gateway: &Netns,
    host_ns: Netns,
    gw_iface: &str,
    (gw_ip, plen): (Ipv4Addr, u8),
    host_ip: Ipv4Addr,
    gw_mac: [u8; 6],
    host_mac: [u8; 6],
) -> Host {
    let iface = "eth0";
    // Created directly inside the two namespaces: nothing touches the machine's own.
    gateway.ip(&format!(
        "link add {gw_iface} address {} type veth peer name {iface} netns {} address {}",
        mac_str(gw_mac),
        host_ns.name(),
        mac_str(host_mac)
    ));
    gateway.ip(&format!("addr add {gw_ip}/{plen} dev {gw_iface}"));
    gateway.ip(&format!("link set {gw_iface} up"));
    host_ns.ip(&format!("addr add {host_ip}/{plen} dev {iface}"));
    host_ns.ip(&format!("link set {iface} up"));
    host_ns.ip(&format!("route add default via {gw_ip} dev {iface}"));
    gateway.ip(&format!(
        "neigh replace {host_ip} lladdr {} dev {gw_iface} nud permanent",
        mac_str(host_mac)
    ));
    host_ns.ip(&format!(
        "neigh replace {gw_ip} lladdr {} dev {iface} nud permanent",
        mac_str(gw_mac)
    ));
    Host {
        ns: host_ns,
        iface,
        ip: host_ip,
        mac: host_mac,
        gw_iface: gw_iface.to_owned(),
        gw_ip,
        gw_mac,
    }
}

/// The index of interface `name` in the calling thread's namespace.
pub fn ifindex(name: &str) -> std::io::Result<u32> {
    let c = std::ffi::CString::new(name)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(std::io::Error::last_os_error()),
        i => Ok(i),
    }
}

/// Whether a namespace of that name exists.
pub fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}
