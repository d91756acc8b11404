//! The files of configMap, secret, downwardAPI and projected volumes, computed as kubelet's
//! `MakePayload`s do: keys or items with their modes, optional objects and keys, downward
//! API fields and resources (computed by `pods::env`, as for environment variables),
//! service account tokens (renewed when due).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use k8s_openapi::api::core::v1::{DownwardAPIVolumeFile, KeyToPath, Pod, Volume};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::atomic::{FileProjection, Payload};
use super::{CachedToken, TokenRequestFor, VolumeSource};
use crate::pods::env::{self, NodeFacts};
use crate::pods::quantity;

/// The Kubernetes default of defaultMode for every API-data volume.
pub const DEFAULT_MODE: i32 = 0o644;
/// The default expirationSeconds of a projected service account token.
pub const DEFAULT_TOKEN_SECONDS: i64 = 3600;
/// Tokens older than this are renewed whatever their expiry (kubelet's maxTTL).
const MAX_TOKEN_AGE_SECONDS: i64 = 24 * 3600;

fn mode_of(mode: Option<i32>, default: Option<i32>) -> u32 {
    (mode.or(default).unwrap_or(DEFAULT_MODE) as u32) & 0o7777
}

/// The files of `volume` (one of configMap, secret, downwardAPI, projected).
pub(super) async fn volume_payload(
    source: &dyn VolumeSource,
    pod: &Pod,
    volume: &Volume,
    tokens: &Mutex<HashMap<(String, usize), CachedToken>>,
) -> Result<Payload, String> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut files = Payload::new();
    if let Some(cm) = &volume.config_map {
        let default = cm.default_mode;
        keys_payload(
            &mut files,
            config_map_data(source, namespace, &cm.name, cm.optional.unwrap_or(false)).await?,
            cm.items.as_deref(),
            default,
            cm.optional.unwrap_or(false),
            "configmap references non-existent config key",
        )?;
    } else if let Some(secret) = &volume.secret {
        let name = secret.secret_name.as_deref().unwrap_or_default();
        keys_payload(
            &mut files,
            secret_data(source, namespace, name, secret.optional.unwrap_or(false)).await?,
            secret.items.as_deref(),
            secret.default_mode,
            secret.optional.unwrap_or(false),
            "references non-existent secret key",
        )?;
    } else if let Some(downward) = &volume.downward_api {
        downward_payload(
            &mut files,
            source,
            pod,
            downward.items.as_deref().unwrap_or_default(),
            downward.default_mode,
        )
        .await?;
    } else if let Some(projected) = &volume.projected {
        let default = projected.default_mode;
        for (index, projection) in projected.sources.as_deref().unwrap_or_default().iter().enumerate() {
            let mut part = Payload::new();
            if let Some(cm) = &projection.config_map {
                keys_payload(
                    &mut part,
                    config_map_data(source, namespace, &cm.name, cm.optional.unwrap_or(false)).await?,
                    cm.items.as_deref(),
                    default,
                    cm.optional.unwrap_or(false),
                    "configmap references non-existent config key",
                )?;
            } else if let Some(secret) = &projection.secret {
                keys_payload(
                    &mut part,
                    secret_data(source, namespace, &secret.name, secret.optional.unwrap_or(false)).await?,
                    secret.items.as_deref(),
                    default,
                    secret.optional.unwrap_or(false),
                    "references non-existent secret key",
                )?;
            } else if let Some(downward) = &projection.downward_api {
                downward_payload(
                    &mut part,
                    source,
                    pod,
                    downward.items.as_deref().unwrap_or_default(),
                    default,
                )
                .await?;
            } else if let Some(token) = &projection.service_account_token {
                let jwt = service_account_token(source, pod, &volume.name, index, token, tokens).await?;
                // kubelet: a token readable by the pod's one user (or fsGroup) only.
                let owner = fs_user(pod);
                let fs_group = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.security_context.as_ref())
                    .and_then(|c| c.fs_group);
                let mode = if owner.is_some() || fs_group.is_some() {
                    0o600
                } else {
                    mode_of(None, default)
                };
                part.insert(
                    token.path.clone(),
                    FileProjection {
                        data: jwt.into_bytes(),
                        mode,
                        owner,
                    },
                );
            } else if projection.cluster_trust_bundle.is_some() {
                return Err("projected clusterTrustBundle sources are not supported by Weir's node agent; use a configMap source with the bundle".into());
            } else if projection.pod_certificate.is_some() {
                return Err("projected podCertificate sources are not supported by Weir's node agent".into());
            }
            for (path, file) in part {
                if files.insert(path.clone(), file).is_some() {
                    return Err(format!("conflicting duplicate paths: {path:?} is projected twice"));
                }
            }
        }
    }
    Ok(files)
}

