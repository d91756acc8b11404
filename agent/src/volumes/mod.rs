//! A pod's volumes, as kubelet's volume manager makes them: created under
//! `<pods-dir>/<pod uid>/volumes/<plugin>/<name>`, resolved into each container's bind mounts
//! (readOnly, subPath, subPathExpr), refreshed in place when their API objects change, and
//! removed with the pod. It never deletes or re-owns hostPath or PersistentVolume contents.
//!
//! Supported: emptyDir (disk, or a tmpfs with `medium: Memory`), hostPath (every type),
//! configMap, secret, downwardAPI, projected (configMap, secret, downwardAPI,
//! serviceAccountToken) and persistentVolumeClaim bound to a hostPath or local PV. Objects
//! come from a [`VolumeSource`] (the pod worker's API client; [`KubeVolumeSource`]).

mod atomic;
mod host;
mod kube_source;
mod payload;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::future::Future;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::{ConfigMap, Container, PersistentVolume, PersistentVolumeClaim, Pod, Secret, Volume};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::pods::{env, quantity};
use crate::runtime::BindMount;

pub use atomic::{DATA_DIR, FileProjection, Payload};
pub use host::{MountPoint, is_mount_point, mounts};
pub use kube_source::KubeVolumeSource;

/// The directory under a pod's directory that holds its volumes.
pub const VOLUMES_DIR: &str = "volumes";
/// kubelet's directory names of the volume plugins.
pub const EMPTY_DIR_PLUGIN: &str = "kubernetes.io~empty-dir";
pub const CONFIG_MAP_PLUGIN: &str = "kubernetes.io~configmap";
pub const SECRET_PLUGIN: &str = "kubernetes.io~secret";
pub const DOWNWARD_API_PLUGIN: &str = "kubernetes.io~downward-api";
pub const PROJECTED_PLUGIN: &str = "kubernetes.io~projected";
/// Mode of directories the agent creates for PersistentVolumes (local-path-provisioner's).
pub const PERSISTENT_VOLUME_DIR_MODE: u32 = 0o777;

/// What went wrong with a pod's volumes, and how to fix it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VolumeError {
    /// The pod object lacks something every pod has once created (uid, namespace, name).
    #[error("pod {0}")]
    Pod(String),
    /// A volume could not be set up; the text is kubelet's FailedMount event message.
    #[error("MountVolume.SetUp failed for volume \"{volume}\" : {message}")]
    SetUp {
        /// The volume's name in the pod spec.
        volume: String,
        /// Why, and what to fix.
        message: String,
    },
    /// A volume type the agent does not implement.
    #[error(
        "volume \"{volume}\" is of type {kind}, which Weir's node agent cannot mount; use emptyDir, hostPath, configMap, secret, downwardAPI, projected or a persistentVolumeClaim bound to a hostPath or local volume"
    )]
    Unsupported {
        /// The volume's name in the pod spec.
        volume: String,
        /// Its type as the pod spec names it (`nfs`, `csi`...).
        kind: String,
    },
    /// A container's volumeMounts cannot be resolved (kubelet's CreateContainerConfigError).
    #[error("{0}")]
    Mount(String),
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: io::Error,
    },
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> VolumeError {
    let context = context.into();
    move |source| VolumeError::Io { context, source }
}

/// A future of a [`VolumeSource`]; the error says what failed (it becomes part of a
/// FailedMount message).
pub type SourceFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>;

/// A token for a projected `serviceAccountToken` source, as the agent asks for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequestFor {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's service account.
    pub service_account: String,
    /// The source's audience; None: the API server's own.
    pub audience: Option<String>,
    /// The source's expirationSeconds (default 3600).
    pub expiration_seconds: i64,
    /// The pod the token is bound to.
    pub pod_name: String,
    /// Its uid.
    pub pod_uid: String,
}

/// A token the API server issued.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedToken {
    /// The JWT.
    pub token: String,
    /// When it stops being accepted.
    pub expiration: jiff::Timestamp,
}

