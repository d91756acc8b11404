//! The DaemonSet controller: one pod per eligible node (nodeSelector, required node affinity,
//! NoSchedule/NoExecute taints), pinned to its node by a required node affinity on
//! `metadata.name` and left to the scheduler to bind, replaced by RollingUpdate (maxUnavailable)
//! or OnDelete over ControllerRevisions, and the status. Touches only pods and revisions it controls.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{ControllerRevision, DaemonSet, DaemonSetStatus};
use k8s_openapi::api::core::v1::{
    Affinity, Node, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod, Taint, Toleration,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};

use super::events::{EventType, Recorder};
use super::history::{self, HASH_LABEL};
use super::replicaset::{claim, is_available, is_ready, selects, set_owner};
use super::scheduler::{matches_node_selector, tolerates};
use super::{Error, Result, controlled_by, controller_of, is_status, scaled_value, write_status};

pub const TEMPLATE_GENERATION_LABEL: &str = "pod-template-generation";

/// Tolerations every daemon pod gets, as Kubernetes adds them: daemons keep running on nodes
/// that are unhealthy or cordoned (key, effect).
const DAEMON_TOLERATIONS: &[(&str, &str)] = &[
    ("node.kubernetes.io/not-ready", "NoExecute"),
    ("node.kubernetes.io/unreachable", "NoExecute"),
    ("node.kubernetes.io/disk-pressure", "NoSchedule"),
    ("node.kubernetes.io/memory-pressure", "NoSchedule"),
    ("node.kubernetes.io/pid-pressure", "NoSchedule"),
    ("node.kubernetes.io/unschedulable", "NoSchedule"),
];
/// Added for host-network daemons only.
const NETWORK_UNAVAILABLE: (&str, &str) = ("node.kubernetes.io/network-unavailable", "NoSchedule");

/// The node a daemon pod is on, or is pinned to while not yet bound.
pub fn target_node(pod: &Pod) -> Option<&str> {
    let spec = pod.spec.as_ref()?;
    if let Some(node) = spec.node_name.as_deref().filter(|n| !n.is_empty()) {
        return Some(node);
    }
    let terms = &spec
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms;
    terms
        .iter()
        .flat_map(|t| t.match_fields.iter().flatten())
        .find(|r| r.key == "metadata.name" && r.operator == "In")
        .and_then(|r| r.values.as_ref()?.first().map(String::as_str))
}

