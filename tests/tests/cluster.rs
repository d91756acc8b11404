//! The node agent end to end, as root: real clusters of `weir up` (and `weir agent`) nodes,
//! each in a network namespace of its own, running real containers from the project's
//! images, driven by the real kubectl. `cargo xtask test` runs these in its privileged pass
//! (`--ignored --test-threads=1`, WEIR_IMAGES set); without root they fail saying so.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;
use weir_tests::cluster::Lab;
use weir_tests::describe;

/// Pods get this long to turn Running (image present).
const START: Duration = Duration::from_secs(60);

fn pods(lab: &Lab, selector: &str) -> Result<Vec<Value>> {
    let out = lab.kubectl_ok(&["get", "pods", "-l", selector, "-o", "json"])?;
    let list: Value = serde_json::from_str(&out)?;
    Ok(list["items"].as_array().cloned().unwrap_or_default())
}

fn pod(lab: &Lab, name: &str) -> Result<Value> {
    Ok(serde_json::from_str(
        &lab.kubectl_ok(&["get", "pod", name, "-o", "json"])?,
    )?)
}

/// Polls `check` every 200 ms until it returns Some, or fails after `timeout` with the last
/// state and the nodes' logs.
async fn until<T>(lab: &Lab, what: &str, timeout: Duration, mut check: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {timeout:?} ({last})\n{}", lab.logs());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// (pod name, container id of its first container) of the pods matching `selector`.
fn container_ids(lab: &Lab, selector: &str) -> Result<Vec<(String, String)>> {
    Ok(pods(lab, selector)?
        .iter()
        .map(|p| {
            let name = p["metadata"]["name"].as_str().unwrap_or("").to_owned();
            let id = p["status"]["containerStatuses"][0]["containerID"]
                .as_str()
                .unwrap_or("");
            (name, id.to_owned())
        })
        .collect())
}

fn running_with_ip(p: &Value) -> Option<String> {
    (p["status"]["phase"] == "Running" && p["status"]["containerStatuses"][0]["ready"] == true)
        .then(|| p["status"]["podIP"].as_str().map(str::to_owned))
        .flatten()
}

/// `busybox wget` from node `i`'s namespace (its `-T` option crashes Debian's static
/// busybox 1.35, hence `timeout`).
fn fetch(lab: &Lab, node: usize, url: &str) -> Result<String> {
    let out = lab.in_node(
        node,
        &["timeout", "5", "busybox", "wget", "-q", "-O", "-", url],
        Duration::from_secs(10),
    );
    ensure!(out.status.success(), "wget {url} from node {node}: {}", describe(&out));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

const ECHO: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {greeting: hello, mode: fast}
---
apiVersion: v1
kind: Secret
metadata: {name: creds}
stringData: {password: s3cret}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo}
spec:
  replicas: 3
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      containers:
      - name: echo
        image: weir.local/echo:latest
        env:
        - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
        - {name: PASSWORD, valueFrom: {secretKeyRef: {name: creds, key: password}}}
        envFrom:
        - configMapRef: {name: settings}
          prefix: CFG_
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root only: runs real clusters; `cargo xtask test` runs it"]
async fn weir_up_runs_deployments_restarts_crashes_and_survives_an_agent_restart() -> Result<()> {
    let mut lab = Lab::start(1, &[]).await?;
    let created = Instant::now();
    lab.apply(ECHO)?;
    let ips = until(&lab, "3 echo pods Running with IPs", START, || {
        let ips: Vec<(String, String)> = pods(&lab, "app=echo")?
            .iter()
            .filter_map(|p| running_with_ip(p).map(|ip| (p["metadata"]["name"].as_str().unwrap_or("").to_owned(), ip)))
            .collect();
        Ok((ips.len() == 3).then_some(ips))
    })
    .await?;
    eprintln!(
        "3 pods Running {:?} after the Deployment was created",
        created.elapsed()
    );
    for (name, ip) in &ips {
        ensure!(ip.starts_with("10.244."), "pod IP {ip} is not from the podCIDR");
        let answer = fetch(&lab, 0, &format!("http://{ip}:8080/"))?;
        ensure!(
            answer.starts_with(&format!("{name} {ip}:8080")),
            "pod {name} at {ip} answered {answer:?}"
        );
    }

    // A ClusterIP Service reaches every replica through the node's eBPF socket-LB.
    lab.apply(
        r#"
apiVersion: v1
kind: Service
metadata: {name: echo}
spec:
  selector: {app: echo}
  ports: [{port: 80, targetPort: 8080}]
"#,
    )?;
    let cluster_ip = lab.kubectl_ok(&["get", "service", "echo", "-o", "jsonpath={.spec.clusterIP}"])?;
    lab.apply(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: svc-client}}
spec:
  restartPolicy: Never
  containers:
  - name: wget
    image: weir.local/busybox:latest
    command: [sh, -c, 'for i in $(seq 1 30); do timeout 5 wget -q -O - http://{cluster_ip}/; done | cut -d" " -f1 | sort -u | wc -l | grep -qx 3']
"#
    ))?;
    let svc = until(&lab, "svc-client finished", START, || {
        let p = pod(&lab, "svc-client")?;
        let phase = p["status"]["phase"].as_str().unwrap_or("").to_owned();
        Ok((phase == "Succeeded" || phase == "Failed").then_some(phase))
    })
    .await?;
    ensure!(
        svc == "Succeeded",
        "30 requests to the ClusterIP {cluster_ip} did not reach all 3 replicas"
    );

    // The environment from the ConfigMap, the Secret and the downward API, seen by the process.
    let env_pod = r#"
