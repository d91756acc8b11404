//! Persistent volumes in `weir server`, driven by the real kubectl against fake Nodes: a claim
//! without a class gets `local-path`, waits for its first pod, is provisioned on that pod's node
//! and keeps later pods there; deleting it deletes the volume. Static volumes bind by class, size
//! and access modes (the smallest that fits) and Retain leaves them Released.

use std::time::Duration;

use anyhow::{Result, ensure};
use k8s_openapi::api::core::v1::{Event, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use weir_tests::{Backend, TestServer, eventually, fake};

const SETTLE: Duration = Duration::from_secs(15);

fn pod_with_claim(name: &str, claim: &str, cpu: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
spec:
  containers:
  - name: c
    image: busybox
    resources:
      requests:
        cpu: "{cpu}"
    volumeMounts:
    - name: data
      mountPath: /data
  volumes:
  - name: data
    persistentVolumeClaim:
      claimName: {claim}
"#
    )
}

async fn node_of(pods: &Api<Pod>, name: &str) -> Result<String> {
    eventually(&format!("pod {name} bound"), SETTLE, || async {
        Ok(pods.get(name).await?.spec.and_then(|s| s.node_name))
    })
    .await
}

async fn event(client: &Client, object: &str, reason: &str) -> Result<Event> {
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    eventually(&format!("event {reason} on {object}"), SETTLE, || async {
        let list = events.list(&ListParams::default()).await?;
        Ok(list
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some(reason) && e.involved_object.name.as_deref() == Some(object)))
    })
    .await
}

fn phase_of_claim(c: &PersistentVolumeClaim) -> &str {
    c.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("")
}

fn phase_of_volume(v: &PersistentVolume) -> &str {
    v.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("")
}

async fn unschedulable_message(pods: &Api<Pod>, name: &str) -> Result<String> {
    eventually(&format!("{name} marked unschedulable"), SETTLE, || async {
        let pod = pods.get(name).await?;
        Ok(pod
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False")
            .and_then(|c| c.message))
    })
    .await
}

