//! The controllers `weir server` runs, against a real server and the real kubectl: default
//! ServiceAccounts, namespace deletion, the garbage collector's three propagation policies, and
//! EndpointSlices following Pods (whose status the test writes itself: there are no kubelets).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Endpoints, Node, Pod, Secret, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use weir_tests::{Backend, TestServer, describe, eventually};

/// How long a controller gets to act in these tests (they normally take milliseconds).
const SETTLE: Duration = Duration::from_secs(15);

fn create_namespace(server: &TestServer, name: &str) {
    server.kubectl_ok(&["create", "namespace", name]);
}

// ---------- ServiceAccounts ----------

async fn default_service_account(backend: Backend) -> Result<()> {
    let server = TestServer::start(backend).await?;
    let client = server.kube_client().await?;
    let started = Instant::now();
    create_namespace(&server, "team-a");
    let accounts: Api<ServiceAccount> = Api::namespaced(client, "team-a");
    let first = eventually("default ServiceAccount in team-a", SETTLE, || async {
        Ok(accounts.get_opt("default").await?)
    })
    .await?;
    eprintln!("default ServiceAccount after {:?}", started.elapsed());
    let listed = server.kubectl_ok(&["get", "serviceaccounts", "-n", "team-a", "-o", "name"]);
    ensure!(listed.trim() == "serviceaccount/default", "{listed}");

    accounts.delete("default", &DeleteParams::default()).await?;
    let again = eventually("default ServiceAccount recreated", SETTLE, || async {
        Ok(accounts.get_opt("default").await?.filter(|sa| sa.uid() != first.uid()))
    })
    .await?;
    ensure!(again.uid().is_some());
    // The system namespaces have one too.
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        server.kubectl_ok(&["get", "serviceaccount", "default", "-n", ns]);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_namespace_gets_a_default_service_account_embedded() -> Result<()> {
    default_service_account(Backend::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_namespace_gets_a_default_service_account_etcd() -> Result<()> {
    default_service_account(Backend::Etcd).await
}

// ---------- namespace deletion ----------

const CONTENT: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {a: "1"}
---
apiVersion: v1
kind: Secret
metadata: {name: token}
stringData: {t: secret}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, labels: {app: web}}
spec:
  containers: [{name: web, image: nginx}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: nginx}]
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: robot}
---
apiVersion: coordination.k8s.io/v1
kind: Lease
metadata: {name: lock}
spec: {holderIdentity: me}
"#;

/// Every namespaced resource the server lists, as `kubectl api-resources` names them.
fn namespaced_kinds(server: &TestServer) -> Vec<String> {
    server
        .kubectl_ok(&["api-resources", "--namespaced=true", "--verbs=list", "-o", "name"])
        .lines()
        .map(String::from)
        .collect()
}

