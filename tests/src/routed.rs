//! A [`Topology`] whose client or backend is behind two routers joined by a narrow link (MTU
//! [`NARROW_MTU`]; every other link has 1500), for path MTU discovery through the gateway
//! (issue 16):
//!
//! ```text
//! Narrow::Client:   client ── r1 ══ r2 ── gateway ── backend
//! Narrow::Backend:  client ── gateway ── r1 ══ r2 ── backend
//! ```
//!
//! Why two routers: there is a path MTU to discover only if the narrow link is neither an
//! endpoint's own nor the gateway's. An endpoint on a narrow link of its own advertises an MSS
//! that fits it (1240) and never sends more than its link takes. A gateway on one would
//! redirect full-size frames into a veth whose peer drops them without a word (the datapath
//! generates no ICMP). Between two routers, every host's own link has 1500 (MSS 1460 both
//! ways), and a router is the one to meet a packet too big for the narrow link: it drops it
//! and sends "fragmentation needed" (ICMP type 3 code 4, next-hop MTU 1280) to the packet's
//! source, the only way its sender learns the narrow MTU (`tcp_mtu_probing` is 0 in the
//! endpoints, so nothing else finds it). One router and `advmss` on an endpoint's route would
//! give that endpoint's peer a 1460 MSS too, but the endpoint's own sends would stay within
//! its narrow interface: only one direction would have anything to discover.
//!
//! Each direction meets the narrow link in the router nearer its sender. Packets that come
//! through the gateway meet it in [`Routed::router_near_gateway`], whose errors go to a
//! gateway address (the public one for a backend's reply toward the client, the SNAT one for a
//! client's packet toward the backend): only the gateway's translation brings them to the real
//! sender. The endpoint's own packets meet it in [`Routed::router_near_endpoint`], which
//! answers the endpoint directly: that direction works with or without translation.
//!
//! Addresses of the routed side, from its base `B` (192.0.2.0 for the client, 198.51.100.0
//! for the backend: the endpoints keep [`Topology::CLIENT_IP`] and
//! [`Topology::backend_ip`]`(0)`):
//!
//! | link | near the endpoint ── near the gateway | MTU |
//! |---|---|---|
//! | endpoint `eth0` ── router near it | B+2/30 ── B+1/30 | 1500 |
//! | router near the endpoint ══ router near the gateway | B+5/30 ══ B+6/30 | 1280 |
//! | router near the gateway `gw` ── gateway (`client0` or `b0`) | B+10/30 ── B+9/30 | 1500 |
//!
//! Routes: the endpoint's default via B+1; the router near it, default via B+6; the router
//! near the gateway, B/30 via B+5 and default via B+9; the gateway, B/29 via B+10. The other
//! side is [`Topology::new`]'s link (the client 192.0.2.2/24 via 192.0.2.1, or the backend
//! 198.51.100.2/30 via 198.51.100.1). Forwarding is on in the routers and the gateway; every
//! neighbour entry is permanent; there is no route out of the namespaces.

use std::net::Ipv4Addr;

use crate::netns::{Bpffs, Host, Netns, Topology, link, mac_str, sweep_stale, unique_prefix};

/// The narrow link's MTU (IPv6's minimum: a common tunnel's).
pub const NARROW_MTU: u32 = 1280;
/// Every other link's MTU.
pub const MTU: u32 = 1500;

/// Which endpoint is behind the routers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Narrow {
    Client,
    Backend,
}

impl std::fmt::Display for Narrow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Narrow::Client => "narrow client side",
            Narrow::Backend => "narrow backend side",
        })
    }
}

/// A one-backend [`Topology`] with one side routed through the narrow link. `topo.client` and
/// `topo.backends[0]` are the endpoints; for the routed one, its `gw_*` fields are the
/// gateway's side of its path (the interface, address and MAC toward the routers), not
/// something on its own link. Fields drop in declaration order: the topology, then the routers.
#[derive(Debug)]
pub struct Routed {
    pub topo: Topology,
    pub narrow: Narrow,
    /// r1 and r2, in the order a packet from the client meets them.
    pub routers: [Netns; 2],
    /// Every veth end: (namespace, device).
    veths: Vec<(String, String)>,
}

/// One end of a veth pair.
struct End<'a> {
    ns: &'a Netns,
    dev: &'a str,
    ip: Ipv4Addr,
    mac: [u8; 6],
}

