//! The scheduler: binds every unscheduled Pod of `default-scheduler` to a Node through
//! `pods/binding`, or marks it `PodScheduled=False` (Unschedulable) with an Event saying why.
//! It decides in memory over reflector caches and writes only bindings, Pod status and Events.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    Node, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod, PodCondition, Taint, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::Notify;

use super::events::{EventType, Recorder};
use super::{Error, Result, is_status};

pub const SCHEDULER_NAME: &str = "default-scheduler";
/// What scoring assumes for a container without requests, as kube-scheduler does, so that
/// request-less pods still spread by load.
const DEFAULT_CPU_MILLI: i64 = 100;
const DEFAULT_MEMORY: i64 = 200 * 1024 * 1024;
/// Bindings in flight at once.
const BIND_CONCURRENCY: usize = 64;

/// A quantity in its base unit (cores, bytes, count), for the suffixes Kubernetes writes:
/// `m`, `k`/`M`/`G`/`T`/`P`/`E`, `Ki`/`Mi`/`Gi`/`Ti`/`Pi`/`Ei`, exponents (`1e3`) and plain numbers.
pub fn parse_quantity(q: &str) -> Option<f64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        s if s.starts_with(['e', 'E']) => 10f64.powi(s[1..].parse().ok()?),
        _ => return None,
    };
    Some(number * factor)
}

/// CPU in millicores and memory in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu_milli: i64,
    pub memory: i64,
}

impl Resources {
    fn from_map(map: Option<&BTreeMap<String, Quantity>>) -> Resources {
        let get = |k: &str| map.and_then(|m| m.get(k)).and_then(|q| parse_quantity(&q.0));
        Resources {
            cpu_milli: get("cpu").map_or(0, |c| (c * 1000.0).ceil() as i64),
            memory: get("memory").map_or(0, |m| m.ceil() as i64),
        }
    }

    fn add(self, o: Resources) -> Resources {
        Resources {
            cpu_milli: self.cpu_milli + o.cpu_milli,
            memory: self.memory + o.memory,
        }
    }

    fn max(self, o: Resources) -> Resources {
        Resources {
            cpu_milli: self.cpu_milli.max(o.cpu_milli),
            memory: self.memory.max(o.memory),
        }
    }
}

/// What a pod asks for: the sum over its containers, at least any one init container, plus
/// its overhead. `nonzero` substitutes the scoring defaults for containers that ask for nothing.
fn requests(pod: &Pod, nonzero: bool) -> Resources {
    let Some(spec) = pod.spec.as_ref() else {
        return Resources::default();
    };
    let of = |c: &k8s_openapi::api::core::v1::Container| {
        let mut r = Resources::from_map(c.resources.as_ref().and_then(|r| r.requests.as_ref()));
        if nonzero {
            if r.cpu_milli == 0 {
                r.cpu_milli = DEFAULT_CPU_MILLI;
            }
            if r.memory == 0 {
                r.memory = DEFAULT_MEMORY;
            }
        }
        r
    };
    let containers = spec
        .containers
        .iter()
        .map(of)
        .fold(Resources::default(), Resources::add);
    let init = spec
        .init_containers
        .iter()
        .flatten()
        .map(of)
        .fold(Resources::default(), Resources::max);
    containers.max(init).add(Resources::from_map(spec.overhead.as_ref()))
}

/// A pod's requests, exactly and as scoring counts them.
#[derive(Debug, Clone, Copy, Default)]
pub struct PodLoad {
    pub exact: Resources,
    pub nonzero: Resources,
}

impl PodLoad {
    pub fn of(pod: &Pod) -> PodLoad {
        PodLoad {
            exact: requests(pod, false),
            nonzero: requests(pod, true),
        }
    }
}

