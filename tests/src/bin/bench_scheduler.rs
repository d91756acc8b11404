//! `bench_scheduler`: how fast `weir server`'s scheduler binds pods, as in Kubernetes'
//! scheduler_perf "pending pods, then nodes" cases. Run it through `cargo xtask bench scheduler`,
//! which builds everything in release mode and draws the plot.
//!
//! Each run starts a fresh `weir server` (embedded store) on a free loopback port and:
//!   1. creates `--pods` pods (100m cpu, 128Mi each) while no node exists, and waits until the
//!      scheduler has marked every one of them `PodScheduled=False`;
//!   2. creates `--nodes` fake Nodes (32 cpu, 128Gi, 110 pods, Ready, with a kube-node-lease
//!      Lease renewed every 10 s as kubelets do) and times until every pod is bound: pods/s;
//!   3. creates a Deployment of `--replicas` replicas and times until all its pods are bound
//!      (the Deployment and ReplicaSet controllers and the scheduler together).
//!
//! Bindings are observed through a watch, as a client would see them. Writes
//! `<out>/scheduler.json` and `<out>/scheduler.md`. kube-scheduler cannot run here (no
//! container registry, no Debian package), so it appears in the table by its published
//! figures only, marked as such.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryFutureExt, TryStreamExt};
use serde_json::{Value, json};
use weir_tests::bench::{BenchServer, REQUEST_TIMEOUT, StoreKind, format_number, load_average, median};

const USAGE: &str = "usage: bench_scheduler --weir PATH [--out DIR] [--nodes N] [--pods N] [--replicas N] \
                     [--runs N] [--concurrency N]";

/// Upper bound for every wait of a phase; a stuck scheduler fails the run, not the machine.
const PHASE_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the fake kubelets renew their Leases (kubelet's default).
const LEASE_RENEW: Duration = Duration::from_secs(10);
/// kube-scheduler's throughput as its maintainers publish it (scheduler_perf, 5,000 nodes):
/// roughly 100-300 pods/s depending on the case. Quoted, not measured.
const KUBE_SCHEDULER_PUBLISHED: &str = "~100-300 (published)";

struct Args {
    weir: PathBuf,
    out: PathBuf,
    nodes: usize,
    pods: usize,
    replicas: usize,
    runs: usize,
    concurrency: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        weir: PathBuf::new(),
        out: PathBuf::from("target/bench"),
        nodes: 1_000,
        pods: 10_000,
        replicas: 1_000,
        runs: 3,
        concurrency: 64,
    };
    for (flag, value) in weir_tests::bench::flag_pairs(USAGE)? {
        let number = || weir_tests::bench::positive(&flag, &value);
        match flag.as_str() {
            "--weir" => args.weir = PathBuf::from(&value),
            "--out" => args.out = PathBuf::from(&value),
            "--nodes" => args.nodes = number()?,
            "--pods" => args.pods = number()?,
            "--replicas" => args.replicas = number()?,
            "--runs" => args.runs = number()?,
            "--concurrency" => args.concurrency = number()?,
            _ => bail!("unknown flag {flag}\n{USAGE}"),
        }
    }
    if args.weir.as_os_str().is_empty() {
        bail!("--weir is required\n{USAGE}");
    }
    if !args.weir.is_file() {
        bail!(
            "{} is not a file (build it with `cargo build --release -p weir`)",
            args.weir.display()
        );
    }
    // 110 pods per node at most.
    if args.pods + args.replicas > args.nodes * 110 {
        bail!(
            "{} pods do not fit on {} nodes of 110 pods each",
            args.pods + args.replicas,
            args.nodes
        );
    }
    Ok(args)
}

fn status(line: impl AsRef<str>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "[bench scheduler] {}", line.as_ref());
    let _ = out.flush();
}

#[tokio::main]
async fn main() {
    weir_tests::bench::run_main("bench_scheduler", parse_args(), run).await
}

/// What one run measured.
#[derive(Default)]
struct RunResult {
    pod_creates_per_s: f64,
    /// From the first pod create until every pod was marked unschedulable.
    all_marked_s: f64,
    /// Creating the nodes (Node, status and Lease each).
    nodes_created_s: f64,
    /// From the first node create until the first and the last pod was bound.
    first_bound_s: f64,
    all_bound_s: f64,
    pods_per_s: f64,
    /// `(seconds since the first node create, pods bound)`, about every 100 ms.
    curve: Vec<(f64, usize)>,
    deployment_bound_s: f64,
    server_cpu_s: f64,
    server_rss_mib: f64,
    load_average: Option<f64>,
}

