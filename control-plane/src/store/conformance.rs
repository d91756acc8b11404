//! The one conformance suite for every `Store` backend: each case is an async fn over
//! `Arc<dyn Store>`, instantiated once per backend (`embedded::<case>`, `etcd::<case>`).
//! The etcd cases start a real etcd (`EtcdProcess`) and fail, never skip, when it is missing.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::embedded::EmbeddedStore;
use super::etcd::EtcdStore;
use super::etcd_process::EtcdProcess;
use super::{Event, EventKind, EventStream, KeyValue, Revision, Store, StoreError};

/// A store under test and whatever must outlive it (its temp dir, its etcd process).
struct Backend {
    store: Arc<dyn Store>,
    _resources: Box<dyn Any + Send>,
}

async fn embedded_backend() -> Backend {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(&dir.path().join("store.redb")).expect("open embedded store");
    Backend {
        store: Arc::new(store),
        _resources: Box::new(dir),
    }
}

async fn etcd_backend() -> Backend {
    let process = tokio::task::spawn_blocking(EtcdProcess::start)
        .await
        .expect("etcd start task")
        .unwrap_or_else(|e| panic!("cannot start etcd for the conformance suite: {e:#}"));
    let store = EtcdStore::connect(std::slice::from_ref(&process.endpoint))
        .await
        .expect("connect to etcd");
    Backend {
        store: Arc::new(store),
        _resources: Box::new(process),
    }
}

macro_rules! conformance_cases {
    ($($case:ident),+ $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let backend = super::embedded_backend().await;
                    super::$case(Arc::clone(&backend.store)).await;
                }
            )+
            use std::sync::Arc;
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let backend = super::etcd_backend().await;
                    super::$case(Arc::clone(&backend.store)).await;
                }
            )+
            use std::sync::Arc;
        }
    };
}

conformance_cases!(
    create_then_get_returns_the_value,
    create_of_existing_key_fails_with_already_exists,
    update_with_stale_revision_conflicts,
    update_of_missing_key_is_not_found,
    delete_is_guarded_by_revision,
    list_returns_prefix_sorted_without_sibling_prefixes,
    list_at_older_revision_sees_the_old_state,
    list_at_future_revision_fails,
    watch_replays_history_then_streams_live_events,
    watch_of_delete_carries_the_previous_value,
    compaction_makes_older_lists_and_watches_fail,
    revisions_increase_strictly_and_failed_writes_do_not_bump_them,
    concurrent_compare_and_swap_increments_are_never_lost,
);

const WAIT: Duration = Duration::from_secs(10);

async fn next_event(stream: &mut EventStream) -> Event {
    tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("no watch event within 10s")
        .expect("watch stream ended")
        .expect("watch stream error")
}

fn kv(key: &str, value: &str, create_revision: Revision, mod_revision: Revision) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: value.into(),
        create_revision,
        mod_revision,
    }
}

fn keys_and_values(entries: &[KeyValue]) -> Vec<(&str, &str)> {
    entries
        .iter()
        .map(|e| (e.key.as_str(), std::str::from_utf8(&e.value).expect("UTF-8 value")))
        .collect()
}

async fn create_then_get_returns_the_value(store: Arc<dyn Store>) {
    let key = "/registry/pods/default/web";
    let revision = store.create(key, b"v1".to_vec()).await.unwrap();
    assert_eq!(store.get(key).await.unwrap(), Some(kv(key, "v1", revision, revision)));
    assert_eq!(store.get("/registry/pods/default/other").await.unwrap(), None);
}

async fn create_of_existing_key_fails_with_already_exists(store: Arc<dyn Store>) {
    let key = "/registry/pods/default/web";
    let revision = store.create(key, b"v1".to_vec()).await.unwrap();
    let err = store.create(key, b"v2".to_vec()).await.unwrap_err();
    assert!(matches!(&err, StoreError::AlreadyExists(k) if k == key), "{err:?}");
    assert_eq!(store.get(key).await.unwrap(), Some(kv(key, "v1", revision, revision)));
}

