//! The node lifecycle controller, as Kubernetes' node-lifecycle-controller: it notices nodes that
//! stopped heartbeating (Lease in kube-node-lease, Ready's lastHeartbeatTime), marks their
//! conditions Unknown, keeps the not-ready/unreachable taints in step with Ready, and evicts pods
//! from NoExecute-tainted nodes they do not tolerate (after their tolerationSeconds).
//! Writes Node status and taints, Pod Ready conditions and Pod deletions; never Leases.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, NodeCondition, Pod, Taint, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::events::{EventType, Recorder};
use super::scheduler::tolerates;
use super::{Error, Result, is_status};
use crate::apiserver::strategy::{TAINT_NOT_READY, TAINT_UNREACHABLE};

pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";
const COMPONENT: &str = "node-controller";
/// How long a pod must be seen bound to a missing node before PodGC checks and deletes it.
const ORPHAN_QUARANTINE: Duration = Duration::from_secs(3);
/// The conditions a kubelet posts; all turn Unknown when it goes silent.
const KUBELET_CONDITIONS: [&str; 4] = ["Ready", "MemoryPressure", "DiskPressure", "PIDPressure"];

fn ready_status(node: &Node) -> Option<&str> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.as_str())
}

/// The heartbeat a node shows: its Lease's renewTime and its Ready condition's lastHeartbeatTime.
/// Only a change counts, timed by the controller's clock (a kubelet's clock may be off).
#[derive(Debug, Clone, PartialEq)]
pub struct Heartbeat {
    lease: Option<jiff::Timestamp>,
    ready: Option<jiff::Timestamp>,
}

impl Heartbeat {
    pub fn of(node: &Node, lease: Option<&Lease>) -> Heartbeat {
        let ready = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
            .and_then(|c| c.last_heartbeat_time.as_ref())
            .map(|t| t.0);
        let lease = lease
            .and_then(|l| l.spec.as_ref())
            .and_then(|s| s.renew_time.as_ref())
            .map(|t| t.0);
        Heartbeat { lease, ready }
    }
}

/// Conditions for a node that has not heartbeated within the grace period: every kubelet
/// condition Unknown (missing ones added), as Kubernetes does. `None` when already so.
pub fn silent_node_conditions(node: &Node, now: jiff::Timestamp) -> Option<Vec<NodeCondition>> {
    let mut conditions = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let mut changed = false;
    for type_ in KUBELET_CONDITIONS {
        match conditions.iter_mut().find(|c| c.type_ == type_) {
            Some(c) if c.status == "Unknown" => {}
            Some(c) => {
                c.status = "Unknown".into();
                c.reason = Some("NodeStatusUnknown".into());
                c.message = Some("Kubelet stopped posting node status.".into());
                c.last_transition_time = Some(Time(now));
                changed = true;
            }
            None => {
                conditions.push(NodeCondition {
                    type_: type_.into(),
                    status: "Unknown".into(),
                    reason: Some("NodeStatusNeverUpdated".into()),
                    message: Some("Kubelet never posted node status.".into()),
                    last_heartbeat_time: node.metadata.creation_timestamp.clone(),
                    last_transition_time: Some(Time(now)),
                });
                changed = true;
            }
        }
    }
    changed.then_some(conditions)
}

/// The node's taints with not-ready/unreachable (NoSchedule and NoExecute) matching its Ready
/// condition: False → not-ready, Unknown → unreachable, True or not posted yet → neither.
/// Taints kept keep their timeAdded. `None` when nothing changes.
pub fn condition_taints(node: &Node, now: jiff::Timestamp) -> Option<Vec<Taint>> {
    let want = match ready_status(node) {
        Some("False") => Some(TAINT_NOT_READY),
        Some("Unknown") => Some(TAINT_UNREACHABLE),
        _ => None,
    };
    let current = node.spec.as_ref().and_then(|s| s.taints.clone()).unwrap_or_default();
    let managed = |t: &Taint| {
        (t.key == TAINT_NOT_READY || t.key == TAINT_UNREACHABLE)
            && (t.effect == "NoSchedule" || t.effect == "NoExecute")
    };
    let mut taints: Vec<Taint> = current
        .iter()
        .filter(|t| !managed(t) || Some(t.key.as_str()) == want)
        .cloned()
        .collect();
    if let Some(key) = want {
        for effect in ["NoSchedule", "NoExecute"] {
            if !taints.iter().any(|t| t.key == key && t.effect == effect) {
                taints.push(Taint {
                    key: key.into(),
                    effect: effect.into(),
                    time_added: Some(Time(now)),
                    value: None,
                });
            }
        }
    }
    (taints != current).then_some(taints)
}

