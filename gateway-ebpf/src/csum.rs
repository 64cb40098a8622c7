//! Internet checksum arithmetic (RFC 1071, incremental updates per RFC 1624). Values are
//! processed as raw 16-bit words of network-order bytes: one's complement sums do not care
//! about byte order as long as reading and writing agree. The pure parts shared with userspace
//! ([`fold`], [`pseudo_header`]) are `gateway_common::net`'s.

use gateway_common::net::fold64;
pub use gateway_common::net::{fold, pseudo_header};

/// Adds to `acc` the difference between two 32-bit fields (`new - old`).
#[inline(always)]
pub fn diff32(acc: u32, old: u32, new: u32) -> u32 {
    acc + (!old & 0xffff) + (!(old >> 16) & 0xffff) + (new & 0xffff) + (new >> 16)
}

/// Adds to `acc` the difference between two 16-bit fields (`new - old`).
#[inline(always)]
pub fn diff16(acc: u32, old: u16, new: u16) -> u32 {
    acc + u32::from(!old) + u32::from(new)
}

/// The checksum field after applying `diff` (RFC 1624: HC' = ~(~HC + m' - m)).
#[inline(always)]
pub fn apply(check: u16, diff: u32) -> u16 {
    !fold(u32::from(!check) + diff)
}

/// Bytes [`sum_bytes`] sums with one `bpf_csum_diff` call.
const CHUNK: usize = 64;
/// The most chunks [`sum_bytes`] sums (then a tail shorter than a chunk).
const CHUNKS_MAX: usize = 23;
/// The most bytes [`sum_bytes`] sums: 1535.
pub const SEGMENT_MAX: usize = CHUNK * (CHUNKS_MAX + 1) - 1;

/// The one's complement sum, folded, of the `len` bytes at `offset` (even) of the packet, as
/// 16-bit words read the datapath's way; an odd last byte counts as a word with a zero second
/// byte (RFC 1071). `None` past the packet's end, or past [`SEGMENT_MAX`] bytes. Whole 64-byte
/// chunks go through `bpf_csum_diff` (a loop of 16-bit loads that long is more than the
/// verifier follows), the rest word by word.
///
/// Its work is a function of its own in the object ([`sum_packet`], a BPF-to-BPF call): every way out of its loops ends at
/// its return, where the caller's state is the same whatever the loops did. Inlined, each exit
/// of each loop carried its own state into the rest of the SYN path, and verifying took ten
/// times as long. (Inside it, LLVM cannot see the caller's checks either, so it keeps its own.)
#[inline(always)]
pub fn sum_bytes(b: &crate::parse::Bounds, offset: usize, len: usize) -> Option<u16> {
    match sum_packet(b.data, b.data_end, offset, len) {
        NO_SUM => None,
        sum => Some(sum as u16),
    }
}

/// What [`sum_packet`] returns for "no sum".
const NO_SUM: u32 = u32::MAX;

