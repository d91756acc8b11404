//! The StatefulSet controller: pods with stable names `<set>-<ordinal>`, one claim per volume
//! claim template and ordinal (kept when the pod goes), ordered or parallel pod management,
//! RollingUpdate (with partition) and OnDelete over ControllerRevisions, and the status.
//! Touches only pods and revisions the set controls, and the claims named after it.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{ControllerRevision, StatefulSet, StatefulSetStatus};
use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimVolumeSource, Pod, PodTemplateSpec, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use super::events::{EventType, Recorder};
use super::history::{self, HASH_LABEL};
use super::replicaset::{claim, is_available, is_ready, selects, set_owner};
use super::{Error, Result, controller_of, is_status, scaled_value, write_status};

pub const POD_NAME_LABEL: &str = "statefulset.kubernetes.io/pod-name";
pub const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";

/// The ordinal in `<set>-<ordinal>`, if `pod` is named as a member of `set`.
pub fn ordinal_of(set: &str, pod: &str) -> Option<i32> {
    let digits = pod.strip_prefix(set)?.strip_prefix('-')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// `<template>-<set>-<ordinal>`, the claim of one volume claim template for one ordinal.
pub fn claim_name(template: &str, set: &str, ordinal: i32) -> String {
    format!("{template}-{set}-{ordinal}")
}

fn running_and_ready(pod: &Pod) -> bool {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") && is_ready(pod)
}

fn terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

fn failed(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Failed" | "Succeeded")
    )
}

fn revision_of(pod: &Pod) -> Option<&str> {
    pod.labels().get(HASH_LABEL).map(String::as_str)
}

fn set_ref(set: &StatefulSet, controller: bool) -> OwnerReference {
    let mut o = set
        .controller_owner_ref(&())
        .expect("a stored StatefulSet has a name and uid");
    o.controller = Some(controller);
    o.block_owner_deletion = Some(true);
    o
}

fn pod_ref(pod: &Pod) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: "v1".into(),
        kind: "Pod".into(),
        name: pod.metadata.name.clone()?,
        uid: pod.metadata.uid.clone()?,
        controller: Some(false),
        block_owner_deletion: Some(true),
    })
}

fn retention(set: &StatefulSet) -> (bool, bool) {
    let policy = set.spec.persistent_volume_claim_retention_policy.as_ref();
    let delete = |p: Option<&String>| p.map(String::as_str) == Some("Delete");
    (
        delete(policy.and_then(|p| p.when_deleted.as_ref())),
        delete(policy.and_then(|p| p.when_scaled.as_ref())),
    )
}

/// rollingUpdate.maxUnavailable of `replicas` (percentages round down), at least 1.
pub fn max_unavailable(set: &StatefulSet, replicas: i32) -> i32 {
    let value = set
        .spec
        .update_strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref())
        .and_then(|r| r.max_unavailable.as_ref());
    // Rounded up, as Kubernetes does: 50% of 3 is 2.
    value.and_then(|v| scaled_value(v, replicas, true)).unwrap_or(1).max(1)
}

/// The claims pod `ordinal` of `set` mounts, as new objects.
pub fn claims_for(set: &StatefulSet, ordinal: i32) -> Vec<PersistentVolumeClaim> {
    let name = set.name_any();
    let (when_deleted, _) = retention(set);
    let selector_labels = set.spec.selector.match_labels.clone().unwrap_or_default();
    set.spec
        .volume_claim_templates
        .iter()
        .flatten()
        .map(|t| {
            let mut labels = t.metadata.labels.clone().unwrap_or_default();
            labels.extend(selector_labels.clone());
            PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some(claim_name(&t.name_any(), &name, ordinal)),
                    namespace: set.namespace(),
                    labels: Some(labels),
                    annotations: t.metadata.annotations.clone(),
                    owner_references: when_deleted.then(|| vec![set_ref(set, false)]),
                    ..Default::default()
                },
                spec: t.spec.clone(),
                status: None,
            }
        })
        .collect()
}

