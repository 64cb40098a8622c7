//! `gateway flows`: the live connections, each one's two conntrack entries joined, with the
//! client's real address. Full NAT hides it from the backend, which sees the SNAT address and
//! port; `gateway flows --backend IP:PORT` maps that port back to the client.

use std::{collections::HashMap, net::SocketAddrV4};

use gateway_common::maps::{
    self, CT_ESTABLISHED, CT_FIN_FORWARD, CT_FIN_REVERSE, CT_RST, DIR_FORWARD, Flow, FlowKey4,
};

use crate::{
    api::{FlowList, FlowView},
    datapath::{Conntrack, DatapathError},
};

/// Which flows to list.
#[derive(Clone, Copy, Debug, Default)]
pub struct Filter {
    pub app_id: Option<u32>,
    pub backend: Option<SocketAddrV4>,
    pub limit: Option<usize>,
}

/// A flow's state bits as one word.
pub fn state_name(state: u8) -> &'static str {
    if state & CT_RST != 0 {
        "reset"
    } else if maps::is_closed(state) {
        "closed"
    } else if state & CT_FIN_FORWARD != 0 {
        "fin_client"
    } else if state & CT_FIN_REVERSE != 0 {
        "fin_backend"
    } else if state & CT_ESTABLISHED != 0 {
        "established"
    } else {
        "handshake"
    }
}

/// The flows of `ct` that `filter` selects, oldest first. `apps` names app ids; `now_ns` is
/// the datapath's clock.
pub fn list(
    ct: &Conntrack,
    filter: Filter,
    apps: &HashMap<u32, String>,
    now_ns: u64,
) -> Result<FlowList, DatapathError> {
    let wanted = |key: &FlowKey4, flow: &Flow| {
        // A forward entry's backend is where it goes to; a reverse entry's, where it comes from.
        let backend = if flow.direction == DIR_FORWARD {
            flow.nat_dst()
        } else {
            key.src()
        };
        filter.app_id.is_none_or(|id| id == flow.app_id)
            && filter.backend.is_none_or(|b| b == backend)
    };
    // Each connection by its forward entry (one with none is not listed).
    let mut forward: Vec<(FlowKey4, Flow, Flow)> = ct
        .connections(wanted)?
        .into_iter()
        .filter_map(|c| Some((c.forward_key, c.forward?, c.reverse.unwrap_or_default())))
        .collect();
    forward.sort_by_key(|(k, f, _)| (f.created_ns, k.src_ip, k.src_port));
    let matched = forward.len();
    let ms = |ns: u64| now_ns.saturating_sub(ns) / 1_000_000;
    let flows = forward
        .into_iter()
        .take(filter.limit.unwrap_or(usize::MAX))
        .map(|(k, f, back)| FlowView {
            app: apps.get(&f.app_id).cloned().unwrap_or_default(),
            client: k.src().to_string(),
            public: k.dst().to_string(),
            backend: f.nat_dst().to_string(),
            snat: f.nat_src().to_string(),
            state: state_name(f.state).to_owned(),
            age_ms: ms(f.created_ns),
            idle_ms: ms(f.last_seen_ns.max(back.last_seen_ns)),
            packets_in: f.packets,
            bytes_in: f.bytes,
            packets_out: back.packets,
            bytes_out: back.bytes,
        })
        .collect();
    Ok(FlowList { matched, flows })
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_common::maps::{CT_SYN_ACK_SEEN, CT_SYN_SEEN};

    #[test]
    fn states_are_named_by_their_most_advanced_bit() {
        let est = CT_SYN_SEEN | CT_SYN_ACK_SEEN | CT_ESTABLISHED;
        assert_eq!(state_name(CT_SYN_SEEN), "handshake");
        assert_eq!(state_name(CT_SYN_SEEN | CT_SYN_ACK_SEEN), "handshake");
        assert_eq!(state_name(est), "established");
        assert_eq!(state_name(est | CT_FIN_FORWARD), "fin_client");
        assert_eq!(state_name(est | CT_FIN_REVERSE), "fin_backend");
        assert_eq!(state_name(est | CT_FIN_FORWARD | CT_FIN_REVERSE), "closed");
        assert_eq!(state_name(est | CT_RST), "reset");
    }
}
