//! The pods running on this node as the streaming server needs them (containers, their
//! current and previous logs, the network namespace), kept up to date by the pod workers.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::RwLock;

/// One container of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerEntry {
    pub name: String,
    /// containerd's id of the running run; `None` when it is not running.
    pub container_id: Option<String>,
    /// The log of the current (or last) run.
    pub log_path: Option<PathBuf>,
    /// The log of the run before, for `--previous`.
    pub previous_log_path: Option<PathBuf>,
}

/// One pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodEntry {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The pod's network namespace; `None` for hostNetwork pods (and before the sandbox).
    pub netns: Option<PathBuf>,
    /// Init containers first, in spec order.
    pub containers: Vec<ContainerEntry>,
    /// `kubectl.kubernetes.io/default-container`.
    pub default_container: Option<String>,
}

/// The node's pods, by uid.
#[derive(Debug, Default)]
pub struct Directory {
    pods: RwLock<HashMap<String, PodEntry>>,
}

impl Directory {
    /// Adds or replaces a pod.
    pub fn insert(&self, entry: PodEntry) {
        self.pods
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(entry.uid.clone(), entry);
    }

    /// Removes a pod.
    pub fn remove(&self, uid: &str) {
        self.pods.write().unwrap_or_else(|e| e.into_inner()).remove(uid);
    }

    /// The pod `namespace/name` (the newest, should two uids share the name briefly).
    pub fn lookup(&self, namespace: &str, name: &str) -> Option<PodEntry> {
        self.pods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .find(|p| p.namespace == namespace && p.name == name)
            .cloned()
    }

    /// How many pods the node runs.
    pub fn len(&self) -> usize {
        self.pods.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether the node runs no pod.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