async fn run(args: &Args) -> Result<()> {
    let mut runs = Vec::new();
    for i in 0..args.runs {
        status(format!("== run {}/{} ==", i + 1, args.runs));
        let started = Instant::now();
        let result = bench_run(args).await.with_context(|| format!("run {}", i + 1))?;
        status(format!(
            "== run {}/{} done in {:.1}s: {:.0} pods/s, deployment of {} bound in {:.2}s ==",
            i + 1,
            args.runs,
            started.elapsed().as_secs_f64(),
            result.pods_per_s,
            args.replicas,
            result.deployment_bound_s
        ));
        runs.push(result);
    }
    let (json, markdown) = report(args, &runs);
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let json_path = args.out.join("scheduler.json");
    let md_path = args.out.join("scheduler.md");
    let mut bytes = serde_json::to_vec_pretty(&json)?;
    bytes.push(b'\n');
    std::fs::write(&json_path, bytes).with_context(|| format!("writing {}", json_path.display()))?;
    std::fs::write(&md_path, &markdown).with_context(|| format!("writing {}", md_path.display()))?;
    println!();
    print!("{markdown}");
    println!();
    status(format!("wrote {} and {}", json_path.display(), md_path.display()));
    Ok(())
}

/// Pods of one namespace as a watch shows them: which are bound, which were marked unschedulable.
#[derive(Default)]
struct Seen {
    bound: HashSet<String>,
    marked: HashSet<String>,
}

/// Records what one pod object shows.
fn note(seen: &Mutex<Seen>, pod: &Value) {
    let Some(name) = pod.pointer("/metadata/name").and_then(Value::as_str) else {
        return;
    };
    let bound = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty());
    let marked = pod
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|c| c.iter().any(|c| c["type"] == "PodScheduled" && c["status"] == "False"));
    let mut seen = seen.lock().expect("not poisoned");
    if bound {
        seen.bound.insert(name.to_string());
    }
    if marked {
        seen.marked.insert(name.to_string());
    }
}

/// Keeps `seen` current for the pods of `ns` as a reflector does: LIST, then WATCH from the
/// list's resourceVersion, and again whenever the server ends the watch (it ends watches that
/// fall behind, as Kubernetes does). Runs until aborted.
async fn watch_pods(client: reqwest::Client, url: String, seen: Arc<Mutex<Seen>>) {
    loop {
        let listed: Result<Value> = async {
            let response = client.get(&url).send().await?.error_for_status()?;
            Ok(response.json::<Value>().await?)
        }
        .await;
        let Ok(list) = listed else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        for pod in list["items"].as_array().into_iter().flatten() {
            note(&seen, pod);
        }
        let rv = list
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let Ok(mut response) = client.get(format!("{url}?watch=1&resourceVersion={rv}")).send().await else {
            continue;
        };
        let mut buffer: Vec<u8> = Vec::new();
        while let Ok(Some(chunk)) = response.chunk().await {
            buffer.extend_from_slice(&chunk);
            while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=end).collect();
                if let Ok(event) = serde_json::from_slice::<Value>(&line) {
                    note(&seen, &event["object"]);
                }
            }
        }
    }
}

/// Aborts the task when dropped, so no watch outlives its phase.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn start_watch(server: &BenchServer, ns: &str) -> Result<(Arc<Mutex<Seen>>, AbortOnDrop)> {
    let client = server.client(None)?;
    let url = server.url(&format!("/api/v1/namespaces/{ns}/pods"));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let task = tokio::spawn(watch_pods(client, url, seen.clone()));
    Ok((seen, AbortOnDrop(task)))
}

