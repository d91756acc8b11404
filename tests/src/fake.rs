//! Stand-ins for kubelets in tests that need Nodes and running Pods but no containers: Node
//! objects whose status the test writes, and a task that reports bound Pods Running and Ready.

use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

/// Creates a Ready fake node with `cpu` and `memory` allocatable (and 110 pods), `labels`
/// (plus `kubernetes.io/hostname`) and `taints`.
pub async fn node(client: &Client, name: &str, cpu: &str, memory: &str, labels: Value, taints: Value) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut labels = labels;
    labels["kubernetes.io/hostname"] = json!(name);
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {"taints": taints},
    }))?;
    nodes.create(&PostParams::default(), &node).await?;
    let resources = json!({"cpu": cpu, "memory": memory, "pods": "110"});
    let status = json!({"status": {
        "capacity": resources, "allocatable": resources,
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "lastHeartbeatTime": "2026-01-01T00:00:00Z", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
    }});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

/// Plays the kubelet for every node: marks each bound, live pod in `pods` Running and Ready,
/// every 100 ms, until the handle is aborted.
pub fn mark_bound_pods_ready(pods: Api<Pod>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Ok(list) = pods.list(&ListParams::default()).await {
                for p in list.items {
                    let bound = p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
                    let ready = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                    if bound && !ready && p.metadata.deletion_timestamp.is_none() {
                        let status = json!({"status": {"phase": "Running", "conditions": [
                            {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
                        let _ = pods
                            .patch_status(&p.name_any(), &PatchParams::default(), &Patch::Merge(&status))
                            .await;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}
