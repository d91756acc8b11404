//! The scheduler and the ReplicaSet and Deployment controllers in `weir server`, against a real
//! server with fake Nodes (objects the test creates and whose status it writes; no kubelets):
//! pods are bound to a node that fits, nodeSelector and taints are honoured, a pod that fits
//! nowhere says why until a node that fits appears, ReplicaSets keep their replicas bound, and
//! Deployments roll out, back and scale under the real `kubectl rollout`.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use weir_tests::{Backend, TestServer, eventually, fake};

const SETTLE: Duration = Duration::from_secs(15);

async fn create_pod(pods: &Api<Pod>, name: &str, cpu: &str, spec_extra: Value) -> Result<()> {
    let mut spec = json!({"containers": [{"name": "c", "image": "nginx",
        "resources": {"requests": {"cpu": cpu, "memory": "64Mi"}}}]});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), spec_extra.as_object()) {
        spec.extend(extra.clone());
    }
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec,
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    Ok(())
}

async fn node_of(pods: &Api<Pod>, name: &str) -> Result<String> {
    eventually(&format!("pod {name} bound"), SETTLE, || async {
        let pod = pods.get(name).await?;
        Ok(pod.spec.and_then(|s| s.node_name))
    })
    .await
}

/// Three nodes: small, ssd (4 cpu), gpu (8 cpu, tainted).
async fn three_nodes(client: &Client) -> Result<()> {
    fake::node(client, "small", "1", "4Gi", json!({}), json!([])).await?;
    fake::node(client, "ssd", "4", "16Gi", json!({"disk": "ssd"}), json!([])).await?;
    fake::node(
        client,
        "gpu",
        "8",
        "32Gi",
        json!({}),
        json!([{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]),
    )
    .await?;
    Ok(())
}

async fn pods_bind_to_fitting_nodes(backend: Backend) -> Result<()> {
    let server = TestServer::start(backend).await?;
    let client = server.kube_client().await?;
    three_nodes(&client).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");

    // Too big for "small", and "gpu" is tainted.
    create_pod(&pods, "big", "2", json!({})).await?;
    ensure!(node_of(&pods, "big").await? == "ssd");
    create_pod(&pods, "picky", "100m", json!({"nodeSelector": {"disk": "ssd"}})).await?;
    ensure!(node_of(&pods, "picky").await? == "ssd");
    // Only the tolerating pod may use the tainted node, and only it has room.
    create_pod(
        &pods,
        "tolerant",
        "6",
        json!({"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]}),
    )
    .await?;
    ensure!(node_of(&pods, "tolerant").await? == "gpu");
    // Many small pods never land on the tainted node.
    for i in 0..10 {
        create_pod(&pods, &format!("small-{i}"), "50m", json!({})).await?;
    }
    for i in 0..10 {
        let node = node_of(&pods, &format!("small-{i}")).await?;
        ensure!(node == "small" || node == "ssd", "small-{i} on {node}");
    }
    let listed = server.kubectl_ok(&["get", "pod", "big", "-o", "jsonpath={.spec.nodeName}"]);
    ensure!(listed == "ssd", "{listed}");
    let events: Api<Event> = Api::namespaced(client, "default");
    eventually("a Scheduled event for big", SETTLE, || async {
        let list = events.list(&ListParams::default()).await?;
        Ok(list
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("Scheduled") && e.involved_object.name.as_deref() == Some("big")))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_bind_to_fitting_nodes_embedded() -> Result<()> {
    pods_bind_to_fitting_nodes(Backend::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_bind_to_fitting_nodes_etcd() -> Result<()> {
    pods_bind_to_fitting_nodes(Backend::Etcd).await
}

async fn unschedulable_pod_reports_why(backend: Backend) -> Result<()> {
    let server = TestServer::start(backend).await?;
    let client = server.kube_client().await?;
    three_nodes(&client).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    create_pod(&pods, "huge", "16", json!({})).await?;
    let message = eventually("huge marked unschedulable", SETTLE, || async {
        let pod = pods.get("huge").await?;
        let cond = pod
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False");
        Ok(cond.map(|c| (c.reason.unwrap_or_default(), c.message.unwrap_or_default())))
    })
    .await?;
    ensure!(message.0 == "Unschedulable", "{message:?}");
    ensure!(
        message.1 == "0/3 nodes are available: 1 node(s) had untolerated taint {dedicated: gpu}, 2 Insufficient cpu.",
        "{message:?}"
    );
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    eventually("a FailedScheduling event", SETTLE, || async {
        let list = events.list(&ListParams::default()).await?;
        Ok(list.items.into_iter().find(|e| {
            e.reason.as_deref() == Some("FailedScheduling") && e.involved_object.name.as_deref() == Some("huge")
        }))
    })
    .await?;
    let described = server.kubectl_ok(&["describe", "pod", "huge"]);
    ensure!(described.contains("FailedScheduling"), "{described}");

    // A node big enough appears: the pod is retried and bound.
    fake::node(&client, "large", "32", "64Gi", json!({}), json!([])).await?;
    ensure!(node_of(&pods, "huge").await? == "large");
    ensure!(pods.get("huge").await?.name_any() == "huge");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unschedulable_pod_reports_why_embedded() -> Result<()> {
    unschedulable_pod_reports_why(Backend::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unschedulable_pod_reports_why_etcd() -> Result<()> {
    unschedulable_pod_reports_why(Backend::Etcd).await
}

/// Pods per second on 100 fake nodes, printed (run with --nocapture); asserts only that all
/// 500 pods are bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scheduling_throughput_on_100_nodes() -> Result<()> {
    let server = TestServer::start(Backend::Embedded).await?;
    let client = server.kube_client().await?;
    for i in 0..100 {
        fake::node(&client, &format!("node-{i:03}"), "32", "128Gi", json!({}), json!([])).await?;
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    const N: usize = 500;
    let started = Instant::now();
    futures::future::try_join_all((0..N).map(|i| {
        let pods = pods.clone();
        async move { create_pod(&pods, &format!("p-{i}"), "10m", json!({})).await }
    }))
    .await?;
    let created = started.elapsed();
    eventually("all pods bound", Duration::from_secs(60), || async {
        let list = pods.list(&ListParams::default()).await?;
        let bound = list
            .items
            .iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some())
            .count();
        Ok((bound == N).then_some(()))
    })
    .await?;
    let total = started.elapsed();
    eprintln!(
        "{N} pods on 100 nodes: created in {created:?}, all bound after {total:?} ({:.0} pods/s end to end)",
        N as f64 / total.as_secs_f64()
    );
    Ok(())
}

/// The ReplicaSet's live (not terminating) pods, with their nodes.
async fn live_pods(pods: &Api<Pod>, selector: &str) -> Result<Vec<Pod>> {
    let list = pods.list(&ListParams::default().labels(selector)).await?;
    Ok(list
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect())
}

async fn replica_set_keeps_its_pods(backend: Backend) -> Result<()> {
    let server = TestServer::start(backend).await?;
    let client = server.kube_client().await?;
    for i in 0..3 {
        fake::node(&client, &format!("node-{i}"), "4", "8Gi", json!({}), json!([])).await?;
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    // An orphan that matches is adopted and counts toward the replicas.
    create_pod(&pods, "orphan", "100m", json!({})).await?;
    pods.patch(
        "orphan",
        &PatchParams::default(),
        &Patch::Merge(&json!({"metadata": {"labels": {"app": "web"}}})),
    )
    .await?;
    server.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        &json!({
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "web"},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "c", "image": "nginx",
                                           "resources": {"requests": {"cpu": "100m"}}}]}}},
        })
        .to_string(),
    );
    let sets: Api<ReplicaSet> = Api::namespaced(client.clone(), "default");
    let rs_uid = sets.get("web").await?.uid();
    let bound = eventually("3 pods bound", SETTLE, || async {
        let live = live_pods(&pods, "app=web").await?;
        let nodes: Vec<String> = live
            .iter()
            .filter_map(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()))
            .collect();
        Ok((live.len() == 3 && nodes.len() == 3).then_some((live, nodes)))
    })
    .await?;
    let (live, mut nodes) = bound;
    nodes.sort();
    // Spread over the three nodes.
    ensure!(nodes == ["node-0", "node-1", "node-2"], "{nodes:?}");
    for p in &live {
        let owner = p.owner_references().iter().find(|o| o.controller == Some(true));
        ensure!(
            owner.map(|o| Some(o.uid.clone())) == Some(rs_uid.clone()),
            "{}",
            p.name_any()
        );
        ensure!(
            p.name_any() == "orphan" || p.name_any().starts_with("web-"),
            "{}",
            p.name_any()
        );
    }

    // Readiness comes from pod status, which the test writes.
    for p in &live {
        let status = json!({"status": {"phase": "Running", "conditions": [
            {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
        pods.patch_status(&p.name_any(), &PatchParams::default(), &Patch::Merge(&status))
            .await?;
    }
    eventually("status counts 3 ready", SETTLE, || async {
        let s = sets.get("web").await?.status.unwrap_or_default();
        Ok((s.replicas == 3
            && s.ready_replicas == Some(3)
            && s.available_replicas == Some(3)
            && s.fully_labeled_replicas == Some(3))
        .then_some(()))
    })
    .await?;

    // A deleted pod is replaced.
    let victim = live[0].name_any();
    pods.delete(&victim, &DeleteParams::default()).await?;
    eventually("the deleted pod replaced", SETTLE, || async {
        let live = live_pods(&pods, "app=web").await?;
        let bound = live
            .iter()
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some())
            .count();
        Ok((live.len() == 3 && bound == 3 && live.iter().all(|p| p.name_any() != victim)).then_some(()))
    })
    .await?;

    // Scale down through the scale subresource: the unready replacement goes first.
    server.kubectl_ok(&["scale", "replicaset", "web", "--replicas=1"]);
    let left = eventually("scaled to 1", SETTLE, || async {
        let live = live_pods(&pods, "app=web").await?;
        Ok((live.len() == 1).then_some(live))
    })
    .await?;
    let ready = left[0]
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    ensure!(ready, "the ready pod should survive the scale-down");
    eventually("status replicas 1", SETTLE, || async {
        let s = sets.get("web").await?.status.unwrap_or_default();
        Ok((s.replicas == 1).then_some(()))
    })
    .await?;
    let shown = server.kubectl_ok(&[
        "get",
        "rs",
        "web",
        "-o",
        "jsonpath={.status.replicas}/{.status.readyReplicas}",
    ]);
    ensure!(shown == "1/1", "{shown}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_set_keeps_its_pods_embedded() -> Result<()> {
    replica_set_keeps_its_pods(Backend::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_set_keeps_its_pods_etcd() -> Result<()> {
    replica_set_keeps_its_pods(Backend::Etcd).await
}

/// Live, ready pods of app=web and their images.
async fn ready_images(pods: &Api<Pod>) -> Result<Vec<String>> {
    Ok(live_pods(pods, "app=web")
        .await?
        .into_iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .map(|p| {
            p.spec.unwrap_or_default().containers[0]
                .image
                .clone()
                .unwrap_or_default()
        })
        .collect())
}

async fn deployment_rolls_out_and_back(backend: Backend) -> Result<()> {
    let server = TestServer::start(backend).await?;
    let client = server.kube_client().await?;
    for i in 0..3 {
        fake::node(&client, &format!("node-{i}"), "8", "16Gi", json!({}), json!([])).await?;
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let kubelet = fake::mark_bound_pods_ready(pods.clone());
    server.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        &json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                     "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "c", "image": "nginx:1"}]}}},
        })
        .to_string(),
    );
    server.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=30s"]);
    ensure!(ready_images(&pods).await?.len() == 3);

    // A new image with maxUnavailable 0 never drops below 3 ready pods.
    let watcher = {
        let pods = pods.clone();
        tokio::spawn(async move {
            let mut min = usize::MAX;
            for _ in 0..300 {
                if let Ok(images) = ready_images(&pods).await {
                    min = min.min(images.len());
                    if images.len() == 3 && images.iter().all(|i| i == "nginx:2") {
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            min
        })
    };
    server.kubectl_ok(&["set", "image", "deployment/web", "c=nginx:2"]);
    server.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=30s"]);
    let min_ready = watcher.await?;
    ensure!(min_ready >= 3, "ready pods dropped to {min_ready}");
    let images = eventually("all pods on nginx:2", SETTLE, || async {
        let images = ready_images(&pods).await?;
        Ok((images.len() == 3 && images.iter().all(|i| i == "nginx:2")).then_some(images))
    })
    .await?;
    ensure!(images.len() == 3);
    let revision = server.kubectl_ok(&[
        "get",
        "deployment",
        "web",
        "-o",
        "jsonpath={.metadata.annotations.deployment\\.kubernetes\\.io/revision}",
    ]);
    ensure!(revision == "2", "revision {revision}");

    // Undo restores the old template (and its ReplicaSet).
    server.kubectl_ok(&["rollout", "undo", "deployment/web"]);
    server.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=30s"]);
    eventually("all pods back on nginx:1", SETTLE, || async {
        let images = ready_images(&pods).await?;
        Ok((images.len() == 3 && images.iter().all(|i| i == "nginx:1")).then_some(()))
    })
    .await?;
    let sets: Api<ReplicaSet> = Api::namespaced(client.clone(), "default");
    ensure!(sets.list(&ListParams::default()).await?.items.len() == 2);

    server.kubectl_ok(&["scale", "deployment", "web", "--replicas=5"]);
    server.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=30s"]);
    eventually("5 pods", SETTLE, || async {
        Ok((ready_images(&pods).await?.len() == 5).then_some(()))
    })
    .await?;
    kubelet.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_rolls_out_and_back_embedded() -> Result<()> {
    deployment_rolls_out_and_back(Backend::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_rolls_out_and_back_etcd() -> Result<()> {
    deployment_rolls_out_and_back(Backend::Etcd).await
}

fn progressing(d: &Deployment) -> (String, String, String) {
    d.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_.as_deref() == Some("Progressing")))
        .map(|c| {
            (
                c.status.clone().unwrap_or_default(),
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default(),
            )
        })
        .unwrap_or_default()
}

/// `kubectl rollout pause` holds a template change back (scaling still works) until
/// `kubectl rollout resume`; a Deployment whose pods never become ready exceeds its progress
/// deadline and `kubectl rollout status` says so.
async fn deployment_pauses_and_times_out(backend: Backend) -> Result<()> {
    let server = TestServer::start(backend).await?;
    let client = server.kube_client().await?;
    fake::node(&client, "node-0", "8", "16Gi", json!({}), json!([])).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let sets: Api<ReplicaSet> = Api::namespaced(client.clone(), "default");
    let kubelet = fake::mark_bound_pods_ready(pods.clone());
    let deployment = |name: &str, extra: Value| {
        let mut spec = json!({"replicas": 2, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                         "spec": {"containers": [{"name": "c", "image": "nginx:1"}]}}});
        if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
            spec.extend(extra.clone());
        }
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name}, "spec": spec}).to_string()
    };
    server.kubectl_stdin_ok(&["apply", "-f", "-"], &deployment("web", json!({})));
    server.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=30s"]);

    server.kubectl_ok(&["rollout", "pause", "deployment/web"]);
    eventually("Progressing DeploymentPaused", SETTLE, || async {
        let (status, reason, message) = progressing(&deployments.get("web").await?);
        Ok((status == "Unknown" && reason == "DeploymentPaused" && message == "Deployment is paused").then_some(()))
    })
    .await?;
    server.kubectl_ok(&["set", "image", "deployment/web", "c=nginx:2"]);
    server.kubectl_ok(&["scale", "deployment/web", "--replicas=3"]);
    eventually("paused deployment scaled, not rolled", SETTLE, || async {
        let d = deployments.get("web").await?;
        let seen = d.status.as_ref().and_then(|s| s.observed_generation) == d.metadata.generation;
        let list = sets.list(&ListParams::default().labels("app=web")).await?.items;
        let one = list.len() == 1 && list[0].spec.replicas == Some(3);
        Ok((seen && one).then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let list = sets.list(&ListParams::default().labels("app=web")).await?.items;
    ensure!(list.len() == 1, "a new ReplicaSet while paused: {}", list.len());

    server.kubectl_ok(&["rollout", "resume", "deployment/web"]);
    server.kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=30s"]);
    eventually("3 pods on nginx:2", SETTLE, || async {
        let images = ready_images(&pods).await?;
        Ok((images.len() == 3 && images.iter().all(|i| i == "nginx:2")).then_some(()))
    })
    .await?;
    let (status, reason, _) = progressing(&deployments.get("web").await?);
    ensure!(
        status == "True" && reason == "NewReplicaSetAvailable",
        "{status} {reason}"
    );

    // Pods that never bind never become ready: 2 s later the deadline has passed.
    let started = Instant::now();
    server.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        &deployment(
            "stuck",
            json!({"progressDeadlineSeconds": 2,
                   "template": {"metadata": {"labels": {"app": "stuck"}},
                                "spec": {"nodeSelector": {"disk": "none"},
                                         "containers": [{"name": "c", "image": "nginx:1"}]}}}),
        ),
    );
    let out = server.kubectl(&["rollout", "status", "deployment/stuck", "--timeout=30s"]);
    let failed_after = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "rollout status succeeded: {stderr}");
    ensure!(
        stderr.contains("deployment \"stuck\" exceeded its progress deadline"),
        "{stderr}"
    );
    ensure!(failed_after < Duration::from_secs(15), "took {failed_after:?}");
    let (status, reason, message) = progressing(&deployments.get("stuck").await?);
    ensure!(
        status == "False" && reason == "ProgressDeadlineExceeded" && message.ends_with("has timed out progressing."),
        "{status} {reason} {message}"
    );
    eprintln!("progress deadline 2 s: rollout status failed after {failed_after:?}");
    kubelet.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_pauses_and_times_out_embedded() -> Result<()> {
    deployment_pauses_and_times_out(Backend::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_pauses_and_times_out_etcd() -> Result<()> {
    deployment_pauses_and_times_out(Backend::Etcd).await
}