/// Where the objects volumes are made of come from: the pod worker's API client
/// ([`KubeVolumeSource`]) or a test's fake. Missing objects are `Ok(None)`.
pub trait VolumeSource: Send + Sync {
    /// A ConfigMap.
    fn config_map<'a>(&'a self, namespace: &'a str, name: &'a str) -> SourceFuture<'a, Option<ConfigMap>>;
    /// A Secret.
    fn secret<'a>(&'a self, namespace: &'a str, name: &'a str) -> SourceFuture<'a, Option<Secret>>;
    /// A PersistentVolumeClaim.
    fn persistent_volume_claim<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
    ) -> SourceFuture<'a, Option<PersistentVolumeClaim>>;
    /// A PersistentVolume.
    fn persistent_volume<'a>(&'a self, name: &'a str) -> SourceFuture<'a, Option<PersistentVolume>>;
    /// A service account token bound to a pod (the TokenRequest API).
    fn service_account_token<'a>(&'a self, request: &'a TokenRequestFor) -> SourceFuture<'a, IssuedToken>;
    /// This node's allocatable resources: the downward API's `limits.*` of a container
    /// without limits.
    fn node_allocatable(&self) -> SourceFuture<'_, BTreeMap<String, Quantity>>;
}

/// The kind of a prepared volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumeKind {
    /// An emptyDir; `memory`: a tmpfs.
    EmptyDir {
        /// `medium: Memory`.
        memory: bool,
    },
    /// A hostPath.
    HostPath,
    /// A configMap (kept up to date by [`PodVolumes::refresh`]).
    ConfigMap,
    /// A secret (kept up to date).
    Secret,
    /// A downwardAPI volume (kept up to date).
    DownwardApi,
    /// A projected volume (kept up to date, tokens renewed).
    Projected,
    /// A persistentVolumeClaim's volume.
    PersistentVolume {
        /// The bound PersistentVolume's name.
        volume: String,
    },
}

impl VolumeKind {
    /// Whether the agent writes its files from API objects (such volumes are mounted
    /// read-only, as kubelet does since Kubernetes 1.10).
    pub fn is_api_data(&self) -> bool {
        matches!(
            self,
            VolumeKind::ConfigMap | VolumeKind::Secret | VolumeKind::DownwardApi | VolumeKind::Projected
        )
    }
}

/// One volume of the pod, ready to mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreparedVolume {
    /// The host path mounted into containers.
    pub path: PathBuf,
    /// What it is.
    pub kind: VolumeKind,
    /// Mounted read-only whatever the volumeMount says (API data, a read-only claim).
    pub read_only: bool,
}

/// Without the tokens: they are secrets.
impl std::fmt::Debug for PodVolumes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodVolumes")
            .field("pod_dir", &self.pod_dir)
            .field("volumes", &self.volumes)
            .finish_non_exhaustive()
    }
}

struct CachedToken {
    token: String,
    issued: jiff::Timestamp,
    expiration: jiff::Timestamp,
    ttl_seconds: i64,
}

/// The volumes of one pod on this node.
pub struct PodVolumes {
    pod_dir: PathBuf,
    volumes: BTreeMap<String, PreparedVolume>,
    /// Tokens of projected volumes by (volume, source index), renewed by `refresh`.
    tokens: Mutex<HashMap<(String, usize), CachedToken>>,
}

/// `<pods_dir>/<uid>`.
pub fn pod_dir(pods_dir: &Path, pod_uid: &str) -> PathBuf {
    pods_dir.join(pod_uid)
}

fn pod_meta(pod: &Pod) -> Result<(&str, &str, &str), VolumeError> {
    let meta = &pod.metadata;
    let name = meta
        .name
        .as_deref()
        .ok_or_else(|| VolumeError::Pod("has no metadata.name".into()))?;
    let uid = meta
        .uid
        .as_deref()
        .filter(|u| !u.is_empty() && Path::new(u).components().all(|c| matches!(c, Component::Normal(_))))
        .ok_or_else(|| {
            VolumeError::Pod(format!(
                "{name} has no usable metadata.uid (read it back from the API server)"
            ))
        })?;
    let namespace = meta.namespace.as_deref().unwrap_or("default");
    Ok((namespace, name, uid))
}

