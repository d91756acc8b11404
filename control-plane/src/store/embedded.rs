//! The embedded backend: one redb file, written by a single group-committing thread, with an
//! event log that serves old-revision lists and watches. Knows nothing about Kubernetes objects.
//!
//! Layout: `keys` maps a key to its live record, `log` maps every revision to the event written
//! at it (with the previous value, so a list at an older revision undoes newer events over the
//! current state), `meta` holds the revision counter and the compaction point. One revision is
//! one event, so the log is gap-free above the compaction point.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use async_trait::async_trait;
use redb::{Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, Table, TableDefinition};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use super::{Event, EventKind, EventStream, KeyValue, Result, Revision, Store, StoreError};

const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
const LOG: TableDefinition<i64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
const META_REVISION: &str = "revision";
const META_COMPACTED: &str = "compacted";

/// Most operations one write transaction applies; bounds the latency of a commit.
const MAX_BATCH: usize = 4096;
/// Committed batches buffered for live watchers; a watcher further behind catches up from the log.
const BROADCAST_BATCHES: usize = 1024;
/// Events buffered between a watcher's task and its consumer.
const WATCH_BUFFER: usize = 1024;
/// Log entries one catch-up read scans before handing its events to the watcher.
const CATCH_UP_CHUNK: usize = 4096;

