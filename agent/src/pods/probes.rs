//! kubelet's prober for one container: startup, liveness and readiness probes (exec,
//! httpGet, tcpSocket) with their delays, periods, timeouts and thresholds. It only
//! observes: the pod worker reads the outcome ([`ProbeStatus`]) and restarts containers,
//! records events and writes readiness into the pod status.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// The User-Agent of HTTP probes (kubelet's `kube-probe/<major>.<minor>`).
pub const USER_AGENT: &str = "kube-probe/1.37";
/// How much of an HTTP probe's body ends up in its message (kubelet's limit).
const MAX_BODY: usize = 10 * 1024;
/// Redirects an HTTP probe follows (to the same host) before failing.
const MAX_REDIRECTS: usize = 10;

/// A future of [`ExecProbe::exec`].
pub type ExecFuture<'a> = Pin<Box<dyn Future<Output = Result<(i32, Vec<u8>), String>> + Send + 'a>>;

/// Runs a command in a running container (the pod worker implements it over containerd).
pub trait ExecProbe: Send + Sync {
    /// Runs `command` in the container `container_id` for at most `timeout`; its exit code
    /// and combined output. Err: the command could not be run or did not finish in time (the
    /// text says which, e.g. `command "cat /tmp/healthy" timed out`).
    fn exec<'a>(&'a self, container_id: &'a str, command: &'a [String], timeout: Duration) -> ExecFuture<'a>;
}

/// Which probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    /// startupProbe: gates the other two.
    Startup,
    /// livenessProbe: restart on failure.
    Liveness,
    /// readinessProbe: the container's readiness.
    Readiness,
}

impl ProbeKind {
    /// `Startup`, `Liveness`, `Readiness`, as kubelet's event messages begin.
    pub fn name(self) -> &'static str {
        match self {
            ProbeKind::Startup => "Startup",
            ProbeKind::Liveness => "Liveness",
            ProbeKind::Readiness => "Readiness",
        }
    }
}

/// The outcome of one probe run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeResult {
    /// It passed; a message when kubelet would record a warning (redirect to another host).
    Success(Option<String>),
    /// It failed; the probe's output or error.
    Failure(String),
}

/// What the worker learns of a container from its probes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProbeStatus {
    /// The startup probe succeeded (true from the start without one): containerStatus.started.
    pub started: bool,
    /// containerStatus.ready: the readiness probe's result once started (without a
    /// readiness probe: started).
    pub ready: bool,
    /// Set when liveness or startup failed failureThreshold times: kill the container
    /// (kubelet's message `Container <name> failed liveness probe, will be restarted`). The
    /// probes stop; the worker starts a new [`ProbeSet`] for the new container.
    pub restart: Option<String>,
}

/// One probe event for the worker to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeEvent {
    /// Which probe.
    pub kind: ProbeKind,
    /// Warning `Unhealthy` with kubelet's text: `Liveness probe failed: <output>`,
    /// `Readiness probe errored: <error>`, or `<Kind> probe warning: <message>`.
    pub message: String,
}

/// A probe's settings with Kubernetes' defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeTiming {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl ProbeTiming {
    /// The settings of `probe` (periodSeconds 10, timeoutSeconds 1, successThreshold 1,
    /// failureThreshold 3 when unset or below 1).
    pub fn of(probe: &Probe) -> ProbeTiming {
        let secs = |v: Option<i32>, default: u64, min: u64| {
            Duration::from_secs(v.map_or(default, |s| (s.max(0) as u64).max(min)))
        };
        let count = |v: Option<i32>, default: u32| v.filter(|v| *v >= 1).map_or(default, |v| v as u32);
        ProbeTiming {
            initial_delay: secs(probe.initial_delay_seconds, 0, 0),
            period: secs(probe.period_seconds, 10, 1),
            timeout: secs(probe.timeout_seconds, 1, 1),
            success_threshold: count(probe.success_threshold, 1),
            failure_threshold: count(probe.failure_threshold, 3),
        }
    }
}

