//! ControllerRevisions for StatefulSets and DaemonSets, as Kubernetes' controller history keeps
//! them: each distinct pod template is one revision whose `data` is the patch that restores it
//! (`kubectl rollout history/undo` read exactly that). Owns only revisions its parent controls.

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::api::apps::v1::ControllerRevision;
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::replicaset::selects;
use super::{Error, Result, controlled_by, controller_of, is_status};

/// The label naming a pod's (and a revision's) revision.
pub const HASH_LABEL: &str = "controller-revision-hash";

/// A short, DNS-safe hash of `bytes` (the alphabet has no vowels, so no words appear).
pub fn short_hash(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let digest = Sha256::digest(bytes);
    let n = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    n.to_string()
        .bytes()
        .map(|b| ALPHABET[b as usize % ALPHABET.len()] as char)
        .collect()
}

/// The revision data of a template: the strategic merge patch that puts it back.
pub fn data_of(template: &PodTemplateSpec) -> Value {
    let mut t = serde_json::to_value(template).expect("a template serializes");
    if let Some(obj) = t.as_object_mut() {
        obj.insert("$patch".into(), json!("replace"));
    }
    json!({"spec": {"template": t}})
}

/// The template a revision holds.
pub fn template_of(rev: &ControllerRevision) -> Option<PodTemplateSpec> {
    let mut t = rev.data.0.pointer("/spec/template")?.clone();
    t.as_object_mut()?.remove("$patch");
    serde_json::from_value(t).ok()
}

/// The hash part of a revision's name for `data`; `collisions` changes it after a clash.
pub fn hash(data: &Value, collisions: i32) -> String {
    let mut bytes = serde_json::to_vec(data).expect("json serializes");
    bytes.extend_from_slice(&collisions.to_le_bytes());
    short_hash(&bytes)
}

/// The revisions `owner_uid` controls.
pub fn owned<'a>(revisions: &'a [ControllerRevision], owner_uid: &str) -> Vec<&'a ControllerRevision> {
    revisions.iter().filter(|r| controlled_by(*r, owner_uid)).collect()
}

/// Takes over orphaned revisions whose labels `selector` matches (left by a parent deleted with
/// `--cascade=orphan`), as Kubernetes' ClaimControllerRevisions; returns the list as it now is.
pub async fn adopt_orphans(
    api: &Api<ControllerRevision>,
    owner: &OwnerReference,
    selector: &LabelSelector,
    mut revisions: Vec<ControllerRevision>,
) -> Result<Vec<ControllerRevision>> {
    for rev in revisions.iter_mut() {
        let orphan = controller_of(rev).is_none();
        if !orphan || rev.metadata.deletion_timestamp.is_some() || !selects(selector, rev.labels()) {
            continue;
        }
        let mut refs = rev.owner_references().to_vec();
        refs.push(owner.clone());
        let patch = json!({"metadata": {"ownerReferences": refs, "resourceVersion": rev.resource_version()}});
        match api
            .patch(&rev.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(adopted) => *rev = adopted,
            Err(e) if is_status(&e, 404) || is_status(&e, 409) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(revisions)
}

/// The newest revision holding `data`, if any.
pub fn find<'a>(revisions: &[&'a ControllerRevision], data: &Value) -> Option<&'a ControllerRevision> {
    revisions
        .iter()
        .filter(|r| &r.data.0 == data)
        .max_by_key(|r| r.revision.unwrap_or(0))
        .copied()
}

/// Revisions to delete beyond `limit`, oldest first, never one in `live` (current, update, or
/// still worn by a pod).
pub fn prune(revisions: &[&ControllerRevision], limit: i32, live: &HashSet<String>) -> Vec<String> {
    let mut old: Vec<_> = revisions.iter().filter(|r| !live.contains(&r.name_any())).collect();
    old.sort_by_key(|r| r.revision.unwrap_or(0));
    let excess = old.len().saturating_sub(limit.max(0) as usize);
    old[..excess].iter().map(|r| r.name_any()).collect()
}