/// Pod `ordinal` of `set` from `template` at `revision`.
pub fn new_pod(set: &StatefulSet, template: &PodTemplateSpec, revision: &str, ordinal: i32) -> Pod {
    let set_name = set.name_any();
    let name = format!("{set_name}-{ordinal}");
    let meta = template.metadata.clone().unwrap_or_default();
    let mut labels = meta.labels.unwrap_or_default();
    labels.insert(POD_NAME_LABEL.into(), name.clone());
    labels.insert(POD_INDEX_LABEL.into(), ordinal.to_string());
    labels.insert(HASH_LABEL.into(), revision.into());
    let mut spec = template.spec.clone().unwrap_or_default();
    spec.hostname = Some(name.clone());
    spec.subdomain = set.spec.service_name.clone().filter(|s| !s.is_empty());
    // Claims first, replacing template volumes of the same name, as Kubernetes' updateStorage.
    let claims: Vec<Volume> = set
        .spec
        .volume_claim_templates
        .iter()
        .flatten()
        .map(|t| Volume {
            name: t.name_any(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim_name(&t.name_any(), &set_name, ordinal),
                read_only: None,
            }),
            ..Default::default()
        })
        .collect();
    if !claims.is_empty() {
        let names: HashSet<String> = claims.iter().map(|v| v.name.clone()).collect();
        let rest = spec.volumes.take().unwrap_or_default();
        let mut volumes = claims;
        volumes.extend(rest.into_iter().filter(|v| !names.contains(&v.name)));
        spec.volumes = Some(volumes);
    }
    Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: set.namespace(),
            labels: Some(labels),
            annotations: meta.annotations,
            owner_references: Some(vec![set_ref(set, true)]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// The revisions a reconcile works with: `current` (what pods below the partition keep) and
/// `update` (the set's template now).
pub struct Revisions<'a> {
    pub current: &'a str,
    pub current_template: &'a PodTemplateSpec,
    pub update: &'a str,
}

/// What one reconcile should do.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Orphans named as members that the set takes over.
    pub adopt: Vec<String>,
    /// Pods the set owns whose labels no longer match its selector.
    pub release: Vec<String>,
    /// Missing claims, created before their pod.
    pub claims: Vec<PersistentVolumeClaim>,
    pub create: Vec<Pod>,
    /// Pods to delete, in order.
    pub delete: Vec<String>,
    /// Claims to re-own (name, ownerReferences) so the collector removes them with their pod.
    pub reown_claims: Vec<(String, Vec<OwnerReference>)>,
    pub status: StatefulSetStatus,
}

