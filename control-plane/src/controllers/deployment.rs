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
use super::{Error, Result, is_status};

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
    match v {
        IntOrString::Int(i) => i,
        IntOrString::String(s) => {
            let pct: f64 = s.trim_end_matches('%').parse().unwrap_or(0.0);
            let x = pct * total as f64 / 100.0;
            (if round_up { x.ceil() } else { x.floor() }) as i32
        }
    }
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
    match current {
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
            if new_target != new_spec {
                plan.scale.push((rs.name_any(), new_target));
            }
            if revision(rs) < max_revision || revision(rs) == 0 {
                plan.set_revision = Some((rs.name_any(), max_revision + 1));
            }
        }
    }

    // Old ReplicaSets shrink while enough pods stay available.
    if recreate {
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
    let complete = updated == replicas && have == replicas && current.is_some_and(|rs| status_of(rs).2 == replicas);
    let old_conditions = d.status.as_ref().and_then(|s| s.conditions.clone()).unwrap_or_default();
    let condition = |type_: &str, status: bool, reason: &str, message: String| {
        let status = if status { "True" } else { "False" };
        let previous = old_conditions.iter().find(|c| c.type_.as_deref() == Some(type_));
        let unchanged =
            previous.is_some_and(|c| c.status.as_deref() == Some(status) && c.reason.as_deref() == Some(reason));
        match previous {
            Some(c) if unchanged => c.clone(),
            _ => DeploymentCondition {
                type_: Some(type_.into()),
                status: Some(status.into()),
                reason: Some(reason.into()),
                message: Some(message),
                last_transition_time: Some(Time(now)),
                last_update_time: Some(Time(now)),
            },
        }
    };
    let min_available = replicas - if recreate { replicas } else { unavailable };
    let name = d.name_any();
    let new_name = current.map(|rs| rs.name_any()).unwrap_or_default();
    plan.status = DeploymentStatus {
        observed_generation: d.metadata.generation,
        replicas: Some(have),
        updated_replicas: Some(updated),
        ready_replicas: Some(ready),
        available_replicas: Some(available),
        unavailable_replicas: Some((replicas - available).max(0)),
        collision_count: d.status.as_ref().and_then(|s| s.collision_count),
        terminating_replicas: None,
        conditions: Some(vec![
            if available >= min_available {
                condition(
                    "Available",
                    true,
                    "MinimumReplicasAvailable",
                    "Deployment has minimum availability.".into(),
                )
            } else {
                condition(
                    "Available",
                    false,
                    "MinimumReplicasUnavailable",
                    "Deployment does not have minimum availability.".into(),
                )
            },
            if complete {
                condition(
                    "Progressing",
                    true,
                    "NewReplicaSetAvailable",
                    format!("ReplicaSet \"{new_name}\" has successfully progressed."),
                )
            } else {
                condition(
                    "Progressing",
                    true,
                    "ReplicaSetUpdated",
                    format!("Deployment \"{name}\" is progressing."),
                )
            },
        ]),
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
        .filter(|rs| {
            rs.owner_references()
                .iter()
                .any(|o| o.controller == Some(true) && o.uid == uid)
        })
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
    if d.status.as_ref() != Some(&plan.status) {
        let patch = json!({"status": plan.status});
        match deployments
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Action::requeue(Duration::from_secs(30)))
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
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// The ReplicaSet the controller would create for `image`, at `replicas` all available.
    fn replica_set(d: &Deployment, image: &str, replicas: i32, available: i32, revision: i64) -> ReplicaSet {
        let mut d = d.clone();
        d.spec.template = template(image);
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
