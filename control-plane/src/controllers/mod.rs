//! Weir's control loops, run in-process by `weir server`: default ServiceAccounts, namespace
//! lifecycle, the garbage collector, EndpointSlices, Deployments, ReplicaSets, StatefulSets,
//! DaemonSets, the scheduler, node lifecycle (heartbeats, taints, eviction), LoadBalancer
//! addresses and the PersistentVolume binder and provisioner. They reach the API only through kube-rs,
//! exactly as they would against Kubernetes, and never touch the store.

pub mod daemonset;
pub mod deployment;
pub mod endpointslice;
pub mod events;
pub mod garbagecollector;
pub mod history;
pub mod loadbalancer;
pub mod namespace;
pub mod nodeipam;
pub mod nodelifecycle;
pub mod replicaset;
pub mod scheduler;
pub mod serviceaccount;
pub mod statefulset;
pub mod volume;

use std::future::Future;
use std::time::Duration;

use kube::Client;

/// What can go wrong in a control loop; every variant is retried by its loop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("object without {0}")]
    MissingField(&'static str),
    #[error("{0} ended unexpectedly")]
    Ended(&'static str),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Controller settings taken from `weir server`'s flags.
#[derive(Debug, Clone)]
pub struct Config {
    /// No heartbeat for this long: the node is Unknown and tainted unreachable.
    pub node_monitor_grace_period: Duration,
    /// Addresses for Services of type LoadBalancer; none configured leaves them pending.
    pub load_balancer_pool: Option<loadbalancer::Pool>,
    /// The pod CIDRs node IPAM hands out blocks of; empty: none.
    pub cluster_cidrs: nodeipam::ClusterCidrs,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            node_monitor_grace_period: Duration::from_secs(40),
            load_balancer_pool: None,
            cluster_cidrs: nodeipam::ClusterCidrs::parse("10.244.0.0/16", 24, 64).expect("a valid default"),
        }
    }
}

/// Starts every controller; each is restarted (after a pause) when it fails or panics, so a
/// broken controller never takes the API server down.
pub fn run(client: Client, config: Config) {
    spawn_supervised("nodelifecycle", {
        let (client, grace) = (client.clone(), config.node_monitor_grace_period);
        move || nodelifecycle::run(client.clone(), grace)
    });
    spawn_supervised("loadbalancer", {
        let (client, pool) = (client.clone(), config.load_balancer_pool);
        move || loadbalancer::run(client.clone(), pool.clone())
    });
    spawn_supervised("nodeipam", {
        let (client, cidrs) = (client.clone(), config.cluster_cidrs);
        move || nodeipam::run(client.clone(), cidrs.clone())
    });
    spawn_supervised("serviceaccount", {
        let client = client.clone();
        move || serviceaccount::run(client.clone())
    });
    spawn_supervised("namespace", {
        let client = client.clone();
        move || namespace::run(client.clone())
    });
    spawn_supervised("garbagecollector", {
        let client = client.clone();
        move || garbagecollector::run(client.clone())
    });
    spawn_supervised("deployment", {
        let client = client.clone();
        move || deployment::run(client.clone())
    });
    spawn_supervised("replicaset", {
        let client = client.clone();
        move || replicaset::run(client.clone())
    });
    spawn_supervised("scheduler", {
        let client = client.clone();
        move || scheduler::run(client.clone())
    });
    spawn_supervised("statefulset", {
        let client = client.clone();
        move || statefulset::run(client.clone())
    });
    spawn_supervised("daemonset", {
        let client = client.clone();
        move || daemonset::run(client.clone())
    });
    spawn_supervised("volume", {
        let client = client.clone();
        move || volume::run(client.clone())
    });
    spawn_supervised("endpointslice", move || endpointslice::run(client.clone()));
}

fn spawn_supervised<F, Fut>(name: &'static str, start: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            match tokio::spawn(start()).await {
                Ok(Ok(())) => tracing::warn!(controller = name, "controller stopped; restarting"),
                Ok(Err(e)) => tracing::warn!(controller = name, error = %e, "controller failed; restarting"),
                Err(e) => tracing::error!(controller = name, error = %e, "controller panicked; restarting"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

/// The owner reference marked `controller: true`, if any.
pub(crate) fn controller_of(
    obj: &impl kube::Resource,
) -> Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference> {
    obj.meta()
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
}

/// Whether `obj`'s controller is the object with `uid`.
pub(crate) fn controlled_by(obj: &impl kube::Resource, uid: &str) -> bool {
    controller_of(obj).is_some_and(|o| o.uid == uid)
}

/// An absolute number or a percentage of `total` (Kubernetes' GetScaledValueFromIntOrPercent):
/// maxSurge, maxUnavailable. None for a string that is not `<number>%`.
pub(crate) fn scaled_value(
    value: &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString,
    total: i32,
    round_up: bool,
) -> Option<i32> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    match value {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(s) => {
            let percent: i64 = s.strip_suffix('%')?.trim().parse().ok()?;
            let scaled = percent * total as i64;
            Some(if round_up {
                (scaled + 99).div_euclid(100)
            } else {
                scaled.div_euclid(100)
            } as i32)
        }
    }
}

/// Writes `status` to the status subresource of `name` unless `current` already is it; an
/// object deleted meanwhile is not an error.
pub(crate) async fn write_status<K, S>(api: &kube::Api<K>, name: &str, current: Option<&S>, status: &S) -> Result<()>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: serde::Serialize + PartialEq,
{
    if current == Some(status) {
        return Ok(());
    }
    let patch = serde_json::json!({ "status": status });
    match api
        .patch_status(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_status(&e, 404) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Whether a kube error is the API's `code` (404 NotFound, 409 Conflict...).
pub(crate) fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// A controller that recomputes everything in one pass over one watched kind.
pub(crate) trait Pass {
    fn pass(&mut self) -> impl Future<Output = Result<()>> + Send;
}

/// Watches `api` into a store, then runs `make(store)`'s pass once the store is filled,
/// after every change and at least every `resync`, until the watch ends (the supervisor
/// restarts the controller then). A failed pass is logged and retried on the next wake-up.
pub(crate) async fn run_passes<K, P>(
    name: &'static str,
    api: kube::Api<K>,
    resync: Duration,
    make: impl FnOnce(kube::runtime::reflector::Store<K>) -> P,
) -> Result<()>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    P: Pass,
{
    use futures::StreamExt as _;
    use kube::runtime::WatchStreamExt as _;
    let (store, writer) = kube::runtime::reflector::store::<K>();
    let changed = std::sync::Arc::new(tokio::sync::Notify::new());
    let events = kube::runtime::reflector(writer, kube::runtime::watcher(api, Default::default())).default_backoff();
    let notify = changed.clone();
    let watching = tokio::spawn(events.for_each(move |_| {
        notify.notify_one();
        futures::future::ready(())
    }));
    store.wait_until_ready().await.ok();
    let mut controller = make(store);
    let result = loop {
        if watching.is_finished() {
            break Err(Error::Ended(name));
        }
        if let Err(e) = controller.pass().await {
            tracing::warn!(controller = name, error = %e, "pass failed");
        }
        let _ = tokio::time::timeout(resync, changed.notified()).await;
    };
    watching.abort();
    result
}
