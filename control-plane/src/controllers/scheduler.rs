//! The scheduler: binds every unscheduled Pod of `default-scheduler` to a Node through
//! `pods/binding`, or marks it `PodScheduled=False` (Unschedulable) with an Event saying why.
//! It decides in memory over reflector caches and writes only bindings, Pod status, Events and
//! the selected-node annotation of claims that wait for their first consumer.

mod affinity;
mod volumes;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    Namespace, Node, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, PersistentVolume, PersistentVolumeClaim,
    Pod, PodCondition, Taint, Toleration,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::Notify;

use super::events::{EventType, Recorder};
use super::volume::SELECTED_NODE;
use super::{Error, Result, controller_of, is_status};
pub use affinity::{NamespaceLabels, PlacedPods, PodAffinity};
pub use volumes::{ClaimsOnNode, PodVolumes, Storage, claims_on_node};

pub const SCHEDULER_NAME: &str = "default-scheduler";
/// What scoring assumes for a container without requests, as kube-scheduler does, so that
/// request-less pods still spread by load.
const DEFAULT_CPU_MILLI: i64 = 100;
const DEFAULT_MEMORY: i64 = 200 * 1024 * 1024;
/// The shortest time between two scheduling passes.
const MIN_PASS_INTERVAL: Duration = Duration::from_millis(20);
/// How often the message of a pod already reported unschedulable may be rewritten.
const REMARK_INTERVAL: Duration = Duration::from_secs(30);
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
    /// The node's allocatable resources and pod count, parsed once (they are read for every pod).
    alloc: (Resources, Option<i64>),
}

impl NodeState {
    pub fn new(node: Arc<Node>) -> NodeState {
        let status = node.status.as_ref();
        let alloc = status.and_then(|s| s.allocatable.as_ref().or(s.capacity.as_ref()));
        let pods = alloc
            .and_then(|a| a.get("pods"))
            .and_then(|q| parse_quantity(&q.0))
            .map(|p| p as i64);
        let alloc = (Resources::from_map(alloc), pods);
        NodeState {
            node,
            requested: Resources::default(),
            requested_nonzero: Resources::default(),
            pods: 0,
            by_owner: HashMap::new(),
            alloc,
        }
    }

    pub fn name(&self) -> String {
        self.node.name_any()
    }

    fn name_str(&self) -> &str {
        self.node.metadata.name.as_deref().unwrap_or("")
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
        self.alloc
    }
}

fn controller_uid(pod: &Pod) -> Option<String> {
    controller_of(pod).map(|o| o.uid.clone())
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

/// The summed weights of the preferred node affinity terms `node` matches.
fn preferred_node_affinity(pod: &Pod, node: &Node) -> i64 {
    pod.spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| a.preferred_during_scheduling_ignored_during_execution.as_ref())
        .into_iter()
        .flatten()
        .filter(|t| term_matches(&t.preference, node))
        .map(|t| i64::from(t.weight))
        .sum()
}