/// A node and what is already bound to it.
#[derive(Debug, Clone)]
pub struct NodeState {
    pub node: Arc<Node>,
    pub requested: Resources,
    pub requested_nonzero: Resources,
    pub pods: i64,
    /// Bound pods per controller owner uid, for spreading.
    pub by_owner: HashMap<String, i64>,
}

impl NodeState {
    pub fn new(node: Arc<Node>) -> NodeState {
        NodeState {
            node,
            requested: Resources::default(),
            requested_nonzero: Resources::default(),
            pods: 0,
            by_owner: HashMap::new(),
        }
    }

    pub fn name(&self) -> String {
        self.node.name_any()
    }

    /// Counts `pod` as running here.
    pub fn add(&mut self, pod: &Pod, load: PodLoad) {
        self.requested = self.requested.add(load.exact);
        self.requested_nonzero = self.requested_nonzero.add(load.nonzero);
        self.pods += 1;
        if let Some(uid) = controller_uid(pod) {
            *self.by_owner.entry(uid).or_default() += 1;
        }
    }

    fn allocatable(&self) -> (Resources, Option<i64>) {
        let status = self.node.status.as_ref();
        let alloc = status.and_then(|s| s.allocatable.as_ref().or(s.capacity.as_ref()));
        let pods = alloc
            .and_then(|a| a.get("pods"))
            .and_then(|q| parse_quantity(&q.0))
            .map(|p| p as i64);
        (Resources::from_map(alloc), pods)
    }
}

fn controller_uid(pod: &Pod) -> Option<String> {
    pod.owner_references()
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.clone())
}

/// Whether this scheduler should place `pod` now.
pub fn is_pending(pod: &Pod) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return false;
    };
    spec.node_name.as_deref().unwrap_or("").is_empty()
        && spec.scheduler_name.as_deref().unwrap_or(SCHEDULER_NAME) == SCHEDULER_NAME
        && pod.metadata.deletion_timestamp.is_none()
        && !is_finished(pod)
}

fn is_finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// The node a bound, unfinished pod occupies.
pub fn bound_node(pod: &Pod) -> Option<&str> {
    let node = pod.spec.as_ref()?.node_name.as_deref().filter(|n| !n.is_empty())?;
    (!is_finished(pod)).then_some(node)
}

/// Why one node does not fit, in kube-scheduler's words.
fn misfits(pod: &Pod, load: &PodLoad, n: &NodeState) -> Vec<String> {
    let node = &n.node;
    let spec = node.spec.as_ref();
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    if !ready {
        return vec!["node(s) were not ready".into()];
    }
    let pod_spec = pod.spec.as_ref();
    let tolerations = pod_spec.and_then(|s| s.tolerations.as_deref()).unwrap_or_default();
    if spec.and_then(|s| s.unschedulable) == Some(true) {
        let tolerated = tolerations.iter().any(|t| {
            tolerates(
                t,
                &Taint {
                    key: "node.kubernetes.io/unschedulable".into(),
                    effect: "NoSchedule".into(),
                    ..Default::default()
                },
            )
        });
        if !tolerated {
            return vec!["node(s) were unschedulable".into()];
        }
    }
    if !matches_node_selector(pod, node) {
        return vec!["node(s) didn't match Pod's node affinity/selector".into()];
    }
    let taints = spec.and_then(|s| s.taints.as_deref()).unwrap_or_default();
    if let Some(t) = taints
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .find(|t| !tolerations.iter().any(|tol| tolerates(tol, t)))
    {
        return vec![format!(
            "node(s) had untolerated taint {{{}: {}}}",
            t.key,
            t.value.as_deref().unwrap_or("")
        )];
    }
    let (alloc, max_pods) = n.allocatable();
    let mut reasons = Vec::new();
    if max_pods.is_some_and(|m| n.pods + 1 > m) {
        reasons.push("Too many pods".into());
    }
    if load.exact.cpu_milli > 0 && n.requested.cpu_milli + load.exact.cpu_milli > alloc.cpu_milli {
        reasons.push("Insufficient cpu".into());
    }
    if load.exact.memory > 0 && n.requested.memory + load.exact.memory > alloc.memory {
        reasons.push("Insufficient memory".into());
    }
    reasons
}

