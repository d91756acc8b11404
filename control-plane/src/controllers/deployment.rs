//! The Deployment controller: one ReplicaSet per pod template (named and labelled by its
//! `pod-template-hash`), rolled over by RollingUpdate (maxSurge/maxUnavailable) or Recreate,
//! with revisions and a bounded history. Writes only its ReplicaSets and Deployment status.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentCondition, DeploymentStatus, ReplicaSet, ReplicaSetSpec};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use super::events::{EventType, Recorder};
use super::{Error, Result, controlled_by, is_status, scaled_value, write_status};

pub const HASH_LABEL: &str = "pod-template-hash";
pub const REVISION: &str = "deployment.kubernetes.io/revision";

/// The template without the hash label, as a Deployment holds it.
fn bare(template: &PodTemplateSpec) -> PodTemplateSpec {
    let mut t = template.clone();
    if let Some(labels) = t.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        labels.remove(HASH_LABEL);
    }
    t
}

/// A short, DNS-safe hash of the template.
pub fn template_hash(template: &PodTemplateSpec) -> String {
    super::history::short_hash(&serde_json::to_vec(&bare(template)).expect("a template serializes"))
}

fn revision(rs: &ReplicaSet) -> i64 {
    rs.annotations().get(REVISION).and_then(|r| r.parse().ok()).unwrap_or(0)
}

fn spec_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.replicas.unwrap_or(0)
}

fn status_of(rs: &ReplicaSet) -> (i32, i32, i32) {
    let s = rs.status.clone().unwrap_or_default();
    (
        s.replicas,
        s.ready_replicas.unwrap_or(0),
        s.available_replicas.unwrap_or(0),
    )
}

/// `value` of `total`: percentages round up for surge, down for unavailability.
fn resolve(value: Option<&IntOrString>, total: i32, default: &str, round_up: bool) -> i32 {
    let v = value.cloned().unwrap_or(IntOrString::String(default.into()));
    scaled_value(&v, total, round_up).unwrap_or(0)
}

/// (maxSurge, maxUnavailable) for a RollingUpdate Deployment; never both zero.
pub fn surge_and_unavailable(d: &Deployment) -> (i32, i32) {
    let replicas = d.spec.replicas.unwrap_or(1);
    let ru = d.spec.strategy.as_ref().and_then(|s| s.rolling_update.as_ref());
    let surge = resolve(ru.and_then(|r| r.max_surge.as_ref()), replicas, "25%", true);
    let unavailable = resolve(ru.and_then(|r| r.max_unavailable.as_ref()), replicas, "25%", false);
    if surge == 0 && unavailable == 0 {
        (0, 1)
    } else {
        (surge, unavailable.min(replicas))
    }
}

/// What one reconcile should do.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// A new ReplicaSet for the current template, with its initial replicas.
    pub create: Option<ReplicaSet>,
    /// (ReplicaSet name, new spec.replicas).
    pub scale: Vec<(String, i32)>,
    /// The new ReplicaSet's revision annotation, when it must change.
    pub set_revision: Option<(String, i64)>,
    /// Old, empty ReplicaSets beyond revisionHistoryLimit.
    pub delete: Vec<String>,
    pub status: DeploymentStatus,
    /// When the progress deadline would pass without progress: reconcile again then.
    pub recheck: Option<Duration>,
}

pub const PROGRESSING: &str = "Progressing";
/// Kubernetes' Progressing reasons (pkg/controller/deployment/util).
pub const NEW_RS_CREATED: &str = "NewReplicaSetCreated";
pub const FOUND_NEW_RS: &str = "FoundNewReplicaSet";
pub const RS_UPDATED: &str = "ReplicaSetUpdated";
pub const NEW_RS_AVAILABLE: &str = "NewReplicaSetAvailable";
pub const TIMED_OUT: &str = "ProgressDeadlineExceeded";
pub const PAUSED: &str = "DeploymentPaused";
pub const RESUMED: &str = "DeploymentResumed";

/// A progress deadline that counts (Kubernetes: set and not MaxInt32).
fn progress_deadline(d: &Deployment) -> Option<i32> {
    d.spec.progress_deadline_seconds.filter(|s| *s != i32::MAX)
}

