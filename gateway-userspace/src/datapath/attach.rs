//! Attaching the datapath to interfaces: the two modes, the links (owned by this process or
//! pinned on a bpffs so that they outlive it), and their pins.

use std::{
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
};

use aya::programs::{
    LinkOrder, TcAttachType, XdpMode,
    links::{FdLink, PinnedLink},
    tc::TcAttachOptions,
};
use gateway_common::maps;

use super::{Datapath, DatapathError, TC_PROGRAM, XDP_PROGRAM};

/// How the datapath is attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Native XDP (driver mode): for physical NICs.
    Xdp,
    /// TC ingress through tcx: robust on veth and virtual NICs.
    Tc,
}

impl AttachMode {
    /// Both modes, for tests that run the same case in each.
    pub const ALL: [AttachMode; 2] = [AttachMode::Xdp, AttachMode::Tc];

    /// The name of this mode's program in the eBPF object.
    pub const fn program_name(self) -> &'static str {
        match self {
            AttachMode::Xdp => XDP_PROGRAM,
            AttachMode::Tc => TC_PROGRAM,
        }
    }
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachMode::Xdp => "xdp",
            AttachMode::Tc => "tc",
        })
    }
}

impl FromStr for AttachMode {
    type Err = UnknownAttachMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "xdp" => Ok(AttachMode::Xdp),
            "tc" => Ok(AttachMode::Tc),
            other => Err(UnknownAttachMode(other.to_owned())),
        }
    }
}

/// An attach mode that is neither `xdp` nor `tc`.
#[derive(Debug, thiserror::Error)]
#[error("unknown attach mode {0:?}: expected `xdp` or `tc`")]
pub struct UnknownAttachMode(pub String);

/// One attachment: the interface, the mode and the link (pinned or owned by this process).
#[derive(Debug)]
pub struct Attachment {
    pub iface: String,
    pub mode: AttachMode,
    /// The kernel's id of the bpf_link (as `bpftool link show` lists it).
    pub link_id: u32,
    link: Link,
}

#[derive(Debug)]
enum Link {
    /// Detached when this process drops it.
    Owned(#[allow(dead_code, reason = "held to keep the attachment")] FdLink),
    /// Detached when its pin is removed.
    Pinned {
        #[allow(dead_code, reason = "held to keep the pin's path and fd together")]
        link: PinnedLink,
        path: PathBuf,
    },
}

impl Attachment {
    /// Where the link is pinned, if it is.
    pub fn pin_path(&self) -> Option<&Path> {
        match &self.link {
            Link::Owned(_) => None,
            Link::Pinned { path, .. } => Some(path),
        }
    }
}

impl Datapath {
    /// Attaches the datapath to `iface` (in the calling thread's network namespace) in `mode`.
    /// TC attaches at ingress through tcx. XDP attaches in native (driver) mode *and* attaches
    /// the TC program too: XDP hands it what it cannot finish (a next hop whose neighbour is
    /// not resolved yet), and TC's `bpf_redirect_neigh` resolves it. With `pin_dir` (a
    /// directory on a bpffs), links are pinned there and outlive this process: each is
    /// detached by removing its pin.
    pub fn attach(
        &mut self,
        iface: &str,
        mode: AttachMode,
        pin_dir: Option<&Path>,
    ) -> Result<(), DatapathError> {
        if mode == AttachMode::Xdp {
            self.attach_one(iface, AttachMode::Xdp, pin_dir)?;
        }
        self.attach_one(iface, AttachMode::Tc, pin_dir)
    }

