//! Counters: one list of global counters and one list of drop reasons, shared by the datapath
//! (which increments them) and userspace (which names them in metrics and logs), and the
//! traffic counters per app and per backend.

macro_rules! indexed_names {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $label:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u32)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every value, in index order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];
            /// How many values there are.
            pub const COUNT: u32 = Self::ALL.len() as u32;

            /// The stable, lower-case label used in metrics and logs.
            pub const fn label(self) -> &'static str {
                match self {
                    $($name::$variant => $label,)+
                }
            }

            /// The index of this value.
            pub const fn index(self) -> u32 {
                self as u32
            }
        }
    };
}
pub(crate) use indexed_names;

indexed_names! {
    /// Global per-CPU counters (slots `0..GlobalStat::COUNT` of `GLOBAL_STATS`).
    GlobalStat {
        /// Packets the XDP program saw.
        XdpPackets = "xdp_packets",
        /// Packets the TC program saw.
        TcPackets = "tc_packets",
        /// Packets handed to the kernel unchanged (not for the gateway).
        Passed = "passed",
        /// Packets translated client → backend.
        Forwarded = "forwarded",
        /// Packets translated backend → client.
        Reversed = "reversed",
        /// Flows created (SYNs that got a backend and an SNAT port).
        FlowsCreated = "flows_created",
        /// SNAT port probes that hit a port in use (and were retried).
        SnatCollisions = "snat_collisions",
        /// Next-hop lookups (`bpf_fib_lookup`) done.
        FibLookups = "fib_lookups",
        /// Packets handed to the kernel to resolve a missing neighbour (XDP fallback) or
        /// redirected with `bpf_redirect_neigh` (TC).
        NeighFallbacks = "neigh_fallbacks",
        /// SNAT ports taken over from closed connections (idle 1 s or more).
        SnatReused = "snat_reused",
        /// RSTs the datapath sent for segments without a flow (a client or backend still
        /// talking on a connection the gateway no longer has), as a host without the socket.
        RstNoFlow = "rst_no_flow",
        /// RSTs inside the receiver's window but not at its exact next sequence number:
        /// forwarded (the receiver answers with a challenge ACK, RFC 5961 §3.2), the flow kept.
        RstInWindow = "rst_in_window",
        /// SYNs of a handshake that had not completed, balanced afresh (the old pair removed):
        /// their backend stopped accepting, or the client started over with a new ISN.
        SynRebalanced = "syn_rebalanced",
        /// SYNs answered with a SYN cookie, no state kept: their app had its cap of half-open
        /// flows (`Config::half_open_max`).
        SynCookiesSent = "syn_cookies_sent",
        /// ACKs without a flow that carried a valid SYN cookie: each made a proxied flow (the
        /// ACK became the SYN to the backend).
        SynCookiesAccepted = "syn_cookies_accepted",
        /// Proxied flows whose backend answered the gateway's SYN: its SYN-ACK was answered
        /// with the handshake's ACK, and the flow is established.
        SynProxyEstablished = "syn_proxy_established",
        /// Packets of a flow whose cached next hop had aged, sent through the kernel's
        /// neighbour output (`bpf_redirect_neigh`) so that the kernel revalidates the neighbour
        /// as it does for a forwarded packet: a STALE entry is probed, and one whose host moved
        /// to another MAC fails and is resolved afresh. At most one per destination, CPU and
        /// next-hop age while its flows go on; counted by the TC program (in XDP mode the XDP
        /// program hands such a packet to it untouched).
        NeighRevalidations = "neigh_revalidations",
        /// TCP segments that reached the XDP program with only the pseudo-header's sum in their
        /// checksum field (CHECKSUM_PARTIAL, left by a sender on this host with tx checksum
        /// offload on, such as a veth peer): their checksum was computed in full before they
        /// were translated (or, longer than the datapath computes, they were handed to the
        /// kernel, whose TC program translates them). A sender to fix: `ethtool -K <dev> tx
        /// off`, or attach in TC mode.
        PartialChecksums = "partial_checksums",
        /// ICMP "fragmentation needed" errors (destination unreachable, code 4: path MTU
        /// discovery, RFC 1191) about a flow's packet, translated and sent to the flow's other
        /// end (see `docs/datapath.md`, "ICMP errors").
        IcmpFragNeeded = "icmp_frag_needed",
        /// Other ICMP destination-unreachable errors (port, host, network unreachable,
        /// administratively prohibited...) about a flow's packet, translated.
        IcmpUnreachable = "icmp_unreachable",
        /// ICMP time-exceeded errors about a flow's packet, translated.
        IcmpTimeExceeded = "icmp_time_exceeded",
        /// ICMP parameter-problem errors about a flow's packet, translated.
        IcmpParamProblem = "icmp_param_problem",
        /// ICMP errors to a gateway address quoting a TCP packet of no flow: handed to the
        /// kernel unchanged (also counted `passed`).
        IcmpNoFlow = "icmp_no_flow",
        /// SYNs and SYN-ACKs whose MSS option was lowered to their app's MSS clamp.
        MssClamped = "mss_clamped",
        /// Client segments to a backend that got a TOA option with the client's address (an
        /// app with `--client-address toa`, until its backend has seen it).
        ToaAdded = "toa_added",
        /// TOA options a client sent itself, removed (overwritten with NOPs) before its segment
        /// reached a backend: a client never chooses the address an app is told.
        ToaStripped = "toa_stripped",
        /// Client segments that should have got a TOA option but went on without it: no room
        /// left in their TCP header (40 bytes of options), larger than the egress MTU with it,
        /// or (TC) a GSO packet. The backend learns the address from a later segment, if one
        /// comes before its connection is established.
        ToaSkipped = "toa_skipped",
    }
}