/// Waits until `done` says so about `seen`, printing progress every 2 s; fails after PHASE_TIMEOUT.
async fn wait_for(
    what: &str,
    seen: &Mutex<Seen>,
    mut on_tick: impl FnMut(&Seen),
    done: impl Fn(&Seen) -> (usize, bool),
) -> Result<()> {
    let started = Instant::now();
    let mut last_progress = Instant::now();
    loop {
        let (count, finished) = {
            let seen = seen.lock().expect("not poisoned");
            on_tick(&seen);
            done(&seen)
        };
        if finished {
            return Ok(());
        }
        if started.elapsed() > PHASE_TIMEOUT {
            bail!("{what}: only {count} after {PHASE_TIMEOUT:?}");
        }
        if last_progress.elapsed() > Duration::from_secs(2) {
            last_progress = Instant::now();
            status(format!("  {what}: {count} so far"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `request`, failing unless the answer has status `code`. Reads the whole body: an HTTP/2
/// response dropped unread resets its stream, and h2 closes a connection after 1,024 of those.
async fn expect(request: reqwest::RequestBuilder, code: u16, what: &str) -> Result<()> {
    let response = request.send().await.with_context(|| what.to_string())?;
    let status = response.status();
    let body = response.bytes().await.with_context(|| what.to_string())?;
    if status.as_u16() != code {
        bail!(
            "{what}: expected HTTP {code}, got {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(())
}

/// Runs `f(0..n)` with `concurrency` requests in flight; returns requests per second.
async fn concurrently<F, Fut>(n: usize, concurrency: usize, f: F) -> Result<f64>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(f)
        .buffer_unordered(concurrency)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

fn pod(i: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("pending-{i}"), "labels": {"app": "pending"}},
        "spec": {"containers": [{"name": "c", "image": "weir.local/busybox:latest",
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}]},
    })
}

fn now_rfc3339() -> String {
    jiff::Timestamp::now().to_string()
}

fn micro_now() -> String {
    jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

async fn create_node(server: &BenchServer, client: &reqwest::Client, i: usize) -> Result<()> {
    let name = format!("node-{i:04}");
    let node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name,
            "topology.kubernetes.io/zone": format!("zone-{}", i % 3)}},
    });
    expect(
        client.post(server.url("/api/v1/nodes")).json(&node),
        201,
        &format!("creating node {name}"),
    )
    .await?;
    let resources = json!({"cpu": "32", "memory": "128Gi", "pods": "110"});
    let status = json!({"status": {
        "capacity": resources, "allocatable": resources,
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
            "lastHeartbeatTime": now_rfc3339(), "lastTransitionTime": now_rfc3339()}],
    }});
    expect(
        client
            .patch(server.url(&format!("/api/v1/nodes/{name}/status")))
            .header("Content-Type", "application/merge-patch+json")
            .json(&status),
        200,
        &format!("writing the status of node {name}"),
    )
    .await?;
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "namespace": "kube-node-lease"},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": micro_now()},
    });
    expect(
        client
            .post(server.url("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"))
            .json(&lease),
        201,
        &format!("creating the lease of node {name}"),
    )
    .await
}

/// Renews every node's Lease each LEASE_RENEW, as the nodes' kubelets would, until dropped.
fn heartbeats(server: &BenchServer, nodes: usize, concurrency: usize) -> Result<AbortOnDrop> {
    let client = server.client(Some(REQUEST_TIMEOUT))?;
    let base = server.url("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases");
    Ok(AbortOnDrop(tokio::spawn(async move {
        loop {
            tokio::time::sleep(LEASE_RENEW).await;
            let renew = json!({"spec": {"renewTime": micro_now()}});
            futures::stream::iter(0..nodes)
                .map(|i| {
                    client
                        .patch(format!("{base}/node-{i:04}"))
                        .header("Content-Type", "application/merge-patch+json")
                        .json(&renew)
                        .send()
                        .and_then(reqwest::Response::bytes)
                })
                .buffer_unordered(concurrency)
                .for_each(|_| futures::future::ready(()))
                .await;
        }
    })))
}

async fn bench_run(args: &Args) -> Result<RunResult> {
    let load_average = load_average();
    let server = BenchServer::start(&args.weir, StoreKind::Embedded, &[]).await?;
    match phases(args, &server, load_average).await {
        Ok(result) => Ok(result),
        Err(e) => Err(e.context(format!("server log:\n{}", server.logs()))),
    }
}

