//! The pod worker: one task per pod bound to this node, kubelet's `syncPod` loop. It makes
//! the pod's sandbox (network namespace, /etc files, volumes), runs the init containers in
//! order and then the app containers, restarts them by the restart policy with the
//! CrashLoopBackOff back-off, reports the status after every change, and on deletion stops
//! the containers gracefully (SIGTERM, the grace period, SIGKILL) and removes what the pod
//! had on the node.
//!
//! Everything the worker knows is rebuilt after an agent restart from containerd (the
//! containers' labels say pod, name and run) and from the pod's status in the API (restart
//! counts, finished init containers, last terminations): a restarted agent adopts running
//! containers without touching them.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::{Client, ResourceExt as _};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::backoff::Backoff;
use super::config::{self, ATTEMPT_LABEL, PodSetting};
use super::directory::Directory;
use super::env::{self, EnvSources, NodeFacts};
use super::probes::{ExecFuture, ExecProbe, ProbeSet, ProbeStatus};
use super::status::{self, ContainerObservation, ContainerState, PodObservation, Termination};
use crate::network::files::DnsSettings;
use crate::network::{self, PodNetwork};
use crate::runtime::{self, BindMount, CONTAINER_NAME_LABEL, ExitStatus, NetworkNamespace, Runtime, TaskStatus};
use crate::stream::{ContainerRuntimeInfo, PodRuntimeInfo};
use crate::volumes::{PodVolumes, VolumeOptions, VolumeSource};

/// The longest a postStart hook may run (kubelet has none; this keeps a hung hook from
/// holding the pod's worker for good).
const POST_START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long to wait before trying a failed sandbox or container config again.
const RETRY: Duration = Duration::from_secs(2);
/// How often a running pod's volumes are refreshed from their sources.
pub const VOLUME_REFRESH: Duration = Duration::from_secs(2);

/// What every pod worker of the node shares.
pub struct Context {
    pub client: Client,
    pub runtime: Runtime,
    /// `None`: pods get no network of their own (only hostNetwork pods can run).
    pub network: Option<Arc<PodNetwork>>,
    pub node_name: String,
    pub host_ips: Vec<String>,
    /// `<data-dir>/pods`: one directory per pod uid.
    pub pods_dir: PathBuf,
    pub dns: DnsSettings,
    /// The node's allocatable, for `resourceFieldRef` defaults.
    pub facts: NodeFacts,
    /// The CrashLoopBackOff delays (kubelet: 10 s doubling to 5 min).
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// What the streaming server looks pods up in.
    pub directory: Arc<Directory>,
    /// The cgroup pods go under (`/weir`).
    pub cgroup_parent: String,
    /// Events about pods (`kubectl describe pod`), as kubelet records them.
    pub recorder: kube::runtime::events::Recorder,
    /// Where volumes get ConfigMaps, Secrets, claims and service account tokens.
    pub volume_source: Arc<dyn VolumeSource>,
}

/// What a worker is told.
#[derive(Debug)]
pub enum Message {
    /// The pod as the API has it now.
    Update(Arc<Pod>),
    /// The pod is gone from the API.
    Gone,
    /// A container's process exited.
    Exited {
        id: String,
        status: Result<ExitStatus, String>,
    },
    /// The probes of a container report a new status.
    Probed { id: String, status: ProbeStatus },
    /// A probe wants a Warning `Unhealthy` event recorded.
    Unhealthy { message: String },
    /// The agent is stopping: leave the containers running.
    Shutdown,
}

/// The task forwarding a container's probe results; dropping it stops the probes.
#[derive(Debug)]
struct ProbeTask(tokio::task::JoinHandle<()>);

impl Drop for ProbeTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Exec probes (and hooks) run in the container through containerd.
struct ContainerExec(Runtime);

