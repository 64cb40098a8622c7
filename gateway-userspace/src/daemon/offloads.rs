//! Senders that leave TCP checksums partial (issue 15, input 6). A sender on this host with tx
//! checksum offload (a veth peer keeps it on by default) hands over segments whose checksum
//! the NIC is to finish (CHECKSUM_PARTIAL); XDP sees their bytes without the skb that says so,
//! and completes each such checksum itself (`partial_checksums`), which works but costs a sum
//! over every segment. The datapath counts them by interface (`gw_partial_v1`); the daemon
//! names each interface once, with the fix.

use std::{collections::HashSet, time::Duration};

use tracing::warn;

use super::Daemon;

impl Daemon {
    /// Every `interval`, warns once per interface on which XDP met partial checksums since the
    /// daemon started (or before, if the counts were carried over a restart).
    pub(super) async fn offloads_loop(self, interval: Duration) {
        let mut warned = HashSet::new();
        loop {
            tokio::time::sleep(interval).await;
            let seen = self
                .with(|c| Ok(c.datapath.partial_checksum_ifaces()?))
                .await;
            let seen = match seen {
                Ok(seen) => seen,
                Err(e) => {
                    warn!(
                        error = e.chain(),
                        "reading the partial checksum counts failed"
                    );
                    continue;
                }
            };
            for (ifindex, segments) in seen {
                if segments > 0 && warned.insert(ifindex) {
                    let iface = iface_name(ifindex).unwrap_or_else(|| format!("#{ifindex}"));
                    warn!(
                        iface,
                        segments,
                        "{iface}: TCP segments arrive with partial checksums (CHECKSUM_PARTIAL: \
                         the sending side of this link keeps tx checksum offload on, as a veth \
                         peer does by default); XDP completes each one, at a cost per packet. \
                         Fix: turn tx checksum offload off where they are sent from \
                         (`ethtool -K <device> tx off`), or attach {iface} in TC mode \
                         (`--attach tc`)"
                    );
                }
            }
        }
    }
}

/// The name of interface `ifindex` in the daemon's network namespace.
fn iface_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has room for IF_NAMESIZE bytes, as if_indextoname(3) needs.
    let name = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if name.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated string into `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}
