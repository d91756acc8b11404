//! Inter-pod and preferred affinity in the scheduler of `weir server`, driven by the real
//! kubectl against fake Nodes: required anti-affinity keeps replicas apart and leaves the extra
//! one unschedulable with kube-scheduler's reason until a node appears; preferred node and pod
//! affinity steer pods to the preferred node.

use std::time::Duration;

use anyhow::{Result, ensure};
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{Api, ListParams};
use serde_json::json;
use weir_tests::{Backend, TestServer, eventually, fake};

const SETTLE: Duration = Duration::from_secs(15);

async fn node_of(pods: &Api<Pod>, name: &str) -> Result<String> {
    eventually(&format!("pod {name} bound"), SETTLE, || async {
        Ok(pods.get(name).await?.spec.and_then(|s| s.node_name))
    })
    .await
}

const SPREAD: &str = r#"apiVersion: apps/v1
kind: ReplicaSet
metadata:
  name: web
spec:
  replicas: 3
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
          - topologyKey: kubernetes.io/hostname
            labelSelector:
              matchLabels: {app: web}
      containers:
      - name: c
        image: nginx
"#;

async fn anti_affinity_leaves_a_replica_unschedulable_until_a_node_appears(backend: Backend) -> Result<()> {
    let server = TestServer::start(backend).await?;
    let client = server.kube_client().await?;
    fake::node(&client, "a", "4", "16Gi", json!({}), json!([])).await?;
    fake::node(&client, "b", "4", "16Gi", json!({}), json!([])).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    server.kubectl_stdin_ok(&["apply", "-f", "-"], SPREAD);

    let web = ListParams::default().labels("app=web");
    let (mut nodes, message) = eventually("two replicas bound, one unschedulable", SETTLE, || async {
        let list = pods.list(&web).await?;
        let nodes: Vec<String> = list
            .items
            .iter()
            .filter_map(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()))
            .collect();
        let message = list.items.iter().find_map(|p| {
            p.status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False")?
                .message
                .clone()
        });
        Ok((list.items.len() == 3 && nodes.len() == 2)
            .then_some(message)
            .flatten()
            .map(|m| (nodes, m)))
    })
    .await?;
    nodes.sort();
    ensure!(nodes == ["a", "b"], "{nodes:?}");
    ensure!(
        message == "0/2 nodes are available: 2 node(s) didn't match pod anti-affinity rules.",
        "{message}"
    );
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    eventually("a FailedScheduling event with the reason", SETTLE, || async {
        let list = events.list(&ListParams::default()).await?;
        Ok(list.items.into_iter().find(|e| {
            e.reason.as_deref() == Some("FailedScheduling") && e.message.as_deref() == Some(message.as_str())
        }))
    })
    .await?;

    fake::node(&client, "c", "4", "16Gi", json!({}), json!([])).await?;
    let mut nodes = eventually("the third replica bound to the new node", SETTLE, || async {
        let list = pods.list(&web).await?;
        let nodes: Vec<String> = list
            .items
            .iter()
            .filter_map(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()))
            .collect();
        Ok((nodes.len() == 3).then_some(nodes))
    })
    .await?;
    nodes.sort();
    ensure!(nodes == ["a", "b", "c"], "{nodes:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anti_affinity_leaves_a_replica_unschedulable_until_a_node_appears_embedded() -> Result<()> {
    anti_affinity_leaves_a_replica_unschedulable_until_a_node_appears(Backend::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anti_affinity_leaves_a_replica_unschedulable_until_a_node_appears_etcd() -> Result<()> {
    anti_affinity_leaves_a_replica_unschedulable_until_a_node_appears(Backend::Etcd).await
}

fn pod(name: &str, labels: &str, cpu: &str, affinity: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {labels}\nspec:\n  affinity: {affinity}\n  containers:\n  - name: c\n    image: nginx\n    resources:\n      requests:\n        cpu: \"{cpu}\"\n"
    )
}

async fn preferred_affinity_steers_pods(backend: Backend) -> Result<()> {
    let server = TestServer::start(backend).await?;
    let client = server.kube_client().await?;
    fake::node(&client, "a", "8", "16Gi", json!({}), json!([])).await?;
    fake::node(&client, "b", "8", "16Gi", json!({"disk": "ssd"}), json!([])).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");

    // Equal nodes: without preferences the tie goes to "a".
    server.kubectl_stdin_ok(&["apply", "-f", "-"], &pod("plain", "{}", "100m", "{}"));
    ensure!(node_of(&pods, "plain").await? == "a");
    let ssd = r#"{nodeAffinity: {preferredDuringSchedulingIgnoredDuringExecution: [{weight: 10, preference: {matchExpressions: [{key: disk, operator: In, values: [ssd]}]}}]}}"#;
    server.kubectl_stdin_ok(&["apply", "-f", "-"], &pod("fast", "{app: cache}", "6", ssd));
    ensure!(node_of(&pods, "fast").await? == "b");
    // b is now the busier node, but this pod prefers to sit with the cache.
    let near_cache = r#"{podAffinity: {preferredDuringSchedulingIgnoredDuringExecution: [{weight: 100, podAffinityTerm: {topologyKey: kubernetes.io/hostname, labelSelector: {matchLabels: {app: cache}}}}]}}"#;
    server.kubectl_stdin_ok(&["apply", "-f", "-"], &pod("near", "{}", "100m", near_cache));
    ensure!(node_of(&pods, "near").await? == "b");
    server.kubectl_stdin_ok(&["apply", "-f", "-"], &pod("plain-2", "{}", "100m", "{}"));
    ensure!(node_of(&pods, "plain-2").await? == "a");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferred_affinity_steers_pods_embedded() -> Result<()> {
    preferred_affinity_steers_pods(Backend::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferred_affinity_steers_pods_etcd() -> Result<()> {
    preferred_affinity_steers_pods(Backend::Etcd).await
}