async fn phases(args: &Args, server: &BenchServer, load_average: Option<f64>) -> Result<RunResult> {
    let client = server.client(Some(REQUEST_TIMEOUT))?;
    let cpu_before = server.cpu_seconds().unwrap_or(0.0);
    let mut result = RunResult {
        load_average,
        ..RunResult::default()
    };
    for ns in ["bench", "deploy"] {
        expect(
            client
                .post(server.url("/api/v1/namespaces"))
                .json(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})),
            201,
            &format!("creating namespace {ns}"),
        )
        .await?;
    }
    let (seen, _watch) = start_watch(server, "bench").await?;

    // 1. Pending pods, no nodes.
    status(format!("  creating {} pods with no node to run on", args.pods));
    let started = Instant::now();
    let pods_url = server.url("/api/v1/namespaces/bench/pods");
    result.pod_creates_per_s = concurrently(args.pods, args.concurrency, |i| {
        expect(client.post(&pods_url).json(&pod(i)), 201, "creating a pod")
    })
    .await?;
    let n = args.pods;
    wait_for(
        "pods marked unschedulable",
        &seen,
        |_| {},
        |s| (s.marked.len(), s.marked.len() >= n),
    )
    .await?;
    result.all_marked_s = started.elapsed().as_secs_f64();
    status(format!(
        "  {} pods created ({:.0}/s), all marked unschedulable after {:.2}s",
        n, result.pod_creates_per_s, result.all_marked_s
    ));

    // 2. Nodes arrive; time the binding of every pending pod.
    status(format!("  creating {} nodes", args.nodes));
    let t0 = Instant::now();
    let nodes_client = server.client(Some(REQUEST_TIMEOUT))?;
    concurrently(args.nodes, args.concurrency, |i| create_node(server, &nodes_client, i)).await?;
    result.nodes_created_s = t0.elapsed().as_secs_f64();
    let _heartbeats = heartbeats(server, args.nodes, args.concurrency)?;
    let mut curve = Vec::new();
    let mut first_bound = None;
    let mut last_point = Instant::now();
    wait_for(
        "pods bound",
        &seen,
        |s| {
            let bound = s.bound.len();
            if bound > 0 && first_bound.is_none() {
                first_bound = Some(t0.elapsed().as_secs_f64());
            }
            if last_point.elapsed() >= Duration::from_millis(100) || bound >= n {
                last_point = Instant::now();
                curve.push((t0.elapsed().as_secs_f64(), bound));
            }
        },
        |s| (s.bound.len(), s.bound.len() >= n),
    )
    .await?;
    result.all_bound_s = t0.elapsed().as_secs_f64();
    result.first_bound_s = first_bound.unwrap_or(result.all_bound_s);
    result.pods_per_s = n as f64 / result.all_bound_s;
    result.curve = curve;
    status(format!(
        "  {} nodes created in {:.2}s; first pod bound after {:.2}s, all {} after {:.2}s: {:.0} pods/s",
        args.nodes, result.nodes_created_s, result.first_bound_s, n, result.all_bound_s, result.pods_per_s
    ));

    // 3. A Deployment of `replicas` pods.
    let (deploy_seen, _deploy_watch) = start_watch(server, "deploy").await?;
    let replicas = args.replicas;
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "deploy"},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c", "image": "weir.local/echo:latest",
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}]}}},
    });
    status(format!("  creating a Deployment of {replicas} replicas"));
    let t0 = Instant::now();
    expect(
        client
            .post(server.url("/apis/apps/v1/namespaces/deploy/deployments"))
            .json(&deployment),
        201,
        "creating the deployment",
    )
    .await?;
    wait_for(
        "deployment pods bound",
        &deploy_seen,
        |_| {},
        |s| (s.bound.len(), s.bound.len() >= replicas),
    )
    .await?;
    result.deployment_bound_s = t0.elapsed().as_secs_f64();
    result.server_cpu_s = server.cpu_seconds().unwrap_or(0.0) - cpu_before;
    result.server_rss_mib = server.rss_kib().unwrap_or(0) as f64 / 1024.0;
    Ok(result)
}

/// One row of the table: its key, label, unit, which way is better, the value per run, the target.
struct Row {
    key: &'static str,
    label: String,
    unit: &'static str,
    better: &'static str,
    values: Vec<f64>,
    decimals: usize,
    target: Option<f64>,
    target_text: String,
}

