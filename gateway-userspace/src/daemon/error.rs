//! What can go wrong in the daemon, as one enum: an operator's request refused by the desired
//! state's rules ([`StateError`], a 4xx for the API), or a failure of the machinery around it
//! (the datapath, the state file, bpffs, sockets, background tasks: a 5xx, or the daemon does not
//! start). The HTTP layer (`api::server`) maps [`DaemonError::kind`] to a status; nothing here
//! knows HTTP.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use crate::{
    datapath::DatapathError,
    state::{ErrorKind, StateError, StateFileError},
};

/// A failed daemon operation or start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The request breaks a rule of the desired state (unknown app, port taken, bad address...):
    /// nothing changed.
    #[error(transparent)]
    Refused(#[from] StateError),
    /// The kernel side (maps, programs, links) failed.
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    /// Reading, writing or locking the state file failed.
    #[error(transparent)]
    StateFile(#[from] StateFileError),
    #[error("{what} {path} failed")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} is not on a bpffs and is not empty: a bpffs mounted there would hide what it holds (give a new or empty directory)",
        path.display()
    )]
    NotEmpty { path: PathBuf },
    #[error("mounting a bpffs on {path} failed")]
    Mount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("unmounting {path} failed")]
    Unmount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("another gateway daemon is serving on {path}")]
    SocketInUse { path: PathBuf },
    #[error("another gateway daemon uses the pins in {path}")]
    PinsInUse { path: PathBuf },
    #[error("binding the metrics address {addr} failed")]
    MetricsBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving the API failed")]
    Serve(#[source] std::io::Error),
    /// A blocking or background task of the daemon panicked or was cancelled.
    #[error("a task of the daemon failed")]
    Task(#[from] tokio::task::JoinError),
    #[error("rendering the metrics failed")]
    Metrics(#[source] std::fmt::Error),
    /// The cluster store (etcd) refused or could not take a change: nothing changed.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::StoreError),
    /// A change written to etcd that this node did not apply in time.
    #[error(
        "the change was written to the cluster (revision {revision}) but this node has not applied it within {} s; it will when it catches up",
        waited.as_secs()
    )]
    NotApplied {
        revision: i64,
        waited: std::time::Duration,
    },
    #[error(
        "the deploy of app {app} (generation {generation}) aborted on this node: its new backends did not become healthy here in time; the old ones keep serving"
    )]
    DeployAborted { app: String, generation: u64 },
    #[error("this daemon is not in a cluster (start it with --cluster etcd=URL --node NAME)")]
    NotClustered,
}

impl DaemonError {
    /// [`DaemonError::Io`] for doing `what` to `path`, from the error it gives.
    pub fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_owned();
        move |source| DaemonError::Io { what, path, source }
    }

    /// What kind of refusal this is; `None` for a failure of the daemon itself.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            DaemonError::Refused(e) => Some(e.kind()),
            DaemonError::Cluster(e) => {
                use crate::cluster::StoreError as S;
                match e {
                    S::Unavailable { .. } => Some(ErrorKind::Unavailable),
                    S::NameTaken(_) | S::PortTaken { .. } | S::Conflict { .. } => {
                        Some(ErrorKind::Conflict)
                    }
                    S::NotFound(_) => Some(ErrorKind::NotFound),
                    S::PortsExhausted { .. } => Some(ErrorKind::Exhausted),
                    S::Rejected(_) | S::Invalid(_) => Some(ErrorKind::Invalid),
                    _ => None,
                }
            }
            DaemonError::NotApplied { .. } | DaemonError::DeployAborted { .. } => {
                Some(ErrorKind::Timeout)
            }
            DaemonError::NotClustered => Some(ErrorKind::NotFound),
            _ => None,
        }
    }

    /// The whole chain of causes on one line (`outer: inner: ...`), as the API and the log
    /// report it.
    pub fn chain(&self) -> String {
        let mut message = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        message
    }
}