/// Higher is better: least allocated (0-100) plus spreading of the pod's controller (0-100).
fn score(owner: Option<&str>, load: &PodLoad, n: &NodeState, max_same_owner: i64) -> i64 {
    let (alloc, _) = n.allocatable();
    let free = |cap: i64, used: i64| {
        if cap <= 0 { 0 } else { ((cap - used).max(0) * 100) / cap }
    };
    let least_allocated = (free(alloc.cpu_milli, n.requested_nonzero.cpu_milli + load.nonzero.cpu_milli)
        + free(alloc.memory, n.requested_nonzero.memory + load.nonzero.memory))
        / 2;
    let spread = match owner {
        Some(uid) if max_same_owner > 0 => {
            let here = n.by_owner.get(uid).copied().unwrap_or(0);
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

/// What scheduling needs besides the nodes: claims and volumes, namespace labels, and the pods
/// placed on the nodes (indexed as the nodes passed to `schedule`).
#[derive(Default)]
pub struct Cluster {
    pub storage: Storage,
    pub namespaces: NamespaceLabels,
    pub placed: PlacedPods,
}

/// kube-scheduler's default weights of the node affinity and inter-pod affinity scores, relative
/// to the resource and spreading scores (weight 1 each).
const NODE_AFFINITY_WEIGHT: i64 = 2;
const POD_AFFINITY_WEIGHT: i64 = 2;

/// How many fitting nodes to find before scoring, as kube-scheduler's adaptive
/// percentageOfNodesToScore: all of up to 100 nodes, then a share falling from 50% to 5%.
pub fn nodes_to_find(total: usize) -> usize {
    if total <= 100 {
        return total;
    }
    let percent = (50 - (total / 125) as i64).max(5) as usize;
    (total * percent / 100).max(100)
}

/// Filters then scores `nodes` for `pod`; ties go to the node that sorts first by name.
pub fn schedule(pod: &Pod, nodes: &[NodeState], cluster: &Cluster) -> Decision {
    schedule_from(pod, nodes, cluster, 0)
}

/// [`schedule`], filtering from node `start` on and scoring the first [`nodes_to_find`] nodes
/// that fit (rotating `start` spreads the search, as kube-scheduler's nextStartNodeIndex does).
pub fn schedule_from(pod: &Pod, nodes: &[NodeState], cluster: &Cluster, start: usize) -> Decision {
    let load = PodLoad::of(pod);
    let mut volumes = match PodVolumes::of(pod, &cluster.storage) {
        Ok(v) => v,
        Err(why) => return Decision::Unschedulable(format!("0/{} nodes are available: {why}.", nodes.len())),
    };
    // A node selected for a waiting claim that has since gone is no longer binding.
    if let Some(n) = volumes.selected.as_deref()
        && !nodes.iter().any(|s| s.name_str() == n)
    {
        volumes.selected = None;
    }
    let affinity = PodAffinity::new(pod, nodes, &cluster.placed, &cluster.namespaces);
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut fitting = Vec::new();
    let enough = nodes_to_find(nodes.len());
    let start = if nodes.is_empty() { 0 } else { start % nodes.len() };
    for i in (start..nodes.len()).chain(0..start) {
        if fitting.len() >= enough {
            break;
        }
        let n = &nodes[i];
        let mut why = misfits(pod, &load, n);
        if why.is_empty()
            && let Some(r) = volumes
                .misfit(&n.node, &cluster.storage)
                .or_else(|| affinity.misfit(&n.node))
        {
            why.push(r.to_string());
        }
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
    // Preferences are normalized over the fitting nodes, as kube-scheduler's NormalizeScore does:
    // node affinity to 0-100 of the best match, inter-pod affinity to 0-100 between the extremes.
    let node_pref: Vec<i64> = fitting
        .iter()
        .map(|&i| preferred_node_affinity(pod, &nodes[i].node))
        .collect();
    let max_node_pref = node_pref.iter().copied().max().unwrap_or(0);
    let pod_pref: Vec<i64> = if affinity.has_scores() {
        fitting.iter().map(|&i| affinity.score(&nodes[i].node)).collect()
    } else {
        vec![0; fitting.len()]
    };
    let (lo, hi) = (
        pod_pref.iter().copied().min().unwrap_or(0),
        pod_pref.iter().copied().max().unwrap_or(0),
    );
    let best = fitting
        .into_iter()
        .enumerate()
        .map(|(k, i)| {
            let mut s = score(owner.as_deref(), &load, &nodes[i], max_same_owner);
            if max_node_pref > 0 {
                s += NODE_AFFINITY_WEIGHT * node_pref[k] * 100 / max_node_pref;
            }
            if hi > lo {
                s += POD_AFFINITY_WEIGHT * (pod_pref[k] - lo) * 100 / (hi - lo);
            }
            (s, i)
        })
        .max_by(|(sa, a), (sb, b)| sa.cmp(sb).then_with(|| nodes[*b].name_str().cmp(nodes[*a].name_str())))
        .map(|(_, i)| i)
        .expect("at least one fitting node");
    Decision::Bind(best)
}

/// Every node with what the bound pods (and those bound by this scheduler but not yet seen in
/// the cache, `assumed`) take of it, and those pods indexed for affinity.
/// Pods' loads by uid, kept across passes while the pod's resourceVersion stays the same: with
/// thousands of bound pods, parsing every request again on every pass dominated its cost.
#[derive(Default)]
pub struct LoadCache(HashMap<String, (String, PodLoad)>);

impl LoadCache {
    pub fn load(&mut self, pod: &Pod) -> PodLoad {
        let (Some(uid), Some(rv)) = (pod.metadata.uid.as_ref(), pod.metadata.resource_version.as_ref()) else {
            return PodLoad::of(pod);
        };
        match self.0.get(uid) {
            Some((cached_rv, load)) if cached_rv == rv => *load,
            _ => {
                let load = PodLoad::of(pod);
                self.0.insert(uid.clone(), (rv.clone(), load));
                load
            }
        }
    }

    /// Forgets pods not in `live`.
    pub fn retain(&mut self, live: &HashSet<&str>) {
        self.0.retain(|uid, _| live.contains(uid.as_str()));
    }
}

pub fn node_states(
    nodes: &[Arc<Node>],
    pods: &[Arc<Pod>],
    assumed: &HashMap<String, Assumed>,
    namespaces: &NamespaceLabels,
    loads: &mut LoadCache,
) -> (Vec<NodeState>, PlacedPods) {
    let mut states: Vec<NodeState> = nodes.iter().cloned().map(NodeState::new).collect();
    states.sort_by_key(|s| s.name());
    let index: HashMap<String, usize> = states.iter().enumerate().map(|(i, s)| (s.name(), i)).collect();
    let mut placed = PlacedPods::default();
    let bound = pods.iter().filter_map(|p| Some((p, bound_node(p)?)));
    let assumed = assumed.values().map(|a| (&a.pod, a.node.as_str()));
    for (pod, node) in bound.chain(assumed) {
        if let Some(&i) = index.get(node) {
            states[i].add(pod, loads.load(pod));
            placed.add(pod.clone(), i, namespaces);
        }
    }
    (states, placed)
}

/// The PodScheduled=False condition to write, unless the pod already carries it.
/// What decides whether a pod fits anywhere, for pods whose failure to fit cannot be undone by
/// placing other pods in the same pass (placements only fill nodes and add anti-affinity); None
/// for pods with required pod affinity or claims, which placements can satisfy. Pods of one
/// template share a key, so 10,000 pending replicas cost one search per pass, not 10,000.
fn equivalence_key(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    if spec.affinity.as_ref().is_some_and(|a| a.pod_affinity.is_some()) || volumes::uses_claims(pod) {
        return None;
    }
    let load = PodLoad::of(pod);
    serde_json::to_string(&(
        pod.metadata.namespace.as_deref(),
        &pod.metadata.labels,
        &spec.node_selector,
        &spec.affinity,
        &spec.tolerations,
        &spec.scheduler_name,
        (load.exact.cpu_milli, load.exact.memory),
    ))
    .ok()
}

/// Whether the pod carries `PodScheduled=False`.
fn is_marked_unschedulable(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "PodScheduled" && c.status == "False"))
}

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

/// A pod this scheduler placed that the cache does not show bound yet.
pub struct Assumed {
    pub node: String,
    pub pod: Arc<Pod>,
    /// Placed, but its claims are still being bound on the node: bind when they are.
    awaiting_volumes: bool,
    since: Instant,
}

/// How long a pod waits for its claims to be bound before it is scheduled afresh (kube-scheduler's
/// bind timeout).
const VOLUME_BINDING_TIMEOUT: Duration = Duration::from_secs(600);

struct Scheduler {
    client: Client,
    recorder: Recorder,
    pods: Store<Pod>,
    nodes: Store<Node>,
    claims: Store<PersistentVolumeClaim>,
    volumes: Store<PersistentVolume>,
    classes: Store<StorageClass>,
    namespaces: Store<Namespace>,
    /// By pod uid.
    assumed: HashMap<String, Assumed>,
    /// When each pending pod was last reported unschedulable, by uid.
    marked: HashMap<String, Instant>,
    /// Where the next pod's search for fitting nodes starts.
    next_start: usize,
    loads: LoadCache,
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
        let storage = Storage::new(&self.claims.state(), &self.volumes.state(), &self.classes.state());
        let namespaces: NamespaceLabels = self
            .namespaces
            .state()
            .iter()
            .map(|n| (n.name_any(), n.labels().clone()))
            .collect();
        let live: HashMap<String, &Arc<Pod>> = pods
            .iter()
            .filter(|p| is_pending(p))
            .filter_map(|p| Some((p.uid()?, p)))
            .collect();
        self.assumed.retain(|uid, _| live.contains_key(uid));
        self.marked.retain(|uid, _| live.contains_key(uid));
        // Pods waiting for their claims: bind those whose claims are now bound on their node,
        // schedule again those whose claims went elsewhere.
        let mut binds = Vec::new();
        let by_name: HashMap<String, &Arc<Node>> = nodes.iter().map(|n| (n.name_any(), n)).collect();
        self.assumed.retain(|uid, a| {
            if !a.awaiting_volumes {
                return true;
            }
            let Some(node) = by_name.get(&a.node) else {
                return false;
            };
            match claims_on_node(live[uid], node, &storage) {
                ClaimsOnNode::Ready => {
                    a.awaiting_volumes = false;
                    binds.push(bind(
                        self.client.clone(),
                        self.recorder.clone(),
                        live[uid].clone(),
                        a.node.clone(),
                    ));
                    true
                }
                ClaimsOnNode::Waiting => a.since.elapsed() < VOLUME_BINDING_TIMEOUT,
                ClaimsOnNode::Conflict => false,
            }
        });
        let uids: HashSet<&str> = pods.iter().filter_map(|p| p.metadata.uid.as_deref()).collect();
        self.loads.retain(&uids);
        let (mut states, placed) = node_states(&nodes, &pods, &self.assumed, &namespaces, &mut self.loads);
        let mut storage = storage;
        let occupying = pods.iter().filter(|p| bound_node(p).is_some());
        for pod in occupying.chain(self.assumed.values().map(|a| &a.pod)) {
            storage.mount(pod);
        }
        let mut cluster = Cluster {
            storage,
            namespaces,
            placed,
        };
        let mut pending: Vec<&Arc<Pod>> = live
            .iter()
            .filter(|(uid, _)| !self.assumed.contains_key(*uid))
            .map(|(_, p)| *p)
            .collect();
        pending.sort_by(|a, b| {
            a.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0)
                .cmp(&b.metadata.creation_timestamp.as_ref().map(|t| t.0))
                .then_with(|| a.name_any().cmp(&b.name_any()))
        });
        let mut marks = Vec::new();
        // Keys of pods found to fit nowhere in this pass, with the reason.
        let mut unfit: HashMap<String, String> = HashMap::new();
        for pod in pending {
            let key = equivalence_key(pod);
            let decision = match key.as_ref().and_then(|k| unfit.get(k)) {
                Some(message) => Decision::Unschedulable(message.clone()),
                None => {
                    let start = self.next_start;
                    self.next_start = (self.next_start + nodes_to_find(states.len())) % states.len().max(1);
                    schedule_from(pod, &states, &cluster, start)
                }
            };
            if let (Some(key), Decision::Unschedulable(message)) = (key, &decision) {
                unfit.insert(key, message.clone());
            }
            match decision {
                Decision::Bind(i) => {
                    states[i].add(pod, PodLoad::of(pod));
                    cluster.placed.add(pod.clone(), i, &cluster.namespaces);
                    cluster.storage.mount(pod);
                    let node = states[i].name();
                    let delayed = if volumes::uses_claims(pod) {
                        PodVolumes::of(pod, &cluster.storage)
                            .map(|v| v.delayed)
                            .unwrap_or_default()
                    } else {
                        Vec::new()
                    };
                    let awaiting_volumes = !delayed.is_empty();
                    if awaiting_volumes {
                        if !self.select_node(pod, &delayed, &node).await {
                            continue;
                        }
                        // Later pods of this pass that share a claim follow it to the node.
                        for claim in &delayed {
                            cluster.storage.select(claim, &node);
                        }
                    }
                    self.assumed.insert(
                        pod.uid().unwrap_or_default(),
                        Assumed {
                            node: node.clone(),
                            pod: pod.clone(),
                            awaiting_volumes,
                            since: Instant::now(),
                        },
                    );
                    if !awaiting_volumes {
                        binds.push(bind(self.client.clone(), self.recorder.clone(), pod.clone(), node));
                    }
                }
                Decision::Unschedulable(message) => {
                    let uid = pod.uid().unwrap_or_default();
                    // A pod already reported unschedulable gets a new message at most every
                    // REMARK_INTERVAL: while nodes come and go, thousands of pending pods would
                    // otherwise each be rewritten on every pass.
                    let recently = self.marked.get(&uid).is_some_and(|t| t.elapsed() < REMARK_INTERVAL);
                    if recently && is_marked_unschedulable(pod) {
                        continue;
                    }
                    if let Some(conditions) = unschedulable_condition(pod, &message) {
                        self.marked.insert(uid, Instant::now());
                        marks.push(mark_unschedulable(
                            self.client.clone(),
                            self.recorder.clone(),
                            pod.clone(),
                            conditions,
                            message,
                        ));
                    }
                }
            }
        }
        // Status writes for unschedulable pods go out concurrently, like bindings: one at a time,
        // 10,000 pending pods would take minutes to report.
        let marked: Vec<Result<()>> = futures::stream::iter(marks)
            .buffer_unordered(BIND_CONCURRENCY)
            .collect()
            .await;
        let outcomes: Vec<Outcome> = futures::stream::iter(binds)
            .buffer_unordered(BIND_CONCURRENCY)
            .collect()
            .await;
        for o in outcomes {
            if let Outcome::Failed(uid) = o {
                self.assumed.remove(&uid);
            }
        }
        marked.into_iter().collect()
    }

    /// Names `node` on each claim that waits for its first consumer, so that it is provisioned or
    /// bound there; the pod is bound once they all are. False if a claim could not be written.
    async fn select_node(&self, pod: &Pod, claims: &[Arc<PersistentVolumeClaim>], node: &str) -> bool {
        for claim in claims {
            if claim.annotations().get(SELECTED_NODE).map(String::as_str) == Some(node) {
                continue;
            }
            let patch = json!({"metadata": {"annotations": {SELECTED_NODE: node}}});
            let ns = claim.namespace().unwrap_or_default();
            if let Err(e) = Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), &ns)
                .patch(&claim.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                tracing::warn!(namespace = %ns, pod = %pod.name_any(), claim = %claim.name_any(), error = %e, "selecting a node for a claim failed");
                return false;
            }
        }
        tracing::debug!(namespace = %pod.namespace().unwrap_or_default(), pod = %pod.name_any(), %node, "waiting for claims to be bound");
        true
    }
}