/// How one probe checks the container.
#[derive(Clone, Debug)]
enum Action {
    Exec(Vec<String>),
    Http {
        url: String,
        host_header: Option<String>,
        headers: Vec<(String, String)>,
    },
    Tcp {
        host: String,
        port: u16,
    },
}

/// What a probe of `container` cannot be (a named port it lacks, gRPC, no handler); the
/// worker reports it like kubelet's `CreateContainerConfigError`.
#[derive(Debug, thiserror::Error)]
#[error("{kind:?} probe of container \"{container}\": {message}")]
pub struct ProbeError {
    pub container: String,
    pub kind: ProbeKind,
    pub message: String,
}

fn port_of(container: &Container, port: &IntOrString) -> Result<u16, String> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("port {p} is out of range 1-65535")),
        IntOrString::String(name) => {
            if let Ok(n) = name.parse::<u16>() {
                return Ok(n);
            }
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .ok_or_else(|| format!("couldn't find port: {name} in the container's ports"))
        }
    }
}

fn host_for(host: Option<&str>, pod_ip: Option<IpAddr>) -> Result<String, String> {
    match host.filter(|h| !h.is_empty()) {
        Some(h) => Ok(h.to_string()),
        None => pod_ip
            .map(|ip| match ip {
                IpAddr::V6(v6) => format!("[{v6}]"),
                IpAddr::V4(v4) => v4.to_string(),
            })
            .ok_or_else(|| "the pod has no IP yet and the probe names no host".to_string()),
    }
}

fn action_of(probe: &Probe, container: &Container, pod_ip: Option<IpAddr>) -> Result<Action, String> {
    if let Some(exec) = &probe.exec {
        let command = exec.command.clone().unwrap_or_default();
        if command.is_empty() {
            return Err("exec probe has no command".into());
        }
        return Ok(Action::Exec(command));
    }
    if let Some(http) = &probe.http_get {
        let scheme = http.scheme.as_deref().unwrap_or("HTTP").to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(format!("httpGet scheme {scheme:?} is neither HTTP nor HTTPS"));
        }
        let port = port_of(container, &http.port)?;
        let host = host_for(http.host.as_deref(), pod_ip)?;
        let path = http.path.as_deref().unwrap_or("");
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        let mut host_header = None;
        let mut headers = Vec::new();
        for h in http.http_headers.iter().flatten() {
            if h.name.eq_ignore_ascii_case("host") {
                host_header = Some(h.value.clone());
            } else {
                headers.push((h.name.clone(), h.value.clone()));
            }
        }
        return Ok(Action::Http {
            url: format!("{scheme}://{host}:{port}{path}"),
            host_header,
            headers,
        });
    }
    if let Some(tcp) = &probe.tcp_socket {
        return Ok(Action::Tcp {
            host: host_for(tcp.host.as_deref(), pod_ip)?,
            port: port_of(container, &tcp.port)?,
        });
    }
    if probe.grpc.is_some() {
        return Err("gRPC probes are not implemented by Weir's node agent yet; use an exec probe running grpc_health_probe, or httpGet/tcpSocket".into());
    }
    Err("the probe has no handler: set exec, httpGet or tcpSocket".into())
}

/// Runs a lifecycle hook (`postStart`, `preStop`) once, as kubelet's handler runner: exec,
/// httpGet and tcpSocket through the probe machinery, `sleep` by waiting. Err: why it failed
/// (kubelet's FailedPostStartHook / FailedPreStopHook text).
pub async fn run_hook(
    handler: &k8s_openapi::api::core::v1::LifecycleHandler,
    container: &Container,
    container_id: &str,
    pod_ip: Option<IpAddr>,
    exec: Arc<dyn ExecProbe>,
    timeout: Duration,
) -> Result<(), String> {
    if let Some(sleep) = &handler.sleep {
        let seconds = u64::try_from(sleep.seconds).map_err(|_| format!("sleep of {} seconds", sleep.seconds))?;
        tokio::time::sleep(Duration::from_secs(seconds).min(timeout)).await;
        return Ok(());
    }
    let probe = Probe {
        exec: handler.exec.clone(),
        http_get: handler.http_get.clone(),
        tcp_socket: handler.tcp_socket.clone(),
        ..Probe::default()
    };
    let action = action_of(&probe, container, pod_ip)
        .map_err(|e| e.replace("the probe has no handler", "the hook has no handler"))?;
    let http = match action {
        Action::Http { .. } => Some(http_client()?),
        _ => None,
    };
    let prober = Prober {
        kind: ProbeKind::Liveness,
        action,
        timing: ProbeTiming {
            initial_delay: Duration::ZERO,
            period: timeout,
            timeout,
            success_threshold: 1,
            failure_threshold: 1,
        },
        container_id: container_id.to_owned(),
        exec,
        http,
    };
    match prober.run().await {
        Ok(ProbeResult::Success(_)) => Ok(()),
        Ok(ProbeResult::Failure(message)) | Err(message) => Err(message),
    }
}

