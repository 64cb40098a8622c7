//! The cluster store (issue 19's foundation): several front nodes share the operator's intent —
//! apps, their public ports and settings — through etcd (v3 API), and each node keeps its own
//! observed state (health, drains) and reconciles toward it (`daemon::cluster`, with
//! `gateway daemon --cluster`); `docs/cluster.md` says what is stored where and how it fails.
//!
//! Keys, under a prefix (default [`DEFAULT_PREFIX`]):
//!
//! | key | value | lifetime |
//! |---|---|---|
//! | `apps/<name>` | JSON of an [`AppSpec`] | until deleted |
//! | `ports/<port>` (five digits, `ports/08080`) | the name of the app owning that public port | with the app |
//! | `nodes/<node>` | JSON of a [`NodeInfo`] | the node's lease (a dead node's key expires) |
//! | `status/<node>/<app>` | JSON of that node's per-backend states | the node's lease |
//!
//! Every write is one etcd transaction ([`Store`]), so a write is applied whole or not at all.

mod error;
mod keys;
mod nodes;
mod store;
mod watch;

pub use error::StoreError;
pub use nodes::{NodeEntry, NodeInfo, NodeRegistration, NodeStatus};
pub use store::{AppSpec, Snapshot, Store};
pub use watch::{Watch, WatchEvent};

/// The key prefix when none is configured.
pub const DEFAULT_PREFIX: &str = "/gateway/";

/// How many transactions [`Store::create_app`] tries before it gives up on a port race.
pub const PORT_ATTEMPTS: u32 = 32;

/// How many transactions [`Store::update_app`] and [`Store::delete_app`] try before they report
/// [`StoreError::Conflict`].
pub const UPDATE_ATTEMPTS: u32 = 16;