/// Whether toleration `t` tolerates `taint`.
pub fn tolerates(t: &Toleration, taint: &Taint) -> bool {
    if t.effect.as_deref().is_some_and(|e| !e.is_empty() && e != taint.effect) {
        return false;
    }
    let key = t.key.as_deref().unwrap_or("");
    match t.operator.as_deref().unwrap_or("Equal") {
        "Exists" => key.is_empty() || key == taint.key,
        _ => key == taint.key && t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or(""),
    }
}

/// nodeSelector and required node affinity.
pub fn matches_node_selector(pod: &Pod, node: &Node) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return true;
    };
    let labels = node.labels();
    if let Some(sel) = &spec.node_selector
        && !sel.iter().all(|(k, v)| labels.get(k) == Some(v))
    {
        return false;
    }
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| a.required_during_scheduling_ignored_during_execution.as_ref());
    required.is_none_or(|r| node_selector_matches(r, node))
}

/// Whether any of the selector's terms matches `node` (the terms are ORed).
pub fn node_selector_matches(selector: &NodeSelector, node: &Node) -> bool {
    selector.node_selector_terms.iter().any(|t| term_matches(t, node))
}

fn term_matches(term: &NodeSelectorTerm, node: &Node) -> bool {
    let exprs = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    let labels = node.labels();
    let name = node.name_any();
    exprs
        .iter()
        .all(|r| requirement_matches(r, labels.get(&r.key).map(String::as_str)))
        && fields
            .iter()
            .all(|r| requirement_matches(r, (r.key == "metadata.name").then_some(name.as_str())))
}

fn requirement_matches(r: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    let number = |s: &str| s.parse::<i64>().ok();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" => matches!((value.and_then(number), values.first().and_then(|x| number(x))), (Some(v), Some(x)) if v > x),
        "Lt" => matches!((value.and_then(number), values.first().and_then(|x| number(x))), (Some(v), Some(x)) if v < x),
        _ => false,
    }
}

/// Higher is better: least allocated (0-100) plus spreading of the pod's controller (0-100).
fn score(pod: &Pod, load: &PodLoad, n: &NodeState, max_same_owner: i64) -> i64 {
    let (alloc, _) = n.allocatable();
    let free = |cap: i64, used: i64| {
        if cap <= 0 { 0 } else { ((cap - used).max(0) * 100) / cap }
    };
    let least_allocated = (free(alloc.cpu_milli, n.requested_nonzero.cpu_milli + load.nonzero.cpu_milli)
        + free(alloc.memory, n.requested_nonzero.memory + load.nonzero.memory))
        / 2;
    let spread = match controller_uid(pod) {
        Some(uid) if max_same_owner > 0 => {
            let here = n.by_owner.get(&uid).copied().unwrap_or(0);
            (max_same_owner - here) * 100 / max_same_owner
        }
        _ => 100,
    };
    least_allocated + spread
}

/// Where a pod goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Index into the nodes given.
    Bind(usize),
    /// kube-scheduler's message, e.g. `0/3 nodes are available: 1 Insufficient cpu, 2 node(s)
    /// had untolerated taint {dedicated: gpu}.`
    Unschedulable(String),
}