async fn update_with_stale_revision_conflicts(store: Arc<dyn Store>) {
    let key = "/registry/pods/default/web";
    let created = store.create(key, b"v1".to_vec()).await.unwrap();
    let updated = store.update(key, b"v2".to_vec(), created).await.unwrap();
    assert!(updated > created);
    let err = store.update(key, b"v3".to_vec(), created).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict { key: k, expected, actual }
            if k == key && *expected == created && *actual == updated),
        "{err:?}"
    );
    assert_eq!(store.get(key).await.unwrap(), Some(kv(key, "v2", created, updated)));
}

async fn update_of_missing_key_is_not_found(store: Arc<dyn Store>) {
    let key = "/registry/pods/default/missing";
    for expected in [0, 1, 42] {
        let err = store.update(key, b"v".to_vec(), expected).await.unwrap_err();
        assert!(matches!(&err, StoreError::NotFound(k) if k == key), "{err:?}");
    }
    assert_eq!(store.get(key).await.unwrap(), None);
}

async fn delete_is_guarded_by_revision(store: Arc<dyn Store>) {
    let key = "/registry/pods/default/web";
    let created = store.create(key, b"v1".to_vec()).await.unwrap();
    let updated = store.update(key, b"v2".to_vec(), created).await.unwrap();

    let err = store.delete(key, Some(created)).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict { actual, .. } if actual == updated),
        "{err:?}"
    );
    assert!(store.get(key).await.unwrap().is_some());

    let (deleted_at, deleted) = store.delete(key, Some(updated)).await.unwrap();
    assert!(deleted_at > updated);
    assert_eq!(deleted, kv(key, "v2", created, updated));
    assert_eq!(store.get(key).await.unwrap(), None);

    let err = store.delete(key, None).await.unwrap_err();
    assert!(matches!(&err, StoreError::NotFound(k) if k == key), "{err:?}");
    let err = store.delete(key, Some(updated)).await.unwrap_err();
    assert!(matches!(&err, StoreError::NotFound(k) if k == key), "{err:?}");

    let other = "/registry/pods/default/unguarded";
    let created = store.create(other, b"x".to_vec()).await.unwrap();
    let (_, deleted) = store.delete(other, None).await.unwrap();
    assert_eq!(deleted, kv(other, "x", created, created));
}

async fn list_returns_prefix_sorted_without_sibling_prefixes(store: Arc<dyn Store>) {
    for key in [
        "/registry/pods/default/b",
        "/registry/podsx/default/a",
        "/registry/pods/default/a",
        "/registry/pod",
        "/registry/pods/kube-system/a",
    ] {
        store.create(key, key.as_bytes().to_vec()).await.unwrap();
    }
    let (entries, at) = store.list("/registry/pods/", None).await.unwrap();
    let keys: Vec<&str> = entries.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "/registry/pods/default/a",
            "/registry/pods/default/b",
            "/registry/pods/kube-system/a"
        ]
    );
    assert_eq!(at, store.current_revision().await.unwrap());

    let (entries, _) = store.list("/registry/pods/default/", None).await.unwrap();
    assert_eq!(entries.len(), 2);
    let (entries, _) = store.list("/registry/nodes/", None).await.unwrap();
    assert!(entries.is_empty());
}

async fn list_at_older_revision_sees_the_old_state(store: Arc<dyn Store>) {
    let (a, b, c) = ("/registry/pods/ns/a", "/registry/pods/ns/b", "/registry/pods/ns/c");
    let r1 = store.create(a, b"a1".to_vec()).await.unwrap();
    let r2 = store.create(b, b"b1".to_vec()).await.unwrap();
    let r3 = store.update(a, b"a2".to_vec(), r1).await.unwrap();
    let (r4, _) = store.delete(b, Some(r2)).await.unwrap();
    let r5 = store.create(c, b"c1".to_vec()).await.unwrap();
    store.create("/registry/podsx/ns/z", b"z".to_vec()).await.unwrap();

    let list_at = |revision| {
        let store = Arc::clone(&store);
        async move { store.list("/registry/pods/", Some(revision)).await.unwrap() }
    };
    assert_eq!(list_at(r1).await, (vec![kv(a, "a1", r1, r1)], r1));
    assert_eq!(list_at(r2).await, (vec![kv(a, "a1", r1, r1), kv(b, "b1", r2, r2)], r2));
    assert_eq!(list_at(r3).await, (vec![kv(a, "a2", r1, r3), kv(b, "b1", r2, r2)], r3));
    assert_eq!(list_at(r4).await, (vec![kv(a, "a2", r1, r3)], r4));
    assert_eq!(list_at(r5).await, (vec![kv(a, "a2", r1, r3), kv(c, "c1", r5, r5)], r5));
    let (latest, _) = store.list("/registry/pods/", None).await.unwrap();
    assert_eq!(latest, list_at(r5).await.0);
}

