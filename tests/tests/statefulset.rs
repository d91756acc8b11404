//! The StatefulSet and DaemonSet controllers in `weir server`, against a real server with fake
//! Nodes and a stand-in kubelet: StatefulSet pods come up one ordinal at a time with their own
//! claims and DNS names, come back under the same name, roll out above a partition and scale
//! down from the top; DaemonSet pods land exactly on eligible nodes, follow node changes and
//! roll out, all under the real `kubectl rollout`.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{DaemonSet, StatefulSet};
use k8s_openapi::api::core::v1::{Event, Node, PersistentVolumeClaim, Pod};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, WatchEvent, WatchParams};
use serde_json::json;
use weir_tests::{Backend, TestServer, eventually, fake};

const SETTLE: Duration = Duration::from_secs(15);

/// Names of the live pods selected by `selector`.
async fn pod_names(pods: &Api<Pod>, selector: &str) -> Result<BTreeSet<String>> {
    Ok(pods
        .list(&ListParams::default().labels(selector))
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| p.name_any())
        .collect())
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// What a kubelet would report for a started pod.
async fn mark_ready(pods: &Api<Pod>, name: &str) -> Result<()> {
    let status = json!({"status": {"phase": "Running", "conditions": [
        {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

async fn bound(pods: &Api<Pod>, name: &str) -> Result<Pod> {
    eventually(&format!("{name} bound"), SETTLE, || async {
        let pod = pods.get_opt(name).await?;
        Ok(pod.filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some()))
    })
    .await
}

fn image(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.containers[0].image.clone())
        .unwrap_or_default()
}

async fn statefulset_orders_pods_keeps_identity_and_rolls_out(backend: Backend) -> Result<()> {
    let server = TestServer::start(backend).await?;
    let client = server.kube_client().await?;
    for i in 0..2 {
        fake::node(&client, &format!("node-{i}"), "8", "16Gi", json!({}), json!([])).await?;
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    server.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        &json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "web"},
            "spec": {"replicas": 3, "serviceName": "web", "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "nginx", "image": "nginx:1",
                                           "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]}},
                     "volumeClaimTemplates": [{"metadata": {"name": "data"},
                         "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}]},
        })
        .to_string(),
    );

    // OrderedReady, with the kubelet stepped by hand: ordinal N appears only once N-1 is Ready.
    for n in 0..3 {
        let name = format!("web-{n}");
        bound(&pods, &name).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let expected: BTreeSet<String> = (0..=n).map(|i| format!("web-{i}")).collect();
        let seen = pod_names(&pods, "app=web").await?;
        ensure!(seen == expected, "before {name} is ready: {seen:?}");
        let claim = claims.get_opt(&format!("data-web-{n}")).await?;
        ensure!(claim.is_some(), "data-web-{n} created with its pod");
        ensure!(claims.get_opt(&format!("data-web-{}", n + 1)).await?.is_none());
        mark_ready(&pods, &name).await?;
    }
    let kubelet = fake::mark_bound_pods_ready(pods.clone());
    server.kubectl_ok(&["rollout", "status", "sts/web", "--timeout=30s"]);
    for n in 0..3 {
        let pod = pods.get(&format!("web-{n}")).await?;
        let spec = pod.spec.clone().unwrap_or_default();
        ensure!(spec.hostname.as_deref() == Some(&format!("web-{n}")[..]), "{spec:?}");
        ensure!(spec.subdomain.as_deref() == Some("web"), "{spec:?}");
        let claim = spec
            .volumes
            .unwrap_or_default()
            .into_iter()
            .find(|v| v.name == "data")
            .and_then(|v| v.persistent_volume_claim)
            .context("a data volume")?;
        ensure!(claim.claim_name == format!("data-web-{n}"));
        let labels = pod.labels();
        ensure!(labels.get("statefulset.kubernetes.io/pod-name") == Some(&format!("web-{n}")));
        ensure!(labels.get("apps.kubernetes.io/pod-index") == Some(&n.to_string()));
        ensure!(labels.contains_key("controller-revision-hash"));
    }

    // A deleted member comes back under its name, with the same claim.
    let old_uid = pods.get("web-1").await?.uid();
    server.kubectl_ok(&["delete", "pod", "web-1", "--wait=false"]);
    let back = eventually("web-1 recreated", SETTLE, || async {
        let pod = pods.get_opt("web-1").await?;
        Ok(pod.filter(|p| p.uid() != old_uid && p.metadata.deletion_timestamp.is_none()))
    })
    .await?;
    let volumes = back.spec.and_then(|s| s.volumes).unwrap_or_default();
    ensure!(volumes.iter().any(|v| {
        v.persistent_volume_claim
            .as_ref()
            .is_some_and(|c| c.claim_name == "data-web-1")
    }));
    server.kubectl_ok(&["rollout", "status", "sts/web", "--timeout=30s"]);

    // A new image above partition 1: web-2 and web-1 are replaced, web-0 keeps the old one.
    server.kubectl_ok(&[
        "patch",
        "sts",
        "web",
        "-p",
        r#"{"spec":{"updateStrategy":{"type":"RollingUpdate","rollingUpdate":{"partition":1}}}}"#,
    ]);
    server.kubectl_ok(&["set", "image", "sts/web", "nginx=nginx:2"]);
    let out = server.kubectl_ok(&["rollout", "status", "sts/web", "--timeout=30s"]);
    ensure!(
        out.contains("partitioned roll out complete: 2 new pods have been updated"),
        "{out}"
    );
    let images = eventually("web-1 and web-2 on nginx:2", SETTLE, || async {
        let mut images = Vec::new();
        for n in 0..3 {
            images.push(image(&pods.get(&format!("web-{n}")).await?));
        }
        Ok((images[1] == "nginx:2" && images[2] == "nginx:2").then_some(images))
    })
    .await?;
    ensure!(images[0] == "nginx:1", "{images:?}");
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    let status = sets.get("web").await?.status.context("status")?;
    ensure!(status.update_revision != status.current_revision, "{status:?}");
    ensure!(
        status.updated_replicas == Some(2) && status.ready_replicas == Some(3),
        "{status:?}"
    );
    let history = server.kubectl_ok(&["rollout", "history", "sts/web"]);
    ensure!(history.contains('1') && history.contains('2'), "{history}");
    let second = server.kubectl_ok(&["rollout", "history", "sts/web", "--revision=2"]);
    ensure!(second.contains("nginx:2"), "{second}");
    let revisions = server.kubectl_ok(&["get", "controllerrevisions"]);
    ensure!(
        revisions.lines().filter(|l| l.contains("statefulset.apps/web")).count() == 2,
        "{revisions}"
    );

    // Undo brings the first template back as revision 3, above the partition again.
    server.kubectl_ok(&["rollout", "undo", "sts/web"]);
    server.kubectl_ok(&["rollout", "status", "sts/web", "--timeout=30s"]);
    eventually("web-1 and web-2 back on nginx:1", SETTLE, || async {
        let mut images = Vec::new();
        for n in 0..3 {
            images.push(image(&pods.get(&format!("web-{n}")).await?));
        }
        Ok(images.iter().all(|i| i == "nginx:1").then_some(()))
    })
    .await?;
    let history = server.kubectl_ok(&["rollout", "history", "sts/web"]);
    ensure!(
        history.contains('2') && history.contains('3') && !history.contains("\n1 "),
        "{history}"
    );

    // Scale to 1: web-2 goes before web-1; the claims stay.
    let rv = pods
        .list(&ListParams::default())
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let mut watch = pods.watch(&WatchParams::default().timeout(20), &rv).await?.boxed();
    server.kubectl_ok(&["scale", "sts", "web", "--replicas=1"]);
    let mut deleted = Vec::new();
    let until = tokio::time::Instant::now() + SETTLE;
    while deleted.len() < 2 && tokio::time::Instant::now() < until {
        match tokio::time::timeout(Duration::from_secs(5), watch.try_next()).await {
            Ok(Ok(Some(WatchEvent::Deleted(p)))) => deleted.push(p.name_any()),
            Ok(Ok(Some(_))) => {}
            other => anyhow::bail!("watching pods during scale-down: {other:?}; deleted {deleted:?}"),
        }
    }
    ensure!(deleted == ["web-2", "web-1"], "deleted {deleted:?}");
    server.kubectl_ok(&["rollout", "status", "sts/web", "--timeout=30s"]);
    ensure!(pod_names(&pods, "app=web").await? == names(&["web-0"]));
    let claim_names: BTreeSet<String> = claims
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|c| c.name_any())
        .collect();
    ensure!(
        claim_names == names(&["data-web-0", "data-web-1", "data-web-2"]),
        "{claim_names:?}"
    );

    // Orphaned and recreated, the set adopts web-0 instead of replacing it.
    let uid = pods.get("web-0").await?.uid();
    let manifest = server.kubectl_ok(&["get", "sts", "web", "-o", "json"]);
    let mut manifest: serde_json::Value = serde_json::from_str(&manifest)?;
    for field in [
        "uid",
        "resourceVersion",
        "creationTimestamp",
        "generation",
        "managedFields",
    ] {
        manifest["metadata"].as_object_mut().context("metadata")?.remove(field);
    }
    manifest.as_object_mut().context("object")?.remove("status");
    server.kubectl_ok(&["delete", "sts", "web", "--cascade=orphan"]);
    server.kubectl_stdin_ok(&["create", "-f", "-"], &manifest.to_string());
    let adopted = eventually("web-0 adopted", SETTLE, || async {
        let pod = pods.get("web-0").await?;
        let owner = pod
            .owner_references()
            .iter()
            .find(|o| o.controller == Some(true))
            .cloned();
        let set = sets.get("web").await?;
        Ok(owner.filter(|o| Some(&o.uid) == set.metadata.uid.as_ref()).map(|_| pod))
    })
    .await?;
    ensure!(adopted.uid() == uid, "web-0 was replaced, not adopted");
    server.kubectl_ok(&["rollout", "status", "sts/web", "--timeout=30s"]);
    let history = server.kubectl_ok(&["rollout", "history", "sts/web"]);
    ensure!(
        history.contains('2') && history.contains('3'),
        "revisions adopted too: {history}"
    );

    let events: Api<Event> = Api::namespaced(client, "default");
    let messages: Vec<String> = events
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|e| e.message)
        .collect();
    for m in [
        "create Pod web-0 in StatefulSet web successful",
        "create Claim data-web-0 Pod web-0 in StatefulSet web success",
        "delete Pod web-2 in StatefulSet web successful",
    ] {
        ensure!(messages.iter().any(|x| x == m), "no event {m:?} in {messages:?}");
    }
    kubelet.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statefulset_orders_pods_keeps_identity_and_rolls_out_embedded() -> Result<()> {
    statefulset_orders_pods_keeps_identity_and_rolls_out(Backend::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statefulset_orders_pods_keeps_identity_and_rolls_out_etcd() -> Result<()> {
    statefulset_orders_pods_keeps_identity_and_rolls_out(Backend::Etcd).await
}

async fn claim_names(claims: &Api<PersistentVolumeClaim>) -> Result<BTreeSet<String>> {
    Ok(claims
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|c| c.metadata.deletion_timestamp.is_none())
        .map(|c| c.name_any())
        .collect())
}

async fn parallel_statefulset_deletes_claims_when_asked(backend: Backend) -> Result<()> {
    let server = TestServer::start(backend).await?;
    let client = server.kube_client().await?;
    fake::node(&client, "node-0", "8", "16Gi", json!({}), json!([])).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    server.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        &json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db"},
            "spec": {"replicas": 3, "podManagementPolicy": "Parallel",
                     "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Delete", "whenScaled": "Delete"},
                     "selector": {"matchLabels": {"app": "db"}},
                     "template": {"metadata": {"labels": {"app": "db"}},
                                  "spec": {"containers": [{"name": "db", "image": "db:1"}]}},
                     "volumeClaimTemplates": [{"metadata": {"name": "data"},
                         "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}]},
        })
        .to_string(),
    );
    // Parallel: every pod at once, none of them ready yet.
    eventually("db-0, db-1 and db-2 before any is ready", SETTLE, || async {
        Ok((pod_names(&pods, "app=db").await? == names(&["db-0", "db-1", "db-2"])).then_some(()))
    })
    .await?;
    let kubelet = fake::mark_bound_pods_ready(pods.clone());
    server.kubectl_ok(&["rollout", "status", "sts/db", "--timeout=30s"]);
    ensure!(claim_names(&claims).await? == names(&["data-db-0", "data-db-1", "data-db-2"]));

    // whenScaled: Delete: the claims of removed ordinals go with their pods.
    server.kubectl_ok(&["scale", "sts", "db", "--replicas=1"]);
    eventually("only data-db-0 left", SETTLE, || async {
        Ok((claim_names(&claims).await? == names(&["data-db-0"])).then_some(()))
    })
    .await?;
    ensure!(pod_names(&pods, "app=db").await? == names(&["db-0"]));
    // whenDeleted: Delete: the last claim goes with the set.
    server.kubectl_ok(&["delete", "sts", "db"]);
    eventually("no claims and no pods", SETTLE, || async {
        let empty = claim_names(&claims).await?.is_empty() && pod_names(&pods, "app=db").await?.is_empty();
        Ok(empty.then_some(()))
    })
    .await?;
    kubelet.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_statefulset_deletes_claims_when_asked_embedded() -> Result<()> {
    parallel_statefulset_deletes_claims_when_asked(Backend::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_statefulset_deletes_claims_when_asked_etcd() -> Result<()> {
    parallel_statefulset_deletes_claims_when_asked(Backend::Etcd).await
}

/// node name -> image of the live daemon pods, bound by the scheduler.
async fn daemons(pods: &Api<Pod>) -> Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = pods
        .list(&ListParams::default().labels("app=agent"))
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            let node = p.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
            (node, image(&p))
        })
        .collect();
    out.sort();
    Ok(out)
}

async fn daemons_become(pods: &Api<Pod>, want: &[(&str, &str)]) -> Result<()> {
    let want: Vec<(String, String)> = want.iter().map(|(n, i)| (n.to_string(), i.to_string())).collect();
    eventually(&format!("daemon pods {want:?}"), SETTLE, || async {
        Ok((daemons(pods).await? == want).then_some(()))
    })
    .await
}

async fn daemonset_runs_on_eligible_nodes_and_rolls_out(backend: Backend) -> Result<()> {
    let server = TestServer::start(backend).await?;
    let client = server.kube_client().await?;
    fake::node(&client, "edge-1", "4", "8Gi", json!({"role": "edge"}), json!([])).await?;
    fake::node(
        &client,
        "edge-tainted",
        "4",
        "8Gi",
        json!({"role": "edge"}),
        json!([{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]),
    )
    .await?;
    fake::node(&client, "core-1", "4", "8Gi", json!({"role": "core"}), json!([])).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let kubelet = fake::mark_bound_pods_ready(pods.clone());
    server.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        &json!({
            "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "agent"},
            "spec": {"selector": {"matchLabels": {"app": "agent"}},
                     "template": {"metadata": {"labels": {"app": "agent"}},
                                  "spec": {"nodeSelector": {"role": "edge"},
                                           "containers": [{"name": "agent", "image": "agent:1"}]}}},
        })
        .to_string(),
    );
    server.kubectl_ok(&["rollout", "status", "ds/agent", "--timeout=30s"]);
    daemons_become(&pods, &[("edge-1", "agent:1")]).await?;
    let sets: Api<DaemonSet> = Api::namespaced(client.clone(), "default");
    let status = sets.get("agent").await?.status.context("status")?;
    ensure!(
        (
            status.desired_number_scheduled,
            status.current_number_scheduled,
            status.number_ready
        ) == (1, 1, 1),
        "{status:?}"
    );

    // A new matching node gets a pod; a node that stops matching loses its pod.
    fake::node(&client, "edge-2", "4", "8Gi", json!({"role": "edge"}), json!([])).await?;
    daemons_become(&pods, &[("edge-1", "agent:1"), ("edge-2", "agent:1")]).await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let relabel = |role: &'static str| json!({"metadata": {"labels": {"role": role}}});
    nodes
        .patch("core-1", &PatchParams::default(), &Patch::Merge(&relabel("edge")))
        .await?;
    daemons_become(
        &pods,
        &[("core-1", "agent:1"), ("edge-1", "agent:1"), ("edge-2", "agent:1")],
    )
    .await?;
    nodes
        .patch("core-1", &PatchParams::default(), &Patch::Merge(&relabel("core")))
        .await?;
    daemons_become(&pods, &[("edge-1", "agent:1"), ("edge-2", "agent:1")]).await?;

    // A new image rolls over every node.
    server.kubectl_ok(&["set", "image", "ds/agent", "agent=agent:2"]);
    let out = server.kubectl_ok(&["rollout", "status", "ds/agent", "--timeout=30s"]);
    ensure!(out.contains("successfully rolled out"), "{out}");
    daemons_become(&pods, &[("edge-1", "agent:2"), ("edge-2", "agent:2")]).await?;
    let history = server.kubectl_ok(&["rollout", "history", "ds/agent"]);
    ensure!(history.contains('1') && history.contains('2'), "{history}");

    // With maxSurge the new pod starts beside the old one: every node keeps an available pod.
    server.kubectl_ok(&[
        "patch",
        "ds",
        "agent",
        "-p",
        r#"{"spec":{"updateStrategy":{"rollingUpdate":{"maxSurge":1,"maxUnavailable":0}}}}"#,
    ]);
    let watcher = {
        let sets = sets.clone();
        tokio::spawn(async move {
            let mut min = i32::MAX;
            for _ in 0..300 {
                if let Ok(ds) = sets.get("agent").await {
                    let status = ds.status.unwrap_or_default();
                    min = min.min(status.number_available.unwrap_or(0));
                    if ds
                        .spec
                        .template
                        .spec
                        .is_some_and(|s| s.containers[0].image.as_deref() == Some("agent:3"))
                        && status.updated_number_scheduled == Some(2)
                        && status.number_available == Some(2)
                    {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            min
        })
    };
    server.kubectl_ok(&["set", "image", "ds/agent", "agent=agent:3"]);
    server.kubectl_ok(&["rollout", "status", "ds/agent", "--timeout=30s"]);
    daemons_become(&pods, &[("edge-1", "agent:3"), ("edge-2", "agent:3")]).await?;
    let min_available = watcher.await?;
    ensure!(min_available == 2, "available daemons dropped to {min_available}");
    let first = server.kubectl_ok(&["rollout", "history", "ds/agent", "--revision=1"]);
    ensure!(first.contains("agent:1"), "{first}");
    server.kubectl_ok(&["rollout", "undo", "ds/agent", "--to-revision=1"]);
    server.kubectl_ok(&["rollout", "status", "ds/agent", "--timeout=30s"]);
    daemons_become(&pods, &[("edge-1", "agent:1"), ("edge-2", "agent:1")]).await?;

    // A removed node's pod goes.
    nodes.delete("edge-2", &DeleteParams::default()).await?;
    daemons_become(&pods, &[("edge-1", "agent:1")]).await?;
    // A matching orphan on a node the DaemonSet does not cover is adopted, then removed.
    let stray: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "stray", "labels": {"app": "agent"}},
        "spec": {"nodeName": "core-1", "containers": [{"name": "agent", "image": "agent:1"}]},
    }))?;
    pods.create(&Default::default(), &stray).await?;
    eventually("the stray pod removed", SETTLE, || async {
        Ok(pods.get_opt("stray").await?.is_none().then_some(()))
    })
    .await?;
    let described = server.kubectl_ok(&["describe", "ds", "agent"]);
    ensure!(described.contains("SuccessfulCreate"), "{described}");
    kubelet.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemonset_runs_on_eligible_nodes_and_rolls_out_embedded() -> Result<()> {
    daemonset_runs_on_eligible_nodes_and_rolls_out(Backend::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemonset_runs_on_eligible_nodes_and_rolls_out_etcd() -> Result<()> {
    daemonset_runs_on_eligible_nodes_and_rolls_out(Backend::Etcd).await
}
