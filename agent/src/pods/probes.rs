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
            Action::Exec(command) => match self.exec.exec(&self.container_id, command, timeout).await {
                Ok((0, _)) => Ok(ProbeResult::Success(None)),
                Ok((_, output)) => Ok(ProbeResult::Failure(
                    String::from_utf8_lossy(&output).trim_end().to_string(),
                )),
                Err(e) => Err(e),
            },
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