/// Kubernetes' SetDeploymentCondition: the same status and reason changes nothing; the same
/// status keeps its lastTransitionTime.
fn set_condition(conditions: &mut Vec<DeploymentCondition>, mut c: DeploymentCondition) {
    if let Some(old) = conditions.iter().find(|o| o.type_ == c.type_) {
        if old.status == c.status && old.reason == c.reason {
            return;
        }
        if old.status == c.status {
            c.last_transition_time = old.last_transition_time.clone();
        }
    }
    conditions.retain(|o| o.type_ != c.type_);
    conditions.push(c);
}

fn condition(type_: &str, status: &str, reason: &str, message: String, now: jiff::Timestamp) -> DeploymentCondition {
    DeploymentCondition {
        type_: Some(type_.into()),
        status: Some(status.into()),
        reason: Some(reason.into()),
        message: Some(message),
        last_transition_time: Some(Time(now)),
        last_update_time: Some(Time(now)),
    }
}

/// While paused nothing rolls: the sets only follow spec.replicas. One active (or, with none
/// active, the newest) set takes it all; several share the difference in proportion to their
/// sizes, within replicas + maxSurge, the newest taking the remainder (Kubernetes' `scale`).
fn paused_scale(d: &Deployment, sets: &[ReplicaSet], current: Option<&ReplicaSet>) -> Vec<(String, i32)> {
    let replicas = d.spec.replicas.unwrap_or(1);
    let mut active: Vec<&ReplicaSet> = sets.iter().filter(|rs| spec_replicas(rs) > 0).collect();
    active.sort_by_key(|rs| std::cmp::Reverse(revision(rs)));
    if active.len() <= 1 {
        let target = active
            .first()
            .copied()
            .or(current)
            .or_else(|| sets.iter().max_by_key(|rs| revision(rs)));
        return match target {
            Some(rs) if spec_replicas(rs) != replicas => vec![(rs.name_any(), replicas)],
            _ => vec![],
        };
    }
    let recreate = d.spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate");
    let allowed = replicas + if recreate { 0 } else { surge_and_unavailable(d).0 };
    let total: i32 = active.iter().map(|rs| spec_replicas(rs)).sum();
    let delta = allowed - total;
    if delta == 0 || total == 0 {
        return vec![];
    }
    let mut left = delta;
    let mut out = Vec::new();
    for rs in active.iter().skip(1) {
        let share = (delta as i64 * spec_replicas(rs) as i64 / total as i64) as i32;
        let next = (spec_replicas(rs) + share).max(0);
        left -= next - spec_replicas(rs);
        if next != spec_replicas(rs) {
            out.push((rs.name_any(), next));
        }
    }
    let newest = active[0];
    let next = (spec_replicas(newest) + left).max(0);
    if next != spec_replicas(newest) {
        out.push((newest.name_any(), next));
    }
    out
}

