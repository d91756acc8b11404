//! `bench_api`: throughput and latency of the Weir API server over HTTPS + HTTP/2, measured
//! against each store (embedded file, real etcd) side by side. Run it through
//! `cargo xtask bench api`, which builds `weir` in release mode and draws the plot.
//!
//! Per store it starts `weir server` on a free loopback port in a throwaway data dir and
//! measures:
//!   1. ConfigMap creates/s in `default` (N objects, `--concurrency` requests in flight);
//!   2. ConfigMap updates/s (PUT with the last resourceVersion) of those objects;
//!   3. LIST latency of `--pods` small Pods in their own namespace (full JSON, time to last byte);
//!   4. watch fan-out: time until all `--watchers` watches of one namespace saw one change.
//!
//! Writes `<out>/api.json` (every run, plus the summary rows) and `<out>/api.md` (the table it
//! also prints). Every phase is bounded in time; the server, etcd and data dirs are cleaned up
//! by Drop guards, also on errors and Ctrl-C.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use serde_json::{Value, json};
use weir_tests::bench::{
    BenchServer, REQUEST_TIMEOUT, StoreKind, cpu_seconds, format_number, load_average, median, percentile,
};

const USAGE: &str = "usage: bench_api --weir PATH [--out DIR] [--stores embedded,etcd] [--objects N] \
                     [--pods N] [--watchers N] [--concurrency N] [--connections N] [--runs N]";

/// Upper bound for one whole phase; a stuck server fails the phase, not the run.
const PHASE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a watch round may take until every watcher saw the change.
const WATCH_ROUND_TIMEOUT: Duration = Duration::from_secs(60);
/// Watches per HTTP/2 connection; the server allows 200 concurrent streams per connection
/// (hyper's default), so 1,000 watches need several connections, as they would from
/// several clients.
const WATCHES_PER_CONNECTION: usize = 100;
/// Timed LIST runs (after one warm-up) and watch rounds.
const LIST_RUNS: usize = 5;
const WATCH_ROUNDS: usize = 3;

struct Args {
    weir: PathBuf,
    out: PathBuf,
    stores: Vec<StoreKind>,
    objects: usize,
    pods: usize,
    watchers: usize,
    concurrency: usize,
    /// HTTP/2 connections the writes are spread over (one, like a single Kubernetes client).
    connections: usize,
    runs: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        weir: PathBuf::new(),
        out: PathBuf::from("target/bench"),
        stores: vec![StoreKind::Embedded, StoreKind::Etcd],
        objects: 5_000,
        pods: 10_000,
        watchers: 1_000,
        concurrency: 64,
        connections: 1,
        runs: 3,
    };
    for (flag, value) in weir_tests::bench::flag_pairs(USAGE)? {
        let number = || weir_tests::bench::positive(&flag, &value);
        match flag.as_str() {
            "--weir" => args.weir = PathBuf::from(&value),
            "--out" => args.out = PathBuf::from(&value),
            "--stores" => {
                args.stores = value
                    .split(',')
                    .map(|s| match s.trim() {
                        "embedded" => Ok(StoreKind::Embedded),
                        "etcd" => Ok(StoreKind::Etcd),
                        other => Err(anyhow!("unknown store {other:?} (embedded, etcd)")),
                    })
                    .collect::<Result<_>>()?
            }
            "--objects" => args.objects = number()?,
            "--pods" => args.pods = number()?,
            "--watchers" => args.watchers = number()?,
            "--concurrency" => args.concurrency = number()?,
            "--connections" => args.connections = number()?,
            "--runs" => args.runs = number()?,
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
    Ok(args)
}

fn status(line: impl AsRef<str>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "[bench api] {}", line.as_ref());
    let _ = out.flush();
}

#[tokio::main]
async fn main() {
    weir_tests::bench::run_main("bench_api", parse_args(), run).await
}