/// A daemon pod for `node` (no name yet: the API server generates `<ds>-xxxxx`).
pub fn new_pod(ds: &DaemonSet, hash: &str, node: &str) -> Pod {
    let template = ds.spec.template.clone();
    let meta = template.metadata.unwrap_or_default();
    let mut labels = meta.labels.unwrap_or_default();
    labels.insert(HASH_LABEL.into(), hash.into());
    if let Some(generation) = ds.metadata.generation {
        labels.insert(TEMPLATE_GENERATION_LABEL.into(), generation.to_string());
    }
    let mut spec = template.spec.unwrap_or_default();
    let mut tolerations = spec.tolerations.take().unwrap_or_default();
    let network = spec.host_network == Some(true);
    for (key, effect) in DAEMON_TOLERATIONS.iter().chain(network.then_some(&NETWORK_UNAVAILABLE)) {
        let present = tolerations.iter().any(|t| {
            t.key.as_deref() == Some(key)
                && t.effect.as_deref() == Some(effect)
                && t.operator.as_deref() == Some("Exists")
        });
        if !present {
            tolerations.push(Toleration {
                key: Some((*key).into()),
                operator: Some("Exists".into()),
                effect: Some((*effect).into()),
                ..Default::default()
            });
        }
    }
    spec.tolerations = Some(tolerations);
    // The controller has checked the node already; the one term left pins the pod to it.
    let affinity = spec.affinity.get_or_insert_with(Affinity::default);
    let node_affinity = affinity.node_affinity.get_or_insert_with(NodeAffinity::default);
    node_affinity.required_during_scheduling_ignored_during_execution = Some(NodeSelector {
        node_selector_terms: vec![NodeSelectorTerm {
            match_expressions: None,
            match_fields: Some(vec![NodeSelectorRequirement {
                key: "metadata.name".into(),
                operator: "In".into(),
                values: Some(vec![node.into()]),
            }]),
        }],
    });
    let mut owner = ds
        .controller_owner_ref(&())
        .expect("a stored DaemonSet has a name and uid");
    owner.block_owner_deletion = Some(true);
    Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", ds.name_any())),
            namespace: ds.namespace(),
            labels: Some(labels),
            annotations: meta.annotations,
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// Whether a daemon pod of `ds` belongs on `node`: it matches the node's labels and name and
/// tolerates every NoSchedule and NoExecute taint.
pub fn should_run(ds: &DaemonSet, node: &Node) -> bool {
    fits(ds, node, &["NoSchedule", "NoExecute"])
}

/// Whether a daemon pod already on `node` may stay there, as Kubernetes'
/// shouldContinueRunning: only a changed selector or an untolerated NoExecute taint removes it
/// (a NotReady node's NoSchedule taints do not).
pub fn should_continue_running(ds: &DaemonSet, node: &Node) -> bool {
    fits(ds, node, &["NoExecute"])
}

fn fits(ds: &DaemonSet, node: &Node, effects: &[&str]) -> bool {
    let pod = new_pod(ds, "", &node.name_any());
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.as_deref())
        .unwrap_or_default();
    let taints: &[Taint] = node.spec.as_ref().and_then(|s| s.taints.as_deref()).unwrap_or_default();
    // nodeSelector and the template's own required affinity (replaced in `new_pod`).
    let mut template_pod = pod.clone();
    if let Some(spec) = template_pod.spec.as_mut() {
        spec.affinity = ds.spec.template.spec.as_ref().and_then(|s| s.affinity.clone());
    }
    matches_node_selector(&template_pod, node)
        && taints
            .iter()
            .filter(|t| effects.contains(&t.effect.as_str()))
            .all(|t| tolerations.iter().any(|tol| tolerates(tol, t)))
}

fn terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

fn failed(pod: &Pod) -> bool {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed")
}

/// maxSurge and maxUnavailable of `desired` nodes, percentages rounded up as in Kubernetes;
/// without surge at least one pod may be unavailable, or nothing would ever be replaced.
pub fn rolling_limits(ds: &DaemonSet, desired: i32) -> (i32, i32) {
    let rolling = ds.spec.update_strategy.as_ref().and_then(|s| s.rolling_update.as_ref());
    let scaled = |value: Option<&IntOrString>, default: i32| {
        value
            .and_then(|v| scaled_value(v, desired, true))
            .map_or(default, |n| n.max(0))
    };
    let surge = scaled(rolling.and_then(|r| r.max_surge.as_ref()), 0);
    let unavailable = scaled(rolling.and_then(|r| r.max_unavailable.as_ref()), 1);
    (surge, if surge == 0 { unavailable.max(1) } else { unavailable })
}

/// What one reconcile should do.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Matching orphans the DaemonSet takes over.
    pub adopt: Vec<String>,
    /// Pods it owns whose labels no longer match its selector.
    pub release: Vec<String>,
    /// Nodes that need a daemon pod.
    pub create: Vec<String>,
    /// Pods to delete.
    pub delete: Vec<String>,
    pub status: DaemonSetStatus,
}