/// Filters then scores `nodes` for `pod`; ties go to the node that sorts first by name.
pub fn schedule(pod: &Pod, nodes: &[NodeState]) -> Decision {
    let load = PodLoad::of(pod);
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut fitting = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let why = misfits(pod, &load, n);
        if why.is_empty() {
            fitting.push(i);
        }
        for r in why {
            *reasons.entry(r).or_default() += 1;
        }
    }
    if fitting.is_empty() {
        let mut parts: Vec<String> = reasons.into_iter().map(|(r, c)| format!("{c} {r}")).collect();
        parts.sort();
        let detail = if parts.is_empty() {
            String::new()
        } else {
            format!(": {}", parts.join(", "))
        };
        return Decision::Unschedulable(format!("0/{} nodes are available{detail}.", nodes.len()));
    }
    let owner = controller_uid(pod);
    let max_same_owner = owner.as_ref().map_or(0, |uid| {
        fitting
            .iter()
            .map(|&i| nodes[i].by_owner.get(uid).copied().unwrap_or(0))
            .max()
            .unwrap_or(0)
    });
    let best = fitting
        .into_iter()
        .map(|i| (score(pod, &load, &nodes[i], max_same_owner), i))
        .max_by(|(sa, a), (sb, b)| sa.cmp(sb).then_with(|| nodes[*b].name().cmp(&nodes[*a].name())))
        .map(|(_, i)| i)
        .expect("at least one fitting node");
    Decision::Bind(best)
}

/// Every node with what the bound pods (and those bound by this scheduler but not yet seen in
/// the cache, `assumed`) take of it.
pub fn node_states(
    nodes: &[Arc<Node>],
    pods: &[Arc<Pod>],
    assumed: &HashMap<String, (String, PodLoad, Option<String>)>,
) -> Vec<NodeState> {
    let mut states: Vec<NodeState> = nodes.iter().cloned().map(NodeState::new).collect();
    states.sort_by_key(|s| s.name());
    let index: HashMap<String, usize> = states.iter().enumerate().map(|(i, s)| (s.name(), i)).collect();
    for pod in pods {
        if let Some(i) = bound_node(pod).and_then(|n| index.get(n)) {
            states[*i].add(pod, PodLoad::of(pod));
        }
    }
    for (node, load, owner) in assumed.values() {
        if let Some(&i) = index.get(node) {
            let s = &mut states[i];
            s.requested = s.requested.add(load.exact);
            s.requested_nonzero = s.requested_nonzero.add(load.nonzero);
            s.pods += 1;
            if let Some(uid) = owner {
                *s.by_owner.entry(uid.clone()).or_default() += 1;
            }
        }
    }
    states
}

/// The PodScheduled=False condition to write, unless the pod already carries it.
pub fn unschedulable_condition(pod: &Pod, message: &str) -> Option<Vec<PodCondition>> {
    let conditions = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let current = conditions.iter().find(|c| c.type_ == "PodScheduled");
    if current.is_some_and(|c| {
        c.status == "False" && c.reason.as_deref() == Some("Unschedulable") && c.message.as_deref() == Some(message)
    }) {
        return None;
    }
    let mut out: Vec<PodCondition> = conditions.into_iter().filter(|c| c.type_ != "PodScheduled").collect();
    out.push(PodCondition {
        type_: "PodScheduled".into(),
        status: "False".into(),
        reason: Some("Unschedulable".into()),
        message: Some(message.into()),
        last_transition_time: Some(Time(jiff::Timestamp::now())),
        ..Default::default()
    });
    Some(out)
}

struct Scheduler {
    client: Client,
    recorder: Recorder,
    pods: Store<Pod>,
    nodes: Store<Node>,
    /// Pods bound by us that the cache does not show bound yet: uid → (node, load, owner uid).
    assumed: HashMap<String, (String, PodLoad, Option<String>)>,
}

enum Outcome {
    Bound,
    /// Binding failed: forget the assumption so the next pass reconsiders the pod.
    Failed(String),
}