/// A prepared probe: what to run and how often.
struct Prober {
    kind: ProbeKind,
    action: Action,
    timing: ProbeTiming,
    container_id: String,
    exec: Arc<dyn ExecProbe>,
    http: Option<reqwest::Client>,
}

/// kubelet's HTTP probe client: no certificate checks, no proxy, no connection reuse,
/// redirects followed only to the same host (a redirect elsewhere is a success with a warning).
fn http_client() -> Result<reqwest::Client, String> {
    let policy = reqwest::redirect::Policy::custom(|attempt| {
        if attempt.previous().len() > MAX_REDIRECTS {
            return attempt.error(format!("stopped after {MAX_REDIRECTS} redirects"));
        }
        let first = attempt.previous().first().and_then(|u| u.host_str().map(str::to_owned));
        if first.as_deref() != attempt.url().host_str() {
            return attempt.stop();
        }
        attempt.follow()
    });
    reqwest::Client::builder()
        .redirect(policy)
        .danger_accept_invalid_certs(true)
        .no_proxy()
        .pool_max_idle_per_host(0)
        .user_agent(USER_AGENT)
        .build()
        .map_err(|e| format!("building the HTTP probe client: {e}"))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl Prober {
    /// One run: Ok(result), or Err when the probe could not be run (kubelet throws such
    /// results away).
    async fn run(&self) -> Result<ProbeResult, String> {
        let timeout = self.timing.timeout;
        match &self.action {
            Action::Exec(command) => {
                // The runtime enforces `timeout`; the grace second here only guards against an
                // exec that never answers, which would stall this probe for good.
                let bounded = tokio::time::timeout(
                    timeout + Duration::from_secs(1),
                    self.exec.exec(&self.container_id, command, timeout),
                );
                match bounded.await {
                    Ok(Ok((0, _))) => Ok(ProbeResult::Success(None)),
                    Ok(Ok((_, output))) => Ok(ProbeResult::Failure(
                        String::from_utf8_lossy(&output).trim_end().to_string(),
                    )),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Ok(ProbeResult::Failure(format!(
                        "command {:?} timed out",
                        command.join(" ")
                    ))),
                }
            }
            Action::Http {
                url,
                host_header,
                headers,
            } => {
                let client = self.http.as_ref().expect("HTTP probes have a client");
                let mut request = client.get(url).timeout(timeout).header(http::header::ACCEPT, "*/*");
                for (name, value) in headers {
                    request = request.header(name.as_str(), value.as_str());
                }
                if let Some(host) = host_header {
                    request = request.header(http::header::HOST, host.as_str());
                }
                let response = match request.send().await {
                    Ok(r) => r,
                    Err(e) => return Ok(ProbeResult::Failure(format!("Get \"{url}\": {}", error_chain(&e)))),
                };
                let status = response.status().as_u16();
                let mut body = Vec::new();
                let mut response = response;
                while body.len() < MAX_BODY {
                    match tokio::time::timeout(timeout, response.chunk()).await {
                        Ok(Ok(Some(chunk))) => body.extend_from_slice(&chunk),
                        _ => break,
                    }
                }
                body.truncate(MAX_BODY);
                let body = String::from_utf8_lossy(&body).into_owned();
                Ok(match status {
                    200..=299 => ProbeResult::Success(None),
                    300..=399 => {
                        ProbeResult::Success(Some(format!("Probe terminated redirects, Response body: {body}")))
                    }
                    _ => ProbeResult::Failure(format!("HTTP probe failed with statuscode: {status}")),
                })
            }
            Action::Tcp { host, port } => {
                let address = format!("{host}:{port}");
                match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&address)).await {
                    Ok(Ok(_)) => Ok(ProbeResult::Success(None)),
                    Ok(Err(e)) => Ok(ProbeResult::Failure(format!("dial tcp {address}: connect: {e}"))),
                    Err(_) => Ok(ProbeResult::Failure(format!("dial tcp {address}: i/o timeout"))),
                }
            }
        }
    }
}

