//! `gateway agent`'s programs, for a container host's cgroup (docs/client-address.md): they make
//! the client address a gateway's TOA option carries the peer address apps see.
//!
//! - [`sock_ops`] (a `BPF_PROG_TYPE_SOCK_OPS` program): when an accepted connection becomes
//!   established, the kernel runs it with the segment that established it
//!   (`BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB`, from `tcp_init_transfer`; `skb_data` points at that
//!   segment's TCP header and `skb_data_end` at its end, options included, since Linux 5.10:
//!   `bpf_skops_established` in net/ipv4/tcp_input.c, include/uapi/linux/bpf.h). From a trusted
//!   source (a gateway SNAT address, [`TRUSTED`]), a TOA option there maps the socket (its
//!   cookie, `bpf_get_socket_cookie`) to the option's client address in [`SOCKETS`], and the
//!   socket asks for state callbacks (`BPF_SOCK_OPS_STATE_CB_FLAG`) so that its entry goes when
//!   it closes (`BPF_SOCK_OPS_STATE_CB` with the new state `TCP_CLOSE`, from `tcp_set_state`).
//! - [`getpeername4`] (`BPF_CGROUP_INET4_GETPEERNAME`): `inet_getname` runs it for
//!   `getpeername()` and for `accept()`'s peer address (`do_accept` calls the socket's
//!   `getname` with peer 2, net/socket.c; net/ipv4/af_inet.c): a mapped socket answers with its
//!   client address. [`getpeername6`] (`BPF_CGROUP_INET6_GETPEERNAME`, from `inet6_getname`)
//!   does the same for IPv4 clients of dual-stack IPv6 sockets (`::ffff:a.b.c.d`), which the
//!   sock_ops program maps too.
//!
//! Neither ever refuses anything (both return 1). The agent's maps are declared here rather
//! than in `maps`: no datapath program uses them, and the daemon, which loads the same object,
//! leaves them alone (`gateway_common::maps::AGENT`).

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE,
    },
    cty::c_void,
    helpers::bpf_get_socket_cookie,
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext},
};
use core::ptr::read_volatile;

use gateway_common::{
    agent::{AgentStat, OPTIONS_MAX, PeerAddr4, Step, read_toa, step},
    maps::{AGENT_STATS_LEN, AGENT_TRUSTED_MAX},
};

/// `AGENT_TRUSTED`: the sources whose TOA options are believed (network-order IPv4 → 1).
#[map(name = "gw_agt_trust_v1")]
pub static TRUSTED: HashMap<u32, u32> = HashMap::with_max_entries(AGENT_TRUSTED_MAX, 0);

/// `AGENT_SOCKETS`: socket cookie → the client address its TOA option gave. One entry in the
/// object (the daemon creates it too, unused); the agent sizes it at load.
#[map(name = "gw_agt_sock_v1")]
pub static SOCKETS: LruHashMap<u64, PeerAddr4> = LruHashMap::with_max_entries(1, 0);

/// `AGENT_STATS`: the agent's counters (per CPU).
#[map(name = "gw_agt_stats_v1")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(AGENT_STATS_LEN, 0);

/// `AF_INET`, `AF_INET6`: the sock_ops program looks at IPv4 connections, of IPv4 sockets or
/// of dual-stack IPv6 ones.
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// The third 32-bit word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`, RFC 4291 §2.5.5.2),
/// network order.
const V4_MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
/// The SYN bit of a TCP header's flags (`skb_tcp_flags`).
const TCP_SYN: u32 = 0x02;
/// A TCP header's length without options.
const TCP_MIN_LEN: usize = 20;

#[inline(always)]
fn count(stat: AgentStat) {
    if let Some(slot) = STATS.get_ptr_mut(stat.index()) {
        // SAFETY: this CPU's own slot of a per-CPU array.
        unsafe { *slot += 1 };
    }
}

/// The sock_ops program: maps an accepted socket whose establishing segment carries a trusted
/// TOA option, and forgets it when it closes. Returns 1 (the callbacks it handles ignore it).
#[inline(always)]
pub fn sock_ops(ctx: &SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => established(ctx),
        // args[0] is the old state, args[1] the new one.
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => closed(ctx),
        _ => {}
    }
    1
}