    fn attach_one(
        &mut self,
        iface: &str,
        mode: AttachMode,
        pin_dir: Option<&Path>,
    ) -> Result<(), DatapathError> {
        let attach_err = |source| DatapathError::Attach {
            mode,
            iface: iface.to_owned(),
            source,
        };
        let not_pinnable = || DatapathError::NotPinnable {
            mode,
            iface: iface.to_owned(),
        };
        let pin_path = pin_dir.map(|dir| dir.join(link_pin_name(iface, mode)));
        if let Some(path) = pin_path.as_ref().filter(|p| p.exists()) {
            return self.replace_pinned(iface, mode, path);
        }
        let link: FdLink = match mode {
            AttachMode::Xdp => {
                let program = self.xdp()?;
                let id = program.attach(iface, XdpMode::Driver).map_err(attach_err)?;
                let link = program.take_link(id).map_err(attach_err)?;
                FdLink::try_from(link).map_err(|_| not_pinnable())?
            }
            AttachMode::Tc => {
                let program = self.tc()?;
                let id = program
                    .attach_with_options(
                        iface,
                        TcAttachType::Ingress,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .map_err(attach_err)?;
                let link = program.take_link(id).map_err(attach_err)?;
                FdLink::try_from(link).map_err(|_| not_pinnable())?
            }
        };
        let link_id = link
            .info()
            .map_err(|source| DatapathError::LinkInfo {
                iface: iface.to_owned(),
                source,
            })?
            .id();
        let link = match pin_path {
            None => Link::Owned(link),
            Some(path) => {
                let pinned = link.pin(&path).map_err(|source| DatapathError::Pin {
                    mode,
                    iface: iface.to_owned(),
                    path: path.clone(),
                    source,
                })?;
                Link::Pinned { link: pinned, path }
            }
        };
        self.attachments.push(Attachment {
            iface: iface.to_owned(),
            mode,
            link_id,
            link,
        });
        Ok(())
    }

    /// Puts this datapath's program of `mode` into the link pinned at `path` (left by an
    /// earlier run): the kernel swaps programs atomically, so the interface is never without
    /// one and no flow is dropped.
    fn replace_pinned(
        &mut self,
        iface: &str,
        mode: AttachMode,
        path: &Path,
    ) -> Result<(), DatapathError> {
        let attach_err = |source| DatapathError::Attach {
            mode,
            iface: iface.to_owned(),
            source,
        };
        let link_err = |source| DatapathError::LinkInfo {
            iface: iface.to_owned(),
            source,
        };
        let pinned = PinnedLink::from_pin(path).map_err(link_err)?;
        let fd_link = FdLink::from(pinned);
        let link_id = fd_link.info().map_err(link_err)?.id();
        match mode {
            AttachMode::Xdp => {
                let link = aya::programs::xdp::XdpLink::try_from(fd_link).map_err(link_err)?;
                let program = self.xdp()?;
                let id = program.attach_to_link(link).map_err(attach_err)?;
                // The pin keeps the link; this process's fd may go.
                drop(program.take_link(id).map_err(attach_err)?);
            }
            AttachMode::Tc => {
                let link =
                    aya::programs::tc::SchedClassifierLink::try_from(fd_link).map_err(link_err)?;
                let program = self.tc()?;
                let id = program.attach_to_link(link).map_err(attach_err)?;
                drop(program.take_link(id).map_err(attach_err)?);
            }
        }
        let link = PinnedLink::from_pin(path).map_err(link_err)?;
        self.attachments.push(Attachment {
            iface: iface.to_owned(),
            mode,
            link_id,
            link: Link::Pinned {
                link,
                path: path.to_owned(),
            },
        });
        Ok(())
    }

    /// The current attachments.
    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// Lets go of every attachment. An owned link is detached now; a pinned one is detached
    /// once its pin is gone too (remove the pins first, see [`remove_pins`]), without waiting
    /// for this process to exit.
    pub fn release_attachments(&mut self) {
        self.attachments.clear();
    }
}

/// The file name of the link pinned for `iface` in `mode`.
fn link_pin_name(iface: &str, mode: AttachMode) -> String {
    format!("link_{mode}_{iface}")
}

/// Removes the pinned links in `dir` other than those of `keep` (interfaces no longer
/// configured, or attached in another mode now): each detaches when its pin goes.
pub fn prune_links(dir: &Path, keep: &[(String, AttachMode)]) -> std::io::Result<Vec<String>> {
    let keep: Vec<String> = keep
        .iter()
        .flat_map(|(iface, mode)| {
            // XDP mode also attaches TC (see `Datapath::attach`).
            let mut names = vec![link_pin_name(iface, AttachMode::Tc)];
            if *mode == AttachMode::Xdp {
                names.push(link_pin_name(iface, AttachMode::Xdp));
            }
            names
        })
        .collect();
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with("link_") && !keep.contains(&name) {
            std::fs::remove_file(dir.join(&name))?;
            removed.push(name);
        }
    }
    Ok(removed)
}

/// Removes everything this datapath pinned in `dir`: the links first (which detaches the
/// programs), then the maps (which drops every flow). Returns the names removed.
pub fn remove_pins(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut removed = prune_links(dir, &[])?;
    for name in maps::ALL.iter().chain(maps::RETIRED) {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => removed.push((*name).to_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attach_modes_parse_and_print() {
        for mode in AttachMode::ALL {
            assert_eq!(mode.to_string().parse::<AttachMode>().unwrap(), mode);
        }
        assert!("bpf".parse::<AttachMode>().is_err());
    }
}
