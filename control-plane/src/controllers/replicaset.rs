//! The ReplicaSet controller: keeps `spec.replicas` Pods matching each ReplicaSet's selector,
//! adopting matching orphans, releasing Pods that stop matching, and writes the status. Touches
//! only Pods it owns or adopts, and ReplicaSet status.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use super::events::{EventType, Recorder};

/// Pods one reconcile creates at most, as Kubernetes' burstReplicas.
const BURST_REPLICAS: usize = 500;
use super::{Error, Result, controller_of, is_status, write_status};

/// Whether `selector` selects `labels`; an empty selector selects nothing, as for ReplicaSets.
pub fn selects(selector: &LabelSelector, labels: &std::collections::BTreeMap<String, String>) -> bool {
    let exprs = selector.match_expressions.as_deref().unwrap_or_default();
    let match_labels = selector.match_labels.as_ref();
    if exprs.is_empty() && match_labels.is_none_or(|m| m.is_empty()) {
        return false;
    }
    match_labels
        .into_iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v))
        && exprs.iter().all(|e| {
            let values = e.values.as_deref().unwrap_or_default();
            let value = labels.get(&e.key);
            match e.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}

pub(crate) fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Ready for at least `min_ready_seconds` at `now`.
pub(crate) fn is_available(pod: &Pod, min_ready_seconds: i64, now: jiff::Timestamp) -> bool {
    let Some(cond) = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready" && c.status == "True"))
    else {
        return false;
    };
    min_ready_seconds <= 0
        || cond.last_transition_time.as_ref().is_none_or(|t| {
            t.0.checked_add(jiff::SignedDuration::from_secs(min_ready_seconds))
                .is_ok_and(|ready| ready <= now)
        })
}

pub(crate) fn is_active(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && !matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
}

/// The pods a controller (`uid`, `selector`) has after adoption and release, as Kubernetes'
/// ClaimPods: its own pods that still match, plus matching live orphans that `member` accepts.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Claimed<'a> {
    pub pods: Vec<&'a Pod>,
    /// Orphans to take over (also in `pods`).
    pub adopt: Vec<String>,
    /// Owned pods whose labels no longer match.
    pub release: Vec<String>,
}

pub(crate) fn claim<'a>(
    selector: &LabelSelector,
    uid: &str,
    owner_deleting: bool,
    pods: &'a [Pod],
    member: impl Fn(&Pod) -> bool,
) -> Claimed<'a> {
    let mut claimed = Claimed::default();
    for pod in pods {
        let matches = selects(selector, pod.labels());
        match controller_of(pod) {
            Some(o) if o.uid == uid => {
                if matches {
                    claimed.pods.push(pod);
                } else {
                    claimed.release.push(pod.name_any());
                }
            }
            None if matches && !owner_deleting && is_active(pod) && member(pod) => {
                claimed.adopt.push(pod.name_any());
                claimed.pods.push(pod);
            }
            _ => {}
        }
    }
    claimed
}

/// Adds `owner` to the named pod's ownerReferences (adopt) or removes `owner.uid` from them
/// (release), guarded by the listed resourceVersion; a pod gone or changed meanwhile is skipped.
pub(crate) async fn set_owner(
    pods: &Api<Pod>,
    listed: &[Pod],
    name: &str,
    owner: &OwnerReference,
    adopt: bool,
) -> Result<()> {
    let Some(current) = listed.iter().find(|p| p.name_any() == name) else {
        return Ok(());
    };
    let mut refs: Vec<_> = current
        .owner_references()
        .iter()
        .filter(|o| o.uid != owner.uid)
        .cloned()
        .collect();
    if adopt {
        refs.push(owner.clone());
    }
    let patch = json!({"metadata": {"ownerReferences": refs, "resourceVersion": current.resource_version()}});
    match pods.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => {
            let action = if adopt { "adopted" } else { "released" };
            tracing::info!(namespace = ?current.namespace(), owner = %owner.name, pod = %name, "{action}");
            Ok(())
        }
        Err(e) if is_status(&e, 404) || is_status(&e, 409) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// What one reconcile should do.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Orphans to take over.
    pub adopt: Vec<String>,
    /// Owned pods whose labels no longer match.
    pub release: Vec<String>,
    pub create: usize,
    /// Pods to delete, the least useful first.
    pub delete: Vec<String>,
    pub status: ReplicaSetStatus,
}

