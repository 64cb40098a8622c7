//! Health checks and rotation end to end: the real daemon checks real servers in namespaces,
//! and deploys run under continuous client load. The daemon checks every 200 ms here (rise 2,
//! fall 2), five times the default, so that the tests wait less.

use std::{
    net::SocketAddrV4,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use gateway::state::BackendState;
use gateway_common::DropReason;
use gateway_tests::{
    daemon::Daemon,
    netns::Topology,
    require_root,
    traffic::{EchoClient, EchoServer, payload, sock},
    wait_for,
};

const LIFETIME: Duration = Duration::from_secs(120);
const INTERVAL: Duration = Duration::from_millis(200);
const RISE: u32 = 2;
const FALL: u32 = 2;

fn addr(topo: &Topology, i: usize) -> String {
    SocketAddrV4::new(topo.backends[i].ip, 8080).to_string()
}

fn server(topo: &Topology, i: usize) -> EchoServer {
    let b = &topo.backends[i];
    EchoServer::start(b, SocketAddrV4::new(b.ip, 8080), &format!("b{i}"), LIFETIME)
}

/// Waits (up to `limit`) until backend `address` of app `app` is in `state`; how long it took.
fn wait_state(
    daemon: &Daemon,
    app: &str,
    address: &str,
    state: Option<BackendState>,
    limit: Duration,
) -> Duration {
    let now = || {
        daemon
            .backends(app)
            .into_iter()
            .find(|b| b.address == address)
            .map(|b| b.state)
    };
    wait_for(limit, || now() == state).unwrap_or_else(|| {
        panic!(
            "{address} is {:?}, not {state:?}, after {limit:?}:\n{}",
            now(),
            daemon.log()
        )
    })
}

/// New short connections, one every few ms, until stopped (at most 30 s and 5000 attempts):
/// each connects, reads the server's name and echoes a few bytes.
struct Load {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<LoadResult>>,
}

#[derive(Debug, Default)]
struct LoadResult {
    /// (when it was opened, the backend that answered)
    ok: Vec<(Instant, String)>,
    failed: Vec<String>,
}

impl Load {
    fn start(topo: &Topology, to: std::net::SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = topo.client.spawn_thread(move || {
            let mut r = LoadResult::default();
            let deadline = Instant::now() + Duration::from_secs(30);
            for i in 0..5000u32 {
                if s.load(Ordering::Relaxed) || Instant::now() > deadline {
                    break;
                }
                let opened = Instant::now();
                let attempt = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5))
                    .and_then(EchoClient::from_stream)
                    .and_then(|mut c| c.echo(&payload(64, i)).map(|()| c.server));
                match attempt {
                    Ok(server) => r.ok.push((opened, server)),
                    Err(e) => r.failed.push(format!("attempt {i}: {e}")),
                }
                thread::sleep(Duration::from_millis(3));
            }
            r
        });
        Load {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> LoadResult {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

#[test]
fn a_stopped_backend_leaves_rotation_within_fall_checks_and_rejoins_after_rise() {
    require_root();
    let topo = Topology::new(3);
    let mut servers: Vec<Option<EchoServer>> = (0..3).map(|i| Some(server(&topo, i))).collect();
    let daemon = Daemon::start(&topo, None, &[]);
    let old: Vec<String> = (0..3).map(|i| addr(&topo, i)).collect();
    daemon.app_with_backends("web", &old);
    let web = sock(Topology::PUBLIC_IP, 20000);

    servers[1] = None; // b1 stops listening
    let took = wait_state(
        &daemon,
        "web",
        &addr(&topo, 1),
        Some(BackendState::Unhealthy),
        Duration::from_secs(5),
    );
    assert!(
        took <= INTERVAL * FALL + Duration::from_secs(1),
        "left after {took:?}"
    );
    let conns =
        EchoClient::connect_many(&topo.client, web, 60).expect("every new connection succeeds");
    assert!(conns.iter().all(|c| c.server != "b1"));
    drop(conns);

    servers[1] = Some(server(&topo, 1));
    let took = wait_state(
        &daemon,
        "web",
        &addr(&topo, 1),
        Some(BackendState::Active),
        Duration::from_secs(5),
    );
    assert!(
        took <= INTERVAL * RISE + Duration::from_secs(1),
        "rejoined after {took:?}"
    );
    let conns = EchoClient::connect_many(&topo.client, web, 60).unwrap();
    assert!(
        conns.iter().any(|c| c.server == "b1"),
        "b1 gets connections again"
    );
    assert!(daemon.log().contains("backend failed its health checks"));
    let b1 = daemon
        .backends("web")
        .into_iter()
        .find(|b| b.address == addr(&topo, 1))
        .unwrap();
    // pending → active, active → unhealthy, unhealthy → active
    assert_eq!(b1.health_changes, 3, "{b1:?}");
    let status = daemon.status();
    assert!(
        status.health_checks_failed >= u64::from(FALL)
            && status.health_checks > status.health_checks_failed
    );
}

#[test]
fn with_every_backend_unhealthy_new_syns_are_dropped_and_counted() {
    require_root();
    let topo = Topology::new(1);
    let s = server(&topo, 0);
    let daemon = Daemon::start(&topo, None, &[]);
    daemon.app_with_backends("web", &[addr(&topo, 0)]);
    drop(s);
    wait_state(
        &daemon,
        "web",
        &addr(&topo, 0),
        Some(BackendState::Unhealthy),
        Duration::from_secs(5),
    );
    let web = sock(Topology::PUBLIC_IP, 20000);
    let err = EchoClient::connect_within(&topo.client, web, Duration::from_millis(500))
        .err()
        .expect("no backend takes it");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::TimedOut,
        "dropped, not reset: {err}"
    );
    let dropped = daemon
        .counter(DropReason::NoBackend.label())
        .expect("a no_backend counter");
    assert!(dropped >= 1, "counted as no_backend");
}

#[test]
fn a_deploy_under_continuous_load_fails_no_connection() {
    require_root();
    let topo = Topology::new(6);
    let _servers: Vec<EchoServer> = (0..6).map(|i| server(&topo, i)).collect();
    let daemon = Daemon::start(&topo, None, &[]);
    let old: Vec<String> = (0..3).map(|i| addr(&topo, i)).collect();
    daemon.app_with_backends("web", &old);
    let web = sock(Topology::PUBLIC_IP, 20000);

    // A long-lived connection, exchanging data for the whole deploy and drain.
    let mut long = EchoClient::connect(&topo.client, web).unwrap();
    let long_server = long.server.clone();
    let stop_long = Arc::new(AtomicBool::new(false));
    let long_rounds = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let long_thread = {
        let (stop, rounds) = (stop_long.clone(), long_rounds.clone());
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(40);
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                long.echo(&payload(4096, n))?;
                rounds.lock().unwrap().push(Instant::now());
                n += 1;
                thread::sleep(Duration::from_millis(10));
            }
            Ok::<_, std::io::Error>(long)
        })
    };

    let load = Load::start(&topo, web);
    thread::sleep(Duration::from_millis(300));
    let new: Vec<String> = (3..6).map(|i| addr(&topo, i)).collect();
    let mut args = vec!["deploy", "web"];
    args.extend(new.iter().map(String::as_str));
    let out = daemon.ok(&args);
    let switched = Instant::now();
    assert!(out.contains("switched"), "{out}");
    thread::sleep(Duration::from_millis(700));
    let result = load.finish();

    assert!(
        result.failed.is_empty(),
        "failed connections: {:?}",
        result.failed
    );
    assert!(
        result.ok.len() >= 100,
        "only {} connections",
        result.ok.len()
    );
    let before: Vec<&str> = result
        .ok
        .iter()
        .filter(|(t, _)| *t < switched)
        .map(|(_, s)| s.as_str())
        .collect();
    assert!(
        before.iter().any(|s| ["b0", "b1", "b2"].contains(s)),
        "the old set served before"
    );
    let late: Vec<&str> = result
        .ok
        .iter()
        .filter(|(t, _)| *t > switched)
        .map(|(_, s)| s.as_str())
        .collect();
    assert!(
        late.len() >= 20,
        "{} connections after the switch",
        late.len()
    );
    assert!(
        late.iter().all(|s| ["b3", "b4", "b5"].contains(s)),
        "after the switch, only new backends: {late:?}"
    );

    // The old backends drain while the long-lived connection keeps going.
    let old_states: Vec<BackendState> = daemon
        .backends("web")
        .iter()
        .filter(|b| !new.contains(&b.address))
        .map(|b| b.state)
        .collect();
    assert!(
        old_states.contains(&BackendState::Draining),
        "the long-lived connection's backend {long_server} drains: {old_states:?}"
    );
    let during_drain = long_rounds
        .lock()
        .unwrap()
        .iter()
        .filter(|t| **t > switched)
        .count();
    assert!(
        during_drain >= 10,
        "{during_drain} exchanges during the drain"
    );
    stop_long.store(true, Ordering::Relaxed);
    let long = long_thread
        .join()
        .unwrap()
        .expect("the long-lived connection survived");
    drop(long);

    // With its last connection closed, every old backend goes.
    let gone = wait_for(Duration::from_secs(5), || daemon.backends("web").len() <= 3);
    assert!(gone.is_some(), "{:?}", daemon.backends("web"));
    let left: Vec<String> = daemon
        .backends("web")
        .into_iter()
        .map(|b| b.address)
        .collect();
    assert_eq!(left, new);
}