/// When a pod on a node with these NoExecute taints (each with the time it was added) must go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    Never,
    Now,
    At(jiff::Timestamp),
}

/// Taint-based eviction: a NoExecute taint the pod does not tolerate evicts it at once; one it
/// tolerates for tolerationSeconds evicts it that long after the taint was added (the earliest
/// such deadline wins); a toleration without seconds tolerates it forever.
pub fn eviction(tolerations: &[Toleration], taints: &[(Taint, jiff::Timestamp)], now: jiff::Timestamp) -> Eviction {
    let mut earliest: Option<jiff::Timestamp> = None;
    for (taint, added) in taints.iter().filter(|(t, _)| t.effect == "NoExecute") {
        // As Kubernetes: the first matching toleration decides.
        let Some(toleration) = tolerations.iter().find(|t| tolerates(t, taint)) else {
            return Eviction::Now;
        };
        if let Some(seconds) = toleration.toleration_seconds {
            // A toleration too long to add to a timestamp never runs out.
            if let Ok(deadline) = added.checked_add(jiff::SignedDuration::from_secs(seconds.max(0))) {
                earliest = Some(earliest.map_or(deadline, |e| e.min(deadline)));
            }
        }
    }
    match earliest {
        None => Eviction::Never,
        Some(at) if at <= now => Eviction::Now,
        Some(at) => Eviction::At(at),
    }
}

struct NodeLifecycle {
    client: Client,
    recorder: Recorder,
    grace: Duration,
    nodes: Store<Node>,
    leases: Store<Lease>,
    pods: Store<Pod>,
    /// Last heartbeat seen per node, and when it changed (controller clock).
    probes: HashMap<String, (Heartbeat, Instant)>,
    /// Ready status per node as last seen, for NodeReady/NodeNotReady events.
    ready: HashMap<String, String>,
    /// First sight of taints without timeAdded (ones not written by this controller).
    taint_seen: HashMap<(String, String, String), jiff::Timestamp>,
    /// Pods whose deletion was requested, until the cache sees them go.
    evicted: HashSet<String>,
    /// The earliest tolerationSeconds deadline still ahead, to wake up for.
    next_eviction: Option<jiff::Timestamp>,
    /// Pods bound to a node the cache does not have, by uid, and since when (PodGC's
    /// quarantine: the node cache may lag behind the pod cache).
    orphans: HashMap<String, Instant>,
}