/// The type of a volume (or PV) as the spec names it: the one field besides `name` that is set.
fn kind_name<T: serde::Serialize>(source: &T) -> String {
    match serde_json::to_value(source) {
        Ok(serde_json::Value::Object(map)) => map
            .keys()
            .find(|k| {
                !matches!(
                    k.as_str(),
                    "name"
                        | "capacity"
                        | "accessModes"
                        | "claimRef"
                        | "persistentVolumeReclaimPolicy"
                        | "storageClassName"
                        | "mountOptions"
                        | "volumeMode"
                        | "nodeAffinity"
                        | "volumeAttributesClassName"
                )
            })
            .cloned()
            .unwrap_or_else(|| "none".into()),
        _ => "unknown".into(),
    }
}

/// How volumes are made beyond what the pod says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeOptions {
    /// Secret and projected volumes on their own tmpfs, as kubelet keeps them, so secrets
    /// never reach the node's disk (needs root; the node agent sets it).
    pub secrets_in_memory: bool,
}

impl PodVolumes {
    /// Creates every volume of `pod` under `<pods_dir>/<pod uid>/volumes/` and resolves the
    /// others (hostPath, claims) to their host paths. Idempotent: an agent restarting calls it
    /// again for pods it already runs (a mounted tmpfs is kept, files are rewritten only if
    /// their objects changed). Secrets are written to disk; see [`PodVolumes::prepare_with`].
    pub async fn prepare(source: &dyn VolumeSource, pod: &Pod, pods_dir: &Path) -> Result<PodVolumes, VolumeError> {
        PodVolumes::prepare_with(source, pod, pods_dir, &VolumeOptions::default()).await
    }