/// A new revision of `owner` holding `data`, numbered `number`.
pub fn new_revision<K: Resource<DynamicType = ()>>(
    owner: &K,
    template_labels: &BTreeMap<String, String>,
    data: Value,
    number: i64,
    collisions: i32,
) -> ControllerRevision {
    let hash = hash(&data, collisions);
    let mut labels = template_labels.clone();
    labels.insert(HASH_LABEL.into(), hash.clone());
    let mut owner_ref = owner
        .controller_owner_ref(&())
        .expect("a stored object has a name and uid");
    owner_ref.block_owner_deletion = Some(true);
    ControllerRevision {
        metadata: ObjectMeta {
            name: Some(format!("{}-{hash}", owner.meta().name.as_deref().unwrap_or_default())),
            namespace: owner.meta().namespace.clone(),
            labels: Some(labels),
            owner_references: Some(vec![owner_ref]),
            ..Default::default()
        },
        data: RawExtension(data),
        revision: Some(number),
    }
}

/// The revision for `template` (created, or renumbered newest when an old one is reused, as a
/// rollback does) and the collision count that named it.
pub async fn ensure<K: Resource<DynamicType = ()>>(
    api: &Api<ControllerRevision>,
    owner: &K,
    revisions: &[&ControllerRevision],
    template: &PodTemplateSpec,
    collisions: i32,
) -> Result<(ControllerRevision, i32)> {
    let data = data_of(template);
    let newest = revisions.iter().filter_map(|r| r.revision).max().unwrap_or(0);
    if let Some(existing) = find(revisions, &data) {
        if existing.revision.unwrap_or(0) == newest {
            return Ok((existing.clone(), collisions));
        }
        let patch = json!({"revision": newest + 1});
        let renumbered = api
            .patch(&existing.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        return Ok((renumbered, collisions));
    }
    let labels = template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let uid = owner.meta().uid.clone().unwrap_or_default();
    // A name taken by another object or template bumps the collision count, as in Kubernetes.
    for collisions in collisions..collisions + 5 {
        let rev = new_revision(owner, &labels, data.clone(), newest + 1, collisions);
        match api.create(&PostParams::default(), &rev).await {
            Ok(created) => return Ok((created, collisions)),
            Err(e) if is_status(&e, 409) => {
                let taken = api.get(&rev.name_any()).await?;
                let ours = taken.owner_references().iter().any(|o| o.uid == uid);
                if ours && taken.data.0 == data {
                    return Ok((taken, collisions));
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::MissingField(
        "a free ControllerRevision name after 5 hash collisions",
    ))
}

/// Deletes the named revisions (already gone is fine).
pub async fn delete(api: &Api<ControllerRevision>, names: &[String]) -> Result<()> {
    for name in names {
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::StatefulSet;
    use k8s_openapi::api::core::v1::{Container, PodSpec};

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

    fn owner() -> StatefulSet {
        StatefulSet {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("default".into()),
                uid: Some("u".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_revision_holds_a_replacing_patch_of_its_template() {
        let rev = new_revision(&owner(), &BTreeMap::new(), data_of(&template("nginx:1")), 1, 0);
        let data = &rev.data.0;
        assert_eq!(data.pointer("/spec/template/$patch"), Some(&json!("replace")));
        assert_eq!(template_of(&rev), Some(template("nginx:1")));
        let hash = rev.labels().get(HASH_LABEL).unwrap().clone();
        assert_eq!(rev.name_any(), format!("web-{hash}"));
        assert_eq!(rev.owner_references()[0].controller, Some(true));
        let other = new_revision(&owner(), &BTreeMap::new(), data_of(&template("nginx:1")), 1, 1);
        assert_ne!(other.name_any(), rev.name_any(), "a collision count renames");
    }

    #[test]
    fn the_newest_equal_revision_is_found_and_old_ones_pruned_beyond_the_limit() {
        let revs: Vec<_> = (1..=4)
            .map(|i| new_revision(&owner(), &BTreeMap::new(), data_of(&template(&format!("v{i}"))), i, 0))
            .collect();
        let refs: Vec<_> = revs.iter().collect();
        assert_eq!(find(&refs, &data_of(&template("v2"))).and_then(|r| r.revision), Some(2));
        assert!(find(&refs, &data_of(&template("v9"))).is_none());
        let live: HashSet<String> = [revs[0].name_any(), revs[3].name_any()].into();
        assert_eq!(prune(&refs, 1, &live), [revs[1].name_any()]);
        assert!(prune(&refs, 10, &live).is_empty());
    }
}
