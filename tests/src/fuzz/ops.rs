//! The fuzzer's inputs: concrete operations, replayable on a fresh fixture (the minimiser drops
//! some and plays the rest). A segment's numbers are fixed when it is generated; only what the
//! datapath chose at random is resolved when it is played: a backend's segment goes to the SNAT
//! address and port of its connection's flow (as the model holds it).

use std::{fmt, net::SocketAddrV4};

use gateway_common::maps::FlowKey4;

use crate::{datapath::Fixture, model::wire::Segment, scenario::Link};

/// One client tuple: the host (the client, or a backend connecting to its own app: hairpin)
/// and its source port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Client {
    pub link: Link,
    pub port: u16,
}

impl std::hash::Hash for Client {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        match self.link {
            Link::Client => 0usize.hash(h),
            Link::Backend(i) => (i + 1).hash(h),
        }
        self.port.hash(h);
    }
}

impl Client {
    pub fn addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.link.ip(), self.port)
    }

    /// The forward key of this client's flow to the service.
    pub fn key(&self) -> FlowKey4 {
        FlowKey4::from_addrs(self.addr(), Fixture::service())
    }
}

/// One step of a fuzz run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A segment from `client` to the service (addresses and MACs filled in when played).
    Client { client: Client, seg: Segment },
    /// A segment from the backend of `client`'s flow to its SNAT address and port (filled in
    /// when played from the model's forward entry, or the last flow the tuple had).
    Backend { client: Client, seg: Segment },
    /// A frame with its own addresses, from the host on `link`.
    Raw { link: Link, seg: Segment },
    /// Bytes as they are (another ethertype, a runt).
    Bytes(Vec<u8>),
    /// A health change: backend `id` starts or stops accepting new flows.
    Health { id: u32, accepting: bool },
    /// Both entries of `client`'s flow aged by `by_ms` (their `last_seen_ns`, and the next
    /// hop's time too if `nexthop`), in the datapath's table and the model's alike.
    Age {
        client: Client,
        by_ms: u32,
        nexthop: bool,
    },
    /// Both entries of `client`'s flow made as an upgrade carries them over (spec §12).
    Liberal { client: Client },
    /// A conntrack scan's correction of the half-open count (issue 15): app 1's count set on
    /// both sides to what a walk of the table finds, as the daemon's scan sets it.
    Scan,
    /// App 1's cap of half-open flows before SYN cookies set to `max` on both sides (0: the
    /// datapath's default).
    Cap { max: u32 },
    /// All apps' cap of half-open flows together set to `max` on both sides (0: none;
    /// `Datapath::set_half_open_global_max`).
    GlobalCap { max: u32 },
}

impl Op {
    /// The client tuple this step concerns, if one.
    pub fn client(&self) -> Option<Client> {
        match self {
            Op::Client { client, .. }
            | Op::Backend { client, .. }
            | Op::Age { client, .. }
            | Op::Liberal { client } => Some(*client),
            _ => None,
        }
    }

    pub fn is_packet(&self) -> bool {
        matches!(
            self,
            Op::Client { .. } | Op::Backend { .. } | Op::Raw { .. } | Op::Bytes(_)
        )
    }
}

fn flag_names(f: u8) -> String {
    const NAMES: [&str; 8] = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"];
    let v: Vec<&str> = (0..8)
        .filter(|i| f & (1 << i) != 0)
        .map(|i| NAMES[i])
        .collect();
    if v.is_empty() {
        "0".into()
    } else {
        v.join("|")
    }
}

/// A segment as builder calls: only what differs from `Segment::new`.
struct Calls<'a>(&'a Segment);

impl fmt::Display for Calls<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        let d = Segment::new(s.src, s.dst, s.flags);
        write!(
            f,
            ".flags({}).seq({:#x}).ack({:#x})",
            flag_names(s.flags),
            s.seq,
            s.ack
        )?;
        if s.window != d.window {
            write!(f, ".window({})", s.window)?;
        }
        if !s.tcp_options.is_empty() {
            write!(f, ".tcp_options({:?})", s.tcp_options)?;
        }
        if s.payload_len != 0 {
            write!(f, ".payload_len({})", s.payload_len)?;
        }
        if s.ttl != d.ttl {
            write!(f, ".ttl({})", s.ttl)?;
        }
        if !s.ip_options.is_empty() {
            write!(f, ".ip_options({:?})", s.ip_options)?;
        }
        if s.frag != d.frag {
            write!(f, ".frag({:#06x})", s.frag)?;
        }
        if s.proto != d.proto {
            write!(f, ".proto({})", s.proto)?;
        }
        if s.ip_csum_delta != 0 {
            write!(f, ".ip_csum_delta({})", s.ip_csum_delta)?;
        }
        if s.tcp_csum_delta != 0 {
            write!(f, ".tcp_csum_delta({})", s.tcp_csum_delta)?;
        }
        if s.negative_zero {
            write!(f, ".negative_zero()")?;
        }
        if s.trailer != 0 {
            write!(f, ".trailer({})", s.trailer)?;
        }
        if let Some(v) = s.version_ihl {
            write!(f, ".version_ihl({v:#04x})")?;
        }
        if let Some(v) = s.doff {
            write!(f, ".doff({v})")?;
        }
        if let Some(v) = s.total_len {
            write!(f, ".total_len({v})")?;
        }
        if let Some(v) = s.cut {
            write!(f, ".cut({v})")?;
        }
        Ok(())
    }
}

fn show_client(c: &Client) -> String {
    match c.link {
        Link::Client => format!("client :{}", c.port),
        Link::Backend(i) => format!("hairpin b{i} :{}", c.port),
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Client { client, seg } => write!(f, "from {}{}", show_client(client), Calls(seg)),
            Op::Backend { client, seg } => {
                write!(
                    f,
                    "from the backend of {}{}",
                    show_client(client),
                    Calls(seg)
                )
            }
            Op::Raw { link, seg } => {
                write!(f, "raw {:?} {} → {}{}", link, seg.src, seg.dst, Calls(seg))
            }
            Op::Bytes(b) => write!(f, "bytes {}", hex(b)),
            Op::Health { id, accepting } => write!(f, "backend {id} accepting = {accepting}"),
            Op::Age {
                client,
                by_ms,
                nexthop,
            } => write!(
                f,
                "age the flow of {} by {by_ms} ms{}",
                show_client(client),
                if *nexthop { " (and its next hops)" } else { "" }
            ),
            Op::Liberal { client } => {
                write!(
                    f,
                    "carry the flow of {} over (TRACK_LIBERAL)",
                    show_client(client)
                )
            }
            Op::Scan => write!(f, "scan: the half-open count set to the table's"),
            Op::Cap { max } => write!(f, "at most {max} half-open flows per app"),
            Op::GlobalCap { max } => write!(f, "at most {max} half-open flows in all"),
        }
    }
}

/// Bytes as hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