/// Pure decision over the ReplicaSet and every Pod in its namespace.
pub fn plan(rs: &ReplicaSet, pods: &[Pod], now: jiff::Timestamp) -> Plan {
    let mut plan = Plan::default();
    let uid = rs.uid().unwrap_or_default();
    let spec = Some(&rs.spec);
    let selector = spec.map(|s| s.selector.clone()).unwrap_or_default();
    let deleting = rs.metadata.deletion_timestamp.is_some();
    let claimed = claim(&selector, &uid, deleting, pods, |_| true);
    plan.adopt = claimed.adopt;
    plan.release = claimed.release;
    let active: Vec<&Pod> = claimed.pods.into_iter().filter(|p| is_active(p)).collect();
    let want = spec.and_then(|s| s.replicas).unwrap_or(1).max(0) as usize;
    if !deleting {
        if active.len() < want {
            plan.create = want - active.len();
        } else if active.len() > want {
            let mut victims = active.clone();
            // Unscheduled, then pending, then not ready, then the youngest go first.
            victims.sort_by_key(|p| {
                let scheduled = p
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_ref())
                    .is_some_and(|n| !n.is_empty());
                let running = p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                let created = p.metadata.creation_timestamp.as_ref().map(|t| t.0);
                (scheduled, running, is_ready(p), std::cmp::Reverse(created))
            });
            plan.delete = victims[..active.len() - want].iter().map(|p| p.name_any()).collect();
        }
    }
    let template_labels = spec
        .and_then(|s| s.template.as_ref())
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let min_ready = spec.and_then(|s| s.min_ready_seconds).unwrap_or(0) as i64;
    let count = |f: &dyn Fn(&Pod) -> bool| active.iter().filter(|p| f(p)).count() as i32;
    plan.status = ReplicaSetStatus {
        replicas: active.len() as i32,
        fully_labeled_replicas: Some(count(&|p| {
            template_labels.iter().all(|(k, v)| p.labels().get(k) == Some(v))
        })),
        ready_replicas: Some(count(&is_ready)),
        available_replicas: Some(count(&|p| is_available(p, min_ready, now))),
        observed_generation: rs.metadata.generation,
        conditions: rs.status.as_ref().and_then(|s| s.conditions.clone()),
        terminating_replicas: None,
    };
    plan
}

fn owner_ref(rs: &ReplicaSet) -> OwnerReference {
    let mut o = rs
        .controller_owner_ref(&())
        .expect("a stored ReplicaSet has a name and uid");
    o.block_owner_deletion = Some(true);
    o
}

/// A new Pod from the template: `<rs>-<5 random characters>`.
pub fn new_pod(rs: &ReplicaSet) -> Pod {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let suffix: String = (0..5)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect();
    let template = rs.spec.template.clone().unwrap_or_default();
    let meta = template.metadata.unwrap_or_default();
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("{}-{suffix}", rs.name_any())),
            namespace: rs.namespace(),
            labels: meta.labels,
            annotations: meta.annotations,
            owner_references: Some(vec![owner_ref(rs)]),
            ..Default::default()
        },
        spec: template.spec,
        ..Default::default()
    }
}

struct Ctx {
    client: Client,
    recorder: Recorder,
}

