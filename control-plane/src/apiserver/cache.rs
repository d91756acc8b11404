//! The watch cache: every object under /registry kept in memory, fed by one store watch, and a
//! window of recent events so watches resume from a resourceVersion without touching the store.
//! Lists and watches are served from here; it never writes to the store.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use tokio::sync::{RwLock, broadcast, watch};

use crate::store::{EventKind, Revision, Store, StoreError};

/// How many recent events a watch can resume from.
const HISTORY: usize = 10_000;
const ROOT: &str = "/registry/";

/// A cached object and its JSON encoding (resourceVersion included), made once per write so
/// lists and watches copy bytes instead of serializing every object each time.
#[derive(Debug)]
pub struct Cached {
    pub value: Value,
    pub json: Vec<u8>,
}

impl Cached {
    pub fn new(value: Value) -> Cached {
        let json = serde_json::to_vec(&value).unwrap_or_default();
        Cached { value, json }
    }
}

impl std::ops::Deref for Cached {
    type Target = Value;
    fn deref(&self) -> &Value {
        &self.value
    }
}

pub type Object = Arc<Cached>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchType {
    Added,
    Modified,
    Deleted,
}

impl WatchType {
    pub fn as_str(self) -> &'static str {
        match self {
            WatchType::Added => "ADDED",
            WatchType::Modified => "MODIFIED",
            WatchType::Deleted => "DELETED",
        }
    }
}

#[derive(Debug)]
pub struct CacheEvent {
    pub kind: WatchType,
    pub key: String,
    /// The object with its resourceVersion set (for deletes: the last state, at the delete revision).
    pub object: Object,
    /// The previous state, for modifications (to tell when an object leaves a selection).
    pub prev: Option<Object>,
    pub revision: Revision,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Object>,
    history: VecDeque<Arc<CacheEvent>>,
    /// Events with revision > this are all in `history` (or none happened).
    window_start: Revision,
}

pub struct WatchCache {
    state: RwLock<State>,
    events: broadcast::Sender<Arc<CacheEvent>>,
    revision_tx: watch::Sender<Revision>,
    store: Arc<dyn Store>,
}

/// A snapshot of matching objects, taken atomically with a subscription to later events.
pub struct Subscription {
    pub initial: Vec<Object>,
    /// Events already past the requested revision (replayed before the live ones).
    pub replay: Vec<Arc<CacheEvent>>,
    pub live: broadcast::Receiver<Arc<CacheEvent>>,
    pub revision: Revision,
}

impl WatchCache {
    /// Fill the cache from the store and keep it current in a background task.
    pub async fn start(store: Arc<dyn Store>) -> Result<Arc<WatchCache>, StoreError> {
        let (items, revision) = store.list(ROOT, None).await?;
        let mut objects = BTreeMap::new();
        for kv in items {
            if let Some(obj) = decode(&kv.value, kv.mod_revision) {
                objects.insert(kv.key, Arc::new(obj));
            }
        }
        // Watchers that fall further behind than this are ended (410, relist). A burst of
        // 10,000 pods bound with their Events is ~30,000 events; the in-process controllers
        // must ride it out without relisting (which would only add load).
        let (events, _) = broadcast::channel(65_536);
        let (revision_tx, _) = watch::channel(revision);
        let cache = Arc::new(WatchCache {
            state: RwLock::new(State {
                objects,
                history: VecDeque::new(),
                window_start: revision,
            }),
            events,
            revision_tx,
            store,
        });
        tokio::spawn(cache.clone().follow(revision));
        Ok(cache)
    }