impl ExecProbe for ContainerExec {
    fn exec<'a>(&'a self, container_id: &'a str, command: &'a [String], timeout: Duration) -> ExecFuture<'a> {
        Box::pin(async move {
            self.0
                .exec_sync(container_id, command, timeout)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// A running worker.
pub struct Handle {
    pub tx: mpsc::UnboundedSender<Message>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts the worker of `pod`.
pub fn spawn(ctx: Arc<Context>, pod: Arc<Pod>) -> Handle {
    let (tx, rx) = mpsc::unbounded_channel();
    let worker = Worker::new(ctx, pod, tx.clone(), rx);
    Handle {
        tx,
        task: tokio::spawn(worker.run()),
    }
}

/// One run of one container.
#[derive(Clone, Debug)]
struct Run {
    attempt: u32,
    id: String,
    state: ContainerState,
    started: Option<Instant>,
}

#[derive(Debug)]
struct Tracked {
    init: bool,
    sidecar: bool,
    image: String,
    image_id: String,
    /// The current (or last) run.
    run: Option<Run>,
    /// Why it is not running yet (image missing, config error, back-off...).
    waiting: Option<(String, Option<String>)>,
    restart_count: i32,
    last_termination: Option<Termination>,
    /// When the next start may happen (back-off or retry).
    not_before: Option<Instant>,
    /// The previous run's log, for `kubectl logs --previous`.
    previous_log: Option<PathBuf>,
    /// The probes of the running container.
    probes: Option<ProbeTask>,
    /// What they say; `None`: no probes run (ready and started follow running).
    probe_status: Option<ProbeStatus>,
}

impl Tracked {
    /// Container `c` before its first run.
    fn new(c: &Container, init: bool) -> Tracked {
        Tracked {
            init,
            sidecar: init && c.restart_policy.as_deref() == Some("Always"),
            image: c.image.clone().unwrap_or_default(),
            image_id: String::new(),
            run: None,
            waiting: None,
            restart_count: 0,
            last_termination: None,
            not_before: None,
            previous_log: None,
            probes: None,
            probe_status: None,
        }
    }
}

struct Worker {
    ctx: Arc<Context>,
    pod: Arc<Pod>,
    uid: String,
    dir: PathBuf,
    tx: mpsc::UnboundedSender<Message>,
    rx: mpsc::UnboundedReceiver<Message>,
    sandbox: Option<Sandbox>,
    sandbox_error: Option<String>,
    sandbox_retry: Option<Instant>,
    /// When the volumes were last refreshed from their sources.
    last_refresh: Instant,
    containers: BTreeMap<String, Tracked>,
    backoff: Backoff<String>,
    last_status: Option<Value>,
    start_time: Option<Timestamp>,
    failed: Option<(String, String)>,
    gone: bool,
    /// The sandbox of a finished pod was released.
    released: bool,
}

#[derive(Clone, Debug)]
struct Sandbox {
    ip: Option<IpAddr>,
    netns: Option<PathBuf>,
    mounts: Vec<BindMount>,
    hostname: Option<String>,
    volumes: Arc<PodVolumes>,
}

fn restart_policy(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        .unwrap_or("Always")
}

fn now() -> Timestamp {
    Timestamp::now()
}

/// Parses a status timestamp.
fn ts(t: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>) -> Option<Timestamp> {
    t.as_ref().map(|t| t.0)
}

impl Worker {
    fn new(
        ctx: Arc<Context>,
        pod: Arc<Pod>,
        tx: mpsc::UnboundedSender<Message>,
        rx: mpsc::UnboundedReceiver<Message>,
    ) -> Worker {
        let uid = pod.uid().unwrap_or_default();
        let dir = ctx.pods_dir.join(&uid);
        let backoff = Backoff::new(ctx.backoff_initial, ctx.backoff_max);
        Worker {
            ctx,
            pod,
            uid,
            dir,
            tx,
            rx,
            sandbox: None,
            sandbox_error: None,
            sandbox_retry: None,
            last_refresh: Instant::now(),
            containers: BTreeMap::new(),
            backoff,
            last_status: None,
            start_time: None,
            failed: None,
            gone: false,
            released: false,
        }
    }

    fn name(&self) -> String {
        format!("{}/{}", self.pod.namespace().unwrap_or_default(), self.pod.name_any())
    }

    /// Records an event about the pod (in the background: events never hold a pod up).
    fn event(&self, warning: bool, reason: &str, note: String) {
        use kube::runtime::events::{Event, EventType};
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: self.pod.metadata.name.clone(),
            namespace: self.pod.metadata.namespace.clone(),
            uid: self.pod.metadata.uid.clone(),
            ..Default::default()
        };
        let event = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.to_owned(),
            note: Some(note),
            action: reason.to_owned(),
            secondary: None,
        };
        let recorder = self.ctx.recorder.clone();
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &reference).await {
                debug!(error = %e, "recording an event");
            }
        });
    }

    fn spec_containers(&self) -> Vec<(Container, bool)> {
        let spec = self.pod.spec.clone().unwrap_or_default();
        spec.init_containers
            .unwrap_or_default()
            .into_iter()
            .map(|c| (c, true))
            .chain(spec.containers.into_iter().map(|c| (c, false)))
            .collect()
    }

    fn terminating(&self) -> bool {
        self.gone || self.pod.metadata.deletion_timestamp.is_some()
    }

    async fn run(mut self) {
        if let Err(e) = self.adopt().await {
            warn!(pod = %self.name(), error = %e, "adopting the pod's containers");
        }
        loop {
            if self.terminating() {
                self.terminate().await;
                return;
            }
            self.sync().await;
            self.write_status().await;
            let wake = self.next_wake();
            let message = tokio::select! {
                m = self.rx.recv() => match m {
                    Some(m) => Some(m),
                    // Every sender is gone: the manager stopped.
                    None => return,
                },
                _ = tokio::time::sleep_until(wake.into()) => None,
            };
            if let Some(message) = message
                && !self.handle(message).await
            {
                return;
            }
            // Take everything queued before syncing again.
            while let Ok(message) = self.rx.try_recv() {
                if !self.handle(message).await {
                    return;
                }
            }
        }
    }

    /// Applies a message; `false`: stop the worker now (agent shutdown).
    async fn handle(&mut self, message: Message) -> bool {
        match message {
            Message::Update(pod) => self.pod = pod,
            Message::Gone => self.gone = true,
            Message::Shutdown => return false,
            Message::Exited { id, status } => self.exited(&id, status).await,
            Message::Probed { id, status } => self.probed(&id, status),
            Message::Unhealthy { message } => self.event(true, "Unhealthy", message),
        }
        true
    }

    /// When the loop must run again without a message.
    /// A deadline already past does not count: sync acted on it (or could not yet, and then
    /// waking at once again would only spin).
    fn next_wake(&self) -> Instant {
        let now = Instant::now();
        let deadlines = self
            .containers
            .values()
            .filter_map(|t| t.not_before)
            .chain(self.sandbox_retry);
        deadlines
            .filter(|at| *at > now)
            .fold(now + VOLUME_REFRESH, Instant::min)
    }

    /// Rebuilds what the worker knows from containerd and from the pod's status.
    async fn adopt(&mut self) -> Result<(), runtime::Error> {
        let status = self.pod.status.clone().unwrap_or_default();
        self.start_time = ts(&status.start_time);
        let statuses: HashMap<String, _> = status
            .init_container_statuses
            .iter()
            .flatten()
            .chain(status.container_statuses.iter().flatten())
            .map(|s| (s.name.clone(), s.clone()))
            .collect();
        for (c, init) in self.spec_containers() {
            let mut tracked = Tracked::new(&c, init);
            if let Some(s) = statuses.get(&c.name) {
                tracked.restart_count = s.restart_count;
                tracked.image_id = s.image_id.clone();
                tracked.last_termination = s
                    .last_state
                    .as_ref()
                    .and_then(|l| l.terminated.as_ref())
                    .map(termination_from_api);
                // A finished run stays finished (its container was deleted when it ended).
                if let Some(t) = s.state.as_ref().and_then(|st| st.terminated.as_ref()) {
                    let attempt = tracked.restart_count.max(0) as u32;
                    tracked.run = Some(Run {
                        attempt,
                        id: config::container_id(&self.uid, &c.name, attempt),
                        state: ContainerState::Terminated(termination_from_api(t)),
                        started: None,
                    });
                }
            }
            self.containers.insert(c.name.clone(), tracked);
        }
        let found = self.ctx.runtime.list_pod_containers(&self.uid).await?;
        let mut newest: HashMap<String, (u32, runtime::ContainerState)> = HashMap::new();
        for c in found {
            let name = c.labels.get(CONTAINER_NAME_LABEL).cloned().unwrap_or_default();
            let attempt = c.labels.get(ATTEMPT_LABEL).and_then(|a| a.parse().ok()).unwrap_or(0);
            match newest.get(&name) {
                Some((a, _)) if *a >= attempt => self.delete_container(&c.id).await,
                _ => {
                    if let Some((_, older)) = newest.insert(name, (attempt, c)) {
                        self.delete_container(&older.id).await;
                    }
                }
            }
        }
        let pod_name = self.name();
        for (name, (attempt, c)) in newest {
            let Some(tracked) = self.containers.get_mut(&name) else {
                self.delete_container(&c.id).await;
                continue;
            };
            let started_at = statuses
                .get(&name)
                .and_then(|s| s.state.as_ref())
                .and_then(|s| s.running.as_ref())
                .and_then(|r| ts(&r.started_at))
                .unwrap_or_else(now);
            match c.task {
                TaskStatus::Running { .. } | TaskStatus::Paused { .. } | TaskStatus::Stopped { .. } => {
                    debug!(pod = %pod_name, container = %name, attempt, "adopted a running container");
                    tracked.restart_count = tracked.restart_count.max(attempt as i32);
                    tracked.run = Some(Run {
                        attempt,
                        id: c.id.clone(),
                        state: ContainerState::Running { started_at },
                        started: Some(Instant::now()),
                    });
                    tracked.previous_log = attempt
                        .checked_sub(1)
                        .map(|a| config::log_path(&self.dir, &name, a))
                        .filter(|p| p.exists());
                    self.watch_exit(c.id.clone());
                }
                // Never started, or containerd does not know: start afresh.
                _ => self.delete_container(&c.id).await,
            }
        }
        // The sandbox of a pod that is already running here is adopted, not rebuilt.
        if self.containers.values().any(|t| t.run.is_some())
            && let Some(network) = &self.ctx.network
            && !host_network(&self.pod)
            && let Ok(Some(existing)) = network.existing(&self.uid).await
        {
            match self.finish_sandbox(Some(existing.ip), Some(existing.netns)).await {
                Ok(sandbox) => self.sandbox = Some(sandbox),
                Err(e) => warn!(pod = %self.name(), error = %e, "re-reading the sandbox of an adopted pod"),
            }
        }
        // Adopted running containers get their probes again (initial delays from now).
        for (c, _) in self.spec_containers() {
            let id = self
                .containers
                .get(&c.name)
                .and_then(|t| t.run.as_ref())
                .filter(|r| matches!(r.state, ContainerState::Running { .. }))
                .map(|r| r.id.clone());
            if let Some(id) = id {
                self.start_probes(&c, &id);
            }
        }
        self.publish();
        Ok(())
    }

    /// The address probes and hooks reach the pod at: its own, or the node's for hostNetwork.
    fn pod_ip(&self) -> Option<IpAddr> {
        self.sandbox
            .as_ref()
            .and_then(|s| s.ip)
            .or_else(|| self.ctx.host_ips.first().and_then(|ip| ip.parse().ok()))
    }

    /// The pod's termination grace period.
    fn grace(&self) -> Duration {
        let seconds = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or(self.pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds))
            .unwrap_or(30)
            .max(0);
        Duration::from_secs(seconds as u64)
    }

    /// Runs a lifecycle hook of container `c` (running as `id`).
    async fn run_hook(
        &self,
        hook: &k8s_openapi::api::core::v1::LifecycleHandler,
        c: &Container,
        id: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let pod_ip = self.pod_ip();
        let exec: Arc<dyn ExecProbe> = Arc::new(ContainerExec(self.ctx.runtime.clone()));
        super::probes::run_hook(hook, c, id, pod_ip, exec, timeout).await
    }

    /// Starts the probes of container `c`, running as `id`; their results come back as
    /// [`Message::Probed`] and [`Message::Unhealthy`].
    fn start_probes(&mut self, c: &Container, id: &str) {
        if c.startup_probe.is_none() && c.liveness_probe.is_none() && c.readiness_probe.is_none() {
            return;
        }
        let pod_ip = self.pod_ip();
        let exec: Arc<dyn ExecProbe> = Arc::new(ContainerExec(self.ctx.runtime.clone()));
        let set = match ProbeSet::start(c, id, pod_ip, exec) {
            Ok(set) => set,
            Err(e) => {
                warn!(pod = %self.name(), container = %c.name, error = %e, "the container's probes cannot run");
                self.event(true, "Unhealthy", e.to_string());
                if let Some(t) = self.containers.get_mut(&c.name) {
                    t.probe_status = Some(ProbeStatus::default());
                }
                return;
            }
        };
        let mut status = set.status();
        let initial = status.borrow().clone();
        let tx = self.tx.clone();
        let id = id.to_owned();
        let task = tokio::spawn(async move {
            let mut set = set;
            let mut events_open = true;
            loop {
                tokio::select! {
                    changed = status.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let status = status.borrow_and_update().clone();
                        if tx.send(Message::Probed { id: id.clone(), status }).is_err() {
                            return;
                        }
                    }
                    event = set.next_event(), if events_open => match event {
                        Some(event) => {
                            if tx.send(Message::Unhealthy { message: event.message }).is_err() {
                                return;
                            }
                        }
                        None => events_open = false,
                    },
                }
            }
        });
        if let Some(t) = self.containers.get_mut(&c.name) {
            t.probe_status = Some(initial);
            t.probes = Some(ProbeTask(task));
        }
    }

    /// A container's probes changed their verdict: readiness and started go to the status;
    /// a failed liveness (or startup) probe stops the container, which the restart policy
    /// then restarts.
    fn probed(&mut self, id: &str, status: ProbeStatus) {
        let grace = self.grace();
        let Some((name, tracked)) = self
            .containers
            .iter_mut()
            .find(|(_, t)| t.run.as_ref().is_some_and(|r| r.id == id))
        else {
            return;
        };
        let running = tracked
            .run
            .as_ref()
            .is_some_and(|r| matches!(r.state, ContainerState::Running { .. }));
        let restart = status.restart.clone();
        tracked.probe_status = Some(status);
        if let (Some(message), true) = (restart, running) {
            let name = name.clone();
            tracked.probes = None;
            self.event(false, "Killing", message);
            info!(pod = %self.name(), container = %name, "probe failed: restarting the container");
            let runtime = self.ctx.runtime.clone();
            let id = id.to_owned();
            tokio::spawn(async move {
                if let Err(e) = runtime.stop_container(&id, grace).await {
                    warn!(container = %id, error = %e, "stopping a container that failed its probe");
                }
            });
        }
    }

    fn watch_exit(&self, id: String) {
        let runtime = self.ctx.runtime.clone();
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let status = runtime.wait_container(&id).await.map_err(|e| e.to_string());
            let _ = tx.send(Message::Exited { id, status });
        });
    }

    async fn delete_container(&self, id: &str) {
        match self.ctx.runtime.delete_container(id).await {
            Ok(()) | Err(runtime::Error::NotFound(_)) => {}
            Err(e) => warn!(pod = %self.name(), container = id, error = %e, "deleting a container"),
        }
    }

    async fn exited(&mut self, id: &str, status: Result<ExitStatus, String>) {
        let pod_name = self.name();
        let Some((name, tracked)) = self
            .containers
            .iter_mut()
            .find(|(_, t)| t.run.as_ref().is_some_and(|r| r.id == id))
        else {
            return;
        };
        let name = name.clone();
        let run = tracked.run.as_mut().expect("found by its run");
        let started_at = match run.state {
            ContainerState::Running { started_at } => Some(started_at),
            _ => None,
        };
        let termination = match status {
            Ok(s) => {
                let code = s.code as i32;
                Termination {
                    exit_code: code,
                    signal: None,
                    reason: Termination::reason_for(code, s.oom_killed).to_owned(),
                    message: None,
                    started_at,
                    finished_at: s
                        .exited_at
                        .and_then(|t| Timestamp::try_from(t).ok())
                        .unwrap_or_else(now),
                    container_id: Some(format!("containerd://{id}")),
                }
            }
            Err(e) => Termination {
                exit_code: 137,
                signal: None,
                reason: "Error".into(),
                message: Some(format!("waiting for the container failed: {e}")),
                started_at,
                finished_at: now(),
                container_id: Some(format!("containerd://{id}")),
            },
        };
        tracked.probes = None;
        tracked.probe_status = None;
        info!(pod = %pod_name, container = %name, exit_code = termination.exit_code, reason = %termination.reason, "container exited");
        run.state = ContainerState::Terminated(termination);
        let started = run.started;
        let id = id.to_owned();
        // Deleting flushes the log; the run's record lives on in the status.
        self.delete_container(&id).await;
        self.publish();
        let policy = restart_policy(&self.pod).to_owned();
        let tracked = self.containers.get_mut(&name).expect("present");
        let ContainerState::Terminated(t) = &tracked.run.as_ref().expect("present").state else {
            unreachable!()
        };
        let restart = if tracked.sidecar {
            true
        } else if tracked.init {
            t.exit_code != 0 && policy != "Never"
        } else {
            match policy.as_str() {
                "Always" => true,
                "OnFailure" => t.exit_code != 0,
                _ => false,
            }
        };
        if restart {
            let delay = self
                .backoff
                .crashed(&name, started.unwrap_or_else(Instant::now), Instant::now());
            tracked.not_before = Some(Instant::now() + delay);
            let message = format!(
                "back-off {}s restarting failed container={name} pod={}_{}({})",
                delay.as_secs(),
                self.pod.name_any(),
                self.pod.namespace().unwrap_or_default(),
                self.uid
            );
            tracked.waiting = Some(("CrashLoopBackOff".into(), Some(message)));
            self.event(
                true,
                "BackOff",
                format!("Back-off restarting failed container {name} in pod {}", self.name()),
            );
        }
    }

    /// The sandbox: the network namespace and address, the /etc files, the volumes.
    async fn ensure_sandbox(&mut self) -> bool {
        if self.sandbox.is_some() {
            return true;
        }
        if self.sandbox_retry.is_some_and(|t| t > Instant::now()) {
            return false;
        }
        let t0 = Instant::now();
        let result = self.create_sandbox().await;
        match result {
            Ok(sandbox) => {
                info!(pod = %self.name(), ip = ?sandbox.ip, took = ?t0.elapsed(), "pod sandbox ready");
                self.sandbox = Some(sandbox);
                self.sandbox_error = None;
                self.sandbox_retry = None;
                self.publish();
                true
            }
            Err(e) => {
                warn!(pod = %self.name(), error = %e, "creating the pod sandbox; retrying");
                if self.sandbox_error.as_deref() != Some(e.as_str()) {
                    self.event(
                        true,
                        "FailedCreatePodSandBox",
                        format!("Failed to create pod sandbox: {e}"),
                    );
                }
                self.sandbox_error = Some(e);
                self.sandbox_retry = Some(Instant::now() + RETRY);
                false
            }
        }
    }

    async fn create_sandbox(&mut self) -> Result<Sandbox, String> {
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("creating {}: {e}", self.dir.display()))?;
        let (ip, netns) = if host_network(&self.pod) {
            (None, None)
        } else {
            let network = self.ctx.network.as_ref().ok_or_else(|| {
                "this node has no pod network (no podCIDR yet, or the agent runs without one): only hostNetwork \
                 pods can run"
                    .to_owned()
            })?;
            let created = network
                .create(&self.uid)
                .await
                .map_err(|e| format!("setting up the pod network: {e}"))?;
            (Some(created.ip), Some(created.netns))
        };
        self.finish_sandbox(ip, netns).await
    }

    /// The /etc files and volumes of a sandbox whose network exists.
    async fn finish_sandbox(&mut self, ip: Option<IpAddr>, netns: Option<PathBuf>) -> Result<Sandbox, String> {
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("creating {}: {e}", self.dir.display()))?;
        let domain = &self.ctx.dns.cluster_domain;
        let pod = &*self.pod;
        let hosts = if host_network(pod) {
            let node_hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
            network::files::host_network_hosts_file(&node_hosts, pod)
        } else {
            network::files::hosts_file(pod, &ip.into_iter().collect::<Vec<_>>(), domain).map_err(|e| e.to_string())?
        };
        let resolv = network::files::resolv_conf(pod, &self.ctx.dns)
            .map_err(|e| e.to_string())?
            .render();
        let hostname = if host_network(pod) {
            None
        } else {
            Some(network::files::kernel_hostname(pod, domain).map_err(|e| e.to_string())?)
        };
        let mut mounts = Vec::new();
        for (file, content, target) in [
            ("etc-hosts", hosts, "/etc/hosts"),
            ("resolv.conf", resolv, "/etc/resolv.conf"),
        ] {
            let path = self.dir.join(file);
            write_file(&path, &content)?;
            mounts.push(BindMount {
                source: path,
                destination: target.into(),
                readonly: false,
            });
        }
        if !host_network(pod) {
            let path = self.dir.join("hostname");
            write_file(
                &path,
                &network::files::hostname_file(pod, domain).map_err(|e| e.to_string())?,
            )?;
            mounts.push(BindMount {
                source: path,
                destination: "/etc/hostname".into(),
                readonly: false,
            });
        }
        let volumes = PodVolumes::prepare_with(
            self.ctx.volume_source.as_ref(),
            pod,
            &self.ctx.pods_dir,
            &VolumeOptions {
                secrets_in_memory: true,
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        self.last_refresh = Instant::now();
        Ok(Sandbox {
            ip,
            netns,
            mounts,
            hostname,
            volumes: Arc::new(volumes),
        })
    }

    /// ConfigMap, Secret, downward API and token volumes follow their sources while the pod
    /// runs (every [`VOLUME_REFRESH`]).
    async fn refresh_volumes(&mut self) {
        let Some(sandbox) = &self.sandbox else { return };
        if self.last_refresh.elapsed() < VOLUME_REFRESH
            || !sandbox.volumes.volumes().values().any(|v| v.kind.is_api_data())
        {
            return;
        }
        self.last_refresh = Instant::now();
        let volumes = sandbox.volumes.clone();
        match volumes.refresh(self.ctx.volume_source.as_ref(), &self.pod).await {
            Ok(true) => debug!(pod = %self.name(), "volumes updated from their sources"),
            Ok(false) => {}
            Err(e) => warn!(pod = %self.name(), error = %e, "refreshing volumes"),
        }
    }

    /// kubelet's syncPod: the next step for every container.
    async fn sync(&mut self) {
        let observation = self.observation();
        let spec = self.pod.spec.clone().unwrap_or_default();
        let phase = status::phase(&spec, &observation);
        if phase == "Succeeded" || phase == "Failed" {
            self.release_sandbox().await;
            return;
        }
        if self.start_time.is_none() {
            self.start_time = Some(now());
        }
        if !self.ensure_sandbox().await {
            return;
        }
        self.refresh_volumes().await;
        // Init containers, in order: each must succeed (a sidecar: start) before the next.
        let mut inits_done = true;
        for (c, init) in self.spec_containers() {
            if !init {
                continue;
            }
            let state = self
                .containers
                .get(&c.name)
                .and_then(|t| t.run.as_ref())
                .map(|r| r.state.clone());
            let sidecar = c.restart_policy.as_deref() == Some("Always");
            match state {
                Some(ContainerState::Terminated(t)) if t.exit_code == 0 && !sidecar => continue,
                Some(ContainerState::Running { .. }) if sidecar => continue,
                Some(ContainerState::Running { .. }) => {
                    inits_done = false;
                    break;
                }
                _ => {
                    self.maybe_start(&c, true).await;
                    let running = matches!(
                        self.containers
                            .get(&c.name)
                            .and_then(|t| t.run.as_ref())
                            .map(|r| &r.state),
                        Some(ContainerState::Running { .. })
                    );
                    if !(sidecar && running) {
                        inits_done = false;
                        break;
                    }
                }
            }
        }
        if !inits_done {
            return;
        }
        for (c, init) in self.spec_containers() {
            if init {
                continue;
            }
            let state = self
                .containers
                .get(&c.name)
                .and_then(|t| t.run.as_ref())
                .map(|r| r.state.clone());
            match state {
                Some(ContainerState::Running { .. }) => {}
                Some(ContainerState::Terminated(_)) => {
                    // Restarted only when exited() asked for it (waiting is set).
                    if self.containers.get(&c.name).is_some_and(|t| t.waiting.is_some()) {
                        self.maybe_start(&c, false).await;
                    }
                }
                _ => self.maybe_start(&c, false).await,
            }
        }
    }

    /// Starts a new run of `c` unless it must wait.
    async fn maybe_start(&mut self, c: &Container, init: bool) {
        let tracked = self
            .containers
            .entry(c.name.clone())
            .or_insert_with(|| Tracked::new(c, init));
        if let Some(run) = &tracked.run
            && let ContainerState::Terminated(_) = run.state
            && tracked.waiting.is_none()
        {
            // Finished for good (restart policy).
            return;
        }
        if tracked.not_before.is_some_and(|t| t > Instant::now()) {
            return;
        }
        let attempt = match &tracked.run {
            Some(run) => run.attempt + 1,
            None => tracked.restart_count.max(0) as u32,
        };
        match self.start(c, init, attempt).await {
            Ok((id, image_id)) => {
                let tracked = self.containers.get_mut(&c.name).expect("inserted above");
                if let Some(run) = tracked.run.take()
                    && let ContainerState::Terminated(t) = run.state
                {
                    tracked.last_termination = Some(t);
                    tracked.restart_count = attempt as i32;
                    tracked.previous_log = Some(config::log_path(&self.dir, &c.name, run.attempt));
                    // Only the previous run's log is kept, as kubelet keeps one dead container.
                    if let Some(older) = run.attempt.checked_sub(1) {
                        let _ = std::fs::remove_file(config::log_path(&self.dir, &c.name, older));
                    }
                }
                tracked.run = Some(Run {
                    attempt,
                    id: id.clone(),
                    state: ContainerState::Running { started_at: now() },
                    started: Some(Instant::now()),
                });
                tracked.image_id = image_id;
                tracked.waiting = None;
                tracked.not_before = None;
                info!(pod = %self.name(), container = %c.name, attempt, "container started");
                self.start_probes(c, &id);
                self.event(false, "Started", format!("Started container {}", c.name));
                self.watch_exit(id.clone());
                self.publish();
                // Report Running at once (the status SLO is about this moment).
                self.write_status().await;
                if let Some(hook) = c.lifecycle.as_ref().and_then(|l| l.post_start.as_ref())
                    && let Err(e) = self.run_hook(hook, c, &id, POST_START_TIMEOUT).await
                {
                    // kubelet kills a container whose postStart hook failed; the restart
                    // policy decides what comes next.
                    warn!(pod = %self.name(), container = %c.name, error = %e, "postStart hook failed");
                    self.event(true, "FailedPostStartHook", format!("PostStartHook failed: {e}"));
                    let runtime = self.ctx.runtime.clone();
                    let grace = self.grace();
                    tokio::spawn(async move {
                        let _ = runtime.stop_container(&id, grace).await;
                    });
                }
            }
            Err((reason, message)) => {
                warn!(pod = %self.name(), container = %c.name, %reason, %message, "container not started");
                let note = if reason.contains("Image") {
                    format!(
                        "Failed to pull image {:?}: {message}",
                        c.image.clone().unwrap_or_default()
                    )
                } else {
                    format!("Error: {message}")
                };
                self.event(true, "Failed", note);
                let tracked = self.containers.get_mut(&c.name).expect("inserted above");
                let pull = reason == "ErrImagePull" || reason == "ImagePullBackOff" || reason == "ErrImageNeverPull";
                let delay = if pull {
                    self.backoff
                        .crashed(&format!("pull:{}", c.name), Instant::now(), Instant::now())
                } else {
                    RETRY
                };
                // After the first failed pull, kubelet says ImagePullBackOff while it waits.
                let reason =
                    if reason == "ErrImagePull" && tracked.waiting.as_ref().is_some_and(|w| w.0.contains("Image")) {
                        "ImagePullBackOff".to_owned()
                    } else {
                        reason
                    };
                tracked.waiting = Some((reason, Some(message)));
                tracked.not_before = Some(Instant::now() + delay);
                // A config error keeps the finished run's record; a restart waits as before.
            }
        }
    }

    /// Creates and starts run `attempt` of `c`. Err: (kubelet's waiting reason, message).
    async fn start(&mut self, c: &Container, init: bool, attempt: u32) -> Result<(String, String), (String, String)> {
        let image = c.image.clone().unwrap_or_default();
        let t0 = Instant::now();
        let present = self.image(c, &image).await?;
        let t_image = t0.elapsed();
        let sources = self
            .env_sources()
            .await
            .map_err(|e| ("CreateContainerConfigError".to_owned(), e))?;
        let services = self.service_env().await;
        let mut facts = self.ctx.facts.clone();
        facts.host_ips = self.ctx.host_ips.clone();
        facts.pod_ips = self
            .sandbox
            .as_ref()
            .and_then(|s| s.ip)
            .map(|ip| vec![ip.to_string()])
            .unwrap_or_else(|| self.ctx.host_ips.clone());
        let env = env::container_env(&self.pod, c, &sources, &facts, &services)
            .map_err(|e| ("CreateContainerConfigError".to_owned(), e))?;
        let sandbox = self.sandbox.clone().expect("sync makes the sandbox first");
        let mut mounts = sandbox.mounts.clone();
        mounts.extend(
            sandbox
                .volumes
                .mounts_for(c, &env)
                .map_err(|e| ("CreateContainerConfigError".to_owned(), e.to_string()))?,
        );
        let setting = PodSetting {
            pod: &self.pod,
            pod_dir: &self.dir,
            network: match &sandbox.netns {
                Some(path) => NetworkNamespace::Path(path.clone()),
                None => NetworkNamespace::Host,
            },
            hostname: sandbox.hostname.clone(),
            mounts,
            cgroup_parent: &self.ctx.cgroup_parent,
        };
        let config = config::container_config(&setting, c, init, attempt, env)
            .map_err(|e| ("CreateContainerConfigError".to_owned(), e))?;
        if let Some(dir) = config.log_path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                (
                    "CreateContainerError".to_owned(),
                    format!("creating {}: {e}", dir.display()),
                )
            })?;
        }
        let t_config = t0.elapsed();
        // A leftover of the same id (a start interrupted by an agent restart) goes first.
        self.delete_container(&config.id).await;
        self.ctx
            .runtime
            .create_container_from(&config, &present)
            .await
            .map_err(|e| ("CreateContainerError".to_owned(), e.to_string()))?;
        if let Err(e) = self.ctx.runtime.start_container(&config.id).await {
            self.delete_container(&config.id).await;
            return Err(("RunContainerError".to_owned(), e.to_string()));
        }
        debug!(pod = %self.name(), container = %c.name, ?t_image, ?t_config, total = ?t0.elapsed(), "container start timings");
        Ok((config.id, format!("{}@{}", present.name, present.digest)))
    }

    /// The container's image by its pull policy, with the pod's imagePullSecrets (the first
    /// that matches the registry, as kubelet tries them).
    async fn image(&self, c: &Container, image: &str) -> Result<runtime::Image, (String, String)> {
        let fail = |e: runtime::Error| {
            let reason = e.image_failure_reason().unwrap_or("ErrImagePull").to_owned();
            (reason, e.to_string())
        };
        let policy = runtime::PullPolicy::for_container(c.image_pull_policy.as_deref(), image).map_err(fail)?;
        let mut secrets = Vec::new();
        let ns = self.pod.namespace().unwrap_or_else(|| "default".into());
        let api: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &ns);
        let names: Vec<String> = self
            .pod
            .spec
            .iter()
            .flat_map(|s| s.image_pull_secrets.iter().flatten())
            .map(|r| r.name.clone())
            .collect();
        for name in names {
            match api.get_opt(&name).await {
                Ok(Some(secret)) => secrets.push(secret),
                // kubelet goes on without a missing pull secret (and warns).
                Ok(None) => warn!(pod = %self.name(), secret = %name, "imagePullSecret not found"),
                Err(e) => warn!(pod = %self.name(), secret = %name, error = %e, "reading an imagePullSecret"),
            }
        }
        let credentials = runtime::registry_credentials(image, &secrets);
        self.ctx
            .runtime
            .ensure_image_with(image, policy, credentials.as_ref())
            .await
            .map_err(fail)
    }

    async fn env_sources(&self) -> Result<EnvSources, String> {
        let (config_maps, secrets) = env::referenced_objects(&self.pod);
        let ns = self.pod.namespace().unwrap_or_else(|| "default".into());
        let mut sources = EnvSources::default();
        let cms: Api<ConfigMap> = Api::namespaced(self.ctx.client.clone(), &ns);
        for name in config_maps {
            let got = cms
                .get_opt(&name)
                .await
                .map_err(|e| format!("reading configmap {name}: {e}"))?;
            sources.config_maps.insert(name, got);
        }
        let secret_api: Api<Secret> = Api::namespaced(self.ctx.client.clone(), &ns);
        for name in secrets {
            let got = secret_api
                .get_opt(&name)
                .await
                .map_err(|e| format!("reading secret {name}: {e}"))?;
            sources.secrets.insert(name, got);
        }
        Ok(sources)
    }

    /// The service variables: the `kubernetes` Service always, the namespace's when
    /// `enableServiceLinks` is not false. A failed list leaves them out (logged).
    async fn service_env(&self) -> Vec<(String, String)> {
        let ns = self.pod.namespace().unwrap_or_else(|| "default".into());
        let links = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.enable_service_links)
            .unwrap_or(true);
        let mut services = Vec::new();
        if links {
            match Api::<Service>::namespaced(self.ctx.client.clone(), &ns)
                .list(&ListParams::default())
                .await
            {
                Ok(list) => services.extend(list.items),
                Err(e) => warn!(pod = %self.name(), error = %e, "listing services for the service variables"),
            }
        }
        if (!links || ns != "default")
            && let Ok(Some(k)) = Api::<Service>::namespaced(self.ctx.client.clone(), "default")
                .get_opt("kubernetes")
                .await
        {
            services.push(k);
        }
        env::service_env(&services)
    }

    /// What the status is computed from.
    fn observation(&self) -> PodObservation {
        let sandbox_ready = self.sandbox.is_some();
        let mut observation = PodObservation {
            sandbox_ready,
            pod_ips: self
                .sandbox
                .as_ref()
                .and_then(|s| s.ip)
                .map(|ip| vec![ip.to_string()])
                .unwrap_or_else(|| {
                    if host_network(&self.pod) && sandbox_ready {
                        self.ctx.host_ips.clone()
                    } else {
                        // A finished pod keeps the IP it had.
                        self.pod
                            .status
                            .as_ref()
                            .and_then(|s| s.pod_ip.clone())
                            .filter(|_| self.released)
                            .into_iter()
                            .collect()
                    }
                }),
            host_ip: self.ctx.host_ips.first().cloned(),
            start_time: self.start_time,
            failed: self.failed.clone(),
            ..PodObservation::default()
        };
        let mut inits_pending = false;
        for (c, init) in self.spec_containers() {
            let o = self.container_observation(&c, init, inits_pending);
            if init {
                let done = matches!(&o.state, ContainerState::Terminated(t) if t.exit_code == 0)
                    || (c.restart_policy.as_deref() == Some("Always")
                        && matches!(o.state, ContainerState::Running { .. }));
                inits_pending |= !done;
                observation.init_containers.push(o);
            } else {
                observation.containers.push(o);
            }
        }
        observation
    }

    fn container_observation(&self, c: &Container, init: bool, inits_pending: bool) -> ContainerObservation {
        let tracked = self.containers.get(&c.name);
        let default_waiting = if self.sandbox.is_none() {
            match &self.sandbox_error {
                Some(e) => ContainerState::Waiting {
                    reason: "ContainerCreating".into(),
                    message: Some(e.clone()),
                },
                None => ContainerState::Waiting {
                    reason: "ContainerCreating".into(),
                    message: None,
                },
            }
        } else if !init && inits_pending {
            ContainerState::Waiting {
                reason: "PodInitializing".into(),
                message: None,
            }
        } else {
            ContainerState::Waiting {
                reason: "ContainerCreating".into(),
                message: None,
            }
        };
        let Some(t) = tracked else {
            return ContainerObservation {
                name: c.name.clone(),
                image: c.image.clone().unwrap_or_default(),
                image_id: String::new(),
                container_id: None,
                state: default_waiting,
                last_termination: None,
                restart_count: 0,
                ready: false,
                started: false,
            };
        };
        let (state, last_termination) = match (&t.run, &t.waiting) {
            (Some(run), Some((reason, message))) if matches!(run.state, ContainerState::Terminated(_)) => {
                let ContainerState::Terminated(term) = &run.state else {
                    unreachable!()
                };
                (
                    ContainerState::Waiting {
                        reason: reason.clone(),
                        message: message.clone(),
                    },
                    Some(term.clone()),
                )
            }
            (Some(run), _) => (run.state.clone(), t.last_termination.clone()),
            (None, Some((reason, message))) => (
                ContainerState::Waiting {
                    reason: reason.clone(),
                    message: message.clone(),
                },
                t.last_termination.clone(),
            ),
            (None, None) => (default_waiting, t.last_termination.clone()),
        };
        let running = matches!(state, ContainerState::Running { .. });
        let (ready, started) = match &t.probe_status {
            Some(p) => (running && p.ready, running && p.started),
            None => (running, running),
        };
        ContainerObservation {
            name: c.name.clone(),
            image: t.image.clone(),
            image_id: t.image_id.clone(),
            container_id: t.run.as_ref().map(|r| format!("containerd://{}", r.id)),
            state,
            last_termination,
            restart_count: t.restart_count,
            ready,
            started,
        }
    }

    async fn write_status(&mut self) {
        let observation = self.observation();
        let status = status::pod_status(&self.pod, &observation, now());
        if self.last_status.as_ref() == Some(&status) || self.gone {
            return;
        }
        // Unchanged but for transition times computed now: nothing to write.
        if let Some(current) = self.pod.status.as_ref().and_then(|s| serde_json::to_value(s).ok())
            && same_status(&current, &status)
        {
            self.last_status = Some(status);
            return;
        }
        let api: Api<Pod> = Api::namespaced(
            self.ctx.client.clone(),
            &self.pod.namespace().unwrap_or_else(|| "default".into()),
        );
        match api
            .patch_status(
                &self.pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await
        {
            Ok(pod) => {
                if pod.uid().as_deref() == Some(self.uid.as_str()) {
                    self.pod = Arc::new(pod);
                }
                self.last_status = Some(status);
            }
            Err(kube::Error::Api(e)) if e.code == 404 => self.gone = true,
            Err(e) => warn!(pod = %self.name(), error = %e, "writing the pod status; retrying"),
        }
    }

    /// Hands the pod's containers to the streaming server's directory.
    fn publish(&self) {
        let containers = self
            .spec_containers()
            .into_iter()
            .map(|(c, _)| {
                let run = self.containers.get(&c.name).and_then(|t| t.run.as_ref());
                ContainerRuntimeInfo {
                    name: c.name.clone(),
                    container_id: run.map(|r| r.id.clone()),
                    running: run.is_some_and(|r| matches!(r.state, ContainerState::Running { .. })),
                    log_path: run.map(|r| config::log_path(&self.dir, &c.name, r.attempt)),
                    previous_log_path: self.containers.get(&c.name).and_then(|t| t.previous_log.clone()),
                }
            })
            .collect();
        let info = PodRuntimeInfo {
            uid: self.uid.clone(),
            netns_path: self.sandbox.as_ref().and_then(|s| s.netns.clone()),
            containers,
            default_container: self
                .pod
                .annotations()
                .get("kubectl.kubernetes.io/default-container")
                .cloned(),
        };
        self.ctx.directory.insert(
            &self.pod.namespace().unwrap_or_else(|| "default".into()),
            &self.pod.name_any(),
            info,
        );
    }

    /// A finished pod's network goes (its IP may serve another pod); its logs stay.
    async fn release_sandbox(&mut self) {
        if self.released {
            return;
        }
        for t in self.containers.values() {
            if let Some(run) = &t.run
                && matches!(run.state, ContainerState::Running { .. })
            {
                return;
            }
        }
        if let Some(network) = &self.ctx.network
            && let Err(e) = network.delete(&self.uid).await
        {
            warn!(pod = %self.name(), error = %e, "removing the network of a finished pod");
            return;
        }
        self.released = true;
        self.sandbox = None;
    }

    /// Graceful termination: every container gets SIGTERM, the grace period, then SIGKILL;
    /// then the sandbox and the pod's files go, and the API object (if it is still there,
    /// marked for deletion) is removed.
    async fn terminate(&mut self) {
        let grace = self.grace();
        info!(pod = %self.name(), ?grace, "stopping the pod");
        // preStop hooks first, all at once, within the grace period; the containers then get
        // what is left of it (at least 2 s, as kubelet gives).
        let started = Instant::now();
        let this = &*self;
        let mut hooks = Vec::new();
        for (c, _) in this.spec_containers() {
            let Some(hook) = c.lifecycle.as_ref().and_then(|l| l.pre_stop.clone()) else {
                continue;
            };
            let Some(id) = this
                .containers
                .get(&c.name)
                .and_then(|t| t.run.as_ref())
                .filter(|r| matches!(r.state, ContainerState::Running { .. }))
                .map(|r| r.id.clone())
            else {
                continue;
            };
            hooks.push(async move {
                let result = this.run_hook(&hook, &c, &id, grace).await;
                (c.name, result)
            });
        }
        let hooked = !hooks.is_empty();
        for (name, result) in futures::future::join_all(hooks).await {
            if let Err(e) = result {
                warn!(pod = %self.name(), container = %name, error = %e, "preStop hook failed");
                self.event(true, "FailedPreStopHook", format!("PreStopHook failed: {e}"));
            }
        }
        let grace = if hooked {
            grace.saturating_sub(started.elapsed()).max(Duration::from_secs(2))
        } else {
            grace
        };
        // App containers first, then sidecars and init containers, as kubelet orders it.
        for init in [false, true] {
            let mut stops = Vec::new();
            for t in self.containers.values().filter(|t| t.init == init) {
                if let Some(run) = &t.run
                    && matches!(run.state, ContainerState::Running { .. })
                {
                    let runtime = self.ctx.runtime.clone();
                    let id = run.id.clone();
                    self.event(
                        false,
                        "Killing",
                        format!("Stopping container {}", name_of(&id, &self.uid)),
                    );
                    stops.push(async move {
                        let stopped = runtime.stop_container(&id, grace).await;
                        (id, stopped)
                    });
                }
            }
            for (id, stopped) in futures::future::join_all(stops).await {
                if let Err(e) = stopped {
                    warn!(pod = %self.name(), container = %id, error = %e, "stopping a container");
                }
                self.delete_container(&id).await;
            }
        }
        // Whatever else containerd holds for the pod (leftovers) goes too.
        if let Ok(left) = self.ctx.runtime.list_pod_containers(&self.uid).await {
            for c in left {
                self.delete_container(&c.id).await;
            }
        }
        cleanup_pod(&self.ctx, &self.uid).await;
        self.ctx.directory.remove(&self.uid);
        if !self.gone {
            let api: Api<Pod> = Api::namespaced(
                self.ctx.client.clone(),
                &self.pod.namespace().unwrap_or_else(|| "default".into()),
            );
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(self.uid.clone()),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match api.delete(&self.pod.name_any(), &params).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                Err(e) => warn!(pod = %self.name(), error = %e, "deleting the terminated pod"),
            }
        }
        info!(pod = %self.name(), "pod stopped and removed from the node");
    }
}