#[inline(always)]
fn established(ctx: &SockOpsContext) {
    // Verifier workaround: every field read, volatile, before any branch; LLVM otherwise loads
    // `remote_ip4` or `remote_ip6[3]` through one pointer it computes from either offset after
    // the branches join, and the verifier refuses a context access at a variable offset.
    let ops = ctx.ops;
    // SAFETY: reads of the context's fields.
    let (family, ip4, ip6, tcp_flags) = unsafe {
        (
            read_volatile(&raw const (*ops).family),
            read_volatile(&raw const (*ops).remote_ip4),
            [
                read_volatile(&raw const (*ops).remote_ip6[0]),
                read_volatile(&raw const (*ops).remote_ip6[1]),
                read_volatile(&raw const (*ops).remote_ip6[2]),
                read_volatile(&raw const (*ops).remote_ip6[3]),
            ],
            read_volatile(&raw const (*ops).skb_tcp_flags),
        )
    };
    let remote = match (family, ip6) {
        (AF_INET, _) => ip4,
        // An IPv4 client of a dual-stack socket: its address is IPv4-mapped (::ffff:a.b.c.d).
        (AF_INET6, [0, 0, V4_MAPPED, ip]) => ip,
        _ => return,
    };
    count(AgentStat::Established);
    // SAFETY: a plain lookup; the value is not kept.
    let trusted = unsafe { TRUSTED.get(remote) }.is_some();
    // A connection established by its SYN (TCP Fast Open: `tcp_fastopen_create_child` runs
    // this callback with the SYN) is never believed: a gateway adds the option to no SYN (nor
    // does LVS or DPVS), so one there is a client's own; the gateway removes those too.
    let toa = match options(ctx) {
        Some((options, len)) if tcp_flags & TCP_SYN == 0 => find_toa(&options, len),
        _ => None,
    };
    match (trusted, toa) {
        (true, Some((ip, port))) => {
            count(AgentStat::Trusted);
            // SAFETY: the helper reads the context's socket.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            if SOCKETS.insert(cookie, PeerAddr4::new(ip, port), 0).is_err() {
                count(AgentStat::InsertFailed);
                return;
            }
            count(AgentStat::Mapped);
            // Without the state callback the entry would stay until the LRU evicts it.
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        }
        (true, None) => {
            count(AgentStat::Trusted);
            count(AgentStat::TrustedWithoutOption);
        }
        (false, Some(_)) => count(AgentStat::UntrustedOption),
        (false, None) => {}
    }
}

#[inline(always)]
fn closed(ctx: &SockOpsContext) {
    // SAFETY: the helper reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if SOCKETS.remove(cookie).is_ok() {
        count(AgentStat::Closed);
    }
}

/// The TCP options of the segment in `skb_data..skb_data_end` (its TCP header, which the
/// kernel gives whole), copied out 4 bytes at a time (options fill whole 32-bit words: `doff`
/// counts them), and their length; `None` without a segment (`skb_data` is 0 then).
#[inline(always)]
fn options(ctx: &SockOpsContext) -> Option<([u8; OPTIONS_MAX], usize)> {
    // SAFETY: fields of the context, which the verifier turns into the packet's bounds.
    let (data, end) = unsafe {
        (
            (*ctx.ops).__bindgen_anon_3.skb_data as usize,
            (*ctx.ops).__bindgen_anon_4.skb_data_end as usize,
        )
    };
    if data + TCP_MIN_LEN > end {
        return None;
    }
    // SAFETY: byte 12 lies inside the header (checked above).
    let doff = usize::from(unsafe { *((data + 12) as *const u8) } >> 4) * 4;
    let len = doff.saturating_sub(TCP_MIN_LEN);
    let mut options = [0u8; OPTIONS_MAX];
    let mut copied = 0;
    let mut word = 0;
    while word < OPTIONS_MAX / 4 {
        let at = word * 4;
        if at >= len {
            break;
        }
        let p = data + TCP_MIN_LEN + at;
        if p + 4 > end {
            return None;
        }
        // SAFETY: `p..p + 4` lies inside the header (checked just above).
        let bytes = unsafe { *(p as *const [u8; 4]) };
        options[at] = bytes[0];
        options[at + 1] = bytes[1];
        options[at + 2] = bytes[2];
        options[at + 3] = bytes[3];
        copied = at + 4;
        word += 1;
    }
    Some((options, copied))
}