async fn list_at_future_revision_fails(store: Arc<dyn Store>) {
    store.create("/registry/pods/ns/a", b"a".to_vec()).await.unwrap();
    let current = store.current_revision().await.unwrap();
    let err = store.list("/registry/pods/", Some(current + 10)).await.unwrap_err();
    assert!(
        matches!(err, StoreError::FutureRevision { requested, current: c } if requested == current + 10 && c == current),
        "{err:?}"
    );
}

async fn watch_replays_history_then_streams_live_events(store: Arc<dyn Store>) {
    let key = "/registry/pods/ns/a";
    let before = store.current_revision().await.unwrap();
    let r1 = store.create(key, b"v1".to_vec()).await.unwrap();
    let r2 = store.update(key, b"v2".to_vec(), r1).await.unwrap();

    let mut from_start = store.watch("/registry/pods/", before).await.unwrap();
    let mut from_r1 = store.watch("/registry/pods/", r1).await.unwrap();

    let created = next_event(&mut from_start).await;
    assert_eq!(
        (created.kind, created.kv.clone(), created.prev),
        (EventKind::Put, kv(key, "v1", r1, r1), None)
    );
    let updated = next_event(&mut from_start).await;
    assert_eq!(updated.kind, EventKind::Put);
    assert_eq!(updated.kv, kv(key, "v2", r1, r2));
    assert_eq!(updated.prev, Some(kv(key, "v1", r1, r1)));
    assert_eq!(next_event(&mut from_r1).await, updated);

    // Live: a write under a sibling prefix is not seen, the next one under the prefix is.
    store.create("/registry/podsx/ns/z", b"z".to_vec()).await.unwrap();
    let other = "/registry/pods/ns/b";
    let r4 = store.create(other, b"b1".to_vec()).await.unwrap();
    for stream in [&mut from_start, &mut from_r1] {
        let live = next_event(stream).await;
        assert_eq!((live.kind, live.kv), (EventKind::Put, kv(other, "b1", r4, r4)));
    }
}

async fn watch_of_delete_carries_the_previous_value(store: Arc<dyn Store>) {
    let key = "/registry/pods/ns/a";
    let created = store.create(key, b"v1".to_vec()).await.unwrap();
    let updated = store.update(key, b"v2".to_vec(), created).await.unwrap();
    let mut stream = store.watch("/registry/pods/", updated).await.unwrap();
    let (deleted_at, _) = store.delete(key, None).await.unwrap();

    let event = next_event(&mut stream).await;
    assert_eq!(event.kind, EventKind::Delete);
    assert_eq!(event.kv.key, key);
    assert_eq!(event.kv.value, b"v2");
    assert_eq!(event.kv.mod_revision, deleted_at);
    assert_eq!(event.prev, Some(kv(key, "v2", created, updated)));
}

async fn compaction_makes_older_lists_and_watches_fail(store: Arc<dyn Store>) {
    let key = "/registry/pods/ns/a";
    let r1 = store.create(key, b"v1".to_vec()).await.unwrap();
    let r2 = store.update(key, b"v2".to_vec(), r1).await.unwrap();
    let r3 = store.update(key, b"v3".to_vec(), r2).await.unwrap();
    store.compact(r2).await.unwrap();

    let err = store.list("/registry/pods/", Some(r1)).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Compacted { requested, compacted } if requested == r1 && compacted == r2),
        "{err:?}"
    );
    let (entries, _) = store.list("/registry/pods/", Some(r2)).await.unwrap();
    assert_eq!(keys_and_values(&entries), [(key, "v2")]);

    let err = store
        .watch("/registry/pods/", r1 - 1)
        .await
        .err()
        .expect("watch before compaction");
    assert!(
        matches!(err, StoreError::Compacted { requested, compacted } if requested == r1 && compacted == r2),
        "{err:?}"
    );
    let mut stream = store.watch("/registry/pods/", r2 - 1).await.unwrap();
    assert_eq!(next_event(&mut stream).await.kv.mod_revision, r2);
    assert_eq!(next_event(&mut stream).await.kv.mod_revision, r3);

    // Compacting again at or below the compaction point changes nothing; the future is refused.
    store.compact(r1).await.unwrap();
    store.list("/registry/pods/", Some(r2)).await.unwrap();
    let err = store.compact(r3 + 100).await.unwrap_err();
    assert!(
        matches!(err, StoreError::FutureRevision { requested, .. } if requested == r3 + 100),
        "{err:?}"
    );
}