apiVersion: v1
kind: Pod
metadata: {name: env-check}
spec:
  restartPolicy: Never
  containers:
  - name: check
    image: weir.local/busybox:latest
    command: [sh, -c, 'test "$CFG_greeting" = hello && test "$PASSWORD" = s3cret && test "$ME" = env-check && test "$(hostname)" = env-check && grep -q "search default.svc.cluster.local" /etc/resolv.conf && grep -q env-check /etc/hosts']
    env:
    - {name: PASSWORD, valueFrom: {secretKeyRef: {name: creds, key: password}}}
    - {name: ME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
    envFrom: [{configMapRef: {name: settings}, prefix: CFG_}]
"#;
    lab.apply(env_pod)?;
    let phase = until(&lab, "env-check finished", START, || {
        let p = pod(&lab, "env-check")?;
        let phase = p["status"]["phase"].as_str().unwrap_or("").to_owned();
        Ok((phase == "Succeeded" || phase == "Failed").then_some((phase, p)))
    })
    .await?;
    ensure!(phase.0 == "Succeeded", "env-check: {}", phase.1["status"]);

    // A crashing container backs off: CrashLoopBackOff with the exit code in lastState.
    lab.kubectl_ok(&[
        "run",
        "crasher",
        "--image=weir.local/busybox:latest",
        "--restart=Always",
        "--",
        "sh",
        "-c",
        "echo dying; exit 3",
    ])?;
    let crashed = until(&lab, "crasher in CrashLoopBackOff", START, || {
        let p = pod(&lab, "crasher")?;
        let s = &p["status"]["containerStatuses"][0];
        Ok((s["state"]["waiting"]["reason"] == "CrashLoopBackOff").then(|| s.clone()))
    })
    .await?;
    ensure!(
        crashed["lastState"]["terminated"]["exitCode"] == 3,
        "lastState: {}",
        crashed["lastState"]
    );
    ensure!(
        crashed["lastState"]["terminated"]["reason"] == "Error",
        "{}",
        crashed["lastState"]
    );
    // The agent's events, as kubelet's, in `kubectl describe`.
    until(&lab, "crasher's events", Duration::from_secs(20), || {
        let described = lab.kubectl_ok(&["describe", "pod", "crasher"])?;
        Ok((described.contains("Started container crasher")
            && described.contains("Back-off restarting failed container crasher"))
        .then_some(()))
    })
    .await?;
    until(&lab, "crasher restarted at least once", Duration::from_secs(40), || {
        let p = pod(&lab, "crasher")?;
        Ok((p["status"]["containerStatuses"][0]["restartCount"].as_i64() >= Some(1)).then_some(()))
    })
    .await?;

    // A run-to-completion pod: Succeeded, not restarted.
    lab.kubectl_ok(&[
        "run",
        "once",
        "--image=weir.local/busybox:latest",
        "--restart=Never",
        "--",
        "sh",
        "-c",
        "echo done",
    ])?;
    until(&lab, "once Succeeded", START, || {
        let p = pod(&lab, "once")?;
        Ok((p["status"]["phase"] == "Succeeded"
            && p["status"]["containerStatuses"][0]["state"]["terminated"]["reason"] == "Completed")
            .then_some(()))
    })
    .await?;

    // Killing the agent leaves the pods running; the restarted agent adopts them.
    let before = container_ids(&lab, "app=echo")?;
    lab.kill9(0);
    for (name, ip) in &ips {
        let answer = fetch(&lab, 0, &format!("http://{ip}:8080/"))
            .with_context(|| format!("pod {name} while the agent is down"))?;
        ensure!(answer.starts_with(name.as_str()), "{answer}");
    }
    lab.restart(0)?;
    lab.wait_ready(Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = container_ids(&lab, "app=echo")?;
    ensure!(
        before.iter().all(|b| after.contains(b)),
        "containers changed across the agent restart: {before:?} -> {after:?}"
    );
    for p in pods(&lab, "app=echo")? {
        ensure!(
            p["status"]["containerStatuses"][0]["restartCount"] == 0,
            "{}",
            p["status"]
        );
    }

    // Scaling down stops the containers (SIGTERM, then SIGKILL after the grace period) and
    // removes their networks.
    lab.kubectl_ok(&[
        "patch",
        "deployment",
        "echo",
        "-p",
        r#"{"spec":{"template":{"spec":{"terminationGracePeriodSeconds":2}}}}"#,
    ])?;
    until(&lab, "the rollout with a 2 s grace period", START, || {
        let ready = pods(&lab, "app=echo")?
            .iter()
            .filter(|p| running_with_ip(p).is_some() && p["spec"]["terminationGracePeriodSeconds"] == 2)
            .count();
        Ok((ready == 3).then_some(()))
    })
    .await?;
    let before_scale: Vec<String> = pods(&lab, "app=echo")?.iter().filter_map(running_with_ip).collect();
    lab.kubectl_ok(&["scale", "deployment", "echo", "--replicas=1"])?;
    until(&lab, "scaled to 1", START, || {
        Ok((pods(&lab, "app=echo")?.len() == 1).then_some(()))
    })
    .await?;
    let gone_ips = before_scale;
    let remaining = running_with_ip(&pods(&lab, "app=echo")?[0]).unwrap_or_default();
    until(
        &lab,
        "the removed pods' addresses stop answering",
        Duration::from_secs(20),
        || {
            let answering = gone_ips
                .iter()
                .filter(|ip| **ip != remaining)
                .filter(|ip| fetch(&lab, 0, &format!("http://{ip}:8080/")).is_ok())
                .count();
            Ok((answering == 0).then_some(()))
        },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root only: runs real clusters; `cargo xtask test` runs it"]
async fn two_nodes_join_with_a_token_and_pods_talk_across_them() -> Result<()> {
    let lab = Lab::start(2, &["--no-service-proxy"]).await?;
    let nodes = lab.kubectl_ok(&["get", "nodes", "-o", "jsonpath={.items[*].spec.podCIDR}"])?;
    ensure!(nodes.split(' ').count() == 2, "podCIDRs: {nodes}");
    for (i, node) in ["node-0", "node-1"].iter().enumerate() {
        lab.apply(&format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: web-{i}, labels: {{app: web}}}}
spec:
  nodeName: {node}
  containers: [{{name: echo, image: "weir.local/echo:latest"}}]
"#
        ))?;
    }
    let ips = until(&lab, "web-0 and web-1 Running", START, || {
        let a = running_with_ip(&pod(&lab, "web-0")?);
        let b = running_with_ip(&pod(&lab, "web-1")?);
        Ok(a.zip(b))
    })
    .await?;
    ensure!(ips.0 != ips.1, "both pods got {}", ips.0);
    // From the other node's namespace (routes via the node IPs), and pod to pod across nodes.
    ensure!(fetch(&lab, 0, &format!("http://{}:8080/", ips.1))?.starts_with("web-1"));
    ensure!(fetch(&lab, 1, &format!("http://{}:8080/", ips.0))?.starts_with("web-0"));
    for (from, to, ip) in [("node-0", "web-1", &ips.1), ("node-1", "web-0", &ips.0)] {
        let name = format!("client-on-{from}");
        lab.apply(&format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  nodeName: {from}
  restartPolicy: Never
  containers:
  - name: wget
    image: weir.local/busybox:latest
    command: [sh, -c, 'timeout 5 wget -q -O - http://{ip}:8080/ | grep -q "^{to} "']
"#
        ))?;
        let phase = until(&lab, &format!("{name} finished"), START, || {
            let p = pod(&lab, &name)?;
            let phase = p["status"]["phase"].as_str().unwrap_or("").to_owned();
            Ok((phase == "Succeeded" || phase == "Failed").then_some(phase))
        })
        .await?;
        ensure!(phase == "Succeeded", "{name} could not reach {to} at {ip}");
    }

    // A wrong token is refused, and the node never appears.
    let bin = weir_tests::required_binary(
        "WEIR_BIN",
        weir_tests::workspace_dir().join("target/debug/weir"),
        "weir",
    )?;
    let wrong_dir = tempfile::tempdir()?;
    let mut cmd = std::process::Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", lab.nodes[1].netns))
        .arg(&bin)
        .args([
            "agent",
            "--server",
            &lab.server_url(),
            "--node-name",
            "intruder",
            "--data-dir",
        ])
        .arg(wrong_dir.path())
        .arg("--token")
        .arg(format!(
            "{}::node:not-the-secret",
            lab.token().split("::").next().unwrap_or_default()
        ));
    let out = weir_tests::run_bounded(cmd, None, Duration::from_secs(30));
    ensure!(!out.status.success(), "a wrong token joined: {}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        stderr.contains("token"),
        "the refusal does not mention the token: {stderr}"
    );
    ensure!(
        !lab.kubectl_ok(&["get", "nodes", "-o", "name"])?.contains("intruder"),
        "the intruder node was registered"
    );
    Ok(())
}