impl Scheduler {
    /// One pass over every pending pod, oldest first.
    async fn pass(&mut self) -> Result<()> {
        let pods = self.pods.state();
        let nodes = self.nodes.state();
        self.assumed.retain(|uid, _| {
            pods.iter()
                .any(|p| p.uid().as_deref() == Some(uid.as_str()) && is_pending(p))
        });
        let mut states = node_states(&nodes, &pods, &self.assumed);
        let mut pending: Vec<&Arc<Pod>> = pods
            .iter()
            .filter(|p| is_pending(p) && !self.assumed.contains_key(&p.uid().unwrap_or_default()))
            .collect();
        pending.sort_by(|a, b| {
            a.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0)
                .cmp(&b.metadata.creation_timestamp.as_ref().map(|t| t.0))
                .then_with(|| a.name_any().cmp(&b.name_any()))
        });
        let mut binds = Vec::new();
        for pod in pending {
            match schedule(pod, &states) {
                Decision::Bind(i) => {
                    let load = PodLoad::of(pod);
                    states[i].add(pod, load);
                    let node = states[i].name();
                    self.assumed
                        .insert(pod.uid().unwrap_or_default(), (node.clone(), load, controller_uid(pod)));
                    binds.push(bind(self.client.clone(), self.recorder.clone(), pod.clone(), node));
                }
                Decision::Unschedulable(message) => self.mark_unschedulable(pod, message).await?,
            }
        }
        let outcomes: Vec<Outcome> = futures::stream::iter(binds)
            .buffer_unordered(BIND_CONCURRENCY)
            .collect()
            .await;
        for o in outcomes {
            if let Outcome::Failed(uid) = o {
                self.assumed.remove(&uid);
            }
        }
        Ok(())
    }

    async fn mark_unschedulable(&self, pod: &Pod, message: String) -> Result<()> {
        let Some(conditions) = unschedulable_condition(pod, &message) else {
            return Ok(());
        };
        let ns = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        tracing::info!(namespace = %ns, pod = %name, %message, "pod is unschedulable");
        let patch = json!({"status": {"conditions": conditions}});
        match Api::<Pod>::namespaced(self.client.clone(), &ns)
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            Err(e) if is_status(&e, 404) || is_status(&e, 409) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        self.recorder
            .publish(pod, EventType::Warning, "FailedScheduling", &message)
            .await;
        Ok(())
    }
}

