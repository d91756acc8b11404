//! The pods running on this node as the streaming server needs them (containers, their
//! current and previous logs, the network namespace), kept up to date by the pod workers.

use std::collections::HashMap;
use std::sync::RwLock;

use crate::stream::{PodDirectory, PodRuntimeInfo};

/// One pod, by name.
#[derive(Clone, Debug)]
struct Entry {
    namespace: String,
    name: String,
    info: PodRuntimeInfo,
}

/// The node's pods, by uid.
#[derive(Debug, Default)]
pub struct Directory {
    pods: RwLock<HashMap<String, Entry>>,
}

impl Directory {
    /// Adds or replaces pod `namespace/name` (its uid is `info.uid`).
    pub fn insert(&self, namespace: &str, name: &str, info: PodRuntimeInfo) {
        self.pods.write().unwrap_or_else(|e| e.into_inner()).insert(
            info.uid.clone(),
            Entry {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                info,
            },
        );
    }

    /// Removes a pod.
    pub fn remove(&self, uid: &str) {
        self.pods.write().unwrap_or_else(|e| e.into_inner()).remove(uid);
    }
}

impl PodDirectory for Directory {
    fn lookup(&self, namespace: &str, pod: &str) -> Option<PodRuntimeInfo> {
        self.pods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .find(|p| p.namespace == namespace && p.name == pod)
            .map(|p| p.info.clone())
    }
}