    /// [`PodVolumes::prepare`] with `options` (the node agent: secrets in memory).
    pub async fn prepare_with(
        source: &dyn VolumeSource,
        pod: &Pod,
        pods_dir: &Path,
        options: &VolumeOptions,
    ) -> Result<PodVolumes, VolumeError> {
        let (namespace, _, uid) = pod_meta(pod)?;
        let mut prepared = PodVolumes {
            pod_dir: pod_dir(pods_dir, uid),
            volumes: BTreeMap::new(),
            tokens: Mutex::new(HashMap::new()),
        };
        let volumes_dir = prepared.pod_dir.join(VOLUMES_DIR);
        let spec = pod.spec.as_ref();
        for volume in spec.and_then(|s| s.volumes.as_deref()).unwrap_or_default() {
            let name = volume.name.clone();
            let setup = |message: String| VolumeError::SetUp {
                volume: name.clone(),
                message,
            };
            let at = |plugin: &str| volumes_dir.join(plugin).join(&volume.name);
            let entry = if let Some(empty) = &volume.empty_dir {
                let dir = at(EMPTY_DIR_PLUGIN);
                let memory = match empty.medium.as_deref().unwrap_or("") {
                    "" => false,
                    "Memory" => true,
                    other => {
                        return Err(setup(format!(
                            "emptyDir medium {other:?} is not supported: use \"\" (node disk) or \"Memory\" (tmpfs)"
                        )));
                    }
                };
                fs::create_dir_all(&dir).map_err(io_error(format!("creating {}", dir.display())))?;
                if memory && !host::is_mount_point(&dir).map_err(io_error("reading /proc/self/mountinfo"))? {
                    let limit = match &empty.size_limit {
                        Some(q) => Some(
                            quantity::units(q)
                                .ok_or_else(|| setup(format!("sizeLimit {:?} is not a quantity like 64Mi", q.0)))?,
                        ),
                        None => None,
                    };
                    let allocatable = source
                        .node_allocatable()
                        .await
                        .map_err(|e| setup(format!("getting the node's allocatable memory: {e}")))?;
                    let node_memory = allocatable.get("memory").and_then(quantity::units);
                    let size = memory_volume_size(node_memory, pod_memory_limit(pod), limit);
                    host::mount_tmpfs(&dir, 0o777, size)
                        .map_err(|e| setup(format!("mounting a tmpfs at {}: {e} (needs root)", dir.display())))?;
                }
                let mode = empty.mode.map_or(0o777, |m| m as u32 & 0o7777);
                fs::set_permissions(&dir, fs::Permissions::from_mode(mode))
                    .map_err(io_error(format!("chmod {mode:o} {}", dir.display())))?;
                PreparedVolume {
                    path: dir,
                    kind: VolumeKind::EmptyDir { memory },
                    read_only: false,
                }
            } else if let Some(host_path) = &volume.host_path {
                let path = PathBuf::from(&host_path.path);
                if !path.is_absolute() {
                    return Err(setup(format!("hostPath {:?} must be an absolute path", host_path.path)));
                }
                host::check_host_path(&path, host_path.type_.as_deref().unwrap_or(""), 0o755).map_err(setup)?;
                PreparedVolume {
                    path,
                    kind: VolumeKind::HostPath,
                    read_only: false,
                }
            } else if volume.config_map.is_some() {
                api_data(at(CONFIG_MAP_PLUGIN), VolumeKind::ConfigMap)
            } else if volume.secret.is_some() {
                api_data(at(SECRET_PLUGIN), VolumeKind::Secret)
            } else if volume.downward_api.is_some() {
                api_data(at(DOWNWARD_API_PLUGIN), VolumeKind::DownwardApi)
            } else if volume.projected.is_some() {
                api_data(at(PROJECTED_PLUGIN), VolumeKind::Projected)
            } else if let Some(claim) = &volume.persistent_volume_claim {
                let (volume_name, path) =
                    claim_path(source, namespace, &claim.claim_name)
                        .await
                        .map_err(|e| match e {
                            ClaimError::SetUp(message) => setup(message),
                            ClaimError::Unsupported(kind) => VolumeError::Unsupported {
                                volume: name.clone(),
                                kind: format!("persistentVolumeClaim (bound to a {kind} PersistentVolume)"),
                            },
                        })?;
                PreparedVolume {
                    path,
                    kind: VolumeKind::PersistentVolume { volume: volume_name },
                    read_only: claim.read_only.unwrap_or(false),
                }
            } else {
                return Err(VolumeError::Unsupported {
                    volume: name,
                    kind: kind_name(volume),
                });
            };
            if options.secrets_in_memory && matches!(entry.kind, VolumeKind::Secret | VolumeKind::Projected) {
                let dir = &entry.path;
                fs::create_dir_all(dir).map_err(io_error(format!("creating {}", dir.display())))?;
                if !host::is_mount_point(dir).map_err(io_error("reading /proc/self/mountinfo"))? {
                    host::mount_tmpfs(dir, 0o755, None)
                        .map_err(|e| setup(format!("mounting a tmpfs at {}: {e} (needs root)", dir.display())))?;
                }
            }
            if entry.kind.is_api_data() {
                prepared.write_api_data(source, pod, volume, &entry.path).await?;
            } else if matches!(entry.kind, VolumeKind::EmptyDir { .. }) {
                apply_fs_group(pod, &entry.path, false)
                    .map_err(io_error(format!("applying fsGroup to {}", entry.path.display())))?;
            }
            prepared.volumes.insert(volume.name.clone(), entry);
        }
        Ok(prepared)
    }

    /// The pod's volumes by name.
    pub fn volumes(&self) -> &BTreeMap<String, PreparedVolume> {
        &self.volumes
    }

    /// The host path of the volume `name`.
    pub fn path(&self, name: &str) -> Option<&Path> {
        self.volumes.get(name).map(|v| v.path.as_path())
    }

