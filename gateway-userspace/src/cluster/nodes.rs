//! Nodes: each registers itself under a lease that it keeps alive, so that a dead node's keys
//! (`nodes/<node>`, `status/<node>/<app>`) expire with the lease.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use etcd_client::{GetOptions, PutOptions};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::{
    Store, StoreError,
    keys::{Keys, valid_name},
};

/// What a node says about itself (`nodes/<node>`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// When the node's daemon started, in ms since the Unix epoch.
    pub started_ms: u64,
    /// The gateway version the node runs.
    pub version: String,
    /// Where the node's API answers, if it is reachable from other nodes.
    #[serde(default)]
    pub api: Option<String>,
    /// The host its apps' `TCP_URL`s name (`--public-host`): what another node prints for an
    /// app only this one serves. Absent from nodes of the release before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_host: Option<String>,
}

/// A live node: its name, what it said, its lease.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeEntry {
    pub node: String,
    pub info: NodeInfo,
    pub lease: i64,
}

/// One node's observed state of one app (`status/<node>/<app>`), such as its backends' health.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeStatus {
    pub node: String,
    pub app: String,
    pub status: serde_json::Value,
}

/// A node registered in the cluster: a task keeps its lease alive until this is dropped (then
/// the node's keys expire after the lease's TTL, as a dead node's do) or [`NodeRegistration::leave`]
/// revokes it (they go at once). If the lease expires anyway (etcd unreachable for longer than
/// the TTL), the task grants a new one when etcd is back and puts `nodes/<node>` again; the
/// node's statuses are back with its next [`NodeRegistration::put_status`].
#[derive(Debug)]
pub struct NodeRegistration {
    store: Store,
    node: String,
    lease: Arc<AtomicI64>,
    task: JoinHandle<()>,
}

impl Store {
    /// Registers `node` with `info` under a new lease of `ttl` (whole seconds, at least 1),
    /// kept alive every third of it. A key of the same name is taken over (a restarted node's).
    pub async fn register_node(
        &self,
        node: &str,
        info: &NodeInfo,
        ttl: Duration,
    ) -> Result<NodeRegistration, StoreError> {
        if !valid_name(node) {
            return Err(StoreError::Invalid(format!(
                "{node:?} is not a valid node name (printable, no '/' or space)"
            )));
        }
        let ttl_s = ttl.as_secs_f64().ceil().max(1.0) as i64;
        let value = serde_json::to_vec(info).expect("a NodeInfo serializes");
        let id = self.grant_and_put(node, &value, ttl_s).await?;
        let lease = Arc::new(AtomicI64::new(id));
        let task = tokio::spawn(keep_alive(
            self.clone(),
            node.to_owned(),
            value,
            ttl_s,
            lease.clone(),
        ));
        Ok(NodeRegistration {
            store: self.clone(),
            node: node.to_owned(),
            lease,
            task,
        })
    }

    async fn grant_and_put(&self, node: &str, value: &[u8], ttl_s: i64) -> Result<i64, StoreError> {
        let mut lease = self.client.lease_client();
        let id = self.call(lease.grant(ttl_s, None)).await?.id();
        let mut kv = self.client.kv_client();
        self.call(kv.put(
            self.keys.node(node),
            value,
            Some(PutOptions::new().with_lease(id)),
        ))
        .await?;
        Ok(id)
    }

    /// The live nodes (those whose lease has not expired), by name.
    pub async fn nodes(&self) -> Result<Vec<NodeEntry>, StoreError> {
        let mut kv = self.client.kv_client();
        let under = self.keys.nodes();
        let resp = self
            .call(kv.get(under.clone(), Some(GetOptions::new().with_prefix())))
            .await?;
        resp.kvs()
            .iter()
            .filter_map(|kv| Some((Keys::strip(kv.key(), &under)?, kv)))
            .map(|(node, kv)| {
                let info = serde_json::from_slice(kv.value()).map_err(|e| StoreError::Corrupt {
                    key: self.keys.node(node),
                    cause: e.to_string(),
                })?;
                Ok(NodeEntry {
                    node: node.to_owned(),
                    info,
                    lease: kv.lease(),
                })
            })
            .collect()
    }

