//! Node lifecycle in `weir server` against a real server with fake Nodes that heartbeat through
//! Leases: a node that goes silent turns NotReady, is tainted unreachable and loses its pods
//! after their default tolerationSeconds (they come back on the other node); heartbeats
//! returning clear the taint; a NoExecute taint a pod does not tolerate evicts it at once, one
//! it tolerates for 2 s after 2 s; a node reporting Ready=False is tainted not-ready.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use weir_tests::{Backend, TestServer, eventually, fake};

const SETTLE: Duration = Duration::from_secs(15);
const FAST: &[&str] = &[
    "--node-monitor-grace-period",
    "3s",
    "--default-unreachable-toleration-seconds",
    "2",
    "--default-not-ready-toleration-seconds",
    "2",
];

async fn fast_node(client: &Client, name: &str) -> Result<fake::FakeNode> {
    let mut node = fake::node(client, name, "4", "8Gi", json!({}), json!([])).await?;
    node.heartbeat_every(Duration::from_millis(500));
    Ok(node)
}

fn ready(node: &Node) -> String {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status.clone())
        .unwrap_or_default()
}

fn taint_keys(node: &Node) -> Vec<String> {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .map(|t| format!("{}:{}", t.key, t.effect))
        .collect()
}

async fn live_pods(pods: &Api<Pod>, selector: &str) -> Result<Vec<Pod>> {
    let list = pods.list(&ListParams::default().labels(selector)).await?;
    Ok(list
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect())
}

fn node_of(p: &Pod) -> Option<&str> {
    p.spec.as_ref().and_then(|s| s.node_name.as_deref())
}

async fn events(client: &Client, reason: &str) -> Result<Vec<Event>> {
    let api: Api<Event> = Api::all(client.clone());
    let list = api.list(&ListParams::default()).await?;
    Ok(list
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .collect())
}

