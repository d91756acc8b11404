//! The everyday kubectl workflow against a real weir server, once per store: apply, diff,
//! get (tables, yaml, json, selectors, watch), edit, label, annotate, patch, scale, delete,
//! api-resources and explain. Outputs are compared with what Kubernetes prints.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use weir_tests::{Backend, TestServer, describe, in_service_cidr};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_workflow_on_embedded_store() {
    kubectl_workflow(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_workflow_on_etcd() {
    kubectl_workflow(Backend::Etcd).await;
}

const APP_V1: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: demo
  labels: {app: web}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: nginx:1.27
        ports:
        - containerPort: 80
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: demo
  labels: {app: web}
spec:
  selector: {app: web}
  ports:
  - name: http
    port: 80
    targetPort: 80
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: web-config
  namespace: demo
  labels: {app: web}
data:
  greeting: hello
  mode: production
---
apiVersion: v1
kind: Secret
metadata:
  name: web-secret
  namespace: demo
type: Opaque
data:
  password: c2VjcmV0
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: web
  namespace: demo
spec:
  rules:
  - host: web.example.com
    http:
      paths:
      - path: /
        pathType: Prefix
        backend:
          service:
            name: web
            port: {number: 80}
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: db
  namespace: demo
spec:
  serviceName: db
  replicas: 1
  selector:
    matchLabels: {app: db}
  template:
    metadata:
      labels: {app: db}
    spec:
      containers:
      - name: db
        image: postgres:17
        volumeMounts:
        - name: data
          mountPath: /var/lib/postgresql/data
  volumeClaimTemplates:
  - metadata:
      name: data
    spec:
      accessModes: [ReadWriteOnce]
      resources:
        requests: {storage: 1Gi}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: shared
  namespace: demo
spec:
  accessModes: [ReadWriteOnce]
  resources:
    requests: {storage: 2Gi}
"#;

const SERVER_SIDE_CONFIG: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata:
  name: ssa-config
  namespace: demo
  labels: {app: ssa}
data:
  owner: server-side
"#;

/// The objects of APP_V1 as kubectl names them in its output.
const APP_OBJECTS: [&str; 7] = [
    "deployment.apps/web",
    "service/web",
    "configmap/web-config",
    "secret/web-secret",
    "ingress.networking.k8s.io/web",
    "statefulset.apps/db",
    "persistentvolumeclaim/shared",
];

fn app_v2() -> String {
    APP_V1
        .replace("image: nginx:1.27", "image: nginx:1.28")
        .replace("greeting: hello", "greeting: hello-again")
}

fn app_v3() -> String {
    app_v2().replace("image: nginx:1.28", "image: nginx:1.29")
}

async fn kubectl_workflow(backend: Backend) {
    let server = TestServer::start(backend).await.expect("starting weir");
    let manifests = tempfile::tempdir().expect("temp dir for manifests");
    let write = |name: &str, text: &str| {
        let path = manifests.path().join(name);
        std::fs::write(&path, text).expect("writing a manifest");
        path.to_str().expect("utf-8 temp path").to_string()
    };
    let v1 = write("app-v1.yaml", APP_V1);
    let v2 = write("app-v2.yaml", &app_v2());
    let v3 = write("app-v3.yaml", &app_v3());
    let ssa = write("ssa.yaml", SERVER_SIDE_CONFIG);

    let version: serde_json::Value =
        serde_json::from_str(&server.kubectl_ok(&["version", "-o", "json"])).expect("kubectl version -o json");
    assert!(
        version["serverVersion"]["gitVersion"]
            .as_str()
            .is_some_and(|v| v.starts_with("v1.")),
        "server version: {version}"
    );

    // The namespaces and the `kubernetes` Service every cluster starts with.
    let namespaces = server.kubectl_ok(&["get", "namespaces", "-o", "name"]);
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        assert!(
            namespaces.lines().any(|l| l == format!("namespace/{ns}")),
            "{ns} missing from:\n{namespaces}"
        );
    }
    let kubernetes_svc = server.kubectl_ok(&["get", "svc", "kubernetes", "-n", "default", "-o", "json"]);
    let kubernetes_svc: serde_json::Value = serde_json::from_str(&kubernetes_svc).expect("svc json");
    assert_eq!(kubernetes_svc["spec"]["clusterIP"], "10.96.0.1", "{kubernetes_svc}");

    assert_eq!(
        server.kubectl_ok(&["create", "namespace", "demo"]).trim(),
        "namespace/demo created"
    );

    // Client-side apply: created, then unchanged, then configured only where the file changed.
    let created = apply_actions(&server.kubectl_ok(&["apply", "-f", &v1]));
    for object in APP_OBJECTS {
        assert_eq!(
            created.get(object).map(String::as_str),
            Some("created"),
            "{object} in {created:?}"
        );
    }
    let reapplied = apply_actions(&server.kubectl_ok(&["apply", "-f", &v1]));
    for object in APP_OBJECTS {
        assert_eq!(
            reapplied.get(object).map(String::as_str),
            Some(unchanged_action(object)),
            "{object} in {reapplied:?}"
        );
    }
    let edited = apply_actions(&server.kubectl_ok(&["apply", "-f", &v2]));
    for object in APP_OBJECTS {
        let expected = match object {
            "deployment.apps/web" | "configmap/web-config" => "configured",
            _ => unchanged_action(object),
        };
        assert_eq!(
            edited.get(object).map(String::as_str),
            Some(expected),
            "{object} in {edited:?}"
        );
    }
    assert_eq!(
        jsonpath(&server, &["deploy", "web"], "{.spec.template.spec.containers[0].image}"),
        "nginx:1.28"
    );
    assert_eq!(
        jsonpath(&server, &["cm", "web-config"], "{.data.greeting}"),
        "hello-again"
    );

    // kubectl diff: exit 1 and the change when the file differs from the cluster, 0 when not.
    let diff = server.kubectl(&["diff", "-f", &v3]);
    assert_eq!(
        diff.status.code(),
        Some(1),
        "kubectl diff of a changed file:\n{}",
        describe(&diff)
    );
    let diff_text = String::from_utf8_lossy(&diff.stdout);
    assert!(
        diff_text
            .lines()
            .any(|l| l.starts_with('-') && l.contains("image: nginx:1.28"))
            && diff_text
                .lines()
                .any(|l| l.starts_with('+') && l.contains("image: nginx:1.29")),
        "diff does not show the image change:\n{diff_text}"
    );
    let no_diff = server.kubectl(&["diff", "-f", &v2]);
    assert_eq!(
        no_diff.status.code(),
        Some(0),
        "kubectl diff of an applied file:\n{}",
        describe(&no_diff)
    );
    assert!(
        no_diff.stdout.is_empty(),
        "kubectl diff printed a difference:\n{}",
        describe(&no_diff)
    );

    // Server-side apply, owned by the "kubectl" field manager.
    assert_eq!(
        server.kubectl_ok(&["apply", "--server-side", "-f", &ssa]).trim(),
        "configmap/ssa-config serverside-applied"
    );
    let ssa_object = get_json(&server, &["cm", "ssa-config", "-n", "demo", "--show-managed-fields"]);
    assert_eq!(ssa_object["data"]["owner"], "server-side");
    let managers = ssa_object["metadata"]["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        managers
            .iter()
            .any(|m| m["manager"] == "kubectl" && m["operation"] == "Apply"),
        "no Apply entry for manager kubectl: {managers:?}"
    );

    // Tables as Kubernetes prints them.
    let (header, rows) = table(&server.kubectl_ok(&["get", "deploy", "-n", "demo"]));
    assert_eq!(header, ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]);
    let web = row(&rows, "web");
    assert!(web[1].ends_with("/2"), "READY column of web: {web:?}");

    let (header, rows) = table(&server.kubectl_ok(&["get", "svc", "-n", "demo"]));
    assert_eq!(header, ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"]);
    let web = row(&rows, "web");
    assert_eq!(web[1], "ClusterIP");
    assert!(in_service_cidr(&web[2]), "cluster IP {} outside 10.96.0.0/12", web[2]);
    assert_eq!(web[3], "<none>");
    assert_eq!(web[4], "80/TCP");

    let (header, rows) = table(&server.kubectl_ok(&["get", "cm", "-n", "demo"]));
    assert_eq!(header, ["NAME", "DATA", "AGE"]);
    assert_eq!(row(&rows, "web-config")[1], "2");
    assert_eq!(row(&rows, "ssa-config")[1], "1");

    let (header, rows) = table(&server.kubectl_ok(&["get", "secret", "-n", "demo"]));
    assert_eq!(header, ["NAME", "TYPE", "DATA", "AGE"]);
    assert_eq!(row(&rows, "web-secret")[1..3], ["Opaque", "1"]);

    let (header, rows) = table(&server.kubectl_ok(&["get", "ingress", "-n", "demo"]));
    assert_eq!(header, ["NAME", "CLASS", "HOSTS", "ADDRESS", "PORTS", "AGE"]);
    assert_eq!(row(&rows, "web")[2], "web.example.com");

    let (header, rows) = table(&server.kubectl_ok(&["get", "sts", "-n", "demo"]));
    assert_eq!(header, ["NAME", "READY", "AGE"]);
    assert!(row(&rows, "db")[1].ends_with("/1"));

    assert_eq!(
        server
            .kubectl_ok(&["run", "nginx", "--image=nginx:1.27", "-n", "demo"])
            .trim(),
        "pod/nginx created"
    );
    let (header, rows) = table(&server.kubectl_ok(&["get", "pods", "-n", "demo"]));
    assert_eq!(header, ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]);
    let nginx = row(&rows, "nginx");
    assert_eq!(nginx[1], "0/1");
    assert_eq!(nginx[2], "Pending");
    assert_eq!(nginx[3], "0");

    // -o yaml and -o json.
    let yaml: serde_yaml::Value =
        serde_yaml::from_str(&server.kubectl_ok(&["get", "cm", "web-config", "-n", "demo", "-o", "yaml"]))
            .expect("kubectl -o yaml parses");
    assert_eq!(yaml["kind"].as_str(), Some("ConfigMap"));
    assert_eq!(yaml["apiVersion"].as_str(), Some("v1"));
    assert_eq!(yaml["metadata"]["namespace"].as_str(), Some("demo"));
    assert_eq!(yaml["data"]["mode"].as_str(), Some("production"));
    assert!(
        yaml["metadata"]["uid"].as_str().is_some_and(|s| !s.is_empty()),
        "uid missing: {yaml:?}"
    );
    assert!(
        yaml["metadata"]["resourceVersion"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    );
    assert!(yaml["metadata"]["creationTimestamp"].as_str().is_some());
    assert!(
        yaml["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
            .as_str()
            .is_some(),
        "client-side apply keeps last-applied-configuration: {yaml:?}"
    );

    let deploy = get_json(&server, &["deploy", "web", "-n", "demo"]);
    assert_eq!(deploy["apiVersion"], "apps/v1");
    assert_eq!(deploy["kind"], "Deployment");
    assert_eq!(deploy["spec"]["replicas"], 2);
    assert_eq!(
        deploy["spec"]["template"]["spec"]["containers"][0]["image"],
        "nginx:1.28"
    );
    assert!(
        deploy["metadata"]["generation"].as_i64().is_some_and(|g| g >= 2),
        "generation: {deploy}"
    );
    let list = get_json(&server, &["cm", "-n", "demo"]);
    assert_eq!(list["kind"], "List");
    assert!(
        list["items"]
            .as_array()
            .is_some_and(|items| items.iter().any(|i| i["metadata"]["name"] == "web-config"))
    );

    // Label selectors and all namespaces.
    let selected = server.kubectl_ok(&[
        "get",
        "deploy,svc,cm,secret",
        "-n",
        "demo",
        "-l",
        "app=web",
        "-o",
        "name",
    ]);
    let selected: BTreeSet<&str> = selected.lines().collect();
    assert_eq!(
        selected,
        BTreeSet::from(["deployment.apps/web", "service/web", "configmap/web-config"])
    );

    let (header, rows) = table(&server.kubectl_ok(&["get", "svc", "-A"]));
    assert_eq!(
        header,
        [
            "NAMESPACE",
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "AGE"
        ]
    );
    let kubernetes = rows
        .iter()
        .find(|r| r[0] == "default" && r[1] == "kubernetes")
        .expect("default/kubernetes row");
    assert_eq!(kubernetes[3..6], ["10.96.0.1", "<none>", "443/TCP"]);
    assert!(
        rows.iter().any(|r| r[0] == "demo" && r[1] == "web"),
        "demo/web missing: {rows:?}"
    );

    watch_sees_a_later_change(&server);

    // kubectl edit with a scripted editor.
    let mut edit = server.kubectl_command(&["edit", "cm", "web-config", "-n", "demo"]);
    edit.env(
        "KUBE_EDITOR",
        "sed -i 's/^  greeting: hello-again$/  greeting: edited-by-kubectl/'",
    );
    let edit = weir_tests::run_bounded(edit, None, weir_tests::KUBECTL_TIMEOUT);
    assert_eq!(
        weir_tests::expect_success("kubectl edit", edit).trim(),
        "configmap/web-config edited"
    );
    assert_eq!(
        jsonpath(&server, &["cm", "web-config"], "{.data.greeting}"),
        "edited-by-kubectl"
    );

    // label and annotate.
    assert_eq!(
        server
            .kubectl_ok(&["label", "cm", "web-config", "tier=backend", "-n", "demo"])
            .trim(),
        "configmap/web-config labeled"
    );
    assert_eq!(
        server
            .kubectl_ok(&["get", "cm", "-n", "demo", "-l", "tier=backend", "-o", "name"])
            .trim(),
        "configmap/web-config"
    );
    assert_eq!(
        server
            .kubectl_ok(&["annotate", "cm", "web-config", "note=hello", "-n", "demo"])
            .trim(),
        "configmap/web-config annotated"
    );
    assert_eq!(
        jsonpath(&server, &["cm", "web-config"], "{.metadata.annotations.note}"),
        "hello"
    );

    // The three patch types.
    let strategic =
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"web","env":[{"name":"MODE","value":"test"}]}]}}}}"#;
    assert_eq!(
        server
            .kubectl_ok(&[
                "patch",
                "deployment",
                "web",
                "-n",
                "demo",
                "--type",
                "strategic",
                "-p",
                strategic
            ])
            .trim(),
        "deployment.apps/web patched"
    );
    let deploy = get_json(&server, &["deploy", "web", "-n", "demo"]);
    let containers = deploy["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(
        containers.len(),
        1,
        "strategic merge keyed by name must not add a container: {containers:?}"
    );
    assert_eq!(containers[0]["image"], "nginx:1.28");
    assert_eq!(
        containers[0]["env"],
        serde_json::json!([{"name": "MODE", "value": "test"}])
    );

    assert_eq!(
        server
            .kubectl_ok(&[
                "patch",
                "cm",
                "web-config",
                "-n",
                "demo",
                "--type",
                "merge",
                "-p",
                r#"{"data":{"merged":"yes"}}"#
            ])
            .trim(),
        "configmap/web-config patched"
    );
    let cm = get_json(&server, &["cm", "web-config", "-n", "demo"]);
    assert_eq!(cm["data"]["merged"], "yes");
    assert_eq!(cm["data"]["mode"], "production", "merge patch kept the other keys");

    let json_patch = r#"[{"op":"replace","path":"/spec/replicas","value":1}]"#;
    assert_eq!(
        server
            .kubectl_ok(&[
                "patch",
                "deployment",
                "web",
                "-n",
                "demo",
                "--type",
                "json",
                "-p",
                json_patch
            ])
            .trim(),
        "deployment.apps/web patched"
    );
    assert_eq!(jsonpath(&server, &["deploy", "web"], "{.spec.replicas}"), "1");

    assert_eq!(
        server
            .kubectl_ok(&["scale", "deployment", "web", "--replicas=3", "-n", "demo"])
            .trim(),
        "deployment.apps/web scaled"
    );
    assert_eq!(jsonpath(&server, &["deploy", "web"], "{.spec.replicas}"), "3");

    // Discovery: api-resources and explain.
    api_resources_match_kubernetes(&server);
    let explain = server.kubectl_ok(&["explain", "deployment.spec.replicas"]);
    for expected in ["Deployment", "replicas", "<integer>", "Number of desired pods"] {
        assert!(
            explain.contains(expected),
            "explain output lacks {expected:?}:\n{explain}"
        );
    }

    // delete -f removes everything the file names.
    let deleted = server.kubectl_ok(&["delete", "-f", &v2, "--timeout=60s"]);
    for name in ["web", "web-config", "web-secret", "db", "shared"] {
        assert!(
            deleted.contains(&format!("\"{name}\" deleted")),
            "{name} not deleted:\n{deleted}"
        );
    }
    let left = server.kubectl_ok(&[
        "get",
        "deploy,svc,cm,secret,ingress,sts,pvc",
        "-n",
        "demo",
        "-o",
        "name",
    ]);
    for object in APP_OBJECTS {
        assert!(
            !left.lines().any(|l| l == object),
            "{object} still there after delete -f:\n{left}"
        );
    }
    let gone = server.kubectl(&["get", "deploy", "web", "-n", "demo"]);
    assert!(!gone.status.success(), "deployment still readable: {}", describe(&gone));
    assert!(
        String::from_utf8_lossy(&gone.stderr)
            .contains(r#"Error from server (NotFound): deployments.apps "web" not found"#),
        "{}",
        describe(&gone)
    );
}

