//! kube-rs, the client weir's own controllers use, against a real weir server: the runtime
//! watcher/reflector follows a namespace under churn, and server-side apply keeps field
//! ownership the way Kubernetes does (conflicts between managers, force, dropped fields).

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::json;
use weir_tests::{Backend, TestServer, create_namespace};

fn config_map(name: &str, value: &str) -> ConfigMap {
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some(name.into());
    cm.data = Some([("value".to_string(), value.to_string())].into());
    cm
}

/// Polls `condition` every 100 ms for at most `timeout`.
async fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    condition()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflector_mirrors_a_namespace_under_churn() -> Result<()> {
    let server = TestServer::start(Backend::Embedded).await?;
    create_namespace(&server.http_client()?, &server, "mirrored").await?;
    let client = server.kube_client().await?;
    let api: Api<ConfigMap> = Api::namespaced(client, "mirrored");

    // Some objects exist before the reflector lists, more arrive while it starts watching.
    for i in 0..10 {
        api.create(&PostParams::default(), &config_map(&format!("before-{i}"), "0"))
            .await?;
    }
    let (reader, writer) = reflector::store::<ConfigMap>();
    let stream = reflector(writer, watcher(api.clone(), watcher::Config::default())).default_backoff();
    let follower = tokio::spawn(stream.for_each(|_| futures::future::ready(())));
    for i in 0..10 {
        api.create(&PostParams::default(), &config_map(&format!("during-{i}"), "0"))
            .await?;
    }

    let names = |reader: &reflector::Store<ConfigMap>| -> BTreeSet<String> {
        reader
            .state()
            .iter()
            .filter_map(|cm| cm.metadata.name.clone())
            .collect()
    };
    let mut expected: BTreeSet<String> = (0..10)
        .flat_map(|i| [format!("before-{i}"), format!("during-{i}")])
        .collect();
    let synced = eventually(Duration::from_secs(30), || names(&reader) == expected).await;
    ensure!(synced, "reflector holds {:?}, expected {expected:?}", names(&reader));

    // Updates and deletes reach it too.
    let patch = json!({"data": {"value": "1"}});
    api.patch("before-0", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    for i in 0..5 {
        api.delete(&format!("during-{i}"), &DeleteParams::default()).await?;
        expected.remove(&format!("during-{i}"));
    }
    let value = |reader: &reflector::Store<ConfigMap>| -> Option<String> {
        reader
            .state()
            .iter()
            .find(|cm| cm.metadata.name.as_deref() == Some("before-0"))
            .and_then(|cm| cm.data.as_ref()?.get("value").cloned())
    };
    let synced = eventually(Duration::from_secs(30), || {
        names(&reader) == expected && value(&reader).as_deref() == Some("1")
    })
    .await;
    follower.abort();
    ensure!(
        synced,
        "reflector holds {:?} (before-0 = {:?}), expected {expected:?}",
        names(&reader),
        value(&reader)
    );
    Ok(())
}

#[tokio::test]
async fn server_side_apply_tracks_field_ownership() -> Result<()> {
    let server = TestServer::start(Backend::Embedded).await?;
    let api: Api<ConfigMap> = Api::namespaced(server.kube_client().await?, "default");
    let apply = |data: serde_json::Value| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owned"}, "data": data});

    api.patch(
        "owned",
        &PatchParams::apply("alpha"),
        &Patch::Apply(apply(json!({"shared": "alpha", "mine": "a"}))),
    )
    .await
    .context("first apply creates the object")?;

    // Another manager setting a field alpha owns to another value conflicts...
    match api
        .patch(
            "owned",
            &PatchParams::apply("beta"),
            &Patch::Apply(apply(json!({"shared": "beta"}))),
        )
        .await
    {
        Err(kube::Error::Api(status)) if status.code == 409 && status.reason == "Conflict" => {
            ensure!(
                status.message.contains("alpha"),
                "conflict message should name the owner: {status:?}"
            );
        }
        Err(e) => bail!("expected 409 Conflict, got {e}"),
        Ok(cm) => bail!("conflicting apply succeeded: {:?}", cm.data),
    }
    ensure!(
        api.get("owned").await?.data.unwrap_or_default()["shared"] == "alpha",
        "conflicting apply wrote"
    );

    // ...unless it forces, which takes the field over.
    let forced = api
        .patch(
            "owned",
            &PatchParams::apply("beta").force(),
            &Patch::Apply(apply(json!({"shared": "beta"}))),
        )
        .await?;
    ensure!(forced.data.unwrap_or_default()["shared"] == "beta");

    // alpha no longer owns `shared`, so dropping it from alpha's config keeps beta's value,
    // while dropping `mine`, which only alpha owned, removes it.
    let cm = api
        .patch(
            "owned",
            &PatchParams::apply("alpha"),
            &Patch::Apply(apply(json!({"other": "x"}))),
        )
        .await?;
    let data = cm.data.clone().unwrap_or_default();
    ensure!(
        data.get("shared").map(String::as_str) == Some("beta"),
        "beta's field went away: {data:?}"
    );
    ensure!(
        !data.contains_key("mine"),
        "a field dropped by its only manager stays: {data:?}"
    );
    ensure!(data.get("other").map(String::as_str) == Some("x"), "{data:?}");

    let managers: BTreeSet<String> = cm
        .metadata
        .managed_fields
        .unwrap_or_default()
        .iter()
        .filter(|m| m.operation.as_deref() == Some("Apply"))
        .filter_map(|m| m.manager.clone())
        .collect();
    ensure!(
        managers == BTreeSet::from(["alpha".to_string(), "beta".to_string()]),
        "Apply managers: {managers:?}"
    );
    Ok(())
}