async fn run(args: &Args) -> Result<()> {
    let mut results = Vec::new();
    for &store in &args.stores {
        status(format!("== store: {} ==", store.name()));
        let started = Instant::now();
        let result = bench_store(args, store).await;
        status(format!(
            "== store: {} done in {:.1}s ==",
            store.name(),
            started.elapsed().as_secs_f64()
        ));
        results.push(result);
    }
    let report = Report::new(args, &results);
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let json_path = args.out.join("api.json");
    let md_path = args.out.join("api.md");
    let mut json = serde_json::to_vec_pretty(&report.json)?;
    json.push(b'\n');
    std::fs::write(&json_path, json).with_context(|| format!("writing {}", json_path.display()))?;
    std::fs::write(&md_path, &report.markdown).with_context(|| format!("writing {}", md_path.display()))?;
    println!();
    print!("{}", report.markdown);
    println!();
    status(format!("wrote {} and {}", json_path.display(), md_path.display()));
    let failed: Vec<String> = results
        .iter()
        .flat_map(|r| r.errors.iter().map(move |e| format!("{}: {e}", r.store.name())))
        .collect();
    if !failed.is_empty() {
        bail!("{} phase(s) failed:\n  {}", failed.len(), failed.join("\n  "));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The server under test

// ---------------------------------------------------------------------------------------------
// Measurements

/// The numbers of one store. `None` when the phase failed (the reason is in `errors`).
struct StoreResult {
    store: StoreKind,
    http_version: Option<String>,
    create_runs: Vec<Throughput>,
    update_runs: Vec<Throughput>,
    pod_create: Option<Throughput>,
    list: Vec<ListRun>,
    list_bytes: Option<usize>,
    watch_open_s: Option<f64>,
    watch_rounds: Vec<FanOut>,
    rss_mib: Option<f64>,
    /// CPU and memory per phase.
    cpu: Vec<PhaseCost>,
    /// 1-minute load average when the store's run started.
    load_average: Option<f64>,
    errors: Vec<String>,
}

struct PhaseCost {
    phase: &'static str,
    wall_s: f64,
    server_cpu_s: f64,
    etcd_cpu_s: Option<f64>,
    client_cpu_s: f64,
    server_rss_mib: f64,
}

#[derive(Clone)]
struct Throughput {
    per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

struct FanOut {
    /// Until the first watcher saw the event.
    first_ms: f64,
    /// Until half the watchers did.
    p50_ms: f64,
    /// Until every watcher did.
    all_ms: f64,
}

async fn bench_store(args: &Args, store: StoreKind) -> StoreResult {
    let mut result = StoreResult {
        store,
        http_version: None,
        create_runs: Vec::new(),
        update_runs: Vec::new(),
        pod_create: None,
        list: Vec::new(),
        list_bytes: None,
        watch_open_s: None,
        watch_rounds: Vec::new(),
        rss_mib: None,
        cpu: Vec::new(),
        load_average: load_average(),
        errors: Vec::new(),
    };
    status(format!("{}: starting weir server", store.name()));
    let server = match BenchServer::start(&args.weir, store, &[]).await {
        Ok(server) => server,
        Err(e) => {
            result.errors.push(format!("server start: {e:#}"));
            return result;
        }
    };
    status(format!(
        "{}: weir server pid {} on port {}{}",
        store.name(),
        server.pid(),
        server.port,
        server
            .etcd
            .as_ref()
            .map(|e| format!(", etcd at {}", e.endpoint))
            .unwrap_or_default()
    ));
    if let Err(e) = phases(args, &server, &mut result).await {
        result.errors.push(format!("{e:#}"));
        status(format!("{}: FAILED: {e:#}", store.name()));
        eprintln!("{}", server.logs());
    }
    result.rss_mib = server.rss_kib().map(|k| k as f64 / 1024.0);
    result
}

/// Runs one phase under [`PHASE_TIMEOUT`] and records the server CPU it used.
async fn phase<T>(
    server: &BenchServer,
    result: &mut StoreResult,
    name: &'static str,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    let etcd_cpu = || server.etcd_pid.and_then(|pid| cpu_seconds(&pid.to_string()));
    let cpu_before = (server.cpu_seconds(), cpu_seconds("self"));
    let etcd_before = etcd_cpu();
    let started = Instant::now();
    let out = tokio::time::timeout(PHASE_TIMEOUT, fut)
        .await
        .map_err(|_| anyhow!("phase {name} did not finish within {PHASE_TIMEOUT:?}"))?
        .with_context(|| format!("phase {name}"))?;
    let wall = started.elapsed().as_secs_f64();
    if let ((Some(s0), Some(c0)), Some(s1), Some(c1)) = (cpu_before, server.cpu_seconds(), cpu_seconds("self")) {
        let (server_cpu, client_cpu) = (s1 - s0, c1 - c0);
        let etcd_cpu = etcd_before.zip(etcd_cpu()).map(|(a, b)| b - a);
        let rss = server.rss_kib().map_or(0.0, |k| k as f64 / 1024.0);
        result.cpu.push(PhaseCost {
            phase: name,
            wall_s: wall,
            server_cpu_s: server_cpu,
            etcd_cpu_s: etcd_cpu,
            client_cpu_s: client_cpu,
            server_rss_mib: rss,
        });
        let pct = |cpu: f64| 100.0 * cpu / wall;
        status(format!(
            "{}: {name}: {wall:.1}s wall; CPU (% of one core): server {:.0}%{}, bench client {:.0}%; server RSS {rss:.0} MiB",
            result.store.name(),
            pct(server_cpu),
            etcd_cpu.map(|e| format!(", etcd {:.0}%", pct(e))).unwrap_or_default(),
            pct(client_cpu),
        ));
    }
    Ok(out)
}

async fn phases(args: &Args, server: &BenchServer, result: &mut StoreResult) -> Result<()> {
    let store = result.store.name();
    // One request on each client first, so each has its one HTTP/2 connection before the burst.
    let clients: Vec<reqwest::Client> = (0..args.connections)
        .map(|_| server.client(Some(REQUEST_TIMEOUT)))
        .collect::<Result<_>>()?;
    for c in &clients {
        let probe = c.get(server.url("/version")).send().await?;
        let version = format!("{:?}", probe.version());
        if probe.version() != reqwest::Version::HTTP_2 {
            status(format!(
                "{store}: WARNING: the server answered over {version}, not HTTP/2"
            ));
        }
        probe.bytes().await?;
        result.http_version = Some(version);
    }
    let client = &clients[0];

    // 1. creates
    let mut created: Vec<(String, String)> = Vec::new();
    for run in 0..args.runs {
        status(format!(
            "{store}: creates: run {}/{}: {} ConfigMaps in default, {} in flight",
            run + 1,
            args.runs,
            args.objects,
            args.concurrency
        ));
        let (t, rvs) = phase(
            server,
            result,
            "creates",
            create_config_maps(args, server, &clients, run),
        )
        .await?;
        status(format!(
            "{store}: creates: run {}: {:.0}/s (p50 {:.1} ms, p99 {:.1} ms)",
            run + 1,
            t.per_s,
            t.p50_ms,
            t.p99_ms
        ));
        result.create_runs.push(t);
        if run == 0 {
            created = rvs;
        }
    }

    // 2. updates, always of the first run's objects, with the resourceVersion of the last write
    for run in 0..args.runs {
        status(format!(
            "{store}: updates: run {}/{}: PUT {} ConfigMaps, {} in flight",
            run + 1,
            args.runs,
            created.len(),
            args.concurrency
        ));
        let (t, rvs) = phase(
            server,
            result,
            "updates",
            update_config_maps(args, server, &clients, &created, run),
        )
        .await?;
        status(format!(
            "{store}: updates: run {}: {:.0}/s (p50 {:.1} ms, p99 {:.1} ms)",
            run + 1,
            t.per_s,
            t.p50_ms,
            t.p99_ms
        ));
        result.update_runs.push(t);
        created = rvs;
    }

    // 3. LIST of many pods
    status(format!(
        "{store}: list: creating {} Pods in namespace bench-list",
        args.pods
    ));
    let t = phase(server, result, "pod creates", create_pods(args, server, &clients)).await?;
    status(format!(
        "{store}: list: {:.0} pod creates/s (p50 {:.1} ms, p99 {:.1} ms)",
        t.per_s, t.p50_ms, t.p99_ms
    ));
    result.pod_create = Some(t);
    let (runs, bytes) = phase(server, result, "list", list_pods(args, server, client)).await?;
    status(format!(
        "{store}: list: {} pods, {:.1} MB: {} ms (median {:.1} ms; headers after {:.1} ms)",
        args.pods,
        bytes as f64 / 1e6,
        runs.iter()
            .map(|r| format!("{:.1}", r.ms))
            .collect::<Vec<_>>()
            .join(", "),
        median(&runs.iter().map(|r| r.ms).collect::<Vec<_>>()),
        median(&runs.iter().map(|r| r.headers_ms).collect::<Vec<_>>()),
    ));
    result.list = runs;
    result.list_bytes = Some(bytes);

    // 4. watch fan-out
    let (open_s, rounds) = phase(server, result, "watch", watch_fan_out(args, server, client)).await?;
    result.watch_open_s = Some(open_s);
    result.watch_rounds = rounds;
    Ok(())
}

fn config_map(name: &str, round: usize) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "labels": {"app": "bench"}},
        "data": {"round": round.to_string(), "payload": "x".repeat(64)},
    })
}

