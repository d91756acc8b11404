//! The PersistentVolume controller: binds claims to volumes (static, pre-bound or provisioned),
//! tracks both phases, reclaims released volumes, and provisions `weir.dev/local-path` volumes
//! on the node the scheduler selected. It writes PVs, PVCs and Events; it never touches nodes.
//!
//! A local-path volume is a host directory `<root>/pvc-<uid>_<namespace>_<name>` on one node: the
//! PV is a `hostPath` (type DirectoryOrCreate, so the node agent creates it when a pod mounts it)
//! with node affinity to that node. Deleting such a PV removes only the object; the node agent
//! removes the directory of every PV provisioned by `weir.dev/local-path` for its node once it is
//! gone.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    HostPathVolumeSource, Node, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, ObjectReference,
    PersistentVolume, PersistentVolumeClaim, PersistentVolumeSpec, Pod, VolumeNodeAffinity,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::reflector::{self, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::Notify;

use super::events::{EventType, Recorder, reference};
use super::replicaset::selects;
use super::scheduler::{node_selector_matches, parse_quantity};
use super::{Error, Result, is_status};
use crate::apiserver::strategy::{PV_PROTECTION, PVC_PROTECTION};

/// The default StorageClass created at server start.
pub const LOCAL_PATH_CLASS: &str = "local-path";
/// The provisioner of node-local directories built into Weir.
pub const LOCAL_PATH_PROVISIONER: &str = "weir.dev/local-path";
/// Where local-path volumes live unless the class sets the parameter `path`.
pub const LOCAL_PATH_ROOT: &str = "/var/lib/weir/storage";
/// The node the scheduler chose for a claim's first consumer (written by the scheduler).
pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
/// Which provisioner is expected to create a claim's volume.
pub const STORAGE_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";
pub const BIND_COMPLETED: &str = "pv.kubernetes.io/bind-completed";
pub const BOUND_BY_CONTROLLER: &str = "pv.kubernetes.io/bound-by-controller";
pub const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
/// The class Kubernetes uses for static volumes that nothing provisions.
pub const NO_PROVISIONER: &str = "kubernetes.io/no-provisioner";
const COMPONENT: &str = "persistentvolume-controller";

/// One write; a group of them runs in order and stops at the first failure.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Replace the volume (spec and metadata), guarded by its resourceVersion.
    UpdateVolume(Box<PersistentVolume>),
    VolumePhase {
        name: String,
        phase: &'static str,
        message: Option<String>,
    },
    DeleteVolume(String),
    /// Drop an in-use protection finalizer from a claim (`namespace` set) or a volume.
    RemoveFinalizer {
        namespace: Option<String>,
        name: String,
        finalizers: Vec<String>,
        finalizer: &'static str,
    },
    CreateVolume(Box<PersistentVolume>),
    /// Merge `volumeName` and annotations into the claim.
    UpdateClaim {
        namespace: String,
        name: String,
        volume_name: String,
        annotations: BTreeMap<String, String>,
    },
    ClaimStatus {
        namespace: String,
        name: String,
        status: serde_json::Value,
    },
    Event {
        object: ObjectReference,
        type_: EventType,
        reason: &'static str,
        message: String,
    },
}

/// What the controller sees.
pub struct Observed<'a> {
    pub volumes: &'a [Arc<PersistentVolume>],
    pub claims: &'a [Arc<PersistentVolumeClaim>],
    pub classes: &'a [Arc<StorageClass>],
    pub nodes: &'a [Arc<Node>],
    pub pods: &'a [Arc<Pod>],
}

fn storage(map: Option<&BTreeMap<String, Quantity>>) -> Option<(f64, Quantity)> {
    let q = map?.get("storage")?;
    Some((parse_quantity(&q.0)?, q.clone()))
}

fn requested(claim: &PersistentVolumeClaim) -> Option<(f64, Quantity)> {
    storage(claim.spec.as_ref()?.resources.as_ref()?.requests.as_ref())
}

fn capacity(pv: &PersistentVolume) -> Option<(f64, Quantity)> {
    storage(pv.spec.as_ref()?.capacity.as_ref())
}

pub fn claim_class(claim: &PersistentVolumeClaim) -> &str {
    claim
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.as_deref())
        .unwrap_or("")
}

fn volume_class(pv: &PersistentVolume) -> &str {
    pv.spec
        .as_ref()
        .and_then(|s| s.storage_class_name.as_deref())
        .unwrap_or("")
}

pub fn claim_volume(claim: &PersistentVolumeClaim) -> Option<&str> {
    claim.spec.as_ref()?.volume_name.as_deref().filter(|v| !v.is_empty())
}

fn claim_ref(pv: &PersistentVolume) -> Option<&ObjectReference> {
    pv.spec.as_ref()?.claim_ref.as_ref()
}

fn phase(pv: &PersistentVolume) -> &str {
    pv.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("")
}

pub fn claim_phase(claim: &PersistentVolumeClaim) -> &str {
    claim.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("")
}

/// Whether `pv.spec.claimRef` names `claim` (a reference without uid is a user's pre-binding).
pub fn refers_to(pv: &PersistentVolume, claim: &PersistentVolumeClaim) -> bool {
    claim_ref(pv).is_some_and(|r| {
        r.name.as_deref() == claim.metadata.name.as_deref()
            && r.namespace.as_deref() == claim.metadata.namespace.as_deref()
            && r.uid
                .as_deref()
                .is_none_or(|u| u.is_empty() || Some(u) == claim.metadata.uid.as_deref())
    })
}

fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

fn mode_of(m: Option<&String>) -> &str {
    m.map_or("Filesystem", String::as_str)
}

/// Whether the volume's node affinity admits `node` (a volume without affinity fits anywhere).
pub fn volume_fits_node(pv: &PersistentVolume, node: &Node) -> bool {
    match pv
        .spec
        .as_ref()
        .and_then(|s| s.node_affinity.as_ref())
        .and_then(|a| a.required.as_ref())
    {
        None => true,
        Some(sel) => node_selector_matches(sel, node),
    }
}