/// Re-applying an unchanged file prints "unchanged", except for a StatefulSet with
/// volumeClaimTemplates: the server defaults fields inside the (atomic) template list, so
/// kubectl's three-way merge sends it again and real Kubernetes prints "configured"
/// (kubernetes/kubernetes#66450). Either is accepted there.
fn unchanged_action(object: &str) -> &'static str {
    if object == "statefulset.apps/db" {
        "unchanged-or-configured"
    } else {
        "unchanged"
    }
}

/// `kubectl apply` output as object → action ("created", "unchanged", ...).
fn apply_actions(stdout: &str) -> BTreeMap<String, String> {
    stdout
        .lines()
        .filter_map(|line| line.rsplit_once(' '))
        .map(|(object, action)| {
            let action = if object == "statefulset.apps/db" && matches!(action, "unchanged" | "configured") {
                "unchanged-or-configured"
            } else {
                action
            };
            (object.to_string(), action.to_string())
        })
        .collect()
}

/// A kubectl table split into its header and rows (columns without spaces in them only).
fn table(stdout: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let mut lines = stdout
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>());
    let header = lines.next().unwrap_or_default();
    (header, lines.collect())
}

fn row<'a>(rows: &'a [Vec<String>], name: &str) -> &'a [String] {
    rows.iter()
        .find(|r| r[0] == name)
        .unwrap_or_else(|| panic!("no row {name} in {rows:?}"))
}