/// Sends requests `0..n` with `concurrency` in flight, printing progress; fails on the first
/// error. Returns the throughput and the per-request latencies.
async fn run_concurrent<F, Fut, T>(label: &str, n: usize, concurrency: usize, f: F) -> Result<(Throughput, Vec<T>)>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let started = Instant::now();
    let mut requests = futures::stream::iter(0..n)
        .map(|i| {
            let fut = f(i);
            async move {
                let t = Instant::now();
                let out = fut.await;
                (i, t.elapsed(), out)
            }
        })
        .buffer_unordered(concurrency);
    let mut latencies = Vec::with_capacity(n);
    let mut outputs: Vec<Option<T>> = (0..n).map(|_| None).collect();
    let mut last_progress = Instant::now();
    while let Some((i, latency, out)) = requests.next().await {
        outputs[i] = Some(out.with_context(|| format!("{label}: request {i}"))?);
        latencies.push(latency.as_secs_f64() * 1e3);
        if last_progress.elapsed() > Duration::from_secs(3) {
            last_progress = Instant::now();
            status(format!(
                "  {label}: {}/{n} ({:.0}/s so far)",
                latencies.len(),
                latencies.len() as f64 / started.elapsed().as_secs_f64()
            ));
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let throughput = Throughput {
        per_s: n as f64 / elapsed,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
    };
    Ok((
        throughput,
        outputs
            .into_iter()
            .map(|o| o.expect("every request answered"))
            .collect(),
    ))
}

/// Reads a JSON response, failing unless it has status `code`; returns `metadata.resourceVersion`.
async fn expect_rv(response: reqwest::Response, code: u16) -> Result<String> {
    let status = response.status();
    let body = response.bytes().await?;
    if status.as_u16() != code {
        bail!("expected HTTP {code}, got {status}: {}", String::from_utf8_lossy(&body));
    }
    let value: Value = serde_json::from_slice(&body).context("response is not JSON")?;
    value
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .map(String::from)
        .ok_or_else(|| anyhow!("response has no metadata.resourceVersion"))
}

async fn create_config_maps(
    args: &Args,
    server: &BenchServer,
    clients: &[reqwest::Client],
    run: usize,
) -> Result<(Throughput, Vec<(String, String)>)> {
    let url = server.url("/api/v1/namespaces/default/configmaps");
    run_concurrent("creates", args.objects, args.concurrency, |i| {
        let name = format!("bench-{run}-{i}");
        let request = clients[i % clients.len()].post(&url).json(&config_map(&name, 0));
        async move { Ok((name, expect_rv(request.send().await?, 201).await?)) }
    })
    .await
}

async fn update_config_maps(
    args: &Args,
    server: &BenchServer,
    clients: &[reqwest::Client],
    objects: &[(String, String)],
    run: usize,
) -> Result<(Throughput, Vec<(String, String)>)> {
    run_concurrent("updates", objects.len(), args.concurrency, |i| {
        let (name, rv) = &objects[i];
        let mut body = config_map(name, run + 1);
        body["metadata"]["resourceVersion"] = json!(rv);
        let request = clients[i % clients.len()]
            .put(server.url(&format!("/api/v1/namespaces/default/configmaps/{name}")))
            .json(&body);
        let name = name.clone();
        async move { Ok((name, expect_rv(request.send().await?, 200).await?)) }
    })
    .await
}

async fn create_namespace(server: &BenchServer, client: &reqwest::Client, name: &str) -> Result<()> {
    let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
    let response = client.post(server.url("/api/v1/namespaces")).json(&body).send().await?;
    expect_rv(response, 201)
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    Ok(())
}

async fn create_pods(args: &Args, server: &BenchServer, clients: &[reqwest::Client]) -> Result<Throughput> {
    create_namespace(server, &clients[0], "bench-list").await?;
    let url = server.url("/api/v1/namespaces/bench-list/pods");
    let (t, _) = run_concurrent("pod creates", args.pods, args.concurrency, |i| {
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": format!("pod-{i:05}"), "labels": {"app": "bench", "shard": (i % 10).to_string()}},
            "spec": {"containers": [{"name": "app", "image": "registry.k8s.io/pause:3.10"}]},
        });
        let request = clients[i % clients.len()].post(&url).json(&pod);
        async move { expect_rv(request.send().await?, 201).await }
    })
    .await?;
    Ok(t)
}