/// A free TCP port on the host's loopback (for kubectl port-forward).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root only: runs real clusters; `cargo xtask test` runs it"]
async fn volumes_probes_logs_exec_cp_port_forward_and_claims() -> Result<()> {
    let lab = Lab::start(1, &["--no-service-proxy"]).await?;
    let storage = lab.dir().join("storage");
    lab.apply(&format!(
        r#"
apiVersion: v1
kind: ConfigMap
metadata: {{name: settings}}
data: {{greeting: hello}}
---
apiVersion: v1
kind: Secret
metadata: {{name: creds}}
stringData: {{password: s3cret}}
---
apiVersion: v1
kind: Service
metadata: {{name: toolbox}}
spec:
  selector: {{app: toolbox}}
  ports: [{{port: 80}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: toolbox, labels: {{app: toolbox}}}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: box
    image: weir.local/busybox:latest
    command: [sh, -c, 'echo toolbox started; exec sleep 3600']
    readinessProbe: {{exec: {{command: [test, -f, /tmp/ready]}}, periodSeconds: 1}}
    volumeMounts:
    - {{name: cfg, mountPath: /cfg}}
    - {{name: sec, mountPath: /sec}}
    - {{name: scratch, mountPath: /scratch}}
  volumes:
  - {{name: cfg, configMap: {{name: settings}}}}
  - {{name: sec, secret: {{secretName: creds}}}}
  - {{name: scratch, emptyDir: {{}}}}
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {{name: lab}}
provisioner: weir.dev/local-path
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Delete
parameters: {{path: "{storage}"}}
"#,
        storage = storage.display()
    ))?;

    // Readiness gates the endpoints: Running, not Ready, no ready endpoint until the probe passes.
    until(&lab, "toolbox Running", START, || {
        let p = pod(&lab, "toolbox")?;
        Ok((p["status"]["phase"] == "Running").then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let p = pod(&lab, "toolbox")?;
    ensure!(p["status"]["containerStatuses"][0]["ready"] == false, "{}", p["status"]);
    let ready_endpoints = || -> Result<usize> {
        let out = lab.kubectl_ok(&[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=toolbox",
            "-o",
            "json",
        ])?;
        let list: Value = serde_json::from_str(&out)?;
        Ok(list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
            .filter(|e| e["conditions"]["ready"] == true)
            .count())
    };
    ensure!(ready_endpoints()? == 0, "an unready pod is a ready endpoint");
    lab.kubectl_ok(&["exec", "toolbox", "--", "touch", "/tmp/ready"])?;
    until(
        &lab,
        "toolbox Ready and a ready endpoint",
        Duration::from_secs(20),
        || {
            let p = pod(&lab, "toolbox")?;
            Ok((p["status"]["containerStatuses"][0]["ready"] == true && ready_endpoints()? == 1).then_some(()))
        },
    )
    .await?;

    // Volumes: ConfigMap and Secret files, and a ConfigMap change reaching the mounted file.
    ensure!(lab.kubectl_ok(&["exec", "toolbox", "--", "cat", "/cfg/greeting"])? == "hello");
    ensure!(lab.kubectl_ok(&["exec", "toolbox", "--", "cat", "/sec/password"])? == "s3cret");
    lab.kubectl_ok(&[
        "patch",
        "configmap",
        "settings",
        "-p",
        r#"{"data":{"greeting":"updated"}}"#,
    ])?;
    let changed = Instant::now();
    until(
        &lab,
        "the ConfigMap change in the mounted file",
        Duration::from_secs(30),
        || Ok((lab.kubectl_ok(&["exec", "toolbox", "--", "cat", "/cfg/greeting"])? == "updated").then_some(())),
    )
    .await?;
    eprintln!("ConfigMap update visible in the pod after {:?}", changed.elapsed());

    // Logs, exec with stdin and an exit code, cp both ways.
    ensure!(lab.kubectl_ok(&["logs", "toolbox"])?.contains("toolbox started"));
    let out = lab.kubectl_stdin(
        &["exec", "-i", "toolbox", "--", "sh", "-c", "cat > /scratch/in; exit 7"],
        Some("piped"),
    );
    ensure!(out.status.code() == Some(7), "exec exit code: {}", describe(&out));
    ensure!(lab.kubectl_ok(&["exec", "toolbox", "--", "cat", "/scratch/in"])? == "piped");
    let local = lab.dir().join("cp-source.txt");
    std::fs::write(&local, "copied through tar\n")?;
    lab.kubectl_ok(&["cp", &local.display().to_string(), "toolbox:/scratch/copied.txt"])?;
    let back = lab.dir().join("cp-back.txt");
    lab.kubectl_ok(&["cp", "toolbox:/scratch/copied.txt", &back.display().to_string()])?;
    ensure!(std::fs::read_to_string(&back)? == "copied through tar\n");

    // Port-forward from the host's loopback to the pod's port (busybox httpd in the pod).
    lab.kubectl_ok(&[
        "exec",
        "toolbox",
        "--",
        "sh",
        "-c",
        "echo forwarded > /scratch/index.html && httpd -p 8081 -h /scratch",
    ])?;
    let port = free_port()?;
    let mut forward = std::process::Command::new(weir_tests::required_binary(
        "WEIR_KUBECTL",
        weir_tests::workspace_dir().join("target/tools/kubectl"),
        "kubectl",
    )?)
    .env("KUBECONFIG", lab.kubeconfig())
    .args(["port-forward", "pod/toolbox", &format!("{port}:8081")])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()?;
    let fetched = until(
        &lab,
        "a page through kubectl port-forward",
        Duration::from_secs(20),
        || {
            use std::io::{Read as _, Write as _};
            let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
                return Ok(None);
            };
            conn.set_read_timeout(Some(Duration::from_secs(5)))?;
            conn.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
            let mut answer = String::new();
            let _ = conn.read_to_string(&mut answer);
            Ok(answer.contains("forwarded").then_some(answer))
        },
    )
    .await;
    let _ = forward.kill();
    let _ = forward.wait();
    fetched?;

    // A failing liveness probe restarts the container, with kubelet's event.
    lab.apply(
        r#"
apiVersion: v1
kind: Pod
metadata: {name: unhealthy}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: weir.local/busybox:latest
    command: [sh, -c, 'touch /tmp/alive; sleep 4; rm /tmp/alive; exec sleep 3600']
    livenessProbe: {exec: {command: [test, -f, /tmp/alive]}, periodSeconds: 1, failureThreshold: 2}
"#,
    )?;
    until(
        &lab,
        "unhealthy restarted by its liveness probe",
        Duration::from_secs(60),
        || {
            let p = pod(&lab, "unhealthy")?;
            Ok((p["status"]["containerStatuses"][0]["restartCount"].as_i64() >= Some(1)).then_some(()))
        },
    )
    .await?;
    let described = lab.kubectl_ok(&["describe", "pod", "unhealthy"])?;
    ensure!(described.contains("Liveness probe failed"), "{described}");

    // Lifecycle hooks and graceful termination, seen through a hostPath volume: postStart
    // runs after the start, preStop before SIGTERM, which the process gets and handles.
    let hooks = lab.dir().join("hooks");
    lab.apply(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: hooked}}
spec:
  terminationGracePeriodSeconds: 20
  containers:
  - name: app
    image: weir.local/busybox:latest
    command: [sh, -c, 'trap "echo term >> /hooks/order; exit 0" TERM; while true; do sleep 0.2; done']
    lifecycle:
      postStart: {{exec: {{command: [sh, -c, 'echo post-start >> /hooks/order']}}}}
      preStop: {{exec: {{command: [sh, -c, 'echo pre-stop >> /hooks/order']}}}}
    volumeMounts: [{{name: hooks, mountPath: /hooks}}]
  volumes:
  - {{name: hooks, hostPath: {{path: "{hooks}", type: DirectoryOrCreate}}}}
"#,
        hooks = hooks.display()
    ))?;
    until(&lab, "hooked Running after its postStart hook", START, || {
        let p = pod(&lab, "hooked")?;
        let order = std::fs::read_to_string(hooks.join("order")).unwrap_or_default();
        Ok((p["status"]["phase"] == "Running" && order == "post-start\n").then_some(()))
    })
    .await?;
    let deleting = Instant::now();
    lab.kubectl_ok(&["delete", "pod", "hooked", "--wait=false"])?;
    let terminating = pod(&lab, "hooked")?;
    ensure!(
        terminating["metadata"]["deletionTimestamp"].is_string()
            && terminating["metadata"]["deletionGracePeriodSeconds"] == 20,
        "the pod is not Terminating: {}",
        terminating["metadata"]
    );
    until(&lab, "hooked gone", Duration::from_secs(30), || {
        Ok(lab
            .kubectl(&["get", "pod", "hooked"])
            .status
            .success()
            .then_some(())
            .xor(Some(())))
    })
    .await?;
    let order = std::fs::read_to_string(hooks.join("order"))?;
    ensure!(
        order == "post-start\npre-stop\nterm\n",
        "hooks and signal in this order: {order:?}"
    );
    ensure!(
        deleting.elapsed() < Duration::from_secs(15),
        "a process that exits on SIGTERM took {:?} to stop",
        deleting.elapsed()
    );

    // A StatefulSet's data in its claim survives the pod's deletion.
    lab.apply(
        r#"
apiVersion: v1
kind: Service
metadata: {name: db}
spec: {clusterIP: None, selector: {app: db}, ports: [{port: 5432}]}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db}
spec:
  serviceName: db
  replicas: 1
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: db
        image: weir.local/busybox:latest
        command: [sh, -c, 'hostname >> /data/boots; exec sleep 3600']
        volumeMounts: [{name: data, mountPath: /data}]
  volumeClaimTemplates:
  - metadata: {name: data}
    spec: {storageClassName: lab, accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}
"#,
    )?;
    let first_uid = until(&lab, "db-0 Running with its claim", START, || {
        let p = pod(&lab, "db-0")?;
        Ok(running_with_ip(&p).and_then(|_| p["metadata"]["uid"].as_str().map(str::to_owned)))
    })
    .await?;
    lab.kubectl_ok(&["delete", "pod", "db-0"])?;
    until(&lab, "a new db-0 Running", START, || {
        let Ok(p) = pod(&lab, "db-0") else { return Ok(None) };
        Ok((running_with_ip(&p).is_some() && p["metadata"]["uid"] != first_uid.as_str()).then_some(()))
    })
    .await?;
    let boots = lab.kubectl_ok(&["exec", "db-0", "--", "cat", "/data/boots"])?;
    ensure!(
        boots.lines().count() == 2 && boots.lines().all(|l| l == "db-0"),
        "/data/boots: {boots:?}"
    );
    ensure!(
        std::fs::read_dir(&storage)?.count() == 1,
        "the claim's directory is not under the class's path"
    );
    Ok(())
}

