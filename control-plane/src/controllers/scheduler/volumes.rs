//! Persistent volumes in scheduling, a simplified kube-scheduler VolumeBinding plugin: a claim
//! bound to a volume with node affinity pins the pod to matching nodes; a claim waiting for its
//! first consumer fits any node its class can provision on, or where a static volume fits; the
//! scheduler then names the chosen node on the claim and binds the pod once the claim is Bound.
//! A ReadWriteOncePod claim admits one pod at a time (the VolumeRestrictions plugin).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::ResourceExt;

use crate::controllers::volume::{
    NO_PROVISIONER, SELECTED_NODE, best_volume, claim_class, claim_phase, claim_volume, volume_fits_node,
};

/// Claims, volumes and classes as one scheduling pass sees them.
#[derive(Default)]
pub struct Storage {
    claims: HashMap<(String, String), Arc<PersistentVolumeClaim>>,
    volumes: Vec<Arc<PersistentVolume>>,
    volume_index: HashMap<String, usize>,
    classes: HashMap<String, Arc<StorageClass>>,
    /// Claims mounted by pods on nodes (bound or placed in this pass), by namespace and name.
    mounted: HashSet<(String, String)>,
}

impl Storage {
    pub fn new(
        claims: &[Arc<PersistentVolumeClaim>],
        volumes: &[Arc<PersistentVolume>],
        classes: &[Arc<StorageClass>],
    ) -> Storage {
        Storage {
            claims: claims
                .iter()
                .map(|c| ((c.namespace().unwrap_or_default(), c.name_any()), c.clone()))
                .collect(),
            volume_index: volumes.iter().enumerate().map(|(i, v)| (v.name_any(), i)).collect(),
            volumes: volumes.to_vec(),
            classes: classes.iter().map(|c| (c.name_any(), c.clone())).collect(),
            mounted: HashSet::new(),
        }
    }

    /// Records that `pod` runs on a node with its claims mounted.
    pub fn mount(&mut self, pod: &Pod) {
        if !uses_claims(pod) {
            return;
        }
        let ns = pod.namespace().unwrap_or_default();
        for name in claim_names(pod) {
            self.mounted.insert((ns.clone(), name.to_string()));
        }
    }

    /// Records that `node` was selected for `claim` (what the API will show once the write is seen).
    pub fn select(&mut self, claim: &PersistentVolumeClaim, node: &str) {
        let key = (claim.namespace().unwrap_or_default(), claim.name_any());
        if let Some(c) = self.claims.get_mut(&key) {
            Arc::make_mut(c)
                .annotations_mut()
                .insert(SELECTED_NODE.to_string(), node.to_string());
        }
    }

    fn volume(&self, name: &str) -> Option<&Arc<PersistentVolume>> {
        self.volume_index.get(name).map(|&i| &self.volumes[i])
    }

