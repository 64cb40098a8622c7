//! [`Store`]: the apps and their ports in etcd, every write one transaction.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    hash::BuildHasher as _,
    time::Duration,
};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse,
};
use serde::{Deserialize, Serialize};

use super::{
    PORT_ATTEMPTS, StoreError, UPDATE_ATTEMPTS,
    keys::{Keys, valid_name},
};

/// An app as the cluster stores it (`apps/<name>`): the operator's intent, shared by every node.
///
/// Only the name and the public port are typed here, because the store needs them (the port is
/// unique across the cluster, through `ports/<port>`). The rest of the app's settings —
/// backends, weights, health, rate limits, deploys — is `settings`, opaque JSON to the store:
/// typing it would tie this module to the daemon's state types, which the daemon does when it
/// wires the store in.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AppSpec {
    pub name: String,
    pub port: u16,
    #[serde(default)]
    pub settings: serde_json::Value,
}

/// Every app of the cluster, as read at one etcd revision.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// The revision the snapshot was read at: watch from `revision + 1` to miss nothing.
    pub revision: i64,
    pub apps: BTreeMap<String, AppSpec>,
    /// The apps whose value this version cannot read (by name, with why): not in `apps`, and
    /// not to be taken as deleted either (one unreadable value must not stop a node from
    /// following every other app).
    pub unreadable: BTreeMap<String, String>,
}

