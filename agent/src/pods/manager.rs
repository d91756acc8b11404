//! The pods of this node: a watch of the pods bound to it (`spec.nodeName`), one
//! [`worker`](super::worker) per pod, and the cleanup of what pods that no longer exist left
//! behind (containers, networks, directories), found after the first complete list.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt as _;
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;
use tracing::{info, warn};

use super::worker::{self, Context, Handle, Message};
use crate::runtime::POD_UID_LABEL;

/// Runs the pods of the node until `stop` turns true; then the workers stop and leave the
/// containers running (a restarted agent adopts them).
pub async fn run(ctx: Arc<Context>, mut stop: watch::Receiver<bool>) {
    let api: Api<Pod> = Api::all(ctx.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", ctx.node_name));
    let mut events = std::pin::pin!(watcher::watcher(api, config));
    let mut workers: HashMap<String, Handle> = HashMap::new();
    let mut listing: Option<BTreeSet<String>> = None;
    let mut cleaned = false;
    loop {
        let event = tokio::select! {
            e = events.next() => e,
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some(event) = event else { break };
        match event {
            Ok(Event::Init) => listing = Some(BTreeSet::new()),
            Ok(Event::InitApply(pod)) => {
                if let Some(seen) = listing.as_mut() {
                    seen.insert(pod.uid().unwrap_or_default());
                }
                apply(&ctx, &mut workers, pod);
            }
            Ok(Event::InitDone) => {
                let seen = listing.take().unwrap_or_default();
                // Pods that went while the watch was down.
                let gone: Vec<String> = workers.keys().filter(|uid| !seen.contains(*uid)).cloned().collect();
                for uid in gone {
                    if let Some(handle) = workers.get(&uid) {
                        let _ = handle.tx.send(Message::Gone);
                    }
                }
                if !cleaned {
                    cleaned = true;
                    let ctx = ctx.clone();
                    tokio::spawn(async move { clean_orphans(&ctx, &seen).await });
                }
            }
            Ok(Event::Apply(pod)) => apply(&ctx, &mut workers, pod),
            Ok(Event::Delete(pod)) => {
                if let Some(handle) = workers.get(&pod.uid().unwrap_or_default()) {
                    let _ = handle.tx.send(Message::Gone);
                }
            }
            Err(e) => {
                warn!(error = %e, "watching this node's pods; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
        workers.retain(|_, h| !h.task.is_finished());
    }
    info!(pods = workers.len(), "agent stopping: leaving the pods running");
    for handle in workers.values() {
        let _ = handle.tx.send(Message::Shutdown);
    }
    for (_, handle) in workers {
        let _ = handle.task.await;
    }
}

fn apply(ctx: &Arc<Context>, workers: &mut HashMap<String, Handle>, pod: Pod) {
    let uid = pod.uid().unwrap_or_default();
    if uid.is_empty() {
        return;
    }
    let pod = Arc::new(pod);
    match workers.get(&uid) {
        Some(handle) if !handle.task.is_finished() => {
            let _ = handle.tx.send(Message::Update(pod));
        }
        _ => {
            // A pod that finished its termination and is only waiting to vanish from the
            // API gets no new worker.
            if pod.metadata.deletion_timestamp.is_some() && workers.contains_key(&uid) {
                return;
            }
            workers.insert(uid, worker::spawn(ctx.clone(), pod));
        }
    }
}

/// Removes containers, networks and pod directories of pods that are not in `live`.
async fn clean_orphans(ctx: &Context, live: &BTreeSet<String>) {
    let mut orphans: BTreeSet<String> = BTreeSet::new();
    match ctx.runtime.list_containers().await {
        Ok(containers) => {
            for c in containers {
                if let Some(uid) = c.labels.get(POD_UID_LABEL)
                    && !live.contains(uid)
                {
                    orphans.insert(uid.clone());
                    info!(pod_uid = %uid, container = %c.id, "removing a container of a pod that is gone");
                    if let Err(e) = ctx
                        .runtime
                        .stop_container(&c.id, std::time::Duration::from_secs(2))
                        .await
                    {
                        warn!(container = %c.id, error = %e, "stopping an orphaned container");
                    }
                    if let Err(e) = ctx.runtime.delete_container(&c.id).await {
                        warn!(container = %c.id, error = %e, "deleting an orphaned container");
                    }
                }
            }
        }
        Err(e) => warn!(error = %e, "listing containers to find orphans"),
    }
    if let Some(network) = &ctx.network {
        match network.known_pods() {
            Ok(known) => orphans.extend(known.into_iter().filter(|uid| !live.contains(uid))),
            Err(e) => warn!(error = %e, "listing pod networks to find orphans"),
        }
    }
    if let Ok(entries) = std::fs::read_dir(&ctx.pods_dir) {
        for entry in entries.flatten() {
            if let Some(uid) = entry.file_name().to_str()
                && !live.contains(uid)
            {
                orphans.insert(uid.to_owned());
            }
        }
    }
    for uid in orphans {
        worker::cleanup_pod(ctx, &uid).await;
    }
}
