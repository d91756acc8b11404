//! `bench_pods` (root): pod start latency on a Weir node, as Kubernetes' pod startup SLO
//! measures it: from the pod's creation to the watch seeing it Running with its container
//! started, the image already on the node. Run it through `cargo xtask bench pods`, which
//! builds weir in release mode and the images, and draws the plot.
//!
//! Each run starts a fresh two-node lab (`weir up` on node-0, `weir agent` on node-1, each in
//! a network namespace of its own, see `weir_tests::cluster`), creates `--pods` pods pinned
//! to node-1 all at once (`weir.local/echo`), and records every pod's latency; then it reads
//! the memory of node-1's agent process (which runs nothing else) and of its containerd.
//! kubelet cannot run on this machine (no Debian package, no image registry), so the peer is
//! Kubernetes' published SLO (p99 ≤ 5 s), quoted, not measured.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams, WatchEvent, WatchParams};
use serde_json::{Value, json};
use weir_tests::bench::{format_number, median, percentile};
use weir_tests::cluster::Lab;

const USAGE: &str = "usage: bench_pods [--out DIR] [--pods N] [--runs N] [--rate PODS_PER_S]  (root; WEIR_BIN, WEIR_KUBECTL, WEIR_IMAGES)";
/// The target of the issue, and Kubernetes' SLO.
const TARGET_P99_S: f64 = 1.0;
const KUBERNETES_SLO_P99_S: f64 = 5.0;
const PHASE_TIMEOUT: Duration = Duration::from_secs(300);

struct Args {
    out: PathBuf,
    pods: usize,
    runs: usize,
    /// The paced phase's creation rate (Kubernetes' density tests create at a steady rate).
    rate: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        out: PathBuf::from("target/bench"),
        pods: 100,
        runs: 3,
        rate: 10,
    };
    for (flag, value) in weir_tests::bench::flag_pairs(USAGE)? {
        let number = || weir_tests::bench::positive(&flag, &value);
        match flag.as_str() {
            "--out" => args.out = PathBuf::from(&value),
            "--pods" => args.pods = number()?,
            "--runs" => args.runs = number()?,
            "--rate" => args.rate = number()?,
            other => bail!("unknown flag {other}\n{USAGE}"),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() {
    weir_tests::bench::run_main("bench_pods", parse_args(), run).await
}

/// One phase: `latencies` sorted, in seconds.
struct Phase {
    latencies: Vec<f64>,
    all_running_s: f64,
}

struct RunResult {
    paced: Phase,
    burst: Phase,
    agent_rss_mib: f64,
    containerd_rss_mib: f64,
}

fn rss_mib(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

fn pod_manifest(name: &str, phase: &str) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"bench": phase}},
        "spec": {
            "nodeName": "node-1",
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "echo", "image": "weir.local/echo:latest"}],
        },
    }))?)
}

fn started(p: &Pod) -> bool {
    let status = p.status.as_ref();
    status.and_then(|s| s.phase.as_deref()) == Some("Running")
        && status.and_then(|s| s.container_statuses.as_ref()).is_some_and(|cs| {
            cs.iter()
                .all(|c| c.state.as_ref().is_some_and(|st| st.running.is_some()))
        })
}