/// Pure decision over the set, the pods and claims of its namespace and its revisions.
pub fn plan(
    set: &StatefulSet,
    pods: &[Pod],
    claims: &[PersistentVolumeClaim],
    rev: &Revisions,
    now: jiff::Timestamp,
) -> Plan {
    let mut plan = Plan::default();
    let name = set.name_any();
    let uid = set.uid().unwrap_or_default();
    let spec = &set.spec;
    let start = spec.ordinals.as_ref().and_then(|o| o.start).unwrap_or(0).max(0);
    let replicas = spec.replicas.unwrap_or(1).max(0);
    let end = start + replicas;
    let parallel = spec.pod_management_policy.as_deref() == Some("Parallel");
    let strategy = spec.update_strategy.as_ref();
    let rolling = strategy.and_then(|s| s.type_.as_deref()).unwrap_or("RollingUpdate") == "RollingUpdate";
    let partition = strategy
        .and_then(|s| s.rolling_update.as_ref())
        .and_then(|r| r.partition)
        .unwrap_or(0)
        .max(0);
    let deleting = set.metadata.deletion_timestamp.is_some();
    let claimed = claim(&spec.selector, &uid, deleting, pods, |p| {
        ordinal_of(&name, &p.name_any()).is_some()
    });
    plan.adopt = claimed.adopt;
    plan.release = claimed.release;
    let mut members: BTreeMap<i32, &Pod> = BTreeMap::new();
    for pod in claimed.pods {
        if let Some(ord) = ordinal_of(&name, &pod.name_any()) {
            members.insert(ord, pod);
        }
    }
    let existing_claims: HashSet<String> = claims.iter().map(|c| c.name_any()).collect();
    // `halt`: OrderedReady waits for the pod just acted on (or an unready one) before more.
    let mut halt = deleting;
    for ord in start..end {
        if halt {
            break;
        }
        match members.get(&ord) {
            None => {
                let (template, revision) = if rolling && ord < start + partition {
                    (rev.current_template, rev.current)
                } else {
                    (&spec.template, rev.update)
                };
                for claim in claims_for(set, ord) {
                    if !existing_claims.contains(&claim.name_any()) {
                        plan.claims.push(claim);
                    }
                }
                plan.create.push(new_pod(set, template, revision, ord));
                halt = !parallel;
            }
            Some(p) if failed(p) && !terminating(p) => {
                plan.delete.push(p.name_any());
                halt = !parallel;
            }
            Some(p) if terminating(p) || !running_and_ready(p) => halt = !parallel,
            Some(_) => {}
        }
    }
    let (when_deleted, when_scaled) = retention(set);
    // Claims of current ordinals follow the policy as it is now: owned by the set only for
    // whenDeleted=Delete, and never by a pod (left from a scale-down that was undone).
    for ord in start..end {
        for template in claims_for(set, ord) {
            let claim_name = template.name_any();
            let Some(live) = claims.iter().find(|c| c.name_any() == claim_name) else {
                continue;
            };
            let pod_name = format!("{name}-{ord}");
            let mut refs: Vec<_> = live
                .owner_references()
                .iter()
                .filter(|o| o.uid != uid && !(o.kind == "Pod" && o.name == pod_name))
                .cloned()
                .collect();
            if when_deleted {
                refs.push(set_ref(set, false));
            }
            let uids = |r: &[OwnerReference]| r.iter().map(|o| o.uid.clone()).collect::<Vec<_>>();
            if uids(&refs) != uids(live.owner_references()) {
                plan.reown_claims.push((claim_name, refs));
            }
        }
    }
    // Condemned pods go highest ordinal first; OrderedReady waits for each to be gone.
    for (&ord, p) in members.range(..start).chain(members.range(end..)).rev() {
        if halt {
            break;
        }
        if terminating(p) {
            halt = !parallel;
            continue;
        }
        if when_scaled && let Some(owner) = pod_ref(p) {
            for claim in claims_for(set, ord) {
                let claim_name = claim.name_any();
                if let Some(live) = claims.iter().find(|c| c.name_any() == claim_name)
                    && !live.owner_references().iter().any(|o| o.uid == owner.uid)
                {
                    // The pod alone owns it now: a set reference would keep it alive.
                    let mut refs: Vec<_> = live
                        .owner_references()
                        .iter()
                        .filter(|o| o.uid != uid)
                        .cloned()
                        .collect();
                    refs.push(owner.clone());
                    plan.reown_claims.push((claim_name, refs));
                }
            }
        }
        plan.delete.push(p.name_any());
        halt = !parallel;
    }
    // RollingUpdate: from the highest ordinal down to the partition, replacing old pods while
    // fewer than maxUnavailable (default 1) members are unavailable (missing ones count).
    if rolling && !halt {
        let min_ready = spec.min_ready_seconds.unwrap_or(0) as i64;
        let healthy = |p: &Pod| !terminating(p) && running_and_ready(p) && is_available(p, min_ready, now);
        let unavailable = (start..end)
            .filter(|o| members.get(o).is_none_or(|p| !healthy(p)))
            .count() as i32;
        let mut budget = max_unavailable(set, replicas) - unavailable;
        for ord in (start + partition..end).rev() {
            if budget <= 0 {
                break;
            }
            if let Some(p) = members.get(&ord)
                && revision_of(p) != Some(rev.update)
                && !terminating(p)
            {
                plan.delete.push(p.name_any());
                budget -= 1;
            }
        }
    }
    plan.status = status(set, &members, rev, now);
    plan
}

fn status(
    set: &StatefulSet,
    members: &BTreeMap<i32, &Pod>,
    rev: &Revisions,
    now: jiff::Timestamp,
) -> StatefulSetStatus {
    let min_ready = set.spec.min_ready_seconds.unwrap_or(0) as i64;
    let count = |f: &dyn Fn(&Pod) -> bool| members.values().filter(|p| f(p)).count() as i32;
    let replicas = count(&|_| true);
    let ready = count(&running_and_ready);
    let mut s = StatefulSetStatus {
        replicas,
        ready_replicas: Some(ready),
        available_replicas: Some(count(&|p| running_and_ready(p) && is_available(p, min_ready, now))),
        current_replicas: Some(count(&|p| !terminating(p) && revision_of(p) == Some(rev.current))),
        updated_replicas: Some(count(&|p| !terminating(p) && revision_of(p) == Some(rev.update))),
        current_revision: Some(rev.current.into()),
        update_revision: Some(rev.update.into()),
        observed_generation: set.metadata.generation,
        collision_count: Some(set.status.as_ref().and_then(|s| s.collision_count).unwrap_or(0)),
        conditions: set.status.as_ref().and_then(|s| s.conditions.clone()),
    };
    // A finished rolling update makes the update revision current.
    let rolling = set
        .spec
        .update_strategy
        .as_ref()
        .and_then(|s| s.type_.as_deref())
        .unwrap_or("RollingUpdate")
        == "RollingUpdate";
    if rolling && s.updated_replicas == Some(replicas) && ready == replicas {
        s.current_replicas = s.updated_replicas;
        s.current_revision = s.update_revision.clone();
    }
    s
}