/// Pure decision over the DaemonSet, every node and the pods of its namespace.
pub fn plan(ds: &DaemonSet, nodes: &[Node], pods: &[Pod], hash: &str, now: jiff::Timestamp) -> Plan {
    let mut plan = Plan::default();
    let uid = ds.uid().unwrap_or_default();
    let min_ready = ds.spec.min_ready_seconds.unwrap_or(0) as i64;
    let claimed = claim(
        &ds.spec.selector,
        &uid,
        ds.metadata.deletion_timestamp.is_some(),
        pods,
        |p| target_node(p).is_some(),
    );
    plan.adopt = claimed.adopt;
    plan.release = claimed.release;
    let mut by_node: BTreeMap<&str, Vec<&Pod>> = BTreeMap::new();
    // A pod with no node to run on (not one this controller made) is left alone, as Kubernetes does.
    for pod in claimed.pods.into_iter().filter(|p| !terminating(p)) {
        if let Some(node) = target_node(pod) {
            by_node.entry(node).or_default().push(pod);
        }
    }
    let known: HashSet<String> = nodes.iter().map(|n| n.name_any()).collect();
    for (node, on_node) in &by_node {
        if !known.contains(*node) {
            plan.delete.extend(on_node.iter().map(|p| p.name_any()));
        }
    }
    let mut status = DaemonSetStatus {
        observed_generation: ds.metadata.generation,
        collision_count: Some(ds.status.as_ref().and_then(|s| s.collision_count).unwrap_or(0)),
        conditions: ds.status.as_ref().and_then(|s| s.conditions.clone()),
        ..Default::default()
    };
    let rolling = ds
        .spec
        .update_strategy
        .as_ref()
        .and_then(|s| s.type_.as_deref())
        .unwrap_or("RollingUpdate")
        == "RollingUpdate";
    let desired = nodes.iter().filter(|n| should_run(ds, n)).count() as i32;
    let (max_surge, max_unavailable) = rolling_limits(ds, desired);
    let surge = rolling && max_surge > 0;
    let updated = |p: &Pod| p.labels().get(HASH_LABEL).map(String::as_str) == Some(hash);
    // Per eligible node with pods: the old and the updated pod kept there.
    let mut slots: Vec<(String, Option<&Pod>, Option<&Pod>)> = Vec::new();
    let mut unavailable = 0;
    for node in nodes {
        let name = node.name_any();
        let on_node = by_node.get(name.as_str()).cloned().unwrap_or_default();
        if !should_run(ds, node) {
            if !on_node.is_empty() {
                status.number_misscheduled += 1;
            }
            if !should_continue_running(ds, node) {
                plan.delete.extend(on_node.iter().map(|p| p.name_any()));
            }
            continue;
        }
        status.desired_number_scheduled += 1;
        let (broken, mut live): (Vec<&Pod>, Vec<&Pod>) = on_node.into_iter().partition(|p| failed(p));
        plan.delete.extend(broken.iter().map(|p| p.name_any()));
        // One pod per node (an old and a new one while surging); a ready one, then the oldest, stays.
        live.sort_by_key(|p| (!is_ready(p), p.metadata.creation_timestamp.as_ref().map(|t| t.0)));
        let kept: Vec<&Pod> = if surge {
            let old = live.iter().find(|p| !updated(p)).copied();
            let new = live.iter().find(|p| updated(p)).copied();
            old.into_iter().chain(new).collect()
        } else {
            live.first().copied().into_iter().collect()
        };
        plan.delete.extend(
            live.iter()
                .filter(|p| !kept.iter().any(|k| std::ptr::eq(*k, **p)))
                .map(|p| p.name_any()),
        );
        // Status looks at the pod that has been there longest, as Kubernetes does.
        let Some(pod) = kept.first() else {
            unavailable += 1;
            if broken.is_empty() {
                plan.create.push(name);
            }
            continue;
        };
        status.current_number_scheduled += 1;
        let available = is_available(pod, min_ready, now);
        status.number_ready += i32::from(is_ready(pod));
        *status.number_available.get_or_insert(0) += i32::from(available);
        *status.updated_number_scheduled.get_or_insert(0) += i32::from(updated(pod));
        unavailable += i32::from(!available);
        let old = kept.iter().find(|p| !updated(p)).copied();
        let new = kept.iter().find(|p| updated(p)).copied();
        slots.push((name, old, new));
    }
    if surge {
        // A new pod starts next to each old one, at most maxSurge at a time; the old one goes
        // once the new one is available. An unavailable old pod is replaced at no cost.
        let mut surging = 0;
        let mut candidates = Vec::new();
        for (node, old, new) in slots {
            match (old, new) {
                (Some(old), None) if !is_available(old, min_ready, now) => plan.create.push(node),
                (Some(_), None) => candidates.push(node),
                (Some(old), Some(new)) if is_available(new, min_ready, now) => plan.delete.push(old.name_any()),
                (Some(_), Some(_)) => surging += 1,
                _ => {}
            }
        }
        let room = (max_surge - surging).clamp(0, candidates.len() as i32) as usize;
        plan.create.extend(candidates.into_iter().take(room));
    } else if rolling {
        // Old pods are deleted while fewer than maxUnavailable nodes lack an available pod.
        let mut budget = max_unavailable - unavailable;
        for old in slots.into_iter().filter_map(|(_, old, _)| old) {
            if !is_available(old, min_ready, now) {
                plan.delete.push(old.name_any());
            } else if budget > 0 {
                plan.delete.push(old.name_any());
                budget -= 1;
            }
        }
    }
    let available = status.number_available.unwrap_or(0);
    status.number_available = Some(available);
    status.updated_number_scheduled = Some(status.updated_number_scheduled.unwrap_or(0));
    status.number_unavailable = Some(status.desired_number_scheduled - available);
    plan.status = status;
    plan
}

