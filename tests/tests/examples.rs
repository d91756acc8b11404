//! The walkthrough in examples/ (a web app: ConfigMap, Secret, Deployment, Service, Ingress;
//! a database: headless Service and a StatefulSet with volume claims) applies with the real
//! kubectl, and with a node (a fake one, and a stand-in kubelet marking pods ready) the
//! controllers bring it up: 3 web pods behind the Service's EndpointSlice, db-0 and db-1
//! each with a bound claim of its own. Applying it again changes nothing.

use std::time::Duration;

use anyhow::{Result, ensure};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use serde_json::json;
use weir_tests::{Backend, TestServer, eventually, fake, workspace_dir};

const SETTLE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_apply_and_come_up() -> Result<()> {
    let server = TestServer::start(Backend::Embedded).await?;
    let examples = workspace_dir().join("examples");
    let examples = examples.to_str().expect("a UTF-8 path");
    let out = server.kubectl(&["apply", "-f", examples]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(out.status.success(), "{out:?}");
    for object in [
        "configmap/web-config created",
        "secret/web-secret created",
        "deployment.apps/web created",
        "service/web created",
        "ingress.networking.k8s.io/web created",
        "service/db created",
        "statefulset.apps/db created",
    ] {
        ensure!(stdout.contains(object), "{object:?} missing from:\n{stdout}");
    }

    let client = server.kube_client().await?;
    fake::node(&client, "example-node", "8", "16Gi", json!({}), json!([])).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let _kubelet = fake::mark_bound_pods_ready(pods);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    eventually("the web Deployment has 3 available pods", SETTLE, || async {
        let d = deployments.get("web").await?;
        Ok((d.status.and_then(|s| s.available_replicas) == Some(3)).then_some(()))
    })
    .await?;
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    eventually("the web Service has 3 ready endpoints", SETTLE, || async {
        let list = slices
            .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
            .await?;
        let ready = list
            .items
            .iter()
            .flat_map(|s| s.endpoints.iter().flatten())
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
            .count();
        Ok((ready == 3).then_some(()))
    })
    .await?;
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    eventually("the db StatefulSet has 2 ready pods", SETTLE, || async {
        let s = sets.get("db").await?;
        Ok((s.status.and_then(|s| s.ready_replicas) == Some(2)).then_some(()))
    })
    .await?;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    for claim in ["data-db-0", "data-db-1"] {
        let phase = claims.get(claim).await?.status.and_then(|s| s.phase);
        ensure!(phase.as_deref() == Some("Bound"), "{claim}: {phase:?}");
    }

    let generation = |d: &Deployment| d.metadata.generation;
    let before = deployments.get("web").await?;
    let out = server.kubectl(&["apply", "-f", examples]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(out.status.success(), "{out:?}");
    // The Secret's stringData never shows in the live object (the server folds it into
    // data), so kubectl patches it again, as against Kubernetes; the StatefulSet's volume
    // claim templates are the same known case as in the kubectl test.
    ensure!(
        stdout
            .lines()
            .filter(|l| !l.starts_with("secret/web-secret ") && !l.starts_with("statefulset.apps/db "))
            .all(|l| l.ends_with(" unchanged")),
        "applying again changes nothing:\n{stdout}"
    );
    ensure!(generation(&deployments.get("web").await?) == generation(&before));
    let secret: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), "default");
    let data = secret.get("web-secret").await?.data.unwrap_or_default();
    ensure!(data.get("API_TOKEN").map(|v| v.0.as_slice()) == Some(b"change-me".as_slice()));
    Ok(())
}