/// Writes `PodScheduled=False` with `message` and records FailedScheduling.
async fn mark_unschedulable(
    client: Client,
    recorder: Recorder,
    pod: Arc<Pod>,
    conditions: Vec<PodCondition>,
    message: String,
) -> Result<()> {
    let ns = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    tracing::debug!(namespace = %ns, pod = %name, %message, "pod is unschedulable");
    let patch = json!({"status": {"conditions": conditions}});
    match Api::<Pod>::namespaced(client, &ns)
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {}
        Err(e) if is_status(&e, 404) || is_status(&e, 409) => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    recorder
        .publish(pod.as_ref(), EventType::Warning, "FailedScheduling", &message)
        .await;
    Ok(())
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
    let changed = Arc::new(Notify::new());
    let mut streams = Vec::new();
    macro_rules! watched {
        ($kind:ty) => {{
            let (store, writer) = reflector::store::<$kind>();
            streams.push(
                reflector(
                    writer,
                    watcher(Api::<$kind>::all(client.clone()), watcher::Config::default()),
                )
                .default_backoff()
                // A (re)list replays every object; one wake-up when it is done is enough.
                .filter_map(|e| {
                    futures::future::ready(match e {
                        Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => None,
                        _ => Some(()),
                    })
                })
                .boxed(),
            );
            store
        }};
    }
    let pods = watched!(Pod);
    let nodes = watched!(Node);
    let claims = watched!(PersistentVolumeClaim);
    let volumes = watched!(PersistentVolume);
    let classes = watched!(StorageClass);
    let namespaces = watched!(Namespace);
    let notify = changed.clone();
    let watching = tokio::spawn(futures::stream::select_all(streams).for_each(move |()| {
        notify.notify_one();
        futures::future::ready(())
    }));
    pods.wait_until_ready().await.ok();
    nodes.wait_until_ready().await.ok();
    claims.wait_until_ready().await.ok();
    volumes.wait_until_ready().await.ok();
    classes.wait_until_ready().await.ok();
    namespaces.wait_until_ready().await.ok();
    let mut scheduler = Scheduler {
        recorder: Recorder::new(client.clone(), SCHEDULER_NAME),
        client,
        pods,
        nodes,
        claims,
        volumes,
        classes,
        namespaces,
        assumed: HashMap::new(),
        marked: HashMap::new(),
        next_start: 0,
        loads: LoadCache::default(),
    };
    let result = loop {
        if watching.is_finished() {
            break Err(Error::Ended("the scheduler's watches"));
        }
        let started = tokio::time::Instant::now();
        if let Err(e) = scheduler.pass().await {
            tracing::warn!(error = %e, "scheduling pass failed");
        }
        // Unschedulable pods are retried on every pod, node or storage change, and at least
        // every 30 s.
        let _ = tokio::time::timeout(Duration::from_secs(30), changed.notified()).await;
        // Under a storm of changes, passes back to back would starve the watches feeding them;
        // what changes meanwhile is taken by the next pass.
        tokio::time::sleep_until(started + MIN_PASS_INTERVAL).await;
    };
    watching.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        Affinity, Container, NodeAffinity, NodeCondition, NodeSpec, NodeStatus, PersistentVolumeClaimVolumeSource,
        PodAffinity, PodAffinityTerm, PodAntiAffinity, PodSpec, PreferredSchedulingTerm, ResourceRequirements, Volume,
        WeightedPodAffinityTerm,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
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

    fn with_node(n: NodeState, f: impl FnOnce(&mut Node)) -> NodeState {
        let mut node = (*n.node).clone();
        f(&mut node);
        NodeState::new(Arc::new(node))
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
    fn replicas_of_one_template_share_an_equivalence_key() {
        let a = labeled(pod("100m", "64Mi"), &[("app", "web")]);
        let mut b = a.clone();
        b.metadata.name = Some("other".into());
        assert!(equivalence_key(&a).is_some());
        assert_eq!(equivalence_key(&a), equivalence_key(&b));
        assert_ne!(
            equivalence_key(&a),
            equivalence_key(&labeled(pod("100m", "64Mi"), &[("app", "db")]))
        );
        assert_ne!(equivalence_key(&a), equivalence_key(&pod("200m", "64Mi")));
        // Placing other pods can satisfy required pod affinity: no sharing.
        let affine = with_affinity(
            a.clone(),
            Affinity {
                pod_affinity: Some(k8s_openapi::api::core::v1::PodAffinity {
                    required_during_scheduling_ignored_during_execution: Some(vec![term(
                        "kubernetes.io/hostname",
                        "db",
                    )]),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        assert_eq!(equivalence_key(&affine), None);
    }

    #[test]
    fn large_clusters_score_a_sample_of_fitting_nodes() {
        assert_eq!(nodes_to_find(3), 3);
        assert_eq!(nodes_to_find(100), 100);
        assert_eq!(nodes_to_find(1_000), 420);
        assert_eq!(nodes_to_find(5_000), 500);
        assert_eq!(nodes_to_find(10_000), 500);
        // From a rotated start, the pod still lands on a node that fits.
        let nodes: Vec<NodeState> = (0..300).map(|i| node(&format!("n{i:03}"), "1", "1Gi")).collect();
        for start in [0, 150, 299, 1_000] {
            let d = schedule_from(&pod("500m", "100Mi"), &nodes, &Cluster::default(), start);
            assert!(matches!(d, Decision::Bind(_)));
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
        assert_eq!(
            bound_to(&nodes, schedule(&pod("500m", "1Gi"), &nodes, &Cluster::default())),
            "b"
        );
    }

    #[test]
    fn requests_beyond_what_is_left_do_not_fit() {
        let mut busy = node("a", "2", "8Gi");
        busy.add(&pod("1500m", ""), PodLoad::of(&pod("1500m", "")));
        let nodes = vec![busy, node("b", "1", "8Gi"), node("c", "4", "1Gi")];
        assert_eq!(
            schedule(&pod("2", "2Gi"), &nodes, &Cluster::default()),
            Decision::Unschedulable("0/3 nodes are available: 1 Insufficient memory, 2 Insufficient cpu.".into())
        );
        // (Reasons sort as strings, as in kube-scheduler.) a has half a core left; b and c fit exactly, b with more left over.
        assert_eq!(
            bound_to(&nodes, schedule(&pod("1", "1Gi"), &nodes, &Cluster::default())),
            "b"
        );
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
            schedule(&pod("", ""), &[n], &Cluster::default()),
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
            schedule(&pod("", ""), &nodes, &Cluster::default()),
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
        assert_eq!(bound_to(&nodes, schedule(&p, &nodes, &Cluster::default())), "b");

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
            bound_to(
                &nodes,
                schedule(&affinity("In", &["ssd", "nvme"]), &nodes, &Cluster::default())
            ),
            "b"
        );
        assert_eq!(
            bound_to(
                &nodes,
                schedule(&affinity("NotIn", &["ssd"]), &nodes, &Cluster::default())
            ),
            "a"
        );
        assert_eq!(
            bound_to(&nodes, schedule(&affinity("Exists", &[]), &nodes, &Cluster::default())),
            "b"
        );
        assert_eq!(
            bound_to(
                &nodes,
                schedule(&affinity("DoesNotExist", &[]), &nodes, &Cluster::default())
            ),
            "a"
        );
        assert_eq!(
            schedule(&affinity("In", &["hdd"]), &nodes, &Cluster::default()),
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
        assert_eq!(
            bound_to(&nodes, schedule(&pod("", ""), &nodes, &Cluster::default())),
            "c"
        );

        let nodes = vec![gpu, draining];
        assert_eq!(
            schedule(&pod("", ""), &nodes, &Cluster::default()),
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
        assert_eq!(bound_to(&nodes, schedule(&p, &nodes, &Cluster::default())), "a");
        p.spec.as_mut().unwrap().tolerations = Some(vec![Toleration {
            operator: Some("Exists".into()),
            ..Default::default()
        }]);
        assert!(matches!(schedule(&p, &nodes, &Cluster::default()), Decision::Bind(_)));
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
            let Decision::Bind(i) = schedule(&p, &nodes, &Cluster::default()) else {
                panic!()
            };
            nodes[i].add(&p, PodLoad::of(&p));
            placed.push(nodes[i].name());
        }
        placed.sort();
        assert_eq!(placed, ["a", "a", "b", "b", "c", "c"]);
    }

    fn labeled(mut p: Pod, labels: &[(&str, &str)]) -> Pod {
        p.metadata.labels = Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        p
    }

    fn term(key: &str, app: &str) -> PodAffinityTerm {
        PodAffinityTerm {
            label_selector: Some(LabelSelector {
                match_labels: Some([("app".to_string(), app.to_string())].into()),
                ..Default::default()
            }),
            topology_key: key.into(),
            ..Default::default()
        }
    }

    fn with_affinity(mut p: Pod, affinity: Affinity) -> Pod {
        p.spec.as_mut().unwrap().affinity = Some(affinity);
        p
    }

    fn anti(key: &str, app: &str) -> Affinity {
        Affinity {
            pod_anti_affinity: Some(PodAntiAffinity {
                required_during_scheduling_ignored_during_execution: Some(vec![term(key, app)]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn zoned(name: &str, zone: &str) -> NodeState {
        with_node(node(name, "64", "256Gi"), |n| {
            n.metadata.labels.as_mut().unwrap().insert("zone".into(), zone.into());
        })
    }

    /// Places `pod` on node `i`, as a scheduling pass does.
    fn place(nodes: &mut [NodeState], cluster: &mut Cluster, pod: Pod, i: usize) {
        nodes[i].add(&pod, PodLoad::of(&pod));
        cluster.placed.add(Arc::new(pod), i, &NamespaceLabels::default());
    }

    #[test]
    fn required_anti_affinity_keeps_replicas_apart_and_says_why() {
        let mut nodes = vec![node("a", "64", "256Gi"), node("b", "64", "256Gi")];
        let mut cluster = Cluster::default();
        let replica = || {
            with_affinity(
                labeled(pod("", ""), &[("app", "web")]),
                anti("kubernetes.io/hostname", "web"),
            )
        };
        let mut placed = Vec::new();
        for _ in 0..2 {
            let Decision::Bind(i) = schedule(&replica(), &nodes, &cluster) else {
                panic!()
            };
            placed.push(nodes[i].name());
            place(&mut nodes, &mut cluster, replica(), i);
        }
        placed.sort();
        assert_eq!(placed, ["a", "b"]);
        assert_eq!(
            schedule(&replica(), &nodes, &cluster),
            Decision::Unschedulable("0/2 nodes are available: 2 node(s) didn't match pod anti-affinity rules.".into())
        );
        // Pods of another app are not affected.
        assert!(matches!(
            schedule(&labeled(pod("", ""), &[("app", "db")]), &nodes, &cluster),
            Decision::Bind(_)
        ));
    }

    #[test]
    fn an_existing_pods_anti_affinity_repels_the_incoming_pod() {
        let mut nodes = vec![node("a", "64", "256Gi"), node("b", "1", "1Gi")];
        let mut cluster = Cluster::default();
        place(
            &mut nodes,
            &mut cluster,
            with_affinity(pod("", ""), anti("kubernetes.io/hostname", "db")),
            0,
        );
        let db = labeled(pod("", ""), &[("app", "db")]);
        assert_eq!(bound_to(&nodes, schedule(&db, &nodes, &cluster)), "b");
        assert_eq!(
            schedule(&db, &nodes[..1], &cluster),
            Decision::Unschedulable(
                "0/1 nodes are available: 1 node(s) didn't satisfy existing pods anti-affinity rules.".into()
            )
        );
    }

    #[test]
    fn required_affinity_follows_matching_pods_by_any_topology_key() {
        let mut nodes = vec![zoned("a", "z1"), zoned("b", "z2"), zoned("c", "z2")];
        let mut cluster = Cluster::default();
        let follower = || {
            with_affinity(
                labeled(pod("", ""), &[("app", "web")]),
                Affinity {
                    pod_affinity: Some(PodAffinity {
                        required_during_scheduling_ignored_during_execution: Some(vec![term("zone", "cache")]),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            )
        };
        assert_eq!(
            schedule(&follower(), &nodes, &cluster),
            Decision::Unschedulable("0/3 nodes are available: 3 node(s) didn't match pod affinity rules.".into())
        );
        place(
            &mut nodes,
            &mut cluster,
            labeled(pod("32", "128Gi"), &[("app", "cache")]),
            1,
        );
        // b holds the cache pod; c shares its zone and is emptier.
        assert_eq!(bound_to(&nodes, schedule(&follower(), &nodes, &cluster)), "c");

        // The first pod of a group that is affine to itself may go anywhere.
        let selfish = with_affinity(
            labeled(pod("", ""), &[("app", "solo")]),
            Affinity {
                pod_affinity: Some(PodAffinity {
                    required_during_scheduling_ignored_during_execution: Some(vec![term("zone", "solo")]),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        assert!(matches!(schedule(&selfish, &nodes, &cluster), Decision::Bind(_)));
    }

    #[test]
    fn every_required_affinity_term_must_hold_on_the_node() {
        let mut nodes = vec![zoned("a", "z1"), zoned("b", "z2"), zoned("c", "z2")];
        let mut cluster = Cluster::default();
        place(&mut nodes, &mut cluster, labeled(pod("", ""), &[("app", "db")]), 0);
        place(&mut nodes, &mut cluster, labeled(pod("", ""), &[("app", "cache")]), 1);
        let both = with_affinity(
            labeled(pod("", ""), &[("app", "web")]),
            Affinity {
                pod_affinity: Some(PodAffinity {
                    required_during_scheduling_ignored_during_execution: Some(vec![
                        term("zone", "db"),
                        term("zone", "cache"),
                    ]),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        // db is in z1, cache in z2: no zone has both.
        assert!(matches!(schedule(&both, &nodes, &cluster), Decision::Unschedulable(_)));
        place(&mut nodes, &mut cluster, labeled(pod("", ""), &[("app", "db")]), 2);
        let chosen = bound_to(&nodes, schedule(&both, &nodes, &cluster));
        assert!(chosen == "b" || chosen == "c", "{chosen}");
    }

    #[test]
    fn preferred_node_affinity_outweighs_load() {
        let mut busy = with_node(node("a", "4", "8Gi"), |n| {
            n.metadata.labels.as_mut().unwrap().insert("disk".into(), "ssd".into());
        });
        busy.add(&pod("2", "4Gi"), PodLoad::of(&pod("2", "4Gi")));
        let nodes = vec![busy, node("b", "4", "8Gi")];
        let mut p = pod("", "");
        p.spec.as_mut().unwrap().affinity = Some(Affinity {
            node_affinity: Some(NodeAffinity {
                preferred_during_scheduling_ignored_during_execution: Some(vec![PreferredSchedulingTerm {
                    weight: 50,
                    preference: NodeSelectorTerm {
                        match_expressions: Some(vec![NodeSelectorRequirement {
                            key: "disk".into(),
                            operator: "In".into(),
                            values: Some(vec!["ssd".into()]),
                        }]),
                        ..Default::default()
                    },
                }]),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(bound_to(&nodes, schedule(&p, &nodes, &Cluster::default())), "a");
        assert_eq!(
            bound_to(&nodes, schedule(&pod("", ""), &nodes, &Cluster::default())),
            "b"
        );
    }

    #[test]
    fn preferred_pod_affinity_attracts_and_anti_affinity_repels() {
        let mut nodes = vec![zoned("a", "z1"), zoned("b", "z2")];
        let mut cluster = Cluster::default();
        // Load a so that plain scoring prefers b.
        place(
            &mut nodes,
            &mut cluster,
            labeled(pod("8", "32Gi"), &[("app", "cache")]),
            0,
        );
        let weighted = |app: &str| WeightedPodAffinityTerm {
            weight: 100,
            pod_affinity_term: term("zone", app),
        };
        let near = with_affinity(
            pod("", ""),
            Affinity {
                pod_affinity: Some(PodAffinity {
                    preferred_during_scheduling_ignored_during_execution: Some(vec![weighted("cache")]),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        assert_eq!(bound_to(&nodes, schedule(&pod("", ""), &nodes, &cluster)), "b");
        assert_eq!(bound_to(&nodes, schedule(&near, &nodes, &cluster)), "a");
        place(&mut nodes, &mut cluster, labeled(pod("", ""), &[("app", "noisy")]), 1);
        let away = with_affinity(
            pod("", ""),
            Affinity {
                pod_anti_affinity: Some(PodAntiAffinity {
                    preferred_during_scheduling_ignored_during_execution: Some(vec![weighted("noisy")]),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        assert_eq!(bound_to(&nodes, schedule(&away, &nodes, &cluster)), "a");
    }

    fn claim_pod(claim: &str) -> Pod {
        let mut p = pod("", "");
        p.spec.as_mut().unwrap().volumes = Some(vec![Volume {
            name: "data".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.into(),
                read_only: None,
            }),
            ..Default::default()
        }]);
        p
    }

    fn claim(name: &str, class: &str, volume: Option<&str>) -> Arc<PersistentVolumeClaim> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}")},
                "spec": {"storageClassName": class, "volumeName": volume, "accessModes": ["ReadWriteOnce"],
                         "resources": {"requests": {"storage": "1Gi"}}},
                "status": {"phase": if volume.is_some() { "Bound" } else { "Pending" }},
            }))
            .unwrap(),
        )
    }

    fn class(name: &str, provisioner: &str, mode: &str) -> Arc<StorageClass> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name}, "provisioner": provisioner, "volumeBindingMode": mode,
            }))
            .unwrap(),
        )
    }

    fn volume_on(name: &str, class: &str, node: &str) -> Arc<PersistentVolume> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name},
                "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": class,
                         "hostPath": {"path": "/srv"},
                         "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                             {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}}},
            }))
            .unwrap(),
        )
    }

    fn storage_cluster(claims: &[Arc<PersistentVolumeClaim>], volumes: &[Arc<PersistentVolume>]) -> Cluster {
        let classes = [
            class("local-path", "weir.dev/local-path", "WaitForFirstConsumer"),
            class("fast", "example.com/csi", "Immediate"),
            class("local", "kubernetes.io/no-provisioner", "WaitForFirstConsumer"),
        ];
        Cluster {
            storage: Storage::new(claims, volumes, &classes),
            ..Default::default()
        }
    }

    #[test]
    fn claims_that_are_missing_or_unbound_and_immediate_block_the_pod() {
        let nodes = vec![node("a", "4", "8Gi"), node("b", "4", "8Gi")];
        let cluster = storage_cluster(&[claim("fast-data", "fast", None)], &[]);
        assert_eq!(
            schedule(&claim_pod("nope"), &nodes, &cluster),
            Decision::Unschedulable("0/2 nodes are available: persistentvolumeclaim \"nope\" not found.".into())
        );
        assert_eq!(
            schedule(&claim_pod("fast-data"), &nodes, &cluster),
            Decision::Unschedulable(
                "0/2 nodes are available: pod has unbound immediate PersistentVolumeClaims.".into()
            )
        );
    }

    #[test]
    fn a_bound_local_volume_pins_its_pods_to_its_node() {
        let nodes = vec![node("a", "4", "8Gi"), node("b", "4", "8Gi"), node("c", "4", "8Gi")];
        let cluster = storage_cluster(
            &[claim("data", "local-path", Some("pv-1"))],
            &[volume_on("pv-1", "local-path", "b")],
        );
        assert_eq!(bound_to(&nodes, schedule(&claim_pod("data"), &nodes, &cluster)), "b");
        assert_eq!(
            schedule(&claim_pod("data"), &[nodes[0].clone(), nodes[2].clone()], &cluster),
            Decision::Unschedulable("0/2 nodes are available: 2 node(s) had volume node affinity conflict.".into())
        );
        let gone = storage_cluster(&[claim("data", "local-path", Some("pv-9"))], &[]);
        assert!(matches!(
            schedule(&claim_pod("data"), &nodes, &gone),
            Decision::Unschedulable(m) if m.contains("3 node(s) unavailable due to one or more pvc(s) bound to non-existent pv(s)")
        ));
    }

    #[test]
    fn a_waiting_claim_fits_where_it_can_be_provisioned_or_a_static_volume_waits() {
        let nodes = vec![node("a", "4", "8Gi"), node("b", "4", "8Gi")];
        let cluster = storage_cluster(&[claim("data", "local-path", None)], &[]);
        assert!(matches!(
            schedule(&claim_pod("data"), &nodes, &cluster),
            Decision::Bind(_)
        ));
        let volumes = PodVolumes::of(&claim_pod("data"), &cluster.storage).unwrap();
        assert_eq!(volumes.delayed.len(), 1);

        let cluster = storage_cluster(&[claim("static", "local", None)], &[volume_on("pv-b", "local", "b")]);
        assert_eq!(bound_to(&nodes, schedule(&claim_pod("static"), &nodes, &cluster)), "b");
        assert_eq!(
            schedule(&claim_pod("static"), &nodes[..1], &cluster),
            Decision::Unschedulable(
                "0/1 nodes are available: 1 node(s) didn't find available persistent volumes to bind.".into()
            )
        );

        // A claim whose node was already selected keeps later pods there.
        let mut selected = (*claim("data", "local-path", None)).clone();
        selected.metadata.annotations = Some([(SELECTED_NODE.to_string(), "b".to_string())].into());
        let cluster = storage_cluster(&[Arc::new(selected)], &[]);
        assert_eq!(bound_to(&nodes, schedule(&claim_pod("data"), &nodes, &cluster)), "b");
        // ... unless that node is gone.
        assert_eq!(
            bound_to(&nodes, schedule(&claim_pod("data"), &nodes[..1], &cluster)),
            "a"
        );
    }

    #[test]
    fn a_node_selected_in_this_pass_binds_the_claims_other_pods() {
        let nodes = vec![node("a", "4", "8Gi"), node("b", "4", "8Gi")];
        let mut cluster = storage_cluster(&[claim("data", "local-path", None)], &[]);
        assert_eq!(bound_to(&nodes, schedule(&claim_pod("data"), &nodes, &cluster)), "a");
        let waiting = PodVolumes::of(&claim_pod("data"), &cluster.storage).unwrap().delayed;
        cluster.storage.select(&waiting[0], "b");
        assert_eq!(bound_to(&nodes, schedule(&claim_pod("data"), &nodes, &cluster)), "b");
    }

    #[test]
    fn a_read_write_once_pod_claim_serves_one_pod_only() {
        let nodes = vec![node("a", "4", "8Gi")];
        let mut rwop = (*claim("solo", "local-path", Some("pv"))).clone();
        rwop.spec.as_mut().unwrap().access_modes = Some(vec!["ReadWriteOncePod".into()]);
        let mut cluster = storage_cluster(&[Arc::new(rwop)], &[volume_on("pv", "local-path", "a")]);
        assert!(matches!(
            schedule(&claim_pod("solo"), &nodes, &cluster),
            Decision::Bind(0)
        ));
        cluster.storage.mount(&claim_pod("solo"));
        assert_eq!(
            schedule(&claim_pod("solo"), &nodes, &cluster),
            Decision::Unschedulable(
                "0/1 nodes are available: node has pod using PersistentVolumeClaim with the same name and ReadWriteOncePod access mode.".into()
            )
        );
    }

    #[test]
    fn a_pod_waiting_for_its_claims_binds_once_they_are_bound_on_its_node() {
        let b = node("b", "4", "8Gi").node;
        let mut waiting = (*claim("data", "local-path", None)).clone();
        waiting.metadata.annotations = Some([(SELECTED_NODE.to_string(), "b".to_string())].into());
        let state = |claims: &[Arc<PersistentVolumeClaim>], volumes: &[Arc<PersistentVolume>]| {
            claims_on_node(&claim_pod("data"), &b, &storage_cluster(claims, volumes).storage)
        };
        assert_eq!(state(&[Arc::new(waiting)], &[]), ClaimsOnNode::Waiting);
        assert_eq!(state(&[claim("data", "local-path", None)], &[]), ClaimsOnNode::Conflict);
        assert_eq!(
            state(
                &[claim("data", "local-path", Some("pv"))],
                &[volume_on("pv", "local-path", "b")]
            ),
            ClaimsOnNode::Ready
        );
        assert_eq!(
            state(
                &[claim("data", "local-path", Some("pv"))],
                &[volume_on("pv", "local-path", "a")]
            ),
            ClaimsOnNode::Conflict
        );
        assert_eq!(state(&[], &[]), ClaimsOnNode::Conflict);
    }

    #[test]
    #[ignore = "timing, run by hand"]
    fn timing_many_pods_on_many_nodes() {
        let mut nodes: Vec<NodeState> = (0..1000).map(|i| node(&format!("n{i:04}"), "64", "256Gi")).collect();
        let mut cluster = Cluster::default();
        let start = std::time::Instant::now();
        let n = 2000;
        for k in 0..n {
            let p = labeled(pod("10m", "16Mi"), &[("app", if k % 2 == 0 { "web" } else { "db" })]);
            let Decision::Bind(i) = schedule(&p, &nodes, &cluster) else {
                panic!()
            };
            place(&mut nodes, &mut cluster, p, i);
        }
        let el = start.elapsed();
        eprintln!(
            "{n} pods on 1000 nodes: {el:?}, {:.0} pods/s",
            n as f64 / el.as_secs_f64()
        );
        let start = std::time::Instant::now();
        for _ in 0..200 {
            let p = with_affinity(
                labeled(pod("10m", "16Mi"), &[("app", "spread")]),
                anti("kubernetes.io/hostname", "spread"),
            );
            let Decision::Bind(i) = schedule(&p, &nodes, &cluster) else {
                panic!()
            };
            place(&mut nodes, &mut cluster, p, i);
        }
        let el = start.elapsed();
        eprintln!("200 anti-affine pods: {el:?}, {:.0} pods/s", 200.0 / el.as_secs_f64());
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