/// Why `pv` cannot serve `claim`, in the words of Kubernetes' `checkVolumeSatisfyClaim`.
pub fn mismatch(pv: &PersistentVolume, claim: &PersistentVolumeClaim) -> Option<String> {
    let (want, _) = requested(claim).unwrap_or((0.0, Quantity::default()));
    let (have, _) = capacity(pv).unwrap_or((0.0, Quantity::default()));
    if have < want {
        return Some("requested PV is too small".into());
    }
    if volume_class(pv) != claim_class(claim) {
        return Some("storageClassName does not match".into());
    }
    let pv_spec = pv.spec.as_ref();
    let claim_spec = claim.spec.as_ref();
    if mode_of(pv_spec.and_then(|s| s.volume_mode.as_ref())) != mode_of(claim_spec.and_then(|s| s.volume_mode.as_ref()))
    {
        return Some("incompatible volumeMode".into());
    }
    let have_modes = pv_spec.and_then(|s| s.access_modes.as_deref()).unwrap_or_default();
    let want_modes = claim_spec.and_then(|s| s.access_modes.as_deref()).unwrap_or_default();
    if !want_modes.iter().all(|m| have_modes.contains(m)) {
        return Some("incompatible accessMode".into());
    }
    None
}

/// The volume a claim binds to: one pre-bound to it if any fits, else the smallest available
/// volume that satisfies it (class, size, access modes, volume mode, selector) — and, when the
/// claim waits for its first consumer, sits on that consumer's node (`node`). A waiting claim
/// without a node binds only to a volume pre-bound to it. Ties go to the first name.
pub fn best_volume<'a>(
    claim: &PersistentVolumeClaim,
    volumes: &'a [Arc<PersistentVolume>],
    taken: &HashSet<String>,
    delayed: bool,
    node: Option<&Node>,
) -> Option<&'a Arc<PersistentVolume>> {
    let selector = claim.spec.as_ref().and_then(|s| s.selector.as_ref());
    let usable = |pv: &&Arc<PersistentVolume>| {
        pv.metadata.deletion_timestamp.is_none()
            && !taken.contains(&pv.name_any())
            && mismatch(pv, claim).is_none()
            && node.is_none_or(|n| volume_fits_node(pv, n))
    };
    if let Some(pv) = volumes.iter().filter(usable).find(|pv| refers_to(pv, claim)) {
        return Some(pv);
    }
    if delayed && node.is_none() {
        return None;
    }
    volumes
        .iter()
        .filter(usable)
        .filter(|pv| claim_ref(pv).is_none() && matches!(phase(pv), "" | "Pending" | "Available"))
        .filter(|pv| {
            selector.is_none_or(|s| {
                let empty = s.match_labels.as_ref().is_none_or(|m| m.is_empty())
                    && s.match_expressions.as_ref().is_none_or(|e| e.is_empty());
                empty || selects(s, pv.labels())
            })
        })
        .min_by(|a, b| {
            let size = |pv: &PersistentVolume| capacity(pv).map_or(0.0, |(s, _)| s);
            size(a)
                .total_cmp(&size(b))
                .then_with(|| a.name_any().cmp(&b.name_any()))
        })
}

fn claim_reference(claim: &PersistentVolumeClaim) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("PersistentVolumeClaim".into()),
        name: claim.metadata.name.clone(),
        namespace: claim.metadata.namespace.clone(),
        uid: claim.metadata.uid.clone(),
        resource_version: claim.metadata.resource_version.clone(),
        ..Default::default()
    }
}

fn event(object: ObjectReference, type_: EventType, reason: &'static str, message: impl Into<String>) -> Action {
    Action::Event {
        object,
        type_,
        reason,
        message: message.into(),
    }
}

/// The writes that bind `claim` and `pv` to each other, skipping what is already done.
/// `volume_chosen` says the controller (not the user) picked the volume.
fn bind(pv: &PersistentVolume, claim: &PersistentVolumeClaim, volume_chosen: bool) -> Vec<Action> {
    let mut group = Vec::new();
    let full_ref = claim_ref(pv).is_some_and(|r| r.uid.as_deref() == claim.metadata.uid.as_deref());
    if !full_ref {
        let mut new = pv.clone();
        let spec = new.spec.get_or_insert_with(Default::default);
        let prebound = spec.claim_ref.is_some();
        spec.claim_ref = Some(claim_reference(claim));
        if !prebound {
            new.metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(BOUND_BY_CONTROLLER.into(), "yes".into());
        }
        group.push(Action::UpdateVolume(Box::new(new)));
    }
    if phase(pv) != "Bound" {
        group.push(Action::VolumePhase {
            name: pv.name_any(),
            phase: "Bound",
            message: None,
        });
    }
    let name = pv.name_any();
    if claim_volume(claim) != Some(name.as_str()) || annotation(&claim.metadata, BIND_COMPLETED) != Some("yes") {
        let mut annotations = BTreeMap::from([(BIND_COMPLETED.to_string(), "yes".to_string())]);
        if volume_chosen {
            annotations.insert(BOUND_BY_CONTROLLER.into(), "yes".into());
        }
        group.push(Action::UpdateClaim {
            namespace: claim.namespace().unwrap_or_default(),
            name: claim.name_any(),
            volume_name: name,
            annotations,
        });
    }
    let spec = pv.spec.as_ref();
    let status = claim.status.as_ref();
    let capacity = spec.and_then(|s| s.capacity.clone());
    let modes = spec.and_then(|s| s.access_modes.clone());
    if claim_phase(claim) != "Bound"
        || status.and_then(|s| s.capacity.as_ref()) != capacity.as_ref()
        || status.and_then(|s| s.access_modes.as_ref()) != modes.as_ref()
    {
        group.push(Action::ClaimStatus {
            namespace: claim.namespace().unwrap_or_default(),
            name: claim.name_any(),
            status: json!({"phase": "Bound", "capacity": capacity, "accessModes": modes}),
        });
    }
    group
}

