//! The ServiceAccount controller: a `default` ServiceAccount in every namespace that is not
//! being deleted, recreated when deleted. Owns only those `default` accounts.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};

use super::{Error, Result, is_status};

pub const DEFAULT_NAME: &str = "default";

/// The ServiceAccount to create in `ns`, if one is missing: none while the namespace terminates.
pub fn missing_default(ns: &Namespace, default_exists: bool) -> Option<ServiceAccount> {
    if default_exists || ns.metadata.deletion_timestamp.is_some() {
        return None;
    }
    Some(ServiceAccount {
        metadata: ObjectMeta {
            name: Some(DEFAULT_NAME.into()),
            namespace: Some(ns.name_any()),
            ..Default::default()
        },
        ..Default::default()
    })
}

struct Ctx {
    client: Client,
}

async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Ctx>) -> Result<Action> {
    let name = ns.name_any();
    let accounts: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &name);
    let exists = accounts.get_opt(DEFAULT_NAME).await?.is_some();
    if let Some(sa) = missing_default(&ns, exists) {
        match accounts.create(&PostParams::default(), &sa).await {
            Ok(_) => tracing::info!(namespace = %name, "created the default ServiceAccount"),
            // Created meanwhile, namespace gone, or terminating: nothing left to do.
            Err(e) if is_status(&e, 409) || is_status(&e, 404) || is_status(&e, 403) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Action::await_change())
}

fn error_policy(ns: Arc<Namespace>, e: &Error, _: Arc<Ctx>) -> Action {
    tracing::warn!(namespace = %ns.name_any(), error = %e, "serviceaccount reconcile failed");
    Action::requeue(Duration::from_secs(1))
}

pub async fn run(client: Client) -> Result<()> {
    let accounts = Api::<ServiceAccount>::all(client.clone());
    Controller::new(Api::<Namespace>::all(client.clone()), watcher::Config::default())
        .watches(
            accounts,
            watcher::Config::default().fields(&format!("metadata.name={DEFAULT_NAME}")),
            |sa| sa.namespace().map(|ns| ObjectRef::<Namespace>::new(&ns)),
        )
        .run(reconcile, error_policy, Arc::new(Ctx { client }))
        .for_each(|_| futures::future::ready(()))
        .await;
    Err(Error::Ended("the serviceaccount controller"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn namespace(name: &str) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_namespace_without_default_account_gets_one() {
        let sa = missing_default(&namespace("team-a"), false).expect("one to create");
        assert_eq!(sa.metadata.name.as_deref(), Some("default"));
        assert_eq!(sa.metadata.namespace.as_deref(), Some("team-a"));
    }

    #[test]
    fn an_existing_default_account_is_left_alone() {
        assert!(missing_default(&namespace("team-a"), true).is_none());
    }

    #[test]
    fn a_terminating_namespace_gets_no_account() {
        let mut ns = namespace("going");
        ns.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::now()));
        assert!(missing_default(&ns, false).is_none());
    }
}