/// The Progressing condition, as Kubernetes' checkPausedConditions, getNewReplicaSet and
/// syncRolloutStatus decide it from the previous status and the new one; returns when to look
/// again for a missed progress deadline.
fn progress(
    d: &Deployment,
    status: &DeploymentStatus,
    conditions: &mut Vec<DeploymentCondition>,
    new_rs: Option<&str>,
    created: bool,
    now: jiff::Timestamp,
) -> Option<Duration> {
    let Some(deadline) = progress_deadline(d) else {
        conditions.retain(|c| c.type_.as_deref() != Some(PROGRESSING));
        return None;
    };
    let reason_of = |cs: &[DeploymentCondition]| {
        cs.iter()
            .find(|c| c.type_.as_deref() == Some(PROGRESSING))
            .and_then(|c| c.reason.clone())
            .unwrap_or_default()
    };
    let paused = d.spec.paused == Some(true);
    let reason = reason_of(conditions);
    if reason != TIMED_OUT {
        if paused && reason != PAUSED {
            let c = condition(PROGRESSING, "Unknown", PAUSED, "Deployment is paused".into(), now);
            set_condition(conditions, c);
        } else if !paused && reason == PAUSED {
            let c = condition(PROGRESSING, "Unknown", RESUMED, "Deployment is resumed".into(), now);
            set_condition(conditions, c);
        }
    }
    if paused {
        return None;
    }
    let name = d.name_any();
    match new_rs {
        Some(rs) if created => set_condition(
            conditions,
            condition(
                PROGRESSING,
                "True",
                NEW_RS_CREATED,
                format!("Created new replica set \"{rs}\""),
                now,
            ),
        ),
        Some(rs) if !conditions.iter().any(|c| c.type_.as_deref() == Some(PROGRESSING)) => set_condition(
            conditions,
            condition(
                PROGRESSING,
                "True",
                FOUND_NEW_RS,
                format!("Found new replica set \"{rs}\""),
                now,
            ),
        ),
        _ => {}
    }
    let old = d.status.clone().unwrap_or_default();
    let replicas = d.spec.replicas.unwrap_or(1);
    let (new_replicas, new_updated) = (status.replicas.unwrap_or(0), status.updated_replicas.unwrap_or(0));
    let current = conditions
        .iter()
        .find(|c| c.type_.as_deref() == Some(PROGRESSING))
        .cloned();
    let already_complete =
        new_replicas == new_updated && current.as_ref().and_then(|c| c.reason.as_deref()) == Some(NEW_RS_AVAILABLE);
    if already_complete {
        return None;
    }
    let complete = new_updated == replicas
        && new_replicas == replicas
        && status.available_replicas.unwrap_or(0) == replicas
        && status.observed_generation >= d.metadata.generation;
    let old_olds = old.replicas.unwrap_or(0) - old.updated_replicas.unwrap_or(0);
    let progressing = new_updated > old.updated_replicas.unwrap_or(0)
        || new_replicas - new_updated < old_olds
        || status.ready_replicas.unwrap_or(0) > old.ready_replicas.unwrap_or(0)
        || status.available_replicas.unwrap_or(0) > old.available_replicas.unwrap_or(0);
    let which = match new_rs {
        Some(rs) => format!("ReplicaSet \"{rs}\""),
        None => format!("Deployment \"{name}\""),
    };
    if complete {
        let rs = new_rs.unwrap_or_default();
        let c = condition(
            PROGRESSING,
            "True",
            NEW_RS_AVAILABLE,
            format!("ReplicaSet \"{rs}\" has successfully progressed."),
            now,
        );
        set_condition(conditions, c);
        return None;
    }
    if progressing {
        // Progress moves lastUpdateTime even with the same reason (Kubernetes special-cases it).
        let mut c = condition(PROGRESSING, "True", RS_UPDATED, format!("{which} is progressing."), now);
        if let Some(cur) = &current
            && cur.status.as_deref() == Some("True")
        {
            c.last_transition_time = cur.last_transition_time.clone();
        }
        conditions.retain(|c| c.type_.as_deref() != Some(PROGRESSING));
        conditions.push(c);
        return Some(Duration::from_secs(deadline.max(0) as u64));
    }
    let current = current?;
    match current.reason.as_deref() {
        Some(TIMED_OUT) | Some(NEW_RS_AVAILABLE) => None,
        _ => {
            let from = current.last_update_time.as_ref().map_or(now, |t| t.0);
            let due = from + jiff::SignedDuration::from_secs(deadline.max(0) as i64);
            if due < now {
                let c = condition(
                    PROGRESSING,
                    "False",
                    TIMED_OUT,
                    format!("{which} has timed out progressing."),
                    now,
                );
                set_condition(conditions, c);
                None
            } else {
                let left = Duration::try_from(due.duration_since(now)).unwrap_or_default();
                Some(left + Duration::from_millis(100))
            }
        }
    }
}