    /// The bind mounts of `container`: its volumeMounts with readOnly, subPath and
    /// subPathExpr (`$(VAR)` from `env`, the container's resolved environment) as kubelet
    /// resolves them. A missing subPath directory is created inside the volume; a subPath that
    /// is absolute, contains `..` or leads out of the volume through a symlink is refused.
    pub fn mounts_for(&self, container: &Container, env: &[(String, String)]) -> Result<Vec<BindMount>, VolumeError> {
        let mut mounts = Vec::new();
        for m in container.volume_mounts.as_deref().unwrap_or_default() {
            let volume = self.volumes.get(&m.name).ok_or_else(|| {
                VolumeError::Mount(format!(
                    "cannot find volume \"{}\" to mount into container \"{}\"",
                    m.name, container.name
                ))
            })?;
            let fail = |why: String| {
                VolumeError::Mount(format!(
                    "failed to prepare subPath for volumeMount \"{}\" of container \"{}\": {why}",
                    m.name, container.name
                ))
            };
            let sub_path = match (
                m.sub_path.as_deref().filter(|s| !s.is_empty()),
                m.sub_path_expr.as_deref().filter(|s| !s.is_empty()),
            ) {
                (Some(_), Some(_)) => return Err(fail("subPath and subPathExpr are mutually exclusive".into())),
                (Some(path), None) => Some(path.to_string()),
                (None, Some(expr)) => Some(env::expand(expr, &|name| {
                    env.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.clone())
                })),
                (None, None) => None,
            };
            let source = match sub_path {
                None => volume.path.clone(),
                Some(sub) => resolve_sub_path(&volume.path, &sub).map_err(fail)?,
            };
            mounts.push(BindMount {
                source,
                destination: m.mount_path.clone(),
                readonly: m.read_only.unwrap_or(false) || volume.read_only || volume.kind.is_api_data(),
            });
        }
        Ok(mounts)
    }

    /// Re-reads the configMap, secret, downwardAPI and projected volumes' sources (renewing
    /// service account tokens past 80% of their life or 24 hours old) and swaps in new files
    /// atomically, so running containers see the change through the volume's symlinks;
    /// returns whether anything changed. subPath mounts keep the file they were given, as in
    /// Kubernetes. Every volume is tried; the first error is returned after the others.
    pub async fn refresh(&self, source: &dyn VolumeSource, pod: &Pod) -> Result<bool, VolumeError> {
        let mut changed = false;
        let mut first_error = None;
        for volume in pod.spec.as_ref().and_then(|s| s.volumes.as_deref()).unwrap_or_default() {
            let Some(prepared) = self.volumes.get(&volume.name).filter(|v| v.kind.is_api_data()) else {
                continue;
            };
            match self.write_api_data(source, pod, volume, &prepared.path).await {
                Ok(c) => changed |= c,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(changed),
        }
    }

    /// Unmounts the pod's tmpfs volumes (memory-backed emptyDirs, in-memory secret and
    /// projected volumes) and removes its volume directories, then
    /// the pod directory if that is left empty. Refuses (and deletes nothing) while anything
    /// else is mounted below them. hostPath and PersistentVolume contents live elsewhere and
    /// are never touched.
    pub fn teardown(pods_dir: &Path, pod_uid: &str) -> Result<(), VolumeError> {
        if pod_uid.is_empty()
            || !Path::new(pod_uid)
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(VolumeError::Pod(format!("uid {pod_uid:?} is not a directory name")));
        }
        let dir = pod_dir(pods_dir, pod_uid);
        let volumes_dir = dir.join(VOLUMES_DIR);
        let volumes_dir = match fs::canonicalize(&volumes_dir) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return remove_if_empty(&dir),
            Err(e) => return Err(io_error(format!("resolving {}", volumes_dir.display()))(e)),
        };
        let memory_backed = [EMPTY_DIR_PLUGIN, SECRET_PLUGIN, PROJECTED_PLUGIN].map(|p| volumes_dir.join(p));
        let mut below: Vec<MountPoint> = host::mounts()
            .map_err(io_error("reading /proc/self/mountinfo"))?
            .into_iter()
            .filter(|m| m.path.starts_with(&volumes_dir))
            .collect();
        // Deepest first; a path mounted twice is unmounted twice.
        below.sort_by_key(|m| std::cmp::Reverse(m.path.components().count()));
        for m in &below {
            let ours = m.fs_type == "tmpfs" && memory_backed.iter().any(|p| m.path.parent() == Some(p.as_path()));
            if !ours {
                return Err(VolumeError::Mount(format!(
                    "{} ({}) is mounted inside the volumes of pod {pod_uid}; unmount it first (the agent removes only its own tmpfs mounts, so that nothing outside the pod is deleted)",
                    m.path.display(),
                    m.fs_type
                )));
            }
        }
        for m in &below {
            host::unmount(&m.path).map_err(io_error(format!("unmounting {}", m.path.display())))?;
        }
        fs::remove_dir_all(&volumes_dir).map_err(io_error(format!("removing {}", volumes_dir.display())))?;
        remove_if_empty(&dir)
    }

    /// Writes the files of an API-data volume; whether they changed.
    async fn write_api_data(
        &self,
        source: &dyn VolumeSource,
        pod: &Pod,
        volume: &Volume,
        dir: &Path,
    ) -> Result<bool, VolumeError> {
        let setup = |message: String| VolumeError::SetUp {
            volume: volume.name.clone(),
            message,
        };
        let files = payload::volume_payload(source, pod, volume, &self.tokens)
            .await
            .map_err(setup)?;
        let changed = atomic::write(dir, &files).map_err(|e| setup(format!("writing {}: {e}", dir.display())))?;
        if changed {
            apply_fs_group(pod, dir, true).map_err(io_error(format!("applying fsGroup to {}", dir.display())))?;
        }
        Ok(changed)
    }
}