async fn silent_node_loses_its_pods_and_heals(backend: Backend) -> Result<()> {
    let server = TestServer::start_with_args(backend, FAST).await?;
    let client = server.kube_client().await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let kubelet = fake::mark_bound_pods_ready(pods.clone());
    let mut n1 = fast_node(&client, "n1").await?;
    server.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        &json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "c", "image": "nginx"}]}}}})
        .to_string(),
    );
    let first = eventually("3 web pods bound to n1", SETTLE, || async {
        let live = live_pods(&pods, "app=web").await?;
        Ok((live.len() == 3 && live.iter().all(|p| node_of(p) == Some("n1"))).then_some(live))
    })
    .await?;
    // Every pod got the default tolerations, with the flag's seconds.
    let tolerations = first[0].spec.as_ref().unwrap().tolerations.clone().unwrap_or_default();
    ensure!(
        tolerations
            .iter()
            .any(|t| t.key.as_deref() == Some("node.kubernetes.io/unreachable")
                && t.effect.as_deref() == Some("NoExecute")
                && t.toleration_seconds == Some(2)),
        "default unreachable toleration missing: {tolerations:?}"
    );
    let _n2 = fast_node(&client, "n2").await?;

    // n1 goes silent: Unknown after the 3 s grace, tainted, its pods gone 2 s later.
    n1.stop_heartbeat();
    let silent = Instant::now();
    eventually("n1 NotReady and tainted unreachable", SETTLE, || async {
        let n = nodes.get("n1").await?;
        let taints = taint_keys(&n);
        Ok((ready(&n) == "Unknown"
            && taints.contains(&"node.kubernetes.io/unreachable:NoExecute".to_string())
            && taints.contains(&"node.kubernetes.io/unreachable:NoSchedule".to_string()))
        .then_some(()))
    })
    .await?;
    let marked = silent.elapsed();
    let n = nodes.get("n1").await?;
    let condition = n.status.unwrap().conditions.unwrap();
    let condition = condition.iter().find(|c| c.type_ == "Ready").unwrap();
    ensure!(
        condition.reason.as_deref() == Some("NodeStatusUnknown"),
        "{condition:?}"
    );
    ensure!(
        condition.message.as_deref() == Some("Kubelet stopped posting node status."),
        "{condition:?}"
    );
    // The last heartbeat may have been up to 500 ms before the stop.
    ensure!(
        marked >= Duration::from_millis(2500),
        "marked after {marked:?}, before the 3 s grace period"
    );
    let table = server.kubectl_ok(&["get", "nodes"]);
    ensure!(
        table.lines().any(|l| l.starts_with("n1 ") && l.contains("NotReady")),
        "{table}"
    );

    let added = n
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .find(|t| t.key == "node.kubernetes.io/unreachable" && t.effect == "NoExecute")
        .and_then(|t| t.time_added.clone())
        .expect("the unreachable taint has a timeAdded")
        .0;
    let old: Vec<String> = first.iter().map(|p| p.name_any()).collect();
    // Marked NotReady before the taint was written, so still here (eviction comes ≥ 1 s
    // after the taint) and no longer Ready: Services stop sending them traffic.
    let live = live_pods(&pods, "app=web").await?;
    let on_n1: Vec<&Pod> = live.iter().filter(|p| node_of(p) == Some("n1")).collect();
    ensure!(!on_n1.is_empty(), "pods evicted as soon as the taint appeared");
    for p in on_n1 {
        let ready = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.status.clone());
        ensure!(ready.as_deref() == Some("False"), "{} Ready {ready:?}", p.name_any());
    }
    eventually("web pods recreated on n2", SETTLE, || async {
        let live = live_pods(&pods, "app=web").await?;
        Ok((live.len() == 3
            && live
                .iter()
                .all(|p| node_of(p) == Some("n2") && !old.contains(&p.name_any())))
        .then_some(()))
    })
    .await?;
    let moved = silent.elapsed();
    eprintln!("silent node: marked NotReady after {marked:?}, pods recreated on n2 after {moved:?}");
    let evictions = events(&client, "TaintManagerEviction").await?;
    for name in &old {
        let event = evictions
            .iter()
            .find(|e| e.message.as_deref() == Some(&format!("Marking for deletion Pod default/{name}")))
            .ok_or_else(|| anyhow::anyhow!("no eviction event for {name}: {evictions:?}"))?;
        // Evicted no earlier than 2 s (the default toleration) after the taint's timeAdded.
        let at = event.event_time.as_ref().expect("eventTime").0;
        ensure!(
            at >= added + jiff::SignedDuration::from_secs(2),
            "{name} evicted at {at}, before its 2 s toleration of the taint added at {added}"
        );
    }
    ensure!(
        !events(&client, "NodeNotReady").await?.is_empty(),
        "no NodeNotReady event"
    );
    let described = server.kubectl_ok(&["describe", "node", "n1"]);
    ensure!(described.contains("NodeNotReady"), "{described}");

    // The kubelet is back: Ready again, taints gone.
    n1.start_heartbeat();
    eventually("n1 Ready and untainted", SETTLE, || async {
        let n = nodes.get("n1").await?;
        Ok((ready(&n) == "True" && taint_keys(&n).is_empty()).then_some(()))
    })
    .await?;
    kubelet.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_node_loses_its_pods_and_heals_embedded() -> Result<()> {
    silent_node_loses_its_pods_and_heals(Backend::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_node_loses_its_pods_and_heals_etcd() -> Result<()> {
    silent_node_loses_its_pods_and_heals(Backend::Etcd).await
}

async fn create_pod(pods: &Api<Pod>, name: &str, tolerations: serde_json::Value) -> Result<()> {
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"nodeName": "n1", "tolerations": tolerations,
                 "containers": [{"name": "c", "image": "nginx"}]},
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    Ok(())
}

async fn no_execute_taint_evicts_untolerating_pods(backend: Backend) -> Result<()> {
    let server = TestServer::start_with_args(backend, FAST).await?;
    let client = server.kube_client().await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut n1 = fast_node(&client, "n1").await?;
    create_pod(&pods, "plain", json!([])).await?;
    create_pod(
        &pods,
        "patient",
        json!([{"key": "maintenance", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 2}]),
    )
    .await?;
    create_pod(
        &pods,
        "stubborn",
        json!([{"key": "maintenance", "operator": "Exists", "effect": "NoExecute"}]),
    )
    .await?;
    let tainted = Instant::now();
    server.kubectl_ok(&["taint", "nodes", "n1", "maintenance=now:NoExecute"]);
    // Evicted: marked for deletion (the pod terminates gracefully on its node, as in Kubernetes).
    let evicted = |p: Option<Pod>| p.is_none_or(|p| p.metadata.deletion_timestamp.is_some());
    eventually("plain evicted", SETTLE, || async {
        Ok(evicted(pods.get_opt("plain").await?).then_some(()))
    })
    .await?;
    let at_once = tainted.elapsed();
    ensure!(
        !evicted(pods.get_opt("patient").await?),
        "patient evicted before its 2 s"
    );
    eventually("patient evicted", SETTLE, || async {
        Ok(evicted(pods.get_opt("patient").await?).then_some(()))
    })
    .await?;
    let patient = tainted.elapsed();
    ensure!(patient >= Duration::from_secs(2), "patient evicted after {patient:?}");
    eprintln!("NoExecute taint: untolerating pod evicted after {at_once:?}, 2 s toleration after {patient:?}");
    // Tolerated forever: still there well after.
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure!(!evicted(pods.get_opt("stubborn").await?), "stubborn evicted");
    let described = server.kubectl_ok(&["describe", "pod", "stubborn"]);
    ensure!(described.contains("maintenance:NoExecute op=Exists"), "{described}");

    // A kubelet that reports NotReady (while heartbeating) gets the not-ready taints.
    n1.stop_heartbeat();
    let nodes: Api<Node> = Api::all(client.clone());
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now());
    let status = json!({"status": {"conditions": [{"type": "Ready", "status": "False", "reason": "KubeletNotReady",
        "lastHeartbeatTime": now, "lastTransitionTime": now}]}});
    nodes
        .patch_status("n1", &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    eventually("n1 tainted not-ready", SETTLE, || async {
        let taints = taint_keys(&nodes.get("n1").await?);
        Ok((taints.contains(&"node.kubernetes.io/not-ready:NoExecute".to_string())
            && taints.contains(&"node.kubernetes.io/not-ready:NoSchedule".to_string())
            && !taints.iter().any(|t| t.starts_with("node.kubernetes.io/unreachable")))
        .then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_execute_taint_evicts_untolerating_pods_embedded() -> Result<()> {
    no_execute_taint_evicts_untolerating_pods(Backend::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_execute_taint_evicts_untolerating_pods_etcd() -> Result<()> {
    no_execute_taint_evicts_untolerating_pods(Backend::Etcd).await
}

fn pod_cidrs(node: &Node) -> Vec<String> {
    node.spec.as_ref().and_then(|s| s.pod_cidrs.clone()).unwrap_or_default()
}

/// Node IPAM: each node gets a block of --cluster-cidr (here a /23 of two /24s), a deleted
/// node's block goes to the next node, a node beyond the CIDR waits with a CIDRNotAvailable
/// Event and gets the block a deletion frees; the real kubectl shows the podCIDR.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_get_pod_cidrs_from_the_cluster_cidr() -> Result<()> {
    let server = TestServer::start_with_args(Backend::Embedded, &["--cluster-cidr", "10.50.0.0/23"]).await?;
    let client = server.kube_client().await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let cidr_of = |name: &'static str| {
        let nodes = nodes.clone();
        async move {
            eventually(&format!("{name} gets a podCIDR"), SETTLE, || async {
                let node = nodes.get(name).await?;
                let cidrs = pod_cidrs(&node);
                let single = node.spec.as_ref().and_then(|s| s.pod_cidr.clone());
                Ok((!cidrs.is_empty()).then(|| {
                    assert_eq!(single.as_ref(), cidrs.first(), "podCIDR is podCIDRs[0]");
                    cidrs
                }))
            })
            .await
        }
    };
    fake::node(&client, "ipam-a", "4", "8Gi", json!({}), json!([])).await?;
    assert_eq!(cidr_of("ipam-a").await?, ["10.50.0.0/24"]);
    fake::node(&client, "ipam-b", "4", "8Gi", json!({}), json!([])).await?;
    assert_eq!(cidr_of("ipam-b").await?, ["10.50.1.0/24"]);

    fake::node(&client, "ipam-c", "4", "8Gi", json!({}), json!([])).await?;
    eventually("ipam-c hears that the cluster CIDR is full", SETTLE, || async {
        let events = events(&client, "CIDRNotAvailable").await?;
        Ok(events
            .iter()
            .any(|e| e.involved_object.name.as_deref() == Some("ipam-c"))
            .then_some(()))
    })
    .await?;
    ensure!(pod_cidrs(&nodes.get("ipam-c").await?).is_empty());

    let out = server.kubectl(&["get", "node", "ipam-b", "-o", "jsonpath={.spec.podCIDR}"]);
    ensure!(String::from_utf8_lossy(&out.stdout) == "10.50.1.0/24", "{out:?}");

    nodes.delete("ipam-a", &Default::default()).await?;
    assert_eq!(cidr_of("ipam-c").await?, ["10.50.0.0/24"], "the freed block");
    Ok(())
}