/// Creates `count` pods labelled `bench=<name>` (all at once when `rate` is None, else
/// `rate` per second) and times each from its create call to the watch seeing it Running.
async fn phase(lab: &Lab, pods: &Api<Pod>, name: &str, count: usize, rate: Option<usize>) -> Result<Phase> {
    let created: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let running: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let version = pods
        .list_metadata(&Default::default())
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let watch = {
        let pods = pods.clone();
        let running = running.clone();
        let selector = format!("bench={name}");
        tokio::spawn(async move {
            let params = WatchParams::default().labels(&selector);
            let mut stream = pods.watch(&params, &version).await?.boxed();
            while let Some(event) = stream.try_next().await? {
                if let WatchEvent::Modified(p) | WatchEvent::Added(p) = event
                    && started(&p)
                {
                    let mut running = running.lock().expect("not poisoned");
                    running
                        .entry(p.metadata.name.clone().unwrap_or_default())
                        .or_insert_with(Instant::now);
                    if running.len() >= count {
                        return Ok::<(), anyhow::Error>(());
                    }
                }
            }
            bail!("the watch ended early")
        })
    };
    let start = Instant::now();
    let create = |i: usize| {
        let pods = pods.clone();
        let created = created.clone();
        let pod_name = format!("{name}-{i:03}");
        let label = name.to_owned();
        async move {
            let manifest = pod_manifest(&pod_name, &label)?;
            let t = Instant::now();
            pods.create(&PostParams::default(), &manifest)
                .await
                .with_context(|| format!("creating {pod_name}"))?;
            created.lock().expect("not poisoned").insert(pod_name, t);
            Ok::<(), anyhow::Error>(())
        }
    };
    match rate {
        None => {
            futures::stream::iter(0..count)
                .map(create)
                .buffer_unordered(16)
                .try_collect::<Vec<()>>()
                .await?;
        }
        Some(rate) => {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
            let mut creating = Vec::new();
            for i in 0..count {
                tick.tick().await;
                creating.push(tokio::spawn(create(i)));
            }
            for c in creating {
                c.await??;
            }
        }
    }
    match tokio::time::timeout(PHASE_TIMEOUT, watch).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(e.context(lab.logs())),
        Ok(Err(e)) => bail!("the watch task failed: {e}"),
        Err(_) => bail!(
            "only {} of {count} pods Running within {PHASE_TIMEOUT:?}:\n{}",
            running.lock().expect("not poisoned").len(),
            lab.logs()
        ),
    }
    let all_running_s = start.elapsed().as_secs_f64();
    let created = created.lock().expect("not poisoned").clone();
    let running = running.lock().expect("not poisoned").clone();
    let mut latencies: Vec<f64> = running
        .iter()
        .filter_map(|(name, at)| {
            created
                .get(name)
                .map(|c| at.saturating_duration_since(*c).as_secs_f64())
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    Ok(Phase {
        latencies,
        all_running_s,
    })
}

async fn one_run(args: &Args, run: usize) -> Result<RunResult> {
    eprintln!("bench_pods: run {}/{}: starting a two-node lab", run + 1, args.runs);
    let lab = Lab::start(2, &["--no-service-proxy"]).await?;
    let client = lab.client().await?;
    let pods: Api<Pod> = Api::namespaced(client, "default");
    // Warm-up: the first pods pay for first-time work (snapshots, binaries in the page cache).
    phase(&lab, &pods, "warm-up", 3, None).await?;
    eprintln!(
        "bench_pods: run {}: {} pods at {} per second",
        run + 1,
        args.pods,
        args.rate
    );
    let paced = phase(&lab, &pods, "paced", args.pods, Some(args.rate)).await?;
    eprintln!(
        "bench_pods: run {}: paced p50 {:.3} s, p99 {:.3} s",
        run + 1,
        percentile(&paced.latencies, 0.5),
        percentile(&paced.latencies, 0.99)
    );
    // The burst starts on an empty node.
    pods.delete_collection(&Default::default(), &ListParams::default().labels("bench"))
        .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    eprintln!("bench_pods: run {}: {} pods at once", run + 1, args.pods);
    let burst = phase(&lab, &pods, "burst", args.pods, None).await?;
    let agent_pid = lab.pid(1).context("node-1's agent is not running")?;
    let agent_rss_mib = rss_mib(agent_pid).unwrap_or(f64::NAN);
    let socket = lab.nodes[1].data_dir.join("containerd").display().to_string();
    let containerd_rss_mib = weir_tests::bench::find_pid_with_arg(&socket)
        .and_then(rss_mib)
        .unwrap_or(f64::NAN);
    eprintln!(
        "bench_pods: run {}: burst p50 {:.3} s, p99 {:.3} s, all Running after {:.2} s; agent {:.0} MiB, containerd {:.0} MiB",
        run + 1,
        percentile(&burst.latencies, 0.5),
        percentile(&burst.latencies, 0.99),
        burst.all_running_s,
        agent_rss_mib,
        containerd_rss_mib
    );
    Ok(RunResult {
        paced,
        burst,
        agent_rss_mib,
        containerd_rss_mib,
    })
}

fn phase_json(p: &Phase) -> Value {
    json!({"latencies_s": p.latencies, "all_running_s": p.all_running_s,
           "p50_s": percentile(&p.latencies, 0.5), "p99_s": percentile(&p.latencies, 0.99)})
}

async fn run(args: &Args) -> Result<()> {
    let mut runs = Vec::new();
    for i in 0..args.runs {
        runs.push(one_run(args, i).await?);
    }
    let stat = |f: &dyn Fn(&RunResult) -> f64| -> (f64, Vec<f64>) {
        let v: Vec<f64> = runs.iter().map(f).collect();
        (median(&v), v)
    };
    let paced_p50 = stat(&|r| percentile(&r.paced.latencies, 0.5));
    let paced_p99 = stat(&|r| percentile(&r.paced.latencies, 0.99));
    let burst_p50 = stat(&|r| percentile(&r.burst.latencies, 0.5));
    let burst_p99 = stat(&|r| percentile(&r.burst.latencies, 0.99));
    let burst_all = stat(&|r| r.burst.all_running_s);
    let agent = stat(&|r| r.agent_rss_mib);
    let containerd = stat(&|r| r.containerd_rss_mib);
    let report = json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "params": {"pods": args.pods, "runs": args.runs, "rate": args.rate},
        "target_p99_s": TARGET_P99_S,
        "kubernetes_slo_p99_s": KUBERNETES_SLO_P99_S,
        "paced_p50_s": paced_p50.0,
        "paced_p99_s": paced_p99.0,
        "burst_p50_s": burst_p50.0,
        "burst_p99_s": burst_p99.0,
        "burst_all_running_s": burst_all.0,
        "agent_rss_mib": agent.0,
        "containerd_rss_mib": containerd.0,
        "runs": runs.iter().map(|r| json!({
            "paced": phase_json(&r.paced),
            "burst": phase_json(&r.burst),
            "agent_rss_mib": r.agent_rss_mib,
            "containerd_rss_mib": r.containerd_rss_mib,
        })).collect::<Vec<Value>>(),
    });
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("pods.json"), serde_json::to_vec_pretty(&report)?)?;
    let row = |label: &str, s: &(f64, Vec<f64>), d: usize, unit: &str, target: &str, slo: &str| {
        format!(
            "| {label} | {} {unit} | {} | {target} | {slo} |\n",
            format_number(s.0, d),
            s.1.iter().map(|x| format_number(*x, d)).collect::<Vec<_>>().join(", ")
        )
    };
    let md = format!(
        "# Pod start latency on one node, image present (median of {} runs)\n\n\
         | metric | weir | runs | target | Kubernetes SLO (published) |\n|---|---|---|---|---|\n{}{}{}{}{}{}{}\n\
         Paced: {} pods created at {} per second, as Kubernetes' density tests create them. Burst: {} pods \
         created at once. kubelet cannot run on this machine (no package, no image registry): its column is the \
         published SLO, not a measurement.\n",
        args.runs,
        row("paced p50 create → Running", &paced_p50, 3, "s", "", ""),
        row(
            "paced p99 create → Running",
            &paced_p99,
            3,
            "s",
            &format!("< {TARGET_P99_S} s"),
            &format!("≤ {KUBERNETES_SLO_P99_S} s")
        ),
        row("burst p50 create → Running", &burst_p50, 3, "s", "", ""),
        row("burst p99 create → Running", &burst_p99, 3, "s", "", ""),
        row(
            &format!("burst: all {} Running after", args.pods),
            &burst_all,
            2,
            "s",
            "",
            ""
        ),
        row(
            &format!("agent memory (RSS) with {} pods", args.pods),
            &agent,
            0,
            "MiB",
            "",
            ""
        ),
        row("its containerd (RSS)", &containerd, 0, "MiB", "", ""),
        args.pods,
        args.rate,
        args.pods,
    );
    std::fs::write(args.out.join("pods.md"), &md)?;
    println!("{md}");
    Ok(())
}