async fn reconcile(rs: Arc<ReplicaSet>, ctx: Arc<Ctx>) -> Result<Action> {
    let ns = rs.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let name = rs.name_any();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let listed = pods.list(&ListParams::default()).await?.items;
    let plan = plan(&rs, &listed, jiff::Timestamp::now());
    let owner = owner_ref(&rs);
    for pod in &plan.adopt {
        set_owner(&pods, &listed, pod, &owner, true).await?;
    }
    for pod in &plan.release {
        set_owner(&pods, &listed, pod, &owner, false).await?;
    }
    // Creates go out in batches of 1, 2, 4, ... as Kubernetes' slowStartBatch does: a pod that
    // cannot be created (quota, invalid template) fails the first small batch instead of
    // hundreds of requests; at most BURST_REPLICAS per reconcile.
    let mut remaining = plan.create.min(BURST_REPLICAS);
    let mut batch = 1;
    while remaining > 0 {
        let n = batch.min(remaining);
        let new_pods: Vec<Pod> = (0..n).map(|_| new_pod(&rs)).collect();
        let params = PostParams::default();
        let results = futures::future::join_all(new_pods.iter().map(|p| pods.create(&params, p))).await;
        for result in results {
            match result {
                Ok(p) => {
                    tracing::debug!(namespace = %ns, replicaset = %name, pod = %p.name_any(), "created pod");
                    let message = format!("Created pod: {}", p.name_any());
                    ctx.recorder
                        .publish(rs.as_ref(), EventType::Normal, "SuccessfulCreate", &message)
                        .await;
                }
                // A name collision: the next reconcile tries again.
                Err(e) if is_status(&e, 409) => {}
                Err(e) => return Err(e.into()),
            }
        }
        remaining -= n;
        batch *= 2;
    }
    let deletions = futures::future::join_all(plan.delete.iter().map(|pod| {
        let pods = &pods;
        async move { (pod, pods.delete(pod, &DeleteParams::default()).await) }
    }))
    .await;
    for (pod, result) in deletions {
        match result {
            Ok(_) => {
                tracing::debug!(namespace = %ns, replicaset = %name, pod = %pod, "deleted pod");
                let message = format!("Deleted pod: {pod}");
                ctx.recorder
                    .publish(rs.as_ref(), EventType::Normal, "SuccessfulDelete", &message)
                    .await;
            }
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if plan.create > BURST_REPLICAS {
        return Ok(Action::requeue(Duration::from_millis(10)));
    }
    let before = rs.status.clone().unwrap_or_default();
    let sets: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &ns);
    write_status(&sets, &name, Some(&before), &plan.status).await?;
    // Pods that are ready but not yet available for minReadySeconds need a look later.
    let waiting = plan.status.ready_replicas != plan.status.available_replicas;
    Ok(if waiting {
        Action::requeue(Duration::from_secs(1))
    } else {
        Action::await_change()
    })
}

fn error_policy(rs: Arc<ReplicaSet>, e: &Error, _: Arc<Ctx>) -> Action {
    tracing::warn!(replicaset = %rs.name_any(), error = %e, "replicaset reconcile failed");
    Action::requeue(Duration::from_secs(1))
}

pub async fn run(client: Client) -> Result<()> {
    let controller = Controller::new(Api::<ReplicaSet>::all(client.clone()), watcher::Config::default());
    let sets = controller.store();
    controller
        .owns(Api::<Pod>::all(client.clone()), watcher::Config::default())
        // Orphans: every ReplicaSet whose selector matches them may adopt them.
        .watches(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default(),
            move |pod: Pod| {
                if controller_of(&pod).is_some() {
                    return Vec::new();
                }
                sets.state()
                    .into_iter()
                    .filter(|rs| rs.namespace() == pod.namespace())
                    .filter(|rs| selects(&rs.spec.selector, pod.labels()))
                    .map(|rs| ObjectRef::from_obj(rs.as_ref()))
                    .collect()
            },
        )
        .run(
            reconcile,
            error_policy,
            Arc::new(Ctx {
                recorder: Recorder::new(client.clone(), "replicaset-controller"),
                client,
            }),
        )
        .for_each(|_| futures::future::ready(()))
        .await;
    Err(Error::Ended("the replicaset controller"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::ReplicaSetSpec;
    use k8s_openapi::api::core::v1::{PodCondition, PodSpec, PodStatus, PodTemplateSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelectorRequirement, Time};
    use std::collections::BTreeMap;

    fn labels(app: &str) -> BTreeMap<String, String> {
        [("app".to_string(), app.to_string())].into()
    }

    fn rs(replicas: i32) -> ReplicaSet {
        ReplicaSet {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("default".into()),
                uid: Some("rs-uid".into()),
                generation: Some(3),
                ..Default::default()
            },
            spec: ReplicaSetSpec {
                replicas: Some(replicas),
                selector: LabelSelector {
                    match_labels: Some(labels("web")),
                    ..Default::default()
                },
                template: Some(PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(labels("web")),
                        ..Default::default()
                    }),
                    spec: Some(PodSpec::default()),
                }),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn pod(name: &str, app: &str, owned: bool, node: Option<&str>, ready: bool, age_s: i64) -> Pod {
        let set = rs(1);
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(labels(app)),
                owner_references: owned.then(|| vec![owner_ref(&set)]),
                creation_timestamp: Some(Time(
                    jiff::Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_secs(1000 - age_s),
                )),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: node.map(Into::into),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(if ready { "Running" } else { "Pending" }.into()),
                conditions: ready.then(|| {
                    vec![PodCondition {
                        type_: "Ready".into(),
                        status: "True".into(),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            }),
        }
    }

    fn now() -> jiff::Timestamp {
        jiff::Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_secs(2000)
    }

    #[test]
    fn missing_replicas_are_created_from_the_template() {
        let p = plan(&rs(3), &[pod("web-a", "web", true, Some("n"), true, 10)], now());
        assert_eq!(p.create, 2);
        assert!(p.delete.is_empty());
        assert_eq!(p.status.replicas, 1);
        assert_eq!(p.status.ready_replicas, Some(1));
        assert_eq!(p.status.observed_generation, Some(3));
        let new = new_pod(&rs(3));
        assert!(new.name_any().starts_with("web-") && new.name_any().len() == 9);
        assert_eq!(new.labels(), &labels("web"));
        assert_eq!(new.owner_references()[0].controller, Some(true));
    }

    #[test]
    fn matching_orphans_are_adopted_and_count() {
        let pods = [
            pod("orphan", "web", false, None, false, 1),
            pod("other", "db", false, None, false, 1),
        ];
        let p = plan(&rs(2), &pods, now());
        assert_eq!(p.adopt, ["orphan"]);
        assert_eq!(p.create, 1);
    }

    #[test]
    fn owned_pods_that_stop_matching_are_released_and_replaced() {
        let p = plan(&rs(1), &[pod("relabelled", "debug", true, Some("n"), true, 5)], now());
        assert_eq!(p.release, ["relabelled"]);
        assert_eq!(p.create, 1);
    }

    #[test]
    fn scale_down_deletes_unscheduled_then_not_ready_then_youngest() {
        let pods = [
            pod("ready-old", "web", true, Some("n"), true, 100),
            pod("ready-young", "web", true, Some("n"), true, 1),
            pod("not-ready", "web", true, Some("n"), false, 50),
            pod("unscheduled", "web", true, None, false, 200),
        ];
        assert_eq!(
            plan(&rs(1), &pods, now()).delete,
            ["unscheduled", "not-ready", "ready-young"]
        );
        assert_eq!(plan(&rs(3), &pods, now()).delete, ["unscheduled"]);
    }

    #[test]
    fn pods_of_other_controllers_and_terminating_pods_are_ignored() {
        let mut foreign = pod("foreign", "web", false, None, true, 1);
        foreign.metadata.owner_references = Some(vec![OwnerReference {
            uid: "other".into(),
            controller: Some(true),
            ..Default::default()
        }]);
        let mut going = pod("going", "web", true, Some("n"), true, 1);
        going.metadata.deletion_timestamp = Some(Time(now()));
        let p = plan(&rs(1), &[foreign, going], now());
        assert!(p.adopt.is_empty() && p.delete.is_empty());
        assert_eq!(p.create, 1);
    }

    #[test]
    fn availability_waits_for_min_ready_seconds() {
        let mut set = rs(1);
        set.spec.min_ready_seconds = Some(30);
        let mut p = pod("web-a", "web", true, Some("n"), true, 10);
        p.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].last_transition_time =
            Some(Time(now() - jiff::SignedDuration::from_secs(10)));
        let status = plan(&set, &[p], now()).status;
        assert_eq!((status.ready_replicas, status.available_replicas), (Some(1), Some(0)));
    }

    #[test]
    fn selector_expressions_match_labels() {
        let sel = LabelSelector {
            match_expressions: Some(vec![
                LabelSelectorRequirement {
                    key: "app".into(),
                    operator: "In".into(),
                    values: Some(vec!["web".into(), "api".into()]),
                },
                LabelSelectorRequirement {
                    key: "canary".into(),
                    operator: "DoesNotExist".into(),
                    values: None,
                },
            ]),
            ..Default::default()
        };
        assert!(selects(&sel, &labels("api")));
        assert!(!selects(&sel, &labels("db")));
        let mut canary = labels("web");
        canary.insert("canary".into(), "1".into());
        assert!(!selects(&sel, &canary));
        assert!(!selects(&LabelSelector::default(), &labels("web")));
    }
}
