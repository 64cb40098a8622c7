//! `gateway agent`, the container host's side of the client address (docs/client-address.md):
//! its counters ([`AgentStat`]), what it remembers per socket ([`PeerAddr4`]) and the walk of a
//! TCP header's options that finds a TOA option ([`find_toa`]), shared by its sock_ops program
//! (gateway-ebpf's `agent`) and the unit tests here. Its maps' names are in [`crate::maps`]
//! (`AGENT_*`).

use core::net::SocketAddrV4;

use bytemuck::{Pod, Zeroable};

use crate::net::{socket_from_net, toa};

/// Bytes of options a TCP header holds at most (`doff` 15: 60 bytes, less the 20 fixed ones).
pub const OPTIONS_MAX: usize = 40;

/// TCP option kinds the walk knows besides TOA (RFC 9293 §3.2).
const OPT_END: u8 = 0;
const OPT_NOP: u8 = 1;

/// One step of [`find_toa`]'s walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The next option starts here.
    Next(usize),
    /// A TOA option (kind [`toa::KIND`], length [`toa::LEN`]) starts here.
    Found(usize),
    /// No option after this one: the end of the options, an end-of-list option, or a
    /// malformed one.
    End,
}

/// The step of the walk at `at` over the first `len` bytes of `options`, read as Linux's TCP
/// reads a header's options (`tcp_parse_options`): an end-of-list option or a malformed option
/// (a length below 2, or one that runs past the header) ends the walk; an option of kind 254
/// with another length (RFC 6994's experiments with their identifier) is skipped.
#[inline(always)]
pub fn step(options: &[u8; OPTIONS_MAX], len: usize, at: usize) -> Step {
    let len = if len > OPTIONS_MAX { OPTIONS_MAX } else { len };
    if at >= len {
        return Step::End;
    }
    let kind = options[at];
    if kind == OPT_END {
        return Step::End;
    }
    if kind == OPT_NOP {
        return Step::Next(at + 1);
    }
    if at + 1 >= len {
        return Step::End;
    }
    let size = options[at + 1] as usize;
    if size < 2 || at + size > len {
        return Step::End;
    }
    if kind == toa::KIND && size == toa::LEN as usize {
        return Step::Found(at);
    }
    Step::Next(at + size)
}

/// The client's address and port (network order) of the first TOA option in the first `len`
/// bytes of `options` (a TCP header's options, copied out of the segment), walked by [`step`]:
/// `None` without one. The first, as the toa kernel module reads it (`get_toa_data`); a
/// gateway sends one. The sock_ops program walks the same steps in a `bpf_loop` callback
/// (gateway-ebpf's `agent::find_toa`): this loop, inlined there, was costly to verify.
#[inline(always)]
pub fn find_toa(options: &[u8; OPTIONS_MAX], len: usize) -> Option<(u32, u16)> {
    let mut at = 0;
    // Every step moves on by a byte at least: that many steps walk any header.
    for _ in 0..OPTIONS_MAX {
        match step(options, len, at) {
            Step::Next(next) => at = next,
            Step::Found(found) => return read_toa(options, found),
            Step::End => return None,
        }
    }
    None
}

/// The TOA option at `at` of `options` (where [`step`] found it), parsed.
#[inline(always)]
pub fn read_toa(options: &[u8; OPTIONS_MAX], at: usize) -> Option<(u32, u16)> {
    if at > OPTIONS_MAX - toa::LEN as usize {
        return None;
    }
    let mut bytes = [0u8; toa::LEN as usize];
    let mut i = 0;
    while i < bytes.len() {
        bytes[i] = options[at + i];
        i += 1;
    }
    toa::parse(bytes)
}

/// Value of [`crate::maps::AGENT_SOCKETS`]: the client address a socket's TOA option gave,
/// which the agent's `getpeername4` program returns to the app.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct PeerAddr4 {
    /// The client's IPv4 address (network order).
    pub ip: u32,
    /// The client's port (network order).
    pub port: u16,
    pub _pad: u16,
}

impl PeerAddr4 {
    /// The entry for a client at `ip:port` (network order), the padding zeroed.
    #[inline(always)]
    pub const fn new(ip: u32, port: u16) -> Self {
        PeerAddr4 { ip, port, _pad: 0 }
    }

    /// The client's address.
    pub const fn addr(&self) -> SocketAddrV4 {
        socket_from_net(self.ip, self.port)
    }
}

