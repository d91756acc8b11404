//! Optimistic concurrency under contention: many kube-rs clients doing read-modify-write on one
//! object with retry on 409 Conflict lose no update, on both stores.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use weir_tests::{Backend, TestServer};

const WRITERS: usize = 8;
const INCREMENTS_PER_WRITER: usize = 25;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_increments_are_all_kept_on_embedded_store() -> Result<()> {
    concurrent_increments(Backend::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_increments_are_all_kept_on_etcd() -> Result<()> {
    concurrent_increments(Backend::Etcd).await
}

async fn concurrent_increments(backend: Backend) -> Result<()> {
    let server = TestServer::start(backend).await?;
    let client = server
        .kube_client()
        .await
        .context("kube client from admin.kubeconfig")?;
    let config_maps: Api<ConfigMap> = Api::namespaced(client, "default");
    let mut counter = ConfigMap::default();
    counter.metadata.name = Some("counter".into());
    counter.data = Some([("count".to_string(), "0".to_string())].into());
    config_maps.create(&PostParams::default(), &counter).await?;

    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let config_maps = config_maps.clone();
            tokio::spawn(async move { increment_many(&config_maps, INCREMENTS_PER_WRITER).await })
        })
        .collect();
    let mut conflicts = 0;
    for writer in writers {
        conflicts += tokio::time::timeout(Duration::from_secs(180), writer)
            .await
            .context("a writer did not finish within 180 s")???;
    }

    let counter = config_maps.get("counter").await?;
    let count = counter
        .data
        .unwrap_or_default()
        .get("count")
        .cloned()
        .unwrap_or_default();
    ensure!(
        count == (WRITERS * INCREMENTS_PER_WRITER).to_string(),
        "lost updates: count is {count}, expected {} ({conflicts} conflicts retried)",
        WRITERS * INCREMENTS_PER_WRITER
    );
    Ok(())
}

/// Adds one to `count` `times` times; returns how many conflicts it retried.
async fn increment_many(config_maps: &Api<ConfigMap>, times: usize) -> Result<usize> {
    let mut conflicts = 0;
    for _ in 0..times {
        let mut attempts = 0;
        loop {
            attempts += 1;
            if attempts > 1000 {
                bail!("gave up after 1000 conflicting attempts");
            }
            let mut current = config_maps.get("counter").await?;
            let data = current.data.get_or_insert_with(Default::default);
            let count: u64 = data.get("count").context("count key")?.parse()?;
            data.insert("count".into(), (count + 1).to_string());
            match config_maps.replace("counter", &PostParams::default(), &current).await {
                Ok(_) => break,
                Err(kube::Error::Api(status)) if status.is_conflict() => conflicts += 1,
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(conflicts)
}
