//! Issue 14, input 5, end to end in both attach modes: when the gateway has no flow for a
//! connection, or ends one itself, both ends learn it at once from an RST (ECONNRESET on their
//! next read or write) instead of retransmitting into silence.
//!
//! Each connection here has both ends in the test's hands: the client's socket and the held
//! backend's (an `Acceptor`).

use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use gateway::datapath::AttachMode;
use gateway_common::maps::{self, Flow, FlowKey4};
use gateway_tests::{
    daemon::Daemon,
    hostile::{LIFETIME, PORT, Sandbox, assert_reset, assert_write_reset, blocked_read, web, web4},
    netns::Topology,
    packet::{Frame, flags},
    raw::{self, Sniffer},
    traffic::{Acceptor, Pair},
};

/// How soon an end must see the RST.
const WITHIN: Duration = Duration::from_secs(1);

/// Deletes the conntrack pair of the connection from `client` (forward entry and its peer)
/// from the daemon's pinned table, as a lost state would.
#[track_caller]
fn forget(sb: &Sandbox, client: SocketAddrV4) {
    let pin = sb.daemon.bpffs.join(maps::CONNTRACK4);
    let map = MapData::from_pin(&pin).unwrap_or_else(|e| panic!("{}: {e}", pin.display()));
    let mut ct: HashMap<_, FlowKey4, Flow> =
        HashMap::try_from(Map::HashMap(map)).expect("the conntrack table's layout");
    let key = FlowKey4::from_addrs(client, web4());
    let forward = ct
        .get(&key, 0)
        .unwrap_or_else(|e| panic!("the forward entry of {client}: {e}"));
    ct.remove(&key).expect("remove the forward entry");
    ct.remove(&forward.peer_key())
        .expect("remove the reverse entry");
}

fn lost_flow(mode: AttachMode) {
    let sb = Sandbox::held(mode, &[]);
    let client_ns = &sb.topo.client;
    let sniffer = Sniffer::open(client_ns, client_ns.iface);
    let answered = sb.counter("rst_no_flow");

    // A stray ACK to the service: answered as a host without that socket answers (RFC 793),
    // with an RST whose sequence number is the ACK's acknowledgement number.
    let stray = SocketAddrV4::new(gateway_tests::netns::Topology::CLIENT_IP, 43000);
    let ack = Frame {
        seq: 0x0102_0304,
        ack: 0x0a0b_0c0d,
        ..Frame::tcp(stray, web4(), flags::ACK)
    };
    sniffer.clear();
    raw::send_ipv4(client_ns, vec![raw::ipv4(&ack)]);
    let rst = sniffer
        .next(WITHIN, |s| s.src == web4() && s.dst == stray)
        .unwrap_or_else(|| panic!("{mode}: no answer to a stray ACK within {WITHIN:?}"));
    assert_eq!(
        (rst.flags, rst.seq, rst.ack, rst.window, rst.payload_len),
        (flags::RST, 0x0a0b_0c0d, 0, 0, 0),
        "{mode}: the RST for a stray ACK: {rst:?}"
    );
    assert_eq!((rst.ttl, rst.frame_len), (64, 54), "{mode}: {rst:?}");

    // A live connection whose conntrack pair is lost: the next segment of each end gets an
    // RST it accepts.
    let mut pair = sb.pair(Duration::from_secs(3));
    pair.exchange(1).unwrap();
    forget(&sb, pair.client_addr());
    assert_write_reset(
        &format!("{mode}: the client after its flow was lost"),
        &pair.client,
        WITHIN,
    );
    assert_write_reset(
        &format!("{mode}: the backend after its flow was lost"),
        &pair.backend,
        WITHIN,
    );
    sb.expect_counted("rst_no_flow", answered, 3);
}

#[test]
fn segments_without_a_flow_are_answered_with_an_rst_xdp() {
    lost_flow(AttachMode::Xdp);
}

#[test]
fn segments_without_a_flow_are_answered_with_an_rst_tc() {
    lost_flow(AttachMode::Tc);
}

/// Opens a connection, blocks both of its ends in `read()`, runs `end` (which makes the
/// gateway end the connection) and checks both reads end in ECONNRESET no later than
/// `deadline` after `end` returned (and, for a drain, not before `not_before` after it began).
#[track_caller]
fn assert_both_reset(
    sb: &Sandbox,
    what: &str,
    end: impl FnOnce(),
    not_before: Duration,
    deadline: Duration,
) {
    let mode = sb.mode;
    let mut pair: Pair = sb.pair(Duration::from_secs(3));
    pair.exchange(1).unwrap();
    let limit = not_before + deadline + Duration::from_secs(2);
    let client = blocked_read(&pair.client, limit);
    let backend = blocked_read(&pair.backend, limit);
    std::thread::sleep(Duration::from_millis(200));
    let began = Instant::now();
    end();
    let returned = Instant::now();
    for (side, reader) in [("client", client), ("backend", backend)] {
        let ended = reader.join().expect("reader thread");
        assert_reset(
            &format!("{mode}: the {side} after {what}"),
            &ended,
            returned + deadline,
        );
        let after = ended.1.duration_since(began);
        assert!(
            after >= not_before,
            "{mode}: the {side} was reset {after:?} after {what}, before {not_before:?}"
        );
    }
}