/// Removes what a pod had on the node besides containers: its network, its directory.
pub async fn cleanup_pod(ctx: &Context, uid: &str) {
    if let Some(network) = &ctx.network
        && let Err(e) = network.delete(uid).await
    {
        warn!(pod_uid = uid, error = %e, "removing the pod network");
    }
    // Volumes first: tmpfs mounts come off, and nothing is deleted under a mount.
    if let Err(e) = PodVolumes::teardown(&ctx.pods_dir, uid) {
        warn!(pod_uid = uid, error = %e, "tearing down the pod's volumes; its directory stays");
        return;
    }
    let dir = ctx.pods_dir.join(uid);
    if let Err(e) = std::fs::remove_dir_all(&dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!(pod_uid = uid, error = %e, "removing {}", dir.display());
    }
}

/// The container name in a container id made by [`config::container_id`].
fn name_of<'a>(id: &'a str, uid: &str) -> &'a str {
    id.strip_prefix(uid)
        .and_then(|rest| rest.strip_prefix('-'))
        .and_then(|rest| rest.rsplit_once('-'))
        .map_or(id, |(name, _)| name)
}

fn host_network(pod: &Pod) -> bool {
    pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false)
}

fn write_file(path: &std::path::Path, content: &str) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

fn termination_from_api(t: &k8s_openapi::api::core::v1::ContainerStateTerminated) -> Termination {
    Termination {
        exit_code: t.exit_code,
        signal: t.signal,
        reason: t.reason.clone().unwrap_or_default(),
        message: t.message.clone(),
        started_at: ts(&t.started_at),
        finished_at: ts(&t.finished_at).unwrap_or_else(now),
        container_id: t.container_id.clone(),
    }
}

/// Whether two statuses differ only in the condition transition times a rewrite would
/// refresh (they are kept while a condition holds, so equal otherwise).
fn same_status(current: &Value, new: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(conditions) = v.get_mut("conditions").and_then(Value::as_array_mut) {
            for c in conditions {
                if let Some(c) = c.as_object_mut() {
                    c.remove("lastTransitionTime");
                    c.remove("lastProbeTime");
                }
            }
        }
        v
    };
    let mut current = strip(current);
    let new = strip(new);
    // Fields the agent does not write (e.g. nominatedNodeName) do not count.
    if let (Some(c), Some(n)) = (current.as_object_mut(), new.as_object()) {
        c.retain(|k, _| n.contains_key(k));
    }
    current == new
}