struct Ctx {
    client: Client,
    recorder: Recorder,
}

async fn reconcile(ds: Arc<DaemonSet>, ctx: Arc<Ctx>) -> Result<Action> {
    let ns = ds.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let name = ds.name_any();
    let uid = ds.uid().ok_or(Error::MissingField("metadata.uid"))?;
    if ds.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let revisions_api: Api<ControllerRevision> = Api::namespaced(ctx.client.clone(), &ns);
    let mut owner = ds
        .controller_owner_ref(&())
        .ok_or(Error::MissingField("metadata.name"))?;
    owner.block_owner_deletion = Some(true);
    let listed_revisions = revisions_api.list(&ListParams::default()).await?.items;
    let listed_revisions = history::adopt_orphans(&revisions_api, &owner, &ds.spec.selector, listed_revisions).await?;
    let revisions = history::owned(&listed_revisions, &uid);
    let collisions = ds.status.as_ref().and_then(|s| s.collision_count).unwrap_or(0);
    let (update, collisions) =
        history::ensure(&revisions_api, ds.as_ref(), &revisions, &ds.spec.template, collisions).await?;
    let hash = update
        .labels()
        .get(HASH_LABEL)
        .cloned()
        .ok_or(Error::MissingField("ControllerRevision label controller-revision-hash"))?;
    let nodes = Api::<Node>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let listed = pods.list(&ListParams::default()).await?.items;
    let mut plan = plan(&ds, &nodes, &listed, &hash, jiff::Timestamp::now());
    plan.status.collision_count = Some(collisions);
    for pod in &plan.adopt {
        set_owner(&pods, &listed, pod, &owner, true).await?;
    }
    for pod in &plan.release {
        set_owner(&pods, &listed, pod, &owner, false).await?;
    }
    for node in &plan.create {
        match pods.create(&PostParams::default(), &new_pod(&ds, &hash, node)).await {
            Ok(p) => {
                tracing::info!(namespace = %ns, daemonset = %name, pod = %p.name_any(), node = %node, "created pod");
                let message = format!("Created pod: {}", p.name_any());
                ctx.recorder
                    .publish(ds.as_ref(), EventType::Normal, "SuccessfulCreate", &message)
                    .await;
            }
            Err(e) => {
                let message = format!("Error creating: {e}");
                ctx.recorder
                    .publish(ds.as_ref(), EventType::Warning, "FailedCreate", &message)
                    .await;
                return Err(e.into());
            }
        }
    }
    for pod in &plan.delete {
        match pods.delete(pod, &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(namespace = %ns, daemonset = %name, pod = %pod, "deleted pod");
                let message = format!("Deleted pod: {pod}");
                ctx.recorder
                    .publish(ds.as_ref(), EventType::Normal, "SuccessfulDelete", &message)
                    .await;
            }
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let sets: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ns);
    write_status(&sets, &name, ds.status.as_ref(), &plan.status).await?;
    let mut live: HashSet<String> = [update.name_any()].into();
    let worn: HashSet<&str> = listed
        .iter()
        .filter(|p| controlled_by(*p, &uid))
        .filter_map(|p| p.labels().get(HASH_LABEL).map(String::as_str))
        .collect();
    live.extend(
        revisions
            .iter()
            .filter(|r| r.labels().get(HASH_LABEL).is_some_and(|h| worn.contains(h.as_str())))
            .map(|r| r.name_any()),
    );
    let limit = ds.spec.revision_history_limit.unwrap_or(10);
    history::delete(&revisions_api, &history::prune(&revisions, limit, &live)).await?;
    let waiting = plan.status.number_ready != plan.status.number_available.unwrap_or(0);
    Ok(if waiting {
        Action::requeue(Duration::from_secs(1))
    } else {
        Action::await_change()
    })
}