/// The PV that local-path provisions for `claim` on `node`, or why it cannot.
pub fn local_path_volume(
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    node: Option<&str>,
) -> Result<PersistentVolume, String> {
    if class.volume_binding_mode.as_deref() != Some("WaitForFirstConsumer") {
        return Err(format!(
            "{LOCAL_PATH_PROVISIONER} needs volumeBindingMode WaitForFirstConsumer in StorageClass {:?}: a local volume must be made on the node its first pod runs on",
            class.name_any()
        ));
    }
    let Some(node) = node else {
        return Err("no node selected for the claim yet".into());
    };
    let spec = claim.spec.as_ref();
    if let Some(m) = spec
        .and_then(|s| s.access_modes.as_deref())
        .unwrap_or_default()
        .iter()
        .find(|m| !matches!(m.as_str(), "ReadWriteOnce" | "ReadWriteOncePod"))
    {
        return Err(format!(
            "{LOCAL_PATH_PROVISIONER} supports only ReadWriteOnce and ReadWriteOncePod access modes, not {m}"
        ));
    }
    if mode_of(spec.and_then(|s| s.volume_mode.as_ref())) != "Filesystem" {
        return Err(format!("{LOCAL_PATH_PROVISIONER} supports only volumeMode Filesystem"));
    }
    if spec.and_then(|s| s.selector.as_ref()).is_some() {
        return Err("claims with a selector cannot be provisioned".into());
    }
    let Some((_, size)) = requested(claim) else {
        return Err("the claim requests no storage".into());
    };
    let root = class
        .parameters
        .as_ref()
        .and_then(|p| p.get("path"))
        .map_or(LOCAL_PATH_ROOT, String::as_str);
    if !root.starts_with('/') || root.split('/').any(|c| c == "..") {
        return Err(format!(
            "StorageClass parameter path {root:?} must be an absolute path without '..'"
        ));
    }
    if let Some(p) = class.parameters.as_ref().and_then(|p| p.keys().find(|k| *k != "path")) {
        return Err(format!(
            "unknown StorageClass parameter {p:?} for {LOCAL_PATH_PROVISIONER} (only \"path\")"
        ));
    }
    let uid = claim.uid().unwrap_or_default();
    let path = format!(
        "{}/pvc-{uid}_{}_{}",
        root.trim_end_matches('/'),
        claim.namespace().unwrap_or_default(),
        claim.name_any()
    );
    Ok(PersistentVolume {
        metadata: ObjectMeta {
            name: Some(format!("pvc-{uid}")),
            annotations: Some(BTreeMap::from([
                (PROVISIONED_BY.to_string(), LOCAL_PATH_PROVISIONER.to_string()),
                (BOUND_BY_CONTROLLER.to_string(), "yes".to_string()),
            ])),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            access_modes: spec.and_then(|s| s.access_modes.clone()),
            capacity: Some(BTreeMap::from([("storage".to_string(), size)])),
            claim_ref: Some(claim_reference(claim)),
            host_path: Some(HostPathVolumeSource {
                path,
                type_: Some("DirectoryOrCreate".into()),
            }),
            node_affinity: Some(VolumeNodeAffinity {
                required: Some(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_expressions: Some(vec![NodeSelectorRequirement {
                            key: "kubernetes.io/hostname".into(),
                            operator: "In".into(),
                            values: Some(vec![node.to_string()]),
                        }]),
                        ..Default::default()
                    }],
                }),
            }),
            persistent_volume_reclaim_policy: Some(class.reclaim_policy.clone().unwrap_or_else(|| "Delete".into())),
            storage_class_name: Some(class.name_any()),
            volume_mode: Some("Filesystem".into()),
            ..Default::default()
        }),
        status: None,
    })
}

fn sync_volume(pv: &PersistentVolume, claims: &HashMap<(String, String), &Arc<PersistentVolumeClaim>>) -> Vec<Action> {
    if pv.metadata.deletion_timestamp.is_some() {
        return Vec::new();
    }
    let name = pv.name_any();
    let set_phase = |p: &'static str, message: Option<String>| {
        (phase(pv) != p).then(|| Action::VolumePhase {
            name: name.clone(),
            phase: p,
            message,
        })
    };
    let Some(r) = claim_ref(pv) else {
        return set_phase("Available", None).into_iter().collect();
    };
    let key = (
        r.namespace.clone().unwrap_or_default(),
        r.name.clone().unwrap_or_default(),
    );
    let claim = claims.get(&key);
    let uid = r.uid.as_deref().unwrap_or("");
    if uid.is_empty() {
        // Pre-bound by a user to a claim not yet bound: still Available.
        return set_phase("Available", None).into_iter().collect();
    }
    match claim {
        Some(c) if c.uid().as_deref() == Some(uid) => match claim_volume(c) {
            Some(v) if v == name => set_phase("Bound", None).into_iter().collect(),
            None => Vec::new(),
            Some(_) if annotation(&pv.metadata, BOUND_BY_CONTROLLER) == Some("yes") => {
                let mut new = pv.clone();
                if let Some(s) = new.spec.as_mut() {
                    s.claim_ref = None;
                }
                if let Some(a) = new.metadata.annotations.as_mut() {
                    a.remove(BOUND_BY_CONTROLLER);
                }
                let mut group = vec![Action::UpdateVolume(Box::new(new))];
                group.extend(set_phase("Available", None));
                group
            }
            Some(_) => Vec::new(),
        },
        _ => reclaim(pv),
    }
}

/// A volume whose claim is gone: Retain keeps it Released, Delete removes volumes this
/// controller provisioned; anything else fails with the reason.
fn reclaim(pv: &PersistentVolume) -> Vec<Action> {
    let name = pv.name_any();
    let policy = pv
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
        .unwrap_or("Retain");
    let object = reference(pv);
    match policy {
        "Delete" if annotation(&pv.metadata, PROVISIONED_BY) == Some(LOCAL_PATH_PROVISIONER) => {
            // Released first: the volume's protection finalizer holds a Bound volume.
            let mut group = Vec::new();
            if phase(pv) != "Released" {
                group.push(Action::VolumePhase {
                    name: name.clone(),
                    phase: "Released",
                    message: None,
                });
            }
            group.push(Action::DeleteVolume(name));
            group
        }
        "Retain" if phase(pv) == "Released" => Vec::new(),
        "Retain" => vec![Action::VolumePhase {
            name,
            phase: "Released",
            message: None,
        }],
        _ if phase(pv) == "Failed" => Vec::new(),
        other => {
            let message = if other == "Delete" {
                format!(
                    "only volumes provisioned by {LOCAL_PATH_PROVISIONER} can be deleted; delete volume {name} and its storage by hand"
                )
            } else {
                format!("reclaim policy {other} is not supported; use Retain or Delete")
            };
            let reason = if other == "Delete" {
                "VolumeFailedDelete"
            } else {
                "VolumeFailedRecycle"
            };
            vec![
                Action::VolumePhase {
                    name,
                    phase: "Failed",
                    message: Some(message.clone()),
                },
                event(object, EventType::Warning, reason, message),
            ]
        }
    }
}

fn lost(claim: &PersistentVolumeClaim, reason: &'static str, message: String) -> Vec<Action> {
    if claim_phase(claim) == "Lost" {
        return Vec::new();
    }
    vec![
        Action::ClaimStatus {
            namespace: claim.namespace().unwrap_or_default(),
            name: claim.name_any(),
            status: json!({"phase": "Lost"}),
        },
        event(claim_reference(claim), EventType::Warning, reason, message),
    ]
}

