//! The etcd backend: maps the `Store` trait onto etcd v3 transactions, ranges and watches.
//! Keys are used as given; revisions are etcd's own.

use std::collections::VecDeque;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, CompactionOptions, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, KvClient, Txn,
    TxnOp, TxnOpResponse, TxnResponse, WatchOptions, WatchStream,
};

use super::{Event, EventKind, EventStream, KeyValue, Result, Revision, Store, StoreError};

/// Keys per range request when listing, so a big list never exceeds gRPC message limits.
const LIST_PAGE: i64 = 1000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for etcd to report its compaction point after it answered "compacted".
const COMPACTION_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

const COMPACTED_MESSAGE: &str = "required revision has been compacted";
const FUTURE_MESSAGE: &str = "required revision is a future revision";

/// A store on an etcd cluster.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
}

impl EtcdStore {
    /// Connects to `endpoints` (`host:port` or `http://host:port`) and checks that etcd answers.
    pub async fn connect(endpoints: &[String]) -> Result<Self> {
        let options = ConnectOptions::new().with_connect_timeout(CONNECT_TIMEOUT);
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| backend(&format!("connect to {endpoints:?}"), e))?;
        let store = Self { client };
        tokio::time::timeout(CONNECT_TIMEOUT, store.current_revision())
            .await
            .map_err(|_| {
                StoreError::Backend(format!("etcd: no answer from {endpoints:?} within {CONNECT_TIMEOUT:?}"))
            })??;
        Ok(store)
    }

    fn kv(&self) -> KvClient {
        self.client.kv_client()
    }

    async fn txn(&self, txn: Txn, doing: &str) -> Result<TxnResponse> {
        self.kv().txn(txn).await.map_err(|e| backend(doing, e))
    }

    /// Turns etcd's "compacted" / "future revision" answers for `requested` into typed errors.
    async fn revision_error(&self, doing: &str, requested: Revision, error: etcd_client::Error) -> StoreError {
        let message = error.to_string();
        if message.contains(COMPACTED_MESSAGE) {
            let compacted = self.compaction_point().await.unwrap_or(requested + 1);
            StoreError::Compacted { requested, compacted }
        } else if message.contains(FUTURE_MESSAGE) {
            match self.current_revision().await {
                Ok(current) => StoreError::FutureRevision { requested, current },
                Err(error) => error,
            }
        } else {
            backend(doing, error)
        }
    }

    /// etcd reports its compaction point only to a watch that starts before it.
    async fn compaction_point(&self) -> Option<Revision> {
        let probe = async {
            let options = WatchOptions::new().with_start_revision(1);
            let mut watch = self
                .client
                .watch_client()
                .watch("\0weir-compaction-probe", Some(options))
                .await
                .ok()?;
            while let Some(response) = watch.message().await.ok()? {
                if response.compact_revision() > 0 {
                    return Some(response.compact_revision());
                }
            }
            None
        };
        tokio::time::timeout(COMPACTION_PROBE_TIMEOUT, probe)
            .await
            .ok()
            .flatten()
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn current_revision(&self) -> Result<Revision> {
        let response = self
            .kv()
            .get("/", Some(GetOptions::new().with_count_only()))
            .await
            .map_err(|e| backend("read revision", e))?;
        header_revision(response.header())
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let response = self.kv().get(key, None).await.map_err(|e| backend("get", e))?;
        response.kvs().first().map(key_value).transpose()
    }

    async fn list(&self, prefix: &str, revision: Option<Revision>) -> Result<(Vec<KeyValue>, Revision)> {
        let end = prefix_end(prefix.as_bytes());
        // etcd rejects an empty key; "\0" is the smallest one.
        let mut start = if prefix.is_empty() {
            vec![0]
        } else {
            prefix.as_bytes().to_vec()
        };
        let mut at = revision;
        let mut entries = Vec::new();
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(LIST_PAGE);
            if let Some(at) = at {
                options = options.with_revision(at);
            }
            let response = match self.kv().get(start.clone(), Some(options)).await {
                Ok(response) => response,
                Err(error) => return Err(self.revision_error("list", at.unwrap_or_default(), error).await),
            };
            // Pin every further page to the revision of the first one.
            let pinned = *at.get_or_insert(header_revision(response.header())?);
            for kv in response.kvs() {
                entries.push(key_value(kv)?);
            }
            match response.kvs().last() {
                Some(last) if response.more() => {
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => return Ok((entries, pinned)),
            }
        }
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Revision> {
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, None)]);
        let response = self.txn(txn, "create").await?;
        if !response.succeeded() {
            return Err(StoreError::AlreadyExists(key.to_owned()));
        }
        header_revision(response.header())
    }

    async fn update(&self, key: &str, value: Vec<u8>, expected: Revision) -> Result<Revision> {
        let txn = Txn::new()
            .when(guard(key, Some(expected)))
            .and_then([TxnOp::put(key, value, None)])
            .or_else([TxnOp::get(key, None)]);
        let response = self.txn(txn, "update").await?;
        if !response.succeeded() {
            return Err(guard_failure(key, expected, &response));
        }
        header_revision(response.header())
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(Revision, KeyValue)> {
        let txn = Txn::new()
            .when(guard(key, expected))
            .and_then([TxnOp::delete(key, Some(DeleteOptions::new().with_prev_key()))])
            .or_else([TxnOp::get(key, None)]);
        let response = self.txn(txn, "delete").await?;
        if !response.succeeded() {
            return Err(guard_failure(key, expected.unwrap_or_default(), &response));
        }
        let revision = header_revision(response.header())?;
        let deleted = response.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Delete(delete) => delete.prev_kvs().first().map(key_value),
            _ => None,
        });
        match deleted {
            Some(kv) => Ok((revision, kv?)),
            None => Err(StoreError::Backend(format!(
                "etcd: delete of {key} returned no previous value"
            ))),
        }
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<EventStream> {
        let start = after + 1;
        // A watch on a compacted revision would only say so in its stream; a range read at the
        // start revision answers up front. A future start is fine for a watch.
        let check = GetOptions::new().with_prefix().with_count_only().with_revision(start);
        if let Err(error) = self.kv().get(prefix, Some(check)).await {
            match self.revision_error("watch", start, error).await {
                StoreError::FutureRevision { .. } => {}
                error => return Err(error),
            }
        }
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(start)
            .with_prev_key();
        let stream = self
            .client
            .watch_client()
            .watch(prefix, Some(options))
            .await
            .map_err(|e| backend("watch", e))?;
        Ok(Box::pin(futures::stream::unfold(
            EtcdWatch {
                stream,
                pending: VecDeque::new(),
                next: start,
                finished: false,
            },
            EtcdWatch::next,
        )))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        let options = CompactionOptions::new().with_physical();
        match self.kv().compact(revision, Some(options)).await {
            Ok(_) => Ok(()),
            Err(error) => match self.revision_error("compact", revision, error).await {
                // Already compacted at or past `revision`: nothing left to do.
                StoreError::Compacted { .. } => Ok(()),
                error => Err(error),
            },
        }
    }
}