async fn bind(client: Client, recorder: Recorder, pod: Arc<Pod>, node: String) -> Outcome {
    let ns = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let binding = json!({
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": name, "namespace": ns, "uid": pod.uid()},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    });
    let result: kube::Result<serde_json::Value> = Api::<Pod>::namespaced(client.clone(), &ns)
        .create_subresource("binding", &name, &PostParams::default(), &binding)
        .await;
    match result {
        Ok(_) => {
            tracing::debug!(namespace = %ns, pod = %name, node = %node, "bound");
            let message = format!("Successfully assigned {ns}/{name} to {node}");
            tokio::spawn(async move {
                recorder
                    .publish(pod.as_ref(), EventType::Normal, "Scheduled", &message)
                    .await
            });
            Outcome::Bound
        }
        Err(e) => {
            tracing::warn!(namespace = %ns, pod = %name, node = %node, error = %e, "binding failed");
            Outcome::Failed(pod.uid().unwrap_or_default())
        }
    }
}

pub async fn run(client: Client) -> Result<()> {
    let (pods, pod_writer) = reflector::store::<Pod>();
    let (nodes, node_writer) = reflector::store::<Node>();
    let changed = Arc::new(Notify::new());
    let pod_events = reflector(
        pod_writer,
        watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff()
    .map(|_| ());
    let node_events = reflector(
        node_writer,
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff()
    .map(|_| ());
    let notify = changed.clone();
    let watching = tokio::spawn(async move {
        futures::stream::select(pod_events, node_events)
            .for_each(|()| {
                notify.notify_one();
                futures::future::ready(())
            })
            .await;
    });
    let mut scheduler = Scheduler {
        recorder: Recorder::new(client.clone(), SCHEDULER_NAME),
        client,
        pods: pods.clone(),
        nodes: nodes.clone(),
        assumed: HashMap::new(),
    };
    let ready = async {
        pods.wait_until_ready().await.ok();
        nodes.wait_until_ready().await.ok();
    };
    ready.await;
    let result = loop {
        if watching.is_finished() {
            break Err(Error::Ended("the scheduler's watches"));
        }
        if let Err(e) = scheduler.pass().await {
            tracing::warn!(error = %e, "scheduling pass failed");
        }
        // Unschedulable pods are retried on every pod or node change, and at least every 30 s.
        let _ = tokio::time::timeout(Duration::from_secs(30), changed.notified()).await;
    };
    watching.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        Affinity, Container, NodeAffinity, NodeCondition, NodeSpec, NodeStatus, PodSpec,
        ResourceRequirements,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use kube::api::ObjectMeta;

    fn node(name: &str, cpu: &str, memory: &str) -> NodeState {
        let alloc: BTreeMap<String, Quantity> = [("cpu", cpu), ("memory", memory), ("pods", "110")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), Quantity(v.into())))
            .collect();
        NodeState::new(Arc::new(Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some([("kubernetes.io/hostname".to_string(), name.to_string())].into()),
                ..Default::default()
            },
            spec: Some(NodeSpec::default()),
            status: Some(NodeStatus {
                allocatable: Some(alloc.clone()),
                capacity: Some(alloc),
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }))
    }

    fn with_node(mut n: NodeState, f: impl FnOnce(&mut Node)) -> NodeState {
        f(Arc::make_mut(&mut n.node));
        n
    }

    fn pod(cpu: &str, memory: &str) -> Pod {
        let requests: BTreeMap<String, Quantity> = [("cpu", cpu), ("memory", memory)]
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (k.to_string(), Quantity(v.into())))
            .collect();
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "c".into(),
                    resources: Some(ResourceRequirements {
                        requests: Some(requests),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn bound_to(nodes: &[NodeState], d: Decision) -> String {
        match d {
            Decision::Bind(i) => nodes[i].name(),
            Decision::Unschedulable(m) => panic!("unschedulable: {m}"),
        }
    }

    fn taint(key: &str, value: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            value: Some(value.into()),
            effect: effect.into(),
            ..Default::default()
        }
    }

    #[test]
    fn quantities_parse_in_their_common_forms() {
        assert_eq!(parse_quantity("500m"), Some(0.5));
        assert_eq!(parse_quantity("2"), Some(2.0));
        assert_eq!(parse_quantity("1.5"), Some(1.5));
        assert_eq!(parse_quantity("128Mi"), Some(128.0 * 1024.0 * 1024.0));
        assert_eq!(parse_quantity("1Gi"), Some(1024f64.powi(3)));
        assert_eq!(parse_quantity("4Ki"), Some(4096.0));
        assert_eq!(parse_quantity("1G"), Some(1e9));
        assert_eq!(parse_quantity("5k"), Some(5000.0));
        assert_eq!(parse_quantity("1e3"), Some(1000.0));
        assert_eq!(parse_quantity("12x"), None);
    }

    #[test]
    fn requests_sum_containers_and_cover_the_largest_init_container() {
        let mut p = pod("250m", "64Mi");
        let spec = p.spec.as_mut().unwrap();
        spec.containers.push(spec.containers[0].clone());
        let mut init = spec.containers[0].clone();
        init.resources.as_mut().unwrap().requests = Some([("cpu".to_string(), Quantity("1".into()))].into());
        spec.init_containers = Some(vec![init]);
        let r = requests(&p, false);
        assert_eq!(r.cpu_milli, 1000);
        assert_eq!(r.memory, 128 * 1024 * 1024);
    }

    #[test]
    fn a_pod_goes_to_the_least_allocated_node() {
        let mut busy = node("a", "4", "8Gi");
        busy.add(&pod("3", "1Gi"), PodLoad::of(&pod("3", "1Gi")));
        let nodes = vec![busy, node("b", "4", "8Gi")];
        assert_eq!(bound_to(&nodes, schedule(&pod("500m", "1Gi"), &nodes)), "b");
    }

    #[test]
    fn requests_beyond_what_is_left_do_not_fit() {
        let mut busy = node("a", "2", "8Gi");
        busy.add(&pod("1500m", ""), PodLoad::of(&pod("1500m", "")));
        let nodes = vec![busy, node("b", "1", "8Gi"), node("c", "4", "1Gi")];
        assert_eq!(
            schedule(&pod("2", "2Gi"), &nodes),
            Decision::Unschedulable("0/3 nodes are available: 1 Insufficient memory, 2 Insufficient cpu.".into())
        );
        // (Reasons sort as strings, as in kube-scheduler.) a has half a core left; b and c fit exactly, b with more left over.
        assert_eq!(bound_to(&nodes, schedule(&pod("1", "1Gi"), &nodes)), "b");
    }

    #[test]
    fn the_pod_count_is_limited_by_allocatable_pods() {
        let n = with_node(node("a", "4", "8Gi"), |n| {
            let alloc = n.status.as_mut().unwrap().allocatable.as_mut().unwrap();
            alloc.insert("pods".into(), Quantity("1".into()));
        });
        let mut n = n;
        n.add(&pod("", ""), PodLoad::of(&pod("", "")));
        assert_eq!(
            schedule(&pod("", ""), &[n]),
            Decision::Unschedulable("0/1 nodes are available: 1 Too many pods.".into())
        );
    }

    #[test]
    fn not_ready_and_cordoned_nodes_are_skipped() {
        let not_ready = with_node(node("a", "4", "8Gi"), |n| {
            n.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].status = "False".into();
        });
        let cordoned = with_node(node("b", "4", "8Gi"), |n| {
            n.spec.as_mut().unwrap().unschedulable = Some(true)
        });
        let nodes = vec![not_ready, cordoned];
        assert_eq!(
            schedule(&pod("", ""), &nodes),
            Decision::Unschedulable(
                "0/2 nodes are available: 1 node(s) were not ready, 1 node(s) were unschedulable.".into()
            )
        );
    }

    #[test]
    fn node_selector_and_required_affinity_pick_matching_nodes() {
        let ssd = with_node(node("b", "4", "8Gi"), |n| {
            n.metadata.labels.as_mut().unwrap().insert("disk".into(), "ssd".into());
        });
        let nodes = vec![node("a", "4", "8Gi"), ssd];
        let mut p = pod("", "");
        p.spec.as_mut().unwrap().node_selector = Some([("disk".to_string(), "ssd".to_string())].into());
        assert_eq!(bound_to(&nodes, schedule(&p, &nodes)), "b");

        let affinity = |op: &str, values: &[&str]| {
            let mut p = pod("", "");
            p.spec.as_mut().unwrap().affinity = Some(Affinity {
                node_affinity: Some(NodeAffinity {
                    required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                        node_selector_terms: vec![NodeSelectorTerm {
                            match_expressions: Some(vec![NodeSelectorRequirement {
                                key: "disk".into(),
                                operator: op.into(),
                                values: Some(values.iter().map(|v| v.to_string()).collect()),
                            }]),
                            ..Default::default()
                        }],
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
            p
        };
        assert_eq!(
            bound_to(&nodes, schedule(&affinity("In", &["ssd", "nvme"]), &nodes)),
            "b"
        );
        assert_eq!(bound_to(&nodes, schedule(&affinity("NotIn", &["ssd"]), &nodes)), "a");
        assert_eq!(bound_to(&nodes, schedule(&affinity("Exists", &[]), &nodes)), "b");
        assert_eq!(bound_to(&nodes, schedule(&affinity("DoesNotExist", &[]), &nodes)), "a");
        assert_eq!(
            schedule(&affinity("In", &["hdd"]), &nodes),
            Decision::Unschedulable(
                "0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector.".into()
            )
        );
    }

    #[test]
    fn untolerated_taints_repel_and_tolerations_admit() {
        let gpu = with_node(node("a", "4", "8Gi"), |n| {
            n.spec.as_mut().unwrap().taints = Some(vec![taint("dedicated", "gpu", "NoSchedule")]);
        });
        let draining = with_node(node("b", "4", "8Gi"), |n| {
            n.spec.as_mut().unwrap().taints = Some(vec![taint("maintenance", "", "NoExecute")]);
        });
        let soft = with_node(node("c", "1", "1Gi"), |n| {
            n.spec.as_mut().unwrap().taints = Some(vec![taint("x", "y", "PreferNoSchedule")]);
        });
        let nodes = vec![gpu.clone(), draining.clone(), soft];
        // PreferNoSchedule never filters, even onto the smallest node.
        assert_eq!(bound_to(&nodes, schedule(&pod("", ""), &nodes)), "c");

        let nodes = vec![gpu, draining];
        assert_eq!(
            schedule(&pod("", ""), &nodes),
            Decision::Unschedulable(
                "0/2 nodes are available: 1 node(s) had untolerated taint {dedicated: gpu}, 1 node(s) had untolerated taint {maintenance: }.".into()
            )
        );
        let mut p = pod("", "");
        p.spec.as_mut().unwrap().tolerations = Some(vec![Toleration {
            key: Some("dedicated".into()),
            operator: Some("Equal".into()),
            value: Some("gpu".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        }]);
        assert_eq!(bound_to(&nodes, schedule(&p, &nodes)), "a");
        p.spec.as_mut().unwrap().tolerations = Some(vec![Toleration {
            operator: Some("Exists".into()),
            ..Default::default()
        }]);
        assert!(matches!(schedule(&p, &nodes), Decision::Bind(_)));
    }

    #[test]
    fn pods_of_one_controller_spread_over_nodes() {
        let owned = |uid: &str| {
            let mut p = pod("", "");
            p.metadata.owner_references = Some(vec![OwnerReference {
                api_version: "apps/v1".into(),
                kind: "ReplicaSet".into(),
                name: "rs".into(),
                uid: uid.into(),
                controller: Some(true),
                ..Default::default()
            }]);
            p
        };
        let mut nodes = vec![
            node("a", "64", "256Gi"),
            node("b", "64", "256Gi"),
            node("c", "64", "256Gi"),
        ];
        let mut placed = Vec::new();
        for _ in 0..6 {
            let p = owned("rs-1");
            let Decision::Bind(i) = schedule(&p, &nodes) else {
                panic!()
            };
            nodes[i].add(&p, PodLoad::of(&p));
            placed.push(nodes[i].name());
        }
        placed.sort();
        assert_eq!(placed, ["a", "a", "b", "b", "c", "c"]);
    }

    #[test]
    fn an_unschedulable_condition_is_written_once_per_message() {
        let mut p = pod("", "");
        let conditions = unschedulable_condition(&p, "0/1 nodes are available.").expect("a condition");
        p.status = Some(k8s_openapi::api::core::v1::PodStatus {
            conditions: Some(conditions),
            ..Default::default()
        });
        assert!(unschedulable_condition(&p, "0/1 nodes are available.").is_none());
        assert!(unschedulable_condition(&p, "0/2 nodes are available.").is_some());
    }

    #[test]
    fn only_unbound_pods_of_this_scheduler_are_pending() {
        let mut p = pod("", "");
        assert!(is_pending(&p));
        p.spec.as_mut().unwrap().scheduler_name = Some("other".into());
        assert!(!is_pending(&p));
        p.spec.as_mut().unwrap().scheduler_name = Some(SCHEDULER_NAME.into());
        p.spec.as_mut().unwrap().node_name = Some("a".into());
        assert!(!is_pending(&p));
    }
}