fn get_json(server: &TestServer, args: &[&str]) -> serde_json::Value {
    let mut full = vec!["get"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["-o", "json"]);
    let stdout = server.kubectl_ok(&full);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("kubectl {full:?} printed invalid JSON ({e}):\n{stdout}"))
}

fn jsonpath(server: &TestServer, object: &[&str], path: &str) -> String {
    let output = format!("jsonpath={path}");
    let mut args = vec!["get"];
    args.extend_from_slice(object);
    args.extend_from_slice(&["-n", "demo", "-o", &output]);
    server.kubectl_ok(&args)
}

/// `kubectl get cm -w` running in the background prints a ConfigMap created after it started.
fn watch_sees_a_later_change(server: &TestServer) {
    let mut watch = server.kubectl_command(&["get", "cm", "-n", "demo", "-w"]);
    watch.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = watch.spawn().expect("starting kubectl get -w");
    let (lines_tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let wait_for = |needle: &str, seen: &mut Vec<String>| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match lines.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => {
                    let found = line.contains(needle);
                    seen.push(line);
                    if found {
                        return true;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return false,
            }
        }
        false
    };
    // The initial listing first, so the change below happens while the watch is open.
    let listed = wait_for("web-config", &mut seen);
    let created = server.kubectl(&[
        "create",
        "configmap",
        "watched-later",
        "-n",
        "demo",
        "--from-literal=a=b",
    ]);
    let noticed = listed && created.status.success() && wait_for("watched-later", &mut seen);
    let _ = child.kill();
    let status = child.wait().expect("reaping kubectl get -w");
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    assert!(
        noticed,
        "kubectl get cm -w did not print watched-later (listed: {listed}, create: {}, exit {status});\n\
         watch stdout: {seen:#?}\nwatch stderr: {stderr}",
        describe(&created)
    );
}