/// The comparisons of a guarded write: the key exists and, when given, has `expected` as its
/// mod_revision. (A missing key has mod_revision 0, so existence is checked separately.)
fn guard(key: &str, expected: Option<Revision>) -> Vec<Compare> {
    let mut compares = vec![Compare::version(key, CompareOp::Greater, 0)];
    compares.extend(expected.map(|expected| Compare::mod_revision(key, CompareOp::Equal, expected)));
    compares
}

/// Why a guarded write's comparisons failed, from the `get` in its else branch.
fn guard_failure(key: &str, expected: Revision, response: &TxnResponse) -> StoreError {
    let actual = response.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.mod_revision()),
        _ => None,
    });
    match actual {
        Some(actual) => StoreError::Conflict {
            key: key.to_owned(),
            expected,
            actual,
        },
        None => StoreError::NotFound(key.to_owned()),
    }
}

struct EtcdWatch {
    stream: WatchStream,
    pending: VecDeque<Result<Event>>,
    /// The revision the next event must have at least; reported when the watch is compacted.
    next: Revision,
    finished: bool,
}

impl EtcdWatch {
    async fn next(mut self) -> Option<(Result<Event>, Self)> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some((item, self));
            }
            if self.finished {
                return None;
            }
            self.finished = true;
            let response = match self.stream.message().await {
                Ok(Some(response)) => response,
                Ok(None) => return Some((Err(StoreError::Backend("etcd: watch stream ended".into())), self)),
                Err(error) => return Some((Err(backend("watch", error)), self)),
            };
            if response.compact_revision() > 0 {
                let compacted = StoreError::Compacted {
                    requested: self.next,
                    compacted: response.compact_revision(),
                };
                return Some((Err(compacted), self));
            }
            if response.canceled() {
                let reason = format!("etcd: watch canceled: {}", response.cancel_reason());
                return Some((Err(StoreError::Backend(reason)), self));
            }
            for event in response.events() {
                let event = convert_event(event);
                if let Ok(event) = &event {
                    self.next = event.kv.mod_revision + 1;
                }
                let failed = event.is_err();
                self.pending.push_back(event);
                if failed {
                    return self.pending.pop_front().map(|item| (item, self));
                }
            }
            self.finished = false;
        }
    }
}

fn convert_event(event: &etcd_client::Event) -> Result<Event> {
    let kv = event
        .kv()
        .ok_or_else(|| StoreError::Backend("etcd: watch event without a key".into()))?;
    let prev = event.prev_kv().map(key_value).transpose()?;
    match event.event_type() {
        EventType::Put => Ok(Event {
            kind: EventKind::Put,
            kv: key_value(kv)?,
            prev,
        }),
        EventType::Delete => {
            // etcd's delete event carries only the key and the deletion revision.
            let kv = KeyValue {
                key: key_string(kv.key())?,
                value: prev.as_ref().map(|p| p.value.clone()).unwrap_or_default(),
                create_revision: prev.as_ref().map_or(0, |p| p.create_revision),
                mod_revision: kv.mod_revision(),
            };
            Ok(Event {
                kind: EventKind::Delete,
                kv,
                prev,
            })
        }
    }
}

fn key_value(kv: &etcd_client::KeyValue) -> Result<KeyValue> {
    Ok(KeyValue {
        key: key_string(kv.key())?,
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
    })
}

fn key_string(key: &[u8]) -> Result<String> {
    String::from_utf8(key.to_vec()).map_err(|e| StoreError::Backend(format!("etcd: key is not UTF-8: {e}")))
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<Revision> {
    header
        .map(|h| h.revision())
        .ok_or_else(|| StoreError::Backend("etcd: response without a header".into()))
}

/// The first key after every key starting with `prefix` (etcd's `WithPrefix` range end).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // No upper bound: "\0" means "to the end of the keyspace".
    vec![0]
}

fn backend(doing: &str, error: etcd_client::Error) -> StoreError {
    StoreError::Backend(format!("etcd: {doing}: {error}"))
}