crate::stats::indexed_names! {
    /// The agent's per-CPU counters (slots of [`crate::maps::AGENT_STATS`]).
    AgentStat {
        /// Connections accepted in the cgroup whose establishing segment the sock_ops program
        /// saw (`BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB`): IPv4 connections, of IPv4 sockets or of
        /// dual-stack IPv6 ones.
        Established = "established",
        /// Of those, the ones from a trusted source (a gateway SNAT address, `--trusted`).
        Trusted = "trusted",
        /// Of those, the ones with a TOA option: their socket is mapped to the client address
        /// the option gave.
        Mapped = "mapped",
        /// From a trusted source without a TOA option (an app without `--client-address
        /// toa`, a health check, or a segment that lost its option): left as they are.
        TrustedWithoutOption = "trusted_without_option",
        /// From an untrusted source with a TOA option: ignored (anyone can write the option;
        /// only a gateway's is believed).
        UntrustedOption = "untrusted_options",
        /// `getpeername()` and `accept()` answers rewritten to a mapped client address.
        GetpeernameRewritten = "getpeername_rewritten",
        /// Mapped sockets that closed: their entry removed.
        Closed = "closed",
        /// Mapped sockets whose entry could not be stored (a map update failed): left as they
        /// are.
        InsertFailed = "insert_failed",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::{ip_to_net, port_to_net};
    use core::net::Ipv4Addr;

    /// Options made of `parts` one after the other (at most 40 bytes).
    fn options(parts: &[&[u8]]) -> ([u8; OPTIONS_MAX], usize) {
        let mut options = [0u8; OPTIONS_MAX];
        let mut len = 0;
        for part in parts {
            options[len..len + part.len()].copy_from_slice(part);
            len += part.len();
        }
        (options, len)
    }

    fn toa_of(ip: [u8; 4], port: u16) -> [u8; 8] {
        toa::option(ip_to_net(Ipv4Addr::from(ip)), port_to_net(port))
    }

    fn found(parts: &[&[u8]]) -> Option<SocketAddrV4> {
        let (o, len) = options(parts);
        find_toa(&o, len).map(|(ip, port)| socket_from_net(ip, port))
    }

    const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 77), 4242);
    /// NOP, NOP, a timestamp (kind 8, length 10): what Linux puts on an ACK.
    const TIMESTAMP: [u8; 12] = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];

    #[test]
    fn a_toa_option_is_found_alone_and_after_others() {
        let t = toa_of([203, 0, 113, 77], 4242);
        assert_eq!(found(&[&t]), Some(CLIENT));
        assert_eq!(found(&[&TIMESTAMP, &t]), Some(CLIENT));
        // Before other options, and the first of two counts.
        assert_eq!(
            found(&[&t, &toa_of([192, 0, 2, 9], 1), &TIMESTAMP]),
            Some(CLIENT)
        );
        // At the very end of a full 40-byte header.
        assert_eq!(found(&[&[1; 32], &t]), Some(CLIENT));
    }

    #[test]
    fn no_option_or_another_kind_254_is_none() {
        assert_eq!(found(&[]), None);
        assert_eq!(found(&[&TIMESTAMP]), None);
        // RFC 6994 experiment with a 2-byte identifier (length 4), then nothing.
        assert_eq!(found(&[&[254, 4, 0xeb, 0x9f]]), None);
        // ... then a TOA: skipped, the TOA found.
        let t = toa_of([203, 0, 113, 77], 4242);
        assert_eq!(found(&[&[254, 4, 0xeb, 0x9f], &t]), Some(CLIENT));
        // Kind 253 with length 8 is not TOA.
        assert_eq!(found(&[&[253, 8, 0x10, 0x92, 203, 0, 113, 77]]), None);
    }

    #[test]
    fn a_malformed_or_ended_list_hides_what_follows() {
        let t = toa_of([203, 0, 113, 77], 4242);
        for prefix in [
            &[0u8][..],    // end of list
            &[8, 1][..],   // length below 2
            &[8, 0][..],   // length 0 (would loop)
            &[8, 200][..], // past the header
        ] {
            assert_eq!(found(&[prefix, &t]), None, "after {prefix:?}");
        }
        // Cut short by the header's length.
        let (o, _) = options(&[&t]);
        assert_eq!(find_toa(&o, 7), None);
        // A length past 40 reads 40 at most.
        assert_eq!(
            find_toa(&o, 1000),
            Some((ip_to_net(*CLIENT.ip()), port_to_net(4242)))
        );
    }

    #[test]
    fn forty_nops_end_within_the_steps() {
        assert_eq!(found(&[&[1; 40]]), None);
    }

    #[test]
    fn peer_addr_is_network_order() {
        let p = PeerAddr4::new(ip_to_net(*CLIENT.ip()), port_to_net(CLIENT.port()));
        assert_eq!(p.addr(), CLIENT);
        assert_eq!(size_of::<PeerAddr4>(), 8);
    }

    #[test]
    fn agent_stat_labels_are_unique() {
        for (i, s) in AgentStat::ALL.iter().enumerate() {
            assert_eq!(s.index() as usize, i);
            assert!(AgentStat::ALL[..i].iter().all(|o| o.label() != s.label()));
        }
    }
}