/// The client's address and port (network order) in the first TOA option of the first `len`
/// bytes of `options` (gateway-common's `agent::find_toa`, the same [`step`]s, walked by a
/// `bpf_loop` callback). Verifier workaround: the walk inlined as a loop of up to 40 steps cost
/// 558,663 verified instructions (each state that reaches the loop is walked through it
/// again); a callback is verified once (2,291 for the whole program).
#[inline(always)]
fn find_toa(options: &[u8; OPTIONS_MAX], len: usize) -> Option<(u32, u16)> {
    let mut walk = Walk {
        options: options as *const [u8; OPTIONS_MAX],
        len: len as u32,
        at: 0,
        found: NOT_FOUND,
    };
    // SAFETY: the helper calls `walk_step` at most `OPTIONS_MAX` times with `walk`, which
    // outlives the call; every step moves on by a byte at least, so that many steps suffice.
    unsafe {
        aya_ebpf::helpers::bpf_loop(
            OPTIONS_MAX as u32,
            walk_step as *mut c_void,
            (&mut walk as *mut Walk).cast(),
            0,
        )
    };
    match walk.found {
        NOT_FOUND => None,
        at => read_toa(options, at as usize),
    }
}

/// What [`walk_step`] leaves in [`Walk::found`] without a TOA option.
const NOT_FOUND: u32 = u32::MAX;

/// The state of [`find_toa`]'s walk, shared with each step.
#[repr(C)]
struct Walk {
    options: *const [u8; OPTIONS_MAX],
    len: u32,
    /// Where the next option starts.
    at: u32,
    /// Where the TOA option starts, or [`NOT_FOUND`].
    found: u32,
}

/// One step of [`find_toa`]'s walk, called by `bpf_loop` (0: go on; 1: stop).
#[inline(never)]
fn walk_step(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `find_toa`'s walk, for the duration of the helper's call.
    let walk = unsafe { &mut *ctx.cast::<Walk>() };
    // SAFETY: as above; the buffer outlives the walk.
    let options = unsafe { &*walk.options };
    match step(options, walk.len as usize, walk.at as usize) {
        Step::Next(next) => {
            walk.at = next as u32;
            0
        }
        Step::Found(at) => {
            walk.found = at as u32;
            1
        }
        Step::End => 1,
    }
}

/// The client address of the socket of `ctx`, if it is mapped.
#[inline(always)]
fn mapped(ctx: &SockAddrContext) -> Option<(u32, u16)> {
    // SAFETY: the helper reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    unsafe { SOCKETS.get(cookie) }.map(|peer| (peer.ip, peer.port))
}

/// The `getpeername4` program: a mapped socket's peer is its client. Returns 1 (the kernel
/// requires it of this hook).
#[inline(always)]
pub fn getpeername4(ctx: &SockAddrContext) -> i32 {
    if let Some((ip, port)) = mapped(ctx) {
        // SAFETY: `user_ip4` and `user_port` are writable in this hook (`user_port`: the port
        // in network order in its low 16 bits, include/uapi/linux/bpf.h).
        unsafe {
            (*ctx.sock_addr).user_ip4 = ip;
            (*ctx.sock_addr).user_port = u32::from(port);
        }
        count(AgentStat::GetpeernameRewritten);
    }
    1
}

/// The `getpeername6` program, for IPv4 clients of dual-stack sockets (only those are mapped):
/// the client, IPv4-mapped. Returns 1 (the kernel requires it of this hook).
#[inline(always)]
pub fn getpeername6(ctx: &SockAddrContext) -> i32 {
    if let Some((ip, port)) = mapped(ctx) {
        // SAFETY: `user_ip6` (in 32-bit words) and `user_port` are writable in this hook.
        unsafe {
            let addr = &mut *ctx.sock_addr;
            addr.user_ip6[0] = 0;
            addr.user_ip6[1] = 0;
            addr.user_ip6[2] = V4_MAPPED;
            addr.user_ip6[3] = ip;
            addr.user_port = u32::from(port);
        }
        count(AgentStat::GetpeernameRewritten);
    }
    1
}