indexed_names! {
    /// Why the datapath dropped a packet (slots `GlobalStat::COUNT + reason` of `GLOBAL_STATS`).
    DropReason {
        /// An Ethernet, IPv4 or TCP header ended before its declared length.
        Truncated = "truncated",
        /// An IPv4 header with a bad version, `ihl` < 5 or a total length that does not fit.
        BadHeader = "bad_header",
        /// A non-SYN TCP packet for a gateway service without a flow.
        NoFlow = "no_flow",
        /// A packet to a SNAT port without a flow (a reply to nothing we track).
        NoReplyFlow = "no_reply_flow",
        /// A SYN for an app with no backend accepting new connections.
        NoBackend = "no_backend",
        /// No free SNAT port after the bounded number of probes.
        SnatExhausted = "snat_exhausted",
        /// The conntrack pair could not be inserted (a race lost, or another failure than a
        /// full table).
        ConntrackInsert = "conntrack_insert",
        /// A fragment to a gateway address: the gateway does not reassemble (policy).
        Fragment = "fragment",
        /// No route to the backend or client (`bpf_fib_lookup` failed).
        NoRoute = "no_route",
        /// The datapath is not configured (no SNAT address).
        NotConfigured = "not_configured",
        /// A TCP flag combination no valid segment has (netfilter's `tcp_valid_flags`): SYN+FIN,
        /// SYN+RST, no flags, FIN or PSH or URG without ACK...
        BadFlags = "bad_flags",
        /// A segment that would create a flow failed its IPv4 or TCP checksum.
        BadChecksum = "bad_checksum",
        /// A segment that would be forwarded with an IPv4 TTL of 1 or less.
        TtlExceeded = "ttl_exceeded",
        /// A segment of a flow outside the sequence window (RFC 5961, netfilter's
        /// `tcp_in_window`): it changes nothing.
        OutOfWindow = "out_of_window",
        /// A SYN refused because the conntrack table is full: established flows are never
        /// evicted to make room (the new flow is refused, nothing else changes).
        ConntrackFull = "conntrack_full",
        /// A SYN refused because its app has its cap of half-open flows and it cannot be
        /// answered with a SYN cookie (its IPv4 header has options).
        HalfOpenFull = "half_open_full",
        /// An ICMP error about a flow over the rate of translated errors (`--icmp-rate`): the
        /// gateway never relays more errors than that, whatever arrives.
        IcmpRateLimited = "icmp_rate_limited",
        /// An ICMP error about a flow whose quoted packet is malformed, or whose own length
        /// or checksum is wrong.
        BadIcmp = "bad_icmp",
        /// A packet over its container's rate limit (issue 18: its app's limit, per backend
        /// and direction; counted per backend in `RATE_DROPS` too). The RST that ends a
        /// connection is never dropped so.
        RateLimited = "rate_limited",
    }
}

impl DropReason {
    /// The slot of this reason in the `GLOBAL_STATS` array.
    pub const fn slot(self) -> u32 {
        GlobalStat::COUNT + self as u32
    }
}

/// Value of [`crate::maps::APP_STATS`] and [`crate::maps::BACKEND_STATS`] (per CPU). "In" is
/// client → backend, "out" is backend → client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct TrafficStats {
    pub packets_in: u64,
    /// L3 bytes.
    pub bytes_in: u64,
    pub packets_out: u64,
    /// L3 bytes.
    pub bytes_out: u64,
    /// Flows created.
    pub new_flows: u64,
}

impl TrafficStats {
    /// Adds `other` into `self` (summing per-CPU values).
    pub fn add(&mut self, other: &TrafficStats) {
        self.packets_in += other.packets_in;
        self.bytes_in += other.bytes_in;
        self.packets_out += other.packets_out;
        self.bytes_out += other.bytes_out;
        self.new_flows += other.new_flows;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_match_their_position_and_labels_are_unique() {
        for (i, s) in GlobalStat::ALL.iter().enumerate() {
            assert_eq!(s.index() as usize, i);
        }
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index() as usize, i);
            assert_eq!(r.slot(), GlobalStat::COUNT + i as u32);
        }
        let labels = GlobalStat::ALL
            .iter()
            .map(|s| s.label())
            .chain(DropReason::ALL.iter().map(|r| r.label()));
        for (i, a) in labels.clone().enumerate() {
            for b in labels.clone().skip(i + 1) {
                assert_ne!(a, b);
            }
        }
    }
}