/// A client of the cluster store: cheap to clone (clones share one connection).
///
/// Every call is bounded by the timeout given to [`Store::connect`]: when etcd does not answer
/// in time (or refuses the connection) the call fails with [`StoreError::Unavailable`] and has
/// changed nothing that a later read could see half-applied.
#[derive(Clone)]
pub struct Store {
    pub(crate) client: Client,
    pub(crate) keys: Keys,
    pub(crate) endpoints: String,
    pub(crate) timeout: Duration,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.keys.prefix())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Store {
    /// A client of the etcd members `endpoints` (`http://HOST:PORT`), its keys under `prefix`
    /// (a `/` is appended if missing), every request bounded by `timeout`. It does not wait for
    /// etcd: a store whose etcd is down is created, and its calls fail with
    /// [`StoreError::Unavailable`] until etcd answers.
    pub async fn connect(
        endpoints: &[impl AsRef<str>],
        prefix: &str,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        let list: Vec<String> = endpoints.iter().map(|e| e.as_ref().to_owned()).collect();
        if list.is_empty() {
            return Err(StoreError::Invalid("no etcd endpoint given".into()));
        }
        if timeout.is_zero() {
            return Err(StoreError::Invalid(
                "the etcd timeout must not be zero".into(),
            ));
        }
        let joined = list.join(",");
        let options = ConnectOptions::new()
            // No per-request timeout of the client's own: `call` bounds every request, with
            // one message whatever part of it hangs.
            .with_connect_timeout(timeout)
            // HTTP/2 pings find a dead connection (a watch's, a lease keep-alive's) that no
            // request is using.
            .with_keep_alive(timeout.max(Duration::from_secs(1)), timeout)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let client = tokio::time::timeout(timeout, Client::connect(&list, Some(options)))
            .await
            .map_err(|_| StoreError::timeout(&joined, timeout))?
            .map_err(|e| StoreError::from_client(&joined, e))?;
        Ok(Store {
            client,
            keys: Keys::new(prefix),
            endpoints: joined,
            timeout,
        })
    }

    /// The endpoints, comma-separated, as errors name them.
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// The key prefix, ending with `/`.
    pub fn prefix(&self) -> &str {
        self.keys.prefix()
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs one etcd request within the timeout, classifying its errors.
    pub(crate) async fn call<T>(
        &self,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.timeout, request)
            .await
            .map_err(|_| StoreError::timeout(&self.endpoints, self.timeout))?
            .map_err(|e| StoreError::from_client(&self.endpoints, e))
    }

    pub(crate) fn parse_app(&self, kv: &KeyValue) -> Result<AppSpec, StoreError> {
        serde_json::from_slice(kv.value()).map_err(|e| StoreError::Corrupt {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            cause: e.to_string(),
        })
    }

    /// Every app, read at one revision; those whose value cannot be read are listed apart
    /// ([`Snapshot::unreadable`]).
    pub async fn load(&self) -> Result<Snapshot, StoreError> {
        let mut kv = self.client.kv_client();
        let under = self.keys.apps();
        let resp = self
            .call(kv.get(under.clone(), Some(GetOptions::new().with_prefix())))
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
        let mut apps = BTreeMap::new();
        let mut unreadable = BTreeMap::new();
        for kv in resp.kvs() {
            let name = Keys::strip(kv.key(), &under).unwrap_or_default().to_owned();
            match self.parse_app(kv) {
                Ok(spec) if spec.name == name => {
                    apps.insert(name, spec);
                }
                Ok(spec) => {
                    let cause = format!("it names app {:?}", spec.name);
                    unreadable.insert(name, cause);
                }
                Err(e) => {
                    unreadable.insert(name, e.to_string());
                }
            }
        }
        Ok(Snapshot {
            revision,
            apps,
            unreadable,
        })
    }

    /// One app, if it exists.
    pub async fn app(&self, name: &str) -> Result<Option<AppSpec>, StoreError> {
        Ok(self.app_versioned(name).await?.map(|(spec, _)| spec))
    }

    /// One app and the revision it was last changed at.
    async fn app_versioned(&self, name: &str) -> Result<Option<(AppSpec, i64)>, StoreError> {
        let mut kv = self.client.kv_client();
        let resp = self.call(kv.get(self.keys.app(name), None)).await?;
        resp.kvs()
            .first()
            .map(|kv| Ok((self.parse_app(kv)?, kv.mod_revision())))
            .transpose()
    }

    /// Which app owns each public port of the cluster (`ports/<port>`).
    pub async fn port_owners(&self) -> Result<BTreeMap<u16, String>, StoreError> {
        let mut kv = self.client.kv_client();
        let resp = self
            .call(kv.get(self.keys.ports(), Some(GetOptions::new().with_prefix())))
            .await?;
        Ok(self.owners(resp.kvs()))
    }

    fn owners(&self, kvs: &[KeyValue]) -> BTreeMap<u16, String> {
        kvs.iter()
            .filter_map(|kv| {
                let port = self.keys.parse_port(kv.key())?;
                Some((port, String::from_utf8_lossy(kv.value()).into_owned()))
            })
            .collect()
    }

    /// Creates app `name` on the first free port of `ports` (in their order), in one
    /// transaction that puts `apps/<name>` and `ports/<port>` only if neither exists; a failed
    /// transaction reads the taken ports in the same round trip. A port taken meanwhile by
    /// another writer makes it try another free one (the lowest free after the first try, then
    /// one of the lowest 64 free ones at random, so that concurrent creators spread out), at
    /// most [`PORT_ATTEMPTS`] times, then [`StoreError::Conflict`]. Returns the port taken.
    pub async fn create_app(
        &self,
        name: &str,
        settings: serde_json::Value,
        ports: impl IntoIterator<Item = u16>,
    ) -> Result<u16, StoreError> {
        Ok(self.create_app_at(name, settings, ports).await?.0)
    }

    /// [`Store::create_app`], with the revision of its write (what a watcher sees it at).
    pub async fn create_app_at(
        &self,
        name: &str,
        settings: serde_json::Value,
        ports: impl IntoIterator<Item = u16>,
    ) -> Result<(u16, i64), StoreError> {
        if !valid_name(name) {
            return Err(StoreError::Invalid(format!(
                "{name:?} is not a valid app name (printable, no '/' or space)"
            )));
        }
        let mut candidates = Vec::new();
        let mut seen = BTreeSet::new();
        for p in ports {
            if seen.insert(p) {
                candidates.push(p);
            }
        }
        if candidates.is_empty() {
            return Err(StoreError::Invalid("no candidate port given".into()));
        }
        let mut spec = AppSpec {
            name: name.to_owned(),
            port: 0,
            settings,
        };
        // What the latest lost race showed of the taken ports (nothing before the first try).
        let mut owners = BTreeMap::new();
        let spread = std::collections::hash_map::RandomState::new();
        let mut kv = self.client.kv_client();
        for attempt in 0..PORT_ATTEMPTS {
            let free: Vec<u16> = candidates
                .iter()
                .copied()
                .filter(|p| !owners.contains_key(p))
                .collect();
            if free.is_empty() {
                return Err(match candidates[..] {
                    [port] => StoreError::PortTaken {
                        port,
                        app: owners.remove(&port).unwrap_or_default(),
                    },
                    _ => StoreError::PortsExhausted {
                        candidates: candidates.len(),
                    },
                });
            }
            // The first try is blind (the lowest candidate), the second informed by what the
            // first saw (the lowest free): only a race lost with a fresh view spreads out.
            spec.port = if attempt <= 1 {
                free[0]
            } else {
                let window = free.len().min(64);
                free[(spread.hash_one((name, attempt)) % window as u64) as usize]
            };
            let value = serde_json::to_vec(&spec).expect("an AppSpec serializes");
            let (app_key, port_key) = (self.keys.app(name), self.keys.port(spec.port));
            let txn = Txn::new()
                .when([
                    Compare::create_revision(app_key.clone(), CompareOp::Equal, 0),
                    Compare::create_revision(port_key.clone(), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put(app_key.clone(), value, None),
                    TxnOp::put(port_key, name, None),
                ])
                .or_else([
                    TxnOp::get(app_key, None),
                    TxnOp::get(self.keys.ports(), Some(GetOptions::new().with_prefix())),
                ]);
            let resp = self.call(kv.txn(txn)).await?;
            if resp.succeeded() {
                return Ok((spec.port, revision_of(&resp)));
            }
            let gets = gets(resp.op_responses());
            if gets.first().is_some_and(|kvs| !kvs.is_empty()) {
                return Err(StoreError::NameTaken(name.to_owned()));
            }
            owners = self.owners(gets.get(1).map(Vec::as_slice).unwrap_or_default());
        }
        Err(StoreError::Conflict {
            what: format!("creating app {name:?} (a port)"),
            attempts: PORT_ATTEMPTS,
        })
    }

    /// Changes app `name` with `change`: reads it, applies `change` to a copy and writes it back
    /// in a transaction that holds only if nobody changed the app meanwhile (its mod
    /// revision); on a lost race it reads again and re-applies `change`, at most
    /// [`UPDATE_ATTEMPTS`] times, then reports [`StoreError::Conflict`]. So no concurrent
    /// change is ever lost silently. A changed `port` moves the app's `ports/` key in the same
    /// transaction (refused if another app owns the new port). `change` refusing (its `Err`) is
    /// [`StoreError::Rejected`]; a change that changes nothing writes nothing. Returns the app as
    /// written.
    pub async fn update_app<F>(&self, name: &str, change: F) -> Result<AppSpec, StoreError>
    where
        F: FnMut(&mut AppSpec) -> Result<(), String>,
    {
        Ok(self.update_app_at(name, change).await?.0)
    }

    /// [`Store::update_app`], with the revision of its write (0 when nothing was written).
    pub async fn update_app_at<F>(
        &self,
        name: &str,
        mut change: F,
    ) -> Result<(AppSpec, i64), StoreError>
    where
        F: FnMut(&mut AppSpec) -> Result<(), String>,
    {
        let mut kv = self.client.kv_client();
        for attempt in 0..UPDATE_ATTEMPTS {
            let Some((old, revision)) = self.app_versioned(name).await? else {
                return Err(StoreError::NotFound(name.to_owned()));
            };
            let mut new = old.clone();
            change(&mut new).map_err(StoreError::Rejected)?;
            if new.name != old.name {
                return Err(StoreError::Rejected(format!(
                    "app {name:?} cannot be renamed (to {:?}): create the new one and delete this one",
                    new.name
                )));
            }
            if new == old {
                return Ok((new, 0));
            }
            let app_key = self.keys.app(name);
            let value = serde_json::to_vec(&new).expect("an AppSpec serializes");
            let mut when = vec![Compare::mod_revision(
                app_key.clone(),
                CompareOp::Equal,
                revision,
            )];
            let mut then = vec![TxnOp::put(app_key, value, None)];
            let mut otherwise = vec![];
            if new.port != old.port {
                let port_key = self.keys.port(new.port);
                when.push(Compare::create_revision(
                    port_key.clone(),
                    CompareOp::Equal,
                    0,
                ));
                then.push(TxnOp::delete(self.keys.port(old.port), None));
                then.push(TxnOp::put(port_key.clone(), name, None));
                otherwise.push(TxnOp::get(port_key, None));
            }
            let txn = Txn::new().when(when).and_then(then).or_else(otherwise);
            let resp = self.call(kv.txn(txn)).await?;
            if resp.succeeded() {
                return Ok((new, revision_of(&resp)));
            }
            if new.port != old.port
                && let Some(owner) = gets(resp.op_responses())
                    .first()
                    .and_then(|kvs| kvs.first())
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                    .filter(|owner| owner != name)
            {
                return Err(StoreError::PortTaken {
                    port: new.port,
                    app: owner,
                });
            }
            backoff(attempt).await;
        }
        Err(StoreError::Conflict {
            what: format!("changing app {name:?}"),
            attempts: UPDATE_ATTEMPTS,
        })
    }

    /// Deletes app `name` and its port in one transaction (which holds only if the app did not
    /// change since it was read: a concurrent change is not deleted unseen). Returns the app as
    /// it was.
    pub async fn delete_app(&self, name: &str) -> Result<AppSpec, StoreError> {
        Ok(self.delete_app_at(name).await?.0)
    }

    /// [`Store::delete_app`], with the revision of its write.
    pub async fn delete_app_at(&self, name: &str) -> Result<(AppSpec, i64), StoreError> {
        let mut kv = self.client.kv_client();
        for attempt in 0..UPDATE_ATTEMPTS {
            let Some((old, revision)) = self.app_versioned(name).await? else {
                return Err(StoreError::NotFound(name.to_owned()));
            };
            let app_key = self.keys.app(name);
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    app_key.clone(),
                    CompareOp::Equal,
                    revision,
                )])
                .and_then([
                    TxnOp::delete(app_key, None),
                    TxnOp::delete(self.keys.port(old.port), None),
                ]);
            let resp = self.call(kv.txn(txn)).await?;
            if resp.succeeded() {
                return Ok((old, revision_of(&resp)));
            }
            backoff(attempt).await;
        }
        Err(StoreError::Conflict {
            what: format!("deleting app {name:?}"),
            attempts: UPDATE_ATTEMPTS,
        })
    }
}

/// The revision a transaction committed at.
fn revision_of(resp: &etcd_client::TxnResponse) -> i64 {
    resp.header().map_or(0, |h| h.revision())
}

/// The key-values of each `get` among a transaction's responses, in order.
fn gets(responses: Vec<TxnOpResponse>) -> Vec<Vec<KeyValue>> {
    responses
        .into_iter()
        .filter_map(|r| match r {
            TxnOpResponse::Get(mut g) => Some(g.take_kvs()),
            _ => None,
        })
        .collect()
}

/// A short random pause after a lost race (up to 1, 2, 4 ... 32 ms), so that the losers of
/// one race do not all collide again.
async fn backoff(attempt: u32) {
    let cap_ms = 1u64 << attempt.min(5);
    let jitter = std::collections::hash_map::RandomState::new().hash_one(attempt) % (cap_ms * 1000);
    tokio::time::sleep(Duration::from_micros(jitter)).await;
}
