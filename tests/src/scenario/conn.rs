//! The topology's addresses and links as rows name them, and connections through the fixture:
//! their frames both ways and the translations those must get.

use std::net::{Ipv4Addr, SocketAddrV4};

use gateway_common::{maps::FlowKey4, net::socket_from_net};

use gateway_common::maps::CT_ESTABLISHED;

use super::{Ctx, Input, Out, Row};
use crate::{
    datapath::{BACKEND_PORT, Fixture},
    netns::Topology,
    packet::{Frame, flags},
};

/// The client host's address, port `port`.
pub fn client(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Topology::CLIENT_IP, port)
}

/// Backend `i`'s address ([`Topology::backend_ip`]).
pub fn backend_ip(i: usize) -> Ipv4Addr {
    Topology::backend_ip(i)
}

/// Which backend has address `ip` ([`Topology::backend_index`]).
pub fn backend_index(ip: Ipv4Addr) -> usize {
    Topology::backend_index(ip)
}

/// Backend `i`'s service address (its address, [`BACKEND_PORT`]).
pub fn backend(i: usize) -> SocketAddrV4 {
    SocketAddrV4::new(backend_ip(i), BACKEND_PORT)
}

/// A link of the topology: the host's MAC and the gateway's on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Link {
    Client,
    Backend(usize),
}

impl Link {
    /// The host's address.
    pub fn ip(self) -> Ipv4Addr {
        match self {
            Link::Client => Topology::CLIENT_IP,
            Link::Backend(i) => backend_ip(i),
        }
    }

    pub fn host_mac(self) -> [u8; 6] {
        match self {
            Link::Client => Topology::CLIENT_MAC,
            Link::Backend(i) => Topology::backend_mac(i),
        }
    }

    pub fn gw_mac(self) -> [u8; 6] {
        match self {
            Link::Client => Topology::CLIENT_GW_MAC,
            Link::Backend(i) => Topology::backend_gw_mac(i),
        }
    }

    /// The (source, destination) MACs of a frame the host sends to the gateway.
    pub fn in_macs(self) -> ([u8; 6], [u8; 6]) {
        (self.host_mac(), self.gw_mac())
    }

    /// The (source, destination) MACs of a frame the gateway sends to the host.
    pub fn out_macs(self) -> ([u8; 6], [u8; 6]) {
        (self.gw_mac(), self.host_mac())
    }

    /// A TCP segment the host sends to the gateway.
    pub fn tcp(self, src: SocketAddrV4, dst: SocketAddrV4, tcp_flags: u8) -> Frame {
        Frame::tcp(src, dst, tcp_flags).macs(self.host_mac(), self.gw_mac())
    }
}

/// A TCP segment from the client host.
pub fn from_client(src: SocketAddrV4, dst: SocketAddrV4, tcp_flags: u8) -> Frame {
    Link::Client.tcp(src, dst, tcp_flags)
}

/// A TCP segment from backend host `i`.
pub fn from_backend(i: usize, src: SocketAddrV4, dst: SocketAddrV4, tcp_flags: u8) -> Frame {
    Link::Backend(i).tcp(src, dst, tcp_flags)
}

/// The client's initial sequence number in the frames of a [`Conn`].
pub const CLIENT_ISN: u32 = 0x1000_0000;
/// The backend's initial sequence number in the frames of a [`Conn`].
pub const BACKEND_ISN: u32 = 0x5000_0000;

/// A connection from a host's port to a service of the gateway: its frames both ways and the
/// translations they must get. Once its SYN has made the flow, the backend and SNAT address
/// are read from the forward conntrack entry.
#[derive(Clone, Copy, Debug)]
pub struct Conn {
    pub client: SocketAddrV4,
    pub service: SocketAddrV4,
    /// Where the client host is (a backend connecting to its own app: hairpin).
    pub link: Link,
}

/// Where a flow goes, from its forward conntrack entry.
#[derive(Clone, Copy, Debug)]
pub struct Rewrite {
    pub snat: SocketAddrV4,
    pub backend: SocketAddrV4,
    pub backend_index: usize,
}

impl Conn {
    /// The rows of this connection's handshake, as well-behaved ends make it: the SYN (a new
    /// flow to the backend Maglev chooses), the SYN-ACK, and the last ACK, checked to
    /// establish the flow.
    pub fn handshake(self) -> Vec<Row> {
        vec![
            Row::redirected("SYN", self.syn(), self.to_maglev_backend()).entries(2),
            Row::redirected(
                "SYN-ACK",
                self.reply(flags::SYN | flags::ACK),
                self.to_client(),
            ),
            Row::redirected("ACK", self.send(flags::ACK), self.to_its_backend())
                .check("established", move |cx| {
                    assert_eq!(cx.state(self.key()) & CT_ESTABLISHED, CT_ESTABLISHED)
                }),
        ]
    }