/// One timed LIST: until the last byte, and until the response headers.
struct ListRun {
    ms: f64,
    headers_ms: f64,
}

/// One warm-up and [`LIST_RUNS`] timed full-JSON LISTs; returns the timings and the body size.
async fn list_pods(args: &Args, server: &BenchServer, client: &reqwest::Client) -> Result<(Vec<ListRun>, usize)> {
    let url = server.url("/api/v1/namespaces/bench-list/pods");
    let warm = client.get(&url).send().await?;
    if !warm.status().is_success() {
        bail!("LIST answered {}", warm.status());
    }
    let body = warm.bytes().await?;
    let list: Value = serde_json::from_slice(&body).context("LIST body is not JSON")?;
    let count = list["items"].as_array().map_or(0, Vec::len);
    if count != args.pods {
        bail!("LIST returned {count} pods, expected {}", args.pods);
    }
    let mut runs = Vec::new();
    for _ in 0..LIST_RUNS {
        let started = Instant::now();
        let response = client.get(&url).send().await?;
        // The headers come once the server has the whole body serialized.
        let headers_ms = started.elapsed().as_secs_f64() * 1e3;
        let status = response.status();
        let bytes = response.bytes().await?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        if !status.is_success() || bytes.len() < body.len() / 2 {
            bail!("LIST answered {status} with {} bytes", bytes.len());
        }
        runs.push(ListRun { ms, headers_ms });
    }
    Ok((runs, body.len()))
}