/// [`sum_bytes`]'s work, with the packet's bounds in registers and the answer as a `u32`
/// ([`NO_SUM`]: none): fewer values on its stack. Verifier workaround: the frames of a program
/// share 512 bytes, and this one is under the datapath's largest.
#[inline(never)]
fn sum_packet(data: usize, data_end: usize, offset: usize, len: usize) -> u32 {
    let b = crate::parse::Bounds {
        data,
        data_end,
        len: data_end - data,
    };
    if len > SEGMENT_MAX {
        return NO_SUM;
    }
    let chunks = len / CHUNK;
    let mut sum = 0u64;
    for i in 0..CHUNKS_MAX {
        if i >= chunks {
            break;
        }
        let Some(chunk) = b.ptr_at::<[u8; CHUNK]>(offset + i * CHUNK) else {
            return NO_SUM;
        };
        // SAFETY: a helper reading the bounds-checked chunk; it writes nothing.
        let partial = unsafe {
            aya_ebpf::helpers::bpf_csum_diff(
                core::ptr::null_mut(),
                0,
                chunk.cast(),
                CHUNK as u32,
                0,
            )
        };
        if partial < 0 {
            return NO_SUM;
        }
        sum += partial as u64 & 0xffff_ffff;
    }
    let at = offset + chunks * CHUNK;
    let left = len - chunks * CHUNK;
    for i in 0..CHUNK / 2 {
        if 2 * i + 1 >= left {
            break;
        }
        let Some(w) = b.words::<1>(at + 2 * i) else {
            return NO_SUM;
        };
        // SAFETY: bounds-checked and aligned (see `Bounds::words`).
        sum += u64::from(unsafe { (*w)[0] });
    }
    if left & 1 != 0 {
        // Checked through `ptr_at_checked`: LLVM folds the `- 1` into the pointer otherwise,
        // and the verifier refuses a negative constant offset.
        let Some(last) = b.ptr_at_checked::<u8>(at + left - 1) else {
            return NO_SUM;
        };
        // SAFETY: bounds-checked by `ptr_at_checked`. On the wire it is the first byte of a
        // word: the low half of a word as read here.
        sum += u64::from(unsafe { *last });
    }
    u32::from(fold64(sum))
}

/// Whether the IPv4 header of `pkt` has a right checksum (RFC 791: the sum of its words,
/// checksum included, is all ones).
#[inline(always)]
pub fn ipv4_ok(b: &crate::parse::Bounds, pkt: &crate::parse::TcpPacket) -> bool {
    sum_bytes(b, crate::parse::ETH_LEN, pkt.ihl()).is_some_and(|s| s == 0xffff)
}

/// Whether the TCP segment of `pkt` has a right checksum (pseudo-header and whole segment).
#[inline(always)]
pub fn tcp_ok(b: &crate::parse::Bounds, pkt: &crate::parse::TcpPacket) -> bool {
    let tcp_len = pkt.l3_len - pkt.ihl() as u16;
    let pseudo = pseudo_header(pkt.key.src_ip, pkt.key.dst_ip, tcp_len);
    sum_bytes(b, pkt.l4_off(), usize::from(tcp_len))
        .is_some_and(|s| fold(u32::from(s) + pseudo) == 0xffff)
}

/// The TCP checksum field of `pkt`, if its header is there.
#[inline(always)]
fn tcp_field(b: &crate::parse::Bounds, pkt: &crate::parse::TcpPacket) -> Option<u16> {
    // SAFETY: bounds-checked and aligned (see `Bounds::words`).
    b.words::<1>(pkt.l4_off() + 16).map(|w| unsafe { (*w)[0] })
}

/// Whether the TCP checksum field of `pkt` holds its pseudo-header's sum, folded, and no more:
/// what a sender with tx checksum offload leaves for the NIC to finish (CHECKSUM_PARTIAL, from
/// `csum_start` on). A veth peer hands such a segment over as it is, and XDP sees its bytes
/// without the skb that says so. A whole checksum equals that value once in 65,536 segments;
/// computing it again ([`complete_partial`]) then gives the same value.
#[inline(always)]
pub fn partial(b: &crate::parse::Bounds, pkt: &crate::parse::TcpPacket) -> bool {
    let tcp_len = pkt.l3_len - pkt.ihl() as u16;
    tcp_field(b, pkt) == Some(fold(pseudo_header(pkt.key.src_ip, pkt.key.dst_ip, tcp_len)))
}

/// The whole TCP checksum of a [`partial`] segment, as the NIC would have written it: the
/// complement of the sum of the segment, whose checksum field already holds the pseudo-header's
/// sum. `None` for a segment longer than [`SEGMENT_MAX`].
#[inline(always)]
pub fn complete_partial(b: &crate::parse::Bounds, pkt: &crate::parse::TcpPacket) -> Option<u16> {
    let tcp_len = usize::from(pkt.l3_len) - pkt.ihl();
    sum_bytes(b, pkt.l4_off(), tcp_len).map(|s| !s)
}
