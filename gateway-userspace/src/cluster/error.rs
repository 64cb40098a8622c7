//! What a store operation can fail with, each with one clear message.

/// An error of the cluster store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// etcd did not answer within the store's timeout, or refused the connection.
    #[error(
        "etcd at {endpoints} is unreachable ({cause}): changes are refused until it is back, and nodes keep forwarding with their last known state"
    )]
    Unavailable { endpoints: String, cause: String },
    /// etcd answered with an error that is not about reachability.
    #[error("etcd at {endpoints} refused the request: {cause}")]
    Etcd { endpoints: String, cause: String },
    #[error("an app named {0:?} already exists in the cluster")]
    NameTaken(String),
    #[error("no app named {0:?} in the cluster")]
    NotFound(String),
    #[error("port {port} already belongs to app {app:?} in the cluster")]
    PortTaken { port: u16, app: String },
    #[error("every candidate port ({candidates} of them) is taken in the cluster")]
    PortsExhausted { candidates: usize },
    /// Other nodes kept changing the same keys: the write was not applied.
    #[error(
        "{what} lost {attempts} races in a row with writes of other nodes and was not applied: try again"
    )]
    Conflict { what: String, attempts: u32 },
    /// The change itself was refused (by the caller's closure, or a rule of the store).
    #[error("{0}")]
    Rejected(String),
    /// The watch asked for history that etcd has compacted away: load the whole state again
    /// ([`super::Store::load`]) and watch from its revision.
    #[error(
        "etcd has compacted its history up to revision {compacted}, past the watch's revision {requested}: a full resync is needed"
    )]
    Compacted { requested: i64, compacted: i64 },
    /// A value in etcd is not what this version of the gateway writes.
    #[error("{key} in etcd holds what this gateway cannot read: {cause}")]
    Corrupt { key: String, cause: String },
    #[error("{0}")]
    Invalid(String),
}

impl StoreError {
    /// Whether etcd could not be reached (the write may be retried once it is back).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }

    /// Classifies an error of the etcd client: transport failures and the gRPC codes of an
    /// unreachable or leaderless etcd are [`StoreError::Unavailable`].
    pub(crate) fn from_client(endpoints: &str, e: etcd_client::Error) -> Self {
        use etcd_client::Error as E;
        let unavailable = match &e {
            E::TransportError(_) | E::IoError(_) => true,
            // gRPC's Cancelled (1), DeadlineExceeded (4) and Unavailable (14).
            E::GRpcStatus(s) => {
                matches!(i32::from(s.code()), 1 | 4 | 14) || s.message().contains("no leader")
            }
            _ => false,
        };
        let mut cause = match &e {
            E::GRpcStatus(s) if !s.message().is_empty() => s.message().to_owned(),
            _ => e.to_string(),
        };
        // The transport's own words are in the sources ("http2 error" alone says little).
        let mut source = match &e {
            E::GRpcStatus(s) => std::error::Error::source(s),
            E::TransportError(t) => std::error::Error::source(t),
            _ => None,
        };
        while let Some(s) = source {
            let text = s.to_string();
            if !cause.contains(&text) {
                cause = format!("{cause}: {text}");
            }
            source = s.source();
        }
        if unavailable {
            StoreError::Unavailable {
                endpoints: endpoints.to_owned(),
                cause,
            }
        } else {
            StoreError::Etcd {
                endpoints: endpoints.to_owned(),
                cause,
            }
        }
    }

    pub(crate) fn timeout(endpoints: &str, timeout: std::time::Duration) -> Self {
        StoreError::Unavailable {
            endpoints: endpoints.to_owned(),
            cause: format!("no answer within {}", humantime::format_duration(timeout)),
        }
    }
}