#[test]
fn a_deploy_whose_backends_never_become_healthy_aborts_and_the_old_set_keeps_serving() {
    require_root();
    let topo = Topology::new(4);
    // Servers on b0 and b1 only: b2 and b3 never answer.
    let _servers: Vec<EchoServer> = (0..2).map(|i| server(&topo, i)).collect();
    let daemon = Daemon::start(&topo, None, &[]);
    let old: Vec<String> = (0..2).map(|i| addr(&topo, i)).collect();
    daemon.app_with_backends("web", &old);
    let before: Vec<String> = daemon
        .backends("web")
        .into_iter()
        .map(|b| b.address)
        .collect();
    let web = sock(Topology::PUBLIC_IP, 20000);

    let load = Load::start(&topo, web);
    let start = Instant::now();
    let err = daemon.fails(&[
        "deploy",
        "web",
        &addr(&topo, 2),
        &addr(&topo, 3),
        "--timeout",
        "1500ms",
    ]);
    let took = start.elapsed();
    thread::sleep(Duration::from_millis(300));
    let result = load.finish();

    assert!(
        err.contains("aborted") && err.contains("0 of 2 new backends healthy"),
        "{err}"
    );
    assert!(took >= Duration::from_millis(1400), "waited {took:?}");
    assert!(
        result.failed.is_empty(),
        "failed connections: {:?}",
        result.failed
    );
    assert!(result.ok.iter().all(|(_, s)| s == "b0" || s == "b1"));
    let after = daemon.backends("web");
    assert_eq!(
        after.iter().map(|b| b.address.clone()).collect::<Vec<_>>(),
        before
    );
    assert!(after.iter().all(|b| b.state == BackendState::Active));
}