/// Pure decision over the Deployment and the ReplicaSets it controls.
pub fn plan(d: &Deployment, sets: &[ReplicaSet], now: jiff::Timestamp) -> Plan {
    let mut plan = Plan::default();
    let spec = d.spec.clone();
    let replicas = spec.replicas.unwrap_or(1);
    let template = bare(&spec.template);
    let current = sets
        .iter()
        .find(|rs| rs.spec.template.as_ref().map(bare).as_ref() == Some(&template));
    let max_revision = sets.iter().map(revision).max().unwrap_or(0);
    let mut olds: Vec<&ReplicaSet> = sets
        .iter()
        .filter(|rs| current.is_none_or(|c| c.uid() != rs.uid()))
        .collect();
    olds.sort_by_key(|rs| revision(rs));
    let old_active: i32 = olds.iter().map(|rs| spec_replicas(rs).max(status_of(rs).0)).sum();
    let recreate = spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate");
    let (surge, unavailable) = if recreate {
        (0, replicas)
    } else {
        surge_and_unavailable(d)
    };

    // The new ReplicaSet's target.
    let new_spec = current.map_or(0, spec_replicas);
    let total: i32 = sets.iter().map(spec_replicas).sum();
    let new_target = if recreate {
        if old_active == 0 { replicas } else { 0 }
    } else if olds.iter().all(|rs| spec_replicas(rs) == 0) {
        replicas
    } else {
        let allowed = replicas + surge - total;
        (new_spec + allowed.max(0)).min(replicas).max(new_spec.min(replicas))
    };
    let paused = spec.paused == Some(true);
    match current {
        None if paused => {}
        None => {
            let hash = template_hash(&template);
            let mut t = template.clone();
            let meta = t.metadata.get_or_insert_with(Default::default);
            meta.labels
                .get_or_insert_with(Default::default)
                .insert(HASH_LABEL.into(), hash.clone());
            let mut selector = spec.selector.clone();
            selector
                .match_labels
                .get_or_insert_with(Default::default)
                .insert(HASH_LABEL.into(), hash.clone());
            let mut o = d
                .controller_owner_ref(&())
                .expect("a stored Deployment has a name and uid");
            o.block_owner_deletion = Some(true);
            let labels = meta.labels.clone();
            plan.create = Some(ReplicaSet {
                metadata: ObjectMeta {
                    name: Some(format!("{}-{hash}", d.name_any())),
                    namespace: d.namespace(),
                    labels,
                    annotations: Some(BTreeMap::from([(REVISION.to_string(), (max_revision + 1).to_string())])),
                    owner_references: Some(vec![o]),
                    ..Default::default()
                },
                spec: ReplicaSetSpec {
                    replicas: Some(new_target),
                    selector,
                    template: Some(t),
                    min_ready_seconds: spec.min_ready_seconds,
                },
                ..Default::default()
            });
        }
        Some(rs) => {
            if new_target != new_spec && !paused {
                plan.scale.push((rs.name_any(), new_target));
            }
            if (revision(rs) < max_revision || revision(rs) == 0) && !paused {
                plan.set_revision = Some((rs.name_any(), max_revision + 1));
            }
        }
    }

    // Old ReplicaSets shrink while enough pods stay available.
    if paused {
        plan.scale = paused_scale(d, sets, current);
    } else if recreate {
        for rs in &olds {
            if spec_replicas(rs) != 0 {
                plan.scale.push((rs.name_any(), 0));
            }
        }
    } else if new_target == new_spec || current.is_none() {
        let new_unavailable = current.map_or(0, |rs| (spec_replicas(rs) - status_of(rs).2).max(0));
        let min_available = replicas - unavailable;
        let mut budget = total - min_available - new_unavailable;
        // Old pods that are not available cost nothing to remove.
        for rs in &olds {
            let unhealthy = (spec_replicas(rs) - status_of(rs).2).max(0);
            budget += unhealthy;
        }
        let budget = budget.min(total - replicas.min(new_target));
        let mut budget = budget.max(0);
        for rs in &olds {
            if budget == 0 {
                break;
            }
            let cut = spec_replicas(rs).min(budget);
            if cut > 0 {
                plan.scale.push((rs.name_any(), spec_replicas(rs) - cut));
                budget -= cut;
            }
        }
    }

    // History: empty old ReplicaSets beyond the limit, oldest first.
    let limit = spec.revision_history_limit.unwrap_or(10).max(0) as usize;
    let empty: Vec<&&ReplicaSet> = olds
        .iter()
        .filter(|rs| spec_replicas(rs) == 0 && status_of(rs).0 == 0)
        .collect();
    if empty.len() > limit {
        plan.delete = empty[..empty.len() - limit].iter().map(|rs| rs.name_any()).collect();
    }

    // Status from what the ReplicaSets report.
    let (mut have, mut ready, mut available) = (0, 0, 0);
    for rs in sets {
        let (h, r, a) = status_of(rs);
        have += h;
        ready += r;
        available += a;
    }
    let updated = current.map_or(0, |rs| status_of(rs).0);
    let min_available = replicas - if recreate { replicas } else { unavailable };
    let old_status = d.status.clone().unwrap_or_default();
    let mut conditions = old_status.conditions.clone().unwrap_or_default();
    if available >= min_available {
        set_condition(
            &mut conditions,
            condition(
                "Available",
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.".into(),
                now,
            ),
        );
    } else {
        set_condition(
            &mut conditions,
            condition(
                "Available",
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.".into(),
                now,
            ),
        );
    }
    let status = DeploymentStatus {
        observed_generation: d.metadata.generation,
        replicas: Some(have),
        updated_replicas: Some(updated),
        ready_replicas: Some(ready),
        available_replicas: Some(available),
        unavailable_replicas: Some((replicas - available).max(0)),
        collision_count: old_status.collision_count,
        terminating_replicas: None,
        conditions: None,
    };
    let new_name = current
        .map(|rs| rs.name_any())
        .or_else(|| plan.create.as_ref().map(|rs| rs.name_any()));
    plan.recheck = progress(
        d,
        &status,
        &mut conditions,
        new_name.as_deref(),
        plan.create.is_some(),
        now,
    );
    plan.status = DeploymentStatus {
        conditions: Some(conditions),
        ..status
    };
    plan
}