    fn is_delayed(&self, claim: &PersistentVolumeClaim) -> bool {
        self.classes
            .get(claim_class(claim))
            .is_some_and(|c| c.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer"))
    }
}

/// The claims a pod mounts, by name.
fn claim_names(pod: &Pod) -> impl Iterator<Item = &str> {
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter_map(|v| v.persistent_volume_claim.as_ref())
        .map(|c| c.claim_name.as_str())
}

pub fn uses_claims(pod: &Pod) -> bool {
    claim_names(pod).next().is_some()
}

/// What a pod's claims ask of a node.
#[derive(Default)]
pub struct PodVolumes {
    bound: Vec<Arc<PersistentVolume>>,
    missing_volume: bool,
    /// Unbound claims whose class waits for the first consumer: the scheduler picks their node.
    pub delayed: Vec<Arc<PersistentVolumeClaim>>,
    /// The node an earlier pod of a waiting claim was placed on: later pods follow it there.
    pub selected: Option<String>,
}

impl PodVolumes {
    /// The pod's claims, or why no node can take the pod (kube-scheduler's PreFilter messages).
    pub fn of(pod: &Pod, storage: &Storage) -> Result<PodVolumes, String> {
        let mut out = PodVolumes::default();
        if !uses_claims(pod) {
            return Ok(out);
        }
        let ns = pod.namespace().unwrap_or_default();
        let mut seen = HashSet::new();
        let mut unbound_immediate = false;
        for name in claim_names(pod) {
            if !seen.insert(name) {
                continue;
            }
            let Some(claim) = storage.claims.get(&(ns.clone(), name.to_string())) else {
                return Err(format!("persistentvolumeclaim {name:?} not found"));
            };
            if claim.metadata.deletion_timestamp.is_some() {
                return Err(format!("persistentvolumeclaim {name:?} is being deleted"));
            }
            let read_write_once_pod = claim
                .spec
                .as_ref()
                .and_then(|s| s.access_modes.as_ref())
                .is_some_and(|m| m.iter().any(|m| m == "ReadWriteOncePod"));
            if read_write_once_pod && storage.mounted.contains(&(ns.clone(), name.to_string())) {
                return Err(
                    "node has pod using PersistentVolumeClaim with the same name and ReadWriteOncePod access mode"
                        .into(),
                );
            }
            match claim_volume(claim) {
                Some(v) => match storage.volume(v) {
                    Some(pv) => out.bound.push(pv.clone()),
                    None => out.missing_volume = true,
                },
                None if storage.is_delayed(claim) => {
                    if let Some(n) = claim.annotations().get(SELECTED_NODE) {
                        out.selected = Some(n.clone());
                    }
                    out.delayed.push(claim.clone());
                }
                None => unbound_immediate = true,
            }
        }
        if unbound_immediate {
            return Err("pod has unbound immediate PersistentVolumeClaims".into());
        }
        Ok(out)
    }

    /// Why `node` cannot serve these claims.
    pub fn misfit(&self, node: &Node, storage: &Storage) -> Option<&'static str> {
        if self.missing_volume {
            return Some("node(s) unavailable due to one or more pvc(s) bound to non-existent pv(s)");
        }
        if !self.bound.iter().all(|pv| volume_fits_node(pv, node)) {
            return Some("node(s) had volume node affinity conflict");
        }
        if self.delayed.is_empty() {
            return None;
        }
        if self
            .selected
            .as_deref()
            .is_some_and(|s| Some(s) != node.metadata.name.as_deref())
        {
            return Some("node(s) had volume node affinity conflict");
        }
        for claim in &self.delayed {
            let static_only = storage
                .classes
                .get(claim_class(claim))
                .is_none_or(|c| c.provisioner == NO_PROVISIONER);
            if static_only && best_volume(claim, &storage.volumes, &HashSet::new(), true, Some(node)).is_none() {
                return Some("node(s) didn't find available persistent volumes to bind");
            }
        }
        None
    }
}

/// Where a pod waiting for its claims stands.
#[derive(Debug, PartialEq, Eq)]
pub enum ClaimsOnNode {
    /// Every claim is Bound to a volume the node can reach: bind the pod.
    Ready,
    /// Claims are still being bound for this node.
    Waiting,
    /// A claim went away or was bound elsewhere: schedule the pod again.
    Conflict,
}

pub fn claims_on_node(pod: &Pod, node: &Node, storage: &Storage) -> ClaimsOnNode {
    let ns = pod.namespace().unwrap_or_default();
    let name = node.name_any();
    let mut state = ClaimsOnNode::Ready;
    for claim_name in claim_names(pod) {
        let Some(claim) = storage.claims.get(&(ns.clone(), claim_name.to_string())) else {
            return ClaimsOnNode::Conflict;
        };
        match claim_volume(claim).map(|v| storage.volume(v)) {
            Some(Some(pv)) if !volume_fits_node(pv, node) => return ClaimsOnNode::Conflict,
            Some(Some(_)) if claim_phase(claim) == "Bound" => {}
            Some(_) => state = ClaimsOnNode::Waiting,
            None if claim.annotations().get(SELECTED_NODE) == Some(&name) => state = ClaimsOnNode::Waiting,
            None => return ClaimsOnNode::Conflict,
        }
    }
    state
}
