//! The garbage collector: follows ownerReferences across every resource the API server serves.
//! Deletes dependents whose owners are all gone (background propagation), deletes the
//! dependents of owners held by `foregroundDeletion` and then releases them, and strips the
//! references of owners held by `orphan`. The API server adds those finalizers on DELETE; this
//! loop only ever removes them.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, PostParams, Preconditions, PropagationPolicy};
use kube::runtime::reflector::{self, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::Notify;

use super::namespace::api_resource;
use super::{Error, Result, is_status};
use crate::apiserver::handler::{FOREGROUND_FINALIZER, ORPHAN_FINALIZER};
use crate::apiserver::resources::{RESOURCES, Resource, find_kind};

/// One object: which resource (index into `RESOURCES`), where, and which uid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectId {
    pub resource: usize,
    pub namespace: Option<String>,
    pub name: String,
    pub uid: String,
}

impl ObjectId {
    fn resource(&self) -> &'static Resource {
        &RESOURCES[self.resource]
    }
}

/// An object as the collector sees it.
#[derive(Debug, Clone)]
pub struct GraphNode {
    pub id: ObjectId,
    pub owners: Vec<OwnerReference>,
    pub deleting: bool,
    pub finalizers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum GcAction {
    /// Delete a dependent whose owners are gone or being deleted in the foreground, once the
    /// owners in `verify_absent` are confirmed gone by a live read.
    Delete {
        object: ObjectId,
        foreground: bool,
        verify_absent: Vec<OwnerReference>,
    },
    /// Drop these owner uids from an object's ownerReferences (orphaning, or owners gone while
    /// others remain), after confirming `verify_absent` gone.
    RemoveOwners {
        object: ObjectId,
        uids: Vec<String>,
        verify_absent: Vec<OwnerReference>,
    },
    /// The collector's work for this deleting owner is done.
    RemoveFinalizer { object: ObjectId, finalizer: &'static str },
}

/// The resource an ownerReference names, if Weir serves it.
fn owner_resource(owner: &OwnerReference) -> Option<&'static Resource> {
    let (group, version) = owner.api_version.rsplit_once('/').unwrap_or(("", &owner.api_version));
    find_kind(group, version, &owner.kind)
}

/// What the collector should do now, given every object in the cluster.
pub fn plan(nodes: &[GraphNode]) -> Vec<GcAction> {
    let by_uid: HashMap<&str, &GraphNode> = nodes.iter().map(|n| (n.id.uid.as_str(), n)).collect();
    // owner uid -> (dependent, blockOwnerDeletion)
    let mut dependents: HashMap<&str, Vec<(&GraphNode, bool)>> = HashMap::new();
    for n in nodes {
        for o in &n.owners {
            dependents
                .entry(o.uid.as_str())
                .or_default()
                .push((n, o.block_owner_deletion == Some(true)));
        }
    }
    let has = |n: &GraphNode, f: &str| n.deleting && n.finalizers.iter().any(|x| x == f);
    // (blocking first, action)
    let mut actions: Vec<(bool, GcAction)> = Vec::new();
    for n in nodes.iter().filter(|n| !n.owners.is_empty()) {
        let (mut absent, mut orphaning) = (Vec::new(), Vec::new());
        let (mut solid, mut waiting, mut blocking) = (false, false, false);
        for o in &n.owners {
            match by_uid.get(o.uid.as_str()) {
                Some(owner) if has(owner, ORPHAN_FINALIZER) => orphaning.push(o.uid.clone()),
                Some(owner) if has(owner, FOREGROUND_FINALIZER) => {
                    waiting = true;
                    blocking |= o.block_owner_deletion == Some(true);
                }
                Some(_) => solid = true,
                // An owner of a kind Weir does not serve can never be confirmed gone.
                None if owner_resource(o).is_none() => solid = true,
                None => absent.push(o.clone()),
            }
        }
        if !orphaning.is_empty() {
            actions.push((
                false,
                GcAction::RemoveOwners {
                    object: n.id.clone(),
                    uids: orphaning,
                    verify_absent: Vec::new(),
                },
            ));
            continue;
        }
        if n.deleting {
            continue;
        }
        if !solid {
            // Owners all gone, or the remaining ones wait for their dependents to go first.
            actions.push((
                blocking,
                GcAction::Delete {
                    object: n.id.clone(),
                    foreground: waiting && dependents.contains_key(n.id.uid.as_str()),
                    verify_absent: absent,
                },
            ));
        } else if !absent.is_empty() {
            actions.push((
                false,
                GcAction::RemoveOwners {
                    object: n.id.clone(),
                    uids: absent.iter().map(|o| o.uid.clone()).collect(),
                    verify_absent: absent,
                },
            ));
        }
    }
    for n in nodes.iter().filter(|n| n.deleting) {
        let deps = dependents.get(n.id.uid.as_str());
        if has(n, FOREGROUND_FINALIZER) && !deps.is_some_and(|d| d.iter().any(|(_, blocking)| *blocking)) {
            actions.push((
                false,
                GcAction::RemoveFinalizer {
                    object: n.id.clone(),
                    finalizer: FOREGROUND_FINALIZER,
                },
            ));
        }
        if has(n, ORPHAN_FINALIZER) && deps.is_none_or(|d| d.is_empty()) {
            actions.push((
                false,
                GcAction::RemoveFinalizer {
                    object: n.id.clone(),
                    finalizer: ORPHAN_FINALIZER,
                },
            ));
        }
    }
    // Blocking dependents of foreground deletions go first.
    actions.sort_by_key(|(blocking, _)| !*blocking);
    actions.into_iter().map(|(_, a)| a).collect()
}

/// API requests in flight at once; actions start in plan order (blocking dependents first).
const CONCURRENCY: usize = 32;

/// Resources the collector follows: all but Events, which are many and own nothing.
fn followed() -> impl Iterator<Item = (usize, &'static Resource)> {
    RESOURCES.iter().enumerate().filter(|(_, r)| r.kind != "Event")
}

fn node_of(resource: usize, obj: &DynamicObject) -> Option<GraphNode> {
    Some(GraphNode {
        id: ObjectId {
            resource,
            namespace: obj.metadata.namespace.clone(),
            name: obj.metadata.name.clone()?,
            uid: obj.metadata.uid.clone()?,
        },
        owners: obj.metadata.owner_references.clone().unwrap_or_default(),
        deleting: obj.metadata.deletion_timestamp.is_some(),
        finalizers: obj.metadata.finalizers.clone().unwrap_or_default(),
    })
}

fn api_for(client: &Client, r: &Resource, namespace: Option<&str>) -> Api<DynamicObject> {
    let ar = api_resource(r);
    match (r.namespaced, namespace) {
        (true, Some(ns)) => Api::namespaced_with(client.clone(), ns, &ar),
        _ => Api::all_with(client.clone(), &ar),
    }
}

/// Owner uids confirmed gone by a live read during one pass (an owner of many dependents is
/// read once).
type Confirmed = Mutex<HashSet<String>>;

/// Whether any of `owners` (of an object in `namespace`) still exists, read live: the caches
/// may not have seen an owner created a moment ago.
async fn any_present(
    client: &Client,
    namespace: Option<&str>,
    owners: &[OwnerReference],
    confirmed: &Confirmed,
) -> Result<bool> {
    for o in owners {
        if confirmed.lock().expect("confirmed lock").contains(&o.uid) {
            continue;
        }
        let Some(r) = owner_resource(o) else {
            return Ok(true);
        };
        if let Some(obj) = api_for(client, r, namespace).get_opt(&o.name).await?
            && obj.metadata.uid.as_deref() == Some(o.uid.as_str())
        {
            return Ok(true);
        }
        confirmed.lock().expect("confirmed lock").insert(o.uid.clone());
    }
    Ok(false)
}

/// Read `object` live, change it with `edit` (false: nothing to change) and write it back
/// guarded by its resourceVersion.
async fn edit(client: &Client, object: &ObjectId, edit: impl FnOnce(&mut DynamicObject) -> bool) -> Result<()> {
    let api = api_for(client, object.resource(), object.namespace.as_deref());
    let Some(mut obj) = api.get_opt(&object.name).await? else {
        return Ok(());
    };
    if obj.metadata.uid.as_deref() != Some(object.uid.as_str()) || !edit(&mut obj) {
        return Ok(());
    }
    match api.replace(&object.name, &PostParams::default(), &obj).await {
        Ok(_) => Ok(()),
        // Changed or gone meanwhile: the next round looks again.
        Err(e) if is_status(&e, 409) || is_status(&e, 404) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn execute(client: &Client, action: GcAction, confirmed: &Confirmed) -> Result<()> {
    match action {
        GcAction::Delete {
            object,
            foreground,
            verify_absent,
        } => {
            if any_present(client, object.namespace.as_deref(), &verify_absent, confirmed).await? {
                return Ok(());
            }
            let params = DeleteParams {
                propagation_policy: Some(if foreground {
                    PropagationPolicy::Foreground
                } else {
                    PropagationPolicy::Background
                }),
                preconditions: Some(Preconditions {
                    uid: Some(object.uid.clone()),
                    resource_version: None,
                }),
                ..Default::default()
            };
            let api = api_for(client, object.resource(), object.namespace.as_deref());
            match api.delete(&object.name, &params).await {
                Ok(_) => {
                    tracing::info!(kind = object.resource().kind, namespace = object.namespace.as_deref().unwrap_or(""), name = %object.name, foreground, "deleted a dependent");
                    Ok(())
                }
                Err(e) if is_status(&e, 409) || is_status(&e, 404) => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
        GcAction::RemoveOwners {
            object,
            uids,
            verify_absent,
        } => {
            if any_present(client, object.namespace.as_deref(), &verify_absent, confirmed).await? {
                return Ok(());
            }
            edit(client, &object, |obj| {
                let Some(refs) = obj.metadata.owner_references.as_mut() else {
                    return false;
                };
                let before = refs.len();
                refs.retain(|o| !uids.contains(&o.uid));
                refs.len() != before
            })
            .await
        }
        GcAction::RemoveFinalizer { object, finalizer } => {
            edit(client, &object, |obj| {
                let Some(finalizers) = obj.metadata.finalizers.as_mut() else {
                    return false;
                };
                let before = finalizers.len();
                finalizers.retain(|f| f != finalizer);
                finalizers.len() != before
            })
            .await
        }
    }
}

/// The objects `plan` needs: those with owners, those being deleted, and those others name as
/// their owner. Everything else can neither act nor be acted upon, so it is left out.
fn snapshot(stores: &[(usize, Store<DynamicObject>)]) -> Vec<GraphNode> {
    let all: Vec<(usize, Arc<DynamicObject>)> = stores
        .iter()
        .flat_map(|(i, store)| store.state().into_iter().map(move |o| (*i, o)))
        .collect();
    let referenced: HashSet<&str> = all
        .iter()
        .flat_map(|(_, o)| o.metadata.owner_references.iter().flatten())
        .map(|r| r.uid.as_str())
        .collect();
    all.iter()
        .filter(|(_, o)| {
            o.metadata.owner_references.as_ref().is_some_and(|r| !r.is_empty())
                || o.metadata.deletion_timestamp.is_some()
                || o.metadata.uid.as_deref().is_some_and(|u| referenced.contains(u))
        })
        .filter_map(|(i, o)| node_of(*i, o))
        .collect()
}

pub async fn run(client: Client) -> Result<()> {
    let changed = Arc::new(Notify::new());
    let mut stores = Vec::new();
    let mut streams = Vec::new();
    for (i, r) in followed() {
        let ar = api_resource(r);
        let writer = reflector::store::Writer::new(ar.clone());
        stores.push((i, writer.as_reader()));
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        streams.push(
            reflector(writer, watcher(api, watcher::Config::default()))
                .default_backoff()
                .boxed(),
        );
    }
    let follow = {
        let changed = changed.clone();
        async move {
            let mut all = futures::stream::select_all(streams);
            while let Some(event) = all.next().await {
                if let Err(e) = event {
                    tracing::debug!(error = %e, "garbage collector watch failed; retrying");
                }
                changed.notify_one();
            }
        }
    };
    let collect = async {
        for (_, store) in &stores {
            store
                .wait_until_ready()
                .await
                .map_err(|_| Error::Ended("a garbage collector watch"))?;
        }
        tracing::info!("garbage collector synced");
        loop {
            let confirmed = Confirmed::default();
            futures::stream::iter(plan(&snapshot(&stores)))
                .for_each_concurrent(CONCURRENCY, |action| {
                    let (client, confirmed) = (&client, &confirmed);
                    async move {
                        if let Err(e) = execute(client, action, confirmed).await {
                            tracing::warn!(error = %e, "garbage collection step failed; retrying");
                        }
                    }
                })
                .await;
            // Changes come in bursts: wait for one, then let the burst settle briefly. A
            // periodic pass retries whatever failed.
            let _ = tokio::time::timeout(Duration::from_secs(5), changed.notified()).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        _ = follow => Err(Error::Ended("the garbage collector's watches")),
        r = collect => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(kind: &str) -> usize {
        RESOURCES
            .iter()
            .position(|r| r.kind == kind && r.group.is_empty())
            .unwrap()
    }

    fn node(kind: &str, name: &str, owners: &[(&str, bool)]) -> GraphNode {
        GraphNode {
            id: ObjectId {
                resource: idx(kind),
                namespace: Some("ns".into()),
                name: name.into(),
                uid: format!("uid-{name}"),
            },
            owners: owners
                .iter()
                .map(|(owner, block)| OwnerReference {
                    api_version: "v1".into(),
                    kind: "ConfigMap".into(),
                    name: owner.to_string(),
                    uid: format!("uid-{owner}"),
                    block_owner_deletion: Some(*block),
                    controller: None,
                })
                .collect(),
            deleting: false,
            finalizers: Vec::new(),
        }
    }

    fn deleting(mut n: GraphNode, finalizer: &str) -> GraphNode {
        n.deleting = true;
        n.finalizers = vec![finalizer.into()];
        n
    }

    fn names(actions: &[GcAction]) -> Vec<String> {
        actions
            .iter()
            .map(|a| match a {
                GcAction::Delete { object, foreground, .. } => format!("delete {} fg={foreground}", object.name),
                GcAction::RemoveOwners { object, uids, .. } => format!("unown {} {}", object.name, uids.join(",")),
                GcAction::RemoveFinalizer { object, finalizer } => format!("release {} {finalizer}", object.name),
            })
            .collect()
    }

    #[test]
    fn dependents_with_an_existing_owner_stay() {
        let nodes = [
            node("ConfigMap", "owner", &[]),
            node("Secret", "dep", &[("owner", false)]),
        ];
        assert!(plan(&nodes).is_empty());
    }

    #[test]
    fn dependents_of_a_vanished_owner_are_deleted_in_the_background() {
        let nodes = [node("Secret", "dep", &[("owner", false)])];
        let actions = plan(&nodes);
        assert_eq!(names(&actions), ["delete dep fg=false"]);
        let GcAction::Delete { verify_absent, .. } = &actions[0] else {
            panic!()
        };
        assert_eq!(verify_absent.len(), 1, "absence is confirmed live before deleting");
    }

    #[test]
    fn a_dependent_with_one_surviving_owner_only_loses_the_dead_reference() {
        let nodes = [
            node("ConfigMap", "alive", &[]),
            node("Secret", "dep", &[("alive", false), ("dead", false)]),
        ];
        assert_eq!(names(&plan(&nodes)), ["unown dep uid-dead"]);
    }

    #[test]
    fn foreground_deletes_blocking_dependents_first_and_waits_for_them() {
        let nodes = [
            deleting(node("ConfigMap", "owner", &[]), FOREGROUND_FINALIZER),
            node("Secret", "loose", &[("owner", false)]),
            node("Secret", "blocking", &[("owner", true)]),
        ];
        assert_eq!(
            names(&plan(&nodes)),
            ["delete blocking fg=false", "delete loose fg=false"]
        );
    }

    #[test]
    fn foreground_releases_the_owner_when_no_blocking_dependent_is_left() {
        let nodes = [
            deleting(node("ConfigMap", "owner", &[]), FOREGROUND_FINALIZER),
            node("Secret", "loose", &[("owner", false)]),
        ];
        assert_eq!(
            names(&plan(&nodes)),
            ["delete loose fg=false", "release owner foregroundDeletion"]
        );
        let nodes = [deleting(node("ConfigMap", "owner", &[]), FOREGROUND_FINALIZER)];
        assert_eq!(names(&plan(&nodes)), ["release owner foregroundDeletion"]);
    }

    #[test]
    fn foreground_cascades_to_dependents_that_own_others() {
        let nodes = [
            deleting(node("ConfigMap", "owner", &[]), FOREGROUND_FINALIZER),
            node("ConfigMap", "middle", &[("owner", true)]),
            node("Secret", "leaf", &[("middle", true)]),
        ];
        assert_eq!(names(&plan(&nodes)), ["delete middle fg=true"]);
    }

    #[test]
    fn a_dependent_already_being_deleted_is_not_deleted_again() {
        let nodes = [
            deleting(node("ConfigMap", "owner", &[]), FOREGROUND_FINALIZER),
            deleting(node("Secret", "dep", &[("owner", true)]), "example.com/hold"),
        ];
        assert!(plan(&nodes).is_empty(), "the owner waits for the blocking dependent");
    }

    #[test]
    fn orphan_strips_references_then_releases_the_owner() {
        let nodes = [
            deleting(node("ConfigMap", "owner", &[]), ORPHAN_FINALIZER),
            node("Secret", "dep", &[("owner", true)]),
        ];
        assert_eq!(names(&plan(&nodes)), ["unown dep uid-owner"]);
        let nodes = [
            deleting(node("ConfigMap", "owner", &[]), ORPHAN_FINALIZER),
            node("Secret", "dep", &[]),
        ];
        assert_eq!(names(&plan(&nodes)), ["release owner orphan"]);
    }

    #[test]
    fn owners_of_unknown_kinds_are_never_presumed_gone() {
        let mut dep = node("Secret", "dep", &[("crd-owner", false)]);
        dep.owners[0].api_version = "example.com/v1".into();
        dep.owners[0].kind = "Widget".into();
        assert!(plan(&[dep]).is_empty());
    }
}