/// Opens `--watchers` watches on one namespace, then changes one object [`WATCH_ROUNDS`]
/// times, measuring until every watcher has the event. Returns the time to open all watches
/// and the rounds.
async fn watch_fan_out(args: &Args, server: &BenchServer, client: &reqwest::Client) -> Result<(f64, Vec<FanOut>)> {
    let store = server.etcd.as_ref().map_or("embedded", |_| "etcd");
    create_namespace(server, client, "bench-watch").await?;
    let cm_url = server.url("/api/v1/namespaces/bench-watch/configmaps");
    let created = client.post(&cm_url).json(&config_map("fanout", 0)).send().await?;
    let mut rv = expect_rv(created, 201).await?;

    let connections = args.watchers.div_ceil(WATCHES_PER_CONNECTION);
    status(format!(
        "{store}: watch: opening {} watches of namespace bench-watch over {connections} HTTP/2 connections",
        args.watchers
    ));
    let clients: Vec<reqwest::Client> = (0..connections).map(|_| server.client(None)).collect::<Result<_>>()?;
    // One request each first, so every client has its one HTTP/2 connection before the burst.
    for c in &clients {
        let response = tokio::time::timeout(REQUEST_TIMEOUT, c.get(server.url("/version")).send())
            .await
            .map_err(|_| anyhow!("GET /version not answered within {REQUEST_TIMEOUT:?}"))??;
        response.bytes().await?;
    }
    let watch_url = format!("{cm_url}?watch=true&resourceVersion={rv}");
    let started = Instant::now();
    // The server subscribes before it sends the response headers, so a watch is live once
    // `send` returned.
    let opened = futures::stream::iter(0..args.watchers)
        .map(|i| {
            let request = clients[i % connections].get(&watch_url).send();
            async move {
                let response = tokio::time::timeout(REQUEST_TIMEOUT, request)
                    .await
                    .map_err(|_| anyhow!("watch {i} not answered within {REQUEST_TIMEOUT:?}"))??;
                if !response.status().is_success() {
                    bail!("watch {i} answered {}", response.status());
                }
                Ok(response)
            }
        })
        .buffer_unordered(args.concurrency)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let open_s = started.elapsed().as_secs_f64();
    status(format!(
        "{store}: watch: {} watches open after {open_s:.2}s",
        opened.len()
    ));

    // Each watcher reports (round, when it saw that round's change).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    let tasks = WatchTasks(
        opened
            .into_iter()
            .map(|response| tokio::spawn(watcher(response, tx.clone())))
            .collect(),
    );
    drop(tx);

    let mut rounds = Vec::new();
    for round in 1..=WATCH_ROUNDS {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut body = config_map("fanout", round);
        body["metadata"]["resourceVersion"] = json!(rv);
        let request = client.put(format!("{cm_url}/fanout")).json(&body);
        let t0 = Instant::now();
        rv = expect_rv(request.send().await?, 200).await?;
        let mut seen: Vec<f64> = Vec::with_capacity(args.watchers);
        let deadline = tokio::time::Instant::now() + WATCH_ROUND_TIMEOUT;
        while seen.len() < args.watchers {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Err(_) => bail!(
                    "round {round}: only {}/{} watchers saw the change within {WATCH_ROUND_TIMEOUT:?}",
                    seen.len(),
                    args.watchers
                ),
                Ok(None) => bail!(
                    "round {round}: every watch stream ended; {}/{} saw the change",
                    seen.len(),
                    args.watchers
                ),
                Ok(Some((r, at))) if r == round => seen.push(at.saturating_duration_since(t0).as_secs_f64() * 1e3),
                Ok(Some((r, _))) => bail!("round {round}: a watcher reported round {r}"),
            }
        }
        seen.sort_by(f64::total_cmp);
        let fan = FanOut {
            first_ms: seen[0],
            p50_ms: percentile(&seen, 0.5),
            all_ms: seen[seen.len() - 1],
        };
        status(format!(
            "{store}: watch: round {round}/{WATCH_ROUNDS}: first watcher {:.1} ms, half {:.1} ms, all {} {:.1} ms",
            fan.first_ms, fan.p50_ms, args.watchers, fan.all_ms
        ));
        rounds.push(fan);
    }
    drop(tasks);
    Ok((open_s, rounds))
}