impl NodeLifecycle {
    async fn pass(&mut self) -> Result<()> {
        let now = jiff::Timestamp::now();
        let clock = Instant::now();
        self.next_eviction = None;
        let nodes = self.nodes.state();
        let names: HashSet<String> = nodes.iter().map(|n| n.name_any()).collect();
        self.probes.retain(|n, _| names.contains(n));
        self.ready.retain(|n, _| names.contains(n));
        self.taint_seen.retain(|(n, _, _), _| names.contains(n));
        let mut pods_by_node: HashMap<String, Vec<Arc<Pod>>> = HashMap::new();
        let pods = self.pods.state();
        let live: HashSet<String> = pods.iter().filter_map(|p| p.uid()).collect();
        self.evicted.retain(|uid| live.contains(uid));
        for p in pods {
            if let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.clone()) {
                pods_by_node.entry(node).or_default().push(p);
            }
        }
        for node in nodes {
            let name = node.name_any();
            let lease = self
                .leases
                .get(&reflector::ObjectRef::new(&name).within(NODE_LEASE_NAMESPACE));
            let beat = Heartbeat::of(&node, lease.as_deref());
            let seen = match self.probes.get(&name) {
                Some((b, at)) if *b == beat => *at,
                _ => clock,
            };
            self.probes.insert(name.clone(), (beat, seen));
            let silent = clock.duration_since(seen) > self.grace;
            let pods = pods_by_node.remove(&name).unwrap_or_default();
            if let Err(e) = self.node(&node, silent, &pods, now).await {
                tracing::warn!(node = %name, error = %e, "node lifecycle pass failed");
            }
        }
        self.collect_orphans(pods_by_node, clock).await;
        Ok(())
    }

    /// Kubernetes' PodGC for orphaned pods: a pod bound to a node that no longer exists
    /// (checked against the API, not only the cache, after a quarantine) is force-deleted,
    /// since no agent will ever finish it.
    async fn collect_orphans(&mut self, orphaned: HashMap<String, Vec<Arc<Pod>>>, clock: Instant) {
        let mut seen = HashMap::new();
        for (node, pods) in orphaned {
            for pod in pods {
                let Some(uid) = pod.uid() else { continue };
                let since = self.orphans.get(&uid).copied().unwrap_or(clock);
                seen.insert(uid.clone(), since);
                if clock.duration_since(since) < ORPHAN_QUARANTINE {
                    continue;
                }
                match Api::<Node>::all(self.client.clone()).get_opt(&node).await {
                    Ok(None) => {}
                    Ok(Some(_)) => continue,
                    Err(e) => {
                        tracing::warn!(node = %node, error = %e, "PodGC: checking a node");
                        continue;
                    }
                }
                let ns = pod.namespace().unwrap_or_default();
                let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
                let dp = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(kube::api::Preconditions {
                        uid: Some(uid.clone()),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                match api.delete(&pod.name_any(), &dp).await {
                    Ok(_) => {
                        tracing::info!(namespace = %ns, pod = %pod.name_any(), %node, "PodGC: force-deleted a pod of a node that no longer exists")
                    }
                    Err(e) if is_status(&e, 404) || is_status(&e, 409) => {}
                    Err(e) => tracing::warn!(pod = %pod.name_any(), error = %e, "PodGC: deleting an orphaned pod"),
                }
            }
        }
        self.orphans = seen;
    }

    async fn node(&mut self, node: &Node, silent: bool, pods: &[Arc<Pod>], now: jiff::Timestamp) -> Result<()> {
        let name = node.name_any();
        let api: Api<Node> = Api::all(self.client.clone());
        let mut node = node.clone();
        if silent && let Some(conditions) = silent_node_conditions(&node, now) {
            let mut next = node.clone();
            next.status.get_or_insert_with(Default::default).conditions = Some(conditions);
            node = match api.replace_status(&name, &PostParams::default(), &next).await {
                Ok(n) => n,
                // Changed meanwhile (perhaps a heartbeat): decide again next pass.
                Err(e) if is_status(&e, 409) || is_status(&e, 404) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            tracing::info!(node = %name, "node stopped heartbeating; marked Unknown");
        }
        let status = ready_status(&node).unwrap_or_default().to_string();
        // Events for transitions this controller saw, not for what it finds at its start.
        match self.ready.insert(name.clone(), status.clone()) {
            Some(before) if before != status && !status.is_empty() => {
                let (reason, type_) = if status == "True" {
                    ("NodeReady", EventType::Normal)
                } else {
                    ("NodeNotReady", EventType::Normal)
                };
                let message = format!("Node {name} status is now: {reason}");
                self.recorder.publish(&node, type_, reason, &message).await;
                if status != "True" {
                    self.mark_pods_not_ready(pods, now).await;
                }
            }
            _ => {}
        }
        if let Some(taints) = condition_taints(&node, now) {
            let mut next = node.clone();
            next.spec.get_or_insert_with(Default::default).taints = Some(taints);
            node = match api.replace(&name, &PostParams::default(), &next).await {
                Ok(n) => n,
                Err(e) if is_status(&e, 409) || is_status(&e, 404) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            tracing::info!(node = %name, ready = %status, "node taints updated");
        }
        let taints: Vec<(Taint, jiff::Timestamp)> = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default()
            .into_iter()
            .filter(|t| t.effect == "NoExecute")
            .map(|t| {
                let added = match &t.time_added {
                    Some(at) => at.0,
                    None => *self
                        .taint_seen
                        .entry((name.clone(), t.key.clone(), t.effect.clone()))
                        .or_insert(now),
                };
                (t, added)
            })
            .collect();
        if taints.is_empty() {
            return Ok(());
        }
        for pod in pods {
            let uid = pod.uid().unwrap_or_default();
            if pod.metadata.deletion_timestamp.is_some() || self.evicted.contains(&uid) {
                continue;
            }
            let tolerations = pod
                .spec
                .as_ref()
                .and_then(|s| s.tolerations.as_deref())
                .unwrap_or_default();
            match eviction(tolerations, &taints, now) {
                Eviction::Now => {
                    self.evict(pod).await?;
                    self.evicted.insert(uid);
                }
                Eviction::At(at) => {
                    self.next_eviction = Some(self.next_eviction.map_or(at, |n| n.min(at)));
                }
                Eviction::Never => {}
            }
        }
        Ok(())
    }

    async fn evict(&self, pod: &Pod) -> Result<()> {
        let ns = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let message = format!("Marking for deletion Pod {ns}/{name}");
        self.recorder
            .publish(pod, EventType::Normal, "TaintManagerEviction", &message)
            .await;
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let dp = DeleteParams {
            preconditions: pod.uid().map(|uid| kube::api::Preconditions {
                uid: Some(uid),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api.delete(&name, &dp).await {
            Ok(_) => {
                tracing::info!(namespace = %ns, pod = %name, node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()), "evicted pod from a NoExecute-tainted node");
                Ok(())
            }
            Err(e) if is_status(&e, 404) || is_status(&e, 409) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// As Kubernetes: pods on a node that is no longer Ready are no longer Ready either, so
    /// Services stop sending them traffic before they are evicted.
    async fn mark_pods_not_ready(&self, pods: &[Arc<Pod>], now: jiff::Timestamp) {
        for pod in pods {
            let mut conditions = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.clone())
                .unwrap_or_default();
            let Some(ready) = conditions
                .iter_mut()
                .find(|c| c.type_ == "Ready" && c.status != "False")
            else {
                continue;
            };
            ready.status = "False".into();
            ready.last_transition_time = Some(Time(now));
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
            let patch =
                json!({"metadata": {"resourceVersion": pod.resource_version()}, "status": {"conditions": conditions}});
            if let Err(e) = api
                .patch_status(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                tracing::debug!(pod = %pod.name_any(), error = %e, "marking a pod not ready failed");
            }
        }
    }
}

/// The shortest time between two passes.
const MIN_PASS_INTERVAL: Duration = Duration::from_millis(100);

pub async fn run(client: Client, grace: Duration) -> Result<()> {
    let (nodes, node_writer) = reflector::store::<Node>();
    let (leases, lease_writer) = reflector::store::<Lease>();
    let (pods, pod_writer) = reflector::store::<Pod>();
    let changed = Arc::new(Notify::new());
    let node_events = reflector(
        node_writer,
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff()
    .map(|_| ());
    let lease_events = reflector(
        lease_writer,
        watcher(
            Api::<Lease>::namespaced(client.clone(), NODE_LEASE_NAMESPACE),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .map(|_| ());
    let pod_events = reflector(
        pod_writer,
        watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff()
    .map(|_| ());
    let notify = changed.clone();
    let watching = tokio::spawn(async move {
        futures::stream::select(node_events, futures::stream::select(lease_events, pod_events))
            .for_each(|()| {
                notify.notify_one();
                futures::future::ready(())
            })
            .await;
    });
    nodes.wait_until_ready().await.ok();
    leases.wait_until_ready().await.ok();
    pods.wait_until_ready().await.ok();
    let mut controller = NodeLifecycle {
        recorder: Recorder::new(client.clone(), COMPONENT),
        client,
        grace,
        nodes,
        leases,
        pods,
        probes: HashMap::new(),
        ready: HashMap::new(),
        taint_seen: HashMap::new(),
        evicted: HashSet::new(),
        next_eviction: None,
        orphans: HashMap::new(),
    };
    // Silence is only noticed by the clock: check a few times per grace period (at most every 5 s,
    // Kubernetes' node monitor period), at once on any change (a new taint, a new pod), and
    // when a pod's tolerationSeconds run out.
    let period = (grace / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let result = loop {
        if watching.is_finished() {
            break Err(Error::Ended("the node lifecycle controller's watches"));
        }
        let started = tokio::time::Instant::now();
        if let Err(e) = controller.pass().await {
            tracing::warn!(error = %e, "node lifecycle pass failed");
        }
        let wait = match controller.next_eviction {
            Some(at) => Duration::try_from(at.duration_since(jiff::Timestamp::now()))
                .unwrap_or_default()
                .min(period),
            None => period,
        };
        let _ = tokio::time::timeout(wait, changed.notified()).await;
        // Pods change by the thousand under load; a pass over every node and pod per change
        // would keep a core busy. Changes that arrive meanwhile are taken by the next pass.
        tokio::time::sleep_until(started + MIN_PASS_INTERVAL).await;
    };
    watching.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeSpec, NodeStatus};

    fn ts(s: &str) -> jiff::Timestamp {
        s.parse().unwrap()
    }

    fn node(ready: Option<&str>, taints: Vec<Taint>) -> Node {
        let mut n = Node::default();
        n.metadata.name = Some("n1".into());
        n.spec = Some(NodeSpec {
            taints: Some(taints),
            ..Default::default()
        });
        n.status = Some(NodeStatus {
            conditions: ready.map(|s| {
                vec![NodeCondition {
                    type_: "Ready".into(),
                    status: s.into(),
                    reason: Some("KubeletReady".into()),
                    last_heartbeat_time: Some(Time(ts("2026-01-01T00:00:00Z"))),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        });
        n
    }

    fn taint(key: &str, effect: &str, added: Option<&str>) -> Taint {
        Taint {
            key: key.into(),
            effect: effect.into(),
            time_added: added.map(|a| Time(ts(a))),
            value: None,
        }
    }

    fn toleration(key: &str, seconds: Option<i64>) -> Toleration {
        Toleration {
            key: Some(key.into()),
            operator: Some("Exists".into()),
            effect: Some("NoExecute".into()),
            toleration_seconds: seconds,
            value: None,
        }
    }

    #[test]
    fn a_silent_node_turns_every_kubelet_condition_unknown_once() {
        let now = ts("2026-02-01T00:00:00Z");
        let n = node(Some("True"), vec![]);
        let conditions = silent_node_conditions(&n, now).expect("a change");
        let ready = conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.status, "Unknown");
        assert_eq!(ready.reason.as_deref(), Some("NodeStatusUnknown"));
        assert_eq!(ready.message.as_deref(), Some("Kubelet stopped posting node status."));
        // The kubelet's last heartbeat stays as it was; the transition is now.
        assert_eq!(ready.last_heartbeat_time, Some(Time(ts("2026-01-01T00:00:00Z"))));
        assert_eq!(ready.last_transition_time, Some(Time(now)));
        assert_eq!(conditions.len(), 4);
        assert!(conditions.iter().all(|c| c.status == "Unknown"));
        let mut marked = n.clone();
        marked.status.as_mut().unwrap().conditions = Some(conditions);
        assert_eq!(silent_node_conditions(&marked, now), None);
    }

    #[test]
    fn heartbeats_compare_lease_and_ready_times() {
        let n = node(Some("True"), vec![]);
        let mut lease = Lease::default();
        let a = Heartbeat::of(&n, Some(&lease));
        lease.spec = Some(k8s_openapi::api::coordination::v1::LeaseSpec {
            renew_time: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(ts(
                "2026-01-01T00:00:05Z",
            ))),
            ..Default::default()
        });
        let b = Heartbeat::of(&n, Some(&lease));
        assert_ne!(a, b, "a renewed lease is a heartbeat");
        assert_eq!(b, Heartbeat::of(&n, Some(&lease)));
    }

    #[test]
    fn taints_follow_the_ready_condition() {
        let now = ts("2026-02-01T00:00:00Z");
        let keys = |t: Vec<Taint>| -> Vec<(String, String)> { t.into_iter().map(|t| (t.key, t.effect)).collect() };
        let other = taint("dedicated", "NoSchedule", None);
        let unknown = condition_taints(&node(Some("Unknown"), vec![other.clone()]), now).unwrap();
        assert_eq!(
            keys(unknown.clone()),
            [
                ("dedicated".into(), "NoSchedule".into()),
                (TAINT_UNREACHABLE.into(), "NoSchedule".into()),
                (TAINT_UNREACHABLE.into(), "NoExecute".into())
            ]
        );
        assert_eq!(unknown[2].time_added, Some(Time(now)));
        // Already tainted: nothing to write, timeAdded kept.
        assert_eq!(condition_taints(&node(Some("Unknown"), unknown.clone()), now), None);
        // NotReady swaps unreachable for not-ready.
        let not_ready = condition_taints(&node(Some("False"), unknown.clone()), now).unwrap();
        assert_eq!(
            keys(not_ready),
            [
                ("dedicated".into(), "NoSchedule".into()),
                (TAINT_NOT_READY.into(), "NoSchedule".into()),
                (TAINT_NOT_READY.into(), "NoExecute".into())
            ]
        );
        // Ready again (or never reported): only the node's own taints stay.
        assert_eq!(
            keys(condition_taints(&node(Some("True"), unknown), now).unwrap()),
            [("dedicated".into(), "NoSchedule".into())]
        );
        assert_eq!(condition_taints(&node(None, vec![other]), now), None);
    }

    #[test]
    fn eviction_waits_out_toleration_seconds_from_the_taints_time() {
        let added = ts("2026-02-01T00:00:00Z");
        let taints = [(taint(TAINT_UNREACHABLE, "NoExecute", None), added)];
        let two = [toleration(TAINT_UNREACHABLE, Some(2))];
        assert_eq!(
            eviction(&two, &taints, added + jiff::SignedDuration::from_secs(1)),
            Eviction::At(ts("2026-02-01T00:00:02Z"))
        );
        assert_eq!(eviction(&two, &taints, ts("2026-02-01T00:00:02Z")), Eviction::Now);
        // Without seconds: tolerated forever.
        assert_eq!(
            eviction(&[toleration(TAINT_UNREACHABLE, None)], &taints, added),
            Eviction::Never
        );
        // Not tolerated at all: at once, whatever else is tolerated.
        let maintenance = (taint("maintenance", "NoExecute", None), added);
        assert_eq!(eviction(&two, &[taints[0].clone(), maintenance], added), Eviction::Now);
        // NoSchedule taints never evict.
        assert_eq!(
            eviction(&[], &[(taint("dedicated", "NoSchedule", None), added)], added),
            Eviction::Never
        );
        // Negative seconds count as zero.
        assert_eq!(eviction(&[toleration("", Some(-5))], &taints, added), Eviction::Now);
        // Seconds beyond any timestamp: tolerated forever, no overflow.
        assert_eq!(
            eviction(&[toleration(TAINT_UNREACHABLE, Some(i64::MAX))], &taints, added),
            Eviction::Never
        );
    }
}
