//! Stand-ins for kubelets in tests that need Nodes and running Pods but no containers: Node
//! objects whose status the test writes and that heartbeat like a kubelet (Lease renewals), and
//! a task that reports bound Pods Running and Ready.

use std::time::Duration;

use anyhow::Result;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

/// How often fake nodes heartbeat unless told otherwise: as a kubelet (a quarter of the 40 s
/// default grace period).
pub const HEARTBEAT: Duration = Duration::from_secs(10);

/// A fake node and its heartbeat. Dropping it leaves the heartbeat running (until the test's
/// runtime ends), so `fake::node(..).await?;` gives a node that stays Ready.
pub struct FakeNode {
    pub name: String,
    client: Client,
    every: Duration,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
}

impl FakeNode {
    /// Heartbeats every `every` from now on (tests with a short grace period need short ones).
    pub fn heartbeat_every(&mut self, every: Duration) {
        self.every = every;
        self.start_heartbeat();
    }

    /// The kubelet goes silent: no more Lease renewals or status updates.
    pub fn stop_heartbeat(&mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
    }

    /// (Re)starts the heartbeat: renews the Lease at once and then every period, and posts
    /// Ready again if the node controller marked the node otherwise.
    pub fn start_heartbeat(&mut self) {
        self.stop_heartbeat();
        self.heartbeat = Some(heartbeat(self.client.clone(), &self.name, self.every));
    }
}

/// Plays a kubelet's heartbeat for node `name` until aborted: renews its Lease in
/// kube-node-lease every `every` and, as a kubelet does when it finds its status changed,
/// posts every condition healthy again (Ready=True) with a fresh lastHeartbeatTime.
pub fn heartbeat(client: Client, name: &str, every: Duration) -> tokio::task::JoinHandle<()> {
    let name = name.to_string();
    tokio::spawn(async move {
        let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
        let nodes: Api<Node> = Api::all(client);
        loop {
            let now = MicroTime(jiff::Timestamp::now());
            let renew = json!({"spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": now}});
            match leases
                .patch(&name, &PatchParams::default(), &Patch::Merge(&renew))
                .await
            {
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    if let Ok(lease) = serde_json::from_value::<Lease>(json!({
                        "metadata": {"name": name, "namespace": "kube-node-lease"},
                        "spec": renew["spec"],
                    })) {
                        let _ = leases.create(&PostParams::default(), &lease).await;
                    }
                }
                _ => {}
            }
            if let Ok(node) = nodes.get(&name).await {
                let conditions = node.status.and_then(|s| s.conditions).unwrap_or_default();
                if conditions.iter().any(|c| c.status != healthy(&c.type_).0) {
                    let conditions: Vec<Value> = conditions
                        .iter()
                        .map(|c| {
                            let (status, reason) = healthy(&c.type_);
                            json!({"type": c.type_, "status": status, "reason": reason,
                                   "lastHeartbeatTime": Time(now.0), "lastTransitionTime": Time(now.0)})
                        })
                        .collect();
                    let status = json!({"status": {"conditions": conditions}});
                    let _ = nodes
                        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                        .await;
                }
            }
            tokio::time::sleep(every).await;
        }
    })
}

/// The status and reason a healthy kubelet posts for condition `type_`.
fn healthy(type_: &str) -> (&'static str, &'static str) {
    match type_ {
        "Ready" => ("True", "KubeletReady"),
        "MemoryPressure" => ("False", "KubeletHasSufficientMemory"),
        "DiskPressure" => ("False", "KubeletHasNoDiskPressure"),
        "PIDPressure" => ("False", "KubeletHasSufficientPID"),
        _ => ("False", "KubeletReady"),
    }
}

/// Creates a Ready fake node with `cpu` and `memory` allocatable (and 110 pods), `labels`
/// (plus `kubernetes.io/hostname`) and `taints`, heartbeating every [`HEARTBEAT`].
pub async fn node(
    client: &Client,
    name: &str,
    cpu: &str,
    memory: &str,
    labels: Value,
    taints: Value,
) -> Result<FakeNode> {
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
    let mut node = FakeNode {
        name: name.to_string(),
        client: client.clone(),
        every: HEARTBEAT,
        heartbeat: None,
    };
    node.start_heartbeat();
    Ok(node)
}

/// Plays the kubelet for every node: marks each bound, live pod in `pods` Running and Ready
/// with a pod IP of its own (10.244.0.0/16, in order), and finishes the graceful deletion of
/// terminating ones (delete with grace 0, as a kubelet does once the containers stopped),
/// every 100 ms, until the handle is aborted.
pub fn mark_bound_pods_ready(pods: Api<Pod>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut next_ip: u32 = 2;
        loop {
            if let Ok(list) = pods.list(&ListParams::default()).await {
                for p in list.items {
                    let bound = p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
                    let ready = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                    if bound && p.metadata.deletion_timestamp.is_some() {
                        let params = kube::api::DeleteParams {
                            grace_period_seconds: Some(0),
                            preconditions: p.metadata.uid.clone().map(|uid| kube::api::Preconditions {
                                uid: Some(uid),
                                resource_version: None,
                            }),
                            ..Default::default()
                        };
                        let _ = pods.delete(&p.name_any(), &params).await;
                        continue;
                    }
                    if bound && !ready {
                        let ip = std::net::Ipv4Addr::from(0x0af4_0000 + next_ip).to_string();
                        next_ip += 1;
                        let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                            "conditions": [
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
