//! The namespace controller: empties a namespace that is being deleted (every namespaced
//! resource the API server serves), then clears its `kubernetes` finalizer through
//! `namespaces/{name}/finalize` so the API server removes it. Touches nothing else.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};

use super::{Error, Result, is_status};
use crate::apiserver::resources::{RESOURCES, Resource};

/// Deletes in flight at once while emptying a namespace.
const CONCURRENCY: usize = 32;

/// The finalizer the API server puts in every namespace's `spec.finalizers`.
pub const FINALIZER: &str = "kubernetes";

/// What to do with a namespace, given how many objects are still in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamespaceAction {
    /// Not being deleted, or not ours to finish.
    Nothing,
    /// Delete what is left in it.
    DeleteContent,
    /// Empty: write these `spec.finalizers` (ours removed) through `finalize`.
    Finalize(Vec<String>),
}

pub fn namespace_action(ns: &Namespace, remaining: usize) -> NamespaceAction {
    let finalizers = ns.spec.as_ref().and_then(|s| s.finalizers.clone()).unwrap_or_default();
    if ns.metadata.deletion_timestamp.is_none() || !finalizers.iter().any(|f| f == FINALIZER) {
        return NamespaceAction::Nothing;
    }
    if remaining > 0 {
        return NamespaceAction::DeleteContent;
    }
    NamespaceAction::Finalize(finalizers.into_iter().filter(|f| f != FINALIZER).collect())
}

/// Namespaced resources to empty, one per storage prefix (events.k8s.io Events are core Events).
pub fn namespaced_resources() -> Vec<&'static Resource> {
    let mut out: Vec<&'static Resource> = Vec::new();
    for r in RESOURCES.iter().filter(|r| r.namespaced) {
        if !out.iter().any(|o| o.key_prefix() == r.key_prefix()) {
            out.push(r);
        }
    }
    out
}

/// The kube-rs description of one of Weir's resources.
pub fn api_resource(r: &Resource) -> ApiResource {
    ApiResource {
        group: r.group.into(),
        version: r.version.into(),
        api_version: r.api_version(),
        kind: r.kind.into(),
        plural: r.plural.into(),
    }
}

struct Ctx {
    client: Client,
}

/// Deletes everything in `ns` once; returns how many objects were found (0: it was empty) and
/// how many of them are still there waiting on finalizers.
async fn delete_content(client: &Client, ns: &str) -> Result<(usize, usize)> {
    let (mut found, mut pending) = (0, 0);
    for r in namespaced_resources() {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &api_resource(r));
        let list = api.list(&ListParams::default()).await?;
        found += list.items.len();
        let results: Vec<Result<bool>> = futures::stream::iter(list.items)
            .map(|obj| {
                let api = api.clone();
                async move {
                    if obj.metadata.deletion_timestamp.is_some() {
                        return Ok(true);
                    }
                    match api.delete(&obj.name_any(), &DeleteParams::background()).await {
                        // Kubernetes answers with the object either way; only a marked one lingers.
                        Ok(either) => Ok(either
                            .as_ref()
                            .left()
                            .is_some_and(|o| o.metadata.deletion_timestamp.is_some())),
                        Err(e) if is_status(&e, 404) => Ok(false),
                        Err(e) => Err(e.into()),
                    }
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        for lingering in results {
            pending += usize::from(lingering?);
        }
    }
    Ok((found, pending))
}

async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Ctx>) -> Result<Action> {
    let name = ns.name_any();
    if namespace_action(&ns, 1) == NamespaceAction::Nothing {
        return Ok(Action::await_change());
    }
    // Repeat until a pass finds nothing: a create admitted just before the namespace was marked
    // can still land after the first pass.
    for _ in 0..10 {
        let (found, pending) = delete_content(&ctx.client, &name).await?;
        match namespace_action(&ns, found) {
            NamespaceAction::Nothing => return Ok(Action::await_change()),
            NamespaceAction::DeleteContent if pending > 0 => {
                tracing::debug!(namespace = %name, pending, "waiting for finalizers of objects in the namespace");
                return Ok(Action::requeue(Duration::from_millis(500)));
            }
            NamespaceAction::DeleteContent => continue,
            NamespaceAction::Finalize(finalizers) => {
                let mut finalized = (*ns).clone();
                finalized.spec.get_or_insert_default().finalizers = Some(finalizers);
                let api: Api<Namespace> = Api::all(ctx.client.clone());
                match api
                    .replace_subresource("finalize", &name, &PostParams::default(), &finalized)
                    .await
                {
                    Ok(_) => tracing::info!(namespace = %name, "namespace emptied and finalized"),
                    Err(e) if is_status(&e, 404) => {}
                    Err(e) => return Err(e.into()),
                }
                return Ok(Action::await_change());
            }
        }
    }
    Ok(Action::requeue(Duration::from_millis(200)))
}

fn error_policy(ns: Arc<Namespace>, e: &Error, _: Arc<Ctx>) -> Action {
    tracing::warn!(namespace = %ns.name_any(), error = %e, "namespace reconcile failed");
    Action::requeue(Duration::from_secs(1))
}

pub async fn run(client: Client) -> Result<()> {
    Controller::new(Api::<Namespace>::all(client.clone()), watcher::Config::default())
        .run(reconcile, error_policy, Arc::new(Ctx { client }))
        .for_each(|_| futures::future::ready(()))
        .await;
    Err(Error::Ended("the namespace controller"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::NamespaceSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use kube::api::ObjectMeta;

    fn namespace(deleting: bool, finalizers: &[&str]) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some("doomed".into()),
                deletion_timestamp: deleting.then(|| Time(jiff::Timestamp::now())),
                ..Default::default()
            },
            spec: Some(NamespaceSpec {
                finalizers: Some(finalizers.iter().map(|f| f.to_string()).collect()),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_live_namespace_is_left_alone() {
        assert_eq!(
            namespace_action(&namespace(false, &["kubernetes"]), 5),
            NamespaceAction::Nothing
        );
    }

    #[test]
    fn a_terminating_namespace_with_content_is_emptied_first() {
        assert_eq!(
            namespace_action(&namespace(true, &["kubernetes"]), 3),
            NamespaceAction::DeleteContent
        );
    }

    #[test]
    fn an_empty_terminating_namespace_drops_only_our_finalizer() {
        assert_eq!(
            namespace_action(&namespace(true, &["example.com/other", "kubernetes"]), 0),
            NamespaceAction::Finalize(vec!["example.com/other".into()])
        );
    }

    #[test]
    fn a_namespace_already_finalized_by_us_is_not_touched_again() {
        assert_eq!(
            namespace_action(&namespace(true, &["example.com/other"]), 0),
            NamespaceAction::Nothing
        );
    }

    #[test]
    fn every_namespaced_storage_prefix_is_emptied_once() {
        let resources = namespaced_resources();
        assert!(resources.iter().any(|r| r.kind == "Pod"));
        assert!(resources.iter().any(|r| r.kind == "EndpointSlice"));
        assert!(resources.iter().all(|r| r.namespaced));
        assert_eq!(resources.iter().filter(|r| r.kind == "Event").count(), 1);
    }
}