/// An object's key → bytes, None when it is missing and optional.
type KeyData = Option<BTreeMap<String, Vec<u8>>>;

async fn config_map_data(source: &dyn VolumeSource, ns: &str, name: &str, optional: bool) -> Result<KeyData, String> {
    let cm = source
        .config_map(ns, name)
        .await
        .map_err(|e| format!("getting configmap {ns}/{name}: {e}"))?;
    match cm {
        None if optional => Ok(None),
        None => Err(format!(
            "configmap \"{name}\" not found in namespace \"{ns}\" (create it, or mark the volume optional)"
        )),
        Some(cm) => {
            let mut data: BTreeMap<String, Vec<u8>> = cm
                .binary_data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
            data.extend(
                cm.data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.into_bytes())),
            );
            Ok(Some(data))
        }
    }
}

async fn secret_data(source: &dyn VolumeSource, ns: &str, name: &str, optional: bool) -> Result<KeyData, String> {
    let secret = source
        .secret(ns, name)
        .await
        .map_err(|e| format!("getting secret {ns}/{name}: {e}"))?;
    match secret {
        None if optional => Ok(None),
        None => Err(format!(
            "secret \"{name}\" not found in namespace \"{ns}\" (create it, or mark the volume optional)"
        )),
        Some(secret) => {
            let mut data: BTreeMap<String, Vec<u8>> = secret
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
            // stringData is write-only in the API; a fake or an old object may still carry it.
            for (k, v) in secret.string_data.unwrap_or_default() {
                data.entry(k).or_insert_with(|| v.into_bytes());
            }
            Ok(Some(data))
        }
    }
}

/// Every key as a file, or only `items` (key → path, mode); a missing item key is an error
/// unless the object is optional.
fn keys_payload(
    files: &mut Payload,
    data: KeyData,
    items: Option<&[KeyToPath]>,
    default_mode: Option<i32>,
    optional: bool,
    missing_key: &str,
) -> Result<(), String> {
    let data = data.unwrap_or_default();
    match items.filter(|i| !i.is_empty()) {
        None => {
            for (key, value) in data {
                files.insert(
                    key,
                    FileProjection {
                        data: value,
                        mode: mode_of(None, default_mode),
                        owner: None,
                    },
                );
            }
        }
        Some(items) => {
            for item in items {
                match data.get(&item.key) {
                    Some(value) => {
                        files.insert(
                            item.path.clone(),
                            FileProjection {
                                data: value.clone(),
                                mode: mode_of(item.mode, default_mode),
                                owner: None,
                            },
                        );
                    }
                    None if optional => {}
                    None => return Err(format!("{missing_key}: {}", item.key)),
                }
            }
        }
    }
    Ok(())
}

/// kubelet's `FsUserFrom`: the runAsUser every container of the pod runs as (its own or the
/// pod's), None when they differ or one has none.
pub fn fs_user(pod: &Pod) -> Option<u32> {
    let spec = pod.spec.as_ref()?;
    let pod_user = spec.security_context.as_ref().and_then(|c| c.run_as_user);
    let mut users = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .map(|c| c.security_context.as_ref().and_then(|s| s.run_as_user).or(pod_user));
    let first = users.next()??;
    users
        .all(|u| u == Some(first))
        .then(|| u32::try_from(first).ok())
        .flatten()
}

/// What the environment's `resourceFieldRef` reads of the node: its allocatable resources.
fn node_facts(allocatable: &BTreeMap<String, Quantity>) -> NodeFacts {
    let units = |name: &str| allocatable.get(name).and_then(quantity::units).unwrap_or(0);
    NodeFacts {
        allocatable_millicores: allocatable.get("cpu").and_then(quantity::milli).unwrap_or(0),
        allocatable_memory: units("memory"),
        allocatable_ephemeral_storage: units("ephemeral-storage"),
        ..NodeFacts::default()
    }
}

