//! New flows: pick the backend, allocate a SNAT port collision-free, insert the conntrack pair.

use gateway_common::{
    DropReason, GlobalStat,
    maps::{Config, DIR_FORWARD, DIR_REVERSE, Flow, FlowKey4, TCP_SYN},
};

use crate::{conntrack, lb, parse::IPPROTO_TCP, stats};

/// SNAT port probes before giving up (each a random port of the range).
const SNAT_PROBES: u32 = 8;

/// Creates the flow of a SYN to the service of `app_id`; returns the forward entry.
#[inline(always)]
pub fn create(
    key: &FlowKey4,
    app_id: u32,
    cfg: &Config,
    now: u64,
) -> Result<*mut Flow, DropReason> {
    if cfg.snat_ip == 0 || cfg.snat_port_max < cfg.snat_port_min {
        return Err(DropReason::NotConfigured);
    }
    let (backend_id, backend) = lb::choose(app_id, key)?;
    let mut entry = Flow {
        // Reverse entry first: backend → SNAT becomes public → client.
        nat_src_ip: key.dst_ip,
        nat_dst_ip: key.src_ip,
        nat_src_port: key.dst_port,
        nat_dst_port: key.src_port,
        app_id,
        backend_id,
        direction: DIR_REVERSE,
        state: TCP_SYN,
        created_ns: now,
        last_seen_ns: now,
        ..Flow::default()
    };
    let mut reverse_key = FlowKey4 {
        src_ip: backend.ip,
        dst_ip: cfg.snat_ip,
        src_port: backend.port,
        dst_port: 0,
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    };
    let range = u32::from(cfg.snat_port_max - cfg.snat_port_min) + 1;
    let mut found = false;
    for _ in 0..SNAT_PROBES {
        // SAFETY: helper without arguments.
        let r = unsafe { aya_ebpf::helpers::bpf_get_prandom_u32() };
        let port = cfg.snat_port_min + (r % range) as u16;
        reverse_key.dst_port = port.to_be();
        if conntrack::insert_reverse(&reverse_key, &entry)? {
            found = true;
            break;
        }
        stats::global(GlobalStat::SnatCollisions);
    }
    if !found {
        return Err(DropReason::SnatExhausted);
    }
    // Forward entry: client → public becomes SNAT → backend.
    entry.nat_src_ip = cfg.snat_ip;
    entry.nat_dst_ip = backend.ip;
    entry.nat_src_port = reverse_key.dst_port;
    entry.nat_dst_port = backend.port;
    entry.direction = DIR_FORWARD;
    conntrack::insert_forward(key, &entry, &reverse_key)?;
    stats::global(GlobalStat::FlowsCreated);
    stats::new_flow(app_id, backend_id);
    conntrack::lookup(key).ok_or(DropReason::ConntrackInsert)
}