/// Waits up to 2 s until the daemon's metrics count `n` RSTs sent to the ends of the
/// connections it ended (`gateway_conntrack_resets_sent_total`), then panics unless they count
/// exactly that many, and no failure (`gateway_conntrack_reset_failures_total`).
#[track_caller]
fn assert_resets_sent(sb: &Sandbox, what: &str, n: u32) {
    let read = || {
        let s = sb.daemon.scrape();
        (
            s.value("gateway_conntrack_resets_sent_total", &[]),
            s.value("gateway_conntrack_reset_failures_total", &[]),
        )
    };
    let want = (f64::from(n), 0.0);
    let _ = gateway_tests::wait_for(Duration::from_secs(2), || read().0 >= want.0);
    assert_eq!(
        read(),
        want,
        "{}: (resets sent, reset failures) after {what}",
        sb.mode
    );
}

fn remove_now(mode: AttachMode) {
    let sb = Sandbox::held(mode, &[]);
    let b0 = sb.backend(0);
    assert_resets_sent(&sb, "nothing", 0);
    assert_both_reset(
        &sb,
        "`backend remove --now`",
        || {
            sb.daemon.ok(&["backend", "remove", "web", &b0, "--now"]);
        },
        Duration::ZERO,
        WITHIN,
    );
    // One RST to each end of the one connection.
    assert_resets_sent(&sb, "`backend remove --now`", 2);
}

#[test]
fn removing_a_backend_now_resets_both_ends_xdp() {
    remove_now(AttachMode::Xdp);
}

#[test]
fn removing_a_backend_now_resets_both_ends_tc() {
    remove_now(AttachMode::Tc);
}

fn app_delete(mode: AttachMode) {
    let sb = Sandbox::held(mode, &[]);
    assert_resets_sent(&sb, "nothing", 0);
    assert_both_reset(
        &sb,
        "`app delete`",
        || {
            sb.daemon.ok(&["app", "delete", "web"]);
        },
        Duration::ZERO,
        WITHIN,
    );
    assert_resets_sent(&sb, "`app delete`", 2);
}

#[test]
fn deleting_an_app_resets_both_ends_xdp() {
    app_delete(AttachMode::Xdp);
}

#[test]
fn deleting_an_app_resets_both_ends_tc() {
    app_delete(AttachMode::Tc);
}

fn drain_deadline(mode: AttachMode) {
    let sb = Sandbox::held(mode, &[]);
    let b0 = sb.backend(0);
    let drain = Duration::from_secs(1);
    assert_both_reset(
        &sb,
        "a drain deadline of 1 s",
        || {
            sb.daemon
                .ok(&["backend", "remove", "web", &b0, "--drain-timeout", "1s"]);
        },
        drain - Duration::from_millis(100),
        drain + WITHIN,
    );
    // The ends see their RSTs before the daemon logs that it sent them.
    let logged = gateway_tests::wait_for(Duration::from_secs(5), || {
        sb.daemon.log().contains("drain timeout")
    });
    assert!(logged.is_some(), "{}", sb.daemon.log());
    assert_resets_sent(&sb, "a drain deadline", 2);
}

#[test]
fn a_drain_deadline_resets_both_ends_xdp() {
    drain_deadline(AttachMode::Xdp);
}

#[test]
fn a_drain_deadline_resets_both_ends_tc() {
    drain_deadline(AttachMode::Tc);
}

/// An `app delete` that cannot be saved changes nothing: the app stays and its connections go
/// on, neither end reset (their RSTs go only once the change is committed).
#[test]
fn a_delete_that_cannot_be_saved_leaves_the_connections_alone() {
    let sb = Sandbox::held(AttachMode::Tc, &[]);
    let mut pair = sb.pair(Duration::from_secs(3));
    pair.exchange(1).unwrap();
    // The state file cannot be written: a directory stands where its temporary file goes.
    let tmp = sb.daemon.dir.path().join("state/state.json.tmp");
    std::fs::create_dir(&tmp).unwrap_or_else(|e| panic!("{}: {e}", tmp.display()));
    let refused = sb.daemon.fails(&["app", "delete", "web"]);
    std::fs::remove_dir(&tmp).unwrap();
    assert!(refused.contains("state.json.tmp"), "{refused}");
    sb.daemon.ok(&["app", "show", "web"]);
    pair.exchange(2)
        .unwrap_or_else(|e| panic!("the connection after a refused `app delete`: {e}"));
}

/// `backend remove --now` answers with the connections it ended, not those of the last
/// conntrack scan (here none: the daemon scans once an hour, first an hour after it starts).
#[test]
fn removing_a_backend_now_counts_the_connections_it_ended() {
    gateway_tests::require_root();
    let topo = Topology::new(1);
    let b = &topo.backends[0];
    let acceptor = Acceptor::start(
        b,
        SocketAddrV4::new(b.ip, PORT),
        Topology::SNAT_IP,
        LIFETIME,
    );
    let args = Daemon::args(&topo, Some(AttachMode::Tc), &[]);
    let mut args = Daemon::without(args, &["--scan-interval"]);
    args.extend(["--scan-interval".into(), "1h".into()]);
    let daemon = Daemon::start_with_args(&topo, args);
    let backend = SocketAddrV4::new(b.ip, PORT).to_string();
    daemon.app_with_backends("web", std::slice::from_ref(&backend));
    let mut pairs: Vec<Pair> = (0..2)
        .map(|_| Pair::open(&topo.client, web(), &acceptor, Duration::from_secs(3)).unwrap())
        .collect();
    for (round, pair) in (1..).zip(&mut pairs) {
        pair.exchange(round).unwrap();
    }
    let out = daemon.ok(&["backend", "remove", "web", &backend, "--now"]);
    assert!(out.contains("its 2 connections were ended"), "{out}");
}