fn api_data(path: PathBuf, kind: VolumeKind) -> PreparedVolume {
    PreparedVolume {
        path,
        kind,
        read_only: true,
    }
}

fn remove_if_empty(dir: &Path) -> Result<(), VolumeError> {
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::DirectoryNotEmpty) => Ok(()),
        Err(e) => Err(io_error(format!("removing {}", dir.display()))(e)),
    }
}

fn apply_fs_group(pod: &Pod, dir: &Path, read_only: bool) -> io::Result<()> {
    let Some(context) = pod.spec.as_ref().and_then(|s| s.security_context.as_ref()) else {
        return Ok(());
    };
    let Some(gid) = context.fs_group.and_then(|g| u32::try_from(g).ok()) else {
        return Ok(());
    };
    let on_root_mismatch = context.fs_group_change_policy.as_deref() == Some("OnRootMismatch");
    host::set_volume_ownership(dir, gid, read_only, on_root_mismatch)
}

enum ClaimError {
    SetUp(String),
    Unsupported(String),
}

/// The bound PersistentVolume of claim `namespace/name` and its host path (created with mode
/// 0777 when its type is DirectoryOrCreate and it is missing).
async fn claim_path(source: &dyn VolumeSource, namespace: &str, name: &str) -> Result<(String, PathBuf), ClaimError> {
    let claim = source
        .persistent_volume_claim(namespace, name)
        .await
        .map_err(|e| ClaimError::SetUp(format!("getting persistentvolumeclaim {namespace}/{name}: {e}")))?
        .ok_or_else(|| {
            ClaimError::SetUp(format!(
                "persistentvolumeclaim \"{name}\" not found in namespace \"{namespace}\""
            ))
        })?;
    let phase = claim.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("");
    let volume_name = claim.spec.as_ref().and_then(|s| s.volume_name.as_deref()).unwrap_or("");
    if phase != "Bound" || volume_name.is_empty() {
        return Err(ClaimError::SetUp(format!(
            "PVC {namespace}/{name} has non-bound phase ({phase:?}) or empty pvc.Spec.VolumeName ({volume_name:?}); wait for the volume controller to bind it"
        )));
    }
    let pv = source
        .persistent_volume(volume_name)
        .await
        .map_err(|e| ClaimError::SetUp(format!("getting persistentvolume {volume_name}: {e}")))?
        .ok_or_else(|| {
            ClaimError::SetUp(format!(
                "persistentvolume \"{volume_name}\" not found (bound to claim {namespace}/{name})"
            ))
        })?;
    let spec = pv.spec.as_ref();
    let claim_ref = spec.and_then(|s| s.claim_ref.as_ref());
    let bound_here = claim_ref.is_some_and(|r| {
        r.name.as_deref() == Some(name)
            && r.namespace.as_deref() == Some(namespace)
            && (r.uid.is_none() || r.uid == claim.metadata.uid)
    });
    if !bound_here {
        return Err(ClaimError::SetUp(format!(
            "persistentvolume \"{volume_name}\" is not bound to claim {namespace}/{name} (its claimRef names another)"
        )));
    }
    if let Some(host_path) = spec.and_then(|s| s.host_path.as_ref()) {
        let path = PathBuf::from(&host_path.path);
        if !path.is_absolute() {
            return Err(ClaimError::SetUp(format!(
                "persistentvolume \"{volume_name}\": hostPath {:?} must be an absolute path",
                host_path.path
            )));
        }
        host::check_host_path(
            &path,
            host_path.type_.as_deref().unwrap_or(""),
            PERSISTENT_VOLUME_DIR_MODE,
        )
        .map_err(|e| ClaimError::SetUp(format!("persistentvolume \"{volume_name}\": {e}")))?;
        return Ok((volume_name.to_string(), path));
    }
    if let Some(local) = spec.and_then(|s| s.local.as_ref()) {
        let path = PathBuf::from(&local.path);
        if !path.is_dir() {
            return Err(ClaimError::SetUp(format!(
                "persistentvolume \"{volume_name}\": local path {:?} does not exist on this node or is not a directory",
                local.path
            )));
        }
        return Ok((volume_name.to_string(), path));
    }
    Err(ClaimError::Unsupported(spec.map_or_else(|| "empty".into(), kind_name)))
}