    /// From the client host's port `port` to app 1's service.
    pub fn new(port: u16) -> Self {
        Self::on(Link::Client, port)
    }

    /// From port `port` of the host on `link` to app 1's service.
    pub fn on(link: Link, port: u16) -> Self {
        Conn {
            client: SocketAddrV4::new(link.ip(), port),
            service: Fixture::service(),
            link,
        }
    }

    /// The same client to another service.
    pub fn to(self, service: SocketAddrV4) -> Self {
        Conn { service, ..self }
    }

    /// The forward entry's key (client → service).
    pub fn key(&self) -> FlowKey4 {
        FlowKey4::from_addrs(self.client, self.service)
    }

    /// The reverse entry's key (backend → SNAT address), from the forward entry.
    pub fn reverse_key(&self, cx: &Ctx) -> FlowKey4 {
        cx.flow(self.key()).peer_key()
    }

    /// The flow's SNAT address and backend, from the forward entry.
    pub fn rewrite(&self, cx: &Ctx) -> Rewrite {
        let f = cx.flow(self.key());
        let backend = socket_from_net(f.nat_dst_ip, f.nat_dst_port);
        Rewrite {
            snat: socket_from_net(f.nat_src_ip, f.nat_src_port),
            backend,
            backend_index: backend_index(*backend.ip()),
        }
    }

    /// The next sequence numbers of the client and of the backend, as each end's TCP has them
    /// when everything sent so far arrived: the conntrack entries' `seq_end` (before the flow,
    /// or before the backend's first segment, what follows [`CLIENT_ISN`] and
    /// [`BACKEND_ISN`]).
    fn next_seqs(&self, cx: &Ctx) -> (u32, u32) {
        let dp = &cx.fx.dp;
        let forward = dp.flow(&self.key()).expect("conntrack lookup");
        let reverse = forward.and_then(|f| dp.flow(&f.peer_key()).expect("conntrack lookup"));
        let client = forward.map_or(CLIENT_ISN.wrapping_add(1), |f| f.seq_end);
        let backend = reverse
            .filter(|r| r.seq_end != 0)
            .map_or(BACKEND_ISN.wrapping_add(1), |r| r.seq_end);
        (client, backend)
    }

    /// A segment from the client, numbered as a well-behaved client numbers it when the row
    /// runs: `seq` its next sequence number, `ack` all the backend has sent.
    pub fn send(&self, tcp_flags: u8) -> Input {
        let c = *self;
        Input::with(move |cx| {
            let (client, backend) = c.next_seqs(cx);
            let mut frame = c.link.tcp(c.client, c.service, tcp_flags);
            frame.seq = client;
            if tcp_flags & flags::ACK != 0 {
                frame.ack = backend;
            }
            frame
        })
    }

    /// The client's SYN (sequence number [`CLIENT_ISN`]).
    pub fn syn(&self) -> Frame {
        let mut frame = self.link.tcp(self.client, self.service, flags::SYN);
        frame.seq = CLIENT_ISN;
        frame
    }

    /// A segment from the flow's backend to its SNAT address, numbered as a well-behaved
    /// backend numbers it when the row runs (a SYN-ACK: [`BACKEND_ISN`]).
    pub fn reply(&self, tcp_flags: u8) -> Input {
        let c = *self;
        Input::with(move |cx| {
            let r = c.rewrite(cx);
            let (client, backend) = c.next_seqs(cx);
            let mut frame = Link::Backend(r.backend_index).tcp(r.backend, r.snat, tcp_flags);
            frame.seq = if tcp_flags & flags::SYN != 0 {
                BACKEND_ISN
            } else {
                backend
            };
            if tcp_flags & flags::ACK != 0 {
                frame.ack = client;
            }
            frame
        })
    }

    /// A SYN's translation: a port of the SNAT range, to the backend userspace's Maglev table
    /// gives the tuple.
    pub fn to_maglev_backend(&self) -> Out {
        let c = *self;
        Out::with(move |cx| {
            let b = cx.maglev(c);
            Out::Nat {
                src: None,
                dst: b.addr,
                macs: Link::Backend(backend_index(*b.addr.ip())).out_macs(),
            }
        })
    }

    /// The translation of the flow's later client segments: its SNAT address, to its backend.
    pub fn to_its_backend(&self) -> Out {
        let c = *self;
        Out::with(move |cx| {
            let r = c.rewrite(cx);
            Out::Nat {
                src: Some(r.snat),
                dst: r.backend,
                macs: Link::Backend(r.backend_index).out_macs(),
            }
        })
    }

    /// The translation of a reply: from the service, to the client.
    pub fn to_client(&self) -> Out {
        Out::Nat {
            src: Some(self.service),
            dst: self.client,
            macs: self.link.out_macs(),
        }
    }
}