/// The probes of one running container; they run until it is dropped.
pub struct ProbeSet {
    status: watch::Receiver<ProbeStatus>,
    events: mpsc::UnboundedReceiver<ProbeEvent>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for ProbeSet {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl ProbeSet {
    /// Starts the probes of `container` (of `pod_ip`'s pod), running as `container_id`,
    /// which has just started: the initial delays count from now. Must be called inside a
    /// Tokio runtime.
    pub fn start(
        container: &Container,
        container_id: &str,
        pod_ip: Option<IpAddr>,
        exec: Arc<dyn ExecProbe>,
    ) -> Result<ProbeSet, ProbeError> {
        let mut probers = Vec::new();
        for (kind, probe) in [
            (ProbeKind::Startup, &container.startup_probe),
            (ProbeKind::Liveness, &container.liveness_probe),
            (ProbeKind::Readiness, &container.readiness_probe),
        ] {
            let Some(probe) = probe else { continue };
            let fail = |message: String| ProbeError {
                container: container.name.clone(),
                kind,
                message,
            };
            let action = action_of(probe, container, pod_ip).map_err(fail)?;
            let http = match action {
                Action::Http { .. } => Some(http_client().map_err(fail)?),
                _ => None,
            };
            let mut timing = ProbeTiming::of(probe);
            if kind != ProbeKind::Readiness {
                // Kubernetes requires 1 for liveness and startup.
                timing.success_threshold = 1;
            }
            probers.push(Prober {
                kind,
                action,
                timing,
                container_id: container_id.to_string(),
                exec: exec.clone(),
                http,
            });
        }
        let has_startup = container.startup_probe.is_some();
        let has_readiness = container.readiness_probe.is_some();
        let initial = ProbeStatus {
            started: !has_startup,
            ready: !has_startup && !has_readiness,
            restart: None,
        };
        let (status_tx, status) = watch::channel(initial);
        let (events_tx, events) = mpsc::unbounded_channel();
        let name = container.name.clone();
        let tasks = probers
            .into_iter()
            .map(|prober| {
                let status = status_tx.clone();
                let events = events_tx.clone();
                let name = name.clone();
                tokio::spawn(run_prober(prober, name, has_readiness, status, events))
            })
            .collect();
        Ok(ProbeSet { status, events, tasks })
    }

    /// The current status; `changed()` on it wakes when it changes.
    pub fn status(&self) -> watch::Receiver<ProbeStatus> {
        self.status.clone()
    }

    /// The next probe event (None once every probe has stopped).
    pub async fn next_event(&mut self) -> Option<ProbeEvent> {
        self.events.recv().await
    }

    /// A probe event if one is waiting.
    pub fn try_next_event(&mut self) -> Option<ProbeEvent> {
        self.events.try_recv().ok()
    }
}

async fn run_prober(
    prober: Prober,
    container: String,
    has_readiness: bool,
    status: watch::Sender<ProbeStatus>,
    events: mpsc::UnboundedSender<ProbeEvent>,
) {
    let kind = prober.kind;
    let timing = prober.timing.clone();
    tokio::time::sleep(timing.initial_delay).await;
    if kind != ProbeKind::Startup {
        // Liveness and readiness wait for the startup probe.
        let mut rx = status.subscribe();
        if rx.wait_for(|s| s.started || s.restart.is_some()).await.is_err() {
            return;
        }
    }
    let mut ticker = tokio::time::interval(timing.period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // kubelet's worker: a result must repeat `threshold` times before it counts.
    let mut last: Option<bool> = None;
    let mut run = 0u32;
    loop {
        ticker.tick().await;
        if status.borrow().restart.is_some() {
            return;
        }
        let result = match prober.run().await {
            Ok(r) => r,
            Err(e) => {
                let _ = events.send(ProbeEvent {
                    kind,
                    message: format!("{} probe errored: {e}", kind.name()),
                });
                continue;
            }
        };
        let success = match &result {
            ProbeResult::Success(warning) => {
                if let Some(w) = warning {
                    let _ = events.send(ProbeEvent {
                        kind,
                        message: format!("{} probe warning: {w}", kind.name()),
                    });
                }
                true
            }
            ProbeResult::Failure(output) => {
                let _ = events.send(ProbeEvent {
                    kind,
                    message: format!("{} probe failed: {output}", kind.name()),
                });
                false
            }
        };
        if last == Some(success) {
            run = run.saturating_add(1);
        } else {
            last = Some(success);
            run = 1;
        }
        let threshold = if success {
            timing.success_threshold
        } else {
            timing.failure_threshold
        };
        if run < threshold {
            continue;
        }
        match (kind, success) {
            (ProbeKind::Startup, true) => {
                status.send_modify(|s| {
                    s.started = true;
                    if !has_readiness {
                        s.ready = true;
                    }
                });
                return;
            }
            (ProbeKind::Startup | ProbeKind::Liveness, false) => {
                let what = if kind == ProbeKind::Startup {
                    "startup"
                } else {
                    "liveness"
                };
                status.send_modify(|s| {
                    s.ready = false;
                    s.restart = Some(format!("Container {container} failed {what} probe, will be restarted"));
                });
                return;
            }
            (ProbeKind::Liveness, true) => {}
            (ProbeKind::Readiness, ready) => {
                status.send_if_modified(|s| {
                    let changed = s.ready != ready;
                    s.ready = ready;
                    changed
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, VecDeque};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU16, Ordering};

    use axum::Router;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Redirect};
    use axum::routing::get;
    use serde_json::json;

    use super::*;

    /// A local HTTP server; `/toggle` answers with the status stored in the returned cell.
    async fn server() -> (u16, Arc<AtomicU16>) {
        let toggle = Arc::new(AtomicU16::new(200));
        let t = toggle.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = Router::new()
            .route("/ok", get(|| async { "fine" }))
            .route("/fail", get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "broken") }))
            .route("/same-host", get(|| async { Redirect::temporary("/ok") }))
            .route(
                "/other-host",
                get(move || async move { Redirect::temporary(&format!("http://localhost:{port}/fail")) }),
            )
            .route("/loop", get(|| async { Redirect::temporary("/loop") }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    "late"
                }),
            )
            .route(
                "/headers",
                get(|headers: HeaderMap| async move {
                    let ok = headers.get("x-probe").is_some_and(|v| v == "yes")
                        && headers.get("user-agent").is_some_and(|v| v == USER_AGENT)
                        && headers.get("host").is_some_and(|v| v == "app.example");
                    if ok { StatusCode::OK } else { StatusCode::BAD_REQUEST }
                }),
            )
            .route(
                "/toggle",
                get(move || {
                    let t = t.clone();
                    async move { StatusCode::from_u16(t.load(Ordering::SeqCst)).unwrap().into_response() }
                }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (port, toggle)
    }

    /// Exec results scripted per command name (the first argument); the last one repeats.
    #[derive(Default)]
    struct ScriptedExec {
        results: Mutex<HashMap<String, VecDeque<(i32, &'static str)>>>,
        calls: Mutex<HashMap<String, usize>>,
    }

    impl ScriptedExec {
        fn script(self: &Arc<Self>, command: &str, results: &[(i32, &'static str)]) {
            self.results
                .lock()
                .unwrap()
                .insert(command.into(), results.iter().copied().collect());
        }
        fn calls(&self, command: &str) -> usize {
            self.calls.lock().unwrap().get(command).copied().unwrap_or(0)
        }
    }

    impl ExecProbe for ScriptedExec {
        fn exec<'a>(&'a self, container_id: &'a str, command: &'a [String], _timeout: Duration) -> ExecFuture<'a> {
            assert_eq!(container_id, "cid");
            let name = command[0].clone();
            *self.calls.lock().unwrap().entry(name.clone()).or_default() += 1;
            let mut results = self.results.lock().unwrap();
            let queue = results.get_mut(&name).expect("a scripted command");
            let (code, output) = if queue.len() > 1 {
                queue.pop_front().unwrap()
            } else {
                queue[0]
            };
            Box::pin(async move {
                if code < 0 {
                    Err(output.to_string())
                } else {
                    Ok((code, output.as_bytes().to_vec()))
                }
            })
        }
    }

    fn container(spec: serde_json::Value) -> Container {
        let mut c = json!({"name": "app", "image": "x", "ports": [{"name": "http", "containerPort": 1}]});
        c.as_object_mut().unwrap().extend(spec.as_object().unwrap().clone());
        serde_json::from_value(c).unwrap()
    }

    fn exec_probe(command: &str, extra: serde_json::Value) -> serde_json::Value {
        let mut p = json!({"exec": {"command": [command]}, "periodSeconds": 1});
        p.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        p
    }

    async fn one_run(probe: serde_json::Value, c: &Container) -> ProbeResult {
        let probe: Probe = serde_json::from_value(probe).unwrap();
        let action = action_of(&probe, c, Some("127.0.0.1".parse().unwrap())).unwrap();
        let prober = Prober {
            kind: ProbeKind::Liveness,
            http: matches!(action, Action::Http { .. }).then(|| http_client().unwrap()),
            action,
            timing: ProbeTiming::of(&probe),
            container_id: "cid".into(),
            exec: Arc::new(ScriptedExec::default()),
        };
        prober.run().await.unwrap()
    }

    async fn wait_for(status: &mut watch::Receiver<ProbeStatus>, within: Duration, f: impl Fn(&ProbeStatus) -> bool) {
        let reached = tokio::time::timeout(within, status.wait_for(|s| f(s))).await.is_ok();
        assert!(reached, "status still {:?}", *status.borrow());
    }

    #[tokio::test]
    async fn http_probes_pass_on_2xx_and_3xx_and_fail_otherwise() {
        let (port, _) = server().await;
        let c = container(json!({}));
        let get = |path: &str| json!({"httpGet": {"path": path, "port": port}});
        assert_eq!(one_run(get("/ok"), &c).await, ProbeResult::Success(None));
        assert_eq!(
            one_run(get("/fail"), &c).await,
            ProbeResult::Failure("HTTP probe failed with statuscode: 500".into())
        );
        // Redirects are followed on the same host; to another host they end the probe with
        // a warning and count as success (the target's 500 is never seen).
        assert_eq!(one_run(get("/same-host"), &c).await, ProbeResult::Success(None));
        match one_run(get("/other-host"), &c).await {
            ProbeResult::Success(Some(w)) => assert!(w.starts_with("Probe terminated redirects"), "{w}"),
            other => panic!("{other:?}"),
        }
        match one_run(get("/loop"), &c).await {
            ProbeResult::Failure(m) => assert!(m.contains("stopped after 10 redirects"), "{m}"),
            other => panic!("{other:?}"),
        }
        // The path gets its slash; headers (and Host) are sent; the user agent is kubelet's.
        let headers = json!({"httpGet": {"path": "headers", "port": port, "httpHeaders": [
            {"name": "X-Probe", "value": "yes"}, {"name": "Host", "value": "app.example"}]}});
        assert_eq!(one_run(headers, &c).await, ProbeResult::Success(None));
        let started = std::time::Instant::now();
        match one_run(
            json!({"httpGet": {"path": "/slow", "port": port}, "timeoutSeconds": 1}),
            &c,
        )
        .await
        {
            ProbeResult::Failure(m) => assert!(m.starts_with(&format!("Get \"http://127.0.0.1:{port}/slow\"")), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "timeoutSeconds bounds the probe"
        );
        // HTTPS against a plain HTTP server fails in the handshake, not on a certificate.
        match one_run(json!({"httpGet": {"path": "/ok", "port": port, "scheme": "HTTPS"}}), &c).await {
            ProbeResult::Failure(m) => assert!(m.starts_with("Get \"https://"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn tcp_probes_connect_and_ports_resolve_by_name() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let c = container(json!({"ports": [{"name": "db", "containerPort": port}]}));
        assert_eq!(
            one_run(json!({"tcpSocket": {"port": "db"}}), &c).await,
            ProbeResult::Success(None)
        );
        drop(listener);
        match one_run(json!({"tcpSocket": {"port": port}}), &c).await {
            ProbeResult::Failure(m) => assert!(m.starts_with(&format!("dial tcp 127.0.0.1:{port}: connect:")), "{m}"),
            other => panic!("{other:?}"),
        }
        let bad = container(json!({"livenessProbe": {"tcpSocket": {"port": "nope"}}}));
        let ip = Some("127.0.0.1".parse().unwrap());
        let err = ProbeSet::start(&bad, "cid", ip, Arc::new(ScriptedExec::default()))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("couldn't find port: nope"), "{err}");
        let grpc = container(json!({"readinessProbe": {"grpc": {"port": 9000}}}));
        let err = ProbeSet::start(&grpc, "cid", ip, Arc::new(ScriptedExec::default()))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("gRPC probes are not implemented"), "{err}");
        let no_ip = container(json!({"readinessProbe": {"tcpSocket": {"port": 80}}}));
        let err = ProbeSet::start(&no_ip, "cid", None, Arc::new(ScriptedExec::default()))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("the pod has no IP yet"), "{err}");
    }

    #[tokio::test]
    async fn liveness_restarts_after_failure_threshold_failures_in_a_row() {
        let exec = Arc::new(ScriptedExec::default());
        // fail, pass (resets the run), fail, fail → restart on the 4th probe.
        exec.script("live", &[(1, "boom"), (0, ""), (1, "boom"), (1, "boom again")]);
        let c = container(json!({"livenessProbe": exec_probe("live", json!({"failureThreshold": 2}))}));
        let mut set = ProbeSet::start(&c, "cid", None, exec.clone()).unwrap();
        let mut status = set.status();
        assert!(
            status.borrow().started && status.borrow().ready,
            "no startup or readiness probe"
        );
        wait_for(&mut status, Duration::from_secs(6), |s| s.restart.is_some()).await;
        assert_eq!(
            status.borrow().restart.as_deref(),
            Some("Container app failed liveness probe, will be restarted")
        );
        assert_eq!(exec.calls("live"), 4);
        let mut messages = Vec::new();
        while let Some(e) = set.try_next_event() {
            messages.push(e.message);
        }
        assert_eq!(
            messages,
            [
                "Liveness probe failed: boom",
                "Liveness probe failed: boom",
                "Liveness probe failed: boom again"
            ]
        );
        // Probing stops once a restart is due.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(exec.calls("live"), 4);
    }

    #[tokio::test]
    async fn readiness_follows_its_thresholds_and_an_http_endpoint() {
        let (port, toggle) = server().await;
        let c = container(json!({"readinessProbe": {"httpGet": {"path": "/toggle", "port": port},
            "periodSeconds": 1, "successThreshold": 2, "failureThreshold": 1}}));
        let exec = Arc::new(ScriptedExec::default());
        let set = ProbeSet::start(&c, "cid", Some("127.0.0.1".parse().unwrap()), exec).unwrap();
        let mut status = set.status();
        assert!(!status.borrow().ready, "not ready before the probe succeeds");
        let began = std::time::Instant::now();
        wait_for(&mut status, Duration::from_secs(5), |s| s.ready).await;
        assert!(
            began.elapsed() >= Duration::from_millis(900),
            "two successes, a period apart"
        );
        toggle.store(503, Ordering::SeqCst);
        wait_for(&mut status, Duration::from_secs(4), |s| !s.ready).await;
        assert!(status.borrow().restart.is_none(), "readiness never restarts");
    }

    #[tokio::test]
    async fn startup_gates_liveness_and_readiness() {
        let exec = Arc::new(ScriptedExec::default());
        exec.script("startup", &[(1, "not yet"), (1, "not yet"), (0, "")]);
        exec.script("live", &[(0, "")]);
        exec.script("ready", &[(0, "")]);
        let c = container(json!({
            "startupProbe": exec_probe("startup", json!({"failureThreshold": 5})),
            "livenessProbe": exec_probe("live", json!({})),
            "readinessProbe": exec_probe("ready", json!({})),
        }));
        let set = ProbeSet::start(&c, "cid", None, exec.clone()).unwrap();
        let mut status = set.status();
        assert_eq!(*status.borrow(), ProbeStatus::default());
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!status.borrow().started);
        assert_eq!(
            (exec.calls("live"), exec.calls("ready")),
            (0, 0),
            "gated by the startup probe"
        );
        wait_for(&mut status, Duration::from_secs(4), |s| s.started).await;
        wait_for(&mut status, Duration::from_secs(3), |s| s.ready).await;
        assert!(exec.calls("live") >= 1);
        assert_eq!(exec.calls("startup"), 3, "the startup probe stops once it succeeded");
    }

    #[tokio::test]
    async fn startup_failures_restart_and_errors_do_not_count() {
        let exec = Arc::new(ScriptedExec::default());
        exec.script("startup", &[(-1, "runtime unavailable"), (1, "no"), (1, "no")]);
        let c = container(json!({"startupProbe": exec_probe("startup", json!({"failureThreshold": 2}))}));
        let mut set = ProbeSet::start(&c, "cid", None, exec.clone()).unwrap();
        let mut status = set.status();
        wait_for(&mut status, Duration::from_secs(6), |s| s.restart.is_some()).await;
        assert_eq!(
            status.borrow().restart.as_deref(),
            Some("Container app failed startup probe, will be restarted")
        );
        assert_eq!(exec.calls("startup"), 3, "the errored run was thrown away");
        let first = set.next_event().await.unwrap();
        assert_eq!(first.message, "Startup probe errored: runtime unavailable");
    }

    /// An exec that never answers.
    struct HangingExec;

    impl ExecProbe for HangingExec {
        fn exec<'a>(&'a self, _: &'a str, _: &'a [String], _: Duration) -> ExecFuture<'a> {
            Box::pin(std::future::pending())
        }
    }

    #[tokio::test]
    async fn an_exec_that_never_answers_fails_after_the_timeout() {
        let c = container(json!({"livenessProbe": exec_probe("sleep", json!({"failureThreshold": 1}))}));
        let mut set = ProbeSet::start(&c, "cid", None, Arc::new(HangingExec)).unwrap();
        let mut status = set.status();
        wait_for(&mut status, Duration::from_secs(4), |s| s.restart.is_some()).await;
        assert_eq!(
            set.next_event().await.unwrap().message,
            "Liveness probe failed: command \"sleep\" timed out"
        );
    }

    #[tokio::test]
    async fn initial_delay_postpones_the_first_probe() {
        let exec = Arc::new(ScriptedExec::default());
        exec.script("live", &[(0, "")]);
        let c = container(json!({"livenessProbe": exec_probe("live", json!({"initialDelaySeconds": 1}))}));
        let _set = ProbeSet::start(&c, "cid", None, exec.clone()).unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(exec.calls("live"), 0);
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(exec.calls("live"), 1);
    }

    #[test]
    fn timings_default_as_kubernetes() {
        let t = ProbeTiming::of(&Probe::default());
        assert_eq!(t.period, Duration::from_secs(10));
        assert_eq!(t.timeout, Duration::from_secs(1));
        assert_eq!((t.success_threshold, t.failure_threshold), (1, 3));
        assert_eq!(t.initial_delay, Duration::ZERO);
    }
}