/// A veth pair from `a` to `b` with MTU `mtu`, addresses in a /`plen`, up, with permanent
/// neighbour entries for each other; both ends, as (namespace, device).
#[track_caller]
fn veth(a: End<'_>, b: End<'_>, plen: u8, mtu: u32) -> [(String, String); 2] {
    // Created directly inside the two namespaces: nothing touches the machine's own.
    a.ns.ip(&format!(
        "link add {} address {} mtu {mtu} type veth peer name {} netns {} address {} mtu {mtu}",
        a.dev,
        mac_str(a.mac),
        b.dev,
        b.ns.name(),
        mac_str(b.mac)
    ));
    for (this, other) in [(&a, &b), (&b, &a)] {
        this.ns
            .ip(&format!("addr add {}/{plen} dev {}", this.ip, this.dev));
        this.ns.ip(&format!("link set {} up", this.dev));
        this.ns.ip(&format!(
            "neigh replace {} lladdr {} dev {} nud permanent",
            other.ip,
            mac_str(other.mac),
            this.dev
        ));
    }
    [a, b].map(|e| (e.ns.name().to_owned(), e.dev.to_owned()))
}

/// `base` plus `n` (within its /24).
fn at(base: Ipv4Addr, n: u8) -> Ipv4Addr {
    let [a, b, c, d] = base.octets();
    Ipv4Addr::new(a, b, c, d + n)
}

/// The routed side of a topology: which endpoint, and the names on its path.
struct Side<'a> {
    base: Ipv4Addr,
    /// The endpoint's address and MAC (its interface is `eth0`).
    ip: Ipv4Addr,
    mac: [u8; 6],
    /// The gateway's interface and MAC toward the routers.
    gw_iface: &'a str,
    gw_mac: [u8; 6],
    /// The near-endpoint router's interface toward the endpoint, and each router's interface
    /// toward the other (named after it).
    to_endpoint: &'a str,
    to_near_gateway: &'a str,
    to_near_endpoint: &'a str,
    /// Third byte of the routers' MACs (the fifth is the link, the sixth the end).
    mac_tag: u8,
}

/// Joins `endpoint` to the gateway through `near_endpoint` ══ `near_gateway` (see the module's
/// table), with the routes; the endpoint as a [`Host`] (its `gw_*` are the gateway's side of
/// the path).
#[track_caller]
fn routed_side(
    gateway: &Netns,
    endpoint: Netns,
    near_endpoint: &Netns,
    near_gateway: &Netns,
    side: &Side<'_>,
    veths: &mut Vec<(String, String)>,
) -> Host {
    let b = side.base;
    let router_mac = |link: u8, end: u8| [0x02, 0, side.mac_tag, 0, link, end];
    let end = |ns, dev, ip, mac| End { ns, dev, ip, mac };
    veths.extend(veth(
        end(&endpoint, "eth0", side.ip, side.mac),
        end(near_endpoint, side.to_endpoint, at(b, 1), router_mac(0, 1)),
        30,
        MTU,
    ));
    veths.extend(veth(
        end(
            near_endpoint,
            side.to_near_gateway,
            at(b, 5),
            router_mac(1, 1),
        ),
        end(
            near_gateway,
            side.to_near_endpoint,
            at(b, 6),
            router_mac(1, 2),
        ),
        30,
        NARROW_MTU,
    ));
    veths.extend(veth(
        end(near_gateway, "gw", at(b, 10), router_mac(2, 2)),
        end(gateway, side.gw_iface, at(b, 9), side.gw_mac),
        30,
        MTU,
    ));
    endpoint.ip(&format!("route add default via {}", at(b, 1)));
    near_endpoint.ip(&format!("route add default via {}", at(b, 6)));
    near_gateway.ip(&format!("route add {b}/30 via {}", at(b, 5)));
    near_gateway.ip(&format!("route add default via {}", at(b, 9)));
    gateway.ip(&format!("route add {b}/29 via {}", at(b, 10)));
    Host {
        ns: endpoint,
        iface: "eth0",
        ip: side.ip,
        mac: side.mac,
        gw_iface: side.gw_iface.to_owned(),
        gw_ip: at(b, 9),
        gw_mac: side.gw_mac,
    }
}