/// The memory limit of the pod's cgroup (kubelet's `ResourceConfigForPod`): the containers'
/// and sidecars' limits added up, or the largest init container's if that is more; None when
/// a container has no memory limit.
pub fn pod_memory_limit(pod: &Pod) -> Option<i128> {
    let spec = pod.spec.as_ref()?;
    let limit = |c: &Container| {
        c.resources
            .as_ref()?
            .limits
            .as_ref()?
            .get("memory")
            .and_then(quantity::units)
            .filter(|v| *v > 0)
    };
    let mut sum = 0;
    for c in &spec.containers {
        sum += limit(c)?;
    }
    let mut largest_init = 0;
    for c in spec.init_containers.iter().flatten() {
        if c.restart_policy.as_deref() == Some("Always") {
            sum += limit(c)?;
        } else {
            largest_init = largest_init.max(limit(c)?);
        }
    }
    Some(sum.max(largest_init))
}

/// The size of a memory-backed emptyDir (kubelet's `calculateEmptyDirMemorySize`): the
/// node's allocatable memory, or the pod's memory limit if smaller, or the volume's
/// sizeLimit if smaller still; None (the kernel's default, half the RAM) when none is known.
pub fn memory_volume_size(node: Option<i128>, pod: Option<i128>, volume: Option<i128>) -> Option<u128> {
    let mut size = node.filter(|v| *v > 0);
    for candidate in [pod, volume].into_iter().flatten().filter(|v| *v > 0) {
        if size.is_none_or(|s| candidate <= s) {
            size = Some(candidate);
        }
    }
    size.and_then(|s| u128::try_from(s).ok())
}

/// `volume/sub` for a subPath mount: checked, created as a directory (with the volume's
/// mode) when missing, symlinks resolved and kept inside the volume.
fn resolve_sub_path(volume: &Path, sub: &str) -> Result<PathBuf, String> {
    let sub_path = Path::new(sub);
    if sub_path.is_absolute() {
        return Err(format!("error SubPath {sub:?} must not be an absolute path"));
    }
    if sub_path.components().any(|c| c == Component::ParentDir) {
        return Err(format!("error SubPath {sub:?} must not contain '..'"));
    }
    let root = fs::canonicalize(volume).map_err(|e| format!("volume path {}: {e}", volume.display()))?;
    let inside = |p: &Path| -> Result<(), String> {
        if p.starts_with(&root) {
            Ok(())
        } else {
            Err(format!(
                "subpath {:?} not within volume path {:?}",
                p.display().to_string(),
                root.display().to_string()
            ))
        }
    };
    // The longest part that exists, resolved; what is missing is created below it, so no
    // symlink is followed while creating.
    let parts: Vec<Component> = sub_path.components().filter(|c| *c != Component::CurDir).collect();
    let mut existing = root.clone();
    let mut missing = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let next = existing.join(part);
        if next.symlink_metadata().is_err() {
            missing = parts[i..].to_vec();
            break;
        }
        existing = fs::canonicalize(&next).map_err(|e| format!("resolving {}: {e}", next.display()))?;
        inside(&existing)?;
    }
    if !missing.is_empty() {
        let mode = fs::metadata(&root)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0o755);
        for part in missing {
            existing.push(part);
            fs::create_dir(&existing).map_err(|e| format!("creating {}: {e}", existing.display()))?;
            fs::set_permissions(&existing, fs::Permissions::from_mode(mode))
                .map_err(|e| format!("chmod {}: {e}", existing.display()))?;
        }
    }
    inside(&existing)?;
    Ok(existing)
}

#[cfg(test)]
mod tests;