async fn downward_payload(
    files: &mut Payload,
    source: &dyn VolumeSource,
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
    default_mode: Option<i32>,
) -> Result<(), String> {
    let mut allocatable = None;
    for item in items {
        let value = if let Some(field) = &item.field_ref {
            let path = field.field_path.as_str();
            if !path.starts_with("metadata.") {
                return Err(format!(
                    "unsupported fieldPath {path:?} in a downwardAPI volume: use metadata.name, metadata.namespace, metadata.uid, metadata.labels, metadata.annotations or metadata.labels['key'] (other fields are for env only)"
                ));
            }
            env::field_value(pod, &NodeFacts::default(), path)?
        } else if let Some(resource) = &item.resource_field_ref {
            let container_name = resource.container_name.as_deref().unwrap_or_default();
            let container = pod
                .spec
                .as_ref()
                .and_then(|s| {
                    s.containers
                        .iter()
                        .chain(s.init_containers.iter().flatten())
                        .find(|c| c.name == container_name)
                })
                .ok_or_else(|| {
                    format!(
                        "downwardAPI item {:?}: resourceFieldRef names container {container_name:?}, which the pod does not have",
                        item.path
                    )
                })?;
            let needs_node = resource.resource.starts_with("limits.")
                && container
                    .resources
                    .as_ref()
                    .and_then(|r| r.limits.as_ref())
                    .and_then(|l| l.get(&resource.resource["limits.".len()..]))
                    .is_none();
            if needs_node && allocatable.is_none() {
                allocatable = Some(
                    source
                        .node_allocatable()
                        .await
                        .map_err(|e| format!("getting the node's allocatable resources: {e}"))?,
                );
            }
            let facts = allocatable.as_ref().map(node_facts).unwrap_or_default();
            env::resource_value(
                container.resources.as_ref(),
                &facts,
                &resource.resource,
                resource.divisor.as_ref().map(|d| d.0.as_str()),
            )?
        } else {
            return Err(format!(
                "downwardAPI item {:?} has neither fieldRef nor resourceFieldRef",
                item.path
            ));
        };
        files.insert(
            item.path.clone(),
            FileProjection {
                data: value.into_bytes(),
                mode: mode_of(item.mode, default_mode),
                owner: None,
            },
        );
    }
    Ok(())
}

async fn service_account_token(
    source: &dyn VolumeSource,
    pod: &Pod,
    volume: &str,
    index: usize,
    projection: &k8s_openapi::api::core::v1::ServiceAccountTokenProjection,
    tokens: &Mutex<HashMap<(String, usize), CachedToken>>,
) -> Result<String, String> {
    let key = (volume.to_string(), index);
    let now = jiff::Timestamp::now();
    {
        let cache = tokens.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cached) = cache.get(&key)
            && !needs_renewal(cached, now)
        {
            return Ok(cached.token.clone());
        }
    }
    let request = TokenRequestFor {
        namespace: pod.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
        service_account: pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
        audience: projection.audience.clone().filter(|a| !a.is_empty()),
        expiration_seconds: projection.expiration_seconds.unwrap_or(DEFAULT_TOKEN_SECONDS),
        pod_name: pod.metadata.name.clone().unwrap_or_default(),
        pod_uid: pod.metadata.uid.clone().unwrap_or_default(),
    };
    let issued = source.service_account_token(&request).await.map_err(|e| {
        format!(
            "requesting a token for service account {}/{}: {e}",
            request.namespace, request.service_account
        )
    })?;
    let token = issued.token.clone();
    tokens.lock().unwrap_or_else(|e| e.into_inner()).insert(
        key,
        CachedToken {
            token: issued.token,
            issued: now,
            expiration: issued.expiration,
            ttl_seconds: request.expiration_seconds,
        },
    );
    Ok(token)
}

/// kubelet's token manager: renew past 80% of the token's life, or when older than 24h.
fn needs_renewal(token: &CachedToken, now: jiff::Timestamp) -> bool {
    let age = now.as_second() - token.issued.as_second();
    let left = token.expiration.as_second() - now.as_second();
    age > MAX_TOKEN_AGE_SECONDS || left < token.ttl_seconds * 20 / 100
}