fn leftovers(server: &TestServer, ns: &str) -> String {
    let kinds = namespaced_kinds(server).join(",");
    let out = server.kubectl(&["get", &kinds, "-n", ns, "-o", "name", "--ignore-not-found"]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

async fn namespace_deletion(backend: Backend) -> Result<()> {
    let server = TestServer::start(backend).await?;
    create_namespace(&server, "doomed");
    server.kubectl_stdin_ok(&["apply", "-n", "doomed", "-f", "-"], CONTENT);
    // Wait for what controllers add (ServiceAccount, EndpointSlice, Endpoints) so it is deleted too.
    eventually("controller-made objects in doomed", SETTLE, || async {
        let have = leftovers(&server, "doomed");
        Ok((have.contains("serviceaccount/default") && have.contains("endpointslice")).then_some(()))
    })
    .await?;
    let before = leftovers(&server, "doomed");
    ensure!(before.lines().count() >= 10, "expected many objects, got:\n{before}");

    let started = Instant::now();
    let out = server.kubectl_ok(&["delete", "namespace", "doomed", "--timeout=60s"]);
    let took = started.elapsed();
    eprintln!(
        "kubectl delete namespace (with {} objects) took {took:?}",
        before.lines().count()
    );
    ensure!(out.contains("namespace \"doomed\" deleted"), "{out}");
    let gone = server.kubectl(&["get", "namespace", "doomed"]);
    ensure!(!gone.status.success(), "namespace still there: {}", describe(&gone));
    let left = leftovers(&server, "doomed");
    ensure!(left.is_empty(), "left behind in doomed:\n{left}");

    // An object with a finalizer holds the namespace in Terminating, which refuses new content.
    create_namespace(&server, "held");
    server.kubectl_stdin_ok(
        &["apply", "-n", "held", "-f", "-"],
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: pinned, finalizers: [e2e.weir.dev/hold]}\n",
    );
    server.kubectl_ok(&["delete", "namespace", "held", "--wait=false"]);
    let phase = eventually("held is Terminating with its pinned ConfigMap", SETTLE, || async {
        let phase = server.kubectl_ok(&["get", "namespace", "held", "-o", "jsonpath={.status.phase}"]);
        let cm = server.kubectl_ok(&[
            "get",
            "configmap",
            "pinned",
            "-n",
            "held",
            "-o",
            "jsonpath={.metadata.deletionTimestamp}",
        ]);
        Ok((!cm.is_empty()).then_some(phase))
    })
    .await?;
    ensure!(phase == "Terminating", "phase {phase}");
    let refused = server.kubectl(&["create", "configmap", "late", "-n", "held"]);
    ensure!(
        !refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("being terminated"),
        "create in a terminating namespace: {}",
        describe(&refused)
    );
    server.kubectl_ok(&[
        "patch",
        "configmap",
        "pinned",
        "-n",
        "held",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    eventually("held gone after its last object", SETTLE, || async {
        let out = server.kubectl(&["get", "namespace", "held", "--ignore-not-found", "-o", "name"]);
        Ok(String::from_utf8_lossy(&out.stdout).trim().is_empty().then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_deletion_leaves_nothing_embedded() -> Result<()> {
    namespace_deletion(Backend::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_deletion_leaves_nothing_etcd() -> Result<()> {
    namespace_deletion(Backend::Etcd).await
}

// ---------- garbage collection ----------

struct Family {
    config_maps: Api<ConfigMap>,
    secrets: Api<Secret>,
}

/// A ConfigMap `owner` with dependents: ConfigMap `dep-cm`, Secret `dep-secret` (blocking its
/// owner's deletion, and held by a finalizer when `hold` is set).
async fn family(client: &Client, ns: &str, hold: bool) -> Result<Family> {
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let owner: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "owner"}, "data": {"role": "owner"}}))?;
    let owner = config_maps.create(&PostParams::default(), &owner).await?;
    let reference = |block: bool| json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.uid(), "blockOwnerDeletion": block}]);
    let dep: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "dep-cm", "ownerReferences": reference(false)}}))?;
    config_maps.create(&PostParams::default(), &dep).await?;
    let mut meta = json!({"name": "dep-secret", "ownerReferences": reference(true)});
    if hold {
        meta["finalizers"] = json!(["e2e.weir.dev/hold"]);
    }
    let secret: Secret = serde_json::from_value(json!({"metadata": meta, "stringData": {"k": "v"}}))?;
    secrets.create(&PostParams::default(), &secret).await?;
    Ok(Family { config_maps, secrets })
}