#[test]
fn a_drain_ends_only_on_a_scan_begun_after_it() {
    require_root();
    let topo = Topology::new(1);
    let _servers = [server(&topo, 0)];
    // One conntrack scan, at start: connections opened later are not in its counts.
    let mut args = Daemon::without(Daemon::args(&topo, None, &[]), &["--scan-interval"]);
    args.extend(["--scan-interval".into(), "1h".into()]);
    let daemon = Daemon::start_with_args(&topo, args);
    daemon.app_with_backends("web", &[addr(&topo, 0)]);
    let mut open = EchoClient::connect(&topo.client, sock(Topology::PUBLIC_IP, 20000)).unwrap();
    open.echo(b"hello").unwrap();
    daemon.ok(&[
        "backend",
        "remove",
        "web",
        &addr(&topo, 0),
        "--drain-timeout",
        "2s",
    ]);
    // The last scan says 0 connections, but it is older than the drain: the drain goes on.
    std::thread::sleep(Duration::from_secs(1));
    let b = daemon.backends("web");
    assert_eq!(b.len(), 1, "still there");
    assert_eq!(b[0].state, BackendState::Draining);
    open.echo(b"still served").unwrap();
    // No scan comes: the deadline ends it, and its connection with it.
    let gone =
        gateway_tests::wait_for(Duration::from_secs(5), || daemon.backends("web").is_empty());
    assert!(gone.is_some());
    assert!(daemon.log().contains("drain timeout"), "{}", daemon.log());
    open.set_timeout(Duration::from_millis(500)).unwrap();
    assert!(open.echo(b"after").is_err(), "the connection was ended");
}

#[test]
fn a_connection_still_open_when_the_drain_times_out_is_ended() {
    require_root();
    let topo = Topology::new(2);
    let _servers: Vec<EchoServer> = (0..2).map(|i| server(&topo, i)).collect();
    let daemon = Daemon::start(&topo, None, &[]);
    daemon.app_with_backends("web", &[addr(&topo, 0)]);
    let web = sock(Topology::PUBLIC_IP, 20000);
    let mut open = EchoClient::connect(&topo.client, web).unwrap();
    open.echo(b"hello").unwrap();
    assert_eq!(open.server, "b0");

    let start = Instant::now();
    let out = daemon.ok(&[
        "deploy",
        "web",
        &addr(&topo, 1),
        "--drain-timeout",
        "1s",
        "--wait",
    ]);
    let took = start.elapsed();
    assert!(out.contains("gone"), "{out}");
    assert!(
        took >= Duration::from_millis(900),
        "--wait returned after {took:?}"
    );
    let left: Vec<String> = daemon
        .backends("web")
        .into_iter()
        .map(|b| b.address)
        .collect();
    assert_eq!(left, [addr(&topo, 1)], "b0 is gone");
    open.set_timeout(Duration::from_millis(500)).unwrap();
    assert!(open.echo(b"after").is_err(), "the connection was ended");
    assert!(daemon.log().contains("drain timeout"), "{}", daemon.log());
    // New connections go to the new backend.
    let mut last = EchoClient::connect(&topo.client, web).unwrap();
    assert_eq!(last.server, "b1");

    // `--now` does not drain: the backend goes at once and its connection ends.
    let out = daemon.ok(&["backend", "remove", "web", &addr(&topo, 1), "--now"]);
    assert!(out.contains("ended"), "{out}");
    assert!(daemon.backends("web").is_empty());
    last.set_timeout(Duration::from_millis(500)).unwrap();
    assert!(last.echo(b"after").is_err(), "the connection was ended");
}
