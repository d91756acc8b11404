//! The key-value store behind the API server: one trait, two backends (embedded redb, etcd).
//! Owns revisions, compare-and-swap, watch and compaction; knows nothing about Kubernetes objects.

use std::pin::Pin;

use async_trait::async_trait;
use futures::Stream;

pub mod embedded;
pub mod etcd;
pub mod etcd_process;

/// A store revision. Every write bumps it by one; it doubles as the Kubernetes resourceVersion.
pub type Revision = i64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the write that created this key (since its last deletion).
    pub create_revision: Revision,
    /// Revision of the last write to this key.
    pub mod_revision: Revision,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// For Put: the new key-value. For Delete: the key with the value it had before deletion,
    /// and `mod_revision` set to the deletion revision.
    pub kv: KeyValue,
    /// The previous value (Put over an existing key, and Delete), when known.
    pub prev: Option<KeyValue>,
}

pub type EventStream = Pin<Box<dyn Stream<Item = Result<Event, StoreError>> + Send>>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("key {0} already exists")]
    AlreadyExists(String),
    #[error("key {0} not found")]
    NotFound(String),
    /// Compare-and-swap failed: the key's mod_revision is not the expected one.
    #[error("key {key} was modified (expected revision {expected}, found {actual})")]
    Conflict {
        key: String,
        expected: Revision,
        actual: Revision,
    },
    /// The requested revision has been compacted away.
    #[error("revision {requested} has been compacted (oldest available is {compacted})")]
    Compacted { requested: Revision, compacted: Revision },
    /// The requested revision is newer than the store's current one.
    #[error("revision {requested} is in the future (current is {current})")]
    FutureRevision { requested: Revision, current: Revision },
    #[error("store backend error: {0}")]
    Backend(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// One trait for every backend; the conformance suite in `store::conformance` runs against each.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The latest revision (0 for an empty, never-written store).
    async fn current_revision(&self) -> Result<Revision>;

    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// All keys starting with `prefix`, sorted by key, as of `revision` (None = latest).
    /// Returns the entries and the revision they were read at.
    async fn list(&self, prefix: &str, revision: Option<Revision>) -> Result<(Vec<KeyValue>, Revision)>;

    /// Create `key` only if absent. Returns the new revision.
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Revision>;

    /// Replace `key` only if its mod_revision is `expected`. Returns the new revision.
    async fn update(&self, key: &str, value: Vec<u8>, expected: Revision) -> Result<Revision>;

    /// Delete `key`, guarded by `expected` mod_revision when given. Returns the deletion
    /// revision and the deleted value.
    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(Revision, KeyValue)>;

    /// Events under `prefix` with revision > `after`, in revision order, then live events.
    /// Fails with `Compacted` when `after` + 1 is older than the compaction point.
    async fn watch(&self, prefix: &str, after: Revision) -> Result<EventStream>;

    /// Discard history older than `revision`; reads and watches before it answer `Compacted`.
    async fn compact(&self, revision: Revision) -> Result<()>;
}

#[cfg(test)]
mod conformance;
