//! [`Watch`]: the apps' changes in order, resumed after a disconnection.

use std::{collections::VecDeque, time::Duration};

use etcd_client::{EventType, WatchOptions, WatchStream};

use super::{AppSpec, Store, StoreError, keys::Keys};

/// A change of the cluster's apps, or of the watch's connection.
#[derive(Clone, Debug, PartialEq)]
pub enum WatchEvent {
    /// App created or changed, at `revision`.
    AppPut { spec: AppSpec, revision: i64 },
    /// App deleted, at `revision`.
    AppDeleted { name: String, revision: i64 },
    /// The connection to etcd broke (once per outage). The watch keeps trying, and resumes
    /// from the revision after the last event it delivered: nothing is lost unless etcd
    /// compacts that history meanwhile ([`StoreError::Compacted`]).
    Disconnected { cause: String },
    /// Watching again after [`WatchEvent::Disconnected`], from `revision` on.
    Resumed { revision: i64 },
}

/// The app changes of the cluster from one revision on ([`Store::watch`]).
#[derive(Debug)]
pub struct Watch {
    store: Store,
    /// The first revision not delivered yet.
    next_revision: i64,
    stream: Option<WatchStream>,
    pending: VecDeque<Result<WatchEvent, StoreError>>,
    disconnected: bool,
    /// Set once etcd said the history is compacted: every later call reports it again.
    compacted: Option<i64>,
    retry: Duration,
}

const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);

impl Store {
    /// Watches the apps from `from_revision` on (a [`super::Snapshot`]'s `revision + 1`
    /// misses nothing after it; 0 means from now). The watch connects on the first
    /// [`Watch::next`].
    pub fn watch(&self, from_revision: i64) -> Watch {
        Watch {
            store: self.clone(),
            next_revision: from_revision,
            stream: None,
            pending: VecDeque::new(),
            disconnected: false,
            compacted: None,
            retry: RETRY_FIRST,
        }
    }
}

impl Watch {
    /// The first revision this watch has not delivered yet.
    pub fn next_revision(&self) -> i64 {
        self.next_revision
    }

    /// The next event. While etcd is unreachable it waits (retrying every second at most),
    /// after one [`WatchEvent::Disconnected`]. An `Err` is [`StoreError::Compacted`] (the
    /// watch is over: load the state again and watch from its revision), a value that cannot be
    /// read ([`StoreError::Corrupt`], the watch goes on), or etcd refusing the watch.
    pub async fn next(&mut self) -> Result<WatchEvent, StoreError> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return event;
            }
            if let Some(compacted) = self.compacted {
                return Err(StoreError::Compacted {
                    requested: self.next_revision,
                    compacted,
                });
            }
            let Some(stream) = self.stream.as_mut() else {
                match self.open().await {
                    Ok(stream) => {
                        self.stream = Some(stream);
                        self.retry = RETRY_FIRST;
                        if std::mem::take(&mut self.disconnected) {
                            return Ok(WatchEvent::Resumed {
                                revision: self.next_revision,
                            });
                        }
                    }
                    Err(e) if e.is_unavailable() => {
                        if !std::mem::replace(&mut self.disconnected, true) {
                            return Ok(WatchEvent::Disconnected {
                                cause: e.to_string(),
                            });
                        }
                        tokio::time::sleep(self.retry).await;
                        self.retry = (self.retry * 2).min(RETRY_MAX);
                    }
                    Err(e) => return Err(e),
                }
                continue;
            };
            let cause = match stream.message().await {
                Ok(Some(resp)) => {
                    if resp.compact_revision() > 0 {
                        self.stream = None;
                        self.compacted = Some(resp.compact_revision());
                        continue;
                    }
                    if resp.canceled() {
                        format!("etcd cancelled the watch: {}", resp.cancel_reason())
                    } else {
                        for event in resp.events() {
                            self.push(event);
                        }
                        continue;
                    }
                }
                Ok(None) => "etcd closed the watch stream".to_owned(),
                Err(e) => StoreError::from_client(&self.store.endpoints, e).to_string(),
            };
            self.stream = None;
            if !std::mem::replace(&mut self.disconnected, true) {
                return Ok(WatchEvent::Disconnected { cause });
            }
        }
    }

    async fn open(&mut self) -> Result<WatchStream, StoreError> {
        let mut options = WatchOptions::new().with_prefix();
        if self.next_revision > 0 {
            options = options.with_start_revision(self.next_revision);
        }
        let mut client = self.store.client.watch_client();
        self.store
            .call(client.watch(self.store.keys.apps(), Some(options)))
            .await
    }

    fn push(&mut self, event: &etcd_client::Event) {
        let Some(kv) = event.kv() else { return };
        let revision = kv.mod_revision();
        self.next_revision = self.next_revision.max(revision + 1);
        let apps = self.store.keys.apps();
        let Some(name) = Keys::strip(kv.key(), &apps) else {
            return;
        };
        let item = match event.event_type() {
            EventType::Put => self
                .store
                .parse_app(kv)
                .map(|spec| WatchEvent::AppPut { spec, revision }),
            EventType::Delete => Ok(WatchEvent::AppDeleted {
                name: name.to_owned(),
                revision,
            }),
        };
        self.pending.push_back(item);
    }
}