/// Lays an OCI image archive (`cargo xtask images`) out in docker-registry's filesystem
/// storage (`docker/registry/v2/...`) as `repo:tag`: every blob, the layer and manifest
/// links, the tag. The registry then serves it like a pushed image (nothing here pushes).
fn registry_storage_from_oci(archive: &std::path::Path, root: &std::path::Path, repo: &str, tag: &str) -> Result<()> {
    let mut blobs = std::collections::HashMap::new();
    let mut index = Vec::new();
    let mut tar = tar::Archive::new(std::fs::File::open(archive)?);
    for entry in tar.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.display().to_string();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data)?;
        if let Some(hex) = path.strip_prefix("blobs/sha256/").filter(|h| !h.is_empty()) {
            blobs.insert(hex.to_owned(), data);
        } else if path == "index.json" {
            index = data;
        }
    }
    let index: Value = serde_json::from_slice(&index)?;
    let manifest = index["manifests"][0]["digest"]
        .as_str()
        .and_then(|d| d.strip_prefix("sha256:"))
        .context("the archive's index names no manifest")?
        .to_owned();
    let v2 = root.join("docker/registry/v2");
    let link = |path: std::path::PathBuf, hex: &str| -> Result<()> {
        std::fs::create_dir_all(&path)?;
        std::fs::write(path.join("link"), format!("sha256:{hex}"))?;
        Ok(())
    };
    for (hex, data) in &blobs {
        let dir = v2.join("blobs/sha256").join(&hex[..2]).join(hex);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("data"), data)?;
        if *hex != manifest {
            link(v2.join("repositories").join(repo).join("_layers/sha256").join(hex), hex)?;
        }
    }
    let manifests = v2.join("repositories").join(repo).join("_manifests");
    link(manifests.join("revisions/sha256").join(&manifest), &manifest)?;
    link(manifests.join("tags").join(tag).join("current"), &manifest)?;
    link(
        manifests.join("tags").join(tag).join("index/sha256").join(&manifest),
        &manifest,
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "root only: runs real clusters; `cargo xtask test` runs it"]
async fn registry_pulls_need_the_pull_secret_init_containers_run_first_and_exec_gets_a_terminal() -> Result<()> {
    let lab = Lab::start(1, &["--no-service-proxy"]).await?;
    let images = std::env::var_os("WEIR_IMAGES").context("WEIR_IMAGES (the images of `cargo xtask images`)")?;
    // Debian's docker-registry on the node's loopback (plain HTTP, as for any loopback
    // registry), with htpasswd auth and the busybox image in its storage.
    let registry = lab.dir().join("registry");
    std::fs::create_dir_all(&registry)?;
    registry_storage_from_oci(
        &std::path::Path::new(&images).join("busybox.tar"),
        &registry.join("storage"),
        "test/busybox",
        "v1",
    )?;
    let hash = bcrypt::hash_with_result("s3cret-pull", 4)?.format_for_version(bcrypt::Version::TwoY);
    std::fs::write(registry.join("htpasswd"), format!("puller:{hash}\n"))?;
    std::fs::write(
        registry.join("config.yml"),
        format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nauth:\n  htpasswd:\n    realm: weir-lab\n    \
             path: {}\nhttp:\n  addr: 127.0.0.1:5000\n",
            registry.join("storage").display(),
            registry.join("htpasswd").display()
        ),
    )?;
    let log = std::fs::File::create(registry.join("registry.log"))?;
    // The registry's command line names the lab's directory: the lab's teardown ends it too.
    let mut server = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.nodes[0].netns))
        .args(["/usr/bin/docker-registry", "serve"])
        .arg(registry.join("config.yml"))
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting /usr/bin/docker-registry (cargo xtask setup installs it)")?;
    let outcome = async {
        let image = "127.0.0.1:5000/test/busybox:v1";
        let pod_with = |name: &str, secret: bool| {
            format!(
                r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  restartPolicy: Never
  {secrets}
  initContainers:
  - name: prepare
    image: "{image}"
    command: [sh, -c, 'echo from-init > /work/init']
    volumeMounts: [{{name: work, mountPath: /work}}]
  containers:
  - name: main
    image: "{image}"
    command: [sh, -c, 'test "$(cat /work/init)" = from-init']
    volumeMounts: [{{name: work, mountPath: /work}}]
  volumes: [{{name: work, emptyDir: {{}}}}]
"#,
                secrets = if secret {
                    "imagePullSecrets: [{name: lab-registry}]"
                } else {
                    ""
                }
            )
        };
        // Without credentials: ErrImagePull, then ImagePullBackOff, naming the registry.
        lab.apply(&pod_with("no-secret", false))?;
        let waiting = until(&lab, "no-secret refused by the registry", START, || {
            let p = pod(&lab, "no-secret")?;
            let w = &p["status"]["initContainerStatuses"][0]["state"]["waiting"];
            let reason = w["reason"].as_str().unwrap_or("");
            Ok((reason == "ErrImagePull" || reason == "ImagePullBackOff").then(|| w.clone()))
        })
        .await?;
        ensure!(
            waiting["message"].as_str().unwrap_or("").contains("127.0.0.1:5000"),
            "the pull error does not name the registry: {waiting}"
        );
        // With a docker-registry Secret: pulled, the init container first, then the app.
        lab.kubectl_ok(&[
            "create",
            "secret",
            "docker-registry",
            "lab-registry",
            "--docker-server=127.0.0.1:5000",
            "--docker-username=puller",
            "--docker-password=s3cret-pull",
        ])?;
        lab.apply(&pod_with("with-secret", true))?;
        let phase = until(&lab, "with-secret finished", START, || {
            let p = pod(&lab, "with-secret")?;
            let phase = p["status"]["phase"].as_str().unwrap_or("").to_owned();
            Ok((phase == "Succeeded" || phase == "Failed").then_some((phase, p)))
        })
        .await?;
        ensure!(phase.0 == "Succeeded", "with-secret: {}", phase.1["status"]);
        ensure!(
            phase.1["status"]["initContainerStatuses"][0]["state"]["terminated"]["reason"] == "Completed",
            "{}",
            phase.1["status"]
        );

        // `kubectl exec -it` with a terminal (script(1) gives kubectl a pty): the process
        // sees a tty.
        lab.kubectl_ok(&[
            "run",
            "shell",
            "--image=weir.local/busybox:latest",
            "--",
            "sleep",
            "3600",
        ])?;
        until(&lab, "shell Running", START, || {
            Ok(running_with_ip(&pod(&lab, "shell")?).map(|_| ()))
        })
        .await?;
        let kubectl = weir_tests::required_binary(
            "WEIR_KUBECTL",
            weir_tests::workspace_dir().join("target/tools/kubectl"),
            "kubectl",
        )?;
        let mut cmd = std::process::Command::new("script");
        cmd.env("KUBECONFIG", lab.kubeconfig()).args([
            "-qec",
            &format!(
                "{} exec -it shell -- sh -c 'tty && echo cols=$(stty size)'",
                kubectl.display()
            ),
            "/dev/null",
        ]);
        let out = weir_tests::run_bounded(cmd, None, Duration::from_secs(30));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(
            out.status.success() && text.contains("/dev/pts/") && text.contains("cols="),
            "exec -it: {}",
            describe(&out)
        );
        Ok::<(), anyhow::Error>(())
    }
    .await;
    let _ = server.kill();
    let _ = server.wait();
    outcome
}