/// A store in one redb file. Every acknowledged write has been committed with immediate
/// durability (fsync); concurrent writes share commits.
pub struct EmbeddedStore {
    db: Arc<Database>,
    writer: Option<mpsc::UnboundedSender<WriteRequest>>,
    writer_thread: Option<JoinHandle<()>>,
    commits: broadcast::Sender<Arc<CommittedBatch>>,
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path`, e.g. `<data-dir>/store.redb`.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with_broadcast(path, BROADCAST_BATCHES)
    }

    fn open_with_broadcast(path: &Path, broadcast_batches: usize) -> Result<Self> {
        let db = Database::create(path).or_backend("open database")?;
        let txn = db.begin_write().or_backend("begin initial write")?;
        let (revision, compacted) = {
            txn.open_table(KEYS).or_backend("create keys table")?;
            txn.open_table(LOG).or_backend("create log table")?;
            let meta = txn.open_table(META).or_backend("create meta table")?;
            (
                read_meta(&meta, META_REVISION).or_backend("read revision")?,
                read_meta(&meta, META_COMPACTED).or_backend("read compaction point")?,
            )
        };
        txn.commit().or_backend("commit initial write")?;

        let db = Arc::new(db);
        let (writer, requests) = mpsc::unbounded_channel();
        let (commits, _) = broadcast::channel(broadcast_batches);
        let mut group_writer = GroupWriter {
            db: Arc::clone(&db),
            requests,
            commits: commits.clone(),
            revision,
            compacted,
        };
        let writer_thread = std::thread::Builder::new()
            .name("weir-store-writer".into())
            .spawn(move || group_writer.run())
            .map_err(|e| StoreError::Backend(format!("embedded store: start writer: {e}")))?;
        Ok(Self {
            db,
            writer: Some(writer),
            writer_thread: Some(writer_thread),
            commits,
        })
    }

    async fn submit(&self, op: WriteOp) -> Result<Outcome> {
        let (reply, answer) = oneshot::channel();
        let stopped = || StoreError::Backend("embedded store: writer stopped".into());
        self.writer
            .as_ref()
            .ok_or_else(stopped)?
            .send(WriteRequest { op, reply })
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    async fn read<T, F>(&self, read: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || read(&db))
            .await
            .map_err(|e| StoreError::Backend(format!("embedded store: read task: {e}")))?
    }
}

impl Drop for EmbeddedStore {
    /// Stops the writer and waits for it, so the file can be reopened as soon as this returns.
    fn drop(&mut self) {
        self.writer.take();
        if let Some(thread) = self.writer_thread.take() {
            let _ = thread.join();
        }
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn current_revision(&self) -> Result<Revision> {
        self.read(|db| Ok(Snapshot::begin(db)?.revision)).await
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let key = key.to_owned();
        self.read(move |db| {
            let txn = db.begin_read().or_backend("begin read")?;
            let keys = txn.open_table(KEYS).or_backend("open keys")?;
            let record = keys.get(key.as_str()).or_backend("get")?;
            record
                .map(|record| decode_record(&key, record.value()))
                .transpose()
                .or_backend("decode record")
        })
        .await
    }

    async fn list(&self, prefix: &str, revision: Option<Revision>) -> Result<(Vec<KeyValue>, Revision)> {
        let prefix = prefix.to_owned();
        self.read(move |db| Snapshot::begin(db)?.list(&prefix, revision)).await
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Revision> {
        match self
            .submit(WriteOp::Create {
                key: key.to_owned(),
                value,
            })
            .await?
        {
            Outcome::Written(revision) => Ok(revision),
            other => Err(other.unexpected()),
        }
    }

    async fn update(&self, key: &str, value: Vec<u8>, expected: Revision) -> Result<Revision> {
        let op = WriteOp::Update {
            key: key.to_owned(),
            value,
            expected,
        };
        match self.submit(op).await? {
            Outcome::Written(revision) => Ok(revision),
            other => Err(other.unexpected()),
        }
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(Revision, KeyValue)> {
        match self
            .submit(WriteOp::Delete {
                key: key.to_owned(),
                expected,
            })
            .await?
        {
            Outcome::Deleted(revision, kv) => Ok((revision, kv)),
            other => Err(other.unexpected()),
        }
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<EventStream> {
        // Subscribe before reading the log: every commit is then either in the log snapshot the
        // watcher reads next or broadcast to it afterwards (or both; duplicates are dropped by
        // revision).
        let commits = self.commits.subscribe();
        let compacted = self.read(|db| Ok(Snapshot::begin(db)?.compacted)).await?;
        if after.saturating_add(1) < compacted {
            return Err(StoreError::Compacted {
                requested: after + 1,
                compacted,
            });
        }
        let (events, stream) = mpsc::channel(WATCH_BUFFER);
        let watcher = Watcher {
            db: Arc::downgrade(&self.db),
            prefix: prefix.to_owned(),
            last: after,
            events,
        };
        tokio::spawn(watcher.run(commits));
        Ok(Box::pin(ReceiverStream::new(stream)))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        match self.submit(WriteOp::Compact { revision }).await? {
            Outcome::Compacted => Ok(()),
            other => Err(other.unexpected()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Writes: one thread applies every pending operation in one transaction and commits once.

enum WriteOp {
    Create {
        key: String,
        value: Vec<u8>,
    },
    Update {
        key: String,
        value: Vec<u8>,
        expected: Revision,
    },
    Delete {
        key: String,
        expected: Option<Revision>,
    },
    Compact {
        revision: Revision,
    },
}

enum Outcome {
    Written(Revision),
    Deleted(Revision, KeyValue),
    Compacted,
}

impl Outcome {
    fn unexpected(self) -> StoreError {
        StoreError::Backend("embedded store: writer answered with the wrong outcome".into())
    }
}

struct WriteRequest {
    op: WriteOp,
    reply: oneshot::Sender<Result<Outcome>>,
}

/// The events of one commit; their revisions are consecutive.
struct CommittedBatch {
    events: Vec<Event>,
}

impl CommittedBatch {
    fn first_revision(&self) -> Revision {
        self.events.first().map_or(0, |e| e.kv.mod_revision)
    }

    fn last_revision(&self) -> Revision {
        self.events.last().map_or(0, |e| e.kv.mod_revision)
    }
}

struct GroupWriter {
    db: Arc<Database>,
    requests: mpsc::UnboundedReceiver<WriteRequest>,
    commits: broadcast::Sender<Arc<CommittedBatch>>,
    /// Latest committed revision.
    revision: Revision,
    /// Oldest revision still readable.
    compacted: Revision,
}

impl GroupWriter {
    fn run(&mut self) {
        while let Some(first) = self.requests.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match self.requests.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            self.commit(batch);
        }
    }

    /// Applies `batch` in one transaction and answers every caller once it is durable (or failed).
    fn commit(&mut self, batch: Vec<WriteRequest>) {
        let (revision, compacted) = (self.revision, self.compacted);
        let mut events = Vec::new();
        match self.apply_batch(&batch, &mut events) {
            Ok(outcomes) => {
                if !events.is_empty() {
                    // No receivers is fine: nobody watches.
                    let _ = self.commits.send(Arc::new(CommittedBatch { events }));
                }
                for (request, outcome) in batch.into_iter().zip(outcomes) {
                    let _ = request.reply.send(outcome);
                }
            }
            Err(error) => {
                self.revision = revision;
                self.compacted = compacted;
                tracing::error!(%error, operations = batch.len(), "embedded store commit failed");
                for request in batch {
                    let message = format!("embedded store: commit: {error}");
                    let _ = request.reply.send(Err(StoreError::Backend(message)));
                }
            }
        }
    }

    /// Applies each operation on its own terms (a failed check fails only that operation); an
    /// `Err` is a storage failure that aborts the whole batch.
    fn apply_batch(
        &mut self,
        batch: &[WriteRequest],
        events: &mut Vec<Event>,
    ) -> Result<Vec<Result<Outcome>>, redb::Error> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut changed = false;
        {
            let mut keys = txn.open_table(KEYS)?;
            let mut log = txn.open_table(LOG)?;
            for request in batch {
                let outcome = self.apply(&mut keys, &mut log, &request.op, events)?;
                changed |= outcome.is_ok();
                outcomes.push(outcome);
            }
            if changed {
                let mut meta = txn.open_table(META)?;
                meta.insert(META_REVISION, self.revision)?;
                meta.insert(META_COMPACTED, self.compacted)?;
            }
        }
        if changed {
            txn.commit()?;
        } else {
            txn.abort()?;
        }
        Ok(outcomes)
    }

    fn apply(
        &mut self,
        keys: &mut Table<&str, &[u8]>,
        log: &mut Table<i64, &[u8]>,
        op: &WriteOp,
        events: &mut Vec<Event>,
    ) -> Result<Result<Outcome>, redb::Error> {
        let current = |keys: &Table<&str, &[u8]>, key: &str| -> Result<_, redb::Error> {
            let record = keys.get(key)?;
            record.map(|r| decode_record(key, r.value())).transpose()
        };
        let event = match op {
            WriteOp::Create { key, value } => {
                if current(&*keys, key)?.is_some() {
                    return Ok(Err(StoreError::AlreadyExists(key.clone())));
                }
                let revision = self.revision + 1;
                let kv = KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                    create_revision: revision,
                    mod_revision: revision,
                };
                Event {
                    kind: EventKind::Put,
                    kv,
                    prev: None,
                }
            }
            WriteOp::Update { key, value, expected } => {
                let Some(prev) = current(&*keys, key)? else {
                    return Ok(Err(StoreError::NotFound(key.clone())));
                };
                if prev.mod_revision != *expected {
                    return Ok(Err(conflict(key, *expected, prev.mod_revision)));
                }
                let kv = KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                    create_revision: prev.create_revision,
                    mod_revision: self.revision + 1,
                };
                Event {
                    kind: EventKind::Put,
                    kv,
                    prev: Some(prev),
                }
            }
            WriteOp::Delete { key, expected } => {
                let Some(prev) = current(&*keys, key)? else {
                    return Ok(Err(StoreError::NotFound(key.clone())));
                };
                if let Some(expected) = expected
                    && prev.mod_revision != *expected
                {
                    return Ok(Err(conflict(key, *expected, prev.mod_revision)));
                }
                let kv = KeyValue {
                    mod_revision: self.revision + 1,
                    ..prev.clone()
                };
                Event {
                    kind: EventKind::Delete,
                    kv,
                    prev: Some(prev),
                }
            }
            WriteOp::Compact { revision } => {
                if *revision > self.revision {
                    return Ok(Err(StoreError::FutureRevision {
                        requested: *revision,
                        current: self.revision,
                    }));
                }
                if *revision > self.compacted {
                    log.retain_in(..*revision, |_, _| false)?;
                    self.compacted = *revision;
                }
                return Ok(Ok(Outcome::Compacted));
            }
        };

        let revision = event.kv.mod_revision;
        match event.kind {
            EventKind::Put => {
                let record = encode_record(event.kv.create_revision, revision, &event.kv.value);
                keys.insert(event.kv.key.as_str(), record.as_slice())?;
            }
            EventKind::Delete => {
                keys.remove(event.kv.key.as_str())?;
            }
        }
        log.insert(revision, encode_event(&event).as_slice())?;
        self.revision = revision;
        let outcome = match (event.kind, &event.prev) {
            (EventKind::Delete, Some(prev)) => Outcome::Deleted(revision, prev.clone()),
            _ => Outcome::Written(revision),
        };
        events.push(event);
        Ok(Ok(outcome))
    }
}

fn conflict(key: &str, expected: Revision, actual: Revision) -> StoreError {
    StoreError::Conflict {
        key: key.to_owned(),
        expected,
        actual,
    }
}

// ---------------------------------------------------------------------------------------------
// Reads: one redb read transaction is one consistent snapshot of keys, log and meta.

struct Snapshot {
    txn: ReadTransaction,
    revision: Revision,
    compacted: Revision,
}

impl Snapshot {
    fn begin(db: &Database) -> Result<Self> {
        let txn = db.begin_read().or_backend("begin read")?;
        let meta = txn.open_table(META).or_backend("open meta")?;
        let revision = read_meta(&meta, META_REVISION).or_backend("read revision")?;
        let compacted = read_meta(&meta, META_COMPACTED).or_backend("read compaction point")?;
        drop(meta);
        Ok(Self {
            txn,
            revision,
            compacted,
        })
    }

    fn list(&self, prefix: &str, revision: Option<Revision>) -> Result<(Vec<KeyValue>, Revision)> {
        let at = revision.unwrap_or(self.revision);
        if at > self.revision {
            return Err(StoreError::FutureRevision {
                requested: at,
                current: self.revision,
            });
        }
        if at < self.compacted {
            return Err(StoreError::Compacted {
                requested: at,
                compacted: self.compacted,
            });
        }
        let keys = self.txn.open_table(KEYS).or_backend("open keys")?;
        let mut live = Vec::new();
        for entry in keys.range(prefix..).or_backend("range keys")? {
            let (key, record) = entry.or_backend("read key")?;
            if !key.value().starts_with(prefix) {
                break;
            }
            live.push(decode_record(key.value(), record.value()).or_backend("decode record")?);
        }
        if at == self.revision {
            return Ok((live, at));
        }

        // Undo the events newer than `at`, newest first.
        let mut state: BTreeMap<String, KeyValue> = live.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
        let log = self.txn.open_table(LOG).or_backend("open log")?;
        for entry in log.range(at + 1..=self.revision).or_backend("range log")?.rev() {
            let (revision, bytes) = entry.or_backend("read log")?;
            if !event_key(bytes.value()).or_backend("decode event")?.starts_with(prefix) {
                continue;
            }
            let event = decode_event(revision.value(), bytes.value()).or_backend("decode event")?;
            match (event.kind, event.prev) {
                (_, Some(prev)) => {
                    state.insert(prev.key.clone(), prev);
                }
                (EventKind::Put, None) => {
                    state.remove(&event.kv.key);
                }
                (EventKind::Delete, None) => {
                    return Err(StoreError::Backend(format!(
                        "embedded store: delete event at revision {} has no previous value",
                        event.kv.mod_revision
                    )));
                }
            }
        }
        Ok((state.into_values().collect(), at))
    }

    /// Events under `prefix` with revision > `after`, scanning at most `CATCH_UP_CHUNK` log
    /// entries. Also returns the revision scanned up to and whether that is this snapshot's end.
    fn events_after(&self, prefix: &str, after: Revision) -> Result<(Vec<Event>, Revision, bool)> {
        if after.saturating_add(1) < self.compacted {
            return Err(StoreError::Compacted {
                requested: after + 1,
                compacted: self.compacted,
            });
        }
        if after >= self.revision {
            return Ok((Vec::new(), self.revision, true));
        }
        let log = self.txn.open_table(LOG).or_backend("open log")?;
        let mut events = Vec::new();
        let mut scanned = after;
        for entry in log
            .range(after + 1..=self.revision)
            .or_backend("range log")?
            .take(CATCH_UP_CHUNK)
        {
            let (revision, bytes) = entry.or_backend("read log")?;
            scanned = revision.value();
            if event_key(bytes.value()).or_backend("decode event")?.starts_with(prefix) {
                events.push(decode_event(scanned, bytes.value()).or_backend("decode event")?);
            }
        }
        Ok((events, scanned, scanned == self.revision))
    }
}

fn read_meta(meta: &impl ReadableTable<&'static str, i64>, name: &str) -> Result<i64, redb::Error> {
    Ok(meta.get(name)?.map_or(0, |v| v.value()))
}

// ---------------------------------------------------------------------------------------------
// Watches: replay the log after the requested revision, then follow the commit broadcast.

struct Watcher {
    /// Weak, so a forgotten watch does not keep the database file open after the store is gone.
    db: Weak<Database>,
    prefix: String,
    /// Highest revision already examined (delivered or filtered out).
    last: Revision,
    events: mpsc::Sender<Result<Event>>,
}

impl Watcher {
    async fn run(mut self, mut commits: broadcast::Receiver<Arc<CommittedBatch>>) {
        if !self.catch_up().await {
            return;
        }
        loop {
            let received = tokio::select! {
                _ = self.events.closed() => return,
                received = commits.recv() => received,
            };
            let delivered = match received {
                Ok(batch) if batch.last_revision() <= self.last => true,
                Ok(batch) if batch.first_revision() <= self.last + 1 => self.deliver(&batch).await,
                // A gap (should not happen) or a lagging consumer: the log has what was missed.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => self.catch_up().await,
                Err(broadcast::error::RecvError::Closed) => {
                    let closed = StoreError::Backend("embedded store closed".into());
                    let _ = self.events.send(Err(closed)).await;
                    return;
                }
            };
            if !delivered {
                return;
            }
        }
    }

    async fn deliver(&mut self, batch: &CommittedBatch) -> bool {
        for event in &batch.events {
            if event.kv.mod_revision > self.last
                && event.kv.key.starts_with(&self.prefix)
                && self.events.send(Ok(event.clone())).await.is_err()
            {
                return false;
            }
        }
        self.last = self.last.max(batch.last_revision());
        true
    }

    /// Sends every logged event after `self.last`; false when the watch is over.
    async fn catch_up(&mut self) -> bool {
        loop {
            let Some(db) = self.db.upgrade() else {
                let closed = StoreError::Backend("embedded store closed".into());
                let _ = self.events.send(Err(closed)).await;
                return false;
            };
            let (prefix, after) = (self.prefix.clone(), self.last);
            let read = tokio::task::spawn_blocking(move || Snapshot::begin(&db)?.events_after(&prefix, after))
                .await
                .unwrap_or_else(|e| Err(StoreError::Backend(format!("embedded store: watch read: {e}"))));
            let (events, scanned, done) = match read {
                Ok(read) => read,
                Err(error) => {
                    let _ = self.events.send(Err(error)).await;
                    return false;
                }
            };
            for event in events {
                if self.events.send(Ok(event)).await.is_err() {
                    return false;
                }
            }
            self.last = self.last.max(scanned);
            if done {
                return true;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding. A record is `create_revision | mod_revision | value`; a log entry is
// `kind | key length | key | previous record length (u32::MAX: none) | previous record | value`,
// keyed by its revision. Integers are little-endian.

const PUT: u8 = 0;
const DELETE: u8 = 1;
const NO_PREVIOUS: u32 = u32::MAX;

fn encode_record(create_revision: Revision, mod_revision: Revision, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + value.len());
    out.extend_from_slice(&create_revision.to_le_bytes());
    out.extend_from_slice(&mod_revision.to_le_bytes());
    out.extend_from_slice(value);
    out
}

fn decode_record(key: &str, bytes: &[u8]) -> Result<KeyValue, redb::Error> {
    let mut reader = Reader(bytes);
    Ok(KeyValue {
        key: key.to_owned(),
        create_revision: reader.i64()?,
        mod_revision: reader.i64()?,
        value: reader.0.to_vec(),
    })
}

fn encode_event(event: &Event) -> Vec<u8> {
    let key = event.kv.key.as_bytes();
    let prev = event
        .prev
        .as_ref()
        .map(|p| encode_record(p.create_revision, p.mod_revision, &p.value));
    // A delete's value is its previous value: not stored twice.
    let value: &[u8] = match event.kind {
        EventKind::Put => &event.kv.value,
        EventKind::Delete => &[],
    };
    let mut out = Vec::with_capacity(9 + key.len() + prev.as_ref().map_or(0, Vec::len) + value.len());
    out.push(match event.kind {
        EventKind::Put => PUT,
        EventKind::Delete => DELETE,
    });
    out.extend_from_slice(&u32::try_from(key.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(key);
    match &prev {
        Some(prev) => {
            out.extend_from_slice(&u32::try_from(prev.len()).unwrap_or(u32::MAX).to_le_bytes());
            out.extend_from_slice(prev);
        }
        None => out.extend_from_slice(&NO_PREVIOUS.to_le_bytes()),
    }
    out.extend_from_slice(value);
    out
}

fn event_key(bytes: &[u8]) -> Result<&str, redb::Error> {
    let mut reader = Reader(bytes);
    reader.take(1)?;
    reader.str()
}

fn decode_event(revision: Revision, bytes: &[u8]) -> Result<Event, redb::Error> {
    let mut reader = Reader(bytes);
    let kind = match reader.take(1)?[0] {
        PUT => EventKind::Put,
        DELETE => EventKind::Delete,
        other => return Err(corrupted(format!("unknown event kind {other}"))),
    };
    let key = reader.str()?;
    let prev = match reader.u32()? {
        NO_PREVIOUS => None,
        len => Some(decode_record(key, reader.take(len as usize)?)?),
    };
    let kv = match (kind, &prev) {
        (EventKind::Put, _) => KeyValue {
            key: key.to_owned(),
            value: reader.0.to_vec(),
            create_revision: prev.as_ref().map_or(revision, |p| p.create_revision),
            mod_revision: revision,
        },
        (EventKind::Delete, Some(prev)) => KeyValue {
            mod_revision: revision,
            ..prev.clone()
        },
        (EventKind::Delete, None) => {
            return Err(corrupted(format!(
                "delete at revision {revision} without previous value"
            )));
        }
    };
    Ok(Event { kind, kv, prev })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], redb::Error> {
        if self.0.len() < len {
            return Err(corrupted(format!(
                "truncated entry: need {len} bytes, have {}",
                self.0.len()
            )));
        }
        let (head, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, redb::Error> {
        let bytes = self.take(4)?;
        Ok(u32::from_le_bytes(bytes.try_into().expect("took 4 bytes")))
    }

    fn i64(&mut self) -> Result<i64, redb::Error> {
        let bytes = self.take(8)?;
        Ok(i64::from_le_bytes(bytes.try_into().expect("took 8 bytes")))
    }

    fn str(&mut self) -> Result<&'a str, redb::Error> {
        let len = self.u32()? as usize;
        std::str::from_utf8(self.take(len)?).map_err(|e| corrupted(format!("key is not UTF-8: {e}")))
    }
}

fn corrupted(message: String) -> redb::Error {
    redb::Error::Corrupted(format!("weir store entry: {message}"))
}

/// Maps a redb failure to `StoreError::Backend`, naming what was being done.
trait OrBackend<T> {
    fn or_backend(self, doing: &str) -> Result<T>;
}

impl<T, E: Into<redb::Error>> OrBackend<T> for std::result::Result<T, E> {
    fn or_backend(self, doing: &str) -> Result<T> {
        self.map_err(|e| StoreError::Backend(format!("embedded store: {doing}: {}", e.into())))
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use futures::StreamExt;

    use super::*;

    async fn create_concurrently(store: &Arc<EmbeddedStore>, callers: usize, per_caller: usize) -> Vec<Revision> {
        let tasks: Vec<_> = (0..callers)
            .map(|caller| {
                let store = Arc::clone(store);
                tokio::spawn(async move {
                    let mut revisions = Vec::with_capacity(per_caller);
                    for i in 0..per_caller {
                        let key = format!("/registry/pods/ns/{caller}-{i}");
                        revisions.push(store.create(&key, vec![0; 256]).await.unwrap());
                    }
                    revisions
                })
            })
            .collect();
        let mut revisions = Vec::new();
        for task in tasks {
            revisions.extend(task.await.unwrap());
        }
        revisions.sort_unstable();
        revisions
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_creates_get_consecutive_distinct_revisions() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open(&dir.path().join("store.redb")).unwrap());
        let revisions = create_concurrently(&store, 32, 20).await;
        assert_eq!(revisions, (1..=640).collect::<Vec<_>>());
        assert_eq!(store.current_revision().await.unwrap(), 640);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lagging_watcher_catches_up_from_the_log_without_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedStore::open_with_broadcast(&dir.path().join("store.redb"), 2).unwrap());
        let mut stream = store.watch("/registry/pods/", 0).await.unwrap();
        // Nobody reads the stream while far more than its buffer and the broadcast hold is written.
        let total = create_concurrently(&store, 16, 150).await.len();
        assert!(total > WATCH_BUFFER + 2);
        let mut expected = 1;
        while expected <= total as Revision {
            let event = tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await
                .expect("event within 10s")
                .expect("stream open")
                .expect("no error");
            assert_eq!(event.kv.mod_revision, expected);
            expected += 1;
        }
        let live = store.create("/registry/pods/ns/live", b"x".to_vec()).await.unwrap();
        let event = stream.next().await.unwrap().unwrap();
        assert_eq!(event.kv.mod_revision, live);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropped_store_ends_its_watches_and_releases_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let store = EmbeddedStore::open(&path).unwrap();
        let mut stream = store.watch("/", 0).await.unwrap();
        drop(store);
        let ended = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap();
        assert!(matches!(ended, Some(Err(StoreError::Backend(_))) | None), "{ended:?}");
        EmbeddedStore::open(&path).unwrap();
    }

    /// `cargo test -p weir-control-plane --release create_rate -- --ignored --nocapture`
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "measurement; prints the durable create rate"]
    async fn create_rate_with_concurrent_callers() {
        let dir = tempfile::tempdir().unwrap();
        for callers in [1, 16, 64, 256] {
            let store = Arc::new(EmbeddedStore::open(&dir.path().join(format!("{callers}.redb"))).unwrap());
            let per_caller = 4000 / callers;
            let started = Instant::now();
            let created = create_concurrently(&store, callers, per_caller).await.len();
            let rate = created as f64 / started.elapsed().as_secs_f64();
            println!(
                "{callers:>4} callers: {created} durable creates in {:?} = {rate:.0}/s",
                started.elapsed()
            );
        }
    }
}