struct Ctx {
    client: Client,
    recorder: Recorder,
}

async fn reconcile(set: Arc<StatefulSet>, ctx: Arc<Ctx>) -> Result<Action> {
    let ns = set.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let name = set.name_any();
    let uid = set.uid().ok_or(Error::MissingField("metadata.uid"))?;
    if set.metadata.deletion_timestamp.is_some() {
        // The garbage collector removes pods, claims and revisions through ownerReferences.
        return Ok(Action::await_change());
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let claims_api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let revisions_api: Api<ControllerRevision> = Api::namespaced(ctx.client.clone(), &ns);
    let listed_revisions = revisions_api.list(&ListParams::default()).await?.items;
    let listed_revisions = history::adopt_orphans(
        &revisions_api,
        &set_ref(&set, true),
        &set.spec.selector,
        listed_revisions,
    )
    .await?;
    let revisions = history::owned(&listed_revisions, &uid);
    let collisions = set.status.as_ref().and_then(|s| s.collision_count).unwrap_or(0);
    let (update, collisions) =
        history::ensure(&revisions_api, set.as_ref(), &revisions, &set.spec.template, collisions).await?;
    let update_name = update.name_any();
    let current = set
        .status
        .as_ref()
        .and_then(|s| s.current_revision.as_ref())
        .and_then(|c| revisions.iter().find(|r| &r.name_any() == c))
        .map(|r| (*r).clone())
        .unwrap_or_else(|| update.clone());
    let current_name = current.name_any();
    let current_template = history::template_of(&current).unwrap_or_else(|| set.spec.template.clone());
    let listed = pods.list(&ListParams::default()).await?.items;
    let claims = claims_api.list(&ListParams::default()).await?.items;
    let revs = Revisions {
        current: &current_name,
        current_template: &current_template,
        update: &update_name,
    };
    let mut plan = plan(&set, &listed, &claims, &revs, jiff::Timestamp::now());
    plan.status.collision_count = Some(collisions);
    let owner = set_ref(&set, true);
    for pod in &plan.adopt {
        set_owner(&pods, &listed, pod, &owner, true).await?;
    }
    for pod in &plan.release {
        set_owner(&pods, &listed, pod, &owner, false).await?;
    }
    for claim in &plan.claims {
        let claim_name = claim.name_any();
        let pod = plan
            .create
            .iter()
            .map(|p| p.name_any())
            .find(|p| claim_name.ends_with(&format!("-{p}")))
            .unwrap_or_default();
        match claims_api.create(&PostParams::default(), claim).await {
            Ok(_) => {
                let message = format!("create Claim {claim_name} Pod {pod} in StatefulSet {name} success");
                ctx.recorder
                    .publish(set.as_ref(), EventType::Normal, "SuccessfulCreate", &message)
                    .await;
            }
            Err(e) if is_status(&e, 409) => {}
            Err(e) => {
                let message =
                    format!("create Claim {claim_name} for Pod {pod} in StatefulSet {name} failed error: {e}");
                ctx.recorder
                    .publish(set.as_ref(), EventType::Warning, "FailedCreate", &message)
                    .await;
                return Err(e.into());
            }
        }
    }
    for pod in &plan.create {
        let pod_name = pod.name_any();
        match pods.create(&PostParams::default(), pod).await {
            Ok(_) => {
                tracing::info!(namespace = %ns, statefulset = %name, pod = %pod_name, "created pod");
                let message = format!("create Pod {pod_name} in StatefulSet {name} successful");
                ctx.recorder
                    .publish(set.as_ref(), EventType::Normal, "SuccessfulCreate", &message)
                    .await;
            }
            // Still terminating under the same name: the pod's deletion triggers the next pass.
            Err(e) if is_status(&e, 409) => {}
            Err(e) => {
                let message = format!("create Pod {pod_name} in StatefulSet {name} failed error: {e}");
                ctx.recorder
                    .publish(set.as_ref(), EventType::Warning, "FailedCreate", &message)
                    .await;
                return Err(e.into());
            }
        }
    }
    for (claim, refs) in &plan.reown_claims {
        let patch = json!({"metadata": {"ownerReferences": refs}});
        match claims_api
            .patch(claim, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(e.into()),
        }
    }
    for pod in &plan.delete {
        match pods.delete(pod, &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(namespace = %ns, statefulset = %name, pod = %pod, "deleted pod");
                let message = format!("delete Pod {pod} in StatefulSet {name} successful");
                ctx.recorder
                    .publish(set.as_ref(), EventType::Normal, "SuccessfulDelete", &message)
                    .await;
            }
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let sets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    write_status(&sets, &name, set.status.as_ref(), &plan.status).await?;
    let mut live: HashSet<String> = [current_name.clone(), update_name.clone()].into();
    live.extend(listed.iter().filter_map(|p| revision_of(p).map(String::from)));
    let limit = set.spec.revision_history_limit.unwrap_or(10);
    history::delete(&revisions_api, &history::prune(&revisions, limit, &live)).await?;
    let waiting = plan.status.ready_replicas != plan.status.available_replicas;
    Ok(if waiting {
        Action::requeue(Duration::from_secs(1))
    } else {
        Action::await_change()
    })
}

fn error_policy(set: Arc<StatefulSet>, e: &Error, _: Arc<Ctx>) -> Action {
    tracing::warn!(statefulset = %set.name_any(), error = %e, "statefulset reconcile failed");
    Action::requeue(Duration::from_secs(1))
}

pub async fn run(client: Client) -> Result<()> {
    let controller = Controller::new(Api::<StatefulSet>::all(client.clone()), watcher::Config::default());
    let sets = controller.store();
    controller
        .owns(Api::<Pod>::all(client.clone()), watcher::Config::default())
        .owns(
            Api::<ControllerRevision>::all(client.clone()),
            watcher::Config::default(),
        )
        // Orphans named as members: the set whose selector matches may adopt them.
        .watches(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default(),
            move |pod: Pod| {
                if controller_of(&pod).is_some() {
                    return Vec::new();
                }
                sets.state()
                    .into_iter()
                    .filter(|set| set.namespace() == pod.namespace())
                    .filter(|set| ordinal_of(&set.name_any(), &pod.name_any()).is_some())
                    .filter(|set| selects(&set.spec.selector, pod.labels()))
                    .map(|set| ObjectRef::from_obj(set.as_ref()))
                    .collect()
            },
        )
        .run(
            reconcile,
            error_policy,
            Arc::new(Ctx {
                recorder: Recorder::new(client.clone(), "statefulset-controller"),
                client,
            }),
        )
        .for_each(|_| futures::future::ready(()))
        .await;
    Err(Error::Ended("the statefulset controller"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{
        RollingUpdateStatefulSetStrategy, StatefulSetOrdinals, StatefulSetPersistentVolumeClaimRetentionPolicy,
        StatefulSetSpec, StatefulSetUpdateStrategy,
    };
    use k8s_openapi::api::core::v1::{Container, PodCondition, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    fn template(image: &str) -> PodTemplateSpec {
        PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some([("app".to_string(), "web".to_string())].into()),
                ..Default::default()
            }),
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "c".into(),
                    image: Some(image.into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
        }
    }

    fn set(replicas: i32, parallel: bool) -> StatefulSet {
        StatefulSet {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("default".into()),
                uid: Some("sts-uid".into()),
                generation: Some(2),
                ..Default::default()
            },
            spec: StatefulSetSpec {
                replicas: Some(replicas),
                selector: LabelSelector {
                    match_labels: Some([("app".to_string(), "web".to_string())].into()),
                    ..Default::default()
                },
                service_name: Some("web".into()),
                pod_management_policy: Some(if parallel { "Parallel" } else { "OrderedReady" }.into()),
                template: template("nginx:1"),
                volume_claim_templates: Some(vec![PersistentVolumeClaim {
                    metadata: ObjectMeta {
                        name: Some("data".into()),
                        ..Default::default()
                    },
                    ..Default::default()
                }]),
                ..Default::default()
            },
            status: None,
        }
    }

    fn member(s: &StatefulSet, ord: i32, revision: &str, ready: bool) -> Pod {
        let mut p = new_pod(s, &s.spec.template, revision, ord);
        p.metadata.uid = Some(format!("pod-{ord}"));
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

    fn revs(t: &PodTemplateSpec) -> Revisions<'_> {
        Revisions {
            current: "web-old",
            current_template: t,
            update: "web-new",
        }
    }

    fn names(pods: &[Pod]) -> Vec<String> {
        pods.iter().map(|p| p.name_any()).collect()
    }

    #[test]
    fn member_names_parse_to_ordinals() {
        assert_eq!(ordinal_of("web", "web-0"), Some(0));
        assert_eq!(ordinal_of("web", "web-12"), Some(12));
        assert_eq!(ordinal_of("web", "web-"), None);
        assert_eq!(ordinal_of("web", "web-+1"), None);
        assert_eq!(ordinal_of("web", "webx-1"), None);
        assert_eq!(ordinal_of("web", "web-db-1"), None);
    }

    #[test]
    fn a_pod_has_its_identity_claims_and_dns_name() {
        let s = set(3, false);
        let p = new_pod(&s, &s.spec.template, "web-abc", 2);
        assert_eq!(p.name_any(), "web-2");
        let labels = p.labels();
        assert_eq!(labels.get(POD_NAME_LABEL).map(String::as_str), Some("web-2"));
        assert_eq!(labels.get(POD_INDEX_LABEL).map(String::as_str), Some("2"));
        assert_eq!(labels.get(HASH_LABEL).map(String::as_str), Some("web-abc"));
        assert_eq!(labels.get("app").map(String::as_str), Some("web"));
        let spec = p.spec.unwrap();
        assert_eq!(spec.hostname.as_deref(), Some("web-2"));
        assert_eq!(spec.subdomain.as_deref(), Some("web"));
        let volumes = spec.volumes.unwrap();
        assert_eq!(volumes[0].name, "data");
        assert_eq!(
            volumes[0].persistent_volume_claim.as_ref().unwrap().claim_name,
            "data-web-2"
        );
        assert_eq!(p.metadata.owner_references.unwrap()[0].controller, Some(true));
        let claims = claims_for(&s, 2);
        assert_eq!(claims[0].name_any(), "data-web-2");
        assert_eq!(claims[0].labels().get("app").map(String::as_str), Some("web"));
        assert!(
            claims[0].metadata.owner_references.is_none(),
            "Retain keeps claims unowned"
        );
    }

    #[test]
    fn ordered_ready_creates_one_pod_after_the_previous_is_ready() {
        let s = set(3, false);
        let t = s.spec.template.clone();
        let p = plan(&s, &[], &[], &revs(&t), now());
        assert_eq!(names(&p.create), ["web-0"]);
        assert_eq!(
            p.claims.iter().map(|c| c.name_any()).collect::<Vec<_>>(),
            ["data-web-0"]
        );
        let p = plan(&s, &[member(&s, 0, "web-new", false)], &[], &revs(&t), now());
        assert!(p.create.is_empty(), "web-1 waits for web-0 to be ready");
        let claim0 = claims_for(&s, 0).remove(0);
        let p = plan(&s, &[member(&s, 0, "web-new", true)], &[claim0], &revs(&t), now());
        assert_eq!(names(&p.create), ["web-1"]);
        assert_eq!(p.claims.len(), 1, "data-web-0 exists already");
    }

    #[test]
    fn parallel_creates_every_missing_pod_at_once() {
        let s = set(3, true);
        let t = s.spec.template.clone();
        let p = plan(&s, &[member(&s, 1, "web-new", false)], &[], &revs(&t), now());
        assert_eq!(names(&p.create), ["web-0", "web-2"]);
        assert_eq!(p.claims.len(), 2);
    }

    #[test]
    fn ordinals_start_where_the_spec_says() {
        let mut s = set(2, true);
        s.spec.ordinals = Some(StatefulSetOrdinals { start: Some(5) });
        let t = s.spec.template.clone();
        let p = plan(&s, &[member(&s, 0, "web-new", true)], &[], &revs(&t), now());
        assert_eq!(names(&p.create), ["web-5", "web-6"]);
        assert_eq!(p.delete, ["web-0"]);
    }

    #[test]
    fn scale_down_removes_the_highest_ordinal_first_one_at_a_time() {
        let s = set(1, false);
        let t = s.spec.template.clone();
        let pods: Vec<_> = (0..3).map(|i| member(&s, i, "web-new", true)).collect();
        assert_eq!(plan(&s, &pods, &[], &revs(&t), now()).delete, ["web-2"]);
        let mut going = pods.clone();
        going[2].metadata.deletion_timestamp = Some(Time(now()));
        assert!(
            plan(&s, &going, &[], &revs(&t), now()).delete.is_empty(),
            "web-1 waits until web-2 is gone"
        );
        assert_eq!(plan(&s, &pods[..2], &[], &revs(&t), now()).delete, ["web-1"]);
        let p = set(1, true);
        assert_eq!(plan(&p, &pods, &[], &revs(&t), now()).delete, ["web-2", "web-1"]);
    }

    #[test]
    fn when_scaled_delete_hands_the_claim_to_the_condemned_pod() {
        let mut s = set(1, false);
        s.spec.persistent_volume_claim_retention_policy = Some(StatefulSetPersistentVolumeClaimRetentionPolicy {
            when_deleted: Some("Delete".into()),
            when_scaled: Some("Delete".into()),
        });
        let t = s.spec.template.clone();
        let pods: Vec<_> = (0..2).map(|i| member(&s, i, "web-new", true)).collect();
        let claims: Vec<_> = (0..2).map(|i| claims_for(&s, i).remove(0)).collect();
        assert_eq!(claims[0].owner_references()[0].uid, "sts-uid");
        let p = plan(&s, &pods, &claims, &revs(&t), now());
        assert_eq!(p.delete, ["web-1"]);
        assert_eq!(p.reown_claims.len(), 1);
        assert_eq!(p.reown_claims[0].0, "data-web-1");
        let owners: Vec<_> = p.reown_claims[0].1.iter().map(|o| o.uid.as_str()).collect();
        assert_eq!(owners, ["pod-1"], "the set lets go of a scaled-down claim");
    }

    #[test]
    fn claims_follow_a_changed_retention_policy() {
        let mut s = set(1, false);
        let t = s.spec.template.clone();
        let pods = [member(&s, 0, "web-new", true)];
        let retained = claims_for(&s, 0);
        assert!(plan(&s, &pods, &retained, &revs(&t), now()).reown_claims.is_empty());
        s.spec.persistent_volume_claim_retention_policy = Some(StatefulSetPersistentVolumeClaimRetentionPolicy {
            when_deleted: Some("Delete".into()),
            when_scaled: Some("Retain".into()),
        });
        let p = plan(&s, &pods, &retained, &revs(&t), now());
        assert_eq!(p.reown_claims.len(), 1);
        assert_eq!(p.reown_claims[0].1[0].uid, "sts-uid");
        let owned = claims_for(&s, 0);
        assert!(plan(&s, &pods, &owned, &revs(&t), now()).reown_claims.is_empty());
        let retain = set(1, false);
        let p = plan(&retain, &pods, &owned, &revs(&t), now());
        assert_eq!(p.reown_claims, [("data-web-0".to_string(), vec![])]);
    }

    #[test]
    fn rolling_update_replaces_ordinals_from_the_partition_up_highest_first() {
        let mut s = set(3, false);
        s.spec.update_strategy = Some(StatefulSetUpdateStrategy {
            type_: Some("RollingUpdate".into()),
            rolling_update: Some(RollingUpdateStatefulSetStrategy {
                partition: Some(1),
                max_unavailable: None,
            }),
        });
        let old = template("nginx:0");
        let mut pods: Vec<_> = (0..3).map(|i| member(&s, i, "web-old", true)).collect();
        assert_eq!(plan(&s, &pods, &[], &revs(&old), now()).delete, ["web-2"]);
        pods[2] = member(&s, 2, "web-new", false);
        assert!(
            plan(&s, &pods, &[], &revs(&old), now()).delete.is_empty(),
            "web-1 waits for the new web-2 to be ready"
        );
        pods[2] = member(&s, 2, "web-new", true);
        assert_eq!(plan(&s, &pods, &[], &revs(&old), now()).delete, ["web-1"]);
        pods[1] = member(&s, 1, "web-new", true);
        let p = plan(&s, &pods, &[], &revs(&old), now());
        assert!(p.delete.is_empty(), "web-0 is below the partition");
        assert_eq!(p.status.updated_replicas, Some(2));
        assert_eq!(p.status.current_revision.as_deref(), Some("web-old"));
        // A pod below the partition that is deleted comes back at the current revision.
        let p = plan(&s, &pods[1..], &[], &revs(&old), now());
        assert_eq!(
            p.create[0].labels().get(HASH_LABEL).map(String::as_str),
            Some("web-old")
        );
        let image = p.create[0].spec.as_ref().unwrap().containers[0].image.clone();
        assert_eq!(image.as_deref(), Some("nginx:0"));
    }

    #[test]
    fn max_unavailable_replaces_several_ordinals_at_once() {
        // Parallel: under OrderedReady an unready pod stops everything, as in Kubernetes.
        let mut s = set(4, true);
        s.spec.update_strategy = Some(StatefulSetUpdateStrategy {
            type_: Some("RollingUpdate".into()),
            rolling_update: Some(RollingUpdateStatefulSetStrategy {
                partition: Some(0),
                max_unavailable: Some(IntOrString::String("50%".into())),
            }),
        });
        assert_eq!(max_unavailable(&s, 4), 2);
        assert_eq!(max_unavailable(&s, 1), 1, "never below one");
        assert_eq!(max_unavailable(&s, 3), 2, "rounded up");
        let old = template("nginx:0");
        let mut pods: Vec<_> = (0..4).map(|i| member(&s, i, "web-old", true)).collect();
        assert_eq!(plan(&s, &pods, &[], &revs(&old), now()).delete, ["web-3", "web-2"]);
        pods[3] = member(&s, 3, "web-new", false);
        assert_eq!(
            plan(&s, &pods, &[], &revs(&old), now()).delete,
            ["web-2"],
            "an unready new web-3 uses half the budget"
        );
    }

    #[test]
    fn on_delete_leaves_old_pods_and_recreates_at_the_update_revision() {
        let mut s = set(2, false);
        s.spec.update_strategy = Some(StatefulSetUpdateStrategy {
            type_: Some("OnDelete".into()),
            rolling_update: None,
        });
        let old = template("nginx:0");
        let pods: Vec<_> = (0..2).map(|i| member(&s, i, "web-old", true)).collect();
        let p = plan(&s, &pods, &[], &revs(&old), now());
        assert!(p.delete.is_empty());
        let p = plan(&s, &pods[..1], &[], &revs(&old), now());
        assert_eq!(
            p.create[0].labels().get(HASH_LABEL).map(String::as_str),
            Some("web-new")
        );
    }

    #[test]
    fn a_complete_update_makes_the_update_revision_current() {
        let s = set(2, false);
        let t = s.spec.template.clone();
        let pods: Vec<_> = (0..2).map(|i| member(&s, i, "web-new", true)).collect();
        let status = plan(&s, &pods, &[], &revs(&t), now()).status;
        assert_eq!(status.replicas, 2);
        assert_eq!(status.ready_replicas, Some(2));
        assert_eq!(status.available_replicas, Some(2));
        assert_eq!(status.updated_replicas, Some(2));
        assert_eq!(status.current_replicas, Some(2));
        assert_eq!(status.current_revision.as_deref(), Some("web-new"));
        assert_eq!(status.observed_generation, Some(2));
    }

    #[test]
    fn failed_pods_are_replaced_and_foreign_pods_ignored() {
        let s = set(2, false);
        let t = s.spec.template.clone();
        let mut broken = member(&s, 0, "web-new", false);
        broken.status.as_mut().unwrap().phase = Some("Failed".into());
        let mut foreign = member(&s, 1, "web-new", true);
        foreign.metadata.owner_references = Some(vec![OwnerReference {
            uid: "other".into(),
            controller: Some(true),
            ..Default::default()
        }]);
        let p = plan(&s, &[broken, foreign], &[], &revs(&t), now());
        assert_eq!(p.delete, ["web-0"]);
        assert!(p.create.is_empty() && p.adopt.is_empty());
        assert_eq!(p.status.replicas, 1);
    }

    #[test]
    fn orphans_named_as_members_are_adopted_and_relabelled_pods_released() {
        let s = set(2, true);
        let t = s.spec.template.clone();
        let mut orphan = member(&s, 0, "web-new", true);
        orphan.metadata.owner_references = None;
        let mut stranger = member(&s, 7, "web-new", true);
        stranger.metadata.name = Some("cache-0".into());
        stranger.metadata.owner_references = None;
        let mut relabelled = member(&s, 1, "web-new", true);
        relabelled.metadata.labels = Some([("app".to_string(), "debug".to_string())].into());
        let p = plan(&s, &[orphan, stranger, relabelled], &[], &revs(&t), now());
        assert_eq!(p.adopt, ["web-0"]);
        assert_eq!(p.release, ["web-1"]);
        assert_eq!(p.status.replicas, 1);
    }
}