/// `kubectl api-resources` rows: resource name → (SHORTNAMES, APIVERSION, NAMESPACED, KIND).
fn api_resources(server: &TestServer, extra: &[&str]) -> BTreeMap<String, [String; 4]> {
    let mut args = vec!["api-resources"];
    args.extend_from_slice(extra);
    let stdout = server.kubectl_ok(&args);
    let mut lines = stdout.lines();
    let header = lines.next().expect("api-resources header");
    let starts: Vec<usize> = ["NAME", "SHORTNAMES", "APIVERSION", "NAMESPACED", "KIND"]
        .iter()
        .map(|column| {
            header
                .find(column)
                .unwrap_or_else(|| panic!("no {column} column in {header:?}"))
        })
        .collect();
    let cell = |line: &str, i: usize| -> String {
        let end = starts.get(i + 1).copied().unwrap_or(line.len()).min(line.len());
        line.get(starts[i]..end).unwrap_or("").trim().to_string()
    };
    lines
        .map(|line| {
            (
                cell(line, 0),
                [cell(line, 1), cell(line, 2), cell(line, 3), cell(line, 4)],
            )
        })
        .collect()
}

fn api_resources_match_kubernetes(server: &TestServer) {
    let all = api_resources(server, &[]);
    let expected = [
        ("pods", "po", "v1", "true", "Pod"),
        ("services", "svc", "v1", "true", "Service"),
        ("configmaps", "cm", "v1", "true", "ConfigMap"),
        ("namespaces", "ns", "v1", "false", "Namespace"),
        ("nodes", "no", "v1", "false", "Node"),
        ("persistentvolumeclaims", "pvc", "v1", "true", "PersistentVolumeClaim"),
        ("deployments", "deploy", "apps/v1", "true", "Deployment"),
        ("statefulsets", "sts", "apps/v1", "true", "StatefulSet"),
        ("ingresses", "ing", "networking.k8s.io/v1", "true", "Ingress"),
    ];
    for (name, short, version, namespaced, kind) in expected {
        let row = all
            .get(name)
            .unwrap_or_else(|| panic!("api-resources lacks {name}: {all:?}"));
        assert_eq!(
            row,
            &[short, version, namespaced, kind].map(String::from),
            "api-resources row of {name}"
        );
    }
    let cluster_scoped = api_resources(server, &["--namespaced=false"]);
    for name in [
        "namespaces",
        "nodes",
        "persistentvolumes",
        "storageclasses",
        "ingressclasses",
    ] {
        assert!(
            cluster_scoped.contains_key(name),
            "--namespaced=false lacks {name}: {cluster_scoped:?}"
        );
    }
    for name in ["pods", "configmaps", "deployments"] {
        assert!(!cluster_scoped.contains_key(name), "--namespaced=false lists {name}");
    }
}