async fn cascade(backend: Backend) -> Result<()> {
    let server = TestServer::start(backend).await?;
    let client = server.kube_client().await?;

    // Background: the owner goes at once, the collector removes the dependents after.
    create_namespace(&server, "bg");
    let f = family(&client, "bg", false).await?;
    let started = Instant::now();
    server.kubectl_ok(&["delete", "configmap", "owner", "-n", "bg", "--cascade=background"]);
    ensure!(f.config_maps.get_opt("owner").await?.is_none(), "owner still there");
    eventually("background dependents deleted", SETTLE, || async {
        let cm = f.config_maps.get_opt("dep-cm").await?;
        let secret = f.secrets.get_opt("dep-secret").await?;
        Ok((cm.is_none() && secret.is_none()).then_some(()))
    })
    .await?;
    eprintln!("background cascade done after {:?}", started.elapsed());

    // Foreground: the owner waits, marked, until its blocking dependent is gone.
    create_namespace(&server, "fg");
    let f = family(&client, "fg", true).await?;
    let started = Instant::now();
    server.kubectl_ok(&[
        "delete",
        "configmap",
        "owner",
        "-n",
        "fg",
        "--cascade=foreground",
        "--wait=false",
    ]);
    let owner = f
        .config_maps
        .get_opt("owner")
        .await?
        .context("owner gone before its dependents")?;
    ensure!(
        owner.metadata.deletion_timestamp.is_some() && owner.finalizers().contains(&"foregroundDeletion".to_string()),
        "owner not held by foregroundDeletion: {:?}",
        owner.metadata
    );
    eventually("foreground dependents deleted", SETTLE, || async {
        let cm = f.config_maps.get_opt("dep-cm").await?;
        let secret = f.secrets.get_opt("dep-secret").await?;
        Ok((cm.is_none() && secret.is_some_and(|s| s.metadata.deletion_timestamp.is_some())).then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(
        f.config_maps.get_opt("owner").await?.is_some(),
        "the owner went while a blocking dependent remained"
    );
    f.secrets
        .patch(
            "dep-secret",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await?;
    eventually("foreground owner deleted after its dependents", SETTLE, || async {
        Ok(f.config_maps.get_opt("owner").await?.is_none().then_some(()))
    })
    .await?;
    ensure!(f.secrets.get_opt("dep-secret").await?.is_none());
    eprintln!("foreground cascade done after {:?}", started.elapsed());

    // Orphan: the owner goes, the dependents stay without their reference to it.
    create_namespace(&server, "orph");
    let f = family(&client, "orph", false).await?;
    let started = Instant::now();
    server.kubectl_ok(&[
        "delete",
        "configmap",
        "owner",
        "-n",
        "orph",
        "--cascade=orphan",
        "--timeout=30s",
    ]);
    ensure!(f.config_maps.get_opt("owner").await?.is_none(), "owner still there");
    eprintln!(
        "orphan cascade (kubectl waits for the owner) took {:?}",
        started.elapsed()
    );
    let cm = f.config_maps.get("dep-cm").await?;
    let secret = f.secrets.get("dep-secret").await?;
    ensure!(cm.owner_references().is_empty(), "{:?}", cm.metadata);
    ensure!(secret.owner_references().is_empty(), "{:?}", secret.metadata);
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(f.config_maps.get_opt("dep-cm").await?.is_some(), "orphan was collected");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cascading_deletion_background_foreground_orphan_embedded() -> Result<()> {
    cascade(Backend::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cascading_deletion_background_foreground_orphan_etcd() -> Result<()> {
    cascade(Backend::Etcd).await
}

// ---------- EndpointSlices ----------

fn pod(name: &str, port: i32, extra_spec: Value) -> Result<Pod> {
    let mut spec = json!({
        "nodeName": "node-a",
        "containers": [{"name": "web", "image": "nginx", "ports": [{"name": "http", "containerPort": port}]}],
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra_spec.as_object()) {
        spec.extend(extra.clone());
    }
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": spec,
    }))?)
}

/// What a kubelet would report: the Pod's IP and its Ready condition.
async fn set_status(pods: &Api<Pod>, name: &str, ip: &str, ready: bool) -> Result<()> {
    let status = json!({"status": {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await?;
    Ok(())
}

/// (address, ready, serving, terminating, port) for every endpoint of the Service's slices.
async fn endpoints_of(slices: &Api<EndpointSlice>, service: &str) -> Result<Vec<(String, bool, bool, bool, i32)>> {
    let list = slices
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={service}")))
        .await?;
    let mut out = Vec::new();
    for s in list.items {
        let port = s
            .ports
            .as_ref()
            .and_then(|p| p.first())
            .and_then(|p| p.port)
            .unwrap_or(0);
        for e in s.endpoints.unwrap_or_default() {
            let c = e.conditions.unwrap_or_default();
            out.push((
                e.addresses[0].clone(),
                c.ready == Some(true),
                c.serving == Some(true),
                c.terminating == Some(true),
                port,
            ));
        }
    }
    out.sort();
    Ok(out)
}

async fn endpoint_slices(backend: Backend) -> Result<()> {
    let server = TestServer::start(backend).await?;
    let client = server.kube_client().await?;
    create_namespace(&server, "shop");
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(
        json!({"metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "zone-1"}}}),
    )?;
    nodes.create(&PostParams::default(), &node).await?;
    server.kubectl_stdin_ok(
        &["apply", "-n", "shop", "-f", "-"],
        r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: web-all}
spec:
  clusterIP: None
  publishNotReadyAddresses: true
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
"#,
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "shop");
    let endpoints: Api<Endpoints> = Api::namespaced(client.clone(), "shop");
    pods.create(
        &PostParams::default(),
        &pod("web-0", 8080, json!({"hostname": "web-0", "subdomain": "web"}))?,
    )
    .await?;
    pods.create(&PostParams::default(), &pod("web-1", 9090, json!({}))?)
        .await?;
    // No IP yet: nothing to list.
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(endpoints_of(&slices, "web").await?.is_empty());

    set_status(&pods, "web-0", "10.244.0.10", false).await?;
    set_status(&pods, "web-1", "10.244.0.11", false).await?;
    let want_unready = vec![
        ("10.244.0.10".to_string(), false, false, false, 8080),
        ("10.244.0.11".to_string(), false, false, false, 9090),
    ];
    eventually("unready endpoints with per-pod named ports", SETTLE, || async {
        Ok((endpoints_of(&slices, "web").await? == want_unready).then_some(()))
    })
    .await?;

    // Readiness flips reach the slice within a second, both ways.
    let mut worst = Duration::ZERO;
    for (ready, round) in [(true, 1), (false, 2), (true, 3)] {
        let started = Instant::now();
        set_status(&pods, "web-0", "10.244.0.10", ready).await?;
        eventually(
            &format!("web-0 ready={ready} (round {round})"),
            Duration::from_secs(1),
            || async {
                let eps = endpoints_of(&slices, "web").await?;
                Ok(eps
                    .iter()
                    .any(|e| e.0 == "10.244.0.10" && e.1 == ready && e.2 == ready)
                    .then_some(()))
            },
        )
        .await?;
        worst = worst.max(started.elapsed());
    }
    eprintln!("slowest readiness change to reach the EndpointSlice: {worst:?}");

    // Details of the ready endpoint: hostname, node, zone, target, labels and owner.
    let list = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
        .await?;
    let slice = list
        .items
        .iter()
        .find(|s| s.endpoints.iter().flatten().any(|e| e.addresses[0] == "10.244.0.10"))
        .context("slice of web-0")?;
    let e = slice
        .endpoints
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.addresses[0] == "10.244.0.10")
        .unwrap();
    ensure!(e.hostname.as_deref() == Some("web-0"), "{e:?}");
    ensure!(
        e.node_name.as_deref() == Some("node-a") && e.zone.as_deref() == Some("zone-1"),
        "{e:?}"
    );
    ensure!(
        e.target_ref.as_ref().and_then(|t| t.name.as_deref()) == Some("web-0"),
        "{e:?}"
    );
    ensure!(
        slice
            .labels()
            .get("endpointslice.kubernetes.io/managed-by")
            .map(String::as_str)
            == Some("endpointslice-controller.k8s.io"),
        "{:?}",
        slice.metadata.labels
    );
    ensure!(
        slice
            .owner_references()
            .first()
            .is_some_and(|o| o.kind == "Service" && o.name == "web")
    );
    let port = &slice.ports.as_ref().unwrap()[0];
    ensure!(
        port.name.as_deref() == Some("http") && port.port == Some(8080),
        "{port:?}"
    );

    // The legacy Endpoints mirror it (written right after the slices).
    eventually("Endpoints mirror the slices", Duration::from_secs(1), || async {
        let subsets = endpoints.get("web").await?.subsets.unwrap_or_default();
        let ready: Vec<String> = subsets
            .iter()
            .flat_map(|s| s.addresses.iter().flatten())
            .map(|a| a.ip.clone())
            .collect();
        let not_ready: Vec<String> = subsets
            .iter()
            .flat_map(|s| s.not_ready_addresses.iter().flatten())
            .map(|a| a.ip.clone())
            .collect();
        Ok((ready == ["10.244.0.10"] && not_ready == ["10.244.0.11"]).then_some(()))
    })
    .await?;
    let kubectl_eps = server.kubectl_ok(&[
        "get",
        "endpoints",
        "web",
        "-n",
        "shop",
        "-o",
        "jsonpath={.subsets[*].addresses[*].ip}",
    ]);
    ensure!(kubectl_eps.trim() == "10.244.0.10", "{kubectl_eps}");

    // publishNotReadyAddresses: every pod counts as ready.
    let all = endpoints_of(&slices, "web-all").await?;
    ensure!(
        all.len() == 2 && all.iter().all(|e| e.1 && e.2),
        "publishNotReadyAddresses: {all:?}"
    );

    // A deleted pod leaves the slices; a pod held by a finalizer shows as terminating first.
    pods.patch(
        "web-1",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": ["e2e.weir.dev/hold"]}})),
    )
    .await?;
    set_status(&pods, "web-1", "10.244.0.11", true).await?;
    pods.delete("web-1", &DeleteParams::default()).await?;
    eventually("terminating web-1", Duration::from_secs(1), || async {
        let eps = endpoints_of(&slices, "web").await?;
        Ok(eps
            .iter()
            .any(|e| e.0 == "10.244.0.11" && !e.1 && e.2 && e.3)
            .then_some(()))
    })
    .await?;
    pods.patch(
        "web-1",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await?;
    eventually("web-1 gone from the slices", Duration::from_secs(1), || async {
        let eps = endpoints_of(&slices, "web").await?;
        Ok((eps.len() == 1 && eps[0].0 == "10.244.0.10").then_some(()))
    })
    .await?;

    // A pod whose labels stop matching leaves too.
    pods.patch(
        "web-0",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "other"}}})),
    )
    .await?;
    eventually(
        "relabelled web-0 gone from the slices",
        Duration::from_secs(1),
        || async { Ok(endpoints_of(&slices, "web").await?.is_empty().then_some(())) },
    )
    .await?;

    // Deleting the Service takes its slices and Endpoints with it (garbage collector).
    server.kubectl_ok(&["delete", "service", "web", "-n", "shop"]);
    eventually("web's slices and Endpoints collected", SETTLE, || async {
        let left = slices
            .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
            .await?
            .items
            .len();
        Ok((left == 0 && endpoints.get_opt("web").await?.is_none()).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_slices_follow_pods_embedded() -> Result<()> {
    endpoint_slices(Backend::Embedded).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_slices_follow_pods_etcd() -> Result<()> {
    endpoint_slices(Backend::Etcd).await
}