fn error_policy(ds: Arc<DaemonSet>, e: &Error, _: Arc<Ctx>) -> Action {
    tracing::warn!(daemonset = %ds.name_any(), error = %e, "daemonset reconcile failed");
    Action::requeue(Duration::from_secs(1))
}

pub async fn run(client: Client) -> Result<()> {
    let controller = Controller::new(Api::<DaemonSet>::all(client.clone()), watcher::Config::default());
    let sets = controller.store();
    controller
        .owns(Api::<Pod>::all(client.clone()), watcher::Config::default())
        .owns(
            Api::<ControllerRevision>::all(client.clone()),
            watcher::Config::default(),
        )
        // Orphans pinned to a node: the DaemonSet whose selector matches may adopt them.
        .watches(Api::<Pod>::all(client.clone()), watcher::Config::default(), {
            let sets = sets.clone();
            move |pod: Pod| {
                if controller_of(&pod).is_some() || target_node(&pod).is_none() {
                    return Vec::new();
                }
                sets.state()
                    .into_iter()
                    .filter(|ds| ds.namespace() == pod.namespace())
                    .filter(|ds| selects(&ds.spec.selector, pod.labels()))
                    .map(|ds| ObjectRef::from_obj(ds.as_ref()))
                    .collect()
            }
        })
        // Any node change may add or remove a daemon pod of every DaemonSet.
        .watches(
            Api::<Node>::all(client.clone()),
            watcher::Config::default(),
            move |_: Node| {
                sets.state()
                    .iter()
                    .map(|ds| ObjectRef::from_obj(ds.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .run(
            reconcile,
            error_policy,
            Arc::new(Ctx {
                recorder: Recorder::new(client.clone(), "daemonset-controller"),
                client,
            }),
        )
        .for_each(|_| futures::future::ready(()))
        .await;
    Err(Error::Ended("the daemonset controller"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet};
    use k8s_openapi::api::core::v1::{NodeSpec, PodCondition, PodSpec, PodStatus, PodTemplateSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};

    fn ds(node_selector: Option<(&str, &str)>) -> DaemonSet {
        let labels: BTreeMap<String, String> = [("app".to_string(), "agent".to_string())].into();
        DaemonSet {
            metadata: ObjectMeta {
                name: Some("agent".into()),
                namespace: Some("default".into()),
                uid: Some("ds-uid".into()),
                generation: Some(4),
                ..Default::default()
            },
            spec: DaemonSetSpec {
                selector: LabelSelector {
                    match_labels: Some(labels.clone()),
                    ..Default::default()
                },
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(labels),
                        ..Default::default()
                    }),
                    spec: Some(PodSpec {
                        node_selector: node_selector.map(|(k, v)| [(k.to_string(), v.to_string())].into()),
                        ..Default::default()
                    }),
                },
                ..Default::default()
            },
            status: None,
        }
    }

    fn node(name: &str, labels: &[(&str, &str)], taints: Vec<Taint>) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                taints: Some(taints),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn taint(key: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            effect: effect.into(),
            ..Default::default()
        }
    }

    fn daemon(d: &DaemonSet, name: &str, node: &str, hash: &str, ready: bool) -> Pod {
        let mut p = new_pod(d, hash, node);
        p.metadata.name = Some(name.into());
        p.spec.as_mut().unwrap().node_name = Some(node.into());
        p.status = Some(PodStatus {
            phase: Some(if ready { "Running" } else { "Pending" }.into()),
            conditions: ready.then(|| {
                vec![PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        });
        p
    }

    fn now() -> jiff::Timestamp {
        jiff::Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_secs(2000)
    }

    #[test]
    fn eligibility_follows_selector_affinity_and_taints() {
        let plain = node("a", &[("role", "edge")], vec![]);
        let other = node("b", &[("role", "core")], vec![]);
        let tainted = node("c", &[("role", "edge")], vec![taint("dedicated", "NoSchedule")]);
        let soft = node("d", &[("role", "edge")], vec![taint("dedicated", "PreferNoSchedule")]);
        let cordoned = node(
            "e",
            &[("role", "edge")],
            vec![taint("node.kubernetes.io/unschedulable", "NoSchedule")],
        );
        let not_ready = node(
            "f",
            &[("role", "edge")],
            vec![taint("node.kubernetes.io/not-ready", "NoExecute")],
        );
        let d = ds(Some(("role", "edge")));
        assert!(should_run(&d, &plain));
        assert!(!should_run(&d, &other), "nodeSelector");
        assert!(!should_run(&d, &tainted), "untolerated NoSchedule taint");
        assert!(should_run(&d, &soft), "PreferNoSchedule does not repel");
        assert!(should_run(&d, &cordoned), "daemons tolerate cordoned nodes");
        assert!(should_run(&d, &not_ready), "daemons tolerate not-ready nodes");
        let mut tolerant = ds(None);
        tolerant.spec.template.spec.as_mut().unwrap().tolerations = Some(vec![Toleration {
            key: Some("dedicated".into()),
            operator: Some("Exists".into()),
            ..Default::default()
        }]);
        assert!(should_run(&tolerant, &tainted));
        let mut affine = ds(None);
        affine.spec.template.spec.as_mut().unwrap().affinity = Some(Affinity {
            node_affinity: Some(NodeAffinity {
                required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(vec![NodeSelectorRequirement {
                            key: "role".into(),
                            operator: "In".into(),
                            values: Some(vec!["core".into()]),
                        }]),
                        match_fields: None,
                    }],
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert!(
            should_run(&affine, &other) && !should_run(&affine, &plain),
            "required affinity"
        );
    }

    #[test]
    fn a_daemon_pod_is_pinned_to_its_node_and_tolerates_node_trouble() {
        let p = new_pod(&ds(None), "h1", "n1");
        assert_eq!(p.metadata.generate_name.as_deref(), Some("agent-"));
        assert_eq!(p.labels().get(HASH_LABEL).map(String::as_str), Some("h1"));
        assert_eq!(p.labels().get(TEMPLATE_GENERATION_LABEL).map(String::as_str), Some("4"));
        assert_eq!(target_node(&p), Some("n1"));
        let spec = p.spec.as_ref().unwrap();
        assert!(spec.node_name.is_none(), "the scheduler binds it");
        let tolerations = spec.tolerations.as_ref().unwrap();
        assert_eq!(tolerations.len(), DAEMON_TOLERATIONS.len());
        assert!(
            tolerations
                .iter()
                .any(|t| t.key.as_deref() == Some("node.kubernetes.io/unreachable")
                    && t.effect.as_deref() == Some("NoExecute"))
        );
        let n1 = node("n1", &[], vec![]);
        let n2 = node("n2", &[], vec![]);
        assert!(matches_node_selector(&p, &n1) && !matches_node_selector(&p, &n2));
    }

    #[test]
    fn each_eligible_node_gets_one_pod_and_others_lose_theirs() {
        let d = ds(Some(("role", "edge")));
        let nodes = [
            node("a", &[("role", "edge")], vec![]),
            node("b", &[("role", "edge")], vec![]),
            node("c", &[("role", "core")], vec![]),
        ];
        let pods = [
            daemon(&d, "on-a", "a", "h", true),
            daemon(&d, "on-c", "c", "h", true),
            daemon(&d, "on-gone", "gone", "h", true),
        ];
        let p = plan(&d, &nodes, &pods, "h", now());
        assert_eq!(p.create, ["b"]);
        let mut deleted = p.delete.clone();
        deleted.sort();
        assert_eq!(deleted, ["on-c", "on-gone"]);
        let s = &p.status;
        assert_eq!(
            (
                s.desired_number_scheduled,
                s.current_number_scheduled,
                s.number_misscheduled,
                s.number_ready
            ),
            (2, 1, 1, 1)
        );
        assert_eq!((s.number_available, s.number_unavailable), (Some(1), Some(1)));
        assert_eq!(s.updated_number_scheduled, Some(1));
        assert_eq!(s.observed_generation, Some(4));
    }

    #[test]
    fn an_unreachable_nodes_daemon_pod_stays_until_a_no_execute_taint_repels_it() {
        let d = ds(None);
        // A silent node: NoSchedule and NoExecute unreachable taints; daemons tolerate only the
        // NoExecute one, so no new pod goes there but the running one stays.
        let unreachable = node(
            "a",
            &[],
            vec![
                taint("node.kubernetes.io/unreachable", "NoSchedule"),
                taint("node.kubernetes.io/unreachable", "NoExecute"),
            ],
        );
        assert!(!should_run(&d, &unreachable) && should_continue_running(&d, &unreachable));
        let pods = [daemon(&d, "on-a", "a", "h", true)];
        let p = plan(&d, std::slice::from_ref(&unreachable), &pods, "h", now());
        assert!(p.delete.is_empty() && p.create.is_empty());
        // An untolerated NoExecute taint removes it.
        let evicting = node("a", &[], vec![taint("maintenance", "NoExecute")]);
        let p = plan(&d, &[evicting], &pods, "h", now());
        assert_eq!(p.delete, ["on-a"]);
    }

    #[test]
    fn duplicates_and_failed_pods_are_removed() {
        let d = ds(None);
        let nodes = [node("a", &[], vec![]), node("b", &[], vec![])];
        let mut broken = daemon(&d, "broken", "b", "h", false);
        broken.status.as_mut().unwrap().phase = Some("Failed".into());
        let pods = [
            daemon(&d, "ready", "a", "h", true),
            daemon(&d, "extra", "a", "h", false),
            broken,
        ];
        let p = plan(&d, &nodes, &pods, "h", now());
        assert_eq!(p.delete, ["extra", "broken"]);
        assert!(p.create.is_empty(), "b gets its new pod on the next pass");
    }

    #[test]
    fn rolling_update_replaces_at_most_max_unavailable_at_a_time() {
        let mut d = ds(None);
        let nodes: Vec<_> = ["a", "b", "c", "d"].iter().map(|n| node(n, &[], vec![])).collect();
        let pods: Vec<_> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| daemon(&d, &format!("old-{n}"), n, "old", true))
            .collect();
        assert_eq!(plan(&d, &nodes, &pods, "new", now()).delete, ["old-a"]);
        // One node already without a pod uses the whole budget.
        assert!(plan(&d, &nodes, &pods[1..], "new", now()).delete.is_empty());
        d.spec.update_strategy = Some(DaemonSetUpdateStrategy {
            type_: Some("RollingUpdate".into()),
            rolling_update: Some(RollingUpdateDaemonSet {
                max_unavailable: Some(IntOrString::String("50%".into())),
                max_surge: None,
            }),
        });
        assert_eq!(plan(&d, &nodes, &pods, "new", now()).delete, ["old-a", "old-b"]);
        // An unavailable old pod is replaced regardless of the budget.
        let mut pods2 = pods.clone();
        pods2[3] = daemon(&d, "old-d", "d", "old", false);
        assert_eq!(plan(&d, &nodes, &pods2, "new", now()).delete, ["old-a", "old-d"]);
        d.spec.update_strategy = Some(DaemonSetUpdateStrategy {
            type_: Some("OnDelete".into()),
            rolling_update: None,
        });
        assert!(plan(&d, &nodes, &pods, "new", now()).delete.is_empty());
    }

    #[test]
    fn limits_round_percentages_up_and_allow_one_unavailable_without_surge() {
        let mut d = ds(None);
        assert_eq!(rolling_limits(&d, 10), (0, 1));
        for (surge, unavailable, want) in [("0", "25%", (0, 3)), ("0", "0%", (0, 1)), ("10%", "0", (1, 0))] {
            let value = |v: &str| match v.parse() {
                Ok(n) => IntOrString::Int(n),
                Err(_) => IntOrString::String(v.into()),
            };
            d.spec.update_strategy = Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_unavailable: Some(value(unavailable)),
                    max_surge: Some(value(surge)),
                }),
            });
            assert_eq!(rolling_limits(&d, 10), want, "surge {surge}, unavailable {unavailable}");
        }
    }

    #[test]
    fn surge_starts_new_pods_beside_old_ones_and_removes_old_ones_once_available() {
        let mut d = ds(None);
        d.spec.update_strategy = Some(DaemonSetUpdateStrategy {
            type_: Some("RollingUpdate".into()),
            rolling_update: Some(RollingUpdateDaemonSet {
                max_unavailable: Some(IntOrString::Int(0)),
                max_surge: Some(IntOrString::Int(1)),
            }),
        });
        let nodes: Vec<_> = ["a", "b", "c"].iter().map(|n| node(n, &[], vec![])).collect();
        let mut pods: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|n| daemon(&d, &format!("old-{n}"), n, "old", true))
            .collect();
        let p = plan(&d, &nodes, &pods, "new", now());
        assert_eq!((p.create.clone(), p.delete.clone()), (vec!["a".to_string()], vec![]));
        pods.push(daemon(&d, "new-a", "a", "new", false));
        let p = plan(&d, &nodes, &pods, "new", now());
        assert!(p.create.is_empty() && p.delete.is_empty(), "one surge pod at a time");
        assert_eq!(p.status.number_available, Some(3), "the old pods keep serving");
        pods[3] = daemon(&d, "new-a", "a", "new", true);
        let p = plan(&d, &nodes, &pods, "new", now());
        assert_eq!(p.delete, ["old-a"]);
        // An unavailable old pod gets its replacement outside the surge budget, which goes to c.
        pods[1] = daemon(&d, "old-b", "b", "old", false);
        let p = plan(&d, &nodes, &pods, "new", now());
        assert_eq!(p.create, ["b", "c"]);
        assert_eq!(p.delete, ["old-a"]);
    }

    #[test]
    fn matching_orphans_are_adopted_in_place() {
        let d = ds(None);
        let mut orphan = daemon(&d, "orphan", "a", "h", true);
        orphan.metadata.owner_references = None;
        let mut nowhere = orphan.clone();
        nowhere.metadata.name = Some("nowhere".into());
        nowhere.spec = Some(PodSpec::default());
        let p = plan(&d, &[node("a", &[], vec![])], &[orphan, nowhere], "h", now());
        assert_eq!(p.adopt, ["orphan"], "a pod bound to no node is not a daemon");
        assert!(p.create.is_empty() && p.delete.is_empty());
    }

    #[test]
    fn terminating_pods_do_not_count() {
        let d = ds(None);
        let mut going = daemon(&d, "going", "a", "h", true);
        going.metadata.deletion_timestamp = Some(Time(now()));
        let p = plan(&d, &[node("a", &[], vec![])], &[going], "h", now());
        assert_eq!(p.create, ["a"]);
        assert!(p.delete.is_empty());
    }
}