fn release_finalizer(meta: &ObjectMeta, finalizer: &'static str) -> Option<Action> {
    let finalizers = meta.finalizers.as_ref()?;
    (meta.deletion_timestamp.is_some() && finalizers.iter().any(|f| f == finalizer)).then(|| Action::RemoveFinalizer {
        namespace: meta.namespace.clone(),
        name: meta.name.clone().unwrap_or_default(),
        finalizers: finalizers.clone(),
        finalizer,
    })
}

/// In-use protection, as Kubernetes' pvc-protection and pv-protection controllers: a claim being
/// deleted stays while a scheduled, unfinished pod mounts it; a volume while it is Bound.
fn protection(o: &Observed) -> Vec<Vec<Action>> {
    let mut in_use: HashSet<(String, &str)> = HashSet::new();
    for pod in o.pods {
        let Some(spec) = pod.spec.as_ref() else { continue };
        let finished = matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        );
        if spec.node_name.as_deref().unwrap_or("").is_empty() || finished {
            continue;
        }
        for v in spec.volumes.iter().flatten() {
            if let Some(c) = &v.persistent_volume_claim {
                in_use.insert((pod.namespace().unwrap_or_default(), c.claim_name.as_str()));
            }
        }
    }
    let claims = o.claims.iter().filter(|c| {
        !in_use.contains(&(
            c.namespace().unwrap_or_default(),
            c.metadata.name.as_deref().unwrap_or(""),
        ))
    });
    let claims = claims.filter_map(|c| release_finalizer(&c.metadata, PVC_PROTECTION));
    let volumes = o
        .volumes
        .iter()
        .filter(|v| phase(v) != "Bound")
        .filter_map(|v| release_finalizer(&v.metadata, PV_PROTECTION));
    claims.chain(volumes).map(|a| vec![a]).collect()
}