    async fn follow(self: Arc<Self>, mut revision: Revision) {
        loop {
            match self.store.watch(ROOT, revision).await {
                Ok(mut stream) => {
                    while let Some(event) = stream.next().await {
                        match event {
                            Ok(event) => {
                                revision = event.kv.mod_revision;
                                self.apply(event).await;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "watch cache: store watch failed; resuming");
                                break;
                            }
                        }
                    }
                }
                Err(StoreError::Compacted { .. }) => {
                    tracing::warn!(revision, "watch cache fell behind compaction; relisting");
                    if let Ok(next) = self.relist().await {
                        revision = next;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "watch cache: cannot watch the store; retrying"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Replace the whole cache from a fresh list (after losing the watch to compaction).
    async fn relist(&self) -> Result<Revision, StoreError> {
        let (items, revision) = self.store.list(ROOT, None).await?;
        let mut state = self.state.write().await;
        state.objects.clear();
        for kv in items {
            if let Some(obj) = decode(&kv.value, kv.mod_revision) {
                state.objects.insert(kv.key, Arc::new(obj));
            }
        }
        // Watchers cannot be resumed across the gap.
        state.history.clear();
        state.window_start = revision;
        self.revision_tx.send_replace(revision);
        Ok(revision)
    }

    async fn apply(&self, event: crate::store::Event) {
        let revision = event.kv.mod_revision;
        let mut state = self.state.write().await;
        let cache_event = match event.kind {
            EventKind::Put => {
                let Some(obj) = decode(&event.kv.value, revision) else {
                    return;
                };
                let obj = Arc::new(obj);
                let prev = state.objects.insert(event.kv.key.clone(), obj.clone());
                let kind = if prev.is_some() {
                    WatchType::Modified
                } else {
                    WatchType::Added
                };
                CacheEvent {
                    kind,
                    key: event.kv.key,
                    object: obj,
                    prev,
                    revision,
                }
            }
            EventKind::Delete => {
                let last = state.objects.remove(&event.kv.key);
                let value = event
                    .prev
                    .as_ref()
                    .map(|p| p.value.as_slice())
                    .unwrap_or(&event.kv.value);
                let object = decode(value, revision)
                    .map(Arc::new)
                    .or(last.map(|o| with_rv(&o, revision)));
                let Some(object) = object else { return };
                CacheEvent {
                    kind: WatchType::Deleted,
                    key: event.kv.key,
                    object,
                    prev: None,
                    revision,
                }
            }
        };
        let cache_event = Arc::new(cache_event);
        state.history.push_back(cache_event.clone());
        while state.history.len() > HISTORY {
            if let Some(old) = state.history.pop_front() {
                state.window_start = old.revision;
            }
        }
        // Sent under the write lock so subscribers see snapshot + events without gaps.
        let _ = self.events.send(cache_event);
        self.revision_tx.send_replace(revision);
    }

    pub fn revision(&self) -> Revision {
        *self.revision_tx.borrow()
    }

    /// Wait until the cache has seen `revision` (for consistent reads). False on timeout.
    pub async fn wait_for(&self, revision: Revision, timeout: Duration) -> bool {
        let mut rx = self.revision_tx.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r >= revision))
            .await
            .map(|r| r.is_ok())
            .unwrap_or(false)
    }

    /// Wait until the cache is as new as the store (a consistent read, as etcd quorum reads give).
    pub async fn sync(&self) -> Result<Revision, StoreError> {
        let current = self.store.current_revision().await?;
        if !self.wait_for(current, Duration::from_secs(5)).await {
            return Err(StoreError::Backend(
                "watch cache did not catch up with the store in 5s".into(),
            ));
        }
        Ok(self.revision())
    }

    pub async fn get(&self, key: &str) -> Option<Object> {
        self.state.read().await.objects.get(key).cloned()
    }

    /// Objects under `prefix` with keys after `start_after`, with the cache revision.
    pub async fn list(&self, prefix: &str, start_after: Option<&str>) -> (Vec<(String, Object)>, Revision) {
        let state = self.state.read().await;
        let range = match start_after {
            Some(after) => state
                .objects
                .range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
            None => state
                .objects
                .range::<str, _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded)),
        };
        let items = range
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        (items, self.revision())
    }

    /// Subscribe to changes under `prefix`. `after = None`: start with every current object as
    /// `initial`; `Some(rv)`: replay events after `rv` (410 Gone when outside the window).
    pub async fn subscribe(&self, prefix: &str, after: Option<Revision>) -> Result<Subscription, Revision> {
        let state = self.state.read().await;
        let live = self.events.subscribe();
        let revision = self.revision();
        match after {
            None => {
                let initial = state
                    .objects
                    .range::<str, _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded))
                    .take_while(|(k, _)| k.starts_with(prefix))
                    .map(|(_, v)| v.clone())
                    .collect();
                Ok(Subscription {
                    initial,
                    replay: Vec::new(),
                    live,
                    revision,
                })
            }
            Some(rv) if rv < state.window_start => Err(state.window_start),
            Some(rv) => {
                let replay = state
                    .history
                    .iter()
                    .filter(|e| e.revision > rv && e.key.starts_with(prefix))
                    .cloned()
                    .collect();
                Ok(Subscription {
                    initial: Vec::new(),
                    replay,
                    live,
                    revision,
                })
            }
        }
    }
}

fn decode(bytes: &[u8], revision: Revision) -> Option<Cached> {
    if bytes.first() != Some(&b'{') {
        // Not an API object (e.g. an allocation claim): not served, not an error.
        return None;
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(mut obj) => {
            set_resource_version(&mut obj, revision);
            Some(Cached::new(obj))
        }
        Err(e) => {
            tracing::error!(error = %e, "undecodable object in the store; skipped");
            None
        }
    }
}

fn with_rv(obj: &Value, revision: Revision) -> Object {
    let mut obj = obj.clone();
    set_resource_version(&mut obj, revision);
    Arc::new(Cached::new(obj))
}

pub fn set_resource_version(obj: &mut Value, revision: Revision) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), Value::String(revision.to_string()));
    }
}
