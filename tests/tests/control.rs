//! The control plane end to end: the real `gateway daemon` in a namespace topology, driven by
//! the real CLI, with real TCP traffic.

use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    os::unix::fs::PermissionsExt as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use gateway::{datapath::AttachMode, state::ClientAddress};
use gateway_common::maps::{APP_CLIENT_ADDRESS_TOA as TOA, AppConfig};
use gateway_tests::{
    daemon::Daemon,
    netns::Topology,
    require_root,
    traffic::{EchoClient, EchoServer, payload, sock},
};

const LIFETIME: Duration = Duration::from_secs(120);

fn spread(conns: &[EchoClient]) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for c in conns {
        *by.entry(c.server.clone()).or_default() += 1;
    }
    by
}

fn backend(topo: &Topology, i: usize, port: u16) -> String {
    SocketAddrV4::new(topo.backends[i].ip, port).to_string()
}

#[test]
fn apps_and_backends_through_the_cli_carry_traffic_and_stay_isolated() {
    require_root();
    let topo = Topology::new(3);
    let _web = topo.echo_servers(8080, LIFETIME);
    let b2 = &topo.backends[2];
    let _db = EchoServer::start(b2, SocketAddrV4::new(b2.ip, 9090), "db-b2", LIFETIME);
    let daemon = Daemon::start(&topo, None, &[]);

    let mode = std::fs::metadata(&daemon.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the API socket is root-only");
    let status = daemon.status();
    assert!(
        status.attachments.iter().all(|a| a.mode == AttachMode::Tc),
        "veth gets tc by default: {:?}",
        status.attachments
    );

    assert_eq!(
        daemon.ok(&["app", "create", "web"]),
        "tcp://203.0.113.10:20000\n"
    );
    for i in 0..3 {
        daemon.ok(&["backend", "add", "web", &backend(&topo, i, 8080)]);
    }
    daemon.wait_active("web", 3);
    let web = sock(Topology::PUBLIC_IP, 20000);
    let mut conns = EchoClient::connect_many(&topo.client, web, 150).unwrap();
    for (i, c) in conns.iter_mut().enumerate() {
        c.echo(&payload(2000, i as u32)).unwrap();
    }
    let by = spread(&conns);
    assert_eq!(by.keys().collect::<Vec<_>>(), ["b0", "b1", "b2"], "{by:?}");
    assert!(
        by.values().all(|&n| n >= 25),
        "every backend gets a share: {by:?}"
    );

    // Open connections as the daemon counts them match what the client sees, per backend.
    let status = daemon.fresh_status();
    let app = &status.apps[0];
    assert_eq!(app.connections, 150);
    for (i, b) in app.backends.iter().enumerate() {
        assert_eq!(b.address, backend(&topo, i, 8080));
        assert_eq!(b.state, gateway::state::BackendState::Active);
        assert_eq!(b.connections as usize, by[&format!("b{i}")], "{b:?}");
    }

    // A second app on its own port reaches only its own backend.
    assert_eq!(
        daemon.ok(&["app", "create", "db", "--port", "20010"]),
        "tcp://203.0.113.10:20010\n"
    );
    daemon.ok(&[
        "backend",
        "add",
        "db",
        &backend(&topo, 2, 9090),
        "--weight",
        "5",
    ]);
    daemon.wait_active("db", 1);
    let db = sock(Topology::PUBLIC_IP, 20010);
    let db_conns = EchoClient::connect_many(&topo.client, db, 20).unwrap();
    assert_eq!(
        spread(&db_conns),
        BTreeMap::from([("db-b2".to_owned(), 20)])
    );
    daemon.fresh_status();
    let shown: gateway::api::AppView =
        serde_json::from_str(&daemon.ok(&["app", "show", "db", "--json"])).unwrap();
    assert_eq!(
        (shown.port, shown.connections, shown.backends[0].weight),
        (20010, 20, 5)
    );
    drop(db_conns);

    // Deleting an app ends its connections, stops its traffic and frees its port.
    let mut open = EchoClient::connect(&topo.client, db).unwrap();
    open.echo(b"before").unwrap();
    assert!(
        daemon
            .ok(&["app", "delete", "db"])
            .contains("port 20010 is free")
    );
    assert!(
        open.echo(b"after").is_err(),
        "the deleted app's connection ended"
    );
    assert!(
        EchoClient::connect(&topo.client, db).is_err(),
        "nothing answers on its port"
    );
    assert!(
        daemon
            .fails(&["app", "show", "db"])
            .contains("no app named \"db\"")
    );
    // The other app never noticed.
    for (i, c) in conns.iter_mut().enumerate() {
        c.echo(&payload(100, i as u32)).unwrap();
    }
    assert_eq!(
        daemon.ok(&["app", "create", "db2", "--port", "20010"]),
        "tcp://203.0.113.10:20010\n",
        "the port is free again"
    );

    // Removing a backend drains it: new connections avoid it, open ones to it go on.
    let victim = conns.iter().position(|c| c.server == "b1").unwrap();
    daemon.ok(&["backend", "remove", "web", &backend(&topo, 1, 8080)]);
    let b1 = daemon
        .backends("web")
        .into_iter()
        .find(|b| b.address == backend(&topo, 1, 8080));
    assert_eq!(b1.unwrap().state, gateway::state::BackendState::Draining);
    let fresh = EchoClient::connect_many(&topo.client, web, 60).unwrap();
    assert!(!spread(&fresh).contains_key("b1"), "{:?}", spread(&fresh));
    conns[victim].echo(&payload(100_000, 7)).unwrap();
}

/// `gateway status --json` without the counters that move on their own (health checks).
fn settled(daemon: &Daemon) -> gateway::api::Status {
    let mut status = daemon.status();
    status.health_checks = 0;
    status.health_checks_failed = 0;
    status.scanned_at_ms = 0;
    status
}

#[test]
fn invalid_input_is_refused_with_one_line_and_changes_nothing() {
    require_root();
    let topo = Topology::new(1);
    let mut daemon = Daemon::start(&topo, None, &["--port-range", "20000-20001"]);
    daemon.ok(&["app", "create", "web"]);
    daemon.ok(&["backend", "add", "web", "198.51.100.2:8080"]);
    let snapshot = settled(&daemon);

    let cases: &[(&[&str], &str)] = &[
        (&["app", "create", "web"], "app \"web\" already exists"),
        (&["app", "create", "Web"], "bad app name"),
        (&["app", "create", "a_b"], "bad app name"),
        (&["app", "create", &"a".repeat(64)], "bad app name"),
        (
            &["app", "create", "x", "--port", "20005"],
            "outside the public port range 20000-20001",
        ),
        (
            &["app", "create", "x", "--port", "20000"],
            "already used by app \"web\"",
        ),
        (&["app", "create", "x", "--port", "0"], "port 0"),
        (&["app", "show", "nope"], "no app named \"nope\""),
        (&["app", "delete", "nope"], "no app named \"nope\""),
        (&["backend", "list", "nope"], "no app named \"nope\""),
        (
            &["backend", "add", "nope", "198.51.100.2:8080"],
            "no app named \"nope\"",
        ),
        (
            &["backend", "add", "web", "198.51.100.2:8080"],
            "already has backend",
        ),
        (
            &["backend", "add", "web", "198.51.100.2"],
            "bad backend address",
        ),
        (
            &["backend", "add", "web", "backend:80"],
            "bad backend address",
        ),
        (
            &["backend", "add", "web", "[2001:db8::1]:80"],
            "bad backend address",
        ),
        (
            &["backend", "add", "web", "224.0.0.1:80"],
            "not a unicast address",
        ),
        (
            &["backend", "add", "web", "0.0.0.0:80"],
            "not a unicast address",
        ),
        (
            &["backend", "add", "web", "255.255.255.255:80"],
            "not a unicast address",
        ),
        (&["backend", "add", "web", "198.51.100.6:0"], "port 0"),
        (
            &["backend", "add", "web", "198.51.100.6:80", "--weight", "0"],
            "weight 0 is out of range",
        ),
        (
            &[
                "backend",
                "add",
                "web",
                "198.51.100.6:80",
                "--weight",
                "257",
            ],
            "weight 257 is out of range",
        ),
        (
            &["deploy", "nope", "198.51.100.6:80"],
            "no app named \"nope\"",
        ),
        (&["deploy", "web", "198.51.100.6"], "bad backend address"),
        (
            &["deploy", "web", "198.51.100.6:80", "198.51.100.6:80"],
            "already has backend",
        ),
        (
            &["deploy", "web", "198.51.100.6:80", "--quorum", "2"],
            "quorum 2 is out of range",
        ),
        (
            &["deploy", "web", "198.51.100.6:80", "--weight", "0"],
            "weight 0 is out of range",
        ),
        (
            &["app", "create", "x", "--check-fall", "0"],
            "bad health-check setting",
        ),
        (
            &["backend", "remove", "web", "198.51.100.6:80"],
            "has no backend",
        ),
    ];
    for (args, wants) in cases {
        let err = daemon.fails(args);
        assert!(err.contains(wants), "gateway {}: {err}", args.join(" "));
        assert_eq!(settled(&daemon), snapshot, "after {args:?}");
    }

    // The range runs out.
    daemon.ok(&["app", "create", "x"]);
    let snapshot = settled(&daemon);
    let err = daemon.fails(&["app", "create", "y"]);
    assert!(
        err.contains("every public port in 20000-20001 is taken"),
        "{err}"
    );
    assert_eq!(settled(&daemon), snapshot);

    // Config file errors name the line and column; nothing starts.
    let config = daemon.dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "public-ip = \"203.0.113.10\"\nport-range = 20000\n",
    )
    .unwrap();
    let out = daemon
        .command(&["--config".into(), config.display().to_string()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("bad.toml") && err.contains("line 2, column 14"),
        "{err}"
    );

    // A corrupt state file stops the start with a clear error and is left as it is.
    assert!(daemon.terminate().is_some_and(|s| s.success()));
    let state = daemon.dir.path().join("state/state.json");
    let good = std::fs::read(&state).unwrap();
    std::fs::write(&state, b"{\"format\": 1, \"apps\": ").unwrap();
    let out = daemon.command(&daemon.own_args()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("is corrupt") && err.contains("left as it is"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(&state).unwrap(),
        b"{\"format\": 1, \"apps\": "
    );
    std::fs::write(&state, good).unwrap();
    daemon.restart();
    assert_eq!(settled(&daemon), snapshot, "the state survived");
}

/// 20 connections exchanging data without pause while the daemon is killed with SIGKILL,
/// started, stopped with SIGTERM and started again: every one survives, byte-exact.
fn restart_keeps_connections(mode: AttachMode) {
    require_root();
    let topo = Topology::new(3);
    if mode == AttachMode::Xdp {
        topo.xdp_offloads();
    }
    let _servers = topo.echo_servers(8080, LIFETIME);
    let mut daemon = Daemon::start(&topo, Some(mode), &[]);
    let backends: Vec<String> = (0..3).map(|i| backend(&topo, i, 8080)).collect();
    daemon.app_with_backends("web", &backends);
    let before = daemon.status().apps;
    let web = sock(Topology::PUBLIC_IP, 20000);
    let conns = EchoClient::connect_many(&topo.client, web, 20).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let rounds: Arc<Vec<AtomicU64>> = Arc::new((0..20).map(|_| AtomicU64::new(0)).collect());
    let workers: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            let (stop, rounds) = (stop.clone(), rounds.clone());
            thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && n < 1_000_000 {
                    c.echo(&payload(8192, i as u32 * 7919 + n))?;
                    n += 1;
                    rounds[i].store(u64::from(n), Ordering::Relaxed);
                }
                Ok::<u32, std::io::Error>(n)
            })
        })
        .collect();
    let progress = || {
        rounds
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .collect::<Vec<_>>()
    };
    let all_moved = |since: &[u64]| {
        gateway_tests::wait_for(Duration::from_secs(10), || {
            progress().iter().zip(since).all(|(now, then)| now > then)
        })
        .is_some()
    };
    assert!(all_moved(&[0; 20]), "traffic flows");

    daemon.kill9();
    let at_kill = progress();
    assert!(all_moved(&at_kill), "traffic flows while no daemon runs");
    daemon.restart();
    assert!(
        daemon.log().contains("pinned maps reused"),
        "{}",
        daemon.log()
    );
    let status = daemon.fresh_status();
    assert_eq!(status.apps.len(), 1);
    assert_eq!(status.apps[0].connections, 20, "the conntrack was reused");
    let strip = |apps: &[gateway::api::AppView]| {
        apps.iter()
            .map(|a| {
                (
                    a.name.clone(),
                    a.url.clone(),
                    a.backends
                        .iter()
                        .map(|b| b.address.clone())
                        .collect::<Vec<_>>(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&status.apps), strip(&before), "the state survived");

    assert!(
        daemon.terminate().is_some_and(|s| s.success()),
        "{}",
        daemon.log()
    );
    let at_term = progress();
    assert!(all_moved(&at_term), "traffic flows after SIGTERM");
    daemon.restart();
    let at_start = progress();
    assert!(all_moved(&at_start), "traffic flows after the second start");

    stop.store(true, Ordering::Relaxed);
    for (i, w) in workers.into_iter().enumerate() {
        let n = w
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert!(u64::from(n) > at_start[i], "connection {i}");
    }
    let fresh = EchoClient::connect_many(&topo.client, web, 20).unwrap();
    assert_eq!(fresh.len(), 20);
    drop(fresh);

    // `gateway down` detaches everything: the pins go and nothing answers any more. XDP
    // programs show in `ip link`: none may be left once the command has returned.
    let xdp_attached = || topo.gateway.ip("link show").contains(" xdp");
    assert_eq!(xdp_attached(), mode == AttachMode::Xdp);
    assert!(daemon.ok(&["down"]).contains("detached"));
    assert!(!xdp_attached(), "no XDP program left when `down` returns");
    assert!(!daemon.bpffs.exists(), "the pins are gone");
    assert!(EchoClient::connect(&topo.client, web).is_err());
}

#[test]
fn daemon_restart_keeps_connections_tc() {
    restart_keeps_connections(AttachMode::Tc);
}

#[test]
fn daemon_restart_keeps_connections_xdp() {
    restart_keeps_connections(AttachMode::Xdp);
}

#[test]
fn detach_on_exit_removes_the_datapath_on_sigterm() {
    require_root();
    let topo = Topology::new(1);
    let _servers = topo.echo_servers(8080, LIFETIME);
    let mut daemon = Daemon::start(&topo, None, &["--detach-on-exit"]);
    daemon.app_with_backends("web", &[backend(&topo, 0, 8080)]);
    let web = sock(Topology::PUBLIC_IP, 20000);
    EchoClient::connect(&topo.client, web).unwrap();
    assert!(daemon.bpffs.exists());
    assert!(
        daemon.terminate().is_some_and(|s| s.success()),
        "{}",
        daemon.log()
    );
    assert!(
        !daemon.bpffs.exists(),
        "the pins are gone: {}",
        daemon.log()
    );
    assert!(
        EchoClient::connect(&topo.client, web).is_err(),
        "nothing answers any more"
    );
}

/// The MSS clamps the datapath reads, by app id (those that are not 0).
#[track_caller]
fn clamps(daemon: &Daemon) -> BTreeMap<u32, u16> {
    daemon
        .app_configs()
        .iter()
        .enumerate()
        .filter_map(|(id, config)| {
            let config = config.unwrap_or_else(|e| panic!("app id {id}: {e}"));
            (config.mss_clamp != 0).then_some((id as u32, config.mss_clamp))
        })
        .collect()
}

/// An app's MSS clamp (`--mss`) reaches the map the datapath reads: at create, changed and
/// removed live by `app set`, written again from the state file at start over what the map
/// held, zeroed on delete. A bad value, or a change that cannot be saved, leaves the state and
/// the map as they were.
#[test]
fn an_apps_mss_clamp_is_programmed_changed_restored_and_cleared() {
    require_root();
    let topo = Topology::new(1);
    let mut daemon = Daemon::start(&topo, None, &[]);
    assert_eq!(
        daemon.ok(&["app", "create", "web", "--mss", "1360"]),
        "tcp://203.0.113.10:20000\n"
    );
    daemon.ok(&["app", "create", "db"]);
    let web = daemon.app_id(20000).expect("web is routed");
    let db = daemon.app_id(20001).expect("db is routed");
    assert_eq!(clamps(&daemon), BTreeMap::from([(web, 1360)]));
    assert_eq!(daemon.app("web").mss_clamp, Some(1360));
    assert_eq!(daemon.app("db").mss_clamp, None);
    let show = daemon.ok(&["app", "show", "web"]);
    assert!(
        show.contains("  MSS clamp 1360, client address none  "),
        "{show}"
    );
    let list: Vec<gateway::api::AppView> =
        serde_json::from_str(&daemon.ok(&["app", "list", "--json"])).unwrap();
    let listed: Vec<_> = list
        .iter()
        .map(|a| (a.name.as_str(), a.mss_clamp))
        .collect();
    assert_eq!(listed, [("db", None), ("web", Some(1360))]);
    let list = daemon.ok(&["app", "list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("web ") && l.contains(" 1360 ")),
        "{list}"
    );

    // Changed live, set and removed.
    assert_eq!(
        daemon.ok(&["app", "set", "db", "--mss", "1400"]),
        "app db: MSS clamp 1400, client address none\n"
    );
    assert_eq!(
        daemon.ok(&["app", "set", "web", "--no-mss"]),
        "app web: no MSS clamp, client address none\n"
    );
    assert_eq!(clamps(&daemon), BTreeMap::from([(db, 1400)]));
    assert_eq!(daemon.app("web").mss_clamp, None);
    daemon.ok(&["app", "set", "web", "--mss", "536"]);
    let programmed = BTreeMap::from([(web, 536), (db, 1400)]);
    assert_eq!(clamps(&daemon), programmed);

    // Refused with one line; nothing changed, in the state or in the map.
    let snapshot = settled(&daemon);
    let cases: &[(&[&str], &str)] = &[
        (
            &["app", "create", "x", "--mss", "535"],
            "MSS clamp 535 is out of range: an MSS clamp is 536 to 65495 bytes",
        ),
        (
            &["app", "create", "x", "--mss", "65496"],
            "MSS clamp 65496 is out of range",
        ),
        (
            &["app", "create", "x", "--mss", "0"],
            "MSS clamp 0 is out of range",
        ),
        (&["app", "create", "X", "--mss", "1360"], "bad app name"),
        (
            &["app", "set", "web", "--mss", "100"],
            "MSS clamp 100 is out of range",
        ),
        (
            &["app", "set", "web", "--mss", "70000"],
            "MSS clamp 70000 is out of range",
        ),
        (
            &["app", "set", "nope", "--mss", "1360"],
            "no app named \"nope\"",
        ),
        (&["app", "set", "nope", "--no-mss"], "no app named \"nope\""),
    ];
    for (args, wants) in cases {
        let err = daemon.fails(args);
        assert!(err.contains(wants), "gateway {}: {err}", args.join(" "));
        assert_eq!(settled(&daemon), snapshot, "after {args:?}");
        assert_eq!(clamps(&daemon), programmed, "after {args:?}");
    }
    assert_eq!(daemon.app_id(20002), None, "no app was created");
    // What clap refuses (with its usage) never reaches the daemon.
    let usage: &[&[&str]] = &[
        &["app", "set", "web"],
        &["app", "set", "web", "--mss", "1400", "--no-mss"],
        &["app", "create", "x", "--mss", "abc"],
    ];
    for args in usage {
        assert!(!daemon.cli(args).status.success(), "{args:?}");
        assert_eq!(settled(&daemon), snapshot, "after {args:?}");
    }

    // A change the state file cannot take is undone in the datapath too.
    let tmp = daemon.dir.path().join("state/state.json.tmp");
    std::fs::create_dir(&tmp).unwrap_or_else(|e| panic!("{}: {e}", tmp.display()));
    let set = daemon.fails(&["app", "set", "web", "--mss", "1400"]);
    let create = daemon.fails(&["app", "create", "x", "--mss", "1400"]);
    std::fs::remove_dir(&tmp).unwrap();
    assert!(
        set.contains("state.json.tmp") && create.contains("state.json.tmp"),
        "{set}{create}"
    );
    assert_eq!(settled(&daemon), snapshot);
    assert_eq!(clamps(&daemon), programmed, "the datapath was put back");

    // A start programs the clamps of the state file over whatever the pinned map holds: a
    // wrong value, a missing one, one of an app the state does not have.
    daemon.kill9();
    let mut configs = daemon.app_configs();
    let clamp = |mss_clamp| gateway_common::maps::AppConfig {
        mss_clamp,
        ..Default::default()
    };
    configs.set(web, clamp(9000), 0).unwrap();
    configs.set(db, clamp(0), 0).unwrap();
    configs.set(77, clamp(1200), 0).unwrap();
    drop(configs);
    daemon.restart();
    assert_eq!(clamps(&daemon), programmed, "{}", daemon.log());
    assert_eq!(settled(&daemon), snapshot, "the state survived");

    // Deleting an app zeroes its clamp.
    daemon.ok(&["app", "delete", "web"]);
    assert_eq!(clamps(&daemon), BTreeMap::from([(db, 1400)]));
    daemon.ok(&["app", "delete", "db"]);
    assert_eq!(clamps(&daemon), BTreeMap::new());
}

/// The settings the datapath reads, by app id (those that are not all zero): the MSS clamp and
/// the flags.
#[track_caller]
fn app_settings(daemon: &Daemon) -> BTreeMap<u32, (u16, u32)> {
    daemon
        .app_configs()
        .iter()
        .enumerate()
        .filter_map(|(id, config)| {
            let config = config.unwrap_or_else(|e| panic!("app id {id}: {e}"));
            (config != AppConfig::default())
                .then_some((id as u32, (config.mss_clamp, config.flags)))
        })
        .collect()
}

/// An app's client address setting (`--client-address toa`, issue 17) reaches the map the
/// datapath reads, as a flag beside the MSS clamp, each kept when the other changes: at create,
/// changed live by `app set` and the API's merge patch, written again from the state file at
/// start over what the map held, zeroed on delete. A bad value, from the CLI or the API, or a
/// change that cannot be saved, leaves the state and the map as they were.
#[test]
fn an_apps_client_address_is_programmed_changed_restored_and_cleared() {
    require_root();
    let topo = Topology::new(1);
    let mut daemon = Daemon::start(&topo, None, &[]);
    assert_eq!(
        daemon.ok(&[
            "app",
            "create",
            "web",
            "--client-address",
            "toa",
            "--mss",
            "1360"
        ]),
        "tcp://203.0.113.10:20000\n"
    );
    daemon.ok(&["app", "create", "db"]);
    daemon.ok(&["app", "create", "api", "--client-address", "none"]);
    let web = daemon.app_id(20000).expect("web is routed");
    let db = daemon.app_id(20001).expect("db is routed");
    assert_eq!(app_settings(&daemon), BTreeMap::from([(web, (1360, TOA))]));
    assert_eq!(daemon.app("web").client_address, ClientAddress::Toa);
    assert_eq!(daemon.app("db").client_address, ClientAddress::None);
    assert_eq!(daemon.app("api").client_address, ClientAddress::None);
    let state = std::fs::read_to_string(daemon.dir.path().join("state/state.json")).unwrap();
    assert_eq!(
        state.matches(r#""client_address": "toa""#).count(),
        1,
        "{state}"
    );
    let show = daemon.ok(&["app", "show", "web"]);
    assert!(
        show.contains("  MSS clamp 1360, client address toa  "),
        "{show}"
    );
    let list = daemon.ok(&["app", "list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("web ") && l.contains(" toa ")),
        "{list}"
    );
    assert!(
        !list
            .lines()
            .any(|l| !l.starts_with("web ") && l.contains(" toa ")),
        "{list}"
    );
    let status = daemon.ok(&["status"]);
    assert!(
        status.contains("\napp web  tcp://203.0.113.10:20000  client address toa  0 open"),
        "{status}"
    );
    assert_eq!(status.matches("client address").count(), 1, "{status}");
    let (code, body) = daemon.api("GET", "/v1/apps/web", "");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""client_address":"toa""#), "{body}");

    // Changed live, each setting kept when the other changes.
    assert_eq!(
        daemon.ok(&["app", "set", "web", "--client-address", "none"]),
        "app web: MSS clamp 1360, client address none\n"
    );
    assert_eq!(app_settings(&daemon), BTreeMap::from([(web, (1360, 0))]));
    assert_eq!(
        daemon.ok(&["app", "set", "db", "--client-address", "toa"]),
        "app db: no MSS clamp, client address toa\n"
    );
    daemon.ok(&["app", "set", "db", "--mss", "1400"]);
    daemon.ok(&["app", "set", "web", "--client-address", "toa"]);
    assert_eq!(
        app_settings(&daemon),
        BTreeMap::from([(web, (1360, TOA)), (db, (1400, TOA))])
    );
    assert_eq!(daemon.app("db").client_address, ClientAddress::Toa);
    // The API: a merge patch (`null` removes the setting), and a create.
    let (code, body) = daemon.api("PATCH", "/v1/apps/db", r#"{"client_address": null}"#);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""client_address":"none""#), "{body}");
    assert_eq!(
        app_settings(&daemon),
        BTreeMap::from([(web, (1360, TOA)), (db, (1400, 0))])
    );
    let (code, body) = daemon.api("PATCH", "/v1/apps/db", r#"{"client_address": "toa"}"#);
    assert_eq!(code, 200, "{body}");
    let (code, body) = daemon.api("PATCH", "/v1/apps/db", r#"{"mss_clamp": 1400}"#);
    assert_eq!(code, 200, "{body}");
    let (code, body) = daemon.api(
        "POST",
        "/v1/apps",
        r#"{"name": "ftp", "client_address": "toa"}"#,
    );
    assert_eq!(code, 201, "{body}");
    let ftp = daemon.app_id(20003).expect("ftp is routed");
    let programmed = BTreeMap::from([(web, (1360, TOA)), (db, (1400, TOA)), (ftp, (0, TOA))]);
    assert_eq!(app_settings(&daemon), programmed);

    // Refused with one clear error; nothing changed, in the state or in the map.
    let snapshot = settled(&daemon);
    let bad = "client address must be toa or none";
    for args in [
        &["app", "create", "x", "--client-address", "foo"][..],
        &["app", "set", "web", "--client-address", "foo"],
        &["app", "set", "web", "--client-address", "TOA"],
        &["app", "set", "web", "--client-address", ""],
    ] {
        let out = daemon.cli(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            stderr.lines().next().is_some_and(|l| l.contains(bad)),
            "gateway {}: {stderr}",
            args.join(" ")
        );
        assert_eq!(settled(&daemon), snapshot, "after {args:?}");
        assert_eq!(app_settings(&daemon), programmed, "after {args:?}");
    }
    let cases: &[(&[&str], &str)] = &[
        (
            &["app", "set", "nope", "--client-address", "toa"],
            "no app named \"nope\"",
        ),
        (
            &["app", "create", "X", "--client-address", "toa"],
            "bad app name",
        ),
        (
            &[
                "app",
                "set",
                "web",
                "--client-address",
                "none",
                "--mss",
                "1",
            ],
            "MSS clamp 1 is out of range",
        ),
    ];
    for (args, wants) in cases {
        let err = daemon.fails(args);
        assert!(err.contains(wants), "gateway {}: {err}", args.join(" "));
        assert_eq!(settled(&daemon), snapshot, "after {args:?}");
        assert_eq!(app_settings(&daemon), programmed, "after {args:?}");
    }
    let api: &[(&str, &str, &str, u16, &str)] = &[
        (
            "POST",
            "/v1/apps",
            r#"{"name": "x", "client_address": "foo"}"#,
            400,
            bad,
        ),
        (
            "POST",
            "/v1/apps",
            r#"{"name": "x", "client_address": "Toa"}"#,
            400,
            bad,
        ),
        (
            "PATCH",
            "/v1/apps/web",
            r#"{"client_address": "foo"}"#,
            400,
            bad,
        ),
        (
            "PATCH",
            "/v1/apps/web",
            r#"{"client_address": 1}"#,
            400,
            "bad request body",
        ),
        (
            "PATCH",
            "/v1/apps/web",
            r#"{"client_address": "none", "mss_clamp": 1}"#,
            400,
            "MSS clamp 1 is out of range",
        ),
        (
            "PATCH",
            "/v1/apps/nope",
            r#"{"client_address": "toa"}"#,
            404,
            "no app named",
        ),
    ];
    for &(method, path, body, status, wants) in api {
        let (code, answer) = daemon.api(method, path, body);
        assert_eq!(code, status, "{method} {path} {body}: {answer}");
        assert!(answer.contains(wants), "{method} {path} {body}: {answer}");
        assert_eq!(settled(&daemon), snapshot, "after {method} {path} {body}");
        assert_eq!(
            app_settings(&daemon),
            programmed,
            "after {method} {path} {body}"
        );
    }
    assert_eq!(daemon.app_id(20004), None, "no app was created");

    // A change the state file cannot take is undone in the datapath too.
    let tmp = daemon.dir.path().join("state/state.json.tmp");
    std::fs::create_dir(&tmp).unwrap_or_else(|e| panic!("{}: {e}", tmp.display()));
    let set = daemon.fails(&["app", "set", "web", "--client-address", "none"]);
    std::fs::remove_dir(&tmp).unwrap();
    assert!(set.contains("state.json.tmp"), "{set}");
    assert_eq!(settled(&daemon), snapshot);
    assert_eq!(
        app_settings(&daemon),
        programmed,
        "the datapath was put back"
    );

    // A start programs the settings of the state file over whatever the pinned map holds: a
    // flag missing, a flag too many, one of an app the state does not have.
    daemon.kill9();
    let mut configs = daemon.app_configs();
    let config = |mss_clamp, flags| AppConfig {
        mss_clamp,
        flags,
        ..Default::default()
    };
    configs.set(web, config(1360, 0), 0).unwrap();
    configs.set(db, config(1400, 0), 0).unwrap();
    let api_id = daemon.app_id(20002).expect("api is routed");
    configs.set(api_id, config(0, TOA), 0).unwrap();
    configs.set(77, config(0, TOA), 0).unwrap();
    drop(configs);
    daemon.restart();
    assert_eq!(app_settings(&daemon), programmed, "{}", daemon.log());
    assert_eq!(settled(&daemon), snapshot, "the state survived");

    // Deleting an app zeroes its settings.
    daemon.ok(&["app", "delete", "web"]);
    assert_eq!(
        app_settings(&daemon),
        BTreeMap::from([(db, (1400, TOA)), (ftp, (0, TOA))])
    );
    daemon.ok(&["app", "delete", "db"]);
    daemon.ok(&["app", "delete", "ftp"]);
    assert_eq!(app_settings(&daemon), BTreeMap::new());
}

/// The rate limits the datapath reads, by backend id (those that are set): (interval, tolerance)
/// to the backend and from it.
#[track_caller]
fn rate_limits(daemon: &Daemon) -> BTreeMap<u32, [(u64, u64); 2]> {
    use gateway_common::maps::{RATE_FROM_BACKEND, RATE_TO_BACKEND, rate_slot};
    let map = daemon.rate_limits();
    let read = |id: u32, dir| {
        let l = map
            .get(&rate_slot(id, dir), 0)
            .unwrap_or_else(|e| panic!("backend id {id}: {e}"));
        (l.interval_ns, l.tolerance_ns)
    };
    (1..gateway_common::maps::MAX_BACKENDS)
        .filter_map(|id| {
            let both = [read(id, RATE_TO_BACKEND), read(id, RATE_FROM_BACKEND)];
            (both != [(0, 0); 2]).then_some((id, both))
        })
        .collect()
}

/// Sets backend `id`'s packets dropped over its rate limit, as the datapath would count them
/// (on CPU 0): `to` the backend, `from` it.
#[track_caller]
fn set_rate_drops(daemon: &Daemon, id: u32, to: u64, from: u64) {
    use gateway_common::maps::{RATE_DROPS, RATE_FROM_BACKEND, RATE_TO_BACKEND, rate_slot};
    let map = aya::maps::MapData::from_pin(daemon.bpffs.join(RATE_DROPS)).unwrap();
    let mut drops: aya::maps::PerCpuArray<_, u64> =
        aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(map)).unwrap();
    let cpus = aya::util::nr_cpus().unwrap();
    let per_cpu = |n: u64| {
        let mut v = vec![0u64; cpus];
        v[0] = n;
        aya::maps::PerCpuValues::try_from(v).unwrap()
    };
    drops
        .set(rate_slot(id, RATE_TO_BACKEND), per_cpu(to), 0)
        .unwrap();
    drops
        .set(rate_slot(id, RATE_FROM_BACKEND), per_cpu(from), 0)
        .unwrap();
}

/// What `pps` packets a second with bursts of `burst` are in the datapath, for each of `ids`,
/// both directions (a tolerance of at least a tick of the datapath's clock).
fn limited(ids: &[u32], pps: u64, burst: u64) -> BTreeMap<u32, [(u64, u64); 2]> {
    let interval = 1_000_000_000 / pps;
    let tolerance = ((burst - 1) * interval).max(gateway::datapath::clock_tick_ns());
    let both = [(interval, tolerance); 2];
    ids.iter().map(|&id| (id, both)).collect()
}

/// An app's rate limit (`--rate-limit`, `--plan`) reaches every one of its backends, both
/// directions: at create, changed and removed live by `app set`, given to a backend added
/// later, taken from one removed (its id is reused), written again at start over what the map
/// held, zeroed on delete. A bad value or an unknown plan leaves the state and the map as they
/// were.
#[test]
fn an_apps_rate_limit_is_programmed_for_each_backend_changed_restored_and_cleared() {
    require_root();
    let topo = Topology::new(2);
    let config = std::env::temp_dir().join(format!("gateway-plans-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        "[plans]\nsmall = \"1000pps,burst=100\"\nlarge = \"50000pps\"\n",
    )
    .unwrap();
    let mut daemon = Daemon::start(&topo, None, &["--config", config.to_str().unwrap()]);
    daemon.ok(&["app", "create", "web", "--rate-limit", "1000pps,burst=200"]);
    daemon.ok(&["app", "create", "db"]);
    for i in 0..2 {
        daemon.ok(&["backend", "add", "web", &backend(&topo, i, 8080)]);
    }
    daemon.ok(&["backend", "add", "db", &backend(&topo, 0, 5432)]);
    let web: Vec<u32> = daemon.backend_ids("web").into_values().collect();
    let db: Vec<u32> = daemon.backend_ids("db").into_values().collect();
    assert_eq!((web.len(), db.len()), (2, 1));
    assert_eq!(rate_limits(&daemon), limited(&web, 1000, 200));
    let limit = gateway::state::RateLimit {
        pps: 1000,
        burst: 200,
    };
    assert_eq!(daemon.app("web").rate_limit, Some(limit));
    assert_eq!(daemon.app("db").rate_limit, None);
    assert!(
        daemon
            .app("web")
            .backends
            .iter()
            .all(|b| b.rate_limit == Some(limit)),
        "{:?}",
        daemon.app("web")
    );
    let show = daemon.ok(&["app", "show", "web"]);
    assert!(show.contains(", rate limit 1000 pps (burst 200)"), "{show}");
    let list = daemon.ok(&["backend", "list", "web"]);
    assert!(
        list.contains("RATE LIMIT") && list.matches("1000 pps (burst 200)").count() == 2,
        "{list}"
    );
    let list = daemon.ok(&["app", "list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("web ") && l.contains("1000 pps (burst 200)")),
        "{list}"
    );
    let status = daemon.ok(&["status"]);
    assert!(
        status.contains("rate limit 1000 pps (burst 200) per backend")
            && status.matches("1000 pps (burst 200)  ").count() == 2,
        "{status}"
    );

    // Each backend's drops, as the datapath counts them (per CPU, summed), in the API, the
    // table and the metrics, with the limit.
    let (first, first_id) = daemon
        .backend_ids("web")
        .into_iter()
        .next()
        .expect("a backend");
    set_rate_drops(&daemon, first_id, 345, 6);
    let backends: Vec<gateway::api::BackendView> =
        serde_json::from_str(&daemon.ok(&["backend", "list", "web", "--json"])).unwrap();
    let dropped: BTreeMap<&str, (u64, u64)> = backends
        .iter()
        .map(|b| {
            let d = (b.rate_dropped_to_backend, b.rate_dropped_from_backend);
            (b.address.as_str(), d)
        })
        .collect();
    let other = backends
        .iter()
        .find(|b| b.address != first)
        .unwrap()
        .address
        .clone();
    assert_eq!(
        dropped,
        BTreeMap::from([(first.as_str(), (345, 6)), (other.as_str(), (0, 0))])
    );
    let list = daemon.ok(&["backend", "list", "web"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with(first.as_str()) && l.ends_with(" 345/6")),
        "{list}"
    );
    let scrape = daemon.scrape();
    let series = |name: &str, labels: &[(&str, &str)]| scrape.value(name, labels);
    let web_first = [("app", "web"), ("backend", first.as_str())];
    assert_eq!(
        series(
            "gateway_backend_ratelimit_dropped_packets_total",
            &[web_first[0], web_first[1], ("direction", "to_backend")]
        ),
        345.0
    );
    assert_eq!(
        series(
            "gateway_backend_ratelimit_dropped_packets_total",
            &[web_first[0], web_first[1], ("direction", "from_backend")]
        ),
        6.0
    );
    assert_eq!(series("gateway_backend_ratelimit_pps", &web_first), 1000.0);
    assert_eq!(series("gateway_backend_ratelimit_burst", &web_first), 200.0);

    // Changed live: numbers (the burst's default 300 ms of the rate), a plan, none.
    assert_eq!(
        daemon.ok(&["app", "set", "db", "--rate-limit", "5000"]),
        "app db: no MSS clamp, client address none, rate limit 5000 pps (burst 1500)\n"
    );
    let mut programmed = limited(&web, 1000, 200);
    programmed.extend(limited(&db, 5000, 1500));
    assert_eq!(rate_limits(&daemon), programmed);
    assert_eq!(
        daemon.ok(&["app", "set", "web", "--plan", "small"]),
        "app web: no MSS clamp, client address none, rate limit 1000 pps (burst 100) (plan small)\n"
    );
    assert_eq!(daemon.app("web").plan.as_deref(), Some("small"));
    programmed.extend(limited(&web, 1000, 100));
    assert_eq!(rate_limits(&daemon), programmed);
    daemon.ok(&["app", "set", "db", "--no-rate-limit"]);
    assert_eq!(daemon.app("db").rate_limit, None);
    programmed = limited(&web, 1000, 100);
    assert_eq!(rate_limits(&daemon), programmed);
    daemon.ok(&["app", "create", "api", "--plan", "large"]);
    assert_eq!(
        daemon.app("api").rate_limit,
        Some(gateway::state::RateLimit {
            pps: 50000,
            burst: 15000
        })
    );

    // Refused with one line; nothing changed, in the state or in the map.
    let snapshot = settled(&daemon);
    // A value the CLI cannot read is refused there, in the daemon's words.
    for (args, wants) in [
        (["app", "create", "x", "--rate-limit", "0pps"], "\"0pps\""),
        (
            ["app", "create", "x", "--rate-limit", "10000001pps"],
            "\"10000001pps\"",
        ),
        (
            ["app", "set", "web", "--rate-limit", "100pps,burst=1001"],
            "\"100pps,burst=1001\"",
        ),
        (["app", "set", "web", "--rate-limit", "fast"], "\"fast\""),
    ] {
        let out = daemon.cli(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            err.contains("rate limit must look like 1000pps or 1000pps,burst=200")
                && err.contains(wants),
            "{args:?}: {err}"
        );
        assert_eq!(settled(&daemon), snapshot, "after {args:?}");
    }
    let cases: &[(&[&str], &str)] = &[
        (
            &["app", "set", "web", "--plan", "huge"],
            "no plan named \"huge\"",
        ),
        (
            &["app", "create", "x", "--plan", "huge"],
            "no plan named \"huge\"",
        ),
        (
            &["app", "set", "nope", "--rate-limit", "1000pps"],
            "no app named \"nope\"",
        ),
    ];
    for (args, wants) in cases {
        let err = daemon.fails(args);
        assert!(err.contains(wants), "gateway {}: {err}", args.join(" "));
        assert_eq!(settled(&daemon), snapshot, "after {args:?}");
        assert_eq!(rate_limits(&daemon), programmed, "after {args:?}");
    }
    // Through the API: a limit out of range, a limit and a plan together.
    for body in [
        r#"{"rate_limit": {"pps": 0, "burst": 1}}"#,
        r#"{"rate_limit": {"pps": 10, "burst": 101}}"#,
        r#"{"rate_limit": {"pps": 10, "burst": 1}, "plan": "small"}"#,
    ] {
        let (status, answer) = daemon.api("PATCH", "/v1/apps/db", body);
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(rate_limits(&daemon), programmed, "after {body}");
    }
    let usage: &[&[&str]] = &[
        &[
            "app",
            "set",
            "web",
            "--rate-limit",
            "1000",
            "--no-rate-limit",
        ],
        &[
            "app",
            "set",
            "web",
            "--rate-limit",
            "1000",
            "--plan",
            "small",
        ],
        &[
            "app",
            "create",
            "x",
            "--rate-limit",
            "1000",
            "--plan",
            "small",
        ],
    ];
    for args in usage {
        assert!(!daemon.cli(args).status.success(), "{args:?}");
        assert_eq!(settled(&daemon), snapshot, "after {args:?}");
    }

    // A change the state file cannot take is undone in the datapath too.
    let tmp = daemon.dir.path().join("state/state.json.tmp");
    std::fs::create_dir(&tmp).unwrap_or_else(|e| panic!("{}: {e}", tmp.display()));
    let set = daemon.fails(&["app", "set", "web", "--rate-limit", "77pps"]);
    let plan = daemon.fails(&["app", "set", "web", "--no-rate-limit"]);
    std::fs::remove_dir(&tmp).unwrap();
    assert!(
        set.contains("state.json.tmp") && plan.contains("state.json.tmp"),
        "{set}{plan}"
    );
    assert_eq!(settled(&daemon), snapshot);
    assert_eq!(
        rate_limits(&daemon),
        programmed,
        "the datapath was put back"
    );

    // A backend added later gets the limit; one removed leaves none behind.
    // (The id it gets holds drops of before: it starts at none.)
    let path = daemon.dir.path().join("state/state.json");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let next = state["next_backend_id"].as_u64().unwrap() as u32;
    set_rate_drops(&daemon, next, 77, 88);
    daemon.ok(&["backend", "add", "web", &backend(&topo, 0, 8081)]);
    let added = daemon.backend_ids("web")[&backend(&topo, 0, 8081)];
    assert_eq!(added, next);
    let fresh: Vec<gateway::api::BackendView> =
        serde_json::from_str(&daemon.ok(&["backend", "list", "web", "--json"])).unwrap();
    let fresh = fresh
        .iter()
        .find(|b| b.address == backend(&topo, 0, 8081))
        .unwrap();
    assert_eq!(
        (
            fresh.rate_dropped_to_backend,
            fresh.rate_dropped_from_backend
        ),
        (0, 0)
    );
    programmed.extend(limited(&[added], 1000, 100));
    assert_eq!(rate_limits(&daemon), programmed);
    daemon.ok(&[
        "backend",
        "remove",
        "web",
        &backend(&topo, 1, 8080),
        "--now",
    ]);
    let removed = web
        .iter()
        .copied()
        .find(|id| !daemon.backend_ids("web").values().any(|v| v == id))
        .expect("a removed id");
    programmed.remove(&removed);
    assert_eq!(rate_limits(&daemon), programmed);

    // A start programs the limits of the state file over whatever the pinned map holds: a
    // wrong one, a missing one, one of a backend the state does not have.
    daemon.kill9();
    {
        let mut map = daemon.rate_limits();
        use gateway_common::maps::{RateLimit, rate_slot};
        map.set(rate_slot(added, 0), RateLimit::new(7, 7), 0)
            .unwrap();
        map.set(rate_slot(added, 1), RateLimit::default(), 0)
            .unwrap();
        map.set(rate_slot(4000, 1), RateLimit::new(9, 9), 0)
            .unwrap();
    }
    daemon.restart();
    assert_eq!(rate_limits(&daemon), programmed, "{}", daemon.log());

    // Deleting an app zeroes its backends' limits.
    daemon.ok(&["app", "delete", "web"]);
    assert_eq!(rate_limits(&daemon), BTreeMap::new());
    let _ = std::fs::remove_file(&config);
}

/// A backend's packets per second (`backend list`) are measured between two scans of its
/// limited app: an app that gets a limit shows no rate made of everything its backends carried
/// before (their counters since they were added, over one scan interval).
#[test]
fn a_new_limit_shows_no_rate_made_of_the_backends_past_traffic() {
    use gateway_common::maps::{BACKEND_STATS, TrafficStats};
    require_root();
    let topo = Topology::new(1);
    let daemon = Daemon::start(&topo, None, &[]);
    daemon.ok(&["app", "create", "web"]);
    daemon.ok(&["backend", "add", "web", &backend(&topo, 0, 8080)]);
    let id = daemon.backend_ids("web")[&backend(&topo, 0, 8080)];
    // What the backend carried before, as the datapath counts it (on CPU 0).
    {
        let map = aya::maps::MapData::from_pin(daemon.bpffs.join(BACKEND_STATS)).unwrap();
        let mut stats: aya::maps::PerCpuArray<_, TrafficStats> =
            aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(map)).unwrap();
        let mut v = vec![TrafficStats::default(); aya::util::nr_cpus().unwrap()];
        v[0].packets_in = 1_000_000_000;
        v[0].packets_out = 2_000_000_000;
        stats
            .set(id, aya::maps::PerCpuValues::try_from(v).unwrap(), 0)
            .unwrap();
    }
    daemon.ok(&["app", "set", "web", "--rate-limit", "1000pps"]);
    // Scans every 100 ms: a dozen of them.
    let deadline = Instant::now() + Duration::from_millis(1_200);
    while Instant::now() < deadline {
        let backends: Vec<gateway::api::BackendView> =
            serde_json::from_str(&daemon.ok(&["backend", "list", "web", "--json"])).unwrap();
        let b = &backends[0];
        assert!(
            b.pps_to_backend < 1.0 && b.pps_from_backend < 1.0,
            "no traffic since the limit, yet {} / {} packets/s",
            b.pps_to_backend,
            b.pps_from_backend
        );
        thread::sleep(Duration::from_millis(20));
    }
}