/// Every group of writes that brings volumes and claims closer to agreement.
pub fn plan(o: &Observed) -> Vec<Vec<Action>> {
    let claims_by_key: HashMap<(String, String), &Arc<PersistentVolumeClaim>> = o
        .claims
        .iter()
        .map(|c| ((c.namespace().unwrap_or_default(), c.name_any()), c))
        .collect();
    let volumes_by_name: HashMap<String, &Arc<PersistentVolume>> =
        o.volumes.iter().map(|v| (v.name_any(), v)).collect();
    let classes: HashMap<String, &Arc<StorageClass>> = o.classes.iter().map(|c| (c.name_any(), c)).collect();
    let nodes: HashMap<String, &Arc<Node>> = o.nodes.iter().map(|n| (n.name_any(), n)).collect();
    let mut groups: Vec<Vec<Action>> = o
        .volumes
        .iter()
        .map(|pv| sync_volume(pv, &claims_by_key))
        .filter(|g| !g.is_empty())
        .collect();
    groups.extend(protection(o));
    // Volumes already spoken for: a claim's volumeName, or a full claimRef to a live claim.
    let mut taken: HashSet<String> = o
        .claims
        .iter()
        .filter_map(|c| claim_volume(c).map(String::from))
        .collect();
    taken.extend(o.volumes.iter().filter_map(|pv| {
        let r = claim_ref(pv)?;
        let key = (
            r.namespace.clone().unwrap_or_default(),
            r.name.clone().unwrap_or_default(),
        );
        claims_by_key
            .get(&key)
            .is_some_and(|c| c.uid() == r.uid)
            .then(|| pv.name_any())
    }));
    let mut claims: Vec<&Arc<PersistentVolumeClaim>> = o.claims.iter().collect();
    claims.sort_by(|a, b| {
        let t = |c: &PersistentVolumeClaim| c.metadata.creation_timestamp.as_ref().map(|t| t.0);
        t(a).cmp(&t(b)).then_with(|| a.name_any().cmp(&b.name_any()))
    });
    for claim in claims {
        if claim.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let group = match claim_volume(claim) {
            Some(v) => sync_claim_with_volume(claim, volumes_by_name.get(v).copied(), v),
            None => {
                let class = classes.get(claim_class(claim)).copied();
                let delayed = class.is_some_and(|c| c.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer"));
                let node_name = annotation(&claim.metadata, SELECTED_NODE);
                let node = node_name.and_then(|n| nodes.get(n)).map(|n| n.as_ref());
                let mut own_taken = taken.clone();
                // A volume pre-bound to this claim is the claim's to take.
                own_taken.retain(|v| volumes_by_name.get(v).is_none_or(|pv| !refers_to(pv, claim)));
                match best_volume(claim, o.volumes, &own_taken, delayed, node) {
                    Some(pv) => {
                        taken.insert(pv.name_any());
                        bind(pv, claim, true)
                    }
                    None => unbound_claim(claim, class, delayed, node_name, &volumes_by_name),
                }
            }
        };
        if !group.is_empty() {
            groups.push(group);
        }
    }
    groups
}

fn sync_claim_with_volume(
    claim: &PersistentVolumeClaim,
    pv: Option<&Arc<PersistentVolume>>,
    name: &str,
) -> Vec<Action> {
    let bound = annotation(&claim.metadata, BIND_COMPLETED) == Some("yes");
    let Some(pv) = pv else {
        return if bound {
            lost(
                claim,
                "ClaimLost",
                "Bound claim has lost reference to PersistentVolume. Data on the volume is lost!".into(),
            )
        } else {
            Vec::new()
        };
    };
    match claim_ref(pv) {
        Some(_) if refers_to(pv, claim) => bind(pv, claim, false),
        None => match mismatch(pv, claim) {
            None => bind(pv, claim, false),
            Some(why) => vec![event(
                claim_reference(claim),
                EventType::Warning,
                "VolumeMismatch",
                format!("Cannot bind to requested volume {name:?}: {why}"),
            )],
        },
        Some(_) if bound => lost(
            claim,
            "ClaimMisbound",
            "Two claims are bound to the same volume, this one is bound incorrectly".into(),
        ),
        Some(_) => vec![event(
            claim_reference(claim),
            EventType::Warning,
            "FailedBinding",
            format!("volume {name:?} already bound to a different claim."),
        )],
    }
}

/// A claim no existing volume satisfies: provision, wait, or say why nothing will happen.
fn unbound_claim(
    claim: &PersistentVolumeClaim,
    class: Option<&Arc<StorageClass>>,
    delayed: bool,
    node: Option<&str>,
    volumes: &HashMap<String, &Arc<PersistentVolume>>,
) -> Vec<Action> {
    let object = claim_reference(claim);
    let class_name = claim_class(claim);
    let Some(class) = class else {
        return vec![if class_name.is_empty() {
            event(
                object,
                EventType::Normal,
                "FailedBinding",
                "no persistent volumes available for this claim and no storage class is set",
            )
        } else {
            event(
                object,
                EventType::Warning,
                "ProvisioningFailed",
                format!("storageclass.storage.k8s.io {class_name:?} not found"),
            )
        }];
    };
    if delayed && node.is_none() {
        return vec![event(
            object,
            EventType::Normal,
            "WaitForFirstConsumer",
            "waiting for first consumer to be created before binding",
        )];
    }
    let provisioner = class.provisioner.as_str();
    if provisioner == NO_PROVISIONER {
        return vec![event(
            object,
            EventType::Normal,
            "FailedBinding",
            "no persistent volumes available for this claim",
        )];
    }
    let mut group = Vec::new();
    if annotation(&claim.metadata, STORAGE_PROVISIONER) != Some(provisioner) {
        group.push(Action::UpdateClaim {
            namespace: claim.namespace().unwrap_or_default(),
            name: claim.name_any(),
            volume_name: String::new(),
            annotations: BTreeMap::from([(STORAGE_PROVISIONER.to_string(), provisioner.to_string())]),
        });
    }
    if provisioner != LOCAL_PATH_PROVISIONER {
        group.push(event(
            object,
            EventType::Normal,
            "ExternalProvisioning",
            format!("Waiting for a volume to be created either by the external provisioner '{provisioner}' or manually by the system administrator. If volume creation is delayed, please verify that the provisioner is running and correctly registered."),
        ));
        return group;
    }
    match local_path_volume(claim, class, node) {
        // Made already, but not yet bindable (the cache may lag our own write): wait for it.
        Ok(pv) if volumes.contains_key(&pv.name_any()) => {}
        Ok(pv) => {
            let message = format!(
                "Successfully provisioned volume {} on node {}",
                pv.name_any(),
                node.unwrap_or_default()
            );
            group.push(Action::CreateVolume(Box::new(pv)));
            group.push(event(object, EventType::Normal, "ProvisioningSucceeded", message));
        }
        Err(why) => group.push(event(object, EventType::Warning, "ProvisioningFailed", why)),
    }
    group
}

fn mounts_claim(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .is_some_and(|s| s.volumes.iter().flatten().any(|v| v.persistent_volume_claim.is_some()))
}

/// The controller loop: a full pass on every change to volumes, claims, classes or nodes, and at
/// least every 15 s (Kubernetes' resync period for this controller).
pub async fn run(client: Client) -> Result<()> {
    let (volumes, volume_writer) = reflector::store::<PersistentVolume>();
    let (claims, claim_writer) = reflector::store::<PersistentVolumeClaim>();
    let (classes, class_writer) = reflector::store::<StorageClass>();
    let (nodes, node_writer) = reflector::store::<Node>();
    let (pods, pod_writer) = reflector::store::<Pod>();
    let changed = Arc::new(Notify::new());
    let streams = futures::stream::select_all([
        reflector(
            volume_writer,
            watcher(Api::all(client.clone()), watcher::Config::default()),
        )
        .default_backoff()
        .map(|_| ())
        .boxed(),
        reflector(
            claim_writer,
            watcher(Api::all(client.clone()), watcher::Config::default()),
        )
        .default_backoff()
        .map(|_| ())
        .boxed(),
        reflector(
            class_writer,
            watcher(Api::all(client.clone()), watcher::Config::default()),
        )
        .default_backoff()
        .map(|_| ())
        .boxed(),
        // Only nodes that appear or go matter (a selected node that is gone); node status
        // updates are frequent and change nothing here.
        reflector(
            node_writer,
            watcher(Api::all(client.clone()), watcher::Config::default()),
        )
        .default_backoff()
        .filter_map({
            let mut known: HashSet<String> = HashSet::new();
            move |e| {
                futures::future::ready(match e {
                    Ok(watcher::Event::Apply(n)) | Ok(watcher::Event::InitApply(n)) => {
                        known.insert(n.name_any()).then_some(())
                    }
                    Ok(watcher::Event::Delete(n)) => {
                        known.remove(&n.name_any());
                        Some(())
                    }
                    Ok(watcher::Event::InitDone) => Some(()),
                    _ => None,
                })
            }
        })
        .boxed(),
        // Only bindings and deletions of pods that mount claims matter (claims in use); pods
        // change often, so the pass runs on those only.
        reflector(
            pod_writer,
            watcher(Api::all(client.clone()), watcher::Config::default()),
        )
        .default_backoff()
        .filter_map(|e| {
            futures::future::ready(match e {
                Ok(watcher::Event::Delete(p)) if mounts_claim(&p) => Some(()),
                Ok(watcher::Event::Apply(p))
                    if mounts_claim(&p) && p.spec.as_ref().is_some_and(|s| s.node_name.is_some()) =>
                {
                    Some(())
                }
                _ => None,
            })
        })
        .boxed(),
    ]);
    let notify = changed.clone();
    let watching = tokio::spawn(streams.for_each(move |()| {
        notify.notify_one();
        futures::future::ready(())
    }));
    volumes.wait_until_ready().await.ok();
    claims.wait_until_ready().await.ok();
    classes.wait_until_ready().await.ok();
    nodes.wait_until_ready().await.ok();
    pods.wait_until_ready().await.ok();
    let recorder = Recorder::new(client.clone(), COMPONENT);
    // Events already recorded per (object uid, reason, message): a pass repeats its decisions,
    // the Events should not be repeated with it.
    let mut recorded: HashSet<(String, &'static str, String)> = HashSet::new();
    let result = loop {
        if watching.is_finished() {
            break Err(Error::Ended("the persistent volume controller's watches"));
        }
        let (vs, cs, ss, ns, ps) = (
            volumes.state(),
            claims.state(),
            classes.state(),
            nodes.state(),
            pods.state(),
        );
        let groups = plan(&Observed {
            volumes: &vs,
            claims: &cs,
            classes: &ss,
            nodes: &ns,
            pods: &ps,
        });
        let live: HashSet<String> = cs
            .iter()
            .filter_map(|c| c.uid())
            .chain(vs.iter().filter_map(|v| v.uid()))
            .collect();
        recorded.retain(|(uid, _, _)| live.contains(uid));
        for group in groups {
            if let Err(e) = execute(&client, &recorder, &mut recorded, group).await {
                tracing::debug!(error = %e, "volume write failed; retrying on the next pass");
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(15), changed.notified()).await;
    };
    watching.abort();
    result
}

async fn execute(
    client: &Client,
    recorder: &Recorder,
    recorded: &mut HashSet<(String, &'static str, String)>,
    group: Vec<Action>,
) -> Result<()> {
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    for action in group {
        match action {
            Action::UpdateVolume(pv) => {
                pvs.replace(&pv.name_any(), &PostParams::default(), &pv).await?;
            }
            Action::VolumePhase { name, phase, message } => {
                let patch = json!({"status": {"phase": phase, "message": message,
                    "lastPhaseTransitionTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now())}});
                pvs.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
            }
            Action::DeleteVolume(name) => {
                tracing::info!(volume = %name, "deleting released volume");
                match pvs.delete(&name, &DeleteParams::default()).await {
                    Err(e) if !is_status(&e, 404) => return Err(e.into()),
                    _ => {}
                }
            }
            Action::RemoveFinalizer {
                namespace,
                name,
                finalizers,
                finalizer,
            } => {
                let kept: Vec<&String> = finalizers.iter().filter(|f| *f != finalizer).collect();
                // Guarded by `test`, so a finalizer another controller adds meanwhile is kept.
                let patch = Patch::<()>::Json(
                    serde_json::from_value(json!([
                        {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
                        {"op": "replace", "path": "/metadata/finalizers", "value": kept},
                    ]))
                    .expect("a well-formed JSON patch"),
                );
                let result = match namespace {
                    Some(ns) => Api::<PersistentVolumeClaim>::namespaced(client.clone(), &ns)
                        .patch(&name, &PatchParams::default(), &patch)
                        .await
                        .map(|_| ()),
                    None => pvs.patch(&name, &PatchParams::default(), &patch).await.map(|_| ()),
                };
                match result {
                    Err(e) if !is_status(&e, 404) => return Err(e.into()),
                    _ => {}
                }
            }
            Action::CreateVolume(pv) => {
                tracing::info!(volume = %pv.name_any(), "provisioning volume");
                pvs.create(&PostParams::default(), &pv).await?;
            }
            Action::UpdateClaim {
                namespace,
                name,
                volume_name,
                annotations,
            } => {
                let mut patch = json!({"metadata": {"annotations": annotations}});
                if !volume_name.is_empty() {
                    patch["spec"] = json!({"volumeName": volume_name});
                }
                Api::<PersistentVolumeClaim>::namespaced(client.clone(), &namespace)
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
            }
            Action::ClaimStatus {
                namespace,
                name,
                status,
            } => {
                Api::<PersistentVolumeClaim>::namespaced(client.clone(), &namespace)
                    .patch_status(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(&json!({"status": status})),
                    )
                    .await?;
            }
            Action::Event {
                object,
                type_,
                reason,
                message,
            } => {
                let key = (object.uid.clone().unwrap_or_default(), reason, message.clone());
                if recorded.insert(key) {
                    recorder.publish_ref(&object, type_, reason, &message).await;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeSpec, PersistentVolumeClaimSpec, VolumeResourceRequirements};

    fn pv(name: &str, size: &str, class: &str, modes: &[&str]) -> Arc<PersistentVolume> {
        Arc::new(PersistentVolume {
            metadata: ObjectMeta {
                name: Some(name.into()),
                uid: Some(format!("uid-{name}")),
                ..Default::default()
            },
            spec: Some(PersistentVolumeSpec {
                capacity: Some(BTreeMap::from([("storage".to_string(), Quantity(size.into()))])),
                access_modes: Some(modes.iter().map(|m| m.to_string()).collect()),
                storage_class_name: Some(class.into()),
                host_path: Some(HostPathVolumeSource {
                    path: format!("/srv/{name}"),
                    type_: None,
                }),
                persistent_volume_reclaim_policy: Some("Retain".into()),
                ..Default::default()
            }),
            status: None,
        })
    }

    fn pvc(name: &str, size: &str, class: Option<&str>, modes: &[&str]) -> Arc<PersistentVolumeClaim> {
        Arc::new(PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                uid: Some(format!("uid-{name}")),
                ..Default::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(modes.iter().map(|m| m.to_string()).collect()),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([("storage".to_string(), Quantity(size.into()))])),
                    ..Default::default()
                }),
                storage_class_name: class.map(String::from),
                ..Default::default()
            }),
            status: None,
        })
    }

    fn local_path_class(mode: &str) -> Arc<StorageClass> {
        Arc::new(StorageClass {
            metadata: ObjectMeta {
                name: Some(LOCAL_PATH_CLASS.into()),
                ..Default::default()
            },
            provisioner: LOCAL_PATH_PROVISIONER.into(),
            reclaim_policy: Some("Delete".into()),
            volume_binding_mode: Some(mode.into()),
            ..Default::default()
        })
    }

    fn node(name: &str) -> Arc<Node> {
        Arc::new(Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(BTreeMap::from([(
                    "kubernetes.io/hostname".to_string(),
                    name.to_string(),
                )])),
                ..Default::default()
            },
            spec: Some(NodeSpec::default()),
            status: None,
        })
    }

    fn plan_of(
        volumes: &[Arc<PersistentVolume>],
        claims: &[Arc<PersistentVolumeClaim>],
        classes: &[Arc<StorageClass>],
    ) -> Vec<Vec<Action>> {
        plan(&Observed {
            volumes,
            claims,
            classes,
            nodes: &[node("a"), node("b")],
            pods: &[],
        })
    }

    fn bound_volume(groups: &[Vec<Action>], claim: &str) -> Option<String> {
        groups.iter().flatten().find_map(|a| match a {
            Action::UpdateClaim { name, volume_name, .. } if name == claim && !volume_name.is_empty() => {
                Some(volume_name.clone())
            }
            _ => None,
        })
    }

    fn events(groups: &[Vec<Action>]) -> Vec<(&'static str, String)> {
        groups
            .iter()
            .flatten()
            .filter_map(|a| match a {
                Action::Event { reason, message, .. } => Some((*reason, message.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_smallest_volume_that_fits_is_chosen() {
        let volumes = [
            pv("big", "10Gi", "manual", &["ReadWriteOnce"]),
            pv("small", "1Gi", "manual", &["ReadWriteOnce"]),
            pv("medium", "5Gi", "manual", &["ReadWriteOnce", "ReadOnlyMany"]),
            pv("other-class", "2Gi", "fast", &["ReadWriteOnce"]),
        ];
        let groups = plan_of(&volumes, &[pvc("data", "2Gi", Some("manual"), &["ReadWriteOnce"])], &[]);
        assert_eq!(bound_volume(&groups, "data").as_deref(), Some("medium"));
        let groups = plan_of(&volumes, &[pvc("data", "2Gi", Some("manual"), &["ReadWriteMany"])], &[]);
        assert_eq!(bound_volume(&groups, "data"), None);
    }

    #[test]
    fn binding_writes_claim_ref_phases_and_annotations() {
        let volumes = [pv("v1", "1Gi", "", &["ReadWriteOnce"])];
        let groups = plan_of(&volumes, &[pvc("data", "1Gi", Some(""), &["ReadWriteOnce"])], &[]);
        let group = groups
            .iter()
            .find(|g| g.iter().any(|a| matches!(a, Action::UpdateClaim { .. })))
            .unwrap();
        let Action::UpdateVolume(new) = &group[0] else {
            panic!("{group:?}")
        };
        assert_eq!(claim_ref(new).unwrap().uid.as_deref(), Some("uid-data"));
        assert_eq!(annotation(&new.metadata, BOUND_BY_CONTROLLER), Some("yes"));
        assert!(matches!(&group[1], Action::VolumePhase { phase: "Bound", .. }));
        let Action::UpdateClaim { annotations, .. } = &group[2] else {
            panic!()
        };
        assert_eq!(annotations.get(BIND_COMPLETED).map(String::as_str), Some("yes"));
        let Action::ClaimStatus { status, .. } = &group[3] else {
            panic!()
        };
        assert_eq!(status["phase"], "Bound");
        assert_eq!(status["capacity"]["storage"], "1Gi");
    }

    #[test]
    fn two_claims_never_get_the_same_volume() {
        let volumes = [pv("v1", "1Gi", "m", &["ReadWriteOnce"])];
        let claims = [
            pvc("a", "1Gi", Some("m"), &["ReadWriteOnce"]),
            pvc("b", "1Gi", Some("m"), &["ReadWriteOnce"]),
        ];
        let groups = plan_of(&volumes, &claims, &[]);
        assert_eq!(
            [bound_volume(&groups, "a"), bound_volume(&groups, "b")]
                .iter()
                .flatten()
                .count(),
            1
        );
    }

    #[test]
    fn a_pre_bound_volume_goes_to_its_claim_only() {
        let mut v = (*pv("v1", "5Gi", "m", &["ReadWriteOnce"])).clone();
        v.spec.as_mut().unwrap().claim_ref = Some(ObjectReference {
            name: Some("b".into()),
            namespace: Some("default".into()),
            ..Default::default()
        });
        let volumes = [Arc::new(v), pv("v2", "1Gi", "m", &["ReadWriteOnce"])];
        let claims = [
            pvc("a", "1Gi", Some("m"), &["ReadWriteOnce"]),
            pvc("b", "1Gi", Some("m"), &["ReadWriteOnce"]),
        ];
        let groups = plan_of(&volumes, &claims, &[]);
        assert_eq!(bound_volume(&groups, "b").as_deref(), Some("v1"));
        assert_eq!(bound_volume(&groups, "a").as_deref(), Some("v2"));
    }

    #[test]
    fn a_claim_without_class_or_volume_says_so() {
        let groups = plan_of(&[], &[pvc("data", "1Gi", Some(""), &["ReadWriteOnce"])], &[]);
        assert_eq!(
            events(&groups),
            [(
                "FailedBinding",
                "no persistent volumes available for this claim and no storage class is set".to_string()
            )]
        );
    }

    #[test]
    fn local_path_waits_for_a_node_then_provisions_there() {
        let classes = [local_path_class("WaitForFirstConsumer")];
        let claim = pvc("data", "2Gi", Some(LOCAL_PATH_CLASS), &["ReadWriteOnce"]);
        let groups = plan_of(&[], std::slice::from_ref(&claim), &classes);
        assert_eq!(events(&groups)[0].0, "WaitForFirstConsumer");
        assert!(!groups.iter().flatten().any(|a| matches!(a, Action::CreateVolume(_))));

        let mut selected = (*claim).clone();
        selected.metadata.annotations = Some(BTreeMap::from([(SELECTED_NODE.to_string(), "b".to_string())]));
        let groups = plan_of(&[], &[Arc::new(selected)], &classes);
        let made = groups
            .iter()
            .flatten()
            .find_map(|a| match a {
                Action::CreateVolume(pv) => Some(pv.clone()),
                _ => None,
            })
            .expect("a provisioned volume");
        assert_eq!(made.name_any(), "pvc-uid-data");
        let spec = made.spec.as_ref().unwrap();
        assert_eq!(
            spec.host_path.as_ref().unwrap().path,
            "/var/lib/weir/storage/pvc-uid-data_default_data"
        );
        assert_eq!(spec.capacity.as_ref().unwrap()["storage"].0, "2Gi");
        assert_eq!(spec.persistent_volume_reclaim_policy.as_deref(), Some("Delete"));
        assert_eq!(spec.claim_ref.as_ref().unwrap().uid.as_deref(), Some("uid-data"));
        assert!(volume_fits_node(&made, &node("b")));
        assert!(!volume_fits_node(&made, &node("a")));
        assert_eq!(annotation(&made.metadata, PROVISIONED_BY), Some(LOCAL_PATH_PROVISIONER));
        assert_eq!(events(&groups)[0].0, "ProvisioningSucceeded");

        // The provisioned volume, once seen, binds to its claim and to no other.
        let groups = plan_of(&[Arc::new(*made)], &[claim], &classes);
        assert_eq!(bound_volume(&groups, "data").as_deref(), Some("pvc-uid-data"));
    }

    #[test]
    fn local_path_refuses_immediate_binding_and_bad_parameters() {
        let claim = pvc("data", "2Gi", Some(LOCAL_PATH_CLASS), &["ReadWriteOnce"]);
        let groups = plan_of(&[], std::slice::from_ref(&claim), &[local_path_class("Immediate")]);
        let ev = events(&groups);
        assert_eq!(ev[0].0, "ProvisioningFailed");
        assert!(ev[0].1.contains("WaitForFirstConsumer"), "{}", ev[0].1);

        let mut class = (*local_path_class("WaitForFirstConsumer")).clone();
        class.parameters = Some(BTreeMap::from([("path".to_string(), "relative".to_string())]));
        let err = local_path_volume(&claim, &class, Some("a")).unwrap_err();
        assert!(err.contains("absolute"), "{err}");
        class.parameters = Some(BTreeMap::from([("path".to_string(), "/data/".to_string())]));
        let made = local_path_volume(&claim, &class, Some("a")).unwrap();
        assert_eq!(
            made.spec.unwrap().host_path.unwrap().path,
            "/data/pvc-uid-data_default_data"
        );
        let rwx = pvc("data", "2Gi", Some(LOCAL_PATH_CLASS), &["ReadWriteMany"]);
        assert!(
            local_path_volume(&rwx, &class, Some("a"))
                .unwrap_err()
                .contains("ReadWriteMany")
        );
    }

    #[test]
    fn a_static_volume_for_a_waiting_claim_must_sit_on_the_selected_node() {
        let classes = [Arc::new(StorageClass {
            metadata: ObjectMeta {
                name: Some("local".into()),
                ..Default::default()
            },
            provisioner: NO_PROVISIONER.into(),
            volume_binding_mode: Some("WaitForFirstConsumer".into()),
            ..Default::default()
        })];
        let on = |name: &str, node_name: &str| {
            let mut v = (*pv(name, "1Gi", "local", &["ReadWriteOnce"])).clone();
            v.spec.as_mut().unwrap().node_affinity = local_path_volume(
                &pvc("x", "1Gi", None, &["ReadWriteOnce"]),
                &local_path_class("WaitForFirstConsumer"),
                Some(node_name),
            )
            .unwrap()
            .spec
            .unwrap()
            .node_affinity;
            Arc::new(v)
        };
        let volumes = [on("on-a", "a"), on("on-b", "b")];
        let mut claim = (*pvc("data", "1Gi", Some("local"), &["ReadWriteOnce"])).clone();
        assert_eq!(
            bound_volume(&plan_of(&volumes, &[Arc::new(claim.clone())], &classes), "data"),
            None
        );
        claim.metadata.annotations = Some(BTreeMap::from([(SELECTED_NODE.to_string(), "b".to_string())]));
        assert_eq!(
            bound_volume(&plan_of(&volumes, &[Arc::new(claim)], &classes), "data").as_deref(),
            Some("on-b")
        );
    }

    fn bound_pair(policy: &str, provisioned: bool) -> Arc<PersistentVolume> {
        let mut v = (*pv("v1", "1Gi", "m", &["ReadWriteOnce"])).clone();
        v.spec.as_mut().unwrap().persistent_volume_reclaim_policy = Some(policy.into());
        v.spec.as_mut().unwrap().claim_ref = Some(ObjectReference {
            name: Some("gone".into()),
            namespace: Some("default".into()),
            uid: Some("uid-gone".into()),
            ..Default::default()
        });
        if provisioned {
            v.metadata.annotations = Some(BTreeMap::from([(
                PROVISIONED_BY.to_string(),
                LOCAL_PATH_PROVISIONER.to_string(),
            )]));
        }
        Arc::new(v)
    }

    #[test]
    fn a_volume_whose_claim_is_gone_is_reclaimed_by_its_policy() {
        let groups = plan_of(&[bound_pair("Retain", false)], &[], &[]);
        assert!(matches!(&groups[0][0], Action::VolumePhase { phase: "Released", .. }));
        let groups = plan_of(&[bound_pair("Delete", true)], &[], &[]);
        assert!(matches!(&groups[0][0], Action::VolumePhase { phase: "Released", .. }));
        assert_eq!(groups[0][1], Action::DeleteVolume("v1".into()));
        let groups = plan_of(&[bound_pair("Delete", false)], &[], &[]);
        assert!(matches!(&groups[0][0], Action::VolumePhase { phase: "Failed", .. }));
        // A claim of the same name but another uid is a different claim.
        let mut successor = (*pvc("gone", "1Gi", Some("m"), &["ReadWriteOnce"])).clone();
        successor.metadata.uid = Some("uid-successor".into());
        let groups = plan_of(&[bound_pair("Retain", false)], &[Arc::new(successor)], &[]);
        assert!(
            groups
                .iter()
                .flatten()
                .any(|a| matches!(a, Action::VolumePhase { phase: "Released", .. }))
        );
    }

    #[test]
    fn a_claim_in_use_keeps_its_finalizer_until_its_pods_are_gone() {
        let mut claim = (*pvc("data", "1Gi", Some("m"), &["ReadWriteOnce"])).clone();
        claim.metadata.finalizers = Some(vec![PVC_PROTECTION.into(), "example.com/other".into()]);
        claim.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            jiff::Timestamp::now(),
        ));
        let claims = [Arc::new(claim)];
        let user = |node: Option<&str>, phase: &str| -> Arc<Pod> {
            Arc::new(
                serde_json::from_value(json!({
                    "metadata": {"name": "p", "namespace": "default"},
                    "spec": {"nodeName": node, "containers": [{"name": "c"}],
                             "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": "data"}}]},
                    "status": {"phase": phase},
                }))
                .unwrap(),
            )
        };
        let released = |pods: &[Arc<Pod>]| {
            plan(&Observed {
                volumes: &[],
                claims: &claims,
                classes: &[],
                nodes: &[],
                pods,
            })
            .into_iter()
            .flatten()
            .any(|a| {
                matches!(
                    a,
                    Action::RemoveFinalizer {
                        finalizer: PVC_PROTECTION,
                        ..
                    }
                )
            })
        };
        assert!(!released(&[user(Some("a"), "Running")]));
        // Unscheduled and finished pods do not hold the claim.
        assert!(released(&[user(None, "Pending")]));
        assert!(released(&[user(Some("a"), "Succeeded")]));
        assert!(released(&[]));
    }

    #[test]
    fn a_volume_being_deleted_keeps_its_finalizer_while_bound() {
        let mut v = (*pv("v1", "1Gi", "m", &["ReadWriteOnce"])).clone();
        v.metadata.finalizers = Some(vec![PV_PROTECTION.into()]);
        v.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            jiff::Timestamp::now(),
        ));
        let released = |phase: &str| {
            let mut v = v.clone();
            v.status = Some(k8s_openapi::api::core::v1::PersistentVolumeStatus {
                phase: Some(phase.into()),
                ..Default::default()
            });
            plan_of(&[Arc::new(v)], &[], &[]).into_iter().flatten().any(|a| {
                matches!(
                    a,
                    Action::RemoveFinalizer {
                        finalizer: PV_PROTECTION,
                        ..
                    }
                )
            })
        };
        assert!(!released("Bound"));
        assert!(released("Released"));
    }

    #[test]
    fn a_bound_claim_whose_volume_vanished_is_lost() {
        let mut claim = (*pvc("data", "1Gi", Some("m"), &["ReadWriteOnce"])).clone();
        claim.spec.as_mut().unwrap().volume_name = Some("v9".into());
        claim.metadata.annotations = Some(BTreeMap::from([(BIND_COMPLETED.to_string(), "yes".to_string())]));
        let groups = plan_of(&[], &[Arc::new(claim)], &[]);
        assert_eq!(events(&groups)[0].0, "ClaimLost");
    }
}