/// Aborts the watcher tasks (closing their streams) when dropped, also on errors.
struct WatchTasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for WatchTasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Reads one watch stream line by line and reports each MODIFIED event's `data.round`.
async fn watcher(mut response: reqwest::Response, tx: tokio::sync::mpsc::UnboundedSender<(usize, Instant)>) {
    let mut buffer: Vec<u8> = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        buffer.extend_from_slice(&chunk);
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let at = Instant::now();
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let Ok(event) = serde_json::from_slice::<Value>(&line) else {
                continue;
            };
            if event["type"] != "MODIFIED" {
                continue;
            }
            let round = event
                .pointer("/object/data/round")
                .and_then(Value::as_str)
                .and_then(|r| r.parse().ok());
            if let Some(round) = round
                && tx.send((round, at)).is_err()
            {
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Report

struct Report {
    json: Value,
    markdown: String,
}

/// One row of the summary: how to read it from a store's result, and its target.
struct Metric {
    key: &'static str,
    label: String,
    unit: &'static str,
    /// "higher" or "lower" is better.
    better: &'static str,
    value: fn(&StoreResult) -> Option<f64>,
    /// The number the plot draws as a target line, and how the table shows it.
    target: Option<f64>,
    target_text: &'static str,
    /// Digits after the decimal point in the table.
    decimals: usize,
}

fn some_median(values: Vec<f64>) -> Option<f64> {
    (!values.is_empty()).then(|| median(&values))
}

impl Report {
    fn new(args: &Args, results: &[StoreResult]) -> Report {
        let connections = match args.connections {
            1 => String::new(),
            n => format!(" over {n} connections"),
        };
        let metrics = [
            Metric {
                key: "creates_per_s",
                label: format!(
                    "ConfigMap creates/s ({} objects, {} in flight{connections})",
                    args.objects, args.concurrency
                ),
                unit: "1/s",
                better: "higher",
                value: |r| some_median(r.create_runs.iter().map(|t| t.per_s).collect()),
                target: Some(2000.0),
                target_text: "≥ 2,000 (embedded)",
                decimals: 0,
            },
            Metric {
                key: "create_p99_ms",
                label: "ConfigMap create latency p99 (ms)".into(),
                unit: "ms",
                better: "lower",
                value: |r| some_median(r.create_runs.iter().map(|t| t.p99_ms).collect()),
                target: None,
                target_text: "",
                decimals: 1,
            },
            Metric {
                key: "updates_per_s",
                label: format!("ConfigMap updates/s (PUT, {} objects)", args.objects),
                unit: "1/s",
                better: "higher",
                value: |r| some_median(r.update_runs.iter().map(|t| t.per_s).collect()),
                target: None,
                target_text: "",
                decimals: 0,
            },
            Metric {
                key: "update_p99_ms",
                label: "ConfigMap update latency p99 (ms)".into(),
                unit: "ms",
                better: "lower",
                value: |r| some_median(r.update_runs.iter().map(|t| t.p99_ms).collect()),
                target: None,
                target_text: "",
                decimals: 1,
            },
            Metric {
                key: "pod_creates_per_s",
                label: format!("Pod creates/s ({} pods, one run)", args.pods),
                unit: "1/s",
                better: "higher",
                value: |r| r.pod_create.as_ref().map(|t| t.per_s),
                target: None,
                target_text: "",
                decimals: 0,
            },
            Metric {
                key: "list_pods_ms",
                label: format!("LIST {} pods, full JSON (ms, median of {LIST_RUNS})", args.pods),
                unit: "ms",
                better: "lower",
                value: |r| some_median(r.list.iter().map(|l| l.ms).collect()),
                target: Some(200.0),
                target_text: "< 200",
                decimals: 1,
            },
            Metric {
                key: "list_pods_headers_ms",
                label: "… of which until the response headers (ms, median)".into(),
                unit: "ms",
                better: "lower",
                value: |r| some_median(r.list.iter().map(|l| l.headers_ms).collect()),
                target: None,
                target_text: "",
                decimals: 1,
            },
            Metric {
                key: "watch_fanout_ms",
                label: format!(
                    "Watch fan-out: all {} watchers have the event (ms, median of {WATCH_ROUNDS})",
                    args.watchers
                ),
                unit: "ms",
                better: "lower",
                value: |r| some_median(r.watch_rounds.iter().map(|f| f.all_ms).collect()),
                target: None,
                target_text: "",
                decimals: 1,
            },
            Metric {
                key: "watch_open_s",
                label: format!("Time to open {} watches (s)", args.watchers),
                unit: "s",
                better: "lower",
                value: |r| r.watch_open_s,
                target: None,
                target_text: "",
                decimals: 2,
            },
            Metric {
                key: "server_rss_mib",
                label: "Server RSS at the end (MiB)".into(),
                unit: "MiB",
                better: "lower",
                value: |r| r.rss_mib,
                target: None,
                target_text: "",
                decimals: 0,
            },
        ];

        let mut markdown = String::from("| metric |");
        for r in results {
            markdown.push_str(&format!(" {} |", r.store.name()));
        }
        markdown.push_str(" target |\n|---|");
        for _ in results {
            markdown.push_str("---:|");
        }
        markdown.push_str("---|\n");
        let mut rows = Vec::new();
        for m in &metrics {
            markdown.push_str(&format!("| {} |", m.label));
            let mut row = json!({
                "key": m.key, "label": m.label, "unit": m.unit, "better": m.better,
                "target": m.target, "target_text": m.target_text,
            });
            for r in results {
                let v = (m.value)(r).filter(|v| v.is_finite());
                let cell = v.map_or_else(|| "failed".to_string(), |v| format_number(v, m.decimals));
                markdown.push_str(&format!(" {cell} |"));
                row[r.store.name()] = json!(v);
            }
            markdown.push_str(&format!(" {} |\n", m.target_text));
            rows.push(row);
        }
        markdown.push_str(&format!(
            "\n{} CPUs; HTTPS with HTTP/2 ({}); client, server and etcd on the same machine; \
             1-minute load average at the start: {}.\n",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            results
                .iter()
                .map(|r| format!("{}: {}", r.store.name(), r.http_version.as_deref().unwrap_or("?")))
                .collect::<Vec<_>>()
                .join(", "),
            results
                .iter()
                .map(|r| format!(
                    "{} {}",
                    r.store.name(),
                    r.load_average.map_or_else(|| "?".to_string(), |l| format!("{l:.1}"))
                ))
                .collect::<Vec<_>>()
                .join(", "),
        ));

        let stores: serde_json::Map<String, Value> = results
            .iter()
            .map(|r| {
                let tp = |t: &Throughput| json!({"per_s": t.per_s, "p50_ms": t.p50_ms, "p99_ms": t.p99_ms});
                (
                    r.store.name().to_string(),
                    json!({
                        "http_version": r.http_version,
                        "creates": r.create_runs.iter().map(tp).collect::<Vec<_>>(),
                        "updates": r.update_runs.iter().map(tp).collect::<Vec<_>>(),
                        "pod_creates": r.pod_create.as_ref().map(tp),
                        "list": r.list.iter().map(|l| json!({"ms": l.ms, "headers_ms": l.headers_ms})).collect::<Vec<_>>(),
                        "list_bytes": r.list_bytes,
                        "watch_open_s": r.watch_open_s,
                        "watch_rounds": r.watch_rounds.iter().map(|f| json!({
                            "first_ms": f.first_ms, "p50_ms": f.p50_ms, "all_ms": f.all_ms,
                        })).collect::<Vec<_>>(),
                        "phases": r.cpu.iter().map(|c| json!({
                            "phase": c.phase, "wall_s": c.wall_s, "server_cpu_s": c.server_cpu_s,
                            "etcd_cpu_s": c.etcd_cpu_s, "bench_client_cpu_s": c.client_cpu_s,
                            "server_rss_mib": c.server_rss_mib,
                        })).collect::<Vec<_>>(),
                        "load_average_1m": r.load_average,
                        "server_rss_mib": r.rss_mib,
                        "errors": r.errors,
                    }),
                )
            })
            .collect();
        let json = json!({
            "benchmark": "api",
            "unix_time": SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "params": {
                "objects": args.objects,
                "pods": args.pods,
                "watchers": args.watchers,
                "concurrency": args.concurrency,
                "connections": args.connections,
                "runs": args.runs,
                "list_runs": LIST_RUNS,
                "watch_rounds": WATCH_ROUNDS,
                "watches_per_connection": WATCHES_PER_CONNECTION,
            },
            "stores": stores,
            "metrics": rows,
        });
        Report { json, markdown }
    }
}