impl Routed {
    /// Builds the topology with the `narrow` side behind the routers.
    #[track_caller]
    pub fn new(narrow: Narrow) -> Self {
        sweep_stale();
        let prefix = unique_prefix();
        // Created first so that a failure below tears it down too.
        let bpffs = Bpffs::new(&prefix);
        let gateway = Netns::new(&format!("{prefix}-gw"));
        let client = Netns::new(&format!("{prefix}-client"));
        let backend = Netns::new(&format!("{prefix}-b0"));
        let routers = [1, 2].map(|i| Netns::new(&format!("{prefix}-r{i}")));
        let mut veths = Vec::new();
        let mut direct = |ns, gw_iface: &str, (gw_ip, plen), ip, gw_mac, mac| {
            let host = link(&gateway, ns, gw_iface, (gw_ip, plen), ip, gw_mac, mac);
            [(host.name(), host.iface), (gateway.name(), gw_iface)]
                .map(|(ns, dev)| (ns.to_owned(), dev.to_owned()))
                .into_iter()
                .for_each(|e| veths.push(e));
            host
        };
        let (client, backend) = match narrow {
            Narrow::Client => {
                let backend = direct(
                    backend,
                    "b0",
                    (Topology::backend_gw_ip(0), 30),
                    Topology::backend_ip(0),
                    Topology::backend_gw_mac(0),
                    Topology::backend_mac(0),
                );
                let side = Side {
                    base: Ipv4Addr::new(192, 0, 2, 0),
                    ip: Topology::CLIENT_IP,
                    mac: Topology::CLIENT_MAC,
                    gw_iface: "client0",
                    gw_mac: Topology::CLIENT_GW_MAC,
                    to_endpoint: "client",
                    to_near_gateway: "r2",
                    to_near_endpoint: "r1",
                    mac_tag: 1,
                };
                let [r1, r2] = &routers;
                let client = routed_side(&gateway, client, r1, r2, &side, &mut veths);
                (client, backend)
            }
            Narrow::Backend => {
                let client = direct(
                    client,
                    "client0",
                    (Topology::CLIENT_GW_IP, 24),
                    Topology::CLIENT_IP,
                    Topology::CLIENT_GW_MAC,
                    Topology::CLIENT_MAC,
                );
                let side = Side {
                    base: Ipv4Addr::new(198, 51, 100, 0),
                    ip: Topology::backend_ip(0),
                    mac: Topology::backend_mac(0),
                    gw_iface: "b0",
                    gw_mac: Topology::backend_gw_mac(0),
                    to_endpoint: "b0",
                    to_near_gateway: "r1",
                    to_near_endpoint: "r2",
                    mac_tag: 2,
                };
                let [r1, r2] = &routers;
                let backend = routed_side(&gateway, backend, r2, r1, &side, &mut veths);
                (client, backend)
            }
        };
        gateway.ip(&format!("addr add {}/32 dev lo", Topology::PUBLIC_IP));
        gateway.ip(&format!("addr add {}/32 dev lo", Topology::SNAT_IP));
        for ns in std::iter::once(&gateway).chain(&routers) {
            ns.sysctl("net.ipv4.ip_forward", "1");
        }
        // As a new namespace has them, said: path MTU discovery on (DF set), and no probing
        // that would find the narrow MTU without any ICMP.
        for host in [&client, &backend] {
            host.sysctl("net.ipv4.ip_no_pmtu_disc", "0");
            host.sysctl("net.ipv4.tcp_mtu_probing", "0");
        }
        Routed {
            topo: Topology {
                bpffs,
                client,
                backends: vec![backend],
                gateway,
            },
            narrow,
            routers,
            veths,
        }
    }

    /// The router next to the gateway: it meets the packets that came through the gateway,
    /// and sends its errors about them to a gateway address.
    pub fn router_near_gateway(&self) -> &Netns {
        match self.narrow {
            Narrow::Client => &self.routers[1],
            Narrow::Backend => &self.routers[0],
        }
    }

    /// The router next to the routed endpoint: it answers that endpoint's packets directly.
    pub fn router_near_endpoint(&self) -> &Netns {
        match self.narrow {
            Narrow::Client => &self.routers[0],
            Narrow::Backend => &self.routers[1],
        }
    }

    /// Native XDP redirect's needs on every link ([`Topology::xdp_offloads`]): tx checksum
    /// offload off on every sender, GRO on (NAPI) on every receiver, the routers' included
    /// (the gateway redirects into the link toward a router).
    #[track_caller]
    pub fn xdp_offloads(&self) {
        for (ns, dev) in &self.veths {
            crate::netns::cmd(
                "ip",
                [
                    "netns", "exec", ns, "ethtool", "-K", dev, "tx", "off", "gro", "on",
                ],
            );
        }
    }

    /// Every namespace name of this topology.
    pub fn netns_names(&self) -> Vec<String> {
        let mut names = self.topo.netns_names();
        names.extend(self.routers.iter().map(|r| r.name().to_owned()));
        names
    }
}

/// ICMP destination-unreachable errors the namespace's kernel has sent (`OutDestUnreachs` of
/// its `/proc/net/snmp`).
#[track_caller]
pub fn dest_unreachs_sent(ns: &Netns) -> u64 {
    let snmp = ns.exec_ok(&["cat", "/proc/net/snmp"]);
    let mut icmp = snmp.lines().filter(|l| l.starts_with("Icmp: "));
    let (names, values) = (icmp.next(), icmp.next());
    let (Some(names), Some(values)) = (names, values) else {
        panic!("no Icmp lines in {}'s /proc/net/snmp:\n{snmp}", ns.name());
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "OutDestUnreachs")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no OutDestUnreachs in {}:\n{snmp}", ns.name()))
}

/// The path MTU the namespace's kernel has learnt toward `dst` (the `mtu` of the route
/// exception `ip route get` shows), if any.
#[track_caller]
pub fn learnt_mtu(ns: &Netns, dst: Ipv4Addr) -> Option<u32> {
    let route = ns.ip(&format!("route get {dst}"));
    let mut words = route.split_whitespace();
    words.find(|w| *w == "mtu")?;
    words.next().and_then(|m| m.parse().ok())
}
