//! Issue 14, input 1, end to end in both attach modes: a third party's RST or FIN must not
//! end a live connection unless it carries the sequence number the receiver expects.
//!
//! The setup makes the damage visible: the daemon has ONE SNAT port, held by a live, idle
//! connection (client ↔ held backend, both ends in the test's hands). A raw socket on the
//! client's side (and, for the backend's direction, on the backend's side) sends a segment
//! with the connection's 4-tuple; 1.5 s later a second client tries to connect. If the
//! gateway took the segment for the end of the connection, it gives the second client the
//! same SNAT port toward the same backend, the backend answers that SYN with a challenge
//! ACK, the second client's kernel resets it with the expected sequence number, and the
//! live connection is gone. The connection's next sequence numbers are learnt by sniffing
//! its last exchange on the client's link.

use std::{
    net::{SocketAddrV4, TcpStream},
    thread,
    time::{Duration, Instant},
};

use gateway::datapath::AttachMode;
use gateway_tests::{
    hostile::{ONE_SNAT_PORT, PORT_REUSE, Sandbox, assert_reset, blocked_read, web, web4},
    netns::Netns,
    packet::{Frame, flags},
    raw::{self, Sniffer},
    traffic::Pair,
};

/// "2^30 past the next expected sequence number": far outside any window.
const FAR: u32 = 1 << 30;

/// What each side of a connection expects next.
#[derive(Clone, Copy, Debug)]
struct Next {
    /// The client's next sequence number (what the backend has acknowledged).
    client: u32,
    /// The backend's next sequence number (what the client has acknowledged).
    backend: u32,
}

/// Exchanges one message each way on `pair` while `sniffer` watches the client's link, and
/// reads the connection's next sequence numbers off the backend's message: its ack is what
/// the backend expects from the client, its end what the client expects from the backend.
#[track_caller]
fn exchange_and_learn(pair: &mut Pair, sniffer: &Sniffer, round: u32) -> Next {
    sniffer.clear();
    let client = pair.client_addr();
    pair.exchange(round)
        .unwrap_or_else(|e| panic!("exchange {round}: {e}"));
    let seen = sniffer
        .next(Duration::from_secs(2), |s| {
            s.src == web4() && s.dst == client && s.payload_len > 0
        })
        .expect("the backend's message, sniffed on the client's link");
    Next {
        client: seen.ack,
        backend: seen.end(),
    }
}

/// Sends one TCP segment from `ns` through a raw socket.
fn spoof(ns: &Netns, from: SocketAddrV4, to: SocketAddrV4, tcp_flags: u8, seq: u32, ack: u32) {
    let segment = Frame {
        seq,
        ack,
        ..Frame::tcp(from, to, tcp_flags)
    };
    raw::send_ipv4(ns, vec![raw::ipv4(&segment)]);
}

/// A second client's connect, given 2 s: it must not get the live connection's SNAT port.
fn intruder(sb: &Sandbox) -> std::io::Result<TcpStream> {
    let to = web();
    sb.topo
        .client
        .run(move || TcpStream::connect_timeout(&to, Duration::from_secs(2)))
}

/// After a spoofed segment that must change nothing: the live connection still carries data
/// both ways, the second client could not connect, and `gateway flows` still shows the
/// connection established.
#[track_caller]
fn assert_survives(sb: &Sandbox, pair: &mut Pair, what: &str) {
    thread::sleep(PORT_REUSE);
    let second = intruder(sb);
    pair.exchange(100).unwrap_or_else(|e| {
        panic!(
            "{}: the live connection died after {what}: {e}\n{}",
            sb.mode,
            sb.daemon.log()
        )
    });
    assert!(
        second.is_err(),
        "{}: a second client connected with the one SNAT port after {what}",
        sb.mode
    );
    assert_eq!(
        sb.flow_state(pair.client_addr()).as_deref(),
        Some("established"),
        "{}: the connection's flow after {what}",
        sb.mode
    );
}

fn spoofed_rst(mode: AttachMode) {
    let sb = Sandbox::held(mode, &ONE_SNAT_PORT);
    let client_ns = &sb.topo.client;
    let sniffer = Sniffer::open(client_ns, client_ns.iface);

    // Control (passes today): an RST with exactly the expected sequence number ends the
    // connection, as it would without a gateway.
    let mut first = sb.pair(Duration::from_secs(3));
    let next = exchange_and_learn(&mut first, &sniffer, 1);
    let reading = blocked_read(&first.backend, Duration::from_secs(3));
    let sent = Instant::now();
    spoof(
        client_ns,
        first.client_addr(),
        web4(),
        flags::RST,
        next.client,
        0,
    );
    let end = reading.join().expect("reader thread");
    assert_reset(
        &format!("{mode}: the backend after the exact RST"),
        &end,
        sent + Duration::from_secs(1),
    );

    // Once the reset connection's SNAT port is free again, a new live connection takes it.
    thread::sleep(PORT_REUSE);
    let mut live = sb.pair(Duration::from_secs(3));
    let next = exchange_and_learn(&mut live, &sniffer, 2);
    let before = sb.daemon.drops("out_of_window");
    spoof(
        client_ns,
        live.client_addr(),
        web4(),
        flags::RST,
        next.client.wrapping_add(FAR),
        0,
    );
    assert_survives(&sb, &mut live, "an RST 2^30 past the window");
    sb.expect_drops("out_of_window", before, 1);
}