async fn local_path_claims_follow_their_first_pod(backend: Backend) -> Result<()> {
    let server = TestServer::start(backend).await?;
    let client = server.kube_client().await?;
    fake::node(&client, "a", "4", "16Gi", json!({}), json!([])).await?;
    fake::node(&client, "b", "4", "16Gi", json!({}), json!([])).await?;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    // Deleted pods terminate on their node: the stand-in kubelet finishes them.
    let _kubelet = fake::mark_bound_pods_ready(pods.clone());

    let classes = server.kubectl_ok(&["get", "storageclass"]);
    ensure!(
        classes.contains("local-path (default)") && classes.contains("weir.dev/local-path"),
        "{classes}"
    );
    server.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: data\nspec:\n  accessModes: [ReadWriteOnce]\n  resources:\n    requests:\n      storage: 2Gi\n",
    );
    let class = server.kubectl_ok(&["get", "pvc", "data", "-o", "jsonpath={.spec.storageClassName}"]);
    ensure!(class == "local-path", "{class}");
    let waiting = event(&client, "data", "WaitForFirstConsumer").await?;
    ensure!(
        waiting.message.as_deref() == Some("waiting for first consumer to be created before binding"),
        "{waiting:?}"
    );
    ensure!(phase_of_claim(&claims.get("data").await?) == "Pending");
    ensure!(volumes.list(&ListParams::default()).await?.items.is_empty());

    // A pod using a claim that does not exist is unschedulable until the claim appears.
    server.kubectl_stdin_ok(&["apply", "-f", "-"], &pod_with_claim("early", "later", "100m"));
    let message = unschedulable_message(&pods, "early").await?;
    ensure!(
        message == "0/2 nodes are available: persistentvolumeclaim \"later\" not found.",
        "{message}"
    );

    server.kubectl_stdin_ok(&["apply", "-f", "-"], &pod_with_claim("writer", "data", "2"));
    let node = node_of(&pods, "writer").await?;
    let claim = eventually("claim data bound", SETTLE, || async {
        let c = claims.get("data").await?;
        Ok((phase_of_claim(&c) == "Bound").then_some(c))
    })
    .await?;
    let uid = claim.uid().unwrap_or_default();
    let volume_name = format!("pvc-{uid}");
    ensure!(claim.spec.as_ref().and_then(|s| s.volume_name.as_deref()) == Some(volume_name.as_str()));
    ensure!(claim.annotations().get("volume.kubernetes.io/selected-node") == Some(&node));
    ensure!(
        claim
            .annotations()
            .get("pv.kubernetes.io/bind-completed")
            .map(String::as_str)
            == Some("yes")
    );
    let capacity = claim
        .status
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .map(|c| c["storage"].0.clone());
    ensure!(capacity.as_deref() == Some("2Gi"), "{capacity:?}");
    let pv = volumes.get(&volume_name).await?;
    let pv_json = serde_json::to_value(&pv)?;
    ensure!(
        pv_json["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]["values"]
            == json!([node]),
        "{pv_json}"
    );
    ensure!(
        pv_json["spec"]["hostPath"]["path"] == json!(format!("/var/lib/weir/storage/pvc-{uid}_default_data")),
        "{pv_json}"
    );
    ensure!(
        pv.annotations()
            .get("pv.kubernetes.io/provisioned-by")
            .map(String::as_str)
            == Some("weir.dev/local-path")
    );
    ensure!(pv_json["spec"]["persistentVolumeReclaimPolicy"] == "Delete");
    event(&client, "data", "ProvisioningSucceeded").await?;
    eventually("volume Bound", SETTLE, || async {
        Ok((phase_of_volume(&volumes.get(&volume_name).await?) == "Bound").then_some(()))
    })
    .await?;
    let listed = server.kubectl_ok(&["get", "pvc", "data"]);
    ensure!(listed.contains("Bound") && listed.contains(&volume_name), "{listed}");

    // The writer's node is the busier one; the volume still brings the reader there.
    server.kubectl_stdin_ok(&["apply", "-f", "-"], &pod_with_claim("reader", "data", "100m"));
    ensure!(node_of(&pods, "reader").await? == node);

    // Two pods sharing a new claim land together, even when the second prefers another node.
    let together = [
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: shared\nspec:\n  accessModes: [ReadWriteOnce]\n  resources:\n    requests:\n      storage: 1Gi\n".to_string(),
        pod_with_claim("first", "shared", "100m"),
        // Drawn to the writer's node, but the claim it shares with "first" decides.
        pod_with_claim("second", "shared", "100m").replace(
            "spec:\n",
            &format!("spec:\n  affinity:\n    nodeAffinity:\n      preferredDuringSchedulingIgnoredDuringExecution:\n      - weight: 100\n        preference:\n          matchFields:\n          - {{key: metadata.name, operator: In, values: [{node}]}}\n"),
        ),
    ]
    .join("---\n");
    server.kubectl_stdin_ok(&["apply", "-f", "-"], &together);
    let first = node_of(&pods, "first").await?;
    ensure!(first != node, "{first}");
    ensure!(node_of(&pods, "second").await? == first);

    // In use: deleting the claim leaves it Terminating until its pods are gone.
    ensure!(
        claim.finalizers() == ["kubernetes.io/pvc-protection"],
        "{:?}",
        claim.finalizers()
    );
    ensure!(
        pv.finalizers() == ["kubernetes.io/pv-protection"],
        "{:?}",
        pv.finalizers()
    );
    server.kubectl_ok(&["delete", "pvc", "data", "--wait=false"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let terminating = claims.get("data").await?;
    ensure!(terminating.metadata.deletion_timestamp.is_some());
    ensure!(volumes.get_opt(&volume_name).await?.is_some());
    let early = unschedulable_message(&pods, "early").await?;
    ensure!(early.contains("not found"), "{early}");
    server.kubectl_ok(&["delete", "pod", "writer", "reader", "early", "--wait=false"]);
    eventually("claim gone with its pods", SETTLE, || async {
        Ok(claims.get_opt("data").await?.is_none().then_some(()))
    })
    .await?;
    eventually("provisioned volume deleted with its claim", SETTLE, || async {
        Ok(volumes.get_opt(&volume_name).await?.is_none().then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_path_claims_follow_their_first_pod_embedded() -> Result<()> {
    local_path_claims_follow_their_first_pod(Backend::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_path_claims_follow_their_first_pod_etcd() -> Result<()> {
    local_path_claims_follow_their_first_pod(Backend::Etcd).await
}

fn static_volume(name: &str, size: &str, modes: &str) -> String {
    format!(
        "apiVersion: v1\nkind: PersistentVolume\nmetadata:\n  name: {name}\nspec:\n  storageClassName: manual\n  capacity:\n    storage: {size}\n  accessModes: {modes}\n  hostPath:\n    path: /srv/{name}\n"
    )
}

async fn static_volumes_bind_by_size_and_modes(backend: Backend) -> Result<()> {
    let server = TestServer::start(backend).await?;
    let client = server.kube_client().await?;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let manifests = [
        static_volume("pv-1g", "1Gi", "[ReadWriteOnce]"),
        static_volume("pv-10g", "10Gi", "[ReadWriteOnce, ReadWriteMany]"),
        static_volume("pv-5g", "5Gi", "[ReadWriteOnce]"),
        static_volume("pv-3g-readonly", "3Gi", "[ReadOnlyMany]"),
    ]
    .join("---\n");
    server.kubectl_stdin_ok(&["apply", "-f", "-"], &manifests);
    eventually("static volumes Available", SETTLE, || async {
        let list = volumes.list(&ListParams::default()).await?;
        Ok(list
            .items
            .iter()
            .all(|v| phase_of_volume(v) == "Available")
            .then_some(()))
    })
    .await?;
    let claim = |name: &str, size: &str, modes: &str| {
        format!(
            "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: {name}\nspec:\n  storageClassName: manual\n  accessModes: {modes}\n  resources:\n    requests:\n      storage: {size}\n"
        )
    };
    server.kubectl_stdin_ok(&["apply", "-f", "-"], &claim("fits", "2Gi", "[ReadWriteOnce]"));
    server.kubectl_stdin_ok(&["apply", "-f", "-"], &claim("shared", "2Gi", "[ReadWriteMany]"));
    let bound_to = |name: &'static str| {
        let claims = claims.clone();
        async move {
            eventually(&format!("claim {name} bound"), SETTLE, || async {
                let c = claims.get(name).await?;
                Ok((phase_of_claim(&c) == "Bound").then(|| c.spec.and_then(|s| s.volume_name).unwrap_or_default()))
            })
            .await
        }
    };
    ensure!(bound_to("fits").await? == "pv-5g");
    ensure!(bound_to("shared").await? == "pv-10g");
    let fits = claims.get("fits").await?;
    let status = serde_json::to_value(&fits.status)?;
    ensure!(
        status["capacity"]["storage"] == "5Gi" && status["accessModes"] == json!(["ReadWriteOnce"]),
        "{status}"
    );
    ensure!(
        fits.annotations()
            .get("pv.kubernetes.io/bound-by-controller")
            .map(String::as_str)
            == Some("yes")
    );
    let pv = volumes.get("pv-5g").await?;
    ensure!(phase_of_volume(&pv) == "Bound");
    ensure!(pv.spec.and_then(|s| s.claim_ref).and_then(|r| r.uid) == fits.uid());

    // Nothing left can serve a 20Gi claim; a claim with no class at all says so.
    server.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: classless\nspec:\n  storageClassName: \"\"\n  accessModes: [ReadWriteOnce]\n  resources:\n    requests:\n      storage: 20Gi\n",
    );
    let failed = event(&client, "classless", "FailedBinding").await?;
    ensure!(
        failed.message.as_deref() == Some("no persistent volumes available for this claim and no storage class is set"),
        "{failed:?}"
    );

    // local-path needs to know the node: with Immediate binding it refuses, and says why.
    server.kubectl_stdin_ok(
        &["apply", "-f", "-"],
        "apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata:\n  name: local-now\nprovisioner: weir.dev/local-path\nvolumeBindingMode: Immediate\n---\napiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: now\nspec:\n  storageClassName: local-now\n  accessModes: [ReadWriteOnce]\n  resources:\n    requests:\n      storage: 1Gi\n",
    );
    let refused = event(&client, "now", "ProvisioningFailed").await?;
    ensure!(
        refused
            .message
            .as_deref()
            .is_some_and(|m| m.contains("WaitForFirstConsumer")),
        "{refused:?}"
    );

    // Retain: the volume outlives its claim, Released.
    server.kubectl_ok(&["delete", "pvc", "fits"]);
    eventually("pv-5g Released", SETTLE, || async {
        Ok((phase_of_volume(&volumes.get("pv-5g").await?) == "Released").then_some(()))
    })
    .await?;
    let listed = server.kubectl_ok(&["get", "pv", "pv-5g"]);
    ensure!(listed.contains("Released") && listed.contains("Retain"), "{listed}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_volumes_bind_by_size_and_modes_embedded() -> Result<()> {
    static_volumes_bind_by_size_and_modes(Backend::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_volumes_bind_by_size_and_modes_etcd() -> Result<()> {
    static_volumes_bind_by_size_and_modes(Backend::Etcd).await
}