    /// Every live node's status of every app, by node then app.
    pub async fn statuses(&self) -> Result<Vec<NodeStatus>, StoreError> {
        let mut kv = self.client.kv_client();
        let under = self.keys.statuses();
        let resp = self
            .call(kv.get(under.clone(), Some(GetOptions::new().with_prefix())))
            .await?;
        resp.kvs()
            .iter()
            .filter_map(|kv| {
                let (node, app) = Keys::strip(kv.key(), &under)?.split_once('/')?;
                Some((node, app, kv))
            })
            .map(|(node, app, kv)| {
                let status =
                    serde_json::from_slice(kv.value()).map_err(|e| StoreError::Corrupt {
                        key: self.keys.status(node, app),
                        cause: e.to_string(),
                    })?;
                Ok(NodeStatus {
                    node: node.to_owned(),
                    app: app.to_owned(),
                    status,
                })
            })
            .collect()
    }
}

impl NodeRegistration {
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The lease the node's keys are under now.
    pub fn lease_id(&self) -> i64 {
        self.lease.load(Ordering::Relaxed)
    }

    /// Puts this node's status of `app` (`status/<node>/<app>`), under the node's lease.
    pub async fn put_status(
        &self,
        app: &str,
        status: &serde_json::Value,
    ) -> Result<(), StoreError> {
        if !valid_name(app) {
            return Err(StoreError::Invalid(format!(
                "{app:?} is not a valid app name"
            )));
        }
        let mut kv = self.store.client.kv_client();
        let value = serde_json::to_vec(status).expect("JSON serializes");
        self.store
            .call(kv.put(
                self.store.keys.status(&self.node, app),
                value,
                Some(PutOptions::new().with_lease(self.lease_id())),
            ))
            .await?;
        Ok(())
    }

    /// Leaves the cluster: stops the keep-alive and revokes the lease, so that the node's keys
    /// go at once.
    pub async fn leave(self) -> Result<(), StoreError> {
        self.task.abort();
        let mut lease = self.store.client.lease_client();
        self.store.call(lease.revoke(self.lease_id())).await?;
        Ok(())
    }
}

impl Drop for NodeRegistration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Keeps lease `lease` alive every third of its TTL; grants a new one (and puts the node's key
/// again) if it expired; retries while etcd is unreachable.
async fn keep_alive(store: Store, node: String, value: Vec<u8>, ttl_s: i64, lease: Arc<AtomicI64>) {
    let period = Duration::from_millis((ttl_s as u64 * 1000 / 3).max(100));
    loop {
        let id = lease.load(Ordering::Relaxed);
        let mut client = store.client.lease_client();
        match store.call(client.keep_alive(id)).await {
            Ok((mut keeper, mut responses)) => loop {
                tokio::time::sleep(period).await;
                if store.call(keeper.keep_alive()).await.is_err() {
                    break;
                }
                match store.call(responses.message()).await {
                    Ok(Some(r)) if r.ttl() > 0 => {}
                    Ok(Some(_)) => {
                        // Expired: a new lease right away.
                        regrant(&store, &node, &value, ttl_s, &lease).await;
                        break;
                    }
                    Ok(None) | Err(_) => break,
                }
            },
            Err(StoreError::Etcd { cause, .. }) if cause.contains("lease not found") => {
                regrant(&store, &node, &value, ttl_s, &lease).await;
            }
            Err(_) => tokio::time::sleep(period).await,
        }
    }
}

async fn regrant(store: &Store, node: &str, value: &[u8], ttl_s: i64, lease: &AtomicI64) {
    match store.grant_and_put(node, value, ttl_s).await {
        Ok(id) => lease.store(id, Ordering::Relaxed),
        Err(e) => {
            tracing::warn!(node, error = %e, "cannot register the node again");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