#[test]
fn a_spoofed_rst_outside_the_window_leaves_the_connection_alive_xdp() {
    spoofed_rst(AttachMode::Xdp);
}

#[test]
fn a_spoofed_rst_outside_the_window_leaves_the_connection_alive_tc() {
    spoofed_rst(AttachMode::Tc);
}

fn in_window_rst(mode: AttachMode) {
    let sb = Sandbox::held(mode, &ONE_SNAT_PORT);
    let client_ns = &sb.topo.client;
    let sniffer = Sniffer::open(client_ns, client_ns.iface);
    let mut live = sb.pair(Duration::from_secs(3));
    let next = exchange_and_learn(&mut live, &sniffer, 1);
    let client = live.client_addr();
    let before = sb.counter("rst_in_window");

    // In the window but not exact: forwarded, and the backend answers with a challenge ACK
    // (RFC 5961 3.2) that acknowledges what it really expects.
    sniffer.clear();
    spoof(
        client_ns,
        client,
        web4(),
        flags::RST | flags::ACK,
        next.client.wrapping_add(1000),
        next.backend,
    );
    let challenge = sniffer.next(Duration::from_secs(1), |s| {
        s.src == web4() && s.dst == client && s.flags & flags::RST == 0 && s.payload_len == 0
    });
    let challenge = challenge.unwrap_or_else(|| {
        panic!("{mode}: no challenge ACK reached the client: the RST was not forwarded")
    });
    assert_eq!(
        (challenge.flags & flags::ACK, challenge.ack, challenge.seq),
        (flags::ACK, next.client, next.backend),
        "{mode}: the backend's challenge ACK"
    );
    assert_survives(&sb, &mut live, "an in-window, inexact RST+ACK");
    sb.expect_counted("rst_in_window", before, 1);
}

#[test]
fn an_in_window_inexact_rst_is_forwarded_without_closing_xdp() {
    in_window_rst(AttachMode::Xdp);
}

#[test]
fn an_in_window_inexact_rst_is_forwarded_without_closing_tc() {
    in_window_rst(AttachMode::Tc);
}

/// A FIN 2^30 outside the window each way is dropped (`out_of_window`) and the connection
/// lives on. 2^30 is beyond the widest window a receiver can advertise, so what this covers
/// end to end is the bounds every segment must meet, whatever its flags; not the FIN's own
/// check against the window the receiver did advertise (a FIN within those bounds but outside
/// that window), which `datapath_conntrack`'s `fins_outside_the_window` covers at the
/// window's edges.
fn far_fin(mode: AttachMode) {
    let sb = Sandbox::held(mode, &ONE_SNAT_PORT);
    let client_ns = &sb.topo.client;
    let sniffer = Sniffer::open(client_ns, client_ns.iface);
    let mut live = sb.pair(Duration::from_secs(3));
    let next = exchange_and_learn(&mut live, &sniffer, 1);
    let before = sb.daemon.drops("out_of_window");

    // A FIN 2^30 outside the window each way: from the client's side with the client's
    // tuple, and from the backend's host with the backend's.
    spoof(
        client_ns,
        live.client_addr(),
        web4(),
        flags::FIN | flags::ACK,
        next.client.wrapping_add(FAR),
        next.backend,
    );
    let backend = SocketAddrV4::new(sb.topo.backends[0].ip, gateway_tests::hostile::PORT);
    spoof(
        &sb.topo.backends[0],
        backend,
        live.snat_addr(),
        flags::FIN | flags::ACK,
        next.backend.wrapping_add(FAR),
        next.client,
    );
    assert_survives(&sb, &mut live, "a FIN 2^30 outside the window each way");
    sb.expect_drops("out_of_window", before, 2);
}

#[test]
fn a_fin_outside_the_window_changes_nothing_xdp() {
    far_fin(AttachMode::Xdp);
}

#[test]
fn a_fin_outside_the_window_changes_nothing_tc() {
    far_fin(AttachMode::Tc);
}
