//! Durability: every create the server acknowledged survives a SIGKILL of the server in the
//! middle of a write load, on both stores (with etcd, only weir dies; etcd keeps running).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::json;
use weir_tests::{Backend, TestServer, config_map, create_namespace, expect_ok};

const LOADERS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_sigkill_on_embedded_store() -> Result<()> {
    acknowledged_writes_survive_sigkill(Backend::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_sigkill_on_etcd() -> Result<()> {
    acknowledged_writes_survive_sigkill(Backend::Etcd).await
}

async fn acknowledged_writes_survive_sigkill(backend: Backend) -> Result<()> {
    let mut server = TestServer::start(backend).await?;
    let client = server.http_client()?;
    create_namespace(&client, &server, "crash").await?;
    let collection = server.url("/api/v1/namespaces/crash/configmaps");

    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let loaders: Vec<_> = (0..LOADERS)
        .map(|loader| {
            let (client, collection) = (client.clone(), collection.clone());
            let (acknowledged, stop) = (acknowledged.clone(), stop.clone());
            tokio::spawn(async move {
                // Runs until the server dies under it (or the test says stop).
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let name = format!("load-{loader}-{i}");
                    let body = config_map(&name, json!({"loader": loader.to_string(), "i": i.to_string()}));
                    match client.post(&collection).json(&body).send().await {
                        Ok(response) if response.status() == 201 => acknowledged.lock().unwrap().push(name),
                        _ => break,
                    }
                }
            })
        })
        .collect();

    // Let the load build up, then kill the server while requests are in flight.
    let deadline = Instant::now() + Duration::from_secs(30);
    while acknowledged.lock().unwrap().len() < 100 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before_kill = acknowledged.lock().unwrap().len();
    ensure!(before_kill > 0, "no create was acknowledged in 30 s\n{}", server.logs());
    server.kill9();
    stop.store(true, Ordering::Relaxed);
    for loader in loaders {
        tokio::time::timeout(Duration::from_secs(30), loader)
            .await
            .context("a loader did not stop after the kill")??;
    }
    let acknowledged = acknowledged.lock().unwrap().clone();

    server.restart().await.context("restarting on the same data dir")?;
    let client = server.http_client()?;
    let collection = server.url("/api/v1/namespaces/crash/configmaps");
    let list = expect_ok(client.get(&collection).send().await?, 200).await?;
    // Each object comes back whole: the data written with it, under its own name.
    let mut stored = std::collections::BTreeSet::new();
    for item in list["items"].as_array().context("items")? {
        let name = item["metadata"]["name"].as_str().context("item without a name")?;
        if let Some((loader, i)) = name.strip_prefix("load-").and_then(|rest| rest.split_once('-')) {
            ensure!(
                item["data"] == json!({"loader": loader, "i": i}),
                "{name} came back with other data: {item}"
            );
        }
        stored.insert(name.to_string());
    }
    let lost: Vec<&String> = acknowledged.iter().filter(|name| !stored.contains(*name)).collect();
    ensure!(
        lost.is_empty(),
        "{} of {} acknowledged creates lost after SIGKILL: {lost:?}",
        lost.len(),
        acknowledged.len()
    );

    // The restarted server takes writes again, and its revisions moved on past the old ones.
    let created = expect_ok(
        client
            .post(&collection)
            .json(&config_map("after-restart", json!({})))
            .send()
            .await?,
        201,
    )
    .await?;
    let list_version: u64 = list["metadata"]["resourceVersion"].as_str().unwrap_or("0").parse()?;
    let new_version: u64 = created["metadata"]["resourceVersion"].as_str().unwrap_or("0").parse()?;
    ensure!(
        new_version > list_version,
        "resourceVersion went back: {new_version} <= {list_version}"
    );
    Ok(())
}