async fn revisions_increase_strictly_and_failed_writes_do_not_bump_them(store: Arc<dyn Store>) {
    let key = "/registry/pods/ns/a";
    let mut revisions = vec![store.current_revision().await.unwrap()];
    let created = store.create(key, b"v1".to_vec()).await.unwrap();
    revisions.push(created);
    revisions.push(store.update(key, b"v2".to_vec(), created).await.unwrap());
    revisions.push(store.create("/registry/pods/ns/b", b"b".to_vec()).await.unwrap());
    revisions.push(store.delete(key, None).await.unwrap().0);
    revisions.push(store.create(key, b"v3".to_vec()).await.unwrap());
    assert!(revisions.windows(2).all(|w| w[0] < w[1]), "{revisions:?}");
    let last = *revisions.last().unwrap();
    assert_eq!(store.current_revision().await.unwrap(), last);

    store.create(key, b"again".to_vec()).await.unwrap_err();
    store.update(key, b"stale".to_vec(), created).await.unwrap_err();
    store.delete("/registry/pods/ns/missing", None).await.unwrap_err();
    assert_eq!(store.current_revision().await.unwrap(), last);
    // A re-created key starts a new life.
    assert_eq!(store.get(key).await.unwrap().unwrap().create_revision, last);
}

async fn concurrent_compare_and_swap_increments_are_never_lost(store: Arc<dyn Store>) {
    const WRITERS: u64 = 8;
    const INCREMENTS: u64 = 25;
    let key = "/registry/counters/ns/shared";
    store.create(key, b"0".to_vec()).await.unwrap();

    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let mut conflicts = 0u64;
                for _ in 0..INCREMENTS {
                    loop {
                        let current = store.get(key).await.unwrap().expect("counter exists");
                        let count: u64 = std::str::from_utf8(&current.value).unwrap().parse().unwrap();
                        let next = (count + 1).to_string().into_bytes();
                        match store.update(key, next, current.mod_revision).await {
                            Ok(_) => break,
                            Err(StoreError::Conflict { .. }) => conflicts += 1,
                            Err(other) => panic!("increment failed: {other:?}"),
                        }
                    }
                }
                conflicts
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let counter = store.get(key).await.unwrap().unwrap();
    assert_eq!(counter.value, (WRITERS * INCREMENTS).to_string().into_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_reopen_keeps_data_revision_and_compaction_point() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let key = "/registry/pods/ns/a";
    let (r1, r2, r3) = {
        let store = EmbeddedStore::open(&path).unwrap();
        let r1 = store.create(key, b"v1".to_vec()).await.unwrap();
        let r2 = store.update(key, b"v2".to_vec(), r1).await.unwrap();
        let r3 = store.create("/registry/pods/ns/b", b"b".to_vec()).await.unwrap();
        store.compact(r2).await.unwrap();
        (r1, r2, r3)
    };

    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(store.current_revision().await.unwrap(), r3);
    assert_eq!(store.get(key).await.unwrap(), Some(kv(key, "v2", r1, r2)));
    let err = store.list("/registry/pods/", Some(r1)).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Compacted { compacted, .. } if compacted == r2),
        "{err:?}"
    );
    let (entries, _) = store.list("/registry/pods/", Some(r2)).await.unwrap();
    assert_eq!(keys_and_values(&entries), [(key, "v2")]);
    let r4 = store.create("/registry/pods/ns/c", b"c".to_vec()).await.unwrap();
    assert_eq!(r4, r3 + 1);
    let mut stream = store.watch("/registry/pods/", r2).await.unwrap();
    assert_eq!(next_event(&mut stream).await.kv.mod_revision, r3);
    assert_eq!(next_event(&mut stream).await.kv.mod_revision, r4);
}