struct Ctx {
    client: Client,
    recorder: Recorder,
}

async fn reconcile(d: Arc<Deployment>, ctx: Arc<Ctx>) -> Result<Action> {
    let ns = d.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    let name = d.name_any();
    let uid = d.uid().unwrap_or_default();
    let api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &ns);
    let sets: Vec<ReplicaSet> = api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|rs| controlled_by(rs, &uid))
        .collect();
    if d.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let plan = plan(&d, &sets, jiff::Timestamp::now());
    let mut revision_now = sets
        .iter()
        .find(|rs| Some(bare(&d.spec.template)).as_ref() == rs.spec.template.as_ref().map(bare).as_ref())
        .map(revision);
    if let Some(rs) = &plan.create {
        match api.create(&PostParams::default(), rs).await {
            Ok(rs) => {
                tracing::info!(namespace = %ns, deployment = %name, replicaset = %rs.name_any(), "created replicaset");
                revision_now = Some(revision(&rs));
            }
            Err(e) if is_status(&e, 409) => return Ok(Action::requeue(Duration::from_millis(200))),
            Err(e) => return Err(e.into()),
        }
    }
    if let Some((rs, rev)) = &plan.set_revision {
        let patch = json!({"metadata": {"annotations": {REVISION: rev.to_string()}}});
        api.patch(rs, &PatchParams::default(), &Patch::Merge(&patch)).await?;
        revision_now = Some(*rev);
    }
    for (rs, replicas) in &plan.scale {
        let patch = json!({"spec": {"replicas": replicas}});
        match api.patch(rs, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => {
                tracing::info!(namespace = %ns, deployment = %name, replicaset = %rs, replicas, "scaled");
                let from = sets
                    .iter()
                    .find(|s| &s.name_any() == rs)
                    .and_then(|s| s.spec.replicas)
                    .unwrap_or(0);
                let direction = if *replicas >= from { "up" } else { "down" };
                let message = format!("Scaled {direction} replica set {rs} from {from} to {replicas}");
                ctx.recorder
                    .publish(d.as_ref(), EventType::Normal, "ScalingReplicaSet", &message)
                    .await;
            }
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(e.into()),
        }
    }
    for rs in &plan.delete {
        match api.delete(rs, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(rev) = revision_now
        && d.annotations().get(REVISION) != Some(&rev.to_string())
    {
        let patch = json!({"metadata": {"annotations": {REVISION: rev.to_string()}}});
        deployments
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    write_status(&deployments, &name, d.status.as_ref(), &plan.status).await?;
    let every = Duration::from_secs(30);
    Ok(Action::requeue(plan.recheck.map_or(every, |r| r.min(every))))
}

fn error_policy(d: Arc<Deployment>, e: &Error, _: Arc<Ctx>) -> Action {
    tracing::warn!(deployment = %d.name_any(), error = %e, "deployment reconcile failed");
    Action::requeue(Duration::from_secs(1))
}

pub async fn run(client: Client) -> Result<()> {
    Controller::new(Api::<Deployment>::all(client.clone()), watcher::Config::default())
        .owns(Api::<ReplicaSet>::all(client.clone()), watcher::Config::default())
        .run(
            reconcile,
            error_policy,
            Arc::new(Ctx {
                recorder: Recorder::new(client.clone(), "deployment-controller"),
                client,
            }),
        )
        .for_each(|_| futures::future::ready(()))
        .await;
    Err(Error::Ended("the deployment controller"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStrategy, ReplicaSetStatus, RollingUpdateDeployment};
    use k8s_openapi::api::core::v1::{Container, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

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

    fn deployment(image: &str, surge: i32, unavailable: i32) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("default".into()),
                uid: Some("d-uid".into()),
                generation: Some(2),
                ..Default::default()
            },
            spec: DeploymentSpec {
                replicas: Some(3),
                selector: LabelSelector {
                    match_labels: Some([("app".to_string(), "web".to_string())].into()),
                    ..Default::default()
                },
                template: template(image),
                strategy: Some(DeploymentStrategy {
                    type_: Some("RollingUpdate".into()),
                    rolling_update: Some(RollingUpdateDeployment {
                        max_surge: Some(IntOrString::Int(surge)),
                        max_unavailable: Some(IntOrString::Int(unavailable)),
                    }),
                }),
                progress_deadline_seconds: Some(600),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn progressing(p: &Plan) -> DeploymentCondition {
        p.status
            .conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_.as_deref() == Some(PROGRESSING))
            .cloned()
            .expect("a Progressing condition")
    }

    #[test]
    fn a_paused_deployment_does_not_roll_but_still_scales() {
        let mut d = deployment("nginx:2", 1, 0);
        d.spec.paused = Some(true);
        let old = replica_set(&d, "nginx:1", 3, 3, 1);
        let p = plan(&d, std::slice::from_ref(&old), jiff::Timestamp::now());
        assert!(
            p.create.is_none() && p.scale.is_empty() && p.set_revision.is_none(),
            "{p:?}"
        );
        let c = progressing(&p);
        assert_eq!(
            (c.status.as_deref(), c.reason.as_deref(), c.message.as_deref()),
            (Some("Unknown"), Some(PAUSED), Some("Deployment is paused"))
        );
        d.spec.replicas = Some(5);
        let p = plan(&d, std::slice::from_ref(&old), jiff::Timestamp::now());
        assert!(p.create.is_none());
        assert_eq!(p.scale, [(old.name_any(), 5)]);
        // Paused mid-rollout: both sets grow in proportion, within replicas + maxSurge.
        let new = replica_set(&d, "nginx:2", 2, 2, 2);
        let older = replica_set(&d, "nginx:1", 2, 2, 1);
        d.spec.replicas = Some(7);
        let p = plan(&d, &[older.clone(), new.clone()], jiff::Timestamp::now());
        assert_eq!(p.scale, [(older.name_any(), 4), (new.name_any(), 4)]);

        // Resumed: the rollout starts, and says so.
        d.spec.paused = Some(false);
        d.spec.replicas = Some(3);
        d.status = Some(p.status);
        let p = plan(&d, std::slice::from_ref(&old), jiff::Timestamp::now());
        let new = p.create.as_ref().expect("a new set");
        let c = progressing(&p);
        assert_eq!(c.reason.as_deref(), Some(NEW_RS_CREATED));
        assert_eq!(
            c.message.unwrap(),
            format!("Created new replica set \"{}\"", new.name_any())
        );
    }

    #[test]
    fn resuming_without_changes_reports_deployment_resumed() {
        let mut d = deployment("nginx:1", 1, 0);
        d.spec.paused = Some(true);
        let rs = replica_set(&d, "nginx:1", 3, 3, 1);
        let p = plan(&d, std::slice::from_ref(&rs), jiff::Timestamp::now());
        d.status = Some(p.status);
        d.spec.paused = Some(false);
        // Complete already: Resumed turns into NewReplicaSetAvailable.
        let p = plan(&d, std::slice::from_ref(&rs), jiff::Timestamp::now());
        assert_eq!(progressing(&p).reason.as_deref(), Some(NEW_RS_AVAILABLE));
        // Not complete and no progress: Resumed stays, with a deadline to watch.
        let stuck = replica_set(&d, "nginx:1", 3, 0, 1);
        d.spec.paused = Some(true);
        let p = plan(&d, std::slice::from_ref(&stuck), jiff::Timestamp::now());
        d.status = Some(p.status);
        d.spec.paused = Some(false);
        let p = plan(&d, std::slice::from_ref(&stuck), jiff::Timestamp::now());
        let c = progressing(&p);
        assert_eq!(
            (c.status.as_deref(), c.reason.as_deref(), c.message.as_deref()),
            (Some("Unknown"), Some(RESUMED), Some("Deployment is resumed"))
        );
        assert!(p.recheck.is_some());
    }

    #[test]
    fn no_progress_within_the_deadline_times_out() {
        let mut d = deployment("nginx:1", 1, 0);
        d.spec.progress_deadline_seconds = Some(2);
        let t0: jiff::Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let rs = replica_set(&d, "nginx:1", 3, 0, 1);
        // First sight of the pods (progress): ReplicaSetUpdated, look again in 2 s.
        let p = plan(&d, std::slice::from_ref(&rs), t0);
        let c = progressing(&p);
        assert_eq!(c.reason.as_deref(), Some(RS_UPDATED));
        assert_eq!(
            c.message.unwrap(),
            format!("ReplicaSet \"{}\" is progressing.", rs.name_any())
        );
        assert_eq!(p.recheck, Some(Duration::from_secs(2)));
        d.status = Some(p.status);
        // Nothing moves: still fine after 1 s, timed out after 3 s.
        let p = plan(&d, std::slice::from_ref(&rs), t0 + jiff::SignedDuration::from_secs(1));
        assert_eq!(progressing(&p).reason.as_deref(), Some(RS_UPDATED));
        assert!(p.recheck.unwrap() <= Duration::from_millis(1100));
        let p = plan(&d, std::slice::from_ref(&rs), t0 + jiff::SignedDuration::from_secs(3));
        let c = progressing(&p);
        assert_eq!(
            (c.status.as_deref(), c.reason.as_deref()),
            (Some("False"), Some(TIMED_OUT))
        );
        assert_eq!(
            c.message.unwrap(),
            format!("ReplicaSet \"{}\" has timed out progressing.", rs.name_any())
        );
        assert_eq!(p.recheck, None);
        // Pods becoming ready later is progress again.
        d.status = Some(p.status);
        let ready = replica_set(&d, "nginx:1", 3, 3, 1);
        let p = plan(
            &d,
            std::slice::from_ref(&ready),
            t0 + jiff::SignedDuration::from_secs(9),
        );
        assert_eq!(progressing(&p).reason.as_deref(), Some(NEW_RS_AVAILABLE));
        // Pausing does not hide a timeout.
        let mut timed_out = d.clone();
        timed_out.spec.paused = Some(true);
        let p = plan(
            &timed_out,
            std::slice::from_ref(&rs),
            t0 + jiff::SignedDuration::from_secs(9),
        );
        assert_eq!(progressing(&p).reason.as_deref(), Some(TIMED_OUT));
    }

    /// The ReplicaSet the controller would create for `image`, at `replicas` all available.
    fn replica_set(d: &Deployment, image: &str, replicas: i32, available: i32, revision: i64) -> ReplicaSet {
        let mut d = d.clone();
        d.spec.template = template(image);
        d.spec.paused = None;
        let mut rs = plan(&d, &[], jiff::Timestamp::UNIX_EPOCH).create.expect("a new set");
        rs.metadata.uid = Some(format!("uid-{image}"));
        rs.metadata.annotations = Some([(REVISION.to_string(), revision.to_string())].into());
        rs.spec.replicas = Some(replicas);
        rs.status = Some(ReplicaSetStatus {
            replicas,
            ready_replicas: Some(available),
            available_replicas: Some(available),
            ..Default::default()
        });
        rs
    }

    #[test]
    fn the_first_replica_set_carries_the_template_hash_and_revision_one() {
        let d = deployment("nginx:1", 1, 0);
        let rs = plan(&d, &[], jiff::Timestamp::now()).create.expect("a new set");
        let hash = template_hash(&d.spec.template);
        assert_eq!(rs.name_any(), format!("web-{hash}"));
        assert_eq!(rs.labels().get(HASH_LABEL), Some(&hash));
        assert_eq!(
            rs.spec.selector.match_labels.as_ref().unwrap().get(HASH_LABEL),
            Some(&hash)
        );
        assert_eq!(rs.annotations().get(REVISION).map(String::as_str), Some("1"));
        assert_eq!(rs.spec.replicas, Some(3));
    }

    #[test]
    fn a_rolling_update_with_no_unavailability_surges_before_scaling_down() {
        let d = deployment("nginx:2", 1, 0);
        let old = replica_set(&d, "nginx:1", 3, 3, 1);
        let p = plan(&d, std::slice::from_ref(&old), jiff::Timestamp::now());
        let new = p.create.expect("a new set");
        assert_eq!(new.spec.replicas, Some(1));
        assert_eq!(new.annotations().get(REVISION).map(String::as_str), Some("2"));
        assert!(p.scale.is_empty(), "{:?}", p.scale);

        // The surge pod is not available yet: the old set keeps all three.
        let new = replica_set(&d, "nginx:2", 1, 0, 2);
        let p = plan(&d, &[old.clone(), new], jiff::Timestamp::now());
        assert!(p.scale.is_empty(), "{:?}", p.scale);
        // Once it is, one old pod may go.
        let new = replica_set(&d, "nginx:2", 1, 1, 2);
        let p = plan(&d, &[old, new], jiff::Timestamp::now());
        assert_eq!(p.scale, [(old_name(&d), 2)]);
    }

    fn old_name(d: &Deployment) -> String {
        replica_set(d, "nginx:1", 0, 0, 1).name_any()
    }

    #[test]
    fn a_finished_rollout_is_complete_and_available() {
        let d = deployment("nginx:2", 1, 0);
        let old = replica_set(&d, "nginx:1", 0, 0, 1);
        let new = replica_set(&d, "nginx:2", 3, 3, 2);
        let p = plan(&d, &[old, new], jiff::Timestamp::now());
        assert!(p.scale.is_empty() && p.create.is_none() && p.delete.is_empty());
        let s = p.status;
        assert_eq!(
            (s.replicas, s.updated_replicas, s.available_replicas),
            (Some(3), Some(3), Some(3))
        );
        let reasons: Vec<_> = s.conditions.unwrap().into_iter().map(|c| c.reason.unwrap()).collect();
        assert_eq!(reasons, ["MinimumReplicasAvailable", "NewReplicaSetAvailable"]);
    }

    #[test]
    fn undo_reuses_the_old_replica_set_with_a_new_revision() {
        let d = deployment("nginx:1", 1, 0);
        let first = replica_set(&d, "nginx:1", 0, 0, 1);
        let second = replica_set(&d, "nginx:2", 3, 3, 2);
        let p = plan(&d, &[first.clone(), second], jiff::Timestamp::now());
        assert!(p.create.is_none());
        assert_eq!(p.set_revision, Some((first.name_any(), 3)));
        assert_eq!(p.scale, [(first.name_any(), 1)]);
    }

    #[test]
    fn recreate_empties_old_sets_before_starting_new_pods() {
        let mut d = deployment("nginx:2", 1, 0);
        d.spec.strategy = Some(DeploymentStrategy {
            type_: Some("Recreate".into()),
            rolling_update: None,
        });
        let old = replica_set(&d, "nginx:1", 3, 3, 1);
        let p = plan(&d, std::slice::from_ref(&old), jiff::Timestamp::now());
        assert_eq!(p.create.expect("a new set").spec.replicas, Some(0));
        assert_eq!(p.scale, [(old.name_any(), 0)]);
        let gone = replica_set(&d, "nginx:1", 0, 0, 1);
        let new = replica_set(&d, "nginx:2", 0, 0, 2);
        let p = plan(&d, &[gone, new.clone()], jiff::Timestamp::now());
        assert_eq!(p.scale, [(new.name_any(), 3)]);
    }

    #[test]
    fn history_beyond_the_limit_is_deleted_oldest_first() {
        let mut d = deployment("nginx:9", 1, 0);
        d.spec.revision_history_limit = Some(1);
        let sets: Vec<_> = (1..=3)
            .map(|i| replica_set(&d, &format!("nginx:{i}"), 0, 0, i))
            .chain([replica_set(&d, "nginx:9", 3, 3, 4)])
            .collect();
        let p = plan(&d, &sets, jiff::Timestamp::now());
        assert_eq!(p.delete, [sets[0].name_any(), sets[1].name_any()]);
    }

    #[test]
    fn percentages_round_surge_up_and_unavailability_down() {
        let mut d = deployment("nginx:1", 0, 0);
        d.spec.replicas = Some(10);
        d.spec.strategy.as_mut().unwrap().rolling_update = None;
        assert_eq!(surge_and_unavailable(&d), (3, 2));
        d.spec.strategy.as_mut().unwrap().rolling_update = Some(RollingUpdateDeployment {
            max_surge: Some(IntOrString::Int(0)),
            max_unavailable: Some(IntOrString::Int(0)),
        });
        assert_eq!(surge_and_unavailable(&d), (0, 1));
    }
}
