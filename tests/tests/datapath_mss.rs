//! The per-app MSS clamp (issue 16: `gateway app create --mss`), through BPF_PROG_TEST_RUN in
//! both attach modes, as scenarios (see `gateway_tests::scenario`): an app's SYNs and SYN-ACKs
//! whose MSS option is above the clamp leave with the clamp, their TCP checksum right (verified
//! from scratch by `Out::Nat`), wherever the option sits; a lower option, a segment without
//! one, and the segments of an app without a clamp are left as they are.

use gateway_common::{GlobalStat, maps::AppConfig};
use gateway_tests::{
    packet::{Frame, flags, mss_of, mss_option, wscale_option},
    scenario::{Conn, Ctx, Input, Row, Scenario, app_config},
    scenario_tests,
};

scenario_tests! {
    syns_and_syn_acks_above_the_clamp_are_lowered,
    what_is_not_above_the_clamp_is_left_as_it_is,
}

/// XDP only: a TC program never sees such a checksum as bytes to complete (see below).
#[test]
fn a_partial_checksum_is_completed_then_clamped_xdp() {
    gateway_tests::scenario::run(
        "a_partial_checksum_is_completed_then_clamped",
        a_partial_checksum_is_completed_then_clamped,
        gateway_tests::scenario::AttachMode::Xdp,
    );
}

/// The clamp of these scenarios: a tunnel's 1400-byte MTU less 40.
const CLAMP: u16 = 1360;

/// App 1 with the MSS clamp `mss` (0: none).
fn clamp(mss: u16) -> impl FnOnce(&mut Ctx) + Send + 'static {
    app_config(AppConfig {
        mss_clamp: mss,
        ..AppConfig::default()
    })
}

/// `c`'s SYN with `options`.
fn syn_with(c: Conn, options: Vec<u8>) -> Frame {
    Frame {
        tcp_options: options,
        ..c.syn()
    }
}

/// The check that the output's MSS option is `mss`.
fn leaves_with(mss: Option<u16>) -> impl FnOnce(&Ctx) + Send + 'static {
    move |cx| assert_eq!(mss_of(&cx.output), mss, "the MSS option out")
}

/// Clamped: the option above the clamp leaves with the clamp, checksums right, counted.
fn clamped(row: Row) -> Row {
    row.counter(GlobalStat::MssClamped, 1..=1)
        .check("MSS clamped", leaves_with(Some(CLAMP)))
}

fn syns_and_syn_acks_above_the_clamp_are_lowered() -> Scenario {
    let (a, b) = (Conn::new(45_001), Conn::new(45_002));
    Scenario::new()
        .set("app 1 clamps the MSS to 1360", clamp(CLAMP))
        .row(clamped(
            Row::redirected(
                "a SYN offering 1460 (Linux's options: MSS first)",
                syn_with(a, wscale_option(7)),
                a.to_maglev_backend(),
            )
            .entries(2),
        ))
        .row(clamped(Row::redirected(
            "the SYN-ACK offering 1460, to the client",
            a.reply(flags::SYN | flags::ACK).map(|mut f| {
                f.tcp_options = wscale_option(7);
                f
            }),
            a.to_client(),
        )))
        .row(clamped(
            Row::redirected(
                "a SYN whose option sits at an odd offset (after a NOP)",
                syn_with(b, [vec![1], mss_option(9000), vec![1, 1, 1]].concat()),
                b.to_maglev_backend(),
            )
            .entries(2),
        ))
        .row(clamped(Row::redirected(
            "a SYN-ACK whose option comes after others",
            b.reply(flags::SYN | flags::ACK).map(|mut f| {
                f.tcp_options = [vec![4, 2, 1, 1], mss_option(1460)].concat();
                f
            }),
            b.to_client(),
        )))
        .row(
            Row::redirected(
                "data after the handshake: not looked at",
                b.send(flags::ACK).map(|f| f.payload(b"data")),
                b.to_its_backend(),
            )
            .counter(GlobalStat::MssClamped, 0..=0),
        )
}

fn what_is_not_above_the_clamp_is_left_as_it_is() -> Scenario {
    let (a, b, c, d) = (
        Conn::new(45_011),
        Conn::new(45_012),
        Conn::new(45_013),
        Conn::new(45_014),
    );
    let unchanged = |row: Row, mss: Option<u16>| {
        row.counter(GlobalStat::MssClamped, 0..=0)
            .check("MSS as it came", leaves_with(mss))
    };
    Scenario::new()
        .set("app 1 clamps the MSS to 1360", clamp(CLAMP))
        .row(clamped(
            Row::redirected(
                "the control: a SYN offering 1460 is clamped",
                syn_with(d, mss_option(1460)),
                d.to_maglev_backend(),
            )
            .entries(2),
        ))
        .row(unchanged(
            Row::redirected(
                "a SYN offering 1200",
                syn_with(a, mss_option(1200)),
                a.to_maglev_backend(),
            )
            .entries(2),
            Some(1200),
        ))
        .row(unchanged(
            Row::redirected(
                "a SYN offering exactly the clamp",
                syn_with(b, mss_option(CLAMP)),
                b.to_maglev_backend(),
            )
            .entries(2),
            Some(CLAMP),
        ))
        .row(unchanged(
            Row::redirected(
                "a SYN without an MSS option (its peer assumes 536)",
                c.syn(),
                c.to_maglev_backend(),
            )
            .entries(2),
            None,
        ))
        .set("app 1 without a clamp", clamp(0))
        .row(unchanged(
            Row::redirected(
                "the SYN-ACK offering 1460 of an app without a clamp",
                a.reply(flags::SYN | flags::ACK).map(|mut f| {
                    f.tcp_options = mss_option(1460);
                    f
                }),
                a.to_client(),
            ),
            Some(1460),
        ))
}

/// XDP sees a SYN from a sender on this host with its checksum partial (tx offload): it is
/// completed, then the clamp's difference applied to the whole checksum. TC leaves a partial
/// checksum to the NIC (the helper ignores the difference for such an skb): its bytes are
/// summed there, the clamp's included.
fn a_partial_checksum_is_completed_then_clamped() -> Scenario {
    let a = Conn::new(45_021);
    Scenario::new()
        .set("app 1 clamps the MSS to 1360", clamp(CLAMP))
        .row(clamped(
            Row::redirected(
                "a SYN offering 1460, its checksum partial",
                Input::from(syn_with(a, wscale_option(7)).partial()),
                a.to_maglev_backend(),
            )
            .entries(2),
        ))
}