fn report(args: &Args, runs: &[RunResult]) -> (Value, String) {
    let of = |f: fn(&RunResult) -> f64| runs.iter().map(f).collect::<Vec<f64>>();
    let rows = vec![
        Row {
            key: "pods_per_s",
            label: format!(
                "Pods bound per second ({} pending pods, {} nodes)",
                args.pods, args.nodes
            ),
            unit: "pods/s",
            better: "higher",
            values: of(|r| r.pods_per_s),
            decimals: 0,
            target: Some(1000.0),
            target_text: format!("≥ 1,000; kube-scheduler {KUBE_SCHEDULER_PUBLISHED}"),
        },
        Row {
            key: "all_bound_s",
            label: format!("Time until all {} pods are bound (s, from the first node)", args.pods),
            unit: "s",
            better: "lower",
            values: of(|r| r.all_bound_s),
            decimals: 2,
            target: None,
            target_text: String::new(),
        },
        Row {
            key: "first_bound_s",
            label: "Time until the first pod is bound (s)".into(),
            unit: "s",
            better: "lower",
            values: of(|r| r.first_bound_s),
            decimals: 2,
            target: None,
            target_text: String::new(),
        },
        Row {
            key: "deployment_bound_s",
            label: format!("Deployment of {} replicas fully bound (s)", args.replicas),
            unit: "s",
            better: "lower",
            values: of(|r| r.deployment_bound_s),
            decimals: 2,
            target: None,
            target_text: String::new(),
        },
        Row {
            key: "all_marked_s",
            label: format!(
                "{} pods created and all reported unschedulable, no nodes (s)",
                args.pods
            ),
            unit: "s",
            better: "lower",
            values: of(|r| r.all_marked_s),
            decimals: 2,
            target: None,
            target_text: String::new(),
        },
        Row {
            key: "nodes_created_s",
            label: format!("Creating {} nodes (Node, status, Lease) (s)", args.nodes),
            unit: "s",
            better: "lower",
            values: of(|r| r.nodes_created_s),
            decimals: 2,
            target: None,
            target_text: String::new(),
        },
        Row {
            key: "server_cpu_s",
            label: "Server CPU time for the whole run (s)".into(),
            unit: "s",
            better: "lower",
            values: of(|r| r.server_cpu_s),
            decimals: 1,
            target: None,
            target_text: String::new(),
        },
        Row {
            key: "server_rss_mib",
            label: "Server RSS at the end (MiB)".into(),
            unit: "MiB",
            better: "lower",
            values: of(|r| r.server_rss_mib),
            decimals: 0,
            target: None,
            target_text: String::new(),
        },
    ];
    let mut markdown = format!(
        "| metric | weir (median of {}) | runs | target / peer |\n|---|---:|---|---|\n",
        runs.len()
    );
    let mut metrics = Vec::new();
    for row in &rows {
        let m = median(&row.values);
        markdown.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            row.label,
            format_number(m, row.decimals),
            row.values
                .iter()
                .map(|v| format_number(*v, row.decimals))
                .collect::<Vec<_>>()
                .join(", "),
            row.target_text
        ));
        metrics.push(json!({
            "key": row.key, "label": row.label, "unit": row.unit, "better": row.better,
            "weir": m, "runs": row.values, "target": row.target, "target_text": row.target_text,
        }));
    }
    let pods_per_s = median(&rows[0].values);
    markdown.push_str(&format!(
        "\n{:.1}x the 1,000 pods/s target; {:.1}x-{:.1}x kube-scheduler's published 100-300 pods/s \
         (quoted, not measured here: kube-scheduler cannot run on this machine). {} CPUs; server, \
         fake nodes and client on the same machine; embedded store; 1-minute load average at the \
         starts: {}.\n",
        pods_per_s / 1000.0,
        pods_per_s / 300.0,
        pods_per_s / 100.0,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        runs.iter()
            .map(|r| r.load_average.map_or_else(|| "?".to_string(), |l| format!("{l:.1}")))
            .collect::<Vec<_>>()
            .join(", "),
    ));
    let json = json!({
        "benchmark": "scheduler",
        "unix_time": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "params": {"nodes": args.nodes, "pods": args.pods, "replicas": args.replicas,
            "runs": args.runs, "concurrency": args.concurrency},
        "peer": {"name": "kube-scheduler", "pods_per_s_published": [100, 300], "measured": false},
        "runs": runs.iter().map(|r| json!({
            "pod_creates_per_s": r.pod_creates_per_s, "all_marked_s": r.all_marked_s,
            "nodes_created_s": r.nodes_created_s, "first_bound_s": r.first_bound_s,
            "all_bound_s": r.all_bound_s, "pods_per_s": r.pods_per_s,
            "deployment_bound_s": r.deployment_bound_s, "server_cpu_s": r.server_cpu_s,
            "server_rss_mib": r.server_rss_mib, "load_average_1m": r.load_average,
            "curve": r.curve,
        })).collect::<Vec<_>>(),
        "metrics": metrics,
    });
    (json, markdown)
}
